//! A real etcd for tests: [`EtcdServer`] runs `/usr/bin/etcd` (Debian package `etcd-server`),
//! optionally inside a network namespace, and can kill, stop, freeze and restart it on the same
//! data directory. [`TcpProxy`] sits between a client and etcd and can cut the path without
//! touching etcd, so a lease really expires on a live server while its holder cannot reach it.
//!
//! Tests run in parallel (and other test binaries may run at the same time), so every server
//! gets its own free loopback ports ([`EtcdOptions::loopback`]) and its own data directory; its
//! stdout and stderr go to `DATA_DIR/etcd.log`, whose tail is part of every start error.
//!
//! etcd runs with a 50 ms heartbeat and a 250 ms election timeout: a single member elects
//! itself in a fraction of a second after a (re)start, which keeps the tests fast. The smallest
//! lease TTL etcd grants follows from them (1.5 election timeouts, rounded up to 1 s).

use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where Debian's `etcd-server` package installs the server.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a (re)started etcd may take to answer `/health` before the start fails.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `stop()` waits after SIGTERM before it sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of the log quoted in a start error.
const LOG_TAIL_BYTES: usize = 4000;
/// Attempts of [`EtcdServer::start_loopback`] when another process took a port just picked.
const PORT_ATTEMPTS: u32 = 5;

/// What [`EtcdServer::start`] runs.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Member name (`--name`); also names the cluster token.
    pub name: String,
    /// Holds etcd's data (`DATA_DIR/etcd`) and its log (`DATA_DIR/etcd.log`); created if absent.
    pub data_dir: PathBuf,
    /// Client URL address (`http://client_addr`).
    pub client_addr: SocketAddr,
    /// Peer URL address; a single-member cluster still needs one.
    pub peer_addr: SocketAddr,
    /// Run inside this network namespace (`ip netns exec NS`); `None`: the caller's namespace.
    pub netns: Option<String>,
}

impl EtcdOptions {
    /// Options for a member on two free loopback ports of the caller's namespace.
    pub fn loopback(name: &str, data_dir: &Path) -> Result<Self> {
        let client_addr = free_loopback_addr()?;
        let mut peer_addr = free_loopback_addr()?;
        // Bounded: two draws from thousands of ports rarely collide; a few retries suffice.
        for _ in 0..16 {
            if peer_addr != client_addr {
                break;
            }
            peer_addr = free_loopback_addr()?;
        }
        if peer_addr == client_addr {
            bail!("cannot find two distinct free loopback ports");
        }
        Ok(Self { name: name.to_owned(), data_dir: data_dir.to_owned(), client_addr, peer_addr, netns: None })
    }
}

/// A running etcd member; killed and reaped on drop.
#[derive(Debug)]
pub struct EtcdServer {
    options: EtcdOptions,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd and waits until `/health` reports it healthy (it has a leader and answers).
    pub fn start(options: EtcdOptions) -> Result<Self> {
        if !Path::new(ETCD_BIN).exists() {
            bail!("{ETCD_BIN} not found: the etcd tests need a real etcd (Debian package etcd-server)");
        }
        let mut server = Self { options, child: None };
        server.spawn()?;
        Ok(server)
    }

    /// Starts a member on free loopback ports, picking new ports if another process took one
    /// between the check and etcd's bind (only for a data directory without a member yet).
    pub fn start_loopback(name: &str, data_dir: &Path) -> Result<Self> {
        let fresh = !data_dir.join("etcd").exists();
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let options = EtcdOptions::loopback(name, data_dir)?;
            match Self::start(options) {
                Ok(server) => return Ok(server),
                Err(e) if fresh && format!("{e:#}").contains("address already in use") => {
                    // The failed attempt may have begun a member naming the old peer URL; the
                    // next one on new ports must bootstrap anew (the data was ours to remove).
                    let _ = fs::remove_dir_all(data_dir.join("etcd"));
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("PORT_ATTEMPTS > 0")).context("every port pick collided")
    }

    /// `http://ADDR`, the URL clients use.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.options.client_addr)
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.options.client_addr
    }

    pub fn options(&self) -> &EtcdOptions {
        &self.options
    }

