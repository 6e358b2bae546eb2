//! The node state machine: what to capture, publish, subscribe to and apply, and when.
//!
//! It never touches the world. Feed it events with [`Node::handle`], then drain
//! [`Node::poll_output`] until `None` and carry the outputs out; call `handle(now,
//! Input::Tick)` again at [`Node::poll_timeout`]. The drive loop in [`crate::drive`] does
//! exactly that and is shared by the daemon and the simulation.
//!
//! Method groups, as in quinn-proto: getters ([`Node::status`], [`Node::clock`]),
//! `handle` (the single mutation entry point), and `poll_*`.
//!
//! What it guarantees:
//! - a captured batch is forgotten only after every one of its messages was acknowledged by
//!   the stream; a failed publish is retried with backoff, for as long as it takes;
//! - deliveries are handed to storage strictly in stream order with no gap; a gap makes it
//!   resubscribe from the first missing sequence; a position older than the stream's first
//!   message stops applying (loudly) instead of skipping;
//! - a node whose wall clock runs ahead of the server by more than the configured bound
//!   stops capturing and applying (which would stamp) until the clock is back in bounds.

use crate::apply::Delivery;
use crate::capture::Captured;
use crate::hlc::{Clock, Stamp};
use crate::ports::{
    ApplyOutcome, Claim, Recovered, RestoreReport, StreamBounds, TransportError, TransportErrorKind,
};
use crate::snapshot::{Fetched, SaveOutcome};
use crate::wire::BatchId;
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// After a local-change hint, capture is retried for this long (1, 2, 4, ... ms apart).
const HINT_WINDOW: Duration = Duration::from_millis(100);

/// While batches are parked, look this often for retries a person asked for.
const PARKED_CHECK: Duration = Duration::from_millis(500);

mod config;
mod timer;
mod vocabulary;

pub use config::{NodeConfig, RestoreReason, SnapshotPolicy};
pub use timer::Timer;
use timer::TimerTable;
pub use vocabulary::{Event, Input, Output, Status, Stop};

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum RestorePhase {
    Idle,
    Wanted(RestoreReason),
    Fetching(RestoreReason),
    Applying(RestoreReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Pending,
    Ready,
    RetryAt(Duration),
}

#[derive(Clone, Copy, Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new(cfg: &NodeConfig) -> Self {
        Backoff {
            next: cfg.retry_min,
        }
    }
    fn fail(&mut self, cfg: &NodeConfig) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(cfg.retry_max);
        d
    }
    fn reset(&mut self, cfg: &NodeConfig) {
        self.next = cfg.retry_min;
    }
}

struct OutBatch {
    acked: Vec<bool>,
    unacked: u32,
    payloads: Option<Vec<Bytes>>,
    cached: usize,
}

/// The node state machine.
pub struct Node {
    cfg: NodeConfig,
    clock: Clock,
    started: bool,
    position: u64,
    next_seq: u64,

    stream: Phase,
    stream_backoff: Backoff,
    claim: Phase,
    claimed_once: bool,
    connected: bool,
    claim_backoff: Backoff,

    sub: Phase,
    sub_backoff: Backoff,
    behind: Option<Event>,
    next_alarm_at: Duration,

    queue: VecDeque<Delivery>,
    queued_bytes: usize,
    apply_blocked_until: Duration,
    apply_backoff: Backoff,
    apply_started_at: Option<Duration>,
    apply_limit: usize,
    lag_messages: u64,
    lag_ms: u64,

    capture_wanted: bool,
    capturing: bool,
    hint_until: Duration,
    recheck_at: Option<Duration>,
    recheck_delay: Duration,
    next_poll_at: Duration,
    capture_blocked_until: Duration,
    capture_backoff: Backoff,

    batches: BTreeMap<BatchId, OutBatch>,
    send_queue: VecDeque<(BatchId, u32)>,
    in_flight: usize,
    publish_blocked_until: Duration,
    publish_backoff: Backoff,
    cached_bytes: usize,

    skew_ms: i64,
    skew_paused: bool,
    /// The server's clock at the last check, and when (monotonic): see `stamp_time`.
    server_time: Option<(Duration, u64)>,

    parked: u64,
    incomplete: u64,
    next_incomplete_alarm: Duration,
    parked_retry: Option<bool>,
    next_parked_check: Duration,

    shutdown_deadline: Option<Duration>,
    stopped: bool,
    outputs: VecDeque<Output>,
    last_now: Duration,
    sub_generation: u64,

    snapshot_changes: u64,
    next_snapshot_at: Duration,
    saving: bool,
    restore: RestorePhase,
    restore_retry_at: Duration,
    restore_failures: u32,
    /// The smallest snapshot position that gets this node back onto the stream (it holds
    /// every message the stream no longer has): a node behind waits for such a snapshot
    /// instead of restoring one that leaves it behind again.
    restore_needs: u64,
    /// The highest stream sequence known to exist (from acknowledgements and deliveries).
    stream_head: u64,
    /// Publishing waits for this node to apply more of the stream (see `max_lag`).
    lag_throttled: bool,
    /// Every deadline, armed at the end of each `handle` (see [`timer`]).
    timers: TimerTable,
}

