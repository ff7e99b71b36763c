//! Cluster metadata in etcd: a blocking client facade ([`Etcd`]) and a node's registration
//! under a lease ([`NodeRegistration`]).
//!
//! This layer deals in keys, bytes and revisions; the JSON documents in the values and the
//! decisions taken on them belong to the caller (the replication state machine emits "read
//! volume meta" and "compare-and-swap volume meta", the daemon executes them here).
//!
//! # Key layout
//!
//! Keys are relative to a prefix (default `/hcblk/v1`, [`EtcdConfig::prefix`]); [`keys`] builds
//! them.
//!
//! ```text
//! /hcblk/v1/cluster            {"cluster_id": u64, ...}   created once (create-if-absent)
//! /hcblk/v1/nodes/<name>       node info JSON, attached to that node's lease (gone = node down)
//! /hcblk/v1/volumes/<name>     volume meta JSON; changed only by compare-and-swap on mod_revision
//! /hcblk/v1/volume-ids/<id>    <name>   (id -> name index, created in the same txn as the volume)
//! /hcblk/v1/audit/<name>/<ts>  operator decisions (e.g. accepting the risk of too few replicas)
//! /hcblk/v1/status/<name>      the owner's published status of the volume, attached to the
//!                              owner's lease (phase, suspended extents, resync progress)
//! ```
//!
//! The documents in the values are in [`EtcdMeta`] (volumes, the cluster key) and
//! [`PublishedStatus`] (status keys); `nodes/` holds [`replication::NodeInfo`] JSON.
//!
//! Every change that matters for safety is one etcd transaction that compares the
//! `mod_revision` the caller read ([`Etcd::compare_and_swap`], [`Etcd::compare_and_delete`],
//! [`Etcd::create_all`] for keys that must not exist yet): of two daemons racing from the same
//! revision exactly one commits; the other gets [`CasOutcome::Conflict`] with the current value,
//! read in the same transaction.
//!
//! # Errors, and what the caller does
//!
//! - [`EtcdError::Unreachable`]: no endpoint answered; nothing was done. Retry later. Reads
//!   fail this way, writes only when no connection could be made (the request never left),
//!   and [`Etcd::connect`] when etcd is down (at once if every connection is refused,
//!   otherwise after the dial timeouts).
//! - [`EtcdError::OutcomeUnknown`]: a write got no answer (timeout, connection lost after
//!   sending, or etcd's own "request timed out" / "leader changed"). It may or may not have
//!   been applied. **Re-read the key before deciding anything**; never assume either outcome.
//! - [`EtcdError::Server`]: etcd refused the request; nothing was written.
//! - [`EtcdError::LeaseNotFound`]: the lease expired or was revoked; its keys are gone.
//! - [`EtcdError::InvalidRequest`] / [`EtcdError::Config`]: refused before sending; a bug or a
//!   bad configuration, retrying cannot help.
//! - [`EtcdError::Malformed`]: etcd holds something this layer cannot have written.
//!
//! # Timeouts
//!
//! Every call is bounded by [`EtcdConfig::request_timeout`] (default 5 s) as seen by the
//! caller, including the pages of a [`Etcd::list`] and the retries inside the transport;
//! establishing a connection by [`EtcdConfig::dial_timeout`] (default 2 s). Nothing blocks
//! forever. A call goes to the endpoint that last answered; it moves on to the next endpoint
//! only when the connection could not be established (the request never left), never after a
//! request may have been sent. After a timeout or a lost connection the next call starts with
//! the next endpoint, and a timed-out endpoint's connection is dropped and dialled afresh, so
//! a member that died without closing its sockets is not waited on twice. A node's lease is
//! renewed every TTL/3 (TTL default 10 s, [`RegistrationConfig::ttl`]); dropping a
//! [`NodeRegistration`] takes at most two request timeouts (a call in flight, then the revoke).
//!
//! # Threads
//!
//! [`Etcd`] is cheap to clone and `Send + Sync`. It owns a tokio runtime with one worker
//! thread (`hcblk-etcd`, for the connections' background tasks); each call blocks the calling
//! thread, so it must not be made from inside an async runtime, and never from the data path.
//! [`NodeRegistration`] runs one more thread (`hcblk-etcd-reg`).

mod error;
mod etcd;
mod etcd_meta;
pub mod keys;
mod meta;
mod registration;
mod status;

pub use error::{Cause, EtcdError};
pub use etcd::{
    CasOutcome, CreateOutcome, Etcd, EtcdConfig, Kv, Lease, LeaseId, Op, DEFAULT_DIAL_TIMEOUT, DEFAULT_PREFIX,
    DEFAULT_REQUEST_TIMEOUT, KEY_BYTES_MAX, TXN_OPS_MAX,
};
pub use etcd_meta::{ClusterDoc, CreateVolume, EtcdMeta, VOLUME_DOC_BYTES_MAX};
pub use meta::{MemoryMeta, MetaError, MetaStore, MetaWrite};
pub use registration::{NodeRegistration, RegistrationConfig, RegistrationError, DEFAULT_TTL};
pub use status::{PublishedStatus, PublishedSync};
