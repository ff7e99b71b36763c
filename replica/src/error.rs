use std::io;
use std::path::PathBuf;

/// Errors of the shard: setting up backings and queues. Per-request failures are not errors of
/// this kind; they come back as an [`crate::IoStatus`] in a completion.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot open backing {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a block device")]
    NotABlockDevice { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("cannot size backing {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("size {size} bytes is not a multiple of the block size {block_size}")]
    SizeNotAligned { size: u64, block_size: u32 },
    #[error("block size {0} is not supported (use 512 or 4096)")]
    BlockSize(u32),
    #[error("device {path} holds {device_bytes} bytes, fewer than the volume's {size} bytes")]
    DeviceTooSmall { path: PathBuf, device_bytes: u64, size: u64 },
    #[error("cannot shrink a volume from {current} to {requested} bytes (grow only)")]
    Shrink { current: u64, requested: u64 },
    #[error("a {kind} backing cannot be resized")]
    NotResizable { kind: &'static str },
    #[error(
        "hugepage pool exhausted: could not map {bytes} bytes of hugepages \
         (free some or raise /proc/sys/vm/nr_hugepages)"
    )]
    HugepagesExhausted { bytes: usize },
    #[error("queue depth {depth} is out of range (1 to {max})")]
    Depth { depth: u32, max: u32 },
    #[error("io_uring setup failed")]
    Uring(#[source] io::Error),
    #[error("backing I/O failed")]
    Io(#[source] io::Error),
}
