//! What the running node reports: log lines (tracing), Prometheus metrics, and the state
//! behind `/health` and `/ready`.

use marmot_core::drive::Observer;
use marmot_core::node::{Event, RestoreReason, Status};
use marmot_core::snapshot::SaveOutcome;
use marmot_sqlite::StoreStats;
use metrics::{Counter, Gauge};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shared view of the node for the HTTP endpoints and the idle watchdog.
#[derive(Default)]
pub struct Shared {
    /// Last status the node reported.
    pub status: Mutex<Status>,
    /// The node applies remote changes (so readiness requires a subscription).
    pub replicate: bool,
    /// Milliseconds since start of the last captured or applied change.
    pub last_activity_ms: AtomicU64,
    /// The replicated schema's digest (nodes with the same digest have the same schema).
    pub schema_digest: Mutex<String>,
}

struct Metrics {
    captured_rows: Counter,
    captured_batches: Counter,
    published_batches: Counter,
    publish_failures: Counter,
    applied_rows: Counter,
    skipped_rows: Counter,
    applied_batches: Counter,
    conflicts: Counter,
    parked_total: Counter,
    busy: Counter,
    storage_failures: Counter,
    snapshots_saved: Counter,
    snapshot_failures: Counter,
    restores: Counter,
    pending_batches: Gauge,
    pending_messages: Gauge,
    lag_messages: Gauge,
    lag_seconds: Gauge,
    parked: Gauge,
    incomplete: Gauge,
    skew: Gauge,
    clock_paused: Gauge,
    behind: Gauge,
    throttled: Gauge,
    position: Gauge,
    connected: Gauge,
    tables: Gauge,
    skipped_tables: Gauge,
    null_key_rows: Gauge,
}

impl Metrics {
    fn new(prefix: &str) -> Self {
        // Every series has HELP text (with its unit) on /metrics.
        let c = |n: &str, help: &'static str| {
            let name = format!("{prefix}_{n}");
            metrics::describe_counter!(name.clone(), help);
            metrics::counter!(name)
        };
        let g = |n: &str, help: &'static str| {
            let name = format!("{prefix}_{n}");
            metrics::describe_gauge!(name.clone(), help);
            metrics::gauge!(name)
        };
        Metrics {
            captured_rows: c(
                "changes_captured_total",
                "Row changes captured from local writes (rows)",
            ),
            captured_batches: c(
                "batches_captured_total",
                "Local transactions captured as batches (batches)",
            ),
            published_batches: c(
                "batches_published_total",
                "Batches acknowledged by the stream (batches)",
            ),
            publish_failures: c(
                "publish_failures_total",
                "Publish attempts that failed and will be retried (attempts)",
            ),
            applied_rows: c(
                "changes_applied_total",
                "Row changes from other nodes written to this database (rows)",
            ),
            skipped_rows: c(
                "changes_skipped_total",
                "Row changes from other nodes skipped because this node holds a newer write (rows)",
            ),
            applied_batches: c(
                "batches_applied_total",
                "Batches from other nodes applied (batches)",
            ),
            conflicts: c(
                "conflicts_total",
                "Writes that lost to a concurrent newer write of the same row (rows)",
            ),
            parked_total: c(
                "parked_total",
                "Batches parked because they could not be applied (batches)",
            ),
            busy: c(
                "sqlite_busy_total",
                "Times the database was locked by another connection when marmot needed it (events)",
            ),
            storage_failures: c(
                "storage_failures_total",
                "Database operations that failed and were retried (events)",
            ),
            snapshots_saved: c(
                "snapshots_saved_total",
                "Snapshots taken and stored (snapshots)",
            ),
            snapshot_failures: c(
                "snapshot_failures_total",
                "Snapshots that could not be taken or stored (attempts)",
            ),
            restores: c(
                "restores_total",
                "Snapshots restored into this database (restores)",
            ),
            pending_batches: g(
                "pending_batches",
                "Captured batches not yet acknowledged by the stream (batches)",
            ),
            pending_messages: g(
                "pending_messages",
                "Messages of the captured batches not yet acknowledged by the stream (messages)",
            ),
            lag_messages: g(
                "replication_lag_messages",
                "Messages received and not yet applied, plus those the stream holds beyond them (messages)",
            ),
            lag_seconds: g(
                "replication_lag_seconds",
                "Age of the last applied message when it was applied, 0 when caught up; it includes the clocks' skew (seconds)",
            ),
            parked: g("parked_batches", "Batches parked now (batches)"),
            incomplete: g(
                "incomplete_batches",
                "Batches of which only some fragments arrived (batches)",
            ),
            skew: g(
                "clock_skew_seconds",
                "This node's clock minus the NATS server's, last measured (seconds)",
            ),
            clock_paused: g(
                "clock_paused",
                "1 while capture and apply wait for this node's clock to come back within max_clock_skew_ms (boolean)",
            ),
            behind: g(
                "behind_stream",
                "1 while applying is stopped because messages this node needs are gone from the stream (boolean)",
            ),
            throttled: g(
                "publish_throttled",
                "1 while publishing waits for this node to apply more of the stream (a quarter of its retention behind) (boolean)",
            ),
            position: g(
                "stream_position",
                "The stream sequence this node has applied through (sequence number)",
            ),
            connected: g(
                "stream_ready",
                "1 while the replication stream is ready for this node (boolean)",
            ),
            tables: g("tables_replicated", "Tables that replicate (tables)"),
            skipped_tables: g(
                "tables_skipped",
                "Tables that do not replicate: excluded, no primary key, virtual (tables)",
            ),
            null_key_rows: g(
                "null_key_rows_skipped",
                "Rows not captured because their primary key holds NULL (rows)",
            ),
        }
    }
}

