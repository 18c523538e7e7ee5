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

/// An interrupt setting that KVM or VFIO refused: logged when the guest made it (the guest
/// cannot be told), returned when a restore puts it back.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
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
    /// The interrupts `quiesce` turned off in VFIO for a live update, and only those: what
    /// turning them on again must put back, even after a quiesce that stopped halfway.
    quiesced: Vec<VfioIrq>,
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
            quiesced: Vec::new(),
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
    ///
    /// Any refusal fails the restore: the guest would get a device that never interrupts,
    /// and nothing after the restore would notice.
    pub(super) fn resume(
        &mut self,
        saved: &PassthroughState,
        vfio_armed: bool,
        config: &ConfigSpace,
        function: &dyn VfioFunction,
        bdf: &str,
    ) -> Result<(), PassthroughError> {
        let refused = |what: &'static str| {
            move |source| PassthroughError::Rearm {
                bdf: bdf.to_string(),
                what,
                source,
            }
        };
        if saved.msi.is_some_and(|m| m.enabled) {
            self.enable_msi(!vfio_armed, config, function)
                .map_err(refused("MSI"))?;
        }
        if let Some(msix) = self.msix.as_ref().filter(|m| m.enabled()) {
            if !vfio_armed {
                arm_msix(msix, function, true)
                    .map_err(|e| refused("MSI-X")(InterruptError::Vfio(e)))?;
            }
        }
        if let Some(intx) = self.intx.as_mut() {
            intx.enabled = saved.intx.is_some_and(|i| i.enabled);
            if intx.enabled && !vfio_armed {
                intx.enabled = false;
                self.try_set_intx(true, function)
                    .map_err(|e| refused("INTx")(InterruptError::Vfio(e)))?;
            }
        }
        Ok(())
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
    ///
    /// Turning off is all or nothing: when one refuses, those already off go back on before
    /// the error is returned (one that cannot stays recorded, for `!off` to try again).
    /// Turning on tries each, and keeps those that refuse recorded.
    pub(super) fn quiesce(
        &mut self,
        off: bool,
        function: &dyn VfioFunction,
        bdf: &str,
    ) -> Result<(), PassthroughError> {
        let error = |on: bool| {
            move |(irq, source): (VfioIrq, VfioError)| PassthroughError::Vfio {
                bdf: bdf.to_string(),
                op: irq.op(on),
                source,
            }
        };
        if !off {
            return self.arm_quiesced(function).map_err(error(true));
        }
        for irq in VfioIrq::ALL {
            if !self.guest_enabled(irq) || self.quiesced.contains(&irq) {
                continue;
            }
            if let Err(source) = self.arm(irq, function, false) {
                if let Err(undo) = self.arm_quiesced(function) {
                    log::error!("{}", error_chain(&error(true)(undo)));
                }
                return Err(error(false)((irq, source)));
            }
            self.quiesced.push(irq);
        }
        Ok(())
    }

    /// Arms in VFIO what the guest has enabled, on a function opened anew (whose file has no
    /// interrupt on).
    pub(super) fn rearm(
        &mut self,
        function: &dyn VfioFunction,
        bdf: &str,
    ) -> Result<(), PassthroughError> {
        self.quiesced = VfioIrq::ALL
            .into_iter()
            .filter(|&irq| self.guest_enabled(irq))
            .collect();
        self.quiesce(false, function, bdf)
    }

    /// Turns on again each interrupt `quiesce` turned off; returns the first that refused
    /// (those that did stay recorded).
    fn arm_quiesced(&mut self, function: &dyn VfioFunction) -> Result<(), (VfioIrq, VfioError)> {
        let mut first_refusal = None;
        for irq in std::mem::take(&mut self.quiesced) {
            if let Err(e) = self.arm(irq, function, true) {
                self.quiesced.push(irq);
                first_refusal.get_or_insert((irq, e));
            }
        }
        first_refusal.map_or(Ok(()), Err)
    }

    /// Whether the guest has `irq` on (so VFIO signals it, unless quiesced).
    fn guest_enabled(&self, irq: VfioIrq) -> bool {
        match irq {
            VfioIrq::Msi => self.msi.as_ref().is_some_and(|m| m.enabled),
            VfioIrq::Msix => self.msix.as_ref().is_some_and(|m| m.enabled()),
            VfioIrq::Intx => self.intx.as_ref().is_some_and(|i| i.enabled),
        }
    }

    /// Has VFIO signal `irq`'s eventfds (`on`), or stop.
    fn arm(&self, irq: VfioIrq, function: &dyn VfioFunction, on: bool) -> Result<(), VfioError> {
        match irq {
            VfioIrq::Msi => self.msi.as_ref().map_or(Ok(()), |m| m.arm(function, on)),
            VfioIrq::Msix => self
                .msix
                .as_ref()
                .map_or(Ok(()), |m| arm_msix(m, function, on)),
            VfioIrq::Intx => self.intx.as_ref().map_or(Ok(()), |i| i.arm(function, on)),
        }
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

    /// Turns VFIO's INTx off before MSI or MSI-X, and back on after; a refusal is logged
    /// (the guest's config write that asked for it cannot fail).
    fn set_intx(&mut self, on: bool, function: &dyn VfioFunction, bdf: &str) {
        if let Err(e) = self.try_set_intx(on, function) {
            let line = self.intx.as_ref().map_or(0, |i| i.line);
            log::error!(
                "{bdf}: cannot turn INTx on line {line} {on}: {}",
                error_chain(&e)
            );
        }
    }

    /// `set_intx`, returning the refusal.
    fn try_set_intx(&mut self, on: bool, function: &dyn VfioFunction) -> Result<(), VfioError> {
        let Some(intx) = self.intx.as_mut() else {
            return Ok(());
        };
        if intx.enabled != on {
            intx.arm(function, on)?;
            intx.enabled = on;
        }
        Ok(())
    }

    /// Routes MSI to the guest's message; the first time, INTx goes off, the irqfd is
    /// attached and (when `arm_vfio`) VFIO signals the eventfd.
    fn enable_msi(
        &mut self,
        arm_vfio: bool,
        config: &ConfigSpace,
        function: &dyn VfioFunction,
    ) -> Result<(), InterruptError> {
        if self.msi.as_ref().is_some_and(|msi| !msi.enabled) {
            self.try_set_intx(false, function)?;
        }
        let Some(msi) = self.msi.as_mut() else {
            return Ok(());
        };
        msi.enable(config, self.router.as_ref(), function, self.held, arm_vfio)
    }

    /// Applies the guest's MSI enable bit: on, route and arm; off, stop VFIO's MSI and bring
    /// INTx back.
    fn update_msi(&mut self, config: &ConfigSpace, function: &dyn VfioFunction, bdf: &str) {
        let Some(msi) = self.msi.as_mut() else { return };
        if msi.enable_bit(config) {
            if let Err(e) = self.enable_msi(true, config, function) {
                log::error!("{bdf}: cannot enable MSI: {}", error_chain(&e));
            }
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

/// One of the interrupt types VFIO signals, as `quiesce` turns them off and on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VfioIrq {
    Msi,
    Msix,
    Intx,
}

impl VfioIrq {
    const ALL: [VfioIrq; 3] = [VfioIrq::Msi, VfioIrq::Msix, VfioIrq::Intx];

    /// What `quiesce` was doing to it (turning it `on` again, or off), for an error.
    fn op(self, on: bool) -> &'static str {
        match (self, on) {
            (VfioIrq::Msi, false) => "MSI off for the update",
            (VfioIrq::Msi, true) => "MSI on again",
            (VfioIrq::Msix, false) => "MSI-X off for the update",
            (VfioIrq::Msix, true) => "MSI-X on again",
            (VfioIrq::Intx, false) => "INTx off for the update",
            (VfioIrq::Intx, true) => "INTx on again",
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
