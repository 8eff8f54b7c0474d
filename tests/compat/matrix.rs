//! The migration compatibility matrix (issues 8 and 13): every machine type × every hotplug
//! scenario, each a real migration between two `ferry` processes over loopback TCP, plus the
//! refusals that are part of the promise.
//!
//! Custom harness (`libtest-mimic`, `harness = false`): every cell is a test of its own,
//! named `matrix::MACHINE::SCENARIO` (e.g. `matrix::ferry-2.0::unplug-timer`), so
//! `cargo nextest run -p ferry-tests --test compat` runs each in its own process (in the
//! `kvm-serial` group) and the usual filters select cells: `-- ferry-1.0::` or
//! `-- ::unplug-timer`. Without nextest the harness runs the cells one at a time unless
//! `--test-threads` says otherwise.
//!
//! A live cell:
//! 1. source `S` runs the dirtying test guest with `--dump-stream` (the capture of what it
//!    sent) and is brought into the scenario's hotplug state over QMP;
//! 2. destination `D` starts with `-S --incoming tcp:127.0.0.1:0`, gets the same devices by
//!    pre-start `device_add`, and `S` migrates to it;
//! 3. on `D` (paused: nothing ran there yet): `MIGRATION completed` event, connector states
//!    equal to `S`'s just before the migration (the pending-unplug remaining time checked
//!    against the machine type's rule), guest memory verified;
//! 4. `D` re-serialises with `migrate file:`: both that file and `S`'s capture must be accepted
//!    by the *committed* schema of the machine type (what a build from the day the type was
//!    frozen would accept), and their device sections must be equal field by field, volatile
//!    fields excepted;
//! 5. `migrate file:` leaves `D` postmigrate, so the guest runs on in `D2`, restored from
//!    exactly that re-serialisation (paused, its connectors and remaining times equal to
//!    `D`'s): it makes progress, the scenario's hotplug operation completes there with its
//!    event (DEVICE_DELETED, DEVICE_UNPLUG_GUEST_ERROR, a configured slot), no unexpected
//!    device event appears on either side, and the memory verifies.
//!
//! A refusal cell checks the exact error and that the source is unharmed (still running,
//! guest progressing, memory pattern intact).
//!
//! Nothing races the wall clock. The unplug timer counts guest-*running* time only
//! (`vmm/src/vm/hotplug.rs`: the clock stops in `pause` and restarts in `resume`), so:
//! - `unplug-timer` pauses the source *before* the `device_del`: the request is pending with
//!   exactly the source's whole timeout left and that number cannot change until a guest
//!   runs again. The paused guest migrates (the run state travels; `-S` keeps `D` paused),
//!   `D` and `D2` must show exactly the remaining time the machine type's rule gives, and the
//!   timer fires on `D2` after its `cont` (awaited as the DEVICE_UNPLUG_GUEST_ERROR event).
//!   The destinations are configured with a different timeout than the source, so "the
//!   remaining time travelled" (`unplug-timer` subsection, `ferry-1.1`+) and "the full timeout
//!   restarted" (`ferry-1.0`) are different numbers.
//! - Every other row uses an unplug timeout (10 min) longer than nextest lets a test live
//!   (`slow-timeout` 5 × 60 s in `.config/nextest.toml`) and than any bounded wait here, so a
//!   timer can never fire during such a cell; `unplug-pending` carries a pending unplug
//!   through a *live* migration with it, where the remaining time must travel (at most what
//!   the source showed before the migration, and not the destination's longer timeout) or
//!   restart in full, by the type's rule.
//! - A live migration's switchover is forced after a few pre-copy passes, so whether it
//!   converges under the downtime limit on a slow or loaded machine does not matter.
//! - Every wait is bounded (`ferry_tests::TIMEOUT`) and ends on what it waits for: an event,
//!   a state or the guest's progress (polled, with short sleeps only between the polls), and
//!   fails saying what did not happen.
//!
//! What the product itself does against the clock is not hidden: e.g. a destination whose
//! `__org.ferry_io-timeout` (10 s) runs out while a very slow source is still in its first
//! pass fails the cell with that error.
//!
//! Run as one process with more than one cell (`cargo test -p ferry-tests --test compat -- matrix::`, or
//! the test binary itself), the harness also prints the table (machine type × scenario -> ok /
//! refused-as-expected / FAILED) and writes it to `target/compat-matrix.md`.

