//! The `marmot` binary: runs the replication daemon next to an application's SQLite file,
//! and offers the commands a person needs around it (cleanup, parked batches, conflicts,
//! status).

mod advertise;
mod cli;
mod cluster;
mod commands;
mod diff;
use marmot_daemon::config;
mod lock;
mod measured;
mod observe;
mod run;
mod snapshots;
mod supervisor;
mod tail;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    marmot_daemon::platform::limit_allocator_arenas();
    let cli = cli::Cli::parse_from(cli::normalize_args(std::env::args_os()));
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            // Logging may not be set up (bad config): print plainly.
            eprintln!("marmot: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
