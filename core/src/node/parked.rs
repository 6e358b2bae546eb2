//! Batches that did not apply: parked ones (they wait for a schema change, a person, or a
//! UNIQUE value another row gives up) and incomplete ones (some chunks stored, the rest still
//! to come). It counts them, reports them, and decides when storage retries parked batches.
//! A retry stamps (storage captures pending local writes first), so it waits for a sane
//! clock.

use super::{Event, Gates, NodeConfig, Output, Outputs, Timer, TimerTable, due};
use crate::apply::Parked as ParkedReport;
use std::time::Duration;

/// While batches are parked, look this often for retries a person asked for.
const PARKED_CHECK: Duration = Duration::from_millis(500);

pub(super) struct Parked {
    parked: u64,
    incomplete: u64,
    next_incomplete_alarm: Duration,
    /// Retry all of them at once: the node started, the schema changed, or a snapshot was
    /// restored.
    retry_all: bool,
    /// When to look again for retries a person asked for (`marmot parked retry`).
    next_check: Duration,
}

impl Parked {
    pub(super) fn new() -> Self {
        Parked {
            parked: 0,
            incomplete: 0,
            next_incomplete_alarm: Duration::ZERO,
            retry_all: false,
            next_check: Duration::ZERO,
        }
    }

    /// The counts storage holds at start; everything parked is retried once.
    pub(super) fn recovered(&mut self, parked: u64, incomplete: u64) {
        self.parked = parked;
        self.incomplete = incomplete;
        self.retry_all = true;
    }

    /// Retry every parked batch (batches parked for an unknown table or column may fit now).
    pub(super) fn want_retry_all(&mut self) {
        self.retry_all = true;
    }

    pub(super) fn parked(&self) -> u64 {
        self.parked
    }

    pub(super) fn incomplete(&self) -> u64 {
        self.incomplete
    }

    /// A batch was parked by an apply.
    pub(super) fn parked_one(&mut self, p: &ParkedReport, out: &mut Outputs) {
        self.parked += 1;
        if p.collision {
            out.event(Event::WaitingOnUnique {
                stream_seq: p.stream_seq,
                batch: p.batch,
                reason: p.reason.clone(),
            });
        } else {
            out.event(Event::Parked {
                stream_seq: p.stream_seq,
                batch: p.batch,
                reason: p.reason.clone(),
            });
        }
    }

    /// Batches that waited on a UNIQUE value applied.
    pub(super) fn unparked(&mut self, batches: u64, out: &mut Outputs) {
        if batches > 0 {
            self.parked = self.parked.saturating_sub(batches);
            out.event(Event::Unparked { batches });
        }
    }

    /// A retry's answer: how many are still parked.
    pub(super) fn retried(&mut self, remaining: u64) {
        self.parked = remaining;
    }

    /// The count of incomplete batches after an apply; reported when it changes.
    pub(super) fn incomplete_now(
        &mut self,
        now: Duration,
        count: u64,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) {
        if count != self.incomplete {
            self.incomplete = count;
            self.next_incomplete_alarm = now + cfg.alarm_interval;
            out.event(Event::IncompleteBatches {
                count: self.incomplete,
            });
        }
    }

    /// Retries are made at once when asked for, and while any are parked, now and then for
    /// retries a person asked for. (The look for requested retries is due only while some
    /// batch is parked when the gate opens; the node before sub-machines latched it when it
    /// came due under a closed gate. Storage answers in the drain, so the count cannot
    /// change meanwhile: the same outputs.)
    fn retry_due(&self, g: &Gates) -> Option<Duration> {
        if !g.clock_sane || g.shutting_down {
            return None;
        }
        if self.retry_all {
            Some(Duration::ZERO)
        } else {
            (self.parked > 0).then_some(self.next_check)
        }
    }

    fn incomplete_alarm_due(&self) -> Option<Duration> {
        (self.incomplete > 0).then_some(self.next_incomplete_alarm)
    }

    pub(super) fn arm(&self, g: &Gates, timers: &mut TimerTable) {
        timers.set(Timer::RetryParked, self.retry_due(g));
        timers.set(Timer::IncompleteAlarm, self.incomplete_alarm_due());
    }

    /// Retry parked batches when due; repeat the report of incomplete ones.
    pub(super) fn step(&mut self, now: Duration, g: &Gates, cfg: &NodeConfig, out: &mut Outputs) {
        if due(now, self.retry_due(g)) {
            let all = std::mem::take(&mut self.retry_all);
            self.next_check = now + PARKED_CHECK;
            out.push(Output::RetryParked { all });
        }
        if due(now, self.incomplete_alarm_due()) {
            self.next_incomplete_alarm = now + cfg.alarm_interval;
            out.event(Event::IncompleteBatches {
                count: self.incomplete,
            });
        }
    }
}
