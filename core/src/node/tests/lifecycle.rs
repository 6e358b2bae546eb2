//! Capture hints, shutdown, receive-only and send-only nodes, and the timer table.

use super::*;

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
