//! The `agent` scenario: the live-update agent and its ledger across a real kexec.

use std::path::PathBuf;

use crate::scenario::{boot_scenario, require_no_failure, require_ok, require_second_kernel};

/// The live-update agent holds the sessions across a real kexec, even for a VMM that died
/// after saying it was ready, and the next kernel's agent hands each out once from the ledger
/// it preserved.
#[test]
fn the_agent_carries_sessions_and_its_ledger_across_a_real_kexec() {
    let run = boot_scenario(
        "nested-agent",
        "agent",
        &[],
        &[PathBuf::from(env!("CARGO_BIN_EXE_agent-scenario"))],
    );
    require_second_kernel(&run);
    require_no_failure(&run);
    require_ok(
        &run,
        "agent_",
        &[
            "start",
            "subscribe",
            "second_subscribe_refused",
            "bad_vm_id_refused",
            "release",
            "update_waits_for_every_vm",
            "preserve",
            "ready",
            "corrupt_vm_ready",
            "status_before",
            "ledger_crossed_the_kexec",
            "claim",
            "memfd_intact",
            "finish",
            "second_claim_refused",
            "corrupt_state_refused_before_any_other_retrieve",
            "unknown_vm_refused",
            "no_agent",
        ],
    );
}
