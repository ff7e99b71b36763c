//! Inflight I/O tracking (vhost-user INFLIGHT_SHMFD) against a backend that dies.
//!
//! The exactly-once test runs the first backend in a child process (this test binary, run
//! again with `CHILD_ENV` set) over a volume that never completes requests to a "held" range,
//! drives it with `RawFrontend` playing QEMU, kills it with SIGKILL while those requests are in
//! flight, starts a second backend (in this process, over a volume that records every request
//! it executes) on the same socket and image, and reconnects as QEMU does. Every request in
//! flight at the kill must then complete exactly once, in the order it was first taken, and no
//! request completed before the kill may run again.
//!
//! The other tests hand the backend inflight regions and region contents that no correct
//! frontend or backend would: each is refused with the connection closed, and the export (and
//! a bystander export) carry on.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backend::{Export, ExportConfig, GuestMem, PollConfig, PollMode, VolumeQueue};
use common::raw_frontend::{handshake, header, memfd, readable, writable, RawFrontend, RawOptions, T_IN, T_OUT};
use common::{pattern, Client, Volume};
use replica::{Backing, BackingConfig, BackingKind, IoCompletion, IoRequest, ShardQueue};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 16 * MIB;
/// Requests at or past this byte are never completed by the first backend.
const HOLD_FROM: u64 = 8 * MIB;
const QUEUES: usize = 2;
/// Small, so that the avail ring wraps (and overwrites the entries of held requests) quickly.
const QUEUE_SIZE: u16 = 16;
const WAIT: Duration = Duration::from_secs(10);
const WATCHDOG: Duration = Duration::from_secs(240);
/// Set in the child process: "socket|image|mode".
const CHILD_ENV: &str = "HCBLK_INFLIGHT_TEST_CHILD";
const CHILD_READY: &str = "HCBLK-INFLIGHT-CHILD-READY";
const OK: u8 = 0;

fn mode_name(mode: PollMode) -> &'static str {
    match mode {
        PollMode::Always => "always",
        PollMode::Adaptive => "adaptive",
        PollMode::Never => "never",
    }
}

fn poll_config(mode: PollMode) -> PollConfig {
    // Busy polling: one poller serving both queues on one core, so that the two-core test
    // machine keeps a core; the other modes get a poller per queue.
    let cpus = if mode == PollMode::Always { vec![0] } else { Vec::new() };
    PollConfig { mode, idle: Duration::from_millis(1), cpus, one_poller: false }
}

fn export_config(socket: &Path, mode: PollMode) -> ExportConfig {
    ExportConfig {
        name: "inflight".into(),
        socket_path: socket.to_path_buf(),
        num_queues: QUEUES as u16,
        queue_size: 256,
        serial: "inflight".into(),
        poll: poll_config(mode),
    }
}

fn open_image(image: &Path) -> Arc<Backing> {
    let config = BackingConfig {
        kind: BackingKind::File,
        path: Some(image.to_path_buf()),
        size_bytes: VOLUME_BYTES,
        block_size: 512,
        read_only: false,
        create: true,
    };
    Arc::new(Backing::open(&config).expect("open the image"))
}

/// The first backend's volume: requests at or past `HOLD_FROM` are taken and never completed,
/// as if the disk had not answered yet when the backend died.
struct Holding(Arc<Backing>);

struct HoldingQueue {
    inner: ShardQueue,
    held: Vec<IoRequest>,
    depth: u32,
}

impl backend::Volume for Holding {
    type Queue = HoldingQueue;
    fn capacity_bytes(&self) -> u64 {
        self.0.capacity_bytes()
    }
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn physical_block_bytes(&self) -> u32 {
        backend::Volume::physical_block_bytes(&*self.0)
    }
    fn new_queue(self: &Arc<Self>, depth: u32) -> Result<HoldingQueue, backend::Error> {
        Ok(HoldingQueue { inner: backend::Volume::new_queue(&self.0, depth)?, held: Vec::new(), depth })
    }
    fn grow(&self, new_size_bytes: u64) -> Result<(), backend::Error> {
        backend::Volume::grow(&*self.0, new_size_bytes)
    }
    fn guest_memory_changed(&self, _mem: Option<&Arc<GuestMem>>) -> Result<(), backend::Error> {
        Ok(())
    }
}

