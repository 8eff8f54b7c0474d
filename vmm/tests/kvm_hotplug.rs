//! Real-KVM hotplug: the test guest drives the connectors on a vCPU. CPU cores become
//! running vCPUs, memory blocks join the dirty workload (and the pattern check), PCI
//! functions get their scratch register written; unplugs in every guest mode.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmm::config::GuestSpec;
use vmm::guest::PatternError;
use vmm::guest::mailbox::hp;
use vmm::guest::{GuestHotplugMode, HotplugMailbox};
use vmm::hotplug::{DeviceProps, Event, HotplugConfig, HotplugError, RunPhase};
use vmm::vm::hotplug::HotCoreState;
use vmm::{RunState, Vm, VmError};

const WAIT: Duration = PROGRESS_TIMEOUT;

/// The VMM service loop, run by the test: process hotplug work, collect events.
struct Service {
    events: Vec<Event>,
}

impl Service {
    fn new() -> Service {
        Service { events: Vec::new() }
    }

    fn pump(&mut self, vm: &mut Vm) {
        let now = vm.hotplug_clock_ms();
        self.events.extend(vm.process_hotplug(now));
    }

    /// Runs the service until `cond` holds; waits on the hotplug waker (bounded) between
    /// checks. Fails with the guest's view on timeout.
    fn wait(&mut self, vm: &mut Vm, what: &str, mut cond: impl FnMut(&Vm, &[Event]) -> bool) {
        let waker = vm.hotplug_waker();
        let deadline = Instant::now() + WAIT;
        loop {
            self.pump(vm);
            if cond(vm, &self.events) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out waiting for {what}\n events {:?}\n hotplug mailbox {:?}\n mailbox {:?}\n cores {:?}\n connectors {:#?}",
                    self.events,
                    vm.hotplug_mailbox(),
                    vm.mailbox(),
                    vm.hot_cores(),
                    vm.hotplug()
                        .lock()
                        .unwrap()
                        .query_connectors(vm.hotplug_clock_ms())
                        .into_iter()
                        .filter(|c| c.device.is_some())
                        .collect::<Vec<_>>()
                );
            }
            let (flag, cv) = &*waker;
            let g = flag.lock().unwrap();
            let (mut g, _) = cv
                .wait_timeout_while(g, Duration::from_millis(5), |f| !*f)
                .unwrap();
            *g = false;
        }
    }

    fn take(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
}

fn hpmb(vm: &Vm) -> HotplugMailbox {
    vm.hotplug_mailbox().expect("read hotplug mailbox")
}

fn deleted(id: &str) -> Event {
    Event::DeviceDeleted {
        device: id.to_owned(),
        path: format!("/machine/peripheral/{id}"),
    }
}

fn guest_error(id: &str) -> Event {
    Event::UnplugGuestError {
        device: id.to_owned(),
        path: format!("/machine/peripheral/{id}"),
    }
}

fn core(id: u32) -> DeviceProps {
    DeviceProps {
        core_id: Some(id),
        ..Default::default()
    }
}

fn block(slot: u32) -> DeviceProps {
    DeviceProps {
        slot: Some(slot),
        ..Default::default()
    }
}

fn pci(addr: &str) -> DeviceProps {
    DeviceProps {
        addr: Some(addr.to_owned()),
        multifunction: Some(true),
        ..Default::default()
    }
}

/// Boots a 64 MiB guest with the given hotplug unplug timeout.
fn boot_hp(guest: &GuestSpec, timeout_ms: Option<u64>) -> Vm {
    let mut vm = Vm::new(&config(64, 1)).expect("create VM");
    if let Some(t) = timeout_ms {
        let cfg = HotplugConfig {
            unplug_timeout_ms: t,
            ..vm.hotplug().lock().unwrap().config().clone()
        };
        vm.configure_hotplug(cfg).expect("configure hotplug");
    }
    vm.load_guest(guest).expect("load guest");
    vm.resume().expect("start vCPUs");
    assert_eq!(vm.run_state(), RunState::Running);
    vm
}

