//! The pending guest-event queue: hotplug and unplug requests the guest has not fetched yet.
//!
//! Bounded ([`EVENT_QUEUE_CAPACITY`]) and FIFO. The guest pops events through the controller's
//! EVENT register. The queue is guest-visible state: it is migrated (section
//! `hotplug-events`), cleared by every reset, and the incoming side replaces its own queue
//! with the migrated one (seed 002: "nukes the list first").

use crate::papr::ConnectorKind;
use devstate::WireEnum;
use std::collections::VecDeque;

/// Most events the queue holds. A `device_add`/`device_del` that would overflow it fails with
/// a transient error and changes nothing. (`persist::EventQueueState` repeats the literal.)
pub const EVENT_QUEUE_CAPACITY: usize = 64;

/// What the guest is asked to do. Wire value 0 is reserved (the controller's "no event"):
/// the codec refuses it. `Default` only gives a decoded record a starting value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GuestEventKind {
    /// A device was attached: configure it.
    #[default]
    Hotplug = 1,
    /// Release the device.
    Unplug = 2,
}

impl GuestEventKind {
    /// Wire value (also the controller's EVENT_KIND value).
    pub const fn wire(self) -> u8 {
        self as u8
    }

    /// Name used in logs.
    pub const fn name(self) -> &'static str {
        match self {
            GuestEventKind::Hotplug => "hotplug",
            GuestEventKind::Unplug => "unplug",
        }
    }
}

impl WireEnum for GuestEventKind {
    type Repr = u8;
    const VALUES: &'static [Self] = &[GuestEventKind::Hotplug, GuestEventKind::Unplug];
    fn to_wire(self) -> u8 {
        self.wire()
    }
}

/// One pending guest event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestEvent {
    /// PAPR index of the connector.
    pub index: u32,
    /// Hotplug or unplug.
    pub kind: GuestEventKind,
}

impl GuestEvent {
    /// Kind of the connector the event is about.
    pub fn connector_kind(&self) -> Option<ConnectorKind> {
        ConnectorKind::from_index(self.index).map(|(k, _)| k)
    }
}

/// The queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest event queue is full ({EVENT_QUEUE_CAPACITY} events pending)")]
pub struct QueueFull;

/// Bounded FIFO of pending guest events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQueue {
    q: VecDeque<GuestEvent>,
}

impl EventQueue {
    /// An empty queue.
    pub fn new() -> EventQueue {
        EventQueue::default()
    }

    /// Number of pending events.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Whether no event is pending.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Free entries.
    pub fn free(&self) -> usize {
        EVENT_QUEUE_CAPACITY - self.q.len()
    }

    /// Whether an identical event is pending.
    pub fn contains(&self, ev: &GuestEvent) -> bool {
        self.q.contains(ev)
    }

    /// Append `ev` unless an identical event is still pending (then the guest will see it
    /// anyway; a second copy would only make it repeat the same request). Returns whether it
    /// was appended.
    pub fn push(&mut self, ev: GuestEvent) -> Result<bool, QueueFull> {
        if self.q.contains(&ev) {
            return Ok(false);
        }
        if self.q.len() >= EVENT_QUEUE_CAPACITY {
            return Err(QueueFull);
        }
        self.q.push_back(ev);
        Ok(true)
    }

    /// Take the oldest event.
    pub fn pop(&mut self) -> Option<GuestEvent> {
        self.q.pop_front()
    }

    /// Drop every event.
    pub fn clear(&mut self) {
        self.q.clear();
    }

    /// Drop the pending events about connector `index` (of `kind`, or all kinds); returns how
    /// many were dropped. Used when a request became moot (released at once, timed out, or
    /// refused by the guest).
    pub fn remove_for(&mut self, index: u32, kind: Option<GuestEventKind>) -> usize {
        let before = self.q.len();
        self.q
            .retain(|e| !(e.index == index && kind.is_none_or(|k| k == e.kind)));
        before - self.q.len()
    }

    /// Pending events, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &GuestEvent> {
        self.q.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(index: u32, kind: GuestEventKind) -> GuestEvent {
        GuestEvent { index, kind }
    }

    #[test]
    fn fifo_order_and_pop_empty() {
        let mut q = EventQueue::new();
        assert_eq!(q.pop(), None);
        for i in 0..5 {
            assert_eq!(
                q.push(ev(0x1000_0000 | i, GuestEventKind::Hotplug)),
                Ok(true)
            );
        }
        let got: Vec<u32> = std::iter::from_fn(|| q.pop())
            .map(|e| e.index & 0xf)
            .collect();
        assert_eq!(got, [0, 1, 2, 3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn bounded_and_full_push_changes_nothing() {
        let mut q = EventQueue::new();
        for i in 0..EVENT_QUEUE_CAPACITY as u32 {
            q.push(ev(0x8000_0000 | i, GuestEventKind::Hotplug))
                .unwrap();
        }
        assert_eq!(q.free(), 0);
        let before = q.clone();
        assert_eq!(
            q.push(ev(0x4000_0000, GuestEventKind::Unplug)),
            Err(QueueFull)
        );
        assert_eq!(q, before);
        // An identical pending event is not an overflow: nothing to add.
        assert_eq!(q.push(ev(0x8000_0000, GuestEventKind::Hotplug)), Ok(false));
        assert_eq!(
            QueueFull.to_string(),
            "guest event queue is full (64 events pending)"
        );
    }

    #[test]
    fn duplicates_are_kept_once_and_remove_for_filters() {
        let mut q = EventQueue::new();
        q.push(ev(0x1000_0001, GuestEventKind::Unplug)).unwrap();
        assert_eq!(q.push(ev(0x1000_0001, GuestEventKind::Unplug)), Ok(false));
        q.push(ev(0x1000_0001, GuestEventKind::Hotplug)).unwrap();
        q.push(ev(0x1000_0002, GuestEventKind::Unplug)).unwrap();
        assert_eq!(q.len(), 3);
        assert_eq!(q.remove_for(0x1000_0001, Some(GuestEventKind::Unplug)), 1);
        assert_eq!(q.remove_for(0x1000_0001, None), 1);
        assert_eq!(q.iter().map(|e| e.index).collect::<Vec<_>>(), [0x1000_0002]);
        assert_eq!(
            q.iter().next().unwrap().connector_kind(),
            Some(ConnectorKind::CpuCore)
        );
        q.clear();
        assert!(q.is_empty());
    }

    #[test]
    fn kind_wire_values() {
        assert_eq!(GuestEventKind::Hotplug.wire(), 1);
        assert_eq!(GuestEventKind::Unplug.wire(), 2);
        assert_eq!(GuestEventKind::from_wire(0), None);
        assert_eq!(GuestEventKind::from_wire(3), None);
        assert_eq!(GuestEventKind::from_wire(2), Some(GuestEventKind::Unplug));
    }
}
