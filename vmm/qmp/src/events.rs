//! Asynchronous events and the bus the VMM emits them on.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

/// Default number of events a session may fall behind before it loses some.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// Host wall-clock time of an event. QEMU sends -1/-1 when the clock cannot be
/// read; we clamp to 0 instead, because `qapi-rs` stores these as `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: d.as_secs(),
            microseconds: d.subsec_micros(),
        }
    }
}

/// `{"event": NAME, "data": {...}, "timestamp": {...}}`; `data` is omitted
/// when `None` (STOP, RESUME).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    pub timestamp: Timestamp,
}

impl QmpEvent {
    /// An event stamped with the current time. `data`, if any, should be a
    /// JSON object (QAPI event data always is).
    pub fn new(event: impl Into<String>, data: Option<Value>) -> Self {
        Self {
            event: event.into(),
            data,
            timestamp: Timestamp::now(),
        }
    }
}

/// Fan-out of events to every negotiated session (a tokio broadcast channel).
///
/// Cheap to clone; the VMM keeps one and passes it to the server through
/// [`QmpConfig::event_bus`](super::QmpConfig::event_bus). Events emitted while
/// no session is negotiated are dropped, as in QEMU. A session that falls
/// more than the capacity behind loses the oldest events (logged).
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<QmpEvent>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(DEFAULT_EVENT_CAPACITY)
    }
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self { tx }
    }

    /// Emit `name` with optional `data`, timestamped now. Returns how many
    /// sessions will receive it.
    pub fn emit(&self, name: &str, data: Option<Value>) -> usize {
        self.send(QmpEvent::new(name, data))
    }

    /// Emit a prepared event. Returns how many sessions will receive it.
    pub fn send(&self, event: QmpEvent) -> usize {
        tracing::debug!(event = %event.event, "qmp event");
        self.tx.send(Arc::new(event)).unwrap_or(0)
    }

    /// Number of sessions currently subscribed (negotiated).
    pub fn receiver_count(&self) -> usize {
        self.tx.receiver_count()
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<QmpEvent>> {
        self.tx.subscribe()
    }
}
