//! The manager's vocabulary: its configuration and run phase, `device_add` properties and
//! parsed device specs, the resources connectors stand for, and its outputs (effects, events,
//! query rows).

use crate::papr::ConnectorKind;

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

/// PCI devfn of `slot`, `function`.
pub(crate) fn devfn(slot: u8, function: u8) -> u32 {
    (u32::from(slot) << 3) | u32::from(function)
}

/// Slot and function of a PCI devfn.
pub(crate) fn split_devfn(id: u32) -> (u8, u8) {
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
