//! Apply: write other nodes' batches into the local database under the merge rule.
//!
//! Runs inside one storage transaction that also records how far the stream has been
//! applied, so a crash at any instant loses nothing and applies nothing twice. Each batch is
//! applied whole or not at all (a savepoint per batch): a batch that cannot be applied
//! (undecodable, unknown table or column, a constraint the local schema enforces) is parked
//! with its payload and the reason, and everything else continues.
//!
//! Chunks of a batch split across messages are stashed in the same transaction that
//! advances the position; the batch is applied when its last chunk arrives.

use crate::hlc::{Clock, NodeId, Version};
use crate::merge::{Resolution, resolve};
use crate::value::{Value, ValueRef, sql_row_literal};
use crate::wire::{
    BatchId, BodyReader, Header, Item, SchemaItem, TableDef, WireError, decode_message, unseal,
};
use bytes::Bytes;

/// One message as delivered from the stream.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The stream's sequence number for it.
    pub stream_seq: u64,
    /// The message bytes.
    pub payload: Bytes,
    /// When the stream stored it (server clock), milliseconds since the Unix epoch.
    pub published_ms: u64,
    /// Messages after this one the stream held when it was delivered (0 if unknown).
    pub pending: u64,
}

/// The version a row has locally, and whether it is a tombstone.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RowVersion {
    /// Who wrote the row's current state, and when.
    pub version: Version,
    /// The row was deleted (the version is a tombstone).
    pub deleted: bool,
}

/// Why one batch could not be applied; the difference decides whether to park or retry.
#[derive(Debug)]
pub enum ApplyFault<E> {
    /// The batch can never apply as it is here (bad bytes, unknown table or column,
    /// constraint failure): park it.
    Poison(String),
    /// A write hit a UNIQUE constraint. The batch's own rows may be in each other's way (two
    /// rows that swapped values, values moved along a column): the batch is applied again
    /// with its local rows removed first, and parked only if it still collides, with a row
    /// outside the batch.
    Collision(String),
    /// The storage failed (busy, I/O): roll everything back and retry later.
    Storage(E),
}

impl<E> From<E> for ApplyFault<E> {
    fn from(e: E) -> Self {
        ApplyFault::Storage(e)
    }
}

/// A losing row version, recorded for people to inspect.
#[derive(Clone, Debug)]
pub struct ConflictRecord {
    /// Table name.
    pub table: String,
    /// The key as an SQL row literal, e.g. `(1)`.
    pub key: String,
    /// The version that won.
    pub winner: Version,
    /// The version that lost.
    pub loser: Version,
    /// The losing row as an SQL row literal, or `None` when the loser was a delete.
    pub loser_row: Option<String>,
}

/// A batch set aside because it cannot be applied.
#[derive(Clone, Debug)]
pub struct Parked {
    /// The stream sequence of the (last) message of the batch.
    pub stream_seq: u64,
    /// The batch, when its header could be read.
    pub batch: Option<BatchId>,
    /// Why it could not be applied.
    pub reason: String,
    /// The whole batch as one self-contained message (or the raw bytes if unreadable).
    pub message: Bytes,
    /// It collided with a UNIQUE value a row outside the batch holds (even with the batch's
    /// own rows cleared first). That row may move away with a batch that comes later (one
    /// node's batches can reach the stream out of capture order when publishes are retried):
    /// such a batch is retried whenever later batches change rows, and is a conflict to
    /// resolve by hand only if it stays.
    pub collision: bool,
}

