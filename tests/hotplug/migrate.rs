//! Live migration of a guest with hot-plugged devices between two real `ferry` processes:
//! a CPU core, a memory block and a multifunction PCI slot plugged on the source and mirrored
//! by pre-start `device_add`s on the destination, an unplug pending at migration time that
//! completes on the destination, hotplug refused on both sides while the stream flows, and
//! the incoming connector reset shown to matter.

use ferry_tests::*;
use serde_json::{Value, json};

fn devices() -> Vec<Value> {
    vec![
        json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1}),
        json!({"driver": "ferry-mem-block", "id": "mem0", "slot": 0}),
        json!({"driver": "ferry-pci-fn", "id": "nic1", "addr": "01.1"}),
        json!({"driver": "ferry-pci-fn", "id": "nic0", "addr": "01.0", "multifunction": true}),
    ]
}

#[test]
fn hotplugged_guest_migrates_and_a_pending_unplug_completes_on_the_destination() {
    hotplugged_guest_migrates(false);
}

/// The same in post-copy: the guest runs on the destination while its pages (hot-plugged
/// block included) follow, hotplug refused on both sides until every page is in.
#[test]
fn hotplugged_guest_migrates_in_post_copy_and_a_pending_unplug_completes_on_the_destination() {
    hotplugged_guest_migrates(true);
}

fn hotplugged_guest_migrates(postcopy: bool) {
    let dir = tempdir();
    // mem0's unplug stays pending across the migration until the test tells the guest to
    // answer: the unplug timer (15 s by default) must not fire first on a slow host.
    let shape = [
        "--machine",
        "ferry-2.0",
        "--memory",
        "64M",
        "--guest",
        "dirty:4",
        "--unplug-timeout-ms",
        "600000",
    ];
    let mut s = Ferry::spawn(dir.path(), "src", &shape);
    s.wait_pass(1);
    for d in devices() {
        s.ok("device_add", d);
    }
    for d in ["core1", "mem0", "nic0", "nic1"] {
        s.wait_connector(
            d,
            |c| c["state"].as_str().unwrap().ends_with("configured"),
            "configure",
        );
    }
    // The guest holds unplug requests back: mem0's unplug is pending when the migration runs.
    s.ok("__org.ferry_guest-hotplug", json!({"mode": "slow"}));
    s.ok("device_del", json!({"id": "mem0"}));
    s.wait_connector("mem0", |c| c["unplug-pending"] == true, "unplug request");

    // Destination: same shape, the same devices added before the stream starts.
    let mut dargs = shape.to_vec();
    dargs.extend(["--incoming", "tcp:127.0.0.1:0"]);
    let mut d = Ferry::spawn(dir.path(), "dst", &dargs);
    for dev in devices() {
        d.ok("device_add", dev);
    }
    let port = d.incoming_port();

    if postcopy {
        for f in [&mut s, &mut d] {
            f.ok(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]}),
            );
        }
        // Pass 0 at 16 MiB/s, then post-copy at once; the rest at 4 MiB/s leaves seconds to
        // look at both sides.
        s.ok(
            "migrate-set-parameters",
            json!({"max-bandwidth": 16 << 20, "downtime-limit": 0, "__org.ferry_max-iterations": 10000, "max-postcopy-bandwidth": 4 << 20}),
        );
        s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
        s.ok("migrate-start-postcopy", json!({}));
        let info = d.wait_migration(&["postcopy-active", "completed", "failed"]);
        assert_eq!(info["status"], "postcopy-active", "{info}");
        for f in [&mut s, &mut d] {
            let e = f.err(
                "device_add",
                json!({"driver": "ferry-cpu-core", "id": "core2", "core-id": 2}),
            );
            assert_eq!(e, "GenericError: device_add not allowed while migrating");
            let e = f.err("device_del", json!({"id": "core1"}));
            assert_eq!(e, "GenericError: device_del not allowed while migrating");
        }
        assert_eq!(
            d.ok("query-migrate", json!({}))["status"],
            "postcopy-active"
        );
    } else {
        hold_and_check_precopy(&mut s, &mut d, &port);
    }

    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}\n{}", read(&d.log));
    d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "running");
    assert_eq!(s.status(), "postmigrate");

    // The connector states travelled: the pending unplug is pending on the destination.
    for dev in ["core1", "nic0", "nic1"] {
        let c = d.connector(dev);
        assert!(
            c["state"].as_str().unwrap().ends_with("configured"),
            "{dev}: {c}"
        );
    }
    assert_eq!(d.connector("mem0")["unplug-pending"], true);
    // The guest answers on the destination: DEVICE_DELETED is reported there.
    d.ok("__org.ferry_guest-hotplug", json!({"answer": true}));
    d.qmp
        .wait_event("DEVICE_DELETED", TIMEOUT, |x| x["device"] == "mem0")
        .unwrap_or_else(|e| {
            panic!(
                "no DEVICE_DELETED on the destination: {e}\n{}",
                read(&d.log)
            )
        });
    assert!(
        s.qmp
            .events()
            .iter()
            .all(|e| e["event"] != "DEVICE_DELETED"),
        "the source must not report it"
    );

    // Hotplug works again after the migration, and the memory is intact.
    d.ok(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "core2", "core-id": 2}),
    );
    d.wait_connector(
        "core2",
        |c| c["state"] == "logical-configured",
        "configure after migration",
    );
    d.ok("stop", json!({}));
    assert_eq!(d.ok("__org.ferry_verify-guest", json!({}))["ok"], true);
}

