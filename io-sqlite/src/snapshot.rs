//! Snapshot files: a consistent, compressed, checksummed copy of the live database, and the
//! checks a downloaded one passes before anything of it is used.
//!
//! The copy is made with SQLite's online backup API from a read transaction, so applications
//! keep writing while it runs. Before copying, tombstones older than the configured horizon
//! are removed (no node can still need them: see the README) and the horizon is recorded in
//! the copy. Temporary files live in `<db>-marmot-snapshots/`, beside the database.

use marmot_core::NodeId;
use marmot_core::snapshot::{LocalSnapshot, SnapshotError, SnapshotInfo, StagedSnapshot};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::schema::PREFIX;

/// Where a database's snapshot files are made and staged.
#[derive(Clone, Debug)]
pub struct SnapshotDir {
    db: PathBuf,
    dir: PathBuf,
    tombstone_ttl_ms: u64,
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
/// transaction; the copy never restarts because someone wrote meanwhile).
pub fn backup_into_file(from: &Connection, to: &Path) -> rusqlite::Result<()> {
    let mut dest = Connection::open(to)?;
    let backup = Backup::new(from, &mut dest)?;
    loop {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            // Another connection holds a lock the copy needs: wait and go on.
            _ => std::thread::sleep(Duration::from_millis(10)),
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
        }
    }

    fn ensure_dir(&self) -> Result<(), SnapshotError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| local(format!("creating {}: {e}", self.dir.display())))
    }

    /// Removes tombstones older than the horizon; returns the horizon in force (ms).
    fn collect_tombstones(&self, now_ms: u64) -> Result<u64, SnapshotError> {
        let conn = crate::open_connection(&self.db, Duration::from_secs(30)).map_err(local)?;
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
        let raw = self.dir.join(format!("create-{now_ms}.db"));
        let packed = self.dir.join(format!("create-{now_ms}.db.zst"));
        let _ = std::fs::remove_file(&raw);
        {
            let src = Connection::open_with_flags(&self.db, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(local)?;
            src.busy_timeout(Duration::from_secs(30)).map_err(local)?;
            backup_into_file(&src, &raw)
                .map_err(|e| local(format!("copying the database: {e}")))?;
        }
        let position: i64 = {
            let c = Connection::open(&raw).map_err(local)?;
            // A self-contained file: no WAL beside it.
            c.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get::<_, String>(0))
                .map_err(local)?;
            c.query_row(
                "SELECT value FROM \"__marmot__meta\" WHERE key = 'position'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(local)?
            .unwrap_or(0)
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

/// Whether every user table (replicated or not) of `conn` is empty and marmot never captured,
/// applied or versioned anything here: such a database can take a snapshot whole.
pub fn is_empty(conn: &Connection) -> rusqlite::Result<bool> {
    let names: Vec<(String, String)> = conn
        .prepare("SELECT name, type FROM pragma_table_list WHERE schema = 'main'")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (name, kind) in names {
        if name.starts_with("sqlite_") || kind != "table" {
            continue;
        }
        // marmot's own tables that say something local happened; the rest (meta, registry,
        // inbox, parked, conflicts) do not make a database "not empty".
        let marmot_local = [
            format!("{PREFIX}log__"),
            format!("{PREFIX}ver__"),
            format!("{PREFIX}outbox"),
        ];
        if name.starts_with(PREFIX) && !marmot_local.iter().any(|p| name.starts_with(p.as_str())) {
            continue;
        }
        let q = format!("SELECT 1 FROM {} LIMIT 1", crate::ddl::quote(&name));
        if conn.query_row(&q, [], |_| Ok(())).optional()?.is_some() {
            return Ok(false);
        }
    }
    let position: Option<i64> = conn
        .query_row(
            "SELECT value FROM \"__marmot__meta\" WHERE key = 'position'",
            [],
            |r| r.get(0),
        )
        .optional()
        .unwrap_or(None);
    Ok(position.unwrap_or(0) == 0)
}

/// Adds missing rows of another database's marmot bookkeeping that belong to the cluster
/// (stashed chunks, parked batches), not to that node.
pub(crate) fn import_cluster_state(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO main.\"__marmot__inbox\" SELECT * FROM snap.\"__marmot__inbox\"",
        [],
    )?;
    conn.execute(
        "INSERT INTO main.\"__marmot__parked\" (stream_seq, origin, incarnation, batch_seq, reason, message, parked_at_ms, attempts, retry_requested) \
         SELECT stream_seq, origin, incarnation, batch_seq, reason, message, parked_at_ms, attempts, retry_requested FROM snap.\"__marmot__parked\" p \
         WHERE NOT EXISTS (SELECT 1 FROM main.\"__marmot__parked\" q WHERE q.stream_seq = p.stream_seq)",
        params![],
    )?;
    Ok(())
}

/// Merges table `t` from the attached `snap` database into `main` under the merge rule.
/// `Ok(Err(why))`: the snapshot's table cannot be merged (missing, different key).
/// Records, in a temporary table, the versions of this node's batches still waiting in the
/// outbox: their rows are this node's unpublished writes, which no snapshot can hold, so the
/// merge must not take their absence from the snapshot for a collected delete.
pub(crate) fn remember_unpublished(conn: &Connection, me: NodeId) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS \"marmot_unpublished\" (stamp INTEGER PRIMARY KEY, node INTEGER NOT NULL); \
         DELETE FROM temp.\"marmot_unpublished\";",
    )?;
    let payloads: Vec<Vec<u8>> = conn
        .prepare("SELECT payload FROM main.\"__marmot__outbox\" WHERE chunk = 0")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut ins = conn.prepare(
        "INSERT OR IGNORE INTO temp.\"marmot_unpublished\" (stamp, node) VALUES (?1, ?2)",
    )?;
    for p in payloads {
        match marmot_core::wire::decode_message(&p) {
            Ok((h, _)) => {
                ins.execute([h.stamp.as_u64() as i64, me as i64])?;
            }
            Err(e) => {
                tracing::warn!("an outbox message does not decode ({e}); it is published as it is")
            }
        }
    }
    Ok(())
}

