//! A guest that dirties its working set faster than a capped link carries it: without help
//! pre-copy stalls and the stall rule ends it by name; auto-converge (vCPU throttling) and
//! the downtime ramp each bring it to a switchover; throttling ends with the migration.
//!
//! The link cap is a tenth of the guest's own sweep rate, measured first, so the guest
//! outruns the link tenfold on any host, and a guest throttled to 99 % runs a tenth as fast
//! as the link.

use ferry_tests::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const WS_PAGES: u64 = 4096;
const SHAPE: [&str; 6] = [
    "--machine",
    "ferry-2.0",
    "--memory",
    "64M",
    "--guest",
    "dirty:16",
];

/// Pages per second the guest sweeps, over about a second of its own progress.
fn sweep_rate(s: &mut Ferry) -> f64 {
    let read = |s: &mut Ferry| {
        let g = s.ok("__org.ferry_query-guest", json!({}));
        let pass = g["pass"].as_u64().expect("pass");
        let page = g["page"].as_u64().expect("page");
        (pass * WS_PAGES + page, Instant::now())
    };
    s.wait_pass(1);
    let (p0, t0) = read(s);
    std::thread::sleep(Duration::from_secs(1));
    let (p1, t1) = read(s);
    let rate = (p1 - p0) as f64 / (t1 - t0).as_secs_f64();
    assert!(rate > 0.0, "the guest made no progress in a second");
    rate
}

/// A source and destination with a link of a tenth of the guest's sweep rate; returns them
/// with the full-working-set pass time in ms.
fn pair(dir: &std::path::Path) -> (Ferry, Ferry, u64) {
    let mut args = SHAPE.to_vec();
    args.extend(["--incoming", "tcp:127.0.0.1:0"]);
    let d = Ferry::spawn(dir, "dst", &args);
    let mut s = Ferry::spawn(dir, "src", &SHAPE);
    let rate = sweep_rate(&mut s);
    let cap = ((rate / 10.0) as u64 * 4096).max(1 << 20);
    let pass_ms = WS_PAGES * 4096 * 1000 / cap;
    s.ok(
        "migrate-set-parameters",
        json!({
            "max-bandwidth": cap,
            // Every page costs its full size on the link.
            "__org.ferry_sparse-pages": false,
            "multifd-channels": 0,
            "downtime-limit": (pass_ms / 4).max(1),
            "__org.ferry_max-iterations": 10000,
        }),
    );
    (s, d, pass_ms)
}

fn migrate(s: &mut Ferry, d: &mut Ferry) {
    let port = d.incoming_port();
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
}

/// Capability `auto-converge` on `s`, with throttle parameters `params`.
fn auto_converge(s: &mut Ferry, params: Value) {
    s.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
    );
    s.ok("migrate-set-parameters", params);
}

fn throttle(info: &Value) -> u64 {
    info["cpu-throttle-percentage"]
        .as_u64()
        .unwrap_or_else(|| panic!("query-migrate shows no cpu-throttle-percentage: {info}"))
}

#[test]
fn a_guest_outrunning_the_link_stalls_and_the_source_runs_on() {
    let dir = tempdir();
    let (mut s, mut d, _) = pair(dir.path());
    s.ok(
        "migrate-set-parameters",
        json!({"__org.ferry_stall-passes": 3}),
    );
    migrate(&mut s, &mut d);
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("Migration stalled: the expected downtime")
            && why.contains("for 3 passes")
            && why.contains("enable auto-converge"),
        "{info}"
    );
    assert!(info.get("cpu-throttle-percentage").is_none(), "{info}");
    assert_eq!(s.status(), "running");
    let p = s.pass();
    s.wait_pass(p + 2);
}

#[test]
fn auto_converge_throttles_the_guest_until_it_switches_over() {
    let dir = tempdir();
    let (mut s, mut d, _) = pair(dir.path());
    auto_converge(
        &mut s,
        json!({"cpu-throttle-initial": 90, "cpu-throttle-increment": 9}),
    );
    migrate(&mut s, &mut d);
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        info["__org.ferry_cpu-throttle-peak"].as_u64() >= Some(90),
        "converged without throttling: {info}"
    );
    assert_eq!(
        throttle(&info),
        0,
        "throttling outlived the migration: {info}"
    );
    d.wait_migration(&["completed"]);
    d.verify();
}

