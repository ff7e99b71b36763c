//! A hostile peer against a replica daemon's listen port (`hcblk_tests::hostile`), on a real
//! cluster: before authentication (garbage, another protocol version, another cluster,
//! another secret, a forged proof, a trickled handshake, more idle handshakes than the
//! acceptor holds) and after it — as a node that is no member ("mallory"), and as a liar that
//! knows the secret and claims to be the volume's owner with its current stamps: lying
//! stamps, forged / foreign / revoked keys, responses nobody asked for or of the wrong
//! direction, duplicate segment responses, transfers cut short, and floods beyond the
//! in-flight bounds.
//!
//! Meanwhile the target daemon serves a volume it owns to a client that must see no error and
//! no long stall; afterwards its memory (RSS) must not have grown beyond a bound, its replica
//! of the volume under attack must be unchanged byte for byte (nothing written that no
//! legitimate request asked for), and that volume must still work through its real owner.
//!
//! Needs root, iproute2, nftables, etcd, hugepages and the `hcblk` binary with cluster mode.
//! About 2 minutes on 2 cores.
//!
//! Run: `cargo test -p hcblk-tests --test replication_hostile -- --nocapture`

use anyhow::{bail, ensure, Context, Result};
use hcblk_tests::cluster_fixture::Cluster;
use hcblk_tests::hostile::{self, DriveOutcome, HandshakeOutcome, Identity, Memory, ReadPolicy};
use hcblk_tests::replicas::digest_range;
use hcblk_tests::scenario::{
    check_replicas, create_and_attach, ensure_no_panics, layout, member_except, progress, start_workload,
    verify_through, wait_layout, MIB,
};
use hcblk_tests::verify::{WorkloadConfig, BLOCK};
use proto::tcp::{ERR_AUTH, ERR_CLUSTER, ERR_PROTOCOL, ERR_VERSION, MAX_PENDING_HANDSHAKES};
use proto::wire::{ClearDirty, Flush, Message, Promise, RangeOp, Status, FLAG_INLINE};
use proto::{Access, Registry};
use replication::node_id;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const STALL_MAX: Duration = Duration::from_secs(10);
/// How much the target's RSS may grow under attack.
const RSS_GROWTH_MAX_KIB: u64 = 96 * 1024;

/// The stamps the volume's real owner uses with the target, read from etcd.
#[derive(Clone, Copy, Debug)]
struct Stamps {
    volume: u64,
    generation: u64,
    epoch: u32,
    incarnation: u64,
    size: u64,
}

/// Request ids far above anything the real owner of this generation numbers.
fn seq(s: &Stamps, k: u64) -> u64 {
    (s.generation << replication::msg::SEQ_GENERATION_SHIFT) | (1 << 39) | k
}

fn write_msg(s: &Stamps, k: u64, offset: u64, mem: &Memory, pieces: u32, len: u32) -> Message {
    let mut d = hostile::descriptor(seq(s, k), s.volume, s.generation, s.epoch, s.incarnation, offset, len);
    d.segments = mem.segments(0, len, pieces, 0x4242);
    Message::Write(d)
}

fn inline_msg(s: &Stamps, k: u64, offset: u64, len: u32) -> Message {
    let mut d = hostile::descriptor(seq(s, k), s.volume, s.generation, s.epoch, s.incarnation, offset, len);
    d.flags = FLAG_INLINE;
    Message::Write(d)
}

/// A lying request must be refused — an error status, the connection closed, or silence —
/// without the target pulling a byte of its data.
fn expect_refused(what: &str, d: hostile::Drive) -> Result<String> {
    ensure!(
        d.data_reads == 0,
        "{what}: the target pulled {} segments of a request it must refuse ({:?})",
        d.data_reads,
        d.outcome
    );
    match d.outcome {
        DriveOutcome::Completed { status: Status::Ok, .. } => bail!("{what}: completed as Ok"),
        other => Ok(format!("{other:?}")),
    }
}

