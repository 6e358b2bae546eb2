//! The conflict rule: per row, the version with the highest stamp wins (node id breaks
//! ties), on every node, whatever order the versions arrive in.
//!
//! A row's current version is kept even after a delete (a tombstone), so an older write that
//! arrives late cannot bring a deleted row back. Applying a version equal to the current one
//! changes nothing, which makes redelivered messages harmless.
//!
//! Each change also carries the version its writer replaced (its *base*). When an incoming
//! change wins and the local version is not its base, the writer never saw the local version:
//! the two writes were concurrent and the local one loses. That is a conflict worth a record.
//! A change that wins over its own base is plain succession, not a conflict.

use crate::hlc::Version;

/// What to do with an incoming row version.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The incoming version is newer: write it. `concurrent` is true when it replaces a
    /// version its writer had not seen (the local version loses a conflict).
    Apply {
        /// The local version lost to a concurrent write.
        concurrent: bool,
    },
    /// The incoming version is the current one already (a redelivery): nothing to do.
    Duplicate,
    /// The incoming version is older than the current one: it loses and is not written.
    Older,
}

/// The simulation's canary: a deliberately wrong rule the checker must catch.
#[cfg(feature = "sim-canary")]
pub mod canary {
    use std::cell::Cell;

    thread_local! {
        static LAST_ARRIVAL_WINS: Cell<bool> = const { Cell::new(false) };
        static SCHEMA_LAST_ARRIVAL_WINS: Cell<bool> = const { Cell::new(false) };
    }

    /// Switches this thread's merge rule to "last arrival wins" (what Go Marmot did).
    pub fn set_last_arrival_wins(on: bool) {
        LAST_ARRIVAL_WINS.with(|c| c.set(on));
    }

    /// Switches this thread's rule for schema changes to "last arrival wins": every change
    /// that arrives is applied, whatever its version (the schema canary).
    pub fn set_schema_last_arrival_wins(on: bool) {
        SCHEMA_LAST_ARRIVAL_WINS.with(|c| c.set(on));
    }

    /// Whether the schema canary is on for this thread (read by the storage adapter).
    pub fn schema_on() -> bool {
        SCHEMA_LAST_ARRIVAL_WINS.with(Cell::get)
    }

    pub(super) fn on() -> bool {
        LAST_ARRIVAL_WINS.with(Cell::get)
    }
}

/// Decides the fate of `incoming` (written over `base`) against the row's current version.
pub fn resolve(current: Option<Version>, incoming: Version, base: Option<Version>) -> Resolution {
    #[cfg(feature = "sim-canary")]
    if canary::on() {
        return if current == Some(incoming) {
            Resolution::Duplicate
        } else {
            Resolution::Apply { concurrent: false }
        };
    }
    match current {
        None => Resolution::Apply { concurrent: false },
        Some(cur) if incoming > cur => Resolution::Apply {
            concurrent: base != Some(cur),
        },
        Some(cur) if incoming == cur => Resolution::Duplicate,
        Some(_) => Resolution::Older,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Stamp;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn v(stamp: u64, node: u64) -> Version {
        Version {
            stamp: Stamp::from_u64(stamp),
            node,
        }
    }

    /// A replica of one table's rows under the rule: key -> (version, value or tombstone).
    #[derive(Default, Clone, PartialEq, Debug)]
    struct Replica {
        rows: BTreeMap<u8, (Version, Option<u32>)>,
        conflicts: u32,
    }

    impl Replica {
        fn apply(&mut self, key: u8, version: Version, value: Option<u32>) {
            let current = self.rows.get(&key).map(|(v, _)| *v);
            match resolve(current, version, None) {
                Resolution::Apply { concurrent } => {
                    if concurrent && current.is_some() {
                        self.conflicts += 1;
                    }
                    self.rows.insert(key, (version, value));
                }
                Resolution::Duplicate | Resolution::Older => {}
            }
        }
        fn visible(&self) -> BTreeMap<u8, u32> {
            self.rows
                .iter()
                .filter_map(|(k, (_, val))| val.map(|x| (*k, x)))
                .collect()
        }
    }

    fn change() -> impl Strategy<Value = (u8, Version, Option<u32>)> {
        (0u8..6, 1u64..40, 1u64..4, proptest::option::of(0u32..100))
            .prop_map(|(k, s, n, val)| (k, v(s, n), val))
    }

    /// Every version is unique per (stamp, node) in the real system: the same writer never
    /// stamps two different contents alike. Keep the generated history faithful to that.
    fn unique(changes: Vec<(u8, Version, Option<u32>)>) -> Vec<(u8, Version, Option<u32>)> {
        let mut seen = std::collections::BTreeSet::new();
        changes
            .into_iter()
            .filter(|(_, ver, _)| seen.insert(*ver))
            .collect()
    }

    proptest! {
        /// Order independence: any permutation of the same changes gives the same rows.
        #[test]
        fn any_delivery_order_converges(changes in proptest::collection::vec(change(), 0..40), seed in any::<u64>()) {
            let changes = unique(changes);
            let mut a = Replica::default();
            for (k, ver, val) in &changes { a.apply(*k, *ver, *val); }
            let mut shuffled = changes.clone();
            // A deterministic shuffle driven by the generated seed.
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut b = Replica::default();
            for (k, ver, val) in &shuffled { b.apply(*k, *ver, *val); }
            prop_assert_eq!(a.visible(), b.visible());
            prop_assert_eq!(
                a.rows.iter().map(|(k, (v, _))| (*k, *v)).collect::<Vec<_>>(),
                b.rows.iter().map(|(k, (v, _))| (*k, *v)).collect::<Vec<_>>()
            );
        }

        /// Idempotence: applying every change twice (redelivery) changes nothing.
        #[test]
        fn redelivery_is_harmless(changes in proptest::collection::vec(change(), 0..40)) {
            let changes = unique(changes);
            let mut once = Replica::default();
            for (k, ver, val) in &changes { once.apply(*k, *ver, *val); }
            let mut twice = once.clone();
            for (k, ver, val) in &changes { twice.apply(*k, *ver, *val); }
            prop_assert_eq!(once.visible(), twice.visible());
            prop_assert_eq!(once.conflicts, twice.conflicts);
        }

        /// The winner per key is the highest version, and a tombstone keeps older writes out.
        #[test]
        fn highest_version_wins_and_deletes_stay_deleted(changes in proptest::collection::vec(change(), 1..40)) {
            let changes = unique(changes);
            let mut r = Replica::default();
            for (k, ver, val) in &changes { r.apply(*k, *ver, *val); }
            for (k, (ver, val)) in &r.rows {
                let best = changes.iter().filter(|(ck, _, _)| ck == k).max_by_key(|(_, cv, _)| *cv).unwrap();
                prop_assert_eq!(*ver, best.1);
                prop_assert_eq!(*val, best.2);
            }
        }
    }

    #[test]
    fn succession_is_not_a_conflict_but_a_concurrent_write_is() {
        let a = v(10, 1);
        let b = v(20, 2);
        assert_eq!(
            resolve(Some(a), b, Some(a)),
            Resolution::Apply { concurrent: false }
        );
        assert_eq!(
            resolve(Some(a), b, None),
            Resolution::Apply { concurrent: true }
        );
        assert_eq!(resolve(Some(b), a, None), Resolution::Older);
        assert_eq!(resolve(Some(b), b, None), Resolution::Duplicate);
        assert_eq!(
            resolve(None, a, Some(v(5, 3))),
            Resolution::Apply { concurrent: false }
        );
    }
}
