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
