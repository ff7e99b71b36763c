//! The poll loop of one thread: its virtqueues in, its volume queue through, used rings out.
//!
//! ```text
//!  avail ring ─pop─▶ request::parse ─▶ iovecs into guest memory ─submit─▶ VolumeQueue
//!  used ring ◀─add_used + status byte ◀─ pop_completion ◀─────────── poll ─┘
//! ```
//!
//! Per request there is no allocation and no lock: slots (one per descriptor head) and their
//! iovec arrays are allocated when the poller is made (an array grows once, for guest memory
//! layouts that need it: see [`IOVECS_PER_REQUEST_MAX`]), and the only locks taken are the
//! per-vring ones, once per pass over a queue.
//!
//! The poller knows neither the device nor the export: it gets a [`PollContext`] (the
//! connection's counters, stop flag, limits and identity) and the [`Volume`] it serves, and
//! drives that volume's [`VolumeQueue`] (statically dispatched: `Poller<Q>`).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::ratelimit::{LogLimit, Verdict, LOG_BURST, LOG_INTERVAL};
use replica::{IoRequest, IoStatus};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic};

use crate::contention::{Contention, Decision, RunDelay, SAMPLE_INTERVAL};
use crate::inflight::{QueueTracker, TrackerHandoff};
use crate::request::{
    self, Limits, Op, Rejection, Request, Scratch, ID_BYTES, SECTOR_SHIFT, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use crate::volume::{GuestMem, Volume, VolumeQueue};

pub(crate) type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
pub(crate) type Vring = VringRwLock<GuestMemAtomic>;
type VringWriteGuard<'a> = std::sync::RwLockWriteGuard<'a, vhost_user_backend::VringState<GuestMemAtomic>>;

/// Requests a pass over one queue may take before moving on, so one busy queue cannot starve
/// the others or its own completions.
const BATCH_MAX: usize = 64;
/// Longest a poller sleeps waiting for in-flight requests before looking at its rings again.
const COMPLETION_WAIT: Duration = Duration::from_micros(50);
/// Iterations between checks of the stop flag while busy.
const STOP_CHECK_EVERY: u32 = 1024;
/// Most iovecs one request may use: the kernel's UIO_MAXIOV, the most one readv/writev (and
/// io_uring READV/WRITEV) accepts.
///
/// How many a request needs: each data segment (at most `seg_max` of them, each at most
/// `size_max` bytes, both enforced by the parser) becomes one iovec per guest memory region it
/// lies in. QEMU merges the adjacent sections of a RAM block into one region, so regions that
/// touch in guest-physical space are whole RAM blocks (boot RAM, DIMMs, virtio-mem slots), in
/// practice far larger than `size_max`, and a segment lies in at most two of them: slots start
/// with room for `2 * seg_max` iovecs, which covers every request of such a frontend. A frontend
/// may lay out smaller adjacent regions (vhost-user allows 509); a request then needs up to
/// `seg_max` times the most regions one `size_max` window touches, and its slot grows once, up
/// to this bound: 1024 covers every layout where no window touches more than 8 regions (126 ×
/// 8 = 1008; the device warns at SET_MEM_TABLE about layouts that do). A request needing more
/// could not be one kernel submission anyway and is refused with IOERR.
pub(crate) const IOVECS_PER_REQUEST_MAX: usize = 1024;

/// How poller threads wait for guest requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Busy-poll the avail rings at all times (lowest latency; one core per poller, always),
    /// except while a disk backing has many requests in flight: the poller then sleeps in
    /// the disk's ring between passes until some complete (at most 50 µs), because the
    /// kernel's completion work for them may need its core (`ShardQueue::wait_for_disk`).
    Always,
    /// Busy-poll while requests keep coming; after `PollConfig::idle` without any, sleep on
    /// the kick eventfd until the guest kicks again. Never at the expense of another thread:
    /// a poller that finds its core contended (it waits on the run queue: see
    /// `contention.rs`) sleeps on kicks, as `Never` does, for a back-off of 10 ms to
    /// 1 s before it polls again.
    Adaptive,
    /// Always sleep on the kick eventfd (classic interrupt mode).
    Never,
}

impl std::str::FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Self::Always),
            "adaptive" => Ok(Self::Adaptive),
            "never" => Ok(Self::Never),
            other => Err(format!("unknown poll mode {other:?} (always, adaptive or never)")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PollConfig {
    /// Default `Adaptive`.
    pub mode: PollMode,
    /// Adaptive: how long a queue may stay idle before its poller sleeps. Default 1 ms.
    pub idle: Duration,
    /// Cores the poller threads are pinned to, one poller per core (queues are spread over
    /// them round-robin). Default empty: one poller per queue, unpinned (the scheduler places
    /// them, away from busy cores when it can).
    pub cpus: Vec<usize>,
    /// Serve all queues of a volume from one poller thread, pinned to `cpus[0]` if `cpus` is
    /// not empty. Default false.
    pub one_poller: bool,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self { mode: PollMode::Adaptive, idle: Duration::from_millis(1), cpus: Vec::new(), one_poller: false }
    }
}

