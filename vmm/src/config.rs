//! Machine shape (memory, vCPUs, machine type) and parsing of command-line values.

use std::fmt;
use std::str::FromStr;

use machine_types::cpu::Feature;
use machine_types::{CpuModel, MachineType};
use thiserror::Error;

use crate::guest::{self, layout};

/// Most vCPUs a VM may have (one boot stack each in the guest layout).
pub const MAX_VCPUS: u8 = layout::MAX_VCPUS;

/// Largest supported guest RAM (the boot page tables cover up to this, plus the PCI hole).
pub const MAX_MEMORY: u64 = 16 << 30;

/// Default working-set size of the dirtying guest, in MiB.
pub const DEFAULT_WORKING_SET_MIB: u64 = 16;

/// Errors in a machine configuration or a command-line value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size such as `512M` could not be parsed.
    #[error("Invalid size '{0}': expected a number with an optional K, M, G or T suffix")]
    InvalidSize(String),
    /// Guest RAM must be whole 4 KiB pages.
    #[error("Memory size {0} bytes is not a multiple of 4 KiB")]
    UnalignedMemory(u64),
    /// Guest RAM is larger than the boot page tables cover.
    #[error("Memory size {size} bytes exceeds the maximum of {max} bytes")]
    TooMuchMemory {
        /// Requested size.
        size: u64,
        /// Largest supported size.
        max: u64,
    },
    /// Guest RAM too small for the selected guest.
    #[error(
        "Memory size {size} bytes is too small: the {guest} guest needs at least {needed} bytes"
    )]
    TooLittleMemory {
        /// Requested size.
        size: u64,
        /// Smallest size the guest fits in.
        needed: u64,
        /// The guest workload.
        guest: String,
    },
    /// vCPU count out of range.
    #[error("vCPU count {0} is out of range 1..={MAX_VCPUS}")]
    VcpuCount(u32),
    /// Unknown machine type name (the message lists the valid ones).
    #[error(transparent)]
    UnknownMachine(#[from] machine_types::UnknownMachine),
    /// A `--guest` value could not be parsed.
    #[error("Invalid guest '{0}': expected dirty[:MiB[,rate]], idle or bootsector:FILE")]
    InvalidGuest(String),
    /// The working set would reach into the PCI hole.
    #[error("Working set of {mib} MiB does not fit below the PCI hole (at most {max_mib} MiB)")]
    WorkingSetTooBig {
        /// Requested working set.
        mib: u64,
        /// Largest working set.
        max_mib: u64,
    },
    /// A dirtying guest with an empty working set.
    #[error("The dirty guest needs a working set of at least 1 MiB")]
    EmptyWorkingSet,
    /// A `--cpu` model the machine type does not offer.
    #[error("CPU model '{model}' is not offered by machine type {machine}; valid models: {valid}")]
    CpuModel {
        /// The model asked for.
        model: String,
        /// The machine type.
        machine: String,
        /// Comma-separated list of the type's models.
        valid: String,
    },
    /// A `--x-hide-host-features` name that is not a known CPUID feature.
    #[error("Unknown CPU feature '{0}' in --x-hide-host-features")]
    UnknownFeature(String),
}

/// Looks a machine type up by name (`ferry-1.0`, ..., or the alias `ferry`); usable as a
/// clap `value_parser`.
pub fn parse_machine(name: &str) -> Result<&'static MachineType, ConfigError> {
    Ok(MachineType::lookup(name)?)
}

/// Parses a byte size: a decimal number with an optional binary suffix `K`, `M`, `G` or `T`
/// (case-insensitive, an optional trailing `B`/`iB` is accepted). A bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::InvalidSize(s.to_string());
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let t = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        Some('t') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// The workload the built-in test guest runs (see [`crate::guest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestSpec {
    /// vCPU 0 increments the first byte of every page of a working set, pass after pass.
    Dirty {
        /// Working-set size in bytes (a multiple of 4 KiB).
        working_set: u64,
        /// Delay-loop iterations between two pages (0 = full speed).
        delay_loops: u64,
    },
    /// Every vCPU idles in `sti; hlt`.
    Idle,
    /// A 512-byte boot sector read from `path`, loaded at 0x7c00 and entered in real mode
    /// (see [`crate::guest::bootsector`]). It has no Ferry mailbox.
    Bootsector {
        /// The image file (read when the guest is loaded).
        path: &'static str,
    },
}

impl GuestSpec {
    /// A dirtying guest over `mib` MiB at full speed.
    pub fn dirty_mib(mib: u64) -> GuestSpec {
        GuestSpec::Dirty {
            working_set: mib << 20,
            delay_loops: 0,
        }
    }

