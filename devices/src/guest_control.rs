//! The luvmm guest-control port: how the VMM asks a guest to check itself, and how a guest asks
//! to be paused at a moment it chooses.
//!
//! The guest reads a 32-bit word from the port after each wake-up: one bit per pending
//! `GuestRequest`; reading clears them. Requests survive a save/restore, so one asked for
//! before a pause is answered after the resume, and the restore path asks for a check itself.
//! A guest that writes `PAUSE_ME` to the port is paused by the VMM's event loop right after:
//! a test guest uses it to leave device interrupts in flight across a pause or a handover.
//!
//! The port also tells the guest the host's time: a read at `HOST_TIME_LOW` latches the host's
//! CLOCK_REALTIME (ns) and returns its low half, a read at `HOST_TIME_HIGH` the latched high
//! half. A guest brackets the first read with its own clock reads, so it learns how far its
//! clock is from the host's at that moment without timestamping any serial output.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use luvmm_resources::errors::error_chain;
use luvmm_resources::state::GuestControlState;
use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vmm_sys_util::eventfd::EventFd;

/// What the VMM can ask of the guest, one bit each in the port word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestRequest {
    /// Re-read every filled page and print a LUVMM-CHECK line.
    Check,
    /// Drive every passthrough device again (a DMA and its interrupt each, a new command on
    /// an NVMe controller's existing admin queue) and print LUVMM-ROUND lines.
    Devices,
    /// Leave interrupts in flight (an edu DMA whose completion interrupt comes later, an
    /// NVMe completion held by a masked MSI-X vector), then ask to be paused.
    IrqInFlight,
    /// Check that what `IrqInFlight` left arrived (or is still pending) and print
    /// LUVMM-INFLIGHT lines.
    IrqLanded,
}

impl GuestRequest {
    /// The request's bit in the port word.
    pub fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// Written by the guest: pause me now.
pub const PAUSE_ME: u32 = 1;

/// Port offset whose read latches the host's CLOCK_REALTIME and returns its low 32 bits.
pub const HOST_TIME_LOW: PioAddressOffset = 4;
/// Port offset whose read returns the high 32 bits of the last latched host time.
pub const HOST_TIME_HIGH: PioAddressOffset = 8;

/// The host's CLOCK_REALTIME in ns; 0 if the clock cannot be read (never on Linux).
fn host_realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nsecs = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

/// Copies a little-endian word into a read of any width (a narrower read gets its low bytes).
fn fill(data: &mut [u8], bytes: &[u8]) {
    let n = data.len().min(bytes.len());
    data[..n].copy_from_slice(&bytes[..n]);
}

/// The guest-control port device.
#[derive(Debug)]
pub struct GuestControl {
    pending: AtomicU32,
    /// Host time latched by the last read at `HOST_TIME_LOW`. Not saved: a restored guest
    /// reads the low half first, as every reader must.
    host_time: AtomicU64,
    /// Signalled when the guest asks to be paused.
    pause_evt: EventFd,
}

impl GuestControl {
    /// A port with nothing pending; `pause_evt` is signalled when the guest asks to be paused.
    pub fn new(pause_evt: EventFd) -> GuestControl {
        GuestControl {
            pending: AtomicU32::new(0),
            host_time: AtomicU64::new(0),
            pause_evt,
        }
    }

    /// Rebuilds the port from its saved state.
    pub fn from_state(state: &GuestControlState, pause_evt: EventFd) -> GuestControl {
        let check = if state.check_pending {
            GuestRequest::Check.bit()
        } else {
            0
        };
        GuestControl {
            pending: AtomicU32::new(state.requests | check),
            host_time: AtomicU64::new(0),
            pause_evt,
        }
    }

    /// Asks the guest to verify its memory at its next wake-up.
    pub fn request_check(&self) {
        self.request(GuestRequest::Check);
    }

    /// Asks the guest for `request` at its next wake-up.
    pub fn request(&self, request: GuestRequest) {
        self.pending.fetch_or(request.bit(), Ordering::SeqCst);
    }

