//! The `rdma` transport on verbs (rdma-sys): reliable-connected queue
//! pairs, SEND/RECV for messages, one-sided RDMA READ/WRITE for data,
//! completions by polling the CQ. Leaf module: all verbs `unsafe` is here.
//!
//! Connection setup is an out-of-band exchange over a TCP control
//! connection: the same authenticated handshake as the `tcp` transport
//! (so no QP number is revealed to a non-member), then each side sends its
//! [`QpInfo`] (QP number, PSN, LID, GID) and moves its QP INIT → RTR → RTS.
//!
//! Memory: each region is registered once as an MR (`ibv_reg_mr`, local
//! write only — the NIC never serves remote access through it). A grant
//! opens exactly the requested ranges for one request:
//! * where the device has type-2 memory windows
//!   (`IBV_DEVICE_MEM_WINDOW_TYPE_2B`), each range gets a window bound to it
//!   by a BIND_MW work request on our QP; descriptor SENDs are fenced after
//!   binds so the peer cannot see a key before its window exists; revoking
//!   deallocates the windows, which invalidates their rkeys in the NIC;
//! * elsewhere, each range is registered as its own small MR with only the
//!   requested remote access, and revoking deregisters it. The key then still
//!   covers exactly the granted bytes and dies with the request; the price is
//!   an `ibv_reg_mr`/`ibv_dereg_mr` per request (tens of µs, pinned pages
//!   counted twice while granted).
//!
//! This host has no RDMA device (`ibv_get_device_list` fails with ENOSYS),
//! so this module is only compiled and its no-device path tested here.

use crate::inline::InlinePool;
use crate::mem::{IoPtr, LocalBuf};
use crate::wire::{self, Message, Segment, Status, MAX_FRAME, MAX_INLINE_FRAME, MAX_SEGMENTS};
use crate::{Access, Config, Endpoint, Grant, Key, LocalSeg, OpCompletion, RegionId, Registry, TransportError};
use rdma_sys::*;
use std::collections::{HashMap, VecDeque};
use std::ffi::CStr;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;

/// The first verbs device found.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub count: usize,
}

/// Looks for a verbs device.
pub fn probe() -> Result<DeviceInfo, TransportError> {
    let mut n: libc::c_int = 0;
    // SAFETY: `n` is a valid out-pointer; the returned list is freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = std::io::Error::last_os_error();
        return Err(TransportError::NoRdmaDevice(format!("ibv_get_device_list failed: {e}")));
    }
    let result = if n <= 0 {
        Err(TransportError::NoRdmaDevice("ibv_get_device_list found 0 devices".into()))
    } else {
        // SAFETY: the list holds `n` > 0 valid device pointers; the name is a
        // NUL-terminated string owned by the device, copied before the list is freed.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(*list)) }.to_string_lossy().into_owned();
        // `n` > 0 checked above.
        Ok(DeviceInfo { name, count: n as usize })
    };
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    result
}

fn verbs(call: &'static str) -> TransportError {
    TransportError::Verbs { call, source: std::io::Error::last_os_error() }
}

fn verbs_rc(call: &'static str, rc: libc::c_int) -> Result<(), TransportError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(TransportError::Verbs { call, source: std::io::Error::from_raw_os_error(rc.abs()) })
    }
}

/// What each side tells the other over the control connection (26 bytes, LE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
}

impl QpInfo {
    const LEN: usize = 26;
    fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..10].copy_from_slice(&self.lid.to_le_bytes());
        b[10..26].copy_from_slice(&self.gid);
        b
    }
    fn decode(b: &[u8; Self::LEN]) -> Self {
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[10..26]);
        QpInfo {
            qpn: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            psn: u32::from_le_bytes([b[4], b[5], b[6], b[7]]) & 0xff_ffff,
            lid: u16::from_le_bytes([b[8], b[9]]),
            gid,
        }
    }
}

const PORT: u8 = 1;
const GID_INDEX: i32 = 0;
/// Bytes of one send or receive buffer: the largest frame, an inline WRITE
/// with its payload included (the simple way: inline payloads are copied
/// into and out of these registered buffers).
const SLOT: usize = if MAX_INLINE_FRAME > MAX_FRAME { MAX_INLINE_FRAME } else { MAX_FRAME };
/// Receive buffers kept posted (each `SLOT` bytes).
const RECV_DEPTH: usize = 64;
/// Send buffers for messages.
const SEND_DEPTH: usize = 64;

