//! The hcblk wire format, version 2.0: pure encode/decode, no I/O, no threads.
//!
//! Every frame is a 12-byte header followed by a body. All integers are
//! little-endian; every reserved byte must be zero (a non-zero reserved byte
//! is a decode error, so the fields can be given a meaning later by a minor
//! version bump without old peers misreading them).
//!
//! ```text
//! Frame header (12 bytes)
//!  0       2       3       4       5       6               8                              12
//!  +-------+-------+-------+-------+-------+---------------+------------------------------+
//!  | magic | major | minor | type  | rsvd0 | rsvd0 (u16)   | body_len (u32)               |
//!  | "HB"  |  u8   |  u8   |  u8   |  u8   |               | bytes after the header       |
//!  +-------+-------+-------+-------+-------+---------------+------------------------------+
//! ```
//!
//! A frame whose `major` differs from [`VERSION_MAJOR`] is refused with
//! [`DecodeError::UnsupportedVersion`]; a different `minor` is accepted.
//!
//! Bodies by type (offsets relative to the start of the body):
//!
//! ```text
//! HELLO (1), 56 bytes — initiator -> acceptor, first frame on a connection
//!  0       8          16         24                                56
//!  +-------+----------+----------+---------------------------------+
//!  | rsvd0 |cluster_id| node_id  | client nonce (32 bytes)         |
//!  +-------+----------+----------+---------------------------------+
//!
//! CHALLENGE (2), 72 bytes — acceptor -> initiator
//!  0          8                                40                              72
//!  +----------+--------------------------------+-------------------------------+
//!  | node_id  | server nonce (32 bytes)        | server MAC (HMAC-SHA256, 32)  |
//!  +----------+--------------------------------+-------------------------------+
//!
//! AUTH (3), 32 bytes — initiator -> acceptor: client MAC (HMAC-SHA256, 32 bytes)
//! READY (4), 0 bytes — acceptor -> initiator: authenticated, descriptors may flow
//!
//! Fields of the replication requests:
//!   request_id   the owner's sequence number of the request (increases within a generation)
//!   generation   the owner's generation (fencing: a replica refuses an older one)
//!   epoch        the membership epoch the owner acts in
//!   incarnation  the replica incarnation the owner addresses
//!   floor        every request of this owner with request_id < floor has completed
//!
//! WRITE (16) / READ (17): 64-byte fixed part, then either seg_count remote
//! segments (16 bytes each) or, for a WRITE with FLAG_INLINE, `length` payload bytes
//!  0          8          16         24         32       36       40        42      44      48
//!  +----------+----------+----------+----------+--------+--------+---------+-------+-------+
//!  |request_id| volume   |generation| offset   | length | flags  |seg_count| rsvd0 | epoch |
//!  |   u64    |   u64    |   u64    | u64 bytes|  u32   |  u32   |   u16   |  u16  |  u32  |
//!  +----------+----------+----------+----------+--------+--------+---------+-------+-------+
//!  48            56         64
//!  +-------------+----------+
//!  | incarnation | floor    |
//!  |    u64      |   u64    |
//!  +-------------+----------+
//!  then seg_count remote segments, 16 bytes each:
//!  0          8        12       16
//!  +----------+--------+--------+
//!  | address  | key    | length |
//!  |   u64    |  u32   |  u32   |
//!  +----------+--------+--------+
//!  or (WRITE with FLAG_INLINE) `length` payload bytes: body_len = 64 + length.
//!  flags: FLAG_FUA = 1, FLAG_INLINE = 2 (WRITE only); others refused.
//!  Rules, not inline: 1 <= seg_count <= MAX_SEGMENTS, every segment length > 0,
//!  sum(segment lengths) == length <= MAX_IO_LEN, address + segment length does
//!  not overflow. Inline: seg_count == 0, 1 <= length <= MAX_INLINE. Both:
//!  offset + length does not overflow. A READ is never inline.
//!
//! FLUSH (18), 48 bytes
//!  0          8          16         24       28       32            40         48
//!  +----------+----------+----------+--------+--------+-------------+----------+
//!  |request_id| volume   |generation| epoch  | rsvd0  | incarnation | floor    |
//!  +----------+----------+----------+--------+--------+-------------+----------+
//!
//! DISCARD (19) / WRITE_ZEROES (20), 64 bytes
//!  0          8          16         24         32         40       44       48            56         64
//!  +----------+----------+----------+----------+----------+--------+--------+-------------+----------+
//!  |request_id| volume   |generation| offset   | length   | flags  | epoch  | incarnation | floor    |
//!  |          |          |          |   u64    |   u64    |  u32   |  u32   |             |          |
//!  +----------+----------+----------+----------+----------+--------+--------+-------------+----------+
//!  Rules: length > 0, offset + length does not overflow, flags only FLAG_FUA.
//!
//! PROMISE (21), 40 bytes
//!  0          8          16         24       28       32         40
//!  +----------+----------+----------+--------+--------+----------+
//!  |request_id| volume   |generation| epoch  | extent | rsvd0    |
//!  +----------+----------+----------+--------+--------+----------+
//!
//! CLEAR_DIRTY (22), 64 bytes
//!  0          8          16         24       28       32            40             44             48       56      64
//!  +----------+----------+----------+--------+--------+-------------+--------------+--------------+--------+-------+
//!  |request_id| volume   |generation| epoch  | extent | incarnation | first_region | region_count | upto   | rsvd0 |
//!  |          |          |          |  u32   |  u32   |    u64      |     u32      |     u32      |  u64   |  u64  |
//!  +----------+----------+----------+--------+--------+-------------+--------------+--------------+--------+-------+
//!  Rules: region_count >= 1, first_region + region_count does not overflow (u32).
//!
//! COMPLETION (32), 24 bytes: request_id u64 | status u32 | bytes u32 | rsvd0 u64
//! HEARTBEAT (33), 24 bytes:  sequence u64 | sender time in µs u64 | rsvd0 u64
//! ERROR (34), 24 + text_len bytes:
//!  0        4          6       8                       24
//!  +--------+----------+-------+-----------------------+-----------------+
//!  | code   | text_len | rsvd0 | rsvd0 (16 bytes)      | UTF-8 text      |
//!  +--------+----------+-------+-----------------------+-----------------+
//!
//! PROMISE_ACK (35), 40 + bitmap_len bytes
//!  0          8        12       16            24         32           34      36      40
//!  +----------+--------+--------+-------------+----------+------------+-------+-------+--------------+
//!  |request_id| status | epoch  | incarnation | promised | bitmap_len | rsvd0 | rsvd0 | bitmap bytes |
//!  |   u64    |  u32   |  u32   |    u64      |   u64    |    u16     |  u16  |  u32  |              |
//!  +----------+--------+--------+-------------+----------+------------+-------+-------+--------------+
//!  Rules: bitmap_len <= MAX_BITMAP, body_len = 40 + bitmap_len.
//!
//! Software one-sided operations (the `tcp` transport; the verbs transport
//! does these in the NIC). `op_id` is opaque to the responder, which echoes it.
//! DATA_READ (48) / DATA_WRITE (50), 24 bytes [+ `length` payload bytes for DATA_WRITE]
//!  0          8          16       20       24
//!  +----------+----------+--------+--------+
//!  | op_id    | address  | key    | length |
//!  +----------+----------+--------+--------+
//!  Rules: 1 <= length <= MAX_DATA_LEN, address + length does not overflow.
//! DATA_READ_RESP (49) / DATA_WRITE_ACK (51), 24 bytes [+ `length` payload bytes
//! for a DATA_READ_RESP whose status is OK; `length` must be 0 otherwise]
//!  0          8        12       16                 24
//!  +----------+--------+--------+------------------+
//!  | op_id    | status | length | rsvd0 (u64)      |
//!  +----------+--------+--------+------------------+
//! ```
//!
//! Every frame allowed after the handshake has at least
//! [`MIN_BODY_AFTER_HANDSHAKE`] (24) body bytes, and every data frame's
//! fixed part is exactly 24: a receiver reads header + 24 bytes in one call
//! without ever reading into a payload or the next frame.
//!
//! Payloads are not part of [`Message`]: a receiver reads the header and the
//! fixed part, then receives the payload straight into its destination (the
//! point of the protocol is that nobody copies it twice). For every frame
//! but WRITE the header alone tells the fixed part's length; a WRITE's flags
//! say whether a payload follows, so a receiver reads [`Header::prefix_len`]
//! (64) body bytes first and then asks [`Header::fixed_len`].

use crate::inline::InlineData;
use smallvec::SmallVec;
use thiserror::Error;

