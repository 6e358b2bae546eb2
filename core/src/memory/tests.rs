//! The in-memory storage against the storage conformance body, and node sequences on the
//! harness: capture and apply across nodes, concurrent writes, outages, restores from a
//! snapshot, shutdowns and crashes, each in a few milliseconds.

use super::conformance::{StorageSubject, storage_conformance};
use super::harness::Cluster;
use super::*;
use crate::hlc::NodeId;
use crate::node::{Event, NodeConfig, SnapshotPolicy, Stop};
use crate::ports::Storage;
use crate::snapshot::StagedSnapshot;
use crate::value::Value;
use std::time::Duration;

struct Memory {
    store: MemorySnapshotStore,
}

impl StorageSubject for Memory {
    type S = MemoryStorage;
    fn open(&mut self, node: NodeId) -> MemoryStorage {
        let s = MemoryStorage::new(node, self.store.clone());
        s.app().create_table("t", &["id", "v"], 1);
        s
    }
    fn reopen(&mut self, s: MemoryStorage) -> MemoryStorage {
        s.reopen()
    }
    fn write(&mut self, s: &mut MemoryStorage, upserts: &[(i64, &str)], deletes: &[i64]) {
        let app = s.app();
        for (id, v) in upserts {
            app.upsert("t", vec![Value::Integer(*id), text(v)]);
        }
        for id in deletes {
            app.delete("t", vec![Value::Integer(*id)]);
        }
    }
    fn rows(&mut self, s: &mut MemoryStorage) -> Vec<(i64, String)> {
        s.app()
            .values("t")
            .into_iter()
            .map(|r| match (&r[0], &r[1]) {
                (Value::Integer(i), Value::Text(t)) => (*i, String::from_utf8_lossy(t).into()),
                other => panic!("a row of t: {other:?}"),
            })
            .collect()
    }
    fn snapshot(&mut self, from: &mut MemoryStorage, _into: &mut MemoryStorage) -> StagedSnapshot {
        let position = from.recover().unwrap().position;
        let info = self.store.save(&from.app(), 0, position);
        self.store.stage(&info)
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.as_bytes().to_vec())
}

#[test]
fn the_in_memory_storage_passes_the_storage_conformance_body() {
    storage_conformance(&mut Memory {
        store: MemorySnapshotStore::default(),
    });
}

const T: &[(&str, &[&str], usize)] = &[("t", &["id", "v"], 1)];

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn write(c: &mut Cluster, i: usize, id: i64, v: &str) {
    c.members[i]
        .app
        .upsert("t", vec![Value::Integer(id), text(v)]);
    c.hint(i);
}

fn events(c: &Cluster, i: usize, pick: impl Fn(&Event) -> bool) -> usize {
    c.members[i].events.iter().filter(|(_, e)| pick(e)).count()
}

#[test]
fn a_write_reaches_every_node_within_a_few_round_trips() {
    let mut c = Cluster::new(3, T, |_| {});
    c.start_all();
    c.run_for(ms(50));
    let t0 = c.now;
    write(&mut c, 0, 1, "a");
    assert!(c.settle("t", ms(100)), "converged");
    assert!(c.now - t0 < ms(20), "took {:?}", c.now - t0);
    for m in &c.members {
        assert_eq!(m.app.rows("t"), vec!["(1, 'a')"]);
    }
}

#[test]
fn concurrent_writes_to_one_row_converge_to_the_newest_everywhere() {
    let mut c = Cluster::new(3, T, |_| {});
    c.members[1].skew_ms = 500;
    c.start_all();
    c.run_for(ms(50));
    write(&mut c, 0, 7, "older");
    write(&mut c, 1, 7, "newer");
    assert!(c.settle("t", ms(1000)));
    for m in &c.members {
        assert_eq!(m.app.rows("t"), vec!["(7, 'newer')"]);
    }
    // Node 1 saw its own write lose to a concurrent one.
    assert_eq!(c.members[0].app.conflicts().len(), 1);
}

#[test]
fn publishes_are_retried_through_an_outage_and_nothing_is_lost() {
    let mut c = Cluster::new(2, T, |_| {});
    c.start_all();
    c.run_for(ms(50));
    c.stream.set_down(true);
    for i in 0..20 {
        write(&mut c, (i % 2) as usize, i, "during the outage");
    }
    c.run_for(ms(3000));
    assert!(events(&c, 0, |e| matches!(e, Event::PublishFailed { .. })) > 0);
    assert!(c.members[0].node.status().outbox_batches > 0, "kept");
    c.stream.set_down(false);
    assert!(c.settle("t", ms(10_000)));
    assert_eq!(c.members[1].app.rows("t").len(), 20);
}

