//! The CPUID a fresh vCPU reports: KVM's supported table, shaped as a VMM shapes it for a
//! guest that believes what it reads.
//!
//! - Each vCPU has its own APIC id, and the topology leaves describe one package of `vcpus`
//!   single-threaded cores, so the guest's idea of its CPUs matches the MADT.
//! - Leaf 0xD lists only components with a sized sub-leaf, and the largest area they need:
//!   KVM drops (with a warning) a sub-leaf whose size the host CPU reports as zero yet keeps its
//!   component in sub-leaf 0, and Linux refuses XSAVE over such an inconsistency.
//! - The hypervisor bit is set; KVM's own leaves (0x4000_0000 on) pass through.
//! - No invariant TSC is promised, and a baseline template takes the AVX family away.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use luvmm_resources::config::CpuTemplate;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSTATE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_POWER_MANAGEMENT: u32 = 0x8000_0007;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

/// Leaf 0x8000_0007 EDX: the TSC runs at a constant rate in every state (invariant TSC).
const EDX_INVARIANT_TSC: u32 = 1 << 8;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Topology level types (leaf 0xB/0x1F ECX 15:8).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
/// The legacy XSAVE region and its header, present whatever the features.
const XSAVE_LEGACY_AND_HEADER: u32 = 512 + 64;
/// Leaf 0xD sub-leaf ECX bit 0: the component is a supervisor (IA32_XSS) one.
const XSTATE_SUPERVISOR: u32 = 1;

/// Bits luvmm sets itself instead of taking them from KVM, as (leaf, sub-leaf, register index:
/// 0 EAX, 1 EBX, 2 ECX, 3 EDX, bits): no host needs to offer them for a saved vCPU to run.
pub(super) const LUVMM_OWNED: &[(u32, u32, usize, u32)] = &[
    (LEAF_FEATURES, 0, 2, ECX_HYPERVISOR),
    (LEAF_FEATURES, 0, 3, EDX_HTT),
];

/// Feature bits a [`CpuTemplate::Baseline`] guest never sees: everything that needs XSAVE
/// state beyond x87 and SSE (the AVX family, AVX-512, AMX, protection keys), per
/// (leaf, sub-leaf, register index: 0 EAX, 1 EBX, 2 ECX, 3 EDX).
const BASELINE_CLEARED: &[(u32, u32, usize, u32)] = &[
    // FMA, AVX, F16C.
    (1, 0, 2, (1 << 12) | (1 << 28) | (1 << 29)),
    // AVX2 and every AVX-512 bit of EBX.
    (7, 0, 1, (1 << 5) | 0xdc23_0000),
    // AVX512_VBMI, PKU, OSPKE, AVX512_VBMI2, VAES, VPCLMULQDQ, AVX512_VNNI, BITALG,
    // VPOPCNTDQ.
    (
        7,
        0,
        2,
        (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (0xf << 9) | (1 << 14),
    ),
    // AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8.
    (7, 0, 3, (0b11 << 2) | (1 << 8) | (0xf << 22)),
    // AVX_VNNI, AVX512_BF16, AVX_IFMA.
    (7, 1, 0, (0b11 << 4) | (1 << 23)),
    // AMD's XOP and FMA4.
    (0x8000_0001, 0, 2, (1 << 11) | (1 << 16)),
];

/// The XSAVE components a baseline guest may enable: x87 and SSE.
const BASELINE_XSTATE: u64 = 0b11;

/// Shapes `leaves` (KVM_GET_SUPPORTED_CPUID's table) for vCPU `id` of `vcpus`, as `template`
/// says, in place.
pub fn shape(leaves: &mut Vec<kvm_cpuid_entry2>, id: u32, vcpus: u32, template: CpuTemplate) {
    if template == CpuTemplate::Baseline {
        for leaf in leaves.iter_mut() {
            for &(function, index, register, bits) in BASELINE_CLEARED {
                if leaf.function == function && leaf.index == index {
                    *register_mut(leaf, register) &= !bits;
                }
            }
        }
    }
    let xstate_allowed = match template {
        CpuTemplate::Host => u64::MAX,
        CpuTemplate::Baseline => BASELINE_XSTATE,
    };
    let core_bits = bits_for(vcpus);
    for leaf in leaves.iter_mut() {
        match leaf.function {
            LEAF_FEATURES => {
                // Initial APIC id (EBX 31:24) and logical processors per package (23:16).
                let count = vcpus.min(0xff);
                leaf.ebx = (leaf.ebx & 0x0000_ffff) | (id << 24) | (count << 16);
                if vcpus > 1 {
                    leaf.edx |= EDX_HTT;
                } else {
                    leaf.edx &= !EDX_HTT;
                }
                leaf.ecx |= ECX_HYPERVISOR;
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package - 1 (EAX 31:26); a cache is shared by one thread (25:14),
                // but the last level, which all cores share.
                let level = (leaf.eax >> 5) & 0x7;
                let others = vcpus.saturating_sub(1);
                let sharing = if level >= 3 { others.min(0xfff) } else { 0 };
                leaf.eax = (leaf.eax & 0x3fff) | (others.min(0x3f) << 26) | (sharing << 14);
            }
            LEAF_POWER_MANAGEMENT => {
                // No invariant TSC: a luvmm guest is paused, moved to a new process and across
                // a kexec, and its TSC is not promised to count the blackout as a clock would.
                // Without the promise Linux keeps kvm-clock, which KVM carries across, as its
                // clocksource instead of the TSC (as QEMU keeps `invtsc` off for VMs that
                // migrate).
                leaf.edx &= !EDX_INVARIANT_TSC;
            }
            LEAF_AMD_SIZES => {
                // APIC id bits for cores (ECX 15:12) and cores - 1 (7:0).
                leaf.ecx =
                    (leaf.ecx & !0xf0ff) | (core_bits << 12) | vcpus.saturating_sub(1).min(0xff);
            }
            LEAF_AMD_TOPOLOGY => {
                // Extended APIC id; one thread per core, core id = id; one node.
                leaf.eax = id;
                leaf.ebx = id & 0xff;
                leaf.ecx = 0;
            }
            _ => {}
        }
    }
    for function in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        describe_topology(leaves, function, id, vcpus);
    }
    make_xstate_consistent(leaves, xstate_allowed);
}

