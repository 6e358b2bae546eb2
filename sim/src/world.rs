//! One simulated run: builds the turmoil world from a [`Plan`], runs the marmot nodes (the
//! daemon's drive loop, core and SQLite adapter), the applications writing into their files
//! and the broker, injects the faults, checks the safety invariants while it runs, then heals
//! everything and checks that every node converges to the oracle's state.

use crate::broker::{BrokerConfig, BrokerState};
use crate::check::{Checker, batch_rows};
use crate::oracle::Oracle;
use crate::plan::{Fault, Plan};
use crate::transport::{SimObjectStore, SimTransport};
use crate::workload::Generator;
use futures::FutureExt;
use futures::future::BoxFuture;
use marmot_core::capture::Captured;
use marmot_core::drive::{self, Control, Observer};
use marmot_core::node::SnapshotPolicy;
use marmot_core::node::{Event, Node, NodeConfig, Stop};
use marmot_core::ports::{
    ApplyOutcome, CaptureOutcome, Env, ParkedRetry, Recovered, RestoreReport, Snapshots, Storage,
};
use marmot_core::snapshot::{
    self, Fetched, LocalSnapshot, SaveOutcome, SnapshotError, SnapshotFiles, SnapshotInfo,
    StagedSnapshot,
};
use marmot_core::wire::BatchId;
use marmot_core::{Clock, Version};
use marmot_sqlite::snapshot::SnapshotDir;
use marmot_sqlite::{SqliteStore, StoreConfig, StoreError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rusqlite::Connection;
use std::cell::RefCell;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

/// After the faults stop, every node must converge within this much simulated time.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(60);

/// How a run failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// An invariant was violated while running.
    Safety {
        /// Which invariant.
        invariant: &'static str,
        /// What was seen.
        detail: String,
    },
    /// The nodes did not converge to the expected state in time after the faults stopped.
    Liveness {
        /// What differed.
        detail: String,
    },
    /// The simulation itself broke (a host returned an error, a node stopped).
    Crash {
        /// What happened.
        detail: String,
    },
}

impl Failure {
    /// "safety", "liveness" or "crash".
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Safety { .. } => "safety",
            Failure::Liveness { .. } => "liveness",
            Failure::Crash { .. } => "crash",
        }
    }
}

/// What a successful run did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Hash of the run's trace (every event, in order, with its simulated time).
    pub trace_hash: u64,
    /// Events in the trace.
    pub trace_len: usize,
    /// The trace itself (for the determinism test).
    pub trace: Vec<String>,
    /// Simulated time until convergence.
    pub sim_time: Duration,
    /// Application transactions committed.
    pub transactions: usize,
    /// Batches captured.
    pub captures: usize,
}

/// A failed run, with everything needed to replay it.
#[derive(Clone, Debug)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// What failed.
    pub failure: Failure,
    /// Simulated time of the failure.
    pub at: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "simulation seed {} failed ({}) at {:?} of simulated time:",
            self.plan.seed,
            self.failure.kind(),
            self.at
        )?;
        match &self.failure {
            Failure::Safety { invariant, detail } => {
                writeln!(f, "  safety invariant violated: {invariant}\n  {detail}")?
            }
            Failure::Liveness { detail } => writeln!(f, "  liveness: {detail}")?,
            Failure::Crash { detail } => writeln!(f, "  {detail}")?,
        }
        writeln!(f, "  plan: {:#?}", self.plan)?;
        write!(
            f,
            "  replay: SIM_SEED={} cargo test -p sim --release -- --nocapture replay_one_seed",
            self.plan.seed
        )
    }
}

/// Storage faults of one node (see `Plan::storage_faults`): its own random draws, whether
/// the chaos phase still lasts, and whether a crash point fired (the world then crashes the
/// host, as a process dying there).
pub(crate) struct StorageFaultState {
    rng: std::sync::Mutex<ChaCha8Rng>,
    active: Arc<std::sync::atomic::AtomicBool>,
    crashed: std::sync::atomic::AtomicBool,
    crash_point: std::sync::Mutex<Option<&'static str>>,
}

