//! The node's vocabulary: what goes in ([`Input`]), what comes out ([`Output`], [`Event`],
//! [`Stop`]) and what it reports when asked ([`Status`]).

use super::RestoreReason;
use crate::apply::Delivery;
use crate::ports::{
    ApplyOutcome, CaptureOutcome, Claim, ParkedRetry, Recovered, RestoreReport, StorageError,
    StreamBounds, TransportError,
};
use crate::snapshot::{Fetched, SaveOutcome, StagedSnapshot};
use crate::wire::BatchId;
use bytes::Bytes;
use std::time::Duration;

/// Something that happened to the node.
#[derive(Debug)]
pub enum Input {
    /// The persisted state, read at start. Must come first.
    Recovered(Recovered),
    /// The database may have changed (a wake-up hint, not a promise).
    LocalChange,
    /// Result of [`Output::Capture`].
    Captured(Result<CaptureOutcome, StorageError>),
    /// Result of [`Output::Prepare`].
    Prepared(Result<StreamBounds, TransportError>),
    /// Result of [`Output::Claim`], with local wall time read just before and after.
    Claimed {
        /// What the transport answered.
        result: Result<Claim, TransportError>,
        /// Wall time before sending the claim.
        sent_wall_ms: u64,
        /// Wall time after the answer.
        received_wall_ms: u64,
    },
    /// Result of [`Output::Subscribe`]; deliveries follow when it succeeded.
    Subscribed {
        /// The subscription's generation.
        generation: u64,
        /// Its extent, or why it failed.
        result: Result<StreamBounds, TransportError>,
    },
    /// Messages from the subscription, in the order received.
    Delivered {
        /// The subscription's generation.
        generation: u64,
        /// The messages.
        deliveries: Vec<Delivery>,
    },
    /// The subscription ended (error or end of stream).
    SubscriptionEnded {
        /// The subscription's generation.
        generation: u64,
        /// Why, if known.
        error: Option<TransportError>,
    },
    /// Result of one [`Output::Publish`].
    Published {
        /// Which batch.
        batch: BatchId,
        /// Which chunk.
        chunk: u32,
        /// The stream sequence it was stored at, or why not.
        result: Result<u64, TransportError>,
    },
    /// Result of [`Output::Apply`]; on failure the deliveries come back to be retried.
    Applied {
        /// What storage did, or why it failed.
        result: Result<ApplyOutcome, StorageError>,
        /// The deliveries of the matching output.
        deliveries: Vec<Delivery>,
        /// Wall time after applying, for lag.
        wall_ms: u64,
    },
    /// Result of [`Output::MarkPublished`].
    MarkedPublished(Result<(), StorageError>),
    /// Result of [`Output::RetryParked`].
    ParkedRetried(Result<ParkedRetry, StorageError>),
    /// Result of [`Output::SaveSnapshot`].
    SnapshotSaved(Result<SaveOutcome, String>),
    /// Result of [`Output::FetchSnapshot`].
    SnapshotFetched(Result<Fetched, String>),
    /// Result of [`Output::RestoreSnapshot`].
    Restored(Result<RestoreReport, StorageError>),
    /// Stop: publish what is pending (within the grace period), then [`Output::Stop`].
    Shutdown,
    /// Time passed.
    Tick,
}

/// Something the node asks the world to do, or tells it.
#[derive(Debug)]
pub enum Output {
    /// Call [`crate::ports::Storage::capture`]; answer with [`Input::Captured`].
    Capture,
    /// Call [`crate::ports::Transport::prepare`]; answer with [`Input::Prepared`].
    Prepare,
    /// Call [`crate::ports::Transport::claim`]; answer with [`Input::Claimed`].
    Claim,
    /// Drop any subscription, subscribe from `from_seq`; answer with [`Input::Subscribed`]
    /// and report its deliveries and end with the same `generation`.
    Subscribe {
        /// First sequence wanted.
        from_seq: u64,
        /// Identifies this subscription; results of older ones are ignored.
        generation: u64,
    },
    /// Drop the subscription of this generation (if it is the current one).
    Unsubscribe {
        /// Which subscription.
        generation: u64,
    },
    /// Publish one message; `payload` is `None` when it must be read from the outbox.
    /// Answer with [`Input::Published`].
    Publish {
        /// Which batch.
        batch: BatchId,
        /// Which chunk.
        chunk: u32,
        /// The message, if still in memory.
        payload: Option<Bytes>,
    },
    /// Call [`crate::ports::Storage::apply`]; answer with [`Input::Applied`].
    Apply(Vec<Delivery>),
    /// Call [`crate::ports::Storage::mark_published`].
    MarkPublished(BatchId),
    /// Call [`crate::ports::Storage::retry_parked`].
    RetryParked {
        /// Retry all parked batches, not only those a user asked for.
        all: bool,
    },
    /// Call [`crate::ports::Snapshots::save`]; answer with [`Input::SnapshotSaved`].
    SaveSnapshot {
        /// This node's position.
        position: u64,
        /// A seed ([`crate::snapshot::SaveKind::Seed`]): this node started on a populated
        /// database with the stream empty; save only when the store holds no snapshot yet.
        seed: bool,
    },
    /// Call [`crate::ports::Snapshots::fetch`] (which releases a stale snapshot lease first);
    /// answer with [`Input::SnapshotFetched`]. Never asked while a save is in flight.
    FetchSnapshot {
        /// Only a snapshot at this stream position or later is of use (0: any).
        min_position: u64,
    },
    /// Call [`crate::ports::Storage::restore`]; answer with [`Input::Restored`].
    RestoreSnapshot(StagedSnapshot),
    /// Report something (logs, metrics).
    Event(Event),
    /// Stop the drive loop.
    Stop(Stop),
}

