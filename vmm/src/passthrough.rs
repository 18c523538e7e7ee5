//! The VM's passthrough devices as a whole: opened by BDF for a boot, or adopted from the fds a
//! handover brought; the one IOMMU context they share; and the fds that move them on.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use luvmm_devices::pci::bus::{PciBus, PciDevice, SlotError};
use luvmm_devices::pci::config::{BarKind, NUM_BARS};
use luvmm_devices::vfio::{
    adopt_cdev, open_by_bdf, open_into, take_retrieved_cdev, BoundDevice, BoundRecord, EarlierBind,
    GuestMapper, InterruptFds, IommuContext, IommuError, IrqRouter, PassthroughArgs,
    PassthroughError, VfioDeviceFd, VfioPciDevice,
};
use luvmm_resources::allocator::{AddressAllocator, AllocError};
use luvmm_resources::config::{BarMode, VfioBackendChoice};
use luvmm_resources::layout::{
    PCI_IO_END, PCI_IO_START, PCI_MMIO32_END, PCI_MMIO32_START, PCI_MMIO64_END, PCI_MMIO64_START,
};
use luvmm_resources::state::{DevicesState, DmaMapping, IommuState, PassthroughState, VfioBackend};
use luvmm_resources::sync::lock;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::faults::{self, Fault};
use crate::vstate::memory::GuestRam;
use crate::vstate::vm::{remove_vfio_file, VmError};

/// Passthrough devices could not be set up; whatever was opened is closed again.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    #[error(transparent)]
    Passthrough(#[from] PassthroughError),
    #[error("IOMMU context")]
    Iommu(#[from] IommuError),
    #[error("cannot place a BAR")]
    Bar(#[from] AllocError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("the handover does not match the saved state: {why}")]
    HandoverMismatch { why: String },
    #[error(
        "the state holds passthrough devices {bdfs:?}; they can only come with their fds, \
         through a handover (--from-socket)"
    )]
    NoDeviceFds { bdfs: Vec<String> },
    #[error(
        "{bdf}: saved on the legacy VFIO container, whose DMA mappings belong to the process \
         that made them; it cannot be restored elsewhere"
    )]
    Legacy { bdf: String },
    #[error(transparent)]
    Keep(#[from] KeepError),
    #[error(
        "the failed restore's IOMMU context holds device objects {ids:?} that its record does \
         not name; only one can be told apart"
    )]
    Unrecorded { ids: Vec<u32> },
    #[error("{bdf}: cannot take its file off the KVM VFIO device")]
    KvmVfio {
        bdf: String,
        #[source]
        source: VmError,
    },
}

/// The IOMMU context could not be left for a next restore.
#[derive(Debug, thiserror::Error)]
#[error("cannot leave the VM's iommufd where a next restore would find it")]
pub struct KeepError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// Where a restore after a kexec leaves its iommufd, with a record of what it bound there, so
/// that a next restore can carry on in it should this one fail (the agent, which keeps them
/// until the VM is finished).
pub trait IommuKeeper {
    fn keep(&self, iommufd: BorrowedFd<'_>, record: &BoundRecord) -> Result<(), KeepError>;
}

/// A restore's part in making a failed restore of the same session retryable.
pub struct RetryIommu<'a> {
    /// The iommufd a failed restore left, and its record.
    pub earlier: Option<(File, BoundRecord)>,
    pub keeper: &'a dyn IommuKeeper,
}

/// A device's fds as they travel in a handover: its cdev and its interrupt eventfds.
pub struct HandedDevice {
    pub fd: File,
    pub interrupts: Vec<OwnedFd>,
}

/// Everything the passthrough devices of a VM bring along in a handover.
pub struct HandedDevices {
    pub iommufd: File,
    /// In the saved state's device order.
    pub devices: Vec<HandedDevice>,
}

/// What the handover manifest says of one device, so the target can check the fds it got
/// against the state before using any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedDeviceManifest {
    pub bdf: String,
    /// Interrupt eventfds after the device fd.
    pub interrupt_fds: usize,
}

/// The VM's passthrough devices and the IOMMU context they share.
///
/// Field order is drop order: the devices close their fds before the iommufd is closed.
#[derive(Default)]
pub struct Passthrough {
    /// Each device with its guest slot.
    pub devices: Vec<(u8, Arc<Mutex<VfioPciDevice>>)>,
    iommu: Option<IommuContext>,
    /// The VM's KVM VFIO pseudo-device, which holds a reference to each device's file.
    kvm_vfio: Option<Arc<VfioDeviceFd>>,
}

