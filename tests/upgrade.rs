//! Hitless binary upgrade, through the real binary: SIGUSR2 or `edgeproxy
//! upgrade` starts the binary at the running process's path, hands it every
//! socket, and the old process drains. Under load: a hundred echo streams
//! (every byte checked), clients opening and closing connections back to
//! back, and discovery API, metrics and DNS requests, none of which may
//! fail, be reset or go unanswered across one upgrade or ten in a row. A
//! new binary that fails to start (exits, hangs, rejects its configuration)
//! leaves the old process serving.
//!
//! Processes of an upgrade chain are not all children of the test (each
//! successor is its predecessor's child); [`Chain`] kills whatever is left
//! of them when a test ends, pass or fail.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::streams::{finish, progress, stalled_since, start_stream, Stream};
use common::*;

const STREAMS: usize = 100;
const SIGUSR2: i32 = 12;
const SIGKILL: i32 = 9;

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// A process is alive: it exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}

/// Every process of an upgrade chain, newest last; kills the survivors on
/// drop.
#[derive(Default)]
struct Chain {
    pids: Vec<u32>,
}

impl Chain {
    fn newest(&self) -> u32 {
        *self.pids.last().expect("no process")
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for &pid in &self.pids {
            if alive(pid) {
                // SAFETY: kill(2) on a process this test started.
                unsafe { kill(pid as i32, SIGKILL) };
            }
        }
        for &pid in &self.pids {
            eventually(PATIENCE, || !alive(pid));
        }
    }
}

/// The value of `key=` in the first log line after `mark` containing
/// `needle`; panics with the log if there is none.
fn logged(proxy: &Proxy, mark: usize, needle: &str, key: &str) -> String {
    let line = proxy
        .wait_for_log_after(mark, needle, PATIENCE)
        .unwrap_or_else(|| panic!("no {needle:?} line; log:\n{}", proxy.log_text()));
    field(&line, key).unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// The address in `<needle> ... <key>=ADDR` of the first such line.
fn logged_addr(proxy: &Proxy, needle: &str, key: &str) -> SocketAddr {
    logged(proxy, 0, needle, key).parse().unwrap()
}

/// Upgrades the newest process of `chain` (SIGUSR2, or `edgeproxy upgrade`
/// on `socket`), waits until the successor serves and the old process has
/// stopped accepting; returns the successor's pid.
fn upgrade(proxy: &Proxy, chain: &mut Chain, socket: Option<&Path>) -> u32 {
    let old = chain.newest();
    let mark = proxy.log_mark();
    match socket {
        None => {
            // SAFETY: kill(2) on a process of this test's chain.
            assert_eq!(unsafe { kill(old as i32, SIGUSR2) }, 0);
        }
        Some(path) => {
            let (status, out, err) =
                run_to_end(&["upgrade", "--socket", path.to_str().unwrap()], &[]);
            assert!(status.success(), "edgeproxy upgrade failed: {out}{err}");
            assert!(out.contains("upgraded"), "{out}");
        }
    }
    let new: u32 = logged(proxy, mark, "upgrade: new process is ready", "pid")
        .parse()
        .unwrap();
    chain.pids.push(new);
    assert_ne!(new, old);
    proxy
        .wait_for_log_after(mark, "upgrade: stopped accepting", PATIENCE)
        .unwrap_or_else(|| panic!("old process did not stop; log:\n{}", proxy.log_text()));
    new
}

/// Client threads opening connections back to back (greeting, one echo,
/// close) until stopped.
struct Churn {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<(usize, Vec<String>)>>,
}

impl Churn {
    fn start(proxy: SocketAddr, clients: usize) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|c| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        match round_trip(proxy, c) {
                            Ok(()) => ok += 1,
                            Err(e) => failed.push(e),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Churn { stop, threads }
    }

    /// Stops the clients; returns the round trips that succeeded, panicking
    /// if any failed.
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failed) = (0, Vec::new());
        for t in self.threads {
            let (o, f) = t.join().unwrap();
            ok += o;
            failed.extend(f);
        }
        assert!(
            failed.is_empty(),
            "{} of {} new connections failed: {:?}",
            failed.len(),
            ok + failed.len(),
            &failed[..failed.len().min(10)]
        );
        ok
    }
}

fn round_trip(proxy: SocketAddr, client: usize) -> Result<(), String> {
    let stream =
        TcpStream::connect_timeout(&proxy, PATIENCE).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    read_line(&stream).ok_or("no greeting")?;
    let msg = format!("client {client}\n");
    (&stream)
        .write_all(msg.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    match read_line(&stream) {
        Some(back) if back == msg.trim_end() => Ok(()),
        Some(back) => Err(format!("echo {back:?}")),
        None => Err("no echo".into()),
    }
}

/// Requests to the discovery API, metrics and DNS, one new connection (or
/// datagram) each, back to back until stopped.
struct Services {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(usize, Vec<String>)>,
}

impl Services {
    fn start(api: SocketAddr, metrics: SocketAddr, dns: SocketAddr) -> Services {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            let mut id = 0u16;
            // At least one round, even if stopped at once.
            while id == 0 || !flag.load(Ordering::Relaxed) {
                id = id.wrapping_add(1);
                for result in [
                    http_get(api, "/health").map(|_| ()),
                    http_get(metrics, "/metrics").map(|_| ()),
                    dns_query(dns, id),
                ] {
                    match result {
                        Ok(()) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        });
        Services { stop, thread }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let (ok, failed) = self.thread.join().unwrap();
        assert!(
            failed.is_empty(),
            "{} of {} API/metrics/DNS requests failed: {:?}",
            failed.len(),
            ok + failed.len(),
            &failed[..failed.len().min(10)]
        );
        ok
    }
}

/// A GET on a new connection; the response if its status is 200.
fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, PATIENCE).map_err(|e| format!("{path}: connect: {e}"))?;
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{path}: write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("{path}: read: {e}"))?;
    match text.starts_with("HTTP/1.1 200") {
        true => Ok(text),
        false => Err(format!("{path}: {:?}", text.lines().next())),
    }
}

/// An A query for `web.internal` over UDP; any answer with our id counts.
fn dns_query(addr: SocketAddr, id: u16) -> Result<(), String> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["web", "internal"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket
        .send_to(&q, addr)
        .map_err(|e| format!("dns send: {e}"))?;
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .map_err(|e| format!("dns query {id}: no answer: {e}"))?;
    if n < 12 || buf[..2] != id.to_be_bytes() || buf[2] & 0x80 == 0 {
        return Err(format!(
            "dns query {id}: bad answer {:?}",
            &buf[..n.min(12)]
        ));
    }
    Ok(())
}

