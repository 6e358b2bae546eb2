//! Other nodes' changes: the subscription to the stream, the apply queue (deliveries received
//! in stream order and not applied yet), the position applied through, and being behind.
//!
//! Deliveries enter the apply queue strictly in stream order with no gap (a gap makes it
//! subscribe again from the first missing sequence); a position older than the stream's first
//! message stops reading, loudly, instead of skipping (the node is behind and needs a
//! snapshot). Applying stamps (storage captures pending local writes first), so it waits for
//! a sane clock, runs one transaction at a time, sized to hold the write lock about
//! `apply_target`, and never while a snapshot is fetched or restored.

use super::{Backoff, Event, Gates, NodeConfig, Output, Outputs, Phase, Timer, TimerTable, due};
use crate::apply::Delivery;
use crate::ports::{ApplyOutcome, StorageError, StreamBounds, TransportError};
use std::collections::VecDeque;
use std::time::Duration;

/// Why this node stopped reading the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behind {
    /// Messages it never applied are gone from the stream.
    Truncated {
        /// The last sequence it read.
        position: u64,
        /// The oldest sequence the stream holds.
        first_seq: u64,
    },
    /// The stream ends before its position: it was deleted or replaced.
    Reset {
        /// The last sequence it read.
        position: u64,
        /// The stream's last sequence.
        last_seq: u64,
    },
}

impl Behind {
    fn alarm(self) -> Event {
        match self {
            Behind::Truncated {
                position,
                first_seq,
            } => Event::Behind {
                position,
                first_seq,
            },
            Behind::Reset { position, last_seq } => Event::StreamReset { position, last_seq },
        }
    }
}

pub(super) struct Inbox {
    subscription: Phase,
    backoff: Backoff,
    /// Identifies the current subscription; answers about older ones are dropped.
    generation: u64,
    /// The last stream sequence applied here.
    position: u64,
    /// The next sequence to queue.
    next_seq: u64,
    /// The highest stream sequence known to exist (from acknowledgements and deliveries).
    stream_head: u64,
    /// Deliveries received and not applied yet, in stream order.
    apply_queue: VecDeque<Delivery>,
    queued_bytes: usize,
    /// After a failed apply, not before.
    apply_blocked_until: Duration,
    apply_backoff: Backoff,
    /// When the apply under way started.
    applying_since: Option<Duration>,
    /// Most deliveries in the next apply transaction.
    apply_limit: usize,
    /// Messages the stream holds beyond the last one received.
    lag_messages: u64,
    /// Age of the last applied message when it was applied (ms).
    lag_ms: u64,
    behind: Option<Behind>,
    next_alarm_at: Duration,
}

impl Inbox {
    pub(super) fn new(cfg: &NodeConfig) -> Self {
        Inbox {
            subscription: Phase::Idle,
            backoff: Backoff::new(cfg),
            generation: 0,
            position: 0,
            next_seq: 1,
            stream_head: 0,
            apply_queue: VecDeque::new(),
            queued_bytes: 0,
            apply_blocked_until: Duration::ZERO,
            apply_backoff: Backoff::new(cfg),
            applying_since: None,
            apply_limit: 16,
            lag_messages: 0,
            lag_ms: 0,
            behind: None,
            next_alarm_at: Duration::ZERO,
        }
    }

    pub(super) fn recovered(&mut self, position: u64) {
        self.position = position;
        self.next_seq = position + 1;
    }

    pub(super) fn position(&self) -> u64 {
        self.position
    }

    /// The newest stream sequence known and the last applied here.
    pub(super) fn head_and_position(&self) -> (u64, u64) {
        (self.stream_head, self.position)
    }

    /// A sequence the stream is known to hold (a publish's acknowledgement).
    pub(super) fn saw_head(&mut self, seq: u64) {
        self.stream_head = self.stream_head.max(seq);
    }

    pub(super) fn subscribed(&self) -> bool {
        self.subscription == Phase::Ready
    }

    pub(super) fn behind(&self) -> bool {
        self.behind.is_some()
    }

    /// Messages received and not applied yet, plus those the stream holds beyond.
    pub(super) fn lag_messages(&self) -> u64 {
        self.lag_messages + self.apply_queue.len() as u64
    }

    pub(super) fn lag_ms(&self) -> u64 {
        self.lag_ms
    }

    /// Whether the node wants more deliveries now.
    pub(super) fn wants_deliveries(&self, cfg: &NodeConfig) -> bool {
        self.subscription == Phase::Ready
            && self.apply_queue.len() < cfg.max_buffered_deliveries
            && self.queued_bytes < cfg.max_buffered_bytes
    }

