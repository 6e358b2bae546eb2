//! The simulated broker: exactly the JetStream behaviour marmot relies on, served over
//! turmoil's simulated TCP.
//!
//! - one stream with per-message sequence numbers, starting at 1;
//! - a duplicate window by message id (a publish with an id seen within the window is
//!   acknowledged with the first copy's sequence and not stored again);
//! - retention by limits: beyond `max_messages` the oldest messages are discarded;
//! - consumers positioned by start sequence (below the first held message they start at the
//!   first one, as JetStream does), pushing messages in order, plus heartbeats;
//! - server timestamps from the broker host's clock;
//! - leases with expiry (node ids and the snapshot lock: compare-and-set keys, as marmot uses
//!   a key-value bucket);
//! - an object store for snapshots.
//!
//! Its state lives outside the host (it survives a broker restart, as JetStream's file
//! storage does); connections do not. It can also duplicate deliveries, as a redelivering
//! server or a reconnecting client would.

use crate::proto::{Request, Response, read_request, send_request, send_response};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// The broker's TCP port.
pub const PORT: u16 = 4222;

/// How the broker behaves.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Most messages kept.
    pub max_messages: usize,
    /// Duplicate window.
    pub dedupe_window: Duration,
    /// Node-id claims expire after this.
    pub claim_ttl: Duration,
    /// Chance that a delivered message is delivered a second time.
    pub duplicate_rate: f64,
}

struct Stored {
    seq: u64,
    ts_ms: u64,
    payload: Bytes,
}

/// What the broker holds.
pub struct BrokerState {
    cfg: BrokerConfig,
    msgs: VecDeque<Stored>,
    last_seq: u64,
    ids: BTreeMap<String, u64>,
    id_times: VecDeque<(u64, String)>,
    /// Leases: key -> (owner, expires at ms, revision).
    leases: BTreeMap<String, (String, u64, u64)>,
    /// The last lease revision handed out (as a key-value bucket's sequence).
    lease_revision: u64,
    objects: BTreeMap<String, Bytes>,
    notify: Rc<tokio::sync::Notify>,
    rng: ChaCha8Rng,
    /// Every publish stored, in order: (sequence, payload). The checker reads it.
    pub published: Vec<(u64, Bytes)>,
}

/// Shared handle to the broker's state.
pub type Broker = Rc<RefCell<BrokerState>>;

impl BrokerState {
    /// An empty broker.
    pub fn new(cfg: BrokerConfig, seed: u64) -> Broker {
        Rc::new(RefCell::new(BrokerState {
            cfg,
            msgs: VecDeque::new(),
            last_seq: 0,
            ids: BTreeMap::new(),
            id_times: VecDeque::new(),
            leases: BTreeMap::new(),
            lease_revision: 0,
            objects: BTreeMap::new(),
            notify: Rc::new(tokio::sync::Notify::new()),
            rng: ChaCha8Rng::seed_from_u64(seed),
            published: Vec::new(),
        }))
    }

    fn first_seq(&self) -> u64 {
        self.msgs.front().map_or(self.last_seq + 1, |m| m.seq)
    }

    /// Stream extent (first, last).
    pub fn bounds(&self) -> (u64, u64) {
        (self.first_seq(), self.last_seq)
    }

