//! A vfio-pci function passed through to the guest: the device model over a `VfioFunction`.
//!
//! - Guest RAM is mapped into the VM's IOAS with `IOMMU_IOAS_MAP_FILE` (memfd + offset,
//!   IOVA == GPA), never by user address: that is what LUO preservation and a process switch
//!   need (`iommu::IommuContext`). The legacy container maps by address instead.
//! - The guest sees a shadow configuration space (`layout`): the device's own identity and
//!   capability chain, with BARs placed by the VMM and guest-programmable, the command
//!   register forwarded, and the interrupt capabilities emulated (`interrupts`): MSI (`msi`)
//!   routes a KVM GSI to an eventfd that VFIO signals, INTx (`intx`) goes to an IOAPIC line
//!   through an irqfd with a resample eventfd, so the guest's EOI unmasks it in VFIO.
//! - BARs VFIO lets us mmap are mapped into the guest as KVM memslots wherever the guest
//!   places them (no exits); the others, and every BAR with `BarMode::Trapped`, exit and are
//!   forwarded to the VFIO region. The BARs holding the MSI-X table and pending bits are always
//!   trapped: the guest's table and masks are emulated (`irq::MsixRouting`), and enabling MSI-X
//!   routes one GSI per vector.
//! - A device is built fresh (`new`, from the host function's own config space) or from its
//!   saved state (`restore`): the guest's config space, the same GSIs and INTx line, the MSI-X
//!   table, the BARs at the same addresses. When its interrupt eventfds are handed over too
//!   (`handover`), VFIO still signals them and nothing is asked of VFIO at all; otherwise the
//!   saved interrupt setup is armed again on new eventfds.
//! - While the VM is paused the device's irqfds are detached (`hold_interrupts`): an interrupt
//!   raised then waits in its eventfd and is delivered by whichever KVM VM attaches it next,
//!   this one on resume or the one in the process the VM moved to.
//!
//! Nothing here resets the device.

mod handover;
mod interrupts;
mod intx;
mod layout;
mod msi;
#[cfg(test)]
mod tests;

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use luvmm_resources::config::BarMode;
use luvmm_resources::state::{DmaMapping, PassthroughState, VfioBackend};
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vfio_ioctls::VfioContainer;

pub use handover::InterruptFds;
pub use interrupts::InterruptError;

use crate::pci::bus::PciDevice;
use crate::pci::config::{ConfigSpace, ConfigSpaceError, BAR0, COMMAND, COMMAND_MEMORY, NUM_BARS};
use crate::vfio::bar_map::{BarMapError, DirectBar, GuestMapper};
use crate::vfio::function::{Unplugged, VfioFunction};
use crate::vfio::iommu::IommuError;
use crate::vfio::irq::{HypervisorError, IrqRouter};
use interrupts::{msix_state, Interrupts};
use intx::Intx;
use layout::{bar_region, check_same_function, direct_bars, HostLayout};
use luvmm_resources::errors::error_chain;
use msi::Msi;

