//! Cross-module scenarios: a source hotplug manager in the middle of hotplug/unplug
//! transitions, saved through devstate streams for every machine type and loaded by a
//! destination built as the VMM builds it (pre-start device_add, reset, load).

#[path = "common/mod.rs"]
mod common;

use common::*;
use ferry_hotplug::{
    Connector, DeviceProps, DrIndicator, DrcState, Effect, Event, GuestEventKind, GuestOp,
    HotplugManager, Outcome, RtasError, RunPhase,
};

fn cpu(core: u32) -> DeviceProps {
    DeviceProps {
        core_id: Some(core),
        ..Default::default()
    }
}

fn pci(addr: &str, multifunction: bool) -> DeviceProps {
    DeviceProps {
        addr: Some(addr.into()),
        multifunction: Some(multifunction),
        ..Default::default()
    }
}

/// A busy source at guest-running time 300:
/// - cpu0 configured (reset state), cpu1 configured + device_del at t=100 (pending),
///   cpu2 hot-added, event not yet fetched;
/// - PCI slot 1: f1 + f0 (multifunction), f0 configured, f1 half-way through
///   configure-connector, f0's indicator set to IDENTIFY;
/// - the controller mid-operation (selector/arg written).
fn busy_source(machine_name: &str) -> HotplugManager {
    let mut m = HotplugManager::new(config(), machine(machine_name)).unwrap();
    for c in [0, 1] {
        m.device_add(
            "ferry-cpu-core",
            &format!("cpu{c}"),
            &cpu(c),
            RunPhase::Started,
        )
        .unwrap();
    }
    m.device_add("ferry-pci-fn", "f1", &pci("01.1", false), RunPhase::Started)
        .unwrap();
    m.device_add("ferry-pci-fn", "f0", &pci("01.0", true), RunPhase::Started)
        .unwrap();
    while m.pop_event().is_some() {}
    for i in [0x1000_0000, 0x1000_0001, 0x4000_0008] {
        guest_configure(&mut m, i);
    }
    m.guest_op(0x4000_0009, GuestOp::UNISOLATE).unwrap();
    m.guest_op(0x4000_0009, GuestOp::ConfigureConnector)
        .unwrap();
    m.guest_op(0x4000_0009, GuestOp::ConfigureConnector)
        .unwrap();
    m.guest_op(0x4000_0008, GuestOp::dr_indicator(DrIndicator::Identify))
        .unwrap();
    m.device_del("cpu1", 100).unwrap();
    m.device_add("ferry-cpu-core", "cpu2", &cpu(2), RunPhase::Started)
        .unwrap();
    m.pio_write(0x08, &0x1000_0002u32.to_le_bytes());
    m.pio_write(0x0c, &1u32.to_le_bytes());
    m.drain_effects();
    m.drain_events();
    m.check_invariants().unwrap();
    m
}

/// (state, device, unplug pending, timed out, release pending, indicator, cursor)
type View = (DrcState, Option<String>, bool, bool, bool, DrIndicator, u8);

fn view(c: &Connector) -> View {
    (
        c.state(),
        c.device_id().map(str::to_owned),
        c.unplug_requested(),
        c.unplug_timed_out(),
        c.release_pending(),
        c.dr_indicator(),
        c.cc_cursor(),
    )
}

#[test]
fn ferry_2_0_destination_equals_source() {
    let src = busy_source("ferry-2.0");
    let dst = migrate(&src, 300, 5000);
    for (s, d) in src.connectors().zip(dst.connectors()) {
        assert_eq!(view(s), view(d), "{:#010x}", s.index());
        assert_eq!(
            s.remaining_ms(300),
            d.remaining_ms(5000),
            "{:#010x}",
            s.index()
        );
    }
    assert_eq!(src.events(), dst.events());
    assert_eq!(src.controller(), dst.controller());
    assert_eq!(
        dst.events()
            .iter()
            .map(|e| (e.index, e.kind))
            .collect::<Vec<_>>(),
        [
            (0x1000_0001, GuestEventKind::Unplug),
            (0x1000_0002, GuestEventKind::Hotplug)
        ]
    );
    // the destination raises the interrupt for the migrated queue
    let mut dst = dst;
    assert!(dst.take_irq());
}

