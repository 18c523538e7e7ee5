//! The MSI-X table and its capability, emulated: the guest's vector table lives here, never in
//! the device (the host kernel programs the real one through VFIO).

/// MSI-X capability id.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: all vectors masked.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_SIZE: u64 = 16;
const VECTOR_MASKED: u32 = 1;

/// Where the table and pending-bit array are, from the capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    pub vectors: u16,
    pub table_bar: usize,
    pub table_offset: u64,
    pub pba_bar: usize,
    pub pba_offset: u64,
}

impl MsixLayout {
    /// Decodes the capability's message control, table and PBA words.
    pub fn decode(control: u16, table: u32, pba: u32) -> MsixLayout {
        MsixLayout {
            vectors: (control & 0x7ff) + 1,
            table_bar: (table & 0x7) as usize,
            table_offset: u64::from(table & !0x7),
            pba_bar: (pba & 0x7) as usize,
            pba_offset: u64::from(pba & !0x7),
        }
    }

    /// The table's offset inside its BAR if `[offset, offset + len)` of BAR `bar` is in it.
    pub fn table_offset_of(&self, bar: usize, offset: u64, len: usize) -> Option<u64> {
        let end = self.table_offset + u64::from(self.vectors) * ENTRY_SIZE;
        (bar == self.table_bar && offset >= self.table_offset && offset + len as u64 <= end)
            .then(|| offset - self.table_offset)
    }

    /// The pending-bit array's offset inside its BAR if `[offset, offset + len)` of BAR `bar`
    /// is in it. The array has one bit per vector, in whole qwords.
    pub fn pba_offset_of(&self, bar: usize, offset: u64, len: usize) -> Option<usize> {
        let end = self.pba_offset + u64::from(self.vectors).div_ceil(64) * 8;
        (bar == self.pba_bar && offset >= self.pba_offset && offset + len as u64 <= end)
            .then(|| offset - self.pba_offset)
            .and_then(|at| usize::try_from(at).ok())
    }
}

/// Fills `data`, read at byte `offset` of the pending-bit array, with one bit per vector:
/// set where `pending(vector)` says a message is held back by a mask.
pub fn read_pba(offset: usize, data: &mut [u8], pending: impl Fn(usize) -> bool) {
    for (i, byte) in data.iter_mut().enumerate() {
        let first = (offset + i) * 8;
        *byte = (0..8).fold(0, |bits, b| bits | (u8::from(pending(first + b)) << b));
    }
}

/// One vector: the message the guest programmed and its mask bit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixEntry {
    pub address: u64,
    pub data: u32,
    pub masked: bool,
}

/// The guest's MSI-X table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsixTable {
    /// Four dwords per vector: address low, address high, data, vector control.
    words: Vec<[u32; 4]>,
}

impl MsixTable {
    /// A table of `vectors` entries, each masked, as after reset.
    pub fn new(vectors: u16) -> MsixTable {
        MsixTable {
            words: vec![[0, 0, 0, VECTOR_MASKED]; usize::from(vectors)],
        }
    }

    /// A table of `vectors` entries holding the saved `words` (four per vector); entries the
    /// words do not cover stay masked, as after reset.
    pub fn from_words(vectors: u16, words: &[u32]) -> MsixTable {
        let mut table = MsixTable::new(vectors);
        for (entry, saved) in table.words.iter_mut().zip(words.chunks_exact(4)) {
            entry.copy_from_slice(saved);
        }
        table
    }

