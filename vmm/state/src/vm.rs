//! Plain VM-level state: the in-kernel interrupt controllers, the PIT, the KVM clock, the
//! whole-machine [`VmState`] and hot-added vCPUs; [`crate::catalog`] registers every section.
//!
//! | section | instance | body | required |
//! |---|---|---|---|
//! | `cpu` | vCPU index | [`VcpuState`] | one per vCPU |
//! | `irqchip` | 0 | [`IrqchipState`]: both 8259s and the IOAPIC | yes |
//! | `pit` | 0 | [`PitState`] | yes |
//! | `kvmclock` | 0 | [`ClockState`] | yes |
//! | `uart` | 0 | [`UartState`] (COM1) | yes |
//! | `guest-progress` | 0 | [`ProgressState`] | yes |
//!
//! All are version 1 (minimum 1). Volatile fields (reported apart by diffs): `cpu.tsc`,
//! `cpu.tsc_khz`, `kvmclock.*`, `pit.channels[].count_load_time`.

use devstate::Section;
use kvm_bindings::{
    kvm_clock_data, kvm_ioapic_state, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2,
};

use crate::devices::{ProgressState, UartState};
use crate::vcpu::VcpuState;

/// The whole machine except guest RAM (which travels as RAM records).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmState {
    /// Guest RAM size in bytes (shape check on restore).
    pub memory_size: u64,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// Master 8259.
    pub pic_master: PicState,
    /// Slave 8259.
    pub pic_slave: PicState,
    /// IOAPIC.
    pub ioapic: IoapicState,
    /// 8254 PIT.
    pub pit: PitState,
    /// KVM clock.
    pub clock: ClockState,
    /// COM1.
    pub uart: UartState,
    /// Guest-progress device.
    pub progress: ProgressState,
}

devstate::record! {
    /// One 8259 PIC.
    #[allow(missing_docs)]
    pub struct PicState {
        pub last_irr: u8,
        pub irr: u8,
        pub imr: u8,
        pub isr: u8,
        pub priority_add: u8,
        pub irq_base: u8,
        pub read_reg_select: u8,
        pub poll: u8,
        pub special_mask: u8,
        pub init_state: u8,
        pub auto_eoi: u8,
        pub rotate_on_auto_eoi: u8,
        pub special_fully_nested_mode: u8,
        pub init4: u8,
        pub elcr: u8,
        pub elcr_mask: u8,
    }
}

impl PicState {
    /// Copies KVM's PIC state.
    pub fn from_kvm(p: &kvm_pic_state) -> PicState {
        PicState {
            last_irr: p.last_irr,
            irr: p.irr,
            imr: p.imr,
            isr: p.isr,
            priority_add: p.priority_add,
            irq_base: p.irq_base,
            read_reg_select: p.read_reg_select,
            poll: p.poll,
            special_mask: p.special_mask,
            init_state: p.init_state,
            auto_eoi: p.auto_eoi,
            rotate_on_auto_eoi: p.rotate_on_auto_eoi,
            special_fully_nested_mode: p.special_fully_nested_mode,
            init4: p.init4,
            elcr: p.elcr,
            elcr_mask: p.elcr_mask,
        }
    }

    /// Back to KVM's type.
    pub fn to_kvm(&self) -> kvm_pic_state {
        kvm_pic_state {
            last_irr: self.last_irr,
            irr: self.irr,
            imr: self.imr,
            isr: self.isr,
            priority_add: self.priority_add,
            irq_base: self.irq_base,
            read_reg_select: self.read_reg_select,
            poll: self.poll,
            special_mask: self.special_mask,
            init_state: self.init_state,
            auto_eoi: self.auto_eoi,
            rotate_on_auto_eoi: self.rotate_on_auto_eoi,
            special_fully_nested_mode: self.special_fully_nested_mode,
            init4: self.init4,
            elcr: self.elcr,
            elcr_mask: self.elcr_mask,
        }
    }
}

devstate::record! {
    /// The IOAPIC.
    pub struct IoapicState {
        /// MMIO base.
        pub base_address: u64,
        /// Register select.
        pub ioregsel: u32,
        /// APIC id.
        pub id: u32,
        /// Interrupt request register.
        pub irr: u32,
        /// 24 redirection entries.
        pub redirtbl: Vec<u64> [max = 24],
    }
}

