//! The guest CPU model: KVM's supported CPUID masked to the machine type's
//! [`CpuModel`] (never the host CPU passed through), the XCR0 bits it may enable, and the
//! fixed list of MSRs that travel in the `cpu` section.
//!
//! | model | XSAVE features (XCR0) | extra CPUID |
//! |---|---|---|
//! | `ferry-cpu-v1` | x87, SSE (`0x3`) | none |
//! | `ferry-cpu-v2` | x87, SSE, AVX (`0x7`) | AVX (leaf 1 ECX bit 28), XSAVE leaf 0xD subleaf 2 |
//!
//! Both keep the same baseline of leaf 1 / 0x8000_0001 bits below; leaves 5..=0x1e other
//! than 0xb and 0xd are zeroed. AVX is offered only when both the model and the host have it.

use kvm_bindings::kvm_cpuid_entry2;
pub use machine_types::CpuModel;

/// Leaf 1 ECX bits kept: SSE3, PCLMULQDQ, SSSE3, CX16, SSE4.1, SSE4.2, x2APIC, MOVBE,
/// POPCNT, TSC-deadline, AES, XSAVE, AVX; the hypervisor bit is set.
pub const LEAF1_ECX_KEEP: u32 = (1 << 0)
    | (1 << 1)
    | (1 << 9)
    | (1 << 13)
    | (1 << 19)
    | (1 << 20)
    | (1 << 21)
    | (1 << 22)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26)
    | (1 << 28);
/// Leaf 1 ECX hypervisor bit.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bits kept: FPU, VME, DE, PSE, TSC, MSR, PAE, MCE, CX8, APIC, SEP, MTRR, PGE,
/// MCA, CMOV, PAT, PSE36, CLFSH, MMX, FXSR, SSE, SSE2.
pub const LEAF1_EDX_KEEP: u32 = (0x0000_ffff & !(1 << 10))
    | (1 << 16)
    | (1 << 17)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// Leaf 0x8000_0001 ECX bits kept: LAHF/SAHF, LZCNT, PREFETCHW.
pub const EXT1_ECX_KEEP: u32 = (1 << 0) | (1 << 5) | (1 << 8);
/// Leaf 0x8000_0001 EDX bits kept: SYSCALL, NX, RDTSCP, LM.
pub const EXT1_EDX_KEEP: u32 = (1 << 11) | (1 << 20) | (1 << 27) | (1 << 29);
/// XCR0 bits any model may enable: x87, SSE, AVX.
pub const XCR0_ALLOWED: u32 = 0b111;
/// Leaf 1 ECX: AVX.
pub const LEAF1_ECX_AVX: u32 = 1 << 28;

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;

/// The MSRs every CPU model saves and restores (besides `IA32_TSC`, which travels apart as a
/// volatile field), in restore order. A host that lacks one leaves it out of its streams.
pub const MODEL_MSRS: &[u32] = &[
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

/// XSAVE feature names, by XCR0 bit.
const XSAVE_FEATURES: [&str; 3] = ["x87", "sse", "avx"];

/// The XSAVE features a model offers (`["x87", "sse"]`, ...).
pub fn features(model: CpuModel) -> Vec<&'static str> {
    xcr0_features(model.xcr0_mask())
}

/// Names of the XSAVE features set in `xcr0` (unknown bits as `bitN`).
pub fn xcr0_features(xcr0: u64) -> Vec<&'static str> {
    (0..64)
        .filter(|b| xcr0 & (1 << b) != 0)
        .map(|b| XSAVE_FEATURES.get(b).copied().unwrap_or("xsave-component"))
        .collect()
}

/// Looks a CPU model up by its stream name.
pub fn model_by_name(name: &str) -> Option<CpuModel> {
    [CpuModel::FerryV1, CpuModel::FerryV2]
        .into_iter()
        .find(|m| m.name() == name)
}

/// Describes how the model a stream recorded (`stream`) differs from this VM's, naming the
/// features only one side has: `CPU model differs: stream has ferry-cpu-v2 (avx), this VM
/// has ferry-cpu-v1`. `None` when they are the same.
pub fn model_difference(stream: &str, vm: CpuModel) -> Option<String> {
    if stream == vm.name() {
        return None;
    }
    let ours = features(vm);
    let describe = |name: &str, mine: &[&str], other: &[&str]| {
        let extra: Vec<&str> = mine
            .iter()
            .copied()
            .filter(|f| !other.contains(f))
            .collect();
        if extra.is_empty() {
            name.to_owned()
        } else {
            format!("{name} ({})", extra.join(", "))
        }
    };
    let theirs = model_by_name(stream).map(features).unwrap_or_default();
    let stream_desc = if model_by_name(stream).is_some() {
        describe(stream, &theirs, &ours)
    } else {
        format!("unknown model '{stream}'")
    };
    Some(format!(
        "CPU model differs: stream has {stream_desc}, this VM has {}",
        describe(vm.name(), &ours, &theirs)
    ))
}

fn zero(e: &mut kvm_cpuid_entry2) {
    e.eax = 0;
    e.ebx = 0;
    e.ecx = 0;
    e.edx = 0;
}

