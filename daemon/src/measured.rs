//! Latency histograms, measured around the storage port the node drives: how long a capture
//! and an apply transaction take, how long a captured batch waits until the stream
//! acknowledged all of it, and how old another node's batch is when it is applied here
//! (end-to-end lag: from its stamp, the origin's clock, to this node's clock, so it includes
//! the two clocks' skew). Also per-table counters: rows captured, rows applied and
//! conflicts, labelled `table`.

use marmot_core::apply::Delivery;
use marmot_core::ports::{
    ApplyOutcome, CaptureOutcome, ParkedRetry, Recovered, RestoreReport, Storage,
};
use marmot_core::snapshot::StagedSnapshot;
use marmot_core::wire::{BatchId, decode_message};
use marmot_core::{Clock, NodeId};
use metrics::Histogram;
use std::collections::BTreeMap;
use std::time::Instant;

/// Batches whose capture time is remembered for the acknowledgement latency, at most.
const TRACKED: usize = 10_000;

/// The histograms' bucket bounds, seconds: 100 µs to 60 s.
pub const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// A storage that records how long its work takes.
pub struct Measured<S> {
    inner: S,
    node: NodeId,
    /// Metric names of the per-table counters: captured, applied, conflicts.
    per_table: [String; 3],
    captured_at: BTreeMap<BatchId, Instant>,
    capture: Histogram,
    apply: Histogram,
    acknowledged: Histogram,
    end_to_end: Histogram,
}

impl<S> Measured<S> {
    /// Measures `inner`, a store of node `node`, under the metric prefix `prefix`.
    pub fn new(inner: S, node: NodeId, prefix: &str) -> Self {
        let h = |n: &str, help: &'static str| {
            let name = format!("{prefix}_{n}");
            metrics::describe_histogram!(name.clone(), metrics::Unit::Seconds, help);
            metrics::histogram!(name)
        };
        let per_table = [
            (
                "table_rows_captured_total",
                "Rows of the table captured here (local writes), by table (rows)",
            ),
            (
                "table_rows_applied_total",
                "Rows of the table written or deleted here by other nodes' batches, by table (rows)",
            ),
            (
                "table_conflicts_total",
                "Writes of the table that lost to a concurrent write with other content, by table (writes)",
            ),
        ]
        .map(|(n, help)| {
            let name = format!("{prefix}_{n}");
            metrics::describe_counter!(name.clone(), help);
            name
        });
        Measured {
            inner,
            node,
            per_table,
            captured_at: BTreeMap::new(),
            capture: h(
                "capture_seconds",
                "Time to capture local changes into a batch, per capture that found some (seconds)",
            ),
            apply: h(
                "apply_seconds",
                "Time of one apply transaction of delivered messages (seconds)",
            ),
            acknowledged: h(
                "publish_ack_seconds",
                "Time from capturing a batch to the stream's acknowledgement of all of it (seconds)",
            ),
            end_to_end: h(
                "end_to_end_lag_seconds",
                "Age of another node's batch when applied here: this node's clock minus the batch's stamp, so it includes the clocks' skew (seconds)",
            ),
        }
    }

    fn captured(&mut self, c: Option<&marmot_core::capture::Captured>) {
        if let Some(c) = c {
            for (table, rows) in &c.tables {
                metrics::counter!(self.per_table[0].clone(), "table" => table.clone())
                    .increment(*rows);
            }
        }
        if let Some(b) = c.map(|c| c.batch) {
            if self.captured_at.len() >= TRACKED {
                self.captured_at.pop_first();
            }
            self.captured_at.insert(b, Instant::now());
        }
    }
}

impl<S: Storage> Storage for Measured<S> {
    type Error = S::Error;

    fn recover(&mut self) -> Result<Recovered, Self::Error> {
        self.inner.recover()
    }

    fn capture(&mut self, clock: &mut Clock, wall_ms: u64) -> Result<CaptureOutcome, Self::Error> {
        let start = Instant::now();
        let out = self.inner.capture(clock, wall_ms)?;
        if out.captured.is_some() {
            self.capture.record(start.elapsed().as_secs_f64());
        }
        self.captured(out.captured.as_ref());
        Ok(out)
    }

    fn apply(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        deliveries: &[Delivery],
    ) -> Result<ApplyOutcome, Self::Error> {
        let start = Instant::now();
        let out = self.inner.apply(clock, wall_ms, deliveries)?;
        self.apply.record(start.elapsed().as_secs_f64());
        for (table, t) in &out.report.tables {
            if t.written > 0 {
                metrics::counter!(self.per_table[1].clone(), "table" => table.clone())
                    .increment(t.written);
            }
            if t.conflicts > 0 {
                metrics::counter!(self.per_table[2].clone(), "table" => table.clone())
                    .increment(t.conflicts);
            }
        }
        self.captured(out.captured.as_ref());
        for d in deliveries {
            // Once per batch: at its last message.
            if let Ok((h, _)) = decode_message(&d.payload)
                && h.batch.origin != self.node
                && h.chunk + 1 >= h.chunks
            {
                let age_ms = wall_ms.saturating_sub(h.stamp.wall_ms());
                self.end_to_end.record(age_ms as f64 / 1000.0);
            }
        }
        Ok(out)
    }

    fn mark_published(&mut self, batch: BatchId) -> Result<(), Self::Error> {
        self.inner.mark_published(batch)?;
        if let Some(at) = self.captured_at.remove(&batch) {
            self.acknowledged.record(at.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn outbox_message(
        &mut self,
        batch: BatchId,
        chunk: u32,
    ) -> Result<Option<bytes::Bytes>, Self::Error> {
        self.inner.outbox_message(batch, chunk)
    }

    fn retry_parked(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        all: bool,
    ) -> Result<ParkedRetry, Self::Error> {
        let out = self.inner.retry_parked(clock, wall_ms, all)?;
        self.captured(out.captured.as_ref());
        Ok(out)
    }

    fn restore(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snapshot: &StagedSnapshot,
    ) -> Result<RestoreReport, Self::Error> {
        let out = self.inner.restore(clock, wall_ms, snapshot)?;
        self.captured(out.captured.as_ref());
        Ok(out)
    }
}
