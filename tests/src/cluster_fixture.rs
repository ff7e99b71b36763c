//! A whole hcblk cluster on one machine, for replication tests: hosts in network namespaces
//! ([`ClusterNet`]), one real etcd, one `hcblk daemon` per node, the CLI run inside each node's
//! namespace, and every fault the tests need (kill -9, SIGTERM, freeze, cable pulled, pairs
//! blocked, netem).
//!
//! ```text
//!   host "etcd" 198.18.1.10     etcd, client :2379
//!   host "n1"   198.18.1.11     hcblk daemon --node n1 --listen 198.18.1.11:7400
//!   host "n2"   198.18.1.12     hcblk daemon --node n2 --listen 198.18.1.12:7400   ...
//! ```
//!
//! Files live under one temporary directory (kept when the test fails, or with
//! `HCBLK_KEEP=1`): `secret` (the cluster secret), `etcd/` (data and `etcd.log`), and per node
//! `nK/data` (`--data-dir`; replicas in `data/replicas/<id as 16 hex digits>.img`), `nK/run`
//! (`--socket-dir`), `nK/api.sock` and `nK/daemon.log` (stdout and stderr of every start of
//! that node, each start preceded by a `==== hcblk-tests: start N ====` line). The directory
//! is under /tmp: vhost-user socket paths must stay below the 108-byte `sun_path` limit.
//!
//! Daemons run in [`DaemonMode::Cluster`] with the contract's flags (`--etcd`, `--node`,
//! `--listen`, `--cluster-secret-file`, ...), or in [`DaemonMode::Standalone`] (no cluster
//! flags) for checking the fixture itself against a daemon without cluster mode. Either way
//! the daemon is ready when its log shows `hcblk daemon ready api=...` (and `node=NAME` in
//! cluster mode).
//!
//! Clusters in one process run one at a time (a process-wide lock is held for a cluster's
//! lifetime): on 2 cores two clusters would only slow each other into spurious timeouts.
//!
//! Without root, `ip`, `nft`, etcd, the `hcblk` binary or hugepages, [`Cluster::start`]
//! fails with an error naming what is missing. Dropping the cluster kills every daemon (and
//! etcd), deletes the namespaces and gives the hugepages back; when dropped during a panic it
//! first prints the tail of every log.

use crate::cluster::{ClusterNet, Host};
use crate::etcd::{EtcdOptions, EtcdServer};
use crate::guest::hcblk_binary;
use crate::hugepages;
use anyhow::{anyhow, bail, Context, Result};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The replica service port of every node.
pub const LISTEN_PORT: u16 = 7400;
/// etcd's client and peer ports on the `etcd` host.
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
/// Where Debian's `etcd-client` package installs etcdctl.
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";
/// etcd key prefix of the cluster layout (`backend/src/cluster/mod.rs`).
pub const ETCD_PREFIX: &str = "/hcblk/v1/";
/// How long a daemon may take from spawn to its ready line. A restarted node may wait for its
/// previous registration's lease (10 s TTL) to expire before it registers again.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound of one CLI call.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `stop` waits after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes of each log printed when a test fails.
const LOG_TAIL_BYTES: usize = 12_000;
/// Most nodes a cluster may have (hosts `n1..n9` plus `etcd`).
pub const NODES_MAX: usize = 9;

static SERIAL: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How the daemons are started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonMode {
    /// `hcblk daemon ... --etcd ... --node ... --listen ... --cluster-secret-file ...`.
    Cluster,
    /// The single-node daemon (no cluster flags): to check the fixture itself.
    Standalone,
}

