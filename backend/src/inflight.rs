//! Inflight I/O tracking: guest requests survive a backend crash (vhost-user `INFLIGHT_SHMFD`).
//!
//! The frontend (QEMU) keeps one shared memory region per device across backend restarts: the
//! backend creates it (`GET_INFLIGHT_FD`, once per device lifetime), the frontend hands it back
//! on every connection (`SET_INFLIGHT_FD`). In it the backend marks every request it takes from
//! a virtqueue and clears the mark once the request is in the used ring. After a crash the next
//! backend resubmits the marked requests, oldest first, and carries on from the used ring: every
//! request the guest made available and never saw completed runs (again) exactly once per
//! connection, and nothing the guest saw completed runs again.
//!
//! Layout, for split virtqueues (QEMU `docs/interop/vhost-user.rst`, "Inflight I/O tracking";
//! the queue region size is libvhost-user's, so a region moves between back ends that follow
//! the spec, qemu-storage-daemon included):
//!
//! ```text
//!  region = num_queues × queue region of queue_region_bytes(queue_size)
//!           = align_up(16 × queue_size + 2, 64) bytes each (>= 16 + 16 × queue_size)
//!  queue region:
//!   0  features         u64  0
//!   8  version          u16  1 once initialised (0: a new, zeroed region)
//!  10  desc_num         u16  queue_size
//!  12  last_batch_head  u16  head of the last request put in the used ring
//!  14  used_idx         u16  the used ring's idx after that request
//!  16  desc[queue_size], 16 bytes each:
//!       0 inflight u8 (1: taken, not yet used) | 1 padding[5] | 6 next u16 | 8 counter u64
//! ```
//!
//! What the poller writes (it owns its queues' parts of the region; no lock):
//! - taking head `h` from the avail ring: `desc[h].counter = n++`, then `desc[h].inflight = 1`;
//! - completing it: `last_batch_head = h`; the used element and the used idx (virtio-queue's
//!   `add_used`); then `desc[h].inflight = 0` and `used_idx = ` the used ring's new idx.
//!
//! Every store is Release, so a crash between any two of them leaves memory in program order
//! (a process killed with SIGKILL loses no store it made; only the order can be at stake).
//! Requests are used one at a time, so a "batch" is always one request and `next` is never
//! followed by our own recovery; it is followed (bounded) for regions another back end left.
//!
//! Recovery, when a vring starts (before it runs):
//! 1. `used_idx` differs from the used ring's idx: the crash came between the used idx store
//!    and the clearing of the mark; the batch (one request) from `last_batch_head` is complete,
//!    its mark is cleared.
//! 2. Every marked head is a request taken and never used: they are resubmitted, in counter
//!    order, before anything new from the avail ring.
//! 3. The next available index is the used idx plus the number of marked heads: every request
//!    taken was either used or is marked. A request taken but not yet marked at the crash is the
//!    last one taken and still sits in the avail ring at that index, so it is taken again, once.
//!    The frontend's `SET_VRING_BASE` (after a crash QEMU sends its last used idx) is overridden.
//!
//! The region is shared with the frontend, which may write anything into it at any time.
//! Nothing read from it is trusted for memory safety (indices are bounds-checked, accesses are
//! atomic), and content no correct back end could have left (a head marked beyond the queue,
//! more requests marked than the avail ring holds, an unknown version) refuses the vring start,
//! which closes the connection, instead of resubmitting garbage.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserInflight;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, MmapRegion};

use crate::volume::GuestMem;

/// The region version this module reads and writes.
const VERSION: u16 = 1;
/// Queue regions start at multiples of this (libvhost-user's INFLIGHT_ALIGNMENT).
const ALIGNMENT: u64 = 64;
/// Bytes before the first descriptor state of a queue region.
const HEADER_BYTES: usize = 16;
/// Bytes of one descriptor state.
const DESC_BYTES: usize = 16;

const FEATURES_AT: usize = 0;
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
const DESC_INFLIGHT_AT: usize = 0;
const DESC_NEXT_AT: usize = 6;
const DESC_COUNTER_AT: usize = 8;

/// Bytes of one queue's region for `queue_size` entries: libvhost-user's
/// `ALIGN_UP(sizeof(VuDescStateSplit) * queue_size + sizeof(uint16_t), INFLIGHT_ALIGNMENT)`,
/// which holds the 16-byte header too (see the test below).
pub(crate) fn queue_region_bytes(queue_size: u16) -> u64 {
    (DESC_BYTES as u64 * u64::from(queue_size) + 2).next_multiple_of(ALIGNMENT)
}