const PM_CAPABILITY_ID: u8 = 0x01;

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
    #[error("{bdf}: cannot arm {what} again: the restored device would never interrupt")]
    Rearm {
        bdf: String,
        what: &'static str,
        #[source]
        source: InterruptError,
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
    #[error("{bdf}: a DMA mapping of {len:#x} bytes is beyond this process's address space")]
    MappingTooLarge { bdf: String, len: u64 },
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

/// What the VMM provides a passthrough device with.
pub struct PassthroughArgs {
    pub router: Arc<dyn IrqRouter>,
    pub mapper: Arc<dyn GuestMapper>,
    pub bar_access: BarMode,
}

/// A passed-through PCI function.
pub struct VfioPciDevice {
    bdf: String,
    mappings: Vec<DmaMapping>,
    function: Box<dyn VfioFunction>,
    iommu: DeviceIommu,
    config: ConfigSpace,
    interrupts: Interrupts,
    /// Maps direct BARs into the guest; kept to map them again from a reopened function.
    mapper: Arc<dyn GuestMapper>,
    bar_access: BarMode,
    direct_bars: Vec<DirectBar>,
}

impl VfioPciDevice {
    /// Builds the guest's view of `host` for a fresh boot, from the function's own config
    /// space, with new GSIs and INTx line. Its interrupts are held until
    /// `hold_interrupts(false)`.
    pub fn new(host: HostDevice, args: PassthroughArgs) -> Result<VfioPciDevice, PassthroughError> {
        let layout = HostLayout::read(&host.bdf, host.function.as_ref())?;
        let mut device = VfioPciDevice::build(host, args, layout, None, InterruptFds::default())?;
        device
            .interrupts
            .start(device.function.as_ref(), &device.bdf);
        device.update_direct_bars();
        Ok(device)
    }

    /// Builds the guest's view of `host` as `saved` left it: config space, GSIs, INTx line,
    /// MSI-X table and BAR access. `saved` is checked against the function before anything
    /// is set up (only its config space is read).
    ///
    /// `handed` are the eventfds VFIO still signals when the device was handed over by
    /// another process (`InterruptFds::from_fds`): the device carries on on them and asks
    /// nothing of VFIO. `None` means VFIO's interrupts are off (a function opened anew, or
    /// retrieved after a kexec): the function decodes and masters as the guest had it, and
    /// what the guest enabled is armed again on new eventfds. The two origins share every
    /// step but that one, so they are one constructor rather than two. An interrupt the
    /// guest had on that cannot be routed or armed again fails the restore (`Rearm`): the
    /// device would never interrupt.
    ///
    /// Its interrupts are held until `hold_interrupts(false)`.
    pub fn restore(
        host: HostDevice,
        args: PassthroughArgs,
        saved: &PassthroughState,
        handed: Option<InterruptFds>,
    ) -> Result<VfioPciDevice, PassthroughError> {
        let layout = HostLayout::read(&host.bdf, host.function.as_ref())?;
        layout.check_saved(&host.bdf, saved)?;
        let args = PassthroughArgs {
            bar_access: saved.bar_access,
            ..args
        };
        let vfio_armed = handed.is_some();
        let handed = handed.unwrap_or_default();
        let mut device = VfioPciDevice::build(host, args, layout, Some(saved), handed)?;
        if !vfio_armed {
            device.forward_command();
        }
        device.interrupts.resume(
            saved,
            vfio_armed,
            &device.config,
            device.function.as_ref(),
            &device.bdf,
        )?;
        device.update_direct_bars();
        Ok(device)
    }

    /// The steps `new` and `restore` share: the guest's view over `layout` (as `saved` left
    /// it, if any), the interrupts (held) and the direct BARs (not yet placed).
    fn build(
        host: HostDevice,
        args: PassthroughArgs,
        layout: HostLayout,
        saved: Option<&PassthroughState>,
        handed: InterruptFds,
    ) -> Result<VfioPciDevice, PassthroughError> {
        let HostDevice {
            bdf,
            function,
            iommu,
        } = host;
        let PassthroughArgs {
            router,
            mapper,
            bar_access,
        } = args;
        let HostLayout {
            mut config, caps, ..
        } = layout;
        if let Some(saved) = saved {
            // The guest's view: BARs where it put them, command, capability contents.
            config.set_raw(0, &saved.config);
        }
        let interrupts =
            Interrupts::build(&caps, &mut config, router, saved, handed).map_err(|source| {
                PassthroughError::Interrupt {
                    bdf: bdf.clone(),
                    source,
                }
            })?;
        let direct_bars = if bar_access == BarMode::Direct {
            direct_bars(
                &bdf,
                function.as_ref(),
                &config,
                interrupts.msix.as_ref(),
                &mapper,
            )?
        } else {
            Vec::new()
        };
        Ok(VfioPciDevice {
            bdf,
            mappings: saved.map(|s| s.mappings.clone()).unwrap_or_default(),
            function,
            iommu,
            config,
            interrupts,
            mapper,
            bar_access,
            direct_bars,
        })
    }

    /// The eventfds to hand to another process with the device fd, in `InterruptFds` order.
    pub fn interrupt_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.interrupts.fds()
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
        self.interrupts.hold(held, &self.bdf);
    }

    /// Turns off every interrupt VFIO signals for the device (`off`), or puts back what the
    /// guest has enabled (`!off`). A device preserved through LUO must have none enabled when
    /// the kernel freezes it; a cancelled update turns them on again. The guest-visible state
    /// (enables, routes, table) is untouched either way. Turning off that fails halfway
    /// turns back on what it had turned off; whatever cannot be is left for `!off` to retry.
    pub fn quiesce_interrupts(&mut self, off: bool) -> Result<(), PassthroughError> {
        self.interrupts
            .quiesce(off, self.function.as_ref(), &self.bdf)
    }

    /// Signals the device's first enabled MSI or MSI-X vector once, as if the device had: a
    /// kexec loses whatever interrupt was in flight, and a driver handles a spurious one
    /// (INTx is level-triggered and left alone). Returns whether one was sent.
    pub fn inject_interrupt(&self) -> bool {
        self.interrupts.inject()
    }

    /// Whether the function is in D0 (full power), by its power-management capability; a
    /// function without one is always in D0. One whose power state cannot be read is not:
    /// a preserved device must be known to be in D0.
    pub fn in_d0(&self) -> bool {
        let Some(pm) = self.config.find_capability(PM_CAPABILITY_ID) else {
            return true;
        };
        let mut pmcsr = [0u8; 2];
        match self.function.read_config(&mut pmcsr, (pm + 4) as u64) {
            Ok(()) => u16::from_le_bytes(pmcsr) & 0x3 == 0,
            Err(e) => {
                log::warn!(
                    "{}: cannot read its power state, so not taken as in D0: {e}",
                    self.bdf
                );
                false
            }
        }
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
        check_same_function(&self.bdf, &self.config, host.function.as_ref())?;
        self.function = host.function;
        self.iommu = host.iommu;
        if self.bar_access == BarMode::Direct {
            self.direct_bars = direct_bars(
                &self.bdf,
                self.function.as_ref(),
                &self.config,
                self.interrupts.msix.as_ref(),
                &self.mapper,
            )?;
        }
        self.update_direct_bars();
        self.forward_command();
        // A new file has no VFIO interrupt on: arm what the guest has enabled.
        self.interrupts.rearm(self.function.as_ref(), &self.bdf)?;
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
            let len =
                usize::try_from(mapping.len).map_err(|_| PassthroughError::MappingTooLarge {
                    bdf: self.bdf.clone(),
                    len: mapping.len,
                })?;
            // SAFETY: the caller guarantees `host` maps `len` bytes for the device's lifetime.
            unsafe { container.vfio_dma_map(mapping.iova, len, host) }.map_err(|source| {
                PassthroughError::Vfio {
                    bdf: self.bdf.clone(),
                    op: "VFIO_IOMMU_MAP_DMA",
                    source,
                }
            })?;
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
            msi: self.interrupts.msi.as_ref().map(Msi::save),
            msix: self.interrupts.msix.as_ref().map(msix_state),
            intx: self.interrupts.intx.as_ref().map(Intx::save),
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

    /// Writes the guest's command register to the function, so it decodes and masters only
    /// as the guest says.
    fn forward_command(&self) {
        let command = self.config.command().to_le_bytes();
        self.function
            .write(VFIO_PCI_CONFIG_REGION_INDEX, &command, COMMAND as u64);
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
                    log::warn!(
                        "{}: BAR {} stays trapped: {}",
                        self.bdf,
                        bar.index,
                        error_chain(&e)
                    );
                    let _ = bar.place(None);
                }
            }
        }
    }
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
            self.forward_command();
        }
        self.interrupts.config_written(
            offset,
            end,
            &self.config,
            self.function.as_ref(),
            &self.bdf,
        );
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if !self.interrupts.msix_bar_read(bar, offset, data) {
            self.function.read(bar_region(bar), data, offset);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if !self.interrupts.msix_bar_write(bar, offset, data, &self.bdf) {
            self.function.write(bar_region(bar), data, offset);
        }
    }
}
