//! [`EtcdMeta`]: the cluster's metadata in etcd, as the replication drivers ([`MetaStore`]) and
//! the control plane use it. Documents are JSON: volumes are [`VolumeMeta::to_json`], nodes
//! [`NodeInfo`], statuses [`PublishedStatus`], the cluster key [`ClusterDoc`]; keys are those of
//! [`keys`].
//!
//! Every write that matters is one transaction: a volume and its id index are created together
//! ([`EtcdMeta::create_volume`]) and deleted together ([`EtcdMeta::delete_volume`]); a document
//! is replaced only if its `mod_revision` is still the one the writer read, and a refused
//! compare returns the current document read in the same transaction.
//!
//! Errors: whatever leaves the outcome open (etcd unreachable, a write without an answer, etcd
//! refusing for now) is [`MetaError::Unavailable`], and the caller re-reads before deciding
//! anything; data that is not a valid document is [`MetaError::Malformed`], naming its key.

use std::collections::BTreeMap;

use replication::{NodeInfo, VolumeMeta};
use serde::{Deserialize, Serialize};

use super::etcd::{CasOutcome, CreateOutcome, Etcd, Kv, LeaseId, Op};
use super::meta::{MetaError, MetaStore, MetaWrite};
use super::status::PublishedStatus;
use super::{keys, EtcdError};

/// Largest volume document written: etcd refuses requests over 1.5 MiB by default
/// (`--max-request-bytes`), and a document is read whole by every owner's metadata poll. The
/// control plane keeps a document's worst case (every member rebuilding, the largest numbers)
/// under it: some 210 bytes per extent of 3 replicas with short node names, about 4,800
/// extents, 4.7 TiB in 1 GiB extents or 18 TiB in 4 GiB ones.
pub const VOLUME_DOC_BYTES_MAX: usize = 1 << 20;
/// Attempts to create the cluster key when the answers leave its outcome open.
const CLUSTER_ATTEMPTS: u32 = 3;

/// The value of the `cluster` key, created once by the first daemon (create-if-absent); every
/// daemon uses its `cluster_id` as `proto::Config::cluster_id`, so peers of another cluster are
/// refused at the handshake. Unknown fields are ignored (a later version may add some).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterDoc {
    /// Random, non-zero.
    pub cluster_id: u64,
    pub created_unix_s: u64,
}

/// The answer to [`EtcdMeta::create_volume`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateVolume {
    Created {
        revision: i64,
    },
    /// A volume of that name exists.
    NameTaken,
    /// Another volume has that id (pick another one and retry).
    IdTaken,
}

/// The cluster's metadata in etcd. Cheap to clone (the facade is shared).
#[derive(Clone, Debug)]
pub struct EtcdMeta {
    etcd: Etcd,
}

impl EtcdMeta {
    pub fn new(etcd: Etcd) -> Self {
        Self { etcd }
    }

    /// The facade, for what this layer does not wrap.
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The cluster's id: the stored one, or `fresh` (random, non-zero) stored now if there is
    /// none yet. Two daemons starting together both end up with the one that was stored first.
    pub fn cluster_id(&self, fresh: u64, now_unix_s: u64) -> Result<u64, MetaError> {
        if fresh == 0 {
            return Err(malformed(keys::CLUSTER, "a cluster id must not be 0".into()));
        }
        let doc = ClusterDoc { cluster_id: fresh, created_unix_s: now_unix_s };
        let bytes = serde_json::to_vec(&doc).unwrap_or_default();
        let mut last = None;
        for _ in 0..CLUSTER_ATTEMPTS {
            match self.etcd.create_all(&[(keys::CLUSTER, &bytes)]) {
                Ok(CreateOutcome::Created { .. }) => {
                    tracing::info!(cluster_id = fresh, "created the cluster key");
                    return Ok(fresh);
                }
                Ok(CreateOutcome::Exists { present }) => {
                    let kv =
                        present.first().ok_or_else(|| malformed(keys::CLUSTER, "exists but was not read".into()))?;
                    return decode_cluster(kv);
                }
                // Maybe written: the next attempt finds out (it reads what is there).
                Err(e @ EtcdError::OutcomeUnknown { .. }) => last = Some(e),
                Err(e) => return Err(meta_error(e, keys::CLUSTER)),
            }
        }
        Err(meta_error(last.expect("CLUSTER_ATTEMPTS > 0"), keys::CLUSTER))
    }

