//! Discovering which tables marmot replicates, and how their keys compare.
//!
//! A table is replicated when it is an ordinary table of the main schema with a declared
//! primary key. Virtual tables and their shadow tables, SQLite's own tables, marmot's own
//! tables (matched by exact prefix, never by LIKE), tables without a primary key and tables
//! whose key uses a collation marmot's connection does not have are skipped, each with a
//! reason. Generated columns are not replicated (every node computes them).

use rusqlite::{Connection, OptionalExtension};

/// Prefix of every table and trigger marmot creates.
pub const PREFIX: &str = "__marmot__";

/// SQLite type affinity (decides how a value is coerced when stored).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Affinity {
    /// INTEGER affinity.
    Integer,
    /// TEXT affinity.
    Text,
    /// BLOB (no) affinity.
    Blob,
    /// REAL affinity.
    Real,
    /// NUMERIC affinity.
    Numeric,
}

impl Affinity {
    /// The affinity SQLite gives a declared column type (rules of section 3.1 of the
    /// datatype documentation).
    pub fn of_declared(decl: &str) -> Affinity {
        let d = decl.to_ascii_uppercase();
        if d.contains("INT") {
            Affinity::Integer
        } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
            Affinity::Text
        } else if d.contains("BLOB") || d.trim().is_empty() {
            Affinity::Blob
        } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }

    /// A declared type with this affinity, for marmot's own key columns.
    pub fn sql_type(self) -> &'static str {
        match self {
            Affinity::Integer => "INTEGER",
            Affinity::Text => "TEXT",
            Affinity::Blob => "BLOB",
            Affinity::Real => "REAL",
            Affinity::Numeric => "NUMERIC",
        }
    }
}

/// One replicated column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Its affinity. In a STRICT table a column declared `ANY` has none ([`Affinity::Blob`]):
    /// it keeps every value's own storage class, so `'7'` and `7` are two keys there.
    pub affinity: Affinity,
    /// Its collation (BINARY, NOCASE or RTRIM). For a key column, the collation of the
    /// primary key's index, which `PRIMARY KEY (k COLLATE NOCASE)` sets apart from the
    /// column's own: every comparison of keys spells it out.
    pub collation: String,
    /// Declared `ANY` in a STRICT table (format 1 of marmot's tables gave its key NUMERIC
    /// affinity; see [`TableInfo::format1_key_signature`]).
    pub strict_any: bool,
}

/// A replicated table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    /// Table name.
    pub name: String,
    /// Replicated columns: primary key columns first (in key order), then the others in
    /// table order.
    pub columns: Vec<Column>,
    /// How many of `columns` form the primary key.
    pub key_columns: usize,
    /// A STRICT table.
    pub strict: bool,
}

