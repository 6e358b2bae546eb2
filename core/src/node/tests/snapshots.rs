//! Snapshots: joining from one, taking them, restoring when behind.

use super::*;

#[test]
fn a_new_node_starts_from_the_newest_snapshot_then_reads_the_stream_after_it() {
    let mut n = snapshot_node(0);
    let mut r = recovered(0, vec![]);
    r.empty = true;
    n.handle(ms(0), Input::Recovered(r));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 500,
        })),
    );
    assert!(
        !has(&drain(&mut n), |o| matches!(
            o,
            Output::FetchSnapshot { .. }
        )),
        "a restore may stamp (a merge captures first): not before the clock was checked"
    );
    clock_checked(&mut n, ms(0));
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(
        o,
        Output::FetchSnapshot { min_position: 0 }
    )));
    assert!(
        !has(&outs, |o| matches!(o, Output::Subscribe { .. })),
        "not before the restore"
    );
    n.handle(
        ms(5),
        Input::SnapshotFetched(Ok(Fetched {
            staged: Some(staged(420)),
            rejected: vec![],
        })),
    );
    assert!(has(
        &drain(&mut n),
        |o| matches!(o, Output::RestoreSnapshot(s) if s.info.position == 420)
    ));
    n.handle(ms(6), restored(420));
    let outs = drain(&mut n);
    assert!(
        has(&outs, |o| matches!(
            o,
            Output::Subscribe { from_seq: 421, .. }
        )),
        "{outs:?}"
    );
    assert_eq!(n.status().position, 420);
}

#[test]
fn a_receive_only_node_never_takes_snapshots() {
    let mut cfg = NodeConfig::new(1, "db-a");
    cfg.publish = false;
    cfg.snapshots = Some(SnapshotPolicy {
        every_changes: 1,
        interval: Some(Duration::from_secs(1)),
        restore_empty: true,
    });
    let (mut n, outs) = ready_configured_receive_only(cfg);
    assert!(!has(&outs, |o| matches!(o, Output::SaveSnapshot { .. })));
    n.handle(ms(1), subscribed(1, 1, 1));
    n.handle(
        ms(1),
        Input::Delivered {
            generation: 1,
            deliveries: vec![delivery(1)],
        },
    );
    drain(&mut n);
    n.handle(
        ms(2),
        Input::Applied {
            result: Ok(ApplyOutcome {
                report: ApplyReport {
                    through_seq: 1,
                    rows_written: 50,
                    ..ApplyReport::default()
                },
                ..ApplyOutcome::default()
            }),
            deliveries: vec![delivery(1)],
            wall_ms: 2,
        },
    );
    n.handle(ms(5_000), Input::Tick);
    assert!(!has(&drain(&mut n), |o| matches!(
        o,
        Output::SaveSnapshot { .. }
    )));
    assert!(n.poll_timeout() > ms(5_001));
}

#[test]
fn a_new_node_without_any_snapshot_reads_the_whole_stream() {
    let mut n = snapshot_node(0);
    let mut r = recovered(0, vec![]);
    r.empty = true;
    n.handle(ms(0), Input::Recovered(r));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 5,
        })),
    );
    clock_checked(&mut n, ms(0));
    drain(&mut n);
    n.handle(
        ms(1),
        Input::SnapshotFetched(Ok(Fetched {
            staged: None,
            rejected: vec![],
        })),
    );
    assert!(has(&drain(&mut n), |o| matches!(
        o,
        Output::Subscribe { from_seq: 1, .. }
    )));
}

