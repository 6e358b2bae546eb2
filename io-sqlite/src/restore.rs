//! Bringing a verified snapshot into the live database, without ever replacing its file.
//!
//! Everything happens in one `BEGIN IMMEDIATE` transaction on marmot's connection, with the
//! snapshot attached read-only: whether the database is empty is decided under the same write
//! lock that then changes it, so an application that commits a write just before (or holds the
//! lock while the restore starts) never has it wiped, and no change-log row that the restore
//! did not bring is ever cleared.
//!
//! - **Whole** (an empty database: no rows anywhere, nothing ever captured or applied): the
//!   snapshot's schema and rows are copied in, object by object (`INSERT INTO main.t SELECT *
//!   FROM snap.t`, which SQLite turns into a page-level copy of the b-tree for identical
//!   tables), the application's own objects first dropped; then the source's bookkeeping is
//!   dropped and this node's identity put back.
//! - **Merge** (anything else): the node's pending writes are captured first (they keep their
//!   stamps and are published), then every row the snapshot holds at a higher version replaces
//!   the local one, deletes included. The local rows the snapshot replaces are removed before
//!   its rows are written, so the snapshot's rows (one consistent state, where every UNIQUE
//!   constraint held) never collide with each other's old values; a collision that remains is
//!   with a local row the snapshot does not replace, and the restore fails saying so.
//!
//! Never: copy a file, or hold the write lock across anything but this one transaction.

use crate::ddl::{key_match, quote, ver_match, ver_table};
use crate::schema::{PREFIX, TableInfo};
use crate::sync::user_marmot_tables;
use crate::{SqliteStore, StoreError, meta_get, meta_set};
use marmot_core::Clock;
use marmot_core::ports::RestoreReport;
use marmot_core::snapshot::StagedSnapshot;
use marmot_core::{NodeId, Stamp};
use rusqlite::{Connection, OptionalExtension, params};

impl SqliteStore {
    /// [`marmot_core::ports::Storage::restore`].
    pub(crate) fn restore_snapshot(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snap: &StagedSnapshot,
    ) -> Result<RestoreReport, StoreError> {
        self.restore_with(clock, wall_ms, snap, true)
    }

    /// Restores a snapshot only if the database is empty (a whole restore stamps nothing);
    /// anything else is refused with [`StoreError::NotEmpty`], nothing changed. For a caller
    /// that could not check the clock, which a merge restore needs (it stamps pending writes).
    pub fn restore_into_empty(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snap: &StagedSnapshot,
    ) -> Result<RestoreReport, StoreError> {
        self.restore_with(clock, wall_ms, snap, false)
    }

    fn restore_with(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snap: &StagedSnapshot,
        allow_merge: bool,
    ) -> Result<RestoreReport, StoreError> {
        // Read-only: nothing a restore runs (some of it unqualified, like the application's
        // DDL) can change the staged copy it reads from.
        let path = snap.path.to_string_lossy().into_owned();
        let uri = format!(
            "file:{}?mode=ro",
            path.replace('%', "%25")
                .replace('?', "%3f")
                .replace('#', "%23")
        );
        self.conn
            .execute("ATTACH DATABASE ?1 AS snap", [&uri])
            .map_err(|x| self.sql_err(x))?;
        let result = self.in_txn(|s| {
            s.follow_schema()?;
            let empty = is_empty(&s.conn).map_err(|x| s.sql_err(x))?;
            if empty {
                s.restore_whole(clock, wall_ms, snap)
            } else if allow_merge {
                s.restore_merge(clock, wall_ms, snap)
            } else {
                Err(StoreError::NotEmpty {
                    path: s.cfg.path.clone(),
                })
            }
        });
        forget_unpublished(&self.conn);
        let _ = self.conn.execute("DETACH DATABASE snap", []);
        let report = result?;
        if !report.merged {
            // The full-text indexes' shadow tables were replaced under the virtual tables this
            // connection holds (FTS5 caches its index structure per connection, and notices
            // only other connections' commits): start afresh with a new connection.
            self.conn = crate::open_connection(&self.cfg.path, self.cfg.busy_timeout)
                .map_err(|x| self.sql_err(x))?;
            self.schema_version = -1;
        }
        self.incarnations = crate::load_incarnations(&self.conn).map_err(|x| self.sql_err(x))?;
        self.scan_needed = true;
        self.data_version = -1;
        if report.merged {
            tracing::info!(
                generation = snap.info.generation,
                position = report.position,
                "merged a snapshot into the database"
            );
        } else {
            tracing::info!(
                generation = snap.info.generation,
                position = report.position,
                "restored the database whole from a snapshot"
            );
        }
        Ok(report)
    }

