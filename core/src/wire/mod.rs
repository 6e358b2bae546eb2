//! The message format: how one captured batch travels as one or more stream messages.
//!
//! Every message starts with a header, then a fragment of the batch body:
//!
//! ```text
//! message := format_version:u8 flags:u8 origin:varint incarnation:varint batch_seq:varint
//!            chunk:varint chunks:varint stamp:varint fragment
//! flags   := bit 0: the body is zstd-compressed
//! ```
//!
//! The body (before compression, before splitting into fragments) is a stream of items:
//!
//! ```text
//! body   := item*
//! item   := 0x01 table | 0x02 upsert | 0x03 delete | 0x04 schema | 0x05 versioned
//! table  := name:str columns:varint key_columns:varint column_name:str * columns
//! versioned := stamp:varint node:varint table   (the table's schema version on the sender;
//!              0 0 = this batch's version: the table changed in this batch)
//! upsert := base value * columns        (the row as it is now, key columns first)
//! delete := base value * key_columns    (the key of a row that no longer exists)
//! base   := stamp:varint node:varint    (the version the writer replaced; 0 0 = none)
//! value  := 0x00 | 0x01 zigzag-varint | 0x02 f64-le | 0x03 len:varint bytes | 0x04 len:varint bytes
//!           (NULL, INTEGER, REAL, TEXT as stored, BLOB)
//! str    := len:varint utf-8 bytes
//! schema := kind:u8 name:str table:str old_sql:str new_sql:str   (empty str: absent)
//! kind   := 1 table | 2 index | 3 view | 4 trigger | 5 user_version (sql: the number)
//! ```
//!
//! A schema item is one object's state after a schema change (its `CREATE` statement as
//! SQLite stores it, or absent when dropped) and before it on the sender; schema items come
//! before the rows of their batch. A versioned table item says which schema version of its
//! table the rows were written in (the version of the replicated change that created or last
//! changed it on the sender), so a receiver can tell rows of a table dropped since from rows
//! of the table created again. Tables in the schema every node started from have no version
//! and keep the plain table item. A batch with a schema item or a versioned table item is
//! written with format version 2; any other batch with version 1, which every earlier marmot
//! reads.
//!
//! Rows refer to the table item before them. Every row of a batch carries the batch's one
//! stamp and origin (from the header). Fragments of one batch concatenate, in chunk order,
//! to the body; a body may be split anywhere, even inside a value, so rows of any size fit.
//!
//! A receiver refuses a format version it does not know; it never guesses.

use crate::hlc::{NodeId, Stamp, Version};
use crate::value::ValueRef;
use bytes::{BufMut, Bytes, BytesMut};

/// The newest message format this build writes and reads (3: batches with repair items).
pub const FORMAT_VERSION: u8 = FORMAT_REPAIR;
/// The message format of batches without schema items, which every marmot reads.
pub const FORMAT_ROWS: u8 = 1;
/// The message format of batches with schema items or versioned table items.
pub const FORMAT_SCHEMA: u8 = 2;
/// The message format of batches with repair table items ([`BodyWriter::table_repair`]).
pub const FORMAT_REPAIR: u8 = 3;

const FLAG_COMPRESSED: u8 = 1;
const ITEM_TABLE: u8 = 1;
const ITEM_UPSERT: u8 = 2;
const ITEM_DELETE: u8 = 3;
const ITEM_SCHEMA: u8 = 4;
const ITEM_TABLE_VERSIONED: u8 = 5;
const ITEM_TABLE_REPAIR: u8 = 6;

/// Bodies smaller than this are sent uncompressed: zstd would not pay for itself.
const COMPRESS_MIN_BYTES: usize = 512;

/// A message that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The message was written by a marmot with a message format this build does not know.
    #[error(
        "message format version {found} is not supported by this marmot (it reads versions {FORMAT_ROWS} to {FORMAT_VERSION}); upgrade marmot on this node"
    )]
    UnknownVersion {
        /// The version byte found.
        found: u8,
    },
    /// The message or body ends before its structure does.
    #[error("message is truncated: {0}")]
    Truncated(&'static str),
    /// The bytes do not follow the format.
    #[error("message is malformed: {0}")]
    Malformed(String),
}

