//! `device_add` and `device_del`: parsing, every refusal check, attaching, the guest events
//! they queue, and the release of a device that left its connector.

use super::types::split_devfn;
use super::{
    DeviceProps, DeviceSpec, Effect, Event, HotplugError, HotplugManager, MAX_PCI_SLOTS,
    MEM_BLOCK_SIZE, PCI_FUNCTIONS, RunPhase, device_path,
};
use crate::connector::{AttachedDevice, Connector, UnplugRequest, valid_device_id};
use crate::events::{GuestEvent, GuestEventKind};
use crate::papr::ConnectorKind;

impl HotplugManager {
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
    pub(super) fn released(&mut self, index: u32, dev: AttachedDevice) {
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

    pub(super) fn guest_error(&mut self, index: u32) {
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
