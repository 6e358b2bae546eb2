//! What each live node says about itself, beside its node-id claim.
//!
//! Every node renews its claim (`node-<id>`) in the node bucket; the daemon also puts, under
//! `info-<id>` in the same bucket, a [`NodeInfo`]: the message formats it reads, its marmot
//! version, its replicated schema's digest and its position. Entries expire with the claim
//! (the bucket's age limit), so what is there describes the nodes alive now.
//!
//! Two things rest on it:
//! - **Formats while versions are mixed.** A node publishes a message of a format newer than
//!   [`FORMAT_ROWS`](marmot_core::wire::FORMAT_ROWS) (a batch carrying a schema change, or
//!   rows of a table a replicated change created or changed) only when every live node reads
//!   it. A live node with a claim but no `info-` entry runs a
//!   release from before schema replication and reads format 1 only. The publish waits (the
//!   batch stays in the outbox, and the batches after it wait behind it, as a schema change
//!   is a publish barrier) until that node is upgraded or gone, with a clear error.
//! - **"Applied everywhere."** `marmot wait-schema` reads every live node's schema digest.

use crate::{NatsTransport, unavailable};
use bytes::Bytes;
use futures::StreamExt;
use marmot_core::NodeId;
use marmot_core::ports::TransportError;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeInfo {
    /// The node id.
    pub node: NodeId,
    /// The newest message format it reads (it reads every older one down to format 1).
    pub max_format: u8,
    /// Its marmot version.
    pub version: String,
    /// Its replicated schema's digest (equal digests: equal schemas).
    pub schema_digest: String,
    /// The last stream position it applied.
    pub applied_seq: u64,
    /// It reports ready (subscribed, clock checked, not behind).
    pub ready: bool,
    /// Its wall clock when it wrote this, in Unix milliseconds.
    pub updated_ms: u64,
    /// Each replicated schema object's digest, by `"<type> <name>"` (to say which differ).
    #[serde(default)]
    pub schema_objects: std::collections::BTreeMap<String, String>,
    /// Captured batches not yet acknowledged by the stream.
    #[serde(default)]
    pub pending_batches: u64,
    /// Their messages.
    #[serde(default)]
    pub pending_messages: u64,
    /// Batches parked (cannot be applied).
    #[serde(default)]
    pub parked_batches: u64,
    /// Batches of which only some messages arrived.
    #[serde(default)]
    pub incomplete_batches: u64,
    /// Messages received or held by the stream and not yet applied.
    #[serde(default)]
    pub lag_messages: u64,
    /// Age of the last applied message when it was applied, 0 when caught up (ms).
    #[serde(default)]
    pub lag_ms: u64,
    /// Its clock minus the NATS server's, last measured (ms).
    #[serde(default)]
    pub clock_skew_ms: i64,
}

/// A node whose claim is alive, and what it said about itself (`None`: a node of a release
/// that does not advertise, which reads format 1 only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveNode {
    /// The node id.
    pub node: NodeId,
    /// Who holds the claim (database identity, host and file).
    pub owner: String,
    /// What it advertised.
    pub info: Option<NodeInfo>,
}

impl LiveNode {
    /// The newest message format this node reads.
    pub fn max_format(&self) -> u8 {
        self.info
            .as_ref()
            .map_or(marmot_core::wire::FORMAT_ROWS, |i| i.max_format)
    }
}

/// The newest format every other live node reads, as last read, and when.
#[derive(Default)]
pub(crate) struct FormatGate {
    checked: std::sync::Mutex<Option<(Instant, u8, String)>>,
    /// One reader of the bucket at a time: pipelined publishes wait for its answer.
    refresh: tokio::sync::Mutex<()>,
}

impl FormatGate {
    fn cached(&self, fresh_for: std::time::Duration) -> Option<(u8, String)> {
        let checked = self.checked.lock().expect("format gate lock");
        checked
            .as_ref()
            .and_then(|(at, max, who)| (at.elapsed() < fresh_for).then(|| (*max, who.clone())))
    }
}