/// `"HB"` in the first two bytes of every frame.
pub const MAGIC: u16 = u16::from_le_bytes(*b"HB");
/// Peers with another major version are refused.
pub const VERSION_MAJOR: u8 = 2;
/// Minor versions only add optional behaviour and are accepted both ways.
pub const VERSION_MINOR: u8 = 0;
/// Size of the frame header.
pub const HEADER_LEN: usize = 12;
/// Most remote segments a READ/WRITE descriptor may carry (a virtio-blk
/// request with `seg_max` 128 maps to at most 128 guest buffers).
pub const MAX_SEGMENTS: usize = 128;
/// Largest READ/WRITE descriptor, in bytes of data.
pub const MAX_IO_LEN: u32 = 16 << 20;
/// Largest payload of a single data frame (one remote segment).
pub const MAX_DATA_LEN: u32 = 4 << 20;
/// Largest inline WRITE payload.
pub const MAX_INLINE: u32 = 64 << 10;
/// Largest PROMISE_ACK bitmap, in bytes.
pub const MAX_BITMAP: usize = 512;
/// Largest ERROR text.
pub const MAX_ERROR_TEXT: usize = 256;
/// Largest body of a frame that carries no payload; with the header this is
/// the largest buffer a receiver ever needs for the non-payload part.
pub const MAX_CONTROL_BODY: usize = DESC_FIXED + MAX_SEGMENTS * SEGMENT_LEN;
/// Largest encoded frame, payload excluded.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_CONTROL_BODY;
/// Largest inline WRITE frame, payload included.
pub const MAX_INLINE_FRAME: usize = HEADER_LEN + DESC_FIXED + MAX_INLINE as usize;
/// Length of a nonce and of a MAC in the handshake.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Remote segments a descriptor holds without a heap allocation.
pub const INLINE_SEGMENTS: usize = 8;

/// Force unit access: the write is durable when it completes.
pub const FLAG_FUA: u32 = 1;
/// The WRITE's data follows its fixed part (no segments, no one-sided READ).
pub const FLAG_INLINE: u32 = 2;
const DESC_FLAGS: u32 = FLAG_FUA | FLAG_INLINE;
const RANGE_FLAGS: u32 = FLAG_FUA;

const DESC_FIXED: usize = 64;
const SEGMENT_LEN: usize = 16;
const HELLO_LEN: usize = 56;
const CHALLENGE_LEN: usize = 72;
const FLUSH_LEN: usize = 48;
const RANGE_LEN: usize = 64;
const PROMISE_LEN: usize = 40;
const CLEAR_DIRTY_LEN: usize = 64;
const PROMISE_ACK_FIXED: usize = 40;
const DATA_REQ_LEN: usize = 24;
const DATA_RESP_LEN: usize = 24;
const ERROR_FIXED: usize = 24;
/// Smallest body of any frame type allowed after the handshake.
pub const MIN_BODY_AFTER_HANDSHAKE: usize = 24;

const _: () = assert!(PROMISE_ACK_FIXED + MAX_BITMAP <= MAX_CONTROL_BODY);
const _: () = assert!(ERROR_FIXED + MAX_ERROR_TEXT <= MAX_CONTROL_BODY);

/// The remote segments of a descriptor (no heap allocation up to
/// [`INLINE_SEGMENTS`]).
pub type Segments = SmallVec<[Segment; INLINE_SEGMENTS]>;

/// Frame types (byte 4 of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    Challenge = 2,
    Auth = 3,
    Ready = 4,
    Write = 16,
    Read = 17,
    Flush = 18,
    Discard = 19,
    WriteZeroes = 20,
    Promise = 21,
    ClearDirty = 22,
    Completion = 32,
    Heartbeat = 33,
    Error = 34,
    PromiseAck = 35,
    DataRead = 48,
    DataReadResp = 49,
    DataWrite = 50,
    DataWriteAck = 51,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<Self> {
        use FrameType::*;
        Some(match v {
            1 => Hello,
            2 => Challenge,
            3 => Auth,
            4 => Ready,
            16 => Write,
            17 => Read,
            18 => Flush,
            19 => Discard,
            20 => WriteZeroes,
            21 => Promise,
            22 => ClearDirty,
            32 => Completion,
            33 => Heartbeat,
            34 => Error,
            35 => PromiseAck,
            48 => DataRead,
            49 => DataReadResp,
            50 => DataWrite,
            51 => DataWriteAck,
            _ => return None,
        })
    }

    /// Bounds of the body length (payload included).
    fn body_bounds(self) -> (usize, usize) {
        use FrameType::*;
        match self {
            Hello => (HELLO_LEN, HELLO_LEN),
            Challenge => (CHALLENGE_LEN, CHALLENGE_LEN),
            Auth => (MAC_LEN, MAC_LEN),
            Ready => (0, 0),
            // The smallest WRITE is inline with one byte; the largest is
            // inline with MAX_INLINE bytes (more than 128 segments take).
            Write => (DESC_FIXED + 1, MAX_CONTROL_BODY.max(DESC_FIXED + MAX_INLINE as usize)),
            Read => (DESC_FIXED + SEGMENT_LEN, MAX_CONTROL_BODY),
            Flush => (FLUSH_LEN, FLUSH_LEN),
            Discard | WriteZeroes => (RANGE_LEN, RANGE_LEN),
            Promise => (PROMISE_LEN, PROMISE_LEN),
            ClearDirty => (CLEAR_DIRTY_LEN, CLEAR_DIRTY_LEN),
            Completion | Heartbeat => (24, 24),
            Error => (ERROR_FIXED, ERROR_FIXED + MAX_ERROR_TEXT),
            PromiseAck => (PROMISE_ACK_FIXED, PROMISE_ACK_FIXED + MAX_BITMAP),
            DataRead => (DATA_REQ_LEN, DATA_REQ_LEN),
            DataWrite => (DATA_REQ_LEN, DATA_REQ_LEN + MAX_DATA_LEN as usize),
            DataWriteAck => (DATA_RESP_LEN, DATA_RESP_LEN),
            DataReadResp => (DATA_RESP_LEN, DATA_RESP_LEN + MAX_DATA_LEN as usize),
        }
    }

    /// True for the types [`crate::Endpoint::send`] carries.
    pub fn is_application(self) -> bool {
        use FrameType::*;
        matches!(
            self,
            Write | Read | Flush | Discard | WriteZeroes | Promise | ClearDirty | Completion | Error | PromiseAck
        )
    }
}

/// Everything that can be wrong with bytes received from a peer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("truncated frame: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("bad magic {0:#06x}")]
    BadMagic(u16),
    #[error("peer speaks protocol version {peer_major}.{peer_minor}, this node speaks {VERSION_MAJOR}.{VERSION_MINOR}: major versions differ")]
    UnsupportedVersion { peer_major: u8, peer_minor: u8 },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("non-zero reserved field in {0:?} frame")]
    Reserved(FrameType),
    #[error("{ty:?} frame body is {len} bytes, allowed {min}..={max}")]
    BodyLength { ty: FrameType, len: usize, min: usize, max: usize },
    #[error("{ty:?} body length {len} does not match its contents ({expected})")]
    LengthMismatch { ty: FrameType, len: usize, expected: usize },
    #[error("{0} segments, limit is {MAX_SEGMENTS} (and at least 1)")]
    SegmentCount(usize),
    #[error("inline WRITE: {0}")]
    Inline(&'static str),
    #[error("zero-length segment or range")]
    ZeroLength,
    #[error("length {len} over the limit of {limit} bytes")]
    IoTooLarge { len: u64, limit: u32 },
    #[error("offset {offset} + length {length} overflows")]
    Overflow { offset: u64, length: u64 },
    #[error("unknown flags {0:#x}")]
    UnknownFlags(u32),
    #[error("unknown status {0}")]
    UnknownStatus(u32),
    #[error("error text is not UTF-8")]
    BadText,
}

/// A message that cannot be encoded (it would not decode on the other side).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("output buffer is {have} bytes, frame needs {needed}")]
    BufferTooSmall { needed: usize, have: usize },
    #[error("message is invalid")]
    Invalid(#[source] DecodeError),
}

/// Outcome of a request or of a one-sided operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
#[non_exhaustive]
pub enum Status {
    Ok = 0,
    /// The replica's storage failed.
    IoError = 1,
    /// A key was unknown, revoked, or did not cover the addressed bytes.
    AccessDenied = 2,
    /// The request was malformed or out of bounds.
    BadRequest = 3,
    /// The request's membership epoch is older than the replica's.
    StaleEpoch = 4,
    /// The operation is not supported by this peer.
    Unsupported = 5,
    /// The connection failed before the operation completed.
    ConnectionLost = 6,
    /// Too many operations in flight.
    Busy = 7,
    /// The owner's generation is older than one the replica has seen.
    StaleGeneration = 8,
    /// The request addresses another incarnation of the replica.
    StaleIncarnation = 9,
    /// The sender is not a member (of the volume, in this epoch).
    NotMember = 10,
    /// The request id was already executed.
    Duplicate = 11,
    /// The sender does not own the volume.
    NotOwner = 12,
    /// The replica has no space for the data.
    NoSpace = 13,
    /// The extent is not promised to the sender.
    NotPromised = 14,
}

impl Status {
    pub fn from_u32(v: u32) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::IoError,
            2 => Status::AccessDenied,
            3 => Status::BadRequest,
            4 => Status::StaleEpoch,
            5 => Status::Unsupported,
            6 => Status::ConnectionLost,
            7 => Status::Busy,
            8 => Status::StaleGeneration,
            9 => Status::StaleIncarnation,
            10 => Status::NotMember,
            11 => Status::Duplicate,
            12 => Status::NotOwner,
            13 => Status::NoSpace,
            14 => Status::NotPromised,
            _ => return Err(DecodeError::UnknownStatus(v)),
        })
    }
}

