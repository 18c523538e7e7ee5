//! Saving a vCPU's architectural state and putting it back, in the orders KVM needs.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;
use luvmm_resources::state::VcpuState;

use super::xsave::XsaveArea;
use super::{ioctl, msr, tsc, tsc_carry, ArchError};

/// Reads the whole architectural state of vCPU `id`, with the MSRs in `msrs_to_save`. MP
/// state first: reading it makes KVM settle pending APIC events into the state that follows.
/// MSRs the vCPU refuses to read are left out, by name, and said. The TSC offset is read
/// only for a TSC KVM does not scale (`tsc_scaled`).
pub fn save_state(
    vcpu: &VcpuFd,
    id: u32,
    msrs_to_save: &[u32],
    xsave_area: XsaveArea,
    tsc_scaled: bool,
) -> Result<VcpuState, ArchError> {
    let mp_state = vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let xsave = xsave_area.save(vcpu)?;
    let xcrs = vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
    let debug_regs = vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let msrs = msr::read_msrs(vcpu, msrs_to_save)?;
    let unreadable_msrs: Vec<String> = msrs.refused.into_iter().map(msr::msr_name).collect();
    if !unreadable_msrs.is_empty() {
        log::warn!(
            "vCPU {id}: KVM refused to read {}; they are left out of the state",
            unreadable_msrs.join(", ")
        );
    }
    let vcpu_events = vcpu
        .get_vcpu_events()
        .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_CPUID2"))?;
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().to_vec(),
        msrs: msrs.values,
        regs,
        sregs,
        xsave,
        xcrs,
        lapic,
        vcpu_events,
        mp_state,
        debug_regs,
        tsc_khz: vcpu.get_tsc_khz().ok(),
        tsc_offset: if tsc_scaled {
            None
        } else {
            tsc_carry::read_tsc_offset(vcpu)
        },
        unreadable_msrs,
    })
}

/// Writes a saved state back, in the order KVM needs: CPUID before anything that depends on
/// it, then the TSC rate (the guest calibrated its clocks against the saved one; a restore
/// that cannot keep it stops here, before the vCPU has any other state), the LAPIC before
/// MSRs (TSC deadline), and pending events last. The TSC is written as `tsc` where given (the
/// saved one moved on over the pause, [`super::tsc_carry::by_clock`]). Returns whether KVM
/// scales the vCPU's TSC to the saved rate.
pub fn restore_state(
    vcpu: &VcpuFd,
    state: &VcpuState,
    xsave_area: XsaveArea,
    tsc_scaling: bool,
    tsc: Option<u64>,
) -> Result<bool, ArchError> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| ArchError::Cpuid {
        entries: state.cpuid.len(),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    let tsc_scaled = tsc::restore_tsc_rate(vcpu, state.id, state.tsc_khz, tsc_scaling)?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(ioctl("KVM_SET_SREGS"))?;
    xsave_area.restore(vcpu, &state.xsave)?;
    vcpu.set_xcrs(&state.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(ioctl("KVM_SET_LAPIC"))?;
    match tsc {
        Some(tsc) => msr::write_msrs(vcpu, &tsc_carry::with_tsc(&state.msrs, tsc))?,
        None => msr::write_msrs(vcpu, &state.msrs)?,
    }
    vcpu.set_vcpu_events(&state.vcpu_events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(tsc_scaled)
}
