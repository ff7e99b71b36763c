//! Registered memory and per-request access keys (leaf module: holds the
//! raw pointers into guest RAM / hugepage buffers and the copies between them).
//!
//! A region is raw host memory registered once (a guest memory region, a
//! hugepage buffer). A *grant* opens byte ranges of one region to the peer
//! under a fresh key; the peer addresses them by virtual address, as with
//! VA-based verbs memory regions. A key covers exactly the granted ranges
//! and stops working the moment it is revoked.
//!
//! We never form Rust references to registered memory: the guest may change
//! it at any time, so it is only touched through raw pointers by `copy`,
//! `readv` and `writev`.
//!
//! # Concurrency
//!
//! `grant`, `revoke` and `check_remote` run per request, from several
//! poller and transport threads at once, so none of them takes a lock
//! shared between requests:
//!
//! * Grants live in a fixed slab of [`MAX_GRANTS`] slots. A key is the slot
//!   index (low 13 bits) and the slot's generation (high 19 bits), which
//!   changes with every grant of the slot; free slots wait in a lock-free
//!   queue (FIFO, so a slot and its keys are reused as late as possible).
//! * A slot's state word is `key << 1 | live`. `grant` takes a free slot,
//!   writes access, region and ranges, then publishes the new key with a
//!   release store; `revoke` clears the live bit (compare-exchange: a key is
//!   revoked once) before the slot goes back to the queue. `check_remote`
//!   reads the state (acquire), the fields, and the state again after an
//!   acquire fence, seqlock-style: a changed state means the key was
//!   revoked meanwhile, and the access is refused.
//! * Ranges are stored in the slot ([`INLINE_RANGES`] inline, the rest in
//!   a per-slot array allocated the first time a grant of that slot needs
//!   it and kept for reuse); all fields are atomics, so a racing reader
//!   sees stale values at worst, never undefined ones.
//! * Regions are looked up by id in a fixed table of [`MAX_REGIONS`]
//!   slots, each behind its own reader-writer lock (writers: register and
//!   deregister, the slow path). An id carries the slot's generation, so a
//!   stale id never reaches a newer region.
//! * Pins: a grant holds an `Arc` of its region, as does every piece of
//!   memory handed to a transfer (`IoPtr`); `deregister` answers `Busy`
//!   while any exists. Whatever the key check concluded, the pointer
//!   returned for a peer access is computed from, and bounded by, the
//!   pinned region itself.

use crate::wire::{Segment, Segments, MAX_SEGMENTS};
use crate::TransportError;
use crossbeam_queue::ArrayQueue;
use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

/// A registered memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionId(pub u32);

/// An access key granted for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub u32);

/// What a peer may do with a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The peer may read (it pulls WRITE data).
    RemoteRead,
    /// The peer may write (it pushes READ data).
    RemoteWrite,
}

impl Access {
    fn code(self) -> u8 {
        match self {
            Access::RemoteRead => 1,
            Access::RemoteWrite => 2,
        }
    }
}

/// A byte range of a local registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalSeg {
    pub region: RegionId,
    pub offset: u64,
    pub len: u32,
}

/// A key and the remote segments it opens, ready to put in a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub key: Key,
    pub segments: Segments,
}

/// Bounds of a registry.
pub const MAX_REGIONS: usize = 1 << REGION_SLOT_BITS;
/// Live grants per registry (one per in-flight request, plus long-lived windows).
pub const MAX_GRANTS: usize = 1 << GRANT_SLOT_BITS;
/// Ranges a grant slot holds without its spill array.
pub const INLINE_RANGES: usize = 4;

const REGION_SLOT_BITS: u32 = 10;
const GRANT_SLOT_BITS: u32 = 13;
const GRANT_SLOT_MASK: u32 = (1 << GRANT_SLOT_BITS) - 1;
const REGION_SLOT_MASK: u32 = (1 << REGION_SLOT_BITS) - 1;
/// Generations of a key, never 0 (so no key is 0).
const KEY_GENS: u32 = 1 << (32 - GRANT_SLOT_BITS);
/// Generations of a region id, never 0 (so no id is 0).
const REGION_GENS: u32 = 1 << (32 - REGION_SLOT_BITS);

