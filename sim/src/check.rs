//! The checker: safety invariants while the run goes on, convergence at the end.
//!
//! Safety, checked every 100 ms of simulated time on every node's database:
//! - no row version ever goes backwards (so no applied change overwrote a higher version);
//! - every batch applies atomically: if a node holds a batch's version for one of its rows,
//!   it holds that version or a higher one for every row of the batch.
//!
//! (The capture sequence and the stamps of local writes are checked as captures happen, in
//! [`crate::world`].) Liveness, at the end: every node's tables equal the oracle's.

use crate::oracle::Oracle;
use crate::report::Failure;
use bytes::Bytes;
use marmot_core::value::{ValueRef, sql_row_literal};
use marmot_core::wire::{BatchId, BodyReader, Header, Item, decode_message, unseal};
use marmot_core::{Stamp, Version};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One row of a decoded batch.
#[derive(Clone, Debug)]
pub struct BatchRow {
    /// Table.
    pub table: String,
    /// Key as an SQL literal (normalised as the checker compares keys).
    pub key: String,
    /// The version the writer replaced.
    pub base: Option<Version>,
}

use crate::workload::{Generator, TableSpec, norm_key};

/// The schema objects a complete batch changes, as (kind, name).
pub fn batch_schema_objects(messages: &[Bytes]) -> Vec<(String, String)> {
    let mut header = None;
    let mut payload = Vec::new();
    for m in messages {
        let Ok((h, frag)) = decode_message(m) else {
            return Vec::new();
        };
        header.get_or_insert(h);
        payload.extend_from_slice(frag);
    }
    let Some(header) = header else {
        return Vec::new();
    };
    let Ok(body) = unseal(&header, Bytes::from(payload)) else {
        return Vec::new();
    };
    let mut reader = BodyReader::new(&body);
    let mut values = Vec::new();
    let mut out = Vec::new();
    while let Ok(Some(item)) = reader.next_item(&mut values) {
        match item {
            Item::Schema(s) => out.push((s.kind.as_str().to_string(), s.name.to_string())),
            _ => break,
        }
    }
    out
}

/// Decodes a complete batch from its messages (in chunk order).
pub fn batch_rows(messages: &[Bytes]) -> Option<(Header, Vec<BatchRow>)> {
    let mut header = None;
    let mut payload = Vec::new();
    for m in messages {
        let (h, frag) = decode_message(m).ok()?;
        header.get_or_insert(h);
        payload.extend_from_slice(frag);
    }
    let header = header?;
    let body = unseal(&header, Bytes::from(payload)).ok()?;
    let mut reader = BodyReader::new(&body);
    let mut values = Vec::new();
    let mut rows = Vec::new();
    let mut table = String::new();
    let mut keys = 0;
    // A repair's rows are not writes: each names the version it repairs, not one it replaces.
    let mut repair = false;
    while let Some(item) = reader.next_item(&mut values).ok()? {
        match item {
            Item::Schema(_) => {}
            Item::Table(t) => {
                table = t.name.to_string();
                keys = t.key_columns;
                repair = t.repair;
            }
            Item::Upsert { .. } | Item::Delete { .. } if repair => {}
            Item::Upsert { base } | Item::Delete { base } => rows.push(BatchRow {
                table: table.clone(),
                key: norm_key(&table, &values[..keys]),
                base,
            }),
        }
    }
    Some((header, rows))
}

type Versions = BTreeMap<(String, String), Version>;

/// Reads a node's row versions.
fn versions(db: &PathBuf, tables: &[TableSpec]) -> rusqlite::Result<Versions> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut out = Versions::new();
    for &TableSpec {
        name: table,
        keys,
        drops,
        ..
    } in tables
    {
        if drops {
            continue;
        }
        let exists: i64 = c.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = ?1",
            [format!("__marmot__ver__{table}")],
            |r| r.get(0),
        )?;
        if exists == 0 {
            continue;
        }
        let mut stmt = c.prepare(&format!("SELECT * FROM \"__marmot__ver__{table}\""))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let vals: Vec<ValueRef<'_>> = (0..keys)
                .map(|i| marmot_sqlite::from_sql(r.get_ref(i).expect("key column")))
                .collect();
            let key = norm_key(table, &vals);
            let v = Version {
                stamp: Stamp::from_u64(r.get::<_, i64>(keys)? as u64),
                node: r.get::<_, i64>(keys + 1)? as u64,
            };
            out.insert((table.to_string(), key), v);
        }
    }
    Ok(out)
}

