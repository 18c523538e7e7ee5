//! Before the kexec: put everything the VM needs into its LUO session.
//!
//! 1. Stage the VM if it is not staged yet (`stage.rs`): the pre-flight, the subscription and
//!    the RAM preserve, **while the guest runs**.
//! 2. Pause; turn every device's VFIO interrupts off and check it is in D0 (a preserved device
//!    must have none enabled when the kernel freezes it).
//! 3. Preserve each device's cdev; a kernel without a VFIO handler says ENOENT, and the
//!    device is then opened again after the kexec (refused instead with
//!    `require_preserved_devices`).
//! 4. Save the state, with the token map and every phase's time, into the state memfd, and
//!    preserve it last, so it describes everything before it.
//! 5. Tell the agent the VM is ready; it stays paused until the kexec.
//!
//! Any failure calls the update off (`cancel.rs`) and the guest resumes where it was.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::time::Instant;

use luvmm_liveupdate::agent::ledger::now_ms;
use luvmm_liveupdate::luo::{LuoError, Token};
use luvmm_liveupdate::seams::{PreserveSession, UpdateAgent};
use luvmm_resources::errors::error_chain;
use luvmm_resources::state::{UpdateRecord, DEVICE_TOKEN_BASE, STATE_TOKEN};
use serde::{Deserialize, Serialize};

use crate::passthrough::DeviceFile;
use crate::update::cancel::call_off;
use crate::update::stage::{stage, Staged};
use crate::update::vm::UpdateVm;
use crate::update::UpdateError;
use crate::vmm::{PreparedUpdate, VmPhase, VmmError};

/// How a prepare went, device by device and phase by phase.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrepareReport {
    pub vm_id: String,
    pub session: String,
    pub devices: Vec<DeviceReport>,
    pub ram_mib: u64,
    /// Milliseconds per phase: `preserve_ram` (guest running), then the blackout's
    /// `pause`, `quiesce_devices`, `preserve_devices`, `save_state`, `preserve_state`, `ready`.
    pub phases_ms: BTreeMap<String, f64>,
    /// The pre-flight's warnings (a device this kernel cannot preserve, say).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// One passthrough device in a prepare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    pub bdf: String,
    /// The kernel preserved its cdev; otherwise it is opened again after the kexec.
    pub preserved: bool,
}

/// What an operator asks for.
pub struct PrepareOptions<'a> {
    pub vm_id: &'a str,
    /// Refuse (and call the update off) when a device cannot be preserved.
    pub require_preserved_devices: bool,
}

/// Prepares the running VM for a host live update (steps above), from its stage if it was
/// staged under the same id. On success the VM is `Preserved`: paused, everything in its
/// session, waiting for the kexec or a cancel; it holds the session and its agent until then.
pub fn prepare(
    vm: &mut impl UpdateVm,
    agent: Box<dyn UpdateAgent>,
    options: &PrepareOptions<'_>,
) -> Result<PrepareReport, UpdateError> {
    if !matches!(vm.phase(), VmPhase::Running | VmPhase::Paused) {
        return Err(VmmError::WrongPhase {
            request: "prepare an update",
            phase: vm.phase(),
        }
        .into());
    }
    match vm.prepared().as_ref() {
        None => {
            stage(vm, agent, options)?;
        }
        Some(held) if held.vm_id != options.vm_id => {
            return Err(UpdateError::StagedAs {
                staged: held.vm_id.clone(),
                asked: options.vm_id.to_string(),
            })
        }
        Some(_) => {}
    }
    let Some(prepared) = vm.prepared().take() else {
        return Err(VmmError::WrongPhase {
            request: "prepare an update",
            phase: vm.phase(),
        }
        .into());
    };
    let was_running = vm.phase() == VmPhase::Running;
    match preserve_the_rest(vm, &prepared, options) {
        Ok(report) => {
            *vm.prepared() = Some(prepared);
            vm.set_phase(VmPhase::Preserved);
            log::info!(
                "update prepared: session {}, {} device(s), {} of them preserved",
                report.session,
                report.devices.len(),
                report.devices.iter().filter(|d| d.preserved).count()
            );
            Ok(report)
        }
        Err(e) => {
            log::warn!(
                "update preparation failed, calling it off: {}",
                error_chain(&e)
            );
            call_off(vm, prepared, was_running);
            Err(e)
        }
    }
}

