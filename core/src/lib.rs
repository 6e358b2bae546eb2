//! # marmot-core
//!
//! The sans-IO heart of marmot, leaderless replication of SQLite databases: a hybrid logical
//! clock ([`hlc`]), the last-writer-wins merge rule ([`merge`]), the message format
//! ([`wire`]), the capture and apply algorithms run inside a storage transaction
//! ([`capture`], [`apply`]) and the order of work in those transactions ([`txn`]), the node
//! state machine ([`node`]), the ports its adapters implement ([`ports`]), the drive loop
//! shared by the daemon and the simulation ([`drive`]), and every port in memory
//! ([`memory`]).
//!
//! Nothing in this crate reads a clock, draws OS randomness, spawns a thread or needs a
//! runtime: time and every effect come in as arguments and go out as values.
//!
//! # Bringing your own transport or storage
//!
//! A node needs four ports. [`memory`] implements all four in a few hundred lines: start
//! from it. Its module documentation drives two nodes end to end over them with
//! [`drive::run`].
//!
//! - **[`ports::Transport`]**, the replication stream: one ordered log. `prepare` makes
//!   sure it exists and returns its extent. `publish(id, payload)` returns only once the
//!   message is stored durably, with its sequence number; the same `id` published again
//!   (a retry after a lost acknowledgement) must return the original's sequence and store
//!   nothing (deduplication). `subscribe(from)` delivers every message from `from` in
//!   sequence order, with the extent at the time (a start below the oldest message held
//!   delivers from the oldest: the node sees the gap and knows it is behind). Leases
//!   (`lease`, `renew_lease`, `release`) are a small key-value store with compare-and-set on
//!   a revision that every grant changes, and with expiry: node ids are claimed with them,
//!   and the server's time in a grant checks the node's clock. The executable form of this
//!   contract is `sim::conformance`, run against the simulated broker and a real nats-server.
//! - **[`ports::Storage`]**, the local database: each call is one atomic transaction, all or
//!   nothing. Capture records every committed local write since the last capture as one
//!   batch, stamped, in an outbox that survives restarts until `mark_published`. Apply
//!   writes deliveries under the merge rule, after capturing pending local writes, and
//!   records the position in the same transaction. Implement [`txn::LocalTxn`] (with
//!   [`capture::CaptureTxn`] and [`apply::ApplyTxn`] underneath) and call the recipes in
//!   [`txn`], so the order of work is the protocol's, not yours. The executable form is
//!   [`memory::conformance::storage_conformance`], which the in-memory model and the SQLite
//!   adapter both pass.
//! - **[`ports::Snapshots`]**: save a consistent copy of the database with the stream
//!   position it covers, and fetch the newest one at a position or later
//!   ([`snapshot::save`] and [`snapshot::fetch_to_restore`] do the protocol over any
//!   [`snapshot::ObjectStore`]); [`ports::NoSnapshots`] when there are none.
//! - **[`ports::Env`]**: monotonic time, wall time, sleeping, and where blocking storage
//!   calls run.
//!
//! Errors: a transport failure is a [`ports::TransportError`] with a kind; a storage
//! adapter's error implements [`ports::StorageFailure`] (a message and a kind), and reaches
//! the node as a [`ports::StorageError`]. Nothing in a port may panic on bad input.
#![warn(missing_docs)]

pub mod apply;
pub mod capture;
pub mod drive;
pub mod hlc;
pub mod memory;
pub mod merge;
pub mod node;
pub mod ports;
pub mod snapshot;
pub mod txn;
pub mod value;
pub mod wire;

pub use hlc::{Clock, NodeId, Stamp, Version};
pub use value::{Value, ValueRef};
