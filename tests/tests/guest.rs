//! Real-guest tests: a Linux guest under QEMU (TCG) drives a vhost-user-blk
//! server through virtio-blk and fio. The server comes from
//! `hcblk_tests::guest::start_server` (`HCBLK_GUEST_SERVER`: `hcblk`, the
//! default, or `qsd`). Each test takes one to three guest boots of
//! 8–25 s; they run one at a time because TCG guests are CPU bound.
//!
//! Run: `cargo test -p hcblk-tests --test guest -- --nocapture`

use std::fs;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use anyhow::{ensure, Context, Result};
use hcblk_tests::guest::{build_guest, quantile, run_guest, start_server, GuestEvent, GuestRun, Verdict, VolumeSpec};
use hcblk_tests::restart::{
    fio_kill_run, recovered_inflight, restart_under_io, seed_from_env, Cycle, Recovered, SplitMix64,
};

const MIB: u64 = 1024 * 1024;

/// One guest at a time: two TCG guests on a two-core machine slow each other
/// past their timeouts and measure nothing.
static GUEST_LOCK: Mutex<()> = Mutex::new(());

struct Fixture {
    _lock: MutexGuard<'static, ()>,
    guest_dir: PathBuf,
    /// Sockets, image and console logs; kept when a test fails.
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Result<Self> {
        // A test that panicked while holding the lock leaves nothing shared
        // behind (each test has its own dir and server), so poison is harmless.
        let lock = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let guest_dir = build_guest()?;
        // Under /tmp rather than target/: vhost-user socket paths must stay
        // below the 108-byte sun_path limit.
        let dir = std::env::temp_dir().join(format!("hcblk-guest-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { _lock: lock, guest_dir, dir })
    }

    fn passed(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn guest_fio_verify_on_two_queues() -> Result<()> {
    let fx = Fixture::new("fio-verify")?;
    let server = start_server(&fx.dir, &VolumeSpec { size: 256 * MIB, queues: 2, read_only: false })?;
    // Two CPUs, two pinned jobs: each virtqueue must raise completions.
    let run = GuestRun::new("fio-verify").param("size", "64M").param("require_queues", "2");
    let out = run_guest(&fx.guest_dir, &fx.dir, server.socket(), &run, None)?;
    ensure!(out.verdict == Verdict::Pass, "fio verify failed: {}", out.describe());
    ensure!(out.console.contains("HCBLK-QUEUES-BUSY 2"), "both queues should carry I/O: {}", out.describe());
    eprintln!("boot + 64 MiB fio write/verify round: {:.1} s", out.elapsed.as_secs_f64());
    drop(server);
    fx.passed();
    Ok(())
}

#[test]
fn guest_detects_a_corrupted_block_between_boots() -> Result<()> {
    let fx = Fixture::new("corrupt")?;
    let mut server = start_server(&fx.dir, &VolumeSpec { size: 256 * MIB, queues: 2, read_only: false })?;
    let socket = server.socket().to_path_buf();
    // The same layout in every boot: verify-only recomputes it from these.
    let write = GuestRun::new("fio-write").param("size", "64M");
    let verify = GuestRun::new("fio-verify-only").param("size", "64M");

    let out = run_guest(&fx.guest_dir, &fx.dir, &socket, &write, None)?;
    ensure!(out.verdict == Verdict::Pass, "fio write failed: {}", out.describe());

    // Control: the data survives a reboot, so a FAIL below can only come from
    // the corruption.
    let out = run_guest(&fx.guest_dir, &fx.dir, &socket, &verify, None)?;
    ensure!(out.verdict == Verdict::Pass, "data did not persist across boots: {}", out.describe());

    // Inside the first 4 KiB fio block after 1 MiB, away from its header.
    server.corrupt(MIB + 4096 + 100, 64)?;
    let out = run_guest(&fx.guest_dir, &fx.dir, &socket, &verify, None)?;
    match &out.verdict {
        Verdict::Fail(reason) if reason.contains("verify failed") || reason.contains("bad ") => {
            eprintln!("corruption detected as expected: {reason}");
        }
        _ => anyhow::bail!("a corrupted block must fail fio verification: {}", out.describe()),
    }
    drop(server);
    fx.passed();
    Ok(())
}

#[test]
fn guest_sees_a_live_resize() -> Result<()> {
    let fx = Fixture::new("resize")?;
    let mut server = start_server(&fx.dir, &VolumeSpec { size: 256 * MIB, queues: 2, read_only: false })?;
    let socket = server.socket().to_path_buf();
    let mut seen_sectors = None;
    let mut grow = |event: GuestEvent| -> Result<()> {
        if let GuestEvent::ResizeWait { sectors } = event {
            seen_sectors = Some(sectors);
            server.resize(512 * MIB)?;
        }
        Ok(())
    };
    let run = GuestRun::new("resize").param("resize_timeout", "60");
    let out = run_guest(&fx.guest_dir, &fx.dir, &socket, &run, Some(&mut grow))?;
    ensure!(seen_sectors == Some(256 * MIB / 512), "guest saw {seen_sectors:?} sectors before the resize");
    ensure!(out.verdict == Verdict::Pass, "resize not seen: {}", out.describe());
    ensure!(
        out.console.contains(&format!("HCBLK-RESIZED {}", 512 * MIB / 512)),
        "guest saw a different size: {}",
        out.describe()
    );
    drop(server);
    fx.passed();
    Ok(())
}

#[test]
fn guest_cannot_write_a_read_only_export() -> Result<()> {
    let fx = Fixture::new("read-only")?;
    let server = start_server(&fx.dir, &VolumeSpec { size: 64 * MIB, queues: 1, read_only: true })?;
    let run = GuestRun::new("read-only").queues(1);
    let out = run_guest(&fx.guest_dir, &fx.dir, server.socket(), &run, None)?;
    ensure!(out.verdict == Verdict::Pass, "read-only export misbehaved: {}", out.describe());
    drop(server);
    fx.passed();
    Ok(())
}

#[test]
fn guest_reconnects_after_a_server_restart() -> Result<()> {
    let fx = Fixture::new("reconnect")?;
    let mut server = start_server(&fx.dir, &VolumeSpec { size: 256 * MIB, queues: 2, read_only: false })?;
    let socket = server.socket().to_path_buf();
    let mut restarts = 0;
    let mut restart_when_idle = |event: GuestEvent| -> Result<()> {
        if event == GuestEvent::Idle {
            server.restart()?;
            restarts += 1;
        }
        Ok(())
    };
    // idle=10 s covers the restart plus QEMU's 1 s reconnect timer on a loaded host.
    let run = GuestRun::new("reconnect").param("size", "64M").param("idle", "10").reconnect_ms(1000);
    let out = run_guest(&fx.guest_dir, &fx.dir, &socket, &run, Some(&mut restart_when_idle))?;
    ensure!(restarts == 1, "the server was restarted {restarts} times, expected once");
    ensure!(out.verdict == Verdict::Pass, "guest data or I/O did not survive a server restart: {}", out.describe());
    drop(server);
    fx.passed();
    Ok(())
}

/// Stricter than the idle restart: a guest (2 queues, fio random writes at
/// iodepth 16 verified as they go) keeps running while the host kills the
/// server with SIGKILL at random moments and starts it again, at least 10 times
/// (20 with `HCBLK_SOAK=1`), and more until some kill caught requests in flight;
/// QEMU reconnects (`reconnect-ms`). The requests in
/// flight at each kill can only complete if the server tracks them
/// (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) and resubmits them after QEMU's
/// reconnect: no guest I/O error, no verify error, nothing about the disk in the
/// guest's kernel log. Prints the time from each kill to the guest's I/O
/// resuming (measured by the guest: the pause in its disk's completions).
/// qemu-storage-daemon 10.0, which has no inflight tracking, passed 1 of 4
/// graceful restarts here; `HCBLK_GUEST_SERVER=qsd` runs it against it.
/// `HCBLK_KILL_SEED=N` replays the kill moments of a run.
#[test]
fn guest_io_survives_a_server_restart() -> Result<()> {
    let soak = std::env::var("HCBLK_SOAK").is_ok_and(|v| !v.is_empty() && v != "0");
    let kills: usize = if soak { 20 } else { 10 };
    let seed = seed_from_env();
    eprintln!("kill loop: {kills} kills, HCBLK_KILL_SEED={seed}");
    let fx = Fixture::new("kill")?;
    let mut server = start_server(&fx.dir, &VolumeSpec { size: 256 * MIB, queues: 2, read_only: false })?;
    let socket = server.socket().to_path_buf();
    let log = fx.dir.join("fio-kill.log");
    let mut rng = SplitMix64(seed);
    let mut cycles: Vec<Cycle> = Vec::new();
    let daemon_log = fx.dir.join("daemon.log");
    let recovered = || recovered_inflight(&fs::read_to_string(&daemon_log).unwrap_or_default());
    // Whether a kill caught requests in flight depends on where the guest was: under TCG the
    // guest's CPU, not the server, is the bottleneck, so the server is idle much of the time.
    // The loop kills at least `kills` times and goes on (up to twice as many) until some kill
    // caught requests in flight, read from what each restart logged it recovered.
    let max_kills = 2 * kills;
    let mut kill_loop = |event: GuestEvent| -> Result<()> {
        if event != GuestEvent::FioStarted {
            return Ok(());
        }
        // Let the queues fill before the first kill.
        std::thread::sleep(std::time::Duration::from_secs(3));
        for i in 0..max_kills {
            if i >= kills && recovered().resubmitted > 0 {
                break;
            }
            // A random moment: between 0.5 and 3 s after I/O resumed.
            std::thread::sleep(std::time::Duration::from_millis(500 + rng.next_u64() % 2500));
            let what = format!("kill {}", i + 1);
            let cycle = restart_under_io(&log, &what, || server.kill_and_restart().context(what.clone()))?;
            eprintln!(
                "{what}: server serving again after {} ms, guest I/O paused {} ms",
                cycle.serving.as_millis(),
                cycle.paused.as_millis()
            );
            cycles.push(cycle);
        }
        Ok(())
    };
    // Each kill takes up to ~3.5 s with the restart: the runtime leaves room for slow hosts.
    let runtime = 20 + max_kills as u32 * 4;
    let run = fio_kill_run(runtime, &log);
    let out = run_guest(&fx.guest_dir, &fx.dir, &socket, &run, Some(&mut kill_loop))?;
    ensure!(out.verdict == Verdict::Pass, "guest I/O across {} server kills failed: {}", cycles.len(), out.describe());
    ensure!(
        (kills..=max_kills).contains(&cycles.len()),
        "the server was killed {} times, expected {kills} to {max_kills}",
        cycles.len()
    );
    // hcblk logs what each restart recovered: the kills must have caught requests in
    // flight, or this test proves nothing about them.
    // (qemu-storage-daemon, the reference server, writes no such log.)
    if daemon_log.exists() {
        let Recovered { recoveries, resubmitted, out_of_ring_order } = recovered();
        eprintln!(
            "requests in flight at the kills, resubmitted after QEMU reconnected: {resubmitted} \
             over {recoveries} queue recoveries; {out_of_ring_order} of them out of ring order (a server \
             without inflight tracking would have lost them and completed others twice)",
        );
        ensure!(
            resubmitted > 0,
            "no request was in flight at any of the {} kills: the kills missed the I/O",
            cycles.len()
        );
    }
    let serving: Vec<_> = cycles.iter().map(|c| c.serving).collect();
    let paused: Vec<_> = cycles.iter().map(|c| c.paused).collect();
    let ms = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_millis());
    eprintln!(
        "kill -9 -> guest I/O resumed (guest-measured pause) over {} kills: p50 {} ms, max {} ms; \
         kill -9 -> new server serving: p50 {} ms, max {} ms (QEMU reconnect-ms=200, seed {seed})",
        cycles.len(),
        ms(quantile(&paused, 0.5)),
        ms(quantile(&paused, 1.0)),
        ms(quantile(&serving, 0.5)),
        ms(quantile(&serving, 1.0)),
    );
    drop(server);
    fx.passed();
    Ok(())
}