fn dirty() -> GuestSpec {
    GuestSpec::dirty_mib(1)
}

fn no_rtas_errors(vm: &Vm) {
    let m = hpmb(vm);
    assert_eq!(
        m.rtas_errors,
        0,
        "guest saw unexpected RTAS statuses, last (index, status) = {:x?}",
        m.last_error()
    );
}

fn add_core_and_see_it_run(vm: &mut Vm, svc: &mut Service, id: &str, core_id: u32) -> u64 {
    vm.hotplug_add("ferry-cpu-core", id, &core(core_id), RunPhase::Started)
        .expect("device_add core");
    let c = core_id as usize;
    svc.wait(vm, "the hot-added core to run", |vm, _| {
        let m = hpmb(vm);
        m.cores & (1 << core_id) != 0
            && m.core[c].state == hp::CORE_RUNNING
            && m.core[c].counter > 1000
    });
    let before = hpmb(vm).core[c].counter;
    svc.wait(vm, "the core's counter to advance", |vm, _| {
        hpmb(vm).core[c].counter > before + 1000
    });
    assert!(
        vm.hot_cores()
            .contains(&(core_id, 1 + core_id as u8, HotCoreState::Running)),
        "{:?}",
        vm.hot_cores()
    );
    hpmb(vm).core[c].counter
}

#[test]
fn cpu_core_hotplug_runs_guest_code_and_unplugs() {
    let _kvm = kvm_test();
    let mut vm = boot_hp(&dirty(), None);
    let mut svc = Service::new();
    add_core_and_see_it_run(&mut vm, &mut svc, "cpu1", 0);

    // Pause and resume keep the hot vCPU in step with the VM.
    vm.pause().unwrap();
    assert!(vm.all_parked());
    let frozen = hpmb(&vm).core[0].counter;
    let pass = vm.progress().last_pass();
    assert!(
        vm.wait_for_pass(pass + 1, Duration::from_millis(200))
            .is_err()
    );
    assert_eq!(
        hpmb(&vm).core[0].counter,
        frozen,
        "paused core kept counting"
    );
    vm.verify_guest_pattern().unwrap();
    vm.resume().unwrap();
    svc.wait(&mut vm, "the core to count after resume", |vm, _| {
        hpmb(vm).core[0].counter > frozen
    });

    vm.hotplug_del("cpu1", vm.hotplug_clock_ms()).unwrap();
    svc.wait(&mut vm, "DEVICE_DELETED for cpu1", |_, ev| {
        ev.contains(&deleted("cpu1"))
    });
    let m = hpmb(&vm);
    assert_eq!(m.core[0].state, hp::CORE_PARKED);
    assert_eq!(m.cores, 0);
    assert_eq!(vm.hot_cores(), vec![(0, 1, HotCoreState::Parked)]);
    let stopped = m.core[0].counter;
    let pass = vm.progress().last_pass();
    wait_pass(&vm, pass + 3);
    assert_eq!(
        hpmb(&vm).core[0].counter,
        stopped,
        "removed core still runs"
    );
    no_rtas_errors(&vm);
    assert_eq!(svc.take(), vec![deleted("cpu1")]);

    // The kept vCPU fd serves a re-add of the same core.
    add_core_and_see_it_run(&mut vm, &mut svc, "cpu1-again", 0);
    assert_eq!(vm.hot_cores().len(), 1);
    no_rtas_errors(&vm);
    vm.pause().unwrap();
    vm.verify_guest_pattern().unwrap();
}

