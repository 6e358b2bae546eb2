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

// Found with the V2 workload (issue 8: real applications' schemas and transactions). Each
// fails with its fix reverted (SIMULATION.md, "Bugs it found", says how that was shown).

/// Postmortem: one transaction swapped two rows' e-mails through a temporary value (UNIQUE);
/// only the final rows travel, and the replica upserted the first while the second still held
/// its value: the batch was parked on every other node. A batch now applies again with the
/// rows it replaces cleared first when a write of it collides.
#[test]
fn regression_08_a_swap_of_unique_values_in_one_transaction_parked_everywhere() {
    passes_with(6, Generator::V2);
}

/// Postmortem: a node behind the stream merged a snapshot in which a UNIQUE value had moved
/// to another row; the merge wrote the snapshot's rows before removing the ones they replace,
/// failed on UNIQUE, rolled back and tried again every 5 s, forever. The merge now clears the
/// rows it replaces first (and a collision that remains says why, loudly).
#[test]
fn regression_09_a_merge_restore_failed_forever_on_a_unique_value_that_moved() {
    passes_with(216, Generator::V2);
}

/// Postmortem: `PRIMARY KEY (k COLLATE NOCASE)` gave the key NOCASE while the column stayed
/// BINARY; the trigger's `OLD.k IS NOT NEW.k` and the change log's join used BINARY, so
/// respelling 'a' as 'A' was captured as a delete and other nodes lost the row. Every key
/// comparison now spells out the key's collation.
#[test]
fn regression_10_a_key_respelt_under_a_primary_key_collation_was_captured_as_a_delete() {
    passes_with(3, Generator::V2);
}

/// Postmortem: a STRICT table's `ANY` key keeps '7' and 7 apart, but marmot's change log and
/// version table gave the key NUMERIC affinity: '7' became 7, a write of '7' was versioned as
/// 7 and the batch no longer applied atomically. Key columns now keep exactly what the table
/// keeps (format 2, migrated in place).
#[test]
fn regression_11_a_strict_any_key_lost_its_storage_class_in_the_change_log() {
    passes_with(2, Generator::V2);
}

/// Postmortem: a table rebuild (create, copy, drop, rename) with a delete in the same
/// transaction dropped marmot's triggers; marmot republished the rows still there but never
/// the delete, so other nodes kept the row. Every versioned key that is gone is now
/// published as a delete after a rebuild.
#[test]
fn regression_12_a_delete_in_a_table_rebuild_never_reached_the_other_nodes() {
    passes_with(4, Generator::V2);
}

/// Postmortem: marmot applied replicated rows with every trigger disabled, so the FTS5 index
/// an application keeps in step with triggers missed every replicated row (and grew corrupt).
/// marmot now issues the external-content index's own delete and insert commands around each
/// row it writes.
#[test]
fn regression_13_full_text_indexes_missed_every_replicated_row() {
    passes_with(1, Generator::V2);
}

/// Postmortem: received stamps were merged into the clock whatever they were, and the skew
/// check looked at the wall clock only: a node whose clock jumped ahead dragged the others'
/// clocks with it, and a high-water mark left ahead outlived its wall clock's correction. A
/// received stamp now moves the clock only up to the bound past the stream's time, the skew
/// is that of the stamps a node would give, and a high-water mark left ahead is brought back.
#[test]
fn regression_14_one_fast_clock_dragged_every_other_clock_ahead() {
    passes_with(62, Generator::V2);
}

/// Postmortem: one node's batches reached the stream out of capture order (publishes retried
/// after a partition); those whose UNIQUE value another of its rows still held waited, and the
/// last to arrive waited forever: only a later apply that changed rows retried them. A batch
/// that begins waiting is now tried at once with the others.
#[test]
fn regression_15_the_last_batches_waiting_on_a_unique_value_waited_forever() {
    passes_with(2848, Generator::V2);
}

/// Postmortem: apply captures (stamps) pending local writes before it compares remote rows,
/// but unlike capture it did not wait for the first clock check: a node that started two
/// hours ahead, whose node-id claim answered slowly, stamped its writes two hours ahead while
/// it applied the stream, and every other node parked them. Every stamping path now waits for
/// a checked, sane clock.
#[test]
fn regression_16_an_apply_stamped_local_writes_with_a_clock_nobody_had_checked() {
    passes_with(10, Generator::V2);
}

