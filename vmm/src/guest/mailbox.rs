//! The mailbox page shared by the VMM and the test guest (see the ABI in [`super`]).

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::MAILBOX_GPA;
use crate::vm::memory::GuestMem;

/// `"FERRYMBX"` as a little-endian `u64`.
pub const MAGIC: u64 = 0x5842_4d59_5252_4546;

/// Byte offsets of the mailbox fields.
pub mod offset {
    /// `magic`.
    pub const MAGIC: u64 = 0x00;
    /// `abi_version`.
    pub const ABI_VERSION: u64 = 0x08;
    /// `ws_start`.
    pub const WS_START: u64 = 0x10;
    /// `ws_pages`.
    pub const WS_PAGES: u64 = 0x18;
    /// `delay_loops`.
    pub const DELAY_LOOPS: u64 = 0x20;
    /// `flags`.
    pub const FLAGS: u64 = 0x28;
    /// `mode`.
    pub const MODE: u64 = 0x30;
    /// `progress`.
    pub const PROGRESS: u64 = 0x40;
    /// `pass_count`.
    pub const PASS_COUNT: u64 = 0x48;
    /// `status`.
    pub const STATUS: u64 = 0x50;
    /// `irq_count`.
    pub const IRQ_COUNT: u64 = 0x58;
    /// `exception`.
    pub const EXCEPTION: u64 = 0x60;
}

/// `flags` bit: stop dirtying after the current pass and idle.
pub const FLAG_GO_IDLE: u64 = 1;

/// `mode` value: idle.
pub const MODE_IDLE: u64 = 0;
/// `mode` value: dirty.
pub const MODE_DIRTY: u64 = 1;

/// `status` value: not started.
pub const STATUS_NOT_STARTED: u64 = 0;
/// `status` value: dirtying.
pub const STATUS_DIRTYING: u64 = 1;
/// `status` value: idle.
pub const STATUS_IDLE: u64 = 2;
/// `status` value: stopped on an exception.
pub const STATUS_EXCEPTION: u64 = 3;

/// A snapshot of the mailbox page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mailbox {
    /// Must be [`MAGIC`].
    pub magic: u64,
    /// ABI version.
    pub abi_version: u64,
    /// GPA of the first working-set page.
    pub ws_start: u64,
    /// Number of working-set pages.
    pub ws_pages: u64,
    /// Delay-loop iterations after each page.
    pub delay_loops: u64,
    /// Mode flags (`FLAG_*`).
    pub flags: u64,
    /// `MODE_*`.
    pub mode: u64,
    /// Pages incremented since boot.
    pub progress: u64,
    /// Completed passes.
    pub pass_count: u64,
    /// `STATUS_*`.
    pub status: u64,
    /// Interrupts taken.
    pub irq_count: u64,
    /// Vector of the fatal exception.
    pub exception: u64,
}

fn at(off: u64) -> GuestAddress {
    GuestAddress(MAILBOX_GPA + off)
}

impl Mailbox {
    /// Parameters for a dirtying guest over `ws_pages` pages from `ws_start`.
    pub fn dirty(ws_start: u64, ws_pages: u64, delay_loops: u64) -> Mailbox {
        Mailbox {
            magic: MAGIC,
            abi_version: super::ABI_VERSION,
            ws_start,
            ws_pages,
            delay_loops,
            mode: MODE_DIRTY,
            ..Mailbox::default()
        }
    }

    /// Parameters for an idle guest.
    pub fn idle() -> Mailbox {
        Mailbox {
            magic: MAGIC,
            abi_version: super::ABI_VERSION,
            mode: MODE_IDLE,
            ..Mailbox::default()
        }
    }

    /// Reads the whole mailbox from guest RAM.
    pub fn read(mem: &GuestMem) -> Result<Mailbox, GuestMemoryError> {
        let r = |off| mem.read_obj::<u64>(at(off));
        Ok(Mailbox {
            magic: r(offset::MAGIC)?,
            abi_version: r(offset::ABI_VERSION)?,
            ws_start: r(offset::WS_START)?,
            ws_pages: r(offset::WS_PAGES)?,
            delay_loops: r(offset::DELAY_LOOPS)?,
            flags: r(offset::FLAGS)?,
            mode: r(offset::MODE)?,
            progress: r(offset::PROGRESS)?,
            pass_count: r(offset::PASS_COUNT)?,
            status: r(offset::STATUS)?,
            irq_count: r(offset::IRQ_COUNT)?,
            exception: r(offset::EXCEPTION)?,
        })
    }

    /// Writes every field (VMM and guest fields) into guest RAM.
    pub fn write(&self, mem: &GuestMem) -> Result<(), GuestMemoryError> {
        for (off, v) in [
            (offset::MAGIC, self.magic),
            (offset::ABI_VERSION, self.abi_version),
            (offset::WS_START, self.ws_start),
            (offset::WS_PAGES, self.ws_pages),
            (offset::DELAY_LOOPS, self.delay_loops),
            (offset::FLAGS, self.flags),
            (offset::MODE, self.mode),
            (offset::PROGRESS, self.progress),
            (offset::PASS_COUNT, self.pass_count),
            (offset::STATUS, self.status),
            (offset::IRQ_COUNT, self.irq_count),
            (offset::EXCEPTION, self.exception),
        ] {
            mem.write_obj(v, at(off))?;
        }
        Ok(())
    }

