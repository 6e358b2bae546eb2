//! Capture: turn the rows local applications changed into one stamped, sealed batch.
//!
//! The storage adapter finds the changed rows (its triggers log only which keys changed)
//! and shows each as it is now, with the version it had; this module stamps the batch,
//! encodes it, and hands back sealed messages for the outbox. All of it runs inside one
//! storage transaction, so the batch is exactly the union of the application transactions
//! committed before it, never part of one.
//!
//! Invariant: the batch stamp is above the version of every row it replaces.

use crate::hlc::{Clock, NodeId, Stamp, Version};
use crate::value::ValueRef;
use crate::wire::{BatchId, BodyWriter, ObjectKind, SchemaItem, seal};
use bytes::Bytes;

/// A table with changed rows waiting to be captured.
#[derive(Clone, Debug)]
pub struct DirtyTable {
    /// The adapter's handle for the table.
    pub index: usize,
    /// Table name.
    pub name: String,
    /// Column names, key columns first.
    pub columns: Vec<String>,
    /// How many of `columns` form the primary key.
    pub key_columns: usize,
    /// The version of the replicated schema change that created or last changed the table
    /// (`None`: it is as every node started, or schema changes do not replicate). Rows carry
    /// it (a versioned table item), so receivers can tell rows of a dropped table from rows of
    /// the table created again.
    pub schema_version: Option<Version>,
}

/// A schema object that changed since the last capture (see [`SchemaItem`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaChange {
    /// What kind of object.
    pub kind: ObjectKind,
    /// Its name (empty for `user_version`).
    pub name: String,
    /// The table it belongs to.
    pub table: String,
    /// The object as it was at the last capture or apply (None: it did not exist).
    pub old_sql: Option<String>,
    /// The object now (None: dropped).
    pub new_sql: Option<String>,
    /// The version the object had (None: never versioned): the batch is stamped above it.
    pub base: Option<Version>,
}

impl SchemaChange {
    /// The change as a body carries it.
    pub fn item(&self) -> SchemaItem<'_> {
        SchemaItem {
            kind: self.kind,
            name: &self.name,
            table: &self.table,
            old_sql: self.old_sql.as_deref(),
            new_sql: self.new_sql.as_deref(),
        }
    }
}

/// One changed row as it is now.
pub trait DirtyRow {
    /// The row still exists (otherwise it was deleted, and only key values are readable).
    fn exists(&self) -> bool;
    /// Value of column `i` (in [`DirtyTable::columns`] order).
    fn value(&self, i: usize) -> ValueRef<'_>;
    /// The version the row had before this change (None: never versioned).
    fn base(&self) -> Option<Version>;
}

/// What capture needs from the storage transaction it runs in.
pub trait CaptureTxn {
    /// Storage failure: the whole transaction is rolled back and retried later.
    type Error;
    /// Schema objects changed since the last capture, in the order a receiver must apply
    /// them. The default: the storage does not replicate schema.
    fn schema_changes(&mut self) -> Result<Vec<SchemaChange>, Self::Error> {
        Ok(Vec::new())
    }
    /// Records `changes` as captured at `version` (the next capture does not find them again).
    fn commit_schema(
        &mut self,
        changes: &[SchemaChange],
        version: Version,
    ) -> Result<(), Self::Error> {
        let _ = (changes, version);
        Ok(())
    }
    /// Tables with changed rows.
    fn dirty_tables(&mut self) -> Result<Vec<DirtyTable>, Self::Error>;
    /// Visits every distinct changed row of `table` once, as it is now.
    fn read_dirty(
        &mut self,
        table: &DirtyTable,
        visit: &mut dyn FnMut(&dyn DirtyRow),
    ) -> Result<(), Self::Error>;
    /// Gives every changed row of `table` the version `version` (a tombstone when the row no
    /// longer exists) and clears the table's change log.
    fn commit_dirty(&mut self, table: &DirtyTable, version: Version) -> Result<(), Self::Error>;
    /// Stores a sealed batch in the outbox, to publish until acknowledged.
    fn put_outbox(&mut self, batch: BatchId, messages: &[Bytes]) -> Result<(), Self::Error>;
    /// Tables whose rows go out as a repair (see [`crate::wire::TableDef::repair`]): this
    /// node holds values that a node whose change lost here may have lost. The default:
    /// none.
    fn repair_tables(&mut self) -> Result<Vec<DirtyTable>, Self::Error> {
        Ok(Vec::new())
    }
    /// Visits every row of `table` that exists, as it is now, with its own version as its
    /// `base`.
    fn read_repair(
        &mut self,
        table: &DirtyTable,
        visit: &mut dyn FnMut(&dyn DirtyRow),
    ) -> Result<(), Self::Error> {
        let _ = (table, visit);
        Ok(())
    }
    /// The repair of `table` went into a batch: it is not asked for again.
    fn commit_repair(&mut self, table: &DirtyTable) -> Result<(), Self::Error> {
        let _ = table;
        Ok(())
    }
}