impl Node {
    /// A node that waits for [`Input::Recovered`].
    pub fn new(cfg: NodeConfig) -> Self {
        let b = Backoff::new(&cfg);
        Node {
            clock: Clock::new(Stamp::ZERO),
            started: false,
            position: 0,
            next_seq: 1,
            stream: Phase::Idle,
            stream_backoff: b,
            claim: Phase::Idle,
            claimed_once: false,
            connected: false,
            claim_backoff: b,
            sub: Phase::Idle,
            sub_backoff: b,
            behind: None,
            next_alarm_at: Duration::ZERO,
            queue: VecDeque::new(),
            queued_bytes: 0,
            apply_blocked_until: Duration::ZERO,
            apply_backoff: b,
            apply_started_at: None,
            apply_limit: 16,
            lag_messages: 0,
            lag_ms: 0,
            capture_wanted: false,
            capturing: false,
            hint_until: Duration::ZERO,
            recheck_at: None,
            recheck_delay: Duration::from_millis(1),
            next_poll_at: Duration::ZERO,
            capture_blocked_until: Duration::ZERO,
            capture_backoff: b,
            batches: BTreeMap::new(),
            send_queue: VecDeque::new(),
            in_flight: 0,
            publish_blocked_until: Duration::ZERO,
            publish_backoff: b,
            cached_bytes: 0,
            skew_ms: 0,
            skew_paused: false,
            server_time: None,
            parked: 0,
            incomplete: 0,
            next_incomplete_alarm: Duration::ZERO,
            parked_retry: None,
            next_parked_check: Duration::ZERO,
            shutdown_deadline: None,
            stopped: false,
            outputs: VecDeque::new(),
            last_now: Duration::ZERO,
            sub_generation: 0,
            snapshot_changes: 0,
            next_snapshot_at: Duration::MAX,
            saving: false,
            restore: RestorePhase::Idle,
            restore_retry_at: Duration::ZERO,
            restore_failures: 0,
            restore_needs: 0,
            stream_head: 0,
            lag_throttled: false,
            timers: TimerTable::default(),
            cfg,
        }
    }

    // ---- getters -------------------------------------------------------------------------

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The hybrid logical clock (storage stamps and merges with it).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The clock, for storage calls made on the node's behalf ([`Output::Capture`],
    /// [`Output::Apply`], [`Output::RetryParked`]).
    pub fn clock_mut(&mut self) -> &mut Clock {
        &mut self.clock
    }

    /// The wall time to stamp with at monotonic time `now`, given the local wall clock reads
    /// `wall_ms`: the later of the local wall clock and the server's clock as last measured
    /// plus the monotonic time since. A wall clock that lags the server's does not stamp into
    /// the past (stamps far in the past would fall below the tombstone horizon of snapshots
    /// taken meanwhile, whose merge takes such a version, absent from the snapshot, for a
    /// collected delete); the estimate follows monotonic time, so a wall clock that jumps
    /// forward after the check adds nothing to it. Pass it to every storage call that stamps.
    pub fn stamp_time(&self, now: Duration, wall_ms: u64) -> u64 {
        match self.server_time {
            Some((at, server_ms)) => {
                let since = now.saturating_sub(at).as_millis() as u64;
                wall_ms.max(server_ms.saturating_add(since))
            }
            None => wall_ms,
        }
    }

    /// Whether the node wants more deliveries now (false: stop reading the stream for a
    /// while; the transport buffers).
    pub fn wants_deliveries(&self) -> bool {
        self.sub == Phase::Ready
            && self.queue.len() < self.cfg.max_buffered_deliveries
            && self.queued_bytes < self.cfg.max_buffered_bytes
    }

    /// Health and gauges.
    pub fn status(&self) -> Status {
        Status {
            started: self.started,
            stream_ready: self.stream == Phase::Ready,
            claimed: self.claimed_once,
            connected: self.connected,
            subscribed: self.sub == Phase::Ready,
            behind: self.behind.is_some(),
            clock_paused: self.skew_paused,
            position: self.position,
            lag_messages: self.lag_messages + self.queue.len() as u64,
            lag_ms: self.lag_ms,
            outbox_batches: self.batches.len() as u64,
            outbox_messages: self.batches.values().map(|b| u64::from(b.unacked)).sum(),
            in_flight: self.in_flight as u64,
            parked: self.parked,
            incomplete_batches: self.incomplete,
            clock_skew_ms: self.skew_ms,
            clock_high_water: self.clock.high_water().as_u64(),
        }
    }

    // ---- handle --------------------------------------------------------------------------

