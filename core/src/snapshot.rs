//! Snapshots: how they are stored so that a reader always finds a complete one, and the save
//! and fetch procedures every node (daemon or simulation) runs.
//!
//! A snapshot is an immutable object (`snapshot-<created>-n<node>-p<position>.db.zst`: a
//! zstd-compressed SQLite database) found through an immutable, generation-numbered manifest
//! (`manifest-<generation>.json`) written only after its object is complete. Readers take the
//! highest generation whose manifest parses and whose object matches its checksum, falling
//! back to older generations; nothing is ever replaced in place, so this holds on every
//! store, including those without an atomic replace (WebDAV, SFTP). Saves take a cluster-wide
//! lease first, so one node at a time snapshots. The newest `keep` generations are kept.
//!
//! Everything here is protocol: the object store, the lease and the local files are ports.

use crate::hlc::NodeId;
use crate::ports::{Claim, Transport};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// The lease that makes one node at a time take a snapshot.
pub const SNAPSHOT_LEASE: &str = "snapshot-lock";

/// What a manifest says about its snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Manifest format.
    pub format: u32,
    /// The manifest's generation (higher is newer).
    pub generation: u64,
    /// The object holding the compressed database.
    pub object: String,
    /// The stream position the snapshot contains (every message up to it is in it).
    pub position: u64,
    /// The node that took it.
    pub node: NodeId,
    /// When, ms since the Unix epoch.
    pub created_ms: u64,
    /// Compressed size, bytes.
    pub size: u64,
    /// Database size, bytes.
    pub raw_size: u64,
    /// BLAKE3 of the compressed object, hex.
    pub checksum: String,
    /// Tombstones with a stamp older than this (ms) were removed at the source (0: none).
    pub horizon_ms: u64,
}

/// The manifest object name of a generation.
pub fn manifest_name(generation: u64) -> String {
    format!("manifest-{generation:012}.json")
}

/// The generation of a manifest object name.
pub fn manifest_generation(name: &str) -> Option<u64> {
    name.strip_prefix("manifest-")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// The object name of a new snapshot.
pub fn object_name(node: NodeId, position: u64, created_ms: u64) -> String {
    format!("snapshot-{created_ms:013}-n{node}-p{position}.db.zst")
}

/// A snapshot problem.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The object store failed.
    #[error("snapshot store: {0}")]
    Store(String),
    /// The lease could not be taken or checked.
    #[error("snapshot lease: {0}")]
    Lease(String),
    /// Making or reading the local database copy failed.
    #[error("local snapshot file: {0}")]
    Local(String),
    /// The object does not match its manifest.
    #[error("snapshot {object} is corrupt or truncated: {detail}")]
    Corrupt {
        /// The object.
        object: String,
        /// What did not match.
        detail: String,
    },
    /// The manifest was written by a newer marmot.
    #[error(
        "snapshot manifest {name} has format {format}; this marmot reads {MANIFEST_FORMAT}: upgrade marmot"
    )]
    NewerFormat {
        /// The manifest.
        name: String,
        /// Its format.
        format: u32,
    },
}

/// Progress of a long transfer: bytes done so far.
pub type Progress<'a> = &'a (dyn Fn(u64) + Send + Sync);

