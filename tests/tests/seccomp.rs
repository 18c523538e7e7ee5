//! Issue 21, "least privilege": every luvmm thread runs under its seccomp filter, a forbidden
//! system call ends the VMM with one line that names the thread and the call, and
//! `--seccomp off` runs the same VM without filters.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use luvmm_tests::{checks, lines_with, luvmm_bin, payload, require_kvm, wait_until, TestDir};
use luvmm_vmm::api::client::VmmClient;
use luvmm_vmm::faults::FAULTS_ENV;
use luvmm_vmm::seccomp::VIOLATION_EXIT_STATUS;
use serde_json::{json, Value};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `luvmm run` of the test payload, killed when dropped.
struct Run {
    child: Child,
    socket: PathBuf,
    serial: PathBuf,
}

impl Run {
    /// Starts `luvmm run` with `extra` flags; with `fault`, its vCPU threads make a forbidden
    /// system call as soon as their filter is in place.
    fn start(dir: &TestDir, extra: &[&str], fault: bool) -> Run {
        require_kvm();
        let socket = dir.join("vm.sock");
        let serial = dir.join("vm.log");
        let mut cmd = Command::new(luvmm_bin());
        cmd.arg("run")
            .arg("--payload")
            .arg(payload())
            .arg("--serial")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if fault {
            cmd.env(FAULTS_ENV, "vcpu-forbidden-syscall");
        }
        Run {
            child: cmd.spawn().expect("spawn luvmm run"),
            socket,
            serial,
        }
    }

    /// Waits for the guest's boot line, then asks it to check its memory: the guest's own word
    /// that it runs well.
    fn guest_checks_ok(&mut self) {
        wait_until("the guest's LUVMM-BOOT line", || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("luvmm exited early with {status}: {}", self.stderr());
            }
            (!lines_with(&self.serial, "LUVMM-BOOT").is_empty()).then_some(())
        });
        let client = VmmClient::new(&self.socket);
        // A save makes each vCPU thread read its whole state, and the event loop the VM's.
        client.pause().expect("pause");
        client.save(None).expect("save");
        client.resume().expect("resume");
        let seen = checks(&self.serial).len();
        client.check().expect("PUT /vm/check");
        let check = wait_until("a LUVMM-CHECK line", || {
            checks(&self.serial).get(seen).cloned()
        });
        assert!(check.ok, "the guest's check: {}", check.line);
    }

    /// `Seccomp:` (0 none, 2 filtered) of each thread of the process, by thread name.
    fn thread_modes(&self) -> Vec<(String, String)> {
        let tasks = Path::new("/proc")
            .join(self.child.id().to_string())
            .join("task");
        std::fs::read_dir(&tasks)
            .expect("the VMM's threads")
            .map(|task| {
                let dir = task.expect("a thread").path();
                let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
                let mode = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Seccomp:"))
                    .unwrap_or_default();
                (name.trim().to_string(), mode.trim().to_string())
            })
            .collect()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        wait_until("luvmm to exit", || self.child.try_wait().ok().flatten())
    }

    /// What the process wrote to stderr; call once it has exited.
    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        }
        text
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nothing_lost_seccomp_every_vmm_thread_runs_under_a_filter() {
    let dir = TestDir::new("seccomp-threads");
    let mut vm = Run::start(&dir, &["--vcpus", "2"], false);
    vm.guest_checks_ok();
    let threads = vm.thread_modes();
    for wanted in ["luvmm", "vcpu0", "vcpu1"] {
        assert!(
            threads.iter().any(|(name, _)| name == wanted),
            "no thread {wanted} in {threads:?}"
        );
    }
    for (name, mode) in &threads {
        assert_eq!(
            mode, "2",
            "thread {name} runs without a filter: {threads:?}"
        );
    }
}

#[test]
fn nothing_lost_seccomp_a_forbidden_vcpu_syscall_ends_the_vmm_with_one_clear_line() {
    let dir = TestDir::new("seccomp-fault");
    let mut vm = Run::start(&dir, &[], true);
    let status = vm.wait_exit();
    let stderr = vm.stderr();
    assert_eq!(
        status.code(),
        Some(VIOLATION_EXIT_STATUS),
        "{status}: {stderr}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ERROR seccomp:"))
        .collect();
    assert_eq!(lines.len(), 1, "one line for the one vCPU: {stderr}");
    assert!(
        lines[0].ends_with(&format!(
            "thread vcpu0 made system call {} (getppid), which its seccomp filter forbids: \
             exiting with status {VIOLATION_EXIT_STATUS}",
            libc::SYS_getppid
        )),
        "{stderr}"
    );
    // The call came before the vCPU's first KVM_RUN: the guest never ran.
    assert!(lines_with(&vm.serial, "LUVMM-BOOT").is_empty());
}

#[test]
fn nothing_lost_seccomp_off_runs_the_vm_without_filters() {
    let dir = TestDir::new("seccomp-off");
    // The same fault injection: without filters the call is harmless and the guest runs.
    let mut vm = Run::start(&dir, &["--seccomp", "off"], true);
    vm.guest_checks_ok();
    let threads = vm.thread_modes();
    for (name, mode) in &threads {
        assert_eq!(mode, "0", "thread {name} is filtered: {threads:?}");
    }
}

/// A stand-in for the agent, for the VMM's side of a prepare: it answers a probe with every
/// handler present and a subscribe with a "session" that is `/dev/null`, whose PRESERVE_FD
/// fails, so the prepare is called off (with a release). Returns the ops it was asked, in order.
fn fake_agent(listener: UnixListener) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut ops = Vec::new();
        while ops.last().map(String::as_str) != Some("release") {
            let (mut stream, _) = listener.accept().expect("a VMM connects");
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .expect("a request line");
            let request: Value = serde_json::from_str(&line).expect("a JSON request");
            let op = request["op"].as_str().unwrap_or_default().to_string();
            let reply = match op.as_str() {
                "probe" => json!({"ok": true, "handlers": ["present"]}),
                "subscribe" => json!({"ok": true, "session": "luvmm-vm1"}),
                _ => json!({"ok": true}),
            };
            let bytes = format!("{reply}\n");
            if op == "subscribe" {
                let session = std::fs::File::open("/dev/null").expect("/dev/null");
                let sent = stream
                    .send_with_fd(bytes.as_bytes(), session.as_raw_fd())
                    .expect("send the session");
                assert_eq!(sent, bytes.len(), "a short reply goes whole");
            } else {
                stream.write_all(bytes.as_bytes()).expect("send the reply");
            }
            ops.push(op);
        }
        ops
    })
}

#[test]
fn nothing_lost_seccomp_a_prepare_talks_to_the_agent_under_the_event_loops_filter() {
    let dir = TestDir::new("seccomp-prepare");
    let agent_socket = dir.join("agent.sock");
    let agent = fake_agent(UnixListener::bind(&agent_socket).expect("bind the fake agent"));
    let mut vm = Run::start(&dir, &[], false);
    vm.guest_checks_ok();
    // Connect, fds both ways, a reply timeout, the watch made non-blocking, PRESERVE_FD on the
    // session: all from the filtered event loop. The prepare fails only at the PRESERVE_FD, as it must here.
    let refused = VmmClient::new(&vm.socket)
        .prepare_update("vm1", &agent_socket, false)
        .expect_err("a session that is /dev/null cannot take RAM");
    assert!(refused.to_string().contains("PRESERVE_FD"), "{refused}");
    assert_eq!(
        agent.join().expect("the fake agent"),
        ["probe", "subscribe", "watch", "release"]
    );
    vm.guest_checks_ok();
}
