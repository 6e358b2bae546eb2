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
use crate::apply::{
    ApplyFault, ApplyReport, ApplyTxn, ConflictRecord, Delivery, Parked, RowVersion,
    apply_deliveries, retry_parked_jointly,
};
use crate::capture::{CaptureParams, CaptureTxn, Captured, DirtyRow, DirtyTable, capture};
use crate::hlc::{Clock, NodeId, Stamp, Version};
use crate::ports::{
    ApplyOutcome, CaptureOutcome, ParkedRetry, Recovered, RestoreReport, Storage, StorageErrorKind,
    StorageFailure,
};
use crate::snapshot::StagedSnapshot;
use crate::txn::{LocalTxn, ParkedSelection};
use crate::value::{Value, ValueRef, sql_row_literal};
use crate::wire::{BatchId, Header, TableDef};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// Conflict records kept.
const KEEP_CONFLICTS: usize = 1000;

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
struct Table {
    /// Column names, key columns first.
    columns: Vec<String>,
    key_columns: usize,
    /// Rows by key literal, each in `columns` order.
    rows: BTreeMap<String, Vec<Value>>,
    /// Versions by key literal (tombstones too), with the key's values.
    versions: BTreeMap<String, (Vec<Value>, RowVersion)>,
    /// The change log: keys written since the last capture, with their values.
    dirty: BTreeMap<String, Vec<Value>>,
}

/// A parked batch.
#[derive(Clone, Debug)]
struct ParkedRow {
    id: u64,
    /// The batch's origin, incarnation and number (unreadable: none), for the retry order.
    batch: Option<BatchId>,
    p: Parked,
    attempts: u64,
    retry_requested: bool,
}

/// The whole database: what one transaction reads and writes.
#[derive(Clone, Debug, Default)]
pub(super) struct Db {
    tables: BTreeMap<String, Table>,
    /// The last stream sequence applied.
    pub(super) position: u64,
    /// The clock's high-water mark.
    clock: u64,
    /// The number of the last batch captured.
    batch_seq: u64,
    /// Incarnations of this database (its own batches carry one of them).
    incarnations: BTreeSet<u64>,
    /// Captured batches not yet published: (incarnation, seq) → messages.
    outbox: BTreeMap<(u64, u64), Vec<Bytes>>,
    parked: Vec<ParkedRow>,
    next_parked: u64,
    /// Chunks of incomplete batches: batch → chunk → fragment.
    inbox: BTreeMap<BatchId, BTreeMap<u32, Bytes>>,
    conflicts: Vec<ConflictRecord>,
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

    /// Runs `f` on a copy of the database and keeps the copy only when it succeeds.
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
        let db = lock(&self.db).clone();
        let mut t = MemTxn {
            db,
            savepoints: Vec::new(),
            handles: Vec::new(),
            node: self.node,
            incarnation: self.incarnation,
            max_fragment: self.max_fragment,
        };
        let r = f(&mut t)?;
        *lock(&self.db) = t.db;
        Ok(r)
    }
}

/// One transaction: a working copy of the database.
pub(crate) struct MemTxn {
    db: Db,
    /// Copies taken at each open savepoint.
    savepoints: Vec<Db>,
    /// Incoming table definitions matched to local tables: (table, local index of each
    /// incoming column).
    handles: Vec<(String, Vec<usize>)>,
    node: NodeId,
    incarnation: u64,
    max_fragment: usize,
}

impl MemTxn {
    /// A transaction over a copy of `app`'s database, as node `node` in incarnation
    /// `incarnation` (for the core's unit tests of capture and apply).
    #[cfg(test)]
    pub(crate) fn over(app: &MemoryApp, node: NodeId, incarnation: u64) -> Self {
        let mut db = app.copy();
        db.incarnations.insert(incarnation);
        MemTxn {
            db,
            savepoints: Vec::new(),
            handles: Vec::new(),
            node,
            incarnation,
            max_fragment: 512 * 1024,
        }
    }

    /// The rows of `table` as SQL row literals (for tests).
    #[cfg(test)]
    pub(crate) fn rows(&self, table: &str) -> Vec<String> {
        self.db.tables.get(table).map_or_else(Vec::new, |t| {
            t.rows
                .values()
                .map(|r| sql_row_literal(r.iter().map(Value::as_ref)))
                .collect()
        })
    }

