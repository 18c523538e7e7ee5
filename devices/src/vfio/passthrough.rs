//! A vfio-pci function passed through to the guest: the device model over a `VfioFunction`.
//!
//! - Guest RAM is mapped into the VM's IOAS with `IOMMU_IOAS_MAP_FILE` (memfd + offset,
//!   IOVA == GPA), never by user address: that is what LUO preservation and a process switch
//!   need (`iommu::IommuContext`). The legacy container maps by address instead.
//! - The guest sees a shadow configuration space: the device's own identity and capability
//!   chain, with BARs placed by the VMM and guest-programmable, the command register forwarded,
//!   and the MSI capability emulated: enabling it routes a KVM GSI to an eventfd that VFIO
//!   signals. INTx goes to an IOAPIC line through an irqfd with a resample eventfd, so the
//!   guest's EOI unmasks it in VFIO.
//! - BARs VFIO lets us mmap are mapped into the guest as KVM memslots wherever the guest
//!   places them (no exits); the others, and every BAR with `BarMode::Trapped`, exit and are
//!   forwarded to the VFIO region. The BARs holding the MSI-X table and pending bits are always
//!   trapped: the guest's table and masks are emulated (`irq::MsixRouting`), and enabling MSI-X
//!   routes one GSI per vector.
//! - A device is built fresh (from the host function's own config space) or restored from its
//!   saved state: the guest's config space, the same GSIs and INTx line, the MSI-X table, the
//!   BARs at the same addresses. When its interrupt eventfds are handed over too, VFIO still
//!   signals them and nothing is asked of VFIO at all; otherwise the saved interrupt setup is
//!   armed again on new eventfds.
//! - While the VM is paused the device's irqfds are detached (`hold_interrupts`): an interrupt
//!   raised then waits in its eventfd and is delivered by whichever KVM VM attaches it next,
//!   this one on resume or the one in the process the VM moved to.
//!
//! Nothing here resets the device.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::sync::Arc;

use luvmm_resources::config::BarMode;
use luvmm_resources::state::{
    DmaMapping, IntxState, MsiState, MsixState, PassthroughState, VfioBackend,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_REGIONS,
};
use vfio_ioctls::VfioContainer;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pci::bus::PciDevice;
use crate::pci::config::{
    Bar, BarKind, ConfigSpace, ConfigSpaceError, BAR0, COMMAND, COMMAND_MEMORY, INTERRUPT_LINE,
    NUM_BARS,
};
use crate::pci::msix::{read_pba, MsixLayout, MSIX_CAPABILITY_ID, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use crate::vfio::bar_map::{BarMapError, DirectBar, GuestMapper};
use crate::vfio::function::{Unplugged, VfioFunction};
use crate::vfio::iommu::IommuError;
use crate::vfio::irq::{HypervisorError, IrqRouter, MsixRouting};

const MSI_CAPABILITY_ID: u8 = 0x05;
const PM_CAPABILITY_ID: u8 = 0x01;

const MSI_CONTROL_ENABLE: u16 = 1 << 0;
const MSI_CONTROL_64BIT: u16 = 1 << 7;

/// INTx: a level-triggered line with a resample eventfd, on while MSI is off.
struct Intx {
    line: u32,
    trigger: EventFd,
    resample: EventFd,
    enabled: bool,
}

/// A device could not be passed through. Each variant names the BDF.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("{bdf}: no such PCI device")]
    NoDevice { bdf: String },
    #[error("{bdf}: bound to {driver}, not vfio-pci")]
    WrongDriver { bdf: String, driver: String },
    #[error("{bdf}: /dev/iommu is missing: the kernel has no iommufd (CONFIG_IOMMUFD)")]
    NoIommufd { bdf: String },
    #[error("{bdf}: no VFIO cdev (CONFIG_VFIO_DEVICE_CDEV missing)")]
    NoCdev { bdf: String },
    #[error("{bdf}: the VFIO device is in use by another process")]
    Busy { bdf: String },
    #[error("{bdf}: its IOMMU group is not viable: {why}")]
    GroupNotViable { bdf: String, why: String },
    #[error("{bdf}: {op}")]
    Vfio {
        bdf: String,
        op: &'static str,
        #[source]
        source: vfio_ioctls::VfioError,
    },
    #[error("{bdf}: IOMMU context")]
    Iommu {
        bdf: String,
        #[source]
        source: IommuError,
    },
    #[error("{bdf}: interrupts")]
    Interrupt {
        bdf: String,
        #[source]
        source: HypervisorError,
    },
    #[error("{bdf}: its BARs do not fit a configuration space")]
    BarLayout {
        bdf: String,
        #[source]
        source: ConfigSpaceError,
    },
    #[error("{bdf}: BAR {index}: its size or type is not what it was")]
    BarChanged { bdf: String, index: usize },
    #[error("{bdf}: a BAR cannot be mapped for direct access")]
    DirectBar {
        bdf: String,
        #[source]
        source: BarMapError,
    },
    #[error(
        "{bdf}: the saved state is of device {saved:08x} (device, vendor), this one is {found:08x}"
    )]
    NotTheSavedDevice { bdf: String, saved: u32, found: u32 },
    #[error("{bdf}: the saved {capability} capability does not match the device's")]
    CapabilityMismatch {
        bdf: String,
        capability: &'static str,
    },
    #[error("{bdf}: the saved state needs {expected} interrupt eventfds, {got} were handed over")]
    InterruptFds {
        bdf: String,
        expected: usize,
        got: usize,
    },
}

/// The emulated MSI capability and the route behind it.
struct Msi {
    offset: usize,
    is_64bit: bool,
    gsi: u32,
    trigger: EventFd,
    enabled: bool,
}

/// How the device reaches guest RAM.
pub enum DeviceIommu {
    /// Bound to the VM's iommufd and attached to this HWPT over its IOAS.
    Iommufd { hwpt_id: u32 },
    /// A VFIO group in its own type1 container, DMA mapped by user address (what stock Debian
    /// kernels offer without iommufd). Such mappings belong to this process: the device can
    /// neither move to another process nor be preserved through LUO.
    Legacy(Arc<VfioContainer>),
}