// wr_id tags (top two bits).
const TAG_RECV: u64 = 0;
const TAG_SEND: u64 = 1 << 62;
const TAG_OP: u64 = 2 << 62;
const TAG_BIND: u64 = 3 << 62;
const TAG_MASK: u64 = 3 << 62;

/// Verbs objects of one connection, torn down in reverse order on drop.
struct Verbs {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    mw_type2: bool,
}

impl Verbs {
    fn open(cq_depth: usize) -> Result<Self, TransportError> {
        let dev = probe()?;
        let mut n = 0;
        // SAFETY: out-pointer valid; list freed below after opening the first device.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() || n <= 0 {
            return Err(TransportError::NoRdmaDevice(format!("{} vanished", dev.name)));
        }
        // SAFETY: `list[0]` is a valid device (n > 0); the context keeps its own reference.
        let ctx = unsafe { ibv_open_device(*list) };
        // SAFETY: freed once; `ctx` does not borrow from the list.
        unsafe { ibv_free_device_list(list) };
        if ctx.is_null() {
            return Err(verbs("ibv_open_device"));
        }
        let mut v = Verbs {
            ctx,
            pd: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            qp: std::ptr::null_mut(),
            mw_type2: false,
        };
        // SAFETY: `ctx` is open; every object created below is destroyed by `Drop`.
        unsafe {
            let mut attr: ibv_device_attr = std::mem::zeroed();
            verbs_rc("ibv_query_device", ibv_query_device(ctx, &mut attr))?;
            v.mw_type2 = attr.device_cap_flags & ibv_device_cap_flags::IBV_DEVICE_MEM_WINDOW_TYPE_2B.0 != 0;
            v.pd = ibv_alloc_pd(ctx);
            if v.pd.is_null() {
                return Err(verbs("ibv_alloc_pd"));
            }
            // cq_depth is bounded by the config (max_inflight * MAX_SEGMENTS + queues).
            v.cq = ibv_create_cq(ctx, cq_depth as i32, std::ptr::null_mut(), std::ptr::null_mut(), 0);
            if v.cq.is_null() {
                return Err(verbs("ibv_create_cq"));
            }
            let mut init: ibv_qp_init_attr = std::mem::zeroed();
            init.send_cq = v.cq;
            init.recv_cq = v.cq;
            init.qp_type = ibv_qp_type::IBV_QPT_RC;
            init.cap.max_send_wr = (cq_depth - RECV_DEPTH) as u32;
            init.cap.max_recv_wr = RECV_DEPTH as u32;
            init.cap.max_send_sge = 16;
            init.cap.max_recv_sge = 1;
            v.qp = ibv_create_qp(v.pd, &mut init);
            if v.qp.is_null() {
                return Err(verbs("ibv_create_qp"));
            }
        }
        Ok(v)
    }

    fn local_info(&self) -> Result<QpInfo, TransportError> {
        let mut psn = [0u8; 4];
        getrandom::getrandom(&mut psn)
            .map_err(|e| TransportError::Io { what: "getrandom", source: std::io::Error::other(e.to_string()) })?;
        // SAFETY: `ctx`/`qp` are live; attr structs are plain C data written by the library.
        unsafe {
            let mut port: ibv_port_attr = std::mem::zeroed();
            verbs_rc("ibv_query_port", ___ibv_query_port(self.ctx, PORT, &mut port))?;
            let mut gid: ibv_gid = std::mem::zeroed();
            verbs_rc("ibv_query_gid", ibv_query_gid(self.ctx, PORT, GID_INDEX, &mut gid))?;
            Ok(QpInfo { qpn: (*self.qp).qp_num, psn: u32::from_le_bytes(psn) & 0xff_ffff, lid: port.lid, gid: gid.raw })
        }
    }

    /// RESET → INIT → RTR → RTS against the peer's QP.
    fn connect_qp(&self, local: &QpInfo, remote: &QpInfo) -> Result<(), TransportError> {
        use ibv_qp_attr_mask as M;
        // SAFETY: `qp` is live; `attr` is fully initialised for the masks passed.
        unsafe {
            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_INIT;
            a.pkey_index = 0;
            a.port_num = PORT;
            a.qp_access_flags = ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
                | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
                | ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
            let mask = M::IBV_QP_STATE.0 | M::IBV_QP_PKEY_INDEX.0 | M::IBV_QP_PORT.0 | M::IBV_QP_ACCESS_FLAGS.0;
            verbs_rc("ibv_modify_qp(INIT)", ibv_modify_qp(self.qp, &mut a, mask as i32))?;

            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_RTR;
            a.path_mtu = ibv_mtu::IBV_MTU_1024;
            a.dest_qp_num = remote.qpn;
            a.rq_psn = remote.psn;
            a.max_dest_rd_atomic = 16;
            a.min_rnr_timer = 12;
            a.ah_attr.dlid = remote.lid;
            a.ah_attr.port_num = PORT;
            if remote.lid == 0 {
                // RoCE: address by GID.
                a.ah_attr.is_global = 1;
                a.ah_attr.grh.dgid.raw = remote.gid;
                a.ah_attr.grh.sgid_index = GID_INDEX as u8;
                a.ah_attr.grh.hop_limit = 64;
            }
            let mask = M::IBV_QP_STATE.0
                | M::IBV_QP_AV.0
                | M::IBV_QP_PATH_MTU.0
                | M::IBV_QP_DEST_QPN.0
                | M::IBV_QP_RQ_PSN.0
                | M::IBV_QP_MAX_DEST_RD_ATOMIC.0
                | M::IBV_QP_MIN_RNR_TIMER.0;
            verbs_rc("ibv_modify_qp(RTR)", ibv_modify_qp(self.qp, &mut a, mask as i32))?;

            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_RTS;
            a.timeout = 14;
            a.retry_cnt = 7;
            a.rnr_retry = 7;
            a.sq_psn = local.psn;
            a.max_rd_atomic = 16;
            let mask = M::IBV_QP_STATE.0
                | M::IBV_QP_TIMEOUT.0
                | M::IBV_QP_RETRY_CNT.0
                | M::IBV_QP_RNR_RETRY.0
                | M::IBV_QP_SQ_PSN.0
                | M::IBV_QP_MAX_QP_RD_ATOMIC.0;
            verbs_rc("ibv_modify_qp(RTS)", ibv_modify_qp(self.qp, &mut a, mask as i32))?;
        }
        Ok(())
    }

    /// Registers `len` bytes at `ptr` with `access`.
    ///
    /// # Safety
    /// The range must stay valid until the returned MR is deregistered.
    unsafe fn reg(&self, ptr: *mut u8, len: usize, access: u32) -> Result<*mut ibv_mr, TransportError> {
        // SAFETY: `pd` is live; validity of the range is the caller's contract.
        let mr = unsafe { ibv_reg_mr(self.pd, ptr.cast(), len, access as i32) };
        if mr.is_null() {
            return Err(verbs("ibv_reg_mr"));
        }
        Ok(mr)
    }
}

