//! Save a guest to a file in the middle of each hotplug transition, for every machine type,
//! restore it in a new `ferry` process, and see the restored guest complete the operation.

use ferry_tests::*;
use serde_json::json;

const MACHINES: [&str; 3] = ["ferry-1.0", "ferry-1.1", "ferry-2.0"];

/// Unplug timeout of the tests that wait for the guest's answer: the timer must never fire
/// first, however slow the host (a save and a restore run while the unplug is pending).
const NEVER_MS: u64 = 600_000;

/// Unplug timeout of the test that watches the timer travel: long enough that the test can
/// stop the guest with the timer part-way through on a loaded host, short enough to fire.
const TIMER_MS: u64 = 3000;

fn shape(m: &str, unplug_timeout_ms: u64) -> Vec<String> {
    let timeout = unplug_timeout_ms.to_string();
    [
        "--machine",
        m,
        "--memory",
        "64M",
        "--guest",
        "dirty:4",
        "--unplug-timeout-ms",
        timeout.as_str(),
    ]
    .map(String::from)
    .to_vec()
}

fn spawn(dir: &std::path::Path, name: &str, args: &[String]) -> Ferry {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Ferry::spawn(dir, name, &a)
}

/// Save `f` to `dir/NAME.stream`; returns the path.
fn save(f: &mut Ferry, dir: &std::path::Path, name: &str) -> String {
    let file = dir.join(format!("{name}.stream"));
    // The guest may be running (a live save): let it finish on a loaded host too.
    f.ok("migrate-set-parameters", completes_under_load());
    f.ok(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let info = f.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "save {name}: {info}");
    format!("file:{}", file.display())
}

/// A new process restoring `uri` after the same pre-start device_add.
fn restore(dir: &std::path::Path, m: &str, unplug_timeout_ms: u64, uri: &str) -> Ferry {
    let mut args = shape(m, unplug_timeout_ms);
    args.extend(["--incoming".into(), "defer".into()]);
    let mut b = spawn(dir, &format!("restored-{m}"), &args);
    b.ok(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1}),
    );
    b.ok("migrate-incoming", json!({"uri": uri}));
    b.wait_migration(&["completed", "failed"]);
    assert_eq!(
        b.ok("query-migrate", json!({}))["status"],
        "completed",
        "{}",
        read(&b.log)
    );
    b
}

#[test]
fn hotplug_in_progress_completes_after_restore() {
    for m in MACHINES {
        let dir = tempdir();
        let mut a = spawn(dir.path(), "a", &shape(m, NEVER_MS));
        a.wait_pass(1);
        // Paused: the guest cannot serve the hotplug event yet.
        a.ok("stop", json!({}));
        a.ok(
            "device_add",
            json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1}),
        );
        let before = a.connector("core1");
        assert_ne!(before["state"], "logical-configured", "{m}: {before}");
        let uri = save(&mut a, dir.path(), "plugging");
        let mut b = restore(dir.path(), m, NEVER_MS, &uri);
        assert_eq!(b.status(), "paused");
        assert_eq!(
            b.connector("core1")["state"],
            before["state"],
            "{m}: the transitional state travels"
        );
        b.ok("cont", json!({}));
        b.wait_connector(
            "core1",
            |c| c["state"] == "logical-configured",
            &format!("{m}: configure after restore"),
        );
    }
}

#[test]
fn pending_unplug_completes_after_restore() {
    for m in MACHINES {
        let dir = tempdir();
        let mut a = spawn(dir.path(), "a", &shape(m, NEVER_MS));
        a.wait_pass(1);
        a.ok(
            "device_add",
            json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1}),
        );
        a.wait_connector("core1", |c| c["state"] == "logical-configured", "configure");
        a.ok("__org.ferry_guest-hotplug", json!({"mode": "slow"}));
        a.ok("device_del", json!({"id": "core1"}));
        a.wait_connector("core1", |c| c["unplug-pending"] == true, "unplug request");
        let uri = save(&mut a, dir.path(), "unplugging");
        let mut b = restore(dir.path(), m, NEVER_MS, &uri);
        assert_eq!(b.status(), "running");
        assert_eq!(
            b.connector("core1")["unplug-pending"],
            true,
            "{m}: the pending unplug travels"
        );
        b.ok("__org.ferry_guest-hotplug", json!({"answer": true}));
        b.qmp
            .wait_event("DEVICE_DELETED", TIMEOUT, |d| d["device"] == "core1")
            .unwrap_or_else(|e| panic!("{m}: {e}\n{}", read(&b.log)));
        assert!(
            a.qmp
                .events()
                .iter()
                .all(|e| e["event"] != "DEVICE_DELETED"),
            "{m}: only the side running the guest reports it"
        );
    }
}

#[test]
fn unplug_timer_survives_restore_as_the_machine_type_says() {
    for m in MACHINES {
        let dir = tempdir();
        let mut a = spawn(dir.path(), "a", &shape(m, TIMER_MS));
        a.wait_pass(1);
        a.ok(
            "device_add",
            json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1}),
        );
        a.wait_connector("core1", |c| c["state"] == "logical-configured", "configure");
        a.ok("__org.ferry_guest-hotplug", json!({"mode": "ignore"}));
        a.ok("device_del", json!({"id": "core1"}));
        // A third of the way through the timeout (guest-running time): the 2 s left leave
        // the `stop` below ample time to land before the timer fires.
        let c = a.wait_connector(
            "core1",
            |c| c["remaining-ms"].as_u64().is_some_and(|r| r < 2000),
            "a third of the timeout",
        );
        a.ok("stop", json!({}));
        let left = a.connector("core1")["remaining-ms"].as_u64().unwrap();
        assert!(left <= c["remaining-ms"].as_u64().unwrap());
        let uri = save(&mut a, dir.path(), "timer");
        let mut b = restore(dir.path(), m, TIMER_MS, &uri);
        assert_eq!(b.status(), "paused");
        let restored = b.connector("core1")["remaining-ms"]
            .as_u64()
            .expect("remaining-ms after restore");
        if m == "ferry-1.0" {
            assert_eq!(
                restored, TIMER_MS,
                "ferry-1.0 has no unplug-timer subsection: the full timeout restarts"
            );
        } else {
            assert_eq!(
                restored, left,
                "{m}: the remaining time travels in the unplug-timer subsection"
            );
        }
        b.ok("cont", json!({}));
        b.qmp
            .wait_event("DEVICE_UNPLUG_GUEST_ERROR", TIMEOUT, |d| {
                d["device"] == "core1"
            })
            .unwrap_or_else(|e| panic!("{m}: {e}\n{}", read(&b.log)));
        // The error stands and a retry is possible once the guest cooperates.
        b.ok("__org.ferry_guest-hotplug", json!({"mode": "cooperative"}));
        b.ok("device_del", json!({"id": "core1"}));
        b.qmp
            .wait_event("DEVICE_DELETED", TIMEOUT, |d| d["device"] == "core1")
            .unwrap();
    }
}
