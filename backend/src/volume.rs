//! The seam between the vhost-user device and whatever serves a volume's requests.
//!
//! The device, the poller and the export know a volume only through two traits:
//!
//! ```text
//!  Export<V> ─ Arc<V: Volume> ─────────┐ geometry, grow, guest memory table in / out
//!   └ BlkDevice<V> (one per connection) │
//!      └ Poller<V::Queue> (one per thread) ─ VolumeQueue: submit, poll, pop_completion, ...
//! ```
//!
//! - [`Volume`]: one per exported volume, shared by every connection and thread. It states the
//!   geometry the device advertises, makes one [`VolumeQueue`] per poller thread, grows, and is
//!   told when the frontend's guest memory table changes, so that an implementation that moves
//!   guest buffers over a network can register guest RAM with its transport once per table
//!   instead of once per request.
//! - [`VolumeQueue`]: one poller thread's window onto the volume. Requests go in as
//!   [`IoRequest`]s whose iovecs point into guest memory, and come back as [`IoCompletion`]s.
//!
//! Everything is statically dispatched (`Export<V>`, `BlkDevice<V>`, `Poller<Q>`): the
//! per-request path has no `dyn` call. The local shard ([`Backing`] / [`ShardQueue`]) is the
//! implementation below; a replicated volume client (fanning each request out to the volume's
//! replicas) is the other one this seam is for.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use replica::{Backing, IoCompletion, IoRequest, ShardQueue, ShardQueueConfig};
use vm_memory::GuestMemoryMmap;

use crate::Error;

/// Guest memory as the vhost-user frontend shares it: one mapping per memory region.
pub type GuestMem = GuestMemoryMmap<()>;

/// A volume as the vhost-user device serves it.
///
/// Shared (`Arc<Self>`) by the export, every connection's device and the frontend thread that
/// delivers memory-table changes, so every method takes `&self` and may run concurrently with
/// the pollers' queues.
pub trait Volume: Send + Sync + 'static {
    /// The per-poller-thread queue.
    type Queue: VolumeQueue;

    /// Current size in bytes: the device's `capacity`, and the bound the request parser checks
    /// every request against. Read on every poller pass, so it must be cheap (an atomic load);
    /// it only grows.
    fn capacity_bytes(&self) -> u64;

    /// The logical block size the guest sees (`blk_size`): 512 or 4096.
    fn block_size(&self) -> u32;

    /// Offered as VIRTIO_BLK_F_RO; the parser refuses every modifying request.
    fn read_only(&self) -> bool;

    /// The smallest write the volume does without a read-modify-write, advertised as the
    /// topology's physical block so that guests align to it. A power of two, at least
    /// [`Volume::block_size`].
    fn physical_block_bytes(&self) -> u32;

    /// A queue for one poller thread, with room for `depth` requests outstanding at once
    /// (between 1 and [`replica::ShardQueue::DEPTH_MAX`]; a depth it cannot honour is an error).
    fn new_queue(self: &Arc<Self>, depth: u32) -> Result<Self::Queue, Error>;

    /// Grows the volume to `new_size_bytes` (online: queues in use see the new size). Shrinking
    /// is refused.
    fn grow(&self, new_size_bytes: u64) -> Result<(), Error>;

    /// The frontend's guest memory table changed (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG):
    /// `Some(table)`, the whole new table, every region the guest's buffers may lie in (an
    /// implementation keeps what it registered for regions still in it, registers the new
    /// ones and lets go of the rest); or its connection ended: `None`, after every request of
    /// that connection has completed.
    ///
    /// Called on the frontend's thread while pollers run. The new table is already in effect
    /// when this is called (vhost-user-backend swaps it first), but requests that use a region
    /// the table added are only made after this returns: the frontend waits for the reply
    /// before its guest may use the region. Requests still in flight may point into regions of
    /// the previous table, which stay mapped until they complete (each holds the table it was
    /// started with), so an implementation must not invalidate a registration such requests
    /// use. An error is reported to the frontend as a failed memory-table message.
    fn guest_memory_changed(&self, mem: Option<&Arc<GuestMem>>) -> Result<(), Error>;
}