#[test]
fn a_node_behind_the_stream_restores_and_carries_on() {
    let mut cfg = NodeConfig::new(1, "db-a");
    cfg.snapshots = Some(SnapshotPolicy {
        every_changes: 0,
        interval: None,
        restore_empty: true,
    });
    let mut n = Node::new(cfg);
    n.handle(ms(0), Input::Recovered(recovered(10, vec![])));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 100,
            last_seq: 200,
        })),
    );
    clock_checked(&mut n, ms(0));
    drain(&mut n);
    n.handle(ms(1), subscribed(1, 100, 200));
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(
        o,
        Output::Event(Event::Behind { .. })
    )));
    assert!(has(&outs, |o| matches!(
        o,
        Output::FetchSnapshot { min_position: 99 }
    )));
    // A corrupt newest snapshot is reported and skipped; the next one is used.
    let rejected = vec![crate::snapshot::SnapshotError::Corrupt {
        object: "snapshot-new".into(),
        detail: "checksum".into(),
    }];
    n.handle(
        ms(2),
        Input::SnapshotFetched(Ok(Fetched {
            staged: Some(staged(150)),
            rejected,
        })),
    );
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(
        o,
        Output::Event(Event::SnapshotRejected { .. })
    )));
    assert!(has(&outs, |o| matches!(o, Output::RestoreSnapshot(_))));
    n.handle(ms(3), restored(150));
    let outs = drain(&mut n);
    assert!(!n.status().behind);
    assert!(has(&outs, |o| matches!(
        o,
        Output::Subscribe { from_seq: 151, .. }
    )));
}

#[test]
fn a_node_still_behind_after_a_restore_waits_for_a_snapshot_that_covers_the_gap() {
    let mut cfg = NodeConfig::new(1, "db-a");
    cfg.alarm_interval = Duration::from_secs(2);
    cfg.snapshots = Some(SnapshotPolicy {
        every_changes: 0,
        interval: None,
        restore_empty: true,
    });
    let mut n = Node::new(cfg);
    n.handle(ms(0), Input::Recovered(recovered(10, vec![])));
    let bounds = StreamBounds {
        first_seq: 300,
        last_seq: 400,
    };
    n.handle(ms(0), Input::Prepared(Ok(bounds)));
    clock_checked(&mut n, ms(0));
    drain(&mut n);
    n.handle(
        ms(1),
        Input::Subscribed {
            generation: 1,
            result: Ok(bounds),
        },
    );
    // Messages up to 299 are gone: only a snapshot at 299 or later helps.
    assert!(has(&drain(&mut n), |o| matches!(
        o,
        Output::FetchSnapshot { min_position: 299 }
    )));
    n.handle(
        ms(2),
        Input::SnapshotFetched(Ok(Fetched {
            staged: Some(staged(320)),
            rejected: vec![],
        })),
    );
    drain(&mut n);
    n.handle(ms(3), restored(320));
    let outs = drain(&mut n);
    let generation = outs
        .iter()
        .find_map(|o| match o {
            Output::Subscribe { generation, .. } => Some(*generation),
            _ => None,
        })
        .expect("subscribes after the restore");
    // Meanwhile the stream moved on past the snapshot.
    n.handle(
        ms(4),
        Input::Subscribed {
            generation,
            result: Ok(StreamBounds {
                first_seq: 500,
                last_seq: 600,
            }),
        },
    );
    let outs = drain(&mut n);
    assert!(
        has(&outs, |o| matches!(
            o,
            Output::FetchSnapshot { min_position: 499 }
        )),
        "only a snapshot past the new gap is of use: {outs:?}"
    );
    n.handle(
        ms(5),
        Input::SnapshotFetched(Ok(Fetched {
            staged: None,
            rejected: vec![],
        })),
    );
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(
        o,
        Output::Event(Event::NoSnapshot {
            reason: RestoreReason::Behind
        })
    )));
    // No spinning: nothing is fetched again before the alarm interval.
    n.handle(ms(1000), Input::Tick);
    assert!(!has(&drain(&mut n), |o| matches!(
        o,
        Output::FetchSnapshot { .. }
    )));
    assert!(n.poll_timeout() <= ms(2005));
    n.handle(ms(2005), Input::Tick);
    assert!(has(&drain(&mut n), |o| matches!(
        o,
        Output::FetchSnapshot { min_position: 499 }
    )));
}

