//! The `update` scenario: a VM with devices across a host live update with a real kexec.

use std::path::PathBuf;

use luvmm_tests::nested::Results;

use crate::scenario::{
    boot_scenario, fail, require_no_failure, require_ok, require_second_kernel, watched_opens,
};

/// A host live update with a real kexec: the VM's RAM and state come back through its LUO
/// session, held by the agent; Linux 7.2 has no VFIO handler, so both edu devices are opened
/// again and must still do DMA with interrupts. A prepared update can be called off.
#[test]
fn a_vm_with_devices_survives_a_host_live_update() {
    let run = boot_scenario(
        "nested-update",
        "update",
        &["edu", "edu"],
        &[
            luvmm_tests::payload(),
            PathBuf::from(env!("CARGO_BIN_EXE_vfio-open-watch")),
            PathBuf::from(env!("CARGO_BIN_EXE_agent-scenario")),
        ],
    );
    let results = run.results();
    require_second_kernel(&run);
    require_no_failure(&run);
    require_ok(
        &run,
        "update_",
        &[
            "round_1",
            "preflight_blocks_an_unknown_kernel",
            "preflight_passes_a_known_good_kernel",
            "preflight_blocks_a_kernel_that_does_not_load",
            "prepared",
            "agent_ready",
            "cancelled",
            "round_2",
            "bad_vm_id_refused",
            "round_3",
            "finished",
            "second_restore_refused",
            "vm2_prepared",
            "unknown_session_refused",
            "deadline_calls_everyone_off",
            "kernel_that_does_not_load_calls_it_off",
            "device_missing_refused_before_any_retrieve",
            "bad_serial_refused_before_the_claim",
        ],
    );
    require_ok(
        &run,
        "nothing_lost_",
        &[
            "a_preflight_leaves_a_pending_updates_kernel_loaded",
            "the_agent_started_again_before_the_first_claim",
            "a_restore_killed_after_its_claim_leaves_vm1_claimable",
            "a_restore_killed_after_its_claim_leaves_vm2_claimable",
            "a_restore_killed_after_it_took_its_ram_and_devices_leaves_vm1_claimable",
            "a_saved_msr_this_kvm_lacks_is_refused_by_name",
            "a_session_whose_restore_failed_can_be_released",
        ],
    );
    // The guest's own checks, in order across the kexec: the same boot (seed), every page
    // intact, every heartbeat going on.
    let all: Vec<luvmm_tests::Check> = results
        .iter()
        .filter_map(|r| r.strip_prefix("update check "))
        .map(luvmm_tests::parse_check)
        .collect();
    // vm1: three checks before the kexec, two after; vm2 (its own seed): one before, one after.
    let (vm2, checks): (Vec<_>, Vec<_>) = all
        .iter()
        .cloned()
        .partition(|c| all.first().is_some_and(|first| c.seed != first.seed));
    if checks.len() != 5 || vm2.len() != 2 || !all.iter().all(|c| c.ok) {
        fail(&run, &format!("guest checks: {all:#?}"));
    }
    for pair in checks.windows(2).chain(vm2.windows(2)) {
        let (before, after) = (&pair[0], &pair[1]);
        let went_on = after.seed == before.seed
            && after.checks > before.checks
            && after.heartbeat >= before.heartbeat;
        if !went_on {
            fail(&run, &format!("{after:?} after {before:?}"));
        }
    }
    // Not preserved by this kernel, so opened again, each once; never through a group.
    let opens = watched_opens(&run, "restore");
    let cdevs = opens
        .iter()
        .filter(|(n, c)| *n == "vfio_cdev" && *c == "luvmm")
        .count();
    let groups = opens.iter().filter(|(n, _)| *n == "vfio_group").count();
    if (cdevs, groups) != (2, 0) {
        fail(&run, &format!("opens during the restore: {opens:?}"));
    }
    for r in results
        .iter()
        .filter(|r| r.starts_with("update prepare") || r.starts_with("update status"))
    {
        println!("nested figure: {r}");
    }
}
