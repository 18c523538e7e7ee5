//! The source's side of a process handover: what it hands out, and the record both processes
//! read to agree on who runs the guest.
//!
//! A handover is confirmed with the token of its manifest, so only the process that holds its
//! fds can end it. Each handover also carries a *ticket*: a one-byte memfd shared by the source
//! and its target, in which the source writes, before it acts, whether this handover is still
//! open, was completed, or was withdrawn (the source resumed the VM, or handed it to a later
//! target). A target whose source is gone reads it to know whether the VM is still its to take:
//! the source never resumes the guest without first withdrawing the ticket.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::time::UNIX_EPOCH;

use luvmm_resources::layout::MemoryLayout;
use nix::sys::memfd::{memfd_create, MFdFlags};
use serde::{Deserialize, Serialize};

use super::{VmPhase, Vmm, VmmError};
use crate::passthrough::HandedDeviceManifest;

/// Bytes of randomness in a handover token.
const TOKEN_BYTES: usize = 16;

/// What is handed to the process that takes the VM over: fds in this order, state memfd first,
/// then one memfd per region, then (with passthrough devices) the iommufd and per device its
/// cdev and interrupt eventfds, then the ticket; plus this description of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverManifest {
    /// Layout of the memfds that follow the state memfd.
    pub memory: MemoryLayout,
    /// Length of the state in the state memfd.
    pub state_bytes: u64,
    /// The passthrough devices whose fds follow, in the state's order.
    #[serde(default)]
    pub passthrough: Vec<HandedDeviceManifest>,
    /// When the source paused the VM (ns since the Unix epoch), for the target's blackout.
    #[serde(default)]
    pub paused_at_unix_ns: Option<u64>,
    /// A VM paused for this handover (`pause`): how long its state took to save, in µs.
    #[serde(default)]
    pub pause_to_saved_us: Option<u64>,
    /// What `PUT /vm/handover/complete` must carry: only the holder of this manifest confirms.
    pub token: String,
    /// The source's pid, so a target can tell a source that is gone from one that refuses.
    pub source_pid: u32,
}

/// What the source decided about one handover, as written in its ticket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketState {
    /// Handed out, not yet confirmed: the VM is its target's to take if the source goes away.
    Open,
    /// The target confirmed: the VM is the target's.
    Completed,
    /// The source took the VM back (resume) or handed it to a later target.
    Withdrawn,
}

/// The ticket of one handover (see the module's documentation).
pub struct HandoverTicket(File);