#[test]
fn a_snapshot_is_due_after_enough_changes() {
    let mut n = snapshot_node(100);
    n.handle(ms(0), Input::Recovered(recovered(0, vec![])));
    n.handle(
        ms(0),
        // The stream has a history: no seed snapshot.
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 5,
        })),
    );
    n.handle(
        ms(0),
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 1000,
                revision: 1,
            }),
            sent_wall_ms: 1000,
            received_wall_ms: 1000,
        },
    );
    drain(&mut n);
    let mut c = captured(1, 1);
    c.rows = 60;
    n.handle(
        ms(1),
        Input::Captured(Ok(CaptureOutcome {
            captured: Some(c),
            schema_changed: false,
            unparked: 0,
        })),
    );
    assert!(!has(&drain(&mut n), |o| matches!(
        o,
        Output::SaveSnapshot { .. }
    )));
    let mut c = captured(2, 1);
    c.rows = 60;
    n.handle(
        ms(2),
        Input::Captured(Ok(CaptureOutcome {
            captured: Some(c),
            schema_changed: false,
            unparked: 0,
        })),
    );
    assert!(has(&drain(&mut n), |o| matches!(
        o,
        Output::SaveSnapshot { .. }
    )));
    n.handle(
        ms(3),
        Input::SnapshotSaved(Ok(SaveOutcome::Busy { by: "other".into() })),
    );
    assert!(
        !has(&drain(&mut n), |o| matches!(o, Output::SaveSnapshot { .. })),
        "not again right away"
    );
}

/// Rows written while a save runs are not in its copy: they count towards the next save.
/// (A node that forgot them left the newest snapshot further behind the head than the
/// stream keeps, and a node down longer than the retention found no snapshot to restore.)
#[test]
fn rows_written_during_a_save_count_towards_the_next_one() {
    let mut n = snapshot_node(100);
    started(&mut n, false, 0, 5);
    drain(&mut n);
    let capture = |n: &mut Node, t: u64, seq: u64, rows: u64| {
        let mut c = captured(seq, 1);
        c.rows = rows;
        n.handle(
            ms(t),
            Input::Captured(Ok(CaptureOutcome {
                captured: Some(c),
                schema_changed: false,
                unparked: 0,
            })),
        );
        saves(&drain(n))
    };
    assert_eq!(capture(&mut n, 1, 1, 100), vec![false], "due at 100 rows");
    // 80 rows while the save runs, then it completes.
    assert!(capture(&mut n, 2, 2, 80).is_empty(), "one save at a time");
    n.handle(
        ms(3),
        Input::SnapshotSaved(Ok(SaveOutcome::Saved(staged(100).info))),
    );
    assert!(saves(&drain(&mut n)).is_empty());
    // 20 more make 100 since the save began.
    assert_eq!(capture(&mut n, 4, 3, 20), vec![false]);
}

/// A snapshot is a copy of the file: it must not carry writes no batch carries yet (the node
/// that restores it would hold them unversioned before their origin published them).
#[test]
fn a_snapshot_waits_for_a_sane_clock_and_for_pending_writes_to_be_captured() {
    let mut cfg = NodeConfig::new(1, "db-a");
    cfg.snapshots = Some(SnapshotPolicy {
        every_changes: 0,
        interval: Some(Duration::from_secs(1)),
        restore_empty: true,
    });
    let mut n = Node::new(cfg);
    n.handle(ms(0), Input::Recovered(recovered(0, vec![])));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 0,
        })),
    );
    let bound = n.config().max_clock_skew_ms;
    // Claimed, but the clock is ahead: capture is paused, so no snapshot either.
    n.handle(
        ms(1),
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 1_000_000,
                revision: 1,
            }),
            sent_wall_ms: 1_000_000 + bound + 1000,
            received_wall_ms: 1_000_000 + bound + 1000,
        },
    );
    n.handle(ms(5_000), Input::Tick);
    assert!(n.status().clock_paused);
    assert!(!has(&drain(&mut n), |o| matches!(
        o,
        Output::SaveSnapshot { .. }
    )));
    // The clock comes back: the pending writes are captured first, then the snapshot (the
    // drive loop performs outputs in order, and a capture before it starts the copy).
    n.handle(ms(5_001), Input::LocalChange);
    clock_checked(&mut n, ms(5_001));
    let outs = drain(&mut n);
    let capture = outs.iter().position(|o| matches!(o, Output::Capture));
    let save = outs
        .iter()
        .position(|o| matches!(o, Output::SaveSnapshot { .. }));
    assert!(
        matches!((capture, save), (Some(c), Some(s)) if c < s),
        "capture before the copy: {outs:?}"
    );
}

