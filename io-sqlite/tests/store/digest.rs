//! Convergence digests: equal on nodes that hold the same rows, different, down to the key,
//! where a row changed behind marmot's back.

use super::*;
use marmot_sqlite::digest::{self, DataDigest};

fn digest_of(c: &Cluster, i: usize) -> DataDigest {
    let mut conn = Connection::open(&c.nodes[i].path).unwrap();
    digest::data_digest(&mut conn, None).unwrap()
}

#[test]
fn digests_agree_where_rows_agree_and_name_the_key_changed_behind_marmots_back() {
    let mut c = Cluster::new(2, SCHEMA);
    c.exec(
        0,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300) \
         INSERT INTO books (id, title, cover, price) SELECT i, 'title ' || i, randomblob(8), i / 3.0 FROM n; \
         INSERT INTO \"odd \"\"table\"\" ñame\" VALUES ('Key', 7, NULL), ('key2', 8, x'00ff');",
    );
    // Not captured yet: the digest says so.
    let d = digest_of(&c, 0);
    assert_eq!(d.uncaptured_changes, 302);
    c.capture(0);
    let d = digest_of(&c, 0);
    assert_eq!((d.uncaptured_changes, d.unpublished_batches), (0, 1));
    c.apply(1);
    let (a, b) = (digest_of(&c, 0), digest_of(&c, 1));
    assert_eq!(a.tables, b.tables);
    assert_eq!(a.tables["books"].rows, 300);
    assert_eq!(a.tables["odd \"table\" ñame"].rows, 2);
    assert_eq!(b.position, 1);
    assert!(a.comparable(&b, ("a", "b")).is_some(), "a has not applied");
    // The same value in another storage class, written behind marmot's back on node 2.
    let trigger: String = c.nodes[1]
        .app
        .query_row(
            "SELECT name || char(0) || sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'books' AND sql LIKE '%AFTER UPDATE%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let (name, sql) = trigger.split_once('\0').unwrap();
    c.exec(
        1,
        &format!(
            "BEGIN; DROP TRIGGER {}; UPDATE books SET title = 7 WHERE id = 123; {sql}; COMMIT;",
            marmot_sqlite::ddl::quote(name)
        ),
    );
    let changed = digest_of(&c, 1);
    assert_eq!(changed.uncaptured_changes, 0, "nothing captured");
    assert_ne!(changed.tables["books"], a.tables["books"]);
    assert_eq!(changed.tables["books"].rows, 300);
    assert_eq!(
        changed.tables["odd \"table\" ñame"],
        a.tables["odd \"table\" ñame"]
    );
    let buckets = |i: usize| {
        let mut conn = Connection::open(&c.nodes[i].path).unwrap();
        digest::bucket_digests(&mut conn, "books")
            .unwrap()
            .unwrap()
            .1
    };
    let (ba, bb) = (buckets(0), buckets(1));
    let differ: Vec<usize> = (0..digest::BUCKETS).filter(|&i| ba[i] != bb[i]).collect();
    assert_eq!(differ.len(), 1, "one row, one bucket");
    let keys = |i: usize| {
        let mut conn = Connection::open(&c.nodes[i].path).unwrap();
        digest::key_hashes(&mut conn, "books", &differ)
            .unwrap()
            .unwrap()
            .1
    };
    let (ka, kb) = (keys(0), keys(1));
    let different: Vec<&str> = ka
        .iter()
        .zip(&kb)
        .filter(|(x, y)| x.hash != y.hash)
        .map(|(x, _)| x.key.as_str())
        .collect();
    assert_eq!(ka.len(), kb.len());
    assert_eq!(different, vec!["(123)"]);
    let mut conn = Connection::open(&c.nodes[0].path).unwrap();
    assert!(
        digest::bucket_digests(&mut conn, "nokey")
            .unwrap()
            .is_none()
    );
    // The table's digest keeps its low 48 bits exactly as a float.
    let d48 = a.tables["books"].digest48();
    assert_eq!(d48 as f64 as u64, d48);
}
