//! The ports: what the node needs from the world, as small traits.
//!
//! [`Storage`] is the local database (synchronous: SQLite is; each method is one atomic
//! transaction). [`Transport`] is the replication stream (async: its adapters are).
//! [`Env`] supplies time and runs blocking storage work. The daemon implements them with
//! SQLite, NATS JetStream and tokio; the simulation with the same SQLite adapter, a
//! simulated broker and simulated time.

use crate::apply::{ApplyReport, Delivery};
use crate::capture::Captured;
use crate::hlc::{Clock, NodeId, Stamp};
use crate::snapshot::{Fetched, SaveOutcome, SnapshotError, StagedSnapshot};
use crate::wire::BatchId;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::time::Duration;

/// State a node recovers from its database at start.
#[derive(Clone, Debug)]
pub struct Recovered {
    /// The last stream sequence applied (0: nothing yet).
    pub position: u64,
    /// The clock's persisted high-water mark.
    pub clock: Stamp,
    /// Captured batches not yet acknowledged by the stream: (batch, chunk count).
    pub outbox: Vec<(BatchId, u32)>,
    /// This start's incarnation (never repeats for this database).
    pub incarnation: u64,
    /// Batches with some chunks stashed, waiting for the rest.
    pub incomplete_batches: u64,
    /// Parked batches.
    pub parked: u64,
    /// Nothing was ever applied or captured, and the replicated tables hold no rows: a new
    /// node that should start from a snapshot.
    pub empty: bool,
    /// The wall time (ms) of the oldest batch in `outbox`, from its stamp (None: no batch,
    /// or unknown): how long pacing may still hold the batches back
    /// ([`crate::node::NodeConfig::max_publish_hold`]).
    pub outbox_oldest_ms: Option<u64>,
    /// The wall clock (ms) when this was read: set by the drive loop, not by storage.
    pub wall_ms: u64,
}

/// The outcome of one apply transaction.
#[derive(Clone, Debug, Default)]
pub struct ApplyOutcome {
    /// Local changes captured at the start of the same transaction (before any remote row
    /// was compared with them).
    pub captured: Option<Captured>,
    /// What the apply did.
    pub report: ApplyReport,
    /// Batches with chunks stashed and not yet complete, after this transaction.
    pub incomplete_batches: u64,
    /// The local schema changed since the last transaction (triggers were reinstalled).
    pub schema_changed: bool,
}

/// The outcome of one capture.
#[derive(Clone, Debug, Default)]
pub struct CaptureOutcome {
    /// The batch captured, if anything changed.
    pub captured: Option<Captured>,
    /// The local schema changed since the last transaction (triggers were reinstalled).
    pub schema_changed: bool,
    /// Batches that waited on a UNIQUE value and applied once the local write gave it up.
    pub unparked: u64,
}

/// The outcome of retrying parked batches.
#[derive(Clone, Debug, Default)]
pub struct ParkedRetry {
    /// Parked batches tried.
    pub attempted: u64,
    /// Parked batches now applied (and removed).
    pub applied: u64,
    /// Parked batches still parked.
    pub remaining: u64,
    /// Local changes captured first, as in [`ApplyOutcome::captured`].
    pub captured: Option<Captured>,
}

/// A storage operation, as the node names it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StorageOp {
    /// [`Storage::recover`].
    Recover,
    /// [`Storage::capture`].
    Capture,
    /// [`Storage::apply`].
    Apply,
    /// [`Storage::mark_published`].
    MarkPublished,
    /// [`Storage::outbox_message`].
    ReadOutbox,
    /// [`Storage::retry_parked`].
    RetryParked,
    /// [`Storage::restore`].
    Restore,
}

impl StorageOp {
    /// The operation's name in logs.
    pub fn name(self) -> &'static str {
        match self {
            StorageOp::Recover => "recover",
            StorageOp::Capture => "capture",
            StorageOp::Apply => "apply",
            StorageOp::MarkPublished => "mark published",
            StorageOp::ReadOutbox => "read outbox",
            StorageOp::RetryParked => "retry parked",
            StorageOp::Restore => "restore",
        }
    }
}