/// Guest requests a volume refused, over all its connections, and the limits on the log lines
/// they cause: a guest can send malformed chains as fast as it likes, and a line for each
/// would flood the host's log. The count is what an operator reads (`hcblk volume info`).
#[derive(Debug)]
pub struct Rejections {
    count: AtomicU64,
    /// Malformed requests, logged at warn.
    loud: LogLimit,
    /// Refusals a well-behaved driver may cause (an unsupported request type, a write to a
    /// read-only volume: the guest is told in the status byte), logged at debug, so that
    /// they neither use up the warn lines nor cause warn summaries.
    quiet: LogLimit,
}

impl Default for Rejections {
    fn default() -> Self {
        Self {
            count: AtomicU64::new(0),
            loud: LogLimit::new(LOG_BURST, LOG_INTERVAL),
            quiet: LogLimit::new(LOG_BURST, LOG_INTERVAL),
        }
    }
}

impl Rejections {
    /// Requests refused since the volume was exported.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Counts one refused request at `now`; says whether to log it, and how many were left
    /// out of the log since the last line that was let through.
    pub(crate) fn record(&self, now: Instant, quiet: bool) -> Verdict {
        self.count.fetch_add(1, Ordering::Relaxed);
        if quiet {
            self.quiet.check(now)
        } else {
            self.loud.check(now)
        }
    }

    /// Counts one refused request and logs it if the limit lets it.
    fn refuse(&self, volume: &str, queue: usize, reason: &str, quiet: bool) {
        let Verdict::Log { suppressed } = self.record(Instant::now(), quiet) else { return };
        if quiet {
            if suppressed > 0 {
                tracing::debug!(volume, suppressed, "refused guest requests left out of the log");
            }
            tracing::debug!(volume, queue, reason, "guest request refused");
        } else {
            if suppressed > 0 {
                tracing::warn!(volume, suppressed, "malformed guest requests left out of the log");
            }
            tracing::warn!(volume, queue, reason, "malformed guest request refused");
        }
    }

    /// Logs the count of refusals left out of the log, if any: the connection ends, and no
    /// later refusal may come to carry it.
    pub(crate) fn flush(&self, volume: &str) {
        self.loud.flush(true, |suppressed| {
            tracing::warn!(volume, suppressed, "malformed guest requests left out of the log")
        });
        self.quiet.flush(true, |suppressed| {
            tracing::debug!(volume, suppressed, "refused guest requests left out of the log")
        });
    }
}

/// Adaptive mode: how long a poller with requests in flight and nothing else to do polls for
/// their completions before it sleeps until one (or a kick) wakes it. qemu's rule for its
/// event loop (`adjust_polling_time`): a sleep shorter than [`InFlightWindow::MAX`] means a
/// longer window would have caught its wake-up without sleeping, so the window doubles; a
/// longer sleep means polling would not have, so it halves. A disk whose requests take longer
/// than the window (128 KiB reads, a slow device) costs a sleep and a wake-up per completion
/// instead of a spinning core; a fast one keeps its polled latency.
#[derive(Debug, Default)]
pub(crate) struct InFlightWindow {
    window: Duration,
    asleep_since: Option<Instant>,
}

impl InFlightWindow {
    /// With this many requests in flight a completion is never far off, and the window does
    /// not apply: the poller polls (measured: 4 KiB reads 32 deep lost 15 % of their IOPS to
    /// sleeps and wake-ups when it did).
    const POLL_ALWAYS_FROM: u32 = 16;
    const MAX: Duration = Duration::from_micros(100);
    const START: Duration = Duration::from_micros(4);

    fn window(&self) -> Duration {
        self.window
    }

    /// The poller goes to sleep at `now` waiting for requests in flight.
    fn sleeps(&mut self, now: Instant) {
        self.asleep_since = Some(now);
    }

    /// The poller runs again at `now`.
    fn wakes(&mut self, now: Instant) {
        let Some(since) = self.asleep_since.take() else { return };
        let slept = now.saturating_duration_since(since);
        if slept > Self::MAX {
            self.window /= 2;
            if self.window < Self::START {
                self.window = Duration::ZERO;
            }
        } else if self.window < Self::MAX {
            self.window = (self.window * 2).clamp(Self::START, Self::MAX);
        }
    }
}