/// What [`Cluster::start_with`] builds.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Nodes `n1..nN` (1..=9). Default 4.
    pub nodes: usize,
    pub mode: DaemonMode,
    /// `--poll`: `never` (default) or `adaptive`; multi-node tests on 2 cores must not spin.
    pub poll: String,
    /// `--replace-after`, e.g. `"8s"`; `None`: the daemon's default.
    pub replace_after: Option<String>,
    /// `--io-timeout`, e.g. `"2s"`; `None`: the daemon's default.
    pub io_timeout: Option<String>,
    /// `--hugepages-mb` of each daemon. Default 32.
    pub hugepages_mb: u32,
    /// Hugepages reserved per node on top of what `--hugepages-mb` makes the daemon demand
    /// free at start (bounce buffers of its exports, copy buffers). Default 16.
    pub extra_pages_per_node: u64,
    /// `--zone` per node (index 0 is n1); missing or `None`: no zone.
    pub zones: Vec<Option<String>>,
    /// `RUST_LOG` of the daemons. Default `HCBLK_TEST_LOG`, else `info`.
    pub rust_log: String,
    /// Appended to every daemon's command line.
    pub extra_daemon_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 4,
            mode: DaemonMode::Cluster,
            poll: "never".into(),
            replace_after: None,
            io_timeout: Some("2s".into()),
            hugepages_mb: 32,
            extra_pages_per_node: 16,
            zones: Vec::new(),
            rust_log: std::env::var("HCBLK_TEST_LOG").unwrap_or_else(|_| "info".into()),
            extra_daemon_args: Vec::new(),
        }
    }
}

impl ClusterOptions {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }
    pub fn mode(mut self, mode: DaemonMode) -> Self {
        self.mode = mode;
        self
    }
    pub fn replace_after(mut self, d: &str) -> Self {
        self.replace_after = Some(d.into());
        self
    }
    pub fn io_timeout(mut self, d: &str) -> Self {
        self.io_timeout = Some(d.into());
        self
    }
}

/// One node's files and process.
#[derive(Debug)]
struct Node {
    name: String,
    host: Host,
    dir: PathBuf,
    secret_file: PathBuf,
    child: Option<Child>,
    starts: u32,
    zone: Option<String>,
}

impl Node {
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    fn socket_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }
    fn listen(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.host.addr), LISTEN_PORT)
    }
}

/// A running cluster; see the module documentation.
pub struct Cluster {
    // Drop order: daemons (in `drop`), then etcd, then the namespaces, the hugepages, and
    // last the lock that lets the next cluster of this process start.
    nodes: Vec<Node>,
    etcd: Option<EtcdServer>,
    net: ClusterNet,
    _hugepages: Option<hugepages::Reservation>,
    dir: PathBuf,
    options: ClusterOptions,
    bin: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field("nodes", &self.nodes.iter().map(|n| &n.name).collect::<Vec<_>>())
            .finish()
    }
}

/// Fails naming `what` unless `path` exists.
fn require_file(path: &Path, what: &str) -> Result<()> {
    if !path.exists() {
        bail!("{} not found: {what}", path.display());
    }
    Ok(())
}

/// Polls `f` every 100 ms until it returns `Ok(Some(value))` or `timeout` passes. `Err`s are
/// remembered (the last one is part of the timeout error) and polling goes on.
pub fn wait_for<T>(timeout: Duration, what: &str, f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    wait_for_every(timeout, Duration::from_millis(100), what, f)
}

/// [`wait_for`] polling every `interval` (for probes that cost a process spawn).
pub fn wait_for_every<T>(
    timeout: Duration,
    interval: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() >= timeout {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(interval);
    }
}

/// The end of `s`, at most `bytes` long, cut at a character boundary.
pub fn tail(s: &str, bytes: usize) -> &str {
    let mut start = s.len().saturating_sub(bytes);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).context("read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Runs `cmd` with `timeout`, collecting its output; killed when the time is up.
pub fn output_within(mut cmd: Command, timeout: Duration, what: &str) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    // Readers on threads so that a chatty command never blocks on a full pipe.
    let mut out = child.stdout.take().context("stdout pipe")?;
    let mut err = child.stderr.take().context("stderr pipe")?;
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().with_context(|| format!("wait for {what}"))? {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap_or_default();
            bail!(
                "{what} did not finish within {timeout:?} (killed); stderr: {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output { status, stdout: out_t.join().unwrap_or_default(), stderr: err_t.join().unwrap_or_default() })
}

/// `kill -SIG pid` through kill(1): this crate keeps libc signal calls out of the fixture.
fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("run kill(1)")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed ({status})");
    }
    Ok(())
}

