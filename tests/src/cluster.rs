//! N test hosts on one machine: a network namespace per host, all cabled to
//! one bridge that lives in a "switch" namespace of its own.
//!
//! ```text
//!   host "etcd"         host "n1"           host "n2"   ...
//!   eth0 198.18.1.10    eth0 198.18.1.11    eth0 198.18.1.12
//!     |                   |                   |
//!   ==p0==================p1==================p2===  br0   (switch namespace)
//! ```
//!
//! Host `i` (its position in the list given to [`ClusterNet::create`]) is
//! `198.18.1.(10+i)/24` on its `eth0`, a veth whose other end `p<i>` is a port
//! of `br0` in the switch namespace. 198.18.0.0/15 is reserved for
//! benchmarking (RFC 2544), so these addresses collide with nothing real.
//! Namespace names carry the pid and a per-process counter, and nothing is
//! created in the root namespace (no interface, route or sysctl), so any
//! number of clusters can exist at once, even with the same addresses.
//! Everything is deleted on drop, also while unwinding from a panic.
//!
//! Faults, each undoable, for tests of replication under failure:
//! * [`ClusterNet::link_down`]: the host's cable is pulled (its switch port
//!   goes down, so `eth0` loses carrier): it reaches nobody and nobody
//!   reaches it. Sockets stay open; packets are dropped until `link_up`.
//! * [`ClusterNet::block`]: all IPv4 packets between two hosts are dropped,
//!   both directions, by nftables on the switch (bridge family, forward
//!   hook). Not in the hosts' own output hooks: a packet dropped there makes
//!   the sender's `send`/`connect` fail at once with EPERM, which no real
//!   partition does; dropped on the way, the sender sees silence and
//!   timeouts, as it would.
//! * [`ClusterNet::netem`]: delay and loss on the host's egress. With the
//!   kernel's `sch_netem` this is `tc qdisc replace dev eth0 root netem
//!   SPEC`, any netem option. Kernels without it (this project's test
//!   machines: `CONFIG_NET_SCH_NETEM` is not set) get an emulation of
//!   `delay TIME [JITTER]` and `loss PCT%`: loss by an nftables `numgen`
//!   rule on the host's switch port (every frame the host sends, silently,
//!   as netem), delay by an NFQUEUE rule in the host (iptables, Debian
//!   package `iptables`: this kernel has no nft `queue` either) whose IPv4
//!   packets a thread of this process holds for the delay (see
//!   `nfqueue.rs`), keeping their order. Other options are refused with an
//!   error naming the kernel option.
//!
//! Without root, `ip` or `nft`, [`ClusterNet::create`] fails with an error
//! naming what is missing, so a test using it fails rather than passing
//! silently.
//!
//! Processes started with [`ClusterNet::command`] are the caller's to stop:
//! drop them before the `ClusterNet` (declare them after it).

mod nfqueue;
mod sys;

use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The hosts' /24: host `i` is `198.18.1.(10+i)`.
pub const SUBNET: [u8; 3] = [198, 18, 1];
/// Address of the first host; the last octet is this plus the host's index.
const FIRST_HOST: u8 = 10;
/// 10 + 244 = 254, the last usable address of the /24.
pub const MAX_HOSTS: usize = 245;
/// Host names become part of namespace names; keep them short and plain.
const HOST_NAME_MAX: usize = 32;
/// The host's interface, as a real machine's first NIC.
pub const HOST_IF: &str = "eth0";
/// nftables table (bridge family) of the switch: blocked pairs, and a loss
/// chain per port.
const NFT_TABLE: &str = "hcblk";

/// iptables arguments that add (`-A`) or delete (`-D`) the NFQUEUE rule of
/// the delay emulation.
fn nfqueue_rule(op: &str) -> Vec<&str> {
    vec!["-w", "-t", "mangle", op, "POSTROUTING", "-o", HOST_IF, "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"]
}

