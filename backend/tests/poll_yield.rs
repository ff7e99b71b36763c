//! An adaptive poller gives its core to another thread that wants it (issue 7, "polling that
//! yields"); `--poll always` does not. Its own test binary: the CPU times compared are those of
//! threads of this process, with no other test running beside it.
//!
//! No absolute timing is asserted: a busy thread pinned to the poller's core runs for a while,
//! and the test compares the CPU time it got with the CPU time the poller took over the same
//! interval. Other load on the machine takes from both alike.

mod common;

use std::time::{Duration, Instant};

use backend::{Export, ExportConfig, PollConfig, PollMode};
use common::{Client, Volume};
use replica::BackingKind;

const MIB: u64 = 1 << 20;
/// How long the competing thread runs.
const COMPETE: Duration = Duration::from_secs(2);

/// Thread ids of this process whose name is `name`.
fn threads_named(name: &str) -> Vec<u32> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let entry = entry.expect("task entry");
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            if let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) {
                tids.push(tid);
            }
        }
    }
    tids
}

/// CPU time (ns) thread `tid` of this process has run: the first field of its schedstat.
fn thread_runtime_ns(tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).expect("schedstat");
    stat.split_ascii_whitespace().next().and_then(|f| f.parse().ok()).expect("schedstat runtime")
}

/// CPU time of the calling thread.
fn own_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The core the poller and the competitor share: the last online one.
fn shared_cpu() -> usize {
    core_affinity::get_core_ids().and_then(|ids| ids.last().map(|c| c.id)).expect("online cores")
}

/// Exports a null volume polled in `mode` on `cpu`, makes its poller busy with one request,
/// then runs a busy thread pinned to the same core for `COMPETE`. Returns the CPU time the
/// competitor got and the CPU time the poller took meanwhile.
fn compete(mode: PollMode, cpu: usize) -> (Duration, Duration) {
    let vol = Volume::new();
    let config = ExportConfig {
        name: "yield".into(),
        socket_path: vol.socket.clone(),
        num_queues: 1,
        queue_size: 256,
        serial: "hcblk-yield".into(),
        // Idle for long after the last request: without yielding, the poller spins for the
        // whole test.
        poll: PollConfig { mode, idle: Duration::from_secs(30), cpus: vec![cpu], one_poller: false },
    };
    let before = threads_named("vring_worker");
    let export = Export::start(config, vol.backing(BackingKind::Null, 8 * MIB, 512, false)).expect("start export");
    let mut client = Client::connect(&vol.socket, 1, 1 << 20);
    assert_eq!(client.read(0, 0, 0, 4096), 0);
    let pollers: Vec<u32> = threads_named("vring_worker").into_iter().filter(|t| !before.contains(t)).collect();
    assert_eq!(pollers.len(), 1, "one poller thread for one queue: {pollers:?}");
    let poller = pollers[0];

    let poller_start = thread_runtime_ns(poller);
    let competitor = std::thread::spawn(move || {
        assert!(core_affinity::set_for_current(core_affinity::CoreId { id: cpu }), "pin the competitor");
        let start_cpu = own_cpu();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < COMPETE {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        own_cpu() - start_cpu
    });
    let competitor_cpu = competitor.join().expect("competitor");
    let poller_cpu = Duration::from_nanos(thread_runtime_ns(poller) - poller_start);

    // The volume still serves, at once: the poller sleeps on kicks, it did not stop.
    for i in 0..100 {
        assert_eq!(client.read(0, i * 4096, 0, 4096), 0);
    }
    drop(client);
    export.stop();
    (competitor_cpu, poller_cpu)
}

#[test]
fn an_adaptive_poller_gives_its_core_to_a_busy_thread() {
    common::with_watchdog(Duration::from_secs(60), || {
        let cpu = shared_cpu();
        // Control: `always` keeps polling, and the scheduler shares the core between the two.
        let (competitor, poller) = compete(PollMode::Always, cpu);
        eprintln!("always: competitor {competitor:?}, poller {poller:?}");
        assert!(
            poller * 4 >= competitor,
            "the always poller should take a share of the core like the competitor: competitor {competitor:?}, poller {poller:?}"
        );
        // Adaptive: the poller sees it waits for its core, stops polling, and only probes again
        // now and then (back-off up to a second).
        let (competitor, poller) = compete(PollMode::Adaptive, cpu);
        eprintln!("adaptive: competitor {competitor:?}, poller {poller:?}");
        assert!(
            poller * 10 <= competitor,
            "the adaptive poller kept the core from a thread that wanted it: competitor {competitor:?}, poller {poller:?}"
        );
    });
}