/// A running proxy with two echo backends, every service on, the binary
/// at `exe`.
struct Setup {
    dir: TempDir,
    _backends: Vec<TagBackend>,
    proxy: Proxy,
    chain: Chain,
}

fn config_text(db: &Path, control: &Path, extra: &str) -> String {
    format!(
        "[routing]\ndb_path = {db:?}\nreload_interval_ms = 100\n\n[runtime]\nshards = 2\n\n\
         [limits]\nshutdown_grace_secs = 120\n\n\
         [api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n\n\
         [metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n\n\
         [dns]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\nudp_workers = 2\n\n\
         [upgrade]\ncontrol_socket = {control:?}\n{extra}\n\
         [[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n",
        db = db.display().to_string(),
        control = control.display().to_string(),
    )
}

impl Setup {
    fn start(tag: &str, exe: Option<&Path>, extra: &str) -> Setup {
        let dir = TempDir::new(tag);
        let backends = vec![TagBackend::start("a"), TagBackend::start("b")];
        let db = Db::create(dir.join("routing.db"));
        for b in &backends {
            db.upsert(&Row::new(&b.name, "web", "sa", b.port()));
        }
        let control = dir.join("ctl.sock");
        let path = dir.join("edgeproxy.toml");
        std::fs::write(&path, config_text(&db.path, &control, extra)).unwrap();
        let exe = exe
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(BIN));
        let proxy = Proxy::spawn_exe(
            &exe,
            &["--config", path.to_str().unwrap()],
            &[],
            Some("info"),
        )
        .ready();
        let chain = Chain {
            pids: vec![proxy.pid()],
        };
        Setup {
            dir,
            _backends: backends,
            proxy,
            chain,
        }
    }

    fn control_socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    fn rewrite_config(&self, extra: &str) {
        let text = config_text(&self.dir.join("routing.db"), &self.control_socket(), extra);
        std::fs::write(self.dir.join("edgeproxy.toml"), text).unwrap();
    }

    fn services(&self) -> Services {
        Services::start(
            logged_addr(&self.proxy, "api listening", "addr"),
            logged_addr(&self.proxy, "metrics listening", "addr"),
            logged_addr(&self.proxy, "dns listening", "udp"),
        )
    }
}

