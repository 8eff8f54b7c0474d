//! Plain vCPU state: every register set KVM exposes for an x86-64 vCPU, copied out of the
//! kvm-bindings types into flat structs (`from_kvm`/`to_kvm`), and the `cpu` section.

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_fpu, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcr,
    kvm_xcrs, kvm_xsave,
};
use machine_types::cpu::CpuidLeaf;

/// Largest CPUID table a stream may carry.
pub const MAX_CPUID_ENTRIES: u32 = 256;
/// Largest MSR list a stream may carry.
pub const MAX_MSRS: u32 = 256;
/// Words of the (legacy, 4 KiB) XSAVE area.
pub const XSAVE_WORDS: u32 = 1024;
/// Bytes of the LAPIC register page.
pub const LAPIC_BYTES: u32 = 1024;
/// Longest CPU model name.
pub const MAX_CPU_MODEL_NAME: u32 = 32;
/// XCR0 bits any model may enable: x87, SSE, AVX.
pub const XCR0_ALLOWED: u32 = 0b111;

devstate::record! {
    /// Everything needed to resume one vCPU: the body of section `cpu`, instance = vCPU index.
    pub struct VcpuState {
        /// vCPU index (APIC id).
        pub index: u32,
        /// CPU model the vCPU was created with (e.g. `ferry-cpu-v2`); checked on restore.
        pub cpu_model: String [max = 32],
        /// CPUID the vCPU was given.
        pub cpuid: Vec<CpuidEntry> [max = 256],
        /// General registers.
        pub regs: RegsState,
        /// Segment, control and descriptor-table registers.
        pub sregs: SregsState,
        /// Legacy x87/SSE state (`KVM_GET_FPU`).
        pub fpu: FpuState,
        /// XSAVE area (`KVM_GET_XSAVE`, 4 KiB as 1024 words).
        pub xsave: Vec<u32> [max = 1024],
        /// Extended control registers.
        pub xcrs: XcrsState,
        /// Model-specific registers of the CPU model's fixed list, `IA32_TSC` excepted.
        pub msrs: Vec<MsrEntry> [max = 256],
        /// `IA32_TSC`: moves with host time while the vCPU is stopped.
        pub tsc: u64 [volatile],
        /// Local APIC registers (`KVM_GET_LAPIC`, 1 KiB).
        pub lapic: Vec<u8> [max = 1024],
        /// Multiprocessing state (`KVM_MP_STATE_*`).
        pub mp_state: u32,
        /// Pending exceptions, interrupts, NMIs, SMIs.
        pub events: VcpuEventsState,
        /// Debug registers.
        pub debug_regs: DebugRegsState,
        /// TSC frequency in kHz (0 when KVM does not report it); a property of the host.
        pub tsc_khz: u32 [volatile],
    }
}

impl devstate::Section for VcpuState {
    const NAME: &'static str = "cpu";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
    /// Instance 0 always; the VM expects one instance per vCPU on top.
    const REQUIRED: bool = true;

    fn post_load(&mut self, _version: u32) -> Result<(), String> {
        if self.xsave.len() != XSAVE_WORDS as usize {
            return Err(format!(
                "XSAVE area has {} words, expected {XSAVE_WORDS}",
                self.xsave.len()
            ));
        }
        if self.lapic.len() != LAPIC_BYTES as usize {
            return Err(format!(
                "LAPIC page has {} bytes, expected {LAPIC_BYTES}",
                self.lapic.len()
            ));
        }
        if self.sregs.interrupt_bitmap.len() != 4 {
            return Err(format!(
                "interrupt bitmap has {} words, expected 4",
                self.sregs.interrupt_bitmap.len()
            ));
        }
        if self.fpu.fpr.len() != 128 || self.fpu.xmm.len() != 256 {
            return Err(format!(
                "FPU state has {} x87 and {} XMM bytes, expected 128 and 256",
                self.fpu.fpr.len(),
                self.fpu.xmm.len()
            ));
        }
        if self.debug_regs.db.len() != 4 {
            return Err(format!(
                "debug state has {} address registers, expected 4",
                self.debug_regs.db.len()
            ));
        }
        Ok(())
    }
}

