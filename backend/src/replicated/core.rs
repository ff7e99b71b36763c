//! The replication client's engine: the [`Owner`] state machine and everything that carries
//! its actions out — the local replica ([`LocalMember`]), connections to the other replicas'
//! nodes, per-request keys onto guest memory, etcd (through a metadata thread) — driven by
//! whichever thread holds it: the volume's poller while the guest is busy, the volume's
//! background thread otherwise.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use proto::wire::Message;
use proto::{Access, Endpoint, Key};
use replica::{IoCompletion, IoRequest, IoStatus, Op};
use replication::owner::{DataRef, GuestOp, GuestStatus, MetaResult, Owner, OwnerAction, OwnerEvent, Phase, Time};
use replication::{NodeId, NodeInfo, Request, Seq, VolumeMeta};

use super::events::{drain_eventfd, signal_eventfd, EpollSet};
use super::memory::Memory;
use super::{LeaseClock, MetaJob};
use crate::member::wire::{reply_from_wire, request_to_wire};
use crate::member::LocalMember;

/// Iovecs one chunk of a guest request may have: a descriptor carries at most 128 remote
/// segments, and a piece of a chunk never has more segments than the chunk.
const CHUNK_IOVECS: usize = proto::wire::MAX_SEGMENTS;

/// Bytes one chunk of a guest request may carry (what one descriptor may move).
const TRANSFER_MAX: u64 = replication::msg::TRANSFER_MAX as u64;

/// Cuts a guest request's iovecs into `(first_iov, iov_count, offset, len)` chunks of at most
/// CHUNK_IOVECS iovecs and TRANSFER_MAX bytes, each starting on a sector; `None` if a cut
/// would fall inside a sector or one iovec is larger than a chunk.
fn chunks(iov: &[libc::iovec], mut offset: u64) -> Option<Vec<(u32, u32, u64, u64)>> {
    let mut cuts = Vec::new();
    let (mut first, mut count, mut len) = (0usize, 0usize, 0u64);
    for (i, v) in iov.iter().enumerate() {
        let n = v.iov_len as u64;
        if n > TRANSFER_MAX {
            return None;
        }
        if count == CHUNK_IOVECS || len + n > TRANSFER_MAX {
            if !len.is_multiple_of(replication::msg::SECTOR) {
                return None;
            }
            cuts.push((first as u32, count as u32, offset, len));
            offset += len;
            (first, count, len) = (i, 0, 0);
        }
        count += 1;
        len += n;
    }
    if count > 0 {
        cuts.push((first as u32, count as u32, offset, len));
    }
    Some(cuts)
}

/// A guest request from the poller, split into chunks the owner takes as separate requests.
struct GuestReq {
    queue: u32,
    user_data: u64,
    iov: *const libc::iovec,
    iov_count: u32,
    chunks_left: u32,
    failed: bool,
}

/// One chunk: its iovecs (a sub-range of its request's) start `first_iov` into them.
struct Chunk {
    parent: u64,
    first_iov: u32,
    iov_count: u32,
}

/// A finished connection attempt: the node and its endpoint (or why there is none).
pub(crate) type Connected = (NodeId, Result<Box<dyn Endpoint>, String>);

pub(crate) enum Connection {
    Up(Box<dyn Endpoint>),
    /// A connection attempt is in progress.
    Connecting,
    /// Down; retried from this time on.
    Down(Instant),
}

