//! Cluster metadata: what etcd holds about nodes and volumes, as plain data.
//!
//! A volume's whole safety-relevant state is one document, [`VolumeMeta`], stored under one
//! etcd key and only ever replaced by a compare-and-swap on that key's `mod_revision`: owner,
//! generation, membership epoch, every extent's members and which of them are in sync. One
//! key per volume makes every membership change one atomic transaction, so two daemons racing
//! can never both win, and a reader always sees a consistent layout.
//!
//! ```json
//! {"format":1,"name":"vm1","id":1234,"size_bytes":1073741824,"block_size":512,
//!  "extent_bytes":268435456,"region_bytes":1048576,"replicas":3,"min_replicas":2,
//!  "queues":1,"serial":"vm1","read_only":false,"locality":"prefer","created_unix_s":0,
//!  "generation":4,"owner":"n1","epoch":9,
//!  "extents":[{"members":[{"node":"n1","state":"in_sync","incarnation":7},
//!                          {"node":"n2","state":"stale","incarnation":3},
//!                          {"node":"n3","state":"in_sync","incarnation":9}]}, ...],
//!  "risk_accepted":null}
//! ```

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The format this code writes; readers refuse others.
pub const META_FORMAT: u32 = 1;
/// Most replicas per extent.
pub const REPLICAS_MAX: u8 = 5;
/// Regions per extent are bounded so that an extent's dirty bitmap fits one message.
pub const REGIONS_PER_EXTENT_MAX: u64 = 4096;

/// A node's wire identity: derived from its name, so every daemon computes the same id for a
/// name without a registry. Never 0 (0 means "nobody" on the wire).
pub fn node_id(name: &str) -> u64 {
    let digest = Sha256::digest(name.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(id).max(1)
}

/// State of one replica of one extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Holds every acknowledged write: every write must be acknowledged by it.
    InSync,
    /// Missed writes: resynchronised from its dirty regions before it is in sync again.
    Stale,
    /// A new member (replacing a lost one): filled by a full copy before it is in sync.
    Rebuilding,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub node: String,
    pub state: MemberState,
    /// The replica incarnation (process start) the owner last confirmed in sync; 0 before
    /// any. A member that answers with another incarnation restarted since, and may have lost
    /// writes it acknowledged but had not flushed: it is not a source to copy from.
    #[serde(default)]
    pub incarnation: u64,
}

impl Member {
    pub fn new(node: &str, state: MemberState) -> Self {
        Self { node: node.to_owned(), state, incarnation: 0 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtentMeta {
    pub members: Vec<Member>,
}

impl ExtentMeta {
    pub fn in_sync(&self) -> impl Iterator<Item = &str> {
        self.members.iter().filter(|m| m.state == MemberState::InSync).map(|m| m.node.as_str())
    }

    pub fn in_sync_count(&self) -> usize {
        self.in_sync().count()
    }

    pub fn member(&self, node: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.node == node)
    }

    pub fn is_in_sync(&self, node: &str) -> bool {
        self.member(node).is_some_and(|m| m.state == MemberState::InSync)
    }
}

/// Where placement puts a volume's first replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    /// One member of every extent on the node the volume is created on, so its reads are local.
    #[default]
    Prefer,
    /// Capacity and failure domains only.
    None,
}

impl std::str::FromStr for Locality {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefer" => Ok(Self::Prefer),
            "none" => Ok(Self::None),
            other => Err(format!("unknown locality {other:?} (prefer or none)")),
        }
    }
}

/// An operator's recorded decision to let writes proceed with fewer than `min_replicas` in
/// sync (`hcblk volume accept-risk`). Cleared by the owner once the volume is whole again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskAcceptance {
    /// Who (user@host, as the CLI saw it).
    pub by: String,
    pub at_unix_s: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMeta {
    pub format: u32,
    pub name: String,
    /// Wire identity of the volume; random at create, never reused.
    pub id: u64,
    pub size_bytes: u64,
    pub block_size: u32,
    /// Bytes per extent (a power of two); the last extent may be partly past the end.
    pub extent_bytes: u64,
    /// Granularity of dirty tracking and resync (a power of two dividing `extent_bytes`).
    pub region_bytes: u64,
    pub replicas: u8,
    pub min_replicas: u8,
    pub queues: u16,
    pub serial: String,
    pub read_only: bool,
    pub locality: Locality,
    pub created_unix_s: u64,
    /// Bumped by every attach; a replica that promised generation g refuses anything older.
    pub generation: u64,
    /// The node serving the volume to its VM; `None` while detached.
    pub owner: Option<String>,
    /// Membership epoch: bumped by every change of any extent's members or their states.
    pub epoch: u32,
    pub extents: Vec<ExtentMeta>,
    pub risk_accepted: Option<RiskAcceptance>,
}