#[test]
fn memory_block_joins_the_dirty_workload_and_leaves() {
    let _kvm = kvm_test();
    let mut vm = boot_hp(&dirty(), None);
    let mut svc = Service::new();
    vm.hotplug_add("ferry-mem-block", "mem1", &block(1), RunPhase::Started)
        .expect("device_add mem block");
    let blocks = vm.hotplug_blocks();
    assert_eq!(blocks.len(), 1);
    let (slot, _, gpa, size) = blocks[0];
    assert_eq!((slot, size), (1, 16 << 20));
    assert!(gpa >= 1 << 32, "block at {gpa:#x}");
    vm.set_dirty_log(true).unwrap();
    vm.hotplug_set_dirty_log(true).unwrap();
    svc.wait(
        &mut vm,
        "the guest to dirty block 1 three times",
        |vm, _| {
            let m = hpmb(vm);
            m.blocks == 1 << 1 && m.block[1].passes >= 3
        },
    );
    let dirty = vm.hotplug_dirty_pages().unwrap();
    assert_eq!(dirty.len(), 1);
    assert_eq!(dirty[0].count(), 4096, "every page of the block is dirty");

    for _ in 0..3 {
        vm.pause().unwrap();
        vm.verify_guest_pattern().expect("main pattern");
        assert_eq!(vm.verify_hotplug_blocks().expect("block pattern"), 1);
        vm.resume().unwrap();
        let p = hpmb(&vm).block[1].passes;
        svc.wait(&mut vm, "another block pass", |vm, _| {
            hpmb(vm).block[1].passes > p
        });
    }

    // A broken block is caught.
    vm.pause().unwrap();
    let mem = vm.hotplug_block_memory(1).unwrap();
    use vm_memory::{Bytes, GuestAddress};
    let page = gpa + 77 * 4096;
    let b: u8 = mem.read_obj(GuestAddress(page)).unwrap();
    mem.write_obj(b.wrapping_add(9), GuestAddress(page))
        .unwrap();
    let err = vm.verify_hotplug_blocks().unwrap_err();
    assert!(
        matches!(
            err,
            VmError::Pattern(PatternError::Edge { page: 77, .. })
                | VmError::Pattern(PatternError::Mismatch { page: 77, .. })
        ),
        "{err:?}"
    );
    mem.write_obj(b, GuestAddress(page)).unwrap();
    vm.verify_hotplug_blocks().unwrap();
    // So is a byte the guest never writes, anywhere in a block page.
    mem.write_obj(0x77u8, GuestAddress(page + 4095)).unwrap();
    let err = vm.verify_hotplug_blocks().unwrap_err();
    assert!(
        matches!(
            err,
            VmError::Pattern(PatternError::Stray {
                page: 77,
                offset: 4095,
                found: 0x77,
                ..
            })
        ),
        "{err:?}"
    );
    mem.write_obj(0u8, GuestAddress(page + 4095)).unwrap();
    vm.verify_hotplug_blocks().unwrap();
    vm.resume().unwrap();

    vm.hotplug_del("mem1", vm.hotplug_clock_ms()).unwrap();
    svc.wait(&mut vm, "DEVICE_DELETED for mem1", |_, ev| {
        ev.contains(&deleted("mem1"))
    });
    assert!(vm.hotplug_blocks().is_empty(), "block still mapped");
    assert_eq!(hpmb(&vm).blocks, 0);
    let pass = vm.progress().last_pass();
    wait_pass(&vm, pass + 3);
    vm.pause().unwrap();
    vm.verify_guest_pattern().unwrap();
    assert_eq!(vm.verify_hotplug_blocks().unwrap(), 0);
    no_rtas_errors(&vm);
}

