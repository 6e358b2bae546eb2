//! [`MemoryStorage`]: the [`Storage`] port over an in-memory database, a second model of
//! what the SQLite adapter does.
//!
//! Tables hold rows keyed by their primary key (compared by storage class and bytes, as a
//! STRICT `ANY` key with BINARY collation compares them), a version per key (tombstones
//! included) and a change log of keys, which [`MemoryApp`]'s writes fill as the SQLite
//! adapter's triggers do. Every operation runs on a copy of the database and replaces it only
//! when the operation succeeded: atomic, as a transaction is. Capture, apply and parked
//! retries run the core's own algorithms ([`crate::capture`], [`crate::apply`]) through the
//! core's transaction recipes ([`crate::txn`]): the model differs from SQLite only where it
//! keeps rows. It has no secondary UNIQUE constraints, so nothing ever waits on a value.

use super::snapshots::MemorySnapshotStore;
use super::txn::MemTxn;
use crate::apply::{ConflictRecord, Delivery, Parked, RowVersion};
use crate::hlc::{Clock, NodeId, Stamp};
use crate::ports::{
    ApplyOutcome, CaptureOutcome, ParkedRetry, Recovered, RestoreReport, Storage, StorageErrorKind,
    StorageFailure,
};
use crate::snapshot::StagedSnapshot;
use crate::txn::LocalTxn;
use crate::value::{Value, sql_row_literal};
use crate::wire::BatchId;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// Conflict records kept.
pub(super) const KEEP_CONFLICTS: usize = 1000;

/// A failure of [`MemoryStorage`]. The model fails only when told to
/// ([`MemoryStorage::fail_next`]) or when asked for a snapshot it does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("in-memory database: {message}")]
pub struct MemoryError {
    /// What kind of failure it stands for.
    pub kind: StorageErrorKind,
    /// Why.
    pub message: String,
}

impl StorageFailure for MemoryError {
    fn kind(&self) -> StorageErrorKind {
        self.kind
    }
}

/// One table.
#[derive(Clone, Debug)]
pub(super) struct Table {
    /// Column names, key columns first.
    pub(super) columns: Vec<String>,
    pub(super) key_columns: usize,
    /// Rows by key literal, each in `columns` order.
    pub(super) rows: BTreeMap<String, Vec<Value>>,
    /// Versions by key literal (tombstones too), with the key's values.
    pub(super) versions: BTreeMap<String, (Vec<Value>, RowVersion)>,
    /// The change log: keys written since the last capture, with their values.
    pub(super) dirty: BTreeMap<String, Vec<Value>>,
}

/// A parked batch.
#[derive(Clone, Debug)]
pub(super) struct ParkedRow {
    pub(super) id: u64,
    /// The batch's origin, incarnation and number (unreadable: none), for the retry order.
    pub(super) batch: Option<BatchId>,
    pub(super) p: Parked,
    pub(super) attempts: u64,
    pub(super) retry_requested: bool,
}

/// The whole database: what one transaction reads and writes.
#[derive(Clone, Debug, Default)]
pub(super) struct Db {
    pub(super) tables: BTreeMap<String, Table>,
    /// The last stream sequence applied.
    pub(super) position: u64,
    /// The clock's high-water mark.
    pub(super) clock: u64,
    /// The number of the last batch captured.
    pub(super) batch_seq: u64,
    /// Incarnations of this database (its own batches carry one of them).
    pub(super) incarnations: BTreeSet<u64>,
    /// Captured batches not yet published: (incarnation, seq) → messages.
    pub(super) outbox: BTreeMap<(u64, u64), Vec<Bytes>>,
    pub(super) parked: Vec<ParkedRow>,
    pub(super) next_parked: u64,
    /// Chunks of incomplete batches: batch → chunk → fragment.
    pub(super) inbox: BTreeMap<BatchId, BTreeMap<u32, Bytes>>,
    pub(super) conflicts: Vec<ConflictRecord>,
}

impl Db {
    /// No row, no version, nothing captured or applied: a new database.
    fn is_empty(&self) -> bool {
        self.position == 0
            && self.batch_seq == 0
            && self
                .tables
                .values()
                .all(|t| t.rows.is_empty() && t.versions.is_empty())
    }
}

/// The application's side of an in-memory database: its writes, which the change log
/// records as capture triggers would, and reads.
#[derive(Clone)]
pub struct MemoryApp {
    db: Arc<Mutex<Db>>,
}

fn lock(db: &Mutex<Db>) -> MutexGuard<'_, Db> {
    // A test that panicked while holding it: the state is still worth reading.
    db.lock().unwrap_or_else(|e| e.into_inner())
}

fn key_of(values: &[Value], key_columns: usize) -> String {
    sql_row_literal(values[..key_columns].iter().map(Value::as_ref))
}