impl Drop for Verbs {
    fn drop(&mut self) {
        // SAFETY: each object was created by this struct and is destroyed once,
        // children before parents; null pointers (failed setup) are skipped.
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            ibv_close_device(self.ctx);
        }
    }
}

/// Per-grant remote access objects.
enum GrantObj {
    Window(*mut ibv_mw),
    Mr(*mut ibv_mr),
}

struct Op {
    user_data: u64,
    remaining: usize,
    status: Status,
    bytes: u64,
    _local: LocalBuf,
}

/// A connected verbs endpoint.
pub struct RdmaEndpoint {
    v: Verbs,
    registry: Arc<Registry>,
    /// MR per registered region (local access).
    mrs: HashMap<u32, *mut ibv_mr>,
    grants: HashMap<u32, Vec<GrantObj>>,
    recv_buf: Vec<u8>,
    recv_mr: *mut ibv_mr,
    send_buf: Vec<u8>,
    send_mr: *mut ibv_mr,
    send_free: Vec<usize>,
    fence_next: bool,
    ops: HashMap<u64, Op>,
    next_op: u64,
    max_inflight: usize,
    inbox: VecDeque<Message>,
    recv_queue: usize,
    /// Completed receives (slot, bytes) not yet decoded into `inbox`, in
    /// arrival order: they wait while the inbox is full or the inline pool
    /// is exhausted, and their buffers are not reposted meanwhile, so the
    /// sender's SENDs meet receiver-not-ready retries (backpressure).
    rx_ready: VecDeque<(usize, usize)>,
    inline_pool: InlinePool,
    completions: VecDeque<OpCompletion>,
    peer_node: u64,
    dead: bool,
}

// SAFETY: the verbs objects are owned by this endpoint and used only through
// `&mut self`; libibverbs allows using them from any thread.
unsafe impl Send for RdmaEndpoint {}

impl std::fmt::Debug for RdmaEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaEndpoint").field("peer_node", &self.peer_node).finish()
    }
}

