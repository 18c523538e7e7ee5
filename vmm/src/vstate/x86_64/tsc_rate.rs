//! The rate this host's TSC really ticks at, measured against the kernel's raw monotonic clock.
//!
//! KVM runs a new vCPU's TSC, and computes its guests' kvmclock, at the rate the host kernel
//! had calibrated when KVM started. Where KVM is built into the kernel, that is the kernel's
//! first, quick calibration, taken before its refinement against the HPET one second into
//! boot; a quick calibration off by 0.11 % (2593.2 MHz for a 2596.1 MHz TSC, seen under TCG)
//! stays KVM's rate for that boot while the kernel's own clock keeps the refined one, and a
//! Linux guest on that KVM stalls: RCU stalls while it boots, soft lockups of minutes after a
//! restore. Measuring the TSC is how a host check, or a bed that boots a kernel under TCG,
//! learns the true rate without asking the kernel.

use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// How long each of the measurement's spans lasts; 5 of them take a quarter of a second.
const SPAN: Duration = Duration::from_millis(50);
const SPANS: usize = 5;

/// Most cycles a TSC read on each side of a clock read may take, or the pair is read again
/// (a preemption or an interrupt between them).
const PAIR_CYCLES: u64 = 20_000;

/// The raw monotonic clock could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read CLOCK_MONOTONIC_RAW")]
pub struct ClockError(#[source] nix::Error);

/// This CPU's TSC rate in kHz: the median of [`SPANS`] spans of [`SPAN`] each, the TSC's
/// progress over `CLOCK_MONOTONIC_RAW`'s (which no time daemon slews). Within a few ppm of
/// the rate a kernel with a known TSC frequency reports.
pub fn measure_tsc_khz() -> Result<u32, ClockError> {
    let mut rates = Vec::with_capacity(SPANS);
    for _ in 0..SPANS {
        let (tsc0, ns0) = tsc_and_clock()?;
        std::thread::sleep(SPAN);
        let (tsc1, ns1) = tsc_and_clock()?;
        let ns = ns1.saturating_sub(ns0).max(1);
        // kHz = cycles per millisecond = cycles * 10^6 / ns.
        let khz = u128::from(tsc1.wrapping_sub(tsc0)) * 1_000_000 / u128::from(ns);
        rates.push(u32::try_from(khz).unwrap_or(u32::MAX));
    }
    rates.sort_unstable();
    Ok(rates[SPANS / 2])
}

/// A TSC reading and the raw clock's, in nanoseconds, taken close together.
fn tsc_and_clock() -> Result<(u64, u64), ClockError> {
    loop {
        let before = rdtsc();
        let now = clock_gettime(ClockId::CLOCK_MONOTONIC_RAW).map_err(ClockError)?;
        let after = rdtsc();
        if after.wrapping_sub(before) <= PAIR_CYCLES {
            let ns = u64::try_from(Duration::from(now).as_nanos()).unwrap_or(u64::MAX);
            return Ok((before / 2 + after / 2, ns));
        }
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter into registers and touches no memory; every x86_64 CPU
    // has it, and a kernel that set CR4.TSD (user RDTSC faults) would run no KVM guest either.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::x86_64::tsc::drift_ppm;

    #[test]
    fn the_measured_rate_is_a_plausible_tsc_and_repeats() {
        let first = measure_tsc_khz().expect("measure");
        let second = measure_tsc_khz().expect("measure");
        // Any x86_64 TSC of the last two decades: 100 MHz to 10 GHz.
        assert!((100_000..10_000_000).contains(&first), "{first} kHz");
        // Two measurements agree within 0.1 %: enough to tell KVM's 0.11 %-off rate.
        let apart = drift_ppm(first, second);
        assert!(
            apart < 1_000,
            "{first} and {second} kHz are {apart} ppm apart"
        );
    }
}
