//! The manager end to end: management operations, guest operations through the ports,
//! timeouts, reset, migration flags, queries.

use super::*;
use crate::connector::{BusyReason, Outcome};
use crate::controller::{op, reg};
use crate::events::{EVENT_QUEUE_CAPACITY, GuestEvent, GuestEventKind};
use crate::papr::{DrcState, GuestOp, RtasError};

const T: u64 = 1000; // unplug timeout used by the tests

fn mgr(machine: &str) -> HotplugManager {
    let cfg = HotplugConfig {
        cpu_cores: 4,
        mem_blocks: 4,
        pci_slots: 2,
        unplug_timeout_ms: T,
        ..Default::default()
    };
    HotplugManager::new(cfg, MachineType::lookup(machine).unwrap()).unwrap()
}

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

fn mem(slot: u32) -> DeviceProps {
    DeviceProps {
        slot: Some(slot),
        ..Default::default()
    }
}

/// Drive the guest side of a hot-add on `index` to CONFIGURED.
fn guest_configure(m: &mut HotplugManager, index: u32) {
    let logical = !ConnectorKind::from_index(index).unwrap().0.is_physical();
    if logical {
        m.guest_op(index, GuestOp::SET_USABLE).unwrap();
    }
    m.guest_op(index, GuestOp::UNISOLATE).unwrap();
    while m.guest_op(index, GuestOp::ConfigureConnector).unwrap() != Outcome::Configured {}
}

fn guest_release(m: &mut HotplugManager, index: u32) -> Result<Outcome, RtasError> {
    let r = m.guest_op(index, GuestOp::ISOLATE)?;
    if ConnectorKind::from_index(index).unwrap().0.is_physical() {
        Ok(r)
    } else {
        m.guest_op(index, GuestOp::SET_UNUSABLE)
    }
}

fn deleted(id: &str) -> Event {
    Event::DeviceDeleted {
        device: id.into(),
        path: format!("/machine/peripheral/{id}"),
    }
}

fn guest_error(id: &str) -> Event {
    Event::UnplugGuestError {
        device: id.into(),
        path: format!("/machine/peripheral/{id}"),
    }
}

/// Running VM with cpu1 configured.
fn running_with_cpu1() -> HotplugManager {
    let mut m = mgr("ferry-2.0");
    m.device_add("ferry-cpu-core", "cpu1", &cpu(1), RunPhase::Started)
        .unwrap();
    assert_eq!(m.pop_event().unwrap().index, 0x1000_0001);
    guest_configure(&mut m, 0x1000_0001);
    m.drain_effects();
    m.take_irq();
    m
}

#[test]
fn hot_add_cpu_queues_event_irq_and_effects() {
    let mut m = mgr("ferry-2.0");
    m.device_add("ferry-cpu-core", "cpu1", &cpu(1), RunPhase::Started)
        .unwrap();
    assert!(m.take_irq());
    assert!(!m.take_irq());
    assert!(!m.needs_reset_before_start());
    assert_eq!(
        m.events().iter().copied().collect::<Vec<_>>(),
        [GuestEvent {
            index: 0x1000_0001,
            kind: GuestEventKind::Hotplug
        }]
    );
    assert_eq!(
        m.drain_effects(),
        [Effect::CreateVcpu {
            device: "cpu1".into(),
            core: 1
        }]
    );
    guest_configure(&mut m, 0x1000_0001);
    assert_eq!(
        m.drain_effects(),
        [Effect::Configured {
            device: "cpu1".into(),
            resource: Resource::CpuCore { core: 1 }
        }]
    );
    m.check_invariants().unwrap();
}

