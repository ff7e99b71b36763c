//! A shard queue: one polling thread's window onto a volume's backing.
//!
//! ```text
//!   submitters ──submit()──▶ [ArrayQueue<IoRequest>] ──poll()──▶ io_uring (O_DIRECT, fixed file)
//!                                                    │            ram / null: done inline
//!   submitter ◀─pop_completion()── [ArrayQueue<IoCompletion>] ◀── CQEs
//! ```
//!
//! Every queue is bounded by `depth`: `submit` refuses once `depth` requests are outstanding
//! (queued, in the ring, or completed but not yet popped), so the completion queue can never
//! overflow and memory stays bounded.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use io_uring::{opcode, types, IoUring};

use crate::backing::{BLKDISCARD, BLKZEROOUT};
use crate::{Backing, BackingKind, Error, HugeBuffer, IoCompletion, IoRequest, IoStatus, Op};

/// Alignment bounce buffers are one hugepage; larger unaligned requests go through it in chunks.
const BOUNCE_BYTES: usize = crate::HUGEPAGE_SIZE_BYTES;

#[derive(Clone, Copy, Debug)]
pub struct ShardQueueConfig {
    /// Most requests outstanding at once; also the io_uring size. Default 256; between 1 and
    /// [`ShardQueue::DEPTH_MAX`].
    pub depth: u32,
    /// One thread drives the queue (`poll`, `wait_for_disk`) for its whole
    /// life, the first one to call them: the ring then posts completions only when that
    /// thread asks for them (`IORING_SETUP_DEFER_TASKRUN`), instead of the kernel waking or
    /// interrupting it for every completion. Default off (any thread may drive the queue).
    pub single_thread: bool,
}

impl Default for ShardQueueConfig {
    fn default() -> Self {
        Self { depth: 256, single_thread: false }
    }
}

/// A poller with at least this many writes (or other non-reads) in the disk sleeps in the ring
/// until some complete (see [`ShardQueue::wait_for_disk`]) even when the guest has more to
/// submit.
const DISK_BOUND_WRITES: u32 = 8;

pub struct ShardQueue {
    backing: Arc<Backing>,
    depth: u32,
    outstanding: AtomicU32,
    submissions: ArrayQueue<IoRequest>,
    completions: ArrayQueue<IoCompletion>,
    engine: Option<UringEngine>,
    bounce: Option<HugeBuffer>,
}

/// The io_uring half, present for file and device backings.
struct UringEngine {
    ring: IoUring,
    /// Requests in the ring, indexed by the SQE's user_data.
    slots: Vec<Option<IoRequest>>,
    free_slots: Vec<u32>,
    /// Signalled by the kernel on every CQE, for pollers that sleep in epoll.
    eventfd: OwnedFd,
    unsubmitted: u32,
    /// The ring runs its completion work only when asked (see
    /// [`ShardQueueConfig::single_thread`]); it is enabled by the first call that uses it.
    deferred: bool,
    enabled: bool,
    /// Driven from another thread than the one that enabled it (logged once).
    misused: bool,
    /// Requests in the ring other than reads: these may need kernel worker threads.
    non_reads_in_flight: u32,
}

impl ShardQueue {
    /// The deepest queue: it bounds the memory of the queues and the ring (the next power of
    /// two), and one poller thread gains nothing from more requests in flight on one backing.
    pub const DEPTH_MAX: u32 = 4096;

    /// Refuses a `depth` of 0 or above [`Self::DEPTH_MAX`].
    pub fn new(backing: Arc<Backing>, config: ShardQueueConfig) -> Result<Self, Error> {
        let depth = config.depth;
        if !(1..=Self::DEPTH_MAX).contains(&depth) {
            return Err(Error::Depth { depth, max: Self::DEPTH_MAX });
        }
        let (engine, bounce) = match backing.kind() {
            BackingKind::File | BackingKind::Device => {
                let fd = backing
                    .raw_fd()
                    .ok_or_else(|| Error::Uring(std::io::Error::other("file backing without a descriptor")))?;
                (Some(UringEngine::new(depth, fd, config)?), Some(HugeBuffer::new(BOUNCE_BYTES)?))
            }
            BackingKind::Ram | BackingKind::Null => (None, None),
        };
        Ok(Self {
            backing,
            depth,
            outstanding: AtomicU32::new(0),
            submissions: ArrayQueue::new(depth as usize),
            completions: ArrayQueue::new(depth as usize),
            engine,
            bounce,
        })
    }

    pub fn backing(&self) -> &Arc<Backing> {
        &self.backing
    }

