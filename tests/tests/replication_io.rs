//! Replication under I/O, on a real cluster: etcd and four `hcblk daemon`s in network
//! namespaces (`hcblk_tests::cluster_fixture`), a libblkio client writing self-describing
//! blocks through the owner's vhost-user socket (`hcblk_tests::verify`), and faults in the
//! middle of it. Every scenario ends with every acknowledged write read back through the
//! owner, and the in-sync replicas of every extent compared byte for byte and checked to hold
//! every acknowledged write (`hcblk_tests::scenario::check_replicas`).
//!
//! * `replication_baseline_write_and_verify` — 4 KiB (inline) and 64 KiB (pulled) writes,
//!   and the `volume info --json` contract;
//! * `replication_replica_killed_mid_write_resyncs_incrementally` — `kill -9` of a replica:
//!   no I/O error, a bounded stall, and after its restart a resync of the regions written
//!   meanwhile only;
//! * `replication_replica_partitioned_from_the_owner_and_healed` — the same through a
//!   network partition between owner and replica;
//! * `replication_owner_partitioned_no_split_brain` — the owner loses etcd and its peers, the
//!   volume is force-attached elsewhere: the old owner acknowledges nothing the new one does
//!   not have, its writes after the takeover never land, and it comes back as a replica.
//!
//! Needs root, iproute2, nftables, etcd and hugepages; the `hcblk` binary is built by the
//! fixture (`cargo build -p hcblk`) unless `HCBLK_BIN` names one. Each takes 20–90 s on 2 cores.
//!
//! Run: `cargo test -p hcblk-tests --test replication_io -- --nocapture`
//!
//! **Soak** (not in the default run; minutes): `replication_soak_replicas_killed_and_partitioned`
//! keeps a client writing while replicas are killed, restarted, partitioned and healed one
//! after another for `HCBLK_SOAK_MINUTES` (default 10), each time waiting for the volume to be
//! whole again, then verifies everything:
//! `HCBLK_SOAK_MINUTES=30 cargo test -p hcblk-tests --test replication_io -- --ignored --nocapture`

use anyhow::{ensure, Result};
use hcblk_tests::cluster_fixture::Cluster;
use hcblk_tests::replicas::Layout;
use hcblk_tests::scenario::{
    check_replicas, create_and_attach, ensure_no_panics, layout, member_except, progress, resynced_regions,
    start_workload, verify_through, wait_layout, SyncWatch, MIB,
};
use hcblk_tests::verify::{WorkloadConfig, BLOCK};
use replication::MemberState;
use std::time::{Duration, Instant};

/// The owner fails a silent replica after `--io-timeout` (2 s): the guest may wait that long
/// plus the membership change in etcd; more on a loaded 2-core machine.
const STALL_MAX: Duration = Duration::from_secs(10);
/// The volume: 256 MiB in four 64 MiB extents, 3 replicas, 2 needed for writes.
const SIZE_MIB: u64 = 256;
const EXTENT_MIB: u64 = 64;
/// The hot range the scenarios write: the first 8 MiB (extent 0).
const HOT_BLOCKS: u64 = 8 * MIB / BLOCK as u64;

fn hot_workload(seed: u64) -> WorkloadConfig {
    let mut w = WorkloadConfig::new(seed, 0, HOT_BLOCKS);
    w.stall_limit = Duration::from_secs(90);
    w
}

