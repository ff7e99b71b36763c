//! Frontends that come and go — VMs restarting, volumes hot-plugged and hot-unplugged, a
//! frontend that vanishes with requests in flight — leave nothing behind in the daemon: every
//! connection's threads and descriptors go with it.
//!
//! The only test of its binary: it counts the whole process's threads and descriptors, which
//! tests running beside it would change.

mod common;

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use backend::{Export, PollMode};
use blkio::{Completion, ReqFlags};
use common::{pattern, Client, Volume};
use replica::{Backing, BackingKind};

const MIB: u64 = 1 << 20;
const WATCHDOG: Duration = Duration::from_secs(120);
/// Longest a connection's threads may take to exit after it ended.
const SETTLE: Duration = Duration::from_secs(10);
const QUEUES: usize = 2;

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
                _ => target,
            }
        })
        .collect();
    threads.sort();
    fds.sort();
    (threads, fds)
}

/// Connects a frontend, writes and reads back 4 KiB, optionally leaves writes in flight on
/// every queue, and goes away; returns once the export has seen it go.
fn connect_and_leave(vol: &Volume, export: &Export<Backing>, seed: u64, leave_in_flight: bool) {
    let mut client = Client::connect(&vol.socket, QUEUES, MIB as usize);
    let data = pattern(seed, 4096);
    client.buf()[..4096].copy_from_slice(&data);
    assert_eq!(client.write(0, 4096 * seed, 0, 4096), 0);
    assert_eq!(client.read(1, 4096 * seed, 4096, 4096), 0);
    assert!(client.buf()[4096..8192] == data[..], "connection {seed} read back other data");
    if leave_in_flight {
        for q in 0..QUEUES {
            for i in 0..16u64 {
                let ptr = client.ptr(64 * 1024 * (i as usize + 1));
                client.queues[q].write(MIB + (q as u64 * 16 + i) * 65536, ptr, 65536, 0, ReqFlags::empty());
            }
            // Submits without waiting for any completion.
            let mut none: [MaybeUninit<Completion>; 0] = [];
            client.queues[q].do_io(&mut none, 0, None, None).expect("submit");
        }
    }
    drop(client);
    let deadline = Instant::now() + SETTLE;
    while export.is_connected() {
        assert!(Instant::now() < deadline, "connection {seed} still open {SETTLE:?} after the frontend left");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn frontends_that_come_and_go_leave_no_threads_or_descriptors_behind() {
    common::with_watchdog(WATCHDOG, || {
        let vol = Volume::new();
        let export = vol.export(vol.backing(BackingKind::File, 8 * MIB, 512, false), QUEUES as u16, PollMode::Adaptive);
        // Two connections first: the export keeps the last connection's device until the next
        // one comes, so the steady state starts after the first disconnect.
        connect_and_leave(&vol, &export, 1, false);
        connect_and_leave(&vol, &export, 2, true);
        std::thread::sleep(Duration::from_millis(500));
        let baseline = holdings();
        for seed in 3..=12 {
            connect_and_leave(&vol, &export, seed, seed % 2 == 0);
        }
        let deadline = Instant::now() + SETTLE;
        let mut now = holdings();
        while now != baseline && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = holdings();
        }
        assert_eq!(now.0, baseline.0, "threads after 10 more connections (left) against after the second (right)");
        assert_eq!(now.1, baseline.1, "descriptors after 10 more connections (left) against after the second (right)");
        // Still serving: a last frontend reads what the twelfth wrote.
        let mut client = Client::connect(&vol.socket, QUEUES, MIB as usize);
        assert_eq!(client.read(0, 4096 * 12, 0, 4096), 0);
        assert!(client.buf()[..4096] == pattern(12, 4096)[..], "the last connection's data is gone");
        drop(client);
        export.stop();
    });
}