/// Where snapshots are kept: a flat namespace of immutable objects.
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Uploads a local file as `name`.
    async fn put_file(&self, name: &str, path: &Path, progress: Progress<'_>)
    -> Result<(), String>;
    /// Downloads `name` into a local file.
    async fn get_file(&self, name: &str, path: &Path, progress: Progress<'_>)
    -> Result<(), String>;
    /// Uploads a small object.
    async fn put_bytes(&self, name: &str, data: Bytes) -> Result<(), String>;
    /// Downloads a small object (None: no such object).
    async fn get_bytes(&self, name: &str) -> Result<Option<Bytes>, String>;
    /// Names of all objects.
    async fn list(&self) -> Result<Vec<String>, String>;
    /// Deletes an object (absent is fine).
    async fn delete(&self, name: &str) -> Result<(), String>;
}

/// A local, compressed copy of the database, ready to upload.
#[derive(Clone, Debug)]
pub struct LocalSnapshot {
    /// The compressed file.
    pub path: PathBuf,
    /// The position it contains.
    pub position: u64,
    /// Compressed bytes.
    pub size: u64,
    /// Database bytes.
    pub raw_size: u64,
    /// BLAKE3 of the compressed file, hex.
    pub checksum: String,
    /// Tombstone horizon of the copied database (ms; 0: none removed).
    pub horizon_ms: u64,
}

/// A downloaded snapshot, verified and decompressed into a database file beside the live one.
#[derive(Clone, Debug)]
pub struct StagedSnapshot {
    /// What its manifest said.
    pub info: SnapshotInfo,
    /// The database file.
    pub path: PathBuf,
}

/// The local half of snapshots: copying the live database consistently, and checking a
/// downloaded one. Long operations: the daemon runs them off its async workers.
#[async_trait::async_trait]
pub trait SnapshotFiles: Send + Sync + 'static {
    /// Makes a consistent, compressed, checksummed copy of the live database.
    async fn create(&self) -> Result<LocalSnapshot, SnapshotError>;
    /// A path to download `object` to.
    fn download_path(&self, object: &str) -> PathBuf;
    /// Verifies a downloaded object against its manifest and decompresses it into a
    /// database file.
    async fn stage(
        &self,
        downloaded: &Path,
        info: &SnapshotInfo,
    ) -> Result<StagedSnapshot, SnapshotError>;
    /// Removes temporary files of an operation.
    fn discard(&self, path: &Path);
}

/// What [`save`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SaveOutcome {
    /// A new snapshot is stored.
    Saved(SnapshotInfo),
    /// Another node holds the lease (it is taking one).
    Busy {
        /// Its owner token.
        by: String,
    },
    /// The newest snapshot is recent enough already.
    UpToDate(SnapshotInfo),
}

/// Generations found, newest first.
async fn generations<S: ObjectStore + ?Sized>(store: &S) -> Result<Vec<u64>, SnapshotError> {
    let mut gens: Vec<u64> = store
        .list()
        .await
        .map_err(SnapshotError::Store)?
        .iter()
        .filter_map(|n| manifest_generation(n))
        .collect();
    gens.sort_unstable_by(|a, b| b.cmp(a));
    Ok(gens)
}

/// Reads a manifest; `Ok(None)` when it is missing or unreadable (a writer that died half-way).
async fn read_manifest<S: ObjectStore + ?Sized>(
    store: &S,
    generation: u64,
) -> Result<Option<SnapshotInfo>, SnapshotError> {
    let name = manifest_name(generation);
    let Some(bytes) = store.get_bytes(&name).await.map_err(SnapshotError::Store)? else {
        return Ok(None);
    };
    let Ok(info) = serde_json::from_slice::<SnapshotInfo>(&bytes) else {
        return Ok(None);
    };
    if info.format > MANIFEST_FORMAT {
        return Err(SnapshotError::NewerFormat {
            name,
            format: info.format,
        });
    }
    Ok(Some(info))
}

/// Every readable manifest, newest first.
pub async fn list<S: ObjectStore + ?Sized>(store: &S) -> Result<Vec<SnapshotInfo>, SnapshotError> {
    let mut out = Vec::new();
    for g in generations(store).await? {
        if let Some(info) = read_manifest(store, g).await? {
            out.push(info);
        }
    }
    Ok(out)
}

