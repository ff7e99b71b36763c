//! This node's replica service: the extent replicas it holds for every volume of the
//! cluster, served to those volumes' owners.
//!
//! INTERFACE SKELETON — bodies being written (lead). The public API below is what the
//! control plane codes against.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use replication::VolumeMeta;

use crate::cluster::MetaStore;

/// `Members::start`'s configuration. Replicas live under `DATA_DIR/replicas/`:
/// `<volume id, 16 hex digits>.img` (sparse, the volume's size; only the extents this node
/// holds are written) and `<id>.state` (the replica state record, two checksummed slots).
pub struct MemberConfig {
    /// This node's name (as in volume documents).
    pub node: String,
    pub data_dir: PathBuf,
    /// The replica service's address (`--listen`).
    pub listen: SocketAddr,
    /// Cluster id, this node's id (`replication::node_id(node)`), the secret and the bounds.
    pub transport: proto::Config,
    /// `Tcp` or `Rdma`, already resolved.
    pub kind: proto::TransportKind,
    pub meta: Arc<dyn MetaStore>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemberError {
    #[error("cannot listen for peers on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: proto::TransportError,
    },
    #[error("replica state record {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("replica store {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Shard(#[from] replica::Error),
}

/// What this node holds of one volume (for `volume info` and `cluster status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    pub volume: u64,
    pub name: String,
    pub promised_generation: u64,
    /// (extent, regions marked dirty).
    pub extents: Vec<(u32, u32)>,
}

pub struct Members {
    _private: (),
}

impl Members {
    /// Loads the replica state records under the data dir, binds `listen` and starts serving
    /// owners (one acceptor thread, one service thread).
    pub fn start(config: MemberConfig) -> Result<Arc<Self>, MemberError> {
        let _ = config;
        todo!("lead: member service")
    }

    pub fn node(&self) -> &str {
        todo!()
    }

    /// Unique per daemon start.
    pub fn incarnation(&self) -> u64 {
        todo!()
    }

    pub fn listen_addr(&self) -> SocketAddr {
        todo!()
    }

    /// Volume ids this node holds replicas of.
    pub fn held_volumes(&self) -> Vec<u64> {
        todo!()
    }

    /// The volume's current document (`None`: deleted), from the control plane's periodic
    /// look at etcd: extents this node no longer holds are dropped and their space released.
    pub fn on_layout(&self, volume: u64, meta: Option<&VolumeMeta>) {
        let _ = (volume, meta);
        todo!()
    }

    /// Bytes allocated to replicas on this node's disk.
    pub fn used_bytes(&self) -> u64 {
        todo!()
    }

    pub fn status(&self) -> Vec<MemberStatus> {
        todo!()
    }

    /// Stops serving (daemon shutdown): connections closed, in-flight requests finished.
    pub fn stop(&self) {
        todo!()
    }
}
