//! # marmot-nats
//!
//! The NATS JetStream adapter of marmot: one stream (`<stream_prefix>-v1`, subjects
//! `<subject_prefix>-v1.<node id>`) that every node publishes to and reads in full.
//!
//! - Retention is by limits (messages, bytes, age), never by interest: a node's position
//!   lives in its own database, and the stream is only a log to read from that position.
//! - Every publish carries `Nats-Msg-Id`, so a retry within the duplicate window is dropped
//!   by the server; publishes are pipelined (many in flight, acknowledged asynchronously).
//! - Reading uses an ordered consumer positioned at a start sequence; it is ephemeral and
//!   recreated by the client on gaps and reconnects.
//! - Node ids are claimed in a key-value bucket whose entries expire unless renewed; the
//!   claim's server timestamp also measures this node's clock skew.
//! - Beside its claim, a node advertises what it reads and where it is ([`NodeInfo`]); a
//!   message of a newer format than some live node reads waits (see the `members` module).
//! - The client reconnects forever with capped backoff; while disconnected, operations fail
//!   quickly and the node retries them.
//!
//! The `-v1` suffix keeps marmot's stream apart from a Go Marmot stream with the same prefix
//! (their message formats differ).
#![warn(missing_docs)]

mod members;
mod objects;
mod requests;
pub use members::{LiveNode, NodeInfo};
pub use objects::NatsObjectStore;
pub use requests::Request;

use async_nats::jetstream::{self, consumer, kv, message::PublishMessage, stream};
use bytes::Bytes;
use futures::StreamExt;
use marmot_core::NodeId;
use marmot_core::apply::Delivery;
use marmot_core::ports::{
    Claim, Deliveries, StreamBounds, Transport, TransportError, TransportErrorKind,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::OnceCell;

/// The smallest server `max_payload` that fits marmot's largest message (a 512 KiB body
/// fragment, its header and `Nats-Msg-Id`).
pub const MIN_MAX_PAYLOAD: usize = 512 * 1024 + 4096;

/// How long a node that went silent stays listed (as down) among the members.
pub const MEMBER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Credentials and TLS, as in Go Marmot's `[nats]` section. Its `Debug` shows which secrets
/// are set, never their values.
#[derive(Clone, Default)]
pub struct Auth {
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// File holding an NKey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file: a user JWT and its NKey seed (decentralised JWT authentication).
    pub creds_file: Option<PathBuf>,
    /// A token.
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the server.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM).
    pub key_file: Option<PathBuf>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |set: bool| if set { "<set>" } else { "<none>" };
        f.debug_struct("Auth")
            .field("user", &self.user)
            .field("password", &hidden(self.password.is_some()))
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("token", &hidden(self.token.is_some()))
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// Stream and connection settings.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`, comma lists accepted).
    pub urls: Vec<String>,
    /// This node.
    pub node_id: NodeId,
    /// Stream name prefix (Go Marmot's `stream_prefix`).
    pub stream_prefix: String,
    /// Subject prefix (Go Marmot's `subject_prefix`).
    pub subject_prefix: String,
    /// Stream replicas (needs that many JetStream servers; a majority must be up to publish).
    pub replicas: usize,
    /// Most messages the stream keeps (0: unlimited).
    pub max_messages: i64,
    /// Most bytes the stream keeps (0: unlimited).
    pub max_bytes: i64,
    /// Oldest message the stream keeps (zero: unlimited).
    pub max_age: Duration,
    /// JetStream duplicate window.
    pub duplicate_window: Duration,
    /// Change an existing stream's limits to these (otherwise only warn about differences).
    pub update_existing: bool,
    /// Credentials and TLS.
    pub auth: Auth,
    /// Longest wait between reconnect attempts.
    pub reconnect_wait_max: Duration,
    /// Timeout for requests and publish acknowledgements.
    pub request_timeout: Duration,
    /// A node-id claim not renewed for this long expires.
    pub claim_ttl: Duration,
    /// Client name shown by the server.
    pub client_name: String,
    /// How long what the other live nodes read (their advertised formats) is trusted before
    /// it is read again, when publishing a schema change.
    pub format_check_interval: Duration,
    /// Talk only to the server of this name (`server_name` in its INFO): the daemon sets it
    /// to the nats-server it supervises, so that a server of someone else's that takes the
    /// port while its own restarts never receives or acknowledges this node's batches.
    pub only_server: Option<String>,
}

