//! Real-KVM tests: full state capture, restore into a fresh VM, shape checks.

mod common;

use common::*;
use vmm::config::GuestSpec;
use vmm::vcpu::persist::VcpuState;
use vmm::{Vm, VmError, VmState};

/// MSRs whose value moves with host time while a vCPU is stopped.
const VOLATILE_MSRS: &[u32] = &[0x10 /* IA32_TSC */];

fn assert_vcpu_equal(saved: &VcpuState, now: &VcpuState) {
    assert_eq!(saved.regs, now.regs, "regs of vCPU {}", saved.index);
    assert_eq!(saved.sregs, now.sregs, "sregs of vCPU {}", saved.index);
    assert_eq!(saved.fpu, now.fpu, "fpu");
    assert_eq!(saved.xsave, now.xsave, "xsave");
    assert_eq!(saved.xcrs, now.xcrs, "xcrs");
    assert_eq!(saved.mp_state, now.mp_state, "mp_state");
    assert_eq!(saved.events, now.events, "events");
    assert_eq!(saved.debug_regs, now.debug_regs, "debug regs");
    assert_eq!(saved.cpuid, now.cpuid, "cpuid");
    assert_eq!(saved.lapic, now.lapic, "lapic");
    let idx = |s: &VcpuState| s.msrs.iter().map(|m| m.index).collect::<Vec<_>>();
    assert_eq!(idx(saved), idx(now), "MSR list");
    for (a, b) in saved.msrs.iter().zip(&now.msrs) {
        if !VOLATILE_MSRS.contains(&a.index) {
            assert_eq!(a, b, "MSR {:#x}", a.index);
        }
    }
}

fn saved_dirty_vm(vcpus: u8) -> (Vm, VmState) {
    let vm = boot(&config(32, vcpus), &GuestSpec::dirty_mib(4));
    wait_pass(&vm, 3);
    vm.pause().unwrap();
    vm.verify_guest_pattern().unwrap();
    let state = vm.save_state().expect("save state");
    (vm, state)
}

#[test]
fn save_restore_into_fresh_vm_continues_the_guest() {
    let _kvm = kvm_test();
    let (src, state) = saved_dirty_vm(2);
    assert_eq!(state.vcpus.len(), 2);
    assert_eq!(state.vcpus[0].xsave.len(), 1024);
    assert_eq!(state.vcpus[0].lapic.len(), 1024);
    assert!(!state.vcpus[0].msrs.is_empty());
    assert_eq!(state.ioapic.redirtbl.len(), 24);
    assert_eq!(state.pit.channels.len(), 3);
    let src_mailbox = src.mailbox().unwrap();

    let mut dst = Vm::new(src.config()).expect("fresh VM");
    dst.ram().copy_from(src.ram()).unwrap();
    dst.restore_state(&state).expect("restore");
    drop(src);
    assert_eq!(dst.run_state(), vmm::RunState::Paused);

    // What KVM now holds is what was saved.
    let reread = dst.save_state().unwrap();
    for (a, b) in state.vcpus.iter().zip(&reread.vcpus) {
        assert_vcpu_equal(a, b);
    }
    assert_eq!(state.pic_master, reread.pic_master);
    assert_eq!(state.pic_slave, reread.pic_slave);
    assert_eq!(state.ioapic, reread.ioapic);
    assert_eq!(state.uart, reread.uart);
    assert_eq!(state.progress, reread.progress);
    dst.verify_guest_pattern()
        .expect("pattern right after restore");
    assert_eq!(dst.mailbox().unwrap(), src_mailbox);

    // And the guest carries on from there.
    dst.resume().unwrap();
    let pass = state.progress.last_pass;
    wait_pass(&dst, pass + 3);
    dst.pause().unwrap();
    dst.verify_guest_pattern()
        .expect("pattern after running on the destination");
    let mb = dst.mailbox().unwrap();
    assert!(mb.pass_count >= src_mailbox.pass_count + 3, "{mb:?}");
}

#[test]
fn save_requires_paused_vcpus() {
    let _kvm = kvm_test();
    let vm = boot(&config(16, 1), &GuestSpec::dirty_mib(1));
    wait_pass(&vm, 1);
    assert!(matches!(vm.save_state(), Err(VmError::NotPaused)));
    vm.pause().unwrap();
    vm.save_state().unwrap();
}

#[test]
fn restore_refuses_a_different_shape() {
    let _kvm = kvm_test();
    let (_src, state) = saved_dirty_vm(1);

    let mut two = Vm::new(&config(32, 2)).unwrap();
    let err = two.restore_state(&state).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Saved state does not fit this VM: vCPU count differs (state has 1, this VM has 2)"
    );

    let mut bigger = Vm::new(&config(64, 1)).unwrap();
    let err = bigger.restore_state(&state).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Saved state does not fit this VM: memory size differs (state has 33554432 bytes, this VM has 67108864 bytes)"
    );

    let mut both = Vm::new(&config(16, 2)).unwrap();
    let msg = both.restore_state(&state).unwrap_err().to_string();
    assert!(
        msg.contains("vCPU count differs") && msg.contains("memory size differs"),
        "{msg}"
    );
    // Nothing was loaded: the VMs are still fresh.
    assert_eq!(two.run_state(), vmm::RunState::Prelaunch);
}
