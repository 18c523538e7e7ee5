//! Save in one process, kill it, restore in another: the guest's own check must say nothing
//! was lost and that it kept running rather than rebooting.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

use luvmm_tests::{checks, inherit, luvmm_bin, Check, TestDir, Vm};
use luvmm_vmm::api::client::ClientError;
use luvmm_vmm::vmm::VmPhase;

/// Asserts the first check after a restore continues the guest's life from `before`.
fn assert_continued(before: &Check, after: &Check) {
    assert!(after.ok, "{}", after.line);
    assert_eq!(after.seed, before.seed, "the guest rebooted: {after:?}");
    assert_eq!(after.pages, before.pages);
    assert_eq!(after.checks, before.checks + 1, "check counter restarted");
    assert_every_heartbeat_went_on(before, after);
}

/// Every vCPU ran on: application processors too, each on its own timer.
fn assert_every_heartbeat_went_on(before: &Check, after: &Check) {
    assert_eq!(after.heartbeats.len(), before.heartbeats.len(), "{after:?}");
    for (id, (b, a)) in before.heartbeats.iter().zip(&after.heartbeats).enumerate() {
        assert!(
            a > b,
            "vCPU {id}'s heartbeat did not go on: {before:?} -> {after:?}"
        );
    }
}

fn save(vm: &Vm, export: Option<&Path>) {
    vm.client().save(export).expect("PUT /vm/save");
}

/// Takes the VM's memfds (and state memfd) over the API, as an agent holding them would.
fn handover(vm: &Vm) -> Vec<OwnedFd> {
    vm.client().handover().expect("PUT /vm/handover").fds
}

/// The HTTP status with which the VM refused a request.
fn refusal<T: std::fmt::Debug>(reply: Result<T, ClientError>) -> Option<u16> {
    reply.expect_err("the VM should refuse").status()
}

/// What a restore from inherited fds starts from: a VM booted with `extra`, checked, saved
/// (and exported to `state.bin`), whose memfds this test took over before killing its process.
/// Returns the check before the save, the export, the fds (state memfd, then one memfd per
/// RAM region) and the serial log.
fn boot_save_and_kill(
    dir: &TestDir,
    extra: &[&str],
) -> (Check, std::path::PathBuf, Vec<OwnedFd>, std::path::PathBuf) {
    let first = Vm::boot(dir, "first", extra);
    let before = first.check();
    assert!(before.ok, "{}", before.line);
    let export = dir.join("state.bin");
    save(&first, Some(&export));
    let fds = handover(&first);
    let serial = first.serial.clone();
    first.kill();
    (before, export, fds, serial)
}

/// Restores the state in file `state` onto the single RAM memfd `ram`, as `name`.
fn restore_onto(dir: &TestDir, name: &str, serial: &Path, state: &Path, ram: &OwnedFd) -> Vm {
    let ram_fd = ram.as_raw_fd().to_string();
    Vm::restore(
        dir,
        name,
        serial,
        &["--state", state.to_str().unwrap(), "--memory-fd", &ram_fd],
        |cmd| inherit(cmd, &[ram]),
    )
}

#[test]
fn restore_in_a_new_process_over_the_api_socket() {
    let dir = TestDir::new("restore-socket");
    let first = Vm::boot(&dir, "first", &["--vcpus", "2"]);
    let before = first.check();
    assert!(before.ok, "{}", before.line);
    save(&first, None);
    let seen = checks(&first.serial).len();

    let second = Vm::restore(
        &dir,
        "second",
        &first.serial,
        &["--from-socket", first.socket.to_str().unwrap()],
        |_| {},
    );
    // The first process gave its VM away: it must refuse to run it again, and says where the
    // VM runs now.
    assert_eq!(first.phase(), VmPhase::HandedOver);
    assert_eq!(refusal(first.client().resume()), Some(409));
    let status = first.client().status().expect("GET /vm of the source");
    assert_eq!(status.moved_to_pid, Some(second.pid()), "{status:?}");
    let (ok, stderr) =
        luvmm_tests::run_luvmm(&["ctl", "--socket", first.socket.to_str().unwrap(), "status"]);
    assert!(ok.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("it runs in process {} now", second.pid())),
        "{stderr}"
    );
    first.kill();

    // The restore asks the guest for a check by itself.
    let after = second.next_check(seen);
    assert_continued(&before, &after);
    let later = second.check();
    assert!(later.ok && later.heartbeat > after.heartbeat, "{later:?}");
    assert_eq!(second.phase(), VmPhase::Running);
    // The target measures the guest's blackout from the source's pause.
    let status = second.client().status().expect("GET /vm");
    let blackout = status.restore_timings.as_ref().and_then(|t| t.blackout_ms);
    assert!(blackout.is_some_and(|ms| ms > 0.0), "{status:?}");
}