    /// Feeds one input at monotonic time `now`. Drain [`Node::poll_output`] afterwards.
    pub fn handle(&mut self, now: Duration, input: Input) {
        if self.stopped {
            return;
        }
        self.last_now = self.last_now.max(now);
        match input {
            Input::Recovered(r) => self.on_recovered(now, r),
            Input::LocalChange => {
                // A file-change hint can come before the writer's commit is visible (it
                // updates the WAL index after its last write): look again a few times.
                self.capture_wanted = true;
                self.hint_until = now + HINT_WINDOW;
                self.recheck_delay = Duration::from_millis(1);
            }
            Input::Captured(r) => {
                self.capturing = false;
                if now < self.hint_until {
                    self.recheck_at = Some(now + self.recheck_delay);
                    self.recheck_delay *= 2;
                }
                match r {
                    Ok(o) => {
                        self.capture_backoff.reset(&self.cfg);
                        if let Some(c) = o.captured {
                            self.add_batch(c);
                        }
                        if o.unparked > 0 {
                            self.parked = self.parked.saturating_sub(o.unparked);
                            self.event(Event::Unparked {
                                batches: o.unparked,
                            });
                        }
                        if o.schema_changed {
                            self.schema_changed();
                        }
                    }
                    Err(error) => {
                        let retry_in = self.capture_backoff.fail(&self.cfg);
                        self.capture_blocked_until = now + retry_in;
                        self.capture_wanted = true;
                        self.event(Event::StorageFailed {
                            operation: "capture",
                            error,
                            retry_in,
                        });
                    }
                }
            }
            Input::Prepared(r) => self.on_prepared(now, r),
            Input::Claimed {
                result,
                sent_wall_ms,
                received_wall_ms,
            } => self.on_claimed(now, result, sent_wall_ms, received_wall_ms),
            Input::Subscribed { generation, result } => {
                if generation == self.sub_generation {
                    self.on_subscribed(now, result);
                } else {
                    // Superseded while it was being set up: the driver drops it.
                    self.outputs.push_back(Output::Unsubscribe { generation });
                }
            }
            Input::Delivered {
                generation,
                deliveries,
            } => {
                if generation == self.sub_generation {
                    self.on_delivered(now, deliveries);
                }
            }
            Input::SubscriptionEnded { generation, error } => {
                if generation == self.sub_generation
                    && (self.sub == Phase::Ready || self.sub == Phase::Pending)
                {
                    let retry_in = self.sub_backoff.fail(&self.cfg);
                    self.sub = Phase::RetryAt(now + retry_in);
                    self.event(Event::SubscriptionLost { error, retry_in });
                }
            }
            Input::Published {
                batch,
                chunk,
                result,
            } => self.on_published(now, batch, chunk, result),
            Input::Applied {
                result,
                deliveries,
                wall_ms,
            } => self.on_applied(now, result, deliveries, wall_ms),
            Input::MarkedPublished(r) => {
                if let Err(error) = r {
                    // The batch stays in the outbox and is republished after a restart:
                    // same message ids, and applying it twice changes nothing.
                    self.event(Event::StorageFailed {
                        operation: "mark published",
                        error,
                        retry_in: Duration::ZERO,
                    });
                }
            }
            Input::ParkedRetried(r) => match r {
                Ok(r) => {
                    self.parked = r.remaining;
                    if let Some(c) = r.captured {
                        self.add_batch(c);
                    }
                    if r.attempted > 0 {
                        self.event(Event::ParkedRetried {
                            applied: r.applied,
                            remaining: r.remaining,
                        });
                    }
                }
                Err(error) => {
                    self.event(Event::StorageFailed {
                        operation: "retry parked",
                        error,
                        retry_in: self.cfg.poll_interval,
                    });
                }
            },
            Input::SnapshotSaved(r) => self.on_snapshot_saved(now, r),
            Input::SnapshotFetched(r) => self.on_snapshot_fetched(now, r),
            Input::Restored(r) => self.on_restored(now, r),
            Input::Shutdown => {
                if self.shutdown_deadline.is_none() {
                    self.shutdown_deadline = Some(now + self.cfg.shutdown_grace);
                    self.capture_wanted = true;
                    if self.sub != Phase::Idle {
                        self.sub = Phase::Idle;
                        self.outputs.push_back(Output::Unsubscribe {
                            generation: self.sub_generation,
                        });
                    }
                }
            }
            Input::Tick => {}
        }
        self.step(now);
        self.arm_timers();
    }

    /// The next thing to do, if any. Call until `None` after every [`Node::handle`].
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When to feed [`Input::Tick`] at the latest: the earliest deadline of the timer table.
    pub fn poll_timeout(&self) -> Duration {
        self.poll_timer().0
    }

    /// [`Node::poll_timeout`] and the [`Timer`] that set it (a trace of why the node woke).
    pub fn poll_timer(&self) -> (Duration, Timer) {
        // The fallback poll is always armed.
        let (at, timer) = self
            .timers
            .next()
            .unwrap_or((self.next_poll_at, Timer::Poll));
        // Everything due at `last_now` was done by the last `handle`.
        (at.max(self.last_now + Duration::from_millis(1)), timer)
    }

    // ---- internals -----------------------------------------------------------------------

    fn event(&mut self, e: Event) {
        self.outputs.push_back(Output::Event(e));
    }

    fn on_recovered(&mut self, now: Duration, r: Recovered) {
        self.started = true;
        self.clock = Clock::new(r.clock).with_max_lead(self.cfg.max_clock_skew_ms);
        self.position = r.position;
        self.next_seq = r.position + 1;
        self.incomplete = r.incomplete_batches;
        self.parked = r.parked;
        for (batch, chunks) in r.outbox {
            self.batches.insert(
                batch,
                OutBatch {
                    acked: vec![false; chunks as usize],
                    unacked: chunks,
                    payloads: None,
                    cached: 0,
                },
            );
            self.send_queue.extend((0..chunks).map(|c| (batch, c)));
        }
        self.capture_wanted = true;
        self.parked_retry = Some(true);
        self.next_poll_at = now;
        if let Some(p) = &self.cfg.snapshots {
            self.next_snapshot_at = p.interval.map_or(Duration::MAX, |i| now + i);
            if p.restore_empty && r.empty && r.position == 0 {
                self.restore = RestorePhase::Wanted(RestoreReason::EmptyJoin);
            }
        }
    }