/// Per-queue counters the frontend thread reads while a poller runs.
#[derive(Debug, Default)]
pub(crate) struct QueueShared {
    /// Requests taken from the avail ring and not yet in the used ring.
    pub(crate) in_flight: AtomicU32,
    /// The queue's inflight tracker, handed over when its vring (re)starts.
    pub(crate) inflight: TrackerHandoff,
}

/// What every poller of one connection shares with the device that made it.
#[derive(Debug)]
pub(crate) struct PollContext {
    /// Volume name, for logs.
    pub(crate) name: String,
    /// Returned by GET_ID.
    pub(crate) serial: [u8; ID_BYTES],
    pub(crate) poll: PollConfig,
    /// The parser's limits, except the capacity, which is read from the volume on every pass
    /// (it grows online).
    pub(crate) limits: Limits,
    /// Indexed by virtqueue.
    pub(crate) queues: Vec<QueueShared>,
    /// Set when the connection ends or the export stops: pollers drain and return.
    pub(crate) stopping: AtomicBool,
    /// Requests completed, for metrics.
    pub(crate) completed: AtomicU64,
    /// The volume's refused requests (shared by its connections).
    pub(crate) rejections: Arc<Rejections>,
}

impl PollContext {
    fn limits<V: Volume>(&self, volume: &V) -> Limits {
        Limits { capacity_sectors: volume.capacity_bytes() >> SECTOR_SHIFT, ..self.limits }
    }
}

/// One in-flight request, indexed by its descriptor head.
struct Slot {
    iov: Vec<libc::iovec>,
    status: GuestAddress,
    /// Bytes written into device-writable buffers, reported in the used ring.
    used_len: u32,
    in_flight: bool,
    /// Keeps the guest memory mapping alive while the volume may still touch it.
    mem: Option<Arc<GuestMem>>,
}

struct QueueState {
    /// Index of this queue in the device.
    index: usize,
    slots: Vec<Slot>,
    /// Marks requests in the inflight region (when the frontend set one) and holds those to
    /// resubmit after a restart.
    inflight: QueueTracker,
}

pub(crate) struct Poller<Q: VolumeQueue> {
    queue: Q,
    queues: Vec<QueueState>,
    scratch: Scratch,
    cpu: Option<usize>,
    /// Set by the first `run`, on the worker thread that runs this poller for its whole life:
    /// pinned, and the run-queue delay opened.
    started: bool,
    /// This poller's thread's run-queue delay (adaptive mode, where the kernel keeps it).
    run_delay: Option<RunDelay>,
    /// Adaptive mode: whether the core is contended and for how long to stop polling.
    contention: Contention,
    /// Queues (local index bit) that completed something since their last notification.
    to_notify: u64,
    /// Adaptive mode: how long to poll for requests in flight before sleeping.
    in_flight_window: InFlightWindow,
}

// SAFETY: the raw iovec pointers in the slots point into guest memory kept alive by the slot's
// `mem` Arc; they are only dereferenced by the volume queue, which the poller owns (and which
// is `Send` itself). Moving the poller between threads (it is created on the frontend thread,
// run on its worker) moves no aliasing.
unsafe impl<Q: VolumeQueue> Send for Poller<Q> {}

impl<Q: VolumeQueue> Poller<Q> {
    /// A poller for the virtqueues in `mask` (bit i = queue i), each of `queue_size` entries,
    /// over `queue`.
    pub(crate) fn new(queue: Q, mask: u64, cpu: Option<usize>, queue_size: u16, seg_max: u32) -> Self {
        // Enough for every segment to cross one region boundary; see IOVECS_PER_REQUEST_MAX.
        let iov_capacity = (2 * seg_max as usize).min(IOVECS_PER_REQUEST_MAX);
        let queues = (0..64)
            .filter(|q| mask & (1u64 << q) != 0)
            .map(|index| QueueState {
                index,
                slots: (0..queue_size)
                    .map(|_| Slot {
                        iov: Vec::with_capacity(iov_capacity),
                        status: GuestAddress(0),
                        used_len: 0,
                        in_flight: false,
                        mem: None,
                    })
                    .collect(),
                inflight: QueueTracker::default(),
            })
            .collect();
        Self {
            queue,
            queues,
            scratch: Scratch::with_capacity(queue_size as usize),
            cpu,
            started: false,
            run_delay: None,
            contention: Contention::default(),
            to_notify: 0,
            in_flight_window: InFlightWindow::default(),
        }
    }

    pub(crate) fn completion_eventfd(&self) -> Option<RawFd> {
        self.queue.completion_eventfd()
    }

    pub(crate) fn consume_completion_event(&self) {
        self.queue.consume_completion_event();
    }

