//! The real SQLite store as the simulation runs it: every capture reported to the oracle and
//! checked, and storage faults injected at the port (SQLITE_BUSY, I/O errors, crash points
//! inside operations), as FoundationDB's BUGGIFY does.

use crate::check::batch_rows;
use marmot_core::capture::Captured;
use marmot_core::ports::{
    ApplyOutcome, CaptureOutcome, ParkedRetry, Recovered, RestoreReport, Storage,
};
use marmot_core::snapshot::StagedSnapshot;
use marmot_core::wire::BatchId;
use marmot_core::{Clock, Version};
use marmot_sqlite::snapshot::SnapshotDir;
use marmot_sqlite::{SqliteStore, StoreError};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rusqlite::Connection;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::report::Failure;
use crate::world::{World, now};

/// Storage faults of one node (see `Plan::storage_faults`): its own random draws, whether
/// the chaos phase still lasts, and whether a crash point fired (the world then crashes the
/// host, as a process dying there).
pub(crate) struct StorageFaultState {
    pub(crate) rng: std::sync::Mutex<ChaCha8Rng>,
    pub(crate) active: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) crashed: std::sync::atomic::AtomicBool,
    pub(crate) crash_point: std::sync::Mutex<Option<&'static str>>,
}

impl StorageFaultState {
    pub(crate) fn draw(&self, p: f64) -> bool {
        p > 0.0
            && self.active.load(Ordering::Relaxed)
            && self
                .rng
                .lock()
                .expect("not poisoned")
                .random_bool(p.min(1.0))
    }
}

/// The real SQLite store, with every capture reported to the oracle and checked.
pub(crate) struct Recorded {
    pub(crate) inner: SqliteStore,
    pub(crate) node: usize,
    pub(crate) world: World,
    pub(crate) faults: Option<Arc<StorageFaultState>>,
}

impl Recorded {
    /// A storage call fails before it does anything: the lock is held (SQLITE_BUSY) or the
    /// disk failed (SQLITE_IOERR), as a BUGGIFY would have it.
    fn injected(&self, call: &'static str) -> Result<(), StoreError> {
        let Some(f) = &self.faults else { return Ok(()) };
        let plan = self.world.borrow().plan.storage_faults.clone();
        let Some(p) = plan else { return Ok(()) };
        let code = if f.draw(p.busy) {
            rusqlite::ffi::SQLITE_BUSY
        } else if f.draw(p.io) {
            rusqlite::ffi::SQLITE_IOERR
        } else {
            return Ok(());
        };
        self.world.borrow_mut().trace.push(format!(
            "{:?} n{} injected {} into {call}",
            now(),
            self.node + 1,
            if code == rusqlite::ffi::SQLITE_BUSY {
                "SQLITE_BUSY"
            } else {
                "SQLITE_IOERR"
            }
        ));
        Err(StoreError::Sqlite {
            path: self.inner.path().to_path_buf(),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                Some(format!("injected into {call}")),
            ),
        })
    }

    fn note(&self, c: &Option<Captured>) {
        let Some(c) = c else { return };
        let mut w = self.world.borrow_mut();
        let n = self.node;
        if c.batch.seq != w.last_batch[n] + 1 {
            let detail = format!(
                "node {} captured batch {} after batch {}",
                n + 1,
                c.batch.seq,
                w.last_batch[n]
            );
            w.failures.push(Failure::Safety {
                invariant: "each node's capture sequence is gap-free and increasing",
                detail,
            });
        }
        w.last_batch[n] = c.batch.seq;
        let version = Version {
            stamp: c.stamp,
            node: n as u64 + 1,
        };
        match batch_rows(&c.messages) {
            Some((_, rows)) => {
                // No drag: a node's stamps lead true time by no more than its own clock did
                // lately (until its next check against the server) plus the bound, unless the
                // stamp is just above a version it replaces that is itself that far ahead.
                let floor = rows.iter().filter_map(|r| r.base).map(|b| b.stamp).max();
                // A schema change is stamped above its object's version too: the version of
                // some batch that carried a schema change (the object's own, or that of the
                // table it belongs to, which its index or trigger took when the table changed).
                let objects = crate::check::batch_schema_objects(&c.messages);
                let above_schema = !objects.is_empty()
                    && c.stamp.as_u64() > 0
                    && w.schema_stamps.contains(&(c.stamp.as_u64() - 1));
                let just_above =
                    above_schema || floor.is_some_and(|f| c.stamp.as_u64() == f.as_u64() + 1);
                if !objects.is_empty() {
                    w.schema_stamps.insert(c.stamp.as_u64());
                }
                let true_ms = turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64);
                let window = w.plan.claim_interval + Duration::from_secs(1);
                let t = now();
                let history = &w.skew_history[n];
                let at_start = history
                    .iter()
                    .rev()
                    .find(|(since, _)| *since <= t.saturating_sub(window))
                    .map_or(0, |(_, s)| *s);
                let lead = history
                    .iter()
                    .filter(|(since, _)| *since > t.saturating_sub(window))
                    .map(|(_, s)| *s)
                    .fold(at_start, i64::max)
                    .max(0) as u64;
                let allowed = true_ms + lead + 5_000 + 1_000;
                if c.stamp.wall_ms() > allowed && !just_above {
                    let detail = format!(
                        "node {} stamped {} at true time {true_ms} ms, {} ms ahead; its own clock led by at most {lead} ms lately",
                        n + 1,
                        c.stamp,
                        c.stamp.wall_ms() - true_ms
                    );
                    w.failures.push(Failure::Safety {
                        invariant: "a node's stamps lead true time no further than its own clock does (no node drags another's clock)",
                        detail,
                    });
                }
                for r in rows {
                    if let Some(base) = r.base
                        && base >= version
                    {
                        let detail = format!(
                            "node {} stamped {} over {} on {} {}",
                            n + 1,
                            version,
                            base,
                            r.table,
                            r.key
                        );
                        w.failures.push(Failure::Safety {
                            invariant: "a local write's stamp is above the stamp of the version it replaced",
                            detail,
                        });
                    }
                }
            }
            None => w.failures.push(Failure::Safety {
                invariant: "captured batches decode",
                detail: format!("node {} batch {}", n + 1, c.batch),
            }),
        }
        w.oracle.captured(n, version);
        // The capture followed the schema first: triggers are back.
        w.blind[n] = false;
        let t = format!(
            "{:?} n{} captured {} rows={} v={}",
            now(),
            n + 1,
            c.batch,
            c.rows,
            version
        );
        w.trace.push(t);
    }
}

