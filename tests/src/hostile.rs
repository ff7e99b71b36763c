//! A hostile peer for the replication wire protocol (v2), built on `proto`'s codec and
//! authentication, not on its transport: it sends exactly the bytes it wants — garbage,
//! truncated or slow handshakes, forged proofs, and, after a real handshake ("a peer that
//! knows the secret and lies"), descriptors with lying stamps, one-sided accesses with forged
//! keys, responses nobody asked for or in the wrong direction, duplicate segment responses and
//! floods — and reports what the target did.
//!
//! It plays the *initiator* (an owner connecting to a replica's listen port). As an honest
//! initiator would, it serves the target's one-sided operations on the memory it claims in
//! its descriptors ([`Memory`]); a [`ReadPolicy`] says how it lies while doing so.
//!
//! Every receive is bounded by a timeout, every frame by the protocol's sizes; a target that
//! stops answering shows up as [`Received::TimedOut`], never as a hung test.

use anyhow::{anyhow, bail, Context, Result};
use proto::auth::{self, Role, Secret};
use proto::tcp::{ERR_AUTH, ERR_CLUSTER, ERR_PROTOCOL, ERR_VERSION};
use proto::wire::{
    self, Completion, DataReq, DataResp, Descriptor, ErrorMsg, Hello, Message, Segment, Segments, Status, HEADER_LEN,
    MAC_LEN, MAX_CONTROL_BODY, MAX_DATA_LEN, NONCE_LEN,
};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest frame a target may legally send, payload included.
const FRAME_MAX: usize = HEADER_LEN + MAX_CONTROL_BODY + MAX_DATA_LEN as usize;
/// Receive buffer growth step.
const READ_CHUNK: usize = 64 << 10;

/// Who the hostile peer claims to be.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cluster_id: u64,
    /// The node id sent in HELLO: anyone's, e.g. `replication::node_id("n1")` to impersonate
    /// n1.
    pub node_id: u64,
    /// The secret its proof is computed with; `None`: a random proof (forged AUTH).
    pub secret: Option<Secret>,
}

/// One thing read from the target.
// Matched by value all over the tests; a test reads a few thousand frames at most.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Received {
    /// A frame and the payload that followed it (data frames, inline WRITEs).
    Frame(Message, Vec<u8>),
    /// The target closed the connection (EOF or reset).
    Closed,
    TimedOut,
    /// Bytes that do not decode: the stream is unusable from here.
    Malformed(String),
}

/// How a handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// READY. `server_proof_valid`: the acceptor's CHALLENGE proof checks out with our secret.
    Ready { server_node: u64, server_proof_valid: bool },
    /// ERROR frame (then, normally, the connection closed).
    Refused { code: u32, text: String },
    /// Closed without an ERROR.
    Closed,
    /// Nothing within the timeout.
    TimedOut,
}

/// How a target closed a connection we expected it to close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closing {
    /// The ERROR it sent first, if any.
    pub error: Option<(u32, String)>,
    pub after: Duration,
    /// Frames received before the close (heartbeats included).
    pub frames: u64,
}

/// A raw TCP connection to a target, speaking whatever the test wants.
pub struct HostileConn {
    sock: TcpStream,
    peer: SocketAddr,
    rx: Vec<u8>,
    closed: bool,
}

impl std::fmt::Debug for HostileConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostileConn").field("peer", &self.peer).finish()
    }
}

