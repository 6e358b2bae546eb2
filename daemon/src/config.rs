//! The TOML configuration, compatible with Go Marmot's keys.
//!
//! Every Go Marmot key is honoured, ignored with a warning, or rejected with the reason
//! (see [`GO_KEYS`], also listed in the README). An unknown key is an error naming it; a
//! missing file is an error naming the path.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (names the key and line).
        message: String,
    },
    /// A key has a value marmot refuses.
    #[error("config file {path}: {key} = {value}: {reason}")]
    Rejected {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// Why.
        reason: &'static str,
    },
}

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
    /// Snapshots (Go Marmot's section).
    pub snapshot: Option<SnapshotSection>,
    /// The replication stream.
    pub replication_log: Option<ReplicationLogSection>,
    /// NATS connection, or the supervised server.
    pub nats: Option<NatsSection>,
    /// Logging.
    pub logging: Option<LoggingSection>,
    /// Metrics and health endpoint.
    pub prometheus: Option<PrometheusSection>,
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

/// Where snapshots are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotStoreKind {
    /// A JetStream object store bucket.
    Nats {
        /// Bucket.
        bucket: String,
        /// Replicas.
        replicas: usize,
    },
    /// An S3-compatible service.
    S3 {
        /// Endpoint URL (None: AWS).
        endpoint: Option<String>,
        /// Bucket.
        bucket: String,
        /// Key prefix.
        root: String,
        /// Region.
        region: String,
        /// Access key (None: from the environment).
        access_key: Option<String>,
        /// Secret (None: from the environment).
        secret: Option<String>,
        /// Session token.
        session_token: Option<String>,
    },
    /// A WebDAV server.
    WebDav {
        /// Base URL.
        endpoint: String,
        /// Directory.
        root: String,
        /// User.
        user: Option<String>,
        /// Password.
        password: Option<String>,
    },
    /// An SFTP server.
    Sftp {
        /// `ssh://host:port`.
        endpoint: String,
        /// User.
        user: String,
        /// Directory.
        root: String,
        /// Private key.
        key: Option<PathBuf>,
        /// Skip the known_hosts check.
        accept_any_host_key: bool,
    },
}