/// A host function ready to be passed through: opened by BDF or adopted from an fd.
pub struct HostDevice {
    pub bdf: String,
    pub function: Box<dyn VfioFunction>,
    pub iommu: DeviceIommu,
}

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
        fds: &mut impl Iterator<Item = std::os::fd::OwnedFd>,
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

/// What a restored device is rebuilt from.
pub struct Restore<'a> {
    pub saved: &'a PassthroughState,
    /// The eventfds VFIO signals, when the device was handed over; `None` when VFIO's
    /// interrupts are off (after a kexec, or a device opened anew) and must be armed again.
    pub handed_over: Option<InterruptFds>,
}

/// A passed-through PCI function.
pub struct VfioPciDevice {
    bdf: String,
    mappings: Vec<DmaMapping>,
    function: Box<dyn VfioFunction>,
    iommu: DeviceIommu,
    config: ConfigSpace,
    msi: Option<Msi>,
    msix: Option<MsixRouting>,
    intx: Option<Intx>,
    router: Arc<dyn IrqRouter>,
    /// Maps direct BARs into the guest; kept to map them again from a reopened function.
    mapper: Arc<dyn GuestMapper>,
    bar_access: BarMode,
    direct_bars: Vec<DirectBar>,
    /// VFIO's interrupts are off for a live update (`quiesce_interrupts`).
    quiesced: bool,
    /// The irqfds are detached: interrupts wait in their eventfds. A device starts so, and
    /// the VMM attaches them when the VM first runs (`hold_interrupts(false)`): KVM takes a
    /// waiting signal as soon as an irqfd is attached, and vCPUs not yet restored would lose
    /// it.
    held: bool,
}

/// What the VMM provides a passthrough device with.
pub struct PassthroughArgs {
    pub router: Arc<dyn IrqRouter>,
    pub mapper: Arc<dyn GuestMapper>,
    pub bar_access: BarMode,
}