impl IoapicState {
    /// Copies KVM's IOAPIC state.
    pub fn from_kvm(s: &kvm_ioapic_state) -> IoapicState {
        IoapicState {
            base_address: s.base_address,
            ioregsel: s.ioregsel,
            id: s.id,
            irr: s.irr,
            redirtbl: s
                .redirtbl
                .iter()
                // SAFETY: every variant of the redirection-entry union is 8 plain bytes, so
                // reading it as `bits: u64` is valid whatever was written.
                .map(|e| unsafe { e.bits })
                .collect(),
        }
    }

    /// Back to KVM's type.
    pub fn to_kvm(&self) -> kvm_ioapic_state {
        let mut s = kvm_ioapic_state {
            base_address: self.base_address,
            ioregsel: self.ioregsel,
            id: self.id,
            irr: self.irr,
            ..Default::default()
        };
        for (d, v) in s.redirtbl.iter_mut().zip(&self.redirtbl) {
            d.bits = *v;
        }
        s
    }
}

devstate::record! {
    /// One PIT channel.
    #[allow(missing_docs)]
    pub struct PitChannelState {
        pub count: u32,
        pub latched_count: u16,
        pub count_latched: u8,
        pub status_latched: u8,
        pub status: u8,
        pub read_state: u8,
        pub write_state: u8,
        pub write_latch: u8,
        pub rw_mode: u8,
        pub mode: u8,
        pub bcd: u8,
        pub gate: u8,
        /// Host time the count was loaded (ns); volatile across hosts.
        pub count_load_time: i64 [volatile],
    }
}

devstate::record! {
    /// The 8254 PIT (`KVM_GET_PIT2`).
    pub struct PitState {
        /// Three channels.
        pub channels: Vec<PitChannelState> [max = 3],
        /// `KVM_PIT_FLAGS_*`.
        pub flags: u32,
    }
}

impl PitState {
    /// Copies KVM's PIT state.
    pub fn from_kvm(p: &kvm_pit_state2) -> PitState {
        PitState {
            channels: p
                .channels
                .iter()
                .map(|c| PitChannelState {
                    count: c.count,
                    latched_count: c.latched_count,
                    count_latched: c.count_latched,
                    status_latched: c.status_latched,
                    status: c.status,
                    read_state: c.read_state,
                    write_state: c.write_state,
                    write_latch: c.write_latch,
                    rw_mode: c.rw_mode,
                    mode: c.mode,
                    bcd: c.bcd,
                    gate: c.gate,
                    count_load_time: c.count_load_time,
                })
                .collect(),
            flags: p.flags,
        }
    }

    /// Back to KVM's type.
    pub fn to_kvm(&self) -> kvm_pit_state2 {
        let mut p = kvm_pit_state2 {
            flags: self.flags,
            ..Default::default()
        };
        for (d, c) in p.channels.iter_mut().zip(&self.channels) {
            *d = kvm_pit_channel_state {
                count: c.count,
                latched_count: c.latched_count,
                count_latched: c.count_latched,
                status_latched: c.status_latched,
                status: c.status,
                read_state: c.read_state,
                write_state: c.write_state,
                write_latch: c.write_latch,
                rw_mode: c.rw_mode,
                mode: c.mode,
                bcd: c.bcd,
                gate: c.gate,
                count_load_time: c.count_load_time,
            };
        }
        p
    }
}

devstate::record! {
    /// The KVM clock (`KVM_GET_CLOCK`).
    pub struct ClockState {
        /// kvmclock nanoseconds; volatile.
        pub clock: u64 [volatile],
        /// `KVM_CLOCK_*` flags as read.
        pub flags: u32 [volatile],
        /// Host realtime when read (valid with `KVM_CLOCK_REALTIME`); volatile.
        pub realtime: u64 [volatile],
    }
}

impl ClockState {
    /// Copies KVM's clock.
    pub fn from_kvm(c: &kvm_clock_data) -> ClockState {
        ClockState {
            clock: c.clock,
            flags: c.flags,
            realtime: c.realtime,
        }
    }

    /// Back to KVM's type: only the clock value is set (no realtime adjustment), so the guest
    /// clock continues where it stopped.
    pub fn to_kvm(&self) -> kvm_clock_data {
        kvm_clock_data {
            clock: self.clock,
            ..Default::default()
        }
    }
}

