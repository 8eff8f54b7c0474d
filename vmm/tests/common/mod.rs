//! Helpers shared by the real-KVM tests.

#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm::config::{GuestSpec, VmConfig};
use vmm::{RunState, Vm};

/// Generous bound for guest progress on a slow, shared, software-virtualised host.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

static KVM_SERIAL: Mutex<()> = Mutex::new(());

/// Takes the per-binary KVM lock (end-to-end KVM tests run one at a time) and fails the
/// test, loudly, when `/dev/kvm` is missing.
pub fn kvm_test() -> MutexGuard<'static, ()> {
    let guard = KVM_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "/dev/kvm is not available ({e}): these tests need real KVM and must not be skipped"
        );
    }
    guard
}

/// The shape used by most tests.
pub fn config(memory_mib: u64, vcpus: u8) -> VmConfig {
    VmConfig {
        memory_size: memory_mib << 20,
        vcpus,
        machine: machine_types::MachineType::lookup("ferry-2.0").unwrap(),
        ..Default::default()
    }
}

/// Creates a VM, loads `guest` and starts it.
pub fn boot(cfg: &VmConfig, guest: &GuestSpec) -> Vm {
    let mut vm = Vm::new(cfg).expect("create VM");
    vm.load_guest(guest).expect("load guest");
    vm.resume().expect("start vCPUs");
    assert_eq!(vm.run_state(), RunState::Running);
    vm
}

/// Waits for the guest to report `pass`, failing with the mailbox contents on timeout.
pub fn wait_pass(vm: &Vm, pass: u32) -> u32 {
    match vm.wait_for_pass(pass, PROGRESS_TIMEOUT) {
        Ok(p) => p,
        Err(e) => panic!(
            "waiting for guest pass {pass}: {e:?}; mailbox {:?}; run state {}",
            vm.mailbox(),
            vm.run_state()
        ),
    }
}

/// Polls the mailbox until `cond` holds, failing after [`PROGRESS_TIMEOUT`] with `what`.
pub fn wait_mailbox(vm: &Vm, what: &str, cond: impl Fn(&vmm::guest::Mailbox) -> bool) {
    let deadline = Instant::now() + PROGRESS_TIMEOUT;
    loop {
        let mb = vm.mailbox().expect("read mailbox");
        if cond(&mb) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; mailbox {mb:?}"
        );
        // Poll, do not spin: on a 2-core host a spinning test thread takes the time the
        // guest's vCPU needs to reach the state waited for.
        std::thread::sleep(Duration::from_millis(1));
    }
}