    /// Writes one field; `off` is one of [`offset`]'s constants.
    pub fn write_field(mem: &GuestMem, off: u64, value: u64) -> Result<(), GuestMemoryError> {
        mem.write_obj(value, at(off))
    }

    /// Pass the guest is in, derived from `progress` (0 when the working set is empty).
    pub fn current_pass(&self) -> u64 {
        self.progress.checked_div(self.ws_pages).unwrap_or(0)
    }

    /// Index of the next page to increment in the current pass, derived from `progress`.
    pub fn current_page(&self) -> u64 {
        self.progress.checked_rem(self.ws_pages).unwrap_or(0)
    }
}

/// Hotplug part of the mailbox (ABI version 2): offsets, modes and a snapshot.
pub mod hp {
    /// `hp_mode` (VMM): how the guest answers unplug requests ([`GuestHotplugMode`](super::GuestHotplugMode)).
    pub const MODE: u64 = 0x68;
    /// `hp_answer` (VMM sets 1, guest clears): a `slow` guest answers its deferred unplugs.
    pub const ANSWER: u64 = 0x70;
    /// `hp_events` (guest): hotplug events popped and handled.
    pub const EVENTS: u64 = 0x78;
    /// `hp_rtas_errors` (guest): operations that returned an unexpected status.
    pub const RTAS_ERRORS: u64 = 0x80;
    /// `hp_last_error` (guest): `connector index << 32 | status as u32` of the last one.
    pub const LAST_ERROR: u64 = 0x88;
    /// `hp_cores` (guest): bit `c` = hot-added core `c` is in use.
    pub const CORES: u64 = 0x90;
    /// `hp_blocks` (guest): bit `s` = memory block `s` is in the dirty workload.
    pub const BLOCKS: u64 = 0x98;
    /// `hp_pci` (guest): bit `devfn` = PCI function in use.
    pub const PCI: u64 = 0xa0;
    /// `hp_deferred` (guest): unplug requests a `slow` guest holds back.
    pub const DEFERRED_COUNT: u64 = 0xa8;
    /// `hp_mem_base` (VMM): GPA of memory block 0.
    pub const MEM_BASE: u64 = 0xb0;
    /// `hp_core_vcpu_base` (VMM): vCPU index (APIC id) of hot-pluggable core 0.
    pub const CORE_VCPU_BASE: u64 = 0xb8;
    /// `hp_polls` (guest): times vCPU 0 ran its hotplug service routine.
    pub const POLLS: u64 = 0xc0;

    /// Per-core areas: `CORE_AREA + core * CORE_STRIDE`.
    pub const CORE_AREA: u64 = 0x100;
    /// Size of one per-core area.
    pub const CORE_STRIDE: u64 = 0x20;
    /// Cores with a mailbox area.
    pub const MAX_CORES: u32 = 8;
    /// Per-core: counter the core increments while it runs (core).
    pub const CORE_COUNTER: u64 = 0x00;
    /// Per-core: 1 = park now (vCPU 0).
    pub const CORE_STOP: u64 = 0x08;
    /// Per-core: `CORE_*` state (core; vCPU 0 clears it before configuring).
    pub const CORE_STATE: u64 = 0x10;
    /// Core state: not started.
    pub const CORE_OFF: u64 = 0;
    /// Core state: running its loop.
    pub const CORE_RUNNING: u64 = 1;
    /// Core state: parked (acknowledged a stop).
    pub const CORE_PARKED: u64 = 2;

    /// Per-block areas: `BLOCK_AREA + slot * BLOCK_STRIDE`.
    pub const BLOCK_AREA: u64 = 0x200;
    /// Size of one per-block area.
    pub const BLOCK_STRIDE: u64 = 0x10;
    /// Memory blocks with a mailbox area.
    pub const MAX_BLOCKS: u32 = 16;
    /// Per-block: pages of this block incremented since it joined the workload.
    pub const BLOCK_PROGRESS: u64 = 0x00;
    /// Per-block: completed passes over this block.
    pub const BLOCK_PASSES: u64 = 0x08;

    /// Deferred unplug requests (connector indices, `u64` each).
    pub const DEFERRED_AREA: u64 = 0x300;
    /// Room for deferred requests.
    pub const MAX_DEFERRED: u64 = 32;

    /// PCI functions with a bit in `hp_pci`.
    pub const MAX_PCI_DEVFN: u32 = 64;
    /// The guest writes `SCRATCH_MAGIC | devfn` to a configured function's SCRATCH register.
    pub const SCRATCH_MAGIC: u32 = 0x5c5c_0000;
}

