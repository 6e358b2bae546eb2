//! Publishing: the outbox (captured batches not yet acknowledged in full) and the publish
//! queue (their messages still to send), in one place. When does marmot publish? Here:
//!
//! - a captured batch enters the outbox and all its messages the publish queue
//!   ([`Outbox::add`]); batches left unacknowledged at the last stop were read back at start;
//! - messages go out while publishing is possible at all (publish on, the stream prepared,
//!   the node id claimed: [`super::Gates::can_publish`]), at most `publish_window` in flight,
//!   and not while this node is too far behind the stream's head to publish more
//!   ([`super::Gates::too_far_ahead`], the pacing of `max_lag`), except a batch that waited
//!   `max_publish_hold` ([`NodeConfig::max_publish_hold`]: half the tombstone lifetime);
//! - a batch leaves the outbox only once the stream acknowledged every one of its messages
//!   (then storage is told, [`Output::MarkPublished`]); a failed publish goes back to the
//!   front of the queue and publishing waits with backoff, for as long as it takes;
//! - a batch that carries a schema change (message format 2) is a barrier: it goes out only
//!   once every message before it was acknowledged, and nothing after it goes out before it
//!   was. Pipelined publishes reach the stream out of capture order when one fails and is
//!   retried; rows tolerate that (last writer wins), but one node's schema changes must reach
//!   every node in the order they were made (a receiver that meets a rename before the
//!   addition it renames can only guess which column became which). Batches read back at
//!   start are not known to be barriers (their messages are read lazily).

use super::{Backoff, Event, Gates, NodeConfig, Output, Outputs, Timer, TimerTable, due};
use crate::capture::Captured;
use crate::ports::{TransportError, TransportErrorKind};
use crate::wire::BatchId;
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// A batch in the outbox.
struct OutBatch {
    /// Which of its messages the stream acknowledged.
    acked: Vec<bool>,
    /// How many it has not.
    unacked: u32,
    /// The messages, while they fit in the memory budget (else read back from storage).
    payloads: Option<Vec<Bytes>>,
    /// Bytes of `payloads`.
    cached: usize,
    /// It carries a schema change: see the module doc.
    barrier: bool,
    /// Since when pacing holds it back: when it was captured (read back at start: the start).
    since: Duration,
    /// How long it was held back before `since` (read back at start: since the oldest batch
    /// read back was captured).
    waited_before: Duration,
    /// Pacing released it (reported once).
    released: bool,
}

pub(super) struct Outbox {
    /// Captured batches not yet acknowledged in full.
    outbox: BTreeMap<BatchId, OutBatch>,
    /// Their messages still to send, in order.
    publish_queue: VecDeque<(BatchId, u32)>,
    /// Messages sent and not answered yet.
    in_flight: usize,
    /// After a failed publish, not before.
    blocked_until: Duration,
    backoff: Backoff,
    /// Bytes of messages kept in memory.
    cached_bytes: usize,
    /// Publishing waits for this node to apply more of the stream (last reported).
    throttled: bool,
    /// A barrier batch is being published: nothing else goes out until it is acknowledged.
    barrier_out: Option<BatchId>,
}

impl Outbox {
    pub(super) fn new(cfg: &NodeConfig) -> Self {
        Outbox {
            outbox: BTreeMap::new(),
            publish_queue: VecDeque::new(),
            in_flight: 0,
            blocked_until: Duration::ZERO,
            backoff: Backoff::new(cfg),
            cached_bytes: 0,
            throttled: false,
            barrier_out: None,
        }
    }

    /// The batches storage still holds unpublished at start: (batch, chunk count), the oldest
    /// of them captured `waited` before `now`.
    pub(super) fn recovered(
        &mut self,
        now: Duration,
        waited: Duration,
        outbox: Vec<(BatchId, u32)>,
    ) {
        for (batch, chunks) in outbox {
            self.outbox.insert(
                batch,
                OutBatch {
                    acked: vec![false; chunks as usize],
                    unacked: chunks,
                    payloads: None,
                    cached: 0,
                    barrier: false,
                    since: now,
                    waited_before: waited,
                    released: false,
                },
            );
            self.publish_queue.extend((0..chunks).map(|c| (batch, c)));
        }
    }

    /// A batch storage captured (and stored in its outbox).
    pub(super) fn add(&mut self, now: Duration, c: Captured, cfg: &NodeConfig, out: &mut Outputs) {
        let chunks = c.messages.len() as u32;
        out.event(Event::Captured {
            batch: c.batch,
            rows: c.rows,
            messages: c.messages.len(),
        });
        if !cfg.publish {
            // Cannot happen in a correctly wired node (no triggers without publish); keep the
            // batch in the outbox rather than lose it.
            return;
        }
        let size: usize = c.messages.iter().map(Bytes::len).sum();
        // A batch that carries schema changes (not merely format 2: rows of a table a
        // replicated change created are format 2 too, and must not serialise publishing).
        let barrier = c.schema;
        let (payloads, cached) = if self.cached_bytes + size <= cfg.max_cached_bytes {
            self.cached_bytes += size;
            (Some(c.messages), size)
        } else {
            (None, 0)
        };
        self.outbox.insert(
            c.batch,
            OutBatch {
                acked: vec![false; chunks as usize],
                unacked: chunks,
                payloads,
                cached,
                barrier,
                since: now,
                waited_before: Duration::ZERO,
                released: false,
            },
        );
        self.publish_queue.extend((0..chunks).map(|i| (c.batch, i)));
    }