/// Snapshot settings with defaults applied.
#[derive(Clone, Debug)]
pub struct SnapshotSettings {
    /// Snapshots on.
    pub enabled: bool,
    /// Where.
    pub store: SnapshotStoreKind,
    /// Every so many changes (0: not by count).
    pub every_changes: u64,
    /// At least this often.
    pub interval: Option<Duration>,
    /// Generations kept.
    pub keep: usize,
    /// Tombstone horizon.
    pub tombstone_ttl: Duration,
    /// New nodes start from a snapshot.
    pub restore_empty: bool,
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

/// How each Go Marmot key is treated: (key, treatment). The README lists the same (a test
/// checks it).
#[cfg_attr(not(test), allow(dead_code))]
pub const GO_KEYS: &[(&str, &str)] = &[
    ("db_path", "honoured"),
    (
        "node_id",
        "honoured (default: derived from /etc/machine-id and the database path)",
    ),
    ("publish", "honoured"),
    ("replicate", "honoured"),
    (
        "seq_map_path",
        "ignored with a warning: positions live in the database, in the same transaction as the rows",
    ),
    (
        "scan_max_changes",
        "ignored with a warning: marmot captures whole transactions, never part of one",
    ),
    (
        "cleanup_interval",
        "ignored with a warning: published changes leave the outbox when acknowledged",
    ),
    ("sleep_timeout", "honoured"),
    (
        "polling_interval",
        "honoured (0 keeps the 1 s fallback; the file watch is the main wake-up)",
    ),
    ("snapshot.enabled", "honoured (default true)"),
    (
        "snapshot.interval",
        "honoured (ms; 0: snapshots by change count only)",
    ),
    ("snapshot.store", "honoured: nats, s3, webdav or sftp"),
    ("snapshot.nats.replicas", "honoured"),
    (
        "snapshot.nats.bucket",
        "honoured (default marmot-snapshots)",
    ),
    ("snapshot.s3.path", "honoured (key prefix)"),
    ("snapshot.s3.endpoint", "honoured"),
    ("snapshot.s3.access_key", "honoured (or AWS_ACCESS_KEY_ID)"),
    ("snapshot.s3.secret", "honoured (or AWS_SECRET_ACCESS_KEY)"),
    (
        "snapshot.s3.session_token",
        "honoured (or AWS_SESSION_TOKEN)",
    ),
    ("snapshot.s3.bucket", "honoured"),
    ("snapshot.s3.use_ssl", "honoured"),
    (
        "snapshot.webdav.url",
        "honoured (https://host/path?dir=/snapshots&login=u&secret=p)",
    ),
    (
        "snapshot.sftp.url",
        "honoured without a password (sftp://user@host:port/path; keys or ssh-agent authenticate)",
    ),
    (
        "replication_log.shards",
        "1 honoured; more is rejected: shards would split a transaction across streams",
    ),
    (
        "replication_log.max_entries",
        "honoured (stream message limit)",
    ),
    ("replication_log.replicas", "honoured"),
    ("replication_log.compress", "honoured (zstd)"),
    ("replication_log.update_existing", "honoured"),
    (
        "nats.urls",
        "honoured; empty starts and supervises a local nats-server",
    ),
    ("nats.subject_prefix", "honoured (marmot appends -v1)"),
    ("nats.stream_prefix", "honoured (marmot appends -v1)"),
    ("nats.server_config", "honoured for the supervised server"),
    ("nats.seed_file", "honoured"),
    ("nats.user_name", "honoured"),
    ("nats.user_password", "honoured"),
    ("nats.ca_file", "honoured"),
    ("nats.cert_file", "honoured"),
    ("nats.key_file", "honoured"),
    ("nats.bind_address", "honoured for the supervised server"),
    (
        "nats.connect_retries",
        "ignored with a warning: marmot reconnects for as long as it takes",
    ),
    (
        "nats.reconnect_wait_seconds",
        "honoured (longest wait between reconnects)",
    ),
    ("logging.verbose", "honoured"),
    ("logging.format", "honoured (console or json)"),
    (
        "prometheus.enable",
        "honoured (also serves /health and /ready)",
    ),
    ("prometheus.bind", "honoured"),
    ("prometheus.namespace", "honoured"),
    ("prometheus.subsystem", "honoured"),
];

/// Log output format.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Console,
    /// One JSON object per line.
    Json,
}

/// The configuration with defaults applied and checked.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Database.
    pub db_path: PathBuf,
    /// Node id.
    pub node_id: u64,
    /// Publish local writes.
    pub publish: bool,
    /// Apply remote writes.
    pub replicate: bool,
    /// Idle exit (None: never).
    pub sleep_timeout: Option<Duration>,
    /// Fallback poll interval.
    pub poll_interval: Duration,
    /// Clock skew bound, ms.
    pub max_clock_skew_ms: u64,
    /// Busy timeout.
    pub busy_timeout: Duration,
    /// Conflict records kept.
    pub keep_conflicts: u64,
    /// Stream message limit (0: none).
    pub max_entries: i64,
    /// Stream byte limit (0: none).
    pub max_bytes: i64,
    /// Stream age limit (zero: none).
    pub max_age: Duration,
    /// Stream replicas.
    pub replicas: usize,
    /// Compress messages.
    pub compress: bool,
    /// Update existing stream limits.
    pub update_existing: bool,
    /// NATS servers (empty: supervised).
    pub urls: Vec<String>,
    /// Subject prefix.
    pub subject_prefix: String,
    /// Stream prefix.
    pub stream_prefix: String,
    /// Supervised server extra config.
    pub server_config: Option<PathBuf>,
    /// Supervised server binary.
    pub server_binary: Option<PathBuf>,
    /// Supervised server client address.
    pub bind_address: String,
    /// Credentials and TLS.
    pub auth: marmot_nats::Auth,
    /// Longest reconnect wait.
    pub reconnect_wait: Duration,
    /// Debug logs.
    pub verbose: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Metrics/health listen address, if enabled.
    pub metrics_bind: Option<String>,
    /// Metric prefix (namespace and subsystem joined).
    pub metrics_prefix: String,
    /// Snapshots.
    pub snapshot: SnapshotSettings,
    /// Warnings about ignored keys, to log once logging is up.
    pub warnings: Vec<String>,
}

