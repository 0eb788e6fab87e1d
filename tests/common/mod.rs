//! Test harness: the real `edgeproxy` binary, real backends on loopback, a real
//! `routing.db`.
//!
//! Readiness comes from the proxy's own log: tests wait for the
//! `edgeproxy ready` line and read each listener's bound address from its
//! `listening` line (listeners bind port 0, so tests never race for ports).
#![allow(dead_code)]

pub mod daemons;
pub mod hold_fsync;
pub mod postgres;
pub mod streams;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub mod netns;
pub mod routers;
pub mod small_disk;

pub const BIN: &str = env!("CARGO_BIN_EXE_edgeproxy");

/// How long anything in a test may take before it counts as hung.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("edgeproxy-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Log lines of a running proxy, collected by a reader thread.
#[derive(Default)]
struct LogBook {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
    /// Output streams (stderr, stdout) read to their end.
    closed: Mutex<usize>,
}

pub struct Proxy {
    child: Child,
    log: Arc<LogBook>,
    pub listeners: Vec<(String, SocketAddr)>,
}

impl Proxy {
    /// Starts the binary with `args` and `env` (the variables are added to a
    /// clean environment with PATH only) and waits for it to be ready.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Proxy {
        Proxy::spawn(args, env).ready()
    }

    /// Like [`Proxy::start`], but `rust_log` replaces the harness's
    /// `RUST_LOG=info` (`None`: RUST_LOG unset, so the proxy's own level
    /// settings, e.g. `DEBUG=1`, apply).
    pub fn start_with_rust_log(
        args: &[&str],
        env: &[(&str, &str)],
        rust_log: Option<&str>,
    ) -> Proxy {
        Proxy::spawn_with_rust_log(args, env, rust_log).ready()
    }

    /// Waits for `edgeproxy ready` (panics with the log if it does not come)
    /// and reads the listeners' bound addresses.
    pub fn ready(self) -> Proxy {
        let mut proxy = self;
        proxy
            .wait_for_log("edgeproxy ready", PATIENCE)
            .unwrap_or_else(|| panic!("proxy did not become ready; log:\n{}", proxy.log_text()));
        proxy.listeners = proxy
            .log_lines()
            .iter()
            .filter(|l| l.contains(" listening "))
            .filter_map(|l| Some((field(l, "listener")?, field(l, "addr")?.parse().ok()?)))
            .collect();
        proxy
    }

    /// Starts with a config file written from `toml` inside `dir`.
    pub fn with_config(dir: &TempDir, toml: &str) -> Proxy {
        let path = dir.join("edgeproxy.toml");
        std::fs::write(&path, toml).unwrap();
        Proxy::start(&["--config", path.to_str().unwrap()], &[])
    }

    /// Starts the binary without waiting for readiness.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proxy {
        Proxy::spawn_with_rust_log(args, env, Some("info"))
    }

    /// Writes `toml` to `edgeproxy.toml` in `dir` and starts the binary on it
    /// without waiting for readiness.
    pub fn spawn_with_config(dir: &TempDir, toml: &str) -> Proxy {
        let path = dir.join("edgeproxy.toml");
        std::fs::write(&path, toml).unwrap();
        Proxy::spawn(&["--config", path.to_str().unwrap()], &[])
    }

    /// Like [`Proxy::spawn`], in working directory `cwd`.
    pub fn spawn_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(cwd);
        Proxy::spawn_command(cmd, args, env, Some("info"))
    }

    /// Like [`Proxy::spawn`], with `RUST_LOG` set to `rust_log` (or unset).
    pub fn spawn_with_rust_log(
        args: &[&str],
        env: &[(&str, &str)],
        rust_log: Option<&str>,
    ) -> Proxy {
        Proxy::spawn_command(Command::new(BIN), args, env, rust_log)
    }

    /// Like [`Proxy::spawn_with_rust_log`], running the binary at `exe` (a
    /// copy of `BIN`, say, that a test replaces as a package manager would).
    pub fn spawn_exe(
        exe: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        rust_log: Option<&str>,
    ) -> Proxy {
        Proxy::spawn_command(Command::new(exe), args, env, rust_log)
    }

    /// Starts the binary inside network namespace `ns` (`ip netns exec`,
    /// which execs it: the child is edgeproxy itself).
    pub fn spawn_in_netns(ns: &str, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, BIN]);
        Proxy::spawn_command(cmd, args, env, Some("info"))
    }

    /// Starts `cmd` (the binary, maybe with a working directory, limits or
    /// a wrapper) with `args` and `env` added to a clean environment.
    pub fn spawn_command(
        mut cmd: Command,
        args: &[&str],
        env: &[(&str, &str)],
        rust_log: Option<&str>,
    ) -> Proxy {
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(level) = rust_log {
            cmd.env("RUST_LOG", level);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("cannot start edgeproxy");
        let log = Arc::new(LogBook::default());
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    log.lines.lock().unwrap().push(line);
                    log.grew.notify_all();
                }
                *log.closed.lock().unwrap() += 1;
                log.grew.notify_all();
            });
        }
        Proxy {
            child,
            log,
            listeners: Vec::new(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listeners.first().expect("no listener").1
    }

    pub fn listener(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no listener {name}: {:?}", self.listeners))
            .1
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().clone()
    }

    /// The address in field `key` of the first log line containing
    /// `message` (e.g. `"api listening"`, `"addr"`), waiting for the line.
    pub fn logged_addr(&self, message: &str, key: &str) -> SocketAddr {
        let line = self
            .wait_for_log(message, PATIENCE)
            .unwrap_or_else(|| panic!("no {message:?} line:\n{}", self.log_text()));
        field(&line, key)
            .unwrap_or_else(|| panic!("no {key} in {line}"))
            .parse()
            .unwrap_or_else(|e| panic!("{key} in {line}: {e}"))
    }

    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Number of log lines so far; pass it to `wait_for_log_after` to wait for a
    /// line written after this point.
    pub fn log_mark(&self) -> usize {
        self.log.lines.lock().unwrap().len()
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_log_after(0, needle, timeout)
    }

    pub fn wait_for_log_after(
        &self,
        mark: usize,
        needle: &str,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().skip(mark).find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        let rc = unsafe { libc_kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Its last words may still be in the pipes: wait until both
                // readers saw the end (unless a grandchild holds them open).
                let mut closed = self.log.closed.lock().unwrap();
                while *closed < 2 && Instant::now() < deadline {
                    let left = deadline.saturating_duration_since(Instant::now());
                    closed = self.log.grew.wait_timeout(closed, left).unwrap().0;
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
/// Sends `sig` to process `pid` (one the test started, e.g. a child of a
/// tracer around the proxy).
pub fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: plain kill(2).
    let rc = unsafe { libc_kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill {pid} failed");
}

/// Kills a process the test did not start itself (a binary upgrade's new
/// process) when dropped; one already gone is fine.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: plain kill(2); ESRCH (already gone) is what we want.
        unsafe { libc_kill(self.0 as i32, 9) };
    }
}

/// (user, system) CPU clock ticks of process `pid`, all threads, as
/// `/proc/<pid>/stat` counts them (truncated: a tick is 1/`clock_ticks_per_second`).
pub fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 here.
    (f[11].parse().unwrap(), f[12].parse().unwrap())
}

/// The unit of [`cpu_ticks`], in ticks per second.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

pub const SIGHUP: i32 = 1;
pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;

/// `key=value` from a log line (value ends at whitespace; quotes stripped).
pub fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

/// Runs the binary to completion: (exit status, stdout, stderr).
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cannot run edgeproxy");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A backend that greets each connection with `<name>\n`, then echoes every
/// byte back until the client half-closes, then closes its side.
pub struct TagBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl TagBackend {
    pub fn start(name: &str) -> TagBackend {
        TagBackend::serve(TcpListener::bind("127.0.0.1:0").unwrap(), name)
    }

    /// Serves on a listener bound elsewhere (e.g. inside a namespace).
    pub fn serve(listener: TcpListener, name: &str) -> TagBackend {
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        let tag = format!("{name}\n");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let tag = tag.clone();
                std::thread::spawn(move || {
                    if stream.write_all(tag.as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        TagBackend {
            name: name.to_string(),
            addr,
            connections,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Connects through the proxy and returns the name of the backend that
/// answered (its greeting line), keeping the stream open.
pub fn connect_tagged(proxy: SocketAddr) -> (String, TcpStream) {
    let stream = TcpStream::connect(proxy).expect("connect to proxy");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let name = read_line(&stream).expect("no greeting from backend");
    (name, stream)
}

/// Which backend answers a fresh connection.
pub fn which_backend(proxy: SocketAddr) -> String {
    connect_tagged(proxy).0
}

/// Reads one `\n`-terminated line byte by byte (so no bytes after it are
/// consumed).
pub fn read_line(mut stream: &TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => return String::from_utf8(line).ok(),
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
}

/// A port nothing listens on, TCP or UDP, for something the test itself
/// starts listening there soon (a daemon given the port in its config).
/// For a backend that must keep refusing connections use [`RefusingPort`].
///
/// Picked below the kernel's ephemeral range (`ip_local_port_range`), not by
/// binding port 0: a port from that range may be taken, between this check
/// and the daemon's bind, by any outgoing connection's source port or any
/// other test's port-0 listener, and CI lost a Prometheus start that way
/// (its bind refused, and the test met the other listener). Below the range
/// only another pick could take it: picks in one process never repeat, and
/// each process starts at its own offset.
pub fn dead_port() -> u16 {
    static PICKED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let below_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = below_ephemeral.saturating_sub(FIRST);
    assert!(
        span >= 1_000,
        "ip_local_port_range starts at {below_ephemeral}: no room below it for test ports"
    );
    let offset = u64::from(std::process::id()) * 7_919;
    loop {
        let n = PICKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < span, "no free port left in {FIRST}..{below_ephemeral}");
        let port = FIRST + ((offset + u64::from(n)) % u64::from(span)) as u32;
        let port = u16::try_from(port).expect("below the ephemeral range");
        if port_is_free(port) {
            return port;
        }
    }
}

/// Whether no socket holds `port`: a dual-stack wildcard bind conflicts with
/// any IPv4 or IPv6 bind of the port (an IPv4 one where IPv6 is off).
fn port_is_free(port: u16) -> bool {
    static IPV6: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ipv6 = *IPV6.get_or_init(|| std::net::UdpSocket::bind("[::1]:0").is_ok());
    let any: std::net::IpAddr = if ipv6 {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    TcpListener::bind((any, port)).is_ok() && std::net::UdpSocket::bind((any, port)).is_ok()
}

/// A port held by a bound socket that never listens: connects to it are
/// refused for as long as this lives, and no other socket on the host can
/// take it (no `SO_REUSEADDR`), nor can an outgoing connection use it as its
/// source port (which would connect the proxy to itself).
pub struct RefusingPort {
    socket: Option<socket2::Socket>,
    port: u16,
}

impl RefusingPort {
    pub fn new() -> RefusingPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("TCP socket");
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        socket.bind(&any.into()).expect("bind 127.0.0.1:0");
        let port = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("bound address")
            .port();
        RefusingPort {
            socket: Some(socket),
            port,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Gives the port up and listens on it: the backend comes back.
    pub fn revive(&mut self) -> TcpListener {
        drop(self.socket.take());
        TcpListener::bind(("127.0.0.1", self.port)).expect("listen on the revived port")
    }
}

/// A backend that accepts each connection, reads the client's first bytes
/// and resets the connection (closes it with `SO_LINGER` 0) without sending
/// a byte, as a server that fails on every request would; until
/// [`ResettingBackend::serve`] makes it answer with `<name>\n` instead.
/// Reading first makes sure the proxy's connect has completed before the
/// reset (a reset racing the connect is a failed connect).
pub struct ResettingBackend {
    pub addr: SocketAddr,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    serving: Arc<std::sync::atomic::AtomicBool>,
}

impl ResettingBackend {
    pub fn start(name: &str) -> ResettingBackend {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let serving = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, serve) = (Arc::clone(&accepted), Arc::clone(&serving));
        let tag = format!("{name}\n");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, SeqCst);
                let (serve, tag) = (Arc::clone(&serve), tag.clone());
                std::thread::spawn(move || {
                    if stream.read(&mut [0u8; 256]).unwrap_or(0) == 0 {
                        return;
                    }
                    if serve.load(SeqCst) {
                        let _ = stream.write_all(tag.as_bytes());
                    } else {
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    }
                });
            }
        });
        ResettingBackend {
            addr,
            accepted,
            serving,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From now on each connection is greeted, not reset.
    pub fn serve(&self) {
        self.serving
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Default for RefusingPort {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------
// routing.db
// ---------------------------------------------------------------------------

/// The original edgeProxy's `backends` table, without the later `country`.
pub const ORIGINAL_SCHEMA_NO_COUNTRY: &str = "CREATE TABLE backends (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    region TEXT NOT NULL,
    wg_ip TEXT NOT NULL,
    port INTEGER NOT NULL,
    healthy INTEGER NOT NULL DEFAULT 1,
    weight INTEGER NOT NULL DEFAULT 1,
    soft_limit INTEGER NOT NULL DEFAULT 100,
    hard_limit INTEGER NOT NULL DEFAULT 150,
    deleted INTEGER NOT NULL DEFAULT 0
)";

/// The original schema with `country`.
pub const ORIGINAL_SCHEMA: &str = "CREATE TABLE backends (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    region TEXT NOT NULL,
    country TEXT,
    wg_ip TEXT NOT NULL,
    port INTEGER NOT NULL,
    healthy INTEGER NOT NULL DEFAULT 1,
    weight INTEGER NOT NULL DEFAULT 1,
    soft_limit INTEGER NOT NULL DEFAULT 100,
    hard_limit INTEGER NOT NULL DEFAULT 150,
    deleted INTEGER NOT NULL DEFAULT 0
)";

/// A handle on a routing.db as an operator (or the sqlite3 CLI) would edit it.
pub struct Db {
    pub path: PathBuf,
    conn: rusqlite::Connection,
}

/// One row, with the original's defaults.
#[derive(Clone, Debug)]
pub struct Row {
    pub id: String,
    pub app: String,
    pub region: String,
    pub country: Option<String>,
    pub ip: String,
    pub port: u16,
    pub healthy: bool,
    pub weight: i64,
    pub soft_limit: i64,
    pub hard_limit: i64,
}

impl Row {
    pub fn new(id: &str, app: &str, region: &str, port: u16) -> Row {
        Row {
            id: id.into(),
            app: app.into(),
            region: region.into(),
            country: None,
            ip: "127.0.0.1".into(),
            port,
            healthy: true,
            weight: 1,
            soft_limit: 100,
            hard_limit: 150,
        }
    }

    pub fn country(mut self, c: &str) -> Row {
        self.country = Some(c.into());
        self
    }
}

impl Db {
    pub fn create(path: PathBuf) -> Db {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(ORIGINAL_SCHEMA).unwrap();
        Db { path, conn }
    }

    pub fn open(path: PathBuf) -> Db {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        Db { path, conn }
    }

    pub fn upsert(&self, r: &Row) {
        self.conn
            .execute(
                "INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0)
                 ON CONFLICT(id) DO UPDATE SET app=?2, region=?3, country=?4, wg_ip=?5, port=?6,
                   healthy=?7, weight=?8, soft_limit=?9, hard_limit=?10, deleted=0",
                rusqlite::params![
                    r.id, r.app, r.region, r.country, r.ip, r.port, r.healthy, r.weight,
                    r.soft_limit, r.hard_limit
                ],
            )
            .unwrap();
    }

    pub fn exec(&self, sql: &str) {
        self.conn.execute_batch(sql).unwrap();
    }
}

/// Retries `probe` until it returns true or `timeout` passes; returns
/// whether it succeeded. For waiting on a state the proxy reaches on its own
/// schedule (a routing reload), where the proxy offers no signal to wait on.
pub fn eventually(timeout: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if probe() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal config: one listener on a free loopback port, the given db,
/// fast reloads, one extra TOML fragment.
pub fn config(db: &Path, extra: &str) -> String {
    format!(
        "[routing]\ndb_path = {db:?}\nreload_interval_ms = 100\n\n[runtime]\nshards = 2\n\n{extra}\n{listener}",
        db = db.display().to_string(),
        listener = if extra.contains("[[listener]]") {
            ""
        } else {
            "[[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n"
        }
    )
}

/// What a fresh connection to `addr` sees when it only listens.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// connect(2) failed: nothing listens.
    Refused,
    /// Accepted, then closed (FIN or RST) before a single byte arrived.
    ClosedWithoutData,
    /// Bytes arrived (e.g. a backend's greeting).
    Data(Vec<u8>),
    /// Accepted and still open, silent, after `wait`.
    Silent,
}

/// Connects to `addr` and reads for at most `wait`, without sending.
pub fn probe(addr: SocketAddr, wait: Duration) -> Probe {
    let mut stream = match TcpStream::connect_timeout(&addr, PATIENCE) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Probe::Refused,
        // A listener closing with this SYN in its queue resets it, and the
        // reset can win the race against connect(2) returning.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Probe::ClosedWithoutData
        }
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => Probe::ClosedWithoutData,
        Ok(n) => Probe::Data(buf[..n].to_vec()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Probe::ClosedWithoutData,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Probe::Silent
        }
        Err(e) => panic!("read from {addr}: {e}"),
    }
}

/// How long a client must go unserved (no byte, no close) to count as
/// waiting in the proxy's accept queue: far longer than serving takes.
pub const QUEUED: Duration = Duration::from_secs(1);

/// Connects to `addr` and checks that the connection is neither served nor
/// closed for [`QUEUED`]: it waits in the kernel's accept queue (a limit is
/// reached). Returns it; it is served once a slot frees (`read_line`).
pub fn connect_waiting(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect");
    stream.set_read_timeout(Some(QUEUED)).unwrap();
    let mut byte = [0u8; 1];
    match (&stream).read(&mut byte) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("expected to wait in the accept queue, got {other:?}"),
    }
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// A backend that runs `handler` on its own thread for every accepted
/// connection; returns its address. For tests that need a backend with a
/// particular behaviour (half-close, bulk source or sink).
pub fn custom_backend<F>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let handler = Arc::clone(&handler);
            std::thread::spawn(move || handler(stream));
        }
    });
    addr
}

