//! Node state machine tests: each drives the node by hand and checks what it asks for.

use super::*;
use crate::apply::ApplyReport;
use crate::ports::{CaptureOutcome, TransportErrorKind};
use crate::ports::{Claim, StreamBounds, TransportError};
use crate::snapshot::{Fetched, SaveOutcome, StagedSnapshot};
use crate::wire::BatchId;
use bytes::Bytes;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn batch(seq: u64) -> BatchId {
    BatchId {
        origin: 1,
        incarnation: 1,
        seq,
    }
}

fn captured(seq: u64, chunks: usize) -> Captured {
    Captured {
        batch: batch(seq),
        stamp: Stamp::new(1000, 0),
        rows: 1,
        messages: (0..chunks).map(|i| Bytes::from(vec![i as u8])).collect(),
    }
}

fn delivery(seq: u64) -> Delivery {
    Delivery {
        stream_seq: seq,
        payload: Bytes::from_static(b"x"),
        published_ms: 0,
        pending: 0,
    }
}

fn recovered(position: u64, outbox: Vec<(BatchId, u32)>) -> Recovered {
    Recovered {
        position,
        clock: Stamp::ZERO,
        outbox,
        incarnation: 1,
        incomplete_batches: 0,
        parked: 0,
        empty: false,
    }
}

fn drain(n: &mut Node) -> Vec<Output> {
    std::iter::from_fn(|| n.poll_output()).collect()
}

fn has(outs: &[Output], f: impl Fn(&Output) -> bool) -> bool {
    outs.iter().any(f)
}

/// A node that recovered, prepared the stream and holds its claim; its first capture found
/// nothing. Returns the outputs it asked for on the way.
fn ready_with(position: u64, outbox: Vec<(BatchId, u32)>) -> (Node, Vec<Output>) {
    ready_configured(NodeConfig::new(1, "db-a"), position, outbox)
}

fn ready_configured(
    cfg: NodeConfig,
    position: u64,
    outbox: Vec<(BatchId, u32)>,
) -> (Node, Vec<Output>) {
    let mut n = Node::new(cfg);
    let mut outs = Vec::new();
    n.handle(ms(0), Input::Recovered(recovered(position, outbox)));
    outs.extend(drain(&mut n));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 0,
        })),
    );
    outs.extend(drain(&mut n));
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
    let after_claim = drain(&mut n);
    assert!(
        after_claim.iter().any(|o| matches!(o, Output::Capture)),
        "the first capture comes once the clock was checked"
    );
    outs.extend(after_claim);
    n.handle(ms(0), Input::Captured(Ok(CaptureOutcome::default())));
    outs.extend(drain(&mut n));
    (n, outs)
}

fn ready(position: u64, outbox: Vec<(BatchId, u32)>) -> Node {
    ready_with(position, outbox).0
}

/// The subscription of `generation` succeeded on a stream holding `first_seq..=last_seq`.
fn subscribed(generation: u64, first_seq: u64, last_seq: u64) -> Input {
    Input::Subscribed {
        generation,
        result: Ok(StreamBounds {
            first_seq,
            last_seq,
        }),
    }
}

fn unavailable() -> TransportError {
    TransportError::unavailable("no servers")
}

#[test]
fn a_batch_is_marked_published_only_after_every_chunk_is_acknowledged() {
    let mut n = ready(0, vec![]);
    drain(&mut n);
    n.handle(
        ms(1),
        Input::Captured(Ok(CaptureOutcome {
            captured: Some(captured(1, 2)),
            schema_changed: false,
            unparked: 0,
        })),
    );
    let outs = drain(&mut n);
    let publishes: Vec<_> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Publish { chunk, payload, .. } => Some((*chunk, payload.is_some())),
            _ => None,
        })
        .collect();
    assert_eq!(publishes, vec![(0, true), (1, true)]);
    n.handle(
        ms(2),
        Input::Published {
            batch: batch(1),
            chunk: 1,
            result: Ok(1),
        },
    );
    assert!(!has(&drain(&mut n), |o| matches!(
        o,
        Output::MarkPublished(_)
    )));
    n.handle(
        ms(3),
        Input::Published {
            batch: batch(1),
            chunk: 0,
            result: Ok(1),
        },
    );
    assert!(has(
        &drain(&mut n),
        |o| matches!(o, Output::MarkPublished(b) if *b == batch(1))
    ));
    assert_eq!(n.status().outbox_batches, 0);
}

