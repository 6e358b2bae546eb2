//! # sim
//!
//! Deterministic simulation of marmot. Several nodes run the daemon's drive loop, core and
//! SQLite adapter on real SQLite files; applications write random SQL straight into those
//! files; a simulated broker implements the JetStream behaviour marmot relies on over
//! turmoil's simulated network; faults (partitions, held and reordered messages, duplicated
//! deliveries, crashes, broker restarts, clock skew and jumps) are drawn per seed. A checker
//! watches the safety invariants while the run goes on and, after the faults stop, demands
//! that every node converges to the state an oracle computes from every committed write.
//!
//! See SIMULATION.md for the model, the invariants and how to replay a seed.
#![warn(missing_docs)]

mod app;
pub mod broker;
pub mod check;
pub mod conformance;
mod host;
pub mod oracle;
pub mod plan;
pub mod proto;
mod recorded;
pub mod report;
pub mod transport;
pub mod workload;
pub mod world;

pub use plan::Plan;
pub use report::{Failure, Outcome, Report};
pub use workload::Generator;
pub use world::{run_plan_watched, run_seed, run_seed_watched, run_seed_with_schema_canary};
