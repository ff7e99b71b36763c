//! hcblk replication: the protocol that keeps a volume's replicas on several nodes identical
//! and never loses an acknowledged write, written as I/O-free state machines.
//!
//! * [`meta`]: what etcd holds (volume layout, owner, generation, epoch, in-sync sets).
//! * [`placement`]: which nodes hold which extents.
//! * [`owner`]: the volume's owner — the node its VM runs on — fans guest requests out to
//!   every replica, orders overlapping writes ([`range_lock`]), changes membership by etcd
//!   compare-and-swap, reconciles, resyncs and rebuilds.
//! * [`replica`]: every node's server of the extent replicas it holds: fencing by generation,
//!   epoch and incarnation, durable dirty bitmaps ([`bitmap`]) before data.
//! * [`msg`]: what they say to each other (mapped 1:1 onto `proto` frames by the drivers).
//! * `sim` (feature `sim`): a deterministic simulator of whole clusters, seeded, with a
//!   reference model that checks the invariants after every step.
//!
//! Nothing here owns a socket, a file, a clock or a thread: callers feed inputs (requests,
//! replies, completions, etcd answers, the time) and carry out the returned actions. The
//! daemon's drivers do that with io_uring, the transports and etcd; the simulator does it
//! with models of them, which is what lets a failing seed replay exactly.

pub mod bitmap;
pub mod meta;
pub mod msg;
pub mod owner;
pub mod placement;
pub mod range_lock;
pub mod replica;
#[cfg(feature = "sim")]
pub mod sim;

pub use bitmap::Bitmap;
pub use meta::{node_id, ExtentMeta, Locality, Member, MemberState, NodeInfo, RiskAcceptance, VolumeMeta};
pub use msg::{NodeId, Reply, Request, Seq, Stamp, Status};
