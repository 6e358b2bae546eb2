//! Every port in memory: a worked example for people who bring their own transport or
//! storage, and the core's own test harness.
//!
//! - [`MemoryStorage`] implements [`crate::ports::Storage`] over an in-memory database (a
//!   second model of the SQLite adapter; [`MemoryApp`] is the application writing into it);
//! - [`MemoryTransport`] implements [`crate::ports::Transport`] over a [`MemoryStream`];
//! - [`MemorySnapshots`] implements [`crate::ports::Snapshots`] over a
//!   [`MemorySnapshotStore`];
//! - [`VirtualTime`] implements [`crate::ports::Env`] with time that jumps to each deadline;
//! - [`harness::Cluster`] steps several nodes by hand over all of it;
//! - [`conformance::storage_conformance`] is what every storage must do, executable.
//!
//! A node driven end to end by the drive loop over these ports: node 1 publishes a row its
//! application wrote, node 2 applies it.
//!
//! ```
//! use futures::StreamExt;
//! use marmot_core::drive::{self, Control, Observer};
//! use marmot_core::memory::{
//!     MemorySnapshotStore, MemoryStorage, MemoryStream, MemoryTransport, VirtualTime,
//! };
//! use marmot_core::node::{Event, Node, NodeConfig, Stop};
//! use marmot_core::ports::NoSnapshots;
//! use marmot_core::Value;
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! struct Quiet;
//! impl Observer for Quiet {
//!     fn event(&mut self, _now: Duration, _event: &Event) {}
//! }
//!
//! let time = VirtualTime::default();
//! let stream = MemoryStream::new().with_time(time.clone());
//! let transport = Arc::new(MemoryTransport::new(stream.clone()));
//! let snapshots = MemorySnapshotStore::default();
//! let mut one = MemoryStorage::new(1, snapshots.clone());
//! let mut two = MemoryStorage::new(2, snapshots);
//! for db in [&one, &two] {
//!     db.app().create_table("t", &["id", "v"], 1);
//! }
//! one.app().upsert("t", vec![Value::Integer(1), Value::Text(b"hello".to_vec())]);
//!
//! // Node 1 starts, is asked to stop at once: it publishes what is pending first.
//! let mut node = Node::new(NodeConfig::new(1, "db-1"));
//! let stop = futures::executor::block_on(drive::run(
//!     &mut node,
//!     &mut one,
//!     transport.clone(),
//!     Arc::new(NoSnapshots),
//!     &time,
//!     &mut Quiet,
//!     std::pin::pin!(futures::stream::pending()),
//!     std::pin::pin!(futures::stream::iter([Control::Shutdown])),
//! ));
//! assert_eq!(stop, Stop::Shutdown { unpublished: 0 });
//!
//! // Node 2 runs until its application sees the row, then stops.
//! let app = two.app();
//! let seen = futures::stream::poll_fn(move |_| {
//!     if app.rows("t").is_empty() {
//!         std::task::Poll::Pending
//!     } else {
//!         std::task::Poll::Ready(Some(Control::Shutdown))
//!     }
//! });
//! let mut node = Node::new(NodeConfig::new(2, "db-2"));
//! futures::executor::block_on(drive::run(
//!     &mut node,
//!     &mut two,
//!     transport,
//!     Arc::new(NoSnapshots),
//!     &time,
//!     &mut Quiet,
//!     std::pin::pin!(futures::stream::pending()),
//!     std::pin::pin!(seen),
//! ));
//! assert_eq!(two.app().rows("t"), vec!["(1, 'hello')"]);
//! ```

pub mod conformance;
pub mod harness;
mod snapshots;
mod storage;
mod transport;
mod txn;

pub use snapshots::{MemorySnapshotStore, MemorySnapshots};
pub use storage::{MemoryApp, MemoryError, MemoryStorage};
pub use transport::{MemoryStream, MemoryTransport};
#[cfg(test)]
pub(crate) use txn::MemTxn;

use crate::ports::Env;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// An [`Env`] whose time stands still until something sleeps: a sleep then jumps time to
/// its deadline at once. Exact for one drive loop alone on an executor (nothing else could
/// have happened before the deadline); the wall clock is [`harness::EPOCH_MS`] plus that
/// time.
#[derive(Clone, Default)]
pub struct VirtualTime {
    now_ns: Arc<AtomicU64>,
}

impl Env for VirtualTime {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_ns.load(Ordering::SeqCst))
    }
    fn wall_ms(&self) -> u64 {
        harness::EPOCH_MS + self.now().as_millis() as u64
    }
    fn sleep_until(&self, deadline: Duration) -> BoxFuture<'static, ()> {
        let now = self.now_ns.clone();
        let deadline = deadline.as_nanos().min(u128::from(u64::MAX)) as u64;
        Box::pin(async move {
            now.fetch_max(deadline, Ordering::SeqCst);
        })
    }
}

#[cfg(test)]
mod tests;