devstate::record! {
    /// One CPUID leaf/subleaf.
    pub struct CpuidEntry {
        /// Leaf.
        pub function: u32,
        /// Subleaf.
        pub index: u32,
        /// `KVM_CPUID_FLAG_*`.
        pub flags: u32,
        /// EAX.
        pub eax: u32,
        /// EBX.
        pub ebx: u32,
        /// ECX.
        pub ecx: u32,
        /// EDX.
        pub edx: u32,
    }
}

impl CpuidEntry {
    /// Copies a KVM entry.
    pub fn from_kvm(e: &kvm_cpuid_entry2) -> CpuidEntry {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }

    /// Back to KVM's type.
    pub fn to_kvm(&self) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: self.function,
            index: self.index,
            flags: self.flags,
            eax: self.eax,
            ebx: self.ebx,
            ecx: self.ecx,
            edx: self.edx,
            ..Default::default()
        }
    }

    /// A whole CPUID table from KVM.
    pub fn list_from_kvm(cpuid: &CpuId) -> Vec<CpuidEntry> {
        cpuid.as_slice().iter().map(CpuidEntry::from_kvm).collect()
    }

    /// The KVM-free leaf `machine_types::cpu` works with.
    pub fn to_leaf(&self) -> CpuidLeaf {
        CpuidLeaf {
            function: self.function,
            index: self.index,
            flags: self.flags,
            eax: self.eax,
            ebx: self.ebx,
            ecx: self.ecx,
            edx: self.edx,
        }
    }

    /// From a KVM-free leaf.
    pub fn from_leaf(l: &CpuidLeaf) -> CpuidEntry {
        CpuidEntry {
            function: l.function,
            index: l.index,
            flags: l.flags,
            eax: l.eax,
            ebx: l.ebx,
            ecx: l.ecx,
            edx: l.edx,
        }
    }

    /// A KVM CPUID table from entries.
    pub fn list_to_kvm(entries: &[CpuidEntry]) -> Result<CpuId, vmm_sys_util::fam::Error> {
        let kvm: Vec<kvm_cpuid_entry2> = entries.iter().map(CpuidEntry::to_kvm).collect();
        CpuId::from_entries(&kvm)
    }
}

devstate::record! {
    /// General-purpose registers, RIP and RFLAGS.
    #[allow(missing_docs)]
    pub struct RegsState {
        pub rax: u64,
        pub rbx: u64,
        pub rcx: u64,
        pub rdx: u64,
        pub rsi: u64,
        pub rdi: u64,
        pub rsp: u64,
        pub rbp: u64,
        pub r8: u64,
        pub r9: u64,
        pub r10: u64,
        pub r11: u64,
        pub r12: u64,
        pub r13: u64,
        pub r14: u64,
        pub r15: u64,
        pub rip: u64,
        pub rflags: u64,
    }
}

impl RegsState {
    /// Copies KVM's registers.
    pub fn from_kvm(r: &kvm_regs) -> RegsState {
        RegsState {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }

    /// Back to KVM's type.
    pub fn to_kvm(&self) -> kvm_regs {
        kvm_regs {
            rax: self.rax,
            rbx: self.rbx,
            rcx: self.rcx,
            rdx: self.rdx,
            rsi: self.rsi,
            rdi: self.rdi,
            rsp: self.rsp,
            rbp: self.rbp,
            r8: self.r8,
            r9: self.r9,
            r10: self.r10,
            r11: self.r11,
            r12: self.r12,
            r13: self.r13,
            r14: self.r14,
            r15: self.r15,
            rip: self.rip,
            rflags: self.rflags,
        }
    }
}

devstate::record! {
    /// A segment register (hidden part included).
    #[allow(missing_docs)]
    pub struct SegmentState {
        pub base: u64,
        pub limit: u32,
        pub selector: u16,
        pub type_: u8,
        pub present: u8,
        pub dpl: u8,
        pub db: u8,
        pub s: u8,
        pub l: u8,
        pub g: u8,
        pub avl: u8,
        pub unusable: u8,
    }
}

impl SegmentState {
    /// Copies a KVM segment.
    pub fn from_kvm(s: &kvm_segment) -> SegmentState {
        SegmentState {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
        }
    }

