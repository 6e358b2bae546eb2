//! The storage transaction seen by the core's capture and apply algorithms.
//!
//! [`Tx`] borrows a connection that is inside a `BEGIN IMMEDIATE` transaction (with triggers
//! disabled, so rows marmot writes are never captured again) and implements
//! [`CaptureTxn`] and [`ApplyTxn`] with prepared statements.

use crate::ddl::{ApplySql, TableSql, quote};
use crate::schema::TableInfo;
use bytes::Bytes;
use marmot_core::apply::{ApplyFault, ApplyTxn, ConflictRecord, Parked, RowVersion};
use marmot_core::capture::{CaptureTxn, DirtyRow, DirtyTable, SchemaChange};
use marmot_core::wire::{BatchId, Header, SchemaItem, TableDef};
use marmot_core::{NodeId, Stamp, Value, ValueRef, Version};
use rusqlite::types::{ToSqlOutput, ValueRef as SqlRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension, ToSql, params};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// A replicated table with its prepared SQL.
#[derive(Clone, Debug)]
pub struct Table {
    /// Its schema.
    pub info: TableInfo,
    /// Its statements.
    pub sql: TableSql,
    /// External-content full-text indexes over it, kept in step by apply (see [`crate::fts`]).
    pub indexes: Vec<crate::fts::ExternalIndex>,
}

/// Binds a core value to a statement parameter, bytes as they are (TEXT need not be UTF-8).
pub struct Bind<'a>(pub ValueRef<'a>);

impl ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            ValueRef::Null => SqlRef::Null,
            ValueRef::Integer(i) => SqlRef::Integer(i),
            ValueRef::Real(r) => SqlRef::Real(r),
            ValueRef::Text(t) => SqlRef::Text(t),
            ValueRef::Blob(b) => SqlRef::Blob(b),
        }))
    }
}

/// Converts a value read from SQLite.
pub fn from_sql(v: SqlRef<'_>) -> ValueRef<'_> {
    match v {
        SqlRef::Null => ValueRef::Null,
        SqlRef::Integer(i) => ValueRef::Integer(i),
        SqlRef::Real(r) => ValueRef::Real(r),
        SqlRef::Text(t) => ValueRef::Text(t),
        SqlRef::Blob(b) => ValueRef::Blob(b),
    }
}

/// Whether an SQLite error means "try again later" (the lock, I/O, a full disk, memory)
/// rather than "this data cannot go in here" (constraints, types, a statement the local schema
/// cannot prepare: unknown collation or function, too many variables). Everything not known
/// to be transient parks the batch, so one bad batch never stops replication.
pub fn is_transient(e: &rusqlite::Error) -> bool {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => matches!(
            f.code,
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::OutOfMemory
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
                | ErrorCode::FileLockingProtocolFailed
                | ErrorCode::DatabaseCorrupt
                | ErrorCode::NotADatabase
                | ErrorCode::OperationInterrupted
                | ErrorCode::SchemaChanged
        ),
        _ => false,
    }
}

/// Whether an SQLite error is a UNIQUE constraint (a secondary one: marmot's writes never
/// collide on the primary key, they update the row that has it).
pub fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// Whether an SQLite error is the write lock being held by someone else.
pub fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// A transaction in progress.
pub struct Tx<'a> {
    pub(crate) conn: &'a Connection,
    pub(crate) tables: &'a [Table],
    pub(crate) by_name: &'a HashMap<String, usize>,
    pub(crate) wall_ms: u64,
    pub(crate) keep_conflicts: u64,
    pub(crate) stats: &'a crate::StoreStats,
    pub(crate) incarnations: &'a std::collections::BTreeMap<u64, u64>,
    /// Per incoming table item: the local table, its statements, and which incoming columns
    /// are written (None: all; a column the schema history says was dropped is not).
    /// Per table item applied: the table, its statements, which incoming columns it keeps,
    /// and the columns it leaves out, whose values are kept (see `replicated::fill_kept`).
    pub(crate) apply_tables: Vec<ApplyTable>,
    /// Replicate schema changes (see `StoreConfig::replicate_schema`).
    pub(crate) replicate_schema: bool,
    /// Capture triggers are installed.
    pub(crate) capture: bool,
    /// The tables as they are after schema applied in this transaction (the store takes them
    /// when the transaction's work is done).
    pub(crate) resynced: Option<(Vec<Table>, HashMap<String, usize>)>,
    /// Rows were logged to publish again: the next capture must look.
    pub(crate) republished: bool,
}

