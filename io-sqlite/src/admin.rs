//! Operations a person runs with the `marmot` command: remove marmot from a database, and
//! inspect, retry or discard parked batches and conflict records.
//!
//! They work on the database directly, whether or not a daemon runs: a retry is a request
//! the running daemon picks up (it watches the file), or the next start does.

use crate::ddl::quote;
use crate::schema::PREFIX;
use marmot_core::wire::decode_message;
use rusqlite::{Connection, params};

/// What `cleanup` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Triggers dropped.
    pub triggers: usize,
    /// Tables dropped.
    pub tables: usize,
}

/// Removes every trigger and table marmot created (matched by exact name prefix); user
/// tables and rows are untouched. One transaction.
pub fn cleanup(conn: &Connection) -> rusqlite::Result<CleanupReport> {
    let tx = conn.unchecked_transaction()?;
    let mut objects: Vec<(String, String)> = Vec::new();
    {
        let mut stmt =
            tx.prepare("SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'table')")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for r in rows {
            let (kind, name) = r?;
            if name.starts_with(PREFIX) {
                objects.push((kind, name));
            }
        }
    }
    let mut report = CleanupReport::default();
    // Triggers first: they reference the log tables.
    objects.sort_by_key(|(kind, _)| kind != "trigger");
    for (kind, name) in objects {
        if kind == "trigger" {
            tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote(&name)))?;
            report.triggers += 1;
        } else {
            tx.execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&name)))?;
            report.tables += 1;
        }
    }
    tx.commit()?;
    Ok(report)
}

/// A parked batch, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParkedRow {
    /// Its id (for retry and discard).
    pub id: i64,
    /// Stream sequence of its last message.
    pub stream_seq: u64,
    /// The batch (origin/incarnation/seq), if readable.
    pub batch: Option<String>,
    /// Why it is parked.
    pub reason: String,
    /// When it was parked (ms since the Unix epoch).
    pub parked_at_ms: i64,
    /// Attempts so far.
    pub attempts: i64,
    /// A retry was requested and not yet done.
    pub retry_requested: bool,
    /// Size of the kept message.
    pub bytes: usize,
    /// Tables the batch touches (when readable).
    pub tables: Vec<String>,
}

fn marmot_ready(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '__marmot__parked'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n == 1)
}

/// Lists parked batches.
pub fn list_parked(conn: &Connection) -> rusqlite::Result<Vec<ParkedRow>> {
    if !marmot_ready(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT id, stream_seq, origin, incarnation, batch_seq, reason, parked_at_ms, attempts, retry_requested, message \
         FROM \"__marmot__parked\" ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        let origin: Option<i64> = r.get(2)?;
        let inc: Option<i64> = r.get(3)?;
        let seq: Option<i64> = r.get(4)?;
        let message: Vec<u8> = r.get(9)?;
        Ok(ParkedRow {
            id: r.get(0)?,
            stream_seq: r.get::<_, i64>(1)? as u64,
            batch: match (origin, inc, seq) {
                (Some(o), Some(i), Some(s)) => Some(format!("{o}/{:x}/{s}", i as u64)),
                _ => None,
            },
            reason: r.get(5)?,
            parked_at_ms: r.get(6)?,
            attempts: r.get(7)?,
            retry_requested: r.get::<_, i64>(8)? != 0,
            bytes: message.len(),
            tables: tables_of(&message),
        })
    })?;
    rows.collect()
}

fn tables_of(message: &[u8]) -> Vec<String> {
    let Ok((h, frag)) = decode_message(message) else {
        return Vec::new();
    };
    let Ok(body) = marmot_core::wire::unseal(&h, bytes::Bytes::copy_from_slice(frag)) else {
        return Vec::new();
    };
    let mut reader = marmot_core::wire::BodyReader::new(&body);
    let mut values = Vec::new();
    let mut out = Vec::new();
    while let Ok(Some(item)) = reader.next_item(&mut values) {
        if let marmot_core::wire::Item::Table(t) = item {
            out.push(t.name.to_string());
        }
    }
    out
}

/// Asks for a retry of one parked batch (or all): returns how many were marked.
pub fn request_retry(conn: &Connection, id: Option<i64>) -> rusqlite::Result<usize> {
    if !marmot_ready(conn)? {
        return Ok(0);
    }
    match id {
        Some(id) => conn.execute(
            "UPDATE \"__marmot__parked\" SET retry_requested = 1 WHERE id = ?1",
            params![id],
        ),
        None => conn.execute("UPDATE \"__marmot__parked\" SET retry_requested = 1", []),
    }
}

/// Discards one parked batch (or all): returns how many were removed.
pub fn discard_parked(conn: &Connection, id: Option<i64>) -> rusqlite::Result<usize> {
    if !marmot_ready(conn)? {
        return Ok(0);
    }
    match id {
        Some(id) => conn.execute(
            "DELETE FROM \"__marmot__parked\" WHERE id = ?1",
            params![id],
        ),
        None => conn.execute("DELETE FROM \"__marmot__parked\"", []),
    }
}

/// A conflict record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictRow {
    /// Record id.
    pub id: i64,
    /// Table.
    pub table: String,
    /// Key (SQL literal).
    pub key: String,
    /// Winning stamp and node.
    pub winner: (u64, u64),
    /// Losing stamp and node.
    pub loser: (u64, u64),
    /// The losing row (SQL literal), None for a delete.
    pub loser_row: Option<String>,
    /// When recorded (ms since the Unix epoch).
    pub recorded_at_ms: i64,
}

