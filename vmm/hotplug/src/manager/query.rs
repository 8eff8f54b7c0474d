//! Read-only views: the connector query, the attached devices in `device_add` order, and the
//! invariant check.

use super::types::split_devfn;
use super::{ConnectorInfo, DeviceSpec, HotplugManager, PCI_FUNCTIONS};
use crate::connector::BusyReason;
use crate::papr::ConnectorKind;

impl HotplugManager {
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
}
