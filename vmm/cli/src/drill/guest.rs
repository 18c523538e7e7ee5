//! A microVM under drill in L1: its luvmm process, API socket and serial log, and its guest's
//! own lines (the test payload's, or the Linux judge's), which are the evidence the drill
//! judges by.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use luvmm_devices::guest_control::GuestRequest;
use luvmm_vmm::api::client::{ClientError, VmmClient};
use luvmm_vmm::update::prepare::PrepareReport;
use luvmm_vmm::vmm::{VmPhase, VmStatus};

use super::judge::{parse_linux_check, LinuxCheck, LINUX_CHECK};
use super::{GuestKind, VfioHandler, L1_GUEST_INITRD, L1_GUEST_KERNEL};

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
    #[error(
        "{vm}: waited {} s for {what} in vain; its console ends: {console}; its luvmm's log \
         ends: {log}",
        STEP_TIMEOUT.as_secs()
    )]
    Timeout {
        vm: String,
        what: &'static str,
        console: String,
        log: String,
    },
    #[error("{vm}: its check line is not a Linux judge's: {line}")]
    Unreadable { vm: String, line: String },
    #[error("{vm}: API")]
    Api {
        vm: String,
        #[source]
        source: ClientError,
    },
}

/// What a guest's later check shows it lost, or did not go on with.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Discontinuity {
    /// The later check found a page that is not what it wrote: its line says which.
    #[error("{line}")]
    Lost { line: String },
    #[error("already lost before: {line}")]
    LostBefore { line: String },
    #[error("another boot: seed {before} became {after}")]
    Rebooted { before: String, after: String },
    #[error("the check counter went from {before} to {after}")]
    ChecksStalled { before: u64, after: u64 },
    #[error("heartbeats did not all go on: {before:?} then {after:?}")]
    HeartbeatsStalled { before: Vec<u64>, after: Vec<u64> },
}

/// The payload's `LUVMM-CHECK` line, as far as the drill judges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestCheck {
    pub ok: bool,
    pub seed: String,
    pub checks: u64,
    pub heartbeats: Vec<u64>,
    /// The largest TSC gap between two of the BSP's ticks since the previous check, the TSC
    /// per tick (100 ms) by the guest's own calibration (0 until it has one), and the most its
    /// TSC went back from one tick to the next (0: never).
    pub tick_gap_tsc: Option<u64>,
    pub tick_tsc: Option<u64>,
    pub tick_back_tsc: Option<u64>,
    pub line: String,
}

/// The guest's timer ticks every 100 ms.
const TICK_MS: f64 = 100.0;

impl GuestCheck {
    /// Parses `LUVMM-CHECK ok pages=N heartbeat=H seed=0x.. checks=C vcpus=N tick_gap_tsc=G
    /// tick_tsc=T heartbeats=a,b`
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
            tick_gap_tsc: field("tick_gap_tsc").and_then(|v| v.parse().ok()),
            tick_tsc: field("tick_tsc").and_then(|v| v.parse().ok()),
            tick_back_tsc: field("tick_back_tsc").and_then(|v| v.parse().ok()),
            line: line.to_string(),
        })
    }

    /// The longest the guest's own clock saw it stop since its previous check, in ms: its
    /// largest tick gap in ticks of its calibrated TSC rate.
    pub fn clock_gap_ms(&self) -> Option<f64> {
        self.tsc_ms(self.tick_gap_tsc?)
    }

    /// The most the guest's TSC went back from one tick to the next since its previous
    /// check, in ms (0: it never did).
    pub fn clock_back_ms(&self) -> Option<f64> {
        self.tsc_ms(self.tick_back_tsc?)
    }

    fn tsc_ms(&self, cycles: u64) -> Option<f64> {
        let tick = self.tick_tsc.filter(|t| *t > 0)?;
        // An f64 holds the ratio of two cycle counts to far better than a microsecond.
        #[allow(clippy::cast_precision_loss)]
        Some(cycles as f64 / tick as f64 * TICK_MS)
    }

    /// Whether this check, taken after `before`, shows a guest that lost nothing and went on:
    /// every page intact, the same boot (seed), a later check and every vCPU's heartbeat
    /// further on. `Err` says what did not hold.
    pub fn continues(&self, before: &GuestCheck) -> Result<(), Discontinuity> {
        if !self.ok {
            return Err(Discontinuity::Lost {
                line: self.line.clone(),
            });
        }
        if !before.ok {
            return Err(Discontinuity::LostBefore {
                line: before.line.clone(),
            });
        }
        if self.seed != before.seed {
            return Err(Discontinuity::Rebooted {
                before: before.seed.clone(),
                after: self.seed.clone(),
            });
        }
        if self.checks <= before.checks {
            return Err(Discontinuity::ChecksStalled {
                before: before.checks,
                after: self.checks,
            });
        }
        let went_on = self.heartbeats.len() == before.heartbeats.len()
            && self
                .heartbeats
                .iter()
                .zip(&before.heartbeats)
                .all(|(after, before)| after > before);
        if !went_on || self.heartbeats.is_empty() {
            return Err(Discontinuity::HeartbeatsStalled {
                before: before.heartbeats.clone(),
                after: self.heartbeats.clone(),
            });
        }
        Ok(())
    }
}

