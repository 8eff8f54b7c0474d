//! Migrated state of the hotplug subsystem: plain `*State` structs, each with its one
//! `devstate` description beside it.
//!
//! | section | instance | versions | sent when |
//! |---|---|---|---|
//! | `connector` | PAPR index | v1 (ferry-1.x), v2 (ferry-2.0) | a device is attached and the connector is not at its reset state (Precise rule 4) |
//! | `connector/unplug-timer` | | v1 | machine has `drc_unplug_timer` (ferry-1.1+) and an unplug is pending |
//! | `hotplug-events` | 0 | v1 | the pending guest-event queue is not empty |
//! | `hotplug-controller` | 0 | v1 | a controller register differs from its reset value |
//!
//! `connector` v1 body: `index u32, state u8, device str(<=64), unplug_requested bool,
//! release_pending bool, unplug_timed_out bool`. v2 appends `isolation u8, allocation u8,
//! dr_indicator u8, cc_cursor u8`. A v1 stream leaves those at [`ABSENT`] and the
//! destination uses their reset values (indicator ACTIVE for an attached PCI function, cursor
//! 0: a guest mid-configure-connector restarts its walk). Isolation and allocation are
//! projections of `state`; v2 carries them so the stream is self-explanatory in `ferry-dump`
//! and the destination cross-checks them against `state`.

use devstate::{Catalog, Section, Sub, Subsection, record};
use machine_types::MachineType;

use super::connector::{ConnectorKind, DrcState};
use super::events::{EVENT_QUEUE_CAPACITY, GuestEvent, GuestEventKind};

/// In-memory marker of a v2 field a v1 stream did not carry (never on the wire).
pub const ABSENT: u8 = 0xff;

record! {
    /// One connector (section `connector`, instance = PAPR index).
    pub struct ConnectorState {
        /// PAPR index; must equal the section instance.
        pub index: u32,
        /// Unified DRC state, LoPAPR wire value 1..=8.
        pub state: u8,
        /// Id of the attached device (never empty in a sent section).
        pub device: String [max = 64],
        /// An unplug request waits for the guest.
        pub unplug_requested: bool,
        /// The guest completed an unplug during the migration; the side that runs the guest
        /// next releases the device and emits DEVICE_DELETED (Precise rule 3).
        pub release_pending: bool,
        /// The last unplug request timed out: a late guest completion gets an RTAS
        /// hardware error (Precise rule 4).
        pub unplug_timed_out: bool,
        /// Isolation (0 isolated, 1 unisolated), a projection of `state`.
        pub isolation: u8 [since = 2],
        /// Allocation (0 unusable, 1 usable), a projection of `state` and presence.
        pub allocation: u8 [since = 2],
        /// DR indicator (0..=3); logical connectors always 0.
        pub dr_indicator: u8 [since = 2],
        /// Configure-connector responses already returned by the current walk.
        pub cc_cursor: u8 [since = 2],
        /// Guest-running milliseconds left before a pending unplug times out
        /// (carried by the `unplug-timer` subsection).
        pub remaining_ms: u64 [skip, volatile],
        /// Whether `remaining_ms` is known (the subsection arrived, or this is a live state).
        pub remaining_known: bool [skip],
    }
}

record! {
    /// Body of the `unplug-timer` subsection.
    pub struct UnplugTimerState {
        /// Guest-running milliseconds left.
        pub remaining_ms: u64 [volatile],
    }
}

/// `connector/unplug-timer`: only machine types with `drc_unplug_timer`, only while an
/// unplug is pending. Without it the destination restarts the full timeout.
pub const UNPLUG_TIMER: Sub<ConnectorState, UnplugTimerState> = Sub {
    name: "unplug-timer",
    version: 1,
    for_machine: |m| m.compat().drc_unplug_timer,
    needed: |s| s.unplug_requested,
    get: |s| UnplugTimerState {
        remaining_ms: s.remaining_ms,
    },
    set: |s, t| {
        s.remaining_ms = t.remaining_ms;
        s.remaining_known = true;
    },
};

