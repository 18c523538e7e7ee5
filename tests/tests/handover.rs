//! Issue 21, "a process handover cannot strand a guest": a target that fails gives the VM back,
//! a target whose source is gone takes it over, a shutdown cannot drop a VM being handed over,
//! and only the holder of the handover's token confirms it; a target built ahead while the guest
//! runs costs the guest nothing if it or its source fails first, and takes only the VM it built
//! for. The guest's own check is the proof.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use luvmm_tests::{checks, inherit, luvmm_bin, run_luvmm, wait_until, Check, TestDir, Vm};
use luvmm_vmm::api::client::{ClientError, VmmClient};
use luvmm_vmm::vmm::{HandoverTicket, TicketState, VmPhase};
use nix::sys::signal::Signal;

/// A VM booted with `extra`, checked, and saved: ready to be handed over.
fn boot_and_save(dir: &TestDir, extra: &[&str]) -> (Vm, Check) {
    let vm = Vm::boot(dir, "first", extra);
    let before = vm.check();
    assert!(before.ok, "{}", before.line);
    vm.client().save(None).expect("PUT /vm/save");
    (vm, before)
}

/// The guest went on from `before`: same boot, same memory, every vCPU ran on.
fn assert_continued(before: &Check, after: &Check) {
    assert!(after.ok, "{}", after.line);
    assert_eq!(after.seed, before.seed, "the guest rebooted: {after:?}");
    assert_eq!(after.pages, before.pages);
    assert_eq!(after.heartbeats.len(), before.heartbeats.len(), "{after:?}");
    for (id, (b, a)) in before.heartbeats.iter().zip(&after.heartbeats).enumerate() {
        assert!(a > b, "vCPU {id} did not run on: {before:?} -> {after:?}");
    }
}

/// Takes `source`'s VM over in a new process named `name`, and waits until its API answers.
fn take_over(dir: &TestDir, name: &str, source: &Vm) -> Vm {
    let from = source.socket.to_str().unwrap().to_string();
    Vm::restore(dir, name, &source.serial, &["--from-socket", &from], |_| {})
}

/// The HTTP status with which the VM refused a request.
fn refusal<T: std::fmt::Debug>(reply: Result<T, ClientError>) -> Option<u16> {
    reply.expect_err("the VM should refuse").status()
}

/// Runs `luvmm restore --from-socket` from `source` with its API at `api_socket`, which must
/// fail; returns its stderr.
fn failed_takeover(source: &Vm, api_socket: &Path, hook: impl FnOnce(&mut Command)) -> String {
    let mut cmd = Command::new(luvmm_bin());
    cmd.arg("restore")
        .arg("--from-socket")
        .arg(&source.socket)
        .arg("--serial")
        .arg(&source.serial)
        .arg("--api-socket")
        .arg(api_socket)
        .stdin(Stdio::null());
    hook(&mut cmd);
    let out = cmd.output().expect("run luvmm restore");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the takeover succeeded: {stderr}");
    stderr
}

/// Limits the child's address space to `bytes`: less than the guest's RAM, it cannot map it.
fn limit_address_space(cmd: &mut Command, bytes: u64) {
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit, which
    // is async-signal-safe, on a struct on its own stack.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A target builds its KVM VM and memslots on the source's memfds while the source runs the
/// guest; its blackout holds no memslot work.
#[test]
fn a_handover_builds_the_target_while_the_source_runs_the_guest() {
    let dir = TestDir::new("handover-ahead");
    let first = Vm::boot(&dir, "first", &["--memory-mib", "128", "--vcpus", "2"]);
    let before = first.check();
    let seen = checks(&first.serial).len();
    let second = take_over(&dir, "second", &first);
    assert_continued(&before, &second.next_check(seen));
    assert_eq!(first.phase(), VmPhase::HandedOver);
    let status = second.client().status().expect("GET /vm");
    let timings = status.restore_timings.expect("restore timings");
    assert!(
        timings.built_ahead_ms.is_some_and(|ms| ms > 0.0),
        "{timings:?}"
    );
    assert_eq!(
        (timings.vm_ms, timings.memory_ms),
        (0.0, 0.0),
        "{timings:?}"
    );
    assert!(timings.blackout_ms.is_some(), "{timings:?}");
}

/// A target that cannot build the VM ahead (256 MiB of RAM in 128 MiB of address space) fails
/// before it asks for the VM, which runs on in its source all along.
#[test]
fn nothing_lost_a_target_that_cannot_build_ahead_leaves_the_guest_running() {
    let dir = TestDir::new("nl-handover-give-back");
    let first = Vm::boot(&dir, "first", &["--memory-mib", "256", "--vcpus", "2"]);
    let before = first.check();
    let stderr = failed_takeover(&first, &dir.join("second.sock"), |cmd| {
        limit_address_space(cmd, 128 << 20)
    });
    let runs_on = format!("the VM runs on in {}", first.socket.display());
    assert!(stderr.contains(&runs_on), "{stderr}");
    assert!(stderr.contains("cannot map guest memory"), "{stderr}");
    assert_eq!(first.phase(), VmPhase::Running);
    assert_continued(&before, &first.check());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("second"))
        .collect();
    assert!(left.is_empty(), "the failed target left {left:?}");
}

