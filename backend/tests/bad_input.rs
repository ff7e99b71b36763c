//! A hostile guest against a real export: hand-made descriptor chains that break the virtio-blk
//! rules, sent by `RawFrontend`. After each one the same queue must still serve good I/O, and a
//! second export (its own volume and socket, driven by libblkio) must not notice anything.
//!
//! Every wait has a deadline and each test runs under a watchdog, so a hang fails the test
//! instead of blocking CI.

mod common;

use std::time::Duration;

use backend::{Export, PollMode};
use common::raw_frontend::{
    header, raw, readable, segment, writable, RawFrontend, RawOptions, MEM_BYTES, T_DISCARD, T_FLUSH, T_GET_ID, T_IN,
    T_OUT, T_WRITE_ZEROES,
};
use common::{pattern, Client, Volume};
use replica::{Backing, BackingKind};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 16 * MIB;
const CAPACITY_SECTORS: u64 = VOLUME_BYTES / 512;
/// The device's limits (device.rs): seg_max, size_max and max_discard_sectors /
/// max_write_zeroes_sectors.
const SEG_MAX: u64 = backend::device::SEG_MAX as u64;
const SIZE_MAX: u32 = backend::device::SIZE_MAX;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const WAIT: Duration = Duration::from_secs(10);
const WATCHDOG: Duration = Duration::from_secs(120);

const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;
/// What a status byte holds until the device writes it.
const UNTOUCHED: u8 = 0xa5;

/// Runs `body` under a watchdog of `WATCHDOG`.
fn with_watchdog(body: impl FnOnce() + Send + 'static) {
    common::with_watchdog(WATCHDOG, body);
}

/// One export under attack and one bystander export with its own volume and client.
struct Rig {
    _vol: Volume,
    export: Export<Backing>,
    raw: RawFrontend,
    _other_vol: Volume,
    _other_export: Export<Backing>,
    other: Client,
    read_only: bool,
    /// Contents of the attacked volume (a read-only volume is filled before it is exported).
    image: Vec<u8>,
    checks: u64,
    /// The attacked export's refused-request counter after the last good I/O: every refusal
    /// since must have added exactly one.
    refused: u64,
}

impl Rig {
    fn new(mode: PollMode, read_only: bool, options: RawOptions) -> Self {
        let vol = Volume::new();
        let image = if read_only {
            drop(vol.backing(BackingKind::File, VOLUME_BYTES, 512, false));
            let image = pattern(99, VOLUME_BYTES as usize);
            std::fs::write(&vol.image, &image).expect("fill the image");
            image
        } else {
            vec![0u8; VOLUME_BYTES as usize]
        };
        let export =
            vol.export(vol.backing(BackingKind::File, VOLUME_BYTES, 512, read_only), options.num_queues as u16, mode);
        let mut raw = RawFrontend::connect(&vol.socket, options);
        assert_eq!(raw.capacity_sectors(), CAPACITY_SECTORS);

        let other_vol = Volume::new();
        let other_export =
            other_vol.export(other_vol.backing(BackingKind::File, VOLUME_BYTES, 512, false), 1, PollMode::Adaptive);
        let other = Client::connect(&other_vol.socket, 1, 1 << 20);
        let mut rig = Self {
            _vol: vol,
            export,
            raw,
            _other_vol: other_vol,
            _other_export: other_export,
            other,
            read_only,
            image,
            checks: 0,
            refused: 0,
        };
        rig.check_healthy(0);
        rig
    }

    /// A status byte not yet written by the device.
    fn status(&mut self) -> GuestAddress {
        self.raw.put(&[UNTOUCHED])
    }

    fn header(&mut self, request_type: u32, sector: u64) -> GuestAddress {
        self.raw.put(&header(request_type, sector))
    }

    /// Sends a chain and returns its used length, checking the head that comes back.
    fn send(&mut self, queue: usize, chain: &[RawDescriptor]) -> u32 {
        let head = self.raw.submit_chain(queue, chain);
        let (used, len) = self.raw.wait_used(queue, WAIT);
        assert_eq!(used, head, "queue {queue}: another chain came back");
        len
    }