#[test]
fn a_handover_whose_target_dies_is_taken_back_by_resume() {
    let dir = TestDir::new("restore-target-dies");
    let first = Vm::boot(&dir, "first", &["--vcpus", "2"]);
    let before = first.check();
    save(&first, None);
    assert_eq!(refusal(first.client().complete_handover("")), Some(409));
    // This test is the target: it receives the fds and dies (drops them) without confirming.
    let handed = first.client().handover().expect("PUT /vm/handover");
    let token = handed.manifest.token.clone();
    drop(handed);
    assert_eq!(first.phase(), VmPhase::HandingOver);
    let (status, stderr) =
        luvmm_tests::run_luvmm(&["ctl", "--socket", first.socket.to_str().unwrap(), "resume"]);
    assert!(status.success(), "ctl resume: {stderr}");
    assert_eq!(first.phase(), VmPhase::Running);
    let after = first.check();
    assert!(after.ok, "{}", after.line);
    assert_eq!(after.seed, before.seed, "the guest rebooted");
    assert_every_heartbeat_went_on(&before, &after);
    // Resumed, the old state is stale: a late target can neither take it nor confirm.
    assert_eq!(refusal(first.client().handover()), Some(409));
    assert_eq!(refusal(first.client().complete_handover(&token)), Some(409));
}

#[test]
fn restore_from_inherited_memfds_and_state_memfd() {
    let dir = TestDir::new("restore-fds");
    let first = Vm::boot(&dir, "first", &["--memory-mib", "32"]);
    let before = first.check();
    save(&first, None);
    let seen = checks(&first.serial).len();
    let fds = handover(&first);
    assert_eq!(fds.len(), 3, "state memfd + one RAM memfd + the ticket");
    let serial = first.serial.clone();
    first.kill();

    let state_fd = fds[0].as_raw_fd().to_string();
    let ram_fd = fds[1].as_raw_fd().to_string();
    let second = Vm::restore(
        &dir,
        "second",
        &serial,
        &["--state-fd", &state_fd, "--memory-fd", &ram_fd],
        |cmd| inherit(cmd, &[&fds[0], &fds[1]]),
    );
    drop(fds);
    let after = second.next_check(seen);
    assert_continued(&before, &after);
}

#[test]
fn restore_from_an_exported_state_file() {
    let dir = TestDir::new("restore-file");
    let (before, export, fds, serial) = boot_save_and_kill(&dir, &[]);
    let seen = checks(&serial).len();
    let second = restore_onto(&dir, "second", &serial, &export, &fds[1]);
    let after = second.next_check(seen);
    assert_continued(&before, &after);
}

/// Runs a restore that must fail, returning its stderr.
fn failed_restore(args: &[&str], fds: &[&OwnedFd]) -> String {
    let mut cmd = Command::new(luvmm_bin());
    cmd.arg("restore").args(args).arg("--serial").arg("none");
    inherit(&mut cmd, fds);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run luvmm restore");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "restore {args:?} succeeded: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "restore {args:?} panicked: {stderr}"
    );
    stderr
}