    /// Back to KVM's type.
    pub fn to_kvm(&self) -> kvm_segment {
        kvm_segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector,
            type_: self.type_,
            present: self.present,
            dpl: self.dpl,
            db: self.db,
            s: self.s,
            l: self.l,
            g: self.g,
            avl: self.avl,
            unusable: self.unusable,
            padding: 0,
        }
    }
}

devstate::record! {
    /// GDTR or IDTR.
    pub struct DtableState {
        /// Linear base.
        pub base: u64,
        /// Limit.
        pub limit: u16,
    }
}

impl DtableState {
    fn from_kvm(d: &kvm_dtable) -> DtableState {
        DtableState {
            base: d.base,
            limit: d.limit,
        }
    }

    fn to_kvm(&self) -> kvm_dtable {
        kvm_dtable {
            base: self.base,
            limit: self.limit,
            ..Default::default()
        }
    }
}

devstate::record! {
    /// Segment, descriptor-table and control registers.
    #[allow(missing_docs)]
    pub struct SregsState {
        pub cs: SegmentState,
        pub ds: SegmentState,
        pub es: SegmentState,
        pub fs: SegmentState,
        pub gs: SegmentState,
        pub ss: SegmentState,
        pub tr: SegmentState,
        pub ldt: SegmentState,
        pub gdt: DtableState,
        pub idt: DtableState,
        pub cr0: u64,
        pub cr2: u64,
        pub cr3: u64,
        pub cr4: u64,
        pub cr8: u64,
        pub efer: u64,
        pub apic_base: u64,
        /// Pending external interrupt, 256 bits.
        pub interrupt_bitmap: Vec<u64> [max = 4],
    }
}

impl SregsState {
    /// Copies KVM's special registers.
    pub fn from_kvm(s: &kvm_sregs) -> SregsState {
        SregsState {
            cs: SegmentState::from_kvm(&s.cs),
            ds: SegmentState::from_kvm(&s.ds),
            es: SegmentState::from_kvm(&s.es),
            fs: SegmentState::from_kvm(&s.fs),
            gs: SegmentState::from_kvm(&s.gs),
            ss: SegmentState::from_kvm(&s.ss),
            tr: SegmentState::from_kvm(&s.tr),
            ldt: SegmentState::from_kvm(&s.ldt),
            gdt: DtableState::from_kvm(&s.gdt),
            idt: DtableState::from_kvm(&s.idt),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap.to_vec(),
        }
    }

    /// Back to KVM's type.
    pub fn to_kvm(&self) -> kvm_sregs {
        let mut interrupt_bitmap = [0u64; 4];
        for (d, s) in interrupt_bitmap.iter_mut().zip(&self.interrupt_bitmap) {
            *d = *s;
        }
        kvm_sregs {
            cs: self.cs.to_kvm(),
            ds: self.ds.to_kvm(),
            es: self.es.to_kvm(),
            fs: self.fs.to_kvm(),
            gs: self.gs.to_kvm(),
            ss: self.ss.to_kvm(),
            tr: self.tr.to_kvm(),
            ldt: self.ldt.to_kvm(),
            gdt: self.gdt.to_kvm(),
            idt: self.idt.to_kvm(),
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: self.apic_base,
            interrupt_bitmap,
        }
    }
}

devstate::record! {
    /// Legacy FPU/SSE state.
    pub struct FpuState {
        /// ST0-ST7, 16 bytes each.
        pub fpr: Vec<u8> [max = 128],
        /// Control word.
        pub fcw: u16,
        /// Status word.
        pub fsw: u16,
        /// Abridged tag word.
        pub ftwx: u8,
        /// Last opcode.
        pub last_opcode: u16,
        /// Last instruction pointer.
        pub last_ip: u64,
        /// Last data pointer.
        pub last_dp: u64,
        /// XMM0-XMM15, 16 bytes each.
        pub xmm: Vec<u8> [max = 256],
        /// MXCSR.
        pub mxcsr: u32,
    }
}

