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
use futures::future::BoxFuture;
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
    /// The digest of the replicated schema it holds (absent from older manifests: empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub schema_digest: String,
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
    /// The digest of the replicated schema it holds (empty: not known).
    pub schema_digest: String,
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

/// How a save is asked for.
#[derive(Clone, Debug)]
pub struct SaveParams<'a> {
    /// The saving node.
    pub node: NodeId,
    /// Its owner token (who holds the lease).
    pub owner: &'a str,
    /// Its stream position.
    pub position: u64,
    /// Wall time, ms since the Unix epoch.
    pub now_ms: u64,
    /// Skip the save when the newest snapshot is within this many positions...
    pub min_changes: u64,
    /// ... and younger than this (ms). Both 0: save regardless.
    pub min_age_ms: u64,
    /// Generations kept in the store.
    pub keep: usize,
    /// Save only when the store holds no snapshot at all (a seed: [`SaveKind::Seed`]).
    pub first_only: bool,
}

/// Why a snapshot is taken.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SaveKind {
    /// Enough changes or time since the last one: skipped while the newest is recent enough.
    Due,
    /// An operator asked (`marmot snapshot save`): taken regardless.
    Asked,
    /// The first snapshot of a cluster, from a node that holds rows the stream never carried
    /// (it started on a populated database, with the stream empty): taken only when the
    /// store holds none, so that nodes starting empty get those rows.
    Seed,
}

/// Sleeps for a while (the caller's timer: the core has none).
pub type Pause<'a> = &'a (dyn Fn(std::time::Duration) -> BoxFuture<'static, ()> + Send + Sync);

/// While a save runs, its lease is renewed this often (the lease lives 15 s).
pub const LEASE_RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Snapshot objects that no manifest refers to are deleted only once they are this old: a
/// younger one may be a save still under way on another node, whose manifest comes next.
pub const ORPHAN_GRACE_MS: u64 = 60 * 60 * 1000;

/// Takes and stores a snapshot, unless another node is taking one, or the newest one is
/// within `min_changes` positions of ours and younger than `min_age_ms` (set both to 0 to
/// force one). Keeps the newest `keep` generations.
///
/// The lease is renewed every [`LEASE_RENEW_EVERY`] while the copy is made and uploaded,
/// however long that takes, and the manifest is written only after a compare-and-set
/// renewal from the revision last granted proves the lease was never lost meanwhile (not
/// every store has a create-only write to fence with: the NATS object store has not). A save
/// that lost its lease deletes its object and writes nothing. The manifest's generation is
/// at least the lease's revision, so two savers never write the same manifest name.
pub async fn save<S, T, F>(
    store: &S,
    transport: &T,
    files: &F,
    p: &SaveParams<'_>,
    pause: Pause<'_>,
    progress: Progress<'_>,
) -> Result<SaveOutcome, SnapshotError>
where
    S: ObjectStore + ?Sized,
    T: Transport + ?Sized,
    F: SnapshotFiles + ?Sized,
{
    let revision = match transport
        .lease(SNAPSHOT_LEASE, p.owner)
        .await
        .map_err(|e| SnapshotError::Lease(e.to_string()))?
    {
        Claim::Held { by } => return Ok(SaveOutcome::Busy { by }),
        Claim::Granted { revision, .. } => revision,
    };
    let mut lease = Lease {
        transport,
        owner: p.owner,
        revision,
    };
    let result = save_leased(store, files, p, &mut lease, pause, progress).await;
    let _ = transport.release(SNAPSHOT_LEASE, p.owner).await;
    result
}

/// The snapshot lease, as held by a save.
struct Lease<'a, T: ?Sized> {
    transport: &'a T,
    owner: &'a str,
    revision: u64,
}

/// What one renewal of the lease found.
enum Renewal {
    /// Still ours, at a new revision.
    Renewed,
    /// Not ours any more: it expired, and may be another node's now.
    Lost,
    /// The transport did not answer.
    Unreachable(String),
}

impl<T: Transport + ?Sized> Lease<'_, T> {
    async fn try_renew(&mut self) -> Renewal {
        match self
            .transport
            .renew_lease(SNAPSHOT_LEASE, self.owner, self.revision)
            .await
        {
            Ok(Some(r)) => {
                self.revision = r;
                Renewal::Renewed
            }
            Ok(None) => Renewal::Lost,
            Err(e) => Renewal::Unreachable(e.to_string()),
        }
    }

    /// Renews the lease from the revision last granted: the fence before the manifest.
    async fn renew(&mut self) -> Result<(), SnapshotError> {
        match self.try_renew().await {
            Renewal::Renewed => Ok(()),
            Renewal::Lost => Err(lost()),
            Renewal::Unreachable(e) => Err(SnapshotError::Lease(e)),
        }
    }

    /// Runs `work`, renewing the lease every [`LEASE_RENEW_EVERY`] meanwhile. A renewal the
    /// transport did not answer is tried again at the next turn (the fence decides in the
    /// end); a lease known lost ends the work.
    async fn during<R>(
        &mut self,
        pause: Pause<'_>,
        work: impl std::future::Future<Output = R>,
    ) -> Result<R, SnapshotError> {
        let mut work = std::pin::pin!(work);
        loop {
            match futures::future::select(work.as_mut(), pause(LEASE_RENEW_EVERY)).await {
                futures::future::Either::Left((out, _)) => return Ok(out),
                futures::future::Either::Right(((), _)) => {
                    if let Renewal::Lost = self.try_renew().await {
                        return Err(lost());
                    }
                }
            }
        }
    }
}

