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
//!
//! By concern: `types` (configuration, device specs, effects, events, query rows), `error`,
//! `plug` (`device_add` / `device_del` and releases), `guest` (guest operations and the
//! controller's ports), `timers` (unplug deadlines), `lifecycle` (reset, migration flag,
//! pending releases), `query`, and `sections` (save and load of the hotplug sections).

mod error;
mod guest;
mod lifecycle;
mod plug;
mod query;
mod sections;
#[cfg(test)]
mod tests;
mod timers;
mod types;

pub use error::{HotplugError, LoadError};
pub use plug::parse_pci_addr;
pub use types::{
    ConnectorInfo, DEFAULT_UNPLUG_TIMEOUT_MS, DeviceProps, DeviceSpec, Effect, Event,
    HotplugConfig, MAX_PCI_SLOTS, MEM_BLOCK_SIZE, PCI_FUNCTIONS, Resource, RunPhase, device_path,
};

use std::collections::BTreeMap;

use machine_types::MachineType;

use crate::connector::Connector;
use crate::controller::Controller;
use crate::events::EventQueue;
use crate::papr::{ConnectorKind, MAX_CONNECTOR_ID};
use types::{devfn, split_devfn};

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
}