/// Postmortem: a snapshot is a copy of the file, and a node saved one while it could not
/// capture (its clock ran ahead, so capture was paused): the copy held its application's
/// writes that no batch carried yet, without versions. A node that joined restored it, then
/// rebuilt a table and deleted one of those rows in the same transaction; with no version
/// to compare against, marmot could not see that delete, and the write was lost. A node now
/// saves a snapshot only with a sane clock, right after any capture that is due.
#[test]
fn regression_17_a_snapshot_carried_writes_its_node_had_not_captured() {
    passes_with(608106, Generator::V2);
}

// Regressions 18 to 20 were found with the first draft of the V3 workload, which then changed
// in the same session (every added column got a declaration of its own, keeping the workload
// out of the documented drop-and-add limit): their seeds now draw other runs. They stay as
// V3 runs; the fixes are pinned deterministically by the adapter and core tests named in each.

/// Postmortem (V3, schema changes): a publish retried after a later one went through put one
/// node's schema changes out of order in the stream; the older change then "lost" to that
/// node's own newer one as if the two were concurrent, was recorded as a conflict, and the
/// receiver published the table's rows again, writing its older values over newer writes it
/// had not received yet. One node's own changes are now ordered by its clock (an older one is
/// no conflict), and a losing change republishes only when it removed data the winner keeps;
/// then one node's schema changes reach the stream in capture order (a schema batch is a
/// publish barrier). Pinned by `one_nodes_changes_reaching_the_stream_out_of_order_are_no_
/// conflict` and `a_schema_batch_goes_out_alone_after_every_earlier_message_and_before_every_
/// later_one`.
#[test]
fn regression_18_one_nodes_schema_changes_out_of_order_republished_older_rows() {
    passes_with(26, Generator::V3);
    passes_with(4, Generator::V3);
}

/// Postmortem (V3): a column added, then renamed, on one node; the rename reached a receiver
/// first (it rebuilt its table into the new shape), and rows written with the column's first
/// name parked forever: the receiver had never had that name, so it had recorded no rename.
/// Applying a change now records what the sender's change did to its columns as well, even
/// when the change itself is not applied, and that counts as a schema change (parked rows
/// are retried); a merge restore imports the snapshot's column history. Pinned by `rows_in_a_
/// shape_the_receiver_never_had_apply_through_the_senders_column_history`.
#[test]
fn regression_19_rows_named_a_column_the_receiver_only_knew_renamed() {
    passes_with(11, Generator::V3);
}

/// Postmortem (V3): a retry of parked batches applied the batch that freed a UNIQUE value
/// another parked batch waited on, after that one was tried in the same pass; nothing woke
/// it again. A retry that applied something now retries the batches waiting on a value.
/// Pinned by `a_parked_retry_that_applied_some_retries_the_batches_waiting_on_a_unique_value`.
#[test]
fn regression_20_a_batch_waiting_on_a_unique_value_missed_the_retry_that_freed_it() {
    passes_with(27, Generator::V3);
}

/// Postmortem (V3, campaign on a0e7079): the node that made the schema changes fell behind
/// and merge-restored a snapshot taken where a column still had its older name; the merge
/// matched columns by name only, so that column's values in the snapshot's rows were left
/// out (its default taken) on that node alone. A merge now maps the snapshot's columns
/// through the column history.
#[test]
fn regression_21_a_merge_restore_left_out_a_column_the_snapshot_had_under_an_older_name() {
    passes_with(730537, Generator::V3);
}

/// Postmortem (V3, campaign on 102cb22; seeds 740351, 741310, 741439, one class): a node that
/// fell behind restored into its rows a snapshot in which a column it had was renamed twice
/// while other columns were dropped and added. The restore's rebuild paired old and new
/// columns by position and shape, found no partner for that column, and the merge kept the
/// node's rows (same versions) with the column's default: equal `k, v` everywhere, other
/// values in the added column on that node alone. A rebuild now follows the column history
/// first. Pinned by `a_merge_restore_follows_a_column_through_renames_while_other_columns_came_and_went`.
#[test]
fn regression_22_a_restore_lost_a_column_renamed_twice_while_others_came_and_went() {
    passes_with(740351, Generator::V3);
}

/// Postmortem (V4, the first runs of the generator that changes one table on several nodes
/// at once, seed 9): a node merge-restored a snapshot whose table was older than its own;
/// the change that made the snapshot's shape was before the snapshot's position, so the node
/// never read it, never learned that its columns lost here, and parked forever the rows
/// written in that shape. The restore now leaves those columns out, as the stream would have.
/// Pinned by `a_merge_restore_whose_snapshot_has_a_losing_shape_leaves_its_columns_out_of_later_rows`.
#[test]
fn regression_23_rows_in_a_snapshots_losing_shape_parked_forever() {
    passes_with(9, Generator::V4);
}

