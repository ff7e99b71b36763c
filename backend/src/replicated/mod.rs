//! A volume this node owns, served to its VM by replication: the [`Volume`] the vhost-user
//! export is generic over, fanning every request out to the volume's replicas.
//!
//! ```text
//!  poller ─submit/poll─▶ Mutex<Core> ◀─ background thread (when the poller is idle)
//!                          ├ Owner state machine (replication::owner)
//!                          ├ LocalMember ── this node's replica: guest memory ⇄ disk
//!                          ├ endpoints ──── other replicas' nodes (descriptors + keys)
//!                          ├ Memory ─────── guest RAM registered once per memory table
//!                          └ metadata thread (etcd), connector thread (blocking connects)
//! ```
//!
//! The poller drives the core on every pass while the guest is busy: requests go out and
//! replies come in on its thread, no hand-off. A poller that sleeps with requests in flight
//! sleeps on every source of work at once (`events.rs`) and drives the core itself when one
//! fires. The background thread does the rest: timers and etcd answers always, and replies
//! and disk completions while no guest request is in flight (resync, cleaning, probes, or no
//! frontend at all); it wakes the poller through the queue's eventfd when a guest request
//! completes.

mod core;
mod events;
mod memory;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::{Endpoint, Registry, TransportKind};
use replica::{IoCompletion, IoRequest};
use replication::owner::{MetaResult, Owner, OwnerConfig, Phase, SyncProgress};
use replication::{node_id, NodeId, VolumeMeta};

