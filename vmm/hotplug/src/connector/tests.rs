//! Transition tables, management operations and the migrated form of one connector.

use super::*;
use crate::papr::*;
use crate::persist::ConnectorState;
use ConnectorKind::{CpuCore, MemBlock, PciFn};
use DrcState::*;
use devstate::WireEnum;

fn dev(id: &str) -> AttachedDevice {
    AttachedDevice {
        id: id.to_owned(),
        multifunction: false,
    }
}

/// A connector of `kind` in `state`, with or without a device and a pending unplug.
fn conn(kind: ConnectorKind, state: DrcState, with_dev: bool, unplug: bool) -> Connector {
    let mut c = Connector::new(kind, 1);
    if with_dev {
        c.device = Some(dev("d1"));
    }
    c.state = state;
    if unplug {
        c.unplug_requested = true;
        c.unplug_deadline_ms = Some(1000);
    }
    if kind.is_physical() && with_dev {
        c.dr_indicator = DrIndicator::Active;
    }
    c.check_invariants().unwrap();
    c
}

const ISO: GuestOp = GuestOp::ISOLATE;
const UNISO: GuestOp = GuestOp::UNISOLATE;
const USABLE: GuestOp = GuestOp::SET_USABLE;
const UNUSABLE: GuestOp = GuestOp::SET_UNUSABLE;
const SENSE: GuestOp = GuestOp::ENTITY_SENSE;
const CC: GuestOp = GuestOp::ConfigureConnector;
const DR: GuestOp = GuestOp::SetIndicator {
    token: token::DR_INDICATOR,
    value: 3,
};

use Outcome::{ConfigureStep, Done, Sensor, UnplugCompleted, UnplugRejected};
use RtasError::{HwError, NoSuchIndicator as Nsi, NotConfigurable, ParamError};
const STEP: Outcome = ConfigureStep(CcResponse::NextChild);

/// Expected result of `op` and the state after it (unchanged on error).
type Row = (GuestOp, Result<Outcome, RtasError>, DrcState);

fn check(kind: ConnectorKind, from: DrcState, with_dev: bool, unplug: bool, rows: &[Row]) {
    for (op, want, after) in rows {
        let mut c = conn(kind, from, with_dev, unplug);
        let got = c.apply(*op);
        assert_eq!(
            (&got, c.state),
            (want, *after),
            "{kind:?} {from:?} dev={with_dev} unplug={unplug} {op:?}"
        );
        c.check_invariants().unwrap();
        if got.is_err() {
            assert_eq!(
                c,
                conn(kind, from, with_dev, unplug),
                "an error changes nothing"
            );
        }
    }
}

#[test]
fn logical_transitions_with_device() {
    for kind in [CpuCore, MemBlock] {
        let lmb_isolate = if kind == MemBlock {
            Err(HwError)
        } else {
            Ok(Done)
        };
        let after_iso = if kind == MemBlock {
            LogicalConfigured
        } else {
            LogicalAvailable
        };
        #[rustfmt::skip]
        let table: [(DrcState, [Row; 7]); 4] = [
            (LogicalUnusable, [
                (ISO, Ok(Done), LogicalUnusable),
                (UNISO, Err(Nsi), LogicalUnusable),
                (USABLE, Ok(Done), LogicalAvailable),
                (UNUSABLE, Ok(Done), LogicalUnusable),
                (DR, Err(Nsi), LogicalUnusable),
                (SENSE, Ok(Sensor(EntitySense::Unusable)), LogicalUnusable),
                (CC, Err(NotConfigurable), LogicalUnusable),
            ]),
            (LogicalAvailable, [
                (ISO, Ok(Done), LogicalAvailable),
                (UNISO, Ok(Done), LogicalUnisolate),
                (USABLE, Ok(Done), LogicalAvailable),
                (UNUSABLE, Ok(Done), LogicalUnusable),
                (DR, Err(Nsi), LogicalAvailable),
                (SENSE, Ok(Sensor(EntitySense::Present)), LogicalAvailable),
                (CC, Err(NotConfigurable), LogicalAvailable),
            ]),
            (LogicalUnisolate, [
                (ISO, Err(ParamError), LogicalUnisolate),
                (UNISO, Ok(Done), LogicalUnisolate),
                (USABLE, Ok(Done), LogicalUnisolate),
                (UNUSABLE, Err(Nsi), LogicalUnisolate),
                (DR, Err(Nsi), LogicalUnisolate),
                (SENSE, Ok(Sensor(EntitySense::Present)), LogicalUnisolate),
                (CC, Ok(STEP), LogicalUnisolate),
            ]),
            (LogicalConfigured, [
                (ISO, lmb_isolate, after_iso),
                (UNISO, Ok(Done), LogicalConfigured),
                (USABLE, Ok(Done), LogicalConfigured),
                (UNUSABLE, Err(Nsi), LogicalConfigured),
                (DR, Err(Nsi), LogicalConfigured),
                (SENSE, Ok(Sensor(EntitySense::Present)), LogicalConfigured),
                (CC, Ok(STEP), LogicalConfigured),
            ]),
        ];
        for (from, rows) in table {
            check(kind, from, true, false, &rows);
        }
    }
}