#[derive(Debug)]
pub(crate) struct Region {
    id: u32,
    base: *mut u8,
    len: usize,
}

// SAFETY: `Region` is an address range; `Registry::register`'s contract makes
// the memory valid for reads and writes from any thread until deregistration,
// and it is only accessed through raw-pointer copies and vectored syscalls.
unsafe impl Send for Region {}
// SAFETY: as for `Send`; `Region` is immutable after registration.
unsafe impl Sync for Region {}

/// A raw, validated piece of registered memory. Holding it keeps its region
/// registered (deregistration reports `Busy` while any `IoPtr` lives).
#[derive(Debug, Clone)]
pub(crate) struct IoPtr {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
    _region: Arc<Region>,
}

// SAFETY: points into a `Region`, which is Send/Sync (see above), and keeps it alive.
unsafe impl Send for IoPtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for IoPtr {}

impl IoPtr {
    /// `len` bytes at byte `off` of `region`, if they lie inside it.
    fn within(region: Arc<Region>, off: u64, len: usize) -> Option<Self> {
        let end = off.checked_add(len as u64)?;
        if end > region.len as u64 {
            return None;
        }
        Some(IoPtr {
            // `off + len <= region.len`: the pointer stays inside the region.
            ptr: region.base.wrapping_add(off as usize),
            len,
            _region: region,
        })
    }
}

/// A local buffer made of registered pieces, with a byte cursor view.
#[derive(Debug, Clone, Default)]
pub(crate) struct LocalBuf {
    pub(crate) pieces: Vec<IoPtr>,
    pub(crate) total: usize,
}

impl LocalBuf {
    /// The pieces covering `[off, off + len)`, trimmed to that range.
    pub(crate) fn sub(&self, mut off: usize, mut len: usize) -> Vec<IoPtr> {
        let mut out = Vec::new();
        for p in &self.pieces {
            if len == 0 {
                break;
            }
            if off >= p.len {
                off -= p.len;
                continue;
            }
            let take = (p.len - off).min(len);
            // `off + take <= p.len`, so the result stays inside the piece.
            out.push(IoPtr { ptr: p.ptr.wrapping_add(off), len: take, _region: p._region.clone() });
            len -= take;
            off = 0;
        }
        out
    }
}

/// One granted range, readable while a writer may be replacing it.
#[derive(Debug, Default)]
struct RangeCell {
    addr: AtomicU64,
    len: AtomicU32,
}

impl RangeCell {
    fn set(&self, addr: u64, len: u32) {
        self.addr.store(addr, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
    }
    fn covers(&self, addr: u64, end: u64) -> bool {
        let a = self.addr.load(Ordering::Relaxed);
        let l = self.len.load(Ordering::Relaxed);
        addr >= a && a.checked_add(l.into()).is_some_and(|e| end <= e)
    }
}

#[derive(Debug)]
struct GrantSlot {
    /// `key << 1 | live`.
    state: AtomicU64,
    /// `Access::code`.
    access: AtomicU8,
    region: AtomicU32,
    count: AtomicU32,
    ranges: [RangeCell; INLINE_RANGES],
    /// Ranges beyond `INLINE_RANGES`; allocated once, kept with the slot.
    spill: OnceLock<Box<[RangeCell]>>,
    /// The grant's pin of its region. Written by `grant` and taken by
    /// `revoke`, each of which holds the slot exclusively at that moment
    /// (from the free queue, by winning the compare-exchange), so the lock
    /// is never contended; readers never touch it.
    pin: Mutex<Option<Arc<Region>>>,
}

impl GrantSlot {
    fn new(key: u32) -> Self {
        Self {
            state: AtomicU64::new(u64::from(key) << 1),
            access: AtomicU8::new(0),
            region: AtomicU32::new(0),
            count: AtomicU32::new(0),
            ranges: Default::default(),
            spill: OnceLock::new(),
            pin: Mutex::new(None),
        }
    }

