//! Model-specific registers: which ones a vCPU saves, the values a fresh vCPU starts with, and
//! their names for reports.
//!
//! KVM answers `KVM_GET_MSRS` and `KVM_SET_MSRS` with how many entries it handled and stops at
//! the first it refuses, so a partial answer is not an error to the ioctl; this module turns
//! it into one (write) or into a list of refused MSRs (read).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

pub(super) const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `IA32_MISC_ENABLE` bit 0: fast string operations, on at reset on real hardware.
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Names of the MSRs KVM lists for saving, for reports; others are shown by index.
const MSR_NAMES: &[(u32, &str)] = &[
    (MSR_IA32_TSC, "MSR_IA32_TSC"),
    (0x3a, "MSR_IA32_FEAT_CTL"),
    (0x3b, "MSR_IA32_TSC_ADJUST"),
    (0x48, "MSR_IA32_SPEC_CTRL"),
    (0x8b, "MSR_IA32_UCODE_REV"),
    (0x10a, "MSR_IA32_ARCH_CAPABILITIES"),
    (0x122, "MSR_IA32_TSX_CTRL"),
    (0x140, "MSR_MISC_FEATURES_ENABLES"),
    (MSR_IA32_SYSENTER_CS, "MSR_IA32_SYSENTER_CS"),
    (MSR_IA32_SYSENTER_ESP, "MSR_IA32_SYSENTER_ESP"),
    (MSR_IA32_SYSENTER_EIP, "MSR_IA32_SYSENTER_EIP"),
    (0x179, "MSR_IA32_MCG_CAP"),
    (0x17a, "MSR_IA32_MCG_STATUS"),
    (0x17b, "MSR_IA32_MCG_CTL"),
    (MSR_IA32_MISC_ENABLE, "MSR_IA32_MISC_ENABLE"),
    (0x1d9, "MSR_IA32_DEBUGCTL"),
    (0x277, "MSR_IA32_CR_PAT"),
    (0x4d0, "MSR_IA32_MCG_EXT_CTL"),
    (0x6e0, "MSR_IA32_TSC_DEADLINE"),
    (0x9e, "MSR_IA32_SMBASE"),
    (0x34, "MSR_SMI_COUNT"),
    (0xce, "MSR_PLATFORM_INFO"),
    (0xda0, "MSR_IA32_XSS"),
    (0x1c4, "MSR_IA32_PKRS"),
    (0x6a0, "MSR_IA32_U_CET"),
    (0x6a2, "MSR_IA32_S_CET"),
    (0x6a4, "MSR_IA32_PL0_SSP"),
    (0x6a5, "MSR_IA32_PL1_SSP"),
    (0x6a6, "MSR_IA32_PL2_SSP"),
    (0x6a7, "MSR_IA32_PL3_SSP"),
    (0x6a8, "MSR_IA32_INT_SSP_TAB"),
    (0x560, "MSR_IA32_RTIT_OUTPUT_BASE"),
    (0x570, "MSR_IA32_RTIT_CTL"),
    (0xc000_0080, "MSR_EFER"),
    (MSR_STAR, "MSR_STAR"),
    (MSR_LSTAR, "MSR_LSTAR"),
    (MSR_CSTAR, "MSR_CSTAR"),
    (MSR_SYSCALL_MASK, "MSR_SYSCALL_MASK"),
    (0xc000_0100, "MSR_FS_BASE"),
    (0xc000_0101, "MSR_GS_BASE"),
    (MSR_KERNEL_GS_BASE, "MSR_KERNEL_GS_BASE"),
    (0xc000_0103, "MSR_TSC_AUX"),
    (0xc001_011f, "MSR_AMD64_VIRT_SPEC_CTRL"),
    (0xc001_0117, "MSR_VM_HSAVE_PA"),
    (0xc001_0114, "MSR_VM_CR"),
    (0x4b56_4d00, "MSR_KVM_WALL_CLOCK_NEW"),
    (0x4b56_4d01, "MSR_KVM_SYSTEM_TIME_NEW"),
    (0x4b56_4d02, "MSR_KVM_ASYNC_PF_EN"),
    (0x4b56_4d03, "MSR_KVM_STEAL_TIME"),
    (0x4b56_4d04, "MSR_KVM_PV_EOI_EN"),
    (0x4b56_4d05, "MSR_KVM_POLL_CONTROL"),
    (0x4b56_4d06, "MSR_KVM_ASYNC_PF_INT"),
    (0x4b56_4d07, "MSR_KVM_ASYNC_PF_ACK"),
    (0x11, "MSR_KVM_WALL_CLOCK"),
    (0x12, "MSR_KVM_SYSTEM_TIME"),
];

/// An MSR list could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// An MSR ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The list does not fit a KVM MSR list.
    #[error("{count} MSRs are more than one KVM MSR list holds")]
    TooMany { count: usize },
    /// KVM accepted only part of a list.
    #[error("KVM_SET_MSRS stopped at {}", msr_name(*index))]
    Rejected { index: u32 },
}

/// `MSR_IA32_TSX_CTRL (0x122)`, or just the index for an MSR without a known name.
pub fn msr_name(index: u32) -> String {
    match MSR_NAMES.iter().find(|(i, _)| *i == index) {
        Some((_, name)) => format!("{name} ({index:#x})"),
        None => format!("MSR {index:#x}"),
    }
}

