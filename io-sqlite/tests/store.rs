//! The SQLite adapter against real database files: an application writes through its own
//! connection (as another process would), marmot captures, and the batches are applied to
//! other files through an in-memory stream.

use marmot_core::apply::Delivery;
use marmot_core::capture::Captured;
use marmot_core::ports::Storage;
use marmot_core::{Clock, Stamp};
use marmot_sqlite::{SqliteStore, StoreConfig};
use rusqlite::Connection;
use std::path::PathBuf;

struct Node {
    store: SqliteStore,
    clock: Clock,
    app: Connection,
    path: PathBuf,
    applied: u64,
}

struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
    stream: Vec<Delivery>,
    wall: u64,
}

const SCHEMA: &str = r#"
CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, author TEXT, year INTEGER, cover BLOB, price REAL);
CREATE TABLE "odd ""table"" ñame" ("key col" TEXT COLLATE NOCASE, "select" INTEGER, "vålue" , PRIMARY KEY ("select", "key col")) WITHOUT ROWID;
CREATE TABLE nokey (a, b);
CREATE TABLE uniq (id INTEGER PRIMARY KEY, email TEXT UNIQUE);
"#;

impl Cluster {
    fn new(n: usize, schema: &str) -> Cluster {
        Cluster::new_with(n, schema, |_| {})
    }

    fn new_with(n: usize, schema: &str, configure: impl Fn(&mut StoreConfig)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 1..=n {
            let path = dir.path().join(format!("n{i}.db"));
            let app = Connection::open(&path).unwrap();
            app.execute_batch("PRAGMA journal_mode=WAL;").unwrap();
            app.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
            app.execute_batch(schema).unwrap();
            let mut cfg = StoreConfig::new(&path, i as u64, 1000 + i as u64);
            configure(&mut cfg);
            let store = SqliteStore::open(cfg).unwrap();
            nodes.push(Node {
                store,
                clock: Clock::new(Stamp::ZERO),
                app,
                path,
                applied: 0,
            });
        }
        Cluster {
            _dir: dir,
            nodes,
            stream: Vec::new(),
            wall: 1_700_000_000_000,
        }
    }

    fn publish(&mut self, c: Option<Captured>) {
        if let Some(c) = c {
            for m in c.messages {
                let seq = self.stream.len() as u64 + 1;
                self.stream.push(Delivery {
                    stream_seq: seq,
                    payload: m,
                    published_ms: self.wall,
                    pending: 0,
                });
            }
        }
    }

    fn capture(&mut self, i: usize) -> Option<u64> {
        self.wall += 1;
        let n = &mut self.nodes[i];
        let c = n.store.capture(&mut n.clock, self.wall).unwrap().captured;
        let rows = c.as_ref().map(|c| c.rows);
        self.publish(c);
        rows
    }

    /// Node i applies everything it has not seen yet.
    fn apply(&mut self, i: usize) -> marmot_core::ports::ApplyOutcome {
        self.wall += 1;
        let n = &mut self.nodes[i];
        let from = n.applied as usize;
        let ds: Vec<Delivery> = self.stream[from..].to_vec();
        let out = n.store.apply(&mut n.clock, self.wall, &ds).unwrap();
        n.applied = self.stream.len() as u64;
        let captured = out.captured.clone();
        self.publish(captured);
        out
    }

    /// Captures everywhere, then applies everywhere until nothing moves.
    fn settle(&mut self) {
        for _ in 0..5 {
            for i in 0..self.nodes.len() {
                self.capture(i);
            }
            for i in 0..self.nodes.len() {
                self.apply(i);
            }
        }
    }

    fn exec(&self, i: usize, sql: &str) {
        self.nodes[i].app.execute_batch(sql).unwrap();
    }

    /// Full content of the user tables, byte for byte (storage class included).
    fn dump(&self, i: usize, table: &str) -> Vec<String> {
        let c = &self.nodes[i].app;
        let q = marmot_sqlite::ddl::quote(table);
        // Another connection may have changed the schema: read it again before counting the
        // columns a statement has.
        c.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap();
        let mut stmt = c
            .prepare(&format!("SELECT * FROM {q} ORDER BY 1, 2"))
            .unwrap();
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        let mut out = Vec::new();
        while let Some(r) = rows.next().unwrap() {
            let vals: Vec<marmot_core::ValueRef<'_>> = (0..n)
                .map(|i| marmot_sqlite::from_sql(r.get_ref(i).unwrap()))
                .collect();
            out.push(marmot_core::value::sql_row_literal(vals));
        }
        out
    }

