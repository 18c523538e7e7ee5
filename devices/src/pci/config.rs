//! A PCI type-0 configuration space: 256 bytes, write masks, BARs and a capability list.
//!
//! Writes go through per-bit masks, so read-only fields stay put and the BAR sizing handshake
//! (write all ones, read back the size mask) needs no special case: a BAR's mask covers only the
//! address bits its size allows.

/// Standard header registers (byte offsets).
pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const CLASS_REVISION: usize = 0x08;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;

/// Command register bits.
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;
const FIRST_CAPABILITY: usize = 0x40;
const CONFIG_SIZE: usize = 256;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BarKind {
    Io,
    Mmio32,
    /// Takes this BAR's register and the next one.
    Mmio64,
}

/// A BAR's shape, fixed by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bar {
    pub kind: BarKind,
    /// Power of two.
    pub size: u64,
    pub prefetchable: bool,
}

/// The configuration space does not accept a BAR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    #[error("BAR {index}: {reason}")]
    BadBar { index: usize, reason: &'static str },
}

/// A type-0 configuration space.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    bars: [Option<Bar>; NUM_BARS],
}

impl ConfigSpace {
    /// A header with the given identity; command (I/O, memory, bus master, INTx disable) and
    /// the interrupt line are writable, the rest read-only.
    pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, revision: u8) -> ConfigSpace {
        let mut space = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bars: [None; NUM_BARS],
        };
        space.set_u16(VENDOR_ID, vendor);
        space.set_u16(VENDOR_ID + 2, device);
        space.set_u32(
            CLASS_REVISION,
            u32::from(class) << 24 | u32::from(subclass) << 16 | u32::from(revision),
        );
        let command_mask = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        space.writable[COMMAND..COMMAND + 2].copy_from_slice(&command_mask.to_le_bytes());
        space.writable[INTERRUPT_LINE] = 0xff;
        space
    }

    /// A shadow of a real device's configuration space: its identity, status and capability
    /// chain as read, BARs cleared (the caller declares them), and the usual writable bits.
    pub fn from_device(raw: &[u8; CONFIG_SIZE]) -> ConfigSpace {
        let mut space = ConfigSpace::new(0, 0, 0, 0, 0);
        space.bytes = *raw;
        space.bytes[BAR0..BAR0 + 4 * NUM_BARS].fill(0);
        // The expansion ROM is not passed through.
        space.bytes[0x30..0x34].fill(0);
        space.set_u16(COMMAND, 0);
        space
    }

    /// The offset of the first capability with `id`, following the chain from 0x34.
    pub fn find_capability(&self, id: u8) -> Option<usize> {
        if self.u16_at(STATUS) & STATUS_CAPABILITIES == 0 {
            return None;
        }
        let mut offset = usize::from(self.bytes[CAPABILITIES_POINTER] & !3);
        // A chain has at most 48 entries in 256 bytes; a longer one loops.
        for _ in 0..48 {
            if offset < FIRST_CAPABILITY || offset + 2 > CONFIG_SIZE {
                return None;
            }
            if self.bytes[offset] == id {
                return Some(offset);
            }
            offset = usize::from(self.bytes[offset + 1] & !3);
        }
        None
    }

    /// Makes the bits set in `mask` writable from `offset` on.
    pub fn make_writable(&mut self, offset: usize, mask: &[u8]) {
        for (w, m) in self.writable[offset..].iter_mut().zip(mask) {
            *w |= m;
        }
    }

    /// Declares BAR `index`; a 64-bit BAR also takes `index + 1`.
    pub fn add_bar(&mut self, index: usize, bar: Bar) -> Result<(), ConfigSpaceError> {
        let bad = |reason| ConfigSpaceError::BadBar { index, reason };
        let slots = if bar.kind == BarKind::Mmio64 { 2 } else { 1 };
        if index + slots > NUM_BARS {
            return Err(bad("past the last BAR"));
        }
        if (index..index + slots).any(|i| self.bars[i].is_some() || self.is_upper_half(i)) {
            return Err(bad("already declared"));
        }
        let min = if bar.kind == BarKind::Io { 4 } else { 16 };
        if !bar.size.is_power_of_two() || bar.size < min {
            return Err(bad(
                "size must be a power of two of at least 16 (4 for I/O)",
            ));
        }
        if bar.kind != BarKind::Mmio64 && bar.size > 1 << 31 {
            return Err(bad("too large for a 32-bit BAR"));
        }
        let flags: u32 = match bar.kind {
            BarKind::Io => 0x1,
            BarKind::Mmio32 => u32::from(bar.prefetchable) << 3,
            BarKind::Mmio64 => 0x4 | u32::from(bar.prefetchable) << 3,
        };
        let low_flag_bits: u32 = if bar.kind == BarKind::Io { 0x3 } else { 0xf };
        let mask = !(bar.size - 1);
        let reg = BAR0 + index * 4;
        self.set_u32(reg, flags);
        self.writable[reg..reg + 4]
            .copy_from_slice(&(low_half(mask) & !low_flag_bits).to_le_bytes());
        if bar.kind == BarKind::Mmio64 {
            self.writable[reg + 4..reg + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0 && matches!(self.bars[index - 1], Some(b) if b.kind == BarKind::Mmio64)
    }

    /// Reads the aligned 32-bit register holding byte `offset`.
    pub fn read_u32(&self, offset: usize) -> u32 {
        let reg = (offset & !3).min(CONFIG_SIZE - 4);
        u32::from_le_bytes([
            self.bytes[reg],
            self.bytes[reg + 1],
            self.bytes[reg + 2],
            self.bytes[reg + 3],
        ])
    }

    /// Writes `data` at byte `offset` through the write masks; out-of-range bytes are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                break;
            }
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (value & mask);
        }
    }

    /// The 16-bit value at `offset`.
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// BAR `index`'s shape, if declared.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` decodes, once the guest has programmed it (zero means not).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let reg = BAR0 + index * 4;
        let low = u64::from(self.read_u32(reg));
        let address = match bar.kind {
            BarKind::Io => low & !0x3,
            BarKind::Mmio32 => low & !0xf,
            BarKind::Mmio64 => (u64::from(self.read_u32(reg + 4)) << 32) | (low & !0xf),
        };
        (address != 0).then_some(address)
    }

    /// Places BAR `index` at `address`, as the VMM does before boot or when restoring.
    pub fn set_bar_address(&mut self, index: usize, address: u64) {
        if let Some(bar) = self.bar(index) {
            let reg = BAR0 + index * 4;
            let flags = self.read_u32(reg) & if bar.kind == BarKind::Io { 0x3 } else { 0xf };
            self.set_u32(reg, low_half(address & !(bar.size - 1)) | flags);
            if bar.kind == BarKind::Mmio64 {
                self.set_u32(reg + 4, (address >> 32) as u32);
            }
        }
    }

    /// Sets bytes without masks (device-side state such as a capability's read-only fields).
    pub fn set_raw(&mut self, offset: usize, data: &[u8]) {
        let end = (offset + data.len()).min(CONFIG_SIZE);
        self.bytes[offset..end].copy_from_slice(&data[..end - offset]);
    }

    /// All 256 bytes, for the saved state.
    pub fn bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.bytes
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }
}

