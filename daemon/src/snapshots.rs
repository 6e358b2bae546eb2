//! Snapshot stores and the daemon's snapshot service.
//!
//! Stores: the NATS object store (default), S3-compatible services, WebDAV and SFTP, the last
//! three through opendal, all behind the core's [`ObjectStore`] port. The service takes
//! snapshots with the core's protocol (lease, immutable object, generation-numbered manifest)
//! and copies the database off the async workers.

use crate::config::{SnapshotSettings, SnapshotStoreKind};
use bytes::Bytes;
use futures::StreamExt;
use marmot_core::ports::Snapshots;
use marmot_core::snapshot::{
    self, Fetched, LocalSnapshot, ObjectStore, Progress, SaveKind, SaveOutcome, SnapshotError,
    SnapshotFiles, SnapshotInfo, StagedSnapshot,
};
use marmot_nats::NatsTransport;
use marmot_sqlite::snapshot::SnapshotDir;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An opendal operator as a snapshot store.
pub struct OpendalStore {
    op: opendal::Operator,
}

const CHUNK: usize = 8 << 20;

#[async_trait::async_trait]
impl ObjectStore for OpendalStore {
    async fn put_file(
        &self,
        name: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<(), String> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut writer = self
            .op
            .writer_with(name)
            .chunk(CHUNK)
            .await
            .map_err(|e| format!("uploading {name}: {e}"))?;
        let mut done = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = file.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            writer
                .write(buf)
                .await
                .map_err(|e| format!("uploading {name}: {e}"))?;
            done += n as u64;
            progress(done);
        }
        writer
            .close()
            .await
            .map_err(|e| format!("uploading {name}: {e}"))?;
        Ok(())
    }

    async fn get_file(
        &self,
        name: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<(), String> {
        let reader = self
            .op
            .reader(name)
            .await
            .map_err(|e| format!("downloading {name}: {e}"))?;
        let mut stream = reader
            .into_bytes_stream(..)
            .await
            .map_err(|e| format!("downloading {name}: {e}"))?;
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut done = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("downloading {name}: {e}"))?;
            file.write_all(&chunk).await.map_err(|e| e.to_string())?;
            done += chunk.len() as u64;
            progress(done);
        }
        file.flush().await.map_err(|e| e.to_string())
    }

    async fn put_bytes(&self, name: &str, data: Bytes) -> Result<(), String> {
        self.op
            .write(name, data)
            .await
            .map(|_| ())
            .map_err(|e| format!("uploading {name}: {e}"))
    }

    async fn get_bytes(&self, name: &str) -> Result<Option<Bytes>, String> {
        match self.op.read(name).await {
            Ok(b) => Ok(Some(b.to_bytes())),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("downloading {name}: {e}")),
        }
    }

    async fn list(&self) -> Result<Vec<String>, String> {
        let entries = match self.op.list("/").await {
            Ok(e) => e,
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("listing snapshots: {e}")),
        };
        Ok(entries
            .into_iter()
            .filter(|e| !e.metadata().is_dir())
            .map(|e| e.name().to_string())
            .collect())
    }

    async fn delete(&self, name: &str) -> Result<(), String> {
        match self.op.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("deleting {name}: {e}")),
        }
    }
}

