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
    // A failed release changes nothing: the lease expires on its own.
    let _ = transport.release(SNAPSHOT_LEASE, owner).await;
    fetch_latest(store, files, progress, min_position).await
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
mod tests {
    //! The save procedure against an in-memory store and lease: renewals during a slow
    //! upload, the fence when the lease was lost, and pruning that spares saves under way.
    use super::*;
    use crate::ports::{Deliveries, StreamBounds, TransportError};
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::task::Poll;

    /// A store whose uploads take `slow` polls each.
    #[derive(Default)]
    struct MemStore {
        objects: Mutex<BTreeMap<String, Bytes>>,
        slow: usize,
    }

    /// Completes after `n` polls (waking itself each time): a transfer that takes a while.
    async fn takes(n: usize) {
        let mut left = n;
        std::future::poll_fn(|cx| {
            if left == 0 {
                return Poll::Ready(());
            }
            left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    #[async_trait::async_trait]
    impl ObjectStore for MemStore {
        async fn put_file(&self, name: &str, _: &Path, _: Progress<'_>) -> Result<(), String> {
            takes(self.slow).await;
            self.put_bytes(name, Bytes::from_static(b"db")).await
        }
        async fn get_file(&self, name: &str, _: &Path, _: Progress<'_>) -> Result<(), String> {
            match self.objects.lock().unwrap().contains_key(name) {
                true => Ok(()),
                false => Err(format!("{name}: no such object")),
            }
        }
        async fn put_bytes(&self, name: &str, data: Bytes) -> Result<(), String> {
            self.objects.lock().unwrap().insert(name.into(), data);
            Ok(())
        }
        async fn get_bytes(&self, name: &str) -> Result<Option<Bytes>, String> {
            Ok(self.objects.lock().unwrap().get(name).cloned())
        }
        async fn list(&self) -> Result<Vec<String>, String> {
            Ok(self.objects.lock().unwrap().keys().cloned().collect())
        }
        async fn delete(&self, name: &str) -> Result<(), String> {
            self.objects.lock().unwrap().remove(name);
            Ok(())
        }
    }

    /// A lease that is lost (expired, taken by another node) after `renewals_left` renewals.
    struct MemLease {
        revision: AtomicU64,
        renewals: AtomicUsize,
        renewals_left: usize,
    }

    impl MemLease {
        fn new() -> Self {
            MemLease {
                revision: AtomicU64::new(1),
                renewals: AtomicUsize::new(0),
                renewals_left: usize::MAX,
            }
        }
    }

    /// A lease someone else holds; counts the releases asked of it.
    #[derive(Default)]
    struct HeldLease {
        releases: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Transport for HeldLease {
        async fn prepare(&self) -> Result<StreamBounds, TransportError> {
            Err(TransportError::other("lease only"))
        }
        async fn publish(&self, _: String, _: Bytes) -> Result<u64, TransportError> {
            Err(TransportError::other("lease only"))
        }
        async fn subscribe(&self, _: u64) -> Result<(StreamBounds, Deliveries), TransportError> {
            Err(TransportError::other("lease only"))
        }
        async fn lease(&self, _: &str, _: &str) -> Result<Claim, TransportError> {
            Ok(Claim::Held { by: "db-2".into() })
        }
        async fn renew_lease(
            &self,
            _: &str,
            _: &str,
            _: u64,
        ) -> Result<Option<u64>, TransportError> {
            Ok(None)
        }
        async fn release(&self, _: &str, _: &str) -> Result<(), TransportError> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Local files whose copies are at positions 10, 20, 30, ... and whose staging finds the
    /// objects named in `corrupt` damaged.
    #[derive(Default)]
    struct CheckedFiles {
        corrupt: Vec<String>,
        staged: Mutex<Vec<String>>,
        copies: AtomicU64,
    }

    #[async_trait::async_trait]
    impl SnapshotFiles for CheckedFiles {
        async fn create(&self) -> Result<LocalSnapshot, SnapshotError> {
            let mut l = NoFiles.create().await?;
            l.position = 10 * (self.copies.fetch_add(1, Ordering::SeqCst) + 1);
            Ok(l)
        }
        fn download_path(&self, object: &str) -> PathBuf {
            PathBuf::from(object)
        }
        async fn stage(
            &self,
            path: &Path,
            info: &SnapshotInfo,
        ) -> Result<StagedSnapshot, SnapshotError> {
            self.staged.lock().unwrap().push(info.object.clone());
            if self.corrupt.contains(&info.object) {
                return Err(SnapshotError::Corrupt {
                    object: info.object.clone(),
                    detail: "checksum mismatch".into(),
                });
            }
            Ok(StagedSnapshot {
                info: info.clone(),
                path: path.to_path_buf(),
            })
        }
        fn discard(&self, _: &Path) {}
    }

    #[async_trait::async_trait]
    impl Transport for MemLease {
        async fn prepare(&self) -> Result<StreamBounds, TransportError> {
            Err(TransportError::other("lease only"))
        }
        async fn publish(&self, _: String, _: Bytes) -> Result<u64, TransportError> {
            Err(TransportError::other("lease only"))
        }
        async fn subscribe(&self, _: u64) -> Result<(StreamBounds, Deliveries), TransportError> {
            Err(TransportError::other("lease only"))
        }
        async fn lease(&self, _: &str, _: &str) -> Result<Claim, TransportError> {
            Ok(Claim::Granted {
                server_ms: 1,
                revision: self.revision.fetch_add(1, Ordering::SeqCst) + 1,
            })
        }
        async fn renew_lease(
            &self,
            _: &str,
            _: &str,
            revision: u64,
        ) -> Result<Option<u64>, TransportError> {
            let n = self.renewals.fetch_add(1, Ordering::SeqCst);
            if n >= self.renewals_left || revision != self.revision.load(Ordering::SeqCst) {
                return Ok(None);
            }
            Ok(Some(self.revision.fetch_add(1, Ordering::SeqCst) + 1))
        }
        async fn release(&self, _: &str, _: &str) -> Result<(), TransportError> {
            Ok(())
        }
    }

    struct NoFiles;

    #[async_trait::async_trait]
    impl SnapshotFiles for NoFiles {
        async fn create(&self) -> Result<LocalSnapshot, SnapshotError> {
            Ok(LocalSnapshot {
                path: PathBuf::from("/nonexistent/copy.db.zst"),
                position: 42,
                size: 2,
                raw_size: 2,
                checksum: "00".into(),
                horizon_ms: 0,
            })
        }
        fn download_path(&self, object: &str) -> PathBuf {
            PathBuf::from(object)
        }
        async fn stage(&self, _: &Path, _: &SnapshotInfo) -> Result<StagedSnapshot, SnapshotError> {
            Err(SnapshotError::Local("not in these tests".into()))
        }
        fn discard(&self, _: &Path) {}
    }

    /// Every pause is over at once: the lease is renewed at every turn of the upload.
    fn no_wait(_: std::time::Duration) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    fn params(now_ms: u64) -> SaveParams<'static> {
        SaveParams {
            node: 1,
            owner: "db-1",
            position: 42,
            now_ms,
            min_changes: 0,
            min_age_ms: 0,
            keep: 2,
        }
    }

    fn names(store: &MemStore, prefix: &str) -> Vec<String> {
        store
            .objects
            .lock()
            .unwrap()
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect()
    }

    #[test]
    fn a_long_upload_keeps_its_lease_and_names_its_manifest_after_the_revision() {
        let store = MemStore {
            slow: 5,
            ..MemStore::default()
        };
        let lease = MemLease {
            revision: AtomicU64::new(100),
            renewals: AtomicUsize::new(0),
            renewals_left: usize::MAX,
        };
        let out = futures::executor::block_on(save(
            &store,
            &lease,
            &NoFiles,
            &params(1_000),
            &no_wait,
            &|_| {},
        ))
        .unwrap();
        let SaveOutcome::Saved(info) = out else {
            panic!("{out:?}")
        };
        assert!(
            lease.renewals.load(Ordering::SeqCst) >= 5,
            "renewed during the upload and once more as the fence"
        );
        assert!(info.generation > 100, "{}", info.generation);
        assert_eq!(
            names(&store, "manifest-"),
            vec![manifest_name(info.generation)]
        );
    }

    #[test]
    fn a_save_that_lost_its_lease_writes_no_manifest_and_removes_its_object() {
        let store = MemStore {
            slow: 5,
            ..MemStore::default()
        };
        // Lost during the upload.
        let lease = MemLease {
            revision: AtomicU64::new(7),
            renewals: AtomicUsize::new(0),
            renewals_left: 2,
        };
        let e = futures::executor::block_on(save(
            &store,
            &lease,
            &NoFiles,
            &params(1_000),
            &no_wait,
            &|_| {},
        ))
        .unwrap_err();
        assert!(e.to_string().contains("lease"), "{e}");
        assert!(names(&store, "manifest-").is_empty());
        assert!(names(&store, "snapshot-").is_empty(), "its object is gone");
        // Lost right before the manifest (the fence): the same.
        let store = MemStore::default();
        let lease = MemLease {
            revision: AtomicU64::new(7),
            renewals: AtomicUsize::new(0),
            renewals_left: 0,
        };
        assert!(
            futures::executor::block_on(save(
                &store,
                &lease,
                &NoFiles,
                &params(1_000),
                &no_wait,
                &|_| {}
            ))
            .is_err()
        );
        assert!(names(&store, "manifest-").is_empty());
        assert!(names(&store, "snapshot-").is_empty());
    }

    #[test]
    fn pruning_spares_an_object_another_save_is_still_writing_its_manifest_for() {
        let store = MemStore::default();
        let now = 10 * ORPHAN_GRACE_MS;
        // Another node's save under way (object uploaded, manifest not yet written), and an
        // orphan of a saver that died long ago.
        let young = object_name(2, 40, now - 1_000);
        let old = object_name(3, 10, now - 2 * ORPHAN_GRACE_MS);
        futures::executor::block_on(async {
            store.put_bytes(&young, Bytes::new()).await.unwrap();
            store.put_bytes(&old, Bytes::new()).await.unwrap();
        });
        let lease = MemLease {
            revision: AtomicU64::new(1),
            renewals: AtomicUsize::new(0),
            renewals_left: usize::MAX,
        };
        for i in 0..3 {
            futures::executor::block_on(save(
                &store,
                &lease,
                &NoFiles,
                &params(now + i),
                &no_wait,
                &|_| {},
            ))
            .unwrap();
        }
        let objects = names(&store, "snapshot-");
        assert!(objects.contains(&young), "{objects:?}");
        assert!(!objects.contains(&old), "{objects:?}");
        assert_eq!(names(&store, "manifest-").len(), 2, "keep = 2");
        assert_eq!(
            objects.len(),
            3,
            "two kept generations and the save under way: {objects:?}"
        );
    }

    /// Saves three generations at positions 10, 20 and 30; returns their manifests.
    fn three_generations(store: &MemStore) -> Vec<SnapshotInfo> {
        let lease = MemLease::new();
        let files = CheckedFiles::default();
        (1..=3)
            .map(|i| {
                let mut p = params(1_000 * i);
                p.position = 10 * i;
                p.keep = 5;
                match futures::executor::block_on(save(
                    store,
                    &lease,
                    &files,
                    &p,
                    &no_wait,
                    &|_| {},
                ))
                .unwrap()
                {
                    SaveOutcome::Saved(info) => info,
                    other => panic!("saved: {other:?}"),
                }
            })
            .collect()
    }

    #[test]
    fn a_newer_snapshot_gets_a_higher_generation_and_the_newest_is_fetched() {
        let store = MemStore::default();
        let infos = three_generations(&store);
        assert!(infos[0].generation < infos[1].generation);
        assert!(infos[1].generation < infos[2].generation);
        let files = CheckedFiles::default();
        let f = futures::executor::block_on(fetch_latest(&store, &files, &|_| {}, 0)).unwrap();
        assert_eq!(f.staged.unwrap().info, infos[2]);
        assert!(f.rejected.is_empty());
    }

    #[test]
    fn a_snapshot_that_does_not_verify_is_reported_and_an_older_one_is_used() {
        let store = MemStore::default();
        let infos = three_generations(&store);
        let files = CheckedFiles {
            corrupt: vec![infos[2].object.clone()],
            ..CheckedFiles::default()
        };
        let f = futures::executor::block_on(fetch_latest(&store, &files, &|_| {}, 0)).unwrap();
        assert_eq!(f.staged.unwrap().info, infos[1]);
        assert_eq!(f.rejected.len(), 1);
        assert!(
            matches!(&f.rejected[0], SnapshotError::Corrupt { object, .. } if *object == infos[2].object)
        );
    }

    #[test]
    fn snapshots_below_the_position_needed_are_passed_over_without_downloading_them() {
        let store = MemStore::default();
        let infos = three_generations(&store);
        let files = CheckedFiles {
            corrupt: vec![infos[2].object.clone()],
            ..CheckedFiles::default()
        };
        // Needs position 25: the newest is damaged, the others are too old.
        let f = futures::executor::block_on(fetch_latest(&store, &files, &|_| {}, 25)).unwrap();
        assert!(f.staged.is_none());
        assert_eq!(*files.staged.lock().unwrap(), vec![infos[2].object.clone()]);
    }

    #[test]
    fn a_recent_enough_snapshot_is_not_taken_again_and_a_held_lease_means_busy() {
        let store = MemStore::default();
        let infos = three_generations(&store);
        let mut p = params(3_500);
        p.position = 31;
        p.min_changes = 5;
        p.min_age_ms = 10_000;
        let out = futures::executor::block_on(save(
            &store,
            &MemLease::new(),
            &NoFiles,
            &p,
            &no_wait,
            &|_| {},
        ));
        assert!(matches!(out, Ok(SaveOutcome::UpToDate(i)) if i == infos[2]));
        let out = futures::executor::block_on(save(
            &store,
            &HeldLease::default(),
            &NoFiles,
            &params(9_000),
            &no_wait,
            &|_| {},
        ));
        assert!(matches!(out, Ok(SaveOutcome::Busy { by }) if by == "db-2"));
    }

    #[test]
    fn a_fetch_to_restore_releases_the_nodes_stale_lease_first() {
        let store = MemStore::default();
        three_generations(&store);
        let lease = HeldLease::default();
        let files = CheckedFiles::default();
        let f = futures::executor::block_on(fetch_to_restore(
            &store,
            &lease,
            "db-1",
            &files,
            &|_| {},
            0,
        ))
        .unwrap();
        assert!(f.staged.is_some());
        assert_eq!(lease.releases.load(Ordering::SeqCst), 1);
    }
}
