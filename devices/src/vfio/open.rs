//! The two ways to get a host function for passthrough: discover and open it by BDF (sysfs,
//! group viability, the cdev or the group), or adopt a device fd that came from elsewhere (a
//! VMM handing its VM over, or LUO after a kexec), which never touches sysfs or `/dev/vfio`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use luvmm_resources::config::VfioBackendChoice;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError};

use crate::vfio::function::HostFunction;
use crate::vfio::host::{bound_driver, group_blockers, sysfs_dir};
use crate::vfio::iommu::{BoundDevice, IommuContext, IommuError};
use crate::vfio::passthrough::{DeviceIommu, HostDevice, PassthroughError};

/// Opens `bdf` for passthrough. Checks what can be checked first, so each way this fails
/// has its own error. An iommufd device is bound to the VM's context (created on first use)
/// and attached to one of its HWPTs; a legacy one gets a container of its own.
pub fn open_by_bdf(
    bdf: &str,
    choice: VfioBackendChoice,
    iommu: &mut Option<IommuContext>,
    kvm_vfio: Option<&Arc<VfioDeviceFd>>,
) -> Result<HostDevice, PassthroughError> {
    let sysfs = openable(bdf)?;
    match choice {
        VfioBackendChoice::Iommufd | VfioBackendChoice::Auto if iommufd_ready(&sysfs) => {
            let cdev = open_cdev(bdf, &sysfs)?;
            bind_cdev(bdf, cdev, iommu, kvm_vfio)
        }
        VfioBackendChoice::Iommufd => Err(no_iommufd(bdf)),
        VfioBackendChoice::Auto | VfioBackendChoice::Legacy => {
            if choice == VfioBackendChoice::Auto {
                log::warn!(
                    "{bdf}: no iommufd or VFIO cdev on this kernel: using the legacy VFIO \
                     group/container path (DMA mapped by address; such a VM cannot move to \
                     another process or through a live update)"
                );
            }
            open_group(bdf, &sysfs, kvm_vfio)
        }
    }
}

/// Opens `bdf`'s cdev and binds it into `context`, which the VM already has.
pub fn open_into(bdf: &str, context: &mut IommuContext) -> Result<HostDevice, PassthroughError> {
    let sysfs = openable(bdf)?;
    if !iommufd_ready(&sysfs) {
        return Err(no_iommufd(bdf));
    }
    let cdev = open_cdev(bdf, &sysfs)?;
    bind_into(bdf, cdev, context).map(|(host, _)| host)
}

/// `bdf`'s sysfs directory, once the device is found present, on vfio-pci, and alone in its
/// group (or with devices on vfio-pci or on no driver).
fn openable(bdf: &str) -> Result<PathBuf, PassthroughError> {
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
                "{} bound to a host driver; bind every device of the group to vfio-pci, or \
                 unbind it",
                blockers.join(", ")
            ),
        });
    }
    Ok(sysfs)
}

/// Whether the kernel offers iommufd and a cdev for the device at `sysfs`.
fn iommufd_ready(sysfs: &Path) -> bool {
    Path::new("/dev/iommu").exists() && sysfs.join("vfio-dev").exists()
}

/// Why `bdf` cannot be opened through iommufd.
fn no_iommufd(bdf: &str) -> PassthroughError {
    let bdf = bdf.to_string();
    if Path::new("/dev/iommu").exists() {
        PassthroughError::NoCdev { bdf }
    } else {
        PassthroughError::NoIommufd { bdf }
    }
}

/// Adopts the cdev `fd` of `bdf`, already bound to `iommu`'s iommufd (by the VMM that handed
/// the VM over, or a failed restore) and attached to HWPT `hwpt_id`. Nothing is opened,
/// bound, attached or reset.
pub fn adopt_cdev(
    bdf: &str,
    fd: File,
    hwpt_id: u32,
    iommu: &IommuContext,
) -> Result<HostDevice, PassthroughError> {
    Ok(HostDevice {
        bdf: bdf.to_string(),
        function: Box::new(adopt_bound(bdf, fd, iommu)?),
        iommu: DeviceIommu::Iommufd { hwpt_id },
    })
}

/// Wraps a cdev bound to `iommu` by another process.
fn adopt_bound(
    bdf: &str,
    fd: File,
    iommu: &IommuContext,
) -> Result<HostFunction, PassthroughError> {
    let device = iommu
        .adopt_device(fd)
        .map_err(|source| PassthroughError::Vfio {
            bdf: bdf.to_string(),
            op: "adopt a VFIO cdev bound by another process",
            source,
        })?;
    Ok(HostFunction::cdev(device))
}

fn iommu_error(bdf: &str) -> impl FnOnce(IommuError) -> PassthroughError + '_ {
    move |source| PassthroughError::Iommu {
        bdf: bdf.to_string(),
        source,
    }
}

/// Opens the device's cdev.
fn open_cdev(bdf: &str, sysfs: &Path) -> Result<File, PassthroughError> {
    VfioDevice::open_cdev(sysfs).map_err(|source| match &source {
        VfioError::OpenDeviceCdev(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
            PassthroughError::Busy {
                bdf: bdf.to_string(),
            }
        }
        _ => PassthroughError::Vfio {
            bdf: bdf.to_string(),
            op: "open the VFIO cdev",
            source,
        },
    })
}