impl HostileConn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let sock = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
        sock.set_nodelay(true)?;
        sock.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { sock, peer: addr, rx: Vec::new(), closed: false })
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// A second handle on the socket (for a writer thread).
    pub fn try_clone_socket(&self) -> Result<TcpStream> {
        self.sock.try_clone().context("clone the socket")
    }

    /// Writes `bytes` as they are; an error if the target stopped reading for 10 s. A target
    /// that already closed the connection (it refused something sent before, while more was
    /// on its way) is not an error here: what follows reads its ERROR frame and the close.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        match self.sock.write_all(bytes) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) => {
                eprintln!(
                    "send {} bytes to {}: the target closed the connection already ({e})",
                    bytes.len(),
                    self.peer
                );
                Ok(())
            }
            r => r.with_context(|| format!("send {} bytes to {}", bytes.len(), self.peer)),
        }
    }

    /// Encodes `m` (which must be valid: lies live in the values, not the framing).
    pub fn send(&mut self, m: &Message) -> Result<()> {
        let b = m.to_vec().map_err(|e| anyhow!("encode {:?}: {e}", m.frame_type()))?;
        self.send_raw(&b)
    }

    /// `m` followed by `payload` (a data frame's or an inline WRITE's).
    pub fn send_with_payload(&mut self, m: &Message, payload: &[u8]) -> Result<()> {
        let mut b = m.to_vec().map_err(|e| anyhow!("encode {:?}: {e}", m.frame_type()))?;
        b.extend_from_slice(payload);
        self.send_raw(&b)
    }

    /// The next frame, whatever it is, or what happened instead.
    pub fn recv(&mut self, timeout: Duration) -> Result<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.take_frame() {
                return Ok(r);
            }
            if self.closed {
                return Ok(Received::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Received::TimedOut);
            }
            self.sock.set_read_timeout(Some(left))?;
            let have = self.rx.len();
            self.rx.resize(have + READ_CHUNK, 0);
            match self.sock.read(&mut self.rx[have..]) {
                Ok(0) => {
                    self.rx.truncate(have);
                    self.closed = true;
                }
                Ok(n) => self.rx.truncate(have + n),
                Err(e) => {
                    self.rx.truncate(have);
                    match e.kind() {
                        ErrorKind::WouldBlock | ErrorKind::TimedOut => return Ok(Received::TimedOut),
                        ErrorKind::Interrupted => {}
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                            self.closed = true
                        }
                        _ => return Err(e).with_context(|| format!("receive from {}", self.peer)),
                    }
                }
            }
        }
    }

    /// The next frame that is not a HEARTBEAT.
    pub fn recv_app(&mut self, timeout: Duration) -> Result<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Received::Frame(Message::Heartbeat(_), _) => continue,
                other => return Ok(other),
            }
        }
    }

    /// A whole frame from the receive buffer, if one is there.
    fn take_frame(&mut self) -> Option<Received> {
        if self.rx.len() < HEADER_LEN {
            return None;
        }
        let h = match wire::decode_header(&self.rx) {
            Ok(h) => h,
            Err(e) => return Some(Received::Malformed(format!("header: {e}"))),
        };
        let total = HEADER_LEN + h.body_len as usize;
        if total > FRAME_MAX {
            return Some(Received::Malformed(format!("frame of {total} bytes")));
        }
        if self.rx.len() < total {
            return None;
        }
        let body = &self.rx[HEADER_LEN..total];
        let r = match h.fixed_len(body).and_then(|fixed| wire::decode_body(&h, body).map(|m| (m, fixed))) {
            Ok((m, fixed)) => Received::Frame(m, body[fixed..].to_vec()),
            Err(e) => Received::Malformed(format!("{:?} body: {e}", h.ty)),
        };
        self.rx.drain(..total);
        Some(r)
    }

    /// Runs the initiator's side of the handshake as `id` says (with its secret, a forged
    /// proof, or a foreign one).
    pub fn handshake(&mut self, id: &Identity, timeout: Duration) -> Result<HandshakeOutcome> {
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let nonce = auth::nonce().context("nonce")?;
        self.send(&Message::Hello(Hello { cluster_id: id.cluster_id, node_id: id.node_id, nonce }))?;
        let ch = match self.recv(left())? {
            Received::Frame(Message::Challenge(c), _) => c,
            Received::Frame(Message::Error(e), _) => {
                return Ok(HandshakeOutcome::Refused { code: e.code, text: e.text })
            }
            Received::Closed => return Ok(HandshakeOutcome::Closed),
            Received::TimedOut => return Ok(HandshakeOutcome::TimedOut),
            other => bail!("expected CHALLENGE, got {other:?}"),
        };
        let ctx = auth::Context {
            cluster_id: id.cluster_id,
            client_node: id.node_id,
            server_node: ch.node_id,
            client_nonce: nonce,
            server_nonce: ch.nonce,
        };
        let (proof, server_proof_valid) = match &id.secret {
            Some(s) => (auth::tag(s, Role::Client, &ctx), auth::verify(s, Role::Server, &ctx, &ch.mac)),
            None => {
                let mut forged = [0u8; MAC_LEN];
                forged.copy_from_slice(&auth::nonce().context("forge")?[..MAC_LEN]);
                (forged, false)
            }
        };
        // A liar goes on even when the acceptor's proof does not check out.
        self.send(&Message::Auth(proof))?;
        Ok(match self.recv(left())? {
            Received::Frame(Message::Ready, _) => {
                HandshakeOutcome::Ready { server_node: ch.node_id, server_proof_valid }
            }
            Received::Frame(Message::Error(e), _) => HandshakeOutcome::Refused { code: e.code, text: e.text },
            Received::Closed => HandshakeOutcome::Closed,
            Received::TimedOut => HandshakeOutcome::TimedOut,
            other => bail!("expected READY, got {other:?}"),
        })
    }

    /// Reads and drops frames until the target closes the connection; an error if it is still
    /// open after `timeout`.
    pub fn wait_closed(&mut self, timeout: Duration) -> Result<Closing> {
        let start = Instant::now();
        let mut error = None;
        let mut frames = 0;
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match self.recv(left)? {
                Received::Frame(Message::Error(e), _) => {
                    frames += 1;
                    error.get_or_insert((e.code, e.text));
                }
                Received::Frame(..) => frames += 1,
                Received::Closed => return Ok(Closing { error, after: start.elapsed(), frames }),
                // The stream is unusable, and the target may still be sending: drop it.
                Received::Malformed(m) => bail!("target sent undecodable bytes: {m}"),
                Received::TimedOut => {
                    bail!("{} kept the connection open for {timeout:?} ({frames} frames, error {error:?})", self.peer)
                }
            }
        }
    }

    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

