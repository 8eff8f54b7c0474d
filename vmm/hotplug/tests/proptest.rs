//! Random sequences of guest operations and management commands never reach an undefined
//! state, and a save/load through a devstate stream at any step reproduces the source
//! (minus what the machine type's section version does not carry).

#[path = "common/mod.rs"]
mod common;

use common::*;
use ferry_hotplug::{
    Connector, ConnectorKind, DeviceProps, DrIndicator, DrcState, GuestOp, HotplugManager, RunPhase,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Act {
    Add {
        kind: u8,
        slot: u8,
        function: u8,
        mf: bool,
        pre: bool,
        id: u8,
    },
    Del {
        id: u8,
    },
    Guest {
        conn: u8,
        op: u8,
        arg: u8,
    },
    /// A well-behaved guest takes up to `steps` protocol steps on one connector.
    Drive {
        conn: u8,
        steps: u8,
    },
    Pio {
        reg: u8,
        val: u32,
    },
    PopEvent,
    Tick {
        dt: u16,
    },
    Reset,
    Migrating(bool),
    CompleteReleases,
    Save,
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        3 => (0u8..3, 0u8..3, 0u8..3, any::<bool>(), prop::bool::weighted(0.1), 0u8..5)
            .prop_map(|(kind, slot, function, mf, pre, id)| Act::Add { kind, slot, function, mf, pre, id }),
        5 => (0u8..6).prop_map(|id| Act::Del { id }),
        5 => (0u8..22, 0u8..6, 0u8..5).prop_map(|(conn, op, arg)| Act::Guest { conn, op, arg }),
        8 => (0u8..21, 1u8..12).prop_map(|(conn, steps)| Act::Drive { conn, steps }),
        1 => (0u8..9, 0u32..10).prop_map(|(reg, val)| Act::Pio { reg, val }),
        2 => Just(Act::PopEvent),
        2 => (0u16..1200).prop_map(|dt| Act::Tick { dt }),
        1 => Just(Act::Reset),
        2 => prop::bool::weighted(0.4).prop_map(Act::Migrating),
        1 => Just(Act::CompleteReleases),
        2 => Just(Act::Save),
    ]
}

fn all_indices(m: &HotplugManager) -> Vec<u32> {
    m.connectors().map(Connector::index).collect()
}

fn apply(m: &mut HotplugManager, a: &Act, now: &mut u64) {
    match *a {
        Act::Add {
            kind,
            slot,
            function,
            mf,
            pre,
            id,
        } => {
            let (driver, props) = match kind {
                0 => (
                    "ferry-cpu-core",
                    DeviceProps {
                        core_id: Some(u32::from(slot)),
                        ..Default::default()
                    },
                ),
                1 => (
                    "ferry-mem-block",
                    DeviceProps {
                        slot: Some(u32::from(slot)),
                        ..Default::default()
                    },
                ),
                _ => (
                    "ferry-pci-fn",
                    DeviceProps {
                        addr: Some(format!("{:02x}.{function}", slot % 2)),
                        multifunction: Some(mf),
                        ..Default::default()
                    },
                ),
            };
            let phase = if pre {
                RunPhase::InMigrate
            } else {
                RunPhase::Started
            };
            let before = m.clone();
            if m.device_add(driver, &format!("d{id}"), &props, phase)
                .is_err()
            {
                assert_eq!(*m, before, "a refused device_add changes nothing");
            }
        }
        Act::Del { id } => {
            let before = m.clone();
            if m.device_del(&format!("d{id}"), *now).is_err() {
                assert_eq!(*m, before, "a refused device_del changes nothing");
            }
        }
        Act::Guest { conn, op, arg } => {
            let idx = all_indices(m);
            let index = idx.get(usize::from(conn)).copied().unwrap_or(0x2000_0000);
            let arg = u32::from(arg);
            let op = match op {
                0 => GuestOp::SetIndicator {
                    token: 9001,
                    value: arg % 3,
                },
                1 => GuestOp::SetIndicator {
                    token: 9003,
                    value: arg % 3,
                },
                2 => GuestOp::SetIndicator {
                    token: 9002,
                    value: arg,
                },
                3 => GuestOp::GetSensorState {
                    token: 9001 + arg % 3,
                },
                4 => GuestOp::ConfigureConnector,
                _ => GuestOp::SetIndicator {
                    token: 9000 + arg,
                    value: 0,
                },
            };
            let _ = m.guest_op(index, op);
        }
        Act::Drive { conn, steps } => {
            // a guest works on devices it knows about
            let att: Vec<u32> = m
                .connectors()
                .filter(|c| c.has_device())
                .map(Connector::index)
                .collect();
            let Some(&index) = att.get(usize::from(conn) % att.len().max(1)) else {
                return;
            };
            for _ in 0..steps {
                let c = m.connector(index).unwrap();
                if !c.has_device() {
                    break;
                }
                use ferry_hotplug::DrcState::*;
                let op = match (c.state(), c.unplug_requested()) {
                    (LogicalUnusable, _) => GuestOp::SET_USABLE,
                    (LogicalAvailable, true) => GuestOp::SET_UNUSABLE,
                    (LogicalAvailable, false) | (PhysicalPowerOn, _) => GuestOp::UNISOLATE,
                    (LogicalConfigured | PhysicalConfigured, true) => GuestOp::ISOLATE,
                    (LogicalConfigured | PhysicalConfigured, false) => break,
                    _ => GuestOp::ConfigureConnector,
                };
                let _ = m.guest_op(index, op);
            }
        }
        Act::Pio { reg, val } => {
            let off = u16::from(reg) * 4;
            let idx = all_indices(m);
            let v = if off == 0x08 {
                idx[val as usize % idx.len()]
            } else {
                val
            };
            if reg % 2 == 0 {
                m.pio_write(off, &v.to_le_bytes());
            } else {
                let mut b = [0u8; 4];
                m.pio_read(off, &mut b);
            }
        }
        Act::PopEvent => {
            m.pop_event();
        }
        Act::Tick { dt } => {
            *now += u64::from(dt);
            m.tick(*now);
        }
        Act::Reset => m.reset_all(),
        Act::Migrating(on) => m.set_migration_in_progress(on),
        Act::CompleteReleases => {
            m.complete_pending_releases();
        }
        Act::Save => {}
    }
    m.drain_effects();
    m.drain_events();
}