    /// The chain must complete with `code` in its status byte (and, if refused, a used length
    /// of 1). Returns the used length.
    #[track_caller]
    fn expect_status(&mut self, queue: usize, chain: &[RawDescriptor], status: GuestAddress, code: u8) -> u32 {
        let len = self.send(queue, chain);
        assert_eq!(self.raw.read_status(status), code, "status byte");
        if code != OK {
            assert_eq!(len, 1, "used length of a refused request");
            self.expect_refused(1);
        }
        self.check_healthy(queue);
        len
    }

    /// The chain must come back with used length 0 and no status byte written anywhere.
    #[track_caller]
    fn expect_dropped(&mut self, queue: usize, chain: &[RawDescriptor], untouched: &[GuestAddress]) {
        let len = self.send(queue, chain);
        self.assert_dropped(queue, len, untouched);
    }

    #[track_caller]
    fn assert_dropped(&mut self, queue: usize, len: u32, untouched: &[GuestAddress]) {
        assert_eq!(len, 0, "used length of a malformed chain");
        for &at in untouched {
            assert_eq!(self.raw.read_status(at), UNTOUCHED, "a byte at {:#x} was written", at.0);
        }
        self.expect_refused(1);
        self.check_healthy(queue);
    }

    /// The attacked export counted `more` refusals since the last good I/O.
    #[track_caller]
    fn expect_refused(&mut self, more: u64) {
        assert_eq!(self.export.rejected_requests(), self.refused + more, "refused requests counted");
        self.refused += more;
    }

    /// A good write and read back on `queue` of the attacked export (just a read if it is
    /// read-only), then the same on the bystander export.
    fn check_healthy(&mut self, queue: usize) {
        // Requests refused before this one have all come back: their count is final.
        self.refused = self.export.rejected_requests();
        self.checks += 1;
        let round = self.checks;
        let len = 8192usize;
        let sector = (round * 64) % (CAPACITY_SECTORS - 16);
        let offset = (sector * 512) as usize;
        if !self.read_only {
            let data = pattern(round, len);
            let hdr = self.header(T_OUT, sector);
            let buf = self.raw.put(&data);
            let status = self.status();
            let used = self.send(queue, &[readable(hdr, 16), readable(buf, len as u32), writable(status, 1)]);
            assert_eq!(self.raw.read_status(status), OK, "good write after a bad chain");
            assert_eq!(used, 1);
            self.image[offset..offset + len].copy_from_slice(&data);
        }
        let hdr = self.header(T_IN, sector);
        // One more byte for the status when it shares the data descriptor.
        let buf = self.raw.alloc(len as u64 + 1);
        self.raw.write(buf, &vec![0u8; len]);
        // Data and status byte in separate descriptors, or in one: both are valid layouts.
        let (chain, status) = if round.is_multiple_of(2) {
            let status = self.status();
            (vec![readable(hdr, 16), writable(buf, len as u32), writable(status, 1)], status)
        } else {
            let status = GuestAddress(buf.0 + len as u64);
            self.raw.write(status, &[UNTOUCHED]);
            (vec![readable(hdr, 16), writable(buf, len as u32 + 1)], status)
        };
        let used = self.send(queue, &chain);
        assert_eq!(self.raw.read_status(status), OK, "good read after a bad chain");
        assert_eq!(used, len as u32 + 1);
        assert!(self.raw.read(buf, len) == self.image[offset..offset + len], "read back other data than written");
        assert!(self.export.is_connected(), "the backend dropped the connection");

        let data = pattern(1000 + round, 4096);
        self.other.buf()[..4096].copy_from_slice(&data);
        assert_eq!(self.other.write(0, round * 4096 % VOLUME_BYTES, 0, 4096), 0, "bystander write");
        self.other.buf()[..4096].fill(0);
        assert_eq!(self.other.read(0, round * 4096 % VOLUME_BYTES, 0, 4096), 0, "bystander read");
        assert!(self.other.buf()[..4096] == data[..], "bystander data");
        assert_eq!(self.export.rejected_requests(), self.refused, "good requests counted as refused");
        assert_eq!(self._other_export.rejected_requests(), 0, "the bystander counted refusals");
    }
}

