use super::*;
use proptest::prelude::*;

fn batch() -> BatchId {
    BatchId {
        origin: 7,
        incarnation: 0xabc,
        seq: 42,
    }
}

fn body() -> (BodyWriter, Vec<String>) {
    let cols = vec!["id".to_string(), "name".to_string(), "data".to_string()];
    let mut w = BodyWriter::default();
    w.table("my \"table\"", &cols, 1);
    w.upsert(
        None,
        [
            ValueRef::Integer(-5),
            ValueRef::Text(b"\xff\x00ok"),
            ValueRef::Blob(&[1, 2]),
        ],
    );
    let base = Version {
        stamp: Stamp::new(99, 3),
        node: 2,
    };
    w.delete(Some(base), [ValueRef::Integer(i64::MIN)]);
    w.upsert(
        None,
        [ValueRef::Real(-0.0), ValueRef::Null, ValueRef::Text(b"")],
    );
    (w, cols)
}

#[test]
fn body_round_trips_every_storage_class() {
    let (w, _) = body();
    let mut r = BodyReader::new(w.as_bytes());
    let mut vals = Vec::new();
    let Some(Item::Table(t)) = r.next_item(&mut vals).unwrap() else {
        panic!()
    };
    assert_eq!(t.name, "my \"table\"");
    assert_eq!(t.columns, vec!["id", "name", "data"]);
    let Some(Item::Upsert { base: None }) = r.next_item(&mut vals).unwrap() else {
        panic!()
    };
    assert!(vals[0].same_as(ValueRef::Integer(-5)));
    assert!(vals[1].same_as(ValueRef::Text(b"\xff\x00ok")));
    assert!(vals[2].same_as(ValueRef::Blob(&[1, 2])));
    let Some(Item::Delete { base: Some(b) }) = r.next_item(&mut vals).unwrap() else {
        panic!()
    };
    assert_eq!(b.node, 2);
    assert!(vals[0].same_as(ValueRef::Integer(i64::MIN)));
    let Some(Item::Upsert { .. }) = r.next_item(&mut vals).unwrap() else {
        panic!()
    };
    assert!(vals[0].same_as(ValueRef::Real(-0.0)));
    assert!(r.next_item(&mut vals).unwrap().is_none());
}

#[test]
fn sealed_chunks_reassemble_to_the_body() {
    let (w, _) = body();
    for compress in [false, true] {
        let msgs = seal(
            batch(),
            Stamp::new(5, 1),
            w.format(),
            w.as_bytes(),
            compress,
            64,
        );
        let mut joined = Vec::new();
        let mut first = None;
        for (i, m) in msgs.iter().enumerate() {
            let (h, frag) = decode_message(m).unwrap();
            assert_eq!(h.chunk as usize, i);
            assert_eq!(h.chunks as usize, msgs.len());
            assert_eq!(h.batch, batch());
            first.get_or_insert(h);
            joined.extend_from_slice(frag);
        }
        let body = unseal(&first.unwrap(), Bytes::from(joined)).unwrap();
        assert_eq!(&body[..], w.as_bytes());
    }
}

#[test]
fn large_compressible_bodies_are_compressed() {
    let cols = vec!["k".to_string(), "v".to_string()];
    let mut w = BodyWriter::default();
    w.table("t", &cols, 1);
    for i in 0..1000 {
        w.upsert(
            None,
            [
                ValueRef::Integer(i),
                ValueRef::Text(b"the same text over and over"),
            ],
        );
    }
    let msgs = seal(
        batch(),
        Stamp::new(1, 0),
        w.format(),
        w.as_bytes(),
        true,
        1 << 20,
    );
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].len() < w.as_bytes().len() / 4);
    assert!(decode_message(&msgs[0]).unwrap().0.compressed);
}