/// Postmortem (V4, seeds 5 and 33): rows of a table written by a node that had not yet
/// learned that another node dropped it parked forever ("unknown table"). They are now
/// skipped: the drop removes them on their own node too. Pinned by
/// `rows_for_a_table_dropped_meanwhile_are_skipped_not_parked`.
#[test]
fn regression_24_rows_for_a_dropped_table_parked_forever() {
    passes_with(33, Generator::V4);
}

/// Postmortem (V4, seed 58): two nodes added and renamed columns of one table at
/// once. A node that applied a losing addition left its column out of rows; when a later
/// change of the same lineage won, the column came back with its default there, and with
/// the written values elsewhere. A node where a losing change arrives after a shape with
/// columns the loser lacks now publishes its rows again. Pinned by
/// `a_column_whose_lineage_lost_and_then_won_ends_the_same_on_every_node`.
#[test]
fn regression_25_a_column_whose_lineage_lost_then_won_diverged() {
    passes_with(58, Generator::V4);
}

/// Postmortem (V4, seed 88): two nodes renamed one column at once. The node that met the
/// winning rename first took the losing name for a dropped column and left it out of rows;
/// the nodes that met the renames the other way round kept those values under the winning
/// name. A losing change's columns now become what a rebuild from its shape would make of
/// them. Pinned by `two_nodes_renaming_one_column_at_once_keep_its_values_under_the_winning_name`.
#[test]
fn regression_26_two_nodes_renaming_one_column_diverged() {
    passes_with(88, Generator::V4);
}

/// Postmortem (V4, seed 55): a node restarted with a schema change and the rows after it both
/// unpublished, and published the rows first (a documented limit); a receiver parked them,
/// then met the change, which lost there, and never retried them. What a losing change's
/// columns became now counts as a schema change. Pinned by
/// `rows_parked_before_a_losing_change_arrives_apply_once_it_does`.
#[test]
fn regression_27_rows_parked_before_a_losing_change_stayed_parked() {
    passes_with(55, Generator::V4);
}

/// Postmortem (V3, campaign on e1c1daa; seeds 750624, 751033, 752421, one class): node 1
/// dropped a column and renamed the next one in one capture. Receivers rebuilt the table and
/// paired the columns between two unchanged ones by position: the dropped column stood
/// against the renamed one's new name (another declaration: no pair), and the renamed
/// column's values were left out (its default taken). Within such a gap each new column now
/// takes the next old column of its shape, in order. Pinned by
/// `a_column_renamed_in_the_same_capture_as_another_was_dropped_before_it_keeps_its_values`.
#[test]
fn regression_28_a_rename_next_to_a_drop_in_one_capture_lost_its_values() {
    passes_with(751033, Generator::V3);
}

/// Postmortem (V3, campaign on 4b9e82d, seed 772522): node 1's publishes were retried after a
/// broker restart and reached the stream out of capture order; node 2, paused by clock skew,
/// then applied everything at once. Batches of node 1 waited on each other's UNIQUE values,
/// one of them carrying a column rename. Applied together, every batch's rows were written
/// after the whole set, the rename included, so rows in the shape before it named a column
/// that no longer existed: the set never applied, and every later batch using the new name
/// parked behind it. A set's schema changes now come first, its rows after, through the column
/// history. Pinned by
/// `batches_waiting_on_each_others_unique_values_apply_together_when_one_changes_the_schema`.
#[test]
fn regression_29_a_waiting_rename_and_the_rows_before_it_never_applied_together() {
    passes_with(772522, Generator::V3);
}

/// Postmortem (V4, seed 251): node 1 dropped a column while node 2's lineage of the table won;
/// nodes learned the loser's fact "dropped" and kept it, first come first kept. When node 1
/// later renamed that column (node 3 again after it), nodes that still held the stale fact
/// followed it instead of the rename, and rows written in the old shape (by a node behind,
/// which then merge-restored) lost the column's values there. Facts about a column now carry
/// the version of their change and the newest is kept. Pinned by
/// `a_losing_drops_column_fact_does_not_turn_a_later_rename_into_a_drop`.
#[test]
fn regression_30_a_losing_drops_stale_fact_turned_a_later_rename_into_a_drop() {
    passes_with(251, Generator::V4);
}

