//! PCI bus 0: configuration mechanism #1 on ports 0xCF8/0xCFC, a host bridge in slot 0, and
//! BAR windows (MMIO and I/O) whose accesses go to the device whose BAR decodes the address.

use std::sync::{Arc, Mutex, MutexGuard};

use luvmm_resources::sync::lock;
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio};

use super::config::BarKind;
use super::config::{ConfigSpace, COMMAND_IO, COMMAND_MEMORY, INTERRUPT_LINE, NUM_BARS};

/// A function on the bus.
pub trait PciDevice: Send {
    /// Reads the 32-bit configuration register holding byte `offset`.
    fn config_read(&mut self, offset: usize) -> u32;
    /// Writes `data` at configuration byte `offset`.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// The guest-visible configuration space (for BAR decoding).
    fn config(&self) -> &ConfigSpace;
    /// An access inside BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write inside BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge: identity only.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    /// An Intel-style host bridge (class 06:00).
    pub fn new() -> HostBridge {
        HostBridge {
            config: ConfigSpace::new(0x8086, 0x0d57, 0x06, 0x00, 0),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize) -> u32 {
        self.config.read_u32(offset)
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// A shared handle to a device on the bus.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Where one function's INTx pin goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntxRoute {
    /// Its slot on bus 0.
    pub slot: u8,
    /// Its interrupt pin, 1 (INTA#) to 4 (INTD#).
    pub pin: u8,
    /// The IOAPIC input (GSI) it raises.
    pub line: u8,
}

/// Bus 0, function 0 of each slot.
pub struct PciBus {
    slots: Vec<Option<SharedPciDevice>>,
}

/// A device found no place on the bus.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("PCI bus 0 has no free slot")]
    Full,
    #[error("PCI bus 0 slot {0} is taken or does not exist")]
    Taken(u8),
}

const SLOTS: usize = 32;

impl PciBus {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> PciBus {
        let mut slots: Vec<Option<SharedPciDevice>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciBus { slots }
    }

    /// Puts `device` in slot `wanted` (a restore keeps the slots the guest saw), or in the
    /// first free one; returns the slot number.
    pub fn add(&mut self, device: SharedPciDevice, wanted: Option<u8>) -> Result<u8, SlotError> {
        let slot = match wanted {
            Some(slot)
                if self
                    .slots
                    .get(usize::from(slot))
                    .is_some_and(Option::is_none) =>
            {
                slot
            }
            Some(slot) => return Err(SlotError::Taken(slot)),
            // A free slot that a `u8` cannot number could not be addressed: the bus counts as full.
            None => self
                .slots
                .iter()
                .position(Option::is_none)
                .and_then(|free| u8::try_from(free).ok())
                .ok_or(SlotError::Full)?,
        };
        self.slots[usize::from(slot)] = Some(device);
        Ok(slot)
    }

    /// The legacy interrupt of each function that has one: its slot, its pin (1 = INTA#) and
    /// the line the VMM wired it to, as the guest's firmware tables must describe them.
    pub fn intx_routes(&self) -> Vec<IntxRoute> {
        (0..SLOTS)
            .filter_map(|slot| {
                let device = self.device(slot)?;
                let [line, pin] = device.config().u16_at(INTERRUPT_LINE).to_le_bytes();
                let slot = u8::try_from(slot).ok()?;
                (pin != 0).then_some(IntxRoute { slot, pin, line })
            })
            .collect()
    }

    fn device(&self, slot: usize) -> Option<MutexGuard<'_, dyn PciDevice + 'static>> {
        let device = self.slots.get(slot)?.as_ref()?;
        Some(lock(device))
    }

    /// Finds the device and BAR whose decoded range holds `address`, with the offset in it.
    fn decode(&self, address: u64, io: bool) -> Option<(usize, usize, u64)> {
        for (slot, device) in self.slots.iter().enumerate() {
            let Some(device) = device else { continue };
            let device = lock(device);
            let config = device.config();
            let enabled = if io { COMMAND_IO } else { COMMAND_MEMORY };
            if config.command() & enabled == 0 {
                continue;
            }
            for index in 0..NUM_BARS {
                let (Some(bar), Some(base)) = (config.bar(index), config.bar_address(index)) else {
                    continue;
                };
                if (bar.kind == BarKind::Io) != io {
                    continue;
                }
                if address >= base && address - base < bar.size {
                    return Some((slot, index, address - base));
                }
            }
        }
        None
    }
}

impl Default for PciBus {
    fn default() -> Self {
        PciBus::new()
    }
}

/// Ports 0xCF8-0xCFF: the address register and the data window.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: Mutex<u32>,
}