/// Why an inflight region or its content was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InflightError {
    #[error("inflight region for {num_queues} queues of {queue_size} entries refused: the device has {max_queues} queues of at most {max_queue_size} entries")]
    Geometry { num_queues: u16, queue_size: u16, max_queues: u16, max_queue_size: u16 },
    #[error("inflight region of {mmap_size} bytes refused: {num_queues} queues of {queue_size} entries take {expected} bytes")]
    Size { mmap_size: u64, num_queues: u16, queue_size: u16, expected: u64 },
    #[error("inflight region refused: its offset {mmap_offset:#x} in the file is not a multiple of the page size ({page_size})")]
    Misaligned { mmap_offset: u64, page_size: u64 },
    #[error("inflight region refused: its file descriptor is not a regular file (memfd)")]
    NotAFile,
    #[error("inflight region refused: it needs bytes {mmap_offset:#x}..{end:#x} of a file of {file_bytes} bytes")]
    FileTooShort { mmap_offset: u64, end: u64, file_bytes: u64 },
    #[error("inflight region refused: its memfd is not sealed against shrinking (F_SEAL_SHRINK), so the frontend could truncate it under the daemon")]
    NotSealed,
    #[error("inflight region: {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("queue {queue} started, but the inflight region covers {num_queues} queues")]
    NoSuchQueue { queue: u32, num_queues: u16 },
    #[error("queue {queue} has {size} entries, more than the {region_size} of its inflight region")]
    QueueTooLarge { queue: u32, size: u16, region_size: u16 },
    #[error("queue {queue}: cannot read its rings in guest memory to recover inflight requests")]
    Rings {
        queue: u32,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: inflight region of unknown version {version}")]
    Version { queue: u32, version: u16 },
    #[error("queue {queue}: inflight region inconsistent with the rings: {why}")]
    Inconsistent { queue: u32, why: String },
}