#[test]
fn refused_adds_change_nothing() {
    let mut m = running_with_cpu1();
    m.device_add(
        "ferry-pci-fn",
        "nic0",
        &pci("01.0", false),
        RunPhase::Started,
    )
    .unwrap();
    guest_configure(&mut m, 0x4000_0008);
    m.device_del("nic0", 0).unwrap();
    m.device_add("ferry-pci-fn", "f1", &pci("00.1", false), RunPhase::Started)
        .unwrap();
    let cases: Vec<(&str, &str, DeviceProps, String)> = vec![
        ("ferry-cpu-core", "cpu1", cpu(2), "Duplicate device ID 'cpu1'".into()),
        ("ferry-cpu-core", "cpuX", cpu(1), "CPU core 1 is already occupied by device 'cpu1'".into()),
        ("ferry-disk", "d0", cpu(1), "'ferry-disk' is not a valid device model name".into()),
        ("ferry-cpu-core", "", cpu(2), "Parameter 'id' is missing".into()),
        ("ferry-cpu-core", "9x", cpu(2), "Parameter 'id' expects an identifier (a letter, then letters, digits, '-', '.' or '_', at most 64 characters), got '9x'".into()),
        ("ferry-cpu-core", "c", DeviceProps::default(), "Parameter 'core-id' is missing ('ferry-cpu-core' requires it)".into()),
        ("ferry-cpu-core", "c", DeviceProps { slot: Some(1), ..cpu(2) }, "Property 'ferry-cpu-core.slot' not found".into()),
        ("ferry-cpu-core", "c", cpu(4), "core-id 4 is out of range (0-3)".into()),
        ("ferry-mem-block", "m", mem(9), "Memory slot 9 is out of range (0-3)".into()),
        ("ferry-pci-fn", "p", pci("zz", false), "Property 'ferry-pci-fn.addr' doesn't take value 'zz'".into()),
        ("ferry-pci-fn", "p", pci("00.8", false), "Property 'ferry-pci-fn.addr' doesn't take value '00.8'".into()),
        ("ferry-pci-fn", "p", pci("05.0", false), "PCI: slot 05 is not a hotplug slot (slots 00-01)".into()),
        ("ferry-pci-fn", "p", pci("01.0", false), "Hot-plug failed: connector 0x40000008 is busy (unplug pending); retry later".into()),
        ("ferry-pci-fn", "p", pci("00.0", false), "PCI: 00.0 indicates single function, but 00.1 is already populated".into()),
    ];
    for (driver, id, props, want) in cases {
        let before = m.clone();
        let err = m
            .device_add(driver, id, &props, RunPhase::Started)
            .unwrap_err();
        assert_eq!(err.to_string(), want);
        assert_eq!(m, before, "{want}");
    }
    let err = m.device_add("ferry-pci-fn", "p", &pci("01.0", false), RunPhase::Started);
    assert!(err.unwrap_err().is_transient());
    // memory hotplug is not offered by ferry-1.x
    for name in ["ferry-1.0", "ferry-1.1"] {
        let mut m = mgr(name);
        let before = m.clone();
        let err = m.device_add("ferry-mem-block", "m0", &mem(0), RunPhase::Started);
        assert_eq!(
            err.unwrap_err().to_string(),
            format!("Memory hotplug is not supported by machine type '{name}'")
        );
        assert_eq!(m, before);
    }
    // migration in progress
    let mut m = running_with_cpu1();
    m.set_migration_in_progress(true);
    let before = m.clone();
    let e = m.device_add("ferry-cpu-core", "cpu2", &cpu(2), RunPhase::Started);
    assert_eq!(
        e.unwrap_err().to_string(),
        "device_add not allowed while migrating"
    );
    let e = m.device_del("cpu1", 0);
    assert_eq!(
        e.unwrap_err().to_string(),
        "device_del not allowed while migrating"
    );
    assert_eq!(m, before);
}

