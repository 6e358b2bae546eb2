//! The transport adapter a simulated node uses: the same [`Transport`] port as io-nats,
//! talking to the simulated broker over turmoil's TCP. Like the real client it never
//! blocks forever: every request has a timeout, and a subscription that hears nothing (not
//! even a heartbeat) for a while ends with an error, so the node resubscribes (turmoil's TCP
//! never retransmits: a stream that lost a segment in a partition stays stalled).

use crate::broker::request;
use crate::proto::{Request, Response, send_request};
use bytes::Bytes;
use futures::StreamExt;
use marmot_core::apply::Delivery;
use marmot_core::ports::{Claim, Deliveries, StreamBounds, Transport, TransportError};
use marmot_core::snapshot::{ObjectStore, Progress};
use std::path::Path;
use std::time::Duration;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const SILENCE: Duration = Duration::from_secs(2);

/// The simulated transport of one node.
pub struct SimTransport {
    broker: String,
    slow_claims: Option<std::time::Duration>,
}

impl SimTransport {
    /// A transport to the broker host named `broker`.
    pub fn new(broker: &str) -> Self {
        SimTransport {
            broker: broker.to_string(),
            slow_claims: None,
        }
    }

    /// Node-id claims (the clock checks) answer only after `d`: a slow key-value store, while
    /// the stream itself is quick.
    pub fn with_slow_claims(mut self, d: Option<std::time::Duration>) -> Self {
        self.slow_claims = d;
        self
    }

    async fn call(&self, req: Request) -> Result<Response, TransportError> {
        request(&self.broker, &req, REQUEST_TIMEOUT)
            .await
            .map(|(_, r)| r)
            .map_err(|e| TransportError::unavailable(format!("broker: {e}")))
    }

    async fn bounds(&self) -> Result<StreamBounds, TransportError> {
        match self.call(Request::Info).await? {
            Response::Info { first, last } => Ok(StreamBounds {
                first_seq: first,
                last_seq: last,
            }),
            other => Err(TransportError::other(format!("unexpected {other:?}"))),
        }
    }
}

#[async_trait::async_trait]
impl Transport for SimTransport {
    async fn prepare(&self) -> Result<StreamBounds, TransportError> {
        self.bounds().await
    }

    async fn publish(&self, message_id: String, payload: Bytes) -> Result<u64, TransportError> {
        match self
            .call(Request::Publish {
                id: message_id,
                payload,
            })
            .await?
        {
            Response::PubAck { seq, .. } => Ok(seq),
            other => Err(TransportError::other(format!("unexpected {other:?}"))),
        }
    }

    async fn subscribe(&self, from_seq: u64) -> Result<(StreamBounds, Deliveries), TransportError> {
        let bounds = self.bounds().await?;
        let mut s = tokio::time::timeout(
            REQUEST_TIMEOUT,
            turmoil::net::TcpStream::connect((self.broker.as_str(), crate::broker::PORT)),
        )
        .await
        .map_err(|_| TransportError::unavailable("broker: connect timed out"))?
        .map_err(|e| TransportError::unavailable(format!("broker: {e}")))?;
        send_request(&mut s, &Request::Subscribe { from: from_seq })
            .await
            .map_err(|e| TransportError::unavailable(format!("broker: {e}")))?;
        let deliveries = futures::stream::unfold(Some(s), |s| async move {
            let mut s = s?;
            loop {
                match tokio::time::timeout(SILENCE, crate::proto::read_response(&mut s)).await {
                    Ok(Ok(Response::Msg {
                        seq,
                        ts_ms,
                        pending,
                        payload,
                    })) => {
                        let d = Delivery {
                            stream_seq: seq,
                            payload,
                            published_ms: ts_ms,
                            pending,
                        };
                        return Some((Ok(d), Some(s)));
                    }
                    Ok(Ok(Response::Heartbeat)) => continue,
                    Ok(Ok(other)) => {
                        return Some((
                            Err(TransportError::other(format!("unexpected {other:?}"))),
                            None,
                        ));
                    }
                    Ok(Err(e)) => {
                        return Some((
                            Err(TransportError::unavailable(format!("subscription: {e}"))),
                            None,
                        ));
                    }
                    Err(_) => {
                        return Some((
                            Err(TransportError::unavailable("subscription: silent")),
                            None,
                        ));
                    }
                }
            }
        });
        Ok((bounds, deliveries.boxed()))
    }