/// Postmortem (V4, seeds 346 and 461): node 3, with a clock far ahead, renamed columns and
/// wrote rows, then fell behind the stream; node 1 meanwhile changed the table too. Node 3
/// restored a snapshot with node 1's shape, kept its own (its later changes were newer) and
/// then published what it held. Elsewhere node 3's earlier changes lost to node 1's, so its
/// rows applied without their columns; its next change then won there and brought the
/// columns back with their defaults. Fixed first by publishing the table's rows again after
/// such a restore (which regression 37 showed wrong), now by the kept values of regression
/// 34. Pinned by `a_merge_restore_that_keeps_a_newer_shape_leaves_its_rows_values_everywhere`.
#[test]
fn regression_31_a_restore_that_kept_a_newer_shape_did_not_publish_its_rows_again() {
    passes_with(346, Generator::V4);
}

/// Postmortem (V4, seed 341): node 4 rebuilt the table without a column while node 1 renamed
/// it, later (node 1's change won). Node 5's rows written with the column reached the other
/// nodes while the rebuild still won there: the column's values were left out, and node 1's
/// rename brought the column back with its default. Fixed first by publishing such rows again
/// from the nodes that kept the values, now by the kept values of regression 34 (values left
/// out of a row are kept, and the renamed column takes them through the column history).
/// Pinned by `rows_written_with_a_column_one_change_dropped_and_another_renamed_keep_their_values`.
#[test]
fn regression_32_rows_with_a_column_dropped_by_a_losing_rebuild_lost_their_values() {
    passes_with(341, Generator::V4);
}

/// Postmortem (V4, seed 1540): node 1 added a column and wrote rows with it; before it
/// published them, node 2's concurrent change won there, and node 1 changed the table again.
/// Node 3 met node 1's later change before the addition (an older change of the same node,
/// no conflict), then the rows, which parked forever on an unknown column. The columns of
/// such a superseded change that the node's later shape lacks are now left out of its rows,
/// as a losing change's are. Pinned by
/// `rows_in_a_shape_their_node_superseded_itself_apply_without_its_lost_column`.
#[test]
fn regression_33_rows_in_a_shape_their_node_superseded_itself_parked_forever() {
    passes_with(1540, Generator::V4);
}

/// Postmortem (V4, seeds 635, 1174, 1481): concurrent lineages of one table; one dropped a
/// column that a later change of another kept. Nodes that met the drop first lost the
/// column's values and gave it its default when it came back, while nodes that met the rows
/// after it kept the values; the winner's publication of its rows again was outrun by a
/// version stamped later (a node whose clock was far ahead). A node now keeps the values a
/// replicated change removes and those left out of rows that arrive while the column is gone
/// (`__marmot__kept_values`, with the version of the row write that carried them, until the
/// tombstone horizon); a column that comes back takes them where the row's current version
/// wrote them. Pinned by
/// `a_column_that_comes_back_takes_the_values_its_rows_winning_writes_carried`.
#[test]
fn regression_34_a_column_that_came_back_lost_the_values_its_rows_carried() {
    passes_with(635, Generator::V4);
}

/// Postmortem (V4, seed 1423): node 3 renamed two columns while node 1 kept them under their
/// names; node 2's lineage then dropped them on node 3; node 1's later change won and brought
/// them back. On node 3 the values the renamed columns held were the returning columns', but
/// the kept values were found only through names leading to the returning column, and were
/// collected at the horizon of the rows' writes rather than of the change that removed them.
/// A column that comes back now also takes the kept values of the name it had been renamed to
/// here, and kept values go once the removing change is past the horizon. Pinned by
/// `a_column_renamed_here_by_a_losing_change_and_then_dropped_comes_back_with_its_values`
/// and `a_column_that_comes_back_takes_the_values_its_rows_winning_writes_carried`.
#[test]
fn regression_35_a_column_renamed_by_a_losing_change_came_back_without_its_values() {
    passes_with(1423, Generator::V4);
}

/// Postmortem (V4, seed 1943): node 3 missed node 1's drop and creation of `x3` (it fell
/// behind the stream) and wrote rows in its old `x3` meanwhile, stamped after the drop; it then
/// merge-restored a snapshot whose `x3` looked the same as its own, and the merge kept the old
/// rows (a dropped table leaves no tombstones), which every other node skips. A merge restore
/// now removes the rows of a life that a drop it learns of ended. Pinned by
/// `a_merge_restore_removes_rows_of_a_table_life_a_drop_ended`.
#[test]
fn regression_36_a_merge_restore_kept_rows_of_a_dropped_tables_old_life() {
    passes_with(1943, Generator::V4);
}

