//! The process's life as probes and service managers see it, through the
//! real binary: `/ready` and `/live` on the metrics listener, the API and
//! metrics answering during a drain, a second stop signal ending the drain
//! at once, and systemd's notify protocol over a real NOTIFY_SOCKET.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKEN: &str = "lifecycle-token-0123456789";

struct Running {
    _dir: TempDir,
    _backend: TagBackend,
    proxy: Proxy,
    metrics: SocketAddr,
    api: SocketAddr,
    dns: SocketAddr,
}

fn start(tag: &str, grace_secs: u64, env: &[(&str, &str)]) -> Running {
    let dir = TempDir::new(tag);
    let backend = TagBackend::start("b1");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("b1", "web", "sa", backend.port()));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db.path,
            &format!(
                "[limits]\nshutdown_grace_secs = {grace_secs}\n\
                 [metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n\
                 [api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\ntoken = {TOKEN:?}\n\
                 [dns]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n"
            ),
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], env);
    let addr_of = |needle: &str| -> SocketAddr {
        let line = proxy
            .wait_for_log(needle, PATIENCE)
            .unwrap_or_else(|| panic!("no {needle:?}:\n{}", proxy.log_text()));
        field(&line, "addr").unwrap().parse().unwrap()
    };
    let metrics = addr_of("metrics listening");
    let api = addr_of("api listening");
    let dns_line = proxy.wait_for_log("dns listening", PATIENCE).unwrap();
    let dns = field(&dns_line, "udp").unwrap().parse().unwrap();
    Running {
        _dir: dir,
        _backend: backend,
        proxy,
        metrics,
        api,
        dns,
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent()
}

/// (status, body) of a GET; panics if no answer comes (a hang).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut resp = agent()
        .get(format!("http://{addr}{path}"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: no answer: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

#[test]
fn ready_and_live_then_everything_answers_during_a_drain() {
    let r = start("life-drain", 30, &[]);
    assert_eq!(get(r.metrics, "/ready"), (200, "ready\n".into()));
    assert_eq!(get(r.metrics, "/live"), (200, "live\n".into()));
    let (status, health) = get(r.api, "/health");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&health).unwrap()["status"],
        "ok"
    );

    // A connection held open keeps the drain going.
    let (_, open) = connect_tagged(r.proxy.addr());
    let mark = r.proxy.log_mark();
    r.proxy.signal(SIGTERM);
    r.proxy
        .wait_for_log_after(mark, "shutting down", PATIENCE)
        .unwrap_or_else(|| panic!("{}", r.proxy.log_text()));

    // Draining: not ready, still alive, metrics and the API answer.
    assert_eq!(get(r.metrics, "/ready"), (503, "draining\n".into()));
    assert_eq!(get(r.metrics, "/live"), (200, "live\n".into()));
    let (status, metrics) = get(r.metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("edgeproxy_connections_active 1"),
        "{metrics}"
    );
    let (status, health) = get(r.api, "/health");
    assert_eq!(status, 503);
    assert_eq!(
        serde_json::from_str::<Value>(&health).unwrap()["status"],
        "draining"
    );
    let (status, list) = get(r.api, "/api/v1/backends");
    assert_eq!(status, 503, "{list}");
    let list: Value = serde_json::from_str(&list).unwrap();
    assert!(list["error"].as_str().unwrap().contains("shutting down"));
    // The internal DNS still answers from the routing table.
    let dig = std::process::Command::new("dig")
        .args([
            &format!("@{}", r.dns.ip()),
            "-p",
            &r.dns.port().to_string(),
            "+short",
            "+time=5",
            "+tries=1",
            "b1.web.internal",
            "A",
        ])
        .output()
        .expect("dig is installed");
    assert_eq!(
        String::from_utf8_lossy(&dig.stdout).trim(),
        "127.0.0.1",
        "{}",
        String::from_utf8_lossy(&dig.stderr)
    );

    drop(open);
    let mut proxy = r.proxy;
    let status = proxy
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("did not exit:\n{}", proxy.log_text()));
    assert!(status.success());
}

