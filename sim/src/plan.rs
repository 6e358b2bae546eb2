//! A run's plan, drawn from its seed: how many nodes, which kinds of fault are switched on
//! (swarm testing: each run picks its own mix), and when each fault starts and ends.

use crate::workload::Generator;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// Which fault kinds a run uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Swarm {
    /// Node/broker partitions, both ways.
    pub partitions: bool,
    /// One-way partitions.
    pub one_way: bool,
    /// Messages held on a link, then released (delay and reordering).
    pub holds: bool,
    /// Duplicated deliveries.
    pub duplicates: bool,
    /// Node crashes and restarts.
    pub crashes: bool,
    /// Broker restarts.
    pub broker_restarts: bool,
    /// Per-node clock skew and jumps (backwards too).
    pub clocks: bool,
    /// Snapshots are taken, and the stream keeps few messages (nodes fall behind and restore).
    pub snapshots: bool,
}

/// One scheduled fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Cut node `node` from the broker (`one_way`: only node -> broker) for `for_`.
    Partition {
        /// Node index.
        node: usize,
        /// Only the node's direction.
        one_way: bool,
        /// How long.
        for_: Duration,
    },
    /// Hold messages between node and broker for `for_`, then release them at once.
    Hold {
        /// Node index.
        node: usize,
        /// How long.
        for_: Duration,
    },
    /// Crash node `node` (its memory is lost, its SQLite file survives) for `for_`.
    Crash {
        /// Node index.
        node: usize,
        /// How long.
        for_: Duration,
    },
    /// Crash the broker for `for_` (its stream survives, as JetStream's file store does).
    BrokerRestart {
        /// How long.
        for_: Duration,
    },
    /// Flip a byte of the newest snapshot in the store (readers must notice and skip it).
    CorruptSnapshot,
    /// Move node `node`'s wall clock by `delta_ms` (negative: backwards).
    ClockJump {
        /// Node index.
        node: usize,
        /// Milliseconds.
        delta_ms: i64,
    },
}

/// Everything a run does, derived from its seed.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The seed.
    pub seed: u64,
    /// Nodes (2 to 5).
    pub nodes: usize,
    /// Fault kinds switched on.
    pub swarm: Swarm,
    /// How long faults and writes go on.
    pub chaos: Duration,
    /// Faults, by start time.
    pub faults: Vec<(Duration, Fault)>,
    /// Starting clock skew per node, ms.
    pub skews: Vec<i64>,
    /// Mean pause between an application's transactions.
    pub write_gap: Duration,
    /// Share of writes that go to a few hot rows (contention).
    pub hot_share: f64,
    /// Broker duplicate window.
    pub dedupe_window: Duration,
    /// Chance of a duplicated delivery.
    pub duplicate_rate: f64,
    /// Largest message body fragment (small values split batches into chunks).
    pub max_fragment: usize,
    /// Network latency bounds.
    pub latency: (Duration, Duration),
    /// How often nodes renew their claim (and measure clock skew).
    pub claim_interval: Duration,
    /// Snapshot policy when snapshots are on: (every so many changes, at least this often).
    pub snapshot_every: Option<(u64, Duration)>,
    /// Messages the stream keeps.
    pub max_messages: usize,
    /// Tombstones older than this are collected when a snapshot is taken (zero: never). It
    /// stays longer than any outage a run can have, as the README requires.
    pub tombstone_ttl: Duration,
    /// A node that joins late, with an empty database: (node, when).
    pub late_join: Option<(usize, Duration)>,
    /// Which workload the applications run (and which generator drew this plan: a pinned
    /// seed keeps its generator, so it keeps doing what it did when it was pinned).
    pub generator: Generator,
    /// Share of transactions that rebuild table `t` (V2).
    pub rebuild_share: f64,
    /// Share of transactions that change the schema (V3).
    pub schema_share: f64,
    /// Applications sometimes hold the write lock across a pause (V2): marmot's capture,
    /// apply and restore meet SQLITE_BUSY.
    pub lock_holds: bool,
    /// Storage faults at the storage port, as FoundationDB's BUGGIFY (V2).
    pub storage_faults: Option<StorageFaults>,
    /// Snapshot uploads take this long during the chaos phase (V2): longer than the lease.
    pub slow_upload: Option<Duration>,
    /// This node's clock starts two hours ahead (V2, clock runs): it must not stamp until its
    /// clock is right (its batches would park everywhere, a stamp an hour ahead is refused).
    pub far_ahead: Option<usize>,
    /// Node-id claims, through which nodes check their clocks, answer this late (V2): a node
    /// reads the stream before its clock was checked.
    pub slow_claims: Option<Duration>,
}