#[test]
fn throttling_ends_when_the_migration_is_cancelled() {
    let dir = tempdir();
    let (mut s, mut d, _) = pair(dir.path());
    // Half speed leaves the guest five times faster than the link: it never converges.
    auto_converge(
        &mut s,
        json!({"cpu-throttle-initial": 50, "max-cpu-throttle": 50}),
    );
    migrate(&mut s, &mut d);
    s.poll(
        TIMEOUT,
        &|f| format!("never throttled: {}", f.ok("query-migrate", json!({}))),
        |f| {
            let info = f.ok("query-migrate", json!({}));
            assert!(
                info["status"] == "setup" || info["status"] == "active",
                "{info}"
            );
            (throttle(&info) == 50).then_some(())
        },
    );
    s.ok("migrate_cancel", json!({}));
    let info = s.wait_migration(&["cancelled", "failed", "completed"]);
    assert_eq!(info["status"], "cancelled", "{info}");
    assert_eq!(throttle(&info), 0, "{info}");
    assert_eq!(info["__org.ferry_cpu-throttle-peak"], 50, "{info}");
    assert_eq!(s.status(), "running");
    let p = s.pass();
    s.wait_pass(p + 2);
}

#[test]
fn the_downtime_ramp_reaches_a_switchover_the_limit_alone_cannot() {
    let dir = tempdir();
    let (mut s, mut d, pass_ms) = pair(dir.path());
    let step = (pass_ms / 4).max(1);
    s.ok(
        "migrate-set-parameters",
        json!({"__org.ferry_downtime-step": step, "__org.ferry_downtime-ceiling": pass_ms * 4}),
    );
    migrate(&mut s, &mut d);
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}");
    let allowed = info["__org.ferry_downtime-allowed"].as_u64().unwrap_or(0);
    assert!(
        allowed > step && allowed <= pass_ms * 4,
        "the ramp did not raise the allowed downtime ({step} ms start): {info}"
    );
    assert!(info.get("cpu-throttle-percentage").is_none(), "{info}");
    d.wait_migration(&["completed"]);
    d.verify();
}

#[test]
fn convergence_parameters_out_of_range_are_refused_and_change_nothing() {
    let dir = tempdir();
    let mut s = Ferry::spawn(dir.path(), "src", &SHAPE);
    let before = s.ok("query-migrate-parameters", json!({}));
    for (name, v) in [
        ("cpu-throttle-initial", 0),
        ("cpu-throttle-increment", 100),
        ("max-cpu-throttle", 100),
        ("throttle-trigger-threshold", 0),
        ("__org.ferry_page-thread-nice", 20),
    ] {
        let e = s.err(
            "migrate-set-parameters",
            json!({name: v, "downtime-limit": 1, "cpu-throttle-tailslow": true}),
        );
        assert!(e.contains(&format!("Parameter '{name}' expects")), "{e}");
    }
    assert_eq!(s.ok("query-migrate-parameters", json!({})), before);
    let e = s.err(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "xbzrle", "state": true}]}),
    );
    assert!(e.contains("'xbzrle' is not supported"), "{e}");
    s.ok(
        "migrate-set-parameters",
        json!({"cpu-throttle-initial": 30, "cpu-throttle-tailslow": true, "__org.ferry_stall-timeout": 5000}),
    );
    let p = s.ok("query-migrate-parameters", json!({}));
    assert_eq!(p["cpu-throttle-initial"], 30);
    assert_eq!(p["cpu-throttle-tailslow"], true);
    assert_eq!(p["__org.ferry_stall-timeout"], 5000);
    assert_eq!(p["max-cpu-throttle"], 99);
}

/// The nice value in a `/proc/.../stat` line (field 19; after the command name in
/// parentheses, field 3 comes first).
fn nice_of(stat: &str) -> Option<i64> {
    stat[stat.rfind(')')? + 2..]
        .split(' ')
        .nth(16)?
        .parse()
        .ok()
}

/// Nice values of `pid`'s threads.
fn thread_nices(pid: u32) -> Vec<i64> {
    nices_of_threads(pid, |_| true)
}

/// Nice values of `pid`'s threads whose name passes `named`.
fn nices_of_threads(pid: u32, named: impl Fn(&str) -> bool) -> Vec<i64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| named(c.trim())))
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|stat| nice_of(&stat))
        .collect()
}