/// What the VMM gives every passthrough device.
pub struct DeviceArgs<'a> {
    pub router: &'a Arc<dyn IrqRouter>,
    pub mapper: &'a Arc<dyn GuestMapper>,
    /// For new devices; a restored one keeps its saved mode.
    pub bar_access: BarMode,
    /// The VM's KVM VFIO pseudo-device.
    pub kvm_vfio: Arc<VfioDeviceFd>,
}

impl DeviceArgs<'_> {
    fn for_device(&self) -> PassthroughArgs {
        PassthroughArgs {
            router: self.router.clone(),
            mapper: self.mapper.clone(),
            bar_access: self.bar_access,
        }
    }
}

impl Passthrough {
    /// No device yet, on the VM's KVM VFIO device.
    fn empty(args: &DeviceArgs<'_>) -> Passthrough {
        Passthrough {
            kvm_vfio: Some(args.kvm_vfio.clone()),
            ..Passthrough::default()
        }
    }

    /// Opens every device by BDF, maps guest RAM for them (IOVA == GPA: once by file into the
    /// shared IOAS, or per legacy container by address), places their BARs and puts them on
    /// `bus`.
    pub fn open(
        bdfs: &[String],
        backend: VfioBackendChoice,
        ram: &GuestRam,
        args: &DeviceArgs<'_>,
        bus: &mut PciBus,
    ) -> Result<Passthrough, DeviceSetupError> {
        let mut passthrough = Passthrough::empty(args);
        let mut hosts = Vec::with_capacity(bdfs.len());
        for bdf in bdfs {
            let started = Instant::now();
            hosts.push(open_by_bdf(
                bdf,
                backend,
                &mut passthrough.iommu,
                Some(&args.kvm_vfio),
            )?);
            log::info!(
                "passthrough {bdf}: opened, bound and attached in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        let regions = ram_mappings(ram);
        if let Some(iommu) = passthrough.iommu.as_mut() {
            let started = Instant::now();
            for (m, _, memfd) in &regions {
                iommu.map_file(memfd.as_fd(), m.memfd_index, m.offset, m.iova, m.len)?;
            }
            log::info!(
                "IOAS: {} MiB of guest RAM mapped by file in {:.1} ms, once for every iommufd \
                 device",
                ram.layout().total_bytes() >> 20,
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        let mut windows = BarWindows::new();
        for host in hosts {
            let mut device = VfioPciDevice::new(host, args.for_device())?;
            for &(mapping, host, _) in &regions {
                // SAFETY: the mapping belongs to `ram`, which the VMM keeps for as long as the
                // device exists (devices are dropped before guest memory).
                unsafe { device.map_guest_memory(mapping, host)? };
            }
            windows.place(&mut device)?;
            let device = Arc::new(Mutex::new(device));
            let slot = bus.add(device.clone(), None)?;
            passthrough.devices.push((slot, device));
        }
        Ok(passthrough)
    }

    /// Checks, before anything is built, that the fds a handover brought (or their absence)
    /// fit the saved devices: the state's devices in its order, each with as many interrupt
    /// eventfds as its saved setup uses, none on the legacy container.
    pub fn check_handed(
        saved: &[PassthroughState],
        manifest: &[HandedDeviceManifest],
        handed: Option<&HandedDevices>,
    ) -> Result<(), DeviceSetupError> {
        match handed {
            None if saved.is_empty() => Ok(()),
            None => Err(DeviceSetupError::NoDeviceFds {
                bdfs: saved.iter().map(|p| p.bdf.clone()).collect(),
            }),
            Some(handed) => {
                if let Some(legacy) = saved
                    .iter()
                    .find(|p| p.backend == VfioBackend::LegacyContainer)
                {
                    return Err(DeviceSetupError::Legacy {
                        bdf: legacy.bdf.clone(),
                    });
                }
                check_handover(saved, manifest, handed)
            }
        }
    }

    /// Adopts the devices a handover brought, as `saved` describes them (with `iommu`, the
    /// IOMMU context they share): the same IOAS and mappings, the same slots, BARs, GSIs and
    /// INTx lines, the interrupt eventfds VFIO still signals. Nothing is opened, reset or
    /// mapped again, and no interrupt is taken from the eventfds until `hold_interrupts`
    /// lets them through, so a target may adopt them while the source still runs the guest.
    /// `check_handed` has passed. A device whose MSI cannot be routed again fails the
    /// adoption.
    pub fn adopt(
        saved: &[PassthroughState],
        iommu: Option<&IommuState>,
        handed: HandedDevices,
        args: &DeviceArgs<'_>,
        bus: &mut PciBus,
    ) -> Result<Passthrough, DeviceSetupError> {
        let mut passthrough = Passthrough::empty(args);
        let iommu_state =
            iommu.ok_or_else(|| mismatch("the state names no IOMMU context".to_string()))?;
        let iommu = passthrough.iommu.insert(IommuContext::adopt(
            handed.iommufd,
            iommu_state,
            Some(args.kvm_vfio.clone()),
        )?);
        for (state, fds) in saved.iter().zip(handed.devices) {
            let started = Instant::now();
            let hwpt_id = state
                .hwpt_id
                .ok_or_else(|| mismatch(format!("{}: the state names no HWPT", state.bdf)))?;
            let host = adopt_cdev(&state.bdf, fds.fd, hwpt_id, iommu)?;
            let interrupts = InterruptFds::from_fds(state, &mut fds.interrupts.into_iter())?;
            let waiting = interrupts.waiting();
            // Its interrupts wait in their eventfds until the VM runs (`hold_interrupts`).
            let device = VfioPciDevice::restore(host, args.for_device(), state, Some(interrupts))?;
            let device = Arc::new(Mutex::new(device));
            bus.add(device.clone(), Some(state.guest_slot))?;
            passthrough.devices.push((state.guest_slot, device));
            log::info!(
                "passthrough {}: adopted in {:.1} ms (slot {}, HWPT {hwpt_id}; nothing reopened \
                 or reset); interrupts waiting in its eventfds: {waiting}",
                state.bdf,
                started.elapsed().as_secs_f64() * 1e3,
                state.guest_slot
            );
        }
        Ok(passthrough)
    }

    /// After a kexec: each saved device from the cdev its LUO session gave back
    /// (`retrieved[i]`), else opened again by BDF, bound to the VM's iommufd and attached
    /// to a HWPT; guest RAM mapped again at the same IOVAs from the retrieved memfds; each
    /// device restored from its saved state with its interrupts armed anew, and sent one
    /// interrupt (the one in flight, if any, did not survive the kexec). A device whose
    /// interrupts cannot be armed again fails the whole reopen, before the session is
    /// finished: restored, it would never interrupt. The iommufd is the one a failed restore
    /// of the same session left (`retry`), whose retrieved devices are still bound to it, or
    /// a new one; either way it is left with `retry`'s keeper, with a record of each device
    /// as it is bound, before anything is bound to it. Also returns how long the IOAS mapping
    /// took.
    pub fn reopen(
        saved: &DevicesState,
        retrieved: Vec<Option<File>>,
        retry: RetryIommu<'_>,
        ram: &GuestRam,
        args: &DeviceArgs<'_>,
        bus: &mut PciBus,
    ) -> Result<(Passthrough, Duration), DeviceSetupError> {
        let mut passthrough = Passthrough::empty(args);
        if saved.passthrough.is_empty() {
            return Ok((passthrough, Duration::ZERO));
        }
        let kvm_vfio = Some(args.kvm_vfio.clone());
        // Only a retrieved device outlives this process bound to its iommufd: without one,
        // nothing is left with the keeper.
        let retrieved_any = retrieved.iter().any(Option::is_some);
        let (context, mut bound, mut unrecorded) = match retry.earlier {
            Some((iommufd, earlier)) => {
                let context = IommuContext::resume(iommufd, &earlier, kvm_vfio)?;
                let unrecorded = unrecorded_device(&context, &earlier)?;
                log::info!(
                    "IOMMU context of a failed restore taken again: IOAS {}, {} devices bound \
                     as it recorded{}",
                    earlier.ioas_id,
                    earlier.devices.len(),
                    unrecorded.map_or(String::new(), |id| format!(
                        ", and device object {id}, bound before it could record it"
                    ))
                );
                (context, earlier.devices, unrecorded)
            }
            None => {
                let context = IommuContext::new(kvm_vfio)?;
                if retrieved_any {
                    retry
                        .keeper
                        .keep(context.iommufd(), &context.record(Vec::new()))?;
                }
                (context, Vec::new(), None)
            }
        };
        let context = passthrough.iommu.insert(context);
        let mut hosts = Vec::with_capacity(saved.passthrough.len());
        for (state, cdev) in saved.passthrough.iter().zip(retrieved) {
            let started = Instant::now();
            let bdf = &state.bdf;
            let Some(cdev) = cdev else {
                hosts.push((state, open_into(bdf, context)?));
                log::info!(
                    "passthrough {bdf}: not preserved by the old kernel: opened again and bound \
                     in {:.1} ms",
                    started.elapsed().as_secs_f64() * 1e3
                );
                continue;
            };
            let earlier = earlier_bind(bdf, &bound, &mut unrecorded);
            let (host, device) = take_retrieved_cdev(bdf, cdev, context, earlier)?;
            if faults::armed(Fault::StopBeforeDeviceRecord) {
                faults::stop_here();
            }
            if !matches!(earlier, EarlierBind::Recorded { .. }) {
                bound.push(device);
                retry
                    .keeper
                    .keep(context.iommufd(), &context.record(bound.clone()))?;
            }
            log::info!(
                "passthrough {bdf}: retrieved from its LUO session, {} in {:.1} ms",
                match earlier {
                    EarlierBind::None => "bound",
                    EarlierBind::Recorded { .. } => "as the failed restore bound it",
                    EarlierBind::Unrecorded { .. } => {
                        "found bound by the failed restore, which had not recorded it"
                    }
                },
                started.elapsed().as_secs_f64() * 1e3
            );
            hosts.push((state, host));
        }
        if faults::armed(Fault::StopAfterDeviceBind) {
            faults::stop_here();
        }
        if faults::armed(Fault::SwapDevices) && hosts.len() >= 2 {
            log::warn!(
                "test fault swap-devices: {} and {} each go into the other's slot",
                hosts[0].0.bdf,
                hosts[1].0.bdf
            );
            let (first, rest) = hosts.split_at_mut(1);
            std::mem::swap(&mut first[0].1, &mut rest[0].1);
        }
        let regions = ram_mappings(ram);
        let mapping = Instant::now();
        for (m, _, memfd) in &regions {
            context.map_file(memfd.as_fd(), m.memfd_index, m.offset, m.iova, m.len)?;
        }
        let ioas_map = mapping.elapsed();
        for (state, host) in hosts {
            let mut device = VfioPciDevice::restore(host, args.for_device(), state, None)?;
            device.forget_mappings();
            for &(mapping, host, _) in &regions {
                // SAFETY: as in `open`: `ram` outlives the devices.
                unsafe { device.map_guest_memory(mapping, host)? };
            }
            device.inject_interrupt();
            let device = Arc::new(Mutex::new(device));
            bus.add(device.clone(), Some(state.guest_slot))?;
            passthrough.devices.push((state.guest_slot, device));
        }
        Ok((passthrough, ioas_map))
    }

    /// After a live update whose kexec failed once the kernel had frozen some devices: each
    /// device the freeze reset (its file gives EIO for good) is let go (taken off the KVM VFIO
    /// device, its BARs unmapped, its file closed) and opened again by BDF into the VM's
    /// IOMMU context, whose IOAS still maps guest RAM, under the guest's unchanged view of it.
    /// Returns each device found reset, with how its replacement went; one that cannot be
    /// opened again stays unplugged (the guest reads all-ones from it).
    pub fn replace_reset_devices(&mut self) -> Vec<(String, Result<(), DeviceSetupError>)> {
        let Some(kvm_vfio) = &self.kvm_vfio else {
            return Vec::new();
        };
        let mut replaced = Vec::new();
        for (_, device) in &self.devices {
            let mut device = lock(device);
            if device.lost_to_reset() {
                let bdf = device.bdf().to_string();
                let started = Instant::now();
                let result = replace(&mut device, &mut self.iommu, kvm_vfio);
                if result.is_ok() {
                    log::info!(
                        "passthrough {bdf}: opened again in {:.1} ms",
                        started.elapsed().as_secs_f64() * 1e3
                    );
                }
                replaced.push((bdf, result));
            }
        }
        replaced
    }

    /// Host devices on the legacy container, which cannot move to another process.
    pub fn legacy_bdfs(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter_map(|(_, d)| {
                let device = lock(d);
                device
                    .device_fd()
                    .is_none()
                    .then(|| device.bdf().to_string())
            })
            .collect()
    }

    /// Gives the devices up without touching them, their files taken off the VM's KVM VFIO
    /// device first (KVM refuses a file it already holds), so that the same files can be
    /// adopted again on the same VM. Returns that KVM VFIO device.
    pub fn forget(self) -> Result<Option<Arc<VfioDeviceFd>>, DeviceSetupError> {
        if let Some(kvm_vfio) = &self.kvm_vfio {
            for (_, device) in &self.devices {
                let device = lock(device);
                if let Some(fd) = device.device_fd() {
                    remove_vfio_file(kvm_vfio, fd).map_err(|source| DeviceSetupError::KvmVfio {
                        bdf: device.bdf().to_string(),
                        source,
                    })?;
                }
            }
        }
        Ok(self.kvm_vfio.clone())
    }

    /// Detaches (`true`) or attaches again every device's irqfds.
    pub fn hold_interrupts(&self, held: bool) {
        for (_, device) in &self.devices {
            lock(device).hold_interrupts(held);
        }
    }

    /// Each device's state, and the IOMMU context's.
    pub fn save(&self) -> (Vec<PassthroughState>, Option<IommuState>) {
        let devices = self
            .devices
            .iter()
            .map(|(slot, d)| lock(d).save(*slot))
            .collect();
        (devices, self.iommu.as_ref().map(IommuContext::save))
    }

    /// Duplicates what a handover sends: the iommufd, then per device its cdev and its
    /// interrupt eventfds; with the manifest of them. Nothing if there are no devices.
    pub fn handover_fds(&self) -> std::io::Result<(Vec<HandedDeviceManifest>, Vec<OwnedFd>)> {
        let mut manifest = Vec::with_capacity(self.devices.len());
        let mut fds = Vec::new();
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned();
        if let Some(iommu) = &self.iommu {
            fds.push(dup(iommu.iommufd())?);
        }
        for (_, device) in &self.devices {
            let device = lock(device);
            let Some(fd) = device.device_fd() else {
                continue; // Refused before this (`legacy_bdfs`).
            };
            fds.push(dup(fd)?);
            let interrupts = device.interrupt_fds();
            manifest.push(HandedDeviceManifest {
                bdf: device.bdf().to_string(),
                interrupt_fds: interrupts.len(),
            });
            for fd in interrupts {
                fds.push(dup(fd)?);
            }
        }
        Ok((manifest, fds))
    }

    /// Whether the VM has no passthrough device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Each device as a live update sees it, in slot order: its BDF, whether it is at full
    /// power, and a duplicate of its file (none on the legacy container).
    pub fn update_view(&self) -> std::io::Result<Vec<DeviceFile>> {
        self.devices
            .iter()
            .map(|(_, device)| {
                let device = lock(device);
                Ok(DeviceFile {
                    bdf: device.bdf().to_string(),
                    in_d0: device.in_d0(),
                    fd: device
                        .device_fd()
                        .map(|fd| fd.try_clone_to_owned())
                        .transpose()?,
                })
            })
            .collect()
    }

    /// Before a live update's freeze: every device must be in D0, and has its VFIO
    /// interrupts turned off (a preserved device must have none enabled when the kernel
    /// freezes it). Stops at the first that cannot.
    pub fn quiesce_all(&self) -> Result<(), QuiesceError> {
        for (_, device) in &self.devices {
            let mut device = lock(device);
            if !device.in_d0() {
                return Err(QuiesceError::NotInD0 {
                    bdf: device.bdf().to_string(),
                });
            }
            device
                .quiesce_interrupts(true)
                .map_err(|source| QuiesceError::Interrupts {
                    bdf: device.bdf().to_string(),
                    source,
                })?;
        }
        Ok(())
    }

    /// When a live update is called off: every device's VFIO interrupts on again. Returns
    /// the devices that refused, with why.
    pub fn rearm_all(&self) -> Vec<(String, PassthroughError)> {
        let mut refused = Vec::new();
        for (_, device) in &self.devices {
            let mut device = lock(device);
            if let Err(e) = device.quiesce_interrupts(false) {
                refused.push((device.bdf().to_string(), e));
            }
        }
        refused
    }
}

/// A passthrough device as the live update sees it.
pub struct DeviceFile {
    pub bdf: String,
    /// At full power: a device is preserved only in D0.
    pub in_d0: bool,
    /// Its VFIO cdev, duplicated; `None` on the legacy container, which cannot be preserved.
    pub fd: Option<OwnedFd>,
}

/// A device's VFIO interrupts could not be turned off for a live update.
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    #[error("{bdf}: not in D0; a device is preserved only at full power")]
    NotInD0 { bdf: String },
    #[error("{bdf}: cannot turn its VFIO interrupts off")]
    Interrupts {
        bdf: String,
        #[source]
        source: PassthroughError,
    },
}

/// `replace_reset_devices` for one device.
fn replace(
    device: &mut VfioPciDevice,
    iommu: &mut Option<IommuContext>,
    kvm_vfio: &Arc<VfioDeviceFd>,
) -> Result<(), DeviceSetupError> {
    let bdf = device.bdf().to_string();
    if let Some(fd) = device.device_fd() {
        remove_vfio_file(kvm_vfio, fd).map_err(|source| DeviceSetupError::KvmVfio {
            bdf: bdf.clone(),
            source,
        })?;
    }
    // Closed before the new open: the cdev path admits one open file per device.
    drop(device.release_function());
    let host = open_by_bdf(&bdf, VfioBackendChoice::Iommufd, iommu, Some(kvm_vfio))?;
    device.adopt_function(host)?;
    Ok(())
}

/// The one device object of a failed restore's context that its record does not name: the
/// device it was binding when it was stopped (it records each device as soon as it is bound).
fn unrecorded_device(
    context: &IommuContext,
    record: &BoundRecord,
) -> Result<Option<u32>, DeviceSetupError> {
    let ids: Vec<u32> = context
        .device_ids()
        .into_iter()
        .filter(|id| !record.devices.iter().any(|d| d.dev_id == *id))
        .collect();
    match ids.as_slice() {
        [] => Ok(None),
        [id] => Ok(Some(*id)),
        _ => Err(DeviceSetupError::Unrecorded { ids }),
    }
}

/// What a failed restore did with device `bdf`: `recorded` it; or, for the first retrieved
/// device it did not record (it binds in state order), bound it as `unrecorded` before it
/// could record it; or nothing.
fn earlier_bind(bdf: &str, recorded: &[BoundDevice], unrecorded: &mut Option<u32>) -> EarlierBind {
    if let Some(d) = recorded.iter().find(|d| d.bdf == bdf) {
        return EarlierBind::Recorded {
            dev_id: d.dev_id,
            hwpt_id: d.hwpt_id,
        };
    }
    match unrecorded.take() {
        Some(dev_id) => EarlierBind::Unrecorded { dev_id },
        None => EarlierBind::None,
    }
}

/// Each RAM region as a DMA mapping at IOVA == GPA, with its host address and memfd.
fn ram_mappings(ram: &GuestRam) -> Vec<(DmaMapping, *mut u8, &File)> {
    ram.memory()
        .iter()
        .zip(ram.memfds())
        .enumerate()
        .map(|(index, (region, memfd))| {
            let mapping = DmaMapping {
                iova: region.start_addr().0,
                memfd_index: index,
                offset: 0,
                len: region.len(),
            };
            (mapping, region.as_ptr(), memfd)
        })
        .collect()
}

fn mismatch(why: String) -> DeviceSetupError {
    DeviceSetupError::HandoverMismatch { why }
}

/// The manifest and the fds must describe the state's devices, in its order, with as many
/// interrupt eventfds as each one's saved interrupt setup uses.
fn check_handover(
    saved: &[PassthroughState],
    manifest: &[HandedDeviceManifest],
    handed: &HandedDevices,
) -> Result<(), DeviceSetupError> {
    let saved_bdfs: Vec<&str> = saved.iter().map(|p| p.bdf.as_str()).collect();
    let handed_bdfs: Vec<&str> = manifest.iter().map(|m| m.bdf.as_str()).collect();
    if saved_bdfs != handed_bdfs {
        return Err(mismatch(format!(
            "the state holds devices {saved_bdfs:?}, the fds are of {handed_bdfs:?}"
        )));
    }
    if handed.devices.len() != saved.len() {
        return Err(mismatch(format!(
            "{} devices in the state, fds for {}",
            saved.len(),
            handed.devices.len()
        )));
    }
    for ((state, entry), fds) in saved.iter().zip(manifest).zip(&handed.devices) {
        let needed = InterruptFds::count(state);
        if entry.interrupt_fds != needed || fds.interrupts.len() != needed {
            return Err(mismatch(format!(
                "{}: its saved interrupts use {needed} eventfds, {} were handed over",
                state.bdf,
                fds.interrupts.len()
            )));
        }
    }
    Ok(())
}

/// The PCI windows BARs are placed in, in order.
struct BarWindows {
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    io: AddressAllocator,
}

impl BarWindows {
    fn new() -> BarWindows {
        BarWindows {
            mmio32: AddressAllocator::new("PCI 32-bit MMIO", PCI_MMIO32_START, PCI_MMIO32_END),
            mmio64: AddressAllocator::new("PCI 64-bit MMIO", PCI_MMIO64_START, PCI_MMIO64_END),
            io: AddressAllocator::new("PCI I/O", PCI_IO_START, PCI_IO_END),
        }
    }

    fn place(&mut self, device: &mut VfioPciDevice) -> Result<(), AllocError> {
        for index in 0..NUM_BARS {
            let Some(bar) = PciDevice::config(device).bar(index) else {
                continue;
            };
            let window = match bar.kind {
                BarKind::Mmio32 => &mut self.mmio32,
                BarKind::Mmio64 => &mut self.mmio64,
                BarKind::Io => &mut self.io,
            };
            device.place_bar(index, window.allocate(bar.size)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luvmm_resources::state::{IntxState, MsiState, MsixState};

    fn device(bdf: &str) -> PassthroughState {
        PassthroughState {
            bdf: bdf.into(),
            guest_slot: 1,
            backend: VfioBackend::IommufdCdev,
            mappings: Vec::new(),
            config: vec![0; 256],
            msi: Some(MsiState {
                offset: 0x40,
                enabled: true,
                gsi: 24,
            }),
            msix: Some(MsixState {
                offset: 0x50,
                enabled: true,
                table: vec![0; 8],
                gsis: vec![25, 26],
            }),
            intx: Some(IntxState {
                line: 16,
                enabled: false,
            }),
            hwpt_id: Some(2),
            bar_access: BarMode::Direct,
        }
    }

    fn handed(counts: &[usize]) -> HandedDevices {
        let file = || File::open("/dev/null").unwrap();
        let fd = || OwnedFd::from(file());
        HandedDevices {
            iommufd: file(),
            devices: counts
                .iter()
                .map(|&n| HandedDevice {
                    fd: file(),
                    interrupts: (0..n).map(|_| fd()).collect(),
                })
                .collect(),
        }
    }

    fn entry(bdf: &str, interrupt_fds: usize) -> HandedDeviceManifest {
        HandedDeviceManifest {
            bdf: bdf.into(),
            interrupt_fds,
        }
    }

    #[test]
    fn a_handover_must_match_the_state_device_by_device() {
        let saved = [device("0000:00:02.0"), device("0000:00:03.0")];
        // MSI, two MSI-X vectors, INTx trigger and resample.
        assert_eq!(InterruptFds::count(&saved[0]), 5);
        let manifest = [entry("0000:00:02.0", 5), entry("0000:00:03.0", 5)];
        assert!(check_handover(&saved, &manifest, &handed(&[5, 5])).is_ok());
        let why = |result: Result<(), DeviceSetupError>| match result {
            Err(DeviceSetupError::HandoverMismatch { why }) => why,
            other => panic!("{other:?}"),
        };
        let swapped = [entry("0000:00:03.0", 5), entry("0000:00:02.0", 5)];
        assert!(why(check_handover(&saved, &swapped, &handed(&[5, 5])))
            .contains("the fds are of [\"0000:00:03.0\", \"0000:00:02.0\"]"));
        assert!(why(check_handover(&saved, &manifest, &handed(&[5]))).contains("fds for 1"));
        assert!(why(check_handover(&saved, &manifest, &handed(&[5, 4])))
            .contains("0000:00:03.0: its saved interrupts use 5 eventfds, 4 were handed over"));
    }
}
