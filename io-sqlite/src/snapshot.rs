//! Snapshot files: a consistent, compressed, checksummed copy of the live database, and the
//! checks a downloaded one passes before anything of it is used.
//!
//! The copy is made with SQLite's online backup API from a read transaction, so applications
//! keep writing while it runs. Before copying, tombstones older than the configured horizon
//! are removed (no node can still need them: see the README) and the horizon is recorded in
//! the copy. Temporary files live in `<db>-marmot-snapshots/`, beside the database.

use marmot_core::snapshot::{LocalSnapshot, SnapshotError, SnapshotInfo, StagedSnapshot};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::schema::PREFIX;

/// Where a database's snapshot files are made and staged.
#[derive(Clone)]
pub struct SnapshotDir {
    db: PathBuf,
    dir: PathBuf,
    tombstone_ttl_ms: u64,
    busy_timeout: Duration,
    crash_point: Option<crate::CrashPoint>,
}

impl std::fmt::Debug for SnapshotDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotDir")
            .field("db", &self.db)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn local(e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Local(e.to_string())
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// BLAKE3 of a file, and its length.
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut f = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        hasher.update(&buf[..r]);
        n += r as u64;
    }
    Ok((hasher.finalize().to_hex().to_string(), n))
}

/// Copies the database `from` into a new file `to` in one backup step (one consistent read
/// transaction; the copy never restarts because someone wrote meanwhile). A lock the copy
/// needs is waited for up to `busy_timeout`, then the copy fails as busy (and is retried by
/// the caller later), never forever.
pub fn backup_into_file(
    from: &Connection,
    to: &Path,
    busy_timeout: Duration,
) -> rusqlite::Result<()> {
    let mut dest = Connection::open(to)?;
    let backup = Backup::new(from, &mut dest)?;
    let deadline = std::time::Instant::now() + busy_timeout;
    loop {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            // Another connection holds a lock the copy needs: wait and go on, for a while.
            _ if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                    Some(format!(
                        "the database stayed locked for {busy_timeout:?} while it was copied"
                    )),
                ));
            }
        }
    }
}

