//! Direct-mapped BARs: a VFIO region mmapped once, and put into the guest's physical address
//! space as a KVM memslot wherever the guest programs the BAR, so accesses do not exit.

use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// Maps host memory into guest physical memory: KVM memslots, behind a trait so devices know
/// nothing of KVM.
pub trait GuestMapper: Send + Sync {
    /// Maps `size` bytes at host address `host` to guest `gpa`; returns a handle for unmap.
    fn map(&self, gpa: u64, size: u64, host: u64) -> Result<u32, String>;
    /// Removes what `map` returned `slot` for.
    fn unmap(&self, slot: u32) -> Result<(), String>;
}

/// One BAR's region, mmapped from the VFIO device fd.
pub struct DirectBar {
    pub index: usize,
    host: NonNull<libc::c_void>,
    size: u64,
    /// The memslot and guest address it is mapped at now, if any.
    mapped: Option<(u32, u64)>,
}

// SAFETY: the mapping is plain shared memory owned by this value; nothing ties it to a thread.
unsafe impl Send for DirectBar {}

impl DirectBar {
    /// mmaps `size` bytes of the device fd at `offset` (the region's offset in the fd).
    pub fn new(
        index: usize,
        device: BorrowedFd<'_>,
        offset: u64,
        size: u64,
    ) -> Result<DirectBar, String> {
        let len = NonZeroUsize::new(size as usize).ok_or("empty region")?;
        let offset = i64::try_from(offset).map_err(|_| "region offset too large")?;
        // SAFETY: a fresh shared mapping of the device's own region, at an address the kernel
        // picks; nothing else is overlapped, and it is unmapped only in Drop.
        let host = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                device,
                offset,
            )
        }
        .map_err(|e| format!("mmap of BAR {index}: {e}"))?;
        Ok(DirectBar {
            index,
            host,
            size,
            mapped: None,
        })
    }

    /// Puts the BAR at `gpa` in the guest (or nowhere, for `None`), moving it if needed.
    pub fn place(&mut self, mapper: &dyn GuestMapper, gpa: Option<u64>) -> Result<(), String> {
        if self.mapped.map(|(_, at)| at) == gpa {
            return Ok(());
        }
        if let Some((slot, _)) = self.mapped.take() {
            mapper.unmap(slot)?;
        }
        if let Some(gpa) = gpa {
            let slot = mapper.map(gpa, self.size, self.host.as_ptr() as u64)?;
            self.mapped = Some((slot, gpa));
        }
        Ok(())
    }

    /// Whether the guest reaches it without exits now.
    pub fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }
}

impl Drop for DirectBar {
    fn drop(&mut self) {
        // SAFETY: `host` is the start of the `size`-byte mapping made in `new`, used by no one
        // else once the memslot is gone (the VM is torn down before its devices).
        if let Err(e) = unsafe { munmap(self.host, self.size as usize) } {
            log::warn!("munmap of BAR {}: {e}", self.index);
        }
    }
}