#[test]
fn unknown_versions_and_garbage_are_errors_not_panics() {
    assert_eq!(
        decode_message(&[FORMAT_VERSION + 1, 0]).unwrap_err(),
        WireError::UnknownVersion {
            found: FORMAT_VERSION + 1
        }
    );
    assert_eq!(
        decode_message(&[0, 0]).unwrap_err(),
        WireError::UnknownVersion { found: 0 }
    );
    assert!(decode_message(&[]).is_err());
    assert!(decode_message(&[1, 0, 1, 1, 1, 0, 0, 0]).is_err()); // zero chunks
}

#[test]
fn schema_items_lead_the_body_and_make_it_format_2() {
    let mut rows_only = BodyWriter::default();
    rows_only.table("t", &["k".to_string()], 1);
    rows_only.upsert(None, [ValueRef::Integer(1)]);
    assert_eq!(
        rows_only.format(),
        FORMAT_ROWS,
        "rows only: every marmot reads it"
    );
    let mut w = BodyWriter::default();
    let change = SchemaItem {
        kind: ObjectKind::Table,
        name: "t",
        table: "t",
        old_sql: Some("CREATE TABLE t (k INTEGER PRIMARY KEY)"),
        new_sql: Some("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"),
    };
    let dropped = SchemaItem {
        kind: ObjectKind::Index,
        name: "i",
        table: "t",
        old_sql: Some("CREATE INDEX i ON t (k)"),
        new_sql: None,
    };
    w.schema(&change);
    w.schema(&dropped);
    w.table("t", &["k".to_string(), "v".to_string()], 1);
    w.upsert(None, [ValueRef::Integer(1), ValueRef::Text(b"x")]);
    assert_eq!(w.format(), FORMAT_SCHEMA);
    let msgs = seal(
        batch(),
        Stamp::new(1, 0),
        w.format(),
        w.as_bytes(),
        false,
        1 << 20,
    );
    let (h, frag) = decode_message(&msgs[0]).unwrap();
    assert_eq!(h.format, FORMAT_SCHEMA);
    let mut r = BodyReader::new(frag);
    let mut vals = Vec::new();
    match r.next_item(&mut vals).unwrap() {
        Some(Item::Schema(s)) => assert_eq!(s, change),
        other => panic!("{other:?}"),
    }
    match r.next_item(&mut vals).unwrap() {
        Some(Item::Schema(s)) => assert_eq!(s, dropped),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        r.next_item(&mut vals).unwrap(),
        Some(Item::Table(_))
    ));
}

proptest! {
    #[test]
    fn reading_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_message(&bytes);
        let mut r = BodyReader::new(&bytes);
        let mut vals = Vec::new();
        for _ in 0..100 {
            match r.next_item(&mut vals) { Ok(Some(_)) => {}, _ => break }
        }
    }

    /// A real message (compressed or not, one chunk or several) with bytes flipped, cut
    /// off or inserted anywhere: decoding, unsealing and reading it give errors, never a
    /// panic (random bytes alone rarely get past the header).
    #[test]
    fn corrupted_messages_never_panic(
        compress in any::<bool>(),
        rows in 1usize..40,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let cols = vec!["k".to_string(), "v".to_string()];
        let mut w = BodyWriter::default();
        w.table("t", &cols, 1);
        for i in 0..rows {
            w.upsert(
                Some(Version { stamp: Stamp::new(i as u64, 0), node: 1 }),
                [ValueRef::Integer(i as i64), ValueRef::Blob(&[7; 33])],
            );
            w.delete(None, [ValueRef::Text(b"gone")]);
        }
        let msgs = seal(batch(), Stamp::new(1, 0), w.format(), w.as_bytes(), compress, 256);
        for m in msgs {
            let mut bytes = m.to_vec();
            for (at, byte, kind) in &edits {
                if bytes.is_empty() {
                    break;
                }
                let at = at % bytes.len();
                match kind {
                    0 => bytes[at] ^= byte | 1,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, *byte),
                }
            }
            if let Ok((h, frag)) = decode_message(&bytes)
                && let Ok(body) = unseal(&h, Bytes::copy_from_slice(frag))
            {
                let mut r = BodyReader::new(&body);
                let mut vals = Vec::new();
                while let Ok(Some(_)) = r.next_item(&mut vals) {}
            }
        }
    }

    #[test]
    fn integers_round_trip(i in any::<i64>(), r in any::<f64>()) {
        let mut w = BodyWriter::default();
        w.table("t", &["a".to_string(), "b".to_string()], 1);
        w.upsert(None, [ValueRef::Integer(i), ValueRef::Real(r)]);
        let mut rd = BodyReader::new(w.as_bytes());
        let mut vals = Vec::new();
        rd.next_item(&mut vals).unwrap();
        rd.next_item(&mut vals).unwrap();
        prop_assert!(vals[0].same_as(ValueRef::Integer(i)));
        prop_assert!(vals[1].same_as(ValueRef::Real(r)));
    }
}

