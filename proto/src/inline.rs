//! Buffers for inline WRITE payloads (leaf module: the raw aligned
//! allocations live here).
//!
//! A receiver takes one buffer per inline WRITE from its connection's
//! [`InlinePool`], receives the payload straight into it, and hands it to
//! the application inside the message ([`InlineData`]). The buffer starts on
//! a [`INLINE_ALIGN`] boundary and its capacity is a multiple of it, so the
//! replica can give it to an `O_DIRECT` write as it is. Dropping the
//! `InlineData` returns the buffer to its pool.
//!
//! Bounds: buffers come in five power-of-two sizes (4 KiB … 64 KiB); a pool
//! never owns more than its byte budget, counting buffers lent out (held by
//! unpolled or unreleased messages) and buffers cached for reuse. When the
//! budget is taken by buffers lent out, `take` answers `None` and the
//! receiver stops reading until one comes back: a flood of inline writes
//! meets backpressure, not growth. Once the pool holds a buffer of each size
//! in use, receiving allocates nothing.

use crate::wire::MAX_INLINE;
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

/// Alignment (and capacity granule) of every inline payload buffer.
pub const INLINE_ALIGN: usize = 4096;

/// Buffer sizes: `INLINE_ALIGN << class` for class `0..CLASSES`.
const CLASSES: usize = 5;
const _: () = assert!(INLINE_ALIGN << (CLASSES - 1) == MAX_INLINE as usize);

fn class_of(len: usize) -> usize {
    let pages = len.div_ceil(INLINE_ALIGN).max(1);
    pages.next_power_of_two().trailing_zeros() as usize
}

/// An owned, zero-initialised, `INLINE_ALIGN`-aligned heap allocation.
struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Box<[u8]>`); the
// bytes are plain data with no thread affinity.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&self` (see `as_slice`).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(cap: usize) -> Layout {
        // `cap` is a power-of-two multiple of INLINE_ALIGN, at most MAX_INLINE:
        // far below isize::MAX, so the layout is valid.
        Layout::from_size_align(cap, INLINE_ALIGN).unwrap_or_else(|_| unreachable!("inline buffer layout"))
    }

    fn new(cap: usize) -> Self {
        let layout = Self::layout(cap);
        // SAFETY: `layout` has a non-zero size (cap >= INLINE_ALIGN).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, cap }
    }

    fn as_slice(&self, len: usize) -> &[u8] {
        let len = len.min(self.cap);
        // SAFETY: the allocation holds `cap` >= `len` initialised bytes (zeroed at
        // allocation, only ever written through `as_mut_slice`) and lives as long
        // as `self`; no `&mut` to it exists while `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) }
    }

    fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.cap);
        // SAFETY: as for `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) };
    }
}

struct PoolState {
    /// Buffers cached for reuse, per size class.
    free: [Vec<AlignedBuf>; CLASSES],
    /// Bytes of every buffer of this pool: cached and lent out.
    allocated: usize,
    /// Bytes lent out.
    lent: usize,
}

struct PoolShared {
    budget: usize,
    state: Mutex<PoolState>,
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Every critical section is a push or pop plus counter updates that
        // cannot panic in between.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A bounded pool of inline payload buffers (one per connection).
#[derive(Clone)]
pub(crate) struct InlinePool(Arc<PoolShared>);

impl std::fmt::Debug for InlinePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlinePool").field("budget", &self.0.budget).finish()
    }
}

impl InlinePool {
    /// A pool owning at most `budget` bytes (at least one `MAX_INLINE`
    /// buffer's worth, so that any inline WRITE can be received).
    pub(crate) fn new(budget: usize) -> Self {
        Self(Arc::new(PoolShared {
            budget: budget.max(MAX_INLINE as usize),
            state: Mutex::new(PoolState { free: Default::default(), allocated: 0, lent: 0 }),
        }))
    }

    /// A buffer for a `len`-byte payload (`1..=MAX_INLINE`), or `None`
    /// while the budget is taken by buffers lent out.
    pub(crate) fn take(&self, len: usize) -> Option<InlineData> {
        if len == 0 || len > MAX_INLINE as usize {
            return None;
        }
        let class = class_of(len);
        let cap = INLINE_ALIGN << class;
        let mut st = self.0.lock();
        let buf = match st.free[class].pop() {
            Some(b) => b,
            None => {
                // Make room by freeing cached buffers of other sizes.
                while st.allocated + cap > self.0.budget {
                    let victim = (0..CLASSES).rev().find(|&c| !st.free[c].is_empty())?;
                    if let Some(b) = st.free[victim].pop() {
                        st.allocated -= b.cap;
                    }
                }
                st.allocated += cap;
                AlignedBuf::new(cap)
            }
        };
        st.lent += cap;
        Some(InlineData { buf: Some(buf), len, home: Some(self.0.clone()) })
    }

