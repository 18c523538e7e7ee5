//! What this host's KVM offers a restored VM, asked once: how many vCPUs, the rate it runs
//! vCPUs' TSCs at and whether it can scale them (from a scratch VM), and the CPUID features and
//! MSRs it supports. After a kexec a restore asks this before it claims the VM's session, while
//! the agent may still be starting, so that the checks of the saved state against the host,
//! inside the blackout, only compare.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, MsrList, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::vstate::vm::host_limits;
use crate::vstate::x86_64::compat::{check_features, check_msrs, CpuMismatch};
use crate::vstate::x86_64::tsc::{rate_plan, TscError};

/// This host's KVM, as a restored VM needs it.
pub struct HostKvm {
    /// Most vCPUs one VM may have.
    pub max_vcpus: u32,
    /// The rate a new vCPU's TSC runs at, in kHz.
    tsc_khz: u32,
    /// Whether KVM can run a vCPU's TSC at another rate (`KVM_CAP_TSC_CONTROL`).
    tsc_scales: bool,
    cpuid: CpuId,
    msrs: MsrList,
}

/// KVM could not be asked what it offers.
#[derive(Debug, thiserror::Error)]
#[error("cannot ask this host's KVM what it offers: {op} failed")]
pub struct ProbeError {
    op: &'static str,
    #[source]
    source: kvm_ioctls::Error,
}

impl HostKvm {
    /// Asks `kvm`; the scratch VM it makes for the TSC rate is closed again.
    pub fn probe(kvm: &Kvm) -> Result<HostKvm, ProbeError> {
        let failed = |op: &'static str| move |source| ProbeError { op, source };
        let vm = kvm.create_vm().map_err(failed("KVM_CREATE_VM (scratch)"))?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(failed("KVM_CREATE_VCPU (scratch)"))?;
        let tsc_khz = vcpu
            .get_tsc_khz()
            .map_err(failed("KVM_GET_TSC_KHZ (scratch)"))?;
        Ok(HostKvm {
            max_vcpus: host_limits(kvm).max_vcpus,
            tsc_khz,
            tsc_scales: kvm.check_extension(Cap::TscControl),
            cpuid: kvm
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(failed("KVM_GET_SUPPORTED_CPUID"))?,
            msrs: kvm
                .get_msr_index_list()
                .map_err(failed("KVM_GET_MSR_INDEX_LIST"))?,
        })
    }

    /// The rate a new vCPU's TSC runs at here, in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Whether a vCPU here can run at the saved TSC rate `saved` kHz: KVM scales it, or this
    /// host's own rate is within the drift a restore accepts.
    pub fn check_tsc_rate(&self, saved: u32) -> Result<(), TscError> {
        rate_plan(saved, self.tsc_khz, self.tsc_scales).map(drop)
    }

    /// Whether every CPU feature a vCPU saw (`cpuid`) is offered here and every MSR saved
    /// (`msrs`) can be set here.
    pub fn check_accepts(
        &self,
        cpuid: &[kvm_cpuid_entry2],
        msrs: &[kvm_msr_entry],
    ) -> Result<(), CpuMismatch> {
        check_features(cpuid, self.cpuid.as_slice())?;
        check_msrs(msrs, self.msrs.as_slice())
    }
}
