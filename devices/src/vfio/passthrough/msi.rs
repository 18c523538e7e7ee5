//! The emulated MSI capability. The guest programs address, data and the enable bit in the
//! shadow configuration space; enabling routes the device's KVM GSI to that message, attaches
//! the eventfd VFIO signals to the GSI, and has VFIO signal it.

use luvmm_resources::state::MsiState;
use vfio_bindings::bindings::vfio::VFIO_PCI_MSI_IRQ_INDEX;
use vfio_ioctls::VfioError;
use vmm_sys_util::eventfd::EventFd;

use super::interrupts::InterruptError;
use crate::pci::config::ConfigSpace;
use crate::vfio::function::VfioFunction;
use crate::vfio::irq::{HypervisorError, IrqRouter};
use luvmm_resources::errors::error_chain;

pub(super) const MSI_CAPABILITY_ID: u8 = 0x05;

const MSI_CONTROL_ENABLE: u16 = 1 << 0;
const MSI_CONTROL_64BIT: u16 = 1 << 7;
/// Bytes of the capability a guest write can reach (header to mask bits).
const MSI_CAPABILITY_LEN: usize = 16;

/// Makes the capability at `offset` the guest's to program: the control register's enable
/// bit, the address and the data. The rest stays the device's.
pub(super) fn expose(config: &mut ConfigSpace, offset: usize) {
    let data_end = if is_64bit(config, offset) { 14 } else { 10 };
    config.make_writable(offset + 2, &MSI_CONTROL_ENABLE.to_le_bytes());
    config.make_writable(offset + 4, &vec![0xff; data_end - 4]);
}

fn is_64bit(config: &ConfigSpace, offset: usize) -> bool {
    config.u16_at(offset + 2) & MSI_CONTROL_64BIT != 0
}

/// The emulated MSI capability and the route behind it.
pub(super) struct Msi {
    /// Capability offset in configuration space.
    pub(super) offset: usize,
    is_64bit: bool,
    pub(super) gsi: u32,
    /// The eventfd VFIO signals.
    pub(super) trigger: EventFd,
    /// The guest has MSI on (and VFIO signals `trigger`, unless quiesced).
    pub(super) enabled: bool,
}

impl Msi {
    /// The capability at `offset` in `config`, off, raising `gsi` through `trigger`.
    pub(super) fn new(config: &ConfigSpace, offset: usize, gsi: u32, trigger: EventFd) -> Msi {
        Msi {
            offset,
            is_64bit: is_64bit(config, offset),
            gsi,
            trigger,
            enabled: false,
        }
    }

    /// Whether a guest write to `[start, end)` of configuration space reaches the capability.
    pub(super) fn written(&self, start: usize, end: usize) -> bool {
        start < self.offset + MSI_CAPABILITY_LEN && end > self.offset
    }

    /// Whether the guest's enable bit is set.
    pub(super) fn enable_bit(&self, config: &ConfigSpace) -> bool {
        config.u16_at(self.offset + 2) & MSI_CONTROL_ENABLE != 0
    }

    /// The guest's message (address, data).
    fn message(&self, config: &ConfigSpace) -> (u64, u32) {
        let low = u64::from(config.read_u32(self.offset + 4));
        let (address, data_at) = if self.is_64bit {
            (
                low | u64::from(config.read_u32(self.offset + 8)) << 32,
                self.offset + 12,
            )
        } else {
            (low, self.offset + 8)
        };
        (address, u32::from(config.u16_at(data_at)))
    }

    /// Has VFIO signal `trigger` (`on`) or stop.
    pub(super) fn arm(&self, function: &dyn VfioFunction, on: bool) -> Result<(), VfioError> {
        if on {
            function.enable_irq(VFIO_PCI_MSI_IRQ_INDEX, &[&self.trigger])
        } else {
            function.disable_irq(VFIO_PCI_MSI_IRQ_INDEX)
        }
    }

    /// Attaches `trigger` to the GSI (`attach`) or detaches it, leaving signals in it.
    pub(super) fn attach(
        &self,
        router: &dyn IrqRouter,
        attach: bool,
    ) -> Result<(), HypervisorError> {
        if attach {
            router.register_irqfd(&self.trigger, self.gsi)
        } else {
            router.unregister_irqfd(&self.trigger, self.gsi)
        }
    }

    /// Routes the GSI to the guest's message and, the first time, attaches the irqfd (unless
    /// `held`) and, when `arm_vfio`, has VFIO signal the eventfd. A failure leaves MSI off
    /// with nothing attached, so the guest's next enable tries again.
    pub(super) fn enable(
        &mut self,
        config: &ConfigSpace,
        router: &dyn IrqRouter,
        function: &dyn VfioFunction,
        held: bool,
        arm_vfio: bool,
    ) -> Result<(), InterruptError> {
        let (address, data) = self.message(config);
        router.set_msi_route(self.gsi, address, data)?;
        if !self.enabled {
            if !held {
                self.attach(router, true)?;
            }
            if arm_vfio {
                if let Err(e) = self.arm(function, true) {
                    let _ = self.attach(router, false);
                    return Err(e.into());
                }
            }
        }
        self.enabled = true;
        Ok(())
    }

    /// Stops VFIO's MSI and detaches the irqfd (KVM takes one irqfd per eventfd: the next
    /// enable attaches it again). Failures are logged: the guest turned MSI off either way.
    pub(super) fn disable(
        &mut self,
        router: &dyn IrqRouter,
        function: &dyn VfioFunction,
        held: bool,
        bdf: &str,
    ) {
        if let Err(e) = self.arm(function, false) {
            log::error!("{bdf}: cannot disable MSI: {}", error_chain(&e));
        }
        if !held {
            if let Err(e) = self.attach(router, false) {
                log::error!("{bdf}: cannot detach the MSI irqfd: {}", error_chain(&e));
            }
        }
        self.enabled = false;
    }

    pub(super) fn save(&self) -> MsiState {
        MsiState {
            offset: self.offset,
            enabled: self.enabled,
            gsi: self.gsi,
        }
    }
}