#[test]
fn logical_transitions_with_unplug_requested() {
    for kind in [CpuCore, MemBlock] {
        #[rustfmt::skip]
        let table: [(DrcState, [Row; 5]); 3] = [
            (LogicalAvailable, [
                (ISO, Ok(Done), LogicalAvailable),
                // unisolate from AVAILABLE is not a refusal (QEMU checks only
                // UNISOLATE/CONFIGURED)
                (UNISO, Ok(Done), LogicalUnisolate),
                (USABLE, Ok(Done), LogicalAvailable),
                (UNUSABLE, Ok(UnplugCompleted), LogicalUnusable),
                (CC, Err(NotConfigurable), LogicalAvailable),
            ]),
            (LogicalUnisolate, [
                (ISO, Err(ParamError), LogicalUnisolate),
                (UNISO, Ok(UnplugRejected), LogicalUnisolate),
                (USABLE, Ok(Done), LogicalUnisolate),
                (UNUSABLE, Err(Nsi), LogicalUnisolate),
                (CC, Ok(STEP), LogicalUnisolate),
            ]),
            (LogicalConfigured, [
                (ISO, Ok(Done), LogicalAvailable),
                (UNISO, Ok(UnplugRejected), LogicalConfigured),
                (USABLE, Ok(Done), LogicalConfigured),
                (UNUSABLE, Err(Nsi), LogicalConfigured),
                (CC, Ok(STEP), LogicalConfigured),
            ]),
        ];
        for (from, rows) in table {
            check(kind, from, true, true, &rows);
        }
    }
}

#[test]
fn logical_and_physical_without_device() {
    #[rustfmt::skip]
    check(CpuCore, LogicalUnusable, false, false, &[
        (ISO, Ok(Done), LogicalUnusable),
        (UNISO, Err(Nsi), LogicalUnusable),
        (USABLE, Err(Nsi), LogicalUnusable),
        (UNUSABLE, Ok(Done), LogicalUnusable),
        (SENSE, Ok(Sensor(EntitySense::Unusable)), LogicalUnusable),
        (CC, Err(NotConfigurable), LogicalUnusable),
    ]);
    #[rustfmt::skip]
    check(PciFn, PhysicalPowerOn, false, false, &[
        (ISO, Ok(Done), PhysicalPowerOn),
        (UNISO, Err(Nsi), PhysicalPowerOn),
        (USABLE, Err(Nsi), PhysicalPowerOn),
        (DR, Ok(Done), PhysicalPowerOn),
        (SENSE, Ok(Sensor(EntitySense::Empty)), PhysicalPowerOn),
        (CC, Err(NotConfigurable), PhysicalPowerOn),
    ]);
}