impl StorageFaultState {
    fn draw(&self, p: f64) -> bool {
        p > 0.0
            && self.active.load(Ordering::Relaxed)
            && self
                .rng
                .lock()
                .expect("not poisoned")
                .random_bool(p.min(1.0))
    }
}

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
    /// Per node: its clock's skew since when, in order (the checker allows a node's stamps to
    /// lead true time as far as its own clock recently did, and no further).
    pub(crate) skew_history: Vec<Vec<(Duration, i64)>>,
    /// Per node: marmot set itself up in the database once (rows written before that are
    /// not published, a documented rule: V2 applications wait for it).
    pub(crate) set_up: Vec<bool>,
}

type World = Rc<RefCell<Shared>>;

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// Time for a simulated node: the host's simulated clock plus its own skew.
#[derive(Clone)]
struct SimEnv {
    start: tokio::time::Instant,
    skew: Arc<AtomicI64>,
}

impl Env for SimEnv {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
    fn wall_ms(&self) -> u64 {
        let wall = turmoil::since_epoch().map_or(0, |d| d.as_millis() as i64);
        (wall + self.skew.load(Ordering::Relaxed)).max(0) as u64
    }
    fn sleep_until(&self, deadline: Duration) -> BoxFuture<'static, ()> {
        tokio::time::sleep_until(self.start + deadline).boxed()
    }
}

/// The real SQLite store, with every capture reported to the oracle and checked.
struct Recorded {
    inner: SqliteStore,
    node: usize,
    world: World,
    faults: Option<Arc<StorageFaultState>>,
}

impl Recorded {
    /// A storage call fails before it does anything: the lock is held (SQLITE_BUSY) or the
    /// disk failed (SQLITE_IOERR), as a BUGGIFY would have it.
    fn injected(&self, call: &'static str) -> Result<(), StoreError> {
        let Some(f) = &self.faults else { return Ok(()) };
        let plan = self.world.borrow().plan.storage_faults.clone();
        let Some(p) = plan else { return Ok(()) };
        let code = if f.draw(p.busy) {
            rusqlite::ffi::SQLITE_BUSY
        } else if f.draw(p.io) {
            rusqlite::ffi::SQLITE_IOERR
        } else {
            return Ok(());
        };
        self.world.borrow_mut().trace.push(format!(
            "{:?} n{} injected {} into {call}",
            now(),
            self.node + 1,
            if code == rusqlite::ffi::SQLITE_BUSY {
                "SQLITE_BUSY"
            } else {
                "SQLITE_IOERR"
            }
        ));
        Err(StoreError::Sqlite {
            path: self.inner.path().to_path_buf(),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                Some(format!("injected into {call}")),
            ),
        })
    }

    fn note(&self, c: &Option<Captured>) {
        let Some(c) = c else { return };
        let mut w = self.world.borrow_mut();
        let n = self.node;
        if c.batch.seq != w.last_batch[n] + 1 {
            let detail = format!(
                "node {} captured batch {} after batch {}",
                n + 1,
                c.batch.seq,
                w.last_batch[n]
            );
            w.failures.push(Failure::Safety {
                invariant: "each node's capture sequence is gap-free and increasing",
                detail,
            });
        }
        w.last_batch[n] = c.batch.seq;
        let version = Version {
            stamp: c.stamp,
            node: n as u64 + 1,
        };
        match batch_rows(&c.messages) {
            Some((_, rows)) => {
                // No drag: a node's stamps lead true time by no more than its own clock did
                // lately (until its next check against the server) plus the bound, unless the
                // stamp is just above a version it replaces that is itself that far ahead.
                let floor = rows.iter().filter_map(|r| r.base).map(|b| b.stamp).max();
                let just_above = floor.is_some_and(|f| c.stamp.as_u64() == f.as_u64() + 1);
                let true_ms = turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64);
                let window = w.plan.claim_interval + Duration::from_secs(1);
                let t = now();
                let history = &w.skew_history[n];
                let at_start = history
                    .iter()
                    .rev()
                    .find(|(since, _)| *since <= t.saturating_sub(window))
                    .map_or(0, |(_, s)| *s);
                let lead = history
                    .iter()
                    .filter(|(since, _)| *since > t.saturating_sub(window))
                    .map(|(_, s)| *s)
                    .fold(at_start, i64::max)
                    .max(0) as u64;
                let allowed = true_ms + lead + 5_000 + 1_000;
                if c.stamp.wall_ms() > allowed && !just_above {
                    let detail = format!(
                        "node {} stamped {} at true time {true_ms} ms, {} ms ahead; its own clock led by at most {lead} ms lately",
                        n + 1,
                        c.stamp,
                        c.stamp.wall_ms() - true_ms
                    );
                    w.failures.push(Failure::Safety {
                        invariant: "a node's stamps lead true time no further than its own clock does (no node drags another's clock)",
                        detail,
                    });
                }
                for r in rows {
                    if let Some(base) = r.base
                        && base >= version
                    {
                        let detail = format!(
                            "node {} stamped {} over {} on {} {}",
                            n + 1,
                            version,
                            base,
                            r.table,
                            r.key
                        );
                        w.failures.push(Failure::Safety {
                            invariant: "a local write's stamp is above the stamp of the version it replaced",
                            detail,
                        });
                    }
                }
            }
            None => w.failures.push(Failure::Safety {
                invariant: "captured batches decode",
                detail: format!("node {} batch {}", n + 1, c.batch),
            }),
        }
        w.oracle.captured(n, version);
        // The capture followed the schema first: triggers are back.
        w.blind[n] = false;
        let t = format!(
            "{:?} n{} captured {} rows={} v={}",
            now(),
            n + 1,
            c.batch,
            c.rows,
            version
        );
        w.trace.push(t);
    }
}

