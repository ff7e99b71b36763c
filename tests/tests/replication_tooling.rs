//! The replication tests' own tools, checked against what runs today: the cluster fixture
//! with etcd and *standalone* hcblk daemons in namespaces, the verifying client against a
//! standalone volume (including the damage it must catch and the stalls it must measure),
//! and the hostile peer against `hcblk-wire-peer` (the wire protocol's test replica).
//!
//! Needs root, iproute2, nftables, etcd (Debian `etcd-server`, `etcd-client`), hugepages
//! (reserved by the fixture); the `hcblk` binary is brought up to date by the fixture
//! (`cargo build -p hcblk`) unless `HCBLK_BIN` names one. About a minute in all.
//!
//! Run: `cargo test -p hcblk-tests --test replication_tooling -- --nocapture`

use anyhow::{bail, ensure, Context, Result};
use hcblk_tests::cluster::ClusterNet;
use hcblk_tests::cluster_fixture::{rss_kib, Cluster, ClusterOptions, DaemonMode};
use hcblk_tests::guest::flip_bytes_in_file;
use hcblk_tests::hostile::{self, DriveOutcome, HandshakeOutcome, Identity, Memory, ReadPolicy};
use hcblk_tests::netns::Child;
use hcblk_tests::scenario;
use hcblk_tests::verify::{
    fill_block, verify, verify_file, BlkClient, Ledger, Observed, Workload, WorkloadConfig, BLOCK,
};
use hcblk_tests::wire_peer::pattern;
use proto::auth::Secret;
use proto::tcp::{ERR_AUTH, ERR_CLUSTER, ERR_PROTOCOL, ERR_VERSION, MAX_PENDING_HANDSHAKES};
use proto::wire::{Descriptor, Message, Status, FLAG_INLINE};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

#[test]
fn fixture_runs_etcd_and_standalone_daemons_in_namespaces() -> Result<()> {
    let mut c = Cluster::start_with(ClusterOptions::default().nodes(3).mode(DaemonMode::Standalone))?;
    c.run(|c| {
        let (total, _) = hcblk_tests::hugepages::pool()?;
        ensure!(total >= 3 * 32, "the fixture reserved hugepages for three daemons, the pool has {total}");
        // etcd answers from a node's namespace, not from the test's own.
        let health = |c: &Cluster| -> Result<bool> {
            let mut cmd = c.command("n1", "etcdctl");
            cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", c.etcd_endpoint())).args([
                "--dial-timeout=1s",
                "--command-timeout=2s",
                "endpoint",
                "health",
            ]);
            Ok(hcblk_tests::cluster_fixture::output_within(cmd, Duration::from_secs(10), "etcdctl endpoint health")?
                .status
                .success())
        };
        ensure!(health(c)?, "etcd not reachable from n1");
        // The CLI runs in the node's namespace against its own daemon.
        let out = c.create_volume("n2", "v1", "16M", &[])?;
        let socket = hcblk_tests::cluster_fixture::socket_line(&out).context("create printed no socket")?;
        ensure!(socket.starts_with(c.socket_dir("n2")?), "socket {} outside n2's socket dir", socket.display());
        ensure!(c.cli_ok("n2", &["volume", "list"])?.contains("v1"));
        ensure!(!c.cli_ok("n1", &["volume", "list"])?.contains("v1"), "n1 has its own daemon and data");
        // kill -9 and restart: the volume comes back from n2's data dir.
        let pid = c.pid("n2")?.context("n2 runs")?;
        c.kill9("n2")?;
        ensure!(!c.is_running("n2")?);
        ensure!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped");
        c.restart("n2")?;
        ensure!(c.cli_ok("n2", &["volume", "list"])?.contains("v1"), "v1 restored after the restart");
        ensure!(c.log("n2")?.matches("==== hcblk-tests: start").count() == 2, "both starts of n2 are in its log");
        ensure!(c.log_since_start("n2")?.starts_with("==== hcblk-tests: start 2 "));
        ensure!(c.rss_kib("n2")? > 0);
        // A clean stop.
        c.stop("n3")?;
        ensure!(!c.is_running("n3")?);
        // A frozen daemon answers nothing until thawed.
        c.freeze("n1")?;
        let frozen = c.cli_within("n1", &["volume", "list"], Duration::from_secs(2));
        ensure!(frozen.is_err(), "a frozen daemon answered: {frozen:?}");
        c.thaw("n1")?;
        c.cli_ok("n1", &["volume", "list"])?;
        // Pulling n1's cable cuts it from etcd; plugging it back restores it.
        c.isolate("n1")?;
        ensure!(!health(c)?, "n1 reached etcd with its cable pulled");
        c.heal()?;
        c.wait_until(Duration::from_secs(10), "n1 to reach etcd again", || health(c).unwrap_or(false))?;
        ensure!(c.listen_addr("n3")?.to_string() == "198.18.1.13:7400");
        Ok(())
    })
}

