//! Guest RAM: one memfd per region, mapped `MAP_SHARED` through vm-memory.
//!
//! Memfds are what LUO can preserve and what another process can be handed, so guest RAM lives
//! in nothing else. They are created with `MFD_CLOEXEC | MFD_ALLOW_SEALING` and never with
//! `MFD_HUGETLB` (LUO's memfd handler refuses hugetlb files).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use luvmm_resources::layout::MemoryLayout;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use std::ptr::NonNull;

use nix::sys::mman::{madvise, MmapAdvise};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `memfd_create` failed.
    #[error("memory region {index}: memfd_create failed")]
    Create {
        index: usize,
        #[source]
        source: nix::Error,
    },
    /// Sizing the memfd failed.
    #[error("memory region {index}: cannot size memfd to {size:#x} bytes")]
    Resize {
        index: usize,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    /// Sealing the memfd's size failed.
    #[error("memory region {index}: cannot seal memfd size")]
    Seal {
        index: usize,
        #[source]
        source: nix::Error,
    },
    /// An adopted memfd cannot be inspected.
    #[error("memory region {index}: cannot stat memfd")]
    Stat {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    /// A region is larger than this host's address space.
    #[error("memory region {index}: {size:#x} bytes do not fit in the address space")]
    TooLarge { index: usize, size: u64 },
    /// vm-memory could not map the regions.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// `madvise` was refused (a kernel without THP, or too little memory to fill RAM).
    #[error("memory region {index}: madvise for transparent huge pages failed")]
    Advise {
        index: usize,
        #[source]
        source: nix::Error,
    },
}

/// `madvise` on one whole mapped region: `MADV_HUGEPAGE` (shmem then backs later faults with
/// PMD-sized folios where the host's shmem THP setting allows) or `MADV_POPULATE_WRITE`.
fn advise(region: &GuestRegionMmap, advice: MmapAdvise) -> Result<(), nix::Error> {
    let Some(start) = NonNull::new(region.as_ptr().cast::<std::ffi::c_void>()) else {
        return Ok(());
    };
    // SAFETY: `start` and `region.size()` describe exactly one live shared mapping that
    // `region` owns; both advices only change how its pages are backed (or fault them in),
    // never what they hold.
    unsafe { madvise(start, region.size(), advice) }
}

/// Where the host says how shmem, memfds included, may use transparent huge pages.
pub const SHMEM_THP_PATH: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The host's shmem transparent huge page policy: the bracketed word of `shmem_enabled`.
/// It decides whether `MADV_HUGEPAGE` on guest RAM gives huge folios, which LUO preserves and
/// retrieves at a fraction of the cost of small pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmemThp {
    /// `always`, `within_size`, `advise` or `force`: an advised mapping gets huge folios.
    Allowed,
    /// `never` or `deny`, or a kernel without THP: small pages whatever is asked.
    Refused,
}

impl ShmemThp {
    /// Parses `shmem_enabled` (`always within_size advise [never] deny force`); `None` if no
    /// word is bracketed or the bracketed one is unknown.
    pub fn parse(text: &str) -> Option<ShmemThp> {
        let chosen = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))?;
        match chosen {
            "always" | "within_size" | "advise" | "force" => Some(ShmemThp::Allowed),
            "never" | "deny" => Some(ShmemThp::Refused),
            _ => None,
        }
    }

    /// This host's policy. A kernel built without THP has no such file: refused.
    pub fn host() -> ShmemThp {
        std::fs::read_to_string(SHMEM_THP_PATH)
            .ok()
            .and_then(|text| ShmemThp::parse(&text))
            .unwrap_or(ShmemThp::Refused)
    }
}

/// Whether guest RAM gets huge pages: asked for (the default) and allowed by the host. When
/// the host refuses, RAM is left in small pages and not filled at boot (see `GuestRam::create`).
pub fn thp_for(asked: bool, host: ShmemThp) -> bool {
    asked && host == ShmemThp::Allowed
}

