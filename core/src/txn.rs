//! The order of work inside the node's storage transactions, written once.
//!
//! Each operation of [`crate::ports::Storage`] that stamps is one atomic transaction, and
//! what happens inside it, in which order, is protocol: local writes are captured (stamped)
//! before any remote row is compared with them, so a local write is never overwritten by an
//! older remote one; the position is recorded in the same transaction as the rows it
//! covers; the clock's high-water mark is saved last, after everything that stamped. An
//! adapter implements [`LocalTxn`] for its open transaction, and calls [`capture`],
//! [`apply`] or [`retry_parked`] inside it; it commits when they return `Ok`, and rolls
//! everything back otherwise.

use crate::apply::{ApplyReport, Delivery};
use crate::capture::Captured;
use crate::hlc::Clock;
use crate::ports::{ApplyOutcome, CaptureOutcome, ParkedRetry};

/// Which parked batches to retry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ParkedSelection {
    /// All of them.
    All,
    /// Those a person asked to retry (`marmot parked retry`).
    Requested,
    /// Those waiting on a UNIQUE value another row holds.
    Waiting,
}

/// What a storage transaction offers the protocol. Every method runs inside the one open
/// transaction.
pub trait LocalTxn {
    /// A storage failure: the transaction is rolled back.
    type Error;
    /// Follows the local schema (reinstalls capture triggers after a schema change; see
    /// [`LocalTxn::take_schema_changed`]).
    fn follow_schema(&mut self) -> Result<(), Self::Error>;
    /// Captures every pending local write as one batch stamped from `clock`, stored in the
    /// outbox (`None`: nothing pending, or capture is off).
    fn capture_pending(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
    ) -> Result<Option<Captured>, Self::Error>;
    /// The stream position recorded: the last sequence applied.
    fn position(&mut self) -> Result<u64, Self::Error>;
    /// Applies deliveries that follow `position` under the merge rule (the adapter runs
    /// [`crate::apply::apply_deliveries`] over its rows).
    fn apply_deliveries(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        position: u64,
        deliveries: &[Delivery],
    ) -> Result<ApplyReport, Self::Error>;
    /// Records the stream position.
    fn record_position(&mut self, position: u64) -> Result<(), Self::Error>;
    /// Whether any batch waits on a UNIQUE value.
    fn any_waiting(&mut self) -> Result<bool, Self::Error>;
    /// Retries the parked batches `which` selects, one at a time, in each origin's capture
    /// order; removes those that apply, and records why the others did not. Returns (tried,
    /// applied); adds what they did to `report`.
    fn retry_parked(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        which: ParkedSelection,
        report: &mut ApplyReport,
    ) -> Result<(u64, u64), Self::Error>;
    /// Applies the batches waiting on a UNIQUE value, each origin's together as one set (see
    /// [`crate::apply::retry_parked_jointly`]). Returns how many applied.
    fn retry_waiting_jointly(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        report: &mut ApplyReport,
    ) -> Result<u64, Self::Error>;
    /// How many batches are parked.
    fn parked_count(&mut self) -> Result<u64, Self::Error>;
    /// How many batches have chunks stored and wait for the rest.
    fn incomplete_batches(&mut self) -> Result<u64, Self::Error>;
    /// Saves the clock's high-water mark (the running clock is the truth: it may have been
    /// lowered on purpose).
    fn save_clock(&mut self, clock: &Clock) -> Result<(), Self::Error>;
    /// Whether the local schema changed since this was last asked.
    fn take_schema_changed(&mut self) -> bool;
}

/// A capture: the schema, the pending writes, then the batches a local write may have
/// unblocked (it may have given up a UNIQUE value one waits on), then the clock.
pub fn capture<T: LocalTxn>(
    t: &mut T,
    clock: &mut Clock,
    wall_ms: u64,
) -> Result<CaptureOutcome, T::Error> {
    t.follow_schema()?;
    let captured = t.capture_pending(clock, wall_ms)?;
    let mut report = ApplyReport::default();
    if captured.is_some() && t.any_waiting()? {
        retry_waiting(t, clock, wall_ms, &mut report)?;
    }
    t.save_clock(clock)?;
    Ok(CaptureOutcome {
        captured,
        schema_changed: t.take_schema_changed(),
        unparked: report.unparked,
    })
}

