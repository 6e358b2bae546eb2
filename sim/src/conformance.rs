//! One test body for any [`Transport`]: the behaviour marmot relies on. It runs against the
//! simulated broker (in `sim`'s tests) and against a real nats-server through io-nats, so
//! the two cannot drift apart.

use bytes::Bytes;
use futures::StreamExt;
use marmot_core::ports::{Claim, Transport};

/// Checks `t` (a fresh stream; `node` is an unused node id). Panics with what differs.
pub async fn conformance<T: Transport>(t: &T, node: u64) {
    let start = t.prepare().await.expect("prepare");
    assert_eq!(
        start.first_seq,
        start.last_seq + 1,
        "a fresh stream is empty"
    );
    let base = start.last_seq;
    for (id, body) in [("c-a", "a"), ("c-b", "b"), ("c-c", "c")] {
        t.publish(id.into(), Bytes::from(body))
            .await
            .expect("publish");
    }
    // A retry with the same id within the duplicate window is not stored again.
    t.publish("c-a".into(), Bytes::from("a again"))
        .await
        .expect("duplicate publish");
    let (bounds, mut d) = t.subscribe(base + 2).await.expect("subscribe");
    assert_eq!(
        (bounds.first_seq, bounds.last_seq),
        (base + 1, base + 3),
        "bounds"
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = d.next().await.expect("a delivery").expect("no error");
        got.push((
            m.stream_seq,
            String::from_utf8_lossy(&m.payload).to_string(),
            m.pending,
        ));
        assert!(
            m.published_ms > 1_500_000_000_000,
            "server timestamps are wall-clock ms"
        );
    }
    assert_eq!(
        got,
        vec![
            (base + 2, "b".to_string(), 1),
            (base + 3, "c".to_string(), 0)
        ],
        "in order from the start sequence, with what is pending after each"
    );
    // Messages published later reach an existing subscription.
    t.publish("c-d".into(), Bytes::from("d"))
        .await
        .expect("publish");
    let m = d.next().await.expect("a delivery").expect("no error");
    assert_eq!((m.stream_seq, &m.payload[..]), (base + 4, &b"d"[..]));
    // Node-id claims: one owner at a time, renewable by that owner.
    assert!(matches!(
        t.claim(node, "owner-x").await.expect("claim"),
        Claim::Granted { .. }
    ));
    let Claim::Granted { revision: r1, .. } = t.claim(node, "owner-x").await.expect("renew") else {
        panic!("the owner renews its claim")
    };
    assert_eq!(
        t.claim(node, "owner-y").await.expect("claim"),
        Claim::Held {
            by: "owner-x".into()
        }
    );
    // Fenced renewals: from the revision last granted only, each a new, higher revision.
    let key = format!("node-{node}");
    let r2 = t
        .renew_lease(&key, "owner-x", r1)
        .await
        .expect("renew")
        .expect("still the owner's at that revision");
    assert!(r2 > r1, "{r2} after {r1}");
    assert_eq!(
        t.renew_lease(&key, "owner-x", r1).await.expect("renew"),
        None,
        "a renewal from a revision that is not the lease's any more is refused"
    );
    t.release(&key, "owner-x").await.expect("release");
    assert_eq!(
        t.renew_lease(&key, "owner-x", r2).await.expect("renew"),
        None,
        "a lease given up (or expired) cannot be renewed"
    );
}
