//! A deterministic simulator of a whole hcblk cluster, driving the real [`Owner`] and
//! [`Replica`] state machines over models of the network, the disks, etcd and a guest, from a
//! seed. After every step the reference [`model`] checks the invariants; a failure prints its
//! seed, and `hcblk-sim --seed N` replays it exactly (TigerBeetle's VOPR, FoundationDB).
//!
//! What it does to them: messages delayed (reordered), dropped and duplicated; nodes isolated
//! and pairs cut; nodes crashed (losing, block by block, whatever their disk had not flushed;
//! writes in flight torn) and restarted, or lost for good and replaced; disks slow, failing
//! or full; etcd unreachable from some nodes, and commits whose answer is lost; owners moved
//! (detach and attach elsewhere), owners crashed and attached elsewhere once their lease ran
//! out, and stale owners left running behind a partition; an operator accepting the risk of
//! running below min_replicas. Then everything heals, the cluster must become whole, and the
//! replicas must be identical and hold every write the guest may rely on.
//!
//! Invariants checked (the numbering of the replication issue and docs/replication.md):
//! I1 at every acknowledgement and at the end; I2 after a whole-cluster power loss; I3, I6 and
//! I8 at every disk write and replica answer; I4 and I10 at every acknowledgement; I5 at every
//! etcd commit; I7 at the end; I9 at every guest read.

mod model;
mod rng;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

pub use model::{Model, ModelStats, Tag};
pub use rng::Rng;

use crate::meta::{
    node_id, ExtentMeta, Locality, Member, MemberState, NodeInfo, RiskAcceptance, VolumeMeta, META_FORMAT,
};
use crate::msg::{NodeId, Reply, Request, Seq, Status};
use crate::owner::{
    DataRef, GuestId, GuestOp, GuestStatus, MetaResult, Owner, OwnerAction, OwnerConfig, OwnerEvent, Phase, Time, MS,
};
use crate::replica::{DiskResult, OpId, PersistedVolume, Replica, ReplicaAction, ReplicaConfig};

const US: Time = 1_000;
const BLOCK: u64 = 4096;
const VOLUME_ID: u64 = 42;
const LEASE_TTL: Time = 300 * MS;
const LEASE_RENEW: Time = 100 * MS;
const LEASE_MARGIN: Time = 50 * MS;
const ETCD_TIMEOUT: Time = 20 * MS;

/// A bug planted on purpose, to show the checker catches it within the CI seed budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedBug {
    /// The owner acknowledges a write once any one replica has it.
    AckEarly,
    /// Replicas write data before its dirty bit is durable.
    SkipDirtyPersist,
    /// A new owner serves without reconciling what the previous one was writing.
    SkipReconcile,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    pub replicas: u8,
    pub min_replicas: u8,
    pub extents: u32,
    pub extent_blocks: u64,
    pub region_blocks: u64,
    /// Length of the faulty phase.
    pub run_for: Time,
    /// Longest the healed cluster may take to become whole and quiet.
    pub settle_for: Time,
    pub faults: bool,
    /// Members gone this long are replaced (0: never, in this run).
    pub replace_after: Time,
    /// End with a power loss of every node, then check what flushed writes survived.
    pub power_loss: bool,
    pub bug: Option<PlantedBug>,
    /// Print every event.
    pub verbose: bool,
}

impl SimConfig {
    /// A configuration drawn from the seed, so seeds cover many cluster shapes.
    pub fn from_seed(seed: u64) -> Self {
        let mut r = Rng::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let nodes = r.range(3, 5) as usize;
        let replicas = r.range(2, 3.min(nodes as u64)) as u8;
        let min_replicas = r.range(1, u64::from(replicas)) as u8;
        let region_blocks = [1, 2, 4][r.range(0, 2) as usize];
        Self {
            seed,
            nodes,
            replicas,
            min_replicas,
            extents: r.range(1, 4) as u32,
            extent_blocks: region_blocks * [2, 4, 8][r.range(0, 2) as usize],
            region_blocks,
            run_for: r.range(1_000, 4_000) * MS,
            settle_for: 20_000 * MS,
            faults: true,
            replace_after: if nodes > usize::from(replicas) && r.chance(0.5) { r.range(500, 2_000) * MS } else { 0 },
            power_loss: r.chance(0.5),
            bug: None,
            verbose: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub steps: u64,
    pub sim_time: Time,
    pub model: ModelStats,
    pub crashes: u64,
    pub attaches: u64,
    pub syncs: u64,
    pub replacements: u64,
    /// The run ended with an extent whose every in-sync member was lost for good: only an
    /// operator can decide what to do (safety was checked all along).
    pub unrecoverable: bool,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub step: u64,
    pub time: Time,
    pub what: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} failed at step {} (t={:.3} ms): {}",
            self.seed,
            self.step,
            self.time as f64 / MS as f64,
            self.what
        )?;
        writeln!(f, "last events:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "replay: cargo run -p hcblk-replication --features sim --bin hcblk-sim -- --seed {} --verbose",
            self.seed
        )
    }
}

// ---- the world -------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Disk {
    durable: BTreeMap<u64, Tag>,
    /// Written, not flushed: lost (block by block, at random) in a crash.
    volatile: BTreeMap<u64, Tag>,
    /// The replica's state record, durably written.
    record: Option<Vec<u8>>,
    slow_until: Time,
    failing_until: Time,
    full_until: Time,
}

impl Disk {
    fn view(&self, b: u64) -> Tag {
        self.volatile.get(&b).or_else(|| self.durable.get(&b)).copied().unwrap_or(0)
    }
}

struct ROp {
    from: NodeId,
    request: Request,
    data: Vec<Tag>,
}

struct GuestCtx {
    op: GuestOp,
    first_block: u64,
    blocks: u64,
    tag: Tag,
    buf: Vec<Tag>,
    /// For a flush: the acknowledged writes it covers.
    covers: BTreeSet<Tag>,
}

struct OwnerCtx {
    instance: u64,
    sm: Owner,
    guests: BTreeMap<GuestId, GuestCtx>,
    slots: Vec<Vec<Tag>>,
    grants: BTreeMap<Seq, DataRef>,
    seq_len: BTreeMap<Seq, u64>,
    /// Requests of discards and write-zeroes, which carry no data: seq -> guest request.
    zero_seqs: BTreeMap<Seq, GuestId>,
    /// The extent each data request addresses.
    seq_extent: BTreeMap<Seq, u32>,
    next_guest: GuestId,
}

struct Node {
    name: String,
    id: NodeId,
    alive: bool,
    /// Gone for good (will be replaced).
    lost: bool,
    incarnation: u64,
    replica: Option<Replica>,
    ops: BTreeMap<OpId, ROp>,
    next_op: OpId,
    disk: Disk,
    owner: Option<OwnerCtx>,
    isolated_until: Time,
    /// When its replica last started (a restart ends whatever the owner had in flight there).
    started_at: Time,
}

enum Msg {
    ToReplica { from: usize, to: usize, request: Request, inline: Option<Vec<Tag>> },
    ToOwner { from: usize, from_inc: u64, to: usize, reply: Reply },
    PullReq { replica: usize, inc: u64, op: OpId, owner: usize, seq: Seq, len: u64 },
    PullResp { to: usize, inc: u64, op: OpId, data: Option<Vec<Tag>> },
    PushReq { replica: usize, inc: u64, op: OpId, owner: usize, seq: Seq, data: Vec<Tag> },
    PushResp { to: usize, inc: u64, op: OpId, ok: bool },
}

