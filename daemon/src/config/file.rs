//! The configuration file as written: every section and key, all optional, unknown keys
//! refused. [`super::Settings`] checks it and applies the defaults.

use serde::Deserialize;
use std::path::PathBuf;

/// The whole configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The SQLite database to replicate.
    pub db_path: Option<PathBuf>,
    /// This node's id (unique in the cluster, not 0). Default: derived from the machine id
    /// and the database path.
    pub node_id: Option<u64>,
    /// Capture and publish local writes.
    pub publish: Option<bool>,
    /// Apply other nodes' writes.
    pub replicate: Option<bool>,
    /// Go Marmot's sequence file: ignored (positions live in the database).
    pub seq_map_path: Option<String>,
    /// Go Marmot's scan limit: ignored (marmot captures whole transactions).
    pub scan_max_changes: Option<i64>,
    /// Go Marmot's change-log cleanup interval: ignored (published changes leave the outbox
    /// when acknowledged).
    pub cleanup_interval: Option<i64>,
    /// Exit (status 0) after this many milliseconds without local or remote changes (0: never).
    pub sleep_timeout: Option<u64>,
    /// Look for local changes at least every this many milliseconds (0: default 1000).
    pub polling_interval: Option<u64>,
    /// Largest tolerated lead of this node's clock over the NATS server's, in milliseconds.
    pub max_clock_skew_ms: Option<u64>,
    /// How long marmot waits for the database write lock, in milliseconds.
    pub busy_timeout_ms: Option<u64>,
    /// Conflict records to keep.
    pub keep_conflicts: Option<u64>,
    /// Schema changes.
    pub schema: Option<SchemaSection>,
    /// Which tables replicate.
    pub tables: Option<TablesSection>,
    /// Snapshots (Go Marmot's section).
    pub snapshot: Option<SnapshotSection>,
    /// The replication stream.
    pub replication_log: Option<ReplicationLogSection>,
    /// NATS connection, or the supervised server.
    pub nats: Option<NatsSection>,
    /// How the supervised nats-servers of several nodes authenticate each other.
    pub cluster: Option<ClusterSection>,
    /// Logging.
    pub logging: Option<LoggingSection>,
    /// Metrics and health endpoint.
    pub prometheus: Option<PrometheusSection>,
}

/// `[schema]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaSection {
    /// Replicate schema changes (DDL and `PRAGMA user_version`) with the rows.
    pub replicate: Option<bool>,
    /// Warn when a live, ready node's replicated schema has differed from this node's for
    /// this many milliseconds (0: never).
    pub mismatch_warn_after_ms: Option<u64>,
}

/// `[tables]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TablesSection {
    /// GLOB patterns of the tables that replicate (absent or empty: all).
    pub include: Option<Vec<String>>,
    /// GLOB patterns of the tables that do not (exclude wins).
    pub exclude: Option<Vec<String>>,
}

/// `[snapshot]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSection {
    /// Take snapshots (and restore from them).
    pub enabled: Option<bool>,
    /// Take one at least this often, ms (0: not by time).
    pub interval: Option<u64>,
    /// Store kind: nats, s3, webdav or sftp.
    pub store: Option<String>,
    /// Take one after this many rows captured and applied on this node (0: not by count).
    pub every_changes: Option<u64>,
    /// Snapshot generations kept in the store.
    pub keep: Option<usize>,
    /// Tombstones older than this many hours are removed when a snapshot is taken (0: keep).
    pub tombstone_ttl_hours: Option<u64>,
    /// A new node with an empty database starts from the newest snapshot.
    pub restore_empty: Option<bool>,
    /// `[snapshot.nats]`.
    pub nats: Option<SnapshotNats>,
    /// `[snapshot.s3]`.
    pub s3: Option<SnapshotS3>,
    /// `[snapshot.webdav]`.
    pub webdav: Option<SnapshotUrl>,
    /// `[snapshot.sftp]`.
    pub sftp: Option<SnapshotUrl>,
}

/// `[snapshot.nats]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotNats {
    /// Replicas.
    pub replicas: Option<u64>,
    /// Bucket.
    pub bucket: Option<String>,
}