impl TableInfo {
    /// Column names in [`TableInfo::columns`] order.
    pub fn column_names(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.name.clone()).collect()
    }

    /// The key columns.
    pub fn key(&self) -> &[Column] {
        &self.columns[..self.key_columns]
    }

    /// Identifies the key: its columns (names, in key order) and how they compare (affinity
    /// and collation): when it changes, stored row versions no longer match keys and are
    /// rebuilt. `"name",...|AFFINITY/COLLATION,...` (format 1 recorded the part after `|`).
    pub fn key_signature(&self) -> String {
        format!("{}|{}", self.key_names(), self.key_types())
    }

    /// The key's column names, quoted, in key order.
    pub fn key_names(&self) -> String {
        self.key()
            .iter()
            .map(|c| crate::ddl::quote(&c.name))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn key_types(&self) -> String {
        self.key()
            .iter()
            .map(|c| format!("{}/{}", c.affinity.sql_type(), c.collation))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The key signature marmot's format 1 recorded for this table (it gave a STRICT
    /// table's `ANY` key NUMERIC affinity): when the recorded signature is this one, the key
    /// did not change, only marmot's rule did, and its tables are migrated in place.
    pub fn format1_key_signature(&self) -> String {
        self.key()
            .iter()
            .map(|c| {
                let a = if c.strict_any {
                    Affinity::Numeric
                } else {
                    c.affinity
                };
                format!("{}/{}", a.sql_type(), c.collation)
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Why a table is not replicated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The `[tables]` include and exclude lists leave it out.
    Excluded,
    /// A virtual table (FTS5, R*Tree, ...): its content lives in shadow tables.
    Virtual,
    /// A shadow table of a virtual table.
    Shadow,
    /// No declared primary key: rows have no identity that is the same on every node.
    NoPrimaryKey,
    /// A key column uses a collation marmot's connection does not have.
    CustomCollation(String),
    /// The table or a column name is not valid UTF-8.
    NotUtf8,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::Excluded => write!(
                f,
                "excluded by the [tables] lists: its rows and schema stay on this node"
            ),
            SkipReason::Virtual => write!(
                f,
                "virtual table (its shadow tables are not replicated either)"
            ),
            SkipReason::Shadow => write!(f, "shadow table of a virtual table"),
            SkipReason::NoPrimaryKey => write!(
                f,
                "no declared PRIMARY KEY: its rows have no identity shared by all nodes; add a primary key to replicate it"
            ),
            SkipReason::CustomCollation(c) => {
                write!(
                    f,
                    "its primary key uses collation {c:?}, which marmot does not have"
                )
            }
            SkipReason::NotUtf8 => write!(f, "its name or a column name is not valid UTF-8"),
        }
    }
}

/// What discovery found.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    /// Replicated tables, by name order.
    pub tables: Vec<TableInfo>,
    /// Skipped tables and why.
    pub skipped: Vec<(String, SkipReason)>,
    /// Generated columns left out, as (table, column).
    pub generated: Vec<(String, String)>,
}

/// Lists the tables to replicate.
pub fn discover(conn: &Connection) -> rusqlite::Result<Discovery> {
    let mut found = Discovery::default();
    let mut listed: Vec<(Result<String, Vec<u8>>, String, bool)> = Vec::new();
    {
        let mut stmt =
            conn.prepare("SELECT name, type, strict FROM pragma_table_list WHERE schema = 'main'")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let name = match row.get_ref(0)? {
                rusqlite::types::ValueRef::Text(t) => {
                    String::from_utf8(t.to_vec()).map_err(|e| e.into_bytes())
                }
                other => Err(format!("{other:?}").into_bytes()),
            };
            let kind: String = row.get(1)?;
            let strict: bool = row.get(2)?;
            listed.push((name, kind, strict));
        }
    }
    listed.sort_by(|a, b| name_bytes(&a.0).cmp(name_bytes(&b.0)));
    for (name, kind, strict) in listed {
        let name = match name {
            Ok(n) => n,
            Err(bytes) => {
                found.skipped.push((
                    String::from_utf8_lossy(&bytes).into_owned(),
                    SkipReason::NotUtf8,
                ));
                continue;
            }
        };
        if name.starts_with("sqlite_") || name.starts_with(PREFIX) {
            continue;
        }
        if matches!(kind.as_str(), "table" | "virtual") && crate::filter::excluded(conn, &name)? {
            found.skipped.push((name, SkipReason::Excluded));
            continue;
        }
        match kind.as_str() {
            "table" => {}
            "virtual" => {
                found.skipped.push((name, SkipReason::Virtual));
                continue;
            }
            "shadow" => {
                found.skipped.push((name, SkipReason::Shadow));
                continue;
            }
            _ => continue, // views
        }
        match table_info(conn, &name, strict, &mut found.generated)? {
            Ok(t) => found.tables.push(t),
            Err(reason) => found.skipped.push((name, reason)),
        }
    }
    Ok(found)
}

fn name_bytes(n: &Result<String, Vec<u8>>) -> &[u8] {
    match n {
        Ok(s) => s.as_bytes(),
        Err(b) => b,
    }
}