/// A window of a peer's memory: what a descriptor hands to the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Address in the owner's address space (as with verbs' VA-based MRs).
    pub addr: u64,
    /// Access key granted by the owner for this request only.
    pub key: u32,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub cluster_id: u64,
    pub node_id: u64,
    pub nonce: [u8; NONCE_LEN],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub node_id: u64,
    pub nonce: [u8; NONCE_LEN],
    pub mac: [u8; MAC_LEN],
}

/// A READ or WRITE descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    pub request_id: u64,
    pub volume: u64,
    pub generation: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    pub length: u32,
    /// `FLAG_FUA`, `FLAG_INLINE` (WRITE only).
    pub flags: u32,
    pub epoch: u32,
    pub incarnation: u64,
    pub floor: u64,
    /// Remote segments holding the data (empty for an inline WRITE).
    pub segments: Segments,
    /// An inline WRITE's payload as received: attached by the transport
    /// (the codec itself never carries payloads, so `decode` leaves it
    /// `None`). A sender either sets it (`Endpoint::send`) or gathers the
    /// payload from registered memory with `Endpoint::send_inline`.
    pub inline: Option<InlineData>,
}

impl Descriptor {
    pub fn is_inline(&self) -> bool {
        self.flags & FLAG_INLINE != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flush {
    pub request_id: u64,
    pub volume: u64,
    pub generation: u64,
    pub epoch: u32,
    pub incarnation: u64,
    pub floor: u64,
}

/// DISCARD / WRITE_ZEROES.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RangeOp {
    pub request_id: u64,
    pub volume: u64,
    pub generation: u64,
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
    pub epoch: u32,
    pub incarnation: u64,
    pub floor: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Promise {
    pub request_id: u64,
    pub volume: u64,
    pub generation: u64,
    pub epoch: u32,
    pub extent: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClearDirty {
    pub request_id: u64,
    pub volume: u64,
    pub generation: u64,
    pub epoch: u32,
    pub extent: u32,
    pub incarnation: u64,
    pub first_region: u32,
    pub region_count: u32,
    pub upto: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromiseAck {
    pub request_id: u64,
    pub status: Status,
    pub epoch: u32,
    pub incarnation: u64,
    pub promised: u64,
    /// At most [`MAX_BITMAP`] bytes.
    pub bitmap: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub request_id: u64,
    pub status: Status,
    pub bytes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub sequence: u64,
    pub time_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    pub code: u32,
    pub text: String,
}

/// DATA_READ / DATA_WRITE: one remote segment of a one-sided operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataReq {
    pub op_id: u64,
    pub addr: u64,
    pub key: u32,
    pub len: u32,
}

/// DATA_READ_RESP / DATA_WRITE_ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataResp {
    pub op_id: u64,
    pub status: Status,
    pub len: u32,
}

/// One decoded frame (payloads excluded, see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Challenge(Challenge),
    Auth([u8; MAC_LEN]),
    Ready,
    Write(Descriptor),
    Read(Descriptor),
    Flush(Flush),
    Discard(RangeOp),
    WriteZeroes(RangeOp),
    Promise(Promise),
    ClearDirty(ClearDirty),
    Completion(Completion),
    Heartbeat(Heartbeat),
    Error(ErrorMsg),
    PromiseAck(PromiseAck),
    DataRead(DataReq),
    DataReadResp(DataResp),
    DataWrite(DataReq),
    DataWriteAck(DataResp),
}

/// A decoded, checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ty: FrameType,
    pub minor: u8,
    pub body_len: u32,
}

impl Header {
    /// Body bytes to read before [`Header::fixed_len`] can tell the length
    /// of the fixed part: the first 64 of a WRITE (its flags say whether a
    /// payload follows), the whole fixed part of any other frame.
    pub fn prefix_len(&self) -> usize {
        match self.ty {
            FrameType::Write => DESC_FIXED,
            FrameType::DataWrite => DATA_REQ_LEN,
            FrameType::DataReadResp => DATA_RESP_LEN,
            _ => self.body_len as usize,
        }
    }

    /// Length of the fixed part — the bytes [`decode_body`] wants; the rest
    /// of the body is payload — given the first [`Header::prefix_len`] body
    /// bytes.
    pub fn fixed_len(&self, prefix: &[u8]) -> Result<usize, DecodeError> {
        let want = self.prefix_len();
        if prefix.len() < want {
            return Err(DecodeError::Truncated { needed: want, have: prefix.len() });
        }
        if self.ty != FrameType::Write || rd_u32(prefix, 36) & FLAG_INLINE != 0 {
            return Ok(want);
        }
        // Segments follow: the body is all fixed part, bounded as any
        // control body is (the header allowed an inline WRITE's size).
        let len = self.body_len as usize;
        if len > MAX_CONTROL_BODY {
            return Err(DecodeError::BodyLength {
                ty: self.ty,
                len,
                min: DESC_FIXED + SEGMENT_LEN,
                max: MAX_CONTROL_BODY,
            });
        }
        Ok(len)
    }
}

// --- little-endian helpers: callers have already checked the length -----

fn rd_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
fn rd_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn rd_arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}
fn wr_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn wr_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn wr_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Decodes and checks a frame header (the first [`HEADER_LEN`] bytes of `b`).
pub fn decode_header(b: &[u8]) -> Result<Header, DecodeError> {
    if b.len() < HEADER_LEN {
        return Err(DecodeError::Truncated { needed: HEADER_LEN, have: b.len() });
    }
    let magic = rd_u16(b, 0);
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if b[2] != VERSION_MAJOR {
        return Err(DecodeError::UnsupportedVersion { peer_major: b[2], peer_minor: b[3] });
    }
    let ty = FrameType::from_u8(b[4]).ok_or(DecodeError::UnknownType(b[4]))?;
    if b[5] != 0 || rd_u16(b, 6) != 0 {
        return Err(DecodeError::Reserved(ty));
    }
    let body_len = rd_u32(b, 8);
    let (min, max) = ty.body_bounds();
    if (body_len as usize) < min || body_len as usize > max {
        return Err(DecodeError::BodyLength { ty, len: body_len as usize, min, max });
    }
    Ok(Header { ty, minor: b[3], body_len })
}

fn check_desc(ty: FrameType, d: &Descriptor) -> Result<(), DecodeError> {
    let known = if ty == FrameType::Write { DESC_FLAGS } else { DESC_FLAGS & !FLAG_INLINE };
    if d.flags & !known != 0 {
        return Err(DecodeError::UnknownFlags(d.flags));
    }
    if d.offset.checked_add(d.length.into()).is_none() {
        return Err(DecodeError::Overflow { offset: d.offset, length: d.length.into() });
    }
    if d.is_inline() {
        if !d.segments.is_empty() {
            return Err(DecodeError::Inline("it carries remote segments"));
        }
        if d.length == 0 {
            return Err(DecodeError::ZeroLength);
        }
        if d.length > MAX_INLINE {
            return Err(DecodeError::IoTooLarge { len: d.length.into(), limit: MAX_INLINE });
        }
        if let Some(p) = &d.inline {
            if p.len() != d.length as usize {
                return Err(DecodeError::LengthMismatch { ty, len: p.len(), expected: d.length as usize });
            }
        }
        return Ok(());
    }
    if d.inline.is_some() {
        return Err(DecodeError::Inline("payload without FLAG_INLINE"));
    }
    let n = d.segments.len();
    if n == 0 || n > MAX_SEGMENTS {
        return Err(DecodeError::SegmentCount(n));
    }
    if d.length > MAX_IO_LEN {
        return Err(DecodeError::IoTooLarge { len: d.length.into(), limit: MAX_IO_LEN });
    }
    let mut sum: u64 = 0;
    for s in &d.segments {
        if s.len == 0 {
            return Err(DecodeError::ZeroLength);
        }
        if s.addr.checked_add(s.len.into()).is_none() {
            return Err(DecodeError::Overflow { offset: s.addr, length: s.len.into() });
        }
        sum += u64::from(s.len);
    }
    if sum != u64::from(d.length) {
        return Err(DecodeError::LengthMismatch { ty, len: d.length as usize, expected: sum as usize });
    }
    Ok(())
}

fn check_range(r: &RangeOp) -> Result<(), DecodeError> {
    if r.length == 0 {
        return Err(DecodeError::ZeroLength);
    }
    if r.flags & !RANGE_FLAGS != 0 {
        return Err(DecodeError::UnknownFlags(r.flags));
    }
    if r.offset.checked_add(r.length).is_none() {
        return Err(DecodeError::Overflow { offset: r.offset, length: r.length });
    }
    Ok(())
}

