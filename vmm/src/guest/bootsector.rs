//! Boot-sector guests: a 512-byte image loaded at `0x7c00` and entered in real mode, as a
//! PC BIOS would (`CS:IP = 0000:7c00`, flat real-mode segments, interrupts off), but with no
//! BIOS services behind it. Only the COM1 UART (`0x3f8`) matters to such a guest. The same
//! image boots on QEMU from a raw drive, which is what makes like-for-like benchmarks
//! possible (design rule 11).
//!
//! [`AbBootblock`] builds Ferry's own equivalent of QEMU's migration-test guest
//! (`tests/qtest/migration/i386/a-b-bootblock.S`): switch to 32-bit protected mode, print
//! `A`, then work on the first byte of every 4 KiB page of `[start, end)`, printing `B` as it
//! goes (see [`Workload`]). Its [`Workload::Dense`] goes on to long mode and ring 3 and
//! rewrites whole pages with pseudo-random data, which no page encoding can shrink.
//!
//! Measured on this host kind (`kvm_pvm`, 2 cores): guest code in ring 0, 32-bit or 64-bit,
//! is emulated (one 64-page tick of the dense loop takes ~0.7-0.8 s there); in ring 3 of long
//! mode it runs natively, ~0.38 ms per 64 pages checked and rewritten (~170 MB/s each way).
//! 32-bit paging (PSE or PAE) triple-faults there, and ring 3 must use Linux's `__USER_CS`
//! and `__USER_DS` selectors (0x33, 0x2b): the guest's ring 3 runs on the host's GDT.

use std::path::Path;

use iced_x86::code_asm::*;
use thiserror::Error;

use super::PAGE_SIZE;

/// Size of a boot sector.
pub const SECTOR_SIZE: usize = 512;
/// Guest-physical address the boot sector is loaded at and entered.
pub const LOAD_GPA: u64 = 0x7c00;
/// The boot signature in the last two bytes.
pub const SIGNATURE: [u8; 2] = [0x55, 0xaa];
/// The UART the images write to.
pub const COM1: u16 = 0x3f8;

/// Errors loading or building a boot sector.
#[derive(Debug, Error)]
pub enum BootsectorError {
    /// The image file cannot be read.
    #[error("Cannot read boot sector '{path}'")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The image is not one sector.
    #[error("Boot sector '{path}' is {len} bytes; a boot sector is exactly {SECTOR_SIZE} bytes")]
    Size {
        /// The file.
        path: String,
        /// Its size.
        len: usize,
    },
    /// iced-x86 refused an instruction.
    #[error("Cannot assemble the boot sector")]
    Assemble(#[from] iced_x86::IcedError),
    /// The code does not fit its part of the sector.
    #[error("Boot sector {part} code is {len} bytes, more than the {max} reserved")]
    TooBig {
        /// Which part.
        part: &'static str,
        /// Its length.
        len: usize,
        /// Room for it.
        max: usize,
    },
    /// A dense working set over the guest's own tables.
    #[error(
        "Dense working set starts at {start:#x}, below {DENSE_MIN_START:#x} where the guest keeps its tables"
    )]
    DenseStart {
        /// First byte.
        start: u64,
    },
    /// A range that 32-bit flat code cannot walk page by page.
    #[error("Invalid memory range [{start:#x}, {end:#x}): page-aligned, non-empty, below 4 GiB")]
    Range {
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
}