/// Postmortem (V4, seed 3266): a node that fell behind merge-restored a snapshot and, as
/// regression 31's first fix had it, published its copy of a table again because it kept a
/// newer shape of it; it had not read the stream past the snapshot yet, and its stale copy of
/// a row, stamped anew, wrote over another node's newer write everywhere (a lost write).
/// A restore no longer publishes rows again; the kept values cover what it was for.
#[test]
fn regression_37_a_restore_published_stale_rows_over_newer_writes() {
    passes_with(3266, Generator::V4);
}

/// Postmortem (V4, seed 800467, the open class of the first campaign on the final code):
/// node 2 dropped a column of `sd` in a rebuild; node 3, which had not met it, wrote the
/// column, and the nodes that had the drop kept that value. Node 1's later rebuild kept the
/// column (its lineage won), but node 1 had fallen behind and merge-restored a snapshot taken
/// where the column was gone: the merged row took the column's default, while the other nodes
/// filled it from their kept values. A merge restore now takes the snapshot's kept values and
/// fills such columns from them. Pinned by
/// `a_merge_restore_fills_a_column_the_snapshot_dropped_from_its_kept_values`.
#[test]
fn regression_38_a_merge_restore_gave_a_column_the_snapshot_lacked_its_default() {
    passes_with(800467, Generator::V4);
}

/// Postmortem (V4, seed 800685): one lineage renamed a column, a concurrent one dropped it
/// (its fact about the old name replaced the rename's), and a third, later, kept it under its
/// old name. A node that wrote the column before meeting any of them held the value under the
/// new name when the drop came (kept there); when the column came back, nothing led from its
/// name to the kept one, and the row took the default. Every rename learned is now kept
/// apart from the column facts. Pinned by
/// `a_column_renamed_in_one_lineage_and_dropped_in_another_comes_back_with_its_values`.
#[test]
fn regression_39_a_renamed_then_dropped_column_came_back_without_its_values() {
    passes_with(800685, Generator::V4);
}

/// Postmortem (V4, seed 843597, campaign on 9b098cc): node 4 renamed a column of `sd` in a
/// batch that also moved a value of `uq`; a node paused by clock skew applied node 4's
/// batches all at once, out of capture order. The rename's batch waited on a UNIQUE value
/// that only node 4's later batches freed, and those parked on the column's new name, which
/// only the rename's batch gave. The joint retry took only the batches waiting on UNIQUE
/// values, so neither side ever applied. It now takes every parked batch of the origin whose
/// batches wait. Pinned by
/// `a_waiting_schema_change_applies_together_with_the_batches_parked_on_its_new_shape`.
/// Seed 846085 (an unknown table `x1`) was the same class.
#[test]
fn regression_40_a_waiting_schema_change_and_the_batches_in_its_new_shape_never_applied() {
    passes_with(843597, Generator::V4);
    passes_with(846085, Generator::V4);
}

/// Postmortem (V4, seed 846161): three nodes joined empty and merge-restored a snapshot whose
/// column history held a losing rename (`a1_113 -> r1_294`) and the winning shape's pairing
/// back (`r1_294 -> a1_113`), at one version; their table had neither name. Rows written in
/// the losing shape named `r1_294`, and the renames led only in circles: they parked as an
/// unknown column forever, where the snapshot's node had learned the drop that ended the
/// chain. Renames that loop now count as the column being gone here, as a drop does (the
/// value is left out and kept). Every place that follows renames now walks the history with
/// one function (`replicated::renames_from`). Pinned by
/// `rows_whose_column_renames_loop_leave_the_column_out_instead_of_parking_for_good`.
#[test]
fn regression_41_rows_whose_column_renames_looped_parked_for_good() {
    passes_with(846161, Generator::V4);
}