/// Identifies one captured batch cluster-wide.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchId {
    /// The node that captured it.
    pub origin: NodeId,
    /// The capturing node's incarnation (changes on every start, never repeats).
    pub incarnation: u64,
    /// The batch's number within the node's history.
    pub seq: u64,
}

impl BatchId {
    /// The JetStream message id (`Nats-Msg-Id`) of one chunk: identical on every retry, and
    /// never reused for other content because the incarnation is part of it.
    pub fn message_id(&self, chunk: u32) -> String {
        format!(
            "m{}-{:x}-{}-{}",
            self.origin, self.incarnation, self.seq, chunk
        )
    }
}

impl std::fmt::Display for BatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{:x}/{}", self.origin, self.incarnation, self.seq)
    }
}

/// The header every message of a batch carries.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The message format it was written with ([`FORMAT_ROWS`] or [`FORMAT_VERSION`]).
    pub format: u8,
    /// Which batch.
    pub batch: BatchId,
    /// This message's chunk index, from 0.
    pub chunk: u32,
    /// How many chunks the batch has (at least 1).
    pub chunks: u32,
    /// The stamp of every row of the batch.
    pub stamp: Stamp,
    /// The body is zstd-compressed.
    pub compressed: bool,
}

impl Header {
    /// The version every row of this batch carries.
    pub fn version(&self) -> Version {
        Version {
            stamp: self.stamp,
            node: self.batch.origin,
        }
    }
}

/// Splits a message into its header and body fragment.
pub fn decode_message(msg: &[u8]) -> Result<(Header, &[u8]), WireError> {
    let mut r = Reader::new(msg);
    let version = r.u8("format version")?;
    if !(FORMAT_ROWS..=FORMAT_VERSION).contains(&version) {
        return Err(WireError::UnknownVersion { found: version });
    }
    let flags = r.u8("flags")?;
    if flags & !FLAG_COMPRESSED != 0 {
        return Err(WireError::Malformed(format!("unknown flags {flags:#x}")));
    }
    let origin = r.varint("origin")?;
    let incarnation = r.varint("incarnation")?;
    let seq = r.varint("batch")?;
    let chunk = r.varint_u32("chunk")?;
    let chunks = r.varint_u32("chunk count")?;
    let stamp = Stamp::from_u64(r.varint("stamp")?);
    if chunks == 0 || chunk >= chunks {
        return Err(WireError::Malformed(format!("chunk {chunk} of {chunks}")));
    }
    let header = Header {
        format: version,
        batch: BatchId {
            origin,
            incarnation,
            seq,
        },
        chunk,
        chunks,
        stamp,
        compressed: flags & FLAG_COMPRESSED != 0,
    };
    Ok((header, r.rest()))
}

/// Encodes one message: `header` followed by an already-prepared payload fragment (used to
/// keep a reassembled batch as one self-contained message).
pub fn encode_message(header: &Header, fragment: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(fragment.len() + 40);
    b.put_u8(header.format);
    b.put_u8(if header.compressed {
        FLAG_COMPRESSED
    } else {
        0
    });
    for v in [
        header.batch.origin,
        header.batch.incarnation,
        header.batch.seq,
        u64::from(header.chunk),
        u64::from(header.chunks),
        header.stamp.as_u64(),
    ] {
        put_varint(&mut b, v);
    }
    b.put_slice(fragment);
    b.freeze()
}

