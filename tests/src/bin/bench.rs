//! marmot's benchmark: prints figures and writes them as JSON.
//!
//! (a) rows/s inserting N rows in 100-row transactions into a plain SQLite file;
//! (b) the same with marmot's triggers installed;
//! (c) end to end: rows/s until three marmot nodes (one nats-server) all hold the N rows
//!     written on them, a third on each node, concurrently;
//! (d) replication lag (commit on node 1 to visible on node 2) for single-row writes at a
//!     fixed rate;
//! (e) how long marmot holds the write lock to capture, and to apply, one application
//!     transaction of N rows;
//! (f) snapshot save (copy, compress, checksum, upload to a NATS object store) and restore
//!     (download, verify, decompress, restore into an empty database) of a database of
//!     `--snapshot-mib` MiB (default 1024), next to `cp` of the same file on the same disk.
//!
//! Each figure is measured `--runs` times; the JSON keeps every run and the median. Ratios
//! (b/a) are taken within the same run. Usage:
//!   cargo run --release -p marmot-tests --bin marmot-bench -- [--rows N] [--runs K] [--rate W] [--seconds S] [--out FILE]

use marmot_tests::{Nats, Node, wait_for};
use rusqlite::{Connection, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TABLE: &str = "CREATE TABLE Books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, author TEXT NOT NULL, publication_year INTEGER);
                     CREATE TABLE Lag (id INTEGER PRIMARY KEY, payload TEXT);";

struct Args {
    snapshot_mib: u64,
    soak_seconds: u64,
    soak_rate: u64,
    rows: u64,
    runs: usize,
    rate: u64,
    seconds: u64,
    out: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        snapshot_mib: 1024,
        soak_seconds: 0,
        soak_rate: 2_500,
        rows: 100_000,
        runs: 3,
        rate: 500,
        seconds: 10,
        out: PathBuf::from("bench-results/latest.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--rows" => a.rows = v.parse().expect("--rows N"),
            "--snapshot-mib" => a.snapshot_mib = v.parse().expect("--snapshot-mib N"),
            "--soak-seconds" => a.soak_seconds = v.parse().expect("--soak-seconds S"),
            "--soak-rate" => a.soak_rate = v.parse().expect("--soak-rate W"),
            "--runs" => a.runs = v.parse().expect("--runs K"),
            "--rate" => a.rate = v.parse().expect("--rate W"),
            "--seconds" => a.seconds = v.parse().expect("--seconds S"),
            "--out" => a.out = PathBuf::from(v),
            _ => panic!("unknown argument {k}"),
        }
    }
    a
}

fn app_connection(db: &Path) -> Connection {
    let c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
        .unwrap();
    c
}

