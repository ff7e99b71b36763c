//! The `tcp` transport: one-sided READ/WRITE done in software, as the
//! kernel's siw does for iWARP.
//!
//! A peer's DATA_READ is served by the owner's transport straight from the
//! granted memory (`sendmsg` gathers the frame header and the window), and a
//! DATA_WRITE's payload is received straight into the window (`recvmsg`
//! scatters into it): no intermediate copy of our own. Every access is
//! checked against the key's ranges first; a refused access fails that
//! operation only (the payload, if any, is read and dropped), and the
//! connection carries on. A response to one of our operations must match
//! its direction and answer each segment once, or the peer is cut off.
//!
//! An inline WRITE is sent as frame + registered guest pieces in one
//! gathered `sendmsg`; on receipt its payload goes into a buffer of the
//! connection's bounded inline pool and travels to the application inside
//! the message.
//!
//! Accepting: [`TcpAcceptor`] authenticates off the listening thread, each
//! handshake under one deadline, a bounded number at once (`accept`).
//!
//! Threads: one reader and one writer per connection. The caller's thread
//! sends inline with `MSG_DONTWAIT` when nothing is queued, so a QD1 request
//! costs no thread hand-off on the send side; anything that would block goes
//! to the bounded queue the writer thread drains. `poll_*` never block.
//!
//! Bounds: application messages queued ≤ `send_queue`; received and unpolled
//! ≤ `recv_queue`, and inline payload bytes held ≤ `inline_budget` (then the
//! reader stops reading: TCP backpressure to the peer); one-sided operations in flight (completions not yet polled
//! included) ≤ `max_inflight`; responses to the peer's operations ≤
//! `max_inflight * MAX_SEGMENTS`, above which the peer is violating the limit
//! and is disconnected. A peer silent for `dead_after`, or not draining sent
//! data for that long, is declared dead: in-flight operations complete with
//! `ConnectionLost`.

mod accept;
mod handshake;

pub use accept::{AcceptorStats, MAX_PENDING_HANDSHAKES, MAX_READY};
pub(crate) use accept::{Authenticated, Listener};
pub(crate) use handshake::{client_handshake, Deadline};

use crate::inline::{InlineData, InlinePool};
use crate::mem::{Denied, IoPtr, LocalBuf};
use crate::ratelimit::{LogLimit, LOG_BURST, LOG_INTERVAL};
use crate::sys::{self, Chunk};
use crate::wire::{
    self, DataReq, DataResp, Descriptor, ErrorMsg, Message, Segment, Status, HEADER_LEN, MAX_DATA_LEN, MAX_FRAME,
    MAX_SEGMENTS,
};
use crate::{Access, Config, Endpoint, Grant, Key, LocalSeg, OpCompletion, RegionId, Registry, TransportError};
use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// ERROR codes sent before closing a connection.
pub const ERR_VERSION: u32 = 1;
pub const ERR_CLUSTER: u32 = 2;
pub const ERR_AUTH: u32 = 3;
pub const ERR_PROTOCOL: u32 = 4;

/// Frames the writer thread gathers into one `sendmsg`.
const WRITE_BATCH: usize = 64;

/// How recently the application must have polled for the background
/// threads to leave the connection to it.
const APP_ACTIVE: Duration = Duration::from_millis(1);