/// A second SIGTERM or SIGINT during a drain stops at once, like nginx's
/// fast stop, instead of waiting out the grace period.
#[test]
fn a_second_stop_signal_ends_the_drain_at_once() {
    for (first, second) in [(SIGTERM, SIGTERM), (SIGINT, SIGINT), (SIGTERM, SIGINT)] {
        let r = start("life-fast", 600, &[]);
        let (_, open) = connect_tagged(r.proxy.addr());
        let mark = r.proxy.log_mark();
        r.proxy.signal(first);
        r.proxy
            .wait_for_log_after(mark, "shutting down", PATIENCE)
            .unwrap_or_else(|| panic!("{}", r.proxy.log_text()));
        // Still draining: the open connection is served.
        let mut proxy = r.proxy;
        assert!(proxy.wait_exit(Duration::from_millis(300)).is_none());
        let signalled = Instant::now();
        proxy.signal(second);
        let status = proxy
            .wait_exit(PATIENCE)
            .unwrap_or_else(|| panic!("a second signal did not stop it:\n{}", proxy.log_text()));
        assert!(status.success(), "exit {status}:\n{}", proxy.log_text());
        // Far from the 600 s grace period.
        assert!(signalled.elapsed() < Duration::from_secs(10));
        assert!(
            proxy
                .log_text()
                .contains("second stop signal during the drain"),
            "{}",
            proxy.log_text()
        );
        assert!(read_until_closed(&open).is_empty());
    }
}

/// Receives notifications sent to `sock` until one contains `needle`.
fn notification(sock: &UnixDatagram, needle: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {needle:?} notification");
        sock.set_read_timeout(Some(left)).unwrap();
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {needle:?} notification: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.lines().any(|l| l == needle) {
            return text;
        }
    }
}

/// systemd's Type=notify: READY=1 when up, RELOADING=1 (with
/// MONOTONIC_USEC) then READY=1 around SIGHUP, STOPPING=1 on a drain.
#[test]
fn systemd_is_notified_of_ready_reloading_and_stopping() {
    let dir = TempDir::new("life-notify");
    let socket_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    let r = start(
        "life-notify-proxy",
        30,
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let ready = notification(&sock, "READY=1");
    let status = format!(
        "STATUS=ready: 2 shard(s), listening on main {}",
        r.proxy.addr()
    );
    assert!(ready.lines().any(|l| l == status), "{ready}");

    r.proxy.signal(SIGHUP);
    let reloading = notification(&sock, "RELOADING=1");
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC: {reloading}"));
    assert!(usec.parse::<u64>().unwrap() > 0);
    notification(&sock, "READY=1");

    r.proxy.signal(SIGTERM);
    let stopping = notification(&sock, "STOPPING=1");
    assert!(
        stopping.contains("STATUS=draining 0 connection(s)"),
        "{stopping}"
    );
    let mut proxy = r.proxy;
    assert!(proxy.wait_exit(PATIENCE).unwrap().success());
}

/// A binary upgrade under systemd: the old process (the service's main
/// process, the only one `NotifyAccess=main` listens to) names the new one
/// as the main process once it is ready, so systemd does not take the old
/// one's exit for the service's.
#[test]
fn an_upgrade_tells_systemd_the_new_main_pid() {
    let dir = TempDir::new("life-mainpid");
    let socket_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    let r = start(
        "life-mainpid-proxy",
        1,
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    notification(&sock, "READY=1");
    let mark = r.proxy.log_mark();
    r.proxy.signal(12); // SIGUSR2
    let ready = r
        .proxy
        .wait_for_log_after(mark, "upgrade: new process is ready", PATIENCE)
        .unwrap_or_else(|| panic!("no successor:\n{}", r.proxy.log_text()));
    let new: u32 = field(&ready, "pid").unwrap().parse().unwrap();
    let _new = KillOnDrop(new);
    assert_ne!(new, r.proxy.pid());
    notification(&sock, &format!("MAINPID={new}"));
}
