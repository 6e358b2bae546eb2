//! Full-text indexes the application keeps in step with a replicated table, kept in step on
//! replicas too.
//!
//! The SQLite manual's external-content pattern (`CREATE VIRTUAL TABLE f USING fts5(title,
//! body, content='docs', content_rowid='id')` plus three triggers on `docs`), which
//! `sqlite-utils enable-fts --create-triggers` and Datasette use, indexes rows of an ordinary
//! table. marmot applies other nodes' rows with every trigger disabled (so that an
//! application's triggers that write replicated tables, `updated_at` or audit rows, do not
//! fire a second time on replicas: their rows arrive from the origin), so the application's
//! triggers never see replicated rows. Instead marmot does what those triggers do, from the
//! index's own declaration: before it changes or deletes a row of the content table it issues
//! the index's `'delete'` command with the row's current values, and after it writes a row it
//! inserts the new values. Virtual tables and their shadow tables are never replicated as
//! rows; each node's index follows its own rows.
//!
//! Not maintained (documented): contentless indexes (`content=''`) and indexes that keep their
//! own content (no `content=` option) fed by application triggers: marmot cannot know what
//! those triggers put in them. Use an external-content index for replicated tables.

use crate::ddl::quote;
use rusqlite::Connection;

/// An external-content FTS5 index over a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalIndex {
    /// The virtual table.
    pub name: String,
    /// The content table it indexes.
    pub content: String,
    /// Its indexed columns (the content table's columns of the same names).
    pub columns: Vec<String>,
    /// The content table's column that is the index's rowid (`rowid` unless
    /// `content_rowid` says otherwise).
    pub content_rowid: String,
}

impl ExternalIndex {
    fn values(&self, alias: &str) -> String {
        std::iter::once(format!("{alias}.{}", quote(&self.content_rowid)))
            .chain(self.columns.iter().map(|c| format!("{alias}.{}", quote(c))))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn targets(&self) -> String {
        std::iter::once("rowid".to_string())
            .chain(self.columns.iter().map(|c| quote(c)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Removes the index entry of the content row matching `where_row` (whose parameters
    /// are the key), with the row's current values: run before the row changes or goes.
    pub fn delete_sql(&self, where_row: &str) -> String {
        let f = quote(&self.name);
        format!(
            "INSERT INTO {f} ({f}, {targets}) SELECT 'delete', {values} FROM {t} AS t WHERE {where_row}",
            targets = self.targets(),
            values = self.values("t"),
            t = quote(&self.content),
        )
    }

    /// Indexes the content row matching `where_row`: run after it was written.
    pub fn insert_sql(&self, where_row: &str) -> String {
        format!(
            "INSERT INTO {f} ({targets}) SELECT {values} FROM {t} AS t WHERE {where_row}",
            f = quote(&self.name),
            targets = self.targets(),
            values = self.values("t"),
            t = quote(&self.content),
        )
    }

    /// Rebuilds the whole index from its content table (after a merge restore, which writes
    /// rows in bulk).
    pub fn rebuild_sql(&self) -> String {
        let f = quote(&self.name);
        format!("INSERT INTO {f} ({f}) VALUES ('rebuild')")
    }
}

/// Every external-content FTS5 index of the main schema.
pub fn external_indexes(conn: &Connection) -> rusqlite::Result<Vec<ExternalIndex>> {
    let rows: Vec<(String, Option<String>)> = conn
        .prepare("SELECT name, sql FROM main.sqlite_master WHERE type = 'table' AND sql IS NOT NULL ORDER BY name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(name, sql)| parse(&name, sql.as_deref()?))
        .collect())
}

/// Reads `CREATE VIRTUAL TABLE name USING fts5(...)`; `None` for anything else, and for FTS5
/// tables without external content.
pub fn parse(name: &str, sql: &str) -> Option<ExternalIndex> {
    let upper = sql.to_ascii_uppercase();
    if !upper.trim_start().starts_with("CREATE VIRTUAL TABLE") {
        return None;
    }
    let using = find_word(&upper, "USING")?;
    let rest = &sql[using + "USING".len()..];
    let open = rest.find('(')?;
    if !rest[..open].trim().eq_ignore_ascii_case("fts5") {
        return None;
    }
    let close = rest.rfind(')')?;
    let args = split_args(&rest[open + 1..close]);
    let mut columns = Vec::new();
    let mut content = None;
    let mut content_rowid = "rowid".to_string();
    for arg in args {
        let arg = arg.trim();
        if arg.is_empty() {
            continue;
        }
        match top_level_eq(arg) {
            Some(eq) => {
                let key = unquote(arg[..eq].trim()).to_ascii_lowercase();
                let value = unquote(arg[eq + 1..].trim());
                match key.as_str() {
                    "content" => content = Some(value),
                    "content_rowid" => content_rowid = value,
                    _ => {}
                }
            }
            None => {
                // A column, possibly followed by UNINDEXED.
                let first = first_token(arg);
                columns.push(unquote(first));
            }
        }
    }
    let content = content.filter(|c| !c.is_empty())?;
    Some(ExternalIndex {
        name: name.to_string(),
        content,
        columns,
        content_rowid,
    })
}

/// Position of `word` in `upper` as a whole word outside quotes.
fn find_word(upper: &str, word: &str) -> Option<usize> {
    let b = upper.as_bytes();
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
            }
            None => match c {
                b'\'' | b'"' | b'`' => quote = Some(c),
                b'[' => quote = Some(b']'),
                _ if upper[i..].starts_with(word)
                    && (i == 0 || !is_ident(b[i - 1]))
                    && !b.get(i + word.len()).copied().is_some_and(is_ident) =>
                {
                    return Some(i);
                }
                _ => {}
            },
        }
        i += 1;
    }
    None
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// Splits at commas outside quotes and parentheses.
fn split_args(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' | '`' => quote = Some(c),
                '[' => quote = Some(']'),
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            },
        }
    }
    out.push(&s[start..]);
    out
}

/// Position of an `=` outside quotes.
fn top_level_eq(s: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' | '`' => quote = Some(c),
                '[' => quote = Some(']'),
                '=' => return Some(i),
                _ => {}
            },
        }
    }
    None
}

