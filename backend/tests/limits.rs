//! The request-size limits at their edges, through a real export and a hand-driven frontend:
//! the largest request a guest may send (`seg_max` segments of `size_max` bytes), and guest
//! buffers that straddle many memory regions (each piece one iovec).

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use backend::device::{SEG_MAX, SIZE_MAX};
use backend::PollMode;
use common::raw_frontend::{header, readable, writable, RawFrontend, RawOptions, DATA_START, T_IN, T_OUT};
use common::{fill_pattern, Volume};
use replica::BackingKind;
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(120);
const WATCHDOG: Duration = Duration::from_secs(600);
const OK: u8 = 0;
const IOERR: u8 = 1;
const UNTOUCHED: u8 = 0xa5;

/// Sends `chain` on queue 0 and returns (status byte, used length).
fn send(raw: &mut RawFrontend, chain: &[virtio_queue::desc::RawDescriptor], status: GuestAddress) -> (u8, u32) {
    let head = raw.submit_chain(0, chain);
    let (used, len) = raw.wait_used(0, WAIT);
    assert_eq!(used, head, "another chain came back");
    (raw.read_status(status), len)
}

fn status_byte(raw: &mut RawFrontend) -> GuestAddress {
    raw.put(&[UNTOUCHED])
}

/// 126 segments of 4 MiB in one chain, 504 MiB, written and read back on a sparse file, byte
/// for byte. The segments are listed out of memory order, so a piece that landed in the wrong
/// place would show.
#[test]
fn largest_request_a_guest_may_send() {
    common::with_watchdog(WATCHDOG, || {
        let segment = u64::from(SIZE_MAX);
        let segments = u64::from(SEG_MAX);
        let total = segment * segments;
        let vol = Volume::new();
        let volume_bytes = 1 << 30;
        let backing = vol.backing(BackingKind::File, volume_bytes, 512, false);
        let allocated = std::fs::metadata(&vol.image).unwrap().blocks() * 512;
        assert!(allocated < MIB, "the image should start sparse ({allocated} bytes allocated)");
        let export = vol.export(backing, 1, PollMode::Adaptive);
        let options = RawOptions { mem_bytes: DATA_START + total + MIB, ..RawOptions::default() };
        let mut raw = RawFrontend::connect(&vol.socket, options);

        // The buffer first, so that it is page aligned and goes straight to io_uring.
        let buf = raw.alloc(total);
        assert_eq!(buf.0 % 4096, 0);
        let mut data = vec![0u8; total as usize];
        fill_pattern(504, &mut data);
        raw.write(buf, &data);
        // Piece k of the request is buffer piece (k * 5) mod 126 (5 and 126 are coprime).
        let piece = |k: u64| GuestAddress(buf.0 + (k * 5 % segments) * segment);
        let offset = 100 * MIB;

        let hdr = raw.put(&header(T_OUT, offset / 512));
        let status = status_byte(&mut raw);
        let mut chain = vec![readable(hdr, 16)];
        chain.extend((0..segments).map(|k| readable(piece(k), SIZE_MAX)));
        chain.push(writable(status, 1));
        assert_eq!(chain.len(), SEG_MAX as usize + 2);
        assert_eq!(send(&mut raw, &chain, status), (OK, 1), "504 MiB write");

        // On disk, in request order.
        let file = std::fs::File::open(&vol.image).unwrap();
        let mut on_disk = vec![0u8; segment as usize];
        for k in 0..segments {
            file.read_exact_at(&mut on_disk, offset + k * segment).unwrap();
            let from = ((k * 5 % segments) * segment) as usize;
            assert!(
                on_disk == data[from..from + segment as usize],
                "disk piece {k} is not buffer piece {}",
                k * 5 % segments
            );
        }
        let allocated = std::fs::metadata(&vol.image).unwrap().blocks() * 512;
        assert!(allocated < volume_bytes, "only the written range is allocated ({allocated} bytes)");

        // Read it back into the zeroed buffer, pieces in the same scattered order.
        let zeroes = vec![0u8; segment as usize];
        for k in 0..segments {
            raw.write(GuestAddress(buf.0 + k * segment), &zeroes);
        }
        let hdr = raw.put(&header(T_IN, offset / 512));
        let status = status_byte(&mut raw);
        let mut chain = vec![readable(hdr, 16)];
        chain.extend((0..segments).map(|k| writable(piece(k), SIZE_MAX)));
        chain.push(writable(status, 1));
        assert_eq!(send(&mut raw, &chain, status), (OK, total as u32 + 1), "504 MiB read");
        assert!(raw.read(buf, total as usize) == data, "the 504 MiB read differs from what was written");

        drop(raw);
        export.stop();
    });
}