impl NatsConfig {
    /// Defaults for node `node_id` connecting to `urls`.
    pub fn new(urls: Vec<String>, node_id: NodeId) -> Self {
        NatsConfig {
            urls,
            node_id,
            stream_prefix: "marmot-changes".into(),
            subject_prefix: "marmot-change-log".into(),
            replicas: 1,
            max_messages: 1_000_000,
            max_bytes: 1 << 30,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            update_existing: false,
            auth: Auth::default(),
            reconnect_wait_max: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            claim_ttl: Duration::from_secs(15),
            client_name: format!("marmot-node-{node_id}"),
            format_check_interval: Duration::from_secs(2),
            only_server: None,
        }
    }

    /// The stream's name.
    pub fn stream_name(&self) -> String {
        format!("{}-v1", self.stream_prefix)
    }

    /// The subject this node publishes to.
    pub fn subject(&self) -> String {
        format!("{}-v1.{}", self.subject_prefix, self.node_id)
    }

    fn bucket(&self) -> String {
        format!("{}-v1-nodes", self.stream_prefix)
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream_name(),
            subjects: vec![format!("{}-v1.>", self.subject_prefix)],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_messages: if self.max_messages > 0 {
                self.max_messages
            } else {
                -1
            },
            max_bytes: if self.max_bytes > 0 {
                self.max_bytes
            } else {
                -1
            },
            max_age: self.max_age,
            num_replicas: self.replicas.max(1),
            duplicate_window: self.duplicate_window,
            storage: stream::StorageType::File,
            allow_direct: true,
            description: Some("marmot: replicated SQLite changes".into()),
            ..Default::default()
        }
    }
}

/// Failure to set up the client (bad credentials files and the like).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A credentials or certificate file could not be read.
    #[error("reading {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The client rejected the options.
    #[error("connecting to NATS at {urls}: {message}")]
    Client {
        /// The servers.
        urls: String,
        /// The error.
        message: String,
    },
}

/// The JetStream transport.
pub struct NatsTransport {
    cfg: NatsConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    kv: OnceCell<kv::Store>,
    members: OnceCell<kv::Store>,
    connected: Arc<AtomicBool>,
    format_gate: members::FormatGate,
}

fn check_server(client: &async_nats::Client, only: Option<&str>) -> Result<(), TransportError> {
    let Some(only) = only else { return Ok(()) };
    let name = client.server_info().server_name;
    if name == only {
        return Ok(());
    }
    if name.is_empty() {
        // Not connected yet: no server has introduced itself.
        return Err(TransportError::unavailable("not connected to NATS yet"));
    }
    tracing::error!(expected = only, connected_to = %name, "connected to a nats-server marmot did not start; refusing to use it");
    Err(TransportError::unavailable(format!(
        "connected to nats-server {name:?}, not to {only:?}, the one marmot supervises: another server took its port; \
         nothing is published to or applied from it"
    )))
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::unavailable(format!("{what}: {e}"))
}

/// async-nats builds its TLS settings from rustls's process-wide crypto provider. rustls picks
/// one by itself only when exactly one is compiled in; a binary that also links opendal (whose
/// HTTP client enables aws-lc-rs next to async-nats's ring) has two, and the first TLS
/// connection would panic. Installing ring, the provider async-nats is built with, before any
/// connection avoids that; a provider the embedding program installed first is kept.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing the race to another thread installing one is fine: a provider is set.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