impl Recorded {
    /// After an operation failed: if the node died right after a commit, the batch it
    /// captured is in its outbox although the operation never said so; learn it from there
    /// (as the restarted node will).
    fn after(&self, r: &Result<impl Sized, StoreError>) {
        if !matches!(
            r,
            Err(StoreError::Crashed {
                point: "after commit"
            })
        ) {
            return;
        }
        let last = self.world.borrow().last_batch[self.node];
        let Ok(c) = Connection::open_with_flags(
            self.inner.path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        ) else {
            return;
        };
        let rows: Vec<(i64, i64, Vec<u8>)> = c
            .prepare("SELECT incarnation, seq, payload FROM \"__marmot__outbox\" WHERE seq > ?1 ORDER BY seq, chunk")
            .and_then(|mut s| {
                s.query_map([last as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .unwrap_or_default();
        let mut batches: std::collections::BTreeMap<(i64, i64), Vec<bytes::Bytes>> =
            std::collections::BTreeMap::new();
        for (inc, seq, payload) in rows {
            batches
                .entry((seq, inc))
                .or_default()
                .push(bytes::Bytes::from(payload));
        }
        for ((seq, inc), messages) in batches {
            let Some((header, rows)) = batch_rows(&messages) else {
                continue;
            };
            self.note(&Some(Captured {
                batch: BatchId {
                    origin: self.node as u64 + 1,
                    incarnation: inc as u64,
                    seq: seq as u64,
                },
                stamp: header.stamp,
                rows: rows.len() as u64,
                messages,
            }));
        }
    }
}

impl Storage for Recorded {
    type Error = StoreError;
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        self.inner.recover()
    }
    fn capture(&mut self, clock: &mut Clock, wall_ms: u64) -> Result<CaptureOutcome, StoreError> {
        self.injected("capture")?;
        let r = self.inner.capture(clock, wall_ms);
        if let Ok(o) = &r {
            self.note(&o.captured);
        }
        self.after(&r);
        r
    }
    fn apply(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        ds: &[marmot_core::apply::Delivery],
    ) -> Result<ApplyOutcome, StoreError> {
        self.injected("apply")?;
        let r = self.inner.apply(clock, wall_ms, ds);
        if let Ok(o) = &r {
            self.note(&o.captured);
        }
        self.after(&r);
        r
    }
    fn mark_published(&mut self, batch: BatchId) -> Result<(), StoreError> {
        self.injected("mark published")?;
        self.inner.mark_published(batch)
    }
    fn outbox_message(
        &mut self,
        batch: BatchId,
        chunk: u32,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        self.injected("outbox message")?;
        self.inner.outbox_message(batch, chunk)
    }
    fn retry_parked(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        all: bool,
    ) -> Result<ParkedRetry, StoreError> {
        self.injected("retry parked")?;
        let r = self.inner.retry_parked(clock, wall_ms, all);
        if let Ok(o) = &r {
            self.note(&o.captured);
        }
        self.after(&r);
        r
    }
    fn restore(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snap: &StagedSnapshot,
    ) -> Result<RestoreReport, StoreError> {
        if let Err(e) = self.injected("restore") {
            SnapshotDir::discard(&snap.path);
            return Err(e);
        }
        let r = self.inner.restore(clock, wall_ms, snap);
        self.after(&r);
        if let Ok(o) = &r {
            self.note(&o.captured);
            let t = format!(
                "{:?} n{} restored generation {} (merged: {})",
                now(),
                self.node + 1,
                o.generation,
                o.merged
            );
            self.world.borrow_mut().trace.push(t);
        }
        SnapshotDir::discard(&snap.path);
        r
    }
}

/// The local half of simulated snapshots: the real SQLite snapshot files, run inline.
struct SimFiles {
    dir: SnapshotDir,
}

#[async_trait::async_trait]
impl SnapshotFiles for SimFiles {
    async fn create(&self) -> Result<LocalSnapshot, SnapshotError> {
        self.dir
            .create(turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64))
    }
    fn download_path(&self, object: &str) -> PathBuf {
        self.dir.download_path(object)
    }
    async fn stage(
        &self,
        downloaded: &std::path::Path,
        info: &SnapshotInfo,
    ) -> Result<StagedSnapshot, SnapshotError> {
        self.dir.stage(downloaded, info)
    }
    fn discard(&self, path: &std::path::Path) {
        SnapshotDir::discard(path);
    }
}

/// Snapshots of a simulated node, through the broker's object store and lease.
struct SimSnapshots {
    store: SimObjectStore,
    transport: SimTransport,
    files: SimFiles,
    node: u64,
    owner: String,
    every: (u64, Duration),
}

#[async_trait::async_trait]
impl Snapshots for SimSnapshots {
    async fn save(&self, position: u64, force: bool) -> Result<SaveOutcome, SnapshotError> {
        let now_ms = turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64);
        let (min_changes, min_age) = if force {
            (0, 0)
        } else {
            (self.every.0 / 2, self.every.1.as_millis() as u64 / 2)
        };
        let params = snapshot::SaveParams {
            node: self.node,
            owner: &self.owner,
            position,
            now_ms,
            min_changes,
            min_age_ms: min_age,
            keep: 2,
        };
        let pause = |d: Duration| -> BoxFuture<'static, ()> { tokio::time::sleep(d).boxed() };
        snapshot::save(
            &self.store,
            &self.transport,
            &self.files,
            &params,
            &pause,
            &|_| {},
        )
        .await
    }
    async fn fetch(&self, min_position: u64) -> Result<Fetched, SnapshotError> {
        snapshot::fetch_to_restore(
            &self.store,
            &self.transport,
            &self.owner,
            &self.files,
            &|_| {},
            min_position,
        )
        .await
    }
}

struct SimObserver {
    world: World,
    node: usize,
}

impl Observer for SimObserver {
    fn event(&mut self, _now: Duration, e: &Event) {
        let mut w = self.world.borrow_mut();
        // A batch waiting on a UNIQUE value is parked for a while (the row in its way moves
        // with a later batch of the same node that reached the stream first); the checker
        // requires that nothing is parked any more once the nodes converged.
        if let Event::Parked { reason, .. } = e {
            w.failures.push(Failure::Safety {
                invariant: "nothing is parked (the simulated schema is the same everywhere)",
                detail: format!("node {}: {reason}", self.node + 1),
            });
        }
        // Errors name the database file, which lives in a directory with a random name: the
        // trace names it the same way in every run of a seed.
        let t = format!("{:?} n{} {}", now(), self.node + 1, trace_event(e));
        let t = match w.dbs.first().and_then(|d| d.parent()) {
            Some(dir) => t.replace(&*dir.to_string_lossy(), "$RUN_DIR"),
            None => t,
        };
        w.trace.push(t);
    }