use crate::streams::*;
use ferry_tests::*;
use libtest_mimic::{Failed, Trial};
use machine_types::MachineType;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

/// Unplug timeout of the timer row's source (guest-running ms; Precise rule 4: tests use
/// <= 1 s). The source is paused before the request, so this is exactly what it has left.
const TIMER_SRC_MS: u64 = 600;
/// Unplug timeout of the timer row's destinations (`D`, `D2`): different from the source's,
/// so a remaining time that travelled (600) cannot be mistaken for a restarted one (1000).
const TIMER_DST_MS: u64 = 1000;
/// Unplug timeout of every other row's source: longer than any cell may live (nextest ends
/// a test after 300 s), so it never fires during a cell.
const LONG_SRC_MS: u64 = 600_000;
/// ... and of their destinations (again different from the source's, as for the timer row).
const LONG_DST_MS: u64 = 660_000;
/// Pre-copy passes after which a live cell's switchover is forced (see `live_cell`).
const FORCE_AFTER_PASSES: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Nothing,
    CpuCore,
    MemBlock,
    PciSlot,
    PciHalf,
    UnplugPending,
    UnplugTimer,
    PrestartAdd,
    MachineMismatch,
    DeviceMismatch,
}

use Scenario::*;

const SCENARIOS: [Scenario; 10] = [
    Nothing,
    CpuCore,
    MemBlock,
    PciSlot,
    PciHalf,
    UnplugPending,
    UnplugTimer,
    PrestartAdd,
    MachineMismatch,
    DeviceMismatch,
];

impl Scenario {
    fn key(self) -> &'static str {
        match self {
            Nothing => "nothing",
            CpuCore => "cpu-core",
            MemBlock => "mem-block",
            PciSlot => "pci-slot",
            PciHalf => "pci-half",
            UnplugPending => "unplug-pending",
            UnplugTimer => "unplug-timer",
            PrestartAdd => "prestart-add",
            MachineMismatch => "machine-mismatch",
            DeviceMismatch => "device-mismatch",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Nothing => "nothing plugged",
            CpuCore => "CPU core plugged",
            MemBlock => "memory block plugged (refused where the type has no memory hotplug)",
            PciSlot => "multifunction PCI slot plugged (01.1, then 01.0)",
            PciHalf => "half-plugged multifunction slot (01.1, 01.2; function 0 added after)",
            UnplugPending => "unplug pending at a live migration (guest slow), completes after",
            UnplugTimer => {
                "unplug timer pending (guest ignores; paused source, clock frozen), fires after"
            }
            PrestartAdd => {
                "hot-plug still in flight (paused source), pre-start add on the destination"
            }
            MachineMismatch => "refusal: destination of another machine type",
            DeviceMismatch => "refusal: destination lacks a hot-plugged device",
        }
    }

    /// Unplug timeouts (guest-running ms) of the source and of the destinations.
    fn timeouts(self) -> (u64, u64) {
        if self == UnplugTimer {
            (TIMER_SRC_MS, TIMER_DST_MS)
        } else {
            (LONG_SRC_MS, LONG_DST_MS)
        }
    }
}

#[derive(Clone, Debug)]
enum Outcome {
    Ok(String),
    Refused(String),
    Failed(String),
}

