//! Whether this host's KVM can run a vCPU saved on another kernel (or CPU microcode): every
//! CPU feature the saved CPUID gives the guest is one KVM offers here, and every MSR saved is
//! one KVM can set here. Checked after the kexec from the state alone, before any RAM or device
//! is retrieved, so the refusal names what is missing while nothing else is lost.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};

use crate::vstate::x86_64::cpuid::LUVMM_OWNED;
use crate::vstate::x86_64::msr::msr_name;

/// Feature registers checked, as (leaf, sub-leaf, register index 0-3 = EAX..EDX, bits not
/// compared because KVM changes them at run time). The bits luvmm sets itself
/// ([`LUVMM_OWNED`]) are not compared either.
const FEATURE_REGISTERS: [(u32, u32, usize, u32); 7] = [
    // Leaf 1: ECX (OSXSAVE, bit 27, follows CR4) and EDX (APIC, bit 9, follows the APIC's
    // enable bit).
    (0x1, 0, 2, 1 << 27),
    (0x1, 0, 3, 1 << 9),
    // Leaf 7.0: EBX, ECX (OSPKE, bit 4, follows CR4) and EDX.
    (0x7, 0, 1, 0),
    (0x7, 0, 2, 1 << 4),
    (0x7, 0, 3, 0),
    // Leaf 0x8000_0001: ECX and EDX.
    (0x8000_0001, 0, 2, 0),
    (0x8000_0001, 0, 3, 0),
];

const REGISTER_NAMES: [&str; 4] = ["EAX", "EBX", "ECX", "EDX"];

/// What this host's KVM does not offer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuMismatch {
    #[error(
        "CPUID leaf {leaf:#x}.{subleaf} {register}: the guest has feature bits {missing:#x} \
         that this host's KVM does not offer"
    )]
    Features {
        leaf: u32,
        subleaf: u32,
        register: &'static str,
        missing: u32,
    },
    #[error("{msr}: saved, and this host's KVM does not list it")]
    Msr { msr: String },
}

fn register(entry: &kvm_cpuid_entry2, index: usize) -> u32 {
    [entry.eax, entry.ebx, entry.ecx, entry.edx][index]
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
}

/// Every feature bit the guest saw is one the host offers (dynamic bits aside).
pub(crate) fn check_features(
    saved: &[kvm_cpuid_entry2],
    supported: &[kvm_cpuid_entry2],
) -> Result<(), CpuMismatch> {
    for (leaf, subleaf, index, dynamic) in FEATURE_REGISTERS {
        let Some(guest) = find(saved, leaf, subleaf) else {
            continue;
        };
        let offered = find(supported, leaf, subleaf).map_or(0, |e| register(e, index));
        let owned = LUVMM_OWNED
            .iter()
            .filter(|&&(l, s, i, _)| (l, s, i) == (leaf, subleaf, index))
            .fold(0, |bits, &(.., b)| bits | b);
        let missing = register(guest, index) & !offered & !dynamic & !owned;
        if missing != 0 {
            return Err(CpuMismatch::Features {
                leaf,
                subleaf,
                register: REGISTER_NAMES[index],
                missing,
            });
        }
    }
    Ok(())
}

/// Every saved MSR is one KVM lists here.
pub(crate) fn check_msrs(saved: &[kvm_msr_entry], listed: &[u32]) -> Result<(), CpuMismatch> {
    match saved.iter().find(|m| !listed.contains(&m.index)) {
        Some(m) => Err(CpuMismatch::Msr {
            msr: msr_name(m.index),
        }),
        None => Ok(()),
    }
}

/// What `kvm` offers, as a vCPU saved on this host would hold it: its CPUID, and its MSRs
/// (each with value 0).
#[cfg(test)]
pub(crate) fn this_host_cpu(kvm: &kvm_ioctls::Kvm) -> (Vec<kvm_cpuid_entry2>, Vec<kvm_msr_entry>) {
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    let msrs = kvm
        .get_msr_index_list()
        .expect("KVM_GET_MSR_INDEX_LIST")
        .as_slice()
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    (cpuid.as_slice().to_vec(), msrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::x86_64::cpuid::shape;
    use crate::vstate::x86_64::host_kvm::HostKvm;
    use luvmm_resources::config::CpuTemplate;

    fn leaf(function: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn nothing_lost_a_feature_this_host_lacks_is_named() {
        let host = [leaf(1, 0b0110, 0), leaf(7, 0, 0)];
        assert_eq!(check_features(&[leaf(1, 0b0100, 0)], &host), Ok(()));
        assert_eq!(
            check_features(&[leaf(1, 0b1100, 0)], &host),
            Err(CpuMismatch::Features {
                leaf: 1,
                subleaf: 0,
                register: "ECX",
                missing: 0b1000
            })
        );
        // OSXSAVE follows the guest's CR4: set in the guest, never offered.
        assert_eq!(check_features(&[leaf(1, 1 << 27, 0)], &host), Ok(()));
    }

    #[test]
    fn a_cpuid_luvmm_shaped_from_what_kvm_offers_is_accepted() {
        // What luvmm sets itself (APIC ids, the package's topology with HTT, the hypervisor
        // bit) is no feature the host must offer: a two-vCPU guest restores where it booted.
        let offered = vec![leaf(1, 1 << 26, 1 << 25), leaf(7, 0, 0)];
        for template in [CpuTemplate::Host, CpuTemplate::Baseline] {
            let mut shaped = offered.clone();
            shape(&mut shaped, 1, 2, template);
            assert_eq!(check_features(&shaped, &offered), Ok(()), "{template:?}");
        }
    }

    #[test]
    fn nothing_lost_an_msr_this_host_lacks_is_named() {
        let saved = [
            kvm_msr_entry {
                index: 0x10,
                ..Default::default()
            },
            kvm_msr_entry {
                index: 0x122,
                ..Default::default()
            },
        ];
        assert_eq!(check_msrs(&saved, &[0x10, 0x122]), Ok(()));
        let refused = check_msrs(&saved, &[0x10]).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "MSR_IA32_TSX_CTRL (0x122): saved, and this host's KVM does not list it"
        );
    }

    #[test]
    fn the_cpu_this_test_runs_on_accepts_what_its_kvm_offers() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let (cpuid, msrs) = this_host_cpu(&kvm);
        let host = HostKvm::probe(&kvm).expect("probe");
        assert_eq!(host.check_accepts(&cpuid, &msrs), Ok(()));
    }
}
