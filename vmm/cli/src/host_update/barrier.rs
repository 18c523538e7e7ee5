//! Every VM of the host into its session, together: first each VM is **staged** while its
//! guest runs (its RAM preserved, the slow part), all in parallel; only when every one is
//! staged are they **prepared** together (pause, devices, state, ready). So no VM's blackout
//! holds another VM's RAM preserve, and a VM prepared early does not wait paused for the
//! others. Any failure, or the deadline, calls the update off for every VM, each guest left
//! as it was (a prepared one resumed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use luvmm_liveupdate::agent::ledger::now_ms;
use luvmm_resources::errors::error_chain;
use luvmm_vmm::api::client::{ClientError, VmmClient};
use luvmm_vmm::update::prepare::PrepareReport;
use luvmm_vmm::update::stage::StageReport;
use luvmm_vmm::vmm::VmPhase;
use serde::{Deserialize, Serialize};

/// One VM of the host: its id (its session is `luvmm-<id>`) and its VMM's API socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVm {
    pub vm: String,
    pub socket: PathBuf,
}

/// How the VMs go into their sessions.
pub struct BarrierOptions<'a> {
    pub agent_socket: &'a Path,
    pub require_preserved_devices: bool,
    /// After this, nothing more is asked of a VMM and the update is called off.
    pub deadline: Instant,
}

/// One VM's way through the barrier, for the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmRun {
    pub vm: String,
    pub socket: PathBuf,
    /// When each step began or ended, in ms since the Unix epoch: `stage`, `staged`,
    /// `prepare`, `prepared`, `call_off`, `called_off`.
    pub times_ms: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<StageReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare: Option<PrepareReport>,
    /// Why its stage or prepare failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// After a call-off: where the guest is (`running`, `paused`), or why that is not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<String>,
}

impl VmRun {
    /// `vm`, nothing done yet.
    pub fn of(vm: &HostVm) -> VmRun {
        VmRun {
            vm: vm.vm.clone(),
            socket: vm.socket.clone(),
            ..VmRun::default()
        }
    }
}