#[test]
fn busy_while_blinking_or_configuring() {
    let mut m = mgr("ferry-2.0");
    m.guest_op(
        0x4000_0008,
        GuestOp::dr_indicator(crate::DrIndicator::Action),
    )
    .unwrap();
    let before = m.clone();
    let e = m
        .device_add("ferry-pci-fn", "p", &pci("01.0", false), RunPhase::Started)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Hot-plug failed: connector 0x40000008 is busy (indicator blinking); retry later"
    );
    assert_eq!(m, before);
    // a function of the slot blinking blocks function 0
    m.guest_op(
        0x4000_0008,
        GuestOp::dr_indicator(crate::DrIndicator::Inactive),
    )
    .unwrap();
    m.device_add("ferry-pci-fn", "f3", &pci("1.3", false), RunPhase::Started)
        .unwrap();
    m.guest_op(
        0x4000_000b,
        GuestOp::dr_indicator(crate::DrIndicator::Identify),
    )
    .unwrap();
    let before = m.clone();
    let e = m.device_add("ferry-pci-fn", "f0", &pci("1", true), RunPhase::Started);
    assert!(matches!(
        e,
        Err(HotplugError::Busy {
            index: 0x4000_000b,
            reason: BusyReason::IndicatorBlinking
        })
    ));
    assert_eq!(m, before);
}

#[test]
fn event_queue_full_is_transient_and_changes_nothing() {
    let cfg = HotplugConfig {
        cpu_cores: 70,
        ..Default::default()
    };
    let mut m = HotplugManager::new(cfg, machine_types::newest()).unwrap();
    for i in 0..EVENT_QUEUE_CAPACITY as u32 {
        m.device_add(
            "ferry-cpu-core",
            &format!("c{i}"),
            &cpu(i),
            RunPhase::Started,
        )
        .unwrap();
    }
    let before = m.clone();
    let e = m
        .device_add("ferry-cpu-core", "late", &cpu(65), RunPhase::Started)
        .unwrap_err();
    assert!(e.is_transient());
    assert_eq!(
        e.to_string(),
        "Hot-plug failed: guest event queue is full (64 events pending); retry later"
    );
    assert_eq!(m, before);
}

#[test]
fn multifunction_ordering_and_slot_unplug() {
    let mut m = mgr("ferry-2.0");
    m.device_add("ferry-pci-fn", "f2", &pci("01.2", false), RunPhase::Started)
        .unwrap();
    m.device_add("ferry-pci-fn", "f1", &pci("01.1", false), RunPhase::Started)
        .unwrap();
    assert!(
        m.events().is_empty(),
        "non-zero functions wait for function 0"
    );
    assert!(!m.take_irq());
    m.device_add("ferry-pci-fn", "f0", &pci("01.0", true), RunPhase::Started)
        .unwrap();
    let idx: Vec<u32> = m.events().iter().map(|e| e.index).collect();
    assert_eq!(idx, [0x4000_0008, 0x4000_0009, 0x4000_000a]);
    assert!(m.take_irq());
    // a function after function 0 is refused
    let before = m.clone();
    let e = m.device_add("ferry-pci-fn", "f3", &pci("01.3", false), RunPhase::Started);
    assert_eq!(
        e.unwrap_err().to_string(),
        "PCI: slot 01 function 0 already occupied by 'f0', additional functions can no longer be exposed to guest"
    );
    assert_eq!(m, before);
    while m.pop_event().is_some() {}
    for i in idx {
        guest_configure(&mut m, i);
    }
    m.drain_effects();
    // device_del of a non-zero function is refused
    let before = m.clone();
    assert_eq!(
        m.device_del("f1", 0).unwrap_err().to_string(),
        "Unplug function 0 to remove slot 01"
    );
    assert_eq!(m, before);
    // function 0 takes the whole slot; events 7..0 as QEMU
    m.device_del("f0", 10).unwrap();
    let evs: Vec<(u32, GuestEventKind)> = m.events().iter().map(|e| (e.index, e.kind)).collect();
    assert_eq!(
        evs,
        [
            (0x4000_000a, GuestEventKind::Unplug),
            (0x4000_0009, GuestEventKind::Unplug),
            (0x4000_0008, GuestEventKind::Unplug)
        ]
    );
    for i in [0x4000_0008, 0x4000_0009, 0x4000_000a] {
        let c = m.connector(i).unwrap();
        assert!(c.unplug_requested());
        assert_eq!(c.unplug_deadline_ms(), Some(10 + T));
    }
    for i in [0x4000_000a, 0x4000_0009, 0x4000_0008] {
        assert_eq!(guest_release(&mut m, i), Ok(Outcome::UnplugCompleted));
    }
    assert_eq!(
        m.drain_events(),
        [deleted("f2"), deleted("f1"), deleted("f0")]
    );
    assert!(m.connectors().all(|c| c.device().is_none()));
    m.check_invariants().unwrap();
}

