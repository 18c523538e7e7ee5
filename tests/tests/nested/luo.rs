//! The `luo` scenario: LUO sessions across a real kexec, after the kernel's own selftests.

use std::path::PathBuf;

use luvmm_tests::nested::{Results, ONE_EDU};

use crate::scenario::{boot_scenario, fail, hostcheck, require_no_failure, require_second_kernel};

#[test]
fn luo_sessions_survive_a_real_kexec_in_the_nested_bed() {
    let run = boot_scenario(
        "nested-luo",
        "luo",
        ONE_EDU,
        &[PathBuf::from(env!("CARGO_BIN_EXE_luo-scenario"))],
    );
    let results = run.results();

    // The kernel's own suite first: without it, luvmm's results mean nothing.
    for expected in [
        "selftest liveupdate  ok",
        "selftest luo_kexec_simple --stage 1 ok",
        "selftest luo_multi_session --stage 1 ok",
        "selftest luo_kexec_simple --stage 2 ok",
        "selftest luo_multi_session --stage 2 ok",
    ] {
        if !results.contains(&expected) {
            fail(
                &run,
                &format!("kernel selftest did not pass: expected {expected:?}"),
            );
        }
    }

    // A real kexec happened, into a kernel that rebuilt the sessions.
    require_second_kernel(&run);
    require_no_failure(&run);
    for stage in [1, 2] {
        let done = format!("stage {stage} done pass=");
        match results.iter().find(|r| r.starts_with(&done)) {
            Some(line) if line.ends_with("fail=0") => {}
            other => fail(&run, &format!("stage {stage} summary: {other:?}")),
        }
    }
    for name in [
        "exclusive_open",
        "duplicate_name",
        "kernel_refuses_empty_name",
        "kernel_refuses_unterminated_name",
        "preserve_dev_null",
        "same_memfd_twice_one_session",
        "same_memfd_two_sessions",
        "retrieve_on_outgoing",
        "resizable_after_cancel",
        "verify_luvmm-a_a1",
        "verify_luvmm-b_b2",
        "unknown_token_luvmm-a",
        "finish_luvmm-b",
        "discarded_after_finish",
        "nothing_lost_a_garbage_ledger_is_refused",
        "nothing_lost_a_garbage_ledger_is_refused_again",
        "nothing_lost_orphan_claimed_from_a_rebuilt_ledger",
    ] {
        let expected = format!("test {name} ok");
        if !results.contains(&expected.as_str()) {
            fail(&run, &format!("missing {expected:?}"));
        }
    }

    // host-check before and after the kexec: LUO up, memfd preservable, VFIO and iommufd not
    // (Linux 7.2 has no handler for them), the edu device visible through its cdev.
    for stage in [1, 2] {
        let (code, report) = hostcheck(&run, stage);
        // Memory can be preserved, the edu device cannot: exit 4, as documented.
        assert_eq!(report["verdict"], "memory_only", "stage {stage}: {report}");
        // The bed gives L1 its TSC's rate: KVM runs guests at it, and nothing is warned of.
        assert_eq!(
            report["warnings"],
            serde_json::json!([]),
            "stage {stage}: {report}"
        );
        assert_eq!(code, 4, "stage {stage}: host-check exit code");
        let lu = &report["liveupdate"];
        assert_eq!(lu["luo"], "available", "stage {stage}: {report}");
        assert_eq!(lu["kho_enabled"], true, "stage {stage}: {report}");
        assert_eq!(lu["cmdline_liveupdate_on"], true, "stage {stage}: {report}");
        assert_eq!(
            lu["handlers"]["memfd"], "present",
            "stage {stage}: {report}"
        );
        assert_eq!(
            lu["handlers"]["iommufd"], "absent",
            "stage {stage}: {report}"
        );
        assert_eq!(
            lu["handlers"]["vfio_device"], "absent",
            "stage {stage}: {report}"
        );
        assert_eq!(lu["iommufd_present"], true, "stage {stage}: {report}");
        assert_eq!(lu["vfio_cdev_present"], true, "stage {stage}: {report}");
        assert!(
            report["vfio_devices"][0]["cdev"].is_string(),
            "stage {stage}: {report}"
        );
    }

    // Figures, printed (not asserted).
    for r in results.iter().filter(|r| r.starts_with("figure ")) {
        println!("nested figure: {}", &r["figure ".len()..]);
    }
    if let (Some(kexec), Some(stage2)) = (
        run.time_of("LUVMM-L1 kexec now"),
        run.time_of("LUVMM-L1 stage 2 start"),
    ) {
        println!(
            "nested figure: kexec_to_second_stage {:.2} s (host clock)",
            stage2 - kexec
        );
    }
}
