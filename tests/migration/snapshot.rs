//! Save a running guest to a file through QMP (`migrate file:`), then start fresh `ferry`
//! processes from that file (`--incoming file:`): the guest continues, its memory pattern is
//! intact, and the state loaded equals the state saved. A file for another VM shape is refused
//! with the difference named.

use ferry_tests::*;
use serde_json::json;

const SHAPE: [&str; 6] = [
    "--machine",
    "ferry-1.1",
    "--memory",
    "64M",
    "--guest",
    "dirty:4",
];

fn snapshot(dir: &std::path::Path) -> std::path::PathBuf {
    let mut a = Ferry::spawn(dir, "a", &SHAPE);
    a.wait_pass(3);
    a.ok("stop", json!({}));
    assert_eq!(a.status(), "paused");
    let file = dir.join("saved.stream");
    a.ok(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let info = a.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(a.status(), "postmigrate");
    file
}

#[test]
fn snapshot_restores_in_a_new_process_and_the_guest_continues() {
    let dir = tempdir();
    let file = snapshot(dir.path());
    let saved_pass = {
        let (_, sections) =
            vmm::migrate::read_stream_sections(std::fs::File::open(&file).unwrap()).unwrap();
        assert!(sections.iter().any(|s| s.name == "cpu"));
        sections.len()
    };
    assert!(saved_pass > 5);

    // -S: loaded but never run; its re-serialisation must equal what was saved.
    let mut b_args = SHAPE.to_vec();
    let uri = format!("file:{}", file.display());
    b_args.extend(["-S", "--incoming", &uri]);
    let mut b = Ferry::spawn(dir.path(), "b", &b_args);
    b.wait_migration(&["completed"]);
    assert_eq!(b.status(), "paused");
    let again = dir.path().join("reserialised.stream");
    b.ok(
        "migrate",
        json!({"uri": format!("file:{}", again.display())}),
    );
    b.wait_migration(&["completed"]);
    let (ma, a) = vmm::migrate::read_stream_sections(std::fs::File::open(&file).unwrap()).unwrap();
    let (mb, bb) =
        vmm::migrate::read_stream_sections(std::fs::File::open(&again).unwrap()).unwrap();
    assert_eq!(ma, mb);
    let schema =
        vmm::migrate::full_catalog().schema(machine_types::MachineType::lookup(&ma).unwrap());
    let d = vmm::migrate::diff_sections(&schema, &a, &bb).unwrap();
    assert!(
        d.is_equal(),
        "state after load differs from the saved state: {:?}",
        d.differences
    );
    assert_eq!(
        std::fs::read(&file).unwrap().len(),
        std::fs::read(&again).unwrap().len()
    );

    // The guest was stopped when saved, so it comes up paused (the run state travels in the
    // stream); `cont` runs it on from where it was saved.
    let mut c_args = SHAPE.to_vec();
    c_args.extend(["--incoming", &uri]);
    let mut c = Ferry::spawn(dir.path(), "c", &c_args);
    c.wait_migration(&["completed"]);
    assert_eq!(c.status(), "paused");
    c.ok("cont", json!({}));
    assert_eq!(c.status(), "running");
    let p = c.pass();
    c.wait_pass(p + 3);
    c.ok("stop", json!({}));
    let v = c.ok("__org.ferry_verify-guest", json!({}));
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn snapshot_for_another_shape_is_refused_naming_the_difference() {
    let dir = tempdir();
    let file = snapshot(dir.path());
    let uri = format!("file:{}", file.display());
    for (flag, value, want) in [
        ("--vcpus", "2", "vCPUs: source 1, destination 2"),
        (
            "--memory",
            "128M",
            "memory region 0: source 0x0+64 MiB, destination 0x0+128 MiB",
        ),
        (
            "--machine",
            "ferry-2.0",
            "machine type: source ferry-1.1, destination ferry-2.0",
        ),
    ] {
        let mut args: Vec<&str> = SHAPE.to_vec();
        if let Some(i) = args.iter().position(|a| *a == flag) {
            args[i + 1] = value;
        } else {
            args.extend([flag, value]);
        }
        args.extend(["--incoming", &uri]);
        let mut d = Ferry::spawn(dir.path(), flag.trim_start_matches('-'), &args);
        let info = d.wait_migration(&["failed", "completed"]);
        assert_eq!(info["status"], "failed", "{flag} {value}: {info}");
        let desc = info["error-desc"].as_str().unwrap_or_default();
        assert!(
            desc.contains(want),
            "{flag} {value}: error '{desc}' does not name '{want}'"
        );
        assert_eq!(
            d.status(),
            "inmigrate",
            "nothing may run after a refused load"
        );
    }
}

#[test]
fn live_snapshot_of_a_running_guest_resumes_running() {
    let dir = tempdir();
    let mut a = Ferry::spawn(dir.path(), "a", &SHAPE);
    // A live save of a dirtying guest: let it finish on a loaded host too.
    a.ok("migrate-set-parameters", completes_under_load());
    a.wait_pass(2);
    let file = dir.path().join("live.stream");
    a.ok(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    assert_eq!(
        a.wait_migration(&["completed", "failed"])["status"],
        "completed"
    );
    assert_eq!(a.status(), "postmigrate");
    let uri = format!("file:{}", file.display());
    let mut args = SHAPE.to_vec();
    args.extend(["--incoming", &uri]);
    let mut b = Ferry::spawn(dir.path(), "b", &args);
    b.wait_migration(&["completed"]);
    assert_eq!(
        b.status(),
        "running",
        "the source was running, so the restored guest runs"
    );
    let p = b.pass();
    b.wait_pass(p + 2);
    b.ok("stop", json!({}));
    assert_eq!(b.ok("__org.ferry_verify-guest", json!({}))["ok"], true);
}

#[test]
fn a_failed_file_restore_can_be_retried_in_the_same_process() {
    let dir = tempdir();
    let file = snapshot(dir.path());
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.stream");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let mut args = SHAPE.to_vec();
    args.extend(["--incoming", "defer"]);
    let mut b = Ferry::spawn(dir.path(), "b", &args);
    b.ok(
        "migrate-incoming",
        json!({"uri": format!("file:{}", cut.display())}),
    );
    let info = b.wait_migration(&["failed", "completed"]);
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        info["error-desc"]
            .as_str()
            .unwrap()
            .contains("Truncated stream"),
        "{info}"
    );
    assert_eq!(b.status(), "inmigrate");
    b.ok(
        "migrate-incoming",
        json!({"uri": format!("file:{}", file.display())}),
    );
    assert_eq!(
        b.wait_migration(&["completed", "failed"])["status"],
        "completed"
    );
    b.ok("cont", json!({}));
    let p = b.pass();
    b.wait_pass(p + 2);
}