impl Settings {
    /// How many messages the stream surely keeps under its message and byte limits
    /// (messages carry at most 512 KiB of batch plus a header), or None when unlimited.
    pub fn stream_message_capacity(&self) -> Option<u64> {
        const LARGEST_MESSAGE: u64 = 516 * 1024;
        let by_count = (self.max_entries > 0).then_some(self.max_entries as u64);
        let by_bytes = (self.max_bytes > 0).then_some(self.max_bytes as u64 / LARGEST_MESSAGE);
        match (by_count, by_bytes) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Reads and checks a config file. Relative paths in it are relative to the current
    /// directory, as in Go Marmot.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Checks a config text (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        let reject = |key, value: String, reason| ConfigError::Rejected {
            path: path.to_path_buf(),
            key,
            value,
            reason,
        };
        let mut warnings = Vec::new();
        let mut ignored =
            |key: &str, why: &str| warnings.push(format!("config key {key} is ignored: {why}"));
        if c.seq_map_path.is_some() {
            ignored(
                "seq_map_path",
                "positions live in the database, in the same transaction as the rows",
            );
        }
        if c.scan_max_changes.is_some() {
            ignored(
                "scan_max_changes",
                "marmot captures whole transactions, never part of one",
            );
        }
        if c.cleanup_interval.is_some() {
            ignored(
                "cleanup_interval",
                "published changes leave the outbox when acknowledged",
            );
        }