impl PciConfigIo {
    /// Serves configuration cycles for `bus`.
    pub fn new(bus: Arc<PciBus>) -> PciConfigIo {
        PciConfigIo {
            bus,
            address: Mutex::new(0),
        }
    }

    /// The slot and register the address register selects, when enabled and on bus 0,
    /// function 0.
    fn target(&self) -> Option<(usize, usize)> {
        let address = *lock(&self.address);
        let enabled = address & 0x8000_0000 != 0;
        let bus = (address >> 16) & 0xff;
        let slot = ((address >> 11) & 0x1f) as usize;
        let function = (address >> 8) & 0x7;
        let register = (address & 0xfc) as usize;
        (enabled && bus == 0 && function == 0).then_some((slot, register))
    }
}

impl DevicePio for PciConfigIo {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let offset = usize::from(offset);
        if offset < 4 {
            let address = *lock(&self.address);
            copy_out(address, offset, data);
            return;
        }
        let value = match self.target() {
            Some((slot, register)) => self
                .bus
                .device(slot)
                .map_or(u32::MAX, |mut d| d.config_read(register)),
            None => u32::MAX,
        };
        copy_out(value, offset - 4, data);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let offset = usize::from(offset);
        if offset == 0 && data.len() == 4 {
            let mut word = [0u8; 4];
            word.copy_from_slice(data);
            *lock(&self.address) = u32::from_le_bytes(word);
            return;
        }
        if offset >= 4 {
            if let Some((slot, register)) = self.target() {
                if let Some(mut device) = self.bus.device(slot) {
                    device.config_write(register + offset - 4, data);
                }
            }
        }
    }
}

fn copy_out(value: u32, offset: usize, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(offset + i).copied().unwrap_or(0xff);
    }
}

/// The windows BARs are placed in (32-bit and 64-bit MMIO, I/O ports): an access reaches the
/// device whose enabled BAR decodes its address.
pub struct PciBarWindow {
    bus: Arc<PciBus>,
}

impl PciBarWindow {
    /// Routes the windows' accesses for `bus`.
    pub fn new(bus: Arc<PciBus>) -> PciBarWindow {
        PciBarWindow { bus }
    }

    /// Reads at bus `address`; all ones where no BAR decodes it, as on real hardware.
    fn read(&self, address: u64, io: bool, data: &mut [u8]) {
        match self.bus.decode(address, io) {
            Some((slot, bar, at)) => {
                if let Some(mut device) = self.bus.device(slot) {
                    device.bar_read(bar, at, data);
                }
            }
            None => data.fill(0xff),
        }
    }

    /// Writes at bus `address`; dropped where no BAR decodes it.
    fn write(&self, address: u64, io: bool, data: &[u8]) {
        if let Some((slot, bar, at)) = self.bus.decode(address, io) {
            if let Some(mut device) = self.bus.device(slot) {
                device.bar_write(bar, at, data);
            }
        }
    }
}

impl DeviceMmio for PciBarWindow {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read(base.0 + offset, false, data);
    }

    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write(base.0 + offset, false, data);
    }
}