/// The node's tombstone horizon (ms; 0 when no tombstone was ever collected).
fn horizon(db: &PathBuf) -> rusqlite::Result<u64> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let meta: i64 = c.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name = '__marmot__meta'",
        [],
        |r| r.get(0),
    )?;
    if meta == 0 {
        return Ok(0);
    }
    let h: Option<i64> = c
        .query_row(
            "SELECT value FROM \"__marmot__meta\" WHERE key = 'horizon'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(h.unwrap_or(0) as u64)
}

/// Reasons of the batches parked on a node (None: unreadable).
fn parked(db: &PathBuf) -> Option<Vec<String>> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    c.prepare("SELECT reason FROM \"__marmot__parked\"")
        .ok()?
        .query_map([], |r| r.get(0))
        .ok()?
        .collect::<Result<_, _>>()
        .ok()
}

/// Whether the database has table `table` (V3 creates some during the run).
fn has_table(c: &Connection, table: &str) -> rusqlite::Result<bool> {
    c.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [table],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// A node's user tables as sorted row literals, of the columns the oracle knows them by
/// (`all`: every column). A table the node does not have reads as empty.
pub fn contents(
    db: &PathBuf,
    tables: &[TableSpec],
) -> rusqlite::Result<BTreeMap<&'static str, Vec<String>>> {
    contents_of(db, tables, false)
}

fn contents_of(
    db: &PathBuf,
    tables: &[TableSpec],
    all: bool,
) -> rusqlite::Result<BTreeMap<&'static str, Vec<String>>> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut out = BTreeMap::new();
    for &TableSpec {
        name: table, cols, ..
    } in tables
    {
        if !has_table(&c, table)? || (cols.is_empty() && !all) {
            out.insert(table, Vec::new());
            continue;
        }
        let cols = if all { "*" } else { cols };
        let mut stmt = c.prepare(&format!("SELECT {cols} FROM {table}"))?;
        let n = stmt.column_count();
        let mut rows: Vec<String> = stmt
            .query_map([], |r| {
                let vals: Vec<ValueRef<'_>> = (0..n)
                    .map(|i| marmot_sqlite::from_sql(r.get_ref(i).expect("column")))
                    .collect();
                Ok(sql_row_literal(vals))
            })?
            .collect::<Result<_, _>>()?;
        rows.sort();
        out.insert(table, rows);
    }
    Ok(out)
}

/// A node's rows by (table, key literal), keys normalised as the checker compares them.
fn keyed_contents(
    db: &PathBuf,
    tables: &[TableSpec],
) -> rusqlite::Result<BTreeMap<(String, String), String>> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut out = BTreeMap::new();
    for &TableSpec {
        name: table,
        keys,
        cols,
        ..
    } in tables
    {
        if !has_table(&c, table)? || cols.is_empty() {
            continue;
        }
        let mut stmt = c.prepare(&format!("SELECT {cols} FROM {table}"))?;
        let n = stmt.column_count();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let vals: Vec<ValueRef<'_>> = (0..n)
                .map(|i| marmot_sqlite::from_sql(r.get_ref(i).expect("column")))
                .collect();
            out.insert(
                (table.to_string(), norm_key(table, &vals[..keys])),
                sql_row_literal(vals),
            );
        }
    }
    Ok(out)
}

/// Checks invariants across the run.
pub struct Checker {
    dbs: Vec<PathBuf>,
    generator: Generator,
    seen: Vec<Versions>,
    decoded: BTreeMap<BatchId, (Version, Vec<BatchRow>)>,
    chunks: BTreeMap<BatchId, BTreeMap<u32, Bytes>>,
    read_upto: usize,
}

