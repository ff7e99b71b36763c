//! The remote side of the replica service: owners on other nodes connect (authenticated with
//! the cluster secret), send descriptors, and this node moves the data one-sided — it pulls
//! a WRITE's buffers from the owner's memory (unless they came inline), writes them through
//! its io_uring shard, reads a READ's bytes from disk and pushes them into the owner's memory.
//!
//! One acceptor thread hands authenticated endpoints to one service thread, which polls
//! them, the disk and its inbox of actions; it spins while busy and sleeps on the sockets
//! (a millisecond at a time) when idle. Data buffers come from a registered hugepage pool,
//! bounded: a request that finds it full waits for a buffer, so memory stays bounded whatever
//! the peers send (the transport already bounds requests in flight per connection).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::wire::{Message, Segments};
use proto::{Endpoint, InlineData, LocalSeg, OpCompletion, Registry, TransportKind};

use replica::{HugeBuffer, IoRequest, IoStatus, Op, ShardQueue, ShardQueueConfig};
use replication::replica::{DiskResult, OpId, ReplicaAction};
use replication::{NodeId, Reply};

use super::wire::{reply_to_wire, request_from_wire};
use super::{Core, Inbox, MemberConfig, MemberError, REMOTE_ORIGIN};

/// The pool remote requests' data moves through. A descriptor carries at most 16 MiB.
const CHUNK_BYTES: usize = 64 << 10;
/// Requests one volume's disk queue takes at once.
const DISK_DEPTH: u32 = 256;
const _: () = assert!(DISK_DEPTH >= 1 && DISK_DEPTH <= ShardQueue::DEPTH_MAX);
/// Spin this long after the last work before sleeping on the sockets.
/// The longest sleep: the service has no timers of its own; this only bounds how long a
/// missed wake-up could stall it.
const NAP_MAX_MS: i32 = 100;
/// Requests waiting for a pool buffer or a disk slot, at most (then new requests are refused
/// as busy, which fails the member for that owner: a flood, not a workload).
const BACKLOG_MAX: usize = 4096;

/// A bounded first-fit allocator over a registered hugepage buffer, in 64 KiB chunks.
struct Pool {
    buf: HugeBuffer,
    region: proto::RegionId,
    used: Vec<bool>,
}

impl Pool {
    fn alloc(&mut self, len: usize) -> Option<(usize, usize)> {
        let chunks = len.div_ceil(CHUNK_BYTES).max(1);
        let mut run = 0;
        for i in 0..self.used.len() {
            run = if self.used[i] { 0 } else { run + 1 };
            if run == chunks {
                let first = i + 1 - chunks;
                self.used[first..=i].iter_mut().for_each(|u| *u = true);
                return Some((first * CHUNK_BYTES, chunks * CHUNK_BYTES));
            }
        }
        None
    }

    fn free(&mut self, offset: usize, len: usize) {
        let first = offset / CHUNK_BYTES;
        self.used[first..first + len / CHUNK_BYTES].iter_mut().for_each(|u| *u = false);
    }
}

enum Data {
    None,
    Inline(InlineData),
    /// (offset, allocated length) in the pool.
    Pool(usize, usize),
}

struct RemoteOp {
    conn: u64,
    request_len: u32,
    segments: Segments,
    data: Data,
    /// The iovec the disk request points at: boxed so its address is stable while the op is
    /// in the ring.
    iov: Box<libc::iovec>,
    /// A disk request of this op is in a queue.
    in_disk: bool,
    /// A one-sided transfer of this op is in flight: a pull (WRITE data in) or a push.
    pulling: bool,
}

struct Conn {
    ep: Box<dyn Endpoint>,
    node: NodeId,
}

pub(crate) struct Service {
    core: Arc<Core>,
    inbox: Arc<Inbox>,
    registry: Arc<Registry>,
    pool: Pool,
    accepted: mpsc::Receiver<Box<dyn Endpoint>>,
    acceptor: Option<Acceptor>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    ops: HashMap<OpId, RemoteOp>,
    disks: HashMap<u64, ShardQueue>,
    /// Actions that could not run yet (no buffer, disk queue full), in order.
    backlog: VecDeque<ReplicaAction>,
    accepted_tx: Option<mpsc::SyncSender<Box<dyn Endpoint>>>,
    spin: Duration,
}

// SAFETY: the raw pointers a `Service` holds (the ops' iovecs) point into its own pool buffer or
// the ops' inline buffers, which it owns; only its disk queues dereference them. It is moved to
// the service thread once, before any request exists.
unsafe impl Send for Service {}

