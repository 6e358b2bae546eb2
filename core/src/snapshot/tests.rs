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
    async fn renew_lease(&self, _: &str, _: &str, _: u64) -> Result<Option<u64>, TransportError> {
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
            schema_digest: String::new(),
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
        first_only: false,
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
            match futures::executor::block_on(save(store, &lease, &files, &p, &no_wait, &|_| {}))
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
fn a_seed_is_saved_only_into_an_empty_store() {
    // However old the newest snapshot and however far behind this node: one exists, so a
    // seed is not taken (the first seed wins; later ones would write older data over it).
    let store = MemStore::default();
    let infos = three_generations(&store);
    let mut p = params(1_000_000_000);
    p.position = 10_000;
    p.first_only = true;
    let out = futures::executor::block_on(save(
        &store,
        &MemLease::new(),
        &NoFiles,
        &p,
        &no_wait,
        &|_| {},
    ));
    assert!(matches!(out, Ok(SaveOutcome::UpToDate(i)) if i == infos[2]));
    // Into an empty store it is saved.
    let out = futures::executor::block_on(save(
        &MemStore::default(),
        &MemLease::new(),
        &NoFiles,
        &p,
        &no_wait,
        &|_| {},
    ));
    assert!(matches!(out, Ok(SaveOutcome::Saved(_))), "{out:?}");
}

#[test]
fn a_fetch_to_restore_releases_the_nodes_stale_lease_first() {
    let store = MemStore::default();
    three_generations(&store);
    let lease = HeldLease::default();
    let files = CheckedFiles::default();
    let f =
        futures::executor::block_on(fetch_to_restore(&store, &lease, "db-1", &files, &|_| {}, 0))
            .unwrap();
    assert!(f.staged.is_some());
    assert_eq!(lease.releases.load(Ordering::SeqCst), 1);
}
