//! A saved state comes from a memfd or a file another process wrote: decoding and checking it
//! must refuse anything malformed without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use luvmm_resources::state::{decode, wrap_body, VmState, HEADER_LEN};

fn decode_and_check(blob: &[u8]) {
    if let Ok(state) = decode::<VmState>(blob) {
        let sizes: Vec<u64> = state.memory.regions.iter().map(|r| r.size).collect();
        let _ = state.check_against(&sizes);
    }
}

fuzz_target!(|blob: &[u8]| {
    // As found: the container (magic, version, length, CRC) must refuse any damage.
    decode_and_check(blob);
    // The same body in an intact container, so the typed decoding behind the CRC is reached.
    if let Some(body) = blob.get(HEADER_LEN..) {
        decode_and_check(&wrap_body(body));
    }
});
