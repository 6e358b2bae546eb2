//! Applying: order and gaps, being behind, retries, superseded subscriptions.

use super::*;

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