/// Opens the configured snapshot store. The NATS object store needs the transport.
pub async fn open_store(
    cfg: &SnapshotSettings,
    nats: Option<&NatsTransport>,
) -> anyhow::Result<Arc<dyn ObjectStore>> {
    // opendal's HTTP services need its default transport installed once per process.
    opendal::install_default();
    let op = match &cfg.store {
        SnapshotStoreKind::Nats { bucket, replicas } => {
            let Some(nats) = nats else {
                anyhow::bail!("the NATS snapshot store needs a NATS connection");
            };
            let store = nats
                .object_store(bucket, *replicas)
                .await
                .map_err(anyhow::Error::msg)?;
            return Ok(Arc::new(store));
        }
        SnapshotStoreKind::S3 {
            endpoint,
            bucket,
            root,
            region,
            access_key,
            secret,
            session_token,
        } => {
            let mut b = opendal::services::S3::default()
                .bucket(bucket)
                .root(root)
                .region(region);
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if let Some(k) = access_key {
                b = b.access_key_id(k);
            }
            if let Some(s) = secret {
                b = b.secret_access_key(s);
            }
            if let Some(t) = session_token {
                b = b.session_token(t);
            }
            opendal::Operator::new(b)?
        }
        SnapshotStoreKind::WebDav {
            endpoint,
            root,
            user,
            password,
        } => {
            let mut b = opendal::services::Webdav::default()
                .endpoint(endpoint)
                .root(root);
            if let Some(u) = user {
                b = b.username(u);
            }
            if let Some(p) = password {
                b = b.password(p);
            }
            opendal::Operator::new(b)?
        }
        SnapshotStoreKind::Sftp {
            endpoint,
            user,
            root,
            key,
            accept_any_host_key,
        } => {
            let mut b = opendal::services::Sftp::default()
                .endpoint(endpoint)
                .user(user)
                .root(root)
                .known_hosts_strategy(if *accept_any_host_key {
                    "accept"
                } else {
                    "strict"
                });
            if let Some(k) = key {
                b = b.key(&k.to_string_lossy());
            }
            opendal::Operator::new(b)?
        }
    };
    Ok(Arc::new(OpendalStore { op }))
}

/// The core's timer for renewing the snapshot lease during a save.
fn tokio_pause(d: Duration) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(tokio::time::sleep(d))
}

/// Snapshot files made and checked off the async workers.
pub struct BlockingFiles {
    dir: SnapshotDir,
}

impl BlockingFiles {
    /// Files for the database at `db`; a lock is waited for at most `busy_timeout`.
    pub fn new(db: &Path, tombstone_ttl: Duration, busy_timeout: Duration) -> Self {
        BlockingFiles {
            dir: SnapshotDir::new(db, tombstone_ttl).with_busy_timeout(busy_timeout),
        }
    }
}

#[async_trait::async_trait]
impl SnapshotFiles for BlockingFiles {
    async fn create(&self) -> Result<LocalSnapshot, SnapshotError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || dir.create(now_ms()))
            .await
            .map_err(|e| SnapshotError::Local(e.to_string()))?
    }
    fn download_path(&self, object: &str) -> PathBuf {
        self.dir.download_path(object)
    }
    async fn stage(
        &self,
        downloaded: &Path,
        info: &SnapshotInfo,
    ) -> Result<StagedSnapshot, SnapshotError> {
        let (dir, path, info) = (self.dir.clone(), downloaded.to_path_buf(), info.clone());
        tokio::task::spawn_blocking(move || dir.stage(&path, &info))
            .await
            .map_err(|e| SnapshotError::Local(e.to_string()))?
    }
    fn discard(&self, path: &Path) {
        SnapshotDir::discard(path);
    }
}

/// Logs the progress of a long transfer every 64 MiB.
pub fn log_progress(what: &'static str) -> impl Fn(u64) + Send + Sync {
    let last = std::sync::atomic::AtomicU64::new(0);
    move |done| {
        let step = done >> 26;
        if last.swap(step, std::sync::atomic::Ordering::Relaxed) != step {
            tracing::info!(what, mib = done >> 20, "snapshot transfer in progress");
        }
    }
}

/// The daemon's snapshot service.
pub struct DaemonSnapshots {
    /// Where snapshots are kept (opened on first use: NATS may be down at start).
    pub store: tokio::sync::OnceCell<Arc<dyn ObjectStore>>,
    /// For the lease.
    pub transport: Arc<NatsTransport>,
    /// Local files.
    pub files: BlockingFiles,
    /// This node.
    pub node: u64,
    /// Lease owner token.
    pub owner: String,
    /// Policy.
    pub settings: SnapshotSettings,
}