#[test]
fn physical_transitions() {
    #[rustfmt::skip]
    let table: [(DrcState, bool, [Row; 7]); 5] = [
        (PhysicalPowerOn, false, [
            (ISO, Ok(Done), PhysicalPowerOn),
            (UNISO, Ok(Done), PhysicalUnisolate),
            (USABLE, Err(Nsi), PhysicalPowerOn),
            (UNUSABLE, Err(Nsi), PhysicalPowerOn),
            (DR, Ok(Done), PhysicalPowerOn),
            (SENSE, Ok(Sensor(EntitySense::Present)), PhysicalPowerOn),
            (CC, Err(NotConfigurable), PhysicalPowerOn),
        ]),
        (PhysicalUnisolate, false, [
            (ISO, Err(ParamError), PhysicalUnisolate),
            (UNISO, Ok(Done), PhysicalUnisolate),
            (USABLE, Err(Nsi), PhysicalUnisolate),
            (UNUSABLE, Err(Nsi), PhysicalUnisolate),
            (DR, Ok(Done), PhysicalUnisolate),
            (SENSE, Ok(Sensor(EntitySense::Present)), PhysicalUnisolate),
            (CC, Ok(STEP), PhysicalUnisolate),
        ]),
        (PhysicalConfigured, false, [
            (ISO, Ok(Done), PhysicalPowerOn),
            (UNISO, Ok(Done), PhysicalConfigured),
            (USABLE, Err(Nsi), PhysicalConfigured),
            (UNUSABLE, Err(Nsi), PhysicalConfigured),
            (DR, Ok(Done), PhysicalConfigured),
            (SENSE, Ok(Sensor(EntitySense::Present)), PhysicalConfigured),
            (CC, Ok(STEP), PhysicalConfigured),
        ]),
        (PhysicalUnisolate, true, [
            (ISO, Err(ParamError), PhysicalUnisolate),
            // physical connectors have no refusal path
            (UNISO, Ok(Done), PhysicalUnisolate),
            (USABLE, Err(Nsi), PhysicalUnisolate),
            (UNUSABLE, Err(Nsi), PhysicalUnisolate),
            (DR, Ok(Done), PhysicalUnisolate),
            (SENSE, Ok(Sensor(EntitySense::Present)), PhysicalUnisolate),
            (CC, Ok(STEP), PhysicalUnisolate),
        ]),
        (PhysicalConfigured, true, [
            (ISO, Ok(UnplugCompleted), PhysicalPowerOn),
            (UNISO, Ok(Done), PhysicalConfigured),
            (USABLE, Err(Nsi), PhysicalConfigured),
            (UNUSABLE, Err(Nsi), PhysicalConfigured),
            (DR, Ok(Done), PhysicalConfigured),
            (SENSE, Ok(Sensor(EntitySense::Present)), PhysicalConfigured),
            (CC, Ok(STEP), PhysicalConfigured),
        ]),
    ];
    for (from, unplug, rows) in table {
        check(PciFn, from, true, unplug, &rows);
    }
}

#[test]
fn bad_tokens_and_values() {
    let mut l = conn(CpuCore, LogicalConfigured, true, false);
    let mut p = conn(PciFn, PhysicalConfigured, true, false);
    let set = |token, value| GuestOp::SetIndicator { token, value };
    for c in [&mut l, &mut p] {
        assert_eq!(c.apply(set(token::ISOLATION_STATE, 2)), Err(ParamError));
        assert_eq!(c.apply(set(9999, 0)), Err(Nsi));
        assert_eq!(
            c.apply(GuestOp::GetSensorState { token: 9001 }),
            Err(ParamError)
        );
        assert_eq!(
            c.apply(GuestOp::GetSensorState { token: 9002 }),
            Err(ParamError)
        );
    }
    for v in [2, 3, 7] {
        assert_eq!(l.apply(set(token::ALLOCATION_STATE, v)), Err(ParamError));
        assert_eq!(p.apply(set(token::ALLOCATION_STATE, v)), Err(Nsi));
    }
    assert_eq!(p.apply(set(token::DR_INDICATOR, 4)), Err(ParamError));
    assert_eq!(p.dr_indicator(), DrIndicator::Active);
    for (v, ind) in [
        (0, DrIndicator::Inactive),
        (2, DrIndicator::Identify),
        (3, DrIndicator::Action),
        (1, DrIndicator::Active),
    ] {
        assert_eq!(p.apply(set(token::DR_INDICATOR, v)), Ok(Done));
        assert_eq!(p.dr_indicator(), ind);
    }
    assert_eq!(l, conn(CpuCore, LogicalConfigured, true, false));
    assert_eq!(RtasError::HwError.code(), -1);
    assert_eq!(Nsi.code(), -3);
    assert_eq!(ParamError.code(), -3);
    assert_eq!(NotConfigurable.code(), -9003);
}

