//! The guest CPUID: KVM's supported set, masked to a conservative baseline so guest code
//! (and later migration streams) never depends on host extras. XCR0 is limited to
//! x87|SSE|AVX; the test guest itself uses nothing beyond x87/SSE.

use kvm_bindings::kvm_cpuid_entry2;

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
/// XCR0 bits the guest may enable: x87, SSE, AVX.
pub const XCR0_ALLOWED: u32 = 0b111;

fn zero(e: &mut kvm_cpuid_entry2) {
    e.eax = 0;
    e.ebx = 0;
    e.ecx = 0;
    e.edx = 0;
}

/// Masks KVM's supported CPUID to the baseline, in place. Leaves 5..=0x1e other than 0xb
/// and 0xd (monitor, thermal, structured extended features, PMU, RDT, SGX, PT, AMX, ...)
/// are zeroed.
pub fn mask_entries(entries: &mut [kvm_cpuid_entry2]) {
    let avx = entries
        .iter()
        .any(|e| e.function == 1 && e.ecx & (1 << 28) != 0);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx = (e.ecx & LEAF1_ECX_KEEP) | LEAF1_ECX_HYPERVISOR;
                e.edx &= LEAF1_EDX_KEEP;
            }
            0xd => match e.index {
                0 => {
                    e.eax &= XCR0_ALLOWED;
                    e.edx = 0;
                    let size = if avx && e.eax & 0b100 != 0 { 832 } else { 576 };
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
        mask_entries(&mut e);
        set_apic_id(&mut e, 3);
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
}