/// Rewrites topology leaf `function` (0xB or 0x1F), where KVM offers it, as one package of
/// `vcpus` single-threaded cores seen from vCPU `id`: sub-leaf 0 the SMT level, 1 the core
/// level, 2 the end. KVM offers only an empty sub-leaf 0 ("no topology"), and a guest that
/// finds no core level counts each vCPU as a package of its own.
fn describe_topology(leaves: &mut Vec<kvm_cpuid_entry2>, function: u32, id: u32, vcpus: u32) {
    let Some(first) = leaves.iter().find(|l| l.function == function).copied() else {
        return;
    };
    leaves.retain(|l| l.function != function);
    let levels = [
        (0, 1, LEVEL_SMT),
        (bits_for(vcpus), vcpus, LEVEL_CORE),
        (0, 0, 0),
    ];
    for (index, (eax, ebx, level_type)) in (0u32..).zip(levels) {
        leaves.push(kvm_cpuid_entry2 {
            function,
            index,
            flags: first.flags | KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx: (level_type << 8) | index,
            edx: id,
            ..first
        });
    }
}

/// Register `index` (0 EAX, 1 EBX, 2 ECX, 3 EDX) of `leaf`.
fn register_mut(leaf: &mut kvm_cpuid_entry2, index: usize) -> &mut u32 {
    match index {
        0 => &mut leaf.eax,
        1 => &mut leaf.ebx,
        2 => &mut leaf.ecx,
        _ => &mut leaf.edx,
    }
}

/// The number of APIC id bits that `count` ids need.
fn bits_for(count: u32) -> u32 {
    32 - count.saturating_sub(1).leading_zeros()
}