    /// Bytes lent out (held by messages not yet dropped).
    pub(crate) fn lent(&self) -> usize {
        self.0.lock().lent
    }

    /// Bytes this pool owns, lent out or cached (never over its budget).
    #[cfg(test)]
    pub(crate) fn allocated(&self) -> usize {
        self.0.lock().allocated
    }
}

/// The payload of an inline WRITE as received: `len()` bytes starting on an
/// [`INLINE_ALIGN`] boundary, in a buffer whose capacity is a multiple of
/// `INLINE_ALIGN`. Dropping it returns the buffer to the connection's pool
/// (until then it counts against that connection's receive budget: release
/// it once the data is written).
pub struct InlineData {
    /// Always `Some` until dropped.
    buf: Option<AlignedBuf>,
    len: usize,
    /// The pool the buffer returns to; `None` for a standalone copy.
    home: Option<Arc<PoolShared>>,
}

impl InlineData {
    /// A standalone aligned copy of `bytes` (input beyond `MAX_INLINE`
    /// bytes is cut off), outside any pool: for senders building a message
    /// to forward, and for tests.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let len = bytes.len().min(MAX_INLINE as usize);
        let mut buf = AlignedBuf::new(INLINE_ALIGN << class_of(len));
        buf.as_mut_slice(len).copy_from_slice(&bytes[..len]);
        Self { buf: Some(buf), len, home: None }
    }

    /// Bytes the buffer can hold (a multiple of [`INLINE_ALIGN`], >= `len()`).
    pub fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.cap)
    }

    /// The payload bytes, to be filled by the receiver.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        self.buf.as_mut().map_or(&mut [], |b| b.as_mut_slice(len))
    }
}

impl std::ops::Deref for InlineData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| b.as_slice(self.len))
    }
}

impl Drop for InlineData {
    fn drop(&mut self) {
        if let (Some(buf), Some(home)) = (self.buf.take(), self.home.take()) {
            let mut st = home.lock();
            st.lent -= buf.cap;
            st.free[class_of(buf.cap)].push(buf);
        }
    }
}

impl Clone for InlineData {
    /// A standalone copy (outside the pool and its budget).
    fn clone(&self) -> Self {
        Self::copy_from(self)
    }
}

impl PartialEq for InlineData {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for InlineData {}

impl std::fmt::Debug for InlineData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InlineData({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_bounded_and_reused() {
        let pool = InlinePool::new(256 << 10);
        let mut a = pool.take(5).unwrap();
        assert_eq!((a.len(), a.capacity()), (5, 4096));
        assert_eq!(a.as_ptr() as usize % INLINE_ALIGN, 0);
        a.as_mut_slice().copy_from_slice(b"hello");
        assert_eq!(&a[..], b"hello");
        let b = pool.take(MAX_INLINE as usize).unwrap();
        assert_eq!(b.capacity(), MAX_INLINE as usize);
        assert_eq!(b.as_ptr() as usize % INLINE_ALIGN, 0);
        assert_eq!(pool.take(4097).unwrap().capacity(), 8192);
        // Lent out: 4 KiB + 64 KiB (the 8 KiB one was dropped and cached).
        assert_eq!(pool.lent(), (4 + 64) << 10);
        // The budget (256 KiB) holds two more 64 KiB buffers besides what is
        // lent and cached; then `take` says no instead of growing.
        let c = pool.take(60000).unwrap();
        let d = pool.take(60000).unwrap();
        assert!(pool.take(60000).is_none());
        assert!(pool.allocated() <= 256 << 10);
        // A returned buffer is reused, not reallocated.
        let p = d.as_ptr();
        drop(d);
        let e = pool.take(40000).unwrap();
        assert_eq!(e.as_ptr(), p);
        assert!(pool.take(0).is_none());
        assert!(pool.take(MAX_INLINE as usize + 1).is_none());
        drop((a, b, c, e));
        assert_eq!(pool.lent(), 0);
        // Cached buffers of another size are given up to make room.
        let many: Vec<InlineData> = (0..64).map(|_| pool.take(4096).unwrap()).collect();
        assert_eq!(pool.lent(), 256 << 10);
        drop(many);
        assert!(pool.take(MAX_INLINE as usize).is_some());
        assert!(pool.allocated() <= 256 << 10);
    }

    #[test]
    fn standalone_copies_compare_by_bytes() {
        let pool = InlinePool::new(0);
        let mut a = pool.take(3).unwrap();
        a.as_mut_slice().copy_from_slice(b"abc");
        let b = a.clone();
        assert_eq!(a, b);
        assert_eq!(b.as_ptr() as usize % INLINE_ALIGN, 0);
        assert_eq!(InlineData::copy_from(b"abc"), a);
        assert_ne!(InlineData::copy_from(b"abd"), a);
        assert_eq!(format!("{a:?}"), "InlineData(3 bytes)");
    }
}
