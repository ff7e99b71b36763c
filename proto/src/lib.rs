//! hcblk replication wire protocol and the transports that carry it.
//!
//! * [`wire`]: the frame codec — pure functions, no I/O (layout drawn there).
//! * [`auth`]: mutual HMAC-SHA256 challenge-response.
//! * [`ratelimit`]: the limit on log lines a peer (or, in the backend, a guest) can
//!   trigger at will.
//! * [`Endpoint`]: the polling transport interface; implementations in
//!   [`tcp`] (one-sided semantics in software), [`loopback`] (in-process) and
//!   `rdma` (verbs, behind the `rdma` feature).
//!
//! This crate does no disk I/O.

pub mod auth;
pub mod inline;
pub mod loopback;
pub mod mem;
pub mod ratelimit;
#[cfg(feature = "rdma")]
pub mod rdma;
mod sys;
pub mod tcp;
pub mod wire;

pub use inline::InlineData;
pub use mem::{Access, Grant, Key, LocalSeg, RegionId, Registry};
pub use wire::{Message, Segment, Segments, Status};

use std::time::Duration;
use thiserror::Error;

/// Transport failures. Per-operation failures of one-sided operations are
/// reported in [`OpCompletion::status`] instead.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("I/O error on {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed frame from peer")]
    Decode(#[source] wire::DecodeError),
    #[error("cannot encode message")]
    Encode(#[source] wire::EncodeError),
    #[error("send queue full")]
    QueueFull,
    #[error("too many operations in flight (limit {0})")]
    TooManyInFlight(usize),
    #[error("connection closed")]
    Disconnected,
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
    #[error("peer refused the connection: {text} (code {code})")]
    Refused { code: u32, text: String },
    #[error("handshake failed: {0}")]
    Handshake(&'static str),
    #[error("no RDMA device: {0}")]
    NoRdmaDevice(String),
    #[error("RDMA verbs call {call} failed")]
    Verbs {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid memory region")]
    BadRegion,
    #[error("unknown memory region {0}")]
    UnknownRegion(u32),
    #[error("unknown key {0:#x}")]
    UnknownKey(u32),
    #[error("range outside its memory region")]
    OutOfRegion,
    #[error("local and remote lengths differ ({local} vs {remote})")]
    LengthMismatch { local: usize, remote: usize },
    #[error("region or key still in use")]
    Busy,
    #[error("limit reached: {0}")]
    Limit(&'static str),
    #[error("{0:?} is not an application message")]
    NotApplication(wire::FrameType),
    #[error("unknown transport {0:?} (expected auto, tcp, rdma or loopback)")]
    UnknownTransport(String),
    #[error("inline WRITE: {0}")]
    Inline(&'static str),
    #[error("transport setting {field} = {value} is out of range (1 to {max})")]
    Config { field: &'static str, value: usize, max: usize },
}

/// Completion of a one-sided operation posted with `post_read`/`post_write`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpCompletion {
    pub user_data: u64,
    pub status: Status,
    /// Bytes moved (0 unless `status` is `Ok`).
    pub bytes: u32,
}

impl OpCompletion {
    pub const EMPTY: OpCompletion = OpCompletion { user_data: 0, status: Status::Ok, bytes: 0 };
}

/// Connection parameters shared by the transports.
#[derive(Debug, Clone)]
pub struct Config {
    /// Cluster this node belongs to; peers of another cluster are refused.
    pub cluster_id: u64,
    /// This node's id, sent in the handshake.
    pub node_id: u64,
    /// Shared cluster secret (see [`auth`]).
    pub secret: auth::Secret,
    /// One-sided operations in flight per endpoint, completions not yet
    /// polled included. Default 256; 1 to [`MAX_INFLIGHT_MAX`].
    pub max_inflight: usize,
    /// Application messages queued for sending. Default 1024; 1 to
    /// [`QUEUE_MAX`].
    pub send_queue: usize,
    /// Received application messages not yet polled; when full the
    /// transport stops reading the socket (backpressure). Default 1024; 1
    /// to [`QUEUE_MAX`].
    pub recv_queue: usize,
    /// Heartbeat interval when the connection is idle. Default 1 s.
    pub heartbeat: Duration,
    /// Peer declared dead after this long without a frame, or when sent
    /// data stays unacknowledged this long. Default 5 s.
    pub dead_after: Duration,
    /// Limit for connect + handshake, as a whole. Default 5 s.
    pub handshake_timeout: Duration,
    /// Bytes of inline WRITE payload buffers a connection may hold, lent
    /// out to received messages not yet dropped included; when they are
    /// all taken the transport stops reading (backpressure). At least
    /// `wire::MAX_INLINE` is used. Default 8 MiB.
    pub inline_budget: usize,
}

/// Largest [`Config::max_inflight`]: the tcp transport keeps a slot per
/// operation and answers up to `MAX_SEGMENTS` responses per operation, and
/// the rdma transport sizes its completion queue for this many (a larger
/// CQ than some devices offer, e.g. rxe, would fail at connect instead).
pub const MAX_INFLIGHT_MAX: usize = 1024;
/// Largest [`Config::send_queue`] and [`Config::recv_queue`]: bounds the
/// memory a connection's queued messages may hold.
pub const QUEUE_MAX: usize = 1 << 16;

impl Config {
    /// Refuses settings a transport cannot honour as given (0, or beyond
    /// what it can hold), instead of quietly running with others. Every
    /// transport calls it before it connects or binds.
    pub fn validate(&self) -> Result<(), TransportError> {
        for (field, value, max) in [
            ("max_inflight", self.max_inflight, MAX_INFLIGHT_MAX),
            ("send_queue", self.send_queue, QUEUE_MAX),
            ("recv_queue", self.recv_queue, QUEUE_MAX),
        ] {
            if !(1..=max).contains(&value) {
                return Err(TransportError::Config { field, value, max });
            }
        }
        Ok(())
    }

    pub fn new(cluster_id: u64, node_id: u64, secret: auth::Secret) -> Self {
        Self {
            cluster_id,
            node_id,
            secret,
            max_inflight: 256,
            send_queue: 1024,
            recv_queue: 1024,
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            inline_budget: 8 << 20,
        }
    }
}

/// A connection to one peer, driven by polling: no method blocks (except
/// connection setup, which is the slow path).
///
/// Memory the peer may touch is registered once ([`Endpoint::register_region`])
/// and opened per request with [`Endpoint::grant`]; the returned segments go
/// into a READ/WRITE descriptor, and the key is revoked when the request completes.
pub trait Endpoint: Send {
    /// Queues an application message (descriptor, completion, ...).
    /// `QueueFull` when the bounded send queue is full.
    fn send(&mut self, msg: &Message) -> Result<(), TransportError>;

    /// Sends a WRITE descriptor with `FLAG_INLINE` whose payload (`length`
    /// bytes, at most `wire::MAX_INLINE`) is gathered from registered
    /// memory: the replica gets the data with the descriptor and no
    /// one-sided READ round trip follows. The bytes are read when the frame
    /// goes out, which is before the peer can answer it: keep them stable
    /// until its COMPLETION arrives. `msg.inline` must be `None`.
    /// `QueueFull` when the bounded send queue is full.
    fn send_inline(&mut self, msg: &Message, payload: &[LocalSeg]) -> Result<(), TransportError>;

    /// Next received application message, if any. An inline WRITE arrives
    /// with its payload in `Descriptor::inline` (an aligned buffer of the
    /// connection's pool: drop it once written).
    fn poll_recv(&mut self) -> Result<Option<Message>, TransportError>;

    /// Registers memory the peer may be granted access to, or that local
    /// buffers of one-sided operations live in.
    ///
    /// # Safety
    /// As [`Registry::register`]: `ptr..ptr+len` stays valid for reads and
    /// writes from any thread until `deregister_region` returns `Ok` or the
    /// endpoint (and every other user of its registry) is dropped.
    unsafe fn register_region(&mut self, ptr: *mut u8, len: usize) -> Result<RegionId, TransportError>;

    /// Forgets a region; `Busy` while grants or operations use it.
    fn deregister_region(&mut self, region: RegionId) -> Result<(), TransportError>;

    /// Opens `(offset, len)` ranges of `region` to the peer under a new key.
    fn grant(&mut self, region: RegionId, ranges: &[(u64, u32)], access: Access) -> Result<Grant, TransportError>;

    /// Closes a key; the peer's later accesses with it fail.
    fn revoke(&mut self, key: Key) -> Result<(), TransportError>;

    /// One-sided READ: pulls the peer's `remote` segments into `local`.
    fn post_read(&mut self, remote: &[Segment], local: &[LocalSeg], user_data: u64) -> Result<(), TransportError>;

    /// One-sided WRITE: pushes `local` into the peer's `remote` segments.
    fn post_write(&mut self, remote: &[Segment], local: &[LocalSeg], user_data: u64) -> Result<(), TransportError>;

    /// Fills `out` with finished operations; returns how many.
    fn poll_completions(&mut self, out: &mut [OpCompletion]) -> usize;

    /// The authenticated peer's node id.
    fn peer_node_id(&self) -> u64;

    /// False once the connection has failed; in-flight operations have then
    /// completed with `Status::ConnectionLost`.
    fn is_connected(&self) -> bool;

    /// A file descriptor that is readable (level-triggered) while a message or a completion
    /// may be waiting: a caller with nothing else to do sleeps in `poll(2)`/epoll on it
    /// instead of spinning, then calls both `poll_recv` and `poll_completions` until each
    /// has nothing more (the endpoint makes the descriptor unreadable again when it finds
    /// nothing to return; a spurious wake-up costs one empty poll). It also becomes readable
    /// when the connection fails. `None`: no such descriptor; the caller must poll on a timer.
    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// `rdma` if a verbs device exists, else `tcp` (logged).
    #[default]
    Auto,
    Tcp,
    Rdma,
    Loopback,
}

impl std::str::FromStr for TransportKind {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => Self::Auto,
            "tcp" => Self::Tcp,
            "rdma" => Self::Rdma,
            "loopback" => Self::Loopback,
            _ => return Err(TransportError::UnknownTransport(s.to_owned())),
        })
    }
}

/// Resolves `Auto` and checks that `Rdma` can work on this host.
///
/// `Rdma` without a device fails with one line naming what is missing;
/// `Auto` then falls back to `Tcp` with a warning.
pub fn resolve_transport(kind: TransportKind) -> Result<TransportKind, TransportError> {
    match kind {
        TransportKind::Rdma => {
            rdma_probe()?;
            Ok(TransportKind::Rdma)
        }
        TransportKind::Auto => match rdma_probe() {
            Ok(()) => Ok(TransportKind::Rdma),
            Err(e) => {
                tracing::warn!("transport auto: {e}; falling back to tcp");
                Ok(TransportKind::Tcp)
            }
        },
        k => Ok(k),
    }
}

#[cfg(feature = "rdma")]
fn rdma_probe() -> Result<(), TransportError> {
    rdma::probe().map(|_| ())
}

#[cfg(not(feature = "rdma"))]
fn rdma_probe() -> Result<(), TransportError> {
    Err(TransportError::NoRdmaDevice("hcblk-proto built without the `rdma` feature".into()))
}

/// Checks what `Endpoint::send_inline` is given: an inline WRITE without
/// an attached payload, as long as the registered `payload` pieces.
pub(crate) fn check_send_inline(msg: &Message, payload: &[LocalSeg]) -> Result<(), TransportError> {
    let Message::Write(d) = msg else {
        return Err(TransportError::Inline("only a WRITE carries its data inline"));
    };
    if !d.is_inline() {
        return Err(TransportError::Inline("FLAG_INLINE is not set"));
    }
    if d.inline.is_some() {
        return Err(TransportError::Inline("the payload comes from registered memory, not `Descriptor::inline`"));
    }
    let total: u64 = payload.iter().map(|s| u64::from(s.len)).sum();
    if total != u64::from(d.length) {
        return Err(TransportError::LengthMismatch { local: total as usize, remote: d.length as usize });
    }
    // The codec's rules cover the rest (MAX_INLINE, offsets, flags).
    msg.validate().map_err(|e| TransportError::Encode(wire::EncodeError::Invalid(e)))
}

/// Checks a message given to `Endpoint::send`: an application type, and
/// an inline WRITE only with its payload attached.
pub(crate) fn check_send(msg: &Message) -> Result<(), TransportError> {
    let ty = msg.frame_type();
    if !ty.is_application() {
        return Err(TransportError::NotApplication(ty));
    }
    if let Message::Write(d) = msg {
        if d.is_inline() && d.inline.is_none() {
            return Err(TransportError::Inline("no payload attached: use send_inline for registered memory"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_tcp_and_rdma_names_the_missing_device() {
        // This test documents the host: without a verbs device `rdma` must be refused.
        let has_device =
            std::path::Path::new("/sys/class/infiniband").read_dir().map(|mut d| d.next().is_some()).unwrap_or(false);
        if has_device {
            assert_eq!(resolve_transport(TransportKind::Auto).unwrap(), TransportKind::Rdma);
            return;
        }
        let e = resolve_transport(TransportKind::Rdma).unwrap_err();
        let line = e.to_string();
        assert!(line.starts_with("no RDMA device: "), "{line}");
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(resolve_transport(TransportKind::Auto).unwrap(), TransportKind::Tcp);
        assert_eq!("tcp".parse::<TransportKind>().unwrap(), TransportKind::Tcp);
        assert!("ib".parse::<TransportKind>().is_err());
    }
}