    /// Smallest guest RAM this workload fits in.
    pub fn min_memory(&self) -> u64 {
        match self {
            GuestSpec::Dirty { working_set, .. } => layout::WORKING_SET_GPA + working_set,
            GuestSpec::Idle | GuestSpec::Bootsector { .. } => layout::WORKING_SET_GPA,
        }
    }

    /// Short name of the workload.
    pub fn name(&self) -> &'static str {
        match self {
            GuestSpec::Dirty { .. } => "dirty",
            GuestSpec::Idle => "idle",
            GuestSpec::Bootsector { .. } => "bootsector",
        }
    }
}

impl fmt::Display for GuestSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestSpec::Dirty {
                working_set,
                delay_loops,
            } => write!(f, "dirty:{},{delay_loops}", working_set >> 20),
            GuestSpec::Idle => f.write_str("idle"),
            GuestSpec::Bootsector { path } => write!(f, "bootsector:{path}"),
        }
    }
}

impl FromStr for GuestSpec {
    type Err = ConfigError;

    /// Parses `idle`, `dirty`, `dirty:MiB`, `dirty:MiB,rate` or `bootsector:FILE` (the
    /// path is kept for the life of the process: a command line is parsed once).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ConfigError::InvalidGuest(s.to_string());
        if let Some(path) = s.strip_prefix("bootsector:") {
            if path.is_empty() {
                return Err(err());
            }
            return Ok(GuestSpec::Bootsector {
                path: Box::leak(path.to_owned().into_boxed_str()),
            });
        }
        let (kind, args) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        match (kind, args) {
            ("idle", None) => Ok(GuestSpec::Idle),
            ("dirty", None) => Ok(GuestSpec::dirty_mib(DEFAULT_WORKING_SET_MIB)),
            ("dirty", Some(args)) => {
                let (mib, rate) = match args.split_once(',') {
                    Some((m, r)) => (m, Some(r)),
                    None => (args, None),
                };
                let mib: u64 = mib.trim().parse().map_err(|_| err())?;
                let delay_loops = match rate {
                    Some(r) => r.trim().parse().map_err(|_| err())?,
                    None => 0,
                };
                if mib == 0 {
                    return Err(ConfigError::EmptyWorkingSet);
                }
                let working_set = mib.checked_mul(1 << 20).ok_or_else(err)?;
                Ok(GuestSpec::Dirty {
                    working_set,
                    delay_loops,
                })
            }
            _ => Err(err()),
        }
    }
}

/// The shape of a VM: what must match between a saved state and the VM it is restored into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Machine type (guest ABI, CPU model, stream layout), from [`MachineType::lookup`].
    pub machine: &'static MachineType,
    /// CPU model (`--cpu`); `None` is the machine type's default.
    pub cpu_model: Option<CpuModel>,
    /// Test-only: CPUID features treated as absent from this host (`--x-hide-host-features`),
    /// so refusals of a model the host cannot run can be shown on any host.
    pub hidden_host_features: Vec<&'static Feature>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory_size: 64 << 20,
            vcpus: 1,
            machine: machine_types::newest(),
            cpu_model: None,
            hidden_host_features: Vec::new(),
        }
    }
}