impl Recorded {
    /// After an operation failed: if the node died right after a commit, the batch it
    /// captured is in its outbox although the operation never said so; learn it from there
    /// (as the restarted node will).
    fn after(&self, r: &Result<impl Sized, StoreError>) {
        if !matches!(
            r,
            Err(StoreError::Crashed {
                point: "after commit"
            })
        ) {
            return;
        }
        let last = self.world.borrow().last_batch[self.node];
        let Ok(c) = Connection::open_with_flags(
            self.inner.path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        ) else {
            return;
        };
        let rows: Vec<(i64, i64, Vec<u8>)> = c
            .prepare("SELECT incarnation, seq, payload FROM \"__marmot__outbox\" WHERE seq > ?1 ORDER BY seq, chunk")
            .and_then(|mut s| {
                s.query_map([last as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .unwrap_or_default();
        let mut batches: std::collections::BTreeMap<(i64, i64), Vec<bytes::Bytes>> =
            std::collections::BTreeMap::new();
        for (inc, seq, payload) in rows {
            batches
                .entry((seq, inc))
                .or_default()
                .push(bytes::Bytes::from(payload));
        }
        for ((seq, inc), messages) in batches {
            let Some((header, rows)) = batch_rows(&messages) else {
                continue;
            };
            self.note(&Some(Captured {
                batch: BatchId {
                    origin: self.node as u64 + 1,
                    incarnation: inc as u64,
                    seq: seq as u64,
                },
                stamp: header.stamp,
                rows: rows.len() as u64,
                tables: vec![],
                messages,
                // Recorded batches are only counted (the oracle's captures).
                schema: false,
            }));
        }
    }
}

impl Storage for Recorded {
    type Error = StoreError;
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        self.inner.recover()
    }
    fn capture(&mut self, clock: &mut Clock, wall_ms: u64) -> Result<CaptureOutcome, StoreError> {
        self.injected("capture")?;
        let r = self.inner.capture(clock, wall_ms);
        if let Ok(o) = &r {
            self.note(&o.captured);
        }
        self.after(&r);
        r
    }
    fn apply(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        ds: &[marmot_core::apply::Delivery],
    ) -> Result<ApplyOutcome, StoreError> {
        self.injected("apply")?;
        let r = self.inner.apply(clock, wall_ms, ds);
        if let Ok(o) = &r {
            self.note(&o.captured);
        }
        self.after(&r);
        r
    }
    fn mark_published(&mut self, batch: BatchId) -> Result<(), StoreError> {
        self.injected("mark published")?;
        self.inner.mark_published(batch)
    }
    fn outbox_message(
        &mut self,
        batch: BatchId,
        chunk: u32,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        self.injected("outbox message")?;
        self.inner.outbox_message(batch, chunk)
    }
    fn retry_parked(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        all: bool,
    ) -> Result<ParkedRetry, StoreError> {
        self.injected("retry parked")?;
        let r = self.inner.retry_parked(clock, wall_ms, all);
        if let Ok(o) = &r {
            self.note(&o.captured);
        }
        self.after(&r);
        r
    }
    fn restore(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        snap: &StagedSnapshot,
    ) -> Result<RestoreReport, StoreError> {
        if let Err(e) = self.injected("restore") {
            SnapshotDir::discard(&snap.path);
            return Err(e);
        }
        let r = self.inner.restore(clock, wall_ms, snap);
        self.after(&r);
        if let Ok(o) = &r {
            self.note(&o.captured);
            let t = format!(
                "{:?} n{} restored generation {} (merged: {})",
                now(),
                self.node + 1,
                o.generation,
                o.merged
            );
            self.world.borrow_mut().trace.push(t);
        }
        SnapshotDir::discard(&snap.path);
        r
    }
}
