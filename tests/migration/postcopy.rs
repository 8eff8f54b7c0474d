//! Post-copy between two real `ferry` processes: the guest runs on the destination before
//! all of its RAM has arrived, every page it touches is fetched on demand, every byte is
//! verified afterwards; hotplug is refused on both sides until post-copy completes; a killed
//! source leaves the destination paused on what it has; the capability is checked by name.
//!
//! `migrate-start-postcopy` right after `migrate` switches at the end of pass 0, whatever the
//! host's speed; `max-postcopy-bandwidth` keeps the post-copy phase long enough to look at.

use ferry_tests::*;
use serde_json::{Value, json};

const SHAPE: [&str; 6] = [
    "--machine",
    "ferry-2.0",
    "--memory",
    "64M",
    "--guest",
    "dirty:16",
];

fn shape(machine: &str) -> Vec<&str> {
    let mut s = SHAPE.to_vec();
    s[1] = machine;
    s
}

fn postcopy_cap(f: &mut Ferry, on: bool) {
    f.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": on}]}),
    );
}

/// A destination (post-copy on) and a source (post-copy on, pass 0 capped at 16 MiB/s so
/// the guest dirties its working set during it, background post-copy pages at `pc_bw`).
fn pair(dir: &std::path::Path, pc_bw: u64) -> (Ferry, Ferry) {
    pair_on(dir, "ferry-2.0", pc_bw)
}

fn pair_on(dir: &std::path::Path, machine: &str, pc_bw: u64) -> (Ferry, Ferry) {
    let mut args = shape(machine);
    args.extend(["--incoming", "tcp:127.0.0.1:0"]);
    let mut d = Ferry::spawn(dir, "dst", &args);
    postcopy_cap(&mut d, true);
    let mut s = Ferry::spawn(dir, "src", &shape(machine));
    postcopy_cap(&mut s, true);
    s.ok(
        "migrate-set-parameters",
        json!({
            "max-bandwidth": 16 << 20,
            "__org.ferry_sparse-pages": false,
            "downtime-limit": 0,
            "__org.ferry_max-iterations": 10000,
            "max-postcopy-bandwidth": pc_bw,
        }),
    );
    s.wait_pass(1);
    (s, d)
}

fn start(s: &mut Ferry, d: &mut Ferry) {
    let port = d.incoming_port();
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    s.ok("migrate-start-postcopy", json!({}));
}

fn wait_status(f: &mut Ferry, want: &str) -> Value {
    let info = f.wait_migration(&[want, "completed", "failed", "postcopy-paused"]);
    assert_eq!(info["status"], want, "{}: {info}\n{}", f.name, read(&f.log));
    info
}

#[test]
fn post_copy_runs_the_guest_on_the_destination_and_places_every_page() {
    let dir = tempdir();
    let (mut s, mut d) = pair(dir.path(), 4 << 20);
    start(&mut s, &mut d);
    wait_status(&mut d, "postcopy-active");
    // The guest runs here while its pages arrive; hotplug waits on both sides.
    assert_eq!(d.status(), "running");
    let p = d.pass();
    d.wait_pass(p + 1);
    let core = json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1});
    assert_eq!(
        d.err("device_add", core.clone()),
        "GenericError: device_add not allowed while migrating"
    );
    assert_eq!(
        s.err("device_add", core),
        "GenericError: device_add not allowed while migrating"
    );
    assert_eq!(
        s.err("migrate_cancel", json!({})),
        "GenericError: Post-copy cannot be cancelled: the guest runs on the destination"
    );
    let info = wait_status(&mut s, "completed");
    let pages = info["ram"]["__org.ferry_postcopy-pages"]
        .as_u64()
        .unwrap_or(0);
    assert!(pages > 0, "no page moved after the switchover: {info}");
    let dinfo = wait_status(&mut d, "completed");
    assert_eq!(dinfo["ram"]["__org.ferry_postcopy-pages"], pages, "{dinfo}");
    assert!(
        dinfo["ram"]["postcopy-requests"].as_u64() > Some(0),
        "the guest never waited for a page: {dinfo}"
    );
    assert!(
        dinfo["__org.ferry_postcopy-latency-max-us"].as_u64() > Some(0),
        "{dinfo}"
    );
    assert_eq!(s.status(), "postmigrate");
    let p = d.pass();
    d.wait_pass(p + 2);
    d.verify();
}

/// Post-copy needs nothing of the machine type: every one of them moves its guest this way.
fn post_copy_on(machine: &str) {
    let dir = tempdir();
    let (mut s, mut d) = pair_on(dir.path(), machine, 0);
    start(&mut s, &mut d);
    let info = wait_status(&mut s, "completed");
    assert!(
        info["ram"]["__org.ferry_postcopy-pages"].as_u64() > Some(0),
        "{machine}: {info}"
    );
    wait_status(&mut d, "completed");
    d.verify();
}

#[test]
fn post_copy_on_ferry_1_0() {
    post_copy_on("ferry-1.0");
}

#[test]
fn post_copy_on_ferry_1_1() {
    post_copy_on("ferry-1.1");
}

#[test]
fn post_copy_on_ferry_2_1() {
    post_copy_on("ferry-2.1");
}

#[test]
fn a_killed_source_leaves_the_destination_paused_on_what_it_has() {
    let dir = tempdir();
    // 256 KiB/s: the working set takes a minute to follow.
    let (mut s, mut d) = pair(dir.path(), 256 << 10);
    start(&mut s, &mut d);
    wait_status(&mut d, "postcopy-active");
    s.child.kill().unwrap();
    let info = wait_status(&mut d, "postcopy-paused");
    assert!(
        info["error-desc"]
            .as_str()
            .is_some_and(|e| e.contains("post-copy")),
        "{info}"
    );
    // Paused, never running on pages it did not get; still no hotplug and no new stream.
    d.poll(
        TIMEOUT,
        &|f| format!("the guest was not paused: {}", f.status()),
        |f| (f.status() == "paused").then_some(()),
    );
    assert_eq!(
        d.err(
            "device_add",
            json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1})
        ),
        "GenericError: device_add not allowed while migrating"
    );
    assert_eq!(
        d.ok("query-migrate", json!({}))["status"],
        "postcopy-paused"
    );
}