impl Cluster {
    /// `n` nodes with the default options (cluster mode).
    pub fn start(n: usize) -> Result<Self> {
        Self::start_with(ClusterOptions::default().nodes(n))
    }

    pub fn start_with(options: ClusterOptions) -> Result<Self> {
        if options.nodes == 0 || options.nodes > NODES_MAX {
            bail!("a cluster of {} nodes (1..={NODES_MAX})", options.nodes);
        }
        if options.poll != "never" && options.poll != "adaptive" {
            bail!("--poll {}: multi-node tests use `never` or `adaptive` (2 cores)", options.poll);
        }
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let bin = hcblk_binary()?;
        require_file(
            Path::new(crate::etcd::ETCD_BIN),
            "the cluster tests need a real etcd (Debian package etcd-server)",
        )?;
        require_file(Path::new(ETCDCTL_BIN), "the cluster tests read etcd with etcdctl (Debian package etcd-client)")?;
        let names: Vec<String> = (1..=options.nodes).map(|i| format!("n{i}")).collect();
        let mut hosts: Vec<&str> = vec!["etcd"];
        hosts.extend(names.iter().map(String::as_str));
        // Fails naming root, ip or nft if one is missing.
        let net = ClusterNet::create(&hosts)?;

        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hcblk-ct-{}-{k}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let secret_file = dir.join("secret");
        fs::write(&secret_file, format!("{}\n", random_hex(32)?)).context("write the cluster secret")?;
        fs::set_permissions(&secret_file, fs::Permissions::from_mode(0o600))?;

        let per_node = u64::from(options.hugepages_mb).div_ceil(2) + options.extra_pages_per_node;
        let reservation = hugepages::Reservation::reserve(per_node * options.nodes as u64)
            .context("reserve hugepages for the daemons")?;

        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let node_dir = dir.join(name);
            fs::create_dir_all(&node_dir)?;
            nodes.push(Node {
                name: name.clone(),
                host: net.host(name).clone(),
                dir: node_dir,
                secret_file: secret_file.clone(),
                child: None,
                starts: 0,
                zone: options.zones.get(i).cloned().flatten(),
            });
        }
        let etcd_host = net.host("etcd").clone();
        let mut cluster =
            Self { nodes, etcd: None, net, _hugepages: Some(reservation), dir, options, bin, _serial: serial };
        // From here on `cluster`'s Drop cleans up whatever was started.
        let etcd = EtcdServer::start(EtcdOptions {
            name: "etcd".into(),
            data_dir: cluster.dir.join("etcd"),
            client_addr: SocketAddr::new(IpAddr::V4(etcd_host.addr), ETCD_CLIENT_PORT),
            peer_addr: SocketAddr::new(IpAddr::V4(etcd_host.addr), ETCD_PEER_PORT),
            netns: Some(etcd_host.ns.clone()),
        })?;
        cluster.etcd = Some(etcd);
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    fn index(&self, node: &str) -> Result<usize> {
        self.nodes.iter().position(|n| n.name == node).ok_or_else(|| {
            let known: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            anyhow!("no node {node:?} in this cluster (nodes: {known:?})")
        })
    }

    fn node(&self, node: &str) -> Result<&Node> {
        Ok(&self.nodes[self.index(node)?])
    }

