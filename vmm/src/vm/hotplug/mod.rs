//! Hotplug on KVM: the VM side of [`crate::hotplug`].
//!
//! The [`Vm`] owns a [`HotplugManager`] behind an `Arc<Mutex<_>>`, registered on the port-I/O
//! bus at [`CONTROLLER_BASE`] (the guest's register file), plus:
//!
//! - the hotplug interrupt: an irqfd on GSI [`HOTPLUG_IRQ`],
//!   signalled (an edge) whenever the manager asks for an interrupt — after a guest access
//!   and after `device_add` / `device_del`;
//! - the park port [`HOTPLUG_PARK_PORT`], where a hot-added
//!   core reports that it stopped;
//! - the PCI function window ([`PciFunctions`]);
//! - hot-added vCPUs (one per CPU-core connector that ever had a device; KVM cannot destroy a
//!   vCPU, so a removed core is parked and its fd kept for a later re-add) and hot-plugged
//!   memory blocks (one KVM memory slot each, [`HOTPLUG_KVM_SLOT_BASE`]` + slot`).
//!
//! Nothing here runs on a vCPU thread except the two bus devices, which never need the VM:
//! they queue the manager's effects and events and signal the [`HotplugWaker`]. A service
//! thread then calls [`Vm::process_hotplug`], which ticks the unplug timers, applies the
//! effects (start / park a vCPU, map / unmap a block, enable / disable a PCI function) and
//! returns the management events (DEVICE_DELETED, DEVICE_UNPLUG_GUEST_ERROR).
//!
//! Hot-added vCPUs are in `cores`, hot-plugged memory blocks in `blocks`.
//!
//! Resources a guest might touch are created *before* it can learn about them:
//! [`Vm::hotplug_add`] checks the request, creates the vCPU / maps the block / enables the
//! function, and only then attaches the device and queues the guest event, all under the
//! manager lock.

mod blocks;
mod cores;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devstate::{RawSection, Section};
use kvm_ioctls::VmFd;
use machine_types::MachineType;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, MmapRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{GuestMem, GuestRam, Vm, VmError, kvm_op};
use crate::config::VmConfig;
use crate::devices::pci_fn::PCI_IO_LEN;
use crate::devices::{Bus, BusDevice, PciFnState, PciFunctions};
use crate::guest::mailbox::{Mailbox, hp};
use crate::guest::{
    self, GuestHotplugMode, HOTPLUG_IRQ, HOTPLUG_PARK_PORT, HotplugMailbox, PCI_IO_BASE, layout,
};
use crate::hotplug::manager::{DEFAULT_UNPLUG_TIMEOUT_MS, MEM_BLOCK_SIZE, PCI_FUNCTIONS};
use crate::hotplug::{
    CONTROLLER_BASE, CONTROLLER_LEN, DeviceProps, DeviceSpec, Effect, Event, HotplugConfig,
    HotplugError, HotplugManager, Resource, RunPhase,
};
use crate::runstate::RunState;
use crate::vcpu::{Vcpu, VcpuError, longmode};
use blocks::unregister_block;

/// KVM memory slot of hot-plugged memory block 0 (block `s` uses `HOTPLUG_KVM_SLOT_BASE + s`).
pub const HOTPLUG_KVM_SLOT_BASE: u32 = 16;

/// Signalled (flag set, condvar notified) when hotplug work waits for
/// [`Vm::process_hotplug`]. The service thread clears the flag before processing.
pub type HotplugWaker = Arc<(Mutex<bool>, Condvar)>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn device_err(why: impl Into<String>) -> VmError {
    VmError::Device("hotplug", io::Error::other(why.into()))
}

/// Work queued on vCPU threads (or by management calls) for [`Vm::process_hotplug`].
#[derive(Debug, Default)]
struct Pending {
    effects: Vec<Effect>,
    events: Vec<Event>,
    parks: Vec<u32>,
}

#[derive(Debug)]
struct Shared {
    irq: EventFd,
    pending: Mutex<Pending>,
    waker: HotplugWaker,
}

