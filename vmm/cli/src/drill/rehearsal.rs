//! The drill's L1 half (`luvmm drill-l1 --stage N`), run by the bed's `/init` in every kernel
//! of the chain: it is the operator of the host under update.
//!
//! Stage 1 starts the agent and boots the VMs (each guest fills all its RAM and drives its
//! devices); with `--cancel-first` it prepares them, calls the update off and has them check
//! themselves. Every stage N ≤ rounds then runs the pre-flight, prepares every VM and asks the
//! agent for the kexec into the next kernel with stage N+1 on its command line. Every stage
//! N > 1 first restores each VM from its session and has its guest check itself and drive its
//! devices again. The open watcher runs from the first prepare to the kexec and, in the next
//! kernel, from the agent's start to the last resume. It reports facts as [`Event`]s on the
//! console; the host half judges them.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::host_update::barrier::{stage_and_prepare, BarrierOptions, CalledOff, HostVm, Progress};
use crate::preflight::{self, CheckArgs};
use luvmm_liveupdate::agent::{AgentClient, AgentClientError};
use luvmm_liveupdate::luo::kexec;
use luvmm_resources::errors::error_chain;
use luvmm_vmm::vstate::memory::SHMEM_THP_PATH;

use super::bed::{self, BedError};
use super::event::{Event, WatchSpan, HOST_ROW};
use super::guest::{luvmm, Guest, GuestError};
use super::judge::LINUX_CHECK;
use super::watch::{vfio_pci_devices, OpenWatch, Opens, WatchError, VFIO_PCI};
use super::{
    vm_id, with_boot, GuestKind, Plan, VfioHandler, L1_NEXT_KERNEL, L1_PAYLOAD, L1_PLAN,
    L1_STAGED_INITRD,
};

/// Where the L1 half keeps its sockets and logs (tmpfs: gone with the kernel).
const WORK: &str = "/tmp/drill";

/// How long to wait for the kexec after the agent took the update.
const KEXEC_WAIT: Duration = Duration::from_secs(120);

/// How often the watch before the kexec reports what it saw: an open in the last such
/// interval before the kexec goes unreported.
const WATCH_REPORT_EVERY: Duration = Duration::from_millis(50);

