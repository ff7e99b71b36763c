//! Real-guest tests: a Linux guest under QEMU (TCG) drives a vhost-user-blk
//! server through virtio-blk and fio. The server comes from
//! `hcblk_tests::guest::start_server` (`HCBLK_GUEST_SERVER`, default
//! `qemu-storage-daemon`). Each test takes one to three guest boots of
//! 8–25 s; they run one at a time because TCG guests are CPU bound.
//!
//! Run: `cargo test -p hcblk-tests --test guest -- --nocapture`

use std::fs;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use anyhow::{ensure, Context, Result};
use hcblk_tests::guest::{
    build_guest, run_guest, start_server, GuestEvent, GuestRun, Verdict, VolumeSpec,
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
        Ok(Self {
            _lock: lock,
            guest_dir,
            dir,
        })
    }

    fn passed(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn guest_fio_verify_on_two_queues() -> Result<()> {
    let fx = Fixture::new("fio-verify")?;
    let server = start_server(
        &fx.dir,
        &VolumeSpec {
            size: 256 * MIB,
            queues: 2,
            read_only: false,
        },
    )?;
    // Two CPUs, two pinned jobs: each virtqueue must raise completions.
    let run = GuestRun::new("fio-verify")
        .param("size", "64M")
        .param("require_queues", "2");
    let out = run_guest(&fx.guest_dir, &fx.dir, server.socket(), &run, None)?;
    ensure!(
        out.verdict == Verdict::Pass,
        "fio verify failed: {}",
        out.describe()
    );
    ensure!(
        out.console.contains("HCBLK-QUEUES-BUSY 2"),
        "both queues should carry I/O: {}",
        out.describe()
    );
    eprintln!(
        "boot + 64 MiB fio write/verify round: {:.1} s",
        out.elapsed.as_secs_f64()
    );
    drop(server);
    fx.passed();
    Ok(())
}

#[test]
fn guest_detects_a_corrupted_block_between_boots() -> Result<()> {
    let fx = Fixture::new("corrupt")?;
    let mut server = start_server(
        &fx.dir,
        &VolumeSpec {
            size: 256 * MIB,
            queues: 2,
            read_only: false,
        },
    )?;
    let socket = server.socket().to_path_buf();
    // The same layout in every boot: verify-only recomputes it from these.
    let write = GuestRun::new("fio-write").param("size", "64M");
    let verify = GuestRun::new("fio-verify-only").param("size", "64M");

    let out = run_guest(&fx.guest_dir, &fx.dir, &socket, &write, None)?;
    ensure!(
        out.verdict == Verdict::Pass,
        "fio write failed: {}",
        out.describe()
    );

    // Control: the data survives a reboot, so a FAIL below can only come from
    // the corruption.
    let out = run_guest(&fx.guest_dir, &fx.dir, &socket, &verify, None)?;
    ensure!(
        out.verdict == Verdict::Pass,
        "data did not persist across boots: {}",
        out.describe()
    );

    // Inside the first 4 KiB fio block after 1 MiB, away from its header.
    server.corrupt(MIB + 4096 + 100, 64)?;
    let out = run_guest(&fx.guest_dir, &fx.dir, &socket, &verify, None)?;
    match &out.verdict {
        Verdict::Fail(reason) if reason.contains("verify failed") || reason.contains("bad ") => {
            eprintln!("corruption detected as expected: {reason}");
        }
        _ => anyhow::bail!(
            "a corrupted block must fail fio verification: {}",
            out.describe()
        ),
    }
    drop(server);
    fx.passed();
    Ok(())
}

#[test]
fn guest_sees_a_live_resize() -> Result<()> {
    let fx = Fixture::new("resize")?;
    let mut server = start_server(
        &fx.dir,
        &VolumeSpec {
            size: 256 * MIB,
            queues: 2,
            read_only: false,
        },
    )?;
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
    ensure!(
        seen_sectors == Some(256 * MIB / 512),
        "guest saw {seen_sectors:?} sectors before the resize"
    );
    ensure!(
        out.verdict == Verdict::Pass,
        "resize not seen: {}",
        out.describe()
    );
    ensure!(
        out.console
            .contains(&format!("HCBLK-RESIZED {}", 512 * MIB / 512)),
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
    let server = start_server(
        &fx.dir,
        &VolumeSpec {
            size: 64 * MIB,
            queues: 1,
            read_only: true,
        },
    )?;
    let run = GuestRun::new("read-only").queues(1);
    let out = run_guest(&fx.guest_dir, &fx.dir, server.socket(), &run, None)?;
    ensure!(
        out.verdict == Verdict::Pass,
        "read-only export misbehaved: {}",
        out.describe()
    );
    drop(server);
    fx.passed();
    Ok(())
}

#[test]
fn guest_reconnects_after_a_server_restart() -> Result<()> {
    let fx = Fixture::new("reconnect")?;
    let mut server = start_server(
        &fx.dir,
        &VolumeSpec {
            size: 256 * MIB,
            queues: 2,
            read_only: false,
        },
    )?;
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
    let run = GuestRun::new("reconnect")
        .param("size", "64M")
        .param("idle", "10")
        .reconnect_ms(1000);
    let out = run_guest(
        &fx.guest_dir,
        &fx.dir,
        &socket,
        &run,
        Some(&mut restart_when_idle),
    )?;
    ensure!(
        restarts == 1,
        "the server was restarted {restarts} times, expected once"
    );
    ensure!(
        out.verdict == Verdict::Pass,
        "guest data or I/O did not survive a server restart: {}",
        out.describe()
    );
    drop(server);
    fx.passed();
    Ok(())
}

/// Stricter than the idle restart: requests are in flight when the server
/// stops, and QEMU can only resubmit them if the server tracks in-flight
/// requests (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD). qemu-storage-daemon 10.0
/// passed 1 of 4 tries here, hcblk 2 of 3 (its graceful stop completes what it had popped,
/// but requests QEMU had made available and not yet seen processed are resubmitted or lost
/// depending on timing);
/// the others ended in "virtio_blk virtio0: req.0:id 5 is not a head!", guest
/// I/O errors and a hung fio. Run it explicitly against a server that claims
/// this: `cargo test -p hcblk-tests --test guest -- --ignored`.
#[test]
#[ignore = "needs inflight-I/O tracking (INFLIGHT_SHMFD), which neither qemu-storage-daemon nor hcblk (vhost-user-backend 0.24) has; see doc comment"]
fn guest_io_survives_a_server_restart() -> Result<()> {
    let fx = Fixture::new("restart")?;
    let mut server = start_server(
        &fx.dir,
        &VolumeSpec {
            size: 256 * MIB,
            queues: 2,
            read_only: false,
        },
    )?;
    let socket = server.socket().to_path_buf();
    let mut restarts = 0;
    let mut restart_mid_io = |event: GuestEvent| -> Result<()> {
        if event == GuestEvent::FioStarted {
            // Let the write phase get going so requests are in flight.
            std::thread::sleep(std::time::Duration::from_secs(2));
            server.restart()?;
            restarts += 1;
        }
        Ok(())
    };
    // 192 MiB keeps fio busy well past the 2 s delay even on a fast host.
    let run = GuestRun::new("fio-verify")
        .param("size", "192M")
        .reconnect_ms(1000);
    let out = run_guest(
        &fx.guest_dir,
        &fx.dir,
        &socket,
        &run,
        Some(&mut restart_mid_io),
    )?;
    ensure!(
        restarts == 1,
        "the server was restarted {restarts} times, expected once"
    );
    ensure!(
        out.verdict == Verdict::Pass,
        "guest I/O across a server restart failed: {}",
        out.describe()
    );
    drop(server);
    fx.passed();
    Ok(())
}
