//! Snapshots in memory: [`MemorySnapshotStore`] keeps copies of in-memory databases by
//! generation, and [`MemorySnapshots`] is the [`Snapshots`] port of one node over it.
//!
//! A staged snapshot's `path` names a copy in the store (`memory:<generation>`), not a file:
//! nothing here touches a disk.

use super::storage::{Db, MemoryApp};
use crate::hlc::NodeId;
use crate::ports::Snapshots;
use crate::snapshot::{
    Fetched, SaveKind, SaveOutcome, SnapshotError, SnapshotInfo, StagedSnapshot,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Copies of databases by generation, shared by every node of a cluster.
#[derive(Clone, Default)]
pub struct MemorySnapshotStore {
    inner: Arc<Mutex<BTreeMap<u64, (SnapshotInfo, Db)>>>,
}

impl MemorySnapshotStore {
    /// Stores a copy of the database `db` at stream position `position`, taken by `node`;
    /// returns what its manifest says.
    pub fn save(&self, db: &MemoryApp, node: NodeId, position: u64) -> SnapshotInfo {
        let db = db.copy();
        let mut store = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let generation = store.keys().last().map_or(1, |g| g + 1);
        let info = SnapshotInfo {
            format: crate::snapshot::MANIFEST_FORMAT,
            generation,
            object: format!("memory-{generation}"),
            position,
            node,
            created_ms: 0,
            size: 0,
            raw_size: 0,
            checksum: String::new(),
            horizon_ms: 0,
            schema_digest: String::new(),
        };
        store.insert(generation, (info.clone(), db));
        info
    }

    /// The newest snapshot's manifest, if any.
    pub fn newest(&self) -> Option<SnapshotInfo> {
        let store = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        store.values().last().map(|(info, _)| info.clone())
    }

    /// The newest snapshot at stream position `min_position` or later, staged.
    pub fn fetch(&self, min_position: u64) -> Option<StagedSnapshot> {
        let store = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        store
            .iter()
            .rev()
            .find(|(_, (info, _))| info.position >= min_position)
            .map(|(g, (info, _))| StagedSnapshot {
                info: info.clone(),
                path: PathBuf::from(format!("memory:{g}")),
            })
    }

    /// The snapshot `info` describes, staged.
    pub fn stage(&self, info: &SnapshotInfo) -> StagedSnapshot {
        StagedSnapshot {
            info: info.clone(),
            path: PathBuf::from(format!("memory:{}", info.generation)),
        }
    }

    /// The copy a staged snapshot names.
    pub(super) fn staged(&self, path: &Path) -> Option<Db> {
        let g: u64 = path.to_str()?.strip_prefix("memory:")?.parse().ok()?;
        let store = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        store.get(&g).map(|(_, db)| db.clone())
    }

    /// How many snapshots it holds.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The [`Snapshots`] port of one node: saves copies of its [`super::MemoryStorage`] into a shared
/// [`MemorySnapshotStore`]. Saves are never refused (there is no lease to contend for).
pub struct MemorySnapshots {
    store: MemorySnapshotStore,
    db: MemoryApp,
    node: NodeId,
}

impl MemorySnapshots {
    /// Snapshots of the database `db` (see [`super::MemoryStorage::app`]) by node `node`,
    /// into `store`.
    pub fn new(store: MemorySnapshotStore, db: MemoryApp, node: NodeId) -> Self {
        MemorySnapshots { store, db, node }
    }
}

#[async_trait::async_trait]
impl Snapshots for MemorySnapshots {
    async fn save(&self, position: u64, kind: SaveKind) -> Result<SaveOutcome, SnapshotError> {
        if kind == SaveKind::Seed
            && let Some(newest) = self.store.newest()
        {
            return Ok(SaveOutcome::UpToDate(newest));
        }
        Ok(SaveOutcome::Saved(
            self.store.save(&self.db, self.node, position),
        ))
    }

    async fn fetch(&self, min_position: u64) -> Result<Fetched, SnapshotError> {
        Ok(Fetched {
            staged: self.store.fetch(min_position),
            rejected: Vec::new(),
        })
    }
}