/// Faults injected into a node's storage calls while the chaos phase lasts.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageFaults {
    /// Chance that a storage call fails with SQLITE_BUSY before doing anything.
    pub busy: f64,
    /// Chance that it fails with an I/O error before doing anything.
    pub io: f64,
    /// Chance, at each crash point inside the adapter (before and after every commit, between
    /// the transactions of one operation), that the node dies right there.
    pub crash: f64,
}

impl Plan {
    /// Draws the plan of `seed` with the current generator ([`Generator::current`]).
    pub fn from_seed(seed: u64) -> Plan {
        Plan::from_seed_with(seed, Generator::current())
    }

    /// Draws the plan of `seed` with generator `g`. V2 draws everything V1 draws, the same
    /// way, then its own additions.
    pub fn from_seed_with(seed: u64, g: Generator) -> Plan {
        let (mut plan, mut r) = Plan::v1(seed);
        if g == Generator::V1 {
            return plan;
        }
        plan.generator = Generator::V2;
        plan.rebuild_share = if r.random_bool(0.5) {
            r.random_range(0.005..0.04)
        } else {
            0.0
        };
        plan.lock_holds = r.random_bool(0.3);
        plan.storage_faults = r.random_bool(0.3).then(|| StorageFaults {
            busy: r.random_range(0.0..0.05),
            io: r.random_range(0.0..0.02),
            crash: r.random_range(0.0..0.004),
        });
        plan.slow_upload = (plan.swarm.snapshots && r.random_bool(0.3))
            .then(|| Duration::from_millis(r.random_range(8_000..=25_000)));
        plan.far_ahead =
            (plan.swarm.clocks && r.random_bool(0.25)).then(|| r.random_range(0..plan.nodes));
        if let Some(n) = plan.far_ahead {
            plan.skews[n] = 2 * 3_600_000;
        }
        plan.slow_claims = (plan.far_ahead.is_some() || r.random_bool(0.2))
            .then(|| Duration::from_millis(r.random_range(100..=1_500)));
        // While a slow upload holds the lease nobody else snapshots, so a node behind the
        // stream holds its writes that long: tombstones must outlive that (the README's rule:
        // longer than any node keeps unpublished writes).
        if let Some(slow) = plan.slow_upload
            && !plan.tombstone_ttl.is_zero()
        {
            plan.tombstone_ttl = plan.tombstone_ttl.max(slow * 3);
        }
        if g == Generator::V2 {
            return plan;
        }
        // V3 draws everything V2 draws, the same way, then its own.
        plan.generator = Generator::V3;
        plan.schema_share = r.random_range(0.02..0.12);
        if g == Generator::V3 {
            return plan;
        }
        // V4 draws everything V3 draws; its own changes take half of the schema share.
        plan.generator = Generator::V4;
        if g == Generator::V4 {
            return plan;
        }
        // V5 draws everything V4 draws; its writers reuse column names.
        plan.generator = Generator::V5;
        plan
    }