#[test]
fn page_channel_threads_run_at_the_nice_value_each_side_asked_for() {
    let dir = tempdir();
    let (mut s, mut d, _) = pair(dir.path());
    // Two page channels; each side's own value applies to its own threads.
    s.ok(
        "migrate-set-parameters",
        json!({"multifd-channels": 2, "__org.ferry_page-thread-nice": 7}),
    );
    d.ok(
        "migrate-set-parameters",
        json!({"multifd-channels": 2, "__org.ferry_page-thread-nice": 9}),
    );
    assert_eq!(
        s.ok("query-migrate-parameters", json!({}))["__org.ferry_page-thread-nice"],
        7
    );
    assert!(
        !thread_nices(s.child.id()).contains(&7),
        "no thread at nice 7 before the migration"
    );
    migrate(&mut s, &mut d);
    // The capped link keeps pre-copy going while both sides are looked at.
    let (spid, dpid) = (s.child.id(), d.child.id());
    s.poll(
        Duration::from_secs(60),
        &|_| format!("source threads' nice values: {:?}", thread_nices(spid)),
        |_| (thread_nices(spid).iter().filter(|&&n| n == 7).count() == 2).then_some(()),
    );
    d.poll(
        Duration::from_secs(60),
        &|_| format!("destination threads' nice values: {:?}", thread_nices(dpid)),
        |_| (thread_nices(dpid).iter().filter(|&&n| n == 9).count() == 2).then_some(()),
    );
    // Only those two: the vCPU, the migration thread and the rest keep the process's.
    let main = std::fs::read_to_string(format!("/proc/{spid}/stat"))
        .ok()
        .and_then(|st| nice_of(&st))
        .expect("source's nice value");
    let nices = thread_nices(spid);
    assert_eq!(
        nices.iter().filter(|&&n| n != main).count(),
        2,
        "{nices:?} (process at {main})"
    );
    s.ok("migrate_cancel", json!({}));
    s.wait_migration(&["cancelled"]);
}

/// Threads named `migration-in` in `pid`: the incoming migration's and its page channels'.
fn incoming_threads(pid: u32) -> Vec<i64> {
    nices_of_threads(pid, |name| name == "migration-in")
}

/// Migrate with auto-converge on the source only and `dst_nice` set on the destination (or
/// not); the nice values of the destination's `migration-in` threads mid-migration, sorted.
fn destination_nices_with_auto_converge(dst_nice: Option<u64>) -> Vec<i64> {
    let dir = tempdir();
    let (mut s, mut d, _) = pair(dir.path());
    s.ok("migrate-set-parameters", json!({"multifd-channels": 2}));
    d.ok("migrate-set-parameters", json!({"multifd-channels": 2}));
    let nice = |f: &mut Ferry| {
        f.ok("query-migrate-parameters", json!({}))["__org.ferry_page-thread-nice"].clone()
    };
    assert_eq!(
        nice(&mut s),
        0,
        "without auto-converge: the process's priority"
    );
    auto_converge(&mut s, json!({}));
    assert_eq!(
        nice(&mut s),
        19,
        "auto-converge on: page threads at nice 19"
    );
    if let Some(n) = dst_nice {
        d.ok(
            "migrate-set-parameters",
            json!({"__org.ferry_page-thread-nice": n}),
        );
    }
    assert_eq!(
        nice(&mut d),
        dst_nice.unwrap_or(0),
        "the destination's own value"
    );
    migrate(&mut s, &mut d);
    let (spid, dpid) = (s.child.id(), d.child.id());
    s.poll(
        Duration::from_secs(60),
        &|_| format!("source threads' nice values: {:?}", thread_nices(spid)),
        |_| (thread_nices(spid).iter().filter(|&&n| n == 19).count() == 2).then_some(()),
    );
    // The destination's migration thread and its two page channels.
    let mut seen = d.poll(
        Duration::from_secs(60),
        &|_| {
            format!(
                "destination's migration-in threads: {:?}",
                incoming_threads(dpid)
            )
        },
        |_| {
            let t = incoming_threads(dpid);
            // Not set: wait for both channels to take the source's 19.
            let at19 = t.iter().filter(|&&n| n == 19).count();
            (t.len() == 3 && (dst_nice.is_some() || at19 == 2)).then_some(t)
        },
    );
    s.ok("migrate_cancel", json!({}));
    s.wait_migration(&["cancelled"]);
    seen.sort_unstable();
    seen
}

#[test]
fn with_auto_converge_on_the_source_page_threads_of_both_sides_yield_to_vcpus() {
    assert_eq!(destination_nices_with_auto_converge(None), [0, 19, 19]);
}

#[test]
fn an_explicit_page_thread_nice_wins_over_the_auto_converge_default() {
    assert_eq!(destination_nices_with_auto_converge(Some(0)), [0, 0, 0]);
}
