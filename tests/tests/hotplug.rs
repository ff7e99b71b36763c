//! Hot-plug and hot-unplug of hcblk volumes into a running guest through QEMU's QMP:
//! `chardev-add` + `device_add vhost-user-blk-pci` to attach, `device_del` (then the
//! `DEVICE_DELETED` event) + `chardev-remove` to detach, in a loop, while the guest's other
//! disk (also hcblk) carries verified random writes all along. The guest side is the `hotplug`
//! mode of `qemu/guest/init`.
//!
//! These tests need hcblk itself (they count the daemon's threads, descriptors and mappings),
//! whatever `HCBLK_GUEST_SERVER` says.
//!
//! Run: `cargo test -p hcblk-tests --test hotplug -- --nocapture`

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hcblk_tests::guest::{build_guest, run_guest, GuestEvent, GuestRun, HcblkServer, Server, Verdict, VolumeSpec};
use hcblk_tests::qmp::Qmp;
use serde_json::json;

const MIB: u64 = 1024 * 1024;
/// The hot-plugged volume.
const VOLUME_B: &str = "volb";
/// Longest wait for the guest to see a disk come or go (TCG, a loaded host).
const GUEST_WAIT: Duration = Duration::from_secs(120);

/// What the daemon holds that a connection that went away must give back: its threads by
/// name, its descriptors by kind (`socket`, `anon_inode:[eventfd]`, a path, ...), and its
/// mappings of a frontend's memfd (guest RAM, inflight region), all sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holdings {
    threads: Vec<String>,
    fds: Vec<String>,
    memfd_maps: usize,
}

impl Holdings {
    /// What `self` holds beyond `other` (`+`) and what it lacks (`-`).
    fn diff(&self, other: &Self) -> String {
        let mut out = Vec::new();
        for (mine, theirs, what) in [(&self.threads, &other.threads, "thread"), (&self.fds, &other.fds, "fd")] {
            let mut theirs = theirs.clone();
            for item in mine {
                match theirs.iter().position(|t| t == item) {
                    Some(i) => {
                        theirs.remove(i);
                    }
                    None => out.push(format!("+{what} {item}")),
                }
            }
            out.extend(theirs.iter().map(|item| format!("-{what} {item}")));
        }
        if self.memfd_maps != other.memfd_maps {
            out.push(format!("memfd mappings {} -> {}", other.memfd_maps, self.memfd_maps));
        }
        out.join(", ")
    }

    fn summary(&self) -> String {
        format!("{} threads, {} descriptors, {} memfd mappings", self.threads.len(), self.fds.len(), self.memfd_maps)
    }
}

fn holdings(pid: u32) -> Result<Holdings> {
    let mut threads = Vec::new();
    let tasks = format!("/proc/{pid}/task");
    for task in fs::read_dir(&tasks).with_context(|| tasks.clone())?.flatten() {
        let Ok(name) = fs::read_to_string(task.path().join("comm")) else { continue };
        // io_uring's kernel workers come and go with the guest's I/O (they exit after a few
        // seconds idle), whatever the connections do.
        if !name.starts_with("iou-") {
            threads.push(name.trim().to_owned());
        }
    }
    let mut fds = Vec::new();
    let fd_dir = format!("/proc/{pid}/fd");
    for fd in fs::read_dir(&fd_dir).with_context(|| fd_dir.clone())?.flatten() {
        let Ok(target) = fs::read_link(fd.path()) else { continue };
        let target = target.to_string_lossy().into_owned();
        // `socket:[1234]` -> `socket`: the inode numbers differ from one connection to the next
        // (`anon_inode:[eventfd]` stays as it is).
        // A poller's own /proc/PID/task/TID/schedstat -> /proc/PID/task/TID/schedstat: every
        // connection's pollers are new threads, with new ids.
        let kind = match target.split_once(":[") {
            Some((kind, rest)) if rest.trim_end_matches(']').bytes().all(|b| b.is_ascii_digit()) => kind.to_owned(),
            _ => match target.split('/').collect::<Vec<_>>().as_slice() {
                ["", "proc", pid, "task", _tid, rest @ ..] => format!("/proc/{pid}/task/TID/{}", rest.join("/")),
                _ => target,
            },
        };
        fds.push(kind);
    }
    threads.sort();
    fds.sort();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).context("reading the daemon's maps")?;
    Ok(Holdings { threads, fds, memfd_maps: maps.lines().filter(|l| l.contains("/memfd:")).count() })
}