impl From<InflightError> for std::io::Error {
    fn from(e: InflightError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}

/// A mapped inflight region: `num_queues` queue regions of `queue_size` entries each.
#[derive(Debug)]
pub(crate) struct InflightRegion {
    /// The mapping (unmapped on drop) and the file behind it.
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// `GET_INFLIGHT_FD`: a new zeroed region for `request.num_queues` queues of
    /// `request.queue_size` entries, as a sealed memfd (it can neither shrink nor grow, so
    /// nobody can make a mapping of it fault). Returns its description and file.
    pub(crate) fn create(
        request: &VhostUserInflight,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<(VhostUserInflight, File), InflightError> {
        let (num_queues, queue_size) = (request.num_queues, request.queue_size);
        check_geometry(num_queues, queue_size, max_queues, max_queue_size)?;
        let mmap_size = u64::from(num_queues) * queue_region_bytes(queue_size);
        let file = sealed_memfd(mmap_size)?;
        Ok((VhostUserInflight { mmap_size, mmap_offset: 0, num_queues, queue_size }, file))
    }

    /// `SET_INFLIGHT_FD`: maps the region the frontend hands in, after checking it against the
    /// device (queue count and size), the layout (size, page-aligned offset) and its file (a
    /// sealed memfd long enough), so that no access to it can fault.
    pub(crate) fn open(
        msg: &VhostUserInflight,
        file: File,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<Self, InflightError> {
        let (num_queues, queue_size) = (msg.num_queues, msg.queue_size);
        let (mmap_size, mmap_offset) = (msg.mmap_size, msg.mmap_offset);
        check_geometry(num_queues, queue_size, max_queues, max_queue_size)?;
        let expected = u64::from(num_queues) * queue_region_bytes(queue_size);
        if mmap_size != expected {
            return Err(InflightError::Size { mmap_size, num_queues, queue_size, expected });
        }
        let page_size = page_size();
        if !mmap_offset.is_multiple_of(page_size) {
            return Err(InflightError::Misaligned { mmap_offset, page_size });
        }
        let meta = file.metadata().map_err(|source| InflightError::Io { what: "cannot stat its file", source })?;
        if !meta.file_type().is_file() {
            return Err(InflightError::NotAFile);
        }
        let end = mmap_offset.saturating_add(mmap_size);
        if end > meta.len() {
            return Err(InflightError::FileTooShort { mmap_offset, end, file_bytes: meta.len() });
        }
        if seals(file.as_raw_fd())? & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let len = usize::try_from(mmap_size).map_err(|_| InflightError::Size {
            mmap_size,
            num_queues,
            queue_size,
            expected,
        })?;
        let map = MmapRegion::build(
            Some(FileOffset::new(file, mmap_offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| InflightError::Io { what: "cannot map it", source: std::io::Error::other(e) })?;
        Ok(Self { map, num_queues, queue_size })
    }

    pub(crate) fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub(crate) fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The part of the region that belongs to queue `index`.
    fn queue(self: &Arc<Self>, index: u16) -> Option<QueueView> {
        if index >= self.num_queues {
            return None;
        }
        let offset = usize::from(index) * queue_region_bytes(self.queue_size) as usize;
        // The mapping is `num_queues * queue_region_bytes(queue_size)` bytes (checked at
        // `open`), so `offset` lies inside it.
        let base = self.map.as_ptr().wrapping_add(offset);
        Some(QueueView { _region: Arc::clone(self), base, entries: self.queue_size })
    }
}

fn check_geometry(num_queues: u16, queue_size: u16, max_queues: u16, max_queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > max_queues || queue_size == 0 || queue_size > max_queue_size {
        return Err(InflightError::Geometry { num_queues, queue_size, max_queues, max_queue_size });
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096).max(1)
}

/// A new memfd of `len` zero bytes, sealed against any change of size.
fn sealed_memfd(len: u64) -> Result<File, InflightError> {
    let name = c"hcblk-inflight";
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(InflightError::Io { what: "cannot create a memfd", source: std::io::Error::last_os_error() });
    }
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).map_err(|source| InflightError::Io { what: "cannot size the memfd", source })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int argument and touches no memory of ours; `file` is open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(InflightError::Io { what: "cannot seal the memfd", source: std::io::Error::last_os_error() });
    }
    Ok(file)
}

/// The seals of `fd` (0 for a file that cannot be sealed).
fn seals(fd: RawFd) -> Result<libc::c_int, InflightError> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory of ours; `fd` is open (the
    // caller holds its File).
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 {
        let e = std::io::Error::last_os_error();
        // EINVAL: not a memfd (or shmem) file, which has no seals.
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(0);
        }
        return Err(InflightError::Io { what: "cannot read its seals", source: e });
    }
    Ok(seals)
}

/// One queue's part of a mapped region.
#[derive(Debug)]
struct QueueView {
    /// Keeps the mapping alive as long as `base` is used (never read otherwise).
    _region: Arc<InflightRegion>,
    /// Start of this queue's region, inside `region`'s mapping: a multiple of 64 bytes from a
    /// page-aligned start, followed by `queue_region_bytes(entries)` mapped bytes.
    base: *mut u8,
    /// Descriptor states in the region (the region's queue size, never the frontend's
    /// `desc_num`).
    entries: u16,
}

// SAFETY: `base` points into the mapping `_region` owns, which is shared by design (every access
// through it is atomic); a view moves from the frontend thread (recovery) to a poller thread,
// which is then its only user.
unsafe impl Send for QueueView {}

impl QueueView {
    /// The atomic at `offset` bytes into this queue's region.
    ///
    /// `offset` must be a multiple of `size_of::<T>()` and `offset + size_of::<T>()` at most
    /// `HEADER_BYTES + DESC_BYTES * entries`: the callers below pass fixed header offsets, or
    /// descriptor offsets of a head they checked against `entries`.
    fn atomic<T>(&self, offset: usize) -> &T {
        debug_assert!(offset + size_of::<T>() <= HEADER_BYTES + DESC_BYTES * usize::from(self.entries));
        debug_assert!(offset.is_multiple_of(align_of::<T>()));
        // SAFETY: `base + offset` lies in this queue's region (the bound above, and
        // `queue_region_bytes(entries) >= HEADER_BYTES + DESC_BYTES * entries`), which lies in
        // the mapping `self._region` keeps alive as long as `self`; it is aligned for `T` (an
        // atomic integer: `base` is 64-byte aligned and `offset` a multiple of its size). The
        // memory is shared with the frontend, which may change it at any time: it is only ever
        // accessed through atomics, never through a plain reference.
        unsafe { &*self.base.add(offset).cast::<T>() }
    }

    fn header_u16(&self, at: usize) -> &AtomicU16 {
        self.atomic(at)
    }

    fn desc_at(&self, head: u16, field: usize) -> Option<usize> {
        (head < self.entries).then(|| HEADER_BYTES + DESC_BYTES * usize::from(head) + field)
    }

    fn inflight(&self, head: u16) -> Option<&AtomicU8> {
        self.desc_at(head, DESC_INFLIGHT_AT).map(|at| self.atomic(at))
    }

    fn next(&self, head: u16) -> Option<&AtomicU16> {
        self.desc_at(head, DESC_NEXT_AT).map(|at| self.atomic(at))
    }

    fn counter(&self, head: u16) -> Option<&AtomicU64> {
        self.desc_at(head, DESC_COUNTER_AT).map(|at| self.atomic(at))
    }