enum Acceptor {
    Tcp(proto::tcp::TcpAcceptor),
    #[cfg(feature = "rdma")]
    Rdma(proto::rdma::RdmaAcceptor),
}

impl Service {
    pub(crate) fn bind(core: Arc<Core>, config: &MemberConfig) -> Result<(Self, SocketAddr), MemberError> {
        let registry = Arc::new(Registry::new());
        let transfer_max = replication::msg::TRANSFER_MAX as usize;
        let bytes = config.staging_bytes.max(2 * transfer_max).next_multiple_of(2 << 20);
        let buf = HugeBuffer::new(bytes)?;
        // SAFETY: the buffer is owned by the pool, which lives in the service as long as the
        // registry's endpoints (the service drops its connections before the pool, field
        // order in `Service` aside: `stop` clears `conns` first), and is only reached through
        // the registry's checked pieces and the disk requests of ops holding its chunks.
        let region = unsafe { registry.register(buf.as_ptr(), buf.len()) }
            .map_err(|source| MemberError::Listen { addr: config.listen, source })?;
        let chunks = buf.len() / CHUNK_BYTES;
        let pool = Pool { buf, region, used: vec![false; chunks] };
        let listen_err = |source| MemberError::Listen { addr: config.listen, source };
        let (acceptor, listen) = match config.kind {
            #[cfg(feature = "rdma")]
            TransportKind::Rdma => {
                let a = proto::rdma::RdmaAcceptor::bind(config.listen, config.transport.clone(), Arc::clone(&registry))
                    .map_err(listen_err)?;
                (Acceptor::Rdma(a), config.listen)
            }
            _ => {
                let a = proto::tcp::TcpAcceptor::bind(config.listen, config.transport.clone(), Arc::clone(&registry))
                    .map_err(listen_err)?;
                let addr = a.local_addr().map_err(listen_err)?;
                (Acceptor::Tcp(a), addr)
            }
        };
        let (accepted_tx, accepted) = mpsc::sync_channel(64);
        let waker = Arc::clone(&core);
        let inbox = Arc::new(Inbox::new(Box::new(move || {
            let _ = waker.service_wake.write(1);
        })));
        core.inboxes.lock().unwrap_or_else(|p| p.into_inner()).insert(REMOTE_ORIGIN, Arc::clone(&inbox));
        let service = Self {
            core,
            inbox,
            registry,
            pool,
            accepted,
            acceptor: Some(acceptor),
            conns: BTreeMap::new(),
            next_conn: 1,
            ops: HashMap::new(),
            disks: HashMap::new(),
            backlog: VecDeque::new(),
            accepted_tx: Some(accepted_tx),
            spin: config.spin,
        };
        tracing::info!(listen = %listen, "replica service listening");
        Ok((service, listen))
    }

    /// Starts the acceptor and service threads.
    pub(crate) fn start(mut self) -> Result<Vec<JoinHandle<()>>, MemberError> {
        let acceptor = self.acceptor.take().expect("bound");
        let tx = self.accepted_tx.take().expect("bound");
        let core = Arc::clone(&self.core);
        let accept = std::thread::Builder::new()
            .name("replica-accept".into())
            .spawn(move || accept_loop(acceptor, tx, &core))
            .map_err(MemberError::Start)?;
        let service = std::thread::Builder::new()
            .name("replica-service".into())
            .spawn(move || self.run())
            .map_err(MemberError::Start)?;
        Ok(vec![accept, service])
    }