/// Sends one lying request on a connection of its own and checks it is refused.
fn lie(addr: SocketAddr, id: &Identity, what: &str, m: &Message, payload: &[u8]) -> Result<String> {
    let mut conn = hostile::authenticated(addr, id)?;
    let mut mem = Memory::new(0x7000_0000, vec![0xee; 65536]);
    let d = hostile::drive(&mut conn, m, payload, &mut mem, ReadPolicy::Honest, Duration::from_secs(5))?;
    conn.shutdown();
    expect_refused(what, d)
}

/// Keys that are not the target's: random, another registry's live ones (foreign) and that
/// registry's revoked ones.
fn foreign_and_revoked_keys() -> Result<Vec<(u32, u64)>> {
    let mut buf = vec![0u8; 1 << 20];
    let reg = Registry::new();
    // SAFETY: `buf` stays allocated and untouched until after `reg`, its only user, is dropped
    // below; no endpoint ever uses this registry.
    let region = unsafe { reg.register(buf.as_mut_ptr(), buf.len()) }.context("register")?;
    let mut keys = hostile::forged_keys(150, 0xfeed);
    for i in 0..50u64 {
        let g =
            reg.grant(region, &[(i * 4096, 4096)], if i % 2 == 0 { Access::RemoteRead } else { Access::RemoteWrite })?;
        keys.extend(g.segments.iter().map(|s| (s.key, s.addr)));
        if i % 3 == 0 {
            reg.revoke(g.key)?;
        }
    }
    drop(reg);
    drop(buf);
    Ok(keys)
}