    /// An empty database takes the snapshot whole: schema, rows, marmot's row versions; then
    /// this node's own identity (node id, database id, capture sequence, incarnation) is put
    /// back and the source node's bookkeeping (change logs, outbox, conflicts) dropped.
    fn restore_whole(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snap: &StagedSnapshot,
    ) -> Result<RestoreReport, StoreError> {
        let e = |s: &Self, x| s.sql_err(x);
        let get = |s: &Self, k: &str| meta_get(&s.conn, k).map_err(|x| e(s, x));
        let uuid = get(self, "db_uuid")?.unwrap_or(0);
        let starts = get(self, "starts")?.unwrap_or(1);
        let batch_seq = get(self, "batch_seq")?.unwrap_or(0);
        // From here on, a failure rolls everything back (the schema too: DDL is
        // transactional), and the schema must be read again.
        self.synced_in_txn = true;
        copy_whole(&self.conn).map_err(|x| e(self, x))?;
        let c = &self.conn;
        let err = |x| StoreError::Sqlite {
            path: self.cfg.path.clone(),
            source: x,
        };
        // This node's lists, not the source's.
        self.cfg.tables.store(c).map_err(err)?;
        c.execute_batch(
            "DELETE FROM \"__marmot__outbox\"; DELETE FROM \"__marmot__conflicts\"; DELETE FROM \"__marmot__incarnations\";",
        )
        .map_err(err)?;
        // The source's change logs are its own writes, not captured there yet: the source
        // publishes them. (This database's were empty: that is what made it empty.)
        for log in user_marmot_tables(c, "log__").map_err(err)? {
            c.execute(&format!("DELETE FROM {}", quote(&log)), [])
                .map_err(err)?;
        }
        meta_set(c, "node_id", self.cfg.node_id as i64).map_err(err)?;
        meta_set(c, "db_uuid", uuid).map_err(err)?;
        meta_set(c, "starts", starts).map_err(err)?;
        // This node's capture sequence goes on from its own, not the source's.
        meta_set(c, "batch_seq", batch_seq).map_err(err)?;
        c.execute(
            "INSERT INTO \"__marmot__incarnations\" (incarnation, last_seq) VALUES (?1, 0)",
            [self.incarnation as i64],
        )
        .map_err(err)?;
        let format = meta_get(c, "format").map_err(err)?.unwrap_or(1);
        if format < crate::STORE_FORMAT {
            crate::migrate::format1_to_2(c).map_err(err)?;
            meta_set(c, "format", crate::STORE_FORMAT).map_err(err)?;
        }
        crate::migrate::ensure_parked_collision(c).map_err(err)?;
        // A snapshot from a marmot that did not replicate schema: its schema is the baseline.
        crate::replicated::init_baseline(c).map_err(err)?;
        if let Some(theirs) = meta_get(c, "clock").map_err(err)? {
            clock.observe_remote(Stamp::from_u64(theirs as u64), wall_ms);
        }
        self.save_clock(clock)?;
        self.schema_version = -1;
        self.follow_schema()?;
        Ok(RestoreReport {
            position: self.position()?,
            generation: snap.info.generation,
            merged: false,
            captured: None,
        })
    }