#[test]
fn post_copy_needs_the_capability_on_both_sides() {
    let dir = tempdir();
    let mut s = Ferry::spawn(dir.path(), "src", &SHAPE);
    assert_eq!(
        s.err("migrate-start-postcopy", json!({})),
        "GenericError: Enable postcopy with migrate_set_capability before the start of migration"
    );
    postcopy_cap(&mut s, true);
    assert_eq!(
        s.err("migrate-start-postcopy", json!({})),
        "GenericError: Postcopy must be started after migration has been started"
    );
    // The destination did not turn it on: the source fails by name and runs on.
    let mut args = SHAPE.to_vec();
    args.extend(["--incoming", "tcp:127.0.0.1:0"]);
    let mut d = Ferry::spawn(dir.path(), "dst", &args);
    s.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 16 << 20, "downtime-limit": 0, "__org.ferry_max-iterations": 10000}),
    );
    s.wait_pass(1);
    start(&mut s, &mut d);
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(
        info["error-desc"],
        "Destination refused the migration: post-copy was requested, but the destination did not enable postcopy-ram",
        "{info}"
    );
    assert_eq!(s.status(), "running");
    let info = d.wait_migration(&["failed"]);
    assert_eq!(d.status(), "inmigrate", "{info}");
}

#[test]
fn a_stalled_pre_copy_switches_to_post_copy_when_both_sides_allow_it() {
    let dir = tempdir();
    let (mut s, mut d) = pair(dir.path(), 0);
    s.ok(
        "migrate-set-parameters",
        json!({"__org.ferry_stall-passes": 2}),
    );
    let port = d.incoming_port();
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = wait_status(&mut s, "completed");
    assert!(
        info["ram"]["__org.ferry_postcopy-pages"].as_u64() > Some(0),
        "{info}"
    );
    wait_status(&mut d, "completed");
    d.verify();
}

/// A relay for the main connection that the test cuts (both ways) when it likes.
struct Link {
    addr: String,
    sockets: Vec<std::net::TcpStream>,
    accepted: std::sync::mpsc::Receiver<Vec<std::net::TcpStream>>,
}

impl Link {
    fn to(port: &str) -> Link {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let addr = l.local_addr().unwrap().to_string();
        let to = format!("127.0.0.1:{port}");
        let (tx, accepted) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Ok((a, _)) = l.accept() else { return };
            let b = std::net::TcpStream::connect(&to).expect("connect to the destination");
            let clones = vec![a.try_clone().unwrap(), b.try_clone().unwrap()];
            for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
            let _ = tx.send(clones);
        });
        Link {
            addr,
            sockets: Vec::new(),
            accepted,
        }
    }

    fn cut(&mut self) {
        if self.sockets.is_empty() {
            self.sockets = self
                .accepted
                .recv_timeout(TIMEOUT)
                .expect("the source never connected through the relay");
        }
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_post_copy_cut_mid_way_recovers_and_every_byte_arrives() {
    let dir = tempdir();
    let (mut s, mut d) = pair(dir.path(), 256 << 10);
    // One connection, so the relay carries all of it.
    s.ok("migrate-set-parameters", json!({"multifd-channels": 0}));
    let port = d.incoming_port();
    let mut link = Link::to(&port);
    s.ok("migrate", json!({"uri": format!("tcp:{}", link.addr)}));
    s.ok("migrate-start-postcopy", json!({}));
    wait_status(&mut d, "postcopy-active");
    wait_status(&mut s, "postcopy-active");
    link.cut();
    let dinfo = wait_status(&mut d, "postcopy-paused");
    wait_status(&mut s, "postcopy-paused");
    assert_eq!(s.status(), "postmigrate");
    assert!(
        d.err("migrate-recover", json!({"uri": "file:/tmp/x"}))
            .contains("tcp: only"),
        "{dinfo}"
    );
    assert_eq!(
        s.err("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")})),
        "GenericError: There's a migration process in progress"
    );

    d.ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let rport = d.incoming_port();
    // A stranger presenting another session is refused by name; the destination waits on.
    let mut stranger = std::net::TcpStream::connect(format!("127.0.0.1:{rport}")).unwrap();
    let mut hello = b"FERRYRES".to_vec();
    hello.extend_from_slice(&0x1234u64.to_le_bytes());
    std::io::Write::write_all(&mut stranger, &hello).unwrap();
    stranger
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let reply = migration::protocol::Msg::read(&mut stranger).expect("a reply to the stranger");
    assert_eq!(reply.kind, migration::protocol::Kind::Refuse);
    assert!(
        reply
            .text
            .starts_with("resume from a different source: session 0x0000000000001234"),
        "{}",
        reply.text
    );
    assert_eq!(
        d.ok("query-migrate", json!({}))["status"],
        "postcopy-paused"
    );

    // The real source resumes, at full speed now.
    s.ok(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    );
    s.ok(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{rport}"), "resume": true}),
    );
    // Both are postcopy-paused until the resume has done its work.
    let info = s.wait_migration(&["completed"]);
    let dinfo = d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "running", "{dinfo}");
    assert!(
        info["ram"]["__org.ferry_postcopy-pages"].as_u64() > Some(0),
        "{info}"
    );
    let p = d.pass();
    d.wait_pass(p + 2);
    d.verify();
}