#[test]
fn per_machine_type_sections_on_the_wire() {
    for (name, version, timer) in [
        ("ferry-1.0", 1, false),
        ("ferry-1.1", 1, true),
        ("ferry-2.0", 2, true),
    ] {
        let src = busy_source(name);
        let stream = save_stream(&src, 300);
        let mut dst = destination(&src, false);
        let seen = load_stream(&mut dst, &stream, 0).unwrap();
        let conns: Vec<(u32, u32, usize)> = seen
            .iter()
            .filter(|s| s.0 == "connector")
            .map(|s| (s.1, s.2, s.3))
            .collect();
        // cpu0 is at its reset state: never sent. cpu1 (unplug pending), cpu2 (hot-added),
        // f1 (mid-configure) always; f0 (configured, indicator IDENTIFY) only by v2.
        let mut want = vec![
            (0x1000_0001, version, usize::from(timer)),
            (0x1000_0002, version, 0),
        ];
        if version == 2 {
            want.push((0x4000_0008, 2, 0));
        }
        want.push((0x4000_0009, version, 0));
        assert_eq!(conns, want, "{name}");
        assert!(seen.iter().any(|s| s.0 == "hotplug-events"));
        assert!(seen.iter().any(|s| s.0 == "hotplug-controller"));
        let cpu1 = dst.connector(0x1000_0001).unwrap();
        // 1.1/2.0: 800 ms left travel; 1.0: the full timeout restarts at the destination
        let left = if timer { 800 } else { T };
        assert_eq!(cpu1.remaining_ms(0), Some(left), "{name}");
        // v1 loses the v2-only fields: reset values on the destination
        let f1 = dst.connector(0x4000_0009).unwrap();
        let f0 = dst.connector(0x4000_0008).unwrap();
        if version == 1 {
            assert_eq!(
                (f1.state(), f1.cc_cursor()),
                (DrcState::PhysicalUnisolate, 0)
            );
            assert_eq!(f0.dr_indicator(), DrIndicator::Active);
        } else {
            assert_eq!(f1.cc_cursor(), 2);
            assert_eq!(f0.dr_indicator(), DrIndicator::Identify);
        }
        for i in [0x1000_0000, 0x1000_0002] {
            assert_eq!(
                view(src.connector(i).unwrap()),
                view(dst.connector(i).unwrap()),
                "{name} {i:#x}"
            );
        }
        assert_eq!(src.events(), dst.events());
    }
}

#[test]
fn incoming_reset_is_what_makes_the_destination_right() {
    let src = busy_source("ferry-1.0");
    let stream = save_stream(&src, 300);
    let mut dst = destination(&src, true); // x-skip-incoming-reset
    load_stream(&mut dst, &stream, 0).unwrap();
    // cpu0 (not sent) stays where the pre-start hot-add path left it: unusable, and the
    // destination queue held stale hotplug events until the migrated queue replaced it.
    assert_eq!(
        dst.connector(0x1000_0000).unwrap().state(),
        DrcState::LogicalUnusable
    );
    assert_ne!(
        view(src.connector(0x1000_0000).unwrap()),
        view(dst.connector(0x1000_0000).unwrap())
    );
    let ok = migrate(&src, 300, 0);
    assert_eq!(
        view(src.connector(0x1000_0000).unwrap()),
        view(ok.connector(0x1000_0000).unwrap())
    );
}

#[test]
fn destination_queue_is_replaced_not_appended() {
    let mut src = busy_source("ferry-2.0");
    while src.pop_event().is_some() {}
    // the source queue is empty: no section; the reset alone empties the destination queue
    let dst = migrate(&src, 300, 0);
    assert!(dst.events().is_empty());
    // and when the source has events, exactly those arrive
    let src = busy_source("ferry-2.0");
    let dst = migrate(&src, 300, 0);
    assert_eq!(dst.events().len(), 2);
}

