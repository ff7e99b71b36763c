//! Guest memory tables that do not fit the files behind them.
//!
//! mmap() maps a region longer than its file without complaint, and the first access to a page
//! past the end of the file raises SIGBUS, which kills the daemon and every volume it serves.
//! Each region of SET_MEM_TABLE and ADD_MEM_REG is therefore checked against its file
//! descriptor before it is mapped (memfd, tmpfs, hugetlbfs); one that does not fit is refused,
//! the connection is closed, and the export serves the next frontend (and a bystander export
//! never notices).

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use backend::{Export, PollMode};
use common::raw_frontend::{
    handshake, header, memfd, memfd_with, readable, writable, RawFrontend, RawOptions, T_IN, T_OUT,
};
use common::{pattern, Client, Volume};
use replica::{Backing, BackingKind};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 16 * MIB;
const WAIT: Duration = Duration::from_secs(10);
const WATCHDOG: Duration = Duration::from_secs(120);
/// A user address for the table; the backend only uses it to translate ring addresses.
const USER_ADDR: u64 = 0x7f00_0000_0000;

struct Rig {
    vol: Volume,
    _export: Export<Backing>,
    _other_vol: Volume,
    _other_export: Export<Backing>,
    other: Client,
}

impl Rig {
    fn new() -> Self {
        let vol = Volume::new();
        let export = vol.export(vol.backing(BackingKind::File, VOLUME_BYTES, 512, false), 1, PollMode::Adaptive);
        let other_vol = Volume::new();
        let other_export =
            other_vol.export(other_vol.backing(BackingKind::File, VOLUME_BYTES, 512, false), 1, PollMode::Adaptive);
        let other = Client::connect(&other_vol.socket, 1, 1 << 20);
        Self { vol, _export: export, _other_vol: other_vol, _other_export: other_export, other }
    }

    /// A frontend negotiated up to the memory table, with CONFIGURE_MEM_SLOTS (ADD_MEM_REG).
    fn frontend(&self) -> Frontend {
        handshake(&self.vol.socket, &RawOptions::default(), VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
            .unwrap_or_else(|e| panic!("{e}"))
            .0
    }

    /// The export serves a good frontend (write, read back), and the bystander its client.
    fn both_serve(&mut self, seed: u64) {
        let mut raw = RawFrontend::connect(&self.vol.socket, RawOptions::default());
        let data = pattern(seed, 4096);
        let buf = raw.put(&data);
        let hdr = raw.put(&header(T_OUT, 8));
        let status = raw.put(&[0xa5]);
        let head = raw.submit_chain(0, &[readable(hdr, 16), readable(buf, 4096), writable(status, 1)]);
        assert_eq!(raw.wait_used(0, WAIT), (head, 1));
        assert_eq!(raw.read_status(status), 0);
        let back = raw.alloc(4096);
        let hdr = raw.put(&header(T_IN, 8));
        let status = raw.put(&[0xa5]);
        raw.submit_chain(0, &[readable(hdr, 16), writable(back, 4096), writable(status, 1)]);
        assert_eq!(raw.wait_used(0, WAIT).1, 4097);
        assert!(raw.read(back, 4096) == data);
        drop(raw);
        self.other.buf()[..4096].copy_from_slice(&data);
        assert_eq!(self.other.write(0, 0, 0, 4096), 0);
        assert_eq!(self.other.read(0, 0, 4096, 4096), 0);
        assert!(self.other.buf()[4096..8192] == data[..]);
    }
}

fn region(file: &File, guest_phys_addr: u64, memory_size: u64, mmap_offset: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr,
        memory_size,
        userspace_addr: USER_ADDR + guest_phys_addr,
        mmap_offset,
        mmap_handle: file.as_raw_fd(),
    }
}

/// The connection is closed: the next message fails.
#[track_caller]
fn assert_closed(frontend: &mut Frontend) {
    let deadline = Instant::now() + WAIT;
    while frontend.get_features().is_ok() {
        assert!(Instant::now() < deadline, "the backend kept the connection open");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A file on tmpfs (/dev/shm), removed once opened.
fn tmpfs_file(len: u64) -> File {
    let path = std::path::Path::new("/dev/shm").join(format!("hcblk-memtable-{}-{len}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("a file on /dev/shm");
    std::fs::remove_file(&path).expect("unlink it");
    file.set_len(len).expect("size it");
    file
}

#[test]
fn memory_regions_longer_than_their_files_are_refused_without_sigbus() {
    common::with_watchdog(WATCHDOG, || {
        let mut rig = Rig::new();
        rig.both_serve(1);
        const HUGE: u64 = 2 * MIB;
        let short_memfd = memfd(MIB);
        let tmpfs = tmpfs_file(MIB);
        let hugetlb = memfd_with(HUGE, libc::MFD_HUGETLB);
        let two_mib = memfd(2 * MIB);
        // (what, table): every table has one region that does not fit its file.
        let tables: Vec<(&str, Vec<VhostUserMemoryRegionInfo>)> = vec![
            ("memfd shorter than the region", vec![region(&short_memfd, 0, 2 * MIB, 0)]),
            ("region past the end of its memfd by its offset", vec![region(&two_mib, 0, 2 * MIB, 4096)]),
            ("tmpfs file shorter than the region", vec![region(&tmpfs, 0, 2 * MIB, 0)]),
            ("hugetlbfs memfd shorter than the region", vec![region(&hugetlb, 0, 2 * HUGE, 0)]),
            (
                "second region of a table too long",
                vec![region(&two_mib, 0, 2 * MIB, 0), region(&short_memfd, 4 * MIB, 2 * MIB, 0)],
            ),
            ("offset + size overflowing", vec![region(&two_mib, 0, 2 * MIB, u64::MAX - 4095)]),
        ];
        for (what, table) in &tables {
            let mut frontend = rig.frontend();
            assert!(frontend.set_mem_table(table).is_err(), "SET_MEM_TABLE with a {what}: accepted");
            assert_closed(&mut frontend);
        }
        // Not a regular file: nothing to check a size against.
        let dev_zero = File::open("/dev/zero").unwrap();
        let mut frontend = rig.frontend();
        assert!(frontend.set_mem_table(&[region(&dev_zero, 0, MIB, 0)]).is_err(), "a character device: accepted");
        assert_closed(&mut frontend);

        // ADD_MEM_REG: a good first region, then one that does not fit.
        for (what, bad) in [
            ("short memfd", region(&short_memfd, 4 * MIB, 2 * MIB, 0)),
            ("short hugetlbfs memfd", region(&hugetlb, 4 * MIB, 2 * HUGE, 0)),
        ] {
            let mut frontend = rig.frontend();
            frontend.add_mem_region(&region(&two_mib, 0, 2 * MIB, 0)).expect("a region that fits");
            assert!(frontend.add_mem_region(&bad).is_err(), "ADD_MEM_REG with a {what}: accepted");
            assert_closed(&mut frontend);
        }

        // Regions that fit exactly are accepted, on every kind of file.
        let frontend = rig.frontend();
        frontend
            .set_mem_table(&[
                region(&two_mib, 0, MIB, MIB),
                region(&short_memfd, 2 * MIB, MIB, 0),
                region(&tmpfs, 4 * MIB, MIB, 0),
                region(&hugetlb, 6 * MIB, HUGE, 0),
            ])
            .expect("a table that fits its files");
        drop(frontend);
        rig.both_serve(2);
    });
}
