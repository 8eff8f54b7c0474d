//! Plain VM-level state: the in-kernel interrupt controllers, the PIT, the KVM clock, and
//! the whole-machine [`VmState`].

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data,
    kvm_ioapic_state, kvm_irqchip, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2,
};
use kvm_ioctls::VmFd;

use crate::devices::persist::{ProgressState, UartState};
use crate::vcpu::persist::VcpuState;

/// The whole machine except guest RAM (which travels as RAM records).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

/// One 8259 PIC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

/// The IOAPIC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    pub redirtbl: Vec<u64>,
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

/// One PIT channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    pub count_load_time: i64,
}

/// The 8254 PIT (`KVM_GET_PIT2`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PitState {
    /// Three channels.
    pub channels: Vec<PitChannelState>,
    /// `KVM_PIT_FLAGS_*`.
    pub flags: u32,
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

/// The KVM clock (`KVM_GET_CLOCK`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClockState {
    /// kvmclock nanoseconds; volatile.
    pub clock: u64,
    /// `KVM_CLOCK_*` flags as read.
    pub flags: u32,
    /// Host realtime when read (valid with `KVM_CLOCK_REALTIME`); volatile.
    pub realtime: u64,
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

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, kvm_ioctls::Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)?;
    Ok(chip)
}

/// Reads both PICs and the IOAPIC.
pub fn save_irqchip(vm: &VmFd) -> Result<(PicState, PicState, IoapicState), kvm_ioctls::Error> {
    let master = get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?;
    let slave = get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?;
    let ioapic = get_chip(vm, KVM_IRQCHIP_IOAPIC)?;
    // SAFETY: KVM filled each union with the variant its `chip_id` names (PIC for the two
    // PIC ids, IOAPIC for the IOAPIC id); all variants are plain integers.
    let (m, s, io) = unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
    Ok((
        PicState::from_kvm(&m),
        PicState::from_kvm(&s),
        IoapicState::from_kvm(&io),
    ))
}

/// Writes both PICs and the IOAPIC.
pub fn restore_irqchip(
    vm: &VmFd,
    master: &PicState,
    slave: &PicState,
    ioapic: &IoapicState,
) -> Result<(), kvm_ioctls::Error> {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    chip.chip.pic = master.to_kvm();
    vm.set_irqchip(&chip)?;
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_SLAVE,
        ..Default::default()
    };
    chip.chip.pic = slave.to_kvm();
    vm.set_irqchip(&chip)?;
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    chip.chip.ioapic = ioapic.to_kvm();
    vm.set_irqchip(&chip)
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
}
