use super::*;
use crate::hlc::Stamp;
use crate::memory::{MemTxn, MemoryApp, MemorySnapshotStore, MemoryStorage};
use crate::wire::{BodyWriter, seal};

const T0: u64 = 1_700_000_000_000;

/// Node 2's database with table `t(id, v)`, and the application's handle on it.
fn db() -> MemoryApp {
    let s = MemoryStorage::new(2, MemorySnapshotStore::default());
    let app = s.app();
    app.create_table("t", &["id", "v"], 1);
    app
}

/// A batch of `origin` stamped at `ms`: `Some(v)` upserts, `None` deletes.
fn batch(origin: NodeId, seq: u64, ms: u64, rows: &[(i64, Option<&str>)]) -> Vec<Bytes> {
    batch_in(origin, seq, ms, "t", &["id", "v"], rows, 512 * 1024)
}

fn batch_in(
    origin: NodeId,
    seq: u64,
    ms: u64,
    table: &str,
    columns: &[&str],
    rows: &[(i64, Option<&str>)],
    max_fragment: usize,
) -> Vec<Bytes> {
    let mut w = BodyWriter::default();
    let cols: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    w.table(table, &cols, 1);
    for (id, v) in rows {
        match v {
            Some(v) => w.upsert(None, [ValueRef::Integer(*id), ValueRef::Text(v.as_bytes())]),
            None => w.delete(None, [ValueRef::Integer(*id)]),
        }
    }
    let id = BatchId {
        origin,
        incarnation: 1,
        seq,
    };
    seal(
        id,
        Stamp::new(ms, 0),
        w.format(),
        w.as_bytes(),
        false,
        max_fragment,
    )
}

fn deliver(first_seq: u64, messages: &[Bytes]) -> Vec<Delivery> {
    crate::memory::conformance::deliveries(first_seq, messages)
}

fn apply(t: &mut MemTxn, clock: &mut Clock, position: u64, ds: &[Delivery]) -> ApplyReport {
    apply_deliveries(t, clock, 2, position, ds, T0).unwrap()
}

fn clock() -> Clock {
    Clock::new(Stamp::ZERO)
}

#[test]
fn a_batch_writes_its_rows_with_its_version_and_moves_the_clock() {
    let mut t = MemTxn::over(&db(), 2, 1);
    let mut c = clock();
    let r = apply(
        &mut t,
        &mut c,
        0,
        &deliver(1, &batch(1, 1, T0, &[(1, Some("a")), (2, Some("b"))])),
    );
    assert_eq!((r.through_seq, r.batches, r.rows_written), (1, 1, 2));
    assert_eq!(t.rows("t"), ["(1, 'a')", "(2, 'b')"]);
    let v = t.version_of("t", &[Value::Integer(1)]).unwrap();
    assert_eq!(v.version.node, 1);
    assert!(!v.deleted);
    assert!(
        c.high_water() >= Stamp::new(T0, 0),
        "stamps seen move the clock"
    );
}

#[test]
fn deliveries_at_or_below_the_position_are_passed_over() {
    let mut t = MemTxn::over(&db(), 2, 1);
    let ds = deliver(5, &batch(1, 1, T0, &[(1, Some("a"))]));
    let r = apply(&mut t, &mut clock(), 5, &ds);
    assert_eq!((r.through_seq, r.batches), (5, 0));
    assert!(t.rows("t").is_empty());
}

#[test]
fn the_newest_version_of_a_row_wins_whatever_the_order_and_the_loser_is_recorded() {
    let newer = batch(1, 1, T0 + 10, &[(1, Some("newer"))]);
    let older = batch(3, 1, T0, &[(1, Some("older"))]);
    for order in [[&newer, &older], [&older, &newer]] {
        let mut t = MemTxn::over(&db(), 2, 1);
        let mut c = clock();
        apply(&mut t, &mut c, 0, &deliver(1, order[0]));
        apply(&mut t, &mut c, 1, &deliver(2, order[1]));
        assert_eq!(t.rows("t"), ["(1, 'newer')"]);
        assert_eq!(t.counts().2, 1, "one conflict recorded");
    }
}

#[test]
fn a_delete_leaves_a_tombstone_that_an_older_write_arriving_late_does_not_undo() {
    let mut t = MemTxn::over(&db(), 2, 1);
    let mut c = clock();
    apply(
        &mut t,
        &mut c,
        0,
        &deliver(1, &batch(1, 1, T0, &[(1, Some("a"))])),
    );
    apply(
        &mut t,
        &mut c,
        1,
        &deliver(2, &batch(1, 2, T0 + 20, &[(1, None)])),
    );
    assert!(t.rows("t").is_empty());
    assert!(t.version_of("t", &[Value::Integer(1)]).unwrap().deleted);
    let r = apply(
        &mut t,
        &mut c,
        2,
        &deliver(3, &batch(3, 1, T0 + 10, &[(1, Some("late"))])),
    );
    assert_eq!(r.rows_skipped, 1);
    assert!(t.rows("t").is_empty(), "the delete is newer");
}

#[test]
fn a_batch_captured_by_this_database_is_passed_over() {
    let mut t = MemTxn::over(&db(), 2, 1);
    let r = apply(
        &mut t,
        &mut clock(),
        0,
        &deliver(1, &batch(2, 1, T0, &[(1, Some("mine"))])),
    );
    assert_eq!((r.own_messages, r.rows_written), (1, 0));
    // The same node id in an incarnation this database never had (a copy restored
    // elsewhere): applied like any other.
    let mut other = batch(2, 1, T0, &[(1, Some("from a copy"))]);
    let (mut h, f) = crate::wire::decode_message(&other[0]).unwrap();
    h.batch.incarnation = 99;
    other[0] = crate::wire::encode_message(&h, f);
    let r = apply(&mut t, &mut clock(), 1, &deliver(2, &other));
    assert_eq!((r.own_messages, r.rows_written), (0, 1));
}

