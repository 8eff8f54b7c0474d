//! One hotplug connector (a PAPR Dynamic Reconfiguration Connector, DRC) and its state machine.
//!
//! The model follows QEMU's unified DRC state machine (`hw/ppc/spapr_drc.c`): a single
//! [`DrcState`] whose wire values are LoPAPR's (0 invalid, 1..=4 logical, 5..=8 physical).
//! Isolation and allocation are projections of that state (as in QEMU since 2.11), the DR
//! indicator is stored separately (physical connectors only).
//!
//! Every guest operation goes through [`Connector::apply`], the one transition function.
//! Management operations (attach, unplug request, timeout, reset) are separate methods so the
//! guest can never trigger them. Release of a device after a completed unplug is two-step:
//! the guest's last step moves the connector to *release-pending* (a consistent state that is
//! migrated by every machine type) and whoever runs the guest afterwards calls
//! [`Connector::complete_release`] (Precise rule 3).
//!
//! - [`types`]: what the runtime hands out ([`Outcome`], [`AttachedDevice`], ...).
//! - `state_machine`: [`Connector::apply`], the guest transition function.
//! - `management`: attach, unplug request, timeout, release and reset.
//! - `migration`: [`Connector::to_state`] and [`Connector::restore`].

mod management;
mod migration;
mod state_machine;
#[cfg(test)]
mod tests;
pub mod types;

pub use types::{
    AttachedDevice, BusyReason, DEVICE_ID_MAX, Outcome, RestoreError, UnplugRequest,
    valid_device_id,
};

use crate::papr::{
    Allocation, ConnectorKind, DrIndicator, DrcState, EntitySense, Isolation, MAX_CONNECTOR_ID,
    allocation_of, isolation_of,
};

/// One hotplug connector (runtime structure; its migrated form is [`ConnectorState`](crate::ConnectorState)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connector {
    kind: ConnectorKind,
    id: u32,
    state: DrcState,
    dr_indicator: DrIndicator,
    cc_cursor: u8,
    device: Option<AttachedDevice>,
    unplug_requested: bool,
    unplug_deadline_ms: Option<u64>,
    unplug_timed_out: bool,
    release_pending: bool,
}

impl Connector {
    /// An empty connector at its reset state.
    ///
    /// # Panics
    /// If `id` exceeds [`MAX_CONNECTOR_ID`] (a configuration bug).
    pub fn new(kind: ConnectorKind, id: u32) -> Connector {
        assert!(id <= MAX_CONNECTOR_ID, "connector id {id} out of range");
        Connector {
            kind,
            id,
            state: kind.empty_state(),
            dr_indicator: DrIndicator::Inactive,
            cc_cursor: 0,
            device: None,
            unplug_requested: false,
            unplug_deadline_ms: None,
            unplug_timed_out: false,
            release_pending: false,
        }
    }

    /// Kind.
    pub fn kind(&self) -> ConnectorKind {
        self.kind
    }
    /// Id within its kind (core id, memory slot, PCI devfn).
    pub fn id(&self) -> u32 {
        self.id
    }
    /// PAPR index.
    pub fn index(&self) -> u32 {
        self.kind.index(self.id)
    }
    /// Unified state.
    pub fn state(&self) -> DrcState {
        self.state
    }
    /// DR indicator (always INACTIVE on logical connectors).
    pub fn dr_indicator(&self) -> DrIndicator {
        self.dr_indicator
    }
    /// Configure-connector cursor: responses already returned by the current walk.
    pub fn cc_cursor(&self) -> u8 {
        self.cc_cursor
    }
    /// The attached device (also while release-pending).
    pub fn device(&self) -> Option<&AttachedDevice> {
        self.device.as_ref()
    }
    /// Id of the attached device.
    pub fn device_id(&self) -> Option<&str> {
        self.device.as_ref().map(|d| d.id.as_str())
    }
    /// Whether an unplug request waits for the guest.
    pub fn unplug_requested(&self) -> bool {
        self.unplug_requested
    }
    /// Guest-running time at which a pending unplug times out.
    pub fn unplug_deadline_ms(&self) -> Option<u64> {
        self.unplug_deadline_ms
    }
    /// Whether the last unplug request timed out (a late guest completion is refused).
    pub fn unplug_timed_out(&self) -> bool {
        self.unplug_timed_out
    }
    /// Whether the guest completed an unplug whose release has not run yet.
    pub fn release_pending(&self) -> bool {
        self.release_pending
    }
    /// Whether the guest side sees a device (attached and not release-pending).
    pub fn has_device(&self) -> bool {
        self.device.is_some() && !self.release_pending
    }
    /// Milliseconds left before a pending unplug times out.
    pub fn remaining_ms(&self, now_ms: u64) -> Option<u64> {
        self.unplug_deadline_ms.map(|d| d.saturating_sub(now_ms))
    }