    /// A new region: every state cleared, the header describing a queue whose used ring is at
    /// `used_idx`.
    fn initialise(&self, used_idx: u16) {
        for head in 0..self.entries {
            if let Some(flag) = self.inflight(head) {
                flag.store(0, Ordering::Release);
            }
        }
        self.atomic::<AtomicU64>(FEATURES_AT).store(0, Ordering::Release);
        self.header_u16(DESC_NUM_AT).store(self.entries, Ordering::Release);
        self.header_u16(LAST_BATCH_HEAD_AT).store(0, Ordering::Release);
        self.header_u16(USED_IDX_AT).store(used_idx, Ordering::Release);
        self.header_u16(VERSION_AT).store(VERSION, Ordering::Release);
    }
}

/// Recovers queue `index` from `region` when it starts: see the module documentation. Sets the
/// queue's next available (and used) index and returns the tracker its poller continues with,
/// holding the requests to resubmit.
pub(crate) fn recover(
    region: &Arc<InflightRegion>,
    index: u32,
    queue: &mut Queue,
    mem: &GuestMem,
) -> Result<(QueueTracker, Recovered), InflightError> {
    let view = u16::try_from(index)
        .ok()
        .and_then(|i| region.queue(i))
        .ok_or(InflightError::NoSuchQueue { queue: index, num_queues: region.num_queues })?;
    let size = queue.size();
    if size > view.entries {
        return Err(InflightError::QueueTooLarge { queue: index, size, region_size: view.entries });
    }
    let rings = |source| InflightError::Rings { queue: index, source };
    let used_idx = queue.used_idx(mem, Ordering::Acquire).map_err(rings)?.0;
    let avail_idx = queue.avail_idx(mem, Ordering::Acquire).map_err(rings)?.0;
    let inconsistent = |why: String| InflightError::Inconsistent { queue: index, why };

    let mut recovered = Recovered::default();
    match view.header_u16(VERSION_AT).load(Ordering::Acquire) {
        0 => {
            view.initialise(used_idx);
            recovered.fresh = true;
        }
        VERSION => {}
        version => return Err(InflightError::Version { queue: index, version }),
    }
    view.header_u16(DESC_NUM_AT).store(view.entries, Ordering::Release);

    // 1. A batch put in the used ring whose marks were not cleared yet.
    let recorded = view.header_u16(USED_IDX_AT).load(Ordering::Acquire);
    if recorded != used_idx {
        let batch = used_idx.wrapping_sub(recorded);
        if batch > size {
            return Err(inconsistent(format!(
                "the used ring is at {used_idx}, the region last saw {recorded}: {batch} requests used since, in a queue of {size}"
            )));
        }
        let mut head = view.header_u16(LAST_BATCH_HEAD_AT).load(Ordering::Acquire);
        for _ in 0..batch {
            let (Some(flag), Some(next)) = (view.inflight(head), view.next(head)) else {
                return Err(inconsistent(format!("the last batch names head {head}, beyond the queue")));
            };
            flag.store(0, Ordering::Release);
            head = next.load(Ordering::Acquire);
        }
        view.header_u16(USED_IDX_AT).store(used_idx, Ordering::Release);
        recovered.last_batch = batch;
    }

    // 2. Requests taken and never used, oldest first.
    let mut marked: Vec<(u64, u16)> = Vec::new();
    for head in 0..view.entries {
        let (Some(flag), Some(counter)) = (view.inflight(head), view.counter(head)) else { continue };
        if flag.load(Ordering::Acquire) == 0 {
            continue;
        }
        if head >= size {
            return Err(inconsistent(format!("head {head} is marked in flight in a queue of {size} entries")));
        }
        marked.push((counter.load(Ordering::Acquire), head));
    }
    marked.sort_unstable();
    let in_flight = marked.len() as u16;
    let outstanding = avail_idx.wrapping_sub(used_idx);
    if outstanding > size || in_flight > outstanding {
        return Err(inconsistent(format!(
            "{in_flight} requests marked in flight, but the avail ring (at {avail_idx}) holds {outstanding} not yet used (used ring at {used_idx})"
        )));
    }

    // For the log: how many of them a backend restarting from the avail ring alone (at the
    // used idx QEMU sends) would have got wrong, because requests completed out of order.
    let window: Vec<u16> = (0..in_flight)
        .filter_map(|i| {
            let slot = u64::from(used_idx.wrapping_add(i) % size.max(1));
            let at = GuestAddress(queue.avail_ring().checked_add(4 + 2 * slot)?);
            mem.read_obj::<u16>(at).ok().map(u16::from_le)
        })
        .collect();
    recovered.out_of_ring_order = marked.iter().filter(|&&(_, head)| !window.contains(&head)).count() as u16;

    // 3. Every request taken was either used or is marked.
    queue.set_next_avail(used_idx.wrapping_add(in_flight));
    queue.set_next_used(used_idx);
    recovered.resubmitted = in_flight;
    let counter = marked.last().map_or(1, |&(counter, _)| counter.wrapping_add(1));
    let tracker =
        QueueTracker { view: Some(view), counter, resubmit: marked.into_iter().map(|(_, head)| head).collect() };
    Ok((tracker, recovered))
}

/// What recovery found, for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// The region was new (version 0): nothing to recover.
    pub(crate) fresh: bool,
    /// Requests found used but still marked (a crash in the middle of a completion).
    pub(crate) last_batch: u16,
    /// Requests to resubmit.
    pub(crate) resubmitted: u16,
    /// Of those, how many are not in the avail ring where a backend without inflight
    /// tracking would look for them (from the used idx on): requests completed out of order
    /// before the crash, which such a backend would have completed twice, or lost.
    pub(crate) out_of_ring_order: u16,
}