impl std::fmt::Display for StorageOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Kinds of storage failure. Today the node retries every kind the same way; the kind lets
/// it (and metrics) tell them apart.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StorageErrorKind {
    /// Another connection holds the database's write lock (SQLite's BUSY or LOCKED): it
    /// passes.
    Busy,
    /// The disk or file system failed (an I/O error, a full disk, a read-only file).
    Io,
    /// The database file is damaged.
    Corrupt,
    /// The operation cannot complete as things are, and says why (a snapshot that collides
    /// with local rows, a database in a state marmot cannot use).
    Refused,
    /// Anything else.
    Other,
}

/// A storage failure, as the node sees it: which operation, what kind, and the adapter's
/// message (which names the database). Nothing is half-done: the operation can be retried.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct StorageError {
    /// Which operation failed.
    pub operation: StorageOp,
    /// What kind of failure.
    pub kind: StorageErrorKind,
    /// Details for the log.
    pub message: String,
}

impl StorageError {
    /// `operation` failed with an adapter's error `e`.
    pub fn new(operation: StorageOp, e: &impl StorageFailure) -> Self {
        StorageError {
            operation,
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// What a storage adapter's error tells the node: a message (its `Display`) and a kind.
pub trait StorageFailure: std::fmt::Display {
    /// What kind of failure this is.
    fn kind(&self) -> StorageErrorKind;
}

/// The local database.
pub trait Storage {
    /// A storage failure. Callers retry the operation later; nothing is half-done.
    type Error: StorageFailure;
    /// Reads the persisted state. Called once before anything else.
    fn recover(&mut self) -> Result<Recovered, Self::Error>;
    /// Captures every committed local change as one batch stored in the outbox (none when
    /// nothing changed; cheap to call often).
    fn capture(&mut self, clock: &mut Clock, wall_ms: u64) -> Result<CaptureOutcome, Self::Error>;
    /// Applies deliveries in one transaction that first captures pending local changes and
    /// finally records the new position.
    fn apply(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        deliveries: &[Delivery],
    ) -> Result<ApplyOutcome, Self::Error>;
    /// Forgets a batch the stream acknowledged in full.
    fn mark_published(&mut self, batch: BatchId) -> Result<(), Self::Error>;
    /// Reads one message of an outbox batch (None: no longer there).
    fn outbox_message(&mut self, batch: BatchId, chunk: u32) -> Result<Option<Bytes>, Self::Error>;
    /// Retries parked batches: all of them when `all`, else those a user asked to retry
    /// (cheap when there are none).
    fn retry_parked(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        all: bool,
    ) -> Result<ParkedRetry, Self::Error>;
    /// Restores a verified snapshot into the live database without replacing its file: an
    /// empty database takes the snapshot whole; one with content merges it row by row under
    /// the merge rule, after capturing its own pending writes (which therefore survive).
    fn restore(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snapshot: &StagedSnapshot,
    ) -> Result<RestoreReport, Self::Error>;
}

/// The stream's current extent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StreamBounds {
    /// Sequence of the oldest message still held (last + 1 when empty).
    pub first_seq: u64,
    /// Sequence of the newest message (0 when nothing was ever stored).
    pub last_seq: u64,
}

/// A transport failure.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct TransportError {
    /// What kind of failure.
    pub kind: TransportErrorKind,
    /// Details for the log.
    pub message: String,
}

/// Kinds of transport failure.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TransportErrorKind {
    /// Not connected, timed out, or the stream has no quorum: try again later.
    Unavailable,
    /// The message is too large for the server.
    TooLarge,
    /// Anything else.
    Other,
}

impl TransportError {
    /// An `Unavailable` error.
    pub fn unavailable(message: impl Into<String>) -> Self {
        TransportError {
            kind: TransportErrorKind::Unavailable,
            message: message.into(),
        }
    }
    /// An `Other` error.
    pub fn other(message: impl Into<String>) -> Self {
        TransportError {
            kind: TransportErrorKind::Other,
            message: message.into(),
        }
    }
}

/// Result of claiming this node's id on the transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The id is ours. `server_ms` is the server's clock when it recorded the claim.
    Granted {
        /// Server time of the claim, milliseconds since the Unix epoch.
        server_ms: u64,
        /// The grant's revision: it changes with every grant and renewal of any lease, and
        /// orders them ([`Transport::renew_lease`] renews only from the revision last seen).
        revision: u64,
    },
    /// Another live node holds the id.
    Held {
        /// Who holds it (the other node's owner token).
        by: String,
    },
}

