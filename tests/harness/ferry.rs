//! A real `ferry run` process with its own QMP socket and log, and bounded waits on it.

use crate::{QmpClient, TIMEOUT};
use serde_json::{Value, json};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Fails the test, loudly, when KVM is missing (the suites never skip).
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the end-to-end tests need KVM (they do not skip)"
    );
}

/// `migrate-set-parameters` for tests whose subject is not convergence. A dirtying guest in
/// a debug build on a loaded 2-core host measures a low bandwidth: its migration can stay
/// above the default 300 ms downtime limit for all of the default 30 passes (and fail, not
/// converged) or run past [`TIMEOUT`]. With these it switches over as soon as 3 s of
/// downtime fits, and after 10 passes at the latest.
pub fn completes_under_load() -> Value {
    json!({
        "downtime-limit": 3000,
        "__org.ferry_max-iterations": 10,
        "__org.ferry_switchover-policy": "force",
    })
}

/// The contents of a log file (empty when unreadable).
pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Owned copies of `a`.
pub fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// A fresh directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create a temporary directory")
}

/// A running `ferry run` process; killed on drop.
#[derive(Debug)]
pub struct Ferry {
    /// Names the process in every failure message (`src`, `dst`, ...).
    pub name: String,
    pub child: Child,
    pub qmp: QmpClient,
    pub socket: PathBuf,
    /// Its stderr, shown by every failing wait.
    pub log: PathBuf,
}

impl Ferry {
    /// Start `ferry run ARGS --qmp unix:DIR/NAME.qmp` (stderr to `DIR/NAME.log`) and connect.
    pub fn spawn<S: AsRef<OsStr>>(dir: &Path, name: &str, args: &[S]) -> Ferry {
        let mut cmd = Command::new(crate::bins::ferry());
        cmd.arg("run").args(args);
        Ferry::spawn_command(cmd, dir, name)
    }

