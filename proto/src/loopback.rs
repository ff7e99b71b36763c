//! In-process transport: two endpoints sharing one address space. Messages
//! go through bounded queues; one-sided operations are checked against the
//! peer's grants exactly as on the wire and copy at post time, so the order
//! of events is fully determined by the caller (the basis for a seeded
//! simulation of replication).

use crate::inline::{InlineData, InlinePool};
use crate::mem::{Denied, IoPtr};
use crate::ratelimit::{LogLimit, LOG_BURST, LOG_INTERVAL};
use crate::wire::{Message, Segment, Status, MAX_DATA_LEN, MAX_SEGMENTS};
use crate::{Access, Config, Endpoint, Grant, Key, LocalSeg, OpCompletion, RegionId, Registry, TransportError};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug)]
struct Side {
    inbox: VecDeque<Message>,
    registry: Arc<Registry>,
    closed: bool,
    /// This side's `recv_queue`.
    cap: usize,
    /// Buffers for inline WRITE payloads sent to this side.
    pool: InlinePool,
}

#[derive(Debug)]
struct Shared {
    sides: [Side; 2],
}

/// One end of an in-process connection.
#[derive(Debug)]
pub struct LoopbackEndpoint {
    shared: Arc<Mutex<Shared>>,
    me: usize,
    peer_node: u64,
    max_inflight: usize,
    completions: VecDeque<OpCompletion>,
    /// Rate limit of refused-access log lines.
    denials: LogLimit,
}

/// Connects two in-process endpoints. Both must be in the same cluster and
/// hold the same secret (checked the way the handshake would).
pub fn pair(a: &Config, b: &Config) -> Result<(LoopbackEndpoint, LoopbackEndpoint), TransportError> {
    a.validate()?;
    b.validate()?;
    if a.cluster_id != b.cluster_id {
        return Err(TransportError::Handshake("peer belongs to another cluster"));
    }
    let ctx = crate::auth::Context {
        cluster_id: a.cluster_id,
        client_node: a.node_id,
        server_node: b.node_id,
        client_nonce: [0; 32],
        server_nonce: [1; 32],
    };
    if !crate::auth::verify(
        &b.secret,
        crate::auth::Role::Client,
        &ctx,
        &crate::auth::tag(&a.secret, crate::auth::Role::Client, &ctx),
    ) {
        return Err(TransportError::AuthFailed("the peers hold different cluster secrets"));
    }
    let side = |c: &Config| Side {
        inbox: VecDeque::new(),
        registry: Arc::new(Registry::new()),
        closed: false,
        cap: c.recv_queue,
        pool: InlinePool::new(c.inline_budget),
    };
    let shared = Arc::new(Mutex::new(Shared { sides: [side(a), side(b)] }));
    let mk = |me: usize, cfg: &Config, peer: &Config| LoopbackEndpoint {
        shared: shared.clone(),
        me,
        peer_node: peer.node_id,
        max_inflight: cfg.max_inflight,
        completions: VecDeque::new(),
        denials: LogLimit::new(LOG_BURST, LOG_INTERVAL),
    };
    Ok((mk(0, a, b), mk(1, b, a)))
}

impl LoopbackEndpoint {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Each critical section is a single queue operation; poisoning cannot
        // leave the state inconsistent.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn registry(&self) -> Arc<Registry> {
        self.lock().sides[self.me].registry.clone()
    }

    /// Queues `m` for the peer (bounded by its `recv_queue`).
    fn deliver(&mut self, m: Message) -> Result<(), TransportError> {
        let me = self.me;
        let mut s = self.lock();
        if s.sides[me].closed {
            return Err(TransportError::Disconnected);
        }
        let peer = &mut s.sides[1 - me];
        if peer.inbox.len() >= peer.cap {
            return Err(TransportError::QueueFull);
        }
        peer.inbox.push_back(m);
        Ok(())
    }

    /// Delivers an inline WRITE whose payload `fill` writes into a buffer
    /// of the peer's inline pool; `QueueFull` while that pool is exhausted.
    fn deliver_inline(
        &mut self,
        d: &crate::wire::Descriptor,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), TransportError> {
        let pool = self.lock().sides[1 - self.me].pool.clone();
        let mut buf: InlineData = pool.take(d.length as usize).ok_or(TransportError::QueueFull)?;
        fill(buf.as_mut_slice());
        let mut desc = d.clone();
        desc.inline = Some(buf);
        self.deliver(Message::Write(desc))
    }

    /// Fault injection: the connection fails for both ends.
    pub fn disconnect(&mut self) {
        let mut s = self.lock();
        s.sides[0].closed = true;
        s.sides[1].closed = true;
    }

    fn one_sided(
        &mut self,
        remote: &[Segment],
        local: &[LocalSeg],
        user_data: u64,
        write: bool,
    ) -> Result<(), TransportError> {
        if remote.is_empty() || remote.len() > MAX_SEGMENTS || remote.iter().any(|s| s.len == 0 || s.len > MAX_DATA_LEN)
        {
            return Err(TransportError::Limit("remote segments"));
        }
        if self.completions.len() >= self.max_inflight {
            return Err(TransportError::TooManyInFlight(self.max_inflight));
        }
        let (mine, theirs, closed) = {
            let s = self.lock();
            (s.sides[self.me].registry.clone(), s.sides[1 - self.me].registry.clone(), s.sides[self.me].closed)
        };
        if closed {
            return Err(TransportError::Disconnected);
        }
        let local = mine.local(local)?;
        let total: usize = remote.iter().map(|s| s.len as usize).sum();
        if total != local.total {
            return Err(TransportError::LengthMismatch { local: local.total, remote: total });
        }
        let want = if write { Access::RemoteWrite } else { Access::RemoteRead };
        let windows: Result<Vec<IoPtr>, Denied> =
            remote.iter().map(|s| theirs.check_remote(s.key, s.addr, s.len, want)).collect();
        let status = match windows {
            Ok(w) => {
                let l = local.sub(0, local.total);
                if write {
                    crate::mem::copy(&l, &w);
                } else {
                    crate::mem::copy(&w, &l);
                }
                Status::Ok
            }
            Err(why) => {
                let peer = self.peer_node;
                self.denials.log(
                    |n| tracing::warn!(peer, "{n} more refused one-sided accesses not logged"),
                    || tracing::warn!(peer, "refused one-sided {}: {why:?}", if write { "write" } else { "read" }),
                );
                Status::AccessDenied
            }
        };
        let bytes = if status == Status::Ok { total as u32 } else { 0 };
        self.completions.push_back(OpCompletion { user_data, status, bytes });
        Ok(())
    }
}

