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
use std::path::Path;

use luvmm_devices::vfio::host::BoundCdev;
use luvmm_liveupdate::agent::AgentClient;
use luvmm_resources::state::{self, VmState, STATE_TOKEN};
use serde::Serialize;

use crate::restore::read_state;
use crate::update::retrieve::update_record;
use crate::update::UpdateError;

/// What a release gave back.
#[derive(Debug, Serialize)]
pub struct ReleaseReport {
    pub session: String,
    /// The devices the old kernel had preserved, now free for a normal open.
    pub devices: Vec<String>,
    /// The devices the old kernel could not preserve (nothing to do for them).
    pub not_preserved: Vec<String>,
}

/// Claims `vm_id`'s session from the agent behind `agent_socket` and finishes it without
/// restoring the VM.
pub fn release(vm_id: &str, agent_socket: &Path) -> Result<ReleaseReport, UpdateError> {
    let agent = AgentClient::new(agent_socket);
    let session = agent.claim(vm_id)?;
    let name = session.name().to_string();
    let bad_state = |why: String| UpdateError::ReleaseState {
        session: name.clone(),
        why,
    };
    let state_memfd = File::from(session.retrieve(STATE_TOKEN)?);
    let blob = read_state(&state_memfd, None, &format!("session {name}"))
        .map_err(|e| bad_state(e.to_string()))?;
    let saved: VmState = state::decode(&blob).map_err(|e| bad_state(e.to_string()))?;
    let tokens = &update_record(&saved).map_err(bad_state)?.device_tokens;
    let mut held = Vec::new();
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
        let cdev = File::from(session.retrieve(*token)?);
        held.push(BoundCdev::adopt(device.bdf.clone(), cdev).map_err(UpdateError::ReleaseDevice)?);
        report.devices.push(device.bdf.clone());
    }
    session.finish()?;
    log::info!(
        "session {name} finished without a restore; released {} device(s): {}",
        report.devices.len(),
        report.devices.join(", ")
    );
    // LUO dropped its references at FINISH; these are the last, and vfio-pci resets each
    // device as they close.
    drop(held);
    drop(session);
    if let Err(e) = agent.finished(vm_id) {
        log::warn!("the agent did not take VM {vm_id}'s release: {e}");
    }
    Ok(report)
}