    /// Serves `vrings` until the poll mode says to sleep or the connection stops.
    pub(crate) fn run<V: Volume>(&mut self, ctx: &PollContext, volume: &V, vrings: &[Vring], atomic: &GuestMemAtomic) {
        if !self.started {
            self.start_thread(ctx);
        }
        if ctx.stopping.load(Ordering::Acquire) {
            // Woken after the stop (by a completion, a kick): finish what is in flight, take
            // nothing new. A stopping export counts on it (`BlkDevice::drain`).
            self.drain(ctx, vrings, &atomic.memory());
            return;
        }
        let mode = ctx.poll.mode;
        let idle = ctx.poll.idle;
        let mut last_work = Instant::now();
        self.in_flight_window.wakes(last_work);
        // Busy-polling now; in adaptive mode, not while backing off from a contended core.
        let mut polling = match mode {
            PollMode::Always => true,
            PollMode::Never => false,
            PollMode::Adaptive => self.contention.may_poll(last_work),
        };
        // Whether to sample the run-queue delay while polling, and when next.
        let mut watch = false;
        if polling && mode == PollMode::Adaptive {
            match self.begin_watch(ctx, last_work) {
                Some(true) => watch = true,
                // Woken while another thread held the core: serve, then sleep on kicks.
                Some(false) => polling = false,
                None => {}
            }
        }
        let mut next_sample = last_work + SAMPLE_INTERVAL;
        if polling {
            self.set_notifications(vrings, atomic, false);
        }
        let mut spins: u32 = 0;
        loop {
            // A guard, not an Arc: the loop only reads the rings through it; requests that
            // outlive the pass take their own Arc in `pop_requests`.
            let mem = atomic.memory();
            let mut work = 0;
            let limits = ctx.limits(volume);
            for local in 0..self.queues.len() {
                if let Some(vring) = vrings.get(local) {
                    work += self.pop_requests(ctx, local, vring, atomic, &mem, &limits);
                }
            }
            work += self.queue.poll();
            work += self.complete(ctx, vrings);
            self.notify(vrings, &mem);

            // The clock is read only when there was work or while adaptive polling waits for
            // its idle time: always, never and a backing-off adaptive poller do not need it
            // to decide to spin or sleep.
            let now = if work > 0 || (polling && mode == PollMode::Adaptive) { Instant::now() } else { last_work };
            if watch && now >= next_sample {
                next_sample = now + SAMPLE_INTERVAL;
                match self.sample_contention(ctx, now) {
                    Some(true) => {}
                    // Contended: serve what is there, then sleep on kicks (re-armed below).
                    Some(false) => (polling, watch) = (false, false),
                    None => watch = false,
                }
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(STOP_CHECK_EVERY) && polling {
                // Queues enabled since we started polling still have kicks on.
                self.set_notifications(vrings, atomic, false);
            }
            if work > 0 && (!spins.is_multiple_of(STOP_CHECK_EVERY) || !ctx.stopping.load(Ordering::Acquire)) {
                last_work = now;
                // A disk with many requests in flight gets the core until one completes (the
                // queue decides: see `ShardQueue::wait_for_disk`).
                self.queue.wait_for_completions(COMPLETION_WAIT, false);
                continue;
            }
            if ctx.stopping.load(Ordering::Acquire) {
                self.drain(ctx, vrings, &mem);
                return;
            }
            // Adaptive: whether it sleeps because its in-flight window ran out.
            let mut waits_in_flight = false;
            let sleep = match mode {
                PollMode::Always => false,
                // With requests in flight, the queue's completion eventfd wakes us.
                PollMode::Never => true,
                PollMode::Adaptive => {
                    let idle_for = now.saturating_duration_since(last_work);
                    let in_flight = self.queue.outstanding();
                    waits_in_flight = in_flight > 0
                        && in_flight < InFlightWindow::POLL_ALWAYS_FROM
                        && idle_for >= self.in_flight_window.window();
                    !polling || idle_for >= idle || waits_in_flight
                }
            };
            if !sleep {
                // Only in-flight requests are left to wait for: the local shard, with writes
                // in flight or a deep disk queue, sleeps in the ring (bounded, so new guest
                // requests wait at most COMPLETION_WAIT) rather than spin and starve the kernel
                // work that completes O_DIRECT writes on this core; otherwise it returns at
                // once and we keep spinning.
                self.queue.wait_for_completions(COMPLETION_WAIT, true);
                std::hint::spin_loop();
                continue;
            }
            // Re-arm guest kicks, then look once more: a request made available between our
            // last look and the re-arm would otherwise wait for a kick that never comes.
            if self.set_notifications(vrings, atomic, true) {
                if polling {
                    self.set_notifications(vrings, atomic, false);
                }
                last_work = Instant::now();
                continue;
            }
            if watch {
                // Idle after polling: how long the next wake-up waits for the core tells
                // whether another thread holds it.
                self.sleeps(ctx);
            }
            if waits_in_flight {
                self.in_flight_window.sleeps(Instant::now());
            }
            return;
        }
    }

    /// First `run`, on the poller's worker thread: pins it, and opens its run-queue delay for
    /// adaptive polling.
    fn start_thread(&mut self, ctx: &PollContext) {
        self.started = true;
        if let Some(cpu) = self.cpu {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                tracing::warn!(cpu, "cannot pin poller thread");
            }
        }
        if ctx.poll.mode == PollMode::Adaptive {
            match RunDelay::open() {
                Ok(run_delay) => self.run_delay = Some(run_delay),
                Err(e) => tracing::warn!(
                    volume = %ctx.name,
                    error = %e,
                    "cannot read the poller thread's run-queue delay: adaptive polling will not give way to other threads on its core"
                ),
            }
        }
    }

