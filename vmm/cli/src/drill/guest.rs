//! A microVM under drill in L1: its luvmm process, API socket and serial log, and the test
//! payload's own lines, which are the evidence the drill judges by.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use luvmm_vmm::api::client::{self, ApiReply, ClientError};
use luvmm_vmm::update::prepare::PrepareReport;
use luvmm_vmm::vmm::{VmPhase, VmStatus};

/// How long one guest step (a boot, a check, a device round, a restore) may take in the
/// nested bed, where the guest runs on nested KVM under TCG.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// A guest step failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("{vm}: cannot start luvmm")]
    Spawn {
        vm: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{vm}: luvmm exited ({status}) while waiting for {what}; its log ends: {log}")]
    Exited {
        vm: String,
        what: &'static str,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("{vm}: no {what} within {STEP_TIMEOUT:?}")]
    Timeout { vm: String, what: &'static str },
    #[error("{vm}: API")]
    Api {
        vm: String,
        #[source]
        source: ClientError,
    },
    #[error("{vm}: {method} {path}: {status} {body}")]
    Refused {
        vm: String,
        method: &'static str,
        path: &'static str,
        status: u16,
        body: String,
    },
    #[error("{vm}: unexpected reply to {path}: {body}")]
    Reply {
        vm: String,
        path: &'static str,
        body: String,
    },
}

/// The payload's `LUVMM-CHECK` line, as far as the drill judges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestCheck {
    pub ok: bool,
    pub seed: String,
    pub checks: u64,
    pub heartbeats: Vec<u64>,
    pub line: String,
}

impl GuestCheck {
    /// Parses `LUVMM-CHECK ok pages=N heartbeat=H seed=0x.. checks=C vcpus=N heartbeats=a,b`
    /// or `LUVMM-CHECK LOST first_bad_gpa=..`.
    pub fn parse(line: &str) -> Option<GuestCheck> {
        let line = line.trim_end();
        let body = line.strip_prefix("LUVMM-CHECK ")?;
        let field = |key: &str| {
            body.split_whitespace()
                .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        };
        Some(GuestCheck {
            ok: body.starts_with("ok "),
            seed: field("seed").unwrap_or_default().to_string(),
            checks: field("checks").and_then(|v| v.parse().ok()).unwrap_or(0),
            heartbeats: field("heartbeats")
                .map(|v| v.split(',').filter_map(|h| h.parse().ok()).collect())
                .unwrap_or_default(),
            line: line.to_string(),
        })
    }

    /// Whether this check, taken after `before`, shows a guest that lost nothing and went on:
    /// every page intact, the same boot (seed), a later check and every vCPU's heartbeat
    /// further on. `Err` says what did not hold.
    pub fn continues(&self, before: &GuestCheck) -> Result<(), String> {
        if !self.ok {
            return Err(self.line.clone());
        }
        if !before.ok {
            return Err(format!("already lost before: {}", before.line));
        }
        if self.seed != before.seed {
            return Err(format!(
                "another boot: seed {} became {}",
                before.seed, self.seed
            ));
        }
        if self.checks <= before.checks {
            return Err(format!(
                "the check counter went from {} to {}",
                before.checks, self.checks
            ));
        }
        let went_on = self.heartbeats.len() == before.heartbeats.len()
            && self
                .heartbeats
                .iter()
                .zip(&before.heartbeats)
                .all(|(after, before)| after > before);
        if !went_on || self.heartbeats.is_empty() {
            return Err(format!(
                "heartbeats did not all go on: {:?} then {:?}",
                before.heartbeats, self.heartbeats
            ));
        }
        Ok(())
    }
}

/// A device round line says the device did a DMA round trip and raised its interrupt.
pub fn round_works(line: &str) -> bool {
    line.starts_with("LUVMM-ROUND ok ") && line.contains(" dma=ok irq=msi")
}

/// Whole (newline-ended: the guest may be mid-line) lines of a serial log that start with
/// `prefix`.
pub fn serial_lines(serial: &Path, prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// One VM's luvmm process and files.
pub struct Guest {
    pub vm: String,
    pub socket: PathBuf,
    pub serial: PathBuf,
    stderr: PathBuf,
    /// Polled for an early exit while a step waits on the guest.
    child: RefCell<Child>,
}

impl Guest {
    /// Boots the test payload with `memory_mib` and the `bdfs` passed through, every RAM page
    /// filled (the payload's default), with transparent huge pages asked for if `thp`.
    pub fn boot(
        dir: &Path,
        vm: &str,
        payload: &Path,
        memory_mib: u64,
        bdfs: &[String],
        thp: bool,
    ) -> Result<Guest, GuestError> {
        let mut command = luvmm();
        command.arg("run");
        if thp {
            command.arg("--thp");
        }
        command
            .arg("--payload")
            .arg(payload)
            .args(["--memory-mib", &memory_mib.to_string(), "--vcpus", "2"])
            .args(["--cmdline", "console=ttyS0"]);
        for bdf in bdfs {
            command.args(["--vfio", bdf]);
        }
        let guest = Guest::spawn(dir, vm, command)?;
        guest.wait_line("LUVMM-DEV scan done", 1, "the guest's boot")?;
        Ok(guest)
    }

    /// Restores VM `vm` from its session, claimed through the agent at `agent_socket`, and
    /// waits until its guest runs.
    pub fn restore(dir: &Path, vm: &str, agent_socket: &Path) -> Result<Guest, GuestError> {
        let mut command = luvmm();
        command
            .args(["restore", "--session", vm])
            .arg("--agent-socket")
            .arg(agent_socket);
        let guest = Guest::spawn(dir, vm, command)?;
        guest.wait_running()?;
        Ok(guest)
    }

    fn spawn(dir: &Path, vm: &str, mut command: Command) -> Result<Guest, GuestError> {
        let socket = dir.join(format!("{vm}.sock"));
        let serial = dir.join(format!("{vm}.log"));
        let stderr = dir.join(format!("{vm}.err"));
        let _ = std::fs::remove_file(&socket);
        let err_file = std::fs::File::create(&stderr).map_err(|source| GuestError::Spawn {
            vm: vm.to_string(),
            source,
        })?;
        let child = command
            .arg("--serial")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .map_err(|source| GuestError::Spawn {
                vm: vm.to_string(),
                source,
            })?;
        Ok(Guest {
            vm: vm.to_string(),
            socket,
            serial,
            stderr,
            child: RefCell::new(child),
        })
    }

    /// The last lines luvmm wrote to its stderr, for failure reports.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(16)..].join(" | ")
    }

    /// Waits until `done` holds, failing if luvmm exits or the step times out.
    fn wait<T>(
        &self,
        what: &'static str,
        mut done: impl FnMut() -> Option<T>,
    ) -> Result<T, GuestError> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(value) = done() {
                return Ok(value);
            }
            if let Ok(Some(status)) = self.child.borrow_mut().try_wait() {
                return Err(GuestError::Exited {
                    vm: self.vm.clone(),
                    what,
                    status,
                    log: self.log_tail(),
                });
            }
            if Instant::now() > deadline {
                return Err(GuestError::Timeout {
                    vm: self.vm.clone(),
                    what,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whole (newline-ended) serial lines starting with `prefix`.
    pub fn lines(&self, prefix: &str) -> Vec<String> {
        serial_lines(&self.serial, prefix)
    }

    fn wait_line(&self, prefix: &str, count: usize, what: &'static str) -> Result<(), GuestError> {
        self.wait(what, || (self.lines(prefix).len() >= count).then_some(()))
    }

    /// Sends one API request; a non-2xx reply is an error.
    pub fn api(
        &self,
        method: &'static str,
        path: &'static str,
        body: Option<&str>,
    ) -> Result<ApiReply, GuestError> {
        let reply = client::request(&self.socket, method, path, body, client::DEFAULT_TIMEOUT)
            .map_err(|source| GuestError::Api {
                vm: self.vm.clone(),
                source,
            })?;
        if !reply.is_success() {
            return Err(GuestError::Refused {
                vm: self.vm.clone(),
                method,
                path,
                status: reply.status,
                body: reply.body,
            });
        }
        Ok(reply)
    }

    /// The VM's status.
    pub fn status(&self) -> Result<VmStatus, GuestError> {
        let reply = self.api("GET", "/vm", None)?;
        serde_json::from_str(&reply.body).map_err(|_| GuestError::Reply {
            vm: self.vm.clone(),
            path: "/vm",
            body: reply.body,
        })
    }

    /// Waits until the VM's phase is `running`.
    pub fn wait_running(&self) -> Result<VmStatus, GuestError> {
        self.wait("the VM to run", || {
            self.status().ok().filter(|s| s.phase == VmPhase::Running)
        })
    }

    /// Asks the guest to check its memory and returns its new check line.
    pub fn check(&self) -> Result<GuestCheck, GuestError> {
        let seen = self.lines("LUVMM-CHECK").len();
        self.api("PUT", "/vm/check", None)?;
        self.wait("the guest's check", || {
            self.lines("LUVMM-CHECK")
                .get(seen)
                .and_then(|l| GuestCheck::parse(l))
        })
    }

    /// Asks the guest to drive every passthrough device once more and returns its per-device
    /// round lines, in device order.
    pub fn device_round(&self) -> Result<Vec<String>, GuestError> {
        let seen = self.lines("LUVMM-ROUND done").len();
        self.api("PUT", "/vm/guest-request", Some(r#"{"request":"devices"}"#))?;
        let done = self.wait("the guest's device round", || {
            self.lines("LUVMM-ROUND done").get(seen).cloned()
        })?;
        let n = done
            .split_whitespace()
            .find(|w| w.starts_with("n="))
            .unwrap_or_default()
            .to_string();
        Ok(self
            .lines("LUVMM-ROUND ")
            .into_iter()
            .filter(|l| !l.starts_with("LUVMM-ROUND done") && l.contains(&format!(" {n} ")))
            .collect())
    }

    /// Prepares the VM's update through the agent at `agent_socket`.
    pub fn prepare(
        &self,
        agent_socket: &Path,
        require_preserved_devices: bool,
    ) -> Result<PrepareReport, GuestError> {
        let body = serde_json::json!({
            "vm_id": self.vm,
            "agent_socket": agent_socket,
            "require_preserved_devices": require_preserved_devices,
        })
        .to_string();
        let reply = self.api("PUT", "/vm/update/prepare", Some(&body))?;
        serde_json::from_str(&reply.body).map_err(|_| GuestError::Reply {
            vm: self.vm.clone(),
            path: "/vm/update/prepare",
            body: reply.body,
        })
    }

    /// Calls the VM's prepared update off and waits until the guest runs again.
    pub fn cancel(&self) -> Result<(), GuestError> {
        self.api("PUT", "/vm/update/cancel", None)?;
        self.wait_running().map(|_| ())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = client::request(
            &self.socket,
            "PUT",
            "/vm/shutdown",
            None,
            Duration::from_secs(5),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.get_mut().try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.get_mut().kill();
        let _ = self.child.get_mut().wait();
    }
}

/// This very binary, for the VMs' own processes.
pub(super) fn luvmm() -> Command {
    Command::new(std::env::current_exe().unwrap_or_else(|_| PathBuf::from("luvmm")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str) -> GuestCheck {
        GuestCheck::parse(line).expect("a check line")
    }

    #[test]
    fn a_guest_that_went_on_passes_and_every_kind_of_loss_fails() {
        let before =
            check("LUVMM-CHECK ok pages=9 heartbeat=5 seed=0xab checks=2 vcpus=2 heartbeats=5,7");
        let after =
            check("LUVMM-CHECK ok pages=9 heartbeat=9 seed=0xab checks=3 vcpus=2 heartbeats=9,8\n");
        assert_eq!(after.continues(&before), Ok(()));
        let lost = check("LUVMM-CHECK LOST first_bad_gpa=0x3000000 expected=0x1 found=0x0");
        assert_eq!(
            lost.continues(&before),
            Err("LUVMM-CHECK LOST first_bad_gpa=0x3000000 expected=0x1 found=0x0".into())
        );
        let reboot =
            check("LUVMM-CHECK ok pages=9 heartbeat=1 seed=0xcd checks=3 vcpus=2 heartbeats=9,8");
        assert!(reboot.continues(&before).unwrap_err().contains("seed"));
        let stale =
            check("LUVMM-CHECK ok pages=9 heartbeat=9 seed=0xab checks=2 vcpus=2 heartbeats=9,8");
        assert!(stale.continues(&before).unwrap_err().contains("counter"));
        let stuck =
            check("LUVMM-CHECK ok pages=9 heartbeat=9 seed=0xab checks=3 vcpus=2 heartbeats=9,7");
        assert!(stuck.continues(&before).unwrap_err().contains("heartbeats"));
        assert!(GuestCheck::parse("LUVMM-BOOT proto=pvh").is_none());
    }

    #[test]
    fn only_a_dma_round_trip_with_its_interrupt_counts() {
        assert!(round_works("LUVMM-ROUND ok n=3 bdf=00:01.0 dma=ok irq=msi"));
        assert!(!round_works("LUVMM-ROUND FAIL n=3 bdf=00:01.0 reason=dma"));
        assert!(!round_works(
            "LUVMM-ROUND ok n=3 bdf=00:01.0 dma=ok irq=none"
        ));
    }
}