    fn add_batch(&mut self, c: Captured) {
        self.snapshot_changes += c.rows;
        let chunks = c.messages.len() as u32;
        self.event(Event::Captured {
            batch: c.batch,
            rows: c.rows,
            messages: c.messages.len(),
        });
        if !self.cfg.publish {
            // Cannot happen in a correctly wired node (no triggers without publish); keep the
            // batch in the outbox rather than lose it.
            return;
        }
        let size: usize = c.messages.iter().map(Bytes::len).sum();
        let (payloads, cached) = if self.cached_bytes + size <= self.cfg.max_cached_bytes {
            self.cached_bytes += size;
            (Some(c.messages), size)
        } else {
            (None, 0)
        };
        self.batches.insert(
            c.batch,
            OutBatch {
                acked: vec![false; chunks as usize],
                unacked: chunks,
                payloads,
                cached,
            },
        );
        self.send_queue.extend((0..chunks).map(|i| (c.batch, i)));
    }

    fn on_prepared(&mut self, now: Duration, r: Result<StreamBounds, TransportError>) {
        match r {
            Ok(bounds) => {
                self.stream = Phase::Ready;
                self.stream_backoff.reset(&self.cfg);
                self.event(Event::StreamReady { bounds });
            }
            Err(error) => {
                let retry_in = self.stream_backoff.fail(&self.cfg);
                self.stream = Phase::RetryAt(now + retry_in);
                self.event(Event::StreamUnavailable { error, retry_in });
            }
        }
    }

    fn on_claimed(
        &mut self,
        now: Duration,
        result: Result<Claim, TransportError>,
        sent: u64,
        received: u64,
    ) {
        match result {
            Ok(Claim::Granted { server_ms, .. }) => {
                self.connected = true;
                if !self.claimed_once {
                    self.event(Event::ClaimGranted);
                }
                self.claimed_once = true;
                self.claim_backoff.reset(&self.cfg);
                self.claim = Phase::RetryAt(now + self.cfg.claim_interval);
                // The server stamped the claim between our two readings.
                let local_mid = sent / 2 + received / 2 + (sent % 2 + received % 2) / 2;
                let uncertainty = (received.saturating_sub(sent) / 2) as i64;
                let bound = self.cfg.max_clock_skew_ms as i64;
                let wall_skew = local_mid as i64 - server_ms as i64;
                // The server's clock as of now; a wall clock that lags stamps with it
                // instead (see `stamp_time`).
                self.server_time = Some((now, server_ms));
                // The stamps this node would give follow the later of its wall clock and its
                // high-water mark. A high-water mark that leads while the wall clock is right
                // (it stamped while the wall clock ran fast, before a check caught it) is
                // brought back: waiting for real time to catch up would stop this node for
                // as long as the clock had jumped.
                let mut lowered = false;
                let hw_skew = self.clock.high_water().wall_ms() as i64 - server_ms as i64;
                if wall_skew - uncertainty <= bound && hw_skew - uncertainty > bound {
                    self.clock.lower_to(received.max(server_ms));
                    lowered = true;
                }
                let stamp_skew =
                    wall_skew.max(self.clock.high_water().wall_ms() as i64 - server_ms as i64);
                // Only a lead beyond the bound plus the measurement's own uncertainty pauses.
                let ahead = stamp_skew - uncertainty > bound;
                let changed = ahead != self.skew_paused;
                self.skew_ms = stamp_skew;
                self.skew_paused = ahead;
                if changed || ahead || lowered {
                    self.event(Event::ClockSkew {
                        skew_ms: stamp_skew,
                        paused: ahead,
                        lowered_high_water: lowered.then_some(hw_skew),
                    });
                }
            }
            Ok(Claim::Held { by }) => {
                self.stopped = true;
                self.outputs
                    .push_back(Output::Stop(Stop::NodeIdInUse { holder: by }));
            }
            Err(error) => {
                self.connected = false;
                let retry_in = self.claim_backoff.fail(&self.cfg);
                self.claim = Phase::RetryAt(now + retry_in);
                self.event(Event::ClaimFailed { error });
            }
        }
    }

    fn on_subscribed(&mut self, now: Duration, r: Result<StreamBounds, TransportError>) {
        if self.sub != Phase::Pending {
            // Unsubscribed meanwhile (shutdown): drop it.
            self.outputs.push_back(Output::Unsubscribe {
                generation: self.sub_generation,
            });
            return;
        }
        match r {
            Ok(bounds) => {
                self.stream_head = self.stream_head.max(bounds.last_seq);
                if bounds.first_seq > self.next_seq {
                    self.sub = Phase::Idle;
                    self.outputs.push_back(Output::Unsubscribe {
                        generation: self.sub_generation,
                    });
                    self.set_behind(
                        now,
                        Event::Behind {
                            position: self.next_seq - 1,
                            first_seq: bounds.first_seq,
                        },
                    );
                } else if bounds.last_seq + 1 < self.next_seq {
                    self.sub = Phase::Idle;
                    self.outputs.push_back(Output::Unsubscribe {
                        generation: self.sub_generation,
                    });
                    self.set_behind(
                        now,
                        Event::StreamReset {
                            position: self.next_seq - 1,
                            last_seq: bounds.last_seq,
                        },
                    );
                } else {
                    self.sub = Phase::Ready;
                    self.sub_backoff.reset(&self.cfg);
                    self.event(Event::Subscribed {
                        from_seq: self.next_seq,
                    });
                }
            }
            Err(error) => {
                let retry_in = self.sub_backoff.fail(&self.cfg);
                self.sub = Phase::RetryAt(now + retry_in);
                self.event(Event::SubscriptionLost {
                    error: Some(error),
                    retry_in,
                });
            }
        }
    }

