//! What real applications' schemas and tools do, the way a user hits it: three nodes, writes
//! with the `sqlite3` shell (and `sqlite-utils`), full table contents compared across nodes,
//! and nothing parked anywhere.

use super::*;

/// Three nodes on one external nats-server, with `schema` on each.
fn three(dir: &Path, schema: &str) -> (Nats, Vec<Node>) {
    cluster(dir, 3, schema, "")
}

/// Waits until every node holds the same rows, then checks that no node parked anything.
fn converged_and_nothing_parked(nodes: &[Node]) -> Vec<String> {
    let content = wait_converged(&refs(nodes), CONVERGE);
    for n in nodes {
        assert_eq!(
            n.sql("SELECT count(*) FROM __marmot__parked"),
            "0",
            "node {} parked: {}",
            n.id,
            String::from_utf8_lossy(&n.command(&["parked", "list"]).stdout)
        );
    }
    content
}

#[test]
fn unique_values_swapped_and_shifted_in_one_transaction_replicate() {
    let dir = tempfile::tempdir().unwrap();
    let schema = "CREATE TABLE Members (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, position INTEGER NOT NULL UNIQUE);";
    let (_nats, nodes) = three(dir.path(), schema);
    nodes[0].sql(
        "INSERT INTO Members VALUES (1, 'ann@x', 1), (2, 'bob@x', 2), (3, 'cy@x', 3), (4, 'di@x', 4);",
    );
    converged_and_nothing_parked(&nodes);
    // Two members swap e-mails through a temporary value.
    nodes[1].sql(
        "BEGIN; UPDATE Members SET email = 'tmp' WHERE id = 1; UPDATE Members SET email = 'ann@x' WHERE id = 2; \
         UPDATE Members SET email = 'bob@x' WHERE id = 1; COMMIT;",
    );
    // Node 3 renumbers once it holds the swap (the two transactions touch the same rows:
    // run concurrently, the later one wins each row whole, which is last-writer-wins, not
    // what this test is about).
    converged_and_nothing_parked(&nodes);
    // The first position goes, the others move up (as a list that renumbers does).
    nodes[2].sql(
        "BEGIN; DELETE FROM Members WHERE position = 1; \
         UPDATE Members SET position = -position; UPDATE Members SET position = -position - 1; COMMIT;",
    );
    let content = converged_and_nothing_parked(&nodes);
    assert_eq!(
        content,
        vec![
            "Members: (2, 'ann@x', 1)",
            "Members: (3, 'cy@x', 2)",
            "Members: (4, 'di@x', 3)"
        ],
        "(member 1 went with the first position)"
    );
}

#[test]
fn a_key_collated_on_the_primary_key_clause_is_one_key_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let schema = "CREATE TABLE Tags (name TEXT, uses INTEGER, PRIMARY KEY (name COLLATE NOCASE));";
    let (_nats, nodes) = three(dir.path(), schema);
    nodes[0].sql("INSERT INTO Tags VALUES ('rust', 1);");
    converged_and_nothing_parked(&nodes);
    // The same key respelt: an update, not a delete.
    nodes[0].sql("UPDATE Tags SET name = 'Rust', uses = 2 WHERE name = 'rust';");
    let content = converged_and_nothing_parked(&nodes);
    assert_eq!(content, vec!["Tags: ('Rust', 2)"]);
    nodes[2].sql("UPDATE Tags SET uses = 3 WHERE name = 'RUST' COLLATE NOCASE;");
    let content = converged_and_nothing_parked(&nodes);
    assert_eq!(content, vec!["Tags: ('Rust', 3)"]);
}

