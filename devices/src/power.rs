//! How a guest ends itself: the hardware-reduced ACPI sleep control and reset registers that the
//! FADT points at, and the i8042 command port's CPU reset.
//!
//! A guest's `poweroff` writes SLP_TYP for S5 with SLP_EN to the sleep control register; its
//! `reboot` writes the FADT's reset value to the reset register (or, failing that, `0xfe` to
//! the i8042). The device records which and signals the VMM's exit event: the VMM ends with a
//! status that says which one the guest asked for.

use std::sync::atomic::{AtomicU8, Ordering};

use luvmm_resources::layout::{ACPI_RESET_PORT, ACPI_SLEEP_CONTROL_PORT, I8042_COMMAND_PORT};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vmm_sys_util::eventfd::EventFd;

/// The sleep type the DSDT's `_S5_` object gives, which the guest writes back to power off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 0x6;
/// SLP_EN in the sleep control register (bit 5); SLP_TYP is bits 4:2.
const SLEEP_ENABLE: u8 = 1 << 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
/// WAK_STS in the sleep status register (bit 7).
const WAKE_STATUS: u8 = 1 << 7;
/// The i8042 command that pulses the reset line.
const I8042_RESET: u8 = 0xfe;

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerRequest {
    /// S5: the guest powered off.
    Off,
    /// A CPU reset: the guest rebooted.
    Reset,
}

const NONE: u8 = 0;
const OFF: u8 = 1;
const RESET: u8 = 2;

/// The guest's power and reset registers.
#[derive(Debug)]
pub struct GuestPower {
    request: AtomicU8,
    /// The VMM's exit event, written once the guest asked to end.
    exit_evt: EventFd,
}

impl GuestPower {
    /// Registers that signal `exit_evt` when the guest powers off or resets.
    pub fn new(exit_evt: EventFd) -> GuestPower {
        GuestPower {
            request: AtomicU8::new(NONE),
            exit_evt,
        }
    }

    /// What the guest asked for, if it asked.
    pub fn requested(&self) -> Option<PowerRequest> {
        match self.request.load(Ordering::SeqCst) {
            OFF => Some(PowerRequest::Off),
            RESET => Some(PowerRequest::Reset),
            _ => None,
        }
    }

    /// The register write at `port` with `value`, decoded.
    fn decode(port: u16, value: u8) -> Option<PowerRequest> {
        match port {
            ACPI_SLEEP_CONTROL_PORT
                if value & SLEEP_ENABLE != 0
                    && (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK == S5_SLEEP_TYPE =>
            {
                Some(PowerRequest::Off)
            }
            ACPI_RESET_PORT if value == ACPI_RESET_VALUE => Some(PowerRequest::Reset),
            I8042_COMMAND_PORT if value == I8042_RESET => Some(PowerRequest::Reset),
            _ => None,
        }
    }

    fn ask(&self, request: PowerRequest) {
        let code = match request {
            PowerRequest::Off => OFF,
            PowerRequest::Reset => RESET,
        };
        // The first request wins: a reset after a power-off (another vCPU) changes nothing.
        if self
            .request
            .compare_exchange(NONE, code, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            log::info!("the guest asked for {request:?}");
            if let Err(e) = self.exit_evt.write(1) {
                log::error!("cannot signal the guest's {request:?}: {e}");
            }
        }
    }
}

/// The port an access at `offset` from `base` is for.
fn port_of(base: PioAddress, offset: PioAddressOffset) -> Option<u16> {
    u16::try_from(u32::from(base.0) + u32::from(offset)).ok()
}

impl DevicePio for GuestPower {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        // Once the guest asked for S5 the sleep status register says it woke (WAK_STS): Linux
        // polls it with interrupts off after writing SLP_EN, and the VMM ends the VM anyway;
        // a guest left spinning there could starve a nested host (an emulated L1 does not
        // take its own interrupts while the L2 guest has them masked).
        if port_of(base, offset) == Some(ACPI_SLEEP_CONTROL_PORT) && self.requested().is_some() {
            if let Some(status) = data.first_mut() {
                *status = WAKE_STATUS;
            }
        }
        // The i8042 status reads as idle.
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let (Some(&value), Some(port)) = (data.first(), port_of(base, offset)) else {
            return;
        };
        if let Some(request) = Self::decode(port, value) {
            self.ask(request);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn device() -> GuestPower {
        GuestPower::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn s5_with_sleep_enable_powers_off_and_signals_the_vmm() {
        let power = device();
        // S3 and S5 without SLP_EN change nothing.
        power.pio_write(
            PioAddress(ACPI_SLEEP_CONTROL_PORT),
            0,
            &[(3 << 2) | SLEEP_ENABLE],
        );
        power.pio_write(PioAddress(ACPI_SLEEP_CONTROL_PORT), 0, &[5 << 2]);
        assert_eq!(power.requested(), None);
        assert!(power.exit_evt.read().is_err(), "nothing signalled yet");
        power.pio_write(
            PioAddress(ACPI_SLEEP_CONTROL_PORT),
            0,
            &[(5 << 2) | SLEEP_ENABLE],
        );
        assert_eq!(power.requested(), Some(PowerRequest::Off));
        assert_eq!(power.exit_evt.read().unwrap(), 1);
    }

    #[test]
    fn the_sleep_status_says_woken_only_after_the_guest_asked() {
        let power = device();
        let mut status = [0xffu8];
        power.pio_read(PioAddress(ACPI_SLEEP_CONTROL_PORT), 0, &mut status);
        assert_eq!(status, [0]);
        power.pio_write(
            PioAddress(ACPI_SLEEP_CONTROL_PORT),
            0,
            &[(5 << 2) | SLEEP_ENABLE],
        );
        power.pio_read(PioAddress(ACPI_SLEEP_CONTROL_PORT), 0, &mut status);
        assert_eq!(status, [WAKE_STATUS]);
        power.pio_read(PioAddress(I8042_COMMAND_PORT), 0, &mut status);
        assert_eq!(status, [0]);
    }

    #[test]
    fn the_reset_register_and_the_i8042_reset_the_guest() {
        let power = device();
        power.pio_write(PioAddress(ACPI_SLEEP_CONTROL_PORT), 1, &[0x1]);
        assert_eq!(power.requested(), None);
        power.pio_write(PioAddress(ACPI_SLEEP_CONTROL_PORT), 1, &[ACPI_RESET_VALUE]);
        assert_eq!(power.requested(), Some(PowerRequest::Reset));

        let power = device();
        power.pio_write(PioAddress(I8042_COMMAND_PORT), 0, &[0xd1]);
        assert_eq!(power.requested(), None);
        power.pio_write(PioAddress(I8042_COMMAND_PORT), 0, &[I8042_RESET]);
        assert_eq!(power.requested(), Some(PowerRequest::Reset));
    }

    #[test]
    fn the_first_request_wins() {
        let power = device();
        power.pio_write(
            PioAddress(ACPI_SLEEP_CONTROL_PORT),
            0,
            &[(5 << 2) | SLEEP_ENABLE],
        );
        power.pio_write(PioAddress(I8042_COMMAND_PORT), 0, &[I8042_RESET]);
        assert_eq!(power.requested(), Some(PowerRequest::Off));
        assert_eq!(power.exit_evt.read().unwrap(), 1);
    }
}