    /// Isolation, derived from the unified state.
    pub fn isolation(&self) -> Isolation {
        isolation_of(self.state)
    }

    /// Allocation, derived: logical connectors from the state (USABLE from AVAILABLE up),
    /// physical ones from presence (they have no allocation indicator of their own).
    pub fn allocation(&self) -> Allocation {
        allocation_of(self.kind, self.state, self.has_device())
    }

    /// dr-entity-sense as the guest reads it.
    pub fn entity_sense(&self) -> EntitySense {
        if self.kind.is_physical() {
            if self.has_device() {
                EntitySense::Present
            } else {
                EntitySense::Empty
            }
        } else if self.state == DrcState::LogicalUnusable {
            EntitySense::Unusable
        } else {
            EntitySense::Present
        }
    }

    /// The DR indicator a reset gives this connector (Precise rule 5).
    fn reset_indicator(kind: ConnectorKind, attached: bool) -> DrIndicator {
        if kind.is_physical() && attached {
            DrIndicator::Active
        } else {
            DrIndicator::Inactive
        }
    }

    /// Whether the connector is exactly what a reset would make of it, given its device.
    /// A connector with a device that is not at its reset state is *transitional*.
    pub fn at_reset_state(&self) -> bool {
        let attached = self.device.is_some();
        let state = if attached {
            self.kind.ready_state()
        } else {
            self.kind.empty_state()
        };
        self.state == state
            && !self.unplug_requested
            && !self.release_pending
            && !self.unplug_timed_out
            && self.cc_cursor == 0
            && self.dr_indicator == Self::reset_indicator(self.kind, attached)
    }

    /// Why a new device cannot be plugged right now, if the reason is transient.
    pub fn busy_reason(&self) -> Option<BusyReason> {
        if self.release_pending {
            Some(BusyReason::ReleasePending)
        } else if self.unplug_requested {
            Some(BusyReason::UnplugPending)
        } else if self.dr_indicator.is_blinking() {
            Some(BusyReason::IndicatorBlinking)
        } else if self.device.is_some()
            && (self.cc_cursor != 0
                || (self.state != self.kind.empty_state() && self.state != self.kind.ready_state()))
        {
            Some(BusyReason::Configuring)
        } else {
            None
        }
    }

    /// Check every invariant of the model; `Err` names the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let k = self.kind;
        let fail = |why: &str| Err(format!("connector {:#010x}: {why}", self.index()));
        if !self.state.valid_for(k) {
            return fail(&format!(
                "state {} invalid for {}",
                self.state.name(),
                k.name()
            ));
        }
        if self.state != k.empty_state() && !self.has_device() {
            return fail("non-empty state without a device");
        }
        if self.unplug_requested != self.unplug_deadline_ms.is_some() {
            return fail("unplug request and deadline disagree");
        }
        if self.unplug_requested && (!self.has_device() || self.state == k.empty_state()) {
            return fail("unplug pending without a device in use");
        }
        if self.unplug_timed_out && (!self.has_device() || self.unplug_requested) {
            return fail("timed-out flag without a device or with a pending request");
        }
        if self.release_pending && (self.device.is_none() || self.state != k.empty_state()) {
            return fail("release pending outside the empty state");
        }
        if usize::from(self.cc_cursor) >= k.configure_script().len() {
            return fail("configure-connector cursor past the fragment");
        }
        if self.cc_cursor != 0
            && !matches!(
                self.state,
                DrcState::LogicalUnisolate
                    | DrcState::LogicalConfigured
                    | DrcState::PhysicalUnisolate
                    | DrcState::PhysicalConfigured
            )
        {
            return fail("configure-connector cursor outside unisolate/configured");
        }
        if !k.is_physical() && self.dr_indicator != DrIndicator::Inactive {
            return fail("logical connector with a DR indicator");
        }
        if let Some(d) = &self.device
            && !valid_device_id(&d.id)
        {
            return fail("invalid device id");
        }
        Ok(())
    }
}