impl Shared {
    fn wake(&self) {
        let (flag, cv) = &*self.waker;
        *lock(flag) = true;
        cv.notify_all();
    }

    fn raise_irq(&self) {
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "cannot signal the hotplug irqfd");
        }
    }

    /// Moves the manager's outputs out: interrupt request -> irqfd, effects and events ->
    /// the pending queue (waking the service thread).
    fn pump(&self, mgr: &mut HotplugManager) {
        if mgr.take_irq() {
            self.raise_irq();
        }
        let effects = mgr.drain_effects();
        let events = mgr.drain_events();
        if effects.is_empty() && events.is_empty() {
            return;
        }
        {
            let mut p = lock(&self.pending);
            p.effects.extend(effects);
            p.events.extend(events);
        }
        self.wake();
    }
}

/// The controller's register file on the I/O bus.
struct ControllerDev {
    mgr: Arc<Mutex<HotplugManager>>,
    shared: Arc<Shared>,
}

impl BusDevice for ControllerDev {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut m = lock(&self.mgr);
        m.pio_read(offset as u16, data);
        self.shared.pump(&mut m);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut m = lock(&self.mgr);
        m.pio_write(offset as u16, data);
        self.shared.pump(&mut m);
    }
}

/// The park port: a hot-added core writes its core id when it stopped.
struct ParkDev {
    shared: Arc<Shared>,
}

impl BusDevice for ParkDev {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.len() != 4 {
            return;
        }
        let core = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        lock(&self.shared.pending).parks.push(core);
        self.shared.wake();
    }
}

/// Run state of a hot-added vCPU (`ferry-state`'s, beside the section that carries it).
pub use ferry_state::HotCoreState;

#[derive(Debug)]
struct HotCore {
    vcpu: Vcpu,
    state: HotCoreState,
}

#[derive(Debug)]
struct HotBlock {
    kvm_slot: u32,
    gpa: u64,
    size: u64,
    host_addr: u64,
    dirty_log: AtomicBool,
    mem: GuestMem,
}

impl HotBlock {
    fn bitmap(&self) -> Option<&AtomicBitmap> {
        let region = self.mem.iter().next()?;
        let mmap: &MmapRegion<AtomicBitmap> = region;
        Some(mmap.bitmap())
    }
}

#[derive(Debug, Default)]
struct Clock {
    acc: Duration,
    since: Option<Instant>,
}

/// A handle on the guest-running clock that does not need the VM (QMP reads it while a
/// migration holds the VM).
#[derive(Clone, Debug)]
pub struct GuestClock(Arc<Mutex<Clock>>);

impl GuestClock {
    /// Guest-running milliseconds.
    pub fn now_ms(&self) -> u64 {
        let clk = lock(&self.0);
        (clk.acc + clk.since.map(|t| t.elapsed()).unwrap_or_default()).as_millis() as u64
    }
}

/// The VM's hotplug runtime (see the module docs). Field order is drop order: hot vCPU
/// threads stop before the blocks are unmapped.
pub struct VmHotplug {
    cores: BTreeMap<u32, HotCore>,
    blocks: BTreeMap<u32, HotBlock>,
    mgr: Arc<Mutex<HotplugManager>>,
    pci: Arc<Mutex<PciFunctions>>,
    shared: Arc<Shared>,
    fd: Arc<VmFd>,
    core_vcpu_base: u8,
    core_entry: u64,
    clock: Arc<Mutex<Clock>>,
}

impl std::fmt::Debug for VmHotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHotplug")
            .field("cores", &self.cores)
            .field("blocks", &self.blocks.keys().collect::<Vec<_>>())
            .field("core_vcpu_base", &self.core_vcpu_base)
            .finish_non_exhaustive()
    }
}

impl Drop for VmHotplug {
    fn drop(&mut self) {
        self.cores.clear();
        for b in std::mem::take(&mut self.blocks).into_values() {
            if let Err(e) = unregister_block(&self.fd, &b) {
                tracing::warn!(error = %e, "cannot remove a hotplug memory slot");
            }
        }
    }
}