/// An apply: the schema; local writes stamped before any remote row is compared with them;
/// the deliveries; the batches waiting on a UNIQUE value, when rows moved (their blocking row
/// may have moved away with one of these batches); the new position, in the same transaction
/// as the rows; the clock last.
pub fn apply<T: LocalTxn>(
    t: &mut T,
    clock: &mut Clock,
    wall_ms: u64,
    deliveries: &[Delivery],
) -> Result<ApplyOutcome, T::Error> {
    t.follow_schema()?;
    let captured = t.capture_pending(clock, wall_ms)?;
    let position = t.position()?;
    let mut report = t.apply_deliveries(clock, wall_ms, position, deliveries)?;
    // A batch that just joined the waiting ones may apply together with them.
    if report.rows_written > 0
        || report.rows_repaired > 0
        || report.parked.iter().any(|p| p.collision)
    {
        retry_waiting(t, clock, wall_ms, &mut report)?;
    }
    if report.through_seq != position {
        t.record_position(report.through_seq)?;
    }
    t.save_clock(clock)?;
    Ok(ApplyOutcome {
        captured,
        report,
        incomplete_batches: t.incomplete_batches()?,
        schema_changed: t.take_schema_changed(),
    })
}

/// A retry of parked batches (`all`, or those a person asked for): local writes first, as
/// in [`apply`].
pub fn retry_parked<T: LocalTxn>(
    t: &mut T,
    clock: &mut Clock,
    wall_ms: u64,
    all: bool,
) -> Result<ParkedRetry, T::Error> {
    t.follow_schema()?;
    let captured = t.capture_pending(clock, wall_ms)?;
    let which = if all {
        ParkedSelection::All
    } else {
        ParkedSelection::Requested
    };
    let mut report = ApplyReport::default();
    let (attempted, mut applied) = t.retry_parked(clock, wall_ms, which, &mut report)?;
    // The batches that applied may have freed UNIQUE values others wait on (found by the
    // simulation's schema workload: a batch waiting on a value, retried before the parked
    // batch that frees it in the same pass, stayed parked with nothing left to wake it).
    if applied > 0 && t.any_waiting()? {
        let before = report.unparked;
        retry_waiting(t, clock, wall_ms, &mut report)?;
        applied += report.unparked - before;
    }
    let remaining = t.parked_count()?;
    t.save_clock(clock)?;
    Ok(ParkedRetry {
        attempted,
        applied,
        remaining,
        captured,
    })
}