/// Seals a body into messages: compresses it when asked and worthwhile, then splits it into
/// fragments of at most `max_fragment` bytes. `format` is [`BodyWriter::format`].
pub fn seal(
    batch: BatchId,
    stamp: Stamp,
    format: u8,
    body: &[u8],
    compress: bool,
    max_fragment: usize,
) -> Vec<Bytes> {
    let max_fragment = max_fragment.max(64);
    let compressed_body;
    let (payload, compressed) = if compress && body.len() >= COMPRESS_MIN_BYTES {
        // zstd on an in-memory buffer fails only on allocation failure.
        compressed_body = zstd::bulk::compress(body, 1).expect("zstd compression of a buffer");
        if compressed_body.len() < body.len() {
            (&compressed_body[..], true)
        } else {
            (body, false)
        }
    } else {
        (body, false)
    };
    let chunks = payload.len().div_ceil(max_fragment).max(1);
    let chunks_u32 = u32::try_from(chunks).unwrap_or(u32::MAX);
    (0..chunks)
        .map(|i| {
            let start = i * max_fragment;
            let end = (start + max_fragment).min(payload.len());
            let header = Header {
                format,
                batch,
                chunk: i as u32,
                chunks: chunks_u32,
                stamp,
                compressed,
            };
            encode_message(&header, &payload[start..end])
        })
        .collect()
}

/// Largest batch body marmot accepts (uncompressed): a bound, so a crafted message cannot
/// exhaust memory by decompressing into gigabytes.
pub const MAX_BODY_BYTES: u64 = 1 << 30;

/// Turns the concatenated fragments of a batch back into its body.
pub fn unseal(header: &Header, payload: Bytes) -> Result<Bytes, WireError> {
    if !header.compressed {
        return Ok(payload);
    }
    use std::io::Read;
    let decoder = zstd::stream::read::Decoder::new(&payload[..])
        .map_err(|e| WireError::Malformed(format!("zstd: {e}")))?;
    let mut body = Vec::new();
    decoder
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| WireError::Malformed(format!("zstd: {e}")))?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return Err(WireError::Malformed(format!(
            "batch body larger than {MAX_BODY_BYTES} bytes"
        )));
    }
    Ok(Bytes::from(body))
}

/// Builds a batch body.
#[derive(Default)]
pub struct BodyWriter {
    buf: Vec<u8>,
    rows: u64,
    schema_items: u64,
    versioned_tables: u64,
    repair_tables: u64,
}

/// What kind of schema object a schema item describes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    /// A table (ordinary or virtual).
    Table,
    /// An index.
    Index,
    /// A view.
    View,
    /// A trigger.
    Trigger,
    /// `PRAGMA user_version` (its sql is the number, in decimal).
    UserVersion,
}

impl ObjectKind {
    fn code(self) -> u8 {
        match self {
            ObjectKind::Table => 1,
            ObjectKind::Index => 2,
            ObjectKind::View => 3,
            ObjectKind::Trigger => 4,
            ObjectKind::UserVersion => 5,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => ObjectKind::Table,
            2 => ObjectKind::Index,
            3 => ObjectKind::View,
            4 => ObjectKind::Trigger,
            5 => ObjectKind::UserVersion,
            _ => return None,
        })
    }
    /// The `type` of `sqlite_master` (`user_version` for the pragma).
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Table => "table",
            ObjectKind::Index => "index",
            ObjectKind::View => "view",
            ObjectKind::Trigger => "trigger",
            ObjectKind::UserVersion => "user_version",
        }
    }
    /// The kind for a `sqlite_master` type (or `user_version`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "table" => ObjectKind::Table,
            "index" => ObjectKind::Index,
            "view" => ObjectKind::View,
            "trigger" => ObjectKind::Trigger,
            "user_version" => ObjectKind::UserVersion,
            _ => return None,
        })
    }
}

/// One schema object's change, as a body carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaItem<'a> {
    /// What kind of object.
    pub kind: ObjectKind,
    /// Its name (empty for `user_version`).
    pub name: &'a str,
    /// The table it belongs to (its own name for a table or view).
    pub table: &'a str,
    /// The object as the sender had it before (None: it did not exist).
    pub old_sql: Option<&'a str>,
    /// The object as it is now (None: dropped).
    pub new_sql: Option<&'a str>,
}

impl BodyWriter {
    /// A schema change; schema items go before every row.
    pub fn schema(&mut self, item: &SchemaItem<'_>) {
        self.schema_items += 1;
        self.buf.push(ITEM_SCHEMA);
        self.buf.push(item.kind.code());
        put_str(&mut self.buf, item.name);
        put_str(&mut self.buf, item.table);
        put_str(&mut self.buf, item.old_sql.unwrap_or(""));
        put_str(&mut self.buf, item.new_sql.unwrap_or(""));
    }

