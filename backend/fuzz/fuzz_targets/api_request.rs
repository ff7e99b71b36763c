//! The daemon's API decoder: any bytes a local client sends become a request or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = backend::control::api::decode_request(data) {
        // A decoded request encodes back to something that decodes to the same request.
        let line = serde_json::to_vec(&request).expect("requests always encode");
        assert_eq!(backend::control::api::decode_request(&line).expect("re-decode"), request);
    }
});