#[test]
fn damaged_or_mismatched_state_is_refused() {
    let dir = TestDir::new("restore-refused");
    let (_, export, fds, _) = boot_save_and_kill(&dir, &[]);
    let ram_fd = fds[1].as_raw_fd().to_string();
    let good = std::fs::read(&export).unwrap();

    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_string()
    };
    let mut flipped = good.clone();
    let last = flipped.len() - 10;
    flipped[last] ^= 0x20;
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&[9, 0, 0, 0]);
    let cases = [
        (
            write("truncated", &good[..good.len() / 2]),
            "state truncated",
        ),
        (write("flipped", &flipped), "state corrupted: CRC"),
        (
            write("magic", b"NOTSTATE but long enough to hold a header"),
            "not a luvmm state: it starts with bytes 4e 4f 54 53 54 41 54 45, a luvmm state \
             with \"LUVMMSTA\"",
        ),
        (write("newer", &newer), "state format 9.0 is not supported"),
    ];
    for (path, expected) in &cases {
        let stderr = failed_restore(&["--state", path, "--memory-fd", &ram_fd], &[&fds[1]]);
        assert!(
            stderr.contains(expected),
            "{path}: expected {expected:?} in {stderr}"
        );
    }

    // The right state on a memfd of the wrong size: refused before anything is built.
    let other = Vm::boot(&dir, "other", &["--memory-mib", "32"]);
    save(&other, None);
    let other_fds = handover(&other);
    other.kill();
    let small_fd = other_fds[1].as_raw_fd().to_string();
    let stderr = failed_restore(
        &[
            "--state",
            export.to_str().unwrap(),
            "--memory-fd",
            &small_fd,
        ],
        &[&other_fds[1]],
    );
    assert!(
        stderr.contains("memory region 0: state says 0x4000000 bytes, memfd has 0x2000000"),
        "{stderr}"
    );
    let stderr = failed_restore(
        &[
            "--state",
            export.to_str().unwrap(),
            "--memory-fd",
            &ram_fd,
            "--memory-fd",
            &small_fd,
        ],
        &[&fds[1], &other_fds[1]],
    );
    assert!(
        stderr.contains("state has 1 memory regions but 2 memfds were given"),
        "{stderr}"
    );
    let stderr = failed_restore(
        &["--state", export.to_str().unwrap(), "--memory-fd", "999"],
        &[],
    );
    assert!(stderr.contains("fd 999 is not open"), "{stderr}");
    // Incomplete flag sets are refused before anything is read.
    let stderr = failed_restore(&["--state", export.to_str().unwrap()], &[]);
    assert!(stderr.contains("--memory-fd"), "{stderr}");
    let stderr = failed_restore(&[], &[]);
    assert!(stderr.contains("--from-socket"), "{stderr}");
}

/// The TSC rate the state exported at `path` saved: this host's, since it was made here.
fn saved_tsc_khz(path: &Path) -> u32 {
    use luvmm_resources::state::{decode, VmState};
    let state: VmState = decode(&std::fs::read(path).unwrap()).unwrap();
    state.vcpus[0].tsc_khz.expect("KVM reports a TSC rate")
}

/// Rewrites the exported state at `path` with `change` applied, as a state from another host
/// would be.
fn rewrite_state(path: &Path, change: impl FnOnce(&mut luvmm_resources::state::VmState)) {
    use luvmm_resources::state::{decode, encode, VmState};
    let mut state: VmState = decode(&std::fs::read(path).unwrap()).expect("decode the export");
    change(&mut state);
    std::fs::write(path, encode(&state).unwrap()).unwrap();
}

#[test]
fn the_saved_tsc_rate_is_applied_or_the_restore_refuses() {
    let dir = TestDir::new("restore-tsc");
    let (before, export, fds, serial) = boot_save_and_kill(&dir, &[]);
    let host_khz = saved_tsc_khz(&export);
    let ram_fd = fds[1].as_raw_fd().to_string();

    // A rate this host cannot give a vCPU: refused by name, before anything runs.
    let slow = dir.join("slow.bin");
    std::fs::copy(&export, &slow).unwrap();
    rewrite_state(&slow, |s| s.vcpus[0].tsc_khz = Some(1));
    let stderr = failed_restore(
        &["--state", slow.to_str().unwrap(), "--memory-fd", &ram_fd],
        &[&fds[1]],
    );
    assert!(
        stderr.contains(&format!(
            "the state's TSC runs at 1 kHz; this host runs vCPUs at {host_khz} kHz"
        )),
        "{stderr}"
    );

    // The saved rate itself restores, and the guest goes on.
    let seen = checks(&serial).len();
    let second = restore_onto(&dir, "second", &serial, &export, &fds[1]);
    assert_continued(&before, &second.next_check(seen));
}