impl DevicePio for PciBarWindow {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.read(u64::from(base.0) + u64::from(offset), true, data);
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.write(u64::from(base.0) + u64::from(offset), true, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{Bar, BAR0, COMMAND};

    /// A device whose BAR 0 is 16 bytes of memory.
    struct Scratch {
        config: ConfigSpace,
        memory: [u8; 16],
    }

    impl PciDevice for Scratch {
        fn config_read(&mut self, offset: usize) -> u32 {
            self.config.read_u32(offset)
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            let o = usize::try_from(offset).unwrap();
            data.copy_from_slice(&self.memory[o..o + data.len()]);
        }
        fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            let o = usize::try_from(offset).unwrap();
            self.memory[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn select(io: &PciConfigIo, slot: u32, register: u32) {
        let address = 0x8000_0000 | slot << 11 | register;
        io.pio_write(PioAddress(0xcf8), 0, &address.to_le_bytes());
    }

    fn read(io: &PciConfigIo, slot: u32, register: u32) -> u32 {
        select(io, slot, register);
        let mut word = [0u8; 4];
        io.pio_read(PioAddress(0xcf8), 4, &mut word);
        u32::from_le_bytes(word)
    }

    fn setup() -> (Arc<PciBus>, PciConfigIo) {
        setup_with(BarKind::Mmio32)
    }

    /// The bus with `Scratch` in slot 1, its 16-byte BAR 0 of `kind`.
    fn setup_with(kind: BarKind) -> (Arc<PciBus>, PciConfigIo) {
        let mut config = ConfigSpace::new(0x1234, 0x11e8, 0, 0xff, 0);
        config
            .add_bar(
                0,
                Bar {
                    kind,
                    size: 16,
                    prefetchable: false,
                },
            )
            .unwrap();
        let mut bus = PciBus::new();
        let slot = bus
            .add(
                Arc::new(Mutex::new(Scratch {
                    config,
                    memory: [0; 16],
                })),
                None,
            )
            .unwrap();
        assert_eq!(slot, 1);
        let bus = Arc::new(bus);
        let io = PciConfigIo::new(bus.clone());
        (bus, io)
    }

    #[test]
    fn a_restored_device_gets_its_saved_slot_or_an_error() {
        let mut bus = PciBus::new();
        let device = || -> SharedPciDevice { Arc::new(Mutex::new(HostBridge::new())) };
        assert_eq!(bus.add(device(), Some(5)).unwrap(), 5);
        assert!(matches!(
            bus.add(device(), Some(5)),
            Err(SlotError::Taken(5))
        ));
        assert!(matches!(
            bus.add(device(), Some(0)),
            Err(SlotError::Taken(0))
        ));
        assert!(matches!(
            bus.add(device(), Some(32)),
            Err(SlotError::Taken(32))
        ));
        assert_eq!(bus.add(device(), None).unwrap(), 1);
    }

    #[test]
    fn config_cycles_reach_the_right_slot() {
        let (_, io) = setup();
        assert_eq!(read(&io, 0, 0), 0x0d57_8086);
        assert_eq!(read(&io, 1, 0), 0x11e8_1234);
        assert_eq!(read(&io, 2, 0), 0xffff_ffff, "empty slot");
        // Disabled address register: all ones.
        io.pio_write(PioAddress(0xcf8), 0, &0x0000_0800u32.to_le_bytes());
        let mut word = [0u8; 4];
        io.pio_read(PioAddress(0xcf8), 4, &mut word);
        assert_eq!(u32::from_le_bytes(word), u32::MAX);
    }

    #[test]
    fn sub_word_config_accesses() {
        let (_, io) = setup();
        select(&io, 1, 0);
        let mut half = [0u8; 2];
        io.pio_read(PioAddress(0xcf8), 6, &mut half);
        assert_eq!(u16::from_le_bytes(half), 0x11e8);
    }

    #[test]
    fn mmio_reaches_a_bar_only_once_decoding_is_on() {
        let (bus, io) = setup();
        let window = PciBarWindow::new(bus);
        select(&io, 1, u32::try_from(BAR0).unwrap());
        io.pio_write(PioAddress(0xcf8), 4, &0xc000_0000u32.to_le_bytes());
        let mut word = [0u8; 4];
        window.mmio_read(MmioAddress(0xc000_0000), 0, &mut word);
        assert_eq!(word, [0xff; 4], "memory decoding is still off");

        select(&io, 1, u32::try_from(COMMAND).unwrap());
        io.pio_write(
            PioAddress(0xcf8),
            4,
            &u32::from(COMMAND_MEMORY).to_le_bytes(),
        );
        window.mmio_write(MmioAddress(0xc000_0000), 4, &[1, 2, 3, 4]);
        window.mmio_read(MmioAddress(0xc000_0000), 4, &mut word);
        assert_eq!(word, [1, 2, 3, 4]);
        window.mmio_read(MmioAddress(0xc000_0000), 16, &mut word);
        assert_eq!(word, [0xff; 4], "past the BAR");
        window.pio_read(PioAddress(0xc000), 4, &mut word);
        assert_eq!(word, [0xff; 4], "a memory BAR does not decode I/O");
    }

    #[test]
    fn io_ports_reach_an_io_bar_once_io_decoding_is_on() {
        let (bus, io) = setup_with(BarKind::Io);
        let window = PciBarWindow::new(bus);
        select(&io, 1, u32::try_from(BAR0).unwrap());
        io.pio_write(PioAddress(0xcf8), 4, &0x1000u32.to_le_bytes());
        let mut word = [0u8; 4];
        window.pio_read(PioAddress(0x1000), 4, &mut word);
        assert_eq!(word, [0xff; 4], "I/O decoding is still off");

        select(&io, 1, u32::try_from(COMMAND).unwrap());
        io.pio_write(PioAddress(0xcf8), 4, &u32::from(COMMAND_IO).to_le_bytes());
        window.pio_write(PioAddress(0x1000), 8, &[5, 6, 7, 8]);
        window.pio_read(PioAddress(0x1000), 8, &mut word);
        assert_eq!(word, [5, 6, 7, 8]);
        window.mmio_read(MmioAddress(0x1000), 8, &mut word);
        assert_eq!(word, [0xff; 4], "an I/O BAR does not decode memory");
    }
}