impl Endpoint for LoopbackEndpoint {
    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        crate::check_send(msg)?;
        // Same validation as the encoder: never deliver what the wire would refuse.
        msg.validate().map_err(|e| TransportError::Encode(crate::wire::EncodeError::Invalid(e)))?;
        match msg {
            Message::Write(d) if d.is_inline() => {
                let data = d.inline.as_deref().unwrap_or_default();
                self.deliver_inline(d, |buf| buf.copy_from_slice(data))
            }
            m => self.deliver(m.clone()),
        }
    }

    fn send_inline(&mut self, msg: &Message, payload: &[LocalSeg]) -> Result<(), TransportError> {
        crate::check_send_inline(msg, payload)?;
        let Message::Write(d) = msg else {
            return Err(TransportError::Inline("only a WRITE carries its data inline"));
        };
        let local = self.registry().local(payload)?;
        self.deliver_inline(d, |buf| crate::mem::gather(&local.pieces, buf))
    }

    fn poll_recv(&mut self) -> Result<Option<Message>, TransportError> {
        let me = self.me;
        let mut s = self.lock();
        let side = &mut s.sides[me];
        match side.inbox.pop_front() {
            Some(m) => Ok(Some(m)),
            None if side.closed => Err(TransportError::Disconnected),
            None => Ok(None),
        }
    }

    unsafe fn register_region(&mut self, ptr: *mut u8, len: usize) -> Result<RegionId, TransportError> {
        // SAFETY: the caller upholds `Registry::register`'s contract (same as ours).
        unsafe { self.registry().register(ptr, len) }
    }

    fn deregister_region(&mut self, region: RegionId) -> Result<(), TransportError> {
        self.registry().deregister(region)
    }

    fn grant(&mut self, region: RegionId, ranges: &[(u64, u32)], access: Access) -> Result<Grant, TransportError> {
        self.registry().grant(region, ranges, access)
    }

    fn revoke(&mut self, key: Key) -> Result<(), TransportError> {
        self.registry().revoke(key)
    }

    fn post_read(&mut self, remote: &[Segment], local: &[LocalSeg], user_data: u64) -> Result<(), TransportError> {
        self.one_sided(remote, local, user_data, false)
    }

    fn post_write(&mut self, remote: &[Segment], local: &[LocalSeg], user_data: u64) -> Result<(), TransportError> {
        self.one_sided(remote, local, user_data, true)
    }

    fn poll_completions(&mut self, out: &mut [OpCompletion]) -> usize {
        let n = out.len().min(self.completions.len());
        for (slot, c) in out.iter_mut().zip(self.completions.drain(..n)) {
            *slot = c;
        }
        n
    }

    fn peer_node_id(&self) -> u64 {
        self.peer_node
    }

    fn is_connected(&self) -> bool {
        !self.lock().sides[self.me].closed
    }
}