use self::core::{Connection, Core, MetaAnswer};
use self::memory::Memory;
use crate::cluster::{MetaError, MetaStore, MetaWrite};
use crate::member::{LocalMember, Members};
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
    #[error("cannot read the volume's metadata")]
    Meta(#[source] MetaError),
    #[error("cannot allocate the replication client's buffers")]
    Buffers(#[source] replica::Error),
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

/// What the metadata thread does for the owner.
pub(crate) enum MetaJob {
    Read,
    Write(i64, Box<VolumeMeta>),
    ListNodes,
}

struct Shared {
    name: String,
    core: Mutex<Core>,
    stopping: AtomicBool,
    capacity: Arc<AtomicU64>,
    block_size: u32,
    read_only: bool,
    eventfd: OwnedFd,
    next_queue: AtomicU32,
    /// The core's set of work sources (it lives in `core`); the background thread sleeps on it.
    events_fd: RawFd,
    /// That set plus `eventfd`: what a sleeping poller waits on (`completion_eventfd`).
    poller_events: events::EpollSet,
    /// Written by the metadata and connector threads after they answer, and by `stop_threads`.
    wake: OwnedFd,
    /// Queues (pollers) alive, and guest requests they have in flight, over all of them.
    live_queues: AtomicU32,
    in_flight: AtomicU32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct ReplicatedVolume {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl ReplicatedVolume {
    /// Claims the volume for this node (generation + 1), collects the members' promises and
    /// waits until it can serve. The export is started on the returned volume with **exactly
    /// one poller thread** (`ExportConfig.poll.one_poller`): all its queues' requests go
    /// through one replication client.
    pub fn attach(config: AttachConfig) -> Result<Arc<Self>, AttachError> {
        let (meta, _) = config
            .meta
            .read_volume(&config.volume)
            .map_err(AttachError::Meta)?
            .ok_or_else(|| AttachError::NoSuchVolume(config.volume.clone()))?;
        let nodes = config.meta.list_nodes().unwrap_or_default();
        let me = node_id(&config.node);
        let addresses: BTreeMap<NodeId, String> = nodes.iter().map(|n| (n.id, n.address.clone())).collect();
        let registry = Arc::new(Registry::new());
        let memory = Memory::new(Arc::clone(&registry), config.owner.copy_slots, meta.region_bytes as usize)
            .map_err(AttachError::Buffers)?;

        // Connections to every other member's node first, in parallel: the owner's promises
        // go out as soon as it has claimed the volume.
        let mut connections = BTreeMap::new();
        let peers: Vec<(NodeId, String)> = meta
            .member_nodes()
            .iter()
            .map(|n| node_id(n))
            .filter(|n| *n != me)
            .filter_map(|n| addresses.get(&n).map(|a| (n, a.clone())))
            .collect();
        let handles: Vec<_> = peers
            .into_iter()
            .map(|(node, addr)| {
                let (cfg, reg, kind) = (config.transport.clone(), Arc::clone(&registry), config.kind);
                std::thread::spawn(move || (node, connect(&addr, &cfg, reg, kind)))
            })
            .collect();
        for h in handles {
            if let Ok((node, result)) = h.join() {
                match result {
                    Ok(ep) => {
                        connections.insert(node, Connection::Up(ep));
                    }
                    Err(e) => {
                        tracing::warn!(volume = %config.volume, node = format_args!("{node:#x}"), error = %e, "cannot connect to replica at attach");
                        connections.insert(node, Connection::Down(Instant::now() + Duration::from_secs(1)));
                    }
                }
            }
        }

        let eventfd = new_eventfd().map_err(AttachError::Start)?;
        let notify_fd = eventfd.as_raw_fd();
        let wake = new_eventfd().map_err(AttachError::Start)?;
        let wake_fd = wake.as_raw_fd();
        let mut core_events = events::EpollSet::new().map_err(AttachError::Start)?;
        core_events.add(wake_fd).map_err(AttachError::Start)?;
        let events_fd = core_events.raw();
        let mut poller_events = events::EpollSet::new().map_err(AttachError::Start)?;
        poller_events.add(events_fd).map_err(AttachError::Start)?;
        poller_events.add(notify_fd).map_err(AttachError::Start)?;
        let local = LocalMember::new(
            &config.members,
            // Work for the local member from another thread (the state writer): whoever
            // sleeps, poller or background thread, must drive. Both eventfds live as long as
            // the volume, which drops the local member first.
            Box::new(move || {
                events::signal_eventfd(notify_fd);
                events::signal_eventfd(wake_fd);
            }),
        );
        let (meta_jobs, meta_rx) = mpsc::channel::<MetaJob>();
        let (meta_tx, meta_results) = mpsc::channel();
        let (connect_jobs, connect_rx) = mpsc::channel::<(NodeId, String)>();
        let (connected_tx, connected) = mpsc::channel();
        let capacity = Arc::new(AtomicU64::new(meta.size_bytes));
        let start = Instant::now();
        let mut owner = Owner::new(config.owner.clone());
        if let Some(lease) = &config.lease {
            let until = lease().map_or(0, |t| t.saturating_duration_since(Instant::now()).as_nanos() as u64);
            owner.set_lease(Some(until));
        }
        owner.start(0);
        let core = Core::new(
            owner,
            local,
            config.volume.clone(),
            memory,
            meta_jobs,
            meta_results,
            connect_jobs,
            connected,
            connections,
            addresses,
            config.lease.clone(),
            Arc::clone(&capacity),
            notify_fd,
            start,
            core_events,
            wake_fd,
        );
        let shared = Arc::new(Shared {
            name: config.volume.clone(),
            core: Mutex::new(core),
            stopping: AtomicBool::new(false),
            capacity,
            block_size: meta.block_size,
            read_only: meta.read_only,
            eventfd,
            next_queue: AtomicU32::new(1),
            events_fd,
            poller_events,
            wake,
            live_queues: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
        });
        let mut threads = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f).map_err(AttachError::Start)
        };
        let store = Arc::clone(&config.meta);
        let volume_name = config.volume.clone();
        threads.push(spawn(
            format!("meta-{}", config.volume),
            Box::new(move || meta_loop(store.as_ref(), &volume_name, &meta_rx, &meta_tx, wake_fd)),
        )?);
        let (cfg, reg, kind) = (config.transport.clone(), Arc::clone(&registry), config.kind);
        threads.push(spawn(
            format!("connect-{}", config.volume),
            Box::new(move || {
                while let Ok((node, addr)) = connect_rx.recv() {
                    let result = connect(&addr, &cfg, Arc::clone(&reg), kind);
                    if connected_tx.send((node, result)).is_err() {
                        return;
                    }
                    // The thread ends before the volume (and `wake_fd`) is dropped.
                    events::signal_eventfd(wake_fd);
                }
            }),
        )?);
        let s = Arc::clone(&shared);
        threads.push(spawn(format!("repl-{}", config.volume), Box::new(move || background(&s)))?);
        let volume = Arc::new(Self { shared, threads: Mutex::new(threads) });

        // Wait until it serves (or cannot).
        let deadline = Instant::now() + config.attach_timeout;
        loop {
            // Bound first: a guard in the match scrutinee would live through `stop_threads`.
            let phase = volume.shared.lock().phase().clone();
            match phase {
                Phase::Serving => break,
                Phase::Fenced(reason) => {
                    volume.stop_threads();
                    return Err(AttachError::Fenced(reason));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                volume.stop_threads();
                return Err(AttachError::Timeout(config.attach_timeout));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(volume)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Finishes what is in flight and releases the volume in etcd (owner none). The export
    /// must be stopped first (no more guest requests).
    pub fn detach(&self, timeout: Duration) -> Result<(), DetachError> {
        {
            let mut core = self.shared.lock();
            let now = core.now();
            core.owner.detach(now);
            core.drive();
        }
        let deadline = Instant::now() + timeout;
        loop {
            // Bound first: a guard in the match scrutinee would live through the arms.
            let phase = self.shared.lock().phase().clone();
            match phase {
                Phase::Detached => break,
                Phase::Fenced(reason) => {
                    self.stop_threads();
                    return Err(DetachError::Fenced(reason));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(DetachError::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop_threads();
        Ok(())
    }

    pub fn status(&self) -> VolumeStatus {
        let core = self.shared.lock();
        let phase = match core.phase() {
            Phase::Loading | Phase::Claiming | Phase::Promising => "attaching".to_owned(),
            Phase::Serving => "serving".to_owned(),
            Phase::Detaching => "detaching".to_owned(),
            Phase::Detached => "detached".to_owned(),
            Phase::Fenced(reason) => format!("fenced: {reason}"),
        };
        VolumeStatus {
            phase,
            generation: core.owner.generation(),
            meta: core.meta().cloned(),
            suspended_extents: core.owner.suspended_extents(),
            syncs: core.owner.sync_progress(),
            unreconciled_regions: core.owner.unreconciled_regions(),
            guest_requests_in_flight: core.guests_in_flight(),
        }
    }

    fn stop_threads(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        events::signal_eventfd(self.shared.wake.as_raw_fd());
        // Closing the job channels ends the metadata and connector threads.
        {
            let mut core = self.shared.lock();
            let (dead, _) = mpsc::channel();
            core.meta_jobs = dead;
            core.close_connector();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for ReplicatedVolume {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn connect(
    addr: &str,
    cfg: &proto::Config,
    registry: Arc<Registry>,
    kind: TransportKind,
) -> Result<Box<dyn Endpoint>, String> {
    let r: Result<Box<dyn Endpoint>, proto::TransportError> = match kind {
        #[cfg(feature = "rdma")]
        TransportKind::Rdma => {
            proto::rdma::RdmaEndpoint::connect(addr, cfg, registry).map(|e| Box::new(e) as Box<dyn Endpoint>)
        }
        _ => proto::tcp::TcpEndpoint::connect(addr, cfg, registry).map(|e| Box::new(e) as Box<dyn Endpoint>),
    };
    r.map_err(|e| crate::control::chain(&e))
}

fn new_eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh eventfd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `wake_fd` is the volume's, open until this thread has been joined.
fn meta_loop(
    store: &dyn MetaStore,
    volume: &str,
    jobs: &mpsc::Receiver<MetaJob>,
    results: &mpsc::Sender<MetaAnswer>,
    wake_fd: RawFd,
) {
    while let Ok(job) = jobs.recv() {
        let answer = match job {
            MetaJob::Read => MetaAnswer::Meta(Box::new(match store.read_volume(volume) {
                Ok(doc) => MetaResult::Read(doc),
                Err(e) => {
                    tracing::warn!(volume, error = %crate::control::chain(&e), "cannot read the volume's metadata");
                    MetaResult::Unavailable
                }
            })),
            MetaJob::Write(expect, meta) => {
                MetaAnswer::Meta(Box::new(match store.write_volume(volume, expect, &meta) {
                    Ok(MetaWrite::Committed { revision }) => MetaResult::Committed { revision },
                    Ok(MetaWrite::Conflict(current)) => MetaResult::Conflict(current.map(|c| *c)),
                    Err(e) => {
                        tracing::warn!(volume, error = %crate::control::chain(&e), "cannot write the volume's metadata (outcome unknown until it is read again)");
                        MetaResult::Unavailable
                    }
                }))
            }
            MetaJob::ListNodes => match store.list_nodes() {
                Ok(nodes) => MetaAnswer::Nodes(nodes),
                Err(_) => continue,
            },
        };
        if results.send(answer).is_err() {
            return;
        }
        events::signal_eventfd(wake_fd);
    }
}

/// Timers (probes, io timeouts, etcd polls) need the core driven this often at least.
const TICK: Duration = Duration::from_millis(10);

/// Drives the core for everything no poller drives: it sleeps on every source of work while
/// no guest request is in flight (a poller with requests in flight sleeps on them itself, or
/// spins), else only on its wake eventfd, and at least every `TICK` for the timers.
fn background(shared: &Shared) {
    while !shared.stopping.load(Ordering::Acquire) {
        let poller_waits =
            shared.live_queues.load(Ordering::Acquire) > 0 && shared.in_flight.load(Ordering::Acquire) > 0;
        let fd = if poller_waits { shared.wake.as_raw_fd() } else { shared.events_fd };
        events::wait_readable(fd, TICK);
        events::drain_eventfd(shared.wake.as_raw_fd());
        if let Ok(mut core) = shared.core.try_lock() {
            core.drive();
        } else {
            // The poller is driving: let it finish rather than wake again at once.
            std::thread::yield_now();
        }
    }
}

/// One poller thread's window onto the replicated volume.
pub struct ReplicatedQueue {
    shared: Arc<Shared>,
    id: u32,
    depth: u32,
    outstanding: u32,
}

impl Volume for ReplicatedVolume {
    type Queue = ReplicatedQueue;

    fn capacity_bytes(&self) -> u64 {
        self.shared.capacity.load(Ordering::Acquire)
    }

    fn block_size(&self) -> u32 {
        self.shared.block_size
    }

    fn read_only(&self) -> bool {
        self.shared.read_only
    }

    fn physical_block_bytes(&self) -> u32 {
        // Replicas write through O_DIRECT on file systems whose unit is 4 KiB.
        self.shared.block_size.max(4096)
    }

    fn new_queue(self: &Arc<Self>, depth: u32) -> Result<ReplicatedQueue, Error> {
        if depth == 0 {
            return Err(Error::Config("a replicated volume queue of depth 0 could take no request".into()));
        }
        let id = self.shared.next_queue.fetch_add(1, Ordering::Relaxed);
        self.shared.live_queues.fetch_add(1, Ordering::AcqRel);
        Ok(ReplicatedQueue { shared: Arc::clone(&self.shared), id, depth, outstanding: 0 })
    }

    /// Waits (bounded) until the owner has read the grown document from etcd: the control
    /// plane commits the new size and extents first, then calls `Export::resize`.
    fn grow(&self, new_size_bytes: u64) -> Result<(), Error> {
        self.shared.lock().owner.refresh_meta();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.capacity_bytes() < new_size_bytes {
            if Instant::now() >= deadline {
                return Err(Error::Config(format!(
                    "the owner did not see the new size {new_size_bytes} in etcd within 30 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn guest_memory_changed(&self, mem: Option<&Arc<GuestMem>>) -> Result<(), Error> {
        let mut core = self.shared.lock();
        core.memory
            .set_table(mem)
            .map_err(|e| Error::Config(format!("cannot register guest memory with the transport: {e}")))
    }
}

impl Drop for ReplicatedQueue {
    fn drop(&mut self) {
        self.shared.live_queues.fetch_sub(1, Ordering::AcqRel);
        self.shared.in_flight.fetch_sub(self.outstanding, Ordering::AcqRel);
    }
}

impl VolumeQueue for ReplicatedQueue {
    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), IoRequest> {
        if self.outstanding >= self.depth {
            return Err(request);
        }
        self.outstanding += 1;
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        let mut core = self.shared.lock();
        // SAFETY: forwarded contract (the iovecs stay valid until the completion is popped).
        unsafe { core.submit(self.id, request) };
        Ok(())
    }

    fn is_full(&self) -> bool {
        self.outstanding >= self.depth
    }

    fn poll(&mut self) -> usize {
        // The completion eventfd is only the poller's wake-up (see `completion_eventfd`):
        // cleared before driving, so a completion from here on signals it again.
        events::drain_eventfd(self.shared.eventfd.as_raw_fd());
        self.shared.lock().drive()
    }

    fn pop_completion(&mut self) -> Option<IoCompletion> {
        let c = self.shared.lock().pop_completion(self.id)?;
        self.outstanding -= 1;
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        Some(c)
    }

    fn outstanding(&self) -> u32 {
        self.outstanding
    }

    fn wait_for_completions(&mut self, timeout: Duration, idle: bool) {
        if !idle {
            return;
        }
        // Replies come from the network and the local disk: sleep (briefly) until one may
        // have, rather than spin on a core the transport and the disk's kernel threads need.
        events::wait_readable(self.shared.poller_events.raw(), timeout);
    }

    /// An epoll set over the guest-completion eventfd and every source of work, so that a
    /// poller asleep with requests in flight wakes for a reply and drives the core itself.
    fn completion_eventfd(&self) -> Option<RawFd> {
        Some(self.shared.poller_events.raw())
    }

    /// The set's other members are re-armed by whoever drives the core; the poller drives
    /// it next, so it takes the background thread's wake-up too. Left set (only that thread
    /// drains it, and it may not get the core soon), it kept the set readable and the poller
    /// waking in a loop: a core's worth of CPU for nothing.
    fn consume_completion_event(&self) {
        events::drain_eventfd(self.shared.eventfd.as_raw_fd());
        events::drain_eventfd(self.shared.wake.as_raw_fd());
    }
}
