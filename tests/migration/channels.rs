//! Page channels between two real `ferry` processes: the destination grants at most what it
//! is configured for (none: pages travel in the main stream), and a page channel that breaks
//! fails the whole migration, named, with the source running on; a main stream that stays
//! silent while the channels carry the pages is not a stalled link.

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

fn src(dir: &std::path::Path, channels: u8) -> Ferry {
    let mut s = Ferry::spawn(dir, "src", &SHAPE);
    s.ok("migrate-set-parameters", completes_under_load());
    s.ok(
        "migrate-set-parameters",
        json!({"multifd-channels": channels}),
    );
    s
}

fn dst(dir: &std::path::Path, name: &str, channels: u8) -> Ferry {
    let mut args = SHAPE.to_vec();
    args.extend(["--incoming", "tcp:127.0.0.1:0"]);
    let mut d = Ferry::spawn(dir, name, &args);
    d.ok(
        "migrate-set-parameters",
        json!({"multifd-channels": channels}),
    );
    d
}

fn channels_used(info: &serde_json::Value) -> u64 {
    info["ram"]["__org.ferry_page-channels"]
        .as_u64()
        .unwrap_or_else(|| panic!("query-migrate shows no page-channel count: {info}"))
}

/// The source asks for `ask` channels, the destination offers `offer`: the migration uses
/// the smaller, both sides say so, and every page arrives.
fn migrate_with(ask: u8, offer: u8) {
    let dir = tempdir();
    let mut d = dst(dir.path(), "dst", offer);
    let port = d.incoming_port();
    let mut s = src(dir.path(), ask);
    s.wait_pass(2);
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(
        info["status"], "completed",
        "asked {ask}, offered {offer}: {info}"
    );
    let used = u64::from(ask.min(offer));
    assert_eq!(channels_used(&info), used, "source: {info}");
    let dinfo = d.wait_migration(&["completed"]);
    assert_eq!(channels_used(&dinfo), used, "destination: {dinfo}");
    d.verify();
}

#[test]
fn a_destination_offering_fewer_channels_gets_a_migration_over_those() {
    migrate_with(4, 1);
}

#[test]
fn a_destination_offering_no_channels_gets_its_pages_in_the_main_stream() {
    migrate_with(3, 0);
}

#[test]
fn a_broken_page_channel_fails_the_migration_naming_it() {
    let dir = tempdir();
    let mut d = dst(dir.path(), "dst", 2);
    let port = d.incoming_port();
    let mut s = src(dir.path(), 2);
    s.wait_pass(2);
    // Connection 2 is the second page channel: cut it just past its 24-byte hello, inside
    // its first records (each pass ends with a SYNC on every channel, so more always follows).
    let (addr, h) = relay::cutting_on(format!("127.0.0.1:{port}"), 2, Cut::After(40));
    s.ok("migrate", json!({"uri": format!("tcp:{addr}")}));
    let info = s.wait_migration(&["failed", "completed"]);
    h.join().unwrap();
    assert_eq!(
        info["status"], "failed",
        "a cut channel must fail it: {info}"
    );
    let desc = info["error-desc"].as_str().unwrap_or_default();
    let dinfo = d.wait_migration(&["failed"]);
    assert_eq!(dinfo["status"], "failed", "{dinfo}");
    assert!(
        desc.contains("Page channel 2"),
        "which channel broke: {desc}; destination: {dinfo}"
    );
    assert_eq!(s.status(), "running", "the source runs on");
    assert_eq!(d.status(), "inmigrate");
    // The same two processes migrate over an intact link.
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}");
    d.wait_migration(&["completed"]);
    d.verify();
}

/// With page channels the main stream carries nothing during the RAM transfer, and a channel
/// that has done its share of a pass waits for the others. A pass longer than twice the I/O
/// timeout of both sides (here 1 s; a 3 MiB/s cap on 8 MiB of whole pages takes about 3 s)
/// still completes, because pages keep moving.
#[test]
fn a_ram_transfer_longer_than_the_io_timeout_completes() {
    let dir = tempdir();
    let mut d = dst(dir.path(), "dst", 2);
    d.ok(
        "migrate-set-parameters",
        json!({"__org.ferry_io-timeout": 1000}),
    );
    let port = d.incoming_port();
    let mut s = src(dir.path(), 2);
    s.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 3 << 20, "__org.ferry_sparse-pages": false, "__org.ferry_io-timeout": 1000}),
    );
    s.wait_pass(2);
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(channels_used(&info), 2, "{info}");
    assert!(
        info["total-time"].as_u64().unwrap_or(0) > 2000,
        "the RAM transfer must outlast twice the 1 s I/O timeout to test anything: {info}"
    );
    d.wait_migration(&["completed"]);
    d.verify();
}
