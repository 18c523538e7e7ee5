//! The nested bed: a QEMU (TCG) L1 with an emulated Intel IOMMU and an `edu` device, booting a
//! LUO kernel built from Debian's linux-source-7.2, where a real kexec happens. The kernel's
//! own LUO selftests must pass before luvmm's results count.
//!
//! The first run builds the kernel (about 11 minutes on 2 cores) and caches it.

use std::path::PathBuf;
use std::time::Duration;

use luvmm_tests::nested::{prepare, run_l1, L1Run, Results, ONE_EDU};
use luvmm_tests::{luvmm_bin, TestDir};

fn fail(run: &L1Run, why: &str) -> ! {
    panic!(
        "{why}\n--- last L1 console lines (host seconds) ---\n{}",
        run.tail(80)
    );
}

/// Boots L1 with `scenario`, `devices` (QEMU `-device` values), and luvmm and `extra` in its
/// initramfs, and prints its result lines.
fn boot_scenario(name: &str, scenario: &str, devices: &[&str], extra: &[PathBuf]) -> L1Run {
    boot_scenario_appending(name, scenario, "", devices, extra)
}

/// `boot_scenario` with `append` added to L1's first kernel command line (the kexec'd
/// kernels inherit it).
fn boot_scenario_appending(
    name: &str,
    scenario: &str,
    append: &str,
    devices: &[&str],
    extra: &[PathBuf],
) -> L1Run {
    let work = TestDir::new(name);
    let mut binaries = vec![luvmm_bin()];
    binaries.extend_from_slice(extra);
    let bed = prepare(work.path(), &binaries);
    let run = run_l1(&bed, scenario, append, devices, Duration::from_secs(900));
    if run.timed_out {
        fail(&run, "L1 did not power off within the timeout");
    }
    for r in run.results() {
        println!("L1: {r}");
    }
    run
}

/// Fails unless the second kernel of the kexec ran the scenario.
fn require_second_kernel(run: &L1Run) {
    if !run.results().iter().any(|r| r.starts_with("boot stage=2")) {
        fail(run, "the second kernel never ran the scenario");
    }
}

/// Fails on any result line that says FAIL.
fn require_no_failure(run: &L1Run) {
    let results = run.results();
    let failures: Vec<&&str> = results.iter().filter(|r| r.contains(" FAIL")).collect();
    if !failures.is_empty() {
        fail(run, &format!("failures: {failures:#?}"));
    }
}

/// Fails unless each of `names` reported `test <prefix><name> ok`.
fn require_ok(run: &L1Run, prefix: &str, names: &[&str]) {
    let results = run.results();
    for name in names {
        if !results.contains(&format!("test {prefix}{name} ok").as_str()) {
            fail(run, &format!("{prefix}{name} did not report ok"));
        }
    }
}

/// The exit code and JSON report of `luvmm host-check --json` in `stage`.
fn hostcheck(run: &L1Run, stage: u32) -> (i32, serde_json::Value) {
    let prefix = format!("hostcheck stage={stage} exit=");
    let line = run
        .results()
        .into_iter()
        .find_map(|r| r.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| fail(run, &format!("no host-check line in stage {stage}")));
    let (code, json) = line.split_once(' ').unwrap_or((line, ""));
    let code = code
        .parse()
        .unwrap_or_else(|_| fail(run, &format!("stage {stage} host-check exit: {line}")));
    let report = serde_json::from_str(json).unwrap_or_else(|e| {
        fail(
            run,
            &format!("stage {stage} host-check is not JSON ({e}): {json}"),
        )
    });
    (code, report)
}

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

/// What a `vfio` scenario's L1 holds.
struct VfioBed {
    /// QEMU `-device` values.
    devices: &'static [&'static str],
    /// edu devices on bus 0, passed through (DMA, MSI and INTx).
    edu: usize,
    /// NVMe controllers, passed through (MSI-X).
    nvme: usize,
    /// Whether an edu device shares its IOMMU group with a device a host driver holds.
    shared_group: bool,
}

