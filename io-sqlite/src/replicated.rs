//! Replicated schema (see `docs/schema-replication.md`): the application's schema as marmot
//! last captured or applied it (the baseline, `__marmot__schema`), the changes made since,
//! and bringing a local object to the state a change from another node describes.
//!
//! Objects compare by a normalised form of their `CREATE` statement ([`normalise`]): a
//! rebuild's `ALTER TABLE t_new RENAME TO t` stores `CREATE TABLE "t" (...)`, and another
//! quoting, spacing or letter case of the same statement is the same object.

use crate::ddl::quote;
use crate::schema::PREFIX;
use marmot_core::apply::{ApplyFault, ConflictRecord};
use marmot_core::capture::SchemaChange;
use marmot_core::wire::{ObjectKind, SchemaItem};
use marmot_core::{Stamp, Version};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::BTreeMap;

/// The baseline: one row per object marmot replicated (`sql` NULL: dropped), with the version
/// of its last change.
pub(crate) const CREATE_BASELINE: &str = r#"
CREATE TABLE IF NOT EXISTS "__marmot__schema" (
    type TEXT NOT NULL, name TEXT NOT NULL, tbl_name TEXT NOT NULL, sql TEXT, norm TEXT,
    stamp INTEGER NOT NULL DEFAULT 0, node INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (type, name));
CREATE TABLE IF NOT EXISTS "__marmot__column_fates" (
    tbl TEXT NOT NULL, col TEXT NOT NULL, renamed_to TEXT,
    stamp INTEGER NOT NULL DEFAULT 0, node INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tbl, col));
CREATE TABLE IF NOT EXISTS "__marmot__kept_values" (
    tbl TEXT NOT NULL, col TEXT NOT NULL, key TEXT NOT NULL, stamp INTEGER NOT NULL,
    node INTEGER NOT NULL, value, kept INTEGER NOT NULL, PRIMARY KEY (tbl, col, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS "__marmot__table_drops" (
    tbl TEXT NOT NULL PRIMARY KEY, stamp INTEGER NOT NULL, node INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS "__marmot__column_renames" (
    tbl TEXT NOT NULL, col TEXT NOT NULL, renamed_to TEXT NOT NULL,
    PRIMARY KEY (tbl, col, renamed_to)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS "__marmot__repairs" (tbl TEXT NOT NULL PRIMARY KEY);
CREATE TABLE IF NOT EXISTS "__marmot__repair_late" (
    tbl TEXT NOT NULL, node INTEGER NOT NULL, stamp INTEGER NOT NULL,
    PRIMARY KEY (tbl, node)) WITHOUT ROWID;
INSERT OR IGNORE INTO "__marmot__column_renames" (tbl, col, renamed_to)
    SELECT tbl, lower(col), lower(renamed_to) FROM "__marmot__column_fates"
    WHERE renamed_to IS NOT NULL;
"#;

/// A change of `table` (version `loser`) lost here to this node's table and removed data the
/// table keeps (the table, or columns: [`lost_data_we_keep`]). The node that made it may
/// have lost those values itself: its application's DDL removed them before marmot saw the
/// change, so it kept none, and when the winning lineage brings the columns back there its
/// rows take their defaults. This node sends its rows of the table as a repair (each at its
/// own version, applied only where a node holds exactly that write: see
/// `marmot_core::wire::TableDef::repair`), at the next capture; and rows that node wrote
/// before its change that arrive here later (they reached the stream late) make the table
/// go out as a repair again ([`repair_late_rows`]). Found by the simulation (V4 seeds
/// 841500, 841730, 845962, 850046: a column a node dropped itself came back through a
/// concurrent lineage with its default in that node's older rows).
pub(crate) fn request_repair(c: &Connection, table: &str, loser: Version) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT OR IGNORE INTO \"__marmot__repairs\" (tbl) VALUES (?1)")?
        .execute([table])?;
    c.prepare_cached(
        "INSERT INTO \"__marmot__repair_late\" (tbl, node, stamp) VALUES (?1, ?2, ?3) \
         ON CONFLICT (tbl, node) DO UPDATE SET stamp = max(stamp, excluded.stamp)",
    )?
    .execute(params![
        table,
        loser.node as i64,
        loser.stamp.as_u64() as i64
    ])?;
    Ok(())
}

/// Rows of `table` arrive in a batch of version `batch`: written by a node before a change
/// of its that lost here removed data this table keeps ([`request_repair`]), they may be
/// rows that node lost values of; the table goes out as a repair again. Returns whether it
/// was asked for.
pub(crate) fn repair_late_rows(
    c: &Connection,
    table: &str,
    batch: Version,
) -> rusqlite::Result<bool> {
    let late = c
        .prepare_cached(
            "SELECT 1 FROM \"__marmot__repair_late\" WHERE tbl = ?1 AND node = ?2 AND stamp > ?3",
        )?
        .query_row(
            params![table, batch.node as i64, batch.stamp.as_u64() as i64],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if late {
        c.prepare_cached("INSERT OR IGNORE INTO \"__marmot__repairs\" (tbl) VALUES (?1)")?
            .execute([table])?;
    }
    Ok(late)
}

/// Records that table `table` was dropped by the replicated change of version `v` (the newest
/// such drop is kept): rows written in a schema version of the table older than that are
/// skipped when they arrive, even once the table exists again.
fn record_drop(c: &Connection, table: &str, v: Version) -> rusqlite::Result<bool> {
    // A drop known already ended its life then: the table may have a new life since, whose
    // history must stay (a merge restore learns every drop its snapshot knows again).
    if last_drop(c, table)?.is_some_and(|known| known >= v) {
        return Ok(false);
    }
    // The column history of a table ends with it: a table created again under that name
    // starts a new one (its column names may be reused).
    c.prepare_cached("DELETE FROM \"__marmot__column_fates\" WHERE tbl = ?1")?
        .execute([table])?;
    c.prepare_cached("DELETE FROM \"__marmot__column_renames\" WHERE tbl = ?1")?
        .execute([table])?;
    c.prepare_cached("DELETE FROM \"__marmot__kept_values\" WHERE tbl = ?1")?
        .execute([table])?;
    c.prepare_cached(
        "INSERT INTO \"__marmot__table_drops\" (tbl, stamp, node) VALUES (?1, ?2, ?3) \
         ON CONFLICT (tbl) DO UPDATE SET stamp = excluded.stamp, node = excluded.node",
    )?
    .execute(params![table, v.stamp.as_u64() as i64, v.node as i64])?;
    Ok(true)
}

/// The version of the newest replicated drop of table `table` this node knows of.
pub(crate) fn last_drop(c: &Connection, table: &str) -> rusqlite::Result<Option<Version>> {
    c.prepare_cached("SELECT stamp, node FROM \"__marmot__table_drops\" WHERE tbl = ?1")?
        .query_row([table], |r| Ok(version_of(r.get(0)?, r.get(1)?)))
        .optional()
        .map(Option::flatten)
}

/// The version of the replicated change that created or last changed table `table` here
/// (`None`: it is as every node started).
pub(crate) fn table_schema_version(
    c: &Connection,
    table: &str,
) -> rusqlite::Result<Option<Version>> {
    baseline_row(c, ObjectKind::Table, table)
}

/// A schema object: (kind, name) -> (table, sql).
type Objects = BTreeMap<(ObjectKind, String), (String, String)>;

/// One token of an SQL statement, with where it is in the text.
#[derive(Debug)]
struct Token {
    /// Normalised: identifiers and keywords lower-cased and unquoted; literals as written.
    text: String,
    start: usize,
    end: usize,
}

fn tokens(sql: &str) -> Vec<Token> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i = (i + 2).min(b.len());
            continue;
        }
        let quoted = |i: &mut usize, close: u8| -> String {
            let mut s = Vec::new();
            *i += 1;
            while *i < b.len() {
                if b[*i] == close {
                    if close != b']' && b.get(*i + 1) == Some(&close) {
                        s.push(close);
                        *i += 2;
                        continue;
                    }
                    *i += 1;
                    break;
                }
                s.push(b[*i]);
                *i += 1;
            }
            String::from_utf8_lossy(&s).into_owned()
        };
        let text = match c {
            b'"' => quoted(&mut i, b'"').to_ascii_lowercase(),
            b'`' => quoted(&mut i, b'`').to_ascii_lowercase(),
            b'[' => quoted(&mut i, b']').to_ascii_lowercase(),
            b'\'' => format!("'{}'", quoted(&mut i, b'\'')),
            _ if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 => {
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'_'
                        || b[i] == b'$'
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                sql[start..i].to_ascii_lowercase()
            }
            _ => {
                i += 1;
                sql[start..i].to_string()
            }
        };
        out.push(Token {
            text,
            start,
            end: i,
        });
    }
    out
}

/// The identifiers and keywords of a statement, lower-cased and unquoted (string literals
/// and operators left out).
pub(crate) fn identifiers(sql: &str) -> Vec<String> {
    tokens(sql)
        .into_iter()
        .map(|t| t.text)
        .filter(|t| {
            !t.starts_with('\'')
                && t.chars()
                    .next()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || !c.is_ascii())
        })
        .collect()
}

/// The normalised form of a `CREATE` statement: its tokens, identifiers and keywords
/// lower-cased and unquoted, comments and spacing dropped.
pub fn normalise(sql: &str) -> String {
    tokens(sql)
        .into_iter()
        .map(|t| t.text)
        .collect::<Vec<_>>()
        .join("\u{1}")
}

/// Where the table name is in a `CREATE TABLE` statement (byte range), and the byte offset of
/// the parenthesis that closes its column list.
fn create_table_parts(sql: &str) -> Option<(std::ops::Range<usize>, usize)> {
    let t = tokens(sql);
    let mut i = 0;
    let word = |i: usize, w: &str| t.get(i).is_some_and(|x| x.text == w);
    if !word(i, "create") {
        return None;
    }
    i += 1;
    if word(i, "temp") || word(i, "temporary") {
        i += 1;
    }
    if !word(i, "table") {
        return None;
    }
    i += 1;
    if word(i, "if") && word(i + 1, "not") && word(i + 2, "exists") {
        i += 3;
    }
    let mut name = t.get(i)?.start..t.get(i)?.end;
    if word(i + 1, ".") {
        i += 2;
        name.end = t.get(i)?.end;
    }
    i += 1;
    if !word(i, "(") {
        return None;
    }
    let mut depth = 0;
    for tok in &t[i..] {
        match tok.text.as_str() {
            "(" => depth += 1,
            ")" => {
                depth -= 1;
                if depth == 0 {
                    return Some((name, tok.start));
                }
            }
            _ => {}
        }
    }
    None
}

