//! The systemd units an operator installs (`vmm/cli/systemd/`), checked by systemd's own
//! `systemd-analyze verify`, and `luvmm start`, which the VM unit runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use luvmm_tests::{luvmm_bin, TestDir, Vm};
use luvmm_vmm::vmm::VmPhase;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/cli/systemd")
}

/// Copies the units into `dir`, running the luvmm this test was built with, and edited by
/// `edit`; returns what `systemd-analyze verify` printed for the agent and VM `vm1`, and
/// whether it passed.
fn verify(dir: &Path, edit: impl Fn(&str) -> String) -> (bool, String) {
    let bin = luvmm_bin();
    for unit in ["luvmm-agent.service", "luvmm@.service"] {
        let text = std::fs::read_to_string(units_dir().join(unit)).expect("read the unit");
        let text = text.replace("/usr/local/bin/luvmm", bin.to_str().unwrap());
        std::fs::write(dir.join(unit), edit(&text)).expect("write the unit");
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join("luvmm-agent.service"))
        .arg(dir.join("luvmm@vm1.service"))
        .output()
        .expect("systemd-analyze (installed by tests/setup.sh)");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

/// Both units pass `systemd-analyze verify` without a word; a unit with one mistyped value,
/// which systemd only warns about and ignores, does not.
#[test]
fn the_units_pass_systemd_analyze_verify() {
    let dir = TestDir::new("units-verify");
    let (ok, said) = verify(dir.path(), str::to_string);
    assert!(ok && said.trim().is_empty(), "{said}");

    let (_, said) = verify(dir.path(), |text| {
        text.replace("Restart=on-failure", "Restart=on-falure")
    });
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