    /// A database with content merges the snapshot: its own pending writes are captured
    /// first (they keep their stamps and are published), then every row of the snapshot with
    /// a higher version than the local one replaces it, deletes included; rows the snapshot
    /// lost to its tombstone horizon are removed.
    fn restore_merge(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snap: &StagedSnapshot,
    ) -> Result<RestoreReport, StoreError> {
        let horizon = snap.info.horizon_ms;
        let captured = self.capture_in_txn(clock, wall_ms)?;
        let path = self.cfg.path.clone();
        let err = |x| StoreError::Sqlite {
            path: path.clone(),
            source: x,
        };
        remember_unpublished(&self.conn, self.cfg.node_id).map_err(err)?;
        // Each table's columns before the snapshot's schema: a column the snapshot's brings
        // back is filled from the snapshot in the rows both hold at the same write.
        let columns_before: Vec<(String, Vec<String>)> = self
            .tables
            .iter()
            .map(|t| (t.info.name.clone(), t.info.column_names()))
            .collect();
        if self.cfg.replicate_schema {
            // The snapshot's schema first, where it is newer: its rows need it.
            let adopted = crate::replicated::adopt_snapshot(&self.conn).map_err(err)?;
            let tables = crate::sync::sync_tables(
                &self.conn,
                self.cfg.capture,
                false,
                &|n| adopted.changed.iter().any(|a| a == n),
                &self.stats,
            )
            .map_err(err)?;
            self.install_tables(tables).map_err(|x| self.sql_err(x))?;
            self.synced_in_txn = true;
        }
        for t in &self.tables {
            // A table of a life that a drop this node knows ended (the snapshot's node had not
            // met the drop): its rows are not this table's; the stream skips them too.
            if self.cfg.replicate_schema
                && !crate::replicated::snapshot_same_life(&self.conn, &t.info.name).map_err(err)?
            {
                tracing::warn!(table = %t.info.name, "not restored from the snapshot: its table is of a life a drop known here ended");
                continue;
            }
            let before = columns_before
                .iter()
                .find(|(n, _)| *n == t.info.name)
                .map(|(_, c)| c.as_slice());
            match merge_table(
                &self.conn,
                &t.info,
                horizon,
                !self.cfg.replicate_schema,
                before,
            ) {
                Ok(Ok(())) => {
                    // Rows changed in bulk: the full-text indexes over them start afresh.
                    for i in &t.indexes {
                        self.conn.execute_batch(&i.rebuild_sql()).map_err(err)?;
                    }
                }
                Ok(Err(why)) => {
                    tracing::warn!(table = %t.info.name, "not restored from the snapshot: {why}")
                }
                Err(x) if crate::txn::is_unique_violation(&x) => {
                    return Err(StoreError::RestoreCollision {
                        path: self.cfg.path.clone(),
                        table: t.info.name.clone(),
                        detail: x.to_string(),
                    });
                }
                Err(x) => return Err(err(x)),
            }
        }
        import_cluster_state(&self.conn).map_err(err)?;
        // The merge applied the snapshot's tombstone collection: this database is now
        // collected up to its horizon too (the next snapshot taken here says so).
        if horizon > 0 {
            self.conn
                .execute(
                    "INSERT INTO \"__marmot__meta\" (key, value) VALUES ('horizon', ?1) \
                     ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                    [horizon as i64],
                )
                .map_err(err)?;
        }
        let theirs: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM snap.\"__marmot__meta\" WHERE key = 'clock'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        if let Some(c) = theirs {
            clock.observe_remote(Stamp::from_u64(c as u64), wall_ms);
        }
        self.save_clock(clock)?;
        let position = self.position()?.max(snap.info.position);
        meta_set(&self.conn, "position", position as i64).map_err(err)?;
        Ok(RestoreReport {
            position,
            generation: snap.info.generation,
            merged: true,
            captured,
        })
    }
}

/// Whether every user table (replicated or not) of `conn` is empty and marmot never captured,
/// applied or versioned anything here: such a database can take a snapshot whole. A node
/// that captured a batch is not empty even when its rows are (a schema change alone, already
/// published): a whole restore would put the snapshot's schema in place of its own change,
/// which the stream never gives back to it (its own batches are skipped here). Found by the
/// simulation (V4, seed 870112: a node added a column, published it, and restored whole; its
/// change won everywhere else, and it kept the older shape for good).
pub fn is_empty(conn: &Connection) -> rusqlite::Result<bool> {
    let captured: Option<i64> = conn
        .query_row(
            "SELECT value FROM main.\"__marmot__meta\" WHERE key = 'batch_seq'",
            [],
            |r| r.get(0),
        )
        .optional()
        .unwrap_or(None);
    if captured.unwrap_or(0) > 0 {
        return Ok(false);
    }
    let names: Vec<(String, String)> = conn
        .prepare("SELECT name, type FROM pragma_table_list WHERE schema = 'main'")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (name, kind) in names {
        if name.starts_with("sqlite_") || kind != "table" {
            continue;
        }
        // marmot's own tables that say something local happened; the rest (meta, registry,
        // inbox, parked, conflicts) do not make a database "not empty".
        let marmot_local = [
            format!("{PREFIX}log__"),
            format!("{PREFIX}ver__"),
            format!("{PREFIX}outbox"),
        ];
        if name.starts_with(PREFIX) && !marmot_local.iter().any(|p| name.starts_with(p.as_str())) {
            continue;
        }
        // A table the `[tables]` lists keep on this node: its rows are its own business.
        if crate::filter::excluded(conn, &name)? {
            continue;
        }
        let q = format!("SELECT 1 FROM main.{} LIMIT 1", quote(&name));
        if conn.query_row(&q, [], |_| Ok(())).optional()?.is_some() {
            return Ok(false);
        }
    }
    let position: Option<i64> = conn
        .query_row(
            "SELECT value FROM main.\"__marmot__meta\" WHERE key = 'position'",
            [],
            |r| r.get(0),
        )
        .optional()
        .unwrap_or(None);
    Ok(position.unwrap_or(0) == 0)
}

