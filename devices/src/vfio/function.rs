//! The VFIO calls a passthrough device makes on its host function, behind a small trait so
//! the device model (`passthrough`) is unit-tested without VFIO; and the host function itself,
//! whose teardown luvmm does explicitly.
//!
//! vfio-ioctls' `VfioDevice` detaches its cdev from the IOAS in `Drop` (and panics if that
//! fails). A device handed to another process shares its open file with that process, so a
//! detach on the way out would pull the DMA mappings from under the guest there. luvmm never
//! runs that `Drop` for a cdev: it closes its own fd instead, which only drops this process's
//! reference (the kernel unbinds when the last one goes).

use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd};

use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP};
use vfio_ioctls::{VfioDevice, VfioError};
use vmm_sys_util::eventfd::EventFd;

/// One VFIO region (a BAR, or configuration space) as VFIO describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Bytes; 0 when the region does not exist.
    pub size: u64,
    /// Where it starts in the device fd, for `pread`/`pwrite` and `mmap`.
    pub offset: u64,
    /// VFIO allows mmapping it.
    pub mmap: bool,
}

/// What the device model asks of its host function.
pub trait VfioFunction: Send {
    /// Region `index`'s shape.
    fn region(&self, index: u32) -> RegionInfo;
    /// How many interrupts VFIO offers at IRQ index `index` (INTx, MSI, MSI-X).
    fn irq_count(&self, index: u32) -> u32;
    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn read(&self, index: u32, data: &mut [u8], offset: u64);
    /// Reads `data.len()` bytes at `offset` of configuration space, saying why the kernel
    /// refused: for a check whose answer must not be made up when the read fails (`read`
    /// leaves `data` as it was then).
    fn read_config(&self, data: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Writes `data` at `offset` of region `index`.
    fn write(&self, index: u32, data: &[u8], offset: u64);
    /// Has VFIO signal `triggers` for the interrupts at IRQ index `index`.
    fn enable_irq(&self, index: u32, triggers: &[&EventFd]) -> Result<(), VfioError>;
    /// Has VFIO unmask INTx when `resample` is written (the guest's EOI, through KVM).
    fn set_intx_resample(&self, resample: &EventFd) -> Result<(), VfioError>;
    /// Stops the interrupts at IRQ index `index`.
    fn disable_irq(&self, index: u32) -> Result<(), VfioError>;
    /// Reads the function's vendor and device ID through its file, saying why the kernel
    /// refused: `EIO` once a live-update freeze has reset the function under this file.
    fn probe(&self) -> std::io::Result<()> {
        self.read_config(&mut [0u8; 4], 0)
    }
    /// The device fd: for mmapping BARs and for handing the device to another process.
    /// `None` once the function is let go (`Unplugged`).
    fn fd(&self) -> Option<BorrowedFd<'_>>;
}

/// Stands in for a host function luvmm has let go of to open it again: the guest reads
/// all-ones from it, as from a PCI function that is gone, and nothing reaches hardware. A
/// device whose function cannot be opened again stays so.
pub struct Unplugged;

impl VfioFunction for Unplugged {
    fn region(&self, _index: u32) -> RegionInfo {
        RegionInfo::default()
    }

    fn irq_count(&self, _index: u32) -> u32 {
        0
    }

    fn read(&self, _index: u32, data: &mut [u8], _offset: u64) {
        data.fill(0xff);
    }

    fn read_config(&self, _data: &mut [u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::ENODEV))
    }

    fn write(&self, _index: u32, _data: &[u8], _offset: u64) {}

    fn enable_irq(&self, _index: u32, _triggers: &[&EventFd]) -> Result<(), VfioError> {
        Err(VfioError::VfioDeviceEnableIrq)
    }

    fn set_intx_resample(&self, _resample: &EventFd) -> Result<(), VfioError> {
        Err(VfioError::VfioDeviceSetIrqResampleFd)
    }

    fn disable_irq(&self, _index: u32) -> Result<(), VfioError> {
        Ok(())
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// How a host function was opened, which decides how it is closed.
enum Path {
    /// A VFIO cdev bound to an iommufd: closed by closing the fd.
    Cdev,
    /// Through an IOMMU group: closed by vfio-ioctls, which also puts the group back in its
    /// container (a legacy device never moves to another process).
    Group,
}

/// A host PCI function opened (or adopted) through VFIO.
pub struct HostFunction {
    device: ManuallyDrop<VfioDevice>,
    path: Path,
}

impl HostFunction {
    /// A cdev bound to an iommufd (opened here, or handed in already bound).
    pub fn cdev(device: VfioDevice) -> HostFunction {
        HostFunction {
            device: ManuallyDrop::new(device),
            path: Path::Cdev,
        }
    }

    /// A device opened through its IOMMU group.
    pub fn group(device: VfioDevice) -> HostFunction {
        HostFunction {
            device: ManuallyDrop::new(device),
            path: Path::Group,
        }
    }

    /// The vfio-ioctls device, for what only it does (attaching to a HWPT).
    pub fn device(&self) -> &VfioDevice {
        &self.device
    }

    fn borrowed_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd belongs to `self.device`, which outlives the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.device.as_raw_fd()) }
    }
}

impl Drop for HostFunction {
    fn drop(&mut self) {
        match self.path {
            Path::Cdev => {
                let fd = self.device.as_raw_fd();
                // SAFETY: the `VfioDevice` is never dropped or used again (it is in a
                // `ManuallyDrop` that is never taken), so the fd it owns has no other user and
                // is closed exactly once, here. Its other fields are only memory.
                if unsafe { libc::close(fd) } != 0 {
                    log::warn!(
                        "cannot close VFIO device fd {fd}: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
            // SAFETY: dropped exactly once, here; nothing uses the device afterwards.
            Path::Group => unsafe { ManuallyDrop::drop(&mut self.device) },
        }
    }
}

impl VfioFunction for HostFunction {
    fn region(&self, index: u32) -> RegionInfo {
        RegionInfo {
            size: self.device.get_region_size(index),
            offset: self.device.get_region_offset(index),
            mmap: self.device.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP != 0,
        }
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.device.get_irq_info(index).map_or(0, |irq| irq.count)
    }

    fn read(&self, index: u32, data: &mut [u8], offset: u64) {
        self.device.region_read(index, data, offset);
    }

    fn write(&self, index: u32, data: &[u8], offset: u64) {
        self.device.region_write(index, data, offset);
    }

    fn enable_irq(&self, index: u32, triggers: &[&EventFd]) -> Result<(), VfioError> {
        self.device.enable_irq(index, triggers.to_vec())
    }

    fn set_intx_resample(&self, resample: &EventFd) -> Result<(), VfioError> {
        self.device.set_irq_resample_fd(
            vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX,
            vec![resample],
        )
    }

    fn disable_irq(&self, index: u32) -> Result<(), VfioError> {
        self.device.disable_irq(index)
    }

    fn read_config(&self, data: &mut [u8], offset: u64) -> std::io::Result<()> {
        let config = self.region(VFIO_PCI_CONFIG_REGION_INDEX);
        let at = config
            .offset
            .checked_add(offset)
            .and_then(|at| i64::try_from(at).ok())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let read = nix::sys::uio::pread(self.borrowed_fd(), data, at)?;
        if read != data.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.borrowed_fd())
    }
}
