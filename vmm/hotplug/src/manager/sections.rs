//! Save and load of the hotplug sections (connectors, event queue, controller).

use std::io::{self, Write};

use devstate::{RawSection, Section, StreamWriter, Tag, encode_section};
use machine_types::MachineType;

use super::{HotplugManager, LoadError};
use crate::persist::{ConnectorState, ControllerState, EventQueueState, GuestEventState};

impl HotplugManager {
    /// Migrated state of every connector (sent or not) at guest-running time `now_ms`.
    pub fn connector_states(&self, now_ms: u64) -> Vec<ConnectorState> {
        self.connectors
            .values()
            .map(|c| c.to_state(now_ms))
            .collect()
    }

    /// Migrated form of the event queue.
    pub fn events_state(&self) -> EventQueueState {
        EventQueueState {
            events: self
                .events
                .iter()
                .map(|e| GuestEventState {
                    index: e.index,
                    kind: e.kind,
                })
                .collect(),
        }
    }

    /// Migrated form of the controller registers.
    pub fn controller_state(&self) -> ControllerState {
        self.controller.to_state()
    }

    /// Every needed hotplug section for machine type `m`, framed, in stream order
    /// (connectors by index, then events, then controller).
    pub fn encode_sections(&self, m: &MachineType, now_ms: u64) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = self
            .connector_states(now_ms)
            .into_iter()
            .filter_map(|mut s| {
                let i = s.index;
                encode_section(&mut s, i, m, Tag::Section)
            })
            .collect();
        out.extend(encode_section(&mut self.events_state(), 0, m, Tag::Section));
        out.extend(encode_section(
            &mut self.controller_state(),
            0,
            m,
            Tag::Section,
        ));
        out
    }

    /// Write every needed hotplug section; returns how many were written.
    pub fn save<W: Write>(&self, w: &mut StreamWriter<W>, now_ms: u64) -> io::Result<usize> {
        let recs = self.encode_sections(w.machine(), now_ms);
        for r in &recs {
            w.raw(r)?;
        }
        Ok(recs.len())
    }

    /// Load one incoming section if it is a hotplug one (`Ok(false)` otherwise). Call after
    /// [`reset_all`](Self::reset_all); `now_ms` is this side's guest-running clock.
    pub fn load_section(&mut self, raw: &RawSection, now_ms: u64) -> Result<bool, LoadError> {
        match raw.name.as_str() {
            ConnectorState::NAME => {
                let s: ConnectorState = raw.load()?;
                if s.index != raw.instance {
                    return Err(LoadError::Invalid {
                        section: ConnectorState::NAME,
                        why: format!(
                            "instance {:#010x} carries index {:#010x}",
                            raw.instance, s.index
                        ),
                    });
                }
                let timeout = self.config.unplug_timeout_ms;
                let c =
                    self.connectors
                        .get_mut(&raw.instance)
                        .ok_or(LoadError::UnknownConnector {
                            index: raw.instance,
                        })?;
                c.restore(&s, now_ms, timeout)?;
            }
            EventQueueState::NAME => {
                let s: EventQueueState = raw.load()?;
                self.restore_events(&s)?;
            }
            ControllerState::NAME => {
                let s: ControllerState = raw.load()?;
                self.controller.restore(&s);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Replace the pending queue with the migrated one.
    pub fn restore_events(&mut self, s: &EventQueueState) -> Result<(), LoadError> {
        let invalid = |why| LoadError::Invalid {
            section: EventQueueState::NAME,
            why,
        };
        let evs = s.events().map_err(invalid)?;
        if let Some(e) = evs.iter().find(|e| !self.connectors.contains_key(&e.index)) {
            return Err(invalid(format!(
                "event for unknown connector {:#010x}",
                e.index
            )));
        }
        self.events.clear();
        for e in evs {
            self.events.push(e).map_err(|e| invalid(e.to_string()))?;
        }
        self.irq_request = !self.events.is_empty();
        Ok(())
    }
}
