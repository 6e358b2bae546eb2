//! A cluster of nodes over in-memory storage and one in-memory stream, stepped by hand, as
//! quinn-proto's `Pair` steps two connections: whichever member is due first goes next, so
//! capture, apply, restore and shutdown sequences run in milliseconds, without SQLite, an
//! async runtime or turmoil, and every run is the same.
//!
//! Storage calls are answered at once, inside the drain (as the drive loop answers them);
//! transport calls one round trip later ([`Cluster::latency`] each way); deliveries are sent
//! as the stream grows, while a member's subscription is open and it wants them.
//!
//! After every input the harness checks the node's timers ([`Node::check_timers`]): no job
//! that is due is left with a deadline at or before the present (it would wake the driver
//! every millisecond for nothing, or never act), and the table holds exactly what the jobs
//! say.

use super::snapshots::MemorySnapshotStore;
use super::storage::{MemoryApp, MemoryStorage};
use super::transport::MemoryStream;
use crate::hlc::NodeId;
use crate::node::{Event, Input, Node, NodeConfig, Output, Stop};
use crate::ports::{Storage, StorageError, StorageOp, TransportError};
use crate::snapshot::{Fetched, SaveOutcome};
use std::collections::BTreeMap;
use std::time::Duration;

/// The wall clock's reading at the harness's time zero (ms since the Unix epoch).
pub const EPOCH_MS: u64 = 1_700_000_000_000;

/// Most deliveries sent to a member at once.
const DELIVERY_BURST: usize = 64;

/// An open subscription of a member.
#[derive(Clone, Copy, Debug)]
struct Subscription {
    generation: u64,
    /// The next sequence to send.
    next_seq: u64,
    /// Its answer reached the node: deliveries may follow.
    open: bool,
    /// A burst is on its way.
    sending: bool,
}

/// One node of the cluster: the state machine, its database, and what it reported.
pub struct Member {
    /// The state machine.
    pub node: Node,
    /// Its database.
    pub storage: MemoryStorage,
    /// The application's handle on the database.
    pub app: MemoryApp,
    /// Every event the node reported, with when.
    pub events: Vec<(Duration, Event)>,
    /// Why it stopped, once it did.
    pub stopped: Option<Stop>,
    /// How far its wall clock is off (ms).
    pub skew_ms: i64,
    /// Its publishes fail (the link to the stream is cut that way).
    pub cut: bool,
    /// Crashed: it takes no input until restarted.
    pub crashed: bool,
    subscription: Option<Subscription>,
}

impl Member {
    /// Whether it is running (started, not stopped, not crashed).
    pub fn running(&self) -> bool {
        self.node.status().started && self.stopped.is_none() && !self.crashed
    }
}

/// What comes next.
enum Next {
    Answer,
    Timer(usize),
}

/// Members over one stream and one snapshot store, with a clock of their own.
pub struct Cluster {
    /// The harness's monotonic time.
    pub now: Duration,
    /// The stream.
    pub stream: MemoryStream,
    /// The snapshot store.
    pub snapshots: MemorySnapshotStore,
    /// The members, node ids 1, 2, ...
    pub members: Vec<Member>,
    /// One way.
    pub latency: Duration,
    /// Inputs on their way: (due, order) → (member, input).
    in_flight: BTreeMap<(Duration, u64), (usize, Input)>,
    sent: u64,
    /// Inputs handled.
    pub steps: u64,
    configure: Box<dyn Fn(&mut NodeConfig)>,
    tables: Vec<(String, Vec<String>, usize)>,
}

impl Cluster {
    /// `n` members with the same tables (name, columns, key columns), each configured by
    /// `configure`; none started yet ([`Cluster::start`]).
    pub fn new(
        n: usize,
        tables: &[(&str, &[&str], usize)],
        configure: impl Fn(&mut NodeConfig) + 'static,
    ) -> Self {
        let mut c = Cluster {
            now: Duration::ZERO,
            stream: MemoryStream::new(),
            snapshots: MemorySnapshotStore::default(),
            members: Vec::new(),
            latency: Duration::from_millis(1),
            in_flight: BTreeMap::new(),
            sent: 0,
            steps: 0,
            configure: Box::new(configure),
            tables: tables
                .iter()
                .map(|(t, cols, k)| {
                    (
                        t.to_string(),
                        cols.iter().map(|c| c.to_string()).collect(),
                        *k,
                    )
                })
                .collect(),
        };
        for _ in 0..n {
            c.add_member();
        }
        c
    }

