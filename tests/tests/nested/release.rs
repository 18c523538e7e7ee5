//! The `release` scenario: a preserved device after a restore that failed with it bound: a
//! second restore carries on, and `luvmm update release` frees such a device without one.

use std::path::PathBuf;

use luvmm_tests::nested::Results;

use crate::scenario::{boot_scenario_appending, fail, require_no_failure, require_second_kernel};

/// After a kexec, a VM's preserved device is incoming (the kernel refuses its normal open with
/// EBUSY) until its session finishes. A restore killed once it bound the device to its
/// iommufd can be run again (the guest's device round and memory check pass); releasing
/// another VM's session without a restore makes its device usable again. With the bed's
/// VFIO handler on.
#[test]
fn vfio_lu_release_frees_a_preserved_device_without_a_restore() {
    let run = boot_scenario_appending(
        "nested-release",
        "release",
        "vfio_pci.luvmm_lu=reset",
        &["edu", "edu"],
        &[
            luvmm_tests::payload(),
            PathBuf::from(env!("CARGO_BIN_EXE_vfio-lu")),
        ],
    );
    require_second_kernel(&run);
    require_no_failure(&run);
    crate::scenario::require_ok(
        &run,
        "nothing_lost_",
        &[
            "a_restore_killed_after_it_bound_a_preserved_device_can_be_run_again",
            "an_agent_killed_after_a_failed_restore_takes_its_session_back",
            "a_release_killed_after_its_claim_leaves_the_session",
            "a_release_frees_a_device_a_killed_restore_left_bound",
        ],
    );
    let results = run.results();
    let line = |prefix: &str| {
        results
            .iter()
            .find_map(|r| r.strip_prefix(prefix))
            .unwrap_or_else(|| fail(&run, &format!("no {prefix:?} line")))
    };
    for vm in ["r1", "r2"] {
        let prepared = line(&format!("release prepare {vm} "));
        assert!(prepared.contains("\"preserved\":true"), "{vm}: {prepared}");
    }
    let before = line("release before ");
    assert!(before.ends_with("errno=16"), "before the release: {before}");
    let released = line("release exit=");
    let (code, json) = released.split_once(' ').unwrap_or((released, ""));
    assert_eq!(code, "0", "{released}");
    let report: serde_json::Value = serde_json::from_str(json).expect("release JSON");
    assert_eq!(report["session"], "luvmm-r2", "{report}");
    assert_eq!(
        report["devices"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    let after = line("release after ");
    assert!(after.ends_with(" ok"), "after the release: {after}");
    if !results
        .iter()
        .any(|r| r.contains("luvmm-lu: finished its live update"))
    {
        fail(&run, "the kernel never logged the device's finish");
    }
}