#[test]
fn replication_baseline_write_and_verify() -> Result<()> {
    let mut c = Cluster::start(4)?;
    c.run(|c| {
        let v = create_and_attach(c, "n1", "vol", SIZE_MIB, 3, 2, EXTENT_MIB)?;
        let l = layout(c, "vol")?;
        eprintln!("{}", l.describe());
        ensure!(
            l.extents.len() == 4 && l.whole_with(3, &[]),
            "a new volume has 3 in-sync members per extent: {}",
            l.describe()
        );
        ensure!(l.owner.as_deref() == Some("n1"), "attached on n1: {}", l.describe());
        ensure!(
            l.extents.iter().all(|e| e.iter().any(|(n, _)| n == "n1")),
            "locality prefer: n1 holds every extent: {}",
            l.describe()
        );
        // The CLI's JSON describes the same layout (the contract the other tests rely on).
        let info = c.volume_info("n1", "vol")?;
        let from_info = Layout::from_info_json(&info)?;
        ensure!(
            from_info.id == l.id && from_info.extents == l.extents && from_info.extent_bytes == l.extent_bytes,
            "volume info --json disagrees with etcd:\n{info}\n{}",
            l.describe()
        );

        // 4 KiB writes (inline to the replicas) over the hot range...
        let a = start_workload(&v.socket, hot_workload(0xa1))?;
        progress(&a, 1200, Duration::from_secs(60), "writing 4 KiB blocks")?;
        let (_, a) = a.stop()?;
        eprintln!("4 KiB writes: {}", a.summary());
        a.ensure_clean()?;
        // ...then 64 KiB writes (pulled by the replicas) over the whole volume.
        let mut cfg = WorkloadConfig::new(0xb2, 0, v.size_bytes / BLOCK as u64);
        cfg.blocks_per_write = 16;
        cfg.writes_max = Some(400);
        cfg.writes_per_s_max = Some(200);
        let b = start_workload(&v.socket, cfg)?;
        while !b.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let (_, b) = b.stop()?;
        eprintln!("64 KiB writes: {}", b.summary());
        b.ensure_clean()?;
        ensure!(b.writes_ok == 400);
        a.ensure_gap_below(STALL_MAX)?;
        b.ensure_gap_below(STALL_MAX)?;

        verify_through(&v.socket, &[&a.ledger, &b.ledger])?;
        let r = check_replicas(c, "vol", &[&a.ledger, &b.ledger], 3)?;
        eprintln!("replicas equal: {} bytes compared over {} extents", r.bytes_compared, r.extents.len());
        ensure_no_panics(c)
    })
}

/// Kills (`kill9 = true`) or partitions a replica of extent 0 while the client writes, brings
/// it back, and checks the resync was incremental.
fn replica_outage(kill9: bool) -> Result<()> {
    let mut c = Cluster::start(4)?;
    c.run(|c| {
        let v = create_and_attach(c, "n1", "vol", SIZE_MIB, 3, 2, EXTENT_MIB)?;
        let l = layout(c, "vol")?;
        let victim = member_except(&l, 0, &["n1"])?;
        let region = l.region_bytes.unwrap_or(MIB);
        eprintln!("victim {victim}; {}", l.describe());
        let w = start_workload(&v.socket, hot_workload(0xc3))?;
        progress(&w, 300, Duration::from_secs(60), "warming up")?;

        let log_offset = c.log("n1")?.len();
        let cut = Instant::now();
        if kill9 {
            c.kill9(&victim)?;
        } else {
            c.partition("n1", &victim)?;
        }
        // Writes go on without the victim...
        let t = progress(&w, 600, Duration::from_secs(60), "the victim is away")?;
        eprintln!("600 writes without {victim} in {t:.1?}");
        // ...and the owner takes it out of the in-sync sets of extent 0.
        wait_layout(c, "vol", Duration::from_secs(30), "the victim to leave extent 0's in-sync set", None, |l| {
            l.state_of(0, &victim) != Some(MemberState::InSync)
        })?;
        let away = cut.elapsed();
        if kill9 {
            c.restart(&victim)?;
        } else {
            c.heal()?;
        }
        eprintln!("{victim} back after {away:.1?}");
        let mut watch = SyncWatch::new("n1", "vol");
        let healed = wait_layout(c, "vol", Duration::from_secs(90), "the victim to be resynced (3 in sync everywhere)", Some(&mut watch), |l| l.whole_with(3, &[]))?;
        progress(&w, 200, Duration::from_secs(60), "after the resync")?;
        let (_, rep) = w.stop()?;
        eprintln!("workload: {}", rep.summary());
        rep.ensure_clean()?;
        rep.ensure_gap_below(STALL_MAX)?;

        // Incremental: only regions written while the victim was away (all in the 8 MiB hot
        // range) are copied, not the victim's extents (up to the whole 256 MiB).
        let (regions, records) = resynced_regions(c, "n1", &victim, log_offset, &watch)?;
        eprintln!("resync of {victim}: {regions} regions of {region} bytes; records {records:?}");
        ensure!(
            !records.is_empty(),
            "no resync of {victim} observed: neither `syncs` in n1's `volume info --json` ({:?}) nor a `sync done ... regions=N` line in n1's log",
            watch.last_error
        );
        let copied = regions * region;
        ensure!(regions > 0, "a resync of 0 regions after {} writes while {victim} was away", 600);
        ensure!(copied <= 8 * MIB + 2 * region, "resync copied {copied} bytes; only the 8 MiB hot range was written while {victim} was away");
        ensure!(copied * 8 <= v.size_bytes, "resync copied {copied} bytes of a {}-byte volume: not incremental", v.size_bytes);

        verify_through(&v.socket, &[&rep.ledger])?;
        check_replicas(c, "vol", &[&rep.ledger], 3)?;
        ensure!(healed.whole_with(3, &[]));
        ensure_no_panics(c)
    })
}