impl NatsTransport {
    /// Creates the client. It connects in the background and keeps reconnecting for as long
    /// as it takes; operations fail (and are retried by the node) until it is connected.
    pub async fn connect(cfg: NatsConfig) -> Result<Self, ConnectError> {
        ensure_crypto_provider();
        let urls = cfg.urls.join(",");
        let max = cfg.reconnect_wait_max;
        let connected = Arc::new(AtomicBool::new(false));
        let flag = connected.clone();
        let mut opts = match &cfg.auth.nkey_seed_file {
            Some(path) => {
                let seed = std::fs::read_to_string(path).map_err(|source| ConnectError::File {
                    path: path.clone(),
                    source,
                })?;
                async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
            }
            None => match &cfg.auth.creds_file {
                Some(path) => async_nats::ConnectOptions::with_credentials_file(path.clone())
                    .await
                    .map_err(|source| ConnectError::File {
                        path: path.clone(),
                        source,
                    })?,
                None => async_nats::ConnectOptions::new(),
            },
        };
        if let Some(t) = &cfg.auth.token {
            opts = opts.token(t.clone());
        }
        if let (Some(u), Some(p)) = (&cfg.auth.user, &cfg.auth.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        for f in [&cfg.auth.ca_file, &cfg.auth.cert_file, &cfg.auth.key_file]
            .into_iter()
            .flatten()
        {
            std::fs::metadata(f).map_err(|source| ConnectError::File {
                path: f.clone(),
                source,
            })?;
        }
        if let Some(ca) = &cfg.auth.ca_file {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&cfg.auth.cert_file, &cfg.auth.key_file) {
            opts = opts
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        let name = cfg.client_name.clone();
        let url_list = urls.clone();
        opts = opts
            .name(&cfg.client_name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(3))
            .request_timeout(Some(cfg.request_timeout))
            .reconnect_delay_callback(move |attempts| {
                (Duration::from_millis(100) * attempts.min(64) as u32).min(max)
            })
            .event_callback(move |event| {
                let flag = flag.clone();
                let name = name.clone();
                let urls = url_list.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            flag.store(true, Ordering::Relaxed);
                            tracing::info!(client = %name, %urls, "connected to NATS");
                        }
                        async_nats::Event::Disconnected => {
                            flag.store(false, Ordering::Relaxed);
                            tracing::warn!(client = %name, %urls, "disconnected from NATS; capturing locally and reconnecting");
                        }
                        other => tracing::info!(client = %name, event = %other, "NATS event"),
                    }
                }
            });
        let client = opts
            .connect(cfg.urls.clone())
            .await
            .map_err(|e| ConnectError::Client {
                urls: urls.clone(),
                message: e.to_string(),
            })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.request_timeout)
            .max_ack_inflight(4096)
            .build(client.clone());
        Ok(NatsTransport {
            cfg,
            client,
            js,
            kv: OnceCell::new(),
            members: OnceCell::new(),
            connected,
            format_gate: Default::default(),
        })
    }

    /// The snapshot store in bucket `bucket` (created if needed), on this connection.
    pub async fn object_store(
        &self,
        bucket: &str,
        replicas: usize,
    ) -> Result<NatsObjectStore, String> {
        self.check_server().map_err(|e| e.to_string())?;
        NatsObjectStore::open(&self.js, bucket, replicas).await
    }

    /// Whether the client is connected now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
            || self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Waits until the client is connected (the connection is made in the background, so a
    /// one-shot command that asks at once finds it "not connected yet"), at most `within`.
    pub async fn wait_connected(&self, within: Duration) -> Result<(), TransportError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.is_connected() && !self.client.server_info().server_name.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TransportError::unavailable(format!(
                    "could not connect to NATS at {} within {within:?}",
                    self.cfg.urls.join(",")
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Refuses to go on when connected to another server than [`NatsConfig::only_server`].
    fn check_server(&self) -> Result<(), TransportError> {
        check_server(&self.client, self.cfg.only_server.as_deref())
    }

    /// The configuration.
    pub fn config(&self) -> &NatsConfig {
        &self.cfg
    }

    /// Flushes and closes the connection.
    pub async fn close(&self) {
        let _ = self.client.flush().await;
    }

    async fn bounds(&self) -> Result<StreamBounds, TransportError> {
        let mut s = self
            .js
            .get_stream(self.cfg.stream_name())
            .await
            .map_err(|e| unavailable("reading the stream", e))?;
        let info = s
            .info()
            .await
            .map_err(|e| unavailable("reading the stream", e))?;
        Ok(bounds_of(&info.state))
    }

    /// The bucket of members: what each node last advertised, kept [`MEMBER_TTL`] after
    /// it went silent.
    async fn members(&self) -> Result<&kv::Store, TransportError> {
        let bucket = format!("{}-v1-members", self.cfg.stream_prefix);
        self.bucket(
            &self.members,
            bucket,
            MEMBER_TTL,
            "creating the members bucket",
        )
        .await
    }

    async fn kv(&self) -> Result<&kv::Store, TransportError> {
        // Every use of the node-id bucket (claims, renewals, what nodes advertise) is checked.
        self.bucket(
            &self.kv,
            self.cfg.bucket(),
            self.cfg.claim_ttl,
            "creating the node-id bucket",
        )
        .await
    }

    /// A key-value bucket whose entries expire after `max_age`, created when missing, on
    /// this server only.
    async fn bucket<'a>(
        &self,
        cell: &'a OnceCell<kv::Store>,
        bucket: String,
        max_age: Duration,
        what: &'static str,
    ) -> Result<&'a kv::Store, TransportError> {
        self.check_server()?;
        cell.get_or_try_init(|| async {
            match self.js.get_key_value(&bucket).await {
                Ok(s) => Ok(s),
                Err(_) => self
                    .js
                    .create_key_value(kv::Config {
                        bucket,
                        history: 1,
                        max_age,
                        num_replicas: self.cfg.replicas.max(1),
                        storage: stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| unavailable(what, e)),
            }
        })
        .await
    }
}

fn bounds_of(state: &stream::State) -> StreamBounds {
    if state.messages == 0 {
        StreamBounds {
            first_seq: state.last_sequence + 1,
            last_seq: state.last_sequence,
        }
    } else {
        StreamBounds {
            first_seq: state.first_sequence,
            last_seq: state.last_sequence,
        }
    }
}

fn millis(t: time::OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

#[async_trait::async_trait]
impl Transport for NatsTransport {
    async fn prepare(&self) -> Result<StreamBounds, TransportError> {
        self.check_server()?;
        let want = self.cfg.stream_config();
        let mut s = self
            .js
            .get_or_create_stream(want.clone())
            .await
            .map_err(|e| unavailable(&format!("creating stream {}", want.name), e))?;
        let info = s
            .info()
            .await
            .map_err(|e| unavailable("reading the stream", e))?
            .clone();
        let have = &info.config;
        let differs = have.max_messages != want.max_messages
            || have.max_bytes != want.max_bytes
            || have.max_age != want.max_age
            || have.num_replicas != want.num_replicas
            || have.duplicate_window != want.duplicate_window;
        if differs {
            if self.cfg.update_existing {
                self.js
                    .update_stream(want.clone())
                    .await
                    .map_err(|e| unavailable("updating the stream's limits", e))?;
                tracing::info!(stream = %want.name, "updated the stream's limits to the configured ones");
            } else {
                tracing::warn!(
                    stream = %want.name,
                    have = ?(have.max_messages, have.max_bytes, have.max_age, have.num_replicas),
                    configured = ?(want.max_messages, want.max_bytes, want.max_age, want.num_replicas),
                    "the existing stream's limits differ from the configuration; set replication_log.update_existing = true to change them"
                );
            }
        }
        self.kv().await?;
        let max_payload = self.client.server_info().max_payload;
        if max_payload > 0 && max_payload < MIN_MAX_PAYLOAD {
            tracing::error!(
                max_payload,
                needed = MIN_MAX_PAYLOAD,
                "the NATS server's max_payload is smaller than marmot's largest messages (512 KiB of batch plus headers): \
                 batches that large cannot be published until it is raised (max_payload: 1MB in the server config)"
            );
        }
        Ok(bounds_of(&info.state))
    }

    async fn publish(&self, message_id: String, payload: Bytes) -> Result<u64, TransportError> {
        self.check_format(payload.first().copied().unwrap_or(0))
            .await?;
        let ack = self
            .js
            .send_publish(
                self.cfg.subject(),
                PublishMessage::build()
                    .payload(payload)
                    .message_id(message_id),
            )
            .await
            .map_err(publish_error)?;
        let ack = ack.await.map_err(publish_error)?;
        // An acknowledgement from a server that is not ours does not count as published.
        self.check_server()?;
        Ok(ack.sequence)
    }

    async fn subscribe(&self, from_seq: u64) -> Result<(StreamBounds, Deliveries), TransportError> {
        self.check_server()?;
        let bounds = self.bounds().await?;
        let stream = self
            .js
            .get_stream(self.cfg.stream_name())
            .await
            .map_err(|e| unavailable("reading the stream", e))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from_seq.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("creating a consumer", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("reading messages", e))?;
        let client = self.client.clone();
        let only = self.cfg.only_server.clone();
        let deliveries = messages.map(move |m| {
            let m = m.map_err(|e| unavailable("reading messages", e))?;
            check_server(&client, only.as_deref())?;
            let info = m
                .info()
                .map_err(|e| TransportError::other(format!("message without stream info: {e}")))?;
            Ok(Delivery {
                stream_seq: info.stream_sequence,
                published_ms: millis(info.published),
                pending: info.pending,
                payload: m.payload.clone(),
            })
        });
        Ok((bounds, deliveries.boxed()))
    }

    async fn lease(&self, key: &str, owner: &str) -> Result<Claim, TransportError> {
        self.check_server()?;
        let kv = self.kv().await?;
        let current = kv
            .entry(key)
            .await
            .map_err(|e| unavailable("reading a lease", e))?;
        let value = Bytes::copy_from_slice(owner.as_bytes());
        let revision = match current {
            Some(e) if e.operation == kv::Operation::Put && e.value != value => {
                return Ok(Claim::Held {
                    by: String::from_utf8_lossy(&e.value).into_owned(),
                });
            }
            Some(e) => kv
                .update(key, value, e.revision)
                .await
                .map_err(|e| unavailable("renewing a lease", e))?,
            None => kv
                .create(key, value)
                .await
                .map_err(|e| unavailable("taking a lease", e))?,
        };
        // The server's timestamp of our own write, read from the stream leader (a direct get
        // may be served by a replica that has not caught up yet).
        let stream = self
            .js
            .get_stream(&kv.stream_name)
            .await
            .map_err(|e| unavailable("reading the lease bucket", e))?;
        let written = stream
            .get_raw_message(revision)
            .await
            .map_err(|e| unavailable("reading a lease", e))?;
        Ok(Claim::Granted {
            server_ms: millis(written.time),
            revision,
        })
    }

    async fn renew_lease(
        &self,
        key: &str,
        owner: &str,
        revision: u64,
    ) -> Result<Option<u64>, TransportError> {
        let kv = self.kv().await?;
        // A compare-and-set update: it fails when the key's last revision is another one
        // (someone else took the lease, or it expired and the bucket dropped it).
        match kv
            .update(key, Bytes::copy_from_slice(owner.as_bytes()), revision)
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(unavailable("renewing a lease", e)),
        }
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), TransportError> {
        let kv = self.kv().await?;
        if let Some(e) = kv
            .entry(key)
            .await
            .map_err(|e| unavailable("reading a lease", e))?
            && e.operation == kv::Operation::Put
            && e.value == owner.as_bytes()
        {
            kv.delete_expect_revision(key, Some(e.revision))
                .await
                .map_err(|e| unavailable("releasing a lease", e))?;
        }
        Ok(())
    }
}

fn publish_error(e: async_nats::jetstream::context::PublishError) -> TransportError {
    use async_nats::jetstream::context::PublishErrorKind as K;
    let kind = match e.kind() {
        K::MaxPayloadExceeded => TransportErrorKind::TooLarge,
        K::TimedOut | K::BrokenPipe | K::StreamNotFound | K::MaxAckPending => {
            TransportErrorKind::Unavailable
        }
        _ => TransportErrorKind::Other,
    };
    TransportError {
        kind,
        message: format!("publish: {e}"),
    }
}
