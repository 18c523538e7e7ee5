//! The source's side of a handover whose target is built ahead: the target first takes what
//! does not change while the guest runs (guest RAM's memfds and layout, the vCPU count) and
//! what rarely does (the passthrough devices' fds and setup), builds its VM on them, and only
//! then asks for the VM, which is paused and saved here at that moment. The blackout holds the
//! state's save, its transfer and its load, not the target's process start, KVM VM, memslots,
//! vCPU objects or device adoption.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use luvmm_resources::layout::MemoryLayout;
use luvmm_resources::state::{IommuState, PassthroughState};
use serde::{Deserialize, Serialize};

use crate::passthrough::HandedDeviceManifest;

use super::{HandoverManifest, VmPhase, Vmm, VmmError};

/// What a target may build on before the pause; the fds that come with it are guest RAM's
/// memfds, one per region, then the devices' (see [`StagedDevices`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageManifest {
    /// Layout of the memfds.
    pub memory: MemoryLayout,
    /// Transparent huge pages were asked for on guest RAM.
    pub memory_thp: bool,
    /// The guest's vCPUs.
    pub vcpus: u32,
    /// The passthrough devices, if the VM has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<StagedDevices>,
}

/// The passthrough devices as they are at the stage. Their fds follow the memfds: the
/// iommufd, then per device its cdev and its interrupt eventfds. The guest may set a device
/// up anew before the pause (an MSI-X vector masked, a BAR moved), so a target keeps what it
/// adopted from this only if the state it is handed says the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedDevices {
    /// Each device's saved state, in slot order.
    pub passthrough: Vec<PassthroughState>,
    /// The IOMMU context they share.
    pub iommu: IommuState,
    /// What the fds are, device by device.
    pub handed: Vec<HandedDeviceManifest>,
}

impl Vmm {
    /// Hands out guest RAM's memfds and their layout, the vCPU count, and the passthrough
    /// devices' fds and setup, on which a target builds its VM. Nothing changes here: the VM
    /// runs on, and a target that dies while it builds costs the guest nothing. A VM being
    /// handed over may be staged by a later target, which may then take it from the first.
    pub fn stage_handover(&self) -> Result<(StageManifest, Vec<OwnedFd>), VmmError> {
        if !matches!(
            self.phase,
            VmPhase::Running | VmPhase::Paused | VmPhase::HandingOver
        ) {
            return Err(self.refuse("stage a handover"));
        }
        self.check_movable()?;
        let mut fds = self
            .ram
            .memfds()
            .iter()
            .map(|file| file.as_fd().try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmmError::MemoryFds)?;
        let devices = match self.devices.passthrough.save() {
            (passthrough, Some(iommu)) if !passthrough.is_empty() => {
                let (handed, device_fds) = self
                    .devices
                    .passthrough
                    .handover_fds()
                    .map_err(VmmError::DeviceFds)?;
                fds.extend(device_fds);
                Some(StagedDevices {
                    passthrough,
                    iommu,
                    handed,
                })
            }
            _ => None,
        };
        let manifest = StageManifest {
            memory: self.ram.layout().clone(),
            memory_thp: self.ram.thp(),
            vcpus: u32::try_from(self.vcpus.len()).unwrap_or(u32::MAX),
            devices,
        };
        Ok((manifest, fds))
    }

    /// [`Vmm::handover`] for a target built ahead: a running VM is paused and its state saved
    /// now (as is a paused one whose saved state is out of date). A VM that cannot move is
    /// refused before it is paused; if the handover fails after that, a VM that was running
    /// runs again.
    pub fn pause_and_hand_over(&mut self) -> Result<(HandoverManifest, Vec<OwnedFd>), VmmError> {
        self.check_movable()?;
        let was_running = self.phase == VmPhase::Running;
        let current = self.saved.as_ref().is_some_and(|saved| saved.current);
        let handed = if was_running || (self.phase == VmPhase::Paused && !current) {
            self.save(None).and_then(|saved| {
                let (mut manifest, fds) = self.handover()?;
                // The save's own figure, in whole µs: the manifest compares as a whole.
                manifest.pause_to_saved_us =
                    Duration::try_from_secs_f64(saved.pause_to_saved_ms / 1e3)
                        .ok()
                        .map(|took| u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                Ok((manifest, fds))
            })
        } else {
            self.handover()
        };
        if handed.is_err() && was_running {
            if let Err(e) = self.resume() {
                log::error!(
                    "cannot resume the VM after a failed handover: {}",
                    luvmm_resources::errors::error_chain(&e)
                );
            }
        }
        handed
    }
}
