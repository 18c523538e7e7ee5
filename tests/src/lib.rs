//! Helpers for luvmm's integration tests: find the binary and the payload, run VMs as child
//! processes, read their serial log, talk to their API, and wait on conditions with timeouts
//! instead of sleeping.

pub mod l1;
pub mod nested;
pub mod schema;
pub mod vfio_raw;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use luvmm_vmm::api::client::VmmClient;
use luvmm_vmm::vmm::VmPhase;

/// Generous: guest instructions are slow on emulated KVM, and CI machines are small.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The guest payload built from `tests/guest/` by this crate's build script.
pub fn payload() -> PathBuf {
    PathBuf::from(env!("LUVMM_PAYLOAD"))
}

/// Fails loudly when the machine cannot run VMs: these tests must not pass by skipping.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs a usable /dev/kvm and cannot run here: {e}");
    }
}

/// The `luvmm` binary of this workspace, built once per test binary so it is never stale.
pub fn luvmm_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let test_exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = test_exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "luvmm", "--bin", "luvmm"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("cannot run cargo to build luvmm");
        assert!(status.success(), "building the luvmm binary failed");
        let bin = profile_dir.join("luvmm");
        assert!(bin.is_file(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// Polls `probe` until it yields a value or `TIMEOUT` passes; panics naming `what`.
pub fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Watches `happened` for `window` and panics with `what` as soon as it holds. For what must
/// not happen, which no wait on a condition can confirm: a failure shows at once, a pass takes
/// the whole window.
pub fn assert_never(what: &str, window: Duration, mut happened: impl FnMut() -> bool) {
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        assert!(!happened(), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!happened(), "{what}");
}

/// A scratch directory removed when dropped.
pub struct TestDir(PathBuf);

impl TestDir {
    /// A new empty directory named after the test.
    pub fn new(name: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!("luvmm-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        TestDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// A failed test's directory is kept (its L1 console, its guests' logs) and named.
impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for the failure: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One `LUVMM-CHECK` line of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub ok: bool,
    pub pages: u64,
    pub heartbeat: u64,
    pub seed: String,
    pub checks: u64,
    /// Each vCPU's heartbeat, by vCPU id.
    pub heartbeats: Vec<u64>,
    /// `first_bad_gpa` of a `LOST` line.
    pub first_bad_gpa: Option<u64>,
    pub line: String,
}

/// Parses the `key=value` fields of a guest line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// Parses one `LUVMM-CHECK` line.
pub fn parse_check(line: &str) -> Check {
    let num = |key| field(line, key).and_then(|v| v.parse().ok()).unwrap_or(0);
    Check {
        ok: line.starts_with("LUVMM-CHECK ok"),
        pages: num("pages"),
        heartbeat: num("heartbeat"),
        seed: field(line, "seed").unwrap_or_default().to_string(),
        checks: num("checks"),
        heartbeats: field(line, "heartbeats")
            .map(|v| v.split(',').filter_map(|h| h.parse().ok()).collect())
            .unwrap_or_default(),
        first_bad_gpa: field(line, "first_bad_gpa")
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()),
        line: line.to_string(),
    }
}

/// Complete lines (newline-terminated: the guest may be mid-line) of a serial log that start
/// with `prefix`.
pub fn lines_with(serial: &Path, prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Every check line in the log, in order.
pub fn checks(serial: &Path) -> Vec<Check> {
    lines_with(serial, "LUVMM-CHECK")
        .iter()
        .map(|l| parse_check(l))
        .collect()
}

/// The judge binary of the Linux guest (`tests/guest/linux/judge.c`), built for the host by
/// this crate's build script with the flags the initramfs uses.
pub fn judge() -> PathBuf {
    PathBuf::from(env!("LUVMM_JUDGE"))
}

pub use luvmm::drill::judge::{
    parse_linux_check, LinuxBadPage, LinuxCheck, LinuxClock, LinuxIo, LinuxMemory, LinuxMismatch,
    LINUX_CHECK,
};

/// A raw API exchange: status and body. For requests the typed client
/// ([`luvmm_vmm::api::client::VmmClient`]) would not send: malformed ones, odd bodies.
pub fn api(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, _, body) = api_with_phrase(socket, method, path, body);
    (status, body)
}

/// [`api`], with the status line's reason phrase too.
pub fn api_with_phrase(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // A VMM that never answers fails the test instead of hanging it.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set a read timeout");
    stream.write_all(request.as_bytes()).expect("send request");
    read_whole_reply(&mut stream)
}

/// Reads a whole reply (the server closes after it) and splits status and body.
pub fn read_reply(stream: &mut UnixStream) -> (u16, String) {
    let (status, _, body) = read_whole_reply(stream);
    (status, body)
}

/// A whole reply: its status, reason phrase and body.
fn read_whole_reply(stream: &mut UnixStream) -> (u16, String, String) {
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read reply");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let mut words = head.lines().next().unwrap_or_default().splitn(3, ' ');
    let _version = words.next();
    let status = words
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {text:?}"));
    let phrase = words.next().unwrap_or_default().to_string();
    (status, phrase, body.to_string())
}

/// A luvmm process serving a VM, killed when dropped.
pub struct Vm {
    child: Child,
    pub socket: PathBuf,
    pub serial: PathBuf,
}

impl Vm {
    /// Boots the payload with `extra` flags, its serial log in `<name>.log`, and waits for its
    /// boot line.
    pub fn boot(dir: &TestDir, name: &str, extra: &[&str]) -> Vm {
        Vm::boot_with(dir, name, extra, None)
    }

    /// `boot`, with the VMM's log (its standard error) going to `stderr`.
    pub fn boot_logging(dir: &TestDir, name: &str, extra: &[&str], stderr: File) -> Vm {
        Vm::boot_with(dir, name, extra, Some(stderr))
    }

    fn boot_with(dir: &TestDir, name: &str, extra: &[&str], stderr: Option<File>) -> Vm {
        require_kvm();
        let socket = dir.join(&format!("{name}.sock"));
        let serial = dir.join(&format!("{name}.log"));
        let mut cmd = Command::new(luvmm_bin());
        cmd.arg("run")
            .arg("--payload")
            .arg(payload())
            .arg("--serial")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&socket)
            .args(extra);
        if let Some(stderr) = stderr {
            cmd.stderr(stderr);
        }
        let vm = Vm::spawn(cmd, socket, serial);
        wait_until("the guest's LUVMM-BOOT line", || {
            (!lines_with(&vm.serial, "LUVMM-BOOT").is_empty()).then_some(())
        });
        vm
    }

    /// Starts `luvmm restore` with `args`, appending to the same serial log as `serial`, and
    /// waits until its API answers.
    pub fn restore(
        dir: &TestDir,
        name: &str,
        serial: &Path,
        args: &[&str],
        cmd_hook: impl FnOnce(&mut Command),
    ) -> Vm {
        let mut vm = Vm::start_restore(dir, name, serial, args, cmd_hook);
        wait_until("the restored VMM's API socket", || {
            if let Ok(Some(status)) = vm.child.try_wait() {
                panic!("luvmm restore exited early with {status}");
            }
            vm.socket.exists().then_some(())
        });
        vm
    }

    /// Starts `luvmm restore` as [`Vm::restore`] does, without waiting for anything.
    pub fn start_restore(
        dir: &TestDir,
        name: &str,
        serial: &Path,
        args: &[&str],
        cmd_hook: impl FnOnce(&mut Command),
    ) -> Vm {
        require_kvm();
        let socket = dir.join(&format!("{name}.sock"));
        let mut cmd = Command::new(luvmm_bin());
        cmd.arg("restore")
            .args(args)
            .arg("--serial")
            .arg(serial)
            .arg("--api-socket")
            .arg(&socket);
        cmd_hook(&mut cmd);
        Vm::spawn(cmd, socket, serial.to_path_buf())
    }

    /// `luvmm start --vm NAME` as its systemd unit runs it, with a config that boots the
    /// payload, its serial log in `<name>.log` and its API on `<name>.sock`; waits for the
    /// guest's boot line.
    pub fn start_unit(dir: &TestDir, name: &str) -> Vm {
        require_kvm();
        let socket = dir.join(&format!("{name}.sock"));
        let serial = dir.join(&format!("{name}.log"));
        let config = dir.join(&format!("{name}.json"));
        let text = serde_json::json!({
            "vcpus": 1,
            "memory": [{"gpa": 0, "size": 64 << 20}],
            "payload": payload(),
            "serial": {"file": serial},
            "api_socket": socket,
        });
        std::fs::write(&config, text.to_string()).expect("write the VM's config");
        let mut cmd = Command::new(luvmm_bin());
        cmd.args(["start", "--vm", name, "--config"]).arg(&config);
        let vm = Vm::spawn(cmd, socket, serial);
        wait_until("the guest's LUVMM-BOOT line", || {
            (!lines_with(&vm.serial, "LUVMM-BOOT").is_empty()).then_some(())
        });
        vm
    }

    fn spawn(mut cmd: Command, socket: PathBuf, serial: PathBuf) -> Vm {
        let child = cmd.stdin(Stdio::null()).spawn().expect("spawn luvmm");
        Vm {
            child,
            socket,
            serial,
        }
    }

    /// The typed client of this VM's API.
    pub fn client(&self) -> VmmClient {
        VmmClient::new(&self.socket)
    }

    /// A raw API exchange with this VM, for what the typed client would not send.
    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        api(&self.socket, method, path, body)
    }

    /// The VM's phase.
    pub fn phase(&self) -> VmPhase {
        self.client().status().expect("GET /vm").phase
    }

    /// Asks the guest for a check and returns the new check line.
    pub fn check(&self) -> Check {
        let before = checks(&self.serial).len();
        self.client().check().expect("PUT /vm/check");
        self.next_check(before)
    }

    /// Waits for check line number `seen + 1`.
    pub fn next_check(&self, seen: usize) -> Check {
        wait_until("a LUVMM-CHECK line", || {
            checks(&self.serial).get(seen).cloned()
        })
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL), as a crash or an operator would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = i32::try_from(self.child.id()).expect("a pid fits an i32");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal luvmm");
    }

    /// The process's exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(mut self) -> ExitStatus {
        wait_until("luvmm to exit", || self.child.try_wait().ok().flatten())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lets the child inherit `fds` (they arrive close-on-exec).
pub fn inherit(cmd: &mut Command, fds: &[&OwnedFd]) {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe, on fds this process owns.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &raw {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Runs `luvmm` with `args` to completion and returns its exit status and stderr.
pub fn run_luvmm(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(luvmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run luvmm");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