/// Inserts `count` rows with ids from `first`, 100 per transaction; returns the time taken.
fn insert_rows(c: &Connection, first: u64, count: u64) -> Duration {
    let start = Instant::now();
    let mut i = 0;
    while i < count {
        let tx = c.unchecked_transaction().unwrap();
        {
            let mut stmt = c
                .prepare_cached("INSERT INTO Books (id, title, author, publication_year) VALUES (?1, ?2, ?3, ?4)")
                .unwrap();
            for k in i..(i + 100).min(count) {
                let id = first + k;
                stmt.execute(params![
                    id as i64,
                    format!("Title number {id}"),
                    "Some Author",
                    1900 + (id % 120) as i64
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
        i += 100;
    }
    start.elapsed()
}

fn plain_and_triggers(dir: &Path, rows: u64) -> (f64, f64) {
    let plain = dir.join("plain.db");
    let c = app_connection(&plain);
    c.execute_batch(TABLE).unwrap();
    let a = rows as f64 / insert_rows(&c, 1, rows).as_secs_f64();

    let with = dir.join("triggers.db");
    let c = app_connection(&with);
    c.execute_batch(TABLE).unwrap();
    // Opening the store installs marmot's capture triggers, as the daemon does.
    drop(marmot_sqlite::SqliteStore::open(marmot_sqlite::StoreConfig::new(&with, 1, 1)).unwrap());
    let b = rows as f64 / insert_rows(&c, 1, rows).as_secs_f64();
    (a, b)
}

/// An application's connection to a new database `name` in `dir` with the bench's tables,
/// and marmot's store of it as node `node`.
fn app_and_store(dir: &Path, name: &str, node: u64) -> (Connection, marmot_sqlite::SqliteStore) {
    let db = dir.join(name);
    let c = app_connection(&db);
    c.execute_batch(TABLE).unwrap();
    let store =
        marmot_sqlite::SqliteStore::open(marmot_sqlite::StoreConfig::new(&db, node, node)).unwrap();
    (c, store)
}

/// (e): milliseconds to capture, and to apply elsewhere, one transaction of `rows` rows.
fn one_big_transaction(dir: &Path, rows: u64) -> (f64, f64) {
    use marmot_core::ports::Storage;
    let open = |name: &str, node: u64| app_and_store(dir, name, node);
    let (app, mut source) = open("big-source.db", 1);
    let (_app2, mut target) = open("big-target.db", 2);
    app.execute_batch("BEGIN").unwrap();
    {
        let mut stmt = app
            .prepare("INSERT INTO Books (id, title, author, publication_year) VALUES (?1, ?2, 'Some Author', 1999)")
            .unwrap();
        for id in 1..=rows {
            stmt.execute(params![id as i64, format!("Title number {id}")])
                .unwrap();
        }
    }
    app.execute_batch("COMMIT").unwrap();
    let mut clock = marmot_core::Clock::new(marmot_core::Stamp::ZERO);
    let t = Instant::now();
    let captured = source
        .capture(&mut clock, 1_700_000_000_000)
        .unwrap()
        .captured
        .unwrap();
    let capture_ms = t.elapsed().as_secs_f64() * 1000.0;
    let deliveries: Vec<marmot_core::apply::Delivery> = captured
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| marmot_core::apply::Delivery {
            stream_seq: i as u64 + 1,
            payload: m.clone(),
            published_ms: 0,
            pending: 0,
        })
        .collect();
    let mut clock2 = marmot_core::Clock::new(marmot_core::Stamp::ZERO);
    let t = Instant::now();
    let out = target
        .apply(&mut clock2, 1_700_000_000_001, &deliveries)
        .unwrap();
    let apply_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(out.report.rows_written, rows);
    (capture_ms, apply_ms)
}

/// (g): the ceiling of (c) on this machine, measured alone: rows/s that capture reaches
/// capturing 100-row transactions (the capture calls only, the application's inserts not
/// counted), and that apply reaches applying those batches elsewhere, 100 messages per
/// apply transaction (about what the daemon's apply does under load).
fn capture_and_apply_rates(dir: &Path, rows: u64) -> (f64, f64) {
    use marmot_core::ports::Storage;
    let open = |name: &str, node: u64| app_and_store(dir, name, node);
    let (app, mut source) = open("rates-source.db", 1);
    let (_app2, mut target) = open("rates-target.db", 2);
    let mut clock = marmot_core::Clock::new(marmot_core::Stamp::ZERO);
    let mut capturing = Duration::ZERO;
    let mut deliveries = Vec::new();
    let mut wall = 1_700_000_000_000u64;
    for first in (1..=rows).step_by(100) {
        insert_rows(&app, first, 100.min(rows - first + 1));
        wall += 1;
        let t = Instant::now();
        let out = source.capture(&mut clock, wall).unwrap();
        capturing += t.elapsed();
        for m in out.captured.into_iter().flat_map(|c| c.messages) {
            deliveries.push(marmot_core::apply::Delivery {
                stream_seq: deliveries.len() as u64 + 1,
                payload: m,
                published_ms: 0,
                pending: 0,
            });
        }
    }
    let mut clock2 = marmot_core::Clock::new(marmot_core::Stamp::ZERO);
    let mut applying = Duration::ZERO;
    let mut written = 0;
    for part in deliveries.chunks(100) {
        wall += 1;
        let t = Instant::now();
        let out = target.apply(&mut clock2, wall, part).unwrap();
        applying += t.elapsed();
        written += out.report.rows_written;
    }
    assert_eq!(written, rows);
    (
        rows as f64 / capturing.as_secs_f64(),
        rows as f64 / applying.as_secs_f64(),
    )
}

/// A database of about `mib` MiB whose rows compress about as well as ordinary text does.
fn big_database(path: &Path, mib: u64) {
    let c = app_connection(path);
    c.execute_batch(
        "CREATE TABLE docs (id INTEGER PRIMARY KEY, owner TEXT, body TEXT, n INTEGER);",
    )
    .unwrap();
    let words = [
        "replication",
        "sqlite",
        "node",
        "stream",
        "snapshot",
        "leader",
        "clock",
        "row",
        "table",
        "write",
        "conflict",
        "merge",
        "batch",
        "message",
        "server",
        "client",
        "disk",
        "page",
        "index",
        "value",
    ];
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let rows = mib * 1024; // about 1 KiB per row
    let mut id = 0u64;
    while id < rows {
        let tx = c.unchecked_transaction().unwrap();
        {
            let mut stmt = c
                .prepare_cached("INSERT INTO docs VALUES (?1, ?2, ?3, ?4)")
                .unwrap();
            for _ in 0..10_000 {
                id += 1;
                let mut body = String::with_capacity(1000);
                while body.len() < 900 {
                    let r = next();
                    body.push_str(words[(r % 20) as usize]);
                    body.push(' ');
                    if r % 7 == 0 {
                        body.push_str(&format!("{:x} ", r >> 20));
                    }
                }
                stmt.execute(params![
                    id as i64,
                    format!("user{}", next() % 5000),
                    body,
                    (next() % 1_000_000) as i64
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
}

/// (f): snapshot save and restore of a database of `mib` MiB, next to `cp` of the file (the
/// copy lands in the page cache) and `cp` followed by `sync` of the copy (a durable copy, as a
/// restore must be), all in MB/s, with the time of each phase.
fn snapshot_speed(dir: &Path, mib: u64) -> serde_json::Value {
    use marmot_core::ports::Storage;
    use marmot_core::snapshot::{ObjectStore, SnapshotInfo};
    let db = dir.join("big.db");
    big_database(&db, mib);
    drop(marmot_sqlite::SqliteStore::open(marmot_sqlite::StoreConfig::new(&db, 1, 1)).unwrap());
    let raw = std::fs::metadata(&db).unwrap().len() as f64 / 1e6;
    // MB/s of a shell command copying the database to `$2`, which is removed after.
    let copy_speed = |script: &str| {
        let copy = dir.join("big-copy.db");
        let t = Instant::now();
        let st = std::process::Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(&db)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
        let speed = raw / t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&copy);
        speed
    };
    let cp = copy_speed("cp \"$1\" \"$2\"");
    let cp_sync = copy_speed("cp \"$1\" \"$2\" && sync \"$2\"");
    let nats = Nats::start(dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(async {
        let t =
            marmot_nats::NatsTransport::connect(marmot_nats::NatsConfig::new(vec![nats.url()], 1))
                .await
                .unwrap();
        wait_for(Duration::from_secs(30), "NATS", || Some(()));
        let mut tries = 0;
        loop {
            match t.object_store("bench-snapshots", 1).await {
                Ok(s) => break s,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 100, "object store: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let files = marmot_sqlite::snapshot::SnapshotDir::new(&db, Duration::ZERO);
    // Save: consistent copy, compression, checksum, upload.
    let t = Instant::now();
    let local = files.create(1).unwrap();
    let created = t.elapsed();
    rt.block_on(store.put_file("snap", &local.path, &|_| {}))
        .unwrap();
    let save_took = t.elapsed();
    let save = raw / save_took.as_secs_f64();
    eprintln!(
        "  save: copy+compress+checksum {:?}, upload {:?}",
        created,
        save_took - created
    );
    let ratio = local.size as f64 / local.raw_size as f64;
    let info = SnapshotInfo {
        format: 1,
        generation: 1,
        object: "snap".into(),
        position: local.position,
        node: 1,
        created_ms: 1,
        size: local.size,
        raw_size: local.raw_size,
        checksum: local.checksum.clone(),
        horizon_ms: 0,
        schema_digest: String::new(),
    };
    marmot_sqlite::snapshot::SnapshotDir::discard(&local.path);
    // Restore into an empty database: download, verify, decompress, check, copy in.
    let target = dir.join("restored.db");
    let mut restored =
        marmot_sqlite::SqliteStore::open(marmot_sqlite::StoreConfig::new(&target, 2, 2)).unwrap();
    let tfiles = marmot_sqlite::snapshot::SnapshotDir::new(&target, Duration::ZERO);
    let t = Instant::now();
    let download = tfiles.download_path("snap");
    rt.block_on(store.get_file("snap", &download, &|_| {}))
        .unwrap();
    let downloaded = t.elapsed();
    let staged = tfiles.stage(&download, &info).unwrap();
    let stage_done = t.elapsed();
    marmot_sqlite::snapshot::SnapshotDir::discard(&download);
    let mut clock = marmot_core::Clock::new(marmot_core::Stamp::ZERO);
    restored.restore(&mut clock, 1, &staged).unwrap();
    let restore_took = t.elapsed();
    let restore = raw / restore_took.as_secs_f64();
    eprintln!(
        "  restore: download {:?}, verify+decompress+check {:?}, copy in {:?}",
        downloaded,
        stage_done - downloaded,
        restore_took - stage_done
    );
    marmot_sqlite::snapshot::SnapshotDir::discard(&staged.path);
    drop(restored);
    let count = |p: &Path| -> i64 {
        Connection::open(p)
            .unwrap()
            .query_row("SELECT count(*) FROM docs", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(
        count(&target),
        count(&db),
        "the restored database holds every row"
    );
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let secs = |d: Duration| r3(d.as_secs_f64());
    serde_json::json!({
        "database_mb": raw.round(),
        "cp_mb_per_s": cp.round(),
        "cp_sync_mb_per_s": cp_sync.round(),
        "save_mb_per_s": save.round(),
        "restore_mb_per_s": restore.round(),
        "save_over_cp": r3(save / cp),
        "restore_over_cp": r3(restore / cp),
        "save_over_cp_sync": r3(save / cp_sync),
        "restore_over_cp_sync": r3(restore / cp_sync),
        "compressed_over_raw": r3(ratio),
        "phases_s": {
            "save_copy_compress_checksum": secs(created),
            "save_upload": secs(save_took - created),
            "restore_download": secs(downloaded),
            "restore_verify_decompress": secs(stage_done - downloaded),
            "restore_copy_in": secs(restore_took - stage_done),
        },
    })
}

fn count(db: &Path, table: &str) -> u64 {
    let c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as u64
}

struct Cluster {
    _nats: Nats,
    nodes: Vec<Node>,
}

fn cluster(dir: &Path) -> Cluster {
    let nats = Nats::start(dir);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| {
            let mut n = Node::new(dir, i, TABLE, Some(&nats.url()), "");
            n.rust_log = "warn".into();
            n
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }
    for n in &mut nodes {
        n.wait_ready();
    }
    Cluster { _nats: nats, nodes }
}

/// (c): returns (rows/s end to end, seconds the writers took).
fn end_to_end(c: &Cluster, rows: u64) -> (f64, f64) {
    let per = rows / 3;
    let total = per * 3;
    let start = Instant::now();
    let writers: Vec<_> = c
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let db = n.db.clone();
            std::thread::spawn(move || {
                let conn = app_connection(&db);
                insert_rows(&conn, (i as u64 + 1) * 1_000_000_000, per)
            })
        })
        .collect();
    let wrote = writers
        .into_iter()
        .map(|w| w.join().unwrap())
        .max()
        .unwrap();
    for n in &c.nodes {
        wait_for(Duration::from_secs(600), "all rows on every node", || {
            (count(&n.db, "Books") >= total).then_some(())
        });
    }
    let took = start.elapsed();
    (total as f64 / took.as_secs_f64(), wrote.as_secs_f64())
}

/// A process's resident memory, MB (Linux: /proc).
fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// (h): the memory soak. Three nodes, six writers (two per node) inserting and updating
/// single rows at `rate` writes/s in all for `seconds`; each marmot's resident memory is
/// sampled every 10 s. The first minute (or the first fifth of a shorter run) is warm-up.
fn soak(dir: &Path, seconds: u64, rate: u64) -> serde_json::Value {
    let c = cluster(dir);
    let pids: Vec<u32> = c.nodes.iter().filter_map(Node::pid).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..6u64)
        .map(|w| {
            let db = c.nodes[(w % 3) as usize].db.clone();
            let stop = stop.clone();
            let period = Duration::from_nanos(6_000_000_000 / rate.max(1));
            std::thread::spawn(move || {
                let conn = app_connection(&db);
                let start = Instant::now();
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    if let Some(wait) = (start + period * i as u32).checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    // Half new rows, half updates of recent ones.
                    let id = (w + 1) * 1_000_000_000 + if i.is_multiple_of(2) { i / 2 } else { i };
                    conn.execute(
                        "INSERT INTO Books (id, title, author, publication_year) VALUES (?1, 'soak', 'writer', ?2) \
                         ON CONFLICT (id) DO UPDATE SET publication_year = excluded.publication_year",
                        params![id as i64, i as i64],
                    )
                    .unwrap();
                }
                i
            })
        })
        .collect();
    let warm = Duration::from_secs((seconds / 5).min(60));
    let start = Instant::now();
    let mut samples: Vec<(f64, Vec<f64>)> = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(10));
        samples.push((
            start.elapsed().as_secs_f64(),
            pids.iter().map(|&p| rss_mb(p)).collect(),
        ));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let after_warm = samples
        .iter()
        .find(|(t, _)| *t >= warm.as_secs_f64())
        .cloned()
        .unwrap_or_else(|| samples[0].clone());
    let end = samples.last().cloned().unwrap();
    let db_mb = std::fs::metadata(&c.nodes[0].db).map_or(0.0, |m| m.len() as f64 / 1e6);
    let growth: Vec<f64> = end
        .1
        .iter()
        .zip(&after_warm.1)
        .map(|(e, s)| ((e / s - 1.0) * 1000.0).round() / 1000.0)
        .collect();
    serde_json::json!({
        "seconds": seconds,
        "writes_per_s": (writes as f64 / seconds as f64).round(),
        "rss_mb_after_warmup": after_warm.1,
        "rss_mb_end": end.1,
        "growth_after_warmup": growth,
        "db_mb_end": (db_mb * 10.0).round() / 10.0,
        "samples": samples.iter().map(|(t, r)| serde_json::json!({"t": t.round(), "rss_mb": r})).collect::<Vec<_>>(),
    })
}

/// (d): lag samples in milliseconds.
fn lag(c: &Cluster, rate: u64, seconds: u64) -> Vec<f64> {
    let commits: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(Vec::new()));
    let total = (rate * seconds) as usize;
    let seen: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total + 1]));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let db = c.nodes[1].db.clone();
        let seen = seen.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let conn = Connection::open(&db).unwrap();
            conn.busy_timeout(Duration::from_secs(5)).unwrap();
            let mut last_version: i64 = -1;
            let mut last_id: i64 = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let v: i64 = conn
                    .query_row("PRAGMA data_version", [], |r| r.get(0))
                    .unwrap();
                if v != last_version {
                    last_version = v;
                    let now = Instant::now();
                    let ids: Vec<i64> = conn
                        .prepare_cached("SELECT id FROM Lag WHERE id > ?1 ORDER BY id")
                        .unwrap()
                        .query_map([last_id], |r| r.get(0))
                        .unwrap()
                        .map(Result::unwrap)
                        .collect();
                    let mut s = seen.lock().unwrap();
                    for id in ids {
                        if let Some(slot) = s.get_mut(id as usize) {
                            slot.get_or_insert(now);
                        }
                        last_id = last_id.max(id);
                    }
                }
                std::thread::sleep(Duration::from_micros(250));
            }
        })
    };
    let conn = app_connection(&c.nodes[0].db);
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now();
    for i in 1..=total {
        let due = start + period * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        conn.execute("INSERT INTO Lag (id, payload) VALUES (?1, 'x')", [i as i64])
            .unwrap();
        let t = Instant::now();
        let mut cm = commits.lock().unwrap();
        if cm.len() <= i {
            cm.resize(i + 1, None);
        }
        cm[i] = Some(t);
    }
    wait_for(Duration::from_secs(60), "every lag row on node 2", || {
        seen.lock().unwrap()[1..]
            .iter()
            .all(Option::is_some)
            .then_some(())
    });
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    let cm = commits.lock().unwrap();
    let s = seen.lock().unwrap();
    (1..=total)
        .filter_map(|i| Some(s[i]?.saturating_duration_since(cm[i]?).as_secs_f64() * 1000.0))
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    percentile(&v, 0.5)
}

fn main() {
    let a = args();
    let base = std::env::var_os("MARMOT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let mut runs = Vec::new();
    for run in 1..=a.runs {
        let dir = tempfile::tempdir_in(&base).unwrap();
        eprintln!(
            "run {run}/{}: (a)/(b) {} rows in 100-row transactions",
            a.runs, a.rows
        );
        let (plain, triggers) = plain_and_triggers(dir.path(), a.rows);
        eprintln!("run {run}: (g) capture-only and apply-only rates");
        let (capture_rate, apply_rate) = capture_and_apply_rates(dir.path(), a.rows);
        // Three nodes: each row is captured once and applied twice, on two cores.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
        let ceiling = cores / (1.0 / capture_rate + 2.0 / apply_rate);
        eprintln!("run {run}: (e) one {}-row transaction", a.rows);
        let (big_capture, big_apply) = one_big_transaction(dir.path(), a.rows);
        eprintln!("run {run}: (c) three nodes, end to end");
        let c = cluster(dir.path());
        let (e2e, wrote) = end_to_end(&c, a.rows);
        eprintln!(
            "run {run}: (d) lag at {} writes/s for {} s",
            a.rate, a.seconds
        );
        let mut lags = lag(&c, a.rate, a.seconds);
        lags.sort_by(|x, y| x.partial_cmp(y).unwrap());
        drop(c);
        let snap = if a.snapshot_mib > 0 {
            eprintln!(
                "run {run}: (f) snapshot of a {} MiB database",
                a.snapshot_mib
            );
            let d = tempfile::tempdir_in(&base).unwrap();
            Some(snapshot_speed(d.path(), a.snapshot_mib))
        } else {
            None
        };
        let soak_figure = if a.soak_seconds > 0 {
            eprintln!(
                "run {run}: (h) memory soak, {} writes/s for {} s",
                a.soak_rate, a.soak_seconds
            );
            let d = tempfile::tempdir_in(&base).unwrap();
            Some(soak(d.path(), a.soak_seconds, a.soak_rate))
        } else {
            None
        };
        let r = serde_json::json!({
            "h_soak": soak_figure,
            "a_plain_rows_per_s": plain.round(),
            "b_triggers_rows_per_s": triggers.round(),
            "b_over_a": (triggers / plain * 1000.0).round() / 1000.0,
            "c_end_to_end_rows_per_s": e2e.round(),
            "c_writers_seconds": (wrote * 1000.0).round() / 1000.0,
            "g_capture_rows_per_s": capture_rate.round(),
            "g_apply_rows_per_s": apply_rate.round(),
            "c_ceiling_rows_per_s": ceiling.round(),
            "c_over_ceiling": (e2e / ceiling * 1000.0).round() / 1000.0,
            "f_snapshot": snap,
            "e_one_transaction_capture_ms": (big_capture * 10.0).round() / 10.0,"e_one_transaction_apply_ms": (big_apply * 10.0).round() / 10.0,
            "d_lag_ms": {
                "samples": lags.len(),
                "p50": percentile(&lags, 0.50),
                "p90": percentile(&lags, 0.90),
                "p99": percentile(&lags, 0.99),
                "max": percentile(&lags, 1.0),
            },
        });
        eprintln!("run {run}: {r}");
        runs.push(r);
    }
    let col = |f: &dyn Fn(&serde_json::Value) -> f64| median(runs.iter().map(f).collect());
    let summary = serde_json::json!({
        "rows": a.rows,
        "runs": a.runs,
        "lag_rate_per_s": a.rate,
        "lag_seconds": a.seconds,
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        },
        "median": {
            "a_plain_rows_per_s": col(&|r| r["a_plain_rows_per_s"].as_f64().unwrap()),
            "b_triggers_rows_per_s": col(&|r| r["b_triggers_rows_per_s"].as_f64().unwrap()),
            "b_over_a": col(&|r| r["b_over_a"].as_f64().unwrap()),
            "c_end_to_end_rows_per_s": col(&|r| r["c_end_to_end_rows_per_s"].as_f64().unwrap()),
            "g_capture_rows_per_s": col(&|r| r["g_capture_rows_per_s"].as_f64().unwrap()),
            "g_apply_rows_per_s": col(&|r| r["g_apply_rows_per_s"].as_f64().unwrap()),
            "c_ceiling_rows_per_s": col(&|r| r["c_ceiling_rows_per_s"].as_f64().unwrap()),
            "c_over_ceiling": col(&|r| r["c_over_ceiling"].as_f64().unwrap()),
            "d_lag_ms_p50": col(&|r| r["d_lag_ms"]["p50"].as_f64().unwrap()),
            "d_lag_ms_p99": col(&|r| r["d_lag_ms"]["p99"].as_f64().unwrap()),
            "e_one_transaction_capture_ms": col(&|r| r["e_one_transaction_capture_ms"].as_f64().unwrap()),
                        "e_one_transaction_apply_ms": col(&|r| r["e_one_transaction_apply_ms"].as_f64().unwrap()),
            "f_snapshot_cp_mb_per_s": col(&|r| r["f_snapshot"]["cp_mb_per_s"].as_f64().unwrap_or(f64::NAN)),
            "f_snapshot_save_mb_per_s": col(&|r| r["f_snapshot"]["save_mb_per_s"].as_f64().unwrap_or(f64::NAN)),
            "f_snapshot_restore_mb_per_s": col(&|r| r["f_snapshot"]["restore_mb_per_s"].as_f64().unwrap_or(f64::NAN)),
            "f_snapshot_save_over_cp": col(&|r| r["f_snapshot"]["save_over_cp"].as_f64().unwrap_or(f64::NAN)),
            "f_snapshot_restore_over_cp": col(&|r| r["f_snapshot"]["restore_over_cp"].as_f64().unwrap_or(f64::NAN)),
            "f_snapshot_cp_sync_mb_per_s": col(&|r| r["f_snapshot"]["cp_sync_mb_per_s"].as_f64().unwrap_or(f64::NAN)),
            "f_snapshot_save_over_cp_sync": col(&|r| r["f_snapshot"]["save_over_cp_sync"].as_f64().unwrap_or(f64::NAN)),
            "f_snapshot_restore_over_cp_sync": col(&|r| r["f_snapshot"]["restore_over_cp_sync"].as_f64().unwrap_or(f64::NAN)),
        },
        "all_runs": runs,
    });
    let text = serde_json::to_string_pretty(&summary).unwrap();
    println!("{text}");
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&a.out, text + "\n").unwrap();
    eprintln!("wrote {}", a.out.display());
}
