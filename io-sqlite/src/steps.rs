//! The steps of marmot's transactions on the SQLite file, as the core's recipes
//! (`marmot_core::txn`) call them: capturing pending local writes, applying deliveries,
//! retrying parked batches, recording the position and the clock.

use crate::*;

impl SqliteStore {
    /// Persists the clock's high-water mark. The running node's clock is the truth (it is
    /// read back only at start, in `recover`): it may have been lowered on purpose
    /// (`Clock::lower_to`), and reading the stored mark back would undo that.
    pub(crate) fn save_clock(&self, clock: &Clock) -> Result<(), StoreError> {
        meta_set(&self.conn, "clock", clock.high_water().as_u64() as i64)
            .map_err(|e| self.sql_err(e))
    }

    /// Takes the tables an apply re-read after it applied schema from the stream (the
    /// schema changed: parked batches are retried).
    pub(crate) fn adopt_tables(
        &mut self,
        resynced: Option<(Vec<Table>, HashMap<String, usize>)>,
        republished: bool,
    ) -> Result<(), StoreError> {
        if republished {
            // Rows logged to publish again: the next capture looks even if nothing else
            // changed.
            self.scan_needed = true;
        }
        if let Some((tables, _)) = resynced {
            self.install_tables(tables).map_err(|e| self.sql_err(e))?;
            self.synced_in_txn = true;
            self.schema_changed = true;
            self.scan_needed = true;
        }
        Ok(())
    }

    /// Captures pending local changes. Inside a transaction.
    pub(crate) fn capture_in_txn(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
    ) -> Result<Option<Captured>, StoreError> {
        if !self.cfg.capture {
            return Ok(None);
        }
        let dv = self.data_version()?;
        if dv == self.data_version && !self.scan_needed {
            return Ok(None);
        }
        let batch_seq = meta_get(&self.conn, "batch_seq")
            .map_err(|e| self.sql_err(e))?
            .unwrap_or(0) as u64
            + 1;
        let params = CaptureParams {
            node: self.cfg.node_id,
            incarnation: self.incarnation,
            batch_seq,
            wall_ms,
            compress: self.cfg.compress,
            max_fragment: self.cfg.max_fragment,
        };
        let mut tx = self.tx(wall_ms);
        let captured = capture(&mut tx, clock, &params).map_err(|e| self.sql_err(e))?;
        let again = tx.republished;
        if captured.is_some() {
            meta_set(&self.conn, "batch_seq", batch_seq as i64).map_err(|e| self.sql_err(e))?;
            self.conn
                .prepare_cached(
                    "UPDATE \"__marmot__incarnations\" SET last_seq = ?2 WHERE incarnation = ?1",
                )
                .and_then(|mut st| st.execute(params![self.incarnation as i64, batch_seq as i64]))
                .map_err(|e| self.sql_err(e))?;
            self.incarnations.insert(self.incarnation, batch_seq);
        }
        self.data_version = dv;
        self.scan_needed = again;
        Ok(captured)
    }

