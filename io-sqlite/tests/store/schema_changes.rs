//! Schema changes made on one node, by any client, reach every node with the rows written
//! after them (`schema.replicate`, on by default).

use super::*;
use marmot_sqlite::replicated::{schema_digest, schema_objects};

fn objects(c: &Cluster, i: usize) -> Vec<(String, String, String)> {
    schema_objects(&c.nodes[i].app).unwrap()
}

fn assert_same_schema(c: &Cluster) {
    let first = objects(c, 0);
    for i in 1..c.nodes.len() {
        assert_eq!(objects(c, i), first, "node {} has another schema", i + 1);
        assert_eq!(
            schema_digest(&c.nodes[i].app).unwrap(),
            schema_digest(&c.nodes[0].app).unwrap()
        );
    }
}

fn conflicts(c: &Cluster, i: usize) -> Vec<String> {
    c.nodes[i]
        .app
        .prepare("SELECT tbl || ' ' || key FROM \"__marmot__conflicts\" ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The one value `sql` selects on node `i`'s application connection.
fn scalar<T: rusqlite::types::FromSql>(c: &Cluster, i: usize, sql: &str) -> T {
    c.nodes[i].app.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn parked(c: &Cluster, i: usize) -> i64 {
    c.nodes[i]
        .app
        .query_row("SELECT count(*) FROM \"__marmot__parked\"", [], |r| {
            r.get(0)
        })
        .unwrap()
}

/// After everything settled, no node has anything left to capture: applied schema is never
/// captured again as a local change.
fn assert_no_echo(c: &mut Cluster) {
    for i in 0..c.nodes.len() {
        assert_eq!(c.capture(i), None, "node {} captured an echo", i + 1);
    }
}

#[test]
fn a_migration_on_one_node_reaches_every_node_and_rows_written_after_it_apply_everywhere() {
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'Emma');");
    c.settle();
    c.exec(
        1,
        "ALTER TABLE books ADD COLUMN isbn TEXT;
         CREATE TABLE shelves (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
         CREATE UNIQUE INDEX shelves_name ON shelves (name);
         INSERT INTO shelves VALUES (1, 'classics');
         PRAGMA user_version = 7;",
    );
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        assert_eq!(c.dump(i, "shelves"), vec!["(1, 'classics')"]);
        let uv: i64 = scalar(&c, i, "PRAGMA user_version");
        assert_eq!(uv, 7, "node {}", i + 1);
    }
    // A write of the new column on another node reaches every node.
    c.exec(2, "UPDATE books SET isbn = '978-0' WHERE id = 1;");
    c.settle();
    for i in 0..3 {
        assert_eq!(
            c.dump(i, "books"),
            vec!["(1, 'Emma', NULL, NULL, NULL, NULL, '978-0')"],
            "node {}",
            i + 1
        );
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn rename_and_drop_column_keep_the_data_and_a_rebuild_replicates_as_one_change() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "INSERT INTO books (id, title, author, price) VALUES (1, 'Emma', 'Austen', 9.5), (2, 'Kim', 'Kipling', 4.0);",
    );
    c.settle();
    c.exec(
        1,
        "ALTER TABLE books RENAME COLUMN author TO writer;
         ALTER TABLE books DROP COLUMN price;",
    );
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(
        c.dump(0, "books"),
        vec![
            "(1, 'Emma', 'Austen', NULL, NULL)",
            "(2, 'Kim', 'Kipling', NULL, NULL)"
        ],
        "the renamed column kept its values"
    );
    // SQLite's documented rebuild, in one transaction, adding a CHECK constraint.
    c.exec(
        0,
        "BEGIN;
         CREATE TABLE books_new (id INTEGER PRIMARY KEY, title TEXT NOT NULL CHECK (title <> ''), writer TEXT, year INTEGER, cover BLOB);
         INSERT INTO books_new SELECT id, title, writer, year, cover FROM books;
         DROP TABLE books;
         ALTER TABLE books_new RENAME TO books;
         CREATE INDEX books_writer ON books (writer);
         COMMIT;",
    );
    c.settle();
    assert_same_schema(&c);
    c.exec(
        1,
        "INSERT INTO books (id, title, writer) VALUES (3, 'Dune', 'Herbert');",
    );
    c.settle();
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(c.dump(0, "books").len(), 3);
    let refused = c.nodes[0]
        .app
        .execute("INSERT INTO books (id, title) VALUES (9, '')", []);
    assert!(
        refused.is_err(),
        "the rebuilt table's CHECK holds on node 1"
    );
    let refused = c.nodes[1]
        .app
        .execute("INSERT INTO books (id, title) VALUES (9, '')", []);
    assert!(refused.is_err(), "and on node 2");
    for i in 0..2 {
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn the_same_migration_run_on_every_node_converges_silently() {
    let mut c = Cluster::new(3, SCHEMA);
    for i in 0..3 {
        c.exec(
            i,
            "ALTER TABLE books ADD COLUMN isbn TEXT; CREATE INDEX books_isbn ON books (isbn);",
        );
        c.capture(i);
    }
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        assert!(
            conflicts(&c, i).is_empty(),
            "node {}: {:?}",
            i + 1,
            conflicts(&c, i)
        );
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn concurrent_different_changes_end_the_same_everywhere_and_the_loser_is_recorded() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'Emma');");
    c.settle();
    c.exec(0, "ALTER TABLE books ADD COLUMN isbn TEXT DEFAULT 'none';");
    c.exec(1, "ALTER TABLE books ADD COLUMN pages INTEGER DEFAULT 0;");
    c.capture(0);
    c.capture(1);
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    let recorded: usize = (0..2).map(|i| conflicts(&c, i).len()).sum();
    assert!(recorded >= 1, "the losing change is recorded somewhere");
    assert!(
        (0..2).any(|i| conflicts(&c, i).iter().any(|k| k == "books (schema table)")),
        "{:?} {:?}",
        conflicts(&c, 0),
        conflicts(&c, 1)
    );
    assert_no_echo(&mut c);
}

#[test]
fn a_dropped_table_goes_everywhere_and_views_and_triggers_follow() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "CREATE TABLE audit (id INTEGER PRIMARY KEY, what TEXT);
         CREATE VIEW titles AS SELECT title FROM books;
         CREATE TRIGGER books_audit AFTER INSERT ON books BEGIN INSERT INTO audit (what) VALUES (new.title); END;",
    );
    c.settle();
    assert_same_schema(&c);
    // The application's trigger runs on the node where the application writes; its row
    // replicates like any other.
    c.exec(1, "INSERT INTO books (id, title) VALUES (5, 'Ulysses');");
    c.settle();
    assert_eq!(c.dump(0, "audit"), vec!["(1, 'Ulysses')"]);
    assert_eq!(c.dump(1, "audit"), vec!["(1, 'Ulysses')"]);
    c.exec(
        0,
        "DROP TRIGGER books_audit; DROP VIEW titles; DROP TABLE audit;",
    );
    c.settle();
    assert_same_schema(&c);
    let left: i64 = scalar(
        &c,
        1,
        "SELECT count(*) FROM sqlite_master WHERE name IN ('audit', 'titles', 'books_audit')",
    );
    assert_eq!(left, 0);
    assert_no_echo(&mut c);
}

#[test]
fn with_schema_replication_off_each_node_keeps_its_own_schema() {
    let mut c = Cluster::new_with(2, SCHEMA, |cfg| cfg.replicate_schema = false);
    c.exec(0, "ALTER TABLE books ADD COLUMN isbn TEXT;");
    c.settle();
    assert_ne!(objects(&c, 0), objects(&c, 1));
}

#[test]
fn rows_written_in_the_old_shape_apply_after_a_rename_or_drop_column_elsewhere() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "INSERT INTO books (id, title, author, price) VALUES (1, 'Emma', 'Austen', 9.5);",
    );
    c.settle();
    // Neither node has seen the other's change: node 1 writes in the old shape while node 2
    // renames one column and drops another.
    c.exec(
        0,
        "INSERT INTO books (id, title, author, price) VALUES (2, 'Kim', 'Kipling', 4.0);",
    );
    c.capture(0);
    c.exec(
        1,
        "ALTER TABLE books RENAME COLUMN author TO writer; ALTER TABLE books DROP COLUMN price;",
    );
    c.capture(1);
    c.exec(
        0,
        "UPDATE books SET author = 'R. Kipling', price = 5.0 WHERE id = 2;",
    );
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(
        c.dump(1, "books"),
        vec![
            "(1, 'Emma', 'Austen', NULL, NULL)",
            "(2, 'Kim', 'R. Kipling', NULL, NULL)"
        ]
    );
    for i in 0..2 {
        assert_eq!(parked(&c, i), 0, "node {}", i + 1);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_full_text_index_created_on_one_node_finds_the_same_rows_everywhere() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "INSERT INTO books (id, title) VALUES (1, 'Marmots of the Alps'), (2, 'Otters');",
    );
    c.settle();
    c.exec(
        1,
        "CREATE VIRTUAL TABLE books_fts USING fts5(title, content='books', content_rowid='id');
         INSERT INTO books_fts(books_fts) VALUES ('rebuild');
         CREATE TRIGGER books_fts_ai AFTER INSERT ON books BEGIN INSERT INTO books_fts(rowid, title) VALUES (new.id, new.title); END;",
    );
    c.settle();
    assert_same_schema(&c);
    c.exec(
        1,
        "INSERT INTO books (id, title) VALUES (3, 'Alpine marmots');",
    );
    c.settle();
    for i in 0..2 {
        let found: Vec<i64> = c.nodes[i]
            .app
            .prepare("SELECT rowid FROM books_fts WHERE books_fts MATCH 'marmots' ORDER BY rowid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(found, vec![1, 3], "node {}", i + 1);
        c.nodes[i]
            .app
            .execute_batch("INSERT INTO books_fts(books_fts, rank) VALUES ('integrity-check', 1);")
            .unwrap();
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_table_dropped_on_one_node_while_another_changed_it_comes_back_with_its_rows() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "INSERT INTO books (id, title) VALUES (1, 'Emma'), (2, 'Kim');",
    );
    c.settle();
    // Concurrently: node 1 drops the table, node 2 adds a column and writes it. Node 2's
    // change is stamped later and wins.
    c.exec(0, "DROP TABLE books;");
    c.capture(0);
    c.wall += 10;
    c.exec(
        1,
        "ALTER TABLE books ADD COLUMN isbn TEXT; UPDATE books SET isbn = 'x' WHERE id = 1;",
    );
    c.capture(1);
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(
        c.dump(0, "books").len(),
        2,
        "the winner's rows reached the loser"
    );
    for i in 0..2 {
        assert_eq!(parked(&c, i), 0, "node {}", i + 1);
    }
}