impl DaemonSnapshots {
    async fn store(&self) -> Result<&Arc<dyn ObjectStore>, SnapshotError> {
        self.store
            .get_or_try_init(|| open_store(&self.settings, Some(&self.transport)))
            .await
            .map_err(|e| SnapshotError::Store(format!("{e:#}")))
    }
}

#[async_trait::async_trait]
impl Snapshots for DaemonSnapshots {
    async fn save(&self, position: u64, kind: SaveKind) -> Result<SaveOutcome, SnapshotError> {
        let (min_changes, min_age) = if kind != SaveKind::Due {
            (0, 0)
        } else {
            (
                self.settings.every_changes / 2,
                self.settings
                    .interval
                    .map_or(0, |i| i.as_millis() as u64 / 2),
            )
        };
        let progress = log_progress("upload");
        let store = self.store().await?;
        let params = snapshot::SaveParams {
            node: self.node,
            owner: &self.owner,
            position,
            now_ms: now_ms(),
            min_changes,
            min_age_ms: min_age,
            keep: self.settings.keep,
            first_only: kind == SaveKind::Seed,
        };
        let r = snapshot::save(
            &**store,
            &*self.transport,
            &self.files,
            &params,
            &tokio_pause,
            &progress,
        )
        .await;
        marmot_daemon::platform::release_free_memory();
        r
    }

    async fn fetch(&self, min_position: u64) -> Result<Fetched, SnapshotError> {
        let progress = log_progress("download");
        let store = match self.store().await {
            Ok(s) => s,
            Err(e) => {
                // The node's stale lease goes even when the store cannot be opened.
                snapshot::release_stale_lease(&*self.transport, &self.owner).await;
                return Err(e);
            }
        };
        snapshot::fetch_to_restore(
            &**store,
            &*self.transport,
            &self.owner,
            &self.files,
            &progress,
            min_position,
        )
        .await
    }
}

/// How a command reaches NATS: the configured servers, or the server a running daemon
/// supervises (it leaves its address and the seed of its client NKey beside the database,
/// readable by the database's owner only; the command talks to that server only).
pub(crate) fn command_nats(s: &crate::config::Settings) -> anyhow::Result<marmot_nats::NatsConfig> {
    let mut cfg = marmot_nats::NatsConfig::new(s.urls.clone(), s.node_id);
    cfg.auth = s.auth.clone();
    cfg.stream_prefix = s.stream_prefix.clone();
    cfg.subject_prefix = s.subject_prefix.clone();
    cfg.replicas = s.replicas;
    if !s.urls.is_empty() {
        return Ok(cfg);
    }
    let canonical = std::fs::canonicalize(&s.db_path).unwrap_or(s.db_path.clone());
    let dir = crate::run::data_dir_for(&canonical);
    let file = dir.join("client-url");
    let url = match std::fs::read_to_string(&file) {
        Ok(u) => u.trim().to_string(),
        Err(_) => anyhow::bail!(
            "no [nats] urls configured and no running marmot supervises a nats-server for {} (looked for {}): start the daemon, or set [nats] urls",
            s.db_path.display(),
            file.display()
        ),
    };
    let seed_file = dir.join(crate::supervisor::CLIENT_KEY_FILE);
    if let Err(e) = std::fs::File::open(&seed_file) {
        anyhow::bail!(
            "cannot read {} ({e}): the supervised nats-server accepts only clients holding the key kept there; run this command as the user that runs the daemon",
            seed_file.display()
        );
    }
    cfg.urls = vec![url];
    cfg.auth = crate::run::supervised_auth(&seed_file);
    cfg.only_server = Some(format!("marmot-{}", s.node_id));
    Ok(cfg)
}

fn progress_bar(what: &'static str) -> Box<dyn Fn(u64) + Send + Sync> {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {bytes} ({bytes_per_sec})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(what);
        Box::new(move |done| bar.set_position(done))
    } else {
        Box::new(log_progress(what))
    }
}

