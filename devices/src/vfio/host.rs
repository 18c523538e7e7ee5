//! VFIO devices of the host: finding the ones bound to vfio-pci, and binding one to an iommufd
//! so a probe can ask LUO whether it could preserve it (or so a session holding it can finish).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iommufd_ioctls::IommuFd;
use vfio_ioctls::{VfioDevice, VfioIommufd};

const VFIO_PCI_DRIVER: &str = "/sys/bus/pci/drivers/vfio-pci";

/// `bdf`'s directory in sysfs.
pub fn sysfs_dir(bdf: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(bdf)
}

/// The driver bound to the device at sysfs `dir`, if any.
pub fn bound_driver(dir: &Path) -> Option<String> {
    let link = std::fs::read_link(dir.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// A PCI function bound to vfio-pci on this host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostVfioDevice {
    /// Domain:bus:device.function, e.g. `0000:00:03.0`.
    pub bdf: String,
    /// `/dev/vfio/devices/vfioN`, when the kernel has VFIO cdev support.
    pub cdev: Option<PathBuf>,
    /// The IOMMU group number (the legacy `/dev/vfio/N` path).
    pub iommu_group: Option<u32>,
}

/// Lists the PCI functions bound to vfio-pci, in BDF order.
pub fn host_vfio_devices() -> Vec<HostVfioDevice> {
    let mut devices: Vec<HostVfioDevice> = std::fs::read_dir(VFIO_PCI_DRIVER)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let bdf = entry.file_name().into_string().ok()?;
            // Driver directories also hold bind/unbind/new_id files; BDFs have a colon.
            bdf.contains(':').then(|| describe(&bdf, &entry.path()))
        })
        .collect();
    devices.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    devices
}

fn describe(bdf: &str, sysfs: &Path) -> HostVfioDevice {
    let cdev = std::fs::read_dir(sysfs.join("vfio-dev"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| Path::new("/dev/vfio/devices").join(e.file_name()));
    let iommu_group = std::fs::read_link(sysfs.join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok());
    HostVfioDevice {
        bdf: bdf.to_string(),
        cdev,
        iommu_group,
    }
}

/// The other functions in `bdf`'s IOMMU group that a host driver holds, as "BDF (driver)".
/// While there is one, the kernel lets nobody else own the group's DMA: a VFIO user's open
/// fails (iommufd with EPERM, the legacy group as not viable). Drivers that leave DMA to
/// their user (vfio-pci and its variants, PCIe port services) do not count.
pub fn group_blockers(bdf: &str) -> Vec<String> {
    let group = sysfs_dir(bdf).join("iommu_group/devices");
    let mut blockers: Vec<String> = std::fs::read_dir(group)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|member| {
            let other = member.file_name().into_string().ok()?;
            let driver = bound_driver(&member.path())?;
            let leaves_dma = driver.contains("vfio") || driver == "pcieport";
            (other != bdf && !leaves_dma).then(|| format!("{other} ({driver})"))
        })
        .collect();
    blockers.sort();
    blockers
}

/// Why a device could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum VfioBindError {
    #[error("{bdf}: no VFIO cdev (the kernel lacks CONFIG_VFIO_DEVICE_CDEV, or iommufd)")]
    NoCdev { bdf: String },
    #[error("{bdf}: cannot open /dev/iommu")]
    Iommufd {
        bdf: String,
        #[source]
        source: iommufd_ioctls::IommufdError,
    },
    #[error("{bdf}: cannot open, bind or attach the VFIO cdev")]
    Vfio {
        bdf: String,
        #[source]
        source: vfio_ioctls::VfioError,
    },
}

/// A VFIO cdev bound to a fresh iommufd and attached to an IOAS, as a VMM would hold it.
/// Dropping it detaches and closes it; it is for probing and releasing, not for running a
/// guest.
pub struct BoundCdev {
    pub bdf: String,
    device: VfioDevice,
}

impl BoundCdev {
    /// Opens `device`'s cdev, binds it to a new iommufd and attaches it to a new IOAS.
    pub fn bind(device: &HostVfioDevice) -> Result<BoundCdev, VfioBindError> {
        let bdf = device.bdf.clone();
        if device.cdev.is_none() {
            return Err(VfioBindError::NoCdev { bdf });
        }
        let cdev = VfioDevice::open_cdev(&sysfs_dir(&device.bdf)).map_err(|source| {
            VfioBindError::Vfio {
                bdf: bdf.clone(),
                source,
            }
        })?;
        Self::adopt(bdf, cdev)
    }

    /// Binds `cdev`, an open VFIO device file bound to nothing (a fresh cdev open, or a file
    /// retrieved from a LUO session), to a new iommufd and attaches it to a new IOAS.
    pub fn adopt(bdf: String, cdev: File) -> Result<BoundCdev, VfioBindError> {
        let iommufd = IommuFd::new().map_err(|source| VfioBindError::Iommufd {
            bdf: bdf.clone(),
            source,
        })?;
        let vfio_err = |source| VfioBindError::Vfio {
            bdf: bdf.clone(),
            source,
        };
        let ops = VfioIommufd::new(Arc::new(iommufd), None, None).map_err(vfio_err)?;
        // Attached, so that VfioDevice's Drop (which detaches and unwraps) succeeds.
        let device = VfioDevice::new_from_fd(cdev, Arc::new(ops), true).map_err(vfio_err)?;
        Ok(BoundCdev { bdf, device })
    }

    /// The bound cdev fd.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the fd belongs to `self.device`, which outlives the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.device.as_raw_fd()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_vfio_pci_lists_nothing() {
        // Here and in CI no device is bound to vfio-pci; the nested bed lists its edu devices.
        if Path::new(VFIO_PCI_DRIVER).exists() {
            for dev in host_vfio_devices() {
                assert!(dev.bdf.contains(':'), "{dev:?}");
            }
        } else {
            assert!(host_vfio_devices().is_empty());
        }
    }
}
