//! More faults between real `ferry` processes, one per phase the brief names: a stalled peer
//! (a relay that stops forwarding without closing, with a short `__org.ferry_io-timeout` on
//! both sides), a connection reset (RST) mid-RAM, the source killed mid-migration, the disk
//! filling up under `migrate file:`, and a truncated stream file given to `--incoming`.
//!
//! Every source plugs a `ferry-cpu-core` before the fault. After each fault the source guest
//! runs with its memory pattern intact and its connectors unchanged, and a second attempt
//! succeeds (for faults that lose the source, a new source's migration into the same
//! destination succeeds).

use ferry_tests::relay::{Fault, FaultRelay};
use ferry_tests::*;
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::Instant;

const SHAPE: [&str; 6] = [
    "--machine",
    "ferry-2.0",
    "--memory",
    "64M",
    "--guest",
    "dirty:8",
];

fn core1() -> Value {
    json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1})
}

/// The connectors as query-connectors shows them, without the volatile timer field.
fn connectors(f: &mut Ferry) -> Value {
    let mut l = f.ok("__org.ferry_query-connectors", json!({}));
    for c in l.as_array_mut().unwrap() {
        c.as_object_mut().unwrap().remove("remaining-ms");
    }
    l
}

fn wait_configured(f: &mut Ferry, dev: &str) {
    f.wait_connector(
        dev,
        |c| {
            c["state"]
                .as_str()
                .is_some_and(|s| s.ends_with("configured"))
        },
        "configured",
    );
}

/// A running source with core1 plugged and configured; returns it and its connectors.
fn source(dir: &std::path::Path, name: &str) -> (Ferry, Value) {
    let mut s = Ferry::spawn(dir, name, &SHAPE);
    // What these tests break is the link or the disk, not convergence.
    s.ok("migrate-set-parameters", completes_under_load());
    s.wait_pass(1);
    s.ok("device_add", core1());
    wait_configured(&mut s, "core1");
    let p = s.pass();
    s.wait_pass(p + 1);
    let c = connectors(&mut s);
    (s, c)
}

/// A destination listening on loopback with core1 added before the stream.
fn destination(dir: &std::path::Path, name: &str) -> (Ferry, String) {
    let mut args = SHAPE.to_vec();
    args.extend(["--incoming", "tcp:127.0.0.1:0"]);
    let mut d = Ferry::spawn(dir, name, &args);
    d.ok("device_add", core1());
    let port = d.incoming_port();
    (d, port)
}

/// The source runs on with its memory pattern intact and its connectors as before.
fn assert_source_intact(s: &mut Ferry, conns: &Value) {
    assert_eq!(s.status(), "running", "{}", read(&s.log));
    s.ok("stop", json!({}));
    assert_eq!(s.ok("__org.ferry_verify-guest", json!({}))["ok"], true);
    s.ok("cont", json!({}));
    let p = s.pass();
    s.wait_pass(p + 2);
    assert_eq!(&connectors(s), conns, "connectors changed after the fault");
}

/// A migration to `port` completes; the destination runs the guest with the same connectors
/// and a verified memory pattern.
fn migrate_ok(s: &mut Ferry, d: &mut Ferry, port: &str, conns: &Value) {
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}\n{}", read(&d.log));
    assert_eq!(s.status(), "postmigrate");
    d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "running");
    assert_dst_guest(d, conns);
}

fn assert_dst_guest(d: &mut Ferry, conns: &Value) {
    let p = d.pass();
    d.wait_pass(p + 1);
    d.ok("stop", json!({}));
    assert_eq!(d.ok("__org.ferry_verify-guest", json!({}))["ok"], true);
    d.ok("cont", json!({}));
    assert_eq!(
        &connectors(d),
        conns,
        "connectors differ on the destination"
    );
}

fn set_io_timeout(f: &mut Ferry, ms: u64) {
    f.ok(
        "migrate-set-parameters",
        json!({"__org.ferry_io-timeout": ms}),
    );
    let p = f.ok("query-migrate-parameters", json!({}));
    assert_eq!(p["__org.ferry_io-timeout"], ms);
}

