//! Faults during a live migration between two real `ferry` processes: the link cut during
//! the handshake, during RAM pre-copy and during the device state (by a bounded relay in
//! the test), `migrate_cancel`, and a killed destination. Each time the source guest keeps
//! running with its memory intact, and a second attempt succeeds.

use ferry_tests::relay::{self, Cut};
use ferry_tests::*;
use serde_json::json;

const SHAPE: [&str; 6] = [
    "--machine",
    "ferry-2.0",
    "--memory",
    "64M",
    "--guest",
    "dirty:8",
];

/// A source running the guest, with parameters that let its migrations finish on a loaded
/// host (what these tests break is the link, not convergence).
fn src(dir: &std::path::Path) -> Ferry {
    let mut s = Ferry::spawn(dir, "src", &SHAPE);
    s.ok("migrate-set-parameters", completes_under_load());
    s
}

fn dst(dir: &std::path::Path, name: &str) -> Ferry {
    let mut args = SHAPE.to_vec();
    args.extend(["--incoming", "tcp:127.0.0.1:0"]);
    Ferry::spawn(dir, name, &args)
}

/// The source runs, its memory pattern verifies, and it keeps making progress.
fn assert_source_intact(src: &mut Ferry) {
    assert_eq!(
        src.status(),
        "running",
        "the source must run on after a failed migration"
    );
    src.ok("stop", json!({}));
    assert_eq!(src.ok("__org.ferry_verify-guest", json!({}))["ok"], true);
    src.ok("cont", json!({}));
    let p = src.pass();
    src.wait_pass(p + 2);
}

/// Parameters that keep a migration active until the test acts, however slow the host: a
/// downtime limit of 0 never fits while the guest dirties pages, the iteration bound is out
/// of reach, and the bandwidth cap keeps each pass long. (A cap alone is a time budget: at
/// 4 MiB/s the default 30 passes end the migration, not converged, after about 25 s on an
/// idle debug build, sooner on a faster host.)
fn hold() -> serde_json::Value {
    json!({"max-bandwidth": 1 << 20, "downtime-limit": 0, "__org.ferry_max-iterations": 10000})
}

/// No cap, and [`completes_under_load`] again, for the attempt after a held one.
fn release() -> serde_json::Value {
    let mut p = completes_under_load();
    p["max-bandwidth"] = json!(0);
    p
}

fn migrate_ok(src: &mut Ferry, port: &str) {
    src.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = src.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "second attempt failed: {info}");
    assert_eq!(src.status(), "postmigrate");
}

fn cut_case(cut: Cut, label: &str) {
    let dir = tempdir();
    let mut d = dst(dir.path(), "dst");
    let port = d.incoming_port();
    let mut s = src(dir.path());
    s.wait_pass(2);
    let (addr, h) = relay::cutting(format!("127.0.0.1:{port}"), cut);
    // Byte offsets of the single stream (page channels have their own cut test).
    s.ok("migrate-set-parameters", json!({"multifd-channels": 0}));
    s.ok("migrate", json!({"uri": format!("tcp:{addr}")}));
    let info = s.wait_migration(&["failed", "completed"]);
    h.join().unwrap();
    assert_eq!(
        info["status"], "failed",
        "{label}: a cut link must fail the migration: {info}"
    );
    assert!(
        info["error-desc"].as_str().is_some_and(|e| !e.is_empty()),
        "{label}: {info}"
    );
    assert_source_intact(&mut s);
    // The destination discarded the attempt and listens again.
    let st = d.wait_migration(&["failed"]);
    assert_eq!(st["status"], "failed", "{label}");
    assert_eq!(d.status(), "inmigrate");
    migrate_ok(&mut s, &port);
    d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "running");
}

#[test]
fn link_cut_during_handshake() {
    cut_case(Cut::After(10), "handshake");
}

#[test]
fn link_cut_during_ram_precopy() {
    // Past header and config, well inside pass 0 (hundreds of KiB even with SPARSE pages).
    cut_case(Cut::After(64 << 10), "RAM");
}

#[test]
fn link_cut_during_device_state() {
    cut_case(Cut::AtDeviceState, "device state");
}

