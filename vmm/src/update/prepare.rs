//! Before the kexec: put everything the VM needs into its LUO session, or call it off.
//!
//! 0. The VM's part of the pre-flight (`check.rs`): the memfd handler, every device on
//!    iommufd and in D0, and with `require_preserved_devices` a handler for each. A refusal
//!    here has touched nothing.
//! 1. Subscribe to the agent (it creates session `luvmm-<vm id>` and keeps a copy).
//! 2. Preserve every RAM memfd **while the guest runs**: PRESERVE_FD pins and fills every
//!    page (about 4 ms/MiB in the bed), which must not be in the blackout.
//! 3. Pause; turn every device's VFIO interrupts off and check it is in D0 (a preserved device
//!    must have none enabled when the kernel freezes it).
//! 4. Preserve each device's cdev; a kernel without a VFIO handler says ENOENT, and the
//!    device is then opened again after the kexec (refused instead with
//!    `require_preserved_devices`).
//! 5. Save the state, with the token map and every phase's time, into the state memfd, and
//!    preserve it last, so it describes everything before it.
//! 6. Tell the agent the VM is ready; it stays paused until the kexec.
//!
//! Any failure calls the update off: the agent releases its copy, this process closes its
//! own (the kernel unpreserves everything once both are gone), interrupts are turned back on
//! and the guest resumes where it was. When the failure is the kexec itself, after the kernel
//! froze (and in its reset mode, reset) some devices, each of those gives EIO from then on:
//! it is closed and opened again under the guest's view of it before the guest resumes.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use luvmm_liveupdate::agent::ledger::now_ms;
use luvmm_liveupdate::agent::{AgentClient, VmPhase as AgentPhase};
use luvmm_liveupdate::{LuoError, OutgoingSession};
use luvmm_resources::state::{UpdateRecord, DEVICE_TOKEN_BASE, RAM_TOKEN_BASE, STATE_TOKEN};
use serde::{Deserialize, Serialize};

use crate::api::error_chain;
use crate::update::UpdateError;
use crate::vmm::{VmPhase, Vmm, VmmError};

/// What a prepared update holds until the kexec or a cancel.
pub struct PreparedUpdate {
    pub(crate) vm_id: String,
    pub(crate) agent_socket: PathBuf,
    /// This process's copy of the session: closing it (and the agent's) unpreserves all.
    pub(crate) session: OutgoingSession,
}

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
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceReport {
    pub bdf: String,
    /// The kernel preserved its cdev; otherwise it is opened again after the kexec.
    pub preserved: bool,
}

/// What an operator asks for.
pub struct PrepareOptions<'a> {
    pub vm_id: &'a str,
    pub agent_socket: &'a Path,
    /// Refuse (and call the update off) when a device cannot be preserved.
    pub require_preserved_devices: bool,
}

impl Vmm {
    /// Prepares the running VM for a host live update (steps above). On success the VM is
    /// `Preserved`: paused, everything in its session, waiting for the kexec or a cancel.
    pub fn prepare_update(
        &mut self,
        options: &PrepareOptions<'_>,
    ) -> Result<PrepareReport, VmmError> {
        if !matches!(self.phase(), VmPhase::Running | VmPhase::Paused) {
            return Err(self.refuse("prepare an update"));
        }
        let preflight = self.check_update(options.agent_socket)?;
        preflight.refuse_prepare(options.require_preserved_devices)?;
        let agent = AgentClient::new(options.agent_socket);
        let session = agent.subscribe(options.vm_id).map_err(UpdateError::Agent)?;
        let prepared = PreparedUpdate {
            vm_id: options.vm_id.to_string(),
            agent_socket: options.agent_socket.to_path_buf(),
            session,
        };
        let was_running = self.phase() == VmPhase::Running;
        match self.preserve_all(&prepared, options, &agent) {
            Ok(mut report) => {
                report.warnings = preflight.warnings;
                self.set_update(prepared);
                self.set_phase(VmPhase::Preserved);
                log::info!(
                    "update prepared: session {}, {} device(s), {} of them preserved",
                    report.session,
                    report.devices.len(),
                    report.devices.iter().filter(|d| d.preserved).count()
                );
                Ok(report)
            }
            Err(e) => {
                log::warn!("update preparation failed, calling it off: {e}");
                self.call_off(prepared, was_running);
                Err(e)
            }
        }
    }