/// Connects and completes the handshake as `id`; an error unless the target said READY.
pub fn authenticated(addr: SocketAddr, id: &Identity) -> Result<HostileConn> {
    let mut c = HostileConn::connect(addr, Duration::from_secs(5))?;
    match c.handshake(id, Duration::from_secs(10))? {
        HandshakeOutcome::Ready { .. } => Ok(c),
        other => bail!("handshake with {addr} as node {:#x}: {other:?}", id.node_id),
    }
}

/// The initiator memory a descriptor points the target at: `bytes` at virtual address `base`.
#[derive(Clone, Debug)]
pub struct Memory {
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl Memory {
    pub fn new(base: u64, bytes: Vec<u8>) -> Self {
        Self { base, bytes }
    }

    /// `[offset, offset + len)` of this memory as `pieces` segments of near-equal size, all
    /// under `key`.
    pub fn segments(&self, offset: u64, len: u32, pieces: u32, key: u32) -> Segments {
        let pieces = pieces.clamp(1, len.max(1));
        let mut segs = Segments::new();
        let mut at = 0u32;
        for i in 0..pieces {
            let n = len / pieces + u32::from(i < len % pieces);
            segs.push(Segment { addr: self.base + offset + u64::from(at), key, len: n });
            at += n;
        }
        segs
    }

    fn window(&self, addr: u64, len: u32) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        let end = start.checked_add(len as usize)?;
        (end <= self.bytes.len()).then_some(start..end)
    }
}

/// How the hostile peer answers the target's one-sided READs of a descriptor's segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPolicy {
    /// With the bytes asked for.
    Honest,
    /// The first segment's response twice, and never the last segment's: a repeat standing in
    /// for a missing segment would complete a torn transfer.
    DuplicateFirst,
    /// A DATA_WRITE_ACK (the response of the other direction) instead of DATA_READ_RESP.
    WrongDirection,
    /// The first segment honestly, then the connection is closed: a transfer cut short.
    CloseAfterFirst,
    /// Never answer.
    Silent,
}

/// What became of one descriptor sent by [`drive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriveOutcome {
    /// The target's COMPLETION for the descriptor.
    Completed {
        status: Status,
        bytes: u32,
    },
    /// The target closed the connection (after an ERROR, if it sent one).
    Closed {
        error: Option<(u32, String)>,
    },
    TimedOut,
}

/// What [`drive`] saw besides the outcome.
#[derive(Debug, Clone)]
pub struct Drive {
    pub outcome: DriveOutcome,
    /// One-sided READs the target posted (the data it tried to pull).
    pub data_reads: u64,
    /// One-sided WRITEs the target posted (data it pushed into our memory).
    pub data_writes: u64,
    /// Other frames (completions of other requests, PROMISE_ACKs, ...).
    pub other: Vec<Message>,
}