/// Reads a boot sector image: exactly [`SECTOR_SIZE`] bytes. A missing `55 aa` signature is
/// only logged (Ferry does not need it; a BIOS would refuse to boot the image).
pub fn read_image(path: &Path) -> Result<[u8; SECTOR_SIZE], BootsectorError> {
    let data = std::fs::read(path).map_err(|source| BootsectorError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let image: [u8; SECTOR_SIZE] =
        data.as_slice()
            .try_into()
            .map_err(|_| BootsectorError::Size {
                path: path.display().to_string(),
                len: data.len(),
            })?;
    if image[SECTOR_SIZE - 2..] != SIGNATURE {
        tracing::warn!(path = %path.display(), "boot sector has no 55 aa signature");
    }
    Ok(image)
}

/// What the guest does after printing `A`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// QEMU's a-b-bootblock: zero the first byte of every page, then increment it pass
    /// after pass forever, printing `B` after every `passes_per_b` passes.
    Dirty {
        /// Passes between two `B`s (QEMU's test uses 64).
        passes_per_b: u32,
    },
    /// Write `1` to the first byte of every page once, then spin like [`Workload::Idle`].
    WriteOnce,
    /// Touch no memory: a delay loop of `spin_loops` iterations, then `B`, forever.
    Idle,
    /// Dense pages written in ring 3 of long mode (ring 0 is emulated under `kvm_pvm`, ring
    /// 3 runs natively): each pass checks every page against the previous pass (a mismatch
    /// prints [`FAIL`] and counts at [`STATUS_GPA`]` + 4`), then rewrites every byte of it
    /// with [`dense_page`] data of (page, pass); [`TICK`] every `pages_per_tick` pages,
    /// [`PASS`] after each pass (completed passes at [`STATUS_GPA`]). Needs `start` >= 1 MiB.
    Dense {
        /// Pages between two ticks (rounded up to a power of two).
        pages_per_tick: u32,
        /// Write one pass, then tick every `spin_loops` delay-loop iterations without writing.
        once: bool,
    },
}

/// Ferry's a-b-bootblock: parameters of one 512-byte image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbBootblock {
    /// First byte of the page range (QEMU: 1 MiB).
    pub start: u64,
    /// End of the page range, exclusive (QEMU: 100 MiB).
    pub end: u64,
    /// The workload.
    pub workload: Workload,
    /// Iterations of the delay loop between two `B`s of an idling guest (or of a dense one
    /// done writing).
    pub spin_loops: u32,
}

impl AbBootblock {
    /// QEMU's test guest: `[1 MiB, 100 MiB)`, one `B` every 64 passes.
    pub fn qemu_default() -> AbBootblock {
        AbBootblock {
            start: 1 << 20,
            end: 100 << 20,
            workload: Workload::Dirty { passes_per_b: 64 },
            spin_loops: 1 << 22,
        }
    }

    /// Assembles the image. Layout: 16-bit code at offset 0, 32-bit code at
    /// [`CODE32_OFFSET`], the GDT at [`GDT_OFFSET`], its descriptor at [`GDTR_OFFSET`],
    /// signature at 510.
    pub fn build(&self) -> Result<[u8; SECTOR_SIZE], BootsectorError> {
        if self.start >= self.end
            || self.end > 1 << 32
            || !self.start.is_multiple_of(PAGE_SIZE)
            || !self.end.is_multiple_of(PAGE_SIZE)
        {
            return Err(BootsectorError::Range {
                start: self.start,
                end: self.end,
            });
        }
        if matches!(self.workload, Workload::Dense { .. }) && self.start < DENSE_MIN_START {
            return Err(BootsectorError::DenseStart { start: self.start });
        }
        let mut image = [0u8; SECTOR_SIZE];
        let code16 = real_mode_stub()?;
        put(&mut image, 0, &code16, CODE32_OFFSET, "16-bit")?;
        let code32 = self.protected_mode_code()?;
        put(
            &mut image,
            CODE32_OFFSET,
            &code32,
            GDT_OFFSET - CODE32_OFFSET,
            "32-bit",
        )?;
        for (i, d) in GDT.iter().enumerate() {
            image[GDT_OFFSET + i * 8..GDT_OFFSET + i * 8 + 8].copy_from_slice(&d.to_le_bytes());
        }
        let limit = (GDT.len() * 8 - 1) as u16;
        image[GDTR_OFFSET..GDTR_OFFSET + 2].copy_from_slice(&limit.to_le_bytes());
        image[GDTR_OFFSET + 2..GDTR_OFFSET + 6].copy_from_slice(&(gpa(GDT_OFFSET)).to_le_bytes());
        image[SECTOR_SIZE - 2..].copy_from_slice(&SIGNATURE);
        Ok(image)
    }

