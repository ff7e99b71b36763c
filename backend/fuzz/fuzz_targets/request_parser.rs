//! Feeds arbitrary descriptor chains (addresses, lengths, flags, next pointers, indirect
//! tables, header and segment bytes) and arbitrary device limits to `request::parse`.
//!
//! It must never panic, and whatever it accepts must be safe to execute: every data segment
//! inside guest memory, the byte counts adding up, the range inside the volume.
//!
//! ```text
//!  guest memory: three regions, the first two adjacent (buffers may straddle them), then a gap
//!  0x0_0000 ┌ R0 ──────────────────────────────────┐ 0x2_0000 ┌ R1 ────────┐  gap  0x10_0000 ┌ R2 ┐
//!           │ 0x100 desc table | avail | used       │          │            │       │ 4 KiB  │
//!           │ 0x8000 indirect tables, 0x2000 each   │          │            │       │        │
//!           │ 0x1_0000 fuzz bytes ──────────────────┼──────────┼─▶          │       │        │
//! ```
#![no_main]

use arbitrary::Arbitrary;
use backend::request::{self, Limits, Op, Scratch, SECTOR_SIZE};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

const RINGS: u64 = 0x100;
const INDIRECT: u64 = 0x8000;
/// Room for one indirect table per chain, 0x8000..0x1_0000.
const INDIRECT_BYTES: u64 = 0x2000;
const CHAINS_MAX: usize = 4;
const DATA: u64 = 0x1_0000;
const REGIONS: [(u64, usize); 3] = [(0, 0x2_0000), (0x2_0000, 0x1_0000), (0x10_0000, 0x1000)];
const DATA_MAX: usize = 0x2_0000;

#[derive(Arbitrary, Debug)]
enum Addr {
    /// An offset into the fuzz bytes (the common, interesting case).
    Data(u16),
    /// Near the end of a region (buffers that run off it), or into the gaps.
    Edge(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Len {
    /// A request header alone (16 bytes), or a header and one discard segment (32).
    Header,
    HeaderAndSegment,
    Sectors(u8),
    Small(u16),
    Any(u32),
}

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: Addr,
    len: Len,
    write: bool,
    /// Flags and next exactly as given, instead of linked to the following descriptor.
    raw: Option<(u16, u16)>,
}

impl Desc {
    fn addr(&self) -> u64 {
        match self.addr {
            Addr::Data(offset) => DATA + u64::from(offset),
            Addr::Edge(k) => {
                let (start, len) = REGIONS[usize::from(k) % REGIONS.len()];
                (start + len as u64).wrapping_sub(u64::from(k >> 2))
            }
            Addr::Any(a) => a,
        }
    }

    fn len(&self) -> u32 {
        match self.len {
            Len::Header => 16,
            Len::HeaderAndSegment => 32,
            Len::Sectors(n) => u32::from(n) * 512,
            Len::Small(n) => u32::from(n),
            Len::Any(n) => n,
        }
    }

