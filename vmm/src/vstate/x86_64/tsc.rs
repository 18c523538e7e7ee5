//! The TSC rate policy: a restored guest keeps the rate it calibrated its clocks against.
//!
//! KVM can run a vCPU's TSC at another rate than the host's where the CPU scales it
//! (`KVM_CAP_TSC_CONTROL`). Where it cannot, a restore still goes on if the host is only as far
//! from the saved rate as a kernel's own recalibration across a kexec puts it: guests keep
//! time through kvmclock, which KVM corrects. Further than that, a saved rate faster than the
//! host's is kept by KVM's TSC catch-up (the guest's TSC moved forward at every clock update,
//! so it keeps the saved rate on average); a slower one cannot be given, and is refused.

use kvm_ioctls::VcpuFd;

/// How far a restored vCPU's TSC may run from the saved rate when KVM cannot scale it: a host
/// kernel's own recalibration across a kexec, not another machine. KVM built into a kernel
/// keeps the kernel's first, quick calibration (seen 111 to 1709 ppm off under TCG, see
/// [`super::tsc_rate`]). 1 %, the window in which Linux itself takes a refined calibration
/// for the same clock.
const TSC_DRIFT_PPM: u64 = 10_000;

/// A vCPU cannot run at the saved TSC rate.
#[derive(Debug, thiserror::Error)]
pub enum TscError {
    /// Found before a restore took anything: no vCPU here can run at the saved TSC rate.
    #[error("the state's TSC runs at {saved} kHz; this host runs vCPUs at {host} kHz ({ppm} ppm faster) and KVM can neither scale nor slow them")]
    OutOfReach { saved: u32, host: u32, ppm: u64 },
    /// KVM refused a rate it should take (it scales, or the rate is within its tolerance).
    #[error(
        "KVM_SET_TSC_KHZ refused the state's {saved} kHz (this host runs vCPUs at {host} kHz)"
    )]
    Rate {
        saved: u32,
        host: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// How far KVM lets a requested rate be from the host's and still runs the vCPU at the host's
/// own, unscaled (its `tsc_tolerance_ppm` default).
pub(crate) const KVM_TOLERANCE_PPM: u64 = 250;

/// What a restore does with the saved TSC rate, once this host's is known.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RatePlan {
    /// The vCPU already runs at it.
    Keep,
    /// `KVM_SET_TSC_KHZ`: KVM scales, or the rate is within its own tolerance.
    Set,
    /// The vCPU stays at the host's rate, `ppm` off; `KVM_SET_TSC_KHZ` is not asked, because
    /// without scaling KVM either refuses a slower rate while keeping it for its own
    /// arithmetic (its TSC deadline timer, its TSC catch-up, the next save's rate), or runs a
    /// faster one by moving the guest's TSC forward at every clock update.
    Unscaled { ppm: u64 },
    /// `KVM_SET_TSC_KHZ` without scaling, for a saved rate `ppm` faster than the host's and
    /// beyond a recalibration's drift: KVM turns on its TSC catch-up for the vCPU.
    CatchUp { ppm: u64 },
}

/// The decision of [`restore_tsc_rate`], and of whether a restore can keep the saved rate.
pub(crate) fn rate_plan(saved: u32, host: u32, kvm_scales: bool) -> Result<RatePlan, TscError> {
    let ppm = drift_ppm(saved, host);
    if saved == host {
        Ok(RatePlan::Keep)
    } else if kvm_scales || ppm <= KVM_TOLERANCE_PPM {
        Ok(RatePlan::Set)
    } else if ppm <= TSC_DRIFT_PPM {
        Ok(RatePlan::Unscaled { ppm })
    } else if saved > host {
        Ok(RatePlan::CatchUp { ppm })
    } else {
        Err(TscError::OutOfReach { saved, host, ppm })
    }
}

/// Gives vCPU `id` the saved rate `saved` kHz before it takes any other state: scaled by
/// KVM, or left at this host's rate when that is close enough (and said), or refused.
/// A state without a rate (KVM did not report one) leaves the vCPU as it is. Returns whether
/// KVM now scales the vCPU's TSC (a rate beyond its tolerance, on a CPU that scales).
pub fn restore_tsc_rate(
    vcpu: &VcpuFd,
    id: u32,
    saved: Option<u32>,
    kvm_scales: bool,
) -> Result<bool, TscError> {
    let (Some(saved), Ok(host)) = (saved, vcpu.get_tsc_khz()) else {
        return Ok(false);
    };
    let mut plan = rate_plan(saved, host, kvm_scales)?;
    let ppm = drift_ppm(saved, host);
    if matches!(plan, RatePlan::Set | RatePlan::CatchUp { .. }) {
        match vcpu.set_tsc_khz(saved) {
            Ok(()) => {}
            // KVM judges its tolerance against the host kernel's own TSC rate, which may
            // differ from the rate it gives a new vCPU (its highest): a saved rate a few ppm
            // below the vCPU's can be outside it, and is refused where KVM cannot scale. The
            // vCPU goes back to the rate it was made with (KVM had already taken the refused
            // one for its arithmetic), as for a rate within a recalibration's drift.
            Err(_) if !kvm_scales && ppm <= TSC_DRIFT_PPM => {
                let _ = vcpu.set_tsc_khz(host);
                plan = RatePlan::Unscaled { ppm };
            }
            Err(source) => {
                return Err(TscError::Rate {
                    saved,
                    host,
                    source,
                })
            }
        }
    }
    match plan {
        RatePlan::Keep => Ok(false),
        RatePlan::Set => {
            log::info!("vCPU {id}: TSC set from {host} kHz to the saved {saved} kHz");
            Ok(kvm_scales && ppm > KVM_TOLERANCE_PPM)
        }
        RatePlan::CatchUp { ppm } => {
            log::warn!(
                "vCPU {id}: KVM cannot scale the TSC to the saved {saved} kHz, {ppm} ppm above \
                 this host's {host} kHz; it keeps the rate by catching the TSC up"
            );
            Ok(false)
        }
        RatePlan::Unscaled { ppm } => {
            log::warn!(
                "vCPU {id}: KVM cannot scale the TSC to the saved {saved} kHz; it runs at \
                 this host's {host} kHz, {ppm} ppm off"
            );
            Ok(false)
        }
    }
}

