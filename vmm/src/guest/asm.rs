//! The test guest's machine code, assembled with iced-x86's `code_asm`.

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::*;

use super::mailbox::{
    FLAG_GO_IDLE, MODE_DIRTY, STATUS_DIRTYING, STATUS_EXCEPTION, STATUS_IDLE, hp, offset,
};
use super::{
    GuestError, HOTPLUG_IRQ, HOTPLUG_PARK_PORT, PAGE_SIZE, PANIC_PORT, PCI_FN_STRIDE, PCI_IO_BASE,
    PROGRESS_PORT, layout,
};
use crate::hotplug::controller::{op, reg};
use crate::hotplug::{CONTROLLER_BASE, manager::MEM_BLOCK_SIZE};

/// Address of the LAPIC end-of-interrupt register.
const LAPIC_EOI: u64 = 0xFEE0_00B0;

// The PCI windows are addressed as `devfn << 4`.
const _: () = assert!(PCI_FN_STRIDE == 16);

/// Vector of the hotplug interrupt (the guest programs the master PIC's base to 0x20).
pub const HOTPLUG_VECTOR: u8 = 0x20 + HOTPLUG_IRQ;

/// Connector id bits of a PAPR index.
const ID_MASK: i32 = 0x0fff_ffff;
/// Pages of one hot-pluggable memory block.
const BLOCK_PAGES: i32 = (MEM_BLOCK_SIZE / PAGE_SIZE) as i32;
/// Spin bound while vCPU 0 waits for a core to park (then it reports an error and goes on).
const CORE_PARK_SPINS: i32 = 200_000_000;
/// Most configure-connector steps the guest tries before giving up.
const CONFIGURE_STEPS: i32 = 64;

/// Status the guest records when a core does not acknowledge its stop in time.
pub const ERR_CORE_NO_PARK: i32 = -101;
/// Status the guest records when a configured PCI function reads back all ones.
pub const ERR_PCI_ABSENT: i32 = -102;
/// Status the guest records when configure-connector does not finish in time.
pub const ERR_CONFIGURE_LOOP: i32 = -103;

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
    /// Entry of a hot-added CPU core (its counter loop).
    pub core_entry: u64,
    /// vCPU 0's hotplug service routine (between passes, and from the hotplug interrupt).
    pub hp_service: u64,
    /// IDT target of each vector.
    pub vectors: Vec<u64>,
}