    fn protected_mode_code(&self) -> Result<Vec<u8>, BootsectorError> {
        let mut a = CodeAssembler::new(32)?;
        let start = self.start as u32 as i32;
        let end = self.end as u32 as i32;
        let page = PAGE_SIZE as i32;
        prologue32(&mut a)?;
        let mut spin = a.create_label();
        match self.workload {
            Workload::Dirty { passes_per_b } => {
                let mut zero = a.create_label();
                let mut pass = a.create_label();
                let mut inner = a.create_label();
                a.mov(eax, start)?;
                a.set_label(&mut zero)?;
                a.mov(byte_ptr(eax), 0)?;
                a.add(eax, page)?;
                a.cmp(eax, end)?;
                a.jb(zero)?;
                a.xor(ebx, ebx)?;
                a.set_label(&mut pass)?;
                a.mov(eax, start)?;
                a.set_label(&mut inner)?;
                a.inc(byte_ptr(eax))?;
                a.add(eax, page)?;
                a.cmp(eax, end)?;
                a.jb(inner)?;
                a.inc(ebx)?;
                a.cmp(ebx, passes_per_b.max(1) as i32)?;
                a.jb(pass)?;
                a.xor(ebx, ebx)?;
                a.mov(al, i32::from(b'B'))?;
                a.out(dx, al)?;
                a.jmp(pass)?;
            }
            Workload::WriteOnce => {
                let mut write = a.create_label();
                a.mov(eax, start)?;
                a.set_label(&mut write)?;
                a.mov(byte_ptr(eax), 1)?;
                a.add(eax, page)?;
                a.cmp(eax, end)?;
                a.jb(write)?;
                a.jmp(spin)?;
            }
            Workload::Idle => {}
            // Its own code from the prologue on: long mode, then ring 3.
            Workload::Dense {
                pages_per_tick,
                once,
            } => return self.dense_code(pages_per_tick, once),
        }
        let mut delay = a.create_label();
        a.set_label(&mut spin)?;
        a.mov(ecx, self.spin_loops.max(1) as i32)?;
        a.set_label(&mut delay)?;
        a.dec(ecx)?;
        a.jnz(delay)?;
        a.mov(al, i32::from(b'B'))?;
        a.out(dx, al)?;
        a.jmp(spin)?;
        Ok(a.assemble(gpa(CODE32_OFFSET).into())?)
    }

    /// The code of a [`Workload::Dense`] guest: the 32-bit prologue, long mode, then ring 3.
    /// Twice: the far jump into 64-bit code needs the length of the 32-bit part.
    fn dense_code(&self, pages_per_tick: u32, once: bool) -> Result<Vec<u8>, BootsectorError> {
        let code32 = |lm_ip: u32| -> Result<Vec<u8>, BootsectorError> {
            let mut a = CodeAssembler::new(32)?;
            prologue32(&mut a)?;
            enter_long_mode(&mut a)?;
            let ip = lm_ip.to_le_bytes();
            // jmp far SEL_CODE64:lm_ip (ptr16:32).
            a.db(&[0xea, ip[0], ip[1], ip[2], ip[3], SEL_CODE64 as u8, 0])?;
            Ok(a.assemble(gpa(CODE32_OFFSET).into())?)
        };
        let lm_ip = gpa(CODE32_OFFSET) + code32(0)?.len() as u32;
        let mut code = code32(lm_ip)?;
        let mut a = CodeAssembler::new(64)?;
        let mut ring3 = a.create_label();
        a.mov(esp, LOAD_GPA as i32)?;
        // iretq to ring 3 with IOPL 3 (so that it may write to COM1), interrupts off.
        a.push(i32::from(SEL_DATA3))?;
        a.push(RING3_STACK_GPA as i32)?;
        a.push(0x3002)?;
        a.push(i32::from(SEL_CODE3))?;
        a.lea(rax, ptr(ring3))?;
        a.push(rax)?;
        a.iretq()?;
        a.set_label(&mut ring3)?;
        let mut spin = a.create_label();
        dense_loop(
            &mut a,
            self.start as u32 as i32,
            self.end as u32 as i32,
            pages_per_tick,
            once,
            spin,
        )?;
        if once {
            let mut delay = a.create_label();
            a.set_label(&mut spin)?;
            a.mov(ecx, self.spin_loops.max(1) as i32)?;
            a.set_label(&mut delay)?;
            a.dec(ecx)?;
            a.jnz(delay)?;
            a.mov(al, i32::from(TICK))?;
            a.out(dx, al)?;
            a.jmp(spin)?;
        }
        code.extend(a.assemble(lm_ip.into())?);
        Ok(code)
    }
}

