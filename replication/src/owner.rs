//! The owner: the node a volume's VM runs on, which serves the guest by fanning its requests
//! out to the volume's replicas. I/O-free: fed guest requests, replicas' replies, etcd answers
//! and the time, it says what to do through [`OwnerAction`]s.
//!
//! ```text
//!  attach:  read meta ─▶ claim (CAS: generation+1, owner=me) ─▶ PROMISE every member
//!           ─▶ remove the silent ones from the in-sync sets (CAS) ─▶ serve
//!  write:   range lock (exclusive) ─▶ WRITE to every in-sync and syncing member at once
//!           ─▶ all answered ─▶ acknowledged once every in-sync member (in etcd) has it (I4)
//!              and the extent has min_replicas in sync or a recorded acceptance (I10)
//!  failure: a member errs or times out ─▶ CAS removing it from the in-sync sets ─▶ the
//!           writes it missed may be acknowledged; its regions are dirty on the others
//!  return:  PROMISE (new session) ─▶ mirror writes to it ─▶ drain older writes ─▶ ask every
//!           in-sync member (and it) for dirty bits ─▶ copy those regions ─▶ flush ─▶ CAS
//!           in sync
//! ```
//!
//! Every membership change is a compare-and-swap of the whole volume document on the revision
//! this owner last committed; a conflict that shows another generation or owner means this
//! node is no longer the owner: it fails what is in flight and stops (fenced).
//!
//! Each guest request is cut into *pieces* (at extent boundaries and the largest descriptor).
//! A piece takes its byte range in the [`RangeLock`] only once it can be sent at once — a
//! piece waiting for a suspended extent or an unreconciled region holds no lock, so the
//! copies that would unblock it can always take theirs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::bitmap::Bitmap;
use crate::meta::{node_id, MemberState, NodeInfo, VolumeMeta};
use crate::msg::{NodeId, Reply, Request, Seq, Stamp, Status, SEQ_GENERATION_SHIFT};
use crate::placement;
use crate::range_lock::{Mode, RangeLock};

/// Nanoseconds on the driver's monotonic clock.
pub type Time = u64;
/// The driver's handle for a guest request.
pub type GuestId = u64;

pub const MS: Time = 1_000_000;
pub const SECOND: Time = 1_000_000_000;

#[derive(Clone, Debug)]
pub struct OwnerConfig {
    /// This node's name.
    pub node: String,
    /// The volume's name.
    pub volume: String,
    /// A replica that has not answered a request after this long is failed. Default 5 s.
    pub io_timeout: Time,
    /// Promises not answered after this long at attach count as failures. Default 3 s.
    pub promise_timeout: Time,
    /// How often failed or unreachable members are asked for a promise again. Default 2 s.
    pub probe_interval: Time,
    /// Back-off after etcd could not be reached. Default 500 ms.
    pub meta_retry: Time,
    /// How often the volume's metadata is re-read (operator decisions, fencing). Default 2 s.
    pub meta_poll: Time,
    /// How often the registered nodes are listed (node loss, replacement). Default 5 s.
    pub nodes_poll: Time,
    /// A region quiet this long on a volume that is whole is flushed and cleaned. Default
    /// 30 s: a region stays dirty while it is written (so only its first write since it was
    /// cleaned waits for the dirty bit's fdatasync, as DRBD's activity log).
    pub clean_after: Time,
    /// Dirty regions kept at most, over the volume: beyond, the least recently written are
    /// cleaned first, quiet or not. Bounds what a returning member or a new owner copies.
    /// Default 4096 (4 GiB at 1 MiB regions).
    pub dirty_max: usize,
    /// A member whose node has been gone from etcd this long is replaced. Default 10 min.
    pub replace_after: Time,
    /// Copy buffers of `region_bytes` each the driver provides (resync, rebuild, reconcile).
    pub copy_slots: u32,
    /// Resync and rebuild rate limit, bytes per second (0: unlimited). Default 64 MiB/s.
    pub copy_bytes_per_s: u64,
    /// Writes up to this size carry their data inline in the descriptor. Default 32 KiB.
    pub inline_max: u32,
    /// Largest piece sent as one descriptor; at most (and by default) [`crate::msg::TRANSFER_MAX`].
    pub piece_max: u64,
    /// Requests to replicas in flight at most; more wait. Default 4096.
    pub inflight_max: usize,
    /// The owner the caller saw and agreed to take the volume over from (a dead node, or an
    /// operator's `--force`). Attach refuses a volume owned by any other node: one that
    /// claimed it since the caller looked must not be fenced by accident.
    pub takeover_of: Option<String>,
}