/// Postmortem (V4, seeds 841500, 841730, 845962, campaign on 9b098cc; 850046, campaign on
/// 020ce78): a node dropped a column itself (its application's DDL removed the values before
/// marmot saw the change, so it kept none) while a concurrent lineage that kept the column
/// won; where the column came back on that node, the rows it held before its drop took the
/// default. Only the winner's publication of its rows again gave the values back, and it
/// missed rows of the dropping node that reached the winner after it (841500, 850046), a
/// drop the winner learned through a merge restore (841730), and a node that restored past
/// it (845962). A node whose table keeps data a losing change removed now also sends its
/// rows as a repair (each at its own version, applied only where a node holds that very
/// write: message format 3), again when rows the losing node wrote before its change
/// arrive late, and after a merge restore that learned the change; a merge restore that
/// brings a column back fills it from the snapshot in the rows of the same writes. Pinned by
/// `a_node_that_dropped_a_column_itself_gets_its_values_back_by_a_repair_when_the_drop_loses`,
/// `rows_the_dropping_node_wrote_before_its_drop_that_arrive_late_are_repaired_too` and
/// `a_merge_restore_that_brings_back_a_column_this_node_dropped_itself_fills_it_from_the_snapshot`.
#[test]
fn regression_42_a_column_a_node_dropped_itself_came_back_with_its_default_there() {
    passes_with(841500, Generator::V4);
    passes_with(841730, Generator::V4);
    passes_with(845962, Generator::V4);
    passes_with(850046, Generator::V4);
}

/// Postmortem (V4, seed 870112, campaign on 678e085; fails on 020ce78 too): node 2 added a
/// column before any row, published the change, and then joined by taking node 1's snapshot.
/// With no rows and no row versions its database counted as empty, and it took the snapshot
/// whole: node 1's older shape replaced node 2's own change, which won on every other node,
/// and the stream never gives a node its own batches back. A node that captured a batch now
/// merges a snapshot. Pinned by
/// `a_node_that_captured_only_a_schema_change_merges_a_snapshot_instead_of_taking_it_whole`.
#[test]
fn regression_43_a_node_that_captured_only_a_schema_change_took_a_snapshot_whole() {
    passes_with(870112, Generator::V4);
}

/// Postmortem (V4, seed 880038, campaign on 9a08696; fails on 020ce78 too): a column was
/// renamed through several lineages while a losing one dropped it under an older name, later
/// than the winning lineage's rename of that name (so the drop was the name's newest fact).
/// A row written under that name reached the other nodes late: the history said "dropped",
/// the value was left out and kept, and the column, present under its new name, kept an
/// older value there, while the writing node held the new one. A name whose newest fact is a
/// drop while the renames this node learned lead to a column the table has now puts the value
/// there. Pinned by `a_row_naming_a_column_a_losing_drop_named_takes_the_column_its_renames_lead_to`.
#[test]
fn regression_44_a_row_naming_a_column_a_losing_drop_named_lost_its_value() {
    passes_with(880038, Generator::V4);
}

/// Postmortem (V4, seed 891725, campaign on 14cbd86; passes on 6376f2e): a review fix left the
/// rows a capture writes out of that capture's repair (they go under the new stamp too). A
/// node that skips the new stamp's rows of that table then never got one row of `x3` back.
/// Rows the capture writes go in its repair again.
#[test]
fn regression_45_a_repair_that_left_out_the_rows_its_capture_wrote_lost_a_row() {
    passes_with(891725, Generator::V4);
}

/// Postmortem (V4 seed 901353, campaign on 764aa97): node 2 renamed a column of `sd` and
/// wrote rows in that shape; node 1 replaced the new name by another; later changes of node 3
/// won and kept the column under its first name. Nodes that had applied the rename and node
/// 1's change first found the rows' column name dropped, with no rename ahead of it, and
/// kept the values aside (the column held its default), while node 2 and node 3 held them
/// in the column. A name whose renames lead nowhere now goes back along them to the name it
/// renamed when that name survives.
#[test]
fn regression_46_a_value_written_under_a_losing_rename_was_kept_aside_on_some_nodes() {
    passes_with(901353, Generator::V4);
}

/// Postmortem (V4 seed 912706, campaign on ba68fe1): node 5 fell behind the stream and waited
/// for a snapshot that covered its gap, its publishing held back by the pacing (`max_lag`)
/// while its application kept writing; its batches went out more than the tombstone lifetime
/// after they were made. Nodes that had collected newer tombstones of those rows took the
/// older versions: a deleted row came back on three nodes of five. The pacing now releases a
/// batch held back for half the tombstone lifetime (`NodeConfig::max_publish_hold`).
#[test]
fn regression_47_writes_held_back_past_the_tombstone_lifetime_brought_deleted_rows_back() {
    passes_with(912706, Generator::V4);
}
