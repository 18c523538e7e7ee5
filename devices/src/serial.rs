//! COM1: vm-superio's 16550 behind a vm-device PIO window.

use std::io::Write;
use std::sync::Mutex;

use luvmm_resources::state::SerialRegisters;
use luvmm_resources::sync::lock;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial interrupt by writing the eventfd that KVM routes to the IRQ line.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Where guest output goes: stdout, a file, or nowhere. The VMM hands in a line-buffered
/// writer, so whole guest lines reach a log file at once.
pub type SerialOut = Box<dyn Write + Send>;

/// The guest's output as the UART writes it. The first write that fails is logged and the
/// output is dropped from then on, the UART going on as if it were read: a closed stdout
/// (`luvmm run ... | head -1`) costs one log line, not one per guest byte.
struct ConsoleOut {
    out: SerialOut,
    lost: bool,
}

impl ConsoleOut {
    fn wrap(out: SerialOut) -> SerialOut {
        Box::new(ConsoleOut { out, lost: false })
    }

    fn give_up(&mut self, e: &std::io::Error) {
        self.lost = true;
        log::warn!(
            "serial: the guest's console output cannot be written ({e}); it is dropped from now on"
        );
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.lost {
            match self.out.write(buf) {
                Ok(written) => return Ok(written),
                Err(e) => self.give_up(&e),
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.lost {
            if let Err(e) = self.out.flush() {
                self.give_up(&e);
            }
        }
        Ok(())
    }
}

/// Why the serial device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved receive FIFO holds more bytes than the device has room for.
    #[error("saved serial state does not fit the device")]
    BadState(#[source] vm_superio::serial::Error<std::io::Error>),
}

/// The guest's console.
pub struct SerialDevice {
    uart: Mutex<Serial<IrqTrigger, NoEvents, SerialOut>>,
}

impl SerialDevice {
    /// A fresh UART in its reset state.
    pub fn new(irq: EventFd, out: SerialOut) -> SerialDevice {
        SerialDevice {
            uart: Mutex::new(Serial::new(IrqTrigger(irq), ConsoleOut::wrap(out))),
        }
    }

    /// A UART with the registers it had when it was saved.
    pub fn from_state(
        state: &SerialRegisters,
        irq: EventFd,
        out: SerialOut,
    ) -> Result<SerialDevice, SerialError> {
        let uart = Serial::from_state(
            &to_superio(state),
            IrqTrigger(irq),
            NoEvents,
            ConsoleOut::wrap(out),
        )
        .map_err(SerialError::BadState)?;
        Ok(SerialDevice {
            uart: Mutex::new(uart),
        })
    }

    /// Queues bytes typed for the guest, raising the receive interrupt. Returns how many fit in
    /// the FIFO; the rest are dropped, as a real UART would.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        match lock(&self.uart).enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: input dropped: {e}");
                0
            }
        }
    }

    /// The registers, for the saved state.
    pub fn save(&self) -> SerialRegisters {
        from_superio(&lock(&self.uart).state())
    }
}

impl DevicePio for SerialDevice {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Some(byte), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *byte = lock(&self.uart).read(offset);
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(&byte), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = lock(&self.uart).write(offset, byte) {
                log::warn!("serial: write to register {offset} failed: {e}");
            }
        }
    }
}

fn to_superio(s: &SerialRegisters) -> SerialState {
    SerialState {
        baud_divisor_low: s.baud_divisor_low,
        baud_divisor_high: s.baud_divisor_high,
        interrupt_enable: s.interrupt_enable,
        interrupt_identification: s.interrupt_identification,
        line_control: s.line_control,
        line_status: s.line_status,
        modem_control: s.modem_control,
        modem_status: s.modem_status,
        scratch: s.scratch,
        in_buffer: s.in_buffer.clone(),
    }
}

fn from_superio(s: &SerialState) -> SerialRegisters {
    SerialRegisters {
        baud_divisor_low: s.baud_divisor_low,
        baud_divisor_high: s.baud_divisor_high,
        interrupt_enable: s.interrupt_enable,
        interrupt_identification: s.interrupt_identification,
        line_control: s.line_control,
        line_status: s.line_status,
        modem_control: s.modem_control,
        modem_status: s.modem_status,
        scratch: s.scratch,
        in_buffer: s.in_buffer.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Capture(Arc<StdMutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn eventfd() -> EventFd {
        EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap()
    }

    const LCR: u16 = 3;
    const SCRATCH: u16 = 7;

    #[test]
    fn guest_bytes_reach_the_writer() {
        let out = Capture::default();
        let dev = SerialDevice::new(eventfd(), Box::new(out.clone()));
        for &b in b"hi\n" {
            dev.pio_write(PioAddress(0x3f8), 0, &[b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_reaches_the_receive_buffer() {
        let dev = SerialDevice::new(eventfd(), Box::new(std::io::sink()));
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        let mut byte = [0u8];
        dev.pio_read(PioAddress(0x3f8), 0, &mut byte);
        assert_eq!(byte[0], b'a');
        assert_eq!(dev.save().in_buffer, b"b");
    }

    #[test]
    fn registers_survive_save_and_restore() {
        let dev = SerialDevice::new(eventfd(), Box::new(std::io::sink()));
        dev.pio_write(PioAddress(0x3f8), LCR, &[0x03]);
        dev.pio_write(PioAddress(0x3f8), SCRATCH, &[0x5a]);
        let saved = dev.save();
        assert_eq!(saved.line_control, 0x03);
        assert_eq!(saved.scratch, 0x5a);

        let back = SerialDevice::from_state(&saved, eventfd(), Box::new(std::io::sink())).unwrap();
        let mut byte = [0u8];
        back.pio_read(PioAddress(0x3f8), SCRATCH, &mut byte);
        assert_eq!(byte[0], 0x5a);
        assert_eq!(back.save(), saved);
    }

    #[test]
    fn an_overfull_fifo_is_refused() {
        let state = SerialRegisters {
            in_buffer: vec![0; 4096],
            ..SerialDevice::new(eventfd(), Box::new(std::io::sink())).save()
        };
        assert!(SerialDevice::from_state(&state, eventfd(), Box::new(std::io::sink())).is_err());
    }

    /// A writer whose reader went away, counting the writes tried on it.
    #[derive(Clone, Default)]
    struct Closed(Arc<StdMutex<usize>>);

    impl Write for Closed {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            *self.0.lock().unwrap() += 1;
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const IIR: u16 = 2;
    const IER: u16 = 1;

    #[test]
    fn a_closed_output_is_given_up_once_and_the_uart_goes_on() {
        let out = Closed::default();
        let irq = eventfd();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        // The guest asks for the transmitter-empty interrupt, as Linux's 8250 driver does, and
        // takes the one that comes at once.
        dev.pio_write(PioAddress(0x3f8), IER, &[0x02]);
        let mut iir = [0u8];
        dev.pio_read(PioAddress(0x3f8), IIR, &mut iir);
        let _ = irq.read();
        for &b in b"three lines\nof guest\noutput\n" {
            dev.pio_write(PioAddress(0x3f8), 0, &[b]);
        }
        assert_eq!(*out.0.lock().unwrap(), 1, "written again after it failed");
        // The transmitter still empties and says so.
        assert!(irq.read().is_ok(), "no transmitter-empty interrupt");
        dev.pio_read(PioAddress(0x3f8), IIR, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "IIR {:#x}", iir[0]);
    }
}
