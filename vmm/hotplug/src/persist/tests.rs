//! The hotplug sections through the codec and through whole streams, per machine type.

use super::*;
use crate::events::{EVENT_QUEUE_CAPACITY, GuestEventKind};
use crate::papr::{Allocation, DrIndicator, DrcState, Isolation};
use devstate::{
    Catalog, DecodeError, Item, Reader, Record, Section, StreamReader, StreamWriter, Tag,
    encode_section, record,
};
use machine_types::MachineType;

fn m(name: &str) -> &'static MachineType {
    MachineType::lookup(name).unwrap()
}

record! {
    /// Stand-in for the VMM's configuration record.
    struct Cfg {
        cores: u32,
    }
}

impl Section for Cfg {
    const NAME: &'static str = "config";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
}

fn catalog() -> Catalog {
    let mut c = Catalog::new();
    c.register::<Cfg>();
    register_sections(&mut c);
    c
}

fn pending_cpu() -> ConnectorState {
    ConnectorState {
        index: 0x1000_0003,
        state: DrcState::LogicalConfigured,
        device: "cpu3".into(),
        unplug_requested: true,
        release_pending: false,
        unplug_timed_out: false,
        isolation: Isolation::Unisolated,
        allocation: Allocation::Usable,
        dr_indicator: DrIndicator::Inactive,
        cc_cursor: 0,
        remaining_ms: 700,
        remaining_known: true,
        v2_known: true,
    }
}

/// Write `s` in a full stream for `machine` and load it back through the catalog.
fn through_stream(s: &mut ConnectorState, machine: &'static MachineType) -> Option<ConnectorState> {
    let cat = catalog();
    let mut w = StreamWriter::new(Vec::new(), machine, "test").unwrap();
    w.config(&mut Cfg { cores: 1 }).unwrap();
    let sent = w.section(s, s.index).unwrap();
    let bytes = w.finish().unwrap();
    let mut r = StreamReader::new(bytes.as_slice(), Some(&cat)).unwrap();
    let mut got = None;
    loop {
        match r.next_item().unwrap() {
            Item::Section(raw) => got = Some(raw.load::<ConnectorState>().unwrap()),
            Item::End => break,
            _ => {}
        }
    }
    assert_eq!(sent, got.is_some());
    got
}

#[test]
fn v1_body_lacks_v2_fields_and_v2_appends_four_bytes() {
    let mut s = pending_cpu();
    let mut v1 = Vec::new();
    s.encode(1, &mut v1);
    let mut v2 = Vec::new();
    s.encode(2, &mut v2);
    // index 4, state 1, device 4+4, three bools
    assert_eq!(v1.len(), 4 + 1 + 4 + 4 + 3);
    assert_eq!(v2.len(), v1.len() + 4);
    assert_eq!(&v2[..v1.len()], &v1[..]);
    assert_eq!(&v2[v1.len()..], &[1, 1, 0, 0]);
    let names: Vec<_> = devstate::fields_at(ConnectorState::fields(), 1)
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(
        names,
        [
            "index",
            "state",
            "device",
            "unplug_requested",
            "release_pending",
            "unplug_timed_out"
        ]
    );
    s.encode(1, &mut Vec::new());
    let _ = encode_section(&mut s, 1, m("ferry-1.0"), Tag::Section).unwrap();
}

#[test]
fn per_machine_layout_and_timer_subsection() {
    for (name, version, timer) in [
        ("ferry-1.0", 1, false),
        ("ferry-1.1", 1, true),
        ("ferry-2.0", 2, true),
    ] {
        let mut s = pending_cpu();
        let got = through_stream(&mut s, m(name)).unwrap();
        assert_eq!(got.remaining_known, timer, "{name}");
        assert_eq!(got.remaining_ms, if timer { 700 } else { 0 }, "{name}");
        if version == 1 {
            // the v2 fields keep their defaults and are marked unknown
            let mut want = pending_cpu();
            want.isolation = Isolation::default();
            want.allocation = Allocation::default();
            want.dr_indicator = DrIndicator::default();
            want.cc_cursor = 0;
            want.v2_known = false;
            want.remaining_known = timer;
            want.remaining_ms = if timer { 700 } else { 0 };
            assert_eq!(got, want);
        } else {
            assert_eq!(got, pending_cpu());
        }
        let raw = encode_section(&mut pending_cpu(), 1, m(name), Tag::Section).unwrap();
        let has_timer = raw.windows(12).any(|w| w == b"unplug-timer");
        assert_eq!(has_timer, timer, "{name}");
    }
}

#[test]
fn reset_state_connector_is_not_sent_anywhere() {
    for mt in machine_types::all() {
        let mut s = pending_cpu();
        s.unplug_requested = false;
        s.remaining_known = false;
        s.remaining_ms = 0;
        assert!(!s.needed(mt), "{mt}");
        assert!(through_stream(&mut s, mt).is_none());
        // an empty connector is never sent
        let mut e = ConnectorState {
            index: 0x4000_0008,
            state: DrcState::PhysicalPowerOn,
            dr_indicator: DrIndicator::Action,
            ..Default::default()
        };
        assert!(!e.needed(mt));
        assert!(through_stream(&mut e, mt).is_none());
    }
}

