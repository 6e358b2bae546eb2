//! The clock check: pauses while ahead, nothing stamped before it, high-water marks, lagging clocks.

use super::*;

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
fn nothing_is_captured_before_the_clock_was_checked_against_the_server() {
    let mut n = Node::new(NodeConfig::new(1, "db-a"));
    n.handle(ms(0), Input::Recovered(recovered(0, vec![])));
    n.handle(ms(5), Input::LocalChange);
    assert!(!has(&drain(&mut n), |o| matches!(o, Output::Capture)));
}