    /// The V1 generator, frozen: regressions 01 to 07 were found with it.
    fn v1(seed: u64) -> (Plan, ChaCha8Rng) {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x005e_ed0f_a1a2);
        let nodes = r.random_range(2..=5);
        let swarm = Swarm {
            partitions: r.random_bool(0.6),
            one_way: r.random_bool(0.4),
            holds: r.random_bool(0.5),
            duplicates: r.random_bool(0.5),
            crashes: r.random_bool(0.6),
            broker_restarts: r.random_bool(0.3),
            clocks: r.random_bool(0.5),
            snapshots: r.random_bool(0.5),
        };
        let chaos = Duration::from_millis(r.random_range(4_000..=10_000));
        let mut faults = Vec::new();
        let count = r.random_range(0..=8);
        for _ in 0..count {
            let at = Duration::from_millis(r.random_range(0..chaos.as_millis() as u64));
            let node = r.random_range(0..nodes);
            let for_ = Duration::from_millis(r.random_range(100..=4_000));
            let kind = r.random_range(0..7);
            let f = match kind {
                0 if swarm.partitions => Fault::Partition {
                    node,
                    one_way: false,
                    for_,
                },
                1 if swarm.one_way => Fault::Partition {
                    node,
                    one_way: true,
                    for_,
                },
                2 if swarm.holds => Fault::Hold { node, for_ },
                3 if swarm.crashes => Fault::Crash { node, for_ },
                4 if swarm.broker_restarts => Fault::BrokerRestart { for_ },
                5 if swarm.clocks => Fault::ClockJump {
                    node,
                    delta_ms: r.random_range(-20_000..=20_000),
                },
                6 if swarm.snapshots => Fault::CorruptSnapshot,
                _ => continue,
            };
            faults.push((at, f));
        }
        faults.sort_by_key(|(at, _)| *at);
        // Some nodes start beyond the 5 s bound: they must not stamp until the clock is sane.
        let skews = (0..nodes)
            .map(|_| {
                if swarm.clocks {
                    r.random_range(-8_000..=8_000)
                } else {
                    0
                }
            })
            .collect();
        let claim_interval = Duration::from_millis(r.random_range(500..=5_000));
        let snapshot_every = swarm.snapshots.then(|| {
            (
                r.random_range(10..=60),
                Duration::from_millis(r.random_range(1_000..=4_000)),
            )
        });
        let max_messages = if swarm.snapshots {
            r.random_range(15..=150)
        } else {
            1_000_000
        };
        // As the README asks of a configuration (and the daemon's default does): a snapshot
        // at least every half of what the stream keeps (a message carries one change or more).
        let snapshot_every =
            snapshot_every.map(|(n, every)| (n.min(max_messages as u64 / 2), every));
        let tombstone_ttl = if swarm.snapshots && r.random_bool(0.5) {
            Duration::from_secs(15)
        } else {
            Duration::ZERO
        };
        let plan = Plan {
            seed,
            nodes,
            chaos,
            faults,
            skews,
            write_gap: Duration::from_millis(r.random_range(20..=300)),
            hot_share: r.random_range(0.0..0.8),
            dedupe_window: Duration::from_millis(if r.random_bool(0.3) { 200 } else { 120_000 }),
            duplicate_rate: if swarm.duplicates {
                r.random_range(0.01..0.2)
            } else {
                0.0
            },
            max_fragment: if r.random_bool(0.3) { 64 } else { 512 * 1024 },
            latency: {
                let lo = r.random_range(0..=2);
                (
                    Duration::from_millis(lo),
                    Duration::from_millis(lo + r.random_range(1..=20)),
                )
            },
            claim_interval,
            late_join: (swarm.snapshots && r.random_bool(0.5)).then(|| {
                (
                    nodes - 1,
                    Duration::from_millis(r.random_range(1_000..=chaos.as_millis() as u64)),
                )
            }),
            snapshot_every,
            max_messages,
            tombstone_ttl,
            swarm,
            generator: Generator::V1,
            rebuild_share: 0.0,
            schema_share: 0.0,
            lock_holds: false,
            storage_faults: None,
            slow_upload: None,
            far_ahead: None,
            slow_claims: None,
        };
        (plan, r)
    }
}
