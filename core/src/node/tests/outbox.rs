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
