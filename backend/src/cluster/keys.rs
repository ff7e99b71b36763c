//! The keys of the layout in the [module doc](super), relative to the prefix. Names become one
//! key segment each, so a name can never reach into another part of the tree.

use super::EtcdError;

/// `cluster`: the cluster's identity, created once.
pub const CLUSTER: &str = "cluster";
/// Prefix of the node registrations, for [`Etcd::list`](super::Etcd::list).
pub const NODES: &str = "nodes/";
/// Prefix of the volume metadata.
pub const VOLUMES: &str = "volumes/";
/// Prefix of the volume id index.
pub const VOLUME_IDS: &str = "volume-ids/";
/// Prefix of the operators' decisions.
pub const AUDIT: &str = "audit/";
/// Prefix of the owners' published volume status (attached to the owner's lease).
pub const STATUS: &str = "status/";

/// Longest name accepted as a key segment.
pub const SEGMENT_BYTES_MAX: usize = 255;

/// `nodes/<name>`.
pub fn node(name: &str) -> Result<String, EtcdError> {
    Ok(format!("{NODES}{}", segment("node name", name)?))
}

/// `volumes/<name>`.
pub fn volume(name: &str) -> Result<String, EtcdError> {
    Ok(format!("{VOLUMES}{}", segment("volume name", name)?))
}

/// `status/<name>`: what the volume's owner publishes about it (phase, resync progress).
pub fn status(name: &str) -> Result<String, EtcdError> {
    Ok(format!("{STATUS}{}", segment("volume name", name)?))
}

/// `volume-ids/<id>`, the id in decimal.
pub fn volume_id(id: u64) -> String {
    format!("{VOLUME_IDS}{id}")
}

/// `audit/<volume>/`, the prefix of one volume's audit records.
pub fn audit_prefix(volume: &str) -> Result<String, EtcdError> {
    Ok(format!("{AUDIT}{}/", segment("volume name", volume)?))
}

/// `audit/<volume>/<ts>`; `ts` is chosen by the caller (a sortable timestamp).
pub fn audit(volume: &str, ts: &str) -> Result<String, EtcdError> {
    Ok(format!("{}{}", audit_prefix(volume)?, segment("audit timestamp", ts)?))
}

/// The last segment of `key` if it lies directly under `prefix` (e.g. the node name of a key
/// listed under [`NODES`]).
pub fn name_under<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(prefix).filter(|rest| !rest.is_empty() && !rest.contains('/'))
}

/// The id of a `volume-ids/<id>` key.
pub fn parse_volume_id(key: &str) -> Option<u64> {
    let digits = name_under(VOLUME_IDS, key)?;
    // Only the canonical form `volume_id` writes: no sign, no leading zeros.
    if digits.starts_with(['+', '-']) || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    digits.parse().ok()
}

/// One key segment: non-empty, printable ASCII without space or `/`, not `.` or `..`.
fn segment<'a>(what: &str, s: &'a str) -> Result<&'a str, EtcdError> {
    let bad = |why: &str| Err(EtcdError::InvalidRequest(format!("{what} {s:?}: {why}")));
    if s.is_empty() || s == "." || s == ".." {
        return bad("empty, '.' or '..'");
    }
    if s.len() > SEGMENT_BYTES_MAX {
        return bad("longer than 255 bytes");
    }
    if !s.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return bad("only printable ASCII without spaces or '/' is allowed");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout() {
        assert_eq!(node("n1").unwrap(), "nodes/n1");
        assert_eq!(volume("vol0").unwrap(), "volumes/vol0");
        assert_eq!(volume_id(42), "volume-ids/42");
        assert_eq!(status("vol0").unwrap(), "status/vol0");
        assert_eq!(audit("vol0", "2026-01-02T03:04:05Z").unwrap(), "audit/vol0/2026-01-02T03:04:05Z");
        assert_eq!(audit_prefix("vol0").unwrap(), "audit/vol0/");
    }

    #[test]
    fn names_cannot_escape_their_segment() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é", &"x".repeat(256)] {
            assert!(node(bad).is_err(), "{bad:?}");
            assert!(volume(bad).is_err(), "{bad:?}");
            assert!(status(bad).is_err(), "{bad:?}");
            assert!(audit("v", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_and_ids_parse_back() {
        assert_eq!(name_under(NODES, "nodes/n1"), Some("n1"));
        assert_eq!(name_under(NODES, "nodes/"), None);
        assert_eq!(name_under(NODES, "nodes/a/b"), None);
        assert_eq!(name_under(NODES, "volumes/a"), None);
        assert_eq!(parse_volume_id(&volume_id(u64::MAX)), Some(u64::MAX));
        for bad in ["volume-ids/007", "volume-ids/-1", "volume-ids/+1", "volume-ids/x", "volume-ids/", "nodes/1"] {
            assert_eq!(parse_volume_id(bad), None, "{bad}");
        }
        assert_eq!(parse_volume_id("volume-ids/0"), Some(0));
    }
}