    /// The state to save.
    pub fn save(&self) -> GuestControlState {
        let pending = self.pending.load(Ordering::SeqCst);
        let check = GuestRequest::Check.bit();
        GuestControlState {
            check_pending: pending & check != 0,
            requests: pending & !check,
        }
    }
}

impl DevicePio for GuestControl {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        match offset {
            0 => fill(data, &self.pending.swap(0, Ordering::SeqCst).to_le_bytes()),
            HOST_TIME_LOW => {
                let now = host_realtime_ns();
                self.host_time.store(now, Ordering::SeqCst);
                fill(data, &now.to_le_bytes()[..4]);
            }
            HOST_TIME_HIGH => fill(
                data,
                &self.host_time.load(Ordering::SeqCst).to_le_bytes()[4..],
            ),
            _ => {}
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset == 0 && data.first().is_some_and(|&b| u32::from(b) == PAUSE_ME) {
            if let Err(e) = self.pause_evt.write(1) {
                log::error!(
                    "guest-control: cannot signal the guest's pause request: {}",
                    error_chain(&e)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn read(dev: &GuestControl) -> u32 {
        read_at(dev, 0)
    }

    fn read_at(dev: &GuestControl, offset: PioAddressOffset) -> u32 {
        let mut word = [0u8; 4];
        dev.pio_read(PioAddress(0x600), offset, &mut word);
        u32::from_le_bytes(word)
    }

    fn host_time(dev: &GuestControl) -> u64 {
        let low = read_at(dev, HOST_TIME_LOW);
        let high = read_at(dev, HOST_TIME_HIGH);
        u64::from(high) << 32 | u64::from(low)
    }

    fn port() -> GuestControl {
        GuestControl::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn requests_are_read_once() {
        let dev = port();
        assert_eq!(read(&dev), 0);
        dev.request_check();
        dev.request(GuestRequest::Devices);
        assert_eq!(read(&dev), 0b11);
        assert_eq!(read(&dev), 0);
        dev.request(GuestRequest::IrqLanded);
        assert_eq!(read(&dev), 0b1000);
    }

    #[test]
    fn pending_requests_survive_save_and_restore() {
        let dev = port();
        dev.request_check();
        dev.request(GuestRequest::IrqInFlight);
        let saved = dev.save();
        assert!(saved.check_pending);
        let back = GuestControl::from_state(&saved, EventFd::new(EFD_NONBLOCK).unwrap());
        assert_eq!(read(&back), 0b101);
    }

    #[test]
    fn a_guest_write_asks_for_a_pause() {
        let dev = port();
        dev.pio_write(PioAddress(0x600), 0, &[2]);
        assert!(dev.pause_evt.read().is_err(), "only PAUSE_ME asks");
        dev.pio_write(PioAddress(0x600), 0, &PAUSE_ME.to_le_bytes());
        assert_eq!(dev.pause_evt.read().unwrap(), 1);
    }

    #[test]
    fn the_host_time_is_latched_by_the_low_read() {
        let dev = port();
        let before = host_realtime_ns();
        let got = host_time(&dev);
        let after = host_realtime_ns();
        assert!(
            before <= got && got <= after,
            "{before} <= {got} <= {after}"
        );
        // The high half comes from the latch, not from a new reading of the clock.
        dev.host_time.store(0x1234_5678_9abc_def0, Ordering::SeqCst);
        assert_eq!(read_at(&dev, HOST_TIME_HIGH), 0x1234_5678);
        assert!(host_time(&dev) > 0x1234_5678_9abc_def0 >> 32 << 32);
    }

    #[test]
    fn host_time_reads_leave_requests_alone() {
        let dev = port();
        dev.request_check();
        host_time(&dev);
        assert_eq!(read_at(&dev, 12), 0, "nothing behind offset 12");
        assert_eq!(read(&dev), 1, "the check is still pending");
    }
}
