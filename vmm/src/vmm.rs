//! The running VMM: its phase machine and the operations the control API drives.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use luvmm_devices::guest_control::{GuestControl, GuestRequest};
use luvmm_devices::pci::bus::PciBus;
use luvmm_devices::power::GuestPower;
use luvmm_devices::serial::SerialDevice;
use luvmm_resources::config::LaunchRecord;
use luvmm_resources::layout::MemoryLayout;
use luvmm_resources::state::{self, DevicesState, StateError, UpdateRecord, VcpuState, VmState};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use luvmm_liveupdate::agent::AgentClient;
use luvmm_liveupdate::fdstore::FdStore;
use luvmm_liveupdate::seams::{PhaseWatch, PreserveSession, UpdateAgent};

pub use self::export::ExportError;
pub(crate) use self::handover::open_pidfd;
use self::handover::PendingHandover;
pub use self::handover::{HandoverManifest, HandoverTicket, TicketError, TicketState};
pub use self::staged::{StageManifest, StagedDevices};
use crate::faults::{self, Fault};
use crate::passthrough::Passthrough;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{VcpuError, VcpuEvent, VcpuHandle, VcpuResponse};
use crate::vstate::vm::{KvmVm, VmError};

/// Where the VM is in its life. Every request is checked against it in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmPhase {
    /// vCPUs run.
    Running,
    /// vCPUs wait; state can be saved.
    Paused,
    /// Paused, with memory and state sent to another process that has not yet confirmed it
    /// took the VM: a resume here takes it back (the target died, or gave up); a watched
    /// target that exits unconfirmed resumes it by itself. Only a forced shutdown ends it.
    HandingOver,
    /// The other process confirmed it took the VM; this one must never run the guest again.
    HandedOver,
    /// Paused with RAM, devices and state in its LUO session, waiting for the kexec; a
    /// cancel resumes it in place.
    Preserved,
    /// The guest stopped by itself (shutdown or a fatal exit).
    Stopped,
    /// A shutdown was requested; the event loop is ending.
    ShuttingDown,
}

impl std::fmt::Display for VmPhase {
    /// As `GET /vm` spells it (`handed_over`), for people reading errors and logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmPhase::Running => "running",
            VmPhase::Paused => "paused",
            VmPhase::HandingOver => "handing_over",
            VmPhase::HandedOver => "handed_over",
            VmPhase::Preserved => "preserved",
            VmPhase::Stopped => "stopped",
            VmPhase::ShuttingDown => "shutting_down",
        })
    }
}

