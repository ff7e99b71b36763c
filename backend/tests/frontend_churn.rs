//! Frontends that come and go — VMs restarting, volumes hot-plugged and hot-unplugged, a
//! frontend that vanishes with requests in flight — leave nothing behind in the daemon: every
//! connection's threads and descriptors go with it, and the requests a vanished frontend left
//! in the daemon's hands still complete.
//!
//! The only test of its binary: it counts the whole process's threads and descriptors, which
//! tests running beside it would change.

mod common;

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::{Export, GuestMem, PollMode, VolumeQueue};
use blkio::{Completion, ReqFlags};
use common::{pattern, Client, Volume};
use replica::{Backing, BackingKind, IoCompletion, IoRequest};

const MIB: u64 = 1 << 20;
const WATCHDOG: Duration = Duration::from_secs(120);
/// Longest a connection's threads may take to exit after it ended.
const SETTLE: Duration = Duration::from_secs(10);
const QUEUES: usize = 2;
/// How long the slow volume holds each request before it goes to the disk.
const HOLD: Duration = Duration::from_millis(100);
/// Writes (and reads) a frontend leaves in flight per queue, 64 KiB each.
const LEFT_IN_FLIGHT: u64 = 16;

/// A file-backed volume that holds every request [`HOLD`] before handing it to the disk, so that
/// a frontend that leaves shortly after submitting leaves its requests in the daemon's hands,
/// not yet done: writes still to read guest memory, reads still to fill it.
struct Slow {
    backing: Arc<Backing>,
    /// Set by the test while its frontend is leaving or gone.
    frontend_gone: AtomicBool,
    /// Requests handed to the disk while `frontend_gone` was set.
    done_after_frontend_left: AtomicU64,
}

struct SlowQueue {
    volume: Arc<Slow>,
    inner: replica::ShardQueue,
    depth: u32,
    /// Submitted to us, not yet to the disk.
    held: VecDeque<(Instant, IoRequest)>,
}

impl backend::Volume for Slow {
    type Queue = SlowQueue;

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
        backend::Volume::physical_block_bytes(&*self.backing)
    }

    fn new_queue(self: &Arc<Self>, depth: u32) -> Result<SlowQueue, backend::Error> {
        let inner = backend::Volume::new_queue(&self.backing, depth)?;
        Ok(SlowQueue { volume: Arc::clone(self), inner, depth, held: VecDeque::new() })
    }

    fn grow(&self, new_size_bytes: u64) -> Result<(), backend::Error> {
        backend::Volume::grow(&*self.backing, new_size_bytes)
    }

    fn guest_memory_changed(&self, mem: Option<&Arc<GuestMem>>) -> Result<(), backend::Error> {
        backend::Volume::guest_memory_changed(&*self.backing, mem)
    }
}

impl VolumeQueue for SlowQueue {
    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), IoRequest> {
        if self.is_full() {
            return Err(request);
        }
        self.held.push_back((Instant::now() + HOLD, request));
        Ok(())
    }

    fn is_full(&self) -> bool {
        self.outstanding() >= self.depth
    }

    fn poll(&mut self) -> usize {
        let mut moved = 0;
        while self.held.front().is_some_and(|(due, _)| *due <= Instant::now()) {
            let Some((due, request)) = self.held.pop_front() else { break };
            // SAFETY: our caller guaranteed that the iovecs and the memory they name stay valid
            // until this request's completion is popped from us; it can only be popped once
            // the inner queue has completed it, so the guarantee covers the inner queue's use.
            if let Err(request) = unsafe { self.inner.submit(request) } {
                self.held.push_front((due, request));
                break;
            }
            if self.volume.frontend_gone.load(Ordering::Relaxed) {
                self.volume.done_after_frontend_left.fetch_add(1, Ordering::Relaxed);
            }
            moved += 1;
        }
        moved + self.inner.poll()
    }

    fn pop_completion(&mut self) -> Option<IoCompletion> {
        self.inner.pop_completion()
    }

    fn outstanding(&self) -> u32 {
        self.inner.outstanding() + self.held.len() as u32
    }

    fn wait_for_completions(&mut self, timeout: Duration, idle: bool) {
        if !idle {
            return self.inner.wait_for_completions(timeout, idle);
        }
        match self.held.front() {
            Some((due, _)) => std::thread::sleep(due.saturating_duration_since(Instant::now()).min(timeout)),
            None => self.inner.wait_for_completions(timeout, idle),
        }
    }

    /// None: nothing would signal a held request coming due; the test polls (`PollMode::Always`).
    fn completion_eventfd(&self) -> Option<RawFd> {
        None
    }
}

/// The process's threads (io_uring's own workers left out: they come and go with the I/O)
/// and descriptors, by kind (`socket`, `anon_inode:[eventfd]`, a path), sorted.
fn holdings() -> (Vec<String>, Vec<String>) {
    let mut threads: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.starts_with("iou-"))
        .collect();
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|target| {
            let target = target.to_string_lossy().into_owned();
            match target.split_once(":[") {
                Some((kind, rest)) if rest.trim_end_matches(']').bytes().all(|b| b.is_ascii_digit()) => kind.to_owned(),
                // A poller's own /proc/PID/task/TID/schedstat: every connection's pollers are
                // new threads, with new ids.
                _ => without_thread_id(&target),
            }
        })
        .collect();
    threads.sort();
    fds.sort();
    (threads, fds)
}

/// `/proc/PID/task/TID/...` with the thread id left out; any other path as it is.
fn without_thread_id(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", "proc", pid, "task", _tid, rest @ ..] => format!("/proc/{pid}/task/TID/{}", rest.join("/")),
        _ => path.to_owned(),
    }
}

