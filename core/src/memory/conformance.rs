//! The storage conformance body: what every [`Storage`] must do, as one executable
//! specification. It runs against [`super::MemoryStorage`] (the core's tests) and against the
//! SQLite adapter (its tests); an adapter for another database runs it too. It panics at the
//! first call that does not do what the port promises.
//!
//! The transport's counterpart is `sim::conformance`, which runs against the simulated
//! broker and a real nats-server.

use crate::apply::Delivery;
use crate::capture::Captured;
use crate::hlc::{Clock, NodeId, Stamp};
use crate::ports::Storage;
use crate::snapshot::StagedSnapshot;
use bytes::Bytes;
use std::fmt::Debug;

/// A database under test, holding one table `t(id INTEGER PRIMARY KEY, v TEXT)`.
pub trait StorageSubject {
    /// The storage under test.
    type S: Storage<Error: Debug>;
    /// A new, empty database of node `node`.
    fn open(&mut self, node: NodeId) -> Self::S;
    /// The same database opened again, as after a restart.
    fn reopen(&mut self, s: Self::S) -> Self::S;
    /// An application commits these upserts `(id, v)` and deletes `id` in one transaction.
    fn write(&mut self, s: &mut Self::S, upserts: &[(i64, &str)], deletes: &[i64]);
    /// The rows of `t`, in id order.
    fn rows(&mut self, s: &mut Self::S) -> Vec<(i64, String)>;
    /// A snapshot of `from` (at the position it recorded), staged for `into`.
    fn snapshot(&mut self, from: &mut Self::S, into: &mut Self::S) -> StagedSnapshot;
}

/// Wall-clock times the body stamps with (ms since the Unix epoch).
const T0: u64 = 1_700_000_000_000;

/// Deliveries of `messages` from stream sequence `first_seq` on, as a stream hands them over.
pub fn deliveries(first_seq: u64, messages: &[Bytes]) -> Vec<Delivery> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| Delivery {
            stream_seq: first_seq + i as u64,
            payload: m.clone(),
            published_ms: T0,
            pending: 0,
        })
        .collect()
}

fn captured<S: Storage<Error: Debug>>(s: &mut S, clock: &mut Clock, wall: u64) -> Captured {
    s.capture(clock, wall)
        .expect("capture")
        .captured
        .expect("a batch of the writes")
}