    async fn lease(&self, key: &str, owner: &str) -> Result<Claim, TransportError> {
        if let Some(d) = self.slow_claims
            && key.starts_with("node-")
        {
            tokio::time::sleep(d).await;
        }
        match self
            .call(Request::Lease {
                key: key.to_string(),
                owner: owner.to_string(),
            })
            .await?
        {
            Response::Claimed {
                server_ms,
                revision,
            } => Ok(Claim::Granted {
                server_ms,
                revision,
            }),
            Response::Held { by } => Ok(Claim::Held { by }),
            other => Err(TransportError::other(format!("unexpected {other:?}"))),
        }
    }

    async fn renew_lease(
        &self,
        key: &str,
        owner: &str,
        revision: u64,
    ) -> Result<Option<u64>, TransportError> {
        match self
            .call(Request::RenewLease {
                key: key.to_string(),
                owner: owner.to_string(),
                revision,
            })
            .await?
        {
            Response::Claimed { revision, .. } => Ok(Some(revision)),
            Response::Lost => Ok(None),
            other => Err(TransportError::other(format!("unexpected {other:?}"))),
        }
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), TransportError> {
        self.call(Request::Release {
            key: key.to_string(),
            owner: owner.to_string(),
        })
        .await
        .map(|_| ())
    }
}

/// The simulated broker's object store, behind the same port as the real stores.
pub struct SimObjectStore {
    transport: SimTransport,
    slow: Option<(
        std::time::Duration,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    )>,
}

impl SimObjectStore {
    /// The object store of broker host `broker`.
    pub fn new(broker: &str) -> Self {
        SimObjectStore {
            transport: SimTransport::new(broker),
            slow: None,
        }
    }

    /// Uploads of files (snapshots) take `slow` longer while `active` holds: longer than the
    /// snapshot lease lives, so a save has to renew it.
    pub fn with_slow_uploads(
        mut self,
        slow: Option<std::time::Duration>,
        active: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        self.slow = slow.map(|d| (d, active));
        self
    }

    async fn call(&self, req: Request) -> Result<Response, String> {
        self.transport.call(req).await.map_err(|e| e.to_string())
    }
}

#[async_trait::async_trait]
impl ObjectStore for SimObjectStore {
    async fn put_file(
        &self,
        name: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<(), String> {
        let data = std::fs::read(path).map_err(|e| e.to_string())?;
        if let Some((d, active)) = &self.slow
            && active.load(std::sync::atomic::Ordering::Relaxed)
        {
            tokio::time::sleep(*d).await;
        }
        progress(data.len() as u64);
        self.put_bytes(name, Bytes::from(data)).await
    }
    async fn get_file(
        &self,
        name: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<(), String> {
        let data = self
            .get_bytes(name)
            .await?
            .ok_or_else(|| format!("{name}: no such object"))?;
        progress(data.len() as u64);
        std::fs::write(path, &data).map_err(|e| e.to_string())
    }
    async fn put_bytes(&self, name: &str, data: Bytes) -> Result<(), String> {
        self.call(Request::ObjPut {
            name: name.to_string(),
            data,
        })
        .await
        .map(|_| ())
    }
    async fn get_bytes(&self, name: &str) -> Result<Option<Bytes>, String> {
        match self
            .call(Request::ObjGet {
                name: name.to_string(),
            })
            .await?
        {
            Response::Obj(o) => Ok(o),
            other => Err(format!("unexpected {other:?}")),
        }
    }
    async fn list(&self) -> Result<Vec<String>, String> {
        match self.call(Request::ObjList).await? {
            Response::Names(n) => Ok(n),
            other => Err(format!("unexpected {other:?}")),
        }
    }
    async fn delete(&self, name: &str) -> Result<(), String> {
        self.call(Request::ObjDelete {
            name: name.to_string(),
        })
        .await
        .map(|_| ())
    }
}