#[test]
fn a_failed_publish_is_retried_after_backoff_never_dropped() {
    let mut n = ready(0, vec![]);
    drain(&mut n);
    n.handle(
        ms(1),
        Input::Captured(Ok(CaptureOutcome {
            captured: Some(captured(1, 1)),
            schema_changed: false,
            unparked: 0,
        })),
    );
    drain(&mut n);
    n.handle(
        ms(2),
        Input::Published {
            batch: batch(1),
            chunk: 0,
            result: Err(unavailable()),
        },
    );
    let outs = drain(&mut n);
    assert!(
        !has(&outs, |o| matches!(o, Output::Publish { .. })),
        "no retry before the backoff"
    );
    assert!(!has(&outs, |o| matches!(o, Output::MarkPublished(_))));
    let at = n.poll_timeout();
    assert!(at > ms(2) && at <= ms(2) + n.config().retry_min);
    n.handle(at, Input::Tick);
    assert!(has(&drain(&mut n), |o| matches!(
        o,
        Output::Publish { chunk: 0, .. }
    )));
    assert_eq!(n.status().outbox_batches, 1);
}

#[test]
fn recovered_outbox_is_republished_from_storage() {
    let (_n, outs) = ready_with(0, vec![(batch(7), 2)]);
    let from_storage = outs
        .iter()
        .filter(|o| matches!(o, Output::Publish { batch: b, payload: None, .. } if *b == batch(7)))
        .count();
    assert_eq!(from_storage, 2);
}

#[test]
fn nothing_is_published_before_the_node_id_claim_is_granted() {
    let mut n = Node::new(NodeConfig::new(1, "db-a"));
    n.handle(ms(0), Input::Recovered(recovered(0, vec![(batch(1), 1)])));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 0,
        })),
    );
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(o, Output::Claim)));
    assert!(!has(&outs, |o| matches!(o, Output::Publish { .. })));
    n.handle(
        ms(1),
        Input::Claimed {
            result: Ok(Claim::Held { by: "db-b".into() }),
            sent_wall_ms: 0,
            received_wall_ms: 0,
        },
    );
    let outs = drain(&mut n);
    assert!(has(
        &outs,
        |o| matches!(o, Output::Stop(Stop::NodeIdInUse { holder }) if holder == "db-b")
    ));
}

#[test]
fn deliveries_are_applied_in_order_and_a_gap_resubscribes_from_the_missing_sequence() {
    let (mut n, outs) = ready_with(10, vec![]);
    assert!(has(&outs, |o| matches!(
        o,
        Output::Subscribe { from_seq: 11, .. }
    )));
    n.handle(ms(1), subscribed(1, 1, 20));
    drain(&mut n);
    n.handle(
        ms(2),
        Input::Delivered {
            generation: 1,
            deliveries: vec![delivery(10), delivery(11), delivery(13)],
        },
    );
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(o, Output::Unsubscribe { .. })));
    let applied: Vec<u64> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Apply(ds) => Some(ds.iter().map(|d| d.stream_seq).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(
        applied,
        vec![11],
        "the duplicate 10 is dropped, nothing after the gap is applied"
    );
    let unsub = outs
        .iter()
        .position(|o| matches!(o, Output::Unsubscribe { .. }))
        .unwrap();
    let resub = outs
        .iter()
        .position(|o| matches!(o, Output::Subscribe { from_seq: 12, .. }))
        .unwrap();
    assert!(
        unsub < resub,
        "drops the broken subscription, then resubscribes at the gap"
    );
}