    /// The descriptor at position `i` of a chain of `n`, whose next one is at index `next`.
    fn raw(&self, i: usize, n: usize, next: u16) -> RawDescriptor {
        let (flags, next) = match self.raw {
            Some(given) => given,
            None => {
                let write = if self.write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < n {
                    (write | VRING_DESC_F_NEXT as u16, next)
                } else {
                    (write, 0)
                }
            }
        };
        RawDescriptor::from(SplitDescriptor::new(self.addr(), self.len(), flags, next))
    }
}

#[derive(Arbitrary, Debug)]
struct Chain {
    /// Request type: one of the known ones (index into KNOWN_TYPES) or any value.
    request_type: Result<u8, u32>,
    /// Mostly a small sector (near the start of the volume), sometimes any.
    sector: Result<u16, u64>,
    /// A discard / write-zeroes segment written after the header: (sector, num_sectors, flags).
    segment: Option<(Result<u16, u64>, u32, u32)>,
    descs: Vec<Desc>,
    /// Append a one-byte writable status descriptor at this data offset, as drivers do.
    status: Option<u16>,
    /// Put the descriptors in an indirect table (with this length in bytes, if given).
    indirect: Option<Option<u32>>,
    /// Make this index available instead of the chain's first descriptor.
    head: Option<u16>,
}

const KNOWN_TYPES: [u32; 6] = [0, 1, 4, 8, 11, 13];

#[derive(Arbitrary, Debug)]
struct Input {
    /// Mostly a volume of at most 32 GiB, sometimes any size.
    capacity_sectors: Result<u32, u64>,
    read_only: bool,
    seg_max: u32,
    size_max: u32,
    max_discard_sectors: u32,
    max_write_zeroes_sectors: u32,
    /// Queue size 2^(n % 9): 1 ..= 256.
    queue_size_log2: u8,
    data: Vec<u8>,
    chains: Vec<Chain>,
}

/// Writes `bytes` `skip` bytes into the device-readable part of `descs` (where the parser
/// reads header and segment from), as far as guest memory allows.
fn write_readable(mem: &GuestMemoryMmap<()>, descs: &[Desc], mut skip: u64, mut bytes: &[u8]) {
    for desc in descs.iter().filter(|d| !d.write) {
        let len = u64::from(desc.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = ((len - skip) as usize).min(bytes.len());
        if let Some(at) = desc.addr().checked_add(skip) {
            let _ = mem.write_slice(&bytes[..take], GuestAddress(at));
        }
        bytes = &bytes[take..];
        skip = 0;
        if bytes.is_empty() {
            return;
        }
    }
}

fn either<S: Into<u64>>(value: Result<S, u64>) -> u64 {
    match value {
        Ok(small) => small.into(),
        Err(any) => any,
    }
}

fuzz_target!(|input: Input| {
    let queue_size = 1u16 << (input.queue_size_log2 % 9);
    let ranges: Vec<(GuestAddress, usize)> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&ranges).expect("fixed layout");
    let data = &input.data[..input.data.len().min(DATA_MAX)];
    mem.write_slice(data, GuestAddress(DATA)).expect("fits R0 and R1");

    let mock = MockSplitQueue::create(&mem, GuestAddress(RINGS), queue_size);
    let mut next_index = 0usize;
    let mut published = 0u16;
    for (k, chain) in input.chains.iter().take(CHAINS_MAX).enumerate() {
        let mut header = [0u8; 16];
        let request_type = match chain.request_type {
            Ok(i) => KNOWN_TYPES[usize::from(i) % KNOWN_TYPES.len()],
            Err(any) => any,
        };
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&either(chain.sector).to_le_bytes());
        write_readable(&mem, &chain.descs, 0, &header);
        if let Some((sector, num_sectors, flags)) = chain.segment {
            let mut segment = [0u8; 16];
            segment[0..8].copy_from_slice(&either(sector).to_le_bytes());
            segment[8..12].copy_from_slice(&num_sectors.to_le_bytes());
            segment[12..16].copy_from_slice(&flags.to_le_bytes());
            write_readable(&mem, &chain.descs, 16, &segment);
        }

        let status =
            chain.status.map(|offset| Desc { addr: Addr::Data(offset), len: Len::Small(1), write: true, raw: None });
        let descs: Vec<&Desc> = chain.descs.iter().chain(status.as_ref()).collect();
        let first = next_index as u16;
        match chain.indirect {
            Some(table_len) => {
                if next_index >= usize::from(queue_size) {
                    break;
                }
                let table = INDIRECT + INDIRECT_BYTES * k as u64;
                let descs = &descs[..descs.len().min(INDIRECT_BYTES as usize / 16)];
                for (i, desc) in descs.iter().enumerate() {
                    let raw = desc.raw(i, descs.len(), i as u16 + 1);
                    mem.write_obj(raw, GuestAddress(table + 16 * i as u64)).expect("fits the table area");
                }
                let len = table_len.unwrap_or(16 * descs.len() as u32);
                let head = SplitDescriptor::new(table, len, VRING_DESC_F_INDIRECT as u16, 0);
                mock.desc_table().store(first, RawDescriptor::from(head)).expect("index below the queue size");
                next_index += 1;
            }
            None => {
                let room = usize::from(queue_size) - next_index;
                let descs = &descs[..descs.len().min(room)];
                for (i, desc) in descs.iter().enumerate() {
                    let raw = desc.raw(i, descs.len(), (next_index + i + 1) as u16);
                    mock.desc_table().store((next_index + i) as u16, raw).expect("index below the queue size");
                }
                next_index += descs.len();
            }
        }
        let head = chain.head.unwrap_or(first);
        mock.avail().ring().ref_at(usize::from(published)).expect("fewer chains than the queue size").store(head);
        published += 1;
        if published == queue_size {
            break;
        }
    }
    mock.avail().idx().store(published);
    let mut queue: Queue = mock.create_queue().expect("valid mock queue");

    let limits = Limits {
        capacity_sectors: either(input.capacity_sectors),
        read_only: input.read_only,
        seg_max: input.seg_max,
        size_max: input.size_max,
        max_discard_sectors: input.max_discard_sectors,
        max_write_zeroes_sectors: input.max_write_zeroes_sectors,
    };
    let mut scratch = Scratch::with_capacity(usize::from(queue_size));
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        match request::parse(chain, &limits, &mut scratch) {
            Ok(req) => check_accepted(&mem, &limits, &req, &scratch.segments),
            Err(rejection) => {
                if let Some(status) = rejection.status {
                    assert!(mem.check_range(status, 1, Permissions::Write), "status byte outside memory");
                }
            }
        }
    }
});