/// Something worth telling the operator while the barrier runs.
pub enum Progress<'a> {
    Staged(&'a VmRun),
    /// Its prepare begins: the guest is about to be paused.
    Preparing(&'a VmRun),
    Prepared(&'a VmRun),
    Failed(&'a VmRun),
    CallingOff {
        reason: &'a str,
    },
    LeftInPlace(&'a VmRun),
}

/// Why the update was called off before the kexec.
#[derive(Debug, thiserror::Error)]
pub enum CalledOff {
    #[error("VM {vm} could not be {step}: {reason}")]
    VmFailed {
        vm: String,
        step: &'static str,
        reason: String,
    },
    #[error("the deadline passed before every VM was {step}")]
    Deadline { step: &'static str },
}

/// What the barrier left: every VM's run, and whether all are now `preserved`.
pub struct BarrierOutcome {
    pub vms: Vec<VmRun>,
    pub result: Result<(), CalledOff>,
    /// After a call-off: every guest is back as it was (running or paused, holding nothing).
    pub all_in_place: bool,
}

/// Stages, then prepares, every VM in `vms` (see the module's doc).
pub fn stage_and_prepare(
    vms: &[HostVm],
    options: &BarrierOptions<'_>,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> BarrierOutcome {
    let mut runs: Vec<VmRun> = vms.iter().map(VmRun::of).collect();
    let mut result = step_all(&mut runs, options, Step::Stage, progress);
    if result.is_ok() {
        result = step_all(&mut runs, options, Step::Prepare, progress);
    }
    let all_in_place = match &result {
        Ok(()) => false,
        Err(why) => {
            progress(Progress::CallingOff {
                reason: &why.to_string(),
            });
            call_off_all(&mut runs, progress)
        }
    };
    BarrierOutcome {
        vms: runs,
        result,
        all_in_place,
    }
}

#[derive(Clone, Copy)]
enum Step {
    Stage,
    Prepare,
}

impl Step {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Step::Stage => ("stage", "staged"),
            Step::Prepare => ("prepare", "prepared"),
        }
    }
}

/// Runs `step` on every VM at once, one thread each; the first failure in VM order is the
/// one reported.
fn step_all(
    runs: &mut [VmRun],
    options: &BarrierOptions<'_>,
    step: Step,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<(), CalledOff> {
    let done = step.names().1;
    let failures: Vec<(String, Failure)> = std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter_mut()
            .map(|run| scope.spawn(move || step_one(run, options, step, progress)))
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok()?.err())
            .collect()
    });
    match failures.into_iter().next() {
        None => Ok(()),
        Some((_, Failure::Deadline)) => Err(CalledOff::Deadline { step: done }),
        Some((vm, Failure::Vm(reason))) => Err(CalledOff::VmFailed {
            vm,
            step: done,
            reason,
        }),
    }
}

/// Why one VM's step failed.
enum Failure {
    /// The deadline came first.
    Deadline,
    /// Its VMM refused or failed, as said.
    Vm(String),
}

/// What a VM's `error` says when the deadline came first.
const DEADLINE: &str = "the deadline passed first";

/// Runs `step` on `run`'s VM; a failure is also written in `run.error` for the report, with
/// the VM's id.
fn step_one(
    run: &mut VmRun,
    options: &BarrierOptions<'_>,
    step: Step,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<(), (String, Failure)> {
    let (begun, done) = step.names();
    let failed = |run: &mut VmRun, failure: Failure| {
        run.error = Some(match &failure {
            Failure::Deadline => DEADLINE.to_string(),
            Failure::Vm(reason) => reason.clone(),
        });
        progress(Progress::Failed(run));
        Err((run.vm.clone(), failure))
    };
    let Some(left) = options.deadline.checked_duration_since(Instant::now()) else {
        return failed(run, Failure::Deadline);
    };
    let client = VmmClient::new(&run.socket).with_timeout(left.max(Duration::from_millis(1)));
    run.times_ms.insert(begun.into(), now_ms());
    if let Step::Prepare = step {
        progress(Progress::Preparing(run));
    }
    let outcome = match step {
        Step::Stage => client
            .stage_update(
                &run.vm,
                options.agent_socket,
                options.require_preserved_devices,
            )
            .map(|report| run.stage = Some(report)),
        Step::Prepare => client
            .prepare_update(
                &run.vm,
                options.agent_socket,
                options.require_preserved_devices,
            )
            .map(|report| run.prepare = Some(report)),
    };
    match outcome {
        Ok(()) => {
            run.times_ms.insert(done.into(), now_ms());
            progress(match step {
                Step::Stage => Progress::Staged(run),
                Step::Prepare => Progress::Prepared(run),
            });
            Ok(())
        }
        Err(ClientError::Timeout { .. }) => failed(run, Failure::Deadline),
        Err(e) => failed(run, Failure::Vm(error_chain(&e))),
    }
}

/// How long a call-off may take per VM: it releases the session and resumes the guest.
const CALL_OFF_WAIT: Duration = Duration::from_secs(30);

/// Calls the update off on every VM (one holding nothing is left alone) and says where each
/// guest is; true when every one is back as it was.
pub fn call_off_all(runs: &mut [VmRun], progress: &(dyn Fn(Progress<'_>) + Sync)) -> bool {
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter_mut()
            .map(|run| {
                scope.spawn(move || {
                    let in_place = call_off_one(run);
                    progress(Progress::LeftInPlace(run));
                    in_place
                })
            })
            .collect();
        handles.into_iter().all(|h| h.join().unwrap_or(false))
    })
}

fn call_off_one(run: &mut VmRun) -> bool {
    run.times_ms.insert("call_off".into(), now_ms());
    let client = VmmClient::new(&run.socket).with_timeout(CALL_OFF_WAIT);
    let holds = |client: &VmmClient| {
        client.status().map(|s| {
            (
                s.phase,
                s.update_vm_id.is_some() || s.phase == VmPhase::Preserved,
            )
        })
    };
    let in_place = match holds(&client) {
        Ok((_, false)) => Ok(()),
        Ok((_, true)) => client.cancel_update(),
        Err(e) => Err(e),
    }
    .and_then(|()| holds(&client));
    run.times_ms.insert("called_off".into(), now_ms());
    match in_place {
        Ok((phase, false)) => {
            run.left = Some(phase.to_string());
            true
        }
        Ok((phase, true)) => {
            run.left = Some(format!("{phase}, still holding its update"));
            false
        }
        Err(e) => {
            run.left = Some(format!("unknown: {}", error_chain(&e)));
            false
        }
    }
}
