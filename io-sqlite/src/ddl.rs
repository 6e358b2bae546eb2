//! SQL text for marmot's own tables, triggers and per-table statements.
//!
//! Every identifier is quoted. Everything marmot leaves in the application's schema
//! (tables, triggers) uses only syntax SQLite 3.31 reads (no STRICT, no RETURNING, no
//! generated columns, no `->`), and triggers call no SQL function, so they work from any
//! client, the `sqlite3` shell included, and under `PRAGMA trusted_schema=OFF`.

use crate::schema::{PREFIX, TableInfo};

/// Quotes an identifier for SQL: `my "t"` becomes `"my ""t"""`.
pub fn quote(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 2);
    s.push('"');
    for ch in name.chars() {
        if ch == '"' {
            s.push('"');
        }
        s.push(ch);
    }
    s.push('"');
    s
}

/// The change log of a table: the keys of rows changed since the last capture.
pub fn log_table(table: &str) -> String {
    format!("{PREFIX}log__{table}")
}

/// The row versions of a table (tombstones included).
pub fn ver_table(table: &str) -> String {
    format!("{PREFIX}ver__{table}")
}

/// Names of the three capture triggers of a table.
pub fn trigger_names(table: &str) -> [String; 3] {
    [
        format!("{PREFIX}ins__{table}"),
        format!("{PREFIX}upd__{table}"),
        format!("{PREFIX}del__{table}"),
    ]
}