impl MemoryApp {
    /// Creates `table` with `columns` (the first `key_columns` form its primary key), as a
    /// schema every node shares.
    pub fn create_table(&self, table: &str, columns: &[&str], key_columns: usize) {
        lock(&self.db).tables.insert(
            table.to_string(),
            Table {
                columns: columns.iter().map(|c| c.to_string()).collect(),
                key_columns,
                rows: BTreeMap::new(),
                versions: BTreeMap::new(),
                dirty: BTreeMap::new(),
            },
        );
    }

    /// Inserts or replaces a row (all columns, in the table's order), in one transaction.
    ///
    /// # Panics
    /// When the table does not exist or the row has the wrong number of columns: a test's
    /// mistake.
    pub fn upsert(&self, table: &str, row: Vec<Value>) {
        let mut db = lock(&self.db);
        let t = db.tables.get_mut(table).expect("a table the test created");
        assert_eq!(row.len(), t.columns.len(), "a whole row");
        let key = key_of(&row, t.key_columns);
        t.dirty.insert(key.clone(), row[..t.key_columns].to_vec());
        t.rows.insert(key, row);
    }

    /// Deletes the row with this key, if any, in one transaction.
    pub fn delete(&self, table: &str, key: Vec<Value>) {
        let mut db = lock(&self.db);
        let t = db.tables.get_mut(table).expect("a table the test created");
        let k = sql_row_literal(key.iter().map(Value::as_ref));
        if t.rows.remove(&k).is_some() {
            t.dirty.insert(k, key);
        }
    }

    /// Every row of `table` as an SQL row literal, in key order.
    pub fn rows(&self, table: &str) -> Vec<String> {
        let db = lock(&self.db);
        db.tables.get(table).map_or_else(Vec::new, |t| {
            t.rows
                .values()
                .map(|r| sql_row_literal(r.iter().map(Value::as_ref)))
                .collect()
        })
    }

    /// Every row of `table`, in key order.
    pub fn values(&self, table: &str) -> Vec<Vec<Value>> {
        let db = lock(&self.db);
        db.tables
            .get(table)
            .map_or_else(Vec::new, |t| t.rows.values().cloned().collect())
    }

    /// The conflict records kept.
    pub fn conflicts(&self) -> Vec<ConflictRecord> {
        lock(&self.db).conflicts.clone()
    }

    /// A copy of the whole database (what a snapshot of it holds).
    pub(super) fn copy(&self) -> Db {
        lock(&self.db).clone()
    }
}

/// The [`Storage`] port over an in-memory database (see the module documentation).
pub struct MemoryStorage {
    db: Arc<Mutex<Db>>,
    node: NodeId,
    incarnation: u64,
    max_fragment: usize,
    snapshots: MemorySnapshotStore,
    fail_next: Option<StorageErrorKind>,
}

impl MemoryStorage {
    /// A new, empty database of node `node`, whose snapshots (if any) come from `snapshots`.
    pub fn new(node: NodeId, snapshots: MemorySnapshotStore) -> Self {
        Self::open(Arc::new(Mutex::new(Db::default())), node, snapshots)
    }

    /// The same database opened again, as after a restart: a new incarnation.
    pub fn reopen(&self) -> Self {
        let mut s = Self::open(self.db.clone(), self.node, self.snapshots.clone());
        s.max_fragment = self.max_fragment;
        s
    }

    fn open(db: Arc<Mutex<Db>>, node: NodeId, snapshots: MemorySnapshotStore) -> Self {
        let incarnation = {
            let mut d = lock(&db);
            let i = d.incarnations.last().map_or(1, |i| i + 1);
            d.incarnations.insert(i);
            i
        };
        MemoryStorage {
            db,
            node,
            incarnation,
            max_fragment: 512 * 1024,
            snapshots,
            fail_next: None,
        }
    }

    /// Splits batch bodies into fragments of at most `bytes` (many messages per batch).
    pub fn with_max_fragment(mut self, bytes: usize) -> Self {
        self.max_fragment = bytes.max(1);
        self
    }

    /// The application's handle on this database.
    pub fn app(&self) -> MemoryApp {
        MemoryApp {
            db: self.db.clone(),
        }
    }

    /// The next operation fails with `kind`, changing nothing (as a busy lock or an I/O
    /// error would).
    pub fn fail_next(&mut self, kind: StorageErrorKind) {
        self.fail_next = Some(kind);
    }

    /// Runs `f` on a copy of the database and keeps the copy only when it succeeds. The
    /// database stays locked meanwhile: an application write waits for the transaction, as
    /// it waits for SQLite's write lock.
    fn in_txn<R>(
        &mut self,
        f: impl FnOnce(&mut MemTxn) -> Result<R, MemoryError>,
    ) -> Result<R, MemoryError> {
        if let Some(kind) = self.fail_next.take() {
            return Err(MemoryError {
                kind,
                message: "injected failure".into(),
            });
        }
        let mut guard = lock(&self.db);
        let mut t = MemTxn {
            db: guard.clone(),
            savepoints: Vec::new(),
            handles: Vec::new(),
            node: self.node,
            incarnation: self.incarnation,
            max_fragment: self.max_fragment,
        };
        let r = f(&mut t)?;
        *guard = t.db;
        Ok(r)
    }
}