    /// The cell of range `i` (< MAX_SEGMENTS); `None` for a spilled range
    /// whose array does not exist (only a torn read can ask for it).
    fn cell(&self, i: usize) -> Option<&RangeCell> {
        match i.checked_sub(INLINE_RANGES) {
            None => self.ranges.get(i),
            Some(j) => self.spill.get()?.get(j),
        }
    }

    fn cell_for_write(&self, i: usize) -> Option<&RangeCell> {
        if i >= INLINE_RANGES {
            self.spill.get_or_init(|| (INLINE_RANGES..MAX_SEGMENTS).map(|_| RangeCell::default()).collect());
        }
        self.cell(i)
    }
}

fn live(key: u32) -> u64 {
    (u64::from(key) << 1) | 1
}

/// The key a slot's next grant gets: same slot, next generation (never 0).
fn next_key(key: u32) -> u32 {
    let slot = key & GRANT_SLOT_MASK;
    let mut gen = ((key >> GRANT_SLOT_BITS) + 1) % KEY_GENS;
    if gen == 0 {
        gen = 1;
    }
    (gen << GRANT_SLOT_BITS) | slot
}

/// Allocation of region slots (register/deregister only: the slow path).
#[derive(Debug)]
struct RegionAlloc {
    /// Free slots, least recently used first.
    free: VecDeque<u32>,
    /// Generation of each slot's current or last id.
    gens: Vec<u32>,
}

/// Why a peer's access was refused (reported as `Status::AccessDenied`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    UnknownKey,
    WrongAccess,
    OutOfWindow,
}