fn oob_exchange(sock: &mut TcpStream, mine: &QpInfo) -> Result<QpInfo, TransportError> {
    let io = |source| TransportError::Io { what: "rdma control connection", source };
    sock.write_all(&mine.encode()).map_err(io)?;
    let mut b = [0u8; QpInfo::LEN];
    sock.read_exact(&mut b).map_err(io)?;
    Ok(QpInfo::decode(&b))
}

impl RdmaEndpoint {
    /// Connects over a TCP control connection to an [`RdmaAcceptor`].
    pub fn connect(addr: impl ToSocketAddrs, cfg: &Config, registry: Arc<Registry>) -> Result<Self, TransportError> {
        cfg.validate()?;
        probe()?;
        let addr = addr
            .to_socket_addrs()
            .map_err(|source| TransportError::Io { what: "resolve", source })?
            .next()
            .ok_or(TransportError::Handshake("no address"))?;
        let deadline = crate::tcp::Deadline::after(cfg.handshake_timeout);
        let mut sock = TcpStream::connect_timeout(&addr, cfg.handshake_timeout)
            .map_err(|source| TransportError::Io { what: "connect", source })?;
        let peer = crate::tcp::client_handshake(&mut sock, cfg, &deadline)?;
        Self::establish(&mut sock, cfg, registry, peer)
    }

    fn establish(
        sock: &mut TcpStream,
        cfg: &Config,
        registry: Arc<Registry>,
        peer_node: u64,
    ) -> Result<Self, TransportError> {
        let cq_depth = RECV_DEPTH + SEND_DEPTH + cfg.max_inflight * MAX_SEGMENTS.min(16) + 64;
        let v = Verbs::open(cq_depth)?;
        let mine = v.local_info()?;
        let theirs = oob_exchange(sock, &mine)?;
        v.connect_qp(&mine, &theirs)?;
        let mut recv_buf = vec![0u8; RECV_DEPTH * SLOT];
        let mut send_buf = vec![0u8; SEND_DEPTH * SLOT];
        let local = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        // SAFETY: both buffers live in the endpoint and are deregistered in Drop before being freed.
        let recv_mr = unsafe { v.reg(recv_buf.as_mut_ptr(), recv_buf.len(), local) }?;
        // SAFETY: as above.
        let send_mr = unsafe { v.reg(send_buf.as_mut_ptr(), send_buf.len(), local) }?;
        let mut ep = RdmaEndpoint {
            v,
            registry,
            mrs: HashMap::new(),
            grants: HashMap::new(),
            recv_buf,
            recv_mr,
            send_buf,
            send_mr,
            send_free: (0..SEND_DEPTH).collect(),
            fence_next: false,
            ops: HashMap::new(),
            next_op: 1,
            max_inflight: cfg.max_inflight,
            inbox: VecDeque::new(),
            recv_queue: cfg.recv_queue,
            rx_ready: VecDeque::with_capacity(RECV_DEPTH),
            inline_pool: InlinePool::new(cfg.inline_budget),
            completions: VecDeque::new(),
            peer_node,
            dead: false,
        };
        for slot in 0..RECV_DEPTH {
            ep.post_recv(slot)?;
        }
        tracing::info!(node = peer_node, qpn = theirs.qpn, "rdma transport connected");
        Ok(ep)
    }