fn port(r: u16) -> u32 {
    u32::from(CONTROLLER_BASE + r)
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
    let mut hp_irq = a.create_label();
    let mut ap_entry = a.create_label();
    let mut irq = a.create_label();
    let mut exc_common = a.create_label();
    let mut dead = a.create_label();
    // Hotplug.
    let mut hp_service = a.create_label();
    let mut hs_loop = a.create_label();
    let mut hs_not_plug = a.create_label();
    let mut hs_coop = a.create_label();
    let mut hs_refuse = a.create_label();
    let mut hs_slow = a.create_label();
    let mut hs_done = a.create_label();
    let mut hp_op = a.create_label();
    let mut hp_err = a.create_label();
    let mut hp_configure = a.create_label();
    let mut cfg_loop = a.create_label();
    let mut cfg_bad = a.create_label();
    let mut cfg_ret = a.create_label();
    let mut plug = a.create_label();
    let mut plug_logical = a.create_label();
    let mut plug_cpu = a.create_label();
    let mut plug_pci = a.create_label();
    let mut plug_pci_absent = a.create_label();
    let mut plug_fail = a.create_label();
    let mut plug_ret = a.create_label();
    let mut unplug = a.create_label();
    let mut un_cpu = a.create_label();
    let mut un_wait = a.create_label();
    let mut un_logical = a.create_label();
    let mut un_mem = a.create_label();
    let mut un_pci = a.create_label();
    let mut un_pci_stop = a.create_label();
    let mut un_fail = a.create_label();
    let mut un_ret = a.create_label();
    let mut refuse = a.create_label();
    let mut defer = a.create_label();
    let mut d_loop = a.create_label();
    let mut d_add = a.create_label();
    let mut d_ret = a.create_label();
    let mut answer = a.create_label();
    let mut a_loop = a.create_label();
    let mut a_done = a.create_label();
    let mut blk_pass = a.create_label();
    let mut blk_slot = a.create_label();
    let mut blk_page = a.create_label();
    let mut blk_skip = a.create_label();
    let mut blk_done = a.create_label();
    let mut core_entry = a.create_label();
    let mut core_loop = a.create_label();
    let mut core_stop = a.create_label();
    let mut core_dead = a.create_label();

    // vCPU 0.
    a.set_label(&mut entry)?;
    a.mov(rbx, layout::MAILBOX_GPA)?;
    // 8259 PICs: vectors 0x20 / 0x28, only the hotplug IRQ unmasked.
    a.mov(al, 0x11)?;
    a.out(0x20, al)?;
    a.out(0xA0, al)?;
    a.mov(al, 0x20)?;
    a.out(0x21, al)?;
    a.mov(al, 0x28)?;
    a.out(0xA1, al)?;
    a.mov(al, 0x04)?;
    a.out(0x21, al)?;
    a.mov(al, 0x02)?;
    a.out(0xA1, al)?;
    a.mov(al, 0x01)?;
    a.out(0x21, al)?;
    a.out(0xA1, al)?;
    a.mov(al, !(1u8 << HOTPLUG_IRQ) as i32)?;
    a.out(0x21, al)?;
    a.mov(al, 0xFF)?;
    a.out(0xA1, al)?;
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
    // Between passes: the hot-plugged memory blocks, then the hotplug controller.
    a.call(blk_pass)?;
    a.call(hp_service)?;
    a.mov(rax, mb(offset::FLAGS))?;
    a.test(rax, FLAG_GO_IDLE as i32)?;
    a.jz(pass_loop)?;

    a.set_label(&mut idle)?;
    a.mov(rbx, layout::MAILBOX_GPA)?;
    // Serve what is already pending; later events arrive with the hotplug interrupt.
    a.call(hp_service)?;
    a.mov(mb(offset::STATUS), STATUS_IDLE as i32)?;
    // Every other vCPU starts here (vCPU 0 idles here too).
    a.set_label(&mut ap_entry)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(ap_entry)?;

    // ---- Hotplug service (vCPU 0). rbx = mailbox; keeps r12-r14; clobbers the rest. ----
    a.set_label(&mut hp_service)?;
    a.inc(mb(hp::POLLS))?;
    a.set_label(&mut hs_loop)?;
    a.mov(edx, port(reg::PENDING))?;
    a.in_(eax, dx)?;
    a.test(eax, eax)?;
    a.jz(hs_done)?;
    a.mov(edx, port(reg::EVENT))?;
    a.in_(eax, dx)?;
    a.test(eax, eax)?;
    a.jz(hs_done)?;
    a.mov(r8d, eax)?;
    a.mov(edx, port(reg::EVENT_KIND))?;
    a.in_(eax, dx)?;
    a.inc(mb(hp::EVENTS))?;
    a.cmp(eax, 1)?;
    a.jne(hs_not_plug)?;
    a.call(plug)?;
    a.jmp(hs_loop)?;
    a.set_label(&mut hs_not_plug)?;
    a.cmp(eax, 2)?;
    a.jne(hs_loop)?;
    a.mov(rax, mb(hp::MODE))?;
    a.cmp(rax, 0)?;
    a.je(hs_coop)?;
    a.cmp(rax, 1)?;
    a.je(hs_refuse)?;
    a.cmp(rax, 3)?;
    a.je(hs_slow)?;
    a.jmp(hs_loop)?; // ignore
    a.set_label(&mut hs_coop)?;
    a.call(unplug)?;
    a.jmp(hs_loop)?;
    a.set_label(&mut hs_refuse)?;
    a.call(refuse)?;
    a.jmp(hs_loop)?;
    a.set_label(&mut hs_slow)?;
    a.call(defer)?;
    a.jmp(hs_loop)?;
    a.set_label(&mut hs_done)?;
    a.call(answer)?;
    a.ret()?;

    // hp_op: ARG = r10d, OP = r11d on the selected connector; eax = STATUS, flags of `test`.
    a.set_label(&mut hp_op)?;
    a.mov(eax, r10d)?;
    a.mov(edx, port(reg::ARG))?;
    a.out(dx, eax)?;
    a.mov(eax, r11d)?;
    a.mov(edx, port(reg::OP))?;
    a.out(dx, eax)?;
    a.mov(edx, port(reg::STATUS))?;
    a.in_(eax, dx)?;
    a.test(eax, eax)?;
    a.ret()?;

    // hp_err: record status eax for connector r8d.
    a.set_label(&mut hp_err)?;
    a.lock().inc(mb(hp::RTAS_ERRORS))?;
    a.mov(edx, r8d)?;
    a.shl(rdx, 32)?;
    a.mov(ecx, eax)?;
    a.or(rdx, rcx)?;
    a.mov(mb(hp::LAST_ERROR), rdx)?;
    a.ret()?;

    // hp_configure: configure-connector steps until SUCCESS; eax = 0 or the bad status.
    a.set_label(&mut hp_configure)?;
    a.mov(r15d, CONFIGURE_STEPS)?;
    a.mov(r11d, op::CONFIGURE)?;
    a.set_label(&mut cfg_loop)?;
    a.call(hp_op)?;
    a.jz(cfg_ret)?;
    a.cmp(eax, 2)?;
    a.jb(cfg_bad)?;
    a.cmp(eax, 4)?;
    a.ja(cfg_bad)?;
    a.dec(r15d)?;
    a.jnz(cfg_loop)?;
    a.mov(eax, ERR_CONFIGURE_LOOP)?;
    a.set_label(&mut cfg_bad)?;
    a.test(eax, eax)?;
    a.set_label(&mut cfg_ret)?;
    a.ret()?;

    // plug: a hotplug event for connector r8d.
    a.set_label(&mut plug)?;
    a.mov(eax, r8d)?;
    a.mov(edx, port(reg::SELECTOR))?;
    a.out(dx, eax)?;
    a.mov(eax, r8d)?;
    a.shr(eax, 28)?;
    a.cmp(eax, 4)?;
    a.je(plug_pci)?;
    a.cmp(eax, 1)?;
    a.jne(plug_logical)?;
    // A core: clear its area before it can start (the VMM starts it when configured).
    a.mov(ecx, r8d)?;
    a.and(ecx, ID_MASK)?;
    a.cmp(ecx, hp::MAX_CORES)?;
    a.jae(plug_logical)?;
    a.shl(ecx, 5)?;
    a.mov(
        qword_ptr(rbx + rcx + (hp::CORE_AREA + hp::CORE_STOP) as i32),
        0,
    )?;
    a.mov(
        qword_ptr(rbx + rcx + (hp::CORE_AREA + hp::CORE_STATE) as i32),
        0,
    )?;
    a.mov(
        qword_ptr(rbx + rcx + (hp::CORE_AREA + hp::CORE_COUNTER) as i32),
        0,
    )?;
    a.set_label(&mut plug_logical)?;
    a.mov(r10d, 1)?;
    a.mov(r11d, op::SET_ALLOCATION)?;
    a.call(hp_op)?;
    a.jnz(plug_fail)?;
    a.mov(r10d, 1)?;
    a.mov(r11d, op::SET_ISOLATION)?;
    a.call(hp_op)?;
    a.jnz(plug_fail)?;
    a.call(hp_configure)?;
    a.jnz(plug_fail)?;
    a.mov(ecx, r8d)?;
    a.and(ecx, ID_MASK)?;
    a.mov(eax, r8d)?;
    a.shr(eax, 28)?;
    a.cmp(eax, 8)?;
    a.jne(plug_cpu)?;
    // A memory block joins the workload with its pass counters at zero.
    a.cmp(ecx, hp::MAX_BLOCKS)?;
    a.jae(plug_ret)?;
    a.mov(edx, ecx)?;
    a.shl(edx, 4)?;
    a.mov(
        qword_ptr(rbx + rdx + (hp::BLOCK_AREA + hp::BLOCK_PROGRESS) as i32),
        0,
    )?;
    a.mov(
        qword_ptr(rbx + rdx + (hp::BLOCK_AREA + hp::BLOCK_PASSES) as i32),
        0,
    )?;
    a.bts(mb(hp::BLOCKS), rcx)?;
    a.ret()?;
    a.set_label(&mut plug_cpu)?;
    a.cmp(ecx, hp::MAX_CORES)?;
    a.jae(plug_ret)?;
    a.bts(mb(hp::CORES), rcx)?;
    a.ret()?;
    // A PCI function: unisolate, configure, indicator active, then use it.
    a.set_label(&mut plug_pci)?;
    a.mov(r10d, 1)?;
    a.mov(r11d, op::SET_ISOLATION)?;
    a.call(hp_op)?;
    a.jnz(plug_fail)?;
    a.call(hp_configure)?;
    a.jnz(plug_fail)?;
    a.mov(r10d, 1)?;
    a.mov(r11d, op::SET_DR_INDICATOR)?;
    a.call(hp_op)?;
    a.jnz(plug_fail)?;
    a.mov(ecx, r8d)?;
    a.and(ecx, ID_MASK)?;
    a.mov(edx, ecx)?;
    a.shl(edx, 4)?;
    a.add(edx, u32::from(PCI_IO_BASE))?;
    a.in_(eax, dx)?; // ID
    a.cmp(eax, -1)?;
    a.je(plug_pci_absent)?;
    a.add(edx, 4)?;
    a.mov(eax, 1)?; // COMMAND: I/O enable
    a.out(dx, eax)?;
    a.add(edx, 4)?;
    a.mov(eax, ecx)?;
    a.or(eax, hp::SCRATCH_MAGIC)?;
    a.out(dx, eax)?; // SCRATCH
    a.cmp(ecx, hp::MAX_PCI_DEVFN)?;
    a.jae(plug_ret)?;
    a.bts(mb(hp::PCI), rcx)?;
    a.ret()?;
    a.set_label(&mut plug_pci_absent)?;
    a.mov(eax, ERR_PCI_ABSENT)?;
    a.set_label(&mut plug_fail)?;
    a.call(hp_err)?;
    a.set_label(&mut plug_ret)?;
    a.ret()?;

    // unplug: stop using connector r8d's resource, then release it.
    a.set_label(&mut unplug)?;
    a.mov(eax, r8d)?;
    a.mov(edx, port(reg::SELECTOR))?;
    a.out(dx, eax)?;
    a.mov(ecx, r8d)?;
    a.and(ecx, ID_MASK)?;
    a.mov(eax, r8d)?;
    a.shr(eax, 28)?;
    a.cmp(eax, 1)?;
    a.je(un_cpu)?;
    a.cmp(eax, 8)?;
    a.je(un_mem)?;
    a.cmp(eax, 4)?;
    a.je(un_pci)?;
    a.ret()?;
    a.set_label(&mut un_cpu)?;
    a.cmp(ecx, hp::MAX_CORES)?;
    a.jae(un_logical)?;
    a.btr(mb(hp::CORES), rcx)?;
    a.jae(un_logical)?; // CF clear: the core was not in use
    a.mov(rsi, rcx)?;
    a.shl(rsi, 5)?;
    a.add(rsi, rbx)?;
    a.mov(qword_ptr(rsi + (hp::CORE_AREA + hp::CORE_STOP) as i32), 1)?;
    a.mov(r15d, CORE_PARK_SPINS)?;
    a.set_label(&mut un_wait)?;
    a.cmp(
        qword_ptr(rsi + (hp::CORE_AREA + hp::CORE_STATE) as i32),
        hp::CORE_PARKED as i32,
    )?;
    a.je(un_logical)?;
    a.pause()?;
    a.dec(r15d)?;
    a.jnz(un_wait)?;
    a.mov(eax, ERR_CORE_NO_PARK)?;
    a.call(hp_err)?;
    a.set_label(&mut un_logical)?;
    a.mov(r10d, 0)?;
    a.mov(r11d, op::SET_ISOLATION)?;
    a.call(hp_op)?;
    a.jnz(un_fail)?;
    a.mov(r10d, 0)?;
    a.mov(r11d, op::SET_ALLOCATION)?;
    a.call(hp_op)?;
    a.jnz(un_fail)?;
    a.ret()?;
    a.set_label(&mut un_mem)?;
    a.cmp(ecx, hp::MAX_BLOCKS)?;
    a.jae(un_logical)?;
    a.btr(mb(hp::BLOCKS), rcx)?;
    a.jmp(un_logical)?;
    a.set_label(&mut un_pci)?;
    a.cmp(ecx, hp::MAX_PCI_DEVFN)?;
    a.jae(un_pci_stop)?;
    a.btr(mb(hp::PCI), rcx)?;
    a.set_label(&mut un_pci_stop)?;
    a.mov(edx, ecx)?;
    a.shl(edx, 4)?;
    a.add(edx, u32::from(PCI_IO_BASE) + 4)?;
    a.xor(eax, eax)?;
    a.out(dx, eax)?; // COMMAND = 0: stop
    a.mov(r10d, 0)?;
    a.mov(r11d, op::SET_ISOLATION)?;
    a.call(hp_op)?;
    a.jnz(un_fail)?;
    a.ret()?;
    a.set_label(&mut un_fail)?;
    a.call(hp_err)?;
    a.set_label(&mut un_ret)?;
    a.ret()?;

    // refuse: answer an unplug of r8d by unisolating it again.
    a.set_label(&mut refuse)?;
    a.mov(eax, r8d)?;
    a.mov(edx, port(reg::SELECTOR))?;
    a.out(dx, eax)?;
    a.mov(r10d, 1)?;
    a.mov(r11d, op::SET_ISOLATION)?;
    a.call(hp_op)?;
    a.jz(un_ret)?;
    a.jmp(un_fail)?;

    // defer: remember r8d (once) until the VMM sets hp_answer.
    a.set_label(&mut defer)?;
    a.mov(rcx, mb(hp::DEFERRED_COUNT))?;
    a.xor(esi, esi)?;
    a.set_label(&mut d_loop)?;
    a.cmp(rsi, rcx)?;
    a.jae(d_add)?;
    a.cmp(qword_ptr(rbx + rsi * 8 + hp::DEFERRED_AREA as i32), r8)?;
    a.je(d_ret)?;
    a.inc(rsi)?;
    a.jmp(d_loop)?;
    a.set_label(&mut d_add)?;
    a.cmp(rcx, hp::MAX_DEFERRED as i32)?;
    a.jae(d_ret)?;
    a.mov(qword_ptr(rbx + rcx * 8 + hp::DEFERRED_AREA as i32), r8)?;
    a.inc(rcx)?;
    a.mov(mb(hp::DEFERRED_COUNT), rcx)?;
    a.set_label(&mut d_ret)?;
    a.ret()?;

    // answer: when hp_answer is set, answer every deferred unplug (cooperatively).
    a.set_label(&mut answer)?;
    a.cmp(mb(hp::ANSWER), 0)?;
    a.je(d_ret)?;
    a.mov(mb(hp::ANSWER), 0)?;
    a.xor(r9d, r9d)?;
    a.set_label(&mut a_loop)?;
    a.cmp(r9, mb(hp::DEFERRED_COUNT))?;
    a.jae(a_done)?;
    a.mov(r8, qword_ptr(rbx + r9 * 8 + hp::DEFERRED_AREA as i32))?;
    a.call(unplug)?;
    a.inc(r9)?;
    a.jmp(a_loop)?;
    a.set_label(&mut a_done)?;
    a.mov(mb(hp::DEFERRED_COUNT), 0)?;
    a.ret()?;

    // blk_pass: one pass over every active memory block (first byte of each page).
    a.set_label(&mut blk_pass)?;
    a.mov(r8, mb(hp::BLOCKS))?;
    a.xor(r9d, r9d)?;
    a.set_label(&mut blk_slot)?;
    a.cmp(r9d, hp::MAX_BLOCKS)?;
    a.jae(blk_done)?;
    a.bt(r8, r9)?;
    a.jae(blk_skip)?;
    a.mov(rdi, r9)?;
    a.shl(rdi, 24)?;
    a.add(rdi, mb(hp::MEM_BASE))?;
    a.mov(rsi, r9)?;
    a.shl(rsi, 4)?;
    a.add(rsi, rbx)?;
    a.mov(
        r10,
        qword_ptr(rsi + (hp::BLOCK_AREA + hp::BLOCK_PROGRESS) as i32),
    )?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut blk_page)?;
    a.inc(byte_ptr(rdi))?;
    a.inc(r10)?;
    a.mov(
        qword_ptr(rsi + (hp::BLOCK_AREA + hp::BLOCK_PROGRESS) as i32),
        r10,
    )?;
    a.add(rdi, PAGE_SIZE as i32)?;
    a.inc(ecx)?;
    a.cmp(ecx, BLOCK_PAGES)?;
    a.jb(blk_page)?;
    a.inc(qword_ptr(rsi + (hp::BLOCK_AREA + hp::BLOCK_PASSES) as i32))?;
    a.set_label(&mut blk_skip)?;
    a.inc(r9d)?;
    a.jmp(blk_slot)?;
    a.set_label(&mut blk_done)?;
    a.ret()?;

    // ---- A hot-added core: count until told to stop, then park. ----
    a.set_label(&mut core_entry)?;
    a.mov(eax, 1)?;
    a.cpuid()?;
    a.shr(ebx, 24)?; // initial APIC id = vCPU index
    a.mov(r8d, ebx)?;
    a.mov(rbx, layout::MAILBOX_GPA)?;
    a.sub(r8, mb(hp::CORE_VCPU_BASE))?;
    a.cmp(r8, hp::MAX_CORES as i32)?;
    a.jae(core_dead)?;
    a.mov(rsi, r8)?;
    a.shl(rsi, 5)?;
    a.add(rsi, rbx)?;
    a.mov(
        qword_ptr(rsi + (hp::CORE_AREA + hp::CORE_STATE) as i32),
        hp::CORE_RUNNING as i32,
    )?;
    a.set_label(&mut core_loop)?;
    a.inc(qword_ptr(rsi + (hp::CORE_AREA + hp::CORE_COUNTER) as i32))?;
    a.cmp(qword_ptr(rsi + (hp::CORE_AREA + hp::CORE_STOP) as i32), 0)?;
    a.jne(core_stop)?;
    a.pause()?;
    a.jmp(core_loop)?;
    a.set_label(&mut core_stop)?;
    a.mov(
        qword_ptr(rsi + (hp::CORE_AREA + hp::CORE_STATE) as i32),
        hp::CORE_PARKED as i32,
    )?;
    a.mov(eax, r8d)?;
    a.mov(edx, u32::from(HOTPLUG_PARK_PORT))?;
    a.out(dx, eax)?;
    a.set_label(&mut core_dead)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(core_dead)?;

    // The hotplug interrupt (only vCPU 0 takes PIC interrupts): count, serve, acknowledge.
    a.set_label(&mut hp_irq)?;
    let saved = [rax, rbx, rcx, rdx, rsi, rdi, r8, r9, r10, r11, r15];
    for r in saved {
        a.push(r)?;
    }
    a.mov(rbx, layout::MAILBOX_GPA)?;
    a.lock().inc(mb(offset::IRQ_COUNT))?;
    a.call(hp_service)?;
    a.mov(rax, LAPIC_EOI)?;
    a.mov(dword_ptr(rax), 0)?;
    a.mov(al, 0x20)?;
    a.out(0x20, al)?;
    for r in saved.into_iter().rev() {
        a.pop(r)?;
    }
    a.iretq()?;

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
    vectors[usize::from(HOTPLUG_VECTOR)] = result.label_ip(&hp_irq)?;
    Ok(GuestImage {
        base,
        entry: result.label_ip(&entry)?,
        ap_entry: result.label_ip(&ap_entry)?,
        core_entry: result.label_ip(&core_entry)?,
        hp_service: result.label_ip(&hp_service)?,
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