/// The replicated schema objects now: [`present`] without the tables the `[tables]` lists
/// exclude, their indexes and triggers, and the views and triggers whose statement names an
/// excluded table (see [`crate::filter`]).
fn current(c: &Connection) -> rusqlite::Result<Objects> {
    let excluded = crate::filter::excluded_tables(c, "main")?;
    let mut all = present(c)?;
    if !excluded.is_empty() {
        // (A table's `tbl_name` is its own name.)
        all.retain(|(kind, _), (table, sql)| {
            let stays_local = excluded.contains(&table.to_ascii_lowercase())
                || (matches!(kind, ObjectKind::View | ObjectKind::Trigger)
                    && crate::filter::mentions_excluded(sql, &excluded).is_some());
            !stays_local
        });
    }
    Ok(all)
}

/// The application's schema objects now: tables (virtual ones too, not their shadow tables),
/// indexes, views, triggers, and `PRAGMA user_version` when it is not 0. marmot's own objects
/// and SQLite's are left out.
fn present(c: &Connection) -> rusqlite::Result<Objects> {
    let shadows: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'shadow'")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = Objects::new();
    let mut stmt = c.prepare(
        "SELECT type, name, tbl_name, sql FROM main.sqlite_master WHERE sql IS NOT NULL",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (Ok(kind), Ok(name), Ok(table), Ok(sql)) = (
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
        ) else {
            continue;
        };
        let Some(kind) = ObjectKind::parse(&kind) else {
            continue;
        };
        let ours = |n: &str| n.starts_with(PREFIX) || n.starts_with("sqlite_");
        if ours(&name) || ours(&table) || shadows.contains(&table) {
            continue;
        }
        out.insert((kind, name), (table, sql));
    }
    let uv: i64 = c.query_row("PRAGMA main.user_version", [], |r| r.get(0))?;
    if uv != 0 {
        out.insert(
            (ObjectKind::UserVersion, String::new()),
            (String::new(), uv.to_string()),
        );
    }
    Ok(out)
}

/// The replicated schema as it is now, normalised: (type, name, normalised statement), sorted.
/// Two nodes with the same list have the same schema.
pub fn schema_objects(c: &Connection) -> rusqlite::Result<Vec<(String, String, String)>> {
    Ok(current(c)?
        .into_iter()
        .map(|((kind, name), (_, sql))| {
            let norm = if kind == ObjectKind::UserVersion {
                sql
            } else {
                normalise(&sql)
            };
            (kind.as_str().to_string(), name, norm)
        })
        .collect())
}

/// The schema objects the `[tables]` lists keep on this node, with why: (type, name, reason).
pub fn local_objects(c: &Connection) -> rusqlite::Result<Vec<(String, String, String)>> {
    let replicated = current(c)?;
    let excluded = crate::filter::excluded_tables(c, "main")?;
    Ok(present(c)?
        .into_iter()
        .filter(|(k, _)| !replicated.contains_key(k))
        .map(|((kind, name), (table, sql))| {
            let why = if excluded.contains(&table.to_ascii_lowercase()) {
                format!("table {table} is excluded")
            } else {
                let named = crate::filter::mentions_excluded(&sql, &excluded).unwrap_or_default();
                format!("it names excluded table {named}: receivers would not have it")
            };
            (kind.as_str().to_string(), name, why)
        })
        .collect())
}

/// A short digest of [`schema_objects`]: equal on nodes with the same replicated schema.
pub fn schema_digest(c: &Connection) -> rusqlite::Result<String> {
    let mut h = blake3::Hasher::new();
    for (kind, name, norm) in schema_objects(c)? {
        for part in [kind, name, norm] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
    }
    Ok(h.finalize().to_hex()[..16].to_string())
}

/// Each replicated object's own short digest, by `"<type> <name>"`: what two nodes compare to
/// say which objects differ (the whole schema's is [`schema_digest`]).
pub fn schema_object_digests(c: &Connection) -> rusqlite::Result<BTreeMap<String, String>> {
    Ok(schema_objects(c)?
        .into_iter()
        .map(|(kind, name, norm)| {
            let d = blake3::hash(norm.as_bytes()).to_hex()[..12].to_string();
            (format!("{kind} {name}"), d)
        })
        .collect())
}

/// How `theirs` (the objects node `them` advertises) differs from `ours`, one line per object:
/// `table books differs`, `index books_isbn only on node 2`, `view titled only here`.
pub fn schema_difference(
    ours: &BTreeMap<String, String>,
    theirs: &BTreeMap<String, String>,
    them: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for (object, d) in ours {
        match theirs.get(object) {
            Some(t) if t == d => {}
            Some(_) => out.push(format!("{object} differs")),
            None => out.push(format!("{object} only here")),
        }
    }
    for object in theirs.keys() {
        if !ours.contains_key(object) {
            out.push(format!("{object} only on {them}"));
        }
    }
    out
}

/// A baseline row: (table, sql or None when dropped, version).
type Baseline = BTreeMap<(ObjectKind, String), (String, Option<String>, Option<Version>)>;

fn version_of(stamp: i64, node: i64) -> Option<Version> {
    (stamp != 0 || node != 0).then(|| Version {
        stamp: Stamp::from_u64(stamp as u64),
        node: node as u64,
    })
}

fn baseline(c: &Connection) -> rusqlite::Result<Baseline> {
    let mut stmt =
        c.prepare("SELECT type, name, tbl_name, sql, stamp, node FROM \"__marmot__schema\"")?;
    let mut rows = stmt.query([])?;
    let mut out = Baseline::new();
    while let Some(r) = rows.next()? {
        let Some(kind) = ObjectKind::parse(&r.get::<_, String>(0)?) else {
            continue;
        };
        out.insert(
            (kind, r.get(1)?),
            (r.get(2)?, r.get(3)?, version_of(r.get(4)?, r.get(5)?)),
        );
    }
    Ok(out)
}

fn put_baseline(
    c: &Connection,
    kind: ObjectKind,
    name: &str,
    table: &str,
    sql: Option<&str>,
    version: Option<Version>,
) -> rusqlite::Result<()> {
    let (stamp, node) = version.map_or((0, 0), |v| (v.stamp.as_u64() as i64, v.node as i64));
    c.prepare_cached(
        "INSERT INTO \"__marmot__schema\" (type, name, tbl_name, sql, norm, stamp, node) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (type, name) DO UPDATE SET \
         tbl_name = excluded.tbl_name, sql = excluded.sql, norm = excluded.norm, \
         stamp = excluded.stamp, node = excluded.node",
    )?
    .execute(params![
        kind.as_str(),
        name,
        table,
        sql,
        sql.map(normalise),
        stamp,
        node
    ])?;
    Ok(())
}

/// Records the schema as it is as the baseline, unpublished, the first time (a database marmot
/// starts on for the first time, or the first start of a marmot that replicates schema):
/// like the rows already in it, it is what every node starts from.
pub(crate) fn init_baseline(c: &Connection) -> rusqlite::Result<()> {
    c.execute_batch(CREATE_BASELINE)?;
    ensure_fate_versions(c, "main")?;
    let recorded: Option<i64> = c
        .query_row(
            "SELECT value FROM \"__marmot__meta\" WHERE key = 'schema_baseline'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if recorded.is_some() {
        return Ok(());
    }
    for ((kind, name), (table, sql)) in current(c)? {
        put_baseline(c, kind, &name, &table, Some(&sql), None)?;
    }
    c.execute(
        "INSERT INTO \"__marmot__meta\" (key, value) VALUES ('schema_baseline', 1) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [],
    )?;
    Ok(())
}

/// The rank of a change in the order a receiver applies them: drops of triggers, views and
/// indexes; drops of tables; tables created or changed; indexes, views, triggers created or
/// changed; `user_version`.
fn rank(kind: ObjectKind, dropped: bool) -> u8 {
    match (kind, dropped) {
        (ObjectKind::Trigger, true) => 0,
        (ObjectKind::View, true) => 1,
        (ObjectKind::Index, true) => 2,
        (ObjectKind::Table, true) => 3,
        (ObjectKind::Table, false) => 4,
        (ObjectKind::Index, false) => 5,
        (ObjectKind::View, false) => 6,
        (ObjectKind::Trigger, false) => 7,
        (ObjectKind::UserVersion, _) => 8,
    }
}

/// The schema changes since the baseline, in the order a receiver applies them. An object
/// whose statement changed only in form (see [`normalise`]) is not a change; its baseline
/// takes the new text.
pub(crate) fn changes(c: &Connection) -> rusqlite::Result<Vec<SchemaChange>> {
    let now = current(c)?;
    let base = baseline(c)?;
    // Objects the `[tables]` lists now exclude are still here: they leave the baseline
    // without a word (a drop would remove them on every other node).
    let mut filtered = None;
    for ((kind, name), (_, old, _)) in &base {
        if old.is_some() && !now.contains_key(&(*kind, name.clone())) {
            let all = match &filtered {
                Some(all) => all,
                None => filtered.insert(present(c)?),
            };
            if all.contains_key(&(*kind, name.clone())) {
                c.execute(
                    "DELETE FROM \"__marmot__schema\" WHERE type = ?1 AND name = ?2",
                    params![kind.as_str(), name],
                )?;
            }
        }
    }
    let base = if filtered.is_some() {
        baseline(c)?
    } else {
        base
    };
    let mut out = Vec::new();
    for ((kind, name), (table, sql)) in &now {
        match base.get(&(*kind, name.clone())) {
            Some((_, Some(old), version)) if old == sql || normalise(old) == normalise(sql) => {
                if old != sql {
                    put_baseline(c, *kind, name, table, Some(sql), *version)?;
                }
            }
            Some((_, old, version)) => out.push(SchemaChange {
                kind: *kind,
                name: name.clone(),
                table: table.clone(),
                old_sql: old.clone(),
                new_sql: Some(sql.clone()),
                base: *version,
            }),
            None => out.push(SchemaChange {
                kind: *kind,
                name: name.clone(),
                table: table.clone(),
                old_sql: None,
                new_sql: Some(sql.clone()),
                base: None,
            }),
        }
    }
    for ((kind, name), (table, old, version)) in &base {
        if old.is_some() && !now.contains_key(&(*kind, name.clone())) {
            out.push(SchemaChange {
                kind: *kind,
                name: name.clone(),
                table: table.clone(),
                old_sql: old.clone(),
                new_sql: None,
                base: *version,
            });
        }
    }
    out.sort_by_key(|c| rank(c.kind, c.new_sql.is_none()));
    Ok(out)
}

/// How the column history's chain of renames from a name ends ([`renames_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChainEnd {
    /// The last name has no fate here (it may be a column of the table, or one a change not
    /// applied here yet adds).
    Open,
    /// The last name was dropped.
    Dropped,
    /// The renames lead back to a name met before (a losing change's rename and the winning
    /// shape's pairing back, both at the losing change's version), or on for more than 64
    /// steps: the column lives under none of those names.
    Loops,
}

