//! What a run tells: how it failed ([`Failure`], [`Report`], with the command that replays
//! it) or what it did ([`Outcome`]), and its trace's hash.

use crate::plan::Plan;
use marmot_core::node::Event;
use std::time::Duration;

/// After the faults stop, every node must converge within this much simulated time.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(60);

/// How a run failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// An invariant was violated while running.
    Safety {
        /// Which invariant.
        invariant: &'static str,
        /// What was seen.
        detail: String,
    },
    /// The nodes did not converge to the expected state in time after the faults stopped.
    Liveness {
        /// What differed.
        detail: String,
    },
    /// The simulation itself broke (a host returned an error, a node stopped).
    Crash {
        /// What happened.
        detail: String,
    },
}

impl Failure {
    /// "safety", "liveness" or "crash".
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Safety { .. } => "safety",
            Failure::Liveness { .. } => "liveness",
            Failure::Crash { .. } => "crash",
        }
    }
}

/// What a successful run did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Hash of the run's trace (every event, in order, with its simulated time).
    pub trace_hash: u64,
    /// Events in the trace.
    pub trace_len: usize,
    /// The trace itself (for the determinism test).
    pub trace: Vec<String>,
    /// Simulated time until convergence.
    pub sim_time: Duration,
    /// Application transactions committed.
    pub transactions: usize,
    /// Batches captured.
    pub captures: usize,
}

/// A failed run, with everything needed to replay it.
#[derive(Clone, Debug)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// What failed.
    pub failure: Failure,
    /// Simulated time of the failure.
    pub at: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "simulation seed {} failed ({}) at {:?} of simulated time:",
            self.plan.seed,
            self.failure.kind(),
            self.at
        )?;
        match &self.failure {
            Failure::Safety { invariant, detail } => {
                writeln!(f, "  safety invariant violated: {invariant}\n  {detail}")?
            }
            Failure::Liveness { detail } => writeln!(f, "  liveness: {detail}")?,
            Failure::Crash { detail } => writeln!(f, "  {detail}")?,
        }
        writeln!(f, "  plan: {:#?}", self.plan)?;
        write!(
            f,
            "  replay: {}SIM_SEED={} cargo test -p sim --release -- --nocapture replay_one_seed",
            self.plan.generator.env_prefix(),
            self.plan.seed
        )
    }
}

/// The trace line of an event: its `Debug` form, but `StorageFailed` keeps the shape it had
/// before storage errors were typed (operation name and message), so that the trace hashes
/// of earlier builds stay comparable.
pub(crate) fn trace_event(e: &Event) -> String {
    match e {
        Event::StorageFailed { error, retry_in } => format!(
            "StorageFailed {{ operation: {:?}, error: {:?}, retry_in: {retry_in:?} }}",
            error.operation.name(),
            error.message
        ),
        e => format!("{e:?}"),
    }
}

/// Marks a trace line that says which timer woke a node.
pub(crate) const TIMER: &str = "timer";

/// The trace's hash: every line but those naming the timer that woke a node (a refactoring
/// of the node's timers must reproduce the hashes of earlier builds; see `SIM_TRACE_HASHES`).
pub(crate) fn fnv(trace: &[String]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for line in trace.iter().filter(|l| l.split(' ').nth(2) != Some(TIMER)) {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}
