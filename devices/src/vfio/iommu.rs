//! One IOMMU context per VM: one iommufd and one IOAS shared by every passthrough device, so
//! guest RAM is mapped (and pinned) once, by file, however many devices there are. Each device
//! is attached to an explicitly allocated HWPT (shared by devices that can share one), which
//! is the object the proposed iommufd live-update preservation marks.
//!
//! The context can be adopted: a process that takes the VM over gets the iommufd and the
//! IOAS id, and the mappings in it stay as they are (they are by file, so they do not depend
//! on this process's address space). As with devices, nothing here destroys a kernel object on
//! the way out: vfio-ioctls' IOAS destroys itself in `Drop`, so its wrapper is never dropped
//! (nor, with it, its reference to the KVM VFIO device, which therefore lives until the process
//! exits); closing this process's iommufd fd is the whole teardown.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_hw_info, iommu_hwpt_alloc, iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE,
    iommu_ioas_map_file, iommu_ioas_unmap,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use luvmm_resources::state::{DmaMapping, IommuState};
use serde::{Deserialize, Serialize};
use vfio_ioctls::{VfioDevice, VfioDeviceFd, VfioError, VfioIommufd};

/// The `size` field of an `IOMMU_IOAS_MAP_FILE` argument; the assert makes the cast exact.
#[allow(clippy::cast_possible_truncation)]
const MAP_FILE_SIZE: u32 = {
    assert!(size_of::<iommu_ioas_map_file>() <= u32::MAX as usize);
    size_of::<iommu_ioas_map_file>() as u32
};

/// The `size` field of an `IOMMU_HWPT_ALLOC` argument; the assert makes the cast exact.
#[allow(clippy::cast_possible_truncation)]
const HWPT_ALLOC_SIZE: u32 = {
    assert!(size_of::<iommu_hwpt_alloc>() <= u32::MAX as usize);
    size_of::<iommu_hwpt_alloc>() as u32
};

/// The `size` field of an `IOMMU_IOAS_UNMAP` argument; the assert makes the cast exact.
#[allow(clippy::cast_possible_truncation)]
const UNMAP_SIZE: u32 = {
    assert!(size_of::<iommu_ioas_unmap>() <= u32::MAX as usize);
    size_of::<iommu_ioas_unmap>() as u32
};

/// The `size` field of an `IOMMU_GET_HW_INFO` argument; the assert makes the cast exact.
#[allow(clippy::cast_possible_truncation)]
const HW_INFO_SIZE: u32 = {
    assert!(size_of::<iommu_hw_info>() <= u32::MAX as usize);
    size_of::<iommu_hw_info>() as u32
};

/// Object ids a context's device search looks at. An iommufd numbers its objects (IOAS,
/// devices, HWPTs) from 1 up; a VM's context holds one IOAS, at most 32 devices and as many
/// HWPTs.
const MAX_OBJECT_ID: u32 = 256;

/// What a restore after a kexec notes of its IOMMU context as it binds devices, so that a
/// restore run again after it failed can carry on in the same context: every retrieve of a
/// preserved device gives the same open file, and that file stays bound to the iommufd of the
/// first restore that bound it (only its last close unbinds it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundRecord {
    pub ioas_id: u32,
    pub hwpts: Vec<u32>,
    /// In the order they were bound.
    pub devices: Vec<BoundDevice>,
}

/// One device bound to the context and attached to a HWPT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundDevice {
    pub bdf: String,
    pub dev_id: u32,
    pub hwpt_id: u32,
}

/// An IOMMU context operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IommuError {
    #[error("cannot open /dev/iommu")]
    Open(#[source] IommufdError),
    #[error("{op}")]
    Iommufd {
        op: &'static str,
        #[source]
        source: IommufdError,
    },
    #[error("{op}")]
    Vfio {
        op: &'static str,
        #[source]
        source: VfioError,
    },
    #[error("the device has no iommufd device id (it was not bound here)")]
    NotBound,
}

