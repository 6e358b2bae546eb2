//! The TOML configuration, compatible with Go Marmot's keys.
//!
//! Every Go Marmot key is honoured, ignored with a warning, or rejected with the reason
//! (see [`GO_KEYS`], also listed in the README). An unknown key is an error naming it; a
//! missing file is an error naming the path.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod file;
mod go_keys;
#[cfg(test)]
mod tests;

pub use file::*;
pub use go_keys::GO_KEYS;

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
    /// A value names an environment variable that is not set.
    #[error(
        "config file {path}: {key} names the environment variable {var}, which is not set (a secret is never taken as empty; write $${{ for a literal ${{)"
    )]
    Env {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The variable.
        var: String,
    },
    /// A file a key names cannot be read.
    #[error("config file {path}: {key} = {file}: cannot read it: {source}")]
    File {
        /// The config file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// The file it names.
        file: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
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

/// Go's meaning of an empty string in the config (Go Marmot's sample ships `seed_file = ""`
/// and `server_config = ""`): the key is not set. Removes such keys, and replaces every
/// `${NAME}` in a string value with the environment variable `NAME` (`$${` stands for a
/// literal `${`), so secrets can come from a container's environment. A variable that is not
/// set is an error: `Err((key, variable))`, never a silently empty secret. Empty strings in
/// lists are kept (the list's own check names them).
fn prepare_values(table: &mut toml::Table, prefix: &str) -> Result<(), (String, String)> {
    let mut empty = Vec::new();
    for (name, value) in table.iter_mut() {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            toml::Value::String(s) if s.is_empty() => empty.push(name.clone()),
            _ => prepare_value(value, &key)?,
        }
    }
    for name in empty {
        table.remove(&name);
    }
    Ok(())
}

fn prepare_value(value: &mut toml::Value, key: &str) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) => *s = expand_env(s).map_err(|var| (key.to_string(), var))?,
        toml::Value::Array(items) => {
            for item in items {
                prepare_value(item, key)?;
            }
        }
        toml::Value::Table(t) => prepare_values(t, key)?,
        _ => {}
    }
    Ok(())
}