    /// Uses `stream` instead of the default one (a retention limit, say); before starting.
    pub fn with_stream(mut self, stream: MemoryStream) -> Self {
        self.stream = stream;
        self
    }

    /// Adds a member with an empty database (not started); returns its index.
    pub fn add_member(&mut self) -> usize {
        let id = self.members.len() as NodeId + 1;
        let storage = MemoryStorage::new(id, self.snapshots.clone());
        let app = storage.app();
        for (t, cols, k) in &self.tables {
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            app.create_table(t, &cols, *k);
        }
        let mut cfg = NodeConfig::new(id, format!("memory-db-{id}"));
        (self.configure)(&mut cfg);
        self.members.push(Member {
            node: Node::new(cfg),
            storage,
            app,
            events: Vec::new(),
            stopped: None,
            skew_ms: 0,
            cut: false,
            crashed: false,
            subscription: None,
        });
        self.members.len() - 1
    }

    /// Member `i`'s wall clock.
    pub fn wall_ms(&self, i: usize) -> u64 {
        (EPOCH_MS as i64 + self.now.as_millis() as i64 + self.members[i].skew_ms) as u64
    }

    /// Starts member `i`: it reads its persisted state.
    pub fn start(&mut self, i: usize) {
        let r = self.members[i]
            .storage
            .recover()
            .expect("the in-memory model recovers");
        self.input(i, Input::Recovered(r));
    }

    /// Starts every member.
    pub fn start_all(&mut self) {
        for i in 0..self.members.len() {
            self.start(i);
        }
    }

    /// Member `i`'s process dies: its node and everything in flight to it are lost; its
    /// database survives.
    pub fn crash(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.crashed = true;
        m.subscription = None;
        self.in_flight.retain(|_, (to, _)| *to != i);
    }

    /// Member `i` starts again after a crash or a stop: a new node over its database
    /// reopened.
    pub fn restart(&mut self, i: usize) {
        let cfg = self.members[i].node.config().clone();
        let m = &mut self.members[i];
        m.node = Node::new(cfg);
        m.storage = m.storage.reopen();
        m.crashed = false;
        m.stopped = None;
        m.subscription = None;
        self.start(i);
    }

    /// The application of member `i` committed: its node gets the file watch's hint.
    pub fn hint(&mut self, i: usize) {
        self.input(i, Input::LocalChange);
    }

    /// Asks member `i` to stop.
    pub fn shutdown(&mut self, i: usize) {
        self.input(i, Input::Shutdown);
    }

    /// Takes one step: the earliest answer, delivery or timer. Returns false when nothing
    /// is left to happen.
    pub fn step(&mut self) -> bool {
        self.step_until(Duration::MAX)
    }