#[test]
fn multifunction_pci_slot_in_an_idle_guest() {
    let _kvm = kvm_test();
    // Idle guest: it only wakes on the hotplug interrupt.
    let mut vm = boot_hp(&GuestSpec::Idle, None);
    let mut svc = Service::new();
    for f in [1u8, 2, 3] {
        vm.hotplug_add(
            "ferry-pci-fn",
            &format!("nic{f}"),
            &pci(&format!("01.{f}")),
            RunPhase::Started,
        )
        .expect("device_add function");
    }
    // vCPU 0 has served the controller once and sleeps in `hlt`.
    svc.wait(&mut vm, "vCPU 0 to idle", |vm, _| {
        vm.mailbox().unwrap().status == vmm::guest::mailbox::STATUS_IDLE && hpmb(vm).polls >= 1
    });
    // Functions other than 0 wait for function 0: the guest hears nothing yet.
    svc.pump(&mut vm);
    assert_eq!(hpmb(&vm).events, 0);
    assert_eq!(vm.mailbox().unwrap().irq_count, 0);
    vm.hotplug_add("ferry-pci-fn", "nic0", &pci("01.0"), RunPhase::Started)
        .expect("device_add function 0");
    svc.wait(&mut vm, "the guest to configure slot 01", |vm, _| {
        hpmb(vm).pci == 0xf << 8
    });
    // Only the hotplug interrupt can have woken it.
    assert!(vm.mailbox().unwrap().irq_count >= 1);
    assert!(hpmb(&vm).polls >= 2);
    for f in 0..4u8 {
        let s = vm.pci_function(1, f).expect("present");
        assert_eq!(s.scratch, hp::SCRATCH_MAGIC | u32::from(8 + f), "01.{f}");
        assert_eq!((s.command, s.counter), (1, 1), "01.{f}");
    }
    {
        let m = vm.hotplug().lock().unwrap();
        for c in m.query_connectors(0).iter().filter(|c| c.device.is_some()) {
            assert_eq!(
                (c.state, c.indicator),
                ("physical-configured", Some("active")),
                "{c:?}"
            );
        }
    }

    assert!(matches!(
        vm.hotplug_del("nic2", vm.hotplug_clock_ms()),
        Err(HotplugError::UnplugFunctionZero { slot: 1 })
    ));
    vm.hotplug_del("nic0", vm.hotplug_clock_ms()).unwrap();
    svc.wait(&mut vm, "DEVICE_DELETED for the whole slot", |_, ev| {
        ev.len() == 4
    });
    let mut ids: Vec<Event> = svc.take();
    ids.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        ids,
        vec![
            deleted("nic0"),
            deleted("nic1"),
            deleted("nic2"),
            deleted("nic3")
        ]
    );
    for f in 0..4u8 {
        assert!(vm.pci_function(1, f).is_none(), "01.{f} still present");
    }
    assert_eq!(hpmb(&vm).pci, 0);
    no_rtas_errors(&vm);
    assert_eq!(
        vm.mailbox().unwrap().status,
        vmm::guest::mailbox::STATUS_IDLE
    );
}

#[test]
fn refusing_guest_gives_guest_error_at_once() {
    let _kvm = kvm_test();
    let mut vm = boot_hp(&dirty(), None); // 15 s timeout: the error must come from the guest
    let mut svc = Service::new();
    add_core_and_see_it_run(&mut vm, &mut svc, "cpu2", 1);
    vm.set_guest_hotplug_mode(GuestHotplugMode::Refuse).unwrap();
    let t0 = vm.hotplug_clock_ms();
    vm.hotplug_del("cpu2", t0).unwrap();
    let deadline = vm.hotplug_next_deadline().expect("unplug pending");
    svc.wait(&mut vm, "DEVICE_UNPLUG_GUEST_ERROR for cpu2", |_, ev| {
        ev.contains(&guest_error("cpu2"))
    });
    // Seen before the unplug timer could fire: the error is the guest's refusal, not the
    // timeout (no margin guessed: the deadline itself is the bound).
    let at = vm.hotplug_clock_ms();
    assert!(
        at < deadline,
        "guest error seen at {at} ms, not before the unplug deadline {deadline} ms (sent at {t0})"
    );
    assert_eq!(svc.take(), vec![guest_error("cpu2")]);
    assert_eq!(vm.hotplug_next_deadline(), None, "unplug still pending");
    // The core keeps running.
    let c = hpmb(&vm).core[1].counter;
    svc.wait(&mut vm, "the refused core to keep counting", |vm, _| {
        hpmb(vm).core[1].counter > c
    });
    no_rtas_errors(&vm);

    vm.set_guest_hotplug_mode(GuestHotplugMode::Cooperative)
        .unwrap();
    vm.hotplug_del("cpu2", vm.hotplug_clock_ms()).unwrap();
    svc.wait(&mut vm, "DEVICE_DELETED for cpu2", |_, ev| {
        ev.contains(&deleted("cpu2"))
    });
    no_rtas_errors(&vm);
}

