//! Golden streams (issue 8): for every machine type, snapshots committed under
//! `compat/golden/<machine>/<scenario>.stream`, each with a `<scenario>.json` sidecar (the
//! `ferry run` arguments, the pre-start `device_add`s and the connector states at save time).
//! Every later build must load them and reach the same device state:
//!
//! 1. `ferry run -S --incoming defer` with the sidecar's arguments and devices, then
//!    `migrate-incoming file:GOLDEN`; the VM comes up paused, its memory pattern verifies and
//!    its connectors equal the ones recorded at save time;
//! 2. before it ever runs, it re-serialises with `migrate file:`; the golden and the
//!    re-serialisation are both accepted by the committed schema of the machine type
//!    (`compat/schemas/`), and their device sections are equal field by field, volatile
//!    fields excepted;
//! 3. a second process restores the golden and runs it: the guest makes progress.
//!
//! `FERRY_BLESS_GOLDEN=new cargo test -p ferry-tests --test compat -- golden::` writes the goldens that are
//! missing (a new machine type, a new scenario) and never touches an existing file: a golden
//! records what a build once emitted, so regenerating it would erase the evidence it exists
//! for. See `compat/README.md`.

use crate::streams::*;
use ferry_tests::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Scenarios every machine type has a golden for (the hotplug state at save time).
const SCENARIOS: [(&str, &str); 4] = [
    ("nothing", "nothing plugged"),
    (
        "cpu-core",
        "CPU core 1 hot-plugged and configured by the guest",
    ),
    (
        "unplug-pending",
        "CPU core 1 hot-plugged, then device_del while the guest holds the request back (slow)",
    ),
    (
        "pci-slot",
        "multifunction PCI slot 01: function 1, then function 0 with multifunction=on, both configured",
    ),
];

fn golden_dir(machine: &str) -> PathBuf {
    repo_root().join("compat/golden").join(machine)
}

fn args(machine: &str) -> Vec<String> {
    // Small on purpose: a 1 MiB working set keeps each stream near 1 MiB (zero pages are
    // 25-byte markers), and 1000 ms is the unplug timeout the timer tests use.
    strings(&[
        "--machine",
        machine,
        "--memory",
        "64M",
        "--guest",
        "dirty:1",
        "--unplug-timeout-ms",
        "1000",
    ])
}

fn configured(c: &Value) -> bool {
    c["state"]
        .as_str()
        .is_some_and(|s| s.ends_with("configured"))
}

/// Produce one golden with the current build: the scenario on a running guest, then `stop`
/// and `migrate file:` (a stopped guest: the file and its reload carry the same run state).
fn produce(machine: &str, scenario: &str, description: &str, stream: &Path, sidecar: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let a = args(machine);
    let mut s = Ferry::spawn(dir.path(), "golden-src", &a);
    s.wait_pass(2);
    let core1 = json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1});
    let devices: Vec<Value> = match scenario {
        "nothing" => vec![],
        "cpu-core" => {
            s.add(core1.clone());
            s.wait_connector("core1", configured, "configure core1");
            vec![core1]
        }
        "unplug-pending" => {
            s.add(core1.clone());
            s.wait_connector("core1", configured, "configure core1");
            s.ok("__org.ferry_guest-hotplug", json!({"mode": "slow"}));
            s.del("core1");
            s.wait_connector("core1", |c| c["unplug-pending"] == true, "unplug request");
            vec![core1]
        }
        "pci-slot" => {
            let devs = vec![
                json!({"driver": "ferry-pci-fn", "id": "nic1", "addr": "01.1"}),
                json!({"driver": "ferry-pci-fn", "id": "nic0", "addr": "01.0", "multifunction": true}),
            ];
            for d in &devs {
                s.add(d.clone());
            }
            s.wait_connector("nic0", configured, "configure nic0");
            s.wait_connector("nic1", configured, "configure nic1");
            devs
        }
        other => panic!("unknown golden scenario {other}"),
    };
    s.ok("stop", json!({}));
    s.settle();
    let connectors = s.connectors();
    std::fs::create_dir_all(stream.parent().unwrap()).unwrap();
    s.save(stream);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo_root())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let meta = json!({
        "machine": machine,
        "scenario": scenario,
        "description": description,
        "args": a,
        "devices": devices,
        "connectors": connectors,
        "produced-by": format!("ferry {} (git {commit})", env!("CARGO_PKG_VERSION")),
    });
    std::fs::write(sidecar, serde_json::to_string_pretty(&meta).unwrap() + "\n").unwrap();
    eprintln!(
        "blessed {} ({} bytes)",
        stream.display(),
        std::fs::metadata(stream).unwrap().len()
    );
}