fn check_defined(m: &HotplugManager) {
    m.check_invariants().unwrap();
    for c in m.connectors() {
        assert!((1..=8).contains(&c.state().wire()));
        assert!(!c.unplug_requested() || c.device().is_some());
        assert!(c.unplug_requested() == c.unplug_deadline_ms().is_some());
    }
}

/// Save at `now`, load into a fresh destination at the same guest-running time, compare.
fn round_trip(src: &HotplugManager, now: u64) {
    let version = src.machine().compat().drc_section_version;
    let timer = src.machine().compat().drc_unplug_timer;
    let dst = migrate(src, now, now);
    check_defined(&dst);
    assert_eq!(src.events(), dst.events());
    assert_eq!(src.controller(), dst.controller());
    for (s, d) in src.connectors().zip(dst.connectors()) {
        let at = format!("{:#010x} {:?} -> {:?}", s.index(), s, d);
        assert_eq!(s.device(), d.device(), "{at}");
        assert_eq!(s.state(), d.state(), "{at}");
        assert_eq!(s.unplug_requested(), d.unplug_requested(), "{at}");
        assert_eq!(s.unplug_timed_out(), d.unplug_timed_out(), "{at}");
        assert_eq!(s.release_pending(), d.release_pending(), "{at}");
        let left = if timer {
            s.remaining_ms(now)
        } else {
            s.unplug_requested().then_some(T)
        };
        assert_eq!(d.remaining_ms(now), left, "{at}");
        if s.device().is_none() {
            // rule 4: empty connectors are never sent; the destination is at its reset state
            assert!(d.at_reset_state(), "{at}");
        } else if version >= 2 {
            assert_eq!(s, d, "{at}");
        } else {
            // v1 does not carry indicator and cursor: the indicator follows the state
            // (active once configured), the cursor restarts
            let ind =
                if s.kind() == ConnectorKind::PciFn && s.state() == DrcState::PhysicalConfigured {
                    DrIndicator::Active
                } else {
                    DrIndicator::Inactive
                };
            assert_eq!((d.dr_indicator(), d.cc_cursor()), (ind, 0), "{at}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_stay_defined_and_round_trip(
        machine_ix in 0usize..3,
        acts in prop::collection::vec(act(), 1..120),
    ) {
        let name = ["ferry-1.0", "ferry-1.1", "ferry-2.0"][machine_ix];
        let mut m = HotplugManager::new(config(), machine(name)).unwrap();
        let mut now = 0u64;
        for a in &acts {
            apply(&mut m, a, &mut now);
            check_defined(&m);
            if matches!(a, Act::Save) {
                round_trip(&m, now);
            }
        }
        round_trip(&m, now);
    }
}

/// Coverage probe (run with `--ignored --nocapture`): how often the generator reaches the
/// interesting states.
#[test]
#[ignore]
fn coverage_probe() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::default();
    let mut counts = [0usize; 7];
    for case in 0..400 {
        let acts = prop::collection::vec(act(), 1..120)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let name = ["ferry-1.0", "ferry-1.1", "ferry-2.0"][case % 3];
        let mut m = HotplugManager::new(config(), machine(name)).unwrap();
        let mut now = 0;
        let mut seen = [false; 7];
        for a in &acts {
            apply(&mut m, a, &mut now);
            for c in m.connectors() {
                use ferry_hotplug::DrcState::*;
                seen[0] |= c.unplug_requested();
                seen[1] |= c.release_pending();
                seen[2] |= c.unplug_timed_out();
                seen[3] |= c.cc_cursor() > 0;
                seen[4] |=
                    matches!(c.state(), LogicalConfigured | PhysicalConfigured) && c.has_device();
                seen[5] |= matches!(
                    c.state(),
                    LogicalAvailable | LogicalUnisolate | PhysicalUnisolate
                );
                seen[6] |= c.dr_indicator().is_blinking();
            }
        }
        for (n, s) in counts.iter_mut().zip(seen) {
            *n += usize::from(s);
        }
    }
    eprintln!(
        "cases reaching [unplug-pending, release-pending, timed-out, cursor>0, configured, mid-transition, blinking] out of 400: {counts:?}"
    );
}
