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
//! # The contract
//!
//! - Every [`Output`] that asks for work ([`Output::Capture`], [`Output::Prepare`],
//!   [`Output::Claim`], [`Output::Subscribe`], [`Output::Publish`], [`Output::Apply`],
//!   [`Output::MarkPublished`], [`Output::RetryParked`], [`Output::SaveSnapshot`],
//!   [`Output::FetchSnapshot`], [`Output::RestoreSnapshot`]) is answered by exactly one
//!   input, the one its documentation names (a subscription's deliveries and end follow its
//!   answer, under its generation). [`Output::Unsubscribe`], [`Output::Event`] and
//!   [`Output::Stop`] take no answer.
//! - Answers may be fed back from inside the drain, before the remaining outputs are carried
//!   out: the drive loop answers storage calls that way.
//! - Time never goes backwards: `now` passed to `handle` never decreases (an older `now` is
//!   taken as the newest seen).
//! - A panic is a bug: nothing a peer, the stream or storage sends may panic the node.
//!
//! # Structure
//!
//! `Node` is a composition of sub-machines, each owning one concern, each in its own file:
//!
//! | sub-machine | owns |
//! | --- | --- |
//! | `link.rs` | the stream, the node-id claim, the clock check against the server |
//! | `capture.rs` | when to look for local changes |
//! | `snapshots.rs` | when to take a snapshot, when and how to restore |
//! | `parked.rs` | parked and incomplete batches, their retries |
//! | `inbox.rs` | the subscription, the apply queue, the position, being behind |
//! | `outbox.rs` | the outbox and the publish queue: when marmot publishes |
//!
//! [`Node::handle`] routes each input to its owner. `step` then asks each sub-machine, in
//! that order, to take whatever job is due; the conditions that gate several jobs are
//! computed in one place (`Gates`), afresh before each sub-machine, since one job can close
//! another's gate (a snapshot fetch stops applying). Every job's deadline lives in one
//! timer table ([`Timer`]), armed from the same functions `step` asks.
//!
//! What it guarantees:
//! - a captured batch is forgotten only after every one of its messages was acknowledged by
//!   the stream; a failed publish is retried with backoff, for as long as it takes;
//! - deliveries are handed to storage strictly in stream order with no gap; a gap makes it
//!   resubscribe from the first missing sequence; a position older than the stream's first
//!   message stops applying (loudly) instead of skipping;
//! - a node whose stamps would lead the server's clock by more than the configured bound
//!   stops capturing and applying (which would stamp) until the clock is back in bounds.

use crate::apply::Delivery;
use crate::capture::Captured;
use crate::hlc::{Clock, Stamp};
use crate::ports::{
    ApplyOutcome, CaptureOutcome, ParkedRetry, Recovered, RestoreReport, StorageError,
};
use std::collections::VecDeque;
use std::time::Duration;

mod capture;
mod config;
mod inbox;
mod link;
mod outbox;
mod parked;
mod snapshots;
mod timer;
mod vocabulary;

pub use config::{NodeConfig, RestoreReason, SnapshotPolicy};
pub use timer::Timer;
use timer::TimerTable;
pub use vocabulary::{Event, Input, Output, Status, Stop};

/// Where an exchange with the transport stands (the stream, the claim, the subscription).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not asked for yet: due at once.
    Idle,
    /// Asked for; the answer is awaited.
    Pending,
    /// Done.
    Ready,
    /// Failed, or to be renewed: due again then.
    RetryAt(Duration),
}

/// Exponential backoff between `retry_min` and `retry_max`.
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

/// Whether a job whose deadline is `deadline` (`None`: blocked) is due at `now`.
fn due(now: Duration, deadline: Option<Duration>) -> bool {
    deadline.is_some_and(|d| d <= now)
}

/// The outputs waiting to be drained.
#[derive(Default)]
struct Outputs(VecDeque<Output>);

impl Outputs {
    fn push(&mut self, o: Output) {
        self.0.push_back(o);
    }
    fn event(&mut self, e: Event) {
        self.0.push_back(Output::Event(e));
    }
}

