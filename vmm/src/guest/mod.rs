#![doc = include_str!("ABI.md")]
//!
//! # Modules
//! - [`asm`]: the machine code.
//! - [`mailbox`]: the mailbox page.
//! - [`pattern`]: the memory-pattern verifier.
//! - [`bootsector`]: 512-byte boot-sector guests (real mode at 0x7c00, no mailbox) and
//!   Ferry's a-b-bootblock builder for like-for-like benchmarks with QEMU.

pub mod asm;
pub mod bootsector;
pub mod mailbox;
pub mod pattern;

pub use asm::{GuestImage, assemble};
pub use mailbox::{GuestHotplugMode, HotplugMailbox, Mailbox};
pub use pattern::{PatternError, verify_block, verify_pattern};

use thiserror::Error;

/// Guest page size used by the ABI.
pub const PAGE_SIZE: u64 = 4096;

/// ABI version written into the mailbox.
pub const ABI_VERSION: u64 = 2;

/// Port the guest writes its pass count to after every pass.
pub const PROGRESS_PORT: u16 = 0x510;

/// Port the guest writes an unexpected exception vector to.
pub const PANIC_PORT: u16 = 0x514;

/// Port a hot-added core writes its core id to when it parks itself (`out` 32-bit).
pub const HOTPLUG_PARK_PORT: u16 = 0x5c0;

/// Interrupt line (PIC IRQ / GSI) of the hotplug controller.
pub const HOTPLUG_IRQ: u8 = 5;

/// First port of the hot-pluggable PCI functions' register windows.
pub const PCI_IO_BASE: u16 = 0x1000;

/// Ports per PCI function window (function `devfn` at `PCI_IO_BASE + devfn * PCI_FN_STRIDE`).
pub const PCI_FN_STRIDE: u16 = 0x10;

/// Fixed guest-physical layout of the test guest.
pub mod layout {
    /// GDT page.
    pub const GDT_GPA: u64 = 0x1000;
    /// IDT page.
    pub const IDT_GPA: u64 = 0x2000;
    /// Mailbox page.
    pub const MAILBOX_GPA: u64 = 0x3000;
    /// First byte of the guest code.
    pub const CODE_GPA: u64 = 0x8000;
    /// Room for the guest code.
    pub const CODE_MAX: u64 = 0x8000;
    /// Bottom of the boot stacks.
    pub const STACKS_GPA: u64 = 0x1_0000;
    /// Size of one boot stack.
    pub const STACK_SIZE: u64 = 0x1000;
    /// Most vCPUs (one boot stack each).
    pub const MAX_VCPUS: u8 = 16;
    /// PML4; the PDPT and the PDs follow page by page.
    pub const PAGE_TABLES_GPA: u64 = 0x2_0000;
    /// End of the page-table area.
    pub const PAGE_TABLES_END: u64 = 0x4_0000;
    /// Default first page of the working set; everything below is ABI-reserved.
    pub const WORKING_SET_GPA: u64 = 0x10_0000;
    /// Start of the PCI hole: RAM above this moves to 4 GiB.
    pub const PCI_HOLE_START: u64 = 0xC000_0000;
    /// End of the PCI hole.
    pub const PCI_HOLE_END: u64 = 0x1_0000_0000;

    /// Initial stack pointer of vCPU `index`.
    pub fn stack_top(index: u8) -> u64 {
        STACKS_GPA + (u64::from(index) + 1) * STACK_SIZE
    }
}

/// Errors building the guest image.
#[derive(Debug, Error)]
pub enum GuestError {
    /// iced-x86 refused an instruction or the layout.
    #[error("Cannot assemble the test guest")]
    Assemble(#[from] iced_x86::IcedError),
    /// The code does not fit its area.
    #[error("Guest code is {0} bytes, more than the {max} reserved", max = layout::CODE_MAX)]
    TooBig(usize),
}