#[test]
fn configure_walks_per_kind() {
    for (kind, from, want) in [
        (CpuCore, LogicalUnisolate, vec![2, 3, 3, 3, 2, 3, 4, 0]),
        (MemBlock, LogicalUnisolate, vec![2, 3, 3, 3, 0]),
        (PciFn, PhysicalUnisolate, vec![2, 3, 3, 3, 3, 0]),
    ] {
        let mut c = conn(kind, from, true, false);
        let mut got = Vec::new();
        for step in 0.. {
            assert_eq!(usize::from(c.cc_cursor()), step);
            let out = c.apply(CC).unwrap();
            got.push(out.status());
            c.check_invariants().unwrap();
            if out == Outcome::Configured {
                break;
            }
            assert_eq!(c.state(), from);
        }
        assert_eq!(got, want, "{kind:?}");
        assert_eq!(c.state(), kind.ready_state());
        assert_eq!(c.cc_cursor(), 0);
        // A repeated walk on a configured connector ends in SUCCESS without a transition.
        let mut last = Outcome::Done;
        for _ in 0..want.len() {
            last = c.apply(CC).unwrap();
        }
        assert_eq!(last, ConfigureStep(CcResponse::Success));
        assert_eq!(c.cc_cursor(), 0);
    }
}

#[test]
fn isolate_mid_walk_clears_the_cursor() {
    let mut c = conn(CpuCore, LogicalConfigured, true, false);
    c.apply(CC).unwrap();
    c.apply(CC).unwrap();
    assert_eq!(c.cc_cursor(), 2);
    assert_eq!(c.busy_reason(), Some(BusyReason::Configuring));
    c.apply(ISO).unwrap();
    assert_eq!((c.state(), c.cc_cursor()), (LogicalAvailable, 0));
    c.apply(UNISO).unwrap();
    assert_eq!(c.apply(CC), Ok(STEP));
}

#[test]
fn full_logical_add_and_remove() {
    let mut c = Connector::new(CpuCore, 3);
    assert_eq!(c.index(), 0x1000_0003);
    c.attach(dev("cpu3"));
    assert!(!c.at_reset_state(), "hot-added, not yet configured");
    for op in [USABLE, UNISO] {
        assert_eq!(c.apply(op), Ok(Done));
    }
    while c.apply(CC).unwrap() != Outcome::Configured {}
    assert!(c.at_reset_state());
    assert_eq!(c.request_unplug(100, 1000), UnplugRequest::AwaitingGuest);
    assert_eq!(c.unplug_deadline_ms(), Some(1100));
    assert_eq!(c.busy_reason(), Some(BusyReason::UnplugPending));
    // a repeated request keeps the deadline
    assert_eq!(c.request_unplug(900, 1000), UnplugRequest::AlreadyPending);
    assert_eq!(c.unplug_deadline_ms(), Some(1100));
    assert_eq!(c.apply(USABLE), Ok(Done));
    assert_eq!(c.apply(ISO), Ok(Done));
    assert_eq!(c.apply(UNUSABLE), Ok(UnplugCompleted));
    assert!(c.release_pending() && !c.unplug_requested());
    assert_eq!(c.unplug_deadline_ms(), None);
    assert_eq!(c.busy_reason(), Some(BusyReason::ReleasePending));
    // the guest no longer sees it
    assert_eq!(c.apply(USABLE), Err(Nsi));
    c.check_invariants().unwrap();
    assert_eq!(c.complete_release(), Some(dev("cpu3")));
    assert_eq!(c.complete_release(), None);
    assert_eq!(c, Connector::new(CpuCore, 3));
}

