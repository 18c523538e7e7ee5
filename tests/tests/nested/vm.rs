//! The `vm` scenario: a luvmm microVM on nested KVM, saved and restored inside L1.

use luvmm_tests::nested::{Results, ONE_EDU};

use crate::scenario::{boot_scenario, fail};

#[test]
fn a_luvmm_microvm_runs_and_restores_inside_l1() {
    let run = boot_scenario("nested-vm", "vm", ONE_EDU, &[luvmm_tests::payload()]);
    let results = run.results();
    for name in ["nested_boot", "nested_check", "nested_restore"] {
        let expected = format!("test {name} ok");
        if !results.contains(&expected.as_str()) {
            fail(&run, &format!("missing {expected:?}"));
        }
    }
    let checks: Vec<luvmm_tests::Check> = results
        .iter()
        .filter_map(|r| r.strip_prefix("serial "))
        .filter(|r| r.starts_with("LUVMM-CHECK"))
        .map(luvmm_tests::parse_check)
        .collect();
    // The same comparison as the host's restore tests: no reboot, one more check, and both
    // vCPUs' heartbeats went on.
    let continued = match checks.as_slice() {
        [before, after] => {
            before.ok
                && after.ok
                && after.seed == before.seed
                && after.checks == before.checks + 1
                && before.heartbeats.len() == 2
                && after.heartbeats.len() == 2
                && after
                    .heartbeats
                    .iter()
                    .zip(&before.heartbeats)
                    .all(|(a, b)| a > b)
        }
        _ => false,
    };
    if !continued {
        fail(
            &run,
            &format!("guest checks across the restore: {checks:#?}"),
        );
    }
}
