//! A simulated node's host: its time (the simulation's clock plus a skew), its snapshots
//! through the broker, the observer that traces its events, and the task that runs the
//! daemon's drive loop over the real SQLite adapter, restarting after crashes.

use crate::transport::{SimObjectStore, SimTransport};
use crate::workload::Generator;
use futures::FutureExt;
use futures::future::BoxFuture;
use marmot_core::drive::{self, Control, Observer};
use marmot_core::node::SnapshotPolicy;
use marmot_core::node::{Event, Node, NodeConfig, Stop};
use marmot_core::ports::{Env, Snapshots};
use marmot_core::snapshot::{
    self, Fetched, LocalSnapshot, SaveKind, SaveOutcome, SnapshotError, SnapshotFiles,
    SnapshotInfo, StagedSnapshot,
};
use marmot_sqlite::snapshot::SnapshotDir;
use marmot_sqlite::{SqliteStore, StoreConfig, StoreError};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::recorded::Recorded;
use crate::report::{Failure, TIMER, trace_event};
use crate::world::{World, now};

/// Time for a simulated node: the host's simulated clock plus its own skew.
#[derive(Clone)]
pub(crate) struct SimEnv {
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

/// The local half of simulated snapshots: the real SQLite snapshot files, run inline.
pub(crate) struct SimFiles {
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
pub(crate) struct SimSnapshots {
    store: SimObjectStore,
    transport: SimTransport,
    files: SimFiles,
    node: u64,
    owner: String,
    every: (u64, Duration),
}

#[async_trait::async_trait]
impl Snapshots for SimSnapshots {
    async fn save(&self, position: u64, kind: SaveKind) -> Result<SaveOutcome, SnapshotError> {
        let now_ms = turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64);
        let (min_changes, min_age) = if kind != SaveKind::Due {
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
            first_only: kind == SaveKind::Seed,
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

pub(crate) struct SimObserver {
    world: World,
    node: usize,
}

impl Observer for SimObserver {
    fn event(&mut self, _now: Duration, e: &Event) {
        let mut w = self.world.borrow_mut();
        // A batch waiting on a UNIQUE value is parked for a while (the row in its way moves
        // with a later batch of the same node that reached the stream first); the checker
        // requires that nothing is parked any more once the nodes converged.
        // With schema changes (V3), batches of one node can reach the stream out of capture
        // order (a publish retried after a later one went through): rows that need a table
        // or column whose change is in a batch still to come park, and are retried after
        // every schema change. Those parks are allowed (the end state must have none).
        let waits_for_schema = w.plan.generator.changes_schema()
            && matches!(e, Event::Parked { reason, .. }
                if reason.contains("unknown table") || reason.contains("unknown column"));
        if let Event::Parked { reason, .. } = e
            && !waits_for_schema
        {
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

pub(crate) async fn node_host(world: World, i: usize) -> turmoil::Result {
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
        Generator::V2 | Generator::V3 | Generator::V4 | Generator::V5 => Duration::ZERO,
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
    cfg.max_publish_hold = (!plan.tombstone_ttl.is_zero()).then_some(plan.tombstone_ttl / 2);
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
