//! The configuration record and the switchover record, and how a destination compares
//! configurations before any RAM moves.

use devstate::{Catalog, Section, record};

record! {
    /// One guest RAM region.
    pub struct RegionDesc {
        /// Guest-physical start.
        pub gpa: u64,
        /// Size in bytes.
        pub size: u64,
    }
}

record! {
    /// One device attached to a hotplug connector.
    pub struct DeviceDesc {
        /// PAPR connector index (`type << 28 | id`).
        pub connector: u32,
        /// Driver, e.g. `ferry-pci-fn`.
        pub driver: String [max = 32],
        /// Device id given at `device_add`.
        pub id: String [max = 64],
    }
}

record! {
    /// The first record of every stream: what the destination must match.
    pub struct ConfigRecord {
        /// Canonical machine type.
        pub machine: String [max = 32],
        /// CPU model name.
        pub cpu_model: String [max = 32],
        /// Boot vCPUs.
        pub vcpus: u32,
        /// Guest RAM layout, hot-plugged memory blocks included.
        pub memory: Vec<RegionDesc> [max = 1024],
        /// Devices on hotplug connectors, sorted by connector.
        pub devices: Vec<DeviceDesc> [max = 4096],
    }
}

impl Section for ConfigRecord {
    const NAME: &'static str = "config";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
}

record! {
    /// Written by the migration engine after every device section.
    pub struct SwitchoverRecord {
        /// Whether the guest was running when the source stopped it (the destination resumes
        /// on COMMIT only if so).
        pub source_running: bool,
    }
}

impl Section for SwitchoverRecord {
    const NAME: &'static str = "migration";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
    const REQUIRED: bool = true;
}

/// Register the sections the engine itself writes.
pub fn register(c: &mut Catalog) {
    c.register::<ConfigRecord>().register::<SwitchoverRecord>();
}

fn mib(b: u64) -> String {
    if b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else {
        format!("{b} bytes")
    }
}

impl ConfigRecord {
    /// Every difference between the source's configuration (`self`) and the destination's,
    /// in words an operator can act on. Empty when they match.
    pub fn differences(&self, dst: &ConfigRecord) -> Vec<String> {
        let mut d = Vec::new();
        if self.machine != dst.machine {
            d.push(format!(
                "machine type: source {}, destination {}",
                self.machine, dst.machine
            ));
        }
        if self.cpu_model != dst.cpu_model {
            d.push(format!(
                "CPU model: source {}, destination {}",
                self.cpu_model, dst.cpu_model
            ));
        }
        if self.vcpus != dst.vcpus {
            d.push(format!(
                "vCPUs: source {}, destination {}",
                self.vcpus, dst.vcpus
            ));
        }
        let n = self.memory.len().max(dst.memory.len());
        for i in 0..n {
            let show = |r: Option<&RegionDesc>| match r {
                Some(r) => format!("{:#x}+{}", r.gpa, mib(r.size)),
                None => "none".to_owned(),
            };
            let (a, b) = (self.memory.get(i), dst.memory.get(i));
            if a != b {
                d.push(format!(
                    "memory region {i}: source {}, destination {}",
                    show(a),
                    show(b)
                ));
            }
        }
        let find = |v: &[DeviceDesc], c: u32| v.iter().find(|x| x.connector == c).cloned();
        let mut connectors: Vec<u32> = self
            .devices
            .iter()
            .chain(&dst.devices)
            .map(|x| x.connector)
            .collect();
        connectors.sort_unstable();
        connectors.dedup();
        for c in connectors {
            let show = |x: &Option<DeviceDesc>| match x {
                Some(x) => format!("{} '{}'", x.driver, x.id),
                None => "nothing".to_owned(),
            };
            let (a, b) = (find(&self.devices, c), find(&dst.devices, c));
            if a != b {
                d.push(format!(
                    "connector {c:#010x}: source has {}, destination has {}",
                    show(&a),
                    show(&b)
                ));
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ConfigRecord {
        ConfigRecord {
            machine: "ferry-2.0".into(),
            cpu_model: "ferry-cpu-v2".into(),
            vcpus: 1,
            memory: vec![RegionDesc {
                gpa: 0,
                size: 64 << 20,
            }],
            devices: vec![DeviceDesc {
                connector: 0x4000_0008,
                driver: "ferry-pci-fn".into(),
                id: "nic1".into(),
            }],
        }
    }

    #[test]
    fn equal_configs_have_no_differences() {
        assert!(cfg().differences(&cfg()).is_empty());
    }

    #[test]
    fn every_difference_is_listed() {
        let mut dst = cfg();
        dst.machine = "ferry-1.0".into();
        dst.vcpus = 2;
        dst.memory.push(RegionDesc {
            gpa: 1 << 32,
            size: 16 << 20,
        });
        dst.devices.clear();
        assert_eq!(
            cfg().differences(&dst),
            [
                "machine type: source ferry-2.0, destination ferry-1.0",
                "vCPUs: source 1, destination 2",
                "memory region 1: source none, destination 0x100000000+16 MiB",
                "connector 0x40000008: source has ferry-pci-fn 'nic1', destination has nothing",
            ]
        );
    }
}