/// Masks KVM's supported CPUID to CPU model `model`, in place. Leaves 5..=0x1e other than
/// 0xb and 0xd (monitor, thermal, structured extended features, PMU, RDT, SGX, PT, AMX, ...)
/// are zeroed; AVX and its XSAVE state are kept only for models whose XCR0 mask has it.
pub fn mask_entries(entries: &mut [kvm_cpuid_entry2], model: CpuModel) {
    let xcr0 = model.xcr0_mask() as u32 & XCR0_ALLOWED;
    let host_avx = entries
        .iter()
        .any(|e| e.function == 1 && e.ecx & LEAF1_ECX_AVX != 0);
    let avx = host_avx && xcr0 & 0b100 != 0;
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx = (e.ecx & LEAF1_ECX_KEEP) | LEAF1_ECX_HYPERVISOR;
                if !avx {
                    e.ecx &= !LEAF1_ECX_AVX;
                }
                e.edx &= LEAF1_EDX_KEEP;
            }
            0xd => match e.index {
                0 => {
                    e.eax &= xcr0;
                    if !avx {
                        e.eax &= !0b100;
                    }
                    e.edx = 0;
                    let size = if e.eax & 0b100 != 0 { 832 } else { 576 };
                    e.ebx = size;
                    e.ecx = size;
                }
                1 => {
                    e.eax &= 1; // XSAVEOPT only
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                2 if avx => {}
                _ => zero(e),
            },
            0xb => {}
            5..=0x1e => zero(e),
            0x8000_0001 => {
                e.ecx &= EXT1_ECX_KEEP;
                e.edx &= EXT1_EDX_KEEP;
            }
            _ => {}
        }
    }
}

/// Sets the APIC ids of vCPU `index` (leaf 1 EBX\[31:24\], leaves 0xb/0x1f EDX).
pub fn set_apic_id(entries: &mut [kvm_cpuid_entry2], index: u8) {
    for e in entries.iter_mut() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(index) << 24),
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, v: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: v,
            ebx: v,
            ecx: v,
            edx: v,
            ..Default::default()
        }
    }

    #[test]
    fn masks_to_baseline() {
        let mut e = vec![
            entry(1, 0, u32::MAX),
            entry(7, 0, u32::MAX),
            entry(0xd, 0, u32::MAX),
            entry(0xd, 1, u32::MAX),
            entry(0xd, 2, u32::MAX),
            entry(0xd, 5, u32::MAX),
            entry(0x8000_0001, 0, u32::MAX),
            entry(0x4000_0001, 0, 0x1234),
        ];
        let v1 = {
            let mut e = e.clone();
            mask_entries(&mut e, CpuModel::FerryV1);
            e
        };
        mask_entries(&mut e, CpuModel::FerryV2);
        set_apic_id(&mut e, 3);
        assert_eq!(v1[0].ecx & LEAF1_ECX_AVX, 0, "no AVX in ferry-cpu-v1");
        assert_eq!((v1[2].eax, v1[2].ecx), (0b11, 576));
        assert_eq!(v1[4].eax, 0, "no AVX state leaf in ferry-cpu-v1");
        assert_eq!(e[0].ecx, LEAF1_ECX_KEEP | LEAF1_ECX_HYPERVISOR);
        assert_eq!(e[0].ecx & (1 << 27), 0, "OSXSAVE is the guest's business");
        assert_eq!(e[0].edx & (1 << 25), 1 << 25, "SSE kept");
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx, e[1].edx), (0, 0, 0, 0));
        assert_eq!((e[2].eax, e[2].edx, e[2].ecx), (0b111, 0, 832));
        assert_eq!(e[3].eax, 1);
        assert_eq!(
            e[4].eax,
            u32::MAX,
            "AVX state leaf kept when AVX is offered"
        );
        assert_eq!(e[5].eax, 0);
        assert_eq!(e[6].edx, EXT1_EDX_KEEP);
        assert_eq!(e[7].eax, 0x1234, "KVM leaves untouched");
    }

    #[test]
    fn host_without_avx_gets_no_avx_even_for_v2() {
        let mut e = vec![
            entry(1, 0, !LEAF1_ECX_AVX),
            entry(0xd, 0, u32::MAX),
            entry(0xd, 2, 7),
        ];
        mask_entries(&mut e, CpuModel::FerryV2);
        assert_eq!(e[0].ecx & LEAF1_ECX_AVX, 0);
        assert_eq!((e[1].eax, e[1].ebx), (0b11, 576));
        assert_eq!(e[2].eax, 0);
    }

    #[test]
    fn model_differences_name_the_feature() {
        assert_eq!(model_difference("ferry-cpu-v1", CpuModel::FerryV1), None);
        assert_eq!(
            model_difference("ferry-cpu-v2", CpuModel::FerryV1).unwrap(),
            "CPU model differs: stream has ferry-cpu-v2 (avx), this VM has ferry-cpu-v1"
        );
        assert_eq!(
            model_difference("ferry-cpu-v1", CpuModel::FerryV2).unwrap(),
            "CPU model differs: stream has ferry-cpu-v1, this VM has ferry-cpu-v2 (avx)"
        );
        assert_eq!(
            model_difference("host", CpuModel::FerryV2).unwrap(),
            "CPU model differs: stream has unknown model 'host', this VM has ferry-cpu-v2 (x87, sse, avx)"
        );
        assert_eq!(xcr0_features(0x7), ["x87", "sse", "avx"]);
        assert!(MODEL_MSRS.iter().all(|&m| m != MSR_IA32_TSC));
    }
}