    /// How many schema items were written.
    pub fn schema_items(&self) -> u64 {
        self.schema_items
    }

    /// The message format this body needs: [`FORMAT_REPAIR`] with repair table items,
    /// [`FORMAT_SCHEMA`] with schema items or versioned table items, else [`FORMAT_ROWS`].
    pub fn format(&self) -> u8 {
        if self.repair_tables > 0 {
            FORMAT_REPAIR
        } else if self.schema_items > 0 || self.versioned_tables > 0 {
            FORMAT_SCHEMA
        } else {
            FORMAT_ROWS
        }
    }

    /// Starts the rows of a table. `columns` lists key columns first.
    pub fn table(&mut self, name: &str, columns: &[String], key_columns: usize) {
        self.buf.push(ITEM_TABLE);
        self.table_rest(name, columns, key_columns);
    }

    /// Starts the rows of a table whose schema version on the sender is `version`.
    pub fn table_versioned(
        &mut self,
        name: &str,
        columns: &[String],
        key_columns: usize,
        version: TableVersion,
    ) {
        self.versioned_tables += 1;
        self.buf.push(ITEM_TABLE_VERSIONED);
        self.table_version(version);
        self.table_rest(name, columns, key_columns);
    }

    /// A table whose following rows are a repair: each row as the sender holds it, at the
    /// version it has there (its `base`), for receivers whose row has exactly that version
    /// (the same write) but lost values of it (see [`TableDef::repair`]). Needs
    /// [`FORMAT_REPAIR`]. `version`: the table's schema version, as a versioned table item
    /// carries it (`None`: the schema every node started from).
    pub fn table_repair(
        &mut self,
        name: &str,
        columns: &[String],
        key_columns: usize,
        version: Option<TableVersion>,
    ) {
        self.repair_tables += 1;
        self.buf.push(ITEM_TABLE_REPAIR);
        match version {
            Some(v) => {
                self.buf.push(1);
                self.table_version(v);
            }
            None => self.buf.push(0),
        }
        self.table_rest(name, columns, key_columns);
    }

    fn table_version(&mut self, version: TableVersion) {
        let (s, n) = match version {
            TableVersion::ThisBatch => (0, 0),
            TableVersion::At(v) => (v.stamp.as_u64(), v.node),
        };
        put_varint(&mut self.buf, s);
        put_varint(&mut self.buf, n);
    }

    fn table_rest(&mut self, name: &str, columns: &[String], key_columns: usize) {
        put_str(&mut self.buf, name);
        put_varint(&mut self.buf, columns.len() as u64);
        put_varint(&mut self.buf, key_columns as u64);
        for c in columns {
            put_str(&mut self.buf, c);
        }
    }

    /// A row that exists: all its values, in the table item's column order.
    pub fn upsert<'a>(
        &mut self,
        base: Option<Version>,
        values: impl IntoIterator<Item = ValueRef<'a>>,
    ) {
        self.buf.push(ITEM_UPSERT);
        self.row(base, values);
    }

    /// A row that no longer exists: its key values.
    pub fn delete<'a>(
        &mut self,
        base: Option<Version>,
        key: impl IntoIterator<Item = ValueRef<'a>>,
    ) {
        self.buf.push(ITEM_DELETE);
        self.row(base, key);
    }

    fn row<'a>(&mut self, base: Option<Version>, values: impl IntoIterator<Item = ValueRef<'a>>) {
        self.rows += 1;
        let (s, n) = base.map_or((0, 0), |b| (b.stamp.as_u64(), b.node));
        put_varint(&mut self.buf, s);
        put_varint(&mut self.buf, n);
        for v in values {
            put_value(&mut self.buf, v);
        }
    }

    /// How many rows were written.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The body so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// The schema version of a table on the sender, as a versioned table item carries it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TableVersion {
    /// The table changed in this very batch: its version is the batch's.
    ThisBatch,
    /// The version of the replicated change that created or last changed it.
    At(Version),
}