    /// The earliest thing to happen, if any.
    fn next(&self) -> Option<(Duration, Next)> {
        let answer = self
            .in_flight
            .keys()
            .next()
            .map(|&(t, _)| (t, Next::Answer));
        let timer = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.running())
            .map(|(i, m)| (m.node.poll_timeout(), Next::Timer(i)))
            .min_by_key(|(t, _)| *t);
        // On a tie, answers first (they were sent before the timer was armed).
        match (answer, timer) {
            (Some(a), Some(t)) => Some(if a.0 <= t.0 { a } else { t }),
            (a, t) => a.or(t),
        }
    }

    /// Takes one step if it happens by `limit`; otherwise moves the clock to `limit` and
    /// returns false.
    fn step_until(&mut self, limit: Duration) -> bool {
        let Some(next) = self.next().filter(|n| n.0 <= limit) else {
            if limit != Duration::MAX {
                self.now = self.now.max(limit);
            }
            return false;
        };
        self.now = self.now.max(next.0);
        match next.1 {
            Next::Answer => {
                let key = *self.in_flight.keys().next().expect("an answer is due");
                let (i, input) = self.in_flight.remove(&key).expect("just seen");
                if let Input::Delivered { generation, .. } = &input
                    && let Some(s) = self.members[i].subscription.as_mut()
                    && s.generation == *generation
                {
                    s.sending = false;
                }
                if let Input::Subscribed {
                    generation,
                    result: Ok(_),
                } = &input
                    && let Some(s) = self.members[i].subscription.as_mut()
                    && s.generation == *generation
                {
                    s.open = true;
                }
                self.input(i, input);
            }
            Next::Timer(i) => self.input(i, Input::Tick),
        }
        true
    }

    /// Steps through everything that happens in the next `d` (harness time).
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until, |_| false);
    }

    /// Steps until `done` holds (true), or nothing more happens by `deadline` (harness time;
    /// then the clock stands at it, and the answer is whether `done` holds).
    pub fn run_until(
        &mut self,
        deadline: Duration,
        mut done: impl FnMut(&Cluster) -> bool,
    ) -> bool {
        loop {
            if done(self) {
                return true;
            }
            if !self.step_until(deadline) {
                return done(self);
            }
        }
    }

    /// Whether every running member holds the same rows of `table` and nothing waits in an
    /// outbox.
    pub fn converged(&self, table: &str) -> bool {
        let mut running = self.members.iter().filter(|m| m.running());
        let Some(first) = running.next() else {
            return true;
        };
        let rows = first.app.rows(table);
        first.node.status().outbox_batches == 0
            && running.all(|m| m.app.rows(table) == rows && m.node.status().outbox_batches == 0)
    }

    /// Steps until [`Cluster::converged`] on `table`, for at most `within`.
    pub fn settle(&mut self, table: &str, within: Duration) -> bool {
        let deadline = self.now + within;
        self.run_until(deadline, |c| c.converged(table))
    }

    /// Feeds `input` to member `i`, carries out what it asks, and checks its timers.
    pub fn input(&mut self, i: usize, input: Input) {
        if self.members[i].crashed || self.members[i].stopped.is_some() {
            return;
        }
        self.steps += 1;
        let now = self.now;
        self.members[i].node.handle(now, input);
        self.drain(i);
        let m = &self.members[i];
        if m.running()
            && let Err(e) = m.node.check_timers()
        {
            panic!(
                "node {} at {now:?}, after {} inputs: {e}",
                i + 1,
                self.steps
            );
        }
        self.send_deliveries();
    }

    fn later(&mut self, i: usize, after: Duration, input: Input) {
        self.sent += 1;
        self.in_flight
            .insert((self.now + after, self.sent), (i, input));
    }

    fn drain(&mut self, i: usize) {
        let now = self.now;
        let rtt = self.latency * 2;
        while let Some(out) = self.members[i].node.poll_output() {
            let wall = self.wall_ms(i);
            let id = self.members[i].node.config().node_id;
            let m = &mut self.members[i];
            match out {
                Output::Capture => {
                    let t = m.node.stamp_time(now, wall);
                    let r = m.storage.capture(m.node.clock_mut(), t);
                    let r = r.map_err(|e| StorageError::new(StorageOp::Capture, &e));
                    m.node.handle(now, Input::Captured(r));
                }
                Output::Apply(deliveries) => {
                    let t = m.node.stamp_time(now, wall);
                    let r = m.storage.apply(m.node.clock_mut(), t, &deliveries);
                    let result = r.map_err(|e| StorageError::new(StorageOp::Apply, &e));
                    m.node.handle(
                        now,
                        Input::Applied {
                            result,
                            deliveries,
                            wall_ms: wall,
                        },
                    );
                }
                Output::MarkPublished(batch) => {
                    let r = m.storage.mark_published(batch);
                    let r = r.map_err(|e| StorageError::new(StorageOp::MarkPublished, &e));
                    m.node.handle(now, Input::MarkedPublished(r));
                }
                Output::RetryParked { all } => {
                    let t = m.node.stamp_time(now, wall);
                    let r = m.storage.retry_parked(m.node.clock_mut(), t, all);
                    let r = r.map_err(|e| StorageError::new(StorageOp::RetryParked, &e));
                    m.node.handle(now, Input::ParkedRetried(r));
                }
                Output::RestoreSnapshot(staged) => {
                    let t = m.node.stamp_time(now, wall);
                    let r = m.storage.restore(m.node.clock_mut(), t, &staged);
                    let r = r.map_err(|e| StorageError::new(StorageOp::Restore, &e));
                    m.node.handle(now, Input::Restored(r));
                }
                Output::Prepare => {
                    let r = self.stream.bounds_if_up();
                    self.later(i, rtt, Input::Prepared(r));
                }
                Output::Claim => {
                    let owner = m.node.config().owner.clone();
                    self.stream.set_time_ms(EPOCH_MS + now.as_millis() as u64);
                    let result = self.stream.lease(&format!("node-{id}"), &owner);
                    let input = Input::Claimed {
                        result,
                        sent_wall_ms: wall,
                        received_wall_ms: wall + rtt.as_millis() as u64,
                    };
                    self.later(i, rtt, input);
                }
                Output::Subscribe {
                    from_seq,
                    generation,
                } => {
                    let result = self.stream.bounds_if_up();
                    m.subscription = result.is_ok().then_some(Subscription {
                        generation,
                        next_seq: from_seq,
                        open: false,
                        sending: false,
                    });
                    self.later(i, rtt, Input::Subscribed { generation, result });
                }
                Output::Unsubscribe { generation } => {
                    if m.subscription.is_some_and(|s| s.generation == generation) {
                        m.subscription = None;
                    }
                }
                Output::Publish {
                    batch,
                    chunk,
                    payload,
                } => {
                    let payload = match payload {
                        Some(p) => Ok(Some(p)),
                        None => crate::drive::read_outbox(&mut m.storage, batch, chunk),
                    };
                    // As the drive loop does: gone from the outbox means acknowledged already.
                    let result = match payload {
                        Ok(None) => Ok(0),
                        Err(e) => Err(e),
                        Ok(Some(_)) if m.cut => Err(TransportError::unavailable("cut off")),
                        Ok(Some(p)) => {
                            self.stream.set_time_ms(EPOCH_MS + now.as_millis() as u64);
                            self.stream.publish(&batch.message_id(chunk), p)
                        }
                    };
                    self.later(
                        i,
                        rtt,
                        Input::Published {
                            batch,
                            chunk,
                            result,
                        },
                    );
                }
                Output::SaveSnapshot { position, seed } => {
                    let outcome = match self.snapshots.newest() {
                        Some(newest) if seed => SaveOutcome::UpToDate(newest),
                        _ => SaveOutcome::Saved(self.snapshots.save(&m.app, id, position)),
                    };
                    self.later(i, rtt, Input::SnapshotSaved(Ok(outcome)));
                }
                Output::FetchSnapshot { min_position } => {
                    let fetched = Fetched {
                        staged: self.snapshots.fetch(min_position),
                        rejected: Vec::new(),
                    };
                    self.later(i, rtt, Input::SnapshotFetched(Ok(fetched)));
                }
                Output::Event(e) => m.events.push((now, e)),
                Output::Stop(s) => {
                    m.stopped = Some(s);
                    m.subscription = None;
                }
            }
        }
    }

    /// Sends what the stream holds beyond each open subscription, a burst at a time.
    fn send_deliveries(&mut self) {
        for i in 0..self.members.len() {
            let m = &self.members[i];
            let Some(s) = m.subscription else { continue };
            if !s.open || s.sending || !m.running() || !m.node.wants_deliveries() {
                continue;
            }
            let burst = self.stream.read(s.next_seq, DELIVERY_BURST);
            let Some(last) = burst.last() else { continue };
            let next_seq = last.stream_seq + 1;
            let s = self.members[i]
                .subscription
                .as_mut()
                .expect("checked above");
            s.next_seq = next_seq;
            s.sending = true;
            let generation = s.generation;
            self.later(
                i,
                self.latency,
                Input::Delivered {
                    generation,
                    deliveries: burst,
                },
            );
        }
    }
}