/// How the test guest answers unplug requests (`hp_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum GuestHotplugMode {
    /// Stop using the resource, then release it.
    #[default]
    Cooperative = 0,
    /// Refuse: re-unisolate the connector (logical connectors: the manager rolls the unplug
    /// back and reports DEVICE_UNPLUG_GUEST_ERROR at once).
    Refuse = 1,
    /// Never answer (the unplug times out).
    Ignore = 2,
    /// Hold requests back until the VMM sets `hp_answer`, then answer them cooperatively.
    Slow = 3,
}

impl GuestHotplugMode {
    /// Every mode.
    pub const ALL: [GuestHotplugMode; 4] = [
        GuestHotplugMode::Cooperative,
        GuestHotplugMode::Refuse,
        GuestHotplugMode::Ignore,
        GuestHotplugMode::Slow,
    ];

    /// Name as on the command line (`--guest-hotplug`).
    pub const fn name(self) -> &'static str {
        match self {
            GuestHotplugMode::Cooperative => "cooperative",
            GuestHotplugMode::Refuse => "refuse",
            GuestHotplugMode::Ignore => "ignore",
            GuestHotplugMode::Slow => "slow",
        }
    }

    /// Value of the `hp_mode` mailbox field.
    pub const fn wire(self) -> u64 {
        self as u64
    }

    /// From the `hp_mode` value.
    pub fn from_wire(v: u64) -> Option<GuestHotplugMode> {
        GuestHotplugMode::ALL.into_iter().find(|m| m.wire() == v)
    }
}

impl std::fmt::Display for GuestHotplugMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for GuestHotplugMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GuestHotplugMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown guest hotplug mode '{s}' (cooperative, refuse, ignore or slow)")
            })
    }
}

/// One hot-pluggable core's mailbox area.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreArea {
    /// Loop iterations of the core.
    pub counter: u64,
    /// Stop request from vCPU 0.
    pub stop: u64,
    /// `hp::CORE_*`.
    pub state: u64,
}

/// One memory block's mailbox area.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockArea {
    /// Pages incremented since the block joined the workload.
    pub progress: u64,
    /// Completed passes over the block.
    pub passes: u64,
}

/// A snapshot of the hotplug part of the mailbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HotplugMailbox {
    /// `hp_mode`.
    pub mode: u64,
    /// `hp_answer`.
    pub answer: u64,
    /// `hp_events`.
    pub events: u64,
    /// `hp_rtas_errors`.
    pub rtas_errors: u64,
    /// `hp_last_error`.
    pub last_error: u64,
    /// `hp_cores`.
    pub cores: u64,
    /// `hp_blocks`.
    pub blocks: u64,
    /// `hp_pci`.
    pub pci: u64,
    /// `hp_deferred`.
    pub deferred: u64,
    /// `hp_mem_base`.
    pub mem_base: u64,
    /// `hp_core_vcpu_base`.
    pub core_vcpu_base: u64,
    /// `hp_polls`.
    pub polls: u64,
    /// Per-core areas.
    pub core: [CoreArea; hp::MAX_CORES as usize],
    /// Per-block areas.
    pub block: [BlockArea; hp::MAX_BLOCKS as usize],
}

impl HotplugMailbox {
    /// Reads the hotplug fields from guest RAM.
    pub fn read(mem: &GuestMem) -> Result<HotplugMailbox, GuestMemoryError> {
        let r = |off| mem.read_obj::<u64>(at(off));
        let mut m = HotplugMailbox {
            mode: r(hp::MODE)?,
            answer: r(hp::ANSWER)?,
            events: r(hp::EVENTS)?,
            rtas_errors: r(hp::RTAS_ERRORS)?,
            last_error: r(hp::LAST_ERROR)?,
            cores: r(hp::CORES)?,
            blocks: r(hp::BLOCKS)?,
            pci: r(hp::PCI)?,
            deferred: r(hp::DEFERRED_COUNT)?,
            mem_base: r(hp::MEM_BASE)?,
            core_vcpu_base: r(hp::CORE_VCPU_BASE)?,
            polls: r(hp::POLLS)?,
            ..HotplugMailbox::default()
        };
        for (c, a) in m.core.iter_mut().enumerate() {
            let base = hp::CORE_AREA + c as u64 * hp::CORE_STRIDE;
            *a = CoreArea {
                counter: r(base + hp::CORE_COUNTER)?,
                stop: r(base + hp::CORE_STOP)?,
                state: r(base + hp::CORE_STATE)?,
            };
        }
        for (s, a) in m.block.iter_mut().enumerate() {
            let base = hp::BLOCK_AREA + s as u64 * hp::BLOCK_STRIDE;
            *a = BlockArea {
                progress: r(base + hp::BLOCK_PROGRESS)?,
                passes: r(base + hp::BLOCK_PASSES)?,
            };
        }
        Ok(m)
    }

    /// The guest hotplug mode, if the field holds a known one.
    pub fn guest_mode(&self) -> Option<GuestHotplugMode> {
        GuestHotplugMode::from_wire(self.mode)
    }

    /// The last unexpected RTAS status as `(connector index, status)`.
    pub fn last_error(&self) -> (u32, i32) {
        (
            (self.last_error >> 32) as u32,
            self.last_error as u32 as i32,
        )
    }
}