    /// Applies again the parked batches `filter` selects (a `WHERE` clause, or nothing for
    /// all), oldest first; removes those that apply. Inside a transaction. Returns (tried,
    /// applied).
    pub(crate) fn retry_parked_where(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        filter: &str,
        report: &mut marmot_core::apply::ApplyReport,
    ) -> Result<(u64, u64), StoreError> {
        let me = self.cfg.node_id;
        let parked: Vec<(i64, marmot_core::apply::Parked)> = {
            let e = |x| self.sql_err(x);
            let mut stmt = self
                .conn
                .prepare_cached(&format!(
                    // In each node's capture order: the order its batches were made in.
                    "SELECT id, stream_seq, message FROM \"__marmot__parked\"{filter} \
                     ORDER BY origin, incarnation, batch_seq, id"
                ))
                .map_err(e)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        marmot_core::apply::Parked {
                            stream_seq: r.get::<_, i64>(1)? as u64,
                            batch: None,
                            reason: String::new(),
                            message: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                            collision: false,
                        },
                    ))
                })
                .map_err(e)?;
            rows.collect::<Result<_, _>>().map_err(e)?
        };
        let attempted = parked.len() as u64;
        let mut applied = 0;
        for (id, p) in parked {
            let mut tx = self.tx(wall_ms);
            let outcome = marmot_core::apply::retry_parked(&mut tx, clock, me, &p, wall_ms, report)
                .map_err(|x| self.sql_err(x))?;
            let (resynced, again) = (tx.resynced.take(), tx.republished);
            self.adopt_tables(resynced, again)?;
            match outcome {
                None => {
                    self.conn
                        .execute("DELETE FROM \"__marmot__parked\" WHERE id = ?1", [id])
                        .map_err(|x| self.sql_err(x))?;
                    applied += 1;
                    tracing::info!(parked_id = id, "parked batch applied on retry");
                }
                Some((reason, collision)) => {
                    self.conn
                        .execute(
                            "UPDATE \"__marmot__parked\" SET reason = ?2, collision = ?3, attempts = attempts + 1, retry_requested = 0 WHERE id = ?1",
                            params![id, reason, collision],
                        )
                        .map_err(|x| self.sql_err(x))?;
                }
            }
        }
        Ok((attempted, applied))
    }

    /// Whether batches wait on a UNIQUE value.
    pub(crate) fn any_waiting(&self) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM \"__marmot__parked\" WHERE collision = 1)",
            )
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .map_err(|e| self.sql_err(e))
    }

    /// Applies the batches waiting on a UNIQUE value, each origin's together as one set (see
    /// `marmot_core::apply::retry_parked_jointly`), and where they do not apply, with the
    /// other batches of that origin parked here: a waiting batch that changes the schema holds back the node's later
    /// batches written in the new shape (they park on a column it adds or renames), and those
    /// may free the values it waits on, so neither applies without the other (found by the
    /// simulation, V4 seed 843597: a rename waiting on a UNIQUE value, the batches after it
    /// parked on the new name, and none applied again). Inside a transaction. Returns how
    /// many applied.
    pub(crate) fn retry_collisions_jointly(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        report: &mut marmot_core::apply::ApplyReport,
    ) -> Result<u64, StoreError> {
        let me = self.cfg.node_id;
        type Row = (i64, Option<i64>, i64, Vec<u8>, bool);
        let rows: Vec<Row> = self
            .conn
            .prepare_cached(
                "SELECT id, origin, stream_seq, message, collision FROM \"__marmot__parked\" \
                 WHERE origin IN (SELECT origin FROM \"__marmot__parked\" WHERE collision = 1) \
                 ORDER BY origin, incarnation, batch_seq, id",
            )
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect()
            })
            .map_err(|e| self.sql_err(e))?;
        // Per origin: (ids, batches, whether each waits on a UNIQUE value).
        type Group = (
            Option<i64>,
            Vec<i64>,
            Vec<marmot_core::apply::Parked>,
            Vec<bool>,
        );
        let mut groups: Vec<Group> = Vec::new();
        for (id, origin, stream_seq, message, collision) in rows {
            if groups.last().is_none_or(|g| g.0 != origin) {
                groups.push((origin, Vec::new(), Vec::new(), Vec::new()));
            }
            let g = groups.last_mut().expect("pushed above");
            g.1.push(id);
            g.2.push(marmot_core::apply::Parked {
                stream_seq: stream_seq as u64,
                batch: None,
                reason: String::new(),
                message: Bytes::from(message),
                collision,
            });
            g.3.push(collision);
        }
        let mut applied = 0;
        for (_, ids, parked, waiting) in groups {
            // The sets to try, in order: the waiting batches together (and, if one of them
            // collides for good, its value taken on two nodes, each set without one of them);
            // then with the origin's other parked batches too (a waiting schema change and
            // the batches in its new shape), in case the first fail. A batch parked for good
            // among those only spoils the second kind, never the first.
            let only_waiting: Vec<usize> = (0..parked.len()).filter(|i| waiting[*i]).collect();
            let everything: Vec<usize> = (0..parked.len()).collect();
            let mut tries: Vec<Vec<usize>> = Vec::new();
            for set in [only_waiting, everything] {
                if set.len() < 2 || tries.contains(&set) {
                    continue;
                }
                tries.push(set.clone());
                if set.len() <= 16 {
                    for leave_out in &set {
                        tries.push(set.iter().copied().filter(|i| i != leave_out).collect());
                    }
                }
            }
            let mut done: Option<Vec<usize>> = None;
            for members in tries {
                if members.len() < 2 {
                    // One batch alone: the one-by-one retries try it.
                    continue;
                }
                let set: Vec<marmot_core::apply::Parked> =
                    members.iter().map(|i| parked[*i].clone()).collect();
                let mut tx = self.tx(wall_ms);
                let outcome = marmot_core::apply::retry_parked_jointly(
                    &mut tx, clock, me, &set, wall_ms, report,
                )
                .map_err(|x| self.sql_err(x))?;
                let (resynced, again) = (tx.resynced.take(), tx.republished);
                self.adopt_tables(resynced, again)?;
                if outcome.is_none() {
                    done = Some(members);
                    break;
                }
            }
            if let Some(members) = done {
                for i in &members {
                    self.conn
                        .execute("DELETE FROM \"__marmot__parked\" WHERE id = ?1", [ids[*i]])
                        .map_err(|x| self.sql_err(x))?;
                }
                tracing::info!(
                    batches = members.len(),
                    "batches that waited on UNIQUE values applied together"
                );
                applied += members.len() as u64;
            }
        }
        Ok(applied)
    }

    pub(crate) fn incomplete_batches(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM (SELECT DISTINCT origin, incarnation, seq FROM \"__marmot__inbox\")",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| self.sql_err(e))
    }

    pub(crate) fn position(&self) -> Result<u64, StoreError> {
        Ok(meta_get(&self.conn, "position")
            .map_err(|e| self.sql_err(e))?
            .unwrap_or(0) as u64)
    }
}

