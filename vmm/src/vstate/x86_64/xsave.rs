//! A vCPU's XSAVE area (x87, SSE, AVX and later extended state), and which ioctl can carry it.
//!
//! `KVM_GET_XSAVE` and `KVM_SET_XSAVE` were made for the 4096-byte `struct kvm_xsave`. Since
//! Linux 5.17 the area can be larger (state components a process enables with
//! `ARCH_REQ_XCOMP_GUEST_PERM`, such as AMX tiles): KVM then refuses `KVM_GET_XSAVE`, and
//! `KVM_SET_XSAVE` *reads* the whole larger area from the pointer it is given. KVM reports
//! the area's size as `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` on the VM; where that is larger
//! than 4096 bytes, `KVM_GET_XSAVE2` and a buffer of that size are used.
//!
//! A saved state carries exactly 4096 bytes (`VcpuState::xsave`). A larger area is saved
//! only when everything past those 4096 bytes is zero: restoring the 4096 bytes followed by
//! zeros then gives KVM back the very area it gave. Otherwise the save is refused, naming the
//! first byte in use: storing the rest would need a new state format, and dropping it would
//! restore a guest with part of its registers lost.
//!
//! The size is read once per VM, before its vCPUs exist. It could grow only if luvmm asked
//! for more guest XSTATE permission (`ARCH_REQ_XCOMP_GUEST_PERM`) afterwards, which it never
//! does.

use kvm_bindings::{kvm_xsave, Xsave};
use kvm_ioctls::{Cap, VcpuFd, VmFd};

/// The size of `struct kvm_xsave`, the area `KVM_GET_XSAVE`/`KVM_SET_XSAVE` carry and a
/// saved state holds.
const LEGACY_SIZE: usize = std::mem::size_of::<kvm_xsave>();

/// The XSAVE area could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum XsaveError {
    /// An XSAVE ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The area does not fit in memory as one buffer.
    #[error("cannot allocate a {size}-byte XSAVE buffer")]
    Alloc { size: usize },
    /// The guest has extended state past what a saved state carries.
    #[error("KVM's XSAVE area is {size} bytes and the guest has state at byte {offset}, past the {LEGACY_SIZE} bytes a saved state carries")]
    BeyondSavedArea { size: usize, offset: usize },
}

/// The size of KVM's XSAVE area for the vCPUs of one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XsaveArea {
    size: usize,
}

impl XsaveArea {
    /// Asks KVM the size for `vm`'s vCPUs. A KVM older than 5.17 does not know
    /// `KVM_CAP_XSAVE2` (0) and its area is `struct kvm_xsave`.
    pub fn of_vm(vm: &VmFd) -> XsaveArea {
        XsaveArea::from_capability(vm.check_extension_int(Cap::Xsave2))
    }

    /// The area for a `KVM_CAP_XSAVE2` answer (bytes, or 0 when unknown to KVM).
    fn from_capability(bytes: i32) -> XsaveArea {
        let size = usize::try_from(bytes).unwrap_or(0).max(LEGACY_SIZE);
        XsaveArea { size }
    }

    /// Its size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// How many 32-bit words of the area lie past `struct kvm_xsave`.
    fn extra_words(&self) -> usize {
        (self.size - LEGACY_SIZE).div_ceil(std::mem::size_of::<u32>())
    }

    /// Reads `vcpu`'s area as a saved state carries it (see the module doc).
    pub fn save(&self, vcpu: &VcpuFd) -> Result<kvm_xsave, XsaveError> {
        if self.extra_words() == 0 {
            return vcpu.get_xsave().map_err(|source| XsaveError::Ioctl {
                op: "KVM_GET_XSAVE",
                source,
            });
        }
        let mut area = self.buffer()?;
        // SAFETY: `area` holds `struct kvm_xsave` plus `extra_words()` words, at least the
        // KVM_CAP_XSAVE2 size read for this VM, which is what KVM_GET_XSAVE2 writes: the
        // vCPU's area, which cannot have grown since (module doc).
        unsafe { vcpu.get_xsave2(&mut area) }.map_err(|source| XsaveError::Ioctl {
            op: "KVM_GET_XSAVE2",
            source,
        })?;
        self.legacy_part(&area)
    }

