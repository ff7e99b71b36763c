//! `hcblk-sim`: runs the deterministic cluster simulation.
//!
//!     hcblk-sim --seed N [--verbose]          # one seed, replayed exactly
//!     hcblk-sim --seeds 10000 [--from S] [--time-box SECONDS] [--bug ack-early|skip-dirty-persist|skip-reconcile]
//!
//! Exits 1 on the first failing seed, after printing it and how to replay it. With `--bug`,
//! a bug is planted on purpose and the run fails if no seed catches it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use replication::sim::{run_seed, PlantedBug};

struct Args {
    seed: Option<u64>,
    seeds: u64,
    from: u64,
    time_box: Option<Duration>,
    bug: Option<PlantedBug>,
    verbose: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { seed: None, seeds: 100, from: 1, time_box: None, bug: None, verbose: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seed" => a.seed = Some(value("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?),
            "--seeds" => a.seeds = value("--seeds")?.parse().map_err(|e| format!("--seeds: {e}"))?,
            "--from" => a.from = value("--from")?.parse().map_err(|e| format!("--from: {e}"))?,
            "--time-box" => {
                let s: u64 = value("--time-box")?.parse().map_err(|e| format!("--time-box: {e}"))?;
                a.time_box = Some(Duration::from_secs(s));
            }
            "--bug" => {
                a.bug = Some(match value("--bug")?.as_str() {
                    "ack-early" => PlantedBug::AckEarly,
                    "skip-dirty-persist" => PlantedBug::SkipDirtyPersist,
                    "skip-reconcile" => PlantedBug::SkipReconcile,
                    other => return Err(format!("unknown bug {other:?} (ack-early, skip-dirty-persist, skip-reconcile)")),
                })
            }
            "--verbose" => a.verbose = true,
            "-h" | "--help" => {
                println!("usage: hcblk-sim --seed N [--verbose] | --seeds COUNT [--from S] [--time-box SECONDS] [--bug ack-early|skip-dirty-persist|skip-reconcile]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(seed) = args.seed {
        return match run_seed(seed, args.bug, args.verbose) {
            Ok(o) => {
                println!("seed {seed}: ok ({} steps, {:.1} s simulated, {} writes acked, {} reads checked, {} crashes, {} attaches, {} resyncs, {} replacements{})",
                    o.steps, o.sim_time as f64 / 1e9, o.model.writes_acked, o.model.reads_checked, o.crashes, o.attaches, o.syncs, o.replacements,
                    if o.unrecoverable { "; ended with an extent whose in-sync members were all lost for good" } else { "" });
                ExitCode::SUCCESS
            }
            Err(f) => {
                println!("{f}");
                ExitCode::FAILURE
            }
        };
    }
    let start = Instant::now();
    let mut ran = 0u64;
    let (mut acked, mut reads, mut crashes, mut syncs, mut unrecoverable) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for seed in args.from..args.from + args.seeds {
        if args.time_box.is_some_and(|t| start.elapsed() > t) {
            break;
        }
        ran += 1;
        match run_seed(seed, args.bug, false) {
            Ok(o) => {
                acked += o.model.writes_acked;
                reads += o.model.reads_checked;
                crashes += o.crashes;
                syncs += o.syncs;
                unrecoverable += u64::from(o.unrecoverable);
            }
            Err(f) if args.bug.is_some() => {
                println!("planted bug {:?} caught by seed {seed} after {ran} seeds: {}", args.bug, f.what);
                return ExitCode::SUCCESS;
            }
            Err(f) => {
                println!("{f}");
                return ExitCode::FAILURE;
            }
        }
    }
    if args.bug.is_some() {
        println!("planted bug {:?} NOT caught in {ran} seeds", args.bug);
        return ExitCode::FAILURE;
    }
    println!("{ran} seeds passed in {:.1} s ({acked} writes acknowledged, {reads} reads checked, {crashes} crashes, {syncs} resyncs; {unrecoverable} ended with an extent lost for good)", start.elapsed().as_secs_f64());
    if ran < args.seeds {
        println!("(time box reached before all {} seeds)", args.seeds);
    }
    ExitCode::SUCCESS
}
