//! What the owner and a replica say to each other, as the state machines see it.
//!
//! Drivers map these one to one onto `proto` wire frames (WRITE, READ, FLUSH, DISCARD,
//! WRITE_ZEROES, PROMISE, CLEAR_DIRTY → COMPLETION, PROMISE_ACK). Data never passes through
//! the state machines: a WRITE's bytes are pulled by the replica from the owner's memory (or
//! carried inline), a READ's bytes are pushed into it, and the drivers move them.

use crate::bitmap::Bitmap;

/// A node's wire identity ([`crate::meta::node_id`]).
pub type NodeId = u64;
/// The owner's number for one request to its replicas: `generation << 40 | counter`, so
/// numbers only grow, across owners too.
pub type Seq = u64;

/// The most bytes one READ or WRITE moves: owners cut guest requests into pieces no larger,
/// replicas refuse larger ones (their staging buffers are sized from it), and a region — the
/// unit resync copies — is no larger either.
pub const TRANSFER_MAX: u32 = 4 << 20;

/// The alignment of every data request's offset and length (the sector): replicas write with
/// O_DIRECT and refuse anything else rather than fail the disk request.
pub const SECTOR: u64 = 512;

/// Bits of a [`Seq`] below the generation.
pub const SEQ_GENERATION_SHIFT: u32 = 40;

/// What every request for volume data carries, so a replica can refuse it when it comes from
/// an old owner (generation), an old membership (epoch), a replica incarnation that has since
/// restarted and lost its volatile state (incarnation), or is a late duplicate (floor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub volume: u64,
    pub generation: u64,
    pub epoch: u32,
    /// The replica incarnation the owner has a promise from.
    pub incarnation: u64,
    /// Every request of this owner numbered below `floor` has completed.
    pub floor: Seq,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `inline`: the data travels with the descriptor; otherwise the replica pulls it.
    Write {
        seq: Seq,
        stamp: Stamp,
        extent: u32,
        offset: u64,
        len: u32,
        fua: bool,
        inline: bool,
    },
    /// The replica pushes `len` bytes at `offset` into the owner's buffer.
    Read {
        seq: Seq,
        stamp: Stamp,
        extent: u32,
        offset: u64,
        len: u32,
    },
    Flush {
        seq: Seq,
        stamp: Stamp,
    },
    Discard {
        seq: Seq,
        stamp: Stamp,
        extent: u32,
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        seq: Seq,
        stamp: Stamp,
        extent: u32,
        offset: u64,
        len: u64,
    },
    /// Promise to refuse every request of an older generation, then report the extent's dirty
    /// regions. Also how an owner asks again for a replica's bits.
    Promise {
        seq: Seq,
        volume: u64,
        generation: u64,
        epoch: u32,
        extent: u32,
    },
    /// Forget dirty regions `[first, first + count)` of an extent whose every replica has
    /// flushed them, unless a write numbered above `upto` touched them since.
    ClearDirty {
        seq: Seq,
        stamp: Stamp,
        extent: u32,
        first: u32,
        count: u32,
        upto: Seq,
    },
}

impl Request {
    pub fn seq(&self) -> Seq {
        match self {
            Request::Write { seq, .. }
            | Request::Read { seq, .. }
            | Request::Flush { seq, .. }
            | Request::Discard { seq, .. }
            | Request::WriteZeroes { seq, .. }
            | Request::Promise { seq, .. }
            | Request::ClearDirty { seq, .. } => *seq,
        }
    }

    pub fn volume(&self) -> u64 {
        match self {
            Request::Write { stamp, .. }
            | Request::Read { stamp, .. }
            | Request::Flush { stamp, .. }
            | Request::Discard { stamp, .. }
            | Request::WriteZeroes { stamp, .. }
            | Request::ClearDirty { stamp, .. } => stamp.volume,
            Request::Promise { volume, .. } => *volume,
        }
    }

    /// Requests that change the volume's data.
    pub fn mutates(&self) -> bool {
        matches!(self, Request::Write { .. } | Request::Discard { .. } | Request::WriteZeroes { .. })
    }
}

/// How a request ended, from the replica's side (wire `Status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Ok,
    /// The replica's storage failed.
    IoError,
    /// The replica's storage is full.
    NoSpace,
    /// Its data could not be moved (key revoked, owner gone).
    AccessDenied,
    /// Malformed or out of the extent.
    BadRequest,
    /// Older membership epoch than the replica knows.
    StaleEpoch,
    /// Older generation than the replica promised.
    StaleGeneration,
    /// Addressed to an earlier incarnation of the replica (it restarted).
    StaleIncarnation,
    /// The replica holds no such extent.
    NotMember,
    /// A late duplicate of a request already taken.
    Duplicate,
    /// The sender is not the volume's owner of that generation.
    NotOwner,
    /// No promise for this generation yet (or it could not be verified).
    NotPromised,
    /// The connection failed before the answer came (reported by drivers, never sent).
    ConnectionLost,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Done { seq: Seq, status: Status },
    Promised { seq: Seq, status: Status, epoch: u32, incarnation: u64, promised: u64, bitmap: Bitmap },
}

impl Reply {
    pub fn seq(&self) -> Seq {
        match self {
            Reply::Done { seq, .. } | Reply::Promised { seq, .. } => *seq,
        }
    }

    pub fn status(&self) -> Status {
        match self {
            Reply::Done { status, .. } | Reply::Promised { status, .. } => *status,
        }
    }
}
