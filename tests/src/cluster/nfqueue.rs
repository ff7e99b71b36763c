//! A userspace packet delayer on a netfilter queue (NFQUEUE), for kernels
//! built without `sch_netem` (this project's test machines among them).
//!
//! An iptables rule in the host's namespace sends every packet leaving
//! `eth0` to queue 0; this module holds each packet's verdict for the
//! configured delay and then accepts it. Only metadata crosses to userspace
//! (`NFQNL_COPY_META`): the payload never leaves the kernel. Packets are
//! released in arrival order (FIFO, no reordering even with jitter), with one
//! batch verdict per wakeup (`NFQNL_MSG_VERDICT_BATCH` accepts every queued
//! packet whose id is at most the given one; ids grow in arrival order).
//!
//! The netlink messages are built and parsed here by hand (no libmnl); the
//! layouts are those of `linux/netfilter/nfnetlink_queue.h`. This is the
//! only module of the harness with raw syscalls.

use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_META: u8 = 1;
/// Hand GSO packets over whole instead of segmenting them for us.
const NFQA_CFG_F_GSO: u32 = 1 << 2;
const NF_ACCEPT: u32 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
/// Strips NLA_F_NESTED and NLA_F_NET_BYTEORDER from an attribute type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Packets held at once (the kernel queue's limit; more are dropped, as
/// netem drops past its `limit`, whose default is also 1000).
pub const QUEUE_MAXLEN: u32 = 1000;
/// The loop wakes at least this often to notice `stop`.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Messages drained per wakeup before releasing what is due, so a flood of
/// packets cannot starve the releases.
const RECV_BATCH_MAX: usize = 256;
/// Drain-and-accept rounds when stopping, before unbinding regardless.
const RELEASE_ROUNDS_MAX: usize = 100;

/// A netfilter-queue netlink socket bound to one queue.
struct QueueSocket {
    fd: OwnedFd,
    queue: u16,
    seq: u32,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One nfnetlink message: nlmsghdr, nfgenmsg (res_id = queue, big endian),
/// then the attributes, each padded to 4 bytes.
fn build(kind: u16, flags: u16, seq: u32, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; NLMSG_HDRLEN];
    m[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // family AF_UNSPEC, version NFNETLINK_V0, res_id
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&queue.to_be_bytes());
    for (ty, payload) in attrs {
        let len = 4 + payload.len();
        m.extend_from_slice(&(len as u16).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align4(m.len()), 0);
    }
    let total = m.len() as u32;
    m[0..4].copy_from_slice(&total.to_ne_bytes());
    m
}

/// What one received netlink message was.
#[derive(Debug, PartialEq)]
enum Incoming {
    Packet(u32),
    /// An acknowledgement (0) or an error (negative errno).
    Ack(i32),
    Other,
}

/// Splits a datagram into messages; malformed tails are ignored (the
/// kernel never sends them, and this must not panic either way).
fn parse(buf: &[u8], mut each: impl FnMut(Incoming)) {
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let body = &rest[NLMSG_HDRLEN..len];
        if kind == NLMSG_ERROR && body.len() >= 4 {
            each(Incoming::Ack(i32::from_ne_bytes([body[0], body[1], body[2], body[3]])));
        } else if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET && body.len() >= NFGENMSG_LEN {
            match packet_id(&body[NFGENMSG_LEN..]) {
                Some(id) => each(Incoming::Packet(id)),
                None => each(Incoming::Other),
            }
        } else {
            each(Incoming::Other);
        }
        rest = &rest[align4(len).min(rest.len())..];
    }
}

/// The packet id from the attributes of an NFQNL_MSG_PACKET.
fn packet_id(mut attrs: &[u8]) -> Option<u32> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == NFQA_PACKET_HDR && len >= 8 {
            return Some(u32::from_be_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]));
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