/// A ticket that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    #[error("cannot create the handover ticket")]
    Create(#[source] std::io::Error),
    #[error("cannot write the handover ticket")]
    Write(#[source] std::io::Error),
    #[error("cannot read the handover ticket")]
    Read(#[source] std::io::Error),
    #[error("the handover ticket holds {0}, which is no ticket state")]
    Unknown(u8),
}

impl HandoverTicket {
    /// A new ticket, open.
    fn create() -> Result<HandoverTicket, TicketError> {
        let fd = memfd_create("luvmm-handover-ticket", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| TicketError::Create(e.into()))?;
        let ticket = HandoverTicket(File::from(fd));
        ticket.set(TicketState::Open)?;
        Ok(ticket)
    }

    /// The ticket the source handed over with the manifest.
    pub fn from_fd(fd: OwnedFd) -> HandoverTicket {
        HandoverTicket(File::from(fd))
    }

    fn set(&self, state: TicketState) -> Result<(), TicketError> {
        let byte = match state {
            TicketState::Open => 0,
            TicketState::Completed => 1,
            TicketState::Withdrawn => 2,
        };
        self.0.write_all_at(&[byte], 0).map_err(TicketError::Write)
    }

    /// What the source last wrote.
    pub fn read(&self) -> Result<TicketState, TicketError> {
        let mut byte = [0u8];
        self.0
            .read_exact_at(&mut byte, 0)
            .map_err(TicketError::Read)?;
        match byte[0] {
            0 => Ok(TicketState::Open),
            1 => Ok(TicketState::Completed),
            2 => Ok(TicketState::Withdrawn),
            other => Err(TicketError::Unknown(other)),
        }
    }
}

/// The handover handed out and not yet confirmed or withdrawn.
pub(super) struct PendingHandover {
    token: String,
    ticket: HandoverTicket,
    /// A pidfd on the target, if it asked to be watched: once it exits unconfirmed, the VM is
    /// resumed here.
    target: Option<OwnedFd>,
}

impl PendingHandover {
    /// The source takes the VM back, or gives it to a later target: this handover's target can
    /// no longer take it, even once the source is gone.
    pub(super) fn withdraw(self) -> Result<(), VmmError> {
        self.ticket
            .set(TicketState::Withdrawn)
            .map_err(VmmError::Ticket)
    }
}

impl Vmm {
    /// A VM with devices on the legacy VFIO container cannot move to another process: their
    /// group and container fds cannot be adopted there.
    pub(super) fn check_movable(&self) -> Result<(), VmmError> {
        if let Some(update) = &self.update {
            return Err(VmmError::UpdateHeld {
                vm_id: update.vm_id.clone(),
            });
        }
        let legacy = self.devices.passthrough.legacy_bdfs();
        if legacy.is_empty() {
            Ok(())
        } else {
            Err(VmmError::NotMovable { bdfs: legacy })
        }
    }

    /// Duplicates the state memfd, the RAM memfds and the passthrough devices' fds for another
    /// process. The VM stays paused and resumable until that process confirms
    /// (`complete_handover`) with the manifest's token, so a target that dies on the way
    /// strands nothing; a second target may ask again, which withdraws the first one's ticket.
    /// Needs a paused VM with a current saved state.
    pub fn handover(&mut self) -> Result<(HandoverManifest, Vec<OwnedFd>), VmmError> {
        if !matches!(self.phase, VmPhase::Paused | VmPhase::HandingOver) {
            return Err(self.refuse("hand over"));
        }
        self.check_movable()?;
        let saved = match &self.saved {
            Some(saved) if saved.current => saved,
            _ => return Err(VmmError::NoCurrentState),
        };
        let mut fds = Vec::with_capacity(2 + self.ram.memfds().len());
        for file in std::iter::once(&saved.memfd).chain(self.ram.memfds()) {
            fds.push(
                file.as_fd()
                    .try_clone_to_owned()
                    .map_err(VmmError::StateMemfd)?,
            );
        }
        let (passthrough, device_fds) = self
            .devices
            .passthrough
            .handover_fds()
            .map_err(VmmError::DeviceFds)?;
        fds.extend(device_fds);
        let pending = PendingHandover {
            token: new_token().map_err(VmmError::Token)?,
            ticket: HandoverTicket::create().map_err(VmmError::Ticket)?,
            target: None,
        };
        fds.push(
            pending
                .ticket
                .0
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| VmmError::Ticket(TicketError::Create(e)))?,
        );
        let manifest = HandoverManifest {
            memory: self.ram.layout().clone(),
            state_bytes: saved.bytes,
            passthrough,
            paused_at_unix_ns: self
                .paused_at
                .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                .and_then(|since| u64::try_from(since.as_nanos()).ok()),
            pause_to_saved_us: None,
            token: pending.token.clone(),
            source_pid: std::process::id(),
        };
        // The earlier target loses its claim before this one gets the VM: never two at once.
        if let Some(earlier) = self.handover.take() {
            earlier.withdraw()?;
        }
        self.handover = Some(pending);
        self.phase = VmPhase::HandingOver;
        Ok((manifest, fds))
    }

    /// The target rebuilt the VM and is about to run it: from now on this process refuses to.
    /// The target confirms before its vCPUs start, so the two never run the guest at once.
    /// Only the token of the handover in progress confirms it; any other changes nothing.
    pub fn complete_handover(&mut self, token: &str) -> Result<(), VmmError> {
        let pending = match (&self.phase, &self.handover) {
            (VmPhase::HandingOver, Some(pending)) => pending,
            _ => return Err(self.refuse("complete a handover")),
        };
        if pending.token != token {
            return Err(VmmError::WrongToken);
        }
        pending
            .ticket
            .set(TicketState::Completed)
            .map_err(VmmError::Ticket)?;
        self.handover = None;
        self.phase = VmPhase::HandedOver;
        Ok(())
    }

    /// Records the process that confirmed the handover (its peer credentials), for `status`.
    pub fn record_moved_to(&mut self, pid: u32) {
        if self.phase == VmPhase::HandedOver {
            self.moved_to_pid = Some(pid);
        }
    }
}

impl Vmm {
    /// Watches the target of the handover just handed out through `pidfd`; returns the fd for
    /// the event loop to wait on. A target that asked for this runs the guest only once it
    /// confirmed, so if it exits first the guest can only be here.
    pub(crate) fn watch_target(&mut self, pidfd: OwnedFd) -> Option<RawFd> {
        let pending = self.handover.as_mut()?;
        let fd = pidfd.as_raw_fd();
        pending.target = Some(pidfd);
        Some(fd)
    }

    /// The watched target behind `fd` exited: if its handover is still the one in progress,
    /// it was never confirmed, and the VM resumes here.
    pub(crate) fn target_exited(&mut self, fd: RawFd) {
        let watched = self
            .handover
            .as_mut()
            .and_then(|pending| pending.target.take_if(|t| t.as_raw_fd() == fd));
        if watched.is_none() {
            return;
        }
        log::warn!("the handover's target exited without confirming: resuming the VM here");
        if let Err(e) = self.resume() {
            log::error!(
                "cannot resume the VM after its target exited: {}",
                luvmm_resources::errors::error_chain(&e)
            );
        }
    }
}

/// A pidfd on process `pid`: readable once it exits.
pub(crate) fn open_pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; it touches no
    // memory of this process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    match i32::try_from(fd) {
        Ok(fd) if fd >= 0 => {
            // SAFETY: the kernel just returned this fd, open and owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// A random token, in hex.
fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