#[test]
fn stalled_peer_times_out_on_both_sides() {
    let dir = tempdir();
    let (mut d, port) = destination(dir.path(), "dst");
    let (mut s, conns) = source(dir.path(), "src");
    set_io_timeout(&mut s, 1000);
    set_io_timeout(&mut d, 1000);
    let relay = FaultRelay::start(format!("127.0.0.1:{port}"), 64 << 10, Fault::Stall);
    // Byte offsets of the single stream (page channels have their own cut test).
    s.ok("migrate-set-parameters", json!({"multifd-channels": 0}));
    s.ok("migrate", json!({"uri": format!("tcp:{}", relay.addr)}));
    let info = s.wait_migration(&["failed", "completed"]);
    let seen = Instant::now();
    assert!(
        relay.stalled.load(Ordering::SeqCst),
        "the relay never stalled"
    );
    let src_after = seen.duration_since(relay.stalled_at.lock().unwrap().expect("stall time"));
    assert_eq!(info["status"], "failed", "{info}");
    let src_err = info["error-desc"].as_str().unwrap().to_owned();
    let dinfo = d.wait_migration(&["failed"]);
    let dst_err = dinfo["error-desc"].as_str().unwrap().to_owned();
    eprintln!(
        "stall: source failed {src_after:?} after the stall: {src_err}\nstall: destination: {dst_err}"
    );
    // The 1000 ms set above, not the default, ended it: the failure came before the default
    // timeout could have fired (measured from the stall itself, so a slow start does not count).
    let default = migration::Params::default().io_timeout;
    assert!(
        src_after < default,
        "the source gave up {src_after:?} after the stall, not before the default I/O timeout \
         ({default:?}): the 1000 ms it was given was not used"
    );
    assert!(src_err.contains("timed out") || src_err.contains("temporarily unavailable"));
    assert!(dst_err.contains("timed out") || dst_err.contains("temporarily unavailable"));
    assert_eq!(d.status(), "inmigrate", "the destination keeps waiting");
    relay.release();
    assert_source_intact(&mut s, &conns);
    // The second attempt runs with the default I/O timeout: 1000 ms is short enough for a
    // loaded host to miss between two records of a healthy stream.
    let default_ms = default.as_millis() as u64;
    set_io_timeout(&mut s, default_ms);
    set_io_timeout(&mut d, default_ms);
    migrate_ok(&mut s, &mut d, &port, &conns);
}

#[test]
fn connection_reset_mid_ram_leaves_the_source_running() {
    let dir = tempdir();
    let (mut d, port) = destination(dir.path(), "dst");
    let (mut s, conns) = source(dir.path(), "src");
    let relay = FaultRelay::start(format!("127.0.0.1:{port}"), 96 << 10, Fault::Reset);
    s.ok("migrate-set-parameters", json!({"multifd-channels": 0}));
    s.ok("migrate", json!({"uri": format!("tcp:{}", relay.addr)}));
    let info = s.wait_migration(&["failed", "completed"]);
    assert_eq!(info["status"], "failed", "{info}");
    let dinfo = d.wait_migration(&["failed"]);
    eprintln!(
        "reset: source: {}\nreset: destination: {}",
        info["error-desc"], dinfo["error-desc"]
    );
    assert_eq!(d.status(), "inmigrate");
    relay.release();
    assert_source_intact(&mut s, &conns);
    migrate_ok(&mut s, &mut d, &port, &conns);
}

#[test]
fn killed_source_fails_the_destination_which_accepts_a_later_migration() {
    let dir = tempdir();
    let (mut d, port) = destination(dir.path(), "dst");
    let (mut s, _) = source(dir.path(), "src");
    // Still mid-stream when killed, whatever the host's load: a downtime limit of 0 never
    // fits while the guest dirties pages, the iteration bound is out of reach, and the cap
    // keeps each pass long. (A cap alone is a time budget: at 4 MiB/s the default 30 passes
    // end the migration, not converged, after about 25 s on an idle debug build, sooner on
    // a faster host.)
    s.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1 << 20, "downtime-limit": 0, "__org.ferry_max-iterations": 10000}),
    );
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    // Kill it once RAM pages have reached the destination.
    d.poll(
        TIMEOUT,
        &|d| format!("no RAM arrived: {}", d.ok("query-migrate", json!({}))),
        |d| (d.ok("query-migrate", json!({}))["ram"]["normal"].as_u64() > Some(0)).then_some(()),
    );
    s.child.kill().unwrap();
    s.wait_exit();
    let info = d.wait_migration(&["failed", "completed"]);
    assert_eq!(info["status"], "failed", "{info}");
    let err = info["error-desc"].as_str().unwrap();
    eprintln!("killed source: destination: {err}");
    // A clean close reads as a truncated stream; a killed source that still had unread
    // progress reports in its receive buffer closes with a reset instead. Either way the
    // destination names the offset where the stream stopped.
    assert!(
        (err.contains("Truncated stream") || err.contains("Connection reset by peer"))
            && err.contains("at offset"),
        "the destination names where the stream stopped: {err}"
    );
    assert_eq!(
        d.status(),
        "inmigrate",
        "the half-received guest never runs"
    );
    assert!(
        d.err("cont", json!({}))
            .contains("waiting for an incoming migration"),
        "nothing of the discarded stream may run"
    );
    // A new source (same shape, same plugged core) migrates into the same destination.
    let (mut s2, conns) = source(dir.path(), "src2");
    migrate_ok(&mut s2, &mut d, &port, &conns);
}

