//! A JSON config file from the operator: parsing and validating it must name a bad field, not
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use luvmm_resources::config::{HostLimits, VmConfig};

fuzz_target!(|text: &[u8]| {
    if let Ok(config) = serde_json::from_slice::<VmConfig>(text) {
        let _ = config.validate(&HostLimits {
            max_vcpus: 255,
            ram_bytes: u64::MAX,
            phys_addr_bits: 52,
        });
    }
});