impl Proxy {
    /// Waits for a log line written after `mark` for which `pred` holds;
    /// returns it.
    pub fn wait_for_log_where(
        &self,
        mark: usize,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().skip(mark).find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

// ---------------------------------------------------------------------------
// PROXY protocol clients, log counting, closed-connection checks
// ---------------------------------------------------------------------------

/// A PROXY protocol v1 line for a client at `src` talking to `dst`.
pub fn proxy_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = [0u8; engine::proxy_protocol::V1_MAX_ENCODED];
    let n = engine::proxy_protocol::encode_v1(src, dst, &mut out);
    out[..n].to_vec()
}

/// A PROXY protocol v2 header for a client at `src` talking to `dst`.
pub fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = [0u8; engine::proxy_protocol::V2_MAX_ENCODED];
    let n = engine::proxy_protocol::encode_v2(src, dst, &mut out);
    out[..n].to_vec()
}

/// `ip` with an arbitrary client port, for PROXY headers.
pub fn client_at(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("client ip"), 40_000)
}

/// Connects to `proxy`, sends `prefix` (a PROXY header, say) and returns the
/// greeting of the backend that answered, or `None` if the connection was
/// closed first.
pub fn connect_with(proxy: SocketAddr, prefix: &[u8]) -> (Option<String>, TcpStream) {
    let mut stream = TcpStream::connect(proxy).expect("connect to proxy");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(prefix).expect("send prefix");
    let name = read_line(&stream);
    (name, stream)
}