/// The daemon's holdings once they stop changing (threads of an ended connection exit a moment
/// after it ends): two equal samples 300 ms apart, within `limit`.
fn settled_holdings(pid: u32, limit: Duration) -> Result<Holdings> {
    let start = Instant::now();
    let mut last = holdings(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = holdings(pid)?;
        if now == last || start.elapsed() > limit {
            return Ok(now);
        }
        last = now;
    }
}

/// `connected: true|false` of `hcblk volume info NAME`.
fn connected(server: &HcblkServer, name: &str) -> Result<bool> {
    let info = server.cli(&["volume", "info", name])?;
    match info.lines().find_map(|l| l.strip_prefix("connected: ")) {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        _ => bail!("`hcblk volume info {name}` has no connected line:\n{info}"),
    }
}

fn wait_connected(server: &HcblkServer, name: &str, want: bool, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while connected(server, name)? != want {
        ensure!(start.elapsed() < limit, "{name}: connected stayed {} for {limit:?}", !want);
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn read_console(log: &Path) -> String {
    String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).into_owned()
}

/// From `marker` to the end of the line, for every console line that has `marker`.
fn marker_lines<'a>(console: &'a str, marker: &'a str) -> impl Iterator<Item = &'a str> {
    console.lines().filter_map(move |l| l.find(marker).map(|i| l[i..].trim_end_matches('\r')))
}

fn marker_line(console: &str, marker: &str) -> Option<String> {
    marker_lines(console, marker).next().map(str::to_owned)
}

/// Waits for the `marker` line of cycle `cycle` on the console; fails early if the guest
/// gave its verdict.
fn wait_marker(log: &Path, marker: &str, cycle: u64, limit: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        let console = read_console(log);
        if let Some(line) = marker_lines(&console, marker).find(|l| field(l, "cycle") == Some(cycle)) {
            return Ok(line.to_owned());
        }
        if let Some(verdict) = marker_line(&console, "HCBLK-RESULT") {
            bail!("the guest ended ({verdict}) while the host waited for `{marker}`");
        }
        ensure!(start.elapsed() < limit, "no `{marker}` on the console within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `key=<digits>` in a marker line.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// QMP: attach the vhost-user socket `socket` as a virtio-blk disk in root port `hp0`.
fn plug(qmp: &mut Qmp, socket: &Path) -> Result<()> {
    qmp.execute(
        "chardev-add",
        json!({"id": "hpchr0", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": socket}},
            "server": false, "reconnect-ms": 1000}}}),
    )?;
    qmp.execute(
        "device_add",
        json!({"driver": "vhost-user-blk-pci", "id": "hpdisk0", "chardev": "hpchr0", "bus": "hp0", "num-queues": 1}),
    )?;
    Ok(())
}

/// QMP: detach what `plug` attached. `device_del` only asks the guest; the device is gone at
/// its `DEVICE_DELETED` event (QEMU also sends one for the inner virtio backend, without
/// `device`), and only then may its chardev go.
fn unplug(qmp: &mut Qmp) -> Result<()> {
    qmp.execute("device_del", json!({"id": "hpdisk0"}))?;
    qmp.wait_event("DEVICE_DELETED", |d| d["device"] == "hpdisk0", GUEST_WAIT)?;
    qmp.execute("chardev-remove", json!({"id": "hpchr0"}))?;
    Ok(())
}

/// Attaches volume B to the guest whose console is `log` (cycle `cycle` of its `hotplug`
/// mode) and waits until the guest has verified it; returns the generation the guest found.
fn attach_and_verify(qmp: &mut Qmp, log: &Path, socket: &Path, cycle: u64) -> Result<u64> {
    plug(qmp, socket).with_context(|| format!("attaching {VOLUME_B}, cycle {cycle}"))?;
    let ready = wait_marker(log, "HCBLK-DISK-READY ", cycle, GUEST_WAIT)?;
    let console = read_console(log);
    let gen = marker_lines(&console, "HCBLK-DISK-ADDED ").nth(cycle as usize - 1).and_then(|l| field(l, "gen"));
    gen.with_context(|| format!("no generation in the guest's HCBLK-DISK-ADDED line of cycle {cycle}: {ready}"))
}

/// One test at a time: their TCG guests would slow each other down on a small machine.
static GUEST_LOCK: Mutex<()> = Mutex::new(());

struct Fixture {
    _lock: MutexGuard<'static, ()>,
    guest_dir: PathBuf,
    dir: PathBuf,
    server: HcblkServer,
    socket_a: PathBuf,
    socket_b: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Result<Self> {
        // A test that failed while holding the lock leaves nothing shared behind.
        let lock = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let guest_dir = build_guest()?;
        // Under /tmp: vhost-user socket paths must stay below the 108-byte sun_path limit.
        let dir = std::env::temp_dir().join(format!("hcblk-hotplug-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let server = HcblkServer::start(&dir, &VolumeSpec { size: 256 * MIB, queues: 2, read_only: false })?;
        let socket_a = server.socket().to_path_buf();
        let socket_b = server.create_volume(VOLUME_B, &VolumeSpec { size: 64 * MIB, queues: 1, read_only: false })?;
        Ok(Self { _lock: lock, guest_dir, dir, server, socket_a, socket_b })
    }

    fn passed(self) {
        drop(self.server);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The guest boots with volume A (2 queues) and runs fio random writes verified as they go on
/// it all along, while the host attaches volume B through QMP, waits for the guest to see it
/// and write-verify it, detaches it, and again, `cycles` times (5; 20 with `HCBLK_SOAK=1`).
/// The last two detaches happen while fio writes to B at iodepth 32. One more attach tells the
/// guest to stop; it powers off with B still attached.
///
/// Checked: each attach sees the generation the previous one wrote (the same volume, its data
/// intact: the guest also re-verifies what the previous attach wrote); the guest's I/O on A
/// went on during every cycle without a single error; after every detach the daemon is alive,
/// answers `volume list`/`info`, says B is no longer connected, and holds exactly the threads,
/// descriptors and memfd mappings it held after the first detach (nothing leaks per
/// connection); the guest's verdict.
#[test]
fn hotplug_loop_with_io_on_another_disk() -> Result<()> {
    let soak = std::env::var("HCBLK_SOAK").is_ok_and(|v| !v.is_empty() && v != "0");
    let cycles: u64 = if soak { 20 } else { 5 };
    let busy_from = cycles - 1;
    let mut fx = Fixture::new("loop")?;
    let log = fx.dir.join("hotplug.log");
    let qmp_path = fx.dir.join("qmp.sock");
    let pid = fx.server.pid();
    let socket_b = fx.socket_b.clone();
    let server = &mut fx.server;
    let mut baseline: Option<Holdings> = None;
    let mut cycle_times = Vec::new();
    let mut hotplug_loop = |event: GuestEvent| -> Result<()> {
        if event != GuestEvent::FioStarted {
            return Ok(());
        }
        let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(10))?;
        for cycle in 1..=cycles {
            let start = Instant::now();
            let gen = attach_and_verify(&mut qmp, &log, &socket_b, cycle)?;
            ensure!(gen == cycle - 1, "attach {cycle} found generation {gen} on {VOLUME_B}, expected {}", cycle - 1);
            ensure!(connected(server, VOLUME_B)?, "{VOLUME_B} not connected while the guest uses it");
            let attached = start.elapsed();
            unplug(&mut qmp).with_context(|| format!("detaching {VOLUME_B}, cycle {cycle}"))?;
            wait_marker(&log, "HCBLK-DISK-REMOVED ", cycle, GUEST_WAIT)?;
            wait_connected(server, VOLUME_B, false, Duration::from_secs(10))?;
            if let Some(status) = server.exited()? {
                bail!("the hcblk daemon exited ({status}) after detach {cycle}");
            }
            let list = server.cli(&["volume", "list"])?;
            ensure!(list.contains(VOLUME_B) && list.contains("vol0"), "volume list after detach {cycle}:\n{list}");
            let now = settled_holdings(pid, Duration::from_secs(10))?;
            match &baseline {
                None => baseline = Some(now.clone()),
                Some(first) => {
                    // Threads may still be on their way out: give them a few seconds.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut now = now;
                    while now != *first && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(200));
                        now = holdings(pid)?;
                    }
                    ensure!(
                        now == *first,
                        "after detach {cycle} the daemon holds {} (against after the first detach: {})",
                        now.summary(),
                        now.diff(first)
                    );
                }
            }
            eprintln!(
                "cycle {cycle}{}: attached and verified by the guest in {:.1} s, detached in {:.1} s; daemon holds {}",
                if cycle >= busy_from { " (detached under I/O)" } else { "" },
                attached.as_secs_f64(),
                (start.elapsed() - attached).as_secs_f64(),
                baseline.as_ref().map(Holdings::summary).unwrap_or_default()
            );
            cycle_times.push(start.elapsed());
        }
        // The guest's signal to stop: one more attach, which it leaves alone; it powers off with
        // the disk attached (QEMU then closes both connections at once).
        plug(&mut qmp, &socket_b).with_context(|| format!("attaching {VOLUME_B} as the stop signal"))?;
        Ok(())
    };
    let run = GuestRun::new("hotplug")
        .param("size", "32M")
        .param("cycles", &cycles.to_string())
        .param("busy_from", &busy_from.to_string())
        .hotplug(&qmp_path, 1)
        .timeout_s(120 + 120 * cycles as u32)
        .log(&log);
    let socket_a = fx.socket_a.clone();
    let out = run_guest(&fx.guest_dir, &fx.dir, &socket_a, &run, Some(&mut hotplug_loop))?;
    ensure!(out.verdict == Verdict::Pass, "hotplug guest failed: {}", out.describe());
    ensure!(cycle_times.len() == cycles as usize, "{} of {cycles} cycles ran", cycle_times.len());
    let removed = out.console.matches("HCBLK-DISK-REMOVED").count();
    ensure!(removed == cycles as usize, "the guest saw {removed} removals, expected {cycles}");
    let busy = out.console.matches("HCBLK-BUSY-FIO").count() as u64;
    ensure!(busy == cycles - busy_from + 1, "{busy} detaches under I/O, expected {}", cycles - busy_from + 1);
    ensure!(out.console.contains("HCBLK-DISK-STOP"), "the guest never saw the stop signal: {}", out.describe());
    // QEMU is gone, with volume B still attached: both connections end, the daemon stays.
    wait_connected(&fx.server, "vol0", false, Duration::from_secs(10))?;
    wait_connected(&fx.server, VOLUME_B, false, Duration::from_secs(10))?;
    if let Some(status) = fx.server.exited()? {
        bail!("the hcblk daemon exited ({status}) by the end of the guest");
    }
    let daemon_log = fs::read_to_string(fx.dir.join("daemon.log")).unwrap_or_default();
    ensure!(!daemon_log.contains("panicked"), "the daemon panicked:\n{daemon_log}");
    for line in marker_lines(&out.console, "HCBLK-BUSY-FIO ") {
        eprintln!("guest: {line}");
    }
    let total: Duration = cycle_times.iter().sum();
    eprintln!(
        "{cycles} attach/detach cycles of {VOLUME_B} in {:.1} s (mean {:.1} s), guest {:.1} s in all; {}",
        total.as_secs_f64(),
        total.as_secs_f64() / cycles as f64,
        out.elapsed.as_secs_f64(),
        marker_line(&out.console, "HCBLK-VDA-ROUNDS").unwrap_or_default()
    );
    fx.passed();
    Ok(())
}

/// Volume B goes from one running VM to another, which is killed (SIGKILL: the frontend
/// vanishes with writes in flight) while it writes to B, and then back to the first VM.
///
/// VM 1 (volume A, fio on it all along) gets B, verifies it and lets it go; VM 2 (volume C)
/// boots while VM 1 runs, gets B, finds what VM 1 wrote (generation 1), verifies it, starts
/// fio random writes to it at iodepth 32 and is killed. The daemon must stay up, see the
/// connection end and answer its CLI; VM 1 then gets B back and finds what VM 2 wrote
/// (generation 2, its verified region intact).
#[test]
fn a_volume_moves_to_another_vm_and_survives_that_vm_being_killed() -> Result<()> {
    let fx = Fixture::new("move")?;
    let socket_c = fx.server.create_volume("volc", &VolumeSpec { size: 64 * MIB, queues: 1, read_only: false })?;
    let log1 = fx.dir.join("vm1.log");
    let log2 = fx.dir.join("vm2.log");
    let qmp1 = fx.dir.join("qmp1.sock");
    let qmp2 = fx.dir.join("qmp2.sock");
    let pidfile2 = fx.dir.join("vm2.pid");
    let socket_b = fx.socket_b.clone();
    let server = &fx.server;
    let (guest_dir, dir) = (fx.guest_dir.clone(), fx.dir.clone());
    let mut vm2_outcome = None;
    let mut moves = |event: GuestEvent| -> Result<()> {
        if event != GuestEvent::FioStarted {
            return Ok(());
        }
        let mut qmp = Qmp::connect(&qmp1, Duration::from_secs(10))?;
        let gen = attach_and_verify(&mut qmp, &log1, &socket_b, 1)?;
        ensure!(gen == 0, "VM 1 found generation {gen} on a new {VOLUME_B}");
        unplug(&mut qmp)?;
        wait_marker(&log1, "HCBLK-DISK-REMOVED ", 1, GUEST_WAIT)?;
        wait_connected(server, VOLUME_B, false, Duration::from_secs(10))?;

        // VM 2, while VM 1 runs on.
        let mut kill_when_busy = |event: GuestEvent| -> Result<()> {
            if event != GuestEvent::FioStarted {
                return Ok(());
            }
            let mut qmp2 = Qmp::connect(&qmp2, Duration::from_secs(10))?;
            let gen = attach_and_verify(&mut qmp2, &log2, &socket_b, 1)?;
            ensure!(gen == 1, "VM 2 found generation {gen} on {VOLUME_B}, expected VM 1's (1)");
            ensure!(connected(server, VOLUME_B)?, "{VOLUME_B} not connected while VM 2 writes to it");
            // VM 1 asks for B while VM 2 has it: hcblk closes the second connection at once, so
            // VM 1's device_add fails in a moment (left waiting, it would block VM 1's QEMU, its
            // monitor included, until VM 2 let B go) and VM 2 carries on.
            let asked = Instant::now();
            let second = plug(&mut qmp, &socket_b);
            let took = asked.elapsed();
            let _ = qmp.execute("chardev-remove", json!({"id": "hpchr0"}));
            ensure!(second.is_err(), "VM 1 got {VOLUME_B} while VM 2 had it");
            ensure!(took < Duration::from_secs(30), "VM 1's device_add of a volume VM 2 has took {took:?} to fail");
            eprintln!(
                "VM 1's device_add of {VOLUME_B} while VM 2 had it failed after {} ms: {:#}",
                took.as_millis(),
                second.unwrap_err()
            );
            ensure!(connected(server, VOLUME_B)?, "{VOLUME_B} lost VM 2 when VM 1 asked for it");
            let pid = fs::read_to_string(&pidfile2).context("reading VM 2's pidfile")?;
            let status = std::process::Command::new("kill").args(["-KILL", pid.trim()]).status()?;
            ensure!(status.success(), "kill -KILL {} failed", pid.trim());
            Ok(())
        };
        let mut vm2 = GuestRun::new("hotplug")
            .queues(1)
            .param("size", "16M")
            .param("cycles", "1")
            .param("busy_from", "1")
            .hotplug(&qmp2, 1)
            .pidfile(&pidfile2)
            .timeout_s(300)
            .log(&log2);
        vm2.smp = 1;
        let out = run_guest(&guest_dir, &dir, &socket_c, &vm2, Some(&mut kill_when_busy))?;
        ensure!(
            out.verdict == Verdict::NoVerdict && out.console.contains("HCBLK-DISK-READY vdb cycle=1 busy"),
            "VM 2 should have been killed while writing to {VOLUME_B}: {}",
            out.describe()
        );
        wait_connected(server, VOLUME_B, false, Duration::from_secs(10))?;
        wait_connected(server, "volc", false, Duration::from_secs(10))?;
        vm2_outcome = Some(out.elapsed);

        // Back to VM 1.
        let gen = attach_and_verify(&mut qmp, &log1, &socket_b, 2)?;
        ensure!(gen == 2, "VM 1 found generation {gen} on {VOLUME_B} after VM 2, expected VM 2's (2)");
        unplug(&mut qmp)?;
        wait_marker(&log1, "HCBLK-DISK-REMOVED ", 2, GUEST_WAIT)?;
        plug(&mut qmp, &socket_b).context("the stop signal")?;
        Ok(())
    };
    let vm1 = GuestRun::new("hotplug")
        .param("size", "32M")
        .param("cycles", "2")
        // VM 2 boots and runs between VM 1's two cycles.
        .param("hotplug_timeout", "400")
        .hotplug(&qmp1, 1)
        .timeout_s(900)
        .log(&log1);
    let out = run_guest(&fx.guest_dir, &fx.dir, &fx.socket_a, &vm1, Some(&mut moves))?;
    ensure!(out.verdict == Verdict::Pass, "VM 1 failed: {}", out.describe());
    let vm2_elapsed = vm2_outcome.context("VM 2 never ran")?;
    let daemon_log = fs::read_to_string(fx.dir.join("daemon.log")).unwrap_or_default();
    ensure!(!daemon_log.contains("panicked"), "the daemon panicked:\n{daemon_log}");
    let abandoned: u64 = daemon_log
        .lines()
        .filter(|l| l.contains("requests were still in flight"))
        .filter_map(|l| field(l, "abandoned"))
        .sum();
    let list = fx.server.cli(&["volume", "list"])?;
    ensure!(list.contains(VOLUME_B) && list.contains("volc"), "volume list at the end:\n{list}");
    eprintln!(
        "{VOLUME_B}: VM 1 -> VM 2 (killed while writing to it; {abandoned} requests still in the daemon at the kill) \
         -> VM 1; VM 2 ran {:.1} s, VM 1 {:.1} s",
        vm2_elapsed.as_secs_f64(),
        out.elapsed.as_secs_f64()
    );
    fx.passed();
    Ok(())
}
