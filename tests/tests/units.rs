//! The systemd units an operator installs (`vmm/cli/systemd/`), checked by systemd's own
//! `systemd-analyze verify`, and `luvmm start`, which the VM unit runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use luvmm_tests::{luvmm_bin, TestDir, Vm};
use luvmm_vmm::vmm::VmPhase;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/cli/systemd")
}

/// The root with Debian sid's systemd (262 or later) that the setup step built
/// (`tests/nested/sid-root.sh`): the units use settings older systemds do not know
/// (`FileDescriptorStorePreserve=`, 254), so they are verified by the systemd they are written
/// for.
fn sid_root() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("nested/sid-root.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("--check")
        .output()
        .expect("run sid-root.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("root")
}

/// A directory inside the sid root, removed when dropped.
struct InRoot {
    root: PathBuf,
    inside: PathBuf,
}

impl InRoot {
    fn new(root: &Path, name: &str) -> InRoot {
        let inside = PathBuf::from(format!("/run/luvmm-{name}-{}", std::process::id()));
        let dir = root.join(inside.strip_prefix("/").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory in the sid root");
        InRoot {
            root: root.to_path_buf(),
            inside,
        }
    }

    /// `name` in it, as seen from outside the root.
    fn outside(&self, name: &str) -> PathBuf {
        self.root
            .join(self.inside.strip_prefix("/").unwrap())
            .join(name)
    }
}

impl Drop for InRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.outside(""));
    }
}

/// Copies the units into a directory of the sid root, running the luvmm this test was built
/// with (copied beside them), and edited by `edit`; returns what the sid root's
/// `systemd-analyze verify` printed for the agent and VM `vm1`, and whether it passed.
fn verify(edit: impl Fn(&str) -> String) -> (bool, String) {
    let root = sid_root();
    let dir = InRoot::new(&root, "units-verify");
    std::fs::copy(luvmm_bin(), dir.outside("luvmm")).expect("copy luvmm");
    let bin = dir.inside.join("luvmm");
    for unit in ["luvmm-agent.service", "luvmm@.service"] {
        let text = std::fs::read_to_string(units_dir().join(unit)).expect("read the unit");
        let text = text.replace("/usr/local/bin/luvmm", bin.to_str().unwrap());
        std::fs::write(dir.outside(unit), edit(&text)).expect("write the unit");
    }
    let out = Command::new("chroot")
        .arg(&root)
        .args(["systemd-analyze", "verify", "--man=no"])
        .arg(dir.inside.join("luvmm-agent.service"))
        .arg(dir.inside.join("luvmm@vm1.service"))
        .output()
        .expect("chroot (as root) into the sid root");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

/// Both units pass `systemd-analyze verify` without a word; a unit with one mistyped value,
/// which systemd only warns about and ignores, does not.
#[test]
fn the_units_pass_systemd_analyze_verify() {
    let (ok, said) = verify(str::to_string);
    assert!(ok && said.trim().is_empty(), "{said}");

    let (_, said) = verify(|text| text.replace("Restart=on-failure", "Restart=on-falure"));
    assert!(
        said.contains("on-falure"),
        "the mistake went unseen: {said}"
    );
}

/// The agent's unit keeps it alive to the kexec's reboot(): started early and never stopped
/// by shutdown.target, and left out of systemd-shutdown's last kill by its '@' argv[0].
#[test]
fn the_agent_unit_lives_until_the_kexec() {
    let text = std::fs::read_to_string(units_dir().join("luvmm-agent.service")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(lines.contains(&"DefaultDependencies=no"), "{text}");
    assert!(lines.contains(&"Before=shutdown.target"), "{text}");
    assert!(
        !lines.iter().any(|l| l.starts_with("Conflicts=")),
        "stopped with shutdown.target: {text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ExecStart=@/") && l.contains(" @luvmm agent ")),
        "{text}"
    );
}

/// Where systemd holds the sessions, the VM's unit gives it an fd store that outlives the
/// service and the kexec, and lets its main process push into it (systemd drops the
/// notifications of a unit without NotifyAccess=).
#[test]
fn the_vm_unit_keeps_its_session_in_an_fd_store_that_outlives_the_kexec() {
    let text = std::fs::read_to_string(units_dir().join("luvmm@.service")).unwrap();
    let value = |key: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in {text}"))
    };
    assert!(
        value("FileDescriptorStoreMax").parse::<u32>().unwrap() > 0,
        "{text}"
    );
    assert_eq!(value("FileDescriptorStorePreserve"), "yes", "{text}");
    assert!(["main", "all"].contains(&value("NotifyAccess")), "{text}");
}

