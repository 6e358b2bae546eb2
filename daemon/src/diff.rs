//! Convergence digests ([`marmot_sqlite::digest`]): each node answers digest requests by NATS
//! request and reply, exposes its digests as metrics, and `marmot diff` compares the nodes.
//!
//! Two nodes' digests compare only when both applied the same stream position and hold
//! nothing of their own the stream does not carry yet (changes not captured, batches not
//! published): then replication promises they hold the same rows, and any difference is a
//! divergence. `marmot diff` asks again until that holds or its wait runs out, and then says
//! why it could not compare. A difference is narrowed down to keys through the per-table
//! bucket sums, so rows are never sent whole.

use crate::config::Settings;
use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use marmot_nats::NatsTransport;
use marmot_sqlite::digest::{self, DataDigest, KeyHash};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most keys one answer lists.
const MAX_KEYS: usize = 10_000;

/// Most bytes of keys one answer carries (an answer must fit in a NATS message, 1 MiB by
/// default).
const MAX_KEY_BYTES: usize = 512 * 1024;

/// Requests answered at once (each reads whole tables).
const CONCURRENT_ANSWERS: usize = 2;

/// How long `marmot diff` waits for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the digest metrics are recomputed, when the data changed.
pub const METRICS_EVERY: Duration = Duration::from_secs(30);

/// What a node is asked.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Query {
    /// The position and what is not on the stream yet, without any table: cheap.
    State,
    /// Every replicated table's digest.
    Digest,
    /// A table's bucket sums.
    Buckets {
        /// The table.
        table: String,
    },
    /// The keys and row hashes of a table's rows in some buckets.
    Keys {
        /// The table.
        table: String,
        /// Which buckets.
        buckets: Vec<usize>,
    },
}

/// A node's answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    /// The digest (for `Buckets` and `Keys`: without tables, read with them).
    #[serde(default)]
    pub digest: Option<DataDigest>,
    /// Bucket sums.
    #[serde(default)]
    pub buckets: Option<Vec<String>>,
    /// Keys.
    #[serde(default)]
    pub keys: Option<Vec<KeyHash>>,
    /// More keys than an answer lists.
    #[serde(default)]
    pub truncated: bool,
    /// Why the question could not be answered.
    #[serde(default)]
    pub error: Option<String>,
}

fn answer(db: &std::path::Path, busy: Duration, q: &Query) -> anyhow::Result<Answer> {
    let mut c = marmot_sqlite::open_connection(db, busy)?;
    let missing = |t: &str| format!("table {t:?} is not replicated on this node");
    Ok(match q {
        Query::State => Answer {
            digest: Some(digest::state(&mut c)?),
            ..Answer::default()
        },
        Query::Digest => Answer {
            digest: Some(digest::data_digest(&mut c, None)?),
            ..Answer::default()
        },
        Query::Buckets { table } => match digest::bucket_digests(&mut c, table)? {
            Some((d, b)) => Answer {
                digest: Some(d),
                buckets: Some(b),
                ..Answer::default()
            },
            None => Answer {
                error: Some(missing(table)),
                ..Answer::default()
            },
        },
        Query::Keys { table, buckets } => match digest::key_hashes(&mut c, table, buckets)? {
            Some((d, mut k)) => {
                let mut bytes = 0;
                let fit = k
                    .iter()
                    .take(MAX_KEYS)
                    .take_while(|x| {
                        bytes += x.key.len() + x.hash.len() + 32;
                        bytes <= MAX_KEY_BYTES
                    })
                    .count();
                let truncated = k.len() > fit;
                k.truncate(fit);
                Answer {
                    digest: Some(d),
                    keys: Some(k),
                    truncated,
                    ..Answer::default()
                }
            }
            None => Answer {
                error: Some(missing(table)),
                ..Answer::default()
            },
        },
    })
}

/// Answers digest requests, and keeps the digest metrics, while the daemon runs.
pub fn spawn(transport: Arc<NatsTransport>, db: PathBuf, busy: Duration, prefix: String) {
    let (t, d) = (transport.clone(), db.clone());
    tokio::spawn(async move {
        let mut requests = match t.serve_digests().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot answer `marmot diff`: subscribing failed");
                return;
            }
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_ANSWERS));
        while let Some(r) = requests.next().await {
            let (t, d) = (t.clone(), d.clone());
            let permits = permits.clone();
            tokio::spawn(async move {
                let _permit = permits.acquire().await;
                let a = match serde_json::from_slice::<Query>(&r.payload) {
                    Ok(q) => tokio::task::spawn_blocking(move || answer(&d, busy, &q))
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|a| a)
                        .unwrap_or_else(|e| Answer {
                            error: Some(format!("{e:#}")),
                            ..Answer::default()
                        }),
                    Err(e) => Answer {
                        error: Some(format!("not a digest request: {e}")),
                        ..Answer::default()
                    },
                };
                let body = serde_json::to_vec(&a).unwrap_or_default();
                if let Err(e) = t.answer(r, Bytes::from(body)).await {
                    tracing::debug!(error = %e, "could not answer a digest request");
                }
            });
        }
    });
    tokio::spawn(metrics_loop(db, busy, prefix));
}