fn open_streams(proxy: SocketAddr, count: usize, seed: u64, stop: &Arc<AtomicBool>) -> Vec<Stream> {
    let streams: Vec<Stream> = (0..count)
        .map(|i| start_stream(proxy, seed + i as u64, stop))
        .collect();
    assert_eq!(
        stalled_since(&streams, &vec![0; count]),
        0,
        "some streams never got an echo"
    );
    streams
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The names of `pid`'s threads.
fn threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

/// What `pid`'s descriptors are, by kind (`socket`, `anon_inode:[io_uring]`,
/// a path), with counts: for messages.
fn fd_kinds(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(entry.path())
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        let kind = match target.split_once(":[") {
            Some((k, rest)) if k == "anon_inode" => format!("{k}:{rest}"),
            Some((k, _)) => k.to_string(),
            None => target,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

#[test]
fn one_upgrade_under_streaming_load_fails_no_connection() {
    let mut s = Setup::start("upgrade-one", None, "");
    let addr = s.proxy.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let streams = open_streams(addr, STREAMS, 1, &stop);
    let churn = Churn::start(addr, 4);
    let services = s.services();
    std::thread::sleep(Duration::from_millis(500));

    let old = s.chain.newest();
    let new = upgrade(&s.proxy, &mut s.chain, None);
    assert!(alive(old), "the old process must drain, not die");
    // New connections now reach only the new process; let them run a while.
    std::thread::sleep(Duration::from_secs(1));
    let round_trips = churn.finish();
    let requests = services.finish();

    // The streams, all on the old process, are still moving after it
    // stopped accepting.
    let stalled = stalled_since(&streams, &progress(&streams));
    assert_eq!(stalled, 0, "{stalled} streams stalled after the upgrade");
    stop.store(true, Ordering::Relaxed);
    let bytes =
        finish(streams).unwrap_or_else(|f| panic!("{} streams failed:\n{}", f.len(), f.join("\n")));
    // With its last connection closed the old process exits, cleanly.
    let status = s
        .proxy
        .wait_exit(PATIENCE)
        .expect("old process did not exit after draining");
    assert!(status.success(), "old process exited with {status}");
    // It was not stopped by a signal, and does not say it was (QA: the
    // stop line with its "second SIGTERM" came after every upgrade).
    let said = s
        .proxy
        .log_lines_after(0, "shutting down: stopped accepting");
    assert!(said.is_empty(), "{said:#?}");
    assert!(alive(new));
    // And the new one serves.
    round_trip(addr, 0).unwrap();
    // It owns the control socket now: stopping, it removes the file its
    // predecessor created (and the predecessor left in place for it).
    assert!(s.control_socket().exists());
    // SAFETY: kill(2) on a process of this test's chain.
    assert_eq!(unsafe { kill(new as i32, SIGTERM) }, 0);
    assert!(
        eventually(PATIENCE, || !alive(new)),
        "new process did not stop"
    );
    assert!(!s.control_socket().exists(), "control socket left behind");
    eprintln!("1 upgrade: {round_trips} new connections, {requests} API/metrics/DNS requests, {bytes} stream bytes, no failure");
}

/// The old process of an upgrade, draining, stops at a SIGTERM (or SIGINT)
/// as a stopping process does at a second one: what it still holds is
/// closed and it exits 0. A SIGUSR2 it is sent meanwhile is said to be
/// ignored. QA: it went on for the whole grace period (here
/// 120 s; up to a day), saying nothing, and under systemd was SIGKILLed.
#[test]
fn the_old_process_stops_draining_at_a_stop_signal() {
    let mut s = Setup::start("upgrade-term", None, "");
    let (name, mut held) = connect_tagged(s.proxy.addr());
    assert!(["a", "b"].contains(&name.as_str()), "{name}");
    let old = s.chain.newest();
    let new = upgrade(&s.proxy, &mut s.chain, None);
    assert!(alive(old), "the old process drains its connection");

    // SIGUSR2 is for the successor: the draining process says so (QA: it
    // was swallowed without a word, as `kill -USR2 $(pidof edgeproxy)`
    // sends it to both processes while one drains).
    let mark = s.proxy.log_mark();
    // SAFETY: kill(2) on a process of this test's chain.
    assert_eq!(unsafe { kill(old as i32, SIGUSR2) }, 0);
    let line = s
        .proxy
        .wait_for_log_after(mark, "SIGUSR2 ignored", PATIENCE)
        .unwrap_or_else(|| panic!("no word; log:\n{}", s.proxy.log_text()));
    assert_eq!(field(&line, "successor"), Some(new.to_string()), "{line}");
    assert!(s
        .proxy
        .log_lines_after(mark, "upgrade requested")
        .is_empty());

    let mark = s.proxy.log_mark();
    // SAFETY: kill(2) on a process of this test's chain.
    assert_eq!(unsafe { kill(old as i32, SIGTERM) }, 0);
    assert!(
        eventually(PATIENCE, || !alive(old)),
        "old process still draining; log:\n{}",
        s.proxy.log_text()
    );
    // (No wait for its log pipes to close: the successor holds them.)
    assert_reaped_cleanly(&mut s.proxy);
    s.proxy
        .wait_for_log_after(mark, "closing open connections now", PATIENCE)
        .unwrap_or_else(|| panic!("no word; log:\n{}", s.proxy.log_text()));
    // Its connection was closed, not left to the grace period.
    held.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut rest = Vec::new();
    let _ = held.read_to_end(&mut rest);
    // The new process serves on.
    assert!(alive(new));
    round_trip(s.proxy.addr(), 0).unwrap();
}

/// Once its drain is over, the old process exits as soon as it has said
/// "shutdown complete", as a stopped one does. QA reported a second more
/// after an upgrade; measured here (with and without a connection to
/// drain, by SIGUSR2 or the control socket, as the second of a chain) it
/// is under the 20 ms this polls at.
#[test]
fn the_old_process_exits_promptly_once_its_drain_is_over() {
    let mut s = Setup::start("upgrade-exit", None, "");
    let old = s.chain.newest();
    let (_, held) = connect_tagged(s.proxy.addr());
    let mark = s.proxy.log_mark();
    upgrade(&s.proxy, &mut s.chain, None);
    // Its drain ends with its last connection.
    drop(held);
    s.proxy
        .wait_for_log_after(mark, "shutdown complete", PATIENCE)
        .unwrap_or_else(|| panic!("no end of drain; log:\n{}", s.proxy.log_text()));
    let said = std::time::Instant::now();
    assert!(
        eventually(PATIENCE, || !alive(old)),
        "old process still runs"
    );
    let took = said.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "the old process exited {took:?} after \"shutdown complete\""
    );
    // (Not `wait_exit` with a timeout: after the exit it waits that long
    // for the log pipes to close, which the successor holds, and reads as
    // a slow exit.)
    assert_reaped_cleanly(&mut s.proxy);
}

/// Reaps the old process of an upgrade and checks it exited with success.
/// Its main thread may show as a zombie while its other threads still end,
/// before it can be reaped: asks until it is.
fn assert_reaped_cleanly(proxy: &mut Proxy) {
    let mut status = None;
    assert!(
        eventually(PATIENCE, || {
            status = proxy.wait_exit(Duration::ZERO);
            status.is_some()
        }),
        "the old process was never reaped"
    );
    let status = status.expect("reaped");
    assert!(status.success(), "old process exited with {status}");
}

#[test]
fn ten_upgrades_in_a_row_fail_no_connection() {
    let mut s = Setup::start("upgrade-ten", None, "");
    let addr = s.proxy.addr();
    // Descriptors of the first process once every service has served (the
    // DNS workers' runtimes start with the control loop, after `ready`).
    s.services().finish();
    let fds_at_start = open_fds(s.chain.newest());
    let kinds_at_start = fd_kinds(s.chain.newest());
    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = open_streams(addr, STREAMS, 1, &stop);
    let churn = Churn::start(addr, 4);
    let services = s.services();
    let control = s.control_socket();
    for i in 0..10 {
        // Alternate the two ways to ask.
        let by_cli = i % 2 == 1;
        upgrade(&s.proxy, &mut s.chain, by_cli.then_some(control.as_path()));
        // Each generation gets streams of its own to drain.
        streams.extend(open_streams(addr, 10, 1000 * (i + 1), &stop));
    }
    std::thread::sleep(Duration::from_millis(500));
    let round_trips = churn.finish();
    let requests = services.finish();
    let stalled = stalled_since(&streams, &progress(&streams));
    assert_eq!(stalled, 0, "{stalled} streams stalled");
    stop.store(true, Ordering::Relaxed);
    let total_streams = streams.len();
    let bytes =
        finish(streams).unwrap_or_else(|f| panic!("{} streams failed:\n{}", f.len(), f.join("\n")));

    // Every old process drained its streams and exited; the newest serves.
    let newest = s.chain.newest();
    for &pid in &s.chain.pids[..s.chain.pids.len() - 1] {
        assert!(
            eventually(PATIENCE, || !alive(pid)),
            "process {pid} still running after its streams ended"
        );
    }
    assert!(s
        .proxy
        .wait_exit(PATIENCE)
        .expect("first process exited")
        .success());
    assert!(alive(newest));
    round_trip(addr, 0).unwrap();
    // Nothing leaked from generation to generation: the newest process,
    // idle once its streams' sockets are closed, holds as many descriptors
    // as the first did.
    let mut fds_now = 0;
    let same = eventually(PATIENCE, || {
        fds_now = open_fds(newest);
        fds_now <= fds_at_start
    });
    assert!(
        same,
        "descriptors: {fds_at_start} in the first process, {fds_now} after ten upgrades\n\
         first: {kinds_at_start:?}\nnow: {:?}\nthreads now: {:?}",
        fd_kinds(newest),
        threads(newest)
    );
    eprintln!("10 upgrades: {round_trips} new connections, {requests} API/metrics/DNS requests, {total_streams} streams with {bytes} bytes, no failure");
}

/// Replaces the file at `path` the way a package manager installs a new
/// binary: a new file renamed over the old path (the running process keeps
/// its old inode).
fn install(path: &Path, from: &Path) {
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(from, &tmp).is_err() {
        std::fs::copy(from, &tmp).unwrap();
    }
    std::fs::rename(&tmp, path).unwrap();
}

fn install_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let script = path.with_extension("script");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    install(path, &script);
}

/// The error `check-config` prints for the configuration file `config`
/// (several lines for a TOML syntax error), without its `edgeproxy: error: `
/// prefix.
fn toml_error_lines(config: &Path) -> String {
    let path = config.to_str().unwrap();
    let (status, _, err) = run_to_end(&["--config", path, "check-config", "--no-bind"], &[]);
    assert!(!status.success(), "check-config accepted {path}");
    let text = err.trim_end().trim_start_matches("edgeproxy: error: ");
    assert!(
        text.lines().count() >= 3 && text.contains('^'),
        "not a multi-line TOML error: {text}"
    );
    text.to_string()
}

/// `edgeproxy upgrade` against the control socket: (succeeded, output).
fn cli_upgrade(control: &Path) -> (bool, String) {
    let (status, out, err) = run_to_end(&["upgrade", "--socket", control.to_str().unwrap()], &[]);
    (status.success(), format!("{out}{err}"))
}

#[test]
fn a_new_binary_that_fails_to_start_leaves_the_old_one_serving() {
    let dir = TempDir::new("upgrade-bin");
    let exe = dir.join("edgeproxy");
    install(&exe, Path::new(BIN));
    let mut s = Setup::start("upgrade-fail", Some(&exe), "ready_timeout_secs = 3\n");
    let addr = s.proxy.addr();
    let first = s.chain.newest();
    let churn = Churn::start(addr, 3);
    let services = s.services();
    let control = s.control_socket();

    // 1. The new file is not even a working binary: it exits at once.
    install_script(&exe, "echo 'broken build' >&2\nexit 3");
    let (ok, out) = cli_upgrade(&control);
    assert!(!ok, "{out}");
    assert!(
        out.contains("exited (exit code 3) before it was ready"),
        "{out}"
    );
    assert!(out.contains("keeps serving"), "{out}");

    // 2. It hangs: killed after ready_timeout_secs.
    install_script(&exe, "exec sleep 600");
    let mark = s.proxy.log_mark();
    let (ok, out) = cli_upgrade(&control);
    assert!(!ok, "{out}");
    assert!(out.contains("not ready within 3s; killed it"), "{out}");
    let hung: u32 = logged(&s.proxy, mark, "upgrade: new process started", "pid")
        .parse()
        .unwrap();
    assert!(
        eventually(PATIENCE, || !alive(hung)),
        "the hung binary {hung} was left running"
    );

    // 3. The real binary again, but the configuration it reads is wrong.
    install(&exe, Path::new(BIN));
    s.rewrite_config("ready_timeout_secs = 0\n");
    let (ok, out) = cli_upgrade(&control);
    assert!(!ok, "{out}");
    assert!(out.contains("upgrade.ready_timeout_secs"), "{out}");

    // 3b. A TOML syntax error: its whole text, the lines that point at the
    //     spot included (only its first line was shown).
    s.rewrite_config("ready_timeout_secs = = 3\n");
    let (ok, out) = cli_upgrade(&control);
    assert!(!ok, "{out}");
    let expected = toml_error_lines(&s.dir.join("edgeproxy.toml"));
    for line in expected.lines().filter(|l| !l.trim().is_empty()) {
        assert!(out.contains(line), "{line:?} is missing from:\n{out}");
    }
    s.rewrite_config("ready_timeout_secs = 0\n");

    // 4. SIGUSR2 with the same bad configuration: refused, logged.
    let mark = s.proxy.log_mark();
    // SAFETY: kill(2) on the test's own proxy.
    assert_eq!(unsafe { kill(first as i32, SIGUSR2) }, 0);
    let line = s
        .proxy
        .wait_for_log_after(mark, "upgrade failed; this process keeps serving", PATIENCE)
        .unwrap();
    assert!(line.contains("upgrade.ready_timeout_secs"), "{line}");

    // Through all of it the first process served every connection.
    assert!(alive(first));
    std::thread::sleep(Duration::from_millis(300));
    round_trip(addr, 0).unwrap();

    // 5. Fixed: the upgrade goes through, and the new process runs the
    //    file now at the path.
    s.rewrite_config("ready_timeout_secs = 3\n");
    let new = upgrade(&s.proxy, &mut s.chain, Some(&control));
    let running = std::fs::read_link(format!("/proc/{new}/exe")).unwrap();
    assert_eq!(running, exe, "the successor runs {}", running.display());
    std::thread::sleep(Duration::from_millis(300));
    let round_trips = churn.finish();
    let requests = services.finish();
    assert!(s
        .proxy
        .wait_exit(PATIENCE)
        .expect("old process exited")
        .success());
    eprintln!("4 failed upgrades and 1 good one: {round_trips} new connections, {requests} API/metrics/DNS requests, no failure");
}

/// A SIGHUP that reaches the new process before it has its handlers
/// (`kill -HUP $(pidof edgeproxy)`, `pkill -HUP edgeproxy`, a logrotate
/// hook, during an upgrade) used to get the default action: the successor
/// died (`killed by signal 1`), the upgrade failed and the reload was lost.
/// It now waits, blocked, until the new process can handle it. The "new
/// binary" is a wrapper that sends itself the SIGHUP before it runs the
/// proxy: the earliest a signal can arrive.
#[test]
fn a_reload_signal_at_a_starting_successor_waits_for_it() {
    let dir = TempDir::new("upgrade-early-hup");
    let exe = dir.join("edgeproxy");
    install(&exe, Path::new(BIN));
    let mut s = Setup::start("upgrade-early-hup", Some(&exe), "");
    let churn = Churn::start(s.proxy.addr(), 2);
    install_script(&exe, &format!("kill -HUP $$\nexec {BIN} \"$@\""));
    let mark = s.proxy.log_mark();
    let (ok, out) = cli_upgrade(&s.control_socket());
    assert!(ok, "{out}");
    let new: u32 = logged(&s.proxy, mark, "upgrade: new process is ready", "pid")
        .parse()
        .unwrap();
    s.chain.pids.push(new);
    // The successor applies the reload it was sent once it can.
    s.proxy
        .wait_for_log_after(mark, "SIGHUP: re-reading configuration", PATIENCE)
        .unwrap_or_else(|| panic!("the early SIGHUP was lost; log:\n{}", s.proxy.log_text()));
    assert!(alive(new));
    let round_trips = churn.finish();
    eprintln!("{round_trips} new connections across the upgrade, none failed");
}

/// A SIGHUP to the old process while the new one starts (systemd's
/// `ExecReload` signals `$MAINPID`, still the old process until the new one
/// is ready) was applied by the old process only: the new one had read the
/// file before the edit, served the old version once it took over, and the
/// reload was lost. The old process now passes it on. The new process is
/// held between reading its file and reporting ready by a PostgreSQL source
/// that does not answer (connect timeout 2 s). The listener the reload adds
/// is on a fixed port, which the old process holds until the new one is
/// ready.
/// A binary upgrade held in flight: the new process has read its config
/// file (it logged taking over the old one's sockets) and waits for a
/// PostgreSQL source that does not answer (connect timeout 2 s) before it
/// reports ready. `extra_addr` is a fixed port of its own for a listener
/// the test adds meanwhile (both processes may start it, the old first).
struct UpgradeInFlight {
    proxy: Proxy,
    chain: Chain,
    mark: usize,
    cli: Option<JoinHandle<(bool, String)>>,
    extra_addr: SocketAddr,
    path: PathBuf,
    db: Db,
    /// The config's sections before the listeners.
    head: String,
    _hole: Blackhole,
    _backend: TagBackend,
    _dir: TempDir,
}

impl UpgradeInFlight {
    fn start(name: &str, head: &str) -> UpgradeInFlight {
        let hole = Blackhole::start();
        let dir = TempDir::new(name);
        let backend = TagBackend::start("a");
        let db = Db::create(dir.join("routing.db"));
        db.upsert(&Row::new("a", "web", "sa", backend.port()));
        let control = dir.join("ctl.sock");
        let head = format!(
            "{head}[postgres]\nenabled = true\nurl = \"postgres://u:p@{hole}/db\"\n\
             connect_timeout_secs = 2\nquery_timeout_secs = 1\n\n\
             [upgrade]\ncontrol_socket = {control:?}\n\n",
            hole = hole.addr
        );
        let path = dir.join("edgeproxy.toml");
        let extra_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        write_listeners(&path, &db, &head, "");
        let proxy = Proxy::spawn_exe(
            Path::new(BIN),
            &["--config", path.to_str().unwrap()],
            &[],
            Some("info"),
        )
        .ready();
        let chain = Chain {
            pids: vec![proxy.pid()],
        };
        let mark = proxy.log_mark();
        let cli = std::thread::spawn(move || cli_upgrade(&control));
        proxy
            .wait_for_log_after(
                mark,
                "upgrade: took over the previous process's sockets",
                PATIENCE,
            )
            .expect("the new process started");
        UpgradeInFlight {
            proxy,
            chain,
            mark,
            cli: Some(cli),
            extra_addr,
            path,
            db,
            head,
            _hole: hole,
            _backend: backend,
            _dir: dir,
        }
    }

    /// Adds the `extra` listener on `extra_addr` to the file.
    fn add_extra_listener(&self) {
        let extra = format!(
            "[[listener]]\nname = \"extra\"\naddr = \"{}\"\n",
            self.extra_addr
        );
        write_listeners(&self.path, &self.db, &self.head, &extra);
    }

    /// Waits for the upgrade to end; returns the new process's pid.
    fn finish(&mut self) -> u32 {
        let (ok, out) = self.cli.take().expect("finished once").join().unwrap();
        assert!(ok, "{out}");
        let new: u32 = logged(
            &self.proxy,
            self.mark,
            "upgrade: new process is ready",
            "pid",
        )
        .parse()
        .unwrap();
        self.chain.pids.push(new);
        new
    }
}

/// Writes the config file at `path`: `head`, the `main` listener, then
/// `extra` lines.
fn write_listeners(path: &Path, db: &Db, head: &str, extra: &str) {
    let text = format!("{head}[[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n{extra}");
    std::fs::write(path, config(&db.path, &text)).unwrap();
}

#[test]
fn a_reload_during_an_upgrade_reaches_the_new_process() {
    let mut u = UpgradeInFlight::start("upgrade-reload-during", "");
    u.add_extra_listener();
    signal_pid(u.chain.newest(), SIGHUP);
    u.finish();
    let (proxy, mark, extra_addr) = (&u.proxy, u.mark, u.extra_addr);
    // Both processes start the listener the reload added: the old one at
    // the SIGHUP, the new one when it is passed on.
    assert!(
        proxy.wait_for_log_count_after(mark, "listening listener=extra", 2, PATIENCE),
        "the reload was lost; log:\n{}",
        proxy.log_text()
    );
    // Once the old process is gone, the new one serves it. QA: on a fixed
    // port the new process found it in use by the old one ("Address already
    // in use") and the listener was gone with the old process.
    let old = u.chain.pids[0];
    assert!(
        eventually(PATIENCE, || !alive(old)),
        "the old process did not exit"
    );
    round_trip(extra_addr, 0).unwrap_or_else(|e| {
        panic!(
            "nothing serves {extra_addr}: {e}; log:\n{}",
            proxy.log_text()
        )
    });
}

/// `[config_watch]` on: an edit to the config file while an upgrade is in
/// flight (the new process has read its file, before it reports ready)
/// adds a listener on a fixed port; once the old process is gone, that
/// listener answers, from the new process, which applied the edit as soon
/// as it was ready. The new process is held between reading its file and
/// ready by a PostgreSQL source that does not answer (connect timeout 2 s);
/// the old one's watch (1 s) sees the edit within that time and applies it
/// too, so both bind the port.
#[test]
fn a_config_file_edit_during_an_upgrade_is_applied_by_the_new_process() {
    let mut u = UpgradeInFlight::start(
        "upgrade-watch-during",
        "[config_watch]\nenabled = true\ninterval_secs = 1\n\n",
    );
    let (mark, extra_addr, old) = (u.mark, u.extra_addr, u.chain.pids[0]);
    // The case at hand: the upgrade is still in flight.
    assert!(
        u.proxy
            .log_lines_after(mark, "upgrade: new process is ready")
            .is_empty(),
        "the new process was ready before the edit"
    );
    u.add_extra_listener();
    let new = u.finish();
    let proxy = &u.proxy;
    // Only the new process is left.
    assert!(
        eventually(PATIENCE, || !alive(old)),
        "the old process did not exit; log:\n{}",
        proxy.log_text()
    );
    assert!(
        eventually(PATIENCE, || matches!(
            probe(extra_addr, Duration::from_millis(500)),
            Probe::Data(_)
        )),
        "the edit was lost: nothing serves {extra_addr} once the old process is gone; log:\n{}",
        proxy.log_text()
    );
    assert!(alive(new));
    round_trip(extra_addr, 0).unwrap();
    // And at once: the old process stopped serving `extra` when the new one
    // was ready, so each moment the new one waits is a moment nothing
    // listens there. QA: it waited for its first check, one interval
    // (default 5 s) after it was ready.
    let ready = proxy
        .log_lines_after(mark, "edgeproxy ready")
        .into_iter()
        .find(|l| field(l, "pid") == Some(new.to_string()))
        .expect("the new process's ready line");
    let bound = proxy
        .log_lines_after(mark, "listening listener=extra")
        .pop()
        .unwrap();
    let late = log_time(&bound) - log_time(&ready);
    eprintln!("figure: the new process served the edit {late:.3} s after it was ready");
    assert!(
        late < 0.5,
        "the new process applied the edit {late:.3} s after it was ready (watch interval 1 s)\n{ready}\n{bound}"
    );
}

/// The time of a log line in seconds of its day (tracing's RFC 3339
/// timestamp, UTC).
fn log_time(line: &str) -> f64 {
    let stamp = line.split_whitespace().next().unwrap_or("");
    let time = stamp.split('T').nth(1).unwrap_or("").trim_end_matches('Z');
    time.split(':')
        .map(|p| p.parse::<f64>().unwrap_or(f64::NAN))
        .fold(0.0, |acc, part| acc * 60.0 + part)
}

#[test]
fn a_successor_keeps_the_listeners_it_is_configured_with_and_closes_the_rest() {
    let mut s = Setup::start("upgrade-listeners", None, "");
    let main = s.proxy.addr();
    // Add a listener through the configuration the successor reads: it
    // is bound fresh; `main` is taken over on its port.
    let text = std::fs::read_to_string(s.dir.join("edgeproxy.toml")).unwrap();
    let extra_listener = "\n[[listener]]\nname = \"extra\"\naddr = \"127.0.0.1:0\"\n";
    std::fs::write(
        s.dir.join("edgeproxy.toml"),
        format!("{text}{extra_listener}"),
    )
    .unwrap();
    let mark = s.proxy.log_mark();
    upgrade(&s.proxy, &mut s.chain, None);
    let took = logged(&s.proxy, mark, "upgrade: took over listener", "listener");
    assert_eq!(took, "main");
    let extra: SocketAddr = s
        .proxy
        .wait_for_log_where(
            mark,
            |l| l.contains(" listening ") && l.contains("listener=extra"),
            PATIENCE,
        )
        .and_then(|l| field(&l, "addr"))
        .expect("extra listener")
        .parse()
        .unwrap();
    round_trip(main, 0).unwrap();
    round_trip(extra, 0).unwrap();

    // Now the configuration drops `main`: the next successor closes it.
    std::fs::write(
        s.dir.join("edgeproxy.toml"),
        format!(
            "{}{}",
            text.replace(
                "[[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n",
                ""
            ),
            extra_listener
        ),
    )
    .unwrap();
    let mark = s.proxy.log_mark();
    upgrade(&s.proxy, &mut s.chain, None);
    let closed = logged(
        &s.proxy,
        mark,
        "inherited socket not used by this configuration",
        "name",
    );
    assert_eq!(closed, "listener:main");
    round_trip(extra, 0).unwrap();
    // Once every holder let go, nothing listens on main's port any more.
    assert!(
        eventually(PATIENCE, || matches!(
            probe(main, Duration::from_millis(100)),
            Probe::Refused
        )),
        "main's port still accepts"
    );
}

/// The new "binary" is a wrapper script that starts a long-lived child and
/// never runs the proxy. The child inherited the hand-off channel, in whose
/// queue the old process's sockets wait: the failed upgrade must kill it
/// with the script, or once the old process stops its ports still listen,
/// with nobody to accept (clients hang) and nothing able to bind them.
#[test]
fn a_failed_upgrade_leaves_nothing_holding_the_sockets() {
    let dir = TempDir::new("upgrade-orphan-bin");
    let exe = dir.join("edgeproxy");
    install(&exe, Path::new(BIN));
    let mut s = Setup::start("upgrade-orphan", Some(&exe), "ready_timeout_secs = 1\n");
    let addr = s.proxy.addr();
    let api = logged_addr(&s.proxy, "api listening", "addr");
    let control = s.control_socket();

    let pid_file = dir.join("child.pid");
    install_script(
        &exe,
        &format!(
            "sleep 600 &\necho $! > {:?}\nwait",
            pid_file.display().to_string()
        ),
    );
    let (ok, out) = cli_upgrade(&control);
    assert!(!ok, "{out}");
    assert!(out.contains("not ready within 1s; killed it"), "{out}");
    // The script wrote its child's pid before the upgrade gave up on it.
    let child: u32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
        .trim()
        .parse()
        .unwrap();
    // Killed when the test ends, whatever happens to it.
    let _child = Chain { pids: vec![child] };

    serves_on_then_stops_and_frees_its_ports(
        &mut s,
        [addr, api],
        &format!("the script's child {child} alive: {}", alive(child)),
    );
    assert!(
        !alive(child),
        "the script's child {child} outlived the failed upgrade"
    );
}

/// The children of `pid` in a process group that is neither `pid`'s nor
/// led by themselves: orphans reparented to it (nothing edgeproxy spawns
/// is in such a group). Zombies included.
fn adopted_children(pid: u32) -> Vec<u32> {
    let field = |stat: &str, i: usize| -> Option<u32> {
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(i)?
            .parse()
            .ok()
    };
    let stat_of = |p: u32| std::fs::read_to_string(format!("/proc/{p}/stat")).ok();
    let Some(own_group) = stat_of(pid).and_then(|s| field(&s, 2)) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            stat_of(p).is_some_and(|s| {
                field(&s, 1) == Some(pid)
                    && field(&s, 2).is_some_and(|group| group != p && group != own_group)
            })
        })
        .collect()
}