    /// Creates a volume's document and its id index in one transaction, if neither exists.
    /// `meta` must be valid and fit [`VOLUME_DOC_BYTES_MAX`].
    pub fn create_volume(&self, meta: &VolumeMeta) -> Result<CreateVolume, MetaError> {
        let key = volume_key(&meta.name)?;
        let doc = encode_volume(&key, meta)?;
        let id_key = keys::volume_id(meta.id);
        match self.etcd.create_all(&[(key.as_str(), doc.as_slice()), (id_key.as_str(), meta.name.as_bytes())]) {
            Ok(CreateOutcome::Created { revision }) => {
                Ok(CreateVolume::Created { revision: revision_i64(revision, &key)? })
            }
            Ok(CreateOutcome::Exists { present }) => {
                if present.iter().any(|kv| kv.key == key) {
                    Ok(CreateVolume::NameTaken)
                } else {
                    Ok(CreateVolume::IdTaken)
                }
            }
            Err(e) => Err(meta_error(e, &key)),
        }
    }

    /// Replaces the document like [`MetaStore::write_volume`], with `extra` writes (an audit
    /// record) in the same transaction.
    pub fn write_volume_with(
        &self,
        name: &str,
        expect_revision: i64,
        meta: &VolumeMeta,
        extra: &[Op],
    ) -> Result<MetaWrite, MetaError> {
        let key = volume_key(name)?;
        if meta.name != name {
            return Err(malformed(&key, format!("refusing to write a document of volume {:?} here", meta.name)));
        }
        // Revisions start at 1: "expecting 0" would create a volume without its id index.
        let Ok(expect @ 1..) = u64::try_from(expect_revision) else {
            return Ok(MetaWrite::Conflict(self.read_volume(name)?.map(Box::new)));
        };
        let doc = encode_volume(&key, meta)?;
        match self.etcd.compare_and_swap(&key, expect, &doc, extra) {
            Ok(CasOutcome::Committed { revision }) => {
                Ok(MetaWrite::Committed { revision: revision_i64(revision, &key)? })
            }
            Ok(CasOutcome::Conflict { current }) => {
                Ok(MetaWrite::Conflict(current.map(|kv| decode_volume(&kv, name)).transpose()?.map(Box::new)))
            }
            Err(e) => Err(meta_error(e, &key)),
        }
    }

    /// Deletes the volume's document, its id index and its published status in one
    /// transaction, if the document's revision is still `expect_revision`.
    pub fn delete_volume(&self, name: &str, expect_revision: i64, id: u64) -> Result<MetaWrite, MetaError> {
        let key = volume_key(name)?;
        let Ok(expect @ 1..) = u64::try_from(expect_revision) else {
            return Ok(MetaWrite::Conflict(self.read_volume(name)?.map(Box::new)));
        };
        let status = keys::status(name).map_err(|e| meta_error(e, &key))?;
        let extra = [Op::delete(keys::volume_id(id)), Op::delete(status)];
        match self.etcd.compare_and_delete(&key, expect, &extra) {
            Ok(CasOutcome::Committed { revision }) => {
                Ok(MetaWrite::Committed { revision: revision_i64(revision, &key)? })
            }
            Ok(CasOutcome::Conflict { current }) => {
                Ok(MetaWrite::Conflict(current.map(|kv| decode_volume(&kv, name)).transpose()?.map(Box::new)))
            }
            Err(e) => Err(meta_error(e, &key)),
        }
    }

    /// Every volume's document with its revision, sorted by name, read at one revision.
    pub fn list_volumes(&self) -> Result<Vec<(VolumeMeta, i64)>, MetaError> {
        let (kvs, _) = self.etcd.list(keys::VOLUMES).map_err(|e| meta_error(e, keys::VOLUMES))?;
        kvs.iter()
            .map(|kv| {
                let name = keys::name_under(keys::VOLUMES, &kv.key)
                    .ok_or_else(|| malformed(&kv.key, "not a volume key".into()))?;
                decode_volume(kv, name)
            })
            .collect()
    }

    /// A node's registration and the lease holding it, if it is registered.
    pub fn read_node(&self, name: &str) -> Result<Option<(NodeInfo, Option<LeaseId>)>, MetaError> {
        let Ok(key) = keys::node(name) else { return Ok(None) };
        match self.etcd.get(&key) {
            Ok(Some(kv)) => Ok(Some((decode_node(&kv, name)?, kv.lease))),
            Ok(None) => Ok(None),
            Err(e) => Err(meta_error(e, &key)),
        }
    }

