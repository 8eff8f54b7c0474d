//! Hotplug connectors (PAPR-style DRCs) as pure, KVM-free logic with versioned state.
//!
//! A VMM owns one [`HotplugManager`]: every connector (CPU cores, 16 MiB memory blocks, PCI
//! functions), the bounded queue of guest events and the guest-facing controller registers
//! ([`controller`] documents the port map). Management calls `device_add` / `device_del`,
//! the guest drives each connector through the one transition function
//! [`Connector::apply`], and the manager hands back [`Effect`]s to carry out, QMP [`Event`]s
//! and interrupt requests. Its migrated state is a set of `devstate` sections
//! ([`register_sections`], [`HotplugManager::save`], [`HotplugManager::load_section`]) whose
//! load checks need no KVM, so tools can run them too.
//!
//! Layering (each module uses only those before it): `papr` (kinds, states, indicator
//! values, RTAS codes) <- `events` (the guest-event queue) <- `persist` (the `*State`
//! structs and their sections) <- `connector` (one connector: state machine, management,
//! migrated form) <- [`controller`] <- [`manager`].
//!
//! Time is the guest-running clock in milliseconds, passed in by the caller; nothing here
//! reads a real clock, spawns a thread or touches KVM.
//!
//! ```
//! use ferry_hotplug::{DeviceProps, HotplugConfig, HotplugManager, RunPhase};
//! let m = machine_types::MachineType::lookup("ferry-2.0").unwrap();
//! let mut mgr = HotplugManager::new(HotplugConfig::default(), m).unwrap();
//! let props = DeviceProps { core_id: Some(1), ..Default::default() };
//! mgr.device_add("ferry-cpu-core", "cpu1", &props, RunPhase::Started).unwrap();
//! assert!(mgr.take_irq(), "the guest is told");
//! ```

mod connector;
pub mod controller;
mod events;
pub mod manager;
mod papr;
mod persist;

pub use connector::{
    AttachedDevice, BusyReason, Connector, DEVICE_ID_MAX, Outcome, RestoreError, UnplugRequest,
    valid_device_id,
};
pub use controller::{CONTROLLER_BASE, CONTROLLER_LEN, Controller, ControllerBackend};
pub use events::{EVENT_QUEUE_CAPACITY, EventQueue, GuestEvent, GuestEventKind, QueueFull};
pub use manager::{
    ConnectorInfo, DEFAULT_UNPLUG_TIMEOUT_MS, DeviceProps, DeviceSpec, Effect, Event,
    HotplugConfig, HotplugError, HotplugManager, LoadError, MEM_BLOCK_SIZE, PCI_FUNCTIONS,
    Resource, RunPhase, device_path,
};
pub use papr::{
    Allocation, CcResponse, ConnectorKind, DrIndicator, DrcState, EntitySense, GuestOp, Isolation,
    MAX_CONNECTOR_ID, RtasError, token,
};
pub use persist::{
    ConnectorState, ControllerState, EventQueueState, GuestEventState, register_sections,
};
