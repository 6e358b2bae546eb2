//! Publishing: acknowledgements, retries, the recovered outbox, the claim first, pacing.

use super::*;

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

/// Pacing holds a batch back at most `max_publish_hold`: published later than the tombstone
/// lifetime after it was made, a write can land where a newer delete's tombstone was
/// collected (V4 seed 912706: a node behind the stream for longer than that brought deleted
/// rows back on the nodes that had collected their tombstones).
#[test]
fn pacing_releases_a_batch_held_back_for_max_publish_hold() {
    let mut cfg = NodeConfig::new(1, "db-a");
    cfg.max_lag = Some(10);
    cfg.max_publish_hold = Some(Duration::from_secs(60));
    let (mut n, _) = ready_configured(cfg, 0, vec![]);
    let publishes = |outs: &[Output]| {
        outs.iter()
            .filter(|o| matches!(o, Output::Publish { .. }))
            .count()
    };
    let capture = |n: &mut Node, t: u64, seq: u64| {
        n.handle(
            ms(t),
            Input::Captured(Ok(CaptureOutcome {
                captured: Some(captured(seq, 1)),
                schema_changed: false,
                unparked: 0,
            })),
        );
        drain(n)
    };
    assert_eq!(publishes(&capture(&mut n, 1, 1)), 1);
    n.handle(
        ms(2),
        Input::Published {
            batch: batch(1),
            chunk: 0,
            result: Ok(25),
        },
    );
    drain(&mut n);
    // Too far behind: batches 2 (at 3 ms) and 3 (at 30 s) wait.
    assert_eq!(publishes(&capture(&mut n, 3, 2)), 0);
    assert_eq!(publishes(&capture(&mut n, 30_000, 3)), 0);
    n.handle(ms(59_000), Input::Tick);
    assert_eq!(publishes(&drain(&mut n)), 0, "not held long enough yet");
    assert!(
        n.poll_timeout() <= ms(60_003),
        "a timer for the release: {:?}",
        n.poll_timeout()
    );
    n.handle(ms(60_003), Input::Tick);
    let outs = drain(&mut n);
    assert_eq!(published_batches(&outs), vec![2], "{outs:?}");
    assert!(has(&outs, |o| matches!(
        o,
        Output::Event(Event::HeldBatchReleased { waited, .. }) if *waited == Duration::from_secs(60)
    )));
    n.handle(
        ms(60_004),
        Input::Published {
            batch: batch(2),
            chunk: 0,
            result: Ok(26),
        },
    );
    assert_eq!(publishes(&drain(&mut n)), 0, "batch 3 is younger");
    n.handle(ms(90_000), Input::Tick);
    assert_eq!(published_batches(&drain(&mut n)), vec![3]);
}

/// A batch whose messages carry format `format` (2: a schema change).
fn formatted(seq: u64, format: u8) -> crate::capture::Captured {
    let messages = crate::wire::seal(
        batch(seq),
        Stamp::new(1000 + seq, 0),
        format,
        b"body",
        false,
        1024,
    );
    crate::capture::Captured {
        batch: batch(seq),
        stamp: Stamp::new(1000 + seq, 0),
        rows: 1,
        tables: vec![],
        messages,
        schema: format >= crate::wire::FORMAT_SCHEMA,
    }
}

fn published_batches(outs: &[Output]) -> Vec<u64> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Publish { batch, .. } => Some(batch.seq),
            _ => None,
        })
        .collect()
}

#[test]
fn a_schema_batch_goes_out_alone_after_every_earlier_message_and_before_every_later_one() {
    // One node's schema changes must reach the stream in the order they were made: a retried
    // publish would otherwise put a later change before an earlier one.
    let mut n = ready(0, vec![]);
    drain(&mut n);
    for (seq, format) in [(1, 1), (2, 2), (3, 1)] {
        n.handle(
            ms(1),
            Input::Captured(Ok(CaptureOutcome {
                captured: Some(formatted(seq, format)),
                ..Default::default()
            })),
        );
    }
    assert_eq!(
        published_batches(&drain(&mut n)),
        vec![1],
        "the schema batch waits"
    );
    // Batch 1 fails and is retried: still nothing after it.
    n.handle(
        ms(2),
        Input::Published {
            batch: batch(1),
            chunk: 0,
            result: Err(unavailable()),
        },
    );
    n.handle(ms(10_000), Input::Tick);
    assert_eq!(published_batches(&drain(&mut n)), vec![1]);
    n.handle(
        ms(10_001),
        Input::Published {
            batch: batch(1),
            chunk: 0,
            result: Ok(1),
        },
    );
    assert_eq!(
        published_batches(&drain(&mut n)),
        vec![2],
        "then the schema batch, alone"
    );
    n.handle(
        ms(10_002),
        Input::Published {
            batch: batch(2),
            chunk: 0,
            result: Ok(2),
        },
    );
    assert_eq!(published_batches(&drain(&mut n)), vec![3]);
}

#[test]
fn format_2_batches_without_schema_changes_are_pipelined_like_any_rows() {
    // Rows of a table that a replicated change created are format 2 (they carry the table's
    // schema version) but change no schema: they must not serialise publishing.
    let mut n = ready(0, vec![]);
    drain(&mut n);
    for seq in 1..=3 {
        let mut c = formatted(seq, crate::wire::FORMAT_SCHEMA);
        c.schema = false;
        n.handle(
            ms(1),
            Input::Captured(Ok(CaptureOutcome {
                captured: Some(c),
                ..Default::default()
            })),
        );
    }
    assert_eq!(published_batches(&drain(&mut n)), vec![1, 2, 3]);
}

/// Batches read back at start waited already: the hold counts from their stamp, so a
/// restart does not start it again.
#[test]
fn batches_read_back_at_start_keep_the_time_they_were_held() {
    let mut cfg = NodeConfig::new(1, "db-a");
    cfg.max_lag = Some(10);
    cfg.max_publish_hold = Some(Duration::from_secs(60));
    let mut n = Node::new(cfg);
    let mut r = recovered(0, vec![(batch(1), 1)]);
    // Captured 50 s before this start.
    r.outbox_oldest_ms = Some(1_000);
    r.wall_ms = 51_000;
    n.handle(ms(0), Input::Recovered(r));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 100,
        })),
    );
    // The stream's head is known before the claim lets it publish.
    n.handle(ms(0), subscribed(1, 1, 100));
    n.handle(
        ms(1),
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 1000,
                revision: 1,
            }),
            sent_wall_ms: 1000,
            received_wall_ms: 1000,
        },
    );
    n.handle(ms(1), Input::Captured(Ok(CaptureOutcome::default())));
    let publishes = |outs: &[Output]| published_batches(outs);
    assert!(publishes(&drain(&mut n)).is_empty(), "paced: 100 behind");
    n.handle(ms(9_000), Input::Tick);
    assert!(publishes(&drain(&mut n)).is_empty(), "held 59 s so far");
    n.handle(ms(10_001), Input::Tick);
    let outs = drain(&mut n);
    assert_eq!(publishes(&outs), vec![1], "held 60 s: released {outs:?}");
}
