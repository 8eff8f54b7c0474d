//! Guest CPU models, CPUID feature names and the XSAVE layout.
//!
//! Two kinds of model exist. The legacy ones of `ferry-1.0` to `ferry-2.0`
//! (`ferry-cpu-v1`, `ferry-cpu-v2`) are KVM's supported CPUID masked to a baseline, so vendor,
//! family and cache leaves are the host's. The named models of `ferry-2.1` and later
//! (`ferry-v2`, `ferry-v3`) are fixed tables: every CPUID leaf the guest can read, XCR0 and
//! the MSR list come from [`CpuModel::fixed_cpuid`] and [`CpuModel::msrs`], never from the host.
//!
//! Nothing here needs KVM: the VMM feeds the host's supported CPUID in as [`CpuidLeaf`]s.

use serde::Serialize;

/// A guest-visible CPU model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuModel {
    /// Host CPUID masked to a baseline; x87 and SSE only (XCR0 = 0x3).
    FerryV1,
    /// Host CPUID masked to a baseline; x87, SSE and AVX (XCR0 = 0x7).
    FerryV2,
    /// Fixed x86-64-v2 table (SSE4.2, POPCNT, CX16), XCR0 = 0x3.
    X86V2,
    /// Fixed x86-64-v3 table (v2 plus AVX, AVX2, BMI1/2, FMA, F16C, MOVBE, LZCNT, XSAVE),
    /// XCR0 = 0x7.
    X86V3,
}