/// Kinds of the tables of a schema (`table`, `virtual`, `shadow`, `view`), by name.
fn table_kinds(
    conn: &Connection,
    schema: &str,
) -> rusqlite::Result<std::collections::BTreeMap<String, String>> {
    conn.prepare("SELECT name, type FROM pragma_table_list WHERE schema = ?1")?
        .query_map([schema], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

/// Replaces every object of `main` with the attached `snap`'s, rows included. Inside a
/// transaction.
fn copy_whole(c: &Connection) -> rusqlite::Result<()> {
    let internal = |n: &str| n.starts_with("sqlite_");
    // What this node's `[tables]` lists keep to it stays as it is, and the snapshot's copy of
    // such a table (its source replicated it) is not taken. Decided before marmot's tables,
    // the lists among them, are replaced by the snapshot's.
    let local_only = crate::filter::excluded_tables(c, "main")?;
    let stays = |kind: &str, name: &str, table: &str, sql: Option<&str>| {
        local_only.contains(&name.to_ascii_lowercase())
            || local_only.contains(&table.to_ascii_lowercase())
            || (matches!(kind, "view" | "trigger")
                && sql.is_some_and(|s| crate::filter::mentions_excluded(s, &local_only).is_some()))
    };
    let snap_virtual: Vec<String> = table_kinds(c, "snap")?
        .into_iter()
        .filter(|(_, kind)| kind == "virtual")
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect();
    let mut not_taken: Vec<String> = Vec::new();
    let mut names_excluded = local_only.clone();
    for (kind, name, table, sql) in c
        .prepare("SELECT type, name, tbl_name, sql FROM snap.sqlite_master")?
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?
    {
        let owner = if kind == "table" { &name } else { &table };
        if internal(&name) {
            continue;
        }
        if crate::filter::excluded(c, owner)? {
            not_taken.push(name.to_ascii_lowercase());
            if kind == "table" {
                names_excluded.push(name.to_ascii_lowercase());
            }
        } else if matches!(kind.as_str(), "view" | "trigger")
            && sql.is_some_and(|s| crate::filter::mentions_excluded(&s, &names_excluded).is_some())
        {
            not_taken.push(name.to_ascii_lowercase());
        }
    }
    // (A virtual table left out takes its shadow tables with it.)
    let taken = |name: &str| {
        let n = name.to_ascii_lowercase();
        !not_taken.contains(&n)
            && !snap_virtual
                .iter()
                .any(|vt| not_taken.contains(vt) && n.starts_with(&format!("{vt}_")))
    };
    // Drop what main has (an application's empty tables, marmot's own): triggers and views
    // first, then virtual tables (which drop their shadow tables), then tables with their
    // indexes.
    let kinds = table_kinds(c, "main")?;
    let objects: Vec<(String, String)> = c
        .prepare(
            "SELECT type, name, tbl_name, sql FROM main.sqlite_master WHERE type IN ('trigger', 'view', 'table')",
        )?
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|(kind, name, table, sql)| !stays(kind, name, table, sql.as_deref()))
        .map(|(kind, name, _, _)| (kind, name))
        .collect();
    let rank = |kind: &str, name: &str| match kind {
        "trigger" => 0,
        "view" => 1,
        _ if kinds.get(name).map(String::as_str) == Some("virtual") => 2,
        _ => 3,
    };
    let mut drops: Vec<&(String, String)> = objects
        .iter()
        .filter(|(_, n)| !internal(n) && kinds.get(n).map(String::as_str) != Some("shadow"))
        .collect();
    drops.sort_by_key(|(k, n)| rank(k, n));
    for (kind, name) in drops {
        let what = match kind.as_str() {
            "trigger" => "TRIGGER",
            "view" => "VIEW",
            _ => "TABLE",
        };
        c.execute_batch(&format!("DROP {what} IF EXISTS main.{}", quote(name)))?;
    }
    // Create the snapshot's: tables (virtual ones create their shadow tables themselves),
    // then the rows, then indexes (built from sorted keys, faster than kept up row by row),
    // views and triggers.
    let snap_kinds = table_kinds(c, "snap")?;
    let schema: Vec<(String, String, Option<String>)> = c
        .prepare("SELECT type, name, sql FROM snap.sqlite_master ORDER BY rowid")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let create = |kinds: &[&str]| -> rusqlite::Result<()> {
        for (kind, name, sql) in &schema {
            let Some(sql) = sql else { continue }; // automatic indexes
            if internal(name)
                || !taken(name)
                || !kinds.contains(&kind.as_str())
                || snap_kinds.get(name).map(String::as_str) == Some("shadow")
            {
                continue;
            }
            c.execute_batch(sql)?;
        }
        Ok(())
    };
    create(&["table"])?;
    for (name, kind) in &snap_kinds {
        let main_has_sequence = || -> rusqlite::Result<bool> {
            c.query_row(
                "SELECT count(*) FROM main.sqlite_master WHERE name = 'sqlite_sequence'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
        };
        let copied = match kind.as_str() {
            // (A snapshot keeps sqlite_sequence after its last AUTOINCREMENT table went; main
            // then has none, and needs none.)
            "table" if name == "sqlite_sequence" => main_has_sequence()?,
            "table" => !internal(name),
            // The full-text index as it was, consistent with the rows.
            "shadow" => true,
            _ => false,
        };
        if !copied || !taken(name) {
            continue;
        }
        let q = quote(name);
        if kind == "shadow" || name == "sqlite_sequence" {
            // Rows the virtual table (or AUTOINCREMENT) wrote when it was created.
            c.execute_batch(&format!("DELETE FROM main.{q}"))?;
        }
        // Generated columns are computed, not copied; SELECT * (which SQLite copies record by
        // record for an identical table, rowids included) only where there are none. Where
        // there are, the rowid is copied by name: a full-text index over the table may point
        // at rows by rowid.
        let generated: i64 = c.query_row(
            "SELECT count(*) FROM pragma_table_xinfo(?1, 'snap') WHERE hidden IN (2, 3)",
            [name],
            |r| r.get(0),
        )?;
        let implicit_rowid = kind == "table"
            && name != "sqlite_sequence"
            && crate::replicated::implicit_rowid(c, "snap", name)?;
        if generated == 0 && !implicit_rowid {
            c.execute_batch(&format!("INSERT INTO main.{q} SELECT * FROM snap.{q}"))?;
        } else {
            let cols: Vec<String> = c
                .prepare("SELECT name FROM pragma_table_xinfo(?1, 'snap') WHERE hidden = 0")?
                .query_map([name], |r| r.get::<_, String>(0))?
                .map(|n| n.map(|n| quote(&n)))
                .collect::<Result<_, _>>()?;
            let mut cols = cols.join(", ");
            if implicit_rowid {
                cols = format!("rowid, {cols}");
            }
            c.execute_batch(&format!(
                "INSERT INTO main.{q} ({cols}) SELECT {cols} FROM snap.{q}"
            ))?;
        }
    }
    create(&["index"])?;
    create(&["view", "trigger"])?;
    for pragma in ["user_version", "application_id"] {
        let v: i64 = c.query_row(&format!("PRAGMA snap.{pragma}"), [], |r| r.get(0))?;
        c.execute_batch(&format!("PRAGMA main.{pragma} = {v}"))?;
    }
    Ok(())
}

/// Adds missing rows of another database's marmot bookkeeping that belong to the cluster
/// (stashed chunks, parked batches), not to that node. The parked batches are marked for a
/// retry: they may apply here (this node's schema, its rows).
fn import_cluster_state(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO main.\"__marmot__inbox\" SELECT * FROM snap.\"__marmot__inbox\"",
        [],
    )?;
    conn.execute(
        "INSERT INTO main.\"__marmot__parked\" (stream_seq, origin, incarnation, batch_seq, reason, message, parked_at_ms, attempts, retry_requested) \
         SELECT stream_seq, origin, incarnation, batch_seq, reason, message, parked_at_ms, attempts, 1 FROM snap.\"__marmot__parked\" p \
         WHERE NOT EXISTS (SELECT 1 FROM main.\"__marmot__parked\" q WHERE q.stream_seq = p.stream_seq)",
        params![],
    )?;
    Ok(())
}

/// Records, in a temporary table, the versions of this node's batches still waiting in the
/// outbox: their rows are this node's unpublished writes, which no snapshot can hold, so the
/// merge must not take their absence from the snapshot for a collected delete.
fn remember_unpublished(conn: &Connection, me: NodeId) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS \"marmot_unpublished\" (stamp INTEGER PRIMARY KEY, node INTEGER NOT NULL); \
         DELETE FROM temp.\"marmot_unpublished\";",
    )?;
    let payloads: Vec<Vec<u8>> = conn
        .prepare("SELECT payload FROM main.\"__marmot__outbox\" WHERE chunk = 0")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut ins = conn.prepare(
        "INSERT OR IGNORE INTO temp.\"marmot_unpublished\" (stamp, node) VALUES (?1, ?2)",
    )?;
    for p in payloads {
        match marmot_core::wire::decode_message(&p) {
            Ok((h, _)) => {
                ins.execute([h.stamp.as_u64() as i64, me as i64])?;
            }
            Err(e) => {
                tracing::warn!("an outbox message does not decode ({e}); it is published as it is")
            }
        }
    }
    Ok(())
}