    fn assert_converged(&self, table: &str) {
        let first = self.dump(0, table);
        for i in 1..self.nodes.len() {
            assert_eq!(
                self.dump(i, table),
                first,
                "node {} differs on {table}",
                i + 1
            );
        }
    }
}

#[test]
fn every_storage_class_and_odd_identifiers_round_trip_byte_for_byte() {
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(
        0,
        "INSERT INTO books VALUES (1, 'Dune', 'Herbert', 1965, X'00FF10', 9.99);
         INSERT INTO books VALUES (2, CAST(X'FFFE41' AS TEXT), NULL, -9223372036854775808, X'', -0.0);
         INSERT INTO books VALUES (3, 'it''s \"quoted\"', 'é😀', 9223372036854775807, NULL, 1e308);",
    );
    c.exec(
        1,
        r#"INSERT INTO "odd ""table"" ñame" VALUES ('Key', 1, X'DEADBEEF');
           INSERT INTO "odd ""table"" ñame" VALUES ('other', 2, 3.5);"#,
    );
    c.settle();
    c.assert_converged("books");
    c.assert_converged("odd \"table\" ñame");
    let dump = c.dump(2, "books");
    assert!(
        dump.iter().any(|r| r.contains("CAST(X'fffe41' AS TEXT)")),
        "{dump:?}"
    );
    assert!(dump.iter().any(|r| r.contains("X'00ff10'")));
    assert_eq!(c.dump(2, "books").len(), 3);
}

#[test]
fn updates_deletes_key_changes_and_transactions_replicate() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "BEGIN; INSERT INTO books (id, title) VALUES (1, 'a'), (2, 'b'), (3, 'c'); COMMIT;",
    );
    c.settle();
    c.exec(0, "UPDATE books SET title = 'A' WHERE id = 1; DELETE FROM books WHERE id = 2; UPDATE books SET id = 30 WHERE id = 3;");
    c.settle();
    assert_eq!(
        c.dump(1, "books"),
        vec![
            "(1, 'A', NULL, NULL, NULL, NULL)",
            "(30, 'c', NULL, NULL, NULL, NULL)"
        ]
    );
    c.assert_converged("books");
    // A NOCASE key changing only its case stays the same row, and follows the new bytes.
    c.exec(
        0,
        r#"INSERT INTO "odd ""table"" ñame" VALUES ('abc', 1, 1);"#,
    );
    c.settle();
    c.exec(
        0,
        r#"UPDATE "odd ""table"" ñame" SET "key col" = 'ABC' WHERE "key col" = 'abc';"#,
    );
    c.settle();
    assert_eq!(c.dump(1, "odd \"table\" ñame"), vec!["('ABC', 1, 1)"]);
}

#[test]
fn applied_rows_are_not_captured_again() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'a');");
    assert_eq!(c.capture(0), Some(1));
    c.apply(1);
    assert_eq!(c.capture(1), None, "no echo");
    assert_eq!(c.stream.len(), 1);
}

#[test]
fn concurrent_writes_converge_to_the_highest_stamp_and_the_loser_is_recorded() {
    let mut c = Cluster::new(3, SCHEMA);
    // Two nodes insert the same auto-assigned key.
    c.exec(0, "INSERT INTO books (title) VALUES ('from one');");
    c.exec(1, "INSERT INTO books (title) VALUES ('from two');");
    c.settle();
    c.assert_converged("books");
    assert_eq!(c.dump(0, "books").len(), 1);
    // Node 2 stamped later, so its row wins everywhere.
    assert_eq!(
        c.dump(2, "books"),
        vec!["(1, 'from two', NULL, NULL, NULL, NULL)"]
    );
    let conflicts = marmot_sqlite::admin::list_conflicts(&c.nodes[0].app, 10).unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].loser.1, 1);
    assert_eq!(conflicts[0].winner.1, 2);
    assert_eq!(
        conflicts[0].loser_row.as_deref(),
        Some("(1, 'from one', NULL, NULL, NULL, NULL)")
    );
}