/// The conditions that gate jobs of several sub-machines (see [`Node::gates`]).
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
    /// Messages this node needs are gone from the stream: no snapshot save.
    behind: bool,
    /// Publishing is possible at all: publish on, the stream prepared, the node id claimed.
    can_publish: bool,
    /// The stream holds `max_lag` messages or more this node has not applied: publishing
    /// waits (see [`inbox::Inbox::too_far_ahead`]).
    too_far_ahead: bool,
}

/// The node state machine.
pub struct Node {
    cfg: NodeConfig,
    clock: Clock,
    /// Recovered and running.
    started: bool,
    /// Stopped: every later input is ignored.
    stopped: bool,
    /// When a shutdown gives up waiting for the outbox to drain.
    shutdown_deadline: Option<Duration>,
    /// The newest `now` seen.
    last_now: Duration,
    link: link::Link,
    capture: capture::Capture,
    snapshots: snapshots::Snapshots,
    parked: parked::Parked,
    inbox: inbox::Inbox,
    outbox: outbox::Outbox,
    outputs: Outputs,
    /// Every deadline, armed at the end of each `handle`.
    timers: TimerTable,
}

impl Node {
    /// A node that waits for [`Input::Recovered`].
    pub fn new(cfg: NodeConfig) -> Self {
        let mut node = Node {
            clock: Clock::new(Stamp::ZERO),
            started: false,
            stopped: false,
            shutdown_deadline: None,
            last_now: Duration::ZERO,
            link: link::Link::new(&cfg),
            capture: capture::Capture::new(&cfg),
            snapshots: snapshots::Snapshots::new(),
            parked: parked::Parked::new(),
            inbox: inbox::Inbox::new(&cfg),
            outbox: outbox::Outbox::new(&cfg),
            outputs: Outputs::default(),
            timers: TimerTable::default(),
            cfg,
        };
        node.arm_timers();
        node
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
    /// plus the monotonic time since (see `link.rs`). Pass it to every storage call that
    /// stamps.
    pub fn stamp_time(&self, now: Duration, wall_ms: u64) -> u64 {
        self.link.stamp_time(now, wall_ms)
    }

    /// Whether the node wants more deliveries now (false: stop reading the stream for a
    /// while; the transport buffers).
    pub fn wants_deliveries(&self) -> bool {
        self.inbox.wants_deliveries(&self.cfg)
    }

    /// Health and gauges.
    pub fn status(&self) -> Status {
        Status {
            started: self.started,
            stream_ready: self.link.stream_ready(),
            claimed: self.link.claimed(),
            connected: self.link.connected(),
            subscribed: self.inbox.subscribed(),
            behind: self.inbox.behind(),
            clock_paused: self.link.clock_paused(),
            position: self.inbox.position(),
            lag_messages: self.inbox.lag_messages(),
            lag_ms: self.inbox.lag_ms(),
            outbox_batches: self.outbox.batches() as u64,
            outbox_messages: self.outbox.unacked_messages(),
            in_flight: self.outbox.in_flight() as u64,
            parked: self.parked.parked(),
            incomplete_batches: self.parked.incomplete(),
            clock_skew_ms: self.link.skew_ms(),
            clock_high_water: self.clock.high_water().as_u64(),
            awaiting_first_snapshot: self.snapshots.watching(),
        }
    }

    // ---- handle --------------------------------------------------------------------------

    /// Feeds one input at monotonic time `now`. Drain [`Node::poll_output`] afterwards.
    pub fn handle(&mut self, now: Duration, input: Input) {
        if self.stopped {
            return;
        }
        // Time never goes backwards: an older `now` is taken as the newest seen.
        let now = self.last_now.max(now);
        self.last_now = now;
        let (cfg, out) = (&self.cfg, &mut self.outputs);
        match input {
            Input::Recovered(r) => self.on_recovered(now, r),
            Input::LocalChange => self.capture.on_hint(now),
            Input::Captured(r) => self.on_captured(now, r),
            Input::Prepared(r) => {
                if let Ok(bounds) = &r {
                    self.snapshots.stream_prepared(now, bounds.last_seq, out);
                }
                self.link.on_prepared(now, r, cfg, out)
            }
            Input::Claimed {
                result,
                sent_wall_ms,
                received_wall_ms,
            } => self.on_claimed(now, result, sent_wall_ms, received_wall_ms),
            Input::Subscribed { generation, result } => self.on_subscribed(now, generation, result),
            Input::Delivered {
                generation,
                deliveries,
            } => self.inbox.on_delivered(now, generation, deliveries, out),
            Input::SubscriptionEnded { generation, error } => self
                .inbox
                .on_subscription_ended(now, generation, error, cfg, out),
            Input::Published {
                batch,
                chunk,
                result,
            } => {
                if let Some(seq) = self
                    .outbox
                    .on_published(now, batch, chunk, result, cfg, out)
                {
                    self.inbox.saw_head(seq);
                }
            }
            Input::Applied {
                result,
                deliveries,
                wall_ms,
            } => self.on_applied(now, result, deliveries, wall_ms),
            Input::MarkedPublished(r) => {
                if let Err(error) = r {
                    // The batch stays in the outbox and is republished after a restart:
                    // same message ids, and applying it twice changes nothing.
                    out.event(Event::StorageFailed {
                        error,
                        retry_in: Duration::ZERO,
                    });
                }
            }
            Input::ParkedRetried(r) => self.on_parked_retried(r),
            Input::SnapshotSaved(r) => self.snapshots.on_saved(now, r, cfg, out),
            Input::SnapshotFetched(r) => self.snapshots.on_fetched(now, r, cfg, out),
            Input::Restored(r) => self.on_restored(now, r),
            Input::Shutdown => self.on_shutdown(now),
            Input::Tick => {}
        }
        self.step(now);
        self.arm_timers();
    }

    /// The next thing to do, if any. Call until `None` after every [`Node::handle`].
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.0.pop_front()
    }