/// What the poller relies on when it executes an accepted request.
fn check_accepted(mem: &GuestMemoryMmap<()>, limits: &Limits, req: &request::Request, segments: &[request::Segment]) {
    assert!(mem.check_range(req.status, 1, Permissions::Write), "status byte outside memory");
    let access = if req.op == Op::Read || req.op == Op::GetId { Permissions::Write } else { Permissions::Read };
    let mut total = 0u64;
    for segment in segments {
        assert!(segment.len > 0, "empty segment");
        assert!(mem.check_range(segment.addr, segment.len as usize, access), "segment outside memory");
        total += u64::from(segment.len);
    }
    match req.op {
        Op::Read | Op::Write => {
            assert_eq!(total, req.len_bytes, "segments do not add up to the request");
            assert!(segments.len() <= limits.seg_max as usize, "more segments than seg_max");
            assert!(segments.iter().all(|s| s.len <= limits.size_max), "a segment larger than size_max");
            assert_eq!(req.len_bytes % SECTOR_SIZE, 0, "partial sector");
            assert!(!(req.op == Op::Write && limits.read_only), "write accepted on a read-only volume");
        }
        Op::GetId => {
            assert_eq!(total, req.len_bytes);
            assert!(req.len_bytes <= request::ID_BYTES as u64);
        }
        Op::Flush => assert!(segments.is_empty()),
        Op::Discard | Op::WriteZeroes { .. } => {
            assert!(segments.is_empty());
            assert!(!limits.read_only, "discard/write-zeroes accepted on a read-only volume");
            assert!(req.len_bytes > 0);
        }
    }
    // Byte offsets only make sense for volumes whose size in bytes fits a u64.
    if limits.capacity_sectors < (1 << 54) && req.op != Op::GetId && req.op != Op::Flush {
        let end = req.offset_bytes.checked_add(req.len_bytes).expect("range overflows");
        assert!(end <= limits.capacity_sectors * SECTOR_SIZE, "range past the end of the volume");
    }
}
