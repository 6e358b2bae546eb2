//! Upgrades marmot's own tables written by an earlier release, in place.
//!
//! Format 1 gave the key columns of a STRICT table's `ANY` key NUMERIC affinity in the change
//! log and the version table, so `'7'` (TEXT) was logged and versioned as `7` (INTEGER).
//! Format 2 declares them without affinity, as the table keeps them, and records the key's
//! column names in its signature (format 1 recorded only their types, so a key moved to other
//! columns of the same types went unnoticed). The upgrade must never
//! take the "primary key changed" path (which drops tombstones and re-stamps every row): it
//! copies the log and the versions into tables declared the new way, keeps every stamp and
//! tombstone, and then repairs what format 1 could not hold: a row whose key has no version
//! of exactly its own is logged (published again, as the storage class it has), and a logged
//! key that matches neither a row nor a version (a coerced spelling) is dropped.

use crate::ddl::{self, quote};
use crate::schema::{TableInfo, discover};
use rusqlite::{Connection, params};

/// Migrates format 1 to format 2. Inside the opening transaction.
pub(crate) fn format1_to_2(c: &Connection) -> rusqlite::Result<()> {
    let registry: Vec<(String, String)> = c
        .prepare("SELECT name, key_signature FROM \"__marmot__tables\"")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let found = discover(c)?;
    for (name, recorded) in registry {
        let Some(t) = found.tables.iter().find(|t| t.name == name) else {
            continue; // gone: the schema sync forgets it
        };
        let sig = t.key_signature();
        let old = t.format1_key_signature();
        if recorded != old {
            continue; // a real key change: the schema sync handles it
        }
        // Format 2 names the key's columns in the signature too (a key moved to other
        // columns of the same types is a key change); the key's declaration changes only for
        // a STRICT table's ANY key.
        if t.key().iter().any(|c| c.strict_any) {
            tracing::info!(table = %name, "upgrading marmot's change log and row versions to format 2 (keys keep their storage class)");
            redeclare(c, t)?;
        }
        c.execute(
            "UPDATE \"__marmot__tables\" SET key_signature = ?2 WHERE name = ?1",
            params![name, sig],
        )?;
    }
    Ok(())
}

/// Rebuilds the log and version tables of `t` with today's declarations, rows kept.
fn redeclare(c: &Connection, t: &TableInfo) -> rusqlite::Result<()> {
    let log = quote(&ddl::log_table(&t.name));
    let ver = quote(&ddl::ver_table(&t.name));
    // Temporary copies: renaming the tables would rewrite the capture triggers that name
    // the log.
    c.execute_batch(&format!(
        "DROP TABLE IF EXISTS temp.\"marmot_log\"; DROP TABLE IF EXISTS temp.\"marmot_ver\";
         CREATE TEMP TABLE \"marmot_log\" AS SELECT * FROM {log};
         CREATE TEMP TABLE \"marmot_ver\" AS SELECT * FROM {ver};
         {drop}
         {create}
         INSERT INTO {log} SELECT * FROM temp.\"marmot_log\";
         INSERT OR IGNORE INTO {ver} SELECT * FROM temp.\"marmot_ver\";
         DROP TABLE temp.\"marmot_log\"; DROP TABLE temp.\"marmot_ver\";",
        drop = ddl::drop_table_state(&t.name),
        create = ddl::create_table_state(t),
    ))?;
    let table = quote(&t.name);
    let k = (0..t.key_columns)
        .map(|i| format!("\"k{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let cols = t
        .key()
        .iter()
        .map(|col| quote(&col.name))
        .collect::<Vec<_>>()
        .join(", ");
    c.execute_batch(&format!(
        "DELETE FROM {log} AS l WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {tm}) \
           AND NOT EXISTS (SELECT 1 FROM {ver} AS v WHERE {vm});
         INSERT INTO {log} ({k}) SELECT {cols} FROM {table} AS t \
           WHERE NOT EXISTS (SELECT 1 FROM {ver} AS v WHERE {tv});",
        tm = exact(t, "t", "l", true),
        vm = exact(t, "v", "l", false),
        tv = exact(t, "t", "v", true),
    ))
}

/// Keys equal under the key's collation and of the same storage class (format 1 turned
/// `'8'` into `8`, which a comparison without affinity no longer matches anyway).
fn exact(t: &TableInfo, left: &str, right: &str, left_is_row: bool) -> String {
    t.key()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let l = if left_is_row {
                format!("{left}.{}", quote(&c.name))
            } else {
                format!("{left}.\"k{i}\"")
            };
            format!(
                "{l} = {right}.\"k{i}\" COLLATE {coll} AND typeof({l}) = typeof({right}.\"k{i}\")",
                coll = c.collation
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Adds the `collision` column of `__marmot__parked` (format 2) where it is missing: a
/// database, or a snapshot taken whole, of format 1.
pub(crate) fn ensure_parked_collision(c: &Connection) -> rusqlite::Result<()> {
    let has: i64 = c.query_row(
        "SELECT count(*) FROM pragma_table_info('__marmot__parked') WHERE name = 'collision'",
        [],
        |r| r.get(0),
    )?;
    if has == 0 {
        c.execute_batch(
            "ALTER TABLE \"__marmot__parked\" ADD COLUMN collision INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    Ok(())
}
