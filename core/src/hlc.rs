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
///
/// How far ahead it may be taken by stamps from elsewhere is bounded ([`Clock::max_lead_ms`],
/// the node's `max_clock_skew_ms`): a received stamp further ahead of the time it was
/// received at is applied to its rows, but not taken into the clock, so one node whose clock
/// runs fast can neither drag every other clock ahead nor make them pause. A local write
/// still gets a stamp above the version it replaces, however far ahead that version is
/// ([`Clock::tick_above`]): last-writer-wins is per row, and needs no more than that.
#[derive(Clone, Debug)]
pub struct Clock {
    last: Stamp,
    max_lead_ms: u64,
}

/// The default bound on how far ahead a received stamp can take the clock (ms).
pub const DEFAULT_MAX_LEAD_MS: u64 = 5_000;

impl Clock {
    /// Starts the clock from a persisted high-water mark.
    pub fn new(high_water: Stamp) -> Clock {
        Clock {
            last: high_water,
            max_lead_ms: DEFAULT_MAX_LEAD_MS,
        }
    }

    /// The same clock, taking in received stamps up to `max_lead_ms` ahead of the time they
    /// were received at.
    pub fn with_max_lead(mut self, max_lead_ms: u64) -> Clock {
        self.max_lead_ms = max_lead_ms;
        self
    }

    /// How far ahead of the receiving time a received stamp may take the clock (ms).
    pub fn max_lead_ms(&self) -> u64 {
        self.max_lead_ms
    }

    /// Merges a stamp this node itself gave or holds for sure (its own persisted mark):
    /// every later [`Clock::tick`] is above it.
    pub fn observe(&mut self, seen: Stamp) {
        if seen > self.last {
            self.last = seen;
        }
    }

    /// Merges a stamp received from elsewhere at `reference_ms` (the stream's time of the
    /// message, or this node's wall time): up to [`Clock::max_lead_ms`] beyond it, no further.
    pub fn observe_remote(&mut self, seen: Stamp, reference_ms: u64) {
        self.observe(seen.min(self.ceiling(reference_ms)));
    }

    fn ceiling(&self, reference_ms: u64) -> Stamp {
        Stamp::new(reference_ms.saturating_add(self.max_lead_ms), 0)
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

    /// Takes a new stamp strictly above `floor` (the newest version a write replaces) too.
    /// A floor within [`Clock::max_lead_ms`] of `wall_ms` is taken into the clock; one
    /// further ahead is not (the stamp is then just above it, and the clock stays where it
    /// was): a row written far ahead by a fast clock elsewhere does not drag this clock.
    pub fn tick_above(&mut self, wall_ms: u64, floor: Stamp) -> Stamp {
        if floor <= self.ceiling(wall_ms) {
            self.observe(floor);
        }
        let s = self.tick(wall_ms);
        if s > floor {
            s
        } else {
            Stamp(floor.0.saturating_add(1))
        }
    }

    /// The highest stamp taken or observed: persist it so a restart never goes back.
    pub fn high_water(&self) -> Stamp {
        self.last
    }

    /// Brings the high-water mark back to `wall_ms`: for a node that stamped while its wall
    /// clock ran fast, before a check caught it, once its wall clock is right again. Its
    /// later stamps may then be below some it gave before; every write still gets a stamp
    /// above the version it replaces ([`Clock::tick_above`]), which is all the merge rule
    /// needs, and the node does not stop stamping until real time catches up.
    pub fn lower_to(&mut self, wall_ms: u64) {
        self.last = self.last.min(Stamp::new(wall_ms, 0));
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
    fn a_remote_stamp_far_ahead_does_not_drag_the_clock() {
        let mut c = Clock::new(Stamp::ZERO).with_max_lead(5_000);
        // Received at server time 10 s, stamped an hour ahead: taken in up to 15 s only.
        c.observe_remote(Stamp::new(3_600_000, 0), 10_000);
        assert_eq!(c.high_water(), Stamp::new(15_000, 0));
        // Within the bound it is taken in whole.
        let mut d = Clock::new(Stamp::ZERO).with_max_lead(5_000);
        d.observe_remote(Stamp::new(12_000, 3), 10_000);
        assert_eq!(d.high_water(), Stamp::new(12_000, 3));
    }

    #[test]
    fn a_write_over_a_far_future_version_is_stamped_above_it_without_moving_the_clock() {
        let mut c = Clock::new(Stamp::ZERO).with_max_lead(5_000);
        let far = Stamp::new(3_600_000, 9);
        let s = c.tick_above(1_000, far);
        assert!(s > far);
        assert_eq!(
            c.high_water(),
            Stamp::new(1_000, 0),
            "the clock stays where it was"
        );
        // The next write of another row is stamped from the wall clock again.
        assert_eq!(c.tick(1_001), Stamp::new(1_001, 0));
        // A floor within the bound moves the clock like any observed stamp.
        let near = Stamp::new(3_000, 4);
        let t = c.tick_above(1_002, near);
        assert_eq!(t, Stamp::new(3_000, 5));
        assert_eq!(c.high_water(), t);
    }

    #[test]
    fn lowering_the_high_water_mark_resumes_stamping_from_the_wall_clock() {
        let mut c = Clock::new(Stamp::new(3_600_000, 0));
        c.lower_to(1_000);
        assert_eq!(c.tick(1_000), Stamp::new(1_000, 1));
        // Never raises it.
        c.lower_to(9_000_000);
        assert_eq!(c.high_water(), Stamp::new(1_000, 1));
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
        /// Whatever is observed from elsewhere and however far ahead the versions it
        /// replaces are, a write is stamped above its floor, and the clock never leads the
        /// time of any observation by more than the bound.
        #[test]
        fn writes_beat_their_floor_and_the_clock_stays_within_its_lead(
            steps in proptest::collection::vec((0u64..1u64 << 40, 0u64..1u64 << 41, any::<bool>()), 1..200),
        ) {
            let mut c = Clock::new(Stamp::ZERO).with_max_lead(5_000);
            let mut wall = 0u64;
            for (advance, seen_ms, write) in steps {
                wall = wall.max(advance);
                let seen = Stamp::new(seen_ms, 0);
                if write {
                    let s = c.tick_above(wall, seen);
                    prop_assert!(s > seen);
                } else {
                    c.observe_remote(seen, wall);
                }
                prop_assert!(c.high_water() <= Stamp::new(wall + 5_000, u16::MAX).max(Stamp::new(wall, u16::MAX)));
            }
        }

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