/// Registered regions and live grants of one node; shared by its endpoints
/// so that registrations survive a reconnection.
#[derive(Debug)]
pub struct Registry {
    regions: Box<[RwLock<Option<Arc<Region>>>]>,
    region_alloc: Mutex<RegionAlloc>,
    grants: Box<[GrantSlot]>,
    free_grants: ArrayQueue<u32>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section in this module is a single assignment or
    // push/pop; a panic cannot leave the data half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    pub fn new() -> Self {
        let mut seed = [0u8; 4];
        // Unpredictable first keys: a stale or guessed key from an earlier
        // process incarnation is unlikely to hit a live one. Falling back to
        // fixed ones only weakens that heuristic, never the checks.
        let _ = getrandom::getrandom(&mut seed);
        let seed = u32::from_le_bytes(seed);
        let grants: Box<[GrantSlot]> = (0..MAX_GRANTS as u32)
            .map(|slot| {
                // A different starting generation per slot, from the seed.
                let gen = seed.wrapping_add(slot.wrapping_mul(0x9e37_79b9)) % KEY_GENS;
                GrantSlot::new((gen << GRANT_SLOT_BITS) | slot)
            })
            .collect();
        let free_grants = ArrayQueue::new(MAX_GRANTS);
        for slot in 0..MAX_GRANTS as u32 {
            // Capacity is MAX_GRANTS: every push fits.
            let _ = free_grants.push(slot);
        }
        Self {
            regions: (0..MAX_REGIONS).map(|_| RwLock::new(None)).collect(),
            region_alloc: Mutex::new(RegionAlloc {
                free: (0..MAX_REGIONS as u32).collect(),
                gens: vec![0; MAX_REGIONS],
            }),
            grants,
            free_grants,
        }
    }

    fn region_slot(&self, id: u32) -> &RwLock<Option<Arc<Region>>> {
        &self.regions[(id & REGION_SLOT_MASK) as usize]
    }

    /// The region `id` names, pinned.
    fn region(&self, id: RegionId) -> Option<Arc<Region>> {
        let g = self.region_slot(id.0).read().unwrap_or_else(|p| p.into_inner());
        g.as_ref().filter(|r| r.id == id.0).cloned()
    }

    /// Registers `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes, from any thread,
    /// until `deregister` of the returned id returns `Ok` or the registry is
    /// dropped (every endpoint using it is dropped). The peer may read and
    /// write granted ranges concurrently with the caller; no Rust reference
    /// to that memory may be held across a grant.
    pub unsafe fn register(&self, ptr: *mut u8, len: usize) -> Result<RegionId, TransportError> {
        if ptr.is_null() || len == 0 || (ptr as usize).checked_add(len).is_none() {
            return Err(TransportError::BadRegion);
        }
        let mut a = lock(&self.region_alloc);
        let slot = a.free.pop_front().ok_or(TransportError::Limit("regions"))?;
        let gen = &mut a.gens[slot as usize];
        *gen = (*gen + 1) % REGION_GENS;
        if *gen == 0 {
            *gen = 1;
        }
        let id = (*gen << REGION_SLOT_BITS) | slot;
        *self.region_slot(id).write().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new(Region { id, base: ptr, len }));
        Ok(RegionId(id))
    }

    /// Forgets a region. `Busy` while a grant or an in-flight operation uses it.
    pub fn deregister(&self, id: RegionId) -> Result<(), TransportError> {
        let mut a = lock(&self.region_alloc);
        {
            let mut g = self.region_slot(id.0).write().unwrap_or_else(|p| p.into_inner());
            let r = g.as_ref().filter(|r| r.id == id.0).ok_or(TransportError::UnknownRegion(id.0))?;
            // No new pin can be taken from the table while we hold its write
            // lock, and every other pin is counted here.
            if Arc::strong_count(r) > 1 {
                return Err(TransportError::Busy);
            }
            *g = None;
        }
        a.free.push_back(id.0 & REGION_SLOT_MASK);
        Ok(())
    }

    /// Opens `ranges` (offset, length within `region`) to the peer under a new key.
    pub fn grant(&self, region: RegionId, ranges: &[(u64, u32)], access: Access) -> Result<Grant, TransportError> {
        if ranges.is_empty() || ranges.len() > MAX_SEGMENTS {
            return Err(TransportError::Limit("ranges per grant"));
        }
        let r = self.region(region).ok_or(TransportError::UnknownRegion(region.0))?;
        for &(off, len) in ranges {
            let end = off.checked_add(len.into()).ok_or(TransportError::OutOfRegion)?;
            if len == 0 || end > r.len as u64 {
                return Err(TransportError::OutOfRegion);
            }
        }
        let idx = self.free_grants.pop().ok_or(TransportError::Limit("grants"))?;
        let slot = &self.grants[idx as usize];
        // The slot is ours alone until its key is published below.
        let key = next_key((slot.state.load(Ordering::Relaxed) >> 1) as u32);
        // Seqlock writer: the slot's previous key was marked dead (by `revoke`,
        // before the slot reached the free queue we took it from) before any
        // field changes; a reader that sees a new field value sees that too.
        fence(Ordering::Release);
        slot.access.store(access.code(), Ordering::Relaxed);
        slot.region.store(region.0, Ordering::Relaxed);
        // At most MAX_SEGMENTS (checked above).
        slot.count.store(ranges.len() as u32, Ordering::Relaxed);
        let mut segments = Segments::new();
        for (i, &(off, len)) in ranges.iter().enumerate() {
            let addr = r.base as u64 + off;
            if let Some(c) = slot.cell_for_write(i) {
                c.set(addr, len);
            }
            segments.push(Segment { addr, key, len });
        }
        *lock(&slot.pin) = Some(r);
        slot.state.store(live(key), Ordering::Release);
        Ok(Grant { key: Key(key), segments })
    }

    /// Revokes a key; later accesses with it are refused. An access checked
    /// before (a transfer under way) completes.
    pub fn revoke(&self, key: Key) -> Result<(), TransportError> {
        let idx = key.0 & GRANT_SLOT_MASK;
        let slot = &self.grants[idx as usize];
        slot.state
            .compare_exchange(live(key.0), live(key.0) & !1, Ordering::AcqRel, Ordering::Relaxed)
            .map_err(|_| TransportError::UnknownKey(key.0))?;
        drop(lock(&slot.pin).take());
        // Each slot index is in the queue at most once and the queue holds
        // MAX_GRANTS: the push cannot fail.
        let pushed = self.free_grants.push(idx);
        debug_assert!(pushed.is_ok());
        Ok(())
    }

    /// Checks a peer's access and returns the memory it addresses.
    pub(crate) fn check_remote(&self, key: u32, addr: u64, len: u32, want: Access) -> Result<IoPtr, Denied> {
        let slot = &self.grants[(key & GRANT_SLOT_MASK) as usize];
        let want_state = live(key);
        if slot.state.load(Ordering::Acquire) != want_state {
            return Err(Denied::UnknownKey);
        }
        let access = slot.access.load(Ordering::Relaxed);
        let region = slot.region.load(Ordering::Relaxed);
        let n = (slot.count.load(Ordering::Relaxed) as usize).min(MAX_SEGMENTS);
        let inside = len > 0
            && addr
                .checked_add(len.into())
                .is_some_and(|end| (0..n).any(|i| slot.cell(i).is_some_and(|c| c.covers(addr, end))));
        // Seqlock reader: if any field read above came from a later grant of
        // this slot, the state has changed too and the access is refused.
        fence(Ordering::Acquire);
        if slot.state.load(Ordering::Relaxed) != want_state {
            return Err(Denied::UnknownKey);
        }
        if access != want.code() {
            return Err(Denied::WrongAccess);
        }
        if !inside {
            return Err(Denied::OutOfWindow);
        }
        let r = self.region(RegionId(region)).ok_or(Denied::UnknownKey)?;
        // The grant pins its region while live: if it still is, `r` is the
        // region it was granted on.
        if slot.state.load(Ordering::Acquire) != want_state {
            return Err(Denied::UnknownKey);
        }
        let off = addr.checked_sub(r.base as u64).ok_or(Denied::OutOfWindow)?;
        IoPtr::within(r, off, len as usize).ok_or(Denied::OutOfWindow)
    }

    /// Resolves local segments to registered memory.
    pub(crate) fn local(&self, segs: &[LocalSeg]) -> Result<LocalBuf, TransportError> {
        let mut buf = LocalBuf { pieces: Vec::with_capacity(segs.len()), total: 0 };
        for s in segs {
            let r = self.region(s.region).ok_or(TransportError::UnknownRegion(s.region.0))?;
            if s.len == 0 {
                return Err(TransportError::OutOfRegion);
            }
            let p = IoPtr::within(r, s.offset, s.len as usize).ok_or(TransportError::OutOfRegion)?;
            buf.pieces.push(p);
            buf.total += s.len as usize;
        }
        Ok(buf)
    }

    /// Copies `src` into registered memory (`dst`, as long as `src` in
    /// total): for a receiver storing an inline payload in a registered
    /// buffer, or a test peer writing its memory disk.
    pub fn copy_to_local(&self, dst: &[LocalSeg], src: &[u8]) -> Result<(), TransportError> {
        let buf = self.local(dst)?;
        if buf.total != src.len() {
            return Err(TransportError::LengthMismatch { local: buf.total, remote: src.len() });
        }
        scatter(src, &buf.pieces);
        Ok(())
    }

    /// Live grants (for tests and metrics).
    pub fn live_grants(&self) -> usize {
        MAX_GRANTS - self.free_grants.len()
    }
}