/// A stream of deliveries in stream order.
pub type Deliveries = BoxStream<'static, Result<Delivery, TransportError>>;

/// The replication stream.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Makes sure the stream exists (creating it as configured) and returns its extent.
    async fn prepare(&self) -> Result<StreamBounds, TransportError>;
    /// Publishes one message with a deduplication id; returns once the stream stored it,
    /// with the stream sequence it has (a duplicate's: the original's). Many calls run
    /// concurrently (pipelined).
    async fn publish(&self, message_id: String, payload: Bytes) -> Result<u64, TransportError>;
    /// Delivers every message from `from_seq` on, in order. Also returns the stream's extent
    /// at the time of subscribing.
    async fn subscribe(&self, from_seq: u64) -> Result<(StreamBounds, Deliveries), TransportError>;
    /// Takes (or renews) the lease `key` for `owner`; a lease not renewed expires. Held by
    /// someone else: [`Claim::Held`]. Granted: the server's time of the grant.
    async fn lease(&self, key: &str, owner: &str) -> Result<Claim, TransportError>;
    /// Renews the lease `key` for `owner` only if it is still the grant of `revision`
    /// (compare-and-set: nobody took it meanwhile, it did not expire): `Some(new revision)`,
    /// or `None` when it was lost. A fence: work done under a lease checks it this way before
    /// its one irrevocable step.
    async fn renew_lease(
        &self,
        key: &str,
        owner: &str,
        revision: u64,
    ) -> Result<Option<u64>, TransportError>;
    /// Gives up the lease `key` if `owner` holds it.
    async fn release(&self, key: &str, owner: &str) -> Result<(), TransportError>;
    /// Claims (or renews the claim of) node id `node` for `owner`.
    async fn claim(&self, node: NodeId, owner: &str) -> Result<Claim, TransportError> {
        self.lease(&format!("node-{node}"), owner).await
    }
}

/// Snapshots as the node uses them: the daemon and the simulation implement this with
/// [`crate::snapshot::save`] and [`crate::snapshot::fetch_to_restore`] over their own store.
#[async_trait::async_trait]
pub trait Snapshots: Send + Sync + 'static {
    /// Takes and stores a snapshot of the local database at `position`, unless another node
    /// is taking one or, as `kind` says, the newest is recent enough or one exists at all.
    async fn save(
        &self,
        position: u64,
        kind: crate::snapshot::SaveKind,
    ) -> Result<SaveOutcome, SnapshotError>;
    /// Downloads and verifies the newest snapshot at stream position `min_position` or later,
    /// to restore from: first releases this node's snapshot lease if it still holds one (see
    /// [`crate::snapshot::fetch_to_restore`], which does both).
    async fn fetch(&self, min_position: u64) -> Result<Fetched, SnapshotError>;
}

/// For nodes without snapshots.
pub struct NoSnapshots;

#[async_trait::async_trait]
impl Snapshots for NoSnapshots {
    async fn save(
        &self,
        _: u64,
        _: crate::snapshot::SaveKind,
    ) -> Result<SaveOutcome, SnapshotError> {
        Err(SnapshotError::Store("snapshots are not configured".into()))
    }
    async fn fetch(&self, _: u64) -> Result<Fetched, SnapshotError> {
        Ok(Fetched {
            staged: None,
            rejected: Vec::new(),
        })
    }
}

/// What a restore did.
#[derive(Clone, Debug)]
pub struct RestoreReport {
    /// The stream position now recorded.
    pub position: u64,
    /// The snapshot's generation.
    pub generation: u64,
    /// How: the whole file was copied in (an empty database), or merged row by row under the
    /// merge rule (a database with content, whose local writes must survive).
    pub merged: bool,
    /// Local changes captured first (they survive the restore).
    pub captured: Option<Captured>,
}

/// Time and blocking work.
pub trait Env {
    /// Monotonic time since an arbitrary origin.
    fn now(&self) -> Duration;
    /// Wall-clock time, milliseconds since the Unix epoch (may jump).
    fn wall_ms(&self) -> u64;
    /// Completes at monotonic time `deadline`.
    fn sleep_until(&self, deadline: Duration) -> BoxFuture<'static, ()>;
    /// Runs blocking storage work (inline in a simulation; off the async workers in a daemon).
    fn blocking<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }
}
