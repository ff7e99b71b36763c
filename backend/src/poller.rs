//! The poll loop of one thread: its virtqueues in, its shard queue through, used rings out.
//!
//! ```text
//!  avail ring ─pop─▶ request::parse ─▶ iovecs into guest memory ─submit─▶ ShardQueue
//!  used ring ◀─add_used + status byte ◀─ pop_completion ◀─────────── poll ─┘
//! ```
//!
//! Per request there is no allocation and no lock: slots (one per descriptor head) and their
//! iovec arrays are allocated when the poller is made, and the only locks taken are the
//! per-vring ones, once per pass over a queue.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use replica::{IoRequest, IoStatus, ShardQueue};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic};

use crate::device::{BlkDevice, GuestMem, GuestMemAtomic, Vring};

type VringWriteGuard<'a> = std::sync::RwLockWriteGuard<'a, vhost_user_backend::VringState<GuestMemAtomic>>;
use crate::export::PollMode;
use crate::request::{self, Op, Rejection, Request, Scratch, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};

/// Requests a pass over one queue may take before moving on, so one busy queue cannot starve
/// the others or its own completions.
const BATCH_MAX: usize = 64;
/// Longest a poller sleeps waiting for disk completions before looking at its rings again.
const DISK_WAIT: std::time::Duration = std::time::Duration::from_micros(50);
/// Iterations between checks of the stop flag while busy.
const STOP_CHECK_EVERY: u32 = 1024;

/// One in-flight request, indexed by its descriptor head.
struct Slot {
    iov: Vec<libc::iovec>,
    status: GuestAddress,
    /// Bytes written into device-writable buffers, reported in the used ring.
    used_len: u32,
    in_flight: bool,
    /// Keeps the guest memory mapping alive while the shard may still touch it.
    mem: Option<Arc<GuestMem>>,
}

struct QueueState {
    /// Index of this queue in the device.
    index: usize,
    slots: Vec<Slot>,
}

pub(crate) struct Poller {
    shard: ShardQueue,
    queues: Vec<QueueState>,
    scratch: Scratch,
    cpu: Option<usize>,
    pinned: bool,
    /// Queues (local index bit) that completed something since their last notification.
    to_notify: u64,
}

// SAFETY: the raw iovec pointers in the slots point into guest memory kept alive by the slot's
// `mem` Arc; they are only dereferenced by the shard, which the poller owns. Moving the poller
// between threads (it is created on the frontend thread, run on its worker) moves no aliasing.
unsafe impl Send for Poller {}

impl Poller {
    pub(crate) fn new(shard: ShardQueue, mask: u64, cpu: Option<usize>, queue_size: u16, seg_max: u32) -> Self {
        // A data segment may cross guest memory regions; allow for one split per segment.
        let iov_max = 2 * seg_max as usize;
        let queues = (0..64)
            .filter(|q| mask & (1u64 << q) != 0)
            .map(|index| QueueState {
                index,
                slots: (0..queue_size)
                    .map(|_| Slot {
                        iov: Vec::with_capacity(iov_max),
                        status: GuestAddress(0),
                        used_len: 0,
                        in_flight: false,
                        mem: None,
                    })
                    .collect(),
            })
            .collect();
        Self {
            shard,
            queues,
            scratch: Scratch::with_capacity(queue_size as usize),
            cpu,
            pinned: false,
            to_notify: 0,
        }
    }

    pub(crate) fn completion_eventfd(&self) -> Option<RawFd> {
        self.shard.completion_eventfd()
    }

    pub(crate) fn consume_completion_event(&self) {
        if let Some(fd) = self.shard.completion_eventfd() {
            let mut value = 0u64;
            // SAFETY: reads 8 bytes into a live local from a non-blocking eventfd we own.
            let _ = unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
        }
    }

