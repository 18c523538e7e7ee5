//! Pause, resume and save of a running guest.

use std::time::{Duration, Instant};

use luvmm_devices::guest_control::GuestRequest;
use luvmm_tests::{assert_never, checks, lines_with, TestDir, Vm};
use luvmm_vmm::vmm::VmPhase;

#[test]
fn pause_holds_the_guest_and_resume_lets_it_go_on() {
    let dir = TestDir::new("pause");
    let vm = Vm::boot(&dir, "vm", &[]);
    let asked = Instant::now();
    let first = vm.check();
    let answered_in = asked.elapsed();
    assert!(first.ok, "{}", first.line);

    vm.client().pause().expect("PUT /vm/pause");
    assert_eq!(vm.phase(), VmPhase::Paused);
    // A check asked for while paused must wait for the resume: nothing runs the guest now.
    vm.client().check().expect("PUT /vm/check");
    // Watched for ten times as long as the running guest took to answer, within 0.7 to 10 s.
    let seen = checks(&vm.serial).len();
    let window = (answered_in * 10).clamp(Duration::from_millis(700), Duration::from_secs(10));
    assert_never("a paused guest answered", window, || {
        checks(&vm.serial).len() != seen
    });

    vm.client().resume().expect("PUT /vm/resume");
    assert_eq!(vm.phase(), VmPhase::Running);
    let after = vm.next_check(seen);
    assert!(after.ok, "{}", after.line);
    assert!(
        after.heartbeat >= first.heartbeat,
        "{after:?} after {first:?}"
    );
    assert_eq!(after.seed, first.seed, "the guest rebooted");
    assert_eq!(after.checks, first.checks + 1);
}

#[test]
fn save_pauses_and_exports_a_state_file() {
    let dir = TestDir::new("save");
    let vm = Vm::boot(&dir, "vm", &[]);
    let export = dir.join("state.bin");
    let report = vm.client().save(Some(&export)).expect("PUT /vm/save");
    assert!(report.pause_to_saved_ms > 0.0);
    assert_eq!(
        std::fs::metadata(&export).unwrap().len(),
        report.state_bytes
    );
    assert_eq!(&std::fs::read(&export).unwrap()[..8], b"LUVMMSTA");

    assert_eq!(vm.phase(), VmPhase::Paused);
    assert!(vm.client().status().unwrap().state_current);
    // Running again makes the saved state stale.
    vm.client().resume().expect("PUT /vm/resume");
    assert!(!vm.client().status().unwrap().state_current);
    assert!(vm.check().ok);
}

#[test]
fn the_restore_benchmark_reports_figures_and_names_a_failure() {
    luvmm_tests::require_kvm();
    let payload = luvmm_tests::payload();
    let out = std::process::Command::new(luvmm_tests::luvmm_bin())
        .args([
            "bench", "restore", "--sizes", "16", "--rounds", "3", "--json",
        ])
        .arg("--payload")
        .arg(&payload)
        .output()
        .expect("run luvmm bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let size = &report["sizes"][0];
    assert_eq!(size["memory_mib"], 16, "{report}");
    // The blackout and its parts, from the target's own timings: built ahead, outside it.
    let median = &size["median"];
    let ms = |key: &str| median[key].as_f64().unwrap_or(-1.0);
    assert!(ms("blackout_ms") > 0.0, "{report}");
    for part in ["save_ms", "transfer_ms", "load_ms", "built_ahead_ms"] {
        assert!(ms(part) > 0.0 && ms(part) < 1e4, "{part}: {report}");
    }
    assert!(
        ms("save_ms") + ms("transfer_ms") + ms("load_ms") <= ms("blackout_ms"),
        "{report}"
    );
    assert!(size["min_blackout_ms"].as_f64() <= size["max_blackout_ms"].as_f64());
    assert_eq!(size["devices"], 0, "{report}");
    assert_eq!(report["rounds_per_size"], 3, "{report}");
    let blackouts = size["blackouts_ms"]
        .as_array()
        .expect("every round's blackout");
    assert_eq!(blackouts.len(), 3, "{report}");
    assert!(blackouts.contains(&median["blackout_ms"]), "{report}");
    assert_eq!(
        report["flatness"],
        serde_json::json!([[0, 1.0]]),
        "{report}"
    );
    assert_eq!(
        report["devices_over_none"],
        serde_json::json!([]),
        "{report}"
    );

    // A failed round leaves no scratch directory behind.
    let scratch = TestDir::new("bench-scratch");
    let out = std::process::Command::new(luvmm_tests::luvmm_bin())
        .args(["bench", "restore", "--sizes", "16", "--payload"])
        .arg("/nonexistent/payload.elf")
        .env("TMPDIR", scratch.path())
        .output()
        .expect("run luvmm bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("exited (exit status: 1) before its guest booted"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().collect();
    assert!(left.is_empty(), "the bench left {left:?}");
    // Devices it cannot have are refused before anything starts (nothing is on vfio-pci here).
    let (status, stderr) = luvmm_tests::run_luvmm(&[
        "bench",
        "restore",
        "--sizes",
        "16",
        "--devices",
        "0,1",
        "--payload",
        payload.to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("1 passthrough device(s) asked for"),
        "{stderr}"
    );
    let (status, stderr) = luvmm_tests::run_luvmm(&[
        "bench",
        "restore",
        "--rounds",
        "0",
        "--payload",
        payload.to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("--rounds"), "{stderr}");
}

#[test]
fn a_guest_request_reaches_the_guest_and_a_guest_can_ask_to_be_paused() {
    let dir = TestDir::new("guest-request");
    let vm = Vm::boot(&dir, "vm", &[]);
    assert!(vm.check().ok);
    // No device here: the round finds none, and says so.
    vm.client()
        .guest_request(GuestRequest::Devices)
        .expect("PUT /vm/guest-request");
    let done = luvmm_tests::wait_until("the guest's device round", || {
        lines_with(&vm.serial, "LUVMM-ROUND done").pop()
    });
    assert_eq!(done, "LUVMM-ROUND done n=1 devices=0");
    // The guest leaves nothing in flight here, but still asks to be paused: the VMM obliges.
    vm.client()
        .guest_request(GuestRequest::IrqInFlight)
        .expect("PUT /vm/guest-request");
    luvmm_tests::wait_until("the guest's pause request", || {
        (vm.phase() == VmPhase::Paused).then_some(())
    });
    assert_eq!(
        lines_with(&vm.serial, "LUVMM-INFLIGHT"),
        ["LUVMM-INFLIGHT armed nvme_held=0 edu_in_flight=0"]
    );
    vm.client().resume().expect("PUT /vm/resume");
    assert!(vm.check().ok);
    // Requests the typed client cannot make.
    let (status, body) = vm.api("PUT", "/vm/guest-request", r#"{"request": "reboot"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown variant `reboot`"), "{body}");
    assert_eq!(vm.api("PUT", "/vm/guest-request", "").0, 400);
}