impl VolumeQueue for HoldingQueue {
    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), IoRequest> {
        if self.is_full() {
            return Err(request);
        }
        if request.offset_bytes >= HOLD_FROM {
            // Never executed: the memory it names is never touched.
            self.held.push(request);
            return Ok(());
        }
        // SAFETY: the caller upholds `submit`'s contract, which is the inner queue's.
        unsafe { self.inner.submit(request) }
    }
    fn is_full(&self) -> bool {
        self.inner.is_full() || self.outstanding() >= self.depth
    }
    fn poll(&mut self) -> usize {
        self.inner.poll()
    }
    fn pop_completion(&mut self) -> Option<IoCompletion> {
        self.inner.pop_completion()
    }
    fn outstanding(&self) -> u32 {
        self.inner.outstanding() + self.held.len() as u32
    }
    fn wait_for_completions(&mut self, timeout: Duration, idle: bool) {
        VolumeQueue::wait_for_completions(&mut self.inner, timeout, idle)
    }
    fn completion_eventfd(&self) -> Option<std::os::fd::RawFd> {
        VolumeQueue::completion_eventfd(&self.inner)
    }
}

/// What the second backend executed: (queue, byte offset), in the order each queue submitted.
type Log = Arc<Mutex<Vec<(usize, u64)>>>;

/// The second backend's volume: executes everything, and logs it per queue.
struct Recording {
    backing: Arc<Backing>,
    log: Log,
    queues: Mutex<usize>,
}

struct RecordingQueue {
    inner: ShardQueue,
    id: usize,
    log: Log,
}

impl backend::Volume for Recording {
    type Queue = RecordingQueue;
    fn capacity_bytes(&self) -> u64 {
        self.backing.capacity_bytes()
    }
    fn block_size(&self) -> u32 {
        self.backing.block_size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn physical_block_bytes(&self) -> u32 {
        backend::Volume::physical_block_bytes(&*self.backing)
    }
    fn new_queue(self: &Arc<Self>, depth: u32) -> Result<RecordingQueue, backend::Error> {
        let mut made = self.queues.lock().unwrap();
        let id = *made;
        *made += 1;
        Ok(RecordingQueue { inner: backend::Volume::new_queue(&self.backing, depth)?, id, log: Arc::clone(&self.log) })
    }
    fn grow(&self, new_size_bytes: u64) -> Result<(), backend::Error> {
        backend::Volume::grow(&*self.backing, new_size_bytes)
    }
    fn guest_memory_changed(&self, _mem: Option<&Arc<GuestMem>>) -> Result<(), backend::Error> {
        Ok(())
    }
}

impl VolumeQueue for RecordingQueue {
    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), IoRequest> {
        let offset = request.offset_bytes;
        // SAFETY: the caller upholds `submit`'s contract, which is the inner queue's.
        unsafe { self.inner.submit(request) }?;
        self.log.lock().unwrap().push((self.id, offset));
        Ok(())
    }
    fn is_full(&self) -> bool {
        self.inner.is_full()
    }
    fn poll(&mut self) -> usize {
        self.inner.poll()
    }
    fn pop_completion(&mut self) -> Option<IoCompletion> {
        self.inner.pop_completion()
    }
    fn outstanding(&self) -> u32 {
        self.inner.outstanding()
    }
    fn wait_for_completions(&mut self, timeout: Duration, idle: bool) {
        VolumeQueue::wait_for_completions(&mut self.inner, timeout, idle)
    }
    fn completion_eventfd(&self) -> Option<std::os::fd::RawFd> {
        VolumeQueue::completion_eventfd(&self.inner)
    }
}

/// The child process: the first backend, until it is killed.
fn child_server(spec: &str) -> ! {
    common::init_logs();
    let parts: Vec<&str> = spec.split('|').collect();
    let [socket, image, mode] = parts[..] else { panic!("bad {CHILD_ENV}={spec}") };
    let mode: PollMode = mode.parse().expect("poll mode");
    let export = Export::start(export_config(Path::new(socket), mode), Arc::new(Holding(open_image(Path::new(image)))))
        .expect("start the first backend");
    println!("{CHILD_READY}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        // Unreachable in practice (the parent kills us); keeps the export alive until then.
        let _ = export.is_connected();
    }
}

/// Starts the first backend in a child process and waits until it serves its socket.
fn spawn_child(test: &str, socket: &Path, image: &Path, mode: PollMode) -> Child {
    let spec = format!("{}|{}|{}", socket.display(), image.display(), mode_name(mode));
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the first backend");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(CHILD_READY) {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(WAIT).is_err() {
        let _ = child.kill();
        panic!("the first backend did not start within {WAIT:?} (status {:?})", child.try_wait());
    }
    child
}