fn check_clear_dirty(c: &ClearDirty) -> Result<(), DecodeError> {
    if c.region_count == 0 {
        return Err(DecodeError::ZeroLength);
    }
    if c.first_region.checked_add(c.region_count).is_none() {
        return Err(DecodeError::Overflow { offset: c.first_region.into(), length: c.region_count.into() });
    }
    Ok(())
}

fn check_promise_ack(a: &PromiseAck) -> Result<(), DecodeError> {
    if a.bitmap.len() > MAX_BITMAP {
        return Err(DecodeError::LengthMismatch {
            ty: FrameType::PromiseAck,
            len: a.bitmap.len(),
            expected: MAX_BITMAP,
        });
    }
    Ok(())
}

fn check_data_req(d: &DataReq) -> Result<(), DecodeError> {
    if d.len == 0 {
        return Err(DecodeError::ZeroLength);
    }
    if d.len > MAX_DATA_LEN {
        return Err(DecodeError::IoTooLarge { len: d.len.into(), limit: MAX_DATA_LEN });
    }
    if d.addr.checked_add(d.len.into()).is_none() {
        return Err(DecodeError::Overflow { offset: d.addr, length: d.len.into() });
    }
    Ok(())
}

fn check_data_resp(ty: FrameType, d: &DataResp) -> Result<(), DecodeError> {
    if d.len > MAX_DATA_LEN {
        return Err(DecodeError::IoTooLarge { len: d.len.into(), limit: MAX_DATA_LEN });
    }
    if ty == FrameType::DataReadResp && d.status != Status::Ok && d.len != 0 {
        return Err(DecodeError::LengthMismatch { ty, len: d.len as usize, expected: 0 });
    }
    Ok(())
}

/// Decodes the fixed part of a body: `body` must hold at least
/// `h.fixed_len(..)` bytes (only those are read).
pub fn decode_body(h: &Header, body: &[u8]) -> Result<Message, DecodeError> {
    let ty = h.ty;
    let fixed = h.fixed_len(body)?;
    if body.len() < fixed {
        return Err(DecodeError::Truncated { needed: fixed, have: body.len() });
    }
    let body = &body[..fixed];
    let payload = h.body_len as usize - fixed;
    let zero = |cond: bool| {
        if cond {
            Ok(())
        } else {
            Err(DecodeError::Reserved(ty))
        }
    };
    let msg = match ty {
        FrameType::Hello => {
            zero(rd_u64(body, 0) == 0)?;
            Message::Hello(Hello { cluster_id: rd_u64(body, 8), node_id: rd_u64(body, 16), nonce: rd_arr(body, 24) })
        }
        FrameType::Challenge => {
            Message::Challenge(Challenge { node_id: rd_u64(body, 0), nonce: rd_arr(body, 8), mac: rd_arr(body, 40) })
        }
        FrameType::Auth => Message::Auth(rd_arr(body, 0)),
        FrameType::Ready => Message::Ready,
        FrameType::Write | FrameType::Read => {
            zero(rd_u16(body, 42) == 0)?;
            let n = usize::from(rd_u16(body, 40));
            let flags = rd_u32(body, 36);
            let inline = ty == FrameType::Write && flags & FLAG_INLINE != 0;
            let segments = if inline {
                if n != 0 {
                    return Err(DecodeError::Inline("it carries remote segments"));
                }
                Segments::new()
            } else {
                if n == 0 || n > MAX_SEGMENTS {
                    return Err(DecodeError::SegmentCount(n));
                }
                let expected = DESC_FIXED + n * SEGMENT_LEN;
                if body.len() != expected {
                    return Err(DecodeError::LengthMismatch { ty, len: body.len(), expected });
                }
                (0..n)
                    .map(|i| {
                        let at = DESC_FIXED + i * SEGMENT_LEN;
                        Segment { addr: rd_u64(body, at), key: rd_u32(body, at + 8), len: rd_u32(body, at + 12) }
                    })
                    .collect()
            };
            let d = Descriptor {
                request_id: rd_u64(body, 0),
                volume: rd_u64(body, 8),
                generation: rd_u64(body, 16),
                offset: rd_u64(body, 24),
                length: rd_u32(body, 32),
                flags,
                epoch: rd_u32(body, 44),
                incarnation: rd_u64(body, 48),
                floor: rd_u64(body, 56),
                segments,
                inline: None,
            };
            check_desc(ty, &d)?;
            if inline && payload != d.length as usize {
                return Err(DecodeError::LengthMismatch { ty, len: payload, expected: d.length as usize });
            }
            if ty == FrameType::Write {
                Message::Write(d)
            } else {
                Message::Read(d)
            }
        }
        FrameType::Flush => {
            zero(rd_u32(body, 28) == 0)?;
            Message::Flush(Flush {
                request_id: rd_u64(body, 0),
                volume: rd_u64(body, 8),
                generation: rd_u64(body, 16),
                epoch: rd_u32(body, 24),
                incarnation: rd_u64(body, 32),
                floor: rd_u64(body, 40),
            })
        }
        FrameType::Discard | FrameType::WriteZeroes => {
            let r = RangeOp {
                request_id: rd_u64(body, 0),
                volume: rd_u64(body, 8),
                generation: rd_u64(body, 16),
                offset: rd_u64(body, 24),
                length: rd_u64(body, 32),
                flags: rd_u32(body, 40),
                epoch: rd_u32(body, 44),
                incarnation: rd_u64(body, 48),
                floor: rd_u64(body, 56),
            };
            check_range(&r)?;
            if ty == FrameType::Discard {
                Message::Discard(r)
            } else {
                Message::WriteZeroes(r)
            }
        }
        FrameType::Promise => {
            zero(rd_u64(body, 32) == 0)?;
            Message::Promise(Promise {
                request_id: rd_u64(body, 0),
                volume: rd_u64(body, 8),
                generation: rd_u64(body, 16),
                epoch: rd_u32(body, 24),
                extent: rd_u32(body, 28),
            })
        }
        FrameType::ClearDirty => {
            zero(rd_u64(body, 56) == 0)?;
            let c = ClearDirty {
                request_id: rd_u64(body, 0),
                volume: rd_u64(body, 8),
                generation: rd_u64(body, 16),
                epoch: rd_u32(body, 24),
                extent: rd_u32(body, 28),
                incarnation: rd_u64(body, 32),
                first_region: rd_u32(body, 40),
                region_count: rd_u32(body, 44),
                upto: rd_u64(body, 48),
            };
            check_clear_dirty(&c)?;
            Message::ClearDirty(c)
        }
        FrameType::Completion | FrameType::Heartbeat if rd_u64(body, 16) != 0 => {
            return Err(DecodeError::Reserved(ty));
        }
        FrameType::Completion => Message::Completion(Completion {
            request_id: rd_u64(body, 0),
            status: Status::from_u32(rd_u32(body, 8))?,
            bytes: rd_u32(body, 12),
        }),
        FrameType::Heartbeat => Message::Heartbeat(Heartbeat { sequence: rd_u64(body, 0), time_us: rd_u64(body, 8) }),
        FrameType::Error => {
            let n = usize::from(rd_u16(body, 4));
            zero(rd_u16(body, 6) == 0 && rd_u64(body, 8) == 0 && rd_u64(body, 16) == 0)?;
            if n > MAX_ERROR_TEXT || body.len() != ERROR_FIXED + n {
                return Err(DecodeError::LengthMismatch { ty, len: body.len(), expected: ERROR_FIXED + n });
            }
            let text = std::str::from_utf8(&body[ERROR_FIXED..]).map_err(|_| DecodeError::BadText)?;
            Message::Error(ErrorMsg { code: rd_u32(body, 0), text: text.to_owned() })
        }
        FrameType::PromiseAck => {
            zero(rd_u16(body, 34) == 0 && rd_u32(body, 36) == 0)?;
            let n = usize::from(rd_u16(body, 32));
            if n > MAX_BITMAP || body.len() != PROMISE_ACK_FIXED + n {
                return Err(DecodeError::LengthMismatch { ty, len: body.len(), expected: PROMISE_ACK_FIXED + n });
            }
            Message::PromiseAck(PromiseAck {
                request_id: rd_u64(body, 0),
                status: Status::from_u32(rd_u32(body, 8))?,
                epoch: rd_u32(body, 12),
                incarnation: rd_u64(body, 16),
                promised: rd_u64(body, 24),
                bitmap: body[PROMISE_ACK_FIXED..].to_vec(),
            })
        }
        FrameType::DataRead | FrameType::DataWrite => {
            let d =
                DataReq { op_id: rd_u64(body, 0), addr: rd_u64(body, 8), key: rd_u32(body, 16), len: rd_u32(body, 20) };
            check_data_req(&d)?;
            if ty == FrameType::DataRead {
                Message::DataRead(d)
            } else {
                if payload != d.len as usize {
                    return Err(DecodeError::LengthMismatch { ty, len: payload, expected: d.len as usize });
                }
                Message::DataWrite(d)
            }
        }
        FrameType::DataReadResp | FrameType::DataWriteAck => {
            zero(rd_u64(body, 16) == 0)?;
            let d =
                DataResp { op_id: rd_u64(body, 0), status: Status::from_u32(rd_u32(body, 8))?, len: rd_u32(body, 12) };
            check_data_resp(ty, &d)?;
            if ty == FrameType::DataReadResp {
                let expected = if d.status == Status::Ok { d.len as usize } else { 0 };
                if payload != expected {
                    return Err(DecodeError::LengthMismatch { ty, len: payload, expected });
                }
                Message::DataReadResp(d)
            } else {
                Message::DataWriteAck(d)
            }
        }
    };
    Ok(msg)
}