    /// Requests submitted and not yet popped as completions.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Acquire)
    }

    /// True when `submit` would refuse.
    pub fn is_full(&self) -> bool {
        self.outstanding() >= self.depth
    }

    /// An eventfd the kernel signals on io_uring completions, for a poller that sleeps in epoll
    /// while requests are in flight. `None` for backings that complete inline.
    pub fn completion_eventfd(&self) -> Option<RawFd> {
        self.engine.as_ref().map(|e| e.eventfd.as_raw_fd())
    }

    /// Queues a request. Gives it back when `depth` requests are already outstanding.
    ///
    /// # Safety
    /// `request.iov` must point at `request.iov_count` iovecs, and each iovec at memory valid
    /// for reads (writes) and writes (reads) of its length; all of it must stay valid and not
    /// be reused until this request's completion has been returned by `pop_completion`.
    pub unsafe fn submit(&self, request: IoRequest) -> Result<(), IoRequest> {
        let prev = self.outstanding.fetch_add(1, Ordering::AcqRel);
        if prev >= self.depth {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(request);
        }
        // Cannot fail: the queue holds `depth` entries and at most `depth` are outstanding.
        if let Err(request) = self.submissions.push(request) {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(request);
        }
        Ok(())
    }

    /// Sleeps until the ring completes something or `timeout` passes, when sleeping is what
    /// the disk's requests need, and nothing is waiting to be popped. A poller calls this
    /// between passes: `idle` after a pass that found nothing to do.
    ///
    /// Writes (and other non-read operations) on a file system complete through kernel work
    /// that runs after the disk's interrupt, in a worker bound to the core that took it: often
    /// the poller's, whose spinning (it may well outrank that worker) would hold them back.
    /// So it sleeps when the poller is `idle` with non-reads in the ring, or, idle or not,
    /// while [`DISK_BOUND_WRITES`] or more are: the guest's new requests gather meanwhile and
    /// go to the disk as one submission, one doorbell. Reads complete from interrupts, and
    /// their latency is the poller's to keep low: they are left to spin on.
    pub fn wait_for_disk(&mut self, timeout: std::time::Duration, idle: bool) {
        if !self.completions.is_empty() {
            return;
        }
        let Some(engine) = self.engine.as_mut() else { return };
        let writes = engine.non_reads_in_flight;
        let disk_bound = writes >= DISK_BOUND_WRITES;
        if !(disk_bound || idle && writes > 0) {
            return;
        }
        engine.enable();
        // Woken for half the writes in flight rather than for each: the kernel work
        // that completes them then runs in batches, instead of being preempted by the poller
        // after every one (measured: 3× the IOPS at 32 deep, bench/RESULTS.md).
        let want = if disk_bound { writes / 2 } else { 1 };
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match engine.ring.submitter().submit_with_args(want as usize, &args) {
            Ok(_) => engine.submitted(),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
            Err(e) => tracing::warn!(error = %e, "io_uring wait failed"),
        }
    }

    /// Takes one finished request off the completion queue.
    pub fn pop_completion(&self) -> Option<IoCompletion> {
        let completion = self.completions.pop()?;
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        Some(completion)
    }

    /// Moves queued requests into the backing and finished ones onto the completion queue.
    /// Never blocks on the ring; returns how many requests it moved (0 = idle).
    pub fn poll(&mut self) -> usize {
        let mut progress = self.reap();
        while let Some(request) = self.submissions.pop() {
            progress += 1;
            if let Some(status) = self.start(request) {
                self.complete(request.user_data, status);
            }
            if self.engine.as_ref().is_some_and(|e| e.free_slots.is_empty()) {
                break;
            }
        }
        if let Some(engine) = self.engine.as_mut() {
            if engine.unsubmitted > 0 {
                engine.submit();
            }
        }
        progress + self.reap()
    }

    fn complete(&self, user_data: u64, status: IoStatus) {
        push_completion(&self.completions, IoCompletion { user_data, status });
    }

    fn reap(&mut self) -> usize {
        let Some(engine) = self.engine.as_mut() else { return 0 };
        engine.enable();
        engine.run_deferred();
        let UringEngine { ring, slots, free_slots, non_reads_in_flight, .. } = engine;
        let mut reaped = 0;
        for cqe in ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(request) = slots.get_mut(slot).and_then(Option::take) else {
                // No request to complete: whatever the ring answered is not ours.
                tracing::error!(slot, "shard invariant broken: io_uring completion for an empty slot");
                debug_assert!(false, "shard invariant broken: io_uring completion for an empty slot {slot}");
                continue;
            };
            free_slots.push(slot as u32);
            if request.op != Op::Read {
                *non_reads_in_flight = non_reads_in_flight.saturating_sub(1);
            }
            let status = status_of(&request, cqe.result());
            push_completion(&self.completions, IoCompletion { user_data: request.user_data, status });
            reaped += 1;
        }
        reaped
    }

    /// Starts one request; returns its status if it finished at once.
    fn start(&mut self, request: IoRequest) -> Option<IoStatus> {
        let backing = &self.backing;
        let capacity = backing.capacity_bytes();
        let in_range = request.offset_bytes.checked_add(request.len_bytes).is_some_and(|end| end <= capacity);
        let mutates = !matches!(request.op, Op::Read | Op::Flush);
        if mutates && backing.read_only() {
            return Some(IoStatus::IoError(libc::EROFS));
        }
        if request.op != Op::Flush && !in_range {
            return Some(IoStatus::OutOfRange);
        }
        match backing.kind() {
            BackingKind::Null => Some(IoStatus::Ok),
            BackingKind::Ram => Some(self.ram_io(&request)),
            BackingKind::File | BackingKind::Device => self.disk_io(request),
        }
    }

    fn ram_io(&self, request: &IoRequest) -> IoStatus {
        let Some(ram) = self.backing.ram() else {
            return broken_invariant("a ram backing without its memory", request);
        };
        // Range checked by `start`: offset + len <= capacity <= ram.len().
        let offset = request.offset_bytes as usize;
        let len = request.len_bytes as usize;
        if offset + len > ram.len() {
            return IoStatus::OutOfRange;
        }
        // SAFETY: [offset, offset+len) lies inside the ram mapping (checked above). Concurrent
        // guest requests to overlapping ranges race exactly as they would on a disk.
        let ram = unsafe { ram.as_ptr().add(offset) };
        match request.op {
            // SAFETY: the submit contract keeps the iovecs valid; `ram` has `len` bytes.
            Op::Read => unsafe { copy_to_iovecs(request, 0, ram, len) },
            // SAFETY: as above.
            Op::Write => unsafe { copy_from_iovecs(request, 0, ram, len) },
            Op::Discard | Op::WriteZeroes { .. } => {
                // SAFETY: `ram` has `len` writable bytes (checked above).
                unsafe { std::ptr::write_bytes(ram, 0, len) };
            }
            Op::Flush => {}
        }
        IoStatus::Ok
    }

    /// `None`: the request is in the ring. Every other outcome is a status, so a request can
    /// never be lost between the two.
    fn disk_io(&mut self, request: IoRequest) -> Option<IoStatus> {
        let backing = Arc::clone(&self.backing);
        let Some(fd) = backing.raw_fd() else {
            return Some(broken_invariant("a file or device backing without a descriptor", &request));
        };
        let device = backing.kind() == BackingKind::Device;
        if backing.needs_rmw() && !matches!(request.op, Op::Read | Op::Flush) {
            // Every write of such a volume is serialised so that read-modify-write cycles of a
            // device block never interleave (see `Backing::rmw_lock`).
            let _guard = backing.rmw_lock.lock().unwrap_or_else(|p| p.into_inner());
            return Some(self.sync_io(fd, &request, device));
        }
        match request.op {
            Op::Read | Op::Write if self.is_direct_aligned(&request) => {
                let (engine, slot) = match self.engine_slot(&request) {
                    Ok(found) => found,
                    Err(status) => return Some(status),
                };
                let entry = if request.op == Op::Read {
                    opcode::Readv::new(types::Fixed(0), request.iov, request.iov_count)
                        .offset(request.offset_bytes)
                        .build()
                } else {
                    opcode::Writev::new(types::Fixed(0), request.iov, request.iov_count)
                        .offset(request.offset_bytes)
                        .rw_flags(if request.fua { libc::RWF_DSYNC } else { 0 })
                        .build()
                };
                engine.push(slot, request, entry)
            }
            Op::Read | Op::Write => Some(self.sync_io(fd, &request, device)),
            Op::Flush => {
                let (engine, slot) = match self.engine_slot(&request) {
                    Ok(found) => found,
                    Err(status) => return Some(status),
                };
                let entry = opcode::Fsync::new(types::Fixed(0)).flags(types::FsyncFlags::DATASYNC).build();
                engine.push(slot, request, entry)
            }
            Op::Discard | Op::WriteZeroes { .. } if device => Some(self.sync_io(fd, &request, true)),
            Op::Discard | Op::WriteZeroes { .. } => {
                let mode = match request.op {
                    Op::WriteZeroes { unmap: false } => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                };
                let (engine, slot) = match self.engine_slot(&request) {
                    Ok(found) => found,
                    Err(status) => return Some(status),
                };
                let entry = opcode::Fallocate::new(types::Fixed(0), request.len_bytes)
                    .offset(request.offset_bytes)
                    .mode(mode)
                    .build();
                engine.push(slot, request, entry)
            }
        }
    }

    /// The ring and a free slot in it for `request`. Both always exist for a file or device
    /// backing: `new` makes the ring, and `poll` stops taking requests while no slot is free.
    fn engine_slot(&mut self, request: &IoRequest) -> Result<(&mut UringEngine, u32), IoStatus> {
        let Some(engine) = self.engine.as_mut() else {
            return Err(broken_invariant("a file or device backing without an io_uring", request));
        };
        if !engine.enabled {
            // The kernel refused to enable the ring (logged): fail the request rather than
            // leave it in a ring that will never start it.
            return Err(IoStatus::IoError(libc::EIO));
        }
        match engine.free_slots.pop() {
            Some(slot) => Ok((engine, slot)),
            None => Err(broken_invariant("no free io_uring slot for a request taken off the queue", request)),
        }
    }

    fn is_direct_aligned(&self, request: &IoRequest) -> bool {
        let offset_align = u64::from(self.backing.dio_offset_align());
        let mem_align = self.backing.dio_mem_align() as usize;
        if !request.offset_bytes.is_multiple_of(offset_align) || !request.len_bytes.is_multiple_of(offset_align) {
            return false;
        }
        // SAFETY: the submit contract: `iov` points at `iov_count` valid iovecs.
        let iovecs = unsafe { iovec_slice(request) };
        iovecs.iter().all(|v| (v.iov_base as usize).is_multiple_of(mem_align) && v.iov_len % mem_align == 0)
    }

    /// The slow path, run inline: unaligned reads and writes through the hugepage bounce
    /// buffer (read-modify-write of partial device blocks), and block-device discard and
    /// zeroing, which have no io_uring opcode.
    fn sync_io(&mut self, fd: RawFd, request: &IoRequest, device: bool) -> IoStatus {
        let result = match request.op {
            Op::Read => self.bounce_read(fd, request),
            Op::Write => self.bounce_write(fd, request),
            Op::Flush => fdatasync(fd),
            Op::Discard | Op::WriteZeroes { .. } if device => {
                let ioctl = if request.op == Op::Discard { BLKDISCARD } else { BLKZEROOUT };
                let range: [u64; 2] = [request.offset_bytes, request.len_bytes];
                // SAFETY: both ioctls read a [u64; 2] (start, length) through the pointer.
                let rc = unsafe { libc::ioctl(fd, ioctl, range.as_ptr()) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            Op::Discard | Op::WriteZeroes { .. } => {
                let mode = match request.op {
                    Op::WriteZeroes { unmap: false } => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                };
                // SAFETY: plain syscall on an open fd with in-range values.
                let rc = unsafe { libc::fallocate(fd, mode, request.offset_bytes as i64, request.len_bytes as i64) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
        };
        let result = result.and_then(|()| if request.fua && request.op == Op::Write { fdatasync(fd) } else { Ok(()) });
        match result {
            Ok(()) => IoStatus::Ok,
            Err(e) => {
                tracing::warn!(error = %e, op = ?request.op, offset = request.offset_bytes, "backing I/O failed");
                IoStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO))
            }
        }
    }

    fn bounce_read(&mut self, fd: RawFd, request: &IoRequest) -> std::io::Result<()> {
        let align = u64::from(self.backing.dio_offset_align());
        let bounce = self.bounce.as_mut().ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        let end = request.offset_bytes + request.len_bytes;
        let mut pos = request.offset_bytes;
        while pos < end {
            let chunk_start = pos - pos % align;
            let chunk_end = (chunk_start + bounce.len() as u64).min(end.next_multiple_of(align));
            let buf = &mut bounce.as_mut_slice()[..(chunk_end - chunk_start) as usize];
            pread_exact(fd, buf, chunk_start)?;
            let take = (chunk_end.min(end) - pos) as usize;
            let from = (pos - chunk_start) as usize;
            // SAFETY: the submit contract keeps the iovecs valid; `from + take <= buf.len()`.
            unsafe { copy_to_iovecs(request, (pos - request.offset_bytes) as usize, buf[from..].as_ptr(), take) };
            pos += take as u64;
        }
        Ok(())
    }

    fn bounce_write(&mut self, fd: RawFd, request: &IoRequest) -> std::io::Result<()> {
        let align = u64::from(self.backing.dio_offset_align());
        let bounce = self.bounce.as_mut().ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        let end = request.offset_bytes + request.len_bytes;
        let mut pos = request.offset_bytes;
        while pos < end {
            let chunk_start = pos - pos % align;
            let chunk_end = (chunk_start + bounce.len() as u64).min(end.next_multiple_of(align));
            let chunk_len = (chunk_end - chunk_start) as usize;
            let take = (chunk_end.min(end) - pos) as usize;
            let from = (pos - chunk_start) as usize;
            let buf = &mut bounce.as_mut_slice()[..chunk_len];
            // Partial device blocks at either edge keep the bytes the request does not cover.
            if from != 0 {
                pread_exact(fd, &mut buf[..align as usize], chunk_start)?;
            }
            if from + take < chunk_len {
                let last = chunk_len - align as usize;
                pread_exact(fd, &mut buf[last..], chunk_start + last as u64)?;
            }
            // SAFETY: the submit contract keeps the iovecs valid; `from + take <= buf.len()`.
            unsafe { copy_from_iovecs(request, (pos - request.offset_bytes) as usize, buf[from..].as_mut_ptr(), take) };
            pwrite_all(fd, buf, chunk_start)?;
            pos += take as u64;
        }
        Ok(())
    }
}

impl UringEngine {
    fn new(depth: u32, fd: RawFd, config: ShardQueueConfig) -> Result<Self, Error> {
        let entries = depth.next_power_of_two();
        let mut deferred = false;
        let ring = if config.single_thread {
            // Disabled until the driving thread enables it: a single-issuer ring belongs to the
            // thread that enables it, and the queue is made on another thread than its poller.
            let built = IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .setup_r_disabled()
                .build(entries);
            match built {
                Ok(ring) => {
                    deferred = true;
                    ring
                }
                Err(e) => {
                    // Linux before 6.1: completions then interrupt the poller, nothing worse.
                    tracing::debug!(error = %e, "io_uring without deferred task work");
                    IoUring::builder().build(entries).map_err(Error::Uring)?
                }
            }
        } else {
            IoUring::builder().build(entries).map_err(Error::Uring)?
        };
        ring.submitter().register_files(&[fd]).map_err(Error::Uring)?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::Uring(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd()).map_err(Error::Uring)?;
        Ok(Self {
            ring,
            slots: vec![None; depth as usize],
            free_slots: (0..depth).rev().collect(),
            eventfd,
            unsubmitted: 0,
            deferred,
            enabled: !deferred,
            misused: false,
            non_reads_in_flight: 0,
        })
    }

    /// Enables a deferred ring on its first use, which makes the calling thread its only
    /// submitter.
    fn enable(&mut self) {
        if self.enabled {
            return;
        }
        match self.ring.submitter().register_enable_rings() {
            Ok(()) => self.enabled = true,
            Err(e) => tracing::error!(error = %e, "cannot enable the io_uring"),
        }
    }

    /// Posts the completions the kernel deferred, if it says it has some.
    fn run_deferred(&mut self) {
        if !self.deferred || !self.ring.submission().taskrun() {
            return;
        }
        // SAFETY: no argument is passed (size 0 of `()`), and with `to_submit` 0 the kernel
        // reads no submission entry.
        match unsafe { self.ring.submitter().enter::<libc::sigset_t>(0, 0, io_uring_sys::IORING_ENTER_GETEVENTS, None) }
        {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                // Another thread than the one that enabled the ring: a bug in the caller
                // (`ShardQueueConfig::single_thread`); the completions wait for that thread.
                if !std::mem::replace(&mut self.misused, true) {
                    tracing::error!("shard invariant broken: a single-thread queue driven from another thread");
                    debug_assert!(false, "shard invariant broken: a single-thread queue driven from another thread");
                }
            }
            Err(e) => tracing::warn!(error = %e, "io_uring completion run failed"),
        }
    }

    fn submit(&mut self) {
        match self.ring.submit() {
            Ok(_) => self.submitted(),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) || e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) => tracing::error!(error = %e, "io_uring submit failed"),
        }
    }

    /// Every entry in the ring has been handed to the kernel.
    fn submitted(&mut self) {
        self.unsubmitted = 0;
    }

    /// Puts an SQE in the ring; returns a status only if the request failed to start.
    fn push(&mut self, slot: u32, request: IoRequest, entry: io_uring::squeue::Entry) -> Option<IoStatus> {
        let entry = entry.user_data(u64::from(slot));
        self.slots[slot as usize] = Some(request);
        // SAFETY: the SQE's iovec array and buffers stay valid until completion (the submit
        // contract), and the request is kept in `slots` until its CQE is reaped.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Flush the SQ to make room, then retry once.
            if self.ring.submit().is_ok() {
                self.submitted();
            }
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                self.slots[slot as usize] = None;
                self.free_slots.push(slot);
                return Some(IoStatus::IoError(libc::EAGAIN));
            }
        }
        self.unsubmitted += 1;
        if request.op != Op::Read {
            self.non_reads_in_flight += 1;
        }
        None
    }
}