/// The MSRs KVM would save for a vCPU (`KVM_GET_MSR_INDEX_LIST`): the same for every vCPU of
/// this host, so read once.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, MsrError> {
    let list = kvm.get_msr_index_list().map_err(|source| MsrError::Ioctl {
        op: "KVM_GET_MSR_INDEX_LIST",
        source,
    })?;
    Ok(list.as_slice().to_vec())
}

/// What a fresh vCPU starts with: the system-call MSRs cleared, the TSC at 0, and fast strings
/// on as firmware would leave them.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// The MSRs a vCPU gave, and the ones it refused to read.
#[derive(Debug, Default, PartialEq)]
pub struct MsrReadout {
    pub values: Vec<kvm_msr_entry>,
    pub refused: Vec<u32>,
}

/// Reads every MSR in `indices` from `vcpu`, going on past the ones it refuses.
pub fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<MsrReadout, MsrError> {
    read_skipping_refused(indices, |msrs| {
        vcpu.get_msrs(msrs).map_err(|source| MsrError::Ioctl {
            op: "KVM_GET_MSRS",
            source,
        })
    })
}

/// The loop behind [`read_msrs`]: `get_msrs` fills a list and says how many entries it read.
/// KVM stops at the first MSR it cannot read; that one is noted and the rest asked again.
fn read_skipping_refused(
    indices: &[u32],
    mut get_msrs: impl FnMut(&mut Msrs) -> Result<usize, MsrError>,
) -> Result<MsrReadout, MsrError> {
    let mut readout = MsrReadout {
        values: Vec::with_capacity(indices.len()),
        refused: Vec::new(),
    };
    let mut pending = indices;
    while !pending.is_empty() {
        let entries: Vec<kvm_msr_entry> = pending
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_list(&entries)?;
        let read = get_msrs(&mut msrs)?.min(pending.len());
        readout.values.extend_from_slice(&msrs.as_slice()[..read]);
        readout.refused.extend(pending.get(read).copied());
        pending = pending.get(read + 1..).unwrap_or(&[]);
    }
    Ok(readout)
}

/// Writes `entries` to `vcpu`; all of them, or an error naming the first KVM refused.
pub fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), MsrError> {
    let written = vcpu
        .set_msrs(&msr_list(entries)?)
        .map_err(|source| MsrError::Ioctl {
            op: "KVM_SET_MSRS",
            source,
        })?;
    match entries.get(written) {
        Some(rejected) => Err(MsrError::Rejected {
            index: rejected.index,
        }),
        None => Ok(()),
    }
}

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs, MsrError> {
    Msrs::from_entries(entries).map_err(|_| MsrError::TooMany {
        count: entries.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_msrs_are_named_when_known_and_shown_by_index_otherwise() {
        assert_eq!(msr_name(0x122), "MSR_IA32_TSX_CTRL (0x122)");
        assert_eq!(msr_name(0x4b56_4d03), "MSR_KVM_STEAL_TIME (0x4b564d03)");
        assert_eq!(msr_name(0x1234_5678), "MSR 0x12345678");
    }

    #[test]
    fn every_msr_has_one_name() {
        for (i, (index, name)) in MSR_NAMES.iter().enumerate() {
            assert!(name.starts_with("MSR_"), "{name}");
            assert!(
                MSR_NAMES[i + 1..].iter().all(|(other, _)| other != index),
                "{index:#x} is named twice"
            );
        }
    }

    #[test]
    fn a_fresh_vcpu_starts_with_fast_strings_and_cleared_syscall_msrs() {
        let msrs = boot_msrs();
        let misc = msrs.iter().find(|m| m.index == MSR_IA32_MISC_ENABLE);
        assert_eq!(misc.map(|m| m.data), Some(MISC_ENABLE_FAST_STRING));
        assert!(msrs
            .iter()
            .filter(|m| m.index != MSR_IA32_MISC_ENABLE)
            .all(|m| m.data == 0));
    }

    /// A vCPU that refuses the MSRs in `refused` and reads every other as its index + 1.
    fn fake_vcpu(refused: &'static [u32]) -> impl FnMut(&mut Msrs) -> Result<usize, MsrError> {
        move |msrs| {
            let mut read = 0;
            for entry in msrs.as_mut_slice() {
                if refused.contains(&entry.index) {
                    break;
                }
                entry.data = u64::from(entry.index) + 1;
                read += 1;
            }
            Ok(read)
        }
    }

    #[test]
    fn a_read_goes_on_past_each_refused_msr() {
        let readout = read_skipping_refused(&[1, 2, 3, 4, 5], fake_vcpu(&[2, 5])).unwrap();
        let read: Vec<(u32, u64)> = readout.values.iter().map(|m| (m.index, m.data)).collect();
        assert_eq!(read, [(1, 2), (3, 4), (4, 5)]);
        assert_eq!(readout.refused, [2, 5]);
    }

    #[test]
    fn a_read_of_nothing_asks_nothing() {
        let readout = read_skipping_refused(&[], |_| panic!("asked KVM")).unwrap();
        assert_eq!(readout, MsrReadout::default());
    }
}
