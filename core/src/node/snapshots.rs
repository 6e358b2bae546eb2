//! Snapshots as the node decides them: when to take one (after enough changes, or its
//! interval), when to restore from one (a new node with an empty database, or a node behind
//! the stream), and the restore's phases: wanted, fetching, applying.
//!
//! A restore waits for a sane clock (a merge restore stamps the node's pending writes) and
//! for a save in flight to end (the snapshot procedure releases this node's snapshot lease
//! before fetching, which must not cut a save short). A receive-only node (`publish =
//! false`) never takes snapshots: its database may hold local rows no other node has
//! (nothing captures them), and a node that restored from it would then differ from the
//! others by how it joined. It restores from others'.

use super::{Event, Gates, NodeConfig, Output, Outputs, RestoreReason, Timer, TimerTable, due};
use crate::ports::{RestoreReport, StorageError};
use crate::snapshot::{Fetched, SaveOutcome};
use std::time::Duration;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum RestorePhase {
    Idle,
    Wanted(RestoreReason),
    Fetching(RestoreReason),
    Applying(RestoreReason),
}

pub(super) struct Snapshots {
    /// Rows captured and applied here since the last snapshot.
    changes: u64,
    /// When the next snapshot is due by time (`Duration::MAX`: never).
    next_save_at: Duration,
    saving: bool,
    restore: RestorePhase,
    restore_retry_at: Duration,
    restore_failures: u32,
    /// The smallest snapshot position that gets this node back onto the stream (it holds
    /// every message the stream no longer has): a node behind waits for such a snapshot
    /// instead of restoring one that leaves it behind again.
    restore_needs: u64,
}

impl Snapshots {
    pub(super) fn new() -> Self {
        Snapshots {
            changes: 0,
            next_save_at: Duration::MAX,
            saving: false,
            restore: RestorePhase::Idle,
            restore_retry_at: Duration::ZERO,
            restore_failures: 0,
            restore_needs: 0,
        }
    }

    /// At start: a new node (an empty database, nothing applied) starts from a snapshot
    /// when the policy says so.
    pub(super) fn recovered(&mut self, now: Duration, empty: bool, cfg: &NodeConfig) {
        if let Some(p) = &cfg.snapshots {
            self.next_save_at = p.interval.map_or(Duration::MAX, |i| now + i);
            if p.restore_empty && empty {
                self.restore = RestorePhase::Wanted(RestoreReason::EmptyJoin);
            }
        }
    }

    /// Rows captured or applied here.
    pub(super) fn count(&mut self, rows: u64) {
        self.changes += rows;
    }

    /// A restore is wanted or under way: no subscription, no snapshot save.
    pub(super) fn restore_pending(&self) -> bool {
        self.restore != RestorePhase::Idle
    }

    /// A snapshot is being fetched or restored: no apply.
    pub(super) fn restoring(&self) -> bool {
        matches!(
            self.restore,
            RestorePhase::Fetching(_) | RestorePhase::Applying(_)
        )
    }

    /// The node is behind the stream: it needs a snapshot at position `needs` or later.
    pub(super) fn fell_behind(&mut self, now: Duration, needs: u64, cfg: &NodeConfig) {
        self.restore_needs = needs;
        if cfg.snapshots.is_some() && self.restore == RestorePhase::Idle {
            self.restore = RestorePhase::Wanted(RestoreReason::Behind);
            self.restore_retry_at = now;
        }
    }

    pub(super) fn on_saved(
        &mut self,
        now: Duration,
        r: Result<SaveOutcome, String>,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) {
        self.saving = false;
        let interval = cfg.snapshots.as_ref().and_then(|p| p.interval);
        match r {
            Ok(outcome) => {
                self.changes = 0;
                self.next_save_at = interval.map_or(Duration::MAX, |i| now + i);
                out.event(Event::SnapshotSaved { outcome });
            }
            Err(error) => {
                // Due again at the retry time, or after as many changes again.
                let retry_in = cfg.retry_max.max(Duration::from_secs(5));
                self.next_save_at = now + retry_in;
                self.changes = 0;
                out.event(Event::SnapshotFailed { error, retry_in });
            }
        }
    }

