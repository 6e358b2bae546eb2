//! Dispatching commands.

use crate::cli::{Cli, Command, ParkedCommand, SnapshotCommand};
use crate::config::{LogFormat, Settings};
use anyhow::{Context, bail};
use std::process::ExitCode;
use std::time::Duration;

/// Sets up logging: console or JSON, debug when verbose; `RUST_LOG` overrides.
pub fn init_logging(s: &Settings) {
    use tracing_subscriber::EnvFilter;
    let default = if s.verbose { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},async_nats=warn,nats_server=info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(stderr_is_terminal())
        .with_writer(std::io::stderr);
    let _ = match s.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Console => builder.try_init(),
    };
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    let Some(path) = &cli.config else {
        bail!(
            "no configuration given: run `marmot --config node.toml` (see the README for the keys)"
        );
    };
    Ok(Settings::load(path)?)
}

pub(crate) fn open_db(s: &Settings) -> anyhow::Result<rusqlite::Connection> {
    if !s.db_path.exists() {
        bail!("database {} does not exist", s.db_path.display());
    }
    marmot_sqlite::open_connection(&s.db_path, Duration::from_secs(10))
        .with_context(|| format!("opening {}", s.db_path.display()))
}

/// Runs the command the user asked for.
pub fn dispatch(mut cli: Cli) -> anyhow::Result<ExitCode> {
    let command = if cli.cleanup {
        Some(Command::Cleanup)
    } else if cli.save_snapshot {
        Some(Command::Snapshot {
            action: SnapshotCommand::Save,
        })
    } else {
        cli.command.take()
    };
    let s = settings(&cli)?;
    match command.unwrap_or(Command::Run) {
        Command::Run => {
            init_logging(&s);
            if cli.pprof.is_some() {
                tracing::warn!("-pprof is ignored by this marmot");
            }
            crate::run::run(s, &cli)
        }
        Command::Cleanup => {
            // The daemon would put its triggers and tables back at once.
            let _lock = crate::lock::exclusive(&s.db_path, "`marmot cleanup`")?;
            let conn = open_db(&s)?;
            let r = marmot_sqlite::admin::cleanup(&conn)
                .context("removing marmot's triggers and tables")?;
            println!(
                "removed {} triggers and {} tables of marmot from {}; user data untouched",
                r.triggers,
                r.tables,
                s.db_path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Parked { action } => parked(&s, action),
        Command::Conflicts { limit } => {
            let conn = open_db(&s)?;
            let rows = marmot_sqlite::admin::list_conflicts(&conn, limit)?;
            if rows.is_empty() {
                println!("no conflicts recorded");
            }
            for r in rows {
                println!(
                    "#{} table {} key {}: {}@node{} won over {}@node{}; losing row: {}",
                    r.id,
                    r.table,
                    r.key,
                    stamp(r.winner.0),
                    r.winner.1,
                    stamp(r.loser.0),
                    r.loser.1,
                    r.loser_row.as_deref().unwrap_or("(deleted)")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            cluster: false,
            json: _,
        } => status(&s),
        Command::Status {
            cluster: true,
            json,
        } => {
            init_logging_quiet(&s);
            crate::cluster::status(&s, json)
        }
        Command::Tail {
            from,
            count,
            to_end,
        } => {
            init_logging_quiet(&s);
            crate::tail::tail(
                &s,
                crate::tail::TailOptions {
                    from,
                    count,
                    to_end,
                },
            )
        }
        Command::Diff {
            nodes,
            table,
            keys,
            wait,
            json,
        } => {
            init_logging_quiet(&s);
            crate::diff::diff(
                &s,
                &crate::diff::DiffOptions {
                    nodes,
                    table,
                    keys,
                    wait: Duration::from_secs(wait),
                    json,
                },
            )
        }
        Command::WaitSchema { timeout } => {
            init_logging_quiet(&s);
            crate::cluster::wait_schema(&s, Duration::from_secs(timeout))
        }
        Command::Repair {
            table,
            filter,
            keys,
        } => repair(&s, &table, filter, &keys),
        Command::Snapshot { action } => {
            init_logging_quiet(&s);
            crate::snapshots::command(&s, action)
        }
    }
}

fn repair(
    s: &Settings,
    table: &str,
    filter: Option<String>,
    keys: &[String],
) -> anyhow::Result<ExitCode> {
    if !s.publish {
        bail!(
            "this node does not publish (publish = false): nothing it holds reaches the others; \
             repair from a node that publishes"
        );
    }
    let keys = keys
        .iter()
        .map(|k| parse_key(k).with_context(|| format!("--key {k}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let conn = open_db(s)?;
    let whole = filter.is_none() && keys.is_empty();
    let r = marmot_sqlite::admin::repair(
        &conn,
        table,
        &marmot_sqlite::admin::RepairScope { filter, keys },
    )
    .map_err(|e| anyhow::anyhow!("repair: {e}"))?;
    println!(
        "logged {} rows of {table} to publish as they are here, and {} keys to publish as deleted{}; \
         the running daemon publishes them now (or the next start does), with fresh stamps",
        r.rows,
        r.gone,
        if whole {
            " (rows only other nodes hold are not known here: name them with --key)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// A key given as a JSON array: numbers (integers or reals) and strings.
fn parse_key(text: &str) -> anyhow::Result<Vec<marmot_core::Value>> {
    let v: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    let serde_json::Value::Array(items) = v else {
        bail!("a key is a JSON array of its values, e.g. [42] or [\"a\", 1]");
    };
    items
        .into_iter()
        .map(|i| match i {
            serde_json::Value::Number(n) => Ok(match n.as_i64() {
                Some(i) => marmot_core::Value::Integer(i),
                None => marmot_core::Value::Real(n.as_f64().unwrap_or(f64::NAN)),
            }),
            serde_json::Value::String(s) => Ok(marmot_core::Value::Text(s.into_bytes())),
            other => bail!("{other} is not a key value (numbers and strings only)"),
        })
        .collect()
}

/// Logging for one-shot commands: warnings and errors only, unless verbose.
fn init_logging_quiet(s: &Settings) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if s.verbose { "debug" } else { "warn" }));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(stderr_is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Colours only on a terminal: logs redirected to a file or a collector stay plain text.
fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
fn stamp(raw: u64) -> String {
    marmot_core::Stamp::from_u64(raw).to_string()
}

fn parked(s: &Settings, action: ParkedCommand) -> anyhow::Result<ExitCode> {
    let conn = open_db(s)?;
    match action {
        ParkedCommand::List => {
            let rows = marmot_sqlite::admin::list_parked(&conn)?;
            if rows.is_empty() {
                println!("no parked batches");
            }
            for r in rows {
                println!(
                    "#{} stream seq {} batch {} tables [{}] attempts {}{}: {}",
                    r.id,
                    r.stream_seq,
                    r.batch.as_deref().unwrap_or("(unreadable)"),
                    r.tables.join(", "),
                    r.attempts,
                    if r.retry_requested {
                        " (retry requested)"
                    } else {
                        ""
                    },
                    r.reason
                );
            }
        }
        ParkedCommand::Retry { id, all } => {
            require_choice(id, all)?;
            let n = marmot_sqlite::admin::request_retry(&conn, id)?;
            println!(
                "retry requested for {n} parked batch(es); the running daemon retries them within a second (or at its next start)"
            );
            if n == 0 {
                return Ok(ExitCode::from(1));
            }
        }
        ParkedCommand::Discard { id, all } => {
            require_choice(id, all)?;
            let n = marmot_sqlite::admin::discard_parked(&conn, id)?;
            println!("discarded {n} parked batch(es)");
            if n == 0 {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn require_choice(id: Option<i64>, all: bool) -> anyhow::Result<()> {
    if id.is_none() && !all {
        bail!("give a parked batch id (see `marmot parked list`) or --all");
    }
    Ok(())
}

fn status(s: &Settings) -> anyhow::Result<ExitCode> {
    let conn = open_db(s)?;
    let q = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap_or(0) };
    let meta = |k: &str| -> i64 {
        conn.query_row(
            "SELECT value FROM \"__marmot__meta\" WHERE key = ?1",
            [k],
            |r| r.get(0),
        )
        .unwrap_or(0)
    };
    let found = marmot_sqlite::schema::discover(&conn).ok();
    let out = serde_json::json!({
        "database": s.db_path,
        "node_id": meta("node_id"),
        "position": meta("position"),
        "clock": stamp(meta("clock") as u64),
        "pending_batches": q("SELECT count(DISTINCT incarnation || '/' || seq) FROM \"__marmot__outbox\""),
        "incomplete_batches": q("SELECT count(*) FROM (SELECT DISTINCT origin, incarnation, seq FROM \"__marmot__inbox\")"),
        "parked_batches": q("SELECT count(*) FROM \"__marmot__parked\""),
        "conflicts_recorded": q("SELECT count(*) FROM \"__marmot__conflicts\""),
        "tables": q("SELECT count(*) FROM \"__marmot__tables\""),
        // What replicates, and what does not with why (excluded, no primary key, virtual, ...).
        "replicated_tables": found.as_ref().map(|f| f.tables.iter().map(|t| t.name.clone()).collect::<Vec<_>>()).unwrap_or_default(),
        "skipped_tables": found.as_ref().map(|f| f.skipped.iter()
            .filter(|(_, why)| *why != marmot_sqlite::schema::SkipReason::Shadow)
            .map(|(t, why)| serde_json::json!({"table": t, "reason": why.to_string()}))
            .collect::<Vec<_>>()).unwrap_or_default(),
        "local_objects": marmot_sqlite::replicated::local_objects(&conn).unwrap_or_default()
            .into_iter()
            .map(|(kind, name, why)| serde_json::json!({"type": kind, "name": name, "reason": why}))
            .collect::<Vec<_>>(),
        "schema_replicated": s.replicate_schema,
        // Equal on nodes whose replicated schema is the same (normalised statements).
        "schema_digest": marmot_sqlite::replicated::schema_digest(&conn).unwrap_or_default(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