/// Runs the `vfio` scenario on `bed` and checks its lines.
fn vfio_scenario(name: &str, bed: VfioBed) {
    let run = boot_scenario(
        name,
        "vfio",
        bed.devices,
        &[
            luvmm_tests::payload(),
            PathBuf::from(env!("CARGO_BIN_EXE_vfio-open-watch")),
        ],
    );
    let results = run.results();
    check_open_watcher(&run);
    require_no_failure(&run);
    // Per device kind and run: edu with MSI then INTx, NVMe with MSI-X in both runs.
    for (irq, expected) in [
        ("irq=msi ", bed.edu),
        ("irq=intx ", bed.edu),
        ("irq=msix ", 2 * bed.nvme),
    ] {
        let devices: Vec<&&str> = results
            .iter()
            .filter(|r| r.starts_with("serial LUVMM-DEV ok") && r.contains(irq))
            .collect();
        if devices.len() != expected || !devices.iter().all(|d| d.contains("dma=ok")) {
            fail(&run, &format!("{irq} device lines: {devices:#?}"));
        }
    }
    let mut expected = vec![
        "test bad_missing_bdf ok",
        "test bad_not_vfio_pci ok",
        "test bad_no_iommufd ok",
        "test legacy_fallback ok",
        "test bad_busy ok",
        "test iommu_blocked_outside_dma ok",
        "test save_captures_vfio_state ok",
    ];
    if bed.nvme > 0 {
        expected.push("test save_captures_msix ok");
    }
    if bed.shared_group {
        expected.push("test bad_group_not_viable ok");
    }
    for expected in expected {
        if !results.contains(&expected) {
            fail(&run, &format!("missing {expected:?}"));
        }
    }
    let memfd_checks = results
        .iter()
        .filter(|r| r.starts_with("test memfd_holds_dma_") && r.ends_with(" ok"))
        .count();
    if memfd_checks != bed.edu + bed.nvme {
        fail(
            &run,
            &format!(
                "{memfd_checks} memfd checks for {} devices",
                bed.edu + bed.nvme
            ),
        );
    }
    let legacy = results
        .iter()
        .find_map(|r| r.strip_prefix("hostcheck-legacy "))
        .unwrap_or_else(|| fail(&run, "no host-check without iommufd"));
    let legacy: serde_json::Value = serde_json::from_str(legacy)
        .unwrap_or_else(|e| fail(&run, &format!("host-check JSON: {e}")));
    assert_eq!(legacy["vfio_backend"], "legacy_container", "{legacy}");
    assert_eq!(legacy["verdict"], "memory_only", "{legacy}");

    // Direct-mapped BARs (first run) must not exit; trapped ones (second run) do. The guest's
    // own clock says so: a read that exits to luvmm through L1's KVM costs thousands of times
    // more cycles than one that does not (about 175-300 against 570,000 or more here).
    let mmio: Vec<(&str, f64)> = results
        .iter()
        .filter_map(|r| r.strip_prefix("serial LUVMM-DEV mmio "))
        .filter_map(|r| {
            let cycles = luvmm_tests::field(r, "cycles_per_read")?.parse().ok()?;
            Some((luvmm_tests::field(r, "bdf")?, cycles))
        })
        .collect();
    if mmio.len() != 2 * bed.edu {
        fail(&run, &format!("mmio timing lines: {mmio:#?}"));
    }
    let (direct, trapped) = mmio.split_at(bed.edu);
    for ((bdf, mapped), (trapped_bdf, exiting)) in direct.iter().zip(trapped) {
        assert_eq!(bdf, trapped_bdf, "{mmio:?}");
        let ratio = exiting / mapped.max(1.0);
        println!("nested figure: {bdf} BAR read trapped/mapped {ratio:.0}x ({exiting} vs {mapped} cycles)");
        if ratio < 100.0 {
            fail(
                &run,
                &format!("{bdf}: a mapped BAR read costs {mapped} cycles, a trapped one {exiting}: the mapped BAR still exits"),
            );
        }
    }
    for r in results.iter().filter(|r| {
        r.contains("passthrough 0000")
            || r.starts_with("serial LUVMM-DEV mmio")
            || r.starts_with("figure ")
    }) {
        println!("nested figure: {r}");
    }
}

