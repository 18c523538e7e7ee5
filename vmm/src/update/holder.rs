//! Who holds a VM's session across the kexec: luvmm's agent, or, on a host whose systemd
//! preserves fd stores through LUO, the fd store of the VM's own service
//! ([`luvmm_liveupdate::fdstore`]). The update flow sees either as an
//! [`UpdateAgent`]; this is where a VMM picks one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use luvmm_liveupdate::agent::{AgentClient, Ledger};
use luvmm_liveupdate::fdstore::FdStore;
use luvmm_liveupdate::seams::UpdateAgent;

use super::before_claim::{wait_for_agent, BeforeClaimError};

/// The holder of a VM's session.
#[derive(Clone)]
pub enum Holder {
    /// The agent on `socket`, waited for up to `wait` after the kexec.
    Agent { socket: PathBuf, wait: Duration },
    /// The fd store of the service this VMM runs as.
    FdStore(FdStore),
}

impl Holder {
    /// The agent on `socket`, waited for up to `wait`.
    pub fn agent(socket: &Path, wait: Duration) -> Holder {
        Holder::Agent {
            socket: socket.to_path_buf(),
            wait,
        }
    }

    /// The holder as the update flow calls it.
    pub fn client(&self) -> Box<dyn UpdateAgent> {
        match self {
            Holder::Agent { socket, .. } => Box::new(AgentClient::new(socket)),
            Holder::FdStore(store) => Box::new(store.clone()),
        }
    }

    /// The holder's ledger, once it answers: the agent is waited for (it may be starting
    /// beside this restore); the fd store answers at once.
    pub fn ledger(&self) -> Result<Ledger, BeforeClaimError> {
        match self {
            Holder::Agent { socket, wait } => {
                wait_for_agent(&AgentClient::new(socket), socket, *wait)
            }
            Holder::FdStore(store) => store.status().map_err(|source| BeforeClaimError::NoAgent {
                waited_s: 0,
                source,
            }),
        }
    }
}