#[test]
fn a_node_cut_off_keeps_its_writes_and_a_later_delete_elsewhere_still_wins() {
    let mut c = Cluster::new(2, T, |_| {});
    c.start_all();
    write(&mut c, 0, 1, "first");
    assert!(c.settle("t", ms(1000)));
    // Node 1 writes while cut off; node 2 deletes the row a second later.
    c.members[0].cut = true;
    write(&mut c, 0, 1, "while cut off");
    c.run_for(ms(1000));
    c.members[1].app.delete("t", vec![Value::Integer(1)]);
    c.hint(1);
    c.run_for(ms(1000));
    c.members[0].cut = false;
    assert!(c.settle("t", ms(10_000)));
    assert!(
        c.members[0].app.rows("t").is_empty(),
        "the newer delete wins"
    );
}

fn snapshots_every(changes: u64) -> impl Fn(&mut NodeConfig) {
    move |cfg: &mut NodeConfig| {
        cfg.snapshots = Some(SnapshotPolicy {
            every_changes: changes,
            interval: None,
            restore_empty: true,
        });
        cfg.fit_to_retention(40);
    }
}

#[test]
fn a_new_node_restores_a_snapshot_whole_then_follows_the_stream() {
    let mut c = Cluster::new(2, T, snapshots_every(10))
        .with_stream(MemoryStream::new().with_max_messages(40));
    c.start_all();
    for id in 0..100 {
        write(&mut c, (id % 2) as usize, id, "x");
        c.run_for(ms(5));
    }
    assert!(c.settle("t", ms(10_000)));
    assert!(!c.snapshots.is_empty(), "snapshots were taken");
    assert!(
        c.stream.bounds().first_seq > 1,
        "the stream dropped its start"
    );
    let new = c.add_member();
    c.start(new);
    write(&mut c, 0, 1000, "after the new node started");
    assert!(c.settle("t", ms(10_000)));
    assert_eq!(c.members[new].app.rows("t").len(), 101);
    assert!(
        c.members[new]
            .events
            .iter()
            .any(|(_, e)| matches!(e, Event::Restored { merged: false, .. }))
    );
}

#[test]
fn a_node_that_fell_behind_the_stream_merges_a_snapshot_and_keeps_its_own_writes() {
    let mut c = Cluster::new(2, T, snapshots_every(10))
        .with_stream(MemoryStream::new().with_max_messages(40));
    c.start_all();
    write(&mut c, 1, 1, "seen by both");
    assert!(c.settle("t", ms(1000)));
    c.crash(1);
    // Written while node 2 is down, and more than the stream keeps.
    for id in 100..200 {
        write(&mut c, 0, id, "while node 2 was down");
        c.run_for(ms(5));
    }
    c.members[1]
        .app
        .upsert("t", vec![Value::Integer(2), text("node 2's own")]);
    c.restart(1);
    assert!(c.settle("t", ms(20_000)));
    let rows = c.members[1].app.rows("t");
    assert_eq!(rows.len(), 102, "{rows:?}");
    assert!(rows.contains(&"(2, 'node 2''s own')".to_string()));
    assert_eq!(c.members[0].app.rows("t"), rows);
    assert!(events(&c, 1, |e| matches!(e, Event::Behind { .. })) > 0);
    assert!(
        c.members[1]
            .events
            .iter()
            .any(|(_, e)| matches!(e, Event::Restored { merged: true, .. }))
    );
}

#[test]
fn a_shutdown_publishes_what_is_pending_then_stops() {
    let mut c = Cluster::new(2, T, |_| {});
    c.start_all();
    c.run_for(ms(50));
    write(&mut c, 0, 1, "just before stopping");
    c.shutdown(0);
    c.run_until(ms(1000), |c| c.members[0].stopped.is_some());
    assert_eq!(
        c.members[0].stopped,
        Some(Stop::Shutdown { unpublished: 0 }),
        "{:#?}",
        c.members[0].events
    );
    c.run_for(ms(100));
    assert_eq!(
        c.members[1].app.rows("t"),
        vec!["(1, 'just before stopping')"]
    );
}

