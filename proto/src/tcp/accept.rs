//! Accepting connections without letting unauthenticated peers hold the
//! door: the listening thread only accepts; each handshake runs on a worker
//! of its own under one deadline; authenticated streams wait in a bounded
//! queue for [`Listener::accept`].
//!
//! At most [`MAX_PENDING_HANDSHAKES`] handshakes run at once. When a new
//! socket arrives and all are taken, the **oldest** pending handshake is
//! closed (its socket shut down, which ends its worker) to make room. A
//! member completes its handshake in a few round trips, so whatever has been
//! pending longest is the likeliest to be idle or trickling bytes; evicting
//! it means an attacker has to open `MAX_PENDING_HANDSHAKES` sockets within
//! one legitimate handshake's round trips to shut a member out, where
//! refusing the newest would let a trickle of a dozen idle sockets per
//! `handshake_timeout` keep every member out. Evictions, refusals and
//! authenticated peers nobody accepted are counted ([`AcceptorStats`]) and
//! logged rate-limited.

use super::handshake::{server_handshake, Deadline};
use crate::ratelimit::{LogLimit, LOG_BURST, LOG_INTERVAL};
use crate::sys;
use crate::{Config, TransportError};
use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Handshakes in progress at once; beyond it the oldest is evicted.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Authenticated streams waiting for `accept`; beyond it new ones are closed.
pub const MAX_READY: usize = 64;
/// How often the listening thread checks whether it should stop.
const STOP_POLL_MS: i32 = 50;

/// Counters of an acceptor since it was bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcceptorStats {
    /// Peers that completed the handshake.
    pub authenticated: u64,
    /// Handshakes that failed (wrong secret, wrong cluster, version,
    /// malformed, timed out, closed by the peer), evictions not included.
    pub refused: u64,
    /// Pending handshakes closed to make room for a newer socket.
    pub evicted: u64,
    /// Authenticated peers closed because `MAX_READY` were already waiting
    /// for `accept`.
    pub not_accepted: u64,
}

/// An authenticated stream and its peer.
pub(crate) struct Authenticated {
    pub(crate) sock: TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) node: u64,
}

#[derive(Default)]
struct Counters {
    authenticated: AtomicU64,
    refused: AtomicU64,
    evicted: AtomicU64,
    not_accepted: AtomicU64,
}

