//! Ferry's versioned machine types.
//!
//! A machine type is a promise of a stable guest ABI *and* a stable migration stream layout.
//! As in QEMU's `hw_compat_X_Y` arrays, the newest type is the reference and every older type is
//! the newest plus a list of typed compat properties; an older type inherits the list of the
//! next newer one and appends its own, so properties accumulate downward.

use serde::Serialize;
use std::fmt;

pub mod cpu;

pub use cpu::CpuModel;

/// Everything a machine type changes, read by devices as typed fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Compat {
    /// Version of the connector (DRC) section written to the stream.
    pub drc_section_version: u32,
    /// Whether a pending unplug's remaining time travels in the `unplug-timer` subsection.
    pub drc_unplug_timer: bool,
    /// Whether memory blocks (`ferry-mem-block`) may be hot-plugged.
    pub mem_hotplug: bool,
    /// The CPU model the guest sees unless `--cpu` picks another of `cpu_models`.
    pub cpu_model: CpuModel,
    /// The CPU models a VM of this type may be given (`--cpu`), the default first.
    pub cpu_models: &'static [CpuModel],
}

/// The newest machine type's properties; older types override some of them.
const NEWEST_COMPAT: Compat = Compat {
    drc_section_version: 2,
    drc_unplug_timer: true,
    mem_hotplug: true,
    cpu_model: CpuModel::X86V2,
    cpu_models: &[CpuModel::X86V2, CpuModel::X86V3],
};

/// One compat property: a typed override applied on top of the newest machine type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "property", content = "value")]
pub enum CompatProp {
    /// Write connector sections at this version.
    DrcSectionVersion(u32),
    /// Emit (or not) the `unplug-timer` subsection.
    DrcUnplugTimer(bool),
    /// Offer (or not) memory-block hotplug.
    MemHotplug(bool),
    /// Present this CPU model, and only it.
    CpuModel(CpuModel),
}

impl CompatProp {
    fn apply(self, c: &mut Compat) {
        match self {
            CompatProp::DrcSectionVersion(v) => c.drc_section_version = v,
            CompatProp::DrcUnplugTimer(b) => c.drc_unplug_timer = b,
            CompatProp::MemHotplug(b) => c.mem_hotplug = b,
            CompatProp::CpuModel(m) => {
                c.cpu_model = m;
                c.cpu_models = match m {
                    CpuModel::FerryV1 => &[CpuModel::FerryV1],
                    CpuModel::FerryV2 => &[CpuModel::FerryV2],
                    CpuModel::X86V2 => &[CpuModel::X86V2],
                    CpuModel::X86V3 => &[CpuModel::X86V3],
                };
            }
        }
    }
}

/// Compat properties that turn ferry-2.1 into ferry-2.0: the host-masked CPU model.
const COMPAT_2_0: &[CompatProp] = &[CompatProp::CpuModel(CpuModel::FerryV2)];

/// Compat properties that turn ferry-2.0 into ferry-1.1.
const COMPAT_1_1: &[CompatProp] = &[
    CompatProp::DrcSectionVersion(1),
    CompatProp::MemHotplug(false),
    CompatProp::CpuModel(CpuModel::FerryV1),
];

/// Compat properties that turn ferry-1.1 into ferry-1.0.
const COMPAT_1_0: &[CompatProp] = &[CompatProp::DrcUnplugTimer(false)];

/// A versioned machine type.
#[derive(Debug, PartialEq, Eq)]
pub struct MachineType {
    name: &'static str,
    description: &'static str,
    /// Compat arrays applied in order, newest first (as QEMU chains `hw_compat_*`).
    compat_chain: &'static [&'static [CompatProp]],
}

/// Name of the alias that always means the newest machine type.
pub const ALIAS_NEWEST: &str = "ferry";

/// Every machine type, newest first.
static MACHINES: [MachineType; 4] = [
    MachineType {
        name: "ferry-2.1",
        description: "host-independent CPU models ferry-v2 (default) and ferry-v3",
        compat_chain: &[],
    },
    MachineType {
        name: "ferry-2.0",
        description: "connector section v2, memory-block hotplug, CPU model ferry-cpu-v2",
        compat_chain: &[COMPAT_2_0],
    },
    MachineType {
        name: "ferry-1.1",
        description: "adds the connector unplug-timer subsection",
        compat_chain: &[COMPAT_2_0, COMPAT_1_1],
    },
    MachineType {
        name: "ferry-1.0",
        description: "connector section v1, sent only while transitional; no memory hotplug",
        compat_chain: &[COMPAT_2_0, COMPAT_1_1, COMPAT_1_0],
    },
];

/// A machine type name that is not registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Unknown machine type '{name}'; valid types: {valid}")]
pub struct UnknownMachine {
    /// The name that was asked for.
    pub name: String,
    /// Comma-separated list of valid names (alias included).
    pub valid: String,
}

