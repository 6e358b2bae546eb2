//! Bugs the simulation found, each pinned to the seed that found it, with a one-line
//! postmortem. A hang counts: the watchdog aborts the run and names the seed.

use sim::run_seed_watched;
use std::time::Duration;

fn passes(seed: u64) {
    if let Err(r) = run_seed_watched(seed, false, Duration::from_secs(60)) {
        panic!("{r}");
    }
}

/// Postmortem: a node whose clock ran ahead (capture and apply paused) still reported the
/// capture deadline as due, so the drive loop woke itself forever and simulated time stopped;
/// `poll_timeout` now only reports deadlines of actions that can run.
#[test]
fn regression_01_drive_loop_spun_while_the_clock_was_paused() {
    passes(36);
}

/// Postmortem: a new node that took a snapshot whole also took the source node's capture
/// counter, so its first batch was numbered after the source's; the restore now keeps the
/// node's own counter with the rest of its identity.
#[test]
fn regression_02_a_whole_restore_carried_the_source_nodes_capture_sequence() {
    passes(5);
}
