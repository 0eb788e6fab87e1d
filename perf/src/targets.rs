//! The proxies under test, each started and configured by the suite:
//! edgeproxy from this workspace, a direct connection (the limit), the
//! minimal compio proxy (`minimal-proxy`, edgeproxy's runtime doing nothing
//! else: the bar), HAProxy and nginx (stream module) when installed.
//!
//! Every proxy gets the same settings: `workers` worker threads/processes,
//! the same CPU set (the process is started with that affinity mask, and each
//! proxy's own per-worker pinning maps worker *i* to the *i*-th CPU of the
//! set), TCP mode, no access logging, TCP_NODELAY, a 2 s connect timeout and
//! a 300 s idle timeout. Each proxy listens three times: in front of the HTTP,
//! echo and bulk backends.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::backends::Backends;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Direct,
    Edgeproxy,
    Minimal,
    Haproxy,
    Nginx,
    /// A second HAProxy, started exactly like the first: the A/A control.
    /// What it measures against `haproxy` in a run is what the suite cannot
    /// tell apart in that run, so the goals print it beside edgeproxy's
    /// ratio. Only when asked for (`--targets …,haproxy2`).
    Haproxy2,
}

impl Kind {
    /// Every target, in the order runs take turns. The host's speed drifts
    /// over seconds, so neighbours in this order share more of it than
    /// targets further apart: the control runs two or three turns from
    /// `haproxy`, as edgeproxy runs two, not next to it, where it would
    /// agree with `haproxy` more than edgeproxy can.
    pub const ALL: [Kind; 6] = [
        Kind::Direct,
        Kind::Haproxy2,
        Kind::Edgeproxy,
        Kind::Minimal,
        Kind::Haproxy,
        Kind::Nginx,
    ];

