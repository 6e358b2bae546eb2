//! An in-memory stream: [`MemoryStream`] holds the messages, the deduplication ids and the
//! leases, with the JetStream behaviour marmot relies on (sequence numbers from 1, a message
//! id stored once, retention that drops the oldest messages, delivery from a start
//! sequence); [`MemoryTransport`] is the [`Transport`] port over it.
//!
//! A node's transport can be any log with these properties; this one is the smallest
//! example, and what the core's harness ([`super::harness`]) runs on.

use crate::apply::Delivery;
use crate::ports::{Claim, Deliveries, StreamBounds, Transport, TransportError};
use bytes::Bytes;
use futures::channel::mpsc::{UnboundedSender, unbounded};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone, Debug)]
struct Stored {
    seq: u64,
    payload: Bytes,
    published_ms: u64,
}

#[derive(Default)]
struct State {
    /// The messages still held, oldest first.
    messages: VecDeque<Stored>,
    /// The newest sequence ever stored (0: none).
    last_seq: u64,
    /// Message ids seen, and the sequence each was stored at.
    ids: BTreeMap<String, u64>,
    /// Keep at most this many messages (None: all).
    max_messages: Option<usize>,
    /// Lease key → (owner, revision of its grant, server time of the grant).
    leases: BTreeMap<String, (String, u64, u64)>,
    /// A lease not renewed for this long (server time, ms) expires.
    lease_ttl_ms: u64,
    /// The revision of the last grant of any lease.
    revision: u64,
    /// The server's clock (ms since the Unix epoch), when no time source is set.
    now_ms: u64,
    /// The server's clock follows this time source.
    time: Option<super::VirtualTime>,
    /// Every call fails as unavailable (an outage).
    down: bool,
    /// Open subscriptions: the next sequence each expects, and where to send it.
    subscribers: Vec<(u64, UnboundedSender<Result<Delivery, TransportError>>)>,
}

impl State {
    fn bounds(&self) -> StreamBounds {
        StreamBounds {
            first_seq: self.messages.front().map_or(self.last_seq + 1, |m| m.seq),
            last_seq: self.last_seq,
        }
    }
    fn delivery(&self, m: &Stored) -> Delivery {
        Delivery {
            stream_seq: m.seq,
            payload: m.payload.clone(),
            published_ms: m.published_ms,
            pending: self.last_seq - m.seq,
        }
    }
    fn server_ms(&self) -> u64 {
        use crate::ports::Env;
        self.time.as_ref().map_or(self.now_ms, |t| t.wall_ms())
    }
    /// The lease `key` as held now: (owner, revision), unless it expired.
    fn held(&self, key: &str) -> Option<(&str, u64)> {
        let now = self.server_ms();
        self.leases
            .get(key)
            .filter(|(_, _, at)| now < at.saturating_add(self.lease_ttl_ms))
            .map(|(o, r, _)| (o.as_str(), *r))
    }
    fn up(&self) -> Result<(), TransportError> {
        if self.down {
            Err(TransportError::unavailable("the in-memory stream is down"))
        } else {
            Ok(())
        }
    }
}

/// The stream, its deduplication ids and its leases, shared by every node of a cluster.
#[derive(Clone)]
pub struct MemoryStream {
    state: Arc<Mutex<State>>,
}

impl Default for MemoryStream {
    fn default() -> Self {
        MemoryStream {
            state: Arc::new(Mutex::new(State {
                lease_ttl_ms: 15_000,
                ..State::default()
            })),
        }
    }
}

impl MemoryStream {
    /// An empty stream that keeps every message; leases expire 15 s (server time) after
    /// their last grant, as the NATS adapter's do.
    pub fn new() -> Self {
        Self::default()
    }

    /// Leases expire `ms` (server time) after their last grant or renewal.
    pub fn with_lease_ttl_ms(self, ms: u64) -> Self {
        self.lock().lease_ttl_ms = ms;
        self
    }

