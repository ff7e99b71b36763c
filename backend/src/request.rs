//! Parse and validate a virtio-blk descriptor chain into a [`Request`], before anything runs.
//!
//! A chain is read as the spec frames it, not as Linux happens to lay it out: the
//! device-readable bytes (header, then OUT data or discard segments) come first, then the
//! device-writable bytes (IN data, then the status byte, which is the chain's last byte). Every
//! MUST of the virtio-blk spec (v1.2 §5.2.6) that concerns the device is checked here; a chain
//! that fails comes back as a [`Rejection`] that says which status to report, if a status byte
//! could be found at all.
//!
//! Beyond the spec's MUSTs, reads and writes are held to the limits the device advertises:
//! `seg_max` data descriptors, each carrying at most `size_max` data bytes (a descriptor that
//! also holds the header or the status byte may be that much longer). The spec states these
//! limits for the driver only (§5.2.3, §5.2.4) and asks nothing of the device when a driver
//! exceeds them, so the device may serve such a chain or refuse it; it refuses with IOERR, the
//! status §5.2.6 gives for "device or driver error", so that every request that runs is one
//! the layers behind the parser were sized for (iovec arrays, replication wire pieces).
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
    /// Most bytes in one data descriptor (config `size_max`).
    pub size_max: u32,
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

/// Reusable storage, so that parsing allocates nothing per request. Its capacity bounds the
/// chain length `parse` accepts, so it is only made with [`Scratch::with_capacity`].
#[derive(Debug)]
pub struct Scratch {
    descriptors: Vec<(GuestAddress, u32, bool)>,
    /// Data segments of the last parsed request, in order.
    pub segments: Vec<Segment>,
}

impl Scratch {
    pub fn with_capacity(queue_size: usize) -> Self {
        Self { descriptors: Vec::with_capacity(queue_size), segments: Vec::with_capacity(queue_size) }
    }
}

