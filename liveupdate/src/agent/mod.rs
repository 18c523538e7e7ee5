//! The live-update agent: `/dev/liveupdate` admits one opener and an outgoing session dies with
//! its last fd, so one long-lived process owns LUO for every VMM on the host, as the luod
//! design does. It speaks newline-delimited JSON on a 0600 Unix socket, with session fds passed
//! by `SCM_RIGHTS`.
//!
//! - [`ledger`]: which VM holds which session and when each phase began; it crosses the kexec
//!   in a memfd of the agent's own session, so the next kernel's agent knows what to hand back.
//! - [`keep`]: the ledger kept in a file within a boot, for an agent started again.
//! - [`holder`]: a second process that keeps copies of the sessions the agent retrieved, for
//!   an agent started again.
//! - [`wire`]: the requests and replies.
//! - [`server`]: the agent itself.
//! - [`client`]: what a VMM calls.

pub mod client;
pub mod clients;
pub mod holder;
pub mod keep;
pub mod ledger;
pub mod server;
pub mod watchers;
pub mod wire;

pub use client::{AgentClient, AgentClientError};
pub use ledger::{Ledger, LedgerError, VmPhase, VmRecord};
pub use server::{Agent, AgentError};
pub use wire::KeptFiles;

/// Where the agent listens unless told otherwise: the agent and every VMM on the host meet
/// there.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/luvmm/agent.sock";
