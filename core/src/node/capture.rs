//! When to look for local changes: after a wake-up hint (and a few times more, shortly
//! after), at least every poll interval, and again after a failed capture.
//!
//! Capture stamps, so it waits for a sane clock (see [`super::Gates::clock_sane`]); writes
//! meanwhile wait, safe, in the change log. What a capture found is the outbox's.

use super::{Backoff, Event, Gates, NodeConfig, Output, Outputs, Timer, TimerTable, due};
use crate::ports::{CaptureOutcome, StorageError};
use std::time::Duration;

/// After a local-change hint, capture is retried for this long (1, 2, 4, ... ms apart).
const HINT_WINDOW: Duration = Duration::from_millis(100);

pub(super) struct Capture {
    /// Something may have changed: capture when possible.
    wanted: bool,
    /// A capture is under way.
    capturing: bool,
    /// Until then, look again after each capture (the hint may have come early).
    hint_until: Duration,
    /// When to look again after the last hint.
    recheck_at: Option<Duration>,
    recheck_delay: Duration,
    /// The fallback poll.
    next_poll_at: Duration,
    /// After a failed capture, not before.
    blocked_until: Duration,
    backoff: Backoff,
}

impl Capture {
    pub(super) fn new(cfg: &NodeConfig) -> Self {
        Capture {
            wanted: false,
            capturing: false,
            hint_until: Duration::ZERO,
            recheck_at: None,
            recheck_delay: Duration::from_millis(1),
            next_poll_at: Duration::ZERO,
            blocked_until: Duration::ZERO,
            backoff: Backoff::new(cfg),
        }
    }

    /// At start: capture what was written while the node was down, and poll from now on.
    pub(super) fn recovered(&mut self, now: Duration) {
        self.wanted = true;
        self.next_poll_at = now;
    }

    /// Capture when possible (a shutdown or a restore wants pending writes captured).
    pub(super) fn want(&mut self) {
        self.wanted = true;
    }

    /// The database may have changed. A file-change hint can come before the writer's commit
    /// is visible (it updates the WAL index after its last write): look again a few times.
    pub(super) fn on_hint(&mut self, now: Duration) {
        self.wanted = true;
        self.hint_until = now + HINT_WINDOW;
        self.recheck_delay = Duration::from_millis(1);
    }

    /// A capture's result; what it found when it succeeded.
    pub(super) fn on_captured(
        &mut self,
        now: Duration,
        r: Result<CaptureOutcome, StorageError>,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) -> Option<CaptureOutcome> {
        self.capturing = false;
        if now < self.hint_until {
            self.recheck_at = Some(now + self.recheck_delay);
            self.recheck_delay *= 2;
        }
        match r {
            Ok(o) => {
                self.backoff.reset(cfg);
                Some(o)
            }
            Err(error) => {
                let retry_in = self.backoff.fail(cfg);
                self.blocked_until = now + retry_in;
                self.wanted = true;
                out.event(Event::StorageFailed { error, retry_in });
                None
            }
        }
    }

    /// No capture is wanted or under way: everything written so far was captured, as far as
    /// this machine knows.
    pub(super) fn settled(&self) -> bool {
        !self.wanted && !self.capturing
    }

    fn capture_due(&self, g: &Gates, cfg: &NodeConfig) -> Option<Duration> {
        (self.wanted && cfg.publish && g.clock_sane && !self.capturing)
            .then_some(self.blocked_until)
    }

    pub(super) fn arm(&self, g: &Gates, cfg: &NodeConfig, timers: &mut TimerTable) {
        timers.set(Timer::Poll, Some(self.next_poll_at));
        timers.set(Timer::Recheck, self.recheck_at);
        timers.set(Timer::Capture, self.capture_due(g, cfg));
    }

    /// The fallback poll is armed even before the node started.
    pub(super) fn arm_poll(&self, timers: &mut TimerTable) {
        timers.set(Timer::Poll, Some(self.next_poll_at));
    }

    pub(super) fn step(&mut self, now: Duration, g: &Gates, cfg: &NodeConfig, out: &mut Outputs) {
        if due(now, self.recheck_at) {
            self.recheck_at = None;
            self.wanted = true;
        }
        if due(now, Some(self.next_poll_at)) {
            self.wanted = true;
            self.next_poll_at = now + cfg.poll_interval;
        }
        if due(now, self.capture_due(g, cfg)) {
            self.wanted = false;
            self.capturing = true;
            out.push(Output::Capture);
        }
    }
}