/// Sends `m` (a WRITE, READ, FLUSH, ... whose request id is `request_id`; an inline WRITE with
/// `payload`) and serves the target's one-sided operations on `mem` as `policy` says, until
/// the COMPLETION of `request_id` (or a PROMISE_ACK of it), a close, or `timeout`.
pub fn drive(
    conn: &mut HostileConn,
    m: &Message,
    payload: &[u8],
    mem: &mut Memory,
    policy: ReadPolicy,
    timeout: Duration,
) -> Result<Drive> {
    let request_id = match m {
        Message::Write(d) | Message::Read(d) => d.request_id,
        Message::Flush(f) => f.request_id,
        Message::Discard(r) | Message::WriteZeroes(r) => r.request_id,
        Message::Promise(p) => p.request_id,
        Message::ClearDirty(c) => c.request_id,
        other => bail!("drive: {:?} is not a request", other.frame_type()),
    };
    conn.send_with_payload(m, payload)?;
    let start = Instant::now();
    let mut d = Drive { outcome: DriveOutcome::TimedOut, data_reads: 0, data_writes: 0, other: Vec::new() };
    let mut answered_first = false;
    let mut error = None;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match conn.recv_app(left)? {
            Received::Frame(Message::Completion(c), _) if c.request_id == request_id => {
                d.outcome = DriveOutcome::Completed { status: c.status, bytes: c.bytes };
                return Ok(d);
            }
            Received::Frame(Message::PromiseAck(a), _) if a.request_id == request_id => {
                d.outcome = DriveOutcome::Completed { status: a.status, bytes: 0 };
                d.other.push(Message::PromiseAck(a));
                return Ok(d);
            }
            Received::Frame(Message::DataRead(r), _) => {
                d.data_reads += 1;
                let honest = |mem: &Memory| match mem.window(r.addr, r.len) {
                    Some(w) => (
                        Message::DataReadResp(DataResp { op_id: r.op_id, status: Status::Ok, len: r.len }),
                        mem.bytes[w].to_vec(),
                    ),
                    None => (
                        Message::DataReadResp(DataResp { op_id: r.op_id, status: Status::AccessDenied, len: 0 }),
                        Vec::new(),
                    ),
                };
                match policy {
                    ReadPolicy::Honest => {
                        let (resp, data) = honest(mem);
                        conn.send_with_payload(&resp, &data)?;
                    }
                    ReadPolicy::DuplicateFirst => {
                        // Answer only segment 0 (the low 8 bits of op_id name the segment), twice.
                        if r.op_id & 0xff == 0 && !answered_first {
                            answered_first = true;
                            let (resp, data) = honest(mem);
                            conn.send_with_payload(&resp, &data)?;
                            conn.send_with_payload(&resp, &data)?;
                        }
                    }
                    ReadPolicy::WrongDirection => {
                        conn.send(&Message::DataWriteAck(DataResp { op_id: r.op_id, status: Status::Ok, len: r.len }))?;
                    }
                    ReadPolicy::CloseAfterFirst => {
                        let (resp, data) = honest(mem);
                        conn.send_with_payload(&resp, &data)?;
                        conn.shutdown();
                        d.outcome = DriveOutcome::Closed { error: None };
                        return Ok(d);
                    }
                    ReadPolicy::Silent => {}
                }
            }
            Received::Frame(Message::DataWrite(w), data) => {
                d.data_writes += 1;
                let (status, len) = match mem.window(w.addr, w.len) {
                    Some(win) => {
                        mem.bytes[win].copy_from_slice(&data);
                        (Status::Ok, w.len)
                    }
                    None => (Status::AccessDenied, 0),
                };
                conn.send(&Message::DataWriteAck(DataResp { op_id: w.op_id, status, len }))?;
            }
            Received::Frame(Message::Error(e), _) => {
                error.get_or_insert((e.code, e.text.clone()));
                d.other.push(Message::Error(e));
            }
            Received::Frame(m, _) => d.other.push(m),
            Received::Closed => {
                d.outcome = DriveOutcome::Closed { error };
                return Ok(d);
            }
            Received::TimedOut => return Ok(d),
            Received::Malformed(m) => bail!("target sent undecodable bytes: {m}"),
        }
    }
}

