//! The hotplug manager: every connector, the pending guest-event queue, the controller's
//! registers, and the management operations (`device_add`, `device_del`, timeouts, reset,
//! migration save/load).
//!
//! Pure logic: no threads, no real time. Time is the *guest-running* clock in milliseconds,
//! passed in by the caller, which only advances it while the guest runs (so a paused or
//! migrating guest does not use up its unplug timeout). Outputs are drained by the caller:
//! [`Effect`]s the VMM must carry out (create a vCPU, map memory, enable a PCI function,
//! tear a device down), management [`Event`]s (DEVICE_DELETED,
//! DEVICE_UNPLUG_GUEST_ERROR) and an interrupt request ([`HotplugManager::take_irq`]).

use std::collections::BTreeMap;
use std::io::{self, Write};

use devstate::{DecodeError, RawSection, Section, StreamWriter, Tag, encode_section};
use machine_types::MachineType;

use super::connector::{
    AttachedDevice, BusyReason, Connector, ConnectorKind, GuestOp, MAX_CONNECTOR_ID, Outcome,
    RestoreError, RtasError, UnplugRequest, valid_device_id,
};
use super::controller::{Controller, ControllerBackend};
use super::events::{EVENT_QUEUE_CAPACITY, EventQueue, GuestEvent, GuestEventKind};
use super::persist::{ConnectorState, ControllerState, EventQueueState, GuestEventState};

/// Size of one hot-pluggable memory block (`ferry-mem-block`).
pub const MEM_BLOCK_SIZE: u64 = 16 << 20;
/// Default unplug timeout (guest-running milliseconds), as QEMU's 15 s CPU timeout.
pub const DEFAULT_UNPLUG_TIMEOUT_MS: u64 = 15_000;
/// Most PCI hotplug slots (devfn is 8 bits).
pub const MAX_PCI_SLOTS: u8 = 32;
/// Functions per PCI slot.
pub const PCI_FUNCTIONS: u8 = 8;

/// Shape of the hotplug subsystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotplugConfig {
    /// CPU-core connectors (core-id 0..cpu_cores).
    pub cpu_cores: u32,
    /// Memory-block connectors (slot 0..mem_blocks), 16 MiB each.
    pub mem_blocks: u32,
    /// PCI hotplug slots (00..pci_slots), one connector per function.
    pub pci_slots: u8,
    /// Guest-physical address of memory block 0.
    pub mem_base: u64,
    /// Unplug timeout in guest-running milliseconds.
    pub unplug_timeout_ms: u64,
}

impl Default for HotplugConfig {
    fn default() -> Self {
        HotplugConfig {
            cpu_cores: 4,
            mem_blocks: 8,
            pci_slots: 4,
            mem_base: 0x1_0000_0000,
            unplug_timeout_ms: DEFAULT_UNPLUG_TIMEOUT_MS,
        }
    }
}

/// Where the VM is in its life, as far as hotplug cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunPhase {
    /// Created, never started (`-S`).
    Prelaunch,
    /// Destination waiting for the incoming stream.
    InMigrate,
    /// The guest has run (running or paused).
    Started,
}

impl RunPhase {
    /// Before the guest first runs: `device_add` marks reset-before-start.
    pub fn is_pre_start(self) -> bool {
        matches!(self, RunPhase::Prelaunch | RunPhase::InMigrate)
    }
}

/// `device_add` properties (QMP names in comments); unset ones are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceProps {
    /// `core-id` (ferry-cpu-core).
    pub core_id: Option<u32>,
    /// `slot` (ferry-mem-block).
    pub slot: Option<u32>,
    /// `addr` as "SS.F" or "SS", hex (ferry-pci-fn).
    pub addr: Option<String>,
    /// `multifunction` (ferry-pci-fn).
    pub multifunction: Option<bool>,
}

/// A parsed, validated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// `ferry-cpu-core`.
    CpuCore {
        /// Core id.
        core_id: u32,
    },
    /// `ferry-mem-block`.
    MemBlock {
        /// Memory slot.
        slot: u32,
    },
    /// `ferry-pci-fn`.
    PciFn {
        /// PCI slot.
        slot: u8,
        /// Function 0..=7.
        function: u8,
        /// `multifunction=on`.
        multifunction: bool,
    },
}

impl DeviceSpec {
    /// Driver name.
    pub fn driver(&self) -> &'static str {
        self.kind().driver()
    }

    /// Connector kind.
    pub fn kind(&self) -> ConnectorKind {
        match self {
            DeviceSpec::CpuCore { .. } => ConnectorKind::CpuCore,
            DeviceSpec::MemBlock { .. } => ConnectorKind::MemBlock,
            DeviceSpec::PciFn { .. } => ConnectorKind::PciFn,
        }
    }

    /// PAPR index of its connector.
    pub fn index(&self) -> u32 {
        match *self {
            DeviceSpec::CpuCore { core_id } => ConnectorKind::CpuCore.index(core_id),
            DeviceSpec::MemBlock { slot } => ConnectorKind::MemBlock.index(slot),
            DeviceSpec::PciFn { slot, function, .. } => {
                ConnectorKind::PciFn.index(devfn(slot, function))
            }
        }
    }

    /// The properties that recreate it with `device_add`.
    pub fn props(&self) -> DeviceProps {
        match *self {
            DeviceSpec::CpuCore { core_id } => DeviceProps {
                core_id: Some(core_id),
                ..Default::default()
            },
            DeviceSpec::MemBlock { slot } => DeviceProps {
                slot: Some(slot),
                ..Default::default()
            },
            DeviceSpec::PciFn {
                slot,
                function,
                multifunction,
            } => DeviceProps {
                addr: Some(format!("{slot:02x}.{function:x}")),
                multifunction: Some(multifunction),
                ..Default::default()
            },
        }
    }
}

fn devfn(slot: u8, function: u8) -> u32 {
    (u32::from(slot) << 3) | u32::from(function)
}

fn split_devfn(id: u32) -> (u8, u8) {
    (((id >> 3) & 0x1f) as u8, (id & 7) as u8)
}

/// A guest resource a connector stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A CPU core.
    CpuCore {
        /// Core id.
        core: u32,
    },
    /// A memory block.
    MemBlock {
        /// Slot.
        slot: u32,
        /// Guest-physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
    },
    /// A PCI function.
    PciFn {
        /// Slot.
        slot: u8,
        /// Function.
        function: u8,
    },
}

/// Something the VMM must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A CPU core was attached: create its vCPU (it starts when the guest configures it).
    CreateVcpu {
        /// Device id.
        device: String,
        /// Core id.
        core: u32,
    },
    /// A memory block was attached: map it.
    MapMemoryBlock {
        /// Device id.
        device: String,
        /// Slot.
        slot: u32,
        /// Guest-physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
    },
    /// A PCI function was attached: enable it.
    EnablePciFunction {
        /// Device id.
        device: String,
        /// Slot.
        slot: u8,
        /// Function.
        function: u8,
        /// `multifunction=on`.
        multifunction: bool,
    },
    /// The guest finished configure-connector: the resource is in use (a hot-added vCPU may
    /// be started now).
    Configured {
        /// Device id.
        device: String,
        /// The resource.
        resource: Resource,
    },
    /// The device was released: tear it down.
    TearDown {
        /// Device id.
        device: String,
        /// The resource it held.
        resource: Resource,
    },
}