/// Retries the batches waiting on a UNIQUE value: one by one, again until a round frees
/// nothing (each that applies may free a value another waits on), then each origin's
/// together as one set (one node's batches, out of their capture order, may be in each
/// other's way). Adds what it did to `report`.
pub fn retry_waiting<T: LocalTxn>(
    t: &mut T,
    clock: &mut Clock,
    wall_ms: u64,
    report: &mut ApplyReport,
) -> Result<(), T::Error> {
    loop {
        let mut again = ApplyReport::default();
        let (_, applied) = t.retry_parked(clock, wall_ms, ParkedSelection::Waiting, &mut again)?;
        report.unparked += applied;
        report.absorb(again);
        if applied == 0 {
            break;
        }
    }
    let mut again = ApplyReport::default();
    report.unparked += t.retry_waiting_jointly(clock, wall_ms, &mut again)?;
    report.absorb(again);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::Parked;
    use crate::hlc::Stamp;
    use crate::wire::BatchId;
    use bytes::Bytes;

    /// Records the calls made, in order, and answers from a script.
    #[derive(Default)]
    struct Script {
        calls: Vec<String>,
        pending_local_write: bool,
        position: u64,
        through_seq: u64,
        rows_written: u64,
        parks_a_collision: bool,
        waiting: bool,
        /// How many retries of waiting batches apply, one per round.
        waiting_apply: u64,
        /// A retry of parked batches (all, or those asked for) applies one.
        parked_apply: bool,
    }

    impl LocalTxn for Script {
        type Error = ();
        fn follow_schema(&mut self) -> Result<(), ()> {
            self.calls.push("follow_schema".into());
            Ok(())
        }
        fn capture_pending(
            &mut self,
            clock: &mut Clock,
            wall_ms: u64,
        ) -> Result<Option<Captured>, ()> {
            self.calls.push("capture".into());
            if !std::mem::take(&mut self.pending_local_write) {
                return Ok(None);
            }
            let stamp = clock.tick(wall_ms);
            Ok(Some(Captured {
                batch: BatchId {
                    origin: 1,
                    incarnation: 1,
                    seq: 1,
                },
                stamp,
                rows: 1,
                tables: vec![],
                messages: vec![Bytes::from_static(b"m")],
                schema: false,
            }))
        }
        fn position(&mut self) -> Result<u64, ()> {
            self.calls.push("position".into());
            Ok(self.position)
        }
        fn apply_deliveries(
            &mut self,
            clock: &mut Clock,
            _: u64,
            position: u64,
            _: &[Delivery],
        ) -> Result<ApplyReport, ()> {
            // The local write was stamped before: the clock is already past it.
            self.calls.push(format!(
                "apply after {position} (clock {})",
                clock.high_water().as_u64() > 0
            ));
            let mut r = ApplyReport {
                through_seq: self.through_seq,
                rows_written: self.rows_written,
                ..ApplyReport::default()
            };
            if self.parks_a_collision {
                r.parked.push(Parked {
                    stream_seq: self.through_seq,
                    batch: None,
                    reason: "UNIQUE".into(),
                    message: Bytes::new(),
                    collision: true,
                });
            }
            Ok(r)
        }
        fn record_position(&mut self, position: u64) -> Result<(), ()> {
            self.calls.push(format!("record {position}"));
            Ok(())
        }
        fn any_waiting(&mut self) -> Result<bool, ()> {
            self.calls.push("any_waiting".into());
            Ok(self.waiting)
        }
        fn retry_parked(
            &mut self,
            _: &mut Clock,
            _: u64,
            which: ParkedSelection,
            report: &mut ApplyReport,
        ) -> Result<(u64, u64), ()> {
            self.calls.push(format!("retry {which:?}"));
            if which == ParkedSelection::Waiting && self.waiting_apply > 0 {
                self.waiting_apply -= 1;
                report.rows_written += 1;
                report.unparked += 1;
                return Ok((1, 1));
            }
            if which != ParkedSelection::Waiting && std::mem::take(&mut self.parked_apply) {
                return Ok((1, 1));
            }
            Ok((0, 0))
        }
        fn retry_waiting_jointly(
            &mut self,
            _: &mut Clock,
            _: u64,
            _: &mut ApplyReport,
        ) -> Result<u64, ()> {
            self.calls.push("retry jointly".into());
            Ok(0)
        }
        fn parked_count(&mut self) -> Result<u64, ()> {
            self.calls.push("parked_count".into());
            Ok(3)
        }
        fn incomplete_batches(&mut self) -> Result<u64, ()> {
            self.calls.push("incomplete".into());
            Ok(0)
        }
        fn save_clock(&mut self, _: &Clock) -> Result<(), ()> {
            self.calls.push("save_clock".into());
            Ok(())
        }
        fn take_schema_changed(&mut self) -> bool {
            false
        }
    }

    fn clock() -> Clock {
        Clock::new(Stamp::ZERO)
    }

    #[test]
    fn an_apply_stamps_local_writes_first_records_the_position_with_the_rows_and_saves_the_clock_last()
     {
        let mut t = Script {
            pending_local_write: true,
            position: 4,
            through_seq: 7,
            ..Script::default()
        };
        let out = apply(&mut t, &mut clock(), 1_000, &[]).unwrap();
        assert!(out.captured.is_some());
        assert_eq!(out.report.through_seq, 7);
        assert_eq!(
            t.calls,
            [
                "follow_schema",
                "capture",
                "position",
                "apply after 4 (clock true)",
                "record 7",
                "save_clock",
                "incomplete"
            ]
        );
    }

    #[test]
    fn an_apply_that_moved_no_row_and_no_position_retries_nothing_and_records_nothing() {
        let mut t = Script {
            position: 4,
            through_seq: 4,
            ..Script::default()
        };
        apply(&mut t, &mut clock(), 1_000, &[]).unwrap();
        assert!(
            !t.calls
                .iter()
                .any(|c| c.starts_with("retry") || c.starts_with("record"))
        );
    }

    #[test]
    fn rows_moved_retry_the_waiting_batches_until_a_round_frees_nothing_then_jointly() {
        let mut t = Script {
            position: 1,
            through_seq: 2,
            rows_written: 1,
            waiting_apply: 2,
            ..Script::default()
        };
        let out = apply(&mut t, &mut clock(), 1_000, &[]).unwrap();
        assert_eq!(out.report.unparked, 2);
        assert_eq!(out.report.rows_written, 3);
        let retries: Vec<&String> = t.calls.iter().filter(|c| c.starts_with("retry")).collect();
        assert_eq!(
            retries,
            [
                "retry Waiting",
                "retry Waiting",
                "retry Waiting",
                "retry jointly"
            ]
        );
        // Before the position and the clock are saved.
        let at = |name: &str| t.calls.iter().position(|c| c == name).unwrap();
        assert!(at("retry jointly") < at("record 2"));
        assert!(at("record 2") < at("save_clock"));
    }

    #[test]
    fn a_batch_that_begins_waiting_is_tried_with_the_others_at_once() {
        let mut t = Script {
            position: 1,
            through_seq: 2,
            parks_a_collision: true,
            ..Script::default()
        };
        apply(&mut t, &mut clock(), 1_000, &[]).unwrap();
        assert!(t.calls.iter().any(|c| c == "retry jointly"));
    }

    #[test]
    fn a_capture_retries_waiting_batches_only_after_a_local_write_and_when_some_wait() {
        let mut t = Script {
            pending_local_write: true,
            waiting: true,
            waiting_apply: 1,
            ..Script::default()
        };
        let out = capture(&mut t, &mut clock(), 1_000).unwrap();
        assert_eq!(out.unparked, 1);
        assert_eq!(&t.calls[..3], ["follow_schema", "capture", "any_waiting"]);
        assert_eq!(t.calls.last().unwrap(), "save_clock");
        // Nothing captured: nothing to look at.
        let mut t = Script {
            waiting: true,
            ..Script::default()
        };
        capture(&mut t, &mut clock(), 1_000).unwrap();
        assert_eq!(t.calls, ["follow_schema", "capture", "save_clock"]);
    }

    #[test]
    fn a_parked_retry_captures_first_and_retries_what_was_asked() {
        let mut t = Script::default();
        let out = retry_parked(&mut t, &mut clock(), 1_000, false).unwrap();
        assert_eq!(out.remaining, 3);
        assert_eq!(
            t.calls,
            [
                "follow_schema",
                "capture",
                "retry Requested",
                "parked_count",
                "save_clock"
            ]
        );
        let mut t = Script::default();
        retry_parked(&mut t, &mut clock(), 1_000, true).unwrap();
        assert!(t.calls.iter().any(|c| c == "retry All"));
    }

    #[test]
    fn a_parked_retry_that_applied_some_retries_the_batches_waiting_on_a_unique_value() {
        // A batch applied by the retry may have freed the value another waits on: without
        // this, nothing would wake that one again.
        let mut t = Script {
            parked_apply: true,
            waiting: true,
            waiting_apply: 1,
            ..Script::default()
        };
        let out = retry_parked(&mut t, &mut clock(), 1_000, true).unwrap();
        assert_eq!(out.applied, 2, "{:?}", t.calls);
        let at = |c: &str| t.calls.iter().position(|x| x == c).unwrap();
        assert!(at("retry All") < at("retry Waiting"), "{:?}", t.calls);
        assert!(at("retry Waiting") < at("parked_count"));
        // Nothing applied: nothing more is tried.
        let mut t = Script {
            waiting: true,
            ..Script::default()
        };
        retry_parked(&mut t, &mut clock(), 1_000, true).unwrap();
        assert!(
            !t.calls.iter().any(|c| c == "retry Waiting"),
            "{:?}",
            t.calls
        );
    }
}