impl OwnerConfig {
    pub fn new(node: &str, volume: &str) -> Self {
        Self {
            node: node.to_owned(),
            volume: volume.to_owned(),
            io_timeout: 5 * SECOND,
            promise_timeout: 3 * SECOND,
            probe_interval: 2 * SECOND,
            meta_retry: 500 * MS,
            meta_poll: 2 * SECOND,
            nodes_poll: 5 * SECOND,
            clean_after: 30 * SECOND,
            dirty_max: 4096,
            replace_after: 600 * SECOND,
            copy_slots: 4,
            copy_bytes_per_s: 64 << 20,
            inline_max: 32 << 10,
            piece_max: u64::from(crate::msg::TRANSFER_MAX),
            inflight_max: 4096,
            takeover_of: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestOp {
    Read,
    Write { fua: bool },
    Flush,
    Discard,
    WriteZeroes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestStatus {
    Ok,
    /// Out of range, read-only, or this node stopped being the owner.
    IoError,
}

/// Where the bytes of a data request live in the owner's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataRef {
    None,
    /// Bytes of guest request `id`'s buffers, starting `offset` bytes into them.
    Guest {
        id: GuestId,
        offset: u64,
    },
    /// The owner's copy buffer `slot` (resync, rebuild, reconcile), from its start.
    Copy {
        slot: u32,
    },
}

/// The answer to [`OwnerAction::ReadMeta`] and [`OwnerAction::WriteMeta`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaResult {
    /// The document and its `mod_revision`, or `None` if the volume does not exist.
    Read(Option<(VolumeMeta, i64)>),
    Committed {
        revision: i64,
    },
    /// The compare failed; the current document (read in the same transaction).
    Conflict(Option<(VolumeMeta, i64)>),
    /// etcd could not be reached; for a write the outcome is unknown.
    Unavailable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerAction {
    Send {
        to: NodeId,
        request: Request,
        data: DataRef,
    },
    /// Every replica answered request `seq` or was given up on: revoke its memory keys.
    Retire {
        seq: Seq,
    },
    Complete {
        id: GuestId,
        status: GuestStatus,
    },
    ReadMeta,
    /// Compare-and-swap of the volume document on `expect_revision`.
    WriteMeta {
        expect_revision: i64,
        meta: VolumeMeta,
    },
    /// List the registered nodes and call [`Owner::on_nodes`].
    ListNodes,
    Event(OwnerEvent),
}

/// Transitions worth a log line and a status change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerEvent {
    Attached {
        generation: u64,
    },
    MemberFailed {
        node: String,
        reason: String,
    },
    MembershipCommitted {
        epoch: u32,
        summary: String,
    },
    Suspended {
        extent: u32,
    },
    Resumed {
        extent: u32,
    },
    SyncStarted {
        node: String,
        extent: u32,
        regions: u32,
        rebuild: bool,
    },
    SyncDone {
        node: String,
        extent: u32,
        regions: u32,
    },
    Reconciled {
        extent: u32,
        regions: u32,
    },
    Replacing {
        extent: u32,
        lost: String,
        new: String,
    },
    Fenced {
        reason: String,
    },
    /// Every in-sync replica of the extent restarted: acknowledged writes they had not flushed
    /// may be lost; the next flush fails.
    WritesMayBeLost {
        extent: u32,
    },
    Detached,
    Resized {
        size_bytes: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Loading,
    Claiming,
    Promising,
    Serving,
    Detaching,
    Detached,
    Fenced(String),
}

/// Progress of one resync or rebuild, for `volume info` and `cluster status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncProgress {
    pub node: String,
    pub extent: u32,
    pub rebuild: bool,
    pub regions_done: u32,
    pub regions_total: u32,
    pub bytes_done: u64,
    pub started: Time,
}

#[derive(Debug)]
struct Peer {
    name: String,
    /// The replica incarnation promised to us, if the current session stands.
    incarnation: Option<u64>,
    /// Session epoch: requests of an older session are refused by the replica.
    session: u32,
    /// Extents the current session has a promise for.
    promised: BTreeSet<u32>,
    /// Promise requests in flight: seq -> (extent, when it times out). Each has its own
    /// deadline: a resync asks healthy members for their dirty bits at any time, long after
    /// their session began.
    asking: BTreeMap<Seq, (u32, Time)>,
    failed: bool,
    next_probe: Time,
    /// Not in the registered node list since.
    down_since: Option<Time>,
    /// The incarnation of the last session, kept across a failure: a member that comes back
    /// with the same one did not restart and lost nothing.
    last_incarnation: Option<u64>,
    /// The current session follows a restart of the member (its volatile state is gone).
    restarted: bool,
    /// Failed since its last promise: whatever it is in etcd, it may have missed writes.
    lost_session: bool,
}

impl Peer {
    fn usable(&self, extent: u32) -> bool {
        !self.failed && self.incarnation.is_some() && self.promised.contains(&extent)
    }
}

#[derive(Debug)]
enum SyncStage {
    /// Mirroring; waiting for writes sent before mirroring began (seq < barrier) to finish.
    Draining {
        barrier: Seq,
    },
    /// Asking the in-sync members (and the target) for their dirty bits.
    Querying {
        waiting: BTreeMap<Seq, NodeId>,
        bits: Bitmap,
    },
    Copying {
        todo: VecDeque<u32>,
        active: u32,
    },
    Flushing {
        seq: Option<Seq>,
    },
    /// Waiting for the CAS that makes it in sync.
    Joining,
}

#[derive(Debug)]
struct SyncJob {
    /// Unique per job: copies of an abandoned job must not count for the next one.
    id: u64,
    rebuild: bool,
    stage: SyncStage,
    total: u32,
    done: u32,
    started: Time,
    /// `resolve_counter` when the drain finished: every write resolved before it is in the
    /// regions this job copies.
    drained_at: u64,
}

#[derive(Debug, Default)]
struct ExtentRt {
    /// Non-in-sync members receiving every write (resync or rebuild in progress).
    syncing: BTreeMap<NodeId, SyncJob>,
    /// After attach: regions whose in-sync replicas may differ (a write in flight when the
    /// previous owner stopped), copied from `source` to the others before they are read.
    unreconciled: Bitmap,
    reconciling: BTreeSet<u32>,
    reconciled_count: u32,
    source: Option<NodeId>,
    /// Regions with dirty bits on the replicas, as far as this owner knows, and their last
    /// write; cleaned once quiet on a whole extent.
    dirty: BTreeMap<u32, Time>,
    cleaning: bool,
    /// Members that became in sync through a sync job, and that job's `drained_at`.
    joined: BTreeMap<NodeId, u64>,
    suspended: bool,
    /// Nobody could serve it when this owner attached: its reconcile set is computed when
    /// members come back.
    reconcile_later: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyPurpose {
    Reconcile,
    /// For the sync job of this node with this id.
    Sync(NodeId, u64),
}

#[derive(Debug)]
enum PieceKind {
    Read {
        guest: GuestId,
    },
    Mutate {
        guest: GuestId,
        op: GuestOp,
    },
    Flush {
        guest: GuestId,
    },
    Copy {
        purpose: CopyPurpose,
        region: u32,
        slot: u32,
        source: Option<NodeId>,
        wrote: bool,
    },
    /// The last step of a sync job: make what was copied durable before joining.
    SyncFlush {
        node: NodeId,
    },
    Clean {
        regions: Vec<u32>,
        flushed: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceState {
    /// Waiting for its preconditions; holds no lock.
    Queued,
    /// Its lock was asked for and not granted yet.
    Locking,
    /// Lock held (or none needed), ready to send.
    Ready,
    /// Requests in flight (`subs`).
    Issued,
    /// Every target answered; waiting to be acknowledged (I4, I10).
    Held,
}

#[derive(Debug)]
struct Piece {
    kind: PieceKind,
    extent: u32,
    offset: u64,
    len: u64,
    /// Offset of this piece within its guest request's buffers.
    guest_off: u64,
    state: PieceState,
    locked: bool,
    /// Targets that answered Ok, over all of the piece's requests.
    acked: BTreeSet<NodeId>,
    /// Requests in flight for this piece.
    subs: BTreeSet<Seq>,
    /// `resolve_counter` when its last request resolved.
    resolved_no: u64,
    /// `resolve_counter` when it was sent.
    issued_no: u64,
    /// Completes with an error: a flush that cannot promise what it covers is durable.
    fail: bool,
    /// Range locks held beyond the piece's own (cleaning takes one per region).
    extra_locks: Vec<u64>,
}

#[derive(Debug)]
struct Guest {
    pieces_left: u32,
    failed: bool,
    /// Extents where a piece already finished (its data may be lost with them).
    done_in: BTreeSet<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Pending { deadline: Time },
    Ok,
    Failed,
}

#[derive(Debug)]
struct Sub {
    piece: Option<u64>,
    targets: BTreeMap<NodeId, Target>,
    mutates: bool,
    extent: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaOp {
    Idle,
    Reading,
    Writing,
}

pub struct Owner {
    cfg: OwnerConfig,
    me: NodeId,
    phase: Phase,
    meta: Option<VolumeMeta>,
    revision: i64,
    generation: u64,
    peers: BTreeMap<NodeId, Peer>,
    extents: Vec<ExtentRt>,
    lock: RangeLock,
    guests: BTreeMap<GuestId, Guest>,
    pieces: BTreeMap<u64, Piece>,
    next_piece: u64,
    subs: BTreeMap<Seq, Sub>,
    next_seq: u64,
    sessions: u32,
    resolve_counter: u64,
    /// (extent, node): failed members still in sync in etcd, removed by the next CAS (unless
    /// no other in-sync member of the extent is left to serve it).
    must_remove: BTreeSet<(u32, NodeId)>,
    /// The dirty bits each member reported last, per (extent, node).
    bits_seen: BTreeMap<(u32, NodeId), Bitmap>,
    /// Guest requests submitted before the volume's geometry was known.
    early: Vec<(GuestId, GuestOp, u64, u64)>,
    /// The document of the CAS in flight.
    pending_meta: Option<VolumeMeta>,
    /// Documents whose CAS got no answer: any one of them may be in etcd (each was a CAS on
    /// the last revision known, so at most one), and all bind acknowledgements until etcd is
    /// read again or a later CAS on that revision commits.
    uncertain_meta: Vec<VolumeMeta>,
    /// Something changed that may unblock queued pieces or jobs: look at all of them.
    recheck: bool,
    /// Acknowledged writes may have been lost (every in-sync replica of an extent restarted):
    /// the next flush reports it, as fsync reports a lost write-back.
    flush_error_pending: bool,
    /// (extent, node) whose sync job finished, with the job's `drained_at`: made in sync by
    /// the next CAS (even if the job itself was abandoned since: its copy is complete).
    joins: BTreeMap<(u32, NodeId), u64>,
    /// (extent, lost node, replacement).
    replacements: BTreeMap<u32, (String, String)>,
    meta_op: MetaOp,
    meta_retry_at: Time,
    next_meta_poll: Time,
    next_nodes_poll: Time,
    nodes: Option<Vec<NodeInfo>>,
    lease_until: Option<Time>,
    promise_deadline: Time,
    copy_slots_free: Vec<u32>,
    copy_tokens: f64,
    copy_refill_at: Time,
    detach_requested: bool,
    now: Time,
    actions: VecDeque<OwnerAction>,
    /// Test-only switch: acknowledge writes once any one in-sync member has them (a planted
    /// bug the simulator must catch).
    pub plant_bug_ack_early: bool,
    /// Test-only switch: serve after attach without reconciling what the previous owner was
    /// writing (a planted bug the simulator must catch).
    pub plant_bug_skip_reconcile: bool,
}

impl Owner {
    pub fn new(cfg: OwnerConfig) -> Self {
        let me = node_id(&cfg.node);
        let slots = (0..cfg.copy_slots).rev().collect();
        Self {
            cfg,
            me,
            phase: Phase::Loading,
            meta: None,
            revision: 0,
            generation: 0,
            peers: BTreeMap::new(),
            extents: Vec::new(),
            lock: RangeLock::default(),
            guests: BTreeMap::new(),
            pieces: BTreeMap::new(),
            next_piece: 1,
            subs: BTreeMap::new(),
            next_seq: 1,
            sessions: 0,
            resolve_counter: 0,
            must_remove: BTreeSet::new(),
            bits_seen: BTreeMap::new(),
            early: Vec::new(),
            pending_meta: None,
            uncertain_meta: Vec::new(),
            recheck: false,
            flush_error_pending: false,
            joins: BTreeMap::new(),
            replacements: BTreeMap::new(),
            meta_op: MetaOp::Idle,
            meta_retry_at: 0,
            next_meta_poll: 0,
            next_nodes_poll: 0,
            nodes: None,
            lease_until: None,
            promise_deadline: 0,
            copy_slots_free: slots,
            copy_tokens: 0.0,
            copy_refill_at: 0,
            detach_requested: false,
            now: 0,
            actions: VecDeque::new(),
            plant_bug_ack_early: false,
            plant_bug_skip_reconcile: false,
        }
    }

    // ---- status -------------------------------------------------------------------------

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn meta(&self) -> Option<&VolumeMeta> {
        self.meta.as_ref()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn poll_action(&mut self) -> Option<OwnerAction> {
        self.actions.pop_front()
    }

    /// Guest requests not completed yet.
    pub fn guests_in_flight(&self) -> usize {
        self.guests.len()
    }

    /// Extents whose writes wait for members (below min_replicas, no recorded acceptance).
    pub fn suspended_extents(&self) -> Vec<u32> {
        (0..self.extents.len() as u32).filter(|&e| self.extents[e as usize].suspended).collect()
    }

    pub fn sync_progress(&self) -> Vec<SyncProgress> {
        let mut out = Vec::new();
        for (e, rt) in self.extents.iter().enumerate() {
            for (node, job) in &rt.syncing {
                out.push(SyncProgress {
                    node: self.peers.get(node).map_or_else(String::new, |p| p.name.clone()),
                    extent: e as u32,
                    rebuild: job.rebuild,
                    regions_done: job.done,
                    regions_total: job.total,
                    bytes_done: u64::from(job.done) * self.meta.as_ref().map_or(0, |m| m.region_bytes),
                    started: job.started,
                });
            }
        }
        out
    }

    /// One line per piece of work in progress, for diagnostics (`volume info --debug`, the
    /// simulator's failure reports).
    pub fn describe_pending(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .pieces
            .iter()
            .map(|(id, p)| {
                format!(
                    "piece {id} {:?} extent {} [{}..{}) {:?} locked {} acked {:?} subs {:?}",
                    p.kind,
                    p.extent,
                    p.offset,
                    p.offset + p.len,
                    p.state,
                    p.locked,
                    p.acked,
                    p.subs
                )
            })
            .collect();
        for (seq, sub) in &self.subs {
            out.push(format!("sub {seq:#x} piece {:?} targets {:?}", sub.piece, sub.targets));
        }
        out.push(format!(
            "must_remove {:?} joins {:?} meta_op {:?} pending_meta {}",
            self.must_remove,
            self.joins,
            self.meta_op,
            self.pending_meta.is_some()
        ));
        for (id, p) in &self.peers {
            out.push(format!(
                "peer {} ({id:#x}) inc {:?} session {} promised {:?} asking {:?} failed {}",
                p.name, p.incarnation, p.session, p.promised, p.asking, p.failed
            ));
        }
        out
    }

    /// Regions still to reconcile after attach, over all extents.
    pub fn unreconciled_regions(&self) -> u32 {
        self.extents.iter().map(|e| e.unreconciled.count()).sum()
    }

    // ---- inputs -------------------------------------------------------------------------

    /// Begins attaching: reads the volume's document, then claims it.
    pub fn start(&mut self, now: Time) {
        self.now = now;
        self.meta_op = MetaOp::Reading;
        self.actions.push_back(OwnerAction::ReadMeta);
    }

    /// The driver's view of this node's etcd lease: valid until `until`. Past it, this node
    /// may have lost the volume to another node without knowing, so no guest I/O is started.
    pub fn set_lease(&mut self, until: Option<Time>) {
        self.lease_until = until;
    }

    fn lease_ok(&self) -> bool {
        self.lease_until.is_none_or(|t| self.now < t)
    }

    /// Reads the volume's document again at the next tick, instead of at the next poll: an
    /// operator changed it (resize, accepted risk).
    pub fn refresh_meta(&mut self) {
        self.next_meta_poll = 0;
    }

    /// Stops serving once in-flight requests are done and releases the volume in etcd.
    pub fn detach(&mut self, now: Time) {
        self.now = now;
        self.detach_requested = true;
        if self.phase == Phase::Serving {
            self.phase = Phase::Detaching;
        }
        self.step();
    }

    pub fn submit(&mut self, now: Time, id: GuestId, op: GuestOp, offset: u64, len: u64) {
        self.now = now;
        let refuse = match &self.phase {
            Phase::Fenced(_) | Phase::Detached | Phase::Detaching => true,
            _ => self.detach_requested,
        };
        if refuse || self.guests.contains_key(&id) {
            self.actions.push_back(OwnerAction::Complete { id, status: GuestStatus::IoError });
            return;
        }
        let Some(meta) = &self.meta else {
            // Not claimed yet: keep it until attach finishes.
            return self.queue_guest(id, op, offset, len);
        };
        let sector = crate::msg::SECTOR;
        let bad_range = op != GuestOp::Flush
            && (len == 0
                || !offset.is_multiple_of(sector)
                || !len.is_multiple_of(sector)
                || offset.checked_add(len).is_none_or(|end| end > meta.size_bytes));
        let read_only = meta.read_only && !matches!(op, GuestOp::Read | GuestOp::Flush);
        if bad_range || read_only {
            self.actions.push_back(OwnerAction::Complete { id, status: GuestStatus::IoError });
            return;
        }
        self.queue_guest(id, op, offset, len);
        self.step();
    }

    fn queue_guest(&mut self, id: GuestId, op: GuestOp, offset: u64, len: u64) {
        // Pieces are cut once the geometry is known (see `cut_pending`).
        if self.meta.is_none() {
            self.early.push((id, op, offset, len));
            return;
        }
        let meta = self.meta.as_ref().expect("checked");
        let mut cuts = Vec::new();
        if op == GuestOp::Flush {
            cuts.push((0u32, 0u64, 0u64, 0u64));
        } else {
            let mut at = offset;
            let end = offset + len;
            while at < end {
                let extent = (at / meta.extent_bytes) as u32;
                let extent_end = (u64::from(extent) + 1) * meta.extent_bytes;
                let n = (end.min(extent_end) - at).min(self.cfg.piece_max.min(u64::from(crate::msg::TRANSFER_MAX)));
                cuts.push((extent, at, n, at - offset));
                at += n;
            }
        }
        self.guests.insert(id, Guest { pieces_left: cuts.len() as u32, failed: false, done_in: BTreeSet::new() });
        for (extent, at, n, guest_off) in cuts {
            let kind = match op {
                GuestOp::Read => PieceKind::Read { guest: id },
                GuestOp::Flush => PieceKind::Flush { guest: id },
                op => PieceKind::Mutate { guest: id, op },
            };
            let pid = self.new_piece(kind, extent, at, n, guest_off);
            if op == GuestOp::Flush && self.flush_error_pending {
                self.flush_error_pending = false;
                if let Some(p) = self.pieces.get_mut(&pid) {
                    p.fail = true;
                }
            }
            // Out at once, not at the next tick: a guest request's latency must not include a
            // timer. (One that cannot go yet stays queued for the next recheck.)
            self.advance(pid);
        }
    }

    fn new_piece(&mut self, kind: PieceKind, extent: u32, offset: u64, len: u64, guest_off: u64) -> u64 {
        let id = self.next_piece;
        self.next_piece += 1;
        self.pieces.insert(
            id,
            Piece {
                kind,
                extent,
                offset,
                len,
                guest_off,
                state: PieceState::Queued,
                locked: false,
                acked: BTreeSet::new(),
                subs: BTreeSet::new(),
                resolved_no: 0,
                issued_no: 0,
                fail: false,
                extra_locks: Vec::new(),
            },
        );
        id
    }

    /// A replica's reply.
    pub fn on_reply(&mut self, now: Time, from: NodeId, reply: Reply) {
        self.now = now;
        if matches!(self.phase, Phase::Fenced(_) | Phase::Detached) {
            return;
        }
        match reply {
            Reply::Promised { seq, status, incarnation, bitmap, .. } => {
                self.on_promised(from, seq, status, incarnation, bitmap)
            }
            Reply::Done { seq, status } => self.on_done(from, seq, status),
        }
        self.step();
    }

    /// The transport lost its connection to `node`: whatever is in flight there is lost.
    pub fn on_disconnect(&mut self, now: Time, node: NodeId) {
        self.now = now;
        let pending = self.subs.values().any(|s| matches!(s.targets.get(&node), Some(Target::Pending { .. })))
            || self.peers.get(&node).is_some_and(|p| !p.asking.is_empty());
        if pending {
            self.fail_node(node, "connection lost");
            self.step();
        }
    }

    pub fn on_meta(&mut self, now: Time, result: MetaResult) {
        self.now = now;
        let was = self.meta_op;
        self.meta_op = MetaOp::Idle;
        if matches!(self.phase, Phase::Fenced(_) | Phase::Detached) {
            return;
        }
        match result {
            MetaResult::Unavailable => {
                self.meta_retry_at = now + self.cfg.meta_retry;
                if was == MetaOp::Writing {
                    // It may have committed: until an answer shows what etcd holds, both it
                    // and the committed document bind acknowledgements.
                    if let Some(m) = self.pending_meta.take() {
                        self.uncertain_meta.push(m);
                    }
                }
                if self.phase == Phase::Loading || self.phase == Phase::Claiming {
                    // Attach retries from the read.
                    self.phase = Phase::Loading;
                }
            }
            MetaResult::Read(None) => self.fence("the volume no longer exists in etcd"),
            MetaResult::Read(Some((meta, revision))) => {
                // What etcd holds is known again.
                self.uncertain_meta.clear();
                match self.phase {
                    Phase::Loading => self.claim(meta, revision),
                    _ => self.adopt(meta, revision),
                }
            }
            MetaResult::Committed { revision } => {
                if was != MetaOp::Writing {
                    return;
                }
                // A CAS on the revision we know committed: the uncertain one did not.
                self.uncertain_meta.clear();
                let Some(pending) = self.pending_meta.take() else { return };
                self.committed(pending, revision);
            }
            MetaResult::Conflict(current) => {
                self.pending_meta = None;
                self.uncertain_meta.clear();
                if self.phase == Phase::Claiming {
                    self.fence("another node claimed the volume at the same time");
                    return;
                }
                match current {
                    None => self.fence("the volume no longer exists in etcd"),
                    Some((meta, revision)) => self.adopt(meta, revision),
                }
            }
        }
        self.step();
    }

    /// The registered nodes (from etcd).
    pub fn on_nodes(&mut self, now: Time, nodes: Vec<NodeInfo>) {
        self.now = now;
        for (id, peer) in &mut self.peers {
            let up = nodes.iter().any(|n| node_id(&n.name) == *id);
            if up {
                peer.down_since = None;
            } else if peer.down_since.is_none() {
                peer.down_since = Some(now);
            }
        }
        self.nodes = Some(nodes);
        self.step();
    }

    pub fn tick(&mut self, now: Time) {
        self.now = now;
        if matches!(self.phase, Phase::Fenced(_) | Phase::Detached) {
            return;
        }
        // Timeouts.
        let mut late: BTreeSet<NodeId> = BTreeSet::new();
        for sub in self.subs.values() {
            for (node, t) in &sub.targets {
                if matches!(t, Target::Pending { deadline } if *deadline <= now) {
                    late.insert(*node);
                }
            }
        }
        if self.phase == Phase::Promising && now >= self.promise_deadline {
            for (id, peer) in &self.peers {
                if !peer.asking.is_empty() {
                    late.insert(*id);
                }
            }
        }
        for (id, peer) in &self.peers {
            if self.serving() && peer.asking.values().any(|(_, deadline)| *deadline <= now) {
                late.insert(*id);
            }
        }
        for node in late {
            self.fail_node(node, "timed out");
        }
        if now >= self.next_meta_poll
            && self.meta_op == MetaOp::Idle
            && self.meta.is_some()
            && now >= self.meta_retry_at
        {
            self.next_meta_poll = now + self.cfg.meta_poll;
            self.meta_op = MetaOp::Reading;
            self.actions.push_back(OwnerAction::ReadMeta);
        }
        if now >= self.next_nodes_poll && self.serving() {
            self.next_nodes_poll = now + self.cfg.nodes_poll;
            self.actions.push_back(OwnerAction::ListNodes);
        }
        self.periodic();
        self.step();
    }
}

// ---- attach, metadata, fencing ---------------------------------------------------------------

impl Owner {
    fn name_of(&self, node: NodeId) -> String {
        self.peers.get(&node).map_or_else(|| format!("{node:#x}"), |p| p.name.clone())
    }

    fn claim(&mut self, mut meta: VolumeMeta, revision: i64) {
        if let Err(e) = meta.validate() {
            return self.fence(&format!("the volume's metadata is invalid: {e}"));
        }
        if let Some(other) =
            meta.owner.as_deref().filter(|o| *o != self.cfg.node && self.cfg.takeover_of.as_deref() != Some(*o))
        {
            return self.fence(&format!("the volume is attached on {other}"));
        }
        meta.generation += 1;
        meta.owner = Some(self.cfg.node.clone());
        self.phase = Phase::Claiming;
        self.meta_op = MetaOp::Writing;
        self.pending_meta = Some(meta.clone());
        self.actions.push_back(OwnerAction::WriteMeta { expect_revision: revision, meta });
    }

    fn committed(&mut self, meta: VolumeMeta, revision: i64) {
        if self.phase == Phase::Claiming {
            self.generation = meta.generation;
            self.extents = (0..meta.extent_count())
                .map(|e| ExtentRt { unreconciled: Bitmap::new(meta.extent_regions(e)), ..Default::default() })
                .collect();
            self.meta = Some(meta);
            self.revision = revision;
            self.sync_peers();
            self.phase = Phase::Promising;
            self.promise_deadline = self.now + self.cfg.promise_timeout;
            self.sessions = 1;
            let ids: Vec<NodeId> = self.peers.keys().copied().collect();
            for node in ids {
                self.ask_all(node);
            }
            let early = std::mem::take(&mut self.early);
            for (id, op, offset, len) in early {
                self.submit(self.now, id, op, offset, len);
            }
            return;
        }
        let summary = self.describe_change(&meta);
        self.apply_meta(meta, revision);
        let epoch = self.meta.as_ref().map_or(0, |m| m.epoch);
        self.actions.push_back(OwnerAction::Event(OwnerEvent::MembershipCommitted { epoch, summary }));
        if self.phase == Phase::Detaching && self.meta.as_ref().is_some_and(|m| m.owner.is_none()) {
            self.phase = Phase::Detached;
            self.actions.push_back(OwnerAction::Event(OwnerEvent::Detached));
        }
    }

    fn describe_change(&self, new: &VolumeMeta) -> String {
        let Some(old) = &self.meta else { return String::new() };
        let mut parts = Vec::new();
        for (e, (a, b)) in old.extents.iter().zip(&new.extents).enumerate() {
            for m in &b.members {
                match a.member(&m.node) {
                    Some(o) if o.state == m.state => {}
                    Some(o) => parts.push(format!("extent {e}: {} {:?} -> {:?}", m.node, o.state, m.state)),
                    None => parts.push(format!("extent {e}: {} added ({:?})", m.node, m.state)),
                }
            }
            for m in &a.members {
                if b.member(&m.node).is_none() {
                    parts.push(format!("extent {e}: {} removed", m.node));
                }
            }
        }
        if old.risk_accepted.is_some() && new.risk_accepted.is_none() {
            parts.push("risk acceptance cleared (volume whole again)".into());
        }
        if old.owner.is_some() && new.owner.is_none() {
            parts.push("detached".into());
        }
        parts.join("; ")
    }

    /// A document read from etcd (poll or failed CAS): still ours, or we are fenced.
    fn adopt(&mut self, meta: VolumeMeta, revision: i64) {
        if let Err(e) = meta.validate() {
            return self.fence(&format!("the volume's metadata became invalid: {e}"));
        }
        if meta.generation != self.generation || meta.owner.as_deref() != Some(self.cfg.node.as_str()) {
            let owner = meta.owner.clone().unwrap_or_else(|| "nobody".into());
            return self.fence(&format!("the volume is now owned by {owner} (generation {})", meta.generation));
        }
        if revision == self.revision {
            return;
        }
        let grew = self.meta.as_ref().is_some_and(|m| meta.size_bytes > m.size_bytes);
        self.apply_meta(meta, revision);
        if grew {
            let size_bytes = self.meta.as_ref().map_or(0, |m| m.size_bytes);
            self.actions.push_back(OwnerAction::Event(OwnerEvent::Resized { size_bytes }));
        }
    }

    fn apply_meta(&mut self, meta: VolumeMeta, revision: i64) {
        while self.extents.len() < meta.extents.len() {
            let e = self.extents.len() as u32;
            self.extents.push(ExtentRt { unreconciled: Bitmap::new(meta.extent_regions(e)), ..Default::default() });
        }
        let name =
            |peers: &BTreeMap<NodeId, Peer>, n: NodeId| peers.get(&n).map(|p| p.name.clone()).unwrap_or_default();
        self.must_remove
            .retain(|&(e, n)| meta.extents.get(e as usize).is_some_and(|x| x.is_in_sync(&name(&self.peers, n))));
        let joins: Vec<((u32, NodeId), u64)> = self.joins.iter().map(|(k, v)| (*k, *v)).collect();
        for ((e, n), drained_at) in joins {
            if meta.extents[e as usize].is_in_sync(&name(&self.peers, n)) {
                self.joins.remove(&(e, n));
                self.extents[e as usize].joined.insert(n, drained_at);
                let regions = self.extents[e as usize].syncing.remove(&n).map_or(0, |job| job.total);
                let node = name(&self.peers, n);
                self.actions.push_back(OwnerAction::Event(OwnerEvent::SyncDone { node, extent: e, regions }));
            }
        }
        // Jobs for members that left their extent (replaced) end.
        for (e, rt) in self.extents.iter_mut().enumerate() {
            let ext = &meta.extents[e];
            rt.syncing
                .retain(|n, _| ext.member(&name(&self.peers, *n)).is_some_and(|m| m.state != MemberState::InSync));
        }
        self.replacements.retain(|&e, (lost, new)| {
            let ext = &meta.extents[e as usize];
            !(ext.member(new).is_some() && ext.member(lost).is_none())
        });
        // A member that failed and is in sync in what was just committed (a join that was in
        // flight when it failed) must be removed like any failed in-sync member.
        for (e, ext) in meta.extents.iter().enumerate() {
            for m in ext.in_sync() {
                let n = node_id(m);
                if self.peers.get(&n).is_some_and(|p| p.lost_session) {
                    self.must_remove.insert((e as u32, n));
                }
            }
        }
        self.meta = Some(meta);
        self.revision = revision;
        self.sync_peers();
        self.recheck = true;
    }

    /// One peer per member node of the volume.
    fn sync_peers(&mut self) {
        let Some(meta) = &self.meta else { return };
        for name in meta.member_nodes() {
            let id = node_id(&name);
            self.peers.entry(id).or_insert(Peer {
                name,
                incarnation: None,
                session: 0,
                promised: BTreeSet::new(),
                asking: BTreeMap::new(),
                failed: true,
                next_probe: 0,
                down_since: None,
                last_incarnation: None,
                restarted: false,
                lost_session: false,
            });
        }
    }

    fn fence(&mut self, reason: &str) {
        if matches!(self.phase, Phase::Fenced(_)) {
            return;
        }
        self.phase = Phase::Fenced(reason.to_owned());
        self.actions.push_back(OwnerAction::Event(OwnerEvent::Fenced { reason: reason.to_owned() }));
        for seq in std::mem::take(&mut self.subs).into_keys() {
            self.actions.push_back(OwnerAction::Retire { seq });
        }
        for id in std::mem::take(&mut self.guests).into_keys() {
            self.actions.push_back(OwnerAction::Complete { id, status: GuestStatus::IoError });
        }
        for (id, _, _, _) in std::mem::take(&mut self.early) {
            self.actions.push_back(OwnerAction::Complete { id, status: GuestStatus::IoError });
        }
        self.pieces.clear();
        self.lock = RangeLock::default();
    }

    /// The volume document this owner wants in etcd, given what it knows.
    fn desired_meta(&self) -> Option<VolumeMeta> {
        let committed = self.meta.as_ref()?;
        let mut m = committed.clone();
        let mut changed = false;
        for &(e, n) in &self.must_remove {
            let name = self.name_of(n);
            let ext = &m.extents[e as usize];
            if !ext.is_in_sync(&name) {
                continue;
            }
            // Never remove the last in-sync member an extent can still be served from, nor the
            // last clean one (that did not restart) for members that restarted: it alone may
            // hold writes they lost. Unless it is gone for good.
            let clean_n = self.may_be_clean(e, n) && !self.gone(n);
            let other = ext.in_sync().any(|o| {
                let oid = node_id(o);
                oid != n
                    && !self.must_remove.contains(&(e, oid))
                    && self.peers.get(&oid).is_some_and(|p| p.usable(e))
                    && (!clean_n || self.is_clean(e, oid))
            });
            if other {
                if let Some(mm) = m.extents[e as usize].members.iter_mut().find(|x| x.node == name) {
                    mm.state = MemberState::Stale;
                    changed = true;
                }
            }
        }
        for &(e, n) in self.joins.keys() {
            let name = self.name_of(n);
            // A member joins with the incarnation it was filled in: it holds every write the
            // sync's source held. Left at an older one, a later owner would take it for a
            // member that restarted since, and pass it over as a source.
            let current = self.peers.get(&n).filter(|p| p.usable(e)).and_then(|p| p.incarnation);
            if let Some(mm) = m.extents[e as usize].members.iter_mut().find(|x| x.node == name) {
                if mm.state != MemberState::InSync {
                    mm.state = MemberState::InSync;
                    changed = true;
                }
                if let Some(i) = current.filter(|i| *i != mm.incarnation) {
                    mm.incarnation = i;
                    changed = true;
                }
            }
        }
        // Record the incarnations of in-sync members, once their extent is reconciled (a
        // restarted member is trusted as a source only after its regions were copied over).
        // Not while a clean member is away: the extent had nothing to reconcile from, and that
        // member alone may hold writes the restarted ones lost.
        for (e, ext) in m.extents.iter_mut().enumerate() {
            let rt = &self.extents[e];
            if !self.serving() || !rt.unreconciled.is_empty() || !rt.reconciling.is_empty() {
                continue;
            }
            let clean_away = committed.extents[e].in_sync().any(|c| {
                let cid = node_id(c);
                self.may_be_clean(e as u32, cid)
                    && !self.gone(cid)
                    && (self.must_remove.contains(&(e as u32, cid))
                        || !self.peers.get(&cid).is_some_and(|p| p.usable(e as u32)))
            });
            if clean_away {
                continue;
            }
            for mm in &mut ext.members {
                let n = node_id(&mm.node);
                let usable = !self.must_remove.contains(&(e as u32, n))
                    && self.peers.get(&n).is_some_and(|p| p.usable(e as u32));
                let current = self.peers.get(&n).and_then(|p| p.incarnation);
                let joining = self.joins.contains_key(&(e as u32, n));
                if mm.state == MemberState::InSync && !joining && usable {
                    if let Some(i) = current.filter(|i| *i != mm.incarnation) {
                        mm.incarnation = i;
                        changed = true;
                    }
                }
            }
        }
        for (&e, (lost, new)) in &self.replacements {
            let ext = &mut m.extents[e as usize];
            if ext.member(new).is_none() {
                if let Some(mm) = ext.members.iter_mut().find(|x| &x.node == lost) {
                    mm.node = new.clone();
                    mm.state = MemberState::Rebuilding;
                    mm.incarnation = 0;
                    changed = true;
                }
            }
        }
        if m.risk_accepted.is_some() && m.is_whole() {
            m.risk_accepted = None;
            changed = true;
        }
        if self.phase == Phase::Detaching && self.guests.is_empty() && self.pieces.is_empty() && m.owner.is_some() {
            m.owner = None;
            changed = true;
        }
        if !changed {
            return None;
        }
        m.epoch += 1;
        Some(m)
    }

    fn schedule_meta(&mut self) {
        if self.meta_op != MetaOp::Idle || self.now < self.meta_retry_at {
            return;
        }
        if !matches!(self.phase, Phase::Promising | Phase::Serving | Phase::Detaching) {
            return;
        }
        let Some(meta) = self.desired_meta() else { return };
        self.meta_op = MetaOp::Writing;
        self.pending_meta = Some(meta.clone());
        self.actions.push_back(OwnerAction::WriteMeta { expect_revision: self.revision, meta });
    }
}

// ---- replicas: promises, failures, sessions --------------------------------------------------

impl Owner {
    fn new_seq(&mut self) -> Seq {
        let seq = (self.generation << SEQ_GENERATION_SHIFT) | self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Every request below this number has resolved.
    fn floor(&self) -> Seq {
        self.subs.keys().next().copied().unwrap_or((self.generation << SEQ_GENERATION_SHIFT) | self.next_seq)
    }

    fn stamp(&self, node: NodeId) -> Stamp {
        let peer = &self.peers[&node];
        Stamp {
            volume: self.meta.as_ref().map_or(0, |m| m.id),
            generation: self.generation,
            epoch: peer.session,
            incarnation: peer.incarnation.unwrap_or(0),
            floor: self.floor(),
        }
    }

    /// Asks `node` for a promise for `extent` in its current session.
    fn ask(&mut self, node: NodeId, extent: u32) -> Seq {
        let seq = self.new_seq();
        let (volume, generation) = (self.meta.as_ref().map_or(0, |m| m.id), self.generation);
        let peer = self.peers.get_mut(&node).expect("peer exists");
        // As long as a probe's: the answer waits for the member to make its promise durable.
        peer.asking.insert(seq, (extent, self.now + self.cfg.probe_interval + self.cfg.promise_timeout));
        let epoch = peer.session;
        self.actions.push_back(OwnerAction::Send {
            to: node,
            request: Request::Promise { seq, volume, generation, epoch, extent },
            data: DataRef::None,
        });
        seq
    }

    /// Opens a new session with `node`: a promise for every extent it is a member of.
    fn ask_all(&mut self, node: NodeId) {
        let Some(meta) = &self.meta else { return };
        let name = self.name_of(node);
        let extents = meta.extents_of(&name);
        if let Some(peer) = self.peers.get_mut(&node) {
            peer.session = self.sessions;
            peer.next_probe = self.now + self.cfg.probe_interval;
        }
        for e in extents {
            self.ask(node, e);
        }
    }

    fn on_promised(&mut self, from: NodeId, seq: Seq, status: Status, incarnation: u64, bitmap: Bitmap) {
        let Some(peer) = self.peers.get_mut(&from) else { return };
        let Some((extent, _)) = peer.asking.remove(&seq) else { return };
        if status != Status::Ok {
            if matches!(status, Status::StaleGeneration | Status::NotOwner) {
                self.next_meta_poll = self.now;
            }
            return self.fail_node(from, &format!("promise refused: {status:?}"));
        }
        if peer.incarnation.is_some_and(|i| i != incarnation) {
            return self.fail_node(from, "restarted");
        }
        let first_of_session = peer.incarnation.is_none();
        if first_of_session {
            peer.restarted = peer.last_incarnation.is_some_and(|i| i != incarnation);
        }
        let restarted = peer.restarted;
        peer.incarnation = Some(incarnation);
        peer.last_incarnation = Some(incarnation);
        peer.promised.insert(extent);
        peer.failed = false;
        peer.lost_session = false;
        self.bits_seen.insert((extent, from), bitmap.clone());
        // A sync job's question?
        for rt in &mut self.extents {
            for job in rt.syncing.values_mut() {
                if let SyncStage::Querying { waiting, bits } = &mut job.stage {
                    if waiting.remove(&seq).is_some() {
                        bits.union_with(&bitmap);
                    }
                }
            }
        }
        // A failed in-sync member coming back to an extent nobody else can serve: it resumes if
        // it did not restart (it holds everything it acknowledged).
        // (Restarted as far as this owner saw it, or since the incarnation etcd recorded.)
        let suspect = restarted || !self.is_clean(extent, from);
        // A failed member that stayed in sync in etcd holds every acknowledged write (none was
        // acknowledged without it). It serves again if no other member does, or if the others
        // restarted (lost what they had not flushed): then it is the source everything is
        // reconciled from.
        if self.must_remove.contains(&(extent, from)) && !suspect && !self.has_other_clean_server(extent, from) {
            let others = self.has_other_server(extent, from);
            self.must_remove.remove(&(extent, from));
            self.extents[extent as usize].syncing.clear();
            if others {
                self.reconcile_servers(extent);
            }
        }
        if suspect {
            if restarted && first_of_session {
                // What it acknowledged in its earlier life may be gone with its volatile state.
                for piece in self.pieces.values_mut() {
                    piece.acked.remove(&from);
                }
                for rt in &mut self.extents {
                    rt.joined.remove(&from);
                }
            }
            self.readmit_after_restarts(extent);
        }
        self.recheck = true;
    }

    /// Gone from etcd longer than `replace_after`: being given up.
    fn gone(&self, node: NodeId) -> bool {
        self.peers.get(&node).and_then(|p| p.down_since).is_some_and(|t| t + self.cfg.replace_after <= self.now)
    }

    fn has_other_clean_server(&self, extent: u32, node: NodeId) -> bool {
        self.servers(extent).into_iter().any(|o| o != node && self.is_clean(extent, o))
    }

    /// The servers of `extent` may differ where any of them marked regions dirty or this
    /// owner wrote: reconcile those from a clean one before they are read.
    fn reconcile_servers(&mut self, extent: u32) {
        let servers = self.servers(extent);
        let regions = self.meta.as_ref().map_or(0, |m| m.extent_regions(extent));
        let mut bits = Bitmap::new(regions);
        for n in &servers {
            if let Some(b) = self.bits_seen.get(&(extent, *n)) {
                bits.union_with(b);
            }
        }
        let rt = &mut self.extents[extent as usize];
        for &r in rt.dirty.keys() {
            bits.set(r);
        }
        if servers.len() > 1 {
            rt.unreconciled.union_with(&bits);
        }
        rt.source = None;
    }

    /// True if `extent` has a usable in-sync member other than `node`.
    fn has_other_server(&self, extent: u32, node: NodeId) -> bool {
        let Some(meta) = &self.meta else { return false };
        meta.extents[extent as usize].in_sync().any(|o| {
            let oid = node_id(o);
            oid != node
                && !self.must_remove.contains(&(extent, oid))
                && self.peers.get(&oid).is_some_and(|p| p.usable(extent))
        })
    }

    /// An extent whose in-sync members all failed, and came back restarted: once all of them
    /// have promised again, they resume together and the regions any of them marked dirty are
    /// reconciled from one of them, as after an owner crash.
    fn readmit_after_restarts(&mut self, extent: u32) {
        let Some(meta) = &self.meta else { return };
        let in_sync: Vec<NodeId> = meta.extents[extent as usize].in_sync().map(node_id).collect();
        if in_sync.iter().any(|n| !self.must_remove.contains(&(extent, *n))) {
            return; // someone serves it; the restarted one is resynced as usual
        }
        // Members gone longer than `replace_after` are not waited for: they are being given up.
        let in_sync: Vec<NodeId> = in_sync.into_iter().filter(|n| !self.gone(*n)).collect();
        if in_sync.is_empty() || !in_sync.iter().all(|n| self.peers.get(n).is_some_and(|p| p.usable(extent))) {
            return;
        }
        let mut bits = Bitmap::new(meta.extent_regions(extent));
        self.extents[extent as usize].syncing.clear();
        for n in &in_sync {
            self.must_remove.remove(&(extent, *n));
            if let Some(b) = self.bits_seen.get(&(extent, *n)) {
                bits.union_with(b);
            }
        }
        // Writes they acknowledged and had not flushed may be gone from every replica: fail
        // the flushes in flight and the next one, so the guest learns it (like fsync's EIO).
        for piece in self.pieces.values_mut() {
            if matches!(piece.kind, PieceKind::Flush { .. }) {
                piece.fail = true;
            }
        }
        self.flush_error_pending = true;
        // Guest writes with a piece already done in this extent, not yet answered: that piece
        // may be gone, so the whole request fails.
        for g in self.guests.values_mut() {
            if g.done_in.contains(&extent) {
                g.failed = true;
            }
        }
        self.actions.push_back(OwnerAction::Event(OwnerEvent::WritesMayBeLost { extent }));
        let rt = &mut self.extents[extent as usize];
        rt.unreconciled.union_with(&bits);
        rt.source = None;
        for r in bits.iter() {
            rt.dirty.insert(r, self.now);
        }
    }

    fn fail_node(&mut self, node: NodeId, reason: &str) {
        let Some(peer) = self.peers.get_mut(&node) else { return };
        let first = !peer.failed;
        peer.failed = true;
        peer.lost_session = true;
        peer.incarnation = None;
        peer.promised.clear();
        let asking: Vec<Seq> = std::mem::take(&mut peer.asking).into_keys().collect();
        peer.next_probe = self.now + self.cfg.probe_interval;
        if first {
            let node_name = peer.name.clone();
            self.actions
                .push_back(OwnerAction::Event(OwnerEvent::MemberFailed { node: node_name, reason: reason.to_owned() }));
        }
        // A sync that finished but is not in etcd yet does not count: it missed something.
        self.joins.retain(|(_, n), _| *n != node);
        for rt in &mut self.extents {
            rt.syncing.remove(&node);
            for job in rt.syncing.values_mut() {
                if let SyncStage::Querying { waiting, .. } = &mut job.stage {
                    waiting.retain(|seq, _| !asking.contains(seq));
                }
            }
            if rt.source == Some(node) {
                rt.source = None;
            }
        }
        if let Some(meta) = &self.meta {
            let name = self.name_of(node);
            for e in 0..meta.extent_count() {
                if meta.extents[e as usize].is_in_sync(&name) {
                    self.must_remove.insert((e, node));
                    // The extent's sources changed: jobs start over, asking the members that
                    // remain for their dirty bits.
                    self.extents[e as usize].syncing.clear();
                }
            }
        }
        let pending: Vec<Seq> = self
            .subs
            .iter_mut()
            .filter_map(|(seq, sub)| match sub.targets.get_mut(&node) {
                Some(t @ Target::Pending { .. }) => {
                    *t = Target::Failed;
                    Some(*seq)
                }
                _ => None,
            })
            .collect();
        for seq in pending {
            self.maybe_resolve(seq);
        }
        self.recheck = true;
    }

    fn on_done(&mut self, from: NodeId, seq: Seq, status: Status) {
        let Some(sub) = self.subs.get_mut(&seq) else { return };
        let Some(target) = sub.targets.get_mut(&from) else { return };
        if !matches!(target, Target::Pending { .. }) || status == Status::Duplicate {
            // A copy of our request the network made: the original's answer counts.
            return;
        }
        if status == Status::Ok {
            *target = Target::Ok;
            if let Some(piece) = sub.piece.and_then(|p| self.pieces.get_mut(&p)) {
                piece.acked.insert(from);
            }
            self.maybe_resolve(seq);
        } else {
            if matches!(status, Status::StaleGeneration | Status::NotOwner | Status::StaleEpoch) {
                // Someone newer may own the volume: look now rather than at the next poll.
                self.next_meta_poll = self.now;
            }
            self.fail_node(from, &format!("answered {status:?}"));
        }
    }

    fn maybe_resolve(&mut self, seq: Seq) {
        let Some(sub) = self.subs.get(&seq) else { return };
        if sub.targets.values().any(|t| matches!(t, Target::Pending { .. })) {
            return;
        }
        let sub = self.subs.remove(&seq).expect("present");
        self.actions.push_back(OwnerAction::Retire { seq });
        self.resolve_counter += 1;
        if !self.pieces_waiting_capacity_empty() {
            self.recheck = true;
        }
        let Some(pid) = sub.piece else { return };
        let Some(piece) = self.pieces.get_mut(&pid) else { return };
        piece.subs.remove(&seq);
        if piece.subs.is_empty() {
            piece.resolved_no = self.resolve_counter;
            self.piece_resolved(pid);
        }
    }

    fn pieces_waiting_capacity_empty(&self) -> bool {
        self.subs.len() + 1 < self.cfg.inflight_max
    }
}

// ---- pieces: guest requests, copies, cleaning ------------------------------------------------

const CLEAN_LOCK_BIT: u64 = 1 << 63;

impl Owner {
    fn serving(&self) -> bool {
        matches!(self.phase, Phase::Serving | Phase::Detaching)
    }

    /// Usable in-sync members of an extent, this node first.
    fn servers(&self, extent: u32) -> Vec<NodeId> {
        let Some(meta) = &self.meta else { return Vec::new() };
        let mut out: Vec<NodeId> = meta.extents[extent as usize]
            .in_sync()
            .map(node_id)
            .filter(|n| {
                !self.must_remove.contains(&(extent, *n)) && self.peers.get(n).is_some_and(|p| p.usable(extent))
            })
            .collect();
        if let Some(i) = out.iter().position(|n| *n == self.me) {
            out.swap(0, i);
        }
        out
    }

    /// True if `node` holds everything the volume's previous owners saw it acknowledge in
    /// `extent`: it has not restarted since its incarnation was last recorded in etcd.
    fn is_clean(&self, extent: u32, node: NodeId) -> bool {
        let Some(meta) = &self.meta else { return false };
        let name = self.name_of(node);
        let Some(m) = meta.extents[extent as usize].member(&name) else { return false };
        m.incarnation == 0
            || self.peers.get(&node).and_then(|p| p.incarnation.or(p.last_incarnation)) == Some(m.incarnation)
    }

    /// As [`is_clean`](Self::is_clean), but also true for a member this owner has not heard
    /// from yet: it may well hold everything, so it is waited for, never written off.
    fn may_be_clean(&self, extent: u32, node: NodeId) -> bool {
        self.is_clean(extent, node)
            || self.peers.get(&node).is_none_or(|p| p.incarnation.or(p.last_incarnation).is_none())
    }

    /// Where a region of `extent` may be copied from: a usable in-sync member that did not
    /// restart (its copy of every acknowledged write is intact). Only if no in-sync member of
    /// the extent is clean any more may a restarted one serve: then every copy of the writes it
    /// lost is gone, whichever is chosen.
    fn copy_source(&self, extent: u32) -> Option<NodeId> {
        let servers = self.servers(extent);
        let clean: Vec<NodeId> = servers.iter().copied().filter(|n| self.is_clean(extent, *n)).collect();
        if let Some(s) = self.extents[extent as usize].source.filter(|s| clean.contains(s)) {
            return Some(s);
        }
        if let Some(&s) = clean.first() {
            return Some(s);
        }
        let meta = self.meta.as_ref()?;
        // A clean member that failed is still waited for (it alone may hold what the others
        // lost) unless it is gone for good; removal keeps it in sync meanwhile.
        let clean_elsewhere = meta.extents[extent as usize].in_sync().any(|m| {
            let n = node_id(m);
            self.may_be_clean(extent, n) && !self.gone(n)
        });
        if clean_elsewhere {
            return None; // wait for it, or for its removal
        }
        servers.first().copied()
    }

    /// Where a guest read of `extent` goes: the first usable in-sync member (this node
    /// first) that did not restart, if the extent has any such member at all.
    fn read_source(&self, extent: u32) -> Option<NodeId> {
        let servers = self.servers(extent);
        if let Some(&n) = servers.iter().find(|n| self.is_clean(extent, **n)) {
            return Some(n);
        }
        self.copy_source(extent)
    }

    fn syncing_targets(&self, extent: u32) -> Vec<NodeId> {
        self.extents[extent as usize]
            .syncing
            .keys()
            .copied()
            .filter(|n| self.peers.get(n).is_some_and(|p| p.usable(extent)))
            .collect()
    }

    fn region_range(&self, extent: u32, region: u32) -> (u64, u64) {
        let meta = self.meta.as_ref().expect("serving");
        let start = u64::from(extent) * meta.extent_bytes + u64::from(region) * meta.region_bytes;
        let end = (start + meta.region_bytes).min(meta.size_bytes);
        (start, end - start)
    }

    fn regions_of(&self, offset: u64, len: u64) -> (u32, u32) {
        let meta = self.meta.as_ref().expect("serving");
        let base = offset % meta.extent_bytes;
        let first = (base / meta.region_bytes) as u32;
        let last = ((base + len.max(1) - 1) / meta.region_bytes) as u32;
        (first, last)
    }

    /// Moves a piece forward as far as it can go now.
    fn advance(&mut self, pid: u64) {
        let Some(piece) = self.pieces.get(&pid) else { return };
        match piece.state {
            PieceState::Queued => {}
            PieceState::Ready => return self.issue(pid),
            PieceState::Locking | PieceState::Issued => return,
            PieceState::Held => return self.try_ack(pid),
        }
        if !self.serving() || !self.lease_ok() {
            return;
        }
        let extent = piece.extent;
        let mode = match &piece.kind {
            PieceKind::Read { .. } => {
                let (first, last) = self.regions_of(piece.offset, piece.len);
                let rt = &self.extents[extent as usize];
                if rt.reconcile_later || (first..=last).any(|r| rt.unreconciled.get(r)) {
                    return; // the reconcile of those regions comes first (scheduled with priority)
                }
                if self.read_source(extent).is_none() {
                    return;
                }
                Some(Mode::Shared)
            }
            PieceKind::Mutate { .. } => {
                let meta = self.meta.as_ref().expect("serving");
                if !meta.writable(extent) || self.servers(extent).is_empty() {
                    return;
                }
                Some(Mode::Exclusive)
            }
            PieceKind::Flush { .. } | PieceKind::SyncFlush { .. } => None,
            PieceKind::Copy { .. } => Some(Mode::Exclusive),
            PieceKind::Clean { .. } => None,
        };
        let piece = self.pieces.get_mut(&pid).expect("present");
        match mode {
            None => piece.state = PieceState::Ready,
            Some(mode) => {
                let (start, end) = (piece.offset, piece.offset + piece.len);
                if self.lock.acquire(pid, start, end, mode) {
                    piece.locked = true;
                    piece.state = PieceState::Ready;
                } else {
                    piece.state = PieceState::Locking;
                    return;
                }
            }
        }
        self.issue(pid);
    }

    fn release_locks(&mut self, pid: u64) {
        let Some(piece) = self.pieces.get_mut(&pid) else { return };
        let mut ids = std::mem::take(&mut piece.extra_locks);
        if piece.locked {
            piece.locked = false;
            ids.push(pid);
        }
        let mut granted = Vec::new();
        for id in ids {
            granted.extend(self.lock.release(id));
        }
        for g in granted {
            if g & CLEAN_LOCK_BIT != 0 {
                continue;
            }
            if let Some(p) = self.pieces.get_mut(&g) {
                p.locked = true;
                if p.state == PieceState::Locking {
                    p.state = PieceState::Ready;
                }
            }
            self.advance(g);
        }
    }

    /// Gives the lock back and waits for the preconditions again.
    fn requeue(&mut self, pid: u64) {
        self.release_locks(pid);
        if let Some(p) = self.pieces.get_mut(&pid) {
            p.state = PieceState::Queued;
        }
    }

    fn send(
        &mut self,
        pid: u64,
        targets: &[NodeId],
        make: impl Fn(Seq, Stamp) -> (Request, DataRef),
        mutates: bool,
        extent: Option<u32>,
    ) -> Seq {
        let seq = self.new_seq();
        let deadline = self.now + self.cfg.io_timeout;
        let mut sub = Sub { piece: Some(pid), targets: BTreeMap::new(), mutates, extent };
        for &t in targets {
            sub.targets.insert(t, Target::Pending { deadline });
        }
        self.subs.insert(seq, sub);
        for &t in targets {
            let (request, data) = make(seq, self.stamp(t));
            self.actions.push_back(OwnerAction::Send { to: t, request, data });
        }
        let counter = self.resolve_counter;
        if let Some(p) = self.pieces.get_mut(&pid) {
            p.subs.insert(seq);
            p.state = PieceState::Issued;
            p.issued_no = counter;
        }
        seq
    }

    fn issue(&mut self, pid: u64) {
        if self.subs.len() >= self.cfg.inflight_max || !self.lease_ok() {
            return; // stays Ready; picked up when requests resolve
        }
        let Some(piece) = self.pieces.get(&pid) else { return };
        let (extent, offset, len, guest_off) = (piece.extent, piece.offset, piece.len, piece.guest_off);
        match piece.kind {
            PieceKind::Read { guest } => {
                let Some(node) = self.read_source(extent) else { return self.requeue(pid) };
                self.send(
                    pid,
                    &[node],
                    |seq, stamp| {
                        (
                            Request::Read { seq, stamp, extent, offset, len: len as u32 },
                            DataRef::Guest { id: guest, offset: guest_off },
                        )
                    },
                    false,
                    Some(extent),
                );
            }
            PieceKind::Mutate { guest, op } => {
                let meta = self.meta.as_ref().expect("serving");
                if !meta.writable(extent) {
                    return self.requeue(pid);
                }
                let mut targets = self.servers(extent);
                if targets.is_empty() {
                    return self.requeue(pid);
                }
                targets.extend(self.syncing_targets(extent));
                let (first, last) = self.regions_of(offset, len);
                for r in first..=last {
                    self.extents[extent as usize].dirty.insert(r, self.now);
                }
                let inline_max = u64::from(self.cfg.inline_max);
                self.send(
                    pid,
                    &targets,
                    |seq, stamp| match op {
                        GuestOp::Write { fua } => (
                            Request::Write {
                                seq,
                                stamp,
                                extent,
                                offset,
                                len: len as u32,
                                fua,
                                inline: len <= inline_max,
                            },
                            DataRef::Guest { id: guest, offset: guest_off },
                        ),
                        GuestOp::Discard => (Request::Discard { seq, stamp, extent, offset, len }, DataRef::None),
                        _ => (Request::WriteZeroes { seq, stamp, extent, offset, len }, DataRef::None),
                    },
                    true,
                    Some(extent),
                );
            }
            PieceKind::Flush { .. } => {
                let mut targets: BTreeSet<NodeId> = BTreeSet::new();
                for e in 0..self.extents.len() as u32 {
                    targets.extend(self.servers(e));
                    targets.extend(self.syncing_targets(e));
                }
                if targets.is_empty() {
                    return; // nobody to flush: waits (an extent with no member left)
                }
                let targets: Vec<NodeId> = targets.into_iter().collect();
                self.send(pid, &targets, |seq, stamp| (Request::Flush { seq, stamp }, DataRef::None), false, None);
            }
            PieceKind::SyncFlush { node } => {
                if !self.peers.get(&node).is_some_and(|p| p.usable(extent)) {
                    return self.drop_piece(pid);
                }
                self.send(pid, &[node], |seq, stamp| (Request::Flush { seq, stamp }, DataRef::None), false, None);
            }
            PieceKind::Copy { purpose, slot, wrote, .. } => {
                if !wrote {
                    // First half: read the region from a source.
                    let source = self.copy_source(extent);
                    let Some(source) = source else { return self.requeue(pid) };
                    if purpose == CopyPurpose::Reconcile {
                        self.extents[extent as usize].source = Some(source);
                    }
                    if let Some(PieceKind::Copy { source: s, .. }) = self.pieces.get_mut(&pid).map(|p| &mut p.kind) {
                        *s = Some(source);
                    }
                    self.send(
                        pid,
                        &[source],
                        |seq, stamp| {
                            (Request::Read { seq, stamp, extent, offset, len: len as u32 }, DataRef::Copy { slot })
                        },
                        false,
                        Some(extent),
                    );
                } else {
                    let source = match &self.pieces[&pid].kind {
                        PieceKind::Copy { source, .. } => *source,
                        _ => None,
                    };
                    let targets: Vec<NodeId> = match purpose {
                        CopyPurpose::Reconcile => {
                            self.servers(extent).into_iter().filter(|n| Some(*n) != source).collect()
                        }
                        CopyPurpose::Sync(node, id) => {
                            let ok = self.extents[extent as usize].syncing.get(&node).is_some_and(|j| j.id == id)
                                && self.peers.get(&node).is_some_and(|p| p.usable(extent));
                            if ok {
                                vec![node]
                            } else {
                                Vec::new()
                            }
                        }
                    };
                    if targets.is_empty() {
                        return self.copy_done(pid);
                    }
                    let (first, last) = self.regions_of(offset, len);
                    for r in first..=last {
                        self.extents[extent as usize].dirty.insert(r, self.now);
                    }
                    let inline_max = u64::from(self.cfg.inline_max);
                    self.send(
                        pid,
                        &targets,
                        |seq, stamp| {
                            (
                                Request::Write {
                                    seq,
                                    stamp,
                                    extent,
                                    offset,
                                    len: len as u32,
                                    fua: false,
                                    inline: len <= inline_max,
                                },
                                DataRef::Copy { slot },
                            )
                        },
                        true,
                        Some(extent),
                    );
                }
            }
            PieceKind::Clean { ref regions, flushed } => {
                let members: Vec<NodeId> = self.meta.as_ref().expect("serving").extents[extent as usize]
                    .members
                    .iter()
                    .map(|m| node_id(&m.node))
                    .collect();
                if !members.iter().all(|n| self.peers.get(n).is_some_and(|p| p.usable(extent))) {
                    return self.drop_piece(pid);
                }
                if !flushed {
                    self.send(pid, &members, |seq, stamp| (Request::Flush { seq, stamp }, DataRef::None), false, None);
                } else {
                    // Everything up to now is flushed everywhere: clear, unless written since.
                    let upto = (self.generation << SEQ_GENERATION_SHIFT) | (self.next_seq - 1);
                    let mut runs: Vec<(u32, u32)> = Vec::new();
                    for &r in regions {
                        match runs.last_mut() {
                            Some((first, count)) if *first + *count == r => *count += 1,
                            _ => runs.push((r, 1)),
                        }
                    }
                    for (first, count) in runs {
                        self.send(
                            pid,
                            &members,
                            |seq, stamp| {
                                (Request::ClearDirty { seq, stamp, extent, first, count, upto }, DataRef::None)
                            },
                            false,
                            None,
                        );
                    }
                }
            }
        }
    }

    fn drop_piece(&mut self, pid: u64) {
        self.release_locks(pid);
        if let Some(piece) = self.pieces.remove(&pid) {
            match piece.kind {
                PieceKind::Copy { slot, purpose, region, .. } => {
                    self.copy_slots_free.push(slot);
                    let rt = &mut self.extents[piece.extent as usize];
                    match purpose {
                        CopyPurpose::Reconcile => {
                            rt.reconciling.remove(&region);
                        }
                        CopyPurpose::Sync(node, id) => {
                            if let Some(job) = rt.syncing.get_mut(&node).filter(|j| j.id == id) {
                                if let SyncStage::Copying { todo, active } = &mut job.stage {
                                    todo.push_front(region);
                                    *active = active.saturating_sub(1);
                                }
                            }
                        }
                    }
                }
                PieceKind::Clean { .. } => self.extents[piece.extent as usize].cleaning = false,
                _ => {}
            }
        }
        self.recheck = true;
    }

    fn piece_resolved(&mut self, pid: u64) {
        let Some(piece) = self.pieces.get_mut(&pid) else { return };
        match piece.kind {
            PieceKind::Read { .. } => {
                if piece.acked.is_empty() {
                    // The member failed: try another (keeping the lock).
                    piece.state = PieceState::Ready;
                    self.recheck = true;
                } else {
                    self.finish_piece(pid, true);
                }
            }
            PieceKind::Mutate { .. } | PieceKind::Flush { .. } => {
                piece.state = PieceState::Held;
                // Every target answered: a later overlapping write may go (the replicas applied
                // this one first). Acknowledging may still wait for membership (I4, I10).
                self.release_locks(pid);
                self.try_ack(pid);
            }
            PieceKind::SyncFlush { node } => {
                let ok = piece.acked.contains(&node);
                let extent = piece.extent;
                self.pieces.remove(&pid);
                if let Some(job) = self.extents[extent as usize].syncing.get_mut(&node) {
                    if ok {
                        job.stage = SyncStage::Joining;
                        self.joins.insert((extent, node), job.drained_at);
                    } else {
                        job.stage = SyncStage::Flushing { seq: None };
                    }
                }
                self.recheck = true;
            }
            PieceKind::Copy { source, wrote, .. } => {
                if !wrote {
                    if source.is_some_and(|s| piece.acked.contains(&s)) {
                        if let PieceKind::Copy { wrote, .. } = &mut piece.kind {
                            *wrote = true;
                        }
                        piece.acked.clear();
                        piece.state = PieceState::Ready;
                        self.issue(pid);
                    } else {
                        piece.state = PieceState::Ready;
                        self.recheck = true;
                    }
                } else {
                    self.copy_done(pid);
                }
            }
            PieceKind::Clean { ref regions, flushed } => {
                let extent = piece.extent;
                let members: Vec<NodeId> = self.meta.as_ref().expect("serving").extents[extent as usize]
                    .members
                    .iter()
                    .map(|m| node_id(&m.node))
                    .collect();
                let all = members.iter().all(|m| piece.acked.contains(m));
                if all && !flushed {
                    if let PieceKind::Clean { flushed, .. } = &mut piece.kind {
                        *flushed = true;
                    }
                    piece.acked.clear();
                    piece.state = PieceState::Ready;
                    self.issue(pid);
                    return;
                }
                if all {
                    let regions = regions.clone();
                    let rt = &mut self.extents[extent as usize];
                    for r in regions {
                        // Written since the clean began: stays dirty (the replicas kept the bit).
                        if rt.dirty.get(&r).is_some_and(|t| *t + self.cfg.clean_after <= self.now) {
                            rt.dirty.remove(&r);
                        }
                    }
                }
                self.drop_piece(pid);
            }
        }
    }

    fn copy_done(&mut self, pid: u64) {
        let Some(piece) = self.pieces.get(&pid) else { return };
        let PieceKind::Copy { purpose, region, slot, .. } = piece.kind else { return };
        let extent = piece.extent;
        let acked_target = match purpose {
            CopyPurpose::Sync(node, _) => piece.acked.contains(&node),
            CopyPurpose::Reconcile => true,
        };
        self.release_locks(pid);
        self.pieces.remove(&pid);
        self.copy_slots_free.push(slot);
        let rt = &mut self.extents[extent as usize];
        match purpose {
            CopyPurpose::Reconcile => {
                rt.reconciling.remove(&region);
                if rt.unreconciled.get(region) {
                    rt.unreconciled.clear(region);
                    rt.reconciled_count += 1;
                    if rt.unreconciled.is_empty() {
                        let regions = rt.reconciled_count;
                        self.actions.push_back(OwnerAction::Event(OwnerEvent::Reconciled { extent, regions }));
                    }
                }
            }
            CopyPurpose::Sync(node, id) => {
                if let Some(job) = rt.syncing.get_mut(&node).filter(|j| j.id == id) {
                    if let SyncStage::Copying { todo, active } = &mut job.stage {
                        *active = active.saturating_sub(1);
                        if acked_target {
                            job.done += 1;
                        } else {
                            todo.push_front(region);
                        }
                    }
                }
            }
        }
        self.recheck = true;
    }

    /// Acknowledges a write (or flush) once every in-sync member in etcd holds it (I4) and
    /// the extent may take writes (I10).
    fn try_ack(&mut self, pid: u64) {
        let Some(piece) = self.pieces.get(&pid) else { return };
        let Some(meta) = &self.meta else { return };
        let is_mutate = matches!(piece.kind, PieceKind::Mutate { .. });
        let extents: Vec<u32> = if is_mutate { vec![piece.extent] } else { (0..meta.extent_count()).collect() };
        if self.plant_bug_ack_early && !piece.acked.is_empty() {
            return self.finish_piece(pid, true);
        }
        // What etcd holds may already be a document whose CAS is in flight (or went
        // unanswered): it binds as well as the committed one (I4, I10).
        let docs: Vec<&VolumeMeta> =
            std::iter::once(meta).chain(self.pending_meta.iter()).chain(self.uncertain_meta.iter()).collect();
        let mut resend = false;
        let mut wait = false;
        for &e in &extents {
            let rt = &self.extents[e as usize];
            let mut in_sync: Vec<&str> = Vec::new();
            for d in &docs {
                for m in d.extents[e as usize].in_sync() {
                    if !in_sync.contains(&m) {
                        in_sync.push(m);
                    }
                }
            }
            // A member that joined through a sync job after this write resolved holds it if
            // the copy it was filled from did: some in-sync member acknowledged the write.
            // After a flush was sent, a joining member flushed what it holds.
            let since = if is_mutate { piece.resolved_no } else { piece.issued_no };
            let direct = !is_mutate || in_sync.iter().any(|m| piece.acked.contains(&node_id(m)));
            for m in in_sync {
                let id = node_id(m);
                if piece.acked.contains(&id) || (direct && rt.joined.get(&id).is_some_and(|d| *d > since)) {
                    continue;
                }
                if self.must_remove.contains(&(e, id)) || !self.peers.get(&id).is_some_and(|p| p.usable(e)) {
                    // It missed it and is still in sync in etcd: wait for its removal (or, if
                    // it is the last one that can serve the extent, for its return).
                    wait = true;
                } else {
                    // In sync, serving, and without it (it came back as the extent's last
                    // server after missing it): send the piece again.
                    resend = true;
                }
            }
        }
        if resend {
            let p = self.pieces.get_mut(&pid).expect("present");
            p.state = PieceState::Queued;
            p.acked.clear();
            self.recheck = true;
            return;
        }
        if wait || (is_mutate && extents.iter().any(|&e| docs.iter().any(|d| !d.writable(e)))) {
            return;
        }
        self.finish_piece(pid, true);
    }

    fn finish_piece(&mut self, pid: u64, ok: bool) {
        self.release_locks(pid);
        let Some(piece) = self.pieces.remove(&pid) else { return };
        let ok = ok && !piece.fail;
        let guest = match piece.kind {
            PieceKind::Read { guest } | PieceKind::Mutate { guest, .. } | PieceKind::Flush { guest } => guest,
            _ => return,
        };
        let Some(g) = self.guests.get_mut(&guest) else { return };
        g.failed |= !ok;
        g.pieces_left -= 1;
        g.done_in.insert(piece.extent);
        if g.pieces_left == 0 {
            let failed = g.failed;
            self.guests.remove(&guest);
            let status = if failed { GuestStatus::IoError } else { GuestStatus::Ok };
            self.actions.push_back(OwnerAction::Complete { id: guest, status });
        }
    }
}

// ---- the periodic part: attach completion, probes, jobs, cleaning, replacement ---------------

impl Owner {
    /// Runs everything that may have become possible.
    fn step(&mut self) {
        if matches!(self.phase, Phase::Fenced(_) | Phase::Detached | Phase::Loading | Phase::Claiming) {
            if self.phase == Phase::Loading && self.meta_op == MetaOp::Idle && self.now >= self.meta_retry_at {
                self.meta_op = MetaOp::Reading;
                self.actions.push_back(OwnerAction::ReadMeta);
            }
            return;
        }
        if self.phase == Phase::Promising
            && self.peers.values().all(|p| p.asking.is_empty())
            && self.desired_meta().is_none()
            && self.meta_op == MetaOp::Idle
        {
            self.begin_serving();
        }
        self.schedule_meta();
        if !self.serving() {
            return;
        }
        if self.recheck {
            self.recheck = false;
            self.update_suspension();
            self.probe();
            self.reconcile_returning();
            self.start_sync_jobs();
            self.advance_sync_jobs();
            self.schedule_copies();
            let ids: Vec<u64> = self
                .pieces
                .iter()
                .filter(|(_, p)| matches!(p.state, PieceState::Queued | PieceState::Ready | PieceState::Held))
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                self.advance(id);
            }
            self.schedule_meta();
        }
    }

    fn begin_serving(&mut self) {
        let Some(meta) = self.meta.clone() else { return };
        for e in 0..meta.extent_count() {
            let servers = self.servers(e);
            let mut bits = Bitmap::new(meta.extent_regions(e));
            for n in &servers {
                if let Some(b) = self.bits_seen.get(&(e, *n)) {
                    bits.union_with(b);
                }
            }
            let rt = &mut self.extents[e as usize];
            for r in bits.iter() {
                rt.dirty.insert(r, self.now);
            }
            if servers.len() > 1 && !self.plant_bug_skip_reconcile {
                rt.unreconciled = bits;
            }
            rt.reconcile_later = servers.is_empty() && !self.plant_bug_skip_reconcile;
            rt.source = None;
            let source = self.copy_source(e);
            self.extents[e as usize].source = source;
        }
        self.phase = if self.detach_requested { Phase::Detaching } else { Phase::Serving };
        self.recheck = true;
        self.next_nodes_poll = self.now;
        self.actions.push_back(OwnerAction::Event(OwnerEvent::Attached { generation: self.generation }));
        self.step();
    }

    fn update_suspension(&mut self) {
        let Some(meta) = &self.meta else { return };
        for e in 0..meta.extent_count() {
            let suspended = !meta.writable(e);
            let rt = &mut self.extents[e as usize];
            if suspended != rt.suspended {
                rt.suspended = suspended;
                let event =
                    if suspended { OwnerEvent::Suspended { extent: e } } else { OwnerEvent::Resumed { extent: e } };
                self.actions.push_back(OwnerAction::Event(event));
            }
        }
    }

    /// Asks failed or silent members for a new promise, each `probe_interval`.
    fn probe(&mut self) {
        let due: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| (p.failed || p.incarnation.is_none()) && p.asking.is_empty() && p.next_probe <= self.now)
            .map(|(id, _)| *id)
            .collect();
        for node in due {
            self.sessions += 1;
            self.ask_all(node);
        }
        // Members of extents they became members of during their session (replacements).
        let Some(meta) = &self.meta else { return };
        let mut missing: Vec<(NodeId, u32)> = Vec::new();
        for (id, p) in &self.peers {
            if p.failed || p.incarnation.is_none() {
                continue;
            }
            for e in meta.extents_of(&p.name) {
                if !p.promised.contains(&e) && !p.asking.values().any(|(x, _)| *x == e) {
                    missing.push((*id, e));
                }
            }
        }
        for (node, e) in missing {
            self.ask(node, e);
        }
    }

    fn start_sync_jobs(&mut self) {
        let Some(meta) = self.meta.clone() else { return };
        for e in 0..meta.extent_count() {
            if !self.extents[e as usize].unreconciled.is_empty() || self.servers(e).is_empty() {
                continue;
            }
            for m in &meta.extents[e as usize].members {
                if m.state == MemberState::InSync {
                    continue;
                }
                let n = node_id(&m.node);
                if self.extents[e as usize].syncing.contains_key(&n) || !self.peers.get(&n).is_some_and(|p| p.usable(e))
                {
                    continue;
                }
                let barrier = (self.generation << SEQ_GENERATION_SHIFT) | self.next_seq;
                let rebuild = m.state == MemberState::Rebuilding;
                self.next_piece += 1;
                self.extents[e as usize].syncing.insert(
                    n,
                    SyncJob {
                        id: self.next_piece,
                        rebuild,
                        stage: SyncStage::Draining { barrier },
                        total: 0,
                        done: 0,
                        started: self.now,
                        drained_at: 0,
                    },
                );
            }
        }
    }

    fn advance_sync_jobs(&mut self) {
        let Some(meta) = self.meta.clone() else { return };
        for e in 0..meta.extent_count() {
            let nodes: Vec<NodeId> = self.extents[e as usize].syncing.keys().copied().collect();
            for n in nodes {
                let stage_kind = match &self.extents[e as usize].syncing[&n].stage {
                    SyncStage::Draining { barrier } => {
                        let barrier = *barrier;
                        let busy = self.subs.iter().any(|(seq, s)| *seq < barrier && s.mutates && s.extent == Some(e));
                        // The regions a member missed are marked on the members that stayed:
                        // with none to ask (or a clean one away, whose bits and data only it
                        // has), the sync waits; asking the joiner alone would find nothing to
                        // copy and let it join without what it missed.
                        let source = self.copy_source(e).is_some();
                        if busy || !source {
                            0
                        } else {
                            1
                        }
                    }
                    SyncStage::Querying { waiting, .. } if waiting.is_empty() => 2,
                    SyncStage::Copying { todo, active } if todo.is_empty() && *active == 0 => 3,
                    SyncStage::Flushing { seq: None } => 4,
                    _ => 0,
                };
                match stage_kind {
                    1 => {
                        let drained_at = self.resolve_counter + 1;
                        let rebuild = self.extents[e as usize].syncing[&n].rebuild;
                        if rebuild {
                            let regions = meta.extent_regions(e);
                            let job = self.extents[e as usize].syncing.get_mut(&n).expect("present");
                            job.drained_at = drained_at;
                            job.total = regions;
                            job.stage = SyncStage::Copying { todo: (0..regions).collect(), active: 0 };
                        } else {
                            let mut waiting = BTreeMap::new();
                            let mut ask: Vec<NodeId> = self.servers(e);
                            ask.push(n);
                            for a in ask {
                                let seq = self.ask(a, e);
                                waiting.insert(seq, a);
                            }
                            let job = self.extents[e as usize].syncing.get_mut(&n).expect("present");
                            job.drained_at = drained_at;
                            job.stage = SyncStage::Querying { waiting, bits: Bitmap::new(meta.extent_regions(e)) };
                        }
                    }
                    2 => {
                        let job = self.extents[e as usize].syncing.get_mut(&n).expect("present");
                        let SyncStage::Querying { bits, .. } = &job.stage else { continue };
                        let todo: VecDeque<u32> = bits.iter().collect();
                        job.total = todo.len() as u32;
                        job.stage = SyncStage::Copying { todo, active: 0 };
                        let (total, rebuild) = (job.total, job.rebuild);
                        let node = self.name_of(n);
                        self.actions.push_back(OwnerAction::Event(OwnerEvent::SyncStarted {
                            node,
                            extent: e,
                            regions: total,
                            rebuild,
                        }));
                    }
                    3 => {
                        let job = self.extents[e as usize].syncing.get_mut(&n).expect("present");
                        job.stage = SyncStage::Flushing { seq: None };
                        let pid = self.new_piece(PieceKind::SyncFlush { node: n }, e, 0, 0, 0);
                        if let Some(SyncJob { stage: SyncStage::Flushing { seq }, .. }) =
                            self.extents[e as usize].syncing.get_mut(&n)
                        {
                            *seq = Some(pid);
                        }
                        self.advance(pid);
                    }
                    4 => {
                        // The flush failed without failing the node (should not happen): retry.
                        let pid = self.new_piece(PieceKind::SyncFlush { node: n }, e, 0, 0, 0);
                        if let Some(SyncJob { stage: SyncStage::Flushing { seq }, .. }) =
                            self.extents[e as usize].syncing.get_mut(&n)
                        {
                            *seq = Some(pid);
                        }
                        self.advance(pid);
                    }
                    _ => {}
                }
            }
        }
    }

    fn refill_copy_tokens(&mut self) {
        if self.cfg.copy_bytes_per_s == 0 {
            self.copy_tokens = f64::MAX;
            return;
        }
        let elapsed = self.now.saturating_sub(self.copy_refill_at) as f64 / SECOND as f64;
        self.copy_refill_at = self.now;
        let cap = (self.cfg.copy_bytes_per_s as f64).max(self.meta.as_ref().map_or(0.0, |m| m.region_bytes as f64));
        self.copy_tokens = (self.copy_tokens + elapsed * self.cfg.copy_bytes_per_s as f64).min(cap);
    }

    /// Starts region copies: reconcile first (reads wait for it), then resync and rebuild,
    /// within the copy buffers and the rate limit.
    fn schedule_copies(&mut self) {
        if !self.serving() {
            return;
        }
        self.refill_copy_tokens();
        let Some(meta) = self.meta.clone() else { return };
        for e in 0..meta.extent_count() {
            // Reconcile: regions reads are waiting for go first, and are not rate limited.
            let wanted: BTreeSet<u32> = self
                .pieces
                .values()
                .filter(|p| p.extent == e && matches!(p.kind, PieceKind::Read { .. }) && p.state == PieceState::Queued)
                .flat_map(|p| {
                    let (first, last) = self.regions_of(p.offset, p.len);
                    first..=last
                })
                .filter(|r| self.extents[e as usize].unreconciled.get(*r))
                .collect();
            let rest: Vec<u32> = self.extents[e as usize].unreconciled.iter().filter(|r| !wanted.contains(r)).collect();
            for (urgent, region) in wanted.into_iter().map(|r| (true, r)).chain(rest.into_iter().map(|r| (false, r))) {
                if self.extents[e as usize].reconciling.contains(&region) {
                    continue;
                }
                if !self.take_copy_budget(urgent) {
                    break;
                }
                let Some(slot) = self.copy_slots_free.pop() else { break };
                self.extents[e as usize].reconciling.insert(region);
                let (offset, len) = self.region_range(e, region);
                let pid = self.new_piece(
                    PieceKind::Copy { purpose: CopyPurpose::Reconcile, region, slot, source: None, wrote: false },
                    e,
                    offset,
                    len,
                    0,
                );
                self.advance(pid);
            }
            // Resync and rebuild.
            let nodes: Vec<NodeId> = self.extents[e as usize].syncing.keys().copied().collect();
            for n in nodes {
                while let Some(SyncJob { stage: SyncStage::Copying { todo, .. }, .. }) =
                    self.extents[e as usize].syncing.get(&n)
                {
                    if todo.is_empty() || self.copy_slots_free.is_empty() || !self.take_copy_budget(false) {
                        break;
                    }
                    let slot = self.copy_slots_free.pop().expect("checked");
                    let job = self.extents[e as usize].syncing.get_mut(&n).expect("present");
                    let job_id = job.id;
                    let SyncStage::Copying { todo, active } = &mut job.stage else { break };
                    let region = todo.pop_front().expect("checked");
                    *active += 1;
                    let (offset, len) = self.region_range(e, region);
                    let pid = self.new_piece(
                        PieceKind::Copy {
                            purpose: CopyPurpose::Sync(n, job_id),
                            region,
                            slot,
                            source: None,
                            wrote: false,
                        },
                        e,
                        offset,
                        len,
                        0,
                    );
                    self.advance(pid);
                }
            }
        }
    }

    fn take_copy_budget(&mut self, urgent: bool) -> bool {
        let region = self.meta.as_ref().map_or(0, |m| m.region_bytes) as f64;
        if urgent || self.cfg.copy_bytes_per_s == 0 {
            return true;
        }
        if self.copy_tokens >= region {
            self.copy_tokens -= region;
            return true;
        }
        false
    }

    /// On a whole extent, quiet dirty regions are flushed on every member and then cleared.
    fn schedule_cleaning(&mut self) {
        if !self.serving() {
            return;
        }
        let Some(meta) = self.meta.clone() else { return };
        // Over the cap, regions written at or before `cutoff` are cleaned too.
        let total: usize = self.extents.iter().map(|rt| rt.dirty.len()).sum();
        let cutoff = if total > self.cfg.dirty_max {
            let mut times: Vec<Time> = self.extents.iter().flat_map(|rt| rt.dirty.values().copied()).collect();
            let k = total - self.cfg.dirty_max;
            *times.select_nth_unstable(k - 1).1
        } else {
            0
        };
        let over = total > self.cfg.dirty_max;
        for e in 0..meta.extent_count() {
            let ext = &meta.extents[e as usize];
            let rt = &self.extents[e as usize];
            let whole = ext.members.len() == usize::from(meta.replicas)
                && ext.members.iter().all(|m| {
                    let n = node_id(&m.node);
                    m.state == MemberState::InSync
                        && !self.must_remove.contains(&(e, n))
                        && self.peers.get(&n).is_some_and(|p| p.usable(e))
                })
                && rt.syncing.is_empty()
                && rt.unreconciled.is_empty();
            if !whole || rt.cleaning {
                continue;
            }
            let quiet: Vec<u32> = rt
                .dirty
                .iter()
                .filter(|(_, t)| **t + self.cfg.clean_after <= self.now || (over && **t <= cutoff))
                .map(|(r, _)| *r)
                .take(64)
                .collect();
            if quiet.is_empty() {
                continue;
            }
            let pid = self.next_piece;
            let mut locked = Vec::new();
            let mut regions = Vec::new();
            for (i, r) in quiet.into_iter().enumerate() {
                let (offset, len) = self.region_range(e, r);
                let id = CLEAN_LOCK_BIT | (pid << 12) | i as u64;
                if self.lock.try_acquire(id, offset, offset + len, Mode::Exclusive) {
                    locked.push(id);
                    regions.push(r);
                }
            }
            if regions.is_empty() {
                continue;
            }
            let pid = self.new_piece(PieceKind::Clean { regions, flushed: false }, e, 0, 0, 0);
            if let Some(p) = self.pieces.get_mut(&pid) {
                p.extra_locks = locked;
                p.state = PieceState::Ready;
            }
            self.extents[e as usize].cleaning = true;
            self.issue(pid);
        }
    }

    /// Members whose node has been gone from etcd longer than `replace_after` get a
    /// replacement, filled by a full copy.
    fn check_replacements(&mut self) {
        if !self.serving() {
            return;
        }
        let (Some(meta), Some(nodes)) = (self.meta.clone(), self.nodes.clone()) else { return };
        let lost: Vec<String> = self
            .peers
            .values()
            .filter(|p| p.down_since.is_some_and(|t| t + self.cfg.replace_after <= self.now))
            .map(|p| p.name.clone())
            .collect();
        for name in lost {
            for e in meta.extents_of(&name) {
                if self.replacements.contains_key(&e) {
                    continue;
                }
                // Only with another in-sync member serving the extent to rebuild from: the
                // last in-sync copy is never given up, however long its node is gone.
                if self.servers(e).iter().all(|n| self.name_of(*n) == name) {
                    continue;
                }
                if let Some(new) = placement::replacement(&meta, e, &name, &nodes) {
                    let new = new.name.clone();
                    self.actions.push_back(OwnerAction::Event(OwnerEvent::Replacing {
                        extent: e,
                        lost: name.clone(),
                        new: new.clone(),
                    }));
                    self.replacements.insert(e, (name.clone(), new));
                }
            }
        }
        self.schedule_meta();
    }

    /// Extents nobody could serve at attach, once members are back: reconcile what any of
    /// them marked dirty, as attach would have.
    fn reconcile_returning(&mut self) {
        for e in 0..self.extents.len() as u32 {
            if !self.extents[e as usize].reconcile_later {
                continue;
            }
            let servers = self.servers(e);
            if servers.is_empty() {
                continue;
            }
            let regions = self.meta.as_ref().map_or(0, |m| m.extent_regions(e));
            let mut bits = Bitmap::new(regions);
            for n in &servers {
                if let Some(b) = self.bits_seen.get(&(e, *n)) {
                    bits.union_with(b);
                }
            }
            let rt = &mut self.extents[e as usize];
            rt.reconcile_later = false;
            for r in bits.iter() {
                rt.dirty.insert(r, self.now);
            }
            rt.unreconciled.union_with(&bits);
        }
    }

    /// The periodic part of [`Owner::tick`].
    fn periodic(&mut self) {
        if !self.serving() {
            return;
        }
        self.recheck = true;
        // Extents whose in-sync members all failed and came back restarted, once the ones
        // still missing are given up.
        let down: Vec<u32> = (0..self.extents.len() as u32).filter(|&e| self.servers(e).is_empty()).collect();
        for e in down {
            let restarted = self.meta.as_ref().is_some_and(|m| {
                m.extents[e as usize].in_sync().any(|n| {
                    let id = node_id(n);
                    self.peers.get(&id).is_some_and(|p| p.usable(e))
                        && (self.peers[&id].restarted || !self.is_clean(e, id))
                })
            });
            if restarted {
                self.readmit_after_restarts(e);
            }
        }
        self.schedule_cleaning();
        self.check_replacements();
    }
}
