//! A real guest on a replicated volume: the busybox test guest of `qemu/` (TCG) runs
//! `fio --verify=crc32c` on a 3-replica volume attached on n1 while a replica node is killed
//! (`kill -9`) two seconds into fio's I/O. The guest must pass (no I/O error, every block
//! verified), the node restarts and is resynced, and the in-sync replicas end byte-for-byte
//! equal.
//!
//! Needs what `replication_io.rs` needs plus QEMU and the guest build (`qemu/build-guest.sh`,
//! see `qemu/README.md`). 1–3 minutes on 2 cores (the guest runs under TCG).
//!
//! Run: `cargo test -p hcblk-tests --test replication_guest -- --nocapture`

use anyhow::{ensure, Result};
use hcblk_tests::cluster_fixture::Cluster;
use hcblk_tests::guest::{build_guest, run_guest, GuestEvent, GuestRun, Verdict};
use hcblk_tests::replicas::compare_in_sync;
use hcblk_tests::scenario::{create_and_attach, ensure_no_panics, layout, member_except, wait_layout};
use std::time::Duration;

#[test]
fn replication_guest_fio_verify_survives_a_replica_kill() -> Result<()> {
    let guest_dir = build_guest()?;
    let mut c = Cluster::start(4)?;
    c.run(|c| {
        let v = create_and_attach(c, "n1", "vm", 256, 3, 2, 64)?;
        let l = layout(c, "vm")?;
        let victim = member_except(&l, 0, &["n1"])?;
        eprintln!("killing {victim} during fio; {}", l.describe());
        let dir = c.dir().join("guest");
        let mut killed = false;
        let mut kill = |e: GuestEvent| -> Result<()> {
            if e == GuestEvent::FioStarted && !killed {
                // fio is issuing I/O: let it get going, then take a replica away.
                std::thread::sleep(Duration::from_secs(2));
                c.kill9(&victim)?;
                killed = true;
            }
            Ok(())
        };
        // One virtqueue: the replicated export serves its queues from one poller anyway.
        let run = GuestRun::new("fio-verify").queues(1).param("size", "64M").timeout_s(600);
        let out = run_guest(&guest_dir, &dir, &v.socket, &run, Some(&mut kill))?;
        ensure!(killed, "fio never started: {}", out.describe());
        ensure!(out.verdict == Verdict::Pass, "the guest saw the replica kill: {}", out.describe());
        eprintln!("guest passed in {:.1?}", out.elapsed);
        c.restart(&victim)?;
        let whole = wait_layout(c, "vm", Duration::from_secs(120), "the killed replica resynced", None, |l| {
            l.whole_with(3, &[])
        })?;
        let r = compare_in_sync(&whole, 3, |n| c.replica_path(n, whole.id))?;
        eprintln!("replicas equal: {} bytes compared", r.bytes_compared);
        ensure_no_panics(c)
    })
}