/// A VMM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The request does not make sense in the current phase.
    #[error("cannot {request} while the VM is {phase}")]
    WrongPhase {
        request: &'static str,
        phase: VmPhase,
    },
    /// Devices on the legacy VFIO container cannot move: their DMA mappings are by this
    /// process's addresses. The handover is refused rather than lossy.
    #[error(
        "cannot hand over: passthrough devices {bdfs:?} are on the legacy VFIO container, \
         whose DMA mappings are by this process's addresses; use iommufd (VFIO cdev) to move \
         a VM with devices"
    )]
    NotMovable { bdfs: Vec<String> },
    /// A VM holding a host live update's session cannot move: the session stays here.
    #[error(
        "cannot hand over: the VM holds host live update session luvmm-{vm_id}; `ctl update \
         cancel` first"
    )]
    UpdateHeld { vm_id: String },
    /// Handover needs a state saved since the last resume.
    #[error("no current saved state: save the paused VM first")]
    NoCurrentState,
    /// A confirmation that does not carry the token of the handover in progress.
    #[error("the token does not match the handover in progress")]
    WrongToken,
    /// A shutdown now would leave the VM to a target that may never confirm.
    #[error(
        "cannot shut down while the VM is handing over: its target has not confirmed; \
         `ctl resume` takes the VM back, `ctl shutdown --force` leaves it to the target"
    )]
    HandoverPending,
    /// The handover token cannot be drawn.
    #[error("cannot draw a handover token")]
    Token(#[source] std::io::Error),
    /// The handover's ticket cannot be written.
    #[error(transparent)]
    Ticket(TicketError),
    /// A vCPU did not do what was asked.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A VM-level KVM call failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The state does not encode.
    #[error(transparent)]
    State(#[from] StateError),
    /// Duplicating a device's fds for a handover failed.
    #[error("cannot duplicate the passthrough devices' fds")]
    DeviceFds(#[source] std::io::Error),
    /// Writing the state memfd failed.
    #[error("cannot write the state memfd")]
    StateMemfd(#[source] std::io::Error),
    /// Duplicating guest RAM's memfds for a target built ahead failed.
    #[error("cannot duplicate guest RAM's memfds")]
    MemoryFds(#[source] std::io::Error),
    /// Exporting the state to a file failed.
    #[error("cannot export state to {path}")]
    Export {
        path: PathBuf,
        #[source]
        source: ExportError,
    },
    /// A vCPU answered with something other than what was asked.
    #[error("vCPU {id} answered {answer} to {request}")]
    UnexpectedAnswer {
        id: u32,
        request: &'static str,
        answer: String,
    },
}

/// The VM's devices; the buses hold the same `Arc`s.
pub struct Devices {
    /// COM1.
    pub serial: Arc<SerialDevice>,
    /// The guest-control port.
    pub guest_control: Arc<GuestControl>,
    /// The ACPI power and reset registers and the i8042 reset.
    pub power: Arc<GuestPower>,
    /// PCI bus 0.
    pub pci: Arc<PciBus>,
    /// The passthrough devices on it and their IOMMU context.
    pub passthrough: Passthrough,
}

/// What `save` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SaveReport {
    /// Encoded state size.
    pub state_bytes: u64,
    /// From the pause request (or the start of the save, if already paused) to the state being
    /// in its memfd (and exported, if asked).
    pub pause_to_saved_ms: f64,
}

/// Where the time of a restore went, phase by phase, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreTimings {
    /// Gathering the inputs before the build: taking the handed fds, or claiming the session
    /// from the agent and retrieving and checking its state and RAM memfds.
    #[serde(default)]
    pub gather_ms: f64,
    /// After a live update, within `gather_ms`: retrieving the RAM memfds, which the kernel
    /// rebuilds folio by folio.
    #[serde(default)]
    pub retrieve_ram_ms: Option<f64>,
    /// Checking the state (decoded while the inputs were gathered) against the memfds and host.
    pub check_ms: f64,
    /// A handover's target built ahead: its KVM VM, memslots, vCPU objects and devices,
    /// built before the source paused the guest (`vm_ms` and `memory_ms` are then 0). After a
    /// live update: asking KVM what it offers and making the KVM VM, before the claim.
    #[serde(default)]
    pub built_ahead_ms: Option<f64>,
    /// A handover that paused the guest when asked: the source's pause to its state saved.
    #[serde(default)]
    pub source_save_ms: Option<f64>,
    /// A handover: the source's pause to the state decoded here (save and transfer).
    #[serde(default)]
    pub handed_after_pause_ms: Option<f64>,
    /// Creating the KVM VM, irqchip and PIT.
    pub vm_ms: f64,
    /// Mapping the memfds and registering memslots.
    pub memory_ms: f64,
    /// VM-wide KVM state and devices.
    pub devices_ms: f64,
    /// A handover built ahead: the passthrough devices adopted before the pause were kept
    /// (the guest left them as they were staged).
    #[serde(default)]
    pub devices_ahead: bool,
    /// After a live update, within `devices_ms`: mapping guest RAM into the new IOAS.
    #[serde(default)]
    pub ioas_map_ms: Option<f64>,
    /// Creating, restoring and starting the vCPUs.
    pub vcpus_ms: f64,
    /// After a live update: FINISH of the LUO session.
    #[serde(default)]
    pub finish_ms: Option<f64>,
    /// From the pause in the process that handed the VM over to the first resume here (both
    /// read the same wall clock): the guest's blackout. Set once this VM ran.
    pub blackout_ms: Option<f64>,
    /// When the guest first ran here, in ms since the Unix epoch (the end of the blackout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at_ms: Option<u64>,
}

/// What `status` reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmStatus {
    pub phase: VmPhase,
    pub vcpus: usize,
    pub memory: MemoryLayout,
    /// A saved state exists and the VM has not run since.
    pub state_current: bool,
    /// Set when this VM was restored from a saved state.
    pub restore_timings: Option<RestoreTimings>,
    /// After a handover (`handed_over`): the process the guest runs in now; this VMM holds
    /// nothing of it any more and waits to be shut down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to_pid: Option<u32>,
    /// The VM id under which a host live update is staged (the guest runs, its RAM in the
    /// session) or prepared (`preserved`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_vm_id: Option<String>,
}

/// The eventfds the event loop watches for the VM.
pub struct VmEvents {
    /// Written by a vCPU thread when the guest stops on its own.
    pub exit: EventFd,
    /// Written when the guest asks to be paused (guest-control port).
    pub guest_pause: EventFd,
}

impl VmEvents {
    /// Two new non-blocking eventfds.
    pub fn new() -> std::io::Result<VmEvents> {
        Ok(VmEvents {
            exit: EventFd::new(EFD_NONBLOCK)?,
            guest_pause: EventFd::new(EFD_NONBLOCK)?,
        })
    }
}

/// A staged or prepared live update, held until the kexec or a cancel.
pub struct PreparedUpdate {
    pub vm_id: String,
    /// The agent that holds the other copy of the session.
    pub agent: Box<dyn UpdateAgent>,
    /// This process's copy of the session: closing it (and the agent's) unpreserves all.
    pub session: Box<dyn PreserveSession>,
    /// What the stage (the part before the pause) did.
    pub staged: crate::update::stage::Staged,
    /// The agent telling of this VM's changes (a call-off); without it, the VMM asks.
    pub watch: Option<Box<dyn PhaseWatch>>,
}

struct SavedState {
    memfd: File,
    bytes: u64,
    /// False once the VM has run after the save.
    current: bool,
}

/// A built VM and everything that serves it.
///
/// Field order is drop order: the vCPU threads end first, then the devices (whose DMA maps
/// guest memory), then the VM, then the memory its memslots point into.
pub struct Vmm {
    vcpus: Vec<VcpuHandle>,
    devices: Devices,
    vm: KvmVm,
    ram: GuestRam,
    phase: VmPhase,
    saved: Option<SavedState>,
    restore_timings: Option<RestoreTimings>,
    /// A prepared live update, until the kexec or a cancel.
    update: Option<PreparedUpdate>,
    /// When the vCPUs last stopped (this process's pause, or the source's for a VM handed
    /// over), until the resume that ends that blackout.
    paused_at: Option<SystemTime>,
    /// The handover handed out and not yet confirmed, while `HandingOver`.
    handover: Option<PendingHandover>,
    /// Once `HandedOver`: the process that confirmed it took the VM.
    moved_to_pid: Option<u32>,
    /// What this VMM was launched with that a restore after a host update needs again.
    pub(crate) launch: Option<LaunchRecord>,
    /// The fd store of the service this VMM runs as, where it holds the VM's session across a
    /// host update on a host whose systemd preserves fd stores; elsewhere each update request
    /// names the agent.
    fd_store: Option<FdStore>,
    events: VmEvents,
}

impl Vmm {
    /// Wraps what a builder assembled. The vCPU threads are paused.
    pub(crate) fn new(
        vm: KvmVm,
        ram: GuestRam,
        devices: Devices,
        vcpus: Vec<VcpuHandle>,
        events: VmEvents,
    ) -> Vmm {
        Vmm {
            vcpus,
            vm,
            ram,
            devices,
            phase: VmPhase::Paused,
            saved: None,
            restore_timings: None,
            update: None,
            paused_at: None,
            handover: None,
            moved_to_pid: None,
            launch: None,
            fd_store: None,
            events,
        }
    }

    /// Records what this VMM was launched with, and its vCPU count, for the agent to keep
    /// across a host update.
    pub fn set_launch(&mut self, launch: LaunchRecord) {
        self.launch = Some(LaunchRecord {
            vcpus: u32::try_from(self.vcpus.len()).ok(),
            ..launch
        });
    }

    /// Holds this VM's session in `store` for the next host update, not with the agent.
    pub fn set_fd_store(&mut self, store: FdStore) {
        self.fd_store = Some(store);
    }

    /// Who holds the session of this VM's next update: its fd store if it has one, else the
    /// agent on `agent_socket` (as the request named it).
    pub fn update_holder(&self, agent_socket: &Path) -> Box<dyn UpdateAgent> {
        match &self.fd_store {
            Some(store) => Box::new(store.clone()),
            None => Box::new(AgentClient::new(agent_socket)),
        }
    }

    /// What this VMM was launched with, once recorded.
    pub fn launched_with(&self) -> Option<&LaunchRecord> {
        self.launch.as_ref()
    }

    /// The eventfds the event loop watches.
    pub fn events(&self) -> &VmEvents {
        &self.events
    }

    /// The current phase.
    pub fn phase(&self) -> VmPhase {
        self.phase
    }

    pub(crate) fn refuse(&self, request: &'static str) -> VmmError {
        VmmError::WrongPhase {
            request,
            phase: self.phase,
        }
    }

    fn broadcast(&self, event: fn() -> VcpuEvent, request: &'static str) -> Result<(), VmmError> {
        for vcpu in &self.vcpus {
            match vcpu.request(event())? {
                VcpuResponse::Paused | VcpuResponse::Resumed => {}
                other => {
                    return Err(VmmError::UnexpectedAnswer {
                        id: vcpu.id(),
                        request,
                        answer: format!("{other:?}"),
                    })
                }
            }
        }
        Ok(())
    }

    /// Stops every vCPU. Pausing a paused VM is a no-op.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        match self.phase {
            VmPhase::Paused | VmPhase::HandingOver | VmPhase::Preserved => Ok(()),
            VmPhase::Running => {
                self.broadcast(|| VcpuEvent::Pause, "pause")?;
                // Device interrupts raised from now on wait in their eventfds, out of the
                // saved state's way, for whichever VM attaches them next.
                self.devices.passthrough.hold_interrupts(true);
                self.paused_at = Some(SystemTime::now());
                self.phase = VmPhase::Paused;
                Ok(())
            }
            _ => Err(self.refuse("pause")),
        }
    }

    /// Lets every vCPU run. A state saved before this no longer describes the VM, so a
    /// handover not yet confirmed is called off: its target can no longer confirm.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        match self.phase {
            VmPhase::Running => Ok(()),
            VmPhase::Paused | VmPhase::HandingOver => {
                // The target loses its claim before the guest runs here again.
                if let Some(pending) = self.handover.take() {
                    log::warn!("resuming a VM whose handover was never confirmed");
                    pending.withdraw()?;
                }
                if let Some(saved) = &mut self.saved {
                    saved.current = false;
                }
                self.devices.passthrough.hold_interrupts(false);
                self.broadcast(|| VcpuEvent::Resume, "resume")?;
                let blackout = self.paused_at.take().and_then(|at| at.elapsed().ok());
                if let (Some(timings), Some(blackout)) = (&mut self.restore_timings, blackout) {
                    if timings.blackout_ms.is_none() {
                        timings.blackout_ms = Some(blackout.as_secs_f64() * 1e3);
                        timings.resumed_at_ms = SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .and_then(|d| u64::try_from(d.as_millis()).ok());
                    }
                }
                self.phase = VmPhase::Running;
                Ok(())
            }
            _ => Err(self.refuse("resume")),
        }
    }

    /// Asks the guest for `request` at its next wake-up (`Check`: verify its memory).
    pub fn request(&self, request: GuestRequest) -> Result<(), VmmError> {
        match self.phase {
            VmPhase::Running | VmPhase::Paused | VmPhase::HandingOver => {
                self.devices.guest_control.request(request);
                Ok(())
            }
            _ => Err(self.refuse("send the guest a request")),
        }
    }

    /// Pauses (if needed), captures the whole VM state, writes it into a sealed memfd, and
    /// optionally exports it to `export`. The VM stays paused.
    pub fn save(&mut self, export: Option<&Path>) -> Result<SaveReport, VmmError> {
        if !matches!(self.phase, VmPhase::Running | VmPhase::Paused) {
            return Err(self.refuse("save"));
        }
        // A destination that will be refused is refused before the guest is paused.
        if let Some(path) = export {
            export::check_target(path).map_err(export_failed(path))?;
        }
        let started = Instant::now();
        self.pause()?;
        let state = self.capture()?;
        let blob = state::encode(&state)?;
        let memfd = write_state_memfd(&blob).map_err(VmmError::StateMemfd)?;
        if let Some(path) = export {
            export::export_state(path, &blob).map_err(export_failed(path))?;
        }
        self.saved = Some(SavedState {
            memfd,
            bytes: blob.len() as u64,
            current: true,
        });
        Ok(SaveReport {
            state_bytes: blob.len() as u64,
            pause_to_saved_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn capture(&self) -> Result<VmState, VmmError> {
        let mut vcpus: Vec<VcpuState> = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            match vcpu.request(VcpuEvent::SaveState)? {
                VcpuResponse::Saved(state) => vcpus.push(*state),
                other => {
                    return Err(VmmError::UnexpectedAnswer {
                        id: vcpu.id(),
                        request: "save state",
                        answer: format!("{other:?}"),
                    })
                }
            }
        }
        let (passthrough, iommu) = self.devices.passthrough.save();
        Ok(VmState {
            producer: format!("luvmm {}", env!("CARGO_PKG_VERSION")),
            memory: self.ram.layout().clone(),
            vm: self.vm.save_state()?,
            vcpus,
            update: None,
            memory_thp: self.ram.thp(),
            devices: DevicesState {
                serial: self.devices.serial.save(),
                guest_control: self.devices.guest_control.save(),
                passthrough,
                iommu,
            },
        })
    }

    /// Marks the VM as rebuilt from a saved state: the state memfd it came in (if any) is
    /// current until the first resume.
    pub(crate) fn set_restored(
        &mut self,
        memfd: Option<File>,
        bytes: u64,
        timings: RestoreTimings,
        source_paused_at: Option<SystemTime>,
    ) {
        self.paused_at = source_paused_at;
        self.saved = memfd.map(|memfd| SavedState {
            memfd,
            bytes,
            current: true,
        });
        self.restore_timings = Some(timings);
    }

    pub(crate) fn set_phase(&mut self, phase: VmPhase) {
        self.phase = phase;
    }

    /// The prepared live update it holds, if any.
    pub(crate) fn prepared(&mut self) -> &mut Option<PreparedUpdate> {
        &mut self.update
    }

    /// After a live update: how long the session's FINISH took, for the restore's timings.
    pub fn record_finish(&mut self, finish_ms: f64) {
        if let Some(timings) = &mut self.restore_timings {
            timings.finish_ms = Some(finish_ms);
        }
    }

    pub(crate) fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Captures the paused VM with `update` recorded in it, into a new sealed memfd (kept as
    /// the current saved state too); returns the memfd for the session.
    pub(crate) fn save_for_update(&mut self, update: UpdateRecord) -> Result<File, VmmError> {
        let mut state = self.capture()?;
        state.update = Some(update);
        if faults::armed(Fault::SaveUnknownMsr) {
            faults::add_unknown_msr(&mut state);
        }
        let blob = state::encode(&state)?;
        let memfd = write_state_memfd(&blob).map_err(VmmError::StateMemfd)?;
        let copy = memfd.try_clone().map_err(VmmError::StateMemfd)?;
        self.saved = Some(SavedState {
            memfd: copy,
            bytes: blob.len() as u64,
            current: true,
        });
        Ok(memfd)
    }

    /// Current status.
    pub fn status(&self) -> VmStatus {
        VmStatus {
            phase: self.phase,
            vcpus: self.vcpus.len(),
            memory: self.ram.layout().clone(),
            state_current: self.saved.as_ref().is_some_and(|s| s.current),
            restore_timings: self.restore_timings.clone(),
            moved_to_pid: self.moved_to_pid,
            update_vm_id: self.update.as_ref().map(|u| u.vm_id.clone()),
        }
    }

    /// Asks the event loop to end. The guest is paused first so it stops cleanly. While a
    /// handover waits for its target's confirmation, only a forced shutdown goes on: it leaves
    /// the VM to the target, whose ticket stays open.
    pub fn request_shutdown(&mut self, force: bool) -> Result<(), VmmError> {
        if self.phase == VmPhase::HandingOver {
            if !force {
                return Err(VmmError::HandoverPending);
            }
            log::warn!("shutting down while handing over: the VM is left to its target");
        }
        if self.phase == VmPhase::Running {
            if let Err(e) = self.pause() {
                log::warn!("shutdown: pause failed: {e}");
            }
        }
        self.phase = VmPhase::ShuttingDown;
        Ok(())
    }

    /// Records that the guest stopped on its own.
    pub fn guest_stopped(&mut self) {
        self.phase = VmPhase::Stopped;
    }

    /// The guest's devices.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// The passthrough devices, to replace one whose function was lost.
    pub(crate) fn passthrough_mut(&mut self) -> &mut Passthrough {
        &mut self.devices.passthrough
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        for vcpu in self.vcpus.drain(..) {
            vcpu.finish();
        }
    }
}

/// Writes `blob` into a new memfd and seals it, so nobody can change the state once saved.
fn write_state_memfd(blob: &[u8]) -> std::io::Result<File> {
    let fd = memfd_create(
        "luvmm-state",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    file.write_all(blob)?;
    fcntl(
        file.as_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK,
        ),
    )?;
    Ok(file)
}

/// Names the destination of a failed export.
fn export_failed(path: &Path) -> impl FnOnce(ExportError) -> VmmError + '_ {
    move |source| VmmError::Export {
        path: path.to_path_buf(),
        source,
    }
}

mod export;
mod handover;
mod staged;
#[cfg(test)]
mod tests;