impl Storage for MemoryStorage {
    type Error = MemoryError;

    fn recover(&mut self) -> Result<Recovered, MemoryError> {
        let incarnation = self.incarnation;
        self.in_txn(|t| {
            let db = &t.db;
            Ok(Recovered {
                position: db.position,
                clock: Stamp::from_u64(db.clock),
                outbox: db
                    .outbox
                    .iter()
                    .map(|(&(inc, seq), m)| {
                        (
                            BatchId {
                                origin: t.node,
                                incarnation: inc,
                                seq,
                            },
                            m.len() as u32,
                        )
                    })
                    .collect(),
                incarnation,
                incomplete_batches: db.inbox.len() as u64,
                parked: db.parked.len() as u64,
                empty: db.is_empty(),
                outbox_oldest_ms: db.outbox.values().next().and_then(|m| {
                    m.first()
                        .and_then(|p| crate::wire::decode_message(p).ok())
                        .map(|(h, _)| h.stamp.wall_ms())
                }),
                wall_ms: 0,
            })
        })
    }

    fn capture(&mut self, clock: &mut Clock, wall_ms: u64) -> Result<CaptureOutcome, MemoryError> {
        self.in_txn(|t| crate::txn::capture(t, clock, wall_ms))
    }

    fn apply(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        deliveries: &[Delivery],
    ) -> Result<ApplyOutcome, MemoryError> {
        self.in_txn(|t| crate::txn::apply(t, clock, wall_ms, deliveries))
    }

    fn mark_published(&mut self, batch: BatchId) -> Result<(), MemoryError> {
        self.in_txn(|t| {
            t.db.outbox.remove(&(batch.incarnation, batch.seq));
            Ok(())
        })
    }

    fn outbox_message(&mut self, batch: BatchId, chunk: u32) -> Result<Option<Bytes>, MemoryError> {
        self.in_txn(|t| {
            Ok(t.db
                .outbox
                .get(&(batch.incarnation, batch.seq))
                .and_then(|m| m.get(chunk as usize).cloned()))
        })
    }

    fn retry_parked(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        all: bool,
    ) -> Result<ParkedRetry, MemoryError> {
        self.in_txn(|t| crate::txn::retry_parked(t, clock, wall_ms, all))
    }

    /// An empty database takes the snapshot whole (keeping its own identity: incarnations,
    /// capture counter, outbox); one with content captures its pending writes first, then
    /// takes each key whose snapshot version is newer than its own (rows the snapshot lacks
    /// are kept), and the later of the two positions. Both take the snapshot's chunks of
    /// incomplete batches and its parked batches (the stream may no longer hold what they
    /// need), and merge its clock as a remote stamp (bounded by the clock's lead), as the
    /// SQLite adapter does.
    fn restore(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snapshot: &StagedSnapshot,
    ) -> Result<RestoreReport, MemoryError> {
        let Some(snap) = self.snapshots.staged(&snapshot.path) else {
            return Err(MemoryError {
                kind: StorageErrorKind::Refused,
                message: format!("no snapshot staged at {}", snapshot.path.display()),
            });
        };
        let generation = snapshot.info.generation;
        self.in_txn(|t| {
            let whole = t.db.is_empty();
            let captured = if whole {
                for (name, theirs) in &snap.tables {
                    let mine =
                        t.db.tables
                            .entry(name.clone())
                            .or_insert_with(|| theirs.clone());
                    mine.rows = theirs.rows.clone();
                    mine.versions = theirs.versions.clone();
                    mine.dirty.clear();
                }
                t.db.position = snap.position;
                None
            } else {
                let captured = t.capture_pending(clock, wall_ms)?;
                for (name, theirs) in &snap.tables {
                    let Some(mine) = t.db.tables.get_mut(name) else {
                        continue;
                    };
                    for (k, (key, v)) in &theirs.versions {
                        let newer = mine
                            .versions
                            .get(k)
                            .is_none_or(|(_, m)| m.version < v.version);
                        if !newer {
                            continue;
                        }
                        match theirs.rows.get(k) {
                            Some(row) if !v.deleted => {
                                mine.rows.insert(k.clone(), row.clone());
                            }
                            _ => {
                                mine.rows.remove(k);
                            }
                        }
                        mine.versions.insert(k.clone(), (key.clone(), *v));
                    }
                }
                t.db.position = t.db.position.max(snap.position);
                captured
            };
            t.import_cluster_state(&snap);
            clock.observe_remote(Stamp::from_u64(snap.clock), wall_ms);
            t.save_clock(clock)?;
            Ok(RestoreReport {
                position: t.db.position,
                generation,
                merged: !whole,
                captured,
            })
        })
    }
}
