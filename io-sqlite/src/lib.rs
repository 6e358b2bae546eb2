//! # marmot-sqlite
//!
//! The SQLite adapter of marmot. It owns everything marmot keeps inside the application's
//! database file:
//!
//! - capture triggers (`__marmot__ins__T`, `__marmot__upd__T`, `__marmot__del__T`) that log
//!   the keys of changed rows into `__marmot__log__T` inside the application's own
//!   transaction; capture then reads those rows as they are now;
//! - row versions (`__marmot__ver__T`), declared with the same key affinity and collation as
//!   the table so that keys compare exactly as SQLite compares them; deletes leave tombstones;
//! - the outbox (captured batches until acknowledged), the inbox (chunks of batches not yet
//!   complete), parked batches, conflict records and `__marmot__meta` (format version, node,
//!   stream position, clock high-water mark).
//!
//! marmot's connection runs with triggers disabled (`SQLITE_DBCONFIG_ENABLE_TRIGGER`), so
//! the rows it applies are never captured again and the application's own triggers do not
//! fire for replicated rows (their effects arrive as rows from the node where they ran), and
//! with foreign keys off (batches from different nodes arrive in different orders). Every
//! storage method is one `BEGIN IMMEDIATE` transaction; none is held across an `.await`.
#![warn(missing_docs)]

pub mod admin;
pub mod ddl;
pub mod fts;
mod migrate;
mod restore;
pub mod schema;
pub mod snapshot;
mod txn;
pub mod watch;

use bytes::Bytes;
use marmot_core::capture::{CaptureParams, Captured, capture};
use marmot_core::ports::{
    ApplyOutcome, CaptureOutcome, ParkedRetry, Recovered, RestoreReport, Storage, StorageErrorKind,
};
use marmot_core::snapshot::StagedSnapshot;
use marmot_core::wire::BatchId;
use marmot_core::{Clock, NodeId, Stamp};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use schema::{Discovery, PREFIX, discover};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use txn::{Table, Tx, is_busy};

pub use txn::{Bind, from_sql};

/// The format of marmot's tables that this build writes and reads.
/// Format 2 declares the key columns of a STRICT table's `ANY` key without affinity (format 1
/// gave them NUMERIC); a format-1 database is migrated in place when it is opened.
pub const STORE_FORMAT: i64 = 2;

/// A crash point: called with the point's name at every place where a process can die between
/// two steps of one storage operation (before and after every commit, between the
/// transactions of an operation that has several); `true` means "die here". The simulation
/// uses it to crash a node inside an operation (turmoil crashes a host only at an `.await`);
/// the daemon has none.
pub type CrashPoint = Arc<dyn Fn(&'static str) -> bool + Send + Sync>;

/// How to open the store.
#[derive(Clone)]
pub struct StoreConfig {
    /// The application's database file.
    pub path: PathBuf,
    /// This node's id.
    pub node_id: NodeId,
    /// Random bits from the caller (OS randomness in the daemon, the seed in a simulation):
    /// part of every incarnation, and of the database's identity when it is first set up.
    pub nonce: u64,
    /// Install capture triggers and capture local writes (false: a node that only receives).
    pub capture: bool,
    /// Compress batch bodies.
    pub compress: bool,
    /// Largest body fragment per message.
    pub max_fragment: usize,
    /// How long to wait for the write lock before giving up (and retrying later).
    pub busy_timeout: Duration,
    /// How many conflict records to keep.
    pub keep_conflicts: u64,
    /// Where to die on purpose (tests and the simulation only).
    pub crash_point: Option<CrashPoint>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("path", &self.path)
            .field("node_id", &self.node_id)
            .field("capture", &self.capture)
            .field("busy_timeout", &self.busy_timeout)
            .finish_non_exhaustive()
    }
}