/// Why the node stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Asked to stop; `unpublished` batches remain in the outbox for the next start.
    Shutdown {
        /// Batches not yet acknowledged.
        unpublished: usize,
    },
    /// Another live node uses this node id.
    NodeIdInUse {
        /// The other node's owner token.
        holder: String,
    },
}

/// Things worth a log line or a metric.
#[derive(Clone, Debug)]
pub enum Event {
    /// Local changes captured into the outbox.
    Captured {
        /// Which batch.
        batch: BatchId,
        /// Rows in it.
        rows: u64,
        /// Messages it takes.
        messages: usize,
    },
    /// Every message of a batch is stored by the stream.
    BatchPublished {
        /// Which batch.
        batch: BatchId,
    },
    /// Publishing paused (or resumed): the stream holds `max_lag` messages or more that
    /// this node has not applied yet.
    PublishThrottled {
        /// Paused (true) or resumed (false).
        throttled: bool,
        /// The newest stream sequence known.
        head: u64,
        /// The last sequence applied here.
        position: u64,
    },
    /// Pacing held a batch back for `max_publish_hold`: it goes out now although this node
    /// is behind (see [`super::NodeConfig::max_publish_hold`]).
    HeldBatchReleased {
        /// Which batch.
        batch: BatchId,
        /// How long it waited.
        waited: Duration,
    },
    /// A publish failed; it will be retried.
    PublishFailed {
        /// Why.
        error: TransportError,
        /// When the next attempt happens.
        retry_in: Duration,
    },
    /// Other nodes' changes applied.
    Applied {
        /// New position.
        through_seq: u64,
        /// Batches applied.
        batches: u64,
        /// Rows written or deleted.
        rows_written: u64,
        /// Row versions already present or older.
        rows_skipped: u64,
        /// Conflicts recorded.
        conflicts: u64,
        /// Own messages passed over.
        own_messages: u64,
        /// How long the transaction took (as seen by the node).
        took: Duration,
    },
    /// A batch was parked.
    Parked {
        /// Stream sequence of its last message.
        stream_seq: u64,
        /// Which batch, if readable.
        batch: Option<BatchId>,
        /// Why.
        reason: String,
    },
    /// A batch collided with a UNIQUE value a row outside it holds; it is parked and retried
    /// whenever later batches change rows (the row may move away with one of them).
    WaitingOnUnique {
        /// Stream sequence of its last message.
        stream_seq: u64,
        /// Which batch.
        batch: Option<BatchId>,
        /// Why.
        reason: String,
    },
    /// Batches that waited on a UNIQUE value applied.
    Unparked {
        /// How many.
        batches: u64,
    },
    /// Parked batches were retried.
    ParkedRetried {
        /// Now applied.
        applied: u64,
        /// Still parked.
        remaining: u64,
    },
    /// The stream is ready.
    StreamReady {
        /// Its extent.
        bounds: StreamBounds,
    },
    /// The stream could not be prepared; retrying.
    StreamUnavailable {
        /// Why.
        error: TransportError,
        /// Next attempt.
        retry_in: Duration,
    },
    /// Subscribed.
    Subscribed {
        /// From this sequence.
        from_seq: u64,
    },
    /// The subscription ended; resubscribing.
    SubscriptionLost {
        /// Why, if known.
        error: Option<TransportError>,
        /// When.
        retry_in: Duration,
    },
    /// A delivery skipped ahead of the expected sequence.
    Gap {
        /// Expected.
        expected: u64,
        /// Received.
        received: u64,
    },
    /// Messages this node never applied are gone from the stream: it stopped applying.
    Behind {
        /// Last applied sequence.
        position: u64,
        /// Oldest sequence the stream holds.
        first_seq: u64,
    },
    /// The stream ends before this node's position: it was deleted or replaced.
    StreamReset {
        /// Last applied sequence.
        position: u64,
        /// The stream's last sequence.
        last_seq: u64,
    },
    /// Clock skew measured against the server.
    ClockSkew {
        /// How far the stamps this node gives lead the server's clock (the later of its wall
        /// clock and its clock's high-water mark, minus the server's clock), milliseconds.
        skew_ms: i64,
        /// Every stamping (capture, apply, merge restores, parked retries) is paused because
        /// of it.
        paused: bool,
        /// The high-water mark led the server by this much (ms) while the wall clock was
        /// right, and was brought back to the wall clock.
        lowered_high_water: Option<i64>,
    },
    /// The node-id claim was granted.
    ClaimGranted,
    /// The claim could not be made or renewed; retrying.
    ClaimFailed {
        /// Why.
        error: TransportError,
    },
    /// A storage operation failed; retrying.
    StorageFailed {
        /// Which operation, what kind, and why.
        error: StorageError,
        /// Next attempt.
        retry_in: Duration,
    },
    /// The local schema changed; triggers follow it.
    SchemaChanged,
    /// A snapshot was stored (by this node), or none was needed.
    SnapshotSaved {
        /// What happened.
        outcome: SaveOutcome,
    },
    /// This node started on a database holding rows, with nothing applied from the stream,
    /// and the stream already holds messages: a cluster with a history. Its rows were never
    /// captured (they are not published), and the cluster's rows are not in its file: unless
    /// the file is a copy of the cluster's data, this node diverges.
    JoinedWithRows {
        /// The newest message of the stream.
        stream_last_seq: u64,
    },
    /// This node started on a populated database with the stream empty (a seed), but the
    /// store holds a snapshot already, `existing`: another node seeded the cluster first.
    /// Where their schema digests differ, the nodes started from different databases.
    SeedTaken {
        /// The newest snapshot in the store.
        existing: crate::snapshot::SnapshotInfo,
    },
    /// Saving or fetching a snapshot failed; retrying later.
    SnapshotFailed {
        /// Why.
        error: String,
        /// When it is tried again.
        retry_in: Duration,
    },
    /// A snapshot did not verify (corrupt, truncated, missing) and was not applied.
    SnapshotRejected {
        /// Why.
        error: String,
    },
    /// No usable snapshot exists.
    NoSnapshot {
        /// Why one was wanted.
        reason: RestoreReason,
    },
    /// The node restored from a snapshot.
    Restored {
        /// Why.
        reason: RestoreReason,
        /// The snapshot's generation.
        generation: u64,
        /// The position now recorded.
        position: u64,
        /// Merged into existing content (true) or taken whole.
        merged: bool,
    },
    /// Batches with some chunks stored here wait for the rest (reported when the count
    /// changes, and again every alarm interval while it is not zero).
    IncompleteBatches {
        /// How many.
        count: u64,
    },
}