devstate::record! {
    /// The in-kernel interrupt controllers: body of section `irqchip`.
    pub struct IrqchipState {
        /// Master 8259.
        pub pic_master: PicState,
        /// Slave 8259.
        pub pic_slave: PicState,
        /// IOAPIC.
        pub ioapic: IoapicState,
    }
}

impl Section for IrqchipState {
    const NAME: &'static str = "irqchip";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
    const REQUIRED: bool = true;

    fn post_load(&mut self, _version: u32) -> Result<(), String> {
        if self.ioapic.redirtbl.len() != IOAPIC_PINS {
            return Err(format!(
                "IOAPIC has {} redirection entries, expected {IOAPIC_PINS}",
                self.ioapic.redirtbl.len()
            ));
        }
        Ok(())
    }
}

/// IOAPIC pins (redirection entries).
pub const IOAPIC_PINS: usize = 24;
/// PIT channels.
pub const PIT_CHANNELS: usize = 3;

impl Section for PitState {
    const NAME: &'static str = "pit";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
    const REQUIRED: bool = true;

    fn post_load(&mut self, _version: u32) -> Result<(), String> {
        if self.channels.len() != PIT_CHANNELS {
            return Err(format!(
                "PIT has {} channels, expected {PIT_CHANNELS}",
                self.channels.len()
            ));
        }
        Ok(())
    }
}

impl Section for ClockState {
    const NAME: &'static str = "kvmclock";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
    const REQUIRED: bool = true;
}

/// Run state of a hot-added vCPU; the discriminants are the `hot-vcpu` section's wire values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum HotCoreState {
    /// Created (at `device_add`), never started, or reset for a re-add.
    #[default]
    Created = 1,
    /// Started (the guest configured the core); runs whenever the VM runs.
    Running = 2,
    /// Stopped by the guest (park port) or torn down; outside `KVM_RUN` until configured again.
    Parked = 3,
}

impl devstate::WireEnum for HotCoreState {
    type Repr = u8;
    const VALUES: &'static [Self] = &[
        HotCoreState::Created,
        HotCoreState::Running,
        HotCoreState::Parked,
    ];
    fn to_wire(self) -> u8 {
        self as u8
    }
}

devstate::record! {
    /// A hot-added vCPU: which core it is, whether it runs, and its full vCPU state.
    pub struct HotVcpuState {
        /// Core id (`ferry-cpu-core` `core-id`).
        pub core: u32,
        /// 1 created, 2 running, 3 parked (0 and others are refused by the codec).
        pub run: HotCoreState,
        /// Registers, MSRs, LAPIC, ... as for a boot vCPU.
        pub cpu: VcpuState,
    }
}

