//! Feeds arbitrary bytes to the frame decoder, as a peer on the network can.
//! Whatever decodes must re-encode to the same bytes (minor version aside),
//! and a stream of frames must be walked without panics or over-reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::wire::{decode, decode_body, decode_header, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // Walk the input as a stream of frames, like the tcp transport's reader.
    for _ in 0..64 {
        match decode(rest) {
            Ok((msg, used)) => {
                assert!(used <= rest.len() && used >= HEADER_LEN);
                let mut again = msg.to_vec().expect("a decoded message re-encodes");
                again[3] = rest[3];
                assert_eq!(&again[..], &rest[..again.len()]);
                assert_eq!(used, again.len() + msg.payload_len());
                rest = &rest[used..];
            }
            Err(_) => break,
        }
    }
    // The split path (header, the prefix that tells the fixed part's
    // length, then the fixed part only) agrees with `decode`.
    if let Ok(h) = decode_header(data) {
        let body = &data[HEADER_LEN..];
        let prefix = &body[..h.prefix_len().min(body.len())];
        let split = h.fixed_len(prefix).and_then(|fixed| {
            assert!(fixed <= h.body_len as usize);
            decode_body(&h, &body[..fixed.min(body.len())])
        });
        if let Ok((m, _)) = decode(data) {
            assert_eq!(split.as_ref().ok(), Some(&m));
        }
    }
});