impl Tx<'_> {
    fn tables(&self) -> &[Table] {
        match &self.resynced {
            Some((t, _)) => t,
            None => self.tables,
        }
    }

    fn by_name(&self) -> &HashMap<String, usize> {
        match &self.resynced {
            Some((_, m)) => m,
            None => self.by_name,
        }
    }

    /// A change that lost here removed data `table` keeps: every row of it goes out again,
    /// under a new stamp, and as a repair at its own version (`replicated::request_repair`).
    /// The nodes that applied the losing change before the winning one may hold rows without
    /// those values at a newer version (written where the column was gone): the publication
    /// under a new stamp gives them the winner's; it can also write the winner's copy over a
    /// write it has not received yet (a known limit, see docs/schema-replication.md). The
    /// repair gives the node that made the losing change the values its own DDL removed, in
    /// any order, after a restore too, and without overwriting anything newer.
    fn republish(&mut self, table: &str) -> rusqlite::Result<()> {
        if !self.capture {
            return Ok(());
        }
        if let Some(&i) = self.by_name().get(table) {
            let sql = &self.tables()[i].sql;
            self.conn.execute_batch(&sql.log_all)?;
            self.conn.execute_batch(&sql.log_gone)?;
            tracing::info!(
                table,
                "a schema change that lost here removed data this table keeps: its rows go out again, and as a repair"
            );
            self.republished = true;
        }
        Ok(())
    }

    /// Follows the schema after schema from the stream changed it: `quiet` tables are not
    /// published again.
    fn resync(&mut self, quiet: &[String]) -> rusqlite::Result<()> {
        let tables = crate::sync::sync_tables(
            self.conn,
            self.capture,
            false,
            &|n| quiet.iter().any(|q| q == n),
            self.stats,
        )?;
        let by_name = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.info.name.clone(), i))
            .collect();
        self.resynced = Some((tables, by_name));
        Ok(())
    }
}

/// A table item being applied: see `Tx::apply_tables`.
pub(crate) struct ApplyTable {
    index: usize,
    sql: ApplySql,
    mask: Option<Vec<bool>>,
    /// The incoming columns it leaves out (gone here), by position: their values are kept.
    left_out: Vec<(usize, String)>,
}

struct RowView<'r, 's> {
    row: &'r rusqlite::Row<'s>,
    columns: usize,
    keys: usize,
    exists: bool,
}

impl DirtyRow for RowView<'_, '_> {
    fn exists(&self) -> bool {
        self.exists
    }
    fn value(&self, i: usize) -> ValueRef<'_> {
        // A row that is gone has only its logged key (after the row's columns).
        let idx = if self.exists { i } else { self.columns + i };
        self.row
            .get_ref(idx)
            .map(from_sql)
            .unwrap_or(ValueRef::Null)
    }
    fn base(&self) -> Option<Version> {
        let at = self.columns + self.keys;
        let stamp: Option<i64> = self.row.get(at).ok()?;
        let node: Option<i64> = self.row.get(at + 1).ok()?;
        Some(Version {
            stamp: Stamp::from_u64(stamp? as u64),
            node: node? as u64,
        })
    }
}

