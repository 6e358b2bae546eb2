//! One transaction of the in-memory database: a working copy, and the core's transaction
//! traits over it (capture, apply, and the protocol's steps), so that capture, apply and
//! parked retries run the core's own algorithms.

use crate::apply::{
    ApplyFault, ApplyReport, ApplyTxn, ConflictRecord, Delivery, Parked, RowVersion,
    apply_deliveries, retry_parked_jointly,
};
use crate::capture::{CaptureParams, CaptureTxn, Captured, DirtyRow, DirtyTable, capture};
use crate::hlc::{Clock, NodeId, Version};
use crate::txn::{LocalTxn, ParkedSelection};
use crate::value::{Value, ValueRef, sql_row_literal};
use crate::wire::{BatchId, Header, TableDef};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};

#[cfg(test)]
use super::storage::MemoryApp;
use super::storage::{Db, KEEP_CONFLICTS, MemoryError, ParkedRow, Table};

/// One transaction: a working copy of the database.
pub(crate) struct MemTxn {
    pub(super) db: Db,
    /// Copies taken at each open savepoint.
    pub(super) savepoints: Vec<Db>,
    /// Incoming table definitions matched to local tables: (table, local index of each
    /// incoming column).
    pub(super) handles: Vec<(String, Vec<usize>)>,
    pub(super) node: NodeId,
    pub(super) incarnation: u64,
    pub(super) max_fragment: usize,
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

    /// Takes a snapshot's chunks of incomplete batches and the parked batches this database
    /// does not hold yet (marked for retry).
    pub(super) fn import_cluster_state(&mut self, snap: &Db) {
        for (batch, chunks) in &snap.inbox {
            let mine = self.db.inbox.entry(*batch).or_default();
            for (c, f) in chunks {
                mine.entry(*c).or_insert_with(|| f.clone());
            }
        }
        for p in &snap.parked {
            if !self
                .db
                .parked
                .iter()
                .any(|q| q.p.stream_seq == p.p.stream_seq)
            {
                self.db.next_parked += 1;
                self.db.parked.push(ParkedRow {
                    id: self.db.next_parked,
                    retry_requested: true,
                    ..p.clone()
                });
            }
        }
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
                // The in-memory storage has no schema changes.
                schema_version: None,
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
        _version: Version,
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
