//! A volume's status as another daemon published it in etcd: any bytes become a status or an
//! error, and a status shows without panicking (progress, ETA).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(status) = backend::cluster::PublishedStatus::from_json(data) {
        for sync in &status.syncs {
            assert!(sync.percent() <= 100);
            let _ = sync.eta_s(status.region_bytes);
        }
        let bytes = status.to_json();
        assert_eq!(backend::cluster::PublishedStatus::from_json(&bytes).expect("re-decode"), status);
    }
});