    /// Polling begins at `now`: `Some(true)` to poll (a contention window starts),
    /// `Some(false)` not to (this wake-up waited for a contended core), `None` if the run-queue
    /// delay cannot be read: then there is nothing to watch.
    fn begin_watch(&mut self, ctx: &PollContext, now: Instant) -> Option<bool> {
        let ns = self.read_run_delay(ctx)?;
        let decision = self.contention.begin(now, ns);
        Some(self.decided(ctx, decision))
    }

    /// Samples the run-queue delay while polling: `Some(true)` to poll on, `Some(false)` to
    /// stop (the core is contended), `None` if it can no longer be read.
    fn sample_contention(&mut self, ctx: &PollContext, now: Instant) -> Option<bool> {
        let ns = self.read_run_delay(ctx)?;
        let decision = self.contention.sample(now, ns);
        Some(self.decided(ctx, decision))
    }

    /// The poller goes to sleep after polling.
    fn sleeps(&mut self, ctx: &PollContext) {
        if let Some(ns) = self.read_run_delay(ctx) {
            self.contention.sleeps(ns);
        }
    }

    fn read_run_delay(&mut self, ctx: &PollContext) -> Option<u64> {
        match self.run_delay.as_ref()?.read_ns() {
            Ok(ns) => Some(ns),
            Err(e) => {
                self.lost_run_delay(ctx, &e);
                None
            }
        }
    }

    /// Whether to poll on after `decision`; logs a back-off.
    fn decided(&self, ctx: &PollContext, decision: Decision) -> bool {
        match decision {
            Decision::Poll => true,
            Decision::Yield { backoff } => {
                let backoff_ms = backoff.as_millis() as u64;
                let yields = self.contention.yields();
                if yields == 1 {
                    tracing::info!(
                        volume = %ctx.name,
                        backoff_ms,
                        "another thread wants the poller's core: adaptive polling sleeps on kicks, and backs off while it stays"
                    );
                } else {
                    tracing::debug!(volume = %ctx.name, backoff_ms, yields, "poller core contended: sleeping on kicks");
                }
                false
            }
        }
    }

    fn lost_run_delay(&mut self, ctx: &PollContext, error: &std::io::Error) {
        tracing::warn!(
            volume = %ctx.name,
            error = %error,
            "cannot read the poller thread's run-queue delay any more: adaptive polling will not give way to other threads on its core"
        );
        self.run_delay = None;
    }

    /// Enables (or disables) guest kicks on every ready queue. When enabling, returns whether
    /// any queue already has new requests.
    fn set_notifications(&self, vrings: &[Vring], atomic: &GuestMemAtomic, enable: bool) -> bool {
        let mem = atomic.memory();
        let mut pending = false;
        for vring in vrings {
            let mut state = vring.get_mut();
            if !state.get_queue().ready() {
                continue;
            }
            let queue = state.get_queue_mut();
            if enable {
                pending |= queue.enable_notification(&*mem).unwrap_or(false);
            } else {
                let _ = queue.disable_notification(&*mem);
            }
        }
        pending
    }