impl Msg {
    fn ends(&self) -> (usize, usize) {
        match self {
            Msg::ToReplica { from, to, .. } | Msg::ToOwner { from, to, .. } => (*from, *to),
            Msg::PullReq { replica, owner, .. } | Msg::PushReq { replica, owner, .. } => (*replica, *owner),
            Msg::PullResp { to, .. } | Msg::PushResp { to, .. } => (usize::MAX, *to),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Who {
    Owner(u64),
    Replica(u64),
}

#[derive(Debug)]
enum EtcdReq {
    Read,
    Write { expect: i64, meta: Box<VolumeMeta> },
    ListNodes,
    ReadById,
    Renew { sent: Time },
    AcceptRisk,
}

enum EtcdAnswer {
    Meta(MetaResult),
    Nodes(Option<Vec<NodeInfo>>),
    ById(Result<Option<VolumeMeta>, ()>),
    Renewed(Option<Time>),
    None,
}

enum Ev {
    Net(Msg),
    DiskDone {
        node: usize,
        inc: u64,
        op: OpId,
        result: DiskResult,
    },
    /// A state record write finished: `result` decides whether it reached the disk (a full
    /// disk refuses it; an I/O error stops the daemon, as the driver aborts rather than lie).
    Persisted {
        node: usize,
        inc: u64,
        volume: u64,
        version: u64,
        record: Vec<u8>,
        result: DiskResult,
    },
    EtcdAt {
        node: usize,
        who: Who,
        req: EtcdReq,
    },
    EtcdReply {
        node: usize,
        who: Who,
        answer: EtcdAnswer,
    },
    OwnerTick {
        node: usize,
        instance: u64,
    },
    Guest {
        node: usize,
        instance: u64,
    },
    Renew {
        node: usize,
        inc: u64,
    },
    Layout {
        node: usize,
        inc: u64,
    },
    Restart {
        node: usize,
    },
    /// A one-sided transfer whose answer never came: the transport fails it (as a real one
    /// does when its connection dies).
    TransferTimeout {
        node: usize,
        inc: u64,
        op: OpId,
        pull: bool,
    },
    Fault,
    Heal {
        what: Heal,
    },
    Orchestrate,
}

#[derive(Debug)]
enum Heal {
    Isolation(usize),
    Cut(usize, usize),
    EtcdFor(usize),
}

struct Etcd {
    meta: Option<(VolumeMeta, i64)>,
    revision: i64,
    lease_expiry: Vec<Time>,
    /// Nodes that cannot reach etcd.
    cut: BTreeSet<usize>,
}

pub struct Sim {
    cfg: SimConfig,
    rng: Rng,
    now: Time,
    step: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(Time, u64)>>,
    events: BTreeMap<u64, Ev>,
    nodes: Vec<Node>,
    etcd: Etcd,
    cuts: BTreeSet<(usize, usize)>,
    model: Model,
    trace: VecDeque<String>,
    failure: Option<String>,
    next_instance: u64,
    next_tag: Tag,
    settling: bool,
    stats: Outcome,
    faults_until: Time,
    /// (node, extent) -> the last step at which it stopped being in sync in etcd.
    left_sync: BTreeMap<(usize, u32), u64>,
    /// (node, extent) -> the last step at which it became in sync in etcd.
    joined_sync: BTreeMap<(usize, u32), u64>,
    /// extent -> the last step at which etcd had it writable (I10 check of pieces acknowledged
    /// before the whole guest write completed).
    last_writable: BTreeMap<u32, u64>,
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let rng = Rng::new(cfg.seed);
        let nodes = (0..cfg.nodes)
            .map(|i| {
                let name = format!("n{}", i + 1);
                Node {
                    id: node_id(&name),
                    name,
                    alive: true,
                    lost: false,
                    incarnation: 1,
                    replica: None,
                    ops: BTreeMap::new(),
                    next_op: 1,
                    disk: Disk::default(),
                    owner: None,
                    isolated_until: 0,
                    started_at: 0,
                }
            })
            .collect();
        let n = cfg.nodes;
        let mut sim = Self {
            rng,
            now: 0,
            step: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes,
            etcd: Etcd { meta: None, revision: 1, lease_expiry: vec![LEASE_TTL; n], cut: BTreeSet::new() },
            cuts: BTreeSet::new(),
            model: Model::default(),
            trace: VecDeque::new(),
            failure: None,
            next_instance: 1,
            next_tag: 1,
            settling: false,
            stats: Outcome::default(),
            faults_until: cfg.run_for,
            left_sync: BTreeMap::new(),
            joined_sync: BTreeMap::new(),
            last_writable: BTreeMap::new(),
            cfg,
        };
        sim.create_volume();
        let c = &sim.cfg;
        let line = format!(
            "config: {} nodes, {} replicas (min {}), {} extents of {} blocks, regions of {} blocks, faults for {} ms, replace after {} ms, power loss {}, bug {:?}",
            c.nodes, c.replicas, c.min_replicas, c.extents, c.extent_blocks, c.region_blocks, c.run_for / MS, c.replace_after / MS, c.power_loss, c.bug
        );
        sim.log(line);
        for i in 0..n {
            sim.start_replica(i);
        }
        sim.at(0, Ev::Orchestrate);
        if sim.cfg.faults {
            let first = sim.rng.range(20, 200) * MS;
            sim.at(first, Ev::Fault);
        }
        sim
    }

    fn create_volume(&mut self) {
        let members: Vec<Vec<usize>> = (0..self.cfg.extents)
            .map(|e| (0..usize::from(self.cfg.replicas)).map(|k| (e as usize + k) % self.cfg.nodes).collect())
            .collect();
        let meta = VolumeMeta {
            format: META_FORMAT,
            name: "vol".into(),
            id: VOLUME_ID,
            size_bytes: u64::from(self.cfg.extents) * self.cfg.extent_blocks * BLOCK,
            block_size: BLOCK as u32,
            extent_bytes: self.cfg.extent_blocks * BLOCK,
            region_bytes: self.cfg.region_blocks * BLOCK,
            replicas: self.cfg.replicas,
            min_replicas: self.cfg.min_replicas,
            queues: 1,
            serial: "vol".into(),
            read_only: false,
            locality: Locality::Prefer,
            created_unix_s: 0,
            generation: 0,
            owner: None,
            epoch: 1,
            extents: members
                .iter()
                .map(|m| ExtentMeta {
                    members: m.iter().map(|i| Member::new(&format!("n{}", i + 1), MemberState::InSync)).collect(),
                })
                .collect(),
            risk_accepted: None,
        };
        if let Err(e) = meta.validate() {
            panic!("simulator made an invalid volume: {e}");
        }
        self.etcd.meta = Some((meta, 1));
    }

    fn at(&mut self, t: Time, ev: Ev) {
        self.seq += 1;
        self.events.insert(self.seq, ev);
        self.queue.push(Reverse((t, self.seq)));
    }

    fn after(&mut self, d: Time, ev: Ev) {
        self.at(self.now + d, ev);
    }

    fn log(&mut self, line: String) {
        let line = format!("{:>10.3} ms  {line}", self.now as f64 / MS as f64);
        if self.cfg.verbose {
            println!("{line}");
        }
        self.trace.push_back(line);
        if self.trace.len() > 400 {
            self.trace.pop_front();
        }
    }

    fn fail(&mut self, what: String) {
        if self.failure.is_none() {
            self.log(format!("VIOLATION {what}"));
            self.failure = Some(what);
        }
    }

    fn extent_of_block(&self, b: u64) -> u32 {
        (b / self.cfg.extent_blocks) as u32
    }

    fn volume_blocks(&self) -> u64 {
        u64::from(self.cfg.extents) * self.cfg.extent_blocks
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        if a == usize::MAX || b == usize::MAX {
            return true;
        }
        let (x, y) = (a.min(b), a.max(b));
        a == b
            || (self.nodes[a].isolated_until <= self.now
                && self.nodes[b].isolated_until <= self.now
                && !self.cuts.contains(&(x, y)))
    }

    fn etcd_reachable(&self, n: usize) -> bool {
        self.nodes[n].alive && self.nodes[n].isolated_until <= self.now && !self.etcd.cut.contains(&n)
    }

    fn net_delay(&mut self) -> Time {
        if self.rng.chance(0.05) {
            self.rng.range(500, 3_000) * US
        } else {
            self.rng.range(10, 300) * US
        }
    }

    fn send(&mut self, msg: Msg) {
        let (a, b) = msg.ends();
        if !self.reachable(a, b) {
            return;
        }
        let faulty = self.cfg.faults && !self.settling;
        if faulty && self.rng.chance(0.002) {
            return; // dropped
        }
        let d = self.net_delay();
        if faulty && self.rng.chance(0.002) {
            if let Some(copy) = self.duplicate(&msg) {
                let d2 = self.net_delay();
                self.after(d2 + d, Ev::Net(copy));
            }
        }
        self.after(d, Ev::Net(msg));
    }

    fn duplicate(&self, msg: &Msg) -> Option<Msg> {
        Some(match msg {
            Msg::ToReplica { from, to, request, inline } => {
                Msg::ToReplica { from: *from, to: *to, request: request.clone(), inline: inline.clone() }
            }
            Msg::ToOwner { from, from_inc, to, reply } => {
                Msg::ToOwner { from: *from, from_inc: *from_inc, to: *to, reply: reply.clone() }
            }
            _ => return None,
        })
    }

    // ---- replicas ----------------------------------------------------------------------------

    fn start_replica(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        node.started_at = now;
        let volumes: Vec<PersistedVolume> =
            node.disk.record.as_deref().and_then(|r| PersistedVolume::decode(r).ok()).into_iter().collect();
        let mut replica =
            Replica::new(ReplicaConfig { node: node.name.clone(), incarnation: node.incarnation }, volumes);
        replica.plant_bug_skip_dirty_persist = self.cfg.bug == Some(PlantedBug::SkipDirtyPersist);
        node.replica = Some(replica);
        let inc = node.incarnation;
        self.after(0, Ev::Renew { node: i, inc });
        self.after(50 * MS, Ev::Layout { node: i, inc });
    }

    fn replica_actions(&mut self, i: usize) {
        loop {
            let Some(action) = self.nodes[i].replica.as_mut().and_then(Replica::poll_action) else { return };
            self.replica_action(i, action);
        }
    }

    fn disk_latency(&mut self, i: usize) -> Time {
        let base = self.rng.range(20, 400) * US;
        if self.nodes[i].disk.slow_until > self.now {
            base * 20
        } else {
            base
        }
    }

    fn replica_action(&mut self, i: usize, action: ReplicaAction) {
        let inc = self.nodes[i].incarnation;
        match action {
            ReplicaAction::Reply { to, op, reply } => {
                self.nodes[i].ops.remove(&op);
                if reply.status() == Status::Ok {
                    self.check_reply_generation(i, &reply, op);
                }
                let Some(to) = self.index_of(to) else { return };
                if self.cfg.verbose {
                    self.log(format!("{} -> {}: {reply:?}", self.nodes[i].name, self.nodes[to].name));
                }
                self.send(Msg::ToOwner { from: i, from_inc: inc, to, reply });
            }
            ReplicaAction::ReadMeta { .. } => {
                self.etcd_request(i, Who::Replica(inc), EtcdReq::ReadById);
            }
            ReplicaAction::Persist { volume, version, state } => {
                let result =
                    if self.nodes[i].disk.full_until > self.now { DiskResult::NoSpace } else { self.disk_result(i) };
                let d = self.disk_latency(i);
                self.after(d, Ev::Persisted { node: i, inc, volume, version, record: state.encode(), result });
            }
            ReplicaAction::Pull { op } => {
                let Some(rop) = self.nodes[i].ops.get(&op) else { return };
                let (from, seq, len) = match &rop.request {
                    Request::Write { seq, len, .. } => (rop.from, *seq, u64::from(*len)),
                    _ => return,
                };
                let Some(owner) = self.index_of(from) else { return };
                self.send(Msg::PullReq { replica: i, inc, op, owner, seq, len });
                self.after(100 * MS, Ev::TransferTimeout { node: i, inc, op, pull: true });
            }
            ReplicaAction::Push { op } => {
                let Some(rop) = self.nodes[i].ops.get(&op) else { return };
                let (owner, seq, data) = (rop.from, rop.request.seq(), rop.data.clone());
                let Some(owner) = self.index_of(owner) else { return };
                self.send(Msg::PushReq { replica: i, inc, op, owner, seq, data });
                self.after(100 * MS, Ev::TransferTimeout { node: i, inc, op, pull: false });
            }
            ReplicaAction::DiskWrite { op, offset, len, .. } => self.disk_mutation(i, op, offset, u64::from(len), true),
            ReplicaAction::DiskDiscard { op, offset, len, .. } | ReplicaAction::DiskZero { op, offset, len, .. } => {
                self.disk_mutation(i, op, offset, len, false)
            }
            ReplicaAction::DiskRead { op, offset, len, .. } => {
                let result = self.disk_result(i);
                if result == DiskResult::Ok {
                    let data: Vec<Tag> = (offset / BLOCK..(offset + u64::from(len)) / BLOCK)
                        .map(|b| self.nodes[i].disk.view(b))
                        .collect();
                    if let Some(rop) = self.nodes[i].ops.get_mut(&op) {
                        rop.data = data;
                    }
                }
                let d = self.disk_latency(i);
                self.after(d, Ev::DiskDone { node: i, inc, op, result });
            }
            ReplicaAction::DiskFlush { op, .. } => {
                let d = self.disk_latency(i);
                self.after(d, Ev::DiskDone { node: i, inc, op, result: DiskResult::Ok });
            }
            ReplicaAction::DropExtent { offset, len, .. } => {
                let disk = &mut self.nodes[i].disk;
                for b in offset / BLOCK..(offset + len) / BLOCK {
                    disk.volatile.remove(&b);
                    disk.durable.remove(&b);
                }
                self.log(format!("{} drops blocks {}..{}", self.nodes[i].name, offset / BLOCK, (offset + len) / BLOCK));
            }
            ReplicaAction::DropVolume { .. } => {}
        }
    }

    fn disk_result(&mut self, i: usize) -> DiskResult {
        let disk = &self.nodes[i].disk;
        if disk.failing_until > self.now && self.rng.chance(0.3) {
            DiskResult::IoError
        } else {
            DiskResult::Ok
        }
    }

    /// A replica starts writing: the dirty bits of the regions must already be durable (I8)
    /// and the request's generation must be the one promised (I3).
    fn disk_mutation(&mut self, i: usize, op: OpId, offset: u64, len: u64, data: bool) {
        let inc = self.nodes[i].incarnation;
        let Some(rop) = self.nodes[i].ops.get(&op) else { return };
        let generation = match &rop.request {
            Request::Write { stamp, .. } | Request::Discard { stamp, .. } | Request::WriteZeroes { stamp, .. } => {
                stamp.generation
            }
            _ => 0,
        };
        let promised = self.nodes[i].replica.as_ref().and_then(|r| r.volume_state(VOLUME_ID)).map_or(0, |v| v.promised);
        if generation < promised {
            self.fail(format!(
                "I3: {} applies a write of generation {generation} after promising {promised}",
                self.nodes[i].name
            ));
        }
        let record = self.nodes[i].disk.record.as_deref().and_then(|r| PersistedVolume::decode(r).ok());
        let (eb, rb) = (self.cfg.extent_blocks, self.cfg.region_blocks);
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            let (extent, region) = ((b / eb) as u32, ((b % eb) / rb) as u32);
            let durable = record.as_ref().and_then(|r| r.extents.get(&extent)).is_some_and(|bits| bits.get(region));
            if !durable {
                self.fail(format!(
                    "I8: {} writes block {b} (extent {extent} region {region}) before its dirty bit is durable",
                    self.nodes[i].name
                ));
                break;
            }
        }
        let result = if self.nodes[i].disk.full_until > self.now { DiskResult::NoSpace } else { self.disk_result(i) };
        if result == DiskResult::Ok {
            let tags: Vec<(u64, Tag)> = (offset / BLOCK..(offset + len) / BLOCK)
                .enumerate()
                .map(|(k, b)| (b, if data { self.nodes[i].ops[&op].data.get(k).copied().unwrap_or(0) } else { 0 }))
                .collect();
            // Applied now; a crash before completion may still tear it (volatile).
            if self.cfg.verbose {
                let seq = self.nodes[i].ops[&op].request.seq();
                self.log(format!(
                    "{} disk write op {op} seq {seq:#x} offset {offset} len {len} {tags:?}",
                    self.nodes[i].name
                ));
            }
            for (b, t) in tags {
                self.nodes[i].disk.volatile.insert(b, t);
            }
        }
        let d = self.disk_latency(i);
        self.after(d, Ev::DiskDone { node: i, inc, op, result });
    }

    /// I6: an Ok answer to a data request only for the generation promised.
    fn check_reply_generation(&mut self, i: usize, reply: &Reply, _op: OpId) {
        let Reply::Done { seq, .. } = reply else { return };
        let generation = seq >> crate::msg::SEQ_GENERATION_SHIFT;
        let promised = self.nodes[i].replica.as_ref().and_then(|r| r.volume_state(VOLUME_ID)).map_or(0, |v| v.promised);
        if generation != promised {
            self.fail(format!(
                "I6: {} acknowledged a request of generation {generation} while promised {promised}",
                self.nodes[i].name
            ));
        }
    }

    /// Whether node index `n` has been in sync (in etcd) for block `b`'s extent ever since
    /// step `since`.
    fn in_sync_fn(&self, b: u64) -> impl Fn(usize, u64) -> bool + use<> {
        let e = self.extent_of_block(b);
        let names: Vec<String> = self
            .etcd
            .meta
            .as_ref()
            .map(|(m, _)| m.extents[e as usize].in_sync().map(str::to_owned).collect())
            .unwrap_or_default();
        let nodes: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let left: Vec<(usize, u64)> =
            self.left_sync.iter().filter(|((_, x), _)| *x == e).map(|((n, _), s)| (*n, *s)).collect();
        let joined: Vec<(usize, u64)> =
            self.joined_sync.iter().filter(|((_, x), _)| *x == e).map(|((n, _), s)| (*n, *s)).collect();
        // In sync now, and at `since` (it has not joined since), and not out in between.
        move |n: usize, since: u64| {
            nodes.get(n).is_some_and(|name| names.contains(name))
                && !left.iter().any(|(m, s)| *m == n && *s >= since)
                && !joined.iter().any(|(m, s)| *m == n && *s >= since)
        }
    }

    fn index_of(&self, id: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    // ---- owners ------------------------------------------------------------------------------

    fn owner_config(&self, node: &str) -> OwnerConfig {
        let mut c = OwnerConfig::new(node, "vol");
        c.io_timeout = 40 * MS;
        c.promise_timeout = 40 * MS;
        c.probe_interval = 60 * MS;
        c.meta_retry = 15 * MS;
        c.meta_poll = 100 * MS;
        c.nodes_poll = 100 * MS;
        c.clean_after = 60 * MS;
        // Half the seeds keep at most two dirty regions: cleaning then races every write.
        c.dirty_max = if self.cfg.seed.is_multiple_of(2) { 2 } else { 4096 };
        c.replace_after = if self.cfg.replace_after == 0 { Time::MAX / 4 } else { self.cfg.replace_after };
        c.copy_slots = 2;
        c.copy_bytes_per_s = 0;
        c.inline_max = 8192;
        c.piece_max = 4 * BLOCK;
        c
    }

    fn attach(&mut self, i: usize) {
        let instance = self.next_instance;
        self.next_instance += 1;
        let mut cfg = self.owner_config(&self.nodes[i].name.clone());
        // The operator (or the orchestrator restarting the VM) took the volume over from
        // whoever etcd names now: a dead node, or a stale one behind a partition (`--force`).
        cfg.takeover_of = self.etcd.meta.as_ref().and_then(|(m, _)| m.owner.clone());
        let mut sm = Owner::new(cfg);
        sm.plant_bug_ack_early = self.cfg.bug == Some(PlantedBug::AckEarly);
        sm.plant_bug_skip_reconcile = self.cfg.bug == Some(PlantedBug::SkipReconcile);
        let until = self.etcd.lease_expiry[i].saturating_sub(LEASE_MARGIN);
        sm.set_lease(Some(until));
        sm.start(self.now);
        let slots = (0..2).map(|_| vec![0; self.cfg.region_blocks as usize]).collect();
        self.nodes[i].owner = Some(OwnerCtx {
            instance,
            sm,
            guests: BTreeMap::new(),
            slots,
            grants: BTreeMap::new(),
            seq_len: BTreeMap::new(),
            zero_seqs: BTreeMap::new(),
            seq_extent: BTreeMap::new(),
            next_guest: 1,
        });
        self.stats.attaches += 1;
        // A new guest session: what the last one left unflushed is not this one's to flush.
        self.model.new_generation();
        self.log(format!("attach on {} (instance {instance})", self.nodes[i].name));
        self.after(5 * MS, Ev::OwnerTick { node: i, instance });
        self.after(10 * MS, Ev::Guest { node: i, instance });
        self.owner_actions(i);
    }

    fn owner_actions(&mut self, i: usize) {
        loop {
            let Some(owner) = self.nodes[i].owner.as_mut() else { return };
            let Some(action) = owner.sm.poll_action() else { return };
            self.owner_action(i, action);
        }
    }

    fn owner_action(&mut self, i: usize, action: OwnerAction) {
        let Some(owner) = self.nodes[i].owner.as_mut() else { return };
        let instance = owner.instance;
        match action {
            OwnerAction::Send { to, request, data } => {
                let seq = request.seq();
                let len = match &request {
                    Request::Write { len, .. } | Request::Read { len, .. } => u64::from(*len),
                    _ => 0,
                };
                let inline = match &request {
                    Request::Write { inline: true, .. } => Some(self.owner_data(i, data, len)),
                    _ => None,
                };
                let owner = self.nodes[i].owner.as_mut().expect("present");
                if data != DataRef::None {
                    owner.grants.insert(seq, data);
                    owner.seq_len.insert(seq, len);
                }
                if let Request::Write { extent, .. }
                | Request::Discard { extent, .. }
                | Request::WriteZeroes { extent, .. } = &request
                {
                    owner.seq_extent.insert(seq, *extent);
                }
                if let Request::Discard { offset, .. } | Request::WriteZeroes { offset, .. } = &request {
                    // No data to grant; remember which guest request it serves (for the model).
                    let block = offset / BLOCK;
                    let guest = owner
                        .guests
                        .iter()
                        .find(|(_, g)| {
                            matches!(g.op, GuestOp::Discard | GuestOp::WriteZeroes)
                                && g.first_block <= block
                                && block < g.first_block + g.blocks
                        })
                        .map(|(id, _)| *id);
                    if let Some(id) = guest {
                        owner.zero_seqs.insert(seq, id);
                    }
                }
                let Some(to) = self.index_of(to) else { return };
                if self.cfg.verbose {
                    self.log(format!("{} -> {}: {request:?} {data:?}", self.nodes[i].name, self.nodes[to].name));
                }
                self.send(Msg::ToReplica { from: i, to, request, inline });
            }
            OwnerAction::Retire { seq } => {
                owner.grants.remove(&seq);
                owner.zero_seqs.remove(&seq);
                owner.seq_extent.remove(&seq);
                owner.seq_len.remove(&seq);
            }
            OwnerAction::Complete { id, status } => self.guest_completed(i, id, status),

            OwnerAction::ReadMeta => self.etcd_request(i, Who::Owner(instance), EtcdReq::Read),
            OwnerAction::WriteMeta { expect_revision, meta } => self.etcd_request(
                i,
                Who::Owner(instance),
                EtcdReq::Write { expect: expect_revision, meta: Box::new(meta) },
            ),
            OwnerAction::ListNodes => self.etcd_request(i, Who::Owner(instance), EtcdReq::ListNodes),
            OwnerAction::Event(event) => {
                match &event {
                    OwnerEvent::SyncDone { .. } => self.stats.syncs += 1,
                    OwnerEvent::Replacing { .. } => self.stats.replacements += 1,
                    OwnerEvent::WritesMayBeLost { .. } => self.model.loss_declared(),
                    OwnerEvent::MemberFailed { node, reason } => self.check_failure_is_real(node, reason),
                    _ => {}
                }
                self.log(format!("{} owner#{instance}: {event:?}", self.nodes[i].name));
                if let OwnerEvent::Fenced { .. } | OwnerEvent::Detached = event {
                    // Leave the instance in place until its actions are drained; removed below.
                    self.after(0, Ev::OwnerTick { node: i, instance });
                }
            }
        }
    }

    /// The bytes (tags) a data reference names, `len` bytes of them.
    fn owner_data(&self, i: usize, data: DataRef, len: u64) -> Vec<Tag> {
        let Some(owner) = self.nodes[i].owner.as_ref() else { return Vec::new() };
        let blocks = (len / BLOCK) as usize;
        match data {
            DataRef::Guest { id, .. } => owner.guests.get(&id).map_or_else(Vec::new, |g| vec![g.tag; blocks]),
            DataRef::Copy { slot } => owner.slots[slot as usize][..blocks].to_vec(),
            DataRef::None => Vec::new(),
        }
    }

    fn guest_completed(&mut self, i: usize, id: GuestId, status: GuestStatus) {
        let Some(owner) = self.nodes[i].owner.as_mut() else { return };
        let Some(g) = owner.guests.remove(&id) else { return };
        let generation = owner.sm.generation();
        let name = self.nodes[i].name.clone();
        self.log(format!(
            "{name} guest#{id} done {status:?} {:?} tag {} holders {:?}",
            g.op,
            g.tag,
            self.model.writes.get(&g.tag).map(|w| w.holders.clone())
        ));
        if status != GuestStatus::Ok {
            if g.tag != 0 {
                self.model.write_abandoned(g.tag);
            }
            return;
        }
        match g.op {
            GuestOp::Write { .. } | GuestOp::WriteZeroes | GuestOp::Discard => {
                self.check_ack(g.tag, g.first_block, g.blocks, generation);
                self.model.write_acked(g.tag);
            }
            GuestOp::Read => {
                for (k, t) in g.buf.iter().enumerate() {
                    let b = g.first_block + k as u64;
                    let in_sync = self.in_sync_fn(b);
                    let extent = self.extent_of_block(b);
                    if let Err(e) = self.model.read_result(b, extent, *t, false, &in_sync) {
                        self.fail(e);
                        return;
                    }
                }
            }
            GuestOp::Flush => self.model.flush_acked(&g.covers),
        }
    }

    /// I4, I10 and I1 when the guest is told a write is done.
    fn check_ack(&mut self, tag: Tag, first: u64, blocks: u64, _generation: u64) {
        let Some((meta, _)) = self.etcd.meta.clone() else { return };
        let holders = self.model.writes.get(&tag).map(|w| w.holders.clone()).unwrap_or_default();
        let mut extents: BTreeSet<u32> = BTreeSet::new();
        for b in first..first + blocks {
            extents.insert(self.extent_of_block(b));
        }
        for e in extents {
            // The piece in this extent may have been acknowledged earlier, while the extent was
            // still writable (the guest sees the whole write done only now).
            let issued = self.model.writes.get(&tag).map_or(0, |w| w.issued_step);
            let writable_since_issue = self.last_writable.get(&e).is_some_and(|s| *s >= issued);
            if !meta.writable(e) && !writable_since_issue {
                self.fail(format!(
                    "I10: write {tag} acknowledged while extent {e} has {} in sync (min {}) and no recorded acceptance",
                    meta.extents[e as usize].in_sync_count(),
                    meta.min_replicas
                ));
            }
            let blocks_in: Vec<u64> = (first..first + blocks).filter(|b| self.extent_of_block(*b) == e).collect();
            let mut violations = Vec::new();
            for m in meta.extents[e as usize].in_sync() {
                let Some(n) = self.nodes.iter().position(|x| x.name == m) else { continue };
                let acked = holders.keys().any(|((h, _), x)| *h == n && *x == e);
                let node = &self.nodes[n];
                let value = self.model.value_of(tag);
                let shown = |b: &u64| {
                    if node.alive {
                        node.disk.view(*b)
                    } else {
                        node.disk.durable.get(b).copied().unwrap_or(0)
                    }
                };
                let holds = blocks_in.iter().all(|b| shown(b) == value);
                if !acked && !holds {
                    violations.push(format!(
                        "I4: write {tag} acknowledged but in-sync member {m} neither acknowledged nor holds it"
                    ));
                }
                // I1: an in-sync member that acknowledged it in its current life shows it.
                if node.alive
                    && holders.contains_key(&((n, node.incarnation), e))
                    && !blocks_in.iter().all(|b| node.disk.view(*b) == value)
                {
                    violations.push(format!("I1: write {tag} acknowledged, but in-sync {m} does not show it"));
                }
            }
            for v in violations {
                self.fail(v);
            }
        }
    }

    /// The guest: keeps a few requests in flight, never two overlapping ones (as a file system).
    fn guest_step(&mut self, i: usize, instance: u64) {
        let blocks_total = self.volume_blocks();
        let Some(owner) = self.nodes[i].owner.as_ref() else { return };
        if owner.instance != instance
            || !matches!(owner.sm.phase(), Phase::Serving | Phase::Promising | Phase::Claiming | Phase::Loading)
        {
            return;
        }
        let qd = owner.guests.len();
        let stop = self.settling && self.now > self.faults_until + 2_000 * MS;
        if !stop && qd < 4 {
            let roll = self.rng.range(0, 99);
            let op = match roll {
                0..=54 => GuestOp::Write { fua: false },
                55..=84 => GuestOp::Read,
                85..=93 => GuestOp::Flush,
                94..=96 => GuestOp::WriteZeroes,
                _ => GuestOp::Discard,
            };
            let n = self.rng.range(1, 6).min(blocks_total);
            let first = self.rng.range(0, blocks_total - n);
            let owner = self.nodes[i].owner.as_ref().expect("present");
            let overlaps = op != GuestOp::Flush
                && owner
                    .guests
                    .values()
                    .any(|g| g.op != GuestOp::Flush && g.first_block < first + n && first < g.first_block + g.blocks);
            let generation = owner.sm.generation();
            if !overlaps {
                let tag = if matches!(op, GuestOp::Write { .. } | GuestOp::WriteZeroes | GuestOp::Discard) {
                    self.next_tag()
                } else {
                    0
                };
                match op {
                    GuestOp::Write { .. } => self.model.write_issued(tag, first, n, generation, self.step),
                    GuestOp::WriteZeroes | GuestOp::Discard => {
                        self.model.zeroes_issued(tag, first, n, generation, self.step)
                    }
                    _ => {}
                }
                self.submit_guest(i, op, first, n, tag);
            }
        }
        let d = self.rng.range(100, 2_000) * US;
        self.after(d, Ev::Guest { node: i, instance });
    }

    fn next_tag(&mut self) -> Tag {
        self.next_tag += 1;
        self.next_tag
    }

    fn submit_guest(&mut self, i: usize, op: GuestOp, first: u64, n: u64, tag: Tag) {
        let covers = if op == GuestOp::Flush { self.model.unflushed() } else { BTreeSet::new() };
        let now = self.now;
        let owner = self.nodes[i].owner.as_mut().expect("present");
        let id = owner.next_guest;
        owner.next_guest += 1;
        owner.guests.insert(id, GuestCtx { op, first_block: first, blocks: n, tag, buf: vec![0; n as usize], covers });
        let (offset, len) = if op == GuestOp::Flush { (0, 0) } else { (first * BLOCK, n * BLOCK) };
        owner.sm.submit(now, id, op, offset, len);
        self.log(format!("{} guest#{id} {op:?} blocks {first}..{} tag {tag}", self.nodes[i].name, first + n));
        self.owner_actions(i);
    }

    // ---- etcd --------------------------------------------------------------------------------

    fn etcd_request(&mut self, i: usize, who: Who, req: EtcdReq) {
        let d = self.rng.range(50, 1_500) * US;
        if !self.etcd_reachable(i) {
            let answer = self.unavailable(&req);
            self.after(ETCD_TIMEOUT, Ev::EtcdReply { node: i, who, answer });
            return;
        }
        self.after(d, Ev::EtcdAt { node: i, who, req });
    }

    fn unavailable(&self, req: &EtcdReq) -> EtcdAnswer {
        match req {
            EtcdReq::Read | EtcdReq::Write { .. } => EtcdAnswer::Meta(MetaResult::Unavailable),
            EtcdReq::ListNodes => EtcdAnswer::Nodes(None),
            EtcdReq::ReadById => EtcdAnswer::ById(Err(())),
            EtcdReq::Renew { .. } => EtcdAnswer::Renewed(None),
            EtcdReq::AcceptRisk => EtcdAnswer::None,
        }
    }

    fn etcd_process(&mut self, i: usize, who: Who, req: EtcdReq) {
        if !self.etcd_reachable(i) {
            let answer = self.unavailable(&req);
            self.after(ETCD_TIMEOUT, Ev::EtcdReply { node: i, who, answer });
            return;
        }
        let answer = match req {
            EtcdReq::Read => EtcdAnswer::Meta(MetaResult::Read(self.etcd.meta.clone())),
            EtcdReq::ReadById => EtcdAnswer::ById(Ok(self.etcd.meta.clone().map(|(m, _)| m))),
            EtcdReq::ListNodes => {
                let nodes = (0..self.nodes.len())
                    .filter(|n| self.etcd.lease_expiry[*n] > self.now)
                    .map(|n| NodeInfo {
                        name: self.nodes[n].name.clone(),
                        id: self.nodes[n].id,
                        address: String::new(),
                        zone: None,
                        capacity_bytes: 1 << 40,
                        free_bytes: 1 << 40,
                        version: String::new(),
                        started_unix_s: 0,
                    })
                    .collect();
                EtcdAnswer::Nodes(Some(nodes))
            }
            EtcdReq::Renew { sent } => {
                self.etcd.lease_expiry[i] = self.now + LEASE_TTL;
                EtcdAnswer::Renewed(Some(sent + LEASE_TTL))
            }
            EtcdReq::AcceptRisk => {
                if let Some((meta, rev)) = self.etcd.meta.clone() {
                    let mut m = meta;
                    if m.risk_accepted.is_none() {
                        m.risk_accepted =
                            Some(RiskAcceptance { by: "operator".into(), at_unix_s: 0, reason: "simulated".into() });
                        self.etcd.revision += 1;
                        self.etcd.meta = Some((m, self.etcd.revision));
                        self.log(format!("operator accepts the risk (rev {rev} -> {})", self.etcd.revision));
                    }
                }
                EtcdAnswer::None
            }
            EtcdReq::Write { expect, meta } => {
                let current = self.etcd.meta.clone();
                match current {
                    Some((old, rev)) if rev == expect => {
                        self.check_commit(i, &old, &meta);
                        for e in 0..old.extent_count() {
                            if old.writable(e) || meta.writable(e) {
                                self.last_writable.insert(e, self.step);
                            }
                        }
                        for (e, (a, b)) in old.extents.iter().zip(&meta.extents).enumerate() {
                            for m in a.in_sync() {
                                if !b.is_in_sync(m) {
                                    if let Some(n) = self.nodes.iter().position(|x| x.name == m) {
                                        self.left_sync.insert((n, e as u32), self.step);
                                    }
                                }
                            }
                            for m in b.in_sync() {
                                if !a.is_in_sync(m) {
                                    if let Some(n) = self.nodes.iter().position(|x| x.name == m) {
                                        self.joined_sync.insert((n, e as u32), self.step);
                                    }
                                }
                            }
                        }
                        self.etcd.revision += 1;
                        let revision = self.etcd.revision;
                        self.log(format!(
                            "etcd commit by {} rev {revision}: gen {} owner {:?} epoch {} {}",
                            self.nodes[i].name,
                            meta.generation,
                            meta.owner,
                            meta.epoch,
                            describe(&meta)
                        ));
                        self.etcd.meta = Some((*meta, revision));
                        if self.cfg.faults && !self.settling && self.rng.chance(0.03) {
                            // Committed, but the answer is lost.
                            EtcdAnswer::Meta(MetaResult::Unavailable)
                        } else {
                            EtcdAnswer::Meta(MetaResult::Committed { revision })
                        }
                    }
                    other => EtcdAnswer::Meta(MetaResult::Conflict(other)),
                }
            }
        };
        let d = self.rng.range(50, 1_500) * US;
        self.after(d, Ev::EtcdReply { node: i, who, answer });
    }

    /// I5: membership changes only by the current owner, epochs strictly increase.
    fn check_commit(&mut self, i: usize, old: &VolumeMeta, new: &VolumeMeta) {
        let writer = &self.nodes[i].name;
        let claim = new.generation == old.generation + 1 && new.owner.as_deref() == Some(writer.as_str());
        if !claim {
            if new.generation != old.generation || old.owner.as_deref() != Some(writer.as_str()) {
                self.fail(format!(
                    "I5: {writer} changed the volume without owning it (gen {} owner {:?})",
                    old.generation, old.owner
                ));
            }
            if new.extents != old.extents && new.epoch <= old.epoch {
                self.fail(format!("I5: membership changed without a higher epoch ({} -> {})", old.epoch, new.epoch));
            }
        }
    }

    fn etcd_reply(&mut self, i: usize, who: Who, answer: EtcdAnswer) {
        match (who, answer) {
            (Who::Owner(instance), EtcdAnswer::Meta(result)) => {
                let now = self.now;
                let Some(owner) = self.nodes[i].owner.as_mut().filter(|o| o.instance == instance) else { return };
                owner.sm.on_meta(now, result);
                self.owner_actions(i);
            }
            (Who::Owner(instance), EtcdAnswer::Nodes(Some(nodes))) => {
                let now = self.now;
                let Some(owner) = self.nodes[i].owner.as_mut().filter(|o| o.instance == instance) else { return };
                owner.sm.on_nodes(now, nodes);
                self.owner_actions(i);
            }
            (Who::Replica(inc), EtcdAnswer::ById(result)) => {
                if self.nodes[i].incarnation != inc || !self.nodes[i].alive {
                    return;
                }
                if let Some(r) = self.nodes[i].replica.as_mut() {
                    r.on_meta(VOLUME_ID, result);
                }
                self.replica_actions(i);
            }
            (Who::Replica(inc), EtcdAnswer::Renewed(until)) => {
                if self.nodes[i].incarnation != inc || !self.nodes[i].alive {
                    return;
                }
                if let (Some(until), Some(owner)) = (until, self.nodes[i].owner.as_mut()) {
                    owner.sm.set_lease(Some(until - LEASE_MARGIN));
                }
            }
            _ => {}
        }
    }

    // ---- the event loop ----------------------------------------------------------------------

    pub fn run(mut self) -> Result<Outcome, Failure> {
        let end = self.cfg.run_for + self.cfg.settle_for;
        while let Some(Reverse((t, id))) = self.queue.pop() {
            let Some(ev) = self.events.remove(&id) else { continue };
            self.now = t;
            self.step += 1;
            if !self.settling && self.now >= self.cfg.run_for {
                self.settle();
            }
            self.handle(ev);
            if let Some(what) = self.failure.take() {
                return Err(self.failure_report(what));
            }
            if self.settling && self.quiet() {
                break;
            }
            if self.settling && self.now > self.faults_until + 2_500 * MS && self.unrecoverable() {
                self.log("every in-sync member of an extent is lost for good: stopping".into());
                self.stats.unrecoverable = true;
                self.stats.steps = self.step;
                self.stats.sim_time = self.now;
                self.stats.model = self.model.stats.clone();
                return Ok(self.stats);
            }
            if self.now > end {
                return Err(
                    self.failure_report("liveness: the cluster did not become whole and quiet after healing".into())
                );
            }
        }
        if let Err(what) = self.final_checks() {
            return Err(self.failure_report(what));
        }
        if self.cfg.power_loss {
            if let Err(what) = self.power_loss() {
                return Err(self.failure_report(what));
            }
        }
        self.stats.steps = self.step;
        self.stats.sim_time = self.now;
        self.stats.model = self.model.stats.clone();
        Ok(self.stats)
    }

    fn failure_report(&self, what: String) -> Failure {
        let mut trace: Vec<String> = self.trace.iter().cloned().collect();
        trace.push(format!(
            "etcd: {}",
            self.etcd.meta.as_ref().map_or_else(
                || "-".into(),
                |(m, r)| format!("rev {r} gen {} owner {:?} epoch {} {}", m.generation, m.owner, m.epoch, describe(m))
            )
        ));
        for n in &self.nodes {
            let owner = n.owner.as_ref().map_or_else(String::new, |o| {
                format!(
                    " owner#{} {:?} guests {} unreconciled {} syncs {:?} suspended {:?}",
                    o.instance,
                    o.sm.phase(),
                    o.guests.len(),
                    o.sm.unreconciled_regions(),
                    o.sm.sync_progress()
                        .iter()
                        .map(|p| (p.node.clone(), p.extent, p.regions_done, p.regions_total))
                        .collect::<Vec<_>>(),
                    o.sm.suspended_extents()
                )
            });
            trace.push(format!(
                "{}: alive {} lost {} inc {} ops {}{owner}",
                n.name,
                n.alive,
                n.lost,
                n.incarnation,
                n.ops.len()
            ));
            if let Some(o) = &n.owner {
                for line in o.sm.describe_pending() {
                    trace.push(format!("    {line}"));
                }
            }
        }
        Failure { seed: self.cfg.seed, step: self.step, time: self.now, what, trace }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Net(msg) => self.deliver(msg),
            Ev::DiskDone { node, inc, op, result } => {
                if !self.live(node, inc) {
                    return;
                }
                let is_flush =
                    self.nodes[node].ops.get(&op).is_some_and(|o| matches!(o.request, Request::Flush { .. }));
                if is_flush {
                    let disk = &mut self.nodes[node].disk;
                    let v = std::mem::take(&mut disk.volatile);
                    disk.durable.extend(v);
                }
                if let Some(r) = self.nodes[node].replica.as_mut() {
                    r.on_disk(op, result);
                }
                self.replica_actions(node);
            }
            Ev::Persisted { node, inc, volume, version, record, result } => {
                if !self.live(node, inc) {
                    return;
                }
                match result {
                    DiskResult::Ok => {
                        self.nodes[node].disk.record = Some(record);
                        if let Some(r) = self.nodes[node].replica.as_mut() {
                            r.on_persisted(volume, version);
                        }
                    }
                    DiskResult::NoSpace => {
                        self.log(format!("{}: state record refused, disk full", self.nodes[node].name));
                        if let Some(r) = self.nodes[node].replica.as_mut() {
                            r.on_persist_failed(volume, result);
                        }
                    }
                    DiskResult::IoError => {
                        self.log(format!("{}: state record write failed: the daemon stops", self.nodes[node].name));
                        self.crash(node);
                        let d = self.rng.range(50, 600) * MS;
                        self.after(d, Ev::Restart { node });
                        return;
                    }
                }
                self.replica_actions(node);
            }
            Ev::EtcdAt { node, who, req } => {
                if !self.nodes[node].alive {
                    return;
                }
                self.etcd_process(node, who, req);
            }
            Ev::EtcdReply { node, who, answer } => {
                if self.nodes[node].alive {
                    self.etcd_reply(node, who, answer);
                }
            }
            Ev::OwnerTick { node, instance } => {
                let now = self.now;
                let Some(owner) = self.nodes[node].owner.as_mut().filter(|o| o.instance == instance) else { return };
                if matches!(owner.sm.phase(), Phase::Fenced(_) | Phase::Detached) {
                    let abandoned: Vec<Tag> = owner.guests.values().filter(|g| g.tag != 0).map(|g| g.tag).collect();
                    for t in abandoned {
                        self.model.write_abandoned(t);
                    }
                    self.nodes[node].owner = None;
                    return;
                }
                owner.sm.tick(now);
                self.owner_actions(node);
                self.after(5 * MS, Ev::OwnerTick { node, instance });
            }
            Ev::Guest { node, instance } => self.guest_step(node, instance),
            Ev::Renew { node, inc } => {
                if !self.live(node, inc) {
                    return;
                }
                let sent = self.now;
                self.etcd_request(node, Who::Replica(inc), EtcdReq::Renew { sent });
                self.after(LEASE_RENEW, Ev::Renew { node, inc });
            }
            Ev::Layout { node, inc } => {
                if !self.live(node, inc) {
                    return;
                }
                if self.etcd_reachable(node) {
                    let meta = self.etcd.meta.clone().map(|(m, _)| m);
                    if let Some(r) = self.nodes[node].replica.as_mut() {
                        r.on_layout(VOLUME_ID, meta.as_ref());
                    }
                    self.replica_actions(node);
                }
                self.after(200 * MS, Ev::Layout { node, inc });
            }
            Ev::Restart { node } => self.restart(node),
            Ev::TransferTimeout { node, inc, op, pull } => {
                if !self.live(node, inc) || !self.nodes[node].ops.contains_key(&op) {
                    return;
                }
                if let Some(r) = self.nodes[node].replica.as_mut() {
                    if pull {
                        r.on_pulled(op, false);
                    } else {
                        r.on_pushed(op, false);
                    }
                }
                self.replica_actions(node);
            }
            Ev::Fault => self.fault(),
            Ev::Heal { what } => self.heal(what),
            Ev::Orchestrate => self.orchestrate(),
        }
    }

    fn live(&self, node: usize, inc: u64) -> bool {
        self.nodes[node].alive && self.nodes[node].incarnation == inc
    }

    fn deliver(&mut self, msg: Msg) {
        let (a, b) = msg.ends();
        if !self.reachable(a, b) {
            return;
        }
        let now = self.now;
        match msg {
            Msg::ToReplica { from, to, request, inline } => {
                if !self.nodes[to].alive {
                    return;
                }
                let from_id = self.nodes[from].id;
                let node = &mut self.nodes[to];
                let op = node.next_op;
                node.next_op += 1;
                node.ops.insert(op, ROp { from: from_id, request: request.clone(), data: inline.unwrap_or_default() });
                if let Some(r) = self.nodes[to].replica.as_mut() {
                    r.on_request(op, from_id, request);
                }
                self.replica_actions(to);
            }
            Msg::ToOwner { from, from_inc, to, reply } => {
                if !self.nodes[to].alive {
                    return;
                }
                let from_id = self.nodes[from].id;
                if let Some(owner) = self.nodes[to].owner.as_mut() {
                    if let Reply::Done { seq, status: Status::Ok } = &reply {
                        let guest = match owner.grants.get(seq) {
                            Some(DataRef::Guest { id, .. }) => Some(*id),
                            _ => owner.zero_seqs.get(seq).copied(),
                        };
                        if let Some(id) = guest.as_ref() {
                            if let Some(g) = owner.guests.get(id).filter(|g| g.tag != 0) {
                                let tag = g.tag;
                                let extent = owner.seq_extent.get(seq).copied().unwrap_or(0);
                                self.model.holder_acked(tag, (from, from_inc), extent, self.step);
                            }
                        }
                    }
                    let owner = self.nodes[to].owner.as_mut().expect("present");
                    owner.sm.on_reply(now, from_id, reply);
                    self.owner_actions(to);
                }
            }
            Msg::PullReq { replica, inc, op, owner, seq, len } => {
                let data = self.nodes[owner]
                    .alive
                    .then(|| self.nodes[owner].owner.as_ref())
                    .flatten()
                    .and_then(|o| o.grants.get(&seq).copied());
                let data = data.map(|d| self.owner_data(owner, d, len));
                self.send(Msg::PullResp { to: replica, inc, op, data });
            }
            Msg::PullResp { to, inc, op, data } => {
                if !self.live(to, inc) {
                    return;
                }
                let ok = data.is_some();
                if let (Some(data), Some(rop)) = (data, self.nodes[to].ops.get_mut(&op)) {
                    rop.data = data;
                }
                if let Some(r) = self.nodes[to].replica.as_mut() {
                    r.on_pulled(op, ok);
                }
                self.replica_actions(to);
            }
            Msg::PushReq { replica, inc, op, owner, seq, data } => {
                let mut ok = false;
                if self.nodes[owner].alive {
                    if let Some(o) = self.nodes[owner].owner.as_mut() {
                        match o.grants.get(&seq).copied() {
                            Some(DataRef::Guest { id, offset }) => {
                                if let Some(g) = o.guests.get_mut(&id) {
                                    let at = (offset / BLOCK) as usize;
                                    for (k, t) in data.iter().enumerate() {
                                        if let Some(slot) = g.buf.get_mut(at + k) {
                                            *slot = *t;
                                        }
                                    }
                                    ok = true;
                                }
                            }
                            Some(DataRef::Copy { slot }) => {
                                let buf = &mut o.slots[slot as usize];
                                for (k, t) in data.iter().enumerate() {
                                    if let Some(s) = buf.get_mut(k) {
                                        *s = *t;
                                    }
                                }
                                ok = true;
                            }
                            _ => {}
                        }
                    }
                }
                self.send(Msg::PushResp { to: replica, inc, op, ok });
            }
            Msg::PushResp { to, inc, op, ok } => {
                if !self.live(to, inc) {
                    return;
                }
                if let Some(r) = self.nodes[to].replica.as_mut() {
                    r.on_pushed(op, ok);
                }
                self.replica_actions(to);
            }
        }
    }

    /// Liveness: once the cluster has healed (no fault for a while, every message fast, every
    /// disk well), a member that is up and was not restarted lately answers within the
    /// timeouts; failing it anyway ("timed out") would drop a healthy replica and, with two,
    /// suspend the volume.
    fn check_failure_is_real(&mut self, node: &str, reason: &str) {
        let owner = self.owner_config("check");
        let quiet_for = owner.io_timeout + owner.promise_timeout + owner.probe_interval;
        let Some(n) = self.nodes.iter().find(|x| x.name == node) else { return };
        let healed = self.settling && self.now > self.faults_until + 1_000 * MS;
        if healed && reason == "timed out" && n.alive && n.started_at + quiet_for < self.now {
            self.failure = Some(format!(
                "liveness: {node} failed ({reason}) in a healed cluster, up since t={} ms",
                n.started_at / MS
            ));
        }
    }

    // ---- faults ------------------------------------------------------------------------------

    fn crash(&mut self, i: usize) {
        let inc = self.nodes[i].incarnation;
        self.model.crash((i, inc));
        self.stats.crashes += 1;
        let node = &mut self.nodes[i];
        node.alive = false;
        node.replica = None;
        node.ops.clear();
        // Whatever was not flushed survives or not, block by block.
        let volatile = std::mem::take(&mut node.disk.volatile);
        for (b, t) in volatile {
            if self.rng.chance(0.5) {
                self.nodes[i].disk.durable.insert(b, t);
            }
        }
        if let Some(owner) = self.nodes[i].owner.take() {
            for g in owner.guests.values().filter(|g| g.tag != 0) {
                self.model.write_abandoned(g.tag);
            }
        }
        self.log(format!("CRASH {} (incarnation {inc})", self.nodes[i].name));
    }

    fn restart(&mut self, i: usize) {
        if self.nodes[i].alive || self.nodes[i].lost {
            return;
        }
        let node = &mut self.nodes[i];
        node.alive = true;
        node.incarnation += 1;
        self.log(format!("restart {} (incarnation {})", self.nodes[i].name, self.nodes[i].incarnation));
        self.start_replica(i);
    }

    fn fault(&mut self) {
        if self.settling {
            return;
        }
        let n = self.nodes.len();
        let i = self.rng.range(0, n as u64 - 1) as usize;
        let roll = self.rng.range(0, 99);
        match roll {
            0..=17 if self.nodes[i].alive => {
                {
                    self.crash(i);
                    // Lost for good only where every extent keeps another in-sync member:
                    // losing the last copy of data is not something the protocol can repair.
                    let name = self.nodes[i].name.clone();
                    let last_copy = self.etcd.meta.as_ref().is_some_and(|(m, _)| {
                        m.extents.iter().any(|e| {
                            e.is_in_sync(&name)
                                && !e.in_sync().any(|o| o != name && self.nodes.iter().any(|x| x.name == o && !x.lost))
                        })
                    });
                    let lose = self.cfg.replace_after > 0
                        && !last_copy
                        && !self.nodes.iter().any(|x| x.lost)
                        && self.rng.chance(0.25);
                    if lose {
                        self.nodes[i].lost = true;
                        self.log(format!("{} is lost for good", self.nodes[i].name));
                    } else {
                        let d = self.rng.range(20, 600) * MS;
                        self.after(d, Ev::Restart { node: i });
                    }
                }
            }
            18..=37 => {
                let d = self.rng.range(20, 800) * MS;
                self.nodes[i].isolated_until = self.now + d;
                self.log(format!("isolate {} for {} ms", self.nodes[i].name, d / MS));
                self.after(d, Ev::Heal { what: Heal::Isolation(i) });
            }
            38..=52 => {
                let j = self.rng.range(0, n as u64 - 1) as usize;
                if i != j {
                    let pair = (i.min(j), i.max(j));
                    self.cuts.insert(pair);
                    let d = self.rng.range(20, 500) * MS;
                    self.log(format!("cut {}-{} for {} ms", self.nodes[pair.0].name, self.nodes[pair.1].name, d / MS));
                    self.after(d, Ev::Heal { what: Heal::Cut(pair.0, pair.1) });
                }
            }
            53..=62 => {
                self.etcd.cut.insert(i);
                let d = self.rng.range(20, 400) * MS;
                self.log(format!("etcd unreachable from {} for {} ms", self.nodes[i].name, d / MS));
                self.after(d, Ev::Heal { what: Heal::EtcdFor(i) });
            }
            63..=69 => {
                let d = self.rng.range(20, 300) * MS;
                self.nodes[i].disk.slow_until = self.now + d;
                self.log(format!("slow disk on {} for {} ms", self.nodes[i].name, d / MS));
            }
            70..=74 => {
                let d = self.rng.range(5, 100) * MS;
                self.nodes[i].disk.failing_until = self.now + d;
                self.log(format!("failing disk on {} for {} ms", self.nodes[i].name, d / MS));
            }
            75..=77 => {
                let d = self.rng.range(20, 300) * MS;
                self.nodes[i].disk.full_until = self.now + d;
                self.log(format!("full disk on {} for {} ms", self.nodes[i].name, d / MS));
            }
            78..=85 => {
                // The VM moves: detach where it runs; the orchestrator attaches it elsewhere.
                if let Some(o) = self.nodes.iter().position(|x| x.owner.is_some()) {
                    let now = self.now;
                    let owner = self.nodes[o].owner.as_mut().expect("present");
                    owner.sm.detach(now);
                    self.log(format!("detach requested on {}", self.nodes[o].name));
                    self.owner_actions(o);
                }
            }
            86..=91 => {
                // The owner's node dies; the VM restarts elsewhere once its lease ran out.
                if let Some(o) = self.nodes.iter().position(|x| x.owner.is_some() && x.alive) {
                    self.crash(o);
                    let d = self.rng.range(50, 600) * MS;
                    self.after(d, Ev::Restart { node: o });
                }
            }
            92..=95 => {
                let suspended =
                    self.nodes.iter().filter_map(|x| x.owner.as_ref()).any(|o| !o.sm.suspended_extents().is_empty());
                if suspended {
                    let via = (0..n).find(|x| self.etcd_reachable(*x)).unwrap_or(0);
                    self.etcd_request(via, Who::Replica(0), EtcdReq::AcceptRisk);
                }
            }
            _ => {}
        }
        let d = self.rng.range(30, 300) * MS;
        self.after(d, Ev::Fault);
    }

    fn heal(&mut self, what: Heal) {
        match what {
            Heal::Isolation(i) => {
                if self.nodes[i].isolated_until <= self.now {
                    self.log(format!("{} reconnected", self.nodes[i].name));
                }
            }
            Heal::Cut(a, b) => {
                self.cuts.remove(&(a, b));
            }
            Heal::EtcdFor(i) => {
                self.etcd.cut.remove(&i);
            }
        }
    }

    /// Attaches the volume when nobody serves it and the last owner's lease ran out.
    fn orchestrate(&mut self) {
        self.after(20 * MS, Ev::Orchestrate);
        let running = self.nodes.iter().any(|n| {
            n.alive && n.owner.as_ref().is_some_and(|o| !matches!(o.sm.phase(), Phase::Fenced(_) | Phase::Detached))
        });
        if running {
            return;
        }
        let Some((meta, _)) = self.etcd.meta.clone() else { return };
        let free = match &meta.owner {
            None => true,
            Some(owner) => {
                let o = self.nodes.iter().position(|n| &n.name == owner).unwrap_or(0);
                self.etcd.lease_expiry[o] <= self.now
            }
        };
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i].alive
                    && self.nodes[i].owner.is_none()
                    && self.etcd_reachable(i)
                    && (free || meta.owner.as_deref() == Some(self.nodes[i].name.as_str()))
            })
            .collect();
        if let Some(&i) = self.rng.pick(&candidates) {
            self.attach(i);
        }
    }

    // ---- the end -----------------------------------------------------------------------------

    fn settle(&mut self) {
        self.settling = true;
        self.log("SETTLE: faults stop, everything heals".into());
        self.cuts.clear();
        self.etcd.cut.clear();
        for i in 0..self.nodes.len() {
            self.nodes[i].isolated_until = 0;
            let disk = &mut self.nodes[i].disk;
            disk.slow_until = 0;
            disk.failing_until = 0;
            disk.full_until = 0;
            if !self.nodes[i].alive && !self.nodes[i].lost {
                self.restart(i);
            }
        }
    }

    fn unrecoverable(&self) -> bool {
        let Some((meta, _)) = &self.etcd.meta else { return false };
        meta.extents.iter().any(|e| e.in_sync().all(|m| self.nodes.iter().any(|n| n.name == m && n.lost)))
    }

    /// Settled: an owner serves, the guest is idle, every extent whole (or as whole as the
    /// nodes left allow), nothing to resync or reconcile, no replica busy.
    fn quiet(&self) -> bool {
        if self.now < self.faults_until + 2_500 * MS {
            return false;
        }
        let Some((meta, _)) = &self.etcd.meta else { return false };
        let Some(owner) = self.nodes.iter().filter(|n| n.alive).find_map(|n| n.owner.as_ref()) else { return false };
        if *owner.sm.phase() != Phase::Serving
            || !owner.guests.is_empty()
            || owner.sm.unreconciled_regions() != 0
            || !owner.sm.sync_progress().is_empty()
        {
            return false;
        }
        if !meta.extents.iter().all(|e| e.members.iter().all(|m| m.state == MemberState::InSync)) {
            return false;
        }
        if meta.extents.iter().any(|e| e.members.iter().any(|m| self.nodes.iter().any(|n| n.name == m.node && n.lost)))
        {
            return false;
        }
        self.nodes.iter().all(|n| n.ops.is_empty())
    }

    /// I7 and I1 once quiet: in-sync replicas identical, every block as the guest may expect.
    fn final_checks(&mut self) -> Result<(), String> {
        let Some((meta, _)) = self.etcd.meta.clone() else { return Err("no volume".into()) };
        for b in 0..self.volume_blocks() {
            let e = self.extent_of_block(b) as usize;
            let in_sync = self.in_sync_fn(b);
            let allowed = self.model.allowed(b, e as u32, &in_sync);
            let mut seen: Option<(String, Tag)> = None;
            for m in meta.extents[e].in_sync() {
                let n = self.nodes.iter().position(|x| x.name == m).ok_or("unknown member")?;
                let t = self.nodes[n].disk.view(b);
                if !allowed.contains(&t) {
                    return Err(format!("I1: block {b} on in-sync {m} is write {t}, allowed {allowed:?}"));
                }
                if let Some((other, ot)) = &seen {
                    if *ot != t {
                        return Err(format!("I7: block {b} differs between in-sync {other} ({ot}) and {m} ({t})"));
                    }
                }
                seen = Some((m.to_owned(), t));
            }
        }
        Ok(())
    }

    /// I2: every node loses power at once; what was flushed must be there after recovery.
    fn power_loss(&mut self) -> Result<(), String> {
        self.log("POWER LOSS of every node".into());
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive {
                self.crash(i);
            }
        }
        self.faults_until = self.now;
        for i in 0..self.nodes.len() {
            self.restart(i);
        }
        let deadline = self.now + self.cfg.settle_for;
        while let Some(Reverse((t, id))) = self.queue.pop() {
            let Some(ev) = self.events.remove(&id) else { continue };
            self.now = t;
            self.step += 1;
            self.handle(ev);
            if let Some(what) = self.failure.take() {
                return Err(what);
            }
            if self.quiet() {
                return self.final_checks();
            }
            if self.now > deadline {
                return Err("liveness: no recovery after the power loss".into());
            }
        }
        Err("simulation ran out of events".into())
    }
}

fn describe(meta: &VolumeMeta) -> String {
    meta.extents
        .iter()
        .map(|e| {
            e.members
                .iter()
                .map(|m| {
                    let s = match m.state {
                        MemberState::InSync => "",
                        MemberState::Stale => "~",
                        MemberState::Rebuilding => "+",
                    };
                    if m.incarnation == 0 {
                        format!("{s}{}", m.node)
                    } else {
                        format!("{s}{}@{}", m.node, m.incarnation)
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect::<Vec<_>>()
        .join(" | ")
        + if meta.risk_accepted.is_some() { " (risk accepted)" } else { "" }
}

/// Runs one seed with its drawn configuration.
pub fn run_seed(seed: u64, bug: Option<PlantedBug>, verbose: bool) -> Result<Outcome, Failure> {
    let mut cfg = SimConfig::from_seed(seed);
    cfg.bug = bug;
    cfg.verbose = verbose;
    Sim::new(cfg).run()
}
