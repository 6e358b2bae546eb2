//! What real applications' schemas and transactions do: secondary UNIQUE constraints moved
//! inside one transaction, collations declared on the PRIMARY KEY clause, STRICT tables with
//! an `ANY` key, table rebuilds with deletes in the window, restores racing an application
//! that holds the write lock, and databases written by the previous release.

use super::*;
use std::time::Duration;

const UNIQ: &str =
    "CREATE TABLE t (id INTEGER PRIMARY KEY, email TEXT UNIQUE, slot INTEGER UNIQUE);";

fn parked(c: &Cluster, i: usize) -> Vec<marmot_sqlite::admin::ParkedRow> {
    marmot_sqlite::admin::list_parked(&c.nodes[i].app).unwrap()
}

fn assert_nothing_parked(c: &Cluster) {
    for i in 0..c.nodes.len() {
        let p = parked(c, i);
        assert!(p.is_empty(), "node {} parked {:?}", i + 1, p);
    }
}

#[test]
fn a_swap_of_unique_values_in_one_transaction_applies_on_every_node() {
    let mut c = Cluster::new(3, UNIQ);
    c.exec(0, "INSERT INTO t VALUES (1, 'a', 1), (2, 'b', 2);");
    c.settle();
    // Swapped through a temporary value: only the final rows travel, and (1, 'b') collides
    // with (2, 'b') on a replica until (2, 'a') is written too.
    c.exec(
        0,
        "BEGIN; UPDATE t SET email = 'tmp' WHERE id = 1; UPDATE t SET email = 'a' WHERE id = 2;
         UPDATE t SET email = 'b' WHERE id = 1; COMMIT;",
    );
    c.settle();
    assert_nothing_parked(&c);
    c.assert_converged("t");
    assert_eq!(c.dump(2, "t"), vec!["(1, 'b', 1)", "(2, 'a', 2)"]);
}

#[test]
fn moving_values_along_a_unique_column_applies_on_every_node() {
    let mut c = Cluster::new(2, UNIQ);
    c.exec(
        0,
        "INSERT INTO t VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3), (4, 'd', 4);",
    );
    c.settle();
    // Renumbering positions: remove the first and shift the rest down, and a rotation of the
    // e-mails in the opposite direction.
    c.exec(
        0,
        "BEGIN; DELETE FROM t WHERE id = 1; UPDATE t SET slot = slot - 1;
         UPDATE t SET email = email || '-';
         UPDATE t SET email = CASE id WHEN 2 THEN 'd' WHEN 3 THEN 'b' ELSE 'c' END; COMMIT;",
    );
    c.settle();
    assert_nothing_parked(&c);
    c.assert_converged("t");
    assert_eq!(
        c.dump(1, "t"),
        vec!["(2, 'd', 1)", "(3, 'b', 2)", "(4, 'c', 3)"]
    );
}

#[test]
fn a_unique_collision_with_a_row_outside_the_batch_still_parks() {
    let mut c = Cluster::new(2, UNIQ);
    c.exec(0, "INSERT INTO t VALUES (1, 'a', 1), (2, 'b', 2);");
    c.settle();
    // Node 2 takes 'x' for a row of its own; node 1 swaps and also takes 'x' concurrently.
    c.exec(1, "INSERT INTO t VALUES (9, 'x', 9);");
    c.capture(1);
    c.exec(
        0,
        "BEGIN; UPDATE t SET email = 'tmp' WHERE id = 1; UPDATE t SET email = 'a' WHERE id = 2;
         UPDATE t SET email = 'x' WHERE id = 1; COMMIT;",
    );
    c.capture(0);
    c.apply(1);
    let p = parked(&c, 1);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].reason.contains("UNIQUE"), "{}", p[0].reason);
    // Nothing of the parked batch was applied: the batch is atomic.
    assert_eq!(
        c.dump(1, "t"),
        vec!["(1, 'a', 1)", "(2, 'b', 2)", "(9, 'x', 9)"]
    );
}

#[test]
fn a_merge_restore_takes_a_unique_value_that_moved_to_another_row() {
    let mut c = Cluster::new(2, UNIQ);
    c.exec(0, "INSERT INTO t VALUES (1, 'a', 1);");
    c.settle();
    // Node 2 misses this: row 1 deleted, its e-mail taken by row 2; and a swap.
    c.exec(0, "INSERT INTO t VALUES (5, 'p', 5), (6, 'q', 6);");
    c.settle();
    c.exec(
        0,
        "BEGIN; DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (2, 'a', 1);
         UPDATE t SET email = 'tmp' WHERE id = 5; UPDATE t SET email = 'p', slot = 0 WHERE id = 6;
         UPDATE t SET email = 'q', slot = 6 WHERE id = 5; UPDATE t SET slot = 5 WHERE id = 6; COMMIT;",
    );
    c.capture(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path);
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    assert_eq!(c.dump(1, "t"), c.dump(0, "t"));
    assert_eq!(
        c.dump(1, "t"),
        vec!["(2, 'a', 1)", "(5, 'q', 6)", "(6, 'p', 5)"]
    );
}

