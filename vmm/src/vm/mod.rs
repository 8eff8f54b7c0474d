//! The VM: KVM VM fd, in-kernel irqchip and PIT, guest RAM, devices and vCPUs; run-state
//! changes (start, pause, resume); dirty logging; whole-machine save and restore.
//!
//! - [`memory`]: guest RAM, KVM slots, dirty log.
//! - [`persist`]: the plain VM-level state and [`VmState`].

pub mod hotplug;
pub mod memory;
pub mod persist;
pub mod postcopy;
pub mod prefault;
pub mod ram_view;
pub mod uffd;

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devstate::{RawSection, Section};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use machine_types::cpu::CpuidLeaf;
use machine_types::{CpuModel, MachineType};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::{ConfigError, GuestSpec, VmConfig};
use crate::devices::persist::{ProgressState, UartState};
use crate::devices::progress::{PROGRESS_BASE, PROGRESS_LEN, WaitError};
use crate::devices::uart::{COM1_BASE, COM1_GSI, COM1_LEN, SerialOut};
use crate::devices::{Bus, BusError, ProgressDevice, ProgressMonitor, Uart};
use crate::guest::{self, GuestError, Mailbox, PatternError, layout};
use crate::runstate::RunState;
use crate::vcpu::persist::VcpuState;
use crate::vcpu::throttle::Throttle;
use crate::vcpu::{PAUSE_TIMEOUT, RunContext, Vcpu, VcpuError, cpuid, longmode};
pub use memory::{DirtyBitmap, GuestMem, GuestRam, MemoryError};
pub use persist::{ClockState, IrqchipState, PitState, VmState, catalog, full_catalog};

