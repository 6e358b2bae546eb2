//! The simulation suite: randomized runs, replay of one seed, trace determinism, the canary.
//!
//! `SIM_RUNS=<n>` sets how many seeds `randomized_runs` tries (default 200), from
//! `SIM_SEED_START` (default 1), stopping at the first failure with `SIM_STOP_AT_FIRST=1`;
//! `SIM_SEED=<n>` replays one seed in `replay_one_seed`. `SIM_TRACE_HASHES=<file>` makes
//! `randomized_runs` write every seed's trace hash to `<file>`, or, when it exists, compare
//! them with it: a change meant to keep behaviour (a refactoring) must reproduce them.
//! Built with `--features canary`, every run uses the known-wrong merge rule and the suite
//! must fail.

use sim::{Failure, Report, run_seed, run_seed_with_schema_canary};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number"))
    })
}

/// Whether this build runs every seed with the known-wrong rule (`--features canary`).
const CANARY: bool = cfg!(feature = "canary");

#[test]
fn randomized_runs() {
    let runs = env_u64("SIM_RUNS").unwrap_or(200);
    // Hunting for a seed that catches something: stop at the first failure.
    let stop_at_first = std::env::var_os("SIM_STOP_AT_FIRST").is_some();
    let start = env_u64("SIM_SEED_START").unwrap_or(1);
    let next = AtomicU64::new(start);
    let failures: Mutex<Vec<Box<Report>>> = Mutex::new(Vec::new());
    let done = AtomicU64::new(0);
    let sim_secs = Mutex::new(0f64);
    let hashes: Mutex<std::collections::BTreeMap<u64, u64>> = Mutex::default();
    let began = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= start + runs {
                        return;
                    }
                    match run_seed(seed, CANARY) {
                        Ok(o) => {
                            *sim_secs.lock().unwrap() += o.sim_time.as_secs_f64();
                            hashes.lock().unwrap().insert(seed, o.trace_hash);
                        }
                        Err(r) => {
                            eprintln!("{r}\n");
                            failures.lock().unwrap().push(r);
                            if stop_at_first {
                                next.store(start + runs, Ordering::SeqCst);
                            }
                        }
                    }
                    let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if d.is_multiple_of(50) {
                        eprintln!("simulation: {d}/{runs} seeds in {:?}", began.elapsed());
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    let took = began.elapsed();
    if let Some(file) = std::env::var_os("SIM_TRACE_HASHES") {
        trace_hashes(std::path::Path::new(&file), &hashes.into_inner().unwrap());
    }
    eprintln!(
        "simulation: seeds {start}..{} ({runs} runs) in {took:?}: {:.1} runs/s, {:.0} s simulated, {} failed",
        start + runs,
        runs as f64 / took.as_secs_f64(),
        sim_secs.into_inner().unwrap(),
        failures.len()
    );
    if let Some(first) = failures.first() {
        let seeds: Vec<u64> = failures.iter().map(|r| r.plan.seed).collect();
        panic!(
            "{} of {runs} seeds failed: {seeds:?}\nfirst failure:\n{first}",
            failures.len()
        );
    }
}

/// Writes the seeds' trace hashes to `file` (one `seed hash` line each), or compares them
/// with the ones it holds.
fn trace_hashes(file: &std::path::Path, hashes: &std::collections::BTreeMap<u64, u64>) {
    let text: String = hashes
        .iter()
        .map(|(seed, hash)| format!("{seed} {hash:016x}\n"))
        .collect();
    match std::fs::read_to_string(file) {
        Err(_) => {
            std::fs::write(file, text).unwrap();
            eprintln!(
                "simulation: wrote {} trace hashes to {}",
                hashes.len(),
                file.display()
            );
        }
        Ok(expected) => {
            let differ: Vec<&str> = expected
                .lines()
                .filter(|l| !text.lines().any(|t| t == *l))
                .collect();
            assert!(
                differ.is_empty() && expected.lines().count() == hashes.len(),
                "{} of {} seeds' traces differ from {} (expected lines not reproduced: {:?})",
                differ.len(),
                expected.lines().count(),
                file.display(),
                differ.iter().take(20).collect::<Vec<_>>()
            );
            eprintln!(
                "simulation: all {} trace hashes match {}",
                hashes.len(),
                file.display()
            );
        }
    }
}

#[test]
fn replay_one_seed() {
    let seed = env_u64("SIM_SEED").unwrap_or(1);
    let started = Instant::now();
    match run_seed(seed, CANARY) {
        Ok(o) => eprintln!(
            "seed {seed}: converged after {:?} simulated ({} transactions, {} captures, {} trace events, trace {:016x}) in {:?}",
            o.sim_time,
            o.transactions,
            o.captures,
            o.trace_len,
            o.trace_hash,
            started.elapsed()
        ),
        Err(r) => panic!("{r}"),
    }
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let seed = env_u64("SIM_SEED").unwrap_or(7);
    let a = run_seed(seed, CANARY).map_err(|r| r.to_string());
    let b = run_seed(seed, CANARY).map_err(|r| r.to_string());
    match (a, b) {
        (Ok(a), Ok(b)) => {
            assert!(a.trace_len > 100, "a trace worth comparing");
            if let Some(i) =
                (0..a.trace.len().min(b.trace.len())).find(|&i| a.trace[i] != b.trace[i])
            {
                panic!(
                    "traces of seed {seed} differ at event {i}:\n{}\n{}",
                    a.trace[i], b.trace[i]
                );
            }
            assert_eq!(a.trace_len, b.trace_len);
            assert_eq!(a.trace_hash, b.trace_hash);
        }
        (a, b) => assert_eq!(
            a.err(),
            b.err(),
            "both runs of seed {seed} must fail the same way"
        ),
    }
}

/// The checker must catch a known-wrong rule for schema changes (applied in arrival order,
/// not by version: concurrent `user_version` settings then end different on different nodes)
/// within a bounded number of seeds.
#[test]
fn the_schema_canary_is_caught() {
    const BOUND: u64 = 30;
    for seed in 1..=BOUND {
        if let Err(r) = run_seed_with_schema_canary(seed) {
            eprintln!("schema canary caught by seed {seed}:\n{r}");
            match &r.failure {
                Failure::Safety { invariant, .. } => assert!(!invariant.is_empty()),
                Failure::Liveness { detail } => assert!(
                    detail.contains("another schema"),
                    "caught, but not by the schema check: {detail}"
                ),
                Failure::Crash { detail } => {
                    panic!("the canary must break an invariant, not the simulation: {detail}")
                }
            }
            return;
        }
    }
    panic!("the schema canary survived {BOUND} seeds: the schema check proves nothing");
}

/// The checker must catch a known-wrong rule ("last arrival wins", as Go Marmot did) within a
/// bounded number of seeds, and name the invariant it broke.
#[test]
fn the_canary_is_caught() {
    const BOUND: u64 = 30;
    for seed in 1..=BOUND {
        if let Err(r) = run_seed(seed, true) {
            eprintln!("canary caught by seed {seed}:\n{r}");
            match &r.failure {
                Failure::Safety { invariant, .. } => assert!(!invariant.is_empty()),
                Failure::Liveness { detail } => assert!(!detail.is_empty()),
                Failure::Crash { detail } => {
                    panic!("the canary must break an invariant, not the simulation: {detail}")
                }
            }
            return;
        }
    }
    panic!("the canary rule survived {BOUND} seeds: the checker proves nothing");
}