pub(crate) struct Core {
    pub(crate) owner: Owner,
    local: LocalMember,
    me: NodeId,
    pub(crate) volume: String,
    connections: BTreeMap<NodeId, Connection>,
    /// Replica service addresses, from the registered nodes.
    addresses: BTreeMap<NodeId, String>,
    pub(crate) memory: Memory,
    guests: HashMap<u64, GuestReq>,
    chunks: HashMap<u64, Chunk>,
    next_chunk: u64,
    /// Keys to revoke when a request retires.
    keys: HashMap<Seq, Vec<Key>>,
    /// Promises in flight to peers: the extent each asked about (its bitmap's length).
    promises: HashMap<Seq, u32>,
    completions: BTreeMap<u32, VecDeque<IoCompletion>>,
    pub(crate) meta_jobs: mpsc::Sender<MetaJob>,
    meta_results: mpsc::Receiver<MetaAnswer>,
    connect_jobs: mpsc::Sender<(NodeId, String)>,
    connected: mpsc::Receiver<Connected>,
    start: Instant,
    next_tick: Instant,
    lease: Option<LeaseClock>,
    pub(crate) capacity: Arc<AtomicU64>,
    /// Signalled when a guest request completes (the poller may be asleep).
    pub(crate) eventfd: RawFd,
    /// Nodes whose requests failed on send in this pass: the owner is told after the pass.
    unreachable: Vec<NodeId>,
    /// Every source of work (see `events.rs`), kept in step with the connections and the
    /// local member's disk queues at the end of each `drive`.
    events: EpollSet,
    /// The metadata and connector threads' wake eventfd, always in `events`.
    wake_fd: RawFd,
}

pub(crate) enum MetaAnswer {
    Meta(Box<MetaResult>),
    Nodes(Vec<NodeInfo>),
}

