//! The guest side: operations on connectors (with their side effects) and the controller's
//! port I/O.

use super::{Effect, HotplugManager};
use crate::connector::{Connector, Outcome};
use crate::controller::ControllerBackend;
use crate::events::GuestEvent;
use crate::papr::{GuestOp, RtasError};

impl HotplugManager {
    /// Run a guest operation on connector `index` and act on its outcome: a completed unplug
    /// releases the device (or leaves it release-pending while a migration is in flight), a
    /// refusal emits DEVICE_UNPLUG_GUEST_ERROR at once, a finished configure-connector
    /// queues [`Effect::Configured`].
    pub fn guest_op(&mut self, index: u32, op: GuestOp) -> Result<Outcome, RtasError> {
        let Some(conn) = self.connectors.get_mut(&index) else {
            return Err(match op {
                GuestOp::SetIndicator { .. } => RtasError::NoSuchIndicator,
                GuestOp::GetSensorState { .. } => RtasError::ParamError,
                GuestOp::ConfigureConnector => RtasError::NotConfigurable,
            });
        };
        let res = conn.apply(op);
        match res {
            Ok(Outcome::UnplugCompleted) => {
                if self.migrating {
                    tracing::info!(
                        id = conn.device_id(),
                        "guest completed unplug during migration: release pending"
                    );
                } else {
                    let dev = conn.complete_release().expect("release pending");
                    self.released(index, dev);
                }
            }
            Ok(Outcome::UnplugRejected) => {
                tracing::warn!(
                    "Device hotunplug rejected by the guest for device {}",
                    conn.device_id().unwrap_or_default()
                );
                self.guest_error(index);
            }
            Ok(Outcome::Configured) => {
                let device = conn.device_id().expect("configured").to_owned();
                let resource = self.resource(index).expect("exists");
                self.effects.push(Effect::Configured { device, resource });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(index = format_args!("{index:#010x}"), ?op, %e, "guest op refused")
            }
        }
        res
    }

    /// Pop the oldest pending guest event.
    pub fn pop_event(&mut self) -> Option<GuestEvent> {
        self.events.pop()
    }

    /// Guest port read at `offset` from the controller base.
    pub fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        let mut c = self.controller;
        c.pio_read(self, offset, data);
        self.controller = c;
    }

    /// Guest port write at `offset` from the controller base.
    pub fn pio_write(&mut self, offset: u16, data: &[u8]) {
        let mut c = self.controller;
        c.pio_write(self, offset, data);
        self.controller = c;
    }
}

impl ControllerBackend for HotplugManager {
    fn pop_event(&mut self) -> Option<GuestEvent> {
        self.events.pop()
    }
    fn pending_events(&self) -> usize {
        self.events.len()
    }
    fn guest_op(&mut self, index: u32, op: GuestOp) -> Result<Outcome, RtasError> {
        HotplugManager::guest_op(self, index, op)
    }
    fn cc_cursor(&self, index: u32) -> u8 {
        self.connectors.get(&index).map_or(0, Connector::cc_cursor)
    }
}