impl VfioPciDevice {
    /// Builds the guest's view of `host`: fresh, or as `restore` saved it. Its interrupts are
    /// held until `hold_interrupts(false)`.
    pub fn new(
        host: HostDevice,
        args: PassthroughArgs,
        restore: Option<Restore<'_>>,
    ) -> Result<VfioPciDevice, PassthroughError> {
        let HostDevice {
            bdf,
            function,
            iommu,
        } = host;
        let PassthroughArgs {
            router,
            mapper,
            mut bar_access,
        } = args;
        let name = || bdf.clone();
        let interrupt = |source| PassthroughError::Interrupt {
            bdf: name(),
            source,
        };
        let mut raw = [0u8; 256];
        function.read(VFIO_PCI_CONFIG_REGION_INDEX, &mut raw, 0);
        let mut config = ConfigSpace::from_device(&raw);
        for index in 0..NUM_BARS {
            if let Some(bar) = bar_shape(function.as_ref(), &raw, index) {
                config
                    .add_bar(index, bar)
                    .map_err(|source| PassthroughError::BarLayout {
                        bdf: name(),
                        source,
                    })?;
            }
        }
        let msi_offset = config.find_capability(MSI_CAPABILITY_ID);
        if let Some(offset) = msi_offset {
            let is_64bit = config.u16_at(offset + 2) & MSI_CONTROL_64BIT != 0;
            // Control (enable bit), address and data are the guest's to program.
            let data_end = if is_64bit { 14 } else { 10 };
            config.make_writable(offset + 2, &MSI_CONTROL_ENABLE.to_le_bytes());
            config.make_writable(offset + 4, &vec![0xff; data_end - 4]);
        }
        let msix_found = config.find_capability(MSIX_CAPABILITY_ID).map(|offset| {
            let control = config.u16_at(offset + 2);
            let layout = MsixLayout::decode(
                control,
                config.read_u32(offset + 4),
                config.read_u32(offset + 8),
            );
            // Starts disabled; enable and function mask are the guest's to set.
            config.set_raw(offset + 2, &(control & 0x7ff).to_le_bytes());
            config.make_writable(
                offset + 2,
                &(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes(),
            );
            (offset, layout)
        });
        let has_intx = function.irq_count(VFIO_PCI_INTX_IRQ_INDEX) > 0
            && config.u16_at(INTERRUPT_LINE) >> 8 != 0;

        let (saved, mut handed) = match restore {
            Some(Restore { saved, handed_over }) => (Some(saved), handed_over),
            None => (None, None),
        };
        if let Some(saved) = saved {
            bar_access = saved.bar_access;
            check_saved(&bdf, &raw, saved, msi_offset, msix_found, has_intx)?;
            // The guest's view: BARs where it put them, command, capability contents.
            config.set_raw(0, &saved.config);
        }
        let vfio_armed = handed.is_some();
        let handed = handed.get_or_insert_with(InterruptFds::default);
        let new_evt =
            || EventFd::new(EFD_NONBLOCK).map_err(|e| interrupt(HypervisorError::EventFd(e)));

        let msi = match msi_offset {
            Some(offset) => {
                let saved_msi = saved.and_then(|s| s.msi);
                Some(Msi {
                    offset,
                    is_64bit: config.u16_at(offset + 2) & MSI_CONTROL_64BIT != 0,
                    gsi: router
                        .allocate_gsi(saved_msi.map(|m| m.gsi))
                        .map_err(interrupt)?,
                    trigger: match handed.msi.take() {
                        Some(evt) => evt,
                        None => new_evt()?,
                    },
                    enabled: false,
                })
            }
            None => None,
        };
        let msix = match (msix_found, saved.and_then(|s| s.msix.as_ref())) {
            (Some((offset, layout)), Some(saved_msix)) => {
                let mut triggers = std::mem::take(&mut handed.msix);
                while triggers.len() < saved_msix.gsis.len() {
                    triggers.push(new_evt()?);
                }
                let function_masked = config.u16_at(offset + 2) & MSIX_FUNCTION_MASK != 0;
                let routing = MsixRouting::restore(
                    offset,
                    layout,
                    saved_msix,
                    function_masked,
                    triggers,
                    router.as_ref(),
                )
                .map_err(interrupt)?;
                Some(routing)
            }
            (Some((offset, layout)), None) => {
                let mut routing = MsixRouting::new(offset, layout);
                // No vector yet, so nothing to detach: held like the rest of the device.
                routing.hold(true, router.as_ref()).map_err(interrupt)?;
                Some(routing)
            }
            (None, _) => None,
        };
        let intx = if has_intx {
            let saved_intx = saved.and_then(|s| s.intx);
            let line = router
                .allocate_intx_line(saved_intx.map(|i| i.line))
                .map_err(interrupt)?;
            if saved_intx.is_none() {
                config.set_raw(INTERRUPT_LINE, &[line as u8]);
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

        let direct_bars = if bar_access == BarMode::Direct {
            direct_bars(&bdf, function.as_ref(), &config, msix.as_ref(), &mapper)?
        } else {
            Vec::new()
        };
        let mut device = VfioPciDevice {
            bdf,
            mappings: saved.map(|s| s.mappings.clone()).unwrap_or_default(),
            function,
            iommu,
            config,
            msi,
            msix,
            intx,
            router,
            mapper,
            bar_access,
            direct_bars,
            quiesced: false,
            held: true,
        };
        match saved {
            None => device.set_intx(true),
            Some(saved) => device.resume_saved(saved, vfio_armed),
        }
        device.update_direct_bars();
        Ok(device)
    }

    /// Puts the saved interrupt setup back: the MSI route and its irqfd, and VFIO's side
    /// unless it is still armed (`vfio_armed`: the eventfds were handed over). MSI-X was
    /// routed by `MsixRouting::restore`; here VFIO is told of its eventfds when needed.
    fn resume_saved(&mut self, saved: &PassthroughState, vfio_armed: bool) {
        if !vfio_armed {
            // A function opened anew (or after a kexec) decodes and masters only as the guest
            // had it.
            let command = self.config.command().to_le_bytes();
            self.function
                .write(VFIO_PCI_CONFIG_REGION_INDEX, &command, COMMAND as u64);
        }
        if saved.msi.is_some_and(|m| m.enabled) {
            self.enable_msi(!vfio_armed);
        }
        if let Some(msix) = &self.msix {
            if msix.enabled() && !vfio_armed {
                let triggers = msix.triggers_now();
                if let Err(e) = self.function.enable_irq(VFIO_PCI_MSIX_IRQ_INDEX, &triggers) {
                    log::error!("{}: cannot arm MSI-X again: {e}", self.bdf);
                }
            }
        }
        if let Some(intx) = self.intx.as_mut() {
            intx.enabled = saved.intx.is_some_and(|i| i.enabled);
            if intx.enabled && !vfio_armed {
                intx.enabled = false;
                self.set_intx(true);
            }
        }
    }

    /// The eventfds to hand to another process with the device fd, in `InterruptFds` order.
    pub fn interrupt_fds(&self) -> Vec<BorrowedFd<'_>> {
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

    /// The device fd and what it is attached to, for another process; `None` for a legacy
    /// device, whose DMA mappings are by this process's addresses.
    pub fn device_fd(&self) -> Option<BorrowedFd<'_>> {
        match self.iommu {
            DeviceIommu::Iommufd { .. } => self.function.fd(),
            DeviceIommu::Legacy(_) => None,
        }
    }

    /// Detaches every irqfd (`true`), so interrupts wait in their eventfds while the VM is
    /// paused, or attaches them again (`false`). Errors are logged: the guest would miss
    /// interrupts, but nothing else can be done about a refused KVM call here.
    pub fn hold_interrupts(&mut self, held: bool) {
        if self.held == held {
            return;
        }
        self.held = held;
        let router = self.router.as_ref();
        let mut failures = Vec::new();
        if let Some(msi) = self.msi.as_ref().filter(|m| m.enabled) {
            let result = if held {
                router.unregister_irqfd(&msi.trigger, msi.gsi)
            } else {
                router.register_irqfd(&msi.trigger, msi.gsi)
            };
            failures.extend(result.err());
        }
        if let Some(msix) = self.msix.as_mut() {
            failures.extend(msix.hold(held, router).err());
        }
        if let Some(intx) = &self.intx {
            let result = if held {
                router.unregister_irqfd(&intx.trigger, intx.line)
            } else {
                router.register_resample_irqfd(&intx.trigger, &intx.resample, intx.line)
            };
            failures.extend(result.err());
        }
        for e in failures {
            log::error!(
                "{}: cannot {} an irqfd: {e}",
                self.bdf,
                if held { "detach" } else { "attach" }
            );
        }
    }

    /// Turns off every interrupt VFIO signals for the device (`off`), or puts back what the
    /// guest has enabled (`!off`). A device preserved through LUO must have none enabled when
    /// the kernel freezes it; a cancelled update turns them on again. The guest-visible state
    /// (enables, routes, table) is untouched either way.
    pub fn quiesce_interrupts(&mut self, off: bool) -> Result<(), PassthroughError> {
        if self.quiesced == off {
            return Ok(());
        }
        let vfio = |op: &'static str| {
            let bdf = self.bdf.clone();
            move |source| PassthroughError::Vfio { bdf, op, source }
        };
        if let Some(msi) = self.msi.as_ref().filter(|m| m.enabled) {
            if off {
                self.function.disable_irq(VFIO_PCI_MSI_IRQ_INDEX)
            } else {
                self.function
                    .enable_irq(VFIO_PCI_MSI_IRQ_INDEX, &[&msi.trigger])
            }
            .map_err(vfio("MSI on or off for the update"))?;
        }
        if let Some(msix) = self.msix.as_ref().filter(|m| m.enabled()) {
            if off {
                self.function.disable_irq(VFIO_PCI_MSIX_IRQ_INDEX)
            } else {
                self.function
                    .enable_irq(VFIO_PCI_MSIX_IRQ_INDEX, &msix.triggers_now())
            }
            .map_err(vfio("MSI-X on or off for the update"))?;
        }
        if let Some(intx) = self.intx.as_ref().filter(|i| i.enabled) {
            if off {
                self.function.disable_irq(VFIO_PCI_INTX_IRQ_INDEX)
            } else {
                self.function
                    .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, &[&intx.trigger])
                    .and_then(|_| self.function.set_intx_resample(&intx.resample))
            }
            .map_err(vfio("INTx on or off for the update"))?;
        }
        self.quiesced = off;
        Ok(())
    }