#[test]
fn a_local_write_not_yet_captured_beats_an_older_remote_one() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'old');");
    c.capture(0); // stamped now, not yet applied on node 2
    c.wall += 10;
    // Node 2 writes the same row later; marmot has not captured it when the older remote
    // write arrives: the apply captures and stamps it first, and it wins.
    c.exec(1, "INSERT INTO books (id, title) VALUES (1, 'new');");
    c.apply(1);
    assert_eq!(
        c.dump(1, "books"),
        vec!["(1, 'new', NULL, NULL, NULL, NULL)"]
    );
    c.settle();
    c.assert_converged("books");
    assert_eq!(
        c.dump(0, "books"),
        vec!["(1, 'new', NULL, NULL, NULL, NULL)"]
    );
}

#[test]
fn deletes_leave_tombstones_so_late_writes_cannot_resurrect() {
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'x');");
    c.settle();
    // Node 1 updates (earlier stamp), node 2 deletes (later stamp); node 3 sees the delete first.
    c.exec(0, "UPDATE books SET title = 'y' WHERE id = 1;");
    c.capture(0);
    c.exec(1, "DELETE FROM books WHERE id = 1;");
    c.capture(1);
    // Reorder for node 3: apply the delete message before the update.
    let n = c.stream.len();
    c.stream.swap(n - 1, n - 2);
    for (i, d) in c.stream.iter_mut().enumerate() {
        d.stream_seq = i as u64 + 1;
    }
    c.apply(2);
    c.settle();
    c.assert_converged("books");
    assert!(c.dump(0, "books").is_empty());
}

#[test]
fn redelivered_messages_change_nothing() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "INSERT INTO books (id, title) VALUES (1, 'x'), (2, 'y');",
    );
    c.capture(0);
    c.apply(1);
    let before = c.dump(1, "books");
    // The position makes the same deliveries a no-op; and even a republish under new
    // sequence numbers changes nothing (equal versions).
    let again = c.stream.clone();
    let out = {
        let n = &mut c.nodes[1];
        n.store.apply(&mut n.clock, c.wall, &again)
    }
    .unwrap();
    assert_eq!(out.report.batches, 0);
    let republished: Vec<Delivery> = again
        .iter()
        .enumerate()
        .map(|(i, d)| Delivery {
            stream_seq: 100 + i as u64,
            ..d.clone()
        })
        .collect();
    let out = {
        let n = &mut c.nodes[1];
        n.store.apply(&mut n.clock, c.wall, &republished)
    }
    .unwrap();
    assert_eq!(out.report.rows_written, 0);
    assert_eq!(out.report.rows_skipped, 2);
    assert_eq!(out.report.conflicts, 0);
    assert_eq!(c.dump(1, "books"), before);
}

