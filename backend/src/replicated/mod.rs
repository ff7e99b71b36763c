//! A volume this node owns, served to its VM by replication: the [`Volume`] the vhost-user
//! export is generic over, fanning every request out to the volume's replicas.
//!
//! INTERFACE SKELETON — bodies being written (lead). The public API below is what the
//! control plane codes against.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replica::{IoCompletion, IoRequest};
use replication::owner::{OwnerConfig, SyncProgress};
use replication::VolumeMeta;

use crate::cluster::MetaStore;
use crate::member::Members;
use crate::volume::{GuestMem, Volume, VolumeQueue};
use crate::Error;

/// When this node's etcd lease runs out, as far as it knows (`None`: no lease now). The owner
/// starts no guest I/O past it: another node may have taken the volume over by then.
pub type LeaseClock = Arc<dyn Fn() -> Option<Instant> + Send + Sync>;

pub struct AttachConfig {
    pub node: String,
    pub volume: String,
    pub meta: Arc<dyn MetaStore>,
    /// This node's replica service (the local member is reached through it, without a copy).
    pub members: Arc<Members>,
    pub transport: proto::Config,
    /// `Tcp` or `Rdma`, already resolved.
    pub kind: proto::TransportKind,
    /// Timeouts, rates (see `OwnerConfig`'s field docs for defaults).
    pub owner: OwnerConfig,
    pub lease: Option<LeaseClock>,
    /// How long `attach` waits for the claim, the promises and the first membership changes.
    pub attach_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    #[error("volume {0} does not exist")]
    NoSuchVolume(String),
    #[error("cannot attach: {0}")]
    Fenced(String),
    #[error("attach did not finish within {0:?} (is etcd reachable? are the replicas' nodes up?)")]
    Timeout(Duration),
    #[error("cannot start the replication client")]
    Start(#[source] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetachError {
    #[error("guest requests still in flight after {0:?}")]
    Timeout(Duration),
    #[error("the volume was taken over: {0}")]
    Fenced(String),
}

/// The owner's view of its volume, for `volume info` and `cluster status`.
#[derive(Clone, Debug)]
pub struct VolumeStatus {
    /// `attaching`, `serving`, `detaching`, `detached` or `fenced: REASON`.
    pub phase: String,
    pub generation: u64,
    /// The document as this owner last committed or read it.
    pub meta: Option<VolumeMeta>,
    /// Extents whose writes wait for members (below min_replicas, no recorded acceptance).
    pub suspended_extents: Vec<u32>,
    pub syncs: Vec<SyncProgress>,
    pub unreconciled_regions: u32,
    pub guest_requests_in_flight: usize,
}

pub struct ReplicatedVolume {
    _private: (),
}

impl ReplicatedVolume {
    /// Claims the volume for this node (generation + 1), collects the members' promises and
    /// waits until it can serve. The export is started on the returned volume with **exactly
    /// one poller thread** (`ExportConfig.poll.cpus` of length 1): all its queues' requests go
    /// through one replication client.
    pub fn attach(config: AttachConfig) -> Result<Arc<Self>, AttachError> {
        let _ = config;
        todo!("lead: replicated volume")
    }

    pub fn name(&self) -> &str {
        todo!()
    }

    /// Finishes what is in flight and releases the volume in etcd (owner none).
    pub fn detach(&self, timeout: Duration) -> Result<(), DetachError> {
        let _ = timeout;
        todo!()
    }

    pub fn status(&self) -> VolumeStatus {
        todo!()
    }
}

pub struct ReplicatedQueue {
    _private: (),
}

impl Volume for ReplicatedVolume {
    type Queue = ReplicatedQueue;
    fn capacity_bytes(&self) -> u64 {
        todo!()
    }
    fn block_size(&self) -> u32 {
        todo!()
    }
    fn read_only(&self) -> bool {
        todo!()
    }
    fn physical_block_bytes(&self) -> u32 {
        todo!()
    }
    fn new_queue(self: &Arc<Self>, depth: u32) -> Result<ReplicatedQueue, Error> {
        let _ = depth;
        todo!()
    }
    /// Waits (bounded) until the owner has read the grown document from etcd: the control
    /// plane commits the new size and extents first, then calls `Export::resize`.
    fn grow(&self, new_size_bytes: u64) -> Result<(), Error> {
        let _ = new_size_bytes;
        todo!()
    }
    fn guest_memory_changed(&self, mem: Option<&Arc<GuestMem>>) -> Result<(), Error> {
        let _ = mem;
        todo!()
    }
}

impl VolumeQueue for ReplicatedQueue {
    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), IoRequest> {
        let _ = request;
        todo!()
    }
    fn is_full(&self) -> bool {
        todo!()
    }
    fn poll(&mut self) -> usize {
        todo!()
    }
    fn pop_completion(&mut self) -> Option<IoCompletion> {
        todo!()
    }
    fn outstanding(&self) -> u32 {
        todo!()
    }
    fn wait_for_completions(&mut self, timeout: Duration) {
        let _ = timeout;
        todo!()
    }
    fn completion_eventfd(&self) -> Option<RawFd> {
        todo!()
    }
}