/// A table item of a body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableDef<'a> {
    /// Table name.
    pub name: &'a str,
    /// Column names, key columns first.
    pub columns: Vec<&'a str>,
    /// How many of `columns` form the primary key.
    pub key_columns: usize,
    /// The table's schema version on the sender (`None`: the schema every node started
    /// from, or a sender that does not say).
    pub schema_version: Option<TableVersion>,
    /// The rows that follow are a repair, not writes: each applies only where the
    /// receiver's row has exactly the version the row names as its `base` (the same write),
    /// giving it the values that write carried; it changes no version, records no conflict,
    /// and cannot overwrite a newer write. A node whose own DDL removed values that a
    /// concurrent, winning schema change brings back gets them so (see
    /// `docs/schema-replication.md`).
    pub repair: bool,
}

impl TableDef<'_> {
    /// The table's schema version on the sender, in a batch of version `batch`.
    pub fn schema_version_in(&self, batch: Version) -> Option<Version> {
        self.schema_version.map(|v| match v {
            TableVersion::ThisBatch => batch,
            TableVersion::At(v) => v,
        })
    }
}

/// One item read from a body.
#[derive(Debug)]
pub enum Item<'a> {
    /// A schema change (before any row of the batch).
    Schema(SchemaItem<'a>),
    /// Following rows belong to this table.
    Table(TableDef<'a>),
    /// A row write; its values are in the caller's buffer.
    Upsert {
        /// The version the writer replaced.
        base: Option<Version>,
    },
    /// A row delete; its key values are in the caller's buffer.
    Delete {
        /// The version the writer replaced.
        base: Option<Version>,
    },
}

/// Reads a body item by item without copying values.
pub struct BodyReader<'a> {
    r: Reader<'a>,
    columns: usize,
    key_columns: usize,
}

impl<'a> BodyReader<'a> {
    /// Reads `body`.
    pub fn new(body: &'a [u8]) -> Self {
        BodyReader {
            r: Reader::new(body),
            columns: 0,
            key_columns: 0,
        }
    }

    /// The next item, or `None` at the end. Row values go to `values` (cleared first).
    pub fn next_item(
        &mut self,
        values: &mut Vec<ValueRef<'a>>,
    ) -> Result<Option<Item<'a>>, WireError> {
        values.clear();
        if self.r.is_empty() {
            return Ok(None);
        }
        match self.r.u8("item")? {
            kind @ (ITEM_TABLE | ITEM_TABLE_VERSIONED | ITEM_TABLE_REPAIR) => {
                let versioned = match kind {
                    ITEM_TABLE => false,
                    ITEM_TABLE_VERSIONED => true,
                    _ => self.r.u8("repair table version flag")? != 0,
                };
                let schema_version = if versioned {
                    let stamp = self.r.varint("table version stamp")?;
                    let node = self.r.varint("table version node")?;
                    Some(if stamp == 0 && node == 0 {
                        TableVersion::ThisBatch
                    } else {
                        TableVersion::At(Version {
                            stamp: Stamp::from_u64(stamp),
                            node,
                        })
                    })
                } else {
                    None
                };
                let name = self.r.str("table name")?;
                let columns = self.r.varint_usize("column count")?;
                let key_columns = self.r.varint_usize("key column count")?;
                if key_columns == 0 || key_columns > columns {
                    return Err(WireError::Malformed(format!(
                        "table {name:?}: {key_columns} key columns of {columns}"
                    )));
                }
                let mut names = Vec::with_capacity(columns.min(4096));
                for _ in 0..columns {
                    names.push(self.r.str("column name")?);
                }
                self.columns = columns;
                self.key_columns = key_columns;
                Ok(Some(Item::Table(TableDef {
                    name,
                    columns: names,
                    key_columns,
                    schema_version,
                    repair: kind == ITEM_TABLE_REPAIR,
                })))
            }
            op @ (ITEM_UPSERT | ITEM_DELETE) => {
                if self.columns == 0 {
                    return Err(WireError::Malformed("row before any table".into()));
                }
                let stamp = self.r.varint("base stamp")?;
                let node = self.r.varint("base node")?;
                let base = (stamp != 0 || node != 0).then(|| Version {
                    stamp: Stamp::from_u64(stamp),
                    node,
                });
                let n = if op == ITEM_UPSERT {
                    self.columns
                } else {
                    self.key_columns
                };
                for _ in 0..n {
                    values.push(self.r.value()?);
                }
                Ok(Some(if op == ITEM_UPSERT {
                    Item::Upsert { base }
                } else {
                    Item::Delete { base }
                }))
            }
            ITEM_SCHEMA => {
                let code = self.r.u8("schema kind")?;
                let kind = ObjectKind::from_code(code).ok_or_else(|| {
                    WireError::Malformed(format!("unknown schema object kind {code}"))
                })?;
                let name = self.r.str("schema object name")?;
                let table = self.r.str("schema object table")?;
                let old = self.r.str("schema object old sql")?;
                let new = self.r.str("schema object sql")?;
                let opt = |s: &'a str| (!s.is_empty()).then_some(s);
                Ok(Some(Item::Schema(SchemaItem {
                    kind,
                    name,
                    table,
                    old_sql: opt(old),
                    new_sql: opt(new),
                })))
            }
            other => Err(WireError::Malformed(format!("unknown item {other:#x}"))),
        }
    }
}

