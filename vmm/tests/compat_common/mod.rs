//! Shared by the compatibility tests (`compat_matrix`, `compat_golden`, `compat_schemas`):
//! real `ferry` processes driven over QMP, the committed (frozen) schemas of `compat/schemas/`,
//! and stream comparisons through `vmm::migrate`.
//!
//! Self-contained on purpose (it does not reuse `ferry_common`): the compatibility tests are
//! the long-lived contract and should not move when other tests' helpers change.
#![allow(dead_code)]

use devstate::{Item, MachineSchema, RawSection, Reader, StreamReader};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmm::qmp::client::QmpClient;

/// Bound on every wait.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The repository root (the workspace holding `vmm/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

/// The cargo target directory this test binary was built into (`.../target`), whatever
/// `CARGO_TARGET_DIR` says: the binary lives in `TARGET/PROFILE/deps/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Fail loudly, never skip, when KVM is missing.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the compatibility tests run real KVM guests (they never skip)"
    );
}

/// A running `ferry run` process with its QMP client.
pub struct Ferry {
    pub name: String,
    pub child: Child,
    pub qmp: QmpClient,
    pub log: PathBuf,
}

impl Ferry {
    /// Start `ferry run ARGS --qmp unix:DIR/NAME.qmp`, stderr to `DIR/NAME.log`.
    pub fn spawn(dir: &Path, name: &str, args: &[String]) -> Ferry {
        require_kvm();
        let socket = dir.join(format!("{name}.qmp"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("run")
            .args(args)
            .arg("--qmp")
            .arg(format!("unix:{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot start ferry");
        let qmp = QmpClient::connect(&socket, TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "{name} ({}) did not open its QMP socket: {e}\n{}",
                args.join(" "),
                read(&log)
            )
        });
        Ferry {
            name: name.to_owned(),
            child,
            qmp,
            log,
        }
    }

    /// Run a command that must succeed.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.qmp.execute(cmd, args.clone()).unwrap_or_else(|e| {
            panic!(
                "{}: {cmd} {args} failed: {e}\n{} log:\n{}",
                self.name,
                self.name,
                read(&self.log)
            )
        })
    }

    /// Run a command that must fail; returns its `Class: description`.
    pub fn err(&mut self, cmd: &str, args: Value) -> String {
        match self.qmp.execute(cmd, args.clone()) {
            Ok(v) => panic!("{}: {cmd} {args} unexpectedly succeeded: {v}", self.name),
            Err(e) => e.to_string(),
        }
    }

    pub fn status(&mut self) -> String {
        self.ok("query-status", json!({}))["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn pass(&mut self) -> u64 {
        self.ok("__org.ferry_query-guest", json!({}))["pass"]
            .as_u64()
            .unwrap()
    }

    /// Wait (bounded) until the guest's pass counter reaches `target`.
    pub fn wait_pass(&mut self, target: u64) -> u64 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let p = self.pass();
            if p >= target {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "{}: guest stuck at pass {p}, wanted {target}\n{}",
                self.name,
                read(&self.log)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Wait (bounded) for `query-migrate` to reach one of `statuses`.
    pub fn wait_migration(&mut self, statuses: &[&str]) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let info = self.ok("query-migrate", json!({}));
            if statuses.iter().any(|s| info["status"] == *s) {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "{}: migration stuck: {info}\n{}",
                self.name,
                read(&self.log)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait (bounded) until the process accepts hotplug-guarded commands again after a
    /// migration. Works around a race in `vmm/src/control.rs`: `query-migrate` (and the
    /// `MIGRATION` event) say `completed` while the migration thread still holds the VM lock
    /// and the `migrating` flag, so for a moment `device_add`, `__org.ferry_verify-guest`, ...
    /// are refused with "not allowed while migrating" and `__org.ferry_query-connectors`
    /// shows `remaining-ms: null`. `__org.ferry_guest-hotplug` without arguments changes
    /// nothing, is refused in that window and takes the VM lock once it is over.
    pub fn settle(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.qmp.execute("__org.ferry_guest-hotplug", json!({})) {
                Ok(_) => return,
                Err(e) if e.to_string().contains("not allowed while migrating") => {}
                Err(e) => panic!("{}: {e}", self.name),
            }
            assert!(
                Instant::now() < deadline,
                "{}: still 'migrating' long after the migration completed\n{}",
                self.name,
                read(&self.log)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The port a `--incoming tcp:127.0.0.1:0` destination listens on.
    pub fn incoming_port(&mut self) -> String {
        let info = self.ok("query-migrate", json!({}));
        info["socket-address"][0]["port"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no listening port: {info}", self.name))
            .to_owned()
    }

    /// Every connector, as `__org.ferry_query-connectors` lists them.
    ///
    /// Works around a bug in `vmm/src/control.rs` (`query_connectors`): it reads the
    /// hotplug clock with `vm.try_lock()` and reports `remaining-ms: null` whenever another
    /// thread holds the VM lock at that instant; the query is repeated (bounded) until a
    /// pending unplug shows its remaining time.
    pub fn connectors(&mut self) -> Vec<Value> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let l = self.ok("__org.ferry_query-connectors", json!({}));
            let l = l.as_array().expect("connector list").clone();
            let torn = l
                .iter()
                .any(|c| c["unplug-pending"] == true && c["remaining-ms"].is_null());
            if !torn || Instant::now() > deadline {
                return l;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `device_add` that must succeed.
    ///
    /// Works around a bug in `vmm/src/control.rs` (`device_add`/`device_del` take the VM
    /// lock with `try_lock()` and turn any contention, e.g. the hotplug service thread
    /// serving the previous `device_add`, into "device_add not allowed while migrating"
    /// although no migration runs): that error is retried (bounded) only while
    /// `query-migrate` shows no migration in progress.
    pub fn add(&mut self, dev: Value) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.qmp.execute("device_add", dev.clone()) {
                Ok(_) => return,
                Err(e) if e.to_string().contains("not allowed while migrating") => {
                    let st = self.ok("query-migrate", json!({}));
                    let st = st["status"].as_str().unwrap_or("none").to_owned();
                    assert!(
                        !matches!(st.as_str(), "setup" | "active" | "device"),
                        "{}: device_add {dev} refused during a migration ({st}): {e}",
                        self.name
                    );
                    assert!(
                        Instant::now() < deadline,
                        "{}: device_add {dev} keeps failing: {e}\n{}",
                        self.name,
                        read(&self.log)
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!(
                    "{}: device_add {dev} failed: {e}\n{}",
                    self.name,
                    read(&self.log)
                ),
            }
        }
    }

    /// `device_del` that must succeed (same workaround as [`Ferry::add`]).
    pub fn del(&mut self, id: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.qmp.execute("device_del", json!({"id": id})) {
                Ok(_) => return,
                Err(e)
                    if e.to_string().contains("not allowed while migrating")
                        && Instant::now() < deadline =>
                {
                    let st = self.ok("query-migrate", json!({}));
                    assert!(
                        !matches!(st["status"].as_str(), Some("setup" | "active" | "device")),
                        "{}: device_del {id} refused during a migration: {e}",
                        self.name
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!(
                    "{}: device_del {id} failed: {e}\n{}",
                    self.name,
                    read(&self.log)
                ),
            }
        }
    }

    /// The connector holding `device`.
    pub fn connector(&mut self, device: &str) -> Value {
        let l = self.connectors();
        l.iter()
            .find(|c| c["device"] == device)
            .cloned()
            .unwrap_or_else(|| panic!("{}: no connector holds {device}: {l:?}", self.name))
    }

    /// Wait (bounded) until the connector holding `device` satisfies `pred`.
    pub fn wait_connector(
        &mut self,
        device: &str,
        pred: impl Fn(&Value) -> bool,
        what: &str,
    ) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let c = self.connector(device);
            if pred(&c) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {device}: {what} never happened: {c}\n{}",
                self.name,
                read(&self.log)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Wait (bounded) for event `name` whose data satisfies `pred`.
    pub fn wait_event(&mut self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.qmp
            .wait_event(name, TIMEOUT, pred)
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; events so far: {:?}\n{}",
                    self.name,
                    self.qmp.events(),
                    read(&self.log)
                )
            })
    }

    /// Names of the hotplug events (DEVICE_DELETED, DEVICE_UNPLUG_GUEST_ERROR) received and
    /// not yet consumed, as `EVENT:device`.
    pub fn device_events(&self) -> Vec<String> {
        self.qmp
            .events()
            .iter()
            .filter(|e| e["event"] == "DEVICE_DELETED" || e["event"] == "DEVICE_UNPLUG_GUEST_ERROR")
            .map(|e| {
                format!(
                    "{}:{}",
                    e["event"].as_str().unwrap_or(""),
                    e["data"]["device"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    /// Stop (if running), check the memory pattern, return the verify-guest reply.
    pub fn verify(&mut self) -> Value {
        if self.status() == "running" {
            self.ok("stop", json!({}));
        }
        let v = self.ok("__org.ferry_verify-guest", json!({}));
        assert_eq!(
            v["ok"], true,
            "{}: guest memory pattern broken: {v}",
            self.name
        );
        v
    }

    /// Save to `file` with `migrate file:` and wait for completion.
    pub fn save(&mut self, file: &Path) {
        self.ok(
            "migrate",
            json!({"uri": format!("file:{}", file.display())}),
        );
        let info = self.wait_migration(&["completed", "failed"]);
        assert_eq!(
            info["status"],
            "completed",
            "{}: migrate file:{} failed: {info}\n{}",
            self.name,
            file.display(),
            read(&self.log)
        );
        self.settle();
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The committed, frozen schema of `machine` (`compat/schemas/MACHINE.json`).
pub fn committed_schema(machine: &str) -> MachineSchema {
    let p = repo_root()
        .join("compat/schemas")
        .join(format!("{machine}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: every machine type needs its committed schema",
            p.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not a schema: {e}", p.display()))
}

/// The device sections of a stream file (framing and CRCs checked), with its machine type.
pub fn stream_sections(p: &Path) -> (String, Vec<RawSection>) {
    let f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    vmm::migrate::read_stream_sections(std::io::BufReader::new(f))
        .unwrap_or_else(|e| panic!("{}: not a readable stream: {e}", p.display()))
}

/// Read `p` as a destination holding only the frozen schema would: sections and
/// subsections by name, versions within the committed `[min_version, version]`, every body
/// decoded field by field with the committed description and nothing left over. This is what
/// a build from the day the machine type was frozen accepts.
pub fn frozen_read(p: &Path, schema: &MachineSchema) -> Result<(), String> {
    let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let catalog = schema.catalog();
    let mut r = StreamReader::new(bytes.as_slice(), Some(&catalog))
        .map_err(|e| format!("{}: {e}", p.display()))?;
    if r.header().machine != schema.machine {
        return Err(format!(
            "{}: stream of {} read with the schema of {}",
            p.display(),
            r.header().machine,
            schema.machine
        ));
    }
    let mut sections = Vec::new();
    loop {
        match r.next_item().map_err(|e| {
            format!(
                "{}: refused by the frozen schema of {}: {e}",
                p.display(),
                schema.machine
            )
        })? {
            Item::Section(s) => sections.push(s),
            Item::End => break,
            Item::Config(_) | Item::Ram(_) => {}
        }
    }
    for s in &sections {
        let sch = schema.section(&s.name).expect("the catalog knew it");
        let fields = devstate::fields_at(sch.fields.clone(), s.version);
        let mut rd = Reader::new(&s.body, s.body_offset, &s.name);
        devstate::decode_fields(&fields, &mut rd)
            .and_then(|_| rd.finish())
            .map_err(|e| {
                format!(
                    "{}: section {}[{}] v{} does not decode with the frozen fields: {e}",
                    p.display(),
                    s.name,
                    s.instance,
                    s.version
                )
            })?;
        for sub in &s.subsections {
            let ssch = sch
                .subsections
                .iter()
                .find(|x| x.name == sub.name)
                .expect("the catalog knew it");
            let mut rd = Reader::new(&sub.body, sub.body_offset, &sub.name);
            devstate::decode_fields(&ssch.fields, &mut rd)
                .and_then(|_| rd.finish())
                .map_err(|e| {
                    format!(
                        "{}: subsection {}[{}]/{} does not decode with the frozen fields: {e}",
                        p.display(),
                        s.name,
                        s.instance,
                        sub.name
                    )
                })?;
        }
    }
    Ok(())
}

/// Differences between two streams' device sections, decoded with `schema`; volatile
/// fields are reported apart. `migration[0].source_running` (the engine's run-state record,
/// not device state) is dropped when `ignore_run_state`: a live source was running, its
/// paused `-S` destination re-serialises as not running.
pub fn diff_streams(
    schema: &MachineSchema,
    a: &Path,
    b: &Path,
    ignore_run_state: bool,
) -> vmm::migrate::SectionDiff {
    let (ma, sa) = stream_sections(a);
    let (mb, sb) = stream_sections(b);
    assert_eq!(
        ma,
        mb,
        "{} vs {}: machine types differ",
        a.display(),
        b.display()
    );
    let mut d = vmm::migrate::diff_sections(schema, &sa, &sb)
        .unwrap_or_else(|e| panic!("{} vs {}: {e}", a.display(), b.display()));
    if ignore_run_state {
        d.differences
            .retain(|x| !x.starts_with("migration instance 0 source_running"));
    }
    d
}