#[test]
fn a_shutdown_that_cannot_publish_stops_at_the_grace_and_the_next_start_publishes() {
    let mut c = Cluster::new(2, T, |_| {});
    c.start_all();
    c.run_for(ms(50));
    c.members[0].cut = true;
    write(&mut c, 0, 1, "kept for the next start");
    c.run_for(ms(10));
    let asked = c.now;
    c.shutdown(0);
    c.run_until(ms(60_000), |c| c.members[0].stopped.is_some());
    assert_eq!(
        c.members[0].stopped,
        Some(Stop::Shutdown { unpublished: 1 })
    );
    assert!(c.now - asked >= Duration::from_secs(10), "the grace period");
    c.members[0].cut = false;
    c.restart(0);
    assert!(c.settle("t", ms(10_000)));
    assert_eq!(
        c.members[1].app.rows("t"),
        vec!["(1, 'kept for the next start')"]
    );
}

#[test]
fn a_crash_before_the_acknowledgement_publishes_again_with_the_same_ids() {
    let mut c = Cluster::new(2, T, |_| {});
    c.start_all();
    c.run_for(ms(50));
    let last = c.stream.bounds().last_seq;
    write(&mut c, 0, 1, "once");
    // The capture and the publish happen at once; the acknowledgement is on its way.
    assert_eq!(c.stream.bounds().last_seq, last + 1);
    c.crash(0);
    c.restart(0);
    assert!(c.settle("t", ms(10_000)));
    assert_eq!(c.stream.bounds().last_seq, last + 1, "stored once");
    assert_eq!(c.members[1].app.rows("t"), vec!["(1, 'once')"]);
}

#[test]
fn a_node_with_a_clock_far_ahead_stamps_nothing_until_it_is_back() {
    let mut c = Cluster::new(2, T, |_| {});
    c.members[0].skew_ms = 60_000;
    c.start_all();
    write(&mut c, 0, 1, "written while the clock was ahead");
    c.run_for(ms(6000));
    assert!(c.members[0].node.status().clock_paused);
    assert!(
        c.members[1].app.rows("t").is_empty(),
        "nothing stamped, nothing sent"
    );
    c.members[0].skew_ms = 0;
    assert!(c.settle("t", ms(20_000)));
    assert_eq!(c.members[1].app.rows("t").len(), 1);
}

#[test]
fn the_drive_loop_runs_a_node_over_the_in_memory_ports() {
    // The same as the module's example, with snapshots on: a drive loop, not the harness.
    use crate::drive::{self, Control, Observer};
    struct Quiet;
    impl Observer for Quiet {
        fn event(&mut self, _: Duration, _: &Event) {}
    }
    let time = VirtualTime::default();
    let stream = MemoryStream::new().with_time(time.clone());
    let store = MemorySnapshotStore::default();
    let mut one = MemoryStorage::new(1, store.clone());
    one.app().create_table("t", &["id", "v"], 1);
    one.app().upsert("t", vec![Value::Integer(1), text("x")]);
    let mut cfg = NodeConfig::new(1, "db-1");
    cfg.snapshots = Some(SnapshotPolicy {
        every_changes: 1,
        interval: None,
        restore_empty: true,
    });
    let mut node = crate::node::Node::new(cfg);
    let snapshots = std::sync::Arc::new(MemorySnapshots::new(store.clone(), one.app(), 1));
    let stop = futures::executor::block_on(drive::run(
        &mut node,
        &mut one,
        std::sync::Arc::new(MemoryTransport::new(stream.clone())),
        snapshots,
        &time,
        &mut Quiet,
        std::pin::pin!(futures::stream::pending()),
        std::pin::pin!(futures::stream::iter([Control::Shutdown])),
    ));
    assert_eq!(stop, Stop::Shutdown { unpublished: 0 });
    assert_eq!(stream.bounds().last_seq, 1);
}

#[test]
fn a_node_id_in_use_stops_the_second_node_until_the_first_ones_claim_expires() {
    // Member 3 is misconfigured with member 1's node id.
    let n = std::cell::Cell::new(0);
    let mut c = Cluster::new(3, T, move |cfg| {
        n.set(n.get() + 1);
        if n.get() == 3 {
            cfg.node_id = 1;
            cfg.owner = "another database".into();
        }
    });
    c.start(0);
    c.run_for(ms(50));
    c.start(2);
    c.run_for(ms(50));
    assert_eq!(
        c.members[2].stopped,
        Some(Stop::NodeIdInUse {
            holder: "memory-db-1".into()
        })
    );
    // Member 1 dies; its claim is not renewed and expires (15 s); then the id is free.
    c.crash(0);
    c.run_for(Duration::from_secs(16));
    c.restart(2);
    c.run_for(ms(50));
    assert_eq!(c.members[2].stopped, None);
    assert!(c.members[2].node.status().claimed);
}
