//! The guest CPU model as KVM takes it. Named models (`ferry-v2`, `ferry-v3`, machine type
//! `ferry-2.1`) are fixed tables from [`machine_types::cpu`]; the legacy ones
//! (`ferry-cpu-v1`, `ferry-cpu-v2`) are KVM's supported CPUID masked to a baseline:
//!
//! | model | XSAVE features (XCR0) | extra CPUID |
//! |---|---|---|
//! | `ferry-cpu-v1` | x87, SSE (`0x3`) | none |
//! | `ferry-cpu-v2` | x87, SSE, AVX (`0x7`) | AVX (leaf 1 ECX bit 28), XSAVE leaf 0xD subleaf 2 |
//!
//! Both legacy models keep the same baseline of leaf 1 / 0x8000_0001 bits below; leaves
//! 5..=0x1e other than 0xb and 0xd are zeroed. AVX is offered only when both the model and
//! the host have it.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};
pub use machine_types::CpuModel;
use machine_types::cpu::CpuidLeaf;

use super::persist::CpuidEntry;

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
/// Leaf 1 EDX bits kept (the same baseline as the named models).
pub const LEAF1_EDX_KEEP: u32 = machine_types::cpu::LEAF1_EDX_BASE;
/// Leaf 0x8000_0001 ECX bits kept: LAHF/SAHF, LZCNT, PREFETCHW.
pub const EXT1_ECX_KEEP: u32 = (1 << 0) | (1 << 5) | (1 << 8);
/// Leaf 0x8000_0001 EDX bits kept: SYSCALL, NX, RDTSCP, LM.
pub const EXT1_EDX_KEEP: u32 = (1 << 11) | (1 << 20) | (1 << 27) | (1 << 29);
/// XCR0 bits any model may enable (`ferry-state`'s, which normalises XSAVE areas by it).
pub use ferry_state::vcpu::XCR0_ALLOWED;
/// Leaf 1 ECX: AVX.
pub const LEAF1_ECX_AVX: u32 = 1 << 28;

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;

/// The XSAVE features a model offers (`["x87", "sse"]`, ...).
pub fn features(model: CpuModel) -> Vec<String> {
    machine_types::cpu::xcr0_names(model.xcr0_mask())
}

/// Names of the XSAVE features set in `xcr0`.
pub fn xcr0_features(xcr0: u64) -> Vec<String> {
    machine_types::cpu::xcr0_names(xcr0)
}

/// Looks a CPU model up by its stream name.
pub fn model_by_name(name: &str) -> Option<CpuModel> {
    CpuModel::by_name(name)
}

/// KVM's entries as plain leaves.
pub fn leaves_from_kvm(c: &CpuId) -> Vec<CpuidLeaf> {
    c.as_slice()
        .iter()
        .map(|e| CpuidEntry::from_kvm(e).to_leaf())
        .collect()
}

/// Plain leaves as KVM's entries.
pub fn leaves_to_kvm(leaves: &[CpuidLeaf]) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let entries: Vec<CpuidEntry> = leaves.iter().map(CpuidEntry::from_leaf).collect();
    CpuidEntry::list_to_kvm(&entries)
}

/// The leaves of the host CPU's own CPUID that hold [`machine_types::cpu::NATIVE_ISA`] bits.
pub fn native_leaves() -> Vec<CpuidLeaf> {
    [(1, 0), (7, 0), (0xd, 1), (0x8000_0001, 0)]
        .into_iter()
        .map(|(function, index)| {
            let r = std::arch::x86_64::__cpuid_count(function, index);
            CpuidLeaf {
                function,
                index,
                flags: machine_types::cpu::FLAG_INDEXED,
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
            }
        })
        .collect()
}

/// What a guest can run on this host (KVM's supported CPUID plus the native ISA, see
/// [`machine_types::cpu::with_native_isa`]) and the MSRs KVM lists, from `/dev/kvm`.
pub fn host_support() -> Result<(Vec<CpuidLeaf>, Vec<u32>), kvm_ioctls::Error> {
    host_support_of(&kvm_ioctls::Kvm::new()?)
}

/// [`host_support`] through an open `/dev/kvm`.
pub fn host_support_of(
    kvm: &kvm_ioctls::Kvm,
) -> Result<(Vec<CpuidLeaf>, Vec<u32>), kvm_ioctls::Error> {
    let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
    let mut msrs = kvm.get_msr_index_list()?.as_slice().to_vec();
    // MTRRs are emulated by KVM for every vCPU but never listed.
    msrs.extend(
        (0x200..=0x20f)
            .chain([0x2ff, 0x250, 0x258, 0x259])
            .chain(0x268..=0x26f),
    );
    let host = machine_types::cpu::with_native_isa(&leaves_from_kvm(&cpuid), &native_leaves());
    Ok((host, msrs))
}

/// The CPUID every vCPU of `model` starts from (APIC ids still 0): the model's fixed table,
/// or for a legacy model `host` (KVM's supported CPUID) masked.
pub fn base_cpuid(model: CpuModel, host: &[CpuidLeaf]) -> Result<CpuId, vmm_sys_util::fam::Error> {
    match model.fixed_cpuid() {
        Some(t) => leaves_to_kvm(&t),
        None => {
            let mut c = leaves_to_kvm(host)?;
            mask_entries(c.as_mut_slice(), model);
            Ok(c)
        }
    }
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
    let ours: Vec<&str> = ours.iter().map(String::as_str).collect();
    let theirs: Vec<&str> = theirs.iter().map(String::as_str).collect();
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
        for m in machine_types::cpu::ALL_MODELS {
            assert!(m.msrs().iter().all(|&x| x != MSR_IA32_TSC));
        }
    }
}