#[test]
fn verifying_client_against_a_standalone_volume() -> Result<()> {
    let mut c = Cluster::start_with(ClusterOptions::default().nodes(1).mode(DaemonMode::Standalone))?;
    c.run(|c| {
        let out = c.create_volume("n1", "vv", "64M", &[])?;
        let socket = hcblk_tests::cluster_fixture::socket_line(&out).context("no socket")?;
        let image = c.data_dir("n1")?.join("volumes/vv.img");
        let blocks = 16 * MIB / BLOCK as u64;

        // Client A: 4 KiB writes over the first 16 MiB, with a 2 s freeze of the daemon.
        let client = BlkClient::connect(&socket, 4, 16 * BLOCK)?;
        ensure!(client.capacity() == 64 * MIB);
        let w = Workload::start(client, WorkloadConfig::new(0xa, 0, blocks))?;
        w.wait_for_progress(200, Duration::from_secs(30))?;
        c.freeze("n1")?;
        std::thread::sleep(Duration::from_secs(2));
        c.thaw("n1")?;
        w.wait_for_progress(200, Duration::from_secs(30))?;
        let (client, a) = w.stop()?;
        eprintln!("client A: {}", a.summary());
        a.ensure_clean()?;
        ensure!(a.longest_gap >= Duration::from_millis(1800), "the 2 s freeze was not measured: {}", a.summary());
        ensure!(
            a.gaps.iter().any(|(_, g)| *g >= Duration::from_millis(1800)),
            "the freeze is not listed: {}",
            a.summary()
        );

        // Client B (another seed): 64 KiB writes over an overlapping range, on the same
        // connection after A (one frontend at a time).
        let mut cfg = WorkloadConfig::new(0xb, blocks / 2, blocks);
        cfg.blocks_per_write = 16;
        cfg.writes_max = Some(300);
        let w = Workload::start(client, cfg)?;
        while !w.is_finished() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let (mut client, b) = w.stop()?;
        eprintln!("client B: {}", b.summary());
        b.ensure_clean()?;
        ensure!(b.writes_ok == 300);
        client.flush_sync(Duration::from_secs(10))?;

        let all = blocks + blocks / 2;
        let r = verify(&mut client, &[&a.ledger, &b.ledger], 0, all, &Observed::Zero)?;
        eprintln!("verify: {} blocks, {} written, {} zero, {:.1?}", r.blocks_checked, r.written, r.zero, r.elapsed);
        r.ensure_ok()?;
        ensure!(r.written >= a.ledger.written_blocks().max(b.ledger.written_blocks()));
        // The backing file says the same as the export.
        verify_file(&image, &[&a.ledger, &b.ledger], 0, all, &Observed::Zero)?.ensure_ok()?;

        // The verifier must catch damage: three blocks A wrote and B did not touch.
        let written: Vec<u64> =
            (0..blocks / 2).filter(|&blk| a.ledger.state(blk).is_some_and(|(d, _)| d != 0)).take(3).collect();
        ensure!(written.len() == 3, "A wrote too few blocks below B's range");
        let (flip, lost, foreign) = (written[0], written[1], written[2]);
        flip_bytes_in_file(&image, flip * BLOCK as u64 + 1000, 1)?;
        let f = std::fs::OpenOptions::new().write(true).open(&image)?;
        f.write_all_at(&vec![0u8; BLOCK], lost * BLOCK as u64)?;
        let mut other = vec![0u8; BLOCK];
        let done = a.ledger.state(foreign).map(|(d, _)| d).unwrap_or(0);
        fill_block(&mut other, 0xa, foreign, done + 1_000_000);
        f.write_all_at(&other, foreign * BLOCK as u64)?;
        f.sync_all()?;
        drop(f);
        let r = verify(&mut client, &[&a.ledger, &b.ledger], 0, all, &Observed::Zero)?;
        let bad: Vec<u64> = r.mismatches.iter().map(|m| m.block).collect();
        ensure!(
            r.mismatch_count == 3 && bad == vec![flip, lost, foreign],
            "expected exactly the three damaged blocks, got {:?}",
            r.mismatches
        );
        let text = r.ensure_ok().unwrap_err().to_string();
        ensure!(
            text.contains("checksum")
                && text.contains("holds zeros")
                && text.contains(&format!("write {}", done + 1_000_000)),
            "{text}"
        );
        Ok(())
    })
}