impl StoreConfig {
    /// Defaults for `path` as node `node_id`.
    pub fn new(path: impl Into<PathBuf>, node_id: NodeId, nonce: u64) -> Self {
        StoreConfig {
            path: path.into(),
            node_id,
            nonce,
            capture: true,
            compress: true,
            max_fragment: 512 * 1024,
            busy_timeout: Duration::from_secs(5),
            keep_conflicts: 10_000,
            crash_point: None,
        }
    }
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("{path}: {source}")]
    Sqlite {
        /// The database.
        path: PathBuf,
        /// The error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database is not in WAL mode and could not be switched.
    #[error(
        "{path}: marmot needs the database in WAL mode, but it is in {mode:?} mode and could not be switched \
         (another process may hold it open in rollback-journal mode); run `sqlite3 {path} 'PRAGMA journal_mode=WAL'` \
         while no other process uses it"
    )]
    NotWal {
        /// The database.
        path: PathBuf,
        /// Its journal mode.
        mode: String,
    },
    /// A snapshot cannot be merged: one of its rows collides with a local row it does not
    /// replace.
    #[error(
        "{path}: cannot merge the snapshot into table {}: {detail}. A row of the snapshot collides with a local row \
         the snapshot does not replace (a local write not published yet, or a row written behind marmot's back); \
         nothing was changed. To resolve it, change or delete the local row that holds that value: the restore is \
         tried again until it succeeds",
        ddl::quote(table)
    )]
    RestoreCollision {
        /// The database.
        path: PathBuf,
        /// The table.
        table: String,
        /// SQLite's message (it names the constraint's columns).
        detail: String,
    },
    /// A restore that may only take a snapshot whole found content in the database.
    #[error(
        "{path}: the database has content, so the snapshot would be merged, which stamps this node's pending writes; \
         marmot checks the clock against a NATS server first and none was reachable: set [nats] urls, or start the daemon"
    )]
    NotEmpty {
        /// The database.
        path: PathBuf,
    },
    /// The process died here on purpose ([`StoreConfig::crash_point`]): nothing after this
    /// point of the operation happened, and the store does nothing more until reopened.
    #[error("simulated crash {point}")]
    Crashed {
        /// Where.
        point: &'static str,
    },
    /// marmot's tables were written by a newer marmot.
    #[error(
        "{path}: marmot's tables have format {found}, this marmot knows format {STORE_FORMAT}; upgrade marmot (or run `marmot cleanup` to start over)"
    )]
    NewerFormat {
        /// The database.
        path: PathBuf,
        /// The format found.
        found: i64,
    },
}

impl StoreError {
    /// Whether the error is the write lock held by someone else (worth a retry).
    pub fn is_busy(&self) -> bool {
        matches!(self, StoreError::Sqlite { source, .. } if is_busy(source))
    }
}

impl marmot_core::ports::StorageFailure for StoreError {
    fn kind(&self) -> StorageErrorKind {
        use rusqlite::ErrorCode as C;
        match self {
            StoreError::Sqlite { source, .. } => match source {
                rusqlite::Error::SqliteFailure(f, _) => match f.code {
                    C::DatabaseBusy | C::DatabaseLocked => StorageErrorKind::Busy,
                    C::SystemIoFailure
                    | C::DiskFull
                    | C::ReadOnly
                    | C::CannotOpen
                    | C::FileLockingProtocolFailed
                    | C::NoLargeFileSupport => StorageErrorKind::Io,
                    C::DatabaseCorrupt | C::NotADatabase => StorageErrorKind::Corrupt,
                    _ => StorageErrorKind::Other,
                },
                _ => StorageErrorKind::Other,
            },
            StoreError::NotWal { .. }
            | StoreError::RestoreCollision { .. }
            | StoreError::NotEmpty { .. }
            | StoreError::NewerFormat { .. } => StorageErrorKind::Refused,
            StoreError::Crashed { .. } => StorageErrorKind::Other,
        }
    }
}

/// Counters for metrics, shared with the daemon.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Transactions that could not get the write lock within the busy timeout.
    pub busy: AtomicU64,
    /// Logged rows whose key contained NULL (not replicated).
    pub null_key_rows: AtomicU64,
    /// Tables replicated now.
    pub tables: AtomicU64,
    /// Tables skipped now (no primary key, virtual, ...).
    pub skipped_tables: AtomicU64,
    /// Conflicts recorded.
    pub conflicts: AtomicU64,
    /// Batches parked.
    pub parked: AtomicU64,
}

/// The local database.
pub struct SqliteStore {
    conn: Connection,
    cfg: StoreConfig,
    tables: Vec<Table>,
    by_name: HashMap<String, usize>,
    schema_version: i64,
    data_version: i64,
    scan_needed: bool,
    schema_changed: bool,
    synced_in_txn: bool,
    incarnation: u64,
    /// Batches this database captured: incarnation -> last batch sequence captured in it.
    incarnations: std::collections::BTreeMap<u64, u64>,
    owner: String,
    stats: Arc<StoreStats>,
    /// Set when a crash point fired: the "process" is dead.
    dead: Option<&'static str>,
}