    /// The targets of a run that names none: all but the control.
    pub const DEFAULT: [Kind; 5] = [
        Kind::Direct,
        Kind::Edgeproxy,
        Kind::Minimal,
        Kind::Haproxy,
        Kind::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Edgeproxy => "edgeproxy",
            Kind::Minimal => "minimal",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
            Kind::Haproxy2 => "haproxy2",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn is_proxy(self) -> bool {
        self != Kind::Direct
    }
}

/// How every proxy is set up.
#[derive(Clone, Debug)]
pub struct Setup {
    pub workers: usize,
    /// CPUs the proxy may run on (empty: any).
    pub cpus: Vec<usize>,
    pub edgeproxy_bin: PathBuf,
    pub minimal_bin: PathBuf,
    pub haproxy_bin: String,
    pub nginx_bin: String,
    /// Scratch space for configs and routing databases.
    pub work_dir: PathBuf,
    /// When set, every proxy also terminates TLS (scenario f) with it.
    pub tls: Option<Arc<crate::tls_material::TlsMaterial>>,
}

/// Whether a peer can run here, and its version.
pub fn availability(kind: Kind, setup: &Setup) -> Result<String, String> {
    let (bin, arg) = match kind {
        Kind::Direct => return Ok("-".into()),
        Kind::Edgeproxy => (
            setup.edgeproxy_bin.to_string_lossy().into_owned(),
            "--version",
        ),
        Kind::Minimal => {
            return if setup.minimal_bin.exists() {
                Ok("compio minimal proxy (this workspace)".into())
            } else {
                Err(format!(
                    "{} not built (cargo build --release -p perf)",
                    setup.minimal_bin.display()
                ))
            };
        }
        Kind::Haproxy | Kind::Haproxy2 => (setup.haproxy_bin.clone(), "-v"),
        Kind::Nginx => (setup.nginx_bin.clone(), "-v"),
    };
    let out = Command::new(&bin)
        .arg(arg)
        .output()
        .map_err(|e| format!("{bin}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = text.lines().next().unwrap_or("").trim().to_string();
    if kind == Kind::Nginx && nginx_stream_module().is_none() {
        return Err("nginx is installed but its stream module is not (libnginx-mod-stream)".into());
    }
    Ok(version)
}

fn nginx_stream_module() -> Option<PathBuf> {
    [
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "/usr/lib64/nginx/modules/ngx_stream_module.so",
        "/usr/share/nginx/modules/ngx_stream_module.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Addresses of the front ends.
#[derive(Clone, Copy, Debug)]
pub struct Fronts {
    pub http: SocketAddr,
    pub echo: SocketAddr,
    pub bulk: SocketAddr,
    /// TLS terminated by the proxy, then the HTTP / bulk backend.
    pub tls_http: Option<SocketAddr>,
    pub tls_bulk: Option<SocketAddr>,
}

impl Fronts {
    /// The backends themselves, without TLS: what `direct` talks to, and
    /// edgeproxy's addresses until it reports its own.
    fn backends(backends: &Backends) -> Fronts {
        Fronts {
            http: backends.http,
            echo: backends.echo,
            bulk: backends.bulk,
            tls_http: None,
            tls_bulk: None,
        }
    }

    /// Free loopback ports for a peer proxy's front ends (TLS ones only when
    /// the run measures TLS).
    fn on_free_ports(setup: &Setup) -> anyhow::Result<Fronts> {
        let tls_port = || setup.tls.as_ref().map(|_| free_port()).transpose();
        Ok(Fronts {
            http: free_port()?,
            echo: free_port()?,
            bulk: free_port()?,
            tls_http: tls_port()?,
            tls_bulk: tls_port()?,
        })
    }
}

/// A running target.
pub struct Running {
    pub kind: Kind,
    pub fronts: Fronts,
    child: Option<Child>,
    /// Lines the process logged (stderr), kept for error messages.
    log: LogLines,
    /// edgeproxy only: routing-table reloads it logged.
    pub reloads: Arc<AtomicU64>,
    pub routing_db: Option<PathBuf>,
}

impl Running {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(20)..].join("\n")
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            None => true,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }
}

/// How long edgeproxy may take to exit after SIGTERM once a scenario is
/// over: milliseconds with nothing open, and the suite's config drains what
/// a scenario left open for at most 1 s.
const EDGEPROXY_STOP_LIMIT: Duration = Duration::from_secs(5);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // edgeproxy stops the way an operator stops it, so a graceful
            // shutdown that hangs in the release build shows here (the
            // tests run the debug build); the load is over by now.
            if self.kind == Kind::Edgeproxy {
                if graceful_stop(&mut c, EDGEPROXY_STOP_LIMIT) {
                    // Reaped: its pid may be someone else's by now.
                    return;
                }
                eprintln!(
                    "warning: edgeproxy (pid {}) did not exit within {:?} of SIGTERM after \
                     the load: its graceful shutdown hangs; killed. Last log lines:\n{}",
                    c.id(),
                    EDGEPROXY_STOP_LIMIT,
                    self.log_tail()
                );
            }
            // The whole tree: nginx workers are children of its master.
            for pid in crate::procfs::process_tree(c.id()).into_iter().rev() {
                // SAFETY: kill(2) on our child or one of its descendants.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let _ = c.wait();
        }
    }
}

/// Sends SIGTERM and waits up to `limit` for `child` to exit; false if it
/// is still running.
fn graceful_stop(child: &mut Child, limit: Duration) -> bool {
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Options for an edgeproxy instance beyond [`Setup`].
#[derive(Clone, Debug)]
pub struct EdgeOptions {
    pub reload_interval_ms: u64,
    /// Rows per app in routing.db (all pointing at the one backend).
    pub rows_per_app: usize,
    /// TOML appended to edgeproxy's config (a section the suite does not
    /// write, e.g. `[rate_limit]` for scenario r).
    pub extra_toml: String,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        EdgeOptions {
            reload_interval_ms: 1000,
            rows_per_app: 1,
            extra_toml: String::new(),
        }
    }
}

pub fn start(
    kind: Kind,
    setup: &Setup,
    backends: &Backends,
    tag: &str,
    edge: &EdgeOptions,
) -> anyhow::Result<Running> {
    let dir = setup.work_dir.join(format!("{}-{tag}", kind.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    match kind {
        Kind::Direct => Ok(Running {
            kind,
            fronts: Fronts::backends(backends),
            child: None,
            log: Default::default(),
            reloads: Default::default(),
            routing_db: None,
        }),
        Kind::Edgeproxy => start_edgeproxy(setup, backends, &dir, edge),
        Kind::Minimal => start_minimal(setup, backends),
        Kind::Haproxy | Kind::Haproxy2 => start_haproxy(kind, setup, backends, &dir),
        Kind::Nginx => start_nginx(setup, backends, &dir),
    }
}

/// Lines a child logged, shared with the thread that reads them.
type LogLines = Arc<Mutex<Vec<String>>>;

/// Starts `cmd` restricted to `cpus`, with stderr collected by a thread that
/// also forwards each line on the returned channel.
fn spawn(
    mut cmd: Command,
    cpus: &[usize],
) -> anyhow::Result<(Child, LogLines, std::sync::mpsc::Receiver<String>)> {
    let cpus = cpus.to_vec();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (sched_setaffinity) between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            if !cpus.is_empty() {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for &c in &cpus {
                    libc::CPU_SET(c, &mut set);
                }
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let stderr = child.stderr.take().expect("piped");
    let log: LogLines = Default::default();
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                let mut log = log.lock().unwrap();
                if log.len() < 10_000 {
                    log.push(line);
                }
            }
        });
    }
    Ok((child, log, rx))
}