#[test]
fn physical_remove_and_immediate_release() {
    let mut c = conn(PciFn, PhysicalConfigured, true, false);
    assert_eq!(c.request_unplug(0, 50), UnplugRequest::AwaitingGuest);
    assert_eq!(c.apply(ISO), Ok(UnplugCompleted));
    assert_eq!(c.entity_sense(), EntitySense::Empty);
    assert_eq!(c.complete_release(), Some(dev("d1")));
    // attached but never taken by the guest: released at once
    let mut c = conn(PciFn, PhysicalPowerOn, true, false);
    assert_eq!(c.request_unplug(0, 50), UnplugRequest::Released(dev("d1")));
    assert!(c.device().is_none() && !c.unplug_requested());
    let mut c = conn(MemBlock, LogicalUnusable, true, false);
    assert_eq!(c.request_unplug(0, 50), UnplugRequest::Released(dev("d1")));
}

#[test]
fn guest_refusal_clears_the_request() {
    let mut c = conn(CpuCore, LogicalConfigured, true, true);
    assert_eq!(c.apply(UNISO), Ok(UnplugRejected));
    assert!(!c.unplug_requested() && c.unplug_deadline_ms().is_none());
    assert!(!c.unplug_timed_out());
    assert!(c.at_reset_state());
    // a second unisolate is a plain no-op
    assert_eq!(c.apply(UNISO), Ok(Done));
}

#[test]
fn timeout_then_late_completion_is_a_hardware_error() {
    // CPU: guest silent, then isolates late.
    let mut c = conn(CpuCore, LogicalConfigured, true, false);
    c.request_unplug(0, 1000);
    assert!(!c.expire(999));
    assert!(c.expire(1000));
    assert!(!c.expire(5000), "fires once");
    assert!(c.unplug_timed_out() && !c.unplug_requested());
    assert!(!c.at_reset_state());
    let before = c.clone();
    assert_eq!(c.apply(ISO), Err(HwError));
    assert_eq!(c, before);
    // CPU: guest isolated in time but releases late.
    let mut c = conn(CpuCore, LogicalConfigured, true, false);
    c.request_unplug(0, 1000);
    c.apply(ISO).unwrap();
    assert!(c.expire(1000));
    assert_eq!(c.apply(UNUSABLE), Err(HwError));
    assert_eq!(c.state(), LogicalAvailable);
    // rolling back (unisolate) clears the flag
    c.apply(UNISO).unwrap();
    assert!(!c.unplug_timed_out());
    while c.apply(CC).unwrap() != Outcome::Configured {}
    assert!(c.at_reset_state());
    // PCI: late isolate.
    let mut p = conn(PciFn, PhysicalConfigured, true, false);
    p.request_unplug(10, 100);
    assert!(p.expire(110));
    assert_eq!(p.apply(ISO), Err(HwError));
    assert_eq!(p.state(), PhysicalConfigured);
    // a new request (retry) clears the flag and restarts the timer
    assert_eq!(p.request_unplug(200, 100), UnplugRequest::AwaitingGuest);
    assert!(!p.unplug_timed_out());
    assert_eq!(p.unplug_deadline_ms(), Some(300));
    assert_eq!(p.apply(ISO), Ok(UnplugCompleted));
}

