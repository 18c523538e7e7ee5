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