#[test]
fn rows_written_in_a_losing_shape_still_apply_without_the_losing_columns() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'Emma');");
    c.settle();
    c.exec(
        0,
        "ALTER TABLE books ADD COLUMN isbn TEXT; UPDATE books SET title = 'Emma!', isbn = 'x' WHERE id = 1;
         INSERT INTO uniq VALUES (5, 'e@x');",
    );
    c.capture(0);
    c.wall += 10;
    c.exec(1, "ALTER TABLE books ADD COLUMN pages INTEGER;");
    c.capture(1);
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(
        c.dump(1, "uniq"),
        vec!["(5, 'e@x')"],
        "the rest of the batch applied"
    );
    for i in 0..2 {
        assert_eq!(parked(&c, i), 0, "node {}", i + 1);
    }
}

#[test]
fn a_table_rebuilt_from_the_stream_keeps_its_rowids() {
    let schema = "CREATE TABLE tags (name TEXT PRIMARY KEY, n INTEGER);";
    let mut c = Cluster::new(2, schema);
    c.exec(0, "INSERT INTO tags VALUES ('a', 1), ('b', 2), ('c', 3);");
    c.settle();
    // Rowids are each node's own (an FTS5 index over the table refers to them): make node 2's
    // differ from the order a copy would give.
    c.exec(1, "UPDATE tags SET rowid = rowid + 10 WHERE name = 'a';");
    c.settle();
    let rowids = |c: &Cluster| -> Vec<(String, i64)> {
        c.nodes[1]
            .app
            .prepare("SELECT name, rowid FROM tags ORDER BY name")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let before = rowids(&c);
    // Two columns at once: node 2 rebuilds rather than replay one ALTER.
    c.exec(
        0,
        "ALTER TABLE tags ADD COLUMN x TEXT; ALTER TABLE tags ADD COLUMN y TEXT;",
    );
    c.settle();
    assert_same_schema(&c);
    assert_eq!(rowids(&c), before);
}

#[test]
fn turning_schema_replication_on_later_publishes_only_what_changes_from_then_on() {
    let mut c = Cluster::new_with(2, SCHEMA, |cfg| cfg.replicate_schema = false);
    for i in 0..2 {
        c.exec(i, "ALTER TABLE books ADD COLUMN isbn TEXT;");
        c.capture(i);
    }
    c.settle();
    // Both nodes restart with schema replication on: nothing old is published.
    for i in 0..2 {
        let path = c.nodes[i].path.clone();
        c.nodes[i].store =
            SqliteStore::open(StoreConfig::new(&path, i as u64 + 1, 2000 + i as u64)).unwrap();
    }
    assert_no_echo(&mut c);
    c.exec(0, "CREATE INDEX books_isbn ON books (isbn);");
    c.settle();
    assert_same_schema(&c);
}

#[test]
fn a_row_written_before_two_renames_follows_both() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "INSERT INTO books (id, title, author) VALUES (1, 'Emma', 'Austen');",
    );
    c.settle();
    c.exec(0, "UPDATE books SET author = 'J. Austen' WHERE id = 1;");
    c.capture(0);
    c.exec(1, "ALTER TABLE books RENAME COLUMN author TO writer;");
    c.capture(1);
    c.exec(1, "ALTER TABLE books RENAME COLUMN writer TO by_line;");
    c.capture(1);
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(
        c.dump(1, "books"),
        vec!["(1, 'Emma', 'J. Austen', NULL, NULL, NULL)"]
    );
    assert_eq!(parked(&c, 1), 0);
}

#[test]
fn a_merge_restore_brings_the_snapshots_newer_schema_before_its_rows() {
    // A node that fell behind restores into its database with rows: the schema changes it
    // missed (no longer in the stream) come from the snapshot, with their rows.
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'Emma');");
    c.settle();
    c.exec(
        1,
        "INSERT INTO books (id, title) VALUES (2, 'written on node 2, unpublished');",
    );
    c.exec(
        0,
        "ALTER TABLE books ADD COLUMN isbn TEXT;
         UPDATE books SET isbn = '978-0' WHERE id = 1;
         CREATE TABLE shelves (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
         CREATE UNIQUE INDEX shelves_name ON shelves (name);
         INSERT INTO shelves VALUES (1, 'classics');
         CREATE VIEW titled AS SELECT title FROM books;",
    );
    c.capture(0);
    c.apply(0);
    // Node 2 never reads those messages: it restores node 1's snapshot.
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = rep.position;
    // The merge captured node 2's pending write first: it publishes it.
    c.publish(rep.captured);
    assert_eq!(
        objects(&c, 0),
        objects(&c, 1),
        "the snapshot's schema came first"
    );
    assert_eq!(c.dump(1, "shelves"), vec!["(1, 'classics')"]);
    let isbn: String = scalar(&c, 1, "SELECT isbn FROM books WHERE id = 1");
    assert_eq!(isbn, "978-0");
    // Node 2's own write survived and reaches node 1; nothing is published twice or parked.
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(c.dump(0, "books").len(), 2);
    assert_eq!(parked(&c, 0) + parked(&c, 1), 0);
    assert_no_echo(&mut c);
}

#[test]
fn a_row_written_without_a_column_another_node_just_added_converges_to_the_columns_default() {
    // Row-level last writer wins: the winning write carried no value for the column (its
    // node did not have it yet), so every node ends with the column's default, not with
    // whatever each node held (found by reasoning about the simulation's schema workload).
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'Emma');");
    c.settle();
    c.exec(
        0,
        "ALTER TABLE books ADD COLUMN isbn TEXT DEFAULT 'none'; UPDATE books SET isbn = 'set on node 1' WHERE id = 1;",
    );
    c.capture(0);
    c.exec(1, "UPDATE books SET title = 'Emma, later' WHERE id = 1;");
    c.capture(1);
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(
        c.dump(0, "books"),
        vec!["(1, 'Emma, later', NULL, NULL, NULL, NULL, 'none')"]
    );
}

#[test]
fn one_nodes_changes_reaching_the_stream_out_of_order_are_no_conflict() {
    // Found by the simulation's schema workload (V3): a publish retried after a later one
    // went through puts one node's changes out of order in the stream. The older change was
    // superseded by its own node: no conflict, and the table's rows are not published again
    // (that publication would write older values over concurrent writes).
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'Emma');");
    c.settle();
    c.exec(0, "ALTER TABLE books ADD COLUMN isbn TEXT;");
    c.capture(0);
    c.exec(
        0,
        "ALTER TABLE books DROP COLUMN price; UPDATE books SET isbn = 'x' WHERE id = 1;",
    );
    c.capture(0);
    let n = c.stream.len();
    c.stream.swap(n - 2, n - 1);
    for (i, d) in c.stream.iter_mut().enumerate() {
        d.stream_seq = i as u64 + 1;
    }
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(conflicts(&c, 0), Vec::<String>::new());
    assert_eq!(conflicts(&c, 1), Vec::<String>::new());
    assert_no_echo(&mut c);
}

#[test]
fn rows_in_a_shape_the_receiver_never_had_apply_through_the_senders_column_history() {
    // Node 1 adds a column, writes it, renames it; node 2 meets the row first (it parks: no
    // such column), then the rename (applied as a rebuild: node 2 never had the column), then
    // the addition (superseded). The rename says what became of the column: the parked row
    // applies under the new name, and nothing is left parked (found by the simulation, V3).
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN isbn TEXT DEFAULT 'none';");
    c.capture(0);
    c.exec(
        0,
        "INSERT INTO books (id, title, isbn) VALUES (1, 'Emma', '978-0');",
    );
    c.capture(0);
    c.exec(0, "ALTER TABLE books RENAME COLUMN isbn TO code;");
    c.capture(0);
    let n = c.stream.len();
    let (add, row, rename) = (
        c.stream[n - 3].clone(),
        c.stream[n - 2].clone(),
        c.stream[n - 1].clone(),
    );
    c.stream.truncate(n - 3);
    c.stream.extend([row, rename, add]);
    for (i, d) in c.stream.iter_mut().enumerate() {
        d.stream_seq = i as u64 + 1;
    }
    // Node 2 reads all three in that order; the rename is a schema change, after which the
    // node retries its parked batches (the node's core does that: here, by hand).
    let out = c.apply(1);
    assert!(out.schema_changed);
    let n = &mut c.nodes[1];
    let retried = n.store.retry_parked(&mut n.clock, c.wall, true).unwrap();
    assert_eq!((retried.applied, retried.remaining), (1, 0));
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(
        c.dump(1, "books"),
        vec!["(1, 'Emma', NULL, NULL, NULL, NULL, '978-0')"]
    );
    assert_eq!(parked(&c, 1), 0);
    assert_no_echo(&mut c);
}