/// Why a connection is given up: what `Conn::fail` logs, with its causes.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("peer closed the connection")]
    Closed,
    #[error("peer silent, no heartbeat")]
    Silent,
    #[error("peer silent in the middle of a frame")]
    SilentMidFrame,
    #[error("peer stopped reading (send timed out)")]
    SendTimeout(#[source] std::io::Error),
    #[error("send failed")]
    Send(#[source] std::io::Error),
    #[error("receive failed")]
    Receive(#[source] std::io::Error),
    /// The peer was told (an ERROR frame) before the connection closes.
    #[error("malformed frame")]
    Malformed(#[source] wire::DecodeError),
    /// The peer was told (an ERROR frame) before the connection closes.
    #[error("protocol violation")]
    Violation(#[source] Violation),
    #[error("{0:?} frame after the handshake")]
    FrameAfterHandshake(wire::FrameType),
    #[error("unexpected {0:?} after the handshake")]
    HandshakeMessage(wire::FrameType),
    #[error("peer exceeds the in-flight operation limit")]
    TooManyResponses,
    #[error("cannot answer the peer")]
    Respond(#[source] TransportError),
    #[error("endpoint dropped")]
    Dropped,
}

/// How a peer broke the rules of responses to our one-sided operations.
#[derive(Debug, thiserror::Error)]
enum Violation {
    #[error("response for unknown operation {0:#x}")]
    UnknownOperation(u64),
    #[error("{response} for a one-sided {operation} (operation {op_id:#x})")]
    WrongDirection { response: &'static str, operation: &'static str, op_id: u64 },
    #[error("response for unknown segment {0}")]
    UnknownSegment(usize),
    #[error("second response for segment {seg} of operation {op_id:#x}")]
    Repeated { seg: usize, op_id: u64 },
    #[error("response length {got} for a {want}-byte segment")]
    Length { got: u32, want: u32 },
}

/// An error and its causes on one line, `a: b: c`, for the log.
struct Chain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        // Bounded: a cyclic source() would otherwise never end.
        for _ in 0..16 {
            let Some(c) = cause else { break };
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves its state consistent at each
    // statement boundary, so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Part {
    Bytes(Vec<u8>),
    Mem(IoPtr),
}

/// One queued unit of output: frame bytes and the registered memory that follows them.
struct OutItem {
    parts: Vec<Part>,
    len: usize,
    /// Counts against `send_queue` (an application message).
    app_msg: bool,
}

impl OutItem {
    fn frame(msg: &Message) -> Result<Self, TransportError> {
        let b = msg.to_vec().map_err(TransportError::Encode)?;
        Ok(Self { len: b.len(), parts: vec![Part::Bytes(b)], app_msg: false })
    }
    fn push_frame(&mut self, msg: &Message) -> Result<(), TransportError> {
        let b = msg.to_vec().map_err(TransportError::Encode)?;
        self.len += b.len();
        self.parts.push(Part::Bytes(b));
        Ok(())
    }
    fn push_bytes(&mut self, b: Vec<u8>) {
        self.len += b.len();
        self.parts.push(Part::Bytes(b));
    }
    fn push_mem(&mut self, pieces: Vec<IoPtr>) {
        for p in pieces {
            self.len += p.len;
            self.parts.push(Part::Mem(p));
        }
    }
    fn chunks(&self) -> impl Iterator<Item = Chunk<'_>> {
        self.parts.iter().map(|p| match p {
            Part::Bytes(b) => Chunk::Bytes(b),
            Part::Mem(m) => Chunk::Mem(m),
        })
    }
}

struct Out {
    /// Partly sent item; always goes first.
    current: VecDeque<(OutItem, usize)>,
    /// Answers to the peer's one-sided operations.
    resp: VecDeque<OutItem>,
    /// Our messages and one-sided requests, in posting order.
    app: VecDeque<OutItem>,
    app_msgs: usize,
    /// The writer thread is inside a blocking send.
    writing: bool,
    closed: bool,
    last_send: Instant,
}

struct Op {
    id: u64,
    user_data: u64,
    /// A one-sided WRITE (answered by DATA_WRITE_ACKs), else a READ
    /// (answered by DATA_READ_RESPs).
    write: bool,
    local: LocalBuf,
    /// Offset into `local` and length of each remote segment.
    segs: Vec<(usize, u32)>,
    /// Segments answered so far (bit i = segment i; MAX_SEGMENTS is 128).
    answered: u128,
    remaining: usize,
    status: Status,
    bytes: u64,
}

/// Wire `op_id` = generation (24 bits) | slot (32 bits) | segment (8 bits):
/// the responder echoes it, so a response names its operation and segment
/// without a field of its own, and a stale response (older generation) is
/// recognised.
const SEG_MASK: u64 = 0xff;

fn op_slot(op_id: u64) -> usize {
    ((op_id >> 8) & 0xffff_ffff) as usize
}

struct Ops {
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    /// In flight + completed but not yet polled.
    outstanding: usize,
    next_gen: u32,
    completions: VecDeque<OpCompletion>,
    dead: bool,
}

impl Ops {
    fn new(max: usize) -> Self {
        Self {
            slots: (0..max).map(|_| None).collect(),
            free: (0..max).rev().collect(),
            outstanding: 0,
            next_gen: 1,
            completions: VecDeque::with_capacity(max),
            dead: false,
        }
    }
    /// The operation a wire `op_id` (any of its segments) belongs to.
    fn get(&mut self, op_id: u64) -> Option<&mut Op> {
        let slot = op_slot(op_id);
        self.slots.get_mut(slot)?.as_mut().filter(|o| o.id == op_id & !SEG_MASK)
    }
    fn finish(&mut self, op_id: u64) {
        let slot = op_slot(op_id);
        if self.slots.get(slot).and_then(Option::as_ref).is_none_or(|o| o.id != op_id & !SEG_MASK) {
            return;
        }
        if let Some(op) = self.slots.get_mut(slot).and_then(Option::take) {
            let bytes = if op.status == Status::Ok { op.bytes as u32 } else { 0 };
            self.completions.push_back(OpCompletion { user_data: op.user_data, status: op.status, bytes });
            self.free.push(slot);
        }
    }
}

/// What the receiver expects next on the stream.
// One per connection; boxing the descriptor would allocate per inline WRITE.
#[allow(clippy::large_enum_variant)]
enum Stage {
    Header,
    /// The non-payload part of the body: `want` bytes, first the prefix
    /// that tells the fixed part's length, then the fixed part.
    Fixed {
        h: wire::Header,
        want: usize,
    },
    /// An inline WRITE waiting for a buffer of the connection's inline
    /// pool: nothing more is read until one is free (backpressure).
    AwaitBuffer(Descriptor),
    /// An inline WRITE's payload, received straight into its pool buffer.
    Inline {
        desc: Descriptor,
        buf: InlineData,
    },
    /// A payload received straight into registered memory.
    Payload {
        pieces: Vec<IoPtr>,
        total: usize,
        then: After,
    },
    /// A refused payload, read and dropped.
    Discard {
        left: usize,
        then: After,
    },
}

#[derive(Clone, Copy)]
enum After {
    /// Acknowledge the peer's DATA_WRITE.
    Ack(DataResp),
    /// Account a DATA_READ_RESP to our operation.
    Response(DataResp),
}

/// Body bytes every post-handshake frame has, read together with the
/// header: for data frames that is the whole fixed part.
const LOOKAHEAD: usize = wire::MIN_BODY_AFTER_HANDSHAKE;

/// Receive state: a frame may arrive in pieces over several `pump` calls.
struct Rx {
    /// Header plus the first `LOOKAHEAD` body bytes.
    hdr: [u8; HEADER_LEN + LOOKAHEAD],
    /// Fixed part of the current frame; also the discard buffer.
    body: Vec<u8>,
    got: usize,
    stage: Stage,
}

struct Conn {
    sock: TcpStream,
    peer: SocketAddr,
    peer_node: u64,
    registry: Arc<Registry>,
    out: Mutex<Out>,
    out_cv: Condvar,
    ops: Mutex<Ops>,
    /// Signalled when an operation completes (for `TcpEndpoint::wait`).
    ops_cv: Condvar,
    dead: AtomicBool,
    max_inflight: usize,
    send_queue: usize,
    resp_cap: usize,
    heartbeat: Duration,
    rx: Mutex<Rx>,
    /// Buffers for received inline WRITE payloads (bounded by `inline_budget`).
    inline_pool: InlinePool,
    /// Received application messages not yet polled (≤ `recv_cap`).
    inbox: Mutex<VecDeque<Message>>,
    recv_cap: usize,
    epoch: Instant,
    /// When the application last polled (ns since `epoch`, 0 = never).
    last_app_poll_ns: AtomicU64,
    /// When bytes last arrived (ns since `epoch`).
    last_rx_ns: AtomicU64,
    dead_after: Duration,
    /// Rate limit of the refused-access log lines.
    denials: LogLimit,
    /// Readable while a message or a completion may be waiting for the application
    /// ([`Endpoint::poll_fd`]); `signalled` saves the write when it already is.
    notify: sys::EventFd,
    signalled: AtomicBool,
}

impl Conn {
    /// Marks the connection dead, wakes both threads and fails every
    /// in-flight operation. Logs once, at `warn` unless `quiet`.
    /// Something was queued for the application: make `notify` readable.
    fn signal(&self) {
        if !self.signalled.swap(true, Ordering::AcqRel) {
            self.notify.signal();
        }
    }

    /// The application found nothing to poll: make `notify` unreadable again, unless
    /// something arrived meanwhile (checked after clearing, so no signal is lost).
    fn rearm(&self) {
        // It found nothing and may sleep now: the background receiver takes the socket
        // over at once (a poller still busy keeps receiving too; whoever holds the
        // receive lock does the work).
        self.last_app_poll_ns.store(0, Ordering::Relaxed);
        if !self.signalled.load(Ordering::Acquire) {
            return;
        }
        self.signalled.store(false, Ordering::Release);
        self.notify.clear();
        let pending = !lock(&self.inbox).is_empty() || !lock(&self.ops).completions.is_empty();
        if pending || self.dead.load(Ordering::Acquire) {
            self.signal();
        }
    }

    fn fail(&self, reason: &ConnError, quiet: bool) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            self.denials.flush(true, |n| self.denials_summary(n));
            let reason = Chain(reason);
            if quiet {
                tracing::debug!(peer = %self.peer, node = self.peer_node, "connection closed: {reason}");
            } else {
                tracing::warn!(peer = %self.peer, node = self.peer_node, "connection lost: {reason}");
            }
        }
        let _ = self.sock.shutdown(Shutdown::Both);
        {
            let mut o = lock(&self.out);
            o.closed = true;
            o.current.clear();
            o.resp.clear();
            o.app.clear();
            o.app_msgs = 0;
        }
        self.out_cv.notify_all();
        let mut ops = lock(&self.ops);
        ops.dead = true;
        let ids: Vec<u64> = ops.slots.iter().flatten().map(|o| o.id).collect();
        for id in ids {
            if let Some(op) = ops.get(id) {
                op.status = Status::ConnectionLost;
            }
            ops.finish(id);
        }
        drop(ops);
        self.ops_cv.notify_all();
        self.signal();
    }

    /// Sends inline if nothing is queued (never blocks), else queues.
    fn enqueue(&self, item: OutItem, resp: bool) -> Result<(), TransportError> {
        let mut o = lock(&self.out);
        if o.closed {
            return Err(TransportError::Disconnected);
        }
        if resp && o.resp.len() >= self.resp_cap {
            drop(o);
            self.fail(&ConnError::TooManyResponses, false);
            return Err(TransportError::Disconnected);
        }
        if !o.writing && o.current.is_empty() && o.resp.is_empty() && o.app.is_empty() {
            let chunks: Vec<Chunk<'_>> = item.chunks().collect();
            let sent = match sys::send_vectored(self.sock.as_fd(), &chunks, 0, true) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    drop(chunks);
                    drop(o);
                    // The caller gets the error; the log line gets a copy.
                    let logged = e.raw_os_error().map_or_else(|| e.kind().into(), std::io::Error::from_raw_os_error);
                    self.fail(&ConnError::Send(logged), false);
                    return Err(TransportError::Io { what: "send", source: e });
                }
            };
            drop(chunks);
            o.last_send = Instant::now();
            if sent == item.len {
                return Ok(());
            }
            o.current.push_back((item, sent));
        } else if resp {
            o.resp.push_back(item);
        } else {
            if item.app_msg {
                o.app_msgs += 1;
            }
            o.app.push_back(item);
        }
        drop(o);
        self.out_cv.notify_one();
        Ok(())
    }

    /// True if the application polled within the last millisecond: it then
    /// drives the connection itself and the background threads stand aside.
    fn app_active(&self) -> bool {
        let app = self.last_app_poll_ns.load(Ordering::Relaxed);
        app != 0 && self.now_ns().saturating_sub(app) < APP_ACTIVE.as_nanos() as u64
    }

    /// Background sender: drains the output queues with blocking sends when
    /// the application is not polling (its `poll_*`/`wait` flush otherwise),
    /// and sends heartbeats on an idle connection.
    fn writer(self: Arc<Self>) {
        let mut seq = 0u64;
        loop {
            {
                let mut o = lock(&self.out);
                loop {
                    if o.closed {
                        return;
                    }
                    let pending = !o.current.is_empty() || !o.resp.is_empty() || !o.app.is_empty();
                    if pending && !o.writing && !self.app_active() {
                        break;
                    }
                    let nap = if pending { APP_ACTIVE } else { self.heartbeat };
                    let (g, _) = self.out_cv.wait_timeout(o, nap).unwrap_or_else(|p| p.into_inner());
                    o = g;
                    self.denials.flush(false, |n| self.denials_summary(n));
                    let idle = o.current.is_empty() && o.app.is_empty() && o.resp.is_empty();
                    if !o.writing && !o.closed && idle && o.last_send.elapsed() >= self.heartbeat {
                        seq += 1;
                        let hb = Message::Heartbeat(wire::Heartbeat { sequence: seq, time_us: 0 });
                        if let Ok(item) = OutItem::frame(&hb) {
                            o.app.push_back(item);
                        }
                    }
                }
            }
            if let Err(why) = self.flush(true) {
                return self.fail(&why, false);
            }
        }
    }

    /// Sends queued output, in order, gathering up to `WRITE_BATCH` items per
    /// `sendmsg`. Whoever finds nobody else sending does it. `blocking` (the
    /// writer thread) waits for socket space, bounded by `SO_SNDTIMEO`;
    /// otherwise it stops at a full socket and leaves the rest queued.
    /// Returns whether anything was sent.
    fn flush(&self, blocking: bool) -> Result<bool, ConnError> {
        let mut batch: VecDeque<(OutItem, usize)> = VecDeque::new();
        {
            let mut o = lock(&self.out);
            if o.writing || o.closed {
                return Ok(false);
            }
            std::mem::swap(&mut batch, &mut o.current);
            while batch.len() < WRITE_BATCH {
                if let Some(i) = o.resp.pop_front() {
                    batch.push_back((i, 0));
                } else if let Some(i) = o.app.pop_front() {
                    if i.app_msg {
                        o.app_msgs -= 1;
                    }
                    batch.push_back((i, 0));
                } else {
                    break;
                }
            }
            if batch.is_empty() {
                return Ok(false);
            }
            o.writing = true;
        }
        let total: usize = batch.iter().map(|(i, s)| i.len - s).sum();
        let mut done = 0usize;
        let mut err = None;
        {
            let chunks: Vec<Chunk<'_>> = batch.iter().flat_map(|(i, _)| i.chunks()).collect();
            let mut skip: usize = batch.front().map_or(0, |(_, s)| *s);
            while done < total {
                match sys::send_vectored(self.sock.as_fd(), &chunks, skip, !blocking) {
                    Ok(n) => {
                        skip += n;
                        done += n;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !blocking => break,
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
        }
        // Drop what went out; the rest goes back in front, in order.
        let mut sent = done;
        while let Some((item, off)) = batch.front_mut() {
            let left = item.len - *off;
            if sent >= left {
                sent -= left;
                batch.pop_front();
            } else {
                *off += sent;
                break;
            }
        }
        let mut o = lock(&self.out);
        o.writing = false;
        if done > 0 {
            o.last_send = Instant::now();
        }
        if !o.closed {
            o.current = batch;
        }
        drop(o);
        if let Some(e) = err {
            return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
                ConnError::SendTimeout(e)
            } else {
                ConnError::Send(e)
            });
        }
        Ok(done > 0)
    }

    /// Background receiver: drives `pump` when the application is not
    /// polling (a replica serving one-sided operations without a poller, a
    /// caller blocked elsewhere), and notices a silent peer.
    fn rx_thread(self: Arc<Self>) {
        let idle = Duration::from_millis(1);
        loop {
            if self.dead.load(Ordering::Acquire) {
                return;
            }
            if self.app_active() {
                // The application's poller is receiving; stay out of its way,
                // but notice if nothing arrives any more. Wait on the socket, not
                // a clock: bytes that arrive after the poller's last look wake a
                // poller asleep on `notify` at once (it found nothing and rearmed
                // just before), instead of one `idle` later.
                match sys::wait_fd(self.sock.as_fd(), false, idle.as_millis() as i32) {
                    Ok(true) if self.app_active() => {
                        self.signal();
                        // Its turn to receive: give it a moment before looking again.
                        std::thread::sleep(idle / 20);
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(idle),
                }
                if self.now_ns().saturating_sub(self.last_rx_ns.load(Ordering::Relaxed))
                    > self.dead_after.as_nanos() as u64
                {
                    return self.fail(&ConnError::Silent, false);
                }
                continue;
            }
            // Nobody polls: receive here, one frame at a time so a poller
            // that starts polling takes over within a frame.
            match self.pump(1, true) {
                Ok(0) => std::thread::sleep(idle),
                Ok(_) => {}
                Err(r) => return self.fail(&r, false),
            }
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Receives and handles frames; returns how many were handled.
    ///
    /// Whoever holds the receive lock does the work; a concurrent caller
    /// returns at once. A poller (`blocking` false) never blocks, and returns
    /// as soon as a frame produced something for it to poll. The background
    /// receiver (`blocking` true) uses blocking `MSG_WAITALL` receives — one
    /// syscall for a whole payload — bounded by `SO_RCVTIMEO` (`dead_after`):
    /// heartbeats arrive well within it, so a timeout means the peer is gone.
    ///
    /// Every frame after the handshake has at least `LOOKAHEAD` body bytes,
    /// so the header and the start of the body are read in one call.
    fn pump(&self, max_frames: usize, blocking: bool) -> Result<usize, ConnError> {
        let mut rx = match self.rx.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(0),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        let rx = &mut *rx;
        let mut frames = 0;
        loop {
            if self.dead.load(Ordering::Acquire) {
                return Ok(frames);
            }
            let n = match &mut rx.stage {
                Stage::Header => {
                    if rx.got == 0 {
                        if frames >= max_frames {
                            return Ok(frames);
                        }
                        if lock(&self.inbox).len() >= self.recv_cap {
                            // The application is not draining messages: stop
                            // reading, TCP pushes back on the peer. Silence
                            // we cause ourselves is not the peer's.
                            self.last_rx_ns.store(self.now_ns(), Ordering::Relaxed);
                            return Ok(frames);
                        }
                        if frames > 0
                            && !blocking
                            && (!lock(&self.ops).completions.is_empty() || !lock(&self.inbox).is_empty())
                        {
                            // Something to poll: hand it over before the next syscall.
                            return Ok(frames);
                        }
                    }
                    sys::recv_some(self.sock.as_fd(), &mut rx.hdr[rx.got..], blocking)
                }
                Stage::Fixed { want, .. } => sys::recv_some(self.sock.as_fd(), &mut rx.body[rx.got..*want], blocking),
                Stage::AwaitBuffer(d) => match self.inline_pool.take(d.length as usize) {
                    Some(buf) => {
                        let desc = std::mem::take(d);
                        rx.stage = Stage::Inline { desc, buf };
                        continue;
                    }
                    None => {
                        // Every buffer is held by messages the application
                        // has not released: stop reading (TCP pushes back).
                        // Silence we cause ourselves is not the peer's.
                        self.last_rx_ns.store(self.now_ns(), Ordering::Relaxed);
                        return Ok(frames);
                    }
                },
                Stage::Inline { buf, .. } => {
                    sys::recv_some(self.sock.as_fd(), &mut buf.as_mut_slice()[rx.got..], blocking)
                }
                Stage::Payload { pieces, .. } => sys::recv_into_some(self.sock.as_fd(), pieces, rx.got, blocking),
                Stage::Discard { left, .. } => {
                    let k = (*left - rx.got).min(rx.body.len());
                    sys::recv_some(self.sock.as_fd(), &mut rx.body[..k], blocking)
                }
            };
            let n = match n {
                Ok(0) => return Err(ConnError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && blocking => {
                    return Err(if matches!(rx.stage, Stage::Header) && rx.got == 0 {
                        ConnError::Silent
                    } else {
                        ConnError::SilentMidFrame
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(frames),
                Err(e) => return Err(ConnError::Receive(e)),
            };
            self.last_rx_ns.store(self.now_ns(), Ordering::Relaxed);
            rx.got += n;
            let (next, got) = match &mut rx.stage {
                Stage::Header if rx.got < rx.hdr.len() => continue,
                Stage::Header => {
                    let h = wire::decode_header(&rx.hdr).map_err(|e| self.protocol_error(e))?;
                    let want = h.prefix_len();
                    if want < LOOKAHEAD {
                        return Err(ConnError::FrameAfterHandshake(h.ty));
                    }
                    rx.body[..LOOKAHEAD].copy_from_slice(&rx.hdr[HEADER_LEN..]);
                    if want == LOOKAHEAD {
                        // The lookahead holds the whole fixed part (every
                        // data frame; 24-byte control frames).
                        frames += 1;
                        (self.decode_dispatch(&h, &rx.body[..LOOKAHEAD])?, 0)
                    } else {
                        (Stage::Fixed { h, want }, LOOKAHEAD)
                    }
                }
                Stage::Fixed { want, .. } if rx.got < *want => continue,
                Stage::Fixed { h, want } => {
                    let fixed = h.fixed_len(&rx.body[..*want]).map_err(|e| self.protocol_error(e))?;
                    if fixed > *want {
                        // A WRITE with segments: the rest of its fixed part.
                        // `fixed` <= MAX_CONTROL_BODY (checked by fixed_len).
                        *want = fixed;
                        continue;
                    }
                    let h = *h;
                    frames += 1;
                    (self.decode_dispatch(&h, &rx.body[..fixed])?, 0)
                }
                Stage::AwaitBuffer(_) => continue,
                Stage::Inline { buf, .. } if rx.got < buf.len() => continue,
                Stage::Inline { .. } => {
                    if let Stage::Inline { mut desc, buf } = std::mem::replace(&mut rx.stage, Stage::Header) {
                        desc.inline = Some(buf);
                        lock(&self.inbox).push_back(Message::Write(desc));
                        self.signal();
                    }
                    (Stage::Header, 0)
                }
                Stage::Payload { total, .. } if rx.got < *total => continue,
                Stage::Discard { left, .. } if rx.got < *left => continue,
                Stage::Payload { then, .. } | Stage::Discard { then, .. } => {
                    let then = *then;
                    self.after_payload(then)?;
                    (Stage::Header, 0)
                }
            };
            rx.stage = next;
            rx.got = got;
        }
    }

    fn decode_dispatch(&self, h: &wire::Header, body: &[u8]) -> Result<Stage, ConnError> {
        let m = wire::decode_body(h, body).map_err(|e| self.protocol_error(e))?;
        self.dispatch(m)
    }

    /// Handles a decoded frame; returns what to receive next.
    fn dispatch(&self, msg: Message) -> Result<Stage, ConnError> {
        Ok(match msg {
            Message::Heartbeat(_) => Stage::Header,
            Message::Write(d) if d.is_inline() => Stage::AwaitBuffer(d),
            Message::DataRead(d) => {
                self.serve_read(d)?;
                Stage::Header
            }
            Message::DataWrite(d) => match self.registry.check_remote(d.key, d.addr, d.len, Access::RemoteWrite) {
                Ok(mem) => Stage::Payload {
                    pieces: vec![mem],
                    total: d.len as usize,
                    then: After::Ack(DataResp { op_id: d.op_id, status: Status::Ok, len: d.len }),
                },
                Err(why) => {
                    self.deny("write", &d, why);
                    Stage::Discard {
                        left: d.len as usize,
                        then: After::Ack(DataResp { op_id: d.op_id, status: Status::AccessDenied, len: 0 }),
                    }
                }
            },
            Message::DataReadResp(d) => {
                let pieces = self.check_response(&d, true)?;
                match pieces {
                    Some(p) => Stage::Payload { pieces: p, total: d.len as usize, then: After::Response(d) },
                    None => {
                        self.finish_response(d);
                        Stage::Header
                    }
                }
            }
            Message::DataWriteAck(d) => {
                self.check_response(&d, false)?;
                self.finish_response(d);
                Stage::Header
            }
            Message::Hello(_) | Message::Challenge(_) | Message::Auth(_) | Message::Ready => {
                return Err(ConnError::HandshakeMessage(msg.frame_type()));
            }
            m => {
                if let Message::Error(e) = &m {
                    tracing::warn!(peer = %self.peer, code = e.code, "peer reported: {}", e.text);
                }
                lock(&self.inbox).push_back(m);
                self.signal();
                Stage::Header
            }
        })
    }

    fn after_payload(&self, then: After) -> Result<(), ConnError> {
        match then {
            After::Ack(a) => {
                let ack = Message::DataWriteAck(a);
                self.enqueue(OutItem::frame(&ack).map_err(ConnError::Respond)?, true).map_err(ConnError::Respond)
            }
            After::Response(d) => {
                self.finish_response(d);
                Ok(())
            }
        }
    }

    /// Tells the peer its frame is malformed (best effort, the connection is
    /// closed next); returns the reason for `fail`.
    fn protocol_error(&self, e: wire::DecodeError) -> ConnError {
        let code = if matches!(e, wire::DecodeError::UnsupportedVersion { .. }) { ERR_VERSION } else { ERR_PROTOCOL };
        self.send_error(code, &e);
        ConnError::Malformed(e)
    }

    /// Tells the peer it broke the protocol (best effort, the connection is
    /// closed next); returns the reason for `fail`.
    fn violation(&self, v: Violation) -> ConnError {
        self.send_error(ERR_PROTOCOL, &v);
        ConnError::Violation(v)
    }

    fn send_error(&self, code: u32, why: &dyn std::fmt::Display) {
        let text: String = why.to_string().chars().take(wire::MAX_ERROR_TEXT).collect();
        if let Ok(b) = Message::Error(ErrorMsg { code, text }).to_vec() {
            let _ = sys::send_vectored(self.sock.as_fd(), &[Chunk::Bytes(&b)], 0, true);
        }
    }

    fn denials_summary(&self, n: u64) {
        tracing::warn!(peer = %self.peer, node = self.peer_node, "{n} more refused one-sided accesses not logged");
    }

    /// A refused access fails that operation only; the peer can trigger it
    /// at will, so it is logged rate-limited.
    fn deny(&self, what: &str, d: &DataReq, why: Denied) {
        self.denials.log(|n| self.denials_summary(n), || {
            tracing::warn!(peer = %self.peer, node = self.peer_node, key = format_args!("{:#x}", d.key), addr = format_args!("{:#x}", d.addr), len = d.len, "refused one-sided {what}: {why:?}")
        });
    }

    fn serve_read(&self, d: DataReq) -> Result<(), ConnError> {
        let mut item = OutItem { parts: Vec::with_capacity(2), len: 0, app_msg: false };
        match self.registry.check_remote(d.key, d.addr, d.len, Access::RemoteRead) {
            Ok(mem) => {
                let r = DataResp { op_id: d.op_id, status: Status::Ok, len: d.len };
                item.push_frame(&Message::DataReadResp(r)).map_err(ConnError::Respond)?;
                item.push_mem(vec![mem]);
            }
            Err(why) => {
                self.deny("read", &d, why);
                let r = DataResp { op_id: d.op_id, status: Status::AccessDenied, len: 0 };
                item.push_frame(&Message::DataReadResp(r)).map_err(ConnError::Respond)?;
            }
        }
        self.enqueue(item, true).map_err(ConnError::Respond)
    }

    /// Validates a response against our operation; for a successful READ
    /// response returns the local memory its payload goes to.
    ///
    /// A response must match its operation's direction (a DATA_READ_RESP
    /// answers a one-sided READ only: accepting it for a WRITE would write
    /// the peer's bytes into our source buffer) and answer each segment
    /// once (a repeat must not stand in for a missing segment: that would
    /// complete a torn transfer as Ok). A violation is a protocol error.
    fn check_response(&self, d: &DataResp, read: bool) -> Result<Option<Vec<IoPtr>>, ConnError> {
        let mut ops = lock(&self.ops);
        let op = ops.get(d.op_id).ok_or_else(|| self.violation(Violation::UnknownOperation(d.op_id)))?;
        if op.write == read {
            return Err(self.violation(Violation::WrongDirection {
                response: if read { "DATA_READ_RESP" } else { "DATA_WRITE_ACK" },
                operation: if op.write { "WRITE" } else { "READ" },
                op_id: d.op_id,
            }));
        }
        let seg = (d.op_id & SEG_MASK) as usize;
        let &(off, len) = op.segs.get(seg).ok_or_else(|| self.violation(Violation::UnknownSegment(seg)))?;
        let bit = 1u128 << seg;
        if op.answered & bit != 0 {
            return Err(self.violation(Violation::Repeated { seg, op_id: d.op_id & !SEG_MASK }));
        }
        op.answered |= bit;
        if d.status == Status::Ok && d.len != len {
            return Err(self.violation(Violation::Length { got: d.len, want: len }));
        }
        Ok((read && d.status == Status::Ok && len > 0).then(|| op.local.sub(off, len as usize)))
    }

    fn finish_response(&self, d: DataResp) {
        let mut ops = lock(&self.ops);
        if let Some(op) = ops.get(d.op_id) {
            if d.status != Status::Ok && op.status == Status::Ok {
                op.status = d.status;
            }
            op.bytes += u64::from(d.len);
            op.remaining -= 1;
            if op.remaining == 0 {
                ops.finish(d.op_id);
                drop(ops);
                self.ops_cv.notify_one();
                self.signal();
            }
        }
    }
}

/// A connected, authenticated `tcp` endpoint.
pub struct TcpEndpoint {
    conn: Arc<Conn>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpEndpoint").field("peer", &self.conn.peer).field("peer_node", &self.conn.peer_node).finish()
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { what, source }
}

impl TcpEndpoint {
    /// Connects to `addr` and authenticates. Blocking (slow path), bounded by
    /// `cfg.handshake_timeout`.
    pub fn connect(addr: impl ToSocketAddrs, cfg: &Config, registry: Arc<Registry>) -> Result<Self, TransportError> {
        cfg.validate()?;
        let addr =
            addr.to_socket_addrs().map_err(io("resolve"))?.next().ok_or(TransportError::Handshake("no address"))?;
        // One deadline for connect and handshake together.
        let deadline = Deadline::after(cfg.handshake_timeout);
        let mut sock = TcpStream::connect_timeout(&addr, cfg.handshake_timeout).map_err(io("connect"))?;
        let peer_node = client_handshake(&mut sock, cfg, &deadline)?;
        Self::start(sock, addr, peer_node, cfg, registry)
    }

    fn start(
        sock: TcpStream,
        peer: SocketAddr,
        peer_node: u64,
        cfg: &Config,
        registry: Arc<Registry>,
    ) -> Result<Self, TransportError> {
        sock.set_nodelay(true).map_err(io("setsockopt"))?;
        // Blocking writes (writer thread) and mid-frame receives (`pump`)
        // time out so a peer that stopped reading or sending is noticed;
        // between frames a silent peer is caught by `rx_thread`. Heartbeats
        // keep a healthy idle connection under these limits.
        sock.set_read_timeout(Some(cfg.dead_after)).map_err(io("setsockopt"))?;
        sock.set_write_timeout(Some(cfg.dead_after)).map_err(io("setsockopt"))?;
        sys::set_user_timeout(sock.as_fd(), cfg.dead_after.as_millis().min(u32::MAX.into()) as u32)
            .map_err(io("setsockopt"))?;
        // Checked by `connect` and `TcpAcceptor::bind` (`Config::validate`).
        let max_inflight = cfg.max_inflight;
        const _: () = assert!(crate::MAX_INFLIGHT_MAX as u64 <= u32::MAX as u64);
        const _: () = assert!(MAX_SEGMENTS as u64 <= SEG_MASK + 1);
        const _: () = assert!(MAX_SEGMENTS <= u128::BITS as usize);
        let notify = sys::EventFd::new().map_err(io("eventfd"))?;
        let conn = Arc::new(Conn {
            sock,
            peer,
            peer_node,
            registry,
            out: Mutex::new(Out {
                current: VecDeque::new(),
                resp: VecDeque::new(),
                app: VecDeque::new(),
                app_msgs: 0,
                writing: false,
                closed: false,
                last_send: Instant::now(),
            }),
            out_cv: Condvar::new(),
            ops: Mutex::new(Ops::new(max_inflight)),
            ops_cv: Condvar::new(),
            dead: AtomicBool::new(false),
            max_inflight,
            send_queue: cfg.send_queue,
            resp_cap: max_inflight * MAX_SEGMENTS,
            heartbeat: cfg.heartbeat,
            rx: Mutex::new(Rx {
                hdr: [0; HEADER_LEN + LOOKAHEAD],
                body: vec![0; MAX_FRAME],
                got: 0,
                stage: Stage::Header,
            }),
            inline_pool: InlinePool::new(cfg.inline_budget),
            inbox: Mutex::new(VecDeque::new()),
            recv_cap: cfg.recv_queue,
            epoch: Instant::now(),
            last_app_poll_ns: AtomicU64::new(0),
            last_rx_ns: AtomicU64::new(0),
            dead_after: cfg.dead_after,
            denials: LogLimit::new(LOG_BURST, LOG_INTERVAL),
            notify,
            signalled: AtomicBool::new(false),
        });
        let r = conn.clone();
        let reader = std::thread::Builder::new()
            .name("hcblk-tcp-rx".into())
            .spawn(move || r.rx_thread())
            .map_err(io("spawn"))?;
        let w = conn.clone();
        let writer =
            std::thread::Builder::new().name("hcblk-tcp-tx".into()).spawn(move || w.writer()).map_err(io("spawn"))?;
        tracing::info!(peer = %peer, node = peer_node, "tcp transport connected");
        Ok(Self { conn, threads: vec![reader, writer] })
    }

    /// Blocks until a one-sided operation has completed (or the connection
    /// failed), at most `timeout`. For callers without a poller to drive:
    /// a poller never calls this.
    pub fn wait(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.drive();
            {
                let ops = lock(&self.conn.ops);
                if !ops.completions.is_empty() || ops.dead {
                    return;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            // This thread receives; short slices so a completion the
            // background receiver handled meanwhile is not missed for long.
            self.conn.last_app_poll_ns.store(self.conn.now_ns().max(1), Ordering::Relaxed);
            let out = {
                let o = lock(&self.conn.out);
                !o.current.is_empty() || !o.resp.is_empty() || !o.app.is_empty()
            };
            let _ = sys::wait_fd(self.conn.sock.as_fd(), out, 1);
        }
    }

    /// Receives what is pending on the caller's thread (the poller drives
    /// the connection; the background receiver then stays idle).
    fn drive(&self) {
        self.conn.last_app_poll_ns.store(self.conn.now_ns().max(1), Ordering::Relaxed);
        let r = self.conn.pump(64, false).and_then(|_| self.conn.flush(false));
        if let Err(r) = r {
            self.conn.fail(&r, false);
        }
    }

    /// Room for one more application message in the send queue?
    fn admit_app_msg(&self) -> Result<(), TransportError> {
        if self.conn.dead.load(Ordering::Acquire) {
            return Err(TransportError::Disconnected);
        }
        if lock(&self.conn.out).app_msgs >= self.conn.send_queue {
            return Err(TransportError::QueueFull);
        }
        Ok(())
    }

    /// Bytes of inline payload buffers held by received messages not yet
    /// dropped (bounded by `Config::inline_budget`).
    pub fn inline_bytes_held(&self) -> usize {
        self.conn.inline_pool.lent()
    }

    /// The peer's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.conn.peer
    }

    /// The registry this endpoint grants from (shared across reconnections).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.conn.registry
    }

    fn post(
        &mut self,
        remote: &[Segment],
        local: &[LocalSeg],
        user_data: u64,
        write: bool,
    ) -> Result<(), TransportError> {
        if remote.is_empty() || remote.len() > MAX_SEGMENTS {
            return Err(TransportError::Limit("remote segments per operation"));
        }
        if remote.iter().any(|s| s.len == 0 || s.len > MAX_DATA_LEN) {
            return Err(TransportError::Limit("remote segment length"));
        }
        let local = self.conn.registry.local(local)?;
        let remote_total: usize = remote.iter().map(|s| s.len as usize).sum();
        if remote_total != local.total {
            return Err(TransportError::LengthMismatch { local: local.total, remote: remote_total });
        }
        let mut segs = Vec::with_capacity(remote.len());
        let mut off = 0usize;
        for s in remote {
            segs.push((off, s.len));
            off += s.len as usize;
        }
        let mut item = OutItem { parts: Vec::with_capacity(remote.len() * 2), len: 0, app_msg: false };
        let op_id = {
            let mut ops = lock(&self.conn.ops);
            if ops.dead {
                return Err(TransportError::Disconnected);
            }
            if ops.outstanding >= self.conn.max_inflight {
                return Err(TransportError::TooManyInFlight(self.conn.max_inflight));
            }
            let slot = ops.free.pop().ok_or(TransportError::TooManyInFlight(self.conn.max_inflight))?;
            let op_id = (u64::from(ops.next_gen) << 40) | ((slot as u64) << 8);
            ops.next_gen = (ops.next_gen + 1) & 0xff_ffff;
            for (i, (s, &(o, l))) in remote.iter().zip(&segs).enumerate() {
                // `i` < MAX_SEGMENTS (128, checked above) fits in SEG_MASK.
                let d = DataReq { op_id: op_id | i as u64, addr: s.addr, key: s.key, len: s.len };
                if write {
                    item.push_frame(&Message::DataWrite(d))?;
                    item.push_mem(local.sub(o, l as usize));
                } else {
                    item.push_frame(&Message::DataRead(d))?;
                }
            }
            ops.slots[slot] = Some(Op {
                id: op_id,
                user_data,
                write,
                answered: 0,
                local,
                remaining: segs.len(),
                segs,
                status: Status::Ok,
                bytes: 0,
            });
            ops.outstanding += 1;
            op_id
        };
        if let Err(e) = self.conn.enqueue(item, false) {
            // The connection failed: `fail` completes the operation with
            // ConnectionLost, unless it ran before we inserted it.
            let mut ops = lock(&self.conn.ops);
            if let Some(op) = ops.get(op_id) {
                op.status = Status::ConnectionLost;
                ops.finish(op_id);
            }
            drop(ops);
            self.conn.signal();
            return Err(e);
        }
        Ok(())
    }
}

impl Endpoint for TcpEndpoint {
    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        crate::check_send(msg)?;
        self.admit_app_msg()?;
        let mut item = OutItem::frame(msg)?;
        if let Message::Write(Descriptor { inline: Some(data), .. }) = msg {
            // A payload we do not own past this call: copied (forwarding
            // path; registered memory goes through `send_inline`).
            item.push_bytes(data.to_vec());
        }
        item.app_msg = true;
        self.conn.enqueue(item, false)
    }

    fn send_inline(&mut self, msg: &Message, payload: &[LocalSeg]) -> Result<(), TransportError> {
        crate::check_send_inline(msg, payload)?;
        self.admit_app_msg()?;
        let local = self.conn.registry.local(payload)?;
        let mut item = OutItem::frame(msg)?;
        // Gathered by `sendmsg` straight from the registered memory.
        item.push_mem(local.pieces);
        item.app_msg = true;
        self.conn.enqueue(item, false)
    }

    fn poll_recv(&mut self) -> Result<Option<Message>, TransportError> {
        if let Some(m) = lock(&self.conn.inbox).pop_front() {
            return Ok(Some(m));
        }
        self.drive();
        // Bound first: a guard in the match scrutinee would be held through `rearm`.
        let next = lock(&self.conn.inbox).pop_front();
        match next {
            Some(m) => Ok(Some(m)),
            None if self.conn.dead.load(Ordering::Acquire) => Err(TransportError::Disconnected),
            None => {
                self.conn.rearm();
                Ok(None)
            }
        }
    }

    unsafe fn register_region(&mut self, ptr: *mut u8, len: usize) -> Result<RegionId, TransportError> {
        // SAFETY: the caller upholds `Registry::register`'s contract (same as ours).
        unsafe { self.conn.registry.register(ptr, len) }
    }

    fn deregister_region(&mut self, region: RegionId) -> Result<(), TransportError> {
        self.conn.registry.deregister(region)
    }

    fn grant(&mut self, region: RegionId, ranges: &[(u64, u32)], access: Access) -> Result<Grant, TransportError> {
        self.conn.registry.grant(region, ranges, access)
    }

    fn revoke(&mut self, key: Key) -> Result<(), TransportError> {
        self.conn.registry.revoke(key)
    }

    fn post_read(&mut self, remote: &[Segment], local: &[LocalSeg], user_data: u64) -> Result<(), TransportError> {
        self.post(remote, local, user_data, false)
    }

    fn post_write(&mut self, remote: &[Segment], local: &[LocalSeg], user_data: u64) -> Result<(), TransportError> {
        self.post(remote, local, user_data, true)
    }

    fn poll_completions(&mut self, out: &mut [OpCompletion]) -> usize {
        self.drive();
        let mut ops = lock(&self.conn.ops);
        let mut n = 0;
        while n < out.len() {
            match ops.completions.pop_front() {
                Some(c) => {
                    out[n] = c;
                    n += 1;
                }
                None => break,
            }
        }
        ops.outstanding -= n;
        drop(ops);
        if n == 0 {
            self.conn.rearm();
        }
        n
    }

    fn peer_node_id(&self) -> u64 {
        self.conn.peer_node
    }

    fn is_connected(&self) -> bool {
        !self.conn.dead.load(Ordering::Acquire)
    }

    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.conn.notify.raw())
    }
}

impl Drop for TcpEndpoint {
    fn drop(&mut self) {
        // Wakes both threads; they exit on the dead flag.
        self.conn.fail(&ConnError::Dropped, true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Accepts and authenticates incoming connections.
///
/// Handshakes run off the listening thread, each under one deadline
/// (`Config::handshake_timeout`), at most [`MAX_PENDING_HANDSHAKES`] at once
/// (the oldest is evicted for a newcomer); see [`AcceptorStats`].
#[derive(Debug)]
pub struct TcpAcceptor {
    listener: Listener,
    cfg: Config,
    registry: Arc<Registry>,
}

impl TcpAcceptor {
    /// Binds and starts listening and authenticating in the background.
    pub fn bind(addr: impl ToSocketAddrs, cfg: Config, registry: Arc<Registry>) -> Result<Self, TransportError> {
        cfg.validate()?;
        Ok(Self { listener: Listener::bind(addr, cfg.clone())?, cfg, registry })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.listener.local_addr())
    }

    /// Waits for the next authenticated peer. Refused peers never show up
    /// here: they are logged (rate-limited) and counted in [`Self::stats`].
    pub fn accept(&self) -> Result<TcpEndpoint, TransportError> {
        match self.listener.next(None)? {
            Some(a) => self.start(a),
            None => Err(TransportError::Disconnected),
        }
    }

    /// As [`Self::accept`], giving up after `timeout` with `Ok(None)`.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<TcpEndpoint>, TransportError> {
        self.listener.next(Some(timeout))?.map(|a| self.start(a)).transpose()
    }

    /// Counters of handshakes since `bind`.
    pub fn stats(&self) -> AcceptorStats {
        self.listener.stats()
    }

    fn start(&self, a: Authenticated) -> Result<TcpEndpoint, TransportError> {
        TcpEndpoint::start(a.sock, a.peer, a.node, &self.cfg, self.registry.clone())
    }
}

#[cfg(test)]
mod tests;