/// The opens `vfio-open-watch` recorded in step `step`: (node, comm) pairs, after checking
/// the step itself succeeded.
fn watched_opens<'a>(run: &'a L1Run, step: &str) -> Vec<(&'a str, &'a str)> {
    let prefix = format!("watch {step} LUVMM-OPEN ");
    let lines: Vec<&str> = run
        .results()
        .into_iter()
        .filter_map(|r| r.strip_prefix(prefix.as_str()))
        .collect();
    match lines.last() {
        Some(done) if done.starts_with("done ") && done.ends_with(" status=0") => {}
        other => fail(
            run,
            &format!("watch {step}: no successful summary: {other:?}"),
        ),
    }
    lines
        .iter()
        .filter(|l| !l.starts_with("done "))
        .filter_map(|l| {
            Some((
                luvmm_tests::field(l, "node")?,
                luvmm_tests::field(l, "comm")?,
            ))
        })
        .collect()
}

/// The watcher sees opens by any process (a shell's open of /dev/iommu), tells the VFIO nodes
/// apart, and sees exactly what luvmm opens on each path: the device's cdev and /dev/iommu on
/// iommufd, its group and the container on the legacy path.
fn check_open_watcher(run: &L1Run) {
    let count = |opens: &[(&str, &str)], node: &str| {
        opens
            .iter()
            .filter(|(n, c)| *n == node && *c == "luvmm")
            .count()
    };
    let control = watched_opens(run, "control");
    if !control.contains(&("iommufd", "sh")) {
        fail(
            run,
            &format!("the watcher missed a shell opening /dev/iommu: {control:?}"),
        );
    }
    let iommufd = watched_opens(run, "iommufd");
    let legacy = watched_opens(run, "legacy");
    let seen = (
        count(&iommufd, "vfio_cdev"),
        count(&iommufd, "iommufd") >= 1,
        count(&iommufd, "vfio_group"),
        count(&legacy, "vfio_group") >= 1,
        count(&legacy, "vfio_container") >= 1,
        count(&legacy, "vfio_cdev"),
    );
    if seen != (1, true, 0, true, true, 0) {
        fail(
            run,
            &format!("opens seen: iommufd run {iommufd:?}, legacy run {legacy:?}"),
        );
    }
    // Per device (inotify on its own nodes): the one device of each run, opened once.
    for step in ["iommufd", "legacy"] {
        let opened = device_opens(run, step);
        if opened.iter().filter(|(_, n)| *n > 0).count() != 1
            || !opened.iter().any(|(_, n)| *n == 1)
        {
            fail(run, &format!("watch {step}: per-device opens {opened:?}"));
        }
    }
}

/// The per-device open counts `vfio-open-watch` printed in step `step`.
fn device_opens<'a>(run: &'a L1Run, step: &str) -> Vec<(&'a str, u32)> {
    let prefix = format!("watch {step} LUVMM-OPEN device=");
    run.results()
        .into_iter()
        .filter_map(|r| r.strip_prefix(prefix.as_str()))
        .filter_map(|l| {
            let (bdf, rest) = l.split_once(' ')?;
            Some((bdf, luvmm_tests::field(rest, "opens")?.parse().ok()?))
        })
        .collect()
}

/// One edu device and an NVMe controller in one microVM, and an edu device behind a bridge
/// whose IOMMU group a virtio device (bound to virtio-pci in L1) makes not viable.
#[test]
fn a_guest_drives_passed_through_edu_and_nvme_devices() {
    vfio_scenario(
        "nested-vfio-one",
        VfioBed {
            devices: &[
                "edu",
                "nvme,serial=luvmm-nvme,msix_qsize=4",
                "pci-bridge,id=shared,chassis_nr=1",
                "edu,bus=shared,addr=1",
                "virtio-rng-pci,bus=shared,addr=2",
            ],
            edu: 1,
            nvme: 1,
            shared_group: true,
        },
    );
}

