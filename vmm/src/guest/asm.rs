//! The test guest's machine code, assembled with iced-x86's `code_asm`.

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::*;

use super::mailbox::{
    FLAG_GO_IDLE, MODE_DIRTY, STATUS_DIRTYING, STATUS_EXCEPTION, STATUS_IDLE, offset,
};
use super::{GuestError, PAGE_SIZE, PANIC_PORT, PROGRESS_PORT, layout};

/// Address of the LAPIC end-of-interrupt register.
const LAPIC_EOI: u64 = 0xFEE0_00B0;

/// Assembled guest code and the addresses the VMM needs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// GPA the code is assembled for.
    pub base: u64,
    /// The machine code.
    pub code: Vec<u8>,
    /// Entry of vCPU 0.
    pub entry: u64,
    /// Entry of the other vCPUs (`sti; hlt` loop).
    pub ap_entry: u64,
    /// IDT target of each vector.
    pub vectors: Vec<u64>,
}

/// Assembles the guest for `base` (normally [`layout::CODE_GPA`]).
pub fn assemble(base: u64) -> Result<GuestImage, GuestError> {
    let mut a = CodeAssembler::new(64)?;
    let mb = |off: u64| qword_ptr(rbx + off as i32);

    let mut entry = a.create_label();
    let mut pass_loop = a.create_label();
    let mut page_loop = a.create_label();
    let mut delay = a.create_label();
    let mut delay_done = a.create_label();
    let mut idle = a.create_label();
    let mut ap_entry = a.create_label();
    let mut irq = a.create_label();
    let mut exc_common = a.create_label();
    let mut dead = a.create_label();

    // vCPU 0.
    a.set_label(&mut entry)?;
    a.mov(rbx, layout::MAILBOX_GPA)?;
    a.mov(rax, mb(offset::MODE))?;
    a.cmp(rax, MODE_DIRTY as i32)?;
    a.jne(idle)?;
    a.mov(mb(offset::STATUS), STATUS_DIRTYING as i32)?;
    a.mov(r12, mb(offset::WS_START))?;
    a.mov(r13, mb(offset::WS_PAGES))?;
    a.mov(r14, mb(offset::PROGRESS))?;

    a.set_label(&mut pass_loop)?;
    a.xor(ecx, ecx)?;
    a.mov(rdi, r12)?;
    a.set_label(&mut page_loop)?;
    a.inc(byte_ptr(rdi))?;
    a.inc(r14)?;
    a.mov(mb(offset::PROGRESS), r14)?;
    a.mov(rax, mb(offset::DELAY_LOOPS))?;
    a.set_label(&mut delay)?;
    a.test(rax, rax)?;
    a.jz(delay_done)?;
    a.pause()?;
    a.dec(rax)?;
    a.jmp(delay)?;
    a.set_label(&mut delay_done)?;
    a.add(rdi, PAGE_SIZE as i32)?;
    a.inc(rcx)?;
    a.cmp(rcx, r13)?;
    a.jb(page_loop)?;
    // End of a pass: count it, tell the VMM.
    a.mov(rax, mb(offset::PASS_COUNT))?;
    a.inc(rax)?;
    a.mov(mb(offset::PASS_COUNT), rax)?;
    a.mov(edx, u32::from(PROGRESS_PORT))?;
    a.out(dx, eax)?;
    // Between-passes hook: the place to poll devices (e.g. a hotplug controller).
    a.mov(rax, mb(offset::FLAGS))?;
    a.test(rax, FLAG_GO_IDLE as i32)?;
    a.jz(pass_loop)?;

    a.set_label(&mut idle)?;
    a.mov(rbx, layout::MAILBOX_GPA)?;
    a.mov(mb(offset::STATUS), STATUS_IDLE as i32)?;
    // Every other vCPU starts here.
    a.set_label(&mut ap_entry)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(ap_entry)?;

    // Vectors 32-255: count, acknowledge, return.
    a.set_label(&mut irq)?;
    a.push(rax)?;
    a.push(rbx)?;
    a.mov(rbx, layout::MAILBOX_GPA)?;
    a.lock().inc(mb(offset::IRQ_COUNT))?;
    a.mov(rax, LAPIC_EOI)?;
    a.mov(dword_ptr(rax), 0)?;
    a.mov(al, 0x20)?;
    a.out(0x20, al)?;
    a.out(0xA0, al)?;
    a.pop(rbx)?;
    a.pop(rax)?;
    a.iretq()?;

    // Vectors 0-31: one stub each loads the vector, then report and stop.
    let mut stubs = Vec::with_capacity(32);
    for v in 0..32u32 {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.mov(eax, v)?;
        a.jmp(exc_common)?;
        stubs.push(l);
    }
    a.set_label(&mut exc_common)?;
    a.mov(rbx, layout::MAILBOX_GPA)?;
    a.mov(mb(offset::EXCEPTION), rax)?;
    a.mov(mb(offset::STATUS), STATUS_EXCEPTION as i32)?;
    a.mov(edx, u32::from(PANIC_PORT))?;
    a.out(dx, eax)?;
    a.set_label(&mut dead)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(dead)?;

    let result = a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let code = result.inner.code_buffer.clone();
    if code.len() as u64 > layout::CODE_MAX {
        return Err(GuestError::TooBig(code.len()));
    }
    let irq_ip = result.label_ip(&irq)?;
    let mut vectors = Vec::with_capacity(256);
    for l in &stubs {
        vectors.push(result.label_ip(l)?);
    }
    vectors.resize(256, irq_ip);
    Ok(GuestImage {
        base,
        entry: result.label_ip(&entry)?,
        ap_entry: result.label_ip(&ap_entry)?,
        code,
        vectors,
    })
}

