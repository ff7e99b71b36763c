//! Parse and validate a virtio-blk descriptor chain into a [`Request`], before anything runs.
//!
//! A chain is read as the spec frames it, not as Linux happens to lay it out: the
//! device-readable bytes (header, then OUT data or discard segments) come first, then the
//! device-writable bytes (IN data, then the status byte, which is the chain's last byte). Every
//! MUST of the virtio-blk spec (v1.2 §5.2.6) that concerns the device is checked here; a chain
//! that fails comes back as a [`Rejection`] that says which status to report, if a status byte
//! could be found at all.
//!
//! ```text
//!  readable ──────────────────────────────────────┐ writable ─────────────────────────┐
//!  [ type:u32 | ioprio:u32 | sector:u64 ][ OUT data / segments ][ IN data / id ][ status:u8 ]
//! ```

use std::ops::Deref;

use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory, Le32, Le64};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Bytes of the device id GET_ID returns (virtio-blk: 20, NUL-padded, not NUL-terminated).
pub const ID_BYTES: usize = 20;

pub const STATUS_OK: u8 = 0;
pub const STATUS_IOERR: u8 = 1;
pub const STATUS_UNSUPP: u8 = 2;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    request_type: Le32,
    ioprio: Le32,
    sector: Le64,
}
// SAFETY: plain little-endian integers with no padding; any bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct DiscardSegment {
    sector: Le64,
    num_sectors: Le32,
    flags: Le32,
}
// SAFETY: plain little-endian integers with no padding; any bit pattern is a valid value.
unsafe impl ByteValued for DiscardSegment {}

const HEADER_BYTES: u64 = std::mem::size_of::<RequestHeader>() as u64;
const SEGMENT_BYTES: u64 = std::mem::size_of::<DiscardSegment>() as u64;

/// What the device allows, as advertised in its config space.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// Most data descriptors in one request (config `seg_max`).
    pub seg_max: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

/// One validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes { unmap: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// First byte on the volume.
    pub offset_bytes: u64,
    /// Bytes moved (read/write/GET_ID) or affected (discard/write-zeroes).
    pub len_bytes: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// A piece of guest memory carrying request data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Why a chain was refused, and how to answer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The status byte's address, when the chain has one the device may write.
    pub status: Option<GuestAddress>,
    /// STATUS_IOERR or STATUS_UNSUPP.
    pub code: u8,
    pub reason: &'static str,
}

impl Rejection {
    fn ioerr(status: GuestAddress, reason: &'static str) -> Self {
        Self { status: Some(status), code: STATUS_IOERR, reason }
    }
}

/// Reusable storage, so that parsing allocates nothing per request.
#[derive(Debug, Default)]
pub struct Scratch {
    descriptors: Vec<(GuestAddress, u32, bool)>,
    /// Data segments of the last parsed request, in order.
    pub segments: Vec<Segment>,
}

impl Scratch {
    pub fn with_capacity(queue_size: usize) -> Self {
        Self {
            descriptors: Vec::with_capacity(queue_size),
            segments: Vec::with_capacity(queue_size),
        }
    }
}