impl SnapshotDir {
    /// Snapshot files for the database at `db`. Tombstones older than `tombstone_ttl`
    /// (zero: keep them all) are removed when a snapshot is taken.
    pub fn new(db: &Path, tombstone_ttl: Duration) -> Self {
        let name = db
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "db".into());
        SnapshotDir {
            db: db.to_path_buf(),
            dir: db.with_file_name(format!("{name}-marmot-snapshots")),
            tombstone_ttl_ms: tombstone_ttl.as_millis() as u64,
            busy_timeout: Duration::from_secs(5),
            crash_point: None,
        }
    }

    /// Dies on purpose between the steps of making a snapshot (the simulation's crash
    /// points; see [`crate::StoreConfig::crash_point`]).
    pub fn with_crash_point(mut self, crash_point: Option<crate::CrashPoint>) -> Self {
        self.crash_point = crash_point;
        self
    }

    /// Waits at most this long for a lock (the store's `busy_timeout`; default 5 s).
    pub fn with_busy_timeout(mut self, busy_timeout: Duration) -> Self {
        self.busy_timeout = busy_timeout;
        self
    }

    fn ensure_dir(&self) -> Result<(), SnapshotError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| local(format!("creating {}: {e}", self.dir.display())))
    }

    /// Removes tombstones older than the horizon; returns the horizon in force (ms).
    fn collect_tombstones(&self, now_ms: u64) -> Result<u64, SnapshotError> {
        let conn = crate::open_connection(&self.db, self.busy_timeout).map_err(local)?;
        let stored: Option<i64> = conn
            .query_row(
                "SELECT value FROM \"__marmot__meta\" WHERE key = 'horizon'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(local)?;
        if self.tombstone_ttl_ms == 0 {
            return Ok(stored.unwrap_or(0) as u64);
        }
        let horizon = now_ms
            .saturating_sub(self.tombstone_ttl_ms)
            .max(stored.unwrap_or(0) as u64);
        let tx = conn.unchecked_transaction().map_err(local)?;
        let vers: Vec<String> = {
            let mut stmt = tx
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
                .map_err(local)?;
            let names = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(local)?;
            names
                .filter_map(Result::ok)
                .filter(|n| n.starts_with(&format!("{PREFIX}ver__")))
                .collect()
        };
        // Stamps keep wall milliseconds in their upper 48 bits.
        let limit = (horizon << 16) as i64;
        for v in vers {
            tx.execute(
                &format!(
                    "DELETE FROM {} WHERE deleted = 1 AND stamp < ?1",
                    crate::ddl::quote(&v)
                ),
                [limit],
            )
            .map_err(local)?;
        }
        // Values kept for columns a replicated change removed go once that change is past
        // the horizon.
        let kept: i64 = tx
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '__marmot__kept_values'",
                [],
                |r| r.get(0),
            )
            .map_err(local)?;
        if kept > 0 {
            tx.execute(
                "DELETE FROM \"__marmot__kept_values\" WHERE kept < ?1",
                [limit],
            )
            .map_err(local)?;
        }
        // So do the losing changes whose node's late rows go out as a repair: no row written
        // before one of them arrives after the horizon.
        let late: i64 = tx
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '__marmot__repair_late'",
                [],
                |r| r.get(0),
            )
            .map_err(local)?;
        if late > 0 {
            tx.execute(
                "DELETE FROM \"__marmot__repair_late\" WHERE stamp < ?1",
                [limit],
            )
            .map_err(local)?;
        }
        tx.execute(
            "INSERT INTO \"__marmot__meta\" (key, value) VALUES ('horizon', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [horizon as i64],
        )
        .map_err(local)?;
        tx.commit().map_err(local)?;
        Ok(horizon)
    }

    /// Makes a consistent, zstd-compressed, BLAKE3-checksummed copy of the live database.
    pub fn create(&self, now_ms: u64) -> Result<LocalSnapshot, SnapshotError> {
        self.ensure_dir()?;
        let horizon_ms = self.collect_tombstones(now_ms)?;
        if self
            .crash_point
            .as_ref()
            .is_some_and(|c| c("between collecting tombstones and copying the database"))
        {
            return Err(local("simulated crash"));
        }
        let raw = self.dir.join(format!("create-{now_ms}.db"));
        let packed = self.dir.join(format!("create-{now_ms}.db.zst"));
        let _ = std::fs::remove_file(&raw);
        {
            let src = Connection::open_with_flags(&self.db, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(local)?;
            src.busy_timeout(self.busy_timeout).map_err(local)?;
            backup_into_file(&src, &raw, self.busy_timeout)
                .map_err(|e| local(format!("copying the database: {e}")))?;
        }
        let (position, schema_digest): (i64, String) = {
            let c = Connection::open(&raw).map_err(local)?;
            // A self-contained file: no WAL beside it.
            c.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get::<_, String>(0))
                .map_err(local)?;
            leave_out_local_tables(&c).map_err(local)?;
            let digest = crate::replicated::schema_digest(&c).map_err(local)?;
            let position = c
                .query_row(
                    "SELECT value FROM \"__marmot__meta\" WHERE key = 'position'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(local)?
                .unwrap_or(0);
            (position, digest)
        };
        let raw_size = std::fs::metadata(&raw).map_err(local)?.len();
        let out = File::create(&packed).map_err(local)?;
        let mut hashing = Hashing {
            inner: BufWriter::with_capacity(1 << 20, out),
            hasher: blake3::Hasher::new(),
            bytes: 0,
        };
        {
            let mut enc = zstd::stream::write::Encoder::new(&mut hashing, 1).map_err(local)?;
            // Compression is most of a snapshot's cost: use the machine's cores.
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
            if workers > 1 {
                enc.multithread(workers).map_err(local)?;
            }
            let mut input = BufReader::with_capacity(1 << 20, File::open(&raw).map_err(local)?);
            std::io::copy(&mut input, &mut enc).map_err(local)?;
            enc.finish().map_err(local)?;
        }
        hashing.flush().map_err(local)?;
        let _ = std::fs::remove_file(&raw);
        Ok(LocalSnapshot {
            path: packed,
            position: position as u64,
            size: hashing.bytes,
            raw_size,
            checksum: hashing.hasher.finalize().to_hex().to_string(),
            horizon_ms,
            schema_digest,
        })
    }

    /// A path to download `object` to.
    pub fn download_path(&self, object: &str) -> PathBuf {
        let _ = self.ensure_dir();
        self.dir.join(format!("download-{object}"))
    }

    /// Checks a downloaded object against its manifest (size and BLAKE3), decompresses it,
    /// and checks the result is a marmot database at the manifest's position.
    pub fn stage(
        &self,
        downloaded: &Path,
        info: &SnapshotInfo,
    ) -> Result<StagedSnapshot, SnapshotError> {
        let corrupt = |detail: String| SnapshotError::Corrupt {
            object: info.object.clone(),
            detail,
        };
        let (checksum, size) = hash_file(downloaded).map_err(local)?;
        if size != info.size {
            return Err(corrupt(format!(
                "{size} bytes, the manifest says {}",
                info.size
            )));
        }
        if checksum != info.checksum {
            return Err(corrupt(format!(
                "BLAKE3 {checksum}, the manifest says {}",
                info.checksum
            )));
        }
        self.ensure_dir()?;
        let staged = self.dir.join(format!("staged-{}.db", info.generation));
        let _ = std::fs::remove_file(&staged);
        {
            let dec = zstd::stream::read::Decoder::new(File::open(downloaded).map_err(local)?)
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            let mut out = BufWriter::with_capacity(1 << 20, File::create(&staged).map_err(local)?);
            let copied = std::io::copy(&mut dec.take(info.raw_size + 1), &mut out)
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            out.flush().map_err(local)?;
            if copied != info.raw_size {
                let _ = std::fs::remove_file(&staged);
                return Err(corrupt(format!(
                    "{copied} bytes of database, the manifest says {}",
                    info.raw_size
                )));
            }
        }
        let checked = (|| -> Result<(), SnapshotError> {
            // The BLAKE3 checksum proves these are the bytes the source's backup produced;
            // reading marmot's tables proves they are a marmot database at this position.
            let c = Connection::open_with_flags(&staged, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(local)?;
            let meta = |k: &str| -> Result<Option<i64>, SnapshotError> {
                c.query_row(
                    "SELECT value FROM \"__marmot__meta\" WHERE key = ?1",
                    [k],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| corrupt(format!("no marmot tables: {e}")))
            };
            let format = meta("format")?.unwrap_or(0);
            if format > crate::STORE_FORMAT {
                return Err(SnapshotError::Local(format!(
                    "snapshot {} has marmot tables of format {format}; this marmot knows {}: upgrade marmot",
                    info.object,
                    crate::STORE_FORMAT
                )));
            }
            let position = meta("position")?.unwrap_or(0) as u64;
            if position != info.position {
                return Err(corrupt(format!(
                    "position {position}, the manifest says {}",
                    info.position
                )));
            }
            Ok(())
        })();
        if let Err(e) = checked {
            let _ = std::fs::remove_file(&staged);
            return Err(e);
        }
        Ok(StagedSnapshot {
            info: info.clone(),
            path: staged,
        })
    }

    /// Removes a temporary file.
    pub fn discard(path: &Path) {
        let _ = std::fs::remove_file(path);
        for ext in ["-wal", "-shm", "-journal"] {
            let mut p = path.as_os_str().to_owned();
            p.push(ext);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }
}

/// Removes from a snapshot copy what its `[tables]` lists keep on the node: the excluded
/// tables (with their indexes and triggers) and the views and triggers that name them. Their
/// pages are zeroed (`secure_delete`): their rows never leave the node, not even as free
/// pages of the copy.
fn leave_out_local_tables(c: &Connection) -> rusqlite::Result<()> {
    let excluded = crate::filter::excluded_tables(c, "main")?;
    if excluded.is_empty() {
        return Ok(());
    }
    c.execute_batch("PRAGMA secure_delete = ON")?;
    let naming: Vec<(String, String)> = c
        .prepare("SELECT type, name, sql FROM main.sqlite_master WHERE type IN ('view', 'trigger') AND sql IS NOT NULL")?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|(_, name, sql)| {
            !name.starts_with(crate::PREFIX)
                && crate::filter::mentions_excluded(sql, &excluded).is_some()
        })
        .map(|(kind, name, _)| (kind, name))
        .collect();
    for (kind, name) in naming {
        let what = if kind == "view" { "VIEW" } else { "TRIGGER" };
        c.execute_batch(&format!(
            "DROP {what} IF EXISTS main.{}",
            crate::ddl::quote(&name)
        ))?;
    }
    for t in excluded {
        c.execute_batch(&format!(
            "DROP TABLE IF EXISTS main.{}",
            crate::ddl::quote(&t)
        ))?;
    }
    Ok(())
}
