//! Membership on a real cluster (see `replication_io.rs` for the setting): a node lost for
//! good and replaced, two members lost at once with `--min-replicas 2` (I/O stalls, then
//! resumes when one returns, or when an operator accepts the risk), and a daemon holding the
//! wrong cluster secret. Every scenario ends with acknowledged data verified through the owner
//! and the in-sync replicas compared byte for byte.
//!
//! Needs root, iproute2, nftables, etcd, hugepages and the `hcblk` binary with cluster mode.
//! Each takes 30–120 s on 2 cores.
//!
//! Run: `cargo test -p hcblk-tests --test replication_membership -- --nocapture`

use anyhow::{ensure, Context, Result};
use hcblk_tests::cluster_fixture::{wait_for_every, Cluster, ClusterOptions};
use hcblk_tests::scenario::{
    check_replicas, create_and_attach, ensure_no_panics, holds_for, layout, member_except, progress,
    replica_files_blank, start_workload, verify_through, wait_layout, SyncWatch, LAYOUT_POLL, MIB,
};
use hcblk_tests::verify::{WorkloadConfig, BLOCK};
use replication::MemberState;
use std::time::{Duration, Instant};

const STALL_MAX: Duration = Duration::from_secs(10);
const HOT_BLOCKS: u64 = 8 * MIB / BLOCK as u64;

fn hot_workload(seed: u64) -> WorkloadConfig {
    let mut w = WorkloadConfig::new(seed, 0, HOT_BLOCKS);
    w.stall_limit = Duration::from_secs(150);
    w
}

#[test]
fn replication_node_lost_for_good_is_replaced_and_rebuilt() -> Result<()> {
    // Replacement 10 s (the shortest allowed) after the node's registration is gone (its lease: 10 s after the kill).
    let mut c = Cluster::start_with(ClusterOptions::default().nodes(4).replace_after("10s"))?;
    c.run(|c| {
        let v = create_and_attach(c, "n1", "vol", 128, 3, 2, 32)?;
        let l = layout(c, "vol")?;
        let lost = member_except(&l, 0, &["n1"])?;
        eprintln!("losing {lost} for good; {}", l.describe());
        let w = start_workload(&v.socket, hot_workload(0xd1))?;
        progress(&w, 300, Duration::from_secs(60), "warming up")?;
        let t = Instant::now();
        c.kill9(&lost)?;
        let mut watch = SyncWatch::new("n1", "vol");
        let whole = wait_layout(
            c,
            "vol",
            Duration::from_secs(150),
            "three in-sync members per extent, none on the lost node",
            Some(&mut watch),
            |l| l.whole_with(3, &[lost.as_str()]),
        )?;
        eprintln!(
            "replaced and rebuilt {:.1?} after the loss; rebuilds seen {:?}\n{}",
            t.elapsed(),
            watch.seen,
            whole.describe()
        );
        progress(&w, 200, Duration::from_secs(60), "after the rebuild")?;
        let (_, rep) = w.stop()?;
        eprintln!("workload: {}", rep.summary());
        rep.ensure_clean()?;
        rep.ensure_gap_below(STALL_MAX)?;
        ensure!(!whole.nodes().contains(&lost), "{lost} still holds a member: {}", whole.describe());
        verify_through(&v.socket, &[&rep.ledger])?;
        check_replicas(c, "vol", &[&rep.ledger], 3)?;
        ensure_no_panics(c)
    })
}

