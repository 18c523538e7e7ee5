//! The host live update, one file per phase.
//!
//! Before the kexec, in the running VMM:
//! - [`check`]: a VM's part of the pre-flight, and the [`check::Blocker`]s (the host's part,
//!   which asks each VMM for this one, is the `luvmm` binary's `preflight`);
//! - [`stage`]: the pre-flight, the session and the RAM preserve, the guest running;
//! - [`prepare`]: stage if not staged, then pause, preserve devices and state;
//! - [`cancel`]: call a prepared update off (asked, or by the agent), the guest resumed.
//!
//! After it, in a new VMM (`luvmm restore --session`):
//! - [`before_claim`]: ask KVM, make the VM, wait for the agent and read what the VMM was
//!   launched with, while the agent may still be starting;
//! - [`retrieve`]: claim the session, the state first and checked, then RAM and devices;
//! - [`retry`]: take back what a failed restore of the session left with the agent, and
//!   leave this one's there in turn;
//! - rebuild: [`crate::builder::build_from_saved`] with [`crate::builder::Origin::LiveUpdate`],
//!   which gets the devices already retrieved and knows nothing of LUO;
//! - [`finish`]: FINISH the session, and tell the agent once the guest runs again;
//!
//! The session's holder, the agent or systemd's fd store, is picked in [`holder`].
//! - resume: [`crate::runtime::run`].
//!
//! Or, for a VM not restored here, [`release`]: finish its session so its devices can be
//! opened again.
//!
//! Every phase talks to LUO and the agent through [`luvmm_liveupdate::seams`], and to the VM
//! through [`vm::UpdateVm`], so the flow is unit-tested against fakes.

pub mod before_claim;
pub mod cancel;
pub mod check;
pub mod finish;
pub mod holder;
pub mod prepare;
pub mod release;
pub mod retrieve;
pub mod retry;
pub mod stage;
#[cfg(test)]
mod tests;
pub mod vm;

use luvmm_devices::vfio::PassthroughError;
use luvmm_liveupdate::agent::AgentClientError;
use luvmm_liveupdate::luo::LuoError;

use crate::passthrough::QuiesceError;
use crate::vmm::VmmError;

/// A step before the kexec failed (and the update was called off).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Vm(#[from] VmmError),
    #[error(transparent)]
    Agent(#[from] AgentClientError),
    #[error(transparent)]
    Luo(#[from] LuoError),
    #[error(transparent)]
    Device(#[from] PassthroughError),
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
    #[error("cannot duplicate the passthrough devices' fds")]
    DeviceFds(#[source] std::io::Error),
    #[error(
        "{bdf}: this kernel cannot preserve it (no LUO handler for VFIO devices), and \
         --require-preserved-devices was given"
    )]
    DeviceNotPreserved { bdf: String },
    #[error("an update is already staged for this VM, as VM {vm_id:?}")]
    AlreadyStaged { vm_id: String },
    #[error(
        "this VM's update was staged as VM {staged:?}, not {asked:?}: prepare it under that id, \
         or cancel it first"
    )]
    StagedAs { staged: String, asked: String },
    #[error(
        "the pre-flight refuses the update: {}",
        check::Blocker::join(blockers)
    )]
    Blocked { blockers: Vec<check::Blocker> },
}