    /// The version of `key` in `table` (for tests).
    #[cfg(test)]
    pub(crate) fn version_of(&self, table: &str, key: &[Value]) -> Option<RowVersion> {
        let k = sql_row_literal(key.iter().map(Value::as_ref));
        self.db.tables.get(table)?.versions.get(&k).map(|(_, v)| *v)
    }

    /// Batches parked, the messages in the outbox, conflicts recorded (for tests).
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (
            self.db.parked.len(),
            self.db.outbox.len(),
            self.db.conflicts.len(),
        )
    }

    fn local(&self, h: usize) -> &Table {
        &self.db.tables[&self.handles[h].0]
    }
    fn local_mut(&mut self, h: usize) -> &mut Table {
        let name = &self.handles[h].0;
        self.db
            .tables
            .get_mut(name)
            .expect("a handle names a table")
    }
    fn key(key: &[ValueRef<'_>]) -> String {
        sql_row_literal(key.iter().copied())
    }
}

/// A row of the change log as capture reads it.
struct Dirty<'a> {
    key: &'a [Value],
    row: Option<&'a [Value]>,
    base: Option<Version>,
}

impl DirtyRow for Dirty<'_> {
    fn exists(&self) -> bool {
        self.row.is_some()
    }
    fn value(&self, i: usize) -> ValueRef<'_> {
        match self.row {
            Some(r) => r[i].as_ref(),
            None => self.key[i].as_ref(),
        }
    }
    fn base(&self) -> Option<Version> {
        self.base
    }
}

impl CaptureTxn for MemTxn {
    type Error = MemoryError;

    fn dirty_tables(&mut self) -> Result<Vec<DirtyTable>, MemoryError> {
        Ok(self
            .db
            .tables
            .iter()
            .enumerate()
            .filter(|(_, (_, t))| !t.dirty.is_empty())
            .map(|(index, (name, t))| DirtyTable {
                index,
                name: name.clone(),
                columns: t.columns.clone(),
                key_columns: t.key_columns,
            })
            .collect())
    }

    fn read_dirty(
        &mut self,
        table: &DirtyTable,
        visit: &mut dyn FnMut(&dyn DirtyRow),
    ) -> Result<(), MemoryError> {
        let t = &self.db.tables[&table.name];
        for (k, key) in &t.dirty {
            visit(&Dirty {
                key,
                row: t.rows.get(k).map(Vec::as_slice),
                base: t.versions.get(k).map(|(_, v)| v.version),
            });
        }
        Ok(())
    }

    fn commit_dirty(&mut self, table: &DirtyTable, version: Version) -> Result<(), MemoryError> {
        let t = self
            .db
            .tables
            .get_mut(&table.name)
            .expect("a dirty table exists");
        for (k, key) in std::mem::take(&mut t.dirty) {
            let deleted = !t.rows.contains_key(&k);
            t.versions.insert(k, (key, RowVersion { version, deleted }));
        }
        Ok(())
    }

    fn put_outbox(&mut self, batch: BatchId, messages: &[Bytes]) -> Result<(), MemoryError> {
        self.db
            .outbox
            .insert((batch.incarnation, batch.seq), messages.to_vec());
        Ok(())
    }
}

impl ApplyTxn for MemTxn {
    type Error = MemoryError;
    type Table = usize;

    fn table(&mut self, def: &TableDef<'_>) -> Result<usize, ApplyFault<MemoryError>> {
        let Some(t) = self.db.tables.get(def.name) else {
            return Err(ApplyFault::Poison(format!("no such table: {}", def.name)));
        };
        let mut map = Vec::with_capacity(def.columns.len());
        for c in &def.columns {
            match t.columns.iter().position(|l| l == c) {
                Some(i) => map.push(i),
                None => {
                    return Err(ApplyFault::Poison(format!(
                        "table {} has no column named {c}",
                        def.name
                    )));
                }
            }
        }
        if def.key_columns != t.key_columns
            || map[..def.key_columns] != (0..t.key_columns).collect::<Vec<_>>()[..]
        {
            return Err(ApplyFault::Poison(format!(
                "table {} has another primary key",
                def.name
            )));
        }
        self.handles.push((def.name.to_string(), map));
        Ok(self.handles.len() - 1)
    }