#[test]
fn huge_rows_travel_in_chunks_and_apply_whole() {
    let mut c = Cluster::new(2, SCHEMA);
    // Incompressible 3 MB blob: several chunks of 512 KiB.
    let mut blob = vec![0u8; 3 << 20];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for b in blob.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    c.nodes[0]
        .app
        .execute(
            "INSERT INTO books (id, title, cover) VALUES (1, 'big', ?1)",
            [&blob],
        )
        .unwrap();
    c.exec(0, "INSERT INTO books (id, title) VALUES (2, 'small');");
    c.capture(0);
    assert!(c.stream.len() >= 6, "{} messages", c.stream.len());
    // Another node's message lands between the chunks.
    c.exec(1, "INSERT INTO books (id, title) VALUES (3, 'between');");
    c.wall += 1;
    let other = {
        let n = &mut c.nodes[1];
        n.store.capture(&mut n.clock, c.wall)
    }
    .unwrap()
    .captured
    .unwrap();
    let pos = 2;
    c.stream.insert(
        pos,
        Delivery {
            stream_seq: 0,
            payload: other.messages[0].clone(),
            published_ms: 0,
            pending: 0,
        },
    );
    for (i, d) in c.stream.iter_mut().enumerate() {
        d.stream_seq = i as u64 + 1;
    }
    // Half the chunks: nothing of the batch is visible, the batch is incomplete.
    let half: Vec<Delivery> = c.stream[..4].to_vec();
    let out = {
        let n = &mut c.nodes[1];
        n.store.apply(&mut n.clock, c.wall, &half)
    }
    .unwrap();
    assert_eq!(out.incomplete_batches, 1);
    let ids: Vec<i64> = c.nodes[1]
        .app
        .prepare("SELECT id FROM books ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ids, vec![3], "no row of the incomplete batch is visible");
    c.nodes[1].applied = 4;
    let out = c.apply(1);
    assert_eq!(out.incomplete_batches, 0);
    let got: Vec<u8> = c.nodes[1]
        .app
        .query_row("SELECT cover FROM books WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(got, blob);
}

#[test]
fn a_batch_that_cannot_apply_is_parked_and_retried_after_the_schema_catches_up() {
    // Each node keeps its own schema (`schema.replicate = false`): the migration reaches node 2
    // by hand.
    let mut c = Cluster::new_with(2, SCHEMA, |cfg| cfg.replicate_schema = false);
    c.exec(
        0,
        "CREATE TABLE newer (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO newer VALUES (1, 'x');",
    );
    c.exec(0, "INSERT INTO books (id, title) VALUES (7, 'fine');");
    c.capture(0);
    let out = c.apply(1);
    assert_eq!(
        out.report.parked.len(),
        1,
        "the batch touching an unknown table is parked whole"
    );
    assert!(
        out.report.parked[0]
            .reason
            .contains("unknown table \"newer\""),
        "{}",
        out.report.parked[0].reason
    );
    assert!(
        c.dump(1, "books").is_empty(),
        "all or nothing: its books row waits too"
    );
    // The migration reaches node 2: the next transaction notices the schema change.
    c.exec(1, "CREATE TABLE newer (id INTEGER PRIMARY KEY, v TEXT);");
    let out = c.apply(1);
    assert!(out.schema_changed);
    let r = {
        let n = &mut c.nodes[1];
        n.store.retry_parked(&mut n.clock, c.wall, true)
    }
    .unwrap();
    assert_eq!((r.applied, r.remaining), (1, 0));
    assert_eq!(c.dump(1, "newer"), vec!["(1, 'x')"]);
    assert_eq!(c.dump(1, "books").len(), 1);
}

#[test]
fn a_secondary_unique_violation_parks_instead_of_deleting_rows() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO uniq VALUES (1, 'a@x');");
    c.exec(1, "INSERT INTO uniq VALUES (2, 'a@x');");
    c.settle();
    // INSERT OR REPLACE would have deleted row 2; marmot parks instead and keeps both nodes' rows.
    assert_eq!(c.dump(1, "uniq"), vec!["(2, 'a@x')"]);
    let parked = marmot_sqlite::admin::list_parked(&c.nodes[1].app).unwrap();
    assert_eq!(parked.len(), 1);
    assert!(parked[0].reason.contains("UNIQUE"), "{}", parked[0].reason);
    assert_eq!(parked[0].tables, vec!["uniq".to_string()]);
}

#[test]
fn schema_changes_are_followed_without_a_restart() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'a');");
    c.settle();
    // A new column, added on both nodes, then used.
    c.exec(0, "ALTER TABLE books ADD COLUMN isbn TEXT;");
    c.exec(1, "ALTER TABLE books ADD COLUMN isbn TEXT;");
    c.exec(0, "UPDATE books SET isbn = '978' WHERE id = 1;");
    c.settle();
    c.assert_converged("books");
    assert!(c.dump(1, "books")[0].contains("'978'"));
    // DROP COLUMN works with marmot's triggers in place (they mention key columns only).
    c.exec(0, "ALTER TABLE books DROP COLUMN price;");
    c.exec(1, "ALTER TABLE books DROP COLUMN price;");
    c.exec(1, "INSERT INTO books (id, title) VALUES (2, 'after drop');");
    c.settle();
    c.assert_converged("books");
    // A table created while running, written right away: its rows replicate.
    c.exec(
        0,
        "CREATE TABLE later (k TEXT PRIMARY KEY, v); INSERT INTO later VALUES ('a', 1);",
    );
    c.exec(1, "CREATE TABLE later (k TEXT PRIMARY KEY, v);");
    c.settle();
    c.assert_converged("later");
    assert_eq!(c.dump(1, "later"), vec!["('a', 1)"]);
}

