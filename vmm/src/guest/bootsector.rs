//! Boot-sector guests: a 512-byte image loaded at `0x7c00` and entered in real mode, as a
//! PC BIOS would (`CS:IP = 0000:7c00`, flat real-mode segments, interrupts off), but with no
//! BIOS services behind it. Only the COM1 UART (`0x3f8`) matters to such a guest. The same
//! image boots on QEMU from a raw drive, which is what makes like-for-like benchmarks
//! possible (design rule 11).
//!
//! [`AbBootblock`] builds Ferry's own equivalent of QEMU's migration-test guest
//! (`tests/qtest/migration/i386/a-b-bootblock.S`): switch to 32-bit protected mode, print
//! `A`, then work on the first byte of every 4 KiB page of `[start, end)`, printing `B` as it
//! goes (see [`Workload`]).

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
    /// Iterations of the delay loop between two `B`s of an idling guest.
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
        a.mov(eax, 0x10)?;
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
}

/// Offset of the 32-bit code in the sector.
pub const CODE32_OFFSET: usize = 0x40;
/// Offset of the GDT in the sector.
pub const GDT_OFFSET: usize = 0x1c0;
/// Offset of the GDT descriptor (limit, base) in the sector.
pub const GDTR_OFFSET: usize = 0x1e0;

/// Null, flat 32-bit code (selector 0x08), flat data (0x10).
const GDT: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];

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
        assert_eq!((jmp.far_branch_selector(), jmp.far_branch16()), (8, 0x7c40));
        let gdtr = &img[GDTR_OFFSET..GDTR_OFFSET + 6];
        assert_eq!(gdtr, &[23, 0, 0xc0, 0x7d, 0, 0]);
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
