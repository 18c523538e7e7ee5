//! The target's side of a process handover: confirming it, taking the VM over when the source
//! is gone, and giving it back when the target fails first.
//!
//! The target does everything that can fail (its API socket bound, the VM built, its devices
//! adopted) before it confirms; until then the source can take the VM back, and a target that
//! fails gives it back itself (the source resumes it). One killed outright cannot: its source
//! watches it (it asked for the handover with `resume_if_target_exits`) and resumes the VM
//! once it exited unconfirmed, which is safe because a target runs the guest only after the
//! source accepted its confirmation. A target whose source went away without
//! an answer takes the VM over if the handover's ticket is still open: the source withdraws it
//! before it ever runs the guest again, so an open ticket and a dead source mean nobody else
//! can. The one step after the confirmation, moving the API socket to its path, cannot lose
//! the guest: if it fails, the API stays reachable at its temporary name.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use luvmm_resources::errors::error_chain;

use crate::api::client::{ClientError, VmmClient};
use crate::faults::{self, Fault};
use crate::vmm::{open_pidfd, HandoverManifest, HandoverTicket, TicketState, VmPhase};

/// How long a target whose confirmation went unanswered waits for its source to be gone.
const SOURCE_EXIT_WAIT: Duration = Duration::from_secs(10);

/// A handover received and not yet confirmed.
pub struct Takeover {
    socket: PathBuf,
    token: String,
    ticket: HandoverTicket,
    /// A pidfd on the source process: readable once it exited. `None` if it could not be
    /// opened, and then the source is never taken for gone.
    source: Option<OwnedFd>,
}

/// How the target came to own the VM.
#[derive(Debug, PartialEq, Eq)]
pub enum Confirmed {
    /// The source answered the confirmation.
    BySource,
    /// The source recorded the confirmation in the ticket but its answer was lost.
    Recorded,
    /// The source went away with the handover still open.
    SourceGone,
}

/// The handover could not be confirmed; the error says where the VM is.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(
        "{socket} took the VM back or handed it to another target before the confirmation: \
         this process does not run it"
    )]
    Withdrawn {
        socket: PathBuf,
        #[source]
        source: ClientError,
    },
    #[error("the handover was not confirmed; {fate}")]
    NotConfirmed {
        fate: Box<VmFate>,
        #[source]
        source: ClientError,
    },
}

/// Where the VM is after a target gave up before confirming.
#[derive(Debug)]
pub enum VmFate {
    /// The source was handing it over and resumed it.
    Resumed { socket: PathBuf },
    /// The source has it, in `phase`.
    Kept { socket: PathBuf, phase: VmPhase },
    /// The source could not be asked, or refused to resume it.
    Unknown { socket: PathBuf, error: ClientError },
}

impl fmt::Display for VmFate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmFate::Resumed { socket } => write!(
                f,
                "the VM went back to {}, which resumed it",
                socket.display()
            ),
            VmFate::Kept {
                socket,
                phase: VmPhase::Paused,
            } => write!(
                f,
                "the VM is still paused in {0}: `luvmm ctl --socket {0} resume` runs it again",
                socket.display()
            ),
            VmFate::Kept {
                socket,
                phase: VmPhase::Running,
            } => write!(f, "the VM runs on in {}", socket.display()),
            VmFate::Kept { socket, phase } => {
                write!(f, "the VM is in {}, {phase}", socket.display())
            }
            VmFate::Unknown { socket, error } => write!(
                f,
                "{0} did not answer about the VM ({1}): if that VMM still runs, `luvmm ctl \
                 --socket {0} resume` runs the VM again",
                socket.display(),
                error_chain(error)
            ),
        }
    }
}

impl Takeover {
    /// The handover from `socket` described by `manifest`, whose ticket came with it.
    pub(crate) fn new(socket: &Path, manifest: &HandoverManifest, ticket: HandoverTicket) -> Self {
        Takeover {
            socket: socket.to_path_buf(),
            token: manifest.token.clone(),
            ticket,
            source: open_pidfd(manifest.source_pid)
                .inspect_err(|e| {
                    log::warn!(
                        "cannot watch the handover's source (pid {}): {e}",
                        manifest.source_pid
                    )
                })
                .ok(),
        }
    }

    /// Tells the source this process takes the VM. Call it once everything that can fail is
    /// done: on success the VM is this process's to run, and the source never runs it again.
    pub fn confirm(self) -> Result<Confirmed, TakeoverError> {
        if faults::armed(Fault::StopBeforeConfirm) {
            faults::stop_here();
        }
        let unanswered = match VmmClient::new(&self.socket).complete_handover(&self.token) {
            Ok(()) => return Ok(Confirmed::BySource),
            Err(e) => e,
        };
        let refused = matches!(unanswered, ClientError::Refused { .. });
        match self.ticket.read() {
            Ok(TicketState::Completed) => Ok(Confirmed::Recorded),
            Ok(TicketState::Withdrawn) => Err(TakeoverError::Withdrawn {
                socket: self.socket,
                source: unanswered,
            }),
            Ok(TicketState::Open) if !refused && self.source_exits_within(SOURCE_EXIT_WAIT) => {
                log::warn!(
                    "{} went away before it confirmed the handover ({}); this process holds \
                     the whole VM and takes it over",
                    self.socket.display(),
                    error_chain(&unanswered)
                );
                Ok(Confirmed::SourceGone)
            }
            ticket => {
                if let Err(e) = ticket {
                    log::error!("{}", error_chain(&e));
                }
                Err(TakeoverError::NotConfirmed {
                    fate: Box::new(give_back(&self.socket)),
                    source: unanswered,
                })
            }
        }
    }

    fn source_exits_within(&self, wait: Duration) -> bool {
        let Some(pidfd) = &self.source else {
            return false;
        };
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
    }
}

/// Hands the VM back to the VMM behind `socket` after this process failed to take it: a VM
/// it was handing over is resumed there; any other is left as it is. Says where the VM is.
pub fn give_back(socket: &Path) -> VmFate {
    match whereabouts(socket) {
        VmFate::Kept {
            socket,
            phase: VmPhase::HandingOver,
        } => match VmmClient::new(&socket).resume() {
            Ok(()) => VmFate::Resumed { socket },
            Err(error) => VmFate::Unknown { socket, error },
        },
        fate => fate,
    }
}

/// Where the VM of the VMM behind `socket` is, for a target that failed before it asked for
/// it: nothing is changed.
pub fn whereabouts(socket: &Path) -> VmFate {
    let socket = socket.to_path_buf();
    match VmmClient::new(&socket).status() {
        Ok(status) => VmFate::Kept {
            socket,
            phase: status.phase,
        },
        Err(error) => VmFate::Unknown { socket, error },
    }
}
