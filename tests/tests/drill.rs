//! `luvmm drill` in the nested bed, as an operator runs it: its JSON report is checked against
//! the guests' own lines it carries, and its exit status must follow `ok`.

use std::path::{Path, PathBuf};
use std::process::Command;

use luvmm_tests::nested::{linux_guest, one_l1_at_a_time, prepare};
use luvmm_tests::{luvmm_bin, parse_linux_check, payload, TestDir};
use serde_json::Value;

/// Runs `luvmm drill` with `flags` on the bed's kernel; returns its exit status, its report,
/// its SVG timeline and its directory, which a failing test keeps (L1's console is there).
fn drill(name: &str, flags: &[&str]) -> (i32, Value, String, TestDir) {
    let work = TestDir::new(name);
    let bed = prepare(work.path(), &[luvmm_bin()]);
    let svg = work.join("timeline.svg");
    let _turn = one_l1_at_a_time();
    let out = Command::new(luvmm_bin())
        .arg("drill")
        .args(bed.luvmm_args())
        .arg("--payload")
        .arg(payload())
        .arg("--json")
        .arg("--svg")
        .arg(&svg)
        .arg("--work-dir")
        .arg(work.join("drill"))
        .args(flags)
        .output()
        .expect("run luvmm drill");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {stdout}\n{stderr}\n{}",
            console(&work.join("drill"))
        )
    });
    // Whatever the drill found, its report has the documented shape.
    luvmm_tests::schema::assert_report("DrillReport", &report);
    let svg = std::fs::read_to_string(&svg).unwrap_or_default();
    (out.status.code().unwrap_or(-1), report, svg, work)
}

fn console(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("console.log")).unwrap_or_default()
}

/// What the open watcher saw over one span of a round (`opens_prepare_to_kexec` or
/// `opens_agent_to_resume`): VFIO cdev opens, group and container opens, `/dev/iommu` opens.
fn watched(round: &Value, span: &str) -> (usize, usize, usize) {
    let opens = round[span]["opens"]
        .as_array()
        .unwrap_or_else(|| panic!("no {span} in {round}"));
    let count = |node: &str| opens.iter().filter(|o| o["node"] == node).count();
    (
        count("vfio_cdev"),
        count("vfio_group") + count("vfio_container"),
        count("iommufd"),
    )
}

fn rounds<'a>(report: &'a Value, kind: &str) -> Vec<&'a Value> {
    report["rounds"]
        .as_array()
        .map(|r| r.iter().filter(|r| r["kind"] == kind).collect())
        .unwrap_or_default()
}

/// The fields of a guest check line, re-read here rather than trusted from the verdict.
fn check_fields(line: &Value) -> (String, u64, Vec<u64>) {
    let line = line.as_str().unwrap_or_default();
    let check = luvmm_tests::parse_check(line);
    assert!(check.ok, "not an ok check: {line}");
    (check.seed, check.checks, check.heartbeats)
}

/// Every VM of a round: its guest's own check says it went on (same boot, a later check,
/// every vCPU's heartbeat further on), and each device did a DMA round trip with its MSI.
fn require_guests_went_on(report: &Value, round: &Value, vms: usize, devices: usize) {
    let list = round["vms"].as_array().expect("vms");
    assert_eq!(list.len(), vms, "{round}");
    for vm in list {
        assert_eq!(vm["guest_check"], "ok", "{report}");
        let (seed0, checks0, beats0) = check_fields(&vm["check_before"]);
        let (seed1, checks1, beats1) = check_fields(&vm["check_after"]);
        assert_eq!(seed0, seed1, "{vm}");
        assert!(checks1 > checks0, "{vm}");
        assert_eq!(beats0.len(), 2, "{vm}");
        assert!(beats1.iter().zip(&beats0).all(|(a, b)| a > b), "{vm}");
        // The guest's own clock measured its longest stop across the round.
        let gap = vm["guest_clock_gap_ms"].as_f64();
        assert!(gap.is_some_and(|ms| ms > 0.0), "{vm}");
        println!(
            "round {} ({}) {}: blackout_ms {} guest_clock_gap_ms {} guest_clock_back_ms {}",
            round["round"],
            round["kind"],
            vm["vm"],
            vm["phases_ms"]["blackout"],
            vm["guest_clock_gap_ms"],
            vm["guest_clock_back_ms"]
        );
        let devs = vm["devices"].as_array().expect("devices");
        assert_eq!(devs.len(), devices, "{vm}");
        for dev in devs {
            let line = dev["round_line"].as_str().unwrap_or_default();
            // A DMA round trip with its MSI, through the very device the guest named at boot.
            assert!(
                line.starts_with("LUVMM-ROUND ok ") && line.ends_with(" dma=ok irq=msi id=ok"),
                "{vm}"
            );
        }
    }
}