#[test]
fn a_merge_restore_follows_a_column_through_renames_while_other_columns_came_and_went() {
    // Found by the simulation (V3, seeds 740351, 741310, 741439): a node that fell behind
    // had columns `a` and `b`; meanwhile `b` was renamed twice, `a` dropped and two columns
    // added. The restore rebuilt the table pairing old and new columns by position and shape,
    // so `b`'s values went nowhere and the column came back with its default. The column
    // history says where `b` went.
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';
         ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';
         INSERT INTO books (id, title, a, b) VALUES (1, 'Emma', 'va', 'vb');",
    );
    c.settle();
    for ddl in [
        "ALTER TABLE books RENAME COLUMN b TO b2",
        "ALTER TABLE books DROP COLUMN a",
        "ALTER TABLE books ADD COLUMN c TEXT DEFAULT 'dc'",
        "ALTER TABLE books ADD COLUMN d TEXT DEFAULT 'dd'",
        "ALTER TABLE books RENAME COLUMN b2 TO b3",
    ] {
        c.exec(0, ddl);
        c.capture(0);
    }
    c.apply(0);
    // Node 2 never reads those changes: it restores node 1's snapshot into its rows.
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = rep.position;
    c.settle();
    assert_same_schema(&c);
    let b3: String = scalar(&c, 1, "SELECT b3 FROM books WHERE id = 1");
    assert_eq!(b3, "vb", "the twice-renamed column kept its value");
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(parked(&c, 0) + parked(&c, 1), 0);
    assert_no_echo(&mut c);
}

#[test]
fn a_merge_restore_whose_snapshot_has_a_losing_shape_leaves_its_columns_out_of_later_rows() {
    // Found by the simulation (V4, seed 9): node 2's table is newer than the snapshot's; the
    // change that made the snapshot's shape is before the snapshot's position, so node 2
    // never reads it, and rows written in that shape arrive after. They apply without the
    // losing columns, as they would had the change arrived from the stream.
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'Emma');");
    c.settle();
    c.exec(0, "ALTER TABLE books ADD COLUMN c TEXT DEFAULT 'dc';");
    c.capture(0);
    c.apply(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    c.exec(1, "ALTER TABLE books ADD COLUMN d TEXT DEFAULT 'dd';");
    c.capture(1);
    c.exec(
        0,
        "INSERT INTO books (id, title, c) VALUES (2, 'Persuasion', 'x');",
    );
    c.capture(0);
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = rep.position;
    c.publish(rep.captured);
    c.settle();
    assert_eq!(parked(&c, 0) + parked(&c, 1), 0, "nothing parked");
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(c.dump(1, "books").len(), 2);
}

#[test]
fn rows_for_a_table_dropped_meanwhile_are_skipped_not_parked() {
    // Found by the simulation (V4): a node wrote a table's rows before it learned that
    // another node dropped the table. The drop removes them on their node too; elsewhere they
    // are skipped, not parked forever.
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "CREATE TABLE x (k INTEGER PRIMARY KEY, v TEXT); INSERT INTO x VALUES (1, 'a');",
    );
    c.settle();
    c.exec(1, "INSERT INTO x VALUES (2, 'b');");
    c.capture(1);
    c.exec(0, "DROP TABLE x;");
    c.capture(0);
    c.settle();
    assert_eq!(parked(&c, 0) + parked(&c, 1), 0, "nothing parked");
    assert_same_schema(&c);
    for i in 0..2 {
        let n: i64 = scalar(&c, i, "SELECT count(*) FROM sqlite_master WHERE name = 'x'");
        assert_eq!(n, 0, "node {} still has the table", i + 1);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_column_whose_lineage_lost_and_then_won_ends_the_same_on_every_node() {
    // Found by the simulation (V4, seed 58): node 1 adds `a` and writes it; node 2 adds `b`
    // (newer: it wins over the addition of `a`); node 1, not having seen that, renames `a` to
    // `a2` (newer still: it wins). Node 2 applied the addition of `a` (losing: `a` left out of
    // the row), then the rename (`a2` with its default), while node 1 kept the value: the
    // nodes diverged. A node where a losing change arrives after a shape with columns the
    // loser lacks now publishes its rows again, so every node ends the same. Which value
    // `a2` ends with depends on the order of those publications: here node 2's, written
    // last, with the default (the documented limit of concurrent changes to one table).
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'Emma');");
    c.settle();
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.exec(0, "UPDATE books SET a = 'x' WHERE id = 1;");
    c.capture(0);
    c.exec(1, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
    c.capture(1);
    c.exec(0, "ALTER TABLE books RENAME COLUMN a TO a2;");
    c.capture(0);
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    let a2 = |i: usize| -> String { scalar(&c, i, "SELECT a2 FROM books WHERE id = 1") };
    assert_eq!(a2(0), a2(1));
    assert_eq!(parked(&c, 0) + parked(&c, 1), 0);
    assert_no_echo(&mut c);
}

#[test]
fn two_nodes_renaming_one_column_at_once_keep_its_values_under_the_winning_name() {
    // Found by the simulation (V4, seed 88). Node 2 renames `b` to `r2`, node 3 writes a row
    // in that shape, node 1 renames `b` to `r1` later (it wins). Node 1 meets the losing rename
    // after its own: the losing name now becomes the winning one there too, as on the nodes
    // that met the renames the other way round, instead of being dropped.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
    c.capture(0);
    c.settle();
    // SQLite prepares ALTER TABLE ... RENAME COLUMN against the connection's cached schema
    // (it checks the schema cookie only when the statement runs): an application connection
    // reads the schema marmot changed before it renames a column marmot added.
    c.exec(1, "SELECT b FROM books LIMIT 0;");
    c.exec(1, "ALTER TABLE books RENAME COLUMN b TO r2;");
    c.capture(1);
    c.apply(2);
    c.exec(
        2,
        "INSERT INTO books (id, title, r2) VALUES (7, 'Emma', 'x');",
    );
    c.capture(2);
    c.exec(0, "ALTER TABLE books RENAME COLUMN b TO r1;");
    c.capture(0);
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        let v: String = scalar(&c, i, "SELECT r1 FROM books WHERE id = 7");
        assert_eq!(v, "x", "node {}", i + 1);
    }
    assert_eq!(parked(&c, 0) + parked(&c, 1) + parked(&c, 2), 0);
}

#[test]
fn rows_of_a_dropped_table_do_not_land_in_the_table_created_again() {
    // Found by the simulation (V4, seeds 136 and 157): node 2 writes a row of `x` while node 1
    // drops `x` and creates it again. The row reaches node 1 after both: it belongs to the
    // dropped table (its node removes it with the drop), so node 1 skips it rather than put it
    // in the new one. Rows say which schema version of their table they were written in.
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "CREATE TABLE x (k INTEGER PRIMARY KEY, v TEXT); INSERT INTO x VALUES (1, 'a');",
    );
    c.settle();
    c.exec(1, "INSERT INTO x VALUES (2, 'old life');");
    c.capture(1);
    c.exec(0, "DROP TABLE x;");
    c.capture(0);
    c.exec(0, "CREATE TABLE x (k INTEGER PRIMARY KEY, v TEXT);");
    c.capture(0);
    c.exec(0, "INSERT INTO x VALUES (3, 'new life');");
    c.capture(0);
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "x"), vec!["(3, 'new life')"]);
    assert_eq!(c.dump(1, "x"), c.dump(0, "x"));
    assert_eq!(parked(&c, 0) + parked(&c, 1), 0);
    assert_no_echo(&mut c);
}

#[test]
fn rows_parked_before_a_losing_change_arrives_apply_once_it_does() {
    // Found by the simulation (V4, seed 55): node 2 restarted with a schema change and the
    // rows written after it both unpublished, and published the rows first (a documented
    // limit). Node 1 parked the rows (unknown column); the change then arrived and lost to
    // node 1's own newer change of the table. What became of its column is news: the parked
    // rows retry, and apply without it.
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "INSERT INTO books (id, title) VALUES (1, 'Emma');");
    c.settle();
    c.exec(1, "ALTER TABLE books ADD COLUMN c TEXT DEFAULT 'dc';");
    c.capture(1);
    c.exec(
        1,
        "INSERT INTO books (id, title, c) VALUES (2, 'Persuasion', 'x');",
    );
    c.capture(1);
    let n = c.stream.len();
    c.stream.swap(n - 2, n - 1);
    for (i, d) in c.stream.iter_mut().enumerate() {
        d.stream_seq = i as u64 + 1;
    }
    c.exec(0, "ALTER TABLE books ADD COLUMN d TEXT DEFAULT 'dd';");
    c.capture(0);
    // Node 1 reads the row (it parks), then the losing change: the apply reports a schema
    // change, after which the node retries its parked batches (its core does: here, by hand).
    let out = c.apply(0);
    assert_eq!(parked(&c, 0), 1);
    assert!(
        out.schema_changed,
        "what the losing change's columns became is news"
    );
    let n = &mut c.nodes[0];
    let retried = n.store.retry_parked(&mut n.clock, c.wall, true).unwrap();
    assert_eq!((retried.applied, retried.remaining), (1, 0));
    c.settle();
    assert_eq!(parked(&c, 0) + parked(&c, 1), 0, "nothing left parked");
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    assert_eq!(c.dump(0, "books").len(), 2);
}