/// A health-check command that leaves a job in the background: while an
/// upgrade is attempted the old process is a child subreaper, so the job,
/// orphaned when the command exits, becomes the old process's child instead
/// of init's. The attempt fails; when the jobs exit, the old process must
/// reap them, or each stays a zombie for as long as it runs.
#[test]
fn orphans_adopted_during_a_failed_upgrade_are_reaped_when_they_exit() {
    let dir = TempDir::new("upgrade-adopted-bin");
    let exe = dir.join("edgeproxy");
    install(&exe, Path::new(BIN));
    let extra = "ready_timeout_secs = 1

[health]
enabled = true
type = \"script\"
                 interval_ms = 100
timeout_ms = 100
command = \"sleep 2 &\"
";
    let mut s = Setup::start("upgrade-adopted", Some(&exe), extra);
    let addr = s.proxy.addr();
    let api = logged_addr(&s.proxy, "api listening", "addr");
    let control = s.control_socket();
    install_script(&exe, "exec sleep 600");
    let (ok, out) = cli_upgrade(&control);
    assert!(!ok, "{out}");
    let pid = s.proxy.pid();
    let adopted = adopted_children(pid);
    assert!(
        !adopted.is_empty(),
        "no background job was reparented to the proxy during the attempt"
    );
    // Each exits within 2 s; after the attempt, new orphans go to init.
    assert!(
        eventually(PATIENCE, || adopted_children(pid).is_empty()),
        "adopted orphans left unreaped: {:?} of {} adopted",
        adopted_children(pid),
        adopted.len()
    );
    serves_on_then_stops_and_frees_its_ports(&mut s, [addr, api], "");
}