/// One request the test made: where, what, and its head once published.
#[derive(Clone, Debug)]
struct Req {
    queue: usize,
    head: u16,
    offset: u64,
    data: Vec<u8>,
    status: GuestAddress,
}

/// Writes `data` at `offset` through `queue` (4 KiB, two descriptors besides the header).
fn write(raw: &mut RawFrontend, queue: usize, offset: u64, seed: u64) -> Req {
    let data = pattern(seed, 4096);
    let buf = raw.put(&data);
    let hdr = raw.put(&header(T_OUT, offset / 512));
    let status = raw.put(&[0xa5]);
    let head = raw.submit_chain(queue, &[readable(hdr, 16), readable(buf, 4096), writable(status, 1)]);
    Req { queue, head, offset, data, status }
}

fn read_back(raw: &mut RawFrontend, queue: usize, offset: u64) -> Vec<u8> {
    let buf = raw.alloc(4096);
    let hdr = raw.put(&header(T_IN, offset / 512));
    let status = raw.put(&[0xa5]);
    raw.submit_chain(queue, &[readable(hdr, 16), writable(buf, 4096), writable(status, 1)]);
    let (_, len) = raw.wait_used(queue, WAIT);
    assert_eq!(len, 4097, "read of {offset:#x}");
    assert_eq!(raw.read_status(status), OK);
    raw.read(buf, 4096)
}

/// The whole scenario against one poll mode: see the module documentation.
fn kill_and_reconnect(test: &'static str, mode: PollMode) {
    let vol = Volume::new();
    drop(open_image(&vol.image));
    let mut child = spawn_child(test, &vol.socket, &vol.image, mode);
    let options = RawOptions {
        num_queues: QUEUES,
        queue_size: QUEUE_SIZE,
        event_idx: true,
        inflight: true,
        ..RawOptions::default()
    };
    let mut raw = RawFrontend::connect(&vol.socket, options);

    // Per queue: completed writes below HOLD_FROM, two held ones at or past it. The first held
    // one is published first, then enough completed ones to wrap the avail ring past its entry,
    // then the second: a backend restarting from the avail ring alone would find neither.
    let mut completed = Vec::new();
    let mut held: Vec<Req> = Vec::new();
    let mut seed = 1;
    for q in 0..QUEUES {
        let base = q as u64 * MIB;
        held.push(write(&mut raw, q, HOLD_FROM + base, seed));
        seed += 1;
        for i in 0..u64::from(QUEUE_SIZE) + 4 {
            let req = write(&mut raw, q, base + i * 4096, seed);
            seed += 1;
            let (head, len) = raw.wait_used(q, WAIT);
            assert_eq!((head, len), (req.head, 1), "queue {q}: only the completed write comes back");
            assert_eq!(raw.read_status(req.status), OK);
            completed.push(req);
        }
        held.push(write(&mut raw, q, HOLD_FROM + base + 4096, seed));
        seed += 1;
    }
    for q in 0..QUEUES {
        raw.expect_no_used(q, Duration::from_millis(100));
        assert_eq!(raw.in_flight(q), 2, "queue {q}: both held writes in flight");
    }

    // kill -9: nothing of the first backend runs any more.
    child.kill().expect("SIGKILL the first backend");
    child.wait().expect("reap the first backend");

    // While no backend is there the guest makes more requests; their kicks reach nobody.
    let mut after = Vec::new();
    for q in 0..QUEUES {
        after.push(write(&mut raw, q, 4 * MIB + q as u64 * 4096, seed));
        seed += 1;
    }

    // The second backend, on the same socket and image.
    let log: Log = Arc::default();
    let volume = Arc::new(Recording { backing: open_image(&vol.image), log: Arc::clone(&log), queues: Mutex::new(0) });
    let export = Export::start(export_config(&vol.socket, mode), volume).expect("start the second backend");
    raw.reconnect(&vol.socket).unwrap_or_else(|e| panic!("reconnect: {e}"));

    // Every request in flight at the kill, and the new ones, complete once; nothing else.
    for q in 0..QUEUES {
        let mut want: HashMap<u16, &Req> =
            held.iter().chain(&after).filter(|r| r.queue == q).map(|r| (r.head, r)).collect();
        while !want.is_empty() {
            let (head, len) = raw.wait_used(q, WAIT);
            let req =
                want.remove(&head).unwrap_or_else(|| panic!("queue {q}: head {head} completed, not one in flight"));
            assert_eq!(len, 1);
            assert_eq!(raw.read_status(req.status), OK, "queue {q}: write at {:#x}", req.offset);
        }
    }
    for q in 0..QUEUES {
        raw.expect_no_used(q, Duration::from_millis(300));
        assert_eq!(raw.in_flight(q), 0);
    }

    // The second backend executed exactly those, each once, the held ones first and in the
    // order the first backend took them.
    let executed = log.lock().unwrap().clone();
    let mut per_queue: HashMap<usize, Vec<u64>> = HashMap::new();
    for &(id, offset) in &executed {
        per_queue.entry(id).or_default().push(offset);
    }
    let mut expected_all: Vec<u64> = held.iter().chain(&after).map(|r| r.offset).collect();
    let mut executed_all: Vec<u64> = executed.iter().map(|&(_, o)| o).collect();
    expected_all.sort_unstable();
    executed_all.sort_unstable();
    assert_eq!(executed_all, expected_all, "requests executed by the second backend");
    for q in 0..QUEUES {
        let order: Vec<u64> = held.iter().chain(&after).filter(|r| r.queue == q).map(|r| r.offset).collect();
        let seen: Vec<u64> = per_queue.values().flatten().copied().filter(|o| order.contains(o)).collect();
        assert_eq!(seen, order, "queue {q}: resubmitted in the order first taken, before new requests");
    }

    // And the data is all there: the completed writes were not replayed over, the held ones
    // and the new ones landed.
    for req in completed.iter().chain(&held).chain(&after) {
        assert!(read_back(&mut raw, req.queue, req.offset) == req.data, "data at {:#x}", req.offset);
    }
    drop(raw);
    export.stop();
}