    /// Keeps at most `n` messages: older ones are dropped (as a JetStream stream with a
    /// message limit does).
    pub fn with_max_messages(self, n: usize) -> Self {
        self.lock().max_messages = Some(n.max(1));
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the server's clock (it stamps messages and lease grants).
    pub fn set_time_ms(&self, ms: u64) {
        self.lock().now_ms = ms;
    }

    /// The server's clock follows `time` (the nodes' own, in an example with one clock).
    pub fn with_time(self, time: super::VirtualTime) -> Self {
        self.lock().time = Some(time);
        self
    }

    /// Its current extent, unless it is down.
    pub fn bounds_if_up(&self) -> Result<StreamBounds, TransportError> {
        let s = self.lock();
        s.up()?;
        Ok(s.bounds())
    }

    /// Takes the stream down (every call fails as unavailable) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Its current extent.
    pub fn bounds(&self) -> StreamBounds {
        self.lock().bounds()
    }

    /// Stores a message under `id`, once: a message id seen before returns the sequence it
    /// was stored at. Sends it to every open subscription.
    pub fn publish(&self, id: &str, payload: Bytes) -> Result<u64, TransportError> {
        let mut s = self.lock();
        s.up()?;
        if let Some(&seq) = s.ids.get(id) {
            return Ok(seq);
        }
        s.last_seq += 1;
        let m = Stored {
            seq: s.last_seq,
            payload,
            published_ms: s.server_ms(),
        };
        s.ids.insert(id.to_string(), m.seq);
        s.messages.push_back(m.clone());
        if let Some(max) = s.max_messages {
            while s.messages.len() > max {
                s.messages.pop_front();
            }
        }
        let d = s.delivery(&m);
        s.subscribers.retain_mut(|(next, tx)| {
            if *next > d.stream_seq {
                return true;
            }
            *next = d.stream_seq + 1;
            tx.unbounded_send(Ok(d.clone())).is_ok()
        });
        Ok(m.seq)
    }

    /// Up to `max` messages from `from_seq` on (fewer when the stream holds fewer).
    pub fn read(&self, from_seq: u64, max: usize) -> Vec<Delivery> {
        let s = self.lock();
        s.messages
            .iter()
            .filter(|m| m.seq >= from_seq)
            .take(max)
            .map(|m| s.delivery(m))
            .collect()
    }

    /// Grants (or renews) lease `key` to `owner` unless someone else holds it (a lease not
    /// renewed in time has expired: anyone may take it).
    pub fn lease(&self, key: &str, owner: &str) -> Result<Claim, TransportError> {
        let mut s = self.lock();
        s.up()?;
        if let Some((holder, _)) = s.held(key)
            && holder != owner
        {
            return Ok(Claim::Held {
                by: holder.to_string(),
            });
        }
        s.revision += 1;
        let (revision, now) = (s.revision, s.server_ms());
        s.leases
            .insert(key.to_string(), (owner.to_string(), revision, now));
        Ok(Claim::Granted {
            server_ms: now,
            revision,
        })
    }

    /// Renews lease `key` only if it is still `owner`'s grant of `revision` (not expired,
    /// nobody took it meanwhile).
    pub fn renew_lease(
        &self,
        key: &str,
        owner: &str,
        revision: u64,
    ) -> Result<Option<u64>, TransportError> {
        let mut s = self.lock();
        s.up()?;
        match s.held(key) {
            Some((holder, r)) if holder == owner && r == revision => {
                s.revision += 1;
                let (r, now) = (s.revision, s.server_ms());
                s.leases
                    .insert(key.to_string(), (owner.to_string(), r, now));
                Ok(Some(r))
            }
            _ => Ok(None),
        }
    }

    /// Gives up lease `key` if `owner` holds it.
    pub fn release(&self, key: &str, owner: &str) -> Result<(), TransportError> {
        let mut s = self.lock();
        s.up()?;
        if s.held(key).is_some_and(|(h, _)| h == owner) {
            s.leases.remove(key);
        }
        Ok(())
    }
}

/// The [`Transport`] port over a [`MemoryStream`]: every call completes at once.
#[derive(Clone)]
pub struct MemoryTransport {
    stream: MemoryStream,
}

impl MemoryTransport {
    /// A node's transport to `stream`.
    pub fn new(stream: MemoryStream) -> Self {
        MemoryTransport { stream }
    }
}

#[async_trait::async_trait]
impl Transport for MemoryTransport {
    async fn prepare(&self) -> Result<StreamBounds, TransportError> {
        let s = self.stream.lock();
        s.up()?;
        Ok(s.bounds())
    }

    async fn publish(&self, message_id: String, payload: Bytes) -> Result<u64, TransportError> {
        self.stream.publish(&message_id, payload)
    }

    async fn subscribe(&self, from_seq: u64) -> Result<(StreamBounds, Deliveries), TransportError> {
        let mut s = self.stream.lock();
        s.up()?;
        let (tx, rx) = unbounded();
        let mut next = from_seq;
        for m in s.messages.iter().filter(|m| m.seq >= from_seq) {
            // The receiver is right here: sending cannot fail.
            let _ = tx.unbounded_send(Ok(s.delivery(m)));
            next = m.seq + 1;
        }
        let bounds = s.bounds();
        s.subscribers.push((next, tx));
        Ok((bounds, Box::pin(rx)))
    }

    async fn lease(&self, key: &str, owner: &str) -> Result<Claim, TransportError> {
        self.stream.lease(key, owner)
    }

    async fn renew_lease(
        &self,
        key: &str,
        owner: &str,
        revision: u64,
    ) -> Result<Option<u64>, TransportError> {
        self.stream.renew_lease(key, owner, revision)
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), TransportError> {
        self.stream.release(key, owner)
    }
}
