//! Node state machine tests: each drives the node by hand and checks what it asks for.

use super::*;
use crate::apply::ApplyReport;
use crate::ports::{CaptureOutcome, TransportErrorKind};
use crate::ports::{Claim, StreamBounds, TransportError};
use crate::snapshot::{Fetched, SaveOutcome, StagedSnapshot};
use crate::wire::BatchId;
use bytes::Bytes;

mod clock;
mod inbox;
mod lifecycle;
mod outbox;
mod snapshots;

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) fn batch(seq: u64) -> BatchId {
    BatchId {
        origin: 1,
        incarnation: 1,
        seq,
    }
}

pub(super) fn captured(seq: u64, chunks: usize) -> Captured {
    Captured {
        batch: batch(seq),
        stamp: Stamp::new(1000, 0),
        rows: 1,
        tables: vec![],
        messages: (0..chunks).map(|i| Bytes::from(vec![i as u8])).collect(),
        schema: false,
    }
}

pub(super) fn delivery(seq: u64) -> Delivery {
    Delivery {
        stream_seq: seq,
        payload: Bytes::from_static(b"x"),
        published_ms: 0,
        pending: 0,
    }
}

pub(super) fn recovered(position: u64, outbox: Vec<(BatchId, u32)>) -> Recovered {
    Recovered {
        position,
        clock: Stamp::ZERO,
        outbox,
        incarnation: 1,
        incomplete_batches: 0,
        parked: 0,
        empty: false,
        outbox_oldest_ms: None,
        wall_ms: 0,
    }
}

pub(super) fn drain(n: &mut Node) -> Vec<Output> {
    std::iter::from_fn(|| n.poll_output()).collect()
}

pub(super) fn has(outs: &[Output], f: impl Fn(&Output) -> bool) -> bool {
    outs.iter().any(f)
}

/// A node that recovered, prepared the stream and holds its claim; its first capture found
/// nothing. Returns the outputs it asked for on the way.
pub(super) fn ready_with(position: u64, outbox: Vec<(BatchId, u32)>) -> (Node, Vec<Output>) {
    ready_configured(NodeConfig::new(1, "db-a"), position, outbox)
}

pub(super) fn ready_configured(
    cfg: NodeConfig,
    position: u64,
    outbox: Vec<(BatchId, u32)>,
) -> (Node, Vec<Output>) {
    let mut n = Node::new(cfg);
    let mut outs = Vec::new();
    n.handle(ms(0), Input::Recovered(recovered(position, outbox)));
    outs.extend(drain(&mut n));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 0,
        })),
    );
    outs.extend(drain(&mut n));
    n.handle(
        ms(0),
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 1000,
                revision: 1,
            }),
            sent_wall_ms: 1000,
            received_wall_ms: 1000,
        },
    );
    let after_claim = drain(&mut n);
    assert!(
        after_claim.iter().any(|o| matches!(o, Output::Capture)),
        "the first capture comes once the clock was checked"
    );
    outs.extend(after_claim);
    n.handle(ms(0), Input::Captured(Ok(CaptureOutcome::default())));
    outs.extend(drain(&mut n));
    (n, outs)
}

pub(super) fn ready(position: u64, outbox: Vec<(BatchId, u32)>) -> Node {
    ready_with(position, outbox).0
}

/// The subscription of `generation` succeeded on a stream holding `first_seq..=last_seq`.
pub(super) fn subscribed(generation: u64, first_seq: u64, last_seq: u64) -> Input {
    Input::Subscribed {
        generation,
        result: Ok(StreamBounds {
            first_seq,
            last_seq,
        }),
    }
}

pub(super) fn unavailable() -> TransportError {
    TransportError::unavailable("no servers")
}

/// The node's clock was checked against the server (its claim was granted, server and local
/// clocks agreeing).
pub(super) fn clock_checked(n: &mut Node, at: Duration) {
    n.handle(
        at,
        Input::Claimed {
            result: Ok(Claim::Granted {
                server_ms: 1000,
                revision: 1,
            }),
            sent_wall_ms: 1000,
            received_wall_ms: 1000,
        },
    );
}

pub(super) fn snapshot_node(every_changes: u64) -> Node {
    let mut cfg = NodeConfig::new(1, "db-a");
    cfg.snapshots = Some(SnapshotPolicy {
        every_changes,
        interval: None,
        restore_empty: true,
    });
    Node::new(cfg)
}

pub(super) fn staged(position: u64) -> StagedSnapshot {
    StagedSnapshot {
        info: crate::snapshot::SnapshotInfo {
            format: 1,
            generation: 3,
            object: "snapshot-x".into(),
            position,
            node: 2,
            created_ms: 1,
            size: 1,
            raw_size: 1,
            checksum: "00".into(),
            horizon_ms: 0,
            schema_digest: String::new(),
        },
        path: std::path::PathBuf::from("/tmp/staged.db"),
    }
}

pub(super) fn restored(position: u64) -> Input {
    Input::Restored(Ok(RestoreReport {
        position,
        generation: 3,
        merged: false,
        captured: None,
    }))
}

/// Like [`ready_configured`], for a node that does not capture (no first capture).
pub(super) fn ready_configured_receive_only(cfg: NodeConfig) -> (Node, Vec<Output>) {
    let mut n = Node::new(cfg);
    let mut outs = Vec::new();
    n.handle(ms(0), Input::Recovered(recovered(1, vec![])));
    n.handle(
        ms(0),
        Input::Prepared(Ok(StreamBounds {
            first_seq: 1,
            last_seq: 1,
        })),
    );
    outs.extend(drain(&mut n));
    clock_checked(&mut n, ms(0));
    outs.extend(drain(&mut n));
    (n, outs)
}
