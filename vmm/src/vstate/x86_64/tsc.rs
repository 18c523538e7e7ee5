//! The TSC rate policy: a restored guest keeps the rate it calibrated its clocks against.
//!
//! KVM can run a vCPU's TSC at another rate than the host's where the CPU scales it
//! (`KVM_CAP_TSC_CONTROL`). Where it cannot, a restore still goes on if the host is only as far
//! from the saved rate as a kernel's own recalibration across a kexec puts it: guests keep
//! time through kvmclock, which KVM corrects. Anything further is another machine, refused.

use kvm_ioctls::{Cap, Kvm, VcpuFd};

/// How far a restored vCPU's TSC may run from the saved rate when KVM cannot scale it: a host
/// kernel's own recalibration across a kexec (seen: 111 to 1709 ppm in the bed under TCG),
/// not another machine. 1 %, the window in which Linux itself takes a refined calibration
/// for the same clock.
const TSC_DRIFT_PPM: u64 = 10_000;

/// A vCPU cannot run at the saved TSC rate.
#[derive(Debug, thiserror::Error)]
pub enum TscError {
    /// The scratch VM used to ask KVM for this host's rate could not be made.
    #[error("{op} failed")]
    Probe {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Found before a restore took anything: no vCPU here can run at the saved TSC rate.
    #[error("the state's TSC runs at {saved} kHz; this host runs vCPUs at {host} kHz ({ppm} ppm off) and KVM cannot scale them")]
    OutOfReach { saved: u32, host: u32, ppm: u64 },
    /// The saved rate cannot be given to this vCPU, and the host's is too far from it.
    #[error("the state's TSC runs at {saved} kHz, this host runs vCPUs at {host} kHz and KVM cannot scale to the saved rate (KVM_SET_TSC_KHZ)")]
    Rate {
        saved: u32,
        host: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Whether a vCPU of this host can run at the saved TSC rate `saved` kHz: KVM scales it, or
/// this host's own rate is within the drift a restore accepts. Asked of a scratch VM, so a
/// restore after a kexec can refuse before it retrieves anything.
pub fn check_tsc_rate(kvm: &Kvm, saved: u32) -> Result<(), TscError> {
    let probe = |op: &'static str| move |source| TscError::Probe { op, source };
    let vm = kvm.create_vm().map_err(probe("KVM_CREATE_VM (scratch)"))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(probe("KVM_CREATE_VCPU (scratch)"))?;
    let host = vcpu
        .get_tsc_khz()
        .map_err(probe("KVM_GET_TSC_KHZ (scratch)"))?;
    reachable(saved, host, kvm.check_extension(Cap::TscControl))
}

/// The decision of [`check_tsc_rate`], once this host's rate and KVM's scaling are known.
fn reachable(saved: u32, host: u32, kvm_scales: bool) -> Result<(), TscError> {
    let ppm = drift_ppm(saved, host);
    if ppm <= TSC_DRIFT_PPM || kvm_scales {
        Ok(())
    } else {
        Err(TscError::OutOfReach { saved, host, ppm })
    }
}

/// Gives vCPU `id` the saved rate `saved` kHz before it takes any other state: scaled by
/// KVM, or left at this host's rate when that is close enough (and said), or refused.
/// A state without a rate (KVM did not report one) leaves the vCPU as it is.
pub fn restore_tsc_rate(vcpu: &VcpuFd, id: u32, saved: Option<u32>) -> Result<(), TscError> {
    let (Some(saved), Ok(host)) = (saved, vcpu.get_tsc_khz()) else {
        return Ok(());
    };
    if saved == host {
        return Ok(());
    }
    match vcpu.set_tsc_khz(saved) {
        Ok(()) => {
            log::info!("vCPU {id}: TSC scaled from {host} kHz to the saved {saved} kHz");
            Ok(())
        }
        Err(source) => match unscaled_drift(saved, host) {
            Some(ppm) => {
                log::warn!(
                    "vCPU {id}: KVM cannot scale the TSC to the saved {saved} kHz; it runs at \
                     this host's {host} kHz, {ppm} ppm off"
                );
                Ok(())
            }
            None => Err(TscError::Rate {
                saved,
                host,
                source,
            }),
        },
    }
}

/// How far `host` is from `saved` (ppm), if a vCPU may run there without scaling.
fn unscaled_drift(saved: u32, host: u32) -> Option<u64> {
    let ppm = drift_ppm(saved, host);
    (ppm <= TSC_DRIFT_PPM).then_some(ppm)
}

/// `host`'s distance from `saved`, in parts per million of `saved`.
fn drift_ppm(saved: u32, host: u32) -> u64 {
    u64::from(saved.abs_diff(host)) * 1_000_000 / u64::from(saved.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recalibrated_host_tsc_is_within_the_drift_a_restore_accepts() {
        // The bed's two kernels under TCG: 722 and 1709 ppm apart in two runs.
        assert_eq!(drift_ppm(2_591_112, 2_592_984), 722);
        assert_eq!(drift_ppm(2_591_672, 2_596_101), 1708);
        assert_eq!(unscaled_drift(2_591_672, 2_596_101), Some(1708));
        // Another machine, or the 1 kHz a test asks for: refused.
        assert_eq!(unscaled_drift(2_000_000, 2_600_000), None);
        assert_eq!(unscaled_drift(1, 2_600_000), None);
    }

    #[test]
    fn the_drift_is_measured_against_the_saved_rate_either_way() {
        assert_eq!(drift_ppm(1_000_000, 1_010_000), TSC_DRIFT_PPM);
        assert_eq!(drift_ppm(1_000_000, 990_000), TSC_DRIFT_PPM);
        assert_eq!(unscaled_drift(1_000_000, 1_010_000), Some(TSC_DRIFT_PPM));
        assert_eq!(unscaled_drift(1_000_000, 1_010_001), None);
        // A saved rate of 0 (never reported by KVM) does not divide by zero.
        assert_eq!(drift_ppm(0, 1), 1_000_000);
    }

    #[test]
    fn a_far_rate_is_reachable_only_where_kvm_scales() {
        assert!(reachable(2_600_000, 2_600_000, false).is_ok());
        assert!(reachable(1_300_000, 2_600_000, true).is_ok());
        match reachable(1_300_000, 2_600_000, false) {
            Err(TscError::OutOfReach { saved, host, ppm }) => {
                assert_eq!((saved, host, ppm), (1_300_000, 2_600_000, 1_000_000));
            }
            other => panic!("{other:?}"),
        }
    }
}