#[test]
fn nothing_lost_a_target_whose_api_socket_path_is_unusable_leaves_the_vm_to_its_source() {
    let dir = TestDir::new("nl-handover-socket");
    let (first, before) = boot_and_save(&dir, &["--vcpus", "2"]);
    let socket = first.socket.display();
    let still_paused = format!(
        "the VM is still paused in {socket}: `luvmm ctl --socket {socket} resume` runs it again"
    );
    let missing = dir.join("no/such/dir/api.sock");
    let too_long = dir.join(&"x".repeat(100));
    for (path, why) in [
        (&missing, "its directory does not exist"),
        (&too_long, "with luvmm's temporary suffix"),
    ] {
        let stderr = failed_takeover(&first, path, |_| {});
        assert!(stderr.contains(&still_paused), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
        assert_eq!(first.phase(), VmPhase::Paused, "nothing was taken");
    }
    let (status, stderr) = run_luvmm(&["ctl", "--socket", &socket.to_string(), "resume"]);
    assert!(status.success(), "ctl resume: {stderr}");
    assert_continued(&before, &first.check());
}

#[test]
fn nothing_lost_a_target_takes_over_its_sources_api_socket_path() {
    let dir = TestDir::new("nl-handover-same-path");
    let (first, before) = boot_and_save(&dir, &["--vcpus", "2"]);
    let seen = checks(&first.serial).len();
    let source = first.socket.to_str().unwrap().to_string();
    // A VMM upgrade: the target serves on the path its source serves on.
    let second = Vm::start_restore(
        &dir,
        "first",
        &first.serial,
        &["--from-socket", &source],
        |_| {},
    );
    assert_eq!(second.socket, first.socket);
    wait_until("the target serving on its source's path", || {
        let status = VmmClient::new(&second.socket).status().ok()?;
        status.restore_timings.is_some().then_some(())
    });
    assert_continued(&before, &second.next_check(seen));
    // The source, handed over, ends; the path it leaves is the target's, and stays.
    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit().success());
    assert_eq!(second.phase(), VmPhase::Running);
    assert!(second.check().ok);
}

/// The source dies between its handover and the target's confirmation (the target stops
/// itself there, `stop-before-confirm`): the target finds the ticket open and the source gone,
/// and takes the VM over.
#[test]
fn nothing_lost_a_target_whose_source_is_killed_before_it_confirms_takes_the_vm_over() {
    let dir = TestDir::new("nl-handover-source-killed");
    let (first, before) = boot_and_save(&dir, &["--vcpus", "2"]);
    let seen = checks(&first.serial).len();
    let mut second = target_stopped_at(&dir, &first, "stop-before-confirm");
    assert_eq!(first.phase(), VmPhase::HandingOver);
    first.kill();
    second.signal(Signal::SIGCONT);
    let stderr = dir.join("second.err");
    wait_until("the target's API socket", || {
        if let Some(status) = second.try_exit() {
            let text = std::fs::read_to_string(&stderr).unwrap_or_default();
            panic!("the target exited with {status}: {text}");
        }
        second.socket.exists().then_some(())
    });
    let text = std::fs::read_to_string(&stderr).unwrap();
    assert!(text.contains("went away before it confirmed"), "{text}");
    assert_continued(&before, &second.next_check(seen));
    assert_eq!(second.phase(), VmPhase::Running);
}