        let rl = c.replication_log.unwrap_or_default();
        if let Some(s) = rl.shards
            && s != 1
        {
            return Err(reject(
                "replication_log.shards",
                s.to_string(),
                "marmot uses one stream: shards would split an application transaction across streams and lose its atomicity; remove the key or set it to 1",
            ));
        }
        let nats = c.nats.unwrap_or_default();
        if nats.connect_retries.is_some() {
            ignored(
                "nats.connect_retries",
                "marmot reconnects for as long as it takes",
            );
        }
        let node_id = match c.node_id {
            Some(0) => {
                return Err(reject("node_id", "0".into(), "node ids start at 1"));
            }
            Some(n) => n,
            None => default_node_id(c.db_path.as_deref()),
        };
        let db_path = c.db_path.unwrap_or_else(|| PathBuf::from("tmp/marmot.db"));
        let logging = c.logging.unwrap_or_default();
        let log_format = match logging.format.as_deref() {
            None | Some("console") => LogFormat::Console,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(reject(
                    "logging.format",
                    format!("{other:?}"),
                    "use \"console\" or \"json\"",
                ));
            }
        };
        let prom = c.prometheus.unwrap_or_default();
        let metrics_bind = prom.enable.unwrap_or(false).then(|| {
            let b = prom.bind.clone().unwrap_or_else(|| ":3010".into());
            if b.starts_with(':') {
                format!("0.0.0.0{b}")
            } else {
                b
            }
        });
        let metrics_prefix = [
            prom.namespace.unwrap_or_else(|| "marmot".into()),
            prom.subsystem.unwrap_or_default(),
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("_");
        let replicas = rl.replicas.unwrap_or(1);
        if replicas == 0 || replicas > 5 {
            return Err(reject(
                "replication_log.replicas",
                replicas.to_string(),
                "JetStream streams have 1 to 5 replicas",
            ));
        }
        let max_entries = rl.max_entries.unwrap_or(1_000_000);
        let snapshot = snapshot_settings(
            path,
            c.snapshot.unwrap_or_default(),
            replicas as usize,
            max_entries,
        )?;
        let max_age = Duration::from_secs(rl.max_age_seconds.unwrap_or(0));
        warnings.extend(retention_warnings(&snapshot, max_entries, max_age));
        let urls: Vec<String> = nats
            .urls
            .unwrap_or_default()
            .into_iter()
            .flat_map(|u| {
                u.split(',')
                    .map(|s| s.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .filter(|u| !u.is_empty())
            .collect();
        Ok(Settings {
            db_path,
            node_id,
            publish: c.publish.unwrap_or(true),
            replicate: c.replicate.unwrap_or(true),
            sleep_timeout: c
                .sleep_timeout
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis),
            poll_interval: Duration::from_millis(
                c.polling_interval.filter(|&ms| ms > 0).unwrap_or(1000),
            ),
            max_clock_skew_ms: c.max_clock_skew_ms.unwrap_or(5_000),
            busy_timeout: Duration::from_millis(c.busy_timeout_ms.unwrap_or(5_000)),
            keep_conflicts: c.keep_conflicts.unwrap_or(10_000),
            max_entries,
            max_bytes: rl.max_bytes.unwrap_or(1 << 30),
            max_age,
            replicas: replicas as usize,
            compress: rl.compress.unwrap_or(true),
            update_existing: rl.update_existing.unwrap_or(false),
            urls,
            subject_prefix: nats
                .subject_prefix
                .unwrap_or_else(|| "marmot-change-log".into()),
            stream_prefix: nats
                .stream_prefix
                .unwrap_or_else(|| "marmot-changes".into()),
            server_config: nats.server_config,
            server_binary: nats.server_binary,
            bind_address: nats.bind_address.unwrap_or_else(|| ":-1".into()),
            auth: marmot_nats::Auth {
                user: nats.user_name,
                password: nats.user_password,
                nkey_seed_file: nats.seed_file,
                ca_file: nats.ca_file,
                cert_file: nats.cert_file,
                key_file: nats.key_file,
            },
            reconnect_wait: Duration::from_secs(nats.reconnect_wait_seconds.unwrap_or(2).max(1)),
            snapshot,
            verbose: logging.verbose.unwrap_or(false),
            log_format,
            metrics_bind,
            metrics_prefix,
            warnings,
        })
    }
}

/// Every node can always catch up only if some snapshot always covers what the stream has
/// dropped: snapshots must come more often than the stream forgets messages.
fn retention_warnings(s: &SnapshotSettings, max_entries: i64, max_age: Duration) -> Vec<String> {
    let mut w = Vec::new();
    let limited = max_entries > 0 || !max_age.is_zero();
    if !s.enabled {
        if limited {
            w.push(
                "snapshots are off while the stream drops old messages: a node down longer than the stream keeps \
                 messages stops applying and must be restored by hand (copy another node's database)"
                    .into(),
            );
        }
        return w;
    }
    if s.every_changes == 0 && s.interval.is_none() {
        w.push("snapshot.every_changes and snapshot.interval are both 0: no snapshot is ever taken automatically".into());
    }
    if max_entries > 0 && s.interval.is_none() && s.every_changes > max_entries as u64 {
        w.push(format!(
            "snapshots come every {} changes but the stream keeps {} messages (each carries one change or more): \
             messages can be dropped before a snapshot covers them; make snapshot.every_changes at most \
             replication_log.max_entries, or set snapshot.interval",
            s.every_changes, max_entries
        ));
    }
    if !max_age.is_zero()
        && let Some(i) = s.interval
        && i >= max_age
    {
        w.push(format!(
            "snapshot.interval ({i:?}) is not shorter than replication_log.max_age_seconds ({max_age:?}): \
             messages can expire before a snapshot covers them"
        ));
    }
    w
}

fn snapshot_settings(
    path: &Path,
    s: SnapshotSection,
    stream_replicas: usize,
    max_entries: i64,
) -> Result<SnapshotSettings, ConfigError> {
    let reject = |key, value: String, reason| ConfigError::Rejected {
        path: path.to_path_buf(),
        key,
        value,
        reason,
    };
    // A store's required url, parsed.
    let store_url = |key: &'static str,
                     raw: Option<String>,
                     missing: &'static str,
                     malformed: &'static str|
     -> Result<url::Url, ConfigError> {
        let raw = raw.ok_or_else(|| reject(key, "missing".into(), missing))?;
        url::Url::parse(&raw).map_err(|_| reject(key, raw.clone(), malformed))
    };
    // 100 years: far beyond any outage, and far from overflowing the milliseconds stamps and
    // horizons are counted in (a larger value used to panic in debug builds and wrap around
    // in release builds).
    const MAX_TOMBSTONE_TTL_HOURS: u64 = 100 * 365 * 24;
    if let Some(h) = s.tombstone_ttl_hours
        && h > MAX_TOMBSTONE_TTL_HOURS
    {
        return Err(reject(
            "snapshot.tombstone_ttl_hours",
            h.to_string(),
            "at most 876000 hours (100 years); 0 keeps tombstones forever",
        ));
    }
    let store = match s.store.as_deref().unwrap_or("nats") {
        "nats" => {
            let n = s.nats.unwrap_or_default();
            SnapshotStoreKind::Nats {
                bucket: n.bucket.unwrap_or_else(|| "marmot-snapshots".into()),
                replicas: n.replicas.map_or(stream_replicas, |r| r as usize),
            }
        }
        "s3" => {
            let c = s.s3.unwrap_or_default();
            let Some(bucket) = c.bucket else {
                return Err(reject(
                    "snapshot.s3.bucket",
                    "missing".into(),
                    "an S3 snapshot store needs a bucket",
                ));
            };
            let endpoint = c.endpoint.map(|e| {
                if e.contains("://") {
                    e
                } else if c.use_ssl.unwrap_or(true) {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            });
            SnapshotStoreKind::S3 {
                endpoint,
                bucket,
                root: c.path.unwrap_or_else(|| "/".into()),
                region: c.region.unwrap_or_else(|| "us-east-1".into()),
                access_key: c.access_key,
                secret: c.secret,
                session_token: c.session_token,
            }
        }
        "webdav" => {
            let c = s.webdav.unwrap_or_default();
            let u = store_url(
                "snapshot.webdav.url",
                c.url,
                "a WebDAV snapshot store needs a url",
                "not a URL (https://host/path?dir=/snapshots&login=user&secret=password)",
            )?;
            let q = |k: &str| {
                u.query_pairs()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.into_owned())
            };
            let mut base = u.clone();
            base.set_query(None);
            SnapshotStoreKind::WebDav {
                endpoint: base.to_string().trim_end_matches('/').to_string(),
                root: q("dir").unwrap_or_else(|| "/".into()),
                user: q("login"),
                password: q("secret"),
            }
        }
        "sftp" => {
            let c = s.sftp.unwrap_or_default();
            let u = store_url(
                "snapshot.sftp.url",
                c.url,
                "an SFTP snapshot store needs a url",
                "not a URL (sftp://user@host:port/path)",
            )?;
            if u.password().is_some() {
                return Err(reject(
                    "snapshot.sftp.url",
                    "sftp://user:***@...".into(),
                    "SFTP with a password is not supported: authenticate with a key (snapshot.sftp.key_file) or ssh-agent",
                ));
            }
            let host = u.host_str().unwrap_or("localhost").to_string();
            SnapshotStoreKind::Sftp {
                endpoint: format!("ssh://{host}:{}", u.port().unwrap_or(22)),
                user: if u.username().is_empty() {
                    "root".into()
                } else {
                    u.username().to_string()
                },
                root: if u.path().is_empty() {
                    "/".into()
                } else {
                    u.path().to_string()
                },
                key: c.key_file,
                accept_any_host_key: c.insecure_accept_any_host_key.unwrap_or(false),
            }
        }
        other => {
            return Err(reject(
                "snapshot.store",
                format!("{other:?}"),
                "use \"nats\", \"s3\", \"webdav\" or \"sftp\"",
            ));
        }
    };
    Ok(SnapshotSettings {
        enabled: s.enabled.unwrap_or(true),
        store,
        // Unless told otherwise, snapshot well before the stream forgets messages.
        every_changes: s.every_changes.unwrap_or(if max_entries > 0 {
            (max_entries as u64 / 2).clamp(1, 100_000)
        } else {
            100_000
        }),
        interval: s.interval.filter(|&ms| ms > 0).map(Duration::from_millis),
        keep: s.keep.unwrap_or(2).max(1),
        tombstone_ttl: Duration::from_secs(s.tombstone_ttl_hours.unwrap_or(24 * 7) * 3600),
        restore_empty: s.restore_empty.unwrap_or(true),
    })
}

/// Go Marmot derived the node id from the machine id; marmot mixes in the database path so
/// two databases on one machine get different ids.
fn default_node_id(db: Option<&Path>) -> u64 {
    let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let path = db
        .and_then(|p| {
            std::fs::canonicalize(p)
                .ok()
                .or_else(|| Some(p.to_path_buf()))
        })
        .unwrap_or_default();
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in machine.trim().bytes().chain(path.to_string_lossy().bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (h >> 1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::parse(Path::new("node.toml"), text)
    }

    #[test]
    fn the_stream_capacity_counts_messages_at_their_largest() {
        let base = "db_path = \"/tmp/x.db\"\nnode_id = 1\n";
        let s = parse(base).unwrap();
        // Defaults: 1,000,000 messages but 1 GiB, which holds 2,032 messages of 516 KiB.
        assert_eq!(s.stream_message_capacity(), Some(2032));
        let s = parse(&format!(
            "{base}[replication_log]\nmax_entries = 0\nmax_bytes = 0\n"
        ))
        .unwrap();
        assert_eq!(s.stream_message_capacity(), None, "unlimited");
    }

    #[test]
    fn a_go_marmot_config_loads_with_warnings_for_ignored_keys() {
        let s = parse(
            r#"
            seq_map_path = "/tmp/seq-map.cbor"
            db_path = "/tmp/marmot-1.db"
            node_id = 1
            scan_max_changes = 512
            cleanup_interval = 5000
            [replication_log]
            shards = 1
            max_entries = 1024
            replicas = 1
            compress = true
            [snapshot]
            enabled = true
            store = "nats"
            [snapshot.nats]
            replicas = 1
            [nats]
            urls = ["nats://localhost:4222, nats://localhost:4223"]
            connect_retries = 5
            [logging]
            verbose = true
            format = "json"
            [prometheus]
            enable = true
            bind = ":3010"
            "#,
        )
        .unwrap();
        assert_eq!(s.node_id, 1);
        assert_eq!(s.max_entries, 1024);
        assert_eq!(
            s.stream_message_capacity(),
            Some(1024),
            "the message limit binds"
        );
        assert_eq!(
            s.urls,
            vec!["nats://localhost:4222", "nats://localhost:4223"]
        );
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.metrics_bind.as_deref(), Some("0.0.0.0:3010"));
        assert_eq!(s.warnings.len(), 4, "{:?}", s.warnings);
        assert!(s.warnings.iter().any(|w| w.contains("scan_max_changes")));
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let e = parse("db_path = \"x.db\"\nnode_idd = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("node_idd"), "{e}");
        assert!(e.contains("node.toml"), "{e}");
        let e = parse("[nats]\nurl = \"nats://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("url"), "{e}");
    }

    #[test]
    fn shards_above_one_are_rejected_with_the_reason() {
        let e = parse("[replication_log]\nshards = 4\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("replication_log.shards") && e.contains("atomicity"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let e = Settings::load(Path::new("/nonexistent/node.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/node.toml"), "{e}");
    }

    #[test]
    fn defaults_fill_in() {
        let s = parse("db_path = \"/tmp/x.db\"\n").unwrap();
        assert!(s.node_id >= 1);
        assert!(s.publish && s.replicate);
        assert!(s.urls.is_empty());
        assert_eq!(s.poll_interval, Duration::from_secs(1));
        assert_eq!(s.metrics_prefix, "marmot");
        assert!(s.metrics_bind.is_none());
    }
}

#[cfg(test)]
mod readme {
    use super::GO_KEYS;

    #[test]
    fn the_readme_lists_how_every_go_marmot_key_is_treated() {
        let readme = include_str!("../../README.md");
        for (key, _) in GO_KEYS {
            assert!(
                readme.contains(&format!("`{key}`")),
                "README.md does not list the Go Marmot key `{key}`"
            );
        }
    }
}

#[cfg(test)]
mod retention {
    use super::*;

    fn parse(text: &str) -> Settings {
        Settings::parse(Path::new("n.toml"), text).unwrap()
    }

    #[test]
    fn a_configuration_where_nodes_cannot_catch_up_is_warned_about() {
        let s = parse("[replication_log]\nmax_entries = 1000\n[snapshot]\nevery_changes = 50000\n");
        assert!(
            s.warnings.iter().any(|w| w.contains("every 50000 changes")),
            "{:?}",
            s.warnings
        );
        let s = parse("[replication_log]\nmax_age_seconds = 60\n[snapshot]\ninterval = 3600000\n");
        assert!(
            s.warnings.iter().any(|w| w.contains("max_age")),
            "{:?}",
            s.warnings
        );
        let s = parse("[snapshot]\nenabled = false\n");
        assert!(
            s.warnings.iter().any(|w| w.contains("snapshots are off")),
            "{:?}",
            s.warnings
        );
        // A sound one: snapshots every 10,000 changes, a million messages kept.
        let s = parse("[snapshot]\nevery_changes = 10000\n");
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn go_marmot_snapshot_urls_are_understood() {
        let s = parse(
            "[snapshot]\nstore = \"webdav\"\n[snapshot.webdav]\nurl = \"https://dav.example/remote.php?dir=/snapshots&login=u&secret=p\"\n",
        );
        assert_eq!(
            s.snapshot.store,
            SnapshotStoreKind::WebDav {
                endpoint: "https://dav.example/remote.php".into(),
                root: "/snapshots".into(),
                user: Some("u".into()),
                password: Some("p".into()),
            }
        );
        let e = Settings::parse(
            Path::new("n.toml"),
            "[snapshot]\nstore = \"sftp\"\n[snapshot.sftp]\nurl = \"sftp://u:pw@h:2022/x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("password is not supported"), "{e}");
        let s = parse(
            "[snapshot]\nstore = \"s3\"\n[snapshot.s3]\nbucket = \"b\"\nendpoint = \"minio:9000\"\nuse_ssl = false\n",
        );
        assert!(
            matches!(s.snapshot.store, SnapshotStoreKind::S3 { endpoint: Some(ref e), .. } if e == "http://minio:9000")
        );
    }

    #[test]
    fn a_tombstone_lifetime_that_would_overflow_is_rejected() {
        let e = Settings::parse(
            Path::new("n.toml"),
            "db_path = \"/tmp/x.db\"\n[snapshot]\ntombstone_ttl_hours = 18446744073709551615\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("snapshot.tombstone_ttl_hours"), "{e}");
        assert!(e.contains("at most"), "{e}");
        let s = parse("[snapshot]\ntombstone_ttl_hours = 876000\n");
        assert_eq!(
            s.snapshot.tombstone_ttl,
            Duration::from_secs(876_000 * 3600)
        );
    }

    mod arbitrary {
        //! Whatever the file says, parsing it gives settings or an error naming what is
        //! wrong: never a panic.
        use super::*;
        use proptest::prelude::*;

        const SECTIONS: &[(&str, &[&str])] = &[
            (
                "",
                &[
                    "db_path",
                    "node_id",
                    "publish",
                    "replicate",
                    "seq_map_path",
                    "scan_max_changes",
                    "cleanup_interval",
                    "sleep_timeout",
                    "polling_interval",
                    "max_clock_skew_ms",
                    "busy_timeout_ms",
                    "keep_conflicts",
                    "unknown_key",
                ],
            ),
            (
                "snapshot",
                &[
                    "enabled",
                    "interval",
                    "store",
                    "every_changes",
                    "keep",
                    "tombstone_ttl_hours",
                    "restore_empty",
                ],
            ),
            ("snapshot.nats", &["replicas", "bucket"]),
            (
                "snapshot.s3",
                &[
                    "path",
                    "endpoint",
                    "access_key",
                    "secret",
                    "session_token",
                    "bucket",
                    "use_ssl",
                    "region",
                ],
            ),
            ("snapshot.webdav", &["url"]),
            (
                "snapshot.sftp",
                &["url", "key_file", "insecure_accept_any_host_key"],
            ),
            (
                "replication_log",
                &[
                    "shards",
                    "max_entries",
                    "max_bytes",
                    "max_age_seconds",
                    "replicas",
                    "compress",
                    "update_existing",
                ],
            ),
            (
                "nats",
                &[
                    "urls",
                    "subject_prefix",
                    "stream_prefix",
                    "server_config",
                    "seed_file",
                    "user_name",
                    "user_password",
                    "ca_file",
                    "cert_file",
                    "key_file",
                    "bind_address",
                    "connect_retries",
                    "reconnect_wait_seconds",
                    "server_binary",
                ],
            ),
            ("logging", &["verbose", "format"]),
            ("prometheus", &["enable", "bind", "namespace", "subsystem"]),
        ];

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|v| v.to_string()),
                any::<u64>().prop_map(|v| (v as i128 * 3).to_string()),
                Just("18446744073709551615".to_string()),
                any::<f64>().prop_map(|v| format!("{v:?}")),
                any::<bool>().prop_map(|v| v.to_string()),
                "[a-z0-9:/._ ?=&%@-]{0,40}".prop_map(|v| format!("{v:?}")),
                Just("\"\"".to_string()),
                Just("[]".to_string()),
                Just("[\"nats://127.0.0.1:1\", 7]".to_string()),
                Just("{ a = 1 }".to_string()),
            ]
        }

        fn document() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                (
                    0..SECTIONS.len(),
                    proptest::collection::vec((0usize..16, value()), 0..6),
                ),
                0..6,
            )
            .prop_map(|sections| {
                let mut out = String::new();
                let mut seen = std::collections::BTreeSet::new();
                for (si, keys) in sections {
                    let (name, names) = SECTIONS[si];
                    if !seen.insert(name) {
                        continue;
                    }
                    if !name.is_empty() {
                        out.push_str(&format!("[{name}]\n"));
                    }
                    let mut used = std::collections::BTreeSet::new();
                    for (ki, v) in keys {
                        let k = names[ki % names.len()];
                        if used.insert(k) {
                            out.push_str(&format!("{k} = {v}\n"));
                        }
                    }
                }
                out
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn any_document_of_known_keys_parses_or_is_refused_without_panicking(doc in document()) {
                let _ = Settings::parse(Path::new("fuzz.toml"), &doc);
            }

            #[test]
            fn any_text_parses_or_is_refused_without_panicking(text in "(?s).{0,300}") {
                let _ = Settings::parse(Path::new("fuzz.toml"), &text);
            }
        }
    }
}
