//! The host live update from userspace, in two layers:
//!
//! - [`luo`]: the Linux Live Update Orchestrator for any VMM (sessions, preserve, retrieve,
//!   finish, kexec, the handler probe). It knows nothing of VMs: callers hand it fds and tokens.
//! - [`agent`]: luvmm's agent, the one process that holds `/dev/liveupdate` for every VMM on the
//!   host. It knows VM ids, the session each gets, and the devices each needs after the kexec.
//!
//! Beside them: [`seams`], what a VMM calls (its sessions and the agent) as traits, and, with
//! the `fake` feature, [`fake`], an in-memory host behind them for update-flow tests; [`unix`],
//! Unix-socket plumbing (owner-only sockets, fds passed with bytes) that the agent and the
//! VMM's control API share.

pub mod agent;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod fdstore;
pub mod luo;
pub mod seams;
pub mod unix;