/// Binds a cdev opened here to the VM's iommufd (created on first use) and attaches it to a
/// HWPT over its IOAS.
fn bind_cdev(
    bdf: &str,
    cdev: File,
    iommu: &mut Option<IommuContext>,
    kvm_vfio: Option<&Arc<VfioDeviceFd>>,
) -> Result<HostDevice, PassthroughError> {
    let context = match iommu {
        Some(context) => context,
        None => {
            let handle = kvm_vfio.cloned();
            iommu.insert(IommuContext::new(handle).map_err(iommu_error(bdf))?)
        }
    };
    bind_into(bdf, cdev, context).map(|(host, _)| host)
}

/// What an earlier restore of the same session did with a retrieved device in the context it
/// left ([`crate::vfio::iommu::BoundRecord`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlierBind {
    /// Nothing: it is bound here.
    None,
    /// Bound as `dev_id` and attached to HWPT `hwpt_id`, as its record says.
    Recorded { dev_id: u32, hwpt_id: u32 },
    /// Bound as `dev_id` (the one device object its record does not name: it was stopped
    /// before it noted it), attached or not.
    Unrecorded { dev_id: u32 },
}

/// Takes a cdev retrieved after a kexec into `context`: binds and attaches it, or takes it as
/// an earlier restore of the same session left it (`earlier`), since every retrieve gives the
/// same open file and only that file's last close unbinds it. Returns the device and how it
/// is bound.
pub fn take_retrieved_cdev(
    bdf: &str,
    cdev: File,
    context: &mut IommuContext,
    earlier: EarlierBind,
) -> Result<(HostDevice, BoundDevice), PassthroughError> {
    match earlier {
        EarlierBind::None => bind_into(bdf, cdev, context),
        EarlierBind::Recorded { dev_id, hwpt_id } => {
            let host = adopt_cdev(bdf, cdev, hwpt_id, context)?;
            Ok((host, bound(bdf, dev_id, hwpt_id)))
        }
        EarlierBind::Unrecorded { dev_id } => {
            let function = adopt_bound(bdf, cdev, context)?;
            let hwpt_id = context
                .attach(function.device(), dev_id)
                .map_err(iommu_error(bdf))?;
            let host = HostDevice {
                bdf: bdf.to_string(),
                function: Box::new(function),
                iommu: DeviceIommu::Iommufd { hwpt_id },
            };
            Ok((host, bound(bdf, dev_id, hwpt_id)))
        }
    }
}

fn bound(bdf: &str, dev_id: u32, hwpt_id: u32) -> BoundDevice {
    BoundDevice {
        bdf: bdf.to_string(),
        dev_id,
        hwpt_id,
    }
}

/// Binds `cdev` to `context` and attaches it; returns it with how it is bound.
fn bind_into(
    bdf: &str,
    cdev: File,
    context: &mut IommuContext,
) -> Result<(HostDevice, BoundDevice), PassthroughError> {
    let name = || bdf.to_string();
    let device = context.bind(cdev).map_err(|source| match &source {
        // The cdev path admits one bound open file per device: a second bind while another
        // process has the device open fails with EINVAL.
        VfioError::VfioDeviceBindIommufd(e) if e.errno() == libc::EINVAL => {
            PassthroughError::Busy { bdf: name() }
        }
        // The group's DMA belongs to a host driver (or another owner).
        VfioError::VfioDeviceBindIommufd(e) if e.errno() == libc::EPERM => {
            PassthroughError::GroupNotViable {
                bdf: name(),
                why: "the kernel refused DMA ownership (EPERM)".to_string(),
            }
        }
        _ => PassthroughError::Vfio {
            bdf: name(),
            op: "bind to iommufd",
            source,
        },
    })?;
    let dev_id = device
        .iommufd_dev_id()
        .ok_or_else(|| iommu_error(bdf)(IommuError::NotBound))?;
    // Wrapped before attaching, so a failed attach closes the fd the way luvmm does.
    let function = HostFunction::cdev(device);
    let hwpt_id = context
        .attach(function.device(), dev_id)
        .map_err(iommu_error(bdf))?;
    let host = HostDevice {
        bdf: name(),
        function: Box::new(function),
        iommu: DeviceIommu::Iommufd { hwpt_id },
    };
    Ok((host, bound(bdf, dev_id, hwpt_id)))
}

/// Opens the device through its IOMMU group in a new type1 container.
fn open_group(
    bdf: &str,
    sysfs: &Path,
    kvm_vfio: Option<&Arc<VfioDeviceFd>>,
) -> Result<HostDevice, PassthroughError> {
    let name = || bdf.to_string();
    let handle = kvm_vfio.cloned();
    let container =
        Arc::new(
            VfioContainer::new(handle).map_err(|source| PassthroughError::Vfio {
                bdf: name(),
                op: "open the VFIO container /dev/vfio/vfio",
                source,
            })?,
        );
    let device =
        VfioDevice::new(sysfs, container.clone(), false).map_err(|source| match &source {
            VfioError::GroupViable => PassthroughError::GroupNotViable {
                bdf: name(),
                why: "VFIO reports the group not viable (a device in it has a host driver)"
                    .to_string(),
            },
            VfioError::OpenGroup(e, _) if e.kind() == std::io::ErrorKind::ResourceBusy => {
                PassthroughError::Busy { bdf: name() }
            }
            _ => PassthroughError::Vfio {
                bdf: name(),
                op: "open through the VFIO group and container",
                source,
            },
        })?;
    Ok(HostDevice {
        bdf: name(),
        function: Box::new(HostFunction::group(device)),
        iommu: DeviceIommu::Legacy(container),
    })
}