/// A 1 MiB tmpfs mounted for one test, unmounted on drop.
struct TinyFs(std::path::PathBuf);

impl TinyFs {
    fn mount(at: std::path::PathBuf) -> TinyFs {
        std::fs::create_dir_all(&at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&at)
            .output()
            .expect("cannot run mount");
        assert!(
            out.status.success(),
            "mounting a 1 MiB tmpfs at {} failed (the disk-full test needs root and tmpfs): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        TinyFs(at)
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn disk_full_under_migrate_file_keeps_the_source_running() {
    let dir = tempdir();
    let full = TinyFs::mount(dir.path().join("full"));
    let (mut s, conns) = source(dir.path(), "src");
    let target = full.0.join("snap.ferry");
    s.ok(
        "migrate",
        json!({"uri": format!("file:{}", target.display())}),
    );
    let info = s.wait_migration(&["failed", "completed"]);
    assert_eq!(info["status"], "failed", "{info}");
    let err = info["error-desc"].as_str().unwrap();
    eprintln!("disk full: source: {err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_source_intact(&mut s, &conns);
    // Second attempt, to a disk with room: completes, and the file restores.
    let snap = dir.path().join("snap.ferry");
    s.ok(
        "migrate",
        json!({"uri": format!("file:{}", snap.display())}),
    );
    let info = s.wait_migration(&["failed", "completed"]);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(s.status(), "postmigrate");
    let mut d = incoming_file(dir.path(), "dst", &snap);
    assert_eq!(
        d.wait_migration(&["completed", "failed"])["status"],
        "completed"
    );
    assert_eq!(d.status(), "running");
    assert_dst_guest(&mut d, &conns);
}

/// `ferry --incoming defer`, core1 added, then `migrate-incoming file:PATH`.
fn incoming_file(dir: &std::path::Path, name: &str, path: &std::path::Path) -> Ferry {
    let mut args = SHAPE.to_vec();
    args.extend(["--incoming", "defer"]);
    let mut d = Ferry::spawn(dir, name, &args);
    d.ok("device_add", core1());
    d.ok(
        "migrate-incoming",
        json!({"uri": format!("file:{}", path.display())}),
    );
    d
}

#[test]
fn truncated_stream_file_is_refused_naming_where_it_was_cut() {
    let dir = tempdir();
    let (mut s, conns) = source(dir.path(), "src");
    let snap = dir.path().join("snap.ferry");
    s.ok(
        "migrate",
        json!({"uri": format!("file:{}", snap.display())}),
    );
    assert_eq!(
        s.wait_migration(&["failed", "completed"])["status"],
        "completed"
    );
    let bytes = std::fs::read(&snap).unwrap();
    let n = bytes.len();
    for (label, cut, context) in [
        ("in the header", 12, "header"),
        ("in the RAM", n / 2, "RAM record"),
        ("in the end marker", n - 5, "end marker"),
    ] {
        let p = dir.path().join(format!("cut-{cut}.ferry"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let mut d = incoming_file(dir.path(), &format!("dst-{cut}"), &p);
        let info = d.wait_migration(&["failed", "completed"]);
        assert_eq!(info["status"], "failed", "{label}: {info}");
        let err = info["error-desc"].as_str().unwrap();
        eprintln!("truncated {label} ({cut} of {n} bytes): {err}");
        assert!(
            err.contains(&format!("Truncated stream in {context}")) && err.contains("at offset"),
            "{label}: {err}"
        );
        assert_eq!(d.status(), "inmigrate", "{label}");
    }
    // The whole file restores, with the guest and its connectors as they were.
    let mut d = incoming_file(dir.path(), "dst-full", &snap);
    assert_eq!(
        d.wait_migration(&["completed", "failed"])["status"],
        "completed"
    );
    assert_eq!(d.status(), "running");
    assert_dst_guest(&mut d, &conns);
}
