//! The `ferry` binary's argument checks (no KVM needed for the refusals).

use std::process::Command;

fn ferry(args: &[&str]) -> (bool, String) {
    let out = Command::new(ferry_tests::bins::ferry())
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run ferry");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn refuses_unknown_machine() {
    let (ok, err) = ferry(&["run", "--machine", "pc-q35-9.0", "--memory", "64M"]);
    assert!(!ok);
    assert!(err.contains("Unknown machine type 'pc-q35-9.0'"), "{err}");
}

#[test]
fn refuses_too_little_memory() {
    let (ok, err) = ferry(&["run", "--memory", "16M", "--guest", "dirty:32"]);
    assert!(!ok);
    assert!(
        err.contains("too small: the dirty guest needs at least 34603008 bytes"),
        "{err}"
    );
}

#[test]
fn refuses_bad_values() {
    let (ok, err) = ferry(&["run", "--memory", "lots"]);
    assert!(!ok);
    assert!(err.contains("Invalid size 'lots'"), "{err}");
    let (ok, err) = ferry(&["run", "--guest", "busy"]);
    assert!(!ok);
    assert!(err.contains("Invalid guest 'busy'"), "{err}");
    let (ok, err) = ferry(&["run", "--vcpus", "0", "--memory", "64M"]);
    assert!(!ok);
    assert!(err.contains("vCPU count 0 is out of range"), "{err}");
}