    /// Signals the device's first enabled MSI or MSI-X vector once, as if the device had: a
    /// kexec loses whatever interrupt was in flight, and a driver handles a spurious one
    /// (INTx is level-triggered and left alone). Returns whether one was sent.
    pub fn inject_interrupt(&self) -> bool {
        let trigger = match (&self.msi, &self.msix) {
            (Some(msi), _) if msi.enabled => Some(&msi.trigger),
            (_, Some(msix)) if msix.enabled() => msix.triggers_now().first().copied(),
            _ => None,
        };
        trigger.is_some_and(|evt| evt.write(1).is_ok())
    }

    /// Whether the function is in D0 (full power), by its power-management capability; a
    /// function without one is always in D0.
    pub fn in_d0(&self) -> bool {
        let Some(pm) = self.config.find_capability(PM_CAPABILITY_ID) else {
            return true;
        };
        let mut pmcsr = [0u8; 2];
        self.function
            .read(VFIO_PCI_CONFIG_REGION_INDEX, &mut pmcsr, (pm + 4) as u64);
        u16::from_le_bytes(pmcsr) & 0x3 == 0
    }

    /// Whether the kernel reset the function under this device's file: a live-update freeze
    /// in reset mode does, and if the kexec then fails the file gives `EIO` for good. Such a
    /// device works again only opened anew (`release_function`, then `adopt_function`).
    pub fn lost_to_reset(&self) -> bool {
        matches!(self.function.probe(), Err(e) if e.raw_os_error() == Some(libc::EIO))
    }

    /// Lets go of the host function so that its file can be closed and the function opened
    /// again; its BARs leave the guest and this process first (their mmaps hold the file
    /// open). Until `adopt_function` the guest's view stays as it was and the BARs read
    /// all-ones.
    pub fn release_function(&mut self) -> Box<dyn VfioFunction> {
        self.direct_bars.clear();
        std::mem::replace(&mut self.function, Box::new(Unplugged))
    }

    /// Puts `host`, this device's function opened anew, under the guest's view of it, which
    /// is kept whole (config space, BARs where the guest put them, MSI and MSI-X routes and
    /// eventfds, INTx line): the function decodes and masters as the guest had it, VFIO
    /// signals the same eventfds for what the guest enabled, and one interrupt stands in for
    /// any the reset lost. A function that is not the same as before is refused and the
    /// device stays unplugged.
    pub fn adopt_function(&mut self, host: HostDevice) -> Result<(), PassthroughError> {
        let mut raw = [0u8; 256];
        host.function
            .read(VFIO_PCI_CONFIG_REGION_INDEX, &mut raw, 0);
        let (saved, found) = (vendor_device(self.config.bytes()), vendor_device(&raw));
        if saved != found {
            return Err(PassthroughError::NotTheSavedDevice {
                bdf: self.bdf.clone(),
                saved,
                found,
            });
        }
        for index in 0..NUM_BARS {
            if self.config.bar(index) != bar_shape(host.function.as_ref(), &raw, index) {
                return Err(PassthroughError::BarChanged {
                    bdf: self.bdf.clone(),
                    index,
                });
            }
        }
        self.function = host.function;
        self.iommu = host.iommu;
        if self.bar_access == BarMode::Direct {
            self.direct_bars = direct_bars(
                &self.bdf,
                self.function.as_ref(),
                &self.config,
                self.msix.as_ref(),
                &self.mapper,
            )?;
        }
        self.update_direct_bars();
        let command = self.config.command().to_le_bytes();
        self.function
            .write(VFIO_PCI_CONFIG_REGION_INDEX, &command, COMMAND as u64);
        // A new file has no VFIO interrupt on: arm what the guest has enabled.
        self.quiesced = true;
        self.quiesce_interrupts(false)?;
        self.inject_interrupt();
        Ok(())
    }

    /// Maps `[gpa, gpa + len)` of guest RAM at IOVA == GPA through the legacy container, by
    /// its address in this process (`host`). iommufd devices share the VM's IOAS, mapped
    /// once by file (`IommuContext::map_file`); this only records it for them.
    ///
    /// # Safety
    ///
    /// `host` must be a mapping of `len` bytes of that memfd that outlives the device.
    pub unsafe fn map_guest_memory(
        &mut self,
        mapping: DmaMapping,
        host: *mut u8,
    ) -> Result<(), PassthroughError> {
        if let DeviceIommu::Legacy(container) = &self.iommu {
            // SAFETY: the caller guarantees `host` maps `len` bytes for the device's lifetime.
            unsafe { container.vfio_dma_map(mapping.iova, mapping.len as usize, host) }.map_err(
                |source| PassthroughError::Vfio {
                    bdf: self.bdf.clone(),
                    op: "VFIO_IOMMU_MAP_DMA",
                    source,
                },
            )?;
        }
        self.mappings.push(mapping);
        Ok(())
    }

    /// Drops the saved mappings of a device restored into a new IOAS, which records its own.
    pub fn forget_mappings(&mut self) {
        self.mappings.clear();
    }

    /// What a restore needs: identity, backend, IOAS mappings and the guest-visible config.
    pub fn save(&self, guest_slot: u8) -> PassthroughState {
        PassthroughState {
            bdf: self.bdf.clone(),
            guest_slot,
            backend: match self.iommu {
                DeviceIommu::Iommufd { .. } => VfioBackend::IommufdCdev,
                DeviceIommu::Legacy(_) => VfioBackend::LegacyContainer,
            },
            mappings: self.mappings.clone(),
            config: self.config.bytes().to_vec(),
            msi: self.msi.as_ref().map(|m| MsiState {
                offset: m.offset,
                enabled: m.enabled,
                gsi: m.gsi,
            }),
            msix: self.msix.as_ref().map(|m| MsixState {
                offset: m.offset,
                enabled: m.enabled(),
                table: m.table.words(),
                gsis: m.gsis(),
            }),
            intx: self.intx.as_ref().map(|i| IntxState {
                line: i.line,
                enabled: i.enabled,
            }),
            hwpt_id: match self.iommu {
                DeviceIommu::Iommufd { hwpt_id } => Some(hwpt_id),
                DeviceIommu::Legacy(_) => None,
            },
            bar_access: self.bar_access,
        }
    }