/// Decodes one whole frame from the front of `buf`.
///
/// Returns the message and the number of bytes the frame occupies, payload
/// included; the payload is `buf[consumed - msg.payload_len()..consumed]`.
pub fn decode(buf: &[u8]) -> Result<(Message, usize), DecodeError> {
    let h = decode_header(buf)?;
    let total = HEADER_LEN + h.body_len as usize;
    if buf.len() < total {
        return Err(DecodeError::Truncated { needed: total, have: buf.len() });
    }
    let msg = decode_body(&h, &buf[HEADER_LEN..total])?;
    Ok((msg, total))
}

impl Message {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Message::Hello(_) => FrameType::Hello,
            Message::Challenge(_) => FrameType::Challenge,
            Message::Auth(_) => FrameType::Auth,
            Message::Ready => FrameType::Ready,
            Message::Write(_) => FrameType::Write,
            Message::Read(_) => FrameType::Read,
            Message::Flush(_) => FrameType::Flush,
            Message::Discard(_) => FrameType::Discard,
            Message::WriteZeroes(_) => FrameType::WriteZeroes,
            Message::Promise(_) => FrameType::Promise,
            Message::ClearDirty(_) => FrameType::ClearDirty,
            Message::Completion(_) => FrameType::Completion,
            Message::Heartbeat(_) => FrameType::Heartbeat,
            Message::Error(_) => FrameType::Error,
            Message::PromiseAck(_) => FrameType::PromiseAck,
            Message::DataRead(_) => FrameType::DataRead,
            Message::DataReadResp(_) => FrameType::DataReadResp,
            Message::DataWrite(_) => FrameType::DataWrite,
            Message::DataWriteAck(_) => FrameType::DataWriteAck,
        }
    }

    /// Payload bytes that follow the encoded frame on the wire.
    pub fn payload_len(&self) -> usize {
        match self {
            Message::Write(d) if d.is_inline() => d.length as usize,
            Message::DataWrite(d) => d.len as usize,
            Message::DataReadResp(d) if d.status == Status::Ok => d.len as usize,
            _ => 0,
        }
    }

    fn fixed_body_len(&self) -> usize {
        match self {
            Message::Hello(_) => HELLO_LEN,
            Message::Challenge(_) => CHALLENGE_LEN,
            Message::Auth(_) => MAC_LEN,
            Message::Ready => 0,
            Message::Write(d) | Message::Read(d) => DESC_FIXED + d.segments.len() * SEGMENT_LEN,
            Message::Flush(_) => FLUSH_LEN,
            Message::Discard(_) | Message::WriteZeroes(_) => RANGE_LEN,
            Message::Promise(_) => PROMISE_LEN,
            Message::ClearDirty(_) => CLEAR_DIRTY_LEN,
            Message::Completion(_) | Message::Heartbeat(_) => 24,
            Message::Error(e) => ERROR_FIXED + e.text.len(),
            Message::PromiseAck(a) => PROMISE_ACK_FIXED + a.bitmap.len(),
            Message::DataRead(_) | Message::DataWrite(_) => DATA_REQ_LEN,
            Message::DataReadResp(_) | Message::DataWriteAck(_) => DATA_RESP_LEN,
        }
    }

    /// Bytes [`Message::encode`] writes (payload excluded).
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.fixed_body_len()
    }

    /// Checks the message against the rules of its frame type (what
    /// [`Message::encode`] refuses and a receiver would refuse).
    pub fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Message::Write(d) => check_desc(FrameType::Write, d),
            Message::Read(d) => check_desc(FrameType::Read, d),
            Message::Discard(r) | Message::WriteZeroes(r) => check_range(r),
            Message::ClearDirty(c) => check_clear_dirty(c),
            Message::PromiseAck(a) => check_promise_ack(a),
            Message::Error(e) if e.text.len() > MAX_ERROR_TEXT => {
                Err(DecodeError::LengthMismatch { ty: FrameType::Error, len: e.text.len(), expected: MAX_ERROR_TEXT })
            }
            Message::DataRead(d) | Message::DataWrite(d) => check_data_req(d),
            Message::DataReadResp(d) => check_data_resp(FrameType::DataReadResp, d),
            Message::DataWriteAck(d) => check_data_resp(FrameType::DataWriteAck, d),
            _ => Ok(()),
        }
    }

    /// Encodes the header and fixed body into `out`; returns bytes written.
    /// A payload (data frame, inline WRITE) must be sent right after these
    /// bytes.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        self.validate().map_err(EncodeError::Invalid)?;
        let fixed = self.fixed_body_len();
        let n = HEADER_LEN + fixed;
        if out.len() < n {
            return Err(EncodeError::BufferTooSmall { needed: n, have: out.len() });
        }
        let out = &mut out[..n];
        out.fill(0);
        wr_u16(out, 0, MAGIC);
        out[2] = VERSION_MAJOR;
        out[3] = VERSION_MINOR;
        out[4] = self.frame_type() as u8;
        // Bounded by MAX_CONTROL_BODY + MAX_DATA_LEN, far below u32::MAX.
        wr_u32(out, 8, (fixed + self.payload_len()) as u32);
        let b = &mut out[HEADER_LEN..];
        match self {
            Message::Hello(h) => {
                wr_u64(b, 8, h.cluster_id);
                wr_u64(b, 16, h.node_id);
                b[24..56].copy_from_slice(&h.nonce);
            }
            Message::Challenge(c) => {
                wr_u64(b, 0, c.node_id);
                b[8..40].copy_from_slice(&c.nonce);
                b[40..72].copy_from_slice(&c.mac);
            }
            Message::Auth(mac) => b.copy_from_slice(mac),
            Message::Ready => {}
            Message::Write(d) | Message::Read(d) => {
                wr_u64(b, 0, d.request_id);
                wr_u64(b, 8, d.volume);
                wr_u64(b, 16, d.generation);
                wr_u64(b, 24, d.offset);
                wr_u32(b, 32, d.length);
                wr_u32(b, 36, d.flags);
                // check_desc bounded the count by MAX_SEGMENTS.
                wr_u16(b, 40, d.segments.len() as u16);
                wr_u32(b, 44, d.epoch);
                wr_u64(b, 48, d.incarnation);
                wr_u64(b, 56, d.floor);
                for (i, s) in d.segments.iter().enumerate() {
                    let at = DESC_FIXED + i * SEGMENT_LEN;
                    wr_u64(b, at, s.addr);
                    wr_u32(b, at + 8, s.key);
                    wr_u32(b, at + 12, s.len);
                }
            }
            Message::Flush(f) => {
                wr_u64(b, 0, f.request_id);
                wr_u64(b, 8, f.volume);
                wr_u64(b, 16, f.generation);
                wr_u32(b, 24, f.epoch);
                wr_u64(b, 32, f.incarnation);
                wr_u64(b, 40, f.floor);
            }
            Message::Discard(r) | Message::WriteZeroes(r) => {
                wr_u64(b, 0, r.request_id);
                wr_u64(b, 8, r.volume);
                wr_u64(b, 16, r.generation);
                wr_u64(b, 24, r.offset);
                wr_u64(b, 32, r.length);
                wr_u32(b, 40, r.flags);
                wr_u32(b, 44, r.epoch);
                wr_u64(b, 48, r.incarnation);
                wr_u64(b, 56, r.floor);
            }
            Message::Promise(p) => {
                wr_u64(b, 0, p.request_id);
                wr_u64(b, 8, p.volume);
                wr_u64(b, 16, p.generation);
                wr_u32(b, 24, p.epoch);
                wr_u32(b, 28, p.extent);
            }
            Message::ClearDirty(c) => {
                wr_u64(b, 0, c.request_id);
                wr_u64(b, 8, c.volume);
                wr_u64(b, 16, c.generation);
                wr_u32(b, 24, c.epoch);
                wr_u32(b, 28, c.extent);
                wr_u64(b, 32, c.incarnation);
                wr_u32(b, 40, c.first_region);
                wr_u32(b, 44, c.region_count);
                wr_u64(b, 48, c.upto);
            }
            Message::Completion(c) => {
                wr_u64(b, 0, c.request_id);
                wr_u32(b, 8, c.status as u32);
                wr_u32(b, 12, c.bytes);
            }
            Message::Heartbeat(h) => {
                wr_u64(b, 0, h.sequence);
                wr_u64(b, 8, h.time_us);
            }
            Message::Error(e) => {
                wr_u32(b, 0, e.code);
                // validate() bounded the text by MAX_ERROR_TEXT.
                wr_u16(b, 4, e.text.len() as u16);
                b[ERROR_FIXED..].copy_from_slice(e.text.as_bytes());
            }
            Message::PromiseAck(a) => {
                wr_u64(b, 0, a.request_id);
                wr_u32(b, 8, a.status as u32);
                wr_u32(b, 12, a.epoch);
                wr_u64(b, 16, a.incarnation);
                wr_u64(b, 24, a.promised);
                // validate() bounded the bitmap by MAX_BITMAP.
                wr_u16(b, 32, a.bitmap.len() as u16);
                b[PROMISE_ACK_FIXED..].copy_from_slice(&a.bitmap);
            }
            Message::DataRead(d) | Message::DataWrite(d) => {
                wr_u64(b, 0, d.op_id);
                wr_u64(b, 8, d.addr);
                wr_u32(b, 16, d.key);
                wr_u32(b, 20, d.len);
            }
            Message::DataReadResp(d) | Message::DataWriteAck(d) => {
                wr_u64(b, 0, d.op_id);
                wr_u32(b, 8, d.status as u32);
                wr_u32(b, 12, d.len);
            }
        }
        Ok(n)
    }

    /// Encodes into a new vector (slow path: handshake, tests). Payload excluded.
    pub fn to_vec(&self) -> Result<Vec<u8>, EncodeError> {
        let mut v = vec![0u8; self.encoded_len()];
        self.encode(&mut v)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::error::Error as _;

    fn status() -> impl Strategy<Value = Status> {
        (0u32..15).prop_map(|v| Status::from_u32(v).unwrap())
    }

    /// The fields every replication request carries.
    #[derive(Debug, Clone, Copy)]
    struct Common {
        request_id: u64,
        volume: u64,
        generation: u64,
        epoch: u32,
        incarnation: u64,
        floor: u64,
    }

    fn common() -> impl Strategy<Value = Common> + Clone {
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
            |(request_id, volume, generation, epoch, incarnation, floor)| Common {
                request_id,
                volume,
                generation,
                epoch,
                incarnation,
                floor,
            },
        )
    }

    fn desc(c: Common, offset: u64, length: u32, flags: u32, segments: Segments) -> Descriptor {
        Descriptor {
            request_id: c.request_id,
            volume: c.volume,
            generation: c.generation,
            offset,
            length,
            flags,
            epoch: c.epoch,
            incarnation: c.incarnation,
            floor: c.floor,
            segments,
            inline: None,
        }
    }

    /// A READ or WRITE descriptor with remote segments.
    fn segmented() -> impl Strategy<Value = Descriptor> {
        (
            common(),
            0u64..(u64::MAX >> 1),
            prop::collection::vec((any::<u32>().prop_map(u64::from), any::<u32>(), 1u32..65536), 1..=MAX_SEGMENTS),
            any::<bool>(),
        )
            .prop_map(|(c, offset, segs, fua)| {
                let segments: Segments = segs.into_iter().map(|(addr, key, len)| Segment { addr, key, len }).collect();
                let length = segments.iter().map(|s| s.len).sum();
                desc(c, offset, length, if fua { FLAG_FUA } else { 0 }, segments)
            })
    }

    /// An inline WRITE descriptor (payload not part of the message).
    fn inline_write() -> impl Strategy<Value = Descriptor> {
        (common(), 0u64..(u64::MAX >> 1), 1..=MAX_INLINE, any::<bool>()).prop_map(|(c, offset, length, fua)| {
            let flags = FLAG_INLINE | if fua { FLAG_FUA } else { 0 };
            desc(c, offset, length, flags, Segments::new())
        })
    }

    fn message() -> impl Strategy<Value = Message> {
        let range =
            (common(), 0u64..(1 << 62), 1u64..(1 << 40), 0u32..2).prop_map(|(c, offset, length, flags)| RangeOp {
                request_id: c.request_id,
                volume: c.volume,
                generation: c.generation,
                offset,
                length,
                flags,
                epoch: c.epoch,
                incarnation: c.incarnation,
                floor: c.floor,
            });
        let data_req = (any::<u64>(), 0u64..(1 << 48), any::<u32>(), 1..=MAX_DATA_LEN)
            .prop_map(|(op_id, addr, key, len)| DataReq { op_id, addr, key, len });
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<[u8; 32]>())
                .prop_map(|(cluster_id, node_id, nonce)| Message::Hello(Hello { cluster_id, node_id, nonce })),
            (any::<u64>(), any::<[u8; 32]>(), any::<[u8; 32]>())
                .prop_map(|(node_id, nonce, mac)| Message::Challenge(Challenge { node_id, nonce, mac })),
            any::<[u8; 32]>().prop_map(Message::Auth),
            Just(Message::Ready),
            segmented().prop_map(Message::Write),
            inline_write().prop_map(Message::Write),
            segmented().prop_map(Message::Read),
            common().prop_map(|c| Message::Flush(Flush {
                request_id: c.request_id,
                volume: c.volume,
                generation: c.generation,
                epoch: c.epoch,
                incarnation: c.incarnation,
                floor: c.floor,
            })),
            range.clone().prop_map(Message::Discard),
            range.prop_map(Message::WriteZeroes),
            (common(), any::<u32>()).prop_map(|(c, extent)| Message::Promise(Promise {
                request_id: c.request_id,
                volume: c.volume,
                generation: c.generation,
                epoch: c.epoch,
                extent,
            })),
            (common(), any::<u32>(), any::<u32>(), 1u32..=4096, any::<u64>()).prop_map(
                |(c, extent, first, count, upto)| Message::ClearDirty(ClearDirty {
                    request_id: c.request_id,
                    volume: c.volume,
                    generation: c.generation,
                    epoch: c.epoch,
                    extent,
                    incarnation: c.incarnation,
                    first_region: first.min(u32::MAX - count),
                    region_count: count,
                    upto,
                })
            ),
            (common(), status(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..=MAX_BITMAP)).prop_map(
                |(c, status, promised, bitmap)| Message::PromiseAck(PromiseAck {
                    request_id: c.request_id,
                    status,
                    epoch: c.epoch,
                    incarnation: c.incarnation,
                    promised,
                    bitmap,
                })
            ),
            (any::<u64>(), status(), any::<u32>()).prop_map(|(request_id, status, bytes)| {
                Message::Completion(Completion { request_id, status, bytes })
            }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(sequence, time_us)| Message::Heartbeat(Heartbeat { sequence, time_us })),
            (any::<u32>(), "[a-zA-Z0-9 ]{0,200}").prop_map(|(code, text)| Message::Error(ErrorMsg { code, text })),
            data_req.clone().prop_map(Message::DataRead),
            data_req.prop_map(Message::DataWrite),
            (any::<u64>(), status(), 0..=MAX_DATA_LEN).prop_map(|(op_id, status, len)| {
                let len = if status == Status::Ok { len } else { 0 };
                Message::DataReadResp(DataResp { op_id, status, len })
            }),
            (any::<u64>(), status(), 0..=MAX_DATA_LEN)
                .prop_map(|(op_id, status, len)| { Message::DataWriteAck(DataResp { op_id, status, len }) }),
        ]
    }

    /// Encoded frame followed by its payload bytes.
    fn frame_with_payload(msg: &Message, fill: u8) -> Vec<u8> {
        let mut buf = msg.to_vec().unwrap();
        buf.resize(buf.len() + msg.payload_len(), fill);
        buf
    }

    proptest! {
        #[test]
        fn round_trip(msg in message(), payload_fill in any::<u8>()) {
            let buf = frame_with_payload(&msg, payload_fill);
            prop_assert_eq!(buf.len(), msg.encoded_len() + msg.payload_len());
            let (back, used) = decode(&buf).unwrap();
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(&back, &msg);
            // The split path: header, prefix, fixed part.
            let h = decode_header(&buf).unwrap();
            let fixed = h.fixed_len(&buf[HEADER_LEN..HEADER_LEN + h.prefix_len()]).unwrap();
            prop_assert_eq!(HEADER_LEN + fixed, msg.encoded_len());
            prop_assert_eq!(decode_body(&h, &buf[HEADER_LEN..HEADER_LEN + fixed]).unwrap(), msg);
        }

        #[test]
        fn every_truncation_is_an_error(msg in message()) {
            let buf = frame_with_payload(&msg, 0);
            for cut in 0..buf.len().min(HEADER_LEN + MAX_CONTROL_BODY) {
                prop_assert!(decode(&buf[..cut]).is_err());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn any_single_bit_flip_decodes_or_errors(msg in message(), bit in any::<prop::sample::Index>()) {
            let mut buf = frame_with_payload(&msg, 0);
            // Flip within the encoded part (a payload bit is just data).
            let b = bit.index(msg.encoded_len() * 8);
            buf[b / 8] ^= 1 << (b % 8);
            if let Ok((m, used)) = decode(&buf) {
                // Whatever decodes must re-encode to the same bytes.
                let mut again = m.to_vec().unwrap();
                // The minor version is not part of the message.
                again[3] = buf[3];
                prop_assert_eq!(&again[..], &buf[..again.len()]);
                prop_assert!(used <= buf.len());
            }
        }
    }

    fn common1() -> Common {
        Common { request_id: 1, volume: 2, generation: 3, epoch: 4, incarnation: 5, floor: 1 }
    }

    fn write_with(segs: Vec<Segment>, offset: u64) -> Descriptor {
        let length = segs.iter().map(|s| s.len).sum();
        desc(common1(), offset, length, 0, segs.into_iter().collect())
    }

    fn inline_with(length: u32) -> Descriptor {
        desc(common1(), 4096, length, FLAG_INLINE, Segments::new())
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr, key: 1, len }
    }

    #[test]
    fn rejects_unknown_major_version() {
        let mut b = Message::Ready.to_vec().unwrap();
        b[2] = VERSION_MAJOR + 1;
        let e = decode(&b).unwrap_err();
        assert_eq!(e, DecodeError::UnsupportedVersion { peer_major: VERSION_MAJOR + 1, peer_minor: VERSION_MINOR });
        assert!(e.to_string().contains("major versions differ"), "{e}");
        // A v1 peer is told which versions differ.
        b[2] = 1;
        let e = decode(&b).unwrap_err();
        assert!(e.to_string().contains("version 1.0, this node speaks 2.0"), "{e}");
        // A newer minor is fine.
        b[2] = VERSION_MAJOR;
        b[3] = VERSION_MINOR + 1;
        assert_eq!(decode(&b).unwrap().0, Message::Ready);
    }

    #[test]
    fn rejects_unknown_type_and_bad_magic() {
        let mut b = Message::Ready.to_vec().unwrap();
        b[4] = 99;
        assert_eq!(decode(&b).unwrap_err(), DecodeError::UnknownType(99));
        b[4] = FrameType::Ready as u8;
        b[0] = b'X';
        assert!(matches!(decode(&b).unwrap_err(), DecodeError::BadMagic(_)));
    }

    #[test]
    fn rejects_segment_count_over_limit() {
        let d = write_with(vec![seg(0x1000, 512); MAX_SEGMENTS], 0);
        let mut b = Message::Write(d).to_vec().unwrap();
        wr_u16(&mut b, HEADER_LEN + 40, (MAX_SEGMENTS + 1) as u16);
        assert_eq!(decode(&b).unwrap_err(), DecodeError::SegmentCount(MAX_SEGMENTS + 1));
        let too_many = write_with(vec![seg(0x1000, 512); MAX_SEGMENTS + 1], 0);
        assert!(matches!(Message::Write(too_many).to_vec(), Err(EncodeError::Invalid(DecodeError::SegmentCount(_)))));
        let none = write_with(vec![], 0);
        assert!(matches!(Message::Read(none).to_vec(), Err(EncodeError::Invalid(DecodeError::SegmentCount(0)))));
    }

    #[test]
    fn rejects_offset_plus_length_overflow() {
        let d = write_with(vec![seg(0x1000, 4096)], 0);
        let mut b = Message::Write(d).to_vec().unwrap();
        wr_u64(&mut b, HEADER_LEN + 24, u64::MAX - 100);
        assert!(matches!(decode(&b).unwrap_err(), DecodeError::Overflow { .. }));
        let mut b = frame_with_payload(&Message::Write(inline_with(512)), 7);
        wr_u64(&mut b, HEADER_LEN + 24, u64::MAX - 100);
        assert!(matches!(decode(&b).unwrap_err(), DecodeError::Overflow { .. }));
        let r = RangeOp { offset: u64::MAX, length: 2, ..RangeOp::default() };
        assert!(Message::Discard(r).to_vec().is_err());
        let mut c = ClearDirty { first_region: u32::MAX, region_count: 1, ..ClearDirty::default() };
        assert!(matches!(Message::ClearDirty(c).to_vec(), Err(EncodeError::Invalid(DecodeError::Overflow { .. }))));
        c.first_region = 0;
        c.region_count = 0;
        assert!(matches!(Message::ClearDirty(c).to_vec(), Err(EncodeError::Invalid(DecodeError::ZeroLength))));
        c.region_count = 1;
        let mut b = Message::ClearDirty(c).to_vec().unwrap();
        wr_u32(&mut b, HEADER_LEN + 40, u32::MAX);
        assert!(matches!(decode(&b).unwrap_err(), DecodeError::Overflow { .. }));
    }

    #[test]
    fn rejects_length_mismatch() {
        let d = write_with(vec![seg(0x1000, 4096), seg(0x9000, 512)], 0);
        let mut b = Message::Write(d).to_vec().unwrap();
        wr_u32(&mut b, HEADER_LEN + 32, 4096);
        assert!(matches!(decode(&b).unwrap_err(), DecodeError::LengthMismatch { .. }));
        // Body length disagreeing with the segment count.
        let mut b2 = Message::Write(write_with(vec![seg(1, 1)], 0)).to_vec().unwrap();
        b2.extend_from_slice(&[0u8; SEGMENT_LEN]);
        wr_u32(&mut b2, 8, (DESC_FIXED + 2 * SEGMENT_LEN) as u32);
        assert!(matches!(decode(&b2).unwrap_err(), DecodeError::LengthMismatch { .. }));
        // Oversized body is refused from the header alone.
        let mut b3 = Message::Ready.to_vec().unwrap();
        wr_u32(&mut b3, 8, u32::MAX);
        assert!(matches!(decode_header(&b3).unwrap_err(), DecodeError::BodyLength { .. }));
        // A PROMISE_ACK whose bitmap length disagrees with its body.
        let a = PromiseAck {
            request_id: 1,
            status: Status::Ok,
            epoch: 1,
            incarnation: 1,
            promised: 1,
            bitmap: vec![0xff; 8],
        };
        let mut b4 = Message::PromiseAck(a.clone()).to_vec().unwrap();
        wr_u16(&mut b4, HEADER_LEN + 32, 9);
        assert!(matches!(decode(&b4).unwrap_err(), DecodeError::LengthMismatch { .. }));
        let too_big = PromiseAck { bitmap: vec![0; MAX_BITMAP + 1], ..a };
        assert!(Message::PromiseAck(too_big).to_vec().is_err());
    }

    #[test]
    fn inline_write_rules() {
        // A valid inline WRITE: no segments, the payload after the fixed part.
        let m = Message::Write(inline_with(5));
        let mut b = m.to_vec().unwrap();
        assert_eq!(b.len(), HEADER_LEN + DESC_FIXED);
        b.extend_from_slice(b"hello");
        let (back, used) = decode(&b).unwrap();
        assert_eq!((back, used), (m, b.len()));
        assert_eq!(&b[used - 5..], b"hello");
        let h = decode_header(&b).unwrap();
        assert_eq!(h.prefix_len(), DESC_FIXED);
        assert_eq!(h.fixed_len(&b[HEADER_LEN..]).unwrap(), DESC_FIXED);
        // Payload length differing from `length`.
        let mut short = b.clone();
        wr_u32(&mut short, 8, (DESC_FIXED + 4) as u32);
        short.pop();
        assert!(matches!(decode(&short).unwrap_err(), DecodeError::LengthMismatch { .. }));
        // Segments on an inline WRITE.
        let mut with_segs = b.clone();
        wr_u16(&mut with_segs, HEADER_LEN + 40, 1);
        assert_eq!(decode(&with_segs).unwrap_err(), DecodeError::Inline("it carries remote segments"));
        let mut d = inline_with(16);
        d.segments.push(seg(0x1000, 16));
        assert!(Message::Write(d).to_vec().is_err());
        // Over MAX_INLINE, and zero bytes.
        assert_eq!(
            Message::Write(inline_with(MAX_INLINE + 1)).to_vec().unwrap_err(),
            EncodeError::Invalid(DecodeError::IoTooLarge { len: (MAX_INLINE + 1).into(), limit: MAX_INLINE })
        );
        assert!(Message::Write(inline_with(0)).to_vec().is_err());
        let mut big = Message::Write(inline_with(MAX_INLINE)).to_vec().unwrap();
        wr_u32(&mut big, HEADER_LEN + 32, MAX_INLINE + 1);
        wr_u32(&mut big, 8, (DESC_FIXED as u32) + MAX_INLINE + 1);
        big.resize(HEADER_LEN + DESC_FIXED + MAX_INLINE as usize + 1, 0);
        assert!(matches!(decode(&big).unwrap_err(), DecodeError::BodyLength { .. }));
        // A READ is never inline; FLAG_INLINE is an unknown flag there.
        let mut r = write_with(vec![seg(0x1000, 512)], 0);
        r.flags = FLAG_INLINE;
        assert_eq!(
            Message::Read(r.clone()).to_vec().unwrap_err(),
            EncodeError::Invalid(DecodeError::UnknownFlags(FLAG_INLINE))
        );
        let mut rb = Message::Read(Descriptor { flags: 0, ..r }).to_vec().unwrap();
        wr_u32(&mut rb, HEADER_LEN + 36, FLAG_INLINE);
        assert_eq!(decode(&rb).unwrap_err(), DecodeError::UnknownFlags(FLAG_INLINE));
        // A non-inline WRITE as long as an inline one may be is still
        // bounded as a control frame.
        let mut seg_write = Message::Write(write_with(vec![seg(0x1000, 512)], 0)).to_vec().unwrap();
        wr_u32(&mut seg_write, 8, 60000);
        seg_write.resize(HEADER_LEN + 60000, 0);
        assert!(matches!(decode(&seg_write).unwrap_err(), DecodeError::BodyLength { .. }));
        // An attached payload must match `length` and needs the flag.
        let mut d = inline_with(3);
        d.inline = Some(InlineData::copy_from(b"abcd"));
        assert!(Message::Write(d.clone()).to_vec().is_err());
        d.inline = Some(InlineData::copy_from(b"abc"));
        assert!(Message::Write(d.clone()).to_vec().is_ok());
        let mut not_inline = write_with(vec![seg(0x1000, 3)], 0);
        not_inline.inline = d.inline;
        assert_eq!(
            Message::Write(not_inline).to_vec().unwrap_err(),
            EncodeError::Invalid(DecodeError::Inline("payload without FLAG_INLINE"))
        );
    }

    #[test]
    fn length_limits_name_the_limit_that_applies() {
        let d = DataReq { op_id: 1, addr: 0x1000, key: 1, len: 1 };
        let mut b = Message::DataRead(d).to_vec().unwrap();
        wr_u32(&mut b, HEADER_LEN + 20, MAX_DATA_LEN + 1);
        let e = decode(&b).unwrap_err();
        assert_eq!(e, DecodeError::IoTooLarge { len: (MAX_DATA_LEN + 1).into(), limit: MAX_DATA_LEN });
        assert!(e.to_string().contains(&MAX_DATA_LEN.to_string()), "{e}");
        assert!(!e.to_string().contains(&MAX_IO_LEN.to_string()), "{e}");
        let big = write_with(vec![seg(0x1000, MAX_DATA_LEN); 5], 0);
        let e = Message::Write(big).to_vec().unwrap_err();
        assert!(e.source().unwrap().to_string().contains(&MAX_IO_LEN.to_string()), "{e}");
    }

    #[test]
    fn reserved_fields_must_be_zero() {
        let frames = [
            (Message::Write(write_with(vec![seg(0x1000, 8)], 0)), 42),
            (Message::Flush(Flush { request_id: 1, ..Flush::default() }), 28),
            (Message::Promise(Promise::default()), 32),
            (Message::ClearDirty(ClearDirty { region_count: 1, ..ClearDirty::default() }), 56),
            (
                Message::PromiseAck(PromiseAck {
                    request_id: 1,
                    status: Status::Ok,
                    epoch: 0,
                    incarnation: 0,
                    promised: 0,
                    bitmap: vec![],
                }),
                36,
            ),
        ];
        for (m, at) in frames {
            let mut b = m.to_vec().unwrap();
            assert!(decode(&b).is_ok());
            b[HEADER_LEN + at] = 1;
            assert_eq!(decode(&b).unwrap_err(), DecodeError::Reserved(m.frame_type()), "{m:?}");
        }
    }

    #[test]
    fn fuzz_seeds_are_valid_frames() {
        // The fuzzer's seeds start it at one valid frame of each type; keep
        // them in step with the layout.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        let mut types = std::collections::HashSet::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let (m, used) = decode(rest).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                types.insert(m.frame_type() as u8);
                rest = &rest[used..];
            }
        }
        let all = (0..=255u8).filter(|&t| FrameType::from_u8(t).is_some()).count();
        assert_eq!(types.len(), all, "seeds in {} cover {types:?}", dir.display());
    }

    #[test]
    fn frames_after_the_handshake_have_the_lookahead() {
        use FrameType::*;
        for t in 0..=255u8 {
            let Some(ty) = FrameType::from_u8(t) else {
                continue;
            };
            if matches!(ty, Hello | Challenge | Auth | Ready) {
                continue;
            }
            assert!(ty.body_bounds().0 >= MIN_BODY_AFTER_HANDSHAKE, "{ty:?}");
            let h = Header { ty, minor: 0, body_len: ty.body_bounds().0 as u32 };
            assert!(h.prefix_len() >= MIN_BODY_AFTER_HANDSHAKE, "{ty:?}");
        }
        for ty in [DataRead, DataReadResp, DataWrite, DataWriteAck] {
            let h = Header { ty, minor: 0, body_len: ty.body_bounds().1 as u32 };
            assert_eq!(h.prefix_len(), MIN_BODY_AFTER_HANDSHAKE, "{ty:?}");
        }
    }

    #[test]
    fn data_frame_payload_follows_fixed_part() {
        let m = Message::DataWrite(DataReq { op_id: 7, addr: 0x1000, key: 9, len: 5 });
        let mut b = m.to_vec().unwrap();
        b.extend_from_slice(b"hello");
        let (back, used) = decode(&b).unwrap();
        assert_eq!(back, m);
        assert_eq!(&b[used - back.payload_len()..used], b"hello");
        let h = decode_header(&b).unwrap();
        assert_eq!(h.fixed_len(&b[HEADER_LEN..]).unwrap(), DATA_REQ_LEN);
        assert_eq!(h.body_len as usize - DATA_REQ_LEN, 5);
    }

    #[test]
    fn layout_is_as_drawn() {
        let d = Descriptor {
            request_id: 0x0102030405060708,
            volume: 9,
            generation: 10,
            offset: 4096,
            length: 512,
            flags: FLAG_FUA,
            epoch: 11,
            incarnation: 12,
            floor: 13,
            segments: Segments::from_slice(&[Segment { addr: 0xAABB, key: 0xCC, len: 512 }]),
            inline: None,
        };
        let b = Message::Write(d.clone()).to_vec().unwrap();
        assert_eq!(&b[..12], &[b'H', b'B', 2, 0, 16, 0, 0, 0, 80, 0, 0, 0]);
        assert_eq!(&b[12..20], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(b[12 + 16], 10);
        assert_eq!(&b[12 + 32..12 + 48], &[0, 2, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 11, 0, 0, 0]);
        assert_eq!(b[12 + 48], 12);
        assert_eq!(b[12 + 56], 13);
        assert_eq!(&b[12 + 64..12 + 80], &[0xBB, 0xAA, 0, 0, 0, 0, 0, 0, 0xCC, 0, 0, 0, 0, 2, 0, 0]);
        // Inline: flags 3, no segments, body = 64 + length.
        let inl = Descriptor { flags: FLAG_FUA | FLAG_INLINE, segments: Segments::new(), ..d };
        let b = Message::Write(inl).to_vec().unwrap();
        assert_eq!(&b[8..12], &[64, 2, 0, 0]);
        assert_eq!(&b[12 + 36..12 + 42], &[3, 0, 0, 0, 0, 0]);
        let f = Flush { request_id: 1, volume: 2, generation: 3, epoch: 4, incarnation: 5, floor: 6 };
        let b = Message::Flush(f).to_vec().unwrap();
        assert_eq!(b.len(), 12 + 48);
        assert_eq!([b[12], b[20], b[28], b[36], b[44], b[52]], [1, 2, 3, 4, 5, 6]);
        let r = RangeOp {
            request_id: 1,
            volume: 2,
            generation: 3,
            offset: 4,
            length: 5,
            flags: FLAG_FUA,
            epoch: 7,
            incarnation: 8,
            floor: 9,
        };
        let b = Message::WriteZeroes(r).to_vec().unwrap();
        assert_eq!(b.len(), 12 + 64);
        let at = [0, 8, 16, 24, 32, 40, 44, 48, 56].map(|o| b[12 + o]);
        assert_eq!(at, [1, 2, 3, 4, 5, 1, 7, 8, 9]);
        let p = Promise { request_id: 1, volume: 2, generation: 3, epoch: 4, extent: 5 };
        let b = Message::Promise(p).to_vec().unwrap();
        assert_eq!(b.len(), 12 + 40);
        assert_eq!([0, 8, 16, 24, 28].map(|o| b[12 + o]), [1, 2, 3, 4, 5]);
        let c = ClearDirty {
            request_id: 1,
            volume: 2,
            generation: 3,
            epoch: 4,
            extent: 5,
            incarnation: 6,
            first_region: 7,
            region_count: 8,
            upto: 9,
        };
        let b = Message::ClearDirty(c).to_vec().unwrap();
        assert_eq!(b.len(), 12 + 64);
        let at = [0, 8, 16, 24, 28, 32, 40, 44, 48].map(|o| b[12 + o]);
        assert_eq!(at, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let a = PromiseAck {
            request_id: 1,
            status: Status::NotPromised,
            epoch: 3,
            incarnation: 4,
            promised: 5,
            bitmap: vec![0xaa, 0x55, 0x0f],
        };
        let b = Message::PromiseAck(a).to_vec().unwrap();
        assert_eq!(&b[4..5], &[35]);
        assert_eq!(b.len(), 12 + 40 + 3);
        assert_eq!([0, 8, 12, 16, 24, 32].map(|o| b[12 + o]), [1, 14, 3, 4, 5, 3]);
        assert_eq!(&b[12 + 40..], &[0xaa, 0x55, 0x0f]);
    }
}
