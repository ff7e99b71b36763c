use super::etcd::LeaseId;
use std::time::Duration;

/// Errors of the etcd facade. What each one means for the caller is in its doc; the module doc
/// of [`crate::cluster`] sums them up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// A configuration value refused as given (never silently fixed): no endpoint, an https
    /// endpoint, a relative prefix, a zero timeout.
    #[error("invalid etcd configuration: {0}")]
    Config(String),
    /// No endpoint answered: etcd is down, unreachable, or has no leader. Nothing was done.
    /// Reads (get, list, lease keep-alive and time-to-live) fail this way whenever they get no
    /// answer; a write only when it provably never left (no connection to any endpoint could
    /// be made); a write that may have left is [`OutcomeUnknown`](Self::OutcomeUnknown).
    /// Retry later.
    #[error("etcd is unreachable: no answer from {endpoints} within {timeout:?}")]
    Unreachable {
        endpoints: String,
        timeout: Duration,
        #[source]
        cause: Cause,
    },
    /// A write timed out or lost its connection after it may have reached etcd: it may or may
    /// not have been applied, and may still be applied a little later. The caller must re-read
    /// the key (its value and `mod_revision` tell whether the write landed) before deciding
    /// anything; it must not assume either outcome. Retrying the same compare-and-swap is safe
    /// (it cannot apply twice) but answers `Conflict` if the first attempt landed.
    #[error(
        "etcd {op} of {key:?}: outcome unknown, the write may or may not have been applied \
         (re-read before retrying)"
    )]
    OutcomeUnknown {
        op: &'static str,
        key: String,
        #[source]
        cause: Cause,
    },
    /// etcd answered with an error (out of space, request too large, revision compacted, no
    /// leader for a read, ...): the request was refused and nothing was written.
    #[error("etcd refused {op} of {key:?}: {code}: {message}")]
    Server { op: &'static str, key: String, code: String, message: String },
    /// The lease does not exist: it expired or was revoked. Keys attached to it are gone.
    #[error("etcd lease {lease} does not exist (expired or revoked)")]
    LeaseNotFound { lease: LeaseId },
    /// Refused before sending: an invalid key, a key written twice in one transaction, too many
    /// operations. A bug in the caller; retrying cannot help.
    #[error("invalid etcd request: {0}")]
    InvalidRequest(String),
    /// etcd returned something this layer cannot have written (a key that is not UTF-8 or lies
    /// outside the prefix, a negative revision): foreign or corrupted data under the prefix.
    #[error("malformed data from etcd at {key:?}: {reason}")]
    Malformed { key: String, reason: String },
    /// The client's runtime (one thread) could not be started.
    #[error("cannot start the etcd client runtime")]
    Runtime(#[source] std::io::Error),
}

/// The lower-level reason of an etcd error, as one line (the gRPC status or transport error and
/// its causes).
#[derive(Debug)]
pub struct Cause(pub String);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cause {}
