//! The guest transition function: RTAS `set-indicator`, `get-sensor-state` and
//! `ibm,configure-connector` on one connector, following QEMU's `spapr_drc.c`.

use super::{Connector, Outcome};
use crate::papr::{
    Allocation, CcResponse, ConnectorKind, DrIndicator, DrcState, GuestOp, Isolation, RtasError,
    token,
};

impl Connector {
    /// The one guest transition function (RTAS `set-indicator`, `get-sensor-state`,
    /// `ibm,configure-connector`), following QEMU's `spapr_drc.c`.
    pub fn apply(&mut self, op: GuestOp) -> Result<Outcome, RtasError> {
        match op {
            GuestOp::SetIndicator {
                token: token::ISOLATION_STATE,
                value,
            } => match Isolation::from_guest(value) {
                Some(Isolation::Isolated) if self.kind.is_physical() => self.isolate_physical(),
                Some(Isolation::Isolated) => self.isolate_logical(),
                Some(Isolation::Unisolated) if self.kind.is_physical() => self.unisolate_physical(),
                Some(Isolation::Unisolated) => self.unisolate_logical(),
                None => Err(RtasError::ParamError),
            },
            GuestOp::SetIndicator {
                token: token::ALLOCATION_STATE,
                value,
            } => {
                if self.kind.is_physical() {
                    return Err(RtasError::NoSuchIndicator);
                }
                match Allocation::from_guest(value) {
                    Some(Allocation::Usable) => self.set_usable(),
                    Some(Allocation::Unusable) => self.set_unusable(),
                    None => Err(RtasError::ParamError),
                }
            }
            GuestOp::SetIndicator {
                token: token::DR_INDICATOR,
                value,
            } => {
                if !self.kind.is_physical() {
                    return Err(RtasError::NoSuchIndicator);
                }
                // QEMU stores any value; we refuse values LoPAPR does not define so the
                // migrated indicator is always one of the four.
                self.dr_indicator = DrIndicator::from_guest(value).ok_or(RtasError::ParamError)?;
                Ok(Outcome::Done)
            }
            GuestOp::SetIndicator { .. } => Err(RtasError::NoSuchIndicator),
            GuestOp::GetSensorState { token } => {
                if token == token::ENTITY_SENSE {
                    Ok(Outcome::Sensor(self.entity_sense()))
                } else {
                    Err(RtasError::ParamError)
                }
            }
            GuestOp::ConfigureConnector => self.configure_step(),
        }
    }

    /// The guest finished the unplug: the connector becomes release-pending.
    fn unplug_completed(&mut self) -> Outcome {
        self.unplug_requested = false;
        self.unplug_deadline_ms = None;
        self.release_pending = true;
        self.cc_cursor = 0;
        Outcome::UnplugCompleted
    }

    fn isolate_logical(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::LogicalAvailable | DrcState::LogicalUnusable => Ok(Outcome::Done),
            DrcState::LogicalConfigured => {
                if self.unplug_timed_out {
                    return Err(RtasError::HwError);
                }
                // drmgr tries any removable LMB: refuse those not being unplugged.
                if self.kind == ConnectorKind::MemBlock && !self.unplug_requested {
                    return Err(RtasError::HwError);
                }
                self.state = DrcState::LogicalAvailable;
                self.cc_cursor = 0;
                Ok(Outcome::Done)
            }
            _ => Err(RtasError::ParamError), // LogicalUnisolate
        }
    }

    fn unisolate_logical(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::LogicalUnisolate | DrcState::LogicalConfigured => {
                if self.unplug_requested && self.has_device() {
                    // The guest refuses the removal.
                    self.unplug_requested = false;
                    self.unplug_deadline_ms = None;
                    return Ok(Outcome::UnplugRejected);
                }
                self.unplug_timed_out = false;
                Ok(Outcome::Done)
            }
            DrcState::LogicalAvailable => {
                self.state = DrcState::LogicalUnisolate;
                self.cc_cursor = 0;
                self.unplug_timed_out = false;
                Ok(Outcome::Done)
            }
            _ => Err(RtasError::NoSuchIndicator), // LogicalUnusable
        }
    }

    fn set_usable(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::LogicalUnusable => {
                if !self.has_device() || self.unplug_requested {
                    return Err(RtasError::NoSuchIndicator);
                }
                self.state = DrcState::LogicalAvailable;
                self.unplug_timed_out = false;
                Ok(Outcome::Done)
            }
            _ => Ok(Outcome::Done),
        }
    }

    fn set_unusable(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::LogicalUnusable => Ok(Outcome::Done),
            DrcState::LogicalAvailable => {
                if self.unplug_timed_out {
                    return Err(RtasError::HwError);
                }
                self.state = DrcState::LogicalUnusable;
                if self.unplug_requested {
                    Ok(self.unplug_completed())
                } else {
                    Ok(Outcome::Done)
                }
            }
            _ => Err(RtasError::NoSuchIndicator), // Unisolate, Configured
        }
    }

    fn isolate_physical(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::PhysicalPowerOn => Ok(Outcome::Done),
            DrcState::PhysicalConfigured => {
                if self.unplug_timed_out {
                    return Err(RtasError::HwError);
                }
                self.state = DrcState::PhysicalPowerOn;
                self.cc_cursor = 0;
                if self.unplug_requested {
                    Ok(self.unplug_completed())
                } else {
                    Ok(Outcome::Done)
                }
            }
            _ => Err(RtasError::ParamError), // PhysicalUnisolate
        }
    }

    fn unisolate_physical(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::PhysicalUnisolate | DrcState::PhysicalConfigured => {
                self.unplug_timed_out = false;
                Ok(Outcome::Done)
            }
            _ => {
                // PhysicalPowerOn: cannot unisolate a non-existent resource.
                if !self.has_device() {
                    return Err(RtasError::NoSuchIndicator);
                }
                self.state = DrcState::PhysicalUnisolate;
                self.cc_cursor = 0;
                self.unplug_timed_out = false;
                Ok(Outcome::Done)
            }
        }
    }

    fn configure_step(&mut self) -> Result<Outcome, RtasError> {
        let unisolated = matches!(
            self.state,
            DrcState::LogicalUnisolate | DrcState::PhysicalUnisolate
        );
        if !unisolated && self.state != self.kind.ready_state() {
            return Err(RtasError::NotConfigurable);
        }
        self.unplug_timed_out = false;
        let script = self.kind.configure_script();
        let resp = script[usize::from(self.cc_cursor)];
        if resp == CcResponse::Success {
            self.cc_cursor = 0;
            if unisolated {
                self.state = self.kind.ready_state();
                return Ok(Outcome::Configured);
            }
        } else {
            self.cc_cursor += 1;
        }
        Ok(Outcome::ConfigureStep(resp))
    }
}