fn table_info(
    conn: &Connection,
    name: &str,
    strict: bool,
    generated: &mut Vec<(String, String)>,
) -> rusqlite::Result<Result<TableInfo, SkipReason>> {
    let mut keyed: Vec<(i64, Column)> = Vec::new();
    let mut others: Vec<Column> = Vec::new();
    let mut stmt = conn.prepare("SELECT name, type, pk, hidden FROM pragma_table_xinfo(?1)")?;
    let mut rows = stmt.query([name])?;
    while let Some(row) = rows.next()? {
        let col = match row.get_ref(0)? {
            rusqlite::types::ValueRef::Text(t) => match std::str::from_utf8(t) {
                Ok(s) => s.to_string(),
                Err(_) => return Ok(Err(SkipReason::NotUtf8)),
            },
            _ => return Ok(Err(SkipReason::NotUtf8)),
        };
        let decl: String = row.get::<_, Option<String>>(1)?.unwrap_or_default();
        let pk: i64 = row.get(2)?;
        let hidden: i64 = row.get(3)?;
        if hidden != 0 {
            generated.push((name.to_string(), col));
            continue;
        }
        let strict_any = strict && decl.trim().eq_ignore_ascii_case("ANY");
        let column = Column {
            name: col,
            affinity: if strict_any {
                Affinity::Blob
            } else {
                Affinity::of_declared(&decl)
            },
            collation: "BINARY".into(),
            strict_any,
        };
        if pk > 0 {
            keyed.push((pk, column));
        } else {
            others.push(column);
        }
    }
    if keyed.is_empty() {
        return Ok(Err(SkipReason::NoPrimaryKey));
    }
    keyed.sort_by_key(|(pk, _)| *pk);
    // The key compares as its index does: `PRIMARY KEY (k COLLATE NOCASE)` makes the index
    // NOCASE even when the column is BINARY. (An INTEGER PRIMARY KEY has no index.)
    let mut index_collation: std::collections::HashMap<String, String> =
        std::collections::HashMap::new();
    let pk_index: Option<String> = conn
        .prepare("SELECT name FROM pragma_index_list(?1) WHERE origin = 'pk'")?
        .query_row([name], |r| r.get(0))
        .optional()?;
    if let Some(idx) = pk_index {
        let mut stmt = conn.prepare(
            "SELECT name, coll FROM pragma_index_xinfo(?1) WHERE key = 1 AND name IS NOT NULL",
        )?;
        let rows = stmt.query_map([idx], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        for r in rows {
            let (col, coll) = r?;
            index_collation.insert(col, coll.to_ascii_uppercase());
        }
    }
    let mut columns: Vec<Column> = Vec::with_capacity(keyed.len() + others.len());
    for (_, mut c) in keyed {
        let coll = match index_collation.get(&c.name) {
            Some(coll) => coll.clone(),
            None => {
                let (_, coll, _, _, _) =
                    conn.column_metadata(Some("main"), name, c.name.as_str())?;
                coll.map(|c| c.to_string_lossy().to_ascii_uppercase())
                    .unwrap_or_else(|| "BINARY".into())
            }
        };
        if !matches!(coll.as_str(), "BINARY" | "NOCASE" | "RTRIM") {
            return Ok(Err(SkipReason::CustomCollation(coll)));
        }
        c.collation = coll;
        columns.push(c);
    }
    let key_columns = columns.len();
    columns.extend(others);
    Ok(Ok(TableInfo {
        name: name.to_string(),
        columns,
        key_columns,
        strict,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_follows_sqlite_rules() {
        assert_eq!(Affinity::of_declared("INTEGER"), Affinity::Integer);
        assert_eq!(Affinity::of_declared("bigint"), Affinity::Integer);
        assert_eq!(Affinity::of_declared("VARCHAR(10)"), Affinity::Text);
        assert_eq!(Affinity::of_declared(""), Affinity::Blob);
        assert_eq!(Affinity::of_declared("DOUBLE"), Affinity::Real);
        assert_eq!(Affinity::of_declared("DECIMAL(5,2)"), Affinity::Numeric);
        // "FLOATING POINT" has INT in it: INTEGER wins, as in SQLite.
        assert_eq!(Affinity::of_declared("FLOATING POINT"), Affinity::Integer);
    }

    #[test]
    fn finds_tables_and_skips_the_rest_with_reasons() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            r#"CREATE TABLE "odd ""name"" é" ("k ey" TEXT COLLATE NOCASE, b INT, v, PRIMARY KEY (b, "k ey"));
               CREATE TABLE plain (id INTEGER PRIMARY KEY, x, g AS (x * 2));
               CREATE TABLE nokey (a, b);
               CREATE TABLE wr (a TEXT PRIMARY KEY, b) WITHOUT ROWID;
               CREATE TABLE pkcoll (k TEXT, v, PRIMARY KEY (k COLLATE NOCASE));
               CREATE VIRTUAL TABLE docs USING fts5(body);
               CREATE TABLE __marmot__meta (k PRIMARY KEY);
               CREATE VIEW v AS SELECT 1;"#,
        )
        .unwrap();
        let d = discover(&c).unwrap();
        let names: Vec<_> = d.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["odd \"name\" é", "pkcoll", "plain", "wr"]);
        let pkcoll = d.tables.iter().find(|t| t.name == "pkcoll").unwrap();
        assert_eq!(
            pkcoll.columns[0].collation, "NOCASE",
            "the key's index collation, not the column's"
        );
        let odd = &d.tables[0];
        assert_eq!(odd.key_columns, 2);
        assert_eq!(odd.columns[0].name, "b");
        assert_eq!(odd.columns[1].name, "k ey");
        assert_eq!(odd.columns[1].collation, "NOCASE");
        assert_eq!(
            odd.key_signature(),
            "\"b\",\"k ey\"|INTEGER/BINARY,TEXT/NOCASE"
        );
        assert_eq!(d.generated, vec![("plain".to_string(), "g".to_string())]);
        assert!(
            d.skipped
                .contains(&("nokey".to_string(), SkipReason::NoPrimaryKey))
        );
        assert!(
            d.skipped
                .contains(&("docs".to_string(), SkipReason::Virtual))
        );
        assert!(
            d.skipped
                .iter()
                .any(|(n, r)| n == "docs_data" && *r == SkipReason::Shadow)
        );
    }
}