/// QA: while an attempt was pending (up to `ready_timeout_secs`), the
/// orphans it adopted piled up as zombies until it ended (109 after 30 s
/// with a 200 ms check). They are reaped as the attempt goes on.
#[test]
fn orphans_adopted_while_an_upgrade_is_pending_are_reaped_meanwhile() {
    let dir = TempDir::new("upgrade-pending-bin");
    let exe = dir.join("edgeproxy");
    install(&exe, Path::new(BIN));
    let extra = "ready_timeout_secs = 10\n\n[health]\nenabled = true\ntype = \"script\"\n\
                 interval_ms = 100\ntimeout_ms = 100\ncommand = \"sleep 0.2 &\"\n";
    let s = Setup::start("upgrade-pending", Some(&exe), extra);
    let control = s.control_socket();
    install_script(&exe, "exec sleep 600");
    let pid = s.proxy.pid();
    let attempt = std::thread::spawn(move || cli_upgrade(&control));
    let zombie = |p: &u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|st| Some(st.rsplit_once(')')?.1.split_whitespace().next()? == "Z"))
            .unwrap_or(false)
    };
    let mut seen = None;
    assert!(
        eventually(PATIENCE, || {
            seen = adopted_children(pid).into_iter().find(zombie);
            seen.is_some()
        }),
        "no adopted orphan exited during the attempt"
    );
    let seen = seen.unwrap();
    assert!(
        eventually(PATIENCE, || !adopted_children(pid).contains(&seen)),
        "the zombie {seen} was never reaped"
    );
    assert!(
        !attempt.is_finished(),
        "the zombie {seen} was reaped only when the attempt ended"
    );
    let (ok, out) = attempt.join().unwrap();
    assert!(!ok, "{out}");
}

