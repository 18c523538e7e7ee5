//! INTx: a level-triggered IOAPIC line fed through an irqfd with a resample eventfd, so the
//! guest's EOI (KVM writes the resample eventfd) unmasks the line in VFIO. VFIO runs one
//! interrupt type at a time, so INTx is on only while the guest has MSI and MSI-X off.

use luvmm_resources::state::IntxState;
use vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX;
use vfio_ioctls::VfioError;
use vmm_sys_util::eventfd::EventFd;

use crate::pci::config::{ConfigSpace, INTERRUPT_LINE};
use crate::vfio::function::VfioFunction;
use crate::vfio::irq::{HypervisorError, IrqRouter};

/// Whether the function has an interrupt pin and VFIO offers its INTx.
pub(super) fn offered(function: &dyn VfioFunction, config: &ConfigSpace) -> bool {
    // The pin is the byte after the line register.
    function.irq_count(VFIO_PCI_INTX_IRQ_INDEX) > 0 && config.u16_at(INTERRUPT_LINE) >> 8 != 0
}

/// The device's INTx line and its eventfds.
pub(super) struct Intx {
    pub(super) line: u32,
    /// VFIO signals it while the line is asserted.
    pub(super) trigger: EventFd,
    /// KVM signals it on the guest's EOI; VFIO then unmasks.
    pub(super) resample: EventFd,
    /// VFIO's INTx is on (the guest has no MSI or MSI-X on).
    pub(super) enabled: bool,
}

impl Intx {
    /// Has VFIO signal `trigger` and unmask on `resample` (`on`), or stop.
    pub(super) fn arm(&self, function: &dyn VfioFunction, on: bool) -> Result<(), VfioError> {
        if on {
            function
                .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, &[&self.trigger])
                .and_then(|_| function.set_intx_resample(&self.resample))
        } else {
            function.disable_irq(VFIO_PCI_INTX_IRQ_INDEX)
        }
    }

    /// Attaches the eventfds to the line (`attach`), or detaches the trigger, leaving
    /// signals in it.
    pub(super) fn attach(
        &self,
        router: &dyn IrqRouter,
        attach: bool,
    ) -> Result<(), HypervisorError> {
        if attach {
            router.register_resample_irqfd(&self.trigger, &self.resample, self.line)
        } else {
            router.unregister_irqfd(&self.trigger, self.line)
        }
    }

    pub(super) fn save(&self) -> IntxState {
        IntxState {
            line: self.line,
            enabled: self.enabled,
        }
    }
}