#[test]
fn a_merge_restore_that_cannot_complete_says_why() {
    let mut c = Cluster::new(2, UNIQ);
    c.exec(0, "INSERT INTO t VALUES (1, 'a', 1);");
    c.settle();
    c.exec(0, "UPDATE t SET email = 'z' WHERE id = 1;");
    c.capture(0);
    // Node 2, unaware, gives 'z' to a row of its own: the snapshot's row 1 collides with it.
    c.exec(1, "INSERT INTO t VALUES (7, 'z', 7);");
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path);
    let n = &mut c.nodes[1];
    let e = n
        .store
        .restore(&mut n.clock, c.wall + 10, &staged)
        .unwrap_err()
        .to_string();
    assert!(e.contains("UNIQUE constraint failed: t.email"), "{e}");
    assert!(e.contains("\"t\""), "names the table: {e}");
    assert!(e.contains("resolve"), "says what to do: {e}");
    // Nothing changed: the local write is still there, still to be published.
    assert_eq!(c.dump(1, "t"), vec!["(1, 'a', 1)", "(7, 'z', 7)"]);
}

const PKCOLL: &str = "CREATE TABLE k (k TEXT, v TEXT, PRIMARY KEY (k COLLATE NOCASE));
    CREATE TABLE kw (k TEXT, n INTEGER, v TEXT, PRIMARY KEY (n, k COLLATE RTRIM)) WITHOUT ROWID;";

#[test]
fn a_collation_on_the_primary_key_clause_is_used_wherever_keys_are_compared() {
    let mut c = Cluster::new(3, PKCOLL);
    c.exec(
        0,
        "INSERT INTO k VALUES ('y', 'one'); INSERT INTO kw VALUES ('a', 1, 'x');",
    );
    c.settle();
    // The same key under NOCASE (and RTRIM): an update, not a delete plus an insert.
    c.exec(0, "UPDATE k SET k = 'Y', v = 'two' WHERE k = 'y';");
    c.exec(0, "UPDATE kw SET k = 'a  ', v = 'y' WHERE n = 1;");
    c.settle();
    assert_nothing_parked(&c);
    c.assert_converged("k");
    c.assert_converged("kw");
    assert_eq!(c.dump(2, "k"), vec!["('Y', 'two')"]);
    assert_eq!(c.dump(2, "kw"), vec!["('a  ', 1, 'y')"]);
    // A write on node 2 with the other spelling reaches the same row everywhere, and so does
    // a delete spelt differently again.
    c.exec(1, "UPDATE k SET v = 'three' WHERE k = 'Y';");
    c.settle();
    assert_eq!(c.dump(0, "k"), vec!["('Y', 'three')"]);
    // (The application's own WHERE compares as the column does, BINARY: it must say NOCASE.)
    c.exec(2, "DELETE FROM k WHERE k = 'y' COLLATE NOCASE;");
    c.settle();
    c.assert_converged("k");
    assert!(c.dump(0, "k").is_empty());
    // Merge restores join keys by their collation too.
    c.exec(0, "INSERT INTO k VALUES ('m', 'old');");
    c.settle();
    c.exec(0, "UPDATE k SET k = 'M', v = 'new' WHERE k = 'm';");
    c.capture(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path);
    let n = &mut c.nodes[1];
    n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert_eq!(c.dump(1, "k"), vec!["('M', 'new')"]);
}

const STRICT: &str = "CREATE TABLE s (k ANY PRIMARY KEY, v TEXT) STRICT;";