    /// A publish's answer. Returns the stream sequence the message got, when it was stored.
    pub(super) fn on_published(
        &mut self,
        now: Duration,
        batch: BatchId,
        chunk: u32,
        result: Result<u64, TransportError>,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) -> Option<u64> {
        self.in_flight = self.in_flight.saturating_sub(1);
        match result {
            Ok(seq) => {
                self.backoff.reset(cfg);
                self.acknowledged(batch, chunk, out);
                Some(seq)
            }
            Err(error) => {
                if self.outbox.contains_key(&batch) {
                    self.publish_queue.push_front((batch, chunk));
                }
                let retry_in = if error.kind == TransportErrorKind::TooLarge {
                    cfg.retry_max
                } else {
                    self.backoff.fail(cfg)
                };
                self.blocked_until = self.blocked_until.max(now + retry_in);
                out.event(Event::PublishFailed { error, retry_in });
                None
            }
        }
    }

    /// One message is stored by the stream; a batch whose every message is leaves the outbox.
    fn acknowledged(&mut self, batch: BatchId, chunk: u32, out: &mut Outputs) {
        let Some(b) = self.outbox.get_mut(&batch) else {
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
            if self.barrier_out == Some(batch) {
                self.barrier_out = None;
            }
            let cached = b.cached;
            self.cached_bytes -= cached;
            self.outbox.remove(&batch);
            out.push(Output::MarkPublished(batch));
            out.event(Event::BatchPublished { batch });
        }
    }

    /// Batches not yet acknowledged in full.
    pub(super) fn batches(&self) -> usize {
        self.outbox.len()
    }

    /// Their messages not yet acknowledged.
    pub(super) fn unacked_messages(&self) -> u64 {
        self.outbox.values().map(|b| u64::from(b.unacked)).sum()
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Publishing cannot go on now: impossible (no stream, publish off), or paced with
    /// nothing in flight while reading has stopped (a shutdown).
    pub(super) fn stuck(&self, g: &Gates) -> bool {
        !g.can_publish || (g.too_far_ahead && self.in_flight == 0)
    }

    /// Whether the message at the front of the queue may go out now as far as barriers go
    /// (see the module doc).
    fn front_may_go(&self) -> bool {
        let Some(&(batch, _)) = self.publish_queue.front() else {
            return false;
        };
        match self.barrier_out {
            // (A barrier no longer in the outbox holds nothing back.)
            Some(b) if self.outbox.contains_key(&b) => b == batch,
            _ => self.in_flight == 0 || !self.outbox.get(&batch).is_some_and(|b| b.barrier),
        }
    }

    fn publish_due(&self, g: &Gates, cfg: &NodeConfig) -> Option<Duration> {
        if !(self.front_may_go() && g.can_publish && self.in_flight < cfg.publish_window) {
            return None;
        }
        if !g.too_far_ahead {
            return Some(self.blocked_until);
        }
        self.front_released(cfg)
            .map(|at| at.max(self.blocked_until))
    }

    /// When pacing stops holding the batch at the front of the queue back
    /// ([`NodeConfig::max_publish_hold`]; None: never).
    fn front_released(&self, cfg: &NodeConfig) -> Option<Duration> {
        let hold = cfg.max_publish_hold?;
        let &(batch, _) = self.publish_queue.front()?;
        let b = self.outbox.get(&batch)?;
        Some(b.since.saturating_add(hold.saturating_sub(b.waited_before)))
    }

    pub(super) fn arm(&self, g: &Gates, cfg: &NodeConfig, timers: &mut TimerTable) {
        timers.set(Timer::Publish, self.publish_due(g, cfg));
    }

    /// Reports pacing when it changes (`head`: the newest stream sequence known, `position`:
    /// the last applied here), then sends what the window allows.
    pub(super) fn step(
        &mut self,
        now: Duration,
        g: &Gates,
        cfg: &NodeConfig,
        (head, position): (u64, u64),
        out: &mut Outputs,
    ) {
        if g.too_far_ahead != self.throttled && !self.publish_queue.is_empty() {
            self.throttled = g.too_far_ahead;
            out.event(Event::PublishThrottled {
                throttled: g.too_far_ahead,
                head,
                position,
            });
        }
        if !due(now, self.publish_due(g, cfg)) {
            return;
        }
        while self.in_flight < cfg.publish_window {
            // A barrier goes out alone: after everything before it, before everything after.
            if !self.front_may_go() {
                break;
            }
            // Paced: only batches held back for `max_publish_hold` go out.
            if g.too_far_ahead {
                if !due(now, self.front_released(cfg)) {
                    break;
                }
                if let Some(&(batch, _)) = self.publish_queue.front()
                    && let Some(b) = self.outbox.get_mut(&batch)
                    && !b.released
                {
                    b.released = true;
                    out.event(Event::HeldBatchReleased {
                        batch,
                        waited: now.saturating_sub(b.since) + b.waited_before,
                    });
                }
            }
            let Some((batch, chunk)) = self.publish_queue.pop_front() else {
                break;
            };
            if self.outbox.get(&batch).is_some_and(|b| b.barrier) {
                self.barrier_out = Some(batch);
            }
            let Some(b) = self.outbox.get(&batch) else {
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
            out.push(Output::Publish {
                batch,
                chunk,
                payload,
            });
        }
    }
}