/// Milliseconds per phase, each from the end of the one before.
struct Phases {
    ms: BTreeMap<String, f64>,
    lap: Instant,
}

impl Phases {
    /// Starts after the stage, whose RAM preserve is the first phase.
    fn after(staged: &Staged) -> Phases {
        Phases {
            ms: BTreeMap::from([("preserve_ram".to_string(), staged.preserve_ram_ms)]),
            lap: Instant::now(),
        }
    }

    fn done(&mut self, name: &str) {
        let now = Instant::now();
        self.ms
            .insert(name.to_string(), (now - self.lap).as_secs_f64() * 1e3);
        self.lap = now;
    }
}

fn preserve_the_rest(
    vm: &mut impl UpdateVm,
    prepared: &PreparedUpdate,
    options: &PrepareOptions<'_>,
) -> Result<PrepareReport, UpdateError> {
    let session = prepared.session.as_ref();
    let mut phases = Phases::after(&prepared.staged);
    let mut times = BTreeMap::from([("prepare".to_string(), prepared.staged.at_ms)]);
    times.insert("pause".into(), now_ms());
    vm.pause()?;
    phases.done("pause");
    vm.quiesce_devices()?;
    phases.done("quiesce_devices");
    let files = vm.device_files().map_err(UpdateError::DeviceFds)?;
    let (devices, device_tokens) =
        preserve_devices(&files, session, options.require_preserved_devices)?;
    phases.done("preserve_devices");
    times.insert("saved".into(), now_ms());
    let update = UpdateRecord {
        vm_id: prepared.vm_id.clone(),
        device_tokens,
        times_ms: times,
    };
    let state_memfd = vm.save_for_update(update)?;
    phases.done("save_state");
    session.preserve(state_memfd.as_fd(), STATE_TOKEN)?;
    phases.done("preserve_state");
    let bdfs: Vec<String> = devices.iter().map(|d| d.bdf.clone()).collect();
    prepared.agent.ready(&prepared.vm_id, &bdfs)?;
    phases.done("ready");
    Ok(PrepareReport {
        vm_id: prepared.vm_id.clone(),
        session: session.name().to_string(),
        devices,
        ram_mib: vm.ram_mib(),
        phases_ms: phases.ms,
        warnings: prepared.staged.warnings.clone(),
    })
}

/// Preserves each device's file under its token (`DEVICE_TOKEN_BASE + index`). One the
/// kernel has no handler for (ENOENT), or on the legacy container, is not preserved and is
/// opened again after the kexec, unless `require_preserved` refuses that. Returns the
/// report and the token map the state records (`None`: not preserved).
fn preserve_devices(
    files: &[DeviceFile],
    session: &dyn PreserveSession,
    require_preserved: bool,
) -> Result<(Vec<DeviceReport>, Vec<Option<Token>>), UpdateError> {
    let mut devices = Vec::with_capacity(files.len());
    let mut tokens = Vec::with_capacity(files.len());
    for (index, device) in files.iter().enumerate() {
        let token = DEVICE_TOKEN_BASE + index as u64;
        let preserved = match &device.fd {
            None => false,
            Some(fd) => match session.preserve(fd.as_fd(), token) {
                Ok(()) => true,
                Err(LuoError::NotPreservable { .. }) => false,
                Err(e) => return Err(e.into()),
            },
        };
        if !preserved {
            if require_preserved {
                return Err(UpdateError::DeviceNotPreserved {
                    bdf: device.bdf.clone(),
                });
            }
            log::warn!(
                "{}: not preserved (this kernel has no LUO handler for it): it will be \
                 opened again after the kexec, and its own state is lost",
                device.bdf
            );
        }
        tokens.push(preserved.then_some(token));
        devices.push(DeviceReport {
            bdf: device.bdf.clone(),
            preserved,
        });
    }
    Ok((devices, tokens))
}