/// Takes and stores a snapshot, unless another node is taking one, or the newest one is
/// within `min_changes` positions of ours and younger than `min_age_ms` (set both to 0 to
/// force one). Keeps the newest `keep` generations.
#[allow(clippy::too_many_arguments)]
pub async fn save<S, T, F>(
    store: &S,
    transport: &T,
    files: &F,
    node: NodeId,
    owner: &str,
    position: u64,
    now_ms: u64,
    min_changes: u64,
    min_age_ms: u64,
    keep: usize,
    progress: Progress<'_>,
) -> Result<SaveOutcome, SnapshotError>
where
    S: ObjectStore + ?Sized,
    T: Transport + ?Sized,
    F: SnapshotFiles + ?Sized,
{
    match transport
        .lease(SNAPSHOT_LEASE, owner)
        .await
        .map_err(|e| SnapshotError::Lease(e.to_string()))?
    {
        Claim::Held { by } => return Ok(SaveOutcome::Busy { by }),
        Claim::Granted { .. } => {}
    }
    let result = save_leased(
        store,
        files,
        node,
        position,
        now_ms,
        min_changes,
        min_age_ms,
        keep,
        progress,
    )
    .await;
    let _ = transport.release(SNAPSHOT_LEASE, owner).await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn save_leased<S, F>(
    store: &S,
    files: &F,
    node: NodeId,
    position: u64,
    now_ms: u64,
    min_changes: u64,
    min_age_ms: u64,
    keep: usize,
    progress: Progress<'_>,
) -> Result<SaveOutcome, SnapshotError>
where
    S: ObjectStore + ?Sized,
    F: SnapshotFiles + ?Sized,
{
    let gens = generations(store).await?;
    let newest = match gens.first() {
        Some(g) => read_manifest(store, *g).await?,
        None => None,
    };
    if let Some(n) = &newest
        && n.position + min_changes > position
        && now_ms.saturating_sub(n.created_ms) < min_age_ms
    {
        return Ok(SaveOutcome::UpToDate(n.clone()));
    }
    let local = files.create().await?;
    let object = object_name(node, local.position, now_ms);
    let uploaded = store.put_file(&object, &local.path, progress).await;
    files.discard(&local.path);
    uploaded.map_err(SnapshotError::Store)?;
    let info = SnapshotInfo {
        format: MANIFEST_FORMAT,
        generation: gens.first().map_or(1, |g| g + 1),
        object,
        position: local.position,
        node,
        created_ms: now_ms,
        size: local.size,
        raw_size: local.raw_size,
        checksum: local.checksum,
        horizon_ms: local.horizon_ms,
    };
    let json = serde_json::to_vec_pretty(&info).expect("a manifest serialises");
    store
        .put_bytes(&manifest_name(info.generation), Bytes::from(json))
        .await
        .map_err(SnapshotError::Store)?;
    prune(store, keep.max(1)).await?;
    Ok(SaveOutcome::Saved(info))
}

/// Deletes manifests beyond the newest `keep` generations, then every snapshot object no
/// kept manifest refers to.
async fn prune<S: ObjectStore + ?Sized>(store: &S, keep: usize) -> Result<(), SnapshotError> {
    let gens = generations(store).await?;
    let mut kept = std::collections::BTreeSet::new();
    for g in gens.iter().take(keep) {
        if let Some(info) = read_manifest(store, *g).await? {
            kept.insert(info.object);
        }
    }
    if kept.is_empty() {
        return Ok(());
    }
    for g in gens.iter().skip(keep) {
        store
            .delete(&manifest_name(*g))
            .await
            .map_err(SnapshotError::Store)?;
    }
    for name in store.list().await.map_err(SnapshotError::Store)? {
        if name.starts_with("snapshot-") && !kept.contains(&name) {
            store.delete(&name).await.map_err(SnapshotError::Store)?;
        }
    }
    Ok(())
}

/// What [`fetch_latest`] found.
#[derive(Debug)]
pub struct Fetched {
    /// The newest snapshot that verified, if any.
    pub staged: Option<StagedSnapshot>,
    /// Snapshots that did not verify (corrupt, truncated, missing), newest first.
    pub rejected: Vec<SnapshotError>,
}

/// Downloads and verifies the newest snapshot, falling back to older generations when one
/// does not verify (each rejection is reported). Snapshots at a stream position below
/// `min_position` are passed over without downloading them (0: any will do).
pub async fn fetch_latest<S, F>(
    store: &S,
    files: &F,
    progress: Progress<'_>,
    min_position: u64,
) -> Result<Fetched, SnapshotError>
where
    S: ObjectStore + ?Sized,
    F: SnapshotFiles + ?Sized,
{
    let mut rejected = Vec::new();
    for g in generations(store).await? {
        let Some(info) = read_manifest(store, g).await? else {
            continue;
        };
        if info.position < min_position {
            continue;
        }
        let path = files.download_path(&info.object);
        if let Err(e) = store.get_file(&info.object, &path, progress).await {
            files.discard(&path);
            rejected.push(SnapshotError::Corrupt {
                object: info.object.clone(),
                detail: format!("cannot download it: {e}"),
            });
            continue;
        }
        let staged = files.stage(&path, &info).await;
        files.discard(&path);
        match staged {
            Ok(s) => {
                return Ok(Fetched {
                    staged: Some(s),
                    rejected,
                });
            }
            Err(e) => rejected.push(e),
        }
    }
    Ok(Fetched {
        staged: None,
        rejected,
    })
}