/// A new, empty memfd.
fn new_memfd() -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new fd or -1.
    let raw = unsafe { libc::memfd_create(c"luvmm-test-copy".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` was just created and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// A new memfd holding a copy of `from`.
fn copy_memfd(from: &OwnedFd) -> OwnedFd {
    let copy = new_memfd();
    let mut src = std::fs::File::from(from.try_clone().unwrap());
    let mut dst = std::fs::File::from(copy.try_clone().unwrap());
    std::io::copy(&mut src, &mut dst).expect("copy the RAM memfd");
    copy
}

#[test]
fn a_word_changed_far_from_the_start_is_reported_lost() {
    let dir = TestDir::new("restore-lost-word");
    let (_, export, fds, serial) = boot_save_and_kill(&dir, &[]);

    // One word of the page at 48 MiB, of 64, changes while the VM is "in flight".
    let damaged = copy_memfd(&fds[1]);
    let bad_gpa: u64 = 48 << 20;
    let file = std::fs::File::from(damaged.try_clone().unwrap());
    let mut word = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut word, bad_gpa).unwrap();
    word[3] ^= 0x10;
    std::os::unix::fs::FileExt::write_all_at(&file, &word, bad_gpa).unwrap();

    let seen = checks(&serial).len();
    let second = restore_onto(&dir, "second", &serial, &export, &damaged);
    let after = second.next_check(seen);
    assert!(!after.ok, "a changed word went unnoticed: {}", after.line);
    assert_eq!(after.first_bad_gpa, Some(bad_gpa), "{}", after.line);
}

#[test]
fn swapped_regions_are_reported_lost() {
    let dir = TestDir::new("restore-lost-swap");
    let config = dir.join("vm.json");
    // Two equal regions besides the one that holds the payload: one below 4 GiB, one above.
    std::fs::write(
        &config,
        format!(
            r#"{{"vcpus": 1,
                "memory": [{{"gpa": 0, "size": 67108864}}, {{"gpa": 1073741824, "size": 16777216}},
                           {{"gpa": 4294967296, "size": 16777216}}],
                "payload": "{}"}}"#,
            luvmm_tests::payload().display()
        ),
    )
    .unwrap();
    let (before, export, fds, serial) =
        boot_save_and_kill(&dir, &["--config", config.to_str().unwrap()]);
    assert_eq!(before.pages, 15872 + 4096 + 4096);
    assert_eq!(fds.len(), 5, "state memfd + three RAM memfds + the ticket");

    let seen = checks(&serial).len();
    let [r0, r1, r2] = [1, 2, 3].map(|i| fds[i].as_raw_fd().to_string());
    let second = Vm::restore(
        &dir,
        "second",
        &serial,
        &[
            "--state",
            export.to_str().unwrap(),
            "--memory-fd",
            &r0,
            "--memory-fd",
            &r2,
            "--memory-fd",
            &r1,
        ],
        |cmd| inherit(cmd, &[&fds[1], &fds[2], &fds[3]]),
    );
    let after = second.next_check(seen);
    assert!(!after.ok, "swapped regions went unnoticed: {}", after.line);
    assert_eq!(after.first_bad_gpa, Some(1 << 30), "{}", after.line);
}

/// The golden states in `tests/golden/`, written by earlier luvmm versions (see capture.sh).
fn golden_formats() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("tests/golden")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("state.bin").exists())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn golden_states_of_earlier_formats_still_restore() {
    let formats = golden_formats();
    assert!(!formats.is_empty(), "no golden state in tests/golden");
    for golden in formats {
        let dir = TestDir::new("restore-golden");
        let gunzip = Command::new("gzip")
            .arg("-dc")
            .arg(golden.join("ram0.gz"))
            .output()
            .expect("gzip (installed by tests/setup.sh)");
        assert!(gunzip.status.success(), "gzip -dc {}", golden.display());
        let ram = copy_memfd_from(&gunzip.stdout);
        let before = luvmm_tests::parse_check(
            std::fs::read_to_string(golden.join("check"))
                .unwrap()
                .trim_end(),
        );
        let serial = dir.join("serial.log");
        let state = golden.join("state.bin");
        let vm = restore_onto(&dir, "golden", &serial, &state, &ram);
        let after = vm.next_check(0);
        println!("{}: {}", golden.display(), after.line);
        assert_continued(&before, &after);
    }
}

/// A new memfd holding `bytes`.
fn copy_memfd_from(bytes: &[u8]) -> OwnedFd {
    use std::io::Write;
    let fd = new_memfd();
    std::fs::File::from(fd.try_clone().unwrap())
        .write_all(bytes)
        .unwrap();
    fd
}

#[test]
fn a_state_with_passthrough_devices_needs_their_fds() {
    use luvmm_resources::config::BarMode;
    use luvmm_resources::state::{IommuState, PassthroughState, VfioBackend};
    let dir = TestDir::new("restore-devices");
    let (_, export, fds, _) = boot_save_and_kill(&dir, &[]);
    let ram_fd = fds[1].as_raw_fd().to_string();
    let device = |backend| PassthroughState {
        bdf: "0000:00:02.0".into(),
        guest_slot: 1,
        backend,
        mappings: Vec::new(),
        config: vec![0; 256],
        msi: None,
        msix: None,
        intx: None,
        hwpt_id: Some(2),
        bar_access: BarMode::Direct,
    };
    rewrite_state(&export, |s| {
        s.devices.passthrough = vec![device(VfioBackend::IommufdCdev)];
        s.devices.iommu = Some(IommuState {
            ioas_id: 1,
            hwpts: vec![2],
            mappings: Vec::new(),
        });
    });
    // The devices would have to be opened again: refused before any KVM object exists.
    let stderr = failed_restore(
        &["--state", export.to_str().unwrap(), "--memory-fd", &ram_fd],
        &[&fds[1]],
    );
    assert!(
        stderr.contains(
            "the state holds passthrough devices [\"0000:00:02.0\"]; they can only come with \
             their fds, through a handover (--from-socket)"
        ),
        "{stderr}"
    );
}

#[test]
fn a_tsc_rate_no_vcpu_here_can_run_at_is_found_before_a_restore_takes_anything() {
    use luvmm_vmm::vstate::x86_64::host_kvm::HostKvm;
    use luvmm_vmm::vstate::x86_64::tsc::TscError;
    let dir = TestDir::new("restore-tsc-check");
    let (_, export, _, _) = boot_save_and_kill(&dir, &[]);
    let host_khz = saved_tsc_khz(&export);
    let kvm = luvmm_vmm::vstate::vm::open_kvm().unwrap();
    let host = HostKvm::probe(&kvm).unwrap();
    assert!(host.check_tsc_rate(host_khz).is_ok());
    // A kernel's recalibration after a kexec: within 1 %.
    assert!(host.check_tsc_rate(host_khz + host_khz / 200).is_ok());
    // Another machine's clock. This host's KVM cannot scale TSCs (no KVM_CAP_TSC_CONTROL),
    // so no vCPU here runs at half the rate: refused, naming both rates.
    match host.check_tsc_rate(host_khz / 2) {
        Err(TscError::OutOfReach { saved, host, ppm }) => {
            assert_eq!((saved, host), (host_khz / 2, host_khz));
            assert!(ppm >= 1_000_000, "{ppm}");
        }
        other => panic!("{other:?}"),
    }
}

/// After a kexec a VM's restore may start beside the agent (an init system starts both): it
/// asks KVM what it needs, waits for the agent to listen, and, when none comes, says how long
/// it waited and what to start, having claimed nothing.
#[test]
fn a_restore_started_before_its_agent_waits_for_it() {
    let dir = TestDir::new("restore-agent-wait");
    let socket = dir.path().join("agent.sock");
    let api = dir.path().join("vm1.sock");
    let started = std::time::Instant::now();
    let out = Command::new(luvmm_bin())
        .args([
            "restore",
            "--session",
            "vm1",
            "--agent-wait",
            "1",
            "--serial",
            "none",
        ])
        .arg("--agent-socket")
        .arg(&socket)
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null())
        .output()
        .expect("run luvmm restore");
    let waited = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        waited >= std::time::Duration::from_secs(1),
        "{waited:?}: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "waiting up to 1 s for the agent on {}",
            socket.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "asked the agent for 1 s: no luvmm agent is listening on {}",
            socket.display()
        )),
        "{stderr}"
    );
    assert!(!api.exists(), "the failed restore left its API socket");
}