/// Write the goldens that are missing, never an existing one.
fn bless_missing() {
    match std::env::var("FERRY_BLESS_GOLDEN").as_deref() {
        Err(_) => return,
        Ok("new") => {}
        Ok(other) => panic!(
            "FERRY_BLESS_GOLDEN={other}: only 'new' exists (write missing goldens). Existing \
             goldens are never regenerated: they are what an older build emitted, see \
             compat/README.md"
        ),
    }
    for m in machine_types::all() {
        for (sc, description) in SCENARIOS {
            let stream = golden_dir(m.name()).join(format!("{sc}.stream"));
            let sidecar = stream.with_extension("json");
            match (stream.exists(), sidecar.exists()) {
                (true, true) => {}
                (false, false) => produce(m.name(), sc, description, &stream, &sidecar),
                _ => panic!(
                    "{}: a golden without its sidecar (or the reverse): restore the missing \
                     file from git; goldens are never regenerated",
                    stream.display()
                ),
            }
        }
    }
}

/// Every golden on disk, as (stream, sidecar).
fn goldens() -> Vec<(PathBuf, PathBuf)> {
    let root = repo_root().join("compat/golden");
    let mut out = Vec::new();
    let mut machines: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    machines.sort();
    for d in machines {
        let mut files: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "stream"))
            .collect();
        files.sort();
        for f in files {
            let side = f.with_extension("json");
            assert!(side.exists(), "{}: sidecar missing", side.display());
            out.push((f, side));
        }
    }
    out
}

/// Restore `stream` into a new paused process (pre-start adds from the sidecar).
fn restore(dir: &Path, name: &str, meta: &Value, stream: &Path) -> Ferry {
    let a: Vec<String> = meta["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .chain(strings(&["-S", "--incoming", "defer"]))
        .collect();
    let mut d = Ferry::spawn(dir, name, &a);
    for dev in meta["devices"].as_array().unwrap() {
        d.add(dev.clone());
    }
    d.ok(
        "migrate-incoming",
        json!({"uri": format!("file:{}", stream.display())}),
    );
    let info = d.wait_migration(&["completed", "failed"]);
    assert_eq!(
        info["status"],
        "completed",
        "{}: this build cannot load it: {info}\n{}",
        stream.display(),
        read(&d.log)
    );
    d.settle();
    assert_eq!(d.status(), "paused", "{}", stream.display());
    d
}

fn check_one(stream: &Path, sidecar: &Path) -> Result<String, String> {
    let meta: Value = serde_json::from_str(&read(sidecar)).map_err(|e| e.to_string())?;
    let machine = meta["machine"].as_str().unwrap().to_owned();
    let frozen = committed_schema(&machine);
    frozen_read(stream, &frozen)?;
    let dir = tempfile::tempdir().unwrap();
    let mut d = restore(dir.path(), "loaded", &meta, stream);
    let v = d.ok("__org.ferry_verify-guest", json!({}));
    if v["ok"] != true {
        return Err(format!("memory pattern after load: {v}"));
    }
    // Connector states as recorded at save time (remaining unplug time: by the type's rule).
    let want = meta["connectors"].as_array().unwrap();
    let got = d.connectors();
    let mut problems = Vec::new();
    for w in want {
        let Some(g) = got.iter().find(|g| g["index"] == w["index"]) else {
            problems.push(format!("connector {} missing", w["index"]));
            continue;
        };
        for (k, wv) in w.as_object().unwrap() {
            if k == "remaining-ms" {
                continue;
            }
            if g[k.as_str()] != *wv {
                problems.push(format!(
                    "connector {} ({}): {k}: saved {wv}, loaded {}",
                    w["index"],
                    w["device"],
                    g[k.as_str()]
                ));
            }
        }
    }
    // Before the first KVM_RUN: re-serialise and compare.
    let reser = dir.path().join("reserialised.stream");
    d.save(&reser);
    frozen_read(&reser, &frozen).map_err(|e| format!("re-serialisation: {e}"))?;
    let diff = diff_streams(&frozen, stream, &reser, false);
    problems.extend(
        diff.differences
            .iter()
            .map(|x| format!("re-serialised: {x}")),
    );
    // And it runs.
    let mut r = restore(dir.path(), "runs", &meta, stream);
    r.ok("cont", json!({}));
    let p = r.pass();
    r.wait_pass(p + 2);
    r.verify();
    if problems.is_empty() {
        Ok(format!(
            "{} volatile difference(s), {} bytes",
            diff.volatile.len(),
            std::fs::metadata(stream).unwrap().len()
        ))
    } else {
        Err(problems.join("\n  "))
    }
}

pub fn every_golden_stream_loads_and_reaches_the_same_state() {
    require_kvm();
    bless_missing();
    // Every machine type this build offers has its goldens.
    for m in machine_types::all() {
        for (sc, _) in SCENARIOS {
            let f = golden_dir(m.name()).join(format!("{sc}.stream"));
            assert!(
                f.exists(),
                "{} is missing: a machine type adds its goldens once, with \
                 `FERRY_BLESS_GOLDEN=new cargo test -p ferry-tests --test compat -- golden::`, and commits them \
                 (see compat/README.md)",
                f.display()
            );
        }
    }
    let mut failed = Vec::new();
    let all = goldens();
    for (stream, sidecar) in &all {
        let name = stream
            .strip_prefix(repo_root())
            .unwrap_or(stream)
            .display()
            .to_string();
        let t = std::time::Instant::now();
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_one(stream, sidecar)))
                .unwrap_or_else(|p| {
                    Err(p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default())
                });
        match r {
            Ok(note) => eprintln!("golden {name}: ok ({note}; {} ms)", t.elapsed().as_millis()),
            Err(e) => {
                eprintln!("golden {name}: FAILED\n  {e}");
                failed.push(format!("{name}:\n  {e}"));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} golden stream(s) no longer load to the same state:\n{}",
        failed.len(),
        all.len(),
        failed.join("\n")
    );
}

