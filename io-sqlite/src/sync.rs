//! Following the application's schema: setting marmot's own tables up at start (and
//! upgrading an earlier format), and installing, re-installing and removing the capture
//! triggers, change logs and version tables as the application's tables come, change their
//! key, are rebuilt or go.

use crate::*;

impl SqliteStore {
    pub(crate) fn init(&mut self) -> Result<(), StoreError> {
        let c = &self.conn;
        let e = |s| StoreError::Sqlite {
            path: self.cfg.path.clone(),
            source: s,
        };
        c.execute_batch(ddl::CREATE_FIXED).map_err(e)?;
        migrate::ensure_parked_collision(c).map_err(e)?;
        self.cfg.tables.store(c).map_err(e)?;
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
        // Before the sync, which records the schema version: creating the baseline's tables
        // changes it.
        replicated::init_baseline(&self.conn).map_err(|s| self.sql_err(s))?;
        self.sync_schema(first_start)?;
        meta_set(&self.conn, "tables_registered", 1).map_err(|s| self.sql_err(s))?;
        Ok(())
    }

    /// Brings triggers and marmot's per-table state in line with the application's schema.
    pub(crate) fn sync_schema(&mut self, first_start: bool) -> Result<(), StoreError> {
        let out = sync_tables(
            &self.conn,
            self.cfg.capture,
            first_start,
            &|_| false,
            &self.stats,
        )
        .map_err(|e| self.sql_err(e))?;
        self.install_tables(out).map_err(|e| self.sql_err(e))?;
        self.scan_needed = true;
        self.synced_in_txn = true;
        Ok(())
    }

    /// Takes `tables` as the replicated tables (after a sync, here or inside an apply).
    pub(crate) fn install_tables(&mut self, tables: Vec<Table>) -> rusqlite::Result<()> {
        self.by_name = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.info.name.clone(), i))
            .collect();
        self.tables = tables;
        self.schema_version = self
            .conn
            .query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        Ok(())
    }

    /// Re-reads the schema if an application changed it. Inside a transaction.
    pub(crate) fn follow_schema(&mut self) -> Result<(), StoreError> {
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
}

/// Brings triggers and marmot's per-table state in line with the application's schema and
/// returns the replicated tables. `quiet(name)`: the table's schema was just applied from the
/// stream, so its rows are not published again (its origin publishes them) even when its
/// triggers were missing or it is new.
pub(crate) fn sync_tables(
    c: &Connection,
    capture: bool,
    first_start: bool,
    quiet: &dyn Fn(&str) -> bool,
    stats: &StoreStats,
) -> rusqlite::Result<Vec<Table>> {
    let e = |s: rusqlite::Error| s;
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
        tracing::info!(table = %name, "table is gone or no longer replicated: dropping marmot's state for it");
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
        } else if *reason == schema::SkipReason::Excluded {
            tracing::info!(table = %name, %reason, "table not replicated");
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
                if quiet(&t.name) {
                    tracing::info!(table = %t.name, "new table from the stream: replicating it");
                } else if first_start {
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
                log_all = !quiet(&t.name);
            }
            Some(_) => {
                c.execute_batch(&ddl::create_table_state(&t)).map_err(e)?;
                if capture && !quiet(&t.name) && names.iter().any(|n| !triggers.contains_key(n)) {
                    tracing::warn!(table = %t.name, "capture triggers were missing (table rebuilt?): reinstalling them and publishing every row, and a delete of every row gone meanwhile");
                    log_all = true;
                }
            }
        }
        for (name, sql) in names.iter().zip(&expected) {
            let present = triggers.get(name);
            let want = capture;
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
        if log_all && capture {
            // Every row as it is, and a tombstone for every versioned row that is gone:
            // deletes made while no trigger logged them (a rebuild, marmot stopped).
            c.execute_batch(&table.sql.log_all).map_err(e)?;
            c.execute_batch(&table.sql.log_gone).map_err(e)?;
        }
        out.push(table);
    }
    stats.tables.store(out.len() as u64, Ordering::Relaxed);
    let digest = crate::replicated::schema_digest(c).map_err(e)?;
    if let Ok(mut d) = stats.schema_digest.lock() {
        *d = digest;
    }
    let counted = skipped
        .iter()
        .filter(|(_, r)| *r != schema::SkipReason::Shadow)
        .count();
    stats
        .skipped_tables
        .store(counted as u64, Ordering::Relaxed);
    Ok(out)
}

pub(crate) fn user_marmot_tables(c: &Connection, kind: &str) -> rusqlite::Result<Vec<String>> {
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