/// The hotplug shape a VM of `config` gets by default: up to 4 cores (vCPU indices from the
/// boot vCPU count upward), 4 memory blocks at the first GiB boundary at or above
/// `max(4 GiB, top of RAM)`, 2 PCI slots of 8 functions, QEMU's 15 s unplug timeout.
pub fn default_hotplug_config(config: &VmConfig, ram_top: u64) -> HotplugConfig {
    let room = u32::from(layout::MAX_VCPUS.saturating_sub(config.vcpus));
    HotplugConfig {
        cpu_cores: room.min(4),
        mem_blocks: 4,
        pci_slots: 2,
        mem_base: ram_top.max(layout::PCI_HOLE_END).next_multiple_of(1 << 30),
        unplug_timeout_ms: DEFAULT_UNPLUG_TIMEOUT_MS,
    }
}

fn check_config(cfg: &HotplugConfig, boot_vcpus: u8, ram_top: u64) -> Result<(), String> {
    let room = u32::from(layout::MAX_VCPUS.saturating_sub(boot_vcpus));
    if cfg.cpu_cores > room.min(hp::MAX_CORES) {
        return Err(format!(
            "{} hot-pluggable cores with {boot_vcpus} boot vCPUs (at most {})",
            cfg.cpu_cores,
            room.min(hp::MAX_CORES)
        ));
    }
    if cfg.mem_blocks > hp::MAX_BLOCKS {
        return Err(format!(
            "{} memory blocks (at most {})",
            cfg.mem_blocks,
            hp::MAX_BLOCKS
        ));
    }
    if u32::from(cfg.pci_slots) * u32::from(PCI_FUNCTIONS) > hp::MAX_PCI_DEVFN {
        return Err(format!(
            "{} PCI slots (at most {})",
            cfg.pci_slots,
            hp::MAX_PCI_DEVFN / u32::from(PCI_FUNCTIONS)
        ));
    }
    if cfg.mem_blocks > 0 && (cfg.mem_base < ram_top || cfg.mem_base < layout::PCI_HOLE_END) {
        return Err(format!(
            "memory hotplug area at {:#x} overlaps guest RAM or lies below 4 GiB",
            cfg.mem_base
        ));
    }
    Ok(())
}

/// Identity page tables covering RAM and the memory-hotplug area, plus the VMM's hotplug
/// mailbox fields. `load_guest` rewrites the low part with the same values.
fn write_guest_tables(
    mem: &GuestMem,
    cfg: &HotplugConfig,
    ram_top: u64,
    core_vcpu_base: u8,
) -> Result<(), VmError> {
    let area_end = cfg.mem_base + u64::from(cfg.mem_blocks) * MEM_BLOCK_SIZE;
    let tables = longmode::identity_page_tables(ram_top.max(area_end)).ok_or_else(|| {
        device_err(format!(
            "the memory hotplug area ends at {area_end:#x}, beyond what the guest page tables map"
        ))
    })?;
    for (gpa, entry) in tables {
        mem.write_obj(entry, GuestAddress(gpa))?;
    }
    Mailbox::write_field(mem, hp::MEM_BASE, cfg.mem_base)?;
    Mailbox::write_field(mem, hp::CORE_VCPU_BASE, u64::from(core_vcpu_base))?;
    Ok(())
}

