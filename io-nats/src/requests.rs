//! Questions one marmot process asks a node directly, by NATS request and reply (not through
//! the stream): `marmot diff` asks each node for its convergence digests. Subjects are
//! `<subject_prefix>-v1-digest.<node>`, outside the stream's subjects.

use crate::{NatsTransport, unavailable};
use bytes::Bytes;
use futures::StreamExt;
use marmot_core::NodeId;
use marmot_core::ports::TransportError;
use std::time::Duration;

/// A request a node received: its payload, and where the answer goes.
pub struct Request {
    /// What was asked.
    pub payload: Bytes,
    reply: Option<async_nats::Subject>,
}

impl NatsTransport {
    /// The subject node `node` answers digest requests on.
    pub fn digest_subject(&self, node: NodeId) -> String {
        format!("{}-v1-digest.{node}", self.cfg.subject_prefix)
    }

    /// Receives the requests sent to this node's digest subject.
    pub async fn serve_digests(
        &self,
    ) -> Result<impl futures::Stream<Item = Request> + Send + use<>, TransportError> {
        let sub = self
            .client
            .subscribe(self.digest_subject(self.cfg.node_id))
            .await
            .map_err(|e| unavailable("subscribing to digest requests", e))?;
        Ok(sub.map(|m| Request {
            payload: m.payload,
            reply: m.reply,
        }))
    }

    /// Answers `r` (a request sent without a reply subject gets none).
    pub async fn answer(&self, r: Request, payload: Bytes) -> Result<(), TransportError> {
        let Some(reply) = r.reply else {
            return Ok(());
        };
        self.client
            .publish(reply, payload)
            .await
            .map_err(|e| unavailable("answering a digest request", e))?;
        self.client
            .flush()
            .await
            .map_err(|e| unavailable("answering a digest request", e))
    }

    /// Asks node `node` and waits for its answer at most `timeout`.
    pub async fn ask_digest(
        &self,
        node: NodeId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let subject = self.digest_subject(node);
        // The client's own request timeout (5 s) is too short for a large table's digest.
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        self.client
            .send_request(subject, request)
            .await
            .map(|m| m.payload)
            .map_err(|e| unavailable(&format!("asking node {node}"), e))
    }
}
