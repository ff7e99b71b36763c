//! `ClusterNet`: N hosts in network namespaces on one bridge, and its
//! faults, checked with plain TCP and UDP (no ping): sockets are created
//! inside a host by a thread that entered its namespace, and keep living
//! there whichever thread uses them afterwards.

use anyhow::{bail, Context, Result};
use hcblk_tests::cluster::ClusterNet;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PORT: u16 = 7600;
/// A probe that must fail is given this long to (wrongly) succeed.
const UNREACHABLE_WAIT: Duration = Duration::from_millis(1500);
/// A probe that must succeed is retried until this passes (a link that just
/// came back may need a moment: ARP, TCP retransmission of the SYN).
const REACHABLE_DEADLINE: Duration = Duration::from_secs(10);

/// A TCP server inside one host: greets each connection with its identity
/// line, then echoes whatever it receives. Stops accepting on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(net: &ClusterNet, host: &str, ident: &str) -> Result<Self> {
        let addr = SocketAddr::from((net.host(host).addr, PORT));
        // Bound by a thread inside the host; the socket stays there.
        let listener = net.run_in(host, || TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let ident = format!("{ident}\n");
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let ident = ident.clone();
                        std::thread::spawn(move || echo(s, &ident));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Server { stop, thread: Some(thread) })
    }
}

fn echo(mut s: TcpStream, ident: &str) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    // A client that vanishes (its host was cut off) must not pin the thread.
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    if s.write_all(ident.as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from host `from` to `to`'s server, returns its identity line.
fn probe(net: &ClusterNet, from: &str, to: &str, timeout: Duration) -> Result<String> {
    let addr = SocketAddr::from((net.host(to).addr, PORT));
    let s = net
        .run_in(from, || TcpStream::connect_timeout(&addr, timeout))?
        .with_context(|| format!("connect {from} -> {to} ({addr})"))?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).with_context(|| format!("greeting {from} -> {to}"))?;
    Ok(line.trim_end().to_string())
}

fn expect_reach(net: &ClusterNet, from: &str, to: &str, ident: &str) -> Result<()> {
    let deadline = Instant::now() + REACHABLE_DEADLINE;
    loop {
        match probe(net, from, to, Duration::from_secs(2)) {
            Ok(got) if got == ident => return Ok(()),
            Ok(got) => bail!("{from} -> {to}: reached {got:?}, expected {ident:?}"),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("{from} -> {to} must be reachable"))),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The probe must time out: a cut link or a partition is silence, not an
/// immediate error (EPERM, ECONNREFUSED, EHOSTUNREACH) that would let the
/// code under test fail fast where a real network makes it wait.
fn expect_cut(net: &ClusterNet, from: &str, to: &str) -> Result<()> {
    match probe(net, from, to, UNREACHABLE_WAIT) {
        Ok(got) => bail!("{from} -> {to} must be cut, but reached {got:?}"),
        Err(e) => match e.root_cause().downcast_ref::<std::io::Error>().map(|e| e.kind()) {
            Some(ErrorKind::TimedOut | ErrorKind::WouldBlock) => Ok(()),
            _ => bail!("{from} -> {to} must time out, but failed with: {e:#}"),
        },
    }
}

/// Checks every ordered pair at once (cut pairs each wait the full
/// timeout, so in parallel): `cut(a, b)` says which must fail.
fn check_matrix(net: &ClusterNet, hosts: &[&str], cut: impl Fn(&str, &str) -> bool + Sync) -> Result<()> {
    std::thread::scope(|s| {
        let mut probes = Vec::new();
        for &a in hosts {
            for &b in hosts {
                if a == b {
                    continue;
                }
                let cut = &cut;
                probes.push(s.spawn(
                    move || {
                        if cut(a, b) {
                            expect_cut(net, a, b)
                        } else {
                            expect_reach(net, a, b, b)
                        }
                    },
                ));
            }
        }
        let mut errors = Vec::new();
        for p in probes {
            match p.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("{e:#}")),
                Err(_) => errors.push("probe thread panicked".into()),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("\n"))
        }
    })
}