/// The names the column history renames `column` of `table` to, one after another (not
/// `column` itself), and how the chain ends. The one walk of the history every place that
/// follows renames uses (the apply of rows in an older shape, a transform's pairing, a merge
/// restore's columns, a losing change's check); each takes from the path the first name it
/// can use.
pub(crate) fn renames_from(
    c: &Connection,
    table: &str,
    column: &str,
) -> rusqlite::Result<(Vec<String>, ChainEnd)> {
    let mut path: Vec<String> = Vec::new();
    let mut seen = vec![column.to_ascii_lowercase()];
    let mut name = column.to_string();
    loop {
        match column_fate(c, table, &name)? {
            None => return Ok((path, ChainEnd::Open)),
            Some(None) => return Ok((path, ChainEnd::Dropped)),
            Some(Some(to)) => {
                let key = to.to_ascii_lowercase();
                if seen.contains(&key) || seen.len() > 64 {
                    return Ok((path, ChainEnd::Loops));
                }
                seen.push(key);
                path.push(to.clone());
                name = to;
            }
        }
    }
}

/// The column of the table (of `present`) that the renames this node ever learned
/// (`__marmot__column_renames`, kept whatever fact won about a name) lead to from `from`, not
/// through another column of the table (a name a column bears now is its own, not a step);
/// when none lies ahead, the column they lead back to: the name `from` was renamed from,
/// which the winning shape kept. `None`: they lead to none either way.
pub(crate) fn renamed_into(
    c: &Connection,
    table: &str,
    from: &str,
    present: &[String],
) -> rusqlite::Result<Option<String>> {
    let edges: Vec<(String, String)> = c
        .prepare_cached(
            "SELECT lower(col), lower(renamed_to) FROM \"__marmot__column_renames\" WHERE tbl = ?1",
        )?
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut seen = vec![from.to_ascii_lowercase()];
    let mut at = 0;
    while at < seen.len() {
        for (f, t) in &edges {
            if *f != seen[at] || seen.contains(t) {
                continue;
            }
            if let Some(p) = present.iter().find(|p| p.eq_ignore_ascii_case(t)) {
                return Ok(Some(p.clone()));
            }
            seen.push(t.clone());
        }
        at += 1;
    }
    // None ahead: a rename that lost while the name it renamed survives in the winning
    // shape. The value goes back to that name, the column it was written to under another
    // name (found by the simulation, V4 seed 901353: nodes that had seen the losing rename
    // and the winning shape in another order kept the value aside or put it there).
    let mut back = vec![from.to_ascii_lowercase()];
    let mut at = 0;
    while at < back.len() {
        for (f, t) in &edges {
            if *t != back[at] || back.contains(f) {
                continue;
            }
            if let Some(p) = present.iter().find(|p| p.eq_ignore_ascii_case(f)) {
                return Ok(Some(p.clone()));
            }
            back.push(f.clone());
        }
        at += 1;
    }
    Ok(None)
}

/// What became of a column the table no longer has: `Some(Some(new))` renamed,
/// `Some(None)` dropped, `None` unknown. Rows written before the change still name it.
pub(crate) fn column_fate(
    c: &Connection,
    table: &str,
    column: &str,
) -> rusqlite::Result<Option<Option<String>>> {
    c.prepare_cached(
        "SELECT renamed_to FROM \"__marmot__column_fates\" WHERE tbl = ?1 AND col = ?2",
    )?
    .query_row([table, column], |r| r.get(0))
    .optional()
}

/// Adds the version columns of `__marmot__column_fates` where a database (or a snapshot,
/// `schema` "snap") of an earlier build lacks them: its facts count as the oldest.
fn ensure_fate_versions(c: &Connection, schema: &str) -> rusqlite::Result<()> {
    let has: i64 = c.query_row(
        &format!(
            "SELECT count(*) FROM pragma_table_info('__marmot__column_fates', '{schema}') WHERE name = 'stamp'"
        ),
        [],
        |r| r.get(0),
    )?;
    if has == 0 {
        c.execute_batch(&format!(
            "ALTER TABLE {schema}.\"__marmot__column_fates\" ADD COLUMN stamp INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE {schema}.\"__marmot__column_fates\" ADD COLUMN node INTEGER NOT NULL DEFAULT 0;"
        ))?;
    }
    Ok(())
}