/// Looks a CPU model up for `--cpu` (`help` is handled by the caller).
pub fn parse_cpu_model(name: &str) -> Result<CpuModel, ConfigError> {
    CpuModel::by_name(name).ok_or_else(|| ConfigError::CpuModel {
        model: name.to_owned(),
        machine: "any".to_owned(),
        valid: machine_types::cpu::ALL_MODELS
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Parses a comma-separated list of CPUID feature names (`avx2,aes`).
pub fn parse_features(list: &str) -> Result<Vec<&'static Feature>, ConfigError> {
    list.split(',')
        .filter(|n| !n.is_empty())
        .map(|n| {
            machine_types::cpu::feature(n).ok_or_else(|| ConfigError::UnknownFeature(n.to_owned()))
        })
        .collect()
}

impl VmConfig {
    /// The CPU model the vCPUs get: `--cpu`, or the machine type's default.
    pub fn cpu_model(&self) -> CpuModel {
        self.cpu_model
            .unwrap_or_else(|| self.machine.compat().cpu_model)
    }

    /// Checks the machine shape on its own (no guest).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let models = self.machine.compat().cpu_models;
        if !models.contains(&self.cpu_model()) {
            return Err(ConfigError::CpuModel {
                model: self.cpu_model().name().to_owned(),
                machine: self.machine.name().to_owned(),
                valid: models
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpus.into()));
        }
        if !self.memory_size.is_multiple_of(guest::PAGE_SIZE) {
            return Err(ConfigError::UnalignedMemory(self.memory_size));
        }
        if self.memory_size > MAX_MEMORY {
            return Err(ConfigError::TooMuchMemory {
                size: self.memory_size,
                max: MAX_MEMORY,
            });
        }
        if self.memory_size < layout::WORKING_SET_GPA {
            return Err(ConfigError::TooLittleMemory {
                size: self.memory_size,
                needed: layout::WORKING_SET_GPA,
                guest: "any".to_string(),
            });
        }
        Ok(())
    }

    /// Checks the machine shape and that `guest` fits in it.
    pub fn validate_for(&self, guest: &GuestSpec) -> Result<(), ConfigError> {
        self.validate()?;
        if let GuestSpec::Dirty { working_set, .. } = guest
            && *working_set < guest::PAGE_SIZE
        {
            return Err(ConfigError::EmptyWorkingSet);
        }
        if let GuestSpec::Dirty { working_set, .. } = guest
            && layout::WORKING_SET_GPA + working_set > layout::PCI_HOLE_START
        {
            return Err(ConfigError::WorkingSetTooBig {
                mib: working_set >> 20,
                max_mib: (layout::PCI_HOLE_START - layout::WORKING_SET_GPA) >> 20,
            });
        }
        let needed = guest.min_memory();
        if self.memory_size < needed {
            return Err(ConfigError::TooLittleMemory {
                size: self.memory_size,
                needed,
                guest: guest.name().to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn guests() {
        assert_eq!("idle".parse(), Ok(GuestSpec::Idle));
        assert_eq!("dirty".parse(), Ok(GuestSpec::dirty_mib(16)));
        assert_eq!("dirty:8".parse(), Ok(GuestSpec::dirty_mib(8)));
        assert_eq!(
            "dirty:8,1000".parse(),
            Ok(GuestSpec::Dirty {
                working_set: 8 << 20,
                delay_loops: 1000
            })
        );
        assert_eq!(
            "dirty:0".parse::<GuestSpec>(),
            Err(ConfigError::EmptyWorkingSet)
        );
        assert!("idle:3".parse::<GuestSpec>().is_err());
        assert!("busy".parse::<GuestSpec>().is_err());
        assert!("dirty:x".parse::<GuestSpec>().is_err());
        assert!("bootsector".parse::<GuestSpec>().is_err());
        assert!("bootsector:".parse::<GuestSpec>().is_err());
        let b: GuestSpec = "bootsector:/tmp/a:b,c.bin".parse().unwrap();
        assert_eq!(
            b,
            GuestSpec::Bootsector {
                path: "/tmp/a:b,c.bin"
            }
        );
        assert_eq!(b.to_string().parse(), Ok(b));
        assert_eq!(b.name(), "bootsector");
        let g: GuestSpec = "dirty:8,1000".parse().unwrap();
        assert_eq!(g.to_string().parse(), Ok(g));
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::default();
        assert_eq!(c.validate_for(&GuestSpec::dirty_mib(16)), Ok(()));
        assert!(matches!(
            c.validate_for(&GuestSpec::dirty_mib(64)),
            Err(ConfigError::TooLittleMemory { .. })
        ));
        c.memory_size = 4 << 30;
        assert_eq!(
            c.validate_for(&GuestSpec::dirty_mib(3072)),
            Err(ConfigError::WorkingSetTooBig {
                mib: 3072,
                max_mib: 3071
            })
        );
        assert_eq!(c.validate_for(&GuestSpec::dirty_mib(3071)), Ok(()));
        c.memory_size = 64 << 20;
        let e = parse_machine("pc-i440fx").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unknown machine type 'pc-i440fx'; valid types: ferry, ferry-2.1, ferry-2.0, ferry-1.1, ferry-1.0"
        );
        assert_eq!(parse_machine("ferry").unwrap().name(), "ferry-2.1");
        c.cpu_model = Some(parse_cpu_model("ferry-v3").unwrap());
        assert_eq!(c.validate(), Ok(()));
        c.machine = parse_machine("ferry-2.0").unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "CPU model 'ferry-v3' is not offered by machine type ferry-2.0; valid models: ferry-cpu-v2"
        );
        c.cpu_model = None;
        assert_eq!(c.cpu_model(), CpuModel::FerryV2);
        assert_eq!(
            parse_features("avx2,x").unwrap_err(),
            ConfigError::UnknownFeature("x".into())
        );
        assert_eq!(parse_features("avx2,aes").unwrap().len(), 2);
        c.machine = parse_machine("ferry-1.1").unwrap();
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(0)));
        c.vcpus = 2;
        c.memory_size = 64 * 1024 * 1024 + 1;
        assert_eq!(
            c.validate(),
            Err(ConfigError::UnalignedMemory(c.memory_size))
        );
    }
}