/// One host of a [`ClusterNet`].
#[derive(Debug, Clone)]
pub struct Host {
    /// The name given to [`ClusterNet::create`].
    pub name: String,
    /// Its network namespace (`ip netns exec NS ...`, `/run/netns/NS`).
    pub ns: String,
    /// Its address on `eth0` (a /24 shared by all hosts of the cluster).
    pub addr: Ipv4Addr,
    /// Its port on the switch's bridge.
    port: String,
}

/// What `netem` installed on a host, to undo it.
#[derive(Debug)]
enum Netem {
    Qdisc,
    Emulated { loss: bool, delayer: Option<nfqueue::Delayer> },
}

#[derive(Debug, Default)]
struct Faults {
    down: BTreeSet<usize>,
    /// Blocked pairs, each stored once in the order `block` was given.
    blocked: BTreeSet<(usize, usize)>,
    netem: HashMap<usize, Netem>,
    /// Whether the kernel has sch_netem; learnt at the first `netem`.
    kernel_netem: Option<bool>,
}

/// N hosts on one bridge; see the module documentation.
#[derive(Debug)]
pub struct ClusterNet {
    switch: String,
    hosts: Vec<Host>,
    /// Namespaces created so far, deleted on drop.
    created: Vec<String>,
    faults: Mutex<Faults>,
}