#[test]
fn a_column_renamed_in_the_same_capture_as_another_was_dropped_before_it_keeps_its_values() {
    // Found by the simulation (V3, seed 751033): node 1 drops `a` and renames `b` in one
    // capture. Receivers rebuild the table; pairing the gap's columns by position put `a`
    // against `b2` (another shape: no pair) and left `b` out, so `b2` took its default there.
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';
         ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';
         INSERT INTO books (id, title, a, b) VALUES (1, 'Emma', 'va', 'vb');",
    );
    c.settle();
    c.exec(
        0,
        "ALTER TABLE books DROP COLUMN a; ALTER TABLE books RENAME COLUMN b TO b2;",
    );
    c.capture(0);
    c.settle();
    assert_same_schema(&c);
    let b2: String = scalar(&c, 1, "SELECT b2 FROM books WHERE id = 1");
    assert_eq!(b2, "vb");
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
}

#[test]
fn rows_of_a_table_life_a_losing_drop_ended_are_skipped_everywhere() {
    // Found in review: node 1 drops `x`, node 2 changes it later (its change wins over the
    // drop), node 3, having seen neither, writes a row in the old life of `x`. Where the drop
    // won first (nodes 1 and 3) that row is gone or skipped; node 2, where the drop lost, must
    // skip it too rather than keep it alone.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(
        0,
        "CREATE TABLE x (k INTEGER PRIMARY KEY, v TEXT); INSERT INTO x VALUES (1, 'a');",
    );
    c.settle();
    c.exec(0, "DROP TABLE x;");
    c.capture(0);
    c.exec(1, "ALTER TABLE x ADD COLUMN z TEXT;");
    c.capture(1);
    c.exec(2, "INSERT INTO x VALUES (2, 'old life');");
    c.capture(2);
    c.settle();
    assert_same_schema(&c);
    for i in 1..3 {
        assert_eq!(c.dump(i, "x"), c.dump(0, "x"), "node {}", i + 1);
    }
    assert!(
        !c.dump(0, "x").iter().any(|r| r.contains("old life")),
        "{:?}",
        c.dump(0, "x")
    );
    assert_eq!(parked(&c, 0) + parked(&c, 1) + parked(&c, 2), 0);
}

#[test]
fn a_column_name_used_again_does_not_inherit_the_old_columns_history() {
    // Found in review: `x` was renamed to `y`, and a new `x` added later. A rebuild on a
    // receiver must not take the old fact "x became y" for the new `x`.
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN x TEXT DEFAULT 'd1';");
    c.capture(0);
    c.exec(0, "ALTER TABLE books RENAME COLUMN x TO y;");
    c.capture(0);
    c.exec(0, "ALTER TABLE books ADD COLUMN x TEXT DEFAULT 'd2';");
    c.capture(0);
    c.exec(
        0,
        "INSERT INTO books (id, title, y, x) VALUES (1, 'Emma', 'vy', 'vx');",
    );
    c.capture(0);
    c.settle();
    // Node 2 renames the new `x` and adds a column in one capture: node 1 rebuilds.
    c.exec(1, "SELECT x FROM books LIMIT 0;");
    c.exec(
        1,
        "ALTER TABLE books RENAME COLUMN x TO w; ALTER TABLE books ADD COLUMN z TEXT DEFAULT 'dz';",
    );
    c.capture(1);
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "books"), c.dump(1, "books"));
    let (y, w): (String, String) = c.nodes[0]
        .app
        .query_row("SELECT y, w FROM books WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((y.as_str(), w.as_str()), ("vy", "vx"));
}

#[test]
fn a_merge_restore_follows_a_column_renamed_on_two_other_nodes_one_after_the_other() {
    // Found by the simulation (V4, seed 251): node 3 wrote rows with column `a`; node 1
    // renamed `a` to `r1`, node 2 renamed `r1` to `r2`; node 3 missed both (it fell behind
    // the stream's retention) and restored node 2's snapshot over its own rows.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.settle();
    c.exec(
        2,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'va');",
    );
    c.capture(2);
    c.settle();
    c.exec(0, "ALTER TABLE books RENAME COLUMN a TO r1;");
    c.capture(0);
    c.apply(0);
    c.apply(1);
    // (An application connection reads the table first: its cached schema predates `r1`.)
    c.dump(1, "books");
    c.exec(1, "ALTER TABLE books RENAME COLUMN r1 TO r2;");
    c.capture(1);
    c.apply(0);
    c.apply(1);
    let fates = |c: &Cluster, i: usize| -> Vec<String> {
        c.nodes[i]
            .app
            .prepare("SELECT col || '>' || ifnull(renamed_to, '-') FROM \"__marmot__column_fates\" WHERE tbl = 'books' ORDER BY 1")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(fates(&c, 1), vec!["a>r1", "r1>r2"], "node 2's history");
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    let n = &mut c.nodes[2];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = rep.position;
    c.settle();
    assert_same_schema(&c);
    let r2: String = scalar(&c, 2, "SELECT r2 FROM books WHERE id = 1");
    assert_eq!(
        r2, "va",
        "the column renamed twice elsewhere kept its value"
    );
    assert_eq!(c.dump(0, "books"), c.dump(2, "books"));
    assert_eq!(parked(&c, 0) + parked(&c, 1) + parked(&c, 2), 0);
    assert_no_echo(&mut c);
}

#[test]
fn a_losing_drops_column_fact_does_not_turn_a_later_rename_into_a_drop() {
    // Found by the simulation (V4, seed 251): node 2 dropped column `a` while node 3 changed
    // the table too; node 3's change won, so `a` stayed. Node 3 still learned the loser's
    // fact "`a` dropped" (rows in node 2's losing shape need it). When node 1 later renamed
    // `a`, node 3 followed the stale fact instead of the rename, and `a`'s values became
    // the default there for rows written in the old shape that arrived after the rename
    // (node 4's, written before it read the rename).
    let mut c = Cluster::new(4, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.settle();
    c.exec(
        2,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'va');",
    );
    c.capture(2);
    c.settle();
    c.dump(1, "books");
    c.exec(1, "ALTER TABLE books DROP COLUMN a;");
    c.capture(1);
    c.dump(2, "books");
    c.exec(2, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
    c.capture(2);
    c.settle();
    assert_same_schema(&c);
    let has_a: i64 = scalar(
        &c,
        0,
        "SELECT count(*) FROM pragma_table_info('books') WHERE name = 'a'",
    );
    assert_eq!(has_a, 1, "node 3's change won: `a` stays");
    c.dump(0, "books");
    c.exec(0, "ALTER TABLE books RENAME COLUMN a TO r;");
    c.capture(0);
    for i in 0..3 {
        c.apply(i);
    }
    c.dump(3, "books");
    c.exec(
        3,
        "INSERT INTO books (id, title, a) VALUES (2, 'Persuasion', 'va');",
    );
    c.capture(3);
    c.settle();
    assert_same_schema(&c);
    for i in 0..4 {
        let r: String = scalar(
            &c,
            i,
            "SELECT group_concat(r) FROM books WHERE id IN (1, 2)",
        );
        assert_eq!(
            r,
            "va,va",
            "node {} kept the renamed column's values",
            i + 1
        );
    }
    for i in 1..4 {
        assert_eq!(c.dump(0, "books"), c.dump(i, "books"));
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_merge_restore_that_keeps_a_newer_shape_leaves_its_rows_values_everywhere() {
    // Found by the simulation (V4, seed 346): node 3 renamed a column and wrote rows, then
    // fell behind; meanwhile node 1 dropped that column, later than the rename. Node 3
    // restored a snapshot with node 1's shape, kept its own (its next change was newer
    // still) and published everything it held. Elsewhere the rename lost to node 1's drop,
    // so node 3's rows applied without the renamed column; node 3's next change then won
    // there and brought the column back with its default. Nodes now keep the values they
    // leave out of rows and fill a column that comes back from them. (Publishing node 3's
    // rows again after the restore also fixed this, but wrote stale rows over newer writes
    // node 3 had not read yet: V4 seed 3266.)
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.settle();
    c.exec(
        2,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'x');",
    );
    c.capture(2);
    c.settle();
    // Node 3's messages wait in `held` (its publishes are late).
    let mut held = Vec::new();
    let hold = |c: &mut Cluster, held: &mut Vec<Delivery>, from: usize| {
        held.extend(c.stream.drain(from..));
    };
    c.dump(2, "books");
    c.exec(2, "ALTER TABLE books RENAME COLUMN a TO r;");
    let from = c.stream.len();
    c.capture(2);
    hold(&mut c, &mut held, from);
    c.dump(0, "books");
    c.exec(0, "ALTER TABLE books DROP COLUMN a;");
    c.capture(0);
    c.apply(0);
    c.apply(1);
    let from = c.stream.len();
    c.exec(2, "UPDATE books SET r = 'v' WHERE id = 1;");
    c.capture(2);
    c.exec(2, "ALTER TABLE books ADD COLUMN e TEXT DEFAULT 'de';");
    c.capture(2);
    hold(&mut c, &mut held, from);
    // Node 3 restores node 1's snapshot, keeping its newer shape and its unpublished writes.
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[0].path.clone());
    let n = &mut c.nodes[2];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = rep.position;
    c.wall += 20;
    for mut d in held {
        d.stream_seq = c.stream.len() as u64 + 1;
        c.stream.push(d);
    }
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        let r: String = scalar(&c, i, "SELECT r FROM books WHERE id = 1");
        assert_eq!(r, "v", "node {} has the renamed column's value", i + 1);
    }
    assert_eq!(c.dump(0, "books"), c.dump(2, "books"));
    assert_eq!(c.dump(1, "books"), c.dump(2, "books"));
    assert_no_echo(&mut c);
}