/// Kills both members of extent 0 besides the owner, checks writes stall (not fail), then
/// lets them resume by bringing one back (`accept_risk = false`) or by `volume accept-risk`.
fn two_members_lost(accept_risk: bool) -> Result<()> {
    let mut c = Cluster::start(4)?;
    c.run(|c| {
        let v = create_and_attach(c, "n1", "vol", 128, 3, 2, 32)?;
        let l = layout(c, "vol")?;
        let x = member_except(&l, 0, &["n1"])?;
        let y = member_except(&l, 0, &["n1", x.as_str()])?;
        eprintln!("losing {x} and {y}; {}", l.describe());
        let w = start_workload(&v.socket, hot_workload(0xe1))?;
        progress(&w, 300, Duration::from_secs(60), "warming up")?;
        c.kill9(&x)?;
        c.kill9(&y)?;
        // After the io timeout and the membership change the extent is below min_replicas:
        // the owner must hold writes back, not fail them.
        std::thread::sleep(Duration::from_secs(6));
        let stalled_at = w.writes_ok();
        holds_for(Duration::from_secs(6), "the stall with one in-sync member", || {
            Ok(w.writes_ok() == stalled_at && !w.is_finished())
        })?;
        let l = layout(c, "vol")?;
        ensure!(l.in_sync(0) == vec!["n1"], "extent 0 should be down to its owner: {}", l.describe());

        if accept_risk {
            c.cli_ok("n1", &["volume", "accept-risk", "vol", "--reason", "hcblk-tests: two replicas lost"])?;
            let meta = c.volume_meta("vol")?.context("no volume document")?;
            ensure!(
                meta.risk_accepted.as_ref().is_some_and(|r| r.reason.contains("two replicas lost")),
                "acceptance not recorded: {:?}",
                meta.risk_accepted
            );
            let t = progress(&w, 300, Duration::from_secs(60), "running on the accepted risk")?;
            eprintln!("writes resumed on the accepted risk within {t:.1?}");
            c.restart(&x)?;
            c.restart(&y)?;
        } else {
            c.restart(&x)?;
            let t = progress(&w, 300, Duration::from_secs(90), "one member back")?;
            eprintln!("writes resumed {t:.1?} after {x} came back");
            c.restart(&y)?;
        }
        let whole = wait_layout(c, "vol", Duration::from_secs(120), "both members back in sync", None, |l| {
            l.whole_with(3, &[])
        })?;
        progress(&w, 200, Duration::from_secs(60), "whole again")?;
        let (_, rep) = w.stop()?;
        eprintln!("workload: {}", rep.summary());
        rep.ensure_clean()?;
        ensure!(
            rep.longest_gap >= Duration::from_secs(6),
            "writes never stalled with one replica left: {}",
            rep.summary()
        );
        if accept_risk {
            wait_for_every(
                Duration::from_secs(30),
                LAYOUT_POLL,
                "the owner to clear the risk acceptance of the whole volume",
                || {
                    let meta = c.volume_meta("vol")?.context("no volume document")?;
                    Ok(meta.risk_accepted.is_none().then_some(()))
                },
            )
            .with_context(|| whole.describe())?;
        }
        verify_through(&v.socket, &[&rep.ledger])?;
        check_replicas(c, "vol", &[&rep.ledger], 3)?;
        ensure_no_panics(c)
    })
}

#[test]
fn replication_two_members_lost_stall_until_one_returns() -> Result<()> {
    two_members_lost(false)
}

#[test]
fn replication_two_members_lost_resume_on_accepted_risk() -> Result<()> {
    two_members_lost(true)
}

#[test]
fn replication_wrong_cluster_secret_reads_and_writes_nothing() -> Result<()> {
    let mut c = Cluster::start(4)?;
    c.run(|c| {
        // n4 comes back holding another cluster's secret before any volume exists. It may
        // refuse to start (if it can tell), or run and be refused by every peer.
        c.set_node_secret("n4", b"not-this-cluster-s-secret-at-all\n")?;
        if let Err(e) = c.restart("n4") {
            ensure!(!c.is_running("n4")?, "n4 failed to start but runs: {e:#}");
            eprintln!("n4 refused to start with the wrong secret: {e:#}");
        }
        let v1 = create_and_attach(c, "n1", "v1", 64, 3, 2, 16)?;
        let v2 = create_and_attach(c, "n2", "v2", 64, 3, 2, 16)?;
        let placed_on_n4 = [layout(c, "v1")?, layout(c, "v2")?].iter().any(|l| l.nodes().contains(&"n4".to_string()));
        let mut reps = Vec::new();
        for (v, seed) in [(&v1, 0xf1u64), (&v2, 0xf2)] {
            let mut cfg = WorkloadConfig::new(seed, 0, 16 * MIB / BLOCK as u64);
            cfg.writes_max = Some(800);
            cfg.stall_limit = Duration::from_secs(60);
            let w = start_workload(&v.socket, cfg)?;
            while !w.is_finished() {
                std::thread::sleep(Duration::from_millis(100));
            }
            let (_, rep) = w.stop()?;
            eprintln!("{}: {}", v.name, rep.summary());
            rep.ensure_clean()?;
            ensure!(rep.writes_ok == 800);
            reps.push(rep);
        }
        // The others carried on: everything verified, in-sync replicas equal, n4 in sync
        // nowhere (it never proved the secret, so it holds nothing).
        for (v, rep) in [(&v1, &reps[0]), (&v2, &reps[1])] {
            verify_through(&v.socket, &[&rep.ledger])?;
            check_replicas(c, &v.name, &[&rep.ledger], 2)?;
            let l = layout(c, &v.name)?;
            for i in 0..l.extents.len() {
                ensure!(l.state_of(i, "n4") != Some(MemberState::InSync), "n4 is in sync in extent {i} of {}: {}", v.name, l.describe());
            }
        }
        let files = replica_files_blank(c, "n4")?;
        eprintln!("n4 was placed a member: {placed_on_n4}; its replica files (all blank): {files:?}");
        // Its log says why.
        let log = c.log_since_start("n4")?.to_ascii_lowercase();
        let why = ["secret", "authentication", "auth"];
        ensure!(
            !placed_on_n4 || why.iter().any(|w| log.contains(w)),
            "n4 was placed a member but its log does not say why it cannot serve (no mention of the secret or authentication)"
        );
        let owners_log = format!("{}{}", c.log("n1")?, c.log("n2")?).to_ascii_lowercase();
        ensure!(
            !placed_on_n4 || why.iter().any(|w| owners_log.contains(w)),
            "n4 was placed a member but neither owner's log mentions the failed authentication"
        );
        ensure_no_panics(c)
    })
}
