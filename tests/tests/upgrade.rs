//! Restart and upgrade in place, under a running guest: the daemon's binary is replaced by
//! another build between restarts, as a package manager does (renamed over the path the
//! "service" starts), and the daemon is stopped the way systemd stops it (SIGTERM, which
//! drains the requests in flight) or killed (SIGKILL, after which QEMU's inflight region lets
//! the next daemon resubmit them). QEMU reconnects (`reconnect-ms`) each time and the guest's
//! fio, verifying every write as it goes, must see no error at all.
//!
//! Run: `cargo test -p hcblk-tests --test upgrade -- --nocapture` (about 2 minutes; root, QEMU,
//! free hugepages for the daemon).

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use hcblk_tests::guest::{
    build_guest, build_hcblk_copy, hcblk_binary, install_binary, quantile, run_guest, GuestEvent, HcblkServer, Server,
    Verdict, VolumeSpec,
};
use hcblk_tests::restart::{
    drained_at_stop, fio_kill_run, ready_version, recovered_inflight, restart_under_io, seed_from_env, Cycle,
    SplitMix64,
};

const MIB: u64 = 1024 * 1024;
/// What a graceful stop may take: the daemon's own bound on draining an export
/// (`backend::export::STOP_TIMEOUT`, 10 s). A stop that hits it leaves requests behind, which
/// this test also refuses (`still busy` in the log).
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// Restarts planned: every combination of {SIGTERM, SIGKILL} × {upgrade, downgrade}, twice.
const PLANNED: usize = 8;
/// More SIGTERMs, up to this many restarts in all, while none has caught requests in flight
/// (so that the drain is shown to happen, not assumed). Under TCG the guest's CPU, not the
/// server, is the bottleneck: a SIGTERM at a random moment finds the server idle about half
/// the time. The extra ones come soon after the guest's I/O resumed, while it catches up.
const RESTARTS_MAX: usize = 14;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGTERM, wait for a clean exit: `systemctl restart`.
    Term,
    /// SIGKILL: a crash, an OOM kill, systemd's stop timeout.
    Kill,
}

/// A build of hcblk and the version it reports.
struct Build {
    path: PathBuf,
    version: String,
}

impl Build {
    fn new(path: PathBuf) -> Result<Self> {
        let out = Command::new(&path)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", path.display()))?;
        ensure!(out.status.success(), "{} --version: {out:?}", path.display());
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .trim()
            .strip_prefix("hcblk ")
            .ok_or_else(|| anyhow!("{} --version printed {text:?}", path.display()))?
            .to_owned();
        Ok(Self { path, version })
    }
}

/// What one restart showed.
struct Restart {
    stop: Stop,
    cycle: Cycle,
    /// SIGTERM: from the signal to the daemon's exit.
    stopped: Option<Duration>,
}