fn core1() -> Value {
    json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1})
}
fn mem0() -> Value {
    json!({"driver": "ferry-mem-block", "id": "mem0", "slot": 0})
}
fn pci(id: &str, addr: &str, multifunction: bool) -> Value {
    if multifunction {
        json!({"driver": "ferry-pci-fn", "id": id, "addr": addr, "multifunction": true})
    } else {
        json!({"driver": "ferry-pci-fn", "id": id, "addr": addr})
    }
}

fn shape(m: &str, unplug_timeout_ms: u64) -> Vec<String> {
    strings(&[
        "--machine",
        m,
        "--memory",
        "64M",
        "--guest",
        "dirty:4",
        "--unplug-timeout-ms",
        &unplug_timeout_ms.to_string(),
    ])
}

fn configured(c: &Value) -> bool {
    c["state"]
        .as_str()
        .is_some_and(|s| s.ends_with("configured"))
}

/// The source is unharmed after a refusal: running, its guest progressing, memory intact,
/// and it runs on after the check.
fn source_unharmed(s: &mut Ferry) {
    s.settle();
    assert_eq!(s.status(), "running", "the source must still run");
    let p = s.pass();
    s.wait_pass(p + 1);
    let v = s.verify();
    s.ok("cont", json!({}));
    assert_eq!(s.status(), "running");
    let _ = v;
}

/// Connector fields that must travel unchanged (everything but the remaining time, which
/// follows the machine type's timer rule and is checked apart).
fn comparable(list: &[Value]) -> Vec<Value> {
    list.iter()
        .map(|c| {
            let mut c = c.clone();
            c.as_object_mut().unwrap().remove("remaining-ms");
            c
        })
        .collect()
}

fn connectors_diff(a: &[Value], b: &[Value]) -> String {
    let (a, b) = (comparable(a), comparable(b));
    let mut out = String::new();
    let mut seen = Vec::new();
    for c in a.iter().chain(&b) {
        let idx = c["index"].as_u64().unwrap_or_default();
        if seen.contains(&idx) {
            continue;
        }
        seen.push(idx);
        let x = a.iter().find(|y| y["index"] == idx);
        let y = b.iter().find(|y| y["index"] == idx);
        match (x, y) {
            (Some(x), Some(y)) if x != y => {
                let fields: Vec<String> = x
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, v)| y.get(k.as_str()) != Some(v))
                    .map(|(k, v)| format!("{k}: source {v}, destination {}", y[k.as_str()]))
                    .collect();
                let _ = writeln!(
                    out,
                    "  connector {idx:#010x} ({}): {}",
                    x["device"],
                    fields.join("; ")
                );
            }
            (Some(_), Some(_)) => {}
            _ => {
                let _ = writeln!(
                    out,
                    "  connector {idx:#010x}: source {x:?}, destination {y:?}"
                );
            }
        }
    }
    out
}