#[test]
fn a_position_older_than_the_stream_stops_applying_and_alarms() {
    let mut n = ready(5, vec![]);
    drain(&mut n);
    n.handle(ms(1), subscribed(1, 100, 200));
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(
        o,
        Output::Event(Event::Behind {
            position: 5,
            first_seq: 100
        })
    )));
    assert!(n.status().behind);
    let later = ms(1) + n.config().alarm_interval;
    n.handle(later, Input::Tick);
    let outs = drain(&mut n);
    assert!(
        has(&outs, |o| matches!(o, Output::Event(Event::Behind { .. }))),
        "the alarm repeats"
    );
    assert!(
        !has(&outs, |o| matches!(o, Output::Subscribe { .. })),
        "it never skips ahead"
    );
}

#[test]
fn a_clock_ahead_of_the_server_pauses_capture_and_apply_until_it_is_sane() {
    let mut n = ready(0, vec![]);
    drain(&mut n);
    n.handle(ms(1), subscribed(1, 1, 0));
    drain(&mut n);
    let bound = n.config().max_clock_skew_ms;
    n.handle(
        ms(2),
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 1_000_000,
                revision: 1,
            }),
            sent_wall_ms: 1_000_000 + bound + 1000,
            received_wall_ms: 1_000_000 + bound + 1000,
        },
    );
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(
        o,
        Output::Event(Event::ClockSkew { paused: true, .. })
    )));
    n.handle(ms(3), Input::LocalChange);
    n.handle(
        ms(3),
        Input::Delivered {
            generation: 1,
            deliveries: vec![delivery(1)],
        },
    );
    let outs = drain(&mut n);
    assert!(!has(&outs, |o| matches!(
        o,
        Output::Capture | Output::Apply(_)
    )));
    assert!(n.status().clock_paused);
    // The clock comes back: both resume, nothing was lost.
    n.handle(
        ms(4),
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 2_000_000,
                revision: 1,
            }),
            sent_wall_ms: 2_000_000,
            received_wall_ms: 2_000_010,
        },
    );
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(o, Output::Capture)));
    assert!(has(
        &outs,
        |o| matches!(o, Output::Apply(ds) if ds[0].stream_seq == 1)
    ));
}

#[test]
fn nothing_is_applied_before_the_clock_was_checked_against_the_server() {
    // Apply captures (stamps) pending local writes first: it must wait for the first check,
    // like capture, or a node started hours ahead stamps them in the far future.
    let mut n = Node::new(NodeConfig::new(1, "db-a"));
    n.handle(ms(0), Input::Recovered(recovered(0, vec![])));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 1,
        })),
    );
    let outs = drain(&mut n);
    let generation = outs
        .iter()
        .find_map(|o| match o {
            Output::Subscribe { generation, .. } => Some(*generation),
            _ => None,
        })
        .expect("it reads the stream meanwhile");
    n.handle(ms(1), subscribed(generation, 1, 1));
    n.handle(
        ms(1),
        Input::Delivered {
            generation,
            deliveries: vec![delivery(1)],
        },
    );
    let outs = drain(&mut n);
    assert!(
        !has(&outs, |o| matches!(o, Output::Apply(_) | Output::Capture)),
        "{outs:?}"
    );
    n.handle(ms(2), Input::Tick);
    assert!(!has(&drain(&mut n), |o| matches!(o, Output::Apply(_))));
    clock_checked(&mut n, ms(3));
    assert!(has(&drain(&mut n), |o| matches!(o, Output::Apply(_))));
}