/// Keeps in leaf 0xD only the components `allowed` that have a sub-leaf with a size, and
/// states the largest area the remaining user components need.
fn make_xstate_consistent(leaves: &mut Vec<kvm_cpuid_entry2>, allowed: u64) {
    let sized = |leaves: &[kvm_cpuid_entry2], component: u32| {
        leaves
            .iter()
            .any(|l| l.function == LEAF_XSTATE && l.index == component && l.eax != 0)
    };
    let mut user = 0u64;
    let mut supervisor = 0u64;
    for leaf in leaves.iter().filter(|l| l.function == LEAF_XSTATE) {
        match leaf.index {
            0 => user = u64::from(leaf.eax) | (u64::from(leaf.edx) << 32),
            1 => supervisor = u64::from(leaf.ecx) | (u64::from(leaf.edx) << 32),
            _ => {}
        }
    }
    // x87 and SSE live in the legacy region and have no sub-leaf of their own.
    let keep = |mask: u64, leaves: &[kvm_cpuid_entry2]| -> u64 {
        (2..64)
            .filter(|&c| mask & (1 << c) != 0 && sized(leaves, c))
            .fold(mask & 0b11, |m, c| m | 1 << c)
    };
    let user_kept = keep(user & allowed, leaves);
    let supervisor_kept = keep(supervisor & allowed, leaves) & !0b11;
    let max_size = leaves
        .iter()
        .filter(|l| l.function == LEAF_XSTATE && l.index >= 2 && l.index < 64)
        .filter(|l| user_kept & (1 << l.index) != 0 && l.ecx & XSTATE_SUPERVISOR == 0)
        .map(|l| l.ebx.saturating_add(l.eax))
        .fold(XSAVE_LEGACY_AND_HEADER, u32::max);
    leaves.retain(|l| {
        l.function != LEAF_XSTATE
            || l.index < 2
            || l.index >= 64
            || (user_kept | supervisor_kept) & (1 << l.index) != 0
    });
    for leaf in leaves.iter_mut().filter(|l| l.function == LEAF_XSTATE) {
        match leaf.index {
            0 => {
                leaf.eax = low(user_kept);
                leaf.edx = high(user_kept);
                // EBX follows the guest's XCR0 (KVM updates it); at reset XCR0 is x87 only.
                leaf.ebx = XSAVE_LEGACY_AND_HEADER;
                leaf.ecx = max_size;
            }
            1 => {
                leaf.ecx = low(supervisor_kept);
                leaf.edx = high(supervisor_kept);
            }
            _ => {}
        }
    }
}

#[allow(clippy::cast_possible_truncation)]
fn low(mask: u64) -> u32 {
    mask as u32
}