#[test]
fn guest_io_survives_upgrades_and_restarts_in_place() -> Result<()> {
    let seed = seed_from_env();
    let guest_dir = build_guest()?;
    // Under /tmp rather than target/: vhost-user socket paths must stay below the 108-byte
    // sun_path limit.
    let dir = std::env::temp_dir().join(format!("hcblk-upgrade-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let bin_dir = dir.join("bin");
    fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;

    // Two builds told apart by their version: the workspace's, and the same sources built with
    // a build id (only main.rs is compiled again).
    let old_path = bin_dir.join("hcblk-old");
    install_binary(&hcblk_binary()?, &old_path)?;
    let new_path = bin_dir.join("hcblk-new");
    build_hcblk_copy(&new_path, Some(&format!("upgrade-test-{}", std::process::id())))?;
    let builds = [Build::new(old_path)?, Build::new(new_path)?];
    ensure!(builds[0].version != builds[1].version, "both builds report version {}", builds[0].version);
    eprintln!("builds: {} and {}; restart moments: HCBLK_KILL_SEED={seed}", builds[0].version, builds[1].version);

    // The path the "service" runs, as /usr/local/bin/hcblk for the systemd unit.
    let installed = bin_dir.join("hcblk");
    install_binary(&builds[0].path, &installed)?;
    let mut server = HcblkServer::start_with_binary(
        installed.clone(),
        &dir,
        &VolumeSpec { size: 256 * MIB, queues: 2, read_only: false },
        &[],
    )?;
    let socket = server.socket().to_path_buf();
    check_version(&server.incarnation_log(), &builds[0], "the first start")?;

    let console = dir.join("fio-kill.log");
    let mut rng = SplitMix64(seed);
    let mut running = 0; // index into `builds` of the daemon now running
    let mut restarts: Vec<Restart> = Vec::new();
    let mut drained = 0;
    let mut resubmitted_after_kills = 0;
    let mut restart_loop = |event: GuestEvent| -> Result<()> {
        if event != GuestEvent::FioStarted {
            return Ok(());
        }
        // Let the queues fill before the first restart.
        std::thread::sleep(Duration::from_secs(3));
        let mut previous = None;
        for n in 1..=RESTARTS_MAX {
            let stop = match n {
                n if n <= PLANNED && (n - 1) % 4 < 2 => Stop::Term,
                n if n <= PLANNED => Stop::Kill,
                _ if drained == 0 => Stop::Term,
                _ => break,
            };
            // A random moment: between 0.5 and 2.5 s after I/O resumed (extra SIGTERMs:
            // 0.1 to 0.6 s).
            let wait_ms = if n <= PLANNED { 500 + rng.next_u64() % 2000 } else { 100 + rng.next_u64() % 500 };
            std::thread::sleep(Duration::from_millis(wait_ms));
            let next = 1 - running;
            install_binary(&builds[next].path, &installed)?;
            let what = format!("restart {n} ({stop:?}, {} -> {})", builds[running].version, builds[next].version);
            let mut stopped = None;
            let mut ended_log = String::new();
            let cycle = restart_under_io(&console, &what, || {
                match stop {
                    Stop::Term => {
                        let (took, log) = server.terminate_and_restart(STOP_LIMIT)?;
                        stopped = Some(took);
                        ended_log = log;
                    }
                    Stop::Kill => {
                        ended_log = server.incarnation_log();
                        server.kill_and_restart()?;
                    }
                }
                Ok(())
            })
            .with_context(|| what.clone())?;
            check_ended(&ended_log, previous, Some(stop), &what)?;
            let drained_now = if stop == Stop::Term { drained_at_stop(&ended_log) } else { 0 };
            drained += drained_now;
            if previous == Some(Stop::Kill) {
                resubmitted_after_kills += recovered_inflight(&ended_log).resubmitted;
            }
            check_version(&server.incarnation_log(), &builds[next], &what)?;
            eprintln!(
                "{what}: {}serving again after {} ms, guest I/O paused {} ms",
                stopped.map_or(String::new(), |d| format!(
                    "drained {drained_now}, exited {} ms after SIGTERM, ",
                    d.as_millis()
                )),
                cycle.serving.as_millis(),
                cycle.paused.as_millis()
            );
            restarts.push(Restart { stop, cycle, stopped });
            running = next;
            previous = Some(stop);
        }
        // The last incarnation is checked once the guest is done.
        Ok(())
    };
    // A restart takes up to ~3.5 s with the wait before it: room for slow hosts.
    let runtime = 20 + RESTARTS_MAX as u32 * 4;
    let out = run_guest(&guest_dir, &dir, &socket, &fio_kill_run(runtime, &console), Some(&mut restart_loop))?;
    ensure!(
        out.verdict == Verdict::Pass,
        "guest I/O across {} restarts and upgrades failed: {}",
        restarts.len(),
        out.describe()
    );
    ensure!(restarts.len() >= PLANNED, "only {} of {PLANNED} restarts happened", restarts.len());
    let last = restarts.last().map(|r| r.stop);
    check_ended(&server.incarnation_log(), last, None, "the guest's end")?;
    if last == Some(Stop::Kill) {
        resubmitted_after_kills += recovered_inflight(&server.incarnation_log()).resubmitted;
    }
    check_version(&server.incarnation_log(), &builds[running], "the guest's end")?;
    ensure!(
        drained > 0,
        "none of the SIGTERMs caught a request in flight: the drain was never exercised (seed {seed})"
    );

    let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis());
    for stop in [Stop::Term, Stop::Kill] {
        let of: Vec<&Restart> = restarts.iter().filter(|r| r.stop == stop).collect();
        let paused: Vec<Duration> = of.iter().map(|r| r.cycle.paused).collect();
        let serving: Vec<Duration> = of.iter().map(|r| r.cycle.serving).collect();
        eprintln!(
            "{stop:?} ({} restarts, each onto the other build): guest I/O paused p50 {} ms, max {} ms; \
             signal -> new daemon serving p50 {} ms, max {} ms",
            of.len(),
            ms(quantile(&paused, 0.5)),
            ms(quantile(&paused, 1.0)),
            ms(quantile(&serving, 0.5)),
            ms(quantile(&serving, 1.0)),
        );
    }
    let stopped: Vec<Duration> = restarts.iter().filter_map(|r| r.stopped).collect();
    eprintln!(
        "SIGTERM -> exit: p50 {} ms, max {} ms; requests in flight drained at the SIGTERMs: {drained}; \
         resubmitted after the SIGKILLs: {resubmitted_after_kills} (QEMU reconnect-ms=200, seed {seed})",
        ms(quantile(&stopped, 0.5)),
        ms(quantile(&stopped, 1.0)),
    );
    drop(server);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// The incarnation that logged `log` reported `build`'s version when it got ready.
fn check_version(log: &str, build: &Build, when: &str) -> Result<()> {
    match ready_version(log) {
        Some(v) if v == build.version => Ok(()),
        other => bail!(
            "after {when} the daemon reported version {other:?}, expected {} ({})",
            build.version,
            build.path.display()
        ),
    }
}

/// Checks the log of an incarnation that started after `started_after` (`None`: the first
/// start) and ended with `stopped_by` (`None`: still running). A daemon that started after a
/// SIGTERM found nothing to resubmit: the stop had completed every request it had taken. One
/// stopped by SIGTERM stopped cleanly, within its drain bound.
fn check_ended(log: &str, started_after: Option<Stop>, stopped_by: Option<Stop>, what: &str) -> Result<()> {
    if started_after == Some(Stop::Term) {
        let recovered = recovered_inflight(log);
        ensure!(
            recovered.resubmitted == 0,
            "the daemon started after a SIGTERM resubmitted {} requests: the stop before {what} left requests \
             in flight:\n{log}",
            recovered.resubmitted
        );
    }
    if stopped_by == Some(Stop::Term) {
        ensure!(
            log.contains("daemon stopped"),
            "no `daemon stopped` in the log of the daemon stopped for {what}:\n{log}"
        );
        ensure!(!log.contains("still busy"), "an export hit its stop timeout at {what}:\n{log}");
    }
    Ok(())
}