/// A READ/WRITE descriptor with the given stamps (no segments, not inline).
pub fn descriptor(
    request_id: u64,
    volume: u64,
    generation: u64,
    epoch: u32,
    incarnation: u64,
    offset: u64,
    length: u32,
) -> Descriptor {
    Descriptor { request_id, volume, generation, offset, length, epoch, incarnation, ..Descriptor::default() }
}

// --- attacks before authentication --------------------------------------------------------

/// Connects, sends `bytes`, and waits (up to `timeout`) for the target to close.
pub fn garbage(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Result<Closing> {
    let mut c = HostileConn::connect(addr, Duration::from_secs(5))?;
    c.send_raw(bytes)?;
    c.wait_closed(timeout)
}

/// A HELLO from a peer speaking major version `major`.
pub fn wrong_version(addr: SocketAddr, id: &Identity, major: u8, timeout: Duration) -> Result<Closing> {
    let mut b = Message::Hello(Hello { cluster_id: id.cluster_id, node_id: id.node_id, nonce: [7; NONCE_LEN] })
        .to_vec()
        .map_err(|e| anyhow!("{e}"))?;
    b[2] = major;
    let mut c = HostileConn::connect(addr, Duration::from_secs(5))?;
    c.send_raw(&b)?;
    c.wait_closed(timeout)
}

/// A full handshake attempt as `id`, then (unless READY) waits for the close.
pub fn handshake_as(addr: SocketAddr, id: &Identity, timeout: Duration) -> Result<(HandshakeOutcome, Option<Closing>)> {
    let mut c = HostileConn::connect(addr, Duration::from_secs(5))?;
    let h = c.handshake(id, timeout)?;
    let closing = match h {
        HandshakeOutcome::Ready { .. } => None,
        _ => Some(c.wait_closed(timeout)?),
    };
    Ok((h, closing))
}

/// Sends a valid HELLO one byte every `interval`; returns how many bytes went out before the
/// target closed the connection, and when (an error if it never did within `limit`).
pub fn trickle_hello(
    addr: SocketAddr,
    id: &Identity,
    interval: Duration,
    limit: Duration,
) -> Result<(usize, Duration)> {
    let b = Message::Hello(Hello { cluster_id: id.cluster_id, node_id: id.node_id, nonce: [9; NONCE_LEN] })
        .to_vec()
        .map_err(|e| anyhow!("{e}"))?;
    let mut c = HostileConn::connect(addr, Duration::from_secs(5))?;
    let start = Instant::now();
    for (i, byte) in b.iter().enumerate() {
        if c.send_raw(std::slice::from_ref(byte)).is_err() {
            return Ok((i, start.elapsed()));
        }
        match c.recv(interval)? {
            Received::Closed => return Ok((i + 1, start.elapsed())),
            Received::TimedOut => {}
            Received::Frame(Message::Error(_), _) => {
                c.wait_closed(limit)?;
                return Ok((i + 1, start.elapsed()));
            }
            other => bail!("trickle: unexpected {other:?}"),
        }
        if start.elapsed() > limit {
            bail!("the target kept a trickling handshake open for {limit:?}");
        }
    }
    // The whole HELLO went out: the target answered within the handshake, fair enough; it
    // must still end it when no AUTH follows.
    let closing = c.wait_closed(limit)?;
    Ok((b.len(), start.elapsed() + closing.after))
}

/// `n` connections that send `prefix` (e.g. nothing, or half a HELLO) and then nothing.
pub fn idle_connections(addr: SocketAddr, n: usize, prefix: &[u8]) -> Result<Vec<HostileConn>> {
    (0..n)
        .map(|_| {
            let mut c = HostileConn::connect(addr, Duration::from_secs(5))?;
            if !prefix.is_empty() {
                c.send_raw(prefix)?;
            }
            Ok(c)
        })
        .collect()
}

// --- attacks after authentication ---------------------------------------------------------

/// Counts of the target's answers to forged one-sided operations.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ForgedReport {
    pub sent: u64,
    pub denied: u64,
    /// Accesses the target allowed: each is a key it should not have honoured.
    pub allowed: u64,
    pub closed: bool,
}