/// Guest-physical address of the TSS pages KVM needs on Intel (inside the PCI hole).
pub const TSS_ADDRESS: u64 = 0xfffb_d000;
/// Guest-physical address of KVM's identity-map page (inside the PCI hole).
pub const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors of the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// Bad machine shape or guest.
    #[error("Invalid configuration")]
    Config(#[from] ConfigError),
    /// `/dev/kvm` cannot be opened.
    #[error("/dev/kvm is not available")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// No userfaultfd for post-copy.
    #[error("Cannot open a userfaultfd for post-copy")]
    Userfault(#[source] io::Error),
    /// The CPU throttle thread could not start.
    #[error("Cannot start the CPU throttle")]
    Throttle(#[source] io::Error),
    /// A VM-level KVM call failed.
    #[error("{op} failed")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM setup or tracking failed.
    #[error("Guest RAM error")]
    Memory(#[from] MemoryError),
    /// Guest RAM access failed.
    #[error("Cannot access guest RAM")]
    GuestMemory(#[from] GuestMemoryError),
    /// A vCPU failed.
    #[error("vCPU error")]
    Vcpu(#[from] VcpuError),
    /// The test guest could not be built.
    #[error("Cannot build the test guest")]
    Guest(#[from] GuestError),
    /// Device registration failed.
    #[error("Cannot register a device")]
    Bus(#[from] BusError),
    /// Device setup or restore failed.
    #[error("Device {0} failed")]
    Device(&'static str, #[source] io::Error),
    /// The operation is not valid in the current run state.
    #[error("Cannot {op} while the VM is {state}")]
    WrongState {
        /// What was attempted.
        op: &'static str,
        /// Current state.
        state: RunState,
    },
    /// State capture with running vCPUs.
    #[error("vCPUs are running; pause the VM before capturing its state")]
    NotPaused,
    /// A saved state of another shape.
    #[error("Saved state does not fit this VM: {0}")]
    ShapeMismatch(String),
    /// A device-state section could not be decoded (names the section and the offset).
    #[error("Cannot decode device state")]
    Decode(#[from] devstate::DecodeError),
    /// Waiting for the guest failed.
    #[error("Guest made no progress")]
    Wait(#[from] WaitError),
    /// The guest memory pattern is broken.
    #[error("Guest memory pattern is broken")]
    Pattern(#[from] PatternError),
    /// A boot-sector guest could not be loaded.
    #[error("Cannot load the boot-sector guest")]
    Bootsector(#[from] guest::bootsector::BootsectorError),
    /// The guest is not Ferry's test guest (e.g. a boot sector): it has no mailbox, so its
    /// progress and memory pattern cannot be queried.
    #[error(
        "The guest has no Ferry test-guest mailbox (magic {0:#x}; a boot-sector or foreign guest): mailbox queries and memory-pattern checks only apply to the built-in test guest"
    )]
    NoMailbox(u64),
    /// This host cannot run the CPU model or the saved vCPU state (names what it lacks).
    #[error("{0}")]
    HostLacks(String),
}

fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// A KVM virtual machine.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: the throttle and the vCPU threads stop before the VM fd
    // and RAM go away.
    throttle: Mutex<Option<Throttle>>,
    vcpus: Vec<Vcpu>,
    /// A post-copy whose link broke: its registration (a missing page must never read as
    /// zero) and what `migrate-recover` needs.
    postcopy_paused: Mutex<Option<migration::postcopy::Paused>>,
    hp: hotplug::VmHotplug,
    config: VmConfig,
    fd: Arc<VmFd>,
    ram: GuestRam,
    kvm: Kvm,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    uart: Arc<Mutex<Uart>>,
    progress: Arc<ProgressMonitor>,
    msrs: Vec<u32>,
    /// KVM's supported CPUID, less `--x-hide-host-features`.
    host_cpuid: Vec<CpuidLeaf>,
    /// MSRs KVM lists for this host.
    host_msrs: Vec<u32>,
    /// The CPUID every vCPU starts from (APIC id aside).
    base_cpuid: CpuId,
    run_state: Arc<Mutex<RunState>>,
    guest: Option<GuestSpec>,
}

impl Vm {
    /// Creates a VM of `config`'s shape, guest serial output discarded. The vCPUs exist and
    /// are parked; the VM is in `prelaunch`.
    pub fn new(config: &VmConfig) -> Result<Vm, VmError> {
        Vm::with_serial(config, Box::new(io::sink()))
    }

    /// Like [`Vm::new`], guest serial output going to `serial`.
    pub fn with_serial(config: &VmConfig, serial: SerialOut) -> Result<Vm, VmError> {
        config.validate()?;
        let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
        let fd = Arc::new(kvm.create_vm().map_err(kvm_op("KVM_CREATE_VM"))?);
        fd.set_tss_address(TSS_ADDRESS as usize)
            .map_err(kvm_op("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(kvm_op("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_op("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_op("KVM_CREATE_PIT2"))?;

        let ram = GuestRam::new(config.memory_size)?;
        ram.register(&fd)?;

        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Device("uart", e))?;
        fd.register_irqfd(&irq, COM1_GSI)
            .map_err(kvm_op("KVM_IRQFD"))?;
        let uart = Arc::new(Mutex::new(Uart::new(irq, serial)));
        io_bus.insert(COM1_BASE.into(), COM1_LEN.into(), uart.clone())?;
        let progress = Arc::new(ProgressMonitor::default());
        io_bus.insert(
            PROGRESS_BASE.into(),
            PROGRESS_LEN.into(),
            Arc::new(Mutex::new(ProgressDevice::new(progress.clone()))),
        )?;

        let hp = hotplug::VmHotplug::new(&fd, config, &io_bus, &ram)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?;
        // Legacy models mask KVM's own list (their guest ABI); checks use what the host runs.
        let mut kvm_cpuid = cpuid::leaves_from_kvm(&supported);
        machine_types::cpu::hide_features(&mut kvm_cpuid, &config.hidden_host_features);
        let (mut host_cpuid, host_msrs) =
            cpuid::host_support_of(&kvm).map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?;
        machine_types::cpu::hide_features(&mut host_cpuid, &config.hidden_host_features);
        let cpu_model = config.cpu_model();
        let base_cpuid = cpuid::base_cpuid(cpu_model, &kvm_cpuid)
            .map_err(|e| VmError::Vcpu(VcpuError::Fam("CPUID", e)))?;
        let run_state = Arc::new(Mutex::new(RunState::Prelaunch));
        let ctx = RunContext {
            io_bus: io_bus.clone(),
            mmio_bus: mmio_bus.clone(),
            run_state: run_state.clone(),
        };
        let mut vcpus = Vec::with_capacity(config.vcpus.into());
        for index in 0..config.vcpus {
            let mut c = base_cpuid.clone();
            cpuid::set_apic_id(c.as_mut_slice(), index);
            vcpus.push(Vcpu::new(&fd, index, &c)?);
        }
        let msrs = vcpus[0].probe_msrs(&kvm, cpu_model.msrs(), !cpu_model.is_fixed())?;
        for v in &mut vcpus {
            v.spawn(ctx.clone())?;
        }
        tracing::info!(
            memory = config.memory_size,
            vcpus = config.vcpus,
            machine = %config.machine,
            cpu_model = cpu_model.name(),
            msrs = msrs.len(),
            "VM created"
        );
        Ok(Vm {
            throttle: Mutex::new(None),
            postcopy_paused: Mutex::new(None),
            vcpus,
            hp,
            config: config.clone(),
            fd,
            ram,
            kvm,
            io_bus,
            mmio_bus,
            uart,
            progress,
            msrs,
            host_cpuid,
            host_msrs,
            base_cpuid,
            run_state,
            guest: None,
        })
    }

    /// The machine shape.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The machine type.
    pub fn machine(&self) -> &'static MachineType {
        self.config.machine
    }

    /// The CPU model the vCPUs were given (`--cpu` or the machine type's default).
    pub fn cpu_model(&self) -> CpuModel {
        self.config.cpu_model()
    }

    /// What this host lacks to run CPU model `model`, in words (empty when it can run it).
    pub fn host_lacks(&self, model: CpuModel) -> Vec<String> {
        model.host_lacks(&self.host_cpuid, &self.host_msrs)
    }

    /// Refuses, naming every missing feature, a CPU model this host cannot run: `who` is
    /// "this host" on a source, "destination host" on a destination.
    pub fn check_host_runs(&self, model: CpuModel, who: &str) -> Result<(), VmError> {
        let lacks = self.host_lacks(model);
        if lacks.is_empty() {
            Ok(())
        } else {
            Err(VmError::HostLacks(format!(
                "{who} lacks {}, required by CPU model '{}'",
                lacks.join(", "),
                model.name()
            )))
        }
    }

    /// What this host cannot run of a stream's vCPU state: CPUID features it lacks, XSAVE
    /// components beyond what it supports, MSRs it does not have.
    pub fn vcpu_state_refusals(&self, v: &VcpuState) -> Vec<String> {
        let mut out = Vec::new();
        let leaves: Vec<CpuidLeaf> = v.cpuid.iter().map(|e| e.to_leaf()).collect();
        out.extend(machine_types::cpu::missing_features(
            &leaves,
            &self.host_cpuid,
        ));
        let host_xcr0 = machine_types::cpu::host_xcr0(&self.host_cpuid);
        let xcr0 = v
            .xcrs
            .xcrs
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(0, |x| x.value);
        let bv = v
            .xsave
            .get(machine_types::cpu::xsave::XSTATE_BV)
            .map_or(0, |&w| u64::from(w));
        let model_xcr0 = CpuModel::by_name(&v.cpu_model).map_or(u64::MAX, |m| m.xcr0_mask());
        let used = (xcr0 | (bv & model_xcr0)) & !host_xcr0;
        out.extend(
            machine_types::cpu::xcr0_names(used)
                .into_iter()
                .map(|n| format!("XSAVE component {n}")),
        );
        for m in &v.msrs {
            if !self.host_msrs.contains(&m.index) {
                out.push(machine_types::cpu::msr_name(m.index));
            }
        }
        out
    }

    /// The CPUID a new vCPU with APIC id `index` gets.
    pub(crate) fn vcpu_cpuid(&self, index: u8) -> CpuId {
        let mut c = self.base_cpuid.clone();
        cpuid::set_apic_id(c.as_mut_slice(), index);
        c
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM for `Bytes` access.
    pub fn memory(&self) -> &GuestMem {
        self.ram.mem()
    }

    /// The port-I/O bus (for adding devices).
    pub fn io_bus(&self) -> &Arc<Bus> {
        &self.io_bus
    }

    /// The MMIO bus (for adding devices).
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// MSRs captured per vCPU.
    pub fn msr_list(&self) -> &[u32] {
        &self.msrs
    }

    /// The guest-progress counters.
    pub fn progress(&self) -> &Arc<ProgressMonitor> {
        &self.progress
    }

    /// The guest loaded by [`Vm::load_guest`], if any.
    pub fn guest(&self) -> Option<GuestSpec> {
        self.guest
    }

    fn state_lock(&self) -> MutexGuard<'_, RunState> {
        self.run_state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current run state.
    pub fn run_state(&self) -> RunState {
        *self.state_lock()
    }

    /// Sets the run state without touching the vCPUs (migration uses this for `inmigrate`,
    /// `finish-migrate`, `postmigrate`). Use [`Vm::pause`]/[`Vm::resume`] to stop and start.
    pub fn set_run_state(&self, state: RunState) {
        *self.state_lock() = state;
    }

    /// Writes the test guest into RAM (code, GDT, IDT, page tables, mailbox) and puts every
    /// vCPU at its entry in long mode. Only in `prelaunch`.
    pub fn load_guest(&mut self, spec: &GuestSpec) -> Result<(), VmError> {
        let state = self.run_state();
        if state != RunState::Prelaunch {
            return Err(VmError::WrongState {
                op: "load a guest",
                state,
            });
        }
        self.config.validate_for(spec)?;
        let mem = self.ram.mem();
        if let GuestSpec::Bootsector { path } = *spec {
            let image = guest::bootsector::read_image(std::path::Path::new(path))?;
            mem.write_slice(&image, GuestAddress(guest::bootsector::LOAD_GPA))?;
            // vCPU 0 starts as a BIOS would leave it; the others wait for INIT/SIPI.
            self.vcpus[0].configure_real_mode(guest::bootsector::LOAD_GPA as u16)?;
            self.guest = Some(*spec);
            tracing::info!(guest = %spec, "boot-sector guest loaded");
            return Ok(());
        }
        let image = guest::assemble(layout::CODE_GPA)?;
        mem.write_slice(&image.code, GuestAddress(layout::CODE_GPA))?;
        for (i, e) in longmode::gdt().iter().enumerate() {
            mem.write_obj(*e, GuestAddress(layout::GDT_GPA + i as u64 * 8))?;
        }
        mem.write_slice(
            &guest::asm::build_idt(&image.vectors),
            GuestAddress(layout::IDT_GPA),
        )?;
        let tables =
            longmode::identity_page_tables(self.ram.top()).ok_or(ConfigError::TooMuchMemory {
                size: self.config.memory_size,
                max: crate::config::MAX_MEMORY,
            })?;
        for (gpa, entry) in tables {
            mem.write_obj(entry, GuestAddress(gpa))?;
        }
        let mailbox = match *spec {
            GuestSpec::Dirty {
                working_set,
                delay_loops,
            } => Mailbox::dirty(
                layout::WORKING_SET_GPA,
                working_set / guest::PAGE_SIZE,
                delay_loops,
            ),
            // Boot sectors returned above.
            GuestSpec::Idle | GuestSpec::Bootsector { .. } => Mailbox::idle(),
        };
        mailbox.write(mem)?;
        for v in &self.vcpus {
            let entry = if v.index() == 0 {
                image.entry
            } else {
                image.ap_entry
            };
            v.configure_boot(entry)?;
        }
        self.guest = Some(*spec);
        tracing::info!(guest = %spec, code_bytes = image.code.len(), "test guest loaded");
        Ok(())
    }

    /// Stops every vCPU outside `KVM_RUN`; returns once all have acknowledged. From
    /// `running` the VM becomes `paused`; in other states the vCPUs are already parked
    /// and nothing changes.
    pub fn pause(&self) -> Result<(), VmError> {
        let mut state = self.state_lock();
        for v in &self.vcpus {
            v.request_pause()?;
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        for v in &self.vcpus {
            v.wait_parked(deadline)?;
        }
        self.hp.pause(deadline)?;
        if *state == RunState::Running {
            *state = RunState::Paused;
            tracing::debug!("VM paused");
        }
        Ok(())
    }

    /// Pauses after post-copy lost its link. A vCPU waiting inside `KVM_RUN` for a page that
    /// cannot come does not see its kick until the page is placed (the wait is not
    /// interruptible), then parks before running guest code: such vCPUs are returned, the
    /// others are parked, and the VM is `paused`.
    pub fn pause_postcopy(&self) -> Vec<u8> {
        let mut state = self.state_lock();
        for v in &self.vcpus {
            let _ = v.request_pause();
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        let waiting = self
            .vcpus
            .iter()
            .filter(|v| v.wait_parked(deadline).is_err())
            .map(Vcpu::index)
            .collect();
        let _ = self.hp.pause(deadline);
        if *state == RunState::Running {
            *state = RunState::Paused;
        }
        waiting
    }

    /// Lets every vCPU run; the VM becomes `running`. Refused after shutdown.
    pub fn resume(&self) -> Result<(), VmError> {
        let mut state = self.state_lock();
        if *state == RunState::Shutdown {
            return Err(VmError::WrongState {
                op: "resume",
                state: *state,
            });
        }
        // From now on the guest may write any page behind the VMM's back.
        self.ram.mark_used();
        for v in &self.vcpus {
            v.resume()?;
        }
        self.hp.resume()?;
        *state = RunState::Running;
        tracing::debug!("VM running");
        Ok(())
    }

    /// Throttles every vCPU, hot-added ones included, to `100 - percent` percent of its run
    /// time (auto-converge); 0 ends throttling.
    pub fn set_throttle(&self, percent: u8) -> Result<(), VmError> {
        let mut t = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
        match (t.as_ref(), percent) {
            (_, 0) => *t = None,
            (Some(t), p) => t.set(p),
            (None, p) => {
                let vcpus = self
                    .vcpus
                    .iter()
                    .map(Vcpu::throttle_handle)
                    .chain(self.hp.throttle_handles())
                    .collect();
                *t = Some(Throttle::start(vcpus, p).map_err(VmError::Throttle)?);
            }
        }
        Ok(())
    }

    /// Guest RAM for an incoming post-copy.
    pub fn postcopy_ram(&self) -> Result<std::sync::Arc<postcopy::UffdRam>, VmError> {
        Ok(std::sync::Arc::new(
            postcopy::UffdRam::new(&ram_view::RamView::new(self)).map_err(VmError::Userfault)?,
        ))
    }

    /// Keeps a paused post-copy (its registration and missing pages) until a recovery.
    pub fn keep_postcopy_paused(&self, state: migration::postcopy::Paused) {
        *self
            .postcopy_paused
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(state);
    }

    /// The paused post-copy, for `migrate-recover` (it gives it back if that fails).
    pub fn postcopy_paused(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<migration::postcopy::Paused>> {
        self.postcopy_paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The throttle percentage now (0: not throttled).
    pub fn throttle_percent(&self) -> u8 {
        let t = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
        t.as_ref().map_or(0, Throttle::percent)
    }

    /// Time the boot vCPUs have spent asleep for the throttle, summed.
    pub fn throttled(&self) -> Duration {
        self.vcpus.iter().map(Vcpu::throttled).sum()
    }

    /// Whether every vCPU is parked outside `KVM_RUN`.
    pub fn all_parked(&self) -> bool {
        self.vcpus.iter().all(Vcpu::is_parked) && self.hp.all_parked()
    }

    /// Reads the test guest's mailbox; [`VmError::NoMailbox`] when the guest has none (a
    /// boot-sector guest, or a destination whose stream carried one).
    pub fn mailbox(&self) -> Result<Mailbox, VmError> {
        let mb = Mailbox::read(self.ram.mem())?;
        if mb.magic != guest::mailbox::MAGIC {
            return Err(VmError::NoMailbox(mb.magic));
        }
        Ok(mb)
    }

    /// Changes the dirtying guest's delay loop (takes effect at the next page).
    pub fn set_guest_delay(&self, delay_loops: u64) -> Result<(), VmError> {
        Mailbox::write_field(
            self.ram.mem(),
            guest::mailbox::offset::DELAY_LOOPS,
            delay_loops,
        )?;
        Ok(())
    }

    /// Sets the mailbox `flags` (e.g. [`guest::mailbox::FLAG_GO_IDLE`]).
    pub fn set_guest_flags(&self, flags: u64) -> Result<(), VmError> {
        Mailbox::write_field(self.ram.mem(), guest::mailbox::offset::FLAGS, flags)?;
        Ok(())
    }

    /// Checks the dirtying guest's memory pattern; the vCPUs must be paused.
    pub fn verify_guest_pattern(&self) -> Result<(), VmError> {
        if !self.all_parked() {
            return Err(VmError::NotPaused);
        }
        let mb = self.mailbox()?;
        guest::verify_pattern(self.ram.mem(), &mb)?;
        Ok(())
    }

    /// Blocks until the guest reports pass `pass` on the progress port, or `timeout`.
    pub fn wait_for_pass(&self, pass: u32, timeout: Duration) -> Result<u32, VmError> {
        Ok(self.progress.wait_for_pass(pass, timeout)?)
    }

    /// Enables or disables dirty logging of every memory slot (enabling clears the logs).
    pub fn set_dirty_log(&self, enable: bool) -> Result<(), VmError> {
        Ok(self.ram.set_dirty_log_all(&self.fd, enable)?)
    }

    /// Enables or disables dirty logging of one memory slot.
    pub fn set_slot_dirty_log(&self, slot: u32, enable: bool) -> Result<(), VmError> {
        Ok(self.ram.set_dirty_log(&self.fd, slot, enable)?)
    }

    /// Pages dirtied since the last call: KVM's log OR the VMM bitmap, per slot.
    pub fn dirty_pages(&self) -> Result<Vec<DirtyBitmap>, VmError> {
        Ok(self.ram.dirty_pages(&self.fd)?)
    }

    /// Captures the whole machine except RAM. Every vCPU must be parked (pause first).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        if !self.all_parked() {
            return Err(VmError::NotPaused);
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let mut s = v.save_state(&self.msrs)?;
            s.cpu_model = self.cpu_model().name().to_owned();
            vcpus.push(s);
        }
        let (pic_master, pic_slave, ioapic) =
            persist::save_irqchip(&self.fd).map_err(kvm_op("KVM_GET_IRQCHIP"))?;
        let pit = self.fd.get_pit2().map_err(kvm_op("KVM_GET_PIT2"))?;
        let clock = self.fd.get_clock().map_err(kvm_op("KVM_GET_CLOCK"))?;
        let uart = self.uart.lock().unwrap_or_else(|e| e.into_inner()).save();
        Ok(VmState {
            memory_size: self.config.memory_size,
            vcpus,
            pic_master,
            pic_slave,
            ioapic,
            pit: persist::PitState::from_kvm(&pit),
            clock: persist::ClockState::from_kvm(&clock),
            uart,
            progress: self.progress.snapshot(),
        })
    }

    /// Checks that `state` was captured from a VM of this shape.
    pub fn check_shape(&self, state: &VmState) -> Result<(), VmError> {
        let mut diffs = Vec::new();
        if state.vcpus.len() != self.vcpus.len() {
            diffs.push(format!(
                "vCPU count differs (state has {}, this VM has {})",
                state.vcpus.len(),
                self.vcpus.len()
            ));
        }
        if state.memory_size != self.config.memory_size {
            diffs.push(format!(
                "memory size differs (state has {} bytes, this VM has {} bytes)",
                state.memory_size, self.config.memory_size
            ));
        }
        for (i, v) in state.vcpus.iter().enumerate() {
            if v.index != i as u32 {
                diffs.push(format!("vCPU state {i} is for vCPU {}", v.index));
            }
        }
        let model = self.cpu_model();
        if let Some(v) = state.vcpus.first()
            && let Some(d) = cpuid::model_difference(&v.cpu_model, model)
        {
            diffs.push(d);
        }
        if let Some(v) = state.vcpus.first() {
            let lacks = self.vcpu_state_refusals(v);
            if !lacks.is_empty() {
                diffs.push(format!(
                    "this host lacks {}, required by the saved vCPU state (CPU model '{}')",
                    lacks.join(", "),
                    v.cpu_model
                ));
            }
        }
        for v in &state.vcpus {
            if v.cpu_model != state.vcpus[0].cpu_model {
                diffs.push(format!(
                    "vCPU {} has CPU model {}, vCPU 0 has {}",
                    v.index, v.cpu_model, state.vcpus[0].cpu_model
                ));
            }
            for x in v.xcrs.xcrs.iter().filter(|x| x.xcr == 0) {
                let extra = x.value & !model.xcr0_mask();
                if extra != 0 {
                    diffs.push(format!(
                        "vCPU {} has XCR0 {:#x}: {} not offered by {}",
                        v.index,
                        x.value,
                        cpuid::xcr0_features(extra).join(", "),
                        model.name()
                    ));
                }
            }
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(VmError::ShapeMismatch(diffs.join("; ")))
        }
    }

    /// Loads `state` into this VM, which must be freshly created (parked vCPUs, never run,
    /// same shape). RAM is not part of the state; load it separately. Leaves the VM `paused`.
    pub fn restore_state(&mut self, state: &VmState) -> Result<(), VmError> {
        self.check_shape(state)?;
        let run_state = self.run_state();
        if !matches!(
            run_state,
            RunState::Prelaunch | RunState::InMigrate | RunState::Paused
        ) {
            return Err(VmError::WrongState {
                op: "restore state",
                state: run_state,
            });
        }
        if !self.all_parked() {
            return Err(VmError::NotPaused);
        }
        self.fd
            .set_pit2(&state.pit.to_kvm())
            .map_err(kvm_op("KVM_SET_PIT2"))?;
        self.fd
            .set_clock(&state.clock.to_kvm())
            .map_err(kvm_op("KVM_SET_CLOCK"))?;
        persist::restore_irqchip(&self.fd, &state.pic_master, &state.pic_slave, &state.ioapic)
            .map_err(kvm_op("KVM_SET_IRQCHIP"))?;
        for (v, s) in self.vcpus.iter_mut().zip(&state.vcpus) {
            v.restore_state(s)?;
        }
        self.uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&state.uart)
            .map_err(|e| VmError::Device("uart", e))?;
        self.progress.restore(&state.progress);
        if self.guest.is_none() {
            // The restored guest is whatever the mailbox says; remember it for reporting.
            if let Ok(mb) = self.mailbox() {
                self.guest = Some(if mb.mode == guest::mailbox::MODE_DIRTY {
                    GuestSpec::Dirty {
                        working_set: mb.ws_pages * guest::PAGE_SIZE,
                        delay_loops: mb.delay_loops,
                    }
                } else {
                    GuestSpec::Idle
                });
            }
        }
        if run_state != RunState::InMigrate {
            self.set_run_state(RunState::Paused);
        }
        tracing::info!(vcpus = state.vcpus.len(), "VM state restored");
        Ok(())
    }

    /// The sections a stream for this VM must carry: `cpu` once per vCPU (instance = index),
    /// then the VM-level ones (instance 0).
    pub fn expected_sections(&self) -> Vec<(String, u32)> {
        (0..self.vcpus.len() as u32)
            .map(|i| (VcpuState::NAME.to_owned(), i))
            .chain(VM_SECTIONS.iter().map(|n| ((*n).to_owned(), 0)))
            .collect()
    }

    /// Captures every device section, encoded for machine type `m` with
    /// [`devstate::encode_section`]: one `cpu` per vCPU, then `irqchip`, `pit`, `kvmclock`,
    /// `uart`, `guest-progress`. The vCPUs must be parked (pause first).
    pub fn save_sections(&self, m: &MachineType) -> Result<Vec<Vec<u8>>, VmError> {
        let state = self.save_state()?;
        Ok(encode_state(state, m))
    }

    /// Loads device sections (as read from a stream) into this VM, which must be freshly
    /// created or incoming (parked vCPUs, never run). Every problem is found before anything
    /// is loaded and reported together: unknown or duplicate sections, a vCPU count or a CPU
    /// model that differs, a section that does not decode (with its name and offset).
    pub fn load_sections(&mut self, sections: &[RawSection]) -> Result<(), VmError> {
        let state = self.decode_sections(sections)?;
        self.restore_state(&state)
    }

    /// Decodes and checks `sections` against this VM without loading anything.
    pub fn decode_sections(&self, sections: &[RawSection]) -> Result<VmState, VmError> {
        let mut problems = Vec::new();
        let mut cpus: Vec<Option<VcpuState>> = vec![None; self.vcpus.len()];
        let mut extra_cpus = Vec::new();
        let mut irqchip: Option<IrqchipState> = None;
        let mut pit: Option<PitState> = None;
        let mut clock: Option<ClockState> = None;
        let mut uart: Option<UartState> = None;
        let mut progress: Option<ProgressState> = None;
        fn put<T>(slot: &mut Option<T>, v: T, s: &RawSection, problems: &mut Vec<String>) {
            if slot.replace(v).is_some() {
                problems.push(format!(
                    "duplicate section '{}' instance {} at offset {}",
                    s.name, s.instance, s.offset
                ));
            }
        }
        for s in sections {
            let singleton = |problems: &mut Vec<String>| {
                if s.instance != 0 {
                    problems.push(format!(
                        "section '{}' has instance {} at offset {}; this VM has only instance 0",
                        s.name, s.instance, s.offset
                    ));
                }
            };
            match s.name.as_str() {
                VcpuState::NAME => {
                    let v: VcpuState = s.load()?;
                    if v.index != s.instance {
                        problems.push(format!(
                            "section 'cpu' instance {} at offset {} holds vCPU {}",
                            s.instance, s.offset, v.index
                        ));
                    }
                    match cpus.get_mut(s.instance as usize) {
                        Some(slot) => put(slot, v, s, &mut problems),
                        None => extra_cpus.push(s.instance),
                    }
                }
                IrqchipState::NAME => {
                    singleton(&mut problems);
                    put(&mut irqchip, s.load()?, s, &mut problems);
                }
                PitState::NAME => {
                    singleton(&mut problems);
                    put(&mut pit, s.load()?, s, &mut problems);
                }
                ClockState::NAME => {
                    singleton(&mut problems);
                    put(&mut clock, s.load()?, s, &mut problems);
                }
                UartState::NAME => {
                    singleton(&mut problems);
                    put(&mut uart, s.load()?, s, &mut problems);
                }
                ProgressState::NAME => {
                    singleton(&mut problems);
                    put(&mut progress, s.load()?, s, &mut problems);
                }
                other => problems.push(format!(
                    "unknown section '{other}' instance {} at offset {}",
                    s.instance, s.offset
                )),
            }
        }
        let present = cpus.iter().filter(|c| c.is_some()).count() + extra_cpus.len();
        if present != self.vcpus.len() || !extra_cpus.is_empty() {
            problems.push(format!(
                "vCPU count differs (stream has {present} cpu sections, this VM has {} vCPUs)",
                self.vcpus.len()
            ));
        } else if let Some(i) = cpus.iter().position(Option::is_none) {
            problems.push(format!("section 'cpu' instance {i} is missing"));
        }
        let missing = |name: &str, present: bool, problems: &mut Vec<String>| {
            if !present {
                problems.push(format!("section '{name}' is missing"));
            }
        };
        missing(IrqchipState::NAME, irqchip.is_some(), &mut problems);
        missing(PitState::NAME, pit.is_some(), &mut problems);
        missing(ClockState::NAME, clock.is_some(), &mut problems);
        missing(UartState::NAME, uart.is_some(), &mut problems);
        missing(ProgressState::NAME, progress.is_some(), &mut problems);
        if !problems.is_empty() {
            return Err(VmError::ShapeMismatch(problems.join("; ")));
        }
        let irqchip = irqchip.unwrap_or_default();
        let state = VmState {
            memory_size: self.config.memory_size,
            vcpus: cpus.into_iter().flatten().collect(),
            pic_master: irqchip.pic_master,
            pic_slave: irqchip.pic_slave,
            ioapic: irqchip.ioapic,
            pit: pit.unwrap_or_default(),
            clock: clock.unwrap_or_default(),
            uart: uart.unwrap_or_default(),
            progress: progress.unwrap_or_default(),
        };
        self.check_shape(&state)?;
        Ok(state)
    }
}

/// The VM-level sections, in the order they are written (after the `cpu` sections).
pub const VM_SECTIONS: [&str; 5] = [
    IrqchipState::NAME,
    PitState::NAME,
    ClockState::NAME,
    UartState::NAME,
    ProgressState::NAME,
];

/// Encodes a captured machine state as section records for machine type `m`.
pub fn encode_state(state: VmState, m: &MachineType) -> Vec<Vec<u8>> {
    fn enc<S: Section>(s: &mut S, instance: u32, m: &MachineType, out: &mut Vec<Vec<u8>>) {
        if let Some(r) = devstate::encode_section(s, instance, m, devstate::Tag::Section) {
            out.push(r);
        }
    }
    let mut out = Vec::with_capacity(state.vcpus.len() + VM_SECTIONS.len());
    for mut v in state.vcpus {
        let i = v.index;
        enc(&mut v, i, m, &mut out);
    }
    let mut irqchip = IrqchipState {
        pic_master: state.pic_master,
        pic_slave: state.pic_slave,
        ioapic: state.ioapic,
    };
    enc(&mut irqchip, 0, m, &mut out);
    let mut pit = state.pit;
    enc(&mut pit, 0, m, &mut out);
    let mut clock = state.clock;
    enc(&mut clock, 0, m, &mut out);
    let mut uart = state.uart;
    enc(&mut uart, 0, m, &mut out);
    let mut progress = state.progress;
    enc(&mut progress, 0, m, &mut out);
    out
}
