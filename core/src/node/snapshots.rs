//! Snapshots as the node decides them: when to take one (after enough changes, or its
//! interval), when to restore from one (a new node with an empty database, or a node behind
//! the stream), and the restore's phases: wanted, fetching, applying.
//!
//! **Bootstrapping.** Rows a database held before marmot first started on it were never
//! captured, so no batch carries them. A node that starts on such a database (it holds rows,
//! has applied nothing) while the stream is empty is a *seed*: it saves a snapshot as soon as
//! it may, unless the store holds one already ([`crate::snapshot::SaveKind::Seed`]). A node
//! that starts empty restores the newest snapshot; when there is none yet, it reads the stream
//! from its start and keeps looking for a first snapshot (every second at first, then less
//! often, up to the alarm interval) for as long as it stays *fresh*: nothing captured or
//! applied here and nothing restored. It then restores the first snapshot that appears, which
//! is the seed's when a seed started at about the same time. A cluster whose nodes all start
//! empty has no seed: the first write anywhere ends every node's watch.
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
    /// A fresh node with no snapshot to start from: it reads the stream, and looks for a
    /// first snapshot at `restore_retry_at` (see the module doc).
    Watching,
    Wanted(RestoreReason),
    Fetching(RestoreReason),
    Applying(RestoreReason),
}

pub(super) struct Snapshots {
    /// Rows captured and applied here since the last snapshot began.
    changes: u64,
    /// `changes` when the save in flight began: rows counted while it runs are not in its
    /// copy, so they stay counted towards the next one.
    changes_at_save: u64,
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
    /// Started empty, and nothing captured, applied or restored since.
    fresh: bool,
    /// Started on a populated database with nothing applied: a seed if the stream is empty.
    populated_new: bool,
    /// A seed snapshot is due at this time.
    seed_at: Option<Duration>,
    /// The save in flight is a seed.
    saving_seed: bool,
    /// First-snapshot checks made while watching.
    watch_checks: u32,
}

impl Snapshots {
    pub(super) fn new() -> Self {
        Snapshots {
            changes: 0,
            changes_at_save: 0,
            next_save_at: Duration::MAX,
            saving: false,
            restore: RestorePhase::Idle,
            restore_retry_at: Duration::ZERO,
            restore_failures: 0,
            restore_needs: 0,
            fresh: false,
            populated_new: false,
            seed_at: None,
            saving_seed: false,
            watch_checks: 0,
        }
    }

    /// At start: a new node (an empty database, nothing applied) starts from a snapshot
    /// when the policy says so; a node with rows and nothing applied may be a seed.
    pub(super) fn recovered(
        &mut self,
        now: Duration,
        empty: bool,
        position: u64,
        cfg: &NodeConfig,
    ) {
        if let Some(p) = &cfg.snapshots {
            self.next_save_at = p.interval.map_or(Duration::MAX, |i| now + i);
            if p.restore_empty && empty && position == 0 {
                self.restore = RestorePhase::Wanted(RestoreReason::EmptyJoin);
                self.fresh = true;
            }
            self.populated_new = !empty && position == 0;
        }
    }

    /// The stream is prepared, holding messages up to `last_seq` (0: none ever): a node
    /// that started on a populated database with nothing applied seeds the cluster when the
    /// stream is empty.
    /// A populated node joining a stream that has a history is reported: its rows were never
    /// captured, and the cluster's are not in its file.
    pub(super) fn stream_prepared(&mut self, now: Duration, last_seq: u64, out: &mut Outputs) {
        if self.populated_new && last_seq == 0 && self.seed_at.is_none() {
            self.seed_at = Some(now);
        } else if self.populated_new && last_seq > 0 {
            out.event(Event::JoinedWithRows {
                stream_last_seq: last_seq,
            });
        }
        self.populated_new = false;
    }

    /// Rows captured or applied here.
    pub(super) fn count(&mut self, rows: u64) {
        self.changes += rows;
        if rows > 0 {
            self.fresh = false;
            if self.restore == RestorePhase::Watching {
                self.restore = RestorePhase::Idle;
            }
        }
    }

    /// A restore is wanted or under way: no subscription, no snapshot save.
    pub(super) fn restore_pending(&self) -> bool {
        !matches!(self.restore, RestorePhase::Idle | RestorePhase::Watching)
    }

    /// Looking for a first snapshot while reading the stream (see the module doc).
    pub(super) fn watching(&self) -> bool {
        self.restore == RestorePhase::Watching
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
        if cfg.snapshots.is_some()
            && matches!(self.restore, RestorePhase::Idle | RestorePhase::Watching)
        {
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
        let seed = std::mem::take(&mut self.saving_seed);
        let interval = cfg.snapshots.as_ref().and_then(|p| p.interval);
        match r {
            Ok(outcome) => {
                if seed {
                    self.seed_at = None;
                    if let SaveOutcome::UpToDate(existing) = &outcome
                        && existing.node != cfg.node_id
                    {
                        out.event(Event::SeedTaken {
                            existing: existing.clone(),
                        });
                    }
                }
                // Rows counted while the save ran are not in its copy: they count towards
                // the next save, so the newest snapshot stays within about `every_changes`
                // of the head even when writes keep coming during saves (a stream that
                // keeps only a little more than that must still be covered).
                self.changes = self.changes.saturating_sub(self.changes_at_save);
                self.next_save_at = interval.map_or(Duration::MAX, |i| now + i);
                out.event(Event::SnapshotSaved { outcome });
            }
            Err(error) => {
                // Due again at the retry time, or after as many changes again.
                let retry_in = cfg.retry_max.max(Duration::from_secs(5));
                self.next_save_at = now + retry_in;
                if seed {
                    self.seed_at = Some(now + retry_in);
                }
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
                        if self.watch_checks == 0 {
                            out.event(Event::NoSnapshot { reason });
                        }
                        if reason == RestoreReason::EmptyJoin && self.fresh {
                            // Nothing to start from yet: read the stream from the beginning
                            // and look again, more and more rarely, while nothing happens here.
                            self.restore = RestorePhase::Watching;
                            let wait = Duration::from_secs(1) * 2u32.pow(self.watch_checks.min(6));
                            self.restore_retry_at = now + wait.min(cfg.alarm_interval);
                            self.watch_checks += 1;
                        } else if reason == RestoreReason::EmptyJoin {
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
                self.fresh = false;
                Some((reason, report))
            }
            Err(error) => {
                self.restore_failed(now, reason, error.to_string(), cfg, out);
                None
            }
        }
    }

    fn restore_due(&self, g: &Gates) -> Option<Duration> {
        (matches!(
            self.restore,
            RestorePhase::Wanted(_) | RestorePhase::Watching
        ) && !g.shutting_down
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
            && matches!(self.restore, RestorePhase::Idle | RestorePhase::Watching)
            && !g.behind
            && !g.shutting_down;
        if !possible {
            return None;
        }
        if let Some(at) = self.seed_at {
            return Some(at);
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
        let wanted = match self.restore {
            RestorePhase::Wanted(reason) => Some(reason),
            RestorePhase::Watching => Some(RestoreReason::EmptyJoin),
            _ => None,
        };
        if due(now, self.restore_due(g))
            && let Some(reason) = wanted
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
            self.changes_at_save = self.changes;
            self.saving_seed = self.seed_at.is_some();
            out.push(Output::SaveSnapshot {
                position,
                seed: self.saving_seed,
            });
        }
    }
}
