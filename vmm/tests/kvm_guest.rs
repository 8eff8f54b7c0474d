//! Real-KVM tests: the dirtying guest runs, pauses, verifies, resumes; idle vCPUs pause;
//! dirty logging sees guest and VMM writes.

mod common;

use std::time::Duration;

use common::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::config::GuestSpec;
use vmm::guest::mailbox::{STATUS_DIRTYING, STATUS_IDLE};
use vmm::guest::{PAGE_SIZE, PatternError, layout};
use vmm::{RunState, VmError};

#[test]
fn dirty_guest_pause_verify_resume() {
    let _kvm = kvm_test();
    let vm = boot(&config(32, 1), &GuestSpec::dirty_mib(4));
    let first = wait_pass(&vm, 3);
    vm.pause().expect("pause");
    assert_eq!(vm.run_state(), RunState::Paused);
    assert!(vm.all_parked());
    let mb = vm.mailbox().unwrap();
    assert_eq!(mb.status, STATUS_DIRTYING);
    assert!(mb.pass_count >= u64::from(first), "{mb:?}");
    vm.verify_guest_pattern().expect("pattern after pause");

    // Every byte of a working-set page is checked, not only the one the guest increments.
    let page7 = layout::WORKING_SET_GPA + 7 * PAGE_SIZE;
    vm.memory()
        .write_obj(0x5au8, GuestAddress(page7 + 4095))
        .unwrap();
    match vm.verify_guest_pattern() {
        Err(VmError::Pattern(e @ PatternError::Stray { .. })) => {
            assert_eq!(
                e,
                PatternError::Stray {
                    page: 7,
                    gpa: page7,
                    offset: 4095,
                    found: 0x5a
                }
            );
            assert!(e.to_string().contains("offset 4095"), "{e}");
        }
        other => panic!("a stray byte at offset 4095 went unnoticed: {other:?}"),
    }
    vm.memory()
        .write_obj(0u8, GuestAddress(page7 + 4095))
        .unwrap();
    vm.verify_guest_pattern()
        .expect("pattern with the page restored");

    // Paused means paused: the guest neither reports nor writes.
    let frozen = vm.progress().last_pass();
    assert!(
        vm.wait_for_pass(frozen + 1, Duration::from_millis(300))
            .is_err()
    );
    assert_eq!(vm.mailbox().unwrap(), mb);

    vm.resume().expect("resume");
    wait_pass(&vm, frozen + 3);
    vm.pause().unwrap();
    vm.verify_guest_pattern()
        .expect("pattern after more passes");
    assert!(vm.mailbox().unwrap().progress > mb.progress);
}

#[test]
fn pause_resume_many_times_with_a_halted_vcpu() {
    let _kvm = kvm_test();
    // vCPU 1 idles in `hlt` inside KVM_RUN: each pause must kick it out too.
    let vm = boot(&config(32, 2), &GuestSpec::dirty_mib(2));
    wait_pass(&vm, 1);
    let mut last_progress = 0;
    for i in 0..100 {
        vm.pause().unwrap_or_else(|e| panic!("pause {i}: {e:?}"));
        assert!(vm.all_parked());
        let mb = vm.mailbox().unwrap();
        assert!(mb.progress >= last_progress);
        last_progress = mb.progress;
        vm.verify_guest_pattern()
            .unwrap_or_else(|e| panic!("pause {i}: {e:#?}"));
        vm.resume().unwrap();
    }
    let pass = vm.progress().last_pass();
    wait_pass(&vm, pass + 2);
    vm.pause().unwrap();
    vm.verify_guest_pattern().unwrap();
    assert!(vm.mailbox().unwrap().progress > last_progress);
}

#[test]
fn idle_guest_pauses_and_resumes() {
    let _kvm = kvm_test();
    let vm = boot(&config(16, 2), &GuestSpec::Idle);
    wait_mailbox(&vm, "guest idle", |mb| mb.status == STATUS_IDLE);
    for _ in 0..20 {
        vm.pause().expect("pause halted vCPUs");
        assert!(vm.all_parked());
        vm.resume().unwrap();
    }
    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    // Both vCPUs are in the `sti; hlt; jmp` loop (vCPU 1 may not have run its `sti` yet).
    let ap_entry = vmm::guest::assemble(layout::CODE_GPA).unwrap().ap_entry;
    for v in &state.vcpus {
        assert!(
            (ap_entry..ap_entry + 4).contains(&v.regs.rip),
            "vCPU {} at {:#x}, idle loop at {ap_entry:#x}",
            v.index,
            v.regs.rip
        );
    }
    assert!(matches!(
        vm.verify_guest_pattern(),
        Err(VmError::Pattern(_))
    ));
}

#[test]
fn guest_rate_is_adjustable_and_go_idle_flag_works() {
    let _kvm = kvm_test();
    let vm = boot(
        &config(16, 1),
        &GuestSpec::Dirty {
            working_set: 1 << 20,
            delay_loops: 1000,
        },
    );
    wait_pass(&vm, 1);
    vm.set_guest_delay(0).unwrap();
    vm.set_guest_flags(vmm::guest::mailbox::FLAG_GO_IDLE)
        .unwrap();
    wait_mailbox(&vm, "guest to go idle after its pass", |mb| {
        mb.status == STATUS_IDLE
    });
    vm.pause().unwrap();
    vm.verify_guest_pattern()
        .expect("pattern intact after going idle");
    let mb = vm.mailbox().unwrap();
    assert_eq!(
        mb.progress % mb.ws_pages,
        0,
        "idles only between passes: {mb:?}"
    );
}

#[test]
fn dirty_log_sees_guest_and_vmm_writes() {
    let _kvm = kvm_test();
    let vm = boot(&config(32, 1), &GuestSpec::dirty_mib(2));
    wait_pass(&vm, 1);
    vm.set_dirty_log(true).unwrap();
    let p = vm.progress().last_pass();
    wait_pass(&vm, p + 2);
    vm.pause().unwrap();
    vm.memory()
        .write_obj(0xabu8, GuestAddress(20 << 20))
        .unwrap();
    let dirty = vm.dirty_pages().unwrap();
    let pages: std::collections::HashSet<u64> = dirty.iter().flat_map(|d| d.pages()).collect();
    for i in 0..(2 << 20) / PAGE_SIZE {
        assert!(
            pages.contains(&(layout::WORKING_SET_GPA + i * PAGE_SIZE)),
            "working-set page {i}"
        );
    }
    assert!(pages.contains(&layout::MAILBOX_GPA), "mailbox page");
    assert!(pages.contains(&(20 << 20)), "VMM write");
    assert!(!pages.contains(&(30 << 20)), "untouched page");
    // Read-and-clear: nothing ran since.
    let again: u64 = vm.dirty_pages().unwrap().iter().map(|d| d.count()).sum();
    assert_eq!(again, 0);
    vm.set_slot_dirty_log(0, false).unwrap();
    assert!(!vm.ram().slots()[0].dirty_log_enabled());
}