impl VolumeMeta {
    /// Every invariant a stored document must hold; checked before a write and after a read.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != META_FORMAT {
            return Err(format!("unknown volume meta format {} (this hcblk reads {META_FORMAT})", self.format));
        }
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(format!("block size {} (512 or 4096)", self.block_size));
        }
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(u64::from(self.block_size)) {
            return Err(format!("size {} is not a positive multiple of the block size", self.size_bytes));
        }
        if !self.region_bytes.is_power_of_two() || self.region_bytes < u64::from(self.block_size) {
            return Err(format!("region size {} is not a power of two >= the block size", self.region_bytes));
        }
        if self.region_bytes > u64::from(crate::msg::TRANSFER_MAX) {
            return Err(format!(
                "region size {} is larger than the {} bytes one transfer moves",
                self.region_bytes,
                crate::msg::TRANSFER_MAX
            ));
        }
        if !self.extent_bytes.is_power_of_two() || self.extent_bytes < self.region_bytes {
            return Err(format!("extent size {} is not a power of two >= the region size", self.extent_bytes));
        }
        if self.extent_bytes / self.region_bytes > REGIONS_PER_EXTENT_MAX {
            return Err(format!(
                "extent size {} holds more than {REGIONS_PER_EXTENT_MAX} regions of {} bytes",
                self.extent_bytes, self.region_bytes
            ));
        }
        if self.replicas == 0 || self.replicas > REPLICAS_MAX {
            return Err(format!("{} replicas (1..={REPLICAS_MAX})", self.replicas));
        }
        if self.min_replicas == 0 || self.min_replicas > self.replicas {
            return Err(format!("min replicas {} (1..={})", self.min_replicas, self.replicas));
        }
        let expected = self.size_bytes.div_ceil(self.extent_bytes);
        if self.extents.len() as u64 != expected {
            return Err(format!("{} extents for a volume that needs {expected}", self.extents.len()));
        }
        for (i, extent) in self.extents.iter().enumerate() {
            if extent.members.is_empty() || extent.members.len() > usize::from(REPLICAS_MAX) {
                return Err(format!("extent {i} has {} members", extent.members.len()));
            }
            for (j, m) in extent.members.iter().enumerate() {
                if extent.members[..j].iter().any(|o| o.node == m.node) {
                    return Err(format!("extent {i} lists node {} twice", m.node));
                }
            }
        }
        Ok(())
    }

    pub fn extent_count(&self) -> u32 {
        self.extents.len() as u32
    }

    pub fn regions_per_extent(&self) -> u32 {
        (self.extent_bytes / self.region_bytes) as u32
    }

    /// Bytes of extent `i` that lie inside the volume.
    pub fn extent_len(&self, i: u32) -> u64 {
        let start = u64::from(i) * self.extent_bytes;
        self.size_bytes.saturating_sub(start).min(self.extent_bytes)
    }

    /// Regions of extent `i` that lie (at least partly) inside the volume.
    pub fn extent_regions(&self, i: u32) -> u32 {
        self.extent_len(i).div_ceil(self.region_bytes) as u32
    }

    /// Every node that holds a replica of any extent, in first-seen order.
    pub fn member_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = Vec::new();
        for m in self.extents.iter().flat_map(|e| &e.members) {
            if !nodes.contains(&m.node) {
                nodes.push(m.node.clone());
            }
        }
        nodes
    }

    /// Extents in which `node` is a member.
    pub fn extents_of(&self, node: &str) -> Vec<u32> {
        (0..self.extent_count()).filter(|&i| self.extents[i as usize].member(node).is_some()).collect()
    }

    /// True when every extent has every member in sync.
    pub fn is_whole(&self) -> bool {
        self.extents
            .iter()
            .all(|e| e.members.len() == usize::from(self.replicas) && e.in_sync_count() == e.members.len())
    }

    /// True when writes to extent `i` may proceed (I10).
    pub fn writable(&self, i: u32) -> bool {
        let in_sync = self.extents[i as usize].in_sync_count();
        in_sync >= usize::from(self.min_replicas) || (in_sync > 0 && self.risk_accepted.is_some())
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Plain data with string keys: serialisation cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let meta: Self = serde_json::from_slice(bytes).map_err(|e| format!("malformed volume meta: {e}"))?;
        meta.validate()?;
        Ok(meta)
    }
}