#[test]
fn a_high_water_mark_that_leads_the_server_is_brought_back_once_the_wall_clock_is_right() {
    // The node stamped an hour ahead (its wall clock jumped before a check caught it), and
    // saved that clock; its wall clock is right again.
    let mut n = Node::new(NodeConfig::new(1, "db-a"));
    let mut r = recovered(0, vec![]);
    r.clock = Stamp::new(1_000 + 3_600_000, 0);
    n.handle(ms(0), Input::Recovered(r));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 0,
        })),
    );
    drain(&mut n);
    clock_checked(&mut n, ms(1));
    let outs = drain(&mut n);
    assert!(
        has(&outs, |o| matches!(
            o,
            Output::Event(Event::ClockSkew {
                paused: false,
                lowered_high_water: Some(lead),
                ..
            }) if *lead >= 3_600_000
        )),
        "{outs:?}"
    );
    assert!(!n.status().clock_paused);
    assert!(n.clock().high_water() <= Stamp::new(1_000, 0));
    assert!(has(&outs, |o| matches!(o, Output::Capture)));
    // A wall clock that is itself ahead still pauses, and nothing is lowered then.
    let mut m = Node::new(NodeConfig::new(1, "db-a"));
    let mut r = recovered(0, vec![]);
    r.clock = Stamp::new(1_000 + 3_600_000, 0);
    m.handle(ms(0), Input::Recovered(r));
    m.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 0,
        })),
    );
    drain(&mut m);
    m.handle(
        ms(1),
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 1_000,
                revision: 1,
            }),
            sent_wall_ms: 1_000 + 3_600_000,
            received_wall_ms: 1_000 + 3_600_000,
        },
    );
    assert!(has(&drain(&mut m), |o| matches!(
        o,
        Output::Event(Event::ClockSkew {
            paused: true,
            lowered_high_water: None,
            ..
        })
    )));
    assert_eq!(m.clock().high_water(), Stamp::new(1_000 + 3_600_000, 0));
}

#[test]
fn a_lagging_wall_clock_stamps_with_the_servers_time_and_a_jump_adds_nothing() {
    let mut n = Node::new(NodeConfig::new(1, "db-a"));
    n.handle(ms(0), Input::Recovered(recovered(0, vec![])));
    assert_eq!(
        n.stamp_time(ms(0), 1_000),
        1_000,
        "unchecked: the wall clock"
    );
    n.handle(
        ms(10),
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 60_000,
                revision: 1,
            }),
            sent_wall_ms: 1_000,
            received_wall_ms: 1_000,
        },
    );
    // 59 s behind: stamps follow the server's clock, moving on with monotonic time.
    assert_eq!(n.stamp_time(ms(510), 1_500), 60_500);
    // The wall clock jumps ahead of the server: it leads (and the next check says so), but
    // the correction it no longer needs is not added on top.
    assert_eq!(n.stamp_time(ms(1_010), 90_000), 90_000);
}

