//! The luvmm guest-control port: how the VMM asks a guest to check itself.
//!
//! The guest reads a 32-bit word from the port after each wake-up. Bit 0 set means "a check
//! was requested"; reading clears it. The request survives a save/restore, so a check asked for
//! before a pause is answered after the resume, and the restore path asks for one itself.

use std::sync::atomic::{AtomicBool, Ordering};

use luvmm_resources::state::GuestControlState;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// Bit 0 of the port word: run the memory check now.
pub const CHECK_REQUESTED: u32 = 1;

/// The guest-control port device.
#[derive(Debug, Default)]
pub struct GuestControl {
    check_pending: AtomicBool,
}

impl GuestControl {
    /// A port with nothing pending.
    pub fn new() -> GuestControl {
        GuestControl::default()
    }

    /// Rebuilds the port from its saved state.
    pub fn from_state(state: &GuestControlState) -> GuestControl {
        GuestControl {
            check_pending: AtomicBool::new(state.check_pending),
        }
    }

    /// Asks the guest to verify its memory at its next wake-up.
    pub fn request_check(&self) {
        self.check_pending.store(true, Ordering::SeqCst);
    }

    /// The state to save.
    pub fn save(&self) -> GuestControlState {
        GuestControlState {
            check_pending: self.check_pending.load(Ordering::SeqCst),
        }
    }
}

impl DevicePio for GuestControl {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 && self.check_pending.swap(false, Ordering::SeqCst) {
            let word = CHECK_REQUESTED.to_le_bytes();
            let n = data.len().min(word.len());
            data[..n].copy_from_slice(&word[..n]);
        }
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &GuestControl) -> u32 {
        let mut word = [0u8; 4];
        dev.pio_read(PioAddress(0x600), 0, &mut word);
        u32::from_le_bytes(word)
    }

    #[test]
    fn a_request_is_read_once() {
        let dev = GuestControl::new();
        assert_eq!(read(&dev), 0);
        dev.request_check();
        assert_eq!(read(&dev), CHECK_REQUESTED);
        assert_eq!(read(&dev), 0);
    }

    #[test]
    fn a_pending_request_survives_save_and_restore() {
        let dev = GuestControl::new();
        dev.request_check();
        let back = GuestControl::from_state(&dev.save());
        assert_eq!(read(&back), CHECK_REQUESTED);
    }
}
