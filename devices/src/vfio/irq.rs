//! Where a passthrough device's interrupts go: the router the VMM provides (KVM GSI routes and
//! irqfds), and the MSI-X vectors routed through it.
//!
//! VFIO signals one eventfd per MSI-X vector whatever the guest's mask bits say (the host
//! programs the real table, unmasked). The guest's masks are honoured here: a vector's eventfd
//! is attached to its GSI only while the vector and the function are unmasked. While masked,
//! a signal stays in the eventfd, the pending-bit array reports it, and attaching the irqfd on
//! unmask delivers it (KVM polls the eventfd when an irqfd is assigned). Detaching clears the
//! count (KVM reads it when the irqfd goes), so a delivered message never shows as pending.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use luvmm_resources::state::MsixState;

use crate::pci::msix::{MsixLayout, MsixTable};

/// What the VMM could not do for a device through `IrqRouter` or `GuestMapper`. The OS error
/// is the `source`, so only a chain-walking formatter shows it.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// A KVM ioctl failed; `op` names it and what it was for.
    #[error("{op}")]
    Ioctl {
        op: String,
        #[source]
        errno: std::io::Error,
    },
    /// A fixed pool is used up.
    #[error("no {what} left")]
    Exhausted { what: &'static str },
    /// An interrupt eventfd could not be created.
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// A restore asked for a number the guest already saw, and something else holds it.
    #[error("{what} {number} is already taken")]
    Taken { what: &'static str, number: u32 },
}

/// Where the VMM routes a device's interrupts: KVM GSI routes and irqfds, behind a trait so
/// devices know nothing of KVM.
pub trait IrqRouter: Send + Sync {
    /// A GSI for MSI no one else uses: any free one, or `saved` itself (a restore keeps
    /// the numbers the guest saw, so nothing it programmed changes meaning).
    fn allocate_gsi(&self, saved: Option<u32>) -> Result<u32, HypervisorError>;
    /// An IOAPIC pin for INTx no one else uses: any free one, or `saved` itself.
    fn allocate_intx_line(&self, saved: Option<u32>) -> Result<u32, HypervisorError>;
    /// Routes `gsi` to the MSI message (address, data).
    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), HypervisorError>;
    /// Makes a write to `evt` raise `gsi`.
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), HypervisorError>;
    /// Undoes `register_irqfd`: writes to `evt` stay in it.
    fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), HypervisorError>;
    /// Makes a write to `trigger` assert level-triggered `gsi`; when the guest acknowledges it,
    /// KVM writes `resample` (which VFIO takes as "unmask").
    fn register_resample_irqfd(
        &self,
        trigger: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<(), HypervisorError>;
}

/// One MSI-X vector: its GSI, the eventfd VFIO signals, and whether that eventfd is attached.
struct MsixVector {
    gsi: u32,
    trigger: EventFd,
    delivering: bool,
}

/// The emulated MSI-X capability: the guest's table, its enable and function-mask bits, and
/// one GSI + eventfd per vector once the guest first enables it.
pub struct MsixRouting {
    /// Capability offset in configuration space.
    pub offset: usize,
    pub layout: MsixLayout,
    pub table: MsixTable,
    vectors: Vec<MsixVector>,
    enabled: bool,
    function_masked: bool,
    /// While set, no vector is attached: messages wait in their eventfds (the VM is paused
    /// and may be moving to another process).
    held: bool,
}

impl MsixRouting {
    /// The capability at `offset`, disabled, every vector masked.
    pub fn new(offset: usize, layout: MsixLayout) -> MsixRouting {
        MsixRouting {
            offset,
            layout,
            table: MsixTable::new(layout.vectors),
            vectors: Vec::new(),
            enabled: false,
            function_masked: false,
            held: false,
        }
    }