#[test]
fn reset_table() {
    // (kind, state, device, unplug) -> (state, indicator, device kept)
    let cases = [
        (
            CpuCore,
            LogicalUnusable,
            true,
            false,
            LogicalConfigured,
            DrIndicator::Inactive,
            true,
        ),
        (
            CpuCore,
            LogicalUnisolate,
            true,
            false,
            LogicalConfigured,
            DrIndicator::Inactive,
            true,
        ),
        (
            CpuCore,
            LogicalUnusable,
            false,
            false,
            LogicalUnusable,
            DrIndicator::Inactive,
            false,
        ),
        (
            MemBlock,
            LogicalConfigured,
            true,
            true,
            LogicalUnusable,
            DrIndicator::Inactive,
            false,
        ),
        (
            PciFn,
            PhysicalPowerOn,
            true,
            false,
            PhysicalConfigured,
            DrIndicator::Active,
            true,
        ),
        (
            PciFn,
            PhysicalUnisolate,
            true,
            false,
            PhysicalConfigured,
            DrIndicator::Active,
            true,
        ),
        (
            PciFn,
            PhysicalPowerOn,
            false,
            false,
            PhysicalPowerOn,
            DrIndicator::Inactive,
            false,
        ),
        (
            PciFn,
            PhysicalConfigured,
            true,
            true,
            PhysicalPowerOn,
            DrIndicator::Inactive,
            false,
        ),
    ];
    for (kind, from, with_dev, unplug, state, ind, kept) in cases {
        let mut c = conn(kind, from, with_dev, unplug);
        if kind.is_physical() {
            c.dr_indicator = DrIndicator::Action;
        }
        if matches!(from, LogicalUnisolate | PhysicalUnisolate) {
            c.apply(CC).unwrap();
            assert_eq!(c.cc_cursor(), 1);
        }
        let released = c.reset();
        assert_eq!(released.is_some(), with_dev && !kept, "{kind:?} {from:?}");
        assert_eq!(c.device().is_some(), kept);
        assert_eq!(
            (c.state(), c.dr_indicator(), c.cc_cursor()),
            (state, ind, 0)
        );
        assert!(!c.unplug_requested() && c.unplug_deadline_ms().is_none());
        assert!(c.at_reset_state());
        c.check_invariants().unwrap();
    }
    // release-pending and timed-out connectors
    let mut c = conn(CpuCore, LogicalAvailable, true, true);
    c.apply(UNUSABLE).unwrap();
    assert_eq!(c.reset(), Some(dev("d1")));
    assert_eq!(c, Connector::new(CpuCore, 1));
    let mut c = conn(CpuCore, LogicalConfigured, true, true);
    c.expire(1000);
    assert_eq!(c.reset(), None);
    assert!(!c.unplug_timed_out() && c.at_reset_state());
}

#[test]
fn indices_wire_values_and_names() {
    assert_eq!(CpuCore.index(3), 0x1000_0003);
    assert_eq!(PciFn.index(8), 0x4000_0008);
    assert_eq!(MemBlock.index(2), 0x8000_0002);
    for k in ConnectorKind::ALL {
        assert_eq!(ConnectorKind::from_index(k.index(77)), Some((k, 77)));
    }
    assert_eq!(ConnectorKind::from_index(0x2000_0001), None);
    assert_eq!(ConnectorKind::from_index(0), None);
    let wire: Vec<u8> = DrcState::ALL.iter().map(|s| s.wire()).collect();
    assert_eq!(wire, (0..=8).collect::<Vec<u8>>());
    assert_eq!(DrcState::from_wire(4), Some(LogicalConfigured));
    assert_eq!(DrcState::from_wire(9), None);
    assert_eq!(
        DrcState::from_wire(0),
        None,
        "0 is reserved: no stream carries Invalid"
    );
    assert_eq!(PhysicalPowerOn.name(), "physical-poweron");
    assert!(!PhysicalAvailable.valid_for(PciFn) && !Invalid.valid_for(CpuCore));
    assert_eq!(
        [
            DrIndicator::Inactive,
            DrIndicator::Active,
            DrIndicator::Identify,
            DrIndicator::Action
        ]
        .map(|d| d as u8),
        [0, 1, 2, 3]
    );
    assert!(valid_device_id("nic0.f-1_x"));
    for bad in ["", "0abc", "a b", "a/b", &"x".repeat(65)] {
        assert!(!valid_device_id(bad), "{bad}");
    }
    assert!(valid_device_id(&"x".repeat(64)));
}