/// A step of the L1 half failed; the drill reports it and stops updating.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("cannot read the drill's plan {path}")]
    Plan {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the drill's plan {path} is not valid")]
    PlanFormat {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    #[error("the agent did not come up: {0}")]
    Agent(String),
    #[error("the plan needs {needed} devices bound to vfio-pci, L1 has {found}")]
    Devices { needed: usize, found: usize },
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("open watcher")]
    Watch(#[from] WatchError),
    #[error("agent")]
    AgentCall(#[from] AgentClientError),
    #[error("the pre-flight blocks the update: {0}")]
    Blocked(String),
    #[error("the next kernel's initramfs")]
    Initrd(#[from] BedError),
    #[error("the agent took the update but no kexec came within {KEXEC_WAIT:?}")]
    NoKexec,
    #[error("the update was called off for every VM")]
    CalledOff(#[source] CalledOff),
}

/// Runs stage `stage` of the plan in `/luvmm/drill.json`. Returns after the last stage, or
/// after a failure (which it has reported); a stage that kexecs does not return.
pub fn run(stage: u32) {
    emit(&Event::Stage {
        stage,
        kernel: kernel_release(),
    });
    // Stage N restores round N-1 and prepares round N: a failure names the round it is in.
    let mut round = stage;
    if let Err(e) = stage_steps(stage, &mut round) {
        emit(&Event::Failure {
            round,
            vm: None,
            what: error_chain(&e),
        });
    }
}

fn stage_steps(stage: u32, round: &mut u32) -> Result<(), StepError> {
    let plan = Plan::load(Path::new(L1_PLAN))?;
    let work = Path::new(WORK);
    std::fs::create_dir_all(work)
        .map_err(|e| StepError::Io(format!("create {}", work.display()), e))?;
    // The bed binds every edu device and NVMe controller to vfio-pci.
    let bdfs = vfio_pci_devices().map_err(|e| StepError::Io(format!("list {VFIO_PCI}"), e))?;
    let needed = plan.device_count() as usize;
    if bdfs.len() < needed {
        return Err(StepError::Devices {
            needed,
            found: bdfs.len(),
        });
    }
    let bdfs = &bdfs[..needed];
    if plan.thp {
        // Per boot: every kernel of the chain starts with shmem THP off.
        std::fs::write(SHMEM_THP_PATH, "advise")
            .map_err(|e| StepError::Io(format!("write advise to {SHMEM_THP_PATH}"), e))?;
    }
    let agent_socket = work.join("agent.sock");
    let (_agent, guests) = if stage == 1 {
        let agent = Agent::start(work, &agent_socket)?;
        let guests = boot_all(&plan, bdfs, work, &agent_socket)?;
        (agent, guests)
    } else {
        *round = stage - 1;
        // Every open of a device from the agent's start to the last resume is seen, and
        // reported even when a restore fails.
        let watch = SpanWatch::start(*round, WatchSpan::AgentToResume, bdfs)?;
        let resumed = restore_all(*round, &plan, bdfs, work, &agent_socket);
        let resumed = watch.close(resumed)?;
        *round = stage;
        resumed
    };
    if stage <= plan.rounds {
        update(stage, &plan, &guests, &agent_socket)?;
    }
    for (guest, _) in &guests {
        emit(&phase(&guest.vm, "done"));
    }
    emit(&phase(HOST_ROW, "done"));
    emit(&Event::Done);
    Ok(())
}

/// A VM's guest and the host devices (BDFs) passed through to it.
type GuestWithDevices = (Guest, Vec<String>);

/// Stage 1: boots each VM with its share of `bdfs` and has its guest drive them once; with
/// `--cancel-first`, a prepare called off.
fn boot_all(
    plan: &Plan,
    bdfs: &[String],
    work: &Path,
    agent_socket: &Path,
) -> Result<Vec<GuestWithDevices>, StepError> {
    let mut guests = Vec::new();
    for index in 0..plan.vms as usize {
        let vm = vm_id(index);
        let devices = plan.share(bdfs, index);
        emit(&phase(&vm, "boot"));
        let guest = match plan.guest {
            GuestKind::Payload => Guest::boot(
                work,
                &vm,
                Path::new(L1_PAYLOAD),
                plan.memory_mib,
                devices,
                plan.thp,
            )?,
            GuestKind::Linux => Guest::boot_linux(
                work,
                &vm,
                plan.memory_mib,
                devices,
                plan.vfio_handler,
                plan.thp,
            )?,
        };
        if plan.guest == GuestKind::Payload {
            emit(&phase(&vm, "dma"));
            guest.device_round()?;
        }
        guests.push((guest, devices.to_vec()));
    }
    if plan.cancel_first {
        cancel_round(plan, &guests, agent_socket)?;
    }
    Ok(guests)
}

/// Stage N > 1: starts the agent and, beside it, each VM's restore of round `round`; then
/// waits for each guest to run and checks it, with its share of `bdfs`.
fn restore_all(
    round: u32,
    plan: &Plan,
    bdfs: &[String],
    work: &Path,
    agent_socket: &Path,
) -> Result<(Agent, Vec<GuestWithDevices>), StepError> {
    emit(&phase(HOST_ROW, "agent"));
    let mut agent = Agent::spawn(work, agent_socket)?;
    // Each VM's restore starts beside the agent, as an init system starts them: it asks KVM
    // what it needs and makes its KVM VM while the agent starts, then claims its session.
    let mut started = Vec::new();
    for index in 0..plan.vms as usize {
        let vm = vm_id(index);
        emit(&phase(&vm, "restore"));
        started.push(Guest::start_restore(
            work,
            &vm,
            plan.guest,
            agent_socket,
            plan.test_faults.as_deref(),
        )?);
    }
    agent.wait_answering(work, agent_socket)?;
    emit(&phase(HOST_ROW, "running"));
    let mut guests = Vec::new();
    for (index, guest) in started.into_iter().enumerate() {
        let devices = plan.share(bdfs, index).to_vec();
        let guest = restored(round, plan, guest)?;
        guests.push((guest, devices));
    }
    Ok((agent, guests))
}

/// `--cancel-first`: prepare, call off, and let each guest show it went on in place.
fn cancel_round(
    plan: &Plan,
    guests: &[(Guest, Vec<String>)],
    agent_socket: &Path,
) -> Result<(), StepError> {
    let mut before = Vec::new();
    for (guest, _) in guests {
        before.push(guest.check()?);
        emit(&phase(&guest.vm, "prepare"));
        guest.prepare(agent_socket, plan.vfio_handler != VfioHandler::Off)?;
        emit(&phase(&guest.vm, "paused"));
    }
    for (guest, _) in guests {
        emit(&phase(&guest.vm, "cancel"));
        guest.cancel()?;
    }
    went_on(1, guests, before)
}

/// After an update was called off: each guest must run on in place, check itself and drive
/// its devices again.
fn went_on(
    round: u32,
    guests: &[(Guest, Vec<String>)],
    before: Vec<String>,
) -> Result<(), StepError> {
    for ((guest, devices), check_before) in guests.iter().zip(before) {
        emit(&phase(&guest.vm, "check"));
        guest.wait_running()?;
        let check_after = guest.check()?;
        let device_rounds = guest.device_round()?;
        emit(&Event::Cancelled {
            round,
            vm: guest.vm.clone(),
            devices: devices.clone(),
            check_before,
            check_after,
            device_rounds,
        });
        emit(&phase(&guest.vm, "running"));
    }
    Ok(())
}

/// Round `round`'s first half: pre-flight, prepare every VM, kexec.
fn update(
    round: u32,
    plan: &Plan,
    guests: &[(Guest, Vec<String>)],
    agent_socket: &Path,
) -> Result<(), StepError> {
    let cmdline = next_cmdline(round + 1)?;
    emit(&phase(HOST_ROW, "preflight"));
    let next_initrd = Path::new(WORK).join("next-initrd");
    let staged = bed::read(Path::new(L1_STAGED_INITRD))?;
    let next_kernel = bed::read(Path::new(L1_NEXT_KERNEL))?;
    bed::write(&next_initrd, &with_boot(&staged, &next_kernel)?)?;
    drop((staged, next_kernel));
    let report = preflight::run(&CheckArgs {
        kernel: PathBuf::from(L1_NEXT_KERNEL),
        initrd: Some(next_initrd.clone()),
        cmdline: Some(cmdline.clone()),
        append: None,
        agent_socket: agent_socket.to_path_buf(),
        vms: guests.iter().map(|(g, _)| g.socket.clone()).collect(),
        // The drill is how an operator finds out whether the pair is good: it runs the
        // update and lets the guests judge.
        known_good_kernel: true,
        holder: preflight::HostHolder::Agent,
    });
    emit(&Event::Preflight {
        round,
        report: report.clone(),
    });
    if !report.blockers.is_empty() {
        return Err(StepError::Blocked(luvmm_vmm::update::check::Blocker::join(
            &report.blockers,
        )));
    }
    let mut before = Vec::new();
    for (guest, _) in guests {
        before.push(guest.check()?);
    }
    let bdfs: Vec<String> = guests.iter().flat_map(|(_, d)| d.iter().cloned()).collect();
    let mut watch = SpanWatch::start(round, WatchSpan::PrepareToKexec, &bdfs)?;
    let asked = prepare_all(round, plan, guests, before, agent_socket).and_then(|()| {
        emit(&phase(HOST_ROW, "kexec"));
        AgentClient::new(agent_socket).update(
            Path::new(L1_NEXT_KERNEL),
            Some(&next_initrd),
            Some(&cmdline),
            None,
        )?;
        Ok(())
    });
    if let Err(e) = asked {
        return watch.close(Err(e));
    }
    // The guests stay as they are (dropping one would shut its VMM down) until the kexec,
    // which ends this stage without warning: what the watch sees goes out as it comes.
    let deadline = Instant::now() + KEXEC_WAIT;
    while Instant::now() < deadline {
        watch.report()?;
        std::thread::sleep(WATCH_REPORT_EVERY);
    }
    watch.close(Err(StepError::NoKexec))
}

/// Puts every VM into its session as `luvmm update run` does (every VM staged while its
/// guest runs, then all prepared together); if one fails, the update is off for every VM, and
/// each guest must show it went on in place.
fn prepare_all(
    round: u32,
    plan: &Plan,
    guests: &[(Guest, Vec<String>)],
    before: Vec<String>,
    agent_socket: &Path,
) -> Result<(), StepError> {
    let vms: Vec<HostVm> = guests
        .iter()
        .map(|(guest, _)| HostVm {
            vm: guest.vm.clone(),
            socket: guest.socket.clone(),
        })
        .collect();
    let shmem_huge_kib = shmem_huge_kib();
    let checks: Vec<(&str, &str)> = guests
        .iter()
        .zip(&before)
        .map(|((guest, _), check)| (guest.vm.as_str(), check.as_str()))
        .collect();
    let progress = |step: Progress<'_>| match step {
        Progress::Prepared(run) => {
            emit(&phase(&run.vm, "paused"));
            if let Some(report) = run.prepare.clone() {
                let check_before = checks
                    .iter()
                    .find(|(vm, _)| *vm == run.vm)
                    .map(|(_, check)| check.to_string())
                    .unwrap_or_default();
                emit(&Event::Prepared {
                    round,
                    vm: run.vm.clone(),
                    check_before,
                    report,
                    shmem_huge_kib,
                });
            }
        }
        Progress::Staged(run) => emit(&phase(&run.vm, "staged")),
        Progress::Preparing(run) => emit(&phase(&run.vm, "prepare")),
        Progress::Failed(_) | Progress::CallingOff { .. } | Progress::LeftInPlace(_) => {}
    };
    for (guest, _) in guests {
        emit(&phase(&guest.vm, "stage"));
    }
    let barrier = stage_and_prepare(
        &vms,
        &BarrierOptions {
            agent_socket,
            require_preserved_devices: plan.vfio_handler != VfioHandler::Off,
            deadline: Instant::now() + PREPARE_DEADLINE,
        },
        &progress,
    );
    match barrier.result {
        Ok(()) => Ok(()),
        Err(why) => {
            // Every VM's update is called off already; each guest must show it went on.
            went_on(round, guests, before)?;
            Err(StepError::CalledOff(why))
        }
    }
}

/// How long every VM of a drill may take to be staged and prepared, under TCG.
const PREPARE_DEADLINE: Duration = Duration::from_secs(600);

/// Round `round`'s second half for one VM: restore it from its session (the open watcher
/// runs from the agent's start), then its guest's own evidence.
fn restored(round: u32, plan: &Plan, guest: Guest) -> Result<Guest, StepError> {
    guest.wait_running()?;
    let vm = guest.vm.clone();
    let vm = vm.as_str();
    emit(&phase(vm, "check"));
    let timings = guest.status()?.restore_timings.unwrap_or_default();
    let (recovery_checks, check_after) = match plan.guest {
        GuestKind::Payload => (Vec::new(), guest.check()?),
        GuestKind::Linux => linux_checks_after(&guest, plan)?,
    };
    let device_rounds = guest.device_round()?;
    emit(&Event::Restored {
        round,
        vm: vm.to_string(),
        recovery_checks,
        check_after,
        device_rounds,
        timings,
        shmem_huge_kib: shmem_huge_kib(),
    });
    emit(&phase(vm, "running"));
    Ok(guest)
}

/// A resumed Linux guest's I/O loop and clock sampler run on this long before its first check.
const LINUX_SETTLE: Duration = Duration::from_secs(6);
/// How often, and how long at most, a drill asks a Linux guest whose devices came back reset
/// whether its driver has recovered.
const LINUX_RECOVERY_POLL: Duration = Duration::from_secs(5);
const LINUX_RECOVERY_WAIT: Duration = Duration::from_secs(180);

/// A restored Linux guest's checks since its resume: every one before the last (the restore
/// asks for one itself, and the drill asks again while the guest's driver recovers a device
/// that came back reset, until a check's span ran smoothly or the wait is over), then the
/// last. Each check's stall and gap cover only its own span, so all of them count.
fn linux_checks_after(guest: &Guest, plan: &Plan) -> Result<(Vec<String>, String), StepError> {
    std::thread::sleep(LINUX_SETTLE);
    let (mut line, mut last) = guest.linux_check()?;
    if plan.vfio_handler.resets_devices() && plan.devices > 0 {
        let deadline = Instant::now() + LINUX_RECOVERY_WAIT;
        while Instant::now() < deadline {
            std::thread::sleep(LINUX_RECOVERY_POLL);
            let (next_line, next) = guest.linux_check()?;
            line = next_line;
            let smooth = next.ran_smoothly_since(&last);
            last = next;
            if smooth {
                break;
            }
        }
    }
    // This kernel's serial log began with the restore: every check in it is after the update.
    let mut checks = guest.lines(LINUX_CHECK);
    if let Some(at) = checks.iter().position(|c| *c == line) {
        checks.truncate(at);
    }
    Ok((checks, line))
}

/// The open watcher over one span of round `round`, which it reports as [`Event::Watched`].
struct SpanWatch {
    round: u32,
    span: WatchSpan,
    watch: OpenWatch,
    /// What the last report said.
    reported: Option<Opens>,
}

impl SpanWatch {
    /// Arms the watch on `bdfs` and reports it armed (nothing seen yet).
    fn start(round: u32, span: WatchSpan, bdfs: &[String]) -> Result<SpanWatch, StepError> {
        let mut watch = SpanWatch {
            round,
            span,
            watch: OpenWatch::start(bdfs)?,
            reported: None,
        };
        watch.report()?;
        Ok(watch)
    }

    /// Reports what the watch saw, if it saw more since the last report.
    fn report(&mut self) -> Result<(), StepError> {
        let opens = self.watch.seen()?;
        if self.reported.as_ref() != Some(&opens) {
            self.emit(opens.clone());
            self.reported = Some(opens);
        }
        Ok(())
    }

    fn emit(&self, opens: Opens) {
        emit(&Event::Watched {
            round: self.round,
            span: self.span,
            opens,
        });
    }

    /// Ends the span, whose steps came to `outcome`, and reports what the watch saw whatever
    /// the outcome. A watch that cannot be read fails a span that had not failed already, and
    /// is reported as a failure of its own beside one that had.
    fn close<T>(self, outcome: Result<T, StepError>) -> Result<T, StepError> {
        let round = self.round;
        let span = self.span;
        match self.watch.finish() {
            Ok(opens) => emit(&Event::Watched { round, span, opens }),
            Err(e) if outcome.is_ok() => return Err(e.into()),
            Err(e) => emit(&Event::Failure {
                round,
                vm: None,
                what: error_chain(&StepError::from(e)),
            }),
        }
        outcome
    }
}

/// The agent, run as its own process as on a real host; killed when the stage ends without
/// a kexec.
struct Agent(Child);

impl Agent {
    fn start(work: &Path, socket: &Path) -> Result<Agent, StepError> {
        emit(&phase(HOST_ROW, "agent"));
        let mut agent = Agent::spawn(work, socket)?;
        agent.wait_answering(work, socket)?;
        emit(&phase(HOST_ROW, "running"));
        Ok(agent)
    }

    fn spawn(work: &Path, socket: &Path) -> Result<Agent, StepError> {
        let log = work.join("agent.err");
        let err = std::fs::File::create(&log)
            .map_err(|e| StepError::Io(format!("create {}", log.display()), e))?;
        let child = luvmm()
            .args(["agent", "serve", "--socket"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| StepError::Io("start luvmm agent".into(), e))?;
        Ok(Agent(child))
    }

    /// Waits up to 30 s until the agent answers on `socket`; its log (in `work`) says why
    /// if it exits first.
    fn wait_answering(&mut self, work: &Path, socket: &Path) -> Result<(), StepError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while AgentClient::new(socket).status().is_err() {
            if let Ok(Some(status)) = self.0.try_wait() {
                let log = std::fs::read_to_string(work.join("agent.err")).unwrap_or_default();
                return Err(StepError::Agent(format!("exited ({status}): {log}")));
            }
            if Instant::now() > deadline {
                return Err(StepError::Agent("no answer within 30 s".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// This kernel's command line with the stage set to `stage`.
fn next_cmdline(stage: u32) -> Result<String, StepError> {
    let current = kexec::current_cmdline()
        .map_err(|e| StepError::Io("read /proc/cmdline".into(), std::io::Error::other(e)))?;
    Ok(with_stage(&current, stage))
}

fn with_stage(cmdline: &str, stage: u32) -> String {
    let mut words: Vec<String> = cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("luvmm.stage="))
        .map(str::to_string)
        .collect();
    words.push(format!("luvmm.stage={stage}"));
    words.join(" ")
}

/// `ShmemHugePages` of /proc/meminfo in KiB (0 without THP): shmem, memfds included, held in
/// PMD-sized folios.
fn shmem_huge_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("ShmemHugePages:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn phase(row: &str, phase: &str) -> Event {
    Event::Phase {
        row: row.to_string(),
        phase: phase.to_string(),
    }
}

/// Prints `event` on the console, where the host half reads it.
fn emit(event: &Event) {
    println!("{}", event.to_line());
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_stage_replaces_the_stage_word() {
        assert_eq!(
            with_stage("console=ttyS0 luvmm.stage=1 liveupdate=on", 2),
            "console=ttyS0 liveupdate=on luvmm.stage=2"
        );
        assert_eq!(
            with_stage("console=ttyS0", 2),
            "console=ttyS0 luvmm.stage=2"
        );
    }
}