    /// The capability as saved: the guest's table, its vectors on the GSIs it had and on
    /// `triggers` (the eventfds VFIO signals, handed over or new), and its control bits. It
    /// comes back held: `hold(false)` attaches the vectors the guest left unmasked, and a
    /// message that waited in an eventfd during the switch is delivered then.
    pub fn restore(
        offset: usize,
        layout: MsixLayout,
        saved: &MsixState,
        function_masked: bool,
        triggers: Vec<EventFd>,
        router: &dyn IrqRouter,
    ) -> Result<MsixRouting, HypervisorError> {
        let mut msix = MsixRouting::new(offset, layout);
        msix.held = true;
        msix.table = MsixTable::from_words(layout.vectors, &saved.table);
        for (&gsi, trigger) in saved.gsis.iter().zip(triggers) {
            msix.vectors.push(MsixVector {
                gsi: router.allocate_gsi(Some(gsi))?,
                trigger,
                delivering: false,
            });
        }
        msix.set_control(saved.enabled, function_masked, router)?;
        Ok(msix)
    }

    /// The eventfds of the vectors as they are, in vector order, for VFIO.
    pub fn triggers_now(&self) -> Vec<&EventFd> {
        self.vectors.iter().map(|v| &v.trigger).collect()
    }

    /// The eventfds VFIO signals, in vector order (empty until first enabled).
    pub fn trigger_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.vectors
            .iter()
            // SAFETY: each eventfd is owned by `self.vectors`, which outlives the borrow.
            .map(|v| unsafe { BorrowedFd::borrow_raw(v.trigger.as_raw_fd()) })
            .collect()
    }

    /// Detaches every vector (`true`) so that messages wait in their eventfds, or attaches
    /// again those the guest's masks let through (`false`).
    pub fn hold(&mut self, held: bool, router: &dyn IrqRouter) -> Result<(), HypervisorError> {
        self.held = held;
        (0..self.vectors.len()).try_for_each(|v| self.sync_vector(v, router))
    }

    /// Whether the guest has MSI-X on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The GSI of each vector (empty until first enabled).
    pub fn gsis(&self) -> Vec<u32> {
        self.vectors.iter().map(|v| v.gsi).collect()
    }

    /// Gives every vector a GSI and an eventfd, once; returns the eventfds in vector order,
    /// for VFIO.
    pub fn triggers(&mut self, router: &dyn IrqRouter) -> Result<Vec<&EventFd>, HypervisorError> {
        while self.vectors.len() < self.table.len() {
            self.vectors.push(MsixVector {
                gsi: router.allocate_gsi(None)?,
                trigger: EventFd::new(EFD_NONBLOCK).map_err(HypervisorError::EventFd)?,
                delivering: false,
            });
        }
        Ok(self.vectors.iter().map(|v| &v.trigger).collect())
    }

    /// Applies the capability's enable and function-mask bits; VFIO must already signal the
    /// eventfds when `enabled` turns on.
    pub fn set_control(
        &mut self,
        enabled: bool,
        function_masked: bool,
        router: &dyn IrqRouter,
    ) -> Result<(), HypervisorError> {
        self.enabled = enabled;
        self.function_masked = function_masked;
        (0..self.vectors.len()).try_for_each(|v| self.sync_vector(v, router))
    }

    /// A guest write of `data` at `offset` in the table; re-routes the vector it touched.
    pub fn write_table(
        &mut self,
        offset: u64,
        data: &[u8],
        router: &dyn IrqRouter,
    ) -> Result<(), HypervisorError> {
        match self.table.write(offset, data) {
            Some(vector) if vector < self.vectors.len() => self.sync_vector(vector, router),
            _ => Ok(()),
        }
    }

    /// Vector `index`'s eventfd, for tests that play the device.
    #[cfg(test)]
    pub fn vectors_trigger(&self, index: usize) -> &EventFd {
        &self.vectors[index].trigger
    }

    /// Whether vector `index` has a message held back by a mask.
    pub fn pending(&self, index: usize) -> bool {
        let Some(vector) = self.vectors.get(index) else {
            return false;
        };
        if vector.delivering {
            return false;
        }
        // SAFETY: the eventfd is owned by `vector`, alive for this call.
        let fd = unsafe { BorrowedFd::borrow_raw(vector.trigger.as_raw_fd()) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        // A zero timeout only looks: the count stays for the irqfd to take on unmask.
        poll(&mut fds, PollTimeout::ZERO).is_ok_and(|ready| ready > 0)
    }

    /// Attaches vector `index`'s eventfd to its GSI, routed to the table's message, when MSI-X
    /// is on and neither the function nor the vector is masked; detaches it otherwise.
    fn sync_vector(&mut self, index: usize, router: &dyn IrqRouter) -> Result<(), HypervisorError> {
        let (Some(vector), Some(entry)) = (self.vectors.get_mut(index), self.table.entry(index))
        else {
            return Ok(());
        };
        let deliver = self.enabled && !self.function_masked && !entry.masked && !self.held;
        if deliver {
            router.set_msi_route(vector.gsi, entry.address, entry.data)?;
            if !vector.delivering {
                router.register_irqfd(&vector.trigger, vector.gsi)?;
                vector.delivering = true;
            }
        } else if vector.delivering {
            router.unregister_irqfd(&vector.trigger, vector.gsi)?;
            vector.delivering = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::testing::FakeRouter;

    /// Two vectors, enabled with `function_masked`, vector 0 programmed (masked or not).
    fn enabled(router: &FakeRouter, vector0_masked: bool, function_masked: bool) -> MsixRouting {
        let mut msix = MsixRouting::new(0x40, MsixLayout::decode(1, 0x2000, 0x3000));
        assert_eq!(msix.triggers(router).unwrap().len(), 2);
        for (offset, word) in [(0, 0xfee0_0000u32), (4, 0), (8, 0x41)] {
            msix.write_table(offset, &word.to_le_bytes(), router)
                .unwrap();
        }
        msix.write_table(12, &u32::from(vector0_masked).to_le_bytes(), router)
            .unwrap();
        router.take();
        msix.set_control(true, function_masked, router).unwrap();
        msix
    }

    #[test]
    fn only_unmasked_vectors_are_attached() {
        let router = FakeRouter::default();
        let msix = enabled(&router, false, false);
        assert_eq!(router.take(), ["route 24 0xfee00000 0x41", "attach 24"]);
        assert_eq!(msix.gsis(), [24, 25]);
        assert!(msix.enabled());
    }

    #[test]
    fn masking_a_vector_holds_its_message_until_unmasked() {
        let router = FakeRouter::default();
        let mut msix = enabled(&router, false, false);
        router.take();
        msix.write_table(12, &1u32.to_le_bytes(), &router).unwrap();
        assert_eq!(router.take(), ["detach 24"]);
        assert!(!msix.pending(0));
        msix.vectors[0].trigger.write(1).unwrap();
        assert!(msix.pending(0));
        assert!(!msix.pending(1));
        msix.write_table(12, &0u32.to_le_bytes(), &router).unwrap();
        assert_eq!(router.take(), ["route 24 0xfee00000 0x41", "attach 24"]);
        assert!(!msix.pending(0));
    }

    #[test]
    fn the_function_mask_and_disable_detach_every_vector() {
        let router = FakeRouter::default();
        let mut msix = enabled(&router, false, true);
        assert!(router.take().is_empty());
        msix.set_control(true, false, &router).unwrap();
        assert_eq!(router.take(), ["route 24 0xfee00000 0x41", "attach 24"]);
        msix.set_control(false, false, &router).unwrap();
        assert_eq!(router.take(), ["detach 24"]);
    }

    #[test]
    fn a_masked_vector_is_programmed_but_not_attached() {
        let router = FakeRouter::default();
        let mut msix = enabled(&router, true, false);
        assert!(router.take().is_empty());
        msix.write_table(8, &0x42u32.to_le_bytes(), &router)
            .unwrap();
        assert!(router.take().is_empty());
        assert_eq!(msix.table.entry(0).map(|e| e.data), Some(0x42));
    }
}