fn put_varint(b: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        b.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    put_varint(b, s.len() as u64);
    b.extend_from_slice(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: ValueRef<'_>) {
    match v {
        ValueRef::Null => b.push(0),
        ValueRef::Integer(i) => {
            b.push(1);
            put_varint(b, ((i << 1) ^ (i >> 63)) as u64);
        }
        ValueRef::Real(r) => {
            b.push(2);
            b.extend_from_slice(&r.to_bits().to_le_bytes());
        }
        ValueRef::Text(t) => {
            b.push(3);
            put_varint(b, t.len() as u64);
            b.extend_from_slice(t);
        }
        ValueRef::Blob(x) => {
            b.push(4);
            put_varint(b, x.len() as u64);
            b.extend_from_slice(x);
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn rest(self) -> &'a [u8] {
        self.buf
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        let (&b, rest) = self.buf.split_first().ok_or(WireError::Truncated(what))?;
        self.buf = rest;
        Ok(b)
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (a, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(a)
    }
    fn varint(&mut self, what: &'static str) -> Result<u64, WireError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WireError::Malformed(format!("{what}: varint too long")))
    }
    fn varint_u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        u32::try_from(self.varint(what)?)
            .map_err(|_| WireError::Malformed(format!("{what} out of range")))
    }
    fn varint_usize(&mut self, what: &'static str) -> Result<usize, WireError> {
        let v = self.varint(what)?;
        // A count can never exceed the bytes left: this keeps allocations bounded by input.
        if v > self.buf.len() as u64 + 1 {
            return Err(WireError::Malformed(format!(
                "{what} {v} exceeds the message"
            )));
        }
        Ok(v as usize)
    }
    fn str(&mut self, what: &'static str) -> Result<&'a str, WireError> {
        let n = self.varint_usize(what)?;
        let bytes = self.take(n, what)?;
        std::str::from_utf8(bytes).map_err(|_| WireError::Malformed(format!("{what} is not UTF-8")))
    }
    fn value(&mut self) -> Result<ValueRef<'a>, WireError> {
        Ok(match self.u8("value")? {
            0 => ValueRef::Null,
            1 => {
                let z = self.varint("integer")?;
                ValueRef::Integer(((z >> 1) as i64) ^ -((z & 1) as i64))
            }
            2 => {
                let b = self.take(8, "real")?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                ValueRef::Real(f64::from_bits(u64::from_le_bytes(a)))
            }
            3 => {
                let n = self.varint_usize("text length")?;
                ValueRef::Text(self.take(n, "text")?)
            }
            4 => {
                let n = self.varint_usize("blob length")?;
                ValueRef::Blob(self.take(n, "blob")?)
            }
            t => return Err(WireError::Malformed(format!("unknown value tag {t:#x}"))),
        })
    }
}

#[cfg(test)]
mod tests;