/// The first token: a quoted identifier whole, or up to the first blank.
fn first_token(s: &str) -> &str {
    let close = match s.chars().next() {
        Some('"') => Some('"'),
        Some('\'') => Some('\''),
        Some('`') => Some('`'),
        Some('[') => Some(']'),
        _ => None,
    };
    match close {
        Some(c) => {
            // Doubled quotes inside stay inside.
            let b: Vec<char> = s.chars().collect();
            let mut i = 1;
            while i < b.len() {
                if b[i] == c {
                    if b.get(i + 1) == Some(&c) && c != ']' {
                        i += 2;
                        continue;
                    }
                    let end: usize = b[..=i].iter().map(|ch| ch.len_utf8()).sum();
                    return &s[..end];
                }
                i += 1;
            }
            s
        }
        None => s.split_whitespace().next().unwrap_or(s),
    }
}

/// Removes SQL quoting: `'a''b'`, `"a""b"`, `` `a` ``, `[a]`.
fn unquote(s: &str) -> String {
    let s = s.trim();
    let mut chars = s.chars();
    let (Some(first), Some(last)) = (chars.next(), s.chars().last()) else {
        return s.to_string();
    };
    if s.len() < 2 {
        return s.to_string();
    }
    let inner = &s[first.len_utf8()..s.len() - last.len_utf8()];
    match (first, last) {
        ('\'', '\'') => inner.replace("''", "'"),
        ('"', '"') => inner.replace("\"\"", "\""),
        ('`', '`') => inner.replace("``", "`"),
        ('[', ']') => inner.to_string(),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_manual_sqlite_utils_and_odd_spellings() {
        let manual = parse(
            "fts_idx",
            "CREATE VIRTUAL TABLE fts_idx USING fts5(b, c, content='tbl', content_rowid='a')",
        )
        .unwrap();
        assert_eq!(manual.content, "tbl");
        assert_eq!(manual.columns, vec!["b", "c"]);
        assert_eq!(manual.content_rowid, "a");
        let utils = parse(
            "docs_fts",
            "CREATE VIRTUAL TABLE [docs_fts] USING FTS5 (\n    [title], [body],\n    content=[docs]\n)",
        )
        .unwrap();
        assert_eq!(utils.content, "docs");
        assert_eq!(utils.columns, vec!["title", "body"]);
        assert_eq!(utils.content_rowid, "rowid");
        let odd = parse(
            "f",
            r#"create virtual table "f" using fts5("a ""b""" UNINDEXED, `c`, tokenize = 'porter unicode61', content = "my ""t""")"#,
        )
        .unwrap();
        assert_eq!(odd.columns, vec!["a \"b\"", "c"]);
        assert_eq!(odd.content, "my \"t\"");
        // Not external content, or not FTS5 at all.
        assert!(parse("f", "CREATE VIRTUAL TABLE f USING fts5(a, content='')").is_none());
        assert!(parse("f", "CREATE VIRTUAL TABLE f USING fts5(a)").is_none());
        assert!(parse("r", "CREATE VIRTUAL TABLE r USING rtree(id, x0, x1)").is_none());
        assert!(parse("t", "CREATE TABLE t (using_fts5 TEXT, content)").is_none());
    }
}
