//! `marmot status --cluster` and `marmot wait-schema`: what the live nodes advertise beside
//! their node-id claims ([`marmot_nats::NodeInfo`]), read from NATS.

use crate::config::Settings;
use anyhow::Context;
use marmot_nats::{LiveNode, NatsTransport};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn connect(s: &Settings) -> anyhow::Result<NatsTransport> {
    let mut cfg = crate::snapshots::command_nats(s)?;
    cfg.client_name = format!("marmot-cli-{}", s.node_id);
    Ok(NatsTransport::connect(cfg).await?)
}

fn describe(n: &LiveNode, ours: Option<&BTreeMap<String, String>>) -> serde_json::Value {
    match &n.info {
        Some(i) => serde_json::json!({
            "node_id": n.node,
            "owner": n.owner,
            "version": i.version,
            "max_format": i.max_format,
            "schema_digest": i.schema_digest,
            // Which replicated objects differ from this node's database (empty: none).
            "schema_difference": ours.map(|o| marmot_sqlite::replicated::schema_difference(
                o,
                &i.schema_objects,
                &format!("node {}", n.node),
            )),
            "position": i.applied_seq,
            "ready": i.ready,
            "updated_ms": i.updated_ms,
        }),
        None => serde_json::json!({
            "node_id": n.node,
            "owner": n.owner,
            "version": null,
            "max_format": n.max_format(),
            "note": "advertises nothing: a marmot release from before schema replication (reads message format 1 only), or a node that started in the last seconds",
        }),
    }
}

/// Prints every live node as JSON.
pub fn status(s: &Settings) -> anyhow::Result<ExitCode> {
    let ours = crate::commands::open_db(s)
        .ok()
        .and_then(|c| marmot_sqlite::replicated::schema_object_digests(&c).ok());
    runtime()?.block_on(async {
        let t = connect(s).await?;
        let live = t
            .live_nodes()
            .await
            .context("reading the live nodes from NATS")?;
        let out = serde_json::json!({
            "nodes": live.iter().map(|n| describe(n, ours.as_ref())).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
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
