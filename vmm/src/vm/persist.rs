//! Capture and restore of the in-kernel interrupt controllers through KVM; the plain VM-level
//! state, its sections and the device registry are `ferry-state`'s, re-exported here so
//! `vmm::vm::persist` paths keep working.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_irqchip,
};
use kvm_ioctls::VmFd;

pub use ferry_state::vm::*;
pub use ferry_state::{catalog, full_catalog};

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