#[test]
fn half_plugged_slot_function_goes_alone() {
    let mut m = mgr("ferry-2.0");
    m.device_add("ferry-pci-fn", "f1", &pci("00.1", false), RunPhase::Started)
        .unwrap();
    m.drain_effects();
    // the guest never saw it: released at once
    m.device_del("f1", 0).unwrap();
    assert_eq!(m.drain_events(), [deleted("f1")]);
    assert_eq!(
        m.drain_effects(),
        [Effect::TearDown {
            device: "f1".into(),
            resource: Resource::PciFn {
                slot: 0,
                function: 1
            }
        }]
    );
}

#[test]
fn repeated_device_del_requeues_and_keeps_deadline() {
    let mut m = running_with_cpu1();
    m.device_del("cpu1", 100).unwrap();
    assert!(m.take_irq());
    let c = m.connector(0x1000_0001).unwrap();
    assert_eq!(c.unplug_deadline_ms(), Some(100 + T));
    // guest fetched the event but does nothing
    assert_eq!(m.pop_event().unwrap().kind, GuestEventKind::Unplug);
    m.device_del("cpu1", 700).unwrap();
    assert!(m.take_irq(), "re-sent");
    assert_eq!(m.events().len(), 1);
    // still queued: not duplicated, but the interrupt is pulsed again
    m.device_del("cpu1", 800).unwrap();
    assert_eq!(m.events().len(), 1);
    assert!(m.take_irq());
    assert_eq!(
        m.connector(0x1000_0001).unwrap().unplug_deadline_ms(),
        Some(100 + T)
    );
    assert_eq!(m.next_deadline(), Some(100 + T));
    let e = m.device_del("nope", 0).unwrap_err();
    assert_eq!(e.to_string(), "Device 'nope' not found");
}

#[test]
fn timeout_emits_guest_error_allows_retry_and_late_isolate_fails() {
    let mut m = running_with_cpu1();
    m.device_del("cpu1", 0).unwrap();
    m.tick(T - 1);
    assert!(m.drain_events().is_empty());
    m.tick(T);
    assert_eq!(m.drain_events(), [guest_error("cpu1")]);
    assert!(m.events().is_empty(), "the stale request is withdrawn");
    let q = &m.query_connectors(T)[1];
    assert!(!q.unplug_pending && q.unplug_timed_out && q.remaining_ms.is_none());
    // late isolate: RTAS hardware error, error stands, nothing released
    assert_eq!(
        m.guest_op(0x1000_0001, GuestOp::ISOLATE),
        Err(RtasError::HwError)
    );
    assert!(m.drain_events().is_empty() && m.drain_effects().is_empty());
    m.tick(10 * T);
    assert!(m.drain_events().is_empty(), "fires once");
    // retry works and completes
    m.device_del("cpu1", 2 * T).unwrap();
    assert_eq!(
        m.connector(0x1000_0001).unwrap().unplug_deadline_ms(),
        Some(3 * T)
    );
    assert_eq!(
        guest_release(&mut m, 0x1000_0001),
        Ok(Outcome::UnplugCompleted)
    );
    assert_eq!(m.drain_events(), [deleted("cpu1")]);
    m.check_invariants().unwrap();
}

#[test]
fn guest_refusal_emits_guest_error_at_once() {
    let mut m = running_with_cpu1();
    m.device_del("cpu1", 0).unwrap();
    assert_eq!(
        m.guest_op(0x1000_0001, GuestOp::UNISOLATE),
        Ok(Outcome::UnplugRejected)
    );
    assert_eq!(m.drain_events(), [guest_error("cpu1")]);
    assert!(m.events().is_empty());
    m.tick(10 * T);
    assert!(
        m.drain_events().is_empty(),
        "no second error at the deadline"
    );
    m.device_del("cpu1", 0).unwrap();
    assert!(m.connector(0x1000_0001).unwrap().unplug_requested());
}