impl VmHotplug {
    /// Creates the manager (default shape), the irqfd and the bus devices.
    pub(super) fn new(
        fd: &Arc<VmFd>,
        config: &VmConfig,
        io_bus: &Bus,
        ram: &GuestRam,
    ) -> Result<VmHotplug, VmError> {
        let cfg = default_hotplug_config(config, ram.top());
        check_config(&cfg, config.vcpus, ram.top()).map_err(device_err)?;
        let mgr = HotplugManager::new(cfg.clone(), config.machine)
            .map_err(|e| device_err(e.to_string()))?;
        let mgr = Arc::new(Mutex::new(mgr));
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Device("hotplug", e))?;
        fd.register_irqfd(&irq, u32::from(HOTPLUG_IRQ))
            .map_err(kvm_op("KVM_IRQFD"))?;
        let shared = Arc::new(Shared {
            irq,
            pending: Mutex::new(Pending::default()),
            waker: Arc::new((Mutex::new(false), Condvar::new())),
        });
        io_bus.insert(
            CONTROLLER_BASE.into(),
            CONTROLLER_LEN.into(),
            Arc::new(Mutex::new(ControllerDev {
                mgr: mgr.clone(),
                shared: shared.clone(),
            })),
        )?;
        io_bus.insert(
            HOTPLUG_PARK_PORT.into(),
            4,
            Arc::new(Mutex::new(ParkDev {
                shared: shared.clone(),
            })),
        )?;
        let pci = Arc::new(Mutex::new(PciFunctions::new()));
        io_bus.insert(PCI_IO_BASE.into(), PCI_IO_LEN.into(), pci.clone())?;
        let image = guest::assemble(layout::CODE_GPA)?;
        write_guest_tables(ram.mem(), &cfg, ram.top(), config.vcpus)?;
        Ok(VmHotplug {
            cores: BTreeMap::new(),
            blocks: BTreeMap::new(),
            mgr,
            pci,
            shared,
            fd: fd.clone(),
            core_vcpu_base: config.vcpus,
            core_entry: image.core_entry,
            clock: Arc::new(Mutex::new(Clock::default())),
        })
    }

    /// Asks every hot-added vCPU to park and waits (part of [`Vm::pause`]); stops the
    /// guest-running clock.
    pub(super) fn pause(&self, deadline: Instant) -> Result<(), VcpuError> {
        for c in self.cores.values() {
            c.vcpu.request_pause()?;
        }
        for c in self.cores.values() {
            c.vcpu.wait_parked(deadline)?;
        }
        let mut clk = lock(&self.clock);
        if let Some(t) = clk.since.take() {
            clk.acc += t.elapsed();
        }
        Ok(())
    }

    /// Lets the started hot-added vCPUs run (part of [`Vm::resume`]); starts the clock.
    pub(super) fn resume(&self) -> Result<(), VcpuError> {
        for c in self.cores.values() {
            if c.state == HotCoreState::Running {
                c.vcpu.resume()?;
            }
        }
        let mut clk = lock(&self.clock);
        if clk.since.is_none() {
            clk.since = Some(Instant::now());
        }
        Ok(())
    }

    /// Throttle handles of the hot-added vCPUs.
    pub(super) fn throttle_handles(&self) -> Vec<crate::vcpu::throttle::Sleeper> {
        self.cores
            .values()
            .map(|c| c.vcpu.throttle_handle())
            .collect()
    }

    /// Whether every hot-added vCPU is outside `KVM_RUN`.
    pub(super) fn all_parked(&self) -> bool {
        self.cores.values().all(|c| c.vcpu.is_parked())
    }
}

impl Vm {
    /// The hotplug manager (connectors, guest event queue, controller registers).
    pub fn hotplug(&self) -> &Arc<Mutex<HotplugManager>> {
        &self.hp.mgr
    }

    /// Signalled whenever [`Vm::process_hotplug`] has work (effects or events queued by the
    /// guest or by management calls).
    pub fn hotplug_waker(&self) -> HotplugWaker {
        self.hp.shared.waker.clone()
    }

    /// The hot-pluggable PCI functions.
    pub fn pci_functions(&self) -> &Arc<Mutex<PciFunctions>> {
        &self.hp.pci
    }

    /// State of PCI function `slot.function`, if present.
    pub fn pci_function(&self, slot: u8, function: u8) -> Option<PciFnState> {
        lock(&self.hp.pci).function((slot << 3) | function).cloned()
    }