/// A management (QMP) event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// DEVICE_DELETED.
    DeviceDeleted {
        /// Device id.
        device: String,
        /// QOM path.
        path: String,
    },
    /// DEVICE_UNPLUG_GUEST_ERROR: the guest refused the unplug, or did not answer in time.
    UnplugGuestError {
        /// Device id.
        device: String,
        /// QOM path.
        path: String,
    },
}

/// QOM path of a device, as QEMU names `-device`/`device_add` devices with an id.
pub fn device_path(id: &str) -> String {
    format!("/machine/peripheral/{id}")
}

/// One row of `__org.ferry_query-connectors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorInfo {
    /// PAPR index.
    pub index: u32,
    /// `cpu-core`, `mem-block` or `pci-fn`.
    pub kind: &'static str,
    /// Id within its kind (core id, memory slot, devfn).
    pub id: u32,
    /// State name, e.g. `logical-configured`.
    pub state: &'static str,
    /// `isolated` / `unisolated`.
    pub isolation: &'static str,
    /// `usable` / `unusable`.
    pub allocation: &'static str,
    /// DR indicator (PCI only).
    pub indicator: Option<&'static str>,
    /// Attached device id.
    pub device: Option<String>,
    /// An unplug request waits for the guest.
    pub unplug_pending: bool,
    /// Guest-running milliseconds left before the pending unplug times out.
    pub remaining_ms: Option<u64>,
    /// The guest completed an unplug whose release has not run yet.
    pub release_pending: bool,
    /// The last unplug request timed out.
    pub unplug_timed_out: bool,
    /// Why a `device_add` would be refused right now (transient), if it would.
    pub busy: Option<&'static str>,
}

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

/// All connectors plus the guest-event queue and the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotplugManager {
    config: HotplugConfig,
    machine: &'static MachineType,
    connectors: BTreeMap<u32, Connector>,
    events: EventQueue,
    controller: Controller,
    migrating: bool,
    reset_before_start: bool,
    irq_request: bool,
    effects: Vec<Effect>,
    out_events: Vec<Event>,
}

impl HotplugManager {
    /// Create every connector of `config`, empty and at its reset state.
    pub fn new(
        config: HotplugConfig,
        machine: &'static MachineType,
    ) -> Result<HotplugManager, HotplugError> {
        if config.pci_slots > MAX_PCI_SLOTS {
            return Err(HotplugError::InvalidConfig(format!(
                "{} PCI slots (at most {MAX_PCI_SLOTS})",
                config.pci_slots
            )));
        }
        if config.cpu_cores > MAX_CONNECTOR_ID || config.mem_blocks > MAX_CONNECTOR_ID {
            return Err(HotplugError::InvalidConfig(
                "too many CPU-core or memory-block connectors".to_owned(),
            ));
        }
        let mem_end = u64::from(config.mem_blocks)
            .checked_mul(MEM_BLOCK_SIZE)
            .and_then(|l| config.mem_base.checked_add(l));
        if mem_end.is_none() || !config.mem_base.is_multiple_of(MEM_BLOCK_SIZE) {
            return Err(HotplugError::InvalidConfig(format!(
                "memory hotplug area at {:#x} is not 16 MiB aligned or overflows",
                config.mem_base
            )));
        }
        if config.unplug_timeout_ms == 0 {
            return Err(HotplugError::InvalidConfig(
                "unplug timeout must be positive".to_owned(),
            ));
        }
        let mut connectors = BTreeMap::new();
        let mut add = |c: Connector| connectors.insert(c.index(), c);
        for core in 0..config.cpu_cores {
            add(Connector::new(ConnectorKind::CpuCore, core));
        }
        for slot in 0..config.mem_blocks {
            add(Connector::new(ConnectorKind::MemBlock, slot));
        }
        for slot in 0..config.pci_slots {
            for f in 0..PCI_FUNCTIONS {
                add(Connector::new(ConnectorKind::PciFn, devfn(slot, f)));
            }
        }
        Ok(HotplugManager {
            config,
            machine,
            connectors,
            events: EventQueue::new(),
            controller: Controller::new(),
            migrating: false,
            reset_before_start: false,
            irq_request: false,
            effects: Vec::new(),
            out_events: Vec::new(),
        })
    }

