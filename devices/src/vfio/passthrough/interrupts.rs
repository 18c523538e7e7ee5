//! A passthrough device's interrupts in one place: MSI, MSI-X and INTx, the router they go
//! through, and the two switches the VMM throws on all of them at once: `hold` (irqfds
//! detached while the VM is paused, so signals wait in the eventfds) and `quiesce` (VFIO's
//! side off for a live update). VFIO runs one interrupt type at a time, so INTx is turned off
//! while the guest has MSI or MSI-X on, and back on after.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use luvmm_resources::state::{MsixState, PassthroughState};
use vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX;
use vfio_ioctls::VfioError;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::handover::{borrow, InterruptFds};
use super::intx::Intx;
use super::layout::Capabilities;
use super::msi::Msi;
use super::PassthroughError;
use crate::pci::config::{ConfigSpace, INTERRUPT_LINE};
use crate::pci::msix::{read_pba, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use crate::vfio::function::VfioFunction;
use crate::vfio::irq::{HypervisorError, IrqRouter, MsixRouting};
use luvmm_resources::errors::error_chain;

/// A guest's interrupt setting that KVM or VFIO refused; logged, as the guest cannot be told.
#[derive(Debug, thiserror::Error)]
pub(super) enum InterruptError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Vfio(#[from] VfioError),
}

/// The device's interrupts and where they go.
pub(super) struct Interrupts {
    pub(super) msi: Option<Msi>,
    pub(super) msix: Option<MsixRouting>,
    pub(super) intx: Option<Intx>,
    router: Arc<dyn IrqRouter>,
    /// VFIO's interrupts are off for a live update (`quiesce`).
    quiesced: bool,
    /// The irqfds are detached: interrupts wait in their eventfds. A device starts so, and
    /// the VMM attaches them when the VM first runs (`hold(false)`): KVM takes a waiting
    /// signal as soon as an irqfd is attached, and vCPUs not yet restored would lose it.
    held: bool,
}

impl Interrupts {
    /// The interrupts `caps` offers, held: on the numbers `saved` gave the guest and the
    /// eventfds `handed` brings, or on new ones. A fresh INTx line is written into `config`
    /// for the guest to read; a saved one is already there.
    pub(super) fn build(
        caps: &Capabilities,
        config: &mut ConfigSpace,
        router: Arc<dyn IrqRouter>,
        saved: Option<&PassthroughState>,
        mut handed: InterruptFds,
    ) -> Result<Interrupts, HypervisorError> {
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(HypervisorError::EventFd);
        let msi = match caps.msi {
            Some(offset) => {
                let gsi = router.allocate_gsi(saved.and_then(|s| s.msi).map(|m| m.gsi))?;
                let trigger = match handed.msi.take() {
                    Some(evt) => evt,
                    None => new_evt()?,
                };
                Some(Msi::new(config, offset, gsi, trigger))
            }
            None => None,
        };
        let msix = match (caps.msix, saved.and_then(|s| s.msix.as_ref())) {
            (Some((offset, layout)), Some(saved_msix)) => {
                let mut triggers = std::mem::take(&mut handed.msix);
                while triggers.len() < saved_msix.gsis.len() {
                    triggers.push(new_evt()?);
                }
                let function_masked = config.u16_at(offset + 2) & MSIX_FUNCTION_MASK != 0;
                Some(MsixRouting::restore(
                    offset,
                    layout,
                    saved_msix,
                    function_masked,
                    triggers,
                    router.as_ref(),
                )?)
            }
            (Some((offset, layout)), None) => {
                let mut routing = MsixRouting::new(offset, layout);
                // No vector yet, so nothing to detach: held like the rest of the device.
                routing.hold(true, router.as_ref())?;
                Some(routing)
            }
            (None, _) => None,
        };
        let intx = if caps.intx {
            let saved_intx = saved.and_then(|s| s.intx);
            let line = router.allocate_intx_line(saved_intx.map(|i| i.line))?;
            if saved_intx.is_none() {
                // The guest reads the line from an 8-bit register.
                let register = u8::try_from(line).map_err(|_| HypervisorError::Exhausted {
                    what: "INTx line that fits the 8-bit Interrupt Line register",
                })?;
                config.set_raw(INTERRUPT_LINE, &[register]);
            }
            let (trigger, resample) = match handed.intx.take() {
                Some(pair) => pair,
                None => (new_evt()?, new_evt()?),
            };
            Some(Intx {
                line,
                trigger,
                resample,
                enabled: false,
            })
        } else {
            None
        };
        Ok(Interrupts {
            msi,
            msix,
            intx,
            router,
            quiesced: false,
            held: true,
        })
    }

    /// A fresh device's start: INTx on in VFIO, as the guest has no MSI yet.
    pub(super) fn start(&mut self, function: &dyn VfioFunction, bdf: &str) {
        self.set_intx(true, function, bdf);
    }

    /// Puts the saved interrupt setup back: the MSI route and its irqfd, and VFIO's side
    /// unless it is still armed (`vfio_armed`: the eventfds were handed over). MSI-X was
    /// routed by `build`; here VFIO is told of its eventfds when needed.
    pub(super) fn resume(
        &mut self,
        saved: &PassthroughState,
        vfio_armed: bool,
        config: &ConfigSpace,
        function: &dyn VfioFunction,
        bdf: &str,
    ) {
        if saved.msi.is_some_and(|m| m.enabled) {
            self.enable_msi(!vfio_armed, config, function, bdf);
        }
        if let Some(msix) = self.msix.as_ref().filter(|m| m.enabled()) {
            if !vfio_armed {
                if let Err(e) = arm_msix(msix, function, true) {
                    log::error!("{bdf}: cannot arm MSI-X again: {}", error_chain(&e));
                }
            }
        }
        if let Some(intx) = self.intx.as_mut() {
            intx.enabled = saved.intx.is_some_and(|i| i.enabled);
            if intx.enabled && !vfio_armed {
                intx.enabled = false;
                self.set_intx(true, function, bdf);
            }
        }
    }

    /// The eventfds to hand to another process with the device fd, in `InterruptFds` order.
    pub(super) fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        fds.extend(self.msi.as_ref().map(|m| borrow(&m.trigger)));
        if let Some(msix) = &self.msix {
            fds.extend(msix.trigger_fds());
        }
        if let Some(intx) = &self.intx {
            fds.push(borrow(&intx.trigger));
            fds.push(borrow(&intx.resample));
        }
        fds
    }

    /// Detaches every irqfd (`true`), or attaches them again (`false`). Errors are logged:
    /// the guest would miss interrupts, but nothing else can be done about a refused KVM
    /// call here.
    pub(super) fn hold(&mut self, held: bool, bdf: &str) {
        if self.held == held {
            return;
        }
        self.held = held;
        let router = self.router.as_ref();
        let mut failures = Vec::new();
        if let Some(msi) = self.msi.as_ref().filter(|m| m.enabled) {
            failures.extend(msi.attach(router, !held).err());
        }
        if let Some(msix) = self.msix.as_mut() {
            failures.extend(msix.hold(held, router).err());
        }
        if let Some(intx) = &self.intx {
            failures.extend(intx.attach(router, !held).err());
        }
        for e in failures {
            log::error!(
                "{bdf}: cannot {} an irqfd: {}",
                if held { "detach" } else { "attach" },
                error_chain(&e)
            );
        }
    }

    /// Turns off every interrupt VFIO signals (`off`), or puts back what the guest has
    /// enabled (`!off`). The guest-visible state (enables, routes, table) is untouched.
    pub(super) fn quiesce(
        &mut self,
        off: bool,
        function: &dyn VfioFunction,
        bdf: &str,
    ) -> Result<(), PassthroughError> {
        if self.quiesced == off {
            return Ok(());
        }
        let vfio = |op: &'static str| {
            move |source| PassthroughError::Vfio {
                bdf: bdf.to_string(),
                op,
                source,
            }
        };
        if let Some(msi) = self.msi.as_ref().filter(|m| m.enabled) {
            msi.arm(function, !off)
                .map_err(vfio("MSI on or off for the update"))?;
        }
        if let Some(msix) = self.msix.as_ref().filter(|m| m.enabled()) {
            arm_msix(msix, function, !off).map_err(vfio("MSI-X on or off for the update"))?;
        }
        if let Some(intx) = self.intx.as_ref().filter(|i| i.enabled) {
            intx.arm(function, !off)
                .map_err(vfio("INTx on or off for the update"))?;
        }
        self.quiesced = off;
        Ok(())
    }

    /// Arms in VFIO what the guest has enabled, on a function opened anew (whose file has no
    /// interrupt on).
    pub(super) fn rearm(
        &mut self,
        function: &dyn VfioFunction,
        bdf: &str,
    ) -> Result<(), PassthroughError> {
        self.quiesced = true;
        self.quiesce(false, function, bdf)
    }

    /// Signals the first enabled MSI or MSI-X vector once; returns whether one was sent.
    pub(super) fn inject(&self) -> bool {
        let trigger = match (&self.msi, &self.msix) {
            (Some(msi), _) if msi.enabled => Some(&msi.trigger),
            (_, Some(msix)) if msix.enabled() => msix.triggers_now().first().copied(),
            _ => None,
        };
        trigger.is_some_and(|evt| evt.write(1).is_ok())
    }

    /// Applies a guest write to `[start, end)` of `config` when it reached the MSI or MSI-X
    /// capability.
    pub(super) fn config_written(
        &mut self,
        start: usize,
        end: usize,
        config: &ConfigSpace,
        function: &dyn VfioFunction,
        bdf: &str,
    ) {
        if self.msi.as_ref().is_some_and(|msi| msi.written(start, end)) {
            self.update_msi(config, function, bdf);
        }
        if let Some(msix) = &self.msix {
            if start < msix.offset + 4 && end > msix.offset + 2 {
                self.update_msix(config, function, bdf);
            }
        }
    }

    /// Serves a guest read of BAR `bar` that falls in the emulated MSI-X table or pending
    /// bits; returns whether it did.
    pub(super) fn msix_bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) -> bool {
        let Some(msix) = &self.msix else {
            return false;
        };
        if let Some(at) = msix.layout.table_offset_of(bar, offset, data.len()) {
            msix.table.read(at, data);
            return true;
        }
        if let Some(at) = msix.layout.pba_offset_of(bar, offset, data.len()) {
            read_pba(at, data, |vector| msix.pending(vector));
            return true;
        }
        false
    }

    /// Takes a guest write to BAR `bar` that falls in the emulated MSI-X table (the pending
    /// bits are read-only); returns whether it did.
    pub(super) fn msix_bar_write(
        &mut self,
        bar: usize,
        offset: u64,
        data: &[u8],
        bdf: &str,
    ) -> bool {
        let Some(msix) = self.msix.as_mut() else {
            return false;
        };
        if let Some(at) = msix.layout.table_offset_of(bar, offset, data.len()) {
            if let Err(e) = msix.write_table(at, data, self.router.as_ref()) {
                log::error!("{bdf}: MSI-X table write at {at:#x}: {}", error_chain(&e));
            }
            return true;
        }
        msix.layout.pba_offset_of(bar, offset, data.len()).is_some()
    }

    /// Turns VFIO's INTx off before MSI or MSI-X, and back on after.
    fn set_intx(&mut self, on: bool, function: &dyn VfioFunction, bdf: &str) {
        let Some(intx) = self.intx.as_mut() else {
            return;
        };
        if intx.enabled == on {
            return;
        }
        match intx.arm(function, on) {
            Ok(()) => intx.enabled = on,
            Err(e) => log::error!(
                "{bdf}: cannot turn INTx on line {} {on}: {}",
                intx.line,
                error_chain(&e)
            ),
        }
    }

    /// Routes MSI to the guest's message; the first time, INTx goes off, the irqfd is
    /// attached and (when `arm_vfio`) VFIO signals the eventfd.
    fn enable_msi(
        &mut self,
        arm_vfio: bool,
        config: &ConfigSpace,
        function: &dyn VfioFunction,
        bdf: &str,
    ) {
        if self.msi.as_ref().is_some_and(|msi| !msi.enabled) {
            self.set_intx(false, function, bdf);
        }
        let Some(msi) = self.msi.as_mut() else { return };
        if let Err(e) = msi.enable(config, self.router.as_ref(), function, self.held, arm_vfio) {
            log::error!("{bdf}: cannot enable MSI: {}", error_chain(&e));
        }
    }

    /// Applies the guest's MSI enable bit: on, route and arm; off, stop VFIO's MSI and bring
    /// INTx back.
    fn update_msi(&mut self, config: &ConfigSpace, function: &dyn VfioFunction, bdf: &str) {
        let Some(msi) = self.msi.as_mut() else { return };
        if msi.enable_bit(config) {
            self.enable_msi(true, config, function, bdf);
        } else if msi.enabled {
            msi.disable(self.router.as_ref(), function, self.held, bdf);
            self.set_intx(true, function, bdf);
        }
    }

    /// Applies the guest's MSI-X enable and function-mask bits: on enable, give each vector
    /// a GSI and an eventfd and hand the eventfds to VFIO; on disable, stop VFIO's MSI-X and
    /// bring INTx back. Vectors reach the guest only while unmasked.
    fn update_msix(&mut self, config: &ConfigSpace, function: &dyn VfioFunction, bdf: &str) {
        let Some(msix) = self.msix.as_ref() else {
            return;
        };
        let control = config.u16_at(msix.offset + 2);
        let enable = control & MSIX_ENABLE != 0;
        let function_masked = control & MSIX_FUNCTION_MASK != 0;
        let was_enabled = msix.enabled();
        if enable && !was_enabled {
            self.set_intx(false, function, bdf);
        }
        let Some(msix) = self.msix.as_mut() else {
            return;
        };
        let router = self.router.as_ref();
        if let Err(e) = switch_msix(msix, enable, function_masked, router, function) {
            log::error!(
                "{bdf}: MSI-X {}: {}",
                if enable { "on" } else { "off" },
                error_chain(&e)
            );
        }
        if !enable && was_enabled {
            self.set_intx(true, function, bdf);
        }
    }
}