    /// Replaces the hotplug shape (e.g. a shorter unplug timeout). Only before the guest
    /// ran (`prelaunch` / `inmigrate`) and with no device attached.
    pub fn configure_hotplug(&mut self, cfg: HotplugConfig) -> Result<(), VmError> {
        let state = self.run_state();
        if !matches!(state, RunState::Prelaunch | RunState::InMigrate) {
            return Err(VmError::WrongState {
                op: "change the hotplug configuration",
                state,
            });
        }
        check_config(&cfg, self.config.vcpus, self.ram.top()).map_err(device_err)?;
        let mut m = lock(&self.hp.mgr);
        if m.connectors().any(|c| c.device().is_some()) {
            return Err(device_err(
                "cannot change the hotplug configuration with devices attached",
            ));
        }
        let new = HotplugManager::new(cfg.clone(), self.config.machine)
            .map_err(|e| device_err(e.to_string()))?;
        write_guest_tables(self.ram.mem(), &cfg, self.ram.top(), self.hp.core_vcpu_base)?;
        *m = new;
        Ok(())
    }

    /// `device_add` of a hotplug device (`ferry-cpu-core`, `ferry-mem-block`,
    /// `ferry-pci-fn`): checks it, creates its resource (parked vCPU, mapped block, present
    /// PCI function), attaches it and tells the guest (interrupt). Nothing changes on error.
    pub fn hotplug_add(
        &mut self,
        driver: &str,
        id: &str,
        props: &DeviceProps,
        phase: RunPhase,
    ) -> Result<(), HotplugError> {
        let mgr = self.hp.mgr.clone();
        let mut m = lock(&mgr);
        let spec = m.check_device_add(driver, id, props)?;
        // Finish earlier teardowns first (a re-add must not meet its own TearDown later).
        m.tick(self.hotplug_clock_ms());
        self.hp.shared.pump(&mut m);
        self.apply_queued_effects();
        let mem_base = m.config().mem_base;
        self.prepare_resource(&spec, mem_base).map_err(|e| {
            tracing::error!(id, error = %e, "cannot create a hotplug resource");
            HotplugError::InvalidConfig(format!(
                "cannot create the resources of '{id}': {}",
                error_chain(&e)
            ))
        })?;
        m.device_add(driver, id, props, phase)?;
        self.hp.shared.pump(&mut m);
        Ok(())
    }

    /// `device_del`: asks the guest to release the device (interrupt); `now_ms` is the
    /// guest-running clock ([`Vm::hotplug_clock_ms`]).
    pub fn hotplug_del(&mut self, id: &str, now_ms: u64) -> Result<(), HotplugError> {
        let mut m = lock(&self.hp.mgr);
        m.device_del(id, now_ms)?;
        self.hp.shared.pump(&mut m);
        Ok(())
    }

    /// Earliest pending unplug deadline (guest-running ms): call
    /// [`Vm::process_hotplug`] then.
    pub fn hotplug_next_deadline(&self) -> Option<u64> {
        lock(&self.hp.mgr).next_deadline()
    }

    /// Guest-running milliseconds (advances only between [`Vm::resume`] and [`Vm::pause`]).
    pub fn hotplug_clock_ms(&self) -> u64 {
        GuestClock(self.hp.clock.clone()).now_ms()
    }

    /// A handle on the guest-running clock usable without the VM.
    pub fn guest_clock(&self) -> GuestClock {
        GuestClock(self.hp.clock.clone())
    }

    /// Ticks the unplug timers at `now_ms`, applies every queued effect and returns the
    /// management events (oldest first). Call it when the [`Vm::hotplug_waker`] fires and
    /// at [`Vm::hotplug_next_deadline`]. Failures applying an effect are logged.
    pub fn process_hotplug(&mut self, now_ms: u64) -> Vec<Event> {
        {
            let mut m = lock(&self.hp.mgr);
            m.tick(now_ms);
            self.hp.shared.pump(&mut m);
        }
        self.apply_queued()
    }