impl CaptureTxn for Tx<'_> {
    type Error = rusqlite::Error;

    fn schema_changes(&mut self) -> Result<Vec<SchemaChange>, Self::Error> {
        if !self.replicate_schema {
            crate::replicated::follow_unreplicated(self.conn)?;
            return Ok(Vec::new());
        }
        let changes = crate::replicated::changes(self.conn)?;
        for c in &changes {
            tracing::info!(
                object = %c.name,
                kind = c.kind.as_str(),
                change = match (&c.old_sql, &c.new_sql) {
                    (None, _) => "created",
                    (_, None) => "dropped",
                    _ => "changed",
                },
                "schema change captured: replicating it"
            );
        }
        Ok(changes)
    }

    fn commit_schema(
        &mut self,
        changes: &[SchemaChange],
        version: Version,
    ) -> Result<(), Self::Error> {
        crate::replicated::commit(self.conn, changes, version)
    }

    fn dirty_tables(&mut self) -> Result<Vec<DirtyTable>, Self::Error> {
        let mut out = Vec::new();
        for (index, t) in self.tables().iter().enumerate() {
            let dirty = self
                .conn
                .prepare_cached(&t.sql.has_dirty)?
                .query_row([], |_| Ok(()))
                .optional()?
                .is_some();
            if dirty {
                let schema_version = if self.replicate_schema {
                    crate::replicated::table_schema_version(self.conn, &t.info.name)?
                } else {
                    None
                };
                out.push(DirtyTable {
                    index,
                    name: t.info.name.clone(),
                    columns: t.info.column_names(),
                    key_columns: t.info.key_columns,
                    schema_version,
                });
            }
        }
        Ok(out)
    }

    fn read_dirty(
        &mut self,
        table: &DirtyTable,
        visit: &mut dyn FnMut(&dyn DirtyRow),
    ) -> Result<(), Self::Error> {
        let t = &self.tables()[table.index];
        let mut stmt = self.conn.prepare_cached(&t.sql.capture_select)?;
        let columns = t.info.columns.len();
        let keys = t.info.key_columns;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let exists: bool = row.get(columns + keys + 2)?;
            visit(&RowView {
                row,
                columns,
                keys,
                exists,
            });
        }
        Ok(())
    }

    fn commit_dirty(&mut self, table: &DirtyTable, version: Version) -> Result<(), Self::Error> {
        let t = &self.tables()[table.index];
        let nulls: i64 = self
            .conn
            .prepare_cached(&t.sql.null_keys)?
            .query_row([], |r| r.get(0))?;
        if nulls > 0 {
            self.stats
                .null_key_rows
                .fetch_add(nulls as u64, Ordering::Relaxed);
            tracing::warn!(
                table = %t.info.name,
                rows = nulls,
                "rows whose primary key contains NULL are not replicated (NULL keys are not unique in SQLite); give them a key"
            );
        }
        self.conn
            .prepare_cached(&t.sql.capture_stamp)?
            .execute(params![version.stamp.as_u64() as i64, version.node as i64])?;
        self.conn
            .prepare_cached(&t.sql.capture_clear)?
            .execute([])?;
        Ok(())
    }

    fn repair_tables(&mut self) -> Result<Vec<DirtyTable>, Self::Error> {
        if !self.replicate_schema {
            return Ok(Vec::new());
        }
        let names: Vec<String> = self
            .conn
            .prepare_cached("SELECT tbl FROM \"__marmot__repairs\" ORDER BY tbl")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::new();
        for name in names {
            let Some(&index) = self.by_name().get(&name) else {
                // Gone, or not replicated here: nothing to send.
                self.conn
                    .prepare_cached("DELETE FROM \"__marmot__repairs\" WHERE tbl = ?1")?
                    .execute([&name])?;
                continue;
            };
            let t = &self.tables()[index].info;
            out.push(DirtyTable {
                index,
                name: t.name.clone(),
                columns: t.column_names(),
                key_columns: t.key_columns,
                schema_version: crate::replicated::table_schema_version(self.conn, &name)?,
            });
        }
        Ok(out)
    }

    fn read_repair(
        &mut self,
        table: &DirtyTable,
        visit: &mut dyn FnMut(&dyn DirtyRow),
    ) -> Result<(), Self::Error> {
        let t = &self.tables()[table.index];
        let mut stmt = self.conn.prepare_cached(&t.sql.repair_select)?;
        let columns = t.info.columns.len();
        let keys = t.info.key_columns;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            visit(&RowView {
                row,
                columns,
                keys,
                exists: true,
            });
        }
        Ok(())
    }

    fn commit_repair(&mut self, table: &DirtyTable) -> Result<(), Self::Error> {
        tracing::info!(table = %table.name, "rows sent as a repair");
        self.conn
            .prepare_cached("DELETE FROM \"__marmot__repairs\" WHERE tbl = ?1")?
            .execute([&table.name])?;
        Ok(())
    }

    fn put_outbox(&mut self, batch: BatchId, messages: &[Bytes]) -> Result<(), Self::Error> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO \"__marmot__outbox\" (incarnation, seq, chunk, chunks, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (i, m) in messages.iter().enumerate() {
            stmt.execute(params![
                batch.incarnation as i64,
                batch.seq as i64,
                i as i64,
                messages.len() as i64,
                &m[..]
            ])?;
        }
        Ok(())
    }
}