#[test]
fn ignoring_guest_times_out_and_a_retry_succeeds() {
    let _kvm = kvm_test();
    let mut vm = boot_hp(&dirty(), Some(1000));
    let mut svc = Service::new();
    vm.hotplug_add("ferry-mem-block", "mem0", &block(0), RunPhase::Started)
        .unwrap();
    svc.wait(&mut vm, "block 0 in use", |vm, _| hpmb(vm).blocks == 1);
    vm.set_guest_hotplug_mode(GuestHotplugMode::Ignore).unwrap();
    let seen = hpmb(&vm).events;
    let t0 = vm.hotplug_clock_ms();
    vm.hotplug_del("mem0", t0).unwrap();
    let deadline = vm.hotplug_next_deadline().expect("unplug pending");
    assert_eq!(deadline, t0 + 1000);
    // The guest pops the request and ignores it.
    svc.wait(&mut vm, "the guest to pop the unplug request", |vm, _| {
        hpmb(vm).events > seen
    });
    // A repeated device_del re-sends the request and keeps the deadline.
    let seen = hpmb(&vm).events;
    vm.hotplug_del("mem0", vm.hotplug_clock_ms()).unwrap();
    assert_eq!(vm.hotplug_next_deadline(), Some(deadline));
    svc.wait(&mut vm, "the guest to pop the re-sent request", |vm, _| {
        hpmb(vm).events > seen
    });
    assert!(svc.events.is_empty(), "{:?}", svc.events);
    svc.wait(&mut vm, "the unplug to time out", |_, ev| {
        ev.contains(&guest_error("mem0"))
    });
    let at = vm.hotplug_clock_ms();
    assert!(
        at >= deadline,
        "guest error at {at} ms, deadline {deadline}"
    );
    assert_eq!(svc.take(), vec![guest_error("mem0")]);
    assert_eq!(hpmb(&vm).blocks, 1, "the guest still uses the block");

    vm.set_guest_hotplug_mode(GuestHotplugMode::Cooperative)
        .unwrap();
    vm.hotplug_del("mem0", vm.hotplug_clock_ms()).unwrap();
    svc.wait(&mut vm, "DEVICE_DELETED after the retry", |_, ev| {
        ev.contains(&deleted("mem0"))
    });
    assert!(vm.hotplug_blocks().is_empty());
    no_rtas_errors(&vm);
    vm.pause().unwrap();
    vm.verify_guest_pattern().unwrap();
}

#[test]
fn slow_guest_answers_only_when_told() {
    let _kvm = kvm_test();
    let mut vm = boot_hp(&dirty(), None);
    let mut svc = Service::new();
    add_core_and_see_it_run(&mut vm, &mut svc, "cpu3", 2);
    vm.set_guest_hotplug_mode(GuestHotplugMode::Slow).unwrap();
    vm.hotplug_del("cpu3", vm.hotplug_clock_ms()).unwrap();
    svc.wait(&mut vm, "the guest to hold the request back", |vm, _| {
        hpmb(vm).deferred == 1
    });
    // Many passes later: still no answer.
    let pass = vm.progress().last_pass();
    wait_pass(&vm, pass + 20);
    svc.pump(&mut vm);
    assert!(svc.events.is_empty(), "{:?}", svc.events);
    assert_eq!(hpmb(&vm).core[2].state, hp::CORE_RUNNING);

    vm.guest_answer_unplugs().unwrap();
    svc.wait(&mut vm, "DEVICE_DELETED once answered", |vm, ev| {
        ev.contains(&deleted("cpu3")) && hpmb(vm).deferred == 0
    });
    let m = hpmb(&vm);
    assert_eq!(
        (m.deferred, m.answer, m.core[2].state),
        (0, 0, hp::CORE_PARKED)
    );
    no_rtas_errors(&vm);
}