/// Has VFIO signal the MSI-X vectors' eventfds (`on`), or stop.
fn arm_msix(msix: &MsixRouting, function: &dyn VfioFunction, on: bool) -> Result<(), VfioError> {
    if on {
        function.enable_irq(VFIO_PCI_MSIX_IRQ_INDEX, &msix.triggers_now())
    } else {
        function.disable_irq(VFIO_PCI_MSIX_IRQ_INDEX)
    }
}

/// Turns VFIO's MSI-X on or off as `enable` changes, then applies the control bits to the
/// routes. On first enable every vector gets its GSI and eventfd.
fn switch_msix(
    msix: &mut MsixRouting,
    enable: bool,
    function_masked: bool,
    router: &dyn IrqRouter,
    function: &dyn VfioFunction,
) -> Result<(), InterruptError> {
    match (enable, msix.enabled()) {
        (true, false) => {
            let triggers = msix.triggers(router)?;
            function.enable_irq(VFIO_PCI_MSIX_IRQ_INDEX, &triggers)?;
        }
        (false, true) => function.disable_irq(VFIO_PCI_MSIX_IRQ_INDEX)?,
        _ => {}
    }
    msix.set_control(enable, function_masked, router)?;
    Ok(())
}

/// The guest's MSI-X table and vectors, as saved.
pub(super) fn msix_state(msix: &MsixRouting) -> MsixState {
    MsixState {
        offset: msix.offset,
        enabled: msix.enabled(),
        table: msix.table.words(),
        gsis: msix.gsis(),
    }
}
