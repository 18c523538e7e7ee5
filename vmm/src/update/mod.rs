//! The host live update, one file per phase: `check` (the pre-flight), `prepare` (before the
//! kexec: preserve into the VM's LUO session, or call it off), `retrieve` (after it: take
//! the session back from the agent, state first) and `release` (after it, for a VM not
//! restored: finish its session so that its devices can be opened again).

pub mod check;
pub mod prepare;
pub mod release;
pub mod retrieve;

use luvmm_devices::vfio::{PassthroughError, VfioBindError};
use luvmm_liveupdate::agent::AgentClientError;
use luvmm_liveupdate::LuoError;

/// A live-update step failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Agent(#[from] AgentClientError),
    #[error(transparent)]
    Luo(#[from] LuoError),
    #[error(transparent)]
    Device(#[from] PassthroughError),
    #[error("{bdf}: not in D0; a device is preserved only at full power")]
    NotInD0 { bdf: String },
    #[error(
        "{bdf}: this kernel cannot preserve it (no LUO handler for VFIO devices), and \
         --require-preserved-devices was given"
    )]
    DeviceNotPreserved { bdf: String },
    #[error("the pre-flight refuses the update: {blockers}")]
    Blocked { blockers: String },
    #[error("session {session}: its state cannot be used to release it: {why}")]
    ReleaseState { session: String, why: String },
    #[error("cannot bind a retrieved device to finish its session")]
    ReleaseDevice(#[source] VfioBindError),
}