/// The io_uring_enter flag `run_deferred` uses (include/uapi/linux/io_uring.h).
mod io_uring_sys {
    pub const IORING_ENTER_GETEVENTS: u32 = 1 << 0;
}

/// Cannot fail: the completion queue holds `depth` entries and a completion only exists for
/// one of the at most `depth` outstanding requests (see `submit`). Were it to fail, the request
/// would be lost, so that is said loudly.
fn push_completion(completions: &ArrayQueue<IoCompletion>, completion: IoCompletion) {
    if completions.push(completion).is_err() {
        tracing::error!(
            user_data = completion.user_data,
            "shard invariant broken: completion queue full; the request is lost"
        );
        debug_assert!(false, "shard invariant broken: completion queue full");
    }
}

/// A bug in this module, reported where nobody can miss it: a panic in debug builds (tests),
/// and in release an error line and an I/O error for the request, never a request that
/// silently stays in flight (the guest would wait for it forever).
fn broken_invariant(what: &str, request: &IoRequest) -> IoStatus {
    tracing::error!(op = ?request.op, offset = request.offset_bytes, len = request.len_bytes, "shard invariant broken: {what}; the request fails with EIO");
    debug_assert!(false, "shard invariant broken: {what}");
    IoStatus::IoError(libc::EIO)
}