/// A device round line says the device did a DMA round trip and raised its interrupt.
pub fn round_works(line: &str) -> bool {
    line.starts_with("LUVMM-ROUND ok ") && line.contains(" dma=ok irq=msi")
}

/// Whether a device round line says the device still holds the identity the guest gave the
/// device in that slot at boot (`id=ok`), holds another (`id=LOST`), or says nothing.
pub fn round_identity(line: &str) -> Option<bool> {
    let id = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("id="))?;
    Some(id == "ok")
}

/// Whole (newline-ended: the guest may be mid-line) lines of a serial log holding `prefix`,
/// from it on: a Linux guest's shell may have put its prompt before the judge's line.
pub fn serial_lines(serial: &Path, prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .filter_map(|l| l.find(prefix).map(|at| l[at..].to_string()))
        .collect()
}

/// One VM's luvmm process and files.
pub struct Guest {
    pub vm: String,
    pub kind: GuestKind,
    pub socket: PathBuf,
    pub serial: PathBuf,
    stderr: PathBuf,
    /// Polled for an early exit while a step waits on the guest.
    child: RefCell<Child>,
}

/// Where a drill's luvmm writes the guest's console and serves its API: `<vm>.log` and
/// `<vm>.sock` in the work directory, named on its command line, or, for a restore after the
/// kexec, as the VM's launch record in the agent's ledger says (the same paths).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outputs {
    Named,
    Recorded,
}