#[test]
fn a_failed_apply_is_retried_with_the_same_deliveries() {
    let mut n = ready(0, vec![]);
    drain(&mut n);
    n.handle(ms(1), subscribed(1, 1, 2));
    drain(&mut n);
    n.handle(
        ms(2),
        Input::Delivered {
            generation: 1,
            deliveries: vec![delivery(1), delivery(2)],
        },
    );
    let Some(Output::Apply(ds)) = drain(&mut n)
        .into_iter()
        .find(|o| matches!(o, Output::Apply(_)))
    else {
        panic!("no apply")
    };
    n.handle(
        ms(3),
        Input::Applied {
            result: Err(StorageError {
                operation: crate::ports::StorageOp::Apply,
                kind: crate::ports::StorageErrorKind::Busy,
                message: "database is locked".into(),
            }),
            deliveries: ds,
            wall_ms: 0,
        },
    );
    assert_eq!(n.status().position, 0);
    let at = n.poll_timeout();
    n.handle(at, Input::Tick);
    let again: Vec<u64> = drain(&mut n)
        .into_iter()
        .filter_map(|o| match o {
            Output::Apply(ds) => Some(ds.into_iter().map(|d| d.stream_seq).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(again, vec![1, 2], "the same deliveries, in order");
    n.handle(
        at,
        Input::Applied {
            result: Ok(ApplyOutcome {
                report: ApplyReport {
                    through_seq: 1,
                    ..ApplyReport::default()
                },
                ..ApplyOutcome::default()
            }),
            deliveries: vec![delivery(1), delivery(2)],
            wall_ms: 0,
        },
    );
    assert_eq!(n.status().position, 1);
}

#[test]
fn shutdown_captures_then_waits_for_acks_within_the_grace_period() {
    let mut n = ready(0, vec![]);
    drain(&mut n);
    n.handle(ms(10), Input::Shutdown);
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(o, Output::Capture)));
    n.handle(
        ms(11),
        Input::Captured(Ok(CaptureOutcome {
            captured: Some(captured(1, 1)),
            schema_changed: false,
            unparked: 0,
        })),
    );
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(o, Output::Publish { .. })));
    assert!(!has(&outs, |o| matches!(o, Output::Stop(_))));
    n.handle(
        ms(12),
        Input::Published {
            batch: batch(1),
            chunk: 0,
            result: Ok(1),
        },
    );
    let outs = drain(&mut n);
    assert!(has(&outs, |o| matches!(
        o,
        Output::Stop(Stop::Shutdown { unpublished: 0 })
    )));
}

#[test]
fn shutdown_gives_up_after_the_grace_period_keeping_the_outbox() {
    let mut n = ready(0, vec![(batch(1), 1)]);
    drain(&mut n);
    n.handle(ms(10), Input::Shutdown);
    n.handle(ms(11), Input::Captured(Ok(CaptureOutcome::default())));
    n.handle(
        ms(12),
        Input::Published {
            batch: batch(1),
            chunk: 0,
            result: Err(TransportError {
                kind: TransportErrorKind::Unavailable,
                message: "down".into(),
            }),
        },
    );
    drain(&mut n);
    let deadline = ms(10) + n.config().shutdown_grace;
    assert!(n.poll_timeout() <= deadline);
    n.handle(deadline, Input::Tick);
    assert!(has(&drain(&mut n), |o| matches!(
        o,
        Output::Stop(Stop::Shutdown { unpublished: 1 })
    )));
}

#[test]
fn publish_false_never_captures_and_replicate_false_never_subscribes() {
    let mut cfg = NodeConfig::new(1, "x");
    cfg.publish = false;
    cfg.replicate = false;
    let mut n = Node::new(cfg);
    n.handle(ms(0), Input::Recovered(recovered(0, vec![])));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 0,
        })),
    );
    n.handle(ms(1), Input::LocalChange);
    let outs = drain(&mut n);
    assert!(!has(&outs, |o| matches!(
        o,
        Output::Capture | Output::Subscribe { .. }
    )));
}

#[test]
fn a_change_hint_rechecks_briefly_when_the_commit_was_not_visible_yet() {
    let mut n = ready(0, vec![]);
    drain(&mut n);
    n.handle(ms(100), Input::LocalChange);
    assert!(has(&drain(&mut n), |o| matches!(o, Output::Capture)));
    n.handle(ms(100), Input::Captured(Ok(CaptureOutcome::default())));
    drain(&mut n);
    let at = n.poll_timeout();
    assert_eq!(at, ms(101), "looks again 1 ms later");
    n.handle(at, Input::Tick);
    assert!(has(&drain(&mut n), |o| matches!(o, Output::Capture)));
    n.handle(at, Input::Captured(Ok(CaptureOutcome::default())));
    drain(&mut n);
    assert_eq!(n.poll_timeout(), ms(103), "then 2 ms later");
    // Outside the window it falls back to the regular poll.
    n.handle(ms(103), Input::Tick);
    assert!(has(&drain(&mut n), |o| matches!(o, Output::Capture)));
    n.handle(ms(300), Input::Captured(Ok(CaptureOutcome::default())));
    drain(&mut n);
    assert_eq!(
        n.poll_timeout(),
        n.config().poll_interval,
        "no more rechecks, next regular poll"
    );
}

