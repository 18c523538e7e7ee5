//! Guest address allocators for PCI resources: BARs in the 32-bit and 64-bit MMIO windows,
//! and I/O ports. Aligned first-fit over a sorted list of what is taken.

/// An allocation request that cannot be met.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    /// Sizes must be non-zero powers of two (BARs are).
    #[error("{window}: size {size:#x} is not a power of two")]
    BadSize { window: &'static str, size: u64 },
    /// No free range of that size is left.
    #[error("{window}: no room for {size:#x} bytes")]
    Exhausted { window: &'static str, size: u64 },
}

/// Hands out naturally aligned ranges of one window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressAllocator {
    window: &'static str,
    start: u64,
    end: u64,
    /// Taken ranges (start, size), sorted by start.
    taken: Vec<(u64, u64)>,
}

impl AddressAllocator {
    /// An allocator for `[start, end)`.
    pub fn new(window: &'static str, start: u64, end: u64) -> AddressAllocator {
        AddressAllocator {
            window,
            start,
            end,
            taken: Vec::new(),
        }
    }

    /// The lowest free range of `size` bytes aligned to `size`.
    pub fn allocate(&mut self, size: u64) -> Result<u64, AllocError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(AllocError::BadSize {
                window: self.window,
                size,
            });
        }
        let mut candidate = align_up(self.start, size);
        for &(start, len) in &self.taken {
            if candidate.checked_add(size).is_some_and(|end| end <= start) {
                break;
            }
            candidate = candidate.max(align_up(start + len, size));
        }
        let fits = candidate
            .checked_add(size)
            .is_some_and(|end| end <= self.end);
        if !fits {
            return Err(AllocError::Exhausted {
                window: self.window,
                size,
            });
        }
        self.insert(candidate, size);
        Ok(candidate)
    }

    fn insert(&mut self, start: u64, size: u64) {
        let at = self.taken.partition_point(|&(s, _)| s < start);
        self.taken.insert(at, (start, size));
    }
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_and_do_not_overlap() {
        let mut a = AddressAllocator::new("mmio32", 0xC000_0000, 0xC010_0000);
        assert_eq!(a.allocate(0x1000), Ok(0xC000_0000));
        assert_eq!(a.allocate(0x10_000), Ok(0xC001_0000));
        assert_eq!(a.allocate(0x1000), Ok(0xC000_1000));
        assert_eq!(a.allocate(0x8_0000), Ok(0xC008_0000));
        assert_eq!(
            a.allocate(0x10_0000),
            Err(AllocError::Exhausted {
                window: "mmio32",
                size: 0x10_0000
            })
        );
        assert!(matches!(
            a.allocate(0x1800),
            Err(AllocError::BadSize { .. })
        ));
    }
}