    pub(super) fn on_fetched(
        &mut self,
        now: Duration,
        r: Result<Fetched, String>,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) {
        let RestorePhase::Fetching(reason) = self.restore else {
            return;
        };
        match r {
            Ok(f) => {
                for e in f.rejected {
                    out.event(Event::SnapshotRejected {
                        error: e.to_string(),
                    });
                }
                match f.staged {
                    Some(staged) => {
                        self.restore = RestorePhase::Applying(reason);
                        out.push(Output::RestoreSnapshot(staged));
                    }
                    None => {
                        out.event(Event::NoSnapshot { reason });
                        if reason == RestoreReason::EmptyJoin {
                            // Nothing to start from: read the stream from the beginning.
                            self.restore = RestorePhase::Idle;
                        } else {
                            self.restore = RestorePhase::Wanted(reason);
                            self.restore_retry_at = now + cfg.alarm_interval;
                        }
                    }
                }
            }
            Err(error) => self.restore_failed(now, reason, error, cfg, out),
        }
    }

    fn restore_failed(
        &mut self,
        now: Duration,
        reason: RestoreReason,
        error: String,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) {
        self.restore_failures += 1;
        let retry_in = cfg.retry_max.max(Duration::from_secs(5));
        out.event(Event::SnapshotFailed { error, retry_in });
        if reason == RestoreReason::EmptyJoin && self.restore_failures >= 3 {
            // The store stays unreachable: a new node can still read the stream from the start.
            self.restore = RestorePhase::Idle;
        } else {
            self.restore = RestorePhase::Wanted(reason);
            self.restore_retry_at = now + retry_in;
        }
    }

    /// A restore's answer. Returns why it was made and what it did, when it succeeded.
    pub(super) fn on_restored(
        &mut self,
        now: Duration,
        r: Result<RestoreReport, StorageError>,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) -> Option<(RestoreReason, RestoreReport)> {
        let RestorePhase::Applying(reason) = self.restore else {
            return None;
        };
        match r {
            Ok(report) => {
                self.restore = RestorePhase::Idle;
                self.restore_failures = 0;
                Some((reason, report))
            }
            Err(error) => {
                self.restore_failed(now, reason, error.to_string(), cfg, out);
                None
            }
        }
    }

    fn restore_due(&self, g: &Gates) -> Option<Duration> {
        (matches!(self.restore, RestorePhase::Wanted(_))
            && !g.shutting_down
            && !self.saving
            && g.clock_sane)
            .then_some(self.restore_retry_at)
    }

    fn save_due(&self, g: &Gates, cfg: &NodeConfig) -> Option<Duration> {
        let p = cfg.snapshots.as_ref()?;
        // A snapshot is a copy of the file, and must hold only writes some batch carries
        // (regression 17). A node that cannot stamp (clock not checked, or ahead) cannot
        // capture, so its file holds writes no batch carries: no snapshot then. Otherwise a
        // capture that is due goes first: `Node::step` runs capture before snapshots, and
        // the drive loop performs outputs in order (a capture completes before the copy
        // starts). The save does not wait for capture to settle: under a writer that never
        // pauses it never would.
        let possible = cfg.publish
            && g.claimed
            && g.clock_sane
            && !self.saving
            && self.restore == RestorePhase::Idle
            && !g.behind
            && !g.shutting_down;
        if !possible {
            return None;
        }
        if p.every_changes > 0 && self.changes >= p.every_changes {
            return Some(Duration::ZERO);
        }
        (self.next_save_at != Duration::MAX).then_some(self.next_save_at)
    }

    pub(super) fn arm(&self, g: &Gates, cfg: &NodeConfig, timers: &mut TimerTable) {
        timers.set(Timer::Restore, self.restore_due(g));
        timers.set(Timer::Snapshot, self.save_due(g, cfg));
    }

    /// Restore when wanted, else save when due (`position`: applied through here).
    pub(super) fn step(
        &mut self,
        now: Duration,
        g: &Gates,
        cfg: &NodeConfig,
        position: u64,
        out: &mut Outputs,
    ) {
        if due(now, self.restore_due(g))
            && let RestorePhase::Wanted(reason) = self.restore
        {
            self.restore = RestorePhase::Fetching(reason);
            let min_position = match reason {
                RestoreReason::Behind => self.restore_needs,
                RestoreReason::EmptyJoin => 0,
            };
            out.push(Output::FetchSnapshot { min_position });
        }
        if due(now, self.save_due(g, cfg)) {
            self.saving = true;
            out.push(Output::SaveSnapshot { position });
        }
    }
}
