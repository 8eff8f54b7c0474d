//! Values the connector runtime hands out: guest-operation outcomes, attached devices,
//! busy reasons, unplug-request results and restore errors.

use crate::papr::{CcResponse, EntitySense};

/// Longest device id a connector (and its migrated state) carries, in bytes.
pub const DEVICE_ID_MAX: usize = 64;

/// What a successful guest operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Accepted (state changed, or nothing to do).
    Done,
    /// The guest completed a requested unplug: the connector is now release-pending and the
    /// device must be released (now, or by whichever side runs the guest after a migration).
    UnplugCompleted,
    /// The guest refused a requested unplug (logical UNISOLATE while unplug is requested):
    /// the request is cleared; DEVICE_UNPLUG_GUEST_ERROR must be emitted.
    UnplugRejected,
    /// Value of the requested sensor.
    Sensor(EntitySense),
    /// One configure-connector step that did not change the state (a walk in progress, or a
    /// repeated walk on a configured connector).
    ConfigureStep(CcResponse),
    /// configure-connector finished (SUCCESS) and moved the connector to its ready state.
    Configured,
}

impl Outcome {
    /// The RTAS status the guest reads for this outcome.
    pub const fn status(self) -> i32 {
        match self {
            Outcome::ConfigureStep(r) => r.code(),
            _ => 0,
        }
    }
}

/// A device attached to a connector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttachedDevice {
    /// The `device_add` id.
    pub id: String,
    /// PCI only: the function was added with `multifunction=on`.
    pub multifunction: bool,
}

/// Why a connector refuses a new device for now (a transient condition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BusyReason {
    /// An unplug request waits for the guest.
    UnplugPending,
    /// The guest completed an unplug during a migration; the release has not run yet.
    ReleasePending,
    /// The guest is blinking the DR indicator (power transition / identify).
    IndicatorBlinking,
    /// The guest is half-way through configuring or isolating the connector.
    Configuring,
}

impl BusyReason {
    /// Wording used in errors: `connector 0x... is busy (unplug pending)`.
    pub const fn describe(self) -> &'static str {
        match self {
            BusyReason::UnplugPending => "unplug pending",
            BusyReason::ReleasePending => "release pending",
            BusyReason::IndicatorBlinking => "indicator blinking",
            BusyReason::Configuring => "guest is configuring it",
        }
    }
}

/// Result of a management unplug request on one connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnplugRequest {
    /// The request is now pending; the guest must be told.
    AwaitingGuest,
    /// A request was already pending; its deadline is kept (Precise rule 4).
    AlreadyPending,
    /// The connector was in its empty state (the guest never took the device): released now.
    Released(AttachedDevice),
}

/// Why a migrated connector state cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connector {index:#010x}: {why}")]
pub struct RestoreError {
    /// Connector index.
    pub index: u32,
    /// What is wrong.
    pub why: String,
}

/// QEMU's `id_wellformed` plus our length bound: a letter, then letters, digits, `-`, `.`,
/// `_`; at most [`DEVICE_ID_MAX`] bytes.
pub fn valid_device_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= DEVICE_ID_MAX
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}
