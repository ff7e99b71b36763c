//! Restarting the server under a running guest: the parts of the kill loop
//! (`tests/tests/guest.rs`) and the upgrade test (`tests/tests/upgrade.rs`) that do not depend
//! on how the server goes down. The guest runs `fio-kill` mode (`qemu/guest/init`): random
//! writes verified as they go, and an `HCBLK-STALL ms=G` line each time its disk's completions
//! resume after a pause, the guest's view of a restart.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use crate::guest::{parse_stalls, GuestRun};

/// Longest a restart may keep the guest's I/O paused before the test fails.
pub const RESUME_LIMIT: Duration = Duration::from_secs(60);

/// The console log so far (empty until QEMU has written it).
pub fn read_console(log: &Path) -> String {
    String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).into_owned()
}

/// `fio-kill` for `runtime_s` seconds on 2 queues, iodepth 16, with requests that complete out
/// of order (which a server that restarts from the avail ring alone gets wrong): mixed sizes,
/// and flushes (slow: a journal commit of the image) that io_uring lets the writes behind them
/// overtake. QEMU reconnects 200 ms after losing the server; the console goes to `log`, where
/// [`restart_under_io`] reads it while the guest runs.
pub fn fio_kill_run(runtime_s: u32, log: &Path) -> GuestRun {
    GuestRun::new("fio-kill")
        .param("size", "64M")
        .param("iodepth", "16")
        .param("bsrange", "4k-64k")
        .param("engine", "io_uring")
        .param("fdatasync", "8")
        .param("runtime", &runtime_s.to_string())
        .param("require_queues", "2")
        .reconnect_ms(200)
        .timeout_s(runtime_s + 300)
        .log(log)
}

/// One restart under guest I/O, as the guest and the host saw it.
#[derive(Clone, Copy, Debug)]
pub struct Cycle {
    /// From the moment `restart` was called to the new server serving (it returned).
    pub serving: Duration,
    /// The pause in the guest's disk completions around the restart (guest-measured).
    pub paused: Duration,
}

/// Restarts the server with `restart` (which returns once the new one serves) while the guest of
/// `log` runs, and waits for the guest to report its I/O resumed, at most [`RESUME_LIMIT`].
/// Fails if the guest has already finished (its runtime was too short for the restarts) or
/// finishes before its I/O resumed.
pub fn restart_under_io(log: &Path, what: &str, restart: impl FnOnce() -> Result<()>) -> Result<Cycle> {
    let console = read_console(log);
    ensure!(!console.contains("HCBLK-RESULT"), "the guest finished before {what}; raise its runtime");
    let stalls_before = parse_stalls(&console).len();
    let started = Instant::now();
    restart()?;
    let serving = started.elapsed();
    let deadline = started + RESUME_LIMIT;
    loop {
        let console = read_console(log);
        let stalls = parse_stalls(&console);
        if stalls.len() > stalls_before {
            let paused = stalls[stalls_before..].iter().copied().max().unwrap_or(0);
            return Ok(Cycle { serving, paused: Duration::from_millis(paused) });
        }
        ensure!(!console.contains("HCBLK-RESULT"), "the guest finished before its I/O resumed after {what}");
        ensure!(Instant::now() < deadline, "guest I/O did not resume within {RESUME_LIMIT:?} of {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What hcblk's log says its restarts recovered from QEMU's inflight region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// `recovered inflight requests` lines: queues that found requests to resubmit.
    pub recoveries: u64,
    /// Requests in flight at the server's end, resubmitted by the next one.
    pub resubmitted: u64,
    /// Of those, the ones that were out of ring order.
    pub out_of_ring_order: u64,
}

/// Sums the `recovered inflight requests` lines of an hcblk log.
pub fn recovered_inflight(log: &str) -> Recovered {
    let mut total = Recovered::default();
    for line in log.lines().filter(|l| l.contains("recovered inflight requests")) {
        total.recoveries += 1;
        total.resubmitted += log_field(line, "resubmitted=").unwrap_or(0);
        total.out_of_ring_order += log_field(line, "out_of_ring_order=").unwrap_or(0);
    }
    total
}

/// Requests a stopping hcblk completed before it exited (`drained the requests in flight`).
pub fn drained_at_stop(log: &str) -> u64 {
    log.lines().filter(|l| l.contains("drained the requests in flight")).filter_map(|l| log_field(l, "requests=")).sum()
}

/// The number after `key` on a log line (`key=123`, as tracing writes fields).
pub fn log_field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The `version=` of hcblk's ready line in `log`, if it got that far.
pub fn ready_version(log: &str) -> Option<&str> {
    let line = log.lines().find(|l| l.contains("hcblk daemon ready "))?;
    let at = line.find(" version=")? + " version=".len();
    line[at..].split_whitespace().next()
}

/// A small seeded generator for restart moments (splitmix64), so that a run can be replayed
/// with its seed.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `HCBLK_KILL_SEED`, else one from the clock: the seed of a run's restart moments.
pub fn seed_from_env() -> u64 {
    std::env::var("HCBLK_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recoveries_drains_and_versions_are_read_from_the_log() {
        let log = "\
hcblk daemon ready api=/tmp/a/api.sock version=0.1.0+x
2026-12-02T07:00:01Z  INFO backend::device: recovered inflight requests volume=vol0 queue=0 resubmitted=3 out_of_ring_order=1
2026-12-02T07:00:01Z  INFO backend::device: recovered inflight requests volume=vol0 queue=1 resubmitted=2 out_of_ring_order=0
2026-12-02T07:00:02Z  INFO backend::poller: drained the requests in flight volume=vol0 requests=5 elapsed_us=812
2026-12-02T07:00:02Z  INFO backend::poller: drained the requests in flight volume=vol0 requests=1 elapsed_us=90
";
        assert_eq!(recovered_inflight(log), Recovered { recoveries: 2, resubmitted: 5, out_of_ring_order: 1 });
        assert_eq!(drained_at_stop(log), 6);
        assert_eq!(ready_version(log), Some("0.1.0+x"));
        assert_eq!(recovered_inflight("hcblk daemon ready api=x"), Recovered::default());
        assert_eq!(ready_version("hcblk daemon ready api=x"), None);
        assert_eq!(ready_version("hcblk daemon ready api=x version=0.1.0 node=n1"), Some("0.1.0"));
    }
}
