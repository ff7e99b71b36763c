//! hcblk as a system service: the volume sockets' group and mode (`--socket-group`,
//! `--socket-mode`) on every bind, the readiness notification to systemd (`NOTIFY_SOCKET`), and
//! the shipped unit and tmpfiles.d entry (`packaging/`), checked with systemd's own tools.
//!
//! The daemon runs as a process, as in `control.rs`. Needs root (the sockets are given to a
//! group root is not in, and connections are tried as another user) and free hugepages.

mod common;

use std::io::{BufRead, BufReader};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const HCBLK: &str = env!("CARGO_BIN_EXE_hcblk");
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The socket group of these tests: `disk` is gid 6 in base-passwd's static table, so it
/// exists on every Debian system, a fresh container included, and nothing in these tests runs
/// as a member of it. (`kvm` and `libvirt-qemu` appear only with udev, QEMU or libvirt
/// packages; creating a group would change the machine for every other test.)
const GROUP: &str = "disk";
const GROUP_ID: u32 = 6;
/// `nobody` and `nogroup` (base-passwd): the unprivileged users the connections are tried as.
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "these tests need root: they give sockets to group {GROUP} and connect as nobody");
}

/// A data dir, socket dir and API socket under one temp dir that any user may traverse (so
/// that only the socket dir and the socket decide who reaches a volume).
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod tempdir");
        Self { dir }
    }
    fn api(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }
    fn sockets(&self) -> PathBuf {
        self.dir.path().join("sock")
    }
    fn socket(&self, name: &str) -> PathBuf {
        self.sockets().join(format!("{name}.sock"))
    }

    fn daemon_command(&self, flags: &[&str]) -> Command {
        let mut command = Command::new(HCBLK);
        command
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .arg("--api-socket")
            .arg(self.api())
            .arg("daemon")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--socket-dir")
            .arg(self.sockets())
            // Two shared cores: sleep on kicks, do not spin.
            .args(["--poll", "never", "--hugepages-mb", "2"])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    fn start(&self, flags: &[&str]) -> Daemon {
        Daemon::spawn(self.daemon_command(flags))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = Command::new(HCBLK).arg("--api-socket").arg(self.api()).args(args).output().expect("run hcblk");
        assert!(out.status.success(), "hcblk {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }
}

struct Daemon {
    child: Child,
    log: mpsc::Receiver<String>,
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
        let daemon = Self { child, log };
        daemon.wait_for("hcblk daemon ready api=");
        daemon
    }

    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.log.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(_) => panic!("daemon never logged {needle:?}"),
            }
        }
    }

    /// SIGTERM; the daemon must exit 0 within 20 s.
    fn stop(mut self) {
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "daemon exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One `error:` line on stderr, exit status 1, nothing on stdout.
fn refused(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected exit 1; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
    assert!(out.stdout.is_empty());
    lines[0].to_owned()
}

/// Connects to `path` as user `uid` with group `gid` and no supplementary groups, as QEMU run
/// by libvirt would, from a thread of its own whose file-system credentials are changed for
/// that (Linux keeps credentials per thread; the raw system calls change only the caller's,
/// and the thread ends right after).
fn connect_as(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let path = path.to_owned();
    std::thread::spawn(move || {
        // SAFETY: raw setgroups/setfsgid/setfsuid take integers (and a null list of length 0)
        // and change the credentials of this thread only, which does nothing else afterwards
        // than this one connect; the rest of the test process keeps root's.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()), 0);
            libc::syscall(libc::SYS_setfsgid, gid);
            libc::syscall(libc::SYS_setfsuid, uid);
            // Both return the previous value; the new one is read back to be sure.
            assert_eq!(libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32, uid);
            assert_eq!(libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32, gid);
        }
        UnixStream::connect(&path).map(drop)
    })
    .join()
    .expect("connect thread")
}