    /// Start `CMD --qmp unix:DIR/NAME.qmp` (a `ferry run` command line, possibly wrapped, e.g.
    /// by `ip netns exec`) with stderr to `DIR/NAME.log`, and connect to its QMP socket.
    pub fn spawn_command(mut cmd: Command, dir: &Path, name: &str) -> Ferry {
        require_kvm();
        let socket = dir.join(format!("{name}.qmp"));
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("{name}: cannot create {}: {e}", log.display()));
        cmd.arg("--qmp")
            .arg(format!("unix:{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
        let qmp = QmpClient::connect(&socket, TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "{name} ({cmd:?}) did not open its QMP socket: {e}\n{}",
                read(&log)
            )
        });
        Ferry {
            name: name.to_owned(),
            child,
            qmp,
            socket,
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

    /// The run state (`query-status`).
    pub fn status(&mut self) -> String {
        self.ok("query-status", json!({}))["status"]
            .as_str()
            .expect("query-status has a status")
            .to_owned()
    }

    /// The test guest's pass counter.
    pub fn pass(&mut self) -> u64 {
        self.ok("__org.ferry_query-guest", json!({}))["pass"]
            .as_u64()
            .expect("query-guest has a pass")
    }

    /// Polls `probe` until it returns `Some`; fails after `timeout` with `what` and the
    /// last value seen. Polls, does not spin: a QMP round trip per iteration would keep the
    /// test and the ferry process busy on the cores the guest's vCPU needs.
    pub fn poll<T>(
        &mut self,
        timeout: Duration,
        what: &dyn Fn(&mut Ferry) -> String,
        mut probe: impl FnMut(&mut Ferry) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = probe(self) {
                return v;
            }
            if Instant::now() >= deadline {
                let w = what(self);
                panic!(
                    "{}: {w} (waited {timeout:?})\n{} log:\n{}",
                    self.name,
                    self.name,
                    read(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait until the guest's pass counter reaches `target`.
    pub fn wait_pass(&mut self, target: u64) -> u64 {
        self.poll(
            TIMEOUT,
            &|f| format!("guest stuck at pass {}, wanted {target}", f.pass()),
            |f| Some(f.pass()).filter(|p| *p >= target),
        )
    }

    /// Wait for `query-migrate` to reach one of `statuses`.
    pub fn wait_migration(&mut self, statuses: &[&str]) -> Value {
        self.poll(
            TIMEOUT,
            &|f| {
                format!(
                    "migration never reached {statuses:?}: {}",
                    f.ok("query-migrate", json!({}))
                )
            },
            |f| {
                let info = f.ok("query-migrate", json!({}));
                statuses
                    .iter()
                    .any(|s| info["status"] == *s)
                    .then_some(info)
            },
        )
    }

    /// Wait until the process accepts hotplug-guarded commands again after a migration.
    /// Works around a race in `vmm/src/control.rs`: `query-migrate` (and the `MIGRATION`
    /// event) say `completed` while the migration thread still holds the VM lock and the
    /// `migrating` flag, so for a moment `device_add`, `__org.ferry_verify-guest`, ... are
    /// refused with "not allowed while migrating". `__org.ferry_guest-hotplug` without
    /// arguments changes nothing, is refused in that window and takes the VM lock after it.
    pub fn settle(&mut self) {
        self.poll(
            TIMEOUT,
            &|_| "still 'migrating' long after the migration completed".into(),
            |f| match f.qmp.execute("__org.ferry_guest-hotplug", json!({})) {
                Ok(_) => Some(()),
                Err(e) if e.to_string().contains("not allowed while migrating") => None,
                Err(e) => panic!("{}: {e}", f.name),
            },
        )
    }

    /// The port a `--incoming tcp:HOST:0` destination listens on.
    pub fn incoming_port(&mut self) -> String {
        let info = self.ok("query-migrate", json!({}));
        info["socket-address"][0]["port"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no listening port: {info}", self.name))
            .to_owned()
    }

    /// Every connector, as `__org.ferry_query-connectors` lists them.
    ///
    /// Works around a bug in `vmm/src/control.rs` (`query_connectors`): it reads the hotplug
    /// clock with `vm.try_lock()` and reports `remaining-ms: null` whenever another thread
    /// holds the VM lock at that instant; the query is repeated (bounded) until a pending
    /// unplug shows its remaining time.
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

    /// The connector holding `device`.
    pub fn connector(&mut self, device: &str) -> Value {
        let l = self.connectors();
        l.iter()
            .find(|c| c["device"] == device)
            .cloned()
            .unwrap_or_else(|| panic!("{}: no connector holds {device}: {l:?}", self.name))
    }

    /// Wait until the connector holding `device` satisfies `pred`; `what` names the wait.
    pub fn wait_connector(
        &mut self,
        device: &str,
        pred: impl Fn(&Value) -> bool,
        what: &str,
    ) -> Value {
        self.poll(
            TIMEOUT,
            &|f| format!("{device}: {what} never happened: {}", f.connector(device)),
            |f| Some(f.connector(device)).filter(|c| pred(c)),
        )
    }

    /// `device_add` that must succeed.
    ///
    /// Works around a bug in `vmm/src/control.rs` (`device_add`/`device_del` take the VM
    /// lock with `try_lock()` and turn any contention, e.g. the hotplug service thread
    /// serving the previous `device_add`, into "device_add not allowed while migrating"
    /// although no migration runs): that error is retried (bounded) only while
    /// `query-migrate` shows no migration in progress.
    pub fn add(&mut self, dev: Value) {
        self.hotplug_command("device_add", dev);
    }

    /// `device_del` that must succeed (same workaround as [`Ferry::add`]).
    pub fn del(&mut self, id: &str) {
        self.hotplug_command("device_del", json!({"id": id}));
    }

    fn hotplug_command(&mut self, cmd: &str, args: Value) {
        self.poll(
            TIMEOUT,
            &|_| format!("{cmd} {args} keeps being refused as 'migrating'"),
            |f| match f.qmp.execute(cmd, args.clone()) {
                Ok(_) => Some(()),
                Err(e) if e.to_string().contains("not allowed while migrating") => {
                    let st = f.ok("query-migrate", json!({}));
                    let st = st["status"].as_str().unwrap_or("none").to_owned();
                    assert!(
                        !matches!(st.as_str(), "setup" | "active" | "device"),
                        "{}: {cmd} {args} refused during a migration ({st}): {e}",
                        f.name
                    );
                    None
                }
                Err(e) => panic!("{}: {cmd} {args} failed: {e}\n{}", f.name, read(&f.log)),
            },
        )
    }

    /// Wait for event `name` whose data satisfies `pred`.
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

    /// The hotplug events (DEVICE_DELETED, DEVICE_UNPLUG_GUEST_ERROR) received and not yet
    /// consumed, as `EVENT:device`.
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

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{}: did not exit within {TIMEOUT:?}\n{}",
                self.name,
                read(&self.log)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