    fn timer(&mut self, _now: Duration, timer: marmot_core::node::Timer) {
        // Kept out of the trace's hash (see `fnv`): why a node woke is not behaviour.
        let t = format!("{:?} n{} {TIMER} {timer:?}", now(), self.node + 1);
        self.world.borrow_mut().trace.push(t);
    }
}

async fn node_host(world: World, i: usize) -> turmoil::Result {
    let (path, plan, skew, start) = {
        let mut w = world.borrow_mut();
        w.starts[i] += 1;
        (
            w.dbs[i].clone(),
            w.plan.clone(),
            w.skew[i].clone(),
            w.starts[i],
        )
    };
    let nonce = plan.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((i as u64) << 40) ^ start;
    let mut cfg = StoreConfig::new(&path, i as u64 + 1, nonce);
    cfg.max_fragment = plan.max_fragment;
    // SQLite's busy handler sleeps in real time, and here the application that holds the
    // lock runs on this same thread: marmot gets SQLITE_BUSY at once and retries later.
    let busy = match plan.generator {
        Generator::V1 => Duration::from_millis(50),
        Generator::V2 => Duration::ZERO,
    };
    cfg.busy_timeout = busy;
    let faults = world.borrow().storage_faults[i].clone();
    let crash_point: Option<marmot_sqlite::CrashPoint> = match (&faults, &plan.storage_faults) {
        (Some(f), Some(p)) => {
            let f = f.clone();
            let rate = p.crash;
            Some(Arc::new(move |point: &'static str| {
                if f.crashed.load(Ordering::Relaxed) || !f.draw(rate) {
                    return false;
                }
                f.crashed.store(true, Ordering::Relaxed);
                *f.crash_point.lock().expect("not poisoned") = Some(point);
                true
            }))
        }
        _ => None,
    };
    cfg.crash_point = crash_point.clone();
    // An application may hold the write lock while the node starts: wait, as the daemon does.
    let inner = loop {
        match SqliteStore::open(cfg.clone()) {
            Ok(s) => break s,
            Err(e) if e.is_busy() => tokio::time::sleep(Duration::from_millis(20)).await,
            // Died inside opening: the world crashes this host at once.
            Err(StoreError::Crashed { .. }) => futures::future::pending::<()>().await,
            Err(e) => return Err(e.to_string().into()),
        }
    };
    world.borrow_mut().set_up[i] = true;
    let mut store = Recorded {
        inner,
        node: i,
        world: world.clone(),
        faults,
    };
    let (tx, rx) = futures::channel::mpsc::channel(1);
    world.borrow_mut().wake[i] = Some(tx);
    let mut wake: Pin<Box<dyn futures::Stream<Item = ()> + Send>> = Box::pin(rx);
    let mut control: Pin<Box<dyn futures::Stream<Item = Control> + Send>> =
        Box::pin(futures::stream::pending());
    let env = SimEnv {
        start: tokio::time::Instant::now(),
        skew,
    };
    let owner = format!("sim-db-{}", i + 1);
    let mut cfg = NodeConfig::new(i as u64 + 1, owner.clone());
    cfg.claim_interval = plan.claim_interval;
    cfg.alarm_interval = Duration::from_secs(2);
    cfg.fit_to_retention(plan.max_messages as u64);
    cfg.snapshots = plan
        .snapshot_every
        .map(|(every_changes, interval)| SnapshotPolicy {
            every_changes,
            interval: Some(interval),
            restore_empty: true,
        });
    let snapshots = Arc::new(SimSnapshots {
        store: SimObjectStore::new("broker")
            .with_slow_uploads(plan.slow_upload, world.borrow().chaos_active.clone()),
        transport: SimTransport::new("broker"),
        files: SimFiles {
            dir: SnapshotDir::new(&path, plan.tombstone_ttl)
                .with_busy_timeout(busy)
                .with_crash_point(crash_point),
        },
        node: i as u64 + 1,
        owner,
        every: plan
            .snapshot_every
            .unwrap_or((0, Duration::from_secs(3600))),
    });
    let mut node = Node::new(cfg);
    let mut obs = SimObserver {
        world: world.clone(),
        node: i,
    };
    let transport = Arc::new(SimTransport::new("broker").with_slow_claims(plan.slow_claims));
    let stop = drive::run(
        &mut node,
        &mut store,
        transport,
        snapshots,
        &env,
        &mut obs,
        wake.as_mut(),
        control.as_mut(),
    )
    .await;
    // Nothing asks a simulated node to stop: any stop is a failure.
    let stop: Stop = stop;
    world.borrow_mut().failures.push(Failure::Crash {
        detail: format!("node {} stopped: {stop:?}", i + 1),
    });
    Ok(())
}