#[test]
fn a_table_rebuild_keeps_replicating() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'a');");
    c.settle();
    // The twelve-step rebuild: create, copy, drop, rename (drops marmot's triggers).
    let rebuild = "BEGIN; CREATE TABLE books_new (id INTEGER PRIMARY KEY, title TEXT NOT NULL, author TEXT, year INTEGER, cover BLOB, price REAL, extra TEXT);
                   INSERT INTO books_new (id, title, author, year, cover, price) SELECT id, title, author, year, cover, price FROM books;
                   DROP TABLE books; ALTER TABLE books_new RENAME TO books; COMMIT;";
    c.exec(0, rebuild);
    c.exec(1, rebuild);
    // Written right after the rebuild, before marmot noticed.
    c.exec(
        0,
        "INSERT INTO books (id, title, extra) VALUES (2, 'b', 'e');",
    );
    c.settle();
    c.assert_converged("books");
    assert_eq!(c.dump(1, "books").len(), 2);
}

#[test]
fn triggers_work_under_trusted_schema_off() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "PRAGMA trusted_schema=OFF; INSERT INTO books (id, title) VALUES (1, 'x'); UPDATE books SET title='y'; ");
    c.settle();
    assert_eq!(c.dump(1, "books"), vec!["(1, 'y', NULL, NULL, NULL, NULL)"]);
}

#[test]
fn tables_without_primary_key_and_virtual_tables_are_skipped() {
    let c = Cluster::new(
        1,
        "CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE TABLE nopk (a, b); CREATE VIRTUAL TABLE docs USING fts5(body);",
    );
    let names: Vec<String> = c.nodes[0].store.tables().map(|t| t.name.clone()).collect();
    assert_eq!(names, vec!["t".to_string()]);
    assert_eq!(
        c.nodes[0]
            .store
            .stats()
            .skipped_tables
            .load(std::sync::atomic::Ordering::Relaxed),
        2,
        "nopk and docs; fts5 shadow tables are not counted"
    );
}

#[test]
fn position_and_clock_survive_a_reopen() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'x');");
    c.settle();
    let hw = c.nodes[1].clock.high_water();
    let path = c.nodes[1].path.clone();
    let mut reopened = SqliteStore::open(StoreConfig::new(&path, 2, 5)).unwrap();
    let r = reopened.recover().unwrap();
    assert_eq!(r.position, c.stream.len() as u64);
    assert!(r.clock >= hw);
    assert!(r.incarnation > c.nodes[1].store.incarnation());
}

#[test]
fn unpublished_batches_survive_a_reopen_until_marked_published() {
    let mut c = Cluster::new(1, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'x');");
    c.wall += 1;
    let n = &mut c.nodes[0];
    let cap = n
        .store
        .capture(&mut n.clock, c.wall)
        .unwrap()
        .captured
        .unwrap();
    let path = n.path.clone();
    let mut reopened = SqliteStore::open(StoreConfig::new(&path, 1, 6)).unwrap();
    let r = reopened.recover().unwrap();
    assert_eq!(r.outbox, vec![(cap.batch, 1)]);
    assert_eq!(
        reopened.outbox_message(cap.batch, 0).unwrap().unwrap(),
        cap.messages[0]
    );
    reopened.mark_published(cap.batch).unwrap();
    assert!(reopened.recover().unwrap().outbox.is_empty());
}

#[test]
fn cleanup_removes_marmot_and_keeps_user_data() {
    let c = Cluster::new(1, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'x');");
    let report = marmot_sqlite::admin::cleanup(&c.nodes[0].app).unwrap();
    assert!(report.triggers >= 6 && report.tables >= 6, "{report:?}");
    let left: i64 = c.nodes[0]
        .app
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE '\\_\\_marmot\\_\\_%' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(c.dump(0, "books"), vec!["(1, 'x', NULL, NULL, NULL, NULL)"]);
    c.exec(
        0,
        "INSERT INTO books (id, title) VALUES (2, 'still writable');",
    );
}