    /// Reads `data.len()` bytes (4 or 8, dword aligned) at `offset` in the table.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let value = self.word(offset + 4 * i as u64).copied().unwrap_or(0);
            let bytes = value.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// Writes 4 or 8 bytes at a dword-aligned `offset`; other accesses are ignored, as the
    /// PCI spec allows. Returns the vector written, if any.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<usize> {
        if !offset.is_multiple_of(4) || !(data.len() == 4 || data.len() == 8) {
            return None;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let mut value = [0u8; 4];
            value.copy_from_slice(chunk);
            if let Some(word) = self.word_mut(offset + 4 * i as u64) {
                *word = u32::from_le_bytes(value);
            }
        }
        let vector = (offset / ENTRY_SIZE) as usize;
        (vector < self.words.len()).then_some(vector)
    }

    /// Vector `index`, if it exists.
    pub fn entry(&self, index: usize) -> Option<MsixEntry> {
        self.words.get(index).map(|w| MsixEntry {
            address: u64::from(w[1]) << 32 | u64::from(w[0]),
            data: w[2],
            masked: w[3] & VECTOR_MASKED != 0,
        })
    }

    /// Every dword, vector by vector, for the saved state.
    pub fn words(&self) -> Vec<u32> {
        self.words.iter().flatten().copied().collect()
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the table has no vectors.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    fn word(&self, offset: u64) -> Option<&u32> {
        let entry = self.words.get((offset / ENTRY_SIZE) as usize)?;
        entry.get(((offset % ENTRY_SIZE) / 4) as usize)
    }

    fn word_mut(&mut self, offset: u64) -> Option<&mut u32> {
        let entry = self.words.get_mut((offset / ENTRY_SIZE) as usize)?;
        entry.get_mut(((offset % ENTRY_SIZE) / 4) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_start_masked() {
        let table = MsixTable::new(4);
        assert_eq!(table.len(), 4);
        assert!(table.entry(3).unwrap().masked);
        assert_eq!(table.entry(4), None);
    }

    #[test]
    fn dword_writes_program_a_vector() {
        let mut table = MsixTable::new(4);
        assert_eq!(table.write(16, &0xfee0_0000u32.to_le_bytes()), Some(1));
        assert_eq!(table.write(20, &0u32.to_le_bytes()), Some(1));
        assert_eq!(table.write(24, &0x4041u32.to_le_bytes()), Some(1));
        assert_eq!(table.write(28, &0u32.to_le_bytes()), Some(1));
        assert_eq!(
            table.entry(1),
            Some(MsixEntry {
                address: 0xfee0_0000,
                data: 0x4041,
                masked: false
            })
        );
        let mut word = [0u8; 4];
        table.read(24, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0x4041);
    }

    #[test]
    fn qword_writes_cover_two_dwords() {
        let mut table = MsixTable::new(2);
        let address: u64 = 0x1_fee0_1000;
        assert_eq!(table.write(0, &address.to_le_bytes()), Some(0));
        assert_eq!(table.entry(0).unwrap().address, address);
        let mut qword = [0u8; 8];
        table.read(0, &mut qword);
        assert_eq!(u64::from_le_bytes(qword), address);
    }

    #[test]
    fn unaligned_odd_sized_and_out_of_range_writes_are_ignored() {
        let mut table = MsixTable::new(1);
        let before = table.clone();
        assert_eq!(table.write(2, &[1, 2, 3, 4]), None);
        assert_eq!(table.write(0, &[1, 2]), None);
        assert_eq!(table.write(16, &[1, 2, 3, 4]), None);
        assert_eq!(table, before);
        let mut word = [0xffu8; 4];
        table.read(64, &mut word);
        assert_eq!(word, [0; 4]);
    }

    #[test]
    fn the_layout_decodes_and_bounds_the_table() {
        let layout = MsixLayout::decode(0x0003, 0x2000 | 2, 0x3000 | 2);
        assert_eq!(
            layout,
            MsixLayout {
                vectors: 4,
                table_bar: 2,
                table_offset: 0x2000,
                pba_bar: 2,
                pba_offset: 0x3000
            }
        );
        assert_eq!(layout.table_offset_of(2, 0x2010, 4), Some(0x10));
        assert_eq!(layout.table_offset_of(2, 0x203c, 4), Some(0x3c));
        assert_eq!(layout.table_offset_of(2, 0x2040, 4), None);
        assert_eq!(layout.table_offset_of(0, 0x2010, 4), None);
        assert_eq!(layout.pba_offset_of(2, 0x3000, 8), Some(0));
        assert_eq!(layout.pba_offset_of(2, 0x3004, 4), Some(4));
        assert_eq!(layout.pba_offset_of(2, 0x3008, 4), None);
        assert_eq!(layout.pba_offset_of(2, 0x2ffc, 4), None);
    }

    #[test]
    fn the_pba_has_one_bit_per_pending_vector() {
        let pending = |v: usize| v == 0 || v == 9 || v == 70;
        let mut qword = [0u8; 8];
        read_pba(0, &mut qword, pending);
        assert_eq!(u64::from_le_bytes(qword), 1 | 1 << 9);
        let mut word = [0u8; 4];
        read_pba(8, &mut word, pending);
        assert_eq!(u32::from_le_bytes(word), 1 << 6);
    }
}
