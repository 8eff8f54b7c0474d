//! Shared helpers: a stand-in configuration record, the catalog, and a full
//! save -> stream -> load round trip through devstate's validating reader.
#![allow(dead_code)]

use devstate::{Catalog, Item, Section, StreamReader, StreamWriter, record};
use ferry_hotplug::{
    ConnectorKind, DeviceSpec, GuestOp, HotplugConfig, HotplugManager, Outcome, RunPhase,
    register_sections,
};
use machine_types::MachineType;

record! {
    /// Stand-in for the VMM's configuration record.
    pub struct Cfg {
        pub cores: u32,
    }
}

impl Section for Cfg {
    const NAME: &'static str = "config";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
}

pub fn catalog() -> Catalog {
    let mut c = Catalog::new();
    c.register::<Cfg>();
    register_sections(&mut c);
    c
}

pub const T: u64 = 1000;

pub fn config() -> HotplugConfig {
    HotplugConfig {
        cpu_cores: 3,
        mem_blocks: 2,
        pci_slots: 2,
        unplug_timeout_ms: T,
        ..Default::default()
    }
}

pub fn machine(name: &str) -> &'static MachineType {
    MachineType::lookup(name).unwrap()
}

/// The source's hotplug sections in a complete stream.
pub fn save_stream(src: &HotplugManager, now_ms: u64) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), src.machine(), "hotplug-test").unwrap();
    w.config(&mut Cfg { cores: 1 }).unwrap();
    w.ram_zero(0, 1).unwrap();
    src.save(&mut w, now_ms).unwrap();
    w.finish().unwrap()
}

/// Load every section of `stream` into `dst`; returns the section names seen.
pub fn load_stream(
    dst: &mut HotplugManager,
    stream: &[u8],
    now_ms: u64,
) -> Result<Vec<(String, u32, u32, usize)>, String> {
    let cat = catalog();
    let mut r = StreamReader::new(stream, Some(&cat)).map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    loop {
        match r.next_item().map_err(|e| e.to_string())? {
            Item::Section(raw) => {
                seen.push((
                    raw.name.clone(),
                    raw.instance,
                    raw.version,
                    raw.subsections.len(),
                ));
                let ours = dst.load_section(&raw, now_ms).map_err(|e| e.to_string())?;
                assert!(ours, "{}", raw.name);
            }
            Item::End => return Ok(seen),
            _ => {}
        }
    }
}

/// A destination built the way the VMM builds it (Precise rule 5): the same devices added
/// before start, then the incoming reset, then the stream.
pub fn destination(src: &HotplugManager, skip_reset: bool) -> HotplugManager {
    let mut dst = HotplugManager::new(src.config().clone(), src.machine()).unwrap();
    for (id, spec) in src.attached_devices() {
        dst.device_add(spec.driver(), &id, &spec.props(), RunPhase::InMigrate)
            .unwrap_or_else(|e| panic!("pre-start add of {id}: {e}"));
    }
    dst.set_migration_in_progress(true);
    if !skip_reset {
        dst.reset_all();
    }
    dst.drain_effects();
    dst.drain_events();
    dst.take_irq();
    dst
}

/// Source save at `src_now`, destination load at `dst_now`.
pub fn migrate(src: &HotplugManager, src_now: u64, dst_now: u64) -> HotplugManager {
    let stream = save_stream(src, src_now);
    let mut dst = destination(src, false);
    load_stream(&mut dst, &stream, dst_now).unwrap();
    dst.check_invariants().unwrap();
    dst
}

pub fn guest_configure(m: &mut HotplugManager, index: u32) {
    if !ConnectorKind::from_index(index).unwrap().0.is_physical() {
        m.guest_op(index, GuestOp::SET_USABLE).unwrap();
    }
    m.guest_op(index, GuestOp::UNISOLATE).unwrap();
    // As the test guest does: at most 64 configure steps (ABI.md).
    for _ in 0..64 {
        if m.guest_op(index, GuestOp::ConfigureConnector).unwrap() == Outcome::Configured {
            return;
        }
    }
    panic!("connector {index:#010x}: the configure walk did not finish in 64 steps");
}

pub fn spec_index(spec: &DeviceSpec) -> u32 {
    spec.index()
}