#[test]
fn unplug_completed_during_migration_is_release_pending_on_every_type() {
    for name in ["ferry-1.0", "ferry-1.1", "ferry-2.0"] {
        let mut src = busy_source(name);
        src.set_migration_in_progress(true);
        assert_eq!(
            src.guest_op(0x1000_0001, GuestOp::ISOLATE),
            Ok(Outcome::Done)
        );
        assert_eq!(
            src.guest_op(0x1000_0001, GuestOp::SET_UNUSABLE),
            Ok(Outcome::UnplugCompleted)
        );
        assert!(
            src.drain_events().is_empty(),
            "no DEVICE_DELETED on the source"
        );
        let mut dst = migrate(&src, 300, 0);
        let c = dst.connector(0x1000_0001).unwrap();
        assert!(
            c.release_pending() && c.device_id() == Some("cpu1"),
            "{name}"
        );
        assert_eq!(c.state(), DrcState::LogicalUnusable);
        // the destination resumes the guest: teardown and DEVICE_DELETED happen there
        dst.set_migration_in_progress(false);
        assert_eq!(dst.complete_pending_releases(), 1);
        assert_eq!(
            dst.drain_events(),
            [Event::DeviceDeleted {
                device: "cpu1".into(),
                path: "/machine/peripheral/cpu1".into()
            }]
        );
        assert!(
            dst.drain_effects()
                .iter()
                .any(|e| matches!(e, Effect::TearDown { device, .. } if device == "cpu1"))
        );
        // a failed migration: the source resumes and releases instead
        src.set_migration_in_progress(false);
        assert_eq!(src.complete_pending_releases(), 1);
        assert_eq!(src.drain_events().len(), 1);
    }
}

#[test]
fn timed_out_unplug_survives_migration_and_late_isolate_fails() {
    for name in ["ferry-1.0", "ferry-1.1", "ferry-2.0"] {
        let mut src = busy_source(name);
        src.tick(100 + T);
        assert_eq!(src.drain_events().len(), 1);
        let mut dst = migrate(&src, 100 + T, 0);
        assert!(
            dst.connector(0x1000_0001).unwrap().unplug_timed_out(),
            "{name}"
        );
        assert_eq!(
            dst.guest_op(0x1000_0001, GuestOp::ISOLATE),
            Err(RtasError::HwError)
        );
        // retry on the destination works
        dst.set_migration_in_progress(false);
        dst.device_del("cpu1", 0).unwrap();
        assert!(dst.connector(0x1000_0001).unwrap().unplug_requested());
    }
}

#[test]
fn pending_unplug_times_out_on_the_destination() {
    for (name, left) in [("ferry-1.0", T), ("ferry-1.1", 800), ("ferry-2.0", 800)] {
        let src = busy_source(name);
        let mut dst = migrate(&src, 300, 50);
        dst.set_migration_in_progress(false);
        dst.tick(50 + left - 1);
        assert!(dst.drain_events().is_empty(), "{name}");
        dst.tick(50 + left);
        assert_eq!(
            dst.drain_events(),
            [Event::UnplugGuestError {
                device: "cpu1".into(),
                path: "/machine/peripheral/cpu1".into()
            }],
            "{name}"
        );
    }
}

#[test]
fn mismatched_destinations_are_refused_clearly() {
    let src = busy_source("ferry-2.0");
    let stream = save_stream(&src, 300);
    // destination forgot cpu1
    let mut dst = HotplugManager::new(config(), src.machine()).unwrap();
    dst.device_add("ferry-cpu-core", "cpu2", &cpu(2), RunPhase::InMigrate)
        .unwrap();
    dst.reset_all();
    let err = load_stream(&mut dst, &stream, 0).unwrap_err();
    assert_eq!(
        err,
        "Incoming connector state refused: connector 0x10000001: device 'cpu1' is attached on the source but not here; add it with device_add before the incoming migration starts"
    );
    // destination with fewer CPU slots
    let mut small = config();
    small.cpu_cores = 1;
    let mut dst = HotplugManager::new(small, src.machine()).unwrap();
    let err = load_stream(&mut dst, &stream, 0).unwrap_err();
    assert!(err.starts_with("Unknown connector 0x10000001"), "{err}");
}

#[test]
fn prelaunch_vm_resets_before_first_cont() {
    let mut m = HotplugManager::new(config(), machine("ferry-2.0")).unwrap();
    m.device_add("ferry-cpu-core", "cpu0", &cpu(0), RunPhase::Prelaunch)
        .unwrap();
    m.device_add(
        "ferry-pci-fn",
        "f0",
        &pci("00.0", false),
        RunPhase::Prelaunch,
    )
    .unwrap();
    assert!(m.needs_reset_before_start());
    m.reset_all();
    assert!(m.connectors().all(Connector::at_reset_state));
    assert!(m.events().is_empty());
    // nothing transitional: no connector section for any machine type
    for name in ["ferry-1.0", "ferry-1.1", "ferry-2.0"] {
        let mut m2 = HotplugManager::new(config(), machine(name)).unwrap();
        m2.device_add("ferry-cpu-core", "cpu0", &cpu(0), RunPhase::Prelaunch)
            .unwrap();
        m2.reset_all();
        assert!(m2.encode_sections(machine(name), 0).is_empty(), "{name}");
    }
}