#[test]
fn release_during_migration_is_pending_until_resume() {
    let mut m = running_with_cpu1();
    m.device_del("cpu1", 0).unwrap();
    m.set_migration_in_progress(true);
    assert_eq!(
        guest_release(&mut m, 0x1000_0001),
        Ok(Outcome::UnplugCompleted)
    );
    assert!(m.drain_events().is_empty() && m.drain_effects().is_empty());
    let c = m.connector(0x1000_0001).unwrap();
    assert!(c.release_pending() && c.device_id() == Some("cpu1"));
    m.set_migration_in_progress(false);
    // device_del of a release-pending device is a no-op
    let before = m.clone();
    m.device_del("cpu1", 5).unwrap();
    assert_eq!(m, before);
    assert_eq!(m.complete_pending_releases(), 1);
    assert_eq!(m.drain_events(), [deleted("cpu1")]);
    assert_eq!(
        m.drain_effects(),
        [Effect::TearDown {
            device: "cpu1".into(),
            resource: Resource::CpuCore { core: 1 }
        }]
    );
    assert_eq!(m.complete_pending_releases(), 0);
}

#[test]
fn pre_start_add_then_reset_is_coldplug() {
    let mut m = mgr("ferry-2.0");
    m.device_add("ferry-cpu-core", "c2", &cpu(2), RunPhase::Prelaunch)
        .unwrap();
    m.device_add("ferry-mem-block", "m1", &mem(1), RunPhase::InMigrate)
        .unwrap();
    m.device_add(
        "ferry-pci-fn",
        "p",
        &pci("00.0", false),
        RunPhase::InMigrate,
    )
    .unwrap();
    assert!(m.needs_reset_before_start());
    assert_eq!(m.events().len(), 3, "hotplug path: events queued");
    assert_eq!(
        m.drain_effects()[1],
        Effect::MapMemoryBlock {
            device: "m1".into(),
            slot: 1,
            gpa: 0x1_0000_0000 + MEM_BLOCK_SIZE,
            size: MEM_BLOCK_SIZE
        }
    );
    m.pio_write(reg::SELECTOR, &0x1000_0002u32.to_le_bytes());
    m.reset_all();
    assert!(!m.needs_reset_before_start());
    assert!(m.events().is_empty());
    assert_eq!(*m.controller(), Controller::new());
    assert!(m.connectors().all(Connector::at_reset_state));
    assert_eq!(
        m.connector(0x1000_0002).unwrap().state(),
        DrcState::LogicalConfigured
    );
    assert_eq!(
        m.connector(0x8000_0001).unwrap().state(),
        DrcState::LogicalConfigured
    );
    let p = m.connector(0x4000_0000).unwrap();
    assert_eq!(
        (p.state(), p.dr_indicator()),
        (DrcState::PhysicalConfigured, crate::DrIndicator::Active)
    );
    assert!(m.drain_events().is_empty());
}

#[test]
fn reset_releases_pending_unplugs() {
    let mut m = running_with_cpu1();
    m.device_del("cpu1", 0).unwrap();
    m.reset_all();
    assert_eq!(m.drain_events(), [deleted("cpu1")]);
    assert_eq!(
        m.connector(0x1000_0001).unwrap().state(),
        DrcState::LogicalUnusable
    );
    assert!(m.connectors().all(Connector::at_reset_state));
}