/// Records what became of column `col` of `table` (renamed to `to`, or dropped) by the change
/// of version `v`, unless a newer change's fact is known: one name can have several facts
/// (a change that lost dropped it, the winning one renamed it; a column dropped and its name
/// used again), and the newest is the one every node keeps, whatever order they arrive in.
/// Found by the simulation (V4, seed 251: a losing drop's fact, kept first, turned the
/// winning lineage's later rename into a drop on the nodes that had it). Returns whether it
/// was recorded.
fn put_fate(
    c: &Connection,
    table: &str,
    col: &str,
    to: Option<&str>,
    v: Version,
) -> rusqlite::Result<bool> {
    let known: Option<(Option<String>, i64, i64)> = c
        .prepare_cached(
            "SELECT renamed_to, stamp, node FROM \"__marmot__column_fates\" WHERE tbl = ?1 AND col = ?2",
        )?
        .query_row([table, col], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let (stamp, node) = (v.stamp.as_u64() as i64, v.node as i64);
    // Every rename is remembered, whatever fact wins: a column's values kept under one of
    // its names fill it under another ([`fill_kept`]).
    if let Some(to) = to {
        c.prepare_cached(
            "INSERT OR IGNORE INTO \"__marmot__column_renames\" (tbl, col, renamed_to) \
             VALUES (?1, lower(?2), lower(?3))",
        )?
        .execute([table, col, to])?;
    }
    let differs = known
        .as_ref()
        .is_some_and(|(known_to, _, _)| known_to.as_deref() != to);
    if let Some((_, ks, kn)) = &known
        && (*ks, *kn) >= (stamp, node)
    {
        return Ok(false);
    }
    c.prepare_cached(
        "INSERT INTO \"__marmot__column_fates\" (tbl, col, renamed_to, stamp, node) \
         VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (tbl, col) DO UPDATE SET renamed_to = excluded.renamed_to, \
         stamp = excluded.stamp, node = excluded.node",
    )?
    .execute(params![table, col, to, stamp, node])?;
    Ok(known.is_none() || differs)
}

/// The key columns of `table`, in key order (marmot's version tables name them `k0`, `k1`...).
fn key_columns(c: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut keys: Vec<(i64, String)> = described(c, table)?
        .into_iter()
        .filter(|d| d.shape.3 > 0)
        .map(|d| (d.shape.3, d.name))
        .collect();
    keys.sort();
    Ok(keys.into_iter().map(|(_, n)| n).collect())
}

/// A row's key as text, from the key columns of `alias` (SQLite's `quote()` of each, comma
/// separated): how `__marmot__kept_values` names a row.
pub(crate) fn kept_key_expr(keys: &[String], alias: &str) -> String {
    keys.iter()
        .map(|k| format!("quote({alias}.{})", quote(k)))
        .collect::<Vec<_>>()
        .join(" || ',' || ")
}

/// The version table's key (`v.k0`, `v.k1`...) equal to the key columns of `alias`, compared
/// under the version table's collations (the key's).
fn ver_key_match(keys: &[String], alias: &str) -> String {
    keys.iter()
        .enumerate()
        .map(|(i, k)| format!("v.\"k{i}\" = {alias}.{}", quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// How a value joins `__marmot__kept_values`: the newest row write's value of a key is kept,
/// with the latest removing change (every statement that keeps values ends with this).
pub(crate) const KEPT_UPSERT: &str = "ON CONFLICT (tbl, col, key) DO UPDATE SET \
    stamp = excluded.stamp, node = excluded.node, value = excluded.value, \
    kept = max(kept, excluded.kept) WHERE (excluded.stamp, excluded.node) >= (stamp, node)";

/// Keeps the values of `columns` of `table`, each with the version of its row, before a
/// replicated change removes the columns here. Concurrent changes of one table can drop a
/// column on some nodes and keep it (or rename it) in the lineage that wins later; a node that
/// met the drop first would otherwise give the column its default when it comes back, while
/// the nodes that met the rows later keep their values (the simulation's V4 workload, seeds
/// 635, 1174, 1481). Kept until the removing change (`removed_by`) is older than the tombstone
/// horizon (a change concurrent with it is stamped near it, and none is published later than
/// that, as the README asks), or until the table is dropped.
fn keep_values(
    c: &Connection,
    table: &str,
    columns: &[String],
    removed_by: Version,
) -> rusqlite::Result<()> {
    if columns.is_empty() {
        return Ok(());
    }
    let keys = key_columns(c, table)?;
    if keys.is_empty() {
        return Ok(());
    }
    let ver = quote(&crate::ddl::ver_table(table));
    let matches = ver_key_match(&keys, "t");
    for col in columns {
        c.execute(
            &format!(
                "INSERT INTO \"__marmot__kept_values\" (tbl, col, key, stamp, node, value, kept) \
                 SELECT ?1, ?2, {key}, v.stamp, v.node, t.{col}, ?3 FROM {t} AS t JOIN {ver} AS v ON {matches} \
                 WHERE v.deleted = 0 {KEPT_UPSERT}",
                key = kept_key_expr(&keys, "t"),
                col = quote(col),
                t = quote(table),
            ),
            params![table, col, removed_by.stamp.as_u64() as i64],
        )?;
    }
    Ok(())
}

/// Fills column `column` of `table`, which a replicated change just gave its default, from the
/// values kept for it ([`keep_values`], and the values left out of rows that arrived while the
/// column was gone here): a kept value under a name renames connect to `column`, written by
/// the row's current version. A column's value is so the one its row's winning write carried,
/// whatever order this node met the changes in. `only` (an SQL condition on the table, named
/// by its quoted name) limits the rows filled. Returns the rows filled.
///
/// A kept name that another column of the table bears now holds that column's values, not
/// this one's, and is never followed; values kept under the column's own name are applied
/// last, so they win over a renamed name's for the same row.
pub(crate) fn fill_kept(
    c: &Connection,
    table: &str,
    column: &str,
    only: Option<&str>,
) -> rusqlite::Result<u64> {
    let mut names: Vec<String> = c
        .prepare_cached("SELECT DISTINCT col FROM \"__marmot__kept_values\" WHERE tbl = ?1")?
        .query_map([table], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let keys = key_columns(c, table)?;
    if names.is_empty() || keys.is_empty() {
        return Ok(0);
    }
    let others: Vec<String> = described(c, table)?
        .into_iter()
        .map(|d| d.name.to_ascii_lowercase())
        .filter(|n| !n.eq_ignore_ascii_case(column))
        .collect();
    names.retain(|n| !others.contains(&n.to_ascii_lowercase()));
    names.sort_by_key(|n| n.eq_ignore_ascii_case(column));
    let t = quote(table);
    let ver = quote(&crate::ddl::ver_table(table));
    let matches = ver_key_match(&keys, &t);
    let mut filled = 0;
    // Every rename learned, including those whose fact a later change replaced (a column
    // renamed in one lineage and dropped in another keeps its rename here); not from a name
    // another column bears now (a rename of an earlier column of that name).
    let edges: Vec<(String, String)> = c
        .prepare_cached(
            "SELECT lower(col), lower(renamed_to) FROM \"__marmot__column_renames\" WHERE tbl = ?1",
        )?
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(String, String)>>>()?
        .into_iter()
        .filter(|(f, _)| !others.contains(f))
        .collect();
    // Whether renames lead from one name to the other.
    let reaches = |from: &str, to: &str| -> bool {
        let to = to.to_ascii_lowercase();
        let mut seen = vec![from.to_ascii_lowercase()];
        let mut at = 0;
        while at < seen.len() {
            if seen[at] == to {
                return true;
            }
            for (f, t) in &edges {
                if *f == seen[at] && !seen.contains(t) {
                    seen.push(t.clone());
                }
            }
            at += 1;
        }
        false
    };
    let only = only.map(|o| format!(" AND {o}")).unwrap_or_default();
    for name in names {
        // The kept name became this column, or this column was renamed to the kept name
        // (by a change that lost since, here or in another lineage) before its values were
        // removed.
        if !reaches(&name, column) && !reaches(column, &name) {
            continue;
        }
        filled += c.execute(
            &format!(
                "UPDATE {t} SET {col} = k.value FROM \"__marmot__kept_values\" AS k, {ver} AS v \
                 WHERE k.tbl = ?1 AND k.col = ?2 AND k.key = {key} AND {matches} \
                 AND k.stamp = v.stamp AND k.node = v.node AND v.deleted = 0{only}",
                col = quote(column),
                key = kept_key_expr(&keys, &t),
            ),
            params![table, name],
        )? as u64;
    }
    Ok(filled)
}

/// Which old column of `table` fills which new one, when this node changes the table to a
/// shape that may be several changes away from its own (a restore, or a change from the
/// stream made to another local shape): a column whose history (`__marmot__column_fates`)
/// leads, through its renames, to a column of the new shape fills that column; one the
/// history says was dropped fills none; for the rest, [`copy_pairs`] guesses from names and
/// shapes. The guess alone pairs by position, and paired a column renamed twice with another
/// column when other columns came and went in between (found by seed 740351).
fn pairs_through_history(
    c: &Connection,
    table: &str,
    old: &[Described],
    new: &[Described],
) -> rusqlite::Result<Vec<(String, String)>> {
    let in_new = |n: &str| {
        new.iter()
            .find(|d| d.name.eq_ignore_ascii_case(n))
            .map(|d| d.name.clone())
    };
    // Old column -> Some(new column) or None (dropped), as far as the history knows.
    let mut known: Vec<(String, Option<String>)> = Vec::new();
    for o in old {
        if in_new(&o.name).is_some() {
            continue;
        }
        let (path, end) = renames_from(c, table, &o.name)?;
        let mut fate = match end {
            ChainEnd::Dropped => Some(None),
            // A loop or an open end: the history does not say, guess instead.
            ChainEnd::Open | ChainEnd::Loops => None,
        };
        for to in &path {
            // A target that is another column of the old shape is an earlier life of that
            // name: the history is stale here, guess instead.
            if old.iter().any(|d| d.name.eq_ignore_ascii_case(to)) {
                fate = None;
                break;
            }
            if let Some(target) = in_new(to) {
                fate = Some(Some(target));
                break;
            }
        }
        if let Some(fate) = fate {
            known.push((o.name.clone(), fate));
        }
    }
    let taken = |n: &str| known.iter().any(|(_, t)| t.as_deref() == Some(n));
    let rest_old: Vec<Described> = old
        .iter()
        .filter(|o| !known.iter().any(|(k, _)| *k == o.name))
        .cloned()
        .collect();
    let rest_new: Vec<Described> = new.iter().filter(|d| !taken(&d.name)).cloned().collect();
    let mut pairs = copy_pairs(&rest_old, &rest_new);
    pairs.extend(known.into_iter().filter_map(|(o, t)| t.map(|t| (o, t))));
    Ok(pairs)
}

/// Records which columns of `table` were renamed or dropped between `before` and `after`:
/// by [`copy_pairs`] for this node's own change (one capture's difference), through the
/// history for a change applied here (`through_history`).
fn record_fates(
    c: &Connection,
    table: &str,
    before: &[Described],
    after: &[Described],
    through_history: bool,
    revived: &[String],
    v: Version,
) -> rusqlite::Result<bool> {
    let mut renamed = false;
    let pairs = if through_history {
        pairs_through_history(c, table, before, after)?
    } else {
        copy_pairs(before, after)
    };
    for b in before {
        match pairs.iter().find(|(o, _)| *o == b.name) {
            Some((_, n)) if *n == b.name => {}
            Some((_, n)) => {
                put_fate(c, table, &b.name, Some(n), v)?;
                renamed = true;
            }
            None => {
                put_fate(c, table, &b.name, None, v)?;
            }
        }
    }
    // A column the table has now has no fate: one recorded for an earlier column of that
    // name (dropped or renamed, then the name used again) is stale.
    let mut clear =
        c.prepare_cached("DELETE FROM \"__marmot__column_fates\" WHERE tbl = ?1 AND col = ?2")?;
    let mut clear_renames = c.prepare_cached(
        "DELETE FROM \"__marmot__column_renames\" WHERE tbl = ?1 AND lower(col) = lower(?2)",
    )?;
    // A column new here (no old column became it, and not one that came back: `revived`)
    // starts empty: values kept under its name were an earlier column's.
    let mut clear_kept = c.prepare_cached(
        "DELETE FROM \"__marmot__kept_values\" WHERE tbl = ?1 AND col = ?2 COLLATE NOCASE",
    )?;
    for a in after {
        clear.execute(params![table, a.name])?;
        let was_here = before.iter().any(|b| b.name.eq_ignore_ascii_case(&a.name))
            || revived.iter().any(|r| r.eq_ignore_ascii_case(&a.name));
        // A name that now bears another column (added, or one renamed to it): its renames
        // were the earlier column's. A column that stayed keeps them (a losing lineage's
        // rename of it still leads to values kept under the new name). So does a name whose
        // renames all lead to columns the table no longer has: that column is coming back
        // under its first name, and the renames lead it to the values kept under the others
        // (found by the simulation, V4 seed 917085: a node that renamed a column, then applied
        // another node's drop of it, merge-restored a snapshot that kept it, and its rows
        // written under the new name kept their values aside).
        let mut coming_back = false;
        if !was_here {
            let targets: Vec<String> = c
                .prepare_cached(
                    "SELECT renamed_to FROM \"__marmot__column_renames\" WHERE tbl = ?1 AND lower(col) = lower(?2)",
                )?
                .query_map(params![table, a.name], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            coming_back = !targets.is_empty()
                && targets
                    .iter()
                    .all(|t| !after.iter().any(|x| x.name.eq_ignore_ascii_case(t)));
            if !coming_back {
                clear_renames.execute(params![table, a.name])?;
            }
        }
        let new_here = !was_here
            && !coming_back
            && !pairs.iter().any(|(_, n)| n.eq_ignore_ascii_case(&a.name));
        if new_here {
            clear_kept.execute(params![table, a.name])?;
        }
    }
    Ok(renamed)
}

/// What the sender's change did to its table's columns (renamed, dropped), whatever becomes of
/// the change here: rows written in the sender's earlier shapes then find their columns even
/// where this node never had that shape (one node's changes can reach the stream out of
/// order: a column added, then renamed or dropped, may arrive as the rename or drop first,
/// and the addition, superseded, is never applied here). A newer change's fact about a column is kept ([`put_fate`]).
fn record_sender_fates(
    c: &Connection,
    item: &SchemaItem<'_>,
    v: Version,
) -> rusqlite::Result<bool> {
    if item.kind != ObjectKind::Table {
        return Ok(false);
    }
    let (Some(old), Some(new)) = (item.old_sql, item.new_sql) else {
        return Ok(false);
    };
    if normalise(old) == normalise(new) {
        return Ok(false);
    }
    let (Some(before), Some(after)) = (declared(old), declared(new)) else {
        return Ok(false);
    };
    let mut learned = false;
    let pairs = copy_pairs(&before, &after);
    for b in &before {
        match pairs.iter().find(|(o, _)| *o == b.name) {
            Some((_, n)) if *n == b.name => {}
            Some((_, n)) => learned |= put_fate(c, item.name, &b.name, Some(n), v)?,
            None => learned |= put_fate(c, item.name, &b.name, None, v)?,
        }
    }
    Ok(learned)
}

/// The ordinary columns `sql` declares (a `CREATE TABLE`), read from a scratch database.
fn declared(sql: &str) -> Option<Vec<Described>> {
    let scratch = Connection::open_in_memory().ok()?;
    scratch.execute(sql, []).ok()?;
    let name: String = scratch
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .ok()?;
    described(&scratch, &name).ok()
}

/// Records captured changes in the baseline at their batch's version.
pub(crate) fn commit(
    c: &Connection,
    changes: &[SchemaChange],
    version: Version,
) -> rusqlite::Result<()> {
    for ch in changes {
        if let (ObjectKind::Table, Some(old), Some(_)) = (ch.kind, &ch.old_sql, &ch.new_sql)
            && let Some(before) = declared(old)
        {
            record_fates(
                c,
                &ch.name,
                &before,
                &described(c, &ch.name)?,
                false,
                &[],
                version,
            )?;
        }
        if ch.kind == ObjectKind::Table && ch.new_sql.is_none() {
            record_drop(c, &ch.name, version)?;
        }
        put_baseline(
            c,
            ch.kind,
            &ch.name,
            &ch.table,
            ch.new_sql.as_deref(),
            Some(version),
        )?;
    }
    Ok(())
}

/// What applying one schema change did.
pub(crate) struct Applied {
    /// The local schema changed (the table registry must follow).
    pub changed: bool,
    /// The change lost to a newer local one with other content.
    pub conflict: Option<ConflictRecord>,
    /// A table whose rows this node sends as a repair ([`request_repair`]): a change that
    /// lost here may have dropped the table or columns on the node that made it, which
    /// loses their values there.
    pub repair: Option<String>,
}

/// Refuses a schema item that is not what marmot itself would send: a name reserved for
/// marmot or SQLite, or a statement that is not one `CREATE` of the item's kind and name
/// (`CREATE TABLE ... AS` included: SQLite never stores one). Statements run one at a time
/// (`Connection::execute` refuses a second), so nothing else can ride along.
fn validate(item: &SchemaItem<'_>) -> Result<(), String> {
    let reserved = |n: &str| n.starts_with(PREFIX) || n.to_ascii_lowercase().starts_with("sqlite_");
    if reserved(item.name) || reserved(item.table) {
        return Err(format!(
            "schema change of {} {} refused: the name is reserved for marmot or SQLite",
            item.kind.as_str(),
            quote(item.name)
        ));
    }
    let check = |sql: &str| -> Result<(), String> {
        let bad = |why: &str| {
            Err(format!(
                "schema change of {} {} refused: {why}",
                item.kind.as_str(),
                quote(item.name)
            ))
        };
        if item.kind == ObjectKind::UserVersion {
            return match sql.parse::<i32>() {
                Ok(_) => Ok(()),
                Err(_) => bad("user_version is not a number"),
            };
        }
        let t = tokens(sql);
        let w = |i: usize| t.get(i).map(|x| x.text.as_str());
        if w(0) != Some("create") {
            return bad("not a CREATE statement");
        }
        let mut i = 1;
        let mut virtual_table = false;
        match (item.kind, w(i)) {
            (ObjectKind::Index, Some("unique")) => i += 1,
            (ObjectKind::Table, Some("virtual")) => {
                virtual_table = true;
                i += 1;
            }
            _ => {}
        }
        let kw = item.kind.as_str();
        if w(i) != Some(kw) {
            return bad(&format!("not a CREATE {}", kw.to_uppercase()));
        }
        i += 1;
        if w(i) == Some("if") && w(i + 1) == Some("not") && w(i + 2) == Some("exists") {
            i += 3;
        }
        if w(i + 1) == Some(".") {
            if w(i) != Some("main") {
                return bad("an object of another schema");
            }
            i += 2;
        }
        if w(i).is_none_or(|n| n != item.name.to_ascii_lowercase()) {
            return bad("the statement names another object");
        }
        i += 1;
        if item.kind == ObjectKind::Table && !virtual_table && w(i) != Some("(") {
            return bad("not a column list");
        }
        Ok(())
    };
    if let Some(s) = item.new_sql {
        check(s)?;
    }
    if let Some(s) = item.old_sql {
        check(s)?;
    }
    Ok(())
}

fn fault(what: &SchemaItem<'_>, e: rusqlite::Error) -> ApplyFault<rusqlite::Error> {
    if crate::txn::is_transient(&e) {
        ApplyFault::Storage(e)
    } else {
        ApplyFault::Poison(format!(
            "schema change of {} {} cannot be applied here: {e}",
            what.kind.as_str(),
            quote(what.name)
        ))
    }
}

/// The local object's statement (None: no such object).
fn local_sql(c: &Connection, kind: ObjectKind, name: &str) -> rusqlite::Result<Option<String>> {
    if kind == ObjectKind::UserVersion {
        let uv: i64 = c.query_row("PRAGMA main.user_version", [], |r| r.get(0))?;
        return Ok((uv != 0).then(|| uv.to_string()));
    }
    c.query_row(
        "SELECT sql FROM main.sqlite_master WHERE type = ?1 AND name = ?2",
        params![kind.as_str(), name],
        |r| r.get(0),
    )
    .optional()
    .map(Option::flatten)
}

/// Brings the local object to the state `item` describes when `version` is newer than the
/// object's; records a losing change with other content as a conflict.
pub(crate) fn apply(
    c: &Connection,
    item: &SchemaItem<'_>,
    version: Version,
) -> Result<Applied, ApplyFault<rusqlite::Error>> {
    validate(item).map_err(ApplyFault::Poison)?;
    let f = |e| fault(item, e);
    if let Some(why) = excluded_here(c, item).map_err(f)? {
        tracing::debug!(object = item.name, kind = item.kind.as_str(), %why, "schema change skipped: the [tables] lists exclude it here");
        return Ok(Applied {
            changed: false,
            conflict: None,
            repair: None,
        });
    }
    // Newly learned column history counts as a schema change (parked rows in an older shape
    // are retried), even when the change itself is not applied here.
    let mut learned = record_sender_fates(c, item, version).map_err(f)?;
    let base = baseline_row(c, item.kind, item.name).map_err(f)?;
    #[cfg(feature = "sim-canary")]
    let base = if marmot_core::merge::canary::schema_on() {
        None
    } else {
        base
    };
    let local = local_sql(c, item.kind, item.name).map_err(f)?;
    let same = match (&local, item.new_sql) {
        (None, None) => true,
        (Some(l), Some(n)) => normalise(l) == normalise(n),
        _ => false,
    };
    if let Some(v) = base
        && v >= version
    {
        // A drop that lost here still ended its table's life for the rows written in it (on
        // the nodes where it won they are gone, and rows of that life still in flight are
        // skipped there): skip them here too, in whatever order the changes arrive. This
        // node's newer change publishes the rows it holds again.
        if item.kind == ObjectKind::Table && item.new_sql.is_none() {
            record_drop(c, item.name, version).map_err(f)?;
        }
        // One node's own changes are ordered by its clock: an older one of the node that
        // made the local version was superseded by that node itself (its batches reached the
        // stream out of order), and is no conflict.
        if v.node == version.node {
            // Rows its node wrote in that older shape may still arrive: a column it added
            // there and its later shape lacks is left out of them, as for a losing change's
            // (found by the simulation, V4 seed 1540: a node added a column, lost it to
            // another node's change before publishing, and changed the table again; nodes
            // that met the addition last parked its rows forever on an unknown column).
            if !same && item.kind == ObjectKind::Table && local.is_some() {
                learned |= leave_out_losing_columns(c, item, version).map_err(f)?;
            }
            return Ok(Applied {
                changed: learned,
                repair: None,
                conflict: None,
            });
        }
        let mut repair = None;
        if !same && item.kind == ObjectKind::Table && local.is_some() {
            // Rows written on the losing node in its shape still arrive: the columns it had
            // and this table has not are left out of them. And where the losing change
            // removed data this table keeps (the table, or columns), the winner's rows go out
            // again, as a repair, for the node that made it.
            // What became of the losing shape's columns is news: rows in that shape that
            // parked before it arrived (its node restarted and published them first) retry.
            learned |= leave_out_losing_columns(c, item, version).map_err(f)?;
            if lost_data_we_keep(c, item).map_err(f)? {
                request_repair(c, item.name, version).map_err(f)?;
                repair = Some(item.name.to_string());
            }
        }
        return Ok(Applied {
            changed: learned,
            repair,
            conflict: (!same).then(|| ConflictRecord {
                table: item.name.to_string(),
                key: format!("(schema {})", item.kind.as_str()),
                winner: v,
                loser: version,
                loser_row: item.new_sql.map(str::to_string),
            }),
        });
    }
    let table = if item.table.is_empty() {
        item.name
    } else {
        item.table
    };
    if !same {
        let before = match (item.kind, &local) {
            (ObjectKind::Table, Some(_)) => Some(described(c, item.name).map_err(f)?),
            _ => None,
        };
        // The columns this change takes from the table: their values are kept, with each
        // row's version, in case a later change brings the column back ([`keep_values`]).
        let paired = match (&before, item.new_sql.and_then(declared)) {
            (Some(before), Some(after)) => {
                let pairs = pairs_through_history(c, item.name, before, &after).map_err(f)?;
                let removed: Vec<String> = before
                    .iter()
                    .filter(|b| b.shape.3 == 0 && !pairs.iter().any(|(o, _)| *o == b.name))
                    .filter(|b| !after.iter().any(|a| a.name.eq_ignore_ascii_case(&b.name)))
                    .map(|b| b.name.clone())
                    .collect();
                keep_values(c, item.name, &removed, version).map_err(f)?;
                Some(pairs)
            }
            _ => None,
        };
        c.execute_batch("PRAGMA legacy_alter_table = ON")
            .map_err(f)?;
        let r = transform(c, item, local.as_deref());
        c.execute_batch("PRAGMA legacy_alter_table = OFF")
            .map_err(f)?;
        r.map_err(f)?;
        if let Some(before) = before
            && item.new_sql.is_some()
        {
            let after = described(c, item.name).map_err(f)?;
            // Columns no old column filled: one that comes back takes the values kept for
            // it where the row's winning write carried them (before the history forgets
            // where a present column went).
            // Only a column the sender's lineage had before this change (under its name, or
            // one this change renames to it): a column the change adds is new, whatever
            // values an earlier column of that name held.
            let pairs = paired.unwrap_or_default();
            let sender_old = item.old_sql.and_then(declared).unwrap_or_default();
            let sender_pairs = item
                .new_sql
                .and_then(declared)
                .map(|new| copy_pairs(&sender_old, &new))
                .unwrap_or_default();
            let mut revived: Vec<String> = Vec::new();
            for a in after.iter().filter(|a| a.shape.3 == 0) {
                let lineage_had = sender_old
                    .iter()
                    .any(|o| o.name.eq_ignore_ascii_case(&a.name))
                    || sender_pairs
                        .iter()
                        .any(|(_, n)| n.eq_ignore_ascii_case(&a.name));
                if lineage_had
                    && !pairs.iter().any(|(_, n)| *n == a.name)
                    && !before.iter().any(|b| b.name.eq_ignore_ascii_case(&a.name))
                {
                    fill_kept(c, item.name, &a.name, None).map_err(f)?;
                    revived.push(a.name.clone());
                }
            }
            record_fates(c, item.name, &before, &after, true, &revived, version).map_err(f)?;
        }
        if item.kind == ObjectKind::Table {
            forget_vanished(c, item.name, version).map_err(f)?;
        }
    }
    if item.kind == ObjectKind::Table && item.new_sql.is_none() {
        record_drop(c, item.name, version).map_err(f)?;
    }
    let now = local_sql(c, item.kind, item.name).map_err(f)?;
    put_baseline(
        c,
        item.kind,
        item.name,
        table,
        now.as_deref(),
        Some(version),
    )
    .map_err(f)?;
    Ok(Applied {
        changed: !same || learned,
        conflict: None,
        repair: None,
    })
}

/// A change of table `item.name` lost here: what became of the columns only it has, as far as
/// this node knows, unless their fate is known already. Rows written in its shape then apply
/// the way they would on a node that applied the losing change first and the winning one
/// after (the rebuild pairs columns the same way, [`pairs_through_history`]): a column it
/// paired with one of ours is renamed to it, the others are dropped (left out of rows).
/// Found by the simulation (V4, seed 88: two nodes renamed one column at once; the node that
/// met the winner first dropped the loser's name, the others kept its values under the
/// winner's).
fn leave_out_losing_columns(
    c: &Connection,
    item: &SchemaItem<'_>,
    v: Version,
) -> rusqlite::Result<bool> {
    let Some(theirs) = item.new_sql.and_then(declared) else {
        return Ok(false);
    };
    let mut learned = false;
    let ours = described(c, item.name)?;
    let pairs = pairs_through_history(c, item.name, &theirs, &ours)?;
    for col in theirs {
        if !ours.iter().any(|o| o.name.eq_ignore_ascii_case(&col.name))
            && column_fate(c, item.name, &col.name)?.is_none()
        {
            let to = pairs
                .iter()
                .find(|(o, _)| *o == col.name)
                .map(|(_, n)| n.clone());
            learned |= put_fate(c, item.name, &col.name, to.as_deref(), v)?;
        }
    }
    Ok(learned)
}

/// Whether a losing change of table `item.name` left out data this node's table keeps: the
/// table itself, or a column this table has and the losing shape has not (a column renamed
/// since, here or there, counts under its current name). Any node that applied the losing
/// change before the winning one may have left that column's values out of the rows it
/// applied meanwhile (the losing change removed it there, or never had it), and taken them
/// for its default when the winning change came: the winner's rows go out again. Found by
/// the simulation (V4, seeds 58 and 88: two nodes adding or renaming columns of one table at
/// once).
fn lost_data_we_keep(c: &Connection, item: &SchemaItem<'_>) -> rusqlite::Result<bool> {
    let Some(new) = item.new_sql else {
        return Ok(true);
    };
    let Some(after) = declared(new) else {
        return Ok(false);
    };
    let ours = described(c, item.name)?;
    let current = |name: &str| -> rusqlite::Result<String> {
        let (path, _) = renames_from(c, item.name, name)?;
        Ok(path.into_iter().last().unwrap_or_else(|| name.to_string()))
    };
    let mut theirs = Vec::with_capacity(after.len());
    for a in &after {
        theirs.push(current(&a.name)?);
    }
    Ok(ours
        .iter()
        .any(|o| !theirs.iter().any(|t| t.eq_ignore_ascii_case(&o.name))))
}

/// What a merge restore did to the schema ([`adopt_snapshot`]).
#[derive(Default)]
pub(crate) struct Adopted {
    /// Tables created or changed: their rows come from the snapshot, they are not published
    /// again.
    pub changed: Vec<String>,
}

/// A merge restore's schema: every object of the snapshot (attached as `snap`) whose version
/// is newer than this node's is brought to the snapshot's state, as if its change arrived from
/// the stream (the same order, rules and transform), before the rows are merged. So a node
/// that restores never needs DDL the stream no longer holds. Returns the tables created or
/// changed (their rows come from the snapshot: they are not published again); a change this
/// node cannot make is logged and left out (its rows then do not merge, as before).
pub(crate) fn adopt_snapshot(c: &Connection) -> rusqlite::Result<Adopted> {
    let has: i64 = c.query_row(
        "SELECT count(*) FROM snap.sqlite_master WHERE type = 'table' AND name = '__marmot__schema'",
        [],
        |r| r.get(0),
    )?;
    if has == 0 {
        return Ok(Adopted::default());
    }
    // And the drops it knows of: rows still to come may belong to a table dropped before.
    let mut drops_learned: Vec<(String, Version, Option<Version>)> = Vec::new();
    let drops: i64 = c.query_row(
        "SELECT count(*) FROM snap.sqlite_master WHERE type = 'table' AND name = '__marmot__table_drops'",
        [],
        |r| r.get(0),
    )?;
    if drops > 0 {
        let mut stmt = c.prepare("SELECT tbl, stamp, node FROM snap.\"__marmot__table_drops\"")?;
        let known: Vec<(String, i64, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (tbl, stamp, node) in known {
            if let Some(v) = version_of(stamp, node) {
                // The local table's life, before the snapshot's schema is adopted.
                let life = baseline_row(c, ObjectKind::Table, &tbl)?;
                if record_drop(c, &tbl, v)? {
                    drops_learned.push((tbl, v, life));
                }
            }
        }
    }
    // The snapshot's column history too: rows still to come may be written in a shape this
    // node never had and whose change it will not read (it is before the snapshot). After
    // the drops (a drop learned clears a table's history), and only for the table's life the
    // snapshot knows: where this node knows a later drop, the snapshot's facts are of a life
    // that ended.
    let fates: i64 = c.query_row(
        "SELECT count(*) FROM snap.sqlite_master WHERE type = 'table' AND name = '__marmot__column_fates'",
        [],
        |r| r.get(0),
    )?;
    if fates > 0 {
        // Each fact where it is newer than this node's ([`put_fate`]); a snapshot of an
        // earlier build has no versions (its facts count as the oldest).
        let versioned: i64 = c.query_row(
            "SELECT count(*) FROM pragma_table_info('__marmot__column_fates', 'snap') WHERE name = 'stamp'",
            [],
            |r| r.get(0),
        )?;
        let select = format!(
            "SELECT tbl, col, renamed_to, {} FROM snap.\"__marmot__column_fates\"",
            if versioned > 0 { "stamp, node" } else { "0, 0" },
        );
        type Fact = (String, String, Option<String>, i64, i64);
        let facts: Vec<Fact> = c
            .prepare(&select)?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        for (tbl, col, to, stamp, node) in facts {
            let v = version_of(stamp, node).unwrap_or(Version {
                stamp: Stamp::from_u64(0),
                node: 0,
            });
            // A fact of a change made after this node's last drop of the table (on a node that
            // had not met it) is of the life whose rows this node applies too.
            if !snapshot_same_life(c, &tbl)? && last_drop(c, &tbl)?.is_some_and(|d| v <= d) {
                continue;
            }
            put_fate(c, &tbl, &col, to.as_deref(), v)?;
        }
    }
    // Every rename the snapshot learned, after the drops (a drop learned clears a table's
    // renames) and only for the table's life the snapshot knows: where this node knows a
    // later drop, the snapshot's renames are of a life that ended.
    let renames: i64 = c.query_row(
        "SELECT count(*) FROM snap.sqlite_master WHERE type = 'table' AND name = '__marmot__column_renames'",
        [],
        |r| r.get(0),
    )?;
    if renames > 0 {
        let same_life = if drops > 0 {
            "NOT EXISTS (SELECT 1 FROM snap.\"__marmot__table_drops\" s \
             WHERE s.tbl = d.tbl AND s.stamp = d.stamp AND s.node = d.node)"
        } else {
            "true"
        };
        c.execute(
            &format!(
                "INSERT OR IGNORE INTO main.\"__marmot__column_renames\" (tbl, col, renamed_to) \
                 SELECT r.tbl, lower(r.col), lower(r.renamed_to) FROM snap.\"__marmot__column_renames\" AS r \
                 WHERE NOT EXISTS (SELECT 1 FROM main.\"__marmot__table_drops\" AS d \
                 WHERE d.tbl = r.tbl AND {same_life})"
            ),
            [],
        )?;
    }
    let mut theirs: Vec<(ObjectKind, String, String, Option<String>, Version)> = Vec::new();
    {
        let mut stmt = c.prepare(
            "SELECT type, name, tbl_name, sql, stamp, node FROM snap.\"__marmot__schema\"",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let Some(kind) = ObjectKind::parse(&r.get::<_, String>(0)?) else {
                continue;
            };
            let Some(version) = version_of(r.get(4)?, r.get(5)?) else {
                continue; // the schema every node started from
            };
            theirs.push((kind, r.get(1)?, r.get(2)?, r.get(3)?, version));
        }
    }
    theirs.sort_by_key(|(kind, _, _, sql, _)| rank(*kind, sql.is_none()));
    let mut adopted = Adopted::default();
    for (kind, name, table, sql, version) in theirs {
        if baseline_row(c, kind, &name)?.is_some_and(|ours| ours >= version) {
            // This node's table is newer: the snapshot's shape lost here, and the rows still to
            // come from the stream may be written in it (the change that made it is before the
            // snapshot's position: this node will not read it, nor learn from it that its
            // columns lost). Found by the simulation (V4, seed 9).
            // Nodes that applied that shape left this table's columns it lacks out of this
            // node's rows; they keep those values and fill the columns from them when this
            // node's change wins there (`fill_kept`; V4 seed 346). Publishing the rows again
            // from here, before this node read the stream past the snapshot, wrote stale
            // rows over newer writes it had not received yet (V4 seed 3266).
            // A repair can write over nothing newer: the snapshot's change that removed data
            // this table keeps gets one, as it would had it arrived from the stream (V4 seed
            // 841730).
            if kind == ObjectKind::Table
                && snapshot_same_life(c, &name)?
                && let Some(ours) = local_sql(c, kind, &name)?
            {
                let item = SchemaItem {
                    kind,
                    name: &name,
                    table: &table,
                    old_sql: Some(&ours),
                    new_sql: sql.as_deref(),
                };
                leave_out_losing_columns(c, &item, version)?;
                if baseline_row(c, kind, &name)?.is_some_and(|ours| ours > version)
                    && lost_data_we_keep(c, &item)?
                {
                    request_repair(c, &name, version)?;
                }
            }
            continue;
        }
        let ours = local_sql(c, kind, &name)?;
        let item = SchemaItem {
            kind,
            name: &name,
            table: &table,
            old_sql: ours.as_deref(),
            new_sql: sql.as_deref(),
        };
        match apply(c, &item, version) {
            Ok(applied) => {
                if applied.changed && kind == ObjectKind::Table {
                    adopted.changed.push(name.clone());
                }
            }
            Err(ApplyFault::Storage(e)) => return Err(e),
            Err(ApplyFault::Poison(why) | ApplyFault::Collision(why)) => {
                tracing::warn!(object = %name, kind = kind.as_str(), %why, "the snapshot's schema change could not be made here; left out of the restore");
            }
        }
    }
    // Rows of a table's life that a drop ended, which this node still holds (it missed the
    // drop: it is before the snapshot's position), go as the drop took them everywhere else;
    // the merge would keep them (a dropped table leaves no tombstones). Found by the
    // simulation (V4, seed 1943).
    for (tbl, v, life) in drops_learned {
        if life.is_none_or(|l| l < v) {
            end_older_life(c, &tbl)?;
        }
    }
    Ok(adopted)
}

/// Whether this node and the attached snapshot (`snap`) know the same last drop of `table`
/// (none, or the same one): the snapshot's table, rows and history are of the life this
/// node's table is. Called once the snapshot's drops are learned (this node keeps the newer
/// drop), so `false` means this node knows a drop the snapshot's table did not live past.
pub(crate) fn snapshot_same_life(c: &Connection, table: &str) -> rusqlite::Result<bool> {
    let has: i64 = c.query_row(
        "SELECT count(*) FROM snap.sqlite_master WHERE type = 'table' AND name = '__marmot__table_drops'",
        [],
        |r| r.get(0),
    )?;
    let theirs: Option<(i64, i64)> = if has > 0 {
        c.prepare("SELECT stamp, node FROM snap.\"__marmot__table_drops\" WHERE tbl = ?1")?
            .query_row([table], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
    } else {
        None
    };
    let ours = last_drop(c, table)?.map(|v| (v.stamp.as_u64() as i64, v.node as i64));
    Ok(theirs == ours)
}

/// Removes every row of `table` (and its versions): the local table is of a life that a drop
/// ended (its rows were written in it, whatever their stamps).
fn end_older_life(c: &Connection, table: &str) -> rusqlite::Result<()> {
    let ver_name = crate::ddl::ver_table(table);
    let exists = |name: &str| -> rusqlite::Result<bool> {
        c.query_row(
            "SELECT count(*) FROM main.sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    if !exists(table)? {
        return Ok(());
    }
    let gone = c.execute(&format!("DELETE FROM main.{}", quote(table)), [])?;
    if exists(&ver_name)? {
        c.execute(&format!("DELETE FROM main.{}", quote(&ver_name)), [])?;
    }
    if gone > 0 {
        tracing::info!(
            table,
            rows = gone,
            "removed the rows of a life of the table that a drop ended (met through a snapshot)"
        );
    }
    Ok(())
}

/// Why this node's `[tables]` lists keep `item` off it, if they do: it is, or belongs to, an
/// excluded table, or (a view or trigger) names one.
fn excluded_here(c: &Connection, item: &SchemaItem<'_>) -> rusqlite::Result<Option<String>> {
    if item.kind == ObjectKind::UserVersion {
        return Ok(None);
    }
    let table = if item.table.is_empty() {
        item.name
    } else {
        item.table
    };
    if crate::filter::excluded(c, table)?
        || (item.kind == ObjectKind::Table && crate::filter::excluded(c, item.name)?)
    {
        return Ok(Some(format!("table {table} is excluded")));
    }
    if matches!(item.kind, ObjectKind::View | ObjectKind::Trigger) {
        let excluded = crate::filter::excluded_tables(c, "main")?;
        for sql in [item.new_sql, item.old_sql].into_iter().flatten() {
            if let Some(t) = crate::filter::mentions_excluded(sql, &excluded) {
                return Ok(Some(format!("it names excluded table {t}")));
            }
        }
    }
    Ok(None)
}

/// After a table changed from the stream: its indexes and triggers that went with it (a
/// dropped or rebuilt table) leave the baseline at the change's version, so the next capture
/// does not publish their drops as this node's own change.
fn forget_vanished(c: &Connection, table: &str, version: Version) -> rusqlite::Result<()> {
    let now = current(c)?;
    for ((kind, name), (tbl, sql, _)) in baseline(c)? {
        if sql.is_some()
            && tbl == table
            && matches!(kind, ObjectKind::Index | ObjectKind::Trigger)
            && !now.contains_key(&(kind, name.clone()))
        {
            put_baseline(c, kind, &name, &tbl, None, Some(version))?;
        }
    }
    Ok(())
}

/// With schema replication off, the baseline follows the local schema without versions, so
/// that turning it on later publishes only what changes from then on.
pub(crate) fn follow_unreplicated(c: &Connection) -> rusqlite::Result<()> {
    for ch in changes(c)? {
        put_baseline(
            c,
            ch.kind,
            &ch.name,
            &ch.table,
            ch.new_sql.as_deref(),
            ch.base,
        )?;
    }
    Ok(())
}

/// Whether table `name` was dropped by a replicated change (this node's own, captured, or one
/// from the stream) and does not exist now: rows for it that still arrive, written before
/// their node learned of the drop, are skipped rather than parked (on their own node the drop
/// removes them too; a change of the table that wins over the drop brings the table back,
/// and its node publishes the rows again).
pub(crate) fn dropped_table(c: &Connection, name: &str) -> rusqlite::Result<bool> {
    let gone: Option<(i64, i64)> = c
        .prepare_cached(
            "SELECT stamp, node FROM \"__marmot__schema\" WHERE type = 'table' AND name = ?1 AND sql IS NULL",
        )?
        .query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(
        gone.is_some_and(|(stamp, node)| version_of(stamp, node).is_some())
            && local_sql(c, ObjectKind::Table, name)?.is_none(),
    )
}

fn baseline_row(c: &Connection, kind: ObjectKind, name: &str) -> rusqlite::Result<Option<Version>> {
    c.query_row(
        "SELECT stamp, node FROM \"__marmot__schema\" WHERE type = ?1 AND name = ?2",
        params![kind.as_str(), name],
        |r| Ok(version_of(r.get(0)?, r.get(1)?)),
    )
    .optional()
    .map(Option::flatten)
}

fn transform(c: &Connection, item: &SchemaItem<'_>, local: Option<&str>) -> rusqlite::Result<()> {
    let kw = match item.kind {
        ObjectKind::Table => "TABLE",
        ObjectKind::Index => "INDEX",
        ObjectKind::View => "VIEW",
        ObjectKind::Trigger => "TRIGGER",
        ObjectKind::UserVersion => {
            let n: i64 = item.new_sql.and_then(|s| s.parse().ok()).unwrap_or(0);
            return c.execute_batch(&format!("PRAGMA main.user_version = {n}"));
        }
    };
    match (item.kind, local, item.new_sql) {
        (ObjectKind::Table, Some(l), Some(new)) if !is_virtual(l) && !is_virtual(new) => {
            change_table(c, item, l, new)
        }
        (_, _, new) => {
            if local.is_some() {
                c.execute_batch(&format!("DROP {kw} IF EXISTS main.{}", quote(item.name)))?;
            }
            match new {
                Some(sql) => {
                    c.execute(sql, [])?;
                    if item.kind == ObjectKind::Table && is_virtual(sql) {
                        fill_full_text_index(c, item.name, sql);
                    }
                    Ok(())
                }
                None => Ok(()),
            }
        }
    }
}

/// An FTS5 index with external content created from the stream starts empty while its
/// content table already has rows (the sender filled its own index, in shadow tables that do
/// not replicate): build it from the content, as the application did on the sender.
fn fill_full_text_index(c: &Connection, name: &str, sql: &str) {
    let t = tokens(sql);
    let fts5 = t.iter().any(|x| x.text == "fts5");
    let external = t
        .windows(3)
        .any(|w| w[0].text == "content" && w[1].text == "=" && w[2].text != "''");
    if fts5 && external {
        let q = quote(name);
        if let Err(e) = c.execute_batch(&format!("INSERT INTO main.{q}({q}) VALUES ('rebuild')")) {
            tracing::warn!(index = name, error = %e, "could not build a full-text index created from the stream");
        }
    }
}

fn is_virtual(sql: &str) -> bool {
    tokens(sql).get(1).is_some_and(|t| t.text == "virtual")
}

/// A column as `pragma_table_xinfo` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Described {
    name: String,
    /// Declared type, NOT NULL, default, position in the key: equal for a renamed column.
    shape: (String, bool, Option<String>, i64),
}

/// The ordinary (not hidden, not generated) columns of a table.
fn described(c: &Connection, table: &str) -> rusqlite::Result<Vec<Described>> {
    c.prepare(
        "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_xinfo(?1) WHERE hidden = 0",
    )?
    .query_map([table], |r| {
        Ok(Described {
            name: r.get(0)?,
            shape: (
                r.get::<_, String>(1)?.to_ascii_lowercase(),
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
            ),
        })
    })?
    .collect()
}

/// Which old column fills which new one when a table is rebuilt: columns with the same name,
/// and, between two such columns, a column whose name changed but whose shape did not, in
/// the same order (`RENAME COLUMN`, possibly with columns dropped and added around it in the
/// same capture). Old columns with no partner are dropped; new ones get their defaults.
fn copy_pairs(old: &[Described], new: &[Described]) -> Vec<(String, String)> {
    let (n, m) = (old.len(), new.len());
    let same = |i: usize, j: usize| old[i].name.eq_ignore_ascii_case(&new[j].name);
    // Longest common subsequence of names: the anchors.
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if same(i, j) {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut pairs = Vec::new();
    let (mut i, mut j) = (0, 0);
    let (mut gap_old, mut gap_new) = (Vec::new(), Vec::new());
    // Within a gap, each new column takes the next old column of the same shape, in order
    // (renamed columns keep their places; dropped and added ones come and go around them).
    // Pairing by position alone lost a column renamed in the same capture as another was
    // dropped before it (simulation seed 751033).
    let close_gap =
        |go: &mut Vec<usize>, gn: &mut Vec<usize>, pairs: &mut Vec<(String, String)>| {
            let mut next = 0;
            for b in gn.iter() {
                if let Some(k) = (next..go.len()).find(|&k| old[go[k]].shape == new[*b].shape) {
                    pairs.push((old[go[k]].name.clone(), new[*b].name.clone()));
                    next = k + 1;
                }
            }
            go.clear();
            gn.clear();
        };
    while i < n || j < m {
        if i < n && j < m && same(i, j) {
            close_gap(&mut gap_old, &mut gap_new, &mut pairs);
            pairs.push((old[i].name.clone(), new[j].name.clone()));
            i += 1;
            j += 1;
        } else if j >= m || (i < n && lcs[i + 1][j] >= lcs[i][j + 1]) {
            gap_old.push(i);
            i += 1;
        } else {
            gap_new.push(j);
            j += 1;
        }
    }
    close_gap(&mut gap_old, &mut gap_new, &mut pairs);
    pairs
}

/// The `ALTER TABLE` that turns `old` into `new` when SQLite's own statement does exactly
/// that: ADD COLUMN (SQLite inserts `, <column>` before the column list's closing
/// parenthesis), DROP COLUMN, RENAME COLUMN.
fn alter_for(table: &str, old: &str, new: &str, local_cols: &[Described]) -> Option<String> {
    let (_, close) = create_table_parts(old)?;
    if new.len() > old.len()
        && new.is_char_boundary(close)
        && new.starts_with(&old[..close])
        && new.ends_with(&old[close..])
    {
        let middle = &new[close..new.len() - (old.len() - close)];
        if let Some(def) = middle.trim_start().strip_prefix(',') {
            return Some(format!(
                "ALTER TABLE main.{} ADD COLUMN {}",
                quote(table),
                def.trim()
            ));
        }
    }
    let new_cols = declared(new)?;
    let lower = |v: &[Described]| -> Vec<String> {
        v.iter().map(|d| d.name.to_ascii_lowercase()).collect()
    };
    let (l, n) = (lower(local_cols), lower(&new_cols));
    if l.len() == n.len() + 1 {
        let gone: Vec<&String> = l.iter().filter(|c| !n.contains(c)).collect();
        if gone.len() == 1 && l.iter().filter(|c| *c != gone[0]).eq(n.iter()) {
            let orig = &local_cols
                .iter()
                .find(|d| d.name.eq_ignore_ascii_case(gone[0]))?
                .name;
            return Some(format!(
                "ALTER TABLE main.{} DROP COLUMN {}",
                quote(table),
                quote(orig)
            ));
        }
    }
    if l.len() == n.len() {
        let diffs: Vec<usize> = (0..l.len()).filter(|&i| l[i] != n[i]).collect();
        if diffs.len() == 1 && !l.contains(&n[diffs[0]]) {
            let i = diffs[0];
            let (from, to) = (&local_cols[i].name, &new_cols[i].name);
            return Some(format!(
                "ALTER TABLE main.{} RENAME COLUMN {} TO {}",
                quote(table),
                quote(from),
                quote(to)
            ));
        }
    }
    None
}

/// Changes table `item.name` from `local` to `new`: the `ALTER TABLE` the sender ran when the
/// local table is what the sender changed, else a rebuild (create the new table, copy the
/// columns both have, drop the old one, rename, recreate its indexes and triggers).
fn change_table(
    c: &Connection,
    item: &SchemaItem<'_>,
    local: &str,
    new: &str,
) -> rusqlite::Result<()> {
    let local_cols = described(c, item.name)?;
    if let Some(old) = item.old_sql
        && normalise(old) == normalise(local)
        && let Some(alter) = alter_for(item.name, old, new, &local_cols)
    {
        c.execute_batch("SAVEPOINT marmot_alter")?;
        let done = c.execute(&alter, []).and_then(|_| {
            local_sql(c, ObjectKind::Table, item.name)
                .map(|now| now.is_some_and(|s| normalise(&s) == normalise(new)))
        });
        match done {
            Ok(true) => return c.execute_batch("RELEASE marmot_alter"),
            Ok(false) | Err(_) => {
                c.execute_batch("ROLLBACK TO marmot_alter; RELEASE marmot_alter")?;
            }
        }
    }
    rebuild(c, item.name, new)
}

fn rebuild(c: &Connection, table: &str, new: &str) -> rusqlite::Result<()> {
    let tmp = format!("{PREFIX}rebuild");
    let Some((name, _)) = create_table_parts(new) else {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "not a CREATE TABLE statement: {new}"
        )));
    };
    // The table's own indexes and triggers (not marmot's), to create again afterwards.
    let dependents: Vec<String> = c
        .prepare(
            "SELECT sql FROM main.sqlite_master WHERE tbl_name = ?1 AND type IN ('index', 'trigger') \
             AND sql IS NOT NULL AND name NOT LIKE '\\_\\_marmot\\_\\_%' ESCAPE '\\'",
        )?
        .query_map([table], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    c.execute_batch(&format!("DROP TABLE IF EXISTS main.{}", quote(&tmp)))?;
    c.execute(
        &format!("{}{}{}", &new[..name.start], quote(&tmp), &new[name.end..]),
        [],
    )?;
    let mut pairs = pairs_through_history(c, table, &described(c, table)?, &described(c, &tmp)?)?;
    // Rows keep their rowids (an FTS5 index over the table refers to them).
    if implicit_rowid(c, "main", table)? && implicit_rowid(c, "main", &tmp)? {
        pairs.push(("rowid".to_string(), "rowid".to_string()));
    }
    if !pairs.is_empty() {
        let q = |n: &String| if n == "rowid" { n.clone() } else { quote(n) };
        let to = pairs.iter().map(|(_, n)| q(n)).collect::<Vec<_>>();
        let from = pairs.iter().map(|(l, _)| q(l)).collect::<Vec<_>>();
        c.execute_batch(&format!(
            "INSERT INTO main.{} ({}) SELECT {} FROM main.{}",
            quote(&tmp),
            to.join(", "),
            from.join(", "),
            quote(table)
        ))?;
    }
    c.execute_batch(&format!(
        "DROP TABLE main.{}; ALTER TABLE main.{} RENAME TO {}",
        quote(table),
        quote(&tmp),
        quote(table)
    ))?;
    for sql in dependents {
        // One that no longer fits the new table (a column gone) is replaced or dropped by a
        // later change of the same batch.
        if let Err(e) = c.execute_batch(&sql) {
            tracing::debug!(table, error = %e, "not recreating an index or trigger after a rebuild");
        }
    }
    Ok(())
}

/// The table (in attached database `schema`) has a rowid of its own: not WITHOUT ROWID, no
/// INTEGER PRIMARY KEY alias.
pub(crate) fn implicit_rowid(c: &Connection, schema: &str, table: &str) -> rusqlite::Result<bool> {
    let without_rowid: i64 = c.query_row(
        "SELECT wr FROM pragma_table_list WHERE schema = ?1 AND name = ?2",
        [schema, table],
        |r| r.get(0),
    )?;
    if without_rowid != 0 {
        return Ok(false);
    }
    let pk: Vec<String> = c
        .prepare("SELECT type FROM pragma_table_info(?1, ?2) WHERE pk > 0")?
        .query_map([table, schema], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(!(pk.len() == 1 && pk[0].eq_ignore_ascii_case("INTEGER")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_difference_names_each_object_that_differs_and_where_it_is_missing() {
        let m = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ours = m(&[("table a", "1"), ("table b", "2"), ("view v", "3")]);
        let theirs = m(&[("table a", "1"), ("table b", "9"), ("index i", "4")]);
        assert_eq!(
            schema_difference(&ours, &theirs, "node 2"),
            vec![
                "table b differs",
                "view v only here",
                "index i only on node 2"
            ]
        );
        assert!(schema_difference(&ours, &ours, "node 2").is_empty());
    }

    #[test]
    fn normalising_ignores_quoting_case_spacing_and_comments_but_not_literals() {
        assert_eq!(
            normalise("CREATE TABLE t_x (a INT, b TEXT DEFAULT 'X')"),
            normalise("create table \"T_X\"(\n  a int, -- the key\n  [b] text default 'X' )")
        );
        assert_ne!(
            normalise("CREATE TABLE t (a DEFAULT 'x')"),
            normalise("CREATE TABLE t (a DEFAULT 'X')")
        );
        assert_ne!(
            normalise("CREATE TABLE t (a INT)"),
            normalise("CREATE TABLE t (a INT, b INT)")
        );
    }

    fn item<'a>(kind: ObjectKind, name: &'a str, new: &'a str) -> SchemaItem<'a> {
        SchemaItem {
            kind,
            name,
            table: name,
            old_sql: None,
            new_sql: Some(new),
        }
    }

    #[test]
    fn a_schema_item_must_be_one_create_of_its_kind_and_name() {
        let ok = [
            item(ObjectKind::Table, "T x", "CREATE TABLE \"T x\" (a)"),
            item(
                ObjectKind::Table,
                "f",
                "CREATE VIRTUAL TABLE f USING fts5(a)",
            ),
            item(
                ObjectKind::Index,
                "i",
                "CREATE UNIQUE INDEX IF NOT EXISTS main.i ON t(a)",
            ),
            item(
                ObjectKind::Trigger,
                "g",
                "CREATE TRIGGER g AFTER INSERT ON t BEGIN DELETE FROM u; END",
            ),
            item(ObjectKind::UserVersion, "", "42"),
        ];
        for i in &ok {
            assert_eq!(validate(i), Ok(()), "{i:?}");
        }
        let refused = [
            item(ObjectKind::Table, "t", "CREATE TABLE t AS SELECT 1"),
            item(ObjectKind::Table, "t", "CREATE INDEX t ON u(a)"),
            item(ObjectKind::Table, "t", "CREATE TABLE other (a)"),
            item(ObjectKind::Table, "t", "CREATE TABLE aux.t (a)"),
            item(ObjectKind::Table, "t", "DROP TABLE users"),
            item(
                ObjectKind::Table,
                "__marmot__tables",
                "CREATE TABLE __marmot__tables (a)",
            ),
            item(ObjectKind::Table, "sqlite_x", "CREATE TABLE sqlite_x (a)"),
            item(ObjectKind::UserVersion, "", "1; DROP TABLE t"),
        ];
        for i in &refused {
            assert!(validate(i).is_err(), "{i:?}");
        }
        // A second statement never runs: execution takes one statement.
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE users (a)").unwrap();
        assert!(
            c.execute("CREATE TABLE t (a); DROP TABLE users", [])
                .is_err()
        );
        assert!(local_sql(&c, ObjectKind::Table, "users").unwrap().is_some());
    }

    #[test]
    fn finds_the_name_and_the_end_of_the_column_list() {
        let sql = "CREATE TABLE IF NOT EXISTS main.\"odd ) name\" (a, b CHECK (b > (1)), c) STRICT";
        let (name, close) = create_table_parts(sql).unwrap();
        assert_eq!(&sql[name], "main.\"odd ) name\"");
        assert_eq!(&sql[close..], ") STRICT");
    }

    #[test]
    fn a_rebuild_copies_renamed_columns_and_leaves_dropped_ones() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE a (id INTEGER PRIMARY KEY, title TEXT, author TEXT, year INT, price REAL);
             CREATE TABLE b (id INTEGER PRIMARY KEY, title TEXT, writer TEXT, year INT, isbn TEXT);",
        )
        .unwrap();
        let pairs = copy_pairs(&described(&c, "a").unwrap(), &described(&c, "b").unwrap());
        let names: Vec<String> = pairs.iter().map(|(o, n)| format!("{o}>{n}")).collect();
        assert_eq!(
            names,
            ["id>id", "title>title", "author>writer", "year>year"]
        );
    }

    #[test]
    fn replays_add_drop_and_rename_column() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT) STRICT")
            .unwrap();
        let cols = described(&c, "t").unwrap();
        let old = "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT) STRICT";
        assert_eq!(
            alter_for(
                "t",
                old,
                "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT, isbn TEXT DEFAULT 'x') STRICT",
                &cols
            )
            .unwrap(),
            "ALTER TABLE main.\"t\" ADD COLUMN isbn TEXT DEFAULT 'x'"
        );
        assert_eq!(
            alter_for(
                "t",
                old,
                "CREATE TABLE t (k INTEGER PRIMARY KEY) STRICT",
                &cols
            )
            .unwrap(),
            "ALTER TABLE main.\"t\" DROP COLUMN \"v\""
        );
        assert_eq!(
            alter_for(
                "t",
                old,
                "CREATE TABLE t (k INTEGER PRIMARY KEY, w TEXT) STRICT",
                &cols
            )
            .unwrap(),
            "ALTER TABLE main.\"t\" RENAME COLUMN \"v\" TO \"w\""
        );
        assert!(
            alter_for(
                "t",
                old,
                "CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER) STRICT",
                &cols
            )
            .is_none()
        );
    }
}