#[test]
fn a_versioned_table_item_carries_the_tables_schema_version_and_makes_the_body_format_2() {
    let v = Version {
        stamp: Stamp::new(1_700_000_000_000, 3),
        node: 4,
    };
    let mut w = BodyWriter::default();
    w.table_versioned("a", &["k".to_string()], 1, TableVersion::At(v));
    w.upsert(None, [ValueRef::Integer(1)]);
    w.table_versioned("b", &["k".to_string()], 1, TableVersion::ThisBatch);
    w.delete(None, [ValueRef::Integer(2)]);
    w.table("c", &["k".to_string()], 1);
    w.upsert(None, [ValueRef::Integer(3)]);
    assert_eq!(w.format(), FORMAT_SCHEMA, "earlier marmots do not read it");
    let batch_version = Version {
        stamp: Stamp::new(1_700_000_000_500, 0),
        node: 9,
    };
    let mut r = BodyReader::new(w.as_bytes());
    let mut vals = Vec::new();
    let mut seen = Vec::new();
    while let Some(item) = r.next_item(&mut vals).unwrap() {
        if let Item::Table(def) = item {
            seen.push((def.name, def.schema_version_in(batch_version)));
        }
    }
    assert_eq!(
        seen,
        vec![("a", Some(v)), ("b", Some(batch_version)), ("c", None)]
    );
}

#[test]
fn a_repair_table_item_carries_its_rows_versions_and_makes_the_body_format_3() {
    let v = Version {
        stamp: Stamp::new(1_700_000_000_000, 3),
        node: 4,
    };
    let row = Version {
        stamp: Stamp::new(1_700_000_000_100, 1),
        node: 2,
    };
    let mut w = BodyWriter::default();
    w.table("plain", &["k".to_string()], 1);
    w.upsert(None, [ValueRef::Integer(1)]);
    assert_eq!(w.format(), FORMAT_ROWS);
    w.table_repair(
        "a",
        &["k".to_string(), "v".to_string()],
        1,
        Some(TableVersion::At(v)),
    );
    w.upsert(Some(row), [ValueRef::Integer(1), ValueRef::Text(b"x")]);
    w.table_repair("b", &["k".to_string()], 1, None);
    w.upsert(Some(row), [ValueRef::Integer(2)]);
    assert_eq!(w.format(), FORMAT_REPAIR, "earlier marmots do not read it");
    let mut r = BodyReader::new(w.as_bytes());
    let mut vals = Vec::new();
    let mut seen = Vec::new();
    while let Some(item) = r.next_item(&mut vals).unwrap() {
        match item {
            Item::Table(def) => seen.push(format!(
                "{} repair={} version={:?}",
                def.name, def.repair, def.schema_version
            )),
            Item::Upsert { base } => seen.push(format!("row {:?} {:?}", base, vals[0])),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            "plain repair=false version=None".to_string(),
            "row None Integer(1)".to_string(),
            format!("a repair=true version={:?}", Some(TableVersion::At(v))),
            format!("row {:?} Integer(1)", Some(row)),
            "b repair=true version=None".to_string(),
            format!("row {:?} Integer(2)", Some(row)),
        ]
    );
}