/// Parses one chain. On success the request's data segments are in `scratch.segments`.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    limits: &Limits,
    scratch: &mut Scratch,
) -> Result<Request, Rejection>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    scratch.descriptors.clear();
    scratch.segments.clear();

    let mut readable_bytes: u64 = 0;
    let mut writable_bytes: u64 = 0;
    let mut last: Option<Descriptor> = None;
    let mut order_violated = false;
    let capacity = scratch.descriptors.capacity().max(1);
    for desc in chain.clone() {
        if scratch.descriptors.len() == capacity {
            // Longer than any chain the queue can hold: only a loop gets here.
            return Err(Rejection { status: None, code: STATUS_IOERR, reason: "descriptor chain longer than the queue" });
        }
        if desc.is_write_only() {
            writable_bytes += u64::from(desc.len());
        } else {
            if writable_bytes > 0 {
                order_violated = true;
            }
            readable_bytes += u64::from(desc.len());
        }
        scratch.descriptors.push((desc.addr(), desc.len(), desc.is_write_only()));
        last = Some(desc);
    }
    let Some(last) = last else {
        return Err(Rejection { status: None, code: STATUS_IOERR, reason: "empty or unreadable descriptor chain" });
    };
    if last.has_next() {
        // The iterator stopped early: a loop, a chain longer than the queue, an indirect
        // table that could not be read, or a descriptor outside the table.
        return Err(Rejection { status: None, code: STATUS_IOERR, reason: "descriptor chain loops or is truncated" });
    }

    // The status byte is the last byte of the chain and must be device-writable.
    let status = match scratch.descriptors.last() {
        Some(&(addr, len, true)) if len > 0 => {
            let at = addr.0.checked_add(u64::from(len) - 1);
            match at {
                Some(at) if mem.check_range(GuestAddress(at), 1, vm_memory::Permissions::Write) => GuestAddress(at),
                _ => return Err(Rejection { status: None, code: STATUS_IOERR, reason: "status byte outside guest memory" }),
            }
        }
        _ => return Err(Rejection { status: None, code: STATUS_IOERR, reason: "status descriptor missing or not writable" }),
    };
    if order_violated {
        return Err(Rejection::ioerr(status, "device-readable descriptor after a writable one"));
    }
    if readable_bytes < HEADER_BYTES {
        return Err(Rejection::ioerr(status, "request header shorter than 16 bytes"));
    }
    let header: RequestHeader = read_stream(mem, &scratch.descriptors, false, 0)
        .ok_or(Rejection::ioerr(status, "request header not readable"))?;
    let request_type = header.request_type.to_native();
    let sector = header.sector.to_native();

    // Bytes between the header and the status byte, per direction.
    let out_bytes = readable_bytes - HEADER_BYTES;
    let in_bytes = writable_bytes - 1;

    let op = match request_type {
        T_IN => Op::Read,
        T_OUT => Op::Write,
        T_FLUSH => Op::Flush,
        T_GET_ID => Op::GetId,
        T_DISCARD => Op::Discard,
        T_WRITE_ZEROES => Op::WriteZeroes { unmap: false },
        _ => return Err(Rejection { status: Some(status), code: STATUS_UNSUPP, reason: "unsupported request type" }),
    };

    match op {
        Op::Read | Op::Write => {
            let (data_bytes, stray_bytes, writable) =
                if op == Op::Read { (in_bytes, out_bytes, true) } else { (out_bytes, in_bytes, false) };
            if stray_bytes != 0 {
                return Err(Rejection::ioerr(status, "data buffers in the wrong direction"));
            }
            if op == Op::Write && limits.read_only {
                return Err(Rejection::ioerr(status, "write to a read-only volume"));
            }
            if data_bytes % SECTOR_SIZE != 0 {
                return Err(Rejection::ioerr(status, "data length not a multiple of 512 bytes"));
            }
            check_sectors(sector, data_bytes >> SECTOR_SHIFT, limits.capacity_sectors)
                .map_err(|reason| Rejection::ioerr(status, reason))?;
            let skip = if writable { 0 } else { HEADER_BYTES };
            collect_segments(mem, &scratch.descriptors, writable, skip, data_bytes, &mut scratch.segments)
                .map_err(|reason| Rejection::ioerr(status, reason))?;
            if scratch.segments.len() > limits.seg_max as usize {
                return Err(Rejection::ioerr(status, "more data segments than seg_max"));
            }
            Ok(Request { op, offset_bytes: sector << SECTOR_SHIFT, len_bytes: data_bytes, status })
        }
        Op::Flush => Ok(Request { op, offset_bytes: 0, len_bytes: 0, status }),
        Op::GetId => {
            if out_bytes != 0 {
                return Err(Rejection::ioerr(status, "GET_ID with device-readable data"));
            }
            let len = in_bytes.min(ID_BYTES as u64);
            collect_segments(mem, &scratch.descriptors, true, 0, len, &mut scratch.segments)
                .map_err(|reason| Rejection::ioerr(status, reason))?;
            Ok(Request { op, offset_bytes: 0, len_bytes: len, status })
        }
        Op::Discard | Op::WriteZeroes { .. } => {
            if in_bytes != 0 {
                return Err(Rejection::ioerr(status, "discard/write-zeroes with device-writable data"));
            }
            if limits.read_only {
                return Err(Rejection::ioerr(status, "discard/write-zeroes on a read-only volume"));
            }
            if out_bytes != SEGMENT_BYTES {
                // The device advertises max_discard_seg = max_write_zeroes_seg = 1.
                return Err(Rejection::ioerr(status, "discard/write-zeroes needs exactly one 16-byte segment"));
            }
            let segment: DiscardSegment = read_stream(mem, &scratch.descriptors, false, HEADER_BYTES)
                .ok_or(Rejection::ioerr(status, "discard segment not readable"))?;
            let flags = segment.flags.to_native();
            let num_sectors = segment.num_sectors.to_native();
            let seg_sector = segment.sector.to_native();
            let (op, max_sectors) = if op == Op::Discard {
                if flags != 0 {
                    return Err(Rejection { status: Some(status), code: STATUS_UNSUPP, reason: "discard with flags set" });
                }
                (Op::Discard, limits.max_discard_sectors)
            } else {
                if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 {
                    return Err(Rejection { status: Some(status), code: STATUS_UNSUPP, reason: "write-zeroes with unknown flags" });
                }
                (Op::WriteZeroes { unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0 }, limits.max_write_zeroes_sectors)
            };
            if num_sectors == 0 || num_sectors > max_sectors {
                return Err(Rejection::ioerr(status, "discard/write-zeroes sector count out of range"));
            }
            check_sectors(seg_sector, u64::from(num_sectors), limits.capacity_sectors)
                .map_err(|reason| Rejection::ioerr(status, reason))?;
            Ok(Request {
                op,
                offset_bytes: seg_sector << SECTOR_SHIFT,
                len_bytes: u64::from(num_sectors) << SECTOR_SHIFT,
                status,
            })
        }
    }
}