/// Claims this node's id (as its daemon would) and checks the clock against the server's,
/// with the daemon's rule: refused when the stamps this node would give lead the server by
/// more than `max_clock_skew_ms`; a lagging clock stamps with the server's time. Returns the
/// owner token the claim was made with, the server's time and when it was read.
async fn check_clock(
    t: &NatsTransport,
    s: &crate::config::Settings,
    owner: &str,
    clock: &mut marmot_core::Clock,
) -> anyhow::Result<(String, u64, std::time::Instant)> {
    use marmot_core::ports::{Claim, Transport};
    let sent = now_ms();
    let claim = t.claim(s.node_id, owner).await?;
    let received = now_ms();
    match claim {
        Claim::Held { by } => anyhow::bail!(
            "node id {} is in use by another database ({by}): a daemon for it runs elsewhere, or ran less than 15 s ago",
            s.node_id
        ),
        Claim::Granted { server_ms, .. } => {
            let mid = (sent + received) / 2;
            let uncertainty = (received.saturating_sub(sent) / 2) as i64;
            let wall_skew = mid as i64 - server_ms as i64;
            let hw_skew = clock.high_water().wall_ms() as i64 - server_ms as i64;
            let lead = wall_skew.max(hw_skew) - uncertainty;
            if wall_skew - uncertainty > s.max_clock_skew_ms as i64 {
                anyhow::bail!(
                    "this machine's clock is {} ms ahead of the NATS server's, beyond max_clock_skew_ms ({}): \
                     fix the clock first (a merge restore stamps this node's pending writes)",
                    wall_skew,
                    s.max_clock_skew_ms
                );
            }
            if lead > s.max_clock_skew_ms as i64 {
                clock.lower_to(received.max(server_ms));
            }
            Ok((owner.to_string(), server_ms, std::time::Instant::now()))
        }
    }
}

