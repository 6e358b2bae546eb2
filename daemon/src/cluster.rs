//! `marmot status --cluster` and `marmot wait-schema`: what the live nodes advertise beside
//! their node-id claims ([`marmot_nats::NodeInfo`]), read from NATS.

use crate::config::Settings;
use anyhow::Context;
use marmot_core::ports::Transport;
use marmot_nats::{LiveNode, NatsTransport, NodeInfo};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long a command waits to connect to NATS.
pub const COMMAND_CONNECT: Duration = Duration::from_secs(10);

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn connect(s: &Settings) -> anyhow::Result<NatsTransport> {
    let mut cfg = crate::snapshots::command_nats(s)?;
    cfg.client_name = format!("marmot-cli-{}", s.node_id);
    let t = NatsTransport::connect(cfg).await?;
    t.wait_connected(COMMAND_CONNECT).await?;
    Ok(t)
}

/// One node's line: what it advertised, its lag behind the stream's head, up or down.
fn describe_info(
    i: &NodeInfo,
    state: &str,
    owner: Option<&str>,
    head: u64,
    ours: Option<&BTreeMap<String, String>>,
) -> serde_json::Value {
    serde_json::json!({
        "node_id": i.node,
        "state": state,
        "owner": owner,
        "version": i.version,
        "max_format": i.max_format,
        "schema_digest": i.schema_digest,
        // Which replicated objects differ from this node's database (empty: none).
        "schema_difference": ours.map(|o| marmot_sqlite::replicated::schema_difference(
            o,
            &i.schema_objects,
            &format!("node {}", i.node),
        )),
        "position": i.applied_seq,
        "behind_head_messages": head.saturating_sub(i.applied_seq),
        "lag_messages": i.lag_messages,
        "lag_seconds": i.lag_ms as f64 / 1000.0,
        "pending_batches": i.pending_batches,
        "pending_messages": i.pending_messages,
        "parked_batches": i.parked_batches,
        "incomplete_batches": i.incomplete_batches,
        "clock_skew_ms": i.clock_skew_ms,
        "ready": i.ready && state == "up",
        "updated_ms": i.updated_ms,
    })
}

fn describe(n: &LiveNode, head: u64, ours: Option<&BTreeMap<String, String>>) -> serde_json::Value {
    match &n.info {
        Some(i) => describe_info(i, "up", Some(&n.owner), head, ours),
        None => serde_json::json!({
            "node_id": n.node,
            "state": "up",
            "owner": n.owner,
            "version": null,
            "max_format": n.max_format(),
            "note": "advertises nothing: a marmot release from before schema replication (reads message format 1 only), or a node that started in the last seconds",
        }),
    }
}

/// The cluster as a table for a terminal.
fn table(out: &serde_json::Value) -> String {
    let mut t = format!(
        "stream: messages {}..{}\n{:>5}  {:<5}  {:>9}  {:>7}  {:>9}  {:>7}  {:>6}  {:>8}  {:<5}  {:<16}  {}\n",
        out["stream"]["first_seq"],
        out["stream"]["last_seq"],
        "node",
        "state",
        "position",
        "behind",
        "lag (s)",
        "pending",
        "parked",
        "skew ms",
        "ready",
        "schema",
        "version",
    );
    for n in out["nodes"].as_array().into_iter().flatten() {
        let v = |k: &str| match &n[k] {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        t.push_str(&format!(
            "{:>5}  {:<5}  {:>9}  {:>7}  {:>9}  {:>7}  {:>6}  {:>8}  {:<5}  {:<16}  {}\n",
            v("node_id"),
            v("state"),
            v("position"),
            v("behind_head_messages"),
            v("lag_seconds"),
            v("pending_messages"),
            v("parked_batches"),
            v("clock_skew_ms"),
            v("ready"),
            v("schema_digest"),
            v("version"),
        ));
    }
    t
}

/// Prints every node of the cluster: the live ones and those that went silent (down), with
/// their lag behind the stream's head. JSON unless standard output is a terminal (or `json`).
pub fn status(s: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let ours = crate::commands::open_db(s)
        .ok()
        .and_then(|c| marmot_sqlite::replicated::schema_object_digests(&c).ok());
    runtime()?.block_on(async {
        let t = connect(s).await?;
        let bounds = t.prepare().await.context("reading the stream's extent")?;
        let live = t
            .live_nodes()
            .await
            .context("reading the live nodes from NATS")?;
        let members = t
            .members_seen()
            .await
            .context("reading the cluster's members from NATS")?;
        let mut nodes: Vec<serde_json::Value> = live
            .iter()
            .map(|n| describe(n, bounds.last_seq, ours.as_ref()))
            .collect();
        for m in &members {
            if !live.iter().any(|n| n.node == m.node) {
                nodes.push(describe_info(
                    m,
                    "down",
                    None,
                    bounds.last_seq,
                    ours.as_ref(),
                ));
            }
        }
        nodes.sort_by_key(|n| n["node_id"].as_u64());
        let out = serde_json::json!({
            "stream": { "first_seq": bounds.first_seq, "last_seq": bounds.last_seq },
            "nodes": nodes,
        });
        if json || !std::io::stdout().is_terminal() {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            print!("{}", table(&out));
        }
        t.close().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// The live nodes whose advertised schema digest is not `digest`, with what they have.
fn differing(live: &[LiveNode], digest: &str) -> Vec<String> {
    live.iter()
        .filter_map(|n| match &n.info {
            Some(i) if i.schema_digest == digest => None,
            Some(i) => Some(format!("node {} has {}", n.node, i.schema_digest)),
            None => Some(format!("node {} advertises no schema", n.node)),
        })
        .collect()
}

/// Waits until every live node advertises this node's schema digest (read again from the
/// database at every look, so a change made meanwhile is waited for too).
pub fn wait_schema(s: &Settings, timeout: Duration) -> anyhow::Result<ExitCode> {
    let conn = crate::commands::open_db(s)?;
    runtime()?.block_on(async {
        let t = connect(s).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let digest = marmot_sqlite::replicated::schema_digest(&conn)
                .context("computing this node's schema digest")?;
            let live = t.live_nodes().await;
            let left = match &live {
                Ok(live) if live.is_empty() => {
                    vec!["no live node advertises itself (is marmot running?)".to_string()]
                }
                Ok(live) => differing(live, &digest),
                Err(e) => vec![format!("reading the live nodes: {e}")],
            };
            if left.is_empty() {
                let n = live.map(|l| l.len()).unwrap_or(0);
                println!("all {n} live nodes have schema {digest}");
                t.close().await;
                return Ok(ExitCode::SUCCESS);
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "timed out after {}s waiting for schema {digest}: {}",
                    timeout.as_secs(),
                    left.join("; ")
                );
                t.close().await;
                return Ok(ExitCode::FAILURE);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}