#[test]
fn v2_only_differences_are_sent_only_by_v2_types() {
    let mut s = ConnectorState {
        index: 0x4000_0008,
        state: DrcState::PhysicalConfigured,
        device: "nic0".into(),
        isolation: Isolation::Unisolated,
        allocation: Allocation::Usable,
        dr_indicator: DrIndicator::Identify,
        ..Default::default()
    };
    assert!(!s.needed(m("ferry-1.0")));
    assert!(!s.needed(m("ferry-1.1")));
    assert!(s.needed(m("ferry-2.0")));
    assert_eq!(
        through_stream(&mut s, m("ferry-2.0")).unwrap().dr_indicator,
        DrIndicator::Identify
    );
    s.dr_indicator = DrIndicator::Active;
    s.cc_cursor = 2;
    assert!(s.needed(m("ferry-2.0")) && !s.needed(m("ferry-1.1")));
    s.cc_cursor = 0;
    s.release_pending = true;
    s.state = DrcState::PhysicalPowerOn;
    assert!(machine_types::all().iter().all(|mt| s.needed(mt)));
}

#[test]
fn post_load_rejects_bad_values() {
    let check = |s: &mut ConnectorState, v: u32| s.post_load(v);
    let mut s = pending_cpu();
    assert!(check(&mut s, 2).is_ok());
    // Values the enum has but a CPU core may not be in (0, 9.. are the codec's: see below).
    for bad in [DrcState::PhysicalAvailable, DrcState::PhysicalPowerOn] {
        s.state = bad;
        assert!(
            check(&mut s, 2)
                .unwrap_err()
                .contains("not a valid cpu-core")
        );
    }
    let mut s = pending_cpu();
    s.index = 0x2000_0001;
    assert!(check(&mut s, 1).is_err());
    let mut s = pending_cpu();
    s.device.clear();
    assert!(check(&mut s, 1).is_err());
    let mut s = pending_cpu();
    s.cc_cursor = 8;
    assert!(check(&mut s, 2).is_err());
    assert!(check(&mut s, 1).is_ok(), "v1 does not carry the cursor");
    assert!(!s.v2_known);
}

/// Decode a `connector` v2 body with byte `at` replaced by `v`.
fn decode_patched(at: usize, v: u8) -> Result<ConnectorState, DecodeError> {
    let mut body = Vec::new();
    pending_cpu().encode(2, &mut body);
    body[at] = v;
    let mut s = ConnectorState::default();
    let mut r = Reader::new(&body, 1000, "connector");
    s.decode_into(2, &mut r).map(|()| s)
}

#[test]
fn codec_refuses_enum_values_with_field_and_offset() {
    // body: index 0..4, state 4, device 5..13, bools 13..16, isolation 16, allocation 17,
    // dr_indicator 18, cc_cursor 19
    for (at, field, bad) in [
        (4, "state", 0u8),
        (4, "state", 9),
        (4, "state", 200),
        (16, "isolation", 2),
        (17, "allocation", 2),
        (18, "dr_indicator", 4),
        (18, "dr_indicator", 0xff),
    ] {
        match decode_patched(at, bad) {
            Err(DecodeError::InvalidValue {
                section,
                field: f,
                value,
                offset,
            }) => {
                assert_eq!(
                    (section.as_str(), f.as_str(), value, offset),
                    ("connector", field, u64::from(bad), 1000 + at as u64)
                );
            }
            other => panic!("{field}={bad}: {other:?}"),
        }
    }
    let ok = decode_patched(18, 3).unwrap();
    assert_eq!(ok.dr_indicator, DrIndicator::Action);
    assert_eq!(
        decode_patched(4, 6).unwrap().state,
        DrcState::PhysicalPowerOn
    );

    // a guest event kind: 0 (the controller's "no event") and 3 are refused
    for bad in [0u8, 3] {
        let mut body = Vec::new();
        let mut q = EventQueueState::default();
        q.events.push(GuestEventState {
            index: 0x8000_0001,
            kind: GuestEventKind::Unplug,
        });
        q.encode(1, &mut body);
        body[8] = bad; // count 0..4, index 4..8, kind 8
        let mut r = Reader::new(&body, 0, "hotplug-events");
        let e = EventQueueState::default()
            .decode_into(1, &mut r)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Invalid value {bad} for field 'kind' in section 'hotplug-events' at offset 8")
        );
    }
}

#[test]
fn event_and_controller_sections() {
    let mut q = EventQueueState::default();
    assert!(!q.needed(m("ferry-1.0")));
    q.events.push(GuestEventState {
        index: 0x8000_0001,
        kind: GuestEventKind::Hotplug,
    });
    assert!(q.needed(m("ferry-1.0")));
    assert_eq!(q.events().unwrap()[0].kind, GuestEventKind::Hotplug);
    q.events[0].index = 0x2000_0001;
    assert!(q.post_load(1).is_err(), "not a connector index");
    assert!(!ControllerState::default().needed(m("ferry-2.0")));
    let c = ControllerState {
        selector: 1,
        ..Default::default()
    };
    assert!(c.needed(m("ferry-2.0")));
    // the event list is bounded by the queue capacity
    let f = EventQueueState::fields();
    assert_eq!(
        f[0].kind,
        devstate::FieldKind::List {
            max: EVENT_QUEUE_CAPACITY as u32,
            of: Box::new(<GuestEventState as devstate::Field>::kind(0)),
        }
    );
}

#[test]
fn schema_per_machine_type() {
    let cat = catalog();
    let s10 = cat.schema(m("ferry-1.0"));
    let c10 = s10.section("connector").unwrap();
    assert_eq!(c10.version, 1);
    assert!(c10.subsections.is_empty());
    let c11 = cat.schema(m("ferry-1.1"));
    let c11 = c11.section("connector").unwrap();
    assert_eq!(c11.version, 1);
    assert_eq!(c11.subsections[0].name, "unplug-timer");
    assert!(c11.subsections[0].fields[0].volatile);
    let s20 = cat.schema(m("ferry-2.0"));
    let c20 = s20.section("connector").unwrap();
    assert_eq!(c20.version, 2);
    assert_eq!(c20.fields.len(), c10.fields.len() + 4);
    assert!(!c20.fields.iter().any(|f| f.name == "remaining_ms"));
}