#[test]
fn requests_in_flight_when_the_backend_is_killed_complete_once_after_reconnect() {
    const TEST: &str = "requests_in_flight_when_the_backend_is_killed_complete_once_after_reconnect";
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child_server(&spec);
    }
    common::with_watchdog(WATCHDOG, || {
        for mode in [PollMode::Never, PollMode::Adaptive, PollMode::Always] {
            eprintln!("--- poll mode {}", mode_name(mode));
            kill_and_reconnect(TEST, mode);
        }
    });
}

/// One export under test and a bystander export with its own volume and libblkio client.
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
        let export =
            vol.export(vol.backing(BackingKind::File, VOLUME_BYTES, 512, false), QUEUES as u16, PollMode::Adaptive);
        let other_vol = Volume::new();
        let other_export =
            other_vol.export(other_vol.backing(BackingKind::File, VOLUME_BYTES, 512, false), 1, PollMode::Adaptive);
        let other = Client::connect(&other_vol.socket, 1, 1 << 20);
        Self { vol, _export: export, _other_vol: other_vol, _other_export: other_export, other }
    }

    fn options() -> RawOptions {
        RawOptions {
            num_queues: QUEUES,
            queue_size: QUEUE_SIZE,
            event_idx: true,
            inflight: true,
            ..RawOptions::default()
        }
    }

    /// The export and the bystander both still serve I/O.
    fn both_serve(&mut self, seed: u64) {
        let mut raw = RawFrontend::connect(&self.vol.socket, Self::options());
        for q in 0..QUEUES {
            let req = write(&mut raw, q, q as u64 * 4096, seed + q as u64);
            assert_eq!(raw.wait_used(q, WAIT), (req.head, 1));
            assert!(read_back(&mut raw, q, req.offset) == req.data);
        }
        drop(raw);
        self.other.buf()[..4096].copy_from_slice(&pattern(seed, 4096));
        assert_eq!(self.other.write(0, 0, 0, 4096), 0);
        assert_eq!(self.other.read(0, 0, 4096, 4096), 0);
        assert!(self.other.buf()[4096..8192] == pattern(seed, 4096)[..]);
    }
}

