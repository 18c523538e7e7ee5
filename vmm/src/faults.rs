//! Faults a test injects into a real run, so that a failure that strikes at a bad moment in
//! production (a restore killed right after its claim, say) can be made to strike there on
//! purpose. They are named in `LUVMM_TEST_FAULTS` (comma-separated), read once; an unset
//! variable changes nothing.

use std::sync::OnceLock;

use kvm_bindings::kvm_msr_entry;
use luvmm_resources::state::VmState;

/// The variable naming the faults to inject.
pub const FAULTS_ENV: &str = "LUVMM_TEST_FAULTS";

/// A point where a test may make luvmm fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The restore stops itself (SIGSTOP) right after it claimed its session, for the test
    /// to kill it there.
    StopAfterClaim,
    /// The restore stops itself (SIGSTOP) once every passthrough device is bound to its
    /// iommufd after a kexec, for the test to kill it there.
    StopAfterDeviceBind,
    /// The restore stops itself (SIGSTOP) after a kexec once it bound its first retrieved
    /// device, before it recorded that with the agent: the one moment a retry must find the
    /// device among the iommufd's objects.
    StopBeforeDeviceRecord,
    /// A prepare saves, beside the vCPUs' real MSRs, one no KVM lists ([`UNKNOWN_MSR`]): the
    /// state of a VM saved on a host whose KVM had an MSR the next kernel's lacks.
    SaveUnknownMsr,
    /// Each vCPU thread makes a system call no filter allows (`getppid`) right after it
    /// installed its seccomp filter: with `--seccomp on` the process ends, with `off` the call
    /// is harmless.
    VcpuForbiddenSyscall,
    /// A restore after a kexec puts the first two passthrough devices each in the other's
    /// guest slot: the guest's device identity check must catch it.
    SwapDevices,
    /// Resumes never call `KVM_KVMCLOCK_CTRL`: a Linux guest's watchdogs see the blackout as
    /// a stuck CPU (the damage check of the resume's clock handling).
    NoKvmclockCtrl,
    /// A restore does not put the saved kvmclock back: the guest's clock starts from the new
    /// VM's zero (the damage check of the clock restore).
    NoKvmclockRestore,
    /// A handover's target stops itself (SIGSTOP) once it built its VM ahead, before it asks
    /// for the VM, for the test to kill it, or its source, there.
    StopAfterStage,
    /// A handover's target stops itself (SIGSTOP) once it rebuilt the VM, right before it
    /// confirms, for the test to kill it, or its source, there.
    StopBeforeConfirm,
}

/// An MSR index in no range Intel, AMD or KVM use.
pub const UNKNOWN_MSR: u32 = 0x4c55_564d;

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::StopAfterClaim => "stop-after-claim",
            Fault::StopAfterDeviceBind => "stop-after-device-bind",
            Fault::StopBeforeDeviceRecord => "stop-before-device-record",
            Fault::SaveUnknownMsr => "save-unknown-msr",
            Fault::VcpuForbiddenSyscall => "vcpu-forbidden-syscall",
            Fault::SwapDevices => "swap-devices",
            Fault::NoKvmclockCtrl => "no-kvmclock-ctrl",
            Fault::NoKvmclockRestore => "no-kvmclock-restore",
            Fault::StopAfterStage => "stop-after-stage",
            Fault::StopBeforeConfirm => "stop-before-confirm",
        }
    }
}

/// Whether the test asked for `fault`.
pub fn armed(fault: Fault) -> bool {
    static NAMED: OnceLock<String> = OnceLock::new();
    named(
        NAMED.get_or_init(|| std::env::var(FAULTS_ENV).unwrap_or_default()),
        fault,
    )
}

/// Whether `names` (comma-separated) names `fault`.
fn named(names: &str, fault: Fault) -> bool {
    names.split(',').any(|n| n.trim() == fault.name())
}

/// Stops this process until it is continued or killed.
pub fn stop_here() {
    log::warn!("test fault: stopping here (SIGSTOP)");
    if let Err(e) = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP) {
        log::warn!("test fault: cannot stop: {e}");
    }
}

/// Adds [`UNKNOWN_MSR`] to every vCPU of `state`.
pub fn add_unknown_msr(state: &mut VmState) {
    log::warn!("test fault: saving MSR {UNKNOWN_MSR:#x}, which no KVM lists");
    for vcpu in &mut state.vcpus {
        vcpu.msrs.push(kvm_msr_entry {
            index: UNKNOWN_MSR,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_is_armed_only_by_its_own_name() {
        assert!(named("swap-devices", Fault::SwapDevices));
        assert!(named("stop-after-claim, swap-devices", Fault::SwapDevices));
        assert!(!named("", Fault::SwapDevices));
        assert!(!named("swap-devices-not", Fault::SwapDevices));
    }
}
