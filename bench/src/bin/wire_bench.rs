//! wire-bench: the `tcp` transport's one-sided READ/WRITE against plain TCP,
//! between two network namespaces joined by a veth pair, in one run.
//!
//! `wire-bench run` (root) creates the namespaces, starts `wire-bench serve`
//! in host B, moves itself into host A and measures:
//! * 4 KiB round trips at QD1 (p50, p99): one-sided WRITE / READ vs a plain
//!   TCP request/response carrying the same 4 KiB (request → ack, request → data);
//! * 128 KiB at QD32 (GB/s): one-sided WRITE / READ vs a plain TCP stream
//!   with 32 requests outstanding.
//!
//! `wire-bench serve --host A` and `wire-bench client --host A` are the two
//! halves alone, for scripts that set up their own hosts (bench/replicated.sh
//! measures between two of its namespaces this way).
//!
//! The serving side publishes its windows once (a READ descriptor whose
//! segments are its write window, a WRITE descriptor for its read window):
//! a bench convention so that the measured operation is the one-sided
//! operation alone.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hcblk_tests::netns::{Child, NetnsPair};
use proto::auth::Secret;
use proto::tcp::{TcpAcceptor, TcpEndpoint};
use proto::wire::Descriptor;
use proto::{Access, Config, Endpoint, LocalSeg, Message, OpCompletion, Registry, Segment, Status};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

// A published window must fit one descriptor (MAX_IO_LEN).
const WINDOW: usize = 16 << 20;
const SECRET: &[u8] = b"wire-bench-cluster-secret";
const ONE_SIDED_PORT: u16 = 7500;
const PLAIN_PORT: u16 = 7501;

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Set up the two hosts and run every measurement.
    Run {
        /// QD1 round trips per case.
        #[arg(long, default_value_t = 20000)]
        qd1_ops: usize,
        /// 128 KiB operations per QD32 case.
        #[arg(long, default_value_t = 16384)]
        qd32_ops: usize,
        /// Also write the Markdown table here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Serving side (started by `run` inside host B).
    Serve {
        #[arg(long)]
        host: String,
    },
    /// Measuring side only, against a `serve` already running at `--host`
    /// (for runs whose hosts are set up by a script, e.g. bench/replicated.sh).
    Client {
        /// Address of the serving host.
        #[arg(long)]
        host: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 20000)]
        qd1_ops: usize,
        #[arg(long, default_value_t = 16384)]
        qd32_ops: usize,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn cfg(node: u64) -> Result<Config> {
    let mut c = Config::new(9, node, Secret::new(SECRET.to_vec())?);
    c.max_inflight = 64;
    Ok(c)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().cmd {
        Cmd::Serve { host } => serve(&host),
        Cmd::Run { qd1_ops, qd32_ops, out } => run(qd1_ops, qd32_ops, out),
        Cmd::Client { host, qd1_ops, qd32_ops, out } => measure(host, qd1_ops, qd32_ops, out),
    }
}

// ---------------------------------------------------------------- serving side

fn serve(host: &str) -> Result<()> {
    let plain = TcpListener::bind((host, PLAIN_PORT))?;
    std::thread::spawn(move || {
        for s in plain.incoming().flatten() {
            std::thread::spawn(move || plain_server(s));
        }
    });
    let registry = Arc::new(Registry::new());
    let mut mem = vec![0x5au8; WINDOW];
    // SAFETY: `mem` is not touched through Rust again and outlives the
    // acceptor and every endpoint (this function never returns after the loop).
    let region = unsafe { registry.register(mem.as_mut_ptr(), mem.len()) }?;
    let acc = TcpAcceptor::bind((host, ONE_SIDED_PORT), cfg(2)?, registry)?;
    println!("READY");
    std::io::stdout().flush()?;
    loop {
        let Ok(mut ep) = acc.accept() else { continue };
        let w = ep.grant(region, &[(0, WINDOW as u32)], Access::RemoteWrite)?;
        let r = ep.grant(region, &[(0, WINDOW as u32)], Access::RemoteRead)?;
        let publish = |g: &proto::Grant| Descriptor {
            length: WINDOW as u32,
            segments: g.segments.clone(),
            ..Descriptor::default()
        };
        ep.send(&Message::Read(publish(&w)))?;
        ep.send(&Message::Write(publish(&r)))?;
        // The one-sided operations are served by the transport's own
        // threads; this thread only waits for the connection to end.
        while ep.is_connected() {
            std::thread::sleep(Duration::from_millis(50));
        }
        ep.revoke(w.key)?;
        ep.revoke(r.key)?;
    }
}

