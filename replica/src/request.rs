//! What travels through the shard's queues.

/// One operation on a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// Make every completed write durable.
    Flush,
    /// The range's contents become unspecified; space may be released.
    Discard,
    /// The range reads back as zeroes; with `unmap` the space may be released too.
    WriteZeroes {
        unmap: bool,
    },
}

/// A request handed to a [`crate::ShardQueue`].
///
/// `iov` points at `iov_count` iovecs describing the caller's buffers (for reads and writes);
/// they are raw because they usually describe guest memory mapped by the backend. The submitter
/// guarantees, through the contract of [`crate::ShardQueue::submit`], that the iovec array and
/// every buffer it names stay valid until the matching completion has been popped.
#[derive(Clone, Copy, Debug)]
pub struct IoRequest {
    /// Returned untouched in the completion.
    pub user_data: u64,
    pub op: Op,
    pub offset_bytes: u64,
    pub len_bytes: u64,
    pub iov: *const libc::iovec,
    pub iov_count: u32,
    /// Write through to stable storage before completing.
    pub fua: bool,
}

// SAFETY: an IoRequest is a plain description; the memory its pointer names is kept valid by the
// submitter until completion (see `ShardQueue::submit`), whichever thread executes it.
unsafe impl Send for IoRequest {}

impl IoRequest {
    /// A request that carries no buffers (flush, discard, write-zeroes).
    pub fn without_data(user_data: u64, op: Op, offset_bytes: u64, len_bytes: u64) -> Self {
        Self { user_data, op, offset_bytes, len_bytes, iov: std::ptr::null(), iov_count: 0, fua: false }
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStatus {
    Ok,
    /// The backing reported an error (errno).
    IoError(i32),
    /// The request lies outside the volume.
    OutOfRange,
    /// The backing cannot do this operation.
    Unsupported,
}

#[derive(Clone, Copy, Debug)]
pub struct IoCompletion {
    pub user_data: u64,
    pub status: IoStatus,
}
