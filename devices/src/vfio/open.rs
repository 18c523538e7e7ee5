//! The two ways to get a host function for passthrough: discover and open it by BDF (sysfs,
//! group viability, the cdev or the group), or adopt a device fd that came from elsewhere (a
//! VMM handing its VM over, or LUO after a kexec), which never touches sysfs or `/dev/vfio`.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use luvmm_resources::config::VfioBackendChoice;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError};

use crate::vfio::function::HostFunction;
use crate::vfio::host::{bound_driver, group_blockers, sysfs_dir};
use crate::vfio::iommu::{IommuContext, IommuError};
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
    let iommufd_ready = Path::new("/dev/iommu").exists() && sysfs.join("vfio-dev").exists();
    match choice {
        VfioBackendChoice::Iommufd | VfioBackendChoice::Auto if iommufd_ready => {
            open_cdev(bdf, &sysfs, iommu, kvm_vfio)
        }
        VfioBackendChoice::Iommufd => Err(if Path::new("/dev/iommu").exists() {
            PassthroughError::NoCdev { bdf: name() }
        } else {
            PassthroughError::NoIommufd { bdf: name() }
        }),
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

/// Adopts the cdev `fd` of `bdf`, handed over already bound to `iommu`'s iommufd and
/// attached to HWPT `hwpt_id`. Nothing is opened, bound, attached or reset.
pub fn adopt_cdev(
    bdf: &str,
    fd: File,
    hwpt_id: u32,
    iommu: &IommuContext,
) -> Result<HostDevice, PassthroughError> {
    let device = iommu
        .adopt_device(fd)
        .map_err(|source| PassthroughError::Vfio {
            bdf: bdf.to_string(),
            op: "adopt the handed-over VFIO cdev",
            source,
        })?;
    Ok(HostDevice {
        bdf: bdf.to_string(),
        function: Box::new(HostFunction::cdev(device)),
        iommu: DeviceIommu::Iommufd { hwpt_id },
    })
}

fn iommu_error(bdf: &str) -> impl FnOnce(IommuError) -> PassthroughError + '_ {
    move |source| PassthroughError::Iommu {
        bdf: bdf.to_string(),
        source,
    }
}

/// Opens the cdev, binds it to the VM's iommufd and attaches it to a HWPT over its IOAS.
fn open_cdev(
    bdf: &str,
    sysfs: &Path,
    iommu: &mut Option<IommuContext>,
    kvm_vfio: Option<&Arc<VfioDeviceFd>>,
) -> Result<HostDevice, PassthroughError> {
    let cdev = VfioDevice::open_cdev(sysfs).map_err(|source| match &source {
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
    })?;
    bind_cdev(bdf, cdev, iommu, kvm_vfio)
}

/// Binds a cdev that is open but bound to nothing (opened here, or retrieved from LUO after a
/// kexec) to the VM's iommufd (created on first use) and attaches it to a HWPT over its IOAS.
pub fn bind_cdev(
    bdf: &str,
    cdev: File,
    iommu: &mut Option<IommuContext>,
    kvm_vfio: Option<&Arc<VfioDeviceFd>>,
) -> Result<HostDevice, PassthroughError> {
    let name = || bdf.to_string();
    let context = match iommu {
        Some(context) => context,
        None => {
            let handle = kvm_vfio.cloned();
            iommu.insert(IommuContext::new(handle).map_err(iommu_error(bdf))?)
        }
    };
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
    // Wrapped before attaching, so a failed attach closes the fd the way luvmm does.
    let function = HostFunction::cdev(device);
    let hwpt_id = context
        .attach(function.device())
        .map_err(iommu_error(bdf))?;
    Ok(HostDevice {
        bdf: name(),
        function: Box::new(function),
        iommu: DeviceIommu::Iommufd { hwpt_id },
    })
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