#[test]
fn busy_reasons() {
    let mut p = Connector::new(PciFn, 8);
    assert_eq!(p.busy_reason(), None);
    p.apply(DR).unwrap();
    assert_eq!(p.busy_reason(), Some(BusyReason::IndicatorBlinking));
    let c = conn(CpuCore, LogicalAvailable, true, false);
    assert_eq!(c.busy_reason(), Some(BusyReason::Configuring));
    let c = conn(CpuCore, LogicalUnusable, true, false);
    assert_eq!(c.busy_reason(), None, "occupied, not busy");
}

#[test]
fn state_restore_round_trip_and_refusals() {
    let mut src = conn(PciFn, PhysicalUnisolate, true, false);
    src.apply(CC).unwrap();
    src.apply(GuestOp::dr_indicator(DrIndicator::Identify))
        .unwrap();
    let mut p = conn(PciFn, PhysicalConfigured, true, false);
    p.request_unplug(100, 1000);
    for src in [src, p] {
        let s = src.to_state(400);
        let mut dst = conn(PciFn, PhysicalConfigured, true, false);
        dst.restore(&s, 400, 1000).unwrap();
        assert_eq!(dst, src);
        // a v1 stream without the timer: full timeout from now, reset values for v2 fields
        // (a v1 load leaves them at their defaults, which need not agree with the state)
        let v1 = ConnectorState {
            isolation: Default::default(),
            allocation: Default::default(),
            dr_indicator: Default::default(),
            cc_cursor: 0,
            remaining_known: false,
            v2_known: false,
            ..s.clone()
        };
        let mut dst = conn(PciFn, PhysicalConfigured, true, false);
        dst.restore(&v1, 50, 1000).unwrap();
        assert_eq!(dst.state(), src.state());
        // without the v2 field the indicator follows the state
        let ind = if src.state() == PhysicalConfigured {
            DrIndicator::Active
        } else {
            DrIndicator::Inactive
        };
        assert_eq!(dst.dr_indicator(), ind);
        assert_eq!(dst.cc_cursor(), 0);
        assert_eq!(
            dst.unplug_deadline_ms(),
            src.unplug_requested().then_some(1050)
        );
    }
    let s = conn(PciFn, PhysicalUnisolate, true, false).to_state(0);
    let empty = Connector::new(PciFn, 1);
    let mut e = empty.clone();
    assert!(e.restore(&s, 0, 1000).unwrap_err().why.contains("not here"));
    assert_eq!(e, empty);
    let mut other = Connector::new(PciFn, 1);
    other.attach(dev("other"));
    let keep = other.clone();
    assert!(
        other
            .restore(&s, 0, 1000)
            .unwrap_err()
            .why
            .contains("'other'")
    );
    assert_eq!(other, keep);
    let mut d = conn(PciFn, PhysicalConfigured, true, false);
    let mut bad = s.clone();
    bad.isolation = Isolation::Isolated;
    let e = d.restore(&bad, 0, 1000).unwrap_err();
    assert!(e.why.contains("isolation 0 disagrees"), "{e}");
    let mut bad = s.clone();
    bad.allocation = Allocation::Unusable;
    assert!(
        d.restore(&bad, 0, 1000)
            .unwrap_err()
            .why
            .contains("allocation")
    );
    let mut bad = s.clone();
    bad.state = LogicalConfigured;
    assert!(d.restore(&bad, 0, 1000).is_err());
    let mut bad = s;
    bad.unplug_timed_out = true;
    bad.release_pending = true;
    assert!(d.restore(&bad, 0, 1000).is_err(), "invariants checked");
    assert_eq!(d, conn(PciFn, PhysicalConfigured, true, false));
}