/// `n` DATA_READs and `n` DATA_WRITEs (with 512 bytes of payload) against the target's
/// memory under keys and addresses from `keys` — forged, foreign or revoked — and counts the
/// answers. Every one must be refused.
pub fn forged_one_sided(conn: &mut HostileConn, keys: &[(u32, u64)], timeout: Duration) -> Result<ForgedReport> {
    let mut r = ForgedReport::default();
    let payload = vec![0xa5u8; 512];
    for (i, &(key, addr)) in keys.iter().enumerate() {
        let op = (i as u64) << 8;
        conn.send(&Message::DataRead(DataReq { op_id: op, addr, key, len: 512 }))?;
        conn.send_with_payload(&Message::DataWrite(DataReq { op_id: op | 1, addr, key, len: 512 }), &payload)?;
        r.sent += 2;
    }
    let start = Instant::now();
    while r.denied + r.allowed < r.sent {
        let left = timeout.saturating_sub(start.elapsed());
        match conn.recv_app(left)? {
            Received::Frame(Message::DataReadResp(d), _) | Received::Frame(Message::DataWriteAck(d), _) => {
                if d.status == Status::Ok {
                    r.allowed += 1;
                } else {
                    r.denied += 1;
                }
            }
            Received::Frame(..) => {}
            Received::Closed => {
                r.closed = true;
                break;
            }
            Received::TimedOut => {
                bail!("{} of {} forged accesses answered within {timeout:?}", r.denied + r.allowed, r.sent)
            }
            Received::Malformed(m) => bail!("target sent undecodable bytes: {m}"),
        }
    }
    Ok(r)
}

/// Keys and addresses nobody granted: random ones, every slot of the key space's low bits with
/// a random generation, and address extremes.
pub fn forged_keys(n: usize, seed: u64) -> Vec<(u32, u64)> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v: Vec<(u32, u64)> = (0..n).map(|_| (next() as u32, next() & 0x0000_7fff_ffff_f000)).collect();
    v.extend([(0, 0), (u32::MAX, 0), (1, 0x1000), (0, u64::MAX - 4096), (u32::MAX, 0x7fff_ffff_f000)]);
    v
}

/// A response to an operation the target never posted, of either direction; the target must
/// call it a protocol violation and close.
pub fn unsolicited_response(conn: &mut HostileConn, read_resp: bool, timeout: Duration) -> Result<Closing> {
    let d = DataResp { op_id: 0x00de_adbe_ef00, status: Status::Ok, len: 16 };
    if read_resp {
        conn.send_with_payload(&Message::DataReadResp(d), &[0x5a; 16])?;
    } else {
        conn.send(&Message::DataWriteAck(DataResp { len: 0, ..d }))?;
    }
    conn.wait_closed(timeout)
}

/// Outcome of a [`flood`].
#[derive(Debug, Default, Clone)]
pub struct FloodReport {
    /// Frames written before the writer stopped.
    pub sent: u64,
    /// The writer could not send for 10 s: the target stopped reading (backpressure).
    pub blocked: bool,
    /// COMPLETIONs and PROMISE_ACKs by status.
    pub statuses: BTreeMap<String, u64>,
    pub data_reads: u64,
    pub data_writes: u64,
    pub errors: Vec<(u32, String)>,
    pub closed: bool,
    pub elapsed: Duration,
}

impl FloodReport {
    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }
    pub fn ok(&self) -> u64 {
        self.statuses.get("Ok").copied().unwrap_or(0)
    }
}

