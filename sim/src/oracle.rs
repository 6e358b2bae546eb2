//! What the application wrote, what marmot captured, and what every node must end with.
//!
//! Every committed application write is recorded with its effect on each row (the row's new
//! content, or gone). Every capture is recorded with the writes it covered: a capture
//! transaction sees every write committed before it on that node, so the writes since the
//! previous capture get its version. The expected content of every row is then the effect with
//! the highest (version, write order): exactly last-writer-wins by stamp, with the node's own
//! order breaking ties inside one capture. Deletes stay deleted.

use marmot_core::Version;
use std::collections::BTreeMap;

/// One row changed by one application transaction.
#[derive(Clone, Debug)]
pub struct Effect {
    /// Table.
    pub table: &'static str,
    /// Key, as an SQL literal.
    pub key: String,
    /// The whole row as an SQL literal, or `None` when the row is gone.
    pub row: Option<String>,
}

/// How effects order: by version, then the writer's own order (transaction, statement).
type Rank = (Version, usize, usize);

/// The record of one run.
#[derive(Default)]
pub struct Oracle {
    /// Per node: committed transactions, each a list of effects in order.
    pub writes: Vec<Vec<Vec<Effect>>>,
    /// Per node: captures as (transactions covered so far, version).
    pub captures: Vec<Vec<(usize, Version)>>,
}

impl Oracle {
    /// An oracle for `nodes` nodes.
    pub fn new(nodes: usize) -> Self {
        Oracle {
            writes: vec![Vec::new(); nodes],
            captures: vec![Vec::new(); nodes],
        }
    }

    /// Records a committed transaction of node `n`.
    pub fn wrote(&mut self, n: usize, effects: Vec<Effect>) {
        self.writes[n].push(effects);
    }

    /// Records a capture by node `n` with version `v`: it covers every transaction so far.
    pub fn captured(&mut self, n: usize, v: Version) {
        let covered = self.writes[n].len();
        self.captures[n].push((covered, v));
    }

    /// Transactions of node `n` no capture covered yet.
    pub fn uncaptured(&self, n: usize) -> usize {
        let covered = self.captures[n].last().map_or(0, |(c, _)| *c);
        self.writes[n].len() - covered
    }

    /// Node `n`'s captured effects, each ranked by its capture's version and its order on
    /// the node.
    fn ranked(&self, n: usize) -> impl Iterator<Item = (Rank, &Effect)> + '_ {
        let mut cap = self.captures[n].iter().peekable();
        self.writes[n]
            .iter()
            .enumerate()
            .map_while(move |(t, effects)| {
                while cap.peek().is_some_and(|(covered, _)| *covered <= t) {
                    cap.next();
                }
                let (_, version) = cap.peek()?;
                let version = *version;
                Some(
                    effects
                        .iter()
                        .enumerate()
                        .map(move |(o, e)| ((version, t, o), e)),
                )
            })
            .flatten()
    }

    /// Keeps, per row, the effect with the highest rank.
    fn winners<'a>(
        effects: impl Iterator<Item = (Rank, &'a Effect)>,
    ) -> BTreeMap<(&'static str, String), (Rank, Option<String>)> {
        let mut out: BTreeMap<(&'static str, String), (Rank, Option<String>)> = BTreeMap::new();
        for (rank, e) in effects {
            let slot = out
                .entry((e.table, e.key.clone()))
                .or_insert((rank, e.row.clone()));
            if rank >= slot.0 {
                *slot = (rank, e.row.clone());
            }
        }
        out
    }

    /// For node `n`: every row its application changed and marmot captured, with the latest
    /// captured version and content of that row (as written on `n`).
    pub fn captured_writes(
        &self,
        n: usize,
    ) -> BTreeMap<(&'static str, String), (Version, Option<String>)> {
        Self::winners(self.ranked(n))
            .into_iter()
            .map(|(k, ((v, _, _), row))| (k, (v, row)))
            .collect()
    }

    /// Whether some node captured a delete of this row with a version above `after` (or
    /// equal to it, with `inclusive`) whose stamp is older than `horizon_ms`: its tombstone
    /// may have been collected, so the row may legitimately have no version at all.
    pub fn deleted_below_horizon(
        &self,
        table: &str,
        key: &str,
        after: Version,
        inclusive: bool,
        horizon_ms: u64,
    ) -> bool {
        (0..self.writes.len()).any(|n| {
            self.ranked(n).any(|((v, _, _), e)| {
                e.table == table
                    && e.key == key
                    && e.row.is_none()
                    && (v > after || (inclusive && v == after))
                    && v.stamp.wall_ms() < horizon_ms
            })
        })
    }

    /// Every captured change of this row on every node, for failure reports.
    pub fn history(&self, table: &str, key: &str) -> String {
        let mut out = Vec::new();
        for n in 0..self.writes.len() {
            for ((v, _, _), e) in self.ranked(n) {
                if e.table == table && e.key == key {
                    out.push(format!("node {} at {v}: {:?}", n + 1, e.row));
                }
            }
        }
        out.join("; ")
    }

    /// Rows of node `n` changed by transactions no capture covered yet.
    pub fn uncaptured_keys(&self, n: usize) -> std::collections::BTreeSet<(&'static str, String)> {
        let covered = self.captures[n].last().map_or(0, |(c, _)| *c);
        self.writes[n][covered..]
            .iter()
            .flatten()
            .map(|e| (e.table, e.key.clone()))
            .collect()
    }

    /// The expected rows of every table: table -> sorted row literals.
    pub fn expected(&self) -> BTreeMap<&'static str, Vec<String>> {
        let winners = Self::winners((0..self.writes.len()).flat_map(|n| self.ranked(n)));
        let mut out: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for ((table, _), (_, row)) in winners {
            let rows = out.entry(table).or_default();
            if let Some(r) = row {
                rows.push(r);
            }
        }
        for rows in out.values_mut() {
            rows.sort();
        }
        out
    }
}