/// The poller's side of one virtqueue's tracking: marks requests as it takes and completes
/// them, and hands out the ones to resubmit after a restart. Untracked (every call a no-op but
/// for the `add_used` it wraps) when the frontend set no region.
#[derive(Debug, Default)]
pub(crate) struct QueueTracker {
    view: Option<QueueView>,
    /// The counter of the next request taken from the avail ring.
    counter: u64,
    /// Heads to resubmit, oldest first (at most the queue size).
    resubmit: VecDeque<u16>,
}

impl QueueTracker {
    /// Whether requests from before a restart are waiting to be resubmitted.
    #[inline]
    pub(crate) fn resubmitting(&self) -> bool {
        !self.resubmit.is_empty()
    }

    /// The next request to resubmit, as a chain read from the descriptor table: its avail ring
    /// entry may have been overwritten since it was first taken. The head stays marked.
    pub(crate) fn next_resubmitted<'m>(
        &mut self,
        queue: &Queue,
        mem: &'m GuestMem,
    ) -> Option<DescriptorChain<&'m GuestMem>> {
        let head = self.resubmit.pop_front()?;
        Some(DescriptorChain::new(mem, GuestAddress(queue.desc_table()), queue.size(), head))
    }

    /// Head `head` was just taken from the avail ring.
    #[inline]
    pub(crate) fn taken(&mut self, head: u16) {
        let Some(view) = &self.view else { return };
        if let (Some(counter), Some(flag)) = (view.counter(head), view.inflight(head)) {
            counter.store(self.counter, Ordering::Release);
            flag.store(1, Ordering::Release);
            self.counter = self.counter.wrapping_add(1);
        }
    }

    /// `queue.add_used(mem, head, len)`, with the request's mark cleared once it is in the
    /// used ring (and `last_batch_head` naming it before).
    #[inline]
    pub(crate) fn add_used<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        let Some(view) = &self.view else { return queue.add_used(mem, head, len) };
        let flag = view.inflight(head);
        if flag.is_some() {
            view.header_u16(LAST_BATCH_HEAD_AT).store(head, Ordering::Release);
        }
        let result = queue.add_used(mem, head, len);
        if let Some(flag) = flag {
            flag.store(0, Ordering::Release);
        }
        view.header_u16(USED_IDX_AT).store(queue.next_used(), Ordering::Release);
        result
    }
}

/// Hands a queue's tracker from the frontend thread, where recovery runs when the vring
/// starts, to the poller that serves the queue. The poller looks once per pass (one atomic
/// load) and takes it before it touches the queue again.
#[derive(Debug, Default)]
pub(crate) struct TrackerHandoff {
    pending: AtomicBool,
    tracker: Mutex<Option<QueueTracker>>,
}

impl TrackerHandoff {
    /// Called before the vring is marked ready, under no poller's feet: the poller only takes
    /// the tracker once it sees the vring ready (through the vring's lock, which orders this
    /// store before that).
    pub(crate) fn publish(&self, tracker: QueueTracker) {
        *self.tracker.lock().unwrap_or_else(|p| p.into_inner()) = Some(tracker);
        self.pending.store(true, Ordering::Release);
    }

    /// The tracker published since the last call, if any.
    #[inline]
    pub(crate) fn take(&self) -> Option<QueueTracker> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        self.pending.store(false, Ordering::Release);
        self.tracker.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Wakes the poller of a vring that just started, through its kick eventfd: requests to
/// resubmit, and requests the guest made available while no backend was there (whose kicks
/// went elsewhere), are then served without waiting for a guest kick that may never come.
pub(crate) fn kick(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: eventfd_write writes 8 bytes from a value to `fd`, which the caller keeps open
    // (it holds the vring state that owns it) for the duration of the call.
    if unsafe { libc::eventfd_write(fd, 1) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_region_holds_its_header_and_every_state() {
        for queue_size in 1..=u16::MAX {
            let bytes = queue_region_bytes(queue_size);
            assert!(bytes >= (HEADER_BYTES + DESC_BYTES * usize::from(queue_size)) as u64, "{queue_size}");
            assert_eq!(bytes % ALIGNMENT, 0);
        }
        // libvhost-user's sizes for the usual queues.
        assert_eq!(queue_region_bytes(128), 2112);
        assert_eq!(queue_region_bytes(256), 4160);
    }

    fn region(num_queues: u16, queue_size: u16) -> Arc<InflightRegion> {
        let request = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues, queue_size };
        let (msg, file) = InflightRegion::create(&request, 8, 256).expect("create");
        Arc::new(InflightRegion::open(&msg, file, 8, 256).expect("open what we created"))
    }

    #[test]
    fn create_then_open_round_trips_and_the_memfd_is_sealed() {
        let request = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 2, queue_size: 128 };
        let (msg, file) = InflightRegion::create(&request, 2, 256).expect("create");
        assert_eq!((msg.mmap_size, msg.mmap_offset, msg.num_queues, msg.queue_size), (2 * 2112, 0, 2, 128));
        assert_eq!(file.metadata().unwrap().len(), 2 * 2112);
        assert!(file.set_len(1).is_err(), "sealed against shrinking");
        assert!(file.set_len(1 << 20).is_err(), "sealed against growing");
        let region = InflightRegion::open(&msg, file, 2, 256).expect("open");
        assert_eq!((region.num_queues(), region.queue_size()), (2, 128));
    }