/// One poller thread's queue onto a volume: the handful of calls its poll loop makes.
///
/// Bounded: at most the `depth` given to [`Volume::new_queue`] requests are outstanding
/// (submitted and not yet popped as completions); `submit` refuses more.
pub trait VolumeQueue: Send {
    /// Queues a request. Gives it back when the queue is full.
    ///
    /// # Safety
    /// `request.iov` must point at `request.iov_count` iovecs, and each iovec at memory valid
    /// for reads (writes) and writes (reads) of its length; all of it must stay valid and not
    /// be reused until this request's completion has been returned by `pop_completion`.
    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), IoRequest>;

    /// True when `submit` would refuse.
    fn is_full(&self) -> bool;

    /// Moves requests along (to the disk, to the network) and finished ones to the completion
    /// queue. Never blocks; returns how much it moved (0 = idle).
    fn poll(&mut self) -> usize;

    /// Takes one finished request.
    fn pop_completion(&mut self) -> Option<IoCompletion>;

    /// Requests submitted and not yet popped as completions.
    fn outstanding(&self) -> u32;

    /// What a poller calls between passes (`idle`: the pass found nothing to do) instead of
    /// spinning on: sleeps for at most `timeout` until something completes, when sleeping
    /// frees the core for work the requests in flight need; returns at once otherwise.
    fn wait_for_completions(&mut self, timeout: Duration, idle: bool);

    /// A non-blocking eventfd, owned by the queue and open as long as it lives, signalled when
    /// requests complete: it wakes a poller that sleeps in epoll with requests in flight, and
    /// the poller reads it to re-arm it. `None` if every request completes within `poll`.
    fn completion_eventfd(&self) -> Option<RawFd>;

    /// Re-arms `completion_eventfd` after it woke the poller (reads the eventfd back to 0).
    fn consume_completion_event(&self) {
        if let Some(fd) = self.completion_eventfd() {
            let mut value = 0u64;
            // SAFETY: reads 8 bytes into a live local from a non-blocking eventfd the queue
            // owns and keeps open while it lives.
            let _ = unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
        }
    }
}

/// The local shard: a volume stored in one [`Backing`] on this node.
impl Volume for Backing {
    type Queue = ShardQueue;

    fn capacity_bytes(&self) -> u64 {
        Backing::capacity_bytes(self)
    }

    fn block_size(&self) -> u32 {
        Backing::block_size(self)
    }

    fn read_only(&self) -> bool {
        Backing::read_only(self)
    }

    fn physical_block_bytes(&self) -> u32 {
        // O_DIRECT writes smaller than the device's unit are read-modify-writes in the shard.
        self.dio_offset_align().max(Backing::block_size(self))
    }

    fn new_queue(self: &Arc<Self>, depth: u32) -> Result<ShardQueue, Error> {
        Ok(ShardQueue::new(Arc::clone(self), ShardQueueConfig { depth, single_thread: true })?)
    }

    fn grow(&self, new_size_bytes: u64) -> Result<(), Error> {
        Ok(self.resize(new_size_bytes)?)
    }

    fn guest_memory_changed(&self, _mem: Option<&Arc<GuestMem>>) -> Result<(), Error> {
        // The shard reads and writes guest memory through the iovecs of each request; nothing
        // to register.
        Ok(())
    }
}

impl VolumeQueue for ShardQueue {
    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), IoRequest> {
        // SAFETY: the caller upholds `VolumeQueue::submit`'s contract, which is
        // `ShardQueue::submit`'s word for word.
        unsafe { ShardQueue::submit(self, request) }
    }

    fn is_full(&self) -> bool {
        ShardQueue::is_full(self)
    }

    fn poll(&mut self) -> usize {
        ShardQueue::poll(self)
    }

    fn pop_completion(&mut self) -> Option<IoCompletion> {
        ShardQueue::pop_completion(self)
    }

    fn outstanding(&self) -> u32 {
        ShardQueue::outstanding(self)
    }

    fn wait_for_completions(&mut self, timeout: Duration, idle: bool) {
        self.wait_for_disk(timeout, idle);
    }

    fn completion_eventfd(&self) -> Option<RawFd> {
        ShardQueue::completion_eventfd(self)
    }
}