#[test]
fn device_add_into_a_busy_connector_is_transient_and_changes_nothing() {
    let _kvm = kvm_test();
    let mut vm = boot_hp(&dirty(), None);
    let mut svc = Service::new();
    add_core_and_see_it_run(&mut vm, &mut svc, "cpu0", 0);
    vm.set_guest_hotplug_mode(GuestHotplugMode::Ignore).unwrap();
    vm.hotplug_del("cpu0", vm.hotplug_clock_ms()).unwrap();
    svc.pump(&mut vm);

    let now = vm.hotplug_clock_ms();
    let before = vm.hotplug().lock().unwrap().query_connectors(now);
    let cores = vm.hot_cores();
    let err = vm
        .hotplug_add("ferry-cpu-core", "cpu0b", &core(0), RunPhase::Started)
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(matches!(err, HotplugError::Busy { .. }), "{err:?}");
    assert!(err.to_string().contains("unplug pending"), "{err}");
    assert_eq!(vm.hotplug().lock().unwrap().query_connectors(now), before);
    assert_eq!(vm.hot_cores(), cores);
    // Another core, and a memory block, are not affected.
    vm.hotplug_add("ferry-mem-block", "m", &block(3), RunPhase::Started)
        .unwrap();
    svc.wait(&mut vm, "block 3 in use", |vm, _| hpmb(vm).blocks == 1 << 3);
    assert!(svc.events.is_empty(), "{:?}", svc.events);
    no_rtas_errors(&vm);
}

#[test]
fn prelaunch_adds_are_coldplugged_by_the_reset() {
    let _kvm = kvm_test();
    let mut vm = Vm::new(&config(64, 1)).expect("create VM");
    vm.load_guest(&dirty()).expect("load guest");
    let mut svc = Service::new();
    vm.hotplug_add("ferry-cpu-core", "cpu1", &core(1), RunPhase::Prelaunch)
        .unwrap();
    vm.hotplug_add("ferry-mem-block", "mem2", &block(2), RunPhase::Prelaunch)
        .unwrap();
    assert!(vm.hotplug().lock().unwrap().needs_reset_before_start());
    assert!(vm.hotplug_reset().unwrap().is_empty());
    {
        let m = vm.hotplug().lock().unwrap();
        assert!(!m.needs_reset_before_start());
        assert!(m.events().is_empty());
        let states: Vec<_> = m
            .query_connectors(0)
            .into_iter()
            .filter(|c| c.device.is_some())
            .map(|c| c.state)
            .collect();
        assert_eq!(states, vec!["logical-configured"; 2]);
    }
    vm.resume().unwrap();
    svc.wait(&mut vm, "the coldplugged core and block in use", |vm, _| {
        let m = hpmb(vm);
        m.core[1].counter > 1000 && m.block[2].passes >= 2
    });
    assert_eq!(hpmb(&vm).events, 0, "coldplug must not need guest events");
    vm.pause().unwrap();
    vm.verify_guest_pattern().unwrap();
    assert_eq!(vm.verify_hotplug_blocks().unwrap(), 1);
    let saved = vm.save_hot_vcpus().unwrap();
    assert_eq!(saved.len(), 1);
    assert_eq!((saved[0].0, saved[0].1), (1, HotCoreState::Running));
    vm.resume().unwrap();

    for id in ["cpu1", "mem2"] {
        vm.hotplug_del(id, vm.hotplug_clock_ms()).unwrap();
    }
    svc.wait(&mut vm, "both coldplugged devices deleted", |_, ev| {
        ev.contains(&deleted("cpu1")) && ev.contains(&deleted("mem2"))
    });
    assert_eq!(vm.hot_cores(), vec![(1, 2, HotCoreState::Parked)]);
    assert!(vm.hotplug_blocks().is_empty());
    no_rtas_errors(&vm);
}