    fn publish(&mut self, id: String, payload: Bytes, now_ms: u64) -> (u64, bool) {
        let window = self.cfg.dedupe_window.as_millis() as u64;
        while let Some((t, _)) = self.id_times.front() {
            if now_ms.saturating_sub(*t) <= window {
                break;
            }
            let (_, old) = self.id_times.pop_front().expect("front exists");
            self.ids.remove(&old);
        }
        if let Some(&seq) = self.ids.get(&id) {
            return (seq, true);
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        self.ids.insert(id.clone(), seq);
        self.id_times.push_back((now_ms, id));
        self.published.push((seq, payload.clone()));
        self.msgs.push_back(Stored {
            seq,
            ts_ms: now_ms,
            payload,
        });
        while self.msgs.len() > self.cfg.max_messages {
            self.msgs.pop_front();
        }
        self.notify.notify_waiters();
        (seq, false)
    }

    fn lease(&mut self, key: String, owner: String, now_ms: u64) -> Response {
        match self.leases.get(&key) {
            Some((holder, expires, _)) if *holder != owner && *expires > now_ms => {
                Response::Held { by: holder.clone() }
            }
            _ => self.grant(key, owner, now_ms),
        }
    }

    fn grant(&mut self, key: String, owner: String, now_ms: u64) -> Response {
        let expires = now_ms + self.cfg.claim_ttl.as_millis() as u64;
        self.lease_revision += 1;
        let revision = self.lease_revision;
        self.leases.insert(key, (owner, expires, revision));
        Response::Claimed {
            server_ms: now_ms,
            revision,
        }
    }

    /// Compare-and-set renewal: only the holder of `revision`, and only before it expired
    /// (an expired entry is gone from a key-value bucket with a TTL).
    fn renew(&mut self, key: String, owner: String, revision: u64, now_ms: u64) -> Response {
        match self.leases.get(&key) {
            Some((holder, expires, rev))
                if *holder == owner && *rev == revision && *expires > now_ms =>
            {
                self.grant(key, owner, now_ms)
            }
            _ => Response::Lost,
        }
    }

    fn release(&mut self, key: &str, owner: &str) {
        if self
            .leases
            .get(key)
            .is_some_and(|(holder, _, _)| holder == owner)
        {
            self.leases.remove(key);
        }
    }

    /// Flips a byte in the newest snapshot object, as a bad disk or a cut upload would
    /// (the fault that checks readers verify checksums). Returns its name.
    pub fn corrupt_newest_snapshot(&mut self) -> Option<String> {
        let name = self
            .objects
            .keys()
            .rev()
            .find(|n| n.starts_with("snapshot-"))?
            .clone();
        let data = self.objects.get_mut(&name)?;
        let mut v = data.to_vec();
        let mid = v.len() / 2;
        if let Some(b) = v.get_mut(mid) {
            *b ^= 0x5a;
        }
        *data = Bytes::from(v);
        Some(name)
    }

    /// Up to `max` messages from `from` on, and how many follow the last of them.
    fn from(&self, from: u64, max: usize) -> Vec<Response> {
        let first = self.first_seq();
        let start = from.max(first);
        let skip = (start - first) as usize;
        self.msgs
            .iter()
            .skip(skip)
            .take(max)
            .map(|m| Response::Msg {
                seq: m.seq,
                ts_ms: m.ts_ms,
                pending: self.last_seq - m.seq,
                payload: m.payload.clone(),
            })
            .collect()
    }
}

fn now_ms() -> u64 {
    turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64)
}

/// The broker host's software: accepts connections until the host is crashed.
pub async fn serve(broker: Broker) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let b = broker.clone();
        tokio::task::spawn_local(async move {
            let _ = handle(b, stream).await;
        });
    }
}

async fn handle(broker: Broker, mut stream: turmoil::net::TcpStream) -> std::io::Result<()> {
    let req = read_request(&mut stream).await?;
    let reply = match req {
        Request::Publish { id, payload } => {
            let (seq, duplicate) = broker.borrow_mut().publish(id, payload, now_ms());
            Response::PubAck { seq, duplicate }
        }
        Request::Info => {
            let (first, last) = broker.borrow().bounds();
            Response::Info { first, last }
        }
        Request::Lease { key, owner } => broker.borrow_mut().lease(key, owner, now_ms()),
        Request::RenewLease {
            key,
            owner,
            revision,
        } => broker.borrow_mut().renew(key, owner, revision, now_ms()),
        Request::Release { key, owner } => {
            broker.borrow_mut().release(&key, &owner);
            Response::Done
        }
        Request::ObjPut { name, data } => {
            broker.borrow_mut().objects.insert(name, data);
            Response::Done
        }
        Request::ObjGet { name } => Response::Obj(broker.borrow().objects.get(&name).cloned()),
        Request::ObjList => Response::Names(broker.borrow().objects.keys().cloned().collect()),
        Request::ObjDelete { name } => {
            broker.borrow_mut().objects.remove(&name);
            Response::Done
        }
        Request::Subscribe { from } => return subscription(broker, stream, from).await,
    };
    send_response(&mut stream, &reply).await
}

async fn subscription(
    broker: Broker,
    mut stream: turmoil::net::TcpStream,
    from: u64,
) -> std::io::Result<()> {
    let mut next = from;
    loop {
        let notify = broker.borrow().notify.clone();
        let notified = notify.notified();
        let batch = broker.borrow().from(next, 32);
        if batch.is_empty() {
            tokio::select! {
                biased;
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    send_response(&mut stream, &Response::Heartbeat).await?;
                }
            }
            continue;
        }
        for m in batch {
            if let Response::Msg { seq, .. } = m {
                next = seq + 1;
            }
            send_response(&mut stream, &m).await?;
            let dup = {
                let mut b = broker.borrow_mut();
                let rate = b.cfg.duplicate_rate;
                rate > 0.0 && b.rng.random_bool(rate)
            };
            if dup {
                send_response(&mut stream, &m).await?;
            }
        }
    }
}

/// A client request with a timeout (used by the transport).
pub(crate) async fn request(
    addr: &str,
    req: &Request,
    timeout: Duration,
) -> std::io::Result<(turmoil::net::TcpStream, Response)> {
    tokio::time::timeout(timeout, async {
        let mut s = turmoil::net::TcpStream::connect((addr, PORT)).await?;
        send_request(&mut s, req).await?;
        let r = crate::proto::read_response(&mut s).await?;
        Ok((s, r))
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))?
}
