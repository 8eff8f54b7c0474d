//! The migrated form of a connector: [`Connector::to_state`] and the checked, atomic
//! [`Connector::restore`].

use super::{Connector, RestoreError};
use crate::papr::DrcState;
use crate::persist::ConnectorState;

impl Connector {
    /// The migrated form of this connector at guest-running time `now_ms`.
    pub fn to_state(&self, now_ms: u64) -> ConnectorState {
        ConnectorState {
            index: self.index(),
            state: self.state,
            device: self.device_id().unwrap_or_default().to_owned(),
            unplug_requested: self.unplug_requested,
            release_pending: self.release_pending,
            unplug_timed_out: self.unplug_timed_out,
            isolation: self.isolation(),
            allocation: self.allocation(),
            dr_indicator: self.dr_indicator,
            cc_cursor: self.cc_cursor,
            remaining_ms: self.remaining_ms(now_ms).unwrap_or(0),
            remaining_known: self.unplug_requested,
            v2_known: true,
        }
    }

    /// Overwrite this connector with a migrated state (the destination already has the same
    /// device attached, added before start). Fields an older section version does not carry
    /// take their reset values; without the `unplug-timer` subsection a pending unplug gets
    /// the full `timeout_ms` again, counted from `now_ms`. Atomic: on error nothing changed.
    pub fn restore(
        &mut self,
        s: &ConnectorState,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<(), RestoreError> {
        let err = |why: String| RestoreError {
            index: self.index(),
            why,
        };
        if s.index != self.index() {
            return Err(err(format!("stream carries index {:#010x}", s.index)));
        }
        let state = s.state;
        if !state.valid_for(self.kind) {
            return Err(err(format!(
                "state {} is not valid for a {}",
                state.wire(),
                self.kind.name()
            )));
        }
        match (self.device_id(), s.device.as_str()) {
            (_, "") => {
                return Err(err("section without an attached device".to_owned()));
            }
            (None, src) => {
                return Err(err(format!(
                    "device '{src}' is attached on the source but not here; add it with device_add before the incoming migration starts"
                )));
            }
            (Some(dst), src) if dst != src => {
                return Err(err(format!(
                    "source has device '{src}' attached, this side has '{dst}'"
                )));
            }
            _ => {}
        }
        let mut next = self.clone();
        next.state = state;
        next.unplug_requested = s.unplug_requested;
        next.release_pending = s.release_pending;
        next.unplug_timed_out = s.unplug_timed_out;
        next.unplug_deadline_ms = s.unplug_requested.then(|| {
            let left = if s.remaining_known {
                s.remaining_ms.min(timeout_ms)
            } else {
                timeout_ms
            };
            now_ms.saturating_add(left)
        });
        if s.v2_known {
            next.dr_indicator = s.dr_indicator;
            next.cc_cursor = s.cc_cursor;
        } else {
            // A v1 stream does not carry the indicator: a configured function shows ACTIVE,
            // one still waiting (e.g. for function 0 of its slot) INACTIVE, as a guest that
            // never touched it would have left it. A walk in progress restarts.
            next.dr_indicator =
                Self::reset_indicator(self.kind, state == DrcState::PhysicalConfigured);
            next.cc_cursor = 0;
        }
        if s.v2_known && s.isolation != next.isolation() {
            return Err(err(format!(
                "isolation {} disagrees with state {}",
                s.isolation as u8,
                state.name()
            )));
        }
        if s.v2_known && s.allocation != next.allocation() {
            return Err(err(format!(
                "allocation {} disagrees with state {}",
                s.allocation as u8,
                state.name()
            )));
        }
        next.check_invariants().map_err(err)?;
        *self = next;
        Ok(())
    }
}
