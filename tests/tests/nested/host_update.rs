//! The `host-update` scenario: `luvmm update run` and `luvmm update status` as an operator
//! runs them, across a real kexec, with VMs started by `luvmm start` from their configs.

use luvmm_tests::nested::Results;
use serde_json::Value;

use crate::scenario::{boot_scenario, fail, require_no_failure, require_ok, require_second_kernel};

/// One command updates the host: it finds the VMs from their configs, stops on the
/// pre-flight's blocker, calls everything off when one VM cannot be staged (every guest runs
/// on), and otherwise stages every VM while its guest runs, prepares them together and
/// kexecs. After the kexec `luvmm start` brings each VM back from its session and `update
/// status` tells the outcome. The guests' own checks judge what came back.
#[test]
fn host_update_run_updates_every_vm_and_status_says_they_are_back() {
    let run = boot_scenario(
        "nested-host-update",
        "host-update",
        &["edu"],
        &[luvmm_tests::payload()],
    );
    require_second_kernel(&run);
    require_no_failure(&run);
    require_ok(
        &run,
        "host_update_",
        &[
            "device_round_1",
            "run_blocked_by_the_preflight_touches_nothing",
            "run_called_off_leaves_every_guest_running",
            "device_round_2",
            "status_names_the_vms_not_back",
            "device_round_3",
            "status_says_every_vm_is_back",
        ],
    );
    let results = run.results();
    // The guests' own checks: a's three (two before, one after the kexec at its resume, one
    // asked after), b's two before and one after; each VM's seed stays its own, every page
    // intact.
    let checks: Vec<luvmm_tests::Check> = results
        .iter()
        .filter_map(|r| r.strip_prefix("host-update check "))
        .map(luvmm_tests::parse_check)
        .collect();
    if checks.len() != 7 || !checks.iter().all(|c| c.ok) {
        fail(&run, &format!("guest checks: {checks:#?}"));
    }
    let seeds: std::collections::BTreeSet<_> = checks.iter().map(|c| c.seed.clone()).collect();
    if seeds.len() != 2 {
        fail(&run, &format!("two guests, two seeds: {checks:#?}"));
    }
    // The barrier, by the agent's own clock: no VM was ready (paused, everything preserved)
    // before every VM had begun its stage.
    let ledger: Value = results
        .iter()
        .find_map(|r| r.strip_prefix("host-update ledger "))
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_else(|| fail(&run, "no ledger after the kexec"));
    let times = |key: &str| -> Vec<u64> {
        ledger["vms"]
            .as_array()
            .map(|vms| {
                vms.iter()
                    .filter_map(|vm| vm["times_ms"][key].as_u64())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (subscribed, ready) = (times("subscribed"), times("ready"));
    if subscribed.len() != 2 || ready.len() != 2 {
        fail(&run, &format!("both VMs through the kexec: {ledger}"));
    }
    if subscribed.iter().max() > ready.iter().min() {
        fail(
            &run,
            &format!("a VM was ready before every VM was staged: {ledger}"),
        );
    }
    let status: Value = results
        .iter()
        .find_map(|r| r.strip_prefix("host-update status exit=0 "))
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_else(|| fail(&run, "no update status after the restores"));
    luvmm_tests::schema::assert_report("UpdateStatusReport", &status);
    for vm in status["vms"].as_array().into_iter().flatten() {
        if vm["phase"] != "finished" || vm["back_after_kexec_ms"].as_u64().is_none() {
            fail(&run, &format!("not back: {vm}"));
        }
        // Its restore's own phases, from its VMM on the socket the launch record names.
        if vm["restore"]["finish_ms"].as_f64().is_none() {
            fail(&run, &format!("no restore phases: {vm}"));
        }
    }
}

/// Where systemd (262, Debian sid's, as L1's init) holds the sessions: the repository's
/// `luvmm@.service` runs VMs `a` and `b`. An update of `a` called off leaves nothing in its
/// service's fd store; `update run`'s deadline calls everyone off while `b`'s VMM is stopped;
/// `b`, staged with nobody driving the update on, calls it off itself at its update limit. `luvmm update run` finds no agent and lets each VMM push its session
/// into its service's fd store, then runs `systemctl kexec`. After it
/// systemd hands each service its session back at start, and both VMs come back with no
/// command typed. The guests' own checks judge what came back.
#[test]
fn host_update_systemd_brings_both_vms_back_after_systemctl_kexec() {
    let work = luvmm_tests::TestDir::new("nested-host-update-systemd");
    let binaries = [luvmm_tests::luvmm_bin(), luvmm_tests::payload()];
    let bed = luvmm_tests::nested::prepare_systemd(work.path(), &binaries);
    let run = luvmm_tests::nested::run_l1(
        &bed,
        "systemd-host-update",
        "systemd.show_status=false",
        &[],
        &[],
        std::time::Duration::from_secs(900),
    );
    for r in run.results() {
        println!("L1: {r}");
    }
    if run.timed_out {
        fail(&run, "L1 did not power off within the timeout");
    }
    require_second_kernel(&run);
    require_no_failure(&run);
    require_ok(
        &run,
        "host_update_systemd_",
        &[
            "a_called_off_leaves_nothing_in_its_store",
            "run_deadline_calls_everyone_off",
            "b_calls_an_undriven_stage_off_at_its_limit",
            "a_restored_from_its_fd_store",
            "b_restored_from_its_fd_store",
            "stores_emptied",
            "b_restarted_while_staged_boots_afresh",
        ],
    );
    // Both stages' init was systemd 262 or later, and host-check said it holds the sessions.
    for stage in [1, 2] {
        let (_, report) = crate::scenario::hostcheck(&run, stage);
        luvmm_tests::schema::assert_report("HostCheckReport", &report);
        if report["session_holder"]["by"] != "systemd" {
            fail(
                &run,
                &format!("stage {stage}: {}", report["session_holder"]),
            );
        }
    }
    // `update status` from the units and VMMs: no update before the kexec (systemd counts
    // none), every VM back after it.
    let status = |prefix: &str| -> Value {
        run.results()
            .iter()
            .find_map(|r| r.strip_prefix(prefix))
            .and_then(|text| serde_json::from_str(text.trim()).ok())
            .unwrap_or_else(|| fail(&run, &format!("no {prefix:?} line")))
    };
    let before = status("host-update status before exit=0 ");
    luvmm_tests::schema::assert_report("UpdateStatusReport", &before);
    if before["verdict"] != "no_update" || before["vms"] != serde_json::json!([]) {
        fail(&run, &format!("before the kexec: {before}"));
    }
    let after = status("host-update status exit=0 ");
    luvmm_tests::schema::assert_report("UpdateStatusReport", &after);
    let vms = after["vms"].as_array().cloned().unwrap_or_default();
    if after["verdict"] != "all_back" || after["updates"] != 1 || vms.len() != 2 {
        fail(&run, &format!("after the kexec: {after}"));
    }
    for vm in &vms {
        if vm["phase"] != "finished"
            || vm["back_after_kexec_ms"].as_u64().is_none()
            || vm["restore"]["finish_ms"].as_f64().is_none()
        {
            fail(&run, &format!("not back: {vm}"));
        }
    }
    // The guests' own checks: five before the kexec (a's second after its call-off, a's
    // third after the deadline, b's second after its limit), four after (at the resume and asked), each
    // VM's seed its own, every page intact.
    let checks: Vec<luvmm_tests::Check> = run
        .results()
        .iter()
        .filter_map(|r| r.strip_prefix("host-update check "))
        .map(luvmm_tests::parse_check)
        .collect();
    if checks.len() != 9 || !checks.iter().all(|c| c.ok) {
        fail(&run, &format!("guest checks: {checks:#?}"));
    }
    let seeds: std::collections::BTreeSet<_> = checks.iter().map(|c| c.seed.clone()).collect();
    if seeds.len() != 2 {
        fail(&run, &format!("two guests, two seeds: {checks:#?}"));
    }
}
