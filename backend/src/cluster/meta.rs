//! What the replication drivers need from the cluster's metadata: the volume documents
//! ([`VolumeMeta`]) and the registered nodes ([`NodeInfo`]). etcd in a cluster
//! ([`EtcdMeta`](super::EtcdMeta)); [`MemoryMeta`] in tests.
//!
//! Calls block (etcd round trips): drivers make them on a thread of their own, never on the
//! data path.

use std::collections::BTreeMap;
use std::sync::Mutex;

use replication::{NodeInfo, VolumeMeta};

/// The answer to [`MetaStore::write_volume`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaWrite {
    Committed {
        revision: i64,
    },
    /// The compare failed: the current document and its revision (`None`: deleted).
    Conflict(Option<Box<(VolumeMeta, i64)>>),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// The store could not be reached, or a write got no answer: its outcome is unknown, and
    /// the caller must re-read before deciding anything.
    #[error("cluster metadata unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store holds something that is not a valid document.
    #[error("malformed cluster metadata at {key}: {reason}")]
    Malformed { key: String, reason: String },
}

pub trait MetaStore: Send + Sync + 'static {
    /// The volume's document and its revision, or `None` if there is no such volume.
    fn read_volume(&self, name: &str) -> Result<Option<(VolumeMeta, i64)>, MetaError>;
    /// The volume with wire id `id` (through the id index).
    fn read_volume_by_id(&self, id: u64) -> Result<Option<VolumeMeta>, MetaError>;
    /// Replaces the volume's document if its revision is still `expect_revision`.
    fn write_volume(&self, name: &str, expect_revision: i64, meta: &VolumeMeta) -> Result<MetaWrite, MetaError>;
    /// The nodes registered now (their lease alive).
    fn list_nodes(&self) -> Result<Vec<NodeInfo>, MetaError>;
}

/// An in-memory store with etcd's compare-and-swap semantics, for tests of the drivers.
#[derive(Debug, Default)]
pub struct MemoryMeta {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    revision: i64,
    volumes: BTreeMap<String, (VolumeMeta, i64)>,
    nodes: BTreeMap<String, NodeInfo>,
    down: bool,
}

impl MemoryMeta {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates (or replaces) a volume document, as `volume create` would.
    pub fn put_volume(&self, meta: VolumeMeta) -> i64 {
        let mut g = self.lock();
        g.revision += 1;
        let revision = g.revision;
        g.volumes.insert(meta.name.clone(), (meta, revision));
        revision
    }

    pub fn put_node(&self, node: NodeInfo) {
        self.lock().nodes.insert(node.name.clone(), node);
    }

    pub fn remove_node(&self, name: &str) {
        self.lock().nodes.remove(name);
    }

    /// While down, every call fails with [`MetaError::Unavailable`].
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    pub fn volume(&self, name: &str) -> Option<VolumeMeta> {
        self.lock().volumes.get(name).map(|(m, _)| m.clone())
    }

    fn check(&self) -> Result<std::sync::MutexGuard<'_, MemoryInner>, MetaError> {
        let g = self.lock();
        if g.down {
            return Err(MetaError::Unavailable("the test store is down".into()));
        }
        Ok(g)
    }
}

impl MetaStore for MemoryMeta {
    fn read_volume(&self, name: &str) -> Result<Option<(VolumeMeta, i64)>, MetaError> {
        Ok(self.check()?.volumes.get(name).cloned())
    }

    fn read_volume_by_id(&self, id: u64) -> Result<Option<VolumeMeta>, MetaError> {
        Ok(self.check()?.volumes.values().find(|(m, _)| m.id == id).map(|(m, _)| m.clone()))
    }

    fn write_volume(&self, name: &str, expect_revision: i64, meta: &VolumeMeta) -> Result<MetaWrite, MetaError> {
        let mut g = self.check()?;
        let current = g.volumes.get(name).cloned();
        match current {
            Some((_, rev)) if rev == expect_revision => {
                g.revision += 1;
                let revision = g.revision;
                g.volumes.insert(name.to_owned(), (meta.clone(), revision));
                Ok(MetaWrite::Committed { revision })
            }
            other => Ok(MetaWrite::Conflict(other.map(Box::new))),
        }
    }

    fn list_nodes(&self) -> Result<Vec<NodeInfo>, MetaError> {
        Ok(self.check()?.nodes.values().cloned().collect())
    }
}