    /// Applies the effects queued so far (start a configured core, tear down a released
    /// device) without ticking the unplug timers; events stay queued for
    /// [`Vm::process_hotplug`]. Migration calls it before the handshake and again at
    /// stop-and-copy, so what it saves is what the guest sees.
    pub fn apply_pending_hotplug(&mut self) {
        {
            let mut m = lock(&self.hp.mgr);
            self.hp.shared.pump(&mut m);
        }
        self.apply_queued_effects();
    }

    /// Sets how the test guest answers unplug requests (mailbox `hp_mode`).
    pub fn set_guest_hotplug_mode(&self, mode: GuestHotplugMode) -> Result<(), VmError> {
        Mailbox::write_field(self.ram.mem(), hp::MODE, mode.wire())?;
        Ok(())
    }

    /// Lets a `slow` guest answer the unplug requests it holds back (mailbox `hp_answer`),
    /// and interrupts it so an idle guest wakes up.
    pub fn guest_answer_unplugs(&self) -> Result<(), VmError> {
        Mailbox::write_field(self.ram.mem(), hp::ANSWER, 1)?;
        self.hp.shared.raise_irq();
        Ok(())
    }

    /// Reads the hotplug part of the mailbox.
    pub fn hotplug_mailbox(&self) -> Result<HotplugMailbox, VmError> {
        Ok(HotplugMailbox::read(self.ram.mem())?)
    }

    /// Resets every connector (Precise rule 5; before the first `cont` of a prelaunch VM,
    /// and on the destination after the pre-start adds and before the stream is loaded),
    /// applies the resulting teardowns, and makes the coldplugged devices usable: their
    /// cores start with the VM (at the core entry), and their bits are set in the guest's
    /// `hp_cores` / `hp_blocks` / `hp_pci` (a coldplugged PCI function's SCRATCH is not
    /// written: the guest only writes it when it configures the function). Returns the
    /// management events of released devices.
    pub fn hotplug_reset(&mut self) -> Result<Vec<Event>, VmError> {
        let present: Vec<Resource> = {
            let mut m = lock(&self.hp.mgr);
            m.reset_all();
            self.hp.shared.pump(&mut m);
            m.connectors()
                .filter(|c| c.device().is_some())
                .filter_map(|c| m.resource(c.index()))
                .collect()
        };
        let events = self.apply_queued();
        let mem = self.ram.mem();
        let mut bits = [0u64; 3];
        for r in &present {
            match *r {
                Resource::CpuCore { core } if core < hp::MAX_CORES => {
                    let base = hp::CORE_AREA + u64::from(core) * hp::CORE_STRIDE;
                    for off in [hp::CORE_COUNTER, hp::CORE_STOP, hp::CORE_STATE] {
                        Mailbox::write_field(mem, base + off, 0)?;
                    }
                    bits[0] |= 1 << core;
                }
                Resource::MemBlock { slot, .. } if slot < hp::MAX_BLOCKS => {
                    let base = hp::BLOCK_AREA + u64::from(slot) * hp::BLOCK_STRIDE;
                    Mailbox::write_field(mem, base + hp::BLOCK_PROGRESS, 0)?;
                    Mailbox::write_field(mem, base + hp::BLOCK_PASSES, 0)?;
                    bits[1] |= 1 << slot;
                }
                Resource::PciFn { slot, function } => {
                    let devfn = u32::from((slot << 3) | function);
                    if devfn < hp::MAX_PCI_DEVFN {
                        bits[2] |= 1 << devfn;
                    }
                }
                _ => {}
            }
        }
        Mailbox::write_field(mem, hp::CORES, bits[0])?;
        Mailbox::write_field(mem, hp::BLOCKS, bits[1])?;
        Mailbox::write_field(mem, hp::PCI, bits[2])?;
        for r in present {
            if let Resource::CpuCore { core } = r {
                self.start_core(core)?;
            }
        }
        Ok(events)
    }