async fn writer(world: World, i: usize) -> turmoil::Result {
    let (path, plan) = {
        let w = world.borrow();
        (w.dbs[i].clone(), w.plan.clone())
    };
    let conn = Connection::open(&path)?;
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed.wrapping_mul(31).wrapping_add(i as u64));
    let mut txn = 0;
    if let Some((late, at)) = plan.late_join
        && late == i
    {
        // The application of a node that joins late starts with it.
        tokio::time::sleep(at).await;
    }
    loop {
        let gap = plan.write_gap.as_millis() as u64;
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..=2 * gap))).await;
        if now() >= plan.chaos {
            break;
        }
        // Rows written before marmot first set itself up in the database are not published
        // (start every node from the same copy, the README says): the application starts
        // once its node did (a crash point can kill the very first start).
        if plan.generator == Generator::V2 && !world.borrow().set_up[i] {
            continue;
        }
        let effects = match plan.generator {
            Generator::V1 => {
                crate::workload::v1_transaction(&conn, &mut rng, i, txn, plan.hot_share)
                    .map_err(|e| format!("writer {}: {e}", i + 1))?
            }
            Generator::V2 => {
                // Now and then the application holds the write lock across a pause: marmot
                // meets SQLITE_BUSY in capture, apply, restores and snapshots meanwhile.
                let hold = plan.lock_holds && rng.random_bool(0.15);
                conn.execute_batch(if hold { "BEGIN IMMEDIATE" } else { "BEGIN" })?;
                let blind = world.borrow().blind[i];
                let (effects, rebuilt) = match crate::workload::v2_operations(
                    &conn,
                    &mut rng,
                    i,
                    txn,
                    plan.hot_share,
                    plan.rebuild_share,
                    blind,
                ) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = conn.execute_batch("ROLLBACK");
                        return Err(format!("writer {}: {e}", i + 1).into());
                    }
                };
                if hold {
                    let pause = Duration::from_millis(rng.random_range(10..=400));
                    world.borrow_mut().trace.push(format!(
                        "{:?} app{} holds the write lock for {pause:?}",
                        now(),
                        i + 1
                    ));
                    tokio::time::sleep(pause).await;
                }
                conn.execute_batch("COMMIT")
                    .map_err(|e| format!("writer {}: {e}", i + 1))?;
                if rebuilt {
                    world.borrow_mut().blind[i] = true;
                }
                effects
            }
        };
        txn += 1;
        let mut w = world.borrow_mut();
        let t = format!(
            "{:?} app{} txn {} effects {}",
            now(),
            i + 1,
            txn,
            effects.len()
        );
        w.trace.push(t);
        // A transaction that changed no row fires no trigger: there is nothing to capture.
        if !effects.is_empty() {
            w.oracle.wrote(i, effects);
        }
        if let Some(tx) = w.wake[i].as_mut() {
            let _ = tx.try_send(());
        }
    }
    world.borrow_mut().writers_done += 1;
    Ok(())
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