#[test]
fn replication_hostile_peer_against_a_replica_daemon() -> Result<()> {
    let mut c = Cluster::start(4)?;
    c.run(|c| {
        // The volume under attack: written, then left idle (attached on n1, no client).
        let victim = create_and_attach(c, "n1", "victim", 64, 3, 2, 16)?;
        let mut cfg = WorkloadConfig::new(0x71c7, 0, 16 * MIB / BLOCK as u64);
        cfg.writes_max = Some(600);
        let w = start_workload(&victim.socket, cfg)?;
        while !w.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let (_, before) = w.stop()?;
        before.ensure_clean()?;
        let l = layout(c, "victim")?;
        let target = member_except(&l, 0, &["n1"])?;
        let meta = c.volume_meta("victim")?.context("no victim document")?;
        let incarnation = meta.extents[0].members.iter().find(|m| m.node == target).map(|m| m.incarnation).unwrap_or(0);
        let stamps = Stamps {
            volume: meta.id,
            generation: meta.generation,
            epoch: meta.epoch,
            incarnation,
            size: meta.size_bytes,
        };
        eprintln!("target {target}, stamps {stamps:?}; {}", l.describe());
        let replica = c.replica_path(&target, meta.id)?;
        let digest0 = digest_range(&replica, 0, stamps.size)?;

        // The target serves a volume of its own to a client throughout.
        let live = create_and_attach(c, &target, "live", 64, 3, 2, 16)?;
        let mut live_cfg = WorkloadConfig::new(0x11fe, 0, 8 * MIB / BLOCK as u64);
        live_cfg.stall_limit = Duration::from_secs(60);
        let lw = start_workload(&live.socket, live_cfg)?;
        progress(&lw, 200, Duration::from_secs(60), "the live volume warms up")?;
        let rss0 = c.rss_kib(&target)?;

        let addr: SocketAddr = c.listen_addr(&target)?;
        let secret = c.secret()?;
        let cluster_id = c.cluster_id()?;
        let mallory = Identity { cluster_id, node_id: node_id("mallory"), secret: Some(secret.clone()) };
        let liar = Identity { cluster_id, node_id: node_id("n1"), secret: Some(secret.clone()) };
        let keys = foreign_and_revoked_keys()?;

        let attacks = c.net().run_in("etcd", || -> Result<Vec<String>> {
            let mut notes = Vec::new();
            let limit = Duration::from_secs(15);
            // --- before authentication ---
            let closing = hostile::garbage(addr, &[0xffu8; 4096], limit)?;
            ensure!(closing.error.as_ref().is_none_or(|e| e.0 == ERR_PROTOCOL), "garbage: {closing:?}");
            let closing = hostile::wrong_version(addr, &mallory, 1, limit)?;
            ensure!(closing.error.as_ref().is_some_and(|e| e.0 == ERR_VERSION), "version 1: {closing:?}");
            let (h, _) =
                hostile::handshake_as(addr, &Identity { cluster_id: cluster_id ^ 1, ..mallory.clone() }, limit)?;
            ensure!(
                matches!(h, HandshakeOutcome::Refused { code, .. } if code == ERR_CLUSTER),
                "another cluster: {h:?}"
            );
            let other = proto::auth::Secret::new(b"some-other-cluster-secret".to_vec())?;
            let (h, _) = hostile::handshake_as(addr, &Identity { secret: Some(other), ..liar.clone() }, limit)?;
            ensure!(matches!(h, HandshakeOutcome::Refused { code, .. } if code == ERR_AUTH), "another secret: {h:?}");
            let (h, _) = hostile::handshake_as(addr, &Identity { secret: None, ..liar.clone() }, limit)?;
            ensure!(matches!(h, HandshakeOutcome::Refused { code, .. } if code == ERR_AUTH), "forged proof: {h:?}");
            let (bytes, after) =
                hostile::trickle_hello(addr, &mallory, Duration::from_millis(300), Duration::from_secs(20))?;
            ensure!(bytes < 68 && after < Duration::from_secs(10), "a trickled HELLO lasted {after:?} ({bytes} bytes)");
            let mut idle = hostile::idle_connections(addr, MAX_PENDING_HANDSHAKES + 8, b"HB\x02")?;
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            hostile::authenticated(addr, &mallory).context("a peer behind a wall of idle handshakes")?.shutdown();
            ensure!(t.elapsed() < Duration::from_secs(3), "handshake behind idle sockets took {:?}", t.elapsed());
            for s in &mut idle {
                s.wait_closed(Duration::from_secs(10)).context("an idle handshake outlived its deadline")?;
            }

            // --- authenticated, no member ---
            let mut conn = hostile::authenticated(addr, &mallory)?;
            let f = hostile::forged_one_sided(&mut conn, &keys, limit)?;
            ensure!(f.allowed == 0, "forged, foreign or revoked keys honoured: {f:?}");
            notes.push(format!("forged/foreign/revoked keys: {f:?}"));
            let mem = Memory::new(0x7000_0000, vec![0xee; 65536]);
            let s = stamps;
            let lies: Vec<(&str, Message, Vec<u8>)> = vec![
                ("mallory's pulled WRITE", write_msg(&s, 1, 0, &mem, 2, 8192), vec![]),
                ("mallory's inline WRITE", inline_msg(&s, 2, 4096, 4096), vec![0xee; 4096]),
                (
                    "mallory's DISCARD",
                    Message::Discard(RangeOp {
                        request_id: seq(&s, 3),
                        volume: s.volume,
                        generation: s.generation,
                        offset: 0,
                        length: MIB,
                        flags: 0,
                        epoch: s.epoch,
                        incarnation: s.incarnation,
                        floor: 0,
                    }),
                    vec![],
                ),
                (
                    "mallory's WRITE_ZEROES",
                    Message::WriteZeroes(RangeOp {
                        request_id: seq(&s, 4),
                        volume: s.volume,
                        generation: s.generation,
                        offset: 0,
                        length: MIB,
                        flags: 0,
                        epoch: s.epoch,
                        incarnation: s.incarnation,
                        floor: 0,
                    }),
                    vec![],
                ),
                (
                    "mallory's CLEAR_DIRTY",
                    Message::ClearDirty(ClearDirty {
                        request_id: seq(&s, 5),
                        volume: s.volume,
                        generation: s.generation,
                        epoch: s.epoch,
                        extent: 0,
                        incarnation: s.incarnation,
                        first_region: 0,
                        region_count: 16,
                        upto: u64::MAX,
                    }),
                    vec![],
                ),
                (
                    "mallory's FLUSH",
                    Message::Flush(Flush {
                        request_id: seq(&s, 6),
                        volume: s.volume,
                        generation: s.generation,
                        epoch: s.epoch,
                        incarnation: s.incarnation,
                        floor: 0,
                    }),
                    vec![],
                ),
                (
                    "mallory's PROMISE of a far generation",
                    Message::Promise(Promise {
                        request_id: seq(&s, 7),
                        volume: s.volume,
                        generation: s.generation + 1000,
                        epoch: s.epoch + 1000,
                        extent: 0,
                    }),
                    vec![],
                ),
            ];
            for (what, m, payload) in lies {
                notes.push(format!("{what}: {}", lie(addr, &mallory, what, &m, &payload)?));
            }
            let closing = hostile::unsolicited_response(&mut conn, true, limit)?;
            ensure!(
                closing.error.as_ref().is_none_or(|e| e.0 == ERR_PROTOCOL),
                "unsolicited DATA_READ_RESP: {closing:?}"
            );
            let mut conn = hostile::authenticated(addr, &mallory)?;
            let closing = hostile::unsolicited_response(&mut conn, false, limit)?;
            ensure!(
                closing.error.as_ref().is_none_or(|e| e.0 == ERR_PROTOCOL),
                "unsolicited DATA_WRITE_ACK: {closing:?}"
            );

            // --- the liar: the owner's identity and its current stamps ---
            let stale = Stamps { generation: s.generation.saturating_sub(1), ..s };
            notes.push(format!(
                "owner's identity, older generation: {}",
                lie(addr, &liar, "an older generation", &write_msg(&stale, 10, 0, &mem, 2, 8192), &[])?
            ));
            let wrong_inc = Stamps { incarnation: s.incarnation ^ 0x5555, ..s };
            notes.push(format!(
                "owner's identity, another incarnation: {}",
                lie(addr, &liar, "another incarnation", &write_msg(&wrong_inc, 11, 0, &mem, 2, 8192), &[])?
            ));
            notes.push(format!(
                "owner's identity, beyond the volume: {}",
                lie(addr, &liar, "beyond the volume", &write_msg(&s, 12, s.size + MIB, &mem, 1, 4096), &[])?
            ));
            let foreign_vol = Stamps { volume: s.volume ^ 0xdead, ..s };
            notes.push(format!(
                "owner's identity, unknown volume: {}",
                lie(addr, &liar, "an unknown volume", &write_msg(&foreign_vol, 13, 0, &mem, 1, 4096), &[])?
            ));
            let mut conn = hostile::authenticated(addr, &liar)?;
            // Control: with every stamp right, the liar writes the very bytes the replica
            // already holds (so a success changes nothing). If the target takes it, the lies
            // below are refused for what they are, not for a stamp.
            let offset = 2 * MIB;
            let current = {
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::open(&replica)?;
                let mut b = vec![0u8; 16384];
                f.read_exact_at(&mut b, offset)?;
                b
            };
            let mut same = Memory::new(0x7100_0000, current);
            let d = hostile::drive(
                &mut conn,
                &write_msg(&s, 20, offset, &same, 4, 16384),
                &[],
                &mut same,
                ReadPolicy::Honest,
                limit,
            )?;
            notes.push(format!(
                "control: the liar's correct write of unchanged bytes: {:?}, {} segments pulled",
                d.outcome, d.data_reads
            ));
            // The lies: different bytes, a transfer that never completes honestly.
            for (k, policy) in [ReadPolicy::DuplicateFirst, ReadPolicy::WrongDirection, ReadPolicy::CloseAfterFirst]
                .into_iter()
                .enumerate()
            {
                let mut conn = hostile::authenticated(addr, &liar)?;
                let mut junk = Memory::new(0x7200_0000, vec![0xd0 | k as u8; 16384]);
                let d = hostile::drive(
                    &mut conn,
                    &write_msg(&s, 30 + k as u64, offset, &junk, 4, 16384),
                    &[],
                    &mut junk,
                    policy,
                    limit,
                )?;
                match &d.outcome {
                    DriveOutcome::Completed { status: Status::Ok, .. } => {
                        bail!("{policy:?}: a lying transfer completed as Ok: {d:?}")
                    }
                    other => notes.push(format!("{policy:?}: {other:?} after {} pulls", d.data_reads)),
                }
                conn.shutdown();
            }

            // --- floods ---
            let conn = hostile::authenticated(addr, &mallory)?;
            let pulled = mem.segments(0, 4096, 1, 0x99);
            let rep = hostile::flood(
                conn,
                5000,
                |i| {
                    let mut d = hostile::descriptor(
                        seq(&s, 100_000 + i),
                        s.volume,
                        s.generation,
                        s.epoch,
                        s.incarnation,
                        (i % 4096) * 4096,
                        4096,
                    );
                    d.segments = pulled.clone();
                    (Message::Write(d), Vec::new())
                },
                Duration::from_secs(30),
            )?;
            ensure!(rep.ok() == 0 && rep.data_reads == 0, "mallory's WRITE flood: {rep:?}");
            notes.push(format!(
                "pulled WRITE flood: sent {} answered {} {:?} closed {}",
                rep.sent,
                rep.answered(),
                rep.statuses,
                rep.closed
            ));
            let conn = hostile::authenticated(addr, &mallory)?;
            let payload = vec![0xeeu8; 65536];
            let rep = hostile::flood(
                conn,
                1500,
                |i| (inline_msg(&s, 200_000 + i, (i % 256) * 65536, 65536), payload.clone()),
                Duration::from_secs(30),
            )?;
            ensure!(rep.ok() == 0, "mallory's inline flood: {rep:?}");
            notes.push(format!(
                "inline WRITE flood: sent {} answered {} {:?} blocked {} closed {}",
                rep.sent,
                rep.answered(),
                rep.statuses,
                rep.blocked,
                rep.closed
            ));
            let conn = hostile::authenticated(addr, &mallory)?;
            let rep = hostile::flood(
                conn,
                3000,
                |i| {
                    (
                        Message::Promise(Promise {
                            request_id: seq(&s, 300_000 + i),
                            volume: s.volume,
                            generation: s.generation + 1 + i,
                            epoch: s.epoch + 1,
                            extent: (i % 4) as u32,
                        }),
                        Vec::new(),
                    )
                },
                Duration::from_secs(30),
            )?;
            ensure!(rep.ok() == 0, "mallory's PROMISE flood: {rep:?}");
            notes.push(format!(
                "PROMISE flood: sent {} answered {} {:?} closed {}",
                rep.sent,
                rep.answered(),
                rep.statuses,
                rep.closed
            ));
            Ok(notes)
        })??;
        for n in &attacks {
            eprintln!("hostile: {n}");
        }

        // The target kept serving its own volume.
        progress(&lw, 200, Duration::from_secs(60), "after the attacks")?;
        let (_, live_rep) = lw.stop()?;
        eprintln!("live volume on {target}: {}", live_rep.summary());
        live_rep.ensure_clean()?;
        live_rep.ensure_gap_below(STALL_MAX)?;
        let rss1 = c.rss_kib(&target)?;
        eprintln!("{target} RSS {rss0} KiB before, {rss1} KiB after");
        ensure!(rss1 <= rss0 + RSS_GROWTH_MAX_KIB, "{target}'s RSS grew from {rss0} to {rss1} KiB under attack");
        // Nothing written that no legitimate request asked for.
        ensure!(
            digest_range(&replica, 0, stamps.size)? == digest0,
            "{target}'s replica of the attacked volume changed"
        );
        // The attacked volume still works through its real owner.
        let mut cfg = WorkloadConfig::new(0x2222, 16 * MIB / BLOCK as u64, 4 * MIB / BLOCK as u64);
        cfg.writes_max = Some(300);
        let w = start_workload(&victim.socket, cfg)?;
        while !w.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let (_, after) = w.stop()?;
        after.ensure_clean()?;
        verify_through(&victim.socket, &[&before.ledger, &after.ledger])?;
        verify_through(&live.socket, &[&live_rep.ledger])?;
        wait_layout(c, "victim", Duration::from_secs(90), "the attacked volume whole", None, |l| l.whole_with(3, &[]))?;
        check_replicas(c, "victim", &[&before.ledger, &after.ledger], 3)?;
        check_replicas(c, "live", &[&live_rep.ledger], 3)?;
        ensure_no_panics(c)
    })
}