    /// Places BAR `index` at `address` before the guest runs.
    pub fn place_bar(&mut self, index: usize, address: u64) {
        self.config.set_bar_address(index, address);
    }

    /// The BDF on the host.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// Maps each direct BAR where the guest placed it, while memory decoding is on; unmaps it
    /// otherwise. A placement KVM refuses (over RAM, say) falls back to trapping.
    fn update_direct_bars(&mut self) {
        let decoding = self.config.command() & COMMAND_MEMORY != 0;
        for bar in &mut self.direct_bars {
            let size = self.config.bar(bar.index).map_or(0, |b| b.size);
            let gpa = self
                .config
                .bar_address(bar.index)
                .filter(|&a| decoding && a.checked_add(size).is_some());
            let was_mapped = bar.is_mapped();
            match bar.place(gpa) {
                Ok(()) if bar.is_mapped() && !was_mapped => log::info!(
                    "{}: BAR {} mapped into the guest at {:#x}: accesses do not exit",
                    self.bdf,
                    bar.index,
                    gpa.unwrap_or_default()
                ),
                Ok(()) => {}
                Err(e) => {
                    log::warn!("{}: BAR {} stays trapped: {e}", self.bdf, bar.index);
                    let _ = bar.place(None);
                }
            }
        }
    }

    /// Turns VFIO's INTx off before MSI (VFIO runs one interrupt type at a time) and back on
    /// after it.
    fn set_intx(&mut self, on: bool) {
        let Some(intx) = self.intx.as_mut() else {
            return;
        };
        if intx.enabled == on {
            return;
        }
        let result = if on {
            self.function
                .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, &[&intx.trigger])
                .and_then(|_| self.function.set_intx_resample(&intx.resample))
        } else {
            self.function.disable_irq(VFIO_PCI_INTX_IRQ_INDEX)
        };
        match result {
            Ok(()) => intx.enabled = on,
            Err(e) => log::error!(
                "{}: cannot turn INTx on line {} {on}: {e}",
                self.bdf,
                intx.line
            ),
        }
    }

    /// Applies the guest's MSI-X enable and function-mask bits: on enable, give each vector
    /// a GSI and an eventfd and hand the eventfds to VFIO; on disable, stop VFIO's MSI-X and
    /// bring INTx back. Vectors reach the guest only while unmasked.
    fn update_msix(&mut self) {
        let Some(msix) = self.msix.as_ref() else {
            return;
        };
        let control = self.config.u16_at(msix.offset + 2);
        let enable = control & MSIX_ENABLE != 0;
        let function_masked = control & MSIX_FUNCTION_MASK != 0;
        let was_enabled = msix.enabled();
        if enable && !was_enabled {
            self.set_intx(false);
        }
        let Some(msix) = self.msix.as_mut() else {
            return;
        };
        let router = self.router.as_ref();
        let vfio = match (enable, was_enabled) {
            (true, false) => msix
                .triggers(router)
                .map_err(|e| e.to_string())
                .and_then(|evts| {
                    self.function
                        .enable_irq(VFIO_PCI_MSIX_IRQ_INDEX, &evts)
                        .map_err(|e| e.to_string())
                }),
            (false, true) => self
                .function
                .disable_irq(VFIO_PCI_MSIX_IRQ_INDEX)
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        let result = vfio.and_then(|()| {
            msix.set_control(enable, function_masked, router)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = result {
            log::error!(
                "{}: MSI-X {}: {e}",
                self.bdf,
                if enable { "on" } else { "off" }
            );
        }
        if !enable && was_enabled {
            self.set_intx(true);
        }
    }

    /// The guest's MSI message (address, data) from the emulated capability.
    fn msi_message(&self, msi: &Msi) -> (u64, u32) {
        let low = u64::from(self.config.read_u32(msi.offset + 4));
        let (address, data_at) = if msi.is_64bit {
            (
                low | u64::from(self.config.read_u32(msi.offset + 8)) << 32,
                msi.offset + 12,
            )
        } else {
            (low, msi.offset + 8)
        };
        (address, u32::from(self.config.u16_at(data_at)))
    }

    /// Routes the MSI GSI to the guest's message and, the first time, attaches its irqfd
    /// and (when `arm_vfio`) has VFIO signal its eventfd.
    fn enable_msi(&mut self, arm_vfio: bool) {
        let Some(msi) = self.msi.as_ref() else { return };
        let (address, data) = self.msi_message(msi);
        if !msi.enabled {
            self.set_intx(false);
        }
        let Some(msi) = self.msi.as_mut() else { return };
        let routed = self
            .router
            .set_msi_route(msi.gsi, address, data)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                if msi.enabled {
                    return Ok(());
                }
                if !self.held {
                    self.router
                        .register_irqfd(&msi.trigger, msi.gsi)
                        .map_err(|e| e.to_string())?;
                }
                if !arm_vfio {
                    return Ok(());
                }
                self.function
                    .enable_irq(VFIO_PCI_MSI_IRQ_INDEX, &[&msi.trigger])
                    .map_err(|e| {
                        // Leave nothing attached, so the guest's next enable can try again.
                        let _ = self.router.unregister_irqfd(&msi.trigger, msi.gsi);
                        e.to_string()
                    })
            });
        match routed {
            Ok(()) => msi.enabled = true,
            Err(e) => log::error!("{}: cannot enable MSI: {e}", self.bdf),
        }
    }

    /// Applies a write to the emulated MSI capability: on enable, route the GSI to the
    /// guest's message and have VFIO signal its eventfd; on disable, stop VFIO's MSI.
    fn update_msi(&mut self) {
        let Some(msi) = self.msi.as_mut() else { return };
        let enable = self.config.u16_at(msi.offset + 2) & MSI_CONTROL_ENABLE != 0;
        if enable {
            self.enable_msi(true);
        } else if msi.enabled {
            if let Err(e) = self.function.disable_irq(VFIO_PCI_MSI_IRQ_INDEX) {
                log::error!("{}: cannot disable MSI: {e}", self.bdf);
            }
            // KVM takes one irqfd per eventfd: the next enable registers it again.
            if !self.held {
                if let Err(e) = self.router.unregister_irqfd(&msi.trigger, msi.gsi) {
                    log::error!("{}: cannot detach the MSI irqfd: {e}", self.bdf);
                }
            }
            msi.enabled = false;
            self.set_intx(true);
        }
    }
}