/// Copies `dst.len()`-summed bytes from `src` pieces into `dst` pieces.
pub(crate) fn copy(src: &[IoPtr], dst: &[IoPtr]) {
    let (mut si, mut so, mut di, mut d_off) = (0usize, 0usize, 0usize, 0usize);
    while si < src.len() && di < dst.len() {
        let n = (src[si].len - so).min(dst[di].len - d_off);
        // SAFETY: both pieces were validated against registered regions
        // (`check_remote`/`local`), `so + n <= src.len` and `d_off + n <= dst.len`,
        // and each `IoPtr` keeps its region registered, so both ranges are valid
        // memory per `Registry::register`'s contract. `ptr::copy` tolerates overlap.
        unsafe { std::ptr::copy(src[si].ptr.add(so), dst[di].ptr.add(d_off), n) };
        so += n;
        d_off += n;
        if so == src[si].len {
            si += 1;
            so = 0;
        }
        if d_off == dst[di].len {
            di += 1;
            d_off = 0;
        }
    }
}

/// Copies from registered `src` pieces into `dst` (as many bytes as both hold).
pub(crate) fn gather(src: &[IoPtr], mut dst: &mut [u8]) {
    for p in src {
        let n = p.len.min(dst.len());
        // SAFETY: `p` was validated against its registered region and keeps it
        // registered, so `p.ptr..p.ptr + n` is valid memory (register's
        // contract); `dst` is an exclusive slice of ours, so they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(p.ptr, dst.as_mut_ptr(), n) };
        dst = &mut dst[n..];
    }
}