/// Guest RAM and the memfds behind it; region `i` of the layout is `memfds[i]`.
pub struct GuestRam {
    layout: MemoryLayout,
    /// Transparent huge pages were asked for.
    thp: bool,
    memfds: Vec<File>,
    memory: GuestMemoryMmap,
}

impl GuestRam {
    /// Creates one fresh memfd per region and maps them (asking for transparent huge pages
    /// with `thp`).
    pub fn create(layout: &MemoryLayout, thp: bool) -> Result<GuestRam, MemoryError> {
        let mut memfds = Vec::with_capacity(layout.regions.len());
        for (index, region) in layout.regions.iter().enumerate() {
            let name = format!("luvmm-ram{index}");
            let fd: OwnedFd = memfd_create(
                name.as_str(),
                MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
            )
            .map_err(|source| MemoryError::Create { index, source })?;
            let file = File::from(fd);
            file.set_len(region.size)
                .map_err(|source| MemoryError::Resize {
                    index,
                    size: region.size,
                    source,
                })?;
            // Nobody may resize guest RAM under a running guest, nor change its seals: the
            // three seals the proposed iommufd preservation requires of a file mapped with
            // IOMMU_IOAS_MAP_FILE.
            fcntl(
                file.as_fd(),
                FcntlArg::F_ADD_SEALS(
                    SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL,
                ),
            )
            .map_err(|source| MemoryError::Seal { index, source })?;
            memfds.push(file);
        }
        let ram = Self::map(layout, memfds, thp)?;
        if thp {
            // Fill guest RAM now, through this process's own faults: shmem allocates huge
            // folios for those, while KVM's faults on behalf of the guest were seen to take
            // small pages (the nested bed). PRESERVE_FD fills every page anyway.
            for (index, region) in ram.memory.iter().enumerate() {
                advise(region, MmapAdvise::MADV_POPULATE_WRITE)
                    .map_err(|source| MemoryError::Advise { index, source })?;
            }
        }
        Ok(ram)
    }

    /// Maps memfds handed over by a previous process. The caller has checked their sizes
    /// against the layout (see `VmState::check_against`); nothing here touches their contents.
    pub fn adopt(
        layout: &MemoryLayout,
        memfds: Vec<File>,
        thp: bool,
    ) -> Result<GuestRam, MemoryError> {
        Self::map(layout, memfds, thp)
    }

