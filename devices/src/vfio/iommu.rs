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
    iommu_hwpt_alloc, iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE, iommu_ioas_map_file,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use luvmm_resources::state::{DmaMapping, IommuState};
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

    /// Attaches `device` to a HWPT over the IOAS: one already allocated when the device's
    /// IOMMU accepts it, else a new one. Returns the HWPT id.
    pub fn attach(&mut self, device: &VfioDevice) -> Result<u32, IommuError> {
        for &hwpt in &self.hwpts {
            if device.attach_hwpt(hwpt).is_ok() {
                return Ok(hwpt);
            }
        }
        let mut alloc = iommu_hwpt_alloc {
            size: HWPT_ALLOC_SIZE,
            dev_id: device.iommufd_dev_id().ok_or(IommuError::NotBound)?,
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