/// Parses one chain. On success the request's data segments are in `scratch.segments`.
pub fn parse<M>(chain: DescriptorChain<M>, limits: &Limits, scratch: &mut Scratch) -> Result<Request, Rejection>
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
            return Err(Rejection {
                status: None,
                code: STATUS_IOERR,
                reason: "descriptor chain longer than the queue",
            });
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
                _ => {
                    return Err(Rejection {
                        status: None,
                        code: STATUS_IOERR,
                        reason: "status byte outside guest memory",
                    })
                }
            }
        }
        _ => {
            return Err(Rejection {
                status: None,
                code: STATUS_IOERR,
                reason: "status descriptor missing or not writable",
            })
        }
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
            if scratch.segments.iter().any(|segment| segment.len > limits.size_max) {
                return Err(Rejection::ioerr(status, "data segment larger than size_max"));
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
                    return Err(Rejection {
                        status: Some(status),
                        code: STATUS_UNSUPP,
                        reason: "discard with flags set",
                    });
                }
                (Op::Discard, limits.max_discard_sectors)
            } else {
                if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 {
                    return Err(Rejection {
                        status: Some(status),
                        code: STATUS_UNSUPP,
                        reason: "write-zeroes with unknown flags",
                    });
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
        // The byte offset must be representable too (sector << 9 must not wrap).
        Some(end) if end <= capacity && end <= u64::MAX >> SECTOR_SHIFT => Ok(()),
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
    for &(addr, len, _) in descriptors.iter().filter(|d| d.2 == writable) {
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

#[cfg(test)]
mod tests {
    //! Every device-side MUST of virtio-blk v1.2 §5.2.6 that `parse` enforces, one chain each,
    //! laid out by virtio-queue's mock driver.

    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const QUEUE_SIZE: u16 = 16;
    const MEM_BYTES: u64 = 0x40_0000;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const DATA2: u64 = 0x28_0000;
    const STATUS: u64 = 0x30_0000;
    const INDIRECT: u64 = 0x38_0000;

    const LIMITS: Limits = Limits {
        capacity_sectors: 1024,
        read_only: false,
        seg_max: 4,
        size_max: 8192,
        max_discard_sectors: 64,
        max_write_zeroes_sectors: 32,
    };
    const READ_ONLY: Limits = Limits { read_only: true, ..LIMITS };

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)]).unwrap()
    }

    fn r(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    fn w(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
    }

    fn header_bytes(request_type: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn write_header(mem: &GuestMemoryMmap<()>, at: u64, request_type: u32, sector: u64) {
        mem.write_slice(&header_bytes(request_type, sector), GuestAddress(at)).unwrap();
    }

    fn write_segment(mem: &GuestMemoryMmap<()>, at: u64, sector: u64, num_sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(at)).unwrap();
    }

    /// Links `descs` into one chain (NEXT set on all but the last) and parses it.
    fn parse_linked(
        mem: &GuestMemoryMmap<()>,
        descs: &[RawDescriptor],
        limits: &Limits,
    ) -> (Result<Request, Rejection>, Vec<Segment>) {
        let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
        let chain = queue.build_desc_chain(descs).unwrap();
        let mut scratch = Scratch::with_capacity(QUEUE_SIZE as usize);
        let result = parse(chain, limits, &mut scratch);
        (result, scratch.segments.clone())
    }

    /// Writes `descs` verbatim at table indices 0.. (their own flags and next pointers) and
    /// parses the chain whose head is index 0.
    fn parse_raw(mem: &GuestMemoryMmap<()>, descs: &[RawDescriptor], limits: &Limits) -> Result<Request, Rejection> {
        let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
        let chain = queue.build_multiple_desc_chains(descs).unwrap();
        parse(chain, limits, &mut Scratch::with_capacity(QUEUE_SIZE as usize))
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr: GuestAddress(addr), len }
    }

    #[track_caller]
    fn assert_rejected(result: Result<Request, Rejection>, status: Option<u64>, code: u8) {
        match result {
            Err(rejection) => {
                assert_eq!(rejection.status, status.map(GuestAddress), "status address ({})", rejection.reason);
                assert_eq!(rejection.code, code, "status code ({})", rejection.reason);
            }
            Ok(request) => panic!("accepted: {request:?}"),
        }
    }

    #[test]
    fn read_parses_into_writable_segments() {
        let mem = memory();
        write_header(&mem, HDR, T_IN, 8);
        let (result, segments) = parse_linked(&mem, &[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)], &LIMITS);
        assert_eq!(
            result.unwrap(),
            Request { op: Op::Read, offset_bytes: 8 * 512, len_bytes: 4096, status: GuestAddress(STATUS) }
        );
        assert_eq!(segments, [seg(DATA, 4096)]);
    }

    #[test]
    fn read_with_status_byte_sharing_the_last_data_descriptor() {
        let mem = memory();
        write_header(&mem, HDR, T_IN, 0);
        let (result, segments) = parse_linked(&mem, &[r(HDR, 16), w(DATA, 512), w(DATA2, 1024 + 1)], &LIMITS);
        let request = result.unwrap();
        assert_eq!(request.len_bytes, 1536);
        assert_eq!(request.status, GuestAddress(DATA2 + 1024));
        assert_eq!(segments, [seg(DATA, 512), seg(DATA2, 1024)]);
    }

    #[test]
    fn write_parses_into_readable_segments_after_the_header() {
        let mem = memory();
        write_header(&mem, HDR, T_OUT, 1000);
        let (result, segments) =
            parse_linked(&mem, &[r(HDR, 16), r(DATA, 1024), r(DATA2, 3072), w(STATUS, 1)], &LIMITS);
        assert_eq!(
            result.unwrap(),
            Request { op: Op::Write, offset_bytes: 1000 * 512, len_bytes: 4096, status: GuestAddress(STATUS) }
        );
        assert_eq!(segments, [seg(DATA, 1024), seg(DATA2, 3072)]);

        // Header and data in one descriptor: the data starts right after the 16 header bytes.
        write_header(&mem, HDR, T_OUT, 2);
        let (result, segments) = parse_linked(&mem, &[r(HDR, 16 + 512), w(STATUS, 1)], &LIMITS);
        assert_eq!(result.unwrap().offset_bytes, 1024);
        assert_eq!(segments, [seg(HDR + 16, 512)]);
    }

    #[test]
    fn flush_parses_with_or_without_read_only() {
        let mem = memory();
        write_header(&mem, HDR, T_FLUSH, 0);
        for limits in [LIMITS, READ_ONLY] {
            let (result, segments) = parse_linked(&mem, &[r(HDR, 16), w(STATUS, 1)], &limits);
            assert_eq!(
                result.unwrap(),
                Request { op: Op::Flush, offset_bytes: 0, len_bytes: 0, status: GuestAddress(STATUS) }
            );
            assert!(segments.is_empty());
        }
    }

    #[test]
    fn get_id_fills_at_most_twenty_bytes() {
        let mem = memory();
        write_header(&mem, HDR, T_GET_ID, 0);
        for (buffer, expected) in [(20u32, 20u64), (64, 20), (8, 8)] {
            let (result, segments) = parse_linked(&mem, &[r(HDR, 16), w(DATA, buffer), w(STATUS, 1)], &READ_ONLY);
            let request = result.unwrap();
            assert_eq!((request.op, request.len_bytes), (Op::GetId, expected), "buffer of {buffer} bytes");
            assert_eq!(segments, [seg(DATA, expected as u32)]);
        }
        // Just the status byte: nothing to fill, still a valid request.
        let (result, segments) = parse_linked(&mem, &[r(HDR, 16), w(STATUS, 1)], &LIMITS);
        assert_eq!(result.unwrap().len_bytes, 0);
        assert!(segments.is_empty());
        // An id buffer split over descriptors is filled in order.
        let (result, segments) = parse_linked(&mem, &[r(HDR, 16), w(DATA, 12), w(DATA2, 12), w(STATUS, 1)], &LIMITS);
        assert_eq!(result.unwrap().len_bytes, 20);
        assert_eq!(segments, [seg(DATA, 12), seg(DATA2, 8)]);
    }

    #[test]
    fn get_id_with_device_readable_data_is_refused() {
        let mem = memory();
        write_header(&mem, HDR, T_GET_ID, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 20), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
    }

    #[test]
    fn discard_and_write_zeroes_parse_their_segment() {
        let mem = memory();
        let chain = [r(HDR, 16), r(DATA, 16), w(STATUS, 1)];
        write_header(&mem, HDR, T_DISCARD, 0);
        write_segment(&mem, DATA, 16, 8, 0);
        let (result, segments) = parse_linked(&mem, &chain, &LIMITS);
        assert_eq!(
            result.unwrap(),
            Request { op: Op::Discard, offset_bytes: 16 * 512, len_bytes: 8 * 512, status: GuestAddress(STATUS) }
        );
        assert!(segments.is_empty());

        write_header(&mem, HDR, T_WRITE_ZEROES, 0);
        for (flags, unmap) in [(0, false), (WRITE_ZEROES_FLAG_UNMAP, true)] {
            write_segment(&mem, DATA, 1000, 24, flags);
            let (result, _) = parse_linked(&mem, &chain, &LIMITS);
            assert_eq!(
                result.unwrap(),
                Request {
                    op: Op::WriteZeroes { unmap },
                    offset_bytes: 1000 * 512,
                    len_bytes: 24 * 512,
                    status: GuestAddress(STATUS)
                }
            );
        }

        // Header and segment in one descriptor, as Linux lays it out.
        write_header(&mem, HDR, T_DISCARD, 0);
        write_segment(&mem, HDR + 16, 0, 64, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 32), w(STATUS, 1)], &LIMITS);
        assert_eq!(result.unwrap().len_bytes, 64 * 512);
    }

    #[test]
    fn header_split_across_descriptors_still_parses() {
        let mem = memory();
        let h = header_bytes(T_OUT, 77);
        mem.write_slice(&h[..7], GuestAddress(HDR)).unwrap();
        mem.write_slice(&h[7..], GuestAddress(DATA2)).unwrap();
        let (result, segments) = parse_linked(&mem, &[r(HDR, 7), r(DATA2, 9), r(DATA, 512), w(STATUS, 1)], &LIMITS);
        assert_eq!(
            result.unwrap(),
            Request { op: Op::Write, offset_bytes: 77 * 512, len_bytes: 512, status: GuestAddress(STATUS) }
        );
        assert_eq!(segments, [seg(DATA, 512)]);

        // The same for a discard segment straddling two descriptors after a split header.
        let h = header_bytes(T_DISCARD, 0);
        mem.write_slice(&h[..3], GuestAddress(HDR)).unwrap();
        mem.write_slice(&h[3..], GuestAddress(DATA2)).unwrap();
        write_segment(&mem, DATA2 + 13, 5, 1, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 3), r(DATA2, 13 + 10), r(DATA2 + 23, 6), w(STATUS, 1)], &LIMITS);
        assert_eq!(result.unwrap().offset_bytes, 5 * 512);
    }

    #[test]
    fn short_header_is_an_ioerr_with_status() {
        let mem = memory();
        write_header(&mem, HDR, T_IN, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 8), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
        let (result, _) = parse_linked(&mem, &[r(HDR, 8), r(HDR + 8, 7), w(DATA, 512), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
        // No readable descriptor at all.
        let (result, _) = parse_linked(&mem, &[w(DATA, 512), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
    }

    #[test]
    fn header_outside_guest_memory_is_an_ioerr_with_status() {
        let mem = memory();
        let (result, _) = parse_linked(&mem, &[r(MEM_BYTES - 8, 16), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
    }

    #[test]
    fn missing_unwritable_or_empty_status_gets_no_status_byte() {
        let mem = memory();
        write_header(&mem, HDR, T_FLUSH, 0);
        for chain in [
            &[r(HDR, 16)][..],
            &[r(HDR, 16), r(STATUS, 1)],
            &[r(HDR, 16), w(STATUS, 0)],
            &[r(HDR, 16), w(DATA, 512), w(STATUS, 0)],
            // The status byte (the chain's last byte) outside guest memory, or at an address
            // that overflows.
            &[r(HDR, 16), w(MEM_BYTES, 1)],
            &[r(HDR, 16), w(MEM_BYTES - 1, 2)],
            &[r(HDR, 16), w(u64::MAX, 2)],
        ] {
            let (result, _) = parse_linked(&mem, chain, &LIMITS);
            assert_rejected(result, None, STATUS_IOERR);
        }
    }

    #[test]
    fn readable_descriptor_after_a_writable_one_is_an_ioerr() {
        let mem = memory();
        write_header(&mem, HDR, T_IN, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), w(DATA, 512), r(DATA2, 512), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
        // Even a header-only chain with the header after the status-carrying descriptor.
        let (result, _) = parse_linked(&mem, &[w(DATA, 512), r(HDR, 16), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
    }

    #[test]
    fn data_outside_guest_memory_is_an_ioerr() {
        let mem = memory();
        write_header(&mem, HDR, T_IN, 0);
        for data in [w(MEM_BYTES, 512), w(MEM_BYTES - 256, 512), w(u64::MAX - 255, 512)] {
            let (result, _) = parse_linked(&mem, &[r(HDR, 16), data, w(STATUS, 1)], &LIMITS);
            assert_rejected(result, Some(STATUS), STATUS_IOERR);
        }
        write_header(&mem, HDR, T_OUT, 0);
        for data in [r(MEM_BYTES, 512), r(MEM_BYTES - 256, 512), r(u64::MAX - 255, 512)] {
            let (result, _) = parse_linked(&mem, &[r(HDR, 16), data, w(STATUS, 1)], &LIMITS);
            assert_rejected(result, Some(STATUS), STATUS_IOERR);
        }
        write_header(&mem, HDR, T_GET_ID, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), w(MEM_BYTES - 4, 20), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
        write_header(&mem, HDR, T_DISCARD, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(MEM_BYTES - 8, 16), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
    }

    #[test]
    fn sectors_past_capacity_are_an_ioerr() {
        let mem = memory();
        // The last sector is readable; one more is not.
        write_header(&mem, HDR, T_IN, 1023);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &LIMITS);
        assert_eq!(result.unwrap().offset_bytes, 1023 * 512);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
        for sector in [1024, u64::MAX, u64::MAX - 1, u64::MAX >> 9] {
            write_header(&mem, HDR, T_OUT, sector);
            let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 1024), w(STATUS, 1)], &LIMITS);
            assert_rejected(result, Some(STATUS), STATUS_IOERR);
        }
        for request_type in [T_DISCARD, T_WRITE_ZEROES] {
            write_header(&mem, HDR, request_type, 0);
            for (sector, count) in [(1020, 5), (u64::MAX, 1), (u64::MAX - 3, 8)] {
                write_segment(&mem, DATA, sector, count, 0);
                let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &LIMITS);
                assert_rejected(result, Some(STATUS), STATUS_IOERR);
            }
            write_segment(&mem, DATA, 1020, 4, 0);
            let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &LIMITS);
            assert!(result.is_ok(), "a range ending at the capacity is valid");
        }
    }

    #[test]
    fn modifying_requests_on_a_read_only_volume_are_an_ioerr() {
        let mem = memory();
        write_header(&mem, HDR, T_OUT, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)], &READ_ONLY);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
        for request_type in [T_DISCARD, T_WRITE_ZEROES] {
            write_header(&mem, HDR, request_type, 0);
            write_segment(&mem, DATA, 0, 1, 0);
            let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &READ_ONLY);
            assert_rejected(result, Some(STATUS), STATUS_IOERR);
        }
        write_header(&mem, HDR, T_IN, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &READ_ONLY);
        assert_eq!(result.unwrap().op, Op::Read, "reads stay allowed");
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let mem = memory();
        // 2, 3: legacy SCSI/... types; 10: GET_LIFETIME; 14: SECURE_ERASE; 18: ZONE_APPEND.
        for request_type in [2, 3, 5, 10, 12, 14, 18, u32::MAX] {
            write_header(&mem, HDR, request_type, 0);
            let (result, _) = parse_linked(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &LIMITS);
            assert_rejected(result, Some(STATUS), STATUS_UNSUPP);
        }
    }

    #[test]
    fn discard_flags_and_unknown_write_zeroes_flags_are_unsupported() {
        let mem = memory();
        let chain = [r(HDR, 16), r(DATA, 16), w(STATUS, 1)];
        write_header(&mem, HDR, T_DISCARD, 0);
        for flags in [WRITE_ZEROES_FLAG_UNMAP, 2, u32::MAX] {
            write_segment(&mem, DATA, 0, 1, flags);
            let (result, _) = parse_linked(&mem, &chain, &LIMITS);
            assert_rejected(result, Some(STATUS), STATUS_UNSUPP);
        }
        write_header(&mem, HDR, T_WRITE_ZEROES, 0);
        for flags in [2, 3, 1 << 31] {
            write_segment(&mem, DATA, 0, 1, flags);
            let (result, _) = parse_linked(&mem, &chain, &LIMITS);
            assert_rejected(result, Some(STATUS), STATUS_UNSUPP);
        }
    }

    #[test]
    fn discard_segment_count_and_sector_count_are_bounded() {
        let mem = memory();
        for (request_type, max) in
            [(T_DISCARD, LIMITS.max_discard_sectors), (T_WRITE_ZEROES, LIMITS.max_write_zeroes_sectors)]
        {
            write_header(&mem, HDR, request_type, 0);
            // Two segments (max_discard_seg = max_write_zeroes_seg = 1), half a segment, none.
            write_segment(&mem, DATA, 0, 1, 0);
            write_segment(&mem, DATA + 16, 8, 1, 0);
            for chain in [
                &[r(HDR, 16), r(DATA, 32), w(STATUS, 1)][..],
                &[r(HDR, 16), r(DATA, 16), r(DATA + 16, 16), w(STATUS, 1)],
                &[r(HDR, 16), r(DATA, 8), w(STATUS, 1)],
                &[r(HDR, 16), w(STATUS, 1)],
            ] {
                let (result, _) = parse_linked(&mem, chain, &LIMITS);
                assert_rejected(result, Some(STATUS), STATUS_IOERR);
            }
            let chain = [r(HDR, 16), r(DATA, 16), w(STATUS, 1)];
            for count in [0, max + 1, u32::MAX] {
                write_segment(&mem, DATA, 0, count, 0);
                let (result, _) = parse_linked(&mem, &chain, &LIMITS);
                assert_rejected(result, Some(STATUS), STATUS_IOERR);
            }
            write_segment(&mem, DATA, 0, max, 0);
            let (result, _) = parse_linked(&mem, &chain, &LIMITS);
            assert_eq!(result.unwrap().len_bytes, u64::from(max) * 512);
            // Device-writable data besides the status byte.
            let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 16), w(DATA2, 512), w(STATUS, 1)], &LIMITS);
            assert_rejected(result, Some(STATUS), STATUS_IOERR);
        }
    }

    #[test]
    fn data_length_must_be_a_multiple_of_512() {
        let mem = memory();
        write_header(&mem, HDR, T_IN, 0);
        for len in [1, 511, 513, 4095] {
            let (result, _) = parse_linked(&mem, &[r(HDR, 16), w(DATA, len), w(STATUS, 1)], &LIMITS);
            assert_rejected(result, Some(STATUS), STATUS_IOERR);
        }
        write_header(&mem, HDR, T_OUT, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 100), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
        // Two pieces that add up to a sector are fine.
        let (result, segments) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 100), r(DATA2, 412), w(STATUS, 1)], &LIMITS);
        assert_eq!(result.unwrap().len_bytes, 512);
        assert_eq!(segments, [seg(DATA, 100), seg(DATA2, 412)]);
    }

    #[test]
    fn data_in_the_wrong_direction_is_an_ioerr() {
        let mem = memory();
        write_header(&mem, HDR, T_IN, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 512), w(DATA2, 512), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
        write_header(&mem, HDR, T_OUT, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, 512), w(DATA2, 512), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
    }

    #[test]
    fn more_data_descriptors_than_seg_max_is_an_ioerr() {
        let mem = memory();
        write_header(&mem, HDR, T_OUT, 0);
        let data = |n: u64| (0..n).map(|i| r(DATA + i * 0x1000, 512));
        let chain: Vec<_> = std::iter::once(r(HDR, 16)).chain(data(4)).chain([w(STATUS, 1)]).collect();
        let (result, segments) = parse_linked(&mem, &chain, &LIMITS);
        assert_eq!(result.unwrap().len_bytes, 4 * 512);
        assert_eq!(segments.len(), 4);
        let chain: Vec<_> = std::iter::once(r(HDR, 16)).chain(data(5)).chain([w(STATUS, 1)]).collect();
        let (result, _) = parse_linked(&mem, &chain, &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
    }

    #[test]
    fn data_segments_larger_than_size_max_are_an_ioerr() {
        let mem = memory();
        let max = LIMITS.size_max;
        write_header(&mem, HDR, T_OUT, 0);
        let (result, segments) = parse_linked(&mem, &[r(HDR, 16), r(DATA, max), r(DATA2, max), w(STATUS, 1)], &LIMITS);
        assert_eq!(result.unwrap().len_bytes, 2 * u64::from(max), "size_max bounds each segment, not the request");
        assert_eq!(segments, [seg(DATA, max), seg(DATA2, max)]);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), r(DATA, max + 512), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
        // Header and data in one descriptor: only the data counts.
        let (result, segments) = parse_linked(&mem, &[r(HDR, 16 + max), w(STATUS, 1)], &LIMITS);
        assert_eq!(result.unwrap().len_bytes, u64::from(max));
        assert_eq!(segments, [seg(HDR + 16, max)]);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16 + max + 512), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);

        write_header(&mem, HDR, T_IN, 0);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), w(DATA, max + 512), w(STATUS, 1)], &LIMITS);
        assert_rejected(result, Some(STATUS), STATUS_IOERR);
        // Data and status byte in one descriptor: only the data counts.
        let (result, segments) = parse_linked(&mem, &[r(HDR, 16), w(DATA, max + 1)], &LIMITS);
        assert_eq!(result.unwrap().status, GuestAddress(DATA + u64::from(max)));
        assert_eq!(segments, [seg(DATA, max)]);
        let (result, _) = parse_linked(&mem, &[r(HDR, 16), w(DATA, max + 513)], &LIMITS);
        assert_rejected(result, Some(DATA + u64::from(max) + 512), STATUS_IOERR);
    }

    #[test]
    fn descriptor_loops_get_no_status_byte() {
        let mem = memory();
        write_header(&mem, HDR, T_FLUSH, 0);
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        let desc = |addr, len, flags, next| RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        // 0 -> 1 -> 0 -> ...
        let result = parse_raw(&mem, &[desc(HDR, 16, next, 1), desc(STATUS, 1, write | next, 0)], &LIMITS);
        assert_rejected(result, None, STATUS_IOERR);
        // 0 -> 1 -> 2 -> 1 -> ...
        let result = parse_raw(
            &mem,
            &[desc(HDR, 16, next, 1), desc(DATA, 512, write | next, 2), desc(STATUS, 1, write | next, 1)],
            &LIMITS,
        );
        assert_rejected(result, None, STATUS_IOERR);
        // A descriptor pointing at itself.
        let result = parse_raw(&mem, &[desc(HDR, 16, next, 0)], &LIMITS);
        assert_rejected(result, None, STATUS_IOERR);
        // `next` past the end of the table.
        let result = parse_raw(&mem, &[desc(HDR, 16, next, QUEUE_SIZE), desc(STATUS, 1, write, 0)], &LIMITS);
        assert_rejected(result, None, STATUS_IOERR);
    }

    fn write_indirect_table(mem: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) {
        for (i, desc) in descs.iter().enumerate() {
            let mut d = SplitDescriptor::from(*desc);
            if i + 1 < descs.len() {
                d.set_flags(d.flags() | VRING_DESC_F_NEXT as u16);
                d.set_next(i as u16 + 1);
            }
            mem.write_obj(RawDescriptor::from(d), GuestAddress(INDIRECT + 16 * i as u64)).unwrap();
        }
    }

    fn indirect(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, VRING_DESC_F_INDIRECT as u16, 0))
    }

    #[test]
    fn indirect_descriptors_parse() {
        let mem = memory();
        write_header(&mem, HDR, T_IN, 4);
        write_indirect_table(&mem, &[r(HDR, 16), w(DATA, 2048), w(DATA2, 2048), w(STATUS, 1)]);
        let (result, segments) = parse_linked(&mem, &[indirect(INDIRECT, 4 * 16)], &LIMITS);
        assert_eq!(
            result.unwrap(),
            Request { op: Op::Read, offset_bytes: 4 * 512, len_bytes: 4096, status: GuestAddress(STATUS) }
        );
        assert_eq!(segments, [seg(DATA, 2048), seg(DATA2, 2048)]);
    }

    #[test]
    fn broken_indirect_tables_get_no_status_byte() {
        let mem = memory();
        write_header(&mem, HDR, T_FLUSH, 0);
        write_indirect_table(&mem, &[r(HDR, 16), w(STATUS, 1)]);
        for table in [
            // Not a whole number of descriptors.
            indirect(INDIRECT, 24),
            // Empty.
            indirect(INDIRECT, 0),
            // Outside guest memory.
            indirect(MEM_BYTES, 32),
            indirect(u64::MAX - 15, 32),
        ] {
            let (result, _) = parse_linked(&mem, &[table], &LIMITS);
            assert_rejected(result, None, STATUS_IOERR);
        }
        // An indirect descriptor inside an indirect table.
        write_indirect_table(&mem, &[r(HDR, 16), indirect(INDIRECT, 32)]);
        let (result, _) = parse_linked(&mem, &[indirect(INDIRECT, 32)], &LIMITS);
        assert_rejected(result, None, STATUS_IOERR);
    }

    #[test]
    fn chain_longer_than_the_queue_gets_no_status_byte() {
        let mem = memory();
        write_header(&mem, HDR, T_OUT, 0);
        // An indirect table may hold more descriptors than the queue has; a chain may not.
        let n = u64::from(QUEUE_SIZE) + 1;
        let table: Vec<_> = std::iter::once(r(HDR, 16))
            .chain((0..n - 2).map(|i| r(DATA + 512 * i, 512)))
            .chain([w(STATUS, 1)])
            .collect();
        write_indirect_table(&mem, &table);
        let (result, _) = parse_linked(&mem, &[indirect(INDIRECT, 16 * n as u32)], &Limits { seg_max: 1024, ..LIMITS });
        assert_rejected(result, None, STATUS_IOERR);
    }

    #[test]
    fn scratch_is_cleared_between_requests() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut scratch = Scratch::with_capacity(QUEUE_SIZE as usize);
        write_header(&mem, HDR, T_OUT, 0);
        let chain = queue.build_desc_chain(&[r(HDR, 16), r(DATA, 512), r(DATA2, 512), w(STATUS, 1)]).unwrap();
        parse(chain, &LIMITS, &mut scratch).unwrap();
        assert_eq!(scratch.segments.len(), 2);
        write_header(&mem, HDR + 0x100, T_FLUSH, 0);
        let chain = queue.build_desc_chain(&[r(HDR + 0x100, 16), w(STATUS, 1)]).unwrap();
        assert_eq!(parse(chain, &LIMITS, &mut scratch).unwrap().op, Op::Flush);
        assert!(scratch.segments.is_empty());
    }
}