/// Per table: its digest's low 48 bits (exact in a Prometheus sample) and its rows, with the
/// stream position they were read at; recomputed every [`METRICS_EVERY`] when the data changed.
async fn metrics_loop(db: PathBuf, busy: Duration, prefix: String) {
    let (dg, rows, pos) = (
        format!("{prefix}_table_digest"),
        format!("{prefix}_table_rows"),
        format!("{prefix}_digest_position"),
    );
    metrics::describe_gauge!(
        dg.clone(),
        "Low 48 bits of the table's convergence digest (keys, versions and content of its live rows), read at marmot_digest_position: equal on nodes that hold the same rows (48-bit number)"
    );
    metrics::describe_gauge!(
        rows.clone(),
        "Live rows of the table when its digest was read (rows)"
    );
    metrics::describe_gauge!(
        pos.clone(),
        "Stream position applied when the table digests were read (stream sequence)"
    );
    let mut last: Option<(i64, u64)> = None;
    let mut conn = None;
    loop {
        let db = db.clone();
        let seen = last;
        let prev = conn.take();
        let r = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut c = match prev {
                Some(c) => c,
                None => {
                    let c = marmot_sqlite::open_connection(&db, busy)?;
                    // It reads every table now and then: a small page cache is enough.
                    c.execute_batch("PRAGMA cache_size = -512")?;
                    c
                }
            };
            let version: i64 = c.query_row("PRAGMA data_version", [], |r| r.get(0))?;
            let position = digest::data_digest(&mut c, Some("\u{0}none"))?.position;
            if seen == Some((version, position)) {
                return Ok((c, None));
            }
            let d = digest::data_digest(&mut c, None)?;
            Ok((c, Some(((version, position), d))))
        })
        .await;
        match r {
            Ok(Ok((c, update))) => {
                conn = Some(c);
                if let Some((key, d)) = update {
                    last = Some(key);
                    metrics::gauge!(pos.clone()).set(d.position as f64);
                    for (table, t) in &d.tables {
                        metrics::gauge!(dg.clone(), "table" => table.clone())
                            .set(t.digest48() as f64);
                        metrics::gauge!(rows.clone(), "table" => table.clone()).set(t.rows as f64);
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %format!("{e:#}"), "digest metrics not read"),
            Err(_) => {}
        }
        tokio::time::sleep(METRICS_EVERY).await;
    }
}

/// What `marmot diff` compares.
#[derive(Clone, Debug, Default)]
pub struct DiffOptions {
    /// Which nodes (empty: every live node).
    pub nodes: Vec<u64>,
    /// Only this table.
    pub table: Option<String>,
    /// Name the keys that differ.
    pub keys: bool,
    /// Ask again for this long until the nodes can be compared.
    pub wait: Duration,
    /// JSON instead of text.
    pub json: bool,
}

async fn ask(t: &NatsTransport, node: u64, q: &Query) -> anyhow::Result<Answer> {
    let body = Bytes::from(serde_json::to_vec(q)?);
    let raw = t
        .ask_digest(node, body, ANSWER_TIMEOUT)
        .await
        .with_context(|| format!("asking node {node} for its digests (is its daemon running?)"))?;
    let a: Answer =
        serde_json::from_slice(&raw).with_context(|| format!("reading node {node}'s answer"))?;
    if let Some(e) = &a.error {
        anyhow::bail!("node {node}: {e}");
    }
    Ok(a)
}

/// Why the nodes' states (position, what is not on the stream yet) cannot be compared at
/// stream head `head` (None: they can): every node must have applied the whole stream, so a
/// node's own batch the stream acknowledged but it has not applied yet is not counted twice.
fn not_comparable(states: &[DataDigest], nodes: &[u64], head: u64) -> Option<String> {
    let mut why: Vec<String> = states
        .iter()
        .zip(nodes)
        .skip(1)
        .filter_map(|(d, n)| {
            states[0].comparable(d, (&format!("node {}", nodes[0]), &format!("node {n}")))
        })
        .collect();
    for (d, n) in states.iter().zip(nodes) {
        if d.position != head {
            why.push(format!(
                "node {n} applied the stream up to {}, its head is {head}",
                d.position
            ));
        }
    }
    why.dedup();
    (!why.is_empty()).then(|| why.join("; "))
}

