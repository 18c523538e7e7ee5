//! The `kexec-fails` scenario: an update called off after a failed kexec reset a device.

use std::path::PathBuf;

use luvmm_tests::nested::Results;

use crate::scenario::{
    boot_scenario_appending, device_opens, fail, require_no_failure, require_ok, watched_opens,
};

/// A kexec that fails after the kernel's freeze reset a VM's device (the bed's handler in
/// reset mode; another VMM's device, with its MSI on, refuses its own freeze): the update is
/// called off, luvmm opens the reset device again, and the guest drives it as before.
#[test]
fn a_device_reset_by_a_failed_kexec_is_opened_again_and_the_guest_goes_on() {
    let run = boot_scenario_appending(
        "nested-kexec-fails",
        "kexec-fails",
        "vfio_pci.luvmm_lu=reset",
        &["edu", "edu"],
        &[
            luvmm_tests::payload(),
            PathBuf::from(env!("CARGO_BIN_EXE_vfio-open-watch")),
            PathBuf::from(env!("CARGO_BIN_EXE_agent-scenario")),
        ],
    );
    require_no_failure(&run);
    require_ok(
        &run,
        "kexec_fails_",
        &[
            "round_1",
            "prepared",
            "mine_reset_by_the_freeze",
            "noisy_refused_the_freeze",
            "called_off",
            "round_2",
        ],
    );
    let checks: Vec<luvmm_tests::Check> = run
        .results()
        .iter()
        .filter_map(|r| r.strip_prefix("kexec_fails check "))
        .map(luvmm_tests::parse_check)
        .collect();
    let went_on = match checks.as_slice() {
        [before, after] => {
            before.ok
                && after.ok
                && after.seed == before.seed
                && after.checks > before.checks
                && after.heartbeat > before.heartbeat
        }
        _ => false,
    };
    if !went_on {
        fail(&run, &format!("guest checks: {checks:#?}"));
    }
    // The kernel's opens while the update failed and was called off: luvmm opened the reset
    // device's cdev once, through no group, and the noisy VMM's device not at all.
    let opens = watched_opens(&run, "cancel");
    let luvmm_opens = |node: &str| {
        opens
            .iter()
            .filter(|(n, c)| *n == node && *c == "luvmm")
            .count()
    };
    let mut per_device = device_opens(&run, "cancel");
    per_device.sort();
    let counts: Vec<u32> = per_device.iter().map(|(_, n)| *n).collect();
    if (
        luvmm_opens("vfio_cdev"),
        luvmm_opens("vfio_group"),
        counts.as_slice(),
    ) != (1, 0, &[1, 0])
    {
        fail(
            &run,
            &format!("opens during the cancel: {opens:?}, per device {per_device:?}"),
        );
    }
}