/// Every model, legacy ones last.
pub const ALL_MODELS: [CpuModel; 4] = [
    CpuModel::X86V2,
    CpuModel::X86V3,
    CpuModel::FerryV2,
    CpuModel::FerryV1,
];

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One CPUID leaf/subleaf as KVM takes it (`kvm_cpuid_entry2` without the padding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidLeaf {
    /// Leaf.
    pub function: u32,
    /// Subleaf.
    pub index: u32,
    /// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` (1) for leaves with subleaves.
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

impl CpuidLeaf {
    /// The value of register `r`.
    pub fn reg(&self, r: Reg) -> u32 {
        match r {
            Reg::Eax => self.eax,
            Reg::Ebx => self.ebx,
            Reg::Ecx => self.ecx,
            Reg::Edx => self.edx,
        }
    }

    fn reg_mut(&mut self, r: Reg) -> &mut u32 {
        match r {
            Reg::Eax => &mut self.eax,
            Reg::Ebx => &mut self.ebx,
            Reg::Ecx => &mut self.ecx,
            Reg::Edx => &mut self.edx,
        }
    }
}

/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`.
pub const FLAG_INDEXED: u32 = 1;

/// A named CPUID feature bit (names as QEMU's `-cpu` spells them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// QEMU's name, e.g. `avx2`.
    pub name: &'static str,
    /// Leaf.
    pub function: u32,
    /// Subleaf.
    pub index: u32,
    /// Register.
    pub reg: Reg,
    /// Bit number.
    pub bit: u8,
}

const fn f(name: &'static str, function: u32, index: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        function,
        index,
        reg,
        bit,
    }
}

/// The feature bits the VMM knows by name: every bit a model may set, and the common ones
/// a host may lack.
pub const FEATURES: &[Feature] = &[
    f("fpu", 1, 0, Reg::Edx, 0),
    f("vme", 1, 0, Reg::Edx, 1),
    f("de", 1, 0, Reg::Edx, 2),
    f("pse", 1, 0, Reg::Edx, 3),
    f("tsc", 1, 0, Reg::Edx, 4),
    f("msr", 1, 0, Reg::Edx, 5),
    f("pae", 1, 0, Reg::Edx, 6),
    f("mce", 1, 0, Reg::Edx, 7),
    f("cx8", 1, 0, Reg::Edx, 8),
    f("apic", 1, 0, Reg::Edx, 9),
    f("sep", 1, 0, Reg::Edx, 11),
    f("mtrr", 1, 0, Reg::Edx, 12),
    f("pge", 1, 0, Reg::Edx, 13),
    f("mca", 1, 0, Reg::Edx, 14),
    f("cmov", 1, 0, Reg::Edx, 15),
    f("pat", 1, 0, Reg::Edx, 16),
    f("pse36", 1, 0, Reg::Edx, 17),
    f("clflush", 1, 0, Reg::Edx, 19),
    f("mmx", 1, 0, Reg::Edx, 23),
    f("fxsr", 1, 0, Reg::Edx, 24),
    f("sse", 1, 0, Reg::Edx, 25),
    f("sse2", 1, 0, Reg::Edx, 26),
    f("pni", 1, 0, Reg::Ecx, 0),
    f("pclmulqdq", 1, 0, Reg::Ecx, 1),
    f("ssse3", 1, 0, Reg::Ecx, 9),
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("sse4.1", 1, 0, Reg::Ecx, 19),
    f("sse4.2", 1, 0, Reg::Ecx, 20),
    f("x2apic", 1, 0, Reg::Ecx, 21),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("tsc-deadline", 1, 0, Reg::Ecx, 24),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("smep", 7, 0, Reg::Ebx, 7),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("avx512f", 7, 0, Reg::Ebx, 16),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("adx", 7, 0, Reg::Ebx, 19),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("sha-ni", 7, 0, Reg::Ebx, 29),
    f("xsaveopt", 0xd, 1, Reg::Eax, 0),
    f("lahf-lm", 0x8000_0001, 0, Reg::Ecx, 0),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    f("3dnowprefetch", 0x8000_0001, 0, Reg::Ecx, 8),
    f("syscall", 0x8000_0001, 0, Reg::Edx, 11),
    f("nx", 0x8000_0001, 0, Reg::Edx, 20),
    f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
    f("lm", 0x8000_0001, 0, Reg::Edx, 29),
    f("kvmclock", 0x4000_0001, 0, Reg::Eax, 0),
    f("kvm-nopiodelay", 0x4000_0001, 0, Reg::Eax, 1),
    f("kvmclock2", 0x4000_0001, 0, Reg::Eax, 3),
    f("kvm-asyncpf", 0x4000_0001, 0, Reg::Eax, 4),
    f("kvm-steal-time", 0x4000_0001, 0, Reg::Eax, 5),
    f("kvm-pv-eoi", 0x4000_0001, 0, Reg::Eax, 6),
    f("kvmclock-stable-bit", 0x4000_0001, 0, Reg::Eax, 24),
];

/// Registers holding feature flags: a guest may use a bit here only if the host has it.
const FEATURE_REGS: &[(u32, u32, Reg)] = &[
    (1, 0, Reg::Ecx),
    (1, 0, Reg::Edx),
    (7, 0, Reg::Ebx),
    (7, 0, Reg::Ecx),
    (7, 0, Reg::Edx),
    (0xd, 1, Reg::Eax),
    (0x8000_0001, 0, Reg::Ecx),
    (0x8000_0001, 0, Reg::Edx),
    (0x4000_0001, 0, Reg::Eax),
];

/// Bits KVM emulates or computes itself, so the host's supported CPUID need not list them:
/// OSXSAVE, the hypervisor bit, x2APIC and the TSC-deadline timer (leaf 1 ECX).
const EMULATED: &[(u32, u32, Reg, u32)] = &[(
    1,
    0,
    Reg::Ecx,
    (1 << 27) | (1 << 31) | (1 << 21) | (1 << 24),
)];

/// Instruction-set extensions a guest executes on the host CPU without the hypervisor's
/// help. `kvm_pvm` leaves them out of `KVM_GET_SUPPORTED_CPUID` although its guests run
/// them natively, so [`with_native_isa`] takes them from the host CPU's own CPUID.
pub const NATIVE_ISA: &[&str] = &[
    "pni",
    "pclmulqdq",
    "ssse3",
    "cx16",
    "sse4.1",
    "sse4.2",
    "movbe",
    "popcnt",
    "aes",
    "rdrand",
    "bmi1",
    "bmi2",
    "erms",
    "adx",
    "sha-ni",
    "lahf-lm",
    "abm",
    "3dnowprefetch",
    "xsaveopt",
];

/// Extensions that also need KVM to manage the AVX XSAVE component.
pub const NATIVE_AVX: &[&str] = &["xsave", "avx", "avx2", "fma", "f16c"];

/// KVM's supported CPUID (`kvm`) plus the [`NATIVE_ISA`] bits the host CPU (`native`, what
/// the CPUID instruction returns to the VMM) has; the AVX family only when KVM supports the
/// AVX XSAVE component. What a guest can really run on this host.
pub fn with_native_isa(kvm: &[CpuidLeaf], native: &[CpuidLeaf]) -> Vec<CpuidLeaf> {
    let mut out = kvm.to_vec();
    let avx_state = host_xcr0(kvm) & 0b111 == 0b111;
    let names = NATIVE_ISA
        .iter()
        .chain(NATIVE_AVX.iter().filter(|_| avx_state));
    for feat in names.filter_map(|n| feature(n)) {
        let has = find(native, feat.function, feat.index)
            .is_some_and(|l| l.reg(feat.reg) & (1 << feat.bit) != 0);
        if !has {
            continue;
        }
        if let Some(l) = out.iter_mut().find(|l| {
            l.function == feat.function && (l.index == feat.index || l.flags & FLAG_INDEXED == 0)
        }) {
            *l.reg_mut(feat.reg) |= 1 << feat.bit;
        }
    }
    out
}

/// Looks a feature up by name.
pub fn feature(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name == name)
}

fn feature_name(function: u32, index: u32, reg: Reg, bit: u8) -> String {
    FEATURES
        .iter()
        .find(|f| f.function == function && f.index == index && f.reg == reg && f.bit == bit)
        .map(|f| f.name.to_owned())
        .unwrap_or_else(|| {
            let r = format!("{reg:?}").to_lowercase();
            format!("cpuid[{function:#x}.{index}].{r} bit {bit}")
        })
}

/// Finds leaf `function`/`index` (the subleaf is ignored for leaves without subleaves).
pub fn find(table: &[CpuidLeaf], function: u32, index: u32) -> Option<&CpuidLeaf> {
    table
        .iter()
        .find(|l| l.function == function && (l.index == index || l.flags & FLAG_INDEXED == 0))
}

/// The feature bits `wanted` sets that `host` does not: names, in table order.
pub fn missing_features(wanted: &[CpuidLeaf], host: &[CpuidLeaf]) -> Vec<String> {
    let mut out = Vec::new();
    for &(function, index, reg) in FEATURE_REGS {
        let Some(w) = find(wanted, function, index) else {
            continue;
        };
        let have = find(host, function, index).map_or(0, |l| l.reg(reg));
        let emulated = EMULATED
            .iter()
            .filter(|e| (e.0, e.1, e.2) == (function, index, reg))
            .fold(0, |a, e| a | e.3);
        let lacking = w.reg(reg) & !have & !emulated;
        for bit in 0..32u8 {
            if lacking & (1 << bit) != 0 {
                out.push(feature_name(function, index, reg, bit));
            }
        }
    }
    out
}

/// The XCR0 bits the host supports (leaf 0xd subleaf 0, EDX:EAX).
pub fn host_xcr0(host: &[CpuidLeaf]) -> u64 {
    find(host, 0xd, 0).map_or(0, |l| u64::from(l.eax) | u64::from(l.edx) << 32)
}

/// Clears the named features in `host` (the test-only `--x-hide-host-features` knob), so a
/// refusal can be shown on a host that has them. XSAVE component `avx` goes with `avx`.
pub fn hide_features(host: &mut [CpuidLeaf], names: &[&Feature]) {
    for feat in names {
        for l in host.iter_mut() {
            if l.function == feat.function && (l.index == feat.index || l.flags & FLAG_INDEXED == 0)
            {
                *l.reg_mut(feat.reg) &= !(1u32 << feat.bit);
            }
            if feat.name == "avx" && l.function == 0xd && l.index == 0 {
                l.eax &= !0b100;
            }
        }
    }
}

/// XSAVE component names, by XCR0 bit.
pub const XSAVE_COMPONENTS: [&str; 10] = [
    "x87",
    "sse",
    "avx",
    "bndregs",
    "bndcsr",
    "opmask",
    "zmm-hi256",
    "hi16-zmm",
    "pt",
    "pkru",
];

/// Names of the XSAVE components set in `xcr0` (unknown bits as `componentN`).
pub fn xcr0_names(xcr0: u64) -> Vec<String> {
    (0..64)
        .filter(|b| xcr0 & (1 << b) != 0)
        .map(|b| {
            XSAVE_COMPONENTS
                .get(b)
                .map_or_else(|| format!("component{b}"), |s| (*s).to_owned())
        })
        .collect()
}

/// The MSRs the legacy models save and restore (besides `IA32_TSC`, which travels apart as a
/// volatile field), in restore order. A host that lacks one leaves it out of its streams.
pub const LEGACY_MSRS: &[u32] = &[
    0x3b,  // IA32_TSC_ADJUST
    0x174, // IA32_SYSENTER_CS
    0x175, // IA32_SYSENTER_ESP
    0x176, // IA32_SYSENTER_EIP
    0x1a0, // IA32_MISC_ENABLE
    0x277, // IA32_PAT
    0x2ff, // IA32_MTRR_DEF_TYPE
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207, // variable MTRRs 0-3
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f, // variable MTRRs 4-7
    0x250,
    0x258,
    0x259, // fixed MTRRs 64K, 16K
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,       // fixed MTRRs 4K
    0x6e0,       // IA32_TSC_DEADLINE (after the TSC)
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // KVM wall clock
    0x4b56_4d01, // KVM system time (kvmclock)
    0x4b56_4d02, // KVM async page fault
    0x4b56_4d03, // KVM steal time
    0x4b56_4d04, // KVM PV EOI
    0x4b56_4d05, // KVM poll control
    0x4b56_4d06, // KVM async page fault interrupt
];

/// The MSRs of the named models: every one must exist on the host, or the model is refused.
pub const NAMED_MSRS: &[u32] = &[
    0x3b,  // IA32_TSC_ADJUST
    0x174, // IA32_SYSENTER_CS
    0x175, // IA32_SYSENTER_ESP
    0x176, // IA32_SYSENTER_EIP
    0x1a0, // IA32_MISC_ENABLE
    0x277, // IA32_PAT
    0x2ff, // IA32_MTRR_DEF_TYPE
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207,
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f, // variable MTRRs
    0x250,
    0x258,
    0x259,
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,       // fixed MTRRs
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0x4b56_4d00, // KVM wall clock
    0x4b56_4d01, // KVM system time (kvmclock)
];

/// A readable name for an MSR of the lists above.
pub fn msr_name(index: u32) -> String {
    let name = match index {
        0x3b => "IA32_TSC_ADJUST",
        0x174 => "IA32_SYSENTER_CS",
        0x175 => "IA32_SYSENTER_ESP",
        0x176 => "IA32_SYSENTER_EIP",
        0x1a0 => "IA32_MISC_ENABLE",
        0x277 => "IA32_PAT",
        0x2ff => "IA32_MTRR_DEF_TYPE",
        0x200..=0x20f => "IA32_MTRR_PHYS",
        0x250..=0x26f => "IA32_MTRR_FIX",
        0x6e0 => "IA32_TSC_DEADLINE",
        0xc000_0081 => "STAR",
        0xc000_0082 => "LSTAR",
        0xc000_0083 => "CSTAR",
        0xc000_0084 => "SFMASK",
        0xc000_0102 => "KERNEL_GS_BASE",
        0xc000_0103 => "TSC_AUX",
        0x4b56_4d00..=0x4b56_4d06 => "KVM paravirtual",
        _ => "",
    };
    if name.is_empty() {
        format!("MSR {index:#x}")
    } else {
        format!("MSR {index:#x} ({name})")
    }
}

/// Leaf 1 EDX of every model: FPU, VME, DE, PSE, TSC, MSR, PAE, MCE, CX8, APIC, SEP, MTRR,
/// PGE, MCA, CMOV, PAT, PSE36, CLFSH, MMX, FXSR, SSE, SSE2.
pub const LEAF1_EDX_BASE: u32 = (0x0000_ffff & !(1 << 10))
    | (1 << 16)
    | (1 << 17)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);

/// Guest physical address bits of the named models (leaf 0x8000_0008); a host must have at
/// least as many.
pub const NAMED_PHYS_BITS: u32 = 40;

fn regs(s: &str) -> [u32; 3] {
    let b = s.as_bytes();
    let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8)]
}

impl CpuModel {
    /// Name recorded in streams, checked at handshake, and given to `--cpu`.
    pub fn name(self) -> &'static str {
        match self {
            CpuModel::FerryV1 => "ferry-cpu-v1",
            CpuModel::FerryV2 => "ferry-cpu-v2",
            CpuModel::X86V2 => "ferry-v2",
            CpuModel::X86V3 => "ferry-v3",
        }
    }

    /// One line for `--cpu help` and `query-cpu-definitions`.
    pub fn description(self) -> &'static str {
        match self {
            CpuModel::FerryV1 => "host CPUID masked to a baseline, x87/SSE (ferry-1.0, ferry-1.1)",
            CpuModel::FerryV2 => "host CPUID masked to a baseline, x87/SSE/AVX (ferry-2.0)",
            CpuModel::X86V2 => "fixed x86-64-v2 model: SSE4.2, POPCNT, CX16; x87/SSE state",
            CpuModel::X86V3 => {
                "fixed x86-64-v3 model: v2 plus AVX, AVX2, BMI1/2, FMA, F16C, MOVBE, LZCNT; x87/SSE/AVX state"
            }
        }
    }

    /// Looks a model up by name.
    pub fn by_name(name: &str) -> Option<CpuModel> {
        ALL_MODELS.into_iter().find(|m| m.name() == name)
    }

    /// Whether the guest sees a fixed table (host-independent) rather than the host masked.
    pub fn is_fixed(self) -> bool {
        matches!(self, CpuModel::X86V2 | CpuModel::X86V3)
    }

    /// The XCR0 bits a guest may enable under this model.
    pub fn xcr0_mask(self) -> u64 {
        match self {
            CpuModel::FerryV1 | CpuModel::X86V2 => 0x3,
            CpuModel::FerryV2 | CpuModel::X86V3 => 0x7,
        }
    }

    /// The MSRs this model saves and restores, `IA32_TSC` apart.
    pub fn msrs(self) -> &'static [u32] {
        if self.is_fixed() {
            NAMED_MSRS
        } else {
            LEGACY_MSRS
        }
    }

    /// The fixed CPUID table of a named model (APIC ids 0; the VMM sets them per vCPU);
    /// `None` for the legacy, host-masked models.
    pub fn fixed_cpuid(self) -> Option<Vec<CpuidLeaf>> {
        let v3 = match self {
            CpuModel::X86V2 => false,
            CpuModel::X86V3 => true,
            _ => return None,
        };
        let leaf = |function, index, flags, eax, ebx, ecx, edx| CpuidLeaf {
            function,
            index,
            flags,
            eax,
            ebx,
            ecx,
            edx,
        };
        let vendor = regs("GenuineIntel");
        // Family 6; model 0x1a stepping 3 (Nehalem-class) for v2, 0x3c stepping 4
        // (Haswell-class) for v3.
        let signature = if v3 { 0x0003_06c4 } else { 0x0001_06a3 };
        // SSE3, SSSE3, CX16, SSE4.1, SSE4.2, x2APIC, POPCNT, hypervisor.
        let mut ecx1: u32 =
            1 | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 23) | (1 << 31);
        if v3 {
            // FMA, MOVBE, XSAVE, AVX, F16C.
            ecx1 |= (1 << 12) | (1 << 22) | (1 << 26) | (1 << 28) | (1 << 29);
        }
        let edx1 = LEAF1_EDX_BASE;
        // BMI1, AVX2, BMI2.
        let ebx7: u32 = if v3 {
            (1 << 3) | (1 << 5) | (1 << 8)
        } else {
            0
        };
        let xcr0 = self.xcr0_mask() as u32;
        let xsave_size = if v3 { 832 } else { 576 };
        let mut t = vec![
            leaf(0, 0, 0, 0xd, vendor[0], vendor[2], vendor[1]),
            // CLFLUSH line 8 qwords, 1 logical processor per package, APIC id 0.
            leaf(1, 0, 0, signature, 0x0001_0800, ecx1, edx1),
            // One descriptor byte 0xff: "use leaf 4".
            leaf(2, 0, 0, 0x0000_ff01, 0, 0, 0),
            // Deterministic caches: L1d 32 KiB 8-way, L1i 32 KiB 8-way, L2 256 KiB 8-way,
            // L3 8 MiB 16-way, 64-byte lines, self-initialising.
            leaf(4, 0, FLAG_INDEXED, 0x121, 0x01c0_003f, 63, 0),
            leaf(4, 1, FLAG_INDEXED, 0x122, 0x01c0_003f, 63, 0),
            leaf(4, 2, FLAG_INDEXED, 0x143, 0x01c0_003f, 511, 0),
            leaf(4, 3, FLAG_INDEXED, 0x163, 0x03c0_003f, 8191, 0),
            leaf(4, 4, FLAG_INDEXED, 0, 0, 0, 0),
            leaf(5, 0, 0, 0, 0, 0, 0),
            leaf(6, 0, 0, 0, 0, 0, 0),
            leaf(7, 0, FLAG_INDEXED, 0, ebx7, 0, 0),
            leaf(0xa, 0, 0, 0, 0, 0, 0),
            // Topology: one thread per core, one core per package level shift 8.
            leaf(0xb, 0, FLAG_INDEXED, 0, 1, 0x100, 0),
            leaf(0xb, 1, FLAG_INDEXED, 8, 1, 0x201, 0),
            leaf(0xb, 2, FLAG_INDEXED, 0, 0, 2, 0),
            leaf(0xd, 0, FLAG_INDEXED, xcr0, xsave_size, xsave_size, 0),
            leaf(0xd, 1, FLAG_INDEXED, u32::from(v3), 0, 0, 0),
        ];
        if v3 {
            t.push(leaf(0xd, 2, FLAG_INDEXED, 256, 576, 0, 0));
        }
        let kvm = regs("KVMKVMKVM\0\0\0");
        t.push(leaf(0x4000_0000, 0, 0, 0x4000_0001, kvm[0], kvm[1], kvm[2]));
        // kvmclock and kvmclock2.
        t.push(leaf(0x4000_0001, 0, 0, 1 | (1 << 3), 0, 0, 0));
        t.push(leaf(0x8000_0000, 0, 0, 0x8000_0008, 0, 0, 0));
        // LAHF/SAHF (+ LZCNT on v3); SYSCALL, NX, LM.
        let ecx81 = if v3 { 1 | (1 << 5) } else { 1 };
        t.push(leaf(
            0x8000_0001,
            0,
            0,
            0,
            0,
            ecx81,
            (1 << 11) | (1 << 20) | (1 << 29),
        ));
        let brand = if v3 {
            "Ferry x86-64-v3 CPU"
        } else {
            "Ferry x86-64-v2 CPU"
        };
        let mut b = [0u8; 48];
        b[..brand.len()].copy_from_slice(brand.as_bytes());
        for (i, chunk) in b.chunks(16).enumerate() {
            let w = |j: usize| u32::from_le_bytes(chunk[j..j + 4].try_into().unwrap_or([0; 4]));
            t.push(leaf(0x8000_0002 + i as u32, 0, 0, w(0), w(4), w(8), w(12)));
        }
        t.push(leaf(0x8000_0005, 0, 0, 0, 0, 0, 0));
        // L2: 256 KiB, 8-way (code 6), 64-byte lines.
        t.push(leaf(0x8000_0006, 0, 0, 0, 0, 0x0100_6040, 0));
        t.push(leaf(0x8000_0007, 0, 0, 0, 0, 0, 0));
        t.push(leaf(0x8000_0008, 0, 0, NAMED_PHYS_BITS | 48 << 8, 0, 0, 0));
        Some(t)
    }

    /// Everything this host lacks to run the model: feature names, XSAVE components, too few
    /// physical address bits, missing MSRs (`host_msrs` = what KVM lists). Empty when it can
    /// run it. Legacy models adapt to the host, so only their XSAVE limit is checked.
    pub fn host_lacks(self, host: &[CpuidLeaf], host_msrs: &[u32]) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(table) = self.fixed_cpuid() {
            out.extend(missing_features(&table, host));
            if let Some(l) = find(host, 0x8000_0008, 0)
                && l.eax & 0xff < NAMED_PHYS_BITS
            {
                out.push(format!(
                    "{NAMED_PHYS_BITS} physical address bits (host has {})",
                    l.eax & 0xff
                ));
            }
            for &m in self.msrs() {
                if !host_msrs.contains(&m) {
                    out.push(msr_name(m));
                }
            }
            let extra = self.xcr0_mask() & !host_xcr0(host);
            out.extend(
                xcr0_names(extra)
                    .into_iter()
                    .map(|n| format!("XSAVE component {n}")),
            );
        }
        out
    }
}

/// Byte layout of the standard-format XSAVE area (SDM vol. 1, 13.4), as KVM_GET_XSAVE
/// returns it: the legacy FXSAVE region, the XSAVE header, then AVX at 576.
pub mod xsave {
    /// Word (u32) index of MXCSR.
    pub const MXCSR: usize = 6;
    /// Word index of MXCSR_MASK: which MXCSR bits the host CPU supports (host-defined).
    pub const MXCSR_MASK: usize = 7;
    /// Words of the x87 part of the legacy region (FCW..FDP, then ST0-ST7).
    pub const X87: [std::ops::Range<usize>; 2] = [0..6, 8..40];
    /// Words of XMM0-XMM15.
    pub const XMM: std::ops::Range<usize> = 40..104;
    /// Reserved words of the legacy region.
    pub const RESERVED: std::ops::Range<usize> = 104..116;
    /// Words 464..512: software-available; the kernel writes its own `fx_sw_reserved` there
    /// (host XSAVE size and features), so it is host-defined.
    pub const SW_RESERVED: std::ops::Range<usize> = 116..128;
    /// Word index of XSTATE_BV (low half).
    pub const XSTATE_BV: usize = 128;
    /// The rest of the 64-byte header after XSTATE_BV (XCOMP_BV, reserved).
    pub const HEADER_REST: std::ops::Range<usize> = 129..144;
    /// Words of the AVX component (YMM upper halves).
    pub const AVX: std::ops::Range<usize> = 144..208;
    /// Words after the components any model enables (AVX-512, PKRU, ... of the host).
    pub const BEYOND: std::ops::Range<usize> = 208..1024;
    /// Words of the 4 KiB area.
    pub const WORDS: usize = 1024;

    /// The guest's view of an XSAVE area: host-defined fields (MXCSR_MASK, the kernel's
    /// software-reserved words, XCOMP_BV) cleared, and every component whose XSTATE_BV bit is
    /// clear (its init state, which the kernel fills in host-dependently) zeroed, as is any
    /// component outside `xcr0` (the model's limit). Two areas that normalise equal hold the
    /// same guest state.
    pub fn normalise(words: &[u32], xcr0: u64) -> Vec<u32> {
        let mut w = words.to_vec();
        if w.len() < WORDS {
            return w;
        }
        let bv = u64::from(w[XSTATE_BV]) & xcr0;
        let zero = |w: &mut Vec<u32>, r: std::ops::Range<usize>| w[r].fill(0);
        w[MXCSR_MASK] = 0;
        zero(&mut w, SW_RESERVED);
        zero(&mut w, RESERVED);
        zero(&mut w, HEADER_REST);
        w[XSTATE_BV] = bv as u32;
        if bv & 1 == 0 {
            for r in X87 {
                zero(&mut w, r);
            }
        }
        if bv & 2 == 0 {
            zero(&mut w, XMM);
        }
        if bv & 4 == 0 {
            zero(&mut w, AVX);
        }
        zero(&mut w, BEYOND);
        w
    }

    /// Names of the host-defined or init-state fields in which `a` and `b` differ (for a
    /// diff that reports them apart).
    pub fn host_field_differences(a: &[u32], b: &[u32]) -> Vec<&'static str> {
        let mut out = Vec::new();
        if a.len() < WORDS || b.len() < WORDS {
            return out;
        }
        let differ = |r: std::ops::Range<usize>| a[r.clone()] != b[r];
        if a[MXCSR_MASK] != b[MXCSR_MASK] {
            out.push("MXCSR_MASK");
        }
        if differ(SW_RESERVED) {
            out.push("software-reserved words");
        }
        if differ(HEADER_REST) || differ(RESERVED) {
            out.push("reserved header words");
        }
        if a[XSTATE_BV] != b[XSTATE_BV] || differ(BEYOND) {
            out.push("components outside the model");
        }
        if X87.into_iter().any(differ) || differ(XMM) || differ(AVX) {
            out.push("components in their init state");
        }
        out
    }

    /// Prepares a stream's XSAVE area for `KVM_SET_XSAVE` on this host: the host-defined
    /// fields come from `local` (a fresh vCPU's own area), XSTATE_BV is limited to `xcr0`.
    /// Fails, naming the bits, when the guest's MXCSR uses bits this host's MXCSR_MASK lacks.
    pub fn for_host(stream: &[u32], local: &[u32], xcr0: u64) -> Result<Vec<u32>, String> {
        let mut w = stream.to_vec();
        if w.len() < WORDS || local.len() < WORDS {
            return Err(format!(
                "XSAVE area has {} words, expected {WORDS}",
                w.len()
            ));
        }
        let mask = if local[MXCSR_MASK] == 0 {
            0xffbf
        } else {
            local[MXCSR_MASK]
        };
        if w[MXCSR] & !mask != 0 {
            return Err(format!(
                "MXCSR {:#x} uses bits {:#x} this host does not support (MXCSR_MASK {mask:#x})",
                w[MXCSR],
                w[MXCSR] & !mask
            ));
        }
        w[MXCSR_MASK] = local[MXCSR_MASK];
        w[SW_RESERVED].copy_from_slice(&local[SW_RESERVED]);
        w[XSTATE_BV] = (u64::from(w[XSTATE_BV]) & xcr0) as u32;
        w[HEADER_REST].fill(0);
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_like(model: CpuModel) -> Vec<CpuidLeaf> {
        model.fixed_cpuid().unwrap()
    }

    #[test]
    fn named_models_are_fixed_tables() {
        for m in [CpuModel::X86V2, CpuModel::X86V3] {
            let t = m.fixed_cpuid().unwrap();
            assert_eq!(t, m.fixed_cpuid().unwrap(), "deterministic");
            let l0 = find(&t, 0, 0).unwrap();
            let mut v = Vec::new();
            for r in [l0.ebx, l0.edx, l0.ecx] {
                v.extend_from_slice(&r.to_le_bytes());
            }
            assert_eq!(&v, b"GenuineIntel");
            let xcr0 = find(&t, 0xd, 0).unwrap().eax;
            assert_eq!(u64::from(xcr0), m.xcr0_mask());
            let brand: Vec<u8> = (0..3)
                .flat_map(|i| {
                    let l = find(&t, 0x8000_0002 + i, 0).unwrap();
                    [l.eax, l.ebx, l.ecx, l.edx]
                        .into_iter()
                        .flat_map(u32::to_le_bytes)
                })
                .collect();
            assert!(String::from_utf8_lossy(&brand).starts_with("Ferry x86-64-v"));
        }
        assert!(CpuModel::FerryV2.fixed_cpuid().is_none());
        let v3 = CpuModel::X86V3.fixed_cpuid().unwrap();
        assert_eq!(find(&v3, 7, 0).unwrap().ebx & (1 << 5), 1 << 5, "avx2");
        let v2 = CpuModel::X86V2.fixed_cpuid().unwrap();
        assert_eq!(find(&v2, 1, 0).unwrap().ecx & (1 << 28), 0, "no avx in v2");
    }

    #[test]
    fn a_host_lacking_a_feature_is_named() {
        let mut host = host_like(CpuModel::X86V3);
        // The host has more than the model: fine.
        host.iter_mut()
            .filter(|l| l.function == 7)
            .for_each(|l| l.ebx |= 1 << 16);
        let msrs = NAMED_MSRS.to_vec();
        assert!(CpuModel::X86V3.host_lacks(&host, &msrs).is_empty());
        hide_features(
            &mut host,
            &[feature("avx2").unwrap(), feature("avx").unwrap()],
        );
        assert_eq!(
            CpuModel::X86V3.host_lacks(&host, &msrs[1..]),
            [
                "avx",
                "avx2",
                "MSR 0x3b (IA32_TSC_ADJUST)",
                "XSAVE component avx"
            ]
        );
        assert!(CpuModel::X86V2.host_lacks(&host, &msrs).is_empty());
        let mut unknown = host_like(CpuModel::X86V2);
        unknown[1].ecx |= 1 << 2;
        assert_eq!(
            missing_features(&unknown, &host),
            ["cpuid[0x1.0].ecx bit 2"]
        );
    }

    #[test]
    fn native_isa_fills_what_kvm_pvm_leaves_out() {
        // kvm_pvm: no SSE3..SSE4.2/AVX in the supported CPUID, AVX state in leaf 0xd.
        let mut kvm = host_like(CpuModel::X86V3);
        kvm[1].ecx = (1 << 13) | (1 << 21) | (1 << 31);
        kvm.iter_mut()
            .filter(|l| l.function == 7)
            .for_each(|l| l.ebx = 0);
        let native = host_like(CpuModel::X86V3);
        assert!(!CpuModel::X86V3.host_lacks(&kvm, NAMED_MSRS).is_empty());
        let eff = with_native_isa(&kvm, &native);
        assert_eq!(
            CpuModel::X86V3.host_lacks(&eff, NAMED_MSRS),
            Vec::<String>::new()
        );
        // Without AVX state in KVM, the AVX family stays out.
        kvm.iter_mut()
            .filter(|l| l.function == 0xd && l.index == 0)
            .for_each(|l| l.eax = 0x3);
        let eff = with_native_isa(&kvm, &native);
        assert!(CpuModel::X86V2.host_lacks(&eff, NAMED_MSRS).is_empty());
        assert!(
            CpuModel::X86V3
                .host_lacks(&eff, NAMED_MSRS)
                .contains(&"avx2".to_owned())
        );
    }

    #[test]
    fn names_round_trip() {
        for m in ALL_MODELS {
            assert_eq!(CpuModel::by_name(m.name()), Some(m));
        }
        assert_eq!(CpuModel::by_name("host"), None);
        assert_eq!(xcr0_names(0x207), ["x87", "sse", "avx", "pkru"]);
        assert_eq!(msr_name(0x6e0), "MSR 0x6e0 (IA32_TSC_DEADLINE)");
    }

    /// An area as an AMD host returns it (MXCSR_MASK 0x2ffff, its own sw-reserved words)
    /// and as an Intel host does (0xffff): the same guest state.
    fn area(mxcsr_mask: u32, sw: u32, bv: u32) -> Vec<u32> {
        let mut w = vec![0u32; xsave::WORDS];
        w[0] = 0x037f;
        w[xsave::MXCSR] = 0x1f80;
        w[xsave::MXCSR_MASK] = mxcsr_mask;
        w[xsave::SW_RESERVED.start] = 0x4650_5853;
        w[xsave::SW_RESERVED.start + 1] = sw;
        w[xsave::XSTATE_BV] = bv;
        w
    }

    #[test]
    fn host_fields_normalise_away() {
        let amd = area(0x2ffff, 0x988, 0);
        let intel = area(0xffff, 0xa88, 0);
        assert_ne!(amd, intel);
        assert_eq!(xsave::normalise(&amd, 0x7), xsave::normalise(&intel, 0x7));
        assert_eq!(
            xsave::host_field_differences(&amd, &intel),
            ["MXCSR_MASK", "software-reserved words"]
        );
        // Guest state is not normalised away: an XMM register of SSE in use.
        let mut a = area(0x2ffff, 0, 0b10);
        let b = a.clone();
        a[xsave::XMM.start] = 1;
        assert_ne!(xsave::normalise(&a, 0x7), xsave::normalise(&b, 0x7));
        // But the same register in init state (bit clear) is the kernel's filler.
        a[xsave::XSTATE_BV] = 0;
        let mut b = b;
        b[xsave::XSTATE_BV] = 0;
        assert_eq!(xsave::normalise(&a, 0x7), xsave::normalise(&b, 0x7));
    }

    #[test]
    fn restore_takes_host_fields_from_this_host() {
        let stream = area(0x2ffff, 0x988, 0b111 | 1 << 9);
        let local = area(0xffff, 0xa88, 0);
        let w = xsave::for_host(&stream, &local, 0x7).unwrap();
        assert_eq!(w[xsave::MXCSR_MASK], 0xffff);
        assert_eq!(w[xsave::SW_RESERVED.start + 1], 0xa88);
        assert_eq!(
            w[xsave::XSTATE_BV],
            0b111,
            "PKRU bit outside the model dropped"
        );
        let mut bad = stream.clone();
        bad[xsave::MXCSR] = 0x1f80 | 1 << 17;
        assert_eq!(
            xsave::for_host(&bad, &local, 0x7).unwrap_err(),
            "MXCSR 0x21f80 uses bits 0x20000 this host does not support (MXCSR_MASK 0xffff)"
        );
    }
}