/// The socket file's group, permission bits, and who may connect: a member of [`GROUP`] must,
/// a user outside it must not.
fn assert_socket_for_group(path: &Path, mode: u32) {
    let metadata = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(metadata.file_type().is_socket(), "{} is not a socket", path.display());
    assert_eq!((metadata.gid(), metadata.mode() & 0o7777), (GROUP_ID, mode), "{}", path.display());
    connect_as(path, NOBODY, GROUP_ID).unwrap_or_else(|e| panic!("a member of {GROUP} cannot connect: {e}"));
    let err = connect_as(path, NOBODY, NOGROUP).expect_err("a user outside the group connected");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        assert!(Instant::now() < deadline, "{} was not bound again", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn volume_sockets_get_the_group_and_mode_on_every_bind() {
    require_root();
    common::require_hugepages();
    let node = Node::new();
    let flags = ["--socket-group", GROUP];

    // Created by the daemon: for the group, whatever the umask.
    let daemon = node.start(&flags);
    let dir = std::fs::metadata(node.sockets()).unwrap();
    assert_eq!((dir.uid(), dir.gid(), dir.mode() & 0o7777), (0, GROUP_ID, 0o750));
    let out = node.ok(&["volume", "create", "vm1", "--size", "1M", "--backing", "null"]);
    assert!(out.contains(&node.socket("vm1").display().to_string()), "{out}");
    assert_socket_for_group(&node.socket("vm1"), 0o660);
    // The API stays the owner's.
    assert_eq!(std::fs::metadata(node.api()).unwrap().mode() & 0o777, 0o600);

    // A socket file removed under the running daemon is bound again, the same way.
    std::fs::remove_file(node.socket("vm1")).unwrap();
    daemon.wait_for("the socket file had vanished; bound a new one");
    wait_for_socket(&node.socket("vm1"));
    assert_socket_for_group(&node.socket("vm1"), 0o660);
    daemon.stop();

    // Re-exported at start, with another mode.
    let daemon = node.start(&["--socket-group", GROUP, "--socket-mode", "0620"]);
    assert_socket_for_group(&node.socket("vm1"), 0o620);
    daemon.stop();

    // A group that cannot traverse the existing socket dir: refused, nothing bound.
    let out = node.daemon_command(&["--socket-group", "root"]).output().expect("run hcblk daemon");
    let line = refused(&out);
    assert!(line.contains("does not let --socket-group root") && line.contains("chgrp root"), "{line}");
    assert!(!node.socket("vm1").exists() && !node.api().exists());

    // Without a group: the daemon's group, its user only.
    let daemon = node.start(&[]);
    let metadata = std::fs::metadata(node.socket("vm1")).unwrap();
    assert_eq!((metadata.gid(), metadata.mode() & 0o7777), (0, 0o600));
    let err = connect_as(&node.socket("vm1"), NOBODY, GROUP_ID).expect_err("connected without the group");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    daemon.stop();
}

#[test]
fn bad_socket_flags_are_refused_before_anything_is_created() {
    let node = Node::new();
    for (flags, says) in [
        (&["--socket-group", "no-such-group-hcblk"][..], "--socket-group no-such-group-hcblk: no such group"),
        (&["--socket-mode", "0866"], "--socket-mode \"0866\": expected octal permission bits"),
        (&["--socket-mode", "0666"], "lets every local user connect"),
        (&["--socket-group", GROUP, "--socket-mode", "0600"], "needs write permission, g+w"),
    ] {
        let out = node.daemon_command(flags).output().expect("run hcblk daemon");
        let line = refused(&out);
        assert!(line.contains(says), "{flags:?}: {line}");
        let left: Vec<_> = std::fs::read_dir(node.dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{flags:?} created {left:?}");
    }
}

/// systemd's side of `Type=notify`: an abstract datagram socket, as systemd itself uses.
fn notify_socket() -> (UnixDatagram, String) {
    let name = format!("hcblk-test-notify-{}", std::process::id());
    let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).expect("bind");
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (socket, format!("@{name}"))
}

fn receive(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 4096];
    let n = socket.recv(&mut buffer).expect("no notification within 30 s");
    String::from_utf8(buffer[..n].to_vec()).expect("utf-8 notification")
}

#[test]
fn ready_is_notified_once_the_volumes_are_back_and_the_api_accepts() {
    common::require_hugepages();
    let node = Node::new();
    // A volume to bring back, so that being ready means something beyond the API.
    let daemon = node.start(&[]);
    node.ok(&["volume", "create", "vm1", "--size", "1M", "--backing", "null"]);
    daemon.stop();
    assert!(!node.socket("vm1").exists());

    let (systemd, address) = notify_socket();
    let mut command = node.daemon_command(&[]);
    command.env("NOTIFY_SOCKET", &address).stderr(Stdio::inherit());
    let mut child = command.spawn().expect("spawn hcblk daemon");
    let ready = receive(&systemd);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.lines().any(|l| l == "STATUS=ready; volumes restored: 1"), "{ready:?}");
    // At READY=1, not some time after it: the volume's socket takes frontends, the API answers.
    UnixStream::connect(node.socket("vm1")).expect("the volume is not exported at READY=1");
    assert!(node.ok(&["volume", "list"]).starts_with("vm1 "));

    let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
    assert!(sent.success());
    let stopping = receive(&systemd);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = child.wait().expect("wait");
    assert!(status.success(), "daemon exited with {status}");
    // Nothing else was sent.
    systemd.set_nonblocking(true).unwrap();
    let mut buffer = [0u8; 64];
    assert!(systemd.recv(&mut buffer).is_err(), "a third notification");

    // A NOTIFY_SOCKET that names no socket: refused at once (systemd would wait in vain).
    let mut command = node.daemon_command(&[]);
    command.env("NOTIFY_SOCKET", "relative/notify");
    let line = refused(&command.output().expect("run hcblk daemon"));
    assert!(line.contains("NOTIFY_SOCKET=\"relative/notify\""), "{line}");
}

/// Runs one of systemd's tools, failing with its name and package if it is missing.
fn systemd_tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "{name} not found: install Debian's systemd package (scripts/install-deps.sh does)");
    Command::new(name)
}

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(REPO).join("packaging/hcblk.service")).expect("read packaging/hcblk.service")
}

