//! After the kexec, for a VM that will not be restored here: give its session back, so that
//! its devices can be used again. LUO frees the memfds nobody retrieved at FINISH, but a VFIO
//! device the old kernel preserved stays *incoming* (every normal open refused with `EBUSY`)
//! until its session finishes, and FINISH needs each such device retrieved and bound to an
//! iommufd first. Closing the session without a FINISH would not help: the kernel runs the
//! same check, fails it, and keeps the devices incoming until the next reboot.
//!
//! So: claim the session from the agent, read the state memfd for the device tokens, retrieve
//! and bind each device to a scratch iommufd, FINISH, then close everything (each device is
//! then reset by vfio-pci as after any last close). Guest RAM is never retrieved.

use std::fs::File;

use luvmm_devices::vfio::host::BoundCdev;
use luvmm_devices::vfio::VfioBindError;
use luvmm_liveupdate::luo::LuoError;
use luvmm_liveupdate::seams::{RetrieveSession, UpdateAgent};
use luvmm_resources::errors::error_chain;
use luvmm_resources::state::{self, VmState, STATE_TOKEN};
use serde::Serialize;

use crate::update::finish::report_failed;
use crate::update::retrieve::{claim, update_record, ClaimError, StateRefused};

/// A release failed; what was retrieved so far is closed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error("session {session}: {what}")]
    Luo {
        session: String,
        what: &'static str,
        #[source]
        source: LuoError,
    },
    #[error("session {session}: its state cannot be used to release it")]
    State {
        session: String,
        #[source]
        source: StateRefused,
    },
    #[error("cannot bind a retrieved device to finish its session")]
    Device(#[source] VfioBindError),
}

/// What a release gave back.
#[derive(Debug, Serialize)]
pub struct ReleaseReport {
    pub session: String,
    /// The devices the old kernel had preserved, now free for a normal open.
    pub devices: Vec<String>,
    /// The devices the old kernel could not preserve (nothing to do for them).
    pub not_preserved: Vec<String>,
}

/// Claims `vm_id`'s session from `agent` and finishes it without restoring the VM.
pub fn release(vm_id: &str, agent: &dyn UpdateAgent) -> Result<ReleaseReport, ReleaseError> {
    // As a restore does, so a release refused before the claim can be retried.
    let session = claim(vm_id, agent)?;
    // After the claim, the agent keeps the session for another try.
    let report = release_claimed(session).inspect_err(|e| report_failed(agent, vm_id, e))?;
    if let Err(e) = agent.finished(vm_id) {
        log::warn!(
            "the agent did not take VM {vm_id}'s release: {}",
            error_chain(&e)
        );
    }
    Ok(report)
}

fn release_claimed(session: Box<dyn RetrieveSession>) -> Result<ReleaseReport, ReleaseError> {
    let name = session.name().to_string();
    let luo = |what| {
        let session = name.clone();
        move |source| ReleaseError::Luo {
            session,
            what,
            source,
        }
    };
    let bad_state = |source| ReleaseError::State {
        session: name.clone(),
        source,
    };
    let state_memfd = File::from(
        session
            .retrieve(STATE_TOKEN)
            .map_err(luo("cannot retrieve the state memfd"))?,
    );
    let blob =
        state::read_blob(&state_memfd, None).map_err(|e| bad_state(StateRefused::Read(e)))?;
    let saved: VmState = state::decode(&blob).map_err(|e| bad_state(StateRefused::Decode(e)))?;
    let tokens = &update_record(&saved).map_err(bad_state)?.device_tokens;
    let mut held = Vec::new();
    let mut refused = None;
    let mut report = ReleaseReport {
        session: name.clone(),
        devices: Vec::new(),
        not_preserved: Vec::new(),
    };
    for (device, token) in saved.devices.passthrough.iter().zip(tokens) {
        let Some(token) = token else {
            report.not_preserved.push(device.bdf.clone());
            continue;
        };
        let cdev = File::from(
            session
                .retrieve(*token)
                .map_err(luo("cannot retrieve a passthrough device"))?,
        );
        // A restore that failed after binding the device left its file (the same file every
        // retrieve gives) bound to that restore's iommufd: no second bind is allowed, but it
        // is bound, which is all FINISH asks. So a refused bind is kept for later: it matters
        // only if FINISH then refuses too.
        match BoundCdev::adopt(device.bdf.clone(), cdev) {
            Ok(bound) => held.push(bound),
            Err(e) => {
                log::warn!(
                    "{}: cannot bind it ({}); an earlier restore may hold it bound",
                    device.bdf,
                    error_chain(&e)
                );
                refused.get_or_insert(e);
            }
        }
        report.devices.push(device.bdf.clone());
    }
    if let Err(e) = session.finish() {
        return Err(match (e, refused) {
            (LuoError::FinishBusy { .. }, Some(bind)) => ReleaseError::Device(bind),
            (e, _) => luo("FINISH failed")(e),
        });
    }
    log::info!(
        "session {name} finished without a restore; released {} device(s): {}",
        report.devices.len(),
        report.devices.join(", ")
    );
    // LUO dropped its references at FINISH; these are the last, and vfio-pci resets each
    // device as they close.
    drop(held);
    drop(session);
    Ok(report)
}