    /// When to feed [`Input::Tick`] at the latest: the earliest deadline of the timer table.
    pub fn poll_timeout(&self) -> Duration {
        self.poll_timer().0
    }

    /// [`Node::poll_timeout`] and the [`Timer`] that set it (a trace of why the node woke).
    pub fn poll_timer(&self) -> (Duration, Timer) {
        // The fallback poll is always armed.
        let (at, timer) = self.timers.next().unwrap_or((self.last_now, Timer::Poll));
        // Everything due at `last_now` was done by the last `handle`.
        (at.max(self.last_now + Duration::from_millis(1)), timer)
    }

    // ---- inputs that concern several sub-machines ----------------------------------------

    fn on_recovered(&mut self, now: Duration, r: Recovered) {
        self.started = true;
        self.clock = Clock::new(r.clock).with_max_lead(self.cfg.max_clock_skew_ms);
        self.inbox.recovered(r.position);
        self.parked.recovered(r.parked, r.incomplete_batches);
        // Batches read back waited already: since their oldest was captured, by the clock.
        let waited = r
            .outbox_oldest_ms
            .map_or(0, |oldest| r.wall_ms.saturating_sub(oldest));
        self.outbox
            .recovered(now, Duration::from_millis(waited), r.outbox);
        self.capture.recovered(now);
        self.snapshots
            .recovered(now, r.empty, r.position, &self.cfg);
    }

    /// A batch storage captured: it counts towards the next snapshot and goes to the outbox.
    fn add_batch(&mut self, c: Option<Captured>) {
        if let Some(c) = c {
            self.snapshots.count(c.rows);
            self.outbox
                .add(self.last_now, c, &self.cfg, &mut self.outputs);
        }
    }

    fn schema_changed(&mut self, changed: bool) {
        if changed {
            self.outputs.event(Event::SchemaChanged);
            // Batches parked for an unknown table or column may fit now.
            self.parked.want_retry_all();
        }
    }

    fn on_captured(&mut self, now: Duration, r: Result<CaptureOutcome, StorageError>) {
        let Some(o) = self
            .capture
            .on_captured(now, r, &self.cfg, &mut self.outputs)
        else {
            return;
        };
        self.add_batch(o.captured);
        self.parked.unparked(o.unparked, &mut self.outputs);
        self.schema_changed(o.schema_changed);
    }

