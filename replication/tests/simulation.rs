//! The deterministic simulation, run from `cargo test`: a few hundred seeds of the whole
//! protocol under faults, and the planted bugs that prove the checker can fail. CI runs
//! 10,000 more seeds in release (`scripts/test.sh`); any failure replays with
//! `hcblk-sim --seed N --verbose`.

use replication::sim::{run_seed, PlantedBug};

/// Seeds checked here; the planted bugs must be caught within `BUG_SEEDS`.
const SEEDS: u64 = 100;
const BUG_SEEDS: u64 = 200;

#[test]
fn seeds_hold_every_invariant() {
    let mut acked = 0;
    for seed in 1..=SEEDS {
        match run_seed(seed, None, false) {
            Ok(o) => acked += o.model.writes_acked,
            Err(f) => panic!("{f}"),
        }
    }
    assert!(acked > 0, "no write was acknowledged in {SEEDS} seeds: the simulation exercised nothing");
}

/// A seed replays exactly: same steps, same outcome.
#[test]
fn a_seed_replays_exactly() {
    let a = run_seed(7, None, false).expect("seed 7");
    let b = run_seed(7, None, false).expect("seed 7");
    assert_eq!(
        (a.steps, a.sim_time, a.model.writes_acked, a.crashes),
        (b.steps, b.sim_time, b.model.writes_acked, b.crashes)
    );
}

fn caught(bug: PlantedBug) -> String {
    for seed in 1..=BUG_SEEDS {
        if let Err(f) = run_seed(seed, Some(bug), false) {
            return f.what;
        }
    }
    panic!("planted bug {bug:?} went unnoticed for {BUG_SEEDS} seeds: the checker is blind to it");
}

#[test]
fn acknowledging_before_every_member_has_the_write_is_caught() {
    assert!(caught(PlantedBug::AckEarly).starts_with("I4"));
}

#[test]
fn writing_before_the_dirty_bit_is_durable_is_caught() {
    assert!(caught(PlantedBug::SkipDirtyPersist).starts_with("I8"));
}

#[test]
fn attaching_without_reconciling_members_is_caught() {
    let what = caught(PlantedBug::SkipReconcile);
    assert!(what.starts_with("I9") || what.starts_with("I1") || what.starts_with("I2"), "{what}");
}
