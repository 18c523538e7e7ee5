//! Direct-mapped BARs: a VFIO region mmapped once, and put into the guest's physical address
//! space as a KVM memslot wherever the guest programs the BAR, so accesses do not exit.

use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::Arc;

use luvmm_resources::errors::error_chain;
use nix::errno::Errno;
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::vfio::irq::HypervisorError;

/// A BAR's VFIO region could not be mapped into this process.
#[derive(Debug, thiserror::Error)]
pub enum BarMapError {
    #[error("BAR {index}: VFIO reports an empty region")]
    EmptyRegion { index: usize },
    #[error("BAR {index}: region offset {offset:#x} is beyond what mmap takes")]
    OffsetTooLarge { index: usize, offset: u64 },
    #[error("BAR {index}: region size {size:#x} is beyond what mmap takes")]
    SizeTooLarge { index: usize, size: u64 },
    #[error("BAR {index}: mmap of {size:#x} bytes of the device fd")]
    Mmap {
        index: usize,
        size: u64,
        #[source]
        source: Errno,
    },
}

/// Maps host memory into guest physical memory: KVM memslots, behind a trait so devices know
/// nothing of KVM.
pub trait GuestMapper: Send + Sync {
    /// Maps `size` bytes at host address `host` to guest `gpa`; returns a handle for unmap.
    fn map(&self, gpa: u64, size: u64, host: u64) -> Result<u32, HypervisorError>;
    /// Removes what `map` returned `slot` for.
    fn unmap(&self, slot: u32) -> Result<(), HypervisorError>;
}

/// One BAR's region, mmapped from the VFIO device fd. It owns its memslot too, so that it can
/// delete the memslot before it unmaps the memory the memslot points into.
pub struct DirectBar {
    pub index: usize,
    host: NonNull<libc::c_void>,
    size: u64,
    /// `size` as mmap and munmap take it.
    len: NonZeroUsize,
    mapper: Arc<dyn GuestMapper>,
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
        mapper: Arc<dyn GuestMapper>,
    ) -> Result<DirectBar, BarMapError> {
        let len = usize::try_from(size).map_err(|_| BarMapError::SizeTooLarge { index, size })?;
        let len = NonZeroUsize::new(len).ok_or(BarMapError::EmptyRegion { index })?;
        let offset =
            i64::try_from(offset).map_err(|_| BarMapError::OffsetTooLarge { index, offset })?;
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
        .map_err(|source| BarMapError::Mmap {
            index,
            size,
            source,
        })?;
        Ok(DirectBar {
            index,
            host,
            size,
            len,
            mapper,
            mapped: None,
        })
    }

    /// Puts the BAR at `gpa` in the guest (or nowhere, for `None`), moving it if needed.
    pub fn place(&mut self, gpa: Option<u64>) -> Result<(), HypervisorError> {
        if self.mapped.map(|(_, at)| at) == gpa {
            return Ok(());
        }
        if let Some((slot, _)) = self.mapped.take() {
            self.mapper.unmap(slot)?;
        }
        if let Some(gpa) = gpa {
            let slot = self.mapper.map(gpa, self.size, self.host.as_ptr() as u64)?;
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
        if let Some((slot, _)) = self.mapped.take() {
            if let Err(e) = self.mapper.unmap(slot) {
                // The memslot would point at freed memory: keep the mapping (leak it) instead.
                log::error!(
                    "BAR {}: cannot delete memslot {slot}: {}",
                    self.index,
                    error_chain(&e)
                );
                return;
            }
        }
        // SAFETY: `host` is the start of the `size`-byte mapping made in `new`, and no memslot
        // points into it any more (deleted just above, or never made), so nothing else uses it.
        if let Err(e) = unsafe { munmap(self.host, self.len.get()) } {
            log::warn!("munmap of BAR {}: {}", self.index, error_chain(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::Mutex;

    /// Records map/unmap calls; on unmap it reads the mapping's first byte, which faults if
    /// the memory behind the slot was already unmapped.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        host: Mutex<Option<u64>>,
    }

    impl GuestMapper for Recorder {
        fn map(&self, gpa: u64, _size: u64, host: u64) -> Result<u32, HypervisorError> {
            *self.host.lock().unwrap() = Some(host);
            self.calls.lock().unwrap().push(format!("map {gpa:#x}"));
            Ok(7)
        }
        fn unmap(&self, slot: u32) -> Result<(), HypervisorError> {
            let host = self.host.lock().unwrap().expect("mapped");
            // SAFETY: the test's point: `host` must still be mapped when its slot goes.
            let byte = unsafe { std::ptr::read_volatile(host as *const u8) };
            self.calls
                .lock()
                .unwrap()
                .push(format!("unmap {slot} byte={byte}"));
            Ok(())
        }
    }

    #[test]
    fn the_memslot_goes_before_the_memory_behind_it() {
        let memfd = nix::sys::memfd::memfd_create("bar", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd");
        nix::unistd::ftruncate(&memfd, 4096).expect("size");
        nix::sys::uio::pwrite(&memfd, &[0x5a], 0).expect("write");
        let recorder = Arc::new(Recorder::default());
        let mut bar = DirectBar::new(0, memfd.as_fd(), 0, 4096, recorder.clone()).unwrap();
        bar.place(Some(0xc000_0000)).unwrap();
        bar.place(Some(0xc000_0000)).unwrap();
        assert!(bar.is_mapped());
        drop(bar);
        assert_eq!(
            *recorder.calls.lock().unwrap(),
            ["map 0xc0000000", "unmap 7 byte=90"]
        );
    }

    #[test]
    fn a_region_that_cannot_be_mapped_says_why() {
        let mapper = Arc::new(Recorder::default());
        // An eventfd stands in for a device fd that refuses mmap.
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        // SAFETY: the fd is owned by `evt`, which outlives the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&evt)) };
        assert!(matches!(
            DirectBar::new(2, fd, 0, 0, mapper.clone()),
            Err(BarMapError::EmptyRegion { index: 2 })
        ));
        assert!(matches!(
            DirectBar::new(2, fd, u64::MAX, 4096, mapper.clone()),
            Err(BarMapError::OffsetTooLarge { index: 2, .. })
        ));
        let refused = DirectBar::new(2, fd, 0, 4096, mapper);
        assert!(matches!(
            refused,
            Err(BarMapError::Mmap {
                index: 2,
                size: 4096,
                ..
            })
        ));
        let source = refused
            .err()
            .and_then(|e| std::error::Error::source(&e).map(|s| s.to_string()));
        assert!(source.is_some(), "the errno is kept as the source");
    }
}
