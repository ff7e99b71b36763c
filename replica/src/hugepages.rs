//! Buffers of our own (alignment bounce buffers, `ram` backings) come from hugepages, so they
//! are physically contiguous in 2 MiB units and cost no TLB pressure on the hot path.

use std::alloc::Layout;
use std::ptr::NonNull;

use crate::Error;

/// The x86-64 default hugepage size; the buffers are rounded up to a multiple of it.
pub const HUGEPAGE_SIZE_BYTES: usize = 2 << 20;

/// A zero-initialised buffer mapped from the hugepage pool.
pub struct HugeBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is an owned private mapping; nothing else aliases it, so moving it to or
// sharing it between threads is as safe as for a Vec<u8>. Concurrent writers through `as_ptr`
// are the caller's to coordinate.
unsafe impl Send for HugeBuffer {}
// SAFETY: see above; shared access only hands out raw pointers.
unsafe impl Sync for HugeBuffer {}

impl HugeBuffer {
    /// Maps `len_bytes` (rounded up to whole hugepages). Fails with
    /// [`Error::HugepagesExhausted`] when the pool has too few free pages.
    pub fn new(len_bytes: usize) -> Result<Self, Error> {
        let rounded = len_bytes
            .max(1)
            .checked_next_multiple_of(HUGEPAGE_SIZE_BYTES)
            .ok_or(Error::HugepagesExhausted { bytes: len_bytes })?;
        let layout = Layout::from_size_align(rounded, HUGEPAGE_SIZE_BYTES)
            .map_err(|_| Error::HugepagesExhausted { bytes: rounded })?;
        // SAFETY: the layout has a non-zero size and an alignment no larger than a hugepage,
        // which is what hugepage_rs::alloc requires.
        let raw = unsafe { hugepage_rs::alloc(layout) };
        let ptr = NonNull::new(raw).ok_or(Error::HugepagesExhausted { bytes: rounded })?;
        // MAP_HUGETLB reserves pages at mmap time, but a page is only faulted in on first touch;
        // touching every page now turns a later SIGBUS (pool raced empty) into this error path
        // never being reached with a half-usable buffer. The mapping is anonymous, so it is
        // already zeroed; writing zero faults it in without changing the contents.
        for offset in (0..rounded).step_by(HUGEPAGE_SIZE_BYTES) {
            // SAFETY: offset < rounded, the mapping's length, and the mapping is writable.
            unsafe { ptr.as_ptr().add(offset).write_volatile(0) };
        }
        Ok(Self { ptr, layout })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len()` bytes long, initialised (anonymous memory is zeroed) and
        // uniquely borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for HugeBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from hugepage_rs::alloc with exactly this layout and is freed once.
        unsafe { hugepage_rs::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Free hugepages in the default pool, from /proc/meminfo.
pub fn free_hugepages() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find_map(|line| line.strip_prefix("HugePages_Free:")).and_then(|rest| rest.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_buffer_is_zeroed_and_rounded_up() {
        assert!(
            free_hugepages().unwrap_or(0) > 0,
            "this test needs free hugepages: echo 64 > /proc/sys/vm/nr_hugepages"
        );
        let mut buffer = HugeBuffer::new(4096).expect("hugepages are free");
        assert_eq!(buffer.len(), HUGEPAGE_SIZE_BYTES);
        assert!(buffer.as_mut_slice().iter().all(|b| *b == 0));
        buffer.as_mut_slice()[4095] = 7;
        assert_eq!(buffer.as_mut_slice()[4095], 7);
    }

    #[test]
    fn exhausted_pool_is_a_clear_error() {
        // Far more than any test machine reserves.
        let err = HugeBuffer::new(1 << 50).err().expect("no machine has a PiB of hugepages");
        assert!(err.to_string().contains("hugepage pool exhausted"), "{err}");
    }
}