#[test]
fn two_edu_devices_in_one_microvm() {
    vfio_scenario(
        "nested-vfio-two",
        VfioBed {
            devices: &["edu", "edu"],
            edu: 2,
            nvme: 0,
            shared_group: false,
        },
    );
}

/// The sub-tests `handover.sh` must report, each `ok`.
const HANDOVER_TESTS: &[&str] = &[
    "vfio_handover_round_1",
    "vfio_handover_source_confirmed",
    "vfio_handover_round_2",
    "vfio_handover_nvme_kept_its_queues",
    "vfio_handover_memory_intact",
    "vfio_handover_irq_raised_during_the_switch_arrives",
    "vfio_handover_pending_msix_kept",
    "vfio_handover_signals_waited_in_eventfds",
    "vfio_handover_round_3",
    "vfio_handover_round_4",
    "vfio_handover_state_without_device_fds_refused",
    "vfio_handover_guest_runs_after_failures",
    "vfio_handover_legacy_refused",
];

/// Two edu devices and an NVMe controller move with their VM to a new luvmm process, twice,
/// without a reopen or a reset; interrupts raised during a switch arrive; the failures leave
/// the guest running. The new processes open no VFIO device, group, container or /dev/iommu.
#[test]
fn vfio_handover_moves_devices_to_a_new_process() {
    let run = boot_scenario(
        "nested-handover",
        "handover",
        &["edu", "edu", "nvme,serial=luvmm-nvme,msix_qsize=4"],
        &[
            luvmm_tests::payload(),
            PathBuf::from(env!("CARGO_BIN_EXE_vfio-open-watch")),
            PathBuf::from(env!("CARGO_BIN_EXE_handover-taker")),
        ],
    );
    let results = run.results();
    require_no_failure(&run);
    require_ok(&run, "", HANDOVER_TESTS);
    for step in ["handover_b", "handover_c"] {
        let opens = watched_opens(&run, step);
        if !opens.is_empty() {
            fail(
                &run,
                &format!("{step}: the handover opened VFIO or iommufd nodes: {opens:?}"),
            );
        }
    }
    for r in results.iter().filter(|r| r.starts_with("figure ")) {
        println!("nested figure: {r}");
    }
}

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

/// The L1 lines `test vfio_lu_<name> ok`, counted.
fn vfio_lu_oks(run: &L1Run, name: &str) -> usize {
    let expected = format!("test vfio_lu_{name} ok");
    run.results().iter().filter(|r| **r == expected).count()
}