    fn on_claimed(
        &mut self,
        now: Duration,
        result: Result<crate::ports::Claim, crate::ports::TransportError>,
        sent_wall_ms: u64,
        received_wall_ms: u64,
    ) {
        if let Some(stop) = self.link.on_claimed(
            now,
            result,
            sent_wall_ms,
            received_wall_ms,
            &mut self.clock,
            &self.cfg,
            &mut self.outputs,
        ) {
            self.stopped = true;
            self.outputs.push(Output::Stop(stop));
        }
    }

    fn on_subscribed(
        &mut self,
        now: Duration,
        generation: u64,
        result: Result<crate::ports::StreamBounds, crate::ports::TransportError>,
    ) {
        if let Some(needs) =
            self.inbox
                .on_subscribed(now, generation, result, &self.cfg, &mut self.outputs)
        {
            self.snapshots.fell_behind(now, needs, &self.cfg);
        }
    }

    fn on_applied(
        &mut self,
        now: Duration,
        result: Result<ApplyOutcome, StorageError>,
        deliveries: Vec<Delivery>,
        wall_ms: u64,
    ) {
        let Some((o, took)) = self.inbox.on_applied(
            now,
            result,
            deliveries,
            wall_ms,
            &self.cfg,
            &mut self.outputs,
        ) else {
            return;
        };
        let r = o.report;
        self.snapshots.count(r.rows_written);
        self.parked
            .incomplete_now(now, o.incomplete_batches, &self.cfg, &mut self.outputs);
        self.add_batch(o.captured);
        for p in &r.parked {
            self.parked.parked_one(p, &mut self.outputs);
        }
        self.parked.unparked(r.unparked, &mut self.outputs);
        self.schema_changed(o.schema_changed);
        self.outputs.event(Event::Applied {
            through_seq: r.through_seq,
            batches: r.batches,
            rows_written: r.rows_written,
            rows_skipped: r.rows_skipped,
            conflicts: r.conflicts,
            own_messages: r.own_messages,
            took,
        });
    }

    fn on_parked_retried(&mut self, r: Result<ParkedRetry, StorageError>) {
        match r {
            Ok(r) => {
                self.parked.retried(r.remaining);
                self.add_batch(r.captured);
                if r.attempted > 0 {
                    self.outputs.event(Event::ParkedRetried {
                        applied: r.applied,
                        remaining: r.remaining,
                    });
                }
            }
            Err(error) => self.outputs.event(Event::StorageFailed {
                error,
                retry_in: self.cfg.poll_interval,
            }),
        }
    }

    fn on_restored(&mut self, now: Duration, r: Result<RestoreReport, StorageError>) {
        let Some((reason, rep)) = self
            .snapshots
            .on_restored(now, r, &self.cfg, &mut self.outputs)
        else {
            return;
        };
        self.inbox.restored(rep.position, &mut self.outputs);
        self.capture.want();
        self.parked.want_retry_all();
        self.add_batch(rep.captured);
        self.outputs.event(Event::Restored {
            reason,
            generation: rep.generation,
            position: rep.position,
            merged: rep.merged,
        });
    }

    /// Stop reading and applying; publish what is pending (within the grace period).
    fn on_shutdown(&mut self, now: Duration) {
        if self.shutdown_deadline.is_none() {
            self.shutdown_deadline = Some(now + self.cfg.shutdown_grace);
            self.capture.want();
            self.inbox.unsubscribe(&mut self.outputs);
        }
    }

    // ---- step and timers -----------------------------------------------------------------

    /// The conditions that gate jobs of several sub-machines, computed in one place. Read
    /// afresh before each sub-machine's turn in `step`.
    fn gates(&self) -> Gates {
        let stream_ready = self.link.stream_ready();
        let claimed = self.link.claimed();
        Gates {
            stream_ready,
            claimed,
            clock_sane: claimed && !self.link.clock_paused(),
            shutting_down: self.shutdown_deadline.is_some(),
            restore_pending: self.snapshots.restore_pending(),
            restoring: self.snapshots.restoring(),
            behind: self.inbox.behind(),
            can_publish: self.cfg.publish && stream_ready && claimed,
            too_far_ahead: self.inbox.too_far_ahead(&self.cfg),
        }
    }