/// The backend reached through a PROXY-protocol listener by a client at
/// `src` (v1 header when `v2` is false); panics if the proxy closed instead.
pub fn which_backend_via(proxy: SocketAddr, src: &str, v2: bool) -> String {
    let src = client_at(src);
    let header = if v2 {
        proxy_v2(src, proxy)
    } else {
        proxy_v1(src, proxy)
    };
    connect_with(proxy, &header)
        .0
        .unwrap_or_else(|| panic!("proxy closed the connection of client {src}"))
}

/// Reads until the peer closes (FIN or RST) and returns what arrived before.
/// Panics if the connection is still open after `PATIENCE`.
pub fn read_until_closed(mut stream: &TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("connection not closed within {PATIENCE:?}: {e}; got {got:?}"),
        }
    }
}

impl Proxy {
    /// Log lines containing `needle` written after `mark`.
    pub fn log_lines_after(&self, mark: usize, needle: &str) -> Vec<String> {
        self.log.lines.lock().unwrap()[mark..]
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Waits until at least `count` lines containing `needle` were written
    /// after `mark`; returns whether they were.
    pub fn wait_for_log_count_after(
        &self,
        mark: usize,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if lines
                .iter()
                .skip(mark)
                .filter(|l| l.contains(needle))
                .count()
                >= count
            {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

impl Db {
    /// The underlying connection, for statements `upsert`/`exec` do not cover.
    pub fn conn(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

impl TagBackend {
    /// Connections this backend has accepted so far.
    pub fn accepted(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A listener whose accept queue is full and never drained: further SYNs are
/// dropped, so a connect to it hangs until the connector gives up (a
/// black-holed backend).
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<socket2::Socket>,
}

impl Blackhole {
    pub fn start() -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        // Fill the queue (one established, one half-open), without waiting.
        let queued = (0..2)
            .map(|_| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                s.set_nonblocking(true).unwrap();
                let _ = s.connect(&addr.into());
                s
            })
            .collect();
        // The blackhole holds only if a fresh connect really hangs.
        let check = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(check.is_err(), "the blackhole accepted a connection");
        Blackhole {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }
}

// ---------------------------------------------------------------------------
// The metrics listener: /metrics, /ready
// ---------------------------------------------------------------------------

impl Proxy {
    /// The metrics listener's address, from its `metrics listening` line
    /// (`[metrics] enabled`, `listen_addr = "127.0.0.1:0"`).
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = self
            .wait_for_log("metrics listening", PATIENCE)
            .unwrap_or_else(|| panic!("no metrics listener; log:\n{}", self.log_text()));
        field(&line, "addr").unwrap().parse().unwrap()
    }
}

/// `GET path` on `addr` over HTTP/1.0: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let status = all
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {all:?}"));
    let body = all.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// The value of one series in Prometheus text `text`: `series` is the
/// metric's name with its labels as the proxy writes them
/// (`edgeproxy_listener_up{listener="b"}`). `None` when absent, so that a
/// 0 written out is told from no sample at all.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}