/// Remaining unplug time on the destination, by the machine type's rule (Precise rule 4):
/// with the `unplug-timer` subsection it is what the source had left, exactly that when the
/// source was paused (its clock frozen) and at most what we read just before a live
/// migration; without it the destination's own full timeout restarts.
fn check_remaining(
    m: &MachineType,
    before: &[Value],
    after: &[Value],
    dst_timeout: u64,
    source_running: bool,
) {
    for b in before.iter().filter(|c| c["unplug-pending"] == true) {
        let a = after
            .iter()
            .find(|c| c["index"] == b["index"])
            .unwrap_or_else(|| panic!("connector {} missing on the destination", b["index"]));
        let src = b["remaining-ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("source remaining-ms missing: {b}"));
        let dst = a["remaining-ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("destination remaining-ms missing: {a}"));
        assert_eq!(
            a["unplug-pending"],
            true,
            "{}: the pending unplug must travel: {a}",
            m.name()
        );
        if !m.compat().drc_unplug_timer {
            assert_eq!(
                dst,
                dst_timeout,
                "{}: no unplug-timer subsection, so the destination's full timeout \
                 ({dst_timeout} ms) restarts; source had {src} ms left",
                m.name()
            );
        } else if source_running {
            assert!(
                dst > 0 && dst <= src,
                "{}: the remaining time must travel (unplug-timer subsection): source had {src} \
                 ms left before the live migration, destination has {dst} ms (its own timeout \
                 is {dst_timeout} ms)",
                m.name()
            );
        } else {
            assert_eq!(
                dst,
                src,
                "{}: the remaining time must travel (unplug-timer subsection): the paused \
                 source had exactly {src} ms left (its guest-running clock stood still), \
                 destination has {dst} ms (its own timeout is {dst_timeout} ms)",
                m.name()
            );
        }
    }
}

/// Bring the source into the scenario's state; returns the devices the destination must add
/// before start.
fn setup(sc: Scenario, s: &mut Ferry) -> Vec<Value> {
    match sc {
        Nothing => vec![],
        CpuCore => {
            s.add(core1());
            s.wait_connector("core1", configured, "configure core1");
            vec![core1()]
        }
        MemBlock => {
            s.add(mem0());
            s.wait_connector("mem0", configured, "configure mem0");
            vec![mem0()]
        }
        PciSlot => {
            let devs = vec![pci("nic1", "01.1", false), pci("nic0", "01.0", true)];
            for d in &devs {
                s.add(d.clone());
            }
            s.wait_connector("nic0", configured, "configure nic0");
            s.wait_connector("nic1", configured, "configure nic1");
            devs
        }
        PciHalf => {
            let devs = vec![pci("nic1", "01.1", false), pci("nic2", "01.2", false)];
            for d in &devs {
                s.add(d.clone());
            }
            // Precise rule 12: the slot's events wait for function 0; let the guest run a few
            // passes to show it has nothing to configure yet.
            let p = s.pass();
            s.wait_pass(p + 2);
            for id in ["nic1", "nic2"] {
                let c = s.connector(id);
                assert!(
                    !configured(&c),
                    "{id} configured before function 0 was added: {c}"
                );
            }
            devs
        }
        UnplugPending => {
            s.add(core1());
            s.wait_connector("core1", configured, "configure core1");
            s.ok("__org.ferry_guest-hotplug", json!({"mode": "slow"}));
            s.del("core1");
            s.wait_connector("core1", |c| c["unplug-pending"] == true, "unplug request");
            vec![core1()]
        }
        UnplugTimer => {
            s.add(core1());
            s.wait_connector("core1", configured, "configure core1");
            s.ok("__org.ferry_guest-hotplug", json!({"mode": "ignore"}));
            // Freeze the guest-running clock first: the request then starts with the whole
            // timeout left and keeps exactly that until a guest runs again (on `D2`).
            s.ok("stop", json!({}));
            assert_eq!(s.status(), "paused", "the source must be paused");
            s.del("core1");
            let c = s.connector("core1");
            assert!(
                c["unplug-pending"] == true && c["remaining-ms"] == TIMER_SRC_MS,
                "a paused source's new unplug request must be pending with exactly its \
                 {TIMER_SRC_MS} ms timeout left: {c}"
            );
            vec![core1()]
        }
        PrestartAdd => {
            // Paused: the guest cannot serve the hotplug event, so the connector is mid-plug
            // (event queued) when the state is sent; the destination's pre-start add of the
            // same core must be reset and then overwritten by the source's state.
            s.ok("stop", json!({}));
            s.add(core1());
            let c = s.connector("core1");
            assert!(!configured(&c), "core1 must still be in flight: {c}");
            vec![core1()]
        }
        MachineMismatch | DeviceMismatch => unreachable!(),
    }
}

/// What must happen once the guest runs on after the migration (on `D2`, already running);
/// returns a note.
fn finish(sc: Scenario, m: &MachineType, d2: &mut Ferry, timer_left: Option<u64>) -> String {
    match sc {
        UnplugPending => {
            d2.ok("__org.ferry_guest-hotplug", json!({"answer": true}));
            d2.wait_event("DEVICE_DELETED", |x| x["device"] == "core1");
            "DEVICE_DELETED after the migration".into()
        }
        UnplugTimer => {
            // The guest ignores the request: only the timer can end it, after `timer_left`
            // ms of guest-running time on D2 (bounded by the wait's timeout).
            d2.wait_event("DEVICE_UNPLUG_GUEST_ERROR", |x| x["device"] == "core1");
            let c = d2.connector("core1");
            assert!(
                c["unplug-pending"] == false && c["unplug-timed-out"] == true,
                "after DEVICE_UNPLUG_GUEST_ERROR the unplug must have timed out: {c}"
            );
            // The error stands and a retry is possible once the guest cooperates.
            d2.ok("__org.ferry_guest-hotplug", json!({"mode": "cooperative"}));
            d2.del("core1");
            d2.wait_event("DEVICE_DELETED", |x| x["device"] == "core1");
            format!(
                "timer fired on the destination, where it started with {} left (source \
                 timeout {TIMER_SRC_MS} ms, destination {TIMER_DST_MS} ms: {}); retry completed",
                timer_left.map_or("?".into(), |l| format!("{l} ms")),
                if m.compat().drc_unplug_timer {
                    "remaining time travelled"
                } else {
                    "full timeout restarted"
                }
            )
        }
        PrestartAdd => {
            d2.wait_connector("core1", configured, "configure core1 after the migration");
            "guest configured the in-flight core after the migration".into()
        }
        PciHalf => {
            d2.add(pci("nic0", "01.0", true));
            for id in ["nic0", "nic1", "nic2"] {
                d2.wait_connector(id, configured, "configure the slot after function 0");
            }
            "function 0 added after the migration: whole slot configured".into()
        }
        CpuCore => {
            // A hot-added core must still be a working core: unplug it on the destination.
            d2.del("core1");
            d2.wait_event("DEVICE_DELETED", |x| x["device"] == "core1");
            "core unplugged after the migration".into()
        }
        PciSlot => {
            d2.del("nic0");
            d2.wait_event("DEVICE_DELETED", |x| x["device"] == "nic0");
            d2.wait_event("DEVICE_DELETED", |x| x["device"] == "nic1");
            "slot unplugged after the migration".into()
        }
        MemBlock => "block kept in the memory check".into(),
        Nothing => String::new(),
        MachineMismatch | DeviceMismatch => unreachable!(),
    }
}

fn live_cell(m: &'static MachineType, sc: Scenario) -> Outcome {
    let name = m.name();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (src_timeout, dst_timeout) = sc.timeouts();
    let capture = dir.join("src.stream");
    let mut sargs = shape(name, src_timeout);
    sargs.extend(strings(&["--dump-stream", &capture.display().to_string()]));
    let mut s = Ferry::spawn(dir, "src", &sargs);
    s.wait_pass(1);

    if sc == MemBlock && !m.compat().mem_hotplug {
        let want = format!("Memory hotplug is not supported by machine type '{name}'");
        let e = s.err("device_add", mem0());
        assert!(e.contains(&want), "source device_add: {e}");
        assert!(
            s.connectors().iter().all(|c| c["device"] != "mem0"),
            "a refused device_add must change nothing"
        );
        // The destination refuses it before start too.
        let mut dargs = shape(name, dst_timeout);
        dargs.extend(strings(&["-S", "--incoming", "tcp:127.0.0.1:0"]));
        let mut d = Ferry::spawn(dir, "dst", &dargs);
        let e2 = d.err("device_add", mem0());
        assert!(e2.contains(&want), "destination pre-start device_add: {e2}");
        source_unharmed(&mut s);
        return Outcome::Refused(e);
    }

    let devices = setup(sc, &mut s);
    let source_running = s.status() == "running";

    let mut dargs = shape(name, dst_timeout);
    dargs.extend(strings(&["-S", "--incoming", "tcp:127.0.0.1:0"]));
    let mut d = Ferry::spawn(dir, "dst", &dargs);
    d.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    for dev in &devices {
        d.add(dev.clone());
    }
    let port = d.incoming_port();

    // Whether pre-copy converges within the downtime limit depends on how fast this machine
    // copies pages against the guest's dirty rate (a loaded 2-core machine may never get the
    // memory block's 16 MiB plus the working set under 300 ms). That race is not what the
    // matrix is about: after a few pre-copy passes the switchover is forced, so a live
    // migration completes whatever the speed.
    s.ok(
        "migrate-set-parameters",
        json!({
            "__org.ferry_max-iterations": FORCE_AFTER_PASSES,
            "__org.ferry_switchover-policy": "force",
        }),
    );
    let before = s.connectors();
    let t0 = Instant::now();
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(
        info["status"],
        "completed",
        "the migration must complete: {info}\nsource log:\n{}\ndestination log:\n{}",
        read(&s.log),
        read(&d.log)
    );
    let dinfo = d.wait_migration(&["completed", "failed"]);
    assert_eq!(dinfo["status"], "completed", "destination: {dinfo}");
    let migrate_ms = t0.elapsed().as_millis();
    assert_eq!(s.status(), "postmigrate");
    d.wait_event("MIGRATION", |x| x["status"] == "completed");
    d.settle();
    assert_eq!(d.status(), "paused", "-S keeps the destination paused");

    // Connector states travelled (remaining time by the machine type's rule). A difference
    // is recorded and the cell goes on, so one run shows everything that breaks.
    let mut problems: Vec<String> = Vec::new();
    let after = d.connectors();
    let diff = connectors_diff(&before, &after);
    if !diff.is_empty() {
        problems.push(format!(
            "connector states differ after the migration:\n{diff}"
        ));
    }
    check_remaining(m, &before, &after, dst_timeout, source_running);
    let v = d.ok("__org.ferry_verify-guest", json!({}));
    assert_eq!(v["ok"], true, "memory after the migration: {v}");
    if sc == MemBlock {
        assert_eq!(v["blocks"], 1, "the hot-plugged block is verified too: {v}");
    }

    // The destination's re-serialisation before it ever ran, against the source's capture.
    let reser = dir.join("dst-reserialised.stream");
    d.save(&reser);
    let frozen = committed_schema(name);
    frozen_read(&capture, &frozen).unwrap_or_else(|e| panic!("source capture: {e}"));
    frozen_read(&reser, &frozen).unwrap_or_else(|e| panic!("destination re-serialisation: {e}"));
    let sd = diff_streams(&frozen, &capture, &reser, source_running);
    assert!(
        sd.is_equal(),
        "source capture vs destination re-serialisation:\n  {}",
        sd.differences.join("\n  ")
    );

    // The guest runs on from exactly what the destination loaded.
    let mut d2args = shape(name, dst_timeout);
    d2args.extend(strings(&["--incoming", "defer"]));
    let mut d2 = Ferry::spawn(dir, "dst-continued", &d2args);
    for dev in &devices {
        d2.add(dev.clone());
    }
    d2.ok(
        "migrate-incoming",
        json!({"uri": format!("file:{}", reser.display())}),
    );
    let i2 = d2.wait_migration(&["completed", "failed"]);
    assert_eq!(i2["status"], "completed", "{i2}\n{}", read(&d2.log));
    d2.settle();
    assert_eq!(d2.status(), "paused");
    let resumed = d2.connectors();
    let cont_diff = connectors_diff(&after, &resumed);
    assert!(cont_diff.is_empty(), "continuation differs:\n{cont_diff}");
    // Both paused, neither ran the guest: a pending unplug has exactly D's remaining time
    // (it travelled) or D2's full timeout (which is D's: same configuration).
    check_remaining(m, &after, &resumed, dst_timeout, false);
    let timer_left = resumed
        .iter()
        .find(|c| c["device"] == "core1" && c["unplug-pending"] == true)
        .and_then(|c| c["remaining-ms"].as_u64());
    if sc == UnplugTimer {
        let want = if m.compat().drc_unplug_timer {
            TIMER_SRC_MS
        } else {
            TIMER_DST_MS
        };
        assert_eq!(
            timer_left,
            Some(want),
            "{name}: the timer must start on the destination with {want} ms left ({})",
            if m.compat().drc_unplug_timer {
                "what the paused source had: unplug-timer subsection"
            } else {
                "no unplug-timer subsection: the destination's full timeout"
            }
        );
    }
    d2.ok("cont", json!({}));
    let p = d2.pass();
    d2.wait_pass(p + 2);
    let note = finish(sc, m, &mut d2, timer_left);
    let p = d2.pass();
    d2.wait_pass(p + 1);
    let unexpected = d2.device_events();
    assert!(
        unexpected.is_empty(),
        "unexpected device events after the migration: {unexpected:?}"
    );
    let _ = s.status(); // collect the source's pending events
    let src_events = s.device_events();
    assert!(
        src_events.is_empty(),
        "the source must report no device events after handing the guest over: \
         {src_events:?} (migration: {info})\nsource log:\n{}",
        read(&s.log)
    );
    let v = d2.verify();
    if sc == MemBlock {
        assert_eq!(v["blocks"], 1, "{v}");
    }
    assert!(
        problems.is_empty(),
        "{}\n(the rest of the cell passed: {note})",
        problems.join("\n")
    );
    let vol = sd.volatile.len();
    Outcome::Ok(format!(
        "migrated {} in {migrate_ms} ms; {vol} volatile difference(s); {}",
        if source_running { "live" } else { "paused" },
        if note.is_empty() {
            "guest ran on".to_string()
        } else {
            note
        }
    ))
}

fn refusal_cell(m: &'static MachineType, sc: Scenario) -> Outcome {
    let name = m.name();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (src_timeout, dst_timeout) = sc.timeouts();
    let mut s = Ferry::spawn(dir, "src", &shape(name, src_timeout));
    s.wait_pass(1);
    s.add(core1());
    s.wait_connector("core1", configured, "configure core1");
    let all = machine_types::all();
    let (dst_machine, dst_devices, want) = match sc {
        MachineMismatch => {
            let i = all.iter().position(|x| x.name() == name).unwrap();
            let other = all[(i + 1) % all.len()].name();
            (
                other,
                vec![core1()],
                format!("machine type: source {name}, destination {other}"),
            )
        }
        DeviceMismatch => (
            name,
            vec![],
            "connector 0x10000001: source has ferry-cpu-core 'core1', destination has nothing"
                .to_string(),
        ),
        _ => unreachable!(),
    };
    let mut dargs = shape(dst_machine, dst_timeout);
    dargs.extend(strings(&["-S", "--incoming", "tcp:127.0.0.1:0"]));
    let mut d = Ferry::spawn(dir, "dst", &dargs);
    for dev in dst_devices {
        d.add(dev);
    }
    let port = d.incoming_port();
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "failed", "must be refused: {info}");
    let desc = info["error-desc"].as_str().unwrap_or_default().to_owned();
    assert!(
        desc.starts_with("Destination refused the migration: ") && desc.contains(&want),
        "unclear refusal: {desc:?}, want it to name {want:?}"
    );
    assert_eq!(
        d.status(),
        "inmigrate",
        "the destination loaded nothing and keeps waiting"
    );
    source_unharmed(&mut s);
    assert!(
        configured(&s.connector("core1")),
        "the source's connector is untouched"
    );
    Outcome::Refused(desc)
}

fn cell(m: &'static MachineType, sc: Scenario) -> Outcome {
    match sc {
        MachineMismatch | DeviceMismatch => refusal_cell(m, sc),
        _ => live_cell(m, sc),
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "panic".into()
    }
}

/// Outcomes of the cells this process ran, for the table.
type Results = Mutex<Vec<(&'static str, Scenario, Outcome, u128)>>;
static RESULTS: Results = Mutex::new(Vec::new());

/// One cell as a test: a panic anywhere in it fails it with the panic's text.
fn run_cell(m: &'static MachineType, sc: Scenario) -> Result<(), Failed> {
    require_kvm();
    let t = Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cell(m, sc)))
        .unwrap_or_else(|p| Outcome::Failed(panic_text(p)));
    let ms = t.elapsed().as_millis();
    eprintln!("matrix {}::{}: {r:?} ({ms} ms)", m.name(), sc.key());
    RESULTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((m.name(), sc, r.clone(), ms));
    match r {
        Outcome::Failed(t) => Err(format!("{}::{} FAILED:\n{t}", m.name(), sc.key()).into()),
        Outcome::Ok(_) | Outcome::Refused(_) => Ok(()),
    }
}

