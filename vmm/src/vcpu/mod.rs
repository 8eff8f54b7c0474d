//! vCPUs: one thread per vCPU running `KVM_RUN`, dispatching port and MMIO exits to the
//! device buses, and parking outside `KVM_RUN` on request.
//!
//! # Pause protocol
//! The VMM sets the vCPU's target to `Pause` and sends it the kick signal (`SIGRTMIN`).
//! The signal handler sets `kvm_run.immediate_exit = 1` through a thread-local pointer, so
//! the kick cannot be lost: if it lands in `KVM_RUN`, the ioctl returns `EINTR`; if it lands
//! just before, the next `KVM_RUN` returns `EINTR` at once. The thread then completes any
//! pending port/MMIO exit (one more `KVM_RUN` with `immediate_exit` set, as the KVM API asks
//! before reading state), marks itself parked and waits. A pause returns once every vCPU is
//! parked; an unanswered kick is repeated every 10 ms until a deadline.
//!
//! - [`cpuid`]: the masked guest CPUID.
//! - [`longmode`]: GDT, page tables and boot registers.
//! - [`persist`]: the plain vCPU state.
//! - [`throttle`]: auto-converge's CPU throttle (vCPUs sleep outside `KVM_RUN`).

pub mod cpuid;
pub mod longmode;
pub mod persist;
pub mod throttle;

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_MP_STATE_RUNNABLE, Msrs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::devices::Bus;
use crate::runstate::RunState;
use persist::{
    CpuidEntry, DebugRegsState, FpuState, MsrEntry, RegsState, SregsState, VcpuEventsState,
    VcpuState, XcrsState,
};

/// How long a pause may take before it is reported as failed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// Errors of one vCPU.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` failed.
    #[error("Cannot create vCPU {index}")]
    Create {
        /// vCPU index.
        index: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU ioctl failed.
    #[error("{op} failed on vCPU {index}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// vCPU index.
        index: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM list (CPUID, MSRs) could not be built.
    #[error("Cannot build a KVM {0} list")]
    Fam(&'static str, #[source] vmm_sys_util::fam::Error),
    /// KVM refused part of an MSR list.
    #[error("KVM accessed {set} of {total} MSRs on vCPU {index}; MSR {msr:#x} was refused")]
    MsrRefused {
        /// vCPU index.
        index: u8,
        /// MSRs written.
        set: usize,
        /// MSRs offered.
        total: usize,
        /// First MSR refused.
        msr: u32,
    },
    /// A saved XSAVE area this host cannot load.
    #[error("Cannot load the XSAVE state of vCPU {index}: {reason}")]
    Xsave {
        /// vCPU index.
        index: u8,
        /// What does not fit this host.
        reason: String,
    },
    /// The thread could not be started.
    #[error("Cannot start the thread of vCPU {index}")]
    Spawn {
        /// vCPU index.
        index: u8,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("Cannot install the vCPU kick signal handler: errno {0}")]
    Signal(i32),
    /// The kick signal could not be sent.
    #[error("Cannot kick vCPU {index}")]
    Kick {
        /// vCPU index.
        index: u8,
        /// Cause.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// The vCPU did not park in time.
    #[error("vCPU {index} did not leave KVM_RUN within {ms} ms")]
    PauseTimeout {
        /// vCPU index.
        index: u8,
        /// Time waited.
        ms: u64,
    },
    /// The vCPU thread is gone.
    #[error("vCPU {index} has stopped: {reason}")]
    Exited {
        /// vCPU index.
        index: u8,
        /// Why it stopped.
        reason: String,
    },
    /// State access needs a parked vCPU.
    #[error("vCPU {0} is running; pause it first")]
    NotPaused(u8),
}

fn ioctl(op: &'static str, index: u8) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Ioctl { op, index, source }
}

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread runs (null on other threads).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: a non-null pointer is only ever set by `run_loop` on this very thread,
            // pointing into the `kvm_run` mapping of the `VcpuFd` that loop keeps alive, and it
            // is reset to null before that loop returns. A volatile byte store is async-signal
            // safe.
            unsafe { p.write_volatile(1) };
        }
    });
}

/// The signal that kicks vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

/// Scheduler slice a vCPU thread asks for (EEVDF custom slice, Linux 6.12 and later).
const VCPU_SLICE: Duration = Duration::from_micros(100);