/// What apply needs from the storage transaction it runs in.
pub trait ApplyTxn {
    /// Storage failure: the whole transaction is rolled back and retried later.
    type Error;
    /// Opaque handle of a local table matched to an incoming table definition.
    type Table: Copy;
    /// Brings one schema object to the state `item` describes, if `version` is newer than the
    /// object's own (an older change lost, and is recorded like a row conflict); then the
    /// rows that follow see the new schema. Runs inside the batch's savepoint. The default:
    /// this storage does not take schema changes, and the batch is parked.
    fn apply_schema(
        &mut self,
        item: &SchemaItem<'_>,
        version: Version,
    ) -> Result<(), ApplyFault<Self::Error>> {
        let _ = version;
        Err(ApplyFault::Poison(format!(
            "schema change of {} {:?}: this storage does not apply schema changes",
            item.kind.as_str(),
            item.name
        )))
    }
    /// Gives a row the values of a repair (see [`crate::wire::TableDef::repair`]): the write
    /// the row holds, as its sender holds it. Returns `false` where the storage leaves the row
    /// as it is (a constraint refuses the values, or the row has columns the sender's lacks):
    /// a repair never fails its batch. The default writes the row.
    fn repair_row(
        &mut self,
        t: Self::Table,
        values: &[ValueRef<'_>],
        version: Version,
    ) -> Result<bool, ApplyFault<Self::Error>> {
        self.write_row(t, values, version).map(|()| true)
    }
    /// Matches an incoming table definition to the local schema: unknown table, unknown
    /// column or a different primary key is a [`ApplyFault::Poison`].
    fn table(&mut self, def: &TableDef<'_>) -> Result<Self::Table, ApplyFault<Self::Error>>;
    /// Whether the rows that follow table item `def` (of a batch of version `batch`) are
    /// skipped here, not applied and not parked: this node keeps the table to itself
    /// (configured not to replicate it), or a replicated change dropped the table after the
    /// schema version the rows were written in (see [`TableDef::schema_version_in`]). The
    /// default: every table replicates and none is skipped.
    fn keeps_local(
        &mut self,
        def: &TableDef<'_>,
        batch: Version,
    ) -> Result<bool, ApplyFault<Self::Error>> {
        let _ = (def, batch);
        Ok(false)
    }
    /// The row's local version, if it has one.
    fn version(
        &mut self,
        t: Self::Table,
        key: &[ValueRef<'_>],
    ) -> Result<Option<RowVersion>, ApplyFault<Self::Error>>;
    /// Writes a row (insert, or update of the row with the same key; never a REPLACE), as
    /// the write of version `version` carried it.
    fn write_row(
        &mut self,
        t: Self::Table,
        values: &[ValueRef<'_>],
        version: Version,
    ) -> Result<(), ApplyFault<Self::Error>>;
    /// Removes the row with this key (if present) to make room for the batch's rows (see
    /// [`ApplyFault::Collision`]), remembering the values of its columns the incoming table
    /// definition does not carry: the next [`ApplyTxn::write_row`] of the key puts them back,
    /// as an update in place would have left them. The default forgets them.
    fn clear_row(
        &mut self,
        t: Self::Table,
        key: &[ValueRef<'_>],
    ) -> Result<(), ApplyFault<Self::Error>> {
        self.delete_row(t, key)
    }
    /// Deletes the row with this key, if present.
    fn delete_row(
        &mut self,
        t: Self::Table,
        key: &[ValueRef<'_>],
    ) -> Result<(), ApplyFault<Self::Error>>;
    /// Sets the row's local version.
    fn set_version(
        &mut self,
        t: Self::Table,
        key: &[ValueRef<'_>],
        v: RowVersion,
    ) -> Result<(), ApplyFault<Self::Error>>;
    /// Reads the row's current values in the incoming column order (None: no such row).
    fn read_row(
        &mut self,
        t: Self::Table,
        key: &[ValueRef<'_>],
    ) -> Result<Option<Vec<Value>>, ApplyFault<Self::Error>>;
    /// Stores a conflict record (the adapter keeps a bounded number).
    fn record_conflict(&mut self, c: &ConflictRecord) -> Result<(), Self::Error>;
    /// Starts a savepoint around one batch.
    fn savepoint(&mut self) -> Result<(), Self::Error>;
    /// Keeps what the batch wrote.
    fn release(&mut self) -> Result<(), Self::Error>;
    /// Undoes what the batch wrote.
    fn rollback_to(&mut self) -> Result<(), Self::Error>;
    /// Stores one chunk of a multi-chunk batch. When this completes the batch, returns the
    /// concatenated fragments (and forgets the chunks).
    fn stash_chunk(
        &mut self,
        h: &Header,
        stream_seq: u64,
        fragment: &[u8],
    ) -> Result<Option<Bytes>, Self::Error>;
    /// Keeps a batch that cannot be applied.
    fn park(&mut self, p: &Parked) -> Result<(), Self::Error>;
    /// Whether this database itself captured `batch` (one of its own incarnations). A node's
    /// own batches are skipped only then: a database restored from a copy, or from an older
    /// backup, applies the batches it no longer holds, like any others.
    fn captured_here(&mut self, batch: &BatchId) -> bool;
}

/// A stamp this far ahead of both the server's and the local clock is not a clock, it is a
/// broken or hostile message: its batch is parked rather than let it drag every node's clock
/// into the far future.
pub const MAX_STAMP_LEAD_MS: u64 = 60 * 60 * 1000;

/// What an apply did, for metrics and logs.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// The stream position now recorded (last delivery handled).
    pub through_seq: u64,
    /// Server timestamp of that delivery.
    pub through_published_ms: u64,
    /// Messages after it the stream still held.
    pub through_pending: u64,
    /// Batches applied.
    pub batches: u64,
    /// Rows written or deleted.
    pub rows_written: u64,
    /// Rows repaired: given the values of the write they already had, which this node lost
    /// (see [`crate::wire::TableDef::repair`]).
    pub rows_repaired: u64,
    /// Row versions that were older than the local one or already present.
    pub rows_skipped: u64,
    /// Conflicts recorded (a write lost to a concurrent one with different content).
    pub conflicts: u64,
    /// Own messages skipped.
    pub own_messages: u64,
    /// Chunks stashed for batches not yet complete.
    pub chunks_stashed: u64,
    /// Batches parked (those waiting on a UNIQUE value included).
    pub parked: Vec<Parked>,
    /// Batches parked earlier, waiting on a UNIQUE value, that applied now.
    pub unparked: u64,
    /// Rows written and conflicts recorded, per table, for per-table metrics.
    pub tables: std::collections::BTreeMap<String, TableApplied>,
}

impl ApplyReport {
    /// Adds the rows written, repaired and conflicts (in total and per table) of a retry
    /// of parked batches made in the same transaction.
    pub fn absorb(&mut self, again: ApplyReport) {
        self.rows_written += again.rows_written;
        self.rows_repaired += again.rows_repaired;
        self.conflicts += again.conflicts;
        for (name, t) in again.tables {
            let r = self.tables.entry(name).or_default();
            r.written += t.written;
            r.conflicts += t.conflicts;
        }
    }
}

/// What an apply did to one table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableApplied {
    /// Rows written or deleted.
    pub written: u64,
    /// Conflicts recorded.
    pub conflicts: u64,
}

/// Applies deliveries in stream order. `position` is the last stream sequence already
/// applied; deliveries at or below it are skipped. Returns the report; the caller records
/// `report.through_seq` as the new position in the same transaction.
pub fn apply_deliveries<T: ApplyTxn>(
    txn: &mut T,
    clock: &mut Clock,
    me: NodeId,
    position: u64,
    deliveries: &[Delivery],
    wall_ms: u64,
) -> Result<ApplyReport, T::Error> {
    let mut report = ApplyReport {
        through_seq: position,
        ..ApplyReport::default()
    };
    for d in deliveries {
        if d.stream_seq <= report.through_seq {
            continue;
        }
        report.through_seq = d.stream_seq;
        report.through_published_ms = d.published_ms;
        report.through_pending = d.pending;
        let (header, fragment) = match decode_message(&d.payload) {
            Ok(x) => x,
            Err(e) => {
                let p = Parked {
                    stream_seq: d.stream_seq,
                    batch: None,
                    reason: e.to_string(),
                    message: d.payload.clone(),
                    collision: false,
                };
                txn.park(&p)?;
                report.parked.push(p);
                continue;
            }
        };
        let own = header.batch.origin == me;
        if own && txn.captured_here(&header.batch) {
            report.own_messages += 1;
            continue;
        }
        let payload = if header.chunks == 1 {
            d.payload.slice_ref(fragment)
        } else {
            match txn.stash_chunk(&header, d.stream_seq, fragment)? {
                Some(p) => p,
                None => {
                    report.chunks_stashed += 1;
                    continue;
                }
            }
        };
        let limit_ms = d
            .published_ms
            .max(wall_ms)
            .saturating_add(MAX_STAMP_LEAD_MS);
        let ctx = BatchContext {
            stream_seq: d.stream_seq,
            own,
            limit_ms,
            received_ms: if d.published_ms == 0 {
                wall_ms
            } else {
                d.published_ms
            },
        };
        if let Some(p) = apply_isolated(txn, clock, &header, payload, ctx, &mut report)? {
            txn.park(&p)?;
            report.parked.push(p);
        }
    }
    Ok(report)
}

/// Applies one parked batch again (after a schema change, on request, or after other rows
/// moved). Returns `Ok(None)` when it applied, or the new reason it still cannot (and whether
/// that is a collision with a UNIQUE value, see [`Parked::collision`]).
pub fn retry_parked<T: ApplyTxn>(
    txn: &mut T,
    clock: &mut Clock,
    me: NodeId,
    parked: &Parked,
    wall_ms: u64,
    report: &mut ApplyReport,
) -> Result<Option<(String, bool)>, T::Error> {
    let (header, fragment) = match decode_message(&parked.message) {
        Ok(x) => x,
        Err(e) => return Ok(Some((e.to_string(), false))),
    };
    let payload = parked.message.slice_ref(fragment);
    let ctx = BatchContext {
        stream_seq: parked.stream_seq,
        own: header.batch.origin == me,
        limit_ms: wall_ms.saturating_add(MAX_STAMP_LEAD_MS),
        received_ms: wall_ms,
    };
    Ok(apply_isolated(txn, clock, &header, payload, ctx, report)?.map(|p| (p.reason, p.collision)))
}

/// Applies several parked batches of one node together, as one atomic set: every row any of
/// them replaces is removed first, then for each key the newest of their rows is written.
/// One node's batches that reached the stream out of capture order can each be in the
/// others' way (a value moved along a UNIQUE column over several batches) and then apply
/// only together. Returns `Ok(None)` when they applied, or why not (the set stays parked).
pub fn retry_parked_jointly<T: ApplyTxn>(
    txn: &mut T,
    clock: &mut Clock,
    me: NodeId,
    parked: &[Parked],
    wall_ms: u64,
    report: &mut ApplyReport,
) -> Result<Option<String>, T::Error> {
    let limit_ms = wall_ms.saturating_add(MAX_STAMP_LEAD_MS);
    let mut bodies: Vec<(Header, Bytes)> = Vec::with_capacity(parked.len());
    for p in parked {
        let (header, fragment) = match decode_message(&p.message) {
            Ok(x) => x,
            Err(e) => return Ok(Some(e.to_string())),
        };
        if header.stamp.wall_ms() > limit_ms {
            return Ok(Some(format!("stamp {} is too far ahead", header.stamp)));
        }
        clock.observe_remote(header.stamp, wall_ms);
        match unseal(&header, p.message.slice_ref(fragment)) {
            Ok(body) => bodies.push((header, body)),
            Err(e) => return Ok(Some(e.to_string())),
        }
    }
    // Every batch's schema changes first, then every batch's rows: rows are written at the
    // end, after the whole set, so they must all meet the schema the set ends with (rows of an
    // older shape apply through the schema history, as they do when they arrive late). A
    // waiting batch that carries a schema change can so apply together with the batches
    // parked behind it. Where that fails, each batch whole, in order, as before: a later
    // batch's schema change may need an earlier batch's rows out of the way (a UNIQUE index
    // over values one of them changes).
    const SPLIT: &[Part] = &[Part::SchemaOnly, Part::RowsOnly];
    const WHOLE: &[Part] = &[Part::All];
    let mut reason = String::new();
    for parts in [SPLIT, WHOLE] {
        txn.savepoint()?;
        let mut stats = BatchStats::default();
        let mut writes = Vec::new();
        let mut result = Ok(());
        'parts: for &part in parts {
            for (header, body) in &bodies {
                let own = header.batch.origin == me;
                result = apply_batch(
                    txn,
                    header,
                    body,
                    own,
                    &mut stats,
                    (Order::ClearFirst, part),
                    &mut writes,
                );
                if result.is_err() {
                    break 'parts;
                }
            }
        }
        match result.and_then(|()| write_pending(txn, &writes, true)) {
            Ok(()) => {
                txn.release()?;
                report.batches += bodies.len() as u64;
                stats.add_to(report);
                return Ok(None);
            }
            Err(ApplyFault::Poison(why) | ApplyFault::Collision(why)) => {
                txn.rollback_to()?;
                txn.release()?;
                reason = why;
            }
            Err(ApplyFault::Storage(e)) => return Err(e),
        }
    }
    Ok(Some(reason))
}

/// Where a batch comes from.
#[derive(Copy, Clone)]
struct BatchContext {
    stream_seq: u64,
    /// This node's own batch (not captured by this database): no conflict records.
    own: bool,
    /// Stamps beyond this wall time (ms) are refused.
    limit_ms: u64,
    /// When the stream stored it (or, for a parked batch, now): the clock takes in its stamp
    /// only up to its lead bound past this.
    received_ms: u64,
}

/// Applies a whole batch inside a savepoint. On a poison fault everything it wrote is undone
/// and the batch comes back as a [`Parked`] record for the caller to keep.
fn apply_isolated<T: ApplyTxn>(
    txn: &mut T,
    clock: &mut Clock,
    header: &Header,
    payload: Bytes,
    ctx: BatchContext,
    report: &mut ApplyReport,
) -> Result<Option<Parked>, T::Error> {
    let stream_seq = ctx.stream_seq;
    if header.stamp.wall_ms() > ctx.limit_ms {
        let mut h = *header;
        h.chunk = 0;
        h.chunks = 1;
        return Ok(Some(Parked {
            stream_seq,
            batch: Some(header.batch),
            reason: format!(
                "stamp {} is more than {} ms ahead of both the server's and this node's clock",
                header.stamp, MAX_STAMP_LEAD_MS
            ),
            message: reseal(&h, &payload),
            collision: false,
        }));
    }
    // Every stamp seen is merged into the clock, applied or not, up to the clock's lead
    // bound past the time the stream stored it (see `Clock::observe_remote`).
    clock.observe_remote(header.stamp, ctx.received_ms);
    let single = || {
        let mut h = *header;
        h.chunk = 0;
        h.chunks = 1;
        h
    };
    let body = match unseal(header, payload.clone()) {
        Ok(b) => b,
        Err(e) => {
            return Ok(Some(Parked {
                stream_seq,
                batch: Some(header.batch),
                reason: e.to_string(),
                message: reseal(&single(), &payload),
                collision: false,
            }));
        }
    };
    txn.savepoint()?;
    let mut stats = BatchStats::default();
    let mut result = apply_batch(
        txn,
        header,
        &body,
        ctx.own,
        &mut stats,
        (Order::InPlace, Part::All),
        &mut Vec::new(),
    );
    if let Err(ApplyFault::Collision(_)) = result {
        // A batch is one atomic set of final rows, so its rows never collide with each
        // other once the local rows they replace are out of the way.
        txn.rollback_to()?;
        stats = BatchStats::default();
        let mut writes = Vec::new();
        result = apply_batch(
            txn,
            header,
            &body,
            ctx.own,
            &mut stats,
            (Order::ClearFirst, Part::All),
            &mut writes,
        )
        .and_then(|()| write_pending(txn, &writes, false));
    }
    match result {
        Ok(()) => {
            txn.release()?;
            report.batches += 1;
            stats.add_to(report);
            Ok(None)
        }
        Err(fault @ (ApplyFault::Poison(_) | ApplyFault::Collision(_))) => {
            txn.rollback_to()?;
            txn.release()?;
            let (reason, collision) = match fault {
                ApplyFault::Collision(r) => (r, true),
                ApplyFault::Poison(r) => (r, false),
                ApplyFault::Storage(_) => unreachable!("matched above"),
            };
            Ok(Some(Parked {
                stream_seq,
                batch: Some(header.batch),
                reason,
                message: reseal(&single(), &payload),
                collision,
            }))
        }
        Err(ApplyFault::Storage(e)) => {
            // The caller rolls the whole transaction back.
            Err(e)
        }
    }
}

fn reseal(h: &Header, payload: &[u8]) -> Bytes {
    // A parked batch is stored as one self-contained message: same header with chunk 0 of
    // 1, followed by the whole (possibly compressed) payload.
    crate::wire::encode_message(h, payload)
}

#[derive(Default)]
struct BatchStats {
    written: u64,
    repaired: u64,
    skipped: u64,
    conflicts: u64,
    tables: std::collections::BTreeMap<String, TableApplied>,
}

impl BatchStats {
    fn table(&mut self, name: &str) -> &mut TableApplied {
        if !self.tables.contains_key(name) {
            self.tables
                .insert(name.to_string(), TableApplied::default());
        }
        self.tables.get_mut(name).expect("inserted above")
    }

    /// Adds what a batch that applied did to `report`.
    fn add_to(self, report: &mut ApplyReport) {
        report.rows_skipped += self.skipped;
        report.absorb(ApplyReport {
            rows_written: self.written,
            rows_repaired: self.repaired,
            conflicts: self.conflicts,
            tables: self.tables,
            ..ApplyReport::default()
        });
    }
}

/// How a batch's rows are written.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Order {
    /// Row by row, in the batch's order (one statement per row: the common case).
    InPlace,
    /// First every row the batch replaces or deletes is removed, then the batch's rows are
    /// written: the batch's own rows can no longer collide with each other's old values.
    ClearFirst,
}

/// Which of a batch's items an apply takes: a set of batches applied together takes every
/// batch's schema changes first, then every batch's rows (see [`retry_parked_jointly`]).
#[derive(Copy, Clone, PartialEq, Eq)]
enum Part {
    All,
    SchemaOnly,
    RowsOnly,
}

/// A row to write once every row it replaces is out of the way ([`Order::ClearFirst`]).
struct Pending<'a, H> {
    table: H,
    key_columns: usize,
    values: Vec<ValueRef<'a>>,
    version: Version,
}

/// Writes the rows [`Order::ClearFirst`] put aside. `check`: several batches were applied
/// together, so a key may have several pending rows; only the one whose version the key holds
/// now (the newest) is written.
fn write_pending<T: ApplyTxn>(
    txn: &mut T,
    writes: &[Pending<'_, T::Table>],
    check: bool,
) -> Result<(), ApplyFault<T::Error>> {
    for w in writes {
        if check {
            let key = &w.values[..w.key_columns];
            if txn.version(w.table, key)?.map(|v| v.version) != Some(w.version) {
                continue;
            }
        }
        txn.write_row(w.table, &w.values, w.version)?;
    }
    Ok(())
}

fn apply_batch<'a, T: ApplyTxn>(
    txn: &mut T,
    header: &Header,
    body: &'a [u8],
    own: bool,
    stats: &mut BatchStats,
    (order, part): (Order, Part),
    writes: &mut Vec<Pending<'a, T::Table>>,
) -> Result<(), ApplyFault<T::Error>> {
    let incoming = header.version();
    let mut reader = BodyReader::new(body);
    let mut values: Vec<ValueRef<'a>> = Vec::new();
    let mut table: Option<(T::Table, TableDef<'a>)> = None;
    // The current table is one this node keeps to itself: its rows are skipped.
    let mut local_only = false;
    // The current table's rows are a repair (see `TableDef::repair`).
    let mut repair = false;
    loop {
        let item = reader
            .next_item(&mut values)
            .map_err(|e: WireError| ApplyFault::Poison(e.to_string()))?;
        let Some(item) = item else { break };
        let (base, delete) = match item {
            Item::Schema(s) => {
                if table.is_some() {
                    return Err(ApplyFault::Poison(
                        "schema change after rows in one batch".to_string(),
                    ));
                }
                if part != Part::RowsOnly {
                    txn.apply_schema(&s, incoming)?;
                }
                continue;
            }
            // Schema changes lead their batch: none follows.
            Item::Table(_) if part == Part::SchemaOnly => break,
            Item::Table(def) => {
                local_only = txn.keeps_local(&def, incoming)?;
                repair = def.repair;
                if !local_only {
                    let handle = txn.table(&def)?;
                    table = Some((handle, def));
                }
                continue;
            }
            Item::Upsert { base } => (base, false),
            Item::Delete { base } => (base, true),
        };
        if local_only {
            stats.skipped += 1;
            continue;
        }
        // The reader refuses rows before a table item.
        let (t, def) = table.as_ref().expect("row follows a table item");
        let key = &values[..def.key_columns];
        let current = txn.version(*t, key)?;
        if repair {
            // The write this node holds for the key, as its sender holds it: only where the
            // versions are the same write (not a tombstone), and only where the content
            // differs (a value this node lost). It cannot undo a newer write, nor show part of
            // an older batch early (an older version here: that batch brings its rows whole),
            // nor bring back a row whose tombstone was collected (no version here). A row the
            // adapter cannot repair (a constraint refuses it) is left as it is: a repair never
            // fails its batch.
            if delete {
                return Err(ApplyFault::Poison(format!(
                    "table {:?}: a repair carries a delete",
                    def.name
                )));
            }
            let same_write = base.is_some_and(|b| {
                current
                    == Some(RowVersion {
                        version: b,
                        deleted: false,
                    })
            });
            if own || !same_write {
                stats.skipped += 1;
                continue;
            }
            let local = txn.read_row(*t, key)?;
            if same_content(local.as_deref(), false, &values) {
                stats.skipped += 1;
                continue;
            }
            let version = base.expect("same_write implies a base");
            if txn.repair_row(*t, &values, version)? {
                stats.repaired += 1;
            } else {
                stats.skipped += 1;
            }
            continue;
        }
        match resolve(current.map(|c| c.version), incoming, base) {
            Resolution::Apply { concurrent } => {
                // An own batch that wins restores what this database lost (it came from a
                // copy or an older backup): not a conflict.
                if concurrent
                    && !own
                    && let Some(cur) = current
                {
                    let local = txn.read_row(*t, key)?;
                    if !same_content(local.as_deref(), delete, &values) {
                        txn.record_conflict(&ConflictRecord {
                            table: def.name.to_string(),
                            key: sql_row_literal(key.iter().copied()),
                            winner: incoming,
                            loser: cur.version,
                            loser_row: local.map(|r| sql_row_literal(r.iter().map(Value::as_ref))),
                        })?;
                        stats.conflicts += 1;
                        stats.table(def.name).conflicts += 1;
                    }
                }
                match order {
                    Order::InPlace if delete => txn.delete_row(*t, key)?,
                    Order::InPlace => txn.write_row(*t, &values, incoming)?,
                    Order::ClearFirst if delete => txn.delete_row(*t, key)?,
                    Order::ClearFirst => {
                        txn.clear_row(*t, key)?;
                        {
                            writes.push(Pending {
                                table: *t,
                                key_columns: def.key_columns,
                                values: values.clone(),
                                version: incoming,
                            });
                        }
                    }
                }
                txn.set_version(
                    *t,
                    key,
                    RowVersion {
                        version: incoming,
                        deleted: delete,
                    },
                )?;
                stats.written += 1;
                stats.table(def.name).written += 1;
            }
            Resolution::Duplicate => stats.skipped += 1,
            Resolution::Older if own => stats.skipped += 1,
            Resolution::Older => {
                stats.skipped += 1;
                let cur = current.expect("Older implies a current version");
                let local = txn.read_row(*t, key)?;
                if !same_content(local.as_deref(), delete, &values) {
                    txn.record_conflict(&ConflictRecord {
                        table: def.name.to_string(),
                        key: sql_row_literal(key.iter().copied()),
                        winner: cur.version,
                        loser: incoming,
                        loser_row: (!delete).then(|| sql_row_literal(values.iter().copied())),
                    })?;
                    stats.conflicts += 1;
                    stats.table(def.name).conflicts += 1;
                }
            }
        }
    }
    Ok(())
}

/// Whether the local row (None: absent) holds what the incoming change would leave.
fn same_content(local: Option<&[Value]>, incoming_delete: bool, incoming: &[ValueRef<'_>]) -> bool {
    match (local, incoming_delete) {
        (None, true) => true,
        (Some(row), false) => {
            row.len() == incoming.len()
                && row
                    .iter()
                    .zip(incoming)
                    .all(|(a, b)| a.as_ref().same_as(*b))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