    /// Writes the volume's published status under `lease` (the publishing node's).
    pub fn put_status(&self, name: &str, status: &PublishedStatus, lease: LeaseId) -> Result<(), MetaError> {
        let key = keys::status(name).map_err(|e| meta_error(e, keys::STATUS))?;
        self.etcd.put_leased(&key, &status.to_json(), lease).map(|_| ()).map_err(|e| meta_error(e, &key))
    }

    /// The volume's published status, if its owner publishes one.
    pub fn read_status(&self, name: &str) -> Result<Option<PublishedStatus>, MetaError> {
        let Ok(key) = keys::status(name) else { return Ok(None) };
        match self.etcd.get(&key) {
            Ok(Some(kv)) => PublishedStatus::from_json(&kv.value).map(Some).map_err(|reason| malformed(&key, reason)),
            Ok(None) => Ok(None),
            Err(e) => Err(meta_error(e, &key)),
        }
    }

    /// Every published status by volume name. One that cannot be decoded is left out (and
    /// logged): it must not hide every other volume's.
    pub fn list_statuses(&self) -> Result<BTreeMap<String, PublishedStatus>, MetaError> {
        let (kvs, _) = self.etcd.list(keys::STATUS).map_err(|e| meta_error(e, keys::STATUS))?;
        let mut out = BTreeMap::new();
        for kv in kvs {
            let Some(name) = keys::name_under(keys::STATUS, &kv.key) else { continue };
            match PublishedStatus::from_json(&kv.value) {
                Ok(status) => {
                    out.insert(name.to_owned(), status);
                }
                Err(reason) => tracing::warn!(key = %kv.key, reason, "ignoring a malformed volume status"),
            }
        }
        Ok(out)
    }

    /// Removes the volume's published status if `lease` holds it (a status another node
    /// published since is left alone).
    pub fn remove_status(&self, name: &str, lease: Option<LeaseId>) -> Result<(), MetaError> {
        let Ok(key) = keys::status(name) else { return Ok(()) };
        let kv = match self.etcd.get(&key) {
            Ok(Some(kv)) if lease.is_none() || kv.lease == lease => kv,
            Ok(_) => return Ok(()),
            Err(e) => return Err(meta_error(e, &key)),
        };
        match self.etcd.compare_and_delete(&key, kv.mod_revision, &[]) {
            Ok(_) => Ok(()),
            Err(e) => Err(meta_error(e, &key)),
        }
    }
}

impl MetaStore for EtcdMeta {
    fn read_volume(&self, name: &str) -> Result<Option<(VolumeMeta, i64)>, MetaError> {
        // A name that cannot be a key segment cannot name a volume either.
        let Ok(key) = keys::volume(name) else { return Ok(None) };
        match self.etcd.get(&key) {
            Ok(Some(kv)) => decode_volume(&kv, name).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(meta_error(e, &key)),
        }
    }

    fn read_volume_by_id(&self, id: u64) -> Result<Option<VolumeMeta>, MetaError> {
        let id_key = keys::volume_id(id);
        let name = match self.etcd.get(&id_key) {
            Ok(Some(kv)) => {
                String::from_utf8(kv.value).map_err(|_| malformed(&id_key, "volume name is not UTF-8".into()))?
            }
            Ok(None) => return Ok(None),
            Err(e) => return Err(meta_error(e, &id_key)),
        };
        // Two reads, not one snapshot: the volume may be deleted (and its name reused) between
        // them, which shows as no document or one with another id. Both mean "gone".
        Ok(self.read_volume(&name)?.map(|(meta, _)| meta).filter(|meta| meta.id == id))
    }

    fn write_volume(&self, name: &str, expect_revision: i64, meta: &VolumeMeta) -> Result<MetaWrite, MetaError> {
        self.write_volume_with(name, expect_revision, meta, &[])
    }

    fn list_nodes(&self) -> Result<Vec<NodeInfo>, MetaError> {
        let (kvs, _) = self.etcd.list(keys::NODES).map_err(|e| meta_error(e, keys::NODES))?;
        kvs.iter()
            .map(|kv| {
                let name = keys::name_under(keys::NODES, &kv.key)
                    .ok_or_else(|| malformed(&kv.key, "not a node key".into()))?;
                decode_node(kv, name)
            })
            .collect()
    }
}

fn volume_key(name: &str) -> Result<String, MetaError> {
    keys::volume(name).map_err(|e| meta_error(e, keys::VOLUMES))
}