impl Checker {
    /// A checker for these databases.
    pub fn new(nodes: usize, dbs: Vec<PathBuf>, generator: Generator) -> Self {
        Checker {
            dbs,
            generator,
            seen: vec![Versions::new(); nodes],
            decoded: BTreeMap::new(),
            chunks: BTreeMap::new(),
            read_upto: 0,
        }
    }

    fn learn(&mut self, published: &[(u64, Bytes)]) {
        for (_, m) in &published[self.read_upto..] {
            let Ok((h, _)) = decode_message(m) else {
                continue;
            };
            let chunks = self.chunks.entry(h.batch).or_default();
            chunks.insert(h.chunk, m.clone());
            if chunks.len() as u32 == h.chunks && !self.decoded.contains_key(&h.batch) {
                let msgs: Vec<Bytes> = chunks.values().cloned().collect();
                if let Some((header, rows)) = batch_rows(&msgs) {
                    self.decoded.insert(h.batch, (header.version(), rows));
                }
            }
        }
        self.read_upto = published.len();
    }

    /// Checks the safety invariants now. `published` is every message the broker stored.
    pub fn check(&mut self, published: &[(u64, Bytes)], oracle: &Oracle) -> Result<(), Failure> {
        self.learn(published);
        for (n, db) in self.dbs.iter().enumerate() {
            let tables = self.generator.tables();
            let now = versions(db, tables).map_err(|e| Failure::Crash {
                detail: format!("reading node {}: {e}", n + 1),
            })?;
            // A committed write is present, or replaced by a write with a higher stamp: on its
            // own node, a captured row never falls below its version, and at that version it
            // holds what the application wrote.
            let mut rows: Option<BTreeMap<(String, String), String>> = None;
            let pending = oracle.uncaptured_keys(n);
            let horizon = horizon(db).map_err(|e| Failure::Crash {
                detail: format!("reading node {}: {e}", n + 1),
            })?;
            for ((table, key), (version, row)) in oracle.captured_writes(n) {
                let held = now.get(&(table.to_string(), key.clone())).copied();
                // A row deleted (by this write or a later one) below the tombstone horizon may
                // have no version left.
                let collected = held.is_none()
                    && ((row.is_none() && version.stamp.wall_ms() < horizon)
                        || oracle.deleted_below_horizon(table, &key, version, false, horizon));
                if held.is_none_or(|h| h < version) && !collected {
                    return Err(Failure::Safety {
                        invariant: "a committed write is never lost",
                        detail: format!(
                            "node {}: {table} {key} written at {version} is at {held:?} (tombstone horizon {horizon} ms); its captured changes: {}",
                            n + 1,
                            oracle.history(table, &key)
                        ),
                    });
                }
                // A later write not captured yet may have changed the row already.
                if held == Some(version) && !pending.contains(&(table, key.clone())) {
                    let rows = match &mut rows {
                        Some(r) => r,
                        None => {
                            rows.insert(keyed_contents(db, tables).map_err(|e| Failure::Crash {
                                detail: format!("reading node {}: {e}", n + 1),
                            })?)
                        }
                    };
                    let have = rows.get(&(table.to_string(), key.clone()));
                    if have != row.as_ref() {
                        return Err(Failure::Safety {
                            invariant: "a committed write is never lost",
                            detail: format!(
                                "node {}: {table} {key} at {version} holds {have:?}, the application wrote {row:?}",
                                n + 1
                            ),
                        });
                    }
                }
            }
            for (key, v) in &now {
                if let Some(before) = self.seen[n].get(key)
                    && v < before
                {
                    return Err(Failure::Safety {
                        invariant: "no applied change overwrites a row version with a higher stamp",
                        detail: format!(
                            "node {}: {} {} went from {} back to {}",
                            n + 1,
                            key.0,
                            key.1,
                            before,
                            v
                        ),
                    });
                }
            }
            // Rows of a table the workload drops have no versions to check (see `versions`).
            let dropped = |r: &&BatchRow| {
                tables
                    .iter()
                    .any(|t| t.drops && t.name.eq_ignore_ascii_case(&r.table))
            };
            // The oracle does not know the rows of some tables, so it cannot say whether a row's
            // tombstone was collected: a row of such a table without a version counts as one.
            let unknown = |r: &BatchRow| {
                tables
                    .iter()
                    .any(|t| t.cols.is_empty() && t.name.eq_ignore_ascii_case(&r.table))
            };
            for (id, (version, rows)) in &self.decoded {
                let rows: Vec<&BatchRow> = rows.iter().filter(|r| !dropped(r)).collect();
                let holds = |r: &BatchRow| now.get(&(r.table.clone(), r.key.clone())).copied();
                let applied = rows.iter().any(|r| holds(r) == Some(*version));
                if !applied {
                    continue;
                }
                // A row of the batch deleted (by it or later) below the tombstone horizon may
                // have no version left.
                let collected = |r: &BatchRow| {
                    holds(r).is_none()
                        && (unknown(r)
                            || oracle
                                .deleted_below_horizon(&r.table, &r.key, *version, true, horizon))
                };
                if let Some(r) = rows
                    .iter()
                    .find(|r| holds(r).is_none_or(|v| v < *version) && !collected(r))
                {
                    return Err(Failure::Safety {
                        invariant: "each batch applies atomically",
                        detail: format!(
                            "node {} holds batch {id} ({version}) for some rows but {} {} is at {:?}",
                            n + 1,
                            r.table,
                            r.key,
                            holds(r)
                        ),
                    });
                }
            }
            for (key, v) in now {
                let e = self.seen[n].entry(key).or_insert(v);
                if v > *e {
                    *e = v;
                }
            }
        }
        Ok(())
    }

