//! Hotplug connectors (PAPR-style DRCs) as pure, KVM-free logic with versioned state.
//!
//! - [`connector`]: one connector, its unified state machine and the one guest transition
//!   function [`Connector::apply`].
//! - [`events`]: the bounded FIFO of pending guest events (hotplug / unplug requests).
//! - [`controller`]: the guest-facing port-I/O register file (table in its docs).
//! - [`manager`]: [`HotplugManager`], owner of every connector, the queue and the controller;
//!   `device_add` / `device_del` / timeouts / reset / save and load.
//! - [`persist`]: the migrated `*State` structs and their `devstate` sections.
//!
//! Time is the guest-running clock in milliseconds, passed in by the caller; nothing here
//! reads a real clock, spawns a thread or touches KVM.

pub mod connector;
pub mod controller;
pub mod events;
pub mod manager;
pub mod persist;

pub use connector::{
    AttachedDevice, BusyReason, CcResponse, Connector, ConnectorKind, DrIndicator, DrcState,
    EntitySense, GuestOp, Outcome, RtasError,
};
pub use controller::{CONTROLLER_BASE, CONTROLLER_LEN, Controller};
pub use events::{EVENT_QUEUE_CAPACITY, EventQueue, GuestEvent, GuestEventKind};
pub use manager::{
    ConnectorInfo, DeviceProps, DeviceSpec, Effect, Event, HotplugConfig, HotplugError,
    HotplugManager, LoadError, Resource, RunPhase,
};
pub use persist::{ConnectorState, ControllerState, EventQueueState, register_sections};