/// A copy of `golden` as a host of the other CPU vendor would have written it: in every
/// `cpu` section the host-defined XSAVE fields (MXCSR_MASK 0x2ffff on AMD, 0xffff on Intel;
/// the kernel's software-reserved words) swapped, everything else byte for byte.
fn as_other_vendor(golden: &Path, out: &Path) {
    use devstate::{Item, StreamReader, StreamWriter, Tag};
    use machine_types::cpu::xsave;
    let f = std::fs::File::open(golden).unwrap();
    let mut r = StreamReader::new(std::io::BufReader::new(f), None).unwrap();
    let machine = machine_types::MachineType::lookup(&r.header().machine).unwrap();
    let producer = r.header().producer.clone();
    let mut w = StreamWriter::new(Vec::new(), machine, &producer).unwrap();
    let mut swapped = 0;
    loop {
        match r.next_item().unwrap() {
            Item::Config(raw) => w.raw(&raw.encode(Tag::Config)).unwrap(),
            Item::Ram(rec) => match (rec.data, rec.sparse) {
                (Some(d), _) => w.ram_data(rec.gpa, d).unwrap(),
                (None, None) => w.ram_zero(rec.gpa, rec.pages).unwrap(),
                (None, Some(_)) => panic!("{}: goldens hold no SPARSE records", golden.display()),
            },
            Item::Section(raw) if raw.name == "cpu" => {
                let mut s: vmm::vcpu::persist::VcpuState = raw.load().unwrap();
                let mask = &mut s.xsave[xsave::MXCSR_MASK];
                *mask = if *mask == 0x2ffff { 0xffff } else { 0x2ffff };
                for (i, word) in s.xsave[xsave::SW_RESERVED].iter_mut().enumerate() {
                    *word ^= 0x5a5a_0000 | i as u32;
                }
                let rec = devstate::encode_section(&mut s, raw.instance, machine, Tag::Section)
                    .expect("cpu sections are always sent");
                w.raw(&rec).unwrap();
                swapped += 1;
            }
            Item::Section(raw) => w.raw(&raw.encode(Tag::Section)).unwrap(),
            Item::End => break,
        }
    }
    assert!(swapped > 0, "{}: no cpu section", golden.display());
    std::fs::write(out, w.finish().unwrap()).unwrap();
}

/// Issue 13: goldens blessed on one CPU vendor load to the same guest state on the other.
/// The host-defined XSAVE fields of each legacy golden are swapped to the other vendor's;
/// the copy must differ from the golden only in those (reported apart, as volatile), load,
/// and re-serialise to the same guest state on this host, whatever its vendor.
pub fn goldens_saved_on_the_other_cpu_vendor_load_to_the_same_state() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut failed = Vec::new();
    let mut checked = 0;
    for (stream, sidecar) in goldens() {
        let meta: Value = serde_json::from_str(&read(&sidecar)).unwrap();
        let machine = meta["machine"].as_str().unwrap().to_owned();
        let scenario = meta["scenario"].as_str().unwrap().to_owned();
        if !matches!(scenario.as_str(), "nothing" | "pci-slot") {
            continue;
        }
        let other = dir.path().join(format!("{machine}-{scenario}.stream"));
        as_other_vendor(&stream, &other);
        let schema = committed_schema(&machine);
        let d = diff_streams(&schema, &stream, &other, false);
        assert!(
            d.differences.is_empty(),
            "{}: the other vendor's copy differs in guest state: {:?}",
            stream.display(),
            d.differences
        );
        assert!(
            d.volatile
                .iter()
                .any(|l| l.contains("host-defined fields differ (MXCSR_MASK")),
            "{}: the copy should differ in MXCSR_MASK, reported apart: {:?}",
            stream.display(),
            d.volatile
        );
        checked += 1;
        match check_one(&other, &sidecar) {
            Ok(note) => eprintln!("{machine}/{scenario} as the other vendor: ok ({note})"),
            Err(e) => failed.push(format!("{machine}/{scenario}: {e}")),
        }
    }
    assert!(checked >= 6, "only {checked} goldens checked");
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