    /// Serves `vrings` until the poll mode says to sleep or the device stops.
    pub(crate) fn run(&mut self, device: &BlkDevice, vrings: &[Vring]) {
        if !self.pinned {
            self.pinned = true;
            if let Some(cpu) = self.cpu {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                    tracing::warn!(cpu, "cannot pin poller thread");
                }
            }
        }
        let Some(atomic) = device.mem.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let mode = device.config.poll.mode;
        let idle = device.config.poll.idle;
        let polling = mode != PollMode::Never;
        if polling {
            self.set_notifications(vrings, &atomic, false);
        }
        let mut last_work = Instant::now();
        let mut spins: u32 = 0;
        loop {
            // A guard, not an Arc: the loop only reads the rings through it; requests that
            // outlive the pass take their own Arc in `pop_requests`.
            let mem = atomic.memory();
            let mut work = 0;
            let limits = device.limits();
            for local in 0..self.queues.len() {
                if let Some(vring) = vrings.get(local) {
                    work += self.pop_requests(device, local, vring, &atomic, &mem, &limits);
                }
            }
            work += self.shard.poll();
            work += self.complete(device, vrings);
            self.notify(vrings, &mem);

            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(STOP_CHECK_EVERY) && polling {
                // Queues enabled since we started polling still have kicks on.
                self.set_notifications(vrings, &atomic, false);
            }
            if work > 0 && (!spins.is_multiple_of(STOP_CHECK_EVERY) || !device.stopping.load(Ordering::Acquire)) {
                last_work = Instant::now();
                continue;
            }
            if device.stopping.load(Ordering::Acquire) {
                self.drain(device, vrings);
                return;
            }
            let sleep = match mode {
                PollMode::Always => false,
                // With requests in flight, the shard's completion eventfd wakes us.
                PollMode::Never => true,
                PollMode::Adaptive => last_work.elapsed() >= idle,
            };
            if !sleep {
                // Only the disk is left to wait for: with writes in flight the shard sleeps in
                // the ring (bounded, so new guest requests wait at most DISK_WAIT) rather than
                // spin and starve the kernel threads that run O_DIRECT writes on this core;
                // otherwise it returns at once and we keep spinning.
                self.shard.wait_for_disk(DISK_WAIT);
                std::hint::spin_loop();
                continue;
            }
            // Re-arm guest kicks, then look once more: a request made available between our
            // last look and the re-arm would otherwise wait for a kick that never comes.
            if self.set_notifications(vrings, &atomic, true) {
                if polling {
                    self.set_notifications(vrings, &atomic, false);
                }
                last_work = Instant::now();
                continue;
            }
            return;
        }
    }

    /// Enables (or disables) guest kicks on every ready queue. When enabling, returns whether
    /// any queue already has new requests.
    fn set_notifications(&self, vrings: &[Vring], atomic: &GuestMemoryAtomic<GuestMem>, enable: bool) -> bool {
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
        device: &BlkDevice,
        local: usize,
        vring: &Vring,
        atomic: &GuestMemoryAtomic<GuestMem>,
        mem: &GuestMem,
        limits: &request::Limits,
    ) -> usize {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return 0;
        }
        let queue = state.get_queue();
        match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(avail) if avail.0 != queue.next_avail() => {}
            _ => return 0,
        }
        // Load the memory map only after seeing new requests: a frontend that added a memory
        // region (and got our ack) before making a request available must find it mapped.
        let fresh = atomic.memory().into_inner();
        let mem = &fresh;
        let mut taken = 0;
        let queue_index = self.queues[local].index;
        while taken < BATCH_MAX && !self.shard.is_full() {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&**mem) else { break };
            taken += 1;
            let head = chain.head_index();
            let Some(slot) = self.queues[local].slots.get_mut(head as usize) else {
                tracing::warn!(volume = %device.config.name, queue = queue_index, head, "descriptor head out of range");
                continue;
            };
            if slot.in_flight {
                // The guest made a head available twice; the first use still owns the slot.
                tracing::warn!(volume = %device.config.name, queue = queue_index, head, "descriptor head reused while in flight");
                continue;
            }
            device.queues[queue_index].in_flight.fetch_add(1, Ordering::AcqRel);
            let parsed = request::parse(chain, limits, &mut self.scratch);
            let outcome = match parsed {
                Ok(request) => self.start(device, local, head, request, mem),
                Err(rejection) => Some(rejection_outcome(device, queue_index, &rejection)),
            };
            if let Some((status, status_byte, used_len)) = outcome {
                let state_queue = state.get_queue_mut();
                if let Some(addr) = status {
                    let _ = mem.write_obj(status_byte, addr);
                }
                let _ = state_queue.add_used(&**mem, head, used_len);
                device.queues[queue_index].in_flight.fetch_sub(1, Ordering::AcqRel);
                device.completed.fetch_add(1, Ordering::Relaxed);
                self.to_notify |= 1 << local;
            }
        }
        taken
    }

    /// Starts a parsed request. Returns (status address, status, used length) when it finished
    /// at once; otherwise it is in the shard and its slot is marked in flight.
    fn start(
        &mut self,
        device: &BlkDevice,
        local: usize,
        head: u16,
        request: Request,
        mem: &Arc<GuestMem>,
    ) -> Option<(Option<GuestAddress>, u8, u32)> {
        let status = Some(request.status);
        let shard_op = match request.op {
            Op::Read => replica::Op::Read,
            Op::Write => replica::Op::Write,
            Op::Flush => replica::Op::Flush,
            Op::Discard => replica::Op::Discard,
            Op::WriteZeroes { unmap } => replica::Op::WriteZeroes { unmap },
            Op::GetId => {
                let serial = &device.config.serial;
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
        let slot = &mut self.queues[local].slots[head as usize];
        slot.iov.clear();
        let writable = request.op == Op::Read;
        let access = if writable { vm_memory::Permissions::Write } else { vm_memory::Permissions::Read };
        for segment in &self.scratch.segments {
            let Ok(slices) = mem.get_slices(segment.addr, segment.len as usize, access) else {
                return Some((status, STATUS_IOERR, 1));
            };
            for slice in slices {
                let Ok(slice) = slice else { return Some((status, STATUS_IOERR, 1)) };
                if slot.iov.len() == slot.iov.capacity() {
                    return Some((status, STATUS_IOERR, 1));
                }
                slot.iov.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() });
            }
        }
        slot.status = request.status;
        slot.used_len = if writable { u32::try_from(request.len_bytes).unwrap_or(u32::MAX).saturating_add(1) } else { 1 };
        slot.mem = Some(Arc::clone(mem));
        let io = IoRequest {
            user_data: (local as u64) << 16 | u64::from(head),
            op: shard_op,
            offset_bytes: request.offset_bytes,
            len_bytes: request.len_bytes,
            iov: slot.iov.as_ptr(),
            iov_count: slot.iov.len() as u32,
            fua: false,
        };
        // SAFETY: the iovecs live in `slot.iov`, which is neither cleared nor reallocated
        // (capacity is fixed; `in_flight` blocks reuse) until this request's completion is
        // popped in `complete`, and they point into the guest mapping that `slot.mem` keeps
        // mapped until then; every range was bounds-checked by vm-memory's get_slices.
        match unsafe { self.shard.submit(io) } {
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

    /// Moves shard completions into the used rings.
    fn complete(&mut self, device: &BlkDevice, vrings: &[Vring]) -> usize {
        let mut done = 0;
        // Completions come in runs for the same queue: keep its vring locked across a run.
        let mut locked: Option<(usize, VringWriteGuard<'_>)> = None;
        while let Some(completion) = self.shard.pop_completion() {
            done += 1;
            let local = (completion.user_data >> 16) as usize;
            let head = (completion.user_data & 0xffff) as u16;
            let (Some(queue), Some(vring)) = (self.queues.get_mut(local), vrings.get(local)) else { continue };
            let Some(slot) = queue.slots.get_mut(head as usize) else { continue };
            let status_byte = match completion.status {
                IoStatus::Ok => STATUS_OK,
                IoStatus::Unsupported => STATUS_UNSUPP,
                IoStatus::IoError(_) | IoStatus::OutOfRange => STATUS_IOERR,
            };
            let used_len = if status_byte == STATUS_OK { slot.used_len } else { 1 };
            if let Some(mem) = slot.mem.take() {
                let _ = mem.write_obj(status_byte, slot.status);
                if locked.as_ref().is_none_or(|(l, _)| *l != local) {
                    drop(locked.take());
                    locked = Some((local, vring.get_mut()));
                }
                if let Some((_, state)) = locked.as_mut() {
                    let _ = state.get_queue_mut().add_used(&*mem, head, used_len);
                }
            }
            slot.in_flight = false;
            device.queues[queue.index].in_flight.fetch_sub(1, Ordering::AcqRel);
            self.to_notify |= 1 << local;
        }
        device.completed.fetch_add(done as u64, Ordering::Relaxed);
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

    /// Waits for everything in flight, completing it into the used rings.
    fn drain(&mut self, device: &BlkDevice, vrings: &[Vring]) {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while self.shard.outstanding() > 0 && Instant::now() < deadline {
            self.shard.poll();
            self.complete(device, vrings);
            std::thread::yield_now();
        }
        if self.shard.outstanding() > 0 {
            tracing::error!(volume = %device.config.name, "requests still in flight after 30 s at disconnect");
        }
    }
}

fn rejection_outcome(device: &BlkDevice, queue: usize, rejection: &Rejection) -> (Option<GuestAddress>, u8, u32) {
    tracing::debug!(volume = %device.config.name, queue, reason = rejection.reason, "request rejected");
    match rejection.status {
        Some(addr) => (Some(addr), rejection.code, 1),
        None => {
            tracing::warn!(volume = %device.config.name, queue, reason = rejection.reason, "malformed descriptor chain returned without status");
            (None, STATUS_IOERR, 0)
        }
    }
}