/// Flat data segments, the A20 gate, `dx` = COM1, and `A`.
fn prologue32(a: &mut CodeAssembler) -> Result<(), BootsectorError> {
    a.mov(eax, i32::from(SEL_DATA0))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(fs, ax)?;
    a.mov(gs, ax)?;
    a.mov(ss, ax)?;
    // Fast A20 gate (system control port A), as QEMU's test does; harmless elsewhere.
    a.in_(al, 0x92)?;
    a.or(al, 2)?;
    a.out(0x92, al)?;
    a.mov(dx, i32::from(COM1))?;
    a.mov(al, i32::from(b'A'))?;
    a.out(dx, al)?;
    Ok(())
}

/// From 32-bit protected mode to IA-32e mode: page tables identity-mapping 4 GiB with
/// 2 MiB user pages, PAE, `EFER.LME`, paging. The far jump into 64-bit code follows.
fn enter_long_mode(a: &mut CodeAssembler) -> Result<(), BootsectorError> {
    let mut pdpte = a.create_label();
    let mut pde = a.create_label();
    a.cld()?;
    a.mov(edi, PML4_GPA as i32)?;
    a.xor(eax, eax)?;
    a.mov(ecx, ((PD_GPA + 4 * PAGE_SIZE - PML4_GPA) / 4) as i32)?;
    a.rep().stosd()?;
    a.mov(dword_ptr(PML4_GPA), (PDPT_GPA | 7) as i32)?;
    a.mov(edi, PDPT_GPA as i32)?;
    a.mov(eax, (PD_GPA | 7) as i32)?;
    a.set_label(&mut pdpte)?;
    a.stosd()?;
    a.scasd()?; // skips the high half, already zero
    a.add(eax, PAGE_SIZE as i32)?;
    a.cmp(eax, (PD_GPA + 4 * PAGE_SIZE) as i32 | 7)?;
    a.jne(pdpte)?;
    a.mov(edi, PD_GPA as i32)?;
    a.mov(eax, 0x87)?; // present, writable, user, 2 MiB
    a.set_label(&mut pde)?;
    a.stosd()?;
    a.scasd()?;
    a.add(eax, 0x20_0000)?;
    a.jnc(pde)?; // until the address wraps past 4 GiB
    a.mov(eax, cr4)?;
    a.or(al, 0x20)?; // CR4.PAE
    a.mov(cr4, eax)?;
    a.mov(eax, PML4_GPA as i32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, 0xc000_0080u32 as i32)?; // EFER
    a.rdmsr()?;
    a.or(ah, 1)?; // LME
    a.wrmsr()?;
    a.mov(edx, i32::from(COM1))?; // rdmsr took it
    a.mov(eax, cr0)?;
    a.bts(eax, 31)?; // PG
    a.mov(cr0, eax)?;
    Ok(())
}

/// Emits `h = ((page ^ pass * 0x9e3779b9) * 0x85ebca6b) | 1` into `ebx` ([`dense_seed`]),
/// `pass` in `eax`, the page in `esi`.
fn emit_seed(a: &mut CodeAssembler) -> Result<(), BootsectorError> {
    a.imul_3(eax, eax, SEED_MUL_PASS as i32)?;
    a.xor(eax, esi)?;
    a.imul_3(ebx, eax, SEED_MUL_MIX as i32)?;
    a.or(ebx, 1)?;
    Ok(())
}

/// Emits one xorshift32 step on `ebx` ([`xorshift32`]), clobbering `eax`.
fn emit_xorshift(a: &mut CodeAssembler) -> Result<(), BootsectorError> {
    for (left, n) in [(true, 13), (false, 17), (true, 5)] {
        a.mov(eax, ebx)?;
        if left {
            a.shl(eax, n)?;
        } else {
            a.shr(eax, n)?;
        }
        a.xor(ebx, eax)?;
    }
    Ok(())
}