    fn version(
        &mut self,
        h: usize,
        key: &[ValueRef<'_>],
    ) -> Result<Option<RowVersion>, ApplyFault<MemoryError>> {
        Ok(self.local(h).versions.get(&Self::key(key)).map(|(_, v)| *v))
    }

    fn write_row(
        &mut self,
        h: usize,
        values: &[ValueRef<'_>],
    ) -> Result<(), ApplyFault<MemoryError>> {
        let map = self.handles[h].1.clone();
        let t = self.local_mut(h);
        let k = MemTxn::key(&values[..t.key_columns]);
        let width = t.columns.len();
        let row = t.rows.entry(k).or_insert_with(|| vec![Value::Null; width]);
        for (v, &i) in values.iter().zip(&map) {
            row[i] = ValueRef::to_owned(*v);
        }
        Ok(())
    }

    fn delete_row(
        &mut self,
        h: usize,
        key: &[ValueRef<'_>],
    ) -> Result<(), ApplyFault<MemoryError>> {
        let k = Self::key(key);
        self.local_mut(h).rows.remove(&k);
        Ok(())
    }

    fn set_version(
        &mut self,
        h: usize,
        key: &[ValueRef<'_>],
        v: RowVersion,
    ) -> Result<(), ApplyFault<MemoryError>> {
        let k = Self::key(key);
        let owned = key.iter().map(|v| ValueRef::to_owned(*v)).collect();
        self.local_mut(h).versions.insert(k, (owned, v));
        Ok(())
    }

    fn read_row(
        &mut self,
        h: usize,
        key: &[ValueRef<'_>],
    ) -> Result<Option<Vec<Value>>, ApplyFault<MemoryError>> {
        let map = &self.handles[h].1;
        Ok(self
            .local(h)
            .rows
            .get(&Self::key(key))
            .map(|r| map.iter().map(|&i| r[i].clone()).collect()))
    }

    fn record_conflict(&mut self, c: &ConflictRecord) -> Result<(), MemoryError> {
        self.db.conflicts.push(c.clone());
        if self.db.conflicts.len() > KEEP_CONFLICTS {
            self.db.conflicts.remove(0);
        }
        Ok(())
    }

    fn savepoint(&mut self) -> Result<(), MemoryError> {
        self.savepoints.push(self.db.clone());
        Ok(())
    }

    fn release(&mut self) -> Result<(), MemoryError> {
        self.savepoints.pop();
        Ok(())
    }

    fn rollback_to(&mut self) -> Result<(), MemoryError> {
        if let Some(s) = self.savepoints.last() {
            self.db = s.clone();
        }
        Ok(())
    }

    fn stash_chunk(
        &mut self,
        h: &Header,
        _stream_seq: u64,
        fragment: &[u8],
    ) -> Result<Option<Bytes>, MemoryError> {
        let chunks = self.db.inbox.entry(h.batch).or_default();
        chunks.insert(h.chunk, Bytes::copy_from_slice(fragment));
        if chunks.len() < h.chunks as usize {
            return Ok(None);
        }
        let chunks = self.db.inbox.remove(&h.batch).unwrap_or_default();
        let mut whole = Vec::new();
        for f in chunks.values() {
            whole.extend_from_slice(f);
        }
        Ok(Some(Bytes::from(whole)))
    }

    fn park(&mut self, p: &Parked) -> Result<(), MemoryError> {
        self.db.next_parked += 1;
        self.db.parked.push(ParkedRow {
            id: self.db.next_parked,
            batch: p.batch,
            p: p.clone(),
            attempts: 1,
            retry_requested: false,
        });
        Ok(())
    }

    fn captured_here(&mut self, batch: &BatchId) -> bool {
        batch.origin == self.node && self.db.incarnations.contains(&batch.incarnation)
    }
}

impl LocalTxn for MemTxn {
    type Error = MemoryError;

    fn follow_schema(&mut self) -> Result<(), MemoryError> {
        Ok(())
    }

    fn capture_pending(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
    ) -> Result<Option<Captured>, MemoryError> {
        let params = CaptureParams {
            node: self.node,
            incarnation: self.incarnation,
            batch_seq: self.db.batch_seq + 1,
            wall_ms,
            compress: false,
            max_fragment: self.max_fragment,
        };
        let captured = capture(self, clock, &params)?;
        if captured.is_some() {
            self.db.batch_seq += 1;
        }
        Ok(captured)
    }

    fn position(&mut self) -> Result<u64, MemoryError> {
        Ok(self.db.position)
    }

    fn apply_deliveries(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        position: u64,
        deliveries: &[Delivery],
    ) -> Result<ApplyReport, MemoryError> {
        let me = self.node;
        apply_deliveries(self, clock, me, position, deliveries, wall_ms)
    }

    fn record_position(&mut self, position: u64) -> Result<(), MemoryError> {
        self.db.position = position;
        Ok(())
    }

    fn any_waiting(&mut self) -> Result<bool, MemoryError> {
        Ok(self.db.parked.iter().any(|p| p.p.collision))
    }

    fn retry_parked(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        which: ParkedSelection,
        report: &mut ApplyReport,
    ) -> Result<(u64, u64), MemoryError> {
        let mut chosen: Vec<ParkedRow> = self
            .db
            .parked
            .iter()
            .filter(|p| match which {
                ParkedSelection::All => true,
                ParkedSelection::Requested => p.retry_requested,
                ParkedSelection::Waiting => p.p.collision,
            })
            .cloned()
            .collect();
        // In each node's capture order.
        chosen.sort_by_key(|p| (p.batch.map(|b| (b.origin, b.incarnation, b.seq)), p.id));
        let attempted = chosen.len() as u64;
        let mut applied = 0;
        let me = self.node;
        for row in chosen {
            match crate::apply::retry_parked(self, clock, me, &row.p, wall_ms, report)? {
                None => {
                    self.db.parked.retain(|p| p.id != row.id);
                    applied += 1;
                }
                Some((reason, collision)) => {
                    if let Some(p) = self.db.parked.iter_mut().find(|p| p.id == row.id) {
                        p.p.reason = reason;
                        p.p.collision = collision;
                        p.attempts += 1;
                        p.retry_requested = false;
                    }
                }
            }
        }
        Ok((attempted, applied))
    }

    fn retry_waiting_jointly(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        report: &mut ApplyReport,
    ) -> Result<u64, MemoryError> {
        let mut by_origin: BTreeMap<Option<NodeId>, Vec<ParkedRow>> = BTreeMap::new();
        for p in self.db.parked.iter().filter(|p| p.p.collision) {
            by_origin
                .entry(p.batch.map(|b| b.origin))
                .or_default()
                .push(p.clone());
        }
        let me = self.node;
        let mut applied = 0;
        for (_, mut set) in by_origin.into_iter().filter(|(_, s)| s.len() > 1) {
            set.sort_by_key(|p| (p.batch.map(|b| (b.incarnation, b.seq)), p.id));
            let batches: Vec<Parked> = set.iter().map(|p| p.p.clone()).collect();
            if retry_parked_jointly(self, clock, me, &batches, wall_ms, report)?.is_none() {
                let ids: BTreeSet<u64> = set.iter().map(|p| p.id).collect();
                self.db.parked.retain(|p| !ids.contains(&p.id));
                applied += ids.len() as u64;
            }
        }
        Ok(applied)
    }

    fn parked_count(&mut self) -> Result<u64, MemoryError> {
        Ok(self.db.parked.len() as u64)
    }

    fn incomplete_batches(&mut self) -> Result<u64, MemoryError> {
        Ok(self.db.inbox.len() as u64)
    }

    fn save_clock(&mut self, clock: &Clock) -> Result<(), MemoryError> {
        self.db.clock = clock.high_water().as_u64();
        Ok(())
    }

    fn take_schema_changed(&mut self) -> bool {
        false
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
    /// are kept), and the later of the two positions.
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
            if t.db.is_empty() {
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
                t.db.clock = t.db.clock.max(snap.clock);
                return Ok(RestoreReport {
                    position: snap.position,
                    generation,
                    merged: false,
                    captured: None,
                });
            }
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
                    clock.observe(v.version.stamp);
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
            t.save_clock(clock)?;
            Ok(RestoreReport {
                position: t.db.position,
                generation,
                merged: true,
                captured,
            })
        })
    }
}