    fn pop_requests(
        &mut self,
        ctx: &PollContext,
        local: usize,
        vring: &Vring,
        atomic: &GuestMemAtomic,
        mem: &GuestMem,
        limits: &Limits,
    ) -> usize {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return 0;
        }
        let queue_index = self.queues[local].index;
        if let Some(tracker) = ctx.queues[queue_index].inflight.take() {
            self.queues[local].inflight = tracker;
        }
        let queue = state.get_queue();
        if !self.queues[local].inflight.resubmitting() {
            match queue.avail_idx(mem, Ordering::Acquire) {
                Ok(avail) if avail.0 != queue.next_avail() => {}
                _ => return 0,
            }
        }
        // Load the memory map only after seeing new requests: a frontend that added a memory
        // region (and got our ack) before making a request available must find it mapped.
        let fresh = atomic.memory().into_inner();
        let mem = &fresh;
        let mut taken = 0;
        while taken < BATCH_MAX && !self.queue.is_full() {
            // Requests from before a restart first: they are older than anything in the ring.
            let (chain, resubmitted) = match self.queues[local].inflight.next_resubmitted(state.get_queue(), mem) {
                Some(chain) => (chain, true),
                None => match state.get_queue_mut().pop_descriptor_chain(&**mem) {
                    Some(chain) => (chain, false),
                    None => break,
                },
            };
            taken += 1;
            let head = chain.head_index();
            let Some(slot) = self.queues[local].slots.get_mut(head as usize) else {
                ctx.rejections.refuse(&ctx.name, queue_index, "descriptor head out of range", false);
                continue;
            };
            if slot.in_flight {
                // The guest made a head available twice; the first use still owns the slot.
                ctx.rejections.refuse(&ctx.name, queue_index, "descriptor head reused while in flight", false);
                continue;
            }
            if !resubmitted {
                self.queues[local].inflight.taken(head);
            }
            ctx.queues[queue_index].in_flight.fetch_add(1, Ordering::AcqRel);
            let parsed = request::parse(chain, limits, &mut self.scratch);
            let outcome = match parsed {
                Ok(request) => self.start(ctx, local, head, request, mem),
                Err(rejection) => Some(rejection_outcome(ctx, queue_index, &rejection)),
            };
            if let Some((status, status_byte, used_len)) = outcome {
                let state_queue = state.get_queue_mut();
                if let Some(addr) = status {
                    write_status(mem, addr, status_byte);
                }
                let _ = self.queues[local].inflight.add_used(state_queue, &**mem, head, used_len);
                ctx.queues[queue_index].in_flight.fetch_sub(1, Ordering::AcqRel);
                ctx.completed.fetch_add(1, Ordering::Relaxed);
                self.to_notify |= 1 << local;
            }
        }
        taken
    }

    /// Starts a parsed request. Returns (status address, status, used length) when it finished
    /// at once; otherwise it is in the volume queue and its slot is marked in flight.
    fn start(
        &mut self,
        ctx: &PollContext,
        local: usize,
        head: u16,
        request: Request,
        mem: &Arc<GuestMem>,
    ) -> Option<(Option<GuestAddress>, u8, u32)> {
        let status = Some(request.status);
        let volume_op = match request.op {
            Op::Read => replica::Op::Read,
            Op::Write => replica::Op::Write,
            Op::Flush => replica::Op::Flush,
            Op::Discard => replica::Op::Discard,
            Op::WriteZeroes { unmap } => replica::Op::WriteZeroes { unmap },
            Op::GetId => {
                let serial = &ctx.serial;
                let mut written = 0usize;
                for segment in &self.scratch.segments {
                    let n = segment.len as usize;
                    if mem.write_slice(&serial[written..written + n], segment.addr).is_err() {
                        return Some((status, STATUS_IOERR, 1));
                    }
                    written += n;
                }
                return Some((status, STATUS_OK, written as u32 + 1));
            }
        };
        let queue_index = self.queues[local].index;
        let slot = &mut self.queues[local].slots[head as usize];
        slot.iov.clear();
        let writable = request.op == Op::Read;
        let access = if writable { vm_memory::Permissions::Write } else { vm_memory::Permissions::Read };
        let refuse = |reason| {
            ctx.rejections.refuse(&ctx.name, queue_index, reason, false);
            Some((status, STATUS_IOERR, 1))
        };
        const OUTSIDE: &str = "data buffer outside guest memory";
        const TOO_MANY: &str = "its buffers lie in more guest memory regions than one submission can carry";
        for segment in &self.scratch.segments {
            if let Ok(slice) = vm_memory::GuestMemoryBackend::get_slice(&**mem, segment.addr, segment.len as usize) {
                // Within one region, the common case: one bounds-checked lookup, not the
                // general iterator below (which codegen does not reliably inline: it cost a
                // null volume a fifth of its IOPS in a build where it was not).
                if slot.iov.len() == IOVECS_PER_REQUEST_MAX {
                    return refuse(TOO_MANY);
                }
                slot.iov.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() });
                continue;
            }
            let Ok(slices) = mem.get_slices(segment.addr, segment.len as usize, access) else {
                return refuse(OUTSIDE);
            };
            for slice in slices {
                let Ok(slice) = slice else {
                    return refuse(OUTSIDE);
                };
                if slot.iov.len() == IOVECS_PER_REQUEST_MAX {
                    return refuse(TOO_MANY);
                }
                // Grows the slot's array (once, for unusual memory layouts) if the segments
                // cross more region boundaries than it has room for; see IOVECS_PER_REQUEST_MAX.
                slot.iov.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() });
            }
        }
        slot.status = request.status;
        slot.used_len =
            if writable { u32::try_from(request.len_bytes).unwrap_or(u32::MAX).saturating_add(1) } else { 1 };
        slot.mem = Some(Arc::clone(mem));
        let io = IoRequest {
            user_data: (local as u64) << 16 | u64::from(head),
            op: volume_op,
            offset_bytes: request.offset_bytes,
            len_bytes: request.len_bytes,
            iov: slot.iov.as_ptr(),
            iov_count: slot.iov.len() as u32,
            fua: false,
        };
        // SAFETY: the iovecs live in `slot.iov`, which is neither cleared nor pushed to (so
        // never reallocated) until this request's completion is popped in `complete`:
        // `in_flight` blocks reuse of the slot. They point into the guest mapping that
        // `slot.mem` keeps mapped until then; every range was bounds-checked by vm-memory's
        // get_slices.
        match unsafe { self.queue.submit(io) } {
            Ok(()) => {
                slot.in_flight = true;
                None
            }
            Err(_) => {
                slot.mem = None;
                Some((status, STATUS_IOERR, 1))
            }
        }
    }

    /// Moves volume completions into the used rings.
    fn complete(&mut self, ctx: &PollContext, vrings: &[Vring]) -> usize {
        let mut done = 0;
        // Completions come in runs for the same queue: keep its vring locked across a run.
        let mut locked: Option<(usize, VringWriteGuard<'_>)> = None;
        while let Some(completion) = self.queue.pop_completion() {
            done += 1;
            let local = (completion.user_data >> 16) as usize;
            let head = (completion.user_data & 0xffff) as u16;
            let (Some(queue), Some(vring)) = (self.queues.get_mut(local), vrings.get(local)) else {
                // Not a request this poller submitted: there is no guest request to complete.
                tracing::error!(volume = %ctx.name, local, head, "poller invariant broken: completion for an unknown queue");
                debug_assert!(false, "poller invariant broken: completion for unknown queue {local}");
                continue;
            };
            let Some(slot) = queue.slots.get_mut(head as usize) else {
                tracing::error!(volume = %ctx.name, local, head, "poller invariant broken: completion for an unknown head");
                debug_assert!(false, "poller invariant broken: completion for unknown head {head}");
                continue;
            };
            let status_byte = match completion.status {
                IoStatus::Ok => STATUS_OK,
                IoStatus::Unsupported => STATUS_UNSUPP,
                IoStatus::IoError(_) | IoStatus::OutOfRange => STATUS_IOERR,
            };
            let used_len = if status_byte == STATUS_OK { slot.used_len } else { 1 };
            if let Some(mem) = slot.mem.take() {
                write_status(&mem, slot.status, status_byte);
                if locked.as_ref().is_none_or(|(l, _)| *l != local) {
                    drop(locked.take());
                    locked = Some((local, vring.get_mut()));
                }
                if let Some((_, state)) = locked.as_mut() {
                    let _ = queue.inflight.add_used(state.get_queue_mut(), &*mem, head, used_len);
                }
            }
            slot.in_flight = false;
            ctx.queues[queue.index].in_flight.fetch_sub(1, Ordering::AcqRel);
            self.to_notify |= 1 << local;
        }
        ctx.completed.fetch_add(done as u64, Ordering::Relaxed);
        done
    }

    /// Interrupts the guest for queues that completed work, where it asked to be told.
    fn notify(&mut self, vrings: &[Vring], mem: &GuestMem) {
        if self.to_notify == 0 {
            return;
        }
        for (local, vring) in vrings.iter().enumerate() {
            if self.to_notify & (1 << local) == 0 {
                continue;
            }
            let mut state = vring.get_mut();
            if state.get_queue_mut().needs_notification(mem).unwrap_or(true) {
                if let Err(e) = state.signal_used_queue() {
                    tracing::warn!(error = %e, "cannot signal the used queue");
                }
            }
        }
        self.to_notify = 0;
    }

    /// Waits for everything in flight, completing it into the used rings and interrupting the
    /// guest for it: a request completed here without an interrupt would sit unseen in the used
    /// ring until some later completion, and a guest with nothing else outstanding would wait
    /// for it forever (or until the next daemon completed something on that queue).
    fn drain(&mut self, ctx: &PollContext, vrings: &[Vring], mem: &GuestMem) {
        let started = Instant::now();
        let outstanding = self.queue.outstanding();
        let deadline = started + Duration::from_secs(30);
        while self.queue.outstanding() > 0 && Instant::now() < deadline {
            self.queue.poll();
            self.complete(ctx, vrings);
            self.notify(vrings, mem);
            std::thread::yield_now();
        }
        if outstanding > 0 {
            // Slow path (once per poller at a stop or disconnect); the upgrade test reads it.
            tracing::info!(
                volume = %ctx.name,
                requests = outstanding - self.queue.outstanding(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "drained the requests in flight"
            );
        }
        if self.queue.outstanding() > 0 {
            tracing::error!(volume = %ctx.name, "requests still in flight after 30 s at disconnect");
        }
    }
}

impl<Q: VolumeQueue> Poller<Q> {
    /// After the connection's worker threads are gone: waits (at most 30 s) for requests still
    /// in the volume queue, whose completions no guest will see, so that nothing touches the
    /// guest's memory once this returns. Returns how many there were.
    pub(crate) fn abandon(&mut self, ctx: &PollContext) -> u32 {
        let mut abandoned = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.queue.poll();
            while let Some(completion) = self.queue.pop_completion() {
                abandoned += 1;
                let local = (completion.user_data >> 16) as usize;
                let head = (completion.user_data & 0xffff) as usize;
                let Some(queue) = self.queues.get_mut(local) else { continue };
                if let Some(slot) = queue.slots.get_mut(head) {
                    slot.in_flight = false;
                    slot.mem = None;
                    ctx.queues[queue.index].in_flight.fetch_sub(1, Ordering::AcqRel);
                }
            }
            if self.queue.outstanding() == 0 {
                return abandoned;
            }
            if Instant::now() >= deadline {
                tracing::error!(volume = %ctx.name, "requests still in flight 30 s after the connection ended");
                return abandoned;
            }
            self.queue.wait_for_completions(COMPLETION_WAIT, true);
            std::thread::yield_now();
        }
    }
}