/// Who captures, and how to seal.
#[derive(Clone, Debug)]
pub struct CaptureParams {
    /// This node.
    pub node: NodeId,
    /// This node's incarnation (see [`BatchId`]).
    pub incarnation: u64,
    /// The number the new batch gets.
    pub batch_seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Compress bodies with zstd.
    pub compress: bool,
    /// Largest body fragment per message, in bytes.
    pub max_fragment: usize,
}

/// A captured batch, already stored in the outbox.
#[derive(Clone, Debug)]
pub struct Captured {
    /// Its id.
    pub batch: BatchId,
    /// The stamp every row got.
    pub stamp: Stamp,
    /// How many rows it carries.
    pub rows: u64,
    /// Rows it carries per table (repairs not counted), for per-table metrics.
    pub tables: Vec<(String, u64)>,
    /// Sealed messages, chunk order.
    pub messages: Vec<Bytes>,
    /// It carries schema changes: a publish barrier (see the node's outbox).
    pub schema: bool,
}

/// Captures every pending change as one batch, or returns `None` when nothing changed. Schema
/// changes lead the batch: its rows are in the new shape.
pub fn capture<T: CaptureTxn>(
    txn: &mut T,
    clock: &mut Clock,
    p: &CaptureParams,
) -> Result<Option<Captured>, T::Error> {
    let schema = txn.schema_changes()?;
    let tables = txn.dirty_tables()?;
    let repairs = txn.repair_tables()?;
    if tables.is_empty() && schema.is_empty() && repairs.is_empty() {
        return Ok(None);
    }
    let mut body = BodyWriter::default();
    let mut max_base = Stamp::ZERO;
    for c in &schema {
        if let Some(b) = c.base {
            max_base = max_base.max(b.stamp);
        }
        body.schema(&c.item());
    }
    let mut per_table = Vec::with_capacity(tables.len());
    for t in &tables {
        let rows_before = body.rows();
        let changed_here = schema.iter().any(|c| {
            c.kind == crate::wire::ObjectKind::Table && c.name == t.name && c.new_sql.is_some()
        });
        match (changed_here, t.schema_version) {
            (true, _) => body.table_versioned(
                &t.name,
                &t.columns,
                t.key_columns,
                crate::wire::TableVersion::ThisBatch,
            ),
            (false, Some(v)) => body.table_versioned(
                &t.name,
                &t.columns,
                t.key_columns,
                crate::wire::TableVersion::At(v),
            ),
            (false, None) => body.table(&t.name, &t.columns, t.key_columns),
        }
        txn.read_dirty(t, &mut |row| {
            let base = row.base();
            if let Some(b) = base {
                max_base = max_base.max(b.stamp);
            }
            if row.exists() {
                body.upsert(base, (0..t.columns.len()).map(|i| row.value(i)));
            } else {
                body.delete(base, (0..t.key_columns).map(|i| row.value(i)));
            }
        })?;
        if body.rows() > rows_before {
            per_table.push((t.name.clone(), body.rows() - rows_before));
        }
    }
    // Repairs after the writes: a row this batch writes has its new version on the
    // receivers by then, and its repair (at the version it replaces) changes nothing there.
    for t in &repairs {
        let changed_here = schema.iter().any(|c| {
            c.kind == crate::wire::ObjectKind::Table && c.name == t.name && c.new_sql.is_some()
        });
        let version = if changed_here {
            Some(crate::wire::TableVersion::ThisBatch)
        } else {
            t.schema_version.map(crate::wire::TableVersion::At)
        };
        body.table_repair(&t.name, &t.columns, t.key_columns, version);
        txn.read_repair(t, &mut |row| {
            if row.exists() {
                body.upsert(row.base(), (0..t.columns.len()).map(|i| row.value(i)));
            }
        })?;
    }
    // Above every version the batch replaces, however far ahead a fast clock elsewhere put
    // it (without letting that drag this clock: see `Clock::tick_above`).
    let stamp = clock.tick_above(p.wall_ms, max_base);
    let version = Version {
        stamp,
        node: p.node,
    };
    if !schema.is_empty() {
        txn.commit_schema(&schema, version)?;
    }
    for t in &tables {
        txn.commit_dirty(t, version)?;
    }
    for t in &repairs {
        txn.commit_repair(t)?;
    }
    if body.rows() == 0 && body.schema_items() == 0 {
        return Ok(None);
    }
    let batch = BatchId {
        origin: p.node,
        incarnation: p.incarnation,
        seq: p.batch_seq,
    };
    let messages = seal(
        batch,
        stamp,
        body.format(),
        body.as_bytes(),
        p.compress,
        p.max_fragment,
    );
    txn.put_outbox(batch, &messages)?;
    Ok(Some(Captured {
        batch,
        stamp,
        rows: body.rows(),
        tables: per_table,
        messages,
        schema: body.schema_items() > 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemTxn, MemoryApp, MemorySnapshotStore, MemoryStorage};
    use crate::value::Value;
    use crate::wire::{BodyReader, Item, decode_message, unseal};

    const T0: u64 = 1_700_000_000_000;

    fn db() -> MemoryApp {
        let s = MemoryStorage::new(1, MemorySnapshotStore::default());
        let app = s.app();
        app.create_table("t", &["id", "v"], 1);
        app.create_table("u", &["k", "w"], 1);
        app
    }

    fn params(seq: u64, wall_ms: u64, max_fragment: usize) -> CaptureParams {
        CaptureParams {
            node: 1,
            incarnation: 1,
            batch_seq: seq,
            wall_ms,
            compress: false,
            max_fragment,
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.as_bytes().to_vec())
    }

    /// (table, upsert?, base) of every row of a captured batch.
    fn items(c: &Captured) -> Vec<(String, bool, Option<Version>)> {
        let mut payload = Vec::new();
        let mut header = None;
        for m in &c.messages {
            let (h, f) = decode_message(m).unwrap();
            header.get_or_insert(h);
            payload.extend_from_slice(f);
        }
        let h = header.unwrap();
        assert_eq!(h.stamp, c.stamp);
        assert_eq!(h.batch, c.batch);
        let body = unseal(&h, Bytes::from(payload)).unwrap();
        let mut r = BodyReader::new(&body);
        let mut values = Vec::new();
        let mut out = Vec::new();
        let mut table = String::new();
        while let Some(item) = r.next_item(&mut values).unwrap() {
            match item {
                Item::Schema(_) => {}
                Item::Table(t) => table = t.name.to_string(),
                Item::Upsert { base } => out.push((table.clone(), true, base)),
                Item::Delete { base } => out.push((table.clone(), false, base)),
            }
        }
        out
    }

    #[test]
    fn nothing_written_captures_nothing() {
        let mut t = MemTxn::over(&db(), 1, 1);
        let mut c = Clock::new(Stamp::ZERO);
        assert!(
            capture(&mut t, &mut c, &params(1, T0, 1 << 20))
                .unwrap()
                .is_none()
        );
        assert_eq!(t.counts().1, 0, "nothing in the outbox");
    }

    #[test]
    fn every_changed_row_of_every_table_goes_in_one_batch_with_one_stamp() {
        let app = db();
        app.upsert("t", vec![Value::Integer(1), text("a")]);
        app.upsert("t", vec![Value::Integer(2), text("b")]);
        app.upsert("u", vec![Value::Integer(9), text("z")]);
        let mut t = MemTxn::over(&app, 1, 1);
        let mut c = Clock::new(Stamp::ZERO);
        let cap = capture(&mut t, &mut c, &params(7, T0, 1 << 20))
            .unwrap()
            .unwrap();
        assert_eq!(cap.rows, 3);
        assert_eq!(
            cap.batch,
            BatchId {
                origin: 1,
                incarnation: 1,
                seq: 7
            }
        );
        assert_eq!(cap.stamp.wall_ms(), T0);
        let it = items(&cap);
        assert_eq!(it.iter().filter(|i| i.0 == "t").count(), 2);
        assert_eq!(it.iter().filter(|i| i.0 == "u").count(), 1);
        assert_eq!(t.counts().1, 1, "stored in the outbox");
        // Every row now has the batch's version, and the change log is empty.
        let v = t.version_of("t", &[Value::Integer(2)]).unwrap();
        assert_eq!(
            v.version,
            Version {
                stamp: cap.stamp,
                node: 1
            }
        );
        assert!(
            capture(&mut t, &mut c, &params(8, T0 + 1, 1 << 20))
                .unwrap()
                .is_none()
        );
    }

    /// A database whose row `(1, 'a')` was captured (and so versioned) at wall time `ms`.
    fn captured_once(ms: u64) -> (MemoryApp, Version) {
        use crate::ports::Storage;
        let mut s = MemoryStorage::new(1, MemorySnapshotStore::default());
        let app = s.app();
        app.create_table("t", &["id", "v"], 1);
        app.upsert("t", vec![Value::Integer(1), text("a")]);
        let cap = s
            .capture(&mut Clock::new(Stamp::ZERO), ms)
            .unwrap()
            .captured
            .unwrap();
        (
            app,
            Version {
                stamp: cap.stamp,
                node: 1,
            },
        )
    }

    #[test]
    fn a_deleted_row_goes_as_a_delete_naming_the_version_it_replaces() {
        let (app, first) = captured_once(T0);
        app.delete("t", vec![Value::Integer(1)]);
        let mut t = MemTxn::over(&app, 1, 2);
        let mut c = Clock::new(first.stamp);
        let cap = capture(&mut t, &mut c, &params(2, T0 + 1, 1 << 20))
            .unwrap()
            .unwrap();
        assert_eq!(items(&cap), [("t".to_string(), false, Some(first))]);
        assert!(t.version_of("t", &[Value::Integer(1)]).unwrap().deleted);
    }

    #[test]
    fn the_stamp_is_above_every_version_it_replaces_even_when_the_wall_clock_lags() {
        // Captured by a clock a minute ahead; then the process restarts with a clock that
        // knows nothing of it and a wall clock that is right.
        let (app, first) = captured_once(T0 + 60_000);
        app.upsert("t", vec![Value::Integer(1), text("b")]);
        let mut t = MemTxn::over(&app, 1, 2);
        let mut lagging = Clock::new(Stamp::ZERO);
        let cap = capture(&mut t, &mut lagging, &params(2, T0, 1 << 20))
            .unwrap()
            .unwrap();
        assert_eq!(items(&cap), [("t".to_string(), true, Some(first))]);
        assert!(
            cap.stamp > first.stamp,
            "{:?} must be above {:?}",
            cap.stamp,
            first.stamp
        );
    }

    #[test]
    fn a_large_batch_is_split_into_messages_of_the_fragment_size() {
        let app = db();
        for i in 0..50 {
            app.upsert(
                "t",
                vec![Value::Integer(i), text("some text to make it big")],
            );
        }
        let mut t = MemTxn::over(&app, 1, 1);
        let mut c = Clock::new(Stamp::ZERO);
        let cap = capture(&mut t, &mut c, &params(1, T0, 100))
            .unwrap()
            .unwrap();
        assert!(cap.messages.len() > 5, "{} messages", cap.messages.len());
        for (i, m) in cap.messages.iter().enumerate() {
            let (h, f) = decode_message(m).unwrap();
            assert_eq!(h.chunk as usize, i);
            assert_eq!(h.chunks as usize, cap.messages.len());
            assert!(f.len() <= 100);
        }
        assert_eq!(items(&cap).len(), 50);
    }
}