fn high(mask: u64) -> u32 {
    low(mask >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn find(leaves: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        leaves
            .iter()
            .find(|l| l.function == function && l.index == index)
            .copied()
    }

    #[test]
    fn each_vcpu_reports_its_own_apic_id_the_package_and_the_hypervisor_bit() {
        let mut leaves = vec![
            leaf(1, 0, [0, 0xff12_3456, 0, 0]),
            leaf(0xb, 0, [0, 0, 0, 0]),
            leaf(0xb, 1, [0, 0, 0, 0]),
            leaf(0xb, 2, [5, 5, 5, 5]),
            leaf(7, 0, [0, 9, 0, 0]),
        ];
        shape(&mut leaves, 2, 3, CpuTemplate::Host);
        let l1 = find(&leaves, 1, 0).unwrap();
        assert_eq!(l1.ebx, 0x0203_3456);
        assert_eq!(l1.ecx, ECX_HYPERVISOR);
        assert_eq!(l1.edx, EDX_HTT);
        let smt = find(&leaves, 0xb, 0).unwrap();
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&leaves, 0xb, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&leaves, 0xb, 2).unwrap();
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 2));
        assert_eq!(find(&leaves, 7, 0).unwrap().ebx, 9);
    }

    #[test]
    fn kvms_empty_topology_leaves_become_one_package_of_cores() {
        // What KVM_GET_SUPPORTED_CPUID gives: sub-leaf 0 only, all zeros.
        let mut leaves = vec![leaf(0xb, 0, [0, 0, 0, 0]), leaf(0x1f, 0, [0, 0, 0, 0])];
        shape(&mut leaves, 1, 2, CpuTemplate::Host);
        for function in [0xb, 0x1f] {
            let levels: Vec<_> = (0..3)
                .map(|i| find(&leaves, function, i).expect("each sub-leaf"))
                .map(|l| (l.eax, l.ebx, l.ecx, l.edx, l.flags))
                .collect();
            let significant = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
            assert_eq!(
                levels,
                [
                    (0, 1, 0x100, 1, significant),
                    (1, 2, 0x201, 1, significant),
                    (0, 0, 2, 1, significant),
                ]
            );
        }
        assert_eq!(leaves.len(), 6);
    }

    #[test]
    fn the_guest_is_promised_no_invariant_tsc() {
        let mut leaves = vec![leaf(0x8000_0007, 0, [0, 0, 0, EDX_INVARIANT_TSC | 1])];
        shape(&mut leaves, 0, 1, CpuTemplate::Host);
        assert_eq!(find(&leaves, 0x8000_0007, 0).unwrap().edx, 1);
    }

    #[test]
    fn one_vcpu_is_not_a_multi_processor_package() {
        let mut leaves = vec![leaf(1, 0, [0, 0, 0, EDX_HTT])];
        shape(&mut leaves, 0, 1, CpuTemplate::Host);
        assert_eq!(find(&leaves, 1, 0).unwrap().edx & EDX_HTT, 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(5), 3);
    }

    #[test]
    fn an_xsave_component_without_a_sized_sub_leaf_is_dropped_from_leaf_0xd() {
        // Sub-leaf 0 lists x87, SSE, AVX (2), PKRU (9) and AMX data (18); AMX data's own
        // sub-leaf is missing and PKRU's has size zero.
        let mut leaves = vec![
            leaf(0xd, 0, [0x4_0207, 2000, 11008, 0]),
            leaf(0xd, 1, [0xf, 0, 1 << 11, 0]),
            leaf(0xd, 2, [256, 576, 0, 0]),
            leaf(0xd, 9, [0, 0, 0, 0]),
            leaf(0xd, 11, [16, 0, 1, 0]),
        ];
        shape(&mut leaves, 0, 1, CpuTemplate::Host);
        let l0 = find(&leaves, 0xd, 0).unwrap();
        assert_eq!(l0.eax, 0b111, "only the sized user components stay");
        assert_eq!(l0.ecx, 832, "the largest area is AVX's end");
        assert_eq!(l0.ebx, 576);
        assert_eq!(find(&leaves, 0xd, 1).unwrap().ecx, 1 << 11);
        assert!(find(&leaves, 0xd, 9).is_none());
        assert!(find(&leaves, 0xd, 2).is_some());
    }

    #[test]
    fn a_baseline_guest_gets_no_avx_no_protection_keys_and_only_x87_and_sse_state() {
        let mut leaves = vec![
            leaf(1, 0, [0, 0, (1 << 28) | (1 << 26) | (1 << 20), 0]),
            leaf(
                7,
                0,
                [0, (1 << 5) | (1 << 16) | (1 << 3), (1 << 3) | (1 << 4), 0],
            ),
            leaf(0xd, 0, [0x207, 576, 2696, 0]),
            leaf(0xd, 1, [0xf, 0, 0, 0]),
            leaf(0xd, 2, [256, 576, 0, 0]),
            leaf(0xd, 9, [8, 2688, 0, 0]),
        ];
        shape(&mut leaves, 0, 1, CpuTemplate::Baseline);
        let l1 = find(&leaves, 1, 0).unwrap();
        assert_eq!(
            l1.ecx & ((1 << 28) | (1 << 26) | (1 << 20)),
            (1 << 26) | (1 << 20),
            "AVX off, XSAVE and SSE4.2 on"
        );
        let l7 = find(&leaves, 7, 0).unwrap();
        assert_eq!(
            (l7.ebx, l7.ecx),
            (1 << 3, 0),
            "AVX2, AVX-512 and PKU off, BMI1 on"
        );
        let l0 = find(&leaves, 0xd, 0).unwrap();
        assert_eq!((l0.eax, l0.ebx, l0.ecx), (0b11, 576, 576));
        assert!(find(&leaves, 0xd, 2).is_none() && find(&leaves, 0xd, 9).is_none());
    }

    #[test]
    fn a_consistent_leaf_0xd_keeps_its_components() {
        let mut leaves = vec![
            leaf(0xd, 0, [0x207, 576, 2696, 0]),
            leaf(0xd, 1, [0xf, 0, 0, 0]),
            leaf(0xd, 2, [256, 576, 0, 0]),
            leaf(0xd, 9, [8, 2688, 0, 0]),
        ];
        shape(&mut leaves, 0, 1, CpuTemplate::Host);
        let l0 = find(&leaves, 0xd, 0).unwrap();
        assert_eq!((l0.eax, l0.ecx), (0x207, 2696));
        assert_eq!(leaves.len(), 4);
    }
}