#[test]
fn a_commit_by_another_connection_wakes_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let app = Connection::open(&path).unwrap();
    app.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (id INTEGER PRIMARY KEY);")
        .unwrap();
    let (_w, mut rx) = marmot_sqlite::watch::watch(&path).unwrap();
    // Drain hints from the setup above.
    std::thread::sleep(std::time::Duration::from_millis(100));
    while rx.try_recv().is_ok() {}
    app.execute_batch("INSERT INTO t VALUES (1);").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        if rx.try_recv().is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no wake-up within 2 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn a_node_restored_from_an_older_copy_of_itself_applies_its_own_later_batches() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "INSERT INTO books (id, title) VALUES (1, 'before the backup');",
    );
    c.settle();
    // A backup of node 1 while it runs, then more writes on node 1 that reach the stream.
    let backup = c.nodes[0].path.with_file_name("backup.db");
    c.nodes[0]
        .app
        .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    c.exec(
        0,
        "INSERT INTO books (id, title) VALUES (2, 'after the backup');",
    );
    c.settle();
    // Node 1's disk is lost; it comes back from the backup, same node id, and reads the
    // stream from the backup's position: its own batch is not in the file, so it applies it.
    let mut restored = SqliteStore::open(StoreConfig::new(&backup, 1, 77)).unwrap();
    let from = restored.recover().unwrap().position as usize;
    let mut clock = Clock::new(Stamp::ZERO);
    let out = restored
        .apply(&mut clock, c.wall + 1, &c.stream[from..])
        .unwrap();
    assert_eq!(out.report.rows_written, 1, "{:?}", out.report);
    assert_eq!(out.report.conflicts, 0);
    let app = Connection::open(&backup).unwrap();
    let n: i64 = app
        .query_row("SELECT count(*) FROM books", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    // The live database skips its own batches (it captured them itself), even redelivered
    // beyond its position.
    let again: Vec<Delivery> = c
        .stream
        .iter()
        .enumerate()
        .map(|(i, d)| Delivery {
            stream_seq: 1000 + i as u64,
            ..d.clone()
        })
        .collect();
    let out = {
        let n = &mut c.nodes[0];
        n.store.apply(&mut n.clock, c.wall + 2, &again).unwrap()
    };
    assert_eq!(out.report.own_messages, 2, "{:?}", out.report);
    assert_eq!(out.report.rows_written, 0);
}

#[path = "store/digest.rs"]
mod digest;
#[path = "store/real_schemas.rs"]
mod real_schemas;
#[path = "store/schema_changes.rs"]
mod schema_changes;
#[path = "store/table_filter.rs"]
mod table_filter;

mod snapshots {
    use super::*;
    use marmot_core::snapshot::{LocalSnapshot, SnapshotError, SnapshotInfo};
    use marmot_sqlite::snapshot::SnapshotDir;
    use std::time::Duration;

    pub(super) fn info(l: &LocalSnapshot, generation: u64) -> SnapshotInfo {
        SnapshotInfo {
            format: 1,
            generation,
            object: format!("snapshot-{generation}"),
            position: l.position,
            node: 1,
            created_ms: 1,
            size: l.size,
            raw_size: l.raw_size,
            checksum: l.checksum.clone(),
            horizon_ms: l.horizon_ms,
            schema_digest: l.schema_digest.clone(),
        }
    }

    /// Node 1's database as a snapshot (made while it keeps its own connection open), staged
    /// for `dir_of`.
    pub(super) fn snapshot_of(
        c: &Cluster,
        dir_of: &std::path::Path,
    ) -> marmot_core::snapshot::StagedSnapshot {
        let src = SnapshotDir::new(&c.nodes[0].path, Duration::ZERO);
        let local = src.create(1_700_000_000_000).unwrap();
        let i = info(&local, 7);
        let dst = SnapshotDir::new(dir_of, Duration::ZERO);
        let download = dst.download_path(&i.object);
        std::fs::copy(&local.path, &download).unwrap();
        SnapshotDir::discard(&local.path);
        dst.stage(&download, &i).unwrap()
    }

