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
//!           │ 0x8000 indirect table                 │          │            │       │        │
//!           │ 0x1_0000 fuzz bytes ──────────────────┼──────────┼─▶          │       │        │
//! ```
#![no_main]

use arbitrary::Arbitrary;
use backend::request::{self, Limits, Op, Scratch, SECTOR_SIZE};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

const RINGS: u64 = 0x100;
const INDIRECT: u64 = 0x8000;
const DATA: u64 = 0x1_0000;
const REGIONS: [(u64, usize); 3] = [(0, 0x2_0000), (0x2_0000, 0x1_0000), (0x10_0000, 0x1000)];
/// Most descriptors an indirect table written by the fuzzer holds (more may be claimed).
const INDIRECT_MAX: usize = 512;
const DATA_MAX: usize = 0x2_0000;

#[derive(Arbitrary, Debug)]
enum Addr {
    /// An offset into the fuzz bytes (the common, interesting case).
    Data(u16),
    /// Right past the end of a region, or somewhere in R2.
    Edge(u8),
    Indirect,
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: Addr,
    len: u32,
    /// Lengths are mostly small; `len` is taken whole only when this is set.
    big: bool,
    flags: u16,
    next: u16,
}

impl Desc {
    fn raw(&self) -> RawDescriptor {
        let addr = match self.addr {
            Addr::Data(offset) => DATA + u64::from(offset),
            Addr::Edge(k) => {
                let (start, len) = REGIONS[usize::from(k) % REGIONS.len()];
                (start + len as u64).wrapping_sub(u64::from(k >> 2))
            }
            Addr::Indirect => INDIRECT,
            Addr::Any(a) => a,
        };
        let len = if self.big { self.len } else { self.len % 0x4000 };
        // Mostly the three meaningful flags (NEXT, WRITE, INDIRECT); any bits now and then.
        let flags = if self.flags & 0x8000 != 0 { self.flags } else { self.flags & 0x7 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, self.next))
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    capacity_sectors: u64,
    read_only: bool,
    seg_max: u32,
    max_discard_sectors: u32,
    max_write_zeroes_sectors: u32,
    /// Queue size 2^(n % 9): 1 ..= 256.
    queue_size_log2: u8,
    /// Heads made available, parsed in order with one `Scratch`.
    heads: Vec<u16>,
    table: Vec<Desc>,
    indirect: Vec<Desc>,
    data: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let queue_size = 1u16 << (input.queue_size_log2 % 9);
    let ranges: Vec<(GuestAddress, usize)> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&ranges).expect("fixed layout");

    let data = &input.data[..input.data.len().min(DATA_MAX)];
    mem.write_slice(data, GuestAddress(DATA)).expect("fits R0 and R1");
    for (i, desc) in input.indirect.iter().take(INDIRECT_MAX).enumerate() {
        mem.write_obj(desc.raw(), GuestAddress(INDIRECT + 16 * i as u64)).expect("fits R0");
    }

    let mock = MockSplitQueue::create(&mem, GuestAddress(RINGS), queue_size);
    for (i, desc) in input.table.iter().take(usize::from(queue_size)).enumerate() {
        mock.desc_table().store(i as u16, desc.raw()).expect("index below the queue size");
    }
    let heads = &input.heads[..input.heads.len().min(usize::from(queue_size)).min(4)];
    for (i, &head) in heads.iter().enumerate() {
        mock.avail().ring().ref_at(i).expect("below the queue size").store(head);
    }
    mock.avail().idx().store(heads.len() as u16);
    let mut queue: Queue = mock.create_queue().expect("valid mock queue");

    let limits = Limits {
        capacity_sectors: input.capacity_sectors,
        read_only: input.read_only,
        seg_max: input.seg_max,
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