/// On a host without /dev/liveupdate no session can wait: `luvmm start` boots the VM from its
/// config, and without a config it names the one it looked for.
#[test]
fn start_boots_from_the_config_where_no_session_can_wait() {
    assert!(
        !Path::new("/dev/liveupdate").exists(),
        "this test is for a host without LUO; the nested bed covers the other case"
    );
    let dir = TestDir::new("units-start");
    let vm = Vm::start_unit(&dir, "vm1");
    assert!(vm.check().ok);
    assert_eq!(vm.phase(), VmPhase::Running);
    vm.client().shutdown(false).expect("PUT /vm/shutdown");
    assert!(vm.wait_exit().success());

    let out = Command::new(luvmm_bin())
        .args(["start", "--vm", "vm-without-config"])
        .output()
        .expect("run luvmm start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("config file /etc/luvmm/vm-without-config.json"),
        "{stderr}"
    );
}

/// `luvmm update run` finds the host's VMs from their configs (as `luvmm start` boots them),
/// leaves out a VM whose VMM does not answer, and on a host where the pre-flight finds a
/// blocker (here: no agent) stops with exit 3 having touched nothing. Bad input is refused
/// in words an operator knows. The update itself runs in the nested bed (`host_update`).
#[test]
fn update_run_finds_the_hosts_vms_and_a_blocked_one_touches_nothing() {
    let dir = TestDir::new("units-update-run");
    let vms = [Vm::start_unit(&dir, "vm1"), Vm::start_unit(&dir, "vm2")];
    let config = std::fs::read_to_string(dir.join("vm1.json")).expect("vm1's config");
    let gone = config.replace("vm1.sock", "vm3.sock");
    std::fs::write(dir.join("vm3.json"), gone).expect("write vm3's config");
    let agent = dir.join("agent.sock");
    let svg = dir.join("run.svg");
    let out = Command::new(luvmm_bin())
        .args([
            "update",
            "run",
            "--kernel",
            "/nonexistent/bzImage",
            "--json",
        ])
        .arg("--svg")
        .arg(&svg)
        .arg("--vm-dir")
        .arg(dir.path())
        .arg("--agent-socket")
        .arg(&agent)
        .output()
        .expect("run luvmm update run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(report["outcome"], "blocked", "{report}");
    let found: Vec<&str> = report["vms"]
        .as_array()
        .expect("the VMs found")
        .iter()
        .filter_map(|v| v["vm"].as_str())
        .collect();
    assert_eq!(found, ["vm1", "vm2"], "{report}");
    assert!(
        report["reason"]
            .as_str()
            .is_some_and(|r| r.contains(agent.to_str().unwrap())),
        "the missing agent is named: {report}"
    );
    assert!(stderr.contains("vm3: left out: not running"), "{stderr}");
    // The timeline, with its verdict, renders (librsvg, installed by tests/setup.sh).
    let picture = std::fs::read_to_string(&svg).expect("the timeline");
    assert!(picture.contains("blocked by the pre-flight"), "{picture}");
    let png = dir.join("run.png");
    let rendered = Command::new("rsvg-convert")
        .arg("-o")
        .arg(&png)
        .arg(&svg)
        .output()
        .expect("rsvg-convert");
    assert!(rendered.status.success(), "{rendered:?}");
    assert!(std::fs::read(&png)
        .expect("the PNG")
        .starts_with(b"\x89PNG"));
    for vm in &vms {
        let status = vm.client().status().expect("GET /vm");
        assert_eq!(status.phase, VmPhase::Running);
        assert_eq!(status.update_vm_id, None, "nothing was staged");
        assert!(vm.check().ok);
    }

    let refused = |args: &[&str], code: i32, says: &str| {
        let out = Command::new(luvmm_bin())
            .args(["update", "run", "--kernel", "/nonexistent/bzImage"])
            .args(args)
            .output()
            .expect("run luvmm update run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.contains(says) || stdout.contains(says),
            "{args:?}: {stdout}{stderr}"
        );
    };
    refused(&["--vm", "vm1"], 2, "\"vm1\": say ID=API_SOCKET");
    let empty = dir.join("none");
    std::fs::create_dir_all(&empty).expect("an empty VM directory");
    refused(&["--vm-dir", empty.to_str().unwrap()], 1, "no VM to update");
    refused(
        &["--vm-dir", "/nonexistent/vms"],
        1,
        "cannot read /nonexistent/vms",
    );

    // `update status` without an agent names the socket it tried.
    let out = Command::new(luvmm_bin())
        .args(["update", "status", "--agent-socket"])
        .arg(&agent)
        .output()
        .expect("run luvmm update status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(agent.to_str().unwrap()), "{stderr}");
    for vm in vms {
        vm.client().shutdown(false).expect("PUT /vm/shutdown");
        assert!(vm.wait_exit().success());
    }
}