/// The last 16 lines of the file at `path`, on one line, for failure reports.
fn tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(16)..].join(" | ")
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
        command
            .arg("run")
            .args(["--thp", on_off(thp)])
            .arg("--payload")
            .arg(payload)
            .args(["--memory-mib", &memory_mib.to_string(), "--vcpus", "2"])
            .args(["--cmdline", "console=ttyS0"]);
        for bdf in bdfs {
            command.args(["--vfio", bdf]);
        }
        let guest = Guest::spawn(dir, vm, GuestKind::Payload, command, Outputs::Named)?;
        guest.wait_line("LUVMM-DEV scan done", 1, "the guest's boot")?;
        Ok(guest)
    }

    /// Boots the bed's Linux guest with `memory_mib` and the NVMe controllers `bdfs` passed
    /// through, one vCPU (L1 has one), huge pages as `thp` says, and waits for its judge: 40 %
    /// of its RAM filled and its block loop running. Where `handler` resets devices, the guest's NVMe timeouts are
    /// short, so its driver finds a reset controller within seconds.
    pub fn boot_linux(
        dir: &Path,
        vm: &str,
        memory_mib: u64,
        bdfs: &[String],
        handler: VfioHandler,
        thp: bool,
    ) -> Result<Guest, GuestError> {
        // A 2 s watchdog: a CPU that sees 4 s pass unannounced is a soft lockup, so a blackout
        // the guest was not told of (`KVM_KVMCLOCK_CTRL`) shows in its log. nohz=off keeps the
        // tick running in idle: an interrupt that wakes a CPU whose tick had stopped touches
        // the watchdog first (7.2's tick_nohz_irq_enter), so a blackout that began while the
        // guest idled went unreported, and the damage check failed to fail now and then.
        let mut cmdline = String::from(
            "console=ttyS0 tsc=nowatchdog nohz=off watchdog_thresh=2 luvmm.judge.mem_pct=40",
        );
        if handler.resets_devices() {
            cmdline.push_str(" nvme_core.io_timeout=3 nvme_core.admin_timeout=3");
        }
        let mut command = luvmm();
        command
            .arg("run")
            .args(["--thp", on_off(thp)])
            .args(["--kernel", L1_GUEST_KERNEL, "--initrd", L1_GUEST_INITRD])
            // One vCPU: with two, a 7.2 guest not told of a 20 s blackout (no
            // KVM_KVMCLOCK_CTRL) logged no soft lockup, so the drill's damage check could not
            // fail; two-vCPU guests are judged by the nested linux-paths and linux-update tests.
            .args(["--memory-mib", &memory_mib.to_string(), "--vcpus", "1"])
            .args(["--cmdline", &cmdline]);
        for bdf in bdfs {
            command.args(["--vfio", bdf]);
        }
        let guest = Guest::spawn(dir, vm, GuestKind::Linux, command, Outputs::Named)?;
        guest.wait_line("LUVMM-LINUX-READY", 1, "the Linux guest's judge")?;
        Ok(guest)
    }

    /// Starts restoring VM `vm` from its session, claimed through the agent at
    /// `agent_socket` (which it waits for if it is not listening yet), with the test-only
    /// `faults` injected; [`Guest::wait_running`] waits until its guest runs.
    pub fn start_restore(
        dir: &Path,
        vm: &str,
        kind: GuestKind,
        agent_socket: &Path,
        faults: Option<&str>,
    ) -> Result<Guest, GuestError> {
        let mut command = luvmm();
        command
            .args(["restore", "--session", vm])
            .arg("--agent-socket")
            .arg(agent_socket);
        if let Some(faults) = faults {
            command.env(luvmm_vmm::faults::FAULTS_ENV, faults);
        }
        // No --serial or --api-socket: the restore takes the ones the VM was booted with
        // from the agent's ledger, where the VMM recorded them when it subscribed.
        Guest::spawn(dir, vm, kind, command, Outputs::Recorded)
    }

    fn spawn(
        dir: &Path,
        vm: &str,
        kind: GuestKind,
        mut command: Command,
        outputs: Outputs,
    ) -> Result<Guest, GuestError> {
        let socket = dir.join(format!("{vm}.sock"));
        let serial = dir.join(format!("{vm}.log"));
        let stderr = dir.join(format!("{vm}.err"));
        let _ = std::fs::remove_file(&socket);
        let err_file = std::fs::File::create(&stderr).map_err(|source| GuestError::Spawn {
            vm: vm.to_string(),
            source,
        })?;
        if outputs == Outputs::Named {
            command
                .arg("--serial")
                .arg(&serial)
                .arg("--api-socket")
                .arg(&socket);
        }
        let child = command
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
            kind,
            socket,
            serial,
            stderr,
            child: RefCell::new(child),
        })
    }

    /// The last lines luvmm wrote to its stderr, for failure reports.
    pub fn log_tail(&self) -> String {
        tail(&self.stderr)
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
                    console: tail(&self.serial),
                    log: self.log_tail(),
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

    /// The control API of this VM's luvmm.
    fn client(&self) -> VmmClient {
        VmmClient::new(&self.socket)
    }

    /// Wraps a failed API call with the VM's name.
    fn api_error(&self) -> impl FnOnce(ClientError) -> GuestError + '_ {
        |source| GuestError::Api {
            vm: self.vm.clone(),
            source,
        }
    }

    /// The VM's status.
    pub fn status(&self) -> Result<VmStatus, GuestError> {
        self.client().status().map_err(self.api_error())
    }

    /// Waits until the VM's phase is `running`.
    pub fn wait_running(&self) -> Result<VmStatus, GuestError> {
        self.wait("the VM to run", || {
            self.status().ok().filter(|s| s.phase == VmPhase::Running)
        })
    }

    /// Asks the guest to check itself and returns its new check line: the payload's
    /// `LUVMM-CHECK`, or the Linux judge's `LUVMM-LINUX-CHECK`.
    pub fn check(&self) -> Result<String, GuestError> {
        let prefix = match self.kind {
            GuestKind::Payload => "LUVMM-CHECK",
            GuestKind::Linux => LINUX_CHECK,
        };
        let seen = self.lines(prefix).len();
        self.client().check().map_err(self.api_error())?;
        self.wait("the guest's check", || {
            let line = self.lines(prefix).get(seen)?.clone();
            let readable = match self.kind {
                GuestKind::Payload => GuestCheck::parse(&line).is_some(),
                GuestKind::Linux => parse_linux_check(&line).is_some(),
            };
            readable.then_some(line)
        })
    }

    /// The Linux judge's next check, read.
    pub fn linux_check(&self) -> Result<(String, LinuxCheck), GuestError> {
        let line = self.check()?;
        let check = parse_linux_check(&line).ok_or_else(|| GuestError::Unreadable {
            vm: self.vm.clone(),
            line: line.clone(),
        })?;
        Ok((line, check))
    }

    /// Asks the guest to drive every passthrough device once more and returns its per-device
    /// round lines, in device order. The Linux guest has none: its judge's block loop runs
    /// all the time, and its checks carry what it saw.
    pub fn device_round(&self) -> Result<Vec<String>, GuestError> {
        if self.kind == GuestKind::Linux {
            return Ok(Vec::new());
        }
        let seen = self.lines("LUVMM-ROUND done").len();
        self.client()
            .guest_request(GuestRequest::Devices)
            .map_err(self.api_error())?;
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
        self.client()
            .prepare_update(&self.vm, agent_socket, require_preserved_devices)
            .map_err(self.api_error())
    }

    /// Calls the VM's prepared update off and waits until the guest runs again.
    pub fn cancel(&self) -> Result<(), GuestError> {
        self.client().cancel_update().map_err(self.api_error())?;
        self.wait_running().map(|_| ())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self
            .client()
            .with_timeout(Duration::from_secs(5))
            .shutdown(false);
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

/// The word `luvmm run --thp` takes for `thp`.
fn on_off(thp: bool) -> &'static str {
    if thp {
        "on"
    } else {
        "off"
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
        let lost_line = "LUVMM-CHECK LOST first_bad_gpa=0x3000000 expected=0x1 found=0x0";
        let lost = check(lost_line);
        assert_eq!(
            lost.continues(&before),
            Err(Discontinuity::Lost {
                line: lost_line.into()
            })
        );
        assert_eq!(
            after.continues(&lost),
            Err(Discontinuity::LostBefore {
                line: lost_line.into()
            })
        );
        let reboot =
            check("LUVMM-CHECK ok pages=9 heartbeat=1 seed=0xcd checks=3 vcpus=2 heartbeats=9,8");
        assert_eq!(
            reboot.continues(&before),
            Err(Discontinuity::Rebooted {
                before: "0xab".into(),
                after: "0xcd".into()
            })
        );
        let stale =
            check("LUVMM-CHECK ok pages=9 heartbeat=9 seed=0xab checks=2 vcpus=2 heartbeats=9,8");
        assert_eq!(
            stale.continues(&before),
            Err(Discontinuity::ChecksStalled {
                before: 2,
                after: 2
            })
        );
        let stuck =
            check("LUVMM-CHECK ok pages=9 heartbeat=9 seed=0xab checks=3 vcpus=2 heartbeats=9,7");
        assert_eq!(
            stuck.continues(&before),
            Err(Discontinuity::HeartbeatsStalled {
                before: vec![5, 7],
                after: vec![9, 7]
            })
        );
        // The report shows what was lost in the words it always used.
        assert_eq!(
            stuck.continues(&before).unwrap_err().to_string(),
            "heartbeats did not all go on: [5, 7] then [9, 7]"
        );
        assert!(GuestCheck::parse("LUVMM-BOOT proto=pvh").is_none());
    }

    #[test]
    fn nothing_lost_drill_reads_the_guest_clock_from_its_check() {
        let after = check(
            "LUVMM-CHECK ok pages=9 heartbeat=9 seed=0xab checks=3 vcpus=2 \
             tick_gap_tsc=650000000 tick_tsc=260000000 tick_back_tsc=26000000 heartbeats=9,8",
        );
        assert_eq!(after.clock_gap_ms(), Some(250.0));
        assert_eq!(after.clock_back_ms(), Some(10.0));
        // Not calibrated yet, or a payload without the clock: no figure rather than a wrong one.
        let early = check("LUVMM-CHECK ok pages=9 seed=0xab checks=1 tick_gap_tsc=5 tick_tsc=0");
        assert_eq!(early.clock_gap_ms(), None);
        let old = check("LUVMM-CHECK ok pages=9 seed=0xab checks=1 heartbeats=9,8");
        assert_eq!(old.clock_gap_ms(), None);
    }

    #[test]
    fn nothing_lost_drill_reads_the_device_identity_from_the_round_line() {
        assert_eq!(
            round_identity("LUVMM-ROUND ok n=3 bdf=00:01.0 dma=ok irq=msi id=ok"),
            Some(true)
        );
        let swapped = "LUVMM-ROUND ok n=3 bdf=00:01.0 dma=ok irq=msi id=LOST found=0x0000000012";
        assert_eq!(round_identity(swapped), Some(false));
        assert_eq!(
            round_identity("LUVMM-ROUND ok n=3 bdf=00:02.0 nvme=ok irq=msix sq_slot=1"),
            None
        );
    }

    #[test]
    fn a_judges_line_is_found_behind_the_shells_prompt() {
        let dir = std::env::temp_dir().join(format!("luvmm-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("serial.log");
        std::fs::write(
            &log,
            "boot\n/ # \x1b[6nLUVMM-LINUX-READY {\"pages\":1}\nLUVMM-LINUX-CHECK {\"checks\":1",
        )
        .unwrap();
        assert_eq!(
            serial_lines(&log, "LUVMM-LINUX-READY"),
            ["LUVMM-LINUX-READY {\"pages\":1}"]
        );
        // The check is not whole yet.
        assert!(serial_lines(&log, "LUVMM-LINUX-CHECK").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
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