impl Tx<'_> {
    /// Takes the row out of (`index` false: before it changes) or puts it into (`index`
    /// true: after it was written) the full-text indexes over its table.
    fn derived(
        &self,
        t: usize,
        key: &[ValueRef<'_>],
        index: bool,
    ) -> Result<(), ApplyFault<rusqlite::Error>> {
        let sql = &self.apply_tables[t].sql;
        let statements = if index { &sql.index } else { &sql.unindex };
        for s in statements {
            let r = self.conn.prepare_cached(s).and_then(|mut st| {
                st.execute(rusqlite::params_from_iter(key.iter().map(|v| Bind(*v))))
            });
            if let Err(e) = r {
                return Err(self.poison(t, key, e));
            }
        }
        Ok(())
    }

    fn poison(
        &self,
        t: usize,
        key: &[ValueRef<'_>],
        e: rusqlite::Error,
    ) -> ApplyFault<rusqlite::Error> {
        if is_transient(&e) {
            return ApplyFault::Storage(e);
        }
        let name = &self.tables()[self.apply_tables[t].index].info.name;
        let reason = format!(
            "table {}, key {}: {e}",
            quote(name),
            marmot_core::value::sql_row_literal(key.iter().copied())
        );
        if is_unique_violation(&e) {
            ApplyFault::Collision(reason)
        } else {
            ApplyFault::Poison(reason)
        }
    }
}

impl ApplyTxn for Tx<'_> {
    type Error = rusqlite::Error;
    type Table = usize;

    fn apply_schema(
        &mut self,
        item: &SchemaItem<'_>,
        version: Version,
    ) -> Result<(), ApplyFault<Self::Error>> {
        if !self.replicate_schema {
            // This node keeps its own schema: rows that need the change park here.
            return Ok(());
        }
        let applied = crate::replicated::apply(self.conn, item, version)?;
        if let Some(table) = &applied.repair {
            self.republish(table).map_err(ApplyFault::Storage)?;
        }
        if let Some(c) = &applied.conflict {
            tracing::warn!(object = %item.name, kind = item.kind.as_str(), winner = %c.winner, loser = %c.loser, "a schema change lost to a newer one: recorded as a conflict");
            self.record_conflict(c).map_err(ApplyFault::Storage)?;
        }
        if applied.changed {
            tracing::info!(object = %item.name, kind = item.kind.as_str(), "schema change applied from the stream");
            let table = if item.table.is_empty() {
                item.name
            } else {
                item.table
            };
            self.resync(&[table.to_string()]).map_err(|e| {
                if is_transient(&e) {
                    ApplyFault::Storage(e)
                } else {
                    ApplyFault::Poison(format!(
                        "schema change of {} {}: following it failed: {e}",
                        item.kind.as_str(),
                        quote(item.name)
                    ))
                }
            })?;
        }
        Ok(())
    }

    fn keeps_local(
        &mut self,
        def: &TableDef<'_>,
        batch: Version,
    ) -> Result<bool, ApplyFault<Self::Error>> {
        let name = def.name;
        // Rows written in a life of the table that a replicated drop ended: their own node
        // removed them with the drop (or publishes them again, where the drop lost there).
        if self.replicate_schema
            && let Some(dropped) = crate::replicated::last_drop(self.conn, name)?
            && def.schema_version_in(batch).is_none_or(|v| v < dropped)
        {
            return Ok(true);
        }
        if self.by_name().contains_key(name) {
            if self.replicate_schema
                && crate::replicated::repair_late_rows(self.conn, name, batch)
                    .map_err(ApplyFault::Storage)?
            {
                self.republished = true;
            }
            return Ok(false);
        }
        Ok(crate::filter::excluded(self.conn, name)?
            || (self.replicate_schema && crate::replicated::dropped_table(self.conn, name)?))
    }

    fn table(&mut self, def: &TableDef<'_>) -> Result<usize, ApplyFault<Self::Error>> {
        let Some(&index) = self.by_name().get(def.name) else {
            return Err(ApplyFault::Poison(format!(
                "unknown table {}: it does not exist on this node or is not replicated here \
                 (parked batches are retried after every schema change)",
                quote(def.name)
            )));
        };
        let t = &self.tables()[index].info;
        // The columns as this node names them: a column renamed since the sender wrote the
        // row takes its new name; one dropped since is left out (rows written in an older
        // shape apply through the schema history).
        let mut names: Vec<String> = Vec::with_capacity(def.columns.len());
        let mut mask = Vec::with_capacity(def.columns.len());
        let mut left_out: Vec<(usize, String)> = Vec::new();
        for (i, c) in def.columns.iter().enumerate() {
            if def.columns[..i].contains(c) {
                return Err(ApplyFault::Poison(format!(
                    "table {}: column {} appears twice in the message",
                    quote(def.name),
                    quote(c)
                )));
            }
            if t.columns.iter().any(|lc| lc.name == *c) {
                names.push(c.to_string());
                mask.push(true);
                continue;
            }
            // Follow renames one after another (a -> b -> c) to a column this table has.
            // Renames that only lead back to a name met before leave the column under none
            // of them, as a drop does (found by the simulation, V4 seed 846161: a losing
            // rename and the winning shape's pairing back, both learned through a merge
            // restore, parked the rows in the losing shape forever).
            let (path, end) = crate::replicated::renames_from(self.conn, def.name, c)
                .map_err(ApplyFault::Storage)?;
            let here = path
                .into_iter()
                .find(|to| t.columns.iter().any(|lc| lc.name == *to));
            let gone = matches!(
                end,
                crate::replicated::ChainEnd::Dropped | crate::replicated::ChainEnd::Loops
            );
            // A name whose newest fact is a drop (a losing change's, newer than the winning
            // lineage's renames of it) while the renames lead to a column this table has:
            // the column lives on under that name, and the value goes there, as it does on
            // the node that wrote it (found by the simulation, V4 seed 880038).
            let renamed = if here.is_none() && gone {
                let present: Vec<String> = t.columns.iter().map(|lc| lc.name.clone()).collect();
                crate::replicated::renamed_into(self.conn, def.name, c, &present)
                    .map_err(ApplyFault::Storage)?
                    .filter(|to| !def.columns.contains(&to.as_str()) && !names.contains(to))
            } else {
                None
            };
            match (here, renamed) {
                (Some(to), _) if !def.columns.contains(&to.as_str()) && !names.contains(&to) => {
                    names.push(to);
                    mask.push(true);
                }
                (None, Some(to)) if i >= def.key_columns => {
                    names.push(to);
                    mask.push(true);
                }
                (None, None) if gone && i >= def.key_columns => {
                    mask.push(false);
                    left_out.push((i, c.to_string()));
                }
                _ => {
                    return Err(ApplyFault::Poison(format!(
                        "table {}: unknown column {} (add it on this node; parked batches are retried after a schema change)",
                        quote(def.name),
                        quote(c)
                    )));
                }
            }
        }
        let mask = mask.contains(&false).then_some(mask);
        let columns: Vec<&str> = names.iter().map(String::as_str).collect();
        let incoming_key = &columns[..def.key_columns];
        let mut local_key = Vec::with_capacity(t.key_columns);
        for lc in t.key() {
            match incoming_key.iter().position(|c| *c == lc.name) {
                Some(i) => local_key.push(i),
                None => break,
            }
        }
        if local_key.len() != t.key_columns || incoming_key.len() != t.key_columns {
            return Err(ApplyFault::Poison(format!(
                "table {}: primary key here is ({}) but the sender's is ({})",
                quote(def.name),
                t.key()
                    .iter()
                    .map(|c| quote(&c.name))
                    .collect::<Vec<_>>()
                    .join(", "),
                incoming_key
                    .iter()
                    .map(|c| quote(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let indexes = &self.tables()[index].indexes;
        let defaults = if self.replicate_schema {
            Some(column_defaults(self.conn, &t.name).map_err(ApplyFault::Storage)?)
        } else {
            None
        };
        let sql = ApplySql::new(
            t,
            &columns,
            def.key_columns,
            &local_key,
            indexes,
            index,
            defaults.as_deref(),
        );
        if sql.stash.is_some() {
            // Where a clear-first apply keeps the extra columns of the rows it clears.
            let stash = crate::ddl::stash_table(index);
            let cols = t
                .key()
                .iter()
                .map(|c| quote(&c.name))
                .chain(sql.extras.iter().map(|c| quote(c)))
                .collect::<Vec<_>>()
                .join(", ");
            self.conn
                .execute_batch(&format!(
                    "DROP TABLE IF EXISTS {stash}; CREATE TEMP TABLE {} AS SELECT {cols} FROM {} WHERE 0;",
                    stash.trim_start_matches("temp."),
                    quote(&t.name)
                ))
                .map_err(ApplyFault::Storage)?;
        }
        // Values left out of rows (their column is gone here) are kept: a later change of the
        // table may bring the column back (see `replicated::fill_kept`).
        if !self.replicate_schema {
            left_out.clear();
        }
        self.apply_tables.push(ApplyTable {
            index,
            sql,
            mask,
            left_out,
        });
        Ok(self.apply_tables.len() - 1)
    }

    fn version(
        &mut self,
        t: usize,
        key: &[ValueRef<'_>],
    ) -> Result<Option<RowVersion>, ApplyFault<Self::Error>> {
        let sql = &self.apply_tables[t].sql.version_get;
        let r = self.conn.prepare_cached(sql).and_then(|mut s| {
            s.query_row(
                rusqlite::params_from_iter(key.iter().map(|v| Bind(*v))),
                |r| {
                    Ok(RowVersion {
                        version: Version {
                            stamp: Stamp::from_u64(r.get::<_, i64>(0)? as u64),
                            node: r.get::<_, i64>(1)? as NodeId,
                        },
                        deleted: r.get(2)?,
                    })
                },
            )
            .optional()
        });
        r.map_err(|e| self.poison(t, key, e))
    }

    fn write_row(
        &mut self,
        t: usize,
        values: &[ValueRef<'_>],
        version: Version,
    ) -> Result<(), ApplyFault<Self::Error>> {
        let keys = self.tables()[self.apply_tables[t].index].info.key_columns;
        let key = &values[..keys.min(values.len())];
        self.derived(t, key, false)?;
        let sql = &self.apply_tables[t].sql.upsert;
        let mask = &self.apply_tables[t].mask;
        let kept = values
            .iter()
            .enumerate()
            .filter(|(i, _)| mask.as_ref().is_none_or(|m| m[*i]))
            .map(|(_, v)| Bind(*v));
        let r = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(kept)));
        if let Err(e) = r {
            return Err(self.poison(t, key, e));
        }
        let left_out = &self.apply_tables[t].left_out;
        if !left_out.is_empty() {
            let name = &self.tables()[self.apply_tables[t].index].info.name;
            let stamp = ValueRef::Integer(version.stamp.as_u64() as i64);
            let node = ValueRef::Integer(version.node as i64);
            for (i, col) in left_out {
                let extra = [
                    ValueRef::Text(name.as_bytes()),
                    ValueRef::Text(col.as_bytes()),
                    stamp,
                    node,
                    values[*i],
                ];
                let sql = &self.apply_tables[t].sql.keep_value;
                let r = self.conn.prepare_cached(sql).and_then(|mut st| {
                    st.execute(rusqlite::params_from_iter(
                        key.iter().copied().chain(extra).map(Bind),
                    ))
                });
                if let Err(e) = r {
                    return Err(ApplyFault::Storage(e));
                }
            }
        }
        if let Some(statements) = &self.apply_tables[t].sql.unstash {
            for s in statements {
                let r = self.conn.prepare_cached(s).and_then(|mut st| {
                    st.execute(rusqlite::params_from_iter(key.iter().map(|v| Bind(*v))))
                });
                if let Err(e) = r {
                    return Err(self.poison(t, key, e));
                }
            }
        }
        self.derived(t, key, true)
    }

    fn repair_row(
        &mut self,
        t: usize,
        values: &[ValueRef<'_>],
        version: Version,
    ) -> Result<bool, ApplyFault<Self::Error>> {
        // Columns here the sender's row lacks would take their defaults in the write: the
        // repair would change more than it gives back.
        if !self.apply_tables[t].sql.extras.is_empty() {
            return Ok(false);
        }
        self.conn
            .execute_batch("SAVEPOINT marmot_repair")
            .map_err(ApplyFault::Storage)?;
        match self.write_row(t, values, version) {
            Ok(()) => {
                self.conn
                    .execute_batch("RELEASE marmot_repair")
                    .map_err(ApplyFault::Storage)?;
                Ok(true)
            }
            Err(ApplyFault::Poison(why) | ApplyFault::Collision(why)) => {
                self.conn
                    .execute_batch("ROLLBACK TO marmot_repair; RELEASE marmot_repair")
                    .map_err(ApplyFault::Storage)?;
                tracing::debug!(%why, "a repaired row was left as it is: a constraint here refuses it");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn clear_row(&mut self, t: usize, key: &[ValueRef<'_>]) -> Result<(), ApplyFault<Self::Error>> {
        if let Some(stash) = &self.apply_tables[t].sql.stash {
            let r = self.conn.prepare_cached(stash).and_then(|mut st| {
                st.execute(rusqlite::params_from_iter(key.iter().map(|v| Bind(*v))))
            });
            if let Err(e) = r {
                return Err(self.poison(t, key, e));
            }
        }
        self.delete_row(t, key)
    }

    fn delete_row(
        &mut self,
        t: usize,
        key: &[ValueRef<'_>],
    ) -> Result<(), ApplyFault<Self::Error>> {
        self.derived(t, key, false)?;
        let sql = &self.apply_tables[t].sql.delete;
        let r = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(key.iter().map(|v| Bind(*v)))));
        r.map(|_| ()).map_err(|e| self.poison(t, key, e))
    }

    fn set_version(
        &mut self,
        t: usize,
        key: &[ValueRef<'_>],
        v: RowVersion,
    ) -> Result<(), ApplyFault<Self::Error>> {
        let sql = &self.apply_tables[t].sql.version_set;
        let stamp = ValueRef::Integer(v.version.stamp.as_u64() as i64);
        let node = ValueRef::Integer(v.version.node as i64);
        let deleted = ValueRef::Integer(i64::from(v.deleted));
        let r = self.conn.prepare_cached(sql).and_then(|mut s| {
            s.execute(rusqlite::params_from_iter(
                key.iter().copied().chain([stamp, node, deleted]).map(Bind),
            ))
        });
        r.map(|_| ()).map_err(|e| self.poison(t, key, e))
    }

    fn read_row(
        &mut self,
        t: usize,
        key: &[ValueRef<'_>],
    ) -> Result<Option<Vec<Value>>, ApplyFault<Self::Error>> {
        let sql = &self.apply_tables[t].sql.read;
        let mask = &self.apply_tables[t].mask;
        let r = self.conn.prepare_cached(sql).and_then(|mut s| {
            s.query_row(
                rusqlite::params_from_iter(key.iter().map(|v| Bind(*v))),
                |r| {
                    let n = r.as_ref().column_count();
                    let mut got = (0..n).map(|i| r.get_ref(i).map(|v| from_sql(v).to_owned()));
                    match mask {
                        // A dropped column reads as NULL, in the incoming order.
                        Some(m) => m
                            .iter()
                            .map(|&k| {
                                if k {
                                    got.next().unwrap_or(Ok(Value::Null))
                                } else {
                                    Ok(Value::Null)
                                }
                            })
                            .collect(),
                        None => got.collect(),
                    }
                },
            )
            .optional()
        });
        r.map_err(|e| self.poison(t, key, e))
    }

    fn record_conflict(&mut self, c: &ConflictRecord) -> Result<(), Self::Error> {
        self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
        self.conn
            .prepare_cached(
                "INSERT INTO \"__marmot__conflicts\" (tbl, key, winner_stamp, winner_node, loser_stamp, loser_node, loser_row, recorded_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                c.table,
                c.key,
                c.winner.stamp.as_u64() as i64,
                c.winner.node as i64,
                c.loser.stamp.as_u64() as i64,
                c.loser.node as i64,
                c.loser_row,
                self.wall_ms as i64
            ])?;
        let id = self.conn.last_insert_rowid();
        self.conn
            .prepare_cached("DELETE FROM \"__marmot__conflicts\" WHERE id <= ?1")?
            .execute([id - self.keep_conflicts as i64])?;
        Ok(())
    }

    fn savepoint(&mut self) -> Result<(), Self::Error> {
        self.conn.execute_batch("SAVEPOINT marmot_batch")
    }

    fn release(&mut self) -> Result<(), Self::Error> {
        self.conn.execute_batch("RELEASE marmot_batch")
    }

    fn rollback_to(&mut self) -> Result<(), Self::Error> {
        self.conn.execute_batch("ROLLBACK TO marmot_batch")?;
        if self.resynced.is_some() {
            // Schema applied in the batch is undone with it: follow the schema as it is.
            self.resync(&[])?;
        }
        Ok(())
    }

    fn stash_chunk(
        &mut self,
        h: &Header,
        stream_seq: u64,
        fragment: &[u8],
    ) -> Result<Option<Bytes>, Self::Error> {
        let b = h.batch;
        let id = params![b.origin as i64, b.incarnation as i64, b.seq as i64];
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO \"__marmot__inbox\" (origin, incarnation, seq, chunk, chunks, stream_seq, fragment) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                b.origin as i64,
                b.incarnation as i64,
                b.seq as i64,
                i64::from(h.chunk),
                i64::from(h.chunks),
                stream_seq as i64,
                fragment
            ])?;
        let have: i64 = self
            .conn
            .prepare_cached(
                "SELECT count(*) FROM \"__marmot__inbox\" WHERE origin = ?1 AND incarnation = ?2 AND seq = ?3",
            )?
            .query_row(id, |r| r.get(0))?;
        if have < i64::from(h.chunks) {
            return Ok(None);
        }
        let mut payload = Vec::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT fragment FROM \"__marmot__inbox\" WHERE origin = ?1 AND incarnation = ?2 AND seq = ?3 ORDER BY chunk",
            )?;
            let mut rows = stmt.query(id)?;
            while let Some(r) = rows.next()? {
                if let SqlRef::Blob(f) = r.get_ref(0)? {
                    payload.extend_from_slice(f);
                }
            }
        }
        self.conn
            .prepare_cached("DELETE FROM \"__marmot__inbox\" WHERE origin = ?1 AND incarnation = ?2 AND seq = ?3")?
            .execute(id)?;
        Ok(Some(Bytes::from(payload)))
    }

    fn captured_here(&mut self, batch: &BatchId) -> bool {
        self.incarnations
            .get(&batch.incarnation)
            .is_some_and(|&last| batch.seq <= last)
    }

    fn park(&mut self, p: &Parked) -> Result<(), Self::Error> {
        self.stats.parked.fetch_add(1, Ordering::Relaxed);
        let batch = p
            .batch
            .map(|b| b.to_string())
            .unwrap_or_else(|| "unreadable".into());
        if p.collision {
            tracing::warn!(
                stream_seq = p.stream_seq,
                %batch,
                reason = %p.reason,
                "a batch collides with a UNIQUE value another row holds here: parked, and retried as later batches change rows \
                 (that row may move away with one of them); if it stays parked, the value is taken on two nodes: see `marmot parked list`"
            );
        } else {
            tracing::error!(
                stream_seq = p.stream_seq,
                %batch,
                reason = %p.reason,
                "parked a batch that cannot be applied; replication of everything else continues (see `marmot parked list`)"
            );
        }
        self.conn
            .prepare_cached(
                "INSERT INTO \"__marmot__parked\" (stream_seq, origin, incarnation, batch_seq, reason, message, parked_at_ms, collision) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                p.stream_seq as i64,
                p.batch.map(|b| b.origin as i64),
                p.batch.map(|b| b.incarnation as i64),
                p.batch.map(|b| b.seq as i64),
                p.reason,
                &p.message[..],
                self.wall_ms as i64,
                p.collision
            ])?;
        Ok(())
    }
}

/// Each column's default as an SQL expression (`NULL` where it has none), leaving out NOT NULL
/// columns without one: see `ApplySql::new`.
fn column_defaults(c: &Connection, table: &str) -> rusqlite::Result<Vec<(String, String)>> {
    c.prepare_cached(
        "SELECT name, dflt_value, \"notnull\" FROM pragma_table_xinfo(?1) WHERE hidden = 0",
    )?
    .query_map([table], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, bool>(2)?,
        ))
    })?
    .filter_map(|r| match r {
        Ok((name, Some(d), _)) => Some(Ok((name, d))),
        Ok((name, None, false)) => Some(Ok((name, "NULL".to_string()))),
        Ok((_, None, true)) => None,
        Err(e) => Some(Err(e)),
    })
    .collect()
}
