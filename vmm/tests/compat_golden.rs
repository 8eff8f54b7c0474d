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
//! `FERRY_BLESS_GOLDEN=new cargo test -p vmm --test compat_golden` writes the goldens that are
//! missing (a new machine type, a new scenario) and never touches an existing file: a golden
//! records what a build once emitted, so regenerating it would erase the evidence it exists
//! for. See `compat/README.md`.

#[path = "compat_common/mod.rs"]
mod compat_common;

use compat_common::*;
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

#[test]
fn every_golden_stream_loads_and_reaches_the_same_state() {
    require_kvm();
    bless_missing();
    // Every machine type this build offers has its goldens.
    for m in machine_types::all() {
        for (sc, _) in SCENARIOS {
            let f = golden_dir(m.name()).join(format!("{sc}.stream"));
            assert!(
                f.exists(),
                "{} is missing: a machine type adds its goldens once, with \
                 `FERRY_BLESS_GOLDEN=new cargo test -p vmm --test compat_golden`, and commits them \
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