/// Marmot's fixed tables.
pub const CREATE_FIXED: &str = r#"
CREATE TABLE IF NOT EXISTS "__marmot__meta" (key TEXT PRIMARY KEY NOT NULL, value);
CREATE TABLE IF NOT EXISTS "__marmot__tables" (name TEXT PRIMARY KEY NOT NULL, key_signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS "__marmot__outbox" (
    incarnation INTEGER NOT NULL, seq INTEGER NOT NULL, chunk INTEGER NOT NULL,
    chunks INTEGER NOT NULL, payload BLOB NOT NULL,
    PRIMARY KEY (incarnation, seq, chunk));
CREATE TABLE IF NOT EXISTS "__marmot__inbox" (
    origin INTEGER NOT NULL, incarnation INTEGER NOT NULL, seq INTEGER NOT NULL,
    chunk INTEGER NOT NULL, chunks INTEGER NOT NULL, stream_seq INTEGER NOT NULL,
    fragment BLOB NOT NULL,
    PRIMARY KEY (origin, incarnation, seq, chunk));
CREATE TABLE IF NOT EXISTS "__marmot__parked" (
    id INTEGER PRIMARY KEY, stream_seq INTEGER NOT NULL, origin INTEGER, incarnation INTEGER,
    batch_seq INTEGER, reason TEXT NOT NULL, message BLOB NOT NULL, parked_at_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1, retry_requested INTEGER NOT NULL DEFAULT 0,
    collision INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS "__marmot__incarnations" (incarnation INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS "__marmot__conflicts" (
    id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, key TEXT NOT NULL,
    winner_stamp INTEGER NOT NULL, winner_node INTEGER NOT NULL,
    loser_stamp INTEGER NOT NULL, loser_node INTEGER NOT NULL,
    loser_row TEXT, recorded_at_ms INTEGER NOT NULL);
"#;

fn key_cols_decl(t: &TableInfo) -> String {
    t.key()
        .iter()
        .enumerate()
        .map(|(i, c)| format!("\"k{i}\" {} COLLATE {}", c.affinity.sql_type(), c.collation))
        .collect::<Vec<_>>()
        .join(", ")
}

fn k_list(t: &TableInfo, prefix: &str) -> String {
    (0..t.key_columns)
        .map(|i| format!("{prefix}\"k{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates the change log and version tables of a table.
pub fn create_table_state(t: &TableInfo) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {log} ({cols});\n\
         CREATE TABLE IF NOT EXISTS {ver} ({cols}, stamp INTEGER NOT NULL, node INTEGER NOT NULL, \
         deleted INTEGER NOT NULL, PRIMARY KEY ({keys})) WITHOUT ROWID;",
        log = quote(&log_table(&t.name)),
        ver = quote(&ver_table(&t.name)),
        cols = key_cols_decl(t),
        keys = k_list(t, ""),
    )
}

/// Copies the keys a table still has to publish (its change log, and its live versions) into
/// a temporary table, before marmot's state for it is rebuilt ([`unstash_pending`]).
pub fn stash_pending(t: &TableInfo) -> String {
    let k = k_list(t, "");
    format!(
        "DROP TABLE IF EXISTS temp.\"marmot_pending\";\n\
         CREATE TEMP TABLE \"marmot_pending\" AS SELECT {k} FROM {log} UNION ALL \
         SELECT {k} FROM {ver} WHERE deleted = 0;\n\
         DROP TABLE IF EXISTS temp.\"marmot_pending_ver\";\n\
         CREATE TEMP TABLE \"marmot_pending_ver\" AS SELECT {k}, stamp, node, deleted FROM {ver};",
        log = quote(&log_table(&t.name)),
        ver = quote(&ver_table(&t.name)),
    )
}

/// Logs the keys [`stash_pending`] kept into the new change log, and puts the versions
/// back (keys the new key compares as one keep their newest version).
pub fn unstash_pending(t: &TableInfo) -> String {
    let k = k_list(t, "");
    format!(
        "INSERT INTO {log} ({k}) SELECT {k} FROM temp.\"marmot_pending\";\n\
         DROP TABLE temp.\"marmot_pending\";\n\
         INSERT INTO {ver} ({k}, stamp, node, deleted) SELECT {k}, stamp, node, deleted \
         FROM temp.\"marmot_pending_ver\" WHERE true ORDER BY stamp, node \
         ON CONFLICT ({k}) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = excluded.deleted \
         WHERE excluded.stamp > stamp OR (excluded.stamp = stamp AND excluded.node > node);\n\
         DROP TABLE temp.\"marmot_pending_ver\";",
        log = quote(&log_table(&t.name)),
        ver = quote(&ver_table(&t.name)),
    )
}

/// Drops the change log and version tables of a table.
pub fn drop_table_state(table: &str) -> String {
    format!(
        "DROP TABLE IF EXISTS main.{};\nDROP TABLE IF EXISTS main.{};",
        quote(&log_table(table)),
        quote(&ver_table(table))
    )
}

/// The three capture triggers, as SQLite will store them. They record only which keys
/// changed; capture reads the rows themselves, so triggers never mention non-key columns
/// (an `ALTER TABLE .. DROP COLUMN` of any non-key column just works).
pub fn create_triggers(t: &TableInfo) -> [String; 3] {
    let [ins, upd, del] = trigger_names(&t.name);
    let table = quote(&t.name);
    let log = quote(&log_table(&t.name));
    let cols = k_list(t, "");
    let with = |alias: &str| {
        t.key()
            .iter()
            .map(|c| format!("{alias}.{}", quote(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Under the key's collation: `PRIMARY KEY (k COLLATE NOCASE)` leaves the column BINARY,
    // and 'y' -> 'Y' is then no key change at all.
    let key_changed = t
        .key()
        .iter()
        .map(|c| {
            format!(
                "OLD.{q} IS NOT NEW.{q} COLLATE {}",
                c.collation,
                q = quote(&c.name)
            )
        })
        .collect::<Vec<_>>()
        .join(" OR ");
    [
        format!(
            "CREATE TRIGGER {} AFTER INSERT ON {table} BEGIN INSERT INTO {log} ({cols}) VALUES ({}); END",
            quote(&ins),
            with("NEW")
        ),
        format!(
            "CREATE TRIGGER {} AFTER UPDATE ON {table} BEGIN \
             INSERT INTO {log} ({cols}) SELECT {} WHERE {key_changed}; \
             INSERT INTO {log} ({cols}) VALUES ({}); END",
            quote(&upd),
            with("OLD"),
            with("NEW")
        ),
        format!(
            "CREATE TRIGGER {} AFTER DELETE ON {table} BEGIN INSERT INTO {log} ({cols}) VALUES ({}); END",
            quote(&del),
            with("OLD")
        ),
    ]
}

/// Statements a table needs, built once per schema.
#[derive(Clone, Debug)]
pub struct TableSql {
    /// Does the change log hold anything?
    pub has_dirty: String,
    /// How many logged keys contain a NULL (such rows have no identity; not replicated).
    pub null_keys: String,
    /// Changed rows as they are now: all columns of the row (NULL when gone), then the
    /// logged key, then the stored version (stamp, node).
    pub capture_select: String,
    /// Gives every logged key the version (?1 stamp, ?2 node), tombstone when the row is gone.
    pub capture_stamp: String,
    /// Empties the change log.
    pub capture_clear: String,
    /// Every row that exists, as `capture_select` reads one, with its own version as the base
    /// (a repair: see `marmot_core::wire::TableDef::repair`). Rows the same capture writes go
    /// too, at the version they had: leaving them out (they go under the new stamp) lost a
    /// row on a node that skips the new stamp's rows of that table (V4 seed 891725).
    pub repair_select: String,
    /// Logs every key of the table (a new table, or one whose triggers were missing).
    pub log_all: String,
    /// Logs every key with a live version whose row is gone: deletes made while no trigger
    /// logged them (a table rebuild, marmot stopped), to be published as tombstones.
    pub log_gone: String,
}

/// `left`'s key columns equal `right`'s `k0, k1, ...`, each compared under the key's own
/// collation (never the column's: see [`crate::schema::Column::collation`]).
pub fn key_match(t: &TableInfo, left: &str, right: &str) -> String {
    t.key()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "{left}.{} = {right}.\"k{i}\" COLLATE {}",
                quote(&c.name),
                c.collation
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Two of marmot's key tables (`k0, k1, ...` on both sides) hold the same key.
pub fn ver_match(t: &TableInfo, left: &str, right: &str) -> String {
    t.key()
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{left}.\"k{i}\" = {right}.\"k{i}\" COLLATE {}", c.collation))
        .collect::<Vec<_>>()
        .join(" AND ")
}

impl TableSql {
    /// Builds the statements of `t`.
    pub fn new(t: &TableInfo) -> Self {
        let table = quote(&t.name);
        let log = quote(&log_table(&t.name));
        let ver = quote(&ver_table(&t.name));
        let not_null = (0..t.key_columns)
            .map(|i| format!("\"k{i}\" IS NOT NULL"))
            .collect::<Vec<_>>()
            .join(" AND ");
        let any_null = (0..t.key_columns)
            .map(|i| format!("\"k{i}\" IS NULL"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let distinct_keys = format!(
            "(SELECT DISTINCT {} FROM {log} WHERE {not_null})",
            k_list(t, "")
        );
        let row_cols = t
            .columns
            .iter()
            .map(|c| format!("t.{}", quote(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let first_key = quote(&t.key()[0].name);
        let ver_match = ver_match(t, "v", "l");
        TableSql {
            has_dirty: format!("SELECT 1 FROM {log} LIMIT 1"),
            null_keys: format!("SELECT count(*) FROM {log} WHERE {any_null}"),
            capture_select: format!(
                "SELECT {row_cols}, {lk}, v.stamp, v.node, t.{first_key} IS NOT NULL \
                 FROM {distinct_keys} AS l \
                 LEFT JOIN {table} AS t ON {tm} \
                 LEFT JOIN {ver} AS v ON {ver_match}",
                lk = k_list(t, "l."),
                tm = key_match(t, "t", "l"),
            ),
            capture_stamp: format!(
                "INSERT INTO {ver} ({k}, stamp, node, deleted) \
                 SELECT {lk}, ?1, ?2, t.{first_key} IS NULL FROM {distinct_keys} AS l \
                 LEFT JOIN {table} AS t ON {tm} WHERE true \
                 ON CONFLICT ({k}) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = excluded.deleted",
                k = k_list(t, ""),
                lk = k_list(t, "l."),
                tm = key_match(t, "t", "l"),
            ),
            capture_clear: format!("DELETE FROM {log}"),
            repair_select: format!(
                "SELECT {row_cols}, {vk}, v.stamp, v.node, 1 FROM {table} AS t \
                 JOIN {ver} AS v ON {tm} WHERE v.deleted = 0",
                vk = k_list(t, "v."),
                tm = key_match(t, "t", "v"),
            ),
            log_all: format!(
                "INSERT INTO {log} ({}) SELECT {} FROM {table}",
                k_list(t, ""),
                t.key()
                    .iter()
                    .map(|c| quote(&c.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            log_gone: format!(
                "INSERT INTO {log} ({k}) SELECT {vk} FROM {ver} AS v WHERE v.deleted = 0 \
                 AND NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {tm})",
                k = k_list(t, ""),
                vk = k_list(t, "v."),
                tm = key_match(t, "t", "v"),
            ),
        }
    }
}

/// Statements to apply rows of one incoming table definition (columns in the sender's
/// order; parameters bind in that order).
#[derive(Clone, Debug)]
pub struct ApplySql {
    /// Reads the version: params are the incoming key values.
    pub version_get: String,
    /// Writes the version: incoming key values, then stamp, node, deleted.
    pub version_set: String,
    /// Inserts or updates the row: incoming values. Never `INSERT OR REPLACE`.
    pub upsert: String,
    /// Deletes the row: incoming key values.
    pub delete: String,
    /// Keeps a value the row leaves out (its column is gone here) in
    /// `__marmot__kept_values`, for a change that brings the column back
    /// (`replicated::fill_kept`): incoming key values, then table, column, stamp, node, value.
    pub keep_value: String,
    /// Reads the row's incoming columns: incoming key values.
    pub read: String,
    /// Removes the row from the full-text indexes that index it, with its current values
    /// (before it changes or goes): incoming key values.
    pub unindex: Vec<String>,
    /// Adds the row, as written, to those indexes: incoming key values.
    pub index: Vec<String>,
    /// Columns of the local table the incoming definition does not carry (its node did not
    /// have them when it wrote the row). With schema replication they take their default
    /// (see [`ApplySql::new`]); without, they keep their values, across a clear-first apply
    /// too.
    pub extras: Vec<String>,
    /// With extras: sets a row aside (its key and extras) in `stash` before it is cleared:
    /// incoming key values.
    pub stash: Option<String>,
    /// With extras: puts the stashed extras back into the row just written, then forgets
    /// them: incoming key values (two statements).
    pub unstash: Option<[String; 2]>,
}

/// The temporary table a clear-first apply keeps a local table's extra columns in.
pub fn stash_table(local_index: usize) -> String {
    format!("temp.\"marmot_cleared_{local_index}\"")
}

impl ApplySql {
    /// `incoming` lists column names, its first `key_columns` being the key; `local_key`
    /// maps local key position -> index into `incoming`.
    ///
    /// `defaults`: with schema replication, the default (an SQL expression) of each local
    /// column the incoming row lacks. Row-level last writer wins: the winning write carried
    /// no value for such a column (its node did not have it yet), so every node gives it its
    /// default, whatever it held before: keeping each node's own value would let nodes
    /// diverge. A column missing from `defaults` (NOT NULL without a default) keeps its value.
    /// `None` (each node's schema its own): every such column keeps its value.
    pub fn new(
        t: &TableInfo,
        incoming: &[&str],
        key_columns: usize,
        local_key: &[usize],
        indexes: &[crate::fts::ExternalIndex],
        local_index: usize,
        defaults: Option<&[(String, String)]>,
    ) -> Self {
        let table = quote(&t.name);
        let ver = quote(&ver_table(&t.name));
        let extras: Vec<String> = t
            .columns
            .iter()
            .filter(|c| !incoming.contains(&c.name.as_str()))
            .map(|c| c.name.clone())
            .collect();
        let where_row = local_key
            .iter()
            .zip(t.key())
            .map(|(&i, c)| {
                format!(
                    "{} = ?{} COLLATE {}",
                    quote(incoming[i]),
                    i + 1,
                    c.collation
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let where_ver = local_key
            .iter()
            .enumerate()
            .map(|(j, &i)| format!("\"k{j}\" = ?{}", i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let ver_cols = (0..local_key.len())
            .map(|j| format!("\"k{j}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let ver_params = local_key
            .iter()
            .map(|&i| format!("?{}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let n = key_columns;
        let cols = incoming
            .iter()
            .map(|c| quote(c))
            .collect::<Vec<_>>()
            .join(", ");
        let params = (1..=incoming.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let key_names = t
            .key()
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        // Key columns are set too: under NOCASE or RTRIM a key can change its bytes while
        // staying the same key, and the replica must follow.
        let sets = incoming
            .iter()
            .map(|c| format!("{q} = excluded.{q}", q = quote(c)))
            .chain(
                defaults
                    .unwrap_or_default()
                    .iter()
                    .filter(|(c, _)| extras.contains(c))
                    .map(|(c, expr)| format!("{} = ({expr})", quote(c))),
            )
            .collect::<Vec<_>>()
            .join(", ");
        // With defaults, a cleared row is inserted again and takes them: nothing to keep.
        let keep = !extras.is_empty() && defaults.is_none();
        let upsert = format!(
            "INSERT INTO {table} ({cols}) VALUES ({params}) ON CONFLICT ({key_names}) DO UPDATE SET {sets}"
        );
        ApplySql {
            version_get: format!("SELECT stamp, node, deleted FROM {ver} WHERE {where_ver}"),
            version_set: format!(
                "INSERT INTO {ver} ({ver_cols}, stamp, node, deleted) VALUES ({ver_params}, ?{a}, ?{b}, ?{c}) \
                 ON CONFLICT ({ver_cols}) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = excluded.deleted",
                a = n + 1,
                b = n + 2,
                c = n + 3,
            ),
            upsert,
            delete: format!("DELETE FROM {table} WHERE {where_row}"),
            keep_value: format!(
                "INSERT INTO \"__marmot__kept_values\" (tbl, col, key, stamp, node, value, kept) \
                 SELECT ?{t}, ?{c}, {key}, ?{st}, ?{nd}, ?{v}, ?{st} FROM {table} WHERE {where_row} \
                 {upsert}",
                upsert = crate::replicated::KEPT_UPSERT,
                t = key_columns + 1,
                c = key_columns + 2,
                st = key_columns + 3,
                nd = key_columns + 4,
                v = key_columns + 5,
                key = crate::replicated::kept_key_expr(
                    &t.key().iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                    &table
                ),
            ),
            read: format!("SELECT {cols} FROM {table} WHERE {where_row}"),
            unindex: indexes.iter().map(|i| i.delete_sql(&where_row)).collect(),
            index: indexes.iter().map(|i| i.insert_sql(&where_row)).collect(),
            stash: keep.then(|| {
                format!(
                    "INSERT INTO {stash} ({keys}, {ex}) SELECT {keys}, {ex} FROM {table} WHERE {where_row}",
                    stash = stash_table(local_index),
                    keys = key_names,
                    ex = extras.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", "),
                )
            }),
            unstash: keep.then(|| {
                let stash = stash_table(local_index);
                let in_stash = local_key
                    .iter()
                    .zip(t.key())
                    .map(|(&i, c)| {
                        format!("s.{} = ?{} COLLATE {}", quote(&c.name), i + 1, c.collation)
                    })
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let ex = extras.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
                [
                    format!(
                        "UPDATE {table} SET ({ex}) = (SELECT {ex} FROM {stash} AS s WHERE {in_stash}) \
                         WHERE {where_row} AND EXISTS (SELECT 1 FROM {stash} AS s WHERE {in_stash})"
                    ),
                    format!("DELETE FROM {stash} AS s WHERE {in_stash}"),
                ]
            }),
            extras,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote("a"), "\"a\"");
        assert_eq!(quote("my \"t\""), "\"my \"\"t\"\"\"");
        assert_eq!(quote("sélect"), "\"sélect\"");
    }
}