/// Machine types, oldest first, as a reader expects the table.
fn machines() -> Vec<&'static MachineType> {
    machine_types::all().iter().rev().collect()
}

/// The markdown table of the cells this process ran (`-` for the others).
fn table(results: &[(&'static str, Scenario, Outcome, u128)], total_s: f64) -> String {
    let machines = machines();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| scenario | {} |",
        machines
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(machines.len()));
    for sc in SCENARIOS {
        let cells: Vec<&str> = machines
            .iter()
            .map(
                |m| match results.iter().find(|r| r.0 == m.name() && r.1 == sc) {
                    None => "-",
                    Some((_, _, Outcome::Ok(_), _)) => "ok",
                    Some((_, _, Outcome::Refused(_), _)) => "refused-as-expected",
                    Some((_, _, Outcome::Failed(_), _)) => "**FAILED**",
                },
            )
            .collect();
        let _ = writeln!(
            md,
            "| `{}`: {} | {} |",
            sc.key(),
            sc.describe(),
            cells.join(" | ")
        );
    }
    let _ = writeln!(
        md,
        "\n{} cells in {total_s:.1} s (debug build, 64 MiB guests dirtying 4 MiB, migration over loopback TCP).\n",
        results.len()
    );
    let _ = writeln!(md, "<details><summary>Per cell</summary>\n");
    for (m, sc, r, ms) in results {
        let (kind, text) = match r {
            Outcome::Ok(t) => ("ok", t),
            Outcome::Refused(t) => ("refused-as-expected", t),
            Outcome::Failed(t) => ("FAILED", t),
        };
        let text = text.lines().next().unwrap_or_default();
        let _ = writeln!(md, "- {m} `{}` {kind} ({ms} ms): {text}", sc.key());
    }
    let _ = writeln!(md, "\n</details>");
    md
}

/// One trial per cell, named `matrix::MACHINE::SCENARIO`.
pub fn trials() -> Vec<Trial> {
    machines()
        .into_iter()
        .flat_map(|m| {
            SCENARIOS.map(|sc| {
                Trial::test(format!("matrix::{}::{}", m.name(), sc.key()), move || {
                    run_cell(m, sc)
                })
            })
        })
        .collect()
}

/// When this process ran more than one cell: prints the table and writes it to
/// `target/compat-matrix.md`.
pub fn write_table(started: Instant) {
    let results = std::mem::take(&mut *RESULTS.lock().unwrap_or_else(|p| p.into_inner()));
    if results.len() > 1 {
        let md = table(&results, started.elapsed().as_secs_f64());
        let out = bins::target_dir().join("compat-matrix.md");
        std::fs::write(&out, &md).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        println!("\n{md}\n(written to {})", out.display());
    }
}
