//! A connector-like section shared by the codec tests and the benchmark: it gains a field in
//! version 2 and has a subsection only newer machine types emit.
#![allow(dead_code)]

use devstate::{Catalog, Section, Sub, Subsection, record};
use machine_types::MachineType;

record! {
    /// A hotplug-connector-like state.
    pub struct Conn {
        pub index: u32,
        pub state: u8,
        pub device: String [max = 32],
        pub unplug_requested: bool,
        /// Added in version 2.
        pub indicator: u8 [since = 2],
        /// Carried by the `unplug-timer` subsection.
        pub remaining_ms: u64 [skip, volatile],
    }
}

record! {
    /// Body of the `unplug-timer` subsection.
    pub struct Timer {
        pub remaining_ms: u64 [volatile],
    }
}

pub const TIMER: Sub<Conn, Timer> = Sub {
    name: "unplug-timer",
    version: 1,
    for_machine: |m| m.compat().drc_unplug_timer,
    needed: |s| s.unplug_requested,
    get: |s| Timer {
        remaining_ms: s.remaining_ms,
    },
    set: |s, t| s.remaining_ms = t.remaining_ms,
};

impl Section for Conn {
    const NAME: &'static str = "conn";
    const VERSION: u32 = 2;
    const MIN_VERSION: u32 = 1;

    fn save_version(m: &MachineType) -> u32 {
        m.compat().drc_section_version
    }
    fn subsections() -> &'static [&'static dyn Subsection<Self>] {
        &[&TIMER]
    }
    fn pre_load(&mut self) {
        // An older stream has no indicator: derive the default from presence later.
        self.indicator = 0xff;
    }
    fn post_load(&mut self, _version: u32) -> Result<(), String> {
        if self.indicator == 0xff {
            self.indicator = u8::from(!self.device.is_empty());
        }
        if self.state == 0 || self.state > 8 {
            return Err(format!(
                "state {} is not a valid connector state",
                self.state
            ));
        }
        Ok(())
    }
}

record! {
    /// A stand-in for the configuration record.
    pub struct Config {
        pub vcpus: u32,
        pub memory_mib: u64,
    }
}

impl Section for Config {
    const NAME: &'static str = "config";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
}

record! {
    /// A nested record.
    pub struct Seg {
        pub base: u64,
        pub selector: u16,
    }
}

record! {
    /// A section every destination requires.
    pub struct Cpu {
        pub rip: u64,
        pub regs: Vec<u64> [max = 16],
        pub cs: Seg,
    }
}

impl Section for Cpu {
    const NAME: &'static str = "cpu";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
    const REQUIRED: bool = true;
}

pub fn catalog() -> Catalog {
    let mut c = Catalog::new();
    c.register::<Config>().register::<Conn>().register::<Cpu>();
    c
}

pub fn conn(i: u32) -> Conn {
    Conn {
        index: 0x4000_0000 | i,
        state: 8,
        device: format!("pci{i}"),
        unplug_requested: i % 2 == 1,
        indicator: 1,
        remaining_ms: 700 + u64::from(i),
    }
}

/// A full stream: config, two RAM records, `n` connector sections, the CPU, end.
pub fn stream(m: &'static MachineType, n: u32) -> Vec<u8> {
    let mut w = devstate::StreamWriter::new(Vec::new(), m, "ferry-test").unwrap();
    w.config(&mut Config {
        vcpus: 1,
        memory_mib: 64,
    })
    .unwrap();
    w.ram_zero(0, 16).unwrap();
    let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    w.ram_data(0x10000, &page).unwrap();
    for i in 0..n {
        w.section(&mut conn(i), i).unwrap();
    }
    w.section(
        &mut Cpu {
            rip: 0x1000,
            regs: vec![1, 2, 3],
            cs: Seg {
                base: 0,
                selector: 8,
            },
        },
        0,
    )
    .unwrap();
    w.finish().unwrap()
}
