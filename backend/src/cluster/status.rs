//! What a volume's owner publishes about it under `status/<name>`, attached to the owner's
//! lease (so it disappears with the owner): the owner's phase, the extents whose writes wait,
//! and the progress of each resync or rebuild. `volume info` and `cluster status` on any node
//! read it for volumes owned elsewhere.
//!
//! ```json
//! {"node":"n1","phase":"serving","generation":4,"epoch":9,"suspended_extents":[],
//!  "unreconciled_regions":0,"region_bytes":1048576,"updated_unix_s":1795317910,
//!  "syncs":[{"node":"n2","extent":3,"rebuild":true,"regions_done":120,"regions_total":1024,
//!            "bytes_done":125829120,"rate_bytes_per_s":67108864}]}
//! ```
//!
//! The value comes from another daemon through etcd: it is decoded with bounds and a
//! malformed one is reported, never trusted.

use serde::{Deserialize, Serialize};

/// A status value is a few hundred bytes per resync; anything much larger is not ours.
pub const STATUS_BYTES_MAX: usize = 256 << 10;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedStatus {
    /// The owner that published it.
    pub node: String,
    /// `attaching`, `serving`, `detaching`, `detached` or `fenced: REASON`.
    pub phase: String,
    pub generation: u64,
    pub epoch: u32,
    /// Extents whose writes wait for members (fewer than min_replicas in sync, no recorded
    /// acceptance of the risk).
    pub suspended_extents: Vec<u32>,
    /// Regions written while members were failing, not yet reconciled.
    pub unreconciled_regions: u32,
    pub region_bytes: u64,
    /// When the owner last wrote it (it writes only on a change).
    pub updated_unix_s: u64,
    pub syncs: Vec<PublishedSync>,
}

/// One resync (a stale member catching up on its dirty regions) or rebuild (a new member
/// copied in full) of one extent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedSync {
    /// The member being brought in sync.
    pub node: String,
    pub extent: u32,
    pub rebuild: bool,
    pub regions_done: u32,
    pub regions_total: u32,
    pub bytes_done: u64,
    /// Measured by the owner over its last publishing intervals; `None` before two samples.
    pub rate_bytes_per_s: Option<u64>,
}

impl PublishedSync {
    /// Seconds until done at the measured rate; `None` without a rate.
    pub fn eta_s(&self, region_bytes: u64) -> Option<u64> {
        let rate = self.rate_bytes_per_s.filter(|&r| r > 0)?;
        let left = u64::from(self.regions_total.saturating_sub(self.regions_done)).saturating_mul(region_bytes);
        Some(left.div_ceil(rate))
    }

    /// Done, in percent (0..=100).
    pub fn percent(&self) -> u32 {
        if self.regions_total == 0 {
            return 100;
        }
        let done = u64::from(self.regions_done.min(self.regions_total));
        (done * 100 / u64::from(self.regions_total)) as u32
    }
}

impl PublishedStatus {
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data with string keys: serialisation cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a value read from etcd; anything but one well-formed status is an error.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > STATUS_BYTES_MAX {
            return Err(format!("{} bytes, more than a status can be ({STATUS_BYTES_MAX})", bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("malformed volume status: {e}"))
    }

    /// The same status apart from when it was written: publishing skips a write that would
    /// only move the timestamp.
    pub fn same_as(&self, other: &Self) -> bool {
        Self { updated_unix_s: 0, ..self.clone() } == Self { updated_unix_s: 0, ..other.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PublishedStatus {
        PublishedStatus {
            node: "n1".into(),
            phase: "serving".into(),
            generation: 4,
            epoch: 9,
            suspended_extents: vec![2],
            unreconciled_regions: 0,
            region_bytes: 1 << 20,
            updated_unix_s: 10,
            syncs: vec![PublishedSync {
                node: "n2".into(),
                extent: 3,
                rebuild: true,
                regions_done: 256,
                regions_total: 1024,
                bytes_done: 256 << 20,
                rate_bytes_per_s: Some(64 << 20),
            }],
        }
    }

    #[test]
    fn round_trip_progress_and_eta() {
        let s = sample();
        assert_eq!(PublishedStatus::from_json(&s.to_json()).unwrap(), s);
        let sync = &s.syncs[0];
        assert_eq!(sync.percent(), 25);
        assert_eq!(sync.eta_s(1 << 20), Some(12), "768 MiB left at 64 MiB/s");
        let no_rate = PublishedSync { rate_bytes_per_s: None, ..sync.clone() };
        assert_eq!(no_rate.eta_s(1 << 20), None);
        let empty = PublishedSync { regions_total: 0, ..sync.clone() };
        assert_eq!(empty.percent(), 100);
        let over = PublishedSync { regions_done: 2000, ..sync.clone() };
        assert_eq!((over.percent(), over.eta_s(1 << 20)), (100, Some(0)));
    }

    #[test]
    fn only_the_timestamp_changing_is_no_change() {
        let a = sample();
        assert!(a.same_as(&PublishedStatus { updated_unix_s: 99, ..a.clone() }));
        assert!(!a.same_as(&PublishedStatus { phase: "fenced: x".into(), ..a.clone() }));
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in [&b""[..], b"null", b"{}", b"{\"node\":1}", &vec![b' '; STATUS_BYTES_MAX + 1]] {
            assert!(
                PublishedStatus::from_json(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(&bad[..bad.len().min(20)])
            );
        }
        let mut extra: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        extra["x"] = 1.into();
        assert!(PublishedStatus::from_json(extra.to_string().as_bytes()).is_err());
    }
}
