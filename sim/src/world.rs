//! One simulated run: builds the turmoil world from a [`Plan`], runs the marmot nodes (the
//! daemon's drive loop, core and SQLite adapter), the applications writing into their files
//! and the broker, injects the faults, checks the safety invariants while it runs, then heals
//! everything and checks that every node converges to the oracle's state.

use crate::broker::{BrokerConfig, BrokerState};
use crate::check::Checker;
use crate::oracle::Oracle;
use crate::plan::{Fault, Plan};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rusqlite::Connection;
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use crate::app::writer;
use crate::host::node_host;
use crate::recorded::StorageFaultState;
use crate::report::{Failure, LIVENESS_BOUND, Outcome, Report, fnv};
pub(crate) struct Shared {
    pub(crate) plan: Plan,
    pub(crate) dbs: Vec<PathBuf>,
    pub(crate) oracle: Oracle,
    pub(crate) last_batch: Vec<u64>,
    pub(crate) starts: Vec<u64>,
    pub(crate) wake: Vec<Option<futures::channel::mpsc::Sender<()>>>,
    pub(crate) skew: Vec<Arc<AtomicI64>>,
    pub(crate) trace: Vec<String>,
    pub(crate) failures: Vec<Failure>,
    pub(crate) writers_done: usize,
    /// Per node, the state of its storage faults (V2 plans with storage faults).
    pub(crate) storage_faults: Vec<Option<Arc<StorageFaultState>>>,
    /// Storage faults and slow uploads stop when the faults heal.
    pub(crate) chaos_active: Arc<std::sync::atomic::AtomicBool>,
    /// Per node: table `t` was rebuilt and the node has not captured since (see
    /// `workload::v2_operations`).
    pub(crate) blind: Vec<bool>,
    /// The stamps of every captured batch that carried a schema change.
    pub(crate) schema_stamps: std::collections::BTreeSet<u64>,
    /// Per node: its clock's skew since when, in order (the checker allows a node's stamps to
    /// lead true time as far as its own clock recently did, and no further).
    pub(crate) skew_history: Vec<Vec<(Duration, i64)>>,
    /// Per node: marmot set itself up in the database once (rows written before that are
    /// not published, a documented rule: V2 applications wait for it).
    pub(crate) set_up: Vec<bool>,
}

pub(crate) type World = Rc<RefCell<Shared>>;

pub(crate) fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

fn host_name(i: usize) -> String {
    format!("node{}", i + 1)
}

enum Heal {
    Repair(usize),
    Release(usize),
    Bounce(usize),
    BounceBroker,
}

/// Runs one seed with the current generator. `canary` switches the merge rule to "last
/// arrival wins" (the checker must catch it).
pub fn run_seed(seed: u64, canary: bool) -> Result<Outcome, Box<Report>> {
    let limit = Duration::from_secs(
        std::env::var("SIM_WATCHDOG_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    run_plan_watched(Plan::from_seed(seed), canary, limit)
}

/// [`run_seed`] with the schema canary: schema changes apply in arrival order, whatever their
/// version (the checker must catch it).
pub fn run_seed_with_schema_canary(seed: u64) -> Result<Outcome, Box<Report>> {
    marmot_core::merge::canary::set_schema_last_arrival_wins(true);
    let r = run_seed(seed, false);
    marmot_core::merge::canary::set_schema_last_arrival_wins(false);
    r
}

/// [`run_seed`] with the real-time watchdog set to `limit`.
pub fn run_seed_watched(seed: u64, canary: bool, limit: Duration) -> Result<Outcome, Box<Report>> {
    run_plan_watched(Plan::from_seed(seed), canary, limit)
}

/// Runs a given plan (a pinned regression keeps the generator it was found with) under the
/// real-time watchdog `limit`.
pub fn run_plan_watched(plan: Plan, canary: bool, limit: Duration) -> Result<Outcome, Box<Report>> {
    let seed = plan.seed;
    let generator = plan.generator.env_prefix();
    // A host that never yields stops simulated time and hangs the run inside turmoil, where
    // no check can see it: a watchdog turns that into a loud failure naming the seed.
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(limit) {
            // Straight to the process's stderr: the test harness would swallow a captured
            // message when the process aborts.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "simulation seed {seed} failed (hang): no progress for {limit:?} of real time; a simulated host never yields\n  \
                 replay: {generator}SIM_SEED={seed} cargo test -p sim --release -- --nocapture replay_one_seed"
            );
            std::process::abort();
        }
    });
    let result = run_plan_guarded(plan, canary);
    let _ = done.send(());
    let _ = watchdog.join();
    result
}

fn run_plan_guarded(plan: Plan, canary: bool) -> Result<Outcome, Box<Report>> {
    // A panic anywhere in the run (marmot's code or the simulator's) is a failure of this
    // seed, reported with its plan like any other.
    let kept = plan.clone();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_plan_inner(plan, canary)
    })) {
        Ok(r) => r,
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(Box::new(Report {
                plan: kept,
                failure: Failure::Crash {
                    detail: format!("panicked: {detail}"),
                },
                at: Duration::ZERO,
            }))
        }
    }
}