    /// Configuration.
    pub fn config(&self) -> &HotplugConfig {
        &self.config
    }
    /// Machine type.
    pub fn machine(&self) -> &'static MachineType {
        self.machine
    }
    /// One connector.
    pub fn connector(&self, index: u32) -> Option<&Connector> {
        self.connectors.get(&index)
    }
    /// All connectors in index order.
    pub fn connectors(&self) -> impl Iterator<Item = &Connector> {
        self.connectors.values()
    }
    /// Pending guest events.
    pub fn events(&self) -> &EventQueue {
        &self.events
    }
    /// Controller registers.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }
    /// Whether a migration is in flight on this side.
    pub fn migration_in_progress(&self) -> bool {
        self.migrating
    }
    /// Mark a migration in flight (source: from `migrate` until it completed or failed;
    /// destination: from stream start until the incoming migration completed or failed).
    /// While set, `device_add`/`device_del` are refused and a guest-completed unplug stays
    /// release-pending. Clearing it does not release anything: the side that resumes the
    /// guest calls [`complete_pending_releases`](Self::complete_pending_releases).
    pub fn set_migration_in_progress(&mut self, on: bool) {
        self.migrating = on;
    }
    /// Whether a pre-start `device_add` requires [`reset_all`](Self::reset_all) before the
    /// first `cont`.
    pub fn needs_reset_before_start(&self) -> bool {
        self.reset_before_start
    }
    /// Whether an interrupt was requested since the last call (signal the irqfd if so).
    pub fn take_irq(&mut self) -> bool {
        std::mem::take(&mut self.irq_request)
    }
    /// Level view: events are pending.
    pub fn irq_level(&self) -> bool {
        !self.events.is_empty()
    }
    /// Take the effects queued so far, oldest first.
    pub fn drain_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
    /// Take the management events queued so far, oldest first.
    pub fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.out_events)
    }
    /// Earliest pending unplug deadline (guest-running ms), to schedule [`tick`](Self::tick).
    pub fn next_deadline(&self) -> Option<u64> {
        self.connectors
            .values()
            .filter_map(Connector::unplug_deadline_ms)
            .min()
    }

    fn find_device(&self, id: &str) -> Option<u32> {
        self.connectors
            .values()
            .find(|c| c.device_id() == Some(id))
            .map(Connector::index)
    }

    fn pci(&self, slot: u8, function: u8) -> &Connector {
        &self.connectors[&ConnectorKind::PciFn.index(devfn(slot, function))]
    }

    /// The resource connector `index` stands for.
    pub fn resource(&self, index: u32) -> Option<Resource> {
        let (kind, id) = ConnectorKind::from_index(index)?;
        self.connectors.get(&index)?;
        Some(match kind {
            ConnectorKind::CpuCore => Resource::CpuCore { core: id },
            ConnectorKind::MemBlock => Resource::MemBlock {
                slot: id,
                gpa: self.config.mem_base + u64::from(id) * MEM_BLOCK_SIZE,
                size: MEM_BLOCK_SIZE,
            },
            ConnectorKind::PciFn => {
                let (slot, function) = split_devfn(id);
                Resource::PciFn { slot, function }
            }
        })
    }

    /// Parse and range-check a `device_add` driver and its properties.
    pub fn parse_device(&self, driver: &str, p: &DeviceProps) -> Result<DeviceSpec, HotplugError> {
        let kind = ConnectorKind::ALL
            .into_iter()
            .find(|k| k.driver() == driver)
            .ok_or_else(|| HotplugError::UnknownDriver(driver.to_owned()))?;
        let driver = kind.driver();
        let given = [
            ("core-id", p.core_id.is_some()),
            ("slot", p.slot.is_some()),
            ("addr", p.addr.is_some()),
            ("multifunction", p.multifunction.is_some()),
        ];
        let allowed: &[&str] = match kind {
            ConnectorKind::CpuCore => &["core-id"],
            ConnectorKind::MemBlock => &["slot"],
            ConnectorKind::PciFn => &["addr", "multifunction"],
        };
        if let Some((prop, _)) = given.iter().find(|(n, set)| *set && !allowed.contains(n)) {
            return Err(HotplugError::UnknownProperty { driver, prop });
        }
        let missing = |prop| HotplugError::MissingProperty { driver, prop };
        match kind {
            ConnectorKind::CpuCore => {
                let core_id = p.core_id.ok_or_else(|| missing("core-id"))?;
                if core_id >= self.config.cpu_cores {
                    return Err(HotplugError::OutOfRange(range_msg(
                        "core-id",
                        core_id,
                        self.config.cpu_cores,
                        "hotpluggable CPU cores",
                    )));
                }
                Ok(DeviceSpec::CpuCore { core_id })
            }
            ConnectorKind::MemBlock => {
                if !self.machine.compat().mem_hotplug {
                    return Err(HotplugError::MemHotplugUnsupported {
                        machine: self.machine.name(),
                    });
                }
                let slot = p.slot.ok_or_else(|| missing("slot"))?;
                if slot >= self.config.mem_blocks {
                    return Err(HotplugError::OutOfRange(range_msg(
                        "Memory slot",
                        slot,
                        self.config.mem_blocks,
                        "memory hotplug slots",
                    )));
                }
                Ok(DeviceSpec::MemBlock { slot })
            }
            ConnectorKind::PciFn => {
                let addr = p.addr.as_deref().ok_or_else(|| missing("addr"))?;
                let (slot, function) =
                    parse_pci_addr(addr).ok_or_else(|| HotplugError::InvalidProperty {
                        driver,
                        prop: "addr",
                        value: addr.to_owned(),
                    })?;
                if slot >= self.config.pci_slots {
                    return Err(HotplugError::OutOfRange(if self.config.pci_slots == 0 {
                        "PCI: this machine has no hotplug slots".to_owned()
                    } else {
                        format!(
                            "PCI: slot {slot:02x} is not a hotplug slot (slots 00-{:02x})",
                            self.config.pci_slots - 1
                        )
                    }));
                }
                Ok(DeviceSpec::PciFn {
                    slot,
                    function,
                    multifunction: p.multifunction.unwrap_or(false),
                })
            }
        }
    }

    /// Connector indices that a `device_add` of `spec` signals to the guest.
    fn add_signals(&self, spec: &DeviceSpec) -> Vec<u32> {
        match *spec {
            DeviceSpec::PciFn {
                slot, function: 0, ..
            } => {
                // Function 0 signals the whole slot: itself and every function added before.
                let mut v = vec![spec.index()];
                v.extend(
                    (1..PCI_FUNCTIONS)
                        .map(|f| self.pci(slot, f))
                        .filter(|c| c.has_device())
                        .map(Connector::index),
                );
                v.sort_unstable();
                v
            }
            // Deferred until function 0 is added (rule 12).
            DeviceSpec::PciFn { .. } => Vec::new(),
            _ => vec![spec.index()],
        }
    }

    /// Every check of `device_add`, without changing anything. The VMM may call it first,
    /// create the resources, then call [`device_add`](Self::device_add).
    pub fn check_device_add(
        &self,
        driver: &str,
        id: &str,
        props: &DeviceProps,
    ) -> Result<DeviceSpec, HotplugError> {
        if self.migrating {
            return Err(HotplugError::MigrationInProgress {
                command: "device_add",
            });
        }
        let spec = self.parse_device(driver, props)?;
        if id.is_empty() {
            return Err(HotplugError::MissingId);
        }
        if !valid_device_id(id) {
            return Err(HotplugError::InvalidId(id.to_owned()));
        }
        if self.find_device(id).is_some() {
            return Err(HotplugError::DuplicateId(id.to_owned()));
        }
        let conn = &self.connectors[&spec.index()];
        if let Some(reason) = conn.busy_reason() {
            return Err(HotplugError::Busy {
                index: conn.index(),
                reason,
            });
        }
        if let Some(dev) = conn.device_id() {
            let what = match spec {
                DeviceSpec::CpuCore { core_id } => format!("CPU core {core_id}"),
                DeviceSpec::MemBlock { slot } => format!("Memory slot {slot}"),
                DeviceSpec::PciFn { slot, function, .. } => {
                    format!("PCI slot {slot:02x} function {function}")
                }
            };
            return Err(HotplugError::Occupied {
                what,
                device: dev.to_owned(),
            });
        }
        if let DeviceSpec::PciFn {
            slot,
            function,
            multifunction,
        } = spec
        {
            if function != 0 {
                if let Some(f0) = self.pci(slot, 0).device_id() {
                    return Err(HotplugError::PciFunctionAfterZero {
                        slot,
                        device: f0.to_owned(),
                    });
                }
            } else {
                for f in 1..PCI_FUNCTIONS {
                    let c = self.pci(slot, f);
                    if let Some(reason) = c.busy_reason() {
                        return Err(HotplugError::Busy {
                            index: c.index(),
                            reason,
                        });
                    }
                    if !multifunction && c.device().is_some() {
                        return Err(HotplugError::PciSingleFunction { slot, function: f });
                    }
                }
            }
        }
        let needed = self
            .add_signals(&spec)
            .into_iter()
            .filter(|&index| {
                !self.events.contains(&GuestEvent {
                    index,
                    kind: GuestEventKind::Hotplug,
                })
            })
            .count();
        if needed > self.events.free() {
            return Err(HotplugError::EventQueueFull { op: "Hot-plug" });
        }
        Ok(spec)
    }

    /// `device_add`: attach the device to its connector and tell the guest (a hotplug event;
    /// for PCI functions other than 0 the event waits for function 0). Before start the same
    /// hotplug path is taken and the manager is marked reset-before-start (Precise rule 5).
    /// Queues the attach [`Effect`].
    pub fn device_add(
        &mut self,
        driver: &str,
        id: &str,
        props: &DeviceProps,
        phase: RunPhase,
    ) -> Result<(), HotplugError> {
        let spec = self.check_device_add(driver, id, props)?;
        let index = spec.index();
        let multifunction = matches!(
            spec,
            DeviceSpec::PciFn {
                multifunction: true,
                ..
            }
        );
        self.connectors
            .get_mut(&index)
            .expect("checked")
            .attach(AttachedDevice {
                id: id.to_owned(),
                multifunction,
            });
        for i in self.add_signals(&spec) {
            self.push_event(i, GuestEventKind::Hotplug);
        }
        let device = id.to_owned();
        self.effects.push(match spec {
            DeviceSpec::CpuCore { core_id } => Effect::CreateVcpu {
                device,
                core: core_id,
            },
            DeviceSpec::MemBlock { slot } => Effect::MapMemoryBlock {
                device,
                slot,
                gpa: self.config.mem_base + u64::from(slot) * MEM_BLOCK_SIZE,
                size: MEM_BLOCK_SIZE,
            },
            DeviceSpec::PciFn {
                slot,
                function,
                multifunction,
            } => Effect::EnablePciFunction {
                device,
                slot,
                function,
                multifunction,
            },
        });
        if phase.is_pre_start() {
            self.reset_before_start = true;
        }
        tracing::info!(
            id,
            driver,
            index = format_args!("{index:#010x}"),
            ?phase,
            "device_add"
        );
        Ok(())
    }

    fn push_event(&mut self, index: u32, kind: GuestEventKind) {
        self.events
            .push(GuestEvent { index, kind })
            .expect("capacity checked before any change");
        self.irq_request = true;
    }

    /// `device_del`: ask the guest to release the device; the unplug times out after the
    /// configured timeout of guest-running time. A repeated `device_del` re-sends the event
    /// and keeps the deadline. Function 0 of a PCI slot takes the whole slot; another
    /// function is refused while function 0 is present. A device the guest never took (its
    /// connector still in the empty state) is released at once.
    pub fn device_del(&mut self, id: &str, now_ms: u64) -> Result<(), HotplugError> {
        if self.migrating {
            return Err(HotplugError::MigrationInProgress {
                command: "device_del",
            });
        }
        let index = self
            .find_device(id)
            .ok_or_else(|| HotplugError::DeviceNotFound(id.to_owned()))?;
        let conn = &self.connectors[&index];
        if conn.release_pending() {
            // The guest already let go; the release runs when the guest resumes.
            return Ok(());
        }
        let targets: Vec<u32> = match conn.kind() {
            ConnectorKind::PciFn => {
                let (slot, function) = split_devfn(conn.id());
                if function != 0 {
                    if self.pci(slot, 0).device().is_some() {
                        return Err(HotplugError::UnplugFunctionZero { slot });
                    }
                    // Half-plugged slot (no function 0): the function goes alone.
                    vec![index]
                } else {
                    // Functions 1..7 first, then 0 (as QEMU's spapr_pci_unplug_request).
                    (1..PCI_FUNCTIONS)
                        .chain(std::iter::once(0))
                        .map(|f| self.pci(slot, f))
                        .filter(|c| c.has_device())
                        .map(Connector::index)
                        .collect()
                }
            }
            _ => vec![index],
        };
        let needed = targets
            .iter()
            .filter(|&&i| {
                let c = &self.connectors[&i];
                let awaits = c.unplug_requested() || c.state() != c.kind().empty_state();
                awaits
                    && !self.events.contains(&GuestEvent {
                        index: i,
                        kind: GuestEventKind::Unplug,
                    })
            })
            .count();
        if needed > self.events.free() {
            return Err(HotplugError::EventQueueFull { op: "Hot-unplug" });
        }
        let timeout = self.config.unplug_timeout_ms;
        for &i in &targets {
            let c = self.connectors.get_mut(&i).expect("exists");
            match c.request_unplug(now_ms, timeout) {
                UnplugRequest::Released(dev) => {
                    tracing::info!(id = dev.id, "device_del: guest never took it, released");
                    self.released(i, dev);
                }
                UnplugRequest::AwaitingGuest => {
                    tracing::info!(
                        id = c.device_id(),
                        deadline_ms = c.unplug_deadline_ms(),
                        "device_del: unplug requested"
                    );
                }
                UnplugRequest::AlreadyPending => {
                    tracing::info!(id = c.device_id(), "device_del: unplug request re-sent");
                }
            }
        }
        let mut signal: Vec<u32> = targets
            .into_iter()
            .filter(|i| self.connectors[i].unplug_requested())
            .collect();
        signal.sort_unstable_by(|a, b| b.cmp(a)); // functions 7..0, as QEMU
        for i in signal {
            self.push_event(i, GuestEventKind::Unplug);
        }
        Ok(())
    }

    /// Device `dev` left connector `index`: tear it down and report DEVICE_DELETED.
    fn released(&mut self, index: u32, dev: AttachedDevice) {
        self.events.remove_for(index, None);
        let resource = self.resource(index).expect("connector exists");
        tracing::info!(
            id = dev.id,
            index = format_args!("{index:#010x}"),
            "device released"
        );
        self.effects.push(Effect::TearDown {
            device: dev.id.clone(),
            resource,
        });
        self.out_events.push(Event::DeviceDeleted {
            path: device_path(&dev.id),
            device: dev.id,
        });
    }

    fn guest_error(&mut self, index: u32) {
        self.events.remove_for(index, Some(GuestEventKind::Unplug));
        let id = self.connectors[&index]
            .device_id()
            .expect("device attached")
            .to_owned();
        self.out_events.push(Event::UnplugGuestError {
            path: device_path(&id),
            device: id,
        });
    }

    /// Advance the guest-running clock: every pending unplug whose deadline passed is dropped
    /// with DEVICE_UNPLUG_GUEST_ERROR; `device_del` may be retried.
    pub fn tick(&mut self, now_ms: u64) {
        let expired: Vec<u32> = self
            .connectors
            .values_mut()
            .filter_map(|c| c.expire(now_ms).then(|| c.index()))
            .collect();
        for index in expired {
            tracing::warn!(
                id = self.connectors[&index].device_id(),
                timeout_ms = self.config.unplug_timeout_ms,
                "device hot-unplug timed out: the guest did not release the device"
            );
            self.guest_error(index);
        }
    }

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

    /// Release every release-pending device (TearDown + DEVICE_DELETED). Call it on the side
    /// that runs the guest after a migration: the destination after it resumed, or the
    /// source when the migration failed or was cancelled. Returns how many were released.
    pub fn complete_pending_releases(&mut self) -> usize {
        let pending: Vec<(u32, AttachedDevice)> = self
            .connectors
            .values_mut()
            .filter_map(|c| {
                let i = c.index();
                c.complete_release().map(|d| (i, d))
            })
            .collect();
        let n = pending.len();
        for (i, d) in pending {
            self.released(i, d);
        }
        n
    }

    /// Reset every connector (Precise rule 5) and clear the event queue and the controller.
    /// Runs on the destination after the pre-start `device_add`s and before the stream is
    /// loaded, and before the first `cont` of a prelaunch VM (also on guest reset). Pending
    /// unplugs complete: their devices are released (TearDown + DEVICE_DELETED).
    pub fn reset_all(&mut self) {
        let released: Vec<(u32, AttachedDevice)> = self
            .connectors
            .values_mut()
            .filter_map(|c| {
                let i = c.index();
                c.reset().map(|d| (i, d))
            })
            .collect();
        for (i, d) in released {
            self.released(i, d);
        }
        self.events.clear();
        self.controller = Controller::new();
        self.irq_request = false;
        self.reset_before_start = false;
    }

    /// Drop every pending guest event.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }

    /// `__org.ferry_query-connectors`: every connector at guest-running time `now_ms`.
    pub fn query_connectors(&self, now_ms: u64) -> Vec<ConnectorInfo> {
        self.connectors
            .values()
            .map(|c| ConnectorInfo {
                index: c.index(),
                kind: c.kind().name(),
                id: c.id(),
                state: c.state().name(),
                isolation: c.isolation().name(),
                allocation: c.allocation().name(),
                indicator: c.kind().is_physical().then(|| c.dr_indicator().name()),
                device: c.device_id().map(str::to_owned),
                unplug_pending: c.unplug_requested(),
                remaining_ms: c.remaining_ms(now_ms),
                release_pending: c.release_pending(),
                unplug_timed_out: c.unplug_timed_out(),
                busy: c.busy_reason().map(BusyReason::describe),
            })
            .collect()
    }

    /// Every attached device with what recreates it, in an order `device_add` accepts
    /// (within a PCI slot, functions 1..7 before function 0). The destination adds these
    /// before start; the handshake can compare them.
    pub fn attached_devices(&self) -> Vec<(String, DeviceSpec)> {
        let mut v: Vec<(u32, String, DeviceSpec)> = self
            .connectors
            .values()
            .filter_map(|c| {
                let dev = c.device()?;
                let spec = match c.kind() {
                    ConnectorKind::CpuCore => DeviceSpec::CpuCore { core_id: c.id() },
                    ConnectorKind::MemBlock => DeviceSpec::MemBlock { slot: c.id() },
                    ConnectorKind::PciFn => {
                        let (slot, function) = split_devfn(c.id());
                        DeviceSpec::PciFn {
                            slot,
                            function,
                            multifunction: dev.multifunction,
                        }
                    }
                };
                // Sort key: function 0 after the other functions of its slot.
                let key = match spec {
                    DeviceSpec::PciFn { function: 0, .. } => c.index() | 7,
                    DeviceSpec::PciFn { .. } => c.index() - 1,
                    _ => c.index(),
                };
                Some((key, dev.id.clone(), spec))
            })
            .collect();
        v.sort_by_key(|(k, _, _)| *k);
        v.into_iter().map(|(_, id, spec)| (id, spec)).collect()
    }

    /// Check every invariant (connectors, events, ids, PCI slots).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut ids = std::collections::BTreeSet::new();
        for c in self.connectors.values() {
            c.check_invariants()?;
            if let Some(id) = c.device_id()
                && !ids.insert(id)
            {
                return Err(format!("device id '{id}' attached twice"));
            }
        }
        for e in self.events.iter() {
            if !self.connectors.contains_key(&e.index) {
                return Err(format!("event for unknown connector {:#010x}", e.index));
            }
        }
        for slot in 0..self.config.pci_slots {
            let f0 = self.pci(slot, 0);
            if let Some(d) = f0.device()
                && !d.multifunction
                && (1..PCI_FUNCTIONS).any(|f| self.pci(slot, f).device().is_some())
            {
                return Err(format!(
                    "slot {slot:02x}: single-function 0 with other functions"
                ));
            }
        }
        Ok(())
    }

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
                    kind: e.kind.wire(),
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