#[test]
fn an_unreadable_message_is_parked_and_the_position_passes_it() {
    let mut t = MemTxn::over(&db(), 2, 1);
    let junk = [Bytes::from_static(b"\x00\x01 junk")];
    let mut ds = deliver(1, &junk);
    ds.extend(deliver(2, &batch(1, 1, T0, &[(1, Some("after"))])));
    let r = apply(&mut t, &mut clock(), 0, &ds);
    assert_eq!(r.parked.len(), 1);
    assert!(r.parked[0].batch.is_none());
    assert_eq!(r.through_seq, 2);
    assert_eq!(t.rows("t"), ["(1, 'after')"], "everything else goes on");
    assert_eq!(t.counts().0, 1);
}

#[test]
fn a_batch_that_cannot_apply_is_parked_whole_and_retried_later() {
    let app = db();
    let mut t = MemTxn::over(&app, 2, 1);
    // Its first table is fine, its second unknown here: nothing of it may stay.
    let mut w = BodyWriter::default();
    w.table("t", &["id".into(), "v".into()], 1);
    w.upsert(None, [ValueRef::Integer(1), ValueRef::Text(b"a")]);
    w.table("later", &["id".into(), "v".into()], 1);
    w.upsert(None, [ValueRef::Integer(1), ValueRef::Text(b"b")]);
    let id = BatchId {
        origin: 1,
        incarnation: 1,
        seq: 1,
    };
    let msgs = seal(
        id,
        Stamp::new(T0, 0),
        w.format(),
        w.as_bytes(),
        false,
        1 << 20,
    );
    let r = apply(&mut t, &mut clock(), 0, &deliver(1, &msgs));
    assert_eq!(r.parked.len(), 1);
    assert!(
        r.parked[0].reason.contains("later"),
        "{}",
        r.parked[0].reason
    );
    assert!(!r.parked[0].collision);
    assert!(t.rows("t").is_empty(), "applied whole or not at all");
    // Once the table exists, the parked batch applies.
    app.create_table("later", &["id", "v"], 1);
    let mut t2 = MemTxn::over(&app, 2, 1);
    let mut report = ApplyReport::default();
    let again = retry_parked(&mut t2, &mut clock(), 2, &r.parked[0], T0, &mut report).unwrap();
    assert!(again.is_none());
    assert_eq!(t2.rows("t"), ["(1, 'a')"]);
    assert_eq!(t2.rows("later"), ["(1, 'b')"]);
}

#[test]
fn a_stamp_far_ahead_of_every_clock_is_parked_without_dragging_the_clock() {
    let mut t = MemTxn::over(&db(), 2, 1);
    let mut c = clock();
    let far = T0 + MAX_STAMP_LEAD_MS + 60_000;
    let r = apply(
        &mut t,
        &mut c,
        0,
        &deliver(1, &batch(1, 1, far, &[(1, Some("future"))])),
    );
    assert_eq!(r.parked.len(), 1);
    assert!(
        r.parked[0].reason.contains("ahead"),
        "{}",
        r.parked[0].reason
    );
    assert!(c.high_water().wall_ms() < far);
    assert!(t.rows("t").is_empty());
}

#[test]
fn chunks_wait_until_the_batch_is_complete_then_it_applies_once() {
    let rows: Vec<(i64, Option<&str>)> =
        (0..40).map(|i| (i, Some("a row with some text"))).collect();
    let msgs = batch_in(1, 1, T0, "t", &["id", "v"], &rows, 64);
    assert!(msgs.len() > 2, "split into {} messages", msgs.len());
    let ds = deliver(1, &msgs);
    let mut t = MemTxn::over(&db(), 2, 1);
    let mut c = clock();
    let (first, rest) = ds.split_at(1);
    let r = apply(&mut t, &mut c, 0, first);
    assert_eq!((r.chunks_stashed, r.batches), (1, 0));
    assert!(t.rows("t").is_empty());
    let r = apply(&mut t, &mut c, 1, rest);
    assert_eq!(r.batches, 1);
    assert_eq!(t.rows("t").len(), 40);
}

#[test]
fn an_identical_row_from_a_concurrent_writer_is_not_a_conflict() {
    let mut t = MemTxn::over(&db(), 2, 1);
    let mut c = clock();
    apply(
        &mut t,
        &mut c,
        0,
        &deliver(1, &batch(1, 1, T0, &[(1, Some("same"))])),
    );
    apply(
        &mut t,
        &mut c,
        1,
        &deliver(2, &batch(3, 1, T0 + 5, &[(1, Some("same"))])),
    );
    assert_eq!(t.counts().2, 0);
}

#[test]
fn the_report_counts_rows_written_and_conflicts_per_table() {
    let mut t = MemTxn::over(&db(), 2, 1);
    let mut c = clock();
    let r = apply(
        &mut t,
        &mut c,
        0,
        &deliver(1, &batch(1, 1, T0, &[(1, Some("a")), (2, Some("b"))])),
    );
    assert_eq!(
        r.tables.get("t"),
        Some(&TableApplied {
            written: 2,
            conflicts: 0
        })
    );
    // A concurrent write of row 1 (no base) with other content, older: loses, a conflict.
    let r = apply(
        &mut t,
        &mut c,
        1,
        &deliver(2, &batch(3, 1, T0 - 5, &[(1, Some("other"))])),
    );
    assert_eq!(
        r.tables.get("t"),
        Some(&TableApplied {
            written: 0,
            conflicts: 1
        })
    );
    assert_eq!(r.conflicts, 1);
}