impl NatsTransport {
    /// Puts (or renews) this node's [`NodeInfo`] beside its claim.
    pub async fn advertise(&self, info: &NodeInfo) -> Result<(), TransportError> {
        let kv = self.kv().await?;
        let body = serde_json::to_vec(info)
            .map_err(|e| TransportError::other(format!("encoding the node info: {e}")))?;
        let body = Bytes::from(body);
        kv.put(format!("info-{}", info.node), body.clone())
            .await
            .map_err(|e| unavailable("advertising this node", e))?;
        // And where it outlives the claim, so a node that went silent shows as down.
        self.members()
            .await?
            .put(format!("info-{}", info.node), body)
            .await
            .map_err(|e| unavailable("recording this node as a member", e))?;
        Ok(())
    }

    /// Every node that advertised itself in the last [`MEMBER_TTL`], live or not, with what
    /// it said last.
    pub async fn members_seen(&self) -> Result<Vec<NodeInfo>, TransportError> {
        let kv = self.members().await?;
        let mut keys = kv
            .keys()
            .await
            .map_err(|e| unavailable("listing the members", e))?
            .boxed();
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(|e| unavailable("listing the members", e))?);
        }
        let mut out = Vec::new();
        for k in names {
            if let Some(e) = kv
                .entry(k)
                .await
                .map_err(|e| unavailable("reading a member", e))?
                .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
                && let Ok(info) = serde_json::from_slice::<NodeInfo>(&e.value)
            {
                out.push(info);
            }
        }
        out.sort_by_key(|i| i.node);
        Ok(out)
    }

    /// Every node whose claim is alive, with what it advertised, by node id.
    pub async fn live_nodes(&self) -> Result<Vec<LiveNode>, TransportError> {
        let kv = self.kv().await?;
        let mut keys = kv
            .keys()
            .await
            .map_err(|e| unavailable("listing the node bucket", e))?
            .boxed();
        let mut claims = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| unavailable("listing the node bucket", e))?;
            if let Some(id) = k
                .strip_prefix("node-")
                .and_then(|n| n.parse::<NodeId>().ok())
            {
                claims.push(id);
            }
        }
        claims.sort_unstable();
        let mut live = Vec::new();
        for node in claims {
            let Some(claim) = kv
                .entry(format!("node-{node}"))
                .await
                .map_err(|e| unavailable("reading a claim", e))?
                .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
            else {
                continue;
            };
            let info = kv
                .entry(format!("info-{node}"))
                .await
                .map_err(|e| unavailable("reading a node's info", e))?
                .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
                .and_then(|e| serde_json::from_slice::<NodeInfo>(&e.value).ok());
            live.push(LiveNode {
                node,
                owner: String::from_utf8_lossy(&claim.value).into_owned(),
                info,
            });
        }
        Ok(live)
    }

    /// Refuses (as unavailable: the node retries) a message of a format some other live node
    /// cannot read. Reads the bucket at most every `format_check_interval` (one reader at a
    /// time), and only for messages newer than format 1: format 1 batches cost nothing.
    pub(crate) async fn check_format(&self, format: u8) -> Result<(), TransportError> {
        if format <= marmot_core::wire::FORMAT_ROWS {
            return Ok(());
        }
        let gate = &self.format_gate;
        let fresh_for = self.cfg.format_check_interval;
        let mut cached = gate.cached(fresh_for);
        let _reading = if cached.is_none() {
            let guard = gate.refresh.lock().await;
            // Another publish may have read the bucket meanwhile.
            cached = gate.cached(fresh_for);
            Some(guard)
        } else {
            None
        };
        let (max, who) = match cached {
            Some(c) => c,
            None => {
                let live = self.live_nodes().await?;
                let lowest = live
                    .iter()
                    .filter(|n| n.node != self.cfg.node_id)
                    .min_by_key(|n| n.max_format());
                let (max, who) = match lowest {
                    Some(n) => (
                        n.max_format(),
                        match &n.info {
                            Some(i) => format!("node {} (marmot {})", n.node, i.version),
                            None => format!(
                                "node {} (a marmot release from before schema replication)",
                                n.node
                            ),
                        },
                    ),
                    None => (u8::MAX, String::new()),
                };
                *gate.checked.lock().expect("format gate lock") =
                    Some((Instant::now(), max, who.clone()));
                (max, who)
            }
        };
        if format > max {
            return Err(TransportError::unavailable(format!(
                "{who} reads message formats up to {max}; this batch is format {format} (it \
                 carries a schema change, rows of a table a replicated change created or \
                 changed, or a repair after a schema change lost), so it and the batches after \
                 it wait in the outbox until every live node is upgraded (nothing is lost)"
            )));
        }
        Ok(())
    }
}
