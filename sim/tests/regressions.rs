//! Bugs the simulation found, each pinned to the seed that found it, with a one-line
//! postmortem. A hang counts: the watchdog aborts the run and names the seed.

//!
//! Each regression runs the plan its seed had with the generator that found it (the workload
//! grew since: the same seed draws something else today), so it keeps proving what it proved.

use sim::{Generator, Plan, run_plan_watched};
use std::time::Duration;

/// A regression found with the V1 workload.
fn passes(seed: u64) {
    passes_with(seed, Generator::V1);
}

fn passes_with(seed: u64, g: Generator) {
    // Built with `--features canary`, these run the known-wrong rule too (and must fail).
    let canary = cfg!(feature = "canary");
    if let Err(r) = run_plan_watched(
        Plan::from_seed_with(seed, g),
        canary,
        Duration::from_secs(120),
    ) {
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

/// Postmortem: after a broker restart every node flushed its outbox at once, the stream (kept
/// to a few dozen messages) dropped messages before any node had read them, and no snapshot
/// covered them: every node restored the same snapshot over and over (20,000 restores) and
/// the cluster never converged. Now a node publishes only while it has applied all but a
/// quarter of what the stream keeps (`NodeConfig::fit_to_retention`), so some node always
/// reads every message before the stream drops it; and a node still behind after a restore
/// waits for a newer snapshot instead of restoring the same one again.
#[test]
fn regression_03_nodes_flushing_at_once_outran_the_stream_and_restored_forever() {
    passes(200129);
}

/// Postmortem (of the checker): a row inserted and deleted within one capture, on a node
/// whose clock ran 7 s behind, left a tombstone older than the 15 s horizon; a snapshot
/// collected it, and the checker called the missing version a lost write. The checker now
/// knows tombstones below a node's horizon may be gone.
#[test]
fn regression_04_a_collected_tombstone_is_not_a_lost_write() {
    passes(200287);
}

/// Postmortem: a node behind the stream published its whole outbox unpaced while it waited
/// for a snapshot (it was exempt from pacing), pushing the one node still reading off the
/// stream's end before that node could take the snapshot the first one needed: both waited
/// forever. A node behind the stream now holds its writes in the outbox until it restored.
#[test]
fn regression_05_a_behind_node_publishing_unpaced_pushed_the_others_behind() {
    passes(307726);
}

/// Postmortem: a late joiner whose clock lagged 18 s stamped its own writes below the
/// snapshot's tombstone horizon; merging the snapshot took them, absent from it, for
/// collected deletes and removed them, though they were still waiting in its outbox. The
/// merge now keeps rows whose version is one of the node's unpublished batches.
#[test]
fn regression_06_a_merge_restore_removed_unpublished_writes_stamped_below_the_horizon() {
    passes(305454);
}

/// Postmortem: a node cut off one way took the snapshot lease (the grant reached the broker,
/// the answer did not) and then fell behind; nobody else could snapshot until the lease
/// expired 15 s later, so it held its writes past the 15 s tombstone lifetime and, published
/// at last, one of them brought back a row whose delete's tombstone was already collected. A
/// node now releases a lease it still holds before it fetches a snapshot.
#[test]
fn regression_07_a_stale_lease_of_a_behind_node_kept_everyone_from_snapshotting() {
    passes(302253);
}