fn lost() -> SnapshotError {
    SnapshotError::Lease(
        "the snapshot lease expired during the save and may be another node's now: this save is abandoned"
            .into(),
    )
}

async fn save_leased<S, T, F>(
    store: &S,
    files: &F,
    p: &SaveParams<'_>,
    lease: &mut Lease<'_, T>,
    pause: Pause<'_>,
    progress: Progress<'_>,
) -> Result<SaveOutcome, SnapshotError>
where
    S: ObjectStore + ?Sized,
    T: Transport + ?Sized,
    F: SnapshotFiles + ?Sized,
{
    let gens = generations(store).await?;
    let newest = match gens.first() {
        Some(g) => read_manifest(store, *g).await?,
        None => None,
    };
    if let Some(n) = &newest
        && p.first_only
    {
        return Ok(SaveOutcome::UpToDate(n.clone()));
    }
    if let Some(n) = &newest
        && n.position + p.min_changes > p.position
        && p.now_ms.saturating_sub(n.created_ms) < p.min_age_ms
    {
        return Ok(SaveOutcome::UpToDate(n.clone()));
    }
    let local = lease.during(pause, files.create()).await??;
    let object = object_name(p.node, local.position, p.now_ms);
    let uploaded = lease
        .during(pause, store.put_file(&object, &local.path, progress))
        .await;
    files.discard(&local.path);
    match uploaded {
        Ok(r) => r.map_err(SnapshotError::Store)?,
        Err(e) => {
            let _ = store.delete(&object).await;
            return Err(e);
        }
    }
    // The fence: nobody held the lease since our last grant. The manifest and the pruning
    // follow at once, well within the lease's lifetime.
    if let Err(e) = lease.renew().await {
        let _ = store.delete(&object).await;
        return Err(e);
    }
    let gens = generations(store).await?;
    let info = SnapshotInfo {
        format: MANIFEST_FORMAT,
        generation: gens.first().map_or(1, |g| g + 1).max(lease.revision),
        object,
        position: local.position,
        node: p.node,
        created_ms: p.now_ms,
        size: local.size,
        raw_size: local.raw_size,
        checksum: local.checksum,
        horizon_ms: local.horizon_ms,
        schema_digest: local.schema_digest,
    };
    let json = serde_json::to_vec_pretty(&info).expect("a manifest serialises");
    store
        .put_bytes(&manifest_name(info.generation), Bytes::from(json))
        .await
        .map_err(SnapshotError::Store)?;
    prune(store, p.keep.max(1), p.now_ms).await?;
    Ok(SaveOutcome::Saved(info))
}

/// The creation time (ms) in a snapshot object's name.
fn object_created_ms(name: &str) -> Option<u64> {
    name.strip_prefix("snapshot-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Deletes manifests beyond the newest `keep` generations and the objects only they refer
/// to, and objects no manifest refers to that are older than [`ORPHAN_GRACE_MS`] (left by a
/// saver that died before writing its manifest). An object younger than that and in no
/// manifest may be another node's save under way: it is left alone.
async fn prune<S: ObjectStore + ?Sized>(
    store: &S,
    keep: usize,
    now_ms: u64,
) -> Result<(), SnapshotError> {
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
    let mut dropped = std::collections::BTreeSet::new();
    for g in gens.iter().skip(keep) {
        if let Some(info) = read_manifest(store, *g).await? {
            dropped.insert(info.object);
        }
        store
            .delete(&manifest_name(*g))
            .await
            .map_err(SnapshotError::Store)?;
    }
    for name in store.list().await.map_err(SnapshotError::Store)? {
        if !name.starts_with("snapshot-") || kept.contains(&name) {
            continue;
        }
        let orphan_old =
            object_created_ms(&name).is_none_or(|c| now_ms.saturating_sub(c) > ORPHAN_GRACE_MS);
        if dropped.contains(&name) || orphan_old {
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

/// A node's fetch before it restores: releases the snapshot lease `owner` may still hold,
/// then [`fetch_latest`]. No save of this node is in flight while it restores (the node
/// does not fetch while it saves), so a lease it still holds is stale: one whose grant
/// reached the server while its answer was lost. Kept, it would keep the nodes that could
/// take the snapshot this node waits for out until it expired (regression 07).
pub async fn fetch_to_restore<S, T, F>(
    store: &S,
    transport: &T,
    owner: &str,
    files: &F,
    progress: Progress<'_>,
    min_position: u64,
) -> Result<Fetched, SnapshotError>
where
    S: ObjectStore + ?Sized,
    T: Transport + ?Sized,
    F: SnapshotFiles + ?Sized,
{
    release_stale_lease(transport, owner).await;
    fetch_latest(store, files, progress, min_position).await
}

/// The first step of [`fetch_to_restore`], for a caller that cannot reach its store at all:
/// the stale lease goes anyway. A failed release changes nothing: the lease expires on its
/// own.
pub async fn release_stale_lease<T: Transport + ?Sized>(transport: &T, owner: &str) {
    let _ = transport.release(SNAPSHOT_LEASE, owner).await;
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

#[cfg(test)]
mod tests;