fn meta_get(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT value FROM \"__marmot__meta\" WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

fn meta_set(conn: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO \"__marmot__meta\" (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// Opens a connection the way marmot uses it: triggers off (no echo), foreign keys off,
/// durable commits, a busy timeout.
pub fn open_connection(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)?;
    conn.pragma_update(None, "foreign_keys", false)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.set_prepared_statement_cache_capacity(512);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (and on first use sets up) the store in the application's database.
    pub fn open(cfg: StoreConfig) -> Result<Self, StoreError> {
        let path = cfg.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = open_connection(&cfg.path, cfg.busy_timeout).map_err(err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            let now: String = conn
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .map_err(err)?;
            if !now.eq_ignore_ascii_case("wal") {
                return Err(StoreError::NotWal { path, mode: now });
            }
            tracing::info!(db = %path.display(), from = %mode, "switched the database to WAL mode");
        }
        let mut store = SqliteStore {
            conn,
            cfg,
            tables: Vec::new(),
            by_name: HashMap::new(),
            schema_version: -1,
            data_version: -1,
            scan_needed: true,
            schema_changed: false,
            synced_in_txn: false,
            incarnation: 0,
            incarnations: std::collections::BTreeMap::new(),
            owner: String::new(),
            stats: Arc::new(StoreStats::default()),
            dead: None,
        };
        store.in_txn(|s| s.init())?;
        Ok(store)
    }

    /// Counters for metrics.
    pub fn stats(&self) -> Arc<StoreStats> {
        self.stats.clone()
    }

    /// A token that identifies this database (stable across restarts, new for a copy that
    /// was adopted under another node id). Used to claim the node id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// This start's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The replicated tables.
    pub fn tables(&self) -> impl Iterator<Item = &schema::TableInfo> {
        self.tables.iter().map(|t| &t.info)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    fn sql_err(&self, source: rusqlite::Error) -> StoreError {
        if is_busy(&source) {
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
        }
        StoreError::Sqlite {
            path: self.cfg.path.clone(),
            source,
        }
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction; rolls back on error.
    fn in_txn<R>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.alive()?;
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.sql_err(e))?;
        let done = f(self).and_then(|r| {
            self.crash_point("before commit")?;
            Ok(r)
        });
        match done {
            Ok(r) => match self.conn.execute_batch("COMMIT") {
                Ok(()) => {
                    self.synced_in_txn = false;
                    // Committed, and the caller never hears of it.
                    self.crash_point("after commit")?;
                    Ok(r)
                }
                Err(e) => {
                    self.rolled_back();
                    Err(self.sql_err(e))
                }
            },
            Err(e) => {
                self.rolled_back();
                Err(e)
            }
        }
    }

    /// Fails once a crash point fired: a dead process does nothing.
    fn alive(&self) -> Result<(), StoreError> {
        match self.dead {
            Some(point) => Err(StoreError::Crashed { point }),
            None => Ok(()),
        }
    }

    /// Dies here if the crash point says so.
    fn crash_point(&mut self, point: &'static str) -> Result<(), StoreError> {
        self.alive()?;
        if self.cfg.crash_point.as_ref().is_some_and(|c| c(point)) {
            self.dead = Some(point);
            return Err(StoreError::Crashed { point });
        }
        Ok(())
    }

    /// Undoes a transaction and forgets what it learnt: a capture it made is gone with it, so
    /// the change logs must be read again however `data_version` looks; schema work is redone.
    fn rolled_back(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
        self.scan_needed = true;
        if let Ok(m) = load_incarnations(&self.conn) {
            self.incarnations = m;
        }
        if std::mem::take(&mut self.synced_in_txn) {
            self.schema_version = -1;
        }
    }

    fn init(&mut self) -> Result<(), StoreError> {
        let c = &self.conn;
        let e = |s| StoreError::Sqlite {
            path: self.cfg.path.clone(),
            source: s,
        };
        c.execute_batch(ddl::CREATE_FIXED).map_err(e)?;
        migrate::ensure_parked_collision(c).map_err(e)?;
        match meta_get(c, "format").map_err(e)? {
            None => meta_set(c, "format", STORE_FORMAT).map_err(e)?,
            Some(found) if found > STORE_FORMAT => {
                return Err(StoreError::NewerFormat {
                    path: self.cfg.path.clone(),
                    found,
                });
            }
            Some(found) if found < STORE_FORMAT => {
                migrate::format1_to_2(c).map_err(e)?;
                meta_set(c, "format", STORE_FORMAT).map_err(e)?;
                tracing::info!(db = %self.cfg.path.display(), from = found, to = STORE_FORMAT, "upgraded marmot's tables");
            }
            Some(_) => {}
        }
        let first_start = meta_get(c, "tables_registered").map_err(e)?.is_none();
        let uuid = match meta_get(c, "db_uuid").map_err(e)? {
            Some(u) => u,
            None => {
                let u = (self.cfg.nonce >> 1) as i64;
                meta_set(c, "db_uuid", u).map_err(e)?;
                u
            }
        };
        let mut uuid = uuid;
        match meta_get(c, "node_id").map_err(e)? {
            Some(n) if n as u64 != self.cfg.node_id => {
                tracing::warn!(
                    db = %self.cfg.path.display(),
                    was = n,
                    now = self.cfg.node_id,
                    "this database was last used by another node id: adopting it (a copy of another node's file); \
                     its unpublished changes belong to that node (which publishes them) and are dropped here"
                );
                // The inbox and parked batches hold other nodes' batches this copy already
                // read past: they stay, or those batches would never be applied here.
                c.execute("DELETE FROM \"__marmot__outbox\"", [])
                    .map_err(e)?;
                // Batches captured under the old identity are not ours: apply them.
                c.execute("DELETE FROM \"__marmot__incarnations\"", [])
                    .map_err(e)?;
                uuid = (self.cfg.nonce >> 1) as i64;
                meta_set(c, "db_uuid", uuid).map_err(e)?;
                meta_set(c, "node_id", self.cfg.node_id as i64).map_err(e)?;
                self.scan_needed = true;
                // Logged keys are the other node's unpublished writes.
                let logs: Vec<String> = user_marmot_tables(c, "log__").map_err(e)?;
                for l in logs {
                    c.execute(&format!("DELETE FROM {}", ddl::quote(&l)), [])
                        .map_err(e)?;
                }
            }
            Some(_) => {}
            None => meta_set(c, "node_id", self.cfg.node_id as i64).map_err(e)?,
        }
        let starts = meta_get(c, "starts").map_err(e)?.unwrap_or(0) + 1;
        meta_set(c, "starts", starts).map_err(e)?;
        // Never repeats for this database: a counter, plus random bits in case the file is
        // ever restored from an older copy.
        self.incarnation = ((starts as u64) << 20) | (self.cfg.nonce & 0xF_FFFF);
        c.execute(
            "INSERT OR IGNORE INTO \"__marmot__incarnations\" (incarnation, last_seq) VALUES (?1, 0)",
            [self.incarnation as i64],
        )
        .map_err(e)?;
        self.incarnations = load_incarnations(c).map_err(e)?;
        self.owner = format!("{uuid:016x}");
        self.sync_schema(first_start)?;
        meta_set(&self.conn, "tables_registered", 1).map_err(|s| self.sql_err(s))?;
        Ok(())
    }

    /// Brings triggers and marmot's per-table state in line with the application's schema.
    fn sync_schema(&mut self, first_start: bool) -> Result<(), StoreError> {
        let c = &self.conn;
        let e = |s| StoreError::Sqlite {
            path: self.cfg.path.clone(),
            source: s,
        };
        let Discovery {
            tables,
            skipped,
            generated,
        } = discover(c).map_err(e)?;
        let mut registry: HashMap<String, String> = HashMap::new();
        {
            let mut stmt = c
                .prepare("SELECT name, key_signature FROM \"__marmot__tables\"")
                .map_err(e)?;
            let mut rows = stmt.query([]).map_err(e)?;
            while let Some(r) = rows.next().map_err(e)? {
                registry.insert(r.get(0).map_err(e)?, r.get(1).map_err(e)?);
            }
        }
        let triggers: HashMap<String, String> = {
            let mut stmt = c
                .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
                .map_err(e)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
                })
                .map_err(e)?;
            let mut m = HashMap::new();
            for r in rows {
                let (n, s) = r.map_err(e)?;
                if n.starts_with(PREFIX) {
                    m.insert(n, s.unwrap_or_default());
                }
            }
            m
        };
        // Tables that disappeared (dropped or renamed): forget them.
        let mut gone: Vec<&String> = registry
            .keys()
            .filter(|n| !tables.iter().any(|t| &t.name == *n))
            .collect();
        gone.sort();
        for name in gone {
            tracing::info!(table = %name, "table is gone: dropping marmot's state for it");
            for trig in ddl::trigger_names(name) {
                if triggers.contains_key(&trig) {
                    c.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", ddl::quote(&trig)))
                        .map_err(e)?;
                }
            }
            c.execute_batch(&ddl::drop_table_state(name)).map_err(e)?;
            c.execute("DELETE FROM \"__marmot__tables\" WHERE name = ?1", [name])
                .map_err(e)?;
        }
        for (name, reason) in &skipped {
            if *reason == schema::SkipReason::Shadow {
                tracing::debug!(table = %name, %reason, "table not replicated");
            } else {
                tracing::warn!(table = %name, %reason, "table not replicated");
            }
        }
        for (t, col) in &generated {
            tracing::info!(table = %t, column = %col, "generated column not replicated (every node computes it)");
        }
        let indexes = fts::external_indexes(c).map_err(e)?;
        for i in &indexes {
            if tables
                .iter()
                .any(|t| i.content.eq_ignore_ascii_case(&t.name))
            {
                tracing::debug!(index = %i.name, table = %i.content, "keeping a full-text index in step with replicated rows");
            }
        }
        let mut out = Vec::with_capacity(tables.len());
        for t in tables {
            let sig = t.key_signature();
            let expected = ddl::create_triggers(&t);
            let names = ddl::trigger_names(&t.name);
            let mut log_all = false;
            match registry.get(&t.name) {
                None => {
                    c.execute_batch(&ddl::drop_table_state(&t.name))
                        .map_err(e)?;
                    c.execute_batch(&ddl::create_table_state(&t)).map_err(e)?;
                    c.execute(
                        "INSERT INTO \"__marmot__tables\" (name, key_signature) VALUES (?1, ?2)",
                        params![t.name, sig],
                    )
                    .map_err(e)?;
                    if first_start {
                        tracing::info!(table = %t.name, "replicating table (rows already in it are not published: start every node from the same copy)");
                    } else {
                        tracing::info!(table = %t.name, "new table: replicating it, and publishing the rows it already holds");
                        log_all = true;
                    }
                }
                Some(old) if *old != sig => {
                    tracing::warn!(table = %t.name, "primary key changed: rebuilding marmot's row versions and publishing every row");
                    // Keys still to publish survive: pending changes in the change log, and
                    // rows with a live version that are gone now (their deletes). They are
                    // carried over position by position when the key keeps its width.
                    // Carried over when the key is the same columns (a change of their
                    // affinity or collation): then the versions too, so that a write is
                    // still stamped above the version it replaces.
                    let carried = old
                        .rsplit_once('|')
                        .is_some_and(|(names, _)| names == t.key_names());
                    if carried {
                        c.execute_batch(&ddl::stash_pending(&t)).map_err(e)?;
                    } else {
                        tracing::warn!(table = %t.name, "the primary key has other columns now: changes of the old key not captured yet are not published");
                    }
                    c.execute_batch(&ddl::drop_table_state(&t.name))
                        .map_err(e)?;
                    c.execute_batch(&ddl::create_table_state(&t)).map_err(e)?;
                    if carried {
                        c.execute_batch(&ddl::unstash_pending(&t)).map_err(e)?;
                    }
                    c.execute(
                        "UPDATE \"__marmot__tables\" SET key_signature = ?2 WHERE name = ?1",
                        params![t.name, sig],
                    )
                    .map_err(e)?;
                    log_all = true;
                }
                Some(_) => {
                    c.execute_batch(&ddl::create_table_state(&t)).map_err(e)?;
                    if self.cfg.capture && names.iter().any(|n| !triggers.contains_key(n)) {
                        tracing::warn!(table = %t.name, "capture triggers were missing (table rebuilt?): reinstalling them and publishing every row, and a delete of every row gone meanwhile");
                        log_all = true;
                    }
                }
            }
            for (name, sql) in names.iter().zip(&expected) {
                let present = triggers.get(name);
                let want = self.cfg.capture;
                if present.is_some() && (!want || present != Some(sql)) {
                    c.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", ddl::quote(name)))
                        .map_err(e)?;
                }
                if want && present != Some(sql) {
                    c.execute_batch(sql).map_err(e)?;
                }
            }
            let table = Table {
                sql: ddl::TableSql::new(&t),
                indexes: indexes
                    .iter()
                    .filter(|i| i.content.eq_ignore_ascii_case(&t.name))
                    .cloned()
                    .collect(),
                info: t,
            };
            if log_all && self.cfg.capture {
                // Every row as it is, and a tombstone for every versioned row that is gone:
                // deletes made while no trigger logged them (a rebuild, marmot stopped).
                c.execute_batch(&table.sql.log_all).map_err(e)?;
                c.execute_batch(&table.sql.log_gone).map_err(e)?;
            }
            out.push(table);
        }
        self.stats.tables.store(out.len() as u64, Ordering::Relaxed);
        let counted = skipped
            .iter()
            .filter(|(_, r)| *r != schema::SkipReason::Shadow)
            .count();
        self.stats
            .skipped_tables
            .store(counted as u64, Ordering::Relaxed);
        self.by_name = out
            .iter()
            .enumerate()
            .map(|(i, t)| (t.info.name.clone(), i))
            .collect();
        self.tables = out;
        self.schema_version = c
            .query_row("PRAGMA schema_version", [], |r| r.get(0))
            .map_err(e)?;
        self.scan_needed = true;
        self.synced_in_txn = true;
        Ok(())
    }

    /// Re-reads the schema if an application changed it. Inside a transaction.
    fn follow_schema(&mut self) -> Result<(), StoreError> {
        let v: i64 = self
            .conn
            .query_row("PRAGMA schema_version", [], |r| r.get(0))
            .map_err(|e| self.sql_err(e))?;
        if v != self.schema_version {
            let known = self.schema_version != -1;
            self.sync_schema(false)?;
            if known {
                self.schema_changed = true;
            }
        }
        Ok(())
    }

    fn data_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.sql_err(e))
    }

    fn tx(&self, wall_ms: u64) -> Tx<'_> {
        Tx {
            conn: &self.conn,
            tables: &self.tables,
            by_name: &self.by_name,
            wall_ms,
            keep_conflicts: self.cfg.keep_conflicts,
            stats: &self.stats,
            incarnations: &self.incarnations,
            apply_tables: Vec::new(),
        }
    }

    /// Persists the clock's high-water mark. The running node's clock is the truth (it is
    /// read back only at start, in `recover`): it may have been lowered on purpose
    /// (`Clock::lower_to`), and reading the stored mark back would undo that.
    fn save_clock(&self, clock: &Clock) -> Result<(), StoreError> {
        meta_set(&self.conn, "clock", clock.high_water().as_u64() as i64)
            .map_err(|e| self.sql_err(e))
    }

    /// Captures pending local changes. Inside a transaction.
    fn capture_in_txn(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
    ) -> Result<Option<Captured>, StoreError> {
        if !self.cfg.capture {
            return Ok(None);
        }
        let dv = self.data_version()?;
        if dv == self.data_version && !self.scan_needed {
            return Ok(None);
        }
        let batch_seq = meta_get(&self.conn, "batch_seq")
            .map_err(|e| self.sql_err(e))?
            .unwrap_or(0) as u64
            + 1;
        let params = CaptureParams {
            node: self.cfg.node_id,
            incarnation: self.incarnation,
            batch_seq,
            wall_ms,
            compress: self.cfg.compress,
            max_fragment: self.cfg.max_fragment,
        };
        let mut tx = self.tx(wall_ms);
        let captured = capture(&mut tx, clock, &params).map_err(|e| self.sql_err(e))?;
        if captured.is_some() {
            meta_set(&self.conn, "batch_seq", batch_seq as i64).map_err(|e| self.sql_err(e))?;
            self.conn
                .prepare_cached(
                    "UPDATE \"__marmot__incarnations\" SET last_seq = ?2 WHERE incarnation = ?1",
                )
                .and_then(|mut st| st.execute(params![self.incarnation as i64, batch_seq as i64]))
                .map_err(|e| self.sql_err(e))?;
            self.incarnations.insert(self.incarnation, batch_seq);
        }
        self.data_version = dv;
        self.scan_needed = false;
        Ok(captured)
    }

    /// Applies again the parked batches `filter` selects (a `WHERE` clause, or nothing for
    /// all), oldest first; removes those that apply. Inside a transaction. Returns (tried,
    /// applied).
    fn retry_parked_where(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        filter: &str,
        report: &mut marmot_core::apply::ApplyReport,
    ) -> Result<(u64, u64), StoreError> {
        let me = self.cfg.node_id;
        let parked: Vec<(i64, marmot_core::apply::Parked)> = {
            let e = |x| self.sql_err(x);
            let mut stmt = self
                .conn
                .prepare_cached(&format!(
                    // In each node's capture order: the order its batches were made in.
                    "SELECT id, stream_seq, message FROM \"__marmot__parked\"{filter} \
                     ORDER BY origin, incarnation, batch_seq, id"
                ))
                .map_err(e)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        marmot_core::apply::Parked {
                            stream_seq: r.get::<_, i64>(1)? as u64,
                            batch: None,
                            reason: String::new(),
                            message: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                            collision: false,
                        },
                    ))
                })
                .map_err(e)?;
            rows.collect::<Result<_, _>>().map_err(e)?
        };
        let attempted = parked.len() as u64;
        let mut applied = 0;
        for (id, p) in parked {
            let mut tx = self.tx(wall_ms);
            let outcome = marmot_core::apply::retry_parked(&mut tx, clock, me, &p, wall_ms, report)
                .map_err(|x| self.sql_err(x))?;
            match outcome {
                None => {
                    self.conn
                        .execute("DELETE FROM \"__marmot__parked\" WHERE id = ?1", [id])
                        .map_err(|x| self.sql_err(x))?;
                    applied += 1;
                    tracing::info!(parked_id = id, "parked batch applied on retry");
                }
                Some((reason, collision)) => {
                    self.conn
                        .execute(
                            "UPDATE \"__marmot__parked\" SET reason = ?2, collision = ?3, attempts = attempts + 1, retry_requested = 0 WHERE id = ?1",
                            params![id, reason, collision],
                        )
                        .map_err(|x| self.sql_err(x))?;
                }
            }
        }
        Ok((attempted, applied))
    }

    /// Whether batches wait on a UNIQUE value.
    fn any_waiting(&self) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM \"__marmot__parked\" WHERE collision = 1)",
            )
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .map_err(|e| self.sql_err(e))
    }

    /// Applies the batches waiting on a UNIQUE value, each origin's together as one set (see
    /// `marmot_core::apply::retry_parked_jointly`). Inside a transaction. Returns how many
    /// applied.
    fn retry_collisions_jointly(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        report: &mut marmot_core::apply::ApplyReport,
    ) -> Result<u64, StoreError> {
        let me = self.cfg.node_id;
        let rows: Vec<(i64, Option<i64>, i64, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT id, origin, stream_seq, message FROM \"__marmot__parked\" WHERE collision = 1 \
                 ORDER BY origin, incarnation, batch_seq, id",
            )
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect()
            })
            .map_err(|e| self.sql_err(e))?;
        let mut groups: Vec<(Option<i64>, Vec<i64>, Vec<marmot_core::apply::Parked>)> = Vec::new();
        for (id, origin, stream_seq, message) in rows {
            if groups.last().is_none_or(|g| g.0 != origin) {
                groups.push((origin, Vec::new(), Vec::new()));
            }
            let g = groups.last_mut().expect("pushed above");
            g.1.push(id);
            g.2.push(marmot_core::apply::Parked {
                stream_seq: stream_seq as u64,
                batch: None,
                reason: String::new(),
                message: Bytes::from(message),
                collision: true,
            });
        }
        let mut applied = 0;
        for (_, ids, parked) in groups.into_iter().filter(|g| g.2.len() > 1) {
            // The whole set; if a batch of it collides for good (its value is taken on two
            // nodes), each set without one of its batches (a bounded number of tries).
            let mut tries: Vec<Option<usize>> = vec![None];
            if parked.len() <= 16 {
                tries.extend((0..parked.len()).map(Some));
            }
            let mut done: Option<Option<usize>> = None;
            for leave_out in tries {
                let set: Vec<marmot_core::apply::Parked> = parked
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| Some(*i) != leave_out)
                    .map(|(_, p)| p.clone())
                    .collect();
                let mut tx = self.tx(wall_ms);
                let outcome = marmot_core::apply::retry_parked_jointly(
                    &mut tx, clock, me, &set, wall_ms, report,
                )
                .map_err(|x| self.sql_err(x))?;
                if outcome.is_none() {
                    done = Some(leave_out);
                    break;
                }
            }
            if let Some(left) = done {
                let ids: Vec<i64> = ids
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| Some(*i) != left)
                    .map(|(_, id)| *id)
                    .collect();
                for id in &ids {
                    self.conn
                        .execute("DELETE FROM \"__marmot__parked\" WHERE id = ?1", [id])
                        .map_err(|x| self.sql_err(x))?;
                }
                tracing::info!(
                    batches = ids.len(),
                    "batches that waited on UNIQUE values applied together"
                );
                applied += ids.len() as u64;
            }
        }
        Ok(applied)
    }

    fn incomplete_batches(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM (SELECT DISTINCT origin, incarnation, seq FROM \"__marmot__inbox\")",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| self.sql_err(e))
    }

    fn position(&self) -> Result<u64, StoreError> {
        Ok(meta_get(&self.conn, "position")
            .map_err(|e| self.sql_err(e))?
            .unwrap_or(0) as u64)
    }
}