#[test]
fn cancel_mid_way_keeps_the_source_running() {
    let dir = tempdir();
    let mut d = dst(dir.path(), "dst");
    let port = d.incoming_port();
    let mut s = src(dir.path());
    s.wait_pass(2);
    // Still running when cancelled, whatever the host's load.
    s.ok("migrate-set-parameters", hold());
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    s.wait_migration(&["active"]);
    s.ok("migrate_cancel", json!({}));
    let info = s.wait_migration(&["cancelled", "failed", "completed"]);
    assert_eq!(info["status"], "cancelled", "{info}");
    assert_source_intact(&mut s);
    d.wait_migration(&["failed"]);
    s.ok("migrate-set-parameters", release());
    migrate_ok(&mut s, &port);
}

#[test]
fn killed_destination_leaves_the_source_running() {
    let dir = tempdir();
    let mut d = dst(dir.path(), "dst");
    let port = d.incoming_port();
    let mut s = src(dir.path());
    s.wait_pass(2);
    s.ok("migrate-set-parameters", hold());
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    s.wait_migration(&["active"]);
    d.child.kill().unwrap();
    d.wait_exit();
    let info = s.wait_migration(&["failed", "completed"]);
    assert_eq!(info["status"], "failed", "{info}");
    assert_source_intact(&mut s);
    s.ok("migrate-set-parameters", release());
    let mut d2 = dst(dir.path(), "dst2");
    let port2 = d2.incoming_port();
    migrate_ok(&mut s, &port2);
    d2.wait_migration(&["completed"]);
}

#[test]
fn link_cut_right_after_commit_never_runs_the_guest_twice() {
    let dir = tempdir();
    let mut d = dst(dir.path(), "dst");
    let port = d.incoming_port();
    let mut s = src(dir.path());
    s.wait_pass(2);
    // HelloAck, Accept and Loaded reach the source; Committed does not.
    let (addr, h) = relay::losing_replies(format!("127.0.0.1:{port}"), 3);
    s.ok("migrate", json!({"uri": format!("tcp:{addr}")}));
    let info = s.wait_migration(&["failed", "completed"]);
    h.join().unwrap();
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap();
    assert!(desc.starts_with("Destination state unknown"), "{desc}");
    // The destination got COMMIT and runs the guest; the source must not.
    assert_eq!(
        d.wait_migration(&["completed", "failed"])["status"],
        "completed"
    );
    assert_eq!(d.status(), "running");
    assert_eq!(
        s.status(),
        "postmigrate",
        "the source never resumes by itself after COMMIT"
    );
    let p = s.pass();
    let dp = d.pass();
    d.wait_pass(dp + 2);
    assert_eq!(s.pass(), p, "the source guest must not run");
    // Only an explicit operator decision could run it here (after checking the destination).
    d.ok("quit", json!({}));
    d.wait_exit();
    s.ok("cont", json!({}));
    s.wait_pass(p + 1);
}

#[test]
fn a_completed_source_refuses_cont() {
    let dir = tempdir();
    let mut d = dst(dir.path(), "dst");
    let port = d.incoming_port();
    let mut s = src(dir.path());
    migrate_ok(&mut s, &port);
    let e = s.err("cont", json!({}));
    assert!(e.contains("running it here too would run it twice"), "{e}");
}

#[test]
fn migration_converges_over_a_delaying_link() {
    let dir = tempdir();
    let mut d = dst(dir.path(), "dst");
    let port = d.incoming_port();
    let mut s = Ferry::spawn(dir.path(), "src", &SHAPE);
    s.wait_pass(2);
    // Every chunk waits 2 ms each way: a slow link. What is tested is that the protocol
    // (handshake, progress reports, COMMIT) survives it; whether a pass fits the downtime
    // limit depends on how fast a loaded host runs the guest, so the switchover is forced
    // (the convergence decision has its own tests in migration/tests/engine.rs, netns.rs).
    s.ok("migrate-set-parameters", completes_under_load());
    let (addr, h) = relay::delaying(
        format!("127.0.0.1:{port}"),
        std::time::Duration::from_millis(2),
    );
    s.ok("migrate", json!({"uri": format!("tcp:{addr}")}));
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}");
    h.join().unwrap();
    d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "running");
    d.ok("stop", json!({}));
    assert_eq!(d.ok("__org.ferry_verify-guest", json!({}))["ok"], true);
}
