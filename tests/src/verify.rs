//! The verifying client: an independent vhost-user-blk frontend (libblkio's
//! `virtio-blk-vhost-user` driver, as in the benchmark) that writes self-describing blocks,
//! remembers which writes completed, and later reads everything back to check that every
//! acknowledged write is there.
//!
//! # Blocks
//!
//! Every 4 KiB block written carries who wrote it, where, and when:
//!
//! ```text
//!  0          8        16         24        32         40                              4096
//!  +----------+--------+----------+---------+----------+-------------------------------+
//!  | HCBLKVF1 | seed   | block    | seq     | checksum | payload: xorshift(seed,block, |
//!  |  magic   | client | index    | write # | FNV-1a64 |   seq), 4056 bytes            |
//!  +----------+--------+----------+---------+----------+-------------------------------+
//! ```
//!
//! `seed` names the client (each [`Workload`] has its own), `seq` the write (a per-workload
//! counter from 1), the checksum covers bytes 0..32 and 40..4096. A block read back is either
//! all zeros (never written), or a write whose header, checksum and payload all agree with its
//! (seed, block, seq) — anything else (torn, misplaced, corrupted) is reported as such.
//!
//! # Ledger
//!
//! A workload never has two writes to one block in flight, so per block the [`Ledger`] knows
//! the last write that completed successfully and the writes whose outcome is unknown (they
//! failed, or were still in flight when the workload stopped): after those the block may hold
//! the last completed one or any later unknown one. [`verify`] checks every block against the
//! ledgers of every client that wrote the volume, oldest first: the newest ledger that
//! completed a write to a block decides it.
//!
//! # Stalls
//!
//! "The guest sees a stall, never an I/O error": the workload measures the gaps between
//! consecutive completions while requests are outstanding ([`WorkloadReport::longest_gap`],
//! and every gap above [`WorkloadConfig::gap_report`]) and fails only if nothing completes
//! for [`WorkloadConfig::stall_limit`]. A request that completes with an error is recorded
//! ([`WorkloadReport::errors`]); whether that fails the test is the test's call.

use anyhow::{bail, ensure, Context, Result};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes per self-describing block.
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"HCBLKVF1";
const HEADER: usize = 40;
/// Blocks per read while verifying (1 MiB).
const VERIFY_CHUNK_BLOCKS: u64 = 256;
/// How long one read of [`verify`] may take before the verification fails.
const VERIFY_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Mismatches described in a report; the rest are counted.
const MISMATCHES_KEPT: usize = 32;
/// Errors described in a report; the rest are counted.
const ERRORS_KEPT: usize = 32;

// --- the block format -------------------------------------------------------------------

fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn checksum(block: &[u8]) -> u64 {
    fnv1a(fnv1a(0xcbf2_9ce4_8422_2325, &block[..32]), &block[HEADER..BLOCK])
}

fn payload_seed(seed: u64, block: u64, seq: u64) -> u64 {
    let mut x = seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    // splitmix64 finaliser, so that neighbouring (block, seq) pairs share nothing.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) | 1
}

fn fill_payload(out: &mut [u8], seed: u64, block: u64, seq: u64) {
    let mut x = payload_seed(seed, block, seq);
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Writes the block `(seed, block, seq)` into `out` (exactly [`BLOCK`] bytes).
pub fn fill_block(out: &mut [u8], seed: u64, block: u64, seq: u64) {
    assert_eq!(out.len(), BLOCK, "a block is {BLOCK} bytes");
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seed.to_le_bytes());
    out[16..24].copy_from_slice(&block.to_le_bytes());
    out[24..32].copy_from_slice(&seq.to_le_bytes());
    fill_payload(&mut out[HEADER..], seed, block, seq);
    let sum = checksum(out);
    out[32..40].copy_from_slice(&sum.to_le_bytes());
}

/// What a block read back holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// All zeros: never written.
    Zero,
    /// An intact write of client `seed`, number `seq`.
    Write { seed: u64, seq: u64 },
    /// Neither: torn, misplaced or corrupted; the reason says which.
    Corrupt(String),
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Observed::Zero => write!(f, "zeros"),
            Observed::Write { seed, seq } => write!(f, "write {seq} of client {seed:#x}"),
            Observed::Corrupt(why) => write!(f, "garbage ({why})"),
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Classifies block `index` as read back (`data`: [`BLOCK`] bytes).
pub fn inspect_block(data: &[u8], index: u64) -> Observed {
    if data.len() != BLOCK {
        return Observed::Corrupt(format!("{} bytes, not {BLOCK}", data.len()));
    }
    if data.iter().all(|&b| b == 0) {
        return Observed::Zero;
    }
    if &data[..8] != MAGIC {
        return Observed::Corrupt(format!("no block header (first bytes {:02x?})", &data[..8]));
    }
    let (seed, block, seq) = (u64_at(data, 8), u64_at(data, 16), u64_at(data, 24));
    if block != index {
        return Observed::Corrupt(format!("misplaced: holds block {block} (write {seq} of client {seed:#x})"));
    }
    if u64_at(data, 32) != checksum(data) {
        return Observed::Corrupt(format!("checksum mismatch: torn or damaged write {seq} of client {seed:#x}"));
    }
    let mut expect = vec![0u8; BLOCK - HEADER];
    fill_payload(&mut expect, seed, block, seq);
    if let Some(at) = expect.iter().zip(&data[HEADER..]).position(|(a, b)| a != b) {
        return Observed::Corrupt(format!(
            "payload of write {seq} of client {seed:#x} differs at byte {}",
            HEADER + at
        ));
    }
    Observed::Write { seed, seq }
}