/// The kernel half: luvmm's VFIO live-update handler in the bed's kernel, across a chain of
/// three real kexecs in one L1 (frozen in `reset`, then in `keep`, then into a kernel with
/// the handler off). Two `edu` functions (no reset method), an NVMe controller (FLR), and a
/// second NVMe controller with SR-IOV (its VF must be refused; after the second kexec it is
/// left on no driver, so its retrieve fails).
#[test]
fn vfio_lu_handler_across_a_chain_of_kexecs() {
    let run = boot_scenario_appending(
        "nested-vfio-lu",
        "vfio-lu",
        // keep needs the device left in D0 between boot and the bind.
        "vfio_pci.luvmm_lu=reset vfio_pci.disable_idle_d3=1",
        &[
            "edu",
            "edu",
            "nvme,serial=luvmm-nvme",
            // QEMU's SR-IOV NVMe needs a subsystem and flexible queue and interrupt resources.
            "nvme-subsys,id=luvmm-subsys",
            "nvme,serial=luvmm-sriov,subsys=luvmm-subsys,sriov_max_vfs=1,\
             sriov_vq_flexible=2,sriov_vi_flexible=1",
        ],
        &[PathBuf::from(env!("CARGO_BIN_EXE_vfio-lu"))],
    );
    require_no_failure(&run);
    let results = run.results();
    for stage in 1..=4 {
        if !results
            .iter()
            .any(|r| r.starts_with(&format!("boot stage={stage} ")))
        {
            fail(&run, &format!("the chain never reached stage {stage}"));
        }
    }
    if !results.contains(&"selftest liveupdate  ok") {
        fail(
            &run,
            "the kernel's own LUO selftest did not pass with the handler on",
        );
    }
    // host-check finds the handler by probing, and its mode; with the handler off in the last
    // kernel, LUO is broken (the session held a file it could not take back).
    let (code, report) = hostcheck(&run, 1);
    let lu = &report["liveupdate"];
    assert_eq!(lu["handlers"]["vfio_device"], "present", "{report}");
    assert_eq!(lu["vfio_handler_mode"], "reset", "{report}");
    assert_eq!(
        (code, &report["verdict"]),
        (0, &serde_json::json!("ready")),
        "{report}"
    );
    let (_, report) = hostcheck(&run, 4);
    let lu = &report["liveupdate"];
    assert_eq!(lu["luo"], "broken", "{report}");
    assert_eq!(lu["vfio_handler_mode"], "off", "{report}");
    // Once, before any kexec.
    for name in [
        "preserve_group_enoent",
        "preserve_container_enoent",
        "preserve_group_device_enoent",
        "preserve_unbound_enoent",
        "preserve_bound",
        "preserve_twice_ebusy",
        "unbind_refused_while_preserved",
        "unpreserved_on_close",
        "unbind_after_close",
        "preserve_vf_enoent",
        "freeze_refused_with_msi",
        "freeze_refused_out_of_d0",
        "frozen_device_gives_eio",
        "unfrozen_device_works",
        "reopen_after_failed_kexec",
        "next_kernel_without_handler_eio",
        "reset_mode_nvme_disabled",
        "keep_mode_nvme_enabled",
        "keep_mode_bus_master_kept",
        "keep_mode_old_admin_queue",
        "retrieve_unbound_enodev",
        "failed_retrieve_stays_failed",
        "failed_retrieve_still_incoming",
        "finish_after_failed_retrieve_ebusy",
    ] {
        if vfio_lu_oks(&run, name) != 1 {
            fail(&run, &format!("vfio_lu_{name}: expected one ok"));
        }
    }
    // After each of the two kexecs with the handler on.
    for name in [
        "cdev_open_ebusy",
        "group_get_device_fd_ebusy",
        "finish_before_retrieve_ebusy",
        "ioctl_before_bind_einval",
        "bind_attach_map_file",
        "edu_dma_and_msi",
        "finish",
        "normal_open_after_finish",
    ] {
        if vfio_lu_oks(&run, name) != 2 {
            fail(
                &run,
                &format!("vfio_lu_{name}: expected an ok after each kexec"),
            );
        }
    }
}

/// `luvmm update release`: after a kexec, a VM's preserved device is incoming (the kernel
/// refuses its normal open with EBUSY) until its session finishes; releasing the session
/// without a restore makes the device usable again. With the bed's VFIO handler on.
#[test]
fn vfio_lu_release_frees_a_preserved_device_without_a_restore() {
    let run = boot_scenario_appending(
        "nested-release",
        "release",
        "vfio_pci.luvmm_lu=reset",
        ONE_EDU,
        &[
            luvmm_tests::payload(),
            PathBuf::from(env!("CARGO_BIN_EXE_vfio-lu")),
        ],
    );
    require_second_kernel(&run);
    require_no_failure(&run);
    let results = run.results();
    let line = |prefix: &str| {
        results
            .iter()
            .find_map(|r| r.strip_prefix(prefix))
            .unwrap_or_else(|| fail(&run, &format!("no {prefix:?} line")))
    };
    let prepared = line("release prepare ");
    assert!(prepared.contains("\"preserved\":true"), "{prepared}");
    let before = line("release before ");
    assert!(before.ends_with("errno=16"), "before the release: {before}");
    let released = line("release exit=");
    let (code, json) = released.split_once(' ').unwrap_or((released, ""));
    assert_eq!(code, "0", "{released}");
    let report: serde_json::Value = serde_json::from_str(json).expect("release JSON");
    assert_eq!(report["session"], "luvmm-r1", "{report}");
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