/// The VM's iommufd, its IOAS and the HWPTs its devices are attached to.
pub struct IommuContext {
    /// Never dropped: its IOAS would destroy itself. Devices hold clones of it.
    ops: ManuallyDrop<Arc<VfioIommufd>>,
    ioas_id: u32,
    hwpts: Vec<u32>,
    mappings: Vec<DmaMapping>,
}

impl IommuContext {
    /// A new iommufd with a new, empty IOAS. `kvm_vfio` is the VM's KVM VFIO pseudo-device:
    /// every device bound here is added to it.
    pub fn new(kvm_vfio: Option<Arc<VfioDeviceFd>>) -> Result<IommuContext, IommuError> {
        let iommufd = IommuFd::new().map_err(IommuError::Open)?;
        let ops = VfioIommufd::new(Arc::new(iommufd), None, kvm_vfio).map_err(|source| {
            IommuError::Vfio {
                op: "allocate an IOAS",
                source,
            }
        })?;
        let ioas_id = ops.ioas().id();
        Ok(IommuContext {
            ops: ManuallyDrop::new(Arc::new(ops)),
            ioas_id,
            hwpts: Vec::new(),
            mappings: Vec::new(),
        })
    }

    /// The context another process handed over: its iommufd, and the IOAS, HWPTs and
    /// mappings its state names, all still in place.
    ///
    /// vfio-ioctls ties its iommufd wrapper to an IOAS of its own, so one empty IOAS is
    /// allocated next to the VM's and never used.
    pub fn adopt(
        iommufd: File,
        saved: &IommuState,
        kvm_vfio: Option<Arc<VfioDeviceFd>>,
    ) -> Result<IommuContext, IommuError> {
        let iommufd = IommuFd::new_from_fd(iommufd);
        let ops = VfioIommufd::new(Arc::new(iommufd), None, kvm_vfio).map_err(|source| {
            IommuError::Vfio {
                op: "wrap the handed-over iommufd",
                source,
            }
        })?;
        Ok(IommuContext {
            ops: ManuallyDrop::new(Arc::new(ops)),
            ioas_id: saved.ioas_id,
            hwpts: saved.hwpts.clone(),
            mappings: saved.mappings.clone(),
        })
    }

    /// The context a failed restore left (see [`BoundRecord`]): its iommufd, with the IOAS and
    /// HWPTs its record names. Whatever it had mapped is unmapped, so guest RAM is mapped
    /// again as into a new context.
    pub fn resume(
        iommufd: File,
        record: &BoundRecord,
        kvm_vfio: Option<Arc<VfioDeviceFd>>,
    ) -> Result<IommuContext, IommuError> {
        let saved = IommuState {
            ioas_id: record.ioas_id,
            hwpts: record.hwpts.clone(),
            mappings: Vec::new(),
        };
        let context = IommuContext::adopt(iommufd, &saved, kvm_vfio)?;
        let mut unmap = iommu_ioas_unmap {
            size: UNMAP_SIZE,
            ioas_id: context.ioas_id,
            // The whole IOVA space: the one range IOMMU_IOAS_UNMAP takes as "everything".
            iova: 0,
            length: u64::MAX,
        };
        context
            .ops
            .iommufd()
            .unmap_iommu_ioas(&mut unmap)
            .map_err(|source| IommuError::Iommufd {
                op: "IOMMU_IOAS_UNMAP of everything a failed restore mapped",
                source,
            })?;
        Ok(context)
    }

    /// The ids of the device objects bound to this iommufd: those `IOMMU_GET_HW_INFO`
    /// answers for.
    pub fn device_ids(&self) -> Vec<u32> {
        (1..=MAX_OBJECT_ID)
            .filter(|&dev_id| {
                let mut info = iommu_hw_info {
                    size: HW_INFO_SIZE,
                    dev_id,
                    ..Default::default()
                };
                self.ops.iommufd().get_hw_info(&mut info).is_ok()
            })
            .collect()
    }

    /// The record of this context with `devices` bound.
    pub fn record(&self, devices: Vec<BoundDevice>) -> BoundRecord {
        BoundRecord {
            ioas_id: self.ioas_id,
            hwpts: self.hwpts.clone(),
            devices,
        }
    }