/// The daemon's observer.
pub struct DaemonObserver {
    m: Metrics,
    shared: Arc<Shared>,
    stats: Arc<StoreStats>,
    busy_seen: u64,
    /// The metric prefix, and the schema digest last exported as a label.
    prefix: String,
    digest: String,
    last_warn: HashMap<&'static str, Duration>,
    publish_failing: bool,
}

const WARN_EVERY: Duration = Duration::from_secs(10);

impl DaemonObserver {
    /// An observer recording under `prefix`.
    pub fn new(prefix: &str, shared: Arc<Shared>, stats: Arc<StoreStats>) -> Self {
        DaemonObserver {
            m: Metrics::new(prefix),
            shared,
            stats,
            busy_seen: 0,
            prefix: prefix.to_string(),
            digest: String::new(),
            last_warn: HashMap::new(),
            publish_failing: false,
        }
    }

    /// Whether a repeated warning of this kind may be logged now.
    fn may_warn(&mut self, now: Duration, kind: &'static str) -> bool {
        match self.last_warn.get(kind) {
            Some(t) if now.saturating_sub(*t) < WARN_EVERY => false,
            _ => {
                self.last_warn.insert(kind, now);
                true
            }
        }
    }

    fn active(&self, now: Duration) {
        self.shared
            .last_activity_ms
            .store(now.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Observer for DaemonObserver {
    fn event(&mut self, now: Duration, e: &Event) {
        match e {
            Event::Captured {
                batch,
                rows,
                messages,
            } => {
                self.m.captured_rows.increment(*rows);
                self.m.captured_batches.increment(1);
                self.active(now);
                tracing::debug!(%batch, rows, messages, "captured local changes");
            }
            Event::BatchPublished { batch } => {
                self.m.published_batches.increment(1);
                if self.publish_failing {
                    self.publish_failing = false;
                    tracing::info!("publishing works again");
                }
                tracing::debug!(%batch, "published");
            }
            Event::PublishThrottled {
                throttled,
                head,
                position,
            } => {
                self.m.throttled.set(if *throttled { 1.0 } else { 0.0 });
                if *throttled {
                    tracing::info!(
                        head,
                        position,
                        "publishing waits until this node applies more of the stream (it is a quarter of the stream's retention behind); local changes wait in the outbox"
                    );
                } else {
                    tracing::info!(head, position, "publishing again");
                }
            }
            Event::HeldBatchReleased { batch, waited } => {
                if self.may_warn(now, "held") {
                    tracing::warn!(
                        %batch,
                        waited_s = waited.as_secs(),
                        "publishing local changes although this node is behind the stream: they waited half the tombstone lifetime (snapshot.tombstone_ttl_hours), and any later they could land where a newer delete's tombstone was already removed"
                    );
                }
            }
            Event::PublishFailed { error, retry_in } => {
                self.m.publish_failures.increment(1);
                self.publish_failing = true;
                if self.may_warn(now, "publish") {
                    tracing::warn!(%error, retry_in = ?retry_in, "publish failed; changes stay in the outbox and are retried (nothing is lost)");
                }
            }
            Event::Applied {
                through_seq,
                batches,
                rows_written,
                rows_skipped,
                conflicts,
                own_messages,
                took,
            } => {
                self.m.applied_rows.increment(*rows_written);
                self.m.skipped_rows.increment(*rows_skipped);
                self.m.applied_batches.increment(*batches);
                self.m.conflicts.increment(*conflicts);
                if *batches > 0 {
                    self.active(now);
                }
                if *conflicts > 0 {
                    tracing::info!(
                        conflicts,
                        "conflicts resolved (last writer wins); see `marmot conflicts`"
                    );
                }
                tracing::debug!(through_seq, batches, rows_written, rows_skipped, own_messages, took = ?took, "applied");
            }
            Event::Parked { .. } | Event::WaitingOnUnique { .. } => {
                // io-sqlite logs the details with the batch.
                self.m.parked_total.increment(1);
            }
            Event::Unparked { batches } => {
                tracing::info!(
                    batches,
                    "batches that waited on a UNIQUE value applied once other rows moved"
                );
            }
            Event::ParkedRetried { applied, remaining } => {
                if *applied > 0 {
                    tracing::info!(applied, remaining, "parked batches applied on retry");
                } else if *remaining > 0 && self.may_warn(now, "parked") {
                    tracing::warn!(
                        remaining,
                        "parked batches still cannot be applied; see `marmot parked list`"
                    );
                }
            }
            Event::StreamReady { bounds } => {
                tracing::info!(
                    first_seq = bounds.first_seq,
                    last_seq = bounds.last_seq,
                    "replication stream ready"
                );
            }
            Event::StreamUnavailable { error, retry_in } => {
                if self.may_warn(now, "stream") {
                    tracing::warn!(%error, retry_in = ?retry_in, "replication stream not available yet; capturing locally meanwhile");
                }
            }
            Event::Subscribed { from_seq } => tracing::info!(from_seq, "reading the stream"),
            Event::SubscriptionLost { error, retry_in } => {
                if self.may_warn(now, "subscription") {
                    tracing::warn!(error = ?error.as_ref().map(|e| e.to_string()), retry_in = ?retry_in, "stream subscription lost; resubscribing from the applied position");
                }
            }
            Event::Gap { expected, received } => {
                tracing::warn!(
                    expected,
                    received,
                    "delivery skipped ahead; resubscribing from the first missing message"
                );
            }
            Event::Behind {
                position,
                first_seq,
            } => {
                tracing::error!(
                    position,
                    first_seq,
                    "THIS NODE STOPPED APPLYING: it has applied the stream up to {position}, but the stream now starts at {first_seq}; \
                     the messages in between are gone (retention). Restore this node from a copy of another node's database. \
                     Local writes are still captured and published."
                );
            }
            Event::StreamReset { position, last_seq } => {
                tracing::error!(
                    position,
                    last_seq,
                    "THIS NODE STOPPED APPLYING: the stream ends at {last_seq}, before this node's position {position}; \
                     it was deleted or replaced. Restore this node from a copy of another node's database."
                );
            }
            Event::ClockSkew {
                skew_ms,
                paused,
                lowered_high_water,
            } => {
                if let Some(lead_ms) = lowered_high_water {
                    tracing::warn!(
                        lead_ms,
                        "this node's clock had stamped ahead of the NATS server (its wall clock ran fast before a check caught it); \
                         its wall clock is right again, so its clock goes on from the wall clock (later writes of the rows stamped \
                         ahead are still stamped above them)"
                    );
                }
                if *paused {
                    tracing::error!(
                        skew_ms,
                        "the stamps this node would give are ahead of the NATS server's clock beyond max_clock_skew_ms: capture, apply and restores are paused until it is fixed (writes wait safely in the change log)"
                    );
                } else {
                    tracing::info!(
                        skew_ms,
                        "clock back within bounds: capture and apply resume"
                    );
                }
            }
            Event::ClaimGranted => tracing::info!("node id claimed"),
            Event::ClaimFailed { error } => {
                if self.may_warn(now, "claim") {
                    tracing::warn!(%error, "could not claim/renew the node id yet");
                }
            }
            Event::StorageFailed { error, retry_in } => {
                self.m.storage_failures.increment(1);
                if self.may_warn(now, "storage") {
                    tracing::warn!(
                        operation = error.operation.name(),
                        kind = ?error.kind,
                        %error,
                        retry_in = ?retry_in,
                        "database operation failed; retrying"
                    );
                }
            }
            Event::SchemaChanged => tracing::info!("database schema changed; capture follows it"),
            Event::SnapshotSaved { outcome } => match outcome {
                SaveOutcome::Saved(info) => {
                    self.m.snapshots_saved.increment(1);
                    tracing::info!(
                        generation = info.generation,
                        position = info.position,
                        bytes = info.size,
                        object = %info.object,
                        "snapshot saved"
                    );
                }
                SaveOutcome::Busy { by } => {
                    tracing::debug!(%by, "another node is taking a snapshot")
                }
                SaveOutcome::UpToDate(info) => tracing::debug!(
                    generation = info.generation,
                    "the newest snapshot is recent enough"
                ),
            },
            Event::JoinedWithRows { stream_last_seq } => tracing::warn!(
                stream_last_seq,
                "this node starts on a database that holds rows, with nothing applied, and joins a cluster whose stream already has a history: \
                 rows already in this file are not published (only later writes are), and the cluster's rows reach it only as they are written again. \
                 Fine if this file is a copy of the cluster's data; otherwise stop marmot, move the file aside and start on an empty file: it then restores the cluster's newest snapshot"
            ),
            Event::SeedTaken { existing } => {
                let ours = self
                    .stats
                    .schema_digest
                    .lock()
                    .map(|d| d.clone())
                    .unwrap_or_default();
                if !existing.schema_digest.is_empty() && existing.schema_digest != ours {
                    tracing::error!(
                        seed = existing.node,
                        generation = existing.generation,
                        theirs = %existing.schema_digest,
                        ours = %ours,
                        "the snapshot store already holds another node's first snapshot, of a database whose schema differs from this one's: this node started from a different database, and the two are not merged (to join the seed's cluster, stop marmot here and start it on an empty file)"
                    );
                } else {
                    tracing::info!(
                        seed = existing.node,
                        generation = existing.generation,
                        "another node's first snapshot is in the store already (same schema): this node takes none"
                    );
                }
            }
            Event::SnapshotFailed { error, retry_in } => {
                self.m.snapshot_failures.increment(1);
                tracing::warn!(%error, retry_in = ?retry_in, "snapshot failed; retrying later");
            }
            Event::SnapshotRejected { error } => {
                self.m.snapshot_failures.increment(1);
                tracing::error!(%error, "a snapshot did not verify and was not used; trying an older one");
            }
            Event::NoSnapshot { reason } => match reason {
                RestoreReason::EmptyJoin => {
                    tracing::info!(
                        "no snapshot to start from: reading the stream from its start, and looking for a first snapshot (a seed node's) while this node stays empty"
                    )
                }
                RestoreReason::Behind => tracing::error!(
                    "this node is behind the stream and no snapshot holds what it misses yet; it looks again every 30 s"
                ),
            },
            Event::Restored {
                reason,
                generation,
                position,
                merged,
            } => {
                self.m.restores.increment(1);
                tracing::info!(
                    ?reason,
                    generation,
                    position,
                    merged,
                    "restored from a snapshot; catching up from its position"
                );
            }
            Event::IncompleteBatches { count } => {
                if *count > 0 {
                    tracing::warn!(
                        count,
                        "batches split across several messages are waiting for their remaining chunks \
                         (their sender publishes them when it runs again); nothing of them is applied until complete"
                    );
                } else {
                    tracing::info!("no incomplete batches left");
                }
            }
        }
    }

    fn status(&mut self, s: &Status) {
        let m = &self.m;
        m.pending_batches.set(s.outbox_batches as f64);
        m.pending_messages.set(s.outbox_messages as f64);
        m.lag_messages.set(s.lag_messages as f64);
        m.lag_seconds.set(s.lag_ms as f64 / 1000.0);
        m.parked.set(s.parked as f64);
        m.incomplete.set(s.incomplete_batches as f64);
        m.skew.set(s.clock_skew_ms as f64 / 1000.0);
        m.clock_paused.set(if s.clock_paused { 1.0 } else { 0.0 });
        m.behind.set(if s.behind { 1.0 } else { 0.0 });
        m.position.set(s.position as f64);
        m.connected.set(if s.stream_ready && s.connected {
            1.0
        } else {
            0.0
        });
        m.tables
            .set(self.stats.tables.load(Ordering::Relaxed) as f64);
        m.skipped_tables
            .set(self.stats.skipped_tables.load(Ordering::Relaxed) as f64);
        m.null_key_rows
            .set(self.stats.null_key_rows.load(Ordering::Relaxed) as f64);
        let digest = self
            .stats
            .schema_digest
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        if digest != self.digest {
            // An info metric: the current digest is the label whose value is 1.
            let name = format!("{}_schema_info", self.prefix);
            metrics::describe_gauge!(
                name.clone(),
                "1 for the digest (label) of this node's replicated schema, 0 for earlier ones (info)"
            );
            if !self.digest.is_empty() {
                metrics::gauge!(name.clone(), "digest" => self.digest.clone()).set(0.0);
            }
            metrics::gauge!(name, "digest" => digest.clone()).set(1.0);
            if let Ok(mut d) = self.shared.schema_digest.lock() {
                d.clone_from(&digest);
            }
            self.digest = digest;
        }
        let busy = self.stats.busy.load(Ordering::Relaxed);
        if busy > self.busy_seen {
            m.busy.increment(busy - self.busy_seen);
            self.busy_seen = busy;
        }
        if let Ok(mut st) = self.shared.status.lock()
            && *st != *s
        {
            *st = s.clone();
        }
    }
}

/// Whether the node is ready: stream prepared, node id claimed, reading the stream (when it
/// replicates), not behind, clock sane.
pub fn ready(shared: &Shared) -> (bool, serde_json::Value) {
    let s = shared.status.lock().map(|s| s.clone()).unwrap_or_default();
    let ok = s.started
        && s.stream_ready
        && s.claimed
        && s.connected
        && (s.subscribed || !shared.replicate)
        && !s.behind
        && !s.clock_paused;
    let body = serde_json::json!({
        "ready": ok,
        "stream_ready": s.stream_ready,
        "node_id_claimed": s.claimed,
        "nats_reachable": s.connected,
        "subscribed": s.subscribed,
        "behind_stream": s.behind,
        "clock_paused": s.clock_paused,
        "position": s.position,
        "lag_messages": s.lag_messages,
        "pending_messages": s.outbox_messages,
        "parked_batches": s.parked,
        "incomplete_batches": s.incomplete_batches,
        "clock_skew_ms": s.clock_skew_ms,
        "awaiting_first_snapshot": s.awaiting_first_snapshot,
        "schema_digest": shared.schema_digest.lock().map(|d| d.clone()).unwrap_or_default(),
    });
    (ok, body)
}

/// `/ready` thresholds from its query (`?max_lag_messages=100&max_lag_seconds=5&max_pending_messages=1000`),
/// as Corrosion's health endpoint takes them: each one given must hold too. An unknown or
/// malformed parameter is an error naming it.
pub fn ready_with(
    shared: &Shared,
    query: &HashMap<String, String>,
) -> Result<(bool, serde_json::Value), String> {
    let (mut ok, mut body) = ready(shared);
    let s = shared.status.lock().map(|s| s.clone()).unwrap_or_default();
    let mut failed = Vec::new();
    for (k, v) in query {
        let limit: f64 = v
            .parse()
            .map_err(|_| format!("/ready: {k}={v:?} is not a number"))?;
        let (value, name) = match k.as_str() {
            "max_lag_messages" => (s.lag_messages as f64, "lag_messages"),
            "max_lag_seconds" => (s.lag_ms as f64 / 1000.0, "lag_seconds"),
            "max_pending_messages" => (s.outbox_messages as f64, "pending_messages"),
            "max_parked_batches" => (s.parked as f64, "parked_batches"),
            _ => {
                return Err(format!(
                    "/ready: unknown parameter {k:?} (max_lag_messages, max_lag_seconds, max_pending_messages, max_parked_batches)"
                ));
            }
        };
        if value > limit {
            failed.push(format!("{name} {value} > {limit}"));
        }
    }
    failed.sort();
    if !failed.is_empty() {
        ok = false;
        body["ready"] = serde_json::json!(false);
    }
    body["lag_seconds"] = serde_json::json!(s.lag_ms as f64 / 1000.0);
    body["thresholds_failed"] = serde_json::json!(failed);
    Ok((ok, body))
}

/// Serves `/metrics`, `/health` (the process is up) and `/ready` on `bind`.
pub async fn serve(
    bind: String,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!(%bind, "serving /metrics, /health and /ready");
    let ready_shared = shared.clone();
    let app = axum::Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/health", get(|| std::future::ready("ok\n")))
        .route(
            "/ready",
            get(
                move |axum::extract::RawQuery(raw): axum::extract::RawQuery| {
                    let q: HashMap<String, String> =
                        url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                            .into_owned()
                            .collect();
                    let answer = match ready_with(&ready_shared, &q) {
                        Ok((true, body)) => (StatusCode::OK, body.to_string()),
                        Ok((false, body)) => (StatusCode::SERVICE_UNAVAILABLE, body.to_string()),
                        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
                    };
                    std::future::ready(answer)
                },
            ),
        );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_thresholds_hold_or_name_what_failed() {
        let shared = Shared::default();
        {
            let mut s = shared.status.lock().unwrap();
            s.started = true;
            s.stream_ready = true;
            s.claimed = true;
            s.connected = true;
            s.subscribed = true;
            s.lag_messages = 50;
            s.lag_ms = 2500;
            s.outbox_messages = 3;
        }
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(ready_with(&shared, &q(&[])).unwrap().0);
        assert!(
            ready_with(
                &shared,
                &q(&[("max_lag_messages", "50"), ("max_lag_seconds", "3")])
            )
            .unwrap()
            .0
        );
        let (ok, body) = ready_with(
            &shared,
            &q(&[("max_lag_seconds", "1"), ("max_pending_messages", "0")]),
        )
        .unwrap();
        assert!(!ok);
        assert_eq!(body["ready"], false);
        assert_eq!(
            body["thresholds_failed"],
            serde_json::json!(["lag_seconds 2.5 > 1", "pending_messages 3 > 0"])
        );
        assert!(
            ready_with(&shared, &q(&[("max_lag", "1")]))
                .unwrap_err()
                .contains("unknown parameter")
        );
        assert!(
            ready_with(&shared, &q(&[("max_lag_seconds", "x")]))
                .unwrap_err()
                .contains("not a number")
        );
    }
}