/// The dense writing loop (see [`Workload::Dense`]), 64-bit. Registers: `ebp` pass, `rsi`
/// page, `rdi` dword, `ebx` xorshift state, `ecx` dwords left, `dx` COM1. `once` jumps to
/// `idle` after the first pass.
fn dense_loop(
    a: &mut CodeAssembler,
    start: i32,
    end: i32,
    pages_per_tick: u32,
    once: bool,
    idle: CodeLabel,
) -> Result<(), BootsectorError> {
    let dwords = (PAGE_SIZE / 4) as i32;
    let mut pass = a.create_label();
    let mut page = a.create_label();
    let mut write = a.create_label();
    let mut fill = a.create_label();
    let mut no_tick = a.create_label();
    a.xor(ebp, ebp)?;
    a.set_label(&mut pass)?;
    a.mov(esi, start)?;
    a.set_label(&mut page)?;
    if !once {
        let mut check = a.create_label();
        let mut bad = a.create_label();
        a.test(ebp, ebp)?;
        a.jz(write)?;
        a.lea(eax, ebp - 1)?;
        emit_seed(a)?;
        a.mov(edi, esi)?;
        a.mov(ecx, dwords)?;
        a.set_label(&mut check)?;
        emit_xorshift(a)?;
        a.cmp(dword_ptr(rdi), ebx)?;
        a.jne(bad)?;
        a.add(edi, 4)?;
        a.dec(ecx)?;
        a.jnz(check)?;
        a.jmp(write)?;
        a.set_label(&mut bad)?;
        a.inc(dword_ptr(STATUS_GPA + 4))?;
        a.mov(al, i32::from(FAIL))?;
        a.out(dx, al)?;
        a.set_label(&mut write)?;
    }
    a.mov(eax, ebp)?;
    emit_seed(a)?;
    a.mov(edi, esi)?;
    a.mov(ecx, dwords)?;
    a.set_label(&mut fill)?;
    emit_xorshift(a)?;
    a.mov(dword_ptr(rdi), ebx)?;
    a.add(edi, 4)?;
    a.dec(ecx)?;
    a.jnz(fill)?;
    a.add(esi, PAGE_SIZE as i32)?;
    a.test(esi, tick_mask(pages_per_tick) as i32)?;
    a.jnz(no_tick)?;
    a.mov(al, i32::from(TICK))?;
    a.out(dx, al)?;
    a.set_label(&mut no_tick)?;
    a.cmp(esi, end)?;
    a.jne(page)?;
    a.inc(ebp)?;
    a.mov(dword_ptr(STATUS_GPA), ebp)?;
    a.mov(al, i32::from(PASS))?;
    a.out(dx, al)?;
    if once {
        a.jmp(idle)?;
    } else {
        a.jmp(pass)?;
    }
    Ok(())
}

/// Page addresses that are a multiple of this plus one get a tick: every `pages_per_tick`
/// pages, rounded up to a power of two.
fn tick_mask(pages_per_tick: u32) -> u32 {
    (u64::from(pages_per_tick.max(1).next_power_of_two()) * PAGE_SIZE - 1) as u32
}

/// Seed multiplier of the pass number ([`dense_seed`]).
const SEED_MUL_PASS: u32 = 0x9e37_79b9;
/// Seed mixing multiplier ([`dense_seed`]).
const SEED_MUL_MIX: u32 = 0x85eb_ca6b;

/// First xorshift32 state of a dense page in a pass: never zero.
pub fn dense_seed(page_gpa: u32, pass: u32) -> u32 {
    ((page_gpa ^ pass.wrapping_mul(SEED_MUL_PASS)).wrapping_mul(SEED_MUL_MIX)) | 1
}

/// One xorshift32 step (13, 17, 5).
pub fn xorshift32(mut x: u32) -> u32 {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    x
}