/// The scenario steps that need no cluster-mode daemon, against documents injected into the
/// fixture's etcd and replica files laid out as the daemons will lay them out.
#[test]
fn scenario_checks_against_injected_volume_documents() -> Result<()> {
    use replication::{ExtentMeta, Member, MemberState, VolumeMeta};
    let mut c = Cluster::start_with(ClusterOptions::default().nodes(3).mode(DaemonMode::Standalone))?;
    c.run(|c| {
        let member = |n: &str, st| Member::new(n, st);
        let mut meta = VolumeMeta {
            format: replication::meta::META_FORMAT,
            name: "vol".into(),
            id: 0x0123_4567_89ab_cdef,
            size_bytes: 8 * MIB,
            block_size: 512,
            extent_bytes: 4 * MIB,
            region_bytes: MIB,
            replicas: 3,
            min_replicas: 2,
            queues: 1,
            serial: "vol".into(),
            read_only: false,
            locality: replication::Locality::Prefer,
            created_unix_s: 0,
            generation: 3,
            owner: Some("n1".into()),
            epoch: 5,
            extents: vec![
                ExtentMeta {
                    members: vec![
                        member("n1", MemberState::InSync),
                        member("n2", MemberState::InSync),
                        member("n3", MemberState::Stale),
                    ],
                },
                ExtentMeta {
                    members: vec![
                        member("n1", MemberState::InSync),
                        member("n2", MemberState::InSync),
                        member("n3", MemberState::InSync),
                    ],
                },
            ],
            risk_accepted: None,
        };
        let key = format!("{}volumes/vol", hcblk_tests::cluster_fixture::ETCD_PREFIX);
        ensure!(c.volume_meta("vol")?.is_none(), "no document yet");
        c.etcd_put(&key, &String::from_utf8(meta.to_json())?)?;
        c.etcd_put(
            &format!("{}cluster", hcblk_tests::cluster_fixture::ETCD_PREFIX),
            r#"{"cluster_id":4242,"created_unix_s":1}"#,
        )?;
        ensure!(c.cluster_id()? == 4242);
        ensure!(c.volume_meta("vol")?.as_ref() == Some(&meta));
        let l = scenario::layout(c, "vol")?;
        ensure!(l.in_sync(0) == vec!["n1", "n2"] && !l.whole_with(3, &[]));
        ensure!(scenario::member_except(&l, 0, &["n1"])? == "n2");

        // Replica files where the daemons keep them: the same acknowledged blocks on every
        // in-sync member; n3's copy of extent 0 is stale (zeros) and not compared.
        let mut ledger = Ledger::new(0x77, 0, 8 * MIB / BLOCK as u64);
        let mut img = vec![0u8; (8 * MIB) as usize];
        for b in (0..2048u64).step_by(3) {
            fill_block(&mut img[b as usize * BLOCK..(b as usize + 1) * BLOCK], 0x77, b, b + 1);
            ledger.completed(b, b + 1);
        }
        let mut stale = img.clone();
        stale[..(4 * MIB) as usize].fill(0);
        for (n, data) in [("n1", &img), ("n2", &img), ("n3", &stale)] {
            let p = c.replica_path(n, meta.id)?;
            ensure!(p.ends_with("replicas/0123456789abcdef.img"), "{}", p.display());
            std::fs::create_dir_all(p.parent().context("parent")?)?;
            std::fs::write(&p, data)?;
        }
        let r = scenario::check_replicas(c, "vol", &[&ledger], 2)?;
        ensure!(r.extents.len() == 2 && r.bytes_compared == 4 * MIB * 2 + 4 * MIB * 3, "{r:?}");
        // n3 in sync in extent 0 with its stale copy: both checks catch it.
        meta.extents[0].members[2].state = MemberState::InSync;
        meta.epoch += 1;
        c.etcd_put(&key, &String::from_utf8(meta.to_json())?)?;
        let e = format!("{:#}", scenario::check_replicas(c, "vol", &[&ledger], 2).unwrap_err());
        ensure!(e.contains("differ at volume offset 0"), "{e}");
        // A waiter sees a change made while it waits.
        let put = {
            let mut m = meta.clone();
            m.extents[0].members[2].state = MemberState::Stale;
            String::from_utf8(m.to_json())?
        };
        std::thread::scope(|s| -> Result<()> {
            let waiter = s.spawn(|| {
                scenario::wait_layout(c, "vol", Duration::from_secs(20), "n3 stale again", None, |l| {
                    l.state_of(0, "n3") == Some(MemberState::Stale)
                })
            });
            std::thread::sleep(Duration::from_secs(1));
            c.etcd_put(&key, &put)?;
            waiter.join().map_err(|_| anyhow::anyhow!("waiter panicked"))??;
            Ok(())
        })?;
        let e = format!(
            "{:#}",
            scenario::wait_layout(c, "vol", Duration::from_secs(1), "the impossible", None, |_| false).unwrap_err()
        );
        ensure!(e.contains("the impossible") && e.contains("extent 0: n1=InSync"), "{e}");
        // A node that wrote nothing, and one that did.
        ensure!(scenario::replica_files_blank(c, "n1").is_err());
        std::fs::write(c.replica_path("n3", meta.id)?, vec![0u8; 4096])?;
        ensure!(scenario::replica_files_blank(c, "n3")?.len() == 1);
        Ok(())
    })
}