#[test]
fn guest_drives_everything_through_ports() {
    let mut m = mgr("ferry-2.0");
    m.device_add("ferry-cpu-core", "cpu3", &cpu(3), RunPhase::Started)
        .unwrap();
    let rd = |m: &mut HotplugManager, off| {
        let mut b = [0u8; 4];
        m.pio_read(off, &mut b);
        u32::from_le_bytes(b)
    };
    let wr = |m: &mut HotplugManager, off, v: u32| m.pio_write(off, &v.to_le_bytes());
    assert_eq!(rd(&mut m, reg::PENDING), 1);
    let idx = rd(&mut m, reg::EVENT);
    assert_eq!((idx, rd(&mut m, reg::EVENT_KIND)), (0x1000_0003, 1));
    wr(&mut m, reg::SELECTOR, idx);
    wr(&mut m, reg::ARG, 1);
    wr(&mut m, reg::OP, op::SET_ALLOCATION);
    wr(&mut m, reg::OP, op::SET_ISOLATION);
    loop {
        wr(&mut m, reg::OP, op::CONFIGURE);
        if rd(&mut m, reg::STATUS) == 0 {
            break;
        }
    }
    assert_eq!(
        m.connector(idx).unwrap().state(),
        DrcState::LogicalConfigured
    );
    m.device_del("cpu3", 0).unwrap();
    assert_eq!(rd(&mut m, reg::EVENT), idx);
    assert_eq!(rd(&mut m, reg::EVENT_KIND), 2);
    wr(&mut m, reg::ARG, 0);
    wr(&mut m, reg::OP, op::SET_ISOLATION);
    wr(&mut m, reg::OP, op::SET_ALLOCATION);
    assert_eq!(rd(&mut m, reg::STATUS), 0);
    assert_eq!(m.drain_events(), [deleted("cpu3")]);
    // unknown connector: -3 / -3 / -9003
    wr(&mut m, reg::SELECTOR, 0x2000_0000);
    for (code, st) in [
        (op::SET_ISOLATION, -3),
        (op::GET_SENSOR, -3),
        (op::CONFIGURE, -9003),
    ] {
        wr(&mut m, reg::OP, code);
        assert_eq!(rd(&mut m, reg::STATUS) as i32, st);
    }
}

#[test]
fn query_and_attached_devices() {
    let mut m = mgr("ferry-2.0");
    m.device_add("ferry-pci-fn", "f1", &pci("01.1", false), RunPhase::Started)
        .unwrap();
    m.device_add("ferry-pci-fn", "f0", &pci("01.0", true), RunPhase::Started)
        .unwrap();
    m.device_add("ferry-cpu-core", "c0", &cpu(0), RunPhase::Started)
        .unwrap();
    let q = m.query_connectors(0);
    assert_eq!(q.len(), 4 + 4 + 16);
    let f0 = q.iter().find(|c| c.index == 0x4000_0008).unwrap();
    assert_eq!(
        (f0.kind, f0.state, f0.isolation, f0.allocation, f0.indicator),
        (
            "pci-fn",
            "physical-poweron",
            "isolated",
            "usable",
            Some("inactive")
        )
    );
    assert_eq!(f0.device.as_deref(), Some("f0"));
    let c0 = &q[0];
    assert_eq!(
        (c0.state, c0.allocation, c0.indicator),
        ("logical-unusable", "unusable", None)
    );
    let order: Vec<String> = m.attached_devices().into_iter().map(|(id, _)| id).collect();
    assert_eq!(order, ["c0", "f1", "f0"]);
    assert_eq!(m.attached_devices()[2].1.props(), pci("01.0", true));
}

#[test]
fn pci_addr_parsing_and_config_checks() {
    assert_eq!(parse_pci_addr("04.1"), Some((4, 1)));
    assert_eq!(parse_pci_addr("4"), Some((4, 0)));
    assert_eq!(parse_pci_addr("1f.7"), Some((0x1f, 7)));
    for bad in ["", "20", "04.8", "04.", ".1", "004.1", "g1", "04.1.2"] {
        assert_eq!(parse_pci_addr(bad), None, "{bad}");
    }
    let bad = HotplugConfig {
        pci_slots: 33,
        ..Default::default()
    };
    assert!(HotplugManager::new(bad, machine_types::newest()).is_err());
    let bad = HotplugConfig {
        mem_base: 0x1000,
        ..Default::default()
    };
    assert!(HotplugManager::new(bad, machine_types::newest()).is_err());
}
