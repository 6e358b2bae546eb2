//! `marmot tail`: the changes on the stream as JSON lines, decoded with the core's wire
//! format, so that other systems can be fed without a decoder of their own.
//!
//! One line per row change and per schema change, in stream order (a batch's lines appear
//! once its last chunk arrives). Values keep their SQLite storage class and bytes exactly:
//! NULL is `null`, INTEGER a JSON integer, REAL a JSON number always written with a `.` or
//! an exponent (`1.0`, never `1`; infinities as `{"real": "inf"}` / `"-inf"`), TEXT that is
//! valid UTF-8 a JSON string, other TEXT `{"text_base64": ...}`, and BLOB
//! `{"blob_base64": ...}` (standard base64 with padding).

use crate::config::Settings;
use anyhow::Context;
use futures::StreamExt;
use marmot_core::ports::Transport;
use marmot_core::value::ValueRef;
use marmot_core::wire::{self, BatchId, Header, Item};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

/// Where to start and when to stop.
#[derive(Clone, Copy, Debug)]
pub struct TailOptions {
    /// First stream sequence to read (None: only what arrives from now on).
    pub from: Option<u64>,
    /// Stop after this many lines.
    pub count: Option<u64>,
    /// Stop once the messages the stream held at the start are printed.
    pub to_end: bool,
}

/// A value as JSON, losslessly (see the module documentation).
pub fn value_json(v: ValueRef<'_>) -> Value {
    use data_encoding::BASE64;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => json!(i),
        ValueRef::Real(r) if r.is_finite() => {
            // serde_json writes finite floats so that they read back bit for bit, and with a
            // `.` or an exponent, so a REAL never reads back as an INTEGER.
            json!(r)
        }
        ValueRef::Real(r) => {
            json!({ "real": if r.is_nan() { "nan" } else if r > 0.0 { "inf" } else { "-inf" } })
        }
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => json!(s),
            Err(_) => json!({ "text_base64": BASE64.encode(t) }),
        },
        ValueRef::Blob(b) => json!({ "blob_base64": BASE64.encode(b) }),
    }
}

/// Chunks of batches not yet complete.
#[derive(Default)]
struct Assembler {
    partial: HashMap<BatchId, Vec<Option<bytes::Bytes>>>,
}

impl Assembler {
    /// Adds a message; returns the batch's header and body once every chunk is in.
    fn add(&mut self, payload: &[u8]) -> anyhow::Result<Option<(Header, bytes::Bytes)>> {
        let (header, fragment) = wire::decode_message(payload)?;
        let fragment = bytes::Bytes::copy_from_slice(fragment);
        let payload = if header.chunks <= 1 {
            fragment
        } else {
            let chunks = self
                .partial
                .entry(header.batch)
                .or_insert_with(|| vec![None; header.chunks as usize]);
            if let Some(slot) = chunks.get_mut(header.chunk as usize) {
                *slot = Some(fragment);
            }
            if chunks.iter().any(Option::is_none) {
                return Ok(None);
            }
            let chunks = self.partial.remove(&header.batch).unwrap_or_default();
            let mut all = Vec::new();
            for c in chunks.into_iter().flatten() {
                all.extend_from_slice(&c);
            }
            bytes::Bytes::from(all)
        };
        Ok(Some((header, wire::unseal(&header, payload)?)))
    }
}

/// The JSON lines of one complete batch.
pub fn batch_lines(
    seq: u64,
    published_ms: u64,
    header: &Header,
    body: &[u8],
) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let common = |m: &mut Map<String, Value>| {
        m.insert("seq".into(), json!(seq));
        m.insert("batch".into(), json!(header.batch.to_string()));
        m.insert("origin".into(), json!(header.batch.origin));
        m.insert("stamp".into(), json!(header.stamp.as_u64()));
        m.insert("time_ms".into(), json!(header.stamp.wall_ms()));
        m.insert("published_ms".into(), json!(published_ms));
    };
    let mut reader = wire::BodyReader::new(body);
    let mut values = Vec::new();
    let mut table: Option<wire::TableDef<'_>> = None;
    while let Some(item) = reader.next_item(&mut values)? {
        let mut m = Map::new();
        common(&mut m);
        match item {
            Item::Schema(s) => {
                m.insert("op".into(), json!("schema"));
                m.insert("kind".into(), json!(s.kind.as_str()));
                m.insert("name".into(), json!(s.name));
                m.insert("table".into(), json!(s.table));
                m.insert("old_sql".into(), json!(s.old_sql));
                m.insert("sql".into(), json!(s.new_sql));
            }
            Item::Table(t) => {
                table = Some(t);
                continue;
            }
            Item::Upsert { base } | Item::Delete { base } => {
                let t = table
                    .as_ref()
                    .context("a row before its table in a batch")?;
                let upsert = matches!(item, Item::Upsert { .. });
                m.insert("table".into(), json!(t.name));
                m.insert(
                    "op".into(),
                    json!(match (upsert, t.repair) {
                        (true, false) => "upsert",
                        (false, false) => "delete",
                        (true, true) => "repair",
                        (false, true) => "repair_delete",
                    }),
                );
                let named = |n: usize| -> Map<String, Value> {
                    t.columns
                        .iter()
                        .zip(values.iter())
                        .take(n)
                        .map(|(c, v)| (c.to_string(), value_json(*v)))
                        .collect()
                };
                m.insert("key".into(), Value::Object(named(t.key_columns)));
                m.insert(
                    "row".into(),
                    if upsert {
                        Value::Object(named(t.columns.len()))
                    } else {
                        Value::Null
                    },
                );
                m.insert(
                    "base".into(),
                    match base {
                        Some(b) => json!({ "stamp": b.stamp.as_u64(), "node": b.node }),
                        None => Value::Null,
                    },
                );
            }
        }
        out.push(Value::Object(m));
    }
    Ok(out)
}