/// `hcblk-wire-peer` on host `b` of a two-host network; the attacks run from host `a`.
struct WirePeer {
    // Declared before the network: the peer dies before its namespace goes.
    child: Child,
    net: ClusterNet,
    dir: std::path::PathBuf,
    addr: std::net::SocketAddr,
}

const WIRE_SEED: u8 = 0x3c;
const WIRE_PORT: u16 = 7412;

impl WirePeer {
    fn start() -> Result<Self> {
        let net = ClusterNet::create(&["a", "b"])?;
        let dir = std::env::temp_dir().join(format!("hcblk-tooling-wire-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("secret"), b"tooling-test-cluster-secret")?;
        let addr = std::net::SocketAddr::new(net.host("b").addr.into(), WIRE_PORT);
        let mut cmd = net.command("b", env!("CARGO_BIN_EXE_hcblk-wire-peer"));
        cmd.args(["--listen", &addr.to_string(), "--secret-file"])
            .arg(dir.join("secret"))
            .args(["--cluster", "1", "--node", "2", "--disk-mib", "64", "--seed", &WIRE_SEED.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = Child(cmd.spawn().context("spawn hcblk-wire-peer")?);
        let out = child.0.stdout.take().context("peer stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        ensure!(line.starts_with("READY"), "wire peer did not start: {line:?}");
        Ok(Self { child, net, dir, addr })
    }

    fn id(&self) -> Identity {
        Identity {
            cluster_id: 1,
            node_id: 1,
            secret: Some(Secret::new(b"tooling-test-cluster-secret".to_vec()).unwrap()),
        }
    }

    fn rss(&self) -> Result<u64> {
        rss_kib(self.child.0.id())
    }
}

impl Drop for WirePeer {
    fn drop(&mut self) {
        self.child.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_desc(request_id: u64, offset: u64, mem: &Memory, pieces: u32, len: u32) -> Descriptor {
    let mut d = hostile::descriptor(request_id, 1, 1, 1, 0, offset, len);
    d.segments = mem.segments(0, len, pieces, 0x77);
    d
}

/// Reads `len` bytes of the wire peer's disk at `offset` through an honest READ.
fn read_back(addr: std::net::SocketAddr, id: &Identity, offset: u64, len: u32) -> Result<Vec<u8>> {
    let mut conn = hostile::authenticated(addr, id)?;
    let mut mem = Memory::new(0x5000_0000, vec![0u8; len as usize]);
    let mut d = hostile::descriptor(9_000_000, 1, 1, 1, 0, offset, len);
    d.segments = mem.segments(0, len, 2, 0x99);
    let r = hostile::drive(&mut conn, &Message::Read(d), &[], &mut mem, ReadPolicy::Honest, Duration::from_secs(10))?;
    ensure!(r.outcome == DriveOutcome::Completed { status: Status::Ok, bytes: len }, "honest READ: {r:?}");
    conn.shutdown();
    Ok(mem.bytes)
}

fn initial(offset: u64, len: u32) -> Vec<u8> {
    (offset..offset + u64::from(len)).map(|o| pattern(WIRE_SEED, o)).collect()
}

#[test]
fn hostile_peer_against_the_wire_peer() -> Result<()> {
    let peer = WirePeer::start()?;
    let (addr, id) = (peer.addr, peer.id());
    let rss_before = peer.rss()?;
    peer.net.run_in("a", || -> Result<()> {
        let limit = Duration::from_secs(10);

        // Control: an honest write and read back, so every refusal below means something.
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut mem = Memory::new(0x1000_0000, data.clone());
        let mut conn = hostile::authenticated(addr, &id)?;
        let r = hostile::drive(
            &mut conn,
            &Message::Write(write_desc(1, MIB, &mem, 2, 8192)),
            &[],
            &mut mem,
            ReadPolicy::Honest,
            limit,
        )?;
        ensure!(
            r.outcome == DriveOutcome::Completed { status: Status::Ok, bytes: 8192 } && r.data_reads == 2,
            "honest WRITE: {r:?}"
        );
        conn.shutdown();
        ensure!(read_back(addr, &id, MIB, 8192)? == data, "honest write not read back");

        // Before authentication.
        let closing = hostile::garbage(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", limit)?;
        ensure!(closing.error.as_ref().is_some_and(|e| e.0 == ERR_PROTOCOL), "garbage: {closing:?}");
        let closing = hostile::wrong_version(addr, &id, 1, limit)?;
        ensure!(closing.error.as_ref().is_some_and(|e| e.0 == ERR_VERSION), "version 1: {closing:?}");
        let foreign_cluster = Identity { cluster_id: 99, ..id.clone() };
        let (h, _) = hostile::handshake_as(addr, &foreign_cluster, limit)?;
        ensure!(matches!(h, HandshakeOutcome::Refused { code, .. } if code == ERR_CLUSTER), "foreign cluster: {h:?}");
        let foreign_secret =
            Identity { secret: Some(Secret::new(b"another-cluster-s-secret".to_vec())?), ..id.clone() };
        let (h, _) = hostile::handshake_as(addr, &foreign_secret, limit)?;
        ensure!(matches!(h, HandshakeOutcome::Refused { code, .. } if code == ERR_AUTH), "foreign secret: {h:?}");
        let forged = Identity { secret: None, ..id.clone() };
        let (h, _) = hostile::handshake_as(addr, &forged, limit)?;
        ensure!(matches!(h, HandshakeOutcome::Refused { code, .. } if code == ERR_AUTH), "forged proof: {h:?}");
        // A trickled HELLO is cut off by the 5 s handshake deadline.
        let (bytes, after) = hostile::trickle_hello(addr, &id, Duration::from_millis(300), Duration::from_secs(15))?;
        ensure!(bytes < 68 && after < Duration::from_secs(8), "trickle: {bytes} bytes over {after:?}");
        // More idle sockets than pending handshakes: a member still gets in, and the idle
        // ones are closed (evicted, or at their deadline).
        let mut idle = hostile::idle_connections(addr, MAX_PENDING_HANDSHAKES + 6, b"HB")?;
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let conn = hostile::authenticated(addr, &id).context("a member behind idle sockets")?;
        ensure!(t.elapsed() < Duration::from_secs(3), "member handshake took {:?}", t.elapsed());
        conn.shutdown();
        for c in &mut idle {
            c.wait_closed(Duration::from_secs(8)).context("an idle handshake outlived its deadline")?;
        }

        // After authentication: forged keys are refused one by one, the connection lives.
        let mut conn = hostile::authenticated(addr, &id)?;
        let f = hostile::forged_one_sided(&mut conn, &hostile::forged_keys(200, 0x1234), limit)?;
        ensure!(f.allowed == 0 && f.denied == f.sent && !f.closed, "forged keys: {f:?}");
        let mut mem2 = Memory::new(0x2000_0000, vec![0x11; 4096]);
        let r = hostile::drive(
            &mut conn,
            &Message::Write(write_desc(2, 2 * MIB, &mem2, 1, 4096)),
            &[],
            &mut mem2,
            ReadPolicy::Honest,
            limit,
        )?;
        ensure!(matches!(r.outcome, DriveOutcome::Completed { status: Status::Ok, .. }), "after forged keys: {r:?}");
        // A response nobody asked for, of either direction: cut off (the transport closes
        // without an ERROR for an unknown operation; any ERROR it sends must say protocol).
        let closing = hostile::unsolicited_response(&mut conn, true, limit)?;
        ensure!(closing.error.as_ref().is_none_or(|e| e.0 == ERR_PROTOCOL), "unsolicited DATA_READ_RESP: {closing:?}");
        let mut conn = hostile::authenticated(addr, &id)?;
        let closing = hostile::unsolicited_response(&mut conn, false, limit)?;
        ensure!(closing.error.as_ref().is_none_or(|e| e.0 == ERR_PROTOCOL), "unsolicited DATA_WRITE_ACK: {closing:?}");

        // Lies while the peer pulls a 4-segment write: the transfer never completes as Ok,
        // and the segments never answered are not written. (The wire peer pulls straight into
        // its disk, so an answered segment may land; a real replica pulls into a buffer.)
        for (k, policy) in [ReadPolicy::DuplicateFirst, ReadPolicy::WrongDirection, ReadPolicy::CloseAfterFirst]
            .into_iter()
            .enumerate()
        {
            let off = (8 + k as u64) * MIB;
            let mut mem = Memory::new(0x3000_0000, vec![0xee; 16384]);
            let mut conn = hostile::authenticated(addr, &id)?;
            let r = hostile::drive(
                &mut conn,
                &Message::Write(write_desc(10 + k as u64, off, &mem, 4, 16384)),
                &[],
                &mut mem,
                policy,
                limit,
            )?;
            match &r.outcome {
                DriveOutcome::Closed { error } => {
                    if policy != ReadPolicy::CloseAfterFirst {
                        ensure!(
                            error.as_ref().is_some_and(|e| e.0 == ERR_PROTOCOL),
                            "{policy:?}: closed without a protocol error: {r:?}"
                        );
                    }
                }
                other => bail!("{policy:?}: {other:?}, expected the connection cut"),
            }
            let back = read_back(addr, &id, off + 4096, 12288)?;
            ensure!(back == initial(off + 4096, 12288), "{policy:?}: segments never answered were written");
        }

        // Floods: 3000 pulls nobody answers — at most max_inflight (256) are posted, the rest
        // are refused as Busy; and 1500 inline 64 KiB writes (94 MiB).
        let conn = hostile::authenticated(addr, &id)?;
        let mem = Memory::new(0x4000_0000, vec![0; 4096]);
        let segs = mem.segments(0, 4096, 1, 0x55);
        let rep = hostile::flood(
            conn,
            3000,
            |i| {
                let mut d = hostile::descriptor(100_000 + i, 1, 1, 1, 0, (i % 1024) * 4096, 4096);
                d.segments = segs.clone();
                (Message::Write(d), Vec::new())
            },
            Duration::from_secs(20),
        )?;
        eprintln!("pull flood: {rep:?}");
        ensure!(rep.data_reads <= 256, "{} one-sided READs outstanding, the bound is 256", rep.data_reads);
        ensure!(
            rep.statuses.get("Busy").copied().unwrap_or(0) + rep.data_reads >= rep.sent.min(3000) - 8,
            "pull flood: {rep:?}"
        );
        let conn = hostile::authenticated(addr, &id)?;
        let payload = vec![0x42u8; 65536];
        let rep = hostile::flood(
            conn,
            1500,
            |i| {
                let mut d = hostile::descriptor(200_000 + i, 1, 1, 1, 0, 16 * MIB + (i % 256) * 65536, 65536);
                d.flags = FLAG_INLINE;
                (Message::Write(d), payload.clone())
            },
            Duration::from_secs(40),
        )?;
        eprintln!("inline flood: sent {} answered {} ok {} in {:?}", rep.sent, rep.answered(), rep.ok(), rep.elapsed);
        ensure!(rep.ok() > 0 && rep.errors.is_empty(), "inline flood: {rep:?}");

        // Still serving.
        ensure!(read_back(addr, &id, MIB, 8192)? == data, "data written before the attacks changed");
        Ok(())
    })??;
    let rss_after = peer.rss()?;
    eprintln!("wire peer RSS {rss_before} KiB before, {rss_after} KiB after the attacks");
    ensure!(rss_after < rss_before + 64 * 1024, "wire peer RSS grew from {rss_before} to {rss_after} KiB");
    Ok(())
}