/// [`run_seed`] with the real-time watchdog set to `limit`.
pub fn run_seed_watched(seed: u64, canary: bool, limit: Duration) -> Result<Outcome, Box<Report>> {
    run_plan_watched(Plan::from_seed(seed), canary, limit)
}

/// Runs a given plan (a pinned regression keeps the generator it was found with) under the
/// real-time watchdog `limit`.
pub fn run_plan_watched(plan: Plan, canary: bool, limit: Duration) -> Result<Outcome, Box<Report>> {
    let seed = plan.seed;
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
                 replay: SIM_SEED={seed} cargo test -p sim --release -- --nocapture replay_one_seed"
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
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("temporary directory");
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

/// The trace line of an event: its `Debug` form, but `StorageFailed` keeps the shape it had
/// before storage errors were typed (operation name and message), so that the trace hashes
/// of earlier builds stay comparable.
fn trace_event(e: &Event) -> String {
    match e {
        Event::StorageFailed { error, retry_in } => format!(
            "StorageFailed {{ operation: {:?}, error: {:?}, retry_in: {retry_in:?} }}",
            error.operation.name(),
            error.message
        ),
        e => format!("{e:?}"),
    }
}

/// Marks a trace line that says which timer woke a node.
const TIMER: &str = "timer";

/// The trace's hash: every line but those naming the timer that woke a node (a refactoring
/// of the node's timers must reproduce the hashes of earlier builds; see `SIM_TRACE_HASHES`).
fn fnv(trace: &[String]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for line in trace.iter().filter(|l| l.split(' ').nth(2) != Some(TIMER)) {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}