#[test]
fn rows_written_with_a_column_one_change_dropped_and_another_renamed_keep_their_values() {
    // Found by the simulation (V4, seed 341): node 3 dropped column `a` (in a rebuild) while
    // node 1 renamed it, later; node 4's rows written with `a` reached node 2 while the drop
    // still won there, so their values were left out, and node 1's rename then brought the
    // column back with its default. Node 2 now keeps the values it leaves out and fills the
    // renamed column from them (through the column history) when it comes back.
    let mut c = Cluster::new(4, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.settle();
    for i in 0..4 {
        c.dump(i, "books");
    }
    c.exec(2, "ALTER TABLE books DROP COLUMN a;");
    c.capture(2);
    c.exec(0, "ALTER TABLE books RENAME COLUMN a TO r;");
    let from = c.stream.len();
    c.capture(0);
    let rename: Vec<Delivery> = c.stream.drain(from..).collect();
    c.exec(
        3,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'x');",
    );
    c.capture(3);
    for mut d in rename {
        d.stream_seq = c.stream.len() as u64 + 1;
        c.stream.push(d);
    }
    c.settle();
    assert_same_schema(&c);
    for i in 0..4 {
        let r: String = scalar(&c, i, "SELECT r FROM books WHERE id = 1");
        assert_eq!(
            r,
            "x",
            "node {} has the value written with the column",
            i + 1
        );
    }
    for i in 1..4 {
        assert_eq!(c.dump(0, "books"), c.dump(i, "books"));
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn rows_in_a_shape_their_node_superseded_itself_apply_without_its_lost_column() {
    // Found by the simulation (V4, seed 1540): node 1 added column `a` and wrote a row with
    // it; before it published them, node 2's concurrent change won there (`a` went), and
    // node 1 changed the table again. Node 3 met node 1's later change first, then the
    // addition (an older change of the same node: no conflict) and the row, which parked
    // forever on an unknown column `a`. The addition's columns that the node's later shape
    // lacks are now left out of such rows, as a losing change's are.
    let mut c = Cluster::new(3, SCHEMA);
    for i in 0..3 {
        c.dump(i, "books");
    }
    let held_from = c.stream.len();
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.exec(
        0,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'x');",
    );
    c.capture(0);
    let held: Vec<Delivery> = c.stream.drain(held_from..).collect();
    c.exec(1, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
    c.capture(1);
    c.apply(0);
    c.dump(0, "books");
    c.exec(0, "ALTER TABLE books ADD COLUMN e TEXT DEFAULT 'de';");
    c.capture(0);
    for mut d in held {
        d.stream_seq = c.stream.len() as u64 + 1;
        c.stream.push(d);
    }
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        assert_eq!(parked(&c, i), 0, "node {} parked nothing", i + 1);
        assert_eq!(c.dump(0, "books"), c.dump(i, "books"));
    }
    let title: String = scalar(&c, 2, "SELECT title FROM books WHERE id = 1");
    assert_eq!(title, "Emma");
    assert_no_echo(&mut c);
}

#[test]
fn a_column_that_comes_back_takes_the_values_its_rows_winning_writes_carried() {
    // Found by the simulation (V4, seeds 635, 1174, 1481): a column dropped by one change and
    // kept by a later, concurrent one. A node that met the drop first lost the column's
    // values; when the later change won there, the column came back with its default, while
    // nodes that met the rows after it kept their values. The publication that repairs this
    // (the winner's rows again) could be outrun by a version stamped later. A node now keeps
    // the values a replicated change removes, with their rows' versions, and a column that
    // comes back takes them where the row's current version wrote them.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.settle();
    c.exec(
        0,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'x'), (2, 'Persuasion', 'x');",
    );
    c.capture(0);
    c.settle();
    for i in 0..3 {
        c.dump(i, "books");
    }
    c.exec(1, "ALTER TABLE books DROP COLUMN a;");
    c.capture(1);
    // Row 2 is written again with `a` by node 1, which has not met the drop: node 3 meets
    // that write after the drop (its value is left out there).
    c.exec(0, "UPDATE books SET a = 'y' WHERE id = 2;");
    c.capture(0);
    c.exec(0, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
    c.capture(0);
    // Node 3 meets the drop, then node 1's later change (it wins): `a` comes back.
    c.apply(2);
    let a: String = scalar(
        &c,
        2,
        "SELECT group_concat(a) FROM books WHERE id IN (1, 2)",
    );
    assert_eq!(
        a, "x,y",
        "the column came back with the values the rows' winning writes carried"
    );
    c.settle();
    assert_same_schema(&c);
    for i in 1..3 {
        assert_eq!(c.dump(0, "books"), c.dump(i, "books"));
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
    // The kept values go once the change that removed them is older than the tombstone
    // horizon (a snapshot collects them), not before.
    let kept = |c: &Cluster| -> i64 {
        c.nodes[2]
            .app
            .query_row("SELECT count(*) FROM __marmot__kept_values", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    assert!(kept(&c) > 0);
    let ttl = std::time::Duration::from_secs(3600);
    let dir = marmot_sqlite::snapshot::SnapshotDir::new(&c.nodes[2].path, ttl);
    let local = dir.create(c.wall + 1_000).unwrap();
    marmot_sqlite::snapshot::SnapshotDir::discard(&local.path);
    assert!(kept(&c) > 0, "kept within the horizon");
    let local = dir.create(c.wall + 2 * 3_600_000).unwrap();
    marmot_sqlite::snapshot::SnapshotDir::discard(&local.path);
    assert_eq!(kept(&c), 0, "collected past the horizon");
}

#[test]
fn a_column_renamed_here_by_a_losing_change_and_then_dropped_comes_back_with_its_values() {
    // Found by the simulation (V4, seed 1423): node 3 renamed `a` to `y`, node 2 then dropped
    // `y`, and node 1, which had neither, changed the table later (its lineage wins): `a`
    // comes back. On node 3 the values `y` held were `a`'s: the column that comes back takes
    // them, through the history of the name it had here.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.settle();
    c.exec(
        0,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'x');",
    );
    c.capture(0);
    c.settle();
    for i in 0..3 {
        c.dump(i, "books");
    }
    c.exec(2, "ALTER TABLE books RENAME COLUMN a TO y;");
    c.capture(2);
    c.apply(1);
    c.dump(1, "books");
    c.exec(1, "ALTER TABLE books DROP COLUMN y;");
    c.capture(1);
    c.exec(0, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
    c.capture(0);
    c.apply(2);
    let a: String = scalar(&c, 2, "SELECT a FROM books WHERE id = 1");
    assert_eq!(a, "x", "`a` came back on node 3 with the values `y` held");
    c.settle();
    assert_same_schema(&c);
    for i in 1..3 {
        assert_eq!(c.dump(0, "books"), c.dump(i, "books"));
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn the_node_whose_rename_lost_moves_its_own_rows_written_under_the_new_name_back() {
    // The shape of V4 seed 917085: node 2 renamed `a` to `r` and wrote a row in that shape;
    // node 3, which had not met the rename, dropped `a`; node 1, which had met neither,
    // changed the table later (its lineage wins: `a` stays). Every node must hold the row's
    // value in `a`, whatever order node 2 meets the others' changes in through the stream.
    // (In the seed, node 2 met node 1's shape through a merge restore: the next test.)
    for order in 0..3 {
        let mut c = Cluster::new(3, SCHEMA);
        c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
        c.capture(0);
        c.exec(
            0,
            "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'x');",
        );
        c.capture(0);
        c.settle();
        for i in 0..3 {
            c.dump(i, "books");
        }
        c.exec(1, "ALTER TABLE books RENAME COLUMN a TO r;");
        c.capture(1);
        c.exec(
            1,
            "INSERT INTO books (id, title, r) VALUES (2, 'Persuasion', 'v');",
        );
        c.capture(1);
        c.exec(2, "ALTER TABLE books DROP COLUMN a;");
        c.capture(2);
        c.exec(0, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
        c.capture(0);
        // Node 2 meets the others' changes in several orders.
        match order {
            0 => {
                c.apply(1);
            }
            1 => {
                c.apply(0);
                c.apply(2);
                c.apply(1);
            }
            _ => {
                c.apply(2);
                c.apply(1);
                c.apply(0);
            }
        }
        c.settle();
        assert_same_schema(&c);
        for i in 0..3 {
            let a: String = scalar(&c, i, "SELECT a FROM books WHERE id = 2");
            assert_eq!(a, "v", "order {order}, node {}", i + 1);
            assert_eq!(parked(&c, i), 0);
        }
        for i in 1..3 {
            assert_eq!(c.dump(0, "books"), c.dump(i, "books"), "order {order}");
        }
        assert_no_echo(&mut c);
    }
}

#[test]
fn a_column_renamed_in_one_lineage_and_dropped_in_another_comes_back_with_its_values() {
    // Found by the simulation (V4, seed 800685): node 1 renamed `a` to `r`; node 2, which had
    // not met the rename, dropped `a`; node 3, which had met neither, changed the table later
    // (its lineage wins: `a` comes back). Node 4 wrote `a` before it met any of them, then met
    // the rename (its value moved to `r`) and the drop (kept under `r`). The drop's fact about
    // `a` replaced the rename's, so when `a` came back nothing led from `a` to `r`, and the
    // row took `a`'s default there while the other nodes held the value. Every rename a node
    // learns is now remembered, whatever fact wins.
    let mut c = Cluster::new(4, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.settle();
    c.exec(
        0,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'x');",
    );
    c.capture(0);
    c.settle();
    for i in 0..4 {
        c.dump(i, "books");
    }
    c.exec(0, "ALTER TABLE books RENAME COLUMN a TO r;");
    c.capture(0);
    c.exec(1, "ALTER TABLE books DROP COLUMN a;");
    c.capture(1);
    c.exec(2, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
    c.capture(2);
    // Node 3 meets the losing changes and publishes its rows again; node 4's write is later.
    c.apply(2);
    c.capture(2);
    c.exec(3, "UPDATE books SET a = 'y' WHERE id = 1;");
    c.capture(3);
    c.apply(3);
    let a: String = scalar(&c, 3, "SELECT a FROM books WHERE id = 1");
    assert_eq!(
        a, "y",
        "`a` came back on node 4 with the value it held under `r`"
    );
    c.settle();
    assert_same_schema(&c);
    for i in 0..4 {
        let a: String = scalar(&c, i, "SELECT a FROM books WHERE id = 1");
        assert_eq!(a, "y", "node {}", i + 1);
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_merge_restore_brings_back_a_column_this_node_renamed_with_the_values_it_kept() {
    // Found by the simulation (V4, seed 917085 on ba68fe1): node 2 renamed `a` to `r` and
    // wrote a row in that shape; node 3, which had not met the rename, dropped `a`, and node
    // 2 applied that drop (its `r` went, the values kept). Node 1, which had met neither,
    // changed the table later (its lineage wins: `a` stays), and node 2 merge-restored node
    // 1's snapshot. The merge saw `a` as a column new to node 2 (its own shape had no `a`),
    // so the history forgot `a -> r`, and the row kept its value aside while every other
    // node held it in `a`.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.exec(
        0,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'x');",
    );
    c.capture(0);
    c.settle();
    for i in 0..3 {
        c.dump(i, "books");
    }
    c.exec(1, "ALTER TABLE books RENAME COLUMN a TO r;");
    c.capture(1);
    c.exec(2, "ALTER TABLE books DROP COLUMN a;");
    c.capture(2);
    // Node 2 writes in its shape; the write is captured as node 2 applies the drop.
    c.exec(
        1,
        "INSERT INTO books (id, title, r) VALUES (2, 'Persuasion', 'v');",
    );
    c.apply(1);
    c.dump(1, "books");
    c.exec(0, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
    c.capture(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[0].path.clone());
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = n.applied.max(rep.position);
    let a: String = scalar(&c, 1, "SELECT a FROM books WHERE id = 2");
    assert_eq!(
        a, "v",
        "`a` came back on node 2 with the value its row kept under `r`"
    );
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        let a: String = scalar(&c, i, "SELECT a FROM books WHERE id = 2");
        assert_eq!(a, "v", "node {}", i + 1);
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_merge_restore_fills_a_column_the_snapshot_dropped_from_its_kept_values() {
    // Found by the simulation (V4, seed 800467): node 1 dropped `a`; node 3, which had not met
    // the drop, wrote `a`, and node 1 kept that value (the column was gone there). Node 2,
    // which had met neither, changed the table later (its lineage wins, `a` stays), then fell
    // behind and merge-restored node 1's snapshot: the merged row took `a`'s default, while
    // the other nodes held node 3's value. A merge restore now takes the snapshot's kept
    // values, as the stream path would have carried them.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.settle();
    c.exec(
        0,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'x');",
    );
    c.capture(0);
    c.settle();
    for i in 0..3 {
        c.dump(i, "books");
    }
    c.exec(0, "ALTER TABLE books DROP COLUMN a;");
    c.capture(0);
    c.exec(2, "UPDATE books SET a = 'y' WHERE id = 1;");
    c.capture(2);
    c.apply(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    c.exec(1, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
    c.capture(1);
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = rep.position;
    let a: String = scalar(&c, 1, "SELECT a FROM books WHERE id = 1");
    assert_eq!(a, "y", "the merged row took the value its write carried");
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        let a: String = scalar(&c, i, "SELECT a FROM books WHERE id = 1");
        assert_eq!(a, "y", "node {}", i + 1);
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_name_reused_after_a_rename_does_not_take_the_renamed_columns_values() {
    // From a review of the renames kept for kept values: `a` renamed to `r`, then a new `a`
    // added. A losing change drops both, a later one keeps both: each must come back with its
    // own values, not `a` with `r`'s (the rename of the earlier `a` is stale once the name is
    // used again).
    let mut c = Cluster::new(4, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'da';");
    c.capture(0);
    c.settle();
    c.exec(
        0,
        "INSERT INTO books (id, title, a) VALUES (1, 'Emma', 'x');",
    );
    c.capture(0);
    c.settle();
    c.dump(0, "books");
    c.exec(0, "ALTER TABLE books RENAME COLUMN a TO r;");
    c.capture(0);
    c.exec(0, "ALTER TABLE books ADD COLUMN a TEXT DEFAULT 'new';");
    c.capture(0);
    c.exec(0, "UPDATE books SET a = 'fresh' WHERE id = 1;");
    c.capture(0);
    c.settle();
    for i in 0..4 {
        c.dump(i, "books");
    }
    c.exec(
        1,
        "ALTER TABLE books DROP COLUMN r; ALTER TABLE books DROP COLUMN a;",
    );
    c.capture(1);
    c.exec(2, "ALTER TABLE books ADD COLUMN b TEXT DEFAULT 'db';");
    c.capture(2);
    // Node 4 meets the drop (it keeps both columns' values), then the later change.
    c.apply(3);
    let (a, r): (String, String) = c.nodes[3]
        .app
        .query_row("SELECT a, r FROM books WHERE id = 1", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .unwrap();
    assert_eq!(
        (a.as_str(), r.as_str()),
        ("fresh", "x"),
        "each came back with its own values"
    );
    c.settle();
    assert_same_schema(&c);
    for i in 1..4 {
        assert_eq!(c.dump(0, "books"), c.dump(i, "books"));
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_merge_restore_does_not_fill_a_column_added_again_with_the_dropped_ones_values() {
    // From a review of the merge's kept values: `c` dropped (the drop won; nodes keep its
    // values until the horizon), then added again as a new column. A node that met both
    // merge-restores a snapshot taken between them: rows the merge does not replace keep
    // their values, and the new column never takes the dropped one's.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN c TEXT DEFAULT 'dc';");
    c.capture(0);
    c.settle();
    c.exec(
        0,
        "INSERT INTO books (id, title, c) VALUES (1, 'Emma', 'old');",
    );
    c.capture(0);
    c.settle();
    for i in 0..3 {
        c.dump(i, "books");
    }
    c.exec(2, "ALTER TABLE books DROP COLUMN c;");
    c.capture(2);
    c.apply(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    c.dump(2, "books");
    c.exec(2, "ALTER TABLE books ADD COLUMN c TEXT DEFAULT 'fresh';");
    c.capture(2);
    c.apply(1);
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = n.applied.max(rep.position);
    let v: String = scalar(&c, 1, "SELECT c FROM books WHERE id = 1");
    assert_eq!(v, "fresh", "the new column kept its default");
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        let v: String = scalar(&c, i, "SELECT c FROM books WHERE id = 1");
        assert_eq!(v, "fresh", "node {}", i + 1);
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_merge_restore_that_learns_a_drop_keeps_the_new_lifes_column_history() {
    // From a review of the snapshot's column history: a merge restore imported the
    // snapshot's column facts, then learned the snapshot's drop of the table, which cleared
    // the history, the new life's included. Rows written in the new life's older shape then
    // parked on an unknown column. The facts now come after the drops, for the life the
    // snapshot knows.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "CREATE TABLE x (k INTEGER PRIMARY KEY, z INTEGER);");
    c.capture(0);
    c.settle();
    c.exec(0, "DROP TABLE x;");
    c.capture(0);
    c.exec(0, "CREATE TABLE x (k INTEGER PRIMARY KEY, a TEXT);");
    c.capture(0);
    c.apply(2);
    c.dump(2, "x");
    c.exec(0, "ALTER TABLE x RENAME COLUMN a TO b;");
    c.capture(0);
    c.apply(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    // Node 3 writes in the new life's first shape, after the snapshot's position.
    c.exec(2, "INSERT INTO x (k, a) VALUES (1, 'v');");
    c.capture(2);
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = rep.position;
    c.apply(1);
    assert_eq!(
        parked(&c, 1),
        0,
        "the row applied through the new life's history"
    );
    let b: String = scalar(&c, 1, "SELECT b FROM x WHERE k = 1");
    assert_eq!(b, "v");
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        assert_eq!(c.dump(0, "x"), c.dump(i, "x"));
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_merge_restore_does_not_bring_back_rows_of_a_life_a_drop_known_here_ended() {
    // From a review of merge restores: this node met a drop of `x` and its creation again; it
    // then merge-restored a snapshot taken before the drop. The merge inserted the snapshot's
    // rows of the ended life whose keys the new life lacks, which every other node had dropped.
    // A table whose life the snapshot did not see end is now left out of the merge.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(
        0,
        "CREATE TABLE x (k INTEGER PRIMARY KEY, v TEXT); INSERT INTO x VALUES (1, 'a');",
    );
    c.capture(0);
    c.settle();
    c.exec(0, "INSERT INTO x VALUES (2, 'b');");
    c.capture(0);
    c.apply(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    c.apply(2);
    c.exec(2, "DROP TABLE x;");
    c.capture(2);
    c.exec(2, "CREATE TABLE x (k INTEGER PRIMARY KEY, v TEXT);");
    c.capture(2);
    c.apply(1);
    assert!(c.dump(1, "x").is_empty());
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = n.applied.max(rep.position);
    assert!(
        c.dump(1, "x").is_empty(),
        "no row of the ended life came back"
    );
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        assert!(c.dump(i, "x").is_empty(), "node {}", i + 1);
        assert_eq!(parked(&c, i), 0);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_merge_restore_removes_rows_of_a_table_life_a_drop_ended() {
    // Found by the simulation (V4, seed 1943): node 2 missed node 1's drop and creation of
    // `x` (it fell behind the stream) and wrote rows in its old `x` meanwhile, stamped after
    // the drop. It restored node 1's snapshot: the creation looked the same as its own table,
    // and the merge kept its old rows (a dropped table leaves no tombstones), which every other
    // node skips. A merge restore now removes the rows of a life a drop it learns of ended.
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "CREATE TABLE x (k INTEGER PRIMARY KEY, v TEXT); INSERT INTO x VALUES (1, 'a');",
    );
    c.settle();
    c.exec(0, "DROP TABLE x;");
    c.capture(0);
    c.exec(0, "CREATE TABLE x (k INTEGER PRIMARY KEY, v TEXT);");
    c.capture(0);
    c.exec(0, "INSERT INTO x VALUES (3, 'new life');");
    c.capture(0);
    c.apply(0);
    c.exec(1, "INSERT INTO x VALUES (2, 'old life');");
    c.capture(1);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = rep.position;
    assert_eq!(c.dump(1, "x"), vec!["(3, 'new life')"]);
    c.settle();
    assert_same_schema(&c);
    assert_eq!(c.dump(0, "x"), vec!["(3, 'new life')"]);
    assert_eq!(c.dump(1, "x"), c.dump(0, "x"));
    assert_eq!(parked(&c, 0) + parked(&c, 1), 0);
    assert_no_echo(&mut c);
}

#[test]
fn a_column_dropped_and_added_again_under_its_name_starts_empty_everywhere() {
    // From a review of the kept values: node 1 drops `x` (the others keep its values, in case
    // a concurrent change brings it back), then adds a new `x`. The new column is no column
    // coming back: it takes its default on every node, not the old values.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "ALTER TABLE books ADD COLUMN x TEXT DEFAULT 'dx';");
    c.capture(0);
    c.settle();
    c.exec(
        0,
        "INSERT INTO books (id, title, x) VALUES (1, 'Emma', 'old');",
    );
    c.capture(0);
    c.settle();
    c.dump(0, "books");
    c.exec(0, "ALTER TABLE books DROP COLUMN x;");
    c.capture(0);
    c.settle();
    c.dump(0, "books");
    c.exec(0, "ALTER TABLE books ADD COLUMN x TEXT DEFAULT 'new';");
    c.capture(0);
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        let x: String = scalar(&c, i, "SELECT x FROM books WHERE id = 1");
        assert_eq!(x, "new", "node {} gave the new column its default", i + 1);
    }
    assert_no_echo(&mut c);
}

#[test]
fn a_merge_restore_keeps_the_history_of_a_table_created_again_after_a_known_drop() {
    // From a review: a merge restore learns again every drop its snapshot knows; a drop known
    // already must not end the table's new life here (its column history), or rows written in
    // that life before a rename park on an unknown column.
    let mut c = Cluster::new(3, SCHEMA);
    c.exec(0, "CREATE TABLE x (k INTEGER PRIMARY KEY, a TEXT);");
    c.capture(0);
    c.settle();
    c.exec(0, "DROP TABLE x;");
    c.capture(0);
    c.exec(0, "CREATE TABLE x (k INTEGER PRIMARY KEY, a TEXT);");
    c.capture(0);
    c.settle();
    for i in 0..3 {
        c.dump(i, "x");
    }
    // Node 3 writes in the new life before the rename; its message is late.
    let from = c.stream.len();
    c.exec(2, "INSERT INTO x (k, a) VALUES (1, 'v');");
    c.capture(2);
    let late: Vec<Delivery> = c.stream.drain(from..).collect();
    c.exec(0, "ALTER TABLE x RENAME COLUMN a TO b;");
    c.capture(0);
    c.apply(0);
    c.apply(1);
    // Node 2 restores node 1's snapshot (it knows the drop already).
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = rep.position;
    for mut d in late {
        d.stream_seq = c.stream.len() as u64 + 1;
        c.stream.push(d);
    }
    c.settle();
    assert_same_schema(&c);
    for i in 0..3 {
        assert_eq!(parked(&c, i), 0, "node {} parked nothing", i + 1);
        assert_eq!(c.dump(i, "x"), vec!["(1, 'v')"]);
    }
    assert_no_echo(&mut c);
}

#[test]
fn rows_whose_column_renames_loop_leave_the_column_out_instead_of_parking_for_good() {
    // A losing rename (b -> z) and the winning shape's pairing back (z -> b), both at the
    // losing change's version, form a loop in the column history; a merge restore can bring
    // such a pair to a node whose table has neither name. Rows written in the losing shape
    // then named a column the history led nowhere but in circles: they parked as "unknown
    // column" forever. Found by the simulation (V4, seed 846161). The loop now counts as the
    // column being gone here, as a drop does: the value is left out (and kept, should a later
    // change bring the column back). The loop is written into the history directly: the
    // restore that brings it is the simulation's regression.
    let mut c = Cluster::new(2, "CREATE TABLE s (k INTEGER PRIMARY KEY, a TEXT, c TEXT);");
    c.exec(0, "INSERT INTO s VALUES (1, 'x', 'y');");
    c.settle();
    let from = c.stream.len();
    c.exec(0, "ALTER TABLE s RENAME COLUMN a TO b;");
    c.capture(0);
    c.exec(0, "UPDATE s SET b = 'new', c = 'c2';");
    c.capture(0);
    assert_eq!(c.stream.len(), from + 2);
    let mut rows = c.stream[from + 1].clone();
    rows.stream_seq = (from + 1) as u64;
    let out = {
        let n = &mut c.nodes[1];
        n.store.apply(&mut n.clock, c.wall + 1, &[rows]).unwrap()
    };
    assert_eq!(out.report.parked.len(), 1, "{:?}", out.report);
    assert!(out.report.parked[0].reason.contains("unknown column"));
    c.exec(
        1,
        "INSERT INTO \"__marmot__column_fates\" (tbl, col, renamed_to, stamp, node) \
         VALUES ('s', 'b', 'z', 1, 9), ('s', 'z', 'b', 1, 9);",
    );
    let r = {
        let n = &mut c.nodes[1];
        n.store.retry_parked(&mut n.clock, c.wall + 2, true)
    }
    .unwrap();
    assert_eq!((r.applied, r.remaining), (1, 0));
    // `a`, which the sender's row lacks (its rename has not arrived here), takes its
    // default, as any column a sender's row lacks.
    assert_eq!(c.dump(1, "s"), vec!["(1, NULL, 'c2')"]);
    let kept: String = scalar(
        &c,
        1,
        "SELECT value FROM \"__marmot__kept_values\" WHERE tbl = 's' AND col = 'b'",
    );
    assert_eq!(kept, "new");
}

#[test]
fn a_node_that_dropped_a_column_itself_gets_its_values_back_by_a_repair_when_the_drop_loses() {
    // Node 3 drops `x` itself: its application's DDL removes the values, marmot keeps none.
    // Node 2, which had not met the drop, changes the table later (its lineage wins, `x`
    // stays), and learns of node 3's drop only through a merge restore of node 1's snapshot,
    // taken after the drop and before node 2's change. When node 2's change brings `x` back
    // on node 3, node 3's rows take the default; nothing sent them again (a restore publishes
    // no rows: a copy stamped anew could write over newer writes). Node 2 now sends a repair:
    // each row at its own version, applied only where a node holds that very write, so it
    // cannot undo a newer write. Found by the simulation (V4, seed 841730).
    let mut c = Cluster::new(3, "CREATE TABLE s (k INTEGER PRIMARY KEY, a TEXT, x TEXT);");
    c.exec(0, "INSERT INTO s VALUES (1, 'a1', 'x1'), (2, 'a2', 'x2');");
    c.settle();
    let from = c.stream.len();
    c.exec(2, "ALTER TABLE s DROP COLUMN x;");
    c.capture(2);
    c.exec(1, "ALTER TABLE s ADD COLUMN y TEXT;");
    c.capture(1);
    assert_eq!(c.stream.len(), from + 2);
    // Node 1 meets the drop alone; node 2 restores its snapshot, past the drop.
    let drop_only = c.stream[..from + 1].to_vec();
    {
        let n = &mut c.nodes[0];
        let ds = drop_only[n.applied as usize..].to_vec();
        n.store.apply(&mut n.clock, c.wall + 1, &ds).unwrap();
        n.applied = (from + 1) as u64;
    }
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    assert_eq!(
        rep.position,
        (from + 1) as u64,
        "node 2 never reads the drop"
    );
    n.applied = rep.position;
    c.settle();
    assert_same_schema(&c);
    assert_eq!(
        c.dump(2, "s"),
        vec!["(1, 'a1', 'x1', NULL)", "(2, 'a2', 'x2', NULL)"],
        "node 3 got its values back"
    );
    c.assert_converged("s");
    assert_eq!(parked(&c, 0) + parked(&c, 1) + parked(&c, 2), 0);
    // A repair changes no version: nothing is published from it, and nothing moves again.
    let before = c.stream.len();
    c.settle();
    assert_eq!(c.stream.len(), before);
}

#[test]
fn a_merge_restore_that_brings_back_a_column_this_node_dropped_itself_fills_it_from_the_snapshot() {
    // Node 3 drops `x` itself: its application's DDL removes the values, marmot keeps none.
    // Node 1, which had not met the drop, changes the table later (its lineage wins, `x`
    // stays). Node 3 falls behind and merge-restores node 1's snapshot: the snapshot's schema
    // brings `x` back, and the rows both hold at the same write were left as
    // they were here, with `x`'s default. Found by the simulation (V4, seed 845962: the
    // repair node 1 sent was before the snapshot's position, so node 3 never read it).
    let mut c = Cluster::new(3, "CREATE TABLE s (k INTEGER PRIMARY KEY, a TEXT, x TEXT);");
    c.exec(0, "INSERT INTO s VALUES (1, 'a1', 'x1'), (2, 'a2', 'x2');");
    c.settle();
    c.exec(2, "ALTER TABLE s DROP COLUMN x;");
    c.capture(2);
    c.exec(0, "ALTER TABLE s ADD COLUMN y TEXT;");
    c.capture(0);
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[2].path.clone());
    let n = &mut c.nodes[2];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged);
    n.applied = rep.position;
    assert_eq!(
        c.dump(2, "s"),
        vec!["(1, 'a1', 'x1', NULL)", "(2, 'a2', 'x2', NULL)"],
        "the rows of the same writes took the snapshot's values of the column"
    );
    c.settle();
    assert_same_schema(&c);
    c.assert_converged("s");
    assert_eq!(parked(&c, 0) + parked(&c, 1) + parked(&c, 2), 0);
}

#[test]
fn rows_the_dropping_node_wrote_before_its_drop_that_arrive_late_are_repaired_too() {
    // Node 2 inserts a row, then drops `x`; its batches reach the stream in the other order.
    // Node 1, which met neither, changes the table later (its lineage wins, `x` stays), meets
    // the drop alone and answers it (its rows again, and a repair). Node 2's row arrives at
    // node 1 only after that: node 1 holds it with its `x`, node 2 lost `x` to its own DDL, and
    // nothing sent it back. Rows of the losing node written before its change that arrive
    // late now make node 1 send the table as a repair again. Found by the simulation (V4 seeds
    // 841500, 850046).
    let mut c = Cluster::new(2, "CREATE TABLE s (k INTEGER PRIMARY KEY, a TEXT, x TEXT);");
    c.exec(0, "INSERT INTO s VALUES (1, 'a1', 'x1');");
    c.settle();
    let from = c.stream.len();
    c.exec(1, "INSERT INTO s VALUES (3, 'a3', 'x3');");
    c.capture(1);
    c.exec(1, "ALTER TABLE s DROP COLUMN x;");
    c.capture(1);
    c.exec(0, "ALTER TABLE s ADD COLUMN y TEXT;");
    c.capture(0);
    assert_eq!(c.stream.len(), from + 3);
    c.stream.swap(from, from + 1);
    for (i, d) in c.stream.iter_mut().enumerate() {
        d.stream_seq = i as u64 + 1;
    }
    // Node 1 meets the drop alone first, and sends what it sends for it.
    let first = c.stream[..from + 1].to_vec();
    {
        let n = &mut c.nodes[0];
        let ds = first[n.applied as usize..].to_vec();
        let out = n.store.apply(&mut n.clock, c.wall + 1, &ds).unwrap();
        assert!(out.report.parked.is_empty(), "{:?}", out.report);
        n.applied = (from + 1) as u64;
    }
    c.capture(0);
    c.settle();
    assert_eq!(parked(&c, 0) + parked(&c, 1), 0);
    assert_eq!(
        c.dump(1, "s"),
        vec!["(1, 'a1', 'x1', NULL)", "(3, 'a3', 'x3', NULL)"]
    );
    c.assert_converged("s");
}

#[test]
fn a_node_that_captured_only_a_schema_change_merges_a_snapshot_instead_of_taking_it_whole() {
    // Node 2 adds a column (no rows) and publishes the change; then it takes a snapshot of
    // node 1, which has not met the change. Its database had no rows and no row versions, so it
    // counted as empty and took the snapshot whole: the snapshot's older shape replaced its
    // own change, which won everywhere else, and the stream never gives a node its own batches
    // back. Found by the simulation (V4, seed 870112). A node that captured a batch now merges.
    let mut c = Cluster::new(2, "CREATE TABLE s (k INTEGER PRIMARY KEY, v TEXT);");
    c.exec(0, "INSERT INTO s VALUES (1, 'x');");
    c.capture(0);
    c.exec(1, "ALTER TABLE s ADD COLUMN w TEXT DEFAULT 'dw';");
    c.capture(1);
    // Published: its outbox is empty.
    c.exec(1, "DELETE FROM \"__marmot__outbox\";");
    let staged = super::snapshots::snapshot_of(&c, &c.nodes[1].path.clone());
    let n = &mut c.nodes[1];
    let rep = n.store.restore(&mut n.clock, c.wall + 10, &staged).unwrap();
    assert!(rep.merged, "a node that captured a change merges");
    n.applied = rep.position;
    let w: i64 = scalar(
        &c,
        1,
        "SELECT count(*) FROM pragma_table_info('s') WHERE name = 'w'",
    );
    assert_eq!(w, 1, "its own change stays");
    c.settle();
    assert_same_schema(&c);
    c.assert_converged("s");
    assert_eq!(c.dump(1, "s"), vec!["(1, 'x', 'dw')"]);
}

#[test]
fn a_row_naming_a_column_a_losing_drop_named_takes_the_column_its_renames_lead_to() {
    // Node 1 writes `a`, then renames it to `b`; node 2, which had not met the rename, drops
    // `a` (later, so its fact about `a` is the newer one); node 1 changes the table again,
    // later still: its lineage wins and `b` stays. Node 1's write reaches node 3 last. Its
    // column `a` has "dropped" as its newest fact there, so the value was left out, while
    // node 1 holds it in `b`. A name whose newest fact is a drop while the renames lead to a
    // column the table has now puts the value there. Found by the simulation (V4, seed 880038).
    let mut c = Cluster::new(3, "CREATE TABLE s (k INTEGER PRIMARY KEY, a TEXT);");
    c.exec(0, "INSERT INTO s VALUES (1, 'x');");
    c.settle();
    let from = c.stream.len();
    c.exec(0, "UPDATE s SET a = 'new' WHERE k = 1;");
    c.capture(0);
    c.exec(0, "ALTER TABLE s RENAME COLUMN a TO b;");
    c.capture(0);
    c.exec(1, "ALTER TABLE s DROP COLUMN a;");
    c.capture(1);
    c.exec(0, "ALTER TABLE s ADD COLUMN c TEXT;");
    c.capture(0);
    assert_eq!(c.stream.len(), from + 4);
    // The write last.
    let write = c.stream.remove(from);
    c.stream.push(write);
    for (i, d) in c.stream.iter_mut().enumerate() {
        d.stream_seq = i as u64 + 1;
    }
    c.apply(2);
    assert_eq!(c.dump(2, "s"), vec!["(1, 'new', NULL)"]);
    c.settle();
    assert_same_schema(&c);
    c.assert_converged("s");
    assert_eq!(parked(&c, 0) + parked(&c, 1) + parked(&c, 2), 0);
}