// --- the ledger ---------------------------------------------------------------------------

/// What one client knows about the blocks it wrote.
#[derive(Clone, Debug)]
pub struct Ledger {
    pub seed: u64,
    /// First block of the client's range, and its length in blocks.
    pub first_block: u64,
    pub blocks: u64,
    /// Per block of the range: the last write that completed successfully (0: none).
    done: Vec<u64>,
    /// Writes with an unknown outcome, per block: failed, or in flight at the end.
    uncertain: HashMap<u64, Vec<u64>>,
}

impl Ledger {
    pub fn new(seed: u64, first_block: u64, blocks: u64) -> Self {
        Self { seed, first_block, blocks, done: vec![0; blocks as usize], uncertain: HashMap::new() }
    }

    fn slot(&self, block: u64) -> Option<usize> {
        block.checked_sub(self.first_block).filter(|&i| i < self.blocks).map(|i| i as usize)
    }

    /// Write `seq` to `block` completed successfully.
    pub fn completed(&mut self, block: u64, seq: u64) {
        if let Some(i) = self.slot(block) {
            // A completion supersedes what was uncertain before it on this block: the
            // workload issues the next write to a block only after the previous one ended.
            self.uncertain.remove(&block);
            self.done[i] = self.done[i].max(seq);
        }
    }

    /// Write `seq` to `block` failed or did not finish: the block may or may not hold it.
    pub fn unknown(&mut self, block: u64, seq: u64) {
        if self.slot(block).is_some() {
            self.uncertain.entry(block).or_default().push(seq);
        }
    }

    /// The last completed write to `block` (0: none) and the unknown ones after it.
    pub fn state(&self, block: u64) -> Option<(u64, &[u64])> {
        let i = self.slot(block)?;
        let unknown = self.uncertain.get(&block).map(Vec::as_slice).unwrap_or(&[]);
        Some((self.done[i], unknown))
    }

    /// A copy without the unknown outcomes of writes numbered above `seq`: for a client whose
    /// later writes must not have landed anywhere (an old owner cut off from every replica
    /// before it started them), so that finding one of them is a failure.
    pub fn forget_unknown_after(&self, seq: u64) -> Ledger {
        let mut l = self.clone();
        for v in l.uncertain.values_mut() {
            v.retain(|&s| s <= seq);
        }
        l.uncertain.retain(|_, v| !v.is_empty());
        l
    }

    /// Blocks with a completed write.
    pub fn written_blocks(&self) -> u64 {
        self.done.iter().filter(|&&s| s != 0).count() as u64
    }

    /// Writes whose outcome is unknown.
    pub fn unknown_writes(&self) -> usize {
        self.uncertain.values().map(Vec::len).sum()
    }
}

/// What block `block` may hold after `ledgers` (oldest first) wrote the volume, which held
/// `initial` before.
pub fn acceptable(ledgers: &[&Ledger], block: u64, initial: &Observed) -> Vec<Observed> {
    let mut ok = vec![initial.clone()];
    for l in ledgers {
        let Some((done, unknown)) = l.state(block) else { continue };
        let unknown = unknown.iter().map(|&seq| Observed::Write { seed: l.seed, seq });
        if done != 0 {
            ok = vec![Observed::Write { seed: l.seed, seq: done }];
        }
        ok.extend(unknown);
    }
    ok
}

// --- the client ---------------------------------------------------------------------------

/// A libblkio vhost-user-blk client with one (interrupt-driven, not polled) queue and a
/// buffer region of `slots` × `slot_bytes`.
pub struct BlkClient {
    // Field order: the queue must be dropped before the driver, which is kept only to be
    // dropped after it.
    queue: Blkioq,
    _driver: Blkio,
    region: MemoryRegion,
    slot_bytes: usize,
    slots: usize,
    capacity: u64,
    socket: PathBuf,
}

impl std::fmt::Debug for BlkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkClient").field("socket", &self.socket).field("capacity", &self.capacity).finish()
    }
}