/// The new "binary" is a wrapper script whose children leave its process
/// group, as a daemon does: one calls `setsid` (the script waits for it),
/// one is double-forked under `setsid` (its parent exits at once: it is an
/// orphan before the upgrade gives up). Both inherited the hand-off
/// channel. Killing the script's process group misses them; the failed
/// upgrade must still kill them, or the ports go on listening after the old
/// process stops, with nobody to accept.
#[test]
fn a_failed_upgrade_kills_what_left_the_process_group() {
    let dir = TempDir::new("upgrade-setsid-bin");
    let exe = dir.join("edgeproxy");
    install(&exe, Path::new(BIN));
    let mut s = Setup::start("upgrade-setsid", Some(&exe), "ready_timeout_secs = 1\n");
    let addr = s.proxy.addr();
    let api = logged_addr(&s.proxy, "api listening", "addr");
    let control = s.control_socket();

    let child_file = dir.join("child.pid");
    let daemon_file = dir.join("daemon.pid");
    install_script(
        &exe,
        &format!(
            "setsid sh -c 'echo $$ > {child:?}; exec sleep 600' &\n\
             (setsid sh -c 'echo $$ > {daemon:?}; exec sleep 600' &)\n\
             wait",
            child = child_file.display().to_string(),
            daemon = daemon_file.display().to_string(),
        ),
    );
    let (ok, out) = cli_upgrade(&control);
    assert!(!ok, "{out}");
    assert!(out.contains("not ready within 1s; killed it"), "{out}");
    let read_pid = |path: &Path| -> u32 {
        std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .parse()
            .unwrap()
    };
    let (child, daemon) = (read_pid(&child_file), read_pid(&daemon_file));
    // Killed when the test ends, whatever happens to them.
    let _left = Chain {
        pids: vec![child, daemon],
    };
    for (what, pid) in [("setsid child", child), ("double-forked daemon", daemon)] {
        assert!(
            eventually(PATIENCE, || !alive(pid)),
            "the script's {what} {pid} outlived the failed upgrade"
        );
    }

    serves_on_then_stops_and_frees_its_ports(&mut s, [addr, api], "");
}