impl Drop for LoopbackEndpoint {
    fn drop(&mut self) {
        self.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Secret;
    use crate::wire::{Completion, Descriptor};

    fn cfg(node: u64) -> Config {
        Config::new(7, node, Secret::new(*b"loopback-secret-16").unwrap())
    }

    #[test]
    fn descriptor_then_one_sided_pull() {
        let (mut a, mut b) = pair(&cfg(1), &cfg(2)).unwrap();
        let mut guest = (0..8192u32).map(|i| i as u8).collect::<Vec<u8>>();
        let mut disk = vec![0u8; 8192];
        // SAFETY: both vectors outlive the endpoints' use of them (dropped after the endpoints).
        let ga = unsafe { a.register_region(guest.as_mut_ptr(), guest.len()) }.unwrap();
        // SAFETY: as above.
        let db = unsafe { b.register_region(disk.as_mut_ptr(), disk.len()) }.unwrap();
        let g = a.grant(ga, &[(100, 1000), (5000, 24)], Access::RemoteRead).unwrap();
        let d = Descriptor {
            request_id: 9,
            volume: 1,
            epoch: 1,
            offset: 0,
            length: 1024,
            flags: 0,
            segments: g.segments.clone(),
            ..Descriptor::default()
        };
        a.send(&Message::Write(d)).unwrap();
        let Some(Message::Write(d)) = b.poll_recv().unwrap() else { panic!("expected WRITE") };
        b.post_read(&d.segments, &[LocalSeg { region: db, offset: 0, len: 1024 }], 5).unwrap();
        let mut c = [OpCompletion::EMPTY; 4];
        assert_eq!(b.poll_completions(&mut c), 1);
        assert_eq!(c[0], OpCompletion { user_data: 5, status: Status::Ok, bytes: 1024 });
        b.send(&Message::Completion(Completion { request_id: 9, status: Status::Ok, bytes: 1024 })).unwrap();
        assert!(matches!(a.poll_recv().unwrap(), Some(Message::Completion(_))));
        a.revoke(g.key).unwrap();
        // The revoked key no longer opens the window.
        b.post_read(&d.segments, &[LocalSeg { region: db, offset: 0, len: 1024 }], 6).unwrap();
        assert_eq!(b.poll_completions(&mut c), 1);
        assert_eq!(c[0].status, Status::AccessDenied);
        a.disconnect();
        assert!(matches!(b.poll_recv(), Err(TransportError::Disconnected)));
        drop((a, b));
        assert_eq!(&disk[..1000], &guest[100..1100]);
        assert_eq!(&disk[1000..1024], &guest[5000..5024]);
        guest.clear();
    }

    #[test]
    fn refuses_wrong_secret_and_bounds_queues() {
        let mut other = cfg(2);
        other.secret = Secret::new(*b"another-secret-16b").unwrap();
        assert!(matches!(pair(&cfg(1), &other), Err(TransportError::AuthFailed(_))));
        let mut small = cfg(2);
        small.recv_queue = 2;
        let (mut a, _b) = pair(&cfg(1), &small).unwrap();
        let c = Message::Completion(Completion { request_id: 1, status: Status::Ok, bytes: 0 });
        a.send(&c).unwrap();
        a.send(&c).unwrap();
        assert!(matches!(a.send(&c), Err(TransportError::QueueFull)));
    }

    #[test]
    fn inline_writes_are_copied_into_bounded_aligned_buffers() {
        let mut small = cfg(2);
        small.inline_budget = crate::wire::MAX_INLINE as usize;
        let (mut a, mut b) = pair(&cfg(1), &small).unwrap();
        let mut guest = (0..70_000u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>();
        // SAFETY: `guest` outlives the endpoints (dropped after them).
        let g = unsafe { a.register_region(guest.as_mut_ptr(), guest.len()) }.unwrap();
        let d = Descriptor { request_id: 3, length: 30_000, flags: crate::wire::FLAG_INLINE, ..Descriptor::default() };
        let payload =
            [LocalSeg { region: g, offset: 0, len: 10_000 }, LocalSeg { region: g, offset: 40_000, len: 20_000 }];
        a.send_inline(&Message::Write(d.clone()), &payload).unwrap();
        // The receiver's budget (64 KiB) holds two 32 KiB buffers; a third
        // inline WRITE has to wait: QueueFull.
        a.send_inline(&Message::Write(d.clone()), &payload).unwrap();
        assert!(matches!(a.send_inline(&Message::Write(d.clone()), &payload), Err(TransportError::QueueFull)));
        let Some(Message::Write(got)) = b.poll_recv().unwrap() else { panic!("expected WRITE") };
        let data = got.inline.as_ref().unwrap();
        assert_eq!(data.as_ptr() as usize % crate::inline::INLINE_ALIGN, 0);
        let want: Vec<u8> = [&guest[..10_000], &guest[40_000..60_000]].concat();
        assert_eq!(&data[..], &want[..]);
        // Released: room again.
        drop(got);
        a.send_inline(&Message::Write(d.clone()), &payload).unwrap();
        // `send` of an inline WRITE needs its payload attached.
        assert!(matches!(a.send(&Message::Write(d.clone())), Err(TransportError::Inline(_))));
        drop((a, b));
        guest.clear();
    }
}