/// Prints the stream's changes as JSON lines on standard output.
pub fn tail(s: &Settings, opts: TailOptions) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut cfg = crate::snapshots::command_nats(s)?;
        cfg.client_name = format!("marmot-tail-{}", s.node_id);
        let t = marmot_nats::NatsTransport::connect(cfg).await?;
        t.wait_connected(crate::cluster::COMMAND_CONNECT).await?;
        let bounds = loop {
            match t.prepare().await {
                Ok(b) => break b,
                Err(e) if e.kind == marmot_core::ports::TransportErrorKind::Unavailable => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => return Err(anyhow::Error::new(e).context("reading the stream")),
            }
        };
        let end = bounds.last_seq;
        if opts.to_end && opts.from.unwrap_or(end + 1) > end {
            return Ok(ExitCode::SUCCESS);
        }
        let from = opts.from.unwrap_or(end + 1).max(1);
        let (_, mut deliveries) = t.subscribe(from).await?;
        let mut assembler = Assembler::default();
        let mut printed = 0u64;
        let stdout = std::io::stdout();
        while let Some(d) = deliveries.next().await {
            let d = d?;
            match assembler.add(&d.payload) {
                Ok(Some((header, body))) => {
                    let lines = match batch_lines(d.stream_seq, d.published_ms, &header, &body) {
                        Ok(lines) => lines,
                        Err(e) => {
                            tracing::warn!(
                                seq = d.stream_seq,
                                "a batch that cannot be read: {e:#}"
                            );
                            Vec::new()
                        }
                    };
                    let mut out = stdout.lock();
                    for line in lines {
                        writeln!(out, "{line}")?;
                        printed += 1;
                        if opts.count.is_some_and(|c| printed >= c) {
                            out.flush()?;
                            return Ok(ExitCode::SUCCESS);
                        }
                    }
                    out.flush()?;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(seq = d.stream_seq, "a message that cannot be read: {e:#}")
                }
            }
            if opts.to_end && d.stream_seq >= end {
                break;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_storage_class_and_bytes() {
        let s = |v| value_json(v).to_string();
        assert_eq!(s(ValueRef::Real(1.0)), "1.0");
        assert_eq!(s(ValueRef::Integer(1)), "1");
        assert_eq!(s(ValueRef::Integer(i64::MIN)), "-9223372036854775808");
        assert_eq!(s(ValueRef::Real(f64::INFINITY)), r#"{"real":"inf"}"#);
        assert_eq!(s(ValueRef::Real(f64::NEG_INFINITY)), r#"{"real":"-inf"}"#);
        assert_eq!(s(ValueRef::Real(f64::NAN)), r#"{"real":"nan"}"#);
        let r = 0.1 + 0.2;
        assert_eq!(
            s(ValueRef::Real(r)).parse::<f64>().unwrap().to_bits(),
            r.to_bits()
        );
        assert_eq!(s(ValueRef::Text(b"a\"b")), r#""a\"b""#);
        assert_eq!(s(ValueRef::Text(b"\xff")), r#"{"text_base64":"/w=="}"#);
        assert_eq!(s(ValueRef::Blob(b"")), r#"{"blob_base64":""}"#);
        assert_eq!(s(ValueRef::Null), "null");
    }

    #[test]
    fn a_batch_split_into_chunks_is_printed_once_whole() {
        let mut w = wire::BodyWriter::default();
        w.table("t", &["id".into(), "v".into()], 1);
        let big = vec![7u8; 5000];
        w.upsert(None, [ValueRef::Integer(1), ValueRef::Blob(&big)]);
        let batch = BatchId {
            origin: 3,
            incarnation: 9,
            seq: 1,
        };
        let stamp = marmot_core::Stamp::from_u64(1 << 20);
        let messages = wire::seal(batch, stamp, w.format(), w.as_bytes(), false, 1000);
        assert!(messages.len() > 2);
        let mut a = Assembler::default();
        for m in &messages[..messages.len() - 1] {
            assert!(a.add(m).unwrap().is_none());
        }
        let (header, body) = a.add(messages.last().unwrap()).unwrap().unwrap();
        let lines = batch_lines(5, 0, &header, &body).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["origin"], 3);
        assert_eq!(lines[0]["key"]["id"], 1);
        assert_eq!(
            data_encoding::BASE64
                .decode(
                    lines[0]["row"]["v"]["blob_base64"]
                        .as_str()
                        .unwrap()
                        .as_bytes()
                )
                .unwrap(),
            big
        );
    }
}
