//! Convergence digests: what a node's replicated tables hold, in a form two nodes compare
//! without sending their rows (`marmot diff`, the `table_digest` metric).
//!
//! Each live row of a replicated table hashes (BLAKE3) its table, its key, its version
//! (stamp and node, or none when marmot never versioned it) and its content: every
//! replicated column by name, with each value's storage class. A row changed behind marmot's
//! back (its triggers removed) keeps its version but not its hash. A table's digest is the
//! sum of its rows' hashes (128 bits, wrapping), so it does not depend on the order rows are
//! read in; rows are also summed into 256 buckets by their key's hash, which narrows a
//! difference down to the keys that make it without listing every key.
//!
//! Tombstones are left out: nodes collect them at different times (see the README's
//! Tombstones), so they legitimately differ.
//!
//! Everything is read in one read transaction, together with the position applied, the
//! batches not yet published and the changes not yet captured: two nodes' digests compare
//! only at the same position with nothing of their own unpublished (see [`DataDigest::comparable`]).

use crate::ddl::{key_match, log_table, quote, ver_table};
use crate::schema::{TableInfo, discover};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Buckets a table's rows are summed into (by the first byte of their key's hash).
pub const BUCKETS: usize = 256;

/// A node's replicated data, summarised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDigest {
    /// The last stream position applied.
    pub position: u64,
    /// Captured batches not yet acknowledged by the stream.
    pub unpublished_batches: u64,
    /// Row changes the triggers logged that marmot has not captured yet.
    pub uncaptured_changes: u64,
    /// Batches parked here (not applied: their rows are missing).
    #[serde(default)]
    pub parked_batches: u64,
    /// Per replicated table.
    pub tables: BTreeMap<String, TableDigest>,
}

/// One table's rows, summarised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDigest {
    /// Live rows.
    pub rows: u64,
    /// Sum of the rows' hashes, hex (32 digits).
    pub digest: String,
}

impl TableDigest {
    /// The digest's low 48 bits: a 64-bit float (a Prometheus sample) holds them exactly.
    pub fn digest48(&self) -> u64 {
        u128::from_str_radix(&self.digest, 16).map_or(0, |d| (d & ((1 << 48) - 1)) as u64)
    }
}

