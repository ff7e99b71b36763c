//! hcblk backend: gives QEMU guests a virtio-blk disk over vhost-user.
//!
//! Read top-down, the hot path is:
//! - [`export`]: one vhost-user socket per volume; accepts QEMU, serves it, and after a
//!   disconnect waits for the next connection (a VM going away never stops the daemon).
//! - [`device`]: the vhost-user-blk device seen by the frontend: features, config space,
//!   which poller thread owns which queue.
//! - [`poller`]: a pinned thread that busy-polls its virtqueues and its shard queue; each chain
//!   is parsed by [`request`], handed to the shard (`replica` crate) through lock-free queues,
//!   and completed into the used ring.
//! - [`control`]: the node daemon around it: volume metadata, the local API, the CLI.

pub mod cluster;
pub mod control;
pub mod device;
mod error;
pub mod export;
mod poller;
pub mod request;

pub use error::Error;
pub use export::{Export, ExportConfig, PollConfig, PollMode};
