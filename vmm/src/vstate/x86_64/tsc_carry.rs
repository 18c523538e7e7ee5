//! Moving a restored guest's TSC on over the pause, as its kvmclock is.
//!
//! A restore puts the kvmclock back with `KVM_CLOCK_REALTIME`, so KVM moves it on by the host
//! time that passed since the save; the guest's TSC, written back from the saved
//! `MSR_IA32_TSC`, would instead resume where it stopped, and the two clocks a guest reads
//! would disagree by the whole blackout. Where KVM offers the host TSC stamp of a kvmclock
//! reading (`KVM_CLOCK_HOST_TSC`, while its master clock runs) and a vCPU's TSC offset
//! (`KVM_VCPU_TSC_OFFSET`), the new offset follows from the two stamps exactly, as KVM's
//! `Documentation/virt/kvm/devices/vcpu.rst` lays out: the guest TSC that stands for kvmclock
//! zero stays the same. Elsewhere (no stamp: a host whose TSC is not its clocksource; an older
//! state; a scaled TSC, for which the formula has no ratio) the saved TSC is moved on by the
//! kvmclock's elapsed time and written back, to within the milliseconds between the save's
//! vCPU and clock readings and between the restore's clock reading and its TSC write.

use kvm_bindings::{
    kvm_clock_data, kvm_device_attr, kvm_msr_entry, KVM_CLOCK_HOST_TSC, KVM_VCPU_TSC_CTRL,
    KVM_VCPU_TSC_OFFSET,
};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use luvmm_resources::state::VcpuState;

use super::msr::MSR_IA32_TSC;

/// KVM's ioctl type.
const KVMIO: u32 = 0xAE;
// kvm-ioctls offers vCPU device attributes on aarch64 only; the TSC offset is x86's.
ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);

/// The guest's TSC offset could not be written.
#[derive(Debug, thiserror::Error)]
#[error("KVM_SET_DEVICE_ATTR (KVM_VCPU_TSC_OFFSET) failed")]
pub struct OffsetError(#[source] kvm_ioctls::Error);

/// How a restored vCPU's TSC moves on, and by how many of its ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Written back as saved, then given this offset, from the host TSC stamps.
    ByStamps { offset: u64, ticks: i64 },
    /// The saved TSC moved on by the kvmclock's progress: written back as `tsc`. Written
    /// once: KVM takes a second host write of the TSC within a second of the first for the
    /// same clock and keeps the first one's offset.
    ByClock { tsc: u64, ticks: i64 },
    /// Left as saved: the state has no TSC rate or no TSC, or the kvmclock did not move on.
    Not,
}

/// The vCPU's TSC offset from the host's TSC, where KVM gives it (Linux 5.16 and later).
pub fn read_tsc_offset(vcpu: &VcpuFd) -> Option<u64> {
    let mut offset = 0u64;
    let attr = kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: std::ptr::from_mut(&mut offset) as u64,
        flags: 0,
    };
    // SAFETY: KVM_GET_DEVICE_ATTR reads `attr` and writes the 8-byte offset to `attr.addr`,
    // which points at `offset`, alive and writable for the whole call; `vcpu` is a vCPU fd.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_GET_DEVICE_ATTR(), &attr) };
    (ret == 0).then_some(offset)
}

/// How vCPU `saved` moves on over the kvmclock's progress from `then` (the save's reading) to
/// `now` (read once the restore put it back); `unscaled`: its TSC runs at the host's rate
/// here. By the stamps where both readings have one, else as [`by_clock`].
pub fn plan(
    saved: &VcpuState,
    then: &kvm_clock_data,
    now: &kvm_clock_data,
    unscaled: bool,
) -> Carry {
    let Some(khz) = rate_over_progress(saved, then, now) else {
        return Carry::Not;
    };
    if let (Some(offset), true, true, true) =
        (saved.tsc_offset, stamped(then), stamped(now), unscaled)
    {
        let (offset, ticks) = offset_after(offset, then, now, khz);
        return Carry::ByStamps { offset, ticks };
    }
    by_clock(saved, then, now)
}

/// The kvmclock reading carries KVM's host TSC stamp: its master clock ran.
pub fn stamped(clock: &kvm_clock_data) -> bool {
    clock.flags & KVM_CLOCK_HOST_TSC != 0
}

/// The saved TSC moved on by the kvmclock's progress from `then` to `now`, to be written back
/// in place of the saved one. A VM has no master clock, hence no stamp, before its vCPUs are
/// made: this is what a restore writes first.
pub fn by_clock(saved: &VcpuState, then: &kvm_clock_data, now: &kvm_clock_data) -> Carry {
    let Some(khz) = rate_over_progress(saved, then, now) else {
        return Carry::Not;
    };
    match saved.msrs.iter().find(|m| m.index == MSR_IA32_TSC) {
        Some(tsc) => {
            let ticks = clock_ticks(then, now, khz);
            Carry::ByClock {
                tsc: tsc.data.wrapping_add_signed(ticks),
                ticks,
            }
        }
        None => Carry::Not,
    }
}

/// The saved TSC rate, where the kvmclock moved on from `then` to `now`. One behind the save's
/// was not put back (or the host's wall clock went back): there is no progress to follow.
fn rate_over_progress(
    saved: &VcpuState,
    then: &kvm_clock_data,
    now: &kvm_clock_data,
) -> Option<u32> {
    saved.tsc_khz.filter(|_| now.clock >= then.clock)
}

/// `msrs` with the TSC's value replaced by `tsc`.
pub fn with_tsc(msrs: &[kvm_msr_entry], tsc: u64) -> Vec<kvm_msr_entry> {
    msrs.iter()
        .map(|m| match m.index {
            MSR_IA32_TSC => kvm_msr_entry { data: tsc, ..*m },
            _ => *m,
        })
        .collect()
}

