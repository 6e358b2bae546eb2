//! The node's deadlines, one table: quinn-proto's `TimerTable`, with str0m's timeout reason.
//!
//! Each job of the node has at most one deadline here. It is set while the job is possible
//! (its gates open) and cleared while it is blocked, so [`Node::poll_timeout`] is simply the
//! earliest entry, and it names the [`Timer`] that set it. Two entries are armed whenever
//! they are set, gates or not: [`Timer::Poll`] and [`Timer::Recheck`] only mark a capture
//! as wanted (always possible); the capture itself waits for its gates. The table is armed from the same
//! functions `step` asks whether a job is due: the two cannot drift apart (they did once:
//! regression 01, a drive loop that woke itself forever for a job that could not run).
//!
//! [`Node::poll_timeout`]: super::Node::poll_timeout

use std::time::Duration;

/// One deadline of the node.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// Prepare the stream (again, after a failure).
    Stream,
    /// Claim the node id: renewal, or retry after a failure (each claim measures clock skew).
    Claim,
    /// Look for local changes even without a hint: the fallback poll.
    Poll,
    /// Look again shortly after a hint (the writer's commit may not have been visible yet).
    Recheck,
    /// Capture again after a failed capture.
    Capture,
    /// Fetch a snapshot to restore from (first attempt or retry).
    Restore,
    /// Take a snapshot (its interval, or enough changes since the last one).
    Snapshot,
    /// Retry parked batches: one a person asked for (checked now and then), or all of them.
    RetryParked,
    /// Subscribe to the stream (again, after the subscription failed or ended).
    Subscribe,
    /// Report batches still waiting for chunks again.
    IncompleteAlarm,
    /// Report again that this node is behind the stream.
    BehindAlarm,
    /// Apply the apply queue (again, after a failed apply).
    Apply,
    /// Publish the publish queue (again, after a failed publish).
    Publish,
    /// Stop waiting for the outbox to drain and stop.
    Shutdown,
}

impl Timer {
    /// Every timer, in table order.
    pub const ALL: [Timer; 14] = [
        Timer::Stream,
        Timer::Claim,
        Timer::Poll,
        Timer::Recheck,
        Timer::Capture,
        Timer::Restore,
        Timer::Snapshot,
        Timer::RetryParked,
        Timer::Subscribe,
        Timer::IncompleteAlarm,
        Timer::BehindAlarm,
        Timer::Apply,
        Timer::Publish,
        Timer::Shutdown,
    ];
}

/// A deadline per [`Timer`], or none.
#[derive(Clone, Debug, Default)]
pub(crate) struct TimerTable {
    deadlines: [Option<Duration>; Timer::ALL.len()],
}

impl TimerTable {
    /// Arms `timer` at `deadline`, or clears it (`None`: its job is blocked).
    pub(crate) fn set(&mut self, timer: Timer, deadline: Option<Duration>) {
        self.deadlines[timer as usize] = deadline;
    }

    /// The deadline of `timer`, if armed.
    pub(crate) fn get(&self, timer: Timer) -> Option<Duration> {
        self.deadlines[timer as usize]
    }

    /// The earliest armed deadline and the timer that set it (the first in table order on a
    /// tie).
    pub(crate) fn next(&self) -> Option<(Duration, Timer)> {
        Timer::ALL
            .iter()
            .filter_map(|&t| self.get(t).map(|d| (d, t)))
            .min_by_key(|&(d, _)| d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_armed_deadline_wins_and_names_its_timer() {
        let mut t = TimerTable::default();
        assert_eq!(t.next(), None);
        t.set(Timer::Poll, Some(Duration::from_millis(1000)));
        t.set(Timer::Publish, Some(Duration::from_millis(200)));
        t.set(Timer::Apply, Some(Duration::from_millis(300)));
        assert_eq!(t.next(), Some((Duration::from_millis(200), Timer::Publish)));
        t.set(Timer::Publish, None);
        assert_eq!(t.next(), Some((Duration::from_millis(300), Timer::Apply)));
        // A tie goes to the first in table order.
        t.set(Timer::Stream, Some(Duration::from_millis(300)));
        assert_eq!(t.next(), Some((Duration::from_millis(300), Timer::Stream)));
    }
}