impl MachineType {
    /// Canonical name, e.g. `ferry-1.1` (never the alias).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// One-line summary of what this type promises.
    pub fn description(&self) -> &'static str {
        self.description
    }

    /// The compat properties that distinguish this type from the newest, in application order.
    pub fn compat_props(&self) -> impl Iterator<Item = CompatProp> + '_ {
        self.compat_chain.iter().flat_map(|a| a.iter().copied())
    }

    /// Resolved properties: the newest type's, overridden by this type's compat properties.
    pub fn compat(&self) -> Compat {
        let mut c = NEWEST_COMPAT;
        for p in self.compat_props() {
            p.apply(&mut c);
        }
        c
    }

    /// Whether this is the newest machine type (what the alias resolves to).
    pub fn is_newest(&self) -> bool {
        std::ptr::eq(self, newest())
    }

    /// Look a type up by canonical name or by the alias `ferry`.
    pub fn lookup(name: &str) -> Result<&'static MachineType, UnknownMachine> {
        if name == ALIAS_NEWEST {
            return Ok(newest());
        }
        MACHINES
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| UnknownMachine {
                name: name.to_owned(),
                valid: valid_names().join(", "),
            })
    }
}

impl fmt::Display for MachineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// The newest machine type.
pub fn newest() -> &'static MachineType {
    &MACHINES[0]
}

/// All machine types, newest first.
pub fn all() -> &'static [MachineType] {
    &MACHINES
}

/// Every accepted name: the alias first, then canonical names newest first.
pub fn valid_names() -> Vec<&'static str> {
    std::iter::once(ALIAS_NEWEST)
        .chain(MACHINES.iter().map(|m| m.name))
        .collect()
}

/// The text `--machine help` prints: one line per type, the alias marked.
pub fn help_text() -> String {
    let mut out = String::from("Supported machine types:\n");
    for m in all() {
        let alias = if m.is_newest() {
            format!(" (alias of '{ALIAS_NEWEST}')")
        } else {
            String::new()
        };
        out.push_str(&format!("{:<10} {}{alias}\n", m.name, m.description));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_resolves_to_newest() {
        let m = MachineType::lookup("ferry").unwrap();
        assert_eq!(m.name(), "ferry-2.1");
        assert!(m.is_newest());
        assert!(!MachineType::lookup("ferry-1.0").unwrap().is_newest());
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let err = MachineType::lookup("pc-q35-7.2").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Unknown machine type 'pc-q35-7.2'; valid types: ferry, ferry-2.1, ferry-2.0, ferry-1.1, ferry-1.0"
        );
    }

    #[test]
    fn each_type_changes_what_goes_on_the_wire() {
        let c21 = MachineType::lookup("ferry-2.1").unwrap().compat();
        let c20 = MachineType::lookup("ferry-2.0").unwrap().compat();
        let c11 = MachineType::lookup("ferry-1.1").unwrap().compat();
        let c10 = MachineType::lookup("ferry-1.0").unwrap().compat();
        assert_eq!(c21, NEWEST_COMPAT);
        assert_eq!(c21.cpu_models, [CpuModel::X86V2, CpuModel::X86V3]);
        assert_eq!(
            (c20.cpu_model, c20.cpu_models),
            (CpuModel::FerryV2, &[CpuModel::FerryV2][..])
        );
        assert_ne!(c21, c20);
        assert_eq!((c20.drc_section_version, c11.drc_section_version), (2, 1));
        assert!(c20.mem_hotplug && !c11.mem_hotplug && !c10.mem_hotplug);
        assert!(c11.drc_unplug_timer && !c10.drc_unplug_timer);
        assert_eq!(c10.drc_section_version, 1);
        assert_eq!(c10.cpu_model, CpuModel::FerryV1);
        assert_eq!(c20.cpu_model.xcr0_mask(), 0x7);
        // Every pair of types differs somewhere.
        assert_ne!(c20, c11);
        assert_ne!(c11, c10);
    }

    #[test]
    fn older_types_accumulate_newer_compat_props() {
        let props: Vec<_> = MachineType::lookup("ferry-1.0")
            .unwrap()
            .compat_props()
            .collect();
        assert_eq!(
            props.len(),
            COMPAT_2_0.len() + COMPAT_1_1.len() + COMPAT_1_0.len()
        );
        assert!(props.contains(&CompatProp::MemHotplug(false)));
        assert!(props.contains(&CompatProp::DrcUnplugTimer(false)));
        assert_eq!(newest().compat_props().count(), 0);
    }

    #[test]
    fn listing_and_help() {
        assert_eq!(
            valid_names(),
            ["ferry", "ferry-2.1", "ferry-2.0", "ferry-1.1", "ferry-1.0"]
        );
        let help = help_text();
        assert_eq!(help.lines().count(), 1 + all().len());
        assert!(help.contains("ferry-2.1") && help.contains("(alias of 'ferry')"));
    }

    #[test]
    fn compat_props_serialize_typed() {
        let j = serde_json::to_string(&CompatProp::DrcSectionVersion(1)).unwrap();
        assert_eq!(j, r#"{"property":"drc-section-version","value":1}"#);
    }
}