/// The low 32 bits of a 64-bit BAR value, for its first register; the high half goes in the
/// next register of a 64-bit BAR and is dropped by a 32-bit one.
#[allow(clippy::cast_possible_truncation)] // Keeping only the low half is the point.
fn low_half(value: u64) -> u32 {
    value as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(0x1234, 0x11e8, 0x00, 0xff, 0x10)
    }

    #[test]
    fn identity_is_read_only() {
        let mut s = space();
        assert_eq!(s.read_u32(VENDOR_ID), 0x11e8_1234);
        s.write(VENDOR_ID, &[0xff; 4]);
        assert_eq!(s.read_u32(VENDOR_ID), 0x11e8_1234);
        assert_eq!(s.read_u32(CLASS_REVISION), 0x00ff_0010);
    }

    #[test]
    fn command_keeps_only_its_writable_bits() {
        let mut s = space();
        s.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(
            s.command(),
            COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
        );
    }

    #[test]
    fn bar_sizing_handshake() {
        let mut s = space();
        s.add_bar(
            0,
            Bar {
                kind: BarKind::Mmio32,
                size: 1 << 20,
                prefetchable: false,
            },
        )
        .unwrap();
        s.write(BAR0, &[0xff; 4]);
        assert_eq!(s.read_u32(BAR0), 0xfff0_0000);
        s.write(BAR0, &0xc010_0000u32.to_le_bytes());
        assert_eq!(s.bar_address(0), Some(0xc010_0000));
        // Low bits below the size are not writable.
        s.write(BAR0, &0xc010_1234u32.to_le_bytes());
        assert_eq!(s.bar_address(0), Some(0xc010_0000));
    }

    #[test]
    fn io_bar_keeps_its_flag() {
        let mut s = space();
        s.add_bar(
            1,
            Bar {
                kind: BarKind::Io,
                size: 0x20,
                prefetchable: false,
            },
        )
        .unwrap();
        s.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(s.read_u32(BAR0 + 4), 0xffff_ffe1);
    }

    #[test]
    fn bar_64_bit_spans_two_registers() {
        let mut s = space();
        s.add_bar(
            2,
            Bar {
                kind: BarKind::Mmio64,
                size: 1 << 33,
                prefetchable: true,
            },
        )
        .unwrap();
        s.write(BAR0 + 8, &[0xff; 4]);
        s.write(BAR0 + 12, &[0xff; 4]);
        assert_eq!(s.read_u32(BAR0 + 8), 0x0000_000c);
        assert_eq!(s.read_u32(BAR0 + 12), 0xffff_fffe);
        s.set_bar_address(2, 0x100_0000_0000);
        assert_eq!(s.bar_address(2), Some(0x100_0000_0000));
        assert!(matches!(
            s.add_bar(
                3,
                Bar {
                    kind: BarKind::Mmio32,
                    size: 16,
                    prefetchable: false
                }
            ),
            Err(ConfigSpaceError::BadBar { index: 3, .. })
        ));
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut s = space();
        let bar = |kind, size| Bar {
            kind,
            size,
            prefetchable: false,
        };
        assert!(s.add_bar(6, bar(BarKind::Mmio32, 16)).is_err());
        assert!(s.add_bar(5, bar(BarKind::Mmio64, 16)).is_err());
        assert!(s.add_bar(0, bar(BarKind::Mmio32, 24)).is_err());
        assert!(s.add_bar(0, bar(BarKind::Mmio32, 1 << 32)).is_err());
        s.add_bar(0, bar(BarKind::Mmio32, 16)).unwrap();
        assert!(s.add_bar(0, bar(BarKind::Mmio32, 16)).is_err());
    }

    #[test]
    fn a_device_shadow_keeps_identity_and_capabilities_and_clears_bars() {
        // MSI at 0x40 (message control 0x0080: 64-bit addresses), then PCI Express at 0x50.
        let mut raw = *space().bytes();
        raw[STATUS] |= u8::try_from(STATUS_CAPABILITIES).unwrap();
        raw[CAPABILITIES_POINTER] = 0x40;
        raw[0x40..0x43].copy_from_slice(&[0x05, 0x50, 0x80]);
        raw[0x50] = 0x10;
        raw[BAR0..BAR0 + 4].copy_from_slice(&0xfebf_0000u32.to_le_bytes());
        let shadow = ConfigSpace::from_device(&raw);
        assert_eq!(shadow.read_u32(VENDOR_ID), 0x11e8_1234);
        assert_eq!(shadow.read_u32(BAR0), 0);
        assert_eq!(shadow.find_capability(0x05), Some(0x40));
        assert_eq!(shadow.find_capability(0x10), Some(0x50));
        assert_eq!(shadow.find_capability(0x11), None);

        // MSI: control enable, address and data become writable.
        let mut shadow = shadow;
        shadow.make_writable(0x42, &[1, 0]);
        shadow.write(0x42, &[0xff, 0xff]);
        assert_eq!(shadow.u16_at(0x42), 0x0081);
    }

    #[test]
    fn a_looping_capability_chain_ends() {
        let mut raw = *space().bytes();
        raw[STATUS] |= u8::try_from(STATUS_CAPABILITIES).unwrap();
        raw[CAPABILITIES_POINTER] = 0x40;
        raw[0x40] = 0x09;
        raw[0x41] = 0x40;
        assert_eq!(ConfigSpace::from_device(&raw).find_capability(0x05), None);
    }
}
