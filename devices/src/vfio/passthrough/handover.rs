//! The interrupt eventfds of a device handed from one process to the next. VFIO keeps
//! signalling them through the switch, so the device rebuilt on them asks nothing of VFIO, and
//! an interrupt raised on the way waits in its eventfd until the new VM attaches it.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use luvmm_resources::state::PassthroughState;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmm_sys_util::eventfd::EventFd;

use super::PassthroughError;

/// The interrupt eventfds VFIO signals for a device, as handed from one process to the
/// next: with them, VFIO's interrupt setup carries on untouched.
#[derive(Default)]
pub struct InterruptFds {
    pub msi: Option<EventFd>,
    pub msix: Vec<EventFd>,
    /// Trigger and resample.
    pub intx: Option<(EventFd, EventFd)>,
}

impl InterruptFds {
    /// How many eventfds a device saved as `saved` hands over, in the order `from_fds` reads
    /// them: MSI, the MSI-X vectors, INTx trigger and resample.
    pub fn count(saved: &PassthroughState) -> usize {
        usize::from(saved.msi.is_some())
            + saved.msix.as_ref().map_or(0, |m| m.gsis.len())
            + 2 * usize::from(saved.intx.is_some())
    }

    /// How many of the eventfds hold a signal nobody has taken yet: interrupts the device
    /// raised while its VM was paused or on its way here, delivered once attached.
    pub fn waiting(&self) -> usize {
        let all = self.msi.iter().chain(&self.msix);
        let all = all.chain(self.intx.as_ref().map(|(trigger, _)| trigger));
        all.filter(|evt| {
            let mut fds = [PollFd::new(borrow(evt), PollFlags::POLLIN)];
            // A zero timeout only looks: the count stays for the irqfd.
            poll(&mut fds, PollTimeout::ZERO).is_ok_and(|ready| ready > 0)
        })
        .count()
    }

    /// Takes `count(saved)` fds from `fds`, in order.
    pub fn from_fds(
        saved: &PassthroughState,
        fds: &mut impl Iterator<Item = OwnedFd>,
    ) -> Result<InterruptFds, PassthroughError> {
        let expected = InterruptFds::count(saved);
        let taken: Vec<EventFd> = fds
            .take(expected)
            // SAFETY: each fd is owned (an `OwnedFd` given up here) and is an eventfd: the
            // handover sends only eventfds in these places, and a wrong kind of fd only makes
            // later eventfd reads and KVM_IRQFD fail.
            .map(|fd| unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
            .collect();
        if taken.len() != expected {
            return Err(PassthroughError::InterruptFds {
                bdf: saved.bdf.clone(),
                expected,
                got: taken.len(),
            });
        }
        let mut taken = taken.into_iter();
        let msi = saved.msi.and_then(|_| taken.next());
        let msix = taken
            .by_ref()
            .take(saved.msix.as_ref().map_or(0, |m| m.gsis.len()))
            .collect();
        let intx = saved
            .intx
            .and_then(|_| Some((taken.next()?, taken.next()?)));
        Ok(InterruptFds { msi, msix, intx })
    }
}

/// `evt`'s fd, borrowed for as long as `evt`.
pub(super) fn borrow(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the fd is owned by `evt`, which outlives the returned borrow.
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}