/// Writes `frames(i)` for i in 0..n as fast as the target takes them (a writer thread) while
/// reading everything it answers (one-sided READs left unanswered: `Silent`), for at most
/// `duration` in all; then closes the connection.
pub fn flood(
    conn: HostileConn,
    n: u64,
    frames: impl Fn(u64) -> (Message, Vec<u8>) + Send,
    duration: Duration,
) -> Result<FloodReport> {
    let mut conn = conn;
    let mut writer = conn.try_clone_socket()?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let blocked = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut report = std::thread::scope(|s| -> Result<FloodReport> {
        let (stop_w, sent_w, blocked_w) = (stop.clone(), sent.clone(), blocked.clone());
        let w = s.spawn(move || {
            for i in 0..n {
                if stop_w.load(Ordering::Relaxed) {
                    break;
                }
                let (m, payload) = frames(i);
                let Ok(mut b) = m.to_vec() else { break };
                b.extend_from_slice(&payload);
                match writer.write_all(&b) {
                    Ok(()) => {
                        sent_w.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                            blocked_w.store(true, Ordering::Relaxed);
                        }
                        break;
                    }
                }
            }
        });
        let mut r = FloodReport::default();
        loop {
            let left = duration.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            match conn.recv_app(left.min(Duration::from_millis(500)))? {
                Received::Frame(Message::Completion(c), _) => {
                    *r.statuses.entry(format!("{:?}", c.status)).or_default() += 1
                }
                Received::Frame(Message::PromiseAck(a), _) => {
                    *r.statuses.entry(format!("{:?}", a.status)).or_default() += 1
                }
                Received::Frame(Message::DataRead(_), _) => r.data_reads += 1,
                Received::Frame(Message::DataWrite(_), _) => r.data_writes += 1,
                Received::Frame(Message::Error(e), _) => r.errors.push((e.code, e.text)),
                Received::Frame(..) => {}
                Received::Closed => {
                    r.closed = true;
                    break;
                }
                Received::TimedOut => {
                    if w.is_finished() && r.answered() >= sent.load(Ordering::Relaxed) {
                        break;
                    }
                }
                Received::Malformed(m) => bail!("target sent undecodable bytes: {m}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        conn.shutdown();
        let _ = w.join();
        Ok(r)
    })?;
    report.sent = sent.load(Ordering::Relaxed);
    report.blocked = blocked.load(Ordering::Relaxed);
    report.elapsed = start.elapsed();
    Ok(report)
}

/// The ERROR codes of `proto::tcp`, by name, for assertion messages.
pub fn error_code_name(code: u32) -> &'static str {
    match code {
        ERR_VERSION => "ERR_VERSION",
        ERR_CLUSTER => "ERR_CLUSTER",
        ERR_AUTH => "ERR_AUTH",
        ERR_PROTOCOL => "ERR_PROTOCOL",
        _ => "unknown",
    }
}

/// A COMPLETION frame (for floods of responses in the wrong direction).
pub fn completion(request_id: u64, status: Status) -> Message {
    Message::Completion(Completion { request_id, status, bytes: 0 })
}

/// An ERROR frame.
pub fn error(code: u32, text: &str) -> Message {
    Message::Error(ErrorMsg { code, text: text.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_range_exactly() {
        let m = Memory::new(0x10000, vec![0; 1 << 16]);
        let s = m.segments(100, 1000, 3, 7);
        assert_eq!(s.len(), 3);
        assert_eq!(s.iter().map(|s| s.len).sum::<u32>(), 1000);
        assert_eq!(s[0].addr, 0x10000 + 100);
        assert_eq!(s[1].addr, s[0].addr + u64::from(s[0].len));
        assert!(s.iter().all(|s| s.key == 7));
        assert_eq!(m.window(0x10000 + 100, 10), Some(100..110));
        assert_eq!(m.window(0xffff, 1), None);
        assert_eq!(m.window(0x10000 + (1 << 16) - 1, 2), None);
        assert_eq!(m.window(u64::MAX, 2), None);
    }

    #[test]
    fn frames_are_reassembled_from_any_split() {
        // A loopback pair: the frames arrive in arbitrary pieces.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = completion(5, Status::Busy).to_vec().unwrap();
            b.extend(Message::DataWrite(DataReq { op_id: 9, addr: 64, key: 3, len: 4 }).to_vec().unwrap());
            b.extend([1, 2, 3, 4]);
            for chunk in b.chunks(5) {
                s.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            s.write_all(b"garbage!!!!!!").unwrap();
        });
        let mut c = HostileConn::connect(addr, Duration::from_secs(2)).unwrap();
        match c.recv(Duration::from_secs(5)).unwrap() {
            Received::Frame(Message::Completion(x), p) => {
                assert_eq!((x.request_id, x.status, p.len()), (5, Status::Busy, 0))
            }
            other => panic!("{other:?}"),
        }
        match c.recv(Duration::from_secs(5)).unwrap() {
            Received::Frame(Message::DataWrite(x), p) => assert_eq!((x.op_id, p), (9, vec![1, 2, 3, 4])),
            other => panic!("{other:?}"),
        }
        assert!(matches!(c.recv(Duration::from_secs(5)).unwrap(), Received::Malformed(_)));
        t.join().unwrap();
    }
}
