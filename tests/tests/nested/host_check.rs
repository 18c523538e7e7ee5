//! `luvmm host-check` in L1, on KVM's TSC rate: an L1 whose built-in KVM kept a quick TSC
//! calibration off the TSC's rate is told so, and the bed's own L1 (given the measured rate)
//! is not.

use crate::scenario::{boot_scenario_appending, hostcheck};

/// The quick calibration an L1 under TCG now and then took: 0.11 % below this machine's TSC.
const OFF_KHZ: u64 = 2_593_218;

#[test]
fn host_check_warns_of_a_kvm_tsc_rate_off_the_tsc_and_the_bed_has_none() {
    let off = boot_scenario_appending(
        "nested-host-check-tsc-off",
        "host-check",
        &format!("tsc_early_khz={OFF_KHZ}"),
        &[],
        &[],
    );
    let (_, report) = hostcheck(&off, 1);
    let tsc = &report["kvm_tsc"];
    assert_eq!(tsc["kvm_khz"], OFF_KHZ, "{report}");
    // L1's TSC is the host's, whatever L1 was told.
    let measured = tsc["measured_khz"].as_u64().expect("measured_khz");
    assert!(
        measured.abs_diff(OFF_KHZ) * 1_000_000 / measured > 1_000,
        "{report}"
    );
    let warnings = report["warnings"].as_array().expect("warnings");
    assert!(
        warnings.len() == 1
            && warnings[0]
                .as_str()
                .is_some_and(|w| w.contains(&format!("tsc_early_khz={measured}"))),
        "{report}"
    );

    let bed = boot_scenario_appending("nested-host-check-tsc", "host-check", "", &[], &[]);
    let (_, report) = hostcheck(&bed, 1);
    assert!(
        report["kvm_tsc"]["ppm"]
            .as_u64()
            .is_some_and(|ppm| ppm <= 250),
        "{report}"
    );
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");
}
