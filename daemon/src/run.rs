//! `marmot run`: wires the store, the transport (and the supervised nats-server), the file
//! watch, signals and the metrics endpoint around the shared drive loop.

use crate::cli::Cli;
use crate::config::Settings;
use crate::observe::{DaemonObserver, Shared};
use crate::supervisor::{ServerSpec, Supervised};
use anyhow::Context;
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, Stream};
use marmot_core::drive::{self, Control};
use marmot_core::node::{Node, NodeConfig, Stop};
use marmot_core::ports::Env;
use marmot_nats::{NatsConfig, NatsTransport};
use marmot_sqlite::{SqliteStore, StoreConfig};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time and blocking work for the daemon: tokio's clock, the system wall clock, and storage
/// calls run with `block_in_place` so the runtime's other worker keeps NATS I/O moving.
#[derive(Clone)]
pub struct TokioEnv {
    start: tokio::time::Instant,
}

impl Env for TokioEnv {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
    fn sleep_until(&self, deadline: Duration) -> BoxFuture<'static, ()> {
        tokio::time::sleep_until(self.start + deadline).boxed()
    }
    fn blocking<R>(&self, f: impl FnOnce() -> R) -> R {
        tokio::task::block_in_place(f)
    }
}

fn hostname() -> String {
    marmot_daemon::platform::host_name()
}

/// The token a node claims its id with: the database's identity, the host and the file.
pub(crate) fn owner_token(db_owner: &str, db: &std::path::Path) -> String {
    let canonical = std::fs::canonicalize(db).unwrap_or(db.to_path_buf());
    format!("{db_owner}@{}:{}", hostname(), canonical.display())
}

pub(crate) fn data_dir_for(db: &std::path::Path) -> PathBuf {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "marmot".into());
    db.with_file_name(format!("{name}-marmot-nats"))
}

/// How marmot (and its commands) log in to the server it supervises: with the NKey whose
/// seed it keeps beside the database.
pub(crate) fn supervised_auth(seed_file: &Path) -> marmot_nats::Auth {
    marmot_nats::Auth {
        nkey_seed_file: Some(seed_file.to_path_buf()),
        ..Default::default()
    }
}

