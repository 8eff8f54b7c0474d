//! vCPU threads and the scheduler: each asks for a 0.1 ms slice (lever `vcpu-slice`), read back
//! from `/proc/TID/sched` for the thread ids `query-cpus-fast` reports.

use ferry_tests::*;
use serde_json::json;
use std::process::Command;

/// The slice (`se.slice`, ns) the kernel gives thread `tid`.
fn slice(tid: u64) -> u64 {
    let sched = std::fs::read_to_string(format!("/proc/{tid}/sched"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{tid}/sched: {e}"));
    sched
        .lines()
        .find(|l| l.starts_with("se.slice"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no se.slice for thread {tid}:\n{sched}"))
}

/// Linux 6.12 and later give fair-class threads the slice they ask for.
fn kernel_takes_custom_slices() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse::<u32>().ok());
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 12)
}

fn vcpu_slices(f: &mut Ferry) -> Vec<u64> {
    let cpus = f.ok("query-cpus-fast", json!({}));
    cpus.as_array()
        .unwrap_or_else(|| panic!("query-cpus-fast returned no list: {cpus}"))
        .iter()
        .map(|c| slice(c["thread-id"].as_u64().expect("a thread-id")))
        .collect()
}

fn spawn(dir: &std::path::Path, name: &str, levers_off: &str) -> Ferry {
    let mut cmd = Command::new(bins::ferry());
    cmd.args(["run", "--memory", "64M", "--vcpus", "2"])
        .env("FERRY_LEVERS_OFF", levers_off);
    Ferry::spawn_command(cmd, dir, name)
}

#[test]
fn vcpu_threads_ask_for_a_short_scheduler_slice() {
    if !kernel_takes_custom_slices() {
        // Before 6.12 the kernel ignores the request; nothing here to check.
        eprintln!("SKIP: this kernel has no per-thread scheduler slice (Linux 6.12+)");
        return;
    }
    let dir = tempdir();
    let mut on = spawn(dir.path(), "on", "");
    assert_eq!(
        vcpu_slices(&mut on),
        [100_000, 100_000],
        "both vCPUs at 0.1 ms"
    );
    let mut off = spawn(dir.path(), "off", "vcpu-slice");
    let slices = vcpu_slices(&mut off);
    assert!(
        slices.iter().all(|&s| s != 100_000),
        "with the lever off the vCPUs keep the kernel's default slice: {slices:?}"
    );
}