    /// Writes a saved area back to `vcpu`; past the saved 4096 bytes the area is zero, as it
    /// was when it was saved (see the module doc).
    pub fn restore(&self, vcpu: &VcpuFd, saved: &kvm_xsave) -> Result<(), XsaveError> {
        if self.extra_words() == 0 {
            // SAFETY: KVM_SET_XSAVE reads the vCPU's area, which is `struct kvm_xsave` (4096
            // bytes, all of `saved`): KVM_CAP_XSAVE2 said so for this VM, or KVM predates
            // larger areas, and it cannot have grown since (module doc).
            return unsafe { vcpu.set_xsave(saved) }.map_err(|source| XsaveError::Ioctl {
                op: "KVM_SET_XSAVE",
                source,
            });
        }
        let area = self.padded(saved)?;
        // SAFETY: `area` holds `struct kvm_xsave` plus `extra_words()` words, at least the
        // KVM_CAP_XSAVE2 size read for this VM, which is all KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave2(&area) }.map_err(|source| XsaveError::Ioctl {
            op: "KVM_SET_XSAVE",
            source,
        })
    }

    /// A zeroed buffer of this area's size.
    fn buffer(&self) -> Result<Xsave, XsaveError> {
        Xsave::new(self.extra_words()).map_err(|_| XsaveError::Alloc { size: self.size })
    }

    /// `saved` followed by zeros up to this area's size.
    fn padded(&self, saved: &kvm_xsave) -> Result<Xsave, XsaveError> {
        let mut area = self.buffer()?;
        // SAFETY: only the fixed `region` is written; the FAM length that the wrapper's
        // soundness rests on is left as `buffer` set it.
        unsafe { area.as_mut_fam_struct() }.xsave.region = saved.region;
        Ok(area)
    }

    /// The first 4096 bytes of `area`, if nothing past them is in use.
    fn legacy_part(&self, area: &Xsave) -> Result<kvm_xsave, XsaveError> {
        if let Some(word) = area.as_slice().iter().position(|&w| w != 0) {
            let byte = area.as_slice()[word]
                .to_le_bytes()
                .iter()
                .position(|&b| b != 0);
            return Err(XsaveError::BeyondSavedArea {
                size: self.size,
                offset: LEGACY_SIZE + word * 4 + byte.unwrap_or(0),
            });
        }
        Ok(kvm_xsave {
            region: area.as_fam_struct_ref().xsave.region,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kvm_without_xsave2_has_the_legacy_area() {
        assert_eq!(XsaveArea::from_capability(0).size(), 4096);
        assert_eq!(XsaveArea::from_capability(-1).size(), 4096);
        assert_eq!(XsaveArea::from_capability(4096).extra_words(), 0);
        // KVM never reports less than struct kvm_xsave, but such an answer is still 4096.
        assert_eq!(XsaveArea::from_capability(2696).size(), 4096);
    }

    #[test]
    fn a_larger_area_is_rounded_up_to_whole_words() {
        // 4096 + 8192 bytes of AMX tile data.
        assert_eq!(XsaveArea::from_capability(12288).extra_words(), 2048);
        assert_eq!(XsaveArea::from_capability(4099).extra_words(), 1);
    }

    #[test]
    fn a_larger_area_with_nothing_past_4096_bytes_saves_and_restores_unchanged() {
        let area = XsaveArea::from_capability(12288);
        let mut saved = kvm_xsave::default();
        saved.region[0] = 0x037f;
        saved.region[1023] = 0xdead_beef;
        let padded = area.padded(&saved).unwrap();
        assert_eq!(padded.as_slice().len(), 2048);
        assert!(padded.as_slice().iter().all(|&w| w == 0));
        assert_eq!(area.legacy_part(&padded).unwrap().region, saved.region);
    }

    #[test]
    fn state_past_4096_bytes_is_refused_naming_its_first_byte() {
        let area = XsaveArea::from_capability(12288);
        let mut buffer = area.buffer().unwrap();
        buffer.as_mut_slice()[3] = 0x0000_ff00;
        match area.legacy_part(&buffer) {
            Err(XsaveError::BeyondSavedArea { size, offset }) => {
                assert_eq!((size, offset), (12288, 4096 + 3 * 4 + 1));
            }
            other => panic!("{other:?}"),
        }
    }
}
