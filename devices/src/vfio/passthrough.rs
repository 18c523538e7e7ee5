//! A vfio-pci function passed through to the guest, over a VFIO cdev bound to iommufd.
//!
//! - Guest RAM is mapped into the device's IOAS with `IOMMU_IOAS_MAP_FILE` (memfd + offset,
//!   IOVA == GPA), never by user address: that is what LUO preservation and a process switch
//!   need.
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
//!
//! Nothing here resets the device, and dropping the device only detaches it from its IOAS
//! (vfio-ioctls' `Drop`, which needs it attached: it always is here).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use iommufd_ioctls::IommuFd;
use luvmm_resources::config::{BarMode, VfioBackendChoice};
use luvmm_resources::state::{
    DmaMapping, IntxState, MsiState, MsixState, PassthroughState, VfioBackend,
};
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pci::bus::PciDevice;
use crate::pci::config::{
    Bar, BarKind, ConfigSpace, BAR0, COMMAND, COMMAND_MEMORY, INTERRUPT_LINE, NUM_BARS,
};
use crate::pci::msix::{read_pba, MsixLayout, MSIX_CAPABILITY_ID, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use crate::vfio::bar_map::{DirectBar, GuestMapper};
use crate::vfio::host::{bound_driver, group_blockers, sysfs_dir};
use crate::vfio::irq::{HypervisorError, IrqRouter, MsixRouting};

const MSI_CAPABILITY_ID: u8 = 0x05;

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
    #[error("{bdf}: {op}")]
    Iommufd {
        bdf: String,
        op: &'static str,
        #[source]
        source: iommufd_ioctls::IommufdError,
    },
    #[error("{bdf}: interrupts")]
    Interrupt {
        bdf: String,
        #[source]
        source: HypervisorError,
    },
    #[error("{bdf}: BAR {index}: {reason}")]
    Bar {
        bdf: String,
        index: usize,
        reason: String,
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

/// The IOMMU path a device was opened through.
enum Backend {
    /// VFIO cdev bound to an iommufd; DMA mapped by file (memfd + offset).
    Iommufd(Arc<VfioIommufd>),
    /// VFIO group in a type1 container; DMA mapped by user address (what stock Debian
    /// kernels offer, without iommufd). Such mappings cannot be preserved through LUO.
    Legacy(Arc<VfioContainer>),
}

/// A passed-through PCI function.
pub struct VfioPciDevice {
    bdf: String,
    mappings: Vec<DmaMapping>,
    device: VfioDevice,
    backend: Backend,
    config: ConfigSpace,
    msi: Option<Msi>,
    msix: Option<MsixRouting>,
    intx: Option<Intx>,
    router: Arc<dyn IrqRouter>,
    direct_bars: Vec<DirectBar>,
}

/// Live handles a passthrough device is opened with.
pub struct PassthroughArgs {
    pub router: Arc<dyn IrqRouter>,
    pub mapper: Arc<dyn GuestMapper>,
    pub bar_access: BarMode,
    pub backend: VfioBackendChoice,
}

impl VfioPciDevice {
    /// Opens `bdf`'s cdev, binds it to a new iommufd and attaches it to a new IOAS. Checks
    /// what can be checked first, so each way this fails has its own error.
    pub fn open(bdf: &str, args: PassthroughArgs) -> Result<VfioPciDevice, PassthroughError> {
        let PassthroughArgs {
            router,
            mapper,
            bar_access,
            backend,
        } = args;
        let sysfs = sysfs_dir(bdf);
        let name = || bdf.to_string();
        if !sysfs.exists() {
            return Err(PassthroughError::NoDevice { bdf: name() });
        }
        let driver = bound_driver(&sysfs).unwrap_or_else(|| "no driver".to_string());
        if driver != "vfio-pci" {
            return Err(PassthroughError::WrongDriver {
                bdf: name(),
                driver,
            });
        }
        let blockers = group_blockers(bdf);
        if !blockers.is_empty() {
            return Err(PassthroughError::GroupNotViable {
                bdf: name(),
                why: format!(
                    "{} bound to a host driver; bind every device of the group to vfio-pci, \
                     or unbind it",
                    blockers.join(", ")
                ),
            });
        }
        let iommufd_ready = Path::new("/dev/iommu").exists() && sysfs.join("vfio-dev").exists();
        let (device, backend) = match backend {
            VfioBackendChoice::Iommufd | VfioBackendChoice::Auto if iommufd_ready => {
                Self::open_iommufd(bdf, &sysfs)?
            }
            VfioBackendChoice::Iommufd => {
                return Err(if Path::new("/dev/iommu").exists() {
                    PassthroughError::NoCdev { bdf: name() }
                } else {
                    PassthroughError::NoIommufd { bdf: name() }
                })
            }
            VfioBackendChoice::Auto | VfioBackendChoice::Legacy => {
                if backend == VfioBackendChoice::Auto {
                    log::warn!(
                        "{bdf}: no iommufd or VFIO cdev on this kernel: using the legacy VFIO \
                         group/container path (DMA mapped by address; cannot be preserved \
                         through a live update)"
                    );
                }
                Self::open_legacy(bdf, &sysfs)?
            }
        };
        let mut raw = [0u8; 256];
        device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut raw, 0);
        let mut config = ConfigSpace::from_device(&raw);
        for index in 0..NUM_BARS {
            if let Some(bar) = bar_shape(&device, &raw, index) {
                config
                    .add_bar(index, bar)
                    .map_err(|e| PassthroughError::Bar {
                        bdf: name(),
                        index,
                        reason: e.to_string(),
                    })?;
            }
        }
        let msi = match config.find_capability(MSI_CAPABILITY_ID) {
            Some(offset) => {
                let control = config.u16_at(offset + 2);
                let is_64bit = control & MSI_CONTROL_64BIT != 0;
                // Control (enable bit), address and data are the guest's to program.
                let data_end = if is_64bit { 14 } else { 10 };
                config.make_writable(offset + 2, &MSI_CONTROL_ENABLE.to_le_bytes());
                config.make_writable(offset + 4, &vec![0xff; data_end - 4]);
                let interrupt = |source| PassthroughError::Interrupt {
                    bdf: name(),
                    source,
                };
                let gsi = router.allocate_gsi().map_err(interrupt)?;
                let trigger = EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| interrupt(HypervisorError::EventFd(e)))?;
                Some(Msi {
                    offset,
                    is_64bit,
                    gsi,
                    trigger,
                    enabled: false,
                })
            }
            None => None,
        };
        let msix = config.find_capability(MSIX_CAPABILITY_ID).map(|offset| {
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
            MsixRouting::new(offset, layout)
        });
        let intx = Self::wire_intx(bdf, &device, &mut config, router.as_ref())?;
        let mut direct_bars = Vec::new();
        // The BARs holding the MSI-X table and pending bits stay trapped: the guest must never
        // write the real table, and the pending bits are the emulated masks'.
        let msix_bars = msix.as_ref().map_or([None, None], |m| {
            [Some(m.layout.table_bar), Some(m.layout.pba_bar)]
        });
        if bar_access == BarMode::Direct {
            for index in 0..NUM_BARS {
                let mappable = config.bar(index).is_some_and(|b| b.kind != BarKind::Io)
                    && !msix_bars.contains(&Some(index))
                    && device.get_region_flags(index as u32) & VFIO_REGION_INFO_FLAG_MMAP != 0;
                if !mappable {
                    continue;
                }
                // SAFETY: the fd belongs to `device`, alive for this call.
                let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
                let region = DirectBar::new(
                    index,
                    fd,
                    device.get_region_offset(index as u32),
                    device.get_region_size(index as u32),
                    mapper.clone(),
                )
                .map_err(|reason| PassthroughError::Bar {
                    bdf: name(),
                    index,
                    reason,
                })?;
                direct_bars.push(region);
            }
        }
        Ok(VfioPciDevice {
            bdf: bdf.to_string(),
            mappings: Vec::new(),
            device,
            backend,
            config,
            msi,
            msix,
            intx,
            router,
            direct_bars,
        })
    }

    /// Opens the cdev, binds it to a new iommufd and attaches it to a new IOAS.
    fn open_iommufd(bdf: &str, sysfs: &Path) -> Result<(VfioDevice, Backend), PassthroughError> {
        let name = || bdf.to_string();
        let iommufd = IommuFd::new().map_err(|source| PassthroughError::Iommufd {
            bdf: name(),
            op: "open /dev/iommu",
            source,
        })?;
        let ops = Arc::new(
            VfioIommufd::new(Arc::new(iommufd), None, None).map_err(|source| {
                PassthroughError::Vfio {
                    bdf: name(),
                    op: "allocate an IOAS",
                    source,
                }
            })?,
        );
        let cdev = VfioDevice::open_cdev(sysfs).map_err(|source| match &source {
            vfio_ioctls::VfioError::OpenDeviceCdev(e)
                if e.kind() == std::io::ErrorKind::ResourceBusy =>
            {
                PassthroughError::Busy { bdf: name() }
            }
            _ => PassthroughError::Vfio {
                bdf: name(),
                op: "open the VFIO cdev",
                source,
            },
        })?;
        let device = VfioDevice::new_from_fd(cdev, ops.clone(), true).map_err(|source| {
            match &source {
                // The cdev path admits one bound open file per device: a second bind while
                // another process has the device open fails with EINVAL.
                vfio_ioctls::VfioError::VfioDeviceBindIommufd(e) if e.errno() == libc::EINVAL => {
                    PassthroughError::Busy { bdf: name() }
                }
                // The group's DMA belongs to a host driver (or another owner).
                vfio_ioctls::VfioError::VfioDeviceBindIommufd(e) if e.errno() == libc::EPERM => {
                    PassthroughError::GroupNotViable {
                        bdf: name(),
                        why: "the kernel refused DMA ownership (EPERM)".to_string(),
                    }
                }
                _ => PassthroughError::Vfio {
                    bdf: name(),
                    op: "bind to iommufd and attach to the IOAS",
                    source,
                },
            }
        })?;
        Ok((device, Backend::Iommufd(ops)))
    }

    /// Opens the device through its IOMMU group in a new type1 container.
    fn open_legacy(bdf: &str, sysfs: &Path) -> Result<(VfioDevice, Backend), PassthroughError> {
        let name = || bdf.to_string();
        let container =
            Arc::new(
                VfioContainer::new(None).map_err(|source| PassthroughError::Vfio {
                    bdf: name(),
                    op: "open the VFIO container /dev/vfio/vfio",
                    source,
                })?,
            );
        let device =
            VfioDevice::new(sysfs, container.clone(), false).map_err(|source| match &source {
                vfio_ioctls::VfioError::GroupViable => PassthroughError::GroupNotViable {
                    bdf: name(),
                    why: "VFIO reports the group not viable (a device in it has a host driver)"
                        .to_string(),
                },
                vfio_ioctls::VfioError::OpenGroup(e, _)
                    if e.kind() == std::io::ErrorKind::ResourceBusy =>
                {
                    PassthroughError::Busy { bdf: name() }
                }
                _ => PassthroughError::Vfio {
                    bdf: name(),
                    op: "open through the VFIO group and container",
                    source,
                },
            })?;
        Ok((device, Backend::Legacy(container)))
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

    /// Gives the function an IOAPIC line, tells the guest through the interrupt line register,
    /// and connects VFIO's INTx to KVM with a resample eventfd. INTx stays on until the guest
    /// enables MSI.
    fn wire_intx(
        bdf: &str,
        device: &VfioDevice,
        config: &mut ConfigSpace,
        router: &dyn IrqRouter,
    ) -> Result<Option<Intx>, PassthroughError> {
        let has_intx = device
            .get_irq_info(VFIO_PCI_INTX_IRQ_INDEX)
            .is_some_and(|irq| irq.count > 0);
        if !has_intx || config.u16_at(INTERRUPT_LINE) >> 8 == 0 {
            return Ok(None);
        }
        let fail = |source| PassthroughError::Interrupt {
            bdf: bdf.to_string(),
            source,
        };
        let line = router.allocate_intx_line().map_err(fail)?;
        config.set_raw(INTERRUPT_LINE, &[line as u8]);
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(|e| fail(HypervisorError::EventFd(e)));
        let (trigger, resample) = (new_evt()?, new_evt()?);
        router
            .register_resample_irqfd(&trigger, &resample, line)
            .map_err(fail)?;
        device
            .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, vec![&trigger])
            .and_then(|_| device.set_irq_resample_fd(VFIO_PCI_INTX_IRQ_INDEX, vec![&resample]))
            .map_err(|source| PassthroughError::Vfio {
                bdf: bdf.to_string(),
                op: "turn INTx on",
                source,
            })?;
        Ok(Some(Intx {
            line,
            trigger,
            resample,
            enabled: true,
        }))
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
            self.device
                .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, vec![&intx.trigger])
                .and_then(|_| {
                    self.device
                        .set_irq_resample_fd(VFIO_PCI_INTX_IRQ_INDEX, vec![&intx.resample])
                })
        } else {
            self.device.disable_irq(VFIO_PCI_INTX_IRQ_INDEX)
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

    /// Maps `[gpa, gpa + len)` of guest RAM at IOVA == GPA: by file (RAM memfd number
    /// `memfd_index` from `offset`) through iommufd, or by its address in this process (`host`)
    /// through the legacy container.
    ///
    /// # Safety
    ///
    /// `host` must be a mapping of `len` bytes of that memfd that outlives the device.
    pub unsafe fn map_guest_memory(
        &mut self,
        memfd: &impl AsRawFd,
        memfd_index: usize,
        offset: u64,
        gpa: u64,
        len: u64,
        host: *mut u8,
    ) -> Result<(), PassthroughError> {
        match &self.backend {
            Backend::Iommufd(ops) => ops
                .ioas()
                .map_file(memfd.as_raw_fd(), offset, len, gpa, true)
                .map_err(|source| PassthroughError::Iommufd {
                    bdf: self.bdf.clone(),
                    op: "IOMMU_IOAS_MAP_FILE",
                    source,
                })?,
            // SAFETY: the caller guarantees `host` maps `len` bytes for the device's lifetime.
            Backend::Legacy(container) => unsafe {
                container.vfio_dma_map(gpa, len as usize, host)
            }
            .map_err(|source| PassthroughError::Vfio {
                bdf: self.bdf.clone(),
                op: "VFIO_IOMMU_MAP_DMA",
                source,
            })?,
        }
        self.mappings.push(DmaMapping {
            iova: gpa,
            memfd_index,
            offset,
            len,
        });
        Ok(())
    }

    /// What a restore needs: identity, backend, IOAS mappings and the guest-visible config.
    pub fn save(&self, guest_slot: u8) -> PassthroughState {
        PassthroughState {
            bdf: self.bdf.clone(),
            guest_slot,
            backend: match self.backend {
                Backend::Iommufd(_) => VfioBackend::IommufdCdev,
                Backend::Legacy(_) => VfioBackend::LegacyContainer,
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
                .and_then(|evts| self.device.enable_msix(evts).map_err(|e| e.to_string())),
            (false, true) => self.device.disable_msix().map_err(|e| e.to_string()),
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

    /// Applies a write to the emulated MSI capability: on enable, route the GSI to the
    /// guest's message and have VFIO signal its eventfd; on disable, stop VFIO's MSI.
    fn update_msi(&mut self) {
        let Some(msi) = self.msi.as_mut() else { return };
        let control = self.config.u16_at(msi.offset + 2);
        let enable = control & MSI_CONTROL_ENABLE != 0;
        let low = u64::from(self.config.read_u32(msi.offset + 4));
        let (address, data_at) = if msi.is_64bit {
            (
                low | u64::from(self.config.read_u32(msi.offset + 8)) << 32,
                msi.offset + 12,
            )
        } else {
            (low, msi.offset + 8)
        };
        let data = u32::from(self.config.u16_at(data_at));
        if enable && !msi.enabled {
            self.set_intx(false);
        }
        let Some(msi) = self.msi.as_mut() else { return };
        if enable {
            let routed = self
                .router
                .set_msi_route(msi.gsi, address, data)
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    if msi.enabled {
                        return Ok(());
                    }
                    self.router
                        .register_irqfd(&msi.trigger, msi.gsi)
                        .map_err(|e| e.to_string())?;
                    self.device.enable_msi(vec![&msi.trigger]).map_err(|e| {
                        // Leave nothing attached, so the guest's next enable can try again.
                        let _ = self.router.unregister_irqfd(&msi.trigger, msi.gsi);
                        e.to_string()
                    })
                });
            match routed {
                Ok(()) => msi.enabled = true,
                Err(e) => log::error!("{}: cannot enable MSI: {e}", self.bdf),
            }
        } else if msi.enabled {
            if let Err(e) = self.device.disable_msi() {
                log::error!("{}: cannot disable MSI: {e}", self.bdf);
            }
            // KVM takes one irqfd per eventfd: the next enable registers it again.
            if let Err(e) = self.router.unregister_irqfd(&msi.trigger, msi.gsi) {
                log::error!("{}: cannot detach the MSI irqfd: {e}", self.bdf);
            }
            msi.enabled = false;
            self.set_intx(true);
        }
    }
}

/// The shape of BAR `index` from its VFIO region and the device's BAR register.
fn bar_shape(device: &VfioDevice, raw: &[u8; 256], index: usize) -> Option<Bar> {
    if index as u32 >= VFIO_PCI_NUM_REGIONS {
        return None;
    }
    let size = device.get_region_size(index as u32);
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
            self.device
                .region_write(VFIO_PCI_CONFIG_REGION_INDEX, &command, COMMAND as u64);
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
        self.device.region_read(bar as u32, data, offset);
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
        self.device.region_write(bar as u32, data, offset);
    }
}
