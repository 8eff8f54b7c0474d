//! Section `hotplug-events`: the pending guest-event queue.

use devstate::{Section, record};
use machine_types::MachineType;

use crate::events::{EVENT_QUEUE_CAPACITY, GuestEvent, GuestEventKind};
use crate::papr::ConnectorKind;

record! {
    /// One pending guest event.
    pub struct GuestEventState {
        /// Connector index.
        pub index: u32,
        /// 1 hotplug, 2 unplug (anything else is refused by the codec).
        pub kind: GuestEventKind,
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
    /// Decoded events; `Err` on an index of no connector type.
    pub fn events(&self) -> Result<Vec<GuestEvent>, String> {
        self.events
            .iter()
            .map(|e| {
                ConnectorKind::from_index(e.index)
                    .ok_or_else(|| format!("{:#010x} is not a connector index", e.index))?;
                Ok(GuestEvent {
                    index: e.index,
                    kind: e.kind,
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