#[test]
fn strict_any_keys_keep_text_and_integer_apart_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let schema = "CREATE TABLE Settings (k ANY PRIMARY KEY, v TEXT) STRICT;";
    let (_nats, nodes) = three(dir.path(), schema);
    nodes[0].sql("INSERT INTO Settings VALUES ('7', 'text seven'), (7, 'integer seven');");
    let content = converged_and_nothing_parked(&nodes);
    assert_eq!(
        content,
        vec![
            "Settings: ('7', 'text seven')",
            "Settings: (7, 'integer seven')"
        ]
    );
    nodes[1].sql("DELETE FROM Settings WHERE k = '7';");
    let content = converged_and_nothing_parked(&nodes);
    assert_eq!(content, vec!["Settings: (7, 'integer seven')"]);
}

#[test]
fn a_table_rebuild_with_a_delete_in_the_same_transaction_replicates_the_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, nodes) = three(dir.path(), BOOKS);
    nodes[0].sql(
        "INSERT INTO Books VALUES (1, 'Dune', 'Frank Herbert', 1965), (2, 'Emma', 'Jane Austen', 1815), (3, 'Ulysses', 'James Joyce', 1922);",
    );
    converged_and_nothing_parked(&nodes);
    // SQLite's recipe for a change ALTER TABLE cannot make (here: a CHECK constraint), run
    // on one node, with a delete in the same transaction; then on the others.
    let rebuild = "CREATE TABLE Books_new (id INTEGER PRIMARY KEY, title TEXT NOT NULL, author TEXT NOT NULL, \
                   publication_year INTEGER CHECK (publication_year > 0)); \
                   INSERT INTO Books_new SELECT * FROM Books; DROP TABLE Books; ALTER TABLE Books_new RENAME TO Books;";
    nodes[0].sql(&format!(
        "BEGIN; {rebuild} DELETE FROM Books WHERE id = 2; COMMIT;"
    ));
    converged_and_nothing_parked(&nodes);
    nodes[1].sql(&format!("BEGIN; {rebuild} COMMIT;"));
    nodes[2].sql(&format!("BEGIN; {rebuild} COMMIT;"));
    let content = converged_and_nothing_parked(&nodes);
    assert_eq!(
        content,
        vec![
            "Books: (1, 'Dune', 'Frank Herbert', 1965)",
            "Books: (3, 'Ulysses', 'James Joyce', 1922)"
        ]
    );
}

/// `sqlite-utils` from PyPI (scripts/test.sh installs it).
fn sqlite_utils(args: &[&str]) {
    let out = std::process::Command::new("sqlite-utils")
        .args(args)
        .output()
        .expect("sqlite-utils is needed: pip install sqlite-utils");
    assert!(
        out.status.success(),
        "sqlite-utils {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn full_text_search_finds_replicated_rows_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    // One index as the SQLite manual writes it, one made by `sqlite-utils enable-fts
    // --create-triggers` (as Datasette users do).
    let schema = "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);
        CREATE VIRTUAL TABLE notes_fts USING fts5(body, content='notes', content_rowid='id');
        CREATE TRIGGER notes_ai AFTER INSERT ON notes BEGIN INSERT INTO notes_fts(rowid, body) VALUES (new.id, new.body); END;
        CREATE TRIGGER notes_ad AFTER DELETE ON notes BEGIN INSERT INTO notes_fts(notes_fts, rowid, body) VALUES ('delete', old.id, old.body); END;
        CREATE TRIGGER notes_au AFTER UPDATE ON notes BEGIN INSERT INTO notes_fts(notes_fts, rowid, body) VALUES ('delete', old.id, old.body);
          INSERT INTO notes_fts(rowid, body) VALUES (new.id, new.body); END;
        CREATE TABLE docs (id INTEGER PRIMARY KEY, title TEXT, body TEXT);";
    let nats = Nats::start(dir.path());
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| Node::new(dir.path(), i, schema, Some(&nats.url()), ""))
        .collect();
    for n in &nodes {
        sqlite_utils(&[
            "enable-fts",
            n.db.to_str().unwrap(),
            "docs",
            "title",
            "body",
            "--create-triggers",
        ]);
    }
    for n in &mut nodes {
        n.start();
    }
    for n in &mut nodes {
        n.wait_ready();
    }
    nodes[0].sql(
        "INSERT INTO notes VALUES (1, 'marmots whistle in the alps'), (2, 'otters hold hands');",
    );
    nodes[0].sql("INSERT INTO docs VALUES (1, 'Marmots', 'alpine rodents that hibernate');");
    nodes[1].sql("INSERT INTO docs VALUES (2, 'Beavers', 'they build dams');");
    converged_and_nothing_parked(&nodes);
    nodes[2].sql("UPDATE notes SET body = 'marmots sleep all winter' WHERE id = 1; DELETE FROM docs WHERE id = 2;");
    converged_and_nothing_parked(&nodes);
    for n in &nodes {
        assert_eq!(
            n.sql("SELECT rowid FROM notes_fts WHERE notes_fts MATCH 'winter';"),
            "1",
            "node {}",
            n.id
        );
        assert_eq!(
            n.sql("SELECT count(*) FROM notes_fts WHERE notes_fts MATCH 'whistle';"),
            "0",
            "node {}",
            n.id
        );
        assert_eq!(
            n.sql("SELECT rowid FROM docs_fts WHERE docs_fts MATCH 'hibernate';"),
            "1",
            "node {}",
            n.id
        );
        assert_eq!(
            n.sql("SELECT count(*) FROM docs_fts WHERE docs_fts MATCH 'dams';"),
            "0",
            "node {}",
            n.id
        );
        n.sql("INSERT INTO notes_fts(notes_fts, rank) VALUES ('integrity-check', 1);");
        n.sql("INSERT INTO docs_fts(docs_fts, rank) VALUES ('integrity-check', 1);");
    }
}

