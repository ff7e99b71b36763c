//! `hcblk-sim`: runs the deterministic cluster simulation.
//!
//!     hcblk-sim --seed N [--verbose]          # one seed, replayed exactly
//!     hcblk-sim --seeds 10000 [--from S] [--jobs N] [--time-box SECONDS] [--bug ack-early|skip-dirty-persist|skip-reconcile]
//!
//! Seeds run on `--jobs` threads (default: every core); each seed is one thread's
//! deterministic run, so a failure replays exactly with `--seed`. Exits 1 on a failing seed
//! (the lowest found), after printing it and how to replay it. With `--bug`, a bug is
//! planted on purpose and the run fails if no seed catches it.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use replication::sim::{run_seed, Failure, PlantedBug};

struct Args {
    seed: Option<u64>,
    seeds: u64,
    from: u64,
    time_box: Option<Duration>,
    bug: Option<PlantedBug>,
    verbose: bool,
    jobs: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { seed: None, seeds: 100, from: 1, time_box: None, bug: None, verbose: false, jobs: 0 };
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
                    other => {
                        return Err(format!("unknown bug {other:?} (ack-early, skip-dirty-persist, skip-reconcile)"))
                    }
                })
            }
            "--jobs" => a.jobs = value("--jobs")?.parse().map_err(|e| format!("--jobs: {e}"))?,
            "--verbose" => a.verbose = true,
            "-h" | "--help" => {
                println!("usage: hcblk-sim --seed N [--verbose] | --seeds COUNT [--from S] [--jobs N] [--time-box SECONDS] [--bug ack-early|skip-dirty-persist|skip-reconcile]");
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
    let jobs = if args.jobs > 0 { args.jobs } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
    let next = AtomicU64::new(args.from);
    let stop = AtomicBool::new(false);
    let totals = Mutex::new(Totals::default());
    let failures: Mutex<Vec<Failure>> = Mutex::new(Vec::new());
    let end = args.from + args.seeds;
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                if stop.load(Ordering::Relaxed) || args.time_box.is_some_and(|t| start.elapsed() > t) {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let result = run_seed(seed, args.bug, false);
                let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                t.ran += 1;
                match result {
                    Ok(o) => {
                        t.acked += o.model.writes_acked;
                        t.reads += o.model.reads_checked;
                        t.crashes += o.crashes;
                        t.syncs += o.syncs;
                        t.unrecoverable += u64::from(o.unrecoverable);
                    }
                    Err(f) => {
                        failures.lock().unwrap_or_else(|e| e.into_inner()).push(f);
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let t = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    failures.sort_by_key(|f| f.seed);
    if let Some(f) = failures.into_iter().next() {
        if args.bug.is_some() {
            println!("planted bug {:?} caught by seed {} after {} seeds: {}", args.bug, f.seed, t.ran, f.what);
            return ExitCode::SUCCESS;
        }
        println!("{f}");
        return ExitCode::FAILURE;
    }
    if args.bug.is_some() {
        println!("planted bug {:?} NOT caught in {} seeds", args.bug, t.ran);
        return ExitCode::FAILURE;
    }
    println!(
        "{} seeds passed in {:.1} s on {jobs} threads ({} writes acknowledged, {} reads checked, {} crashes, {} resyncs; {} ended with an extent lost for good)",
        t.ran,
        start.elapsed().as_secs_f64(),
        t.acked,
        t.reads,
        t.crashes,
        t.syncs,
        t.unrecoverable
    );
    if t.ran < args.seeds {
        println!("(time box reached after {} of {} seeds)", t.ran, args.seeds);
    }
    ExitCode::SUCCESS
}

#[derive(Default)]
struct Totals {
    ran: u64,
    acked: u64,
    reads: u64,
    crashes: u64,
    syncs: u64,
    unrecoverable: u64,
}
