//! The link to the stream: preparing it, claiming this node's id, and checking the clock
//! against the server's with every claim.
//!
//! It owns the gates every stamping job waits on: the stream is ready, the node id was
//! granted once (so the clock was checked), and the stamps this node would give do not lead
//! the server by more than the bound. It never stamps, captures or publishes itself.

use super::{Backoff, Event, NodeConfig, Output, Outputs, Phase, Stop, Timer, TimerTable, due};
use crate::hlc::Clock;
use crate::ports::{Claim, StreamBounds, TransportError};
use std::time::Duration;

pub(super) struct Link {
    stream: Phase,
    stream_backoff: Backoff,
    claim: Phase,
    claim_backoff: Backoff,
    /// The node id was granted at least once: the clock was checked against the server.
    claimed_once: bool,
    /// The last claim renewal reached the transport.
    connected: bool,
    /// How far the stamps this node would give led the server at the last check (ms).
    skew_ms: i64,
    /// They led by more than the bound: every stamping job waits.
    skew_paused: bool,
    /// The server's clock at the last check, and when (monotonic): see `stamp_time`.
    server_time: Option<(Duration, u64)>,
}

impl Link {
    pub(super) fn new(cfg: &NodeConfig) -> Self {
        Link {
            stream: Phase::Idle,
            stream_backoff: Backoff::new(cfg),
            claim: Phase::Idle,
            claim_backoff: Backoff::new(cfg),
            claimed_once: false,
            connected: false,
            skew_ms: 0,
            skew_paused: false,
            server_time: None,
        }
    }

    pub(super) fn stream_ready(&self) -> bool {
        self.stream == Phase::Ready
    }

    pub(super) fn claimed(&self) -> bool {
        self.claimed_once
    }

    pub(super) fn connected(&self) -> bool {
        self.connected
    }

    /// The stamps this node would give lead the server by more than the bound.
    pub(super) fn clock_paused(&self) -> bool {
        self.skew_paused
    }

    pub(super) fn skew_ms(&self) -> i64 {
        self.skew_ms
    }

    /// The wall time to stamp with at monotonic time `now`, given the local wall clock reads
    /// `wall_ms`: the later of the local wall clock and the server's clock as last measured
    /// plus the monotonic time since. A wall clock that lags the server's does not stamp into
    /// the past (stamps far in the past would fall below the tombstone horizon of snapshots
    /// taken meanwhile, whose merge takes such a version, absent from the snapshot, for a
    /// collected delete); the estimate follows monotonic time, so a wall clock that jumps
    /// forward after the check adds nothing to it.
    pub(super) fn stamp_time(&self, now: Duration, wall_ms: u64) -> u64 {
        match self.server_time {
            Some((at, server_ms)) => {
                let since = now.saturating_sub(at).as_millis() as u64;
                wall_ms.max(server_ms.saturating_add(since))
            }
            None => wall_ms,
        }
    }

    pub(super) fn on_prepared(
        &mut self,
        now: Duration,
        r: Result<StreamBounds, TransportError>,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) {
        match r {
            Ok(bounds) => {
                self.stream = Phase::Ready;
                self.stream_backoff.reset(cfg);
                out.event(Event::StreamReady { bounds });
            }
            Err(error) => {
                let retry_in = self.stream_backoff.fail(cfg);
                self.stream = Phase::RetryAt(now + retry_in);
                out.event(Event::StreamUnavailable { error, retry_in });
            }
        }
    }

    /// A claim's answer. Returns why the node must stop, if it must (another live node holds
    /// this node id).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_claimed(
        &mut self,
        now: Duration,
        result: Result<Claim, TransportError>,
        sent: u64,
        received: u64,
        clock: &mut Clock,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) -> Option<Stop> {
        match result {
            Ok(Claim::Granted { server_ms, .. }) => {
                self.connected = true;
                if !self.claimed_once {
                    out.event(Event::ClaimGranted);
                }
                self.claimed_once = true;
                self.claim_backoff.reset(cfg);
                self.claim = Phase::RetryAt(now + cfg.claim_interval);
                self.check_clock(now, server_ms, sent, received, clock, cfg, out);
                None
            }
            Ok(Claim::Held { by }) => Some(Stop::NodeIdInUse { holder: by }),
            Err(error) => {
                self.connected = false;
                let retry_in = self.claim_backoff.fail(cfg);
                self.claim = Phase::RetryAt(now + retry_in);
                out.event(Event::ClaimFailed { error });
                None
            }
        }
    }

    /// Measures the skew of the stamps this node would give against the server's clock,
    /// which stamped the claim between our two readings.
    #[allow(clippy::too_many_arguments)]
    fn check_clock(
        &mut self,
        now: Duration,
        server_ms: u64,
        sent: u64,
        received: u64,
        clock: &mut Clock,
        cfg: &NodeConfig,
        out: &mut Outputs,
    ) {
        let local_mid = sent / 2 + received / 2 + (sent % 2 + received % 2) / 2;
        let uncertainty = (received.saturating_sub(sent) / 2) as i64;
        let bound = cfg.max_clock_skew_ms as i64;
        let wall_skew = local_mid as i64 - server_ms as i64;
        // The server's clock as of now; a wall clock that lags stamps with it instead (see
        // `stamp_time`).
        self.server_time = Some((now, server_ms));
        // The stamps this node would give follow the later of its wall clock and its
        // high-water mark. A high-water mark that leads while the wall clock is right (it
        // stamped while the wall clock ran fast, before a check caught it) is brought back:
        // waiting for real time to catch up would stop this node for as long as the clock
        // had jumped.
        let mut lowered = false;
        let hw_skew = clock.high_water().wall_ms() as i64 - server_ms as i64;
        if wall_skew - uncertainty <= bound && hw_skew - uncertainty > bound {
            clock.lower_to(received.max(server_ms));
            lowered = true;
        }
        let stamp_skew = wall_skew.max(clock.high_water().wall_ms() as i64 - server_ms as i64);
        // Only a lead beyond the bound plus the measurement's own uncertainty pauses.
        let ahead = stamp_skew - uncertainty > bound;
        let changed = ahead != self.skew_paused;
        self.skew_ms = stamp_skew;
        self.skew_paused = ahead;
        if changed || ahead || lowered {
            out.event(Event::ClockSkew {
                skew_ms: stamp_skew,
                paused: ahead,
                lowered_high_water: lowered.then_some(hw_skew),
            });
        }
    }

    /// Prepare the stream: at once at start, again after a failure.
    fn stream_due(&self) -> Option<Duration> {
        match self.stream {
            Phase::Idle => Some(Duration::ZERO),
            Phase::RetryAt(at) => Some(at),
            Phase::Pending | Phase::Ready => None,
        }
    }

    /// Claim the node id once the stream is ready; renew it every claim interval.
    fn claim_due(&self) -> Option<Duration> {
        if !self.stream_ready() {
            return None;
        }
        match self.claim {
            Phase::Idle => Some(Duration::ZERO),
            Phase::RetryAt(at) => Some(at),
            Phase::Pending | Phase::Ready => None,
        }
    }

    pub(super) fn arm(&self, timers: &mut TimerTable) {
        timers.set(Timer::Stream, self.stream_due());
        timers.set(Timer::Claim, self.claim_due());
    }

    /// The stream, then the claim on our node id.
    pub(super) fn step(&mut self, now: Duration, out: &mut Outputs) {
        if due(now, self.stream_due()) {
            self.stream = Phase::Pending;
            out.push(Output::Prepare);
        }
        if due(now, self.claim_due()) {
            self.claim = Phase::Pending;
            out.push(Output::Claim);
        }
    }
}