impl QueueSocket {
    /// Opens a socket in the calling thread's network namespace and binds
    /// `queue` (metadata only, at most [`QUEUE_MAXLEN`] packets).
    fn bind(queue: u16) -> Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_NETLINK, NETLINK_NETFILTER)");
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is a valid value of this plain C struct.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("bind netlink socket");
        }
        let mut s = QueueSocket { fd, queue, seq: 0 };
        // Packet notifications the socket cannot hold are dropped by the
        // kernel (the packet with them); report nothing for that.
        s.setsockopt(libc::SOL_NETLINK, libc::NETLINK_NO_ENOBUFS, 1)?;
        // Room for a full queue of notifications (~100 bytes each); FORCE
        // because rmem_max is usually smaller (we are root).
        s.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 1 << 22)?;

        let cmd = [NFQNL_CFG_CMD_BIND, 0, 0, 0];
        let mut params = [0u8; 5];
        params[4] = NFQNL_COPY_META;
        let maxlen = QUEUE_MAXLEN.to_be_bytes();
        let flags = NFQA_CFG_F_GSO.to_be_bytes();
        s.config(&[
            (NFQA_CFG_CMD, &cmd),
            (NFQA_CFG_PARAMS, &params),
            (NFQA_CFG_QUEUE_MAXLEN, &maxlen),
            (NFQA_CFG_MASK, &flags),
            (NFQA_CFG_FLAGS, &flags),
        ])
        .with_context(|| format!("bind netfilter queue {queue}"))?;
        Ok(s)
    }

    fn setsockopt(&self, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> Result<()> {
        // SAFETY: the option value is a live c_int and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("setsockopt({level}, {name})"));
        }
        Ok(())
    }

    fn send(&self, msg: &[u8]) -> Result<()> {
        // SAFETY: `msg` is a live buffer of `msg.len()` bytes; an unconnected
        // netlink socket sends to the kernel.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("send to nfnetlink");
        }
        Ok(())
    }

    /// One datagram into `buf`, or `None` when nothing is pending.
    fn recv<'b>(&self, buf: &'b mut [u8]) -> Result<Option<&'b [u8]>> {
        // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(e).context("recv from nfnetlink");
        }
        Ok(Some(&buf[..n as usize]))
    }

    /// Waits until the socket is readable or `timeout` passes.
    fn wait(&self, timeout: Duration) -> Result<()> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `pfd` is one valid pollfd, `ts` a valid timespec, and a
        // null signal mask leaves the mask unchanged.
        let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("ppoll nfnetlink socket");
            }
        }
        Ok(())
    }

    /// Sends a config message and waits for its acknowledgement. Packet
    /// notifications read meanwhile are ignored: none arrive before the bind
    /// is acknowledged, and the unbind drops what is still queued anyway.
    fn config(&mut self, attrs: &[(u16, &[u8])]) -> Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        self.send(&build(NFQNL_MSG_CONFIG, flags, self.seq, self.queue, attrs))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let mut ack = None;
            match self.recv(&mut buf)? {
                Some(d) => parse(d, |m| {
                    if let Incoming::Ack(e) = m {
                        ack = Some(e);
                    }
                }),
                None => self.wait(Duration::from_millis(100))?,
            }
            match ack {
                Some(0) => return Ok(()),
                Some(e) => return Err(std::io::Error::from_raw_os_error(-e)).context("nfnetlink config"),
                None if Instant::now() > deadline => {
                    bail!("nfnetlink config: no acknowledgement in 5 s")
                }
                None => {}
            }
        }
    }

    /// Accepts every queued packet whose id is at most `id`.
    fn accept_through(&mut self, id: u32) -> Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut hdr = [0u8; 8];
        hdr[..4].copy_from_slice(&NF_ACCEPT.to_be_bytes());
        hdr[4..].copy_from_slice(&id.to_be_bytes());
        let flags = libc::NLM_F_REQUEST as u16;
        self.send(&build(NFQNL_MSG_VERDICT_BATCH, flags, self.seq, self.queue, &[(NFQA_VERDICT_HDR, &hdr)]))
    }
}

