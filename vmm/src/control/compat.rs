//! What a domain started by libvirt (`ferry qemu-compat`) is asked beyond Ferry's own
//! commands: its name, UUID, chardevs and vCPU threads, as QEMU answers them.

use super::{Controller, lock};
use crate::qmp::QmpError;
use serde_json::{Value, json};
use std::os::fd::OwnedFd;

/// A character device, as `query-chardev` lists it.
#[derive(Debug, Clone)]
pub struct Chardev {
    /// The `-chardev` id.
    pub label: String,
    /// QEMU's description, e.g. `pty:/dev/pts/3`.
    pub filename: String,
}

/// What QEMU's command line said about the domain beyond the VM's shape.
#[derive(Debug, Clone, Default)]
pub struct DomainInfo {
    /// `-name guest=`.
    pub name: Option<String>,
    /// `-uuid`.
    pub uuid: Option<String>,
    /// The chardevs with a frontend (the serial port).
    pub chardevs: Vec<Chardev>,
    /// Cold-plugged devices with an id: `(id, QOM type)`.
    pub devices: Vec<(String, &'static str)>,
}

impl Controller {
    /// Record the domain's name, UUID and chardevs (before QMP serves).
    pub fn set_domain_info(&self, info: DomainInfo) {
        *lock(&self.domain) = info;
    }

    pub(super) fn query_name(&self) -> Value {
        match &lock(&self.domain).name {
            Some(n) => json!({"name": n}),
            None => json!({}),
        }
    }

    pub(super) fn query_uuid(&self) -> Value {
        let uuid = lock(&self.domain).uuid.clone();
        json!({"UUID": uuid.unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".into())})
    }

    pub(super) fn query_chardev(&self) -> Value {
        let list: Vec<Value> = lock(&self.domain)
            .chardevs
            .iter()
            .map(|c| json!({"label": c.label, "filename": c.filename, "frontend-open": true}))
            .collect();
        Value::Array(list)
    }

    /// `getfd`: keeps the descriptor passed with the command under `fdname` (replacing one of
    /// that name), for `migrate fd:NAME`.
    pub(super) fn getfd(
        &self,
        a: super::commands::Arguments,
        mut fds: Vec<OwnedFd>,
    ) -> Result<Value, QmpError> {
        let mut a = crate::qmp::Args::new(a);
        let name = a.required_str("fdname")?;
        a.finish()?;
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::parameter_expects(
                "fdname",
                "a name not starting with a digit",
            ));
        }
        let Some(fd) = fds.pop() else {
            return Err(QmpError::generic(
                "No file descriptor supplied via SCM_RIGHTS",
            ));
        };
        self.add_passed_fd(name, fd);
        Ok(json!({}))
    }

    /// Keeps `fd` under `name` for `fd:NAME` (`getfd`, or `-incoming fd:N` as `N`).
    pub fn add_passed_fd(&self, name: String, fd: OwnedFd) {
        lock(&self.passed_fds).insert(name, fd);
    }

    /// `closefd`.
    pub(super) fn closefd(&self, a: super::commands::Arguments) -> Result<Value, QmpError> {
        let mut a = crate::qmp::Args::new(a);
        let name = a.required_str("fdname")?;
        a.finish()?;
        lock(&self.passed_fds)
            .remove(&name)
            .map(|_| json!({}))
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' not found")))
    }

    /// Takes the descriptor named `name` out of the store (an `fd:NAME` migration uses it
    /// up, as QEMU's does).
    pub(super) fn take_passed_fd(&self, name: &str) -> Result<std::fs::File, String> {
        lock(&self.passed_fds)
            .remove(name)
            .map(std::fs::File::from)
            .ok_or_else(|| format!("File descriptor named '{name}' has not been found"))
    }

    /// `qom-list`: the devices under `/machine/peripheral` (cold-plugged and hot-plugged, by
    /// id), and of a device or vCPU its type.
    pub(super) fn qom_list(&self, a: super::commands::Arguments) -> Result<Value, QmpError> {
        let mut a = crate::qmp::Args::new(a);
        let path = a.required_str("path")?;
        a.finish()?;
        let mut devices = lock(&self.domain).devices.clone();
        for c in lock(&self.hp).query_connectors(0) {
            if let Some(d) = c.device {
                let ty = match c.kind {
                    "cpu-core" => "ferry-cpu-core",
                    "mem-block" => "ferry-mem-block",
                    _ => "ferry-pci-fn",
                };
                devices.push((d, ty));
            }
        }
        // A device's own properties are not listed: libvirt reads none of them.
        let props = json!([{"name": "type", "type": "string"}]);
        if path == "/machine/peripheral" {
            let list: Vec<Value> = devices
                .iter()
                .map(|(id, t)| json!({"name": id, "type": format!("child<{t}>")}))
                .collect();
            return Ok(Value::Array(list));
        }
        if let Some(i) = path
            .strip_prefix("/machine/unattached/cpu[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|i| i.parse::<u32>().ok())
            && i < self.boot_vcpus
        {
            return Ok(props);
        }
        if path
            .strip_prefix("/machine/peripheral/")
            .is_some_and(|id| devices.iter().any(|d| d.0 == id))
        {
            return Ok(props);
        }
        Err(QmpError::new(
            crate::qmp::ErrorClass::DeviceNotFound,
            format!("Device '{path}' not found"),
        ))
    }

    /// Every vCPU that exists (boot and hot-plugged), with its thread and the QOM path
    /// `query-hotpluggable-cpus` gives its core.
    pub(super) fn query_cpus_fast(&self) -> Result<Value, QmpError> {
        let threads = vcpu_threads()
            .map_err(|e| QmpError::generic(format!("Cannot list the vCPU threads: {e}")))?;
        let boot = self.boot_vcpus;
        let mut cpus: Vec<(u32, u32, String)> = (0..boot)
            .map(|i| (i, i, format!("/machine/unattached/cpu[{i}]")))
            .collect();
        for c in lock(&self.hp)
            .query_connectors(0)
            .into_iter()
            .filter(|c| c.kind == "cpu-core")
        {
            if let Some(d) = c.device {
                cpus.push((boot + c.id, c.id, crate::hotplug::manager::device_path(&d)));
            }
        }
        let list: Vec<Value> = cpus
            .into_iter()
            .filter_map(|(index, core, path)| {
                let tid = threads.iter().find(|t| t.0 == index)?.1;
                Some(json!({
                    "cpu-index": index,
                    "qom-path": path,
                    "thread-id": tid,
                    "props": {"core-id": core},
                    "target": "x86_64",
                }))
            })
            .collect();
        Ok(Value::Array(list))
    }
}

/// `(vCPU index, thread id)` of this process's vCPU threads (named `vcpuN`).
fn vcpu_threads() -> std::io::Result<Vec<(u32, u64)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/task")? {
        let e = e?;
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        if let Some(i) = comm
            .trim()
            .strip_prefix("vcpu")
            .and_then(|n| n.parse().ok())
        {
            out.push((i, tid));
        }
    }
    Ok(out)
}