fn adaptive() -> Rig {
    Rig::new(PollMode::Adaptive, false, RawOptions::default())
}

#[test]
fn short_header_gets_ioerr() {
    with_watchdog(|| {
        let mut rig = adaptive();
        let hdr = rig.header(T_IN, 0);
        let data = rig.raw.alloc(512);
        let status = rig.status();
        rig.expect_status(0, &[readable(hdr, 8), writable(status, 1)], status, IOERR);
        let status = rig.status();
        rig.expect_status(0, &[readable(hdr, 15), writable(data, 512), writable(status, 1)], status, IOERR);
        let status = rig.status();
        rig.expect_status(0, &[writable(data, 512), writable(status, 1)], status, IOERR);
        // 16 readable bytes, but not in guest memory.
        let status = rig.status();
        rig.expect_status(0, &[readable(GuestAddress(MEM_BYTES - 8), 16), writable(status, 1)], status, IOERR);
    });
}

#[test]
fn missing_read_only_or_empty_status_gets_no_status_byte() {
    with_watchdog(|| {
        let mut rig = adaptive();
        let hdr = rig.header(T_FLUSH, 0);
        rig.expect_dropped(0, &[readable(hdr, 16)], &[]);
        let status = rig.status();
        rig.expect_dropped(0, &[readable(hdr, 16), readable(status, 1)], &[status]);
        let status = rig.status();
        rig.expect_dropped(0, &[readable(hdr, 16), writable(status, 0)], &[status]);
        // The last byte of the chain outside guest memory.
        rig.expect_dropped(0, &[readable(hdr, 16), writable(GuestAddress(MEM_BYTES), 1)], &[]);
        rig.expect_dropped(0, &[readable(hdr, 16), writable(GuestAddress(u64::MAX), 2)], &[]);
        // A read whose "status" is a read-only descriptor: the data must not be touched either.
        let hdr = rig.header(T_IN, 0);
        let data = rig.raw.alloc(512);
        rig.raw.write(data, &[UNTOUCHED; 512]);
        rig.expect_dropped(0, &[readable(hdr, 16), writable(data, 512), readable(status, 1)], &[status, data]);
    });
}

#[test]
fn readable_after_writable_gets_ioerr() {
    with_watchdog(|| {
        let mut rig = adaptive();
        let hdr = rig.header(T_IN, 0);
        let data = rig.raw.alloc(1024);
        let status = rig.status();
        let chain =
            [readable(hdr, 16), writable(data, 512), readable(GuestAddress(data.0 + 512), 512), writable(status, 1)];
        rig.expect_status(0, &chain, status, IOERR);
    });
}

#[test]
fn data_outside_guest_memory_gets_ioerr() {
    with_watchdog(|| {
        let mut rig = adaptive();
        for (request_type, data) in [
            (T_IN, writable(GuestAddress(MEM_BYTES - 256), 512)),
            (T_IN, writable(GuestAddress(MEM_BYTES), 4096)),
            (T_OUT, readable(GuestAddress(MEM_BYTES), 4096)),
            (T_OUT, readable(GuestAddress(u64::MAX - 511), 512)),
        ] {
            let hdr = rig.header(request_type, 0);
            let status = rig.status();
            rig.expect_status(0, &[readable(hdr, 16), data, writable(status, 1)], status, IOERR);
        }
    });
}