/// Runs `cmd`, returning its stdout; a failure carries `what` and stderr.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run `{what}`"))?;
    if !out.status.success() {
        bail!("`{what}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args), &format!("ip {}", args.join(" "))).map(drop)
}

/// `program args` inside namespace `ns`.
fn ns_run(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    run(
        Command::new("ip").args(["netns", "exec", ns, program]).args(args),
        &format!("{program} {} (in {ns})", args.join(" ")),
    )
}

/// Feeds `script` to `nft -f -` inside namespace `ns`.
fn nft_script(ns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `nft -f -`")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).context("write nft script")?;
    }
    let out = child.wait_with_output().context("wait for nft")?;
    if !out.status.success() {
        bail!("`nft -f -` in {ns} failed: {}\nscript:\n{script}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Fails naming `program` (and its Debian package) unless it runs.
fn require(program: &str, version_arg: &str, package: &str) -> Result<()> {
    let ok = Command::new(program)
        .arg(version_arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        bail!("cluster network tests need the `{program}` command (Debian package {package})");
    }
    Ok(())
}

fn validate_names(names: &[&str]) -> Result<()> {
    if names.is_empty() {
        bail!("a cluster needs at least one host");
    }
    if names.len() > MAX_HOSTS {
        bail!("at most {MAX_HOSTS} hosts fit 198.18.1.10-254, got {}", names.len());
    }
    let mut seen = BTreeSet::new();
    for n in names {
        let plain = n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if n.is_empty() || n.len() > HOST_NAME_MAX || !plain {
            bail!("host name {n:?}: expected 1-{HOST_NAME_MAX} of [A-Za-z0-9_-]");
        }
        if !seen.insert(*n) {
            bail!("host name {n:?} given twice");
        }
    }
    Ok(())
}

/// netem options the emulation supports.
#[derive(Debug, Clone, Copy, PartialEq)]
struct NetemSpec {
    delay: Duration,
    jitter: Duration,
    /// Drop probability in parts per million.
    loss_ppm: u32,
}

/// A tc time: a number with s/sec/ms/msec/us/usec (plural too); a bare
/// number is microseconds, as in tc.
fn parse_time(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "s" | "sec" | "secs" => 1e9,
        "ms" | "msec" | "msecs" => 1e6,
        "" | "us" | "usec" | "usecs" => 1e3,
        _ => return None,
    };
    let ns = v * scale;
    (ns.is_finite() && (0.0..=60e9).contains(&ns)).then(|| Duration::from_nanos(ns as u64))
}

fn parse_netem(spec: &str) -> Result<NetemSpec> {
    let unsupported = |what: &str| {
        anyhow!(
            "netem {what:?}: this kernel lacks sch_netem (CONFIG_NET_SCH_NETEM) and the \
             emulation supports only `delay TIME [JITTER]` and `loss [random] PCT%`"
        )
    };
    let mut s = NetemSpec { delay: Duration::ZERO, jitter: Duration::ZERO, loss_ppm: 0 };
    let words: Vec<&str> = spec.split_whitespace().collect();
    let mut i = 0;
    while i < words.len() {
        match words[i] {
            "delay" => {
                let t = words.get(i + 1).ok_or_else(|| anyhow!("netem: `delay` needs a time"))?;
                s.delay = parse_time(t).ok_or_else(|| anyhow!("netem: bad delay {t:?}"))?;
                i += 2;
                if let Some(j) = words.get(i).and_then(|w| parse_time(w)) {
                    if j > s.delay {
                        bail!("netem: jitter {j:?} larger than delay {:?}", s.delay);
                    }
                    s.jitter = j;
                    i += 1;
                    if let Some(w) = words.get(i) {
                        if w.ends_with('%') {
                            return Err(unsupported(&format!("delay correlation {w}")));
                        }
                    }
                }
            }
            "loss" => {
                i += 1;
                if words.get(i) == Some(&"random") {
                    i += 1;
                }
                let p = words.get(i).ok_or_else(|| anyhow!("netem: `loss` needs a percentage"))?;
                let pct: f64 = p
                    .strip_suffix('%')
                    .and_then(|n| n.parse().ok())
                    .filter(|v: &f64| (0.0..=100.0).contains(v))
                    .ok_or_else(|| anyhow!("netem: bad loss {p:?} (expected 0-100%)"))?;
                s.loss_ppm = (pct * 10_000.0).round() as u32;
                i += 1;
                if let Some(w) = words.get(i) {
                    if w.ends_with('%') {
                        return Err(unsupported(&format!("loss correlation {w}")));
                    }
                }
            }
            other => return Err(unsupported(other)),
        }
    }
    if s.delay.is_zero() && s.loss_ppm == 0 {
        bail!("netem {spec:?}: nothing to do");
    }
    Ok(s)
}

impl ClusterNet {
    /// Creates the switch and one host per name, in this order (host `i`
    /// gets 198.18.1.(10+i)). Names: 1-32 of `[A-Za-z0-9_-]`, unique.
    pub fn create(names: &[&str]) -> Result<Self> {
        if sys::euid() != 0 {
            bail!("cluster network tests need root (CAP_SYS_ADMIN + CAP_NET_ADMIN); running as uid {}", sys::euid());
        }
        require("ip", "-V", "iproute2")?;
        require("nft", "--version", "nftables")?;
        validate_names(names)?;

        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("hcblk-c{}-{n}", std::process::id());
        let mut net = ClusterNet {
            // A dot: host names cannot contain one, so no host is called this.
            switch: format!("{base}.switch"),
            hosts: Vec::with_capacity(names.len()),
            created: Vec::new(),
            faults: Mutex::new(Faults::default()),
        };
        // From here on `net`'s Drop deletes whatever was created.
        ip(&["netns", "add", &net.switch])?;
        net.created.push(net.switch.clone());
        let sw = net.switch.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let host = Host {
                name: name.to_string(),
                ns: format!("{base}-{name}"),
                addr: Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], FIRST_HOST + i as u8),
                port: format!("p{i}"),
            };
            ip(&["netns", "add", &host.ns])?;
            net.created.push(host.ns.clone());
            // Both ends are created directly in their namespaces: nothing
            // appears in the root namespace, not even for a moment.
            ip(&["-n", &host.ns, "link", "add", HOST_IF, "type", "veth", "peer", "name", &host.port, "netns", &sw])?;
            ip(&["-n", &sw, "link", "set", &host.port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &host.port, "up"])?;
            let cidr = format!("{}/24", host.addr);
            ip(&["-n", &host.ns, "addr", "add", &cidr, "dev", HOST_IF])?;
            ip(&["-n", &host.ns, "link", "set", HOST_IF, "up"])?;
            ip(&["-n", &host.ns, "link", "set", "lo", "up"])?;
            net.hosts.push(host);
        }
        // The switch's fault rules, empty until a fault is injected: a set of
        // blocked (source, destination) pairs, and per port a chain that
        // `netem` fills with its loss rule.
        let mut script = format!(
            "table bridge {NFT_TABLE} {{
               set blocked {{ type ipv4_addr . ipv4_addr; }}
               chain forward {{
                 type filter hook forward priority 0; policy accept;
                 ip saddr . ip daddr @blocked drop
               }}
             }}\n"
        );
        for h in &net.hosts {
            let p = &h.port;
            script += &format!(
                "add chain bridge {NFT_TABLE} loss_{p}\n\
                 add rule bridge {NFT_TABLE} forward iifname \"{p}\" jump loss_{p}\n"
            );
        }
        nft_script(&sw, &script)?;
        Ok(net)
    }

    /// All hosts, in creation order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The switch namespace (holds `br0` and the ports `p<i>`), e.g. to run
    /// tcpdump on the bridge.
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.hosts.iter().position(|h| h.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
            anyhow!("no host {name:?} in this cluster (hosts: {known:?})")
        })
    }

    /// The host called `name`.
    ///
    /// # Panics
    /// If there is none: host names are the test's own constants.
    pub fn host(&self, name: &str) -> &Host {
        match self.index(name) {
            Ok(i) => &self.hosts[i],
            Err(e) => panic!("{e}"),
        }
    }

    /// A command that runs `program` inside host `name`'s namespace (`ip
    /// netns exec`). Panics like [`ClusterNet::host`].
    pub fn command(&self, name: &str, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(name).ns]).arg(program);
        c
    }

    /// Moves the calling thread into host `name`'s namespace; sockets it
    /// creates from now on live there (other threads are unaffected).
    pub fn enter(&self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        sys::setns(&self.netns_path(i))
    }

    /// Runs `f` on a new thread inside host `name`'s namespace and returns
    /// its result (a panic in `f` is resumed here).
    pub fn run_in<T: Send>(&self, name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.netns_path(self.index(name)?);
        std::thread::scope(|s| {
            let t = s.spawn(move || sys::setns(&path).map(|()| f()));
            match t.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    fn netns_path(&self, i: usize) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.hosts[i].ns)
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        // A panic elsewhere while holding the lock leaves the state as valid
        // as it was (every change is one insert or remove after the command).
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pulls host `name`'s cable: its switch port goes down and its `eth0`
    /// loses carrier. A no-op if it is already down.
    pub fn link_down(&self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        let mut f = self.faults();
        if !f.down.contains(&i) {
            ip(&["-n", &self.switch, "link", "set", &self.hosts[i].port, "down"])?;
            f.down.insert(i);
        }
        Ok(())
    }

    /// Plugs host `name`'s cable back in. A no-op if it is up.
    pub fn link_up(&self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        let mut f = self.faults();
        if f.down.contains(&i) {
            ip(&["-n", &self.switch, "link", "set", &self.hosts[i].port, "up"])?;
            f.down.remove(&i);
        }
        Ok(())
    }

    /// Drops every IPv4 packet between `a` and `b`, both directions (on the
    /// switch; see the module documentation). A no-op if the pair is already
    /// blocked.
    pub fn block(&self, a: &str, b: &str) -> Result<()> {
        let (ia, ib) = (self.index(a)?, self.index(b)?);
        if ia == ib {
            bail!("block({a:?}, {b:?}): a host cannot be cut from itself");
        }
        let mut f = self.faults();
        if f.blocked.contains(&(ia, ib)) || f.blocked.contains(&(ib, ia)) {
            return Ok(());
        }
        self.blocked_pairs(ia, ib, "add")?;
        f.blocked.insert((ia, ib));
        Ok(())
    }

    /// Undoes [`ClusterNet::block`] of this pair (in either order). A no-op
    /// if it is not blocked.
    pub fn unblock(&self, a: &str, b: &str) -> Result<()> {
        let (ia, ib) = (self.index(a)?, self.index(b)?);
        let mut f = self.faults();
        for (x, y) in [(ia, ib), (ib, ia)] {
            if f.blocked.contains(&(x, y)) {
                self.blocked_pairs(x, y, "delete")?;
                f.blocked.remove(&(x, y));
            }
        }
        Ok(())
    }

    fn blocked_pairs(&self, a: usize, b: usize, op: &str) -> Result<()> {
        let (x, y) = (self.hosts[a].addr, self.hosts[b].addr);
        let elements = format!("{{ {x} . {y}, {y} . {x} }}");
        ns_run(&self.switch, "nft", &[op, "element", "bridge", NFT_TABLE, "blocked", &elements]).map(drop)
    }

    /// Degrades host `name`'s egress as netem `spec` says (e.g. `"delay 2ms
    /// loss 5%"`), replacing any earlier netem on it. See the module
    /// documentation for kernels without sch_netem.
    pub fn netem(&self, name: &str, spec: &str) -> Result<()> {
        let i = self.index(name)?;
        let mut f = self.faults();
        self.clear_netem_locked(&mut f, i)?;
        let ns = &self.hosts[i].ns;
        if f.kernel_netem != Some(false) {
            let mut args = vec!["qdisc", "replace", "dev", HOST_IF, "root", "netem"];
            args.extend(spec.split_whitespace());
            match ns_run(ns, "tc", &args) {
                Ok(_) => {
                    f.kernel_netem = Some(true);
                    f.netem.insert(i, Netem::Qdisc);
                    return Ok(());
                }
                Err(e) if format!("{e:#}").contains("qdisc kind is unknown") => {
                    f.kernel_netem = Some(false);
                }
                Err(e) => return Err(e),
            }
        }
        let s = parse_netem(spec)?;
        let mut state = Netem::Emulated { loss: false, delayer: None };
        let applied = self.emulate(i, s, &mut state);
        // Whatever part was installed is recorded, so a failure is undone by
        // clear_netem (and by drop).
        f.netem.insert(i, state);
        if let Err(e) = applied {
            let _ = self.clear_netem_locked(&mut f, i);
            return Err(e);
        }
        Ok(())
    }

    fn emulate(&self, i: usize, s: NetemSpec, state: &mut Netem) -> Result<()> {
        let Netem::Emulated { loss, delayer } = state else {
            bail!("internal: emulating over a qdisc");
        };
        let ns = &self.hosts[i].ns;
        if s.loss_ppm > 0 {
            // numgen's value must be below the modulus, so 100 % is plain drop.
            let cond = if s.loss_ppm >= 1_000_000 {
                String::new()
            } else {
                format!("numgen random mod 1000000 < {} ", s.loss_ppm)
            };
            let rule = format!("add rule bridge {NFT_TABLE} loss_{} {cond}drop", self.hosts[i].port);
            nft_script(&self.switch, &rule)?;
            *loss = true;
        }
        if !s.delay.is_zero() {
            // This kernel lacks sch_netem and nft's queue statement: the
            // delay needs an iptables NFQUEUE rule.
            require("iptables", "-V", "iptables, for netem delay without sch_netem")?;
            // The queue is bound before any packet is sent to it (and
            // --queue-bypass lets packets through should it ever be unbound).
            *delayer = Some(nfqueue::Delayer::start(
                self.netns_path(i),
                nfqueue::DelaySpec { delay: s.delay, jitter: s.jitter },
            )?);
            ns_run(ns, "iptables", &nfqueue_rule("-A"))?;
        }
        Ok(())
    }

    /// Removes host `name`'s netem. A no-op if it has none.
    pub fn clear_netem(&self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        let mut f = self.faults();
        self.clear_netem_locked(&mut f, i)
    }

    fn clear_netem_locked(&self, f: &mut Faults, i: usize) -> Result<()> {
        let ns = &self.hosts[i].ns;
        match f.netem.remove(&i) {
            None => Ok(()),
            Some(Netem::Qdisc) => ns_run(ns, "tc", &["qdisc", "del", "dev", HOST_IF, "root"]).map(drop),
            Some(Netem::Emulated { loss, delayer }) => {
                let mut result = Ok(());
                if let Some(mut d) = delayer {
                    // First no new packets are queued, then the held ones go.
                    // The rule may be missing if installing it failed.
                    let listed = ns_run(ns, "iptables", &["-w", "-t", "mangle", "-S", "POSTROUTING"])?;
                    if listed.contains("NFQUEUE") {
                        result = ns_run(ns, "iptables", &nfqueue_rule("-D")).map(drop);
                    }
                    result = result.and(d.stop());
                }
                if loss {
                    let flush = format!("flush chain bridge {NFT_TABLE} loss_{}", self.hosts[i].port);
                    result = result.and(nft_script(&self.switch, &flush));
                }
                result
            }
        }
    }

    /// Undoes every fault: all links up, all pairs unblocked, no netem.
    pub fn heal(&self) -> Result<()> {
        let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        for a in &names {
            self.link_up(a)?;
            self.clear_netem(a)?;
            for b in &names {
                self.unblock(a, b)?;
            }
        }
        Ok(())
    }
}

impl Drop for ClusterNet {
    fn drop(&mut self) {
        // Delayer threads first: they hold packets of these namespaces.
        let netem: Vec<Netem> = self.faults().netem.drain().map(|(_, v)| v).collect();
        drop(netem);
        // Deleting a namespace deletes its interfaces, veth peers included,
        // and with them its nftables and iptables rules.
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_spec_subset_parses() {
        let s = parse_netem("delay 2ms loss 5%").unwrap();
        assert_eq!(s.delay, Duration::from_millis(2));
        assert_eq!(s.jitter, Duration::ZERO);
        assert_eq!(s.loss_ppm, 50_000);
        let s = parse_netem("loss random 0.1%  delay 1.5ms 500us").unwrap();
        assert_eq!(s.delay, Duration::from_micros(1500));
        assert_eq!(s.jitter, Duration::from_micros(500));
        assert_eq!(s.loss_ppm, 1000);
        assert_eq!(parse_netem("delay 300").unwrap().delay, Duration::from_micros(300));
        assert_eq!(parse_netem("delay 1s").unwrap().delay, Duration::from_secs(1));
    }

    #[test]
    fn netem_spec_rejects_what_it_cannot_emulate() {
        for bad in [
            "",
            "delay",
            "delay 2parsecs",
            "delay 2ms 3ms",
            "delay 10ms 1ms 25%",
            "loss 5",
            "loss 101%",
            "loss -1%",
            "loss 5% 25%",
            "rate 1mbit",
            "duplicate 1%",
            "delay 2ms reorder 25%",
            "loss 0%",
        ] {
            assert!(parse_netem(bad).is_err(), "{bad:?} must be refused");
        }
        let e = parse_netem("corrupt 1%").unwrap_err().to_string();
        assert!(e.contains("CONFIG_NET_SCH_NETEM"), "{e}");
    }

    #[test]
    fn host_names_are_checked() {
        assert!(validate_names(&["etcd", "n1", "n-2", "n_3"]).is_ok());
        assert!(validate_names(&[]).is_err());
        assert!(validate_names(&["n1", "n1"]).is_err());
        assert!(validate_names(&["a.b"]).is_err());
        assert!(validate_names(&["a b"]).is_err());
        assert!(validate_names(&[""]).is_err());
        let long = "x".repeat(HOST_NAME_MAX + 1);
        assert!(validate_names(&[long.as_str()]).is_err());
        let many: Vec<String> = (0..=MAX_HOSTS).map(|i| format!("h{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(validate_names(&many).is_err());
        assert!(validate_names(&many[..MAX_HOSTS]).is_ok());
    }
}