impl ConnectorState {
    /// Whether the fields section version `version` carries differ from the connector's
    /// reset state (a device is attached and something is transitional).
    pub fn transitional(&self, version: u32) -> bool {
        let Some((kind, _)) = ConnectorKind::from_index(self.index) else {
            return true;
        };
        if self.device.is_empty() {
            return false;
        }
        let v1 = self.state != kind.ready_state().wire()
            || self.unplug_requested
            || self.release_pending
            || self.unplug_timed_out;
        let v2 = self.cc_cursor != 0 || (kind.is_physical() && self.dr_indicator != 1);
        v1 || (version >= 2 && v2)
    }
}

impl Section for ConnectorState {
    const NAME: &'static str = "connector";
    const VERSION: u32 = 2;
    const MIN_VERSION: u32 = 1;

    fn save_version(m: &MachineType) -> u32 {
        m.compat().drc_section_version
    }

    /// Precise rule 4, on every machine type: attached and (not at reset state or unplug
    /// pending); release-pending is transitional, so always sent.
    fn needed(&self, m: &MachineType) -> bool {
        self.transitional(Self::save_version(m))
    }

    fn subsections() -> &'static [&'static dyn Subsection<Self>] {
        &[&UNPLUG_TIMER]
    }

    fn pre_load(&mut self) {
        self.isolation = ABSENT;
        self.allocation = ABSENT;
        self.dr_indicator = ABSENT;
        self.cc_cursor = ABSENT;
        self.remaining_known = false;
    }

    fn post_load(&mut self, version: u32) -> Result<(), String> {
        let Some((kind, _)) = ConnectorKind::from_index(self.index) else {
            return Err(format!("{:#010x} is not a connector index", self.index));
        };
        if !DrcState::from_wire(self.state).is_some_and(|s| s.valid_for(kind)) {
            return Err(format!(
                "state {} is not a valid {} connector state",
                self.state,
                kind.name()
            ));
        }
        if self.device.is_empty() {
            return Err("connector section without an attached device".to_owned());
        }
        if version >= 2 {
            if self.isolation > 1 || self.allocation > 1 || self.dr_indicator > 3 {
                return Err("isolation, allocation or DR indicator out of range".to_owned());
            }
            if usize::from(self.cc_cursor) >= kind.configure_script().len() {
                return Err(format!(
                    "configure-connector cursor {} out of range",
                    self.cc_cursor
                ));
            }
        }
        Ok(())
    }
}

record! {
    /// One pending guest event.
    pub struct GuestEventState {
        /// Connector index.
        pub index: u32,
        /// 1 hotplug, 2 unplug.
        pub kind: u8,
    }
}

record! {
    /// The pending guest-event queue (section `hotplug-events`, instance 0), oldest first.
    pub struct EventQueueState {
        /// Events (bound = `EVENT_QUEUE_CAPACITY`).
        pub events: Vec<GuestEventState> [max = 64],
    }
}

impl EventQueueState {
    /// Decoded events; `Err` on an unknown kind or index type.
    pub fn events(&self) -> Result<Vec<GuestEvent>, String> {
        self.events
            .iter()
            .map(|e| {
                let kind = GuestEventKind::from_wire(e.kind)
                    .ok_or_else(|| format!("unknown guest event kind {}", e.kind))?;
                ConnectorKind::from_index(e.index)
                    .ok_or_else(|| format!("{:#010x} is not a connector index", e.index))?;
                Ok(GuestEvent {
                    index: e.index,
                    kind,
                })
            })
            .collect()
    }
}

impl Section for EventQueueState {
    const NAME: &'static str = "hotplug-events";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;

    fn needed(&self, _m: &MachineType) -> bool {
        !self.events.is_empty()
    }

    fn post_load(&mut self, _version: u32) -> Result<(), String> {
        debug_assert_eq!(EVENT_QUEUE_CAPACITY, 64);
        self.events().map(|_| ())
    }
}