struct Shared {
    cfg: Config,
    stop: AtomicBool,
    /// Pending handshakes, oldest first: id and a handle to shut the socket down.
    pending: Mutex<(u64, VecDeque<(u64, TcpStream)>)>,
    counters: Counters,
    refusals: LogLimit,
    evictions: LogLimit,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, (u64, VecDeque<(u64, TcpStream)>)> {
        // Each critical section is one push, pop or removal.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The listening socket, its thread and the queue of authenticated streams.
pub(crate) struct Listener {
    shared: Arc<Shared>,
    ready: Mutex<Receiver<Authenticated>>,
    local: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("local", &self.local).finish()
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { what, source }
}

impl Listener {
    pub(crate) fn bind(addr: impl ToSocketAddrs, cfg: Config) -> Result<Self, TransportError> {
        let listener = TcpListener::bind(addr).map_err(io("bind"))?;
        listener.set_nonblocking(true).map_err(io("listen"))?;
        let local = listener.local_addr().map_err(io("local_addr"))?;
        let shared = Arc::new(Shared {
            cfg,
            stop: AtomicBool::new(false),
            pending: Mutex::new((0, VecDeque::with_capacity(MAX_PENDING_HANDSHAKES))),
            counters: Counters::default(),
            refusals: LogLimit::new(LOG_BURST, LOG_INTERVAL),
            evictions: LogLimit::new(LOG_BURST, LOG_INTERVAL),
        });
        let (tx, rx) = mpsc::sync_channel(MAX_READY);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("hcblk-accept".into())
            .spawn(move || listen(listener, s, tx))
            .map_err(io("spawn"))?;
        Ok(Self { shared, ready: Mutex::new(rx), local, thread: Some(thread) })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub(crate) fn stats(&self) -> AcceptorStats {
        let c = &self.shared.counters;
        AcceptorStats {
            authenticated: c.authenticated.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            not_accepted: c.not_accepted.load(Ordering::Relaxed),
        }
    }

    /// The next authenticated stream, waiting at most `timeout` (forever with `None`).
    pub(crate) fn next(&self, timeout: Option<Duration>) -> Result<Option<Authenticated>, TransportError> {
        let rx = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        match timeout {
            None => rx.recv().map(Some).map_err(|_| TransportError::Disconnected),
            Some(t) => match rx.recv_timeout(t) {
                Ok(a) => Ok(Some(a)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(TransportError::Disconnected),
            },
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Workers still in a handshake end at once; they are not joined.
        for (_, s) in self.shared.pending().1.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn evictions_summary(n: u64) {
    tracing::warn!("{n} more evicted handshakes not logged");
}

fn refusals_summary(n: u64) {
    tracing::warn!("{n} more refused connections not logged");
}

/// The listening thread: accepts and hands each socket to a handshake worker.
fn listen(listener: TcpListener, shared: Arc<Shared>, ready: SyncSender<Authenticated>) {
    let accept_errors = LogLimit::new(LOG_BURST, LOG_INTERVAL);
    while !shared.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((sock, peer)) => admit(&shared, sock, peer, &ready),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = sys::wait_fd(listener.as_fd(), false, STOP_POLL_MS);
                shared.evictions.flush(false, evictions_summary);
                shared.refusals.flush(false, refusals_summary);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors and the like: keep listening, slowly.
                accept_errors.log(
                    |n| tracing::warn!("{n} more accept failures not logged"),
                    || tracing::warn!("accept failed: {e}"),
                );
                std::thread::sleep(Duration::from_millis(STOP_POLL_MS as u64));
            }
        }
    }
}

fn admit(shared: &Arc<Shared>, sock: TcpStream, peer: SocketAddr, ready: &SyncSender<Authenticated>) {
    // The listener is non-blocking; the handshake uses blocking calls
    // bounded by its deadline.
    let handle = match sock.set_nonblocking(false).and_then(|()| sock.try_clone()) {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(peer = %peer, "dropping accepted socket: {e}");
            return;
        }
    };
    let id = {
        let mut p = shared.pending();
        if p.1.len() >= MAX_PENDING_HANDSHAKES {
            if let Some((_, oldest)) = p.1.pop_front() {
                let victim = oldest.peer_addr().ok();
                let _ = oldest.shutdown(Shutdown::Both);
                shared.counters.evicted.fetch_add(1, Ordering::Relaxed);
                shared.evictions.log(evictions_summary, || {
                    tracing::warn!(
                        peer = ?victim,
                        "{MAX_PENDING_HANDSHAKES} handshakes pending: closed the oldest"
                    );
                });
            }
        }
        p.0 += 1;
        let id = p.0;
        p.1.push_back((id, handle));
        id
    };
    let s = shared.clone();
    let tx = ready.clone();
    let spawned =
        std::thread::Builder::new().name("hcblk-handshake".into()).spawn(move || handshake(s, sock, peer, id, tx));
    if let Err(e) = spawned {
        // The socket went with the closure and is closed; forget it.
        shared.pending().1.retain(|(i, _)| *i != id);
        tracing::warn!(peer = %peer, "cannot start a handshake worker: {e}");
    }
}

fn handshake(shared: Arc<Shared>, mut sock: TcpStream, peer: SocketAddr, id: u64, ready: SyncSender<Authenticated>) {
    let deadline = Deadline::after(shared.cfg.handshake_timeout);
    let result = server_handshake(&mut sock, &shared.cfg, &deadline);
    let still_pending = {
        let mut p = shared.pending();
        let before = p.1.len();
        p.1.retain(|(i, _)| *i != id);
        p.1.len() < before
    };
    if !still_pending {
        // Evicted (counted and logged then): its socket is shut down.
        return;
    }
    let node = match result {
        Ok(node) => node,
        Err(e) => {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            shared.refusals.log(refusals_summary, || tracing::warn!(peer = %peer, "refused connection: {e}"));
            return;
        }
    };
    shared.counters.authenticated.fetch_add(1, Ordering::Relaxed);
    if let Err(TrySendError::Full(a)) = ready.try_send(Authenticated { sock, peer, node }) {
        // Nobody is accepting: do not let authenticated streams pile up either.
        shared.counters.not_accepted.fetch_add(1, Ordering::Relaxed);
        shared.refusals.log(refusals_summary, || {
            tracing::warn!(peer = %a.peer, node = a.node, "{MAX_READY} authenticated connections not accepted yet: closing this one")
        });
    }
}