/// What a daemon registers about itself under its etcd lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub name: String,
    /// `node_id(name)`, stored so tools need not recompute it.
    pub id: u64,
    /// Replica service address, `ip:port`.
    pub address: String,
    /// Failure domain; nodes without one are each their own domain.
    pub zone: Option<String>,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// hcblk version, for upgrades.
    pub version: String,
    pub started_unix_s: u64,
}

impl NodeInfo {
    /// The failure domain placement keeps replicas apart by.
    pub fn failure_domain(&self) -> &str {
        self.zone.as_deref().unwrap_or(&self.name)
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A valid document around `extents` (1 GiB extents, 3 replicas, owned by n1).
    pub(crate) fn meta_with(extents: Vec<ExtentMeta>) -> VolumeMeta {
        VolumeMeta {
            format: META_FORMAT,
            name: "vol".into(),
            id: 1,
            size_bytes: extents.len() as u64 * (1 << 30),
            block_size: 512,
            extent_bytes: 1 << 30,
            region_bytes: 1 << 20,
            replicas: 3,
            min_replicas: 2,
            queues: 1,
            serial: "vol".into(),
            read_only: false,
            locality: Locality::Prefer,
            created_unix_s: 0,
            generation: 1,
            owner: Some("n1".into()),
            epoch: 1,
            extents,
            risk_accepted: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> VolumeMeta {
        let member = |node: &str, state| Member::new(node, state);
        VolumeMeta {
            format: META_FORMAT,
            name: "vm1".into(),
            id: 7,
            size_bytes: 3 << 20,
            block_size: 512,
            extent_bytes: 2 << 20,
            region_bytes: 1 << 20,
            replicas: 3,
            min_replicas: 2,
            queues: 1,
            serial: "vm1".into(),
            read_only: false,
            locality: Locality::Prefer,
            created_unix_s: 0,
            generation: 1,
            owner: Some("a".into()),
            epoch: 1,
            extents: vec![
                ExtentMeta {
                    members: vec![
                        member("a", MemberState::InSync),
                        member("b", MemberState::InSync),
                        member("c", MemberState::Stale),
                    ],
                },
                ExtentMeta {
                    members: vec![
                        member("a", MemberState::InSync),
                        member("b", MemberState::InSync),
                        member("d", MemberState::InSync),
                    ],
                },
            ],
            risk_accepted: None,
        }
    }

    #[test]
    fn round_trip_and_validation() {
        let meta = sample();
        meta.validate().unwrap();
        assert_eq!(VolumeMeta::from_json(&meta.to_json()).unwrap(), meta);
        assert_eq!(meta.extent_len(1), 1 << 20);
        assert_eq!(meta.extent_regions(1), 1);
        assert_eq!(meta.member_nodes(), vec!["a", "b", "c", "d"]);
        assert_eq!(meta.extents_of("c"), vec![0]);
        assert!(!meta.is_whole());
        assert!(meta.writable(0));

        let mut bad = meta.clone();
        bad.extents.pop();
        assert!(bad.validate().unwrap_err().contains("extents"));
        let mut bad = meta.clone();
        bad.extents[0].members[2].node = "a".into();
        assert!(bad.validate().unwrap_err().contains("twice"));
        let mut bad = meta.clone();
        bad.min_replicas = 4;
        assert!(bad.validate().is_err());
        let mut bad = meta;
        bad.region_bytes = 3 << 19;
        assert!(bad.validate().is_err());
        assert!(VolumeMeta::from_json(b"{\"format\":2}").is_err());
    }

    #[test]
    fn writable_needs_min_replicas_or_a_recorded_acceptance() {
        let mut meta = sample();
        meta.extents[0].members[1].state = MemberState::Stale;
        assert!(!meta.writable(0));
        meta.risk_accepted = Some(RiskAcceptance { by: "op".into(), at_unix_s: 1, reason: "test".into() });
        assert!(meta.writable(0));
        meta.extents[0].members[0].state = MemberState::Stale;
        assert!(!meta.writable(0), "no in-sync member at all is never writable");
    }

    #[test]
    fn node_ids_are_stable_and_non_zero() {
        assert_eq!(node_id("n1"), node_id("n1"));
        assert_ne!(node_id("n1"), node_id("n2"));
        assert_ne!(node_id(""), 0);
    }
}