    /// Node names, `n1..nN`.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The network: hosts, namespaces, and every fault ([`ClusterNet::link_down`],
    /// [`ClusterNet::block`], [`ClusterNet::netem`], ...). Host names are `etcd` and the nodes'.
    pub fn net(&self) -> &ClusterNet {
        &self.net
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// `http://198.18.1.10:2379`.
    pub fn etcd_endpoint(&self) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.net.host("etcd").addr)
    }

    pub fn etcd(&mut self) -> Result<&mut EtcdServer> {
        self.etcd.as_mut().context("etcd is not running")
    }

    pub fn secret_file(&self) -> PathBuf {
        self.dir.join("secret")
    }

    /// The cluster secret as the daemons read it.
    pub fn secret(&self) -> Result<proto::auth::Secret> {
        proto::auth::Secret::from_file(&self.secret_file()).context("read the cluster secret")
    }

    /// Makes `node` use a secret file holding `contents` from its next (re)start on.
    pub fn set_node_secret(&mut self, node: &str, contents: &[u8]) -> Result<()> {
        let i = self.index(node)?;
        let path = self.nodes[i].dir.join("secret");
        fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        self.nodes[i].secret_file = path;
        Ok(())
    }

    pub fn data_dir(&self, node: &str) -> Result<PathBuf> {
        Ok(self.node(node)?.data_dir())
    }

    pub fn socket_dir(&self, node: &str) -> Result<PathBuf> {
        Ok(self.node(node)?.socket_dir())
    }

    pub fn api_socket(&self, node: &str) -> Result<PathBuf> {
        Ok(self.node(node)?.api_socket())
    }

    /// The replica file of volume `id` on `node`: `DATA_DIR/replicas/<id, 16 hex digits>.img`.
    pub fn replica_path(&self, node: &str, id: u64) -> Result<PathBuf> {
        Ok(self.data_dir(node)?.join("replicas").join(format!("{id:016x}.img")))
    }

    /// `198.18.1.(10+i):7400`, the node's `--listen`.
    pub fn listen_addr(&self, node: &str) -> Result<SocketAddr> {
        Ok(self.node(node)?.listen())
    }

    pub fn log_path(&self, node: &str) -> Result<PathBuf> {
        Ok(self.node(node)?.log_path())
    }

    /// Everything `node`'s daemon has logged, every start included.
    pub fn log(&self, node: &str) -> Result<String> {
        let p = self.log_path(node)?;
        Ok(String::from_utf8_lossy(&fs::read(&p).with_context(|| format!("read {}", p.display()))?).into_owned())
    }

    /// What `node`'s daemon logged since its last start.
    pub fn log_since_start(&self, node: &str) -> Result<String> {
        let log = self.log(node)?;
        let starts = self.node(node)?.starts;
        let marker = format!("==== hcblk-tests: start {starts} ");
        Ok(match log.rfind(&marker) {
            Some(at) => log[at..].to_owned(),
            None => log,
        })
    }

    /// The daemon's pid, if it runs (or is frozen).
    pub fn pid(&self, node: &str) -> Result<Option<u32>> {
        Ok(self.node(node)?.child.as_ref().map(Child::id))
    }

    pub fn is_running(&mut self, node: &str) -> Result<bool> {
        let i = self.index(node)?;
        let Some(child) = self.nodes[i].child.as_mut() else { return Ok(false) };
        Ok(child.try_wait()?.is_none())
    }

    /// Resident memory of `node`'s daemon in KiB (`VmRSS`).
    pub fn rss_kib(&self, node: &str) -> Result<u64> {
        let pid = self.pid(node)?.with_context(|| format!("{node} is not running"))?;
        rss_kib(pid)
    }

    fn daemon_command(&self, i: usize) -> Command {
        let n = &self.nodes[i];
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &n.host.ns]).arg(&self.bin);
        c.arg("--api-socket").arg(n.api_socket());
        c.arg("daemon");
        c.arg("--data-dir").arg(n.data_dir());
        c.arg("--socket-dir").arg(n.socket_dir());
        c.args(["--poll", &self.options.poll]);
        c.args(["--hugepages-mb", &self.options.hugepages_mb.to_string()]);
        if self.options.mode == DaemonMode::Cluster {
            c.args(["--etcd", &self.etcd_endpoint()]);
            c.args(["--node", &n.name]);
            c.args(["--listen", &n.listen().to_string()]);
            c.arg("--cluster-secret-file").arg(&n.secret_file);
            if let Some(z) = &n.zone {
                c.args(["--zone", z]);
            }
            if let Some(d) = &self.options.replace_after {
                c.args(["--replace-after", d]);
            }
            if let Some(d) = &self.options.io_timeout {
                c.args(["--io-timeout", d]);
            }
        }
        c.args(&self.options.extra_daemon_args);
        c.env("RUST_LOG", &self.options.rust_log);
        c
    }

    /// Starts node `i`'s daemon and waits for its ready line.
    fn spawn(&mut self, i: usize) -> Result<()> {
        let starts = self.nodes[i].starts + 1;
        let log_path = self.nodes[i].log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let since = log.metadata().map(|m| m.len()).unwrap_or(0);
        writeln!(log, "==== hcblk-tests: start {starts} of {} ====", self.nodes[i].name)?;
        let mut cmd = self.daemon_command(i);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().context("dup the daemon log")?).stderr(log);
        // `ip netns exec` execs the daemon in place: the child's pid is the daemon's.
        let child = cmd.spawn().with_context(|| format!("spawn {}", self.bin.display()))?;
        self.nodes[i].child = Some(child);
        self.nodes[i].starts = starts;
        let name = self.nodes[i].name.clone();
        let ready = match self.options.mode {
            DaemonMode::Cluster => format!("node={name}"),
            DaemonMode::Standalone => String::new(),
        };
        let start = Instant::now();
        loop {
            let text = fs::read(&log_path).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(since as usize..).unwrap_or_default());
            if text.lines().any(|l| l.contains("hcblk daemon ready api=") && l.contains(&ready)) {
                return Ok(());
            }
            let child = self.nodes[i].child.as_mut().context("spawned above")?;
            if let Some(status) = child.try_wait()? {
                self.nodes[i].child = None;
                bail!(
                    "hcblk daemon of {name} exited ({status}) before it was ready; its log:\n{}",
                    tail(&text, LOG_TAIL_BYTES)
                );
            }
            if start.elapsed() > READY_TIMEOUT {
                let _ = self.kill9(&name);
                bail!(
                    "hcblk daemon of {name} not ready within {READY_TIMEOUT:?}; its log:\n{}",
                    tail(&text, LOG_TAIL_BYTES)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL and reap: a crash. A no-op if the daemon is not running.
    pub fn kill9(&mut self, node: &str) -> Result<()> {
        let i = self.index(node)?;
        if let Some(mut child) = self.nodes[i].child.take() {
            // SIGKILL works on a frozen process too.
            let _ = child.kill();
            child.wait().with_context(|| format!("reap {node}'s daemon"))?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after [`STOP_TIMEOUT`], reported as an
    /// error). A no-op if the daemon is not running.
    pub fn stop(&mut self, node: &str) -> Result<()> {
        let i = self.index(node)?;
        let Some(mut child) = self.nodes[i].child.take() else { return Ok(()) };
        let pid = child.id();
        if child.try_wait()?.is_none() {
            let _ = signal(pid, "CONT");
            signal(pid, "TERM")?;
        }
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("{node}'s daemon exited with {status} after SIGTERM");
                }
                return Ok(());
            }
            if start.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{node}'s daemon did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `node`'s daemon again on the same data (after [`kill9`](Self::kill9) or
    /// [`stop`](Self::stop)); a running daemon is stopped first.
    pub fn restart(&mut self, node: &str) -> Result<()> {
        let i = self.index(node)?;
        if self.nodes[i].child.is_some() {
            self.stop(node)?;
        }
        self.spawn(i)
    }

    /// SIGSTOP: the daemon keeps its sockets and answers nothing (a hung node).
    pub fn freeze(&self, node: &str) -> Result<()> {
        let pid = self.pid(node)?.with_context(|| format!("{node} is not running"))?;
        signal(pid, "STOP")
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn thaw(&self, node: &str) -> Result<()> {
        let pid = self.pid(node)?.with_context(|| format!("{node} is not running"))?;
        signal(pid, "CONT")
    }

    /// Pulls `node`'s cable: it reaches neither etcd nor any peer.
    pub fn isolate(&self, node: &str) -> Result<()> {
        self.net.link_down(node)
    }

    /// Drops everything between `a` and `b` (either may be `etcd`).
    pub fn partition(&self, a: &str, b: &str) -> Result<()> {
        self.net.block(a, b)
    }

    /// Undoes every network fault.
    pub fn heal(&self) -> Result<()> {
        self.net.heal()
    }

    /// A command that runs `program` in `node`'s namespace.
    pub fn command(&self, node: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.net.command(node, program)
    }

    /// `hcblk --api-socket A ARGS` in `node`'s namespace, bounded by [`CLI_TIMEOUT`]; the
    /// output whatever the exit status.
    pub fn cli(&self, node: &str, args: &[&str]) -> Result<Output> {
        self.cli_within(node, args, CLI_TIMEOUT)
    }

    pub fn cli_within(&self, node: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        let n = self.node(node)?;
        let mut c = self.net.command(node, &self.bin);
        c.arg("--api-socket").arg(n.api_socket()).args(args);
        output_within(c, timeout, &format!("hcblk {} (on {node})", args.join(" ")))
    }

    /// Like [`cli`](Self::cli) but a failure is an error carrying stderr; returns stdout.
    pub fn cli_ok(&self, node: &str, args: &[&str]) -> Result<String> {
        let out = self.cli(node, args)?;
        if !out.status.success() {
            bail!(
                "hcblk {} on {node} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `volume create NAME --size SIZE EXTRA...` on `node`.
    pub fn create_volume(&self, node: &str, name: &str, size: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["volume", "create", name, "--size", size];
        args.extend_from_slice(extra);
        self.cli_ok(node, &args)
    }

    /// `volume attach NAME [--force]` on `node`; the vhost-user socket it prints.
    pub fn attach(&self, node: &str, name: &str, force: bool) -> Result<PathBuf> {
        let mut args = vec!["volume", "attach", name];
        if force {
            args.push("--force");
        }
        let out = self.cli_ok(node, &args)?;
        socket_line(&out)
            .with_context(|| format!("`hcblk volume attach {name}` on {node} printed no `socket: PATH` line:\n{out}"))
    }

    pub fn detach(&self, node: &str, name: &str) -> Result<()> {
        self.cli_ok(node, &["volume", "detach", name]).map(drop)
    }

    /// `volume info NAME --json` on `node`, parsed.
    pub fn volume_info(&self, node: &str, name: &str) -> Result<serde_json::Value> {
        let out = self.cli_ok(node, &["volume", "info", name, "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("`volume info {name} --json` on {node} is not JSON:\n{out}"))
    }

    /// `etcdctl get KEY` run in etcd's namespace; `None` if the key does not exist.
    pub fn etcd_get(&self, key: &str) -> Result<Option<String>> {
        let mut c = self.net.command("etcd", ETCDCTL_BIN);
        c.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.etcd_endpoint())).args([
            "--command-timeout=5s",
            "get",
            key,
            "--print-value-only",
        ]);
        let out = output_within(c, Duration::from_secs(15), &format!("etcdctl get {key}"))?;
        if !out.status.success() {
            bail!("etcdctl get {key} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        let v = String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_owned();
        Ok((!v.is_empty()).then_some(v))
    }

    /// `etcdctl put KEY VALUE` in etcd's namespace (to inject documents in tests of the tools;
    /// the daemons own every key under [`ETCD_PREFIX`]).
    pub fn etcd_put(&self, key: &str, value: &str) -> Result<()> {
        let mut c = self.net.command("etcd", ETCDCTL_BIN);
        c.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.etcd_endpoint())).args([
            "--command-timeout=5s",
            "put",
            key,
            value,
        ]);
        let out = output_within(c, Duration::from_secs(15), &format!("etcdctl put {key}"))?;
        if !out.status.success() {
            bail!("etcdctl put {key} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// The volume's document in etcd (`/hcblk/v1/volumes/NAME`), the authority on owner,
    /// generation and membership; `None` if there is none.
    pub fn volume_meta(&self, name: &str) -> Result<Option<replication::VolumeMeta>> {
        let Some(raw) = self.etcd_get(&format!("{ETCD_PREFIX}volumes/{name}"))? else { return Ok(None) };
        replication::VolumeMeta::from_json(raw.as_bytes())
            .map(Some)
            .map_err(|e| anyhow!("volume document of {name} in etcd: {e}\n{raw}"))
    }

    /// The cluster id the daemons agreed on (`/hcblk/v1/cluster`, `{"cluster_id": N, ...}`).
    pub fn cluster_id(&self) -> Result<u64> {
        let raw = self.etcd_get(&format!("{ETCD_PREFIX}cluster"))?.context("no cluster document in etcd yet")?;
        let v: serde_json::Value = serde_json::from_str(&raw).with_context(|| format!("cluster document: {raw}"))?;
        v.get("cluster_id")
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("cluster document without a numeric cluster_id: {raw}"))
    }

    /// Polls `f` every 100 ms until it is true; the error names `what` and the time waited.
    /// Returns how long it took.
    pub fn wait_until(&self, timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<Duration> {
        let start = Instant::now();
        wait_for(timeout, what, || Ok(f().then_some(())))?;
        Ok(start.elapsed())
    }

    /// Prints the tail of every daemon log and of etcd's log to stderr.
    pub fn dump_logs(&self) {
        eprintln!("==== hcblk-tests: cluster files kept in {} ====", self.dir.display());
        for n in &self.nodes {
            let log = fs::read(n.log_path()).unwrap_or_default();
            let log = String::from_utf8_lossy(&log);
            eprintln!("==== {} ({}) ====\n{}", n.name, n.log_path().display(), tail(&log, LOG_TAIL_BYTES));
        }
        if let Some(e) = &self.etcd {
            eprintln!("==== etcd ({}) ====\n{}", e.log_path().display(), tail(&e.log(), LOG_TAIL_BYTES / 3));
        }
    }

    /// Runs a scenario: on error the logs are printed and the files kept before the error is
    /// returned, so a failing test shows what the daemons said.
    pub fn run<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        match f(self) {
            Ok(v) => Ok(v),
            Err(e) => {
                eprintln!("scenario failed: {e:#}");
                self.dump_logs();
                self.keep_files();
                Err(e)
            }
        }
    }

    fn keep_files(&mut self) {
        // Marked by a file, so Drop (which runs later) leaves the directory alone.
        let _ = fs::write(self.dir.join("KEEP"), b"kept because the test failed\n");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            self.dump_logs();
            self.keep_files();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.etcd = None;
        let keep = std::env::var_os("HCBLK_KEEP").is_some() || self.dir.join("KEEP").exists();
        if keep {
            eprintln!("hcblk-tests: cluster files kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The path of a `socket: PATH` line.
pub fn socket_line(out: &str) -> Option<PathBuf> {
    out.lines().find_map(|l| l.trim().strip_prefix("socket: ")).map(|p| PathBuf::from(p.trim()))
}

/// `VmRSS` of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_lines_are_found() {
        assert_eq!(socket_line("volume a attached\nsocket: /run/x/a.sock\n"), Some(PathBuf::from("/run/x/a.sock")));
        assert_eq!(socket_line("nothing here"), None);
    }

    #[test]
    fn wait_for_names_what_it_waited_for_and_the_last_error() {
        let e = wait_for::<()>(Duration::from_millis(250), "the moon", || Err(anyhow!("still dark"))).unwrap_err();
        let s = format!("{e:#}");
        assert!(s.contains("the moon") && s.contains("still dark"), "{s}");
        let mut n = 0;
        assert_eq!(
            wait_for(Duration::from_secs(5), "three polls", || {
                n += 1;
                Ok((n == 3).then_some(n))
            })
            .unwrap(),
            3
        );
    }

    #[test]
    fn commands_over_time_are_killed() {
        let mut c = Command::new("sleep");
        c.arg("10");
        let start = Instant::now();
        let e = output_within(c, Duration::from_millis(200), "sleep").unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("did not finish"), "{e}");
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = output_within(c, Duration::from_secs(10), "sh").unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