/// Guest memory cut into nine 4 KiB regions at `SMALL`, between two large ones: a segment
/// over them is one iovec per region.
const SMALL: u64 = DATA_START + 4 * MIB;
const SMALL_REGIONS: u64 = 9;
const PAGE: u64 = 4096;

/// On a file (io_uring, which takes at most 1024 iovecs per request) and in ram (copied by the
/// shard, no kernel limit: only the poller's bound refuses).
#[test]
fn buffers_straddling_memory_regions() {
    common::with_watchdog(WATCHDOG, || {
        for kind in [BackingKind::File, BackingKind::Ram] {
            straddle(kind);
        }
    });
}

fn straddle(kind: BackingKind) {
    let vol = Volume::new();
    let export = vol.export(vol.backing(kind, 64 * MIB, 512, false), 1, PollMode::Adaptive);
    let cuts: Vec<u64> = (0..=SMALL_REGIONS).map(|i| SMALL + i * PAGE).collect();
    let mut raw = RawFrontend::connect(&vol.socket, RawOptions { region_cuts: cuts, ..RawOptions::default() });
    // Allocations start at DATA_START and stay below SMALL here (they take well under 4 MiB).
    let eight = 8 * PAGE;
    let mut pattern = vec![0u8; eight as usize];
    fill_pattern(8, &mut pattern);
    raw.write(GuestAddress(SMALL), &pattern);

    // Every segment the same 32 KiB over 8 regions: 126 × 8 = 1008 iovecs, the most the
    // poller takes (slots grow from 2 per segment to fit).
    let hdr = raw.put(&header(T_OUT, 0));
    let status = status_byte(&mut raw);
    let mut chain = vec![readable(hdr, 16)];
    chain.extend((0..SEG_MAX).map(|_| readable(GuestAddress(SMALL), eight as u32)));
    chain.push(writable(status, 1));
    assert_eq!(send(&mut raw, &chain, status), (OK, 1), "{kind:?}: 1008 iovecs");
    let copies = u64::from(SEG_MAX) * eight;
    let back = raw.alloc(copies);
    assert!(back.0 + copies <= SMALL);
    let hdr = raw.put(&header(T_IN, 0));
    let status = status_byte(&mut raw);
    let chain = [readable(hdr, 16), writable(back, copies as u32), writable(status, 1)];
    assert_eq!(send(&mut raw, &chain, status), (OK, copies as u32 + 1));
    let got = raw.read(back, copies as usize);
    for (i, copy) in got.chunks(eight as usize).enumerate() {
        assert!(copy == pattern, "copy {i} of the 8-region segment differs");
    }

    // One segment from the large region below, over all nine small ones, into the large
    // region above: 11 pieces, read in place.
    let span = GuestAddress(SMALL - PAGE);
    let len = (SMALL_REGIONS + 2) * PAGE;
    raw.write(span, &vec![0u8; len as usize]);
    let hdr = raw.put(&header(T_IN, 0));
    let status = status_byte(&mut raw);
    let chain = [readable(hdr, 16), writable(span, len as u32), writable(status, 1)];
    assert_eq!(send(&mut raw, &chain, status), (OK, len as u32 + 1));
    assert!(raw.read(span, len as usize) == got[..len as usize], "a read over 11 regions differs");

    // Every segment over all nine: 1134 iovecs, more than one submission carries. Refused,
    // and nothing written.
    let mut other = vec![0u8; (SMALL_REGIONS * PAGE) as usize];
    fill_pattern(9, &mut other);
    raw.write(GuestAddress(SMALL), &other);
    let hdr = raw.put(&header(T_OUT, 0));
    let status = status_byte(&mut raw);
    let mut chain = vec![readable(hdr, 16)];
    chain.extend((0..SEG_MAX).map(|_| readable(GuestAddress(SMALL), (SMALL_REGIONS * PAGE) as u32)));
    chain.push(writable(status, 1));
    assert_eq!(send(&mut raw, &chain, status), (IOERR, 1), "{kind:?}: 1134 iovecs");
    let hdr = raw.put(&header(T_IN, 0));
    let status = status_byte(&mut raw);
    let chain = [readable(hdr, 16), writable(back, copies as u32), writable(status, 1)];
    assert_eq!(send(&mut raw, &chain, status), (OK, copies as u32 + 1));
    assert!(raw.read(back, copies as usize) == got, "a refused write changed the volume");
    assert!(status.0 < SMALL, "the test's own buffers ran into the small regions");
    drop(raw);
    export.stop();
}
