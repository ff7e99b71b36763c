//! Stopping an export, and the daemon, never depends on the socket file: an operator or a
//! tmpfiles cleaner may have removed it. A file removed under a running export is bound again;
//! a file another process listens on is left alone.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backend::export::SOCKET_CHECK;
use backend::PollMode;
use common::{pattern, Client, Volume};
use replica::BackingKind;

const MIB: u64 = 1 << 20;
const WATCHDOG: Duration = Duration::from_secs(120);
/// What a stop may take with nothing in flight: far less than `STOP_TIMEOUT`.
const STOP_BOUND: Duration = Duration::from_secs(3);
const HCBLK: &str = env!("CARGO_BIN_EXE_hcblk");

fn inode(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Writes and reads back 4 KiB through `client`.
fn io(client: &mut Client, seed: u64) {
    let data = pattern(seed, 4096);
    client.buf()[..4096].copy_from_slice(&data);
    assert_eq!(client.write(0, 4096 * seed, 0, 4096), 0);
    assert_eq!(client.read(0, 4096 * seed, 4096, 4096), 0);
    assert!(client.buf()[4096..8192] == data[..]);
}

#[test]
fn an_export_stops_without_its_socket_file() {
    common::with_watchdog(WATCHDOG, || {
        // No frontend: the serving thread waits for one.
        let vol = Volume::new();
        let export = vol.export(vol.backing(BackingKind::File, 4 * MIB, 512, false), 1, PollMode::Adaptive);
        // Long enough for the serving thread to be waiting for a frontend, not just starting.
        std::thread::sleep(Duration::from_millis(300));
        std::fs::remove_file(&vol.socket).unwrap();
        let started = Instant::now();
        export.stop();
        assert!(started.elapsed() < STOP_BOUND, "idle export took {:?} to stop", started.elapsed());

        // A frontend connected, I/O done, the file gone.
        let vol = Volume::new();
        let export = vol.export(vol.backing(BackingKind::File, 4 * MIB, 512, false), 2, PollMode::Never);
        let mut client = Client::connect(&vol.socket, 2, 1 << 20);
        io(&mut client, 1);
        std::fs::remove_file(&vol.socket).unwrap();
        let started = Instant::now();
        export.stop();
        assert!(started.elapsed() < STOP_BOUND, "connected export took {:?} to stop", started.elapsed());
        drop(client);
    });
}

#[test]
fn a_vanished_socket_file_is_bound_again() {
    common::with_watchdog(WATCHDOG, || {
        let vol = Volume::new();
        let export = vol.export(vol.backing(BackingKind::File, 4 * MIB, 512, false), 1, PollMode::Adaptive);
        let first = inode(&vol.socket).expect("bound");
        std::fs::remove_file(&vol.socket).unwrap();
        let deadline = Instant::now() + 5 * SOCKET_CHECK;
        while !is_socket(&vol.socket) {
            assert!(Instant::now() < deadline, "the socket file was not bound again");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_ne!(inode(&vol.socket), Some(first), "a new socket file");
        let mut client = Client::connect(&vol.socket, 1, 1 << 20);
        io(&mut client, 2);
        drop(client);

        // Removed while a frontend is connected: bound again once the frontend has gone.
        let mut client = Client::connect(&vol.socket, 1, 1 << 20);
        std::fs::remove_file(&vol.socket).unwrap();
        io(&mut client, 3);
        drop(client);
        let deadline = Instant::now() + 5 * SOCKET_CHECK;
        while !is_socket(&vol.socket) {
            assert!(Instant::now() < deadline, "the socket file was not bound again after the frontend left");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut client = Client::connect(&vol.socket, 1, 1 << 20);
        io(&mut client, 4);
        drop(client);
        export.stop();
        assert!(!vol.socket.exists(), "the export removes its own socket file when it stops");
    });
}

#[test]
fn a_socket_file_another_process_listens_on_is_left_alone() {
    common::with_watchdog(WATCHDOG, || {
        let vol = Volume::new();
        let export = vol.export(vol.backing(BackingKind::File, 4 * MIB, 512, false), 1, PollMode::Adaptive);
        std::fs::remove_file(&vol.socket).unwrap();
        // Someone else binds the path before the export looks again.
        let other = UnixListener::bind(&vol.socket).expect("bind the freed path");
        let theirs = inode(&vol.socket);
        std::thread::sleep(3 * SOCKET_CHECK);
        assert_eq!(inode(&vol.socket), theirs, "the export replaced a socket another process listens on");
        export.stop();
        assert_eq!(inode(&vol.socket), theirs, "the export removed a socket file that is not its own");
        drop(other);
    });
}

/// The daemon as a process: SIGTERM ends it, and every export, within a bound, even when the
/// volumes' socket files are gone and a frontend is connected.
#[test]
fn sigterm_ends_the_daemon_even_with_its_socket_files_removed() {
    common::with_watchdog(WATCHDOG, || {
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("api.sock");
        let sockets = dir.path().join("sock");
        let mut child = Command::new(HCBLK)
            .env("RUST_LOG", "info")
            .arg("--api-socket")
            .arg(&api)
            .arg("daemon")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket-dir")
            .arg(&sockets)
            .args(["--poll", "never", "--hugepages-mb", "2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hcblk daemon");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("daemon: {line}");
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match log.recv_timeout(left) {
                Ok(line) if line.contains("hcblk daemon ready") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!("the daemon never got ready");
                }
            }
        }
        let cli = |args: &[&str]| {
            let out = Command::new(HCBLK).arg("--api-socket").arg(&api).args(args).output().expect("run hcblk");
            assert!(out.status.success(), "hcblk {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        cli(&["volume", "create", "a", "--size", "4M", "--queues", "2"]);
        cli(&["volume", "create", "b", "--size", "4M"]);
        let mut client = Client::connect(&sockets.join("a.sock"), 2, 1 << 20);
        io(&mut client, 5);
        std::fs::remove_file(sockets.join("a.sock")).unwrap();
        std::fs::remove_file(sockets.join("b.sock")).unwrap();

        let started = Instant::now();
        let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
        assert!(sent.success());
        let bound = Duration::from_secs(15);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > bound {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon was still running {bound:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "the daemon exited with {status}");
        eprintln!("daemon stopped {:?} after SIGTERM", started.elapsed());
        drop(client);
    });
}