/// Builds the IDT: 256 64-bit interrupt gates (selector 0x08, DPL 0, present).
pub fn build_idt(vectors: &[u64]) -> Vec<u8> {
    let mut idt = Vec::with_capacity(vectors.len() * 16);
    for &off in vectors {
        idt.extend_from_slice(&(off as u16).to_le_bytes());
        idt.extend_from_slice(&0x08u16.to_le_bytes());
        idt.push(0); // IST
        idt.push(0x8E); // present, DPL 0, 64-bit interrupt gate
        idt.extend_from_slice(&((off >> 16) as u16).to_le_bytes());
        idt.extend_from_slice(&((off >> 32) as u32).to_le_bytes());
        idt.extend_from_slice(&0u32.to_le_bytes());
    }
    idt
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    #[test]
    fn assembles_and_decodes() {
        let img = assemble(layout::CODE_GPA).unwrap();
        assert_eq!(img.entry, layout::CODE_GPA);
        assert!(img.ap_entry > img.entry);
        assert_eq!(img.vectors.len(), 256);
        assert!(
            img.vectors
                .iter()
                .all(|&v| v >= img.base && v < img.base + img.code.len() as u64)
        );
        let mut d = Decoder::with_ip(64, &img.code, img.base, DecoderOptions::NONE);
        let mnemonics: Vec<Mnemonic> = d.iter().map(|i| i.mnemonic()).collect();
        assert!(!mnemonics.contains(&Mnemonic::INVALID));
        for m in [
            Mnemonic::Inc,
            Mnemonic::Out,
            Mnemonic::Sti,
            Mnemonic::Hlt,
            Mnemonic::Iretq,
        ] {
            assert!(mnemonics.contains(&m), "{m:?} missing");
        }
        // The AP entry is exactly `sti; hlt; jmp ap_entry`.
        let off = (img.ap_entry - img.base) as usize;
        let mut d = Decoder::with_ip(64, &img.code[off..], img.ap_entry, DecoderOptions::NONE);
        assert_eq!(d.decode().mnemonic(), Mnemonic::Sti);
        assert_eq!(d.decode().mnemonic(), Mnemonic::Hlt);
        let j = d.decode();
        assert_eq!(
            (j.mnemonic(), j.near_branch_target()),
            (Mnemonic::Jmp, img.ap_entry)
        );
    }

    #[test]
    fn idt_gate_layout() {
        let idt = build_idt(&[0x1234_5678_9abc_def0]);
        assert_eq!(
            idt,
            [
                0xf0, 0xde, 0x08, 0x00, 0x00, 0x8e, 0xbc, 0x9a, 0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0
            ]
        );
    }
}