/// `evt`'s fd, borrowed for as long as `evt`.
fn borrow(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the fd is owned by `evt`, which outlives the returned borrow.
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}

/// Vendor and device ID (config dword 0); 0 from a config too short to hold them.
fn vendor_device(config: &[u8]) -> u32 {
    config
        .get(..4)
        .and_then(|bytes| bytes.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// A saved device must be this function, with the same capabilities where the state says.
fn check_saved(
    bdf: &str,
    raw: &[u8; 256],
    saved: &PassthroughState,
    msi_offset: Option<usize>,
    msix_found: Option<(usize, MsixLayout)>,
    has_intx: bool,
) -> Result<(), PassthroughError> {
    let (saved_id, found) = (vendor_device(&saved.config), vendor_device(raw));
    if saved.config.len() != raw.len() || saved_id != found {
        return Err(PassthroughError::NotTheSavedDevice {
            bdf: bdf.to_string(),
            saved: saved_id,
            found,
        });
    }
    let mismatch = |capability| {
        Err(PassthroughError::CapabilityMismatch {
            bdf: bdf.to_string(),
            capability,
        })
    };
    if saved.msi.map(|m| m.offset) != saved.msi.and(msi_offset) {
        return mismatch("MSI");
    }
    if let Some(m) = &saved.msix {
        let fits = msix_found.is_some_and(|(offset, layout)| {
            offset == m.offset && m.table.len() == 4 * usize::from(layout.vectors)
        });
        if !fits {
            return mismatch("MSI-X");
        }
    }
    if saved.intx.is_some() && !has_intx {
        return mismatch("INTx");
    }
    Ok(())
}

/// The BARs to map into the guest: memory BARs VFIO lets us mmap, except those holding the
/// MSI-X table and pending bits (the guest must never write the real table, and the pending
/// bits are the emulated masks').
fn direct_bars(
    bdf: &str,
    function: &dyn VfioFunction,
    config: &ConfigSpace,
    msix: Option<&MsixRouting>,
    mapper: &Arc<dyn GuestMapper>,
) -> Result<Vec<DirectBar>, PassthroughError> {
    let msix_bars = msix.map_or([None, None], |m| {
        [Some(m.layout.table_bar), Some(m.layout.pba_bar)]
    });
    let mut bars = Vec::new();
    for index in 0..NUM_BARS {
        let region = function.region(index as u32);
        let mappable = config.bar(index).is_some_and(|b| b.kind != BarKind::Io)
            && !msix_bars.contains(&Some(index))
            && region.mmap;
        let Some(fd) = function.fd().filter(|_| mappable) else {
            continue;
        };
        let bar = DirectBar::new(index, fd, region.offset, region.size, mapper.clone()).map_err(
            |source| PassthroughError::DirectBar {
                bdf: bdf.to_string(),
                source,
            },
        )?;
        bars.push(bar);
    }
    Ok(bars)
}

/// The shape of BAR `index` from its VFIO region and the device's BAR register.
fn bar_shape(function: &dyn VfioFunction, raw: &[u8; 256], index: usize) -> Option<Bar> {
    if index as u32 >= VFIO_PCI_NUM_REGIONS {
        return None;
    }
    let size = function.region(index as u32).size;
    if size == 0 {
        return None;
    }
    let reg = 0x10 + index * 4;
    let low = u32::from_le_bytes([raw[reg], raw[reg + 1], raw[reg + 2], raw[reg + 3]]);
    let kind = if low & 0x1 != 0 {
        BarKind::Io
    } else if (low >> 1) & 0x3 == 0x2 {
        BarKind::Mmio64
    } else {
        BarKind::Mmio32
    };
    Some(Bar {
        kind,
        size: size.next_power_of_two(),
        prefetchable: kind != BarKind::Io && low & 0x8 != 0,
    })
}

impl PciDevice for VfioPciDevice {
    fn config_read(&mut self, offset: usize) -> u32 {
        self.config.read_u32(offset)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let end = offset + data.len();
        if offset < BAR0 + 4 * NUM_BARS && end > COMMAND {
            self.update_direct_bars();
        }
        if offset < COMMAND + 2 && end > COMMAND {
            // The device decodes and masters only as the guest says.
            let command = self.config.command().to_le_bytes();
            self.function
                .write(VFIO_PCI_CONFIG_REGION_INDEX, &command, COMMAND as u64);
        }
        if let Some(msi) = &self.msi {
            if offset < msi.offset + 16 && end > msi.offset {
                self.update_msi();
            }
        }
        if let Some(msix) = &self.msix {
            if offset < msix.offset + 4 && end > msix.offset + 2 {
                self.update_msix();
            }
        }
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some(msix) = &self.msix {
            if let Some(at) = msix.layout.table_offset_of(bar, offset, data.len()) {
                msix.table.read(at, data);
                return;
            }
            if let Some(at) = msix.layout.pba_offset_of(bar, offset, data.len()) {
                read_pba(at, data, |vector| msix.pending(vector));
                return;
            }
        }
        self.function.read(bar as u32, data, offset);
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(msix) = self.msix.as_mut() {
            if let Some(at) = msix.layout.table_offset_of(bar, offset, data.len()) {
                if let Err(e) = msix.write_table(at, data, self.router.as_ref()) {
                    log::error!("{}: MSI-X table write at {at:#x}: {e}", self.bdf);
                }
                return;
            }
            if msix.layout.pba_offset_of(bar, offset, data.len()).is_some() {
                return; // The pending-bit array is read-only.
            }
        }
        self.function.write(bar as u32, data, offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::testing::{CallLog, FakeFunction, FakeRouter};
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicBool, Ordering};

    const EDU: u32 = 0x11e8_1234;

    struct Mapper;

    impl GuestMapper for Mapper {
        fn map(&self, _gpa: u64, _size: u64, _host: u64) -> Result<u32, HypervisorError> {
            Err(HypervisorError::Exhausted { what: "memslot" })
        }
        fn unmap(&self, _slot: u32) -> Result<(), HypervisorError> {
            Ok(())
        }
    }

    /// A device over a fake function; returns it with the function's and router's logs.
    fn build(
        id: u32,
        restore: Option<Restore<'_>>,
    ) -> Result<(VfioPciDevice, CallLog, Arc<FakeRouter>), PassthroughError> {
        let (host, vfio, _) = fake_host(id, 2);
        let (device, router) = build_on(host, restore)?;
        Ok((device, vfio, router))
    }

    /// A device over `host`, with trapped BARs; returns it with the router's log.
    fn build_on(
        host: HostDevice,
        restore: Option<Restore<'_>>,
    ) -> Result<(VfioPciDevice, Arc<FakeRouter>), PassthroughError> {
        let router = Arc::new(FakeRouter::default());
        let args = PassthroughArgs {
            router: router.clone(),
            mapper: Arc::new(Mapper),
            bar_access: BarMode::Trapped,
        };
        let device = VfioPciDevice::new(host, args, restore)?;
        Ok((device, router))
    }

    /// A fake function of vendor:device `id` attached to HWPT `hwpt_id`, with its call log
    /// and the switch that makes its file give EIO.
    fn fake_host(id: u32, hwpt_id: u32) -> (HostDevice, CallLog, Arc<AtomicBool>) {
        let function = FakeFunction::new(id);
        let log = function.log.clone();
        let reset = function.reset_under_its_file.clone();
        let host = HostDevice {
            bdf: "0000:00:04.0".into(),
            function: Box::new(function),
            iommu: DeviceIommu::Iommufd { hwpt_id },
        };
        (host, log, reset)
    }

    /// A fresh device whose VM runs: its interrupts released, the logs cleared.
    fn running() -> VfioPciDevice {
        let (mut device, vfio, router) = build(EDU, None).unwrap();
        device.hold_interrupts(false);
        vfio.take();
        router.take();
        device
    }

    fn write32(device: &mut VfioPciDevice, offset: usize, value: u32) {
        device.config_write(offset, &value.to_le_bytes());
    }

    /// The guest places BAR 0, turns memory and bus mastering on and programs MSI to
    /// 0xfee00000/0x41; with `msix`, it then programs both MSI-X vectors (vector 1 masked)
    /// and turns MSI-X on instead of MSI.
    fn program(device: &mut VfioPciDevice, msix: bool) {
        write32(device, 0x10, 0xc000_0000);
        device.config_write(COMMAND, &0x6u16.to_le_bytes());
        write32(device, 0x44, 0xfee0_0000);
        write32(device, 0x48, 0);
        write32(device, 0x4c, 0x41);
        if !msix {
            device.config_write(0x42, &0x81u16.to_le_bytes());
            return;
        }
        for (vector, masked) in [(0u64, 0u32), (1, 1)] {
            let entry = 0x2000 + 16 * vector;
            for (at, word) in [
                (0, 0xfee0_0000u32),
                (4, 0),
                (8, 0x50 + vector as u32),
                (12, masked),
            ] {
                device.bar_write(0, entry + at, &word.to_le_bytes());
            }
        }
        device.config_write(0x52, &MSIX_ENABLE.to_le_bytes());
    }

    fn config_dwords(device: &mut VfioPciDevice) -> Vec<u32> {
        (0..256)
            .step_by(4)
            .map(|at| device.config_read(at))
            .collect()
    }

    fn bar_dwords(device: &mut VfioPciDevice, from: u64, count: u64) -> Vec<u32> {
        (0..count)
            .map(|i| {
                let mut word = [0u8; 4];
                device.bar_read(0, from + 4 * i, &mut word);
                u32::from_le_bytes(word)
            })
            .collect()
    }

    /// What a handover sends of the device's eventfds, as the target gets them.
    fn hand_over(device: &VfioPciDevice, saved: &PassthroughState) -> InterruptFds {
        let fds: Vec<OwnedFd> = device
            .interrupt_fds()
            .into_iter()
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect();
        InterruptFds::from_fds(saved, &mut fds.into_iter()).unwrap()
    }

    #[test]
    fn a_fresh_device_turns_intx_on_and_takes_new_numbers() {
        let (mut device, vfio, router) = build(EDU, None).unwrap();
        assert_eq!(vfio.take(), ["enable irq 0 x1", "intx resample"]);
        // Nothing reaches KVM before the VM runs.
        assert_eq!(router.take(), Vec::<String>::new());
        device.hold_interrupts(false);
        assert_eq!(router.take(), ["attach line 16"]);
        let saved = device.save(4);
        assert_eq!(saved.msi.map(|m| m.gsi), Some(24));
        assert_eq!(saved.intx.map(|i| (i.line, i.enabled)), Some((16, true)));
        assert_eq!(saved.config[0x3c], 16, "the guest is told its INTx line");
        assert_eq!(saved.hwpt_id, Some(2));
    }

    #[test]
    fn a_handed_over_device_comes_back_as_saved_without_asking_vfio() {
        let mut device = running();
        program(&mut device, false);
        let saved = device.save(4);
        let before = config_dwords(&mut device);
        let restore = Restore {
            saved: &saved,
            handed_over: Some(hand_over(&device, &saved)),
        };
        let (mut restored, vfio, router) = build(EDU, Some(restore)).unwrap();
        assert_eq!(config_dwords(&mut restored), before);
        assert_eq!(restored.save(4), saved);
        // The saved numbers and the MSI route; no irqfd until the VM runs (a signal waiting in
        // an eventfd would be taken before the vCPUs exist); nothing of VFIO.
        assert_eq!(
            router.take(),
            ["claim 24", "claim line 16", "route 24 0xfee00000 0x41"]
        );
        restored.hold_interrupts(false);
        assert_eq!(router.take(), ["attach 24", "attach line 16"]);
        assert_eq!(vfio.take(), Vec::<String>::new());
    }

    #[test]
    fn a_device_opened_anew_is_armed_again_from_its_state() {
        let mut device = running();
        program(&mut device, false);
        let saved = device.save(4);
        let restore = Restore {
            saved: &saved,
            handed_over: None,
        };
        let (mut restored, vfio, _) = build(EDU, Some(restore)).unwrap();
        assert_eq!(restored.save(4), saved);
        // A new fd has no interrupt on: MSI is armed as saved, INTx (off when saved) is not.
        assert_eq!(
            vfio.take(),
            ["write region 7 at 0x4: [06, 00]", "enable irq 1 x1"]
        );
        assert_eq!(restored.config_read(0x10), 0xc000_0000);
    }

    #[test]
    fn msix_table_and_pending_bits_survive_a_handover() {
        let mut device = running();
        program(&mut device, true);
        // Vector 1 is masked: a message for it waits, and shows in the pending bits.
        device
            .msix
            .as_ref()
            .unwrap()
            .vectors_trigger(1)
            .write(1)
            .unwrap();
        assert_eq!(bar_dwords(&mut device, 0x3000, 1), [0b10]);
        let saved = device.save(4);
        let msix = saved.msix.as_ref().unwrap();
        assert!(msix.enabled);
        assert_eq!(msix.gsis, [25, 26]);
        let table = bar_dwords(&mut device, 0x2000, 8);
        let restore = Restore {
            saved: &saved,
            handed_over: Some(hand_over(&device, &saved)),
        };
        assert_eq!(
            restore.handed_over.as_ref().map(InterruptFds::waiting),
            Some(1)
        );
        let (mut restored, vfio, router) = build(EDU, Some(restore)).unwrap();
        assert_eq!(bar_dwords(&mut restored, 0x2000, 8), table);
        assert_eq!(bar_dwords(&mut restored, 0x3000, 1), [0b10]);
        assert_eq!(restored.save(4), saved);
        assert_eq!(
            router.take(),
            ["claim 24", "claim 25", "claim 26", "claim line 16"]
        );
        restored.hold_interrupts(false);
        // Only the unmasked vector is attached; the pending one waits for its unmask.
        assert_eq!(
            router.take(),
            ["route 25 0xfee00000 0x50", "attach 25", "attach line 16"]
        );
        assert_eq!(vfio.take(), Vec::<String>::new());
        restored.bar_write(0, 0x2000 + 16 + 12, &0u32.to_le_bytes());
        assert_eq!(router.take(), ["route 26 0xfee00000 0x51", "attach 26"]);
    }

    #[test]
    fn an_update_turns_vfio_interrupts_off_and_a_cancel_back_on() {
        let (mut device, vfio, _) = build(EDU, None).unwrap();
        device.hold_interrupts(false);
        program(&mut device, false);
        vfio.take();
        device.quiesce_interrupts(true).unwrap();
        assert_eq!(vfio.take(), ["disable irq 1"]);
        device.quiesce_interrupts(false).unwrap();
        assert_eq!(vfio.take(), ["enable irq 1 x1"]);
        // The guest's view did not change.
        assert!(device.save(4).msi.is_some_and(|m| m.enabled));
        assert!(device.in_d0());
    }

    #[test]
    fn paused_devices_hold_their_interrupts_in_the_eventfds() {
        let (mut device, _, router) = build(EDU, None).unwrap();
        device.hold_interrupts(false);
        program(&mut device, false);
        router.take();
        device.hold_interrupts(true);
        assert_eq!(router.take(), ["detach 24", "detach 16"]);
        device.hold_interrupts(true);
        assert!(router.take().is_empty());
        device.hold_interrupts(false);
        assert_eq!(router.take(), ["attach 24", "attach line 16"]);
    }

    #[test]
    fn a_state_of_another_device_or_short_of_eventfds_is_refused() {
        let (device, _, _) = build(EDU, None).unwrap();
        let saved = device.save(4);
        let restore = Restore {
            saved: &saved,
            handed_over: None,
        };
        assert!(matches!(
            build(0x0010_1b36, Some(restore)),
            Err(PassthroughError::NotTheSavedDevice {
                saved: EDU,
                found: 0x0010_1b36,
                ..
            })
        ));
        let one: Vec<OwnedFd> = vec![device.interrupt_fds()[0].try_clone_to_owned().unwrap()];
        assert!(matches!(
            InterruptFds::from_fds(&saved, &mut one.into_iter()),
            Err(PassthroughError::InterruptFds {
                expected: 3,
                got: 1,
                ..
            })
        ));
    }

    #[test]
    fn a_function_reset_under_its_file_is_replaced_under_the_same_guest_view() {
        let (host, _, reset) = fake_host(EDU, 2);
        let (mut device, router) = build_on(host, None).unwrap();
        device.hold_interrupts(false);
        program(&mut device, false);
        device.quiesce_interrupts(true).unwrap();
        assert!(!device.lost_to_reset());
        reset.store(true, Ordering::Relaxed);
        assert!(device.lost_to_reset());
        let before = device.save(4);
        router.take();

        drop(device.release_function());
        // Unplugged: the guest's view stays, the hardware reads all-ones, nothing is handed on.
        assert_eq!(device.config_read(0x10), 0xc000_0000);
        assert_eq!(bar_dwords(&mut device, 0, 1), [0xffff_ffff]);
        assert!(device.device_fd().is_none());
        assert!(!device.lost_to_reset());

        let (other, _, _) = fake_host(0x0010_1b36, 3);
        assert!(matches!(
            device.adopt_function(other),
            Err(PassthroughError::NotTheSavedDevice {
                found: 0x0010_1b36,
                ..
            })
        ));
        let (again, vfio, _) = fake_host(EDU, 3);
        device.adopt_function(again).unwrap();
        // Decoding and mastering as the guest had them, MSI armed on the same eventfd, and one
        // interrupt in it for whatever the reset lost; no route or number changed.
        assert_eq!(
            vfio.take(),
            ["write region 7 at 0x4: [06, 00]", "enable irq 1 x1"]
        );
        assert!(router.take().is_empty());
        assert_eq!(device.msi.as_ref().unwrap().trigger.read().unwrap(), 1);
        let after = device.save(4);
        assert_eq!(after.hwpt_id, Some(3));
        assert_eq!(
            PassthroughState {
                hwpt_id: Some(2),
                ..after
            },
            before
        );
        // Interrupts are on: a cancel's re-arm has nothing left to do.
        device.quiesce_interrupts(false).unwrap();
        assert!(vfio.take().is_empty());
    }
}