/// A snapshot of the node for health checks and gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Recovered and running.
    pub started: bool,
    /// The stream is prepared.
    pub stream_ready: bool,
    /// The node id claim is granted.
    pub claimed: bool,
    /// The last claim renewal reached the transport (a health probe every claim interval).
    pub connected: bool,
    /// Subscribed to the stream.
    pub subscribed: bool,
    /// Applying stopped because messages it needs are gone from the stream.
    pub behind: bool,
    /// Capture and apply paused because the clock is ahead.
    pub clock_paused: bool,
    /// Last applied stream sequence.
    pub position: u64,
    /// Messages received and not yet applied plus messages the stream still holds beyond.
    pub lag_messages: u64,
    /// Age of the last applied message when it was applied, in milliseconds (0 when caught up).
    pub lag_ms: u64,
    /// Captured batches not yet acknowledged.
    pub outbox_batches: u64,
    /// Their messages not yet acknowledged.
    pub outbox_messages: u64,
    /// Messages in flight.
    pub in_flight: u64,
    /// Parked batches.
    pub parked: u64,
    /// Batches with chunks waiting for the rest.
    pub incomplete_batches: u64,
    /// Last measured clock skew (local minus server), milliseconds.
    pub clock_skew_ms: i64,
    /// The clock's high-water mark.
    pub clock_high_water: u64,
    /// This node started empty, found no snapshot, and still looks for a first one (see
    /// the bootstrapping rules in `node::snapshots`).
    pub awaiting_first_snapshot: bool,
}