/// Pre-copy held mid-stream: hotplug refused on both sides, then let go.
fn hold_and_check_precopy(s: &mut Ferry, d: &mut Ferry, port: &str) {
    // Both sides stay mid-stream until the test lets go, however long its checks take: a
    // downtime limit of 0 never fits while the guest dirties pages, the iteration bound is
    // out of reach, and the cap keeps each pass long. (A cap alone is a time budget: at
    // 16 MiB/s the default 30 passes end the migration, not converged, after about 16 s on
    // an idle debug build, sooner on a faster host.)
    s.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1 << 20, "downtime-limit": 0, "__org.ferry_max-iterations": 10000}),
    );
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    s.wait_migration(&["active"]);
    let e = s.err(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "core2", "core-id": 2}),
    );
    assert_eq!(e, "GenericError: device_add not allowed while migrating");
    let e = s.err("device_del", json!({"id": "core1"}));
    assert_eq!(e, "GenericError: device_del not allowed while migrating");
    d.wait_migration(&["active"]);
    let e = d.err(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "core2", "core-id": 2}),
    );
    assert_eq!(e, "GenericError: device_add not allowed while migrating");
    let e = d.err("device_del", json!({"id": "core1"}));
    assert_eq!(e, "GenericError: device_del not allowed while migrating");
    assert_eq!(
        s.ok("query-migrate", json!({}))["status"],
        "active",
        "the migration was held for the checks above"
    );
    // Let go: no cap, and switch over at the end of the next pass (the iteration bound and
    // the policy were fixed at the start; a downtime limit this large fits any estimate).
    s.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 0, "downtime-limit": 600_000}),
    );
}

/// With `ferry-1.0` a configured connector is not in the stream, so the destination's own
/// state must already be right: the incoming reset makes the pre-start add coldplugged.
fn migrate_core(skip_reset: bool) -> (Value, Value) {
    let dir = tempdir();
    let shape = [
        "--machine",
        "ferry-1.0",
        "--memory",
        "64M",
        "--guest",
        "dirty:4",
    ];
    let mut s = Ferry::spawn(dir.path(), "src", &shape);
    s.ok("migrate-set-parameters", completes_under_load());
    s.wait_pass(1);
    s.ok(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1}),
    );
    s.wait_connector("core1", |c| c["state"] == "logical-configured", "configure");
    let src_conn = s.connector("core1");
    // -S: the destination stays paused after the load, so what we read is what was loaded,
    // before its guest could react to anything.
    let mut dargs = shape.to_vec();
    dargs.extend(["-S", "--incoming", "tcp:127.0.0.1:0"]);
    if skip_reset {
        dargs.push("--x-skip-incoming-reset");
    }
    let mut d = Ferry::spawn(dir.path(), "dst", &dargs);
    d.ok(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1}),
    );
    let port = d.incoming_port();
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    assert_eq!(
        s.wait_migration(&["completed", "failed"])["status"],
        "completed"
    );
    d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "paused");
    (src_conn, d.connector("core1"))
}

#[test]
fn incoming_reset_makes_a_ferry_1_0_destination_match_the_source() {
    let (src, dst) = migrate_core(false);
    assert_eq!(dst["state"], src["state"], "with the reset: {dst} vs {src}");
    let (src, dst) = migrate_core(true);
    assert_ne!(
        dst["state"], src["state"],
        "without the reset the pre-start add stays a half-done hotplug: {dst} vs {src}"
    );
}