/// The open transaction of an operation (inside `in_txn`): the protocol's steps, in the
/// order `marmot_core::txn` runs them.
impl marmot_core::txn::LocalTxn for SqliteStore {
    type Error = StoreError;
    fn follow_schema(&mut self) -> Result<(), StoreError> {
        SqliteStore::follow_schema(self)
    }
    fn capture_pending(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
    ) -> Result<Option<Captured>, StoreError> {
        self.capture_in_txn(clock, wall_ms)
    }
    fn position(&mut self) -> Result<u64, StoreError> {
        SqliteStore::position(self)
    }
    fn apply_deliveries(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        position: u64,
        deliveries: &[marmot_core::apply::Delivery],
    ) -> Result<marmot_core::apply::ApplyReport, StoreError> {
        let me = self.cfg.node_id;
        let mut tx = self.tx(wall_ms);
        marmot_core::apply::apply_deliveries(&mut tx, clock, me, position, deliveries, wall_ms)
            .map_err(|e| self.sql_err(e))
    }
    fn record_position(&mut self, position: u64) -> Result<(), StoreError> {
        meta_set(&self.conn, "position", position as i64).map_err(|e| self.sql_err(e))
    }
    fn any_waiting(&mut self) -> Result<bool, StoreError> {
        SqliteStore::any_waiting(self)
    }
    fn retry_parked(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        which: marmot_core::txn::ParkedSelection,
        report: &mut marmot_core::apply::ApplyReport,
    ) -> Result<(u64, u64), StoreError> {
        use marmot_core::txn::ParkedSelection;
        let filter = match which {
            ParkedSelection::All => "",
            ParkedSelection::Requested => " WHERE retry_requested = 1",
            ParkedSelection::Waiting => " WHERE collision = 1",
        };
        self.retry_parked_where(clock, wall_ms, filter, report)
    }
    fn retry_waiting_jointly(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        report: &mut marmot_core::apply::ApplyReport,
    ) -> Result<u64, StoreError> {
        self.retry_collisions_jointly(clock, wall_ms, report)
    }
    fn parked_count(&mut self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM \"__marmot__parked\"", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(|e| self.sql_err(e))
    }
    fn incomplete_batches(&mut self) -> Result<u64, StoreError> {
        SqliteStore::incomplete_batches(self)
    }
    fn save_clock(&mut self, clock: &Clock) -> Result<(), StoreError> {
        SqliteStore::save_clock(self, clock)
    }
    fn take_schema_changed(&mut self) -> bool {
        std::mem::take(&mut self.schema_changed)
    }
}