/// The open transaction of an operation (inside `in_txn`): the protocol's steps, in the
/// order `marmot_core::txn` runs them.
impl marmot_core::txn::LocalTxn for SqliteStore {
    type Error = StoreError;
    fn follow_schema(&mut self) -> Result<(), StoreError> {
        SqliteStore::follow_schema(self)
    }
    fn capture_pending(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
    ) -> Result<Option<Captured>, StoreError> {
        self.capture_in_txn(clock, wall_ms)
    }
    fn position(&mut self) -> Result<u64, StoreError> {
        SqliteStore::position(self)
    }
    fn apply_deliveries(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        position: u64,
        deliveries: &[marmot_core::apply::Delivery],
    ) -> Result<marmot_core::apply::ApplyReport, StoreError> {
        let me = self.cfg.node_id;
        let mut tx = self.tx(wall_ms);
        let report =
            marmot_core::apply::apply_deliveries(&mut tx, clock, me, position, deliveries, wall_ms)
                .map_err(|e| self.sql_err(e))?;
        let (resynced, again) = (tx.resynced.take(), tx.republished);
        self.adopt_tables(resynced, again)?;
        Ok(report)
    }
    fn record_position(&mut self, position: u64) -> Result<(), StoreError> {
        meta_set(&self.conn, "position", position as i64).map_err(|e| self.sql_err(e))
    }
    fn any_waiting(&mut self) -> Result<bool, StoreError> {
        SqliteStore::any_waiting(self)
    }
    fn retry_parked(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        which: marmot_core::txn::ParkedSelection,
        report: &mut marmot_core::apply::ApplyReport,
    ) -> Result<(u64, u64), StoreError> {
        use marmot_core::txn::ParkedSelection;
        let filter = match which {
            ParkedSelection::All => "",
            ParkedSelection::Requested => " WHERE retry_requested = 1",
            ParkedSelection::Waiting => " WHERE collision = 1",
        };
        self.retry_parked_where(clock, wall_ms, filter, report)
    }
    fn retry_waiting_jointly(
        &mut self,
        clock: &mut Clock,
        wall_ms: u64,
        report: &mut marmot_core::apply::ApplyReport,
    ) -> Result<u64, StoreError> {
        self.retry_collisions_jointly(clock, wall_ms, report)
    }
    fn parked_count(&mut self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM \"__marmot__parked\"", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(|e| self.sql_err(e))
    }
    fn incomplete_batches(&mut self) -> Result<u64, StoreError> {
        SqliteStore::incomplete_batches(self)
    }
    fn save_clock(&mut self, clock: &Clock) -> Result<(), StoreError> {
        SqliteStore::save_clock(self, clock)
    }
    fn take_schema_changed(&mut self) -> bool {
        std::mem::take(&mut self.schema_changed)
    }
}