/// A writer that never pauses keeps capture busy: snapshots are still taken.
#[test]
fn a_snapshot_is_taken_while_writes_keep_coming() {
    let mut cfg = NodeConfig::new(1, "db-a");
    cfg.snapshots = Some(SnapshotPolicy {
        every_changes: 0,
        interval: Some(Duration::from_secs(1)),
        restore_empty: true,
    });
    let mut n = Node::new(cfg);
    n.handle(ms(0), Input::Recovered(recovered(0, vec![])));
    n.handle(
        ms(0),
        // The stream has a history: no seed snapshot.
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 5,
        })),
    );
    clock_checked(&mut n, ms(0));
    drain(&mut n);
    // Every capture sees another commit's hint arrive while it runs.
    n.handle(ms(1), Input::LocalChange);
    let mut outs = drain(&mut n);
    let mut saved = false;
    for t in 1..3_000u64 {
        saved |= has(&outs, |o| matches!(o, Output::SaveSnapshot { .. }));
        if has(&outs, |o| matches!(o, Output::Capture)) {
            n.handle(ms(t), Input::LocalChange);
            n.handle(
                ms(t),
                Input::Captured(Ok(CaptureOutcome {
                    captured: None,
                    schema_changed: false,
                    unparked: 0,
                })),
            );
        } else {
            n.handle(ms(t), Input::LocalChange);
        }
        outs = drain(&mut n);
    }
    assert!(saved, "no snapshot in 3 s of constant writes");
}

/// Starts `n` on a database that is `empty` or not, with `position` applied, on a stream
/// holding messages up to `last_seq`, and checks the clock.
fn started(n: &mut Node, empty: bool, position: u64, last_seq: u64) -> Vec<Output> {
    let mut r = recovered(position, vec![]);
    r.empty = empty;
    n.handle(ms(0), Input::Recovered(r));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: last_seq + 1,
            last_seq,
        })),
    );
    clock_checked(n, ms(0));
    drain(n)
}

fn saves(outs: &[Output]) -> Vec<bool> {
    outs.iter()
        .filter_map(|o| match o {
            Output::SaveSnapshot { seed, .. } => Some(*seed),
            _ => None,
        })
        .collect()
}

#[test]
fn a_node_started_on_a_populated_database_with_the_stream_empty_seeds_the_first_snapshot() {
    // Rows that were there before marmot started were never captured: a seed snapshot is
    // the only way they reach nodes that start empty.
    let mut n = snapshot_node(1000);
    let outs = started(&mut n, false, 0, 0);
    assert_eq!(saves(&outs), vec![true], "{outs:?}");
    // The store already held one: the seed is done, and no other save follows.
    n.handle(
        ms(5),
        Input::SnapshotSaved(Ok(SaveOutcome::UpToDate(staged(0).info))),
    );
    assert!(
        has(&drain(&mut n), |o| matches!(
            o,
            Output::Event(Event::SeedTaken { existing }) if existing.node == 2
        )),
        "another node seeded first: reported (the daemon compares schema digests)"
    );
    n.handle(ms(60_000), Input::Tick);
    assert!(saves(&drain(&mut n)).is_empty());

    // A failed seed is tried again.
    let mut n = snapshot_node(1000);
    started(&mut n, false, 0, 0);
    n.handle(ms(5), Input::SnapshotSaved(Err("store down".into())));
    assert!(saves(&drain(&mut n)).is_empty(), "not at once");
    n.handle(ms(10_000), Input::Tick);
    assert_eq!(saves(&drain(&mut n)), vec![true]);

    // Not a seed: the stream holds messages (the cluster has a history), the node applied
    // some, or it is empty.
    for (empty, position, last_seq) in [(false, 0, 7), (false, 7, 7), (false, 3, 0), (true, 0, 0)] {
        let mut n = snapshot_node(1000);
        let outs = started(&mut n, empty, position, last_seq);
        assert!(
            saves(&outs).is_empty(),
            "empty {empty} position {position} last {last_seq}: {outs:?}"
        );
        // Rows that were never captured, in a cluster with a history: reported.
        assert_eq!(
            has(&outs, |o| matches!(
                o,
                Output::Event(Event::JoinedWithRows { stream_last_seq: 7 })
            )),
            (empty, position, last_seq) == (false, 0, 7)
        );
    }
}