#[test]
fn sectors_past_capacity_get_ioerr() {
    with_watchdog(|| {
        let mut rig = adaptive();
        let data = rig.raw.alloc(1024);
        for (request_type, sector) in [
            (T_IN, CAPACITY_SECTORS - 1),
            (T_IN, CAPACITY_SECTORS),
            (T_OUT, CAPACITY_SECTORS - 1),
            (T_OUT, u64::MAX),
            (T_OUT, u64::MAX - 1),
            (T_IN, u64::MAX >> 9),
        ] {
            let hdr = rig.header(request_type, sector);
            let status = rig.status();
            let data = if request_type == T_IN { writable(data, 1024) } else { readable(data, 1024) };
            rig.expect_status(0, &[readable(hdr, 16), data, writable(status, 1)], status, IOERR);
        }
        // The last sector itself is fine.
        let hdr = rig.header(T_IN, CAPACITY_SECTORS - 1);
        let status = rig.status();
        assert_eq!(
            rig.expect_status(0, &[readable(hdr, 16), writable(data, 512), writable(status, 1)], status, OK),
            513
        );
    });
}

#[test]
fn modifying_a_read_only_volume_gets_ioerr() {
    with_watchdog(|| {
        // The raw frontend takes write access the device never granted (it offers BLK_F_RO).
        let mut rig = Rig::new(PollMode::Adaptive, true, RawOptions::default());
        let data = rig.raw.put(&[0x5a; 4096]);
        let hdr = rig.header(T_OUT, 8);
        let status = rig.status();
        rig.expect_status(0, &[readable(hdr, 16), readable(data, 4096), writable(status, 1)], status, IOERR);
        for request_type in [T_DISCARD, T_WRITE_ZEROES] {
            let hdr = rig.header(request_type, 0);
            let seg = rig.raw.put(&segment(0, 64, 0));
            let status = rig.status();
            rig.expect_status(0, &[readable(hdr, 16), readable(seg, 16), writable(status, 1)], status, IOERR);
        }
        // FLUSH is not a modification.
        let hdr = rig.header(T_FLUSH, 0);
        let status = rig.status();
        assert_eq!(rig.expect_status(0, &[readable(hdr, 16), writable(status, 1)], status, OK), 1);
        drop(rig.raw);
        rig.export.stop();
        assert!(std::fs::read(&rig._vol.image).unwrap() == rig.image, "the read-only image changed");
    });
}

#[test]
fn unknown_request_types_get_unsupp() {
    with_watchdog(|| {
        let mut rig = adaptive();
        for request_type in [2, 3, 10, 14, 18, u32::MAX] {
            let hdr = rig.header(request_type, 0);
            let data = rig.raw.alloc(512);
            let status = rig.status();
            rig.expect_status(0, &[readable(hdr, 16), writable(data, 512), writable(status, 1)], status, UNSUPP);
        }
    });
}

#[test]
fn discard_and_write_zeroes_out_of_range_get_refused() {
    with_watchdog(|| {
        let mut rig = adaptive();
        for request_type in [T_DISCARD, T_WRITE_ZEROES] {
            let mut cases = vec![
                (segment(CAPACITY_SECTORS - 8, 16, 0), IOERR),
                (segment(u64::MAX, 1, 0), IOERR),
                (segment(0, 0, 0), IOERR),
                (segment(0, MAX_DISCARD_SECTORS + 1, 0), IOERR),
                (segment(0, 8, 1 << 7), UNSUPP),
            ];
            if request_type == T_DISCARD {
                // Discard knows no flags; UNMAP is write-zeroes only.
                cases.push((segment(0, 8, 1), UNSUPP));
            }
            for (seg, code) in cases {
                let hdr = rig.header(request_type, 0);
                let seg = rig.raw.put(&seg);
                let status = rig.status();
                rig.expect_status(0, &[readable(hdr, 16), readable(seg, 16), writable(status, 1)], status, code);
            }
            // Two segments: the device advertises max_discard_seg = max_write_zeroes_seg = 1.
            let hdr = rig.header(request_type, 0);
            let mut two = segment(0, 8, 0).to_vec();
            two.extend_from_slice(&segment(64, 8, 0));
            let segs = rig.raw.put(&two);
            let status = rig.status();
            rig.expect_status(0, &[readable(hdr, 16), readable(segs, 32), writable(status, 1)], status, IOERR);
            // In range: done, and zeroes read back.
            let hdr = rig.header(request_type, 0);
            let seg =
                rig.raw.put(&segment(CAPACITY_SECTORS - 16, 16, if request_type == T_WRITE_ZEROES { 1 } else { 0 }));
            let status = rig.status();
            assert_eq!(
                rig.expect_status(0, &[readable(hdr, 16), readable(seg, 16), writable(status, 1)], status, OK),
                1
            );
            let end = rig.image.len();
            rig.image[end - 16 * 512..].fill(0);
        }
    });
}