fn servers(net: &ClusterNet, hosts: &[&str]) -> Result<Vec<Server>> {
    hosts.iter().map(|h| Server::start(net, h, h)).collect()
}

fn netns_list() -> Result<String> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const HOSTS: [&str; 4] = ["etcd", "n1", "n2", "n3"];

#[test]
fn cluster_net_all_pairs_reach_each_other() -> Result<()> {
    let net = ClusterNet::create(&HOSTS)?;
    for (i, h) in HOSTS.iter().enumerate() {
        assert_eq!(net.host(h).addr.to_string(), format!("198.18.1.{}", 10 + i));
        assert_eq!(net.hosts()[i].name, *h);
    }
    let _servers = servers(&net, &HOSTS)?;
    check_matrix(&net, &HOSTS, |_, _| false)?;

    // `enter` moves exactly the calling thread: there n2's address can be
    // bound, in n1 it cannot, and the root namespace has none of them.
    let n2 = net.host("n2").addr;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            net.enter("n2")?;
            TcpListener::bind((n2, 0)).context("bind n2's address inside n2")?;
            Ok(())
        })
        .join()
        .expect("thread")
    })?;
    let in_n1 = net.run_in("n1", || TcpListener::bind((n2, 0)).map(drop))?;
    assert_eq!(in_n1.unwrap_err().kind(), ErrorKind::AddrNotAvailable);
    for h in net.hosts() {
        let e = TcpListener::bind((h.addr, 0)).expect_err("root namespace must not hold cluster addresses");
        assert_eq!(e.kind(), ErrorKind::AddrNotAvailable);
    }

    // A process started with `command` runs inside the host.
    let out = net.command("n3", "ip").args(["-4", "-o", "addr", "show", "dev", "eth0"]).output()?;
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("198.18.1.13/24"), "{out}");
    Ok(())
}

#[test]
fn cluster_net_link_down_cuts_a_host_from_all_and_link_up_restores() -> Result<()> {
    let net = ClusterNet::create(&HOSTS)?;
    let _servers = servers(&net, &HOSTS)?;
    check_matrix(&net, &HOSTS, |_, _| false)?;

    net.link_down("n1")?;
    net.link_down("n1")?; // idempotent
    check_matrix(&net, &HOSTS, |a, b| a == "n1" || b == "n1")?;

    net.link_up("n1")?;
    check_matrix(&net, &HOSTS, |_, _| false)?;
    Ok(())
}

#[test]
fn cluster_net_block_cuts_exactly_one_pair() -> Result<()> {
    let net = ClusterNet::create(&HOSTS)?;
    let _servers = servers(&net, &HOSTS)?;

    net.block("n1", "n2")?;
    net.block("n2", "n1")?; // the same pair: a no-op
    let pair = |a: &str, b: &str| (a, b) == ("n1", "n2") || (a, b) == ("n2", "n1");
    check_matrix(&net, &HOSTS, pair)?;

    // A second pair, then undo the first in the other order.
    net.block("n3", "etcd")?;
    check_matrix(&net, &HOSTS, |a, b| pair(a, b) || (a, b) == ("n3", "etcd") || (a, b) == ("etcd", "n3"))?;
    net.unblock("n2", "n1")?;
    check_matrix(&net, &HOSTS, |a, b| (a, b) == ("n3", "etcd") || (a, b) == ("etcd", "n3"))?;
    net.heal()?;
    check_matrix(&net, &HOSTS, |_, _| false)?;
    assert!(net.block("n1", "n1").is_err());
    assert!(net.block("n1", "nope").is_err());
    Ok(())
}