#[test]
fn nothing_is_captured_before_the_clock_was_checked_against_the_server() {
    let mut n = Node::new(NodeConfig::new(1, "db-a"));
    n.handle(ms(0), Input::Recovered(recovered(0, vec![])));
    n.handle(ms(5), Input::LocalChange);
    assert!(!has(&drain(&mut n), |o| matches!(o, Output::Capture)));
}

/// The loop must never be woken for nothing: after any input, the next deadline is in the
/// future, whatever is blocked (publish off, clock paused, NATS down, shutting down).
#[test]
fn the_next_deadline_is_always_in_the_future() {
    let check = |n: &mut Node, now: Duration| {
        drain(n);
        assert!(
            n.poll_timeout() > now,
            "deadline {:?} at {:?}",
            n.poll_timeout(),
            now
        );
    };
    // A receive-only node with deliveries queued while its clock is ahead.
    let mut cfg = NodeConfig::new(1, "x");
    cfg.publish = false;
    let mut n = Node::new(cfg);
    n.handle(ms(0), Input::Recovered(recovered(0, vec![(batch(1), 1)])));
    check(&mut n, ms(0));
    n.handle(ms(10), Input::Prepared(Err(unavailable())));
    check(&mut n, ms(10));
    n.handle(ms(2000), Input::Tick);
    check(&mut n, ms(2000));
    n.handle(
        ms(2000),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 5,
        })),
    );
    n.handle(
        ms(2001),
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 1,
                revision: 1,
            }),
            sent_wall_ms: 1_000_000,
            received_wall_ms: 1_000_000,
        },
    );
    check(&mut n, ms(2001));
    n.handle(ms(2002), subscribed(1, 1, 5));
    n.handle(
        ms(2003),
        Input::Delivered {
            generation: 1,
            deliveries: vec![delivery(1), delivery(2)],
        },
    );
    n.handle(ms(2004), Input::LocalChange);
    check(&mut n, ms(2004));
    assert!(n.status().clock_paused);
    n.handle(ms(3000), Input::Tick);
    check(&mut n, ms(3000));
    n.handle(ms(3001), Input::Shutdown);
    check(&mut n, ms(3001));
    // A publishing node whose outbox cannot go out (window full, stream down).
    let mut n = ready(0, vec![]);
    for i in 0..300 {
        n.handle(
            ms(10),
            Input::Captured(Ok(CaptureOutcome {
                captured: Some(captured(i, 1)),
                schema_changed: false,
                unparked: 0,
            })),
        );
    }
    check(&mut n, ms(10));
    assert_eq!(n.status().in_flight, 256);
}

#[test]
fn a_superseded_subscription_is_ignored() {
    let (mut n, _) = ready_with(0, vec![]);
    n.handle(
        ms(1),
        Input::SubscriptionEnded {
            generation: 1,
            error: None,
        },
    );
    let outs = drain(&mut n);
    assert!(
        !has(&outs, |o| matches!(o, Output::Subscribe { .. })),
        "retried after backoff"
    );
    let at = n.poll_timeout();
    n.handle(at, Input::Tick);
    assert!(has(&drain(&mut n), |o| matches!(
        o,
        Output::Subscribe { generation: 2, .. }
    )));
    // The first subscription answers late: it is dropped, not installed.
    n.handle(at, subscribed(1, 1, 0));
    assert!(has(&drain(&mut n), |o| matches!(
        o,
        Output::Unsubscribe { generation: 1 }
    )));
    assert!(!n.status().subscribed);
    n.handle(at, subscribed(2, 1, 0));
    drain(&mut n);
    assert!(n.status().subscribed);
}

