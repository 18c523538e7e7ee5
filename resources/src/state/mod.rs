//! The versioned state that crosses an update.
//!
//! A state blob is a fixed header followed by a self-describing serde body:
//!
//! | offset | size | field                                        |
//! |--------|------|----------------------------------------------|
//! | 0      | 8    | magic `LUVMMSTA`                             |
//! | 8      | 2    | format major (little endian)                 |
//! | 10     | 2    | format minor                                 |
//! | 12     | 4    | reserved, zero                               |
//! | 16     | 8    | body length in bytes                         |
//! | 24     | 8    | CRC-64/ECMA-182 of the body                  |
//! | 32     | n    | body: JSON                                   |
//!
//! The body is JSON so that a newer luvmm can read what an older one wrote across a kernel
//! update: fields added later carry `#[serde(default)]` and bump the minor version, and a reader
//! ignores fields it does not know, so it reads any minor of its major; anything incompatible
//! bumps the major version, which older readers refuse.

mod vm;

pub use vm::{
    check_layout, DevicesState, DmaMapping, GuestControlState, IntxState, IommuState, KvmVmState,
    MsiState, MsixState, PassthroughState, SerialRegisters, StateMismatch, UpdateRecord, VcpuState,
    VfioBackend, VmState, DEVICE_TOKEN_BASE, RAM_TOKEN_BASE, STATE_TOKEN,
};

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use crc::{Crc, CRC_64_ECMA_182};
use serde::{de::DeserializeOwned, Serialize};

/// First eight bytes of every state blob.
pub const STATE_MAGIC: [u8; 8] = *b"LUVMMSTA";

/// Bytes as hex, one pair per byte: `19 be 6e`.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
/// Incompatible format changes bump this.
pub const FORMAT_MAJOR: u16 = 1;
/// Backward-compatible additions bump this.
pub const FORMAT_MINOR: u16 = 5;
/// Header length in bytes.
pub const HEADER_LEN: usize = 32;
/// Largest body accepted: a real state is tens of KiB per vCPU, so anything near this is damage.
pub const MAX_BODY_LEN: u64 = 64 << 20;

const CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_ECMA_182);

/// Why a state blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Fewer bytes than the header or the header's body length promise.
    #[error("state truncated: {len} bytes, expected {expected}")]
    Truncated { len: usize, expected: u64 },
    /// More bytes than the header says.
    #[error("state has {extra} bytes after its body")]
    TrailingBytes { extra: usize },
    /// Not a luvmm state at all.
    #[error(
        "not a luvmm state: it starts with bytes {}, a luvmm state with \"LUVMMSTA\"",
        hex(found)
    )]
    BadMagic { found: [u8; 8] },
    /// Written by a format this luvmm cannot read.
    #[error(
        "state format {major}.{minor} is not supported (this luvmm reads format {FORMAT_MAJOR}.x)"
    )]
    UnsupportedVersion { major: u16, minor: u16 },
    /// The reserved header field is not zero.
    #[error("state header reserved field is {value:#x}, expected 0")]
    ReservedNotZero { value: u32 },
    /// The body length is beyond [`MAX_BODY_LEN`].
    #[error("state body of {len} bytes exceeds the {MAX_BODY_LEN}-byte cap")]
    TooLarge { len: u64 },
    /// The body does not match its checksum.
    #[error("state corrupted: CRC {found:#018x}, header says {expected:#018x}")]
    Checksum { expected: u64, found: u64 },
    /// The body passed its checksum but does not decode into the expected type.
    #[error("state body does not decode: {reason}")]
    Body { reason: String },
    /// Encoding failed (a serializer bug; plain data always encodes).
    #[error("state does not encode: {reason}")]
    Encode { reason: String },
}

/// A state blob could not be read from its file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read it")]
    Io(#[source] std::io::Error),
    #[error("it is {len} bytes, more than the format allows")]
    TooLarge { len: u64 },
}

/// Reads a state blob from the start of `file`: `len` bytes, or the whole file, never more
/// than a header and the largest body the format accepts.
pub fn read_blob(file: &File, len: Option<u64>) -> Result<Vec<u8>, ReadError> {
    let len = match len {
        Some(len) => len,
        None => file.metadata().map_err(ReadError::Io)?.len(),
    };
    if len > HEADER_LEN as u64 + MAX_BODY_LEN {
        return Err(ReadError::TooLarge { len });
    }
    let mut file = file;
    file.seek(SeekFrom::Start(0)).map_err(ReadError::Io)?;
    let mut blob = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(len)
        .read_to_end(&mut blob)
        .map_err(ReadError::Io)?;
    Ok(blob)
}

/// Encodes `value` as a complete state blob with the current format version.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StateError> {
    let body = serde_json::to_vec(value).map_err(|e| StateError::Encode {
        reason: e.to_string(),
    })?;
    Ok(wrap_body(&body))
}

/// Puts `body` behind a current-version header with its length and CRC: what `encode` does
/// after serializing, for tools (and fuzzers) that hold a body already.
pub fn wrap_body(body: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(HEADER_LEN + body.len());
    blob.extend_from_slice(&STATE_MAGIC);
    blob.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
    blob.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
    blob.extend_from_slice(&0u32.to_le_bytes());
    blob.extend_from_slice(&(body.len() as u64).to_le_bytes());
    blob.extend_from_slice(&CRC64.checksum(body).to_le_bytes());
    blob.extend_from_slice(body);
    blob
}

