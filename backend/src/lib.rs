//! hcblk backend: gives QEMU guests a virtio-blk disk over vhost-user.
//!
//! Read top-down, the hot path is (each module imports only the ones below it):
//! - [`export`]: one vhost-user socket per volume; accepts QEMU, serves it, and after a
//!   disconnect waits for the next connection (a VM going away never stops the daemon).
//! - [`device`]: the vhost-user-blk device seen by the frontend: features, config space,
//!   which poller thread owns which queue, and the guest memory table, handed to the volume.
//! - `poller`: a pinned thread that busy-polls its virtqueues and its volume queue; each chain
//!   is parsed by [`request`], handed to the volume through its queue, and completed into the
//!   used ring. It knows neither device nor export, only a context with the connection's
//!   counters and limits.
//! - [`request`]: the descriptor-chain parser: every chain becomes a checked request or a
//!   refusal before anything runs.
//!
//! Beside them, [`volume`] is the seam all three are generic over: a [`Volume`] (geometry,
//! one [`VolumeQueue`] per poller thread, grow, guest memory table) implemented by the local
//! shard ([`replica::Backing`]) and, for replication, by a client that fans requests out to
//! the volume's replicas.
//!
//! [`control`] is the node daemon around it: volume metadata, the local API, the CLI.

pub mod cluster;
mod contention;
pub mod control;
pub mod device;
mod error;
pub mod export;
mod inflight;
pub mod member;
pub mod permissions;
mod poller;
pub mod replicated;
pub mod request;
pub mod socket;
pub mod volume;

pub use error::Error;
pub use export::{Export, ExportConfig};
pub use poller::{PollConfig, PollMode, Rejections};
pub use socket::SocketAccess;
pub use volume::{GuestMem, Volume, VolumeQueue};
