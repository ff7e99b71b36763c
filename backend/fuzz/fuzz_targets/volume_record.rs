//! Volume metadata files: torn or edited bytes become a valid record or a clear error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = backend::control::store::decode_record(data, "vm") {
        assert_eq!(record.validate(), Ok(()));
        let bytes = serde_json::to_vec(&record).expect("records always encode");
        assert_eq!(backend::control::store::decode_record(&bytes, "vm"), Ok(record));
    }
});
