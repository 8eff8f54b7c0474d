//! Hotplug through QMP on a real `ferry` process: the guest serves the connectors on its
//! vCPU, and the QMP events follow.

use ferry_tests::*;
use serde_json::{Value, json};

fn connector<'a>(list: &'a Value, device: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["device"] == device)
        .unwrap_or_else(|| panic!("no connector holds {device}: {list}"))
}

fn wait_state(f: &mut Ferry, device: &str, state: &str) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let l = f.ok("__org.ferry_query-connectors", json!({}));
        if connector(&l, device)["state"] == state {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{device} never reached {state}: {l}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn plug_and_unplug_every_kind_with_events() {
    let dir = tempdir();
    let mut f = Ferry::spawn(
        dir.path(),
        "vm",
        &[
            "--machine",
            "ferry-2.0",
            "--memory",
            "64M",
            "--guest",
            "dirty:4",
        ],
    );
    f.wait_pass(1);
    f.ok(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1}),
    );
    f.ok(
        "device_add",
        json!({"driver": "ferry-mem-block", "id": "mem0", "slot": 0}),
    );
    f.ok(
        "device_add",
        json!({"driver": "ferry-pci-fn", "id": "fn1", "addr": "01.1"}),
    );
    f.ok(
        "device_add",
        // As QEMU users write it: a string "on" (a JSON boolean works too).
        json!({"driver": "ferry-pci-fn", "id": "fn0", "addr": "01.0", "multifunction": "on"}),
    );
    for (dev, st) in [
        ("core1", "logical-configured"),
        ("mem0", "logical-configured"),
        ("fn0", "physical-configured"),
        ("fn1", "physical-configured"),
    ] {
        wait_state(&mut f, dev, st);
    }
    let cpus = f.ok("query-hotpluggable-cpus", json!({}));
    let plugged: Vec<&Value> = cpus
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("qom-path").is_some())
        .collect();
    assert_eq!(plugged.len(), 2, "boot vCPU and core1: {cpus}");
    assert!(
        cpus.as_array()
            .unwrap()
            .iter()
            .any(|c| c["qom-path"] == "/machine/peripheral/core1"),
        "{cpus}"
    );
    // Errors as QEMU words them.
    let e = f.err(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 2}),
    );
    assert!(e.contains("Duplicate device ID 'core1'"), "{e}");
    let e = f.err("device_del", json!({"id": "nope"}));
    assert_eq!(e, "DeviceNotFound: Device 'nope' not found");
    let e = f.err("device_del", json!({"id": "fn1"}));
    assert!(e.contains("Unplug function 0 to remove slot 01"), "{e}");
    let e = f.err("device_add", json!({"driver": "virtio-net", "id": "x"}));
    assert!(
        e.contains("'virtio-net' is not a valid device model name"),
        "{e}"
    );

    for dev in ["core1", "mem0", "fn0"] {
        f.ok("device_del", json!({"id": dev}));
        f.qmp
            .wait_event("DEVICE_DELETED", TIMEOUT, |d| d["device"] == dev)
            .unwrap_or_else(|e| panic!("no DEVICE_DELETED for {dev}: {e}\n{}", read(&f.log)));
    }
    // Unplugging function 0 took the whole slot.
    f.qmp
        .wait_event("DEVICE_DELETED", TIMEOUT, |d| d["device"] == "fn1")
        .unwrap();
    let l = f.ok("__org.ferry_query-connectors", json!({}));
    assert!(
        l.as_array().unwrap().iter().all(|c| c["device"].is_null()),
        "{l}"
    );
    f.ok("stop", json!({}));
    assert_eq!(f.ok("__org.ferry_verify-guest", json!({}))["ok"], true);
}

#[test]
fn refused_and_ignored_unplugs_report_guest_errors_and_can_be_retried() {
    let dir = tempdir();
    // The ignored unplug must still be pending while the test checks it (a few QMP round
    // trips after `device_del`); the timer then fires on its own. 5 s keeps a loaded host
    // from expiring it in between (500 ms did not) and is well inside TIMEOUT.
    let mut f = Ferry::spawn(
        dir.path(),
        "vm",
        &[
            "--machine",
            "ferry-1.1",
            "--memory",
            "64M",
            "--guest",
            "dirty:4",
            "--guest-hotplug",
            "refuse",
            "--unplug-timeout-ms",
            "5000",
        ],
    );
    f.wait_pass(1);
    f.ok(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "c1", "core-id": 1}),
    );
    wait_state(&mut f, "c1", "logical-configured");
    f.ok("device_del", json!({"id": "c1"}));
    f.qmp
        .wait_event("DEVICE_UNPLUG_GUEST_ERROR", TIMEOUT, |d| {
            d["device"] == "c1"
        })
        .unwrap();
    // Ignore: the timeout fires.
    f.ok("__org.ferry_guest-hotplug", json!({"mode": "ignore"}));
    f.ok("device_del", json!({"id": "c1"}));
    // A repeated device_del re-sends instead of failing.
    f.ok("device_del", json!({"id": "c1"}));
    let l = f.ok("__org.ferry_query-connectors", json!({}));
    assert_eq!(connector(&l, "c1")["unplug-pending"], true, "{l}");
    let e = f.err(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "c1b", "core-id": 1}),
    );
    assert!(
        e.contains("busy") && e.contains("retry later"),
        "transient error expected: {e}"
    );
    f.qmp
        .wait_event("DEVICE_UNPLUG_GUEST_ERROR", TIMEOUT, |d| {
            d["device"] == "c1"
        })
        .unwrap();
    // Retry once the guest cooperates.
    f.ok("__org.ferry_guest-hotplug", json!({"mode": "cooperative"}));
    f.ok("device_del", json!({"id": "c1"}));
    f.qmp
        .wait_event("DEVICE_DELETED", TIMEOUT, |d| d["device"] == "c1")
        .unwrap();
}
