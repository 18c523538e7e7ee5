//! Whether this host's KVM runs its vCPUs' TSCs at the rate the TSC really ticks at.
//!
//! KVM gives a new vCPU, and computes its kvmclock from, the TSC rate the host kernel had
//! calibrated when KVM started: built into the kernel, that is the kernel's first, quick
//! calibration, taken before the refined one the kernel's own clock then uses. Where the two
//! differ, every guest's clock disagrees with its TSC, and Linux guests stall (in the bed, a
//! 0.11 % gap gave RCU stalls while booting and soft lockups of minutes after a restore).

use kvm_ioctls::Kvm;
use serde::Serialize;

use crate::vstate::x86_64::host_kvm::HostKvm;
use crate::vstate::x86_64::tsc::{drift_ppm, KVM_TOLERANCE_PPM};
use crate::vstate::x86_64::tsc_rate::measure_tsc_khz;

/// KVM's TSC rate for a new vCPU against the TSC's own, measured here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmTsc {
    pub kvm_khz: u32,
    pub measured_khz: u32,
    /// How far apart the two are, in parts per million of the measured rate.
    pub ppm: u64,
}

impl KvmTsc {
    /// Asks KVM (a scratch VM) and measures the TSC; `None` without a usable `/dev/kvm`.
    pub fn of_host() -> Option<KvmTsc> {
        let kvm = Kvm::new().ok()?;
        let kvm_khz = HostKvm::probe(&kvm).ok()?.tsc_khz();
        let measured_khz = measure_tsc_khz().ok()?;
        Some(KvmTsc::new(kvm_khz, measured_khz))
    }

    fn new(kvm_khz: u32, measured_khz: u32) -> KvmTsc {
        KvmTsc {
            kvm_khz,
            measured_khz,
            ppm: drift_ppm(measured_khz, kvm_khz),
        }
    }

    /// What an operator should know, where KVM's rate is further from the TSC's than KVM's
    /// own tolerance (within which it takes another rate as the same; a measurement is good
    /// to a few ppm).
    pub fn warning(&self) -> Option<String> {
        (self.ppm > KVM_TOLERANCE_PPM).then(|| {
            format!(
                "KVM runs new vCPUs' TSCs at {} kHz, but this host's TSC ticks at {} kHz \
                 ({} ppm apart): KVM kept the kernel's first TSC calibration, and its Linux \
                 guests' clocks will stall; boot this host with tsc_early_khz={}",
                self.kvm_khz, self.measured_khz, self.ppm, self.measured_khz
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kvm_rate_off_by_the_beds_quick_calibration_is_warned_of() {
        // The bed's L1 booted with tsc_early_khz=2593218 on this machine's 2596.122 MHz TSC.
        let off = KvmTsc::new(2_593_218, 2_596_122);
        assert_eq!(off.ppm, 1118);
        let warning = off.warning().expect("a warning");
        assert!(warning.contains("tsc_early_khz=2596122"), "{warning}");
        // A good boot's quick calibration: a few ppm off, nothing to say.
        assert_eq!(KvmTsc::new(2_596_114, 2_596_122).warning(), None);
        assert_eq!(KvmTsc::new(2_596_771, 2_596_122).ppm, 249);
        assert_eq!(KvmTsc::new(2_596_771, 2_596_122).warning(), None);
        assert!(KvmTsc::new(2_596_774, 2_596_122).warning().is_some());
    }

    #[test]
    fn this_hosts_kvm_is_asked_and_its_tsc_measured() {
        // Needs /dev/kvm, as the rest of the suite does.
        let tsc = KvmTsc::of_host().expect("KVM and the TSC of this host");
        assert!(tsc.kvm_khz > 0 && tsc.measured_khz > 0, "{tsc:?}");
    }
}
