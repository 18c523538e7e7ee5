//! The Linux Live Update Orchestrator (LUO) from userspace, for any VMM.
//!
//! - [`uapi`]: the ioctl numbers and argument structs of `include/uapi/linux/liveupdate.h`.
//! - [`LiveUpdate`]: the exclusive `/dev/liveupdate` handle that creates and retrieves sessions.
//! - [`OutgoingSession`] / [`IncomingSession`]: a session before the kexec (preserve files into
//!   it; dropping it unpreserves them) and after it (retrieve files, then finish).
//! - [`kexec`]: loading the next kernel with `kexec_file_load` and jumping into it.
//! - [`probe`]: what this kernel can preserve, found by trying, never leaving anything behind.
//! - [`agent`]: the one process that holds `/dev/liveupdate` for every VMM on the host.
//! - [`seams`]: what a VMM calls (its sessions and the agent) as traits, and, with the `fake`
//!   feature, [`fake`]: an in-memory host behind them for update-flow tests.
//! - [`unix`]: Unix-socket plumbing (owner-only sockets, fds passed with bytes) that the agent
//!   and the VMM's control API share.
//!
//! The crate knows nothing of VMs: callers hand it fds and tokens.

pub mod agent;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod kexec;
pub mod probe;
pub mod seams;
mod session;
pub mod uapi;
pub mod unix;

pub use session::{IncomingSession, LiveUpdate, LuoError, OutgoingSession, SessionName, Token};