fn start_edgeproxy(
    setup: &Setup,
    backends: &Backends,
    dir: &Path,
    edge: &EdgeOptions,
) -> anyhow::Result<Running> {
    let db = dir.join("routing.db");
    write_routing_db(&db, backends, edge.rows_per_app)?;
    let mut toml = format!(
        r#"# Written by the perf suite.
[pop]
region = "sa"

[runtime]
shards = {shards}
pin_cores = true

[routing]
db_path = "{db}"
reload_interval_ms = {reload}

[demo]
backends = 0

[limits]
# The suite stops edgeproxy with SIGTERM: a connection a scenario left open
# is drained for at most this.
shutdown_grace_secs = 1

[log]
level = "info"
"#,
        shards = setup.workers,
        db = db.display(),
        reload = edge.reload_interval_ms,
    );
    for app in ["http", "echo", "bulk"] {
        toml.push_str(&format!(
            "\n[[listener]]\nname = \"{app}\"\naddr = \"127.0.0.1:0\"\napp = \"{app}\"\n"
        ));
    }
    if let Some(m) = &setup.tls {
        toml.push_str(&crate::tls_material::edgeproxy_listener(
            "tls-http", "http", m,
        ));
        toml.push_str(&crate::tls_material::edgeproxy_listener(
            "tls-bulk", "bulk", m,
        ));
    }
    toml.push_str(&edge.extra_toml);
    let config = dir.join("edgeproxy.toml");
    std::fs::write(&config, toml)?;
    let mut cmd = Command::new(&setup.edgeproxy_bin);
    cmd.arg("--config")
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .current_dir(dir);
    let (child, log, rx) = spawn(cmd, &setup.cpus)?;
    let reloads = Arc::new(AtomicU64::new(0));
    let mut running = Running {
        kind: Kind::Edgeproxy,
        fronts: Fronts::backends(backends),
        child: Some(child),
        log,
        reloads: Arc::clone(&reloads),
        routing_db: Some(db),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(l) => strip_ansi(&l),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if !running.alive() || left.is_zero() {
                    bail!("edgeproxy did not start:\n{}", running.log_tail());
                }
                continue;
            }
            Err(_) => bail!("edgeproxy exited:\n{}", running.log_tail()),
        };
        if line.contains("listening") {
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(|v| v.trim_matches('"').to_string())
            };
            if let (Some(name), Some(addr)) = (field("listener="), field("addr=")) {
                let addr: SocketAddr = addr.parse().context("listening addr")?;
                match name.as_str() {
                    "http" => running.fronts.http = addr,
                    "echo" => running.fronts.echo = addr,
                    "bulk" => running.fronts.bulk = addr,
                    "tls-http" => running.fronts.tls_http = Some(addr),
                    "tls-bulk" => running.fronts.tls_bulk = Some(addr),
                    _ => continue,
                }
                found += 1;
            }
        }
        if line.contains("edgeproxy ready") {
            break;
        }
    }
    if found < if setup.tls.is_some() { 5 } else { 3 } {
        bail!(
            "edgeproxy did not report its listeners:\n{}",
            running.log_tail()
        );
    }
    // Keep counting reloads after start.
    std::thread::spawn(move || {
        for line in rx {
            if line.contains("routing table reloaded") {
                reloads.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok(running)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `backends` table with the original edgeProxy's columns and defaults
/// (every column but id, app, region, wg_ip and port may be left out of an
/// INSERT); edgeproxy migrates it on open.
pub const BACKENDS_TABLE: &str =
    "CREATE TABLE backends (id TEXT PRIMARY KEY, app TEXT NOT NULL, region TEXT NOT NULL,
     country TEXT, wg_ip TEXT NOT NULL, port INTEGER NOT NULL, healthy INTEGER NOT NULL DEFAULT 1,
     weight INTEGER NOT NULL DEFAULT 1, soft_limit INTEGER NOT NULL DEFAULT 100,
     hard_limit INTEGER NOT NULL DEFAULT 150, deleted INTEGER NOT NULL DEFAULT 0)";

/// The original edgeProxy schema; edgeproxy migrates it on open.
pub fn write_routing_db(
    path: &Path,
    backends: &Backends,
    rows_per_app: usize,
) -> anyhow::Result<()> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "CREATE TABLE backends (
            id TEXT PRIMARY KEY, app TEXT, region TEXT, wg_ip TEXT, port INTEGER,
            healthy INTEGER, weight INTEGER, soft_limit INTEGER, hard_limit INTEGER,
            deleted INTEGER DEFAULT 0)",
    )?;
    for (app, addr) in [
        ("http", backends.http),
        ("echo", backends.echo),
        ("bulk", backends.bulk),
    ] {
        for i in 0..rows_per_app.max(1) {
            conn.execute(
                "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
                 VALUES (?1, ?2, 'sa', ?3, ?4, 1, 1, 100000, 0, 0)",
                rusqlite::params![
                    format!("{app}-{i}"),
                    app,
                    addr.ip().to_string(),
                    addr.port()
                ],
            )?;
        }
    }
    Ok(())
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Waits until every address accepts a connection.
fn wait_listening(running: &mut Running, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let f = running.fronts;
    for addr in [f.http, f.echo, f.bulk]
        .into_iter()
        .chain(f.tls_http)
        .chain(f.tls_bulk)
    {
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if !running.alive() || Instant::now() > deadline {
                bail!(
                    "{what} did not start listening on {addr}:\n{}",
                    running.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Connection limit that fits the open-file limit (a proxied connection
/// needs two descriptors).
fn maxconn() -> u64 {
    let nofile = crate::procfs::raise_nofile();
    (nofile.saturating_sub(512) / 2).max(256)
}

fn start_haproxy(
    kind: Kind,
    setup: &Setup,
    backends: &Backends,
    dir: &Path,
) -> anyhow::Result<Running> {
    let fronts = Fronts::on_free_ports(setup)?;
    let n = setup.workers.max(1);
    let cpu_map = if setup.cpus.is_empty() {
        String::new()
    } else {
        // Thread i on the i-th CPU of the set, as edgeproxy pins shard i.
        (0..n)
            .map(|i| {
                format!(
                    "    cpu-map 1/{} {}\n",
                    i + 1,
                    setup.cpus[i % setup.cpus.len()]
                )
            })
            .collect()
    };
    let mut cfg = format!(
        "# Written by the perf suite: TCP mode, no logging, {n} thread(s).
global
    nbthread {n}
{cpu_map}    maxconn {maxconn}

defaults
    mode tcp
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    maxconn {maxconn}
",
        maxconn = maxconn()
    );
    for (name, front, back) in [
        ("http", fronts.http, backends.http),
        ("echo", fronts.echo, backends.echo),
        ("bulk", fronts.bulk, backends.bulk),
    ] {
        cfg.push_str(&format!(
            "\nlisten {name}\n    bind {front}\n    server s1 {back}\n"
        ));
    }
    if let (Some(m), Some(th), Some(tb)) = (&setup.tls, fronts.tls_http, fronts.tls_bulk) {
        for (name, front, back) in [
            ("tls-http", th, backends.http),
            ("tls-bulk", tb, backends.bulk),
        ] {
            cfg.push_str(&format!(
                "\nlisten {name}\n    bind {front} ssl crt {}\n    server s1 {back}\n",
                m.combined.display()
            ));
        }
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let mut cmd = Command::new(&setup.haproxy_bin);
    cmd.arg("-f").arg(&path).arg("-db").current_dir(dir);
    start_peer(kind, cmd, setup, fronts)
}

/// Starts a peer proxy (not edgeproxy, which the suite also watches for
/// reloads) and waits until every front end accepts connections.
fn start_peer(kind: Kind, cmd: Command, setup: &Setup, fronts: Fronts) -> anyhow::Result<Running> {
    let (child, log, _rx) = spawn(cmd, &setup.cpus)?;
    let mut running = Running {
        kind,
        fronts,
        child: Some(child),
        log,
        reloads: Default::default(),
        routing_db: None,
    };
    wait_listening(&mut running, kind.name())?;
    Ok(running)
}

fn start_minimal(setup: &Setup, backends: &Backends) -> anyhow::Result<Running> {
    // No TLS: the minimal proxy has none, and (f) reports it as not run.
    let fronts = Fronts {
        tls_http: None,
        tls_bulk: None,
        ..Fronts::on_free_ports(setup)?
    };
    let mut cmd = Command::new(&setup.minimal_bin);
    cmd.arg("--workers").arg(setup.workers.max(1).to_string());
    for (front, back) in [
        (fronts.http, backends.http),
        (fronts.echo, backends.echo),
        (fronts.bulk, backends.bulk),
    ] {
        cmd.arg(format!("{front}={back}"));
    }
    start_peer(Kind::Minimal, cmd, setup, fronts)
}

fn start_nginx(setup: &Setup, backends: &Backends, dir: &Path) -> anyhow::Result<Running> {
    let module = nginx_stream_module().context("nginx stream module not installed")?;
    let fronts = Fronts::on_free_ports(setup)?;
    let n = setup.workers.max(1);
    let affinity = if setup.cpus.is_empty() {
        String::new()
    } else {
        // Worker i on the i-th CPU of the set.
        let masks: Vec<String> = (0..n)
            .map(|i| {
                let cpu = setup.cpus[i % setup.cpus.len()];
                let mut m = vec![b'0'; cpu + 1];
                m[0] = b'1';
                String::from_utf8(m).unwrap()
            })
            .collect();
        format!("worker_cpu_affinity {};\n", masks.join(" "))
    };
    let maxconn = maxconn();
    let mut cfg = format!(
        "# Written by the perf suite: stream (TCP) proxy, no logging, {n} worker(s).
load_module {module};
daemon off;
master_process on;
worker_processes {n};
{affinity}worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log stderr error;
events {{
    worker_connections {conns};
}}
stream {{
    proxy_connect_timeout 2s;
    proxy_timeout 300s;
    tcp_nodelay on;
",
        module = module.display(),
        dir = dir.display(),
        nofile = maxconn * 2 + 256,
        conns = maxconn * 2,
    );
    for (front, back) in [
        (fronts.http, backends.http),
        (fronts.echo, backends.echo),
        (fronts.bulk, backends.bulk),
    ] {
        cfg.push_str(&format!(
            "    server {{\n        listen {front} reuseport;\n        proxy_pass {back};\n    }}\n"
        ));
    }
    if let (Some(m), Some(th), Some(tb)) = (&setup.tls, fronts.tls_http, fronts.tls_bulk) {
        for (front, back) in [(th, backends.http), (tb, backends.bulk)] {
            cfg.push_str(&format!(
                "    server {{\n        listen {front} ssl reuseport;\n        ssl_certificate {};\n        ssl_certificate_key {};\n        proxy_pass {back};\n    }}\n",
                m.cert.display(),
                m.key.display()
            ));
        }
    }
    cfg.push_str("}\n");
    let path = dir.join("nginx.conf");
    std::fs::write(&path, cfg)?;
    let mut cmd = Command::new(&setup.nginx_bin);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg("stderr")
        .current_dir(dir);
    start_peer(Kind::Nginx, cmd, setup, fronts)
}