impl BlkClient {
    /// Connects to the export at `socket`; retries for up to 10 s while the socket is not
    /// there yet or refuses (an export just attached).
    pub fn connect(socket: &Path, slots: usize, slot_bytes: usize) -> Result<Self> {
        ensure!(
            slots > 0 && slot_bytes > 0 && slot_bytes.is_multiple_of(BLOCK),
            "bad client geometry {slots} x {slot_bytes}"
        );
        let path = socket.to_str().context("socket path is not UTF-8")?;
        let start = Instant::now();
        let mut blkio = loop {
            let mut b =
                Blkio::new("virtio-blk-vhost-user").map_err(|e| anyhow::anyhow!("libblkio driver: {}", e.message()))?;
            b.set_str("path", path).map_err(|e| anyhow::anyhow!("set path: {}", e.message()))?;
            b.set_bool("read-only", false).map_err(|e| anyhow::anyhow!("set read-only: {}", e.message()))?;
            match b.connect() {
                Ok(()) => break b,
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => bail!("connect to {}: {}", socket.display(), e.message()),
            }
        };
        blkio.set_i32("num-queues", 1).map_err(|e| anyhow::anyhow!("num-queues: {}", e.message()))?;
        let capacity = blkio.get_u64("capacity").map_err(|e| anyhow::anyhow!("capacity: {}", e.message()))?;
        let started = blkio.start().map_err(|e| anyhow::anyhow!("start {}: {}", socket.display(), e.message()))?;
        let queue = started.queues.into_iter().next().context("libblkio returned no queue")?;
        let align =
            blkio.get_u64("mem-region-alignment").map_err(|e| anyhow::anyhow!("{}", e.message()))?.max(4096) as usize;
        let len = (slots * slot_bytes).div_ceil(align) * align;
        let region = blkio.alloc_mem_region(len).map_err(|e| anyhow::anyhow!("alloc_mem_region: {}", e.message()))?;
        blkio.map_mem_region(&region).map_err(|e| anyhow::anyhow!("map_mem_region: {}", e.message()))?;
        Ok(Self { queue, _driver: blkio, region, slot_bytes, slots, capacity, socket: socket.to_owned() })
    }

    /// Device size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn slot_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots);
        (self.region.addr + slot * self.slot_bytes) as *mut u8
    }

    /// Slot `slot`'s buffer. The caller must not touch a slot with a request in flight.
    fn slot_mut(&mut self, slot: usize) -> &mut [u8] {
        // SAFETY: the region is mapped read-write for `slots * slot_bytes` bytes, owned by
        // this client, and `&mut self` plus the workload's one-request-per-slot rule mean no
        // other reference and no in-flight request covers this slot.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), self.slot_bytes) }
    }

    fn submit_write(&mut self, slot: usize, offset: u64, len: usize) {
        let p = self.slot_ptr(slot);
        self.queue.write(offset, p, len, slot, ReqFlags::empty());
    }

    fn submit_read(&mut self, slot: usize, offset: u64, len: usize) {
        let p = self.slot_ptr(slot);
        self.queue.read(offset, p, len, slot, ReqFlags::empty());
    }

    fn submit_flush(&mut self, slot: usize) {
        self.queue.flush(slot, ReqFlags::empty());
    }

    /// Waits up to `timeout` for at least one completion; returns (slot, ret) pairs.
    fn wait(&mut self, timeout: Duration, out: &mut Vec<(usize, i32)>) -> Result<()> {
        let mut comps: Vec<MaybeUninit<Completion>> = (0..self.slots).map(|_| MaybeUninit::uninit()).collect();
        let mut t = timeout;
        let n = match self.queue.do_io(&mut comps, 1, Some(&mut t), None) {
            Ok(n) => n,
            // A timeout is not an error here: the caller measures stalls.
            Err(e) if e.errno() == blkio::Errno::TIME => 0,
            Err(e) => bail!("do_io on {}: {}", self.socket.display(), e.message()),
        };
        for c in &comps[..n.min(self.slots)] {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_ref() };
            out.push((c.user_data, c.ret));
        }
        Ok(())
    }

    /// One synchronous read of `len` bytes (at most one slot) at `offset` into slot 0.
    pub fn read_sync(&mut self, offset: u64, len: usize, timeout: Duration) -> Result<Vec<u8>> {
        ensure!(len <= self.slot_bytes, "read of {len} bytes exceeds the slot size {}", self.slot_bytes);
        self.submit_read(0, offset, len);
        let mut got = Vec::new();
        let start = Instant::now();
        while got.is_empty() {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                bail!("read of {len} bytes at {offset} did not complete within {timeout:?}");
            }
            self.wait(left.min(Duration::from_secs(1)), &mut got)?;
        }
        let (_, ret) = got[0];
        if ret != 0 {
            bail!("read of {len} bytes at {offset} failed: {}", std::io::Error::from_raw_os_error(-ret));
        }
        Ok(self.slot_mut(0)[..len].to_vec())
    }

    /// One synchronous write of `data` (at most one slot) at `offset` from slot 0.
    pub fn write_sync(&mut self, offset: u64, data: &[u8], timeout: Duration) -> Result<()> {
        ensure!(data.len() <= self.slot_bytes, "write of {} bytes exceeds the slot size", data.len());
        self.slot_mut(0)[..data.len()].copy_from_slice(data);
        self.submit_write(0, offset, data.len());
        self.wait_one(timeout, &format!("write of {} bytes at {offset}", data.len()))
    }

    /// A synchronous flush.
    pub fn flush_sync(&mut self, timeout: Duration) -> Result<()> {
        self.submit_flush(0);
        self.wait_one(timeout, "flush")
    }

    fn wait_one(&mut self, timeout: Duration, what: &str) -> Result<()> {
        let mut got = Vec::new();
        let start = Instant::now();
        while got.is_empty() {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                bail!("{what} did not complete within {timeout:?}");
            }
            self.wait(left.min(Duration::from_secs(1)), &mut got)?;
        }
        let (_, ret) = got[0];
        if ret != 0 {
            bail!("{what} failed: {}", std::io::Error::from_raw_os_error(-ret));
        }
        Ok(())
    }
}