    #[test]
    fn bad_requests_and_regions_are_refused() {
        let get = |n, q| {
            InflightRegion::create(
                &VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: n, queue_size: q },
                2,
                256,
            )
        };
        assert!(matches!(get(0, 128), Err(InflightError::Geometry { .. })));
        assert!(matches!(get(3, 128), Err(InflightError::Geometry { .. })));
        assert!(matches!(get(1, 0), Err(InflightError::Geometry { .. })));
        assert!(matches!(get(1, 512), Err(InflightError::Geometry { .. })));

        let (good, file) = get(2, 128).unwrap();
        let open = |msg: VhostUserInflight, file: &File| InflightRegion::open(&msg, file.try_clone().unwrap(), 2, 256);
        assert!(matches!(
            open(VhostUserInflight { mmap_size: good.mmap_size - 64, ..good }, &file),
            Err(InflightError::Size { .. })
        ));
        assert!(matches!(open(VhostUserInflight { num_queues: 1, ..good }, &file), Err(InflightError::Size { .. })));
        assert!(matches!(open(VhostUserInflight { queue_size: 256, ..good }, &file), Err(InflightError::Size { .. })));
        assert!(matches!(
            open(VhostUserInflight { num_queues: 3, ..good }, &file),
            Err(InflightError::Geometry { .. })
        ));
        assert!(matches!(
            open(VhostUserInflight { mmap_offset: 64, ..good }, &file),
            Err(InflightError::Misaligned { .. })
        ));
        assert!(matches!(
            open(VhostUserInflight { mmap_offset: 4096, ..good }, &file),
            Err(InflightError::FileTooShort { .. })
        ));
        assert!(matches!(
            open(VhostUserInflight { mmap_offset: u64::MAX - 4095, ..good }, &file),
            Err(InflightError::FileTooShort { .. })
        ));