impl DataDigest {
    /// Why this node's digest cannot be compared with `other`'s yet (None: it can). Both
    /// must have applied the same stream position and hold nothing of their own that the
    /// stream does not carry yet.
    pub fn comparable(&self, other: &DataDigest, names: (&str, &str)) -> Option<String> {
        let mut why = Vec::new();
        for (d, name) in [(self, names.0), (other, names.1)] {
            if d.uncaptured_changes > 0 {
                why.push(format!(
                    "{name} has {} local changes not captured yet",
                    d.uncaptured_changes
                ));
            }
            if d.unpublished_batches > 0 {
                why.push(format!(
                    "{name} has {} batches not published yet",
                    d.unpublished_batches
                ));
            }
        }
        if self.position != other.position {
            why.push(format!(
                "{} applied the stream up to {}, {} up to {}",
                names.0, self.position, names.1, other.position
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// One row's key (as an SQL literal) and hash, hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHash {
    /// The key, as SQL literals: `(1)`, `('a', 2)`.
    pub key: String,
    /// The row's hash (key, version, content), hex.
    pub hash: String,
}

/// The digest of every replicated table (or only `only`), in one read transaction.
pub fn data_digest(c: &mut Connection, only: Option<&str>) -> rusqlite::Result<DataDigest> {
    let tx = c.transaction()?;
    let tables = discover(&tx)?.tables;
    let mut out = header(&tx, &tables)?;
    for t in tables.iter().filter(|t| only.is_none_or(|o| o == t.name)) {
        let mut sum = 0u128;
        let mut rows = 0u64;
        each_row(&tx, t, |_, _, h| {
            sum = sum.wrapping_add(h);
            rows += 1;
        })?;
        out.tables.insert(
            t.name.clone(),
            TableDigest {
                rows,
                digest: format!("{sum:032x}"),
            },
        );
    }
    tx.finish()?;
    Ok(out)
}

/// The position and what is not on the stream yet, without reading any table: cheap.
pub fn state(c: &mut Connection) -> rusqlite::Result<DataDigest> {
    let tx = c.transaction()?;
    let tables = discover(&tx)?.tables;
    let d = header(&tx, &tables)?;
    tx.finish()?;
    Ok(d)
}

/// The position and what is not on the stream yet (no table digests).
fn header(c: &Connection, tables: &[TableInfo]) -> rusqlite::Result<DataDigest> {
    let mut d = DataDigest {
        position: meta_u64(c, "position")?,
        ..DataDigest::default()
    };
    if table_exists(c, "__marmot__outbox")? {
        d.unpublished_batches = c.query_row(
            "SELECT count(*) FROM (SELECT DISTINCT incarnation, seq FROM \"__marmot__outbox\")",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64;
    }
    for t in tables {
        d.uncaptured_changes += count_if_exists(c, &log_table(&t.name))?;
    }
    d.parked_batches = count_if_exists(c, "__marmot__parked")?;
    Ok(d)
}

/// A table's bucket sums (hex, [`BUCKETS`] of them) with the digest they were read with, or
/// `None` when the table is not replicated here.
pub fn bucket_digests(
    c: &mut Connection,
    table: &str,
) -> rusqlite::Result<Option<(DataDigest, Vec<String>)>> {
    let Some((d, t, tx)) = table_read(c, table)? else {
        return Ok(None);
    };
    let mut sums = vec![0u128; BUCKETS];
    each_row(&tx, &t, |b, _, h| sums[b] = sums[b].wrapping_add(h))?;
    tx.finish()?;
    Ok(Some((
        d,
        sums.iter().map(|s| format!("{s:032x}")).collect(),
    )))
}

/// The keys and row hashes of a table's rows in `buckets`, with the digest they were read
/// with, or `None` when the table is not replicated here.
pub fn key_hashes(
    c: &mut Connection,
    table: &str,
    buckets: &[usize],
) -> rusqlite::Result<Option<(DataDigest, Vec<KeyHash>)>> {
    let Some((d, t, tx)) = table_read(c, table)? else {
        return Ok(None);
    };
    let mut keys = Vec::new();
    each_row(&tx, &t, |b, key, h| {
        if buckets.contains(&b) {
            keys.push(KeyHash {
                key: key(),
                hash: format!("{h:032x}"),
            });
        }
    })?;
    tx.finish()?;
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Some((d, keys)))
}

/// The digest of `table` and the open read transaction it was read in.
fn table_read<'c>(
    c: &'c mut Connection,
    table: &str,
) -> rusqlite::Result<Option<(DataDigest, TableInfo, rusqlite::Transaction<'c>)>> {
    let tx = c.transaction()?;
    let tables = discover(&tx)?.tables;
    let Some(t) = tables.iter().find(|t| t.name == table).cloned() else {
        return Ok(None);
    };
    let d = header(&tx, &tables)?;
    Ok(Some((d, t, tx)))
}

/// Calls `f(bucket, key literal, row hash)` for each live row of `t`.
fn each_row(
    c: &Connection,
    t: &TableInfo,
    mut f: impl FnMut(usize, &dyn Fn() -> String, u128),
) -> rusqlite::Result<()> {
    // Columns by name, so the order columns were added in on each node does not matter.
    let mut cols: Vec<(usize, &str)> = t
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.name.as_str()))
        .collect();
    cols.sort_by_key(|(_, n)| n.to_lowercase());
    let select: Vec<String> = t
        .columns
        .iter()
        .map(|c| format!("t.{}", quote(&c.name)))
        .collect();
    let versioned = table_exists(c, &ver_table(&t.name))?;
    let sql = if versioned {
        format!(
            "SELECT v.stamp, v.node, {} FROM main.{} AS t LEFT JOIN main.{} AS v ON {}",
            select.join(", "),
            quote(&t.name),
            quote(&ver_table(&t.name)),
            key_match(t, "t", "v")
        )
    } else {
        format!(
            "SELECT NULL, NULL, {} FROM main.{} AS t",
            select.join(", "),
            quote(&t.name)
        )
    };
    let mut stmt = c.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let mut key = blake3::Hasher::new();
        for i in 0..t.key_columns {
            feed(&mut key, r.get_ref(2 + i)?);
        }
        let key_hash = key.finalize();
        let mut row = blake3::Hasher::new();
        row.update(t.name.as_bytes());
        row.update(&[0]);
        row.update(key_hash.as_bytes());
        feed(&mut row, r.get_ref(0)?);
        feed(&mut row, r.get_ref(1)?);
        for (i, name) in &cols {
            row.update(name.to_lowercase().as_bytes());
            row.update(&[0]);
            feed(&mut row, r.get_ref(2 + i)?);
        }
        let mut h = [0u8; 16];
        h.copy_from_slice(&row.finalize().as_bytes()[..16]);
        let literal = || {
            marmot_core::value::sql_row_literal(
                (0..t.key_columns).map(|i| crate::from_sql(r.get_ref(2 + i).expect("key column"))),
            )
        };
        f(
            key_hash.as_bytes()[0] as usize,
            &literal,
            u128::from_le_bytes(h),
        );
    }
    Ok(())
}

/// A value with its storage class, unambiguously.
fn feed(h: &mut blake3::Hasher, v: ValueRef<'_>) {
    match v {
        ValueRef::Null => {
            h.update(&[0]);
        }
        ValueRef::Integer(i) => {
            h.update(&[1]);
            h.update(&i.to_le_bytes());
        }
        ValueRef::Real(f) => {
            h.update(&[2]);
            h.update(&f.to_bits().to_le_bytes());
        }
        ValueRef::Text(t) => {
            h.update(&[3]);
            h.update(&(t.len() as u64).to_le_bytes());
            h.update(t);
        }
        ValueRef::Blob(b) => {
            h.update(&[4]);
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        }
    }
}

fn meta_u64(c: &Connection, key: &str) -> rusqlite::Result<u64> {
    if !table_exists(c, "__marmot__meta")? {
        return Ok(0);
    }
    let v: Option<i64> = c
        .query_row(
            "SELECT value FROM \"__marmot__meta\" WHERE key = ?1",
            [key],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.unwrap_or(0) as u64)
}

fn table_exists(c: &Connection, name: &str) -> rusqlite::Result<bool> {
    c.query_row(
        "SELECT count(*) FROM main.sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

fn count_if_exists(c: &Connection, table: &str) -> rusqlite::Result<u64> {
    if !table_exists(c, table)? {
        return Ok(0);
    }
    c.query_row(
        &format!("SELECT count(*) FROM main.{}", quote(table)),
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}