/// `marmot snapshot save | restore | list`.
pub fn command(
    s: &crate::config::Settings,
    action: crate::cli::SnapshotCommand,
) -> anyhow::Result<std::process::ExitCode> {
    use crate::cli::SnapshotCommand;
    use marmot_core::ports::Storage;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        // A restore checks the clock against NATS when it can; with the daemon stopped, the
        // address a supervising daemon left behind is stale, so only configured servers.
        let needs_nats = matches!(s.snapshot.store, crate::config::SnapshotStoreKind::Nats { .. })
            || matches!(action, SnapshotCommand::Save)
            || (matches!(action, SnapshotCommand::Restore) && !s.urls.is_empty());
        let transport = if needs_nats {
            let cfg = command_nats(s)?;
            let t = NatsTransport::connect(cfg).await?;
            // What needs NATS fails with its own message if it is not there; a restore goes
            // on without it.
            if let Err(e) = t.wait_connected(crate::cluster::COMMAND_CONNECT).await {
                tracing::warn!(error = %e, "NATS not reachable yet");
            }
            Some(Arc::new(t))
        } else {
            None
        };
                let store = open_store(&s.snapshot, transport.as_deref()).await?;
        let files = BlockingFiles::new(&s.db_path, s.snapshot.tombstone_ttl, s.busy_timeout);
        if matches!(action, SnapshotCommand::Save) {
            // Sets marmot up in the database if it never ran there.
            let cfg = crate::run::store_config(s);
            tokio::task::spawn_blocking(move || marmot_sqlite::SqliteStore::open(cfg).map(drop)).await??;
        }match action {
            SnapshotCommand::List => {
                let all = snapshot::list(&*store).await?;
                if all.is_empty() {
                    println!("no snapshots");
                }
                for i in all {
                    let age = now_ms().saturating_sub(i.created_ms) / 1000;
                    println!(
                        "generation {} position {} from node {} {} bytes ({} bytes of database) {}s old: {}",
                        i.generation, i.position, i.node, i.size, i.raw_size, age, i.object
                    );
                }
                Ok(std::process::ExitCode::SUCCESS)
            }
            SnapshotCommand::Save => {
                let transport = transport.expect("save connects to NATS for the lease");
                let position = {
                    let conn = marmot_sqlite::open_connection(&s.db_path, Duration::from_secs(10))?;
                    conn.query_row("SELECT value FROM \"__marmot__meta\" WHERE key = 'position'", [], |r| r.get::<_, i64>(0))
                        .unwrap_or(0) as u64
                };
                let owner = format!("marmot-cli-node{}", s.node_id);
                let progress = progress_bar("uploading");
                let params = snapshot::SaveParams {
                    node: s.node_id,
                    owner: &owner,
                    position,
                    now_ms: now_ms(),
                    min_changes: 0,
                    min_age_ms: 0,
                    keep: s.snapshot.keep,
                    first_only: false,
                };
                let out = snapshot::save(&*store, &*transport, &files, &params, &tokio_pause, &*progress)
                .await?;
                match out {
                    SaveOutcome::Saved(i) => {
                        println!("saved generation {} at position {} ({} bytes): {}", i.generation, i.position, i.size, i.object);
                        Ok(std::process::ExitCode::SUCCESS)
                    }
                    SaveOutcome::Busy { by } => {
                        eprintln!("another node is taking a snapshot right now ({by}); try again in a moment");
                        Ok(std::process::ExitCode::from(2))
                    }
                    SaveOutcome::UpToDate(i) => {
                        println!("generation {} is current", i.generation);
                        Ok(std::process::ExitCode::SUCCESS)
                    }
                }
            }
            SnapshotCommand::Restore => {
                // Not beside a running daemon (its outbox and clock are in its memory), and no
                // daemon starts meanwhile: the daemon's lock is held until the restore is done.
                let _lock = crate::lock::exclusive(&s.db_path, "`marmot snapshot restore`")?;
                let progress = progress_bar("downloading");
                let fetched = snapshot::fetch_latest(&*store, &files, &*progress, 0).await?;
                for r in &fetched.rejected {
                    eprintln!("marmot: rejected: {r}");
                }
                let Some(staged) = fetched.staged else {
                    eprintln!("marmot: no snapshot that verifies; the database was not changed");
                    return Ok(std::process::ExitCode::from(1));
                };
                let cfg = crate::run::store_config(s);
                let db = s.db_path.clone();
                let mut store = tokio::task::spawn_blocking(move || marmot_sqlite::SqliteStore::open(cfg)).await??;
                let recovered = store.recover()?;
                let mut clock = marmot_core::Clock::new(recovered.clock).with_max_lead(s.max_clock_skew_ms);
                // A merge restore stamps the node's pending writes: only with a clock checked
                // against the server, as the daemon does (the same claim, the same rule).
                let checked = match &transport {
                    Some(t) => {
                        let owner = crate::run::owner_token(store.owner(), &s.db_path);
                        Some(check_clock(t, s, &owner, &mut clock).await?)
                    }
                    None => None,
                };
                let clock_checked = checked.is_some();
                let server_now = checked
                    .as_ref()
                    .map_or(0, |(_, ms, at)| ms + at.elapsed().as_millis() as u64);
                let report = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    // A clock that lags stamps with the server's time (it moved on since
                    // the check by about as much as ours).
                    let wall = now_ms().max(server_now);
                    let r = if clock_checked {
                        store.restore(&mut clock, wall, &staged)
                    } else {
                        store.restore_into_empty(&mut clock, wall, &staged)
                    };
                    SnapshotDir::discard(&staged.path);
                    Ok(r?)
                })
                .await??;
                if let (Some(t), Some((owner, _, _))) = (&transport, checked) {
                    let _ = marmot_core::ports::Transport::release(&**t, &format!("node-{}", s.node_id), &owner).await;
                }
                println!(
                    "restored generation {} into {} ({}); position {}",
                    report.generation,
                    db.display(),
                    if report.merged { "merged under the merge rule" } else { "taken whole" },
                    report.position
                );
                Ok(std::process::ExitCode::SUCCESS)
            }
        }
    })
}
