//! Hybrid logical clock stamps and row versions.
//!
//! A [`Stamp`] packs physical milliseconds (upper 48 bits) and a logical counter (lower 16
//! bits) into one `u64`, so stamps order as integers. A new stamp is
//! `max(wall << 16, last + 1)`: it follows wall time when wall time advances, and otherwise
//! counts in the low bits (a counter overflow carries into the milliseconds, which only
//! happens above 65,536 stamps in one millisecond). One stamp is taken per captured batch,
//! not per row, so the clock never runs ahead of real time under load.
//!
//! The clock never reads time itself: wall time comes in as an argument.

/// Identifies a node of the cluster. Unique per cluster; `0` is reserved for "nobody"
/// (rows that existed before marmot started carry no version at all).
pub type NodeId = u64;

const COUNTER_BITS: u32 = 16;
/// The largest wall time, in milliseconds since the Unix epoch, a stamp can carry.
pub const MAX_WALL_MS: u64 = (1 << (64 - COUNTER_BITS)) - 1;

/// A hybrid logical clock reading.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp(u64);

impl Stamp {
    /// The stamp below every real stamp.
    pub const ZERO: Stamp = Stamp(0);

    /// Builds a stamp from wall milliseconds and a logical counter.
    pub fn new(wall_ms: u64, counter: u16) -> Stamp {
        Stamp((wall_ms.min(MAX_WALL_MS) << COUNTER_BITS) | u64::from(counter))
    }

    /// The stamp as stored and sent (an opaque, ordered integer).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Rebuilds a stamp from [`Stamp::as_u64`].
    pub fn from_u64(raw: u64) -> Stamp {
        Stamp(raw)
    }

    /// Physical part: milliseconds since the Unix epoch.
    pub fn wall_ms(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    /// Logical part.
    pub fn counter(self) -> u16 {
        (self.0 & ((1 << COUNTER_BITS) - 1)) as u16
    }
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.wall_ms(), self.counter())
    }
}

/// The version of one row: who wrote it and when. Versions are totally ordered: by stamp,
/// then by node id, so two nodes that stamp the same instant still have one winner.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// When the row was written (hybrid logical clock).
    pub stamp: Stamp,
    /// The node whose application wrote it.
    pub node: NodeId,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@node{}", self.stamp, self.node)
    }
}

/// The hybrid logical clock of one node.
#[derive(Clone, Debug)]
pub struct Clock {
    last: Stamp,
}

impl Clock {
    /// Starts the clock from a persisted high-water mark.
    pub fn new(high_water: Stamp) -> Clock {
        Clock { last: high_water }
    }

    /// Merges a stamp seen elsewhere (a remote row, a stored version): every later
    /// [`Clock::tick`] is above it.
    pub fn observe(&mut self, seen: Stamp) {
        if seen > self.last {
            self.last = seen;
        }
    }

    /// Takes a new stamp, strictly above every stamp taken or observed before.
    pub fn tick(&mut self, wall_ms: u64) -> Stamp {
        let physical = Stamp::new(wall_ms, 0);
        let next = if physical > self.last {
            physical
        } else {
            // Cannot overflow in practice: it needs a clock at year 10889.
            Stamp(self.last.0.saturating_add(1))
        };
        self.last = next;
        next
    }

    /// The highest stamp taken or observed: persist it so a restart never goes back.
    pub fn high_water(&self) -> Stamp {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn follows_wall_time_and_counts_when_it_stalls() {
        let mut c = Clock::new(Stamp::ZERO);
        let a = c.tick(1000);
        assert_eq!((a.wall_ms(), a.counter()), (1000, 0));
        let b = c.tick(1000);
        assert_eq!((b.wall_ms(), b.counter()), (1000, 1));
        // Wall time going backwards does not move the clock back.
        let d = c.tick(10);
        assert_eq!((d.wall_ms(), d.counter()), (1000, 2));
        let e = c.tick(2000);
        assert_eq!((e.wall_ms(), e.counter()), (2000, 0));
    }

    #[test]
    fn observing_a_remote_stamp_puts_the_next_tick_above_it() {
        let mut c = Clock::new(Stamp::ZERO);
        c.observe(Stamp::new(5000, 7));
        let s = c.tick(1000);
        assert!(s > Stamp::new(5000, 7));
        assert_eq!(s.wall_ms(), 5000);
    }

    #[test]
    fn counter_overflow_carries_into_milliseconds() {
        let mut c = Clock::new(Stamp::new(100, u16::MAX));
        let s = c.tick(100);
        assert_eq!((s.wall_ms(), s.counter()), (101, 0));
    }

    #[test]
    fn versions_break_stamp_ties_by_node() {
        let s = Stamp::new(1, 0);
        assert!(Version { stamp: s, node: 2 } > Version { stamp: s, node: 1 });
        assert!(
            Version {
                stamp: Stamp::new(2, 0),
                node: 1
            } > Version { stamp: s, node: 9 }
        );
    }

    proptest! {
        /// Whatever the wall clock does (jumps, goes back) and whatever is observed, stamps
        /// strictly increase and stay above everything observed.
        #[test]
        fn stamps_strictly_increase(
            start in 0u64..1u64 << 40,
            steps in proptest::collection::vec((0u64..1u64 << 41, proptest::option::of(0u64..1u64 << 56)), 1..200),
        ) {
            let mut c = Clock::new(Stamp::from_u64(start));
            let mut last = Stamp::from_u64(start);
            for (wall, seen) in steps {
                if let Some(seen) = seen {
                    c.observe(Stamp::from_u64(seen));
                    last = last.max(Stamp::from_u64(seen));
                }
                let s = c.tick(wall);
                prop_assert!(s > last);
                prop_assert!(s.wall_ms() >= wall.min(MAX_WALL_MS) || s > Stamp::new(wall, 0));
                last = s;
            }
        }

        /// A restart from the persisted high-water mark never hands out an older stamp.
        #[test]
        fn restart_from_high_water_never_goes_back(walls in proptest::collection::vec(0u64..1u64 << 41, 1..50), restart_wall in 0u64..1u64 << 41) {
            let mut c = Clock::new(Stamp::ZERO);
            let mut last = Stamp::ZERO;
            for w in walls { last = c.tick(w); }
            let mut restarted = Clock::new(c.high_water());
            prop_assert!(restarted.tick(restart_wall) > last);
        }
    }
}