fn encode_volume(key: &str, meta: &VolumeMeta) -> Result<Vec<u8>, MetaError> {
    meta.validate().map_err(|reason| malformed(key, format!("refusing to write an invalid document: {reason}")))?;
    let doc = meta.to_json();
    if doc.len() > VOLUME_DOC_BYTES_MAX {
        return Err(malformed(
            key,
            format!("the document would be {} bytes, more than {VOLUME_DOC_BYTES_MAX}", doc.len()),
        ));
    }
    Ok(doc)
}

fn decode_volume(kv: &Kv, name: &str) -> Result<(VolumeMeta, i64), MetaError> {
    let meta = VolumeMeta::from_json(&kv.value).map_err(|reason| malformed(&kv.key, reason))?;
    if meta.name != name {
        return Err(malformed(&kv.key, format!("holds volume {:?}", meta.name)));
    }
    Ok((meta, revision_i64(kv.mod_revision, &kv.key)?))
}

fn decode_node(kv: &Kv, name: &str) -> Result<NodeInfo, MetaError> {
    let node: NodeInfo =
        serde_json::from_slice(&kv.value).map_err(|e| malformed(&kv.key, format!("malformed node info: {e}")))?;
    if node.name != name {
        return Err(malformed(&kv.key, format!("holds node {:?}", node.name)));
    }
    Ok(node)
}

fn decode_cluster(kv: &Kv) -> Result<u64, MetaError> {
    let doc: ClusterDoc =
        serde_json::from_slice(&kv.value).map_err(|e| malformed(&kv.key, format!("malformed cluster key: {e}")))?;
    if doc.cluster_id == 0 {
        return Err(malformed(&kv.key, "cluster id 0".into()));
    }
    Ok(doc.cluster_id)
}

fn revision_i64(revision: u64, key: &str) -> Result<i64, MetaError> {
    i64::try_from(revision).map_err(|_| malformed(key, format!("revision {revision} out of range")))
}

fn malformed(key: &str, reason: String) -> MetaError {
    MetaError::Malformed { key: key.to_owned(), reason }
}

/// What an etcd failure means to a metadata user: retry later (re-reading first), or bad data.
fn meta_error(e: EtcdError, key: &str) -> MetaError {
    match e {
        EtcdError::Malformed { key, reason } => MetaError::Malformed { key, reason },
        // Refused before sending: a name that cannot be a key, a transaction too large.
        EtcdError::InvalidRequest(reason) => malformed(key, reason),
        // Unreachable, outcome unknown, refused by etcd for now (no leader, out of space), a
        // lease that is gone (the node is re-registering): nothing to conclude, retry.
        other => MetaError::Unavailable(Box::new(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_failures_map_to_what_the_caller_does() {
        let cause = || super::super::Cause("x".into());
        let unknown = EtcdError::OutcomeUnknown { op: "compare-and-swap", key: "volumes/v".into(), cause: cause() };
        assert!(matches!(meta_error(unknown, "k"), MetaError::Unavailable(_)));
        let down = EtcdError::Unreachable {
            endpoints: "e".into(),
            timeout: std::time::Duration::from_secs(1),
            cause: cause(),
        };
        assert!(matches!(meta_error(down, "k"), MetaError::Unavailable(_)));
        let refused =
            EtcdError::Server { op: "get", key: "k".into(), code: "Unavailable".into(), message: "no leader".into() };
        assert!(matches!(meta_error(refused, "k"), MetaError::Unavailable(_)));
        let bad = EtcdError::Malformed { key: "volumes/v".into(), reason: "r".into() };
        assert!(matches!(meta_error(bad, "k"), MetaError::Malformed { key, .. } if key == "volumes/v"));
        assert!(matches!(meta_error(EtcdError::InvalidRequest("r".into()), "k"), MetaError::Malformed { .. }));
    }

    #[test]
    fn cluster_docs_decode_strictly_but_ignore_new_fields() {
        let kv = |value: &str| Kv {
            key: "cluster".into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
            create_revision: 1,
            version: 1,
            lease: None,
        };
        assert_eq!(decode_cluster(&kv(r#"{"cluster_id":7,"created_unix_s":1,"later":true}"#)).unwrap(), 7);
        for bad in [r#"{"cluster_id":0,"created_unix_s":1}"#, r#"{"created_unix_s":1}"#, "x", r#"{"cluster_id":-1}"#] {
            assert!(decode_cluster(&kv(bad)).is_err(), "{bad}");
        }
    }
}