/// Plain TCP: 16-byte request {op u32, len u32, tag u64}; op 1 carries `len`
/// bytes and is answered with 8 bytes, op 2 is answered with `len` bytes.
fn plain_server(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 1 << 20];
    let mut hdr = [0u8; 16];
    while s.read_exact(&mut hdr).is_ok() {
        let op = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let len = (u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize).min(buf.len());
        let ok = match op {
            1 => s.read_exact(&mut buf[..len]).and_then(|_| s.write_all(&hdr[8..16])),
            2 => s.write_all(&buf[..len]),
            _ => return,
        };
        if ok.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------- measuring side

struct Windows {
    write: Segment,
    read: Segment,
}

fn wait_windows(ep: &mut TcpEndpoint) -> Result<Windows> {
    let (mut write, mut read) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while write.is_none() || read.is_none() {
        match ep.poll_recv()? {
            Some(Message::Read(d)) => write = Some(d.segments[0]),
            Some(Message::Write(d)) => read = Some(d.segments[0]),
            Some(m) => bail!("unexpected {m:?}"),
            None if Instant::now() > deadline => bail!("no windows published"),
            None => std::thread::yield_now(),
        }
    }
    Ok(Windows {
        write: write.unwrap_or(Segment { addr: 0, key: 0, len: 0 }),
        read: read.unwrap_or(Segment { addr: 0, key: 0, len: 0 }),
    })
}

fn seg(w: Segment, off: u64, len: u32) -> Segment {
    Segment { addr: w.addr + off, key: w.key, len }
}

/// QD1 cases poll like the backend's poller thread (which also does the
/// receiving: no hand-off to a transport thread); QD32 cases block in
/// `wait` like a thread with nothing else to do, as the plain TCP client
/// blocks in `read`.
fn wait_one(ep: &mut TcpEndpoint, c: &mut [OpCompletion], block: bool) -> Result<usize> {
    loop {
        let n = ep.poll_completions(c);
        if n > 0 {
            if let Some(bad) = c[..n].iter().find(|c| c.status != Status::Ok) {
                bail!("operation failed: {bad:?}");
            }
            return Ok(n);
        }
        if !ep.is_connected() {
            bail!("connection lost");
        }
        if block {
            ep.wait(Duration::from_millis(100));
        } else {
            // Yield rather than spin: both hosts share this machine's cores.
            std::thread::yield_now();
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Lat {
    p50_us: f64,
    p99_us: f64,
}

fn lat(mut v: Vec<u64>) -> Lat {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)] as f64 / 1000.0;
    Lat { p50_us: at(0.50), p99_us: at(0.99) }
}

fn one_sided_qd1(ep: &mut TcpEndpoint, w: &Windows, local: proto::RegionId, write: bool, ops: usize) -> Result<Lat> {
    let mut c = [OpCompletion::EMPTY; 4];
    let mut samples = Vec::with_capacity(ops);
    for i in 0..(ops + ops / 10) {
        let off = (i as u64 % 4096) * 4096;
        let l = [LocalSeg { region: local, offset: off, len: 4096 }];
        let t = Instant::now();
        if write {
            ep.post_write(&[seg(w.write, off, 4096)], &l, i as u64)?;
        } else {
            ep.post_read(&[seg(w.read, off, 4096)], &l, i as u64)?;
        }
        wait_one(ep, &mut c, false)?;
        if i >= ops / 10 {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(lat(samples))
}

fn one_sided_qd32(ep: &mut TcpEndpoint, w: &Windows, local: proto::RegionId, write: bool, ops: usize) -> Result<f64> {
    const LEN: u32 = 128 << 10;
    let mut c = [OpCompletion::EMPTY; 64];
    let slots = (WINDOW / LEN as usize) as u64;
    let (mut posted, mut done) = (0usize, 0usize);
    let t = Instant::now();
    while done < ops {
        while posted < ops && posted - done < 32 {
            let off = (posted as u64 % slots) * u64::from(LEN);
            let l = [LocalSeg { region: local, offset: off, len: LEN }];
            if write {
                ep.post_write(&[seg(w.write, off, LEN)], &l, posted as u64)?;
            } else {
                ep.post_read(&[seg(w.read, off, LEN)], &l, posted as u64)?;
            }
            posted += 1;
        }
        done += wait_one(ep, &mut c, true)?;
    }
    Ok(ops as f64 * f64::from(LEN) / t.elapsed().as_secs_f64() / 1e9)
}

fn req(op: u32, len: u32, tag: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&op.to_le_bytes());
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..].copy_from_slice(&tag.to_le_bytes());
    h
}

fn plain_qd1(s: &mut TcpStream, write: bool, ops: usize) -> Result<Lat> {
    let data = vec![0xa5u8; 4096];
    let mut back = vec![0u8; 4096];
    let mut samples = Vec::with_capacity(ops);
    for i in 0..(ops + ops / 10) {
        let t = Instant::now();
        if write {
            // One gathered send, as the one-sided WRITE does.
            let h = req(1, 4096, i as u64);
            s.write_all(&[&h[..], &data[..]].concat())?;
            s.read_exact(&mut back[..8])?;
        } else {
            s.write_all(&req(2, 4096, i as u64))?;
            s.read_exact(&mut back)?;
        }
        if i >= ops / 10 {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(lat(samples))
}

fn plain_qd32(s: &mut TcpStream, write: bool, ops: usize) -> Result<f64> {
    const LEN: usize = 128 << 10;
    let mut msg = vec![0xa5u8; 16 + LEN];
    let mut back = vec![0u8; LEN];
    let (mut sent, mut done) = (0usize, 0usize);
    let t = Instant::now();
    while done < ops {
        while sent < ops && sent - done < 32 {
            if write {
                msg[..16].copy_from_slice(&req(1, LEN as u32, sent as u64));
                s.write_all(&msg)?;
            } else {
                s.write_all(&req(2, LEN as u32, sent as u64))?;
            }
            sent += 1;
        }
        if write {
            s.read_exact(&mut back[..8])?;
        } else {
            s.read_exact(&mut back)?;
        }
        done += 1;
    }
    Ok((ops * LEN) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

fn run(qd1_ops: usize, qd32_ops: usize, out: Option<std::path::PathBuf>) -> Result<()> {
    let net = NetnsPair::create()?;
    let exe = std::env::current_exe()?;
    let mut cmd = net.command(&net.b, exe.to_str().context("exe path")?);
    cmd.args(["serve", "--host", &net.addr_b.to_string()]).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut server = Child(cmd.spawn()?);
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().context("stdout")?).read_line(&mut line)?;
    if line.trim() != "READY" {
        bail!("server did not start: {line:?}");
    }
    net.enter(&net.a)?;
    measure(net.addr_b, qd1_ops, qd32_ops, out)?;
    server.kill();
    Ok(())
}

/// Every measurement against the `serve` at `server`, from this thread's
/// network namespace.
fn measure(server: std::net::Ipv4Addr, qd1_ops: usize, qd32_ops: usize, out: Option<std::path::PathBuf>) -> Result<()> {
    let mut ep = TcpEndpoint::connect((server, ONE_SIDED_PORT), &cfg(1)?, Arc::new(Registry::new()))?;
    let windows = wait_windows(&mut ep)?;
    let mut local = vec![0u8; WINDOW];
    // SAFETY: `local` outlives `ep` (dropped explicitly below) and is not
    // accessed through Rust while registered.
    let region = unsafe { ep.register_region(local.as_mut_ptr(), local.len()) }?;
    let mut plain = TcpStream::connect((server, PLAIN_PORT))?;
    plain.set_nodelay(true)?;

    let os_w1 = one_sided_qd1(&mut ep, &windows, region, true, qd1_ops)?;
    let pl_w1 = plain_qd1(&mut plain, true, qd1_ops)?;
    let os_r1 = one_sided_qd1(&mut ep, &windows, region, false, qd1_ops)?;
    let pl_r1 = plain_qd1(&mut plain, false, qd1_ops)?;
    let os_w32 = one_sided_qd32(&mut ep, &windows, region, true, qd32_ops)?;
    let pl_w32 = plain_qd32(&mut plain, true, qd32_ops)?;
    let os_r32 = one_sided_qd32(&mut ep, &windows, region, false, qd32_ops)?;
    let pl_r32 = plain_qd32(&mut plain, false, qd32_ops)?;
    drop(ep);
    drop(local);

    let mut t = String::new();
    t.push_str("| case | one-sided (tcp transport) | plain TCP | ratio | target |\n|---|---|---|---|---|\n");
    let l = |name: &str, a: Lat, b: Lat| {
        let r = a.p50_us / b.p50_us;
        format!(
            "| {name} QD1 p50 / p99 | {:.1} / {:.1} µs | {:.1} / {:.1} µs | {:.2}× (p50) | ≤ 1.2× {} |\n",
            a.p50_us,
            a.p99_us,
            b.p50_us,
            b.p99_us,
            r,
            if r <= 1.2 { "✅" } else { "❌" }
        )
    };
    let g = |name: &str, a: f64, b: f64| {
        let r = a / b;
        format!(
            "| {name} QD32 | {a:.2} GB/s | {b:.2} GB/s | {r:.2}× | ≥ 0.9× {} |\n",
            if r >= 0.9 { "✅" } else { "❌" }
        )
    };
    t.push_str(&l("4 KiB WRITE", os_w1, pl_w1));
    t.push_str(&l("4 KiB READ", os_r1, pl_r1));
    t.push_str(&g("128 KiB WRITE", os_w32, pl_w32));
    t.push_str(&g("128 KiB READ", os_r32, pl_r32));
    print!("{t}");
    if let Some(p) = out {
        std::fs::write(&p, &t).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}
