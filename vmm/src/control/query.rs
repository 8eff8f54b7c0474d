//! Read-only queries of the VM: hotpluggable CPUs, the test guest.

use super::{Controller, lock};
use crate::RunState;
use crate::qmp::QmpError;
use serde_json::{Value, json};

impl Controller {
    /// Boot vCPUs (always present) and every CPU-core connector (plugged or free), as
    /// QEMU lists its possible CPUs.
    pub(super) fn query_hotpluggable_cpus(&self) -> Value {
        let cpu = |core: u32, path: Option<String>| {
            let mut v =
                json!({"type": "ferry-cpu-core", "vcpus-count": 1, "props": {"core-id": core}});
            if let Some(p) = path {
                v["qom-path"] = json!(p);
            }
            v
        };
        let mut list: Vec<Value> = (0..self.boot_vcpus)
            .map(|i| cpu(i, Some(format!("/machine/unattached/cpu[{i}]"))))
            .collect();
        let m = lock(&self.hp);
        for c in m
            .query_connectors(0)
            .into_iter()
            .filter(|c| c.kind == "cpu-core")
        {
            list.push(cpu(
                c.id,
                c.device.map(|d| crate::hotplug::manager::device_path(&d)),
            ));
        }
        Value::Array(list)
    }

    pub(super) fn query_guest(&self) -> Result<Value, QmpError> {
        let mb = crate::guest::Mailbox::read(&self.mem)
            .map_err(|e| QmpError::generic(format!("Cannot read the guest mailbox: {e}")))?;
        // A destination that has not received its guest yet, or a boot-sector guest, has no
        // mailbox: say so rather than report zeros.
        if mb.magic != crate::guest::mailbox::MAGIC {
            return Err(QmpError::generic(
                "The guest has no Ferry test-guest mailbox (not loaded yet, or a boot-sector guest)",
            ));
        }
        Ok(
            json!({"pass": mb.current_pass(), "page": mb.current_page(), "working-set-pages": mb.ws_pages}),
        )
    }

    pub(super) fn verify_guest(&self) -> Result<Value, QmpError> {
        self.refuse_if_migrating("__org.ferry_verify-guest")?;
        if self.run_state() == RunState::Running {
            return Err(QmpError::generic(
                "Stop the guest first: its memory can only be verified while paused",
            ));
        }
        let vm = lock(&self.vm);
        vm.verify_guest_pattern()
            .map_err(|e| QmpError::generic(format!("Memory pattern check failed: {e}")))?;
        let blocks = vm
            .verify_hotplug_blocks()
            .map_err(|e| QmpError::generic(format!("Memory block pattern check failed: {e}")))?;
        let mb = vm.mailbox().map_err(|e| QmpError::generic(e.to_string()))?;
        Ok(json!({"ok": true, "pages": mb.ws_pages, "pass": mb.current_pass(), "blocks": blocks}))
    }
}