fn load_incarnations(c: &Connection) -> rusqlite::Result<std::collections::BTreeMap<u64, u64>> {
    c.prepare("SELECT incarnation, last_seq FROM \"__marmot__incarnations\"")?
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?
        .collect()
}

fn user_marmot_tables(c: &Connection, kind: &str) -> rusqlite::Result<Vec<String>> {
    let prefix = format!("{PREFIX}{kind}");
    let mut stmt = c.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for n in names {
        let n = n?;
        if n.starts_with(&prefix) {
            out.push(n);
        }
    }
    Ok(out)
}

impl Storage for SqliteStore {
    type Error = StoreError;

    fn recover(&mut self) -> Result<Recovered, StoreError> {
        let node = self.cfg.node_id;
        let incarnation = self.incarnation;
        self.in_txn(|s| {
            let e = |x| s.sql_err(x);
            let position = s.position()?;
            let clock = meta_get(&s.conn, "clock").map_err(e)?.unwrap_or(0) as u64;
            let mut outbox = Vec::new();
            {
                let mut stmt = s
                    .conn
                    .prepare(
                        "SELECT incarnation, seq, max(chunks) FROM \"__marmot__outbox\" GROUP BY incarnation, seq ORDER BY incarnation, seq",
                    )
                    .map_err(e)?;
                let mut rows = stmt.query([]).map_err(e)?;
                while let Some(r) = rows.next().map_err(e)? {
                    let inc: i64 = r.get(0).map_err(e)?;
                    let seq: i64 = r.get(1).map_err(e)?;
                    let chunks: i64 = r.get(2).map_err(e)?;
                    outbox.push((
                        BatchId {
                            origin: node,
                            incarnation: inc as u64,
                            seq: seq as u64,
                        },
                        chunks as u32,
                    ));
                }
            }
            let parked: i64 = s
                .conn
                .query_row("SELECT count(*) FROM \"__marmot__parked\"", [], |r| r.get(0))
                .map_err(e)?;
            let empty = restore::is_empty(&s.conn).map_err(e)?;
            Ok(Recovered {
                position,
                clock: Stamp::from_u64(clock),
                outbox,
                incarnation,
                incomplete_batches: s.incomplete_batches()?,
                parked: parked as u64,
                empty,
            })
        })
    }