/// The connection is closed: the next message fails.
#[track_caller]
fn assert_closed(frontend: &mut vhost::vhost_user::Frontend) {
    let deadline = Instant::now() + WAIT;
    while frontend.get_features().is_ok() {
        assert!(Instant::now() < deadline, "the backend kept the connection open");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn inflight_regions_that_do_not_fit_the_device_are_refused_and_the_export_lives_on() {
    common::with_watchdog(WATCHDOG, || {
        let mut rig = Rig::new();
        rig.both_serve(1);
        let negotiate = |rig: &Rig| {
            handshake(&rig.vol.socket, &Rig::options(), VhostUserProtocolFeatures::INFLIGHT_SHMFD)
                .unwrap_or_else(|e| panic!("{e}"))
                .0
        };
        let request =
            |num_queues, queue_size| VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues, queue_size };

        // GET for more queues, or larger ones, than the device has.
        for (num_queues, queue_size) in [(3, 256), (QUEUES as u16, 512), (u16::MAX, u16::MAX)] {
            let mut frontend = negotiate(&rig);
            assert!(
                frontend.get_inflight_fd(&request(num_queues, queue_size)).is_err(),
                "GET {num_queues} x {queue_size}"
            );
            assert_closed(&mut frontend);
        }

        // SET with a region that does not match what it claims, or the device.
        let mut frontend = negotiate(&rig);
        let (good, file) = frontend.get_inflight_fd(&request(QUEUES as u16, 256)).expect("a good GET");
        assert_eq!(good.mmap_size, QUEUES as u64 * 4160, "libvhost-user's layout");
        let unsealed = memfd(good.mmap_size);
        let bad: Vec<(&str, VhostUserInflight, &std::fs::File)> = vec![
            ("too small", VhostUserInflight { mmap_size: good.mmap_size - 64, ..good }, &file),
            ("too large", VhostUserInflight { mmap_size: good.mmap_size + 4096, ..good }, &file),
            ("misaligned", VhostUserInflight { mmap_offset: 64, ..good }, &file),
            ("past the end of its file", VhostUserInflight { mmap_offset: 4096, ..good }, &file),
            ("more queues than the device", VhostUserInflight { num_queues: 3, mmap_size: 3 * 4160, ..good }, &file),
            (
                "queues larger than the device's",
                VhostUserInflight { queue_size: 512, mmap_size: 2 * 8256, ..good },
                &file,
            ),
            ("size inconsistent with the queue count", VhostUserInflight { num_queues: 1, ..good }, &file),
            ("size inconsistent with the queue size", VhostUserInflight { queue_size: 128, ..good }, &file),
            ("an unsealed memfd the frontend could shrink", good, &unsealed),
        ];
        drop(frontend);
        for (what, msg, fd) in bad {
            let mut frontend = negotiate(&rig);
            let refused = frontend.set_inflight_fd(&msg, std::os::fd::AsRawFd::as_raw_fd(fd));
            assert!(refused.is_err(), "{what}: accepted");
            assert_closed(&mut frontend);
        }
        rig.both_serve(2);
    });
}

#[test]
fn inflight_region_contents_no_backend_could_leave_refuse_the_vring() {
    common::with_watchdog(WATCHDOG, || {
        let mut rig = Rig::new();
        let socket = rig.vol.socket.clone();
        let mut raw = RawFrontend::connect(&socket, Rig::options());
        let req = write(&mut raw, 0, 0, 7);
        assert_eq!(raw.wait_used(0, WAIT), (req.head, 1));
        let (region, file) = raw.inflight_region().expect("inflight negotiated");
        let (region, file) = (*region, file.try_clone().unwrap());
        let queue_bytes = region.mmap_size / u64::from(region.num_queues);
        // desc[h].inflight of queue 0 is at 16 + 16 h; the header's version at 8.
        let mark = |head: u64, value: u8| file.write_all_at(&[value], 16 + 16 * head).unwrap();

        // A request marked in flight that the avail ring never held: refused at SET_VRING_KICK.
        mark(9, 1);
        let err = raw.reconnect(&socket).expect_err("a marked head the ring never held");
        assert_eq!(err.step, "SET_VRING_KICK", "{err}");
        mark(9, 0);
        // An unknown region version (on queue 1).
        file.write_all_at(&7u16.to_le_bytes(), queue_bytes + 8).unwrap();
        let err = raw.reconnect(&socket).expect_err("an unknown version");
        assert_eq!(err.step, "SET_VRING_KICK", "{err}");
        file.write_all_at(&1u16.to_le_bytes(), queue_bytes + 8).unwrap();
        // A last batch longer than the queue: used_idx in the region far from the ring's.
        file.write_all_at(&1000u16.to_le_bytes(), 14).unwrap();
        let err = raw.reconnect(&socket).expect_err("a last batch longer than the queue");
        assert_eq!(err.step, "SET_VRING_KICK", "{err}");
        file.write_all_at(&1u16.to_le_bytes(), 14).unwrap();

        // Repaired, the same frontend carries on where it was.
        raw.reconnect(&socket).unwrap_or_else(|e| panic!("reconnect: {e}"));
        let req = write(&mut raw, 0, 8192, 8);
        assert_eq!(raw.wait_used(0, WAIT), (req.head, 1));
        assert!(read_back(&mut raw, 1, 8192) == req.data);
        drop(raw);
        rig.both_serve(3);
    });
}
