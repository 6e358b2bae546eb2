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
use crate::wire::{BatchId, BodyWriter, seal};
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
    /// Sealed messages, chunk order.
    pub messages: Vec<Bytes>,
}

/// Captures every pending change as one batch, or returns `None` when nothing changed.
pub fn capture<T: CaptureTxn>(
    txn: &mut T,
    clock: &mut Clock,
    p: &CaptureParams,
) -> Result<Option<Captured>, T::Error> {
    let tables = txn.dirty_tables()?;
    if tables.is_empty() {
        return Ok(None);
    }
    let mut body = BodyWriter::default();
    let mut max_base = Stamp::ZERO;
    for t in &tables {
        body.table(&t.name, &t.columns, t.key_columns);
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
    }
    // Above every version the batch replaces, however far ahead a fast clock elsewhere put
    // it (without letting that drag this clock: see `Clock::tick_above`).
    let stamp = clock.tick_above(p.wall_ms, max_base);
    let version = Version {
        stamp,
        node: p.node,
    };
    for t in &tables {
        txn.commit_dirty(t, version)?;
    }
    if body.rows() == 0 {
        return Ok(None);
    }
    let batch = BatchId {
        origin: p.node,
        incarnation: p.incarnation,
        seq: p.batch_seq,
    };
    let messages = seal(batch, stamp, body.as_bytes(), p.compress, p.max_fragment);
    txn.put_outbox(batch, &messages)?;
    Ok(Some(Captured {
        batch,
        stamp,
        rows: body.rows(),
        messages,
    }))
}