/// `[snapshot.s3]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotS3 {
    /// Path.
    pub path: Option<String>,
    /// Endpoint.
    pub endpoint: Option<String>,
    /// Access key.
    pub access_key: Option<String>,
    /// Secret.
    pub secret: Option<String>,
    /// Session token.
    pub session_token: Option<String>,
    /// Bucket.
    pub bucket: Option<String>,
    /// TLS.
    pub use_ssl: Option<bool>,
    /// Region (default us-east-1).
    pub region: Option<String>,
}

/// `[snapshot.webdav]` / `[snapshot.sftp]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotUrl {
    /// URL.
    pub url: Option<String>,
    /// SFTP: the private key to authenticate with (default: ssh-agent / ~/.ssh).
    pub key_file: Option<PathBuf>,
    /// SFTP: accept any host key instead of checking known_hosts.
    pub insecure_accept_any_host_key: Option<bool>,
}

/// `[replication_log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationLogSection {
    /// Must be 1: more shards would split a transaction across streams.
    pub shards: Option<u64>,
    /// Most messages the stream keeps.
    pub max_entries: Option<i64>,
    /// Most bytes the stream keeps.
    pub max_bytes: Option<i64>,
    /// Oldest message the stream keeps, seconds (0: no age limit).
    pub max_age_seconds: Option<u64>,
    /// Stream replicas.
    pub replicas: Option<u64>,
    /// Compress messages (zstd).
    pub compress: Option<bool>,
    /// Change an existing stream's limits to the configured ones.
    pub update_existing: Option<bool>,
}

/// `[nats]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSection {
    /// Servers to connect to; empty: start and supervise a local nats-server.
    pub urls: Option<Vec<String>>,
    /// Subject prefix.
    pub subject_prefix: Option<String>,
    /// Stream name prefix.
    pub stream_prefix: Option<String>,
    /// Extra nats-server config file for the supervised server.
    pub server_config: Option<PathBuf>,
    /// NKey seed file.
    pub seed_file: Option<PathBuf>,
    /// Credentials file (`.creds`: a user JWT and its NKey seed).
    pub creds_file: Option<PathBuf>,
    /// Authentication token.
    pub token: Option<String>,
    /// User name.
    pub user_name: Option<String>,
    /// Password.
    pub user_password: Option<String>,
    /// CA certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate.
    pub cert_file: Option<PathBuf>,
    /// Client key.
    pub key_file: Option<PathBuf>,
    /// Client listen address of the supervised server (`host:port`, port -1: any free port).
    pub bind_address: Option<String>,
    /// Go Marmot's connection attempts: ignored (marmot retries for as long as it takes).
    pub connect_retries: Option<i64>,
    /// Longest wait between reconnect attempts, seconds.
    pub reconnect_wait_seconds: Option<u64>,
    /// The nats-server binary for the supervised server (default: `nats-server` on PATH).
    pub server_binary: Option<PathBuf>,
}

/// `[cluster]`: security of the routes between the supervised nats-servers
/// (`--cluster-addr`, `--cluster-peers`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// The secret every node of the cluster shares; routes authenticate with it (default:
    /// the environment variable `MARMOT_CLUSTER_SECRET`).
    pub secret: Option<String>,
    /// A file holding the secret (instead of `secret`).
    pub secret_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the other nodes' route certificates: TLS on routes.
    pub tls_ca_file: Option<PathBuf>,
    /// This node's route certificate (PEM).
    pub tls_cert_file: Option<PathBuf>,
    /// Its key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// Accept a cluster address that is not loopback without route authentication (a
    /// warning at every start).
    pub insecure: Option<bool>,
}

/// `[logging]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// Debug logs.
    pub verbose: Option<bool>,
    /// `console` or `json`.
    pub format: Option<String>,
}

/// `[prometheus]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusSection {
    /// Serve `/metrics`, `/health` and `/ready`.
    pub enable: Option<bool>,
    /// Listen address (Go's `:3010` means all interfaces).
    pub bind: Option<String>,
    /// Metric name prefix.
    pub namespace: Option<String>,
    /// Second prefix.
    pub subsystem: Option<String>,
}
