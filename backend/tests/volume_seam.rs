//! The export over a volume that is not the local shard: a test volume that wraps a backing and
//! records what the device tells it. The device must take its geometry from the volume, serve
//! requests through the volume's queues, and hand it every guest memory table and the end of
//! every connection.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backend::{GuestMem, PollMode};
use common::raw_frontend::{header, readable, writable, RawFrontend, RawOptions, DATA_START, T_IN, T_OUT};
use common::{pattern, Client, Volume};
use replica::{Backing, BackingKind, ShardQueue};
use vm_memory::{GuestAddress, GuestMemoryBackend};

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);
const WATCHDOG: Duration = Duration::from_secs(120);

/// What the device told the volume about guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// A memory table with this many regions.
    Table(usize),
    Gone,
}

/// A volume served by a backing, with its own physical block size, that records the memory
/// tables it is given.
struct Recording {
    backing: Arc<Backing>,
    physical_block_bytes: u32,
    seen: Mutex<Vec<Seen>>,
    grown: Mutex<Vec<u64>>,
}

impl Recording {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until the recorded history is `want`.
    #[track_caller]
    fn wait_seen(&self, want: &[Seen]) {
        let deadline = Instant::now() + WAIT;
        while self.seen() != want {
            assert!(Instant::now() < deadline, "volume saw {:?}, expected {want:?}", self.seen());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl backend::Volume for Recording {
    type Queue = ShardQueue;

    fn capacity_bytes(&self) -> u64 {
        self.backing.capacity_bytes()
    }

    fn block_size(&self) -> u32 {
        self.backing.block_size()
    }

    fn read_only(&self) -> bool {
        self.backing.read_only()
    }

    fn physical_block_bytes(&self) -> u32 {
        self.physical_block_bytes
    }

    fn new_queue(self: &Arc<Self>, depth: u32) -> Result<ShardQueue, backend::Error> {
        backend::Volume::new_queue(&self.backing, depth)
    }

    fn grow(&self, new_size_bytes: u64) -> Result<(), backend::Error> {
        self.grown.lock().unwrap().push(new_size_bytes);
        backend::Volume::grow(&*self.backing, new_size_bytes)
    }

    fn guest_memory_changed(&self, mem: Option<&Arc<GuestMem>>) -> Result<(), backend::Error> {
        self.seen.lock().unwrap().push(mem.map_or(Seen::Gone, |m| Seen::Table(m.num_regions())));
        Ok(())
    }
}

#[test]
fn a_volume_other_than_the_shard_sees_geometry_io_and_memory_tables() {
    common::with_watchdog(WATCHDOG, || {
        let vol = Volume::new();
        let volume = Arc::new(Recording {
            backing: vol.backing(BackingKind::File, 16 * MIB, 512, false),
            physical_block_bytes: 16384,
            seen: Mutex::new(Vec::new()),
            grown: Mutex::new(Vec::new()),
        });
        let export = vol.export(Arc::clone(&volume), 1, PollMode::Adaptive);
        assert!(volume.seen().is_empty(), "no frontend, no memory table");

        // A frontend with three regions: the volume gets the table once it is set.
        let cuts = vec![DATA_START + MIB, DATA_START + 2 * MIB];
        let mut raw = RawFrontend::connect(&vol.socket, RawOptions { region_cuts: cuts, ..RawOptions::default() });
        volume.wait_seen(&[Seen::Table(3)]);
        // Geometry from the volume: 16 KiB physical blocks over 512-byte logical ones.
        assert_eq!(raw.capacity_sectors(), 16 * MIB / 512);
        let topology = raw.config(20, 6);
        assert_eq!(u32::from_le_bytes(topology[0..4].try_into().unwrap()), 512, "blk_size");
        assert_eq!(topology[4], 5, "physical_block_exp: 2^5 logical blocks per physical block");

        // I/O through the volume's queue, with a buffer across the region cut.
        let data = pattern(3, 64 << 10);
        let buf = GuestAddress(DATA_START + MIB - 32 * 1024);
        raw.write(buf, &data);
        let hdr = raw.put(&header(T_OUT, 2048));
        let status = raw.put(&[0xa5]);
        raw.submit_chain(0, &[readable(hdr, 16), readable(buf, data.len() as u32), writable(status, 1)]);
        assert_eq!(raw.wait_used(0, WAIT).1, 1);
        assert_eq!(raw.read_status(status), 0);
        let back = GuestAddress(DATA_START + 2 * MIB + 4096);
        let hdr = raw.put(&header(T_IN, 2048));
        let status = raw.put(&[0xa5]);
        raw.submit_chain(0, &[readable(hdr, 16), writable(back, data.len() as u32), writable(status, 1)]);
        assert_eq!(raw.wait_used(0, WAIT).1, data.len() as u32 + 1);
        assert_eq!(raw.read_status(status), 0);
        assert!(raw.read(back, data.len()) == data);

        // Online resize goes through the volume.
        export.resize(32 * MIB).expect("grow");
        assert_eq!(*volume.grown.lock().unwrap(), [32 * MIB]);
        assert_eq!(raw.capacity_sectors(), 32 * MIB / 512);

        // The connection ends: the volume hears of it once the pollers are gone.
        drop(raw);
        volume.wait_seen(&[Seen::Table(3), Seen::Gone]);

        // The next frontend (libblkio, which adds its memory region by region) starts afresh.
        let mut client = Client::connect(&vol.socket, 1, 1 << 20);
        let deadline = Instant::now() + WAIT;
        while volume.seen().len() < 3 {
            assert!(Instant::now() < deadline, "no memory table from the second frontend: {:?}", volume.seen());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(volume.seen()[2..].iter().all(|s| matches!(s, Seen::Table(n) if *n >= 1)), "{:?}", volume.seen());
        assert_eq!(client.read(0, MIB, 0, data.len()), 0);
        assert!(client.buf()[..data.len()] == data[..]);
        drop(client);
        let deadline = Instant::now() + WAIT;
        while volume.seen().last() != Some(&Seen::Gone) || volume.seen().len() < 4 {
            assert!(Instant::now() < deadline, "the second disconnect was not seen: {:?}", volume.seen());
            std::thread::sleep(Duration::from_millis(5));
        }
        export.stop();
        assert_eq!(volume.seen().iter().filter(|s| **s == Seen::Gone).count(), 2, "{:?}", volume.seen());
    });
}