    /// When every write was captured and every node holds exactly the oracle's rows, returns
    /// how many captures there were.
    pub fn converged(&self, oracle: &Oracle) -> Option<usize> {
        if (0..self.dbs.len()).any(|n| oracle.uncaptured(n) > 0) {
            return None;
        }
        if self
            .dbs
            .iter()
            .any(|db| parked(db).is_none_or(|p| !p.is_empty()))
        {
            return None;
        }
        let expected = oracle.expected();
        for db in &self.dbs {
            let got = contents(db, self.generator.tables()).ok()?;
            for &TableSpec { name: table, .. } in self.generator.tables() {
                if got.get(table) != Some(expected.get(table).unwrap_or(&Vec::new())) {
                    return None;
                }
            }
        }
        // The same replicated schema everywhere (normalised statements).
        let schemas: Vec<_> = self.dbs.iter().map(|db| schema(db)).collect();
        if schemas.iter().any(Option::is_none) || schemas.windows(2).any(|w| w[0] != w[1]) {
            return None;
        }
        // And the same full rows of the tables the oracle knows by some columns only.
        if !self.same_full_rows() {
            return None;
        }
        Some(oracle.captures.iter().map(Vec::len).sum())
    }

    /// Once the tables converged: on every node the full-text index passes FTS5's integrity
    /// check and finds, for every word, exactly the documents that contain it (so every node
    /// gives the same search results, by key).
    pub fn full_text_indexes(&self) -> Result<(), Failure> {
        if !self.generator.has_fts() {
            return Ok(());
        }
        for (n, db) in self.dbs.iter().enumerate() {
            let broken = |what: String| Failure::Safety {
                invariant: "a full-text index kept by the application's triggers matches its rows on every node",
                detail: format!("node {}: {what}", n + 1),
            };
            // The integrity check is an INSERT statement: a read-write connection.
            let c = Connection::open(db).map_err(|e| broken(e.to_string()))?;
            c.execute_batch("INSERT INTO doc_fts(doc_fts, rank) VALUES ('integrity-check', 1);")
                .map_err(|e| broken(format!("integrity check: {e}")))?;
            for word in crate::workload::WORDS {
                let ids = |sql: &str| -> rusqlite::Result<Vec<i64>> {
                    c.prepare(sql)?.query_map([word], |r| r.get(0))?.collect()
                };
                let found = ids("SELECT rowid FROM doc_fts WHERE doc_fts MATCH ?1 ORDER BY rowid")
                    .map_err(|e| broken(e.to_string()))?;
                let holding = ids(
                    "SELECT id FROM doc WHERE ' ' || body || ' ' LIKE '% ' || ?1 || ' %' ORDER BY id",
                )
                .map_err(|e| broken(e.to_string()))?;
                if found != holding {
                    return Err(broken(format!(
                        "searching {word:?} finds {found:?}, the documents holding it are {holding:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The tables the oracle knows by some of their columns only.
    fn partial_tables(&self) -> Vec<TableSpec> {
        self.generator
            .tables()
            .iter()
            .filter(|t| t.cols != "*")
            .copied()
            .collect()
    }

    /// Whether every node holds the same rows, every column, of the tables the oracle knows
    /// by some of their columns only.
    fn same_full_rows(&self) -> bool {
        let partial = self.partial_tables();
        if partial.is_empty() {
            return true;
        }
        let all: Vec<_> = self
            .dbs
            .iter()
            .map(|db| contents_of(db, &partial, true).ok())
            .collect();
        all.iter().all(Option::is_some) && all.windows(2).all(|w| w[0] == w[1])
    }

    /// Describes how the nodes differ from the oracle.
    pub fn difference(&self, oracle: &Oracle) -> String {
        let mut out = String::new();
        for n in 0..self.dbs.len() {
            let u = oracle.uncaptured(n);
            if u > 0 {
                out.push_str(&format!(
                    "node {}: {u} committed transactions were never captured\n",
                    n + 1
                ));
            }
        }
        for (n, db) in self.dbs.iter().enumerate() {
            if let Some(p) = parked(db)
                && !p.is_empty()
            {
                out.push_str(&format!("node {}: still parked: {p:?}\n", n + 1));
            }
        }
        let expected = oracle.expected();
        for (n, db) in self.dbs.iter().enumerate() {
            let Ok(got) = contents(db, self.generator.tables()) else {
                continue;
            };
            for &TableSpec { name: table, .. } in self.generator.tables() {
                let want = expected.get(table).cloned().unwrap_or_default();
                let have = got.get(table).cloned().unwrap_or_default();
                let missing: Vec<&String> =
                    want.iter().filter(|r| !have.contains(r)).take(5).collect();
                let extra: Vec<&String> =
                    have.iter().filter(|r| !want.contains(r)).take(5).collect();
                if !missing.is_empty() || !extra.is_empty() {
                    out.push_str(&format!(
                        "node {} table {table}: missing {missing:?}, unexpected {extra:?} ({} rows, expected {})\n",
                        n + 1,
                        have.len(),
                        want.len()
                    ));
                }
            }
        }
        let first = self.dbs.first().and_then(|db| schema(db));
        for (n, db) in self.dbs.iter().enumerate().skip(1) {
            let s = schema(db);
            if s != first {
                out.push_str(&format!(
                    "node {} has another schema than node 1: {s:?} / {first:?}\n",
                    n + 1
                ));
            }
        }
        if !self.same_full_rows() {
            let partial = self.partial_tables();
            let first = self
                .dbs
                .first()
                .and_then(|db| contents_of(db, &partial, true).ok());
            for (n, db) in self.dbs.iter().enumerate().skip(1) {
                let got = contents_of(db, &partial, true).ok();
                if got != first {
                    out.push_str(&format!(
                        "node {} has other full rows than node 1: {got:?} / {first:?}\n",
                        n + 1
                    ));
                }
            }
        }
        if out.is_empty() {
            out.push_str("no difference at the deadline (converged too late?)");
        }
        out
    }
}

/// The replicated schema of a node's database, normalised (None: unreadable now).
fn schema(db: &std::path::Path) -> Option<Vec<(String, String, String)>> {
    let c = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    marmot_sqlite::replicated::schema_objects(&c).ok()
}