/// Median round trip of 1 KiB over an established connection `from` -> `to`.
fn rtt(net: &ClusterNet, from: &str, to: &str) -> Result<Duration> {
    let addr = SocketAddr::from((net.host(to).addr, PORT));
    let mut s = net.run_in(from, || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let msg = [0x5au8; 1024];
    let mut back = [0u8; 1024];
    let mut samples = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        s.write_all(&msg)?;
        r.read_exact(&mut back)?;
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

/// Datagrams of `count` sent from `from` to `to` that arrive.
fn udp_delivered(net: &ClusterNet, from: &str, to: &str, count: u32) -> Result<u32> {
    const WARMUP: u8 = 0;
    const DATA: u8 = 1;
    let dst = SocketAddr::from((net.host(to).addr, PORT + 1));
    let rx = net.run_in(to, || UdpSocket::bind(dst))??;
    let tx = net.run_in(from, || UdpSocket::bind((net.host(from).addr, 0)))??;
    // First one datagram through (neighbour resolution done), unless the
    // path drops everything; only then are the counted ones sent.
    rx.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = [0u8; 64];
    let warm_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < warm_until {
        tx.send_to(&[WARMUP], dst)?;
        if rx.recv(&mut buf).is_ok() {
            break;
        }
    }
    rx.set_read_timeout(Some(Duration::from_millis(500)))?;
    std::thread::scope(|s| {
        let recv = s.spawn(|| {
            let mut got = 0u32;
            let mut buf = [0u8; 64];
            while let Ok(n) = rx.recv(&mut buf) {
                if n > 0 && buf[0] == DATA {
                    got += 1;
                }
            }
            got
        });
        for i in 0..count {
            let mut d = [DATA; 5];
            d[1..].copy_from_slice(&i.to_le_bytes());
            tx.send_to(&d, dst)?;
            // Paced, so no socket buffer overflows and only the fault drops.
            if i % 8 == 7 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(recv.join().expect("receiver"))
    })
}

#[test]
fn cluster_net_netem_adds_delay_and_loss() -> Result<()> {
    let net = ClusterNet::create(&["n1", "n2", "n3"])?;
    let _servers = servers(&net, &["n1", "n2", "n3"])?;
    let fast = Duration::from_millis(5);
    let before = rtt(&net, "n2", "n1")?;
    assert!(before < fast, "baseline round trip {before:?}");

    // Delay on n1's egress: every answer from n1 waits 20 ms.
    net.netem("n1", "delay 20ms")?;
    let delayed = rtt(&net, "n2", "n1")?;
    assert!(
        delayed >= Duration::from_millis(20) && delayed < Duration::from_millis(200),
        "round trip with 20 ms delay: {delayed:?}"
    );
    let other = rtt(&net, "n2", "n3")?;
    assert!(other < fast, "n2 <-> n3 must not be delayed: {other:?}");
    // Replacing the spec replaces the delay.
    net.netem("n1", "delay 2ms")?;
    let small = rtt(&net, "n2", "n1")?;
    assert!(
        small >= Duration::from_millis(2) && small < Duration::from_millis(15),
        "round trip with 2 ms delay: {small:?}"
    );
    net.clear_netem("n1")?;
    let after = rtt(&net, "n2", "n1")?;
    assert!(after < fast, "round trip after clear_netem: {after:?}");

    // Loss: 50 % of 400 datagrams from n1 (binomial: 200 ± 10 sd).
    assert_eq!(udp_delivered(&net, "n1", "n2", 400)?, 400);
    net.netem("n1", "loss 50%")?;
    let got = udp_delivered(&net, "n1", "n2", 400)?;
    assert!((100..=300).contains(&got), "{got} of 400 delivered at 50 % loss");
    // Only n1's egress: n2 -> n1 is intact.
    assert_eq!(udp_delivered(&net, "n2", "n1", 400)?, 400);
    net.netem("n1", "loss 100%")?;
    assert_eq!(udp_delivered(&net, "n1", "n2", 100)?, 0);

    // Both at once, the brief's example; then nothing is left behind.
    net.netem("n1", "delay 2ms loss 5%")?;
    let both = rtt(&net, "n2", "n1")?;
    eprintln!(
        "round trips n2 -> n1: {before:?} before, {delayed:?} at 20 ms, {small:?} at 2 ms, \
         {after:?} after clear, {both:?} at 2 ms + 5 %; {got}/400 delivered at 50 % loss"
    );
    assert!(both >= Duration::from_millis(2), "round trip with 2 ms delay and 5 % loss: {both:?}");
    net.clear_netem("n1")?;
    net.clear_netem("n1")?; // idempotent
    assert_eq!(udp_delivered(&net, "n1", "n2", 400)?, 400);
    assert!(rtt(&net, "n2", "n1")? < fast);
    assert!(net.netem("n1", "bogus 1").is_err());
    Ok(())
}

#[test]
fn cluster_net_two_clusters_at_once_do_not_interfere() -> Result<()> {
    // Created concurrently, same host names, same addresses.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| ClusterNet::create(&["n1", "n2"]));
        let b = s.spawn(|| ClusterNet::create(&["n1", "n2"]));
        (a.join().expect("create a"), b.join().expect("create b"))
    });
    let (a, b) = (a?, b?);
    assert_eq!(a.host("n1").addr, b.host("n1").addr);
    assert_ne!(a.host("n1").ns, b.host("n1").ns);
    assert_ne!(a.switch_ns(), b.switch_ns());
    let _sa = Server::start(&a, "n1", "a-n1")?;
    let _sb = Server::start(&b, "n1", "b-n1")?;
    expect_reach(&a, "n2", "n1", "a-n1")?;
    expect_reach(&b, "n2", "n1", "b-n1")?;
    // A fault in one cluster is invisible in the other.
    a.link_down("n1")?;
    expect_cut(&a, "n2", "n1")?;
    expect_reach(&b, "n2", "n1", "b-n1")?;
    b.block("n1", "n2")?;
    a.link_up("n1")?;
    expect_reach(&a, "n2", "n1", "a-n1")?;
    expect_cut(&b, "n2", "n1")?;
    Ok(())
}

#[test]
fn cluster_net_drop_deletes_every_namespace_also_after_a_panic() -> Result<()> {
    let net = ClusterNet::create(&HOSTS)?;
    let mut names: Vec<String> = net.hosts().iter().map(|h| h.ns.clone()).collect();
    names.push(net.switch_ns().to_string());
    let listed = netns_list()?;
    for n in &names {
        assert!(listed.lines().any(|l| l.split_whitespace().next() == Some(n)), "{n} missing");
    }
    net.link_down("n2")?;
    net.block("n1", "n3")?;
    drop(net);
    let listed = netns_list()?;
    for n in &names {
        assert!(!listed.contains(n.as_str()), "{n} left behind:\n{listed}");
    }

    // A test that panics with faults in place (a netem delay holding
    // packets among them) still cleans up while unwinding.
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let net = ClusterNet::create(&["x", "y"]).expect("create");
        let mut names: Vec<String> = net.hosts().iter().map(|h| h.ns.clone()).collect();
        names.push(net.switch_ns().to_string());
        tx.send(names).expect("send");
        net.netem("x", "delay 5ms loss 1%").expect("netem");
        net.block("x", "y").expect("block");
        panic!("deliberate panic with a ClusterNet alive");
    });
    assert!(t.join().is_err(), "the thread must have panicked");
    let names = rx.recv()?;
    let listed = netns_list()?;
    for n in &names {
        assert!(!listed.contains(n.as_str()), "{n} left behind after a panic:\n{listed}");
    }
    Ok(())
}

#[test]
fn cluster_net_refuses_bad_host_lists() -> Result<()> {
    // Checked before anything is created.
    let e = ClusterNet::create(&[]).unwrap_err().to_string();
    assert!(e.contains("at least one host"), "{e}");
    let e = ClusterNet::create(&["n1", "n1"]).unwrap_err().to_string();
    assert!(e.contains("given twice"), "{e}");
    let e = ClusterNet::create(&["n.1"]).unwrap_err().to_string();
    assert!(e.contains("[A-Za-z0-9_-]"), "{e}");
    let net = ClusterNet::create(&["n1"])?;
    let e = net.link_down("n9").unwrap_err().to_string();
    assert!(e.contains("no host \"n9\""), "{e}");
    Ok(())
}
