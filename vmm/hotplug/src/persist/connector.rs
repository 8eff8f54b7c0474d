//! Section `connector` (v1, v2) and its `unplug-timer` subsection.

use devstate::{Section, Sub, Subsection, record};
use machine_types::MachineType;

use crate::papr::{Allocation, ConnectorKind, DrIndicator, DrcState, Isolation};

record! {
    /// One connector (section `connector`, instance = PAPR index).
    pub struct ConnectorState {
        /// PAPR index; must equal the section instance.
        pub index: u32,
        /// Unified DRC state, LoPAPR wire value 1..=8 (0 and 9.. are refused by the codec).
        pub state: DrcState,
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
        pub isolation: Isolation [since = 2],
        /// Allocation (0 unusable, 1 usable), a projection of `state` and presence.
        pub allocation: Allocation [since = 2],
        /// DR indicator (0..=3); logical connectors always 0.
        pub dr_indicator: DrIndicator [since = 2],
        /// Configure-connector responses already returned by the current walk.
        pub cc_cursor: u8 [since = 2],
        /// Guest-running milliseconds left before a pending unplug times out
        /// (carried by the `unplug-timer` subsection).
        pub remaining_ms: u64 [skip, volatile],
        /// Whether `remaining_ms` is known (the subsection arrived, or this is a live state).
        pub remaining_known: bool [skip],
        /// Whether the v2 fields (isolation, allocation, DR indicator, cursor) are known (a v2
        /// body arrived, or this is a live state); a v1 stream leaves them at their defaults.
        pub v2_known: bool [skip],
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
pub(crate) const UNPLUG_TIMER: Sub<ConnectorState, UnplugTimerState> = Sub {
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
        let v1 = self.state != kind.ready_state()
            || self.unplug_requested
            || self.release_pending
            || self.unplug_timed_out;
        let v2 =
            self.cc_cursor != 0 || (kind.is_physical() && self.dr_indicator != DrIndicator::Active);
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

    fn post_load(&mut self, version: u32) -> Result<(), String> {
        let Some((kind, _)) = ConnectorKind::from_index(self.index) else {
            return Err(format!("{:#010x} is not a connector index", self.index));
        };
        if !self.state.valid_for(kind) {
            return Err(format!(
                "state {} is not a valid {} connector state",
                self.state.wire(),
                kind.name()
            ));
        }
        if self.device.is_empty() {
            return Err("connector section without an attached device".to_owned());
        }
        self.v2_known = version >= 2;
        if self.v2_known && usize::from(self.cc_cursor) >= kind.configure_script().len() {
            return Err(format!(
                "configure-connector cursor {} out of range",
                self.cc_cursor
            ));
        }
        Ok(())
    }
}