/// The target dies between its handover and its confirmation (`stop-before-confirm`, then
/// killed): its source sees it go and resumes the VM.
#[test]
fn nothing_lost_a_target_killed_before_it_confirms_leaves_the_vm_to_its_source() {
    let dir = TestDir::new("nl-handover-target-killed");
    let (first, before) = boot_and_save(&dir, &["--vcpus", "2"]);
    let second = target_stopped_at(&dir, &first, "stop-before-confirm");
    assert_eq!(first.phase(), VmPhase::HandingOver);
    second.kill();
    let phase = wait_until("the source to learn its target is gone", || {
        let phase = first.phase();
        (phase != VmPhase::HandingOver).then_some(phase)
    });
    assert_eq!(
        phase,
        VmPhase::Running,
        "the source resumed the VM by itself"
    );
    assert_continued(&before, &first.check());
}

#[test]
fn nothing_lost_shutdown_is_refused_while_handing_over_and_forced_leaves_the_vm_to_the_target() {
    let dir = TestDir::new("nl-handover-shutdown");
    let (first, before) = boot_and_save(&dir, &["--memory-mib", "32"]);
    let seen = checks(&first.serial).len();
    // This test is the target: it holds the state, the RAM and the ticket.
    let mut handed = first.client().handover().expect("PUT /vm/handover");
    let socket = first.socket.to_str().unwrap().to_string();
    let (status, stderr) = run_luvmm(&["ctl", "--socket", &socket, "shutdown"]);
    assert!(!status.success());
    assert!(stderr.contains("409"), "{stderr}");
    assert!(
        stderr.contains("cannot shut down while the VM is handing over"),
        "{stderr}"
    );
    assert_eq!(first.phase(), VmPhase::HandingOver);

    let (status, stderr) = run_luvmm(&["ctl", "--socket", &socket, "shutdown", "--force"]);
    assert!(status.success(), "{stderr}");
    assert!(first.wait_exit().success());
    // The source left the VM to its target: the ticket is open, and the fds run the guest.
    let ticket = HandoverTicket::from_fd(handed.fds.pop().expect("the ticket"));
    assert_eq!(ticket.read().expect("read the ticket"), TicketState::Open);
    let [state, ram] = [&handed.fds[0], &handed.fds[1]];
    let state_fd = state.as_raw_fd().to_string();
    let ram_fd = ram.as_raw_fd().to_string();
    let second = Vm::restore(
        &dir,
        "second",
        &dir.join("first.log"),
        &["--state-fd", &state_fd, "--memory-fd", &ram_fd],
        |cmd| inherit(cmd, &[state, ram]),
    );
    assert_continued(&before, &second.next_check(seen));
}

#[test]
fn nothing_lost_a_confirmation_without_the_handovers_token_changes_nothing() {
    let dir = TestDir::new("nl-handover-token");
    let (first, before) = boot_and_save(&dir, &["--vcpus", "2"]);
    let seen = checks(&first.serial).len();
    // A client takes a handover and drops its fds, then tries to end the handover.
    let intruder = first.client().handover().expect("PUT /vm/handover");
    let token = intruder.manifest.token.clone();
    drop(intruder);
    assert_eq!(refusal(first.client().complete_handover("00")), Some(403));
    assert_eq!(first.api("PUT", "/vm/handover/complete", "").0, 400);
    assert_eq!(first.phase(), VmPhase::HandingOver, "nothing changed");
    // The real target's own handover and confirmation go through.
    let second = take_over(&dir, "second", &first);
    assert_eq!(first.phase(), VmPhase::HandedOver);
    assert_eq!(refusal(first.client().complete_handover(&token)), Some(409));
    assert_continued(&before, &second.next_check(seen));
}