    /// Too far ahead of what this node applied to publish more (see `max_lag`). A node that
    /// does not read the stream (`replicate = false`) is not limited: waiting would not make
    /// it read. A node behind the stream and waiting for a snapshot is limited like any other
    /// (its position is old, so it holds everything): its writes wait, safe, in the outbox
    /// until it restored. Publishing them unpaced pushed the nodes that were still reading
    /// off the stream's end too, and then no node could take the snapshot everyone needed
    /// (regression 05).
    pub(super) fn too_far_ahead(&self, cfg: &NodeConfig) -> bool {
        cfg.replicate
            && cfg
                .max_lag
                .is_some_and(|l| self.stream_head.saturating_sub(self.position) >= l)
    }

    /// A subscription's answer. Returns the smallest snapshot position that gets this node
    /// back onto the stream when it finds itself behind.
    pub(super) fn on_subscribed(
        &mut self,
        now: Duration,
        generation: u64,
        r: Result<StreamBounds, TransportError>,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) -> Option<u64> {
        if generation != self.generation || self.subscription != Phase::Pending {
            // Superseded while it was being set up, or unsubscribed meanwhile (shutdown):
            // the driver drops it.
            out.push(Output::Unsubscribe { generation });
            return None;
        }
        match r {
            Ok(bounds) => {
                self.stream_head = self.stream_head.max(bounds.last_seq);
                if bounds.first_seq > self.next_seq {
                    Some(self.fell_behind(
                        now,
                        Behind::Truncated {
                            position: self.next_seq - 1,
                            first_seq: bounds.first_seq,
                        },
                        cfg,
                        out,
                    ))
                } else if bounds.last_seq + 1 < self.next_seq {
                    Some(self.fell_behind(
                        now,
                        Behind::Reset {
                            position: self.next_seq - 1,
                            last_seq: bounds.last_seq,
                        },
                        cfg,
                        out,
                    ))
                } else {
                    self.subscription = Phase::Ready;
                    self.backoff.reset(cfg);
                    out.event(Event::Subscribed {
                        from_seq: self.next_seq,
                    });
                    None
                }
            }
            Err(error) => {
                let retry_in = self.backoff.fail(cfg);
                self.subscription = Phase::RetryAt(now + retry_in);
                out.event(Event::SubscriptionLost {
                    error: Some(error),
                    retry_in,
                });
                None
            }
        }
    }

    /// Stops reading and raises the alarm; returns the smallest snapshot position that holds
    /// every message the stream no longer has.
    fn fell_behind(
        &mut self,
        now: Duration,
        behind: Behind,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) -> u64 {
        self.subscription = Phase::Idle;
        out.push(Output::Unsubscribe {
            generation: self.generation,
        });
        out.event(behind.alarm());
        self.behind = Some(behind);
        self.next_alarm_at = now + cfg.alarm_interval;
        match behind {
            Behind::Truncated { first_seq, .. } => first_seq - 1,
            // The stream was replaced and is shorter than what this node applied: no snapshot
            // of it can be ahead of this node yet.
            Behind::Reset { .. } => self.position + 1,
        }
    }

    pub(super) fn on_delivered(
        &mut self,
        now: Duration,
        generation: u64,
        deliveries: Vec<Delivery>,
        out: &mut Outputs,
    ) {
        if generation != self.generation || self.subscription != Phase::Ready {
            return;
        }
        for d in deliveries {
            if d.stream_seq < self.next_seq {
                continue; // redelivered
            }
            if d.stream_seq > self.next_seq {
                out.event(Event::Gap {
                    expected: self.next_seq,
                    received: d.stream_seq,
                });
                self.subscription = Phase::RetryAt(now);
                out.push(Output::Unsubscribe {
                    generation: self.generation,
                });
                return;
            }
            self.next_seq += 1;
            self.lag_messages = d.pending;
            self.stream_head = self.stream_head.max(d.stream_seq + d.pending);
            self.queued_bytes += d.payload.len();
            self.apply_queue.push_back(d);
        }
    }

    pub(super) fn on_subscription_ended(
        &mut self,
        now: Duration,
        generation: u64,
        error: Option<TransportError>,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) {
        if generation == self.generation
            && matches!(self.subscription, Phase::Ready | Phase::Pending)
        {
            let retry_in = self.backoff.fail(cfg);
            self.subscription = Phase::RetryAt(now + retry_in);
            out.event(Event::SubscriptionLost { error, retry_in });
        }
    }

