//! Booting L1 on one scenario and checking the result lines it reports.

use std::path::PathBuf;
use std::time::Duration;

use luvmm_tests::nested::{prepare, run_l1, L1Run, Results};
use luvmm_tests::{luvmm_bin, TestDir};

pub fn fail(run: &L1Run, why: &str) -> ! {
    panic!(
        "{why}\n--- last L1 console lines (host seconds) ---\n{}",
        run.tail(80)
    );
}

/// Boots L1 with `scenario`, `devices` (QEMU `-device` values), and luvmm and `extra` in its
/// initramfs, and prints its result lines.
pub fn boot_scenario(name: &str, scenario: &str, devices: &[&str], extra: &[PathBuf]) -> L1Run {
    boot_scenario_appending(name, scenario, "", devices, extra)
}

/// `boot_scenario` with `append` added to L1's first kernel command line (the kexec'd
/// kernels inherit it).
pub fn boot_scenario_appending(
    name: &str,
    scenario: &str,
    append: &str,
    devices: &[&str],
    extra: &[PathBuf],
) -> L1Run {
    boot_scenario_with_drives(name, scenario, append, devices, &[], extra)
}

/// `boot_scenario_appending` with QEMU `-drive` values behind L1's NVMe namespaces.
pub fn boot_scenario_with_drives(
    name: &str,
    scenario: &str,
    append: &str,
    devices: &[&str],
    drives: &[String],
    extra: &[PathBuf],
) -> L1Run {
    let work = TestDir::new(name);
    let mut binaries = vec![luvmm_bin()];
    binaries.extend_from_slice(extra);
    let bed = prepare(work.path(), &binaries);
    let timeout = Duration::from_secs(900);
    let run = run_l1(&bed, scenario, append, devices, drives, timeout);
    if run.timed_out {
        fail(&run, "L1 did not power off within the timeout");
    }
    for r in run.results() {
        println!("L1: {r}");
    }
    run
}

/// Fails unless the second kernel of the kexec ran the scenario.
pub fn require_second_kernel(run: &L1Run) {
    if !run.results().iter().any(|r| r.starts_with("boot stage=2")) {
        fail(run, "the second kernel never ran the scenario");
    }
}

/// Fails on any result line that says FAIL.
pub fn require_no_failure(run: &L1Run) {
    let results = run.results();
    let failures: Vec<&&str> = results.iter().filter(|r| r.contains(" FAIL")).collect();
    if !failures.is_empty() {
        fail(run, &format!("failures: {failures:#?}"));
    }
}

/// Fails unless each of `names` reported `test <prefix><name> ok`.
pub fn require_ok(run: &L1Run, prefix: &str, names: &[&str]) {
    let results = run.results();
    for name in names {
        if !results.contains(&format!("test {prefix}{name} ok").as_str()) {
            fail(run, &format!("{prefix}{name} did not report ok"));
        }
    }
}

/// The exit code and JSON report of `luvmm host-check --json` in `stage`.
pub fn hostcheck(run: &L1Run, stage: u32) -> (i32, serde_json::Value) {
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

/// The opens `vfio-open-watch` recorded in step `step`: (node, comm) pairs, after checking
/// the step itself succeeded.
pub fn watched_opens<'a>(run: &'a L1Run, step: &str) -> Vec<(&'a str, &'a str)> {
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

/// The per-device open counts `vfio-open-watch` printed in step `step`.
pub fn device_opens<'a>(run: &'a L1Run, step: &str) -> Vec<(&'a str, u32)> {
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