#[test]
fn strict_any_keys_keep_their_storage_class() {
    let mut c = Cluster::new(3, STRICT);
    c.exec(
        0,
        "INSERT INTO s VALUES ('7', 'text'), (7, 'integer'), (7.5, 'real'), (x'07', 'blob');",
    );
    c.settle();
    c.assert_converged("s");
    assert_eq!(c.dump(2, "s").len(), 4);
    // A delete of the text key reaches everyone and leaves the integer key alone.
    c.exec(1, "DELETE FROM s WHERE k = '7';");
    c.settle();
    c.assert_converged("s");
    assert_eq!(
        c.dump(0, "s"),
        vec!["(7, 'integer')", "(7.5e0, 'real')", "(X'07', 'blob')"]
    );
    // Two keys, two versions.
    let vers: i64 = c.nodes[0]
        .app
        .query_row("SELECT count(*) FROM \"__marmot__ver__s\"", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(vers, 4, "'7', 7, 7.5 and x'07' have one version each");
}

#[test]
fn a_database_written_by_the_previous_release_is_migrated_in_place() {
    // Written by marmot's previous release (format 1): tables with an INTEGER key, a STRICT
    // ANY key, a key collated on the PRIMARY KEY clause and a WITHOUT ROWID table; captured
    // rows, tombstones, an unpublished batch and uncaptured writes (among them '8' as TEXT in
    // the STRICT table, which that release logged as the INTEGER 8).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format1.db"),
        &path,
    )
    .unwrap();
    let app = Connection::open(&path).unwrap();
    let versions = |table: &str| -> Vec<(String, i64, i64)> {
        app.prepare(&format!(
            "SELECT quote(k0), stamp, deleted FROM \"__marmot__ver__{table}\" ORDER BY 1"
        ))
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    };
    let before_plain = versions("plain");
    let before_wr = versions("wr");
    assert!(before_plain.iter().any(|v| v.2 == 1), "a tombstone to keep");
    let mut store = SqliteStore::open(StoreConfig::new(&path, 1, 4243)).unwrap();
    let rec = store.recover().unwrap();
    assert_eq!(rec.outbox.len(), 1, "the unpublished batch is still there");
    // No "primary key changed" path: every version and tombstone is kept as it was.
    assert_eq!(versions("plain"), before_plain);
    assert_eq!(versions("wr"), before_wr);
    let format: i64 = app
        .query_row(
            "SELECT value FROM __marmot__meta WHERE key = 'format'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(format, marmot_sqlite::STORE_FORMAT);
    // The uncaptured writes are captured now, '8' as the TEXT it is.
    let mut clock = Clock::new(rec.clock);
    let cap = store
        .capture(&mut clock, 1_700_000_001_000)
        .unwrap()
        .captured
        .expect("pending writes");
    let (_, rows) = decode(&cap);
    assert!(
        rows.contains(&("plain".into(), "(4)".into(), true)),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("plain".into(), "(3)".into(), false)),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("strict_any".into(), "('8')".into(), true)),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("wr".into(), "('q', 2)".into(), false)),
        "{rows:?}"
    );
    let kinds: Vec<(String, String)> = app
        .prepare("SELECT quote(k0), typeof(k0) FROM \"__marmot__ver__strict_any\" ORDER BY 1")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(kinds.contains(&("'8'".into(), "text".into())), "{kinds:?}");
    // Opening it again changes nothing more.
    drop(store);
    let again = versions("strict_any");
    let _store = SqliteStore::open(StoreConfig::new(&path, 1, 4244)).unwrap();
    assert_eq!(versions("strict_any"), again);
}

/// (table, key literal, upsert?) of every row of a captured batch.
fn decode(c: &Captured) -> (u64, Vec<(String, String, bool)>) {
    use marmot_core::wire::{BodyReader, Item, decode_message, unseal};
    let mut payload = Vec::new();
    let mut header = None;
    for m in &c.messages {
        let (h, f) = decode_message(m).unwrap();
        header.get_or_insert(h);
        payload.extend_from_slice(f);
    }
    let h = header.unwrap();
    let body = unseal(&h, bytes::Bytes::from(payload)).unwrap();
    let mut r = BodyReader::new(&body);
    let mut values = Vec::new();
    let mut out = Vec::new();
    let (mut table, mut keys) = (String::new(), 0);
    while let Some(item) = r.next_item(&mut values).unwrap() {
        match item {
            Item::Schema(_) => {}
            Item::Table(t) => {
                table = t.name.to_string();
                keys = t.key_columns;
            }
            Item::Upsert { .. } => out.push((
                table.clone(),
                marmot_core::value::sql_row_literal(values[..keys].iter().copied()),
                true,
            )),
            Item::Delete { .. } => out.push((
                table.clone(),
                marmot_core::value::sql_row_literal(values[..keys].iter().copied()),
                false,
            )),
        }
    }
    (h.stamp.as_u64(), out)
}

const BOOKS: &str = "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT);";
// A rebuild that keeps the columns (here: a new CHECK constraint), so that the schemas agree
// again once every node ran it.
const REBUILD: &str =
    "CREATE TABLE books_new (id INTEGER PRIMARY KEY, title TEXT CHECK (length(title) < 100));
    INSERT INTO books_new (id, title) SELECT id, title FROM books;
    DROP TABLE books; ALTER TABLE books_new RENAME TO books;";

#[test]
fn a_rebuild_with_a_delete_in_the_same_transaction_publishes_the_delete() {
    let mut c = Cluster::new(2, BOOKS);
    c.exec(0, "INSERT INTO books VALUES (1, 'a'), (2, 'b'), (3, 'c');");
    c.settle();
    c.exec(
        0,
        &format!("BEGIN; {REBUILD} DELETE FROM books WHERE id = 2; COMMIT;"),
    );
    c.settle();
    // The other node runs the same migration once the delete reached it (a rebuild publishes
    // every row it holds: one that ran before would write row 2 back).
    c.exec(1, &format!("BEGIN; {REBUILD} COMMIT;"));
    c.settle();
    assert_nothing_parked(&c);
    c.assert_converged("books");
    assert_eq!(c.dump(1, "books"), vec!["(1, 'a')", "(3, 'c')"]);
}

