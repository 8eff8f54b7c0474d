//! Drive one connector with an arbitrary sequence of guest operations (the transition
//! function) and management operations. Nothing may panic, every invariant holds after every
//! step, a refused guest operation changes nothing, and the migrated form of any reachable
//! state goes through the codec and restores to the same connector.
#![no_main]

use devstate::{Reader, Record, Section};
use ferry_hotplug::{AttachedDevice, Connector, ConnectorKind, ConnectorState, GuestOp, token};
use libfuzzer_sys::fuzz_target;

/// Tokens the guest may name: the real ones and one that is not.
const TOKENS: [u32; 4] = [
    token::ISOLATION_STATE,
    token::DR_INDICATOR,
    token::ALLOCATION_STATE,
    7,
];

/// Encode `c`'s migrated form as a v2 body, decode it and restore it into a connector with
/// the same device: the result must be `c` again.
fn round_trip(c: &Connector, now: u64, timeout: u64) {
    let Some(dev) = c.device() else { return };
    let mut s = c.to_state(now);
    let mut body = Vec::new();
    s.encode(2, &mut body);
    let mut got = ConnectorState::default();
    got.decode_into(2, &mut Reader::new(&body, 0, "connector"))
        .expect("own body decodes");
    // The timer travels in its subsection; carry it over as the stream would.
    got.remaining_ms = s.remaining_ms;
    got.remaining_known = s.remaining_known;
    got.post_load(2).expect("own state passes post_load");
    s.v2_known = true;
    assert_eq!(got, s, "codec round trip");
    let mut dst = Connector::new(c.kind(), c.id());
    dst.attach(dev.clone());
    dst.restore(&got, now, timeout).expect("own state restores");
    if c.unplug_deadline_ms().is_none_or(|d| d >= now) {
        assert_eq!(&dst, c, "restore gives the same connector");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, ops)) = data.split_first() else {
        return;
    };
    let kind = ConnectorKind::ALL[usize::from(first % 3)];
    let mut c = Connector::new(kind, u32::from(first >> 2));
    let mut now = 0u64;
    let timeout = 1000;
    for op in ops.chunks(3) {
        let (code, a, b) = (op[0], *op.get(1).unwrap_or(&0), *op.get(2).unwrap_or(&0));
        let guest = match code % 10 {
            0 => Some(GuestOp::SetIndicator {
                token: TOKENS[usize::from(a % 4)],
                value: u32::from(b % 6),
            }),
            1 => Some(GuestOp::GetSensorState {
                token: if a & 1 == 0 {
                    token::ENTITY_SENSE
                } else {
                    u32::from(b)
                },
            }),
            2 | 3 => Some(GuestOp::ConfigureConnector),
            _ => None,
        };
        if let Some(g) = guest {
            let before = c.clone();
            if c.apply(g).is_err() {
                assert_eq!(c, before, "a refused guest operation changes nothing");
            }
        } else {
            match code % 10 {
                4 if c.device().is_none() => c.attach(AttachedDevice {
                    id: format!("d{a}"),
                    multifunction: b & 1 == 1,
                }),
                5 if c.has_device() => {
                    c.request_unplug(now, timeout);
                }
                6 => {
                    now += u64::from(a) * 8;
                    c.expire(now);
                }
                7 => {
                    c.complete_release();
                }
                8 => {
                    c.reset();
                }
                _ => round_trip(&c, now, timeout),
            }
        }
        if let Err(e) = c.check_invariants() {
            panic!("{e}: {c:?}");
        }
    }
    round_trip(&c, now, timeout);
});
