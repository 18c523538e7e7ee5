//! Bytes from an API client: parsing the request and routing it (which parses its JSON body)
//! must answer anything with a response, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use luvmm_vmm::api::http::parse_request;
use luvmm_vmm::api::route;

fuzz_target!(|bytes: &[u8]| {
    // Every prefix is what the server sees while a request arrives.
    for end in [bytes.len() / 2, bytes.len()] {
        if let Ok(Some(request)) = parse_request(&bytes[..end]) {
            let _ = route(&request);
        }
    }
});