impl FpuState {
    /// Copies KVM's FPU state.
    pub fn from_kvm(f: &kvm_fpu) -> FpuState {
        FpuState {
            fpr: f.fpr.iter().flatten().copied().collect(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.iter().flatten().copied().collect(),
            mxcsr: f.mxcsr,
        }
    }

    /// Back to KVM's type.
    pub fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().flatten().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().flatten().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

/// Copies the 4 KiB XSAVE area.
pub fn xsave_from_kvm(x: &kvm_xsave) -> Vec<u32> {
    x.region.to_vec()
}

/// Back to KVM's (4 KiB) type.
pub fn xsave_to_kvm(words: &[u32]) -> kvm_xsave {
    let mut x = kvm_xsave::default();
    for (d, s) in x.region.iter_mut().zip(words) {
        *d = *s;
    }
    x
}

devstate::record! {
    /// One extended control register.
    pub struct XcrEntry {
        /// XCR number.
        pub xcr: u32,
        /// Value.
        pub value: u64,
    }
}

devstate::record! {
    /// Extended control registers.
    pub struct XcrsState {
        /// Flags.
        pub flags: u32,
        /// Registers.
        pub xcrs: Vec<XcrEntry> [max = 16],
    }
}

impl XcrsState {
    /// Copies KVM's XCRs.
    pub fn from_kvm(x: &kvm_xcrs) -> XcrsState {
        let n = (x.nr_xcrs as usize).min(x.xcrs.len());
        XcrsState {
            flags: x.flags,
            xcrs: x.xcrs[..n]
                .iter()
                .map(|e| XcrEntry {
                    xcr: e.xcr,
                    value: e.value,
                })
                .collect(),
        }
    }

    /// Back to KVM's type (at most 16 entries).
    pub fn to_kvm(&self) -> kvm_xcrs {
        let mut x = kvm_xcrs {
            flags: self.flags,
            ..Default::default()
        };
        for (d, s) in x.xcrs.iter_mut().zip(&self.xcrs) {
            *d = kvm_xcr {
                xcr: s.xcr,
                value: s.value,
                ..Default::default()
            };
        }
        x.nr_xcrs = self.xcrs.len().min(x.xcrs.len()) as u32;
        x
    }
}

devstate::record! {
    /// One MSR.
    pub struct MsrEntry {
        /// MSR index.
        pub index: u32,
        /// Value.
        pub data: u64,
    }
}

impl MsrEntry {
    /// Copies KVM's MSR entries.
    pub fn list_from_kvm(msrs: &Msrs) -> Vec<MsrEntry> {
        msrs.as_slice()
            .iter()
            .map(|e| MsrEntry {
                index: e.index,
                data: e.data,
            })
            .collect()
    }

    /// A KVM MSR list from entries.
    pub fn list_to_kvm(entries: &[MsrEntry]) -> Result<Msrs, vmm_sys_util::fam::Error> {
        let kvm: Vec<kvm_msr_entry> = entries
            .iter()
            .map(|e| kvm_msr_entry {
                index: e.index,
                data: e.data,
                ..Default::default()
            })
            .collect();
        Msrs::from_entries(&kvm)
    }
}

/// Copies the LAPIC page.
pub fn lapic_from_kvm(l: &kvm_lapic_state) -> Vec<u8> {
    l.regs.iter().map(|&b| b as u8).collect()
}

/// Back to KVM's type.
pub fn lapic_to_kvm(bytes: &[u8]) -> kvm_lapic_state {
    let mut l = kvm_lapic_state::default();
    for (d, s) in l.regs.iter_mut().zip(bytes) {
        *d = *s as _;
    }
    l
}

/// MP state to KVM's type.
pub fn mp_state_to_kvm(mp_state: u32) -> kvm_mp_state {
    kvm_mp_state { mp_state }
}

devstate::record! {
    /// Pending events (`KVM_GET_VCPU_EVENTS`).
    #[allow(missing_docs)]
    pub struct VcpuEventsState {
        pub exception_injected: u8,
        pub exception_nr: u8,
        pub exception_has_error_code: u8,
        pub exception_pending: u8,
        pub exception_error_code: u32,
        pub interrupt_injected: u8,
        pub interrupt_nr: u8,
        pub interrupt_soft: u8,
        pub interrupt_shadow: u8,
        pub nmi_injected: u8,
        pub nmi_pending: u8,
        pub nmi_masked: u8,
        pub sipi_vector: u32,
        /// `KVM_VCPUEVENT_VALID_*`.
        pub flags: u32,
        pub smi_smm: u8,
        pub smi_pending: u8,
        pub smi_smm_inside_nmi: u8,
        pub smi_latched_init: u8,
        pub triple_fault_pending: u8,
        pub exception_has_payload: u8,
        pub exception_payload: u64,
    }
}

impl VcpuEventsState {
    /// Copies KVM's events.
    pub fn from_kvm(e: &kvm_vcpu_events) -> VcpuEventsState {
        VcpuEventsState {
            exception_injected: e.exception.injected,
            exception_nr: e.exception.nr,
            exception_has_error_code: e.exception.has_error_code,
            exception_pending: e.exception.pending,
            exception_error_code: e.exception.error_code,
            interrupt_injected: e.interrupt.injected,
            interrupt_nr: e.interrupt.nr,
            interrupt_soft: e.interrupt.soft,
            interrupt_shadow: e.interrupt.shadow,
            nmi_injected: e.nmi.injected,
            nmi_pending: e.nmi.pending,
            nmi_masked: e.nmi.masked,
            sipi_vector: e.sipi_vector,
            flags: e.flags,
            smi_smm: e.smi.smm,
            smi_pending: e.smi.pending,
            smi_smm_inside_nmi: e.smi.smm_inside_nmi,
            smi_latched_init: e.smi.latched_init,
            triple_fault_pending: e.triple_fault.pending,
            exception_has_payload: e.exception_has_payload,
            exception_payload: e.exception_payload,
        }
    }

    /// Back to KVM's type.
    pub fn to_kvm(&self) -> kvm_vcpu_events {
        let mut e = kvm_vcpu_events::default();
        e.exception.injected = self.exception_injected;
        e.exception.nr = self.exception_nr;
        e.exception.has_error_code = self.exception_has_error_code;
        e.exception.pending = self.exception_pending;
        e.exception.error_code = self.exception_error_code;
        e.interrupt.injected = self.interrupt_injected;
        e.interrupt.nr = self.interrupt_nr;
        e.interrupt.soft = self.interrupt_soft;
        e.interrupt.shadow = self.interrupt_shadow;
        e.nmi.injected = self.nmi_injected;
        e.nmi.pending = self.nmi_pending;
        e.nmi.masked = self.nmi_masked;
        e.sipi_vector = self.sipi_vector;
        e.flags = self.flags;
        e.smi.smm = self.smi_smm;
        e.smi.pending = self.smi_pending;
        e.smi.smm_inside_nmi = self.smi_smm_inside_nmi;
        e.smi.latched_init = self.smi_latched_init;
        e.triple_fault.pending = self.triple_fault_pending;
        e.exception_has_payload = self.exception_has_payload;
        e.exception_payload = self.exception_payload;
        e
    }
}

devstate::record! {
    /// Debug registers.
    pub struct DebugRegsState {
        /// DR0-DR3.
        pub db: Vec<u64> [max = 4],
        /// DR6.
        pub dr6: u64,
        /// DR7.
        pub dr7: u64,
        /// Flags.
        pub flags: u64,
    }
}

impl DebugRegsState {
    /// Copies KVM's debug registers.
    pub fn from_kvm(d: &kvm_debugregs) -> DebugRegsState {
        DebugRegsState {
            db: d.db.to_vec(),
            dr6: d.dr6,
            dr7: d.dr7,
            flags: d.flags,
        }
    }

    /// Back to KVM's type.
    pub fn to_kvm(&self) -> kvm_debugregs {
        let mut d = kvm_debugregs {
            dr6: self.dr6,
            dr7: self.dr7,
            flags: self.flags,
            ..Default::default()
        };
        for (x, s) in d.db.iter_mut().zip(&self.db) {
            *x = *s;
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `cpu` section whose XSAVE area is not the 4 KiB layout this build knows is refused
    /// by section name and offset before anything is loaded.
    #[test]
    fn an_unknown_xsave_layout_is_refused_with_its_offset() {
        let m = machine_types::MachineType::lookup("ferry-2.1").unwrap();
        let mut s = VcpuState {
            cpu_model: "ferry-v3".into(),
            xsave: vec![0; 512],
            lapic: vec![0; LAPIC_BYTES as usize],
            ..Default::default()
        };
        s.sregs.interrupt_bitmap = vec![0; 4];
        s.fpu.fpr = vec![0; 128];
        s.fpu.xmm = vec![0; 256];
        s.debug_regs.db = vec![0; 4];
        let rec = devstate::encode_section(&mut s, 0, m, devstate::Tag::Section).unwrap();
        let mut w = devstate::StreamWriter::new(Vec::new(), m, "test").unwrap();
        w.config(&mut migration::ConfigRecord::default()).unwrap();
        w.raw(&rec).unwrap();
        let bytes = w.finish().unwrap();
        let c = crate::full_catalog();
        let mut r = devstate::StreamReader::new(bytes.as_slice(), Some(&c)).unwrap();
        r.next_item().unwrap();
        let devstate::Item::Section(raw) = r.next_item().unwrap() else {
            panic!("expected a section");
        };
        let offset = raw.offset;
        assert_eq!(
            raw.load::<VcpuState>().unwrap_err().to_string(),
            format!(
                "Section 'cpu' at offset {offset} rejected by post_load: XSAVE area has 512 words, expected 1024"
            )
        );
    }

    #[test]
    fn conversions_round_trip() {
        let regs = kvm_regs {
            rax: 1,
            r15: 2,
            rip: 3,
            rflags: 0x202,
            ..Default::default()
        };
        assert_eq!(RegsState::from_kvm(&regs).to_kvm(), regs);

        let mut sregs = kvm_sregs {
            cr0: 0x8000_0011,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        };
        sregs.cs = kvm_segment {
            selector: 8,
            limit: 0xffff_ffff,
            type_: 11,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        sregs.interrupt_bitmap[2] = 1 << 5;
        let s = SregsState::from_kvm(&sregs);
        assert_eq!(s.cs.l, 1);
        assert_eq!(SregsState::from_kvm(&s.to_kvm()), s);

        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[15][15] = 0xaa;
        fpu.fpr[7][0] = 0x55;
        let f = FpuState::from_kvm(&fpu);
        assert_eq!((f.xmm.len(), f.fpr.len()), (256, 128));
        assert_eq!(FpuState::from_kvm(&f.to_kvm()), f);

        let mut ev = kvm_vcpu_events::default();
        ev.nmi.pending = 1;
        ev.exception_payload = 9;
        ev.triple_fault.pending = 1;
        let e = VcpuEventsState::from_kvm(&ev);
        assert_eq!(VcpuEventsState::from_kvm(&e.to_kvm()), e);

        let x = XcrsState {
            flags: 0,
            xcrs: vec![XcrEntry { xcr: 0, value: 3 }],
        };
        assert_eq!(XcrsState::from_kvm(&x.to_kvm()), x);

        let m = vec![
            MsrEntry {
                index: 0x10,
                data: 77,
            },
            MsrEntry {
                index: 0xc000_0080,
                data: 0x500,
            },
        ];
        assert_eq!(
            MsrEntry::list_from_kvm(&MsrEntry::list_to_kvm(&m).unwrap()),
            m
        );

        let lapic: Vec<u8> = (0..1024).map(|i| i as u8).collect();
        assert_eq!(lapic_from_kvm(&lapic_to_kvm(&lapic)), lapic);

        let d = DebugRegsState {
            db: vec![1, 2, 3, 4],
            dr6: 0xffff0ff0,
            dr7: 0x400,
            flags: 0,
        };
        assert_eq!(DebugRegsState::from_kvm(&d.to_kvm()), d);
    }
}