impl devstate::Section for HotVcpuState {
    const NAME: &'static str = "hot-vcpu";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip() {
        let pic = PicState {
            irr: 1,
            imr: 0xfb,
            irq_base: 0x20,
            elcr_mask: 0xf8,
            ..Default::default()
        };
        assert_eq!(PicState::from_kvm(&pic.to_kvm()), pic);
        let ioapic = IoapicState {
            base_address: 0xfec0_0000,
            id: 0,
            irr: 4,
            ioregsel: 0x10,
            redirtbl: (0..24).map(|i| 0x1_0000 | i).collect(),
        };
        assert_eq!(IoapicState::from_kvm(&ioapic.to_kvm()), ioapic);
        let pit = PitState {
            channels: (0..3)
                .map(|i| PitChannelState {
                    count: 65536 - i,
                    mode: 3,
                    gate: 1,
                    count_load_time: -5,
                    ..Default::default()
                })
                .collect(),
            flags: 1,
        };
        assert_eq!(PitState::from_kvm(&pit.to_kvm()), pit);
    }

    #[test]
    fn catalogs_build_and_bound_every_section() {
        let c = crate::full_catalog();
        let names: Vec<&str> = c.infos().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "config",
                "connector",
                "cpu",
                "ferry-pci-fn",
                "guest-progress",
                "hot-vcpu",
                "hotplug-controller",
                "hotplug-events",
                "irqchip",
                "kvmclock",
                "migration",
                "pit",
                "uart"
            ]
        );
        let cpu = c.info("cpu").unwrap();
        assert!(cpu.required && cpu.version == 1 && cpu.min_version == 1);
        // The bound a decoder applies before allocating: the XSAVE area, the LAPIC page and
        // the lists dominate it.
        assert!(
            cpu.max_len > 4096 + 1024 && cpu.max_len < 64 << 10,
            "{}",
            cpu.max_len
        );
        for m in machine_types::all() {
            let schema = c.schema(m);
            let cpu = schema.section("cpu").unwrap();
            let vol: Vec<&str> = cpu
                .fields
                .iter()
                .filter(|f| f.volatile)
                .map(|f| f.name.as_str())
                .collect();
            assert_eq!(vol, ["tsc", "tsc_khz"]);
            let clock = schema.section("kvmclock").unwrap();
            assert!(clock.fields.iter().all(|f| f.volatile));
        }
    }

    #[test]
    fn sections_round_trip_through_the_codec() {
        let m = machine_types::newest();
        let mut irq = IrqchipState {
            pic_master: PicState {
                imr: 0xfb,
                irq_base: 0x20,
                ..Default::default()
            },
            pic_slave: PicState::default(),
            ioapic: IoapicState {
                base_address: 0xfec0_0000,
                redirtbl: vec![0x1_0000; IOAPIC_PINS],
                ..Default::default()
            },
        };
        let rec = devstate::encode_section(&mut irq, 0, m, devstate::Tag::Section).unwrap();
        let mut w = devstate::StreamWriter::new(Vec::new(), m, "test").unwrap();
        w.config(&mut migration::ConfigRecord::default()).unwrap();
        w.raw(&rec).unwrap();
        let bytes = w.finish().unwrap();
        let c = crate::full_catalog();
        let mut r = devstate::StreamReader::new(bytes.as_slice(), Some(&c)).unwrap();
        assert!(matches!(r.next_item().unwrap(), devstate::Item::Config(_)));
        let devstate::Item::Section(raw) = r.next_item().unwrap() else {
            panic!("expected a section");
        };
        assert_eq!(raw.load::<IrqchipState>().unwrap(), irq);
        // A short IOAPIC is refused by post_load, naming the section.
        irq.ioapic.redirtbl.truncate(3);
        let rec = devstate::encode_section(&mut irq, 0, m, devstate::Tag::Section).unwrap();
        let mut w = devstate::StreamWriter::new(Vec::new(), m, "test").unwrap();
        w.config(&mut migration::ConfigRecord::default()).unwrap();
        w.raw(&rec).unwrap();
        let bytes = w.finish().unwrap();
        let mut r = devstate::StreamReader::new(bytes.as_slice(), Some(&c)).unwrap();
        r.next_item().unwrap();
        let devstate::Item::Section(raw) = r.next_item().unwrap() else {
            panic!("expected a section");
        };
        let e = raw.load::<IrqchipState>().unwrap_err().to_string();
        assert_eq!(
            e,
            "Section 'irqchip' at offset 78 rejected by post_load: IOAPIC has 3 redirection entries, expected 24"
        );
    }

    #[test]
    fn hot_vcpu_run_states_travel_as_their_wire_values_and_others_are_refused() {
        use devstate::{DecodeError, Reader, Record};
        let decode = |body: &[u8]| {
            let mut h = HotVcpuState::default();
            let mut r = Reader::new(body, 100, "hot-vcpu");
            h.decode_into(1, &mut r).map(|()| h)
        };
        // body: core 0..4, run 4
        for (run, wire) in [
            (HotCoreState::Created, 1u8),
            (HotCoreState::Running, 2),
            (HotCoreState::Parked, 3),
        ] {
            let mut body = Vec::new();
            HotVcpuState {
                core: 4,
                run,
                cpu: VcpuState::default(),
            }
            .encode(1, &mut body);
            assert_eq!(body[4], wire);
            assert_eq!(decode(&body).unwrap().run, run);
            for bad in [0u8, 4, 0xff] {
                body[4] = bad;
                match decode(&body) {
                    Err(DecodeError::InvalidValue {
                        field,
                        value,
                        offset,
                        ..
                    }) => {
                        assert_eq!(
                            (field.as_str(), value, offset),
                            ("run", u64::from(bad), 104)
                        );
                    }
                    other => panic!("run={bad}: {other:?}"),
                }
            }
        }
    }
}