/// Runs every check against `x`.
pub fn storage_conformance<X: StorageSubject>(x: &mut X) {
    let owned = |rows: &[(i64, &str)]| -> Vec<(i64, String)> {
        rows.iter().map(|(i, v)| (*i, v.to_string())).collect()
    };

    // A new database: nothing applied, nothing captured, nothing parked, empty.
    let mut a = x.open(1);
    let r = a.recover().expect("recover");
    assert_eq!(r.position, 0);
    assert!(r.empty, "a new database is empty");
    assert!(r.outbox.is_empty());
    assert_eq!((r.parked, r.incomplete_batches), (0, 0));
    let first_incarnation = r.incarnation;
    let mut ca = Clock::new(r.clock);

    // Nothing written: nothing captured.
    let out = a.capture(&mut ca, T0).expect("capture");
    assert!(out.captured.is_none(), "nothing was written");

    // One application transaction: one batch, in the outbox until marked published.
    x.write(&mut a, &[(1, "a"), (2, "b")], &[]);
    let b1 = captured(&mut a, &mut ca, T0 + 1_000);
    assert_eq!(b1.rows, 2);
    assert_eq!(b1.batch.origin, 1);
    assert!(
        b1.stamp.wall_ms() >= T0 + 1_000,
        "stamped with the wall time given"
    );
    assert!(!b1.messages.is_empty());
    let m0 = a
        .outbox_message(b1.batch, 0)
        .expect("outbox")
        .expect("held");
    assert_eq!(m0, b1.messages[0]);
    assert!(
        a.capture(&mut ca, T0 + 1_001)
            .expect("capture")
            .captured
            .is_none(),
        "captured once"
    );

    // A restart: the batch is still in the outbox; the database has a new incarnation and
    // keeps its clock.
    let mut a = x.reopen(a);
    let r = a.recover().expect("recover");
    assert_eq!(r.outbox, vec![(b1.batch, b1.messages.len() as u32)]);
    assert_ne!(
        r.incarnation, first_incarnation,
        "every start is a new incarnation"
    );
    assert!(!r.empty);
    assert!(r.clock >= b1.stamp, "the clock's high-water mark survives");
    let mut ca = Clock::new(r.clock);
    a.mark_published(b1.batch).expect("mark published");
    assert!(a.outbox_message(b1.batch, 0).expect("outbox").is_none());
    assert!(a.recover().expect("recover").outbox.is_empty());

    // Another node applies the batch: same rows, the position recorded with them.
    let mut b = x.open(2);
    let rb = b.recover().expect("recover");
    let mut cb = Clock::new(rb.clock);
    let d1 = deliveries(1, &b1.messages);
    let last1 = d1.last().expect("a message").stream_seq;
    let out = b.apply(&mut cb, T0 + 2_000, &d1).expect("apply");
    assert_eq!(out.report.batches, 1);
    assert_eq!(out.report.through_seq, last1);
    assert!(out.captured.is_none());
    assert_eq!(x.rows(&mut b), owned(&[(1, "a"), (2, "b")]));
    assert_eq!(b.recover().expect("recover").position, last1);
    assert!(cb.high_water() >= b1.stamp, "stamps seen move the clock");
    // Delivered again: nothing changes, the position stays.
    let out = b.apply(&mut cb, T0 + 2_001, &d1).expect("apply");
    assert_eq!((out.report.batches, out.report.rows_written), (0, 0));
    assert_eq!(b.recover().expect("recover").position, last1);

    // Its own batch, delivered to the node that captured it: passed over.
    let out = a.apply(&mut ca, T0 + 2_002, &d1).expect("apply");
    assert_eq!(out.report.own_messages, d1.len() as u64);
    assert_eq!(out.report.rows_written, 0);

    // A delete replicates as a tombstone.
    x.write(&mut a, &[], &[1]);
    let b2 = captured(&mut a, &mut ca, T0 + 3_000);
    assert_eq!(b2.rows, 1);
    let d2 = deliveries(last1 + 1, &b2.messages);
    let last2 = d2.last().expect("a message").stream_seq;
    b.apply(&mut cb, T0 + 3_001, &d2).expect("apply");
    assert_eq!(x.rows(&mut b), owned(&[(2, "b")]));

    // A local write not captured yet is stamped before any remote row is compared with it:
    // a remote write stamped earlier does not overwrite it, and the apply reports it.
    x.write(&mut a, &[(2, "remote, older")], &[]);
    let b3 = captured(&mut a, &mut ca, T0 + 4_000);
    x.write(&mut b, &[(2, "local, newer")], &[]);
    let d3 = deliveries(last2 + 1, &b3.messages);
    let last3 = d3.last().expect("a message").stream_seq;
    let out = b.apply(&mut cb, T0 + 5_000, &d3).expect("apply");
    let local = out.captured.expect("the local write captured first");
    assert!(local.stamp > b3.stamp);
    assert_eq!(out.report.rows_skipped, 1, "{:?}", out.report);
    assert_eq!(x.rows(&mut b), owned(&[(2, "local, newer")]));
    assert_eq!(out.report.through_seq, last3);

    // A message nobody can read is parked, with everything else going on.
    let junk = Delivery {
        stream_seq: last3 + 1,
        payload: Bytes::from_static(b"\xffnot a marmot message"),
        published_ms: T0,
        pending: 0,
    };
    let out = b.apply(&mut cb, T0 + 6_000, &[junk]).expect("apply");
    assert_eq!(out.report.parked.len(), 1);
    assert_eq!(out.report.through_seq, last3 + 1, "the position passes it");
    assert_eq!(b.recover().expect("recover").parked, 1);
    let retry = b.retry_parked(&mut cb, T0 + 6_001, true).expect("retry");
    assert_eq!((retry.attempted, retry.applied, retry.remaining), (1, 0, 1));
    let retry = b.retry_parked(&mut cb, T0 + 6_002, false).expect("retry");
    assert_eq!(retry.attempted, 0, "nobody asked for a retry");

    // A new, empty node takes a snapshot whole: the rows and the position.
    let mut c = x.open(3);
    let rc = c.recover().expect("recover");
    assert!(rc.empty);
    let mut cc = Clock::new(Stamp::ZERO);
    let staged = x.snapshot(&mut b, &mut c);
    let rep = c.restore(&mut cc, T0 + 7_000, &staged).expect("restore");
    assert!(!rep.merged, "an empty database takes it whole");
    assert_eq!(rep.position, last3 + 1);
    assert_eq!(x.rows(&mut c), x.rows(&mut b));
    let rc = c.recover().expect("recover");
    assert_eq!(rc.position, last3 + 1);
    assert!(!rc.empty);
    // The snapshot's parked batch comes along (the stream may no longer hold it), and its
    // clock is merged: the restored node never stamps below what it now holds.
    assert_eq!(rc.parked, 1, "the snapshot's parked batch");
    assert!(
        cc.high_water() >= local.stamp,
        "the snapshot's clock is merged"
    );
    assert!(rc.clock >= local.stamp, "and saved");

    // A node with content merges it: its own pending write is captured first and survives,
    // the snapshot's rows arrive.
    let mut d = x.open(4);
    let rd = d.recover().expect("recover");
    let mut cd = Clock::new(rd.clock);
    x.write(&mut d, &[(9, "mine")], &[]);
    let staged = x.snapshot(&mut b, &mut d);
    let rep = d.restore(&mut cd, T0 + 8_000, &staged).expect("restore");
    assert!(rep.merged, "a database with content merges");
    assert!(
        rep.captured.is_some(),
        "its pending write was captured first"
    );
    assert_eq!(rep.position, last3 + 1);
    assert_eq!(x.rows(&mut d), owned(&[(2, "local, newer"), (9, "mine")]));
    assert_eq!(
        d.recover().expect("recover").parked,
        1,
        "the snapshot's parked batch"
    );
    assert!(
        cd.high_water() >= local.stamp,
        "the snapshot's clock is merged"
    );
}