#[test]
fn replication_replica_killed_mid_write_resyncs_incrementally() -> Result<()> {
    replica_outage(true)
}

#[test]
fn replication_replica_partitioned_from_the_owner_and_healed() -> Result<()> {
    replica_outage(false)
}

#[test]
fn replication_owner_partitioned_no_split_brain() -> Result<()> {
    let mut c = Cluster::start(4)?;
    c.run(|c| {
        let v = create_and_attach(c, "n1", "vol", SIZE_MIB, 3, 2, EXTENT_MIB)?;
        let l = layout(c, "vol")?;
        let gen0 = l.generation.unwrap_or(0);
        let new_owner = member_except(&l, 0, &["n1"])?;
        eprintln!("new owner will be {new_owner}; {}", l.describe());

        // Client A on the old owner keeps writing through everything that follows.
        let mut cfg = hot_workload(0xa0);
        cfg.continue_on_error = true;
        cfg.stall_limit = Duration::from_secs(180);
        cfg.drain_timeout = Duration::from_secs(5);
        let a = start_workload(&v.socket, cfg)?;
        progress(&a, 300, Duration::from_secs(60), "before the partition")?;

        // The old owner loses etcd and every peer. Writes it starts from now on can reach no
        // replica: none of them may ever be found.
        let cut = a.elapsed();
        c.isolate("n1")?;
        let seq_cut = a.last_seq_started();
        std::thread::sleep(Duration::from_secs(2));
        // The volume moves: force-attached on a member of extent 0.
        let t = Instant::now();
        let socket_b = c.attach(&new_owner, "vol", true)?;
        eprintln!("attach --force on {new_owner} took {:.1?}", t.elapsed());
        let taken = layout(c, "vol")?;
        ensure!(
            taken.owner.as_deref() == Some(new_owner.as_str()) && taken.generation.unwrap_or(0) > gen0,
            "after the takeover: {}",
            taken.describe()
        );
        ensure!(
            taken.extents.iter().all(|e| e.iter().all(|(n, s)| n != "n1" || *s != MemberState::InSync)),
            "the unreachable old owner is still in sync: {}",
            taken.describe()
        );

        // Client B on the new owner writes half of A's range and beyond.
        let mut cfg_b = WorkloadConfig::new(0xb0, HOT_BLOCKS / 2, HOT_BLOCKS);
        cfg_b.stall_limit = Duration::from_secs(90);
        let b = start_workload(&socket_b, cfg_b)?;
        progress(&b, 400, Duration::from_secs(60), "the new owner serves")?;

        // The old owner comes back: it must find itself fenced; A's writes must not land.
        c.heal()?;
        progress(&b, 400, Duration::from_secs(60), "the old owner is back")?;
        std::thread::sleep(Duration::from_secs(5));
        let (_, a) = a.stop()?;
        let (_, b) = b.stop()?;
        eprintln!("old owner's client: {}", a.summary());
        eprintln!("new owner's client: {}", b.summary());
        b.ensure_clean()?;
        if let Some(f) = &a.fatal {
            // A fenced owner may also drop its export: the guest loses the device, which is
            // an error too, never a false success.
            eprintln!("the old owner's client lost its connection: {f}");
        }
        // Nothing the old owner acknowledged after it was cut off: no replica could have it.
        if let Some(last) = a.last_ok {
            ensure!(
                last <= cut + Duration::from_secs(1),
                "the old owner acknowledged a write {:.1?} after it lost etcd and its peers",
                last.saturating_sub(cut)
            );
        }

        // One history: every write A had acknowledged, then B's on top; none of the writes A
        // started after it was cut off, anywhere.
        let a_strict = a.ledger.forget_unknown_after(seq_cut);
        verify_through(&socket_b, &[&a_strict, &b.ledger])?;
        // The old owner rejoins as a replica and is resynced.
        let whole = wait_layout(
            c,
            "vol",
            Duration::from_secs(120),
            "three in-sync members everywhere after the heal",
            None,
            |l| l.whole_with(3, &[]),
        )?;
        ensure!(whole.owner.as_deref() == Some(new_owner.as_str()), "owner changed again: {}", whole.describe());
        check_replicas(c, "vol", &[&a_strict, &b.ledger], 3)?;
        ensure_no_panics(c)
    })
}