    fn map(layout: &MemoryLayout, memfds: Vec<File>, thp: bool) -> Result<GuestRam, MemoryError> {
        let mut ranges = Vec::with_capacity(memfds.len());
        for (index, (region, file)) in layout.regions.iter().zip(&memfds).enumerate() {
            let size = usize::try_from(region.size).map_err(|_| MemoryError::TooLarge {
                index,
                size: region.size,
            })?;
            let file = file
                .try_clone()
                .map_err(|source| MemoryError::Stat { index, source })?;
            ranges.push((
                GuestAddress(region.gpa),
                size,
                Some(FileOffset::new(file, 0)),
            ));
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(MemoryError::Map)?;
        if thp {
            for (index, region) in memory.iter().enumerate() {
                advise(region, MmapAdvise::MADV_HUGEPAGE)
                    .map_err(|source| MemoryError::Advise { index, source })?;
            }
        }
        Ok(GuestRam {
            layout: layout.clone(),
            thp,
            memfds,
            memory,
        })
    }

    /// Sizes of the given memfds, for checking a saved layout before adopting them.
    pub fn memfd_sizes(memfds: &[File]) -> Result<Vec<u64>, MemoryError> {
        memfds
            .iter()
            .enumerate()
            .map(|(index, f)| {
                f.metadata()
                    .map(|m| m.len())
                    .map_err(|source| MemoryError::Stat { index, source })
            })
            .collect()
    }

    /// The layout this RAM was built for.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Whether transparent huge pages were asked for.
    pub fn thp(&self) -> bool {
        self.thp
    }

    /// The memfds, in layout order.
    pub fn memfds(&self) -> &[File] {
        &self.memfds
    }

    /// The mapped guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    #[test]
    fn ram_is_memfd_backed_and_shared() {
        let layout = MemoryLayout::contiguous(4 * MIB);
        let ram = GuestRam::create(&layout, false).unwrap();
        ram.memory()
            .write_obj(0x1234_5678u32, GuestAddress(0x2000))
            .unwrap();

        // A second mapping of the same memfd sees the write: the memory is shared, not private.
        let memfds: Vec<File> = ram
            .memfds()
            .iter()
            .map(|f| f.try_clone().unwrap())
            .collect();
        assert_eq!(GuestRam::memfd_sizes(&memfds).unwrap(), vec![4 * MIB]);
        let again = GuestRam::adopt(&layout, memfds, false).unwrap();
        let word: u32 = again.memory().read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(word, 0x1234_5678);
        assert_eq!(again.memory().num_regions(), 1);
    }

    /// The VMA flags (`VmFlags:` in /proc/self/smaps) of the mapping starting at `start`.
    fn vm_flags(start: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{start:x}-");
        let entry = smaps
            .split_inclusive('\n')
            .skip_while(|l| !l.starts_with(&head))
            .take_while(|l| !l.starts_with("VmFlags:"))
            .count();
        smaps
            .lines()
            .skip_while(|l| !l.starts_with(&head))
            .nth(entry)
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn thp_advises_huge_pages_on_every_region_and_is_kept() {
        let layout = MemoryLayout::contiguous(4 * MIB);
        let ram = GuestRam::create(&layout, true).unwrap();
        assert!(ram.thp());
        for region in ram.memory().iter() {
            let flags = vm_flags(region.as_ptr() as usize);
            assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        }
        let plain = GuestRam::create(&layout, false).unwrap();
        let region = plain.memory().iter().next().unwrap();
        let flags = vm_flags(region.as_ptr() as usize);
        assert!(
            flags.starts_with("VmFlags:") && !flags.contains(" hg"),
            "{flags}"
        );
    }

    #[test]
    fn shmem_thp_reads_the_bracketed_word() {
        let allowed = [
            "[always]",
            "always within_size [advise] never deny force",
            "[force]",
        ];
        for text in allowed {
            assert_eq!(ShmemThp::parse(text), Some(ShmemThp::Allowed), "{text}");
        }
        let within = "always [within_size] advise never deny force\n";
        assert_eq!(ShmemThp::parse(within), Some(ShmemThp::Allowed));
        let never = "always within_size advise [never] deny force\n";
        assert_eq!(ShmemThp::parse(never), Some(ShmemThp::Refused));
        assert_eq!(ShmemThp::parse("[deny]"), Some(ShmemThp::Refused));
        for text in ["", "always advise never", "[sometimes]", "[]"] {
            assert_eq!(ShmemThp::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn thp_needs_both_the_ask_and_the_host() {
        assert!(thp_for(true, ShmemThp::Allowed));
        assert!(!thp_for(true, ShmemThp::Refused));
        assert!(!thp_for(false, ShmemThp::Allowed));
        assert!(!thp_for(false, ShmemThp::Refused));
    }

    #[test]
    fn memfd_size_is_sealed() {
        let ram = GuestRam::create(&MemoryLayout::contiguous(2 * MIB), false).unwrap();
        assert!(ram.memfds()[0].set_len(4 * MIB).is_err());
        assert!(ram.memfds()[0].set_len(MIB).is_err());
        let seals = fcntl(ram.memfds()[0].as_fd(), FcntlArg::F_GET_SEALS).unwrap();
        let wanted = SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
        assert_eq!(SealFlag::from_bits_truncate(seals), wanted);
        // Sealed against more seals too: nobody can freeze the guest's RAM.
        assert!(fcntl(
            ram.memfds()[0].as_fd(),
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)
        )
        .is_err());
    }
}
