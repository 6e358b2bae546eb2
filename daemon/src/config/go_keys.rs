//! How marmot treats each of Go Marmot's configuration keys. The README lists the same (a
//! test checks it).

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

#[cfg(test)]
mod readme {
    use super::GO_KEYS;

    #[test]
    fn the_readme_lists_how_every_go_marmot_key_is_treated() {
        let readme = include_str!("../../../README.md");
        for (key, _) in GO_KEYS {
            assert!(
                readme.contains(&format!("`{key}`")),
                "README.md does not list the Go Marmot key `{key}`"
            );
        }
    }
}