/// `${NAME}` replaced by the environment variable's value; `$${` is a literal `${`.
fn expand_env(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${")
            && let Some(end) = after.find('}')
        {
            let var = &after[..end];
            match std::env::var(var) {
                Ok(v) => out.push_str(&v),
                Err(_) => return Err(var.to_string()),
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
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

/// A secret: never printed (`Debug` shows only that it is set).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

/// The environment variable that gives the cluster secret when `[cluster]` sets none.
pub const CLUSTER_SECRET_ENV: &str = "MARMOT_CLUSTER_SECRET";

/// Shortest cluster secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// Route TLS files (`[cluster] tls_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTls {
    /// CA that signed every node's route certificate.
    pub ca_file: PathBuf,
    /// This node's certificate.
    pub cert_file: PathBuf,
    /// Its key.
    pub key_file: PathBuf,
}

/// How the supervised servers' routes are secured (`[cluster]`).
#[derive(Clone, Debug, Default)]
pub struct ClusterSettings {
    /// The shared secret (from `secret`, `secret_file` or `MARMOT_CLUSTER_SECRET`).
    pub secret: Option<Secret>,
    /// Where `secret` came from, for errors.
    pub secret_file: Option<PathBuf>,
    /// TLS on routes.
    pub tls: Option<RouteTls>,
    /// A cluster address off loopback may go without route authentication.
    pub insecure: bool,
}

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
    /// Replicate schema changes (`[schema] replicate`).
    pub replicate_schema: bool,
    /// How long another ready node's schema may differ before a warning
    /// (`[schema] mismatch_warn_after_ms`; `None`: never).
    pub schema_mismatch_after: Option<Duration>,
    /// Which tables replicate (`[tables] include` and `exclude`).
    pub tables: marmot_sqlite::filter::TableFilter,
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
    /// Route security of the supervised server.
    pub cluster: ClusterSettings,
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
        let mut s = Self::parse(path, &text)?;
        s.check_files(path)?;
        if let Some(file) = s.cluster.secret_file.clone() {
            let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::File {
                path: path.to_path_buf(),
                key: "cluster.secret_file",
                file: file.clone(),
                source,
            })?;
            let secret = text.trim().to_string();
            if secret.chars().count() < MIN_SECRET_LEN {
                return Err(ConfigError::Rejected {
                    path: path.to_path_buf(),
                    key: "cluster.secret_file",
                    value: file.display().to_string(),
                    reason: "the file holds fewer than 16 characters: use a long random secret (for example `openssl rand -hex 32`)",
                });
            }
            s.cluster.secret = Some(Secret(secret));
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(&file)
                && m.permissions().mode() & 0o077 != 0
            {
                s.warnings.push(format!(
                    "cluster.secret_file {} can be read by other users (mode {:o}): make it owner-only (chmod 600)",
                    file.display(),
                    m.permissions().mode() & 0o777
                ));
            }
        }
        Ok(s)
    }

    /// Every file a key names can be read (an error names the key, not only the file).
    pub fn check_files(&self, path: &Path) -> Result<(), ConfigError> {
        let a = &self.auth;
        for (key, file) in [
            ("nats.seed_file", &a.nkey_seed_file),
            ("nats.creds_file", &a.creds_file),
            ("nats.ca_file", &a.ca_file),
            ("nats.cert_file", &a.cert_file),
            ("nats.key_file", &a.key_file),
            ("nats.server_config", &self.server_config),
            (
                "cluster.tls_ca_file",
                &self.cluster.tls.as_ref().map(|t| t.ca_file.clone()),
            ),
            (
                "cluster.tls_cert_file",
                &self.cluster.tls.as_ref().map(|t| t.cert_file.clone()),
            ),
            (
                "cluster.tls_key_file",
                &self.cluster.tls.as_ref().map(|t| t.key_file.clone()),
            ),
        ] {
            if let Some(file) = file
                && let Err(source) = std::fs::File::open(file)
            {
                return Err(ConfigError::File {
                    path: path.to_path_buf(),
                    key,
                    file: file.clone(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Checks a config text (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        };
        // Parsed once as written, so that an error names its line, ...
        let _: Config = toml::from_str(text).map_err(parse_error)?;
        // ... then read again with Go's meaning of an empty string (not set) and with
        // environment variables put in.
        let mut table: toml::Table = toml::from_str(text).map_err(parse_error)?;
        prepare_values(&mut table, "").map_err(|(key, var)| ConfigError::Env {
            path: path.to_path_buf(),
            key,
            var,
        })?;
        let c: Config = toml::Value::Table(table).try_into().map_err(parse_error)?;
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
        let methods: Vec<&str> = [
            ("seed_file", nats.seed_file.is_some()),
            ("creds_file", nats.creds_file.is_some()),
            ("token", nats.token.is_some()),
            (
                "user_name",
                nats.user_name.is_some() || nats.user_password.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        if methods.len() > 1 {
            return Err(reject(
                "nats",
                methods.join(", "),
                "these authenticate in different ways: set one of seed_file, creds_file, token, or user_name with user_password",
            ));
        }
        if nats.user_name.is_some() != nats.user_password.is_some() {
            return Err(reject(
                if nats.user_name.is_some() {
                    "nats.user_password"
                } else {
                    "nats.user_name"
                },
                "missing".into(),
                "user_name and user_password go together",
            ));
        }
        if nats.cert_file.is_some() != nats.key_file.is_some() {
            return Err(reject(
                if nats.cert_file.is_some() {
                    "nats.key_file"
                } else {
                    "nats.cert_file"
                },
                "missing".into(),
                "a client certificate (cert_file) needs its key (key_file), and the other way round",
            ));
        }
        let cluster = cluster_settings(c.cluster.unwrap_or_default())
            .map_err(|(key, value, reason)| reject(key, value, reason))?;
        let tables_section = c.tables.unwrap_or_default();
        let tables = marmot_sqlite::filter::TableFilter {
            include: tables_section.include.unwrap_or_default(),
            exclude: tables_section.exclude.unwrap_or_default(),
        };
        for (key, list) in [
            ("tables.include", &tables.include),
            ("tables.exclude", &tables.exclude),
        ] {
            if let Some(bad) = list.iter().find(|p| p.trim().is_empty()) {
                return Err(reject(
                    key,
                    format!("{bad:?}"),
                    "a pattern names tables, with * and ? as wildcards (\"app_*\"); an empty one matches nothing",
                ));
            }
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
            replicate_schema: c.schema.as_ref().and_then(|s| s.replicate).unwrap_or(true),
            schema_mismatch_after: Some(
                c.schema
                    .as_ref()
                    .and_then(|s| s.mismatch_warn_after_ms)
                    .unwrap_or(30_000),
            )
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis),
            tables,
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
                creds_file: nats.creds_file,
                token: nats.token,
                ca_file: nats.ca_file,
                cert_file: nats.cert_file,
                key_file: nats.key_file,
            },
            reconnect_wait: Duration::from_secs(nats.reconnect_wait_seconds.unwrap_or(2).max(1)),
            snapshot,
            cluster,
            verbose: logging.verbose.unwrap_or(false),
            log_format,
            metrics_bind,
            metrics_prefix,
            warnings,
        })
    }
}

/// `[cluster]` checked: one source for the secret (the key, a file, or the environment), a
/// secret long enough to resist guessing, and TLS files given together.
fn cluster_settings(
    c: ClusterSection,
) -> Result<ClusterSettings, (&'static str, String, &'static str)> {
    if c.secret.is_some() && c.secret_file.is_some() {
        return Err((
            "cluster",
            "secret, secret_file".into(),
            "give the secret once: in secret or in secret_file",
        ));
    }
    let secret = match (&c.secret, &c.secret_file) {
        (Some(s), _) => Some(("cluster.secret", s.clone())),
        (None, Some(_)) => None,
        (None, None) => std::env::var(CLUSTER_SECRET_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .map(|s| (CLUSTER_SECRET_ENV, s)),
    };
    if let Some((key, s)) = &secret
        && s.trim().chars().count() < MIN_SECRET_LEN
    {
        return Err((
            key,
            "<hidden>".into(),
            "the cluster secret has fewer than 16 characters: use a long random secret (for example `openssl rand -hex 32`)",
        ));
    }
    let tls = match (c.tls_ca_file, c.tls_cert_file, c.tls_key_file) {
        (None, None, None) => None,
        (Some(ca_file), Some(cert_file), Some(key_file)) => Some(RouteTls {
            ca_file,
            cert_file,
            key_file,
        }),
        (ca, cert, _) => {
            let missing = if ca.is_none() {
                "cluster.tls_ca_file"
            } else if cert.is_none() {
                "cluster.tls_cert_file"
            } else {
                "cluster.tls_key_file"
            };
            return Err((
                missing,
                "missing".into(),
                "route TLS needs the CA that signed every node's certificate, this node's certificate and its key",
            ));
        }
    };
    Ok(ClusterSettings {
        secret: secret.map(|(_, s)| Secret(s.trim().to_string())),
        secret_file: c.secret_file,
        tls,
        insecure: c.insecure.unwrap_or(false),
    })
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
/// two databases on one machine get different ids. The machine id is `/etc/machine-id` on
/// Linux and the host name elsewhere ([`crate::platform::machine_id`]).
fn default_node_id(db: Option<&Path>) -> u64 {
    let machine = crate::platform::machine_id().unwrap_or_default();
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