    /// Maps `len` bytes of RAM memfd number `memfd_index` from `offset` at IOVA `iova`, by
    /// file. The memfd must be sealed against growing, shrinking and further seals. The
    /// ioctl is built here rather than through iommufd-ioctls' `IommufdIoas::map_file`, which
    /// maps only into the IOAS that wrapper allocated: an adopted context's IOAS is not it.
    pub fn map_file(
        &mut self,
        memfd: BorrowedFd<'_>,
        memfd_index: usize,
        offset: u64,
        iova: u64,
        len: u64,
    ) -> Result<(), IommuError> {
        let map = iommu_ioas_map_file {
            size: MAP_FILE_SIZE,
            flags: iommufd_bindings::iommufd::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
                | iommufd_bindings::iommufd::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE
                | iommufd_bindings::iommufd::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
            ioas_id: self.ioas_id,
            fd: memfd.as_raw_fd(),
            start: offset,
            length: len,
            iova,
        };
        self.ops
            .iommufd()
            .map_iommu_ioas_file(&map)
            .map_err(|source| IommuError::Iommufd {
                op: "IOMMU_IOAS_MAP_FILE",
                source,
            })?;
        self.mappings.push(DmaMapping {
            iova,
            memfd_index,
            offset,
            len,
        });
        Ok(())
    }

    /// Binds an opened cdev to this iommufd and adds it to the KVM VFIO device.
    pub fn bind(&self, cdev: File) -> Result<VfioDevice, VfioError> {
        VfioDevice::new_from_fd(cdev, Arc::clone(&self.ops), false)
    }

    /// Wraps a cdev handed over already bound to this iommufd and attached to one of its
    /// HWPTs; adds it to this VM's KVM VFIO device. Nothing is bound or attached again.
    pub fn adopt_device(&self, cdev: File) -> Result<VfioDevice, VfioError> {
        VfioDevice::new_from_bound_fd(cdev, Arc::clone(&self.ops), false)
    }

    /// Attaches `device`, bound here as `dev_id` (by this process or an earlier one), to a HWPT
    /// over the IOAS: one already allocated when the device's IOMMU accepts it, else a new
    /// one. Returns the HWPT id.
    pub fn attach(&mut self, device: &VfioDevice, dev_id: u32) -> Result<u32, IommuError> {
        for &hwpt in &self.hwpts {
            if device.attach_hwpt(hwpt).is_ok() {
                return Ok(hwpt);
            }
        }
        let mut alloc = iommu_hwpt_alloc {
            size: HWPT_ALLOC_SIZE,
            dev_id,
            pt_id: self.ioas_id,
            data_type: iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE,
            ..Default::default()
        };
        self.ops
            .iommufd()
            .alloc_iommu_hwpt(&mut alloc)
            .map_err(|source| IommuError::Iommufd {
                op: "IOMMU_HWPT_ALLOC",
                source,
            })?;
        device
            .attach_hwpt(alloc.out_hwpt_id)
            .map_err(|source| IommuError::Vfio {
                op: "attach to the HWPT",
                source,
            })?;
        self.hwpts.push(alloc.out_hwpt_id);
        Ok(alloc.out_hwpt_id)
    }

    /// The iommufd, for handing the context to another process.
    pub fn iommufd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd belongs to the iommufd `self.ops` holds, alive as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.ops.iommufd().as_raw_fd()) }
    }

    /// What another process needs to adopt the context.
    pub fn save(&self) -> IommuState {
        IommuState {
            ioas_id: self.ioas_id,
            hwpts: self.hwpts.clone(),
            mappings: self.mappings.clone(),
        }
    }
}

impl Drop for IommuContext {
    fn drop(&mut self) {
        let fd = self.ops.iommufd().as_raw_fd();
        // SAFETY: the iommufd wrapper is never dropped (`ops` is a `ManuallyDrop` never taken,
        // and devices' clones of it are never dropped either), so nothing closes this fd but
        // this call. The kernel frees the IOAS and HWPTs when its last reference goes.
        if unsafe { libc::close(fd) } != 0 {
            log::warn!(
                "cannot close iommufd {fd}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