#[test]
fn an_empty_node_with_no_snapshot_reads_the_stream_and_restores_the_first_snapshot_that_appears() {
    let mut n = snapshot_node(1000);
    let outs = started(&mut n, true, 0, 0);
    assert!(has(&outs, |o| matches!(
        o,
        Output::FetchSnapshot { min_position: 0 }
    )));
    let none = || {
        Input::SnapshotFetched(Ok(Fetched {
            staged: None,
            rejected: vec![],
        }))
    };
    n.handle(ms(10), none());
    let outs = drain(&mut n);
    assert!(
        has(&outs, |o| matches!(
            o,
            Output::Subscribe { from_seq: 1, .. }
        )),
        "it reads the stream meanwhile: {outs:?}"
    );
    assert!(n.status().awaiting_first_snapshot);
    // It looks again, less and less often.
    let fetched = |o: &Output| matches!(o, Output::FetchSnapshot { min_position: 0 });
    let mut at = 10;
    let mut gaps = Vec::new();
    let mut t = at;
    while gaps.len() < 4 {
        t += 100;
        n.handle(ms(t), Input::Tick);
        if has(&drain(&mut n), fetched) {
            gaps.push(t - at);
            at = t + 1;
            if gaps.len() < 4 {
                n.handle(ms(at), none());
                drain(&mut n);
            }
        }
        assert!(t < 200_000, "no second look: {gaps:?}");
    }
    assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "{gaps:?}");
    assert!(gaps[0] <= 1_100, "the first look again is soon: {gaps:?}");
    let next = ms(t + 2);
    // The seed's snapshot appears: restored.
    n.handle(
        next + ms(1),
        Input::SnapshotFetched(Ok(Fetched {
            staged: Some(staged(0)),
            rejected: vec![],
        })),
    );
    assert!(has(&drain(&mut n), |o| matches!(
        o,
        Output::RestoreSnapshot(_)
    )));
    n.handle(next + ms(2), restored(0));
    drain(&mut n);
    assert!(!n.status().awaiting_first_snapshot);
    n.handle(next + ms(600_000), Input::Tick);
    assert!(
        !has(&drain(&mut n), |o| matches!(
            o,
            Output::FetchSnapshot { .. }
        )),
        "one restore, then no more looking"
    );
}

#[test]
fn an_empty_node_stops_looking_for_a_first_snapshot_once_it_writes_or_applies_rows() {
    let mut n = snapshot_node(1000);
    started(&mut n, true, 0, 0);
    n.handle(
        ms(10),
        Input::SnapshotFetched(Ok(Fetched {
            staged: None,
            rejected: vec![],
        })),
    );
    drain(&mut n);
    assert!(n.status().awaiting_first_snapshot);
    n.handle(
        ms(20),
        Input::Captured(Ok(CaptureOutcome {
            captured: Some(captured(1, 1)),
            ..Default::default()
        })),
    );
    drain(&mut n);
    assert!(!n.status().awaiting_first_snapshot);
    n.handle(ms(600_000), Input::Tick);
    assert!(!has(&drain(&mut n), |o| matches!(
        o,
        Output::FetchSnapshot { .. }
    )));
}

#[test]
fn an_empty_node_waiting_for_a_first_snapshot_that_finds_the_stream_trimmed_restores_as_behind() {
    // Found by the simulation (seed 14 of the bootstrapping change): the watch for a first
    // snapshot must not hide that the stream no longer holds what the node needs.
    let mut n = snapshot_node(1000);
    started(&mut n, true, 0, 45);
    n.handle(
        ms(10),
        Input::SnapshotFetched(Ok(Fetched {
            staged: None,
            rejected: vec![],
        })),
    );
    drain(&mut n);
    n.handle(ms(11), subscribed(1, 12, 45));
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(
        o,
        Output::Event(Event::Behind { .. })
    )));
    assert!(
        has(&outs, |o| matches!(
            o,
            Output::FetchSnapshot { min_position: 11 }
        )),
        "{outs:?}"
    );
    assert!(!n.status().awaiting_first_snapshot);
}