#[test]
fn a_rebuild_and_deletes_while_marmot_was_stopped_publish_the_deletes() {
    let mut c = Cluster::new(2, BOOKS);
    c.exec(0, "INSERT INTO books VALUES (1, 'a'), (2, 'b'), (3, 'c');");
    c.settle();
    // Node 1's marmot stops; the application rebuilds the table, then deletes and changes a
    // key; marmot starts again.
    let cfg = StoreConfig::new(&c.nodes[0].path, 1, 5000);
    let spare = SqliteStore::open(StoreConfig::new(
        c.nodes[0].path.with_file_name("spare.db"),
        1,
        1,
    ))
    .unwrap();
    drop(std::mem::replace(&mut c.nodes[0].store, spare));
    c.exec(0, &format!("BEGIN; {REBUILD} COMMIT;"));
    c.exec(
        0,
        "DELETE FROM books WHERE id = 1; UPDATE books SET id = 30 WHERE id = 3;",
    );
    c.nodes[0].store = SqliteStore::open(cfg).unwrap();
    c.settle();
    c.exec(1, &format!("BEGIN; {REBUILD} COMMIT;"));
    c.settle();
    assert_nothing_parked(&c);
    c.assert_converged("books");
    assert_eq!(c.dump(1, "books"), vec!["(2, 'b')", "(30, 'c')"]);
}

#[test]
fn a_primary_key_change_keeps_the_keys_still_pending() {
    let mut c = Cluster::new(2, "CREATE TABLE p (k TEXT PRIMARY KEY, v);");
    c.exec(0, "INSERT INTO p VALUES ('a', 1), ('b', 2);");
    c.settle();
    // A delete not captured yet, then a rebuild that changes the key's collation.
    c.exec(0, "DELETE FROM p WHERE k = 'b';");
    let rebuild = "BEGIN; CREATE TABLE p2 (k TEXT COLLATE NOCASE PRIMARY KEY, v);
                   INSERT INTO p2 SELECT * FROM p; DROP TABLE p; ALTER TABLE p2 RENAME TO p; COMMIT;";
    c.exec(0, rebuild);
    c.settle();
    c.exec(1, rebuild);
    c.settle();
    assert_nothing_parked(&c);
    c.assert_converged("p");
    assert_eq!(c.dump(1, "p"), vec!["('a', 1)"]);
}

#[test]
fn a_whole_restore_never_wipes_a_write_committed_meanwhile() {
    let c = Cluster::new(1, BOOKS);
    c.exec(0, "INSERT INTO books VALUES (1, 'from the snapshot');");
    // A new node with the application's schema and nothing in it.
    let fresh = c.nodes[0].path.with_file_name("fresh.db");
    let app = Connection::open(&fresh).unwrap();
    app.execute_batch(&format!("PRAGMA journal_mode=WAL; {BOOKS}"))
        .unwrap();
    let mut cfg = StoreConfig::new(&fresh, 9, 99);
    cfg.busy_timeout = Duration::from_secs(5);
    let mut store = SqliteStore::open(cfg).unwrap();
    assert!(store.recover().unwrap().empty);
    let staged = super::snapshots::snapshot_of(&c, &fresh);
    // The application holds the write lock with a write of its own while the restore starts,
    // and commits a moment later.
    app.execute_batch("BEGIN IMMEDIATE; INSERT INTO books VALUES (2, 'written meanwhile');")
        .unwrap();
    let committer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        app.execute_batch("COMMIT").unwrap();
        app
    });
    let mut clock = Clock::new(Stamp::ZERO);
    let rep = store.restore(&mut clock, c.wall, &staged).unwrap();
    let app = committer.join().unwrap();
    assert!(
        rep.merged,
        "the database was not empty any more when the restore got the lock"
    );
    let rows: Vec<String> = app
        .prepare("SELECT title FROM books ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, vec!["from the snapshot", "written meanwhile"]);
    // And the application's write is published.
    let captured = rep
        .captured
        .expect("the write was captured before the merge");
    assert_eq!((captured.batch.origin, captured.rows), (9, 1));
}

/// The SQLite manual's external-content FTS5 table, kept in step by the application's
/// triggers, on a table with a secondary UNIQUE column.
const FTS: &str = "CREATE TABLE docs (id INTEGER PRIMARY KEY, slug TEXT UNIQUE, body TEXT);
    CREATE VIRTUAL TABLE docs_fts USING fts5(slug, body, content='docs', content_rowid='id');
    CREATE TRIGGER docs_ai AFTER INSERT ON docs BEGIN
      INSERT INTO docs_fts(rowid, slug, body) VALUES (new.id, new.slug, new.body);
    END;
    CREATE TRIGGER docs_ad AFTER DELETE ON docs BEGIN
      INSERT INTO docs_fts(docs_fts, rowid, slug, body) VALUES('delete', old.id, old.slug, old.body);
    END;
    CREATE TRIGGER docs_au AFTER UPDATE ON docs BEGIN
      INSERT INTO docs_fts(docs_fts, rowid, slug, body) VALUES('delete', old.id, old.slug, old.body);
      INSERT INTO docs_fts(rowid, slug, body) VALUES (new.id, new.slug, new.body);
    END;";