        // A file that is long enough but not sealed: the frontend could shrink it later.
        let unsealed = tempfile::tempfile().unwrap();
        unsealed.set_len(good.mmap_size).unwrap();
        assert!(matches!(open(good, &unsealed), Err(InflightError::NotSealed)));
        let dir = std::fs::File::open("/").unwrap();
        assert!(matches!(open(good, &dir), Err(InflightError::NotAFile)));
        assert!(open(good, &file).is_ok());
    }

    /// A split queue over a test memory: desc table, avail and used ring of `size` entries.
    struct Rings {
        mem: GuestMem,
        queue: Queue,
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x3000;
    const USED: u64 = 0x4000;

    impl Rings {
        fn new(size: u16) -> Self {
            let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let mut queue = Queue::new(size).unwrap();
            queue.set_size(size);
            queue.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
            queue.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
            queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
            queue.set_ready(true);
            Self { mem, queue }
        }

        /// The driver made `heads` available (at the current avail idx).
        fn make_available(&mut self, heads: &[u16]) {
            let mut idx: u16 = vm_memory::Bytes::read_obj(&self.mem, GuestAddress(AVAIL + 2)).unwrap();
            for &head in heads {
                let slot = u64::from(idx % self.queue.size());
                vm_memory::Bytes::write_obj(&self.mem, head, GuestAddress(AVAIL + 4 + 2 * slot)).unwrap();
                idx = idx.wrapping_add(1);
            }
            vm_memory::Bytes::write_obj(&self.mem, idx, GuestAddress(AVAIL + 2)).unwrap();
        }

        fn used_idx(&self) -> u16 {
            vm_memory::Bytes::read_obj(&self.mem, GuestAddress(USED + 2)).unwrap()
        }

        /// A fresh queue object over the same rings, as a restarted backend has.
        fn restarted(&self) -> Queue {
            let mut queue = Queue::new(self.queue.size()).unwrap();
            queue.set_size(self.queue.size());
            queue.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
            queue.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
            queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
            queue.set_ready(true);
            queue
        }
    }

    /// Pops `n` heads as the poller does: taken from the avail ring, then marked.
    fn take(rings: &mut Rings, tracker: &mut QueueTracker, n: usize) -> Vec<u16> {
        (0..n)
            .map(|_| {
                let chain = rings.queue.pop_descriptor_chain(&rings.mem).expect("a head is available");
                tracker.taken(chain.head_index());
                chain.head_index()
            })
            .collect()
    }

    #[test]
    fn requests_taken_and_not_used_are_resubmitted_once_in_order_and_used_ones_never() {
        let region = region(1, 8);
        let mut rings = Rings::new(8);
        let (mut tracker, recovered) = recover(&region, 0, &mut rings.queue, &rings.mem).unwrap();
        assert!(recovered.fresh);
        rings.make_available(&[3, 1, 4, 0, 5]);
        assert_eq!(take(&mut rings, &mut tracker, 5), [3, 1, 4, 0, 5]);
        // Completed out of order: 4, then 3.
        tracker.add_used(&mut rings.queue, &rings.mem, 4, 1).unwrap();
        tracker.add_used(&mut rings.queue, &rings.mem, 3, 1).unwrap();
        assert_eq!(rings.used_idx(), 2);
        rings.make_available(&[6, 7]);
        assert_eq!(take(&mut rings, &mut tracker, 1), [6]);
        // Crash: 1, 0, 5 and 6 in flight; 7 available, not taken.

        let mut queue = rings.restarted();
        queue.set_next_avail(rings.used_idx()); // what QEMU sends after a crash
        let (mut after, recovered) = recover(&region, 0, &mut queue, &rings.mem).unwrap();
        // 4 completed before 1: from the used idx (2), a backend without tracking would take
        // 4 (again) and never 1.
        assert_eq!(recovered, Recovered { fresh: false, last_batch: 0, resubmitted: 4, out_of_ring_order: 1 });
        assert_eq!(queue.next_avail(), 2 + 4, "next from the avail ring: 7");
        let mut resubmitted = Vec::new();
        while let Some(chain) = after.next_resubmitted(&queue, &rings.mem) {
            resubmitted.push(chain.head_index());
        }
        assert_eq!(resubmitted, [1, 0, 5, 6], "in the order they were taken");
        assert_eq!(queue.pop_descriptor_chain(&rings.mem).map(|c| c.head_index()), Some(7));
        assert!(queue.pop_descriptor_chain(&rings.mem).is_none());
    }

    #[test]
    fn a_crash_between_the_used_idx_and_the_mark_does_not_resubmit_the_used_request() {
        let region = region(1, 8);
        let mut rings = Rings::new(8);
        let (mut tracker, _) = recover(&region, 0, &mut rings.queue, &rings.mem).unwrap();
        rings.make_available(&[2, 5]);
        take(&mut rings, &mut tracker, 2);
        // 5 completes, but the backend dies after the used idx store: the mark and the
        // region's used_idx are as they were, last_batch_head names 5.
        let view = tracker.view.as_ref().unwrap();
        view.header_u16(LAST_BATCH_HEAD_AT).store(5, Ordering::Release);
        rings.queue.add_used(&rings.mem, 5, 1).unwrap();
        assert_eq!(view.inflight(5).unwrap().load(Ordering::Acquire), 1);

        let mut queue = rings.restarted();
        let (mut after, recovered) = recover(&region, 0, &mut queue, &rings.mem).unwrap();
        // 5 completed before 2: without tracking, 5 would run again and 2 never.
        assert_eq!(recovered, Recovered { fresh: false, last_batch: 1, resubmitted: 1, out_of_ring_order: 1 });
        assert_eq!(after.next_resubmitted(&queue, &rings.mem).map(|c| c.head_index()), Some(2));
        assert!(after.next_resubmitted(&queue, &rings.mem).is_none());
        assert_eq!(queue.next_avail(), 2);
    }

    #[test]
    fn a_head_taken_but_not_yet_marked_is_taken_again_from_the_avail_ring() {
        let region = region(1, 8);
        let mut rings = Rings::new(8);
        let (mut tracker, _) = recover(&region, 0, &mut rings.queue, &rings.mem).unwrap();
        rings.make_available(&[1, 2]);
        take(&mut rings, &mut tracker, 1);
        // Head 2 popped, crash before it was marked.
        rings.queue.pop_descriptor_chain(&rings.mem).unwrap();
        let mut queue = rings.restarted();
        let (mut after, _) = recover(&region, 0, &mut queue, &rings.mem).unwrap();
        assert_eq!(after.next_resubmitted(&queue, &rings.mem).map(|c| c.head_index()), Some(1));
        assert!(after.next_resubmitted(&queue, &rings.mem).is_none());
        assert_eq!(queue.pop_descriptor_chain(&rings.mem).map(|c| c.head_index()), Some(2));
    }

    #[test]
    fn resubmitted_requests_keep_their_place_across_a_second_crash() {
        let region = region(1, 8);
        let mut rings = Rings::new(8);
        let (mut tracker, _) = recover(&region, 0, &mut rings.queue, &rings.mem).unwrap();
        rings.make_available(&[0, 1, 2]);
        take(&mut rings, &mut tracker, 3);
        let mut queue = rings.restarted();
        let (mut after, _) = recover(&region, 0, &mut queue, &rings.mem).unwrap();
        // The second backend resubmits 0, completes it, takes a new request (3), and dies.
        assert_eq!(after.next_resubmitted(&queue, &rings.mem).map(|c| c.head_index()), Some(0));
        after.add_used(&mut queue, &rings.mem, 0, 1).unwrap();
        rings.make_available(&[3]);
        let chain = queue.pop_descriptor_chain(&rings.mem).unwrap();
        after.taken(chain.head_index());
        let mut third = rings.restarted();
        let (mut last, recovered) = recover(&region, 0, &mut third, &rings.mem).unwrap();
        assert_eq!(recovered.resubmitted, 3);
        let order: Vec<u16> =
            std::iter::from_fn(|| last.next_resubmitted(&third, &rings.mem).map(|c| c.head_index())).collect();
        assert_eq!(order, [1, 2, 3], "older requests first, then the one taken after the restart");
        assert_eq!(third.next_avail(), 1 + 3);
    }

    #[test]
    fn content_no_backend_could_have_left_refuses_the_start() {
        let region = region(2, 8);
        let mut rings = Rings::new(8);
        let (mut tracker, _) = recover(&region, 0, &mut rings.queue, &rings.mem).unwrap();
        rings.make_available(&[0]);
        take(&mut rings, &mut tracker, 1);
        let view = region.queue(0).unwrap();

        // More marked than the avail ring holds.
        view.inflight(3).unwrap().store(1, Ordering::Release);
        let err = recover(&region, 0, &mut rings.restarted(), &rings.mem).unwrap_err();
        assert!(matches!(err, InflightError::Inconsistent { .. }), "{err}");
        view.inflight(3).unwrap().store(0, Ordering::Release);

        // A head beyond a queue smaller than the region.
        let mut small = Rings::new(4);
        small.make_available(&[0, 1]);
        view.inflight(6).unwrap().store(1, Ordering::Release);
        let err = recover(&region, 0, &mut small.restarted(), &small.mem).unwrap_err();
        assert!(matches!(err, InflightError::Inconsistent { .. }), "{err}");
        view.inflight(6).unwrap().store(0, Ordering::Release);

        // A last batch naming a head beyond the region, or longer than the queue.
        view.header_u16(USED_IDX_AT).store(7, Ordering::Release);
        let err = recover(&region, 0, &mut rings.restarted(), &rings.mem).unwrap_err();
        assert!(matches!(err, InflightError::Inconsistent { .. }), "{err}");
        view.header_u16(USED_IDX_AT).store(u16::MAX, Ordering::Release);
        view.header_u16(LAST_BATCH_HEAD_AT).store(40, Ordering::Release);
        let err = recover(&region, 0, &mut rings.restarted(), &rings.mem).unwrap_err();
        assert!(matches!(err, InflightError::Inconsistent { .. }), "{err}");
        view.header_u16(USED_IDX_AT).store(0, Ordering::Release);

        // Unknown version; a queue the region does not cover; a queue larger than its region.
        view.header_u16(VERSION_AT).store(2, Ordering::Release);
        assert!(matches!(
            recover(&region, 0, &mut rings.restarted(), &rings.mem),
            Err(InflightError::Version { version: 2, .. })
        ));
        view.header_u16(VERSION_AT).store(1, Ordering::Release);
        assert!(matches!(
            recover(&region, 2, &mut rings.restarted(), &rings.mem),
            Err(InflightError::NoSuchQueue { .. })
        ));
        let mut big = Rings::new(16);
        assert!(matches!(recover(&region, 1, &mut big.queue, &big.mem), Err(InflightError::QueueTooLarge { .. })));

        // Sane again: the one request is resubmitted.
        let (_, recovered) = recover(&region, 0, &mut rings.restarted(), &rings.mem).unwrap();
        assert_eq!(recovered.resubmitted, 1);
    }

    #[test]
    fn an_untracked_queue_only_uses() {
        let mut rings = Rings::new(8);
        let mut tracker = QueueTracker::default();
        rings.make_available(&[4]);
        let head = take(&mut rings, &mut tracker, 1)[0];
        assert!(!tracker.resubmitting());
        tracker.add_used(&mut rings.queue, &rings.mem, head, 1).unwrap();
        assert_eq!(rings.used_idx(), 1);
    }
}