#[test]
#[ignore = "soak, minutes: HCBLK_SOAK_MINUTES=N cargo test -p hcblk-tests --test replication_io -- --ignored"]
fn replication_soak_replicas_killed_and_partitioned() -> Result<()> {
    let minutes: u64 = match std::env::var("HCBLK_SOAK_MINUTES") {
        Ok(m) => m.parse().map_err(|_| anyhow::anyhow!("HCBLK_SOAK_MINUTES={m:?} is not a whole number of minutes"))?,
        Err(_) => 10,
    };
    let mut c = Cluster::start(4)?;
    c.run(|c| {
        let v = create_and_attach(c, "n1", "vol", SIZE_MIB, 3, 2, EXTENT_MIB)?;
        // 4 KiB and 64 KiB writes over the first extent and a half.
        let mut cfg = WorkloadConfig::new(0x50a4, 0, 96 * MIB / BLOCK as u64);
        cfg.blocks_per_write = 4;
        cfg.stall_limit = Duration::from_secs(120);
        let w = start_workload(&v.socket, cfg)?;
        let end = Instant::now() + Duration::from_secs(60 * minutes);
        let others: Vec<String> = c.node_names().into_iter().filter(|n| n != "n1").collect();
        let mut round = 0usize;
        while Instant::now() < end {
            let victim = others[round % others.len()].clone();
            let kill = round.is_multiple_of(2);
            progress(&w, 200, Duration::from_secs(60), "before a fault")?;
            if kill {
                c.kill9(&victim)?;
            } else {
                c.partition("n1", &victim)?;
            }
            progress(&w, 400, Duration::from_secs(60), "a replica away")?;
            if kill {
                c.restart(&victim)?;
            } else {
                c.heal()?;
            }
            wait_layout(c, "vol", Duration::from_secs(180), "the volume whole again", None, |l| l.whole_with(3, &[]))?;
            eprintln!(
                "soak round {round}: {} {victim}, whole again; {} writes so far",
                if kill { "killed" } else { "partitioned" },
                w.writes_ok()
            );
            round += 1;
        }
        let (_, rep) = w.stop()?;
        eprintln!("soak: {round} rounds; {}", rep.summary());
        rep.ensure_clean()?;
        rep.ensure_gap_below(STALL_MAX)?;
        verify_through(&v.socket, &[&rep.ledger])?;
        check_replicas(c, "vol", &[&rep.ledger], 3)?;
        ensure_no_panics(c)
    })
}