// --- the workload -------------------------------------------------------------------------

/// What a [`Workload`] does.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Names the client in every block it writes; distinct per client of a volume.
    pub seed: u64,
    /// The blocks written: `[first_block, first_block + blocks)`.
    pub first_block: u64,
    pub blocks: u64,
    /// Blocks per write (each write covers that many consecutive blocks, aligned to it).
    /// Default 1; 16 makes 64 KiB writes, beyond the owner's inline size.
    pub blocks_per_write: u64,
    /// Writes in flight. Default 4.
    pub queue_depth: usize,
    /// Writes started per second at most (`None`: as fast as they complete). Default 400:
    /// enough traffic for every fault to meet writes, little enough for 2 cores.
    pub writes_per_s_max: Option<u32>,
    /// Stop after this many writes were started (`None`: until `stop`).
    pub writes_max: Option<u64>,
    /// Nothing completing for this long with requests outstanding ends the workload as
    /// stalled. Default 60 s.
    pub stall_limit: Duration,
    /// Gaps between completions longer than this are listed in the report. Default 500 ms.
    pub gap_report: Duration,
    /// At `stop`, how long outstanding writes may take to finish. Default 30 s.
    pub drain_timeout: Duration,
    /// Keep writing after a write failed (the old owner of a taken-over volume); otherwise
    /// the first error ends the workload. Default false.
    pub continue_on_error: bool,
    /// A flush every this many completed writes (`None`: never). Default every 256.
    pub flush_every: Option<u64>,
}

impl WorkloadConfig {
    pub fn new(seed: u64, first_block: u64, blocks: u64) -> Self {
        Self {
            seed,
            first_block,
            blocks,
            blocks_per_write: 1,
            queue_depth: 4,
            writes_per_s_max: Some(400),
            writes_max: None,
            stall_limit: Duration::from_secs(60),
            gap_report: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(30),
            continue_on_error: false,
            flush_every: Some(256),
        }
    }
}

/// One request that failed.
#[derive(Clone, Debug)]
pub struct IoErrorSeen {
    pub at: Duration,
    pub what: String,
}

/// What a workload saw.
#[derive(Clone, Debug)]
pub struct WorkloadReport {
    pub ledger: Ledger,
    pub writes_started: u64,
    pub writes_ok: u64,
    pub flushes_ok: u64,
    /// Requests that completed with an error: count, and the first few.
    pub error_count: u64,
    pub errors: Vec<IoErrorSeen>,
    /// When the first write completed successfully after the start (relative), and the last.
    pub first_ok: Option<Duration>,
    pub last_ok: Option<Duration>,
    /// Longest time without a completion while requests were outstanding.
    pub longest_gap: Duration,
    /// Gaps over `gap_report`: (when the gap began, its length).
    pub gaps: Vec<(Duration, Duration)>,
    /// Nothing completed for `stall_limit`: the workload gave up.
    pub stalled: bool,
    /// libblkio itself failed (the connection broke): the workload ended there.
    pub fatal: Option<String>,
    pub elapsed: Duration,
}

impl WorkloadReport {
    /// Fails unless every request succeeded and the workload neither stalled nor broke.
    pub fn ensure_clean(&self) -> Result<()> {
        if let Some(f) = &self.fatal {
            bail!("the client broke: {f} ({})", self.summary());
        }
        if self.stalled {
            bail!("I/O stalled for good ({})", self.summary());
        }
        if self.error_count > 0 {
            bail!(
                "{} I/O errors reached the client, first: {:?} ({})",
                self.error_count,
                self.errors.first(),
                self.summary()
            );
        }
        Ok(())
    }

    /// Fails if a gap between completions exceeded `limit`.
    pub fn ensure_gap_below(&self, limit: Duration) -> Result<()> {
        if self.longest_gap > limit {
            bail!("a stall of {:.1?} exceeded {limit:?} ({})", self.longest_gap, self.summary());
        }
        Ok(())
    }

