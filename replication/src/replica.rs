//! The replica: one per node, serving every extent replica the node holds. I/O-free: it is fed
//! owners' requests, disk and data-movement completions and etcd answers, and says what to do
//! through [`ReplicaAction`]s, which its driver carries out (the daemon's replica service on
//! io_uring and the transports; the simulator on its models).
//!
//! Per volume it keeps, durably ([`PersistedVolume`], written through
//! [`ReplicaAction::Persist`]): the generation it promised and to which owner, the membership
//! epoch it knows, and per extent the *dirty bitmap*: a region's bit is made durable before
//! any data is written to that region, and only an owner clears it, after every replica
//! flushed it. So the union of the bitmaps of a volume's replicas covers every region whose
//! replicas may differ — what an owner that crashed was writing, what a replica that was away
//! missed — and a returning replica resyncs only those (invariant I8).
//!
//! Order of a WRITE:
//! ```text
//!  checks (generation, owner, incarnation, epoch, extent, duplicate)
//!    ├─ set the regions' bits ──▶ Persist (if a bit was clear or not yet durable) ─┐
//!    └─ Pull the data from the owner (unless inline) ──────────────────────────────┴▶ DiskWrite ─▶ Reply
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use sha2::{Digest, Sha256};

use crate::bitmap::Bitmap;
use crate::meta::{node_id, VolumeMeta};
use crate::msg::{NodeId, Reply, Request, Seq, Stamp, Status};

/// The driver's handle for one request it handed in; the replica refers to it in actions, and
/// its last action for an op is always its `Reply` (after which the driver forgets the op).
pub type OpId = u64;

/// Outcome of a disk operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskResult {
    Ok,
    IoError,
    NoSpace,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaAction {
    /// Answer the owner; the op is finished.
    Reply {
        to: NodeId,
        op: OpId,
        reply: Reply,
    },
    /// Read the volume's metadata from etcd (by id) and call [`Replica::on_meta`].
    ReadMeta {
        volume: u64,
    },
    /// Write `state` durably (a failed fsync is fatal: the driver must not report it done),
    /// then call [`Replica::on_persisted`].
    Persist {
        volume: u64,
        version: u64,
        state: PersistedVolume,
    },
    /// Fetch the op's data from the owner's memory (one-sided READ) into the op's buffer, then
    /// call [`Replica::on_pulled`].
    Pull {
        op: OpId,
    },
    /// Write the op's buffer to the volume's replica at `offset`, then [`Replica::on_disk`].
    DiskWrite {
        op: OpId,
        volume: u64,
        offset: u64,
        len: u32,
        fua: bool,
    },
    DiskRead {
        op: OpId,
        volume: u64,
        offset: u64,
        len: u32,
    },
    /// Push the op's buffer into the owner's memory (one-sided WRITE), then
    /// [`Replica::on_pushed`].
    Push {
        op: OpId,
    },
    DiskFlush {
        op: OpId,
        volume: u64,
    },
    DiskDiscard {
        op: OpId,
        volume: u64,
        offset: u64,
        len: u64,
    },
    DiskZero {
        op: OpId,
        volume: u64,
        offset: u64,
        len: u64,
    },
    /// This node no longer holds the extent (replaced, or the volume shrank): release its
    /// space. Not acknowledged.
    DropExtent {
        volume: u64,
        extent: u32,
        offset: u64,
        len: u64,
    },
    /// The volume was deleted: remove its data and metadata files.
    DropVolume {
        volume: u64,
    },
}

/// What a replica keeps durably about one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistedVolume {
    pub volume: u64,
    pub name: String,
    pub size_bytes: u64,
    pub extent_bytes: u64,
    pub region_bytes: u64,
    /// The generation promised; requests of older generations are refused.
    pub promised: u64,
    /// The owner the promise was made to.
    pub owner: NodeId,
    pub epoch: u32,
    /// Extents held, with their dirty bitmaps.
    pub extents: BTreeMap<u32, Bitmap>,
}

const PERSIST_MAGIC: &[u8; 8] = b"HCBLKRV1";

impl PersistedVolume {
    fn regions(&self, extent: u32) -> u32 {
        let start = u64::from(extent) * self.extent_bytes;
        self.size_bytes.saturating_sub(start).min(self.extent_bytes).div_ceil(self.region_bytes) as u32
    }