/// One VM with two edu devices on stock 7.2 (no VFIO handler): the update goes through, both
/// devices are opened again after the kexec (once each, as the watcher sees), and the guest
/// finds every page of its RAM intact. Guest RAM is in transparent huge pages by default (L1's
/// shmem THP on `advise`, `MADV_HUGEPAGE`, RAM filled by luvmm), and LUO brings the large
/// folios back across the kexec: L1's own `ShmemHugePages` holds all of guest RAM before the
/// prepare and after the restore.
#[test]
fn a_drill_reopens_devices_without_the_vfio_handler_and_the_guest_keeps_everything() {
    let (code, report, svg, _work) =
        drill("drill-one", &["--devices", "2", "--vfio-handler", "off"]);
    assert_eq!((code, &report["ok"]), (0, &Value::Bool(true)), "{report}");
    assert_eq!(report["kernel"], "7.2.13", "{report}");
    assert_eq!(report["next_kernel"], "7.2.13", "{report}");
    let updates = rounds(&report, "update");
    assert_eq!(updates.len(), 1, "{report}");
    let round = updates[0];
    require_guests_went_on(&report, round, 1, 2);
    assert!(
        round["kexec_boot_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "{round}"
    );
    let vm = &round["vms"][0];
    for key in ["shmem_huge_kib_before", "shmem_huge_kib_after"] {
        let kib = vm[key].as_u64().unwrap_or(0);
        assert!(
            kib >= 64 * 1024,
            "{key}: {kib} KiB of 64 MiB in huge pages: {vm}"
        );
    }
    for dev in vm["devices"].as_array().expect("devices") {
        assert_eq!(dev["preserved"], false, "{vm}");
        assert_eq!(dev["normal_opens"], 1, "{vm}");
    }
    // The kernel's own count: nothing from the prepare to the kexec; after it, from the
    // agent's start to the resume, two cdev opens and one /dev/iommu, by the restoring luvmm.
    let (cdev, group, _) = watched(round, "opens_prepare_to_kexec");
    assert_eq!((cdev, group), (0, 0), "{round}");
    assert_eq!(
        watched(round, "opens_agent_to_resume"),
        (2, 0, 1),
        "{round}"
    );
    for phase in [
        "preserve_ram",
        "pause",
        "save_state",
        "preserve_state",
        "restore_devices",
        "finish",
        "blackout",
    ] {
        assert!(vm["phases_ms"][phase].as_f64().is_some(), "{phase}: {vm}");
    }
    for row in [
        "<title>host kexec: ",
        "<title>vm1 paused: ",
        "<title>vm1 restore: ",
    ] {
        assert!(svg.contains(row), "{row} not in {svg}");
    }
}

/// Two VMs: a prepared update called off first (each guest goes on in place), then two
/// updates back to back, the second from the kernel the first one booted. With `--thp off`
/// L1's shmem THP stays `never` and no page of guest RAM is huge, before or after.
#[test]
fn a_drill_of_two_vms_cancels_first_then_updates_twice() {
    let (code, report, _, _work) = drill(
        "drill-two",
        &[
            "--vms",
            "2",
            "--devices",
            "1",
            "--cancel-first",
            "--rounds",
            "2",
            "--thp",
            "off",
        ],
    );
    assert_eq!((code, &report["ok"]), (0, &Value::Bool(true)), "{report}");
    let cancels = rounds(&report, "cancel");
    assert_eq!(cancels.len(), 1, "{report}");
    require_guests_went_on(&report, cancels[0], 2, 1);
    let updates = rounds(&report, "update");
    assert_eq!(updates.len(), 2, "{report}");
    for round in &updates {
        require_guests_went_on(&report, round, 2, 1);
        for vm in round["vms"].as_array().into_iter().flatten() {
            for key in ["shmem_huge_kib_before", "shmem_huge_kib_after"] {
                assert_eq!(vm[key].as_u64(), Some(0), "{key}: {vm}");
            }
        }
    }
    // The second round's guests are the first round's, one check further.
    let pairs = updates[0]["vms"].as_array().into_iter().flatten();
    for (one, two) in pairs.zip(updates[1]["vms"].as_array().into_iter().flatten()) {
        let first = check_fields(&one["check_after"]);
        let second = check_fields(&two["check_before"]);
        assert_eq!(first.0, second.0, "{report}");
        assert!(second.1 > first.1, "{report}");
    }
}

/// `--vfio-handler on` (the bed kernel's handler in `reset` mode): every device is preserved,
/// and after each kexec it comes back only through the VM's LUO session. The kernel's own
/// count of normal opens of the devices and their groups, from the prepare to the kexec and
/// from the next kernel's agent to the resume, is zero; the only open is the new `/dev/iommu`
/// after the kexec, which is not preserved. Two rounds: the second preserves files that the
/// first retrieved.
#[test]
fn a_drill_with_the_vfio_handler_reaches_devices_only_through_the_session() {
    let (code, report, _, _work) = drill(
        "drill-handler",
        &["--devices", "2", "--rounds", "2", "--vfio-handler", "on"],
    );
    assert_eq!((code, &report["ok"]), (0, &Value::Bool(true)), "{report}");
    let updates = rounds(&report, "update");
    assert_eq!(updates.len(), 2, "{report}");
    for round in updates {
        require_guests_went_on(&report, round, 1, 2);
        let vm = &round["vms"][0];
        for dev in vm["devices"].as_array().expect("devices") {
            assert_eq!(dev["preserved"], true, "{vm}");
            assert_eq!(dev["normal_opens"], 0, "{vm}");
        }
        // From the prepare to the kexec and from the next kernel's agent to the resume.
        let (cdev, group, _) = watched(round, "opens_prepare_to_kexec");
        assert_eq!((cdev, group), (0, 0), "{round}");
        assert_eq!(
            watched(round, "opens_agent_to_resume"),
            (0, 0, 1),
            "{round}"
        );
    }
}

/// Two identical devices swapped onto each other in the restore (the test-only fault
/// `swap-devices`: each preserved device goes into the other's guest slot) still do their DMA,
/// but each guest round finds another device's identity in the slot it named at boot, and the
/// drill fails saying so.
#[test]
fn nothing_lost_drill_catches_two_devices_swapped_in_the_restore() {
    let (code, report, _, _work) = drill(
        "drill-swap",
        &[
            "--devices",
            "2",
            "--vfio-handler",
            "on",
            "--test-faults",
            "swap-devices",
        ],
    );
    assert_eq!((code, &report["ok"]), (1, &Value::Bool(false)), "{report}");
    let round = rounds(&report, "update")[0];
    let vm = &round["vms"][0];
    for dev in vm["devices"].as_array().expect("devices") {
        let line = dev["round_line"].as_str().unwrap_or_default();
        assert!(line.contains(" id=LOST found="), "{vm}");
        assert_eq!(dev["same_device"], false, "{vm}");
        let bdf = dev["bdf"].as_str().unwrap_or_default();
        let failures = report["failures"].as_array().expect("failures");
        assert!(
            failures.iter().any(|f| {
                f.as_str().is_some_and(|f| {
                    f.contains(&format!("{bdf}: another device answers in its slot"))
                })
            }),
            "{report}"
        );
    }
}

/// A Linux guest with an NVMe controller, the handler in `keep` mode: the guest's own judge
/// (its RAM, its blocks through its nvme driver, its kernel log, its clocks) says nothing was
/// lost, its driver never reset the controller, and the controller came only through the
/// session. The check lines are re-read here rather than trusted from the verdict.
#[test]
fn a_drill_with_a_linux_guest_in_keep_mode_loses_nothing() {
    let (code, report, svg, _work) = linux_drill("drill-linux", &["--vfio-handler", "keep"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(code, 0);
    let updates = rounds(&report, "update");
    assert_eq!(updates.len(), 1, "{report}");
    let vm = &updates[0]["vms"][0];
    assert_eq!(vm["guest_check"], "ok", "{report}");
    let read = |key: &str| {
        let line = vm[key].as_str().unwrap_or_default();
        parse_linux_check(line).unwrap_or_else(|| panic!("{key} is not a judge's check: {vm}"))
    };
    let (before, after) = (read("check_before"), read("check_after"));
    let (io0, io1) = (before.io.expect("I/O before"), after.io.expect("I/O after"));
    assert!(after.memory.ok(), "{vm}");
    assert!(
        io1.errors == 0 && io1.mismatches == 0 && io1.verified > io0.verified,
        "{vm}"
    );
    assert!(after.kernel_warnings.is_empty(), "{vm}");
    assert_eq!(after.controller_resets, 0, "{vm}");
    assert!(after.clock.realtime_offset_ms.abs() < 1000.0, "{vm}");
    // The report's own fields, under the names scripts rely on.
    assert_eq!(vm["memory"], "ok", "{vm}");
    assert_eq!(vm["controller_resets"], 0, "{vm}");
    assert_eq!(vm["io"]["errors"], 0, "{vm}");
    let device = &vm["devices"][0];
    assert_eq!(device["preserved"], true, "{vm}");
    assert_eq!(device["normal_opens"], 0, "{vm}");
    assert_eq!(device["works"], true, "{vm}");
    assert!(svg.contains("<svg"), "{svg}");
    println!(
        "linux drill: blackout_ms {} guest-seen gap_ms {} longest I/O stall_ms {}",
        vm["phases_ms"]["blackout"], vm["clock"]["longest_gap_ms"], vm["io"]["longest_stall_ms"]
    );
}

/// Runs a drill of the bed's Linux guest with one NVMe controller and `flags`.
fn linux_drill(name: &str, flags: &[&str]) -> (i32, Value, String, TestDir) {
    let files = TestDir::new(&format!("{name}-files"));
    let guest = linux_guest(files.path());
    let (kernel, initrd) = (
        guest[0].display().to_string(),
        guest[2].display().to_string(),
    );
    let mut all = vec![
        "--guest",
        "linux",
        "--guest-kernel",
        &kernel,
        "--guest-initrd",
        &initrd,
    ];
    all.extend_from_slice(flags);
    drill(name, &all)
}

/// The handler in `reset` mode: the controller comes back reset, the guest's nvme driver
/// times out and resets it, and the drill waits for that recovery and reports it: the
/// driver's resets and the guest's longest I/O stall, with nothing lost.
#[test]
fn a_drill_with_a_linux_guest_in_reset_mode_reports_its_drivers_recovery() {
    let (code, report, _, _work) = linux_drill("drill-linux-reset", &["--vfio-handler", "reset"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(code, 0);
    let vm = &rounds(&report, "update")[0]["vms"][0];
    assert!(
        vm["controller_resets"].as_u64().is_some_and(|n| n > 0),
        "{vm}"
    );
    assert_eq!(vm["memory"], "ok", "{vm}");
    assert_eq!(vm["io"]["errors"], 0, "{vm}");
    assert_eq!(vm["devices"][0]["preserved"], true, "{vm}");
    println!(
        "linux drill (reset): blackout_ms {} guest-seen gap_ms {} guest recovery (longest I/O \
         stall) ms {}, {} resets; checks {} / {:?} / {}",
        vm["phases_ms"]["blackout"],
        vm["clock"]["longest_gap_ms"],
        vm["io"]["longest_stall_ms"],
        vm["controller_resets"],
        vm["check_before"],
        vm["recovery_checks"],
        vm["check_after"]
    );
}

/// A restore that does not put the saved kvmclock back (a test fault) leaves the guest's clock
/// wrong, and the drill says so from the guest's own check.
#[test]
fn nothing_lost_drill_a_linux_guest_shows_a_clock_left_wrong() {
    linux_drill_in_keep_mode_fails("drill-linux-clock", "no-kvmclock-restore", "clock: ");
}

/// The damage check for the guest's watchdog: a restore that does not tell the guest it was
/// paused (`KVM_KVMCLOCK_CTRL` left out) leaves the guest's kernel to call the blackout a soft
/// lockup, and the drill fails on that warning from the guest's own log.
#[test]
fn nothing_lost_drill_a_linux_guest_not_told_of_its_blackout_reports_a_soft_lockup() {
    linux_drill_in_keep_mode_fails("drill-linux-untold", "no-kvmclock-ctrl", "soft lockup");
}

/// Runs a `keep` drill of the Linux guest with the test fault `fault` and requires it to fail
/// with `failure` among its reasons.
fn linux_drill_in_keep_mode_fails(name: &str, fault: &str, failure: &str) {
    let flags = ["--vfio-handler", "keep", "--test-faults", fault];
    let (code, report, _, _work) = linux_drill(name, &flags);
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(code, 1, "{report}");
    let failures = report["failures"].to_string();
    assert!(failures.contains(failure), "{failures}");
}

/// Plans the bed cannot hold are refused before anything boots.
#[test]
fn a_drill_plan_outside_the_bed_is_refused_by_name() {
    let out = Command::new(luvmm_bin())
        .args([
            "drill",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--payload",
            "/p",
        ])
        .args(["--vms", "9"])
        .output()
        .expect("run luvmm drill");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--vms must be 1 to 8, not 9"), "{stderr}");
    let missing: PathBuf = ["/nonexistent", "bzImage"].iter().collect();
    let out = Command::new(luvmm_bin())
        .arg("drill")
        .arg("--kernel")
        .arg(&missing)
        .args(["--initrd", "/nonexistent/i", "--payload", "/nonexistent/p"])
        .output()
        .expect("run luvmm drill");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot read /nonexistent/i"), "{stderr}");
    for (flags, refusal) in [
        (
            &["--guest", "linux", "--devices", "2"][..],
            "--devices must be 0 or 1 with --guest linux",
        ),
        (
            &["--guest", "linux", "--memory-mib", "64"][..],
            "--memory-mib must be at least 128 with --guest linux, not 64",
        ),
    ] {
        let out = Command::new(luvmm_bin())
            .args(["drill", "--kernel", "/k", "--initrd", "/i"])
            .args(flags)
            .output()
            .expect("run luvmm drill");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(refusal), "{stderr}");
    }
}

/// A host of eight VMs, devices on three of them: every VM is staged while its guest runs,
/// then all are prepared together, the host kexecs and every VM comes back. Each guest's own
/// check says it kept everything, each device does a DMA round trip with its MSI, and no VM
/// was paused before every VM had been staged.
#[test]
fn a_drill_of_eight_vms_some_with_devices_loses_nothing() {
    let (code, report, svg, _work) = drill(
        "drill-eight",
        &["--vms", "8", "--devices", "1", "--devices-on", "3"],
    );
    assert_eq!((code, &report["ok"]), (0, &Value::Bool(true)), "{report}");
    let updates = rounds(&report, "update");
    assert_eq!(updates.len(), 1, "{report}");
    let vms = updates[0]["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 8, "{report}");
    for vm in vms {
        assert_eq!(vm["guest_check"], "ok", "{vm}");
        let (seed0, checks0, _) = check_fields(&vm["check_before"]);
        let (seed1, checks1, _) = check_fields(&vm["check_after"]);
        assert_eq!(seed0, seed1, "{vm}");
        assert!(checks1 > checks0, "{vm}");
        let name = vm["vm"].as_str().unwrap_or_default();
        let with_devices = ["vm1", "vm2", "vm3"].contains(&name);
        let devices = vm["devices"].as_array().expect("devices");
        assert_eq!(devices.len(), usize::from(with_devices), "{vm}");
        for dev in devices {
            let line = dev["round_line"].as_str().unwrap_or_default();
            assert!(line.ends_with(" dma=ok irq=msi id=ok"), "{vm}");
        }
    }
    // The barrier, on the drill's timeline (L1's console lines by the host's clock).
    let spans = report["timeline"].as_array().expect("the timeline");
    let starts = |phase: &str| -> Vec<f64> {
        spans
            .iter()
            .filter(|s| s["phase"] == phase)
            .filter_map(|s| s["start_s"].as_f64())
            .collect()
    };
    let (staged, paused) = (starts("staged"), starts("paused"));
    assert_eq!((staged.len(), paused.len()), (8, 8), "{report}");
    let last_staged = staged.iter().copied().fold(f64::MIN, f64::max);
    let first_paused = paused.iter().copied().fold(f64::MAX, f64::min);
    assert!(
        last_staged <= first_paused,
        "a VM paused at {first_paused} s before the last was staged at {last_staged} s"
    );
    for vm in 1..=8 {
        assert!(svg.contains(&format!(">vm{vm}</text>")), "vm{vm} not drawn");
    }
}