    /// Turns state into outputs. Called at the end of every `handle`: asks each sub-machine
    /// in turn to take the jobs that are due: the link (stream, claim), capture, snapshots
    /// (restore, then save), parked batches, the inbox (subscribe, apply), the outbox
    /// (publish); then the shutdown.
    fn step(&mut self, now: Duration) {
        if !self.started || self.stopped {
            return;
        }
        let mut out = std::mem::take(&mut self.outputs);
        let cfg = &self.cfg;
        self.link.step(now, &mut out);
        let g = self.gates();
        self.capture.step(now, &g, cfg, &mut out);
        let g = self.gates();
        let position = self.inbox.position();
        self.snapshots.step(now, &g, cfg, position, &mut out);
        let g = self.gates();
        self.parked.step(now, &g, cfg, &mut out);
        let g = self.gates();
        self.inbox.step(now, &g, cfg, &mut out);
        let g = self.gates();
        let lag = self.inbox.head_and_position();
        self.outbox.step(now, &g, cfg, lag, &mut out);
        self.outputs = out;
        let g = self.gates();
        self.shutdown_step(now, &g);
    }

    /// Once shutting down: stop when everything pending is published (or cannot be now: the
    /// outbox keeps it for the next start), or at the deadline.
    fn shutdown_step(&mut self, now: Duration, g: &Gates) {
        let Some(deadline) = self.shutdown_deadline else {
            return;
        };
        // Not the capture gate on purpose: before the first claim the node waits (the claim
        // may come, and with it a capture of the last writes); only a clock known to be
        // ahead, or publish off, gives capturing up.
        let captured = !self.cfg.publish || self.link.clock_paused() || self.capture.settled();
        let flushed = captured && (self.outbox.batches() == 0 || self.outbox.stuck(g));
        if flushed || now >= deadline {
            self.stopped = true;
            self.outputs.push(Output::Stop(Stop::Shutdown {
                unpublished: self.outbox.batches(),
            }));
        }
    }

    /// Arms the timer table from the same functions `step` asks: a timer is set exactly while
    /// its job is possible.
    fn arm_timers(&mut self) {
        self.timers = self.armed_timers();
    }

    /// The timer table as the jobs' functions say it is now.
    fn armed_timers(&self) -> TimerTable {
        let mut t = TimerTable::default();
        if !self.started || self.stopped {
            self.capture.arm_poll(&mut t);
            return t;
        }
        let g = self.gates();
        self.link.arm(&mut t);
        self.capture.arm(&g, &self.cfg, &mut t);
        self.snapshots.arm(&g, &self.cfg, &mut t);
        self.parked.arm(&g, &mut t);
        self.inbox.arm(&g, &self.cfg, &mut t);
        self.outbox.arm(&g, &self.cfg, &mut t);
        t.set(Timer::Shutdown, self.shutdown_deadline);
        t
    }

    /// For test harnesses, after each input is handled and its outputs carried out: checks
    /// that every job that was due at the newest `now` was taken (or its gate closed), so no
    /// armed deadline lies at or before it: one would wake the driver every millisecond for
    /// nothing (regression 01 was such a spin) or hide a job that never runs; and that the
    /// table holds exactly what each job's function says now (nothing changed the node
    /// without re-arming it).
    pub fn check_timers(&self) -> Result<(), String> {
        if !self.started || self.stopped {
            return Ok(());
        }
        for timer in Timer::ALL {
            let armed = self.timers.get(timer);
            if let Some(at) = armed
                && at <= self.last_now
            {
                return Err(format!(
                    "timer {timer:?} is armed at {at:?}, not after now ({:?}): a due job was not taken",
                    self.last_now
                ));
            }
        }
        let fresh = self.armed_timers();
        for timer in Timer::ALL {
            if fresh.get(timer) != self.timers.get(timer) {
                return Err(format!(
                    "timer {timer:?} is armed at {:?} but its job says {:?}",
                    self.timers.get(timer),
                    fresh.get(timer)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