/// Copies `src` into registered `dst` pieces (as many bytes as both hold).
pub(crate) fn scatter(mut src: &[u8], dst: &[IoPtr]) {
    for p in dst {
        let n = p.len.min(src.len());
        // SAFETY: as in `gather`, with the roles swapped: writing registered
        // memory through a validated, pinned piece is what registration permits.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p.ptr, n) };
        src = &src[n..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn keys_cover_exactly_their_ranges() {
        let mut mem = vec![0u8; 8192];
        let reg = Registry::new();
        // SAFETY: `mem` outlives `reg` (declared before it) and is not borrowed while registered.
        let r = unsafe { reg.register(mem.as_mut_ptr(), mem.len()) }.unwrap();
        let g1 = reg.grant(r, &[(0, 512), (4096, 1024)], Access::RemoteRead).unwrap();
        let g2 = reg.grant(r, &[(1024, 512)], Access::RemoteRead).unwrap();
        let s = g1.segments[1];
        assert!(reg.check_remote(g1.key.0, s.addr, s.len, Access::RemoteRead).is_ok());
        assert!(reg.check_remote(g1.key.0, s.addr + 512, 512, Access::RemoteRead).is_ok());
        assert_eq!(reg.check_remote(g1.key.0, s.addr + 512, 513, Access::RemoteRead).unwrap_err(), Denied::OutOfWindow);
        assert_eq!(reg.check_remote(g1.key.0, s.addr, s.len, Access::RemoteWrite).unwrap_err(), Denied::WrongAccess);
        assert_eq!(reg.check_remote(g1.key.0, s.addr, 0, Access::RemoteRead).unwrap_err(), Denied::OutOfWindow);
        // Another request's key does not open this request's bytes.
        assert_eq!(reg.check_remote(g2.key.0, s.addr, 512, Access::RemoteRead).unwrap_err(), Denied::OutOfWindow);
        assert!(matches!(reg.deregister(r), Err(TransportError::Busy)));
        reg.revoke(g1.key).unwrap();
        assert_eq!(reg.check_remote(g1.key.0, s.addr, s.len, Access::RemoteRead).unwrap_err(), Denied::UnknownKey);
        assert!(matches!(reg.revoke(g1.key), Err(TransportError::UnknownKey(_))));
        // An access checked while the key was live pins the region.
        let pinned = reg.check_remote(g2.key.0, g2.segments[0].addr, 512, Access::RemoteRead).unwrap();
        reg.revoke(g2.key).unwrap();
        assert_eq!(reg.live_grants(), 0);
        assert!(matches!(reg.deregister(r), Err(TransportError::Busy)));
        drop(pinned);
        reg.deregister(r).unwrap();
        assert!(reg.grant(r, &[(0, 1)], Access::RemoteRead).is_err());
        assert!(matches!(reg.deregister(r), Err(TransportError::UnknownRegion(_))));
        drop(mem);
    }

    #[test]
    fn grants_outside_the_region_are_refused() {
        let mut mem = vec![0u8; 4096];
        let reg = Registry::new();
        // SAFETY: `mem` outlives `reg`.
        let r = unsafe { reg.register(mem.as_mut_ptr(), mem.len()) }.unwrap();
        assert!(reg.grant(r, &[(4000, 97)], Access::RemoteRead).is_err());
        assert!(reg.grant(r, &[(u64::MAX, 2)], Access::RemoteRead).is_err());
        assert!(reg.grant(r, &[(0, 0)], Access::RemoteRead).is_err());
        assert!(reg.grant(r, &[], Access::RemoteRead).is_err());
        assert_eq!(reg.live_grants(), 0, "a refused grant holds no slot");
        assert!(reg.local(&[LocalSeg { region: r, offset: 4095, len: 2 }]).is_err());
        let b = reg
            .local(&[LocalSeg { region: r, offset: 0, len: 100 }, LocalSeg { region: r, offset: 200, len: 100 }])
            .unwrap();
        let sub = b.sub(50, 100);
        assert_eq!(sub.iter().map(|p| p.len).collect::<Vec<_>>(), vec![50, 50]);
        drop(b);
        drop(sub);
        reg.deregister(r).unwrap();
        drop(mem);
    }

    #[test]
    fn many_ranges_spill_and_slots_are_reused_under_new_keys() {
        let mut mem = vec![0u8; 1 << 20];
        let reg = Registry::new();
        // SAFETY: `mem` outlives `reg`.
        let r = unsafe { reg.register(mem.as_mut_ptr(), mem.len()) }.unwrap();
        let ranges: Vec<(u64, u32)> = (0..MAX_SEGMENTS as u64).map(|i| (i * 8192, 100)).collect();
        let g = reg.grant(r, &ranges, Access::RemoteWrite).unwrap();
        assert_eq!(g.segments.len(), MAX_SEGMENTS);
        for s in [g.segments[0], g.segments[INLINE_RANGES], g.segments[MAX_SEGMENTS - 1]] {
            assert!(reg.check_remote(g.key.0, s.addr, s.len, Access::RemoteWrite).is_ok());
            // The gap after each range is not granted.
            assert_eq!(
                reg.check_remote(g.key.0, s.addr + 100, 1, Access::RemoteWrite).unwrap_err(),
                Denied::OutOfWindow
            );
        }
        assert!(reg.grant(r, &vec![(0, 1); MAX_SEGMENTS + 1], Access::RemoteRead).is_err());
        reg.revoke(g.key).unwrap();
        // Cycle every slot: keys never repeat and old keys stay dead.
        let mut seen = std::collections::HashSet::new();
        seen.insert(g.key.0);
        for _ in 0..2 * MAX_GRANTS {
            let k = reg.grant(r, &[(0, 64)], Access::RemoteRead).unwrap();
            assert_ne!(k.key.0, 0);
            assert!(seen.insert(k.key.0), "key {:#x} reused", k.key.0);
            reg.revoke(k.key).unwrap();
        }
        for &k in &seen {
            assert_eq!(reg.check_remote(k, g.segments[0].addr, 1, Access::RemoteRead).unwrap_err(), Denied::UnknownKey);
        }
        // The slab is bounded.
        let all: Vec<Grant> = (0..MAX_GRANTS).map(|_| reg.grant(r, &[(0, 1)], Access::RemoteRead).unwrap()).collect();
        assert!(matches!(reg.grant(r, &[(0, 1)], Access::RemoteRead), Err(TransportError::Limit("grants"))));
        for g in all {
            reg.revoke(g.key).unwrap();
        }
        reg.deregister(r).unwrap();
        drop(mem);
    }

    #[test]
    fn region_ids_are_not_reused_and_regions_are_bounded() {
        let mut mem = vec![0u8; 64];
        let reg = Registry::new();
        // SAFETY: `mem` outlives `reg`; every registration is of the same live buffer.
        let a = unsafe { reg.register(mem.as_mut_ptr(), mem.len()) }.unwrap();
        reg.deregister(a).unwrap();
        // SAFETY: as above.
        let b = unsafe { reg.register(mem.as_mut_ptr(), mem.len()) }.unwrap();
        assert_ne!(a, b);
        assert!(reg.grant(a, &[(0, 1)], Access::RemoteRead).is_err());
        let mut ids = vec![b];
        for _ in 1..MAX_REGIONS {
            // SAFETY: as above.
            ids.push(unsafe { reg.register(mem.as_mut_ptr(), mem.len()) }.unwrap());
        }
        // SAFETY: as above.
        let over = unsafe { reg.register(mem.as_mut_ptr(), mem.len()) };
        assert!(matches!(over, Err(TransportError::Limit("regions"))));
        for id in ids {
            reg.deregister(id).unwrap();
        }
        drop(mem);
    }

    #[test]
    fn copy_to_local_fills_registered_memory() {
        let mut mem = vec![0u8; 64];
        let reg = Registry::new();
        // SAFETY: `mem` outlives `reg` and is read only after deregistration.
        let r = unsafe { reg.register(mem.as_mut_ptr(), mem.len()) }.unwrap();
        let dst = [LocalSeg { region: r, offset: 1, len: 2 }, LocalSeg { region: r, offset: 10, len: 3 }];
        reg.copy_to_local(&dst, b"abcde").unwrap();
        assert!(reg.copy_to_local(&dst, b"abcd").is_err());
        let mut back = [0u8; 5];
        gather(&reg.local(&dst).unwrap().pieces, &mut back);
        assert_eq!(&back, b"abcde");
        reg.deregister(r).unwrap();
        assert_eq!(&mem[1..3], b"ab");
        assert_eq!(&mem[10..13], b"cde");
    }

    /// Several threads grant, check and revoke at once; others hammer the
    /// keys they see revoked. A live key always passes for its own bytes,
    /// a revoked key never passes again, and every check returns memory
    /// inside the buffer.
    #[test]
    fn concurrent_grants_checks_and_revokes() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 3000;
        let mut mem = vec![0u8; 1 << 20];
        let base = mem.as_ptr() as u64;
        let reg = Arc::new(Registry::new());
        // SAFETY: `mem` outlives every thread (joined below) and the registry's use of it.
        let r = unsafe { reg.register(mem.as_mut_ptr(), mem.len()) }.unwrap();
        let revoked: Arc<Mutex<Vec<Segment>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let passed_after_revoke = Arc::new(AtomicU64::new(0));
        let mut owners = Vec::new();
        for t in 0..THREADS {
            let reg = reg.clone();
            let revoked = revoked.clone();
            owners.push(std::thread::spawn(move || {
                for i in 0..ROUNDS {
                    // 1..=8 ranges: inline and spilled slots both.
                    let n = 1 + (i + t) % 8;
                    let ranges: Vec<(u64, u32)> =
                        (0..n).map(|k| ((((t * 131 + i * 7 + k * 3) % 250) * 4096) as u64, 1024)).collect();
                    let access = if i % 2 == 0 { Access::RemoteRead } else { Access::RemoteWrite };
                    let g = reg.grant(r, &ranges, access).unwrap();
                    for s in &g.segments {
                        let p = reg.check_remote(s.key, s.addr, s.len, access).unwrap();
                        assert_eq!(p.ptr as u64, s.addr);
                        assert_eq!(p.len, s.len as usize);
                    }
                    reg.revoke(g.key).unwrap();
                    for s in &g.segments {
                        assert_eq!(reg.check_remote(s.key, s.addr, s.len, access).unwrap_err(), Denied::UnknownKey);
                    }
                    let mut v = lock(&revoked);
                    if v.len() < 4096 {
                        v.push(g.segments[0]);
                    }
                }
            }));
        }
        let mut checkers = Vec::new();
        for _ in 0..2 {
            let reg = reg.clone();
            let revoked = revoked.clone();
            let stop = stop.clone();
            let passed = passed_after_revoke.clone();
            checkers.push(std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let s = {
                        let v = lock(&revoked);
                        if v.is_empty() {
                            continue;
                        }
                        v[i % v.len()]
                    };
                    i += 1;
                    for access in [Access::RemoteRead, Access::RemoteWrite] {
                        if let Ok(p) = reg.check_remote(s.key, s.addr, s.len, access) {
                            // Only a live key passes; this one was revoked
                            // before it was published here.
                            passed.fetch_add(1, Ordering::Relaxed);
                            assert!(p.ptr as u64 >= base && p.ptr as u64 + p.len as u64 <= base + (1 << 20));
                        }
                    }
                }
            }));
        }
        for o in owners {
            o.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for c in checkers {
            c.join().unwrap();
        }
        assert_eq!(passed_after_revoke.load(Ordering::Relaxed), 0);
        assert_eq!(reg.live_grants(), 0);
        reg.deregister(r).unwrap();
        drop(mem);
    }
}
