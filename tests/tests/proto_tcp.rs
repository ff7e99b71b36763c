//! The `tcp` transport between two hosts (network namespaces joined by a
//! veth pair): this test process is host A (198.18.0.1), `hcblk-wire-peer`
//! runs on host B (198.18.0.2) as the replica serving descriptors by
//! one-sided operations on our granted buffers.

use anyhow::{bail, Context, Result};
use hcblk_tests::netns::{Child, NetnsPair};
use hcblk_tests::wire_peer::pattern;
use proto::auth::Secret;
use proto::tcp::TcpEndpoint;
use proto::wire::{Completion, Descriptor, FLAG_INLINE, MAX_INLINE};
use proto::{Access, Config, Endpoint, Key, LocalSeg, Message, Registry, Status, TransportError};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECRET: &[u8] = b"proto-tcp-test-cluster-secret";
const PORT: u16 = 7411;
const SEED: u8 = 0x5a;

struct Hosts {
    net: NetnsPair,
    dir: std::path::PathBuf,
}

impl Hosts {
    fn new() -> Result<Self> {
        let net = NetnsPair::create()?;
        let dir = std::env::temp_dir().join(format!("{}-dir", net.a));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("secret"), SECRET)?;
        std::fs::write(dir.join("wrong"), b"some-other-cluster-secret")?;
        // This thread becomes host A.
        net.enter(&net.a.clone())?;
        Ok(Self { net, dir })
    }

    fn start_peer(&self) -> Result<Child> {
        let mut cmd = self.net.command(&self.net.b, env!("CARGO_BIN_EXE_hcblk-wire-peer"));
        cmd.args(["--listen", &format!("{}:{PORT}", self.net.addr_b), "--secret-file"])
            .arg(self.dir.join("secret"))
            .args(["--node", "2", "--disk-mib", "64", "--seed", &SEED.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = Child(cmd.spawn().context("spawn hcblk-wire-peer")?);
        let out = child.0.stdout.take().context("peer stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if !line.starts_with("READY") {
            bail!("peer did not start: {line:?}");
        }
        Ok(child)
    }

    fn connect(&self, secret: &[u8], registry: Arc<Registry>) -> Result<TcpEndpoint, TransportError> {
        let cfg = Config::new(1, 1, Secret::new(secret.to_vec()).unwrap());
        TcpEndpoint::connect((self.net.addr_b, PORT), &cfg, registry)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Guest memory: one registered buffer, split per request.
struct Guest {
    mem: Vec<u8>,
    region: proto::RegionId,
}

fn guest(ep: &mut TcpEndpoint, len: usize) -> Guest {
    let mut mem: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[2]).collect();
    // SAFETY: `mem` lives in the returned `Guest`, which every test drops after
    // the endpoints using it; it is only read through Rust after they are gone.
    let region = unsafe { ep.register_region(mem.as_mut_ptr(), mem.len()) }.unwrap();
    Guest { mem, region }
}

fn wait_completions(ep: &mut TcpEndpoint, n: usize, limit: Duration) -> Result<HashMap<u64, Completion>> {
    let mut got = HashMap::new();
    let deadline = Instant::now() + limit;
    while got.len() < n {
        match ep.poll_recv() {
            Ok(Some(Message::Completion(c))) => {
                got.insert(c.request_id, c);
            }
            Ok(Some(m)) => bail!("unexpected {m:?}"),
            Ok(None) => std::thread::yield_now(),
            Err(e) => return Err(e).context(format!("after {} of {n} completions", got.len())),
        }
        if Instant::now() > deadline {
            bail!("timed out with {} of {n} completions", got.len());
        }
    }
    Ok(got)
}

/// Four non-contiguous guest segments for request `i` (sizes vary per request).
fn segments_for(i: u64) -> Vec<(u64, u32)> {
    let base = i * 65536;
    vec![
        (base, 4096),
        (base + 8192 + 512 * (i % 5), 512 * (1 + (i % 7) as u32)),
        (base + 20000, 1000 + i as u32),
        (base + 32768, 16384),
    ]
}

fn desc(request_id: u64, offset: u64, g: &proto::Grant) -> Descriptor {
    let length = g.segments.iter().map(|s| s.len).sum();
    Descriptor {
        request_id,
        volume: 1,
        generation: 1,
        epoch: 1,
        offset,
        length,
        segments: g.segments.clone(),
        ..Descriptor::default()
    }
}

/// An inline WRITE descriptor: `length` bytes that travel with it.
fn inline_desc(request_id: u64, offset: u64, length: u32) -> Descriptor {
    Descriptor {
        request_id,
        volume: 1,
        generation: 1,
        epoch: 1,
        offset,
        length,
        flags: FLAG_INLINE,
        ..Descriptor::default()
    }
}

fn send(ep: &mut TcpEndpoint, m: Message) {
    ep.send(&m).unwrap();
}

#[test]
fn proto_tcp_one_sided_read_write_between_two_hosts() -> Result<()> {
    let hosts = Hosts::new()?;
    let _peer = hosts.start_peer()?;
    let registry = Arc::new(Registry::new());
    let mut ep = hosts.connect(SECRET, registry)?;
    assert_eq!(ep.peer_node_id(), 2);
    let mut g = guest(&mut ep, 64 * 65536);

    // 1. READ before any write: the peer's initial pattern, pushed by one-sided WRITEs.
    let rg = ep.grant(g.region, &segments_for(0), Access::RemoteWrite)?;
    let d0 = desc(1, 1 << 20, &rg);
    send(&mut ep, Message::Read(d0.clone()));
    let c = wait_completions(&mut ep, 1, Duration::from_secs(10))?;
    assert_eq!(c[&1].status, Status::Ok);
    ep.revoke(rg.key)?;
    // Compared at the end, once the endpoint is gone.
    let mut expect_initial = Vec::new();
    let mut off = d0.offset;
    for &(o, l) in &segments_for(0) {
        expect_initial.push((o, (off..off + u64::from(l)).map(|x| pattern(SEED, x)).collect::<Vec<u8>>()));
        off += u64::from(l);
    }

    // 2. 48 multi-segment WRITEs in flight at once; the peer pulls each with one-sided READs.
    let mut keys: HashMap<u64, Key> = HashMap::new();
    // (request id, disk offset, guest ranges)
    type Written = (u64, u64, Vec<(u64, u32)>);
    let mut written: Vec<Written> = Vec::new();
    for i in 1..49u64 {
        let segs = segments_for(i);
        let gr = ep.grant(g.region, &segs, Access::RemoteRead)?;
        let offset = i * 100_000 + 512;
        send(&mut ep, Message::Write(desc(100 + i, offset, &gr)));
        keys.insert(100 + i, gr.key);
        written.push((100 + i, offset, segs));
    }
    let c = wait_completions(&mut ep, written.len(), Duration::from_secs(20))?;
    for (id, _, segs) in &written {
        let want: u32 = segs.iter().map(|s| s.1).sum();
        assert_eq!((c[id].status, c[id].bytes), (Status::Ok, want), "request {id}");
        // The request is complete: its key dies with it.
        ep.revoke(keys[id])?;
    }

    // 3. Read every write back into a different part of guest memory.
    let read_base = 49 * 65536u64;
    let mut reads = Vec::new();
    for (n, (id, offset, segs)) in written.iter().enumerate() {
        let total: u32 = segs.iter().map(|s| s.1).sum();
        // Two destination segments per read, split unevenly.
        let dst = read_base + (n as u64 % 4) * 200_000 / 4;
        let split = total / 3;
        let r = ep.grant(g.region, &[(dst, split), (dst + 100_000, total - split)], Access::RemoteWrite)?;
        send(&mut ep, Message::Read(desc(1000 + id, *offset, &r)));
        let c = wait_completions(&mut ep, 1, Duration::from_secs(10))?;
        assert_eq!(c[&(1000 + id)].status, Status::Ok);
        ep.revoke(r.key)?;
        reads.push((n, dst, split, total));
        // Verify now (the peer is done with these bytes): what came back equals
        // what the peer pulled from the guest segments.
        let src: Vec<u8> =
            segs.iter().flat_map(|&(o, l)| g.mem[o as usize..(o + u64::from(l)) as usize].to_vec()).collect();
        let got: Vec<u8> = [
            &g.mem[dst as usize..(dst + u64::from(split)) as usize],
            &g.mem[(dst + 100_000) as usize..(dst + 100_000 + u64::from(total - split)) as usize],
        ]
        .concat();
        assert_eq!(got, src, "request {id} read back differs");
    }

    // 4. A revoked key is refused; the connection carries on.
    let (_, offset, segs) = &written[0];
    let revoked = ep.grant(g.region, segs, Access::RemoteRead)?;
    ep.revoke(revoked.key)?;
    send(&mut ep, Message::Write(desc(5000, *offset, &revoked)));
    assert_eq!(wait_completions(&mut ep, 1, Duration::from_secs(10))?[&5000].status, Status::AccessDenied);

    // 5. Another request's key: request B's addresses under request A's key.
    let a = ep.grant(g.region, &[(0, 4096)], Access::RemoteRead)?;
    let b = ep.grant(g.region, &[(65536, 4096)], Access::RemoteRead)?;
    let mut forged = desc(5001, 0, &b);
    forged.segments[0].key = a.key.0;
    send(&mut ep, Message::Write(forged));
    // Out-of-window address under a valid key.
    let mut outside = desc(5002, 0, &a);
    outside.segments[0].addr += 4096;
    send(&mut ep, Message::Write(outside));
    let c = wait_completions(&mut ep, 2, Duration::from_secs(10))?;
    assert_eq!(c[&5001].status, Status::AccessDenied);
    assert_eq!(c[&5002].status, Status::AccessDenied);
    // And a legitimate request on the same connection still works.
    send(&mut ep, Message::Write(desc(5003, 0, &b)));
    assert_eq!(wait_completions(&mut ep, 1, Duration::from_secs(10))?[&5003].status, Status::Ok);
    ep.revoke(a.key)?;
    ep.revoke(b.key)?;
    assert!(ep.is_connected());
    drop(ep);

    for (o, bytes) in expect_initial {
        assert_eq!(&g.mem[o as usize..o as usize + bytes.len()], &bytes[..], "initial READ at guest offset {o}");
    }
    g.mem.clear();
    Ok(())
}

#[test]
fn proto_tcp_inline_writes_between_two_hosts() -> Result<()> {
    let hosts = Hosts::new()?;
    let _peer = hosts.start_peer()?;
    let mut ep = hosts.connect(SECRET, Arc::new(Registry::new()))?;
    let mut g = guest(&mut ep, 16 << 20);
    let region = g.region;
    let piece = |offset: u64, len: u32| LocalSeg { region, offset, len };
    // 64 inline WRITEs in flight, 1 byte to MAX_INLINE, some gathered from
    // two guest pieces, with segmented WRITEs between them; each payload
    // travels with its descriptor (no one-sided READ).
    let sizes = [1u32, 511, 4096, 4097, 30000, MAX_INLINE - 1, MAX_INLINE];
    // (request id, disk offset, guest pieces)
    let mut written: Vec<(u64, u64, Vec<LocalSeg>)> = Vec::new();
    let mut keys = Vec::new();
    for i in 0..64u64 {
        let len = sizes[i as usize % sizes.len()];
        let src = i * 131_072;
        let pieces = if len > 2 && i % 2 == 1 {
            vec![piece(src + 3, len / 2), piece(src + 70_000, len - len / 2)]
        } else {
            vec![piece(src + 5, len)]
        };
        let offset = (i << 17) + 512 * (i % 3);
        ep.send_inline(&Message::Write(inline_desc(i, offset, len)), &pieces)?;
        written.push((i, offset, pieces));
        if i % 8 == 0 {
            let gr = ep.grant(g.region, &[(src + 100_000, 8192)], Access::RemoteRead)?;
            send(&mut ep, Message::Write(desc(1000 + i, (40 << 20) + i * 8192, &gr)));
            keys.push((1000 + i, gr.key));
        }
    }
    let c = wait_completions(&mut ep, written.len() + keys.len(), Duration::from_secs(20))?;
    for (id, _, pieces) in &written {
        let len: u32 = pieces.iter().map(|p| p.len).sum();
        assert_eq!((c[id].status, c[id].bytes), (Status::Ok, len), "inline {id}");
    }
    for (id, key) in keys {
        assert_eq!(c[&id].status, Status::Ok, "segmented {id}");
        ep.revoke(key)?;
    }
    // Read every inline write back through one-sided WRITEs into another
    // part of guest memory and compare with what was sent.
    let back = 12u64 << 20;
    for (id, offset, pieces) in &written {
        let len: u32 = pieces.iter().map(|p| p.len).sum();
        let r = ep.grant(g.region, &[(back, len)], Access::RemoteWrite)?;
        send(&mut ep, Message::Read(desc(5000 + id, *offset, &r)));
        let c = wait_completions(&mut ep, 1, Duration::from_secs(10))?;
        assert_eq!(c[&(5000 + id)].status, Status::Ok);
        ep.revoke(r.key)?;
        let sent: Vec<u8> = pieces
            .iter()
            .flat_map(|p| g.mem[p.offset as usize..(p.offset + u64::from(p.len)) as usize].to_vec())
            .collect();
        assert_eq!(
            &g.mem[back as usize..back as usize + len as usize],
            &sent[..],
            "inline write {id} read back differs"
        );
    }
    assert!(ep.is_connected());
    drop(ep);
    g.mem.clear();
    Ok(())
}

#[test]
fn proto_tcp_authentication_failure_is_refused() -> Result<()> {
    let hosts = Hosts::new()?;
    let _peer = hosts.start_peer()?;
    let wrong = std::fs::read(hosts.dir.join("wrong"))?;
    match hosts.connect(&wrong, Arc::new(Registry::new())) {
        Err(TransportError::AuthFailed(_)) => {}
        other => bail!("a wrong secret must be refused, got {other:?}"),
    }
    // The peer carries on serving members of the cluster.
    let mut ep = hosts.connect(SECRET, Arc::new(Registry::new()))?;
    send(
        &mut ep,
        Message::Flush(proto::wire::Flush {
            request_id: 9,
            volume: 1,
            generation: 1,
            epoch: 1,
            incarnation: 0,
            floor: 9,
        }),
    );
    assert_eq!(wait_completions(&mut ep, 1, Duration::from_secs(10))?[&9].status, Status::Ok);
    Ok(())
}

#[test]
fn proto_tcp_peer_killed_mid_transfer_then_reconnect() -> Result<()> {
    let hosts = Hosts::new()?;
    let mut peer = hosts.start_peer()?;
    let registry = Arc::new(Registry::new());
    let mut ep = hosts.connect(SECRET, registry.clone())?;
    let mut g = guest(&mut ep, 32 << 20);
    // 32 × 1 MiB writes in flight, then the peer dies.
    for i in 0..32u64 {
        let gr = ep.grant(g.region, &[(i << 20, 1 << 20)], Access::RemoteRead)?;
        send(&mut ep, Message::Write(desc(i, i << 20, &gr)));
    }
    peer.kill();
    let err = wait_completions(&mut ep, 32, Duration::from_secs(15))
        .expect_err("requests in flight when the peer died must fail");
    assert!(format!("{err:#}").contains("connection closed"), "{err:#}");
    assert!(!ep.is_connected());
    drop(ep);

    // The peer returns; the survivor reconnects (same registry, same guest memory).
    let _peer = hosts.start_peer()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ep = loop {
        match hosts.connect(SECRET, registry.clone()) {
            Ok(ep) => break ep,
            Err(e) if Instant::now() < deadline => {
                eprintln!("reconnect: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let wgr = ep.grant(g.region, &[(0, 65536)], Access::RemoteRead)?;
    send(&mut ep, Message::Write(desc(100, 4096, &wgr)));
    assert_eq!(wait_completions(&mut ep, 1, Duration::from_secs(10))?[&100].status, Status::Ok);
    let rgr = ep.grant(g.region, &[(1 << 20, 65536)], Access::RemoteWrite)?;
    send(&mut ep, Message::Read(desc(101, 4096, &rgr)));
    assert_eq!(wait_completions(&mut ep, 1, Duration::from_secs(10))?[&101].status, Status::Ok);
    drop(ep);
    assert_eq!(g.mem[..65536], g.mem[1 << 20..(1 << 20) + 65536]);
    g.mem.clear();
    Ok(())
}