#[test]
fn snapshot_restore_is_refused_while_the_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, mut nodes) = cluster(dir.path(), 1, BOOKS, "");
    let (code, _, err) = marmot(&nodes[0].config, &["snapshot", "restore"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("stop the daemon first"), "{err}");
    let (code, _, err) = marmot(&nodes[0].config, &["cleanup"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("stop the daemon first"), "{err}");
    // A second daemon for the same database refuses too.
    let (code, _, err) = marmot(&nodes[0].config, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already runs"), "{err}");
    assert_eq!(nodes[0].stop(), Some(0));
    let (code, out, err) = marmot(&nodes[0].config, &["cleanup"]);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[test]
fn marmot_repair_brings_nodes_that_diverged_back_together() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, nodes) = three(dir.path(), BOOKS);
    nodes[0].sql("INSERT INTO Books VALUES (1, 'Dune', 'Frank Herbert', 1965), (2, 'Emma', 'Jane Austen', 1815);");
    converged_and_nothing_parked(&nodes);
    // Writes made behind marmot's back: the sqlite3 shell with triggers switched off.
    let behind = |n: &Node, sql: &str| {
        let out = std::process::Command::new("sqlite3")
            .args([
                "-cmd",
                ".timeout 20000",
                "-cmd",
                ".dbconfig enable_trigger off",
            ])
            .arg(&n.db)
            .arg(sql)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    behind(
        &nodes[0],
        "UPDATE Books SET publication_year = 1966 WHERE id = 1;",
    );
    behind(
        &nodes[1],
        "DELETE FROM Books WHERE id = 2; INSERT INTO Books VALUES (9, 'Stray', 'Nobody', 1);",
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(dump(&nodes[0].db), dump(&nodes[1].db), "they diverged");
    // Node 1's copy is right: repair the table from it, and delete the row only node 2 has.
    for args in [
        &["repair", "Books"][..],
        &["repair", "Books", "--key", "[9]"][..],
    ] {
        let out = nodes[0].command(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let content = converged_and_nothing_parked(&nodes);
    assert_eq!(
        content,
        vec![
            "Books: (1, 'Dune', 'Frank Herbert', 1966)",
            "Books: (2, 'Emma', 'Jane Austen', 1815)"
        ]
    );
}