    /// A self-checking binary form, small enough to be written in one 4 KiB block for usual
    /// volumes: magic, fields, bitmaps, then SHA-256 of all of it (first 16 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128 + self.extents.len() * 64);
        b.extend_from_slice(PERSIST_MAGIC);
        for v in [self.volume, self.size_bytes, self.extent_bytes, self.region_bytes, self.promised, self.owner] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.epoch.to_le_bytes());
        let name = self.name.as_bytes();
        b.extend_from_slice(&(name.len() as u32).to_le_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for (extent, bits) in &self.extents {
            b.extend_from_slice(&extent.to_le_bytes());
            b.extend_from_slice(&bits.len().to_le_bytes());
            b.extend_from_slice(&bits.to_bytes());
        }
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum[..16]);
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < PERSIST_MAGIC.len() + 16 || &bytes[..8] != PERSIST_MAGIC {
            return Err("not a replica state record".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 16);
        if Sha256::digest(body)[..16] != *sum {
            return Err("replica state record checksum mismatch".into());
        }
        let mut r = Reader { b: body, at: 8 };
        let volume = r.u64()?;
        let size_bytes = r.u64()?;
        let extent_bytes = r.u64()?;
        let region_bytes = r.u64()?;
        let promised = r.u64()?;
        let owner = r.u64()?;
        let epoch = r.u32()?;
        let name_len = r.u32()? as usize;
        let name = String::from_utf8(r.take(name_len)?.to_vec()).map_err(|_| "volume name is not UTF-8")?;
        if region_bytes == 0 || extent_bytes < region_bytes {
            return Err("bad geometry in replica state record".into());
        }
        let count = r.u32()?;
        let mut extents = BTreeMap::new();
        for _ in 0..count {
            let extent = r.u32()?;
            let bits = r.u32()?;
            if bits > crate::meta::REGIONS_PER_EXTENT_MAX as u32 {
                return Err("bitmap too large in replica state record".into());
            }
            let map = Bitmap::from_bytes(bits, r.take(bits.div_ceil(8) as usize)?).ok_or("malformed bitmap")?;
            extents.insert(extent, map);
        }
        if r.at != body.len() {
            return Err("trailing bytes in replica state record".into());
        }
        Ok(Self { volume, name, size_bytes, extent_bytes, region_bytes, promised, owner, epoch, extents })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("truncated replica state record")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpState {
    /// Waiting for its bits to be durable and/or its data to arrive.
    Preparing {
        pulled: bool,
    },
    AtDisk,
    Pushing,
}

#[derive(Debug)]
struct Op {
    from: NodeId,
    request: Request,
    generation: u64,
    state: OpState,
    /// The persist version that makes this op's dirty bits durable.
    need_version: u64,
    /// A newer generation was promised while this op ran: it must not be acknowledged (I6).
    aborted: bool,
}

#[derive(Debug)]
struct Vol {
    state: PersistedVolume,
    /// The last persist version handed out, and the last made durable. A change made now is
    /// durable once version `issued + 1` is (the next Persist carries it).
    issued: u64,
    durable: u64,
    persisting: bool,
    /// Changes in memory not yet handed to a Persist.
    changed: bool,
    /// For bits set in memory and not yet durable: the version that makes them durable.
    bit_version: BTreeMap<(u32, u32), u64>,
    /// The last write (sequence number) that touched each region since this process started.
    last_seq: BTreeMap<(u32, u32), Seq>,
    /// Duplicate suppression for mutating requests: every seq below `floor` is done; `seen`
    /// holds those at or above it already taken.
    floor: Seq,
    seen: BTreeSet<Seq>,
    /// Promises waiting for the volume's metadata from etcd.
    verifying: Vec<(OpId, NodeId, Request)>,
    meta_pending: bool,
}

impl Vol {
    fn new(state: PersistedVolume, durable: u64) -> Self {
        Self {
            state,
            issued: durable,
            durable,
            persisting: false,
            changed: false,
            bit_version: BTreeMap::new(),
            last_seq: BTreeMap::new(),
            floor: 0,
            seen: BTreeSet::new(),
            verifying: Vec::new(),
            meta_pending: false,
        }
    }

    /// The version that will make a change made now durable.
    fn version_for_change(&self) -> u64 {
        self.issued + 1
    }
}

/// Most sequence numbers remembered for duplicate suppression per volume; an owner keeps
/// fewer requests than this in flight, so a flood of numbers above the floor is a lie.
const SEEN_MAX: usize = 65_536;

pub struct ReplicaConfig {
    /// This node's name (as in the volume metadata).
    pub node: String,
    /// Unique per start of the replica process: requests addressed to an earlier one are
    /// refused, because whatever that incarnation had not flushed may be gone.
    pub incarnation: u64,
}

pub struct Replica {
    node: String,
    node_id: NodeId,
    incarnation: u64,
    volumes: BTreeMap<u64, Vol>,
    ops: BTreeMap<OpId, Op>,
    actions: VecDeque<ReplicaAction>,
    /// Test-only switch: acknowledge writes before their dirty bits are durable (a planted
    /// bug the simulator must catch).
    pub plant_bug_skip_dirty_persist: bool,
}

impl Replica {
    /// A replica that starts with `volumes`, the durable state found on its disk.
    pub fn new(config: ReplicaConfig, volumes: Vec<PersistedVolume>) -> Self {
        let node_id = node_id(&config.node);
        let volumes = volumes.into_iter().map(|state| (state.volume, Vol::new(state, 1))).collect();
        Self {
            node: config.node,
            node_id,
            incarnation: config.incarnation,
            volumes,
            ops: BTreeMap::new(),
            actions: VecDeque::new(),
            plant_bug_skip_dirty_persist: false,
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn poll_action(&mut self) -> Option<ReplicaAction> {
        self.actions.pop_front()
    }

    /// The durable-or-pending state of a volume (for status output and tests).
    pub fn volume_state(&self, volume: u64) -> Option<&PersistedVolume> {
        self.volumes.get(&volume).map(|v| &v.state)
    }

    pub fn volumes(&self) -> impl Iterator<Item = &PersistedVolume> {
        self.volumes.values().map(|v| &v.state)
    }

    /// Requests in progress (for bounds and status).
    pub fn ops_in_flight(&self) -> usize {
        self.ops.len()
    }

    fn reply(&mut self, to: NodeId, op: OpId, reply: Reply) {
        self.ops.remove(&op);
        self.actions.push_back(ReplicaAction::Reply { to, op, reply });
    }

    fn done(&mut self, to: NodeId, op: OpId, seq: Seq, status: Status) {
        self.reply(to, op, Reply::Done { seq, status });
    }

    /// A request from node `from` (authenticated by the transport), with the driver's handle.
    pub fn on_request(&mut self, op: OpId, from: NodeId, request: Request) {
        let seq = request.seq();
        if let Request::Promise { .. } = request {
            return self.on_promise(op, from, request);
        }
        let stamp = match &request {
            Request::Write { stamp, .. }
            | Request::Read { stamp, .. }
            | Request::Flush { stamp, .. }
            | Request::Discard { stamp, .. }
            | Request::WriteZeroes { stamp, .. }
            | Request::ClearDirty { stamp, .. } => *stamp,
            Request::Promise { .. } => unreachable!("handled above"),
        };
        if let Err(status) = self.check_stamp(from, &stamp) {
            return self.done(from, op, seq, status);
        }
        let vol = self.volumes.get_mut(&stamp.volume).expect("checked by check_stamp");
        if stamp.epoch > vol.state.epoch {
            vol.state.epoch = stamp.epoch;
            vol.changed = true;
        }
        // Range and extent checks for requests that address data.
        let range = match &request {
            Request::Write { extent, offset, len, .. } | Request::Read { extent, offset, len, .. } => {
                Some((*extent, *offset, u64::from(*len)))
            }
            Request::Discard { extent, offset, len, .. } | Request::WriteZeroes { extent, offset, len, .. } => {
                Some((*extent, *offset, *len))
            }
            Request::ClearDirty { extent, .. } => Some((*extent, u64::from(*extent) * vol.state.extent_bytes, 0)),
            _ => None,
        };
        if let Some((extent, offset, len)) = range {
            if !vol.state.extents.contains_key(&extent) {
                return self.done(from, op, seq, Status::NotMember);
            }
            let start = u64::from(extent) * vol.state.extent_bytes;
            let end = (start + vol.state.extent_bytes).min(vol.state.size_bytes);
            let Some(req_end) = offset.checked_add(len) else { return self.done(from, op, seq, Status::BadRequest) };
            let data = matches!(request, Request::Write { .. } | Request::Read { .. });
            let misaligned = !offset.is_multiple_of(crate::msg::SECTOR) || !len.is_multiple_of(crate::msg::SECTOR);
            if offset < start
                || req_end > end
                || (len == 0 && !matches!(request, Request::ClearDirty { .. }))
                || (data && len > u64::from(crate::msg::TRANSFER_MAX))
                || misaligned
            {
                return self.done(from, op, seq, Status::BadRequest);
            }
        }
        if request.mutates() {
            // Duplicate suppression: the owner never sends a request twice; a second copy is
            // the network's, and applying it after a newer overlapping write would undo that.
            if stamp.floor > vol.floor {
                vol.floor = stamp.floor;
                let keep = vol.seen.split_off(&stamp.floor);
                vol.seen = keep;
            }
            if seq < vol.floor || vol.seen.contains(&seq) {
                return self.done(from, op, seq, Status::Duplicate);
            }
            if vol.seen.len() >= SEEN_MAX {
                return self.done(from, op, seq, Status::BadRequest);
            }
            vol.seen.insert(seq);
        }
        match request {
            Request::Write { extent, offset, len, inline, .. } => {
                let need_version = self.mark_dirty(stamp.volume, extent, offset, u64::from(len), seq);
                self.ops.insert(
                    op,
                    Op {
                        from,
                        request,
                        generation: stamp.generation,
                        state: OpState::Preparing { pulled: inline },
                        need_version,
                        aborted: false,
                    },
                );
                if !inline {
                    self.actions.push_back(ReplicaAction::Pull { op });
                }
                self.advance(op);
            }
            Request::Discard { extent, offset, len, .. } | Request::WriteZeroes { extent, offset, len, .. } => {
                let need_version = self.mark_dirty(stamp.volume, extent, offset, len, seq);
                self.ops.insert(
                    op,
                    Op {
                        from,
                        request,
                        generation: stamp.generation,
                        state: OpState::Preparing { pulled: true },
                        need_version,
                        aborted: false,
                    },
                );
                self.advance(op);
            }
            Request::Read { offset, len, .. } => {
                self.ops.insert(
                    op,
                    Op {
                        from,
                        request,
                        generation: stamp.generation,
                        state: OpState::AtDisk,
                        need_version: 0,
                        aborted: false,
                    },
                );
                self.actions.push_back(ReplicaAction::DiskRead { op, volume: stamp.volume, offset, len });
            }
            Request::Flush { .. } => {
                self.ops.insert(
                    op,
                    Op {
                        from,
                        request,
                        generation: stamp.generation,
                        state: OpState::AtDisk,
                        need_version: 0,
                        aborted: false,
                    },
                );
                self.actions.push_back(ReplicaAction::DiskFlush { op, volume: stamp.volume });
            }
            Request::ClearDirty { extent, first, count, upto, .. } => {
                let vol = self.volumes.get_mut(&stamp.volume).expect("checked");
                let regions = vol.state.regions(extent);
                if let Some(bits) = vol.state.extents.get_mut(&extent) {
                    let end = first.saturating_add(count).min(regions);
                    for r in first.min(end)..end {
                        // A region written after the flush this clear follows keeps its bit.
                        if bits.get(r) && vol.last_seq.get(&(extent, r)).copied().unwrap_or(0) <= upto {
                            bits.clear(r);
                            vol.changed = true;
                        }
                    }
                }
                self.done(from, op, seq, Status::Ok);
                self.maybe_persist(stamp.volume);
            }
            Request::Promise { .. } => unreachable!("handled above"),
        }
    }

    /// Generation, owner, incarnation and epoch checks shared by every data request (I3).
    fn check_stamp(&self, from: NodeId, stamp: &Stamp) -> Result<(), Status> {
        let Some(vol) = self.volumes.get(&stamp.volume) else { return Err(Status::NotPromised) };
        if stamp.generation < vol.state.promised {
            return Err(Status::StaleGeneration);
        }
        if stamp.generation > vol.state.promised {
            return Err(Status::NotPromised);
        }
        if from != vol.state.owner {
            return Err(Status::NotOwner);
        }
        if stamp.incarnation != self.incarnation {
            return Err(Status::StaleIncarnation);
        }
        if stamp.epoch < vol.state.epoch {
            return Err(Status::StaleEpoch);
        }
        Ok(())
    }

    /// Sets the dirty bits of the regions a mutation touches; returns the persist version that
    /// makes them all durable (0 if they already are).
    fn mark_dirty(&mut self, volume: u64, extent: u32, offset: u64, len: u64, seq: Seq) -> u64 {
        let vol = self.volumes.get_mut(&volume).expect("checked");
        let base = u64::from(extent) * vol.state.extent_bytes;
        let first = ((offset - base) / vol.state.region_bytes) as u32;
        let last = ((offset - base + len.max(1) - 1) / vol.state.region_bytes) as u32;
        let next = vol.version_for_change();
        let bits = vol.state.extents.get_mut(&extent).expect("checked");
        let mut need = 0;
        for r in first..=last {
            if bits.set(r) {
                vol.changed = true;
                vol.bit_version.insert((extent, r), next);
            }
            if let Some(v) = vol.bit_version.get(&(extent, r)) {
                need = need.max(*v);
            }
            let last_seq = vol.last_seq.entry((extent, r)).or_insert(seq);
            *last_seq = (*last_seq).max(seq);
        }
        if self.plant_bug_skip_dirty_persist {
            need = 0;
        }
        self.maybe_persist(volume);
        need
    }

    fn maybe_persist(&mut self, volume: u64) {
        let Some(vol) = self.volumes.get_mut(&volume) else { return };
        if vol.persisting || !vol.changed {
            return;
        }
        vol.issued += 1;
        vol.persisting = true;
        vol.changed = false;
        self.actions.push_back(ReplicaAction::Persist { volume, version: vol.issued, state: vol.state.clone() });
    }

    /// The driver made `version` of the volume's state durable.
    pub fn on_persisted(&mut self, volume: u64, version: u64) {
        let Some(vol) = self.volumes.get_mut(&volume) else { return };
        if !vol.persisting || vol.issued != version {
            return;
        }
        vol.persisting = false;
        vol.durable = version;
        vol.bit_version.retain(|_, v| *v > version);
        let ready: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, o)| o.request.volume() == volume && o.need_version <= version)
            .map(|(id, _)| *id)
            .collect();
        for op in ready {
            match self.ops.get(&op).map(|o| &o.request) {
                Some(Request::Promise { .. }) => self.answer_promise(op),
                Some(_) => self.advance(op),
                None => {}
            }
        }
        self.maybe_persist(volume);
    }

    /// The driver could not write `volume`'s state (its storage is full or failing; a failed
    /// fsync is not reported here: it is fatal for the process, the kernel may have dropped
    /// what it was asked to write). Requests waiting for that state to be durable are refused
    /// with `result`'s status; the state stays changed in memory and the next change tries
    /// again.
    pub fn on_persist_failed(&mut self, volume: u64, result: DiskResult) {
        let Some(vol) = self.volumes.get_mut(&volume) else { return };
        if !vol.persisting {
            return;
        }
        vol.persisting = false;
        vol.changed = true;
        let durable = vol.durable;
        let status = match result {
            DiskResult::NoSpace => Status::NoSpace,
            _ => Status::IoError,
        };
        let waiting: Vec<(OpId, NodeId, Request)> = self
            .ops
            .iter()
            .filter(|(_, o)| o.request.volume() == volume && o.need_version > durable)
            .map(|(id, o)| (*id, o.from, o.request.clone()))
            .collect();
        for (op, from, request) in waiting {
            let reply = match request {
                Request::Promise { seq, .. } => self.promise_reply(volume, seq, status, 0),
                r => Reply::Done { seq: r.seq(), status },
            };
            self.reply(from, op, reply);
        }
    }

    /// The op's data arrived from the owner (`ok`) or could not be fetched.
    pub fn on_pulled(&mut self, op: OpId, ok: bool) {
        let Some(o) = self.ops.get_mut(&op) else { return };
        if !ok {
            let (from, seq) = (o.from, o.request.seq());
            return self.done(from, op, seq, Status::AccessDenied);
        }
        if let OpState::Preparing { pulled } = &mut o.state {
            *pulled = true;
        }
        self.advance(op);
    }

    /// Moves a preparing mutation to the disk once its bits are durable and its data is here.
    fn advance(&mut self, op: OpId) {
        let Some(o) = self.ops.get(&op) else { return };
        let OpState::Preparing { pulled } = o.state else { return };
        let volume = o.request.volume();
        let Some(vol) = self.volumes.get(&volume) else { return };
        if o.aborted || o.generation < vol.state.promised {
            // Never apply a request older than the promise (I3).
            let (from, seq) = (o.from, o.request.seq());
            return self.done(from, op, seq, Status::StaleGeneration);
        }
        if !pulled || o.need_version > vol.durable {
            return;
        }
        let action = match o.request {
            Request::Write { offset, len, fua, .. } => ReplicaAction::DiskWrite { op, volume, offset, len, fua },
            Request::Discard { offset, len, .. } => ReplicaAction::DiskDiscard { op, volume, offset, len },
            Request::WriteZeroes { offset, len, .. } => ReplicaAction::DiskZero { op, volume, offset, len },
            _ => return,
        };
        if let Some(o) = self.ops.get_mut(&op) {
            o.state = OpState::AtDisk;
        }
        self.actions.push_back(action);
    }

    /// A disk operation of `op` finished.
    pub fn on_disk(&mut self, op: OpId, result: DiskResult) {
        let Some(o) = self.ops.get(&op) else { return };
        let (from, seq) = (o.from, o.request.seq());
        let status = match result {
            DiskResult::Ok => Status::Ok,
            DiskResult::IoError => Status::IoError,
            DiskResult::NoSpace => Status::NoSpace,
        };
        if status == Status::Ok && matches!(o.request, Request::Read { .. }) {
            if let Some(o) = self.ops.get_mut(&op) {
                o.state = OpState::Pushing;
            }
            self.actions.push_back(ReplicaAction::Push { op });
            return;
        }
        let stale = o.aborted || self.volumes.get(&o.request.volume()).is_none_or(|v| o.generation < v.state.promised);
        let status = if stale && status == Status::Ok { Status::StaleGeneration } else { status };
        self.done(from, op, seq, status);
    }

    /// The op's data reached the owner's memory (`ok`) or could not be pushed.
    pub fn on_pushed(&mut self, op: OpId, ok: bool) {
        let Some(o) = self.ops.get(&op) else { return };
        let (from, seq) = (o.from, o.request.seq());
        let stale = o.aborted || self.volumes.get(&o.request.volume()).is_none_or(|v| o.generation < v.state.promised);
        let status = match (ok, stale) {
            (false, _) => Status::AccessDenied,
            (true, true) => Status::StaleGeneration,
            (true, false) => Status::Ok,
        };
        self.done(from, op, seq, status);
    }

    fn on_promise(&mut self, op: OpId, from: NodeId, request: Request) {
        let Request::Promise { seq, volume, generation, .. } = request else { return };
        if let Some(vol) = self.volumes.get(&volume) {
            if generation < vol.state.promised {
                let reply = self.promise_reply(volume, seq, Status::StaleGeneration, 0);
                return self.reply(from, op, reply);
            }
        }
        // A renewed ask from the promised owner for an extent we hold needs no etcd read.
        let known = self.volumes.get(&volume).is_some_and(|v| {
            v.state.promised == generation
                && v.state.owner == from
                && matches!(request, Request::Promise { extent, .. } if v.state.extents.contains_key(&extent))
        });
        if known {
            // A new session of the same owner: requests of older sessions are refused from now.
            if let Request::Promise { epoch, .. } = request {
                let vol = self.volumes.get_mut(&volume).expect("known");
                if epoch > vol.state.epoch {
                    vol.state.epoch = epoch;
                    vol.changed = true;
                }
            }
            self.ops.insert(
                op,
                Op {
                    from,
                    request: request.clone(),
                    generation,
                    state: OpState::AtDisk,
                    need_version: 0,
                    aborted: false,
                },
            );
            return self.grant_promise(op);
        }
        // Otherwise the claim is checked against etcd: a peer that knows the cluster secret
        // must still be the volume's recorded owner to fence others.
        let entry = self.volumes.entry(volume).or_insert_with(|| {
            let blank = PersistedVolume {
                volume,
                name: String::new(),
                size_bytes: 0,
                extent_bytes: 1,
                region_bytes: 1,
                promised: 0,
                owner: 0,
                epoch: 0,
                extents: BTreeMap::new(),
            };
            Vol::new(blank, 0)
        });
        if entry.verifying.len() >= 4096 {
            let reply = self.promise_reply(volume, seq, Status::NotPromised, 0);
            return self.reply(from, op, reply);
        }
        entry.verifying.push((op, from, request));
        if !entry.meta_pending {
            entry.meta_pending = true;
            self.actions.push_back(ReplicaAction::ReadMeta { volume });
        }
    }

    /// The answer to a [`ReplicaAction::ReadMeta`]: `Ok(None)` if the volume does not exist,
    /// `Err(())` if etcd could not be read.
    pub fn on_meta(&mut self, volume: u64, meta: Result<Option<VolumeMeta>, ()>) {
        let Some(vol) = self.volumes.get_mut(&volume) else { return };
        vol.meta_pending = false;
        let pending = std::mem::take(&mut vol.verifying);
        for (op, from, request) in pending {
            let Request::Promise { seq, generation, epoch, extent, .. } = request else { continue };
            let verdict = match &meta {
                Err(()) => Err(Status::NotPromised),
                Ok(None) => Err(Status::NotMember),
                Ok(Some(m)) if m.id != volume => Err(Status::BadRequest),
                Ok(Some(m)) if m.generation > generation => Err(Status::StaleGeneration),
                Ok(Some(m)) if m.generation < generation => Err(Status::NotPromised),
                Ok(Some(m)) if m.owner.as_deref().map(node_id) != Some(from) => Err(Status::NotOwner),
                Ok(Some(m)) if m.extents.get(extent as usize).is_none_or(|e| e.member(&self.node).is_none()) => {
                    Err(Status::NotMember)
                }
                Ok(Some(m)) => Ok(m.clone()),
            };
            let m = match verdict {
                Ok(m) => m,
                Err(status) => {
                    let reply = self.promise_reply(volume, seq, status, 0);
                    self.reply(from, op, reply);
                    continue;
                }
            };
            let vol = self.volumes.get_mut(&volume).expect("present");
            if generation < vol.state.promised {
                let reply = self.promise_reply(volume, seq, Status::StaleGeneration, 0);
                self.reply(from, op, reply);
                continue;
            }
            if vol.state.name.is_empty() {
                vol.state.name = m.name.clone();
                vol.state.size_bytes = m.size_bytes;
                vol.state.extent_bytes = m.extent_bytes;
                vol.state.region_bytes = m.region_bytes;
            } else if m.size_bytes > vol.state.size_bytes {
                // Grown: the last extent's bitmap grows with it.
                vol.state.size_bytes = m.size_bytes;
                vol.changed = true;
            }
            if generation > vol.state.promised {
                // A new owner numbers its sessions afresh.
                vol.state.promised = generation;
                vol.state.owner = from;
                vol.state.epoch = epoch;
                vol.changed = true;
            } else if epoch > vol.state.epoch {
                vol.state.epoch = epoch;
                vol.changed = true;
            }
            let regions = vol.state.regions(extent);
            let bits = vol.state.extents.entry(extent).or_insert_with(|| Bitmap::new(regions));
            if bits.len() < regions {
                let mut grown = Bitmap::new(regions);
                grown.union_with(bits);
                *bits = grown;
                vol.changed = true;
            }
            if vol.durable == 0 {
                // Never written yet: the first promise creates the record.
                vol.changed = true;
            }
            self.ops.insert(
                op,
                Op {
                    from,
                    request: request.clone(),
                    generation,
                    state: OpState::AtDisk,
                    need_version: 0,
                    aborted: false,
                },
            );
            self.abort_older(volume, generation);
            self.grant_promise(op);
        }
        // A volume record made only to hold pending promises, none granted: forget it.
        if self
            .volumes
            .get(&volume)
            .is_some_and(|v| v.durable == 0 && !v.persisting && !v.changed && v.verifying.is_empty())
        {
            self.volumes.remove(&volume);
        }
    }

    /// Marks every op of an older generation aborted: it will not be acknowledged (I6).
    fn abort_older(&mut self, volume: u64, generation: u64) {
        let stale: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, o)| {
                o.request.volume() == volume
                    && o.generation < generation
                    && !matches!(o.request, Request::Promise { .. })
            })
            .map(|(id, _)| *id)
            .collect();
        for op in stale {
            if let Some(o) = self.ops.get_mut(&op) {
                o.aborted = true;
            }
            self.advance(op);
        }
    }

    /// Answers a promise once everything it changed is durable.
    fn grant_promise(&mut self, op: OpId) {
        let Some(o) = self.ops.get(&op) else { return };
        let volume = o.request.volume();
        let vol = self.volumes.get(&volume).expect("present");
        let need = if vol.changed {
            vol.version_for_change()
        } else if vol.persisting {
            vol.issued
        } else {
            0
        };
        if need == 0 {
            return self.answer_promise(op);
        }
        if let Some(o) = self.ops.get_mut(&op) {
            o.need_version = need;
        }
        self.maybe_persist(volume);
    }

    fn answer_promise(&mut self, op: OpId) {
        let Some(o) = self.ops.get(&op) else { return };
        let (from, request) = (o.from, o.request.clone());
        let Request::Promise { seq, volume, extent, .. } = request else { return };
        let reply = self.promise_reply(volume, seq, Status::Ok, extent);
        self.reply(from, op, reply);
    }

    fn promise_reply(&self, volume: u64, seq: Seq, status: Status, extent: u32) -> Reply {
        let vol = self.volumes.get(&volume);
        let (epoch, promised) = vol.map_or((0, 0), |v| (v.state.epoch, v.state.promised));
        let bitmap = match status {
            Status::Ok => vol.and_then(|v| v.state.extents.get(&extent)).cloned().unwrap_or_default(),
            _ => Bitmap::default(),
        };
        Reply::Promised { seq, status, epoch, incarnation: self.incarnation, promised, bitmap }
    }

    /// The volume's current metadata (or `None`: deleted), from a periodic look at etcd:
    /// extents this node no longer holds are dropped.
    pub fn on_layout(&mut self, volume: u64, meta: Option<&VolumeMeta>) {
        let Some(vol) = self.volumes.get_mut(&volume) else { return };
        if vol.durable == 0 || !vol.verifying.is_empty() {
            return;
        }
        let Some(meta) = meta else {
            if self.ops.values().any(|o| o.request.volume() == volume) {
                return;
            }
            self.volumes.remove(&volume);
            self.actions.push_back(ReplicaAction::DropVolume { volume });
            return;
        };
        if meta.id != volume {
            return;
        }
        let gone: Vec<u32> = vol
            .state
            .extents
            .keys()
            .copied()
            .filter(|&e| meta.extents.get(e as usize).is_none_or(|x| x.member(&self.node).is_none()))
            .collect();
        for extent in gone {
            let busy = self.ops.values().any(|o| {
                o.request.volume() == volume
                    && matches!(&o.request, Request::Write { extent: x, .. } | Request::Read { extent: x, .. }
                        | Request::Discard { extent: x, .. } | Request::WriteZeroes { extent: x, .. } if *x == extent)
            });
            if busy {
                continue;
            }
            let vol = self.volumes.get_mut(&volume).expect("present");
            vol.state.extents.remove(&extent);
            vol.changed = true;
            let offset = u64::from(extent) * vol.state.extent_bytes;
            let len = vol.state.extent_bytes.min(vol.state.size_bytes.saturating_sub(offset));
            self.actions.push_back(ReplicaAction::DropExtent { volume, extent, offset, len });
        }
        self.maybe_persist(volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::tests_support::meta_with;
    use crate::meta::{ExtentMeta, Member, MemberState};

    const ME: &str = "n2";

    fn meta(generation: u64) -> VolumeMeta {
        let members = ["n1", "n2", "n3"].iter().map(|n| Member::new(n, MemberState::InSync)).collect();
        let mut m = meta_with(vec![ExtentMeta { members }]);
        m.generation = generation;
        m
    }

    fn replica() -> Replica {
        Replica::new(ReplicaConfig { node: ME.into(), incarnation: 77 }, Vec::new())
    }

    fn drain(r: &mut Replica) -> Vec<ReplicaAction> {
        std::iter::from_fn(|| r.poll_action()).collect()
    }

    fn stamp(generation: u64, floor: Seq) -> Stamp {
        Stamp { volume: 1, generation, epoch: 1, incarnation: 77, floor }
    }

    /// Promises generation `g` to n1 and runs the etcd check and persist.
    fn promise(r: &mut Replica, op: OpId, g: u64) -> Reply {
        let owner = node_id("n1");
        r.on_request(op, owner, Request::Promise { seq: 1, volume: 1, generation: g, epoch: 1, extent: 0 });
        let mut out = drain(r);
        if out.iter().any(|a| matches!(a, ReplicaAction::ReadMeta { .. })) {
            r.on_meta(1, Ok(Some(meta(g))));
            out = drain(r);
        }
        if let Some(ReplicaAction::Persist { version, .. }) =
            out.iter().find(|a| matches!(a, ReplicaAction::Persist { .. })).cloned()
        {
            r.on_persisted(1, version);
            out.extend(drain(r));
        }
        out.into_iter()
            .find_map(|a| match a {
                ReplicaAction::Reply { reply, .. } => Some(reply),
                _ => None,
            })
            .expect("promise answered")
    }

    #[test]
    fn a_write_waits_for_its_dirty_bit_to_be_durable() {
        let mut r = replica();
        assert!(matches!(promise(&mut r, 1, 5), Reply::Promised { status: Status::Ok, .. }));
        let owner = node_id("n1");
        r.on_request(
            2,
            owner,
            Request::Write {
                seq: 10,
                stamp: stamp(5, 10),
                extent: 0,
                offset: 4096,
                len: 4096,
                fua: false,
                inline: true,
            },
        );
        let out = drain(&mut r);
        let Some(ReplicaAction::Persist { version, state, .. }) = out.first().cloned() else { panic!("{out:?}") };
        assert!(state.extents[&0].get(0), "region 0 dirty in the persisted state");
        assert!(
            !out.iter().any(|a| matches!(a, ReplicaAction::DiskWrite { .. })),
            "no data before the bit is durable: {out:?}"
        );
        r.on_persisted(1, version);
        assert!(matches!(drain(&mut r)[..], [ReplicaAction::DiskWrite { op: 2, offset: 4096, .. }]));
        r.on_disk(2, DiskResult::Ok);
        assert_eq!(
            drain(&mut r),
            vec![ReplicaAction::Reply { to: owner, op: 2, reply: Reply::Done { seq: 10, status: Status::Ok } }]
        );
        // A second write to the same region needs no persist.
        r.on_request(
            3,
            owner,
            Request::Write { seq: 11, stamp: stamp(5, 10), extent: 0, offset: 0, len: 512, fua: false, inline: false },
        );
        assert_eq!(drain(&mut r), vec![ReplicaAction::Pull { op: 3 }]);
        r.on_pulled(3, true);
        assert!(matches!(drain(&mut r)[..], [ReplicaAction::DiskWrite { op: 3, .. }]));
    }

    #[test]
    fn stale_generation_incarnation_epoch_owner_and_duplicates_are_refused() {
        let mut r = replica();
        promise(&mut r, 1, 5);
        let owner = node_id("n1");
        let write =
            |seq, stamp| Request::Write { seq, stamp, extent: 0, offset: 0, len: 512, fua: false, inline: true };
        let status_of = |r: &mut Replica, op, from, req| {
            r.on_request(op, from, req);
            drain(r).into_iter().find_map(|a| match a {
                ReplicaAction::Reply { reply, .. } => Some(reply.status()),
                _ => None,
            })
        };
        assert_eq!(status_of(&mut r, 2, owner, write(1, stamp(4, 0))), Some(Status::StaleGeneration));
        assert_eq!(status_of(&mut r, 3, owner, write(2, stamp(6, 0))), Some(Status::NotPromised));
        assert_eq!(status_of(&mut r, 4, node_id("n3"), write(3, stamp(5, 0))), Some(Status::NotOwner));
        assert_eq!(
            status_of(&mut r, 5, owner, write(4, Stamp { incarnation: 76, ..stamp(5, 0) })),
            Some(Status::StaleIncarnation)
        );
        assert_eq!(status_of(&mut r, 6, owner, write(5, Stamp { epoch: 0, ..stamp(5, 0) })), Some(Status::StaleEpoch));
        let far = Request::Write {
            seq: 6,
            stamp: stamp(5, 0),
            extent: 0,
            offset: 1 << 30,
            len: 512,
            fua: false,
            inline: true,
        };
        assert_eq!(status_of(&mut r, 7, owner, far), Some(Status::BadRequest));
        let other = Request::Write {
            seq: 7,
            stamp: stamp(5, 0),
            extent: 3,
            offset: 3 << 30,
            len: 512,
            fua: false,
            inline: true,
        };
        assert_eq!(status_of(&mut r, 8, owner, other), Some(Status::NotMember));
        // First copy taken (waits for its persist), second refused, and below the floor too.
        assert_eq!(status_of(&mut r, 9, owner, write(20, stamp(5, 10))), None);
        assert_eq!(status_of(&mut r, 10, owner, write(20, stamp(5, 10))), Some(Status::Duplicate));
        assert_eq!(status_of(&mut r, 11, owner, write(9, stamp(5, 10))), Some(Status::Duplicate));
    }

    #[test]
    fn a_newer_promise_aborts_older_requests_and_a_lying_peer_is_refused() {
        let mut r = replica();
        promise(&mut r, 1, 5);
        let owner = node_id("n1");
        r.on_request(
            2,
            owner,
            Request::Write { seq: 10, stamp: stamp(5, 10), extent: 0, offset: 0, len: 512, fua: false, inline: false },
        );
        let out = drain(&mut r);
        let Some(ReplicaAction::Persist { version: write_version, .. }) = out.first().cloned() else {
            panic!("{out:?}")
        };
        // Generation 6, owned by n3 in etcd: n3 may claim it, n1 may not.
        r.on_request(3, node_id("n1"), Request::Promise { seq: 2, volume: 1, generation: 6, epoch: 1, extent: 0 });
        assert_eq!(drain(&mut r), vec![ReplicaAction::ReadMeta { volume: 1 }]);
        let mut m6 = meta(6);
        m6.owner = Some("n3".into());
        r.on_meta(1, Ok(Some(m6.clone())));
        assert!(matches!(
            drain(&mut r)[..],
            [ReplicaAction::Reply { reply: Reply::Promised { status: Status::NotOwner, .. }, .. }]
        ));
        r.on_request(4, node_id("n3"), Request::Promise { seq: 3, volume: 1, generation: 6, epoch: 1, extent: 0 });
        drain(&mut r);
        r.on_meta(1, Ok(Some(m6)));
        let out = drain(&mut r);
        // The old write, still waiting for its data, is answered stale and never applied.
        assert_eq!(
            out,
            vec![ReplicaAction::Reply {
                to: owner,
                op: 2,
                reply: Reply::Done { seq: 10, status: Status::StaleGeneration }
            }]
        );
        r.on_pulled(2, true);
        assert!(drain(&mut r).is_empty(), "a finished op stays finished");
        // The promise waits for the persist in flight, then for its own.
        r.on_persisted(1, write_version);
        let out = drain(&mut r);
        let Some(ReplicaAction::Persist { version, state, .. }) = out.first().cloned() else { panic!("{out:?}") };
        assert_eq!(state.promised, 6);
        assert_eq!(out.len(), 1, "{out:?}");
        r.on_persisted(1, version);
        assert!(matches!(
            drain(&mut r)[..],
            [ReplicaAction::Reply { op: 4, reply: Reply::Promised { status: Status::Ok, promised: 6, .. }, .. }]
        ));
    }

    #[test]
    fn clear_keeps_regions_written_after_the_flush() {
        let mut r = replica();
        promise(&mut r, 1, 5);
        let owner = node_id("n1");
        for (op, seq, offset) in [(2, 10, 0), (3, 11, 1 << 20)] {
            r.on_request(
                op,
                owner,
                Request::Write { seq, stamp: stamp(5, 10), extent: 0, offset, len: 512, fua: false, inline: true },
            );
            for a in drain(&mut r) {
                if let ReplicaAction::Persist { version, .. } = a {
                    r.on_persisted(1, version);
                }
            }
            r.on_disk(op, DiskResult::Ok);
            drain(&mut r);
        }
        r.on_request(
            4,
            owner,
            Request::ClearDirty { seq: 12, stamp: stamp(5, 12), extent: 0, first: 0, count: 2, upto: 10 },
        );
        drain(&mut r);
        let bits = &r.volume_state(1).unwrap().extents[&0];
        assert!(!bits.get(0) && bits.get(1), "region 1 was written after seq 10");
    }

    #[test]
    fn persisted_state_round_trips_and_detects_corruption() {
        let mut bits = Bitmap::new(1024);
        bits.set(3);
        let state = PersistedVolume {
            volume: 9,
            name: "vm".into(),
            size_bytes: 3 << 30,
            extent_bytes: 1 << 30,
            region_bytes: 1 << 20,
            promised: 4,
            owner: 11,
            epoch: 2,
            extents: [(0, bits.clone()), (2, Bitmap::new(1024))].into_iter().collect(),
        };
        let bytes = state.encode();
        assert_eq!(PersistedVolume::decode(&bytes).unwrap(), state);
        for i in [0, 20, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(PersistedVolume::decode(&bad).is_err());
        }
        assert!(PersistedVolume::decode(&bytes[..bytes.len() - 3]).is_err());
    }
}