    fn set_behind(&mut self, now: Duration, alarm: Event) {
        self.restore_needs = match alarm {
            Event::Behind { first_seq, .. } => first_seq - 1,
            // The stream was replaced and is shorter than what this node applied: no snapshot
            // of it can be ahead of this node yet.
            _ => self.position + 1,
        };
        self.event(alarm.clone());
        self.behind = Some(alarm);
        self.next_alarm_at = now + self.cfg.alarm_interval;
        if self.cfg.snapshots.is_some() && self.restore == RestorePhase::Idle {
            self.restore = RestorePhase::Wanted(RestoreReason::Behind);
            self.restore_retry_at = now;
        }
    }

    fn on_snapshot_saved(&mut self, now: Duration, r: Result<SaveOutcome, String>) {
        self.saving = false;
        let interval = self.cfg.snapshots.as_ref().and_then(|p| p.interval);
        match r {
            Ok(outcome) => {
                self.snapshot_changes = 0;
                self.next_snapshot_at = interval.map_or(Duration::MAX, |i| now + i);
                self.event(Event::SnapshotSaved { outcome });
            }
            Err(error) => {
                // Due again at the retry time, or after as many changes again.
                let retry_in = self.cfg.retry_max.max(Duration::from_secs(5));
                self.next_snapshot_at = now + retry_in;
                self.snapshot_changes = 0;
                self.event(Event::SnapshotFailed { error, retry_in });
            }
        }
    }

    fn on_snapshot_fetched(&mut self, now: Duration, r: Result<Fetched, String>) {
        let RestorePhase::Fetching(reason) = self.restore else {
            return;
        };
        match r {
            Ok(f) => {
                for e in f.rejected {
                    self.event(Event::SnapshotRejected {
                        error: e.to_string(),
                    });
                }
                match f.staged {
                    Some(staged) => {
                        self.restore = RestorePhase::Applying(reason);
                        self.outputs.push_back(Output::RestoreSnapshot(staged));
                    }
                    None => {
                        self.event(Event::NoSnapshot { reason });
                        if reason == RestoreReason::EmptyJoin {
                            // Nothing to start from: read the stream from the beginning.
                            self.restore = RestorePhase::Idle;
                        } else {
                            self.restore = RestorePhase::Wanted(reason);
                            self.restore_retry_at = now + self.cfg.alarm_interval;
                        }
                    }
                }
            }
            Err(error) => self.restore_failed(now, reason, error),
        }
    }

    fn restore_failed(&mut self, now: Duration, reason: RestoreReason, error: String) {
        self.restore_failures += 1;
        let retry_in = self.cfg.retry_max.max(Duration::from_secs(5));
        self.event(Event::SnapshotFailed { error, retry_in });
        if reason == RestoreReason::EmptyJoin && self.restore_failures >= 3 {
            // The store stays unreachable: a new node can still read the stream from the start.
            self.restore = RestorePhase::Idle;
        } else {
            self.restore = RestorePhase::Wanted(reason);
            self.restore_retry_at = now + retry_in;
        }
    }

    fn on_restored(&mut self, now: Duration, r: Result<RestoreReport, String>) {
        let RestorePhase::Applying(reason) = self.restore else {
            return;
        };
        match r {
            Ok(rep) => {
                self.restore = RestorePhase::Idle;
                self.restore_failures = 0;
                self.position = self.position.max(rep.position);
                self.next_seq = self.position + 1;
                self.behind = None;
                // Whatever was buffered is at or below the new position, or follows it: read
                // again from the new position.
                self.queue.clear();
                self.queued_bytes = 0;
                if self.sub != Phase::Idle {
                    self.outputs.push_back(Output::Unsubscribe {
                        generation: self.sub_generation,
                    });
                }
                self.sub = Phase::Idle;
                self.capture_wanted = true;
                self.parked_retry = Some(true);
                if let Some(c) = rep.captured {
                    self.add_batch(c);
                }
                self.event(Event::Restored {
                    reason,
                    generation: rep.generation,
                    position: rep.position,
                    merged: rep.merged,
                });
            }
            Err(error) => self.restore_failed(now, reason, error),
        }
    }

    fn on_delivered(&mut self, now: Duration, ds: Vec<Delivery>) {
        if self.sub != Phase::Ready {
            return;
        }
        for d in ds {
            if d.stream_seq < self.next_seq {
                continue; // redelivered
            }
            if d.stream_seq > self.next_seq {
                self.event(Event::Gap {
                    expected: self.next_seq,
                    received: d.stream_seq,
                });
                self.sub = Phase::RetryAt(now);
                self.outputs.push_back(Output::Unsubscribe {
                    generation: self.sub_generation,
                });
                return;
            }
            self.next_seq += 1;
            self.lag_messages = d.pending;
            self.stream_head = self.stream_head.max(d.stream_seq + d.pending);
            self.queued_bytes += d.payload.len();
            self.queue.push_back(d);
        }
    }