/// After a failed upgrade: the old process serves on, stops at SIGTERM, and
/// then nothing holds its ports (`listener`, `api`): both refuse, and the
/// listener's can be bound again. `context` is added to a failure.
fn serves_on_then_stops_and_frees_its_ports(
    s: &mut Setup,
    [addr, api]: [SocketAddr; 2],
    context: &str,
) {
    round_trip(addr, 0).unwrap();
    s.proxy.signal(SIGTERM);
    let status = s
        .proxy
        .wait_exit(PATIENCE)
        .expect("old process did not stop");
    assert!(status.success(), "old process exited with {status}");
    for (what, port) in [("listener", addr), ("api", api)] {
        let seen = probe(port, Duration::from_millis(100));
        assert_eq!(
            seen,
            Probe::Refused,
            "the {what} port {port} still accepts after the proxy stopped ({context})"
        );
    }
    std::net::TcpListener::bind(addr).expect("the listener's port cannot be bound again");
}

/// The new "binary" crashes (exit 3) at once, but a job it started in the
/// background holds the hand-off channel on. The old process must notice
/// the exit itself and report it as such, at once, rather than wait out
/// `ready_timeout_secs` (25 s here) for a `Ready` that cannot come and call
/// it a timeout.
#[test]
fn a_new_binary_that_exits_while_its_child_holds_the_channel_fails_at_once() {
    let dir = TempDir::new("upgrade-exit-bin");
    let exe = dir.join("edgeproxy");
    install(&exe, Path::new(BIN));
    let s = Setup::start("upgrade-exit", Some(&exe), "ready_timeout_secs = 25\n");
    let addr = s.proxy.addr();
    let control = s.control_socket();
    let pid_file = dir.join("job.pid");
    install_script(
        &exe,
        &format!(
            "sleep 600 &\necho $! > {:?}\nexit 3",
            pid_file.display().to_string()
        ),
    );
    let started = std::time::Instant::now();
    let (ok, out) = cli_upgrade(&control);
    let took = started.elapsed();
    let job: Option<u32> = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let _job = Chain {
        pids: job.into_iter().collect(),
    };
    assert!(!ok, "{out}");
    assert!(
        out.contains("exited (exit code 3) before it was ready"),
        "{out} (after {took:?})"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}: {out}");
    let job = job.expect("the script did not write its job's pid");
    assert!(
        eventually(PATIENCE, || !alive(job)),
        "the script's background job {job} outlived the failed upgrade"
    );
    round_trip(addr, 0).unwrap();
}

