//! The source's side of a handover whose target is built ahead: the target first takes what
//! does not change while the guest runs (guest RAM's memfds and layout, the vCPU count), builds
//! its VM on them, and only then asks for the VM, which is paused and saved here at that
//! moment. The blackout holds the state's save, its transfer and its load, not the target's
//! process start, KVM VM, memslots or vCPU objects.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use luvmm_resources::layout::MemoryLayout;
use serde::{Deserialize, Serialize};

use super::{HandoverManifest, VmPhase, Vmm, VmmError};

/// What a target may build on before the pause; the fds that come with it are guest RAM's
/// memfds, one per region. Neither changes while the guest runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageManifest {
    /// Layout of the memfds.
    pub memory: MemoryLayout,
    /// Transparent huge pages were asked for on guest RAM.
    pub memory_thp: bool,
    /// The guest's vCPUs.
    pub vcpus: u32,
}

impl Vmm {
    /// Hands out guest RAM's memfds and their layout, and the vCPU count, on which a target
    /// builds its VM. Nothing changes here: the VM runs on, and a target that dies while it
    /// builds costs the guest nothing. A VM being handed over may be staged by a later target,
    /// which may then take it from the first.
    pub fn stage_handover(&self) -> Result<(StageManifest, Vec<OwnedFd>), VmmError> {
        if !matches!(
            self.phase,
            VmPhase::Running | VmPhase::Paused | VmPhase::HandingOver
        ) {
            return Err(self.refuse("stage a handover"));
        }
        self.check_movable()?;
        let fds = self
            .ram
            .memfds()
            .iter()
            .map(|file| file.as_fd().try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmmError::MemoryFds)?;
        let manifest = StageManifest {
            memory: self.ram.layout().clone(),
            memory_thp: self.ram.thp(),
            vcpus: u32::try_from(self.vcpus.len()).unwrap_or(u32::MAX),
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
