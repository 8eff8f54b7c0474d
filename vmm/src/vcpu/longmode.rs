//! 64-bit long mode set up by the VMM: GDT, identity page tables with 2 MiB pages, and
//! the boot values of the segment, control and general registers.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use crate::guest::layout;

/// CR0 bits.
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// Extension type.
    pub const ET: u64 = 1 << 4;
    /// Numeric error.
    pub const NE: u64 = 1 << 5;
    /// Write protect.
    pub const WP: u64 = 1 << 16;
    /// Paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    /// Physical address extension.
    pub const PAE: u64 = 1 << 5;
    /// FXSAVE/FXRSTOR and SSE.
    pub const OSFXSR: u64 = 1 << 9;
    /// Unmasked SSE exceptions.
    pub const OSXMMEXCPT: u64 = 1 << 10;
}

/// EFER bits.
pub mod efer {
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
}

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_PAGE_SIZE: u64 = 1 << 7;
const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;

/// A GDT descriptor from access/flags (`0xF0FF` mask: flags nibble and access byte),
/// base and limit (20 bits).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub fn gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The KVM segment a GDT descriptor at `index` describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = bit(55);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// Identity page tables for `[0, max(4 GiB, top))` with 2 MiB pages, as `(gpa, entry)`
/// pairs to write: a PML4 at [`layout::PAGE_TABLES_GPA`], one PDPT after it, then one PD
/// per GiB. Returns `None` when they would not fit the page-table area.
pub fn identity_page_tables(top: u64) -> Option<Vec<(u64, u64)>> {
    let pml4 = layout::PAGE_TABLES_GPA;
    let pdpt = pml4 + 0x1000;
    let pd0 = pdpt + 0x1000;
    let gibs = top.max(layout::PCI_HOLE_END).div_ceil(GIB);
    if gibs > 512 || pd0 + gibs * 0x1000 > layout::PAGE_TABLES_END {
        return None;
    }
    let mut out = Vec::with_capacity(2 + gibs as usize * 513);
    out.push((pml4, pdpt | PTE_PRESENT | PTE_WRITE));
    for g in 0..gibs {
        let pd = pd0 + g * 0x1000;
        out.push((pdpt + g * 8, pd | PTE_PRESENT | PTE_WRITE));
        for e in 0..512 {
            let addr = g * GIB + e * TWO_MIB;
            out.push((pd + e * 8, addr | PTE_PRESENT | PTE_WRITE | PTE_PAGE_SIZE));
        }
    }
    Some(out)
}

/// Sets `sregs` to 64-bit long mode with the boot GDT, IDT and page tables.
pub fn setup_sregs(sregs: &mut kvm_sregs) {
    let gdt = gdt();
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = layout::GDT_GPA;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = layout::IDT_GPA;
    sregs.idt.limit = (256 * 16 - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG;
    sregs.cr3 = layout::PAGE_TABLES_GPA;
    sregs.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT;
    sregs.efer |= efer::LME | efer::LMA;
}

/// Boot general registers: `rip = entry`, the vCPU's stack, interrupts off.
pub fn boot_regs(entry: u64, index: u8) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: layout::stack_top(index),
        rbp: layout::stack_top(index),
        rflags: 0x2,
        ..Default::default()
    }
}

/// Boot x87/SSE state.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_descriptors() {
        let g = gdt();
        assert_eq!(g[1], 0x00af_9b00_0000_ffff);
        assert_eq!(g[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(g[1], 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.present, cs.s),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let tr = segment_from_gdt(g[3], 3);
        assert_eq!(
            (tr.selector, tr.type_, tr.s, tr.unusable),
            (0x18, 0xb, 0, 0)
        );
        let null = segment_from_gdt(g[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_cover_ram_and_lapic() {
        let pt = identity_page_tables(64 << 20).unwrap();
        // PML4 + 4 PDPT entries + 4 * 512 PD entries (4 GiB minimum for the LAPIC).
        assert_eq!(pt.len(), 1 + 4 + 4 * 512);
        let map: std::collections::HashMap<u64, u64> = pt.iter().copied().collect();
        let walk = |va: u64| -> u64 {
            let pml4e = map[&(layout::PAGE_TABLES_GPA + ((va >> 39) & 511) * 8)];
            let pdpte = map[&((pml4e & !0xfff) + ((va >> 30) & 511) * 8)];
            let pde = map[&((pdpte & !0xfff) + ((va >> 21) & 511) * 8)];
            assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB");
            (pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff)
        };
        for va in [
            0,
            0x3000,
            0x10_0000,
            (64 << 20) - 1,
            0xFEE0_00B0,
            0xFFFF_FFFF,
        ] {
            assert_eq!(walk(va), va);
        }
        let big = identity_page_tables(5 << 30).unwrap();
        assert_eq!(big.len(), 1 + 5 + 5 * 512);
        assert!(identity_page_tables(1 << 40).is_none());
    }
}