    pub fn summary(&self) -> String {
        let gaps: Vec<String> = self.gaps.iter().take(8).map(|(at, g)| format!("{:.1?} at {:.1?}", g, at)).collect();
        format!(
            "{} writes started, {} ok, {} flushes ok, {} errors, {} unknown outcomes, longest gap {:.1?}{}, {:.1?} in all",
            self.writes_started,
            self.writes_ok,
            self.flushes_ok,
            self.error_count,
            self.ledger.unknown_writes(),
            self.longest_gap,
            if gaps.is_empty() { String::new() } else { format!(" (gaps: {})", gaps.join(", ")) },
            self.elapsed
        )
    }
}

/// A workload running on its own thread; see the module documentation.
pub struct Workload {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(BlkClient, WorkloadReport)>>,
    started: Instant,
    progress: Arc<Progress>,
}

/// What the workload thread publishes while it runs.
#[derive(Default)]
struct Progress {
    writes_ok: std::sync::atomic::AtomicU64,
    last_seq: std::sync::atomic::AtomicU64,
}

#[derive(Clone, Copy)]
enum SlotUse {
    Free,
    Write { block: u64, seq: u64, count: u64 },
    Flush,
}

struct Runner {
    cfg: WorkloadConfig,
    report: WorkloadReport,
    slots: Vec<SlotUse>,
    busy_blocks: std::collections::HashSet<u64>,
    next_seq: u64,
    rng: u64,
    started: Instant,
    last_event: Instant,
    outstanding: usize,
    since_flush: u64,
}

impl Runner {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// A free group of `blocks_per_write` blocks, if one is found in a bounded number of tries.
    fn pick(&mut self) -> Option<u64> {
        let per = self.cfg.blocks_per_write;
        let groups = self.cfg.blocks / per;
        for _ in 0..64 {
            let g = self.rand() % groups;
            let first = self.cfg.first_block + g * per;
            if (first..first + per).all(|b| !self.busy_blocks.contains(&b)) {
                return Some(first);
            }
        }
        None
    }

    fn record_error(&mut self, what: String) {
        self.report.error_count += 1;
        if self.report.errors.len() < ERRORS_KEPT {
            self.report.errors.push(IoErrorSeen { at: self.started.elapsed(), what });
        }
    }

    fn note_completion(&mut self, now: Instant) {
        let gap = now - self.last_event;
        if gap > self.report.longest_gap {
            self.report.longest_gap = gap;
        }
        if gap > self.cfg.gap_report {
            self.report.gaps.push((self.last_event - self.started, gap));
        }
        self.last_event = now;
    }

    fn start_write(&mut self, c: &mut BlkClient, slot: usize, first: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let per = self.cfg.blocks_per_write;
        let seed = self.cfg.seed;
        {
            let buf = c.slot_mut(slot);
            for i in 0..per {
                let at = i as usize * BLOCK;
                fill_block(&mut buf[at..at + BLOCK], seed, first + i, seq);
            }
        }
        for b in first..first + per {
            self.busy_blocks.insert(b);
        }
        self.slots[slot] = SlotUse::Write { block: first, seq, count: per };
        c.submit_write(slot, first * BLOCK as u64, (per as usize) * BLOCK);
        if self.outstanding == 0 {
            // Gaps are measured while something is outstanding only.
            self.last_event = Instant::now();
        }
        self.outstanding += 1;
        self.report.writes_started += 1;
    }

    fn complete(&mut self, slot: usize, ret: i32) {
        let Some(u) = self.slots.get(slot).copied() else {
            self.record_error(format!("completion for unknown slot {slot}"));
            return;
        };
        self.slots[slot] = SlotUse::Free;
        self.outstanding -= 1;
        match u {
            SlotUse::Free => self.record_error(format!("completion for idle slot {slot}")),
            SlotUse::Flush => {
                if ret == 0 {
                    self.report.flushes_ok += 1;
                } else {
                    self.record_error(format!("flush failed: {}", std::io::Error::from_raw_os_error(-ret)));
                }
            }
            SlotUse::Write { block, seq, count } => {
                for b in block..block + count {
                    self.busy_blocks.remove(&b);
                    if ret == 0 {
                        self.report.ledger.completed(b, seq);
                    } else {
                        self.report.ledger.unknown(b, seq);
                    }
                }
                if ret == 0 {
                    self.report.writes_ok += 1;
                    self.since_flush += 1;
                    let t = self.started.elapsed();
                    self.report.first_ok.get_or_insert(t);
                    self.report.last_ok = Some(t);
                } else {
                    self.record_error(format!(
                        "write {seq} of blocks {block}..{} failed: {}",
                        block + count,
                        std::io::Error::from_raw_os_error(-ret)
                    ));
                }
            }
        }
    }