    fn post_recv(&mut self, slot: usize) -> Result<(), TransportError> {
        let mut sge = ibv_sge {
            addr: self.recv_buf.as_ptr() as u64 + (slot * SLOT) as u64,
            length: SLOT as u32,
            // SAFETY: `recv_mr` is live until Drop.
            lkey: unsafe { (*self.recv_mr).lkey },
        };
        let mut wr =
            ibv_recv_wr { wr_id: TAG_RECV | slot as u64, next: std::ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad = std::ptr::null_mut();
        // SAFETY: the slot lies inside `recv_buf`, registered by `recv_mr`;
        // the buffer is not touched until the receive completes.
        verbs_rc("ibv_post_recv", unsafe { ibv_post_recv(self.v.qp, &mut wr, &mut bad) })
    }

    fn lkey(&self, region: RegionId) -> Result<u32, TransportError> {
        let mr = self.mrs.get(&region.0).ok_or(TransportError::UnknownRegion(region.0))?;
        // SAFETY: MRs in `mrs` are live until deregistered.
        Ok(unsafe { (**mr).lkey })
    }

    fn post_rdma(
        &mut self,
        remote: &[Segment],
        local: &[LocalSeg],
        user_data: u64,
        write: bool,
    ) -> Result<(), TransportError> {
        if self.dead {
            return Err(TransportError::Disconnected);
        }
        if remote.is_empty() || remote.len() > MAX_SEGMENTS {
            return Err(TransportError::Limit("remote segments per operation"));
        }
        if self.ops.len() + self.completions.len() >= self.max_inflight {
            return Err(TransportError::TooManyInFlight(self.max_inflight));
        }
        let buf = self.registry.local(local)?;
        let total: usize = remote.iter().map(|s| s.len as usize).sum();
        if total != buf.total {
            return Err(TransportError::LengthMismatch { local: buf.total, remote: total });
        }
        let lkeys: Vec<u32> = local.iter().map(|l| self.lkey(l.region)).collect::<Result<_, _>>()?;
        let op_id = self.next_op;
        self.next_op = (self.next_op + 1) & !TAG_MASK;
        // Build one WR per remote segment with the local pieces it maps to.
        let mut sges: Vec<Vec<ibv_sge>> = Vec::with_capacity(remote.len());
        let mut off = 0usize;
        for s in remote {
            let pieces: Vec<IoPtr> = buf.sub(off, s.len as usize);
            let mut list = Vec::with_capacity(pieces.len());
            for p in &pieces {
                // Which local segment the piece came from decides its lkey.
                let idx = buf
                    .pieces
                    .iter()
                    .position(|b| (p.ptr as usize) >= (b.ptr as usize) && (p.ptr as usize) < b.ptr as usize + b.len)
                    .unwrap_or(0);
                list.push(ibv_sge { addr: p.ptr as u64, length: p.len as u32, lkey: lkeys[idx] });
            }
            if list.len() > 16 {
                return Err(TransportError::Limit("local pieces per remote segment (max_send_sge 16)"));
            }
            sges.push(list);
            off += s.len as usize;
        }
        // SAFETY: all-zero ibv_send_wr is a valid empty request.
        let mut wrs: Vec<ibv_send_wr> = (0..remote.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
        let n = wrs.len();
        for (i, s) in remote.iter().enumerate() {
            let next: *mut ibv_send_wr = if i + 1 < n { &mut wrs[i + 1] } else { std::ptr::null_mut() };
            let wr = &mut wrs[i];
            wr.wr_id = TAG_OP | op_id;
            wr.next = next;
            wr.sg_list = sges[i].as_mut_ptr();
            wr.num_sge = sges[i].len() as i32;
            wr.opcode = if write { ibv_wr_opcode::IBV_WR_RDMA_WRITE } else { ibv_wr_opcode::IBV_WR_RDMA_READ };
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.wr.rdma = rdma_t { remote_addr: s.addr, rkey: s.key };
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: every SGE points into registered local memory (validated by
        // `Registry::local`, covered by the region's MR), kept alive by `buf`
        // in `ops` until the completion; the WR chain lives across the call.
        verbs_rc("ibv_post_send", unsafe { ibv_post_send(self.v.qp, wrs.as_mut_ptr(), &mut bad) })?;
        self.ops.insert(op_id, Op { user_data, remaining: n, status: Status::Ok, bytes: 0, _local: buf });
        Ok(())
    }

    /// SENDs `msg` from a registered send buffer, its payload (an inline
    /// WRITE's, `msg.payload_len()` bytes) written after the frame by `fill`.
    fn post_send_frame(&mut self, msg: &Message, fill: impl FnOnce(&mut [u8])) -> Result<(), TransportError> {
        if self.dead {
            return Err(TransportError::Disconnected);
        }
        let slot = self.send_free.pop().ok_or(TransportError::QueueFull)?;
        let start = slot * SLOT;
        let buf = &mut self.send_buf[start..start + SLOT];
        let n = match msg.encode(buf) {
            // Only application messages get here: the one payload is an
            // inline WRITE's, which fits a slot (SLOT >= MAX_INLINE_FRAME).
            Ok(n) if n + msg.payload_len() <= SLOT => n,
            Ok(_) => {
                self.send_free.push(slot);
                return Err(TransportError::NotApplication(msg.frame_type()));
            }
            Err(e) => {
                self.send_free.push(slot);
                return Err(TransportError::Encode(e));
            }
        };
        let total = n + msg.payload_len();
        fill(&mut buf[n..total]);
        // SAFETY: `send_mr` is live until Drop.
        let lkey = unsafe { (*self.send_mr).lkey };
        let mut sge = ibv_sge {
            addr: self.send_buf.as_ptr() as u64 + start as u64,
            // At most SLOT bytes (checked above).
            length: total as u32,
            lkey,
        };
        // SAFETY: all-zero is a valid empty WR.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = TAG_SEND | slot as u64;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        // A descriptor must not overtake the window binds it refers to.
        let fence = if std::mem::take(&mut self.fence_next) { ibv_send_flags::IBV_SEND_FENCE.0 } else { 0 };
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0 | fence;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the slot is ours until its send completion returns it to `send_free`.
        verbs_rc("ibv_post_send", unsafe { ibv_post_send(self.v.qp, &mut wr, &mut bad) })
    }

    /// Decodes completed receives into the inbox, in arrival order, while
    /// it has room and inline payloads get buffers; reposts their buffers.
    fn drain_rx(&mut self) {
        while let Some(&(slot, len)) = self.rx_ready.front() {
            if self.dead || self.inbox.len() >= self.recv_queue {
                return;
            }
            let frame = &self.recv_buf[slot * SLOT..slot * SLOT + len];
            let decoded = wire::decode(frame).map(|(mut m, used)| {
                if let Message::Write(d) = &mut m {
                    if d.is_inline() {
                        let Some(mut buf) = self.inline_pool.take(d.length as usize) else {
                            // Every buffer is lent out: wait for one.
                            return None;
                        };
                        // `decode` checked that `length` payload bytes end the frame.
                        buf.as_mut_slice().copy_from_slice(&frame[used - d.length as usize..used]);
                        d.inline = Some(buf);
                    }
                }
                Some(m)
            });
            match decoded {
                Ok(Some(m)) => self.inbox.push_back(m),
                Ok(None) => return,
                Err(e) => return self.fail(&format!("malformed frame: {e}")),
            }
            self.rx_ready.pop_front();
            if self.post_recv(slot).is_err() {
                return self.fail("cannot repost receive");
            }
        }
    }

    fn poll_cq(&mut self) {
        // SAFETY: zeroed ibv_wc is plain data the CQ overwrites.
        let mut wc: [ibv_wc; 32] = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: `cq` is live; `wc` has room for 32 entries.
            let n = unsafe { ibv_poll_cq(self.v.cq, wc.len() as i32, wc.as_mut_ptr()) };
            if n <= 0 {
                if n < 0 {
                    self.fail("ibv_poll_cq failed");
                }
                return self.drain_rx();
            }
            for w in &wc[..n as usize] {
                let ok = w.status == ibv_wc_status::IBV_WC_SUCCESS;
                let id = w.wr_id & !TAG_MASK;
                match w.wr_id & TAG_MASK {
                    TAG_RECV => {
                        if !ok {
                            self.fail("receive failed");
                            continue;
                        }
                        let len = (w.byte_len as usize).min(SLOT);
                        self.rx_ready.push_back((id as usize, len));
                    }
                    TAG_SEND => {
                        self.send_free.push(id as usize);
                        if !ok {
                            self.fail("send failed");
                        }
                    }
                    TAG_OP => {
                        if let Some(op) = self.ops.get_mut(&id) {
                            op.remaining -= 1;
                            op.bytes += u64::from(w.byte_len);
                            if !ok && op.status == Status::Ok {
                                // Remote access errors are the NIC's refusal of a key.
                                op.status = if w.status == ibv_wc_status::IBV_WC_REM_ACCESS_ERR {
                                    Status::AccessDenied
                                } else {
                                    Status::ConnectionLost
                                };
                            }
                            if op.remaining == 0 {
                                if let Some(op) = self.ops.remove(&id) {
                                    let bytes = if op.status == Status::Ok { op.bytes as u32 } else { 0 };
                                    self.completions.push_back(OpCompletion {
                                        user_data: op.user_data,
                                        status: op.status,
                                        bytes,
                                    });
                                }
                            }
                        }
                    }
                    _ => {
                        if !ok {
                            tracing::warn!(node = self.peer_node, "memory window bind failed");
                        }
                    }
                }
            }
        }
    }

    fn fail(&mut self, why: &str) {
        if !self.dead {
            tracing::warn!(node = self.peer_node, "rdma connection lost: {why}");
        }
        self.dead = true;
        for (_, op) in self.ops.drain() {
            self.completions.push_back(OpCompletion {
                user_data: op.user_data,
                status: Status::ConnectionLost,
                bytes: 0,
            });
        }
    }
}

impl Endpoint for RdmaEndpoint {
    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        crate::check_send(msg)?;
        let payload: &[u8] = match msg {
            Message::Write(d) => d.inline.as_deref().unwrap_or_default(),
            _ => &[],
        };
        self.post_send_frame(msg, |buf| buf.copy_from_slice(payload))
    }

    fn send_inline(&mut self, msg: &Message, payload: &[LocalSeg]) -> Result<(), TransportError> {
        crate::check_send_inline(msg, payload)?;
        let local = self.registry.local(payload)?;
        self.post_send_frame(msg, |buf| crate::mem::gather(&local.pieces, buf))
    }

    fn poll_recv(&mut self) -> Result<Option<Message>, TransportError> {
        self.poll_cq();
        match self.inbox.pop_front() {
            Some(m) => Ok(Some(m)),
            None if self.dead => Err(TransportError::Disconnected),
            None => Ok(None),
        }
    }

    unsafe fn register_region(&mut self, ptr: *mut u8, len: usize) -> Result<RegionId, TransportError> {
        // SAFETY: the caller upholds `Registry::register`'s contract.
        let id = unsafe { self.registry.register(ptr, len) }?;
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            | if self.v.mw_type2 { ibv_access_flags::IBV_ACCESS_MW_BIND.0 } else { 0 };
        // SAFETY: same contract: valid until deregistration, which deregisters the MR first.
        match unsafe { self.v.reg(ptr, len, access) } {
            Ok(mr) => {
                self.mrs.insert(id.0, mr);
                Ok(id)
            }
            Err(e) => {
                let _ = self.registry.deregister(id);
                Err(e)
            }
        }
    }

    fn deregister_region(&mut self, region: RegionId) -> Result<(), TransportError> {
        self.registry.deregister(region)?;
        if let Some(mr) = self.mrs.remove(&region.0) {
            // SAFETY: no grant or operation uses the region (the registry said so).
            unsafe { ibv_dereg_mr(mr) };
        }
        Ok(())
    }

    fn grant(&mut self, region: RegionId, ranges: &[(u64, u32)], access: Access) -> Result<Grant, TransportError> {
        // The software grant checks the ranges and keeps the region busy.
        let soft = self.registry.grant(region, ranges, access)?;
        let remote = match access {
            Access::RemoteRead => ibv_access_flags::IBV_ACCESS_REMOTE_READ.0,
            Access::RemoteWrite => {
                ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0 | ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            }
        };
        let mr = *self.mrs.get(&region.0).ok_or(TransportError::UnknownRegion(region.0))?;
        let mut objs = Vec::with_capacity(soft.segments.len());
        let mut segments = crate::Segments::new();
        let result = (|| {
            for s in &soft.segments {
                if self.v.mw_type2 {
                    // SAFETY: `pd` is live; the window is deallocated on revoke/drop.
                    let mw = unsafe { ibv_alloc_mw(self.v.pd, ibv_mw_type::IBV_MW_TYPE_2) }
                        .filter(|p| !p.is_null())
                        .ok_or_else(|| verbs("ibv_alloc_mw"))?;
                    objs.push(GrantObj::Window(mw));
                    // SAFETY: `mw` is live.
                    let rkey = unsafe { ibv_inc_rkey((*mw).rkey) };
                    // SAFETY: all-zero is a valid empty WR.
                    let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
                    wr.wr_id = TAG_BIND;
                    wr.opcode = ibv_wr_opcode::IBV_WR_BIND_MW;
                    wr.bind_mw_tso_union.bind_mw = bind_mw_t {
                        mw,
                        rkey,
                        bind_info: ibv_mw_bind_info {
                            mr,
                            addr: s.addr,
                            length: u64::from(s.len),
                            mw_access_flags: remote,
                        },
                    };
                    let mut bad = std::ptr::null_mut();
                    // SAFETY: the bound range lies inside the region's MR (checked by the registry grant).
                    verbs_rc("ibv_post_send(BIND_MW)", unsafe { ibv_post_send(self.v.qp, &mut wr, &mut bad) })?;
                    self.fence_next = true;
                    segments.push(Segment { addr: s.addr, key: rkey, len: s.len });
                } else {
                    // SAFETY: the range lies inside a registered region (checked
                    // by the registry grant), valid until that region is deregistered,
                    // which the grant prevents until revoke deregisters this MR.
                    let m = unsafe { self.v.reg(s.addr as *mut u8, s.len as usize, remote) }?;
                    objs.push(GrantObj::Mr(m));
                    // SAFETY: `m` was just registered and is live.
                    let key = unsafe { (*m).rkey };
                    segments.push(Segment { addr: s.addr, key, len: s.len });
                }
            }
            Ok::<(), TransportError>(())
        })();
        if let Err(e) = result {
            release(objs);
            let _ = self.registry.revoke(soft.key);
            return Err(e);
        }
        self.grants.insert(soft.key.0, objs);
        Ok(Grant { key: soft.key, segments })
    }

    fn revoke(&mut self, key: Key) -> Result<(), TransportError> {
        let objs = self.grants.remove(&key.0).ok_or(TransportError::UnknownKey(key.0))?;
        release(objs);
        self.registry.revoke(key)
    }

    fn post_read(&mut self, remote: &[Segment], local: &[LocalSeg], user_data: u64) -> Result<(), TransportError> {
        self.post_rdma(remote, local, user_data, false)
    }

    fn post_write(&mut self, remote: &[Segment], local: &[LocalSeg], user_data: u64) -> Result<(), TransportError> {
        self.post_rdma(remote, local, user_data, true)
    }

    fn poll_completions(&mut self, out: &mut [OpCompletion]) -> usize {
        self.poll_cq();
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
        !self.dead
    }
}

/// Invalidates a grant's remote keys in the NIC.
fn release(objs: Vec<GrantObj>) {
    for o in objs {
        // SAFETY: each object was created for this grant and is released once.
        unsafe {
            match o {
                GrantObj::Window(mw) => {
                    ibv_dealloc_mw(mw);
                }
                GrantObj::Mr(mr) => {
                    ibv_dereg_mr(mr);
                }
            }
        }
    }
}

impl Drop for RdmaEndpoint {
    fn drop(&mut self) {
        for (_, objs) in self.grants.drain() {
            release(objs);
        }
        // SAFETY: MRs are deregistered once, before their buffers are freed
        // and before `Verbs` (their PD) is dropped after this body.
        unsafe {
            for (_, mr) in self.mrs.drain() {
                ibv_dereg_mr(mr);
            }
            ibv_dereg_mr(self.recv_mr);
            ibv_dereg_mr(self.send_mr);
        }
    }
}

/// Accepts `rdma` connections on a TCP control port. The control
/// connections are authenticated as the `tcp` transport's are (off the
/// listening thread, one deadline, bounded pending handshakes).
#[derive(Debug)]
pub struct RdmaAcceptor {
    listener: crate::tcp::Listener,
    cfg: Config,
    registry: Arc<Registry>,
}

impl RdmaAcceptor {
    /// Fails with `NoRdmaDevice` at once on a host without verbs devices.
    pub fn bind(addr: impl ToSocketAddrs, cfg: Config, registry: Arc<Registry>) -> Result<Self, TransportError> {
        cfg.validate()?;
        probe()?;
        Ok(Self { listener: crate::tcp::Listener::bind(addr, cfg.clone())?, cfg, registry })
    }

    /// Waits for the next authenticated peer and sets up its queue pair.
    pub fn accept(&self) -> Result<RdmaEndpoint, TransportError> {
        let mut a = self.listener.next(None)?.ok_or(TransportError::Disconnected)?;
        // The QP exchange is bounded like the handshake was.
        let t = Some(self.cfg.handshake_timeout);
        a.sock
            .set_read_timeout(t)
            .and_then(|()| a.sock.set_write_timeout(t))
            .map_err(|source| TransportError::Io { what: "setsockopt", source })?;
        RdmaEndpoint::establish(&mut a.sock, &self.cfg, self.registry.clone(), a.node)
    }

    /// Counters of control-connection handshakes since `bind`.
    pub fn stats(&self) -> crate::tcp::AcceptorStats {
        self.listener.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qp_info_round_trips() {
        let q = QpInfo { qpn: 0x123456, psn: 0xabcdef, lid: 7, gid: [9; 16] };
        assert_eq!(QpInfo::decode(&q.encode()), q);
    }

    #[test]
    fn no_device_is_one_clear_line() {
        if probe().is_ok() {
            return; // A host with a verbs device: the connected path applies instead.
        }
        let cfg = Config::new(1, 1, crate::auth::Secret::new(*b"0123456789abcdef").unwrap());
        let e = RdmaAcceptor::bind("127.0.0.1:0", cfg.clone(), Arc::new(Registry::new())).unwrap_err();
        assert!(e.to_string().starts_with("no RDMA device: "), "{e}");
        let e = RdmaEndpoint::connect("127.0.0.1:9", &cfg, Arc::new(Registry::new())).unwrap_err();
        assert!(matches!(e, TransportError::NoRdmaDevice(_)), "{e}");
    }
}
