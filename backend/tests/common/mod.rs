//! Test frontends and fixtures shared by the in-process tests.
#![allow(dead_code)]

pub mod raw_frontend;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backend::{Export, ExportConfig, PollConfig, PollMode};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use replica::{Backing, BackingConfig, BackingKind};

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn require_hugepages() {
    let free = replica::free_hugepages().unwrap_or(0);
    assert!(free >= 8, "these tests need free hugepages (have {free}): echo 64 > /proc/sys/vm/nr_hugepages");
}

pub struct Volume {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub image: PathBuf,
}

impl Volume {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vol.sock");
        let image = dir.path().join("vol.img");
        Self { dir, socket, image }
    }

    pub fn backing(&self, kind: BackingKind, size_bytes: u64, block_size: u32, read_only: bool) -> Arc<Backing> {
        let config = BackingConfig {
            kind,
            path: matches!(kind, BackingKind::File).then(|| self.image.clone()),
            size_bytes,
            block_size,
            read_only,
            create: true,
        };
        Arc::new(Backing::open(&config).expect("open backing"))
    }

    /// Exports `volume` (a `Backing`, or a test volume wrapping one) on this fixture's socket.
    pub fn export<V: backend::Volume>(&self, volume: Arc<V>, num_queues: u16, mode: PollMode) -> Export<V> {
        let config = ExportConfig {
            name: "test".into(),
            socket_path: self.socket.clone(),
            num_queues,
            queue_size: 256,
            serial: "hcblk-test-serial".into(),
            poll: PollConfig { mode, idle: Duration::from_millis(1), cpus: Vec::new(), one_poller: false },
        };
        Export::start(config, volume).expect("start export")
    }
}

/// libblkio's virtio-blk-vhost-user driver: an independent vhost-user frontend.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, num_queues: usize, buffer_bytes: usize) -> Self {
        Self::connect_with(socket, num_queues, buffer_bytes, false)
    }

    /// libblkio refuses to start a read-only device unless asked for read-only access.
    pub fn connect_with(socket: &Path, num_queues: usize, buffer_bytes: usize, read_only: bool) -> Self {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
        blkio.set_str("path", socket.to_str().unwrap()).unwrap();
        blkio.set_bool("read-only", read_only).unwrap();
        blkio.connect().unwrap_or_else(|e| panic!("connect to {}: {}", socket.display(), e.message()));
        blkio.set_i32("num-queues", num_queues as i32).unwrap();
        let started = blkio.start().unwrap_or_else(|e| panic!("start: {}", e.message()));
        let region = blkio.alloc_mem_region(buffer_bytes).expect("alloc_mem_region");
        blkio.map_mem_region(&region).expect("map_mem_region");
        Self { blkio, queues: started.queues, region }
    }

    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped, `len` bytes long and owned by this client.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn ptr(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.region.len);
        (self.region.addr + offset) as *mut u8
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    /// Waits for one completion on queue `q` and returns its `ret` (0 or -errno).
    pub fn wait(&mut self, q: usize) -> i32 {
        let mut completions = [std::mem::MaybeUninit::<Completion>::uninit(); 1];
        let mut timeout = Duration::from_secs(10);
        let n = self.queues[q]
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .unwrap_or_else(|e| panic!("do_io: {}", e.message()));
        assert_eq!(n, 1, "no completion within 10 s");
        // SAFETY: do_io initialised the first `n` entries.
        unsafe { completions[0].assume_init_ref() }.ret
    }

    pub fn read(&mut self, q: usize, offset: u64, buf_offset: usize, len: usize) -> i32 {
        let ptr = self.ptr(buf_offset);
        self.queues[q].read(offset, ptr, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn write(&mut self, q: usize, offset: u64, buf_offset: usize, len: usize) -> i32 {
        let ptr = self.ptr(buf_offset);
        self.queues[q].write(offset, ptr, len, 0, ReqFlags::empty());
        self.wait(q)
    }
}

/// Runs `body` on its own thread and fails if it takes longer than `limit`. A body stuck in
/// the backend is left behind; the test process still exits when the harness is done.
pub fn with_watchdog(limit: Duration, body: impl FnOnce() + Send + 'static) {
    init_logs();
    require_hugepages();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        body();
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(limit) {
        Ok(()) => thread.join().expect("test body"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: report its panic, not ours.
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("test hung for {limit:?}"),
    }
}

/// Fills `buf` with a deterministic pattern that differs per (seed, position), eight bytes at
/// a time: for buffers of hundreds of MiB, where `pattern` is slow in a debug build.
pub fn fill_pattern(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let tail = chunks.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&x.rotate_left(32).to_le_bytes()[..n]);
}

/// A deterministic byte pattern that differs per (seed, position).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
