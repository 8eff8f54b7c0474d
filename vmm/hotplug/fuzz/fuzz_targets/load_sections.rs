//! Feed arbitrary bytes to hotplug section loading: as raw section bodies of each hotplug
//! section, and as a whole stream after a valid header. Loading may refuse anything but must
//! never panic, and whatever it accepted leaves the manager's invariants intact.
#![no_main]

use devstate::{Catalog, Item, RawSection, RawSubsection, StreamReader};
use ferry_hotplug::{DeviceProps, HotplugConfig, HotplugManager, RunPhase, register_sections};
use libfuzzer_sys::fuzz_target;
use machine_types::MachineType;

const NAMES: [&str; 4] = ["connector", "hotplug-events", "hotplug-controller", "other"];

/// A destination with one device of each kind attached and reset, as before an incoming load.
fn manager() -> HotplugManager {
    let m = MachineType::lookup("ferry-2.0").expect("known machine");
    let mut mgr = HotplugManager::new(HotplugConfig::default(), m).expect("valid config");
    let add = |mgr: &mut HotplugManager, driver, id, p: DeviceProps| {
        mgr.device_add(driver, id, &p, RunPhase::InMigrate)
            .expect("device_add");
    };
    let cpu = DeviceProps {
        core_id: Some(1),
        ..Default::default()
    };
    let mem = DeviceProps {
        slot: Some(0),
        ..Default::default()
    };
    let f1 = DeviceProps {
        addr: Some("01.1".into()),
        ..Default::default()
    };
    let f0 = DeviceProps {
        addr: Some("01.0".into()),
        multifunction: Some(true),
        ..Default::default()
    };
    add(&mut mgr, "ferry-cpu-core", "cpu1", cpu);
    add(&mut mgr, "ferry-mem-block", "mem0", mem);
    add(&mut mgr, "ferry-pci-fn", "nic1", f1);
    add(&mut mgr, "ferry-pci-fn", "nic0", f0);
    mgr.reset_all();
    mgr
}

/// Instances worth hitting: the attached connectors, an empty one, and whatever the bytes say.
const INSTANCES: [u32; 5] = [
    0x1000_0001,
    0x8000_0000,
    0x4000_0009,
    0x4000_0008,
    0x1000_0002,
];

fn check(mgr: &HotplugManager) {
    if let Err(e) = mgr.check_invariants() {
        panic!("invariants broken after a load: {e}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut mgr = manager();

    // One raw section: name, instance, version and an optional unplug-timer subsection
    // chosen by the first byte, body and subsection body from the rest.
    let split = rest.len() / 2;
    let (body, sub) = rest.split_at(if sel & 0x80 != 0 { split } else { rest.len() });
    let raw = RawSection {
        name: NAMES[usize::from(sel & 3)].to_owned(),
        instance: if sel & 0x10 != 0 {
            u32::from_le_bytes(body.get(..4).map_or([0; 4], |b| b.try_into().unwrap()))
        } else {
            INSTANCES[usize::from((sel >> 2) & 3)]
        },
        version: u32::from((sel >> 5) & 3),
        offset: 0,
        body_offset: 20,
        body: body.to_vec(),
        subsections: if sel & 0x80 != 0 {
            vec![RawSubsection {
                name: "unplug-timer".into(),
                version: 1,
                body_offset: 20 + body.len() as u64,
                body: sub.to_vec(),
            }]
        } else {
            Vec::new()
        },
        crc: 0,
    };
    let _ = mgr.load_section(&raw, 5);
    check(&mgr);

    // The same bytes as a stream after a valid header (framing, CRCs, then every section).
    let mut cat = Catalog::new();
    register_sections(&mut cat);
    let mut stream = devstate::encode_header("ferry-2.0", "fuzz");
    stream.extend_from_slice(rest);
    let Ok(mut r) = StreamReader::new(stream.as_slice(), Some(&cat)) else {
        return;
    };
    while let Ok(item) = r.next_item() {
        match item {
            Item::Section(s) => {
                let _ = mgr.load_section(&s, 5);
                check(&mgr);
            }
            Item::End => break,
            _ => {}
        }
    }
});
