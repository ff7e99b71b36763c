//! The node's block-store shard.
//!
//! A volume's data lives in one [`Backing`]: a file or raw block device driven through io_uring
//! with `O_DIRECT` (so data moves straight between the device and the caller's buffers, which for
//! the vhost-user backend are guest memory), or, to measure the data path itself, `ram` (hugepage
//! memory) and `null`.
//!
//! Requests reach the shard through bounded lock-free queues ([`ShardQueue::submit`]) and
//! completions come back the same way ([`ShardQueue::pop_completion`]). A `ShardQueue` belongs to
//! one polling thread, which drives it with [`ShardQueue::poll`]; the submission queue is
//! multi-producer, so a replica server thread can later feed peers' requests into the same shard.

mod backing;
mod error;
mod hugepages;
mod request;
mod shard;

pub use backing::{Backing, BackingConfig, BackingKind};
pub use error::Error;
pub use hugepages::{free_hugepages, HugeBuffer, HUGEPAGE_SIZE_BYTES};
pub use request::{IoCompletion, IoRequest, IoStatus, Op};
pub use shard::{ShardQueue, ShardQueueConfig};