fn search(c: &Cluster, i: usize, q: &str) -> Vec<i64> {
    c.nodes[i]
        .app
        .prepare("SELECT rowid FROM docs_fts WHERE docs_fts MATCH ?1 ORDER BY rowid")
        .unwrap()
        .query_map([q], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn fts_intact(c: &Cluster, i: usize) {
    c.nodes[i]
        .app
        .execute_batch("INSERT INTO docs_fts(docs_fts, rank) VALUES ('integrity-check', 1);")
        .unwrap_or_else(|e| {
            panic!(
                "node {}: the full-text index does not match its rows: {e}",
                i + 1
            )
        });
}

#[test]
fn a_full_text_index_kept_by_triggers_finds_replicated_rows_on_every_node() {
    let mut c = Cluster::new(3, FTS);
    c.exec(
        0,
        "INSERT INTO docs VALUES (1, 'marmots', 'alpine rodents whistle'), (2, 'otters', 'rivers and fish');",
    );
    c.settle();
    for i in 0..3 {
        assert_eq!(search(&c, i, "whistle"), vec![1], "node {}", i + 1);
        fts_intact(&c, i);
    }
    // Updates, deletes, a swap of UNIQUE values (applied with the rows cleared first), and a
    // write on another node.
    c.exec(
        0,
        "UPDATE docs SET body = 'alpine rodents sleep' WHERE id = 1;",
    );
    c.exec(
        1,
        "INSERT INTO docs VALUES (3, 'beavers', 'rivers and dams');",
    );
    c.settle();
    c.exec(
        2,
        "BEGIN; UPDATE docs SET slug = 'tmp' WHERE id = 1; UPDATE docs SET slug = 'marmots' WHERE id = 2;
         UPDATE docs SET slug = 'otters' WHERE id = 1; COMMIT; DELETE FROM docs WHERE id = 3;",
    );
    c.settle();
    assert_nothing_parked(&c);
    c.assert_converged("docs");
    for i in 0..3 {
        assert!(search(&c, i, "whistle").is_empty(), "node {}", i + 1);
        assert_eq!(search(&c, i, "sleep"), vec![1], "node {}", i + 1);
        assert_eq!(search(&c, i, "slug:marmots"), vec![2], "node {}", i + 1);
        assert_eq!(search(&c, i, "rivers"), vec![2], "node {}", i + 1);
        fts_intact(&c, i);
    }
    // A merge restore leaves the index matching its rows too.
    c.exec(0, "INSERT INTO docs VALUES (4, 'pikas', 'haystacks');");
    c.capture(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path);
    let n = &mut c.nodes[1];
    n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert_eq!(search(&c, 1, "haystacks"), vec![4]);
    fts_intact(&c, 1);
}

#[test]
fn a_whole_restore_brings_the_full_text_index_with_it() {
    let c = Cluster::new(1, FTS);
    c.exec(
        0,
        "INSERT INTO docs VALUES (1, 'marmots', 'alpine rodents whistle');",
    );
    let fresh = c.nodes[0].path.with_file_name("fresh.db");
    let app = Connection::open(&fresh).unwrap();
    app.execute_batch("PRAGMA journal_mode=WAL;").unwrap();
    let mut store = SqliteStore::open(StoreConfig::new(&fresh, 9, 99)).unwrap();
    let staged = super::snapshots::snapshot_of(&c, &fresh);
    let mut clock = Clock::new(Stamp::ZERO);
    let rep = store.restore(&mut clock, c.wall, &staged).unwrap();
    assert!(!rep.merged);
    let hits: i64 = app
        .query_row(
            "SELECT count(*) FROM docs_fts WHERE docs_fts MATCH 'whistle'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(hits, 1);
    app.execute_batch("INSERT INTO docs_fts(docs_fts, rank) VALUES ('integrity-check', 1);")
        .unwrap();
    // The application's triggers came with it and keep working for local writes.
    app.execute_batch("INSERT INTO docs VALUES (2, 'pikas', 'haystacks');")
        .unwrap();
    let hits: i64 = app
        .query_row(
            "SELECT count(*) FROM docs_fts WHERE docs_fts MATCH 'haystacks'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(hits, 1);
    let cap = store
        .capture(&mut clock, c.wall + 5)
        .unwrap()
        .captured
        .unwrap();
    assert_eq!((cap.batch.origin, cap.rows), (9, 1));
}

#[test]
fn repair_republishes_a_tables_rows_so_diverged_nodes_converge_to_one_copy() {
    let mut c = Cluster::new(3, BOOKS);
    c.exec(0, "INSERT INTO books VALUES (1, 'a'), (2, 'b'), (3, 'c');");
    c.settle();
    // Writes made behind marmot's back (its triggers disabled on these connections): the
    // nodes now differ, and nothing will ever tell them.
    let behind = |i: usize, sql: &str| {
        let conn = Connection::open(&c.nodes[i].path).unwrap();
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER,
            false,
        )
        .unwrap();
        conn.execute_batch(sql).unwrap();
    };
    behind(
        0,
        "UPDATE books SET title = 'A' WHERE id = 1; DELETE FROM books WHERE id = 2;",
    );
    behind(
        1,
        "UPDATE books SET title = 'stale' WHERE id = 3; INSERT INTO books VALUES (9, 'only on node 2');",
    );
    behind(2, "DELETE FROM books WHERE id = 1;");
    c.settle();
    assert_ne!(c.dump(0, "books"), c.dump(1, "books"));
    // Node 1's copy is the one to keep: its whole table, and the key only node 2 has.
    let r = marmot_sqlite::admin::repair(
        &c.nodes[0].app,
        "books",
        &marmot_sqlite::admin::RepairScope::default(),
    )
    .unwrap();
    assert_eq!((r.rows, r.gone), (2, 1), "rows 1 and 3, and row 2's delete");
    let r = marmot_sqlite::admin::repair(
        &c.nodes[0].app,
        "books",
        &marmot_sqlite::admin::RepairScope {
            keys: vec![vec![marmot_core::Value::Integer(9)]],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((r.rows, r.gone), (0, 1));
    c.settle();
    assert_nothing_parked(&c);
    c.assert_converged("books");
    assert_eq!(c.dump(2, "books"), vec!["(1, 'A')", "(3, 'c')"]);
    // A part of a table, and the errors a person can make.
    let r = marmot_sqlite::admin::repair(
        &c.nodes[0].app,
        "books",
        &marmot_sqlite::admin::RepairScope {
            filter: Some("id > 2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.rows, 1);
    let e = marmot_sqlite::admin::repair(&c.nodes[0].app, "nope", &Default::default()).unwrap_err();
    assert!(e.contains("no such table"), "{e}");
    let e = marmot_sqlite::admin::repair(
        &c.nodes[0].app,
        "books",
        &marmot_sqlite::admin::RepairScope {
            keys: vec![vec![
                marmot_core::Value::Integer(1),
                marmot_core::Value::Integer(2),
            ]],
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.contains("has 1 values"), "{e}");
}

#[test]
fn one_nodes_batches_out_of_capture_order_wait_on_unique_values_and_then_apply() {
    // Publishes retried after a failure can store a node's batches out of capture order; here
    // a value moves along a UNIQUE column over three batches, which then arrive backwards.
    let mut c = Cluster::new(2, UNIQ);
    c.exec(0, "INSERT INTO t VALUES (1, 'p', 1), (2, 'q', 2);");
    c.settle();
    let from = c.stream.len();
    c.exec(0, "UPDATE t SET slot = 3 WHERE id = 1;");
    c.capture(0);
    c.exec(0, "UPDATE t SET slot = 1 WHERE id = 2;");
    c.capture(0);
    c.exec(0, "UPDATE t SET slot = 2 WHERE id = 1;");
    c.capture(0);
    let mut late: Vec<Delivery> = c.stream[from..].to_vec();
    late.reverse();
    for (i, d) in late.iter_mut().enumerate() {
        d.stream_seq = (from + i + 1) as u64;
    }
    let n = &mut c.nodes[1];
    let out = n.store.apply(&mut n.clock, c.wall + 1, &late).unwrap();
    assert!(
        out.report.parked.iter().all(|p| p.collision),
        "{:?}",
        out.report.parked
    );
    assert_eq!(out.report.unparked as usize, out.report.parked.len());
    assert!(parked(&c, 1).is_empty());
    assert_eq!(c.dump(1, "t"), vec!["(1, 'p', 2)", "(2, 'q', 1)"]);
    assert_eq!(c.dump(1, "t"), c.dump(0, "t"));
}

#[test]
fn clearing_rows_out_of_the_way_keeps_the_columns_the_sender_does_not_have() {
    // Node 2 migrated (a new column) and filled it; node 1 has not, and swaps two e-mails:
    // its batch is applied on node 2 with the rows cleared first, and must leave node 2's
    // column as an update in place would have. That is with each node migrated by hand
    // (`[schema] replicate = false`); with schema replication the column takes its default
    // on every node (`a_row_written_without_a_column_another_node_just_added_converges_to_
    // the_columns_default`), or nodes would diverge.
    let mut c = Cluster::new_with(2, UNIQ, |cfg| cfg.replicate_schema = false);
    c.exec(0, "INSERT INTO t VALUES (1, 'a', 1), (2, 'b', 2);");
    c.settle();
    c.exec(
        1,
        "ALTER TABLE t ADD COLUMN notes TEXT; UPDATE t SET notes = 'kept ' || id;",
    );
    c.capture(1);
    c.exec(
        0,
        "BEGIN; UPDATE t SET email = 'tmp' WHERE id = 1; UPDATE t SET email = 'a' WHERE id = 2;
         UPDATE t SET email = 'b' WHERE id = 1; COMMIT;",
    );
    c.capture(0);
    c.apply(1);
    assert!(parked(&c, 1).is_empty(), "{:?}", parked(&c, 1));
    assert_eq!(
        c.dump(1, "t"),
        vec!["(1, 'b', 1, 'kept 1')", "(2, 'a', 2, 'kept 2')"]
    );
    // A merge restore from a snapshot taken before the migration keeps the column too.
    c.exec(0, "UPDATE t SET slot = 10 WHERE id = 1;");
    c.capture(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path);
    let n = &mut c.nodes[1];
    n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert_eq!(
        c.dump(1, "t"),
        vec!["(1, 'b', 10, 'kept 1')", "(2, 'a', 2, 'kept 2')"]
    );
}

#[test]
fn a_key_moved_to_another_column_of_the_same_type_is_a_key_change() {
    let mut c = Cluster::new(
        2,
        "CREATE TABLE p (id INTEGER PRIMARY KEY, code INTEGER NOT NULL UNIQUE, v TEXT);",
    );
    c.exec(0, "INSERT INTO p VALUES (1, 100, 'a'), (2, 200, 'b');");
    c.settle();
    // The key becomes `code`: same type, other column. Versions keyed by `id` must not be
    // read as versions of `code`.
    let rebuild = "BEGIN; CREATE TABLE p2 (id INTEGER NOT NULL UNIQUE, code INTEGER PRIMARY KEY, v TEXT);
                   INSERT INTO p2 SELECT * FROM p; DROP TABLE p; ALTER TABLE p2 RENAME TO p; COMMIT;";
    c.exec(0, rebuild);
    c.exec(1, rebuild);
    c.settle();
    let sig: String = c.nodes[0]
        .app
        .query_row(
            "SELECT key_signature FROM __marmot__tables WHERE name = 'p'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(sig, "\"code\"|INTEGER/BINARY");
    c.exec(1, "UPDATE p SET v = 'changed' WHERE code = 200;");
    c.settle();
    assert_nothing_parked(&c);
    c.assert_converged("p");
    assert_eq!(c.dump(0, "p"), vec!["(1, 100, 'a')", "(2, 200, 'changed')"]);
}

#[test]
fn batches_waiting_on_each_others_unique_values_apply_together() {
    // On node 1: P leaves slot 1 for a spare slot (batch X), Q takes slot 1 (B), P takes Q's
    // old slot 2 (A). Node 2 gets A and B, but not yet X: A waits on Q's slot, B on P's, one
    // by one neither fits; together (the newest row of each key) they do.
    let mut c = Cluster::new(2, UNIQ);
    c.exec(0, "INSERT INTO t VALUES (1, 'p', 1), (2, 'q', 2);");
    c.settle();
    let from = c.stream.len();
    c.exec(0, "UPDATE t SET slot = 3 WHERE id = 1;");
    c.capture(0);
    c.exec(0, "UPDATE t SET slot = 1 WHERE id = 2;");
    c.capture(0);
    c.exec(0, "UPDATE t SET slot = 2 WHERE id = 1;");
    c.capture(0);
    let x = c.stream[from].clone();
    let mut late: Vec<Delivery> = vec![c.stream[from + 2].clone(), c.stream[from + 1].clone()];
    for (i, d) in late.iter_mut().enumerate() {
        d.stream_seq = (from + 1 + i) as u64;
    }
    let n = &mut c.nodes[1];
    let out = n.store.apply(&mut n.clock, c.wall + 1, &late).unwrap();
    assert_eq!(out.report.parked.len(), 2, "{:?}", out.report);
    assert_eq!(out.report.unparked, 2, "applied together");
    assert!(parked(&c, 1).is_empty());
    assert_eq!(c.dump(1, "t"), vec!["(1, 'p', 2)", "(2, 'q', 1)"]);
    // X comes last, and is older than what the node holds: nothing changes.
    let mut x = x;
    x.stream_seq = (from + 3) as u64;
    let n = &mut c.nodes[1];
    n.store.apply(&mut n.clock, c.wall + 2, &[x]).unwrap();
    assert_eq!(c.dump(1, "t"), c.dump(0, "t"));
}

#[test]
fn a_waiting_schema_change_applies_together_with_the_batches_parked_on_its_new_shape() {
    // On node 1: Z renames a column of `s` and moves P to slot 2; W writes `s` under the new
    // name and moves P on to slot 3; V gives Q slot 2. Node 2 gets V, Z, W: Z waits on Q's
    // slot 2 (V's row is newer), W parks on the unknown column `y` (Z's rename is not applied).
    // Only together do they apply: Z's rename first, then the newest row of each key. The
    // joint retry took only the batches waiting on UNIQUE values, so Z and W stayed parked for
    // good. Found by the simulation (V4, seed 843597).
    let mut c = Cluster::new(2, UNIQ);
    c.exec(
        0,
        "CREATE TABLE s (k INTEGER PRIMARY KEY, x TEXT); INSERT INTO s VALUES (1, 'a'); \
         INSERT INTO t VALUES (1, 'p', 1), (2, 'q', 5);",
    );
    c.settle();
    let from = c.stream.len();
    c.exec(
        0,
        "ALTER TABLE s RENAME COLUMN x TO y; UPDATE t SET slot = 2 WHERE id = 1;",
    );
    c.capture(0);
    c.exec(
        0,
        "UPDATE s SET y = 'w'; UPDATE t SET slot = 3 WHERE id = 1;",
    );
    c.capture(0);
    c.exec(0, "UPDATE t SET slot = 2 WHERE id = 2;");
    c.capture(0);
    assert_eq!(c.stream.len(), from + 3);
    let mut late: Vec<Delivery> = vec![
        c.stream[from + 2].clone(),
        c.stream[from].clone(),
        c.stream[from + 1].clone(),
    ];
    for (i, d) in late.iter_mut().enumerate() {
        d.stream_seq = (from + 1 + i) as u64;
    }
    let n = &mut c.nodes[1];
    let out = n.store.apply(&mut n.clock, c.wall + 1, &late).unwrap();
    assert_eq!(out.report.parked.len(), 2, "{:?}", out.report);
    assert!(out.report.parked[0].collision, "{:?}", out.report.parked);
    assert!(!out.report.parked[1].collision, "{:?}", out.report.parked);
    assert_eq!(out.report.unparked, 2, "applied together");
    assert!(parked(&c, 1).is_empty(), "{:?}", parked(&c, 1));
    assert_eq!(c.dump(1, "t"), vec!["(1, 'p', 3)", "(2, 'q', 2)"]);
    assert_eq!(c.dump(1, "s"), vec!["(1, 'w')"]);
    assert_eq!(c.dump(1, "t"), c.dump(0, "t"));
    assert_eq!(c.dump(1, "s"), c.dump(0, "s"));
}

#[test]
fn batches_waiting_on_each_others_unique_values_apply_together_when_one_changes_the_schema() {
    // As above, but A also renames a column, and B's row is in the shape before it. Applied
    // together, every batch's rows were written after the whole set, A's rename included, so
    // B's row named a column that no longer existed and the set never applied; the schema
    // change, parked with it, held back every later batch of the table. Found by the
    // simulation (V3, seed 772522). The set's schema changes now come first, and B's row
    // applies through the column history as any row in an older shape does.
    let mut c = Cluster::new(2, UNIQ);
    c.exec(0, "INSERT INTO t VALUES (1, 'p', 1), (2, 'q', 2);");
    c.settle();
    let from = c.stream.len();
    c.exec(0, "UPDATE t SET slot = 3 WHERE id = 1;");
    c.capture(0);
    c.exec(0, "UPDATE t SET slot = 1, email = 'q2' WHERE id = 2;");
    c.capture(0);
    c.exec(
        0,
        "ALTER TABLE t RENAME COLUMN email TO mail; UPDATE t SET slot = 2 WHERE id = 1;",
    );
    c.capture(0);
    let x = c.stream[from].clone();
    let mut late: Vec<Delivery> = vec![c.stream[from + 2].clone(), c.stream[from + 1].clone()];
    for (i, d) in late.iter_mut().enumerate() {
        d.stream_seq = (from + 1 + i) as u64;
    }
    let n = &mut c.nodes[1];
    let out = n.store.apply(&mut n.clock, c.wall + 1, &late).unwrap();
    assert_eq!(out.report.parked.len(), 2, "{:?}", out.report);
    assert_eq!(out.report.unparked, 2, "applied together");
    assert!(parked(&c, 1).is_empty());
    assert_eq!(c.dump(1, "t"), vec!["(1, 'p', 2)", "(2, 'q2', 1)"]);
    let mail: String = c.nodes[1]
        .app
        .query_row("SELECT mail FROM t WHERE id = 2", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mail, "q2");
    let mut x = x;
    x.stream_seq = (from + 3) as u64;
    let n = &mut c.nodes[1];
    n.store.apply(&mut n.clock, c.wall + 2, &[x]).unwrap();
    assert_eq!(c.dump(1, "t"), c.dump(0, "t"));
}
