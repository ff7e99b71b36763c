//! This node's replica service: the extent replicas it holds for every volume of the cluster,
//! served to those volumes' owners — remote owners over `proto`, and an owner on this node
//! directly ([`LocalMember`]: straight between guest memory and the disk, no copy, no thread
//! hop).
//!
//! ```text
//!   owners elsewhere ──proto──▶ acceptor thread ──▶ service thread ─┐
//!                                                                   ├─ Replica state machine
//!   owner on this node ──LocalMember (its poller thread) ───────────┘   (one per node, a lock)
//!        each caller executes the disk and data actions of its own requests (op ids carry
//!        their origin); state records are written by the writer thread, etcd read by the
//!        meta thread
//! ```
//!
//! The state machine ([`replication::replica`]) decides everything: fencing by generation,
//! session epoch and incarnation, duplicates, the dirty bits made durable before data. This
//! module only carries its actions out: [`store`] keeps the files, [`service`] the remote
//! side, [`LocalMember`] the local one.

mod local;
mod service;
mod store;
pub(crate) mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use replication::replica::{DiskResult, OpId, Replica, ReplicaAction, ReplicaConfig};
use replication::{node_id, NodeId, VolumeMeta};

use crate::cluster::MetaStore;

pub use local::LocalMember;

/// `Members::start`'s configuration. Replicas live under `DATA_DIR/replicas/` (see
/// [`store`]'s module doc for the files).
pub struct MemberConfig {
    /// This node's name (as in volume documents).
    pub node: String,
    pub data_dir: PathBuf,
    /// The replica service's address (`--listen`).
    pub listen: SocketAddr,
    /// Cluster id, this node's id (`replication::node_id(node)`), the secret and the bounds.
    pub transport: proto::Config,
    /// How long the service thread keeps polling after its last work before it sleeps on
    /// its sockets and disk queues: latency against the core it takes (zero: sleep at once,
    /// `--poll never`).
    pub spin: std::time::Duration,
    /// `Tcp` or `Rdma`, already resolved.
    pub kind: proto::TransportKind,
    pub meta: Arc<dyn MetaStore>,
    /// Hugepage staging memory for the data of peers' requests: pulled writes and reads on
    /// their way out; at least two of the largest transfers ([`MemberConfig::STAGING_DEFAULT`]).
    pub staging_bytes: usize,
}