    fn run(mut self) {
        let mut last_work = Instant::now();
        loop {
            if self.core.stopping.load(Ordering::Acquire) {
                self.conns.clear();
                return;
            }
            let mut work = 0;
            while let Ok(ep) = self.accepted.try_recv() {
                let node = ep.peer_node_id();
                let id = self.next_conn;
                self.next_conn += 1;
                tracing::info!(node = format_args!("{node:#x}"), "owner connected");
                self.conns.insert(id, Conn { ep, node });
                work += 1;
            }
            work += self.receive();
            work += self.transfers();
            work += self.disk();
            work += self.actions();
            if work > 0 {
                last_work = Instant::now();
            } else if last_work.elapsed() >= self.spin {
                self.sleep();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Sleeps until something may need the service: a connection's notification (a request
    /// or a transfer's completion), a disk queue's completion eventfd, or the wake eventfd
    /// (actions from other threads, a new connection, stop). The eventfds are drained here;
    /// the next pass then finds whatever woke it.
    fn sleep(&self) {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.conns.len() + self.disks.len() + 1);
        fds.push(libc::pollfd { fd: self.core.service_wake.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        fds.extend(self.conns.values().filter_map(|c| c.ep.poll_fd()).map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        let timers = self.conns.values().any(|c| c.ep.poll_fd().is_none());
        let disk_fds: Vec<RawFd> = self.disks.values().filter_map(ShardQueue::completion_eventfd).collect();
        fds.extend(disk_fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }));
        // A transport without a notification fd (rdma's completion channel is not one yet)
        // is polled on a short timer instead.
        let timeout = if timers { 1 } else { NAP_MAX_MS };
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs the kernel may write.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        let _ = self.core.service_wake.read();
        for fd in disk_fds {
            drain_eventfd(fd);
        }
    }

    fn receive(&mut self) -> usize {
        let mut work = 0;
        let mut dead = Vec::new();
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            for _ in 0..64 {
                let conn = self.conns.get_mut(&id).expect("present");
                match conn.ep.poll_recv() {
                    Ok(Some(msg)) => {
                        work += 1;
                        let node = conn.node;
                        self.request(id, node, msg);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(node = format_args!("{:#x}", conn.node), error = %crate::control::chain(&e), "owner disconnected");
                        dead.push(id);
                        break;
                    }
                }
            }
        }
        for id in dead {
            self.conns.remove(&id);
        }
        work
    }

    fn request(&mut self, conn: u64, node: NodeId, mut msg: Message) {
        let inline = match &mut msg {
            Message::Write(d) => d.inline.take(),
            _ => None,
        };
        let volume = match &msg {
            Message::Write(d) | Message::Read(d) => d.volume,
            Message::Flush(f) => f.volume,
            Message::Discard(r) | Message::WriteZeroes(r) => r.volume,
            Message::Promise(p) => p.volume,
            Message::ClearDirty(c) => c.volume,
            other => {
                tracing::debug!(node = format_args!("{node:#x}"), frame = ?other.frame_type(), "ignoring a frame a replica does not take");
                return;
            }
        };
        if self.ops.len() >= BACKLOG_MAX {
            // The owner keeps fewer requests in flight than this: a flood. Refusing it fails
            // this member for that owner, which is what a member that cannot keep up deserves.
            let reply = reply_to_wire(&Reply::Done { seq: msg_seq(&msg), status: replication::Status::BadRequest }, 0);
            if let Some(c) = self.conns.get_mut(&conn) {
                let _ = c.ep.send(&reply);
            }
            return;
        }
        let (extent_bytes, _) = self.core.geometry(volume);
        let Some(request) = request_from_wire(&msg, extent_bytes) else { return };
        let (segments, len) = match &msg {
            Message::Write(d) | Message::Read(d) => (d.segments.clone(), d.length),
            _ => (Segments::new(), 0),
        };
        let op = self.core.new_op(REMOTE_ORIGIN);
        let data = inline.map_or(Data::None, Data::Inline);
        self.ops.insert(
            op,
            RemoteOp {
                conn,
                request_len: len,
                segments,
                data,
                iov: Box::new(libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }),
                in_disk: false,
                pulling: false,
            },
        );
        self.core.call(|r| r.on_request(op, node, request));
    }

    /// Completions of one-sided transfers.
    fn transfers(&mut self) -> usize {
        let mut done: Vec<OpCompletion> = Vec::new();
        let mut buf = [OpCompletion::EMPTY; 64];
        for conn in self.conns.values_mut() {
            let n = conn.ep.poll_completions(&mut buf);
            done.extend_from_slice(&buf[..n]);
        }
        for c in &done {
            let op = c.user_data;
            let ok = c.status == proto::Status::Ok;
            let pull = self.ops.get_mut(&op).map(|o| std::mem::replace(&mut o.pulling, false));
            match pull {
                Some(true) => self.core.call(|r| r.on_pulled(op, ok)),
                Some(false) => self.core.call(|r| r.on_pushed(op, ok)),
                None => {}
            }
        }
        done.len()
    }

    fn disk(&mut self) -> usize {
        let mut work = 0;
        let mut finished: Vec<(OpId, DiskResult)> = Vec::new();
        for q in self.disks.values_mut() {
            work += q.poll();
            while let Some(c) = q.pop_completion() {
                let result = match c.status {
                    IoStatus::Ok => DiskResult::Ok,
                    IoStatus::IoError(libc::ENOSPC) | IoStatus::IoError(libc::EDQUOT) => DiskResult::NoSpace,
                    _ => DiskResult::IoError,
                };
                finished.push((c.user_data, result));
            }
        }
        for (op, result) in finished {
            work += 1;
            if let Some(o) = self.ops.get_mut(&op) {
                o.in_disk = false;
            }
            self.core.call(|r| r.on_disk(op, result));
        }
        work
    }

    fn actions(&mut self) -> usize {
        let mut actions = std::mem::take(&mut self.backlog);
        actions.extend(self.inbox.take());
        let n = actions.len();
        for action in actions {
            if let Some(back) = self.execute(action) {
                self.backlog.push_back(back);
            }
        }
        n
    }

    /// Carries an action out; gives it back if it must wait (no buffer, disk queue full).
    fn execute(&mut self, action: ReplicaAction) -> Option<ReplicaAction> {
        match action {
            ReplicaAction::Reply { op, reply, .. } => {
                let o = self.ops.remove(&op)?;
                let bytes = if matches!(reply, Reply::Done { status: replication::Status::Ok, .. }) {
                    o.request_len
                } else {
                    0
                };
                if let Data::Pool(off, len) = o.data {
                    self.pool.free(off, len);
                }
                if let Some(c) = self.conns.get_mut(&o.conn) {
                    if let Err(e) = c.ep.send(&reply_to_wire(&reply, bytes)) {
                        tracing::debug!(error = %e, "cannot answer an owner (its connection is gone)");
                    }
                }
                None
            }
            ReplicaAction::Pull { op } => {
                let o = self.ops.get(&op)?;
                let len = o.request_len as usize;
                let Some((off, alloc)) = self.pool.alloc(len) else { return Some(ReplicaAction::Pull { op }) };
                let o = self.ops.get_mut(&op).expect("present");
                o.data = Data::Pool(off, alloc);
                let local = [LocalSeg { region: self.pool.region, offset: off as u64, len: len as u32 }];
                let segments = o.segments.clone();
                let conn = o.conn;
                o.pulling = true;
                let posted = match self.conns.get_mut(&conn) {
                    Some(c) => c.ep.post_read(&segments, &local, op).map_err(|e| e.to_string()),
                    None => Err("connection gone".into()),
                };
                if let Err(e) = posted {
                    tracing::debug!(error = %e, "cannot pull a write's data");
                    self.core.call(|r| r.on_pulled(op, false));
                }
                None
            }
            ReplicaAction::Push { op } => {
                let o = self.ops.get(&op)?;
                let Data::Pool(off, _) = o.data else {
                    self.core.call(|r| r.on_pushed(op, false));
                    return None;
                };
                let local = [LocalSeg { region: self.pool.region, offset: off as u64, len: o.request_len }];
                let segments = o.segments.clone();
                let posted = match self.conns.get_mut(&o.conn) {
                    Some(c) => c.ep.post_write(&segments, &local, op).map_err(|e| e.to_string()),
                    None => Err("connection gone".into()),
                };
                if let Err(e) = posted {
                    tracing::debug!(error = %e, "cannot push a read's data");
                    self.core.call(|r| r.on_pushed(op, false));
                }
                None
            }
            ReplicaAction::DiskRead { op, volume, offset, len } => {
                let o = self.ops.get(&op)?;
                if !matches!(o.data, Data::Pool(..)) {
                    let Some((off, alloc)) = self.pool.alloc(len as usize) else {
                        return Some(ReplicaAction::DiskRead { op, volume, offset, len });
                    };
                    self.ops.get_mut(&op).expect("present").data = Data::Pool(off, alloc);
                }
                self.submit(op, volume, Op::Read, offset, u64::from(len), false)
                    .err()
                    .map(|()| ReplicaAction::DiskRead { op, volume, offset, len })
            }
            ReplicaAction::DiskWrite { op, volume, offset, len, fua } => self
                .submit(op, volume, Op::Write, offset, u64::from(len), fua)
                .err()
                .map(|()| ReplicaAction::DiskWrite { op, volume, offset, len, fua }),
            ReplicaAction::DiskFlush { op, volume } => {
                self.submit(op, volume, Op::Flush, 0, 0, false).err().map(|()| ReplicaAction::DiskFlush { op, volume })
            }
            ReplicaAction::DiskDiscard { op, volume, offset, len } => self
                .submit(op, volume, Op::Discard, offset, len, false)
                .err()
                .map(|()| ReplicaAction::DiskDiscard { op, volume, offset, len }),
            ReplicaAction::DiskZero { op, volume, offset, len } => self
                .submit(op, volume, Op::WriteZeroes { unmap: false }, offset, len, false)
                .err()
                .map(|()| ReplicaAction::DiskZero { op, volume, offset, len }),
            // Routed to the writer and meta threads, never here.
            ReplicaAction::Persist { .. }
            | ReplicaAction::ReadMeta { .. }
            | ReplicaAction::DropExtent { .. }
            | ReplicaAction::DropVolume { .. } => None,
        }
    }

    /// Puts a disk request in the volume's queue; `Err(())` if the queue is full.
    fn submit(&mut self, op: OpId, volume: u64, kind: Op, offset: u64, len: u64, fua: bool) -> Result<(), ()> {
        if !self.disks.contains_key(&volume) {
            let (_, size) = self.core.geometry(volume);
            let queue = self.core.store.data(volume, size).and_then(|backing| {
                ShardQueue::new(backing, ShardQueueConfig { depth: DISK_DEPTH, ..Default::default() })
                    .map_err(MemberError::from)
            });
            match queue {
                Ok(q) => {
                    self.disks.insert(volume, q);
                }
                Err(e) => {
                    tracing::error!(volume = format_args!("{volume:016x}"), error = %crate::control::chain(&e), "cannot open a replica's data");
                    self.core.call(|r| r.on_disk(op, DiskResult::IoError));
                    return Ok(());
                }
            }
        }
        let Some(o) = self.ops.get_mut(&op) else { return Ok(()) };
        let (ptr, n) = match (&o.data, kind) {
            (Data::Inline(d), Op::Write) => (d.as_ptr().cast_mut(), d.len()),
            // `off + len` lies inside the pool buffer (the chunk run was allocated for at least
            // the request's length), so the address stays in bounds.
            (Data::Pool(off, _), Op::Read | Op::Write) => (self.pool.buf.as_ptr().wrapping_add(*off), len as usize),
            (_, Op::Read | Op::Write) => {
                self.core.call(|r| r.on_disk(op, DiskResult::IoError));
                return Ok(());
            }
            _ => (std::ptr::null_mut(), 0),
        };
        *o.iov = libc::iovec { iov_base: ptr.cast(), iov_len: n };
        let request = IoRequest {
            user_data: op,
            op: kind,
            offset_bytes: offset,
            len_bytes: len,
            iov: if n == 0 { std::ptr::null() } else { &*o.iov },
            iov_count: u32::from(n != 0),
            fua,
        };
        let queue = self.disks.get_mut(&volume).expect("opened above");
        // SAFETY: the iovec lives in the op's box, which stays in `ops` until the op's reply
        // (which the state machine only emits after this request's completion); it points into
        // the op's inline buffer or its pool chunks, which the op holds until then too.
        match unsafe { queue.submit(request) } {
            Ok(()) => {
                o.in_disk = true;
                Ok(())
            }
            Err(_) => Err(()),
        }
    }
}

fn msg_seq(m: &Message) -> u64 {
    match m {
        Message::Write(d) | Message::Read(d) => d.request_id,
        Message::Flush(f) => f.request_id,
        Message::Discard(r) | Message::WriteZeroes(r) => r.request_id,
        Message::Promise(p) => p.request_id,
        Message::ClearDirty(c) => c.request_id,
        _ => 0,
    }
}

/// Resets a non-blocking eventfd the service does not own (a disk queue's).
fn drain_eventfd(fd: RawFd) {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into a live local from a non-blocking eventfd that the disk queue
    // owning it keeps open while the service holds the queue.
    let _ = unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
}

fn accept_loop(acceptor: Acceptor, tx: mpsc::SyncSender<Box<dyn Endpoint>>, core: &Core) {
    while !core.stopping.load(Ordering::Acquire) {
        let next: Result<Option<Box<dyn Endpoint>>, proto::TransportError> = match &acceptor {
            Acceptor::Tcp(a) => {
                a.accept_timeout(Duration::from_millis(200)).map(|e| e.map(|e| Box::new(e) as Box<dyn Endpoint>))
            }
            #[cfg(feature = "rdma")]
            Acceptor::Rdma(a) => a.accept().map(|e| Some(Box::new(e) as Box<dyn Endpoint>)),
        };
        match next {
            Ok(Some(ep)) => {
                if tx.send(ep).is_err() {
                    return;
                }
                let _ = core.service_wake.write(1);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %crate::control::chain(&e), "replica service accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Endpoints first: their threads may still read the pool through the registry.
        self.conns.clear();
        let _ = self.registry.deregister(self.pool.region);
    }
}
