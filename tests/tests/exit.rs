//! How a VMM ends, and what it leaves behind for the next one on the same API socket path.

use std::os::unix::net::UnixListener;

use luvmm_tests::{run_luvmm, TestDir, Vm};
use nix::sys::signal::Signal;

#[test]
fn nothing_lost_sigterm_and_sigint_end_the_vmm_cleanly_and_remove_its_socket() {
    let dir = TestDir::new("exit-signals");
    for (name, signal) in [("term", Signal::SIGTERM), ("int", Signal::SIGINT)] {
        let vm = Vm::boot(&dir, name, &[]);
        let socket = vm.socket.clone();
        assert!(socket.exists());
        vm.signal(signal);
        let status = vm.wait_exit();
        assert!(status.success(), "{signal:?}: {status:?}");
        assert!(!socket.exists(), "{signal:?} left {}", socket.display());
    }
}

#[test]
fn nothing_lost_a_stale_socket_is_reused_and_a_live_one_refused() {
    let dir = TestDir::new("exit-stale");
    // A VMM killed outright leaves its socket behind, with nobody accepting on it.
    let first = Vm::boot(&dir, "vm", &[]);
    let socket = first.socket.clone();
    first.kill();
    assert!(socket.exists(), "SIGKILL leaves the socket");
    // The next VMM's boot line must be its own.
    std::fs::remove_file(dir.join("vm.log")).expect("the first serial log");
    let second = Vm::boot(&dir, "vm", &[]);
    assert!(
        second.check().ok,
        "a VMM on the stale socket's path serves its guest"
    );
    drop(second);

    let live = dir.join("live.sock");
    let _listener = UnixListener::bind(&live).expect("a live socket");
    let (status, stderr) = run_luvmm(&[
        "run",
        "--payload",
        luvmm_tests::payload().to_str().unwrap(),
        "--serial",
        "none",
        "--api-socket",
        live.to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("a process is serving on it already"),
        "{stderr}"
    );
}

/// A guest that ends itself: luvmm exits 0 when it powers off (ACPI S5 in the FADT's sleep
/// control register) and 3 when it resets (the FADT's reset register, or the i8042), saying
/// which in its log, and leaves no socket behind.
#[test]
fn a_guest_that_powers_off_or_resets_ends_luvmm_with_a_status_that_says_which() {
    let dir = TestDir::new("exit-power");
    for (name, end, code, said) in [
        ("off", "1", 0, "the guest asked for Off"),
        ("acpi-reset", "2", 3, "the guest asked for Reset"),
        ("i8042-reset", "3", 3, "the guest asked for Reset"),
    ] {
        let cmdline = format!("console=ttyS0 luvmm.fill_pages=16 luvmm.end={end}");
        let log = dir.join(&format!("{name}.err"));
        let stderr = std::fs::File::create(&log).expect("a log file");
        let vm = Vm::boot_logging(&dir, name, &["--cmdline", &cmdline], stderr);
        let socket = vm.socket.clone();
        let status = vm.wait_exit();
        assert_eq!(status.code(), Some(code), "{name}: {status:?}");
        let logged = std::fs::read_to_string(&log).expect("the VMM's log");
        assert!(logged.contains(said), "{name}: {logged}");
        assert!(!socket.exists(), "{name} left {}", socket.display());
    }
}

/// `luvmm run ... | head -1`: once the reader of stdout is gone, the guest's console output
/// is given up with one log line, however much the guest prints after it, and the guest runs
/// on (its checks are still answered).
#[test]
fn a_closed_stdout_is_logged_once() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = TestDir::new("exit-closed-stdout");
    let socket = dir.join("vm.sock");
    let log = dir.join("vm.err");
    let mut child = Command::new(luvmm_tests::luvmm_bin())
        .arg("run")
        .arg("--payload")
        .arg(luvmm_tests::payload())
        .args(["--serial", "stdout", "--api-socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn luvmm run");
    let stdout = child.stdout.take().unwrap();
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    // The reader is gone (dropped with its BufReader): like `head -1`.
    let client = luvmm_vmm::api::client::VmmClient::new(&socket);
    for _ in 0..3 {
        client.check().expect("PUT /vm/check");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(
        client.status().expect("GET /vm").phase,
        luvmm_vmm::vmm::VmPhase::Running
    );
    client.shutdown(false).expect("PUT /vm/shutdown");
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let serial_lines = text.lines().filter(|l| l.contains("serial:")).count();
    assert_eq!(serial_lines, 1, "{text}");
    assert!(
        text.contains("the guest's console output cannot be written (Broken pipe"),
        "{text}"
    );
}