fn status_of(request: &IoRequest, result: i32) -> IoStatus {
    if result < 0 {
        let errno = -result;
        tracing::warn!(errno, op = ?request.op, offset = request.offset_bytes, "backing I/O failed");
        return IoStatus::IoError(errno);
    }
    match request.op {
        Op::Read | Op::Write if result as u64 != request.len_bytes => {
            tracing::warn!(got = result, want = request.len_bytes, op = ?request.op, "short backing I/O");
            IoStatus::IoError(libc::EIO)
        }
        _ => IoStatus::Ok,
    }
}

fn fdatasync(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: plain syscall on an open fd.
    if unsafe { libc::fdatasync(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn pread_exact(fd: RawFd, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the destination is the unread tail of `buf`, valid for writes of its length.
        let n = unsafe {
            libc::pread(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done, (offset + done as u64) as i64)
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => {
                // Past the end of a sparse file that has not been extended: reads as zeroes.
                buf[done..].fill(0);
                return Ok(());
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn pwrite_all(fd: RawFd, buf: &[u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the source is the unwritten tail of `buf`, valid for reads of its length.
        let n =
            unsafe { libc::pwrite(fd, buf[done..].as_ptr().cast(), buf.len() - done, (offset + done as u64) as i64) };
        if n > 0 {
            done += n as usize;
        } else {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// # Safety
/// `request.iov` must point at `request.iov_count` valid iovecs (or be null with a zero count).
unsafe fn iovec_slice(request: &IoRequest) -> &[libc::iovec] {
    if request.iov.is_null() || request.iov_count == 0 {
        return &[];
    }
    // SAFETY: per the function's contract.
    unsafe { std::slice::from_raw_parts(request.iov, request.iov_count as usize) }
}

/// Copies `len` bytes from `src` into the request's buffers, starting `skip` bytes into them.
///
/// # Safety
/// The request's iovecs must be valid for writes; `src` valid for reads of `len` bytes.
unsafe fn copy_to_iovecs(request: &IoRequest, skip: usize, src: *const u8, len: usize) {
    let mut skip = skip;
    let mut copied = 0;
    // SAFETY: forwarded contract.
    for v in unsafe { iovec_slice(request) } {
        if copied == len {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len - copied);
        // SAFETY: `v` covers `iov_len` writable bytes and `skip + n <= iov_len`; `src` has
        // `len` readable bytes and `copied + n <= len`; guest buffers never overlap our own.
        unsafe { std::ptr::copy_nonoverlapping(src.add(copied), v.iov_base.cast::<u8>().add(skip), n) };
        copied += n;
        skip = 0;
    }
}

/// Copies `len` bytes out of the request's buffers, starting `skip` bytes into them, to `dst`.
///
/// # Safety
/// The request's iovecs must be valid for reads; `dst` valid for writes of `len` bytes.
unsafe fn copy_from_iovecs(request: &IoRequest, skip: usize, dst: *mut u8, len: usize) {
    let mut skip = skip;
    let mut copied = 0;
    // SAFETY: forwarded contract.
    for v in unsafe { iovec_slice(request) } {
        if copied == len {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len - copied);
        // SAFETY: mirror of `copy_to_iovecs`.
        unsafe { std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>().add(skip), dst.add(copied), n) };
        copied += n;
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackingConfig;
    use std::alloc::{alloc_zeroed, dealloc, Layout};

    /// A page-aligned heap buffer, as a guest's would be.
    struct Aligned {
        ptr: *mut u8,
        layout: Layout,
    }
    impl Aligned {
        fn new(len: usize) -> Self {
            let layout = Layout::from_size_align(len, 4096).unwrap();
            // SAFETY: non-zero size.
            let ptr = unsafe { alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            Self { ptr, layout }
        }
        fn slice(&mut self) -> &mut [u8] {
            // SAFETY: owned allocation of layout.size() initialised bytes.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
        }
        fn iov(&self, offset: usize, len: usize) -> libc::iovec {
            assert!(offset + len <= self.layout.size());
            // SAFETY: in bounds, checked above.
            libc::iovec { iov_base: unsafe { self.ptr.add(offset) }.cast(), iov_len: len }
        }
    }
    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: allocated with this layout.
            unsafe { dealloc(self.ptr, self.layout) }
        }
    }

    fn file_backing(dir: &tempfile::TempDir, size: u64, read_only: bool) -> Arc<Backing> {
        let config = BackingConfig {
            kind: BackingKind::File,
            path: Some(dir.path().join("vol.img")),
            size_bytes: size,
            block_size: 512,
            read_only,
            create: true,
        };
        Arc::new(Backing::open(&config).expect("open file backing"))
    }

    fn run(queue: &mut ShardQueue, request: IoRequest) -> IoStatus {
        // SAFETY: every test keeps its buffers alive until the completion is popped below.
        unsafe { queue.submit(request) }.expect("queue has room");
        for _ in 0..100_000 {
            queue.poll();
            if let Some(c) = queue.pop_completion() {
                assert_eq!(c.user_data, request.user_data);
                return c.status;
            }
            std::thread::yield_now();
        }
        panic!("request {:?} never completed", request.op);
    }

    fn rw(op: Op, offset: u64, iov: &[libc::iovec]) -> IoRequest {
        IoRequest {
            user_data: 42,
            op,
            offset_bytes: offset,
            len_bytes: iov.iter().map(|v| v.iov_len as u64).sum(),
            iov: iov.as_ptr(),
            iov_count: iov.len() as u32,
            fua: false,
        }
    }

    #[test]
    fn aligned_and_unaligned_io_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let backing = file_backing(&dir, 1 << 20, false);
        let mut queue = ShardQueue::new(backing, ShardQueueConfig::default()).unwrap();
        let mut buf = Aligned::new(64 << 10);
        for (i, b) in buf.slice().iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        // Two segments, page aligned: the io_uring path.
        let iov = [buf.iov(0, 8192), buf.iov(16384, 4096)];
        assert_eq!(run(&mut queue, rw(Op::Write, 4096, &iov)), IoStatus::Ok);
        // Misaligned memory and a 512-byte offset: the bounce path.
        let odd = [buf.iov(100, 1000), buf.iov(5000, 24)];
        assert_eq!(run(&mut queue, rw(Op::Write, 512 * 100 + 3, &odd)), IoStatus::Ok);

        let mut back = Aligned::new(64 << 10);
        let iov_back = [back.iov(0, 12288)];
        assert_eq!(run(&mut queue, rw(Op::Read, 4096, &iov_back)), IoStatus::Ok);
        let (src, dst) = (buf.slice().to_vec(), back.slice().to_vec());
        assert_eq!(&dst[..8192], &src[..8192]);
        assert_eq!(&dst[8192..12288], &src[16384..20480]);

        let odd_back = [back.iov(33, 1024)];
        assert_eq!(run(&mut queue, rw(Op::Read, 512 * 100 + 3, &odd_back)), IoStatus::Ok);
        let dst = back.slice().to_vec();
        assert_eq!(&dst[33..33 + 1000], &src[100..1100]);
        assert_eq!(&dst[33 + 1000..33 + 1024], &src[5000..5024]);
        // The bytes around the unaligned write were preserved (they were zero).
        let mut edge = Aligned::new(4096);
        let iov_edge = [edge.iov(0, 512)];
        assert_eq!(run(&mut queue, rw(Op::Read, 512 * 100, &iov_edge)), IoStatus::Ok);
        assert_eq!(&edge.slice()[..3], &[0, 0, 0]);
        assert_eq!(&edge.slice()[3..512], &src[100..609]);
    }

    /// A poller's queue: made on one thread, driven by another for its whole life (the ring is
    /// single-issuer with deferred completions), 32 requests deep so that `wait_for_disk`
    /// sleeps for completions between passes that had work.
    #[test]
    fn a_queue_made_on_one_thread_serves_a_deep_queue_from_another() {
        let dir = tempfile::tempdir().unwrap();
        let backing = file_backing(&dir, 1 << 20, false);
        let queue = ShardQueue::new(backing, ShardQueueConfig { depth: 64, single_thread: true }).unwrap();
        std::thread::spawn(move || {
            let mut queue = queue;
            const N: usize = 32;
            let mut data = Aligned::new(N * 4096);
            for (i, b) in data.slice().iter_mut().enumerate() {
                *b = (i / 4096 * 31 + i % 253) as u8;
            }
            let mut back = Aligned::new(N * 4096);
            let (src_iov, dst_iov): (Vec<_>, Vec<_>) =
                (0..N).map(|i| ([data.iov(i * 4096, 4096)], [back.iov(i * 4096, 4096)])).unzip();
            for (op, iovs) in [(Op::Write, &src_iov), (Op::Read, &dst_iov)] {
                for (i, iov) in iovs.iter().enumerate() {
                    // Every other block, so that no two requests touch.
                    let request = IoRequest { user_data: i as u64, ..rw(op, (2 * i * 4096) as u64, iov) };
                    // SAFETY: the buffers and iovecs live until every completion is popped below.
                    unsafe { queue.submit(request) }.expect("queue has room");
                }
                let mut done = [false; N];
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while done.iter().any(|d| !d) {
                    assert!(std::time::Instant::now() < deadline, "{op:?}s never completed: {done:?}");
                    let work = queue.poll();
                    while let Some(c) = queue.pop_completion() {
                        assert_eq!(c.status, IoStatus::Ok);
                        assert!(!std::mem::replace(&mut done[c.user_data as usize], true), "completed twice");
                    }
                    queue.wait_for_disk(std::time::Duration::from_micros(50), work == 0);
                }
            }
            assert_eq!(queue.outstanding(), 0);
            assert_eq!(back.slice(), data.slice());
        })
        .join()
        .expect("the driving thread");
    }

    #[test]
    fn flush_discard_and_write_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let backing = file_backing(&dir, 1 << 20, false);
        let mut queue = ShardQueue::new(backing, ShardQueueConfig::default()).unwrap();
        let mut buf = Aligned::new(16384);
        buf.slice().fill(0xab);
        let iov = [buf.iov(0, 16384)];
        assert_eq!(run(&mut queue, rw(Op::Write, 0, &iov)), IoStatus::Ok);
        assert_eq!(run(&mut queue, IoRequest::without_data(1, Op::Flush, 0, 0)), IoStatus::Ok);
        let zero = IoRequest::without_data(2, Op::WriteZeroes { unmap: false }, 4096, 4096);
        assert_eq!(run(&mut queue, IoRequest { user_data: 42, ..zero }), IoStatus::Ok);
        let unmap = IoRequest::without_data(42, Op::WriteZeroes { unmap: true }, 8192, 4096);
        assert_eq!(run(&mut queue, unmap), IoStatus::Ok);
        let discard = IoRequest::without_data(42, Op::Discard, 12288, 4096);
        assert_eq!(run(&mut queue, discard), IoStatus::Ok);
        let mut back = Aligned::new(16384);
        let iov_back = [back.iov(0, 16384)];
        assert_eq!(run(&mut queue, rw(Op::Read, 0, &iov_back)), IoStatus::Ok);
        let back = back.slice();
        assert!(back[..4096].iter().all(|b| *b == 0xab));
        assert!(back[4096..12288].iter().all(|b| *b == 0), "write-zeroes must read back zero");
    }

    #[test]
    fn out_of_range_and_read_only_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let backing = file_backing(&dir, 1 << 20, false);
        drop(backing);
        let backing = file_backing(&dir, 1 << 20, true);
        let mut queue = ShardQueue::new(backing, ShardQueueConfig::default()).unwrap();
        let buf = Aligned::new(4096);
        let iov = [buf.iov(0, 4096)];
        assert_eq!(run(&mut queue, rw(Op::Read, (1 << 20) - 2048, &iov)), IoStatus::OutOfRange);
        assert_eq!(run(&mut queue, rw(Op::Read, u64::MAX - 100, &iov)), IoStatus::OutOfRange);
        assert_eq!(run(&mut queue, rw(Op::Write, 0, &iov)), IoStatus::IoError(libc::EROFS));
        assert_eq!(run(&mut queue, rw(Op::Read, 0, &iov)), IoStatus::Ok);
    }

    #[test]
    fn submit_refuses_past_depth() {
        let config = BackingConfig {
            kind: BackingKind::Null,
            path: None,
            size_bytes: 1 << 20,
            block_size: 512,
            read_only: false,
            create: false,
        };
        let queue = ShardQueue::new(
            Arc::new(Backing::open(&config).unwrap()),
            ShardQueueConfig { depth: 2, ..Default::default() },
        )
        .unwrap();
        let r = IoRequest::without_data(1, Op::Flush, 0, 0);
        // SAFETY: no buffers.
        unsafe {
            assert!(queue.submit(r).is_ok());
            assert!(queue.submit(r).is_ok());
            assert!(queue.submit(r).is_err());
        }
        assert!(queue.is_full());
    }

    #[test]
    fn depth_out_of_range_is_refused() {
        let config = BackingConfig {
            kind: BackingKind::Null,
            path: None,
            size_bytes: 1 << 20,
            block_size: 512,
            read_only: false,
            create: false,
        };
        let backing = Arc::new(Backing::open(&config).unwrap());
        for depth in [0, ShardQueue::DEPTH_MAX + 1, u32::MAX] {
            let refused = ShardQueue::new(Arc::clone(&backing), ShardQueueConfig { depth, ..Default::default() });
            assert!(
                matches!(refused, Err(Error::Depth { depth: d, max: ShardQueue::DEPTH_MAX }) if d == depth),
                "depth {depth}"
            );
        }
        for depth in [1, ShardQueue::DEPTH_MAX] {
            let queue =
                ShardQueue::new(Arc::clone(&backing), ShardQueueConfig { depth, ..Default::default() }).unwrap();
            assert_eq!(queue.depth, depth);
        }
    }

    /// A request the shard cannot start because its own bookkeeping is wrong (here: no free
    /// ring slot although one was promised) must end, loudly, never stay in flight.
    #[test]
    fn broken_invariant_fails_the_request_instead_of_losing_it() {
        let dir = tempfile::tempdir().unwrap();
        let backing = file_backing(&dir, 1 << 20, false);
        let mut queue = ShardQueue::new(backing, ShardQueueConfig::default()).unwrap();
        queue.engine.as_mut().unwrap().free_slots.clear();
        let flush = IoRequest::without_data(42, Op::Flush, 0, 0);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut queue, flush)));
        if cfg!(debug_assertions) {
            let panic = outcome.expect_err("a debug build panics on a broken invariant");
            let text = panic.downcast_ref::<String>().map(String::as_str).unwrap_or_default();
            assert!(text.contains("no free io_uring slot"), "{text}");
        } else {
            assert_eq!(outcome.expect("a release build carries on"), IoStatus::IoError(libc::EIO));
        }
    }

    #[test]
    fn ram_backing_stores_data() {
        let config = BackingConfig {
            kind: BackingKind::Ram,
            path: None,
            size_bytes: 4 << 20,
            block_size: 4096,
            read_only: false,
            create: false,
        };
        let backing =
            Arc::new(Backing::open(&config).expect("needs 2 free hugepages (echo 64 > /proc/sys/vm/nr_hugepages)"));
        let mut queue = ShardQueue::new(backing, ShardQueueConfig::default()).unwrap();
        let mut buf = Aligned::new(8192);
        buf.slice().fill(9);
        let iov = [buf.iov(0, 8192)];
        assert_eq!(run(&mut queue, rw(Op::Write, 3 << 20, &iov)), IoStatus::Ok);
        let mut back = Aligned::new(8192);
        let iov_back = [back.iov(0, 8192)];
        assert_eq!(run(&mut queue, rw(Op::Read, 3 << 20, &iov_back)), IoStatus::Ok);
        assert!(back.slice().iter().all(|b| *b == 9));
    }

    #[test]
    fn bad_backings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = BackingConfig {
            kind: BackingKind::File,
            path: Some(dir.path().join("missing.img")),
            size_bytes: 1 << 20,
            block_size: 512,
            read_only: false,
            create: false,
        };
        let err = Backing::open(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.img"), "{err}");
        let not_device =
            BackingConfig { kind: BackingKind::Device, path: Some(dir.path().to_owned()), ..missing.clone() };
        assert!(Backing::open(&not_device).is_err());
        let unaligned = BackingConfig { size_bytes: 1000, ..missing };
        assert!(Backing::open(&unaligned).unwrap_err().to_string().contains("not a multiple"));
    }
}
