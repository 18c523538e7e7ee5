//! After the kexec, once the VM is rebuilt: FINISH its session (the kernel lets go of
//! everything in it; the VM now owns its memfds and devices), and, once the guest runs again,
//! tell the agent, whose ledger then has the VM `finished` and free to take part in the next
//! update. The second step is out of the blackout: the guest does not wait for the agent.

use std::time::Instant;

use luvmm_liveupdate::luo::LuoError;
use luvmm_liveupdate::seams::{RetrieveSession, UpdateAgent};
use luvmm_resources::errors::error_chain;

/// FINISH failed: the session stays, and its devices stay *incoming* until it is finished.
#[derive(Debug, thiserror::Error)]
#[error("session {session}: FINISH failed")]
pub struct FinishError {
    session: String,
    #[source]
    source: LuoError,
}

/// Finishes `session`; returns how long it took, in ms.
pub fn finish_session(session: &dyn RetrieveSession) -> Result<f64, FinishError> {
    let started = Instant::now();
    session.finish().map_err(|source| FinishError {
        session: session.name().to_string(),
        source,
    })?;
    log::info!("session {} finished", session.name());
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// Tells the agent VM `vm_id` is restored and its session finished. The guest runs whatever
/// the agent says: a failure here only keeps the VM out of the next update until it is mended.
pub fn report_finished(agent: &dyn UpdateAgent, vm_id: &str) {
    if let Err(e) = agent.finished(vm_id) {
        log::warn!(
            "the agent did not take VM {vm_id}'s finish: {}; it cannot prepare again",
            error_chain(&e)
        );
    }
}

/// Tells the agent the restore of VM `vm_id` failed after its claim, with `error`: the agent
/// keeps the session (and LUO every file retrieved from it) for the next restore.
pub fn report_failed(agent: &dyn UpdateAgent, vm_id: &str, error: &dyn std::error::Error) {
    match agent.failed(vm_id, &error_chain(error)) {
        Ok(()) => log::error!(
            "the restore of VM {vm_id} failed after its claim; the agent keeps its session: \
             mend the cause and run the restore again"
        ),
        Err(e) => log::warn!(
            "the agent did not take VM {vm_id}'s failure: {}; a next restore gets the session \
             once this process has exited",
            error_chain(&e)
        ),
    }
}
