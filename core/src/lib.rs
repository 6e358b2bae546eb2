//! # marmot-core
//!
//! The sans-IO heart of marmot, leaderless replication of SQLite databases: a hybrid logical
//! clock ([`hlc`]), the last-writer-wins merge rule ([`merge`]), the message format
//! ([`wire`]), the capture and apply algorithms run inside a storage transaction
//! ([`capture`], [`apply`]), the node state machine ([`node`]), the ports its adapters
//! implement ([`ports`]) and the drive loop shared by the daemon and the simulation
//! ([`drive`]).
//!
//! Nothing in this crate reads a clock, draws OS randomness, spawns a thread or needs a
//! runtime: time and every effect come in as arguments and go out as values. Bring your own
//! transport by implementing [`ports::Transport`]; bring your own storage by implementing
//! [`ports::Storage`] on top of [`capture::CaptureTxn`] and [`apply::ApplyTxn`].
#![warn(missing_docs)]

pub mod apply;
pub mod capture;
pub mod drive;
pub mod hlc;
pub mod merge;
pub mod node;
pub mod ports;
pub mod snapshot;
pub mod txn;
pub mod value;
pub mod wire;

pub use hlc::{Clock, NodeId, Stamp, Version};
pub use value::{Value, ValueRef};