    fn run(&mut self, c: &mut BlkClient, stop: &AtomicBool, progress: &Progress) {
        let mut got = Vec::new();
        let mut draining_since: Option<Instant> = None;
        loop {
            let stopping = stop.load(Ordering::Acquire)
                || self.cfg.writes_max.is_some_and(|m| self.report.writes_started >= m)
                || (self.report.error_count > 0 && !self.cfg.continue_on_error);
            if stopping && draining_since.is_none() {
                draining_since = Some(Instant::now());
            }
            if stopping && self.outstanding == 0 {
                break;
            }
            if let Some(d) = draining_since {
                if d.elapsed() > self.cfg.drain_timeout {
                    break;
                }
            }
            // Start what the queue depth and the rate allow.
            if !stopping {
                let flush_due = self.cfg.flush_every.is_some_and(|n| self.since_flush >= n);
                if flush_due {
                    if let Some(slot) = self.slots.iter().position(|s| matches!(s, SlotUse::Free)) {
                        self.since_flush = 0;
                        self.slots[slot] = SlotUse::Flush;
                        c.submit_flush(slot);
                        if self.outstanding == 0 {
                            self.last_event = Instant::now();
                        }
                        self.outstanding += 1;
                    }
                }
                while let Some(slot) = self.slots.iter().position(|s| matches!(s, SlotUse::Free)) {
                    if let Some(max) = self.cfg.writes_per_s_max {
                        let allowed = (self.started.elapsed().as_secs_f64() * f64::from(max)) as u64 + 1;
                        if self.report.writes_started >= allowed {
                            break;
                        }
                    }
                    if self.cfg.writes_max.is_some_and(|m| self.report.writes_started >= m) {
                        break;
                    }
                    let Some(first) = self.pick() else { break };
                    self.start_write(c, slot, first);
                    progress.last_seq.store(self.next_seq - 1, Ordering::Release);
                }
            }
            let wait = if self.outstanding == 0 { Duration::from_millis(5) } else { Duration::from_millis(200) };
            if self.outstanding == 0 {
                std::thread::sleep(wait);
                continue;
            }
            got.clear();
            if let Err(e) = c.wait(wait, &mut got) {
                self.report.fatal = Some(format!("{e:#}"));
                break;
            }
            let now = Instant::now();
            if !got.is_empty() {
                self.note_completion(now);
            }
            for &(slot, ret) in &got {
                self.complete(slot, ret);
            }
            progress.writes_ok.store(self.report.writes_ok, Ordering::Relaxed);
            if self.outstanding > 0 && now - self.last_event > self.cfg.stall_limit {
                self.report.stalled = true;
                break;
            }
        }
        // Whatever is still outstanding has an unknown outcome.
        for s in self.slots.clone() {
            if let SlotUse::Write { block, seq, count } = s {
                for b in block..block + count {
                    self.report.ledger.unknown(b, seq);
                }
            }
        }
        self.report.elapsed = self.started.elapsed();
    }
}