/// Starts a target with the test fault `fault` (one that stops it), its standard error in
/// `second.err`, and waits until it stopped.
fn target_stopped_at(dir: &TestDir, first: &Vm, fault: &str) -> Vm {
    let log = std::fs::File::create(dir.join("second.err")).unwrap();
    let source = first.socket.to_str().unwrap().to_string();
    let second = Vm::start_restore(
        dir,
        "second",
        &first.serial,
        &["--from-socket", &source],
        |cmd| {
            cmd.env("LUVMM_TEST_FAULTS", fault).stderr(log);
        },
    );
    let stat = format!("/proc/{}/stat", second.pid());
    wait_until("the target to stop itself", || {
        let text = std::fs::read_to_string(&stat).unwrap_or_default();
        // The state follows the parenthesised command name.
        let state = text
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next());
        (state == Some("T")).then_some(())
    });
    second
}

/// Continues a stopped target and waits for it to fail; returns its standard error.
fn target_fails(dir: &TestDir, mut second: Vm) -> String {
    second.signal(Signal::SIGCONT);
    let status = wait_until("the target to exit", || second.try_exit());
    let stderr = std::fs::read_to_string(dir.join("second.err")).unwrap();
    assert!(!status.success(), "the target succeeded: {stderr}");
    assert!(
        !second.socket.exists(),
        "the failed target serves {}",
        second.socket.display()
    );
    stderr
}

/// A target killed while it builds ahead costs the guest nothing: the source never paused it,
/// and a later target takes it over.
#[test]
fn nothing_lost_a_target_killed_while_it_builds_ahead_costs_the_guest_nothing() {
    let dir = TestDir::new("nl-handover-ahead-killed");
    let first = Vm::boot(&dir, "first", &["--vcpus", "2"]);
    let before = first.check();
    let second = target_stopped_at(&dir, &first, "stop-after-stage");
    assert_eq!(first.phase(), VmPhase::Running);
    second.kill();
    assert_continued(&before, &first.check());
    let seen = checks(&first.serial).len();
    let third = take_over(&dir, "third", &first);
    assert_continued(&before, &third.next_check(seen));
}

/// A source that dies after the target built ahead, before it paused the guest, leaves the
/// target nothing to run: it says the source did not answer and serves no VM.
#[test]
fn nothing_lost_a_source_gone_before_the_pause_leaves_the_target_nothing_to_run() {
    let dir = TestDir::new("nl-handover-ahead-source-gone");
    let first = Vm::boot(&dir, "first", &["--vcpus", "2"]);
    let second = target_stopped_at(&dir, &first, "stop-after-stage");
    let socket = first.socket.clone();
    first.kill();
    let stderr = target_fails(&dir, second);
    let unanswered = format!("{} did not answer about the VM", socket.display());
    assert!(stderr.contains(&unanswered), "{stderr}");
}

/// Another VM behind the source's socket by the time the target asks (the source was replaced
/// after the target built ahead on its memfds): the target refuses it, and gives it back to
/// the VMM that paused it for the handover, which resumes it.
#[test]
fn nothing_lost_a_handover_of_another_vm_than_the_one_built_ahead_is_refused() {
    let dir = TestDir::new("nl-handover-ahead-other-vm");
    let first = Vm::boot(&dir, "first", &["--vcpus", "2"]);
    let second = target_stopped_at(&dir, &first, "stop-after-stage");
    let path = first.socket.clone();
    first.kill();
    std::fs::remove_file(&path).unwrap();
    // The same size, behind the same socket path: only the memfds tell the two VMs apart.
    let other = Vm::boot(&dir, "other", &["--vcpus", "2"]);
    std::os::unix::fs::symlink(&other.socket, &path).unwrap();
    let before = other.check();
    let stderr = target_fails(&dir, second);
    assert!(
        stderr.contains("not the one this process built ahead for")
            && stderr.contains("is another memfd than the one handed ahead"),
        "{stderr}"
    );
    let gone_back = format!("the VM went back to {}, which resumed it", path.display());
    assert!(stderr.contains(&gone_back), "{stderr}");
    assert_eq!(other.phase(), VmPhase::Running);
    assert_continued(&before, &other.check());
}