/// The unit with ExecStart pointing at the binary just built: `systemd-analyze verify` checks
/// that the command exists, and /usr/local/bin/hcblk is where an operator installs it.
fn verify(unit: &str) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hcblk.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/hcblk ", &format!("{HCBLK} "))).unwrap();
    systemd_tool("systemd-analyze").arg("verify").arg(&path).output().expect("run systemd-analyze verify")
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = unit_text();
    assert!(unit.contains("\nExecStart=/usr/local/bin/hcblk daemon "), "ExecStart moved; update this test");
    let out = verify(&unit);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {:?}\n{said}", out.status);
    // The control: verify does find a mistake in this unit (a misspelt option is only a
    // warning, which the check above refuses as well).
    let out = verify(&unit.replace("ProtectSystem=strict", "ProtectSytem=strict"));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("Unknown key 'ProtectSytem'"), "{said}");
}

#[test]
fn the_tmpfiles_entry_makes_the_socket_dir_for_the_units_socket_group() {
    require_root();
    let unit = unit_text();
    let args = unit
        .lines()
        .find_map(|l| l.strip_prefix("Environment=\"HCBLK_DAEMON_ARGS="))
        .expect("HCBLK_DAEMON_ARGS in the unit");
    let group = args.split_whitespace().skip_while(|w| *w != "--socket-group").nth(1).expect("--socket-group");
    let group = group.trim_end_matches('"');
    // tmpfiles resolves names in the root it is given: an /etc/group with the unit's group.
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join("etc")).unwrap();
    std::fs::write(root.path().join("etc/group"), format!("root:x:0:\n{group}:x:64055:\n")).unwrap();
    std::fs::write(root.path().join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let out = systemd_tool("systemd-tmpfiles")
        .arg("--create")
        .arg(format!("--root={}", root.path().display()))
        .arg(Path::new(REPO).join("packaging/hcblk.tmpfiles"))
        .output()
        .expect("run systemd-tmpfiles");
    assert!(out.status.success(), "systemd-tmpfiles: {}", String::from_utf8_lossy(&out.stderr));
    let dir = std::fs::metadata(root.path().join("run/hcblk")).expect("run/hcblk created");
    assert!(dir.is_dir());
    assert_eq!((dir.uid(), dir.gid(), dir.mode() & 0o7777), (0, 64055, 0o750), "group {group}");
}

/// The value of `NAME=VALUE` among run-guest.sh's option defaults (`socket= mode=... smp=2 ...`).
fn run_guest_default(script: &str, name: &str) -> String {
    let defaults = script.lines().find(|l| l.starts_with("socket= mode=")).expect("run-guest.sh's defaults line");
    let prefix = format!("{name}=");
    defaults
        .split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {name} default in {defaults:?}"))
        .to_owned()
}

#[test]
fn the_libvirt_domain_of_the_test_guest_is_well_formed_and_is_run_guests_machine() {
    let path = Path::new(REPO).join("qemu/hcblk-guest.xml");
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join("xmllint").is_file()));
    assert!(found, "xmllint not found: install Debian's libxml2-utils package (scripts/install-deps.sh does)");
    let out = Command::new("xmllint").arg("--noout").arg(&path).output().expect("run xmllint");
    assert!(
        out.status.success(),
        "{} is not well-formed XML: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );

    let xml = std::fs::read_to_string(&path).unwrap();
    let script = std::fs::read_to_string(Path::new(REPO).join("qemu/run-guest.sh")).unwrap();
    let append = script
        .lines()
        .find_map(|l| l.trim().strip_prefix("append=\""))
        .and_then(|a| a.strip_suffix("$mode\""))
        .expect("run-guest.sh's kernel command line");
    let mode = run_guest_default(&script, "mode");
    for (what, expected) in [
        ("memory", format!("<memory unit='MiB'>{}</memory>", run_guest_default(&script, "mem_mb"))),
        ("vCPUs", format!("<vcpu>{}</vcpu>", run_guest_default(&script, "smp"))),
        ("queues", format!("<driver name='qemu' type='raw' queues='{}'/>", run_guest_default(&script, "queues"))),
        ("machine", "machine='q35'".to_owned()),
        ("shared memfd RAM", "<source type='memfd'/>\n    <access mode='shared'/>".to_owned()),
        ("kernel command line", format!("<cmdline>{append}{mode} ")),
        ("ACPI (Debian 12's libvirt 9.0 with QEMU 10)", "<features>\n    <acpi/>\n  </features>".to_owned()),
        ("the volume socket", "<source type='unix' path='/run/hcblk/vol0.sock'>".to_owned()),
    ] {
        assert!(xml.contains(&expected), "{}: no {what} as run-guest.sh has it: {expected:?}", path.display());
    }
    assert!(script.contains("-machine q35 -cpu max"), "run-guest.sh's machine changed; update the domain XML");
}