impl Workload {
    /// Starts writing on a thread of its own with `client` (whose slots must hold
    /// `blocks_per_write` blocks and number at least `queue_depth`).
    pub fn start(client: BlkClient, cfg: WorkloadConfig) -> Result<Self> {
        ensure!(
            cfg.blocks_per_write >= 1 && cfg.blocks >= cfg.blocks_per_write * 4,
            "the range must hold at least 4 writes"
        );
        ensure!(
            client.slots >= cfg.queue_depth && cfg.queue_depth >= 1,
            "client has {} slots for queue depth {}",
            client.slots,
            cfg.queue_depth
        );
        ensure!(
            client.slot_bytes as u64 >= cfg.blocks_per_write * BLOCK as u64,
            "client slots too small for {} blocks",
            cfg.blocks_per_write
        );
        let end = (cfg.first_block + cfg.blocks) * BLOCK as u64;
        ensure!(end <= client.capacity, "range ends at {end}, beyond the device's {} bytes", client.capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let started = Instant::now();
        let (stop2, progress2) = (stop.clone(), progress.clone());
        let thread = std::thread::Builder::new()
            .name(format!("workload-{:x}", cfg.seed))
            .spawn(move || {
                let mut client = client;
                let qd = cfg.queue_depth;
                let mut r = Runner {
                    report: WorkloadReport {
                        ledger: Ledger::new(cfg.seed, cfg.first_block, cfg.blocks),
                        writes_started: 0,
                        writes_ok: 0,
                        flushes_ok: 0,
                        error_count: 0,
                        errors: Vec::new(),
                        first_ok: None,
                        last_ok: None,
                        longest_gap: Duration::ZERO,
                        gaps: Vec::new(),
                        stalled: false,
                        fatal: None,
                        elapsed: Duration::ZERO,
                    },
                    slots: vec![SlotUse::Free; qd],
                    busy_blocks: Default::default(),
                    next_seq: 1,
                    rng: cfg.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1,
                    started,
                    last_event: started,
                    outstanding: 0,
                    since_flush: 0,
                    cfg,
                };
                r.run(&mut client, &stop2, &progress2);
                (client, r.report)
            })
            .context("spawn the workload thread")?;
        Ok(Self { stop, thread: Some(thread), started, progress })
    }

    /// Writes completed successfully so far.
    pub fn writes_ok(&self) -> u64 {
        self.progress.writes_ok.load(Ordering::Relaxed)
    }

    /// The number of the last write started so far (0: none): every write started after this
    /// call has a larger one.
    pub fn last_seq_started(&self) -> u64 {
        self.progress.last_seq.load(Ordering::Acquire)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// True once the workload ended on its own (writes_max, an error, a stall).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits until `n` more writes than now completed, or `timeout`.
    pub fn wait_for_progress(&self, n: u64, timeout: Duration) -> Result<()> {
        let target = self.writes_ok() + n;
        let start = Instant::now();
        while self.writes_ok() < target {
            if self.is_finished() {
                bail!("the workload ended before {n} more writes completed");
            }
            if start.elapsed() > timeout {
                bail!("fewer than {n} writes completed within {timeout:?} ({} so far)", self.writes_ok());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops starting writes, waits (bounded by `drain_timeout`) for the outstanding ones,
    /// and returns the client and the report.
    pub fn stop(mut self) -> Result<(BlkClient, WorkloadReport)> {
        self.stop.store(true, Ordering::Release);
        let t = self.thread.take().context("workload already stopped")?;
        t.join().map_err(|_| anyhow::anyhow!("the workload thread panicked"))
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Not joined: a workload dropped while unwinding may be stuck on a dead export; the
        // drain timeout ends its thread.
    }
}

// --- verification -------------------------------------------------------------------------

/// One block that holds something it may not.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub block: u64,
    pub found: Observed,
    pub expected: Vec<Observed>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let exp: Vec<String> = self.expected.iter().map(ToString::to_string).collect();
        write!(
            f,
            "block {} (byte {}) holds {}, expected {}",
            self.block,
            self.block * BLOCK as u64,
            self.found,
            exp.join(" or ")
        )
    }
}

#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub blocks_checked: u64,
    pub zero: u64,
    pub written: u64,
    pub mismatch_count: u64,
    /// The first [`MISMATCHES_KEPT`].
    pub mismatches: Vec<Mismatch>,
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn ensure_ok(&self) -> Result<()> {
        if self.mismatch_count > 0 {
            let list: Vec<String> = self.mismatches.iter().map(ToString::to_string).collect();
            bail!(
                "{} of {} blocks hold what no acknowledged write put there:\n  {}",
                self.mismatch_count,
                self.blocks_checked,
                list.join("\n  ")
            );
        }
        Ok(())
    }
}

/// Reads blocks `[first_block, first_block + blocks)` through `client` and checks each
/// against `ledgers` (oldest first; the volume held `initial` everywhere before).
pub fn verify(
    client: &mut BlkClient,
    ledgers: &[&Ledger],
    first_block: u64,
    blocks: u64,
    initial: &Observed,
) -> Result<VerifyReport> {
    let start = Instant::now();
    let mut r = VerifyReport::default();
    let per_read = (client.slot_bytes / BLOCK) as u64;
    let per_read = per_read.clamp(1, VERIFY_CHUNK_BLOCKS);
    let end = first_block + blocks;
    ensure!(end * BLOCK as u64 <= client.capacity, "verify range ends beyond the device");
    let mut b = first_block;
    while b < end {
        let n = per_read.min(end - b);
        let data = client
            .read_sync(b * BLOCK as u64, (n as usize) * BLOCK, VERIFY_IO_TIMEOUT)
            .with_context(|| format!("verify: read of blocks {b}..{}", b + n))?;
        for i in 0..n {
            let block = b + i;
            let at = i as usize * BLOCK;
            let found = inspect_block(&data[at..at + BLOCK], block);
            r.blocks_checked += 1;
            match found {
                Observed::Zero => r.zero += 1,
                Observed::Write { .. } => r.written += 1,
                Observed::Corrupt(_) => {}
            }
            let expected = acceptable(ledgers, block, initial);
            if !expected.contains(&found) {
                r.mismatch_count += 1;
                if r.mismatches.len() < MISMATCHES_KEPT {
                    r.mismatches.push(Mismatch { block, found, expected });
                }
            }
        }
        b += n;
    }
    r.elapsed = start.elapsed();
    Ok(r)
}

/// Verifies the blocks of a stored image file directly (a replica file, a standalone
/// volume's backing) against `ledgers`: for checks that do not go through an export.
pub fn verify_file(
    path: &Path,
    ledgers: &[&Ledger],
    first_block: u64,
    blocks: u64,
    initial: &Observed,
) -> Result<VerifyReport> {
    use std::os::unix::fs::FileExt;
    let start = Instant::now();
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut r = VerifyReport::default();
    let mut buf = vec![0u8; BLOCK];
    for block in first_block..first_block + blocks {
        buf.fill(0);
        // Past the end of a sparse file reads as zeros, as the device would.
        let mut got = 0;
        while got < BLOCK {
            let n = f
                .read_at(&mut buf[got..], block * BLOCK as u64 + got as u64)
                .with_context(|| format!("read {}", path.display()))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let found = inspect_block(&buf, block);
        r.blocks_checked += 1;
        match found {
            Observed::Zero => r.zero += 1,
            Observed::Write { .. } => r.written += 1,
            Observed::Corrupt(_) => {}
        }
        let expected = acceptable(ledgers, block, initial);
        if !expected.contains(&found) {
            r.mismatch_count += 1;
            if r.mismatches.len() < MISMATCHES_KEPT {
                r.mismatches.push(Mismatch { block, found, expected });
            }
        }
    }
    r.elapsed = start.elapsed();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u64, index: u64, seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        fill_block(&mut b, seed, index, seq);
        b
    }

    #[test]
    fn blocks_describe_themselves() {
        let b = block(7, 42, 3);
        assert_eq!(inspect_block(&b, 42), Observed::Write { seed: 7, seq: 3 });
        assert_eq!(inspect_block(&vec![0u8; BLOCK], 42), Observed::Zero);
        assert_ne!(block(7, 42, 3), block(7, 42, 4), "another write of the same block differs");
        assert_ne!(block(7, 42, 3)[HEADER..], block(8, 42, 3)[HEADER..], "another client's payload differs");
    }

    #[test]
    fn damage_of_every_kind_is_named() {
        let b = block(7, 42, 3);
        let why = |o: Observed| match o {
            Observed::Corrupt(w) => w,
            other => panic!("expected garbage, got {other}"),
        };
        assert!(why(inspect_block(&b, 43)).contains("misplaced"));
        let mut torn = b.clone();
        torn[2048..].copy_from_slice(&block(7, 42, 4)[2048..]);
        assert!(why(inspect_block(&torn, 42)).contains("checksum"));
        let mut flipped = b.clone();
        flipped[100] ^= 1;
        assert!(why(inspect_block(&flipped, 42)).contains("checksum"));
        let mut no_header = b.clone();
        no_header[0] = b'X';
        assert!(why(inspect_block(&no_header, 42)).contains("header"));
        let mut zero_tail = b;
        zero_tail[BLOCK - 512..].fill(0);
        assert!(matches!(inspect_block(&zero_tail, 42), Observed::Corrupt(_)));
    }

    #[test]
    fn the_newest_ledger_with_a_completed_write_decides() {
        let w = |seed, seq| Observed::Write { seed, seq };
        let mut a = Ledger::new(1, 0, 8);
        a.completed(0, 5);
        a.completed(1, 6);
        a.unknown(1, 9);
        a.unknown(2, 10);
        let mut b = Ledger::new(2, 0, 8);
        b.completed(1, 3);
        assert_eq!(acceptable(&[&a], 0, &Observed::Zero), vec![w(1, 5)]);
        assert_eq!(acceptable(&[&a], 1, &Observed::Zero), vec![w(1, 6), w(1, 9)]);
        assert_eq!(acceptable(&[&a], 2, &Observed::Zero), vec![Observed::Zero, w(1, 10)]);
        assert_eq!(acceptable(&[&a], 3, &Observed::Zero), vec![Observed::Zero]);
        // B completed after A: A's unknown write 9 may not be there any more.
        assert_eq!(acceptable(&[&a, &b], 1, &Observed::Zero), vec![w(2, 3)]);
        assert_eq!(acceptable(&[&a, &b], 0, &Observed::Zero), vec![w(1, 5)]);
        // Out of a ledger's range: not its business.
        assert_eq!(acceptable(&[&a], 100, &Observed::Zero), vec![Observed::Zero]);
        // Unknown writes after a cut-off are forgotten: finding them is a failure.
        let strict = a.forget_unknown_after(9);
        assert_eq!(acceptable(&[&strict], 1, &Observed::Zero), vec![w(1, 6), w(1, 9)]);
        assert_eq!(acceptable(&[&strict], 2, &Observed::Zero), vec![Observed::Zero]);
        // A later completion clears what was unknown before it.
        a.completed(2, 11);
        assert_eq!(acceptable(&[&a], 2, &Observed::Zero), vec![w(1, 11)]);
    }

    #[test]
    fn verify_file_finds_lost_and_foreign_writes() {
        let dir = std::env::temp_dir().join(format!("hcblk-verify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        let mut data = vec![0u8; 8 * BLOCK];
        let mut l = Ledger::new(9, 0, 8);
        for (b, seq) in [(0u64, 1u64), (1, 2), (2, 3)] {
            data[b as usize * BLOCK..(b as usize + 1) * BLOCK].copy_from_slice(&block(9, b, seq));
            l.completed(b, seq);
        }
        // Block 3: acknowledged write 4 lost (the block still holds zeros).
        l.completed(3, 4);
        // Block 5: a write nobody acknowledged (another client's).
        data[5 * BLOCK..6 * BLOCK].copy_from_slice(&block(77, 5, 1));
        std::fs::write(&path, &data).unwrap();
        let r = verify_file(&path, &[&l], 0, 8, &Observed::Zero).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(r.blocks_checked, 8);
        assert_eq!(r.mismatch_count, 2, "{:?}", r.mismatches);
        assert_eq!(r.mismatches[0].block, 3);
        assert_eq!(r.mismatches[1].block, 5);
        let e = r.ensure_ok().unwrap_err().to_string();
        assert!(e.contains("block 3") && e.contains("expected write 4"), "{e}");
    }
}