/// Drops the table [`remember_unpublished`] filled.
pub(crate) fn forget_unpublished(conn: &Connection) {
    let _ = conn.execute_batch("DROP TABLE IF EXISTS temp.\"marmot_unpublished\";");
}

pub(crate) fn merge_table(
    conn: &Connection,
    t: &crate::schema::TableInfo,
    horizon_ms: u64,
) -> rusqlite::Result<Result<(), String>> {
    use crate::ddl::{quote, ver_table};
    let name = &t.name;
    let ver = ver_table(name);
    let has = |table: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT count(*) FROM snap.sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    if !has(name)? || !has(&ver)? {
        return Ok(Err("the snapshot has no such table".into()));
    }
    let snap_cols: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_xinfo(?1, 'snap') WHERE hidden = 0")?
        .query_map([name], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if t.key().iter().any(|k| !snap_cols.contains(&k.name)) {
        return Ok(Err(
            "the snapshot's table has a different primary key".into()
        ));
    }
    let cols: Vec<&str> = t
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .filter(|c| snap_cols.iter().any(|s| s == c))
        .collect();
    let list = |prefix: &str| {
        cols.iter()
            .map(|c| format!("{prefix}{}", quote(c)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let keys: Vec<String> = t.key().iter().map(|k| quote(&k.name)).collect();
    let klist = |prefix: &str| {
        (0..t.key_columns)
            .map(|i| format!("{prefix}\"k{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let row_to_ver = |row: &str, v: &str| {
        keys.iter()
            .enumerate()
            .map(|(i, k)| format!("{row}.{k} = {v}.\"k{i}\""))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let ver_to_ver = |a: &str, b: &str| {
        (0..t.key_columns)
            .map(|i| format!("{a}.\"k{i}\" = {b}.\"k{i}\""))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let newer =
        "(lv.stamp IS NULL OR sv.stamp > lv.stamp OR (sv.stamp = lv.stamp AND sv.node > lv.node))";
    let (qt, qv) = (quote(name), quote(&ver));
    let sets = cols
        .iter()
        .map(|c| format!("{q} = excluded.{q}", q = quote(c)))
        .collect::<Vec<_>>()
        .join(", ");
    // Rows the snapshot has at a higher version.
    conn.execute(
        &format!(
            "INSERT INTO main.{qt} ({cl}) SELECT {sl} FROM snap.{qt} s JOIN snap.{qv} sv ON {rs} \
             LEFT JOIN main.{qv} lv ON {vv} WHERE sv.deleted = 0 AND {newer} \
             ON CONFLICT ({kc}) DO UPDATE SET {sets}",
            cl = list(""),
            sl = list("s."),
            rs = row_to_ver("s", "sv"),
            vv = ver_to_ver("lv", "sv"),
            kc = keys.join(", "),
        ),
        [],
    )?;
    // Rows the snapshot deleted at a higher version.
    conn.execute(
        &format!(
            "DELETE FROM main.{qt} WHERE ({kc}) IN (SELECT {sk} FROM snap.{qv} sv LEFT JOIN main.{qv} lv ON {vv} \
             WHERE sv.deleted = 1 AND {newer})",
            kc = keys.join(", "),
            sk = klist("sv."),
            vv = ver_to_ver("lv", "sv"),
        ),
        [],
    )?;
    // Rows that existed before marmot started (no version anywhere): add the missing ones.
    conn.execute(
        &format!(
            "INSERT OR IGNORE INTO main.{qt} ({cl}) SELECT {sl} FROM snap.{qt} s LEFT JOIN snap.{qv} sv ON {rs} \
             WHERE sv.\"k0\" IS NULL AND NOT EXISTS (SELECT 1 FROM main.{qv} lv WHERE {rl})",
            cl = list(""),
            sl = list("s."),
            rs = row_to_ver("s", "sv"),
            rl = row_to_ver("s", "lv"),
        ),
        [],
    )?;
    // Rows the snapshot no longer knows at all, with a version older than its tombstone
    // horizon: they were deleted and the tombstone collected. Not this node's unpublished
    // writes (see `remember_unpublished`): a clock that lags by more than the tombstone
    // lifetime stamps them below the horizon, and the snapshot cannot have seen them.
    if horizon_ms > 0 {
        let limit = (horizon_ms << 16) as i64;
        let gone = format!(
            "SELECT {lk} FROM main.{qv} lv WHERE lv.stamp < {limit} AND NOT EXISTS (SELECT 1 FROM snap.{qv} sv WHERE {vv}) \
             AND NOT EXISTS (SELECT 1 FROM temp.\"marmot_unpublished\" u WHERE u.stamp = lv.stamp AND u.node = lv.node)",
            lk = klist("lv."),
            vv = ver_to_ver("lv", "sv"),
        );
        conn.execute(
            &format!(
                "DELETE FROM main.{qt} WHERE ({}) IN ({gone})",
                keys.join(", ")
            ),
            [],
        )?;
        conn.execute(
            &format!("DELETE FROM main.{qv} WHERE ({}) IN ({gone})", klist("")),
            [],
        )?;
    }
    // Finally the versions themselves.
    conn.execute(
        &format!(
            "INSERT INTO main.{qv} ({k}, stamp, node, deleted) SELECT {sk}, sv.stamp, sv.node, sv.deleted FROM snap.{qv} sv \
             LEFT JOIN main.{qv} lv ON {vv} WHERE {newer} \
             ON CONFLICT ({k}) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = excluded.deleted",
            k = klist(""),
            sk = klist("sv."),
            vv = ver_to_ver("lv", "sv"),
        ),
        [],
    )?;
    Ok(Ok(()))
}
