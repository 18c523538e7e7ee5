//! Boot-time setup of a fresh vCPU: the CPUID it reports, its boot MSRs, FPU and LAPIC, and
//! for the boot vCPU the registers of the payload's entry.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use luvmm_resources::config::CpuTemplate;

use super::{cpuid, ioctl, msr, ArchError};
use crate::boot::{boot_regs, set_boot_sregs, BootEntry};

/// LAPIC local vector table entries for the LINT0 and LINT1 pins (register offsets).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// LVT delivery modes.
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// x87 control word at FNINIT: all exceptions masked, 64-bit precision.
const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR at reset: all SSE exceptions masked.
const MXCSR: u32 = 0x1f80;

/// Sets up vCPU `id` of `vcpus` for a fresh boot: CPUID (`template`'s, see [`cpuid::shape`]),
/// boot MSRs, FPU, LAPIC LINT pins, and, when `entry` is given (the boot vCPU), the registers
/// of the entry. Other vCPUs wait for INIT/SIPI, as the in-kernel LAPIC leaves them.
pub fn configure_for_boot(
    vcpu: &VcpuFd,
    id: u32,
    vcpus: u32,
    template: CpuTemplate,
    kvm: &Kvm,
    entry: Option<BootEntry>,
) -> Result<(), ArchError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    let mut leaves = cpuid.as_slice().to_vec();
    cpuid::shape(&mut leaves, id, vcpus, template);
    let cpuid = CpuId::from_entries(&leaves).map_err(|_| ArchError::Cpuid {
        entries: leaves.len(),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;

    msr::write_msrs(vcpu, &msr::boot_msrs())?;

    let fpu = kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))?;

    // LINT0 takes the PIC's interrupts and LINT1 NMIs, as firmware wires them.
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;

    if let Some(entry) = entry {
        vcpu.set_regs(&boot_regs(entry))
            .map_err(ioctl("KVM_SET_REGS"))?;
        let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        set_boot_sregs(&mut sregs, entry);
        vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    }
    Ok(())
}

/// Sets the delivery mode (bits 10:8) of the LVT entry at `offset`.
fn set_lvt_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *r = b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lvt(lapic: &kvm_lapic_state, offset: usize) -> u32 {
        let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
            .iter()
            .map(|&r| r as u8)
            .collect();
        u32::from_le_bytes(bytes.try_into().unwrap())
    }

    #[test]
    fn an_lvt_mode_changes_only_the_delivery_mode_bits() {
        let mut lapic = kvm_lapic_state::default();
        for (r, b) in lapic.regs[APIC_LVT0..APIC_LVT0 + 4]
            .iter_mut()
            .zip(0x0001_07ffu32.to_le_bytes())
        {
            *r = b as std::os::raw::c_char;
        }
        set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_NMI);
        assert_eq!(lvt(&lapic, APIC_LVT0), 0x0001_04ff);
        set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_EXTINT);
        assert_eq!(lvt(&lapic, APIC_LVT1), 0x0000_0700);
    }
}