/// Digests of every node, once they can be compared (or why they cannot, at the deadline).
/// The wait asks only for the nodes' states (cheap); the digests are read once they agree,
/// and taken only if the states they were read with still agree.
async fn comparable_digests(
    t: &NatsTransport,
    nodes: &[u64],
    wait: Duration,
) -> anyhow::Result<Result<Vec<DataDigest>, String>> {
    use marmot_core::ports::Transport;
    let deadline = Instant::now() + wait;
    let head = || async {
        t.prepare()
            .await
            .map(|b| b.last_seq)
            .context("reading the stream's head")
    };
    loop {
        let h = head().await?;
        let mut states = Vec::new();
        for &n in nodes {
            states.push(ask(t, n, &Query::State).await?.digest.unwrap_or_default());
        }
        let mut why = not_comparable(&states, nodes, h);
        if why.is_none() {
            let mut ds = Vec::new();
            for &n in nodes {
                ds.push(ask(t, n, &Query::Digest).await?.digest.unwrap_or_default());
            }
            why = not_comparable(&ds, nodes, head().await?);
            if why.is_none() {
                return Ok(Ok(ds));
            }
        }
        if Instant::now() >= deadline {
            return Ok(Err(why.unwrap_or_default()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A key that differs between the first node and another.
#[derive(Clone, Debug, Serialize)]
struct KeyDifference {
    key: String,
    /// "only on node A", "only on node B" or "differs".
    state: String,
}

/// The keys of `table` that differ between nodes `a` and `b` (None: the data changed while
/// they were compared).
async fn key_differences(
    t: &NatsTransport,
    table: &str,
    (a, b): (u64, u64),
    at: &DataDigest,
) -> anyhow::Result<Option<(Vec<KeyDifference>, bool)>> {
    let same_state = |d: &Option<DataDigest>| {
        d.as_ref().is_some_and(|d| {
            d.position == at.position && d.unpublished_batches == 0 && d.uncaptured_changes == 0
        })
    };
    let q = Query::Buckets {
        table: table.to_string(),
    };
    let (ba, bb) = (ask(t, a, &q).await?, ask(t, b, &q).await?);
    if !same_state(&ba.digest) || !same_state(&bb.digest) {
        return Ok(None);
    }
    let (sa, sb) = (
        ba.buckets.unwrap_or_default(),
        bb.buckets.unwrap_or_default(),
    );
    let buckets: Vec<usize> = (0..digest::BUCKETS)
        .filter(|&i| sa.get(i) != sb.get(i))
        .collect();
    if buckets.is_empty() {
        return Ok(Some((Vec::new(), false)));
    }
    let q = Query::Keys {
        table: table.to_string(),
        buckets,
    };
    let (ka, kb) = (ask(t, a, &q).await?, ask(t, b, &q).await?);
    if !same_state(&ka.digest) || !same_state(&kb.digest) {
        return Ok(None);
    }
    let truncated = ka.truncated || kb.truncated;
    // A truncated list holds the smallest keys: compare only up to the last key both lists
    // hold for certain.
    let limit = [&ka, &kb]
        .iter()
        .filter(|a| a.truncated)
        .filter_map(|a| {
            a.keys
                .as_ref()
                .and_then(|k| k.last())
                .map(|k| k.key.clone())
        })
        .min();
    let hashes = |a: Answer| -> BTreeMap<String, String> {
        a.keys
            .unwrap_or_default()
            .into_iter()
            .filter(|k| limit.as_ref().is_none_or(|l| k.key <= *l))
            .map(|k| (k.key, k.hash))
            .collect()
    };
    let (ma, mb) = (hashes(ka), hashes(kb));
    let all: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    let mut out = Vec::new();
    for k in all {
        let state = match (ma.get(k), mb.get(k)) {
            (Some(x), Some(y)) if x == y => continue,
            (Some(_), Some(_)) => "differs".to_string(),
            (Some(_), None) => format!("only on node {a}"),
            (None, _) => format!("only on node {b}"),
        };
        out.push(KeyDifference {
            key: k.clone(),
            state,
        });
    }
    Ok(Some((out, truncated)))
}

/// `marmot diff`: exit status 0 when the nodes hold the same rows, 1 when they differ, 2 when
/// they could not be compared (positions never met, or writes not yet on the stream).
pub fn diff(s: &Settings, o: &DiffOptions) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(run_diff(s, o)) {
        Ok(code) => Ok(code),
        Err(e) => {
            // Not "they differ" (1): the nodes could not be compared.
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

async fn run_diff(s: &Settings, o: &DiffOptions) -> anyhow::Result<ExitCode> {
    {
        let mut cfg = crate::snapshots::command_nats(s)?;
        cfg.client_name = format!("marmot-cli-{}", s.node_id);
        let t = NatsTransport::connect(cfg).await?;
        t.wait_connected(crate::cluster::COMMAND_CONNECT).await?;
        let mut nodes = o.nodes.clone();
        if nodes.is_empty() {
            nodes = t
                .live_nodes()
                .await
                .context("reading the live nodes from NATS")?
                .into_iter()
                .filter(|n| n.info.is_some())
                .map(|n| n.node)
                .collect();
        }
        nodes.sort_unstable();
        nodes.dedup();
        if nodes.len() < 2 {
            anyhow::bail!(
                "marmot diff compares two nodes or more; found {}: {nodes:?} (name them with --nodes 1,2)",
                nodes.len()
            );
        }
        for _attempt in 0..5 {
            let ds = match comparable_digests(&t, &nodes, o.wait).await? {
                Ok(ds) => ds,
                Err(why) => {
                    if o.json {
                        println!(
                            "{}",
                            serde_json::json!({ "nodes": nodes, "comparable": false, "reason": why })
                        );
                    } else {
                        println!("cannot compare yet: {why}");
                    }
                    return Ok(ExitCode::from(2));
                }
            };
            let first = &ds[0];
            let parked: BTreeMap<String, u64> = ds
                .iter()
                .zip(&nodes)
                .filter(|(d, _)| d.parked_batches > 0)
                .map(|(d, n)| (n.to_string(), d.parked_batches))
                .collect();
            let mut tables = Vec::new();
            let mut changed = false;
            'nodes: for (d, &n) in ds.iter().zip(&nodes).skip(1) {
                let names: BTreeSet<&String> = first.tables.keys().chain(d.tables.keys()).collect();
                for name in names {
                    if o.table.as_ref().is_some_and(|t| t != name) {
                        continue;
                    }
                    let (x, y) = (first.tables.get(name), d.tables.get(name));
                    if x == y {
                        continue;
                    }
                    let mut entry = serde_json::json!({
                        "table": name,
                        "node": n,
                        "rows": { nodes[0].to_string(): x.map(|x| x.rows), n.to_string(): y.map(|y| y.rows) },
                    });
                    if o.keys && x.is_some() && y.is_some() {
                        match key_differences(&t, name, (nodes[0], n), first).await? {
                            None => {
                                changed = true;
                                break 'nodes;
                            }
                            Some((keys, truncated)) => {
                                entry["keys"] = serde_json::to_value(&keys)?;
                                entry["keys_truncated"] = truncated.into();
                            }
                        }
                    }
                    tables.push(entry);
                }
            }
            if changed {
                continue;
            }
            if o.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "nodes": nodes,
                        "comparable": true,
                        "position": first.position,
                        "same": tables.is_empty(),
                        "differences": tables,
                        "parked_batches": parked,
                    })
                );
            } else {
                println!(
                    "compared nodes {} at stream position {}",
                    nodes
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    first.position
                );
                if tables.is_empty() {
                    println!("no differences");
                }
                for (n, k) in &parked {
                    println!(
                        "note: node {n} has {k} parked batches, whose rows it lacks (see `marmot parked list` there)"
                    );
                }
                for e in &tables {
                    let rows = |k: u64| {
                        e["rows"][k.to_string()]
                            .as_u64()
                            .map_or("no such table".to_string(), |r| format!("{r} rows"))
                    };
                    let n = e["node"].as_u64().unwrap_or(0);
                    println!(
                        "{}: node {n} differs from node {} ({} / {})",
                        e["table"].as_str().unwrap_or(""),
                        nodes[0],
                        rows(nodes[0]),
                        rows(n)
                    );
                    for k in e["keys"].as_array().into_iter().flatten() {
                        println!(
                            "  {}: {}",
                            k["key"].as_str().unwrap_or(""),
                            k["state"].as_str().unwrap_or("")
                        );
                    }
                    if e["keys_truncated"].as_bool() == Some(true) {
                        println!(
                            "  (more keys differ than one answer lists: narrow it down with --table)"
                        );
                    }
                }
            }
            return Ok(if tables.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        println!("cannot compare: the nodes' data kept changing while their keys were compared");
        Ok(ExitCode::from(2))
    }
}
