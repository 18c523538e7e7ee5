//! What the update flow needs of a VM, as a trait: [`crate::vmm::Vmm`] implements it, and
//! the flow's unit tests use a fake that records what was done to it.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use luvmm_resources::errors::error_chain;
use luvmm_resources::state::UpdateRecord;

use crate::passthrough::{DeviceFile, QuiesceError};
use crate::vmm::{PreparedUpdate, VmPhase, Vmm, VmmError};

/// A VM going through a live update.
pub trait UpdateVm {
    /// Where the VM is in its life.
    fn phase(&self) -> VmPhase;
    /// Moves it to `Preserved` (prepared) or back to `Paused` (called off).
    fn set_phase(&mut self, phase: VmPhase);
    /// Its guest RAM memfds, in layout order.
    fn ram_files(&self) -> Vec<BorrowedFd<'_>>;
    /// Its guest RAM size in MiB.
    fn ram_mib(&self) -> u64;
    /// Its passthrough devices, in slot order.
    fn device_files(&self) -> std::io::Result<Vec<DeviceFile>>;
    fn pause(&mut self) -> Result<(), VmmError>;
    fn resume(&mut self) -> Result<(), VmmError>;
    /// Every device in D0 with its VFIO interrupts off.
    fn quiesce_devices(&mut self) -> Result<(), QuiesceError>;
    /// After a called-off update: devices the failed kexec's freeze reset are opened again,
    /// and every device's interrupts are on again. Failures are logged: the guest resumes.
    fn rearm_devices(&mut self);
    /// Captures the paused VM with `update` recorded in it, into a sealed memfd.
    fn save_for_update(&mut self, update: UpdateRecord) -> Result<File, VmmError>;
    /// The prepared update it holds until the kexec or a cancel.
    fn prepared(&mut self) -> &mut Option<PreparedUpdate>;
    /// What its VMM was launched with, for the agent to keep for the restore.
    fn launch(&self) -> Option<serde_json::Value>;
}

impl UpdateVm for Vmm {
    fn phase(&self) -> VmPhase {
        Vmm::phase(self)
    }

    fn set_phase(&mut self, phase: VmPhase) {
        Vmm::set_phase(self, phase);
    }

    fn ram_files(&self) -> Vec<BorrowedFd<'_>> {
        self.ram().memfds().iter().map(AsFd::as_fd).collect()
    }

    fn ram_mib(&self) -> u64 {
        self.ram().layout().total_bytes() >> 20
    }

    fn device_files(&self) -> std::io::Result<Vec<DeviceFile>> {
        self.devices().passthrough.update_view()
    }

    fn pause(&mut self) -> Result<(), VmmError> {
        Vmm::pause(self)
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        Vmm::resume(self)
    }

    fn quiesce_devices(&mut self) -> Result<(), QuiesceError> {
        self.devices().passthrough.quiesce_all()
    }

    fn rearm_devices(&mut self) {
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
        for (bdf, e) in self.devices().passthrough.rearm_all() {
            log::error!("cancel: {bdf}: {}", error_chain(&e));
        }
    }

    fn save_for_update(&mut self, update: UpdateRecord) -> Result<File, VmmError> {
        Vmm::save_for_update(self, update)
    }

    fn launch(&self) -> Option<serde_json::Value> {
        self.launch
            .as_ref()
            .and_then(|launch| serde_json::to_value(launch).ok())
    }

    fn prepared(&mut self) -> &mut Option<PreparedUpdate> {
        Vmm::prepared(self)
    }
}
