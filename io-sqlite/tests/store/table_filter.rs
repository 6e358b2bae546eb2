//! `[tables]` include and exclude lists: an excluded table's rows and DDL stay on its node,
//! and changing the lists between runs does what the README says.

use super::*;
use marmot_sqlite::filter::TableFilter;
use marmot_sqlite::replicated::{local_objects, schema_objects};

fn exclude(patterns: &[&str]) -> TableFilter {
    TableFilter {
        include: vec![],
        exclude: patterns.iter().map(|p| p.to_string()).collect(),
    }
}

fn names(c: &Connection, sql: &str) -> Vec<String> {
    c.prepare(sql)
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn marmot_objects_of(c: &Connection, table: &str) -> Vec<String> {
    names(
        c,
        &format!(
            "SELECT name FROM sqlite_master WHERE name LIKE '__marmot__%' AND (name LIKE '%\\_\\_{table}' ESCAPE '\\' OR tbl_name = '{table}') ORDER BY name"
        ),
    )
}

/// Reopens node `i`'s store with `tables` as its lists (a restart with another configuration).
fn restart_with(c: &mut Cluster, i: usize, tables: TableFilter) {
    let path = c.nodes[i].path.clone();
    let mut cfg = StoreConfig::new(&path, i as u64 + 1, 5000 + i as u64);
    cfg.tables = tables;
    // The old store closes first.
    c.nodes[i].store = SqliteStore::open(cfg).unwrap();
}

const WITH_CACHE: &str = "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT NOT NULL);
    CREATE TABLE cache (id INTEGER PRIMARY KEY, v TEXT);";

#[test]
fn an_excluded_tables_rows_and_ddl_never_leave_its_node() {
    let mut c = Cluster::new_with(2, WITH_CACHE, |cfg| {
        cfg.tables = exclude(&["cache*", "Tmp_?"])
    });
    assert!(
        marmot_objects_of(&c.nodes[0].app, "cache").is_empty(),
        "no triggers, no state: {:?}",
        marmot_objects_of(&c.nodes[0].app, "cache")
    );
    c.exec(
        0,
        "INSERT INTO cache VALUES (1, 'local');
         CREATE INDEX cache_v ON cache (v);
         CREATE TABLE cache_2 (id INTEGER PRIMARY KEY);
         CREATE TABLE TMP_1 (id INTEGER PRIMARY KEY);
         CREATE VIEW cached AS SELECT v FROM cache;
         CREATE TRIGGER books_to_cache AFTER INSERT ON books BEGIN INSERT INTO cache (v) VALUES (new.title); END;
         INSERT INTO books VALUES (1, 'Emma');",
    );
    assert_eq!(c.capture(0), Some(1), "only the books row");
    c.settle();
    assert_eq!(c.dump(1, "books"), vec!["(1, 'Emma')"]);
    assert!(c.dump(1, "cache").is_empty());
    let on_1 = names(
        &c.nodes[1].app,
        "SELECT name FROM sqlite_master ORDER BY name",
    );
    for local in ["cache_2", "TMP_1", "cached", "books_to_cache", "cache_v"] {
        assert!(
            !on_1.contains(&local.to_string()),
            "{local} reached node 2: {on_1:?}"
        );
    }
    assert_eq!(
        schema_objects(&c.nodes[0].app).unwrap(),
        schema_objects(&c.nodes[1].app).unwrap(),
        "the replicated schemas are the same"
    );
    // Why each stays is there to read (`marmot status`).
    let why: Vec<String> = local_objects(&c.nodes[0].app)
        .unwrap()
        .into_iter()
        .map(|(kind, name, why)| format!("{kind} {name}: {why}"))
        .collect();
    assert!(
        why.contains(
            &"view cached: it names excluded table cache: receivers would not have it".to_string()
        ) && why.contains(
            &"trigger books_to_cache: it names excluded table cache: receivers would not have it"
                .to_string()
        ) && why.contains(&"index cache_v: table cache is excluded".to_string()),
        "{why:?}"
    );
    // Node 2's own rows of the table stay there too, and changes to it that arrive from a
    // node that replicates it are skipped.
    c.exec(1, "INSERT INTO cache VALUES (7, 'node 2 only');");
    assert_eq!(c.capture(1), None);
    c.settle();
    assert_eq!(c.dump(0, "cache"), vec!["(1, 'local')", "(2, 'Emma')"]);
}

#[test]
fn rows_of_a_table_a_node_excludes_are_skipped_there_not_parked() {
    let mut c = Cluster::new(2, WITH_CACHE);
    restart_with(&mut c, 1, exclude(&["cache"]));
    c.exec(
        0,
        "INSERT INTO cache VALUES (1, 'from node 1'); INSERT INTO books VALUES (1, 'Emma');",
    );
    c.settle();
    assert!(c.dump(1, "cache").is_empty());
    assert_eq!(c.dump(1, "books"), vec!["(1, 'Emma')"]);
    let parked: i64 = c.nodes[1]
        .app
        .query_row("SELECT count(*) FROM \"__marmot__parked\"", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(parked, 0);
}

#[test]
fn changing_the_lists_between_runs_removes_or_publishes_a_table() {
    let mut c = Cluster::new(2, WITH_CACHE);
    c.exec(0, "INSERT INTO cache VALUES (1, 'a'), (2, 'b');");
    c.settle();
    assert_eq!(c.dump(1, "cache").len(), 2);
    // Newly excluded: its triggers and marmot's state go, and the table stays on every node
    // (excluding it is not a drop).
    restart_with(&mut c, 0, exclude(&["cache"]));
    assert!(marmot_objects_of(&c.nodes[0].app, "cache").is_empty());
    c.exec(0, "INSERT INTO cache VALUES (3, 'local now');");
    c.settle();
    assert_eq!(c.dump(1, "cache"), vec!["(1, 'a')", "(2, 'b')"]);
    assert_eq!(c.dump(0, "cache").len(), 3);
    // Included again: published in full, as a table marmot sees for the first time.
    restart_with(&mut c, 0, TableFilter::all());
    assert_eq!(
        marmot_objects_of(&c.nodes[0].app, "cache").len(),
        5,
        "{:?}",
        marmot_objects_of(&c.nodes[0].app, "cache")
    );
    c.settle();
    assert_eq!(
        c.dump(1, "cache"),
        vec!["(1, 'a')", "(2, 'b')", "(3, 'local now')"]
    );
    assert_eq!(
        schema_objects(&c.nodes[0].app).unwrap(),
        schema_objects(&c.nodes[1].app).unwrap()
    );
}

#[test]
fn an_include_list_replicates_only_what_it_names() {
    let mut c = Cluster::new_with(2, WITH_CACHE, |cfg| {
        cfg.tables = TableFilter {
            include: vec!["b*".into()],
            exclude: vec![],
        }
    });
    c.exec(
        0,
        "INSERT INTO cache VALUES (1, 'x'); INSERT INTO books VALUES (1, 'Emma');",
    );
    c.settle();
    assert_eq!(c.dump(1, "books"), vec!["(1, 'Emma')"]);
    assert!(c.dump(1, "cache").is_empty());
}

#[test]
fn a_snapshot_leaves_excluded_tables_out_and_a_restore_keeps_the_nodes_own() {
    let mut c = Cluster::new_with(1, WITH_CACHE, |cfg| cfg.tables = exclude(&["cache"]));
    c.exec(
        0,
        "INSERT INTO books VALUES (1, 'Emma'); INSERT INTO cache VALUES (1, 'secret of node 1');
         CREATE VIEW cached AS SELECT v FROM cache;",
    );
    c.settle();
    // A new node that keeps a `cache` table of its own (excluded there too).
    let fresh = c.nodes[0].path.with_file_name("fresh.db");
    Connection::open(&fresh)
        .unwrap()
        .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE cache (id INTEGER PRIMARY KEY, v TEXT, extra TEXT); INSERT INTO cache VALUES (5, 'mine', NULL);")
        .unwrap();
    let mut cfg = StoreConfig::new(&fresh, 9, 99);
    cfg.tables = exclude(&["cache"]);
    let mut store = SqliteStore::open(cfg).unwrap();
    assert!(
        store.recover().unwrap().empty,
        "an excluded table does not count"
    );
    let staged = super::snapshots::snapshot_of(&c, &fresh);
    let bytes = std::fs::read(&staged.path).unwrap();
    assert!(
        !bytes.windows(16).any(|w| w == b"secret of node 1"),
        "the excluded table's rows are not in the snapshot, not even in free pages"
    );
    let mut clock = Clock::new(Stamp::ZERO);
    store.restore(&mut clock, c.wall, &staged).unwrap();
    let app = Connection::open(&fresh).unwrap();
    let objects = names(
        &app,
        "SELECT name FROM sqlite_master WHERE instr(name, 'marmot') = 0 ORDER BY name",
    );
    assert_eq!(
        objects,
        vec!["books", "cache"],
        "no view naming node 1's cache"
    );
    let cols: i64 = app
        .query_row("SELECT count(*) FROM pragma_table_info('cache')", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(cols, 3, "this node's own cache table, untouched");
    let mine: String = app
        .query_row("SELECT v FROM cache WHERE id = 5", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mine, "mine");
    let n: i64 = app
        .query_row("SELECT count(*) FROM books", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}