    /// The process id, if etcd is running (or frozen).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything etcd has logged so far (all runs on this data directory).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.options.data_dir.join("etcd.log")
    }

    /// SIGKILL and reap: a crash, nothing flushed beyond what etcd already fsynced.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // Killing a frozen (SIGSTOPped) process works: SIGKILL needs no cooperation.
            child.kill().context("kill etcd")?;
            child.wait().context("reap etcd")?;
        }
        Ok(())
    }

    /// SIGTERM, wait for a clean exit (SIGKILL after 10 s), reap.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // A frozen process would not act on SIGTERM; thaw it first.
        signal(&child, libc::SIGCONT)?;
        signal(&child, libc::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if child.try_wait().context("wait for etcd")?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                child.kill().context("kill etcd after SIGTERM timed out")?;
                child.wait().context("reap etcd")?;
                bail!("etcd did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills etcd if it still runs, then starts it again on the same ports and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// SIGSTOP: etcd keeps its sockets but answers nothing (a hung server). Requests sent now
    /// are read only after [`resume`](Self::resume), or never if it is killed first.
    pub fn freeze(&self) -> Result<()> {
        match &self.child {
            Some(child) => signal(child, libc::SIGSTOP),
            None => bail!("etcd is not running"),
        }
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn resume(&self) -> Result<()> {
        match &self.child {
            Some(child) => signal(child, libc::SIGCONT),
            None => bail!("etcd is not running"),
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let o = &self.options;
        fs::create_dir_all(&o.data_dir).with_context(|| format!("create {}", o.data_dir.display()))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("open {}", self.log_path().display()))?;
        let client_url = format!("http://{}", o.client_addr);
        let peer_url = format!("http://{}", o.peer_addr);
        let mut cmd = match &o.netns {
            Some(ns) => {
                // `ip netns exec` execs etcd in place, so the child's pid is etcd's own and
                // the signals above reach it directly.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCD_BIN]);
                c
            }
            None => Command::new(ETCD_BIN),
        };
        cmd.arg("--name")
            .arg(&o.name)
            .arg("--data-dir")
            .arg(o.data_dir.join("etcd"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", o.name))
            .arg("--initial-cluster-token")
            .arg(format!("hcblk-test-{}", o.name))
            .arg("--initial-cluster-state")
            .arg("new")
            .args(["--heartbeat-interval", "50", "--election-timeout", "250"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup the etcd log fd")?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("spawn {ETCD_BIN}"))?;
        self.child = Some(child);
        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = self.kill();
                Err(e.context(format!(
                    "etcd {} did not become ready; end of {}:\n{}",
                    self.options.name,
                    self.log_path().display(),
                    tail(&self.log(), LOG_TAIL_BYTES)
                )))
            }
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let addr = self.options.client_addr;
        let netns = self.options.netns.clone();
        let deadline = Instant::now() + READY_TIMEOUT;
        // The probe runs on its own thread so it can enter etcd's namespace without moving the
        // caller's thread there.
        let exited = Arc::new(AtomicBool::new(false));
        let probe = {
            let exited = exited.clone();
            thread::spawn(move || -> Result<()> {
                if let Some(ns) = &netns {
                    enter_netns(ns)?;
                }
                loop {
                    if health(addr).unwrap_or(false) {
                        return Ok(());
                    }
                    if exited.load(Ordering::Relaxed) {
                        bail!("etcd exited");
                    }
                    if Instant::now() >= deadline {
                        bail!("no healthy answer from http://{addr}/health within {READY_TIMEOUT:?}");
                    }
                    thread::sleep(Duration::from_millis(25));
                }
            })
        };
        // Meanwhile watch the process: an early exit (bad flag, port taken) ends the wait.
        let child = self.child.as_mut().expect("spawned above");
        while !probe.is_finished() {
            if let Some(status) = child.try_wait().context("wait for etcd")? {
                exited.store(true, Ordering::Relaxed);
                let _ = probe.join();
                self.child = None;
                let log = fs::read_to_string(self.log_path()).unwrap_or_default();
                if log.contains("address already in use") {
                    bail!("etcd exited with {status}: address already in use");
                }
                bail!("etcd exited with {status} before it was ready");
            }
            thread::sleep(Duration::from_millis(10));
        }
        probe.join().map_err(|_| anyhow::anyhow!("etcd health probe panicked"))?
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn signal(child: &Child, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: `pid` is our own unreaped child (the `Child` is still held), so it cannot have been
    // recycled for another process; kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("kill({pid}, {sig})"));
    }
    Ok(())
}

/// `GET /health` over plain HTTP/1.0; true when etcd says `"health":"true"`.
fn health(addr: SocketAddr) -> Result<bool> {
    let timeout = Duration::from_secs(1);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut body = Vec::new();
    // Bounded: the answer is a few hundred bytes; stop reading at 64 KiB whatever comes.
    s.take(64 << 10).read_to_end(&mut body)?;
    let body = String::from_utf8_lossy(&body);
    Ok(body.contains("\"health\":\"true\""))
}

fn enter_netns(ns: &str) -> Result<()> {
    let f = File::open(format!("/run/netns/{ns}")).with_context(|| format!("open /run/netns/{ns}"))?;
    // SAFETY: `f` is an open namespace file; setns only changes the calling thread's network
    // namespace, and this thread is a private probe thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

fn tail(s: &str, bytes: usize) -> &str {
    let mut start = s.len().saturating_sub(bytes);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A free TCP port on 127.0.0.1, drawn from 20000..32000: below Linux's ephemeral range
/// (32768..), so outgoing connections of other tests do not take it after the check. Another
/// process can still bind it between the check and its use; [`EtcdServer::start_loopback`]
/// retries then.
pub fn free_loopback_addr() -> Result<SocketAddr> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let seed = (now.as_secs() << 30)
        ^ u64::from(now.subsec_nanos())
        ^ (u64::from(std::process::id()) << 20)
        ^ NEXT.fetch_add(0x9e37_79b9, Ordering::Relaxed);
    let mut x = seed | 1;
    // Bounded: 1000 draws over 12000 ports; failing all of them means the range is exhausted.
    for _ in 0..1000 {
        // xorshift64: a cheap spread of draws; quality does not matter here.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + u16::try_from(x % 12000).expect("< 12000");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free loopback port in 20000..32000")
}

/// A TCP forwarder from a loopback port to `upstream` whose path can be cut.
///
/// While [partitioned](Self::partition), bytes already in flight stay unread and new
/// connections are accepted but never forwarded: the client sees a silent peer, as with a
/// network partition, and only its own timeouts end its requests. [`heal`](Self::heal) closes
/// every connection that lived through the partition (the client reconnects) and forwards new
/// ones again. Threads stop and connections close on drop.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct ProxyShared {
    upstream: SocketAddr,
    cut: AtomicBool,
    /// Bumped by every partition and heal; a connection from an older epoch is closed once the
    /// path is open again.
    epoch: AtomicU64,
    stop: AtomicBool,
}

/// How often blocked proxy threads look at the flags.
const PROXY_POLL: Duration = Duration::from_millis(20);

impl TcpProxy {
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind the proxy port")?;
        listener.set_nonblocking(true).context("non-blocking proxy listener")?;
        let addr = listener.local_addr().context("proxy address")?;
        let shared = Arc::new(ProxyShared {
            upstream,
            cut: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("tcp-proxy".into())
                .spawn(move || accept_loop(listener, shared))
                .context("spawn the proxy thread")?
        };
        Ok(Self { addr, shared, acceptor: Some(acceptor) })
    }

    /// `http://ADDR` of the proxy's listening side.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn partition(&self) {
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.shared.cut.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.shared.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<ProxyShared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let shared = shared.clone();
                let spawned = thread::Builder::new().name("tcp-proxy-conn".into()).spawn(move || serve(client, shared));
                // Out of threads: the connection is dropped, which the client sees as a reset.
                if let Ok(t) = spawned {
                    conns.push(t);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(PROXY_POLL),
            Err(_) => thread::sleep(PROXY_POLL),
        }
        conns.retain(|t| !t.is_finished());
    }
    for t in conns {
        let _ = t.join();
    }
}

fn serve(client: TcpStream, shared: Arc<ProxyShared>) {
    let epoch = shared.epoch.load(Ordering::SeqCst);
    if client.set_nonblocking(false).is_err() {
        return;
    }
    // Accepted during a partition: hold the connection silently until the partition ends,
    // then close it.
    if shared.cut.load(Ordering::SeqCst) {
        while shared.cut.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
            thread::sleep(PROXY_POLL);
        }
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(server) = TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(2)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = {
        let shared = shared.clone();
        thread::spawn(move || pump(client, server, epoch, &shared))
    };
    pump(s2, c2, epoch, &shared);
    let _ = up.join();
}

/// Copies `from` to `to` until EOF, an error, a heal after a partition, or the proxy's drop.
fn pump(mut from: TcpStream, mut to: TcpStream, epoch: u64, shared: &ProxyShared) {
    let mut buf = vec![0u8; 64 << 10];
    if from.set_read_timeout(Some(PROXY_POLL)).is_err() {
        return;
    }
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if shared.cut.load(Ordering::SeqCst) {
            // Partitioned: leave the bytes where they are.
            thread::sleep(PROXY_POLL);
            continue;
        }
        if shared.epoch.load(Ordering::SeqCst) != epoch {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                // Read just as the path was cut: these bytes are lost with the partition.
                if shared.cut.load(Ordering::SeqCst) || shared.epoch.load(Ordering::SeqCst) != epoch {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_outside_the_ephemeral_range_and_bindable() {
        for _ in 0..20 {
            let a = free_loopback_addr().unwrap();
            assert!((20000..32000).contains(&a.port()), "{a}");
            drop(TcpListener::bind(a).unwrap());
        }
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }

    /// Runs `f` on a thread inside network namespace `ns`.
    fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = ns.to_owned();
        thread::spawn(move || {
            enter_netns(&ns).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn etcd_stops_cleanly_and_restarts_on_its_data_dir() {
        let dir = tempfile_dir("stop");
        let mut server = EtcdServer::start_loopback("stop", &dir).unwrap();
        let pid = server.pid().unwrap();
        server.stop().unwrap();
        assert_eq!(server.pid(), None);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
        assert!(!health(server.client_addr()).unwrap_or(false));
        server.restart().unwrap();
        assert!(health(server.client_addr()).unwrap());
        // The second run found the first one's member data instead of bootstrapping anew.
        assert!(server.log().contains("restarting local member"), "{}", server.log());
        let pid = server.pid().unwrap();
        drop(server);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped on drop");
    }

    #[test]
    fn a_taken_port_fails_the_start_with_the_log() {
        let dir = tempfile_dir("taken");
        let mut options = EtcdOptions::loopback("taken", &dir).unwrap();
        let _squatter = TcpListener::bind(options.client_addr).unwrap();
        options.netns = None;
        let e = format!("{:#}", EtcdServer::start(options).unwrap_err());
        assert!(e.contains("address already in use"), "{e}");
        assert!(e.contains("etcd.log"), "{e}");
    }

    #[test]
    fn etcd_runs_inside_a_network_namespace() {
        let pair = crate::netns::NetnsPair::create().expect("network namespaces (root, iproute2)");
        let dir = tempfile_dir("netns");
        let options = EtcdOptions {
            name: "netns".into(),
            data_dir: dir.to_path_buf(),
            client_addr: SocketAddr::from((pair.addr_a, 2379)),
            peer_addr: SocketAddr::from((pair.addr_a, 2380)),
            netns: Some(pair.a.clone()),
        };
        let server = EtcdServer::start(options).unwrap();
        let addr = server.client_addr();
        assert_eq!(server.endpoint(), "http://198.18.0.1:2379");
        // Reachable from the other namespace over the veth pair, not from the host's.
        assert!(in_netns(&pair.b, move || health(addr).unwrap()));
        // (Some sandboxes accept any outgoing TCP connection, so ask for etcd's answer.)
        assert!(!health(addr).unwrap_or(false));
        drop(server);
        assert!(!in_netns(&pair.b, move || health(addr).unwrap_or(false)));
    }

    /// A fresh directory, removed on drop (also when the test fails).
    struct TestDir(PathBuf);

    impl std::ops::Deref for TestDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tempfile_dir(name: &str) -> TestDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hcblk-etcd-test-{}-{name}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        TestDir(dir)
    }

    #[test]
    fn proxy_forwards_then_blackholes_then_closes_on_heal() {
        let upstream = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let up_addr = upstream.local_addr().unwrap();
        let echo = thread::spawn(move || {
            // Echo server for the two connections the test makes.
            for _ in 0..2 {
                let (mut s, _) = upstream.accept().unwrap();
                thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        let proxy = TcpProxy::start(up_addr).unwrap();
        let addr: SocketAddr = proxy.endpoint().trim_start_matches("http://").parse().unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");

        proxy.partition();
        c.write_all(b"lost").unwrap();
        let err = c.read_exact(&mut got).unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{err:?}");

        proxy.heal();
        // The connection that lived through the partition is closed: EOF or reset.
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut rest = Vec::new();
        let r = c.read_to_end(&mut rest);
        assert!(r.is_ok() || r.unwrap_err().kind() == ErrorKind::ConnectionReset);

        let mut c2 = TcpStream::connect(addr).unwrap();
        c2.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c2.write_all(b"pong").unwrap();
        c2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        drop(c2);
        drop(c);
        drop(proxy);
        echo.join().unwrap();
    }
}