    /// An apply's answer. When it succeeded, returns what storage did and how long the
    /// transaction took; a failed one puts its deliveries back at the front of the queue.
    pub(super) fn on_applied(
        &mut self,
        now: Duration,
        result: Result<ApplyOutcome, StorageError>,
        deliveries: Vec<Delivery>,
        wall_ms: u64,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) -> Option<(ApplyOutcome, Duration)> {
        let took = self
            .applying_since
            .take()
            .map_or(Duration::ZERO, |s| now.saturating_sub(s));
        match result {
            Ok(o) => {
                self.apply_backoff.reset(cfg);
                // Size the next transaction so it holds the write lock about apply_target.
                if took > cfg.apply_target {
                    self.apply_limit = (self.apply_limit / 2).max(1);
                } else if took < cfg.apply_target / 2 && deliveries.len() >= self.apply_limit {
                    self.apply_limit = (self.apply_limit * 2).min(cfg.apply_max_messages);
                }
                let r = &o.report;
                self.position = self.position.max(r.through_seq);
                self.lag_ms = if self.apply_queue.is_empty() && r.through_pending == 0 {
                    0
                } else {
                    wall_ms.saturating_sub(r.through_published_ms)
                };
                Some((o, took))
            }
            Err(error) => {
                for d in deliveries.into_iter().rev() {
                    self.queued_bytes += d.payload.len();
                    self.apply_queue.push_front(d);
                }
                self.apply_limit = (self.apply_limit / 2).max(1);
                let retry_in = self.apply_backoff.fail(cfg);
                self.apply_blocked_until = now + retry_in;
                out.event(Event::StorageFailed { error, retry_in });
                None
            }
        }
    }

    /// Stops reading (a shutdown).
    pub(super) fn unsubscribe(&mut self, out: &mut Outputs) {
        if self.subscription != Phase::Idle {
            self.subscription = Phase::Idle;
            out.push(Output::Unsubscribe {
                generation: self.generation,
            });
        }
    }

    /// A snapshot brought this node to `position`: whatever was buffered is at or below it,
    /// or follows it: read again from there.
    pub(super) fn restored(&mut self, position: u64, out: &mut Outputs) {
        self.position = self.position.max(position);
        self.next_seq = self.position + 1;
        self.behind = None;
        self.apply_queue.clear();
        self.queued_bytes = 0;
        if self.subscription != Phase::Idle {
            out.push(Output::Unsubscribe {
                generation: self.generation,
            });
        }
        self.subscription = Phase::Idle;
    }

    /// Subscribe when replicating, with the stream ready, and neither behind, restoring nor
    /// shutting down.
    fn subscribe_due(&self, g: &Gates, cfg: &NodeConfig) -> Option<Duration> {
        if g.restore_pending
            || !cfg.replicate
            || g.shutting_down
            || self.behind.is_some()
            || !g.stream_ready
        {
            return None;
        }
        match self.subscription {
            Phase::Idle => Some(Duration::ZERO),
            Phase::RetryAt(at) => Some(at),
            Phase::Pending | Phase::Ready => None,
        }
    }

    fn behind_alarm_due(&self) -> Option<Duration> {
        self.behind.is_some().then_some(self.next_alarm_at)
    }

    fn apply_due(&self, g: &Gates) -> Option<Duration> {
        (!self.apply_queue.is_empty()
            && !g.restoring
            && self.applying_since.is_none()
            && g.clock_sane
            && !g.shutting_down)
            .then_some(self.apply_blocked_until)
    }

    pub(super) fn arm(&self, g: &Gates, cfg: &NodeConfig, timers: &mut TimerTable) {
        timers.set(Timer::Subscribe, self.subscribe_due(g, cfg));
        timers.set(Timer::BehindAlarm, self.behind_alarm_due());
        timers.set(Timer::Apply, self.apply_due(g));
    }

    /// Subscribe, repeat the alarm while behind, apply.
    pub(super) fn step(&mut self, now: Duration, g: &Gates, cfg: &NodeConfig, out: &mut Outputs) {
        if due(now, self.subscribe_due(g, cfg)) {
            self.subscription = Phase::Pending;
            self.generation += 1;
            out.push(Output::Subscribe {
                from_seq: self.next_seq,
                generation: self.generation,
            });
        }
        if due(now, self.behind_alarm_due())
            && let Some(behind) = self.behind
        {
            self.next_alarm_at = now + cfg.alarm_interval;
            out.event(behind.alarm());
        }
        if due(now, self.apply_due(g)) {
            let n = self.apply_limit.min(self.apply_queue.len());
            let batch: Vec<Delivery> = self.apply_queue.drain(..n).collect();
            self.queued_bytes -= batch.iter().map(|d| d.payload.len()).sum::<usize>();
            self.applying_since = Some(now);
            out.push(Output::Apply(batch));
        }
    }
}
