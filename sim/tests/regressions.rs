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