/// Asks the scheduler for a [`VCPU_SLICE`] slice for the calling vCPU thread, keeping its
/// policy and nice value: it does not change the thread's share of a CPU, but a runnable vCPU
/// waits for a CPU-bound neighbour less long (the guest sees shorter stalls on a busy host,
/// during a migration's switch-over too). Older kernels ignore the slice.
fn ask_for_short_slice(index: u8) {
    /// `struct sched_attr` as of Linux 3.14 (`SCHED_ATTR_SIZE_VER0`).
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    // SAFETY: sched_getscheduler only reads the calling thread's policy.
    if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
        return; // Someone gave this thread a real-time or batch policy: leave it.
    }
    // SAFETY: getpriority only reads the calling thread's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: VCPU_SLICE.as_nanos() as u64,
        deadline: 0,
        period: 0,
    };
    // SAFETY: sched_setattr reads `size` bytes of `attr`, a live `repr(C)` value laid out as
    // the kernel's `struct sched_attr` (VER0, 48 bytes), and changes only the calling thread
    // (pid 0).
    let ret = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if ret != 0 {
        tracing::debug!(vcpu = index, error = %std::io::Error::last_os_error(), "vCPU keeps the default scheduler slice");
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.errno()))
        .map_err(VcpuError::Signal)
}

/// What the VMM wants the vCPU thread to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Run,
    Pause,
    Exit,
}

#[derive(Debug)]
struct Control {
    target: Target,
    parked: bool,
    exited: Option<String>,
    /// The vCPU thread while its run loop runs: kicks from other threads go there.
    thread: Option<libc::pthread_t>,
    /// Throttled: stay outside `KVM_RUN` until then (unless asked to park).
    sleep_until: Option<Instant>,
    /// Time spent asleep for the throttle, all told.
    throttled: Duration,
}

#[derive(Debug)]
struct VcpuControl {
    state: Mutex<Control>,
    changed: Condvar,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the run loop needs from the VM.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// Port-I/O devices.
    pub io_bus: Arc<Bus>,
    /// MMIO devices.
    pub mmio_bus: Arc<Bus>,
    /// The VM's run state (set to shutdown when the guest stops the machine).
    pub run_state: Arc<Mutex<RunState>>,
}

/// One vCPU: its KVM fd and its thread.
pub struct Vcpu {
    index: u8,
    fd: Arc<Mutex<VcpuFd>>,
    cpuid: Vec<CpuidEntry>,
    ctl: Arc<VcpuControl>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .field("control", &*self.ctl.lock())
            .finish_non_exhaustive()
    }
}

fn lock_fd(fd: &Mutex<VcpuFd>) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = b as _;
    }
}

fn read_lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(b)
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as a PC's BIOS leaves them.
fn set_bios_lints(fd: &VcpuFd, i: u8) -> Result<(), VcpuError> {
    let mut lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC", i))?;
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    let lint0 = read_lapic_reg(&lapic, LVT_LINT0);
    let lint1 = read_lapic_reg(&lapic, LVT_LINT1);
    write_lapic_reg(&mut lapic, LVT_LINT0, (lint0 & !0x700) | 0x700);
    write_lapic_reg(&mut lapic, LVT_LINT1, (lint1 & !0x700) | 0x400);
    fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC", i))
}

/// Real-mode segment and control registers with every segment at selector 0 (base 0,
/// limit 0xffff), the IDT at the real-mode vector table and paging, PAE and long mode off.
fn real_mode_sregs(sregs: &mut kvm_bindings::kvm_sregs) {
    let seg = |type_| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff,
        selector: 0,
        type_,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    // Code: execute/read, accessed; data: read/write, accessed.
    sregs.cs = seg(0xb);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = seg(0x3);
    }
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0xffff;
    sregs.idt.base = 0;
    sregs.idt.limit = 0x3ff;
    // The reset value of CR0 (CD | NW | ET) with caching enabled, as firmware leaves it.
    sregs.cr0 = longmode::cr0::ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