/// Delay applied to each packet: `delay` ± up to `jitter` (uniform).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DelaySpec {
    pub delay: Duration,
    pub jitter: Duration,
}

/// A thread in one host's namespace holding that host's queued packets.
/// Stopping it (or dropping it) accepts everything still held.
#[derive(Debug)]
pub struct Delayer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Delayer {
    /// Starts the delayer for queue 0 of the namespace at `netns` (a path
    /// under /run/netns); returns once the queue is bound.
    pub fn start(netns: PathBuf, spec: DelaySpec) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("netem-delayer".into())
            .spawn(move || {
                let sock = super::sys::setns(&netns).and_then(|()| QueueSocket::bind(0));
                match sock {
                    Ok(sock) => {
                        let _ = ready_tx.send(Ok(()));
                        run(sock, spec, &stop2)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        Ok(())
                    }
                }
            })
            .context("spawn netem delayer thread")?;
        let mut d = Delayer { stop, thread: Some(thread) };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(d),
            Ok(Err(e)) => {
                d.stop()?;
                Err(e)
            }
            Err(_) => {
                d.stop()?;
                bail!("netem delayer did not bind its queue in 10 s")
            }
        }
    }

    /// Releases every held packet and ends the thread; returns its error, if
    /// it failed while running.
    pub fn stop(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take() {
            Some(t) => match t.join() {
                Ok(r) => r,
                Err(_) => bail!("netem delayer thread panicked"),
            },
            None => Ok(()),
        }
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Small xorshift for jitter (no need for a real RNG dependency).
struct Jitter(u64);

impl Jitter {
    /// Uniform in [-j, +j].
    fn sample(&mut self, j: Duration) -> i128 {
        if j.is_zero() {
            return 0;
        }
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let span = 2 * j.as_nanos() + 1;
        (u128::from(self.0) % span) as i128 - j.as_nanos() as i128
    }
}

fn release_time(now: Instant, spec: DelaySpec, rng: &mut Jitter, last: Option<Instant>) -> Instant {
    let ns = (spec.delay.as_nanos() as i128 + rng.sample(spec.jitter)).max(0);
    let t = now + Duration::from_nanos(ns as u64);
    // FIFO: never before the packet ahead of it.
    match last {
        Some(l) if l > t => l,
        _ => t,
    }
}

fn run(mut sock: QueueSocket, spec: DelaySpec, stop: &AtomicBool) -> Result<()> {
    let mut held: VecDeque<(Instant, u32)> = VecDeque::with_capacity(QUEUE_MAXLEN as usize);
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
            ^ u64::from(std::process::id()) << 32;
    let mut rng = Jitter(seed | 1);
    let mut buf = vec![0u8; 1 << 16];
    let result = (|| -> Result<()> {
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            let mut due = None;
            while let Some(&(t, id)) = held.front() {
                if t > now {
                    break;
                }
                due = Some(id);
                held.pop_front();
            }
            if let Some(id) = due {
                sock.accept_through(id)?;
            }
            let wait = held.front().map(|&(t, _)| t.saturating_duration_since(now)).unwrap_or(STOP_POLL).min(STOP_POLL);
            sock.wait(wait)?;
            for _ in 0..RECV_BATCH_MAX {
                let Some(d) = sock.recv(&mut buf)? else { break };
                let arrived = Instant::now();
                let mut err = 0;
                parse(d, |m| match m {
                    Incoming::Packet(id) => {
                        let t = release_time(arrived, spec, &mut rng, held.back().map(|h| h.0));
                        held.push_back((t, id));
                    }
                    Incoming::Ack(e) => err = e,
                    Incoming::Other => {}
                });
                if err != 0 {
                    return Err(std::io::Error::from_raw_os_error(-err)).context("nfnetlink verdict");
                }
            }
        }
        Ok(())
    })();
    // Whatever happened, nothing stays held: accept everything, including
    // notifications still arriving, and only then unbind (unbinding, like
    // closing the socket, drops what is still queued in the kernel). The
    // caller removed the NFQUEUE rule first, so the arrivals end; the bound
    // is for the drop path, where the rule stays until the namespace goes.
    let mut last = held.back().map(|h| h.1);
    let mut release = Ok(());
    for _ in 0..RELEASE_ROUNDS_MAX {
        let mut arrived = false;
        loop {
            match sock.recv(&mut buf) {
                Ok(Some(d)) => parse(d, |m| {
                    if let Incoming::Packet(id) = m {
                        last = Some(id);
                        arrived = true;
                    }
                }),
                Ok(None) => break,
                Err(e) => {
                    release = Err(e);
                    break;
                }
            }
        }
        if let Some(id) = last.take() {
            release = release.and(sock.accept_through(id));
        }
        if !arrived {
            break;
        }
        // Let packets just queued by the kernel reach the socket.
        std::thread::sleep(Duration::from_millis(1));
    }
    let unbind = sock.config(&[(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_UNBIND, 0, 0, 0])]);
    result.and(release).and(unbind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_lays_out_header_and_padded_attributes() {
        let m = build(NFQNL_MSG_CONFIG, 5, 7, 0x0102, &[(1, &[9, 9, 9]), (2, &[1, 2, 3, 4, 5])]);
        // 16 header + 4 nfgenmsg + (4+3 → 8) + (4+5 → 12)
        assert_eq!(m.len(), 40);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), (3 << 8) | 2);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 5);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(&m[16..20], &[0, 0, 1, 2]);
        assert_eq!(u16::from_ne_bytes([m[20], m[21]]), 7);
        assert_eq!(&m[24..28], &[9, 9, 9, 0]);
        assert_eq!(u16::from_ne_bytes([m[28], m[29]]), 9);
        assert_eq!(u16::from_ne_bytes([m[30], m[31]]), 2);
    }

    fn packet_msg(id: u32) -> Vec<u8> {
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[0x08, 0x00, 4]);
        let mut m = build(NFQNL_MSG_PACKET, 0, 0, 0, &[(5, &[1, 2, 3, 4]), (NFQA_PACKET_HDR, &hdr)]);
        // Flag the header's type NLA_F_NET_BYTEORDER: the parser must mask it.
        let ty = u16::from_ne_bytes([m[30], m[31]]) | 0x4000;
        m[30..32].copy_from_slice(&ty.to_ne_bytes());
        m
    }

    #[test]
    fn parse_finds_packets_and_acks_and_survives_garbage() {
        let mut d = packet_msg(41);
        d.extend(packet_msg(42));
        let mut ack = vec![0u8; 36];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        d.extend(ack);
        let mut got = Vec::new();
        parse(&d, |m| got.push(m));
        assert_eq!(got, vec![Incoming::Packet(41), Incoming::Packet(42), Incoming::Ack(-1)]);

        // Truncations and lying lengths at every cut never panic.
        for cut in 0..d.len() {
            parse(&d[..cut], |_| {});
            let mut bad = d.clone();
            bad[cut] = 0xff;
            parse(&bad, |_| {});
        }
    }

    #[test]
    fn release_times_are_fifo_and_within_jitter() {
        let spec = DelaySpec { delay: Duration::from_millis(10), jitter: Duration::from_millis(5) };
        let mut rng = Jitter(12345);
        let now = Instant::now();
        let mut last = None;
        for _ in 0..1000 {
            let t = release_time(now, spec, &mut rng, last);
            assert!(t >= now + Duration::from_millis(5));
            assert!(t <= now + Duration::from_millis(15));
            if let Some(l) = last {
                assert!(t >= l);
            }
            last = Some(t);
        }
        let fixed = DelaySpec { delay: Duration::from_millis(3), jitter: Duration::ZERO };
        assert_eq!(release_time(now, fixed, &mut rng, None), now + Duration::from_millis(3));
    }
}