/// Runs the daemon until a signal (exit 0) or a fatal condition (exit 1).
pub fn run(s: Settings, cli: &Cli) -> anyhow::Result<ExitCode> {
    for w in &s.warnings {
        tracing::warn!("{w}");
    }
    // One daemon per database; commands that must not run beside it check this lock.
    let _lock = crate::lock::DaemonLock::acquire(&s.db_path)?;
    let db = s.db_path.clone();
    if !db.exists() {
        tracing::warn!(db = %db.display(), "the database does not exist: creating an empty one");
    }
    let store_cfg = store_config(&s);
    // An application may hold the write lock for a while: wait for it rather than fail.
    let store = loop {
        match SqliteStore::open(store_cfg.clone()) {
            Ok(s) => break s,
            Err(e) if e.is_busy() => {
                tracing::warn!(db = %db.display(), "the database is locked by another connection; waiting to set marmot up in it");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let canonical = std::fs::canonicalize(&db).unwrap_or(db.clone());
    let owner = owner_token(store.owner(), &db);
    tracing::info!(node_id = s.node_id, db = %db.display(), tables = store.tables().count(), "database ready");

    let supervised = if s.urls.is_empty() {
        let spec = ServerSpec {
            binary: s.server_binary.clone(),
            data_dir: data_dir_for(&canonical),
            server_name: format!("marmot-{}", s.node_id),
            bind_address: s.bind_address.clone(),
            cluster_addr: cli.cluster_addr.clone(),
            cluster_peers: cli.cluster_peers.iter().cloned().collect(),
            leaf_servers: cli.leaf_servers.iter().cloned().collect(),
            server_config: s.server_config.clone(),
            route_secret: s.cluster.secret.clone(),
            route_tls: s.cluster.tls.clone(),
            insecure_cluster: s.cluster.insecure,
        };
        Some(Supervised::start(spec)?)
    } else {
        if cli.cluster_addr.is_some() || cli.cluster_peers.is_some() {
            tracing::warn!(
                "--cluster-addr/--cluster-peers only apply to the supervised nats-server; [nats] urls is set, so they are ignored"
            );
        }
        None
    };
    let (urls, only_server, auth) = match &supervised {
        Some(sv) => (
            vec![sv.url.clone()],
            Some(sv.server_name.clone()),
            supervised_auth(&sv.seed_file),
        ),
        None => (s.urls.clone(), None, s.auth.clone()),
    };
    let a = &s.auth;
    let auth_set = a.user.is_some()
        || a.nkey_seed_file.is_some()
        || a.creds_file.is_some()
        || a.token.is_some()
        || a.ca_file.is_some()
        || a.cert_file.is_some();
    if supervised.is_some() && auth_set {
        tracing::warn!(
            "[nats] credentials and TLS files are for servers given in [nats] urls; the supervised nats-server \
             takes marmot's own NKey (see the README's Security), so they are not used"
        );
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stop = runtime.block_on(serve(s, store, urls, only_server, auth, owner))?;
    drop(runtime);
    if let Some(sv) = supervised {
        sv.stop();
    }
    match stop {
        Stop::Shutdown { unpublished } => {
            if unpublished > 0 {
                tracing::warn!(
                    unpublished,
                    "stopped with batches not yet published; they are kept and published at the next start"
                );
            } else {
                tracing::info!("stopped; everything captured was published");
            }
            Ok(ExitCode::SUCCESS)
        }
        Stop::NodeIdInUse { holder } => {
            tracing::error!(%holder, "another live node uses this node id; give every node its own node_id");
            anyhow::bail!(
                "node id is in use by another live node ({holder}); give every node its own node_id"
            )
        }
    }
}

async fn serve(
    s: Settings,
    store: SqliteStore,
    urls: Vec<String>,
    only_server: Option<String>,
    auth: marmot_nats::Auth,
    owner: String,
) -> anyhow::Result<Stop> {
    let mut nats = NatsConfig::new(urls, s.node_id);
    nats.only_server = only_server;
    nats.stream_prefix = s.stream_prefix.clone();
    nats.subject_prefix = s.subject_prefix.clone();
    nats.replicas = s.replicas;
    nats.max_messages = s.max_entries;
    nats.max_bytes = s.max_bytes;
    nats.max_age = s.max_age;
    nats.update_existing = s.update_existing;
    nats.auth = auth;
    nats.reconnect_wait_max = s.reconnect_wait;
    let transport = Arc::new(NatsTransport::connect(nats).await?);

    let (watcher, wake) = marmot_sqlite::watch::watch(&s.db_path)
        .with_context(|| format!("watching {}", s.db_path.display()))?;
    let mut wake: Pin<Box<dyn Stream<Item = ()> + Send>> = Box::pin(wake);
    let (mut ctl_tx, ctl_rx) = futures::channel::mpsc::channel::<Control>(4);
    let mut control: Pin<Box<dyn Stream<Item = Control> + Send>> = Box::pin(ctl_rx);

    let shared = Arc::new(Shared {
        replicate: s.replicate,
        ..Shared::default()
    });
    if let Some(bind) = s.metrics_bind.clone() {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(crate::measured::BUCKETS)
            .context("setting the histograms' buckets")?
            .install_recorder()
            .context("installing the metrics recorder")?;
        // Histogram samples wait in the recorder until they are folded into its buckets: on
        // a `/metrics` read, or here. Without it, memory grew with every capture and apply
        // while nothing scraped the endpoint.
        let upkeep = handle.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        });
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::observe::serve(bind.clone(), handle, shared).await {
                tracing::error!(%bind, error = %e, "metrics endpoint failed");
            }
        });
    }

    // Signals: the first asks for a clean stop, a second one exits at once.
    {
        let mut tx = ctl_tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            let first = tokio::time::Instant::now();
            tracing::info!("stopping: publishing what is pending (signal again to exit at once)");
            let _ = tx.send(Control::Shutdown).await;
            loop {
                tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
                // A terminal's Ctrl-C reaches the whole process group, often together with a
                // TERM from a wrapper script: repeats right after the first are the same request.
                if first.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
            tracing::warn!(
                "exiting at once; unpublished changes stay in the database for the next start"
            );
            std::process::exit(1);
        });
    }
    let env = TokioEnv {
        start: tokio::time::Instant::now(),
    };
    crate::diff::spawn(
        transport.clone(),
        s.db_path.clone(),
        s.busy_timeout,
        s.metrics_prefix.clone(),
    );
    crate::advertise::spawn(crate::advertise::Advertiser {
        transport: transport.clone(),
        shared: shared.clone(),
        node: s.node_id,
        db: s.db_path.clone(),
        busy_timeout: s.busy_timeout,
        metrics_prefix: s.metrics_prefix.clone(),
        mismatch_after: s.schema_mismatch_after,
    });
    if let Some(idle) = s.sleep_timeout {
        let shared = shared.clone();
        let env = env.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let last = Duration::from_millis(shared.last_activity_ms.load(Ordering::Relaxed));
                if env.now().saturating_sub(last) > idle {
                    tracing::info!(idle = ?idle, "no changes for sleep_timeout: stopping");
                    let _ = ctl_tx.send(Control::Shutdown).await;
                    return;
                }
            }
        });
    }

    let snapshots: Arc<dyn marmot_core::ports::Snapshots> = if s.snapshot.enabled {
        Arc::new(crate::snapshots::DaemonSnapshots {
            store: tokio::sync::OnceCell::new(),
            transport: transport.clone(),
            files: crate::snapshots::BlockingFiles::new(
                &s.db_path,
                s.snapshot.tombstone_ttl,
                s.busy_timeout,
            ),
            node: s.node_id,
            owner: owner.clone(),
            settings: s.snapshot.clone(),
        })
    } else {
        Arc::new(marmot_core::ports::NoSnapshots)
    };
    let mut cfg = NodeConfig::new(s.node_id, owner);
    if s.snapshot.enabled {
        cfg.snapshots = Some(marmot_core::node::SnapshotPolicy {
            every_changes: s.snapshot.every_changes,
            interval: s.snapshot.interval,
            restore_empty: s.snapshot.restore_empty,
        });
    }
    cfg.publish = s.publish;
    cfg.replicate = s.replicate;
    cfg.max_clock_skew_ms = s.max_clock_skew_ms;
    cfg.poll_interval = s.poll_interval;
    cfg.retry_max = s.reconnect_wait;
    if let Some(m) = s.stream_message_capacity() {
        cfg.fit_to_retention(m);
    }
    // Unpublished messages beyond this are read back from the outbox table when their turn
    // comes, and received ones wait in NATS: a node that falls behind under a heavy writer
    // keeps its memory small (each of these defaults to 64 MiB in the core).
    cfg.max_cached_bytes = 16 << 20;
    cfg.max_buffered_bytes = 16 << 20;
    // Pacing never holds a write back until it would land below another node's tombstone
    // horizon (see the README's Tombstones).
    cfg.max_publish_hold =
        (!s.snapshot.tombstone_ttl.is_zero()).then_some(s.snapshot.tombstone_ttl / 2);
    let mut observer = DaemonObserver::new(&s.metrics_prefix, shared, store.stats());
    let mut store = crate::measured::Measured::new(store, s.node_id, &s.metrics_prefix);
    let t = transport.clone();
    let stop = tokio::spawn(async move {
        let mut node = Node::new(cfg);
        drive::run(
            &mut node,
            &mut store,
            t,
            snapshots,
            &env,
            &mut observer,
            wake.as_mut(),
            control.as_mut(),
        )
        .await
    })
    .await
    .context("the replication loop panicked")?;
    transport.close().await;
    drop(watcher);
    Ok(stop)
}

/// The local database's configuration, from the settings: the daemon, `snapshot save` and
/// `snapshot restore` open the database the same way.
pub(crate) fn store_config(s: &Settings) -> StoreConfig {
    let mut cfg = StoreConfig::new(&s.db_path, s.node_id, rand::random());
    cfg.capture = s.publish;
    cfg.compress = s.compress;
    cfg.busy_timeout = s.busy_timeout;
    cfg.keep_conflicts = s.keep_conflicts;
    cfg.replicate_schema = s.replicate_schema;
    cfg.tables = s.tables.clone();
    cfg
}