    fn preserve_all(
        &mut self,
        prepared: &PreparedUpdate,
        options: &PrepareOptions<'_>,
        agent: &AgentClient,
    ) -> Result<PrepareReport, VmmError> {
        let session = &prepared.session;
        let mut phases = BTreeMap::new();
        let mut times = BTreeMap::from([("prepare".to_string(), now_ms())]);
        let mut lap = Instant::now();
        let mut record = |phases: &mut BTreeMap<String, f64>, name: &str| {
            phases.insert(name.to_string(), lap.elapsed().as_secs_f64() * 1e3);
            lap = Instant::now();
        };
        for (index, memfd) in self.ram().memfds().iter().enumerate() {
            session
                .preserve(memfd.as_fd(), RAM_TOKEN_BASE + index as u64)
                .map_err(UpdateError::Luo)?;
        }
        record(&mut phases, "preserve_ram");
        times.insert("pause".into(), now_ms());
        self.pause()?;
        record(&mut phases, "pause");
        for (_, device) in &self.devices().passthrough.devices {
            let mut device = device.lock().unwrap_or_else(|p| p.into_inner());
            if !device.in_d0() {
                return Err(UpdateError::NotInD0 {
                    bdf: device.bdf().to_string(),
                }
                .into());
            }
            device
                .quiesce_interrupts(true)
                .map_err(UpdateError::Device)?;
        }
        record(&mut phases, "quiesce_devices");
        let mut devices = Vec::new();
        let mut device_tokens = Vec::new();
        for (index, (_, device)) in self.devices().passthrough.devices.iter().enumerate() {
            let device = device.lock().unwrap_or_else(|p| p.into_inner());
            let bdf = device.bdf().to_string();
            let token = DEVICE_TOKEN_BASE + index as u64;
            let preserved = match device.device_fd() {
                None => false,
                Some(fd) => match session.preserve(fd, token) {
                    Ok(()) => true,
                    Err(LuoError::NotPreservable { .. }) => false,
                    Err(e) => return Err(UpdateError::Luo(e).into()),
                },
            };
            if !preserved {
                if options.require_preserved_devices {
                    return Err(UpdateError::DeviceNotPreserved { bdf }.into());
                }
                log::warn!(
                    "{bdf}: not preserved (this kernel has no LUO handler for it): it will be \
                     opened again after the kexec, and its own state is lost"
                );
            }
            device_tokens.push(preserved.then_some(token));
            devices.push(DeviceReport { bdf, preserved });
        }
        record(&mut phases, "preserve_devices");
        times.insert("saved".into(), now_ms());
        let update = UpdateRecord {
            vm_id: prepared.vm_id.clone(),
            device_tokens,
            times_ms: times,
        };
        let state_memfd = self.save_for_update(update)?;
        record(&mut phases, "save_state");
        session
            .preserve(state_memfd.as_fd(), STATE_TOKEN)
            .map_err(UpdateError::Luo)?;
        record(&mut phases, "preserve_state");
        let bdfs: Vec<String> = devices.iter().map(|d| d.bdf.clone()).collect();
        agent
            .ready(&prepared.vm_id, &bdfs)
            .map_err(UpdateError::Agent)?;
        record(&mut phases, "ready");
        Ok(PrepareReport {
            vm_id: prepared.vm_id.clone(),
            session: session.name().to_string(),
            devices,
            ram_mib: self.ram().layout().total_bytes() >> 20,
            phases_ms: phases,
            warnings: Vec::new(),
        })
    }

    /// Calls a prepared update off (`luvmm ctl update cancel`): the session goes, the devices'
    /// interrupts come back, and the guest resumes where it was.
    pub fn cancel_update(&mut self) -> Result<(), VmmError> {
        match self.take_update() {
            Some(prepared) if self.phase() == VmPhase::Preserved => {
                self.call_off(prepared, true);
                Ok(())
            }
            other => {
                if let Some(prepared) = other {
                    self.set_update(prepared);
                }
                Err(self.refuse("cancel an update"))
            }
        }
    }

    /// While `Preserved`: if the agent called this VM's update off (a VM was not ready by its
    /// deadline), or no longer knows it, the guest resumes in place. An agent that does not
    /// answer is asked again next time.
    pub fn follow_agent(&mut self) {
        if self.phase() != VmPhase::Preserved {
            return;
        }
        let Some(prepared) = self.take_update() else {
            return;
        };
        let called_off = match AgentClient::new(&prepared.agent_socket).status() {
            Ok(ledger) => !ledger
                .vms
                .iter()
                .any(|r| r.vm == prepared.vm_id && r.phase != AgentPhase::Cancelled),
            Err(e) => {
                log::debug!("update: the agent does not answer yet: {e}");
                false
            }
        };
        if called_off {
            log::warn!("the agent called the update off; the guest resumes in place");
            self.call_off(prepared, true);
        } else {
            self.set_update(prepared);
        }
    }

    /// Undoes a prepare, as far as it went, and resumes if the guest was running.
    fn call_off(&mut self, prepared: PreparedUpdate, resume: bool) {
        let agent = AgentClient::new(&prepared.agent_socket);
        if let Err(e) = agent.release(&prepared.vm_id) {
            log::error!("cancel: the agent did not release the session: {e}");
        }
        prepared.session.cancel();
        // With the session gone, no one else holds a device's file: one the failed kexec's
        // freeze reset can be closed and opened again.
        for (bdf, replaced) in self.passthrough_mut().replace_reset_devices() {
            match replaced {
                Ok(()) => log::warn!(
                    "cancel: {bdf}: the kernel reset it for the kexec that failed; opened again \
                     under the guest's unchanged view of it"
                ),
                Err(e) => log::error!(
                    "cancel: {bdf}: reset for the kexec that failed, and it cannot be opened \
                     again (the guest finds it gone): {}",
                    error_chain(&e)
                ),
            }
        }
        for (_, device) in &self.devices().passthrough.devices {
            let mut device = device.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = device.quiesce_interrupts(false) {
                log::error!("cancel: {}: {e}", device.bdf());
            }
        }
        if self.phase() == VmPhase::Preserved {
            self.set_phase(VmPhase::Paused);
        }
        if resume && self.phase() == VmPhase::Paused {
            if let Err(e) = self.resume() {
                log::error!("cancel: cannot resume the guest: {e}");
            }
        }
        log::info!("update called off; the guest runs on in place");
    }
}