/// The 4 KiB a [`Workload::Dense`] guest writes to the page at `page_gpa` in pass `pass`
/// (counted from 0): successive xorshift32 states from [`dense_seed`], as little-endian dwords.
pub fn dense_page(page_gpa: u32, pass: u32) -> Vec<u8> {
    let mut x = dense_seed(page_gpa, pass);
    let mut out = Vec::with_capacity(PAGE_SIZE as usize);
    for _ in 0..PAGE_SIZE / 4 {
        x = xorshift32(x);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Offset of the 32-bit code in the sector.
pub const CODE32_OFFSET: usize = 0x20;
/// Offset of the GDT in the sector.
pub const GDT_OFFSET: usize = 0x1b8;
/// Offset of the GDT descriptor (limit, base) in the sector.
pub const GDTR_OFFSET: usize = 0x1f0;

/// Selectors: ring-0 flat data and 64-bit code; ring-3 data and 64-bit code (RPL 3), the
/// values Linux gives `__USER_DS` and `__USER_CS` (see [`GDT`]).
const SEL_DATA0: u16 = 0x10;
const SEL_CODE64: u16 = 0x18;
const SEL_DATA3: u16 = 0x2b;
const SEL_CODE3: u16 = 0x33;

/// Null, flat 32-bit code (0x08) and data (0x10), 64-bit code (0x18); for ring 3, 32-bit code
/// (0x20), data (0x28) and 64-bit code (0x30). The ring-3 selectors are Linux's own: under
/// `kvm_pvm` the guest's ring 3 runs on the host's GDT, where only those are user segments.
const GDT: [u64; 7] = [
    0,
    0x00cf_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x00af_9a00_0000_ffff,
    0x00cf_fa00_0000_ffff,
    0x00cf_f200_0000_ffff,
    0x00af_fa00_0000_ffff,
];

/// Where a [`Workload::Dense`] guest keeps its state, in conventional memory a PC BIOS
/// leaves free (`0x500..0x7c00`): the status dwords (completed passes, failed pages) ...
pub const STATUS_GPA: u64 = 0x500;
/// ... the PML4, PDPT and four page directories ...
const PML4_GPA: u64 = 0x1000;
const PDPT_GPA: u64 = 0x2000;
const PD_GPA: u64 = 0x3000;
/// ... and the ring-3 stack top.
const RING3_STACK_GPA: u64 = 0x7800;
/// Lowest working-set start of a [`Workload::Dense`] guest: above its own tables.
pub const DENSE_MIN_START: u64 = 1 << 20;

/// The characters a guest prints: a tick, a pass marker, a failed page check.
pub const TICK: u8 = b'B';
/// Printed by a [`Workload::Dense`] guest after each pass.
pub const PASS: u8 = b'P';
/// Printed by a [`Workload::Dense`] guest for each page that failed its check.
pub const FAIL: u8 = b'!';

fn gpa(offset: usize) -> u32 {
    LOAD_GPA as u32 + offset as u32
}

fn put(
    image: &mut [u8],
    at: usize,
    code: &[u8],
    max: usize,
    part: &'static str,
) -> Result<(), BootsectorError> {
    if code.len() > max {
        return Err(BootsectorError::TooBig {
            part,
            len: code.len(),
            max,
        });
    }
    image[at..at + code.len()].copy_from_slice(code);
    Ok(())
}

/// `cli`, `DS = 0`, load the GDT, set CR0.PE, far jump to the 32-bit code.
fn real_mode_stub() -> Result<Vec<u8>, BootsectorError> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.lgdt(ptr(u64::from(gpa(GDTR_OFFSET))))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    let target = (gpa(CODE32_OFFSET) as u16).to_le_bytes();
    // jmp far 0x08:target (ptr16:16; the target is below 64 KiB).
    a.db(&[0xea, target[0], target[1], 0x08, 0x00])?;
    Ok(a.assemble(LOAD_GPA)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

    fn decode(code: &[u8], bitness: u32, ip: u64) -> Vec<Instruction> {
        Decoder::with_ip(bitness, code, ip, DecoderOptions::NONE)
            .iter()
            .collect()
    }

    #[test]
    fn qemu_default_image() {
        let img = AbBootblock::qemu_default().build().unwrap();
        assert_eq!(img.len(), SECTOR_SIZE);
        assert_eq!(img[510..], SIGNATURE);
        let stub = decode(&img[..CODE32_OFFSET], 16, LOAD_GPA);
        assert_eq!(stub[0].mnemonic(), Mnemonic::Cli);
        let lgdt = stub
            .iter()
            .find(|i| i.mnemonic() == Mnemonic::Lgdt)
            .unwrap();
        assert_eq!(lgdt.memory_displacement64(), LOAD_GPA + GDTR_OFFSET as u64);
        let jmp = stub.iter().find(|i| i.code() == Code::Jmp_ptr1616).unwrap();
        assert_eq!((jmp.far_branch_selector(), jmp.far_branch16()), (8, 0x7c20));
        let gdtr = &img[GDTR_OFFSET..GDTR_OFFSET + 6];
        assert_eq!(gdtr, &[55, 0, 0xb8, 0x7d, 0, 0]);
        let code = decode(
            &img[CODE32_OFFSET..GDT_OFFSET],
            32,
            LOAD_GPA + CODE32_OFFSET as u64,
        );
        assert!(
            code.iter()
                .any(|i| i.mnemonic() == Mnemonic::Inc && i.op0_kind() == OpKind::Memory)
        );
        assert!(code.iter().any(|i| i.mnemonic() == Mnemonic::Cmp
            && i.op1_kind() == OpKind::Immediate32
            && i.immediate32() == 100 << 20));
    }

    #[test]
    fn variants_and_errors() {
        for w in [
            Workload::Idle,
            Workload::WriteOnce,
            Workload::Dirty { passes_per_b: 1 },
            Workload::Dense {
                pages_per_tick: 64,
                once: false,
            },
            Workload::Dense {
                pages_per_tick: 1,
                once: true,
            },
        ] {
            let b = AbBootblock {
                start: 1 << 20,
                end: 2 << 30,
                workload: w,
                spin_loops: 1000,
            };
            assert_eq!(b.build().unwrap()[510..], SIGNATURE);
        }
        let bad = AbBootblock {
            start: 1 << 20,
            end: 1 << 20,
            ..AbBootblock::qemu_default()
        };
        assert!(matches!(bad.build(), Err(BootsectorError::Range { .. })));
    }

    fn dense(once: bool) -> AbBootblock {
        AbBootblock {
            start: 1 << 20,
            end: 65 << 20,
            workload: Workload::Dense {
                pages_per_tick: 64,
                once,
            },
            spin_loops: 1 << 19,
        }
    }

    /// The 32-bit part up to its far jump, and the 64-bit part it jumps to.
    fn dense_parts(img: &[u8; SECTOR_SIZE]) -> (Vec<Instruction>, Vec<Instruction>) {
        let base = LOAD_GPA + CODE32_OFFSET as u64;
        let all32 = decode(&img[CODE32_OFFSET..GDT_OFFSET], 32, base);
        let n = all32
            .iter()
            .position(|i| i.code() == Code::Jmp_ptr1632)
            .expect("far jump to 64-bit code");
        let jmp = all32[n];
        assert_eq!(jmp.far_branch_selector(), SEL_CODE64);
        assert_eq!(u64::from(jmp.far_branch32()), jmp.next_ip());
        let at = (jmp.next_ip() - LOAD_GPA) as usize;
        let code64 = decode(&img[at..GDT_OFFSET], 64, jmp.next_ip());
        (all32[..=n].to_vec(), code64)
    }

    #[test]
    fn dense_image_goes_to_ring3_of_long_mode() {
        let img = dense(false).build().unwrap();
        assert_eq!(img[510..], SIGNATURE);
        let gdtr = &img[GDTR_OFFSET..GDTR_OFFSET + 6];
        assert_eq!(gdtr, &[55, 0, 0xb8, 0x7d, 0, 0]);
        let (code32, code64) = dense_parts(&img);
        let has = |code: &[Instruction], m: Mnemonic| code.iter().any(|i| i.mnemonic() == m);
        assert!(has(&code32, Mnemonic::Wrmsr) && has(&code32, Mnemonic::Rdmsr));
        assert!(
            code32.iter().any(
                |i| i.code() == Code::Mov_cr_r32 && i.op0_register() == iced_x86::Register::CR3
            )
        );
        // COM1 again after rdmsr clobbered edx.
        let wrmsr = code32
            .iter()
            .position(|i| i.mnemonic() == Mnemonic::Wrmsr)
            .unwrap();
        assert!(code32[wrmsr..].iter().any(|i| i.mnemonic() == Mnemonic::Mov
            && i.op0_register() == iced_x86::Register::EDX
            && i.immediate32() == u32::from(COM1)));
        // The iretq frame: SS, RSP, RFLAGS with IOPL 3, CS, then the ring-3 entry.
        let pushes: Vec<u64> = code64
            .iter()
            .take_while(|i| i.mnemonic() != Mnemonic::Iretq)
            .filter(|i| i.mnemonic() == Mnemonic::Push && i.op0_kind() != OpKind::Register)
            .map(|i| i.immediate(0))
            .collect();
        assert_eq!(pushes, [0x2b, RING3_STACK_GPA, 0x3002, 0x33]);
        let iretq = code64
            .iter()
            .position(|i| i.mnemonic() == Mnemonic::Iretq)
            .unwrap();
        let lea = code64
            .iter()
            .find(|i| i.mnemonic() == Mnemonic::Lea)
            .unwrap();
        assert_eq!(lea.ip_rel_memory_address(), code64[iretq].next_ip());
        let ring3 = &code64[iretq + 1..];
        // Checks each dword against the previous pass, rewrites it, ticks every 64 pages.
        let mem_rdi = |i: &Instruction| {
            i.op0_kind() == OpKind::Memory && i.memory_base() == iced_x86::Register::RDI
        };
        assert!(
            ring3
                .iter()
                .any(|i| i.mnemonic() == Mnemonic::Cmp && mem_rdi(i))
        );
        assert!(
            ring3
                .iter()
                .any(|i| i.mnemonic() == Mnemonic::Mov && mem_rdi(i))
        );
        assert!(ring3.iter().any(|i| i.mnemonic() == Mnemonic::Test
            && i.op1_kind() == OpKind::Immediate32
            && i.immediate32() == 64 * 4096 - 1));
        assert!(ring3.iter().any(|i| i.mnemonic() == Mnemonic::Cmp
            && i.op1_kind() == OpKind::Immediate32
            && i.immediate32() == 65 << 20));
        for (m, c) in [(SEED_MUL_PASS, 2), (SEED_MUL_MIX, 2)] {
            let imuls = ring3
                .iter()
                .filter(|i| i.mnemonic() == Mnemonic::Imul && i.immediate32() == m)
                .count();
            assert_eq!(imuls, c, "{m:#x}: one for the check, one for the rewrite");
        }
        assert!(!has(ring3, Mnemonic::Iretq) && !has(ring3, Mnemonic::Hlt));
    }

    #[test]
    fn dense_once_writes_without_checking_then_ticks() {
        let img = dense(true).build().unwrap();
        let (_, code64) = dense_parts(&img);
        let mem_rdi = |i: &Instruction| {
            i.op0_kind() == OpKind::Memory && i.memory_base() == iced_x86::Register::RDI
        };
        assert!(
            !code64
                .iter()
                .any(|i| i.mnemonic() == Mnemonic::Cmp && mem_rdi(i))
        );
        assert!(
            code64
                .iter()
                .any(|i| i.mnemonic() == Mnemonic::Mov && mem_rdi(i))
        );
        assert!(code64.iter().any(|i| i.mnemonic() == Mnemonic::Mov
            && i.op0_register() == iced_x86::Register::ECX
            && i.immediate32() == 1 << 19));
    }

    #[test]
    fn dense_data() {
        assert_eq!(xorshift32(1), 270_369);
        assert_eq!(tick_mask(64), 64 * 4096 - 1);
        assert_eq!(tick_mask(48), 64 * 4096 - 1);
        assert_eq!(tick_mask(0), 4095);
        let a = dense_page(1 << 20, 0);
        assert_eq!(a.len(), PAGE_SIZE as usize);
        let first = u32::from_le_bytes(a[..4].try_into().unwrap());
        assert_eq!(first, xorshift32(dense_seed(1 << 20, 0)));
        // Nothing to compress: no zero dword, and every pass and page differs.
        assert!(a.chunks(4).all(|d| d != [0; 4]));
        assert_ne!(a, dense_page(1 << 20, 1));
        assert_ne!(a, dense_page((1 << 20) + 4096, 0));
        assert_ne!(dense_seed(0, 0), 0);
    }

    #[test]
    fn dense_start_must_clear_the_tables() {
        let low = AbBootblock {
            start: 0x8000,
            ..dense(false)
        };
        let e = low.build().unwrap_err();
        assert!(
            matches!(e, BootsectorError::DenseStart { start: 0x8000 }),
            "{e}"
        );
    }

    #[test]
    fn read_checks_size() {
        let dir = std::env::temp_dir().join(format!("ferry-bs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short.bin");
        std::fs::write(&short, [0u8; 100]).unwrap();
        let e = read_image(&short).unwrap_err();
        assert!(e.to_string().contains("is 100 bytes"), "{e}");
        let good = dir.join("good.bin");
        std::fs::write(&good, AbBootblock::qemu_default().build().unwrap()).unwrap();
        assert!(read_image(&good).is_ok());
        assert!(matches!(
            read_image(&dir.join("missing.bin")),
            Err(BootsectorError::Read { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