fn run_plan_inner(plan: Plan, canary: bool) -> Result<Outcome, Box<Report>> {
    marmot_core::merge::canary::set_last_arrival_wins(canary);
    let seed = plan.seed;
    let shm = std::path::Path::new("/dev/shm");
    let mut dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("temporary directory");
    // `SIM_KEEP_DIR=1` keeps the nodes' databases for a look after a replay.
    if std::env::var_os("SIM_KEEP_DIR").is_some() {
        dir.disable_cleanup(true);
        eprintln!(
            "SIM_KEEP_DIR: the databases stay in {}",
            dir.path().display()
        );
    }
    let dbs: Vec<PathBuf> = (0..plan.nodes)
        .map(|i| dir.path().join(format!("node{}.db", i + 1)))
        .collect();
    for db in &dbs {
        let c = Connection::open(db).expect("create database");
        c.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; {}",
            plan.generator.schema()
        ))
        .expect("schema");
    }
    let chaos_active = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let storage_faults = (0..plan.nodes)
        .map(|i| {
            plan.storage_faults.as_ref().map(|_| {
                Arc::new(StorageFaultState {
                    rng: std::sync::Mutex::new(ChaCha8Rng::seed_from_u64(
                        seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i as u64,
                    )),
                    active: chaos_active.clone(),
                    crashed: std::sync::atomic::AtomicBool::new(false),
                    crash_point: std::sync::Mutex::new(None),
                })
            })
        })
        .collect();
    let world: World = Rc::new(RefCell::new(Shared {
        plan: plan.clone(),
        dbs: dbs.clone(),
        oracle: Oracle::new(plan.nodes),
        last_batch: vec![0; plan.nodes],
        starts: vec![0; plan.nodes],
        wake: (0..plan.nodes).map(|_| None).collect(),
        skew: plan
            .skews
            .iter()
            .map(|s| Arc::new(AtomicI64::new(*s)))
            .collect(),
        trace: Vec::new(),
        failures: Vec::new(),
        writers_done: 0,
        storage_faults,
        chaos_active: chaos_active.clone(),
        blind: vec![false; plan.nodes],
        schema_stamps: std::collections::BTreeSet::new(),
        set_up: vec![false; plan.nodes],
        skew_history: plan
            .skews
            .iter()
            .map(|s| vec![(Duration::ZERO, *s)])
            .collect(),
    }));
    let broker = BrokerState::new(
        BrokerConfig {
            max_messages: plan.max_messages,
            dedupe_window: plan.dedupe_window,
            claim_ttl: Duration::from_secs(15),
            duplicate_rate: plan.duplicate_rate,
        },
        seed,
    );
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_780_000_000))
        .simulation_duration(plan.chaos + LIVENESS_BOUND + Duration::from_secs(60))
        .tick_duration(Duration::from_millis(1))
        // Every simulated request opens a connection; a held link releases them in bursts.
        .tcp_capacity(1 << 16)
        .min_message_latency(plan.latency.0)
        .max_message_latency(plan.latency.1)
        .build();
    {
        let b = broker.clone();
        sim.host("broker", move || crate::broker::serve(b.clone()));
    }
    for i in 0..plan.nodes {
        let w = world.clone();
        sim.host(host_name(i), move || node_host(w.clone(), i));
        sim.client(format!("app{}", i + 1), writer(world.clone(), i));
    }
    let fail = |failure: Failure, at: Duration| {
        if std::env::var_os("SIM_TRACE").is_some() {
            for line in &world.borrow().trace {
                eprintln!("{line}");
            }
        }
        Box::new(Report {
            plan: plan.clone(),
            failure,
            at,
        })
    };
    let mut checker = Checker::new(plan.nodes, dbs.clone(), plan.generator);
    let mut faults = plan.faults.clone().into_iter().peekable();
    let mut heals: Vec<(Duration, Heal)> = Vec::new();
    let mut crashed = vec![false; plan.nodes];
    if let Some((late, at)) = plan.late_join {
        // Not started yet: it starts at `at`, with its empty database.
        crashed[late] = true;
        sim.crash(host_name(late));
        heals.push((at, Heal::Bounce(late)));
    }
    let mut healed = false;
    let mut next_check = Duration::ZERO;
    let mut crash_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc2a5_4000_0000_0001);
    loop {
        let step = sim.step();
        let now = sim.elapsed();
        if let Err(e) = step {
            return Err(fail(
                Failure::Crash {
                    detail: format!("a host failed: {e}"),
                },
                now,
            ));
        }
        // (Not in the `if let`: `fail` reads the trace, and the borrow would still be held.)
        let failed = world.borrow_mut().failures.pop();
        if let Some(f) = failed {
            return Err(fail(f, now));
        }
        while !healed && faults.peek().is_some_and(|(at, _)| *at <= now) {
            let (_, f) = faults.next().expect("peeked");
            world
                .borrow_mut()
                .trace
                .push(format!("{now:?} fault {f:?}"));
            match f {
                Fault::Partition {
                    node,
                    one_way,
                    for_,
                } => {
                    if one_way {
                        sim.partition_oneway(host_name(node), "broker");
                    } else {
                        sim.partition(host_name(node), "broker");
                    }
                    heals.push((now + for_, Heal::Repair(node)));
                }
                Fault::Hold { node, for_ } => {
                    sim.hold(host_name(node), "broker");
                    heals.push((now + for_, Heal::Release(node)));
                }
                Fault::Crash { node, for_ } => {
                    if !crashed[node] {
                        crashed[node] = true;
                        world.borrow_mut().wake[node] = None;
                        sim.crash(host_name(node));
                        heals.push((now + for_, Heal::Bounce(node)));
                    }
                }
                Fault::BrokerRestart { for_ } => {
                    sim.crash("broker");
                    heals.push((now + for_, Heal::BounceBroker));
                }
                Fault::CorruptSnapshot => {
                    let hit = broker.borrow_mut().corrupt_newest_snapshot();
                    world
                        .borrow_mut()
                        .trace
                        .push(format!("{now:?} corrupted {hit:?}"));
                }
                Fault::ClockJump { node, delta_ms } => {
                    let mut w = world.borrow_mut();
                    let s = w.skew[node].fetch_add(delta_ms, Ordering::Relaxed) + delta_ms;
                    w.skew_history[node].push((now, s));
                }
            }
        }
        // A crash point inside a node's storage fired: that process dies right there.
        #[allow(clippy::needless_range_loop)] // several per-node tables, indexed alike
        for i in 0..plan.nodes {
            let Some(f) = world.borrow().storage_faults[i].clone() else {
                continue;
            };
            if !f.crashed.load(Ordering::Relaxed) {
                continue;
            }
            f.crashed.store(false, Ordering::Relaxed);
            let point = f.crash_point.lock().expect("not poisoned").take();
            if crashed[i] {
                continue;
            }
            crashed[i] = true;
            world.borrow_mut().wake[i] = None;
            world.borrow_mut().trace.push(format!(
                "{now:?} n{} died inside a storage operation ({})",
                i + 1,
                point.unwrap_or("?")
            ));
            sim.crash(host_name(i));
            let back = Duration::from_millis(crash_rng.random_range(50..=1_500));
            heals.push((now + back, Heal::Bounce(i)));
        }
        let due: Vec<Heal> = {
            let (due, later): (Vec<_>, Vec<_>) =
                heals.drain(..).partition(|(at, _)| *at <= now || healed);
            heals = later;
            due.into_iter().map(|(_, h)| h).collect()
        };
        for h in due {
            heal(&mut sim, h, &mut crashed);
        }
        if !healed && now >= plan.chaos {
            healed = true;
            chaos_active.store(false, Ordering::Relaxed);
            world
                .borrow_mut()
                .trace
                .push(format!("{now:?} heal everything"));
            for (_, h) in heals.drain(..) {
                heal(&mut sim, h, &mut crashed);
            }
            for i in 0..plan.nodes {
                sim.repair(host_name(i), "broker");
                sim.release(host_name(i), "broker");
                let mut w = world.borrow_mut();
                let s = w.skew[i].load(Ordering::Relaxed).clamp(-1_000, 1_000);
                w.skew[i].store(s, Ordering::Relaxed);
                w.skew_history[i].push((now, s));
            }
        }
        if now >= next_check {
            next_check = now + Duration::from_millis(100);
            if let Err(f) = checker.check(&broker.borrow().published, &world.borrow().oracle) {
                return Err(fail(f, now));
            }
            if healed && world.borrow().writers_done == plan.nodes {
                let w = world.borrow();
                if let Some(done) = checker.converged(&w.oracle) {
                    if let Err(f) = checker.full_text_indexes() {
                        drop(w);
                        return Err(fail(f, now));
                    }
                    return Ok(Outcome {
                        trace_hash: fnv(&w.trace),
                        trace_len: w.trace.len(),
                        trace: w.trace.clone(),
                        sim_time: now,
                        transactions: w.oracle.writes.iter().map(Vec::len).sum(),
                        captures: done,
                    });
                }
            }
            if now > plan.chaos + LIVENESS_BOUND {
                let detail = checker.difference(&world.borrow().oracle);
                return Err(fail(Failure::Liveness { detail }, now));
            }
        }
    }
}

fn heal(sim: &mut turmoil::Sim<'_>, h: Heal, crashed: &mut [bool]) {
    match h {
        Heal::Repair(n) => sim.repair(host_name(n), "broker"),
        Heal::Release(n) => sim.release(host_name(n), "broker"),
        Heal::Bounce(n) => {
            if crashed[n] {
                crashed[n] = false;
                sim.bounce(host_name(n));
            }
        }
        Heal::BounceBroker => sim.bounce("broker"),
    }
}