#[test]
fn more_segments_than_seg_max_gets_ioerr() {
    with_watchdog(|| {
        let mut rig = adaptive();
        for (segments, code) in [(SEG_MAX + 1, IOERR), (SEG_MAX, OK)] {
            let hdr = rig.header(T_OUT, 0);
            let status = rig.status();
            let data = pattern(segments, 512 * segments as usize);
            let mut chain = vec![readable(hdr, 16)];
            for piece in data.chunks(512) {
                chain.push(readable(rig.raw.put(piece), 512));
            }
            chain.push(writable(status, 1));
            assert_eq!(rig.expect_status(0, &chain, status, code), 1);
            if code == OK {
                // The pieces landed in order.
                let hdr = rig.header(T_IN, 0);
                let back = rig.raw.alloc(data.len() as u64);
                let status = rig.status();
                let used = rig.expect_status(
                    0,
                    &[readable(hdr, 16), writable(back, data.len() as u32), writable(status, 1)],
                    status,
                    OK,
                );
                assert_eq!(used as usize, data.len() + 1);
                assert!(rig.raw.read(back, data.len()) == data, "a 126-segment write read back differently");
                rig.image[..data.len()].copy_from_slice(&data);
            }
        }
    });
}

#[test]
fn data_segment_larger_than_size_max_gets_ioerr() {
    with_watchdog(|| {
        let mut rig = adaptive();
        // Advertised: VIRTIO_BLK_F_SIZE_MAX with size_max (config bytes 8..12), then seg_max.
        let offered = rig.raw.offered_features();
        assert_ne!(offered & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_SIZE_MAX), 0, "SIZE_MAX not offered");
        let config = rig.raw.config(8, 8);
        assert_eq!(u32::from_le_bytes(config[0..4].try_into().unwrap()), SIZE_MAX);
        assert_eq!(u64::from(u32::from_le_bytes(config[4..8].try_into().unwrap())), SEG_MAX);

        let data = pattern(77, SIZE_MAX as usize + 512);
        let buf = rig.raw.put(&data);
        // 512 bytes over, in either direction: refused, and a refused read writes nothing.
        for (request_type, desc) in [(T_OUT, readable(buf, SIZE_MAX + 512)), (T_IN, writable(buf, SIZE_MAX + 512))] {
            let hdr = rig.header(request_type, 0);
            let status = rig.status();
            rig.expect_status(0, &[readable(hdr, 16), desc, writable(status, 1)], status, IOERR);
            assert!(rig.raw.read(buf, data.len()) == data, "a refused request touched its buffer");
        }
        // Exactly size_max is served.
        let hdr = rig.header(T_OUT, 0);
        let status = rig.status();
        let used = rig.send(0, &[readable(hdr, 16), readable(buf, SIZE_MAX), writable(status, 1)]);
        assert_eq!((rig.raw.read_status(status), used), (OK, 1));
        rig.image[..SIZE_MAX as usize].copy_from_slice(&data[..SIZE_MAX as usize]);
        let back = rig.raw.alloc(u64::from(SIZE_MAX));
        let hdr = rig.header(T_IN, 0);
        let status = rig.status();
        let used = rig.send(0, &[readable(hdr, 16), writable(back, SIZE_MAX), writable(status, 1)]);
        assert_eq!((rig.raw.read_status(status), used), (OK, SIZE_MAX + 1));
        assert!(rig.raw.read(back, SIZE_MAX as usize) == data[..SIZE_MAX as usize], "size_max read back differently");
        rig.check_healthy(0);
    });
}