/// Lists the most recent conflict records, newest last.
pub fn list_conflicts(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<ConflictRow>> {
    if !marmot_ready(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT id, tbl, key, winner_stamp, winner_node, loser_stamp, loser_node, loser_row, recorded_at_ms \
         FROM (SELECT * FROM \"__marmot__conflicts\" ORDER BY id DESC LIMIT ?1) ORDER BY id",
    )?;
    let rows = stmt.query_map([limit as i64], |r| {
        Ok(ConflictRow {
            id: r.get(0)?,
            table: r.get(1)?,
            key: r.get(2)?,
            winner: (r.get::<_, i64>(3)? as u64, r.get::<_, i64>(4)? as u64),
            loser: (r.get::<_, i64>(5)? as u64, r.get::<_, i64>(6)? as u64),
            loser_row: r.get(7)?,
            recorded_at_ms: r.get(8)?,
        })
    })?;
    rows.collect()
}

/// Which rows `repair` republishes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RepairScope {
    /// Only rows matching this SQL expression (over the table's columns); with keys or a
    /// filter, only those, else the whole table.
    pub filter: Option<String>,
    /// These keys, present here or not (one value per key column, in key order): a key that
    /// is absent here is published as a delete.
    pub keys: Vec<Vec<marmot_core::Value>>,
}

/// What `repair` logged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Rows of the table logged (published again as they are here).
    pub rows: u64,
    /// Keys this node knows only as gone (tombstones, deleted rows) logged: published as deletes.
    pub gone: u64,
}

/// The way out for nodes that diverged (a write made with marmot's triggers removed, a bug):
/// logs the rows of `table` (or a part of it) as changed, so that marmot's next capture (the
/// running daemon's, or the next start's) publishes them with fresh stamps, and every node
/// converges to this node's copy of them. For the whole table, every key this node holds a
/// version of but no row (its deletes) is logged too, and published as a delete. Rows that
/// exist only on other nodes are not known here: name them with `keys` to delete them
/// everywhere. One transaction.
pub fn repair(conn: &Connection, table: &str, scope: &RepairScope) -> Result<RepairReport, String> {
    let found = crate::schema::discover(conn).map_err(|e| e.to_string())?;
    let Some(t) = found.tables.iter().find(|t| t.name == table) else {
        let why = found
            .skipped
            .iter()
            .find(|(n, _)| n == table)
            .map(|(_, r)| format!(": it is not replicated ({r})"))
            .unwrap_or_else(|| ": no such table".into());
        return Err(format!("table {}{why}", quote(table)));
    };
    let registered: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [crate::ddl::log_table(table)],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())?;
    if registered == 0 {
        return Err(format!(
            "table {} has no change log yet: start marmot on this database once first",
            quote(table)
        ));
    }
    let sql = crate::ddl::TableSql::new(t);
    let log = quote(&crate::ddl::log_table(table));
    let ks = (0..t.key_columns)
        .map(|i| format!("\"k{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let cols = t
        .key()
        .iter()
        .map(|c| quote(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let tx = conn.unchecked_transaction().map_err(|e| e.to_string())?;
    let mut report = RepairReport::default();
    let e = |x: rusqlite::Error| x.to_string();
    let whole = scope.filter.is_none() && scope.keys.is_empty();
    if whole {
        report.rows = tx.execute(&sql.log_all, []).map_err(e)? as u64;
        let ver = quote(&crate::ddl::ver_table(table));
        report.gone = tx
            .execute(
                &format!(
                    "INSERT INTO {log} ({ks}) SELECT {vk} FROM {ver} AS v \
                     WHERE NOT EXISTS (SELECT 1 FROM {qt} AS t WHERE {m})",
                    vk = (0..t.key_columns)
                        .map(|i| format!("v.\"k{i}\""))
                        .collect::<Vec<_>>()
                        .join(", "),
                    qt = quote(table),
                    m = crate::ddl::key_match(t, "t", "v"),
                ),
                [],
            )
            .map_err(e)? as u64;
    }
    if let Some(filter) = &scope.filter {
        report.rows += tx
            .execute(
                &format!(
                    "INSERT INTO {log} ({ks}) SELECT {cols} FROM {} WHERE ({filter})",
                    quote(table)
                ),
                [],
            )
            .map_err(|x| format!("--where {filter:?}: {x}"))? as u64;
    }
    for key in &scope.keys {
        if key.len() != t.key_columns {
            return Err(format!(
                "a key of table {} has {} values ({}), this key has {}",
                quote(table),
                t.key_columns,
                cols,
                key.len()
            ));
        }
        if key.iter().any(|v| matches!(v, marmot_core::Value::Null)) {
            return Err("a key value is NULL: rows with NULL keys are not replicated".into());
        }
        let params = (1..=key.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        tx.execute(
            &format!("INSERT INTO {log} ({ks}) VALUES ({params})"),
            rusqlite::params_from_iter(key.iter().map(|v| crate::Bind(v.as_ref()))),
        )
        .map_err(e)?;
        let exists: bool = tx
            .query_row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} AS t WHERE {})",
                    quote(table),
                    t.key()
                        .iter()
                        .enumerate()
                        .map(|(i, c)| format!(
                            "t.{} = ?{} COLLATE {}",
                            quote(&c.name),
                            i + 1,
                            c.collation
                        ))
                        .collect::<Vec<_>>()
                        .join(" AND ")
                ),
                rusqlite::params_from_iter(key.iter().map(|v| crate::Bind(v.as_ref()))),
                |r| r.get(0),
            )
            .map_err(e)?;
        if exists {
            report.rows += 1;
        } else {
            report.gone += 1;
        }
    }
    tx.commit().map_err(e)?;
    Ok(report)
}
