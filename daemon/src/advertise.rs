//! What this node advertises beside its node-id claim ([`marmot_nats::NodeInfo`]), and what it
//! learns from the others': another ready node whose replicated schema stays different from
//! this node's is reported, with the objects that differ (nodes that started from databases
//! with different schemas are never merged silently).

use crate::observe::Shared;
use marmot_nats::{NatsTransport, NodeInfo};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a node renews what it advertises (the bucket forgets entries after the claim's
/// 15 s) and looks at what the others advertise.
const EVERY: Duration = Duration::from_secs(2);

/// What the advertising task needs.
pub struct Advertiser {
    pub transport: Arc<NatsTransport>,
    pub shared: Arc<Shared>,
    pub node: u64,
    pub db: PathBuf,
    pub busy_timeout: Duration,
    pub metrics_prefix: String,
    /// How long another ready node's schema may differ before a warning (`None`: never).
    pub mismatch_after: Option<Duration>,
}

/// A difference with another node, since when, and whether it was reported.
struct Mismatch {
    theirs: String,
    since: Instant,
    reported: bool,
}

/// Starts advertising once the claim is granted (an id another database holds is not
/// advertised over).
pub fn spawn(a: Advertiser) {
    tokio::spawn(async move {
        let mut failing = false;
        // The per-object digests, recomputed when the schema digest changes.
        let mut objects: (String, BTreeMap<String, String>) = Default::default();
        let mut mismatches: HashMap<u64, Mismatch> = HashMap::new();
        let gauge = format!("{}_schema_mismatched_nodes", a.metrics_prefix);
        metrics::describe_gauge!(
            gauge.clone(),
            "Live, ready nodes whose replicated schema has differed from this node's for longer than [schema] mismatch_warn_after_ms (nodes)"
        );
        loop {
            tokio::time::sleep(EVERY).await;
            let status = a
                .shared
                .status
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            if !status.claimed {
                continue;
            }
            let digest = a
                .shared
                .schema_digest
                .lock()
                .map(|d| d.clone())
                .unwrap_or_default();
            if objects.0 != digest {
                let (db, busy) = (a.db.clone(), a.busy_timeout);
                let read = tokio::task::spawn_blocking(move || {
                    let c = marmot_sqlite::open_connection(&db, busy)?;
                    marmot_sqlite::replicated::schema_object_digests(&c)
                        .map_err(anyhow::Error::from)
                })
                .await;
                if let Ok(Ok(o)) = read {
                    objects = (digest.clone(), o);
                }
            }
            let ready = crate::observe::ready(&a.shared).0;
            let info = NodeInfo {
                node: a.node,
                max_format: marmot_core::wire::FORMAT_VERSION,
                version: env!("CARGO_PKG_VERSION").to_string(),
                schema_digest: digest.clone(),
                applied_seq: status.position,
                ready,
                updated_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                schema_objects: objects.1.clone(),
                pending_batches: status.outbox_batches,
                pending_messages: status.outbox_messages,
                parked_batches: status.parked,
                incomplete_batches: status.incomplete_batches,
                lag_messages: status.lag_messages,
                lag_ms: status.lag_ms,
                clock_skew_ms: status.clock_skew_ms,
            };
            match a.transport.advertise(&info).await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::debug!(error = %e, "could not advertise this node's formats and schema; retrying");
                }
                Err(_) => {}
            }
            let Some(after) = a.mismatch_after else {
                continue;
            };
            let Ok(live) = a.transport.live_nodes().await else {
                continue;
            };
            let mut seen = Vec::new();
            for n in &live {
                let Some(i) = &n.info else { continue };
                if n.node == a.node || !i.ready || !ready || i.schema_digest.is_empty() {
                    continue;
                }
                seen.push(n.node);
                if i.schema_digest == digest {
                    if mismatches.remove(&n.node).is_some_and(|m| m.reported) {
                        tracing::info!(node = n.node, digest = %digest, "node's replicated schema matches this node's again");
                    }
                    continue;
                }
                let m = mismatches.entry(n.node).or_insert_with(|| Mismatch {
                    theirs: i.schema_digest.clone(),
                    since: Instant::now(),
                    reported: false,
                });
                if m.theirs != i.schema_digest {
                    // Still changing (a migration on its way): start over.
                    m.theirs.clone_from(&i.schema_digest);
                    m.since = Instant::now();
                    m.reported = false;
                }
                if !m.reported && m.since.elapsed() >= after {
                    m.reported = true;
                    let diff = marmot_sqlite::replicated::schema_difference(
                        &objects.1,
                        &i.schema_objects,
                        &format!("node {}", n.node),
                    );
                    tracing::error!(
                        node = n.node,
                        ours = %digest,
                        theirs = %i.schema_digest,
                        difference = %diff.join("; "),
                        "this node's replicated schema differs from another ready node's (did the nodes start from different databases? see \"Starting a cluster from an existing database\" in the README)"
                    );
                }
            }
            mismatches.retain(|node, _| seen.contains(node));
            let reported = mismatches.values().filter(|m| m.reported).count();
            metrics::gauge!(gauge.clone()).set(reported as f64);
        }
    });
}