/// Writes an indirect table of `descs` (linked in order) and returns it.
fn indirect_table(rig: &mut Rig, descs: &[RawDescriptor]) -> GuestAddress {
    let mut bytes = Vec::with_capacity(16 * descs.len());
    for (i, desc) in descs.iter().enumerate() {
        let d = virtio_queue::desc::split::Descriptor::from(*desc);
        let (flags, next) =
            if i + 1 < descs.len() { (d.flags() | VRING_DESC_F_NEXT as u16, i as u16 + 1) } else { (d.flags(), 0) };
        bytes.extend_from_slice(&d.addr().0.to_le_bytes());
        bytes.extend_from_slice(&d.len().to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&next.to_le_bytes());
    }
    rig.raw.put(&bytes)
}

fn indirect(table: GuestAddress, len: u32) -> RawDescriptor {
    raw(table.0, len, VRING_DESC_F_INDIRECT as u16, 0)
}

#[test]
fn indirect_chains_work_and_bad_tables_get_no_status_byte() {
    with_watchdog(|| {
        let mut rig = adaptive();
        // A good indirect read.
        let hdr = rig.header(T_IN, 0);
        let data = rig.raw.alloc(4096);
        let status = rig.status();
        let table = indirect_table(&mut rig, &[readable(hdr, 16), writable(data, 4096), writable(status, 1)]);
        assert_eq!(rig.expect_status(0, &[indirect(table, 48)], status, OK), 4097);

        let hdr = rig.header(T_FLUSH, 0);
        let status = rig.status();
        let table = indirect_table(&mut rig, &[readable(hdr, 16), writable(status, 1)]);
        // Not a whole number of descriptors, empty, outside guest memory.
        for bad in [
            indirect(table, 24),
            indirect(table, 0),
            indirect(GuestAddress(MEM_BYTES), 32),
            indirect(GuestAddress(u64::MAX - 15), 32),
        ] {
            rig.expect_dropped(0, &[bad], &[status]);
        }
        // An indirect descriptor inside the table.
        let nested = indirect_table(&mut rig, &[readable(hdr, 16), indirect(table, 32)]);
        rig.expect_dropped(0, &[indirect(nested, 32)], &[status]);
        // `next` leaving the table.
        let dangling = indirect_table(&mut rig, &[readable(hdr, 16)]);
        rig.raw.write(GuestAddress(dangling.0 + 12), &(VRING_DESC_F_NEXT as u16).to_le_bytes());
        rig.raw.write(GuestAddress(dangling.0 + 14), &5u16.to_le_bytes());
        rig.expect_dropped(0, &[indirect(dangling, 16)], &[status]);
    });
}

#[test]
fn chain_longer_than_the_queue_gets_no_status_byte() {
    with_watchdog(|| {
        let mut rig = adaptive();
        // Only an indirect table can hold more descriptors than the queue (256) without a loop.
        let hdr = rig.header(T_OUT, 0);
        let status = rig.status();
        let data = rig.raw.alloc(512 * 256);
        let mut descs = vec![readable(hdr, 16)];
        descs.extend((0..256).map(|i| readable(GuestAddress(data.0 + 512 * i), 512)));
        descs.push(writable(status, 1));
        let table = indirect_table(&mut rig, &descs);
        rig.expect_dropped(0, &[indirect(table, 16 * descs.len() as u32)], &[status]);
    });
}