/// Checks the header, length and checksum of `blob`, then decodes its body.
pub fn decode<T: DeserializeOwned>(blob: &[u8]) -> Result<T, StateError> {
    let body = checked_body(blob)?;
    serde_json::from_slice(body).map_err(|e| StateError::Body {
        reason: e.to_string(),
    })
}

fn checked_body(blob: &[u8]) -> Result<&[u8], StateError> {
    let header = blob.get(..HEADER_LEN).ok_or(StateError::Truncated {
        len: blob.len(),
        expected: HEADER_LEN as u64,
    })?;
    let magic: [u8; 8] = field(header, 0);
    if magic != STATE_MAGIC {
        return Err(StateError::BadMagic { found: magic });
    }
    let major = u16::from_le_bytes(field(header, 8));
    let minor = u16::from_le_bytes(field(header, 10));
    // A newer minor only adds fields, which this reader ignores: only a major differs.
    if major != FORMAT_MAJOR {
        return Err(StateError::UnsupportedVersion { major, minor });
    }
    let reserved = u32::from_le_bytes(field(header, 12));
    if reserved != 0 {
        return Err(StateError::ReservedNotZero { value: reserved });
    }
    let len = u64::from_le_bytes(field(header, 16));
    let body_len = usize::try_from(len)
        .ok()
        .filter(|_| len <= MAX_BODY_LEN)
        .ok_or(StateError::TooLarge { len })?;
    let expected_crc = u64::from_le_bytes(field(header, 24));
    let end = HEADER_LEN + body_len;
    if blob.len() < end {
        return Err(StateError::Truncated {
            len: blob.len(),
            expected: end as u64,
        });
    }
    if blob.len() > end {
        return Err(StateError::TrailingBytes {
            extra: blob.len() - end,
        });
    }
    let body = &blob[HEADER_LEN..];
    let found = CRC64.checksum(body);
    if found != expected_crc {
        return Err(StateError::Checksum {
            expected: expected_crc,
            found,
        });
    }
    Ok(body)
}

/// Copies `N` header bytes at `offset`; callers pass offsets inside the 32-byte header.
fn field<const N: usize>(header: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&header[offset..offset + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        words: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm-0".into(),
            words: (0..64).collect(),
        }
    }

    fn blob() -> Vec<u8> {
        encode(&sample()).unwrap()
    }

    #[test]
    fn round_trip() {
        assert_eq!(decode::<Sample>(&blob()).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_refused() {
        let full = blob();
        for len in [0, 7, HEADER_LEN - 1, HEADER_LEN, full.len() - 1] {
            assert!(
                matches!(
                    decode::<Sample>(&full[..len]),
                    Err(StateError::Truncated { .. })
                ),
                "length {len}"
            );
        }
    }

    #[test]
    fn a_flipped_body_byte_fails_the_checksum() {
        let mut bad = blob();
        let last = bad.len() - 2;
        bad[last] ^= 0x01;
        assert!(matches!(
            decode::<Sample>(&bad),
            Err(StateError::Checksum { .. })
        ));
    }

    #[test]
    fn a_flipped_length_byte_is_refused() {
        let mut bad = blob();
        bad[16] ^= 0x01;
        assert!(matches!(
            decode::<Sample>(&bad),
            Err(StateError::Truncated { .. }) | Err(StateError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn wrong_magic_is_refused() {
        let mut bad = blob();
        bad[0] = b'X';
        assert!(matches!(
            decode::<Sample>(&bad),
            Err(StateError::BadMagic { .. })
        ));
    }

    #[test]
    fn a_newer_minor_is_read_and_a_newer_major_refused() {
        // A newer minor with a field this reader does not know.
        #[derive(Serialize)]
        struct Newer {
            name: String,
            words: Vec<u64>,
            added_later: Vec<u8>,
        }
        let mut newer_minor = encode(&Newer {
            name: "vm-0".into(),
            words: (0..64).collect(),
            added_later: vec![1, 2],
        })
        .unwrap();
        newer_minor[10..12].copy_from_slice(&(FORMAT_MINOR + 1).to_le_bytes());
        assert_eq!(decode::<Sample>(&newer_minor).unwrap(), sample());
        let mut newer_major = blob();
        newer_major[8..10].copy_from_slice(&(FORMAT_MAJOR + 1).to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&newer_major),
            Err(StateError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn trailing_bytes_and_oversize_are_refused() {
        let mut longer = blob();
        longer.push(0);
        assert_eq!(
            decode::<Sample>(&longer).unwrap_err(),
            StateError::TrailingBytes { extra: 1 }
        );
        let mut huge = blob();
        huge[16..24].copy_from_slice(&(MAX_BODY_LEN + 1).to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&huge),
            Err(StateError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_valid_blob_of_another_type_is_a_body_error() {
        let other = encode(&vec![1u8, 2, 3]).unwrap();
        assert!(matches!(
            decode::<Sample>(&other),
            Err(StateError::Body { .. })
        ));
    }
}