/// Guest TSC ticks at `khz` in the kvmclock's progress from `then` to `now`.
fn clock_ticks(then: &kvm_clock_data, now: &kvm_clock_data, khz: u32) -> i64 {
    let elapsed_ns = i128::from(now.clock) - i128::from(then.clock);
    let ticks = elapsed_ns * i128::from(khz) / 1_000_000;
    i64::try_from(ticks).unwrap_or(if ticks < 0 { i64::MIN } else { i64::MAX })
}

/// The offset that keeps the guest TSC of kvmclock zero where it was (vcpu.rst's step 6):
/// `offset + (guest_now - guest_then) * rate + (host_tsc_then - host_tsc_now)`; and the ticks
/// the guest TSC moved on by. Offsets are modular: a negative one is kept as its
/// two's complement, as KVM does.
fn offset_after(offset: u64, then: &kvm_clock_data, now: &kvm_clock_data, khz: u32) -> (u64, i64) {
    let ticks = clock_ticks(then, now, khz);
    let host = i128::from(then.host_tsc) - i128::from(now.host_tsc);
    let new = i128::from(offset) + i128::from(ticks) + host;
    // Truncation to 64 bits is the modular arithmetic KVM itself does on offsets.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let new = new as u64;
    (new, ticks)
}

/// Gives `vcpu`'s TSC `offset` from the host's.
pub fn write_tsc_offset(vcpu: &VcpuFd, offset: u64) -> Result<(), OffsetError> {
    let attr = kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: std::ptr::from_ref(&offset) as u64,
        flags: 0,
    };
    // SAFETY: KVM_SET_DEVICE_ATTR reads `attr` and the 8-byte offset at `attr.addr`, which
    // points at `offset`, alive for the whole call; `vcpu` is a vCPU fd.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_SET_DEVICE_ATTR(), &attr) };
    if ret == 0 {
        Ok(())
    } else {
        Err(OffsetError(kvm_ioctls::Error::last()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(ns: u64, host_tsc: u64) -> kvm_clock_data {
        kvm_clock_data {
            clock: ns,
            host_tsc,
            flags: KVM_CLOCK_HOST_TSC,
            ..Default::default()
        }
    }

    #[test]
    fn the_guest_tsc_moves_on_by_the_kvmclock_whatever_the_host_tsc_did() {
        // A 1 GHz guest paused 3 s: the kvmclock moved on 3 s, the host's TSC (1 GHz too)
        // started again from near zero after a kexec.
        let then = clock(10_000_000_000, 50_000_000_000);
        let now = clock(13_000_000_000, 2_000_000_000);
        let offset = 5u64.wrapping_neg();
        let (new, ticks) = offset_after(offset, &then, &now, 1_000_000);
        assert_eq!(ticks, 3_000_000_000);
        // The guest TSC is host TSC + offset: at `then` it read 50e9 - 5; at `now` it must
        // read 3e9 more.
        let guest_then = then.host_tsc.wrapping_add(offset);
        let guest_now = now.host_tsc.wrapping_add(new);
        assert_eq!(guest_now - guest_then, 3_000_000_000);
    }

    #[test]
    fn on_the_same_host_a_pause_leaves_the_offset_as_it_was() {
        // Same host, host TSC moved on exactly as the kvmclock: the offset is unchanged.
        let then = clock(1_000, 7_000);
        let now = clock(501_000, 507_000);
        assert_eq!(offset_after(42, &then, &now, 1_000_000), (42, 500_000));
    }

    fn vcpu(offset: Option<u64>, tsc: u64) -> VcpuState {
        VcpuState {
            id: 0,
            cpuid: Vec::new(),
            msrs: vec![
                kvm_msr_entry {
                    index: 0x174,
                    data: 9,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: MSR_IA32_TSC,
                    data: tsc,
                    ..Default::default()
                },
            ],
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            lapic: Default::default(),
            vcpu_events: Default::default(),
            mp_state: Default::default(),
            debug_regs: Default::default(),
            tsc_khz: Some(1_000_000),
            tsc_offset: offset,
            unreadable_msrs: Vec::new(),
        }
    }

    #[test]
    fn the_stamps_are_used_where_both_ends_have_them_else_the_saved_tsc_moves_on() {
        let then = clock(1_000_000_000, 7_000);
        let now = clock(3_000_000_000, 9_000);
        let saved = vcpu(Some(100), 5_000);
        assert_eq!(
            plan(&saved, &then, &now, true),
            Carry::ByStamps {
                offset: 100 + 2_000_000_000 - 2_000,
                ticks: 2_000_000_000
            }
        );
        let by_clock = Carry::ByClock {
            tsc: 5_000 + 2_000_000_000,
            ticks: 2_000_000_000,
        };
        // A scaled TSC, an older state without the offset, a clock without its stamp.
        assert_eq!(plan(&saved, &then, &now, false), by_clock);
        assert_eq!(plan(&vcpu(None, 5_000), &then, &now, true), by_clock);
        let unstamped = kvm_clock_data { flags: 0, ..now };
        assert_eq!(plan(&saved, &then, &unstamped, true), by_clock);
        // A kvmclock that was not put back: nothing to follow.
        assert_eq!(plan(&saved, &now, &then, true), Carry::Not);
        let written = with_tsc(&saved.msrs, 42);
        assert_eq!((written[0].data, written[1].data), (9, 42));
    }

    #[test]
    fn kvmclock_ticks_follow_the_rate_and_may_be_negative() {
        let then = clock(2_000_000_000, 0);
        let now = clock(1_000_000_000, 0);
        assert_eq!(clock_ticks(&then, &now, 2_500_000), -2_500_000_000);
    }
}
