//! How a node behaves: [`NodeConfig`] and its snapshot policy.

use crate::hlc::NodeId;
use std::time::Duration;

/// How a node behaves. Build with [`NodeConfig::new`] and adjust fields.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id, unique in the cluster.
    pub node_id: NodeId,
    /// Token that identifies this node's database when claiming the node id.
    pub owner: String,
    /// Capture and publish local writes (false: a node that only receives).
    pub publish: bool,
    /// Subscribe and apply other nodes' writes (false: a node that only sends).
    pub replicate: bool,
    /// Largest tolerated lead of the local wall clock over the server's, in milliseconds.
    pub max_clock_skew_ms: u64,
    /// Most messages in flight (published, not yet acknowledged).
    pub publish_window: usize,
    /// Publish only while the stream holds fewer than this many messages this node has not
    /// applied yet (None: no limit). A stream with retention limits drops its oldest
    /// messages; this keeps every publishing node within reach of the stream's tail, so
    /// whatever it publishes is applied by someone (or is in a snapshot) before it is
    /// dropped, even when every node flushes a backlog at once after an outage. Set it well
    /// below the stream's message limit (the daemon uses a quarter of it).
    pub max_lag: Option<u64>,
    /// The pacing of `max_lag` never holds a captured batch longer than this (None: no
    /// bound): a batch published later than the tombstone lifetime after it was made can
    /// land below another node's tombstone horizon, where the newer tombstone that should
    /// beat it was collected, and bring a deleted row back there only (found by the
    /// simulation, V4 seed 912706). The daemon sets half the tombstone lifetime. A node cut
    /// off from the stream cannot publish at all: the README's rule for tombstones covers it.
    pub max_publish_hold: Option<Duration>,
    /// Aim for apply transactions that hold the write lock no longer than this.
    pub apply_target: Duration,
    /// Most messages per apply transaction.
    pub apply_max_messages: usize,
    /// Most deliveries buffered before the node stops reading the stream.
    pub max_buffered_deliveries: usize,
    /// Most bytes of deliveries buffered before the node stops reading the stream.
    pub max_buffered_bytes: usize,
    /// Look for local changes at least this often even without a wake-up hint.
    pub poll_interval: Duration,
    /// Renew the node-id claim (and measure clock skew) this often.
    pub claim_interval: Duration,
    /// First retry delay after a failure.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// On shutdown, wait at most this long for pending batches to be acknowledged.
    pub shutdown_grace: Duration,
    /// Repeat the "behind the stream" alarm this often.
    pub alarm_interval: Duration,
    /// Keep at most this many bytes of unpublished messages in memory (the rest is read back
    /// from storage when it is its turn).
    pub max_cached_bytes: usize,
    /// Snapshots: when to take them, and whether a new node starts from one (None: off).
    pub snapshots: Option<SnapshotPolicy>,
}

/// When a node takes snapshots and restores from them.
#[derive(Clone, Debug)]
pub struct SnapshotPolicy {
    /// Take one after this many rows captured and applied here (0: never by count).
    pub every_changes: u64,
    /// Take one at least this often (None: never by time).
    pub interval: Option<Duration>,
    /// A new node (empty database, nothing applied) starts from the newest snapshot.
    pub restore_empty: bool,
}

/// Why a node restores.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RestoreReason {
    /// A new node with an empty database joins a cluster.
    EmptyJoin,
    /// Messages this node has not applied are gone from the stream.
    Behind,
}

impl NodeConfig {
    /// Defaults for node `node_id` whose database identifies itself as `owner`.
    pub fn new(node_id: NodeId, owner: impl Into<String>) -> Self {
        NodeConfig {
            node_id,
            owner: owner.into(),
            publish: true,
            replicate: true,
            max_clock_skew_ms: 5_000,
            publish_window: 256,
            max_lag: None,
            max_publish_hold: None,
            apply_target: Duration::from_millis(10),
            apply_max_messages: 1024,
            max_buffered_deliveries: 8192,
            max_buffered_bytes: 64 << 20,
            poll_interval: Duration::from_millis(1000),
            claim_interval: Duration::from_secs(5),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
            alarm_interval: Duration::from_secs(30),
            max_cached_bytes: 64 << 20,
            snapshots: None,
        }
    }

    /// Fits publishing to a stream that keeps at most `stream_messages` messages: a node
    /// publishes only while fewer than a quarter of that are unapplied here ([`Self::max_lag`]),
    /// with at most a quarter of that in flight. However many nodes flush at once (up to a
    /// dozen), the stream then never runs ahead of every reader by more than it keeps.
    pub fn fit_to_retention(&mut self, stream_messages: u64) {
        let lag = (stream_messages / 4).max(1);
        self.max_lag = Some(lag);
        self.publish_window = self.publish_window.min((lag as usize / 4).max(1));
    }
}