fn check_sectors(sector: u64, count: u64, capacity: u64) -> Result<(), &'static str> {
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err("sectors past the end of the volume"),
    }
}

/// Reads a `T` found `skip` bytes into the readable (or writable) part of the chain, even if it
/// straddles descriptors.
fn read_stream<T: ByteValued + Default, M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: &[(GuestAddress, u32, bool)],
    writable: bool,
    skip: u64,
) -> Option<T> {
    let mut value = T::default();
    let bytes = value.as_mut_slice();
    let mut filled = 0usize;
    let mut skip = skip;
    for &(addr, len, w) in descriptors.iter().filter(|d| d.2 == writable) {
        let _ = w;
        let len = u64::from(len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = ((len - skip) as usize).min(bytes.len() - filled);
        mem.read_slice(&mut bytes[filled..filled + take], addr.checked_add(skip)?).ok()?;
        filled += take;
        skip = 0;
        if filled == bytes.len() {
            return Some(value);
        }
    }
    None
}

/// Slices `len` data bytes, starting `skip` bytes into the readable (writable) part of the
/// chain, into segments that lie wholly in guest memory.
fn collect_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: &[(GuestAddress, u32, bool)],
    writable: bool,
    skip: u64,
    len: u64,
    out: &mut Vec<Segment>,
) -> Result<(), &'static str> {
    let access = if writable { vm_memory::Permissions::Write } else { vm_memory::Permissions::Read };
    let mut skip = skip;
    let mut remaining = len;
    for &(addr, desc_len, _) in descriptors.iter().filter(|d| d.2 == writable) {
        if remaining == 0 {
            break;
        }
        let desc_len = u64::from(desc_len);
        if skip >= desc_len {
            skip -= desc_len;
            continue;
        }
        let take = (desc_len - skip).min(remaining);
        let start = addr.checked_add(skip).ok_or("data buffer address overflows")?;
        if !mem.check_range(start, take as usize, access) {
            return Err("data buffer outside guest memory");
        }
        if out.len() == out.capacity() {
            return Err("more data segments than the queue can describe");
        }
        out.push(Segment { addr: start, len: take as u32 });
        remaining -= take;
        skip = 0;
    }
    if remaining != 0 {
        return Err("data shorter than the request says");
    }
    Ok(())
}