    fn on_published(
        &mut self,
        now: Duration,
        batch: BatchId,
        chunk: u32,
        result: Result<u64, TransportError>,
    ) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match result {
            Ok(seq) => {
                self.stream_head = self.stream_head.max(seq);
                self.publish_backoff.reset(&self.cfg);
                let Some(b) = self.batches.get_mut(&batch) else {
                    return;
                };
                let Some(acked) = b.acked.get_mut(chunk as usize) else {
                    return;
                };
                if !*acked {
                    *acked = true;
                    b.unacked -= 1;
                }
                if b.unacked == 0 {
                    let cached = b.cached;
                    self.cached_bytes -= cached;
                    self.batches.remove(&batch);
                    self.outputs.push_back(Output::MarkPublished(batch));
                    self.event(Event::BatchPublished { batch });
                }
            }
            Err(error) => {
                if self.batches.contains_key(&batch) {
                    self.send_queue.push_front((batch, chunk));
                }
                let retry_in = if error.kind == TransportErrorKind::TooLarge {
                    self.cfg.retry_max
                } else {
                    self.publish_backoff.fail(&self.cfg)
                };
                self.publish_blocked_until = self.publish_blocked_until.max(now + retry_in);
                self.event(Event::PublishFailed { error, retry_in });
            }
        }
    }

    fn on_applied(
        &mut self,
        now: Duration,
        result: Result<ApplyOutcome, String>,
        deliveries: Vec<Delivery>,
        wall_ms: u64,
    ) {
        let took = self
            .apply_started_at
            .take()
            .map_or(Duration::ZERO, |s| now.saturating_sub(s));
        match result {
            Ok(o) => {
                self.apply_backoff.reset(&self.cfg);
                // Size the next transaction so it holds the write lock about apply_target.
                if took > self.cfg.apply_target {
                    self.apply_limit = (self.apply_limit / 2).max(1);
                } else if took < self.cfg.apply_target / 2 && deliveries.len() >= self.apply_limit {
                    self.apply_limit = (self.apply_limit * 2).min(self.cfg.apply_max_messages);
                }
                let r = o.report;
                self.snapshot_changes += r.rows_written;
                self.position = self.position.max(r.through_seq);
                self.lag_ms = if self.queue.is_empty() && r.through_pending == 0 {
                    0
                } else {
                    wall_ms.saturating_sub(r.through_published_ms)
                };
                if o.incomplete_batches != self.incomplete {
                    self.incomplete = o.incomplete_batches;
                    self.next_incomplete_alarm = now + self.cfg.alarm_interval;
                    self.event(Event::IncompleteBatches {
                        count: self.incomplete,
                    });
                }
                if let Some(c) = o.captured {
                    self.add_batch(c);
                }
                for p in &r.parked {
                    self.parked += 1;
                    if p.collision {
                        self.event(Event::WaitingOnUnique {
                            stream_seq: p.stream_seq,
                            batch: p.batch,
                            reason: p.reason.clone(),
                        });
                    } else {
                        self.event(Event::Parked {
                            stream_seq: p.stream_seq,
                            batch: p.batch,
                            reason: p.reason.clone(),
                        });
                    }
                }
                if r.unparked > 0 {
                    self.parked = self.parked.saturating_sub(r.unparked);
                    self.event(Event::Unparked {
                        batches: r.unparked,
                    });
                }
                if o.schema_changed {
                    self.schema_changed();
                }
                self.event(Event::Applied {
                    through_seq: r.through_seq,
                    batches: r.batches,
                    rows_written: r.rows_written,
                    rows_skipped: r.rows_skipped,
                    conflicts: r.conflicts,
                    own_messages: r.own_messages,
                    took,
                });
            }
            Err(error) => {
                for d in deliveries.into_iter().rev() {
                    self.queued_bytes += d.payload.len();
                    self.queue.push_front(d);
                }
                self.apply_limit = (self.apply_limit / 2).max(1);
                let retry_in = self.apply_backoff.fail(&self.cfg);
                self.apply_blocked_until = now + retry_in;
                self.event(Event::StorageFailed {
                    operation: "apply",
                    error,
                    retry_in,
                });
            }
        }
    }

    fn schema_changed(&mut self) {
        self.event(Event::SchemaChanged);
        // Batches parked for an unknown table or column may fit now.
        self.parked_retry = Some(true);
    }

    /// The conditions that gate several jobs, computed in one place. Read afresh before each
    /// job in `step`: a job taken earlier in the same step can close a later one's gate (a
    /// snapshot fetch stops applying).
    fn gates(&self) -> Gates {
        Gates {
            stream_ready: self.stream == Phase::Ready,
            claimed: self.claimed_once,
            clock_sane: self.claimed_once && !self.skew_paused,
            shutting_down: self.shutdown_deadline.is_some(),
            restore_pending: self.restore != RestorePhase::Idle,
            restoring: matches!(
                self.restore,
                RestorePhase::Fetching(_) | RestorePhase::Applying(_)
            ),
            behind: self.behind.is_some(),
            saving: self.saving,
        }
    }

    /// Too far ahead of what this node applied to publish more (see `max_lag`). A node that
    /// does not read the stream (`replicate = false`) is not limited: waiting would not make
    /// it read. A node behind the stream and waiting for a snapshot is limited like any other
    /// (its position is old, so it holds everything): its writes wait, safe, in the outbox
    /// until it restored. Publishing them unpaced pushed the nodes that were still reading
    /// off the stream's end too, and then no node could take the snapshot everyone needed
    /// (regression 05).
    fn too_far_ahead(&self) -> bool {
        self.cfg.replicate
            && self
                .cfg
                .max_lag
                .is_some_and(|l| self.stream_head.saturating_sub(self.position) >= l)
    }

    /// Publishing is possible at all: publish on, the stream prepared, the node id claimed.
    fn can_publish(&self, g: &Gates) -> bool {
        self.cfg.publish && g.stream_ready && g.claimed
    }

    // ---- when each job is due ------------------------------------------------------------
    //
    // One function per timer: `None` while the job is blocked, else the time it is due (at
    // or before `now`: at once). `step` takes a job when it is due; `arm_timers` arms the
    // table from the same functions.

    fn stream_due(&self) -> Option<Duration> {
        match self.stream {
            Phase::Idle => Some(Duration::ZERO),
            Phase::RetryAt(at) => Some(at),
            Phase::Pending | Phase::Ready => None,
        }
    }

    fn claim_due(&self, g: &Gates) -> Option<Duration> {
        if !g.stream_ready {
            return None;
        }
        match self.claim {
            Phase::Idle => Some(Duration::ZERO),
            Phase::RetryAt(at) => Some(at),
            Phase::Pending | Phase::Ready => None,
        }
    }

    /// Capture stamps, so it waits until the clock was checked against the server once (a
    /// node started with a far-future clock must not stamp), and pauses while it is ahead.
    /// Writes meanwhile wait, safe, in the change log.
    fn capture_due(&self, g: &Gates) -> Option<Duration> {
        (self.capture_wanted && self.cfg.publish && g.clock_sane && !self.capturing)
            .then_some(self.capture_blocked_until)
    }

    /// A restore may start: a merge restore captures (stamps) pending local writes first. A
    /// fetch waits for a save in flight to end: the snapshot procedure releases this node's
    /// snapshot lease before fetching, which must not cut a save short.
    fn restore_due(&self, g: &Gates) -> Option<Duration> {
        (matches!(self.restore, RestorePhase::Wanted(_))
            && !g.shutting_down
            && !g.saving
            && g.clock_sane)
            .then_some(self.restore_retry_at)
    }

    /// A receive-only node (`publish = false`) never takes snapshots: its database may hold
    /// local rows no other node has (nothing captures them), and a node that restored from
    /// it would then differ from the others by how it joined. It restores from others'.
    fn snapshot_due(&self, g: &Gates) -> Option<Duration> {
        let p = self.cfg.snapshots.as_ref()?;
        let possible = self.cfg.publish
            && g.claimed
            && !g.saving
            && !g.restore_pending
            && !g.behind
            && !g.shutting_down;
        if !possible {
            return None;
        }
        if p.every_changes > 0 && self.snapshot_changes >= p.every_changes {
            return Some(Duration::ZERO);
        }
        (self.next_snapshot_at != Duration::MAX).then_some(self.next_snapshot_at)
    }

    /// Parked batches are retried at once when asked (at start, after a schema change or a
    /// restore), and while any are parked, now and then for retries a person asked for (with
    /// `marmot parked retry`). A retry stamps (it captures first).
    fn retry_parked_due(&self, g: &Gates) -> Option<Duration> {
        if !g.clock_sane || g.shutting_down {
            return None;
        }
        match self.parked_retry {
            Some(_) => Some(Duration::ZERO),
            None => (self.parked > 0).then_some(self.next_parked_check),
        }
    }

    fn subscribe_due(&self, g: &Gates) -> Option<Duration> {
        if g.restore_pending
            || !self.cfg.replicate
            || g.shutting_down
            || g.behind
            || !g.stream_ready
        {
            return None;
        }
        match self.sub {
            Phase::Idle => Some(Duration::ZERO),
            Phase::RetryAt(at) => Some(at),
            Phase::Pending | Phase::Ready => None,
        }
    }

    fn incomplete_alarm_due(&self) -> Option<Duration> {
        (self.incomplete > 0).then_some(self.next_incomplete_alarm)
    }

    fn behind_alarm_due(&self) -> Option<Duration> {
        self.behind.is_some().then_some(self.next_alarm_at)
    }

    /// Apply stamps (it captures pending local writes first); one transaction at a time; not
    /// while a snapshot is fetched or restored, nor once shutting down.
    fn apply_due(&self, g: &Gates) -> Option<Duration> {
        (!self.queue.is_empty()
            && !g.restoring
            && self.apply_started_at.is_none()
            && g.clock_sane
            && !g.shutting_down)
            .then_some(self.apply_blocked_until)
    }

    fn publish_due(&self, g: &Gates) -> Option<Duration> {
        (!self.send_queue.is_empty()
            && self.can_publish(g)
            && self.in_flight < self.cfg.publish_window
            && !self.too_far_ahead())
        .then_some(self.publish_blocked_until)
    }

    /// Arms the timer table from the same functions `step` asks: a timer is set exactly while
    /// its job is possible.
    fn arm_timers(&mut self) {
        self.timers.set(Timer::Poll, Some(self.next_poll_at));
        if !self.started || self.stopped {
            for t in Timer::ALL {
                if t != Timer::Poll {
                    self.timers.set(t, None);
                }
            }
            return;
        }
        let g = self.gates();
        let table = [
            (Timer::Stream, self.stream_due()),
            (Timer::Claim, self.claim_due(&g)),
            (Timer::Recheck, self.recheck_at),
            (Timer::Capture, self.capture_due(&g)),
            (Timer::Restore, self.restore_due(&g)),
            (Timer::Snapshot, self.snapshot_due(&g)),
            (Timer::RetryParked, self.retry_parked_due(&g)),
            (Timer::Subscribe, self.subscribe_due(&g)),
            (Timer::IncompleteAlarm, self.incomplete_alarm_due()),
            (Timer::BehindAlarm, self.behind_alarm_due()),
            (Timer::Apply, self.apply_due(&g)),
            (Timer::Publish, self.publish_due(&g)),
            (Timer::Shutdown, self.shutdown_deadline),
        ];
        for (timer, deadline) in table {
            self.timers.set(timer, deadline);
        }
    }

    /// Turns state into outputs. Called at the end of every `handle`; takes every job that
    /// is due, in this order: the stream and the node-id claim; local changes (capture);
    /// snapshots (restore, then save); parked batches; the subscription; alarms; applying;
    /// publishing; the shutdown.
    fn step(&mut self, now: Duration) {
        if !self.started || self.stopped {
            return;
        }
        let due = |d: Option<Duration>| d.is_some_and(|d| d <= now);

        // The stream, then the claim on our node id.
        if due(self.stream_due()) {
            self.stream = Phase::Pending;
            self.outputs.push_back(Output::Prepare);
        }
        if due(self.claim_due(&self.gates())) {
            self.claim = Phase::Pending;
            self.outputs.push_back(Output::Claim);
        }

        // Local changes.
        if due(self.recheck_at) {
            self.recheck_at = None;
            self.capture_wanted = true;
        }
        if due(Some(self.next_poll_at)) {
            self.capture_wanted = true;
            self.next_poll_at = now + self.cfg.poll_interval;
        }
        if due(self.capture_due(&self.gates())) {
            self.capture_wanted = false;
            self.capturing = true;
            self.outputs.push_back(Output::Capture);
        }

        // Snapshots: restore when wanted, save when due.
        if due(self.restore_due(&self.gates()))
            && let RestorePhase::Wanted(reason) = self.restore
        {
            self.restore = RestorePhase::Fetching(reason);
            let min_position = match reason {
                RestoreReason::Behind => self.restore_needs,
                RestoreReason::EmptyJoin => 0,
            };
            self.outputs
                .push_back(Output::FetchSnapshot { min_position });
        }
        if due(self.snapshot_due(&self.gates())) {
            self.saving = true;
            self.outputs.push_back(Output::SaveSnapshot {
                position: self.position,
            });
        }

        // Other nodes' changes.
        if due(self.retry_parked_due(&self.gates())) {
            let all = self.parked_retry.take().unwrap_or(false);
            self.next_parked_check = now + PARKED_CHECK;
            self.outputs.push_back(Output::RetryParked { all });
        }
        if due(self.subscribe_due(&self.gates())) {
            self.sub = Phase::Pending;
            self.sub_generation += 1;
            self.outputs.push_back(Output::Subscribe {
                from_seq: self.next_seq,
                generation: self.sub_generation,
            });
        }
        if due(self.incomplete_alarm_due()) {
            self.next_incomplete_alarm = now + self.cfg.alarm_interval;
            self.event(Event::IncompleteBatches {
                count: self.incomplete,
            });
        }
        if due(self.behind_alarm_due())
            && let Some(alarm) = &self.behind
        {
            let alarm = alarm.clone();
            self.next_alarm_at = now + self.cfg.alarm_interval;
            self.event(alarm);
        }
        if due(self.apply_due(&self.gates())) {
            let n = self.apply_limit.min(self.queue.len());
            let batch: Vec<Delivery> = self.queue.drain(..n).collect();
            self.queued_bytes -= batch.iter().map(|d| d.payload.len()).sum::<usize>();
            self.apply_started_at = Some(now);
            self.outputs.push_back(Output::Apply(batch));
        }

        // Publishing.
        let throttled = self.too_far_ahead();
        if throttled != self.lag_throttled && !self.send_queue.is_empty() {
            self.lag_throttled = throttled;
            self.event(Event::PublishThrottled {
                throttled,
                head: self.stream_head,
                position: self.position,
            });
        }
        if due(self.publish_due(&self.gates())) {
            while self.in_flight < self.cfg.publish_window {
                let Some((batch, chunk)) = self.send_queue.pop_front() else {
                    break;
                };
                let Some(b) = self.batches.get(&batch) else {
                    continue;
                };
                if b.acked.get(chunk as usize).copied().unwrap_or(true) {
                    continue;
                }
                let payload = b
                    .payloads
                    .as_ref()
                    .and_then(|p| p.get(chunk as usize).cloned());
                self.in_flight += 1;
                self.outputs.push_back(Output::Publish {
                    batch,
                    chunk,
                    payload,
                });
            }
        }

        if let Some(deadline) = self.shutdown_deadline {
            // Publish what is pending; if publishing is impossible now (no stream, publish
            // off), the outbox keeps it for the next start.
            let captured =
                !self.cfg.publish || self.skew_paused || (!self.capture_wanted && !self.capturing);
            // Paced publishing cannot go on either: reading stopped with the shutdown.
            let stuck =
                !self.can_publish(&self.gates()) || (self.too_far_ahead() && self.in_flight == 0);
            let flushed = captured && (self.batches.is_empty() || stuck);
            if flushed || now >= deadline {
                self.stopped = true;
                self.outputs.push_back(Output::Stop(Stop::Shutdown {
                    unpublished: self.batches.len(),
                }));
            }
        }
    }
}

/// The conditions that gate several jobs (see [`Node::gates`]).
#[derive(Clone, Copy, Debug)]
struct Gates {
    /// The stream is prepared.
    stream_ready: bool,
    /// The node id was granted once (so the clock was checked against the server).
    claimed: bool,
    /// The node may stamp: the clock was checked against the server at least once (a node
    /// started with a far-future clock must not stamp), and the stamps it would give do not
    /// lead the server by more than the bound. Capture, apply (which captures pending local
    /// writes first), merge restores and parked retries all stamp.
    clock_sane: bool,
    /// A shutdown was asked for.
    shutting_down: bool,
    /// A restore is wanted or under way: no subscription, no snapshot save.
    restore_pending: bool,
    /// A snapshot is being fetched or restored: no apply.
    restoring: bool,
    /// Messages this node needs are gone from the stream.
    behind: bool,
    /// A snapshot save is in flight.
    saving: bool,
}

#[cfg(test)]
mod tests;