/// `edgeproxy upgrade` that gives up waiting (`--timeout`) on a successor
/// still starting says so: it did reach the proxy, which goes on with the
/// upgrade; "cannot reach the control socket" would send the operator
/// looking for the wrong problem.
#[test]
fn upgrade_that_stops_waiting_says_it_had_no_answer() {
    let dir = TempDir::new("upgrade-wait-bin");
    let exe = dir.join("edgeproxy");
    install(&exe, Path::new(BIN));
    let s = Setup::start("upgrade-wait", Some(&exe), "ready_timeout_secs = 4\n");
    let control = s.control_socket();
    install_script(&exe, "exec sleep 600");
    let (status, out, err) = run_to_end(
        &[
            "upgrade",
            "--socket",
            control.to_str().unwrap(),
            "--timeout",
            "1",
        ],
        &[],
    );
    assert!(!status.success(), "{out}{err}");
    assert!(err.contains("no answer within 1s"), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");
    // The proxy gives up on the hung binary on its own and serves on.
    s.proxy
        .wait_for_log(
            "upgrade failed; this process keeps serving",
            Duration::from_secs(15),
        )
        .unwrap_or_else(|| panic!("{}", s.proxy.log_text()));
    round_trip(s.proxy.addr(), 0).unwrap();
}

/// A → B → C while A still drains a connection: B exits as soon as C
/// serves (it has nothing to drain), while A, its parent, has up to
/// `shutdown_grace_secs` to go. A must reap B then, not leave it a zombie
/// for the rest of its drain.
#[test]
fn a_successor_that_exits_before_its_predecessor_is_reaped() {
    let mut s = Setup::start("upgrade-reap", None, "");
    let addr = s.proxy.addr();
    let control = s.control_socket();
    // Accepted by the first process, held open: it drains for up to 120 s.
    let held = TcpStream::connect_timeout(&addr, PATIENCE).unwrap();
    held.set_read_timeout(Some(PATIENCE)).unwrap();
    read_line(&held).expect("no greeting");
    let first = s.chain.newest();
    let second = upgrade(&s.proxy, &mut s.chain, None);
    let third = upgrade(&s.proxy, &mut s.chain, Some(&control));
    // The second process drained nothing: it exits.
    let parent_of = |pid: u32| -> Option<(String, u32)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let mut f = stat.rsplit_once(')')?.1.split_whitespace();
        Some((f.next()?.to_string(), f.next()?.parse().ok()?))
    };
    let reaped = eventually(
        PATIENCE,
        || !matches!(parent_of(second), Some((_, ppid)) if ppid == first),
    );
    assert!(
        reaped,
        "process {second} is still {:?} (state, parent) under {first}, which drains",
        parent_of(second)
    );
    assert!(alive(first), "the first process must still drain");
    assert!(alive(third));
    round_trip(addr, 0).unwrap();
    drop(held);
    assert!(s
        .proxy
        .wait_exit(PATIENCE)
        .expect("the first process did not exit once drained")
        .success());
}

/// `edgeproxy upgrade --pid` signals only a running edgeproxy: a process
/// named by mistake (SIGUSR2 would kill it) is left alone, with an error
/// naming it; the proxy's own pid upgrades it.
#[test]
fn upgrade_by_pid_signals_only_a_running_edgeproxy() {
    let mut s = Setup::start("upgrade-pid", None, "");
    let mut sleep = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let pid = sleep.id();
    assert!(
        eventually(PATIENCE, || std::fs::read_to_string(format!(
            "/proc/{pid}/comm"
        ))
        .is_ok_and(|c| c.trim() == "sleep")),
        "sleep did not start"
    );
    let (status, out, err) = run_to_end(&["upgrade", "--pid", &pid.to_string()], &[]);
    assert!(!status.success(), "{out}{err}");
    assert!(
        err.contains(&format!("process {pid} is not an edgeproxy")) && err.contains("\"sleep\""),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        sleep.try_wait().unwrap().is_none(),
        "the sleep process was signalled"
    );
    let _ = sleep.kill();
    let _ = sleep.wait();

    let old = s.chain.newest();
    let mark = s.proxy.log_mark();
    let (status, out, err) = run_to_end(&["upgrade", "--pid", &old.to_string()], &[]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains(&format!("sent SIGUSR2 to {old}")), "{out}");
    let new: u32 = logged(&s.proxy, mark, "upgrade: new process is ready", "pid")
        .parse()
        .unwrap();
    s.chain.pids.push(new);
    round_trip(s.proxy.addr(), 0).unwrap();
}

/// A stop signal during an upgrade: the client said "upgrade failed, the
/// running proxy keeps serving: this process is stopping" while the proxy
/// stopped.
#[test]
fn a_stop_signal_during_an_upgrade_is_not_reported_as_serving_on() {
    let dir = TempDir::new("upgrade-stop-bin");
    let exe = dir.join("edgeproxy");
    install(&exe, Path::new(BIN));
    let mut s = Setup::start("upgrade-stop", Some(&exe), "ready_timeout_secs = 30\n");
    let control = s.control_socket();
    // A new binary that never gets ready, and starts a process of its own,
    // saying so once it has.
    let pid_file = dir.join("child.pid");
    install_script(
        &exe,
        &format!(
            "sleep 600 &\necho $! > {:?}\nexec sleep 600",
            pid_file.display().to_string()
        ),
    );
    let mark = s.proxy.log_mark();
    let attempt = std::thread::spawn(move || cli_upgrade(&control));
    s.proxy
        .wait_for_log_after(mark, "upgrade requested", PATIENCE)
        .expect("the upgrade did not start");
    // The stop comes once the new process has a process of its own to kill
    // (a stop before the script's fork left nothing to kill, and no line
    // saying so: a race in CI).
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::fs::read_to_string(&pid_file).map_or(true, |p| p.trim().is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the new binary never started its child"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Killed when the test ends, whatever happens to it.
    let child: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _child = Chain { pids: vec![child] };
    s.proxy.signal(libc::SIGTERM);
    let (ok, out) = attempt.join().unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("upgrade abandoned, and the running proxy is not serving on"),
        "{out}"
    );
    assert!(!out.contains("keeps serving"), "{out}");
    s.proxy.wait_exit(PATIENCE);
    // Its last lines tell how the attempt ended, before the end (QA: the
    // new process was killed after "shutdown complete").
    let lines = s.proxy.log_lines_after(mark, "");
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {lines:#?}"))
    };
    let complete = at("shutdown complete");
    assert!(
        at("killed the processes the new process started") < complete,
        "{lines:#?}"
    );
    assert!(at("upgrade abandoned") < complete, "{lines:#?}");
}
