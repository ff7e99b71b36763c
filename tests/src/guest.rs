//! Real-guest tests: boot the busybox test guest of `qemu/` against a
//! vhost-user-blk server and read its verdict from the serial console.
//!
//! The server is behind [`Server`], so the same tests run against
//! `qemu-storage-daemon` (the reference) and against hcblk. [`start_server`]
//! picks the implementation from `HCBLK_GUEST_SERVER` (default `hcblk`).
//!
//! Everything here reports a missing facility (QEMU, the storage daemon, apt
//! for the guest build) as an error that names it: a real-guest test that
//! cannot run must fail, never pass by skipping.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

/// The repository root (the workspace directory holding `qemu/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Fails with a message naming `tool` unless it is on PATH.
pub fn require_tool(tool: &str, hint: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        bail!("required tool `{tool}` is not installed ({hint}); real-guest tests cannot run without it")
    }
}

/// Builds (or reuses) the test guest with `qemu/build-guest.sh`; returns its directory.
pub fn build_guest() -> Result<PathBuf> {
    let root = repo_root();
    let out = root.join("qemu/build");
    let output = Command::new(root.join("qemu/build-guest.sh"))
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .context("running qemu/build-guest.sh")?;
    if !output.status.success() {
        bail!("qemu/build-guest.sh failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    Ok(out)
}

/// A volume as the tests want it exported.
#[derive(Clone, Debug)]
pub struct VolumeSpec {
    /// Bytes.
    pub size: u64,
    /// virtio-blk queues the export offers.
    pub queues: u16,
    /// Exported read-only (virtio-blk `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
}

/// A running vhost-user-blk server exporting one volume. Dropping it stops the server.
pub trait Server {
    /// The vhost-user socket QEMU connects to.
    fn socket(&self) -> &Path;
    /// Grows the volume to `new_size` bytes while a guest is attached; the
    /// server must send a config-change notification.
    fn resize(&mut self, new_size: u64) -> Result<()>;
    /// Damages `len` bytes of the stored data at byte `offset` of the volume,
    /// behind the server's back. The next guest boot must read the damaged bytes.
    fn corrupt(&mut self, offset: u64, len: usize) -> Result<()>;
    /// Stops the server (SIGTERM, waits for it to exit) and starts it again on
    /// the same socket and data, while a guest may be attached: QEMU with
    /// `reconnect-ms` reconnects and the guest's in-flight I/O must complete.
    fn restart(&mut self) -> Result<()>;
    /// Kills the server with SIGKILL (no chance to finish anything) and starts it
    /// again on the same socket and data; returns once it serves again. With
    /// inflight tracking, the guest's requests in flight at the kill complete once
    /// QEMU has reconnected.
    fn kill_and_restart(&mut self) -> Result<()>;
}

/// Starts the server selected by `HCBLK_GUEST_SERVER` (`hcblk`, the default, or `qsd`, the
/// reference) in `dir`.
pub fn start_server(dir: &Path, spec: &VolumeSpec) -> Result<Box<dyn Server>> {
    let kind = std::env::var("HCBLK_GUEST_SERVER").unwrap_or_else(|_| "hcblk".to_owned());
    match kind.as_str() {
        "hcblk" => Ok(Box::new(HcblkServer::start(dir, spec)?)),
        "qsd" => Ok(Box::new(QsdServer::start(dir, spec)?)),
        other => bail!("HCBLK_GUEST_SERVER={other} is not a known server (known: hcblk, qsd)"),
    }
}

/// The `hcblk` binary under test: `HCBLK_BIN`, else the workspace's debug build, brought up to
/// date first (once per test process): a test crate run alone would otherwise test whatever
/// binary an earlier build left behind, however stale.
pub fn hcblk_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("HCBLK_BIN") {
        return Ok(PathBuf::from(bin));
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(|| build_hcblk().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
}

/// `cargo build -p hcblk` (a second or so when nothing changed), and the path cargo reports for
/// the binary: it honours `CARGO_TARGET_DIR` and any configured target dir.
fn build_hcblk() -> Result<PathBuf> {
    build_hcblk_as(None)
}

/// Builds hcblk as [`build_hcblk`] does, with `HCBLK_BUILD_ID=build_id` when given (a build that
/// `hcblk --version` and the daemon's ready line tell apart; only the binary's `main.rs` is
/// compiled again, a few seconds), and copies the binary to `dest`. Built with an id, the
/// workspace's binary is built again without it afterwards, so that it is what the other tests
/// expect.
pub fn build_hcblk_copy(dest: &Path, build_id: Option<&str>) -> Result<()> {
    let built = build_hcblk_as(build_id)?;
    install_binary(&built, dest)?;
    if build_id.is_some() {
        build_hcblk_as(None)?;
    }
    Ok(())
}

/// Installs `src` at `dest` the way a package manager does: copied next to it, then renamed over
/// it in one step, so that whoever starts `dest` gets the old file or the new one, never half of
/// one, and a running process keeps the file it started from.
pub fn install_binary(src: &Path, dest: &Path) -> Result<()> {
    let name = dest.file_name().ok_or_else(|| anyhow!("{} names no file", dest.display()))?;
    let staged = dest.with_file_name(format!(".{}.new", name.to_string_lossy()));
    fs::copy(src, &staged).with_context(|| format!("copying {} to {}", src.display(), staged.display()))?;
    File::open(&staged).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", staged.display()))?;
    fs::rename(&staged, dest).with_context(|| format!("renaming {} over {}", staged.display(), dest.display()))
}

fn build_hcblk_as(build_id: Option<&str>) -> Result<PathBuf> {
    // The cargo running the tests, when there is one.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .args(["build", "--quiet", "--message-format=json", "-p", "hcblk", "--bin", "hcblk", "--manifest-path"])
        .arg(repo_root().join("Cargo.toml"))
        .stdin(Stdio::null());
    if let Some(id) = build_id {
        command.env("HCBLK_BUILD_ID", id);
    }
    let out = command
        .output()
        .with_context(|| format!("cannot run {} to build hcblk (or set HCBLK_BIN)", Path::new(&cargo).display()))?;
    if !out.status.success() {
        bail!("`cargo build -p hcblk` failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "hcblk")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("`cargo build -p hcblk` reported no hcblk executable"))
}

/// The hcblk daemon exporting one file-backed volume, driven through its CLI.
pub struct HcblkServer {
    bin: PathBuf,
    dir: PathBuf,
    /// Daemon flags beyond the data, socket and API paths, given to every start.
    extra: Vec<String>,
    child: Child,
    /// Where the running daemon's output starts in `daemon.log`.
    since: usize,
    socket: PathBuf,
    image: PathBuf,
}

impl HcblkServer {
    const VOLUME: &'static str = "vol0";

    pub fn start(dir: &Path, spec: &VolumeSpec) -> Result<Self> {
        Self::start_with_binary(hcblk_binary()?, dir, spec, &[])
    }

    /// As [`Self::start`], with more daemon flags (`--socket-group`, say), kept for restarts.
    pub fn start_with(dir: &Path, spec: &VolumeSpec, extra: &[&str]) -> Result<Self> {
        Self::start_with_binary(hcblk_binary()?, dir, spec, extra)
    }

    /// Like [`HcblkServer::start_with`], with the daemon (and the CLI) started from `bin`, a path
    /// every restart runs again: replacing the file there upgrades the daemon at its next start.
    pub fn start_with_binary(bin: PathBuf, dir: &Path, spec: &VolumeSpec, extra: &[&str]) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let (child, since) = Self::spawn_daemon(&bin, dir, &extra)?;
        let mut server = Self {
            bin,
            dir: dir.to_owned(),
            extra,
            child,
            since,
            socket: PathBuf::new(),
            image: dir.join("data/volumes/vol0.img"),
        };
        server.socket = server.create_volume(Self::VOLUME, spec)?;
        Ok(server)
    }

    /// Creates one more file-backed volume `name` and returns its vhost-user socket.
    pub fn create_volume(&self, name: &str, spec: &VolumeSpec) -> Result<PathBuf> {
        let size = spec.size.to_string();
        let queues = spec.queues.to_string();
        let mut args = vec!["volume", "create", name, "--size", &size, "--queues", &queues, "--backing", "file"];
        if spec.read_only {
            args.push("--read-only");
        }
        let out = self.cli(&args)?;
        out.lines()
            .find_map(|l| l.strip_prefix("socket: "))
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("`hcblk volume create` printed no socket line:\n{out}"))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `None` while the daemon runs; its exit status once it has ended.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().context("polling the hcblk daemon")
    }

    fn api(dir: &Path) -> PathBuf {
        dir.join("api.sock")
    }

    /// The daemon's log, every incarnation appended.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// What the running daemon has logged so far (this incarnation only).
    pub fn incarnation_log(&self) -> String {
        let text = fs::read(self.log_path()).unwrap_or_default();
        String::from_utf8_lossy(text.get(self.since..).unwrap_or_default()).into_owned()
    }

    /// Stops the daemon with SIGTERM as a service manager does, and starts it again from the
    /// same path. Fails unless it exited 0 within `limit` (then it is killed). Returns how long
    /// it took to exit, and what it logged.
    pub fn terminate_and_restart(&mut self, limit: Duration) -> Result<(Duration, String)> {
        let started = Instant::now();
        let status = stop_gracefully(&mut self.child, limit)?;
        let stopped = started.elapsed();
        let log = self.incarnation_log();
        ensure!(
            status.success() && stopped < limit,
            "the daemon did not exit cleanly within {limit:?} of SIGTERM ({status} after {stopped:?}):\n{log}"
        );
        (self.child, self.since) = Self::spawn_daemon(&self.bin, &self.dir, &self.extra)?;
        Ok((stopped, log))
    }

    /// Starts the daemon; returns it, and where its output starts in `daemon.log`, once it is ready.
    fn spawn_daemon(bin: &Path, dir: &Path, extra: &[String]) -> Result<(Child, usize)> {
        let log = dir.join("daemon.log");
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        // The log is appended to by every incarnation: only what this one writes counts.
        let since = log_file.metadata().map_or(0, |m| m.len()) as usize;
        let new_output = || {
            let text = fs::read(&log).unwrap_or_default();
            String::from_utf8_lossy(text.get(since..).unwrap_or_default()).into_owned()
        };
        let mut child = Command::new(bin)
            .arg("daemon")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--socket-dir")
            .arg(dir.join("run"))
            .arg("--api-socket")
            .arg(Self::api(dir))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("duplicating the daemon.log handle")?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let start = Instant::now();
        loop {
            if new_output().contains("hcblk daemon ready") {
                return Ok((child, since));
            }
            if let Some(status) = child.try_wait().context("polling the daemon")? {
                bail!("hcblk daemon exited ({status}):\n{}", new_output());
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("hcblk daemon not ready within 20 s:\n{}", new_output());
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Runs `hcblk --api-socket <this daemon's> ARGS`; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .arg("--api-socket")
            .arg(Self::api(&self.dir))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running hcblk {}", args.join(" ")))?;
        if !out.status.success() {
            bail!("hcblk {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Server for HcblkServer {
    fn socket(&self) -> &Path {
        &self.socket
    }

    fn resize(&mut self, new_size: u64) -> Result<()> {
        self.cli(&["volume", "resize", Self::VOLUME, "--size", &new_size.to_string()]).map(|_| ())
    }

    fn corrupt(&mut self, offset: u64, len: usize) -> Result<()> {
        // O_DIRECT everywhere in hcblk: nothing caches the bytes we flip.
        flip_bytes_in_file(&self.image, offset, len)
    }

    fn restart(&mut self) -> Result<()> {
        stop_gracefully(&mut self.child, Duration::from_secs(10))?;
        (self.child, self.since) = Self::spawn_daemon(&self.bin, &self.dir, &self.extra)?;
        Ok(())
    }

    fn kill_and_restart(&mut self) -> Result<()> {
        self.child.kill().context("SIGKILL to the hcblk daemon")?;
        let killed = Instant::now();
        self.child.wait().context("reaping the killed daemon")?;
        if killed.elapsed() > Duration::from_secs(1) {
            // The kernel lets a killed process go only once the disk I/O it had in
            // flight (an fdatasync of the image, say) has finished.
            eprintln!(
                "the killed hcblk daemon took {} ms to exit (its in-flight disk I/O finished first)",
                killed.elapsed().as_millis()
            );
        }
        // Standalone mode: the daemon re-exports every volume on its socket at start.
        (self.child, self.since) = Self::spawn_daemon(&self.bin, &self.dir, &self.extra)?;
        Ok(())
    }
}

impl Drop for HcblkServer {
    fn drop(&mut self) {
        let _ = stop_gracefully(&mut self.child, Duration::from_secs(10));
    }
}

/// Inverts every bit of `len` bytes at `offset` of `path` and syncs, so the
/// bytes are guaranteed to differ from whatever was written there.
pub fn flip_bytes_in_file(path: &Path, offset: u64, len: usize) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {} to corrupt it", path.display()))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .with_context(|| format!("reading {len} bytes at {offset} of {}", path.display()))?;
    for b in &mut buf {
        *b = !*b;
    }
    file.write_all_at(&buf, offset)
        .with_context(|| format!("writing {len} bytes at {offset} of {}", path.display()))?;
    file.sync_all().context("fsync after corrupting")?;
    Ok(())
}

/// Waits until `path` exists, `child` dies, or `limit` passes.
fn wait_for_socket(path: &Path, child: &mut Child, log: &Path, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait().context("polling server process")? {
            bail!(
                "server exited ({status}) before creating {}:\n{}",
                path.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if start.elapsed() > limit {
            bail!("server did not create {} within {limit:?}", path.display());
        }
        sleep(Duration::from_millis(50));
    }
}

/// `qemu-storage-daemon` exporting a raw file over vhost-user-blk, with a QMP
/// monitor for `block_resize`.
pub struct QsdServer {
    child: Child,
    args: Vec<String>,
    socket: PathBuf,
    qmp: PathBuf,
    image: PathBuf,
    log: PathBuf,
}

impl QsdServer {
    pub fn start(dir: &Path, spec: &VolumeSpec) -> Result<Self> {
        require_tool("qemu-storage-daemon", "apt-get install qemu-system-x86 (Debian ships it there)")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let image = dir.join("disk.img");
        File::create(&image)
            .and_then(|f| f.set_len(spec.size))
            .with_context(|| format!("creating sparse image {}", image.display()))?;
        let read_only = if spec.read_only { "on" } else { "off" };
        let writable = if spec.read_only { "off" } else { "on" };
        let socket = dir.join("vub.sock");
        let qmp = dir.join("qmp.sock");
        let args = vec![
            "--blockdev".to_owned(),
            format!(
                "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring,read-only={read_only}",
                image.display()
            ),
            "--export".to_owned(),
            format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable={writable},num-queues={}",
                socket.display(),
                spec.queues
            ),
            "--chardev".to_owned(),
            format!("socket,id=qmp0,path={},server=on,wait=off", qmp.display()),
            "--monitor".to_owned(),
            "chardev=qmp0".to_owned(),
        ];
        let log = dir.join("qsd.log");
        let child = Self::spawn(&args, &socket, &qmp, &log)?;
        Ok(Self { child, args, socket, qmp, image, log })
    }

    fn spawn(args: &[String], socket: &Path, qmp: &Path, log: &Path) -> Result<Child> {
        for stale in [socket, qmp] {
            let _ = fs::remove_file(stale);
        }
        // Appending keeps the log of every incarnation across restarts.
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut child = Command::new("qemu-storage-daemon")
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("duplicating the qsd.log handle")?)
            .stderr(log_file)
            .spawn()
            .context("spawning qemu-storage-daemon")?;
        if let Err(e) = wait_for_socket(socket, &mut child, log, Duration::from_secs(10)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(child)
    }

    /// One QMP command on a fresh connection; returns the `return` value.
    fn qmp(&self, command: &str, arguments: serde_json::Value) -> Result<serde_json::Value> {
        crate::qmp::Qmp::connect(&self.qmp, Duration::from_secs(10))
            .context("connecting to the QSD QMP socket")?
            .execute(command, arguments)
    }
}

impl Server for QsdServer {
    fn socket(&self) -> &Path {
        &self.socket
    }

    fn resize(&mut self, new_size: u64) -> Result<()> {
        self.qmp("block_resize", serde_json::json!({"node-name": "file0", "size": new_size})).map(|_| ())
    }

    fn corrupt(&mut self, offset: u64, len: usize) -> Result<()> {
        flip_bytes_in_file(&self.image, offset, len)
    }

    fn restart(&mut self) -> Result<()> {
        stop_gracefully(&mut self.child, Duration::from_secs(10))?;
        self.child = Self::spawn(&self.args, &self.socket, &self.qmp, &self.log)?;
        Ok(())
    }

    fn kill_and_restart(&mut self) -> Result<()> {
        self.child.kill().context("SIGKILL to qemu-storage-daemon")?;
        self.child.wait().context("reaping the killed qemu-storage-daemon")?;
        self.child = Self::spawn(&self.args, &self.socket, &self.qmp, &self.log)?;
        Ok(())
    }
}

/// SIGTERM, then SIGKILL if `child` has not exited within `limit`.
pub fn stop_gracefully(child: &mut Child, limit: Duration) -> Result<ExitStatus> {
    // kill(1) rather than libc::kill keeps this crate free of unsafe; the
    // pid is our unreaped child (we hold its `Child`), so it cannot be reused.
    let status =
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().context("running kill -TERM")?;
    if !status.success() {
        bail!("kill -TERM {} failed ({status})", child.id());
    }
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().context("waiting for the server")? {
            return Ok(status);
        }
        sleep(Duration::from_millis(20));
    }
    child.kill().context("sending SIGKILL")?;
    child.wait().context("reaping the server")
}

impl Drop for QsdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One boot of the guest: the arguments of `qemu/run-guest.sh`.
#[derive(Clone, Debug)]
pub struct GuestRun {
    /// `hcblk.mode`, see `qemu/guest/init`.
    pub mode: String,
    /// Extra `hcblk.KEY=VALUE` parameters.
    pub params: Vec<(String, String)>,
    /// virtio-blk queues QEMU asks for; must not exceed the export's.
    pub queues: u16,
    /// Guest CPUs.
    pub smp: u16,
    /// Wall-clock limit of the boot, seconds.
    pub timeout_s: u32,
    /// QEMU reconnects to a restarted server after this many ms; `None`: never.
    pub reconnect_ms: Option<u32>,
    /// The console log; `None`: `<dir>/<mode>-<n>.log`, the first that does not exist.
    pub log: Option<PathBuf>,
    /// A QMP monitor socket QEMU listens on (`--qmp`).
    pub qmp: Option<PathBuf>,
    /// Empty PCIe root ports `hp0`.. to hot-plug devices into (`--hotplug-ports`).
    pub hotplug_ports: u8,
    /// Where QEMU writes its pid (`--pidfile`).
    pub pidfile: Option<PathBuf>,
}

impl GuestRun {
    pub fn new(mode: &str) -> Self {
        Self {
            mode: mode.to_owned(),
            params: Vec::new(),
            queues: 2,
            smp: 2,
            timeout_s: 300,
            reconnect_ms: None,
            log: None,
            qmp: None,
            hotplug_ports: 0,
            pidfile: None,
        }
    }

    /// A QMP monitor at `socket` and `ports` PCIe root ports to hot-plug devices into.
    pub fn hotplug(mut self, socket: &Path, ports: u8) -> Self {
        self.qmp = Some(socket.to_owned());
        self.hotplug_ports = ports;
        self
    }

    pub fn pidfile(mut self, path: &Path) -> Self {
        self.pidfile = Some(path.to_owned());
        self
    }

    /// Writes the console to `log`, so that an event handler can read it while the
    /// guest runs.
    pub fn log(mut self, log: &Path) -> Self {
        self.log = Some(log.to_owned());
        self
    }

    pub fn param(mut self, key: &str, value: &str) -> Self {
        self.params.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn queues(mut self, queues: u16) -> Self {
        self.queues = queues;
        self
    }

    pub fn reconnect_ms(mut self, ms: u32) -> Self {
        self.reconnect_ms = Some(ms);
        self
    }

    pub fn timeout_s(mut self, secs: u32) -> Self {
        self.timeout_s = secs;
        self
    }
}

/// Moments of a boot the caller can act on (see `run_guest`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// The guest waits for its disk to grow; it currently has this many 512-byte sectors.
    ResizeWait { sectors: u64 },
    /// fio started its I/O (first `HCBLK-FIO-START` of the boot).
    FioStarted,
    /// `reconnect` mode: the guest has no I/O outstanding for `HCBLK-IDLE <secs>`.
    Idle,
}

/// What the guest said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
    /// QEMU ended without a verdict (crash, QEMU error, missing facility).
    NoVerdict,
    /// run-guest.sh killed QEMU at the timeout.
    Timeout,
}

#[derive(Debug)]
pub struct GuestOutcome {
    pub verdict: Verdict,
    /// The whole serial console (plus QEMU's own stderr).
    pub console: String,
    pub log: PathBuf,
    pub elapsed: Duration,
}

impl GuestOutcome {
    /// A one-paragraph description for assertion messages: verdict, log path, console tail.
    pub fn describe(&self) -> String {
        let tail: Vec<&str> = self.console.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "verdict {:?} after {:.1}s, console log {}; last lines:\n{}",
            self.verdict,
            self.elapsed.as_secs_f64(),
            self.log.display(),
            tail.join("\n")
        )
    }
}

/// The last `HCBLK-RESULT` of a console transcript. Markers may follow
/// firmware escape sequences on the same line, so they are searched, not anchored.
pub fn parse_verdict(console: &str) -> Option<Verdict> {
    let line = console.lines().rev().find_map(|l| l.find("HCBLK-RESULT ").map(|i| &l[i..]))?;
    let rest = line["HCBLK-RESULT ".len()..].trim_end_matches(['\r', ' ']);
    if rest == "PASS" {
        Some(Verdict::Pass)
    } else {
        rest.strip_prefix("FAIL").map(|reason| Verdict::Fail(reason.trim().to_owned()))
    }
}

/// Boots the guest against `socket` in `dir` (console log `dir/<mode>-<n>.log`).
///
/// `on_event` is called at each [`GuestEvent`] while the guest runs: in
/// `resize` mode it should grow the volume on `ResizeWait` (the guest then
/// checks that it saw the new size); an error from it fails the boot.
pub fn run_guest(
    guest_dir: &Path,
    dir: &Path,
    socket: &Path,
    run: &GuestRun,
    mut on_event: Option<&mut dyn FnMut(GuestEvent) -> Result<()>>,
) -> Result<GuestOutcome> {
    require_tool("qemu-system-x86_64", "apt-get install qemu-system-x86")?;
    fs::create_dir_all(dir)?;
    let mut n = 0;
    let log = loop {
        let candidate = dir.join(format!("{}-{n}.log", run.mode));
        if !candidate.exists() {
            break candidate;
        }
        n += 1;
    };
    let log = run.log.clone().unwrap_or(log);
    let request = dir.join(format!("resize-{n}.request"));
    let done = dir.join(format!("resize-{n}.done"));
    let _ = fs::remove_file(&request);
    let _ = fs::remove_file(&done);

    let mut cmd = Command::new(repo_root().join("qemu/run-guest.sh"));
    cmd.arg("--socket")
        .arg(socket)
        .arg("--mode")
        .arg(&run.mode)
        .arg("--timeout")
        .arg(run.timeout_s.to_string())
        .arg("--queues")
        .arg(run.queues.to_string())
        .arg("--smp")
        .arg(run.smp.to_string())
        .arg("--guest")
        .arg(guest_dir)
        .arg("--log")
        .arg(&log);
    for (k, v) in &run.params {
        cmd.arg("--param").arg(format!("{k}={v}"));
    }
    if let Some(ms) = run.reconnect_ms {
        cmd.arg("--reconnect-ms").arg(ms.to_string());
    }
    if let Some(qmp) = &run.qmp {
        cmd.arg("--qmp").arg(qmp);
    }
    if run.hotplug_ports > 0 {
        cmd.arg("--hotplug-ports").arg(run.hotplug_ports.to_string());
    }
    if let Some(pidfile) = &run.pidfile {
        cmd.arg("--pidfile").arg(pidfile);
    }
    if on_event.is_some() {
        // run-guest.sh runs this shell command when the guest waits; the
        // resize itself happens here in Rust (the server is a Rust object),
        // so the command hands over through two files and waits, bounded.
        cmd.arg("--on-resize-wait").arg(format!(
            "printf '%s' \"$HCBLK_GUEST_SECTORS\" > '{req}.tmp' && mv '{req}.tmp' '{req}' && \
             i=0; while [ ! -s '{done}' ]; do i=$((i+1)); [ $i -le 600 ] || exit 1; sleep 0.1; done; \
             exit \"$(cat '{done}')\"",
            req = request.display(),
            done = done.display()
        ));
    }
    let start = Instant::now();
    let mut fio_started = false;
    let mut idle_seen = false;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning qemu/run-guest.sh")?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr pipe"))?;
    // Drain stderr on a thread so run-guest.sh can never block on a full pipe.
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().context("polling run-guest.sh")? {
            break status;
        }
        if let Some(cb) = on_event.as_mut() {
            if !fio_started && console_has(&log, "HCBLK-FIO-START") {
                fio_started = true;
                if let Err(e) = cb(GuestEvent::FioStarted) {
                    // SIGTERM: run-guest.sh stops QEMU on its way out (SIGKILL would
                    // leave QEMU running on its own).
                    let _ = stop_gracefully(&mut child, Duration::from_secs(10));
                    return Err(e.context("handling FioStarted"));
                }
            }
            if !idle_seen && console_has(&log, "HCBLK-IDLE ") {
                idle_seen = true;
                if let Err(e) = cb(GuestEvent::Idle) {
                    // SIGTERM: run-guest.sh stops QEMU on its way out (SIGKILL would
                    // leave QEMU running on its own).
                    let _ = stop_gracefully(&mut child, Duration::from_secs(10));
                    return Err(e.context("handling Idle"));
                }
            }
            if let Ok(text) = fs::read_to_string(&request) {
                let _ = fs::remove_file(&request);
                let code = match text.trim().parse::<u64>() {
                    Ok(sectors) => match cb(GuestEvent::ResizeWait { sectors }) {
                        Ok(()) => "0",
                        Err(e) => {
                            eprintln!("resize callback failed: {e:#}");
                            "1"
                        }
                    },
                    Err(_) => "1",
                };
                fs::write(&done, code).context("answering the resize request")?;
            }
        }
        sleep(Duration::from_millis(100));
    };
    let script_stderr = stderr_reader.join().unwrap_or_default();
    let console = String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
    let verdict = match status.code() {
        Some(0) => Verdict::Pass,
        Some(1) => parse_verdict(&console).unwrap_or_else(|| Verdict::Fail("run-guest.sh failed".to_owned())),
        Some(2) => Verdict::NoVerdict,
        Some(3) => Verdict::Timeout,
        _ => bail!("qemu/run-guest.sh could not run the guest ({status}):\n{script_stderr}"),
    };
    // Exit status and console must agree; a mismatch means the parser or the
    // script is broken, which must not turn into a silent pass.
    if verdict == Verdict::Pass && parse_verdict(&console) != Some(Verdict::Pass) {
        bail!("run-guest.sh reported PASS but the console has no PASS verdict:\n{script_stderr}");
    }
    Ok(GuestOutcome { verdict, console, log, elapsed: start.elapsed() })
}

/// Whether the console log contains `marker` (re-read each time: the logs
/// are a few hundred KiB at most and this runs every 100 ms).
pub fn console_has(log: &Path, marker: &str) -> bool {
    fs::read(log).map(|bytes| String::from_utf8_lossy(&bytes).contains(marker)).unwrap_or(false)
}

/// The gaps of every `HCBLK-STALL ms=<gap>` line of a console transcript (`fio-kill`
/// mode: pauses in the guest disk's completions), in order.
pub fn parse_stalls(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.find("HCBLK-STALL ms=").map(|i| &l[i + "HCBLK-STALL ms=".len()..]))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

/// The `q`-quantile (0..=1) of `values`, nearest rank; `None` if there are none.
pub fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let last = sorted.len().checked_sub(1)?;
    let rank = ((q.clamp(0.0, 1.0) * last as f64).round() as usize).min(last);
    sorted.get(rank).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newest_source(dir: &Path) -> std::time::SystemTime {
        let mut newest = std::time::UNIX_EPOCH;
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let time =
                if path.is_dir() { newest_source(&path) } else { fs::metadata(&path).unwrap().modified().unwrap() };
            newest = newest.max(time);
        }
        newest
    }

    /// Whatever an earlier build left behind, the tests get a binary at least as new as the
    /// daemon's sources.
    #[test]
    fn the_hcblk_binary_is_built_from_the_current_sources() {
        let bin = build_hcblk().unwrap();
        let built = fs::metadata(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display())).modified().unwrap();
        let sources = newest_source(&repo_root().join("backend/src"));
        assert!(built >= sources, "{} is older than backend/src", bin.display());
        let version = Command::new(&bin).arg("--help").output().unwrap();
        assert!(version.status.success(), "{} --help: {version:?}", bin.display());
    }

    #[test]
    fn stall_lines_are_found_after_escape_codes_and_noise() {
        let console = "HCBLK-FIO-START rw=randwrite jobs=2\r\n\x1b[0mHCBLK-STALL ms=1230 at=41.20\r\nfio: ...\nHCBLK-STALL ms=870 at=44.02\nHCBLK-STALL ms=x";
        assert_eq!(parse_stalls(console), vec![1230, 870]);
        assert!(parse_stalls("HCBLK-RESULT PASS").is_empty());
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let ms = |v: &[u64]| v.iter().map(|&m| Duration::from_millis(m)).collect::<Vec<_>>();
        assert_eq!(quantile(&ms(&[]), 0.5), None);
        assert_eq!(quantile(&ms(&[7]), 0.5), Some(Duration::from_millis(7)));
        assert_eq!(quantile(&ms(&[30, 10, 20]), 0.5), Some(Duration::from_millis(20)));
        assert_eq!(quantile(&ms(&[30, 10, 20, 40]), 1.0), Some(Duration::from_millis(40)));
        assert_eq!(quantile(&ms(&[30, 10, 20, 40]), 0.0), Some(Duration::from_millis(10)));
    }

    #[test]
    fn verdict_is_the_last_marker_even_after_escape_codes() {
        let console =
            "SeaBIOS\n\x1b[2JHCBLK-BOOT mode=x\nHCBLK-RESULT FAIL first\r\nHCBLK-RESULT PASS\r\n[ 7.4] reboot";
        assert_eq!(parse_verdict(console), Some(Verdict::Pass));
        let console = "\x1b[?7lHCBLK-RESULT FAIL fio verify-only exited 1: crc32c: verify failed at ...\r\n";
        assert_eq!(
            parse_verdict(console),
            Some(Verdict::Fail("fio verify-only exited 1: crc32c: verify failed at ...".to_owned()))
        );
    }

    #[test]
    fn no_marker_or_garbage_is_no_verdict() {
        assert_eq!(parse_verdict("Kernel panic - not syncing"), None);
        assert_eq!(parse_verdict("HCBLK-RESULT MAYBE"), None);
    }

    #[test]
    fn a_missing_tool_is_an_error_naming_it() {
        let err = require_tool("hcblk-no-such-tool", "install it").unwrap_err();
        assert!(err.to_string().contains("`hcblk-no-such-tool`"), "{err}");
        require_tool("sh", "coreutils").unwrap();
    }

    #[test]
    fn flipping_bytes_changes_exactly_the_range() {
        let path = std::env::temp_dir().join(format!("hcblk-flip-{}.img", std::process::id()));
        fs::write(&path, [0x0fu8; 64]).unwrap();
        flip_bytes_in_file(&path, 8, 4).unwrap();
        let data = fs::read(&path).unwrap();
        fs::remove_file(&path).unwrap();
        assert_eq!(&data[..8], &[0x0f; 8]);
        assert_eq!(&data[8..12], &[0xf0; 4]);
        assert_eq!(&data[12..], &[0x0f; 52]);
    }
}
