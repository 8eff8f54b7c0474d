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

/// Serial output shared with the test.
#[derive(Clone, Default)]
struct SerialBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SerialBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SerialBuf {
    fn count(&self, c: u8) -> usize {
        self.0.lock().unwrap().iter().filter(|&&b| b == c).count()
    }

    /// Waits until the guest printed `n` characters `c`.
    fn wait(&self, c: u8, n: usize) {
        let deadline = std::time::Instant::now() + PROGRESS_TIMEOUT;
        while self.count(c) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "waiting for {n} '{}' on COM1; have {:?}",
                c as char,
                String::from_utf8_lossy(&self.0.lock().unwrap())
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Which pass each page of `[start, end)` holds: pages before the guest's cursor hold pass
/// `done` (being written), pages after it pass `done - 1`, and at most the one at the
/// cursor a prefix of the first and the rest of the second. Panics on anything else.
fn check_dense_pages(vm: &vmm::Vm, start: u64, end: u64, done: u32) -> u64 {
    use vmm::guest::bootsector::dense_page;
    let mut cursor = None;
    for gpa in (start..end).step_by(PAGE_SIZE as usize) {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        vm.memory()
            .read_slice(&mut page, GuestAddress(gpa))
            .unwrap();
        let new = dense_page(gpa as u32, done);
        let old = dense_page(gpa as u32, done - 1);
        let same = |a: &[u8], b: &[u8]| {
            a.chunks(4)
                .zip(b.chunks(4))
                .take_while(|(x, y)| x == y)
                .count()
        };
        let k = same(&page, &new);
        match cursor {
            None if k == page.len() / 4 => {}
            None => {
                assert_eq!(
                    same(&page[k * 4..], &old[k * 4..]),
                    page.len() / 4 - k,
                    "page {gpa:#x}: neither pass {done} nor {} from dword {k}",
                    done - 1
                );
                cursor = Some(gpa);
            }
            Some(_) => assert!(
                page == old,
                "page {gpa:#x} after the cursor is not pass {}",
                done - 1
            ),
        }
    }
    cursor.unwrap_or(end)
}

#[test]
fn dense_bootsector_checks_and_rewrites_pages_in_ring3() {
    use vmm::guest::bootsector::{AbBootblock, FAIL, PASS, STATUS_GPA, TICK, Workload};
    let _kvm = kvm_test();
    let (start, end) = (1u64 << 20, 5u64 << 20);
    let image = AbBootblock {
        start,
        end,
        workload: Workload::Dense {
            pages_per_tick: 64,
            once: false,
        },
        spin_loops: 1,
    };
    let dir = std::env::temp_dir().join(format!("ferry-dense-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dense.img");
    std::fs::write(&path, image.build().unwrap()).unwrap();
    let serial = SerialBuf::default();
    let mut vm = vmm::Vm::with_serial(&config(32, 1), Box::new(serial.clone())).unwrap();
    let spec = GuestSpec::Bootsector {
        path: Box::leak(path.display().to_string().into_boxed_str()),
    };
    vm.load_guest(&spec).unwrap();
    vm.resume().unwrap();
    serial.wait(PASS, 3);
    vm.pause().unwrap();
    let status = |vm: &vmm::Vm, at: u64| {
        let v: u32 = vm.memory().read_obj(GuestAddress(STATUS_GPA + at)).unwrap();
        v
    };
    let done = status(&vm, 0);
    assert!(done >= 3, "{done} passes");
    assert_eq!(status(&vm, 4), 0, "failed page checks");
    assert_eq!(serial.count(FAIL), 0);
    assert_eq!(serial.count(b'A'), 1);
    // 16 ticks per pass of 1024 pages.
    assert!(serial.count(TICK) >= 16 * 3, "{} ticks", serial.count(TICK));
    let cursor = check_dense_pages(&vm, start, end, done);

    // A stray byte in a page the guest will check: one failure, counted and printed.
    let victim = if cursor - start >= 2 * PAGE_SIZE {
        start
    } else {
        end - PAGE_SIZE
    };
    let b: u8 = vm.memory().read_obj(GuestAddress(victim + 100)).unwrap();
    vm.memory()
        .write_obj(!b, GuestAddress(victim + 100))
        .unwrap();
    let passes = serial.count(PASS);
    vm.resume().unwrap();
    serial.wait(PASS, passes + 2);
    vm.pause().unwrap();
    assert_eq!(serial.count(FAIL), 1);
    assert_eq!(status(&vm, 4), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_throttle_keeps_vcpus_out_of_kvm_run_until_it_ends() {
    let _kvm = kvm_test();
    // vCPU 1 halts inside KVM_RUN: the throttle must kick it out too.
    let vm = boot(&config(32, 2), &GuestSpec::dirty_mib(2));
    wait_pass(&vm, 1);
    assert_eq!(vm.throttled(), Duration::ZERO);
    vm.set_throttle(50).expect("start throttling");
    assert_eq!(vm.throttle_percent(), 50);
    // 50 %: each vCPU sleeps 10 ms per 20 ms period.
    let deadline = std::time::Instant::now() + PROGRESS_TIMEOUT;
    while vm.throttled() < Duration::from_millis(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "the vCPUs slept only {:?} for a 50 % throttle",
            vm.throttled()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Raised to the maximum, a sleep of 990 ms: a pause does not wait for it.
    vm.set_throttle(99).unwrap();
    assert_eq!(vm.throttle_percent(), 99);
    vm.pause().expect("pause while throttled");
    vm.resume().unwrap();
    vm.set_throttle(0).expect("end throttling");
    assert_eq!(vm.throttle_percent(), 0);
    // Parked once more, every vCPU has accounted for its last sleep; none follows.
    vm.pause().unwrap();
    let slept = vm.throttled();
    vm.resume().unwrap();
    let p = vm.progress().last_pass();
    wait_pass(&vm, p + 3);
    vm.pause().unwrap();
    assert_eq!(
        vm.throttled(),
        slept,
        "a vCPU slept after the throttle ended"
    );
    vm.verify_guest_pattern().expect("pattern after throttling");
}