#[test]
fn descriptor_loops_get_no_status_byte() {
    with_watchdog(|| {
        let mut rig = adaptive();
        let hdr = rig.header(T_FLUSH, 0);
        let status = rig.status();
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        // 200 -> 201 -> 200 -> ...
        rig.raw.submit_raw(0, &[(200, raw(hdr.0, 16, next, 201)), (201, raw(status.0, 1, write | next, 200))], 200);
        let (_, len) = rig.raw.wait_used(0, WAIT);
        rig.assert_dropped(0, len, &[status]);
        // A descriptor linked to itself.
        rig.raw.submit_raw(0, &[(7, raw(hdr.0, 16, next, 7))], 7);
        let (_, len) = rig.raw.wait_used(0, WAIT);
        rig.assert_dropped(0, len, &[status]);
        // `next` past the end of the table.
        rig.raw.submit_raw(0, &[(3, raw(hdr.0, 16, next, 4000))], 3);
        let (_, len) = rig.raw.wait_used(0, WAIT);
        rig.assert_dropped(0, len, &[status]);
    });
}

#[test]
fn head_index_outside_the_queue_is_ignored() {
    with_watchdog(|| {
        let mut rig = adaptive();
        for head in [256, 4096, u16::MAX] {
            rig.raw.publish_untracked(0, head);
            rig.raw.expect_no_used(0, Duration::from_millis(50));
            // Nothing comes back to wait for: wait for the count.
            let deadline = std::time::Instant::now() + WAIT;
            while rig.export.rejected_requests() == rig.refused && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            rig.expect_refused(1);
            rig.check_healthy(0);
        }
    });
}

#[test]
fn get_id_returns_the_serial() {
    with_watchdog(|| {
        let mut rig = adaptive();
        let serial = b"hcblk-test-serial\0\0\0";
        for (buffer, expected) in [(20usize, 20usize), (64, 20), (8, 8)] {
            let hdr = rig.header(T_GET_ID, 0);
            let id = rig.raw.put(&vec![UNTOUCHED; buffer]);
            let status = rig.status();
            let used = rig.send(0, &[readable(hdr, 16), writable(id, buffer as u32), writable(status, 1)]);
            assert_eq!(rig.raw.read_status(status), OK);
            assert_eq!(used as usize, expected + 1, "used length: id bytes and the status byte");
            let back = rig.raw.read(id, buffer);
            assert_eq!(&back[..expected], &serial[..expected]);
            assert!(back[expected..].iter().all(|&b| b == UNTOUCHED), "bytes past the id were written");
            rig.check_healthy(0);
        }
        // GET_ID with device-readable data is malformed.
        let hdr = rig.header(T_GET_ID, 0);
        let junk = rig.raw.alloc(20);
        let status = rig.status();
        rig.expect_status(0, &[readable(hdr, 16), readable(junk, 20), writable(status, 1)], status, IOERR);
    });
}

/// Every kind of bad chain in a row, on one queue of a two-queue device, with the poller
/// spinning and event-index interrupt suppression negotiated.
#[test]
fn always_polling_with_event_idx_survives_every_bad_chain() {
    with_watchdog(|| {
        let options = RawOptions { num_queues: 2, event_idx: true, ..RawOptions::default() };
        let mut rig = Rig::new(PollMode::Always, false, options);
        for queue in [1, 0] {
            let hdr = rig.header(T_IN, 0);
            let status = rig.status();
            rig.expect_status(queue, &[readable(hdr, 8), writable(status, 1)], status, IOERR);
            let status = rig.status();
            rig.expect_dropped(queue, &[readable(hdr, 16), readable(status, 1)], &[status]);
            let data = rig.raw.alloc(4096);
            let status = rig.status();
            rig.expect_status(queue, &[readable(hdr, 16), writable(data, 100), writable(status, 1)], status, IOERR);
            let far = rig.header(T_IN, CAPACITY_SECTORS);
            let status = rig.status();
            rig.expect_status(queue, &[readable(far, 16), writable(data, 512), writable(status, 1)], status, IOERR);
            let odd = rig.header(12, 0);
            let status = rig.status();
            rig.expect_status(queue, &[readable(odd, 16), writable(status, 1)], status, UNSUPP);
            let status = rig.status();
            let table = indirect_table(&mut rig, &[readable(hdr, 16), writable(status, 1)]);
            rig.expect_dropped(queue, &[indirect(table, 20)], &[status]);
            let next = VRING_DESC_F_NEXT as u16;
            rig.raw.submit_raw(
                queue,
                &[(9, raw(hdr.0, 16, next, 10)), (10, raw(status.0, 1, next | VRING_DESC_F_WRITE as u16, 9))],
                9,
            );
            let (_, len) = rig.raw.wait_used(queue, WAIT);
            rig.assert_dropped(queue, len, &[status]);
        }
        // The guest asked (through used_event) to hear of every completion.
        rig.raw.wait_calls(0, 1, WAIT);
        rig.raw.wait_calls(1, 1, WAIT);
    });
}