impl Vcpu {
    /// Creates vCPU `index` with `cpuid` (its thread is started by [`Vcpu::spawn`]).
    pub fn new(vm: &VmFd, index: u8, cpuid: &CpuId) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        fd.set_cpuid2(cpuid)
            .map_err(ioctl("KVM_SET_CPUID2", index))?;
        Ok(Vcpu {
            index,
            fd: Arc::new(Mutex::new(fd)),
            cpuid: CpuidEntry::list_from_kvm(cpuid),
            ctl: Arc::new(VcpuControl {
                // Parked from the start: the thread enters KVM_RUN only after it has seen
                // `Run` and cleared `parked` under this lock.
                state: Mutex::new(Control {
                    target: Target::Pause,
                    parked: true,
                    exited: None,
                    thread: None,
                    sleep_until: None,
                    throttled: Duration::ZERO,
                }),
                changed: Condvar::new(),
            }),
            thread: None,
        })
    }

    /// vCPU index (also its APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The MSRs of `wanted` (the CPU model's fixed list, in its order) that KVM lists (when
    /// `require_listed`; the legacy models' rule) and
    /// that this vCPU can read and write back unchanged. `IA32_TSC` is always captured on its
    /// own ([`persist::VcpuState::tsc`]) and is left out here.
    pub fn probe_msrs(
        &self,
        kvm: &Kvm,
        wanted: &[u32],
        require_listed: bool,
    ) -> Result<Vec<u32>, VcpuError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(|source| VcpuError::Ioctl {
                op: "KVM_GET_MSR_INDEX_LIST",
                index: self.index,
                source,
            })?;
        let listed = list.as_slice();
        let fd = lock_fd(&self.fd);
        let mut usable = Vec::new();
        let mut missing = Vec::new();
        for &index in wanted {
            if index == cpuid::MSR_IA32_TSC {
                continue;
            }
            if require_listed && !listed.contains(&index) {
                missing.push(index);
                continue;
            }
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(|e| VcpuError::Fam("MSR", e))?;
            if matches!(fd.get_msrs(&mut one), Ok(1)) && matches!(fd.set_msrs(&one), Ok(1)) {
                usable.push(index);
            } else {
                missing.push(index);
            }
        }
        if !missing.is_empty() {
            tracing::debug!(?missing, "MSRs of the CPU model this host does not offer");
        }
        tracing::debug!(listed = listed.len(), usable = usable.len(), "MSRs probed");
        Ok(usable)
    }

    /// Puts the vCPU at `entry` in 64-bit long mode (see [`longmode`]); vCPUs other than 0
    /// are made runnable directly (no INIT/SIPI).
    pub fn configure_boot(&self, entry: u64) -> Result<(), VcpuError> {
        let i = self.index;
        let fd = lock_fd(&self.fd);
        let mut sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS", i))?;
        longmode::setup_sregs(&mut sregs);
        fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS", i))?;
        fd.set_regs(&longmode::boot_regs(entry, i))
            .map_err(ioctl("KVM_SET_REGS", i))?;
        fd.set_fpu(&longmode::boot_fpu())
            .map_err(ioctl("KVM_SET_FPU", i))?;
        set_bios_lints(&fd, i)?;
        if i != 0 {
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(ioctl("KVM_SET_MP_STATE", i))?;
        }
        Ok(())
    }

    /// Puts the vCPU in real mode at `0000:ip` as a PC BIOS leaves it before jumping to a
    /// boot sector: flat real-mode segments (selector 0, base 0, limit 64 KiB), CR0 with PE
    /// and PG clear, interrupts off, `DL = 0x80` (boot drive), `SP = ip`. Only vCPU 0 is
    /// meant to start this way; the others stay waiting for INIT/SIPI.
    pub fn configure_real_mode(&self, ip: u16) -> Result<(), VcpuError> {
        let i = self.index;
        let fd = lock_fd(&self.fd);
        let mut sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS", i))?;
        real_mode_sregs(&mut sregs);
        fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS", i))?;
        fd.set_regs(&kvm_bindings::kvm_regs {
            rip: u64::from(ip),
            rsp: u64::from(ip),
            rdx: 0x80,
            rflags: 0x2,
            ..Default::default()
        })
        .map_err(ioctl("KVM_SET_REGS", i))?;
        fd.set_fpu(&longmode::boot_fpu())
            .map_err(ioctl("KVM_SET_FPU", i))?;
        set_bios_lints(&fd, i)
    }

    /// Starts the vCPU thread, parked until [`Vcpu::resume`].
    pub fn spawn(&mut self, ctx: RunContext) -> Result<(), VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let fd = Arc::clone(&self.fd);
        let ctl = Arc::clone(&self.ctl);
        // The thread has its name (`vcpuN`, how `query-cpus-fast` finds it) before its
        // closure runs: waiting for the closure makes it visible when this returns.
        let (started, wait) = std::sync::mpsc::sync_channel(0);
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let _ = started.send(());
                if ::migration::Lever::VcpuSlice.on() {
                    ask_for_short_slice(index);
                }
                run_loop(index, &fd, &ctl, &ctx)
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        let _ = wait.recv();
        self.thread = Some(handle);
        Ok(())
    }

    fn kick(&self) -> Result<(), VcpuError> {
        match &self.thread {
            Some(t) if !t.is_finished() => {
                t.kill(kick_signal()).map_err(|source| VcpuError::Kick {
                    index: self.index,
                    source,
                })
            }
            _ => Ok(()),
        }
    }

    /// Asks the vCPU to leave `KVM_RUN` and park (returns at once).
    pub fn request_pause(&self) -> Result<(), VcpuError> {
        {
            let mut c = self.ctl.lock();
            if c.target == Target::Run {
                c.target = Target::Pause;
            }
            // A throttled vCPU sleeps on the condition variable, not in `KVM_RUN`.
            self.ctl.changed.notify_all();
        }
        self.kick()
    }

    /// A handle that can make this vCPU sleep outside `KVM_RUN` (CPU throttling).
    pub fn throttle_handle(&self) -> throttle::Sleeper {
        throttle::Sleeper(Arc::clone(&self.ctl))
    }

    /// Waits until the vCPU is parked (or its thread has ended), re-kicking it until `deadline`.
    pub fn wait_parked(&self, deadline: Instant) -> Result<(), VcpuError> {
        let start = Instant::now();
        let mut c = self.ctl.lock();
        loop {
            if c.parked || c.exited.is_some() || self.thread.is_none() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::PauseTimeout {
                    index: self.index,
                    ms: start.elapsed().as_millis() as u64,
                });
            }
            c = self
                .ctl
                .changed
                .wait_timeout(c, KICK_INTERVAL.min(deadline - now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if !(c.parked || c.exited.is_some()) {
                drop(c);
                self.kick()?;
                c = self.ctl.lock();
            }
        }
    }

    /// Lets a parked vCPU run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        let mut c = self.ctl.lock();
        if let Some(reason) = &c.exited {
            return Err(VcpuError::Exited {
                index: self.index,
                reason: reason.clone(),
            });
        }
        c.target = Target::Run;
        self.ctl.changed.notify_all();
        Ok(())
    }

    /// Time this vCPU has spent asleep for the CPU throttle.
    pub fn throttled(&self) -> Duration {
        self.ctl.lock().throttled
    }

    /// Whether the vCPU is outside `KVM_RUN` for good or until resumed.
    pub fn is_parked(&self) -> bool {
        let c = self.ctl.lock();
        c.parked || c.exited.is_some() || self.thread.is_none()
    }

    /// Why the vCPU thread ended, if it did.
    pub fn exit_reason(&self) -> Option<String> {
        self.ctl.lock().exited.clone()
    }

    fn parked_fd(&self) -> Result<MutexGuard<'_, VcpuFd>, VcpuError> {
        if !self.is_parked() {
            return Err(VcpuError::NotPaused(self.index));
        }
        Ok(lock_fd(&self.fd))
    }

    /// Captures the vCPU state (the vCPU must be parked). `msrs` lists the MSRs to read
    /// besides `IA32_TSC`; `cpu_model` is left empty for the VM to fill in.
    pub fn save_state(&self, msrs: &[u32]) -> Result<VcpuState, VcpuError> {
        let i = self.index;
        let fd = self.parked_fd()?;
        // MP state first: KVM_GET_MP_STATE may flush pending LAPIC events.
        let mp_state = fd
            .get_mp_state()
            .map_err(ioctl("KVM_GET_MP_STATE", i))?
            .mp_state;
        let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS", i))?;
        let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS", i))?;
        let fpu = fd.get_fpu().map_err(ioctl("KVM_GET_FPU", i))?;
        let xsave = fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE", i))?;
        let xcrs = fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS", i))?;
        let debug_regs = fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS", i))?;
        let lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC", i))?;
        // IA32_TSC first, then the model's list.
        let entries: Vec<kvm_msr_entry> = std::iter::once(cpuid::MSR_IA32_TSC)
            .chain(msrs.iter().copied().filter(|&m| m != cpuid::MSR_IA32_TSC))
            .map(|index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut kvm_msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::Fam("MSR", e))?;
        let read = fd
            .get_msrs(&mut kvm_msrs)
            .map_err(ioctl("KVM_GET_MSRS", i))?;
        let mut msr_entries = MsrEntry::list_from_kvm(&kvm_msrs);
        if read < msr_entries.len() {
            return Err(VcpuError::MsrRefused {
                index: i,
                set: read,
                total: msr_entries.len(),
                msr: msr_entries[read].index,
            });
        }
        let tsc = msr_entries.remove(0).data;
        let events = fd
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS", i))?;
        let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
        Ok(VcpuState {
            index: u32::from(i),
            cpu_model: String::new(),
            cpuid: self.cpuid.clone(),
            regs: RegsState::from_kvm(&regs),
            sregs: SregsState::from_kvm(&sregs),
            fpu: FpuState::from_kvm(&fpu),
            xsave: persist::xsave_from_kvm(&xsave),
            xcrs: XcrsState::from_kvm(&xcrs),
            msrs: msr_entries,
            tsc,
            lapic: persist::lapic_from_kvm(&lapic),
            mp_state,
            events: VcpuEventsState::from_kvm(&events),
            debug_regs: DebugRegsState::from_kvm(&debug_regs),
            tsc_khz,
        })
    }

    /// Loads a captured state into this (parked, never run) vCPU, in Firecracker's order:
    /// CPUID, MP state, regs, sregs, FPU, XSAVE, XCRs, debug regs, LAPIC (after sregs, which
    /// hold the APIC base), MSRs (after the LAPIC, for the TSC deadline), and events last
    /// (SET_REGS clears pending exceptions).
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        let i = self.index;
        let cpuid =
            CpuidEntry::list_to_kvm(&state.cpuid).map_err(|e| VcpuError::Fam("CPUID", e))?;
        {
            let fd = self.parked_fd()?;
            fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2", i))?;
            fd.set_mp_state(persist::mp_state_to_kvm(state.mp_state))
                .map_err(ioctl("KVM_SET_MP_STATE", i))?;
            fd.set_regs(&state.regs.to_kvm())
                .map_err(ioctl("KVM_SET_REGS", i))?;
            fd.set_sregs(&state.sregs.to_kvm())
                .map_err(ioctl("KVM_SET_SREGS", i))?;
            fd.set_fpu(&state.fpu.to_kvm())
                .map_err(ioctl("KVM_SET_FPU", i))?;
            // Host-defined fields (MXCSR_MASK, the kernel's software-reserved words) are
            // this host's, not the stream's: the source may have been another CPU vendor.
            let local = fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE", i))?;
            let xcr0 = machine_types::CpuModel::by_name(&state.cpu_model)
                .map_or(cpuid::XCR0_ALLOWED.into(), |m| m.xcr0_mask());
            let words = machine_types::cpu::xsave::for_host(
                &state.xsave,
                &persist::xsave_from_kvm(&local),
                xcr0,
            )
            .map_err(|reason| VcpuError::Xsave { index: i, reason })?;
            let xsave = persist::xsave_to_kvm(&words);
            // SAFETY: `xsave` is a whole `kvm_xsave` (4 KiB region, no trailing flexible
            // part): KVM_GET_XSAVE2 sizes above 4 KiB only occur with AMX state, which the
            // masked CPUID never offers, so the kernel reads nothing past the struct.
            unsafe { fd.set_xsave(&xsave) }.map_err(ioctl("KVM_SET_XSAVE", i))?;
            fd.set_xcrs(&state.xcrs.to_kvm())
                .map_err(ioctl("KVM_SET_XCRS", i))?;
            fd.set_debug_regs(&state.debug_regs.to_kvm())
                .map_err(ioctl("KVM_SET_DEBUGREGS", i))?;
            fd.set_lapic(&persist::lapic_to_kvm(&state.lapic))
                .map_err(ioctl("KVM_SET_LAPIC", i))?;
            // IA32_TSC before the rest (the TSC deadline is relative to it).
            let all: Vec<MsrEntry> = std::iter::once(MsrEntry {
                index: cpuid::MSR_IA32_TSC,
                data: state.tsc,
            })
            .chain(state.msrs.iter().cloned())
            .collect();
            let msrs = MsrEntry::list_to_kvm(&all).map_err(|e| VcpuError::Fam("MSR", e))?;
            let set = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS", i))?;
            if set < all.len() {
                return Err(VcpuError::MsrRefused {
                    index: i,
                    set,
                    total: all.len(),
                    msr: all[set].index,
                });
            }
            fd.set_vcpu_events(&state.events.to_kvm())
                .map_err(ioctl("KVM_SET_VCPU_EVENTS", i))?;
        }
        self.cpuid = state.cpuid.clone();
        Ok(())
    }

    fn stop_thread(&mut self) {
        let Some(handle) = self.thread.take() else {
            return;
        };
        self.ctl.lock().target = Target::Exit;
        self.ctl.changed.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while !handle.is_finished() && Instant::now() < deadline {
            let _ = handle.kill(kick_signal());
            let c = self.ctl.lock();
            let _ = self.ctl.changed.wait_timeout(c, KICK_INTERVAL);
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            tracing::error!(vcpu = self.index, "vCPU thread did not stop; leaking it");
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// Re-enters KVM_RUN with `immediate_exit` set so KVM completes a pending port/MMIO exit
/// without running guest code.
fn complete_pending_exit(index: u8, fd: &Mutex<VcpuFd>) {
    let mut g = lock_fd(fd);
    g.set_kvm_immediate_exit(1);
    match g.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => tracing::warn!(vcpu = index, error = %e, "completing a pending exit failed"),
        Ok(exit) => tracing::warn!(
            vcpu = index,
            ?exit,
            "unexpected exit while completing a pending exit"
        ),
    }
    g.set_kvm_immediate_exit(0);
}

fn run_loop(index: u8, fd: &Mutex<VcpuFd>, ctl: &VcpuControl, ctx: &RunContext) {
    {
        let mut g = lock_fd(fd);
        let p: *mut u8 = &mut g.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
    }
    // SAFETY: `pthread_self` has no preconditions and always succeeds.
    ctl.lock().thread = Some(unsafe { libc::pthread_self() });
    let mut pending_exit = false;
    let outcome: Result<(), String> = loop {
        let mut c = ctl.lock();
        if c.target != Target::Run {
            if pending_exit {
                drop(c);
                complete_pending_exit(index, fd);
                pending_exit = false;
                continue;
            }
            c.parked = true;
            ctl.changed.notify_all();
            while c.target == Target::Pause {
                c = ctl.changed.wait(c).unwrap_or_else(|e| e.into_inner());
            }
            if c.target == Target::Exit {
                break Ok(());
            }
        }
        if c.sleep_until.is_some() {
            // Throttled: sleep outside KVM_RUN, waking early to park or exit, or when the
            // throttle ends (it clears `sleep_until`).
            let slept = Instant::now();
            while let Some(until) = c.sleep_until {
                let now = Instant::now();
                if now >= until || c.target != Target::Run {
                    break;
                }
                c = ctl
                    .changed
                    .wait_timeout(c, until - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            c.sleep_until = None;
            c.throttled += slept.elapsed();
            if c.target != Target::Run {
                continue;
            }
        }
        // Cleared under the same lock that saw `Run`, so a pauser either sees us parked
        // or has its kick land in (or just before) the KVM_RUN below.
        c.parked = false;
        drop(c);

        let mut g = lock_fd(fd);
        match g.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !ctx.io_bus.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    pending_exit = true;
                }
                VcpuExit::IoOut(port, data) => {
                    if !ctx.io_bus.write(u64::from(port), data) {
                        tracing::trace!(vcpu = index, port, "write to an unassigned port");
                    }
                    pending_exit = true;
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !ctx.mmio_bus.read(addr, data) {
                        data.fill(0xff);
                    }
                    pending_exit = true;
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !ctx.mmio_bus.write(addr, data) {
                        tracing::trace!(vcpu = index, addr, "write to unassigned MMIO");
                    }
                    pending_exit = true;
                }
                VcpuExit::Hlt => tracing::debug!(vcpu = index, "HLT exit"),
                VcpuExit::Shutdown => break Err("guest shutdown (triple fault)".to_string()),
                VcpuExit::SystemEvent(kind, _) => break Err(format!("guest system event {kind}")),
                VcpuExit::FailEntry(reason, cpu) => {
                    break Err(format!("VM entry failed (reason {reason:#x}, cpu {cpu})"));
                }
                VcpuExit::InternalError => break Err("KVM internal error".to_string()),
                other => tracing::debug!(vcpu = index, exit = ?other, "unhandled exit"),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                g.set_kvm_immediate_exit(0);
                pending_exit = false;
            }
            Err(e) => break Err(format!("KVM_RUN failed: {e}")),
        }
    };
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    let mut c = ctl.lock();
    c.thread = None;
    match outcome {
        Ok(()) => c.exited = Some("stopped by the VMM".to_string()),
        Err(reason) => {
            tracing::error!(vcpu = index, %reason, "vCPU stopped");
            *ctx.run_state.lock().unwrap_or_else(|e| e.into_inner()) = RunState::Shutdown;
            c.exited = Some(reason);
        }
    }
    c.parked = true;
    ctl.changed.notify_all();
}