/// Drops the temporary tables of a merge.
fn forget_unpublished(conn: &Connection) {
    let _ = conn.execute_batch(
        "DROP TABLE IF EXISTS temp.\"marmot_unpublished\"; DROP TABLE IF EXISTS temp.\"marmot_newer\";",
    );
}

/// Merges table `t` from the attached `snap` database into `main` under the merge rule.
/// `Ok(Err(why))`: the snapshot's table cannot be merged (missing, different key).
fn merge_table(
    conn: &Connection,
    t: &TableInfo,
    horizon_ms: u64,
    keep_extras: bool,
    columns_before: Option<&[String]>,
) -> rusqlite::Result<Result<(), String>> {
    let name = &t.name;
    let ver = ver_table(name);
    let has = |table: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT count(*) FROM snap.sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    if !has(name)? || !has(&ver)? {
        return Ok(Err("the snapshot has no such table".into()));
    }
    let snap_cols: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_xinfo(?1, 'snap') WHERE hidden = 0")?
        .query_map([name], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if t.key().iter().any(|k| !snap_cols.contains(&k.name)) {
        return Ok(Err(
            "the snapshot's table has a different primary key".into()
        ));
    }
    // Its row versions must be keyed as ours are (same key columns, affinities, collations).
    let theirs: Option<String> = conn
        .query_row(
            "SELECT key_signature FROM snap.\"__marmot__tables\" WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(theirs) = theirs
        && theirs != t.key_signature()
        && theirs != t.format1_key_signature()
    {
        return Ok(Err(format!(
            "the snapshot's row versions are keyed differently ({theirs}, here {})",
            t.key_signature()
        )));
    }
    // Columns by name, and a column the snapshot has under an older name (renamed here since,
    // by the column history) under its name here.
    let mut pairs: Vec<(String, String)> = Vec::new();
    for c in &t.columns {
        if snap_cols.contains(&c.name) {
            pairs.push((c.name.clone(), c.name.clone()));
        }
    }
    for s in &snap_cols {
        if t.columns.iter().any(|c| c.name == *s) {
            continue;
        }
        let (path, _) = crate::replicated::renames_from(conn, name, s)?;
        if let Some(now) = path
            .into_iter()
            .find(|n| t.columns.iter().any(|c| c.name == *n))
            && !pairs.iter().any(|(l, _)| *l == now)
        {
            pairs.push((now, s.clone()));
        }
    }
    // `prefix` "" names the columns here, "s." the snapshot's (under their names there).
    let list = |prefix: &str| {
        pairs
            .iter()
            .map(|(l, s)| {
                if prefix.is_empty() {
                    quote(l)
                } else {
                    format!("{prefix}{}", quote(s))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let klist = |prefix: &str| {
        (0..t.key_columns)
            .map(|i| format!("{prefix}\"k{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let newer =
        "(lv.stamp IS NULL OR sv.stamp > lv.stamp OR (sv.stamp = lv.stamp AND sv.node > lv.node))";
    let (qt, qv) = (quote(name), quote(&ver));
    // The snapshot's versions that win here, deletes included.
    conn.execute_batch(&format!(
        "DROP TABLE IF EXISTS temp.\"marmot_newer\";
         CREATE TEMP TABLE \"marmot_newer\" AS SELECT {sk}, sv.stamp AS stamp, sv.node AS node, sv.deleted AS deleted \
         FROM snap.{qv} sv LEFT JOIN main.{qv} lv ON {vv} WHERE {newer};",
        sk = klist("sv."),
        vv = ver_match(t, "lv", "sv"),
    ))?;
    // Columns this node has and the snapshot's table has not (it was taken before a
    // migration reached its node): with each node's schema its own (`keep_extras`), the rows
    // the snapshot replaces keep their values there, as an update in place would have left
    // them. With schema replication they take their defaults, as an apply of those rows does
    // (the winning version was written without them), or the values kept for them at those
    // rows' versions (`merge_kept_values`): every node ends the same.
    let extras: Vec<&str> = t
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .filter(|c| keep_extras && !pairs.iter().any(|(l, _)| l == c))
        .collect();
    if !extras.is_empty() {
        conn.execute_batch(&format!(
            "DROP TABLE IF EXISTS temp.\"marmot_merge_extras\";
             CREATE TEMP TABLE \"marmot_merge_extras\" AS SELECT {ks}, {ex} FROM main.{qt} AS d \
             WHERE EXISTS (SELECT 1 FROM temp.\"marmot_newer\" n WHERE n.deleted = 0 AND {m});",
            ks = t
                .key()
                .iter()
                .enumerate()
                .map(|(i, c)| format!("d.{} AS \"k{i}\"", quote(&c.name)))
                .collect::<Vec<_>>()
                .join(", "),
            ex = extras
                .iter()
                .map(|c| format!("d.{}", quote(c)))
                .collect::<Vec<_>>()
                .join(", "),
            m = key_match(t, "d", "n"),
        ))?;
    }
    // Out of the way first: the local rows the snapshot replaces or deletes. Then the
    // snapshot's rows: one consistent state, so they cannot collide with each other.
    conn.execute(
        &format!(
            "DELETE FROM main.{qt} AS d WHERE EXISTS (SELECT 1 FROM temp.\"marmot_newer\" n WHERE {m})",
            m = key_match(t, "d", "n"),
        ),
        [],
    )?;
    conn.execute(
        &format!(
            "INSERT INTO main.{qt} ({cl}) SELECT {sl} FROM snap.{qt} s \
             WHERE EXISTS (SELECT 1 FROM temp.\"marmot_newer\" n WHERE n.deleted = 0 AND {m})",
            cl = list(""),
            sl = list("s."),
            m = key_match(t, "s", "n"),
        ),
        [],
    )?;
    if !extras.is_empty() {
        let ex = extras
            .iter()
            .map(|c| quote(c))
            .collect::<Vec<_>>()
            .join(", ");
        conn.execute_batch(&format!(
            "UPDATE main.{qt} AS d SET ({ex}) = (SELECT {ex} FROM temp.\"marmot_merge_extras\" e WHERE {m}) \
             WHERE EXISTS (SELECT 1 FROM temp.\"marmot_merge_extras\" e WHERE {m});
             DROP TABLE temp.\"marmot_merge_extras\";",
            m = key_match(t, "d", "e"),
        ))?;
    }
    // Rows that existed before marmot started (no version anywhere): add the missing ones.
    conn.execute(
        &format!(
            "INSERT OR IGNORE INTO main.{qt} ({cl}) SELECT {sl} FROM snap.{qt} s \
             WHERE NOT EXISTS (SELECT 1 FROM snap.{qv} sv WHERE {rs}) \
             AND NOT EXISTS (SELECT 1 FROM main.{qv} lv WHERE {rl})",
            cl = list(""),
            sl = list("s."),
            rs = key_match(t, "s", "sv"),
            rl = key_match(t, "s", "lv"),
        ),
        [],
    )?;
    // Rows the snapshot no longer knows at all, with a version older than its tombstone
    // horizon: they were deleted and the tombstone collected. Not this node's unpublished
    // writes (see `remember_unpublished`): a clock that lags by more than the tombstone
    // lifetime stamps them below the horizon, and the snapshot cannot have seen them.
    if horizon_ms > 0 {
        let limit = (horizon_ms << 16) as i64;
        let gone = |m: String| {
            format!(
                "EXISTS (SELECT 1 FROM main.{qv} lv WHERE {m} AND lv.stamp < {limit} \
                 AND NOT EXISTS (SELECT 1 FROM snap.{qv} sv WHERE {vv}) \
                 AND NOT EXISTS (SELECT 1 FROM temp.\"marmot_unpublished\" u WHERE u.stamp = lv.stamp AND u.node = lv.node))",
                vv = ver_match(t, "lv", "sv"),
            )
        };
        conn.execute(
            &format!(
                "DELETE FROM main.{qt} AS d WHERE {}",
                gone(key_match(t, "d", "lv"))
            ),
            [],
        )?;
        conn.execute(
            &format!(
                "DELETE FROM main.{qv} AS d WHERE {}",
                gone(ver_match(t, "lv", "d"))
            ),
            [],
        )?;
    }
    // Finally the versions themselves.
    conn.execute(
        &format!(
            "INSERT INTO main.{qv} ({k}, stamp, node, deleted) SELECT {k}, stamp, node, deleted \
             FROM temp.\"marmot_newer\" WHERE true \
             ON CONFLICT ({k}) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = excluded.deleted",
            k = klist(""),
        ),
        [],
    )?;
    if !keep_extras {
        merge_kept_values(conn, t, &pairs, &snap_cols)?;
        if let Some(before) = columns_before {
            fill_revived_from_snapshot(conn, t, &pairs, before)?;
        }
    }
    Ok(Ok(()))
}

/// Columns the snapshot's schema brought back here (this node's table lacked them before the
/// restore, the snapshot's has them) take, in the rows this node and the snapshot hold at the
/// same write (same version), the snapshot's values: this node had none (its own DDL may have
/// removed them, keeping nothing), and the merge replaces only rows the snapshot holds newer.
/// Values kept here for them at those versions win, as they do when a column comes back from
/// the stream. A repair in the stream before the snapshot's position would have given them;
/// this node does not read it. Found by the simulation (V4, seed 845962: a node dropped a
/// column itself, and restored past the repair a concurrent winning change's node sent).
fn fill_revived_from_snapshot(
    conn: &Connection,
    t: &TableInfo,
    pairs: &[(String, String)],
    before: &[String],
) -> rusqlite::Result<()> {
    let qt = quote(&t.name);
    let qv = quote(&ver_table(&t.name));
    let same_key = t
        .key()
        .iter()
        .map(|k| {
            format!(
                "s.{n} = d.{n} COLLATE {c}",
                n = quote(&k.name),
                c = k.collation
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ");
    for (local, theirs) in pairs {
        if t.key().iter().any(|k| k.name == *local)
            || before.iter().any(|b| b.eq_ignore_ascii_case(local))
        {
            continue;
        }
        conn.execute(
            &format!(
                "UPDATE main.{qt} AS d SET {lc} = (SELECT s.{sc} FROM snap.{qt} AS s WHERE {same_key}) \
                 WHERE EXISTS (SELECT 1 FROM main.{qv} AS lv JOIN snap.{qv} AS sv ON {vv} \
                 WHERE {dl} AND lv.stamp = sv.stamp AND lv.node = sv.node \
                 AND lv.deleted = 0 AND sv.deleted = 0) \
                 AND EXISTS (SELECT 1 FROM snap.{qt} AS s WHERE {same_key})",
                lc = quote(local),
                sc = quote(theirs),
                vv = ver_match(t, "lv", "sv"),
                dl = key_match(t, "d", "lv"),
            ),
            [],
        )?;
        crate::replicated::fill_kept(conn, &t.name, local, None)?;
    }
    Ok(())
}

/// The values a merge restore must not lose to a difference of shape, as the stream path does
/// not (`Tx::table` keeps the values it leaves out; `replicated::fill_kept` brings them
/// back): the snapshot's kept values join this node's; the values of the merged rows in
/// columns the snapshot has and this node's table has not are kept; and the columns this
/// node's table has and the snapshot's has not take, in the merged rows, the values kept for
/// them at those rows' versions rather than their defaults. Found by the simulation (V4,
/// seed 800467): a node restored from a snapshot taken where a losing change had dropped a
/// column; the winning change kept it here, and the merged rows took its default while the
/// other nodes filled it from their kept values.
fn merge_kept_values(
    conn: &Connection,
    t: &TableInfo,
    pairs: &[(String, String)],
    snap_cols: &[String],
) -> rusqlite::Result<()> {
    let name = &t.name;
    let qt = quote(name);
    let snap_has: i64 = conn.query_row(
        "SELECT count(*) FROM snap.sqlite_master WHERE type = 'table' AND name = '__marmot__kept_values'",
        [],
        |r| r.get(0),
    )?;
    let upsert = crate::replicated::KEPT_UPSERT;
    if snap_has > 0 {
        conn.execute(
            &format!(
                "INSERT INTO main.\"__marmot__kept_values\" (tbl, col, key, stamp, node, value, kept) \
                 SELECT tbl, col, key, stamp, node, value, kept FROM snap.\"__marmot__kept_values\" \
                 WHERE tbl = ?1 {upsert}"
            ),
            [name],
        )?;
    }
    let keys: Vec<String> = t.key().iter().map(|c| c.name.clone()).collect();
    for s in snap_cols {
        if pairs.iter().any(|(_, sc)| sc == s) || t.columns.iter().any(|c| c.name == *s) {
            continue;
        }
        conn.execute(
            &format!(
                "INSERT INTO main.\"__marmot__kept_values\" (tbl, col, key, stamp, node, value, kept) \
                 SELECT ?1, ?2, {key}, n.stamp, n.node, s.{col}, n.stamp FROM snap.{qt} AS s \
                 JOIN temp.\"marmot_newer\" AS n ON {m} WHERE n.deleted = 0 {upsert}",
                key = crate::replicated::kept_key_expr(&keys, "s"),
                col = quote(s),
                m = key_match(t, "s", "n"),
            ),
            params![name, s],
        )?;
    }
    // Only the merged rows: the others kept their values here.
    let only = format!(
        "EXISTS (SELECT 1 FROM temp.\"marmot_newer\" AS n WHERE n.deleted = 0 AND {m})",
        m = key_match(t, &qt, "n"),
    );
    for c in &t.columns {
        if !pairs.iter().any(|(l, _)| *l == c.name) {
            crate::replicated::fill_kept(conn, name, &c.name, Some(&only))?;
        }
    }
    Ok(())
}