/// Writes a request's status byte (best effort: a status address outside guest memory was
/// refused by the parser, and one that left with a memory table change has nobody to read it).
/// A byte lies in one region: one lookup, without the general range iterator of `write_obj`.
fn write_status(mem: &GuestMem, addr: GuestAddress, status_byte: u8) {
    if let Ok(slice) = vm_memory::GuestMemoryBackend::get_slice(mem, addr, 1) {
        let _ = slice.write_obj(status_byte, 0);
    }
}

fn rejection_outcome(ctx: &PollContext, queue: usize, rejection: &Rejection) -> (Option<GuestAddress>, u8, u32) {
    match rejection.status {
        Some(addr) => {
            // The guest learns of it from the status byte; only a chain without one is worth
            // an operator's attention by default.
            ctx.rejections.refuse(&ctx.name, queue, rejection.reason, true);
            (Some(addr), rejection.code, 1)
        }
        None => {
            ctx.rejections.refuse(&ctx.name, queue, rejection.reason, false);
            (None, STATUS_IOERR, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_flight_window_grows_while_sleeps_are_short_and_shrinks_when_they_are_long() {
        let mut w = InFlightWindow::default();
        let t0 = Instant::now();
        assert_eq!(w.window(), Duration::ZERO, "starts by sleeping at once");
        // Woken without having slept for requests in flight: nothing learnt.
        w.wakes(t0);
        assert_eq!(w.window(), Duration::ZERO);
        // Completions come 20 µs after each sleep: polling that long would have caught them.
        let mut t = t0;
        for want in [4, 8, 16, 32, 64, 100, 100] {
            w.sleeps(t);
            t += Duration::from_micros(20);
            w.wakes(t);
            assert_eq!(w.window(), Duration::from_micros(want));
        }
        // A disk that takes 150 µs: polling does not pay, the window closes.
        for want in [50_000, 25_000, 12_500, 6_250, 0, 0] {
            w.sleeps(t);
            t += Duration::from_micros(150);
            w.wakes(t);
            assert_eq!(w.window(), Duration::from_nanos(want));
        }
    }

    #[test]
    fn every_refusal_is_counted_but_few_are_logged() {
        let rejections = Rejections::default();
        let t0 = Instant::now();
        let logged = (0..10_000).filter(|_| matches!(rejections.record(t0, false), Verdict::Log { .. })).count();
        assert_eq!(rejections.count(), 10_000);
        assert_eq!(logged, LOG_BURST as usize);
        // The first malformed refusal of the next interval is logged, with the count of those
        // left out.
        let later = t0 + LOG_INTERVAL;
        assert_eq!(rejections.record(later, false), Verdict::Log { suppressed: 10_000 - u64::from(LOG_BURST) });
        assert_eq!(rejections.count(), 10_001);
    }

    #[test]
    fn refusals_a_good_driver_may_cause_do_not_silence_malformed_ones() {
        let rejections = Rejections::default();
        let t0 = Instant::now();
        let logged = (0..10_000).filter(|_| matches!(rejections.record(t0, true), Verdict::Log { .. })).count();
        assert_eq!(logged, LOG_BURST as usize);
        assert_eq!(rejections.record(t0, false), Verdict::Log { suppressed: 0 });
        assert_eq!(rejections.count(), 10_001);
    }
}