    #[test]
    fn an_empty_database_takes_a_snapshot_whole_schema_included() {
        let mut c = Cluster::new(2, SCHEMA);
        c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'a'), (2, 'b'); INSERT INTO uniq VALUES (1, 'x@y');");
        c.settle();
        // A new node: a database without even the tables.
        let fresh = c.nodes[0].path.with_file_name("fresh.db");
        Connection::open(&fresh)
            .unwrap()
            .execute_batch("PRAGMA journal_mode=WAL;")
            .unwrap();
        let mut store = SqliteStore::open(StoreConfig::new(&fresh, 9, 99)).unwrap();
        assert!(store.recover().unwrap().empty);
        // An application connection is open the whole time: nothing is copied under it.
        let app = Connection::open(&fresh).unwrap();
        let staged = snapshot_of(&c, &fresh);
        let mut clock = Clock::new(Stamp::ZERO);
        let rep = store.restore(&mut clock, c.wall, &staged).unwrap();
        assert!(!rep.merged);
        assert_eq!(rep.position, c.nodes[0].applied);
        let n: i64 = app
            .query_row("SELECT count(*) FROM books", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
        let node: i64 = app
            .query_row(
                "SELECT value FROM __marmot__meta WHERE key = 'node_id'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(node, 9, "the restored node keeps its own identity");
        // It replicates from there: a write on it is captured as node 9's.
        app.execute(
            "INSERT INTO books (id, title) VALUES (3, 'on the new node')",
            [],
        )
        .unwrap();
        let cap = store
            .capture(&mut clock, c.wall + 5)
            .unwrap()
            .captured
            .unwrap();
        assert_eq!((cap.batch.origin, cap.rows), (9, 1));
    }

    #[test]
    fn a_database_with_content_merges_a_snapshot_and_keeps_its_unpublished_writes() {
        let mut c = Cluster::new(2, SCHEMA);
        c.exec(
            0,
            "INSERT INTO books (id, title) VALUES (1, 'a'), (2, 'b'), (3, 'c');",
        );
        c.settle();
        c.exec(
            0,
            "UPDATE books SET title = 'A' WHERE id = 1; DELETE FROM books WHERE id = 2;",
        );
        c.capture(0);
        // Node 2 missed that, and writes row 3 itself before its restore: not captured yet.
        c.exec(1, "UPDATE books SET title = 'mine' WHERE id = 3;");
        let staged = snapshot_of(&c, &c.nodes[1].path);
        let n = &mut c.nodes[1];
        let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
        assert!(rep.merged);
        assert!(
            rep.captured.is_some(),
            "its own write was captured first, to be published"
        );
        assert_eq!(
            c.dump(1, "books"),
            vec![
                "(1, 'A', NULL, NULL, NULL, NULL)",
                "(3, 'mine', NULL, NULL, NULL, NULL)"
            ]
        );
    }

    #[test]
    fn a_corrupt_or_truncated_snapshot_is_detected_and_not_used() {
        let c = Cluster::new(1, SCHEMA);
        c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'a');");
        let dir = SnapshotDir::new(&c.nodes[0].path, Duration::ZERO);
        let local = dir.create(1).unwrap();
        let i = info(&local, 1);
        let bytes = std::fs::read(&local.path).unwrap();
        let target = dir.download_path("x");
        // One flipped byte.
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        std::fs::write(&target, &flipped).unwrap();
        assert!(matches!(
            dir.stage(&target, &i),
            Err(SnapshotError::Corrupt { .. })
        ));
        // Cut short.
        std::fs::write(&target, &bytes[..bytes.len() - 10]).unwrap();
        let e = dir.stage(&target, &i).unwrap_err();
        assert!(e.to_string().contains("corrupt or truncated"), "{e}");
        // Intact.
        std::fs::write(&target, &bytes).unwrap();
        assert!(dir.stage(&target, &i).is_ok());
    }

