//! The command line. Go Marmot's single-dash flags (`-config x.toml`, `-cleanup`,
//! `-save-snapshot`, `-cluster-addr`, `-cluster-peers`, `-leaf-servers`, `-pprof`) are
//! accepted as they were, next to the usual `--flag` form and subcommands.

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

/// What `marmot --version` prints: the release and the newest message format it writes and
/// reads (nodes of one cluster compare formats, not releases; see the README's Versions).
/// The digit is checked against [`marmot_core::wire::FORMAT_VERSION`] by a test.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (message format 3)");

/// marmot: leaderless replication of SQLite databases over NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "marmot", version = VERSION, about, long_about = None)]
pub struct Cli {
    /// The TOML configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Cluster listen address of the supervised nats-server (host:port).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub cluster_addr: Option<String>,
    /// Routes to the other nodes' nats-servers: nats://h:p,... or dns://host:port/?min=N&interval_ms=M.
    #[arg(long, global = true, value_name = "URLS")]
    pub cluster_peers: Option<String>,
    /// Leaf node remotes for the supervised nats-server.
    #[arg(long, global = true, value_name = "URLS")]
    pub leaf_servers: Option<String>,
    /// Go Marmot's -cleanup: same as the `cleanup` command.
    #[arg(long, hide = true)]
    pub cleanup: bool,
    /// Go Marmot's -save-snapshot: same as `snapshot save`.
    #[arg(long, hide = true)]
    pub save_snapshot: bool,
    /// Go Marmot's -pprof: ignored.
    #[arg(long, hide = true, value_name = "ADDR")]
    pub pprof: Option<String>,
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the replication daemon (the default).
    Run,
    /// Remove marmot's triggers and tables from the database; user data is untouched.
    /// Stop the daemon first.
    Cleanup,
    /// Batches that could not be applied.
    Parked {
        /// What to do with them.
        #[command(subcommand)]
        action: ParkedCommand,
    },
    /// Recent conflicts (writes that lost to a newer write of the same row).
    Conflicts {
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// What the database holds for marmot: position, pending and parked batches, tables.
    Status {
        /// Every node of the cluster instead, as each advertises itself beside its node-id
        /// claim: up or down, position and lag, pending and parked batches, clock skew,
        /// schema digest, version, readiness (a table on a terminal, JSON otherwise).
        #[arg(long)]
        cluster: bool,
        /// With --cluster: JSON even on a terminal.
        #[arg(long)]
        json: bool,
    },
    /// Waits until every live node has this node's replicated schema (the same schema
    /// digest): for deploys that must not go on before a migration reached every node.
    /// Exit status 0 when they do, 1 at the timeout (naming the nodes that differ).
    WaitSchema {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Republish rows of a table from this node with fresh stamps, so that every node
    /// converges to this node's copy of them (the way out after nodes diverged). Works with
    /// the daemon running (it captures them at once) or stopped (at its next start).
    Repair {
        /// The table.
        table: String,
        /// Only rows matching this SQL expression, e.g. "id BETWEEN 10 AND 20".
        #[arg(long = "where", value_name = "SQL")]
        filter: Option<String>,
        /// Only this key, as a JSON array of the key's values in key order, e.g. '[42]' or
        /// '["a", 1]': published as a delete when this node has no such row (repeatable).
        #[arg(long = "key", value_name = "JSON")]
        keys: Vec<String>,
    },
    /// Print the changes on the stream as JSON lines (table, operation, key, row, stamp,
    /// origin), from now or from a stream position; see the README's Change feed.
    Tail {
        /// Start at this stream sequence (1: the oldest the stream holds); default: only
        /// changes that arrive from now on.
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// Exit after printing this many lines.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Exit once the messages the stream held at the start are printed.
        #[arg(long)]
        to_end: bool,
    },
    /// Compare the nodes' data: the tables (and with --keys, the keys) where nodes that
    /// applied the same stream position hold different rows. Exit status 0: the same, 1:
    /// they differ, 2: they could not be compared (see the README's Comparing nodes).
    Diff {
        /// Which nodes, e.g. `1,2` (default: every live node).
        #[arg(long, value_delimiter = ',', value_name = "IDS")]
        nodes: Vec<u64>,
        /// Only this table.
        #[arg(long)]
        table: Option<String>,
        /// Name the keys of the rows that differ.
        #[arg(long)]
        keys: bool,
        /// Ask again for up to this many seconds until the nodes applied the same position
        /// with nothing of their own unpublished.
        #[arg(long, default_value_t = 30, value_name = "SECONDS")]
        wait: u64,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Snapshots: save one now, restore the newest, list what exists.
    Snapshot {
        /// What to do.
        #[command(subcommand)]
        action: SnapshotCommand,
    },
}

/// `marmot snapshot ...`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of this node's database now and store it.
    Save,
    /// Restore the newest snapshot that verifies into this node's database (merged under the
    /// merge rule when the database has content; taken whole when it is empty).
    Restore,
    /// List stored snapshots: generation, position, size, age.
    List,
}

/// `marmot parked ...`.
#[derive(Debug, Subcommand)]
pub enum ParkedCommand {
    /// List parked batches with their reasons.
    List,
    /// Ask the daemon to retry one parked batch (by id) or all.
    Retry {
        /// The parked batch's id (from `list`).
        id: Option<i64>,
        /// Retry all of them.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Throw away one parked batch (by id) or all.
    Discard {
        /// The parked batch's id (from `list`).
        id: Option<i64>,
        /// Discard all of them.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

const GO_FLAGS: &[&str] = &[
    "config",
    "cleanup",
    "save-snapshot",
    "cluster-addr",
    "cluster-peers",
    "leaf-servers",
    "pprof",
];

/// Rewrites Go-style `-flag` into `--flag` for the flags Go Marmot had.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 {
                return a;
            }
            let Some(s) = a.to_str() else { return a };
            if let Some(rest) = s.strip_prefix('-')
                && !rest.starts_with('-')
            {
                let name = rest.split('=').next().unwrap_or(rest);
                if GO_FLAGS.contains(&name) {
                    return OsString::from(format!("-{s}"));
                }
            }
            a
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(normalize_args(args.iter().map(OsString::from))).unwrap()
    }

    #[test]
    fn go_marmot_invocations_still_parse() {
        let c = parse(&[
            "marmot",
            "-config",
            "n1.toml",
            "-cluster-addr",
            "localhost:4221",
            "-cluster-peers=nats://localhost:4222/,nats://localhost:4223/",
        ]);
        assert_eq!(c.config.as_deref(), Some(std::path::Path::new("n1.toml")));
        assert_eq!(c.cluster_addr.as_deref(), Some("localhost:4221"));
        assert!(c.cluster_peers.unwrap().contains("4223"));
        assert!(parse(&["marmot", "-config", "x.toml", "-cleanup"]).cleanup);
        assert!(parse(&["marmot", "-save-snapshot", "-config", "x.toml"]).save_snapshot);
    }

    #[test]
    fn the_version_names_the_message_format_this_build_writes() {
        assert!(
            VERSION.ends_with(&format!(
                "(message format {})",
                marmot_core::wire::FORMAT_VERSION
            )),
            "{VERSION}"
        );
        let e = Cli::try_parse_from(["marmot", "--version"]).unwrap_err();
        assert!(e.to_string().contains(VERSION), "{e}");
    }

    #[test]
    fn subcommands_parse() {
        let c = parse(&["marmot", "--config", "x.toml", "parked", "retry", "--all"]);
        assert!(matches!(
            c.command,
            Some(Command::Parked {
                action: ParkedCommand::Retry {
                    id: None,
                    all: true
                }
            })
        ));
        let c = parse(&["marmot", "parked", "discard", "3", "--config", "x.toml"]);
        assert!(matches!(
            c.command,
            Some(Command::Parked {
                action: ParkedCommand::Discard {
                    id: Some(3),
                    all: false
                }
            })
        ));
    }
}