record! {
    /// The controller's registers (section `hotplug-controller`, instance 0).
    pub struct ControllerState {
        /// SELECTOR.
        pub selector: u32,
        /// ARG.
        pub arg: u32,
        /// OP (last op code).
        pub last_op: u32,
        /// STATUS.
        pub status: i32,
        /// VALUE.
        pub value: u32,
        /// Latched event index.
        pub event_index: u32,
        /// Latched event kind.
        pub event_kind: u32,
    }
}

impl Section for ControllerState {
    const NAME: &'static str = "hotplug-controller";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;

    fn needed(&self, _m: &MachineType) -> bool {
        *self != ControllerState::default()
    }
}

/// Register the hotplug sections in a catalog.
pub fn register_sections(c: &mut Catalog) -> &mut Catalog {
    c.register::<ConnectorState>()
        .register::<EventQueueState>()
        .register::<ControllerState>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use devstate::{Item, Record, StreamReader, StreamWriter, Tag, encode_section};

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
            state: DrcState::LogicalConfigured.wire(),
            device: "cpu3".into(),
            unplug_requested: true,
            release_pending: false,
            unplug_timed_out: false,
            isolation: 1,
            allocation: 1,
            dr_indicator: 0,
            cc_cursor: 0,
            remaining_ms: 700,
            remaining_known: true,
        }
    }

    /// Write `s` in a full stream for `machine` and load it back through the catalog.
    fn through_stream(
        s: &mut ConnectorState,
        machine: &'static MachineType,
    ) -> Option<ConnectorState> {
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
                assert_eq!(
                    (
                        got.isolation,
                        got.allocation,
                        got.dr_indicator,
                        got.cc_cursor
                    ),
                    (ABSENT, ABSENT, ABSENT, ABSENT)
                );
                let mut want = pending_cpu();
                want.isolation = ABSENT;
                want.allocation = ABSENT;
                want.dr_indicator = ABSENT;
                want.cc_cursor = ABSENT;
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
                state: DrcState::PhysicalPowerOn.wire(),
                dr_indicator: 3,
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
            state: DrcState::PhysicalConfigured.wire(),
            device: "nic0".into(),
            isolation: 1,
            allocation: 1,
            dr_indicator: 2, // identify
            ..Default::default()
        };
        assert!(!s.needed(m("ferry-1.0")));
        assert!(!s.needed(m("ferry-1.1")));
        assert!(s.needed(m("ferry-2.0")));
        assert_eq!(
            through_stream(&mut s, m("ferry-2.0")).unwrap().dr_indicator,
            2
        );
        s.dr_indicator = 1;
        s.cc_cursor = 2;
        assert!(s.needed(m("ferry-2.0")) && !s.needed(m("ferry-1.1")));
        s.cc_cursor = 0;
        s.release_pending = true;
        s.state = DrcState::PhysicalPowerOn.wire();
        assert!(machine_types::all().iter().all(|mt| s.needed(mt)));
    }

    #[test]
    fn post_load_rejects_bad_values() {
        let check = |s: &mut ConnectorState, v: u32| s.post_load(v);
        let mut s = pending_cpu();
        assert!(check(&mut s, 2).is_ok());
        for bad in [0u8, 5, 6, 9, 200] {
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
        s.dr_indicator = 4;
        assert!(check(&mut s, 2).is_err());
        let mut s = pending_cpu();
        s.cc_cursor = 8;
        assert!(check(&mut s, 2).is_err());
        s.cc_cursor = ABSENT;
        assert!(check(&mut s, 1).is_ok(), "v1 does not carry the cursor");
    }

    #[test]
    fn event_and_controller_sections() {
        let mut q = EventQueueState::default();
        assert!(!q.needed(m("ferry-1.0")));
        q.events.push(GuestEventState {
            index: 0x8000_0001,
            kind: 1,
        });
        assert!(q.needed(m("ferry-1.0")));
        assert_eq!(q.events().unwrap()[0].kind, GuestEventKind::Hotplug);
        q.events[0].kind = 3;
        assert!(q.post_load(1).is_err());
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
}