    #[test]
    fn tombstones_past_the_horizon_are_collected_and_merges_drop_what_they_hid() {
        let mut c = Cluster::new(2, SCHEMA);
        c.exec(
            0,
            "INSERT INTO books (id, title) VALUES (1, 'a'), (2, 'b');",
        );
        c.settle();
        c.exec(0, "DELETE FROM books WHERE id = 2;");
        c.capture(0);
        // Node 1 collects tombstones older than "now" (a horizon in the future of the delete).
        let src = SnapshotDir::new(&c.nodes[0].path, Duration::from_millis(1));
        let local = src.create(c.wall + 1_000_000).unwrap();
        assert!(local.horizon_ms > 0);
        let tomb: i64 = c.nodes[0]
            .app
            .query_row(
                "SELECT count(*) FROM __marmot__ver__books WHERE deleted = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tomb, 0, "the tombstone is gone");
        // Node 2 never heard of the delete; the snapshot (without the tombstone) still removes
        // row 2, whose version is older than the horizon. Node 2's own unpublished write is
        // stamped below the horizon too (its clock lags), but the snapshot cannot hold it: it
        // stays (regression 05).
        c.exec(
            1,
            "INSERT INTO books (id, title) VALUES (5, 'unpublished');",
        );
        let i = info(&local, 2);
        let dst = SnapshotDir::new(&c.nodes[1].path, Duration::ZERO);
        let download = dst.download_path(&i.object);
        std::fs::copy(&local.path, &download).unwrap();
        let staged = dst.stage(&download, &i).unwrap();
        let n = &mut c.nodes[1];
        let rep = n.store.restore(&mut n.clock, c.wall + 20, &staged).unwrap();
        let cap = rep
            .captured
            .expect("the write was captured before the merge");
        assert!(cap.stamp.wall_ms() < local.horizon_ms);
        assert_eq!(
            c.dump(1, "books"),
            vec![
                "(1, 'a', NULL, NULL, NULL, NULL)",
                "(5, 'unpublished', NULL, NULL, NULL, NULL)"
            ]
        );
        // The merge took the snapshot's collection with it: node 2's horizon is the same now.
        let horizon: i64 = c.nodes[1]
            .app
            .query_row(
                "SELECT value FROM __marmot__meta WHERE key = 'horizon'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(horizon as u64, local.horizon_ms);
    }
}

/// The SQLite adapter against the core's storage conformance body (the in-memory model runs
/// the same body in the core's tests).
mod conformance {
    use super::*;
    use marmot_core::memory::conformance::{StorageSubject, storage_conformance};
    use marmot_core::snapshot::StagedSnapshot;
    use marmot_sqlite::snapshot::SnapshotDir;
    use std::collections::BTreeMap;
    use std::time::Duration;

    struct Sqlite {
        dir: tempfile::TempDir,
        nodes: BTreeMap<PathBuf, u64>,
        opened: u64,
    }

    impl Sqlite {
        fn store(&mut self, path: &std::path::Path) -> SqliteStore {
            self.opened += 1;
            let node = self.nodes[path];
            SqliteStore::open(StoreConfig::new(path, node, 1000 + self.opened)).unwrap()
        }
    }

    impl StorageSubject for Sqlite {
        type S = SqliteStore;
        fn open(&mut self, node: u64) -> SqliteStore {
            let path = self.dir.path().join(format!("conformance-{node}.db"));
            Connection::open(&path)
                .unwrap()
                .execute_batch(
                    "PRAGMA journal_mode=WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);",
                )
                .unwrap();
            self.nodes.insert(path.clone(), node);
            self.store(&path)
        }
        fn reopen(&mut self, s: SqliteStore) -> SqliteStore {
            let path = s.path().to_path_buf();
            drop(s);
            self.store(&path)
        }
        fn write(&mut self, s: &mut SqliteStore, upserts: &[(i64, &str)], deletes: &[i64]) {
            let app = Connection::open(s.path()).unwrap();
            app.execute_batch("BEGIN").unwrap();
            for (id, v) in upserts {
                app.execute(
                    "INSERT INTO t (id, v) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
                    rusqlite::params![id, v],
                )
                .unwrap();
            }
            for id in deletes {
                app.execute("DELETE FROM t WHERE id = ?1", [id]).unwrap();
            }
            app.execute_batch("COMMIT").unwrap();
        }
        fn rows(&mut self, s: &mut SqliteStore) -> Vec<(i64, String)> {
            Connection::open(s.path())
                .unwrap()
                .prepare("SELECT id, v FROM t ORDER BY id")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
        fn snapshot(&mut self, from: &mut SqliteStore, into: &mut SqliteStore) -> StagedSnapshot {
            let src = SnapshotDir::new(from.path(), Duration::ZERO);
            let local = src.create(1_700_000_000_000).unwrap();
            let i = super::snapshots::info(&local, 3);
            let dst = SnapshotDir::new(into.path(), Duration::ZERO);
            let download = dst.download_path(&i.object);
            std::fs::copy(&local.path, &download).unwrap();
            SnapshotDir::discard(&local.path);
            dst.stage(&download, &i).unwrap()
        }
    }

    #[test]
    fn the_sqlite_store_passes_the_storage_conformance_body() {
        storage_conformance(&mut Sqlite {
            dir: tempfile::tempdir().unwrap(),
            nodes: BTreeMap::new(),
            opened: 0,
        });
    }
}
