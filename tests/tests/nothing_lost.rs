//! Issue 21, "never damage the host, never hang": what the `luvmm` binary does with paths and
//! sizes a user gets wrong.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use luvmm_tests::{luvmm_bin, payload, require_kvm, TestDir, Vm};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

/// Runs `luvmm args` in `cwd`, killing it if it has not exited within 20 s: a hang is a
/// failure here, not a stuck test.
fn run_in(cwd: &Path, args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(luvmm_bin())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn luvmm");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for luvmm") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("luvmm {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, Mode::S_IRUSR | Mode::S_IWUSR).expect("mkfifo");
}

fn is_fifo(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

fn is_char_device(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_char_device())
}

#[test]
fn nothing_lost_export_never_replaces_a_fifo_or_a_device() {
    let dir = TestDir::new("nl-export");
    let vm = Vm::boot(&dir, "vm", &[]);
    let socket = vm.socket.to_str().unwrap();
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    // A null device of our own (1:3), so that a broken export damages only this test's copy.
    let device = dir.join("null");
    mknod(
        &device,
        SFlag::S_IFCHR,
        Mode::S_IRUSR | Mode::S_IWUSR,
        makedev(1, 3),
    )
    .expect("mknod (the tests run as root)");
    for (target, kind) in [(&fifo, "FIFO"), (&device, "character device")] {
        let (status, stderr) = run_in(
            dir.path(),
            &[
                "ctl",
                "--socket",
                socket,
                "save",
                "--export",
                target.to_str().unwrap(),
            ],
        );
        assert!(!status.success(), "{}: {stderr}", target.display());
        assert!(stderr.contains(kind), "{stderr}");
        assert!(stderr.contains("400"), "{stderr}");
        let mut tmp = target.as_os_str().to_owned();
        tmp.push(".tmp");
        assert!(!Path::new(&tmp).exists(), "{tmp:?} left behind");
    }
    assert!(is_fifo(&fifo));
    assert!(is_char_device(&device));
    // The refusal comes before the pause: the guest still runs.
    assert!(vm.check().ok);
}

#[test]
fn nothing_lost_a_relative_export_lands_in_the_callers_directory() {
    let dir = TestDir::new("nl-relative");
    let vm = Vm::boot(&dir, "vm", &[]);
    let caller = dir.join("caller");
    std::fs::create_dir(&caller).unwrap();
    let name = format!("nothing-lost-{}.state", std::process::id());
    let (status, stderr) = run_in(
        &caller,
        &[
            "ctl",
            "--socket",
            vm.socket.to_str().unwrap(),
            "save",
            "--export",
            &name,
        ],
    );
    // The VMM runs in this test's directory; a file there would be the bug. Clean it up first.
    let misplaced = std::env::current_dir().unwrap().join(&name);
    let landed_in_vmm_dir = std::fs::remove_file(&misplaced).is_ok();
    assert!(status.success(), "{stderr}");
    assert!(
        !landed_in_vmm_dir,
        "the export landed in the VMM's directory"
    );
    assert_eq!(
        &std::fs::read(caller.join(&name)).unwrap()[..8],
        b"LUVMMSTA"
    );
    // A raw API client that sends a relative path is refused, not served from the VMM's cwd.
    let (status, body) = vm.api(
        "PUT",
        "/vm/save",
        &format!(r#"{{"export_path": "{name}"}}"#),
    );
    let written = std::fs::remove_file(&misplaced).is_ok();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("relative"), "{body}");
    assert!(!written);
}

#[test]
fn nothing_lost_a_fifo_config_or_state_does_not_hang() {
    let dir = TestDir::new("nl-fifo");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    let (status, stderr) = run_in(dir.path(), &["run", "--config", fifo]);
    assert!(!status.success());
    assert!(stderr.contains("FIFO, not a regular file"), "{stderr}");
    let (status, stderr) = run_in(
        dir.path(),
        &[
            "restore",
            "--state",
            fifo,
            "--memory-fd",
            "0",
            "--serial",
            "none",
        ],
    );
    assert!(!status.success());
    assert!(stderr.contains("FIFO, not a regular file"), "{stderr}");
}

#[test]
fn nothing_lost_memory_sizes_beyond_the_host_are_refused_with_a_reason() {
    require_kvm();
    let dir = TestDir::new("nl-memory");
    let payload = payload();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--payload", payload.to_str().unwrap()];
        args.extend_from_slice(&["--serial", "none"]);
        args.extend_from_slice(extra);
        run_in(dir.path(), &args)
    };
    // 1 TiB: more than this host has, refused before anything is mapped.
    let (status, stderr) = run(&["--memory-mib", "1048576"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1048576 MiB in all is more than this host's"),
        "{stderr}"
    );
    let (status, stderr) = run(&["--memory-mib", "99999999999999"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("too large"), "{stderr}");
    assert!(!stderr.contains("multiple of"), "{stderr}");
    // A small region at 2^50: within the host's RAM, beyond any x86 CPU's 46 to 48 bits here.
    let config = dir.join("high.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"vcpus": 1, "memory": [{{"gpa": 0, "size": 67108864}},
                {{"gpa": {}, "size": 67108864}}], "payload": {:?}}}"#,
            1u64 << 50,
            payload
        ),
    )
    .unwrap();
    let (status, stderr) = run_in(dir.path(), &["run", "--config", config.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("physical address space"), "{stderr}");
}