    fn capture(&mut self, clock: &mut Clock, wall_ms: u64) -> Result<CaptureOutcome, StoreError> {
        // Cheap check first: nobody else committed, nothing to look at.
        if self.data_version()? == self.data_version && !self.scan_needed {
            return Ok(CaptureOutcome::default());
        }
        self.in_txn(|s| {
            let outcome = marmot_core::txn::capture(s, clock, wall_ms)?;
            if !s.cfg.capture {
                // Nothing to capture, but follow what other connections did.
                s.data_version = s.data_version()?;
                s.scan_needed = false;
            }
            Ok(outcome)
        })
    }

    fn apply(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        deliveries: &[marmot_core::apply::Delivery],
    ) -> Result<ApplyOutcome, StoreError> {
        self.in_txn(|s| marmot_core::txn::apply(s, clock, wall_ms, deliveries))
    }

    fn mark_published(&mut self, batch: BatchId) -> Result<(), StoreError> {
        self.crash_point("before marking published")?;
        self.conn
            .prepare_cached("DELETE FROM \"__marmot__outbox\" WHERE incarnation = ?1 AND seq = ?2")
            .and_then(|mut s| s.execute(params![batch.incarnation as i64, batch.seq as i64]))
            .map(|_| ())
            .map_err(|e| self.sql_err(e))
    }

    fn outbox_message(&mut self, batch: BatchId, chunk: u32) -> Result<Option<Bytes>, StoreError> {
        self.alive()?;
        self.conn
            .prepare_cached("SELECT payload FROM \"__marmot__outbox\" WHERE incarnation = ?1 AND seq = ?2 AND chunk = ?3")
            .and_then(|mut s| {
                s.query_row(
                    params![batch.incarnation as i64, batch.seq as i64, i64::from(chunk)],
                    |r| r.get::<_, Vec<u8>>(0),
                )
                .optional()
            })
            .map(|o| o.map(Bytes::from))
            .map_err(|e| self.sql_err(e))
    }

    fn retry_parked(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        all: bool,
    ) -> Result<ParkedRetry, StoreError> {
        self.in_txn(|s| marmot_core::txn::retry_parked(s, clock, wall_ms, all))
    }

    fn restore(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snapshot: &StagedSnapshot,
    ) -> Result<RestoreReport, StoreError> {
        self.restore_snapshot(clock, wall_ms, snapshot)
    }
}