/// `host`'s distance from `saved`, in parts per million of `saved`.
pub(crate) fn drift_ppm(saved: u32, host: u32) -> u64 {
    u64::from(saved.abs_diff(host)) * 1_000_000 / u64::from(saved.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recalibrated_host_tsc_is_within_the_drift_a_restore_accepts() {
        // The bed's two kernels under TCG: 722, 1395 and 1709 ppm apart in three runs.
        assert_eq!(drift_ppm(2_591_112, 2_592_984), 722);
        assert_eq!(drift_ppm(2_591_672, 2_596_101), 1708);
        assert_eq!(
            rate_plan(2_592_536, 2_596_155, false).unwrap(),
            RatePlan::Unscaled { ppm: 1395 }
        );
        // Another, faster machine, or the 1 kHz a test asks for: refused.
        for (saved, host) in [(2_000_000, 2_600_000), (1, 2_600_000)] {
            assert!(matches!(
                rate_plan(saved, host, false),
                Err(TscError::OutOfReach { .. })
            ));
        }
    }

    #[test]
    fn kvm_is_asked_only_for_a_rate_it_can_give() {
        assert_eq!(
            rate_plan(2_596_154, 2_596_154, false).unwrap(),
            RatePlan::Keep
        );
        // Within KVM's own tolerance it records the rate and scales nothing.
        assert_eq!(
            rate_plan(2_596_154, 2_596_149, false).unwrap(),
            RatePlan::Set
        );
        assert_eq!(
            rate_plan(1_000_000, 1_000_250, false).unwrap(),
            RatePlan::Set
        );
        // Beyond it, only where KVM scales; slower or faster alike.
        assert_eq!(
            rate_plan(1_000_000, 1_000_251, false).unwrap(),
            RatePlan::Unscaled { ppm: 251 }
        );
        assert_eq!(
            rate_plan(1_000_000, 999_000, false).unwrap(),
            RatePlan::Unscaled { ppm: 1000 }
        );
        assert_eq!(rate_plan(1_000_000, 999_000, true).unwrap(), RatePlan::Set);
        assert_eq!(
            rate_plan(1_300_000, 2_600_000, true).unwrap(),
            RatePlan::Set
        );
    }

    #[test]
    fn the_drift_is_measured_against_the_saved_rate_either_way() {
        assert_eq!(drift_ppm(1_000_000, 1_010_000), TSC_DRIFT_PPM);
        assert_eq!(drift_ppm(1_000_000, 990_000), TSC_DRIFT_PPM);
        assert_eq!(
            rate_plan(1_000_000, 1_010_000, false).unwrap(),
            RatePlan::Unscaled { ppm: TSC_DRIFT_PPM }
        );
        assert!(rate_plan(1_000_000, 1_010_001, false).is_err());
        assert_eq!(
            rate_plan(1_020_000, 1_000_000, false).unwrap(),
            RatePlan::CatchUp { ppm: 19_607 }
        );
        // A saved rate of 0 (never reported by KVM) does not divide by zero.
        assert_eq!(drift_ppm(0, 1), 1_000_000);
    }

    #[test]
    fn a_faster_saved_rate_beyond_the_drift_is_caught_up() {
        // A golden state recorded on another host, restored here: KVM's catch-up keeps it.
        assert_eq!(
            rate_plan(2_596_124, 2_300_000, false).unwrap(),
            RatePlan::CatchUp { ppm: 114_063 }
        );
        assert_eq!(
            rate_plan(2_596_124, 2_300_000, true).unwrap(),
            RatePlan::Set
        );
    }

    #[test]
    fn a_far_rate_is_refused_by_its_figures_where_kvm_cannot_scale() {
        match rate_plan(1_300_000, 2_600_000, false) {
            Err(TscError::OutOfReach { saved, host, ppm }) => {
                assert_eq!((saved, host, ppm), (1_300_000, 2_600_000, 1_000_000));
            }
            other => panic!("{other:?}"),
        }
    }
}