// SAFETY: the raw iovec pointers in `guests` point into guest memory the poller keeps valid
// until the request's completion is popped (the `VolumeQueue::submit` contract); the core is
// only ever used by one thread at a time (it lives behind a mutex).
unsafe impl Send for Core {}

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        owner: Owner,
        local: LocalMember,
        volume: String,
        memory: Memory,
        meta_jobs: mpsc::Sender<MetaJob>,
        meta_results: mpsc::Receiver<MetaAnswer>,
        connect_jobs: mpsc::Sender<(NodeId, String)>,
        connected: mpsc::Receiver<Connected>,
        connections: BTreeMap<NodeId, Connection>,
        addresses: BTreeMap<NodeId, String>,
        lease: Option<LeaseClock>,
        capacity: Arc<AtomicU64>,
        eventfd: RawFd,
        start: Instant,
        events: EpollSet,
        wake_fd: RawFd,
    ) -> Self {
        let me = local.node_id();
        Self {
            owner,
            local,
            me,
            volume,
            connections,
            addresses,
            memory,
            guests: HashMap::new(),
            chunks: HashMap::new(),
            next_chunk: 1,
            keys: HashMap::new(),
            promises: HashMap::new(),
            completions: BTreeMap::new(),
            meta_jobs,
            meta_results,
            connect_jobs,
            connected,
            start,
            next_tick: Instant::now(),
            lease,
            capacity,
            eventfd,
            unreachable: Vec::new(),
            events,
            wake_fd,
        }
    }

    pub(crate) fn now(&self) -> Time {
        self.start.elapsed().as_nanos() as Time
    }

    /// Takes a guest request from queue `queue`.
    ///
    /// # Safety
    /// As `VolumeQueue::submit`: the iovecs stay valid until the completion is popped.
    pub(crate) unsafe fn submit(&mut self, queue: u32, request: IoRequest) {
        let op = match request.op {
            Op::Read => GuestOp::Read,
            Op::Write => GuestOp::Write { fua: request.fua },
            Op::Flush => GuestOp::Flush,
            Op::Discard => GuestOp::Discard,
            Op::WriteZeroes { .. } => GuestOp::WriteZeroes,
        };
        let parent = (u64::from(queue) << 48) | (request.user_data & ((1 << 48) - 1));
        let data = matches!(op, GuestOp::Read | GuestOp::Write { .. });
        // Cut into chunks of at most CHUNK_IOVECS iovecs and TRANSFER_MAX bytes, so every
        // piece fits one descriptor; the owner cuts them further at extent boundaries.
        let mut cuts: Vec<(u32, u32, u64, u64)> = Vec::new();
        if data && (request.iov_count as usize > CHUNK_IOVECS || request.len_bytes > TRANSFER_MAX) {
            // SAFETY: the caller's contract: `iov` points at `iov_count` valid iovecs.
            let iov = unsafe { std::slice::from_raw_parts(request.iov, request.iov_count as usize) };
            match chunks(iov, request.offset_bytes) {
                Some(c) => cuts = c,
                None => {
                    // A chunk boundary inside a sector: only a guest with odd-sized buffers
                    // gets here; the request fails, the replicas never see it.
                    tracing::debug!(volume = %self.volume, "guest request cannot be cut on sector boundaries: refused");
                    self.completions.entry(queue).or_default().push_back(IoCompletion {
                        user_data: request.user_data,
                        status: IoStatus::IoError(libc::EINVAL),
                    });
                    self.signal();
                    return;
                }
            }
        } else {
            cuts.push((0, request.iov_count, request.offset_bytes, request.len_bytes));
        }
        self.guests.insert(
            parent,
            GuestReq {
                queue,
                user_data: request.user_data,
                iov: request.iov,
                iov_count: request.iov_count,
                chunks_left: cuts.len() as u32,
                failed: false,
            },
        );
        let now = self.now();
        for (first_iov, iov_count, offset, len) in cuts {
            let id = self.next_chunk;
            self.next_chunk += 1;
            self.chunks.insert(id, Chunk { parent, first_iov, iov_count });
            self.owner.submit(now, id, op, offset, len);
        }
    }

    pub(crate) fn pop_completion(&mut self, queue: u32) -> Option<IoCompletion> {
        self.completions.get_mut(&queue)?.pop_front()
    }

    /// Does everything that can be done now; returns how much (0 = idle).
    pub(crate) fn drive(&mut self) -> usize {
        // Drained before the disk queues are reaped: a completion after this signals again.
        for fd in self.local.eventfds() {
            drain_eventfd(fd);
        }
        let mut work = 0;
        for _ in 0..8 {
            let mut round = self.execute_actions();
            round += self.inputs();
            round += self.execute_actions();
            work += round;
            if round == 0 {
                break;
            }
        }
        self.memory.retire();
        let fds: std::collections::BTreeSet<RawFd> = self.wait_fds().into_iter().collect();
        self.events.sync(&fds, &[self.wake_fd]);
        work
    }

    fn inputs(&mut self) -> usize {
        let mut work = 0;
        let now = self.now();
        while let Ok(answer) = self.meta_results.try_recv() {
            work += 1;
            match answer {
                MetaAnswer::Meta(m) => self.owner.on_meta(now, *m),
                MetaAnswer::Nodes(nodes) => {
                    for n in &nodes {
                        self.addresses.insert(n.id, n.address.clone());
                    }
                    self.owner.on_nodes(now, nodes);
                }
            }
        }
        while let Ok((node, result)) = self.connected.try_recv() {
            work += 1;
            match result {
                Ok(ep) => {
                    tracing::info!(volume = %self.volume, node = format_args!("{node:#x}"), "connected to replica");
                    self.connections.insert(node, Connection::Up(ep));
                }
                Err(e) => {
                    tracing::warn!(volume = %self.volume, node = format_args!("{node:#x}"), error = %e, "cannot connect to replica");
                    self.connections.insert(node, Connection::Down(Instant::now() + Duration::from_secs(1)));
                }
            }
        }
        // The local replica.
        work += self.local.poll();
        while let Some(reply) = self.local.pop_reply() {
            work += 1;
            self.owner.on_reply(now, self.me, reply);
        }
        // Remote replicas' replies.
        let mut lost = Vec::new();
        let mut replies = Vec::new();
        for (&node, conn) in &mut self.connections {
            let Connection::Up(ep) = conn else { continue };
            for _ in 0..256 {
                match ep.poll_recv() {
                    Ok(Some(msg)) => replies.push((node, msg)),
                    Ok(None) => break,
                    Err(_) => {
                        lost.push(node);
                        break;
                    }
                }
            }
            // The owner posts no one-sided operation of its own; the peer's on our memory are
            // served by the transport. Drain anyway (bounded queue).
            let mut sink = [proto::OpCompletion::EMPTY; 16];
            while ep.poll_completions(&mut sink) > 0 {}
        }
        for (node, msg) in replies {
            work += 1;
            let promises = &self.promises;
            let meta = self.owner.meta();
            let regions = |seq: u64| promises.get(&seq).and_then(|e| meta.map(|m| m.extent_regions(*e)));
            match reply_from_wire(&msg, regions) {
                Some(reply) => {
                    self.promises.remove(&reply.seq());
                    self.owner.on_reply(now, node, reply);
                }
                None => {
                    if !matches!(msg, Message::Heartbeat(_) | Message::Error(_)) {
                        tracing::warn!(volume = %self.volume, node = format_args!("{node:#x}"), frame = ?msg.frame_type(), "unexpected frame from a replica: closing its connection");
                        lost.push(node);
                    }
                }
            }
        }
        for node in lost {
            tracing::warn!(volume = %self.volume, node = format_args!("{node:#x}"), "connection to replica lost");
            self.connections.insert(node, Connection::Down(Instant::now()));
            self.owner.on_disconnect(now, node);
        }
        // Timers and the lease.
        if Instant::now() >= self.next_tick {
            self.next_tick = Instant::now() + Duration::from_millis(1);
            if let Some(lease) = &self.lease {
                let until = lease().map(|t| {
                    let left = t.saturating_duration_since(Instant::now());
                    now + left.as_nanos() as Time
                });
                self.owner.set_lease(Some(until.unwrap_or(0)));
            }
            self.owner.tick(now);
            self.reconnect();
            work += 1;
        }
        work
    }

    /// Starts connections to replicas' nodes that are down (at most once a second each).
    fn reconnect(&mut self) {
        let Some(meta) = self.owner.meta() else { return };
        let wanted: Vec<NodeId> =
            meta.member_nodes().iter().map(|n| replication::node_id(n)).filter(|n| *n != self.me).collect();
        for node in wanted {
            let due = match self.connections.get(&node) {
                None => true,
                Some(Connection::Down(at)) => Instant::now() >= *at,
                Some(_) => false,
            };
            if !due {
                continue;
            }
            let Some(addr) = self.addresses.get(&node).cloned() else {
                // Not registered (down): the node list poll brings its address back.
                self.connections.insert(node, Connection::Down(Instant::now() + Duration::from_secs(1)));
                continue;
            };
            self.connections.insert(node, Connection::Connecting);
            let _ = self.connect_jobs.send((node, addr));
        }
    }

    fn execute_actions(&mut self) -> usize {
        let mut n = 0;
        while let Some(action) = self.owner.poll_action() {
            n += 1;
            self.execute(action);
        }
        let now = self.now();
        for node in std::mem::take(&mut self.unreachable) {
            self.owner.on_disconnect(now, node);
            n += 1;
        }
        n
    }

    fn execute(&mut self, action: OwnerAction) {
        match action {
            OwnerAction::Send { to, request, data } => self.send(to, request, data),
            OwnerAction::Retire { seq } => {
                if let Some(keys) = self.keys.remove(&seq) {
                    self.memory.revoke(&keys);
                }
                self.promises.remove(&seq);
            }
            OwnerAction::Complete { id, status } => self.complete(id, status),
            OwnerAction::ReadMeta => {
                let _ = self.meta_jobs.send(MetaJob::Read);
            }
            OwnerAction::WriteMeta { expect_revision, meta } => {
                let _ = self.meta_jobs.send(MetaJob::Write(expect_revision, Box::new(meta)));
            }
            OwnerAction::ListNodes => {
                let _ = self.meta_jobs.send(MetaJob::ListNodes);
            }
            OwnerAction::Event(event) => self.event(event),
        }
    }

    fn event(&mut self, event: OwnerEvent) {
        let v = &self.volume;
        match &event {
            OwnerEvent::Attached { generation } => tracing::info!(volume = %v, generation, "attached: serving"),
            OwnerEvent::MemberFailed { node, reason } => {
                tracing::warn!(volume = %v, node = %node, reason = %reason, "replica failed")
            }
            OwnerEvent::MembershipCommitted { epoch, summary } => {
                if !summary.is_empty() {
                    tracing::info!(volume = %v, epoch, change = %summary, "membership committed");
                }
            }
            OwnerEvent::Suspended { extent } => {
                tracing::warn!(volume = %v, extent, "writes suspended: fewer in-sync replicas than min-replicas (a replica must return, or accept the risk: hcblk volume accept-risk)")
            }
            OwnerEvent::Resumed { extent } => tracing::info!(volume = %v, extent, "writes resumed"),
            OwnerEvent::SyncStarted { node, extent, regions, rebuild } => {
                tracing::info!(volume = %v, node = %node, extent, regions, kind = if *rebuild { "rebuild" } else { "resync" }, "replica sync started")
            }
            OwnerEvent::SyncDone { node, extent, regions } => {
                tracing::info!(volume = %v, node = %node, extent, regions, "replica sync done: back in sync")
            }
            OwnerEvent::Reconciled { extent, regions } => {
                tracing::info!(volume = %v, extent, regions, "regions written by the previous owner reconciled")
            }
            OwnerEvent::Replacing { extent, lost, new } => {
                tracing::warn!(volume = %v, extent, lost = %lost, new = %new, "replacing a lost replica (full copy)")
            }
            OwnerEvent::Fenced { reason } => {
                tracing::error!(volume = %v, reason = %reason, "no longer the owner: stopped serving")
            }
            OwnerEvent::WritesMayBeLost { extent } => {
                tracing::error!(volume = %v, extent, "every in-sync replica of an extent restarted: acknowledged writes not yet flushed may be lost; the next flush reports it")
            }
            OwnerEvent::Detached => tracing::info!(volume = %v, "detached"),
            OwnerEvent::Resized { size_bytes } => {
                self.capacity.store(*size_bytes, Ordering::Release);
                tracing::info!(volume = %v, size_bytes, "grown");
            }
        }
        if let (OwnerEvent::MembershipCommitted { .. } | OwnerEvent::Attached { .. }, Some(m)) =
            (&event, self.owner.meta())
        {
            self.capacity.fetch_max(m.size_bytes, Ordering::AcqRel);
        }
    }

    /// The iovecs of `len` bytes of `data`.
    fn iovecs(&self, data: DataRef, len: u64) -> Option<Vec<libc::iovec>> {
        match data {
            DataRef::None => Some(Vec::new()),
            DataRef::Copy { slot } => {
                let (ptr, cap, _) = self.memory.slot(slot)?;
                (len as usize <= cap).then(|| vec![libc::iovec { iov_base: ptr.cast(), iov_len: len as usize }])
            }
            DataRef::Guest { id, offset } => {
                let chunk = self.chunks.get(&id)?;
                let parent = self.guests.get(&chunk.parent)?;
                // SAFETY: the parent request's iovecs stay valid until its completion is popped
                // (the submit contract), and the chunk is a sub-range of them.
                let all = unsafe { std::slice::from_raw_parts(parent.iov, parent.iov_count as usize) };
                let iov = &all[chunk.first_iov as usize..(chunk.first_iov + chunk.iov_count) as usize];
                let mut skip = offset as usize;
                let mut left = len as usize;
                let mut out = Vec::new();
                for v in iov {
                    if left == 0 {
                        break;
                    }
                    if skip >= v.iov_len {
                        skip -= v.iov_len;
                        continue;
                    }
                    let n = (v.iov_len - skip).min(left);
                    // `skip + n <= iov_len`: the result lies inside this iovec.
                    out.push(libc::iovec { iov_base: v.iov_base.cast::<u8>().wrapping_add(skip).cast(), iov_len: n });
                    left -= n;
                    skip = 0;
                }
                (left == 0).then_some(out)
            }
        }
    }

    fn send(&mut self, to: NodeId, request: Request, data: DataRef) {
        let len = match &request {
            Request::Write { len, .. } | Request::Read { len, .. } => u64::from(*len),
            _ => 0,
        };
        let Some(iov) = self.iovecs(data, len) else {
            tracing::error!(volume = %self.volume, ?data, len, "request data outside its guest request: failing the replica");
            self.unreachable.push(to);
            return;
        };
        if to == self.me {
            // SAFETY: the iovecs point into guest memory (kept valid until the guest request's
            // completion, which the owner gives only after this request is answered) or into
            // the owner's copy buffers (alive as long as the core).
            unsafe { self.local.submit(request, iov) };
            return;
        }
        let seq = request.seq();
        if let Request::Promise { extent, .. } = &request {
            self.promises.insert(seq, *extent);
        }
        let Some(Connection::Up(ep)) = self.connections.get_mut(&to) else {
            self.unreachable.push(to);
            return;
        };
        let inline = matches!(request, Request::Write { inline: true, .. });
        let result = if inline {
            match self.memory.local_segs(&iov) {
                Some(segs) => ep.send_inline(&request_to_wire(&request, Default::default()), &segs),
                None => Err(proto::TransportError::OutOfRegion),
            }
        } else if len > 0 {
            let access =
                if matches!(request, Request::Write { .. }) { Access::RemoteRead } else { Access::RemoteWrite };
            match self.memory.grant(&iov, access) {
                Ok((segments, keys)) => {
                    self.keys.insert(seq, keys);
                    ep.send(&request_to_wire(&request, segments))
                }
                Err(e) => Err(e),
            }
        } else {
            ep.send(&request_to_wire(&request, Default::default()))
        };
        if let Err(e) = result {
            tracing::warn!(volume = %self.volume, node = format_args!("{to:#x}"), error = %crate::control::chain(&e), "cannot send to replica");
            if !ep.is_connected() {
                self.connections.insert(to, Connection::Down(Instant::now()));
            }
            self.unreachable.push(to);
        }
    }

    fn complete(&mut self, id: u64, status: GuestStatus) {
        let Some(chunk) = self.chunks.remove(&id) else { return };
        let Some(g) = self.guests.get_mut(&chunk.parent) else { return };
        g.failed |= status != GuestStatus::Ok;
        g.chunks_left -= 1;
        if g.chunks_left > 0 {
            return;
        }
        let g = self.guests.remove(&chunk.parent).expect("present");
        let status = if g.failed { IoStatus::IoError(libc::EIO) } else { IoStatus::Ok };
        self.completions.entry(g.queue).or_default().push_back(IoCompletion { user_data: g.user_data, status });
        self.signal();
    }

    /// Wakes the poller: a completion is ready.
    fn signal(&self) {
        signal_eventfd(self.eventfd);
    }

    /// File descriptors a sleeping driver waits on.
    pub(crate) fn wait_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self
            .connections
            .values()
            .filter_map(|c| if let Connection::Up(ep) = c { ep.poll_fd() } else { None })
            .collect();
        fds.extend(self.local.eventfds());
        fds
    }

    pub(crate) fn phase(&self) -> &Phase {
        self.owner.phase()
    }

    pub(crate) fn meta(&self) -> Option<&VolumeMeta> {
        self.owner.meta()
    }

    /// Guest requests taken and not completed, over all queues.
    pub(crate) fn guests_in_flight(&self) -> usize {
        self.guests.len()
    }

    /// Ends the connector thread (it exits when its job channel closes).
    pub(crate) fn close_connector(&mut self) {
        let (dead, _) = mpsc::channel();
        self.connect_jobs = dead;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iovs(lens: &[usize]) -> Vec<libc::iovec> {
        lens.iter().map(|&n| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: n }).collect()
    }

    #[test]
    fn chunks_respect_segment_and_byte_bounds() {
        let v = iovs(&vec![4096; 300]);
        let c = chunks(&v, 1 << 20).unwrap();
        assert_eq!(
            c,
            vec![
                (0, 128, 1 << 20, 128 * 4096),
                (128, 128, (1 << 20) + 128 * 4096, 128 * 4096),
                (256, 44, (1 << 20) + 256 * 4096, 44 * 4096)
            ]
        );
        let v = iovs(&[3 << 20, 2 << 20, 4 << 20]);
        assert_eq!(
            chunks(&v, 0).unwrap(),
            vec![(0, 1, 0, 3 << 20), (1, 1, 3 << 20, 2 << 20), (2, 1, 5 << 20, 4 << 20)]
        );
    }

    #[test]
    fn a_cut_inside_a_sector_is_refused() {
        let mut lens = vec![4096; 127];
        lens.push(100);
        lens.push(412);
        assert!(chunks(&iovs(&lens), 0).is_none());
        assert!(chunks(&iovs(&[(4 << 20) + 512]), 0).is_none());
    }
}
