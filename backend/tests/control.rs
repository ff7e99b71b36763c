//! The node daemon and the CLI as processes: `hcblk daemon` in a temp dir, driven by
//! `hcblk volume ...` exactly as an operator would, with libblkio as the VM where a frontend is
//! needed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{pattern, Client};

const MIB: u64 = 1 << 20;
const HCBLK: &str = env!("CARGO_BIN_EXE_hcblk");

/// A data dir, socket dir and API socket under one temp dir — never the system defaults.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("tempdir") }
    }
    fn api(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn sockets(&self) -> PathBuf {
        self.dir.path().join("sock")
    }
    fn img(&self, name: &str) -> PathBuf {
        self.data().join("volumes").join(format!("{name}.img"))
    }
    fn json(&self, name: &str) -> PathBuf {
        self.data().join("volumes").join(format!("{name}.json"))
    }

    fn daemon_command(&self, api: &Path, data: &Path) -> Command {
        self.daemon_command_with(api, data, &[])
    }

    /// `overrides`: `--flag value` pairs replacing the test defaults below.
    fn daemon_command_with(&self, api: &Path, data: &Path, overrides: &[(&str, &str)]) -> Command {
        // The test machine has two cores shared with other tests: sleep, do not spin.
        let mut options = vec![("--poll", "never"), ("--hugepages-mb", "2")];
        for (flag, value) in overrides {
            options.retain(|(f, _)| f != flag);
            options.push((flag, value));
        }
        let mut command = Command::new(HCBLK);
        command
            .env("RUST_LOG", "info")
            .arg("--api-socket")
            .arg(api)
            .arg("daemon")
            .arg("--data-dir")
            .arg(data)
            .arg("--socket-dir")
            .arg(self.sockets())
            .args(options.iter().flat_map(|(f, v)| [*f, *v]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// Starts the daemon and waits for its ready line.
    fn start(&self) -> Daemon {
        Daemon::spawn(self.daemon_command(&self.api(), &self.data()))
    }

    /// Runs `hcblk ARGS` against this node's daemon.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(HCBLK)
            .arg("--api-socket")
            .arg(self.api())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run hcblk")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "hcblk {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs a CLI command that must be refused with exit 1 and one `error:` line; returns it.
    fn refused(&self, args: &[&str]) -> String {
        refused(self.cli(args), &format!("{args:?}"))
    }

    fn info(&self, name: &str) -> Vec<(String, String)> {
        self.ok(&["volume", "info", name])
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap_or_else(|| panic!("not `key: value`: {l:?}"));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    fn field(&self, name: &str, key: &str) -> String {
        let info = self.info(name);
        info.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no {key} in {info:?}")).1.clone()
    }
}

fn refused(out: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{what} should exit 1; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one error line, got {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{what}: {stderr:?}");
    assert!(out.stdout.is_empty(), "{what} printed on stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    lines[0].to_owned()
}

struct Daemon {
    child: Child,
    /// The daemon's stderr lines not yet looked at.
    log: mpsc::Receiver<String>,
    /// The lines `wait_for` went through.
    seen: Vec<String>,
}

impl Daemon {
    fn spawn(mut command: Command) -> Self {
        let mut child = command.spawn().expect("spawn hcblk daemon");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("daemon: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Self { child, log, seen: Vec::new() };
        daemon.wait_for("hcblk daemon ready api=");
        daemon
    }

    fn wait_for(&mut self, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => {
                    self.seen.push(line);
                    return;
                }
                Ok(line) => self.seen.push(line),
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!("daemon never logged {needle:?} (exit status {status:?})");
                }
            }
        }
    }

    /// SIGTERM, and the daemon must exit 0 within 20 s.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "daemon exited with {status}");
                return;
            }
            assert!(std::time::Instant::now() < deadline, "daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave a daemon behind; `stop` has already reaped it otherwise.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[test]
fn volume_lifecycle_and_operator_mistakes() {
    common::require_hugepages();
    let node = Node::new();
    let daemon = node.start();

    let out = node.ok(&["volume", "create", "vm1", "--size", "2M", "--queues", "2"]);
    let socket = node.sockets().join("vm1.sock");
    assert_eq!(out, format!("volume vm1 created\nsocket: {}\n", socket.display()));
    assert!(is_socket(&socket));
    assert_eq!(std::fs::metadata(node.img("vm1")).unwrap().len(), 2 * MIB);
    node.ok(&["volume", "create", "scratch", "--size", "1.5G", "--backing", "null", "--block-size", "4096"]);

    let list = node.ok(&["volume", "list"]);
    let rows: Vec<Vec<&str>> = list.lines().map(|l| l.split_whitespace().collect()).collect();
    let vm1_socket = socket.display().to_string();
    let scratch_socket = node.sockets().join("scratch.sock").display().to_string();
    assert_eq!(
        rows,
        vec![vec!["scratch", "1536M", "null", scratch_socket.as_str()], vec!["vm1", "2M", "file", vm1_socket.as_str()]]
    );
    assert_eq!(node.field("vm1", "size"), (2 * MIB).to_string());
    assert_eq!(node.field("vm1", "socket"), vm1_socket);
    assert_eq!(node.field("vm1", "backing"), "file");
    assert_eq!(node.field("vm1", "path"), node.img("vm1").display().to_string());
    assert_eq!(node.field("vm1", "queues"), "2");
    assert_eq!(node.field("scratch", "block_size"), "4096");
    assert_eq!(node.field("scratch", "path"), "-");

    // Grow: the file and the metadata follow.
    let out = node.ok(&["volume", "resize", "vm1", "--size", "4M"]);
    assert!(out.starts_with("volume vm1 resized to 4194304 bytes"), "{out}");
    assert_eq!(node.field("vm1", "size"), (4 * MIB).to_string());
    assert_eq!(std::fs::metadata(node.img("vm1")).unwrap().len(), 4 * MIB);

    // Operator mistakes: one error line, exit 1, nothing changed.
    let metadata_before = std::fs::read(node.json("vm1")).unwrap();
    let regular_file = node.dir.path().join("regular-file");
    std::fs::write(&regular_file, vec![0u8; MIB as usize]).unwrap();
    let files_before = snapshot(node.dir.path());
    let line = node.refused(&["volume", "resize", "vm1", "--size", "1M"]);
    assert!(line.contains("cannot shrink") && line.contains("grow only"), "{line}");
    let line = node.refused(&["volume", "create", "odd", "--size", "1000"]);
    assert!(line.contains("not a multiple of the block size 512"), "{line}");
    let line = node.refused(&["volume", "create", "odd", "--size", "6K", "--block-size", "4096"]);
    assert!(line.contains("not a multiple of the block size 4096"), "{line}");
    let not_a_device = regular_file.display().to_string();
    let line =
        node.refused(&["volume", "create", "dev", "--size", "1M", "--backing", "device", "--path", &not_a_device]);
    assert!(line.contains("is not a block device"), "{line}");
    let line =
        node.refused(&["volume", "create", "dev", "--size", "1M", "--backing", "device", "--path", "/nonexistent/sdz"]);
    assert!(line.contains("/nonexistent/sdz does not exist"), "{line}");
    let line = node.refused(&["volume", "create", "vm1", "--size", "1M"]);
    assert!(line.contains("volume vm1 already exists"), "{line}");
    let line = node.refused(&["volume", "create", "bad/name", "--size", "1M"]);
    assert!(line.contains("invalid volume name"), "{line}");
    let line = node.refused(&["volume", "create", "x", "--size", "1.3K"]);
    assert!(line.contains("not a whole number of bytes"), "{line}");
    let line = node.refused(&["volume", "info", "nope"]);
    assert!(line.contains("no volume named nope"), "{line}");
    // A socket path held by another process.
    let squatter = std::os::unix::net::UnixListener::bind(node.sockets().join("taken.sock")).unwrap();
    let files_with_squatter = snapshot(node.dir.path());
    let line = node.refused(&["volume", "create", "taken", "--size", "1M"]);
    assert!(line.contains("in use by another process"), "{line}");
    assert_eq!(snapshot(node.dir.path()), files_with_squatter);
    drop(squatter);
    std::fs::remove_file(node.sockets().join("taken.sock")).unwrap();
    assert_eq!(std::fs::read(node.json("vm1")).unwrap(), metadata_before);
    assert_eq!(snapshot(node.dir.path()), files_before);

    node.ok(&["volume", "delete", "vm1"]);
    assert!(!socket.exists());
    assert!(!node.json("vm1").exists());
    assert!(!node.img("vm1").exists());
    node.refused(&["volume", "info", "vm1"]);
    assert_eq!(node.ok(&["volume", "list"]).lines().count(), 1);
    daemon.stop();
    assert!(!node.api().exists(), "the API socket is removed on stop");
    assert!(!node.sockets().join("scratch.sock").exists(), "exports are stopped");
}

#[test]
fn restart_keeps_volumes_and_data() {
    common::require_hugepages();
    let node = Node::new();
    let daemon = node.start();
    node.ok(&["volume", "create", "db", "--size", "8M", "--serial", "DB-0001"]);
    node.ok(&["volume", "create", "null0", "--size", "1G", "--backing", "null"]);
    // Data written through a real frontend...
    let data = pattern(42, MIB as usize);
    {
        let mut client = Client::connect(&node.sockets().join("db.sock"), 1, MIB as usize);
        client.buf().copy_from_slice(&data);
        assert_eq!(client.write(0, 3 * MIB, 0, data.len()), 0);
        client.queues[0].flush(0, blkio::ReqFlags::empty());
        assert_eq!(client.wait(0), 0);
    }
    // ...and bytes written into the backing file directly.
    let img = std::fs::OpenOptions::new().write(true).open(node.img("db")).unwrap();
    img.write_all_at(b"written behind hcblk's back", 7 * MIB).unwrap();
    img.sync_all().unwrap();
    drop(img);
    let list_before = node.ok(&["volume", "list"]);
    let info_before = node.info("db");
    daemon.stop();
    assert!(!node.sockets().join("db.sock").exists());

    let daemon = node.start();
    assert_eq!(node.ok(&["volume", "list"]), list_before);
    let info_after = node.info("db");
    // The same, but for the connection and the generation, which counts the starts serving it.
    let without_connected = |info: &[(String, String)]| -> Vec<(String, String)> {
        info.iter().filter(|(k, _)| k != "connected" && k != "generation").cloned().collect()
    };
    assert_eq!(without_connected(&info_after), without_connected(&info_before));
    assert_eq!(
        (node.field("db", "generation"), info_before.iter().find(|(k, _)| k == "generation").unwrap().1.as_str()),
        ("2".into(), "1")
    );
    assert!(is_socket(&node.sockets().join("db.sock")));
    let on_disk = std::fs::read(node.img("db")).unwrap();
    assert_eq!(&on_disk[3 * MIB as usize..4 * MIB as usize], &data[..]);
    assert_eq!(&on_disk[7 * MIB as usize..][..27], b"written behind hcblk's back");
    // And the frontend reads the same bytes back through the re-exported volume.
    let mut client = Client::connect(&node.sockets().join("db.sock"), 1, MIB as usize);
    assert_eq!(client.read(0, 3 * MIB, 0, data.len()), 0);
    assert!(client.buf() == &data[..]);
    drop(client);
    daemon.stop();
}

#[test]
fn live_resize_and_delete_of_a_connected_volume() {
    common::require_hugepages();
    let node = Node::new();
    let daemon = node.start();
    node.ok(&["volume", "create", "vm", "--size", "4M"]);
    let socket = node.sockets().join("vm.sock");
    let client = Client::connect(&socket, 1, MIB as usize);
    assert_eq!(client.capacity(), 4 * MIB);
    node.ok(&["volume", "resize", "vm", "--size", "16M"]);
    assert_eq!(client.capacity(), 16 * MIB, "the guest sees the new size");
    for _ in 0..100 {
        if node.field("vm", "connected") == "true" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(node.field("vm", "connected"), "true");
    let line = node.refused(&["volume", "delete", "vm"]);
    assert!(line.contains("connected frontend") && line.contains("--force"), "{line}");
    assert!(node.json("vm").exists());
    node.ok(&["volume", "delete", "vm", "--force"]);
    assert!(!node.json("vm").exists() && !node.img("vm").exists() && !socket.exists());
    drop(client);
    daemon.stop();
}

/// Runs a daemon that must refuse to start: a refusal is immediate, a start would run on.
fn within(command: Command) -> Output {
    hcblk_tests::cluster_fixture::output_within(command, Duration::from_secs(60), "hcblk daemon").unwrap()
}

#[test]
fn a_second_daemon_is_refused() {
    common::require_hugepages();
    let node = Node::new();
    let daemon = node.start();
    node.ok(&["volume", "create", "vm", "--size", "1M"]);

    // Same API socket, another data dir.
    let other_data = node.dir.path().join("other-data");
    let out = within(node.daemon_command(&node.api(), &other_data));
    let line = refused(out, "second daemon on the API socket");
    assert!(line.contains("another hcblk daemon is serving the API socket"), "{line}");
    assert!(!other_data.exists(), "a refused daemon creates nothing");

    // Same data dir, another API socket.
    let other_api = node.dir.path().join("other-api.sock");
    let out = within(node.daemon_command(&other_api, &node.data()));
    let line = refused(out, "second daemon on the data dir");
    assert!(line.contains("is in use by another hcblk daemon"), "{line}");
    assert!(!other_api.exists());

    // The first one is untouched.
    assert!(node.ok(&["volume", "list"]).starts_with("vm "));
    assert!(is_socket(&node.sockets().join("vm.sock")));
    daemon.stop();
}

#[test]
fn garbage_on_the_api_socket_gets_an_error_and_the_daemon_lives_on() {
    common::require_hugepages();
    let node = Node::new();
    let daemon = node.start();
    for garbage in [&b"{\"op\":\"format-disk\"}\n"[..], &b"\xff\xfe\n"[..], &vec![b'{'; 100_000][..], &b""[..]] {
        let mut stream = UnixStream::connect(node.api()).unwrap();
        stream.write_all(garbage).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("{\"status\":\"error\",\"message\":"), "{answer:?}");
    }
    // A client that connects and says nothing does not block others.
    let _silent = UnixStream::connect(node.api()).unwrap();
    node.ok(&["volume", "create", "vm", "--size", "1M", "--backing", "null"]);
    assert!(node.ok(&["volume", "list"]).starts_with("vm "));
    daemon.stop();
}

#[test]
fn preflight_refusals_change_nothing() {
    let node = Node::new();
    // Far more hugepages than any test machine reserves.
    let command = node.daemon_command_with(&node.api(), &node.data(), &[("--hugepages-mb", "1048576")]);
    let line = refused(within(command), "daemon without enough hugepages");
    assert!(line.contains("hugepage") && line.contains("nr_hugepages"), "{line}");
    assert!(!node.data().exists() && !node.api().exists());

    let command = node.daemon_command_with(&node.api(), &node.data(), &[("--poll", "sometimes")]);
    let line = refused(within(command), "bad --poll");
    assert!(line.contains("unknown poll mode"), "{line}");

    // No daemon at all.
    let line = node.refused(&["volume", "list"]);
    assert!(line.contains("cannot connect to the hcblk daemon"), "{line}");
}

/// Every path under `dir` with its size, to show that a refused request changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            if m.is_dir() {
                stack.push(path.clone());
            }
            out.push((path, m.len()));
        }
    }
    out.sort();
    out
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A VM's disk and the metadata about it are the daemon user's alone.
#[test]
fn data_files_are_private_to_the_daemon_user() {
    common::require_hugepages();
    let node = Node::new();
    let daemon = node.start();
    node.ok(&["volume", "create", "vm", "--size", "4M"]);
    let volumes = node.data().join("volumes");
    for dir in [node.data(), volumes.clone()] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for file in [node.img("vm"), node.json("vm"), node.data().join("lock")] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    // A metadata record rewritten later (resize) keeps the mode.
    node.ok(&["volume", "resize", "vm", "--size", "8M"]);
    assert_eq!(mode(&node.json("vm")), 0o600);
    daemon.stop();
}

/// What an earlier version left readable by everyone is made private at the next start, and
/// the daemon says what it changed.
#[test]
fn modes_left_by_an_earlier_version_are_fixed_at_start() {
    common::require_hugepages();
    let node = Node::new();
    let daemon = node.start();
    node.ok(&["volume", "create", "vm", "--size", "4M"]);
    daemon.stop();
    // As the earlier version created them.
    let volumes = node.data().join("volumes");
    for dir in [node.data(), volumes.clone()] {
        set_mode(&dir, 0o755);
    }
    for file in [node.img("vm"), node.json("vm"), node.data().join("lock")] {
        set_mode(&file, 0o644);
    }

    let daemon = node.start();
    for dir in [node.data(), volumes.clone()] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for file in [node.img("vm"), node.json("vm"), node.data().join("lock")] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    let img = node.img("vm").display().to_string();
    assert!(
        daemon
            .seen
            .iter()
            .any(|l| l.contains("took group and other access away") && l.contains(&img) && l.contains("0644")),
        "no log line about {img}: {:?}",
        daemon.seen
    );
    // The volume is served as before.
    assert!(is_socket(&node.sockets().join("vm.sock")));
    assert_eq!(node.field("vm", "size"), (4 * MIB).to_string());
    daemon.stop();
}