impl MemberConfig {
    /// 32 MiB: eight of the largest transfers in flight at once.
    pub const STAGING_DEFAULT: usize = 32 << 20;
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
    #[error("replica store: {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Shard(#[from] replica::Error),
    #[error("cannot start the replica service")]
    Start(#[source] std::io::Error),
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

/// Op ids carry their origin in the top bits: 0 is the network service, others are local
/// owners. Below, a counter: 2^48 ops per origin before it wraps.
const ORIGIN_SHIFT: u32 = 48;
pub(crate) const REMOTE_ORIGIN: u64 = 0;

pub(crate) fn origin_of(op: OpId) -> u64 {
    op >> ORIGIN_SHIFT
}

/// Actions routed to the caller that executes them, and how to wake it.
pub(crate) struct Inbox {
    actions: Mutex<VecDeque<ReplicaAction>>,
    notify: Box<dyn Fn() + Send + Sync>,
}

impl Inbox {
    pub(crate) fn new(notify: Box<dyn Fn() + Send + Sync>) -> Self {
        Self { actions: Mutex::new(VecDeque::new()), notify }
    }

    pub(crate) fn take(&self) -> VecDeque<ReplicaAction> {
        std::mem::take(&mut *self.actions.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

enum WriterJob {
    Persist { volume: u64, version: u64, state: replication::replica::PersistedVolume },
    DropExtent { volume: u64, offset: u64, len: u64 },
    DropVolume { volume: u64 },
}

/// What the service thread, local handles, the writer and the meta thread share.
pub(crate) struct Core {
    pub(crate) node: String,
    pub(crate) node_id: NodeId,
    pub(crate) incarnation: u64,
    replica: Mutex<Replica>,
    pub(crate) store: store::Store,
    inboxes: Mutex<BTreeMap<u64, Arc<Inbox>>>,
    next_origin: AtomicU64,
    next_op: AtomicU64,
    writer: Mutex<mpsc::Sender<WriterJob>>,
    meta_jobs: Mutex<mpsc::Sender<u64>>,
    pub(crate) stopping: AtomicBool,
    /// Wakes the service thread from its sleep: actions routed to it from other threads, a
    /// new connection, stop.
    pub(crate) service_wake: vmm_sys_util::eventfd::EventFd,
}

impl Core {
    pub(crate) fn new_op(&self, origin: u64) -> OpId {
        (origin << ORIGIN_SHIFT) | (self.next_op.fetch_add(1, Ordering::Relaxed) & ((1 << ORIGIN_SHIFT) - 1))
    }

    pub(crate) fn register_inbox(&self, inbox: Arc<Inbox>) -> u64 {
        let origin = self.next_origin.fetch_add(1, Ordering::Relaxed);
        self.inboxes.lock().unwrap_or_else(|p| p.into_inner()).insert(origin, inbox);
        origin
    }

    pub(crate) fn unregister_inbox(&self, origin: u64) {
        self.inboxes.lock().unwrap_or_else(|p| p.into_inner()).remove(&origin);
    }

    /// Runs `f` on the state machine and routes the actions it produced.
    pub(crate) fn call<R>(&self, f: impl FnOnce(&mut Replica) -> R) -> R {
        let mut replica = self.replica.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut replica);
        let mut actions = Vec::new();
        while let Some(a) = replica.poll_action() {
            actions.push(a);
        }
        drop(replica);
        self.route(actions);
        out
    }

    fn route(&self, actions: Vec<ReplicaAction>) {
        if actions.is_empty() {
            return;
        }
        let mut woken: Vec<Arc<Inbox>> = Vec::new();
        let inboxes = self.inboxes.lock().unwrap_or_else(|p| p.into_inner());
        for action in actions {
            let op = match &action {
                ReplicaAction::Reply { op, .. }
                | ReplicaAction::Pull { op }
                | ReplicaAction::Push { op }
                | ReplicaAction::DiskWrite { op, .. }
                | ReplicaAction::DiskRead { op, .. }
                | ReplicaAction::DiskFlush { op, .. }
                | ReplicaAction::DiskDiscard { op, .. }
                | ReplicaAction::DiskZero { op, .. } => *op,
                ReplicaAction::Persist { volume, version, state } => {
                    let job = WriterJob::Persist { volume: *volume, version: *version, state: state.clone() };
                    let _ = self.writer.lock().unwrap_or_else(|p| p.into_inner()).send(job);
                    continue;
                }
                ReplicaAction::DropExtent { volume, offset, len, .. } => {
                    let job = WriterJob::DropExtent { volume: *volume, offset: *offset, len: *len };
                    let _ = self.writer.lock().unwrap_or_else(|p| p.into_inner()).send(job);
                    continue;
                }
                ReplicaAction::DropVolume { volume } => {
                    let _ = self
                        .writer
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .send(WriterJob::DropVolume { volume: *volume });
                    continue;
                }
                ReplicaAction::ReadMeta { volume } => {
                    let _ = self.meta_jobs.lock().unwrap_or_else(|p| p.into_inner()).send(*volume);
                    continue;
                }
            };
            // An origin that is gone (a local owner that stopped) had nothing in flight that
            // still needs it: its actions are dropped.
            let Some(inbox) = inboxes.get(&origin_of(op)) else { continue };
            inbox.actions.lock().unwrap_or_else(|p| p.into_inner()).push_back(action);
            if !woken.iter().any(|w| Arc::ptr_eq(w, inbox)) {
                woken.push(Arc::clone(inbox));
            }
        }
        drop(inboxes);
        for inbox in woken {
            (inbox.notify)();
        }
    }

    /// The extent size the replica knows for `volume`, and its size (1 and 0 if unknown).
    pub(crate) fn geometry(&self, volume: u64) -> (u64, u64) {
        let replica = self.replica.lock().unwrap_or_else(|p| p.into_inner());
        replica.volume_state(volume).map_or((1, 0), |s| (s.extent_bytes, s.size_bytes))
    }
}

pub struct Members {
    core: Arc<Core>,
    listen: SocketAddr,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Members {
    /// Loads the replica state records under the data dir, binds `listen` and starts serving
    /// owners (an acceptor thread, a service thread, the state writer and the etcd reader).
    pub fn start(config: MemberConfig) -> Result<Arc<Self>, MemberError> {
        let (store, loaded) = store::Store::open(&config.data_dir)?;
        let incarnation = random_u64().map_err(MemberError::Start)?;
        let names: Vec<String> = loaded.iter().map(|v| format!("{} ({:016x})", v.name, v.volume)).collect();
        tracing::info!(node = %config.node, incarnation = format_args!("{incarnation:#x}"), replicas = ?names, "replica service starting");
        let replica = Replica::new(ReplicaConfig { node: config.node.clone(), incarnation }, loaded);
        let (writer_tx, writer_rx) = mpsc::channel();
        let (meta_tx, meta_rx) = mpsc::channel();
        let core = Arc::new(Core {
            node: config.node.clone(),
            node_id: node_id(&config.node),
            incarnation,
            replica: Mutex::new(replica),
            store,
            inboxes: Mutex::new(BTreeMap::new()),
            next_origin: AtomicU64::new(1),
            next_op: AtomicU64::new(1),
            writer: Mutex::new(writer_tx),
            meta_jobs: Mutex::new(meta_tx),
            stopping: AtomicBool::new(false),
            service_wake: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(MemberError::Start)?,
        });
        let (service, listen) = service::Service::bind(Arc::clone(&core), &config)?;
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(f).map_err(MemberError::Start)
        };
        let c = Arc::clone(&core);
        threads.push(spawn("replica-writer", Box::new(move || writer_loop(&c, &writer_rx)))?);
        let c = Arc::clone(&core);
        let meta = Arc::clone(&config.meta);
        threads.push(spawn("replica-meta", Box::new(move || meta_loop(&c, meta.as_ref(), &meta_rx)))?);
        threads.extend(service.start()?);
        Ok(Arc::new(Self { core, listen, threads: Mutex::new(threads) }))
    }

    pub fn node(&self) -> &str {
        &self.core.node
    }

    /// Unique per daemon start.
    pub fn incarnation(&self) -> u64 {
        self.core.incarnation
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Volume ids this node holds replicas of.
    pub fn held_volumes(&self) -> Vec<u64> {
        let replica = self.core.replica.lock().unwrap_or_else(|p| p.into_inner());
        replica.volumes().map(|v| v.volume).collect()
    }

    /// The volume's current document (`None`: deleted), from the control plane's periodic
    /// look at etcd: extents this node no longer holds are dropped and their space released.
    pub fn on_layout(&self, volume: u64, meta: Option<&VolumeMeta>) {
        self.core.call(|r| r.on_layout(volume, meta));
    }

    /// Bytes allocated to replicas on this node's disk.
    pub fn used_bytes(&self) -> u64 {
        self.core.store.used_bytes()
    }

    pub fn status(&self) -> Vec<MemberStatus> {
        let replica = self.core.replica.lock().unwrap_or_else(|p| p.into_inner());
        replica
            .volumes()
            .map(|v| MemberStatus {
                volume: v.volume,
                name: v.name.clone(),
                promised_generation: v.promised,
                extents: v.extents.iter().map(|(e, bits)| (*e, bits.count())).collect(),
            })
            .collect()
    }

    /// Stops serving (daemon shutdown): connections closed, the writer drained.
    pub fn stop(&self) {
        if self.core.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.core.service_wake.write(1);
        // Closing the job channels ends the writer and meta threads once they are drained.
        let (dead_writer, _) = mpsc::channel();
        *self.core.writer.lock().unwrap_or_else(|p| p.into_inner()) = dead_writer;
        let (dead_meta, _) = mpsc::channel();
        *self.core.meta_jobs.lock().unwrap_or_else(|p| p.into_inner()) = dead_meta;
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        tracing::info!(node = %self.core.node, "replica service stopped");
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        self.stop();
    }
}

fn writer_loop(core: &Core, jobs: &mpsc::Receiver<WriterJob>) {
    while let Ok(job) = jobs.recv() {
        match job {
            WriterJob::Persist { volume, version, state } => match core.store.persist(&state) {
                Ok(()) => core.call(|r| r.on_persisted(volume, version)),
                Err(e) => {
                    let fsync =
                        matches!(&e, MemberError::Io { source, .. } if source.raw_os_error() != Some(libc::ENOSPC));
                    tracing::error!(volume = format_args!("{volume:016x}"), error = %crate::control::chain(&e), "cannot write a replica state record");
                    if fsync {
                        // The kernel may have dropped pages it was asked to write: carrying on
                        // would report durable what may be gone. A replica that stops is
                        // removed and resynced; one that lies is not.
                        tracing::error!("a failed write or fsync of replica state is fatal: stopping the daemon");
                        std::process::abort();
                    }
                    core.call(|r| r.on_persist_failed(volume, DiskResult::NoSpace));
                }
            },
            WriterJob::DropExtent { volume, offset, len } => {
                if let Err(e) = core.store.drop_range(volume, offset, len) {
                    tracing::warn!(volume = format_args!("{volume:016x}"), error = %crate::control::chain(&e), "cannot release a dropped extent's space");
                } else {
                    tracing::info!(
                        volume = format_args!("{volume:016x}"),
                        offset,
                        len,
                        "extent no longer held here: space released"
                    );
                }
            }
            WriterJob::DropVolume { volume } => {
                if let Err(e) = core.store.drop_volume(volume) {
                    tracing::warn!(volume = format_args!("{volume:016x}"), error = %crate::control::chain(&e), "cannot remove a deleted volume's replica");
                } else {
                    tracing::info!(volume = format_args!("{volume:016x}"), "volume deleted: replica removed");
                }
            }
        }
    }
}

fn meta_loop(core: &Core, meta: &dyn MetaStore, jobs: &mpsc::Receiver<u64>) {
    while let Ok(volume) = jobs.recv() {
        let result = match meta.read_volume_by_id(volume) {
            Ok(doc) => Ok(doc),
            Err(e) => {
                tracing::warn!(volume = format_args!("{volume:016x}"), error = %crate::control::chain(&e), "cannot check a promise against etcd");
                Err(())
            }
        };
        core.call(|r| r.on_meta(volume, result));
    }
}

pub(crate) fn random_u64() -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the live local buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_le_bytes(b).max(1))
}
