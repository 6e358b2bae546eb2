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
pub mod digest;
pub mod filter;
pub mod fts;
mod migrate;
pub mod replicated;
mod restore;
pub mod schema;
pub mod snapshot;
mod steps;
mod sync;
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
    /// Replicate schema changes: capture the application's DDL with its rows, and apply other
    /// nodes' (false: each node's schema is its own, as before).
    pub replicate_schema: bool,
    /// Which tables replicate (the `[tables]` include and exclude lists).
    pub tables: filter::TableFilter,
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
            replicate_schema: true,
            tables: filter::TableFilter::all(),
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
    /// [`replicated::schema_digest`] as of the last schema change seen.
    pub schema_digest: std::sync::Mutex<String>,
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
            replicate_schema: self.cfg.replicate_schema,
            capture: self.cfg.capture,
            resynced: None,
            republished: false,
        }
    }
}

fn load_incarnations(c: &Connection) -> rusqlite::Result<std::collections::BTreeMap<u64, u64>> {
    c.prepare("SELECT incarnation, last_seq FROM \"__marmot__incarnations\"")?
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?
        .collect()
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
            // The oldest batch's stamp, from its first message's header.
            let outbox_oldest_ms = match outbox.first() {
                Some((b, _)) => s
                    .conn
                    .query_row(
                        "SELECT payload FROM \"__marmot__outbox\" WHERE incarnation = ?1 AND seq = ?2 AND chunk = 0",
                        [b.incarnation as i64, b.seq as i64],
                        |r| r.get::<_, Vec<u8>>(0),
                    )
                    .optional()
                    .map_err(e)?
                    .and_then(|p| marmot_core::wire::decode_message(&p).ok().map(|(h, _)| h.stamp.wall_ms())),
                None => None,
            };
            Ok(Recovered {
                position,
                clock: Stamp::from_u64(clock),
                outbox,
                incarnation,
                incomplete_batches: s.incomplete_batches()?,
                parked: parked as u64,
                empty,
                outbox_oldest_ms,
                wall_ms: 0,
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