/// The node's clock was checked against the server (its claim was granted, server and local
/// clocks agreeing).
fn clock_checked(n: &mut Node, at: Duration) {
    n.handle(
        at,
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 1000,
                revision: 1,
            }),
            sent_wall_ms: 1000,
            received_wall_ms: 1000,
        },
    );
}

fn snapshot_node(every_changes: u64) -> Node {
    let mut cfg = NodeConfig::new(1, "db-a");
    cfg.snapshots = Some(SnapshotPolicy {
        every_changes,
        interval: None,
        restore_empty: true,
    });
    Node::new(cfg)
}

fn staged(position: u64) -> StagedSnapshot {
    StagedSnapshot {
        info: crate::snapshot::SnapshotInfo {
            format: 1,
            generation: 3,
            object: "snapshot-x".into(),
            position,
            node: 2,
            created_ms: 1,
            size: 1,
            raw_size: 1,
            checksum: "00".into(),
            horizon_ms: 0,
        },
        path: std::path::PathBuf::from("/tmp/staged.db"),
    }
}

fn restored(position: u64) -> Input {
    Input::Restored(Ok(RestoreReport {
        position,
        generation: 3,
        merged: false,
        captured: None,
    }))
}

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

/// Like [`ready_configured`], for a node that does not capture (no first capture).
fn ready_configured_receive_only(cfg: NodeConfig) -> (Node, Vec<Output>) {
    let mut n = Node::new(cfg);
    let mut outs = Vec::new();
    n.handle(ms(0), Input::Recovered(recovered(1, vec![])));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 1,
        })),
    );
    outs.extend(drain(&mut n));
    clock_checked(&mut n, ms(0));
    outs.extend(drain(&mut n));
    (n, outs)
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
fn publishing_waits_while_the_node_is_too_far_behind_the_stream_head() {
    let mut cfg = NodeConfig::new(1, "db-a");
    cfg.max_lag = Some(10);
    let (mut n, _) = ready_configured(cfg, 0, vec![]);
    let publishes = |outs: &[Output]| {
        outs.iter()
            .filter(|o| matches!(o, Output::Publish { .. }))
            .count()
    };
    n.handle(
        ms(1),
        Input::Captured(Ok(CaptureOutcome {
            captured: Some(captured(1, 1)),
            schema_changed: false,
            unparked: 0,
        })),
    );
    assert_eq!(publishes(&drain(&mut n)), 1);
    // Acknowledged at sequence 25: the stream holds 25 messages this node has not applied.
    n.handle(
        ms(2),
        Input::Published {
            batch: batch(1),
            chunk: 0,
            result: Ok(25),
        },
    );
    drain(&mut n);
    n.handle(
        ms(3),
        Input::Captured(Ok(CaptureOutcome {
            captured: Some(captured(2, 1)),
            schema_changed: false,
            unparked: 0,
        })),
    );
    let outs = drain(&mut n);
    assert_eq!(publishes(&outs), 0, "too far ahead: {outs:?}");
    assert!(has(&outs, |o| matches!(
        o,
        Output::Event(Event::PublishThrottled {
            throttled: true,
            head: 25,
            position: 0
        })
    )));
    assert_eq!(n.status().outbox_batches, 1, "kept, not dropped");
    // Shutting down stops reading, so waiting out the grace period would not help.
    n.handle(ms(4), Input::Shutdown);
    n.handle(ms(5), Input::Captured(Ok(CaptureOutcome::default())));
    assert!(has(&drain(&mut n), |o| matches!(
        o,
        Output::Stop(Stop::Shutdown { unpublished: 1 })
    )));
}

#[test]
fn a_snapshot_is_due_after_enough_changes() {
    let mut n = snapshot_node(100);
    n.handle(ms(0), Input::Recovered(recovered(0, vec![])));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 0,
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