/// Connects a frontend, writes and reads back 4 KiB, optionally leaves 64 KiB writes (of
/// pattern `seed`, from 1 MiB) and reads in flight on every queue, and goes away; returns once
/// the export has seen it go.
fn connect_and_leave<V: backend::Volume>(
    vol: &Volume,
    export: &Export<V>,
    seed: u64,
    leave_in_flight: bool,
    slow: Option<&Slow>,
) {
    if let Some(slow) = slow {
        slow.frontend_gone.store(false, Ordering::Relaxed);
    }
    let mut client = Client::connect(&vol.socket, QUEUES, 4 * MIB as usize);
    let data = pattern(seed, 4096);
    client.buf()[..4096].copy_from_slice(&data);
    assert_eq!(client.write(0, 4096 * seed, 0, 4096), 0);
    assert_eq!(client.read(1, 4096 * seed, 4096, 4096), 0);
    assert!(client.buf()[4096..8192] == data[..], "connection {seed} read back other data");
    if leave_in_flight {
        let writes = pattern(seed, (QUEUES as u64 * LEFT_IN_FLIGHT * 65536) as usize);
        client.buf()[MIB as usize..MIB as usize + writes.len()].copy_from_slice(&writes);
        for q in 0..QUEUES {
            for i in 0..LEFT_IN_FLIGHT {
                let n = q as u64 * LEFT_IN_FLIGHT + i;
                let ptr = client.ptr((MIB + n * 65536) as usize);
                client.queues[q].write(MIB + n * 65536, ptr, 65536, 0, ReqFlags::empty());
                // And a read into guest memory that will be gone by the time it is done.
                let ptr = client.ptr((3 * MIB + i * 65536) as usize);
                client.queues[q].read(4 * MIB + n * 65536, ptr, 65536, 0, ReqFlags::empty());
            }
            // Submits without waiting for any completion.
            let mut none: [MaybeUninit<Completion>; 0] = [];
            client.queues[q].do_io(&mut none, 0, None, None).expect("submit");
        }
        // Long enough for the daemon to take them, far shorter than a slow volume holds them.
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(slow) = slow {
        slow.frontend_gone.store(true, Ordering::Relaxed);
    }
    drop(client);
    let deadline = Instant::now() + SETTLE;
    while export.is_connected() {
        assert!(Instant::now() < deadline, "connection {seed} still open {SETTLE:?} after the frontend left");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects and disconnects frontends 12 times, every other one leaving writes in flight;
/// the threads and descriptors after the last must be those after the second. Then a last
/// frontend must read what the twelfth left in flight.
fn churn<V: backend::Volume>(vol: &Volume, export: &Export<V>, slow: Option<&Slow>) {
    // Two connections first: the export keeps the last connection's device until the next
    // one comes, so the steady state starts after the first disconnect.
    connect_and_leave(vol, export, 1, false, slow);
    connect_and_leave(vol, export, 2, true, slow);
    std::thread::sleep(Duration::from_millis(500));
    let baseline = holdings();
    for seed in 3..=12 {
        connect_and_leave(vol, export, seed, seed % 2 == 0, slow);
    }
    let deadline = Instant::now() + SETTLE;
    let mut now = holdings();
    while now != baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = holdings();
    }
    assert_eq!(now.0, baseline.0, "threads after 10 more connections (left) against after the second (right)");
    assert_eq!(now.1, baseline.1, "descriptors after 10 more connections (left) against after the second (right)");
    // Still serving, and what the twelfth frontend left in flight was written.
    let mut client = Client::connect(&vol.socket, QUEUES, 4 * MIB as usize);
    let len = QUEUES * LEFT_IN_FLIGHT as usize * 65536;
    for chunk in 0..len / 65536 {
        let offset = chunk * 65536;
        assert_eq!(client.read(0, MIB + offset as u64, offset, 65536), 0);
    }
    assert!(
        client.buf()[..len] == pattern(12, len)[..],
        "the writes the last frontend left in flight are not all there"
    );
    drop(client);
}

#[test]
fn frontends_that_come_and_go_leave_no_threads_or_descriptors_behind() {
    common::with_watchdog(WATCHDOG, || {
        let vol = Volume::new();
        let export = vol.export(vol.backing(BackingKind::File, 8 * MIB, 512, false), QUEUES as u16, PollMode::Adaptive);
        churn(&vol, &export, None);
        export.stop();

        // The same over a volume that holds every request 100 ms before the disk sees it: each
        // frontend that leaves requests in flight leaves them in the daemon, not yet done. The
        // daemon must still do them (reads into guest memory it still maps) before it lets the
        // connection go, and the writes must land.
        let vol = Volume::new();
        let slow = Arc::new(Slow {
            backing: vol.backing(BackingKind::File, 8 * MIB, 512, false),
            frontend_gone: AtomicBool::new(false),
            done_after_frontend_left: AtomicU64::new(0),
        });
        let export = vol.export(Arc::clone(&slow), QUEUES as u16, PollMode::Always);
        churn(&vol, &export, Some(&slow));
        export.stop();
        // 6 frontends left 64 requests each in flight; the daemon had not handed them all to
        // the disk yet when they left, or this proved nothing about requests in its hands.
        let late = slow.done_after_frontend_left.load(Ordering::Relaxed);
        assert!(late > 0, "no request was still held when its frontend left");
        eprintln!("{late} requests went to the disk after their frontend had left");
    });
}
