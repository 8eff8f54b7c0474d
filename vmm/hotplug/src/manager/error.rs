//! Why a management operation or an incoming section is refused.

use devstate::DecodeError;

use crate::connector::{BusyReason, RestoreError};
use crate::events::EVENT_QUEUE_CAPACITY;

/// Refusal of a management operation. Nothing changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HotplugError {
    /// A migration is in flight on this side.
    #[error("{command} not allowed while migrating")]
    MigrationInProgress {
        /// `device_add` or `device_del`.
        command: &'static str,
    },
    /// Unknown driver.
    #[error("'{0}' is not a valid device model name")]
    UnknownDriver(String),
    /// No id given.
    #[error("Parameter 'id' is missing")]
    MissingId,
    /// Malformed id.
    #[error(
        "Parameter 'id' expects an identifier (a letter, then letters, digits, '-', '.' or '_', at most 64 characters), got '{0}'"
    )]
    InvalidId(String),
    /// Id in use.
    #[error("Duplicate device ID '{0}'")]
    DuplicateId(String),
    /// A required property is missing.
    #[error("Parameter '{prop}' is missing ('{driver}' requires it)")]
    MissingProperty {
        /// Driver.
        driver: &'static str,
        /// Property.
        prop: &'static str,
    },
    /// A property the driver does not have.
    #[error("Property '{driver}.{prop}' not found")]
    UnknownProperty {
        /// Driver.
        driver: &'static str,
        /// Property.
        prop: &'static str,
    },
    /// A malformed property value.
    #[error("Property '{driver}.{prop}' doesn't take value '{value}'")]
    InvalidProperty {
        /// Driver.
        driver: &'static str,
        /// Property.
        prop: &'static str,
        /// Value given.
        value: String,
    },
    /// A slot or core the machine does not have.
    #[error("{0}")]
    OutOfRange(String),
    /// Memory hotplug is not part of this machine type.
    #[error("Memory hotplug is not supported by machine type '{machine}'")]
    MemHotplugUnsupported {
        /// Machine type.
        machine: &'static str,
    },
    /// The connector has a device.
    #[error("{what} is already occupied by device '{device}'")]
    Occupied {
        /// E.g. `CPU core 3`.
        what: String,
        /// Device there.
        device: String,
    },
    /// The connector is mid-transition on the guest side (transient).
    #[error("Hot-plug failed: connector {index:#010x} is busy ({}); retry later", reason.describe())]
    Busy {
        /// Connector index.
        index: u32,
        /// Why.
        reason: BusyReason,
    },
    /// The guest has not fetched enough events (transient).
    #[error(
        "{op} failed: guest event queue is full ({EVENT_QUEUE_CAPACITY} events pending); retry later"
    )]
    EventQueueFull {
        /// `Hot-plug` or `Hot-unplug`.
        op: &'static str,
    },
    /// Function 0 added without `multifunction` while other functions are present.
    #[error(
        "PCI: {slot:02x}.0 indicates single function, but {slot:02x}.{function:x} is already populated"
    )]
    PciSingleFunction {
        /// Slot.
        slot: u8,
        /// A populated function.
        function: u8,
    },
    /// A non-zero function added after function 0.
    #[error(
        "PCI: slot {slot:02x} function 0 already occupied by '{device}', additional functions can no longer be exposed to guest"
    )]
    PciFunctionAfterZero {
        /// Slot.
        slot: u8,
        /// Device at function 0.
        device: String,
    },
    /// `device_del` of an unknown id.
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// `device_del` of a non-zero function while function 0 is present.
    #[error("Unplug function 0 to remove slot {slot:02x}")]
    UnplugFunctionZero {
        /// Slot.
        slot: u8,
    },
    /// Bad manager configuration.
    #[error("Invalid hotplug configuration: {0}")]
    InvalidConfig(String),
}

impl HotplugError {
    /// Whether retrying later may succeed (management should retry, not give up).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HotplugError::Busy { .. }
                | HotplugError::EventQueueFull { .. }
                | HotplugError::MigrationInProgress { .. }
        )
    }
}

/// Refusal of an incoming hotplug section.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The section did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The stream has a connector this side does not.
    #[error(
        "Unknown connector {index:#010x} in the incoming stream; check that source and destination have the same hotplug slots"
    )]
    UnknownConnector {
        /// Index.
        index: u32,
    },
    /// The connector state does not fit this side. (Not a `#[source]`: the text already
    /// carries it, and `migration::chain` would print it twice.)
    #[error("Incoming connector state refused: {0}")]
    Restore(RestoreError),
    /// Anything else wrong with a section.
    #[error("Incoming section '{section}' refused: {why}")]
    Invalid {
        /// Section name.
        section: &'static str,
        /// What is wrong.
        why: String,
    },
}

impl From<RestoreError> for LoadError {
    fn from(e: RestoreError) -> Self {
        LoadError::Restore(e)
    }
}