    /// Sections of the hot-plugged devices' own state (`ferry-pci-fn`, instance = devfn,
    /// one per present function), encoded for machine type `m`.
    pub fn hotplug_device_sections(&self, m: &MachineType) -> Vec<Vec<u8>> {
        lock(&self.hp.pci)
            .states()
            .into_iter()
            .filter_map(|mut s| {
                let devfn = u32::from(s.devfn);
                devstate::encode_section(&mut s, devfn, m, devstate::Tag::Section)
            })
            .collect()
    }

    /// Loads one incoming section if it is a hot-plugged device's (`Ok(false)` otherwise).
    /// The device must have been added (pre-start `device_add`) first.
    pub fn load_hotplug_device_section(&mut self, raw: &RawSection) -> Result<bool, VmError> {
        if raw.name != PciFnState::NAME {
            return Ok(false);
        }
        let s: PciFnState = raw.load()?;
        if u32::from(s.devfn) != raw.instance {
            return Err(VmError::ShapeMismatch(format!(
                "section '{}' instance {} at offset {} holds devfn {}",
                raw.name, raw.instance, raw.offset, s.devfn
            )));
        }
        lock(&self.hp.pci).restore(&s).map_err(|why| {
            VmError::ShapeMismatch(format!(
                "section '{}' instance {} at offset {}: {why}",
                raw.name, raw.instance, raw.offset
            ))
        })?;
        Ok(true)
    }

    /// Applies every queued effect and park request; returns the events queued with them
    /// (taken together, so an event is never returned before its effect was applied).
    fn apply_queued(&mut self) -> Vec<Event> {
        let Pending {
            effects,
            events,
            parks,
        } = std::mem::take(&mut *lock(&self.hp.shared.pending));
        for core in parks {
            if let Err(e) = self.park_core(core) {
                tracing::error!(core, error = %error_chain(&e), "cannot park a hot-added core");
            }
        }
        for e in effects {
            tracing::debug!(effect = ?e, "hotplug effect");
            if let Err(err) = self.apply_effect(&e) {
                tracing::error!(effect = ?e, error = %error_chain(&err), "hotplug effect failed");
            }
        }
        events
    }

    /// [`Self::apply_queued`], keeping the events for the next [`Vm::process_hotplug`].
    fn apply_queued_effects(&mut self) {
        let events = self.apply_queued();
        if !events.is_empty() {
            let mut p = lock(&self.hp.shared.pending);
            p.events.splice(0..0, events);
        }
    }

    fn prepare_resource(&mut self, spec: &DeviceSpec, mem_base: u64) -> Result<(), VmError> {
        match *spec {
            DeviceSpec::CpuCore { core_id } => self.ensure_core(core_id),
            DeviceSpec::MemBlock { slot } => self.ensure_block(
                slot,
                mem_base + u64::from(slot) * MEM_BLOCK_SIZE,
                MEM_BLOCK_SIZE,
            ),
            DeviceSpec::PciFn {
                slot,
                function,
                multifunction,
            } => {
                lock(&self.hp.pci).enable((slot << 3) | function, multifunction);
                Ok(())
            }
        }
    }

    fn apply_effect(&mut self, e: &Effect) -> Result<(), VmError> {
        match *e {
            Effect::CreateVcpu { core, .. } => self.ensure_core(core),
            Effect::MapMemoryBlock {
                slot, gpa, size, ..
            } => self.ensure_block(slot, gpa, size),
            Effect::EnablePciFunction {
                slot,
                function,
                multifunction,
                ..
            } => {
                lock(&self.hp.pci).enable((slot << 3) | function, multifunction);
                Ok(())
            }
            Effect::Configured {
                resource: Resource::CpuCore { core },
                ..
            } => self.start_core(core),
            Effect::Configured { .. } => Ok(()),
            Effect::TearDown { ref resource, .. } => match *resource {
                Resource::CpuCore { core } => self.park_core(core),
                Resource::MemBlock { slot, .. } => self.unmap_block(slot),
                Resource::PciFn { slot, function } => {
                    lock(&self.hp.pci).disable((slot << 3) | function);
                    Ok(())
                }
            },
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