/// Bad and good chains queued together, more than the ring holds over time, so the rings wrap;
/// every good one must come back OK with its data, every bad one refused.
#[test]
fn bursts_of_mixed_chains_keep_good_ones_working() {
    with_watchdog(|| {
        let mut rig = Rig::new(PollMode::Never, false, RawOptions::default());
        for burst in 0..12u64 {
            let mut expected = std::collections::HashMap::new();
            for i in 0..32u64 {
                let n = burst * 32 + i;
                let status = rig.status();
                let (chain, code) = match n % 4 {
                    0 => {
                        let hdr = rig.header(T_OUT, n * 8);
                        let data = rig.raw.put(&pattern(n, 4096));
                        (vec![readable(hdr, 16), readable(data, 4096), writable(status, 1)], Some(OK))
                    }
                    1 => {
                        let hdr = rig.header(T_OUT, CAPACITY_SECTORS - 1);
                        let data = rig.raw.alloc(4096);
                        (vec![readable(hdr, 16), readable(data, 4096), writable(status, 1)], Some(IOERR))
                    }
                    2 => {
                        let hdr = rig.header(T_DISCARD, 0);
                        let seg = rig.raw.put(&segment(0, 8, 3));
                        (vec![readable(hdr, 16), readable(seg, 16), writable(status, 1)], Some(UNSUPP))
                    }
                    _ => {
                        let hdr = rig.header(T_FLUSH, 0);
                        (vec![readable(hdr, 16), readable(status, 1)], None)
                    }
                };
                let head = rig.raw.submit_chain(0, &chain);
                expected.insert(head, (status, code, n));
            }
            while !expected.is_empty() {
                let (head, len) = rig.raw.wait_used(0, WAIT);
                let (status, code, n) = expected.remove(&head).expect("a head we submitted");
                match code {
                    Some(code) => {
                        assert_eq!(rig.raw.read_status(status), code, "chain {n}");
                        assert_eq!(len, 1, "chain {n}");
                    }
                    None => {
                        assert_eq!(rig.raw.read_status(status), UNTOUCHED, "chain {n}");
                        assert_eq!(len, 0, "chain {n}");
                    }
                }
                if code == Some(OK) {
                    let at = (n * 8 * 512) as usize;
                    rig.image[at..at + 4096].copy_from_slice(&pattern(n, 4096));
                }
            }
            rig.check_healthy(0);
        }
        // Everything written by the good chains (and not overwritten since by a health check)
        // is on the volume.
        for n in (0..12 * 32u64).step_by(4) {
            let hdr = rig.header(T_IN, n * 8);
            let back = rig.raw.alloc(4096);
            let status = rig.status();
            let used = rig.send(0, &[readable(hdr, 16), writable(back, 4096), writable(status, 1)]);
            assert_eq!((rig.raw.read_status(status), used), (OK, 4097));
            let at = (n * 8 * 512) as usize;
            assert!(rig.raw.read(back, 4096) == rig.image[at..at + 4096], "chain {n}'s data");
        }
    });
}
