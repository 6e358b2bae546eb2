//! Which tables replicate: the `[tables]` include and exclude lists.
//!
//! Patterns are SQLite `GLOB` patterns (`*`, `?`, `[...]`) matched against table names with
//! ASCII letter case ignored (SQLite's names ignore it too). A table replicates when it
//! matches an include pattern (an empty include list includes every table) and no exclude
//! pattern: exclude wins.
//!
//! The lists live in the database (`__marmot__table_filter`), written at every start from the
//! configuration. So every reader of the file decides the same way, whatever connection it
//! has: capture and apply, the schema diff, `marmot status`, and a snapshot copy (which leaves
//! the excluded tables of its source out).
//!
//! An excluded table gets no triggers and no marmot state; its rows and its DDL (the table,
//! its indexes and triggers) stay on its node, and changes to it that arrive from other
//! nodes (configured differently) are skipped. A view, or a trigger of a replicated table,
//! whose statement names an excluded table is not replicated either: receivers would get an
//! object that refers to a table they do not have. `marmot status` lists both.

use crate::PREFIX;
use rusqlite::{Connection, OptionalExtension};

/// The include and exclude lists of a node's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableFilter {
    /// Tables that replicate (empty: all).
    pub include: Vec<String>,
    /// Tables that do not, whatever `include` says.
    pub exclude: Vec<String>,
}

const TABLE: &str = "\"__marmot__table_filter\"";

impl TableFilter {
    /// Every table replicates.
    pub fn all() -> Self {
        TableFilter::default()
    }

    /// Writes the lists into the database (inside the caller's transaction, if any).
    pub fn store(&self, c: &Connection) -> rusqlite::Result<()> {
        c.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (list TEXT NOT NULL, pattern TEXT NOT NULL, PRIMARY KEY (list, pattern)); DELETE FROM {TABLE};"
        ))?;
        let mut put = c.prepare(&format!(
            "INSERT OR IGNORE INTO {TABLE} (list, pattern) VALUES (?1, ?2)"
        ))?;
        for p in &self.include {
            put.execute(["include", p])?;
        }
        for p in &self.exclude {
            put.execute(["exclude", p])?;
        }
        Ok(())
    }
}

/// Whether `schema`'s filter (the database's, `main`, or an attached copy's) excludes table
/// `name`. A database without lists excludes nothing.
pub fn excluded_in(c: &Connection, schema: &str, name: &str) -> rusqlite::Result<bool> {
    let has: bool = c
        .query_row(
            &format!(
                "SELECT count(*) > 0 FROM {schema}.sqlite_master WHERE type = 'table' AND name = '__marmot__table_filter'"
            ),
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(false);
    if !has || name.starts_with(PREFIX) {
        return Ok(false);
    }
    c.prepare_cached(&format!(
        "SELECT EXISTS (SELECT 1 FROM {schema}.{TABLE} WHERE list = 'exclude' AND lower(?1) GLOB lower(pattern)) \
             OR (EXISTS (SELECT 1 FROM {schema}.{TABLE} WHERE list = 'include') \
                 AND NOT EXISTS (SELECT 1 FROM {schema}.{TABLE} WHERE list = 'include' AND lower(?1) GLOB lower(pattern)))"
    ))?
    .query_row([name], |r| r.get(0))
}

/// Whether the database's own filter excludes table `name`.
pub fn excluded(c: &Connection, name: &str) -> rusqlite::Result<bool> {
    excluded_in(c, "main", name)
}

/// The tables of `schema` that its filter excludes (lower-cased names).
pub fn excluded_tables(c: &Connection, schema: &str) -> rusqlite::Result<Vec<String>> {
    let names: Vec<String> = c
        .prepare(&format!(
            "SELECT name FROM {schema}.sqlite_master WHERE type = 'table'"
        ))?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for n in names {
        if excluded_in(c, schema, &n)? {
            out.push(n.to_ascii_lowercase());
        }
    }
    Ok(out)
}

/// Whether an object's statement names one of `excluded` (lower-cased table names), as an
/// identifier token: a view or trigger that would refer, on receivers, to a table they do not
/// have.
pub fn mentions_excluded(sql: &str, excluded: &[String]) -> Option<String> {
    if excluded.is_empty() {
        return None;
    }
    crate::replicated::identifiers(sql)
        .into_iter()
        .map(|t| t.to_ascii_lowercase())
        .find(|t| excluded.contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_wins_over_include_and_letter_case_is_ignored() {
        let c = Connection::open_in_memory().unwrap();
        assert!(
            !excluded(&c, "anything").unwrap(),
            "no lists: all replicate"
        );
        TableFilter {
            include: vec!["app_*".into(), "Users".into()],
            exclude: vec!["app_cache*".into(), "*_tmp".into()],
        }
        .store(&c)
        .unwrap();
        for (name, out) in [
            ("app_posts", false),
            ("APP_POSTS", false),
            ("users", false),
            ("app_cache", true),
            ("app_cache_2", true),
            ("app_x_tmp", true),
            ("orders", true),
            ("__marmot__meta", false),
        ] {
            assert_eq!(excluded(&c, name).unwrap(), out, "{name}");
        }
        TableFilter {
            include: vec![],
            exclude: vec!["[ab]?".into()],
        }
        .store(&c)
        .unwrap();
        assert!(excluded(&c, "a1").unwrap());
        assert!(!excluded(&c, "c1").unwrap());
        assert!(!excluded(&c, "orders").unwrap(), "empty include: all");
        assert_eq!(
            mentions_excluded(
                "CREATE VIEW v AS SELECT * FROM \"A1\" JOIN t USING (id)",
                &["a1".into()]
            ),
            Some("a1".into())
        );
        assert_eq!(
            mentions_excluded("CREATE VIEW v AS SELECT 'a1' FROM t", &["a1".into()]),
            None,
            "a string is not a name"
        );
    }
}