fn range_msg(what: &str, v: u32, n: u32, plural: &str) -> String {
    if n == 0 {
        format!("{what} {v} is out of range: this machine has no {plural}")
    } else {
        format!("{what} {v} is out of range (0-{})", n - 1)
    }
}

/// Parse a PCI address "SS.F" or "SS" (hex slot, function 0-7).
pub fn parse_pci_addr(s: &str) -> Option<(u8, u8)> {
    let (slot, function) = match s.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    if slot.is_empty() || slot.len() > 2 || !slot.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let slot = u8::from_str_radix(slot, 16).ok()?;
    let function = match function {
        None => 0,
        Some(f) if f.len() == 1 => f.parse::<u8>().ok().filter(|f| *f < PCI_FUNCTIONS)?,
        Some(_) => return None,
    };
    (slot < MAX_PCI_SLOTS).then_some((slot, function))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::DrcState;
    use crate::controller::{op, reg};

    const T: u64 = 1000; // unplug timeout used by the tests

    fn mgr(machine: &str) -> HotplugManager {
        let cfg = HotplugConfig {
            cpu_cores: 4,
            mem_blocks: 4,
            pci_slots: 2,
            unplug_timeout_ms: T,
            ..Default::default()
        };
        HotplugManager::new(cfg, MachineType::lookup(machine).unwrap()).unwrap()
    }

    fn cpu(core: u32) -> DeviceProps {
        DeviceProps {
            core_id: Some(core),
            ..Default::default()
        }
    }

    fn pci(addr: &str, multifunction: bool) -> DeviceProps {
        DeviceProps {
            addr: Some(addr.into()),
            multifunction: Some(multifunction),
            ..Default::default()
        }
    }

    fn mem(slot: u32) -> DeviceProps {
        DeviceProps {
            slot: Some(slot),
            ..Default::default()
        }
    }

    /// Drive the guest side of a hot-add on `index` to CONFIGURED.
    fn guest_configure(m: &mut HotplugManager, index: u32) {
        let logical = !ConnectorKind::from_index(index).unwrap().0.is_physical();
        if logical {
            m.guest_op(index, GuestOp::SET_USABLE).unwrap();
        }
        m.guest_op(index, GuestOp::UNISOLATE).unwrap();
        while m.guest_op(index, GuestOp::ConfigureConnector).unwrap() != Outcome::Configured {}
    }

    fn guest_release(m: &mut HotplugManager, index: u32) -> Result<Outcome, RtasError> {
        let r = m.guest_op(index, GuestOp::ISOLATE)?;
        if ConnectorKind::from_index(index).unwrap().0.is_physical() {
            Ok(r)
        } else {
            m.guest_op(index, GuestOp::SET_UNUSABLE)
        }
    }

    fn deleted(id: &str) -> Event {
        Event::DeviceDeleted {
            device: id.into(),
            path: format!("/machine/peripheral/{id}"),
        }
    }

    fn guest_error(id: &str) -> Event {
        Event::UnplugGuestError {
            device: id.into(),
            path: format!("/machine/peripheral/{id}"),
        }
    }

    /// Running VM with cpu1 configured.
    fn running_with_cpu1() -> HotplugManager {
        let mut m = mgr("ferry-2.0");
        m.device_add("ferry-cpu-core", "cpu1", &cpu(1), RunPhase::Started)
            .unwrap();
        assert_eq!(m.pop_event().unwrap().index, 0x1000_0001);
        guest_configure(&mut m, 0x1000_0001);
        m.drain_effects();
        m.take_irq();
        m
    }

    #[test]
    fn hot_add_cpu_queues_event_irq_and_effects() {
        let mut m = mgr("ferry-2.0");
        m.device_add("ferry-cpu-core", "cpu1", &cpu(1), RunPhase::Started)
            .unwrap();
        assert!(m.take_irq());
        assert!(!m.take_irq());
        assert!(!m.needs_reset_before_start());
        assert_eq!(
            m.events().iter().copied().collect::<Vec<_>>(),
            [GuestEvent {
                index: 0x1000_0001,
                kind: GuestEventKind::Hotplug
            }]
        );
        assert_eq!(
            m.drain_effects(),
            [Effect::CreateVcpu {
                device: "cpu1".into(),
                core: 1
            }]
        );
        guest_configure(&mut m, 0x1000_0001);
        assert_eq!(
            m.drain_effects(),
            [Effect::Configured {
                device: "cpu1".into(),
                resource: Resource::CpuCore { core: 1 }
            }]
        );
        m.check_invariants().unwrap();
    }

    #[test]
    fn refused_adds_change_nothing() {
        let mut m = running_with_cpu1();
        m.device_add(
            "ferry-pci-fn",
            "nic0",
            &pci("01.0", false),
            RunPhase::Started,
        )
        .unwrap();
        guest_configure(&mut m, 0x4000_0008);
        m.device_del("nic0", 0).unwrap();
        m.device_add("ferry-pci-fn", "f1", &pci("00.1", false), RunPhase::Started)
            .unwrap();
        let cases: Vec<(&str, &str, DeviceProps, String)> = vec![
            ("ferry-cpu-core", "cpu1", cpu(2), "Duplicate device ID 'cpu1'".into()),
            ("ferry-cpu-core", "cpuX", cpu(1), "CPU core 1 is already occupied by device 'cpu1'".into()),
            ("ferry-disk", "d0", cpu(1), "'ferry-disk' is not a valid device model name".into()),
            ("ferry-cpu-core", "", cpu(2), "Parameter 'id' is missing".into()),
            ("ferry-cpu-core", "9x", cpu(2), "Parameter 'id' expects an identifier (a letter, then letters, digits, '-', '.' or '_', at most 64 characters), got '9x'".into()),
            ("ferry-cpu-core", "c", DeviceProps::default(), "Parameter 'core-id' is missing ('ferry-cpu-core' requires it)".into()),
            ("ferry-cpu-core", "c", DeviceProps { slot: Some(1), ..cpu(2) }, "Property 'ferry-cpu-core.slot' not found".into()),
            ("ferry-cpu-core", "c", cpu(4), "core-id 4 is out of range (0-3)".into()),
            ("ferry-mem-block", "m", mem(9), "Memory slot 9 is out of range (0-3)".into()),
            ("ferry-pci-fn", "p", pci("zz", false), "Property 'ferry-pci-fn.addr' doesn't take value 'zz'".into()),
            ("ferry-pci-fn", "p", pci("00.8", false), "Property 'ferry-pci-fn.addr' doesn't take value '00.8'".into()),
            ("ferry-pci-fn", "p", pci("05.0", false), "PCI: slot 05 is not a hotplug slot (slots 00-01)".into()),
            ("ferry-pci-fn", "p", pci("01.0", false), "Hot-plug failed: connector 0x40000008 is busy (unplug pending); retry later".into()),
            ("ferry-pci-fn", "p", pci("00.0", false), "PCI: 00.0 indicates single function, but 00.1 is already populated".into()),
        ];
        for (driver, id, props, want) in cases {
            let before = m.clone();
            let err = m
                .device_add(driver, id, &props, RunPhase::Started)
                .unwrap_err();
            assert_eq!(err.to_string(), want);
            assert_eq!(m, before, "{want}");
        }
        let err = m.device_add("ferry-pci-fn", "p", &pci("01.0", false), RunPhase::Started);
        assert!(err.unwrap_err().is_transient());
        // memory hotplug is not offered by ferry-1.x
        for name in ["ferry-1.0", "ferry-1.1"] {
            let mut m = mgr(name);
            let before = m.clone();
            let err = m.device_add("ferry-mem-block", "m0", &mem(0), RunPhase::Started);
            assert_eq!(
                err.unwrap_err().to_string(),
                format!("Memory hotplug is not supported by machine type '{name}'")
            );
            assert_eq!(m, before);
        }
        // migration in progress
        let mut m = running_with_cpu1();
        m.set_migration_in_progress(true);
        let before = m.clone();
        let e = m.device_add("ferry-cpu-core", "cpu2", &cpu(2), RunPhase::Started);
        assert_eq!(
            e.unwrap_err().to_string(),
            "device_add not allowed while migrating"
        );
        let e = m.device_del("cpu1", 0);
        assert_eq!(
            e.unwrap_err().to_string(),
            "device_del not allowed while migrating"
        );
        assert_eq!(m, before);
    }

    #[test]
    fn busy_while_blinking_or_configuring() {
        let mut m = mgr("ferry-2.0");
        m.guest_op(
            0x4000_0008,
            GuestOp::dr_indicator(crate::DrIndicator::Action),
        )
        .unwrap();
        let before = m.clone();
        let e = m
            .device_add("ferry-pci-fn", "p", &pci("01.0", false), RunPhase::Started)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Hot-plug failed: connector 0x40000008 is busy (indicator blinking); retry later"
        );
        assert_eq!(m, before);
        // a function of the slot blinking blocks function 0
        m.guest_op(
            0x4000_0008,
            GuestOp::dr_indicator(crate::DrIndicator::Inactive),
        )
        .unwrap();
        m.device_add("ferry-pci-fn", "f3", &pci("1.3", false), RunPhase::Started)
            .unwrap();
        m.guest_op(
            0x4000_000b,
            GuestOp::dr_indicator(crate::DrIndicator::Identify),
        )
        .unwrap();
        let before = m.clone();
        let e = m.device_add("ferry-pci-fn", "f0", &pci("1", true), RunPhase::Started);
        assert!(matches!(
            e,
            Err(HotplugError::Busy {
                index: 0x4000_000b,
                reason: BusyReason::IndicatorBlinking
            })
        ));
        assert_eq!(m, before);
    }

    #[test]
    fn event_queue_full_is_transient_and_changes_nothing() {
        let cfg = HotplugConfig {
            cpu_cores: 70,
            ..Default::default()
        };
        let mut m = HotplugManager::new(cfg, machine_types::newest()).unwrap();
        for i in 0..EVENT_QUEUE_CAPACITY as u32 {
            m.device_add(
                "ferry-cpu-core",
                &format!("c{i}"),
                &cpu(i),
                RunPhase::Started,
            )
            .unwrap();
        }
        let before = m.clone();
        let e = m
            .device_add("ferry-cpu-core", "late", &cpu(65), RunPhase::Started)
            .unwrap_err();
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "Hot-plug failed: guest event queue is full (64 events pending); retry later"
        );
        assert_eq!(m, before);
    }

    #[test]
    fn multifunction_ordering_and_slot_unplug() {
        let mut m = mgr("ferry-2.0");
        m.device_add("ferry-pci-fn", "f2", &pci("01.2", false), RunPhase::Started)
            .unwrap();
        m.device_add("ferry-pci-fn", "f1", &pci("01.1", false), RunPhase::Started)
            .unwrap();
        assert!(
            m.events().is_empty(),
            "non-zero functions wait for function 0"
        );
        assert!(!m.take_irq());
        m.device_add("ferry-pci-fn", "f0", &pci("01.0", true), RunPhase::Started)
            .unwrap();
        let idx: Vec<u32> = m.events().iter().map(|e| e.index).collect();
        assert_eq!(idx, [0x4000_0008, 0x4000_0009, 0x4000_000a]);
        assert!(m.take_irq());
        // a function after function 0 is refused
        let before = m.clone();
        let e = m.device_add("ferry-pci-fn", "f3", &pci("01.3", false), RunPhase::Started);
        assert_eq!(
            e.unwrap_err().to_string(),
            "PCI: slot 01 function 0 already occupied by 'f0', additional functions can no longer be exposed to guest"
        );
        assert_eq!(m, before);
        while m.pop_event().is_some() {}
        for i in idx {
            guest_configure(&mut m, i);
        }
        m.drain_effects();
        // device_del of a non-zero function is refused
        let before = m.clone();
        assert_eq!(
            m.device_del("f1", 0).unwrap_err().to_string(),
            "Unplug function 0 to remove slot 01"
        );
        assert_eq!(m, before);
        // function 0 takes the whole slot; events 7..0 as QEMU
        m.device_del("f0", 10).unwrap();
        let evs: Vec<(u32, GuestEventKind)> =
            m.events().iter().map(|e| (e.index, e.kind)).collect();
        assert_eq!(
            evs,
            [
                (0x4000_000a, GuestEventKind::Unplug),
                (0x4000_0009, GuestEventKind::Unplug),
                (0x4000_0008, GuestEventKind::Unplug)
            ]
        );
        for i in [0x4000_0008, 0x4000_0009, 0x4000_000a] {
            let c = m.connector(i).unwrap();
            assert!(c.unplug_requested());
            assert_eq!(c.unplug_deadline_ms(), Some(10 + T));
        }
        for i in [0x4000_000a, 0x4000_0009, 0x4000_0008] {
            assert_eq!(guest_release(&mut m, i), Ok(Outcome::UnplugCompleted));
        }
        assert_eq!(
            m.drain_events(),
            [deleted("f2"), deleted("f1"), deleted("f0")]
        );
        assert!(m.connectors().all(|c| c.device().is_none()));
        m.check_invariants().unwrap();
    }

    #[test]
    fn half_plugged_slot_function_goes_alone() {
        let mut m = mgr("ferry-2.0");
        m.device_add("ferry-pci-fn", "f1", &pci("00.1", false), RunPhase::Started)
            .unwrap();
        m.drain_effects();
        // the guest never saw it: released at once
        m.device_del("f1", 0).unwrap();
        assert_eq!(m.drain_events(), [deleted("f1")]);
        assert_eq!(
            m.drain_effects(),
            [Effect::TearDown {
                device: "f1".into(),
                resource: Resource::PciFn {
                    slot: 0,
                    function: 1
                }
            }]
        );
    }

    #[test]
    fn repeated_device_del_requeues_and_keeps_deadline() {
        let mut m = running_with_cpu1();
        m.device_del("cpu1", 100).unwrap();
        assert!(m.take_irq());
        let c = m.connector(0x1000_0001).unwrap();
        assert_eq!(c.unplug_deadline_ms(), Some(100 + T));
        // guest fetched the event but does nothing
        assert_eq!(m.pop_event().unwrap().kind, GuestEventKind::Unplug);
        m.device_del("cpu1", 700).unwrap();
        assert!(m.take_irq(), "re-sent");
        assert_eq!(m.events().len(), 1);
        // still queued: not duplicated, but the interrupt is pulsed again
        m.device_del("cpu1", 800).unwrap();
        assert_eq!(m.events().len(), 1);
        assert!(m.take_irq());
        assert_eq!(
            m.connector(0x1000_0001).unwrap().unplug_deadline_ms(),
            Some(100 + T)
        );
        assert_eq!(m.next_deadline(), Some(100 + T));
        let e = m.device_del("nope", 0).unwrap_err();
        assert_eq!(e.to_string(), "Device 'nope' not found");
    }

    #[test]
    fn timeout_emits_guest_error_allows_retry_and_late_isolate_fails() {
        let mut m = running_with_cpu1();
        m.device_del("cpu1", 0).unwrap();
        m.tick(T - 1);
        assert!(m.drain_events().is_empty());
        m.tick(T);
        assert_eq!(m.drain_events(), [guest_error("cpu1")]);
        assert!(m.events().is_empty(), "the stale request is withdrawn");
        let q = &m.query_connectors(T)[1];
        assert!(!q.unplug_pending && q.unplug_timed_out && q.remaining_ms.is_none());
        // late isolate: RTAS hardware error, error stands, nothing released
        assert_eq!(
            m.guest_op(0x1000_0001, GuestOp::ISOLATE),
            Err(RtasError::HwError)
        );
        assert!(m.drain_events().is_empty() && m.drain_effects().is_empty());
        m.tick(10 * T);
        assert!(m.drain_events().is_empty(), "fires once");
        // retry works and completes
        m.device_del("cpu1", 2 * T).unwrap();
        assert_eq!(
            m.connector(0x1000_0001).unwrap().unplug_deadline_ms(),
            Some(3 * T)
        );
        assert_eq!(
            guest_release(&mut m, 0x1000_0001),
            Ok(Outcome::UnplugCompleted)
        );
        assert_eq!(m.drain_events(), [deleted("cpu1")]);
        m.check_invariants().unwrap();
    }

    #[test]
    fn guest_refusal_emits_guest_error_at_once() {
        let mut m = running_with_cpu1();
        m.device_del("cpu1", 0).unwrap();
        assert_eq!(
            m.guest_op(0x1000_0001, GuestOp::UNISOLATE),
            Ok(Outcome::UnplugRejected)
        );
        assert_eq!(m.drain_events(), [guest_error("cpu1")]);
        assert!(m.events().is_empty());
        m.tick(10 * T);
        assert!(
            m.drain_events().is_empty(),
            "no second error at the deadline"
        );
        m.device_del("cpu1", 0).unwrap();
        assert!(m.connector(0x1000_0001).unwrap().unplug_requested());
    }

    #[test]
    fn release_during_migration_is_pending_until_resume() {
        let mut m = running_with_cpu1();
        m.device_del("cpu1", 0).unwrap();
        m.set_migration_in_progress(true);
        assert_eq!(
            guest_release(&mut m, 0x1000_0001),
            Ok(Outcome::UnplugCompleted)
        );
        assert!(m.drain_events().is_empty() && m.drain_effects().is_empty());
        let c = m.connector(0x1000_0001).unwrap();
        assert!(c.release_pending() && c.device_id() == Some("cpu1"));
        m.set_migration_in_progress(false);
        // device_del of a release-pending device is a no-op
        let before = m.clone();
        m.device_del("cpu1", 5).unwrap();
        assert_eq!(m, before);
        assert_eq!(m.complete_pending_releases(), 1);
        assert_eq!(m.drain_events(), [deleted("cpu1")]);
        assert_eq!(
            m.drain_effects(),
            [Effect::TearDown {
                device: "cpu1".into(),
                resource: Resource::CpuCore { core: 1 }
            }]
        );
        assert_eq!(m.complete_pending_releases(), 0);
    }

    #[test]
    fn pre_start_add_then_reset_is_coldplug() {
        let mut m = mgr("ferry-2.0");
        m.device_add("ferry-cpu-core", "c2", &cpu(2), RunPhase::Prelaunch)
            .unwrap();
        m.device_add("ferry-mem-block", "m1", &mem(1), RunPhase::InMigrate)
            .unwrap();
        m.device_add(
            "ferry-pci-fn",
            "p",
            &pci("00.0", false),
            RunPhase::InMigrate,
        )
        .unwrap();
        assert!(m.needs_reset_before_start());
        assert_eq!(m.events().len(), 3, "hotplug path: events queued");
        assert_eq!(
            m.drain_effects()[1],
            Effect::MapMemoryBlock {
                device: "m1".into(),
                slot: 1,
                gpa: 0x1_0000_0000 + MEM_BLOCK_SIZE,
                size: MEM_BLOCK_SIZE
            }
        );
        m.pio_write(reg::SELECTOR, &0x1000_0002u32.to_le_bytes());
        m.reset_all();
        assert!(!m.needs_reset_before_start());
        assert!(m.events().is_empty());
        assert_eq!(*m.controller(), Controller::new());
        assert!(m.connectors().all(Connector::at_reset_state));
        assert_eq!(
            m.connector(0x1000_0002).unwrap().state(),
            DrcState::LogicalConfigured
        );
        assert_eq!(
            m.connector(0x8000_0001).unwrap().state(),
            DrcState::LogicalConfigured
        );
        let p = m.connector(0x4000_0000).unwrap();
        assert_eq!(
            (p.state(), p.dr_indicator()),
            (DrcState::PhysicalConfigured, crate::DrIndicator::Active)
        );
        assert!(m.drain_events().is_empty());
    }

    #[test]
    fn reset_releases_pending_unplugs() {
        let mut m = running_with_cpu1();
        m.device_del("cpu1", 0).unwrap();
        m.reset_all();
        assert_eq!(m.drain_events(), [deleted("cpu1")]);
        assert_eq!(
            m.connector(0x1000_0001).unwrap().state(),
            DrcState::LogicalUnusable
        );
        assert!(m.connectors().all(Connector::at_reset_state));
    }

    #[test]
    fn guest_drives_everything_through_ports() {
        let mut m = mgr("ferry-2.0");
        m.device_add("ferry-cpu-core", "cpu3", &cpu(3), RunPhase::Started)
            .unwrap();
        let rd = |m: &mut HotplugManager, off| {
            let mut b = [0u8; 4];
            m.pio_read(off, &mut b);
            u32::from_le_bytes(b)
        };
        let wr = |m: &mut HotplugManager, off, v: u32| m.pio_write(off, &v.to_le_bytes());
        assert_eq!(rd(&mut m, reg::PENDING), 1);
        let idx = rd(&mut m, reg::EVENT);
        assert_eq!((idx, rd(&mut m, reg::EVENT_KIND)), (0x1000_0003, 1));
        wr(&mut m, reg::SELECTOR, idx);
        wr(&mut m, reg::ARG, 1);
        wr(&mut m, reg::OP, op::SET_ALLOCATION);
        wr(&mut m, reg::OP, op::SET_ISOLATION);
        loop {
            wr(&mut m, reg::OP, op::CONFIGURE);
            if rd(&mut m, reg::STATUS) == 0 {
                break;
            }
        }
        assert_eq!(
            m.connector(idx).unwrap().state(),
            DrcState::LogicalConfigured
        );
        m.device_del("cpu3", 0).unwrap();
        assert_eq!(rd(&mut m, reg::EVENT), idx);
        assert_eq!(rd(&mut m, reg::EVENT_KIND), 2);
        wr(&mut m, reg::ARG, 0);
        wr(&mut m, reg::OP, op::SET_ISOLATION);
        wr(&mut m, reg::OP, op::SET_ALLOCATION);
        assert_eq!(rd(&mut m, reg::STATUS), 0);
        assert_eq!(m.drain_events(), [deleted("cpu3")]);
        // unknown connector: -3 / -3 / -9003
        wr(&mut m, reg::SELECTOR, 0x2000_0000);
        for (code, st) in [
            (op::SET_ISOLATION, -3),
            (op::GET_SENSOR, -3),
            (op::CONFIGURE, -9003),
        ] {
            wr(&mut m, reg::OP, code);
            assert_eq!(rd(&mut m, reg::STATUS) as i32, st);
        }
    }

    #[test]
    fn query_and_attached_devices() {
        let mut m = mgr("ferry-2.0");
        m.device_add("ferry-pci-fn", "f1", &pci("01.1", false), RunPhase::Started)
            .unwrap();
        m.device_add("ferry-pci-fn", "f0", &pci("01.0", true), RunPhase::Started)
            .unwrap();
        m.device_add("ferry-cpu-core", "c0", &cpu(0), RunPhase::Started)
            .unwrap();
        let q = m.query_connectors(0);
        assert_eq!(q.len(), 4 + 4 + 16);
        let f0 = q.iter().find(|c| c.index == 0x4000_0008).unwrap();
        assert_eq!(
            (f0.kind, f0.state, f0.isolation, f0.allocation, f0.indicator),
            (
                "pci-fn",
                "physical-poweron",
                "isolated",
                "usable",
                Some("inactive")
            )
        );
        assert_eq!(f0.device.as_deref(), Some("f0"));
        let c0 = &q[0];
        assert_eq!(
            (c0.state, c0.allocation, c0.indicator),
            ("logical-unusable", "unusable", None)
        );
        let order: Vec<String> = m.attached_devices().into_iter().map(|(id, _)| id).collect();
        assert_eq!(order, ["c0", "f1", "f0"]);
        assert_eq!(m.attached_devices()[2].1.props(), pci("01.0", true));
    }

    #[test]
    fn pci_addr_parsing_and_config_checks() {
        assert_eq!(parse_pci_addr("04.1"), Some((4, 1)));
        assert_eq!(parse_pci_addr("4"), Some((4, 0)));
        assert_eq!(parse_pci_addr("1f.7"), Some((0x1f, 7)));
        for bad in ["", "20", "04.8", "04.", ".1", "004.1", "g1", "04.1.2"] {
            assert_eq!(parse_pci_addr(bad), None, "{bad}");
        }
        let bad = HotplugConfig {
            pci_slots: 33,
            ..Default::default()
        };
        assert!(HotplugManager::new(bad, machine_types::newest()).is_err());
        let bad = HotplugConfig {
            mem_base: 0x1000,
            ..Default::default()
        };
        assert!(HotplugManager::new(bad, machine_types::newest()).is_err());
    }
}
