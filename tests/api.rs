//! The discovery API against the real binary: real HTTP clients, traffic
//! through the proxy, `routing.db` read back with SQLite.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::small_disk::SmallDisk;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "test-token-0123456789abcdef";

/// A proxy with the API enabled on an ephemeral loopback port.
struct Api {
    proxy: Proxy,
    addr: SocketAddr,
    db: std::path::PathBuf,
    agent: ureq::Agent,
}

/// `[api]` with the given extra keys, affinity off (every test client is
/// 127.0.0.1, and these tests watch selection, not stickiness).
fn api_config(db: &std::path::Path, api_keys: &str) -> String {
    config(
        db,
        &format!(
            "[affinity]\nttl_secs = 0\n\n[api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n{api_keys}\n"
        ),
    )
}

impl Api {
    fn start(dir: &TempDir, api_keys: &str, env: &[(&str, &str)]) -> Api {
        let db = dir.join("routing.db");
        let path = dir.join("edgeproxy.toml");
        let toml = api_config(&db, api_keys);
        // Already there for a second start, maybe on a read-only disk.
        if std::fs::read_to_string(&path).ok().as_deref() != Some(toml.as_str()) {
            std::fs::write(&path, toml).unwrap();
        }
        let proxy = Proxy::start(&["--config", path.to_str().unwrap()], env);
        let line = proxy
            .wait_for_log("api listening", PATIENCE)
            .unwrap_or_else(|| panic!("no api listening line:\n{}", proxy.log_text()));
        let addr = field(&line, "addr").unwrap().parse().unwrap();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(PATIENCE))
            .build()
            .new_agent();
        Api {
            proxy,
            addr,
            db,
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// One request: (status, JSON body, WWW-Authenticate header).
    fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value, Option<String>) {
        let url = self.url(path);
        let auth = token.map(|t| format!("Bearer {t}"));
        let result = match method {
            "GET" => {
                let r = self.agent.get(&url);
                match &auth {
                    Some(a) => r.header("Authorization", a).call(),
                    None => r.call(),
                }
            }
            "DELETE" => {
                let r = self.agent.delete(&url);
                match &auth {
                    Some(a) => r.header("Authorization", a).call(),
                    None => r.call(),
                }
            }
            "POST" => {
                let mut r = self.agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                match body {
                    Some(b) => r
                        .header("Content-Type", "application/json")
                        .send(b.as_bytes()),
                    None => r.send_empty(),
                }
            }
            other => panic!("method {other}"),
        };
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        let text = resp.body_mut().read_to_string().unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text:?}"));
        (status, json, challenge)
    }

    /// With the test token.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, json, _) = self.send(method, path, Some(TOKEN), body);
        (status, json)
    }

    fn register(&self, id: &str, port: u16) -> (u16, Value) {
        let body = json!({"id": id, "app": "web", "region": "sa", "ip": "127.0.0.1", "port": port});
        self.call("POST", "/api/v1/register", Some(&body.to_string()))
    }

    fn state(&self, id: &str) -> Value {
        let (status, b) = self.call("GET", &format!("/api/v1/backends/{id}"), None);
        assert_eq!(status, 200, "{b}");
        b
    }
}

/// Every row of `backends`, every column, as text: what "nothing written"
/// is checked against.
/// The accept queue of the listening socket on `port` (`ss`'s Send-Q for
/// a listener); `None` without `ss`.
fn listen_backlog(port: u16) -> Option<u32> {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(2)?.parse().ok()
}

/// A fleet of more than 128 backends registering at once: `std`'s bind
/// listens with a backlog of 128, the connections beyond it were dropped
/// and waited for the client's SYN retransmission (1 s, then 3 s): a
/// burst of 200 registrations had a p99 of ~1.2 s instead of ~0.3 s. The
/// API's accept queue must hold such a fleet.
#[test]
fn the_api_accept_queue_holds_a_fleet_registering_at_once() {
    let dir = TempDir::new("api-backlog");
    let api = Api::start(&dir, "", &[]);
    let Some(backlog) = listen_backlog(api.addr.port()) else {
        eprintln!("no `ss` to read the accept queue with: skipped");
        return;
    };
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    assert!(
        backlog >= somaxconn.min(1024),
        "accept queue {backlog} (net.core.somaxconn {somaxconn})"
    );
}

fn dump(db: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = conn
        .prepare("SELECT quote(id), quote(app), quote(region), quote(country), quote(wg_ip), quote(port), quote(healthy), quote(weight), quote(soft_limit), quote(hard_limit), quote(deleted), quote(draining), quote(last_heartbeat_ms), quote(registered_at_ms) FROM backends ORDER BY rowid")
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            (0..14)
                .map(|i| r.get::<_, String>(i))
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.join("|"))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// (deleted, draining) of one row.
fn flags(db: &std::path::Path, id: &str) -> (i64, i64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT deleted, draining FROM backends WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// Sends a line through an open proxied connection and reads the echo.
fn echoes(stream: &mut TcpStream, text: &str) -> bool {
    let line = format!("{text}\n");
    if stream.write_all(line.as_bytes()).is_err() {
        return false;
    }
    read_line(stream).as_deref() == Some(text)
}

/// Which backends answer `n` fresh connections.
fn answers(proxy: SocketAddr, n: usize) -> Vec<String> {
    (0..n).map(|_| which_backend(proxy)).collect()
}

/// Heartbeats `id` every 200 ms until dropped.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(api: SocketAddr, id: &str) -> Heartbeat {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let url = format!("http://{api}/api/v1/heartbeat/{id}");
        let thread = std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .new_agent();
            while !flag.load(Ordering::Relaxed) {
                let _ = agent
                    .post(&url)
                    .header("Authorization", &format!("Bearer {TOKEN}"))
                    .send_empty();
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Heartbeat {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn register_route_expire_revive_drain_deregister_with_traffic_flowing() {
    let dir = TempDir::new("api-cycle");
    let b1 = TagBackend::start("b1");
    let b2 = TagBackend::start("b2");
    let api = Api::start(
        &dir,
        &format!("token = {TOKEN:?}\nheartbeat_ttl_secs = 2\n"),
        &[],
    );
    let proxy = api.proxy.addr();

    // Registered: the very next connection reaches it (the snapshot is
    // published before the API answers).
    let (status, body) = api.register("b1", b1.port());
    let registered = Instant::now();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["registered"], true);
    // The first connection after the answer, no retry: routing was updated
    // 0 ms after the reply (the bound below only catches a gross stall of
    // the connection itself on a loaded machine).
    let (name, mut to_b1) = connect_tagged(proxy);
    assert_eq!(name, "b1");
    assert!(
        registered.elapsed() < Duration::from_millis(500),
        "registration took {:?} to route",
        registered.elapsed()
    );
    assert!(echoes(&mut to_b1, "hello b1"));

    // b2 registers and keeps heartbeating; b1 goes silent.
    assert_eq!(api.register("b2", b2.port()).0, 201);
    let beat = Heartbeat::start(api.addr, "b2");
    let (name, mut to_b2) = connect_tagged(proxy);
    assert_eq!(name, "b2", "b1 is busier, b2 takes the next one");

    // After the TTL b1 takes no new connections but is kept, as expired,
    // and its open connection goes on.
    assert!(
        api.proxy
            .wait_for_log("backend heartbeat expired", Duration::from_secs(5))
            .is_some_and(|l| l.contains("b1")),
        "{}",
        api.proxy.log_text()
    );
    let got = answers(proxy, 5);
    assert!(
        got.iter().all(|n| n == "b2"),
        "{got:?}\n{}",
        api.proxy.log_text()
    );
    let s = api.state("b1");
    assert_eq!(
        (&s["state"], &s["healthy"]),
        (&json!("expired"), &json!(false))
    );
    assert_eq!(s["active_connections"], 1);
    assert_eq!(flags(&api.db, "b1"), (0, 0), "expired rows are kept");
    assert!(echoes(&mut to_b1, "still here"));
    assert_eq!(api.state("b2")["state"], "serving");

    // b1's heartbeat brings it back; draining b2 sends new connections to
    // b1 while b2's open connection goes on.
    assert_eq!(
        api.call("POST", "/api/v1/heartbeat/b1", None),
        (200, json!({"id": "b1", "status": "ok"}))
    );
    let (status, body) = api.call("POST", "/api/v1/backends/b2/drain", None);
    assert_eq!((status, &body["draining"]), (200, &json!(true)), "{body}");
    assert_eq!(body["active_connections"], 1);
    assert!(answers(proxy, 5).iter().all(|n| n == "b1"));
    assert!(echoes(&mut to_b2, "draining but open"));
    assert_eq!(api.state("b2")["state"], "draining");
    assert_eq!(flags(&api.db, "b2"), (0, 1));

    // Deregistered: no new connections anywhere (b2 drains), b1's open
    // connection still goes on, and the id is gone from the API.
    assert_eq!(
        api.call("DELETE", "/api/v1/backends/b1", None),
        (200, json!({"id": "b1", "deregistered": true}))
    );
    assert_eq!(
        probe(proxy, Duration::from_secs(2)),
        Probe::ClosedWithoutData,
        "no backend left for new connections"
    );
    assert!(echoes(&mut to_b1, "deregistered but open"));
    assert_eq!(api.call("GET", "/api/v1/backends/b1", None).0, 404);
    assert_eq!(api.call("POST", "/api/v1/heartbeat/b1", None).0, 404);
    assert_eq!(flags(&api.db, "b1").0, 1);
    let (_, list) = api.call("GET", "/api/v1/backends", None);
    assert_eq!(list["total"], 1);
    assert_eq!(list["backends"][0]["id"], "b2");
    drop(beat);
}

#[test]
fn registrations_survive_a_restart_and_update_in_place() {
    let dir = TempDir::new("api-restart");
    let b1 = TagBackend::start("b1");
    let b1_new = TagBackend::start("b1-new");
    let keys = format!("token = {TOKEN:?}\n");
    {
        let api = Api::start(&dir, &keys, &[]);
        assert_eq!(api.register("b1", b1.port()).0, 201);
        assert_eq!(which_backend(api.proxy.addr()), "b1");
    }
    let api = Api::start(&dir, &keys, &[]);
    assert_eq!(
        which_backend(api.proxy.addr()),
        "b1",
        "routed after restart"
    );
    let before = api.state("b1");

    // Same id, new port and weight: updated in place, routed at once.
    let body = json!({"id": "b1", "app": "web", "region": "sa", "ip": "127.0.0.1",
        "port": b1_new.port(), "weight": 7});
    let (status, reply) = api.call("POST", "/api/v1/register", Some(&body.to_string()));
    // An update is a 200, not a 201: nothing was created.
    assert_eq!((status, &reply["updated"]), (200, &json!(true)), "{reply}");
    assert_eq!(which_backend(api.proxy.addr()), "b1-new");
    let after = api.state("b1");
    assert_eq!(after["weight"], 7);
    assert!(after["registered_secs"].as_u64() >= before["registered_secs"].as_u64());
    assert_eq!(dump(&api.db).len(), 1, "one row, updated in place");
}

/// `POST /api/v1/register` for `id` (app web, region sa), the whole answer.
fn post_register(
    agent: &ureq::Agent,
    addr: SocketAddr,
    id: &str,
) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
    let body = json!({"id": id, "app": "web", "region": "sa", "ip": "127.0.0.1", "port": 9});
    agent
        .post(&format!("http://{addr}/api/v1/register"))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
}

/// Registers `id`; the status, or `None` when the API did not answer (the
/// process is gone).
fn try_register(agent: &ureq::Agent, addr: SocketAddr, id: &str) -> Option<u16> {
    post_register(agent, addr, id)
        .ok()
        .map(|r| r.status().as_u16())
}

/// A registration the API acknowledged is on disk: clients registering
/// without pause while the process is killed (SIGKILL, no chance to flush
/// anything) find every acknowledged one after a restart.
#[test]
fn every_acknowledged_registration_survives_a_crash() {
    let dir = TempDir::new("api-crash");
    // No request rate limit: the clients register as fast as they can.
    let keys = format!("token = {TOKEN:?}\nrate_limit_per_sec = 0\n");
    let mut api = Api::start(&dir, &keys, &[]);
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (agent, addr, acked) = (api.agent.clone(), api.addr, acked.clone());
            std::thread::spawn(move || {
                for n in 0.. {
                    let id = format!("c{client}-{n}");
                    match try_register(&agent, addr, &id) {
                        Some(201) => acked.lock().unwrap().push(id),
                        Some(other) => panic!("register {id}: status {other}"),
                        None => return,
                    }
                }
            })
        })
        .collect();
    let enough = eventually(PATIENCE, || acked.lock().unwrap().len() >= 300);
    assert!(enough, "registrations too slow to test");
    api.proxy.signal(9);
    assert!(api.proxy.wait_exit(PATIENCE).is_some(), "not killed");
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let api = Api::start(&dir, &keys, &[]);
    let (status, list) = api.call("GET", "/api/v1/backends", None);
    assert_eq!(status, 200, "{list}");
    let stored: std::collections::HashSet<String> = list["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends array: {list}"))
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged registrations lost: {lost:?}",
        lost.len(),
        acked.len()
    );
}

/// When the disk under routing.db fills up, a registration is refused with
/// 507 (Insufficient Storage) saying so (never acknowledged and lost), the
/// process goes on serving what it has, and registrations work again once
/// there is room.
#[test]
fn a_full_disk_refuses_registrations_clearly_and_recovers() {
    let dir = TempDir::new("api-disk-full");
    let disk = SmallDisk::mount_over(dir.path(), "512k");
    let keys = format!("token = {TOKEN:?}\nrate_limit_per_sec = 0\n");
    let api = Api::start(&dir, &keys, &[]);
    let mut acked = Vec::new();
    let refused = (0..20_000).find_map(|n| {
        // Long ids fill the disk sooner (one DNS label: at most 63 bytes).
        let id = format!("b{n}-{}", "x".repeat(50));
        match api.register(&id, 9) {
            (201, _) => {
                acked.push(id);
                None
            }
            (status, reply) => Some((status, reply)),
        }
    });
    let (status, reply) = refused.expect("512 KiB never filled up");
    assert_eq!(status, 507, "Insufficient Storage: {reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains("disk is full"), "{status} {reply}");
    assert!(
        api.proxy
            .wait_for_log("database or disk is full", PATIENCE)
            .is_some(),
        "not logged:\n{}",
        api.proxy.log_text()
    );

    // Still serving, with every acknowledged registration.
    let (status, list) = api.call("GET", "/api/v1/backends", None);
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), acked.len(), "{ids:?}");
    assert!(acked.iter().all(|a| ids.contains(&a.as_str())));

    disk.grow("8m");
    assert_eq!(api.register("after-room", 9).0, 201);
    assert_eq!(api.state("after-room")["id"], "after-room");
    drop(api);
}

/// A POP stopped cleanly (SIGTERM folds routing.db's WAL and removes its
/// `-wal` and `-shm`) that starts again while the disk is full: a reboot
/// with `/var` full of logs. SQLite could not create the `-shm` a WAL
/// database needs even to be read, and the start failed ("cannot open
/// routing store ...: disk I/O error"), so under systemd's `Restart=` the
/// POP stayed down. It starts, routes from the table as it is in the file,
/// says once that routing.db cannot be written and why, refuses writes with
/// 507, shows it in the metrics, and becomes writable by itself once there
/// is room, without a restart.
#[test]
fn a_pop_stopped_cleanly_starts_on_a_full_disk_routes_and_writes_once_there_is_room() {
    let dir = TempDir::new("api-full-start");
    let disk = SmallDisk::mount_over(dir.path(), "1m");
    let keys =
        format!("token = {TOKEN:?}\n\n[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n");
    let before = TagBackend::start("before");
    let after = TagBackend::start("after");
    register_then_stop(&dir, &keys, &before);
    let shm = dir.join("routing.db-shm");
    assert!(!shm.exists(), "a clean stop leaves no -shm");
    let filler = disk.fill();

    let api = Api::start(&dir, &keys, &[]);
    assert_eq!(which_backend(api.proxy.addr()), "before");
    let (status, list) = api.call("GET", "/api/v1/backends", None);
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["backends"][0]["id"], "before", "{list}");
    let (status, reply) = api.register("after", after.port());
    assert_eq!(status, 507, "Insufficient Storage: {reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains("disk is full"), "{reply}");
    // One ERROR, saying why; not one per refusal nor per retry.
    let errors = api.proxy.log_lines_after(0, " ERROR ");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("routing.db cannot be written"),
        "{errors:?}"
    );
    assert!(errors[0].contains("disk is full"), "{errors:?}");
    let metrics = api.proxy.metrics_addr();
    let writable = || {
        let (status, text) = http_get(metrics, "/metrics");
        assert_eq!(status, 200);
        sample(&text, "edgeproxy_routing_store_writable")
    };
    assert_eq!(writable(), Some(0.0));
    assert_eq!(http_get(metrics, "/ready").0, 200, "it serves: ready");

    // Room again: the store switches to read-write by itself.
    filler.free();
    writable_again_routes_to(&api, &after, || assert_eq!(writable(), Some(1.0)));
    drop(api);
}

/// A POP that registers `before` and is stopped cleanly (SIGTERM: its
/// WAL folded, `-wal` and `-shm` removed).
fn register_then_stop(dir: &TempDir, keys: &str, before: &TagBackend) {
    let mut api = Api::start(dir, keys, &[]);
    assert_eq!(api.register("before", before.port()).0, 201);
    api.proxy.signal(libc::SIGTERM);
    assert!(api.proxy.wait_exit(PATIENCE).is_some(), "did not stop");
}

/// `api`'s store says it can be written again (then `also` checks more),
/// and a registration of `after` in place of `before` is routed.
fn writable_again_routes_to(api: &Api, after: &TagBackend, also: impl FnOnce()) {
    assert!(
        api.proxy
            .wait_for_log("routing.db can be written again", PATIENCE)
            .is_some(),
        "{}",
        api.proxy.log_text()
    );
    also();
    assert_eq!(api.register("after", after.port()).0, 201);
    assert_eq!(api.call("DELETE", "/api/v1/backends/before", None).0, 200);
    assert_eq!(which_backend(api.proxy.addr()), "after");
}

/// The same on a file system mounted read-only after a clean stop (a disk
/// that went bad and came back read-only at boot): it starts, routes,
/// refuses writes saying why, and writes once the file system is writable
/// again, without a restart.
#[test]
fn a_pop_stopped_cleanly_starts_on_a_read_only_file_system_and_writes_once_it_is_writable() {
    let dir = TempDir::new("api-ro-start");
    let disk = SmallDisk::ext4_over(dir.path(), 16 << 20);
    let keys = format!("token = {TOKEN:?}\n");
    let before = TagBackend::start("before");
    let after = TagBackend::start("after");
    register_then_stop(&dir, &keys, &before);
    disk.remount_read_only().unwrap();

    let api = Api::start(&dir, &keys, &[]);
    assert_eq!(which_backend(api.proxy.addr()), "before");
    let (status, reply) = api.register("after", after.port());
    assert_eq!(status, 500, "{reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains("Read-only file system"), "{reply}");
    // (The upgrade control socket, next to routing.db, says its own.)
    let errors: Vec<String> = api
        .proxy
        .log_lines_after(0, " ERROR ")
        .into_iter()
        .filter(|l| !l.contains("upgrade control socket"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("routing.db cannot be written"),
        "{errors:?}"
    );

    disk.remount_read_write();
    writable_again_routes_to(&api, &after, || {});
    drop(api);
}

/// Another writer holding routing.db's lock (an operator's `sqlite3` shell
/// in a transaction) past the store's busy timeout: a registration is
/// refused with 503 and `Retry-After`, nothing is written, and the same
/// request succeeds once the lock is released.
#[test]
fn a_locked_database_is_a_503_with_retry_after_and_nothing_is_written() {
    let dir = TempDir::new("api-locked");
    let keys = format!("token = {TOKEN:?}\n");
    let api = Api::start(&dir, &keys, &[]);
    let holder = rusqlite::Connection::open(&api.db).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let register = || post_register(&api.agent, api.addr, "locked").expect("the API answers");
    let mut refused = register();
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let text = refused.body_mut().read_to_string().unwrap();
    assert!(text.contains("database is locked"), "{text}");
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
    assert!(
        dump(&api.db).is_empty(),
        "a refused registration wrote a row"
    );
    assert_eq!(register().status().as_u16(), 201);
    assert_eq!(api.state("locked")["id"], "locked");
}

#[test]
fn bad_input_is_refused_naming_the_field_and_nothing_is_written() {
    let dir = TempDir::new("api-bad-input");
    let api = Api::start(
        &dir,
        &format!("token = {TOKEN:?}\nmax_body_bytes = 1024\n"),
        &[],
    );
    assert_eq!(api.register("keep", 9).0, 201);
    let before = dump(&api.db);

    let valid = json!({"id": "new", "app": "web", "region": "sa", "ip": "10.0.0.1", "port": 80});
    let with = |key: &str, value: Value| {
        let mut v = valid.clone();
        v[key] = value;
        v.to_string()
    };
    let without = |key: &str| {
        let mut v = valid.clone();
        v.as_object_mut().unwrap().remove(key);
        v.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        ("{\"id\": \"new\", ".into(), "body"),
        ("not json at all".into(), "body"),
        ("[1, 2, 3]".into(), "body"),
        (String::new(), "body"),
        (without("id"), "id"),
        (with("id", json!("")), "id"),
        (with("id", json!("a/b")), "id"),
        // Ids and apps are DNS labels (`<id>.<app>.internal`): a dot would
        // be routed but invisible in DNS.
        (with("id", json!("api.v2")), "id"),
        (with("id", json!("B1")), "id"),
        (without("app"), "app"),
        (with("app", json!("Web App")), "app"),
        (with("app", json!("api.v2")), "app"),
        // Names the DNS zone keeps for itself (`ns.internal`, `<region>.backends.internal`).
        (with("app", json!("ns")), "app"),
        (with("app", json!("backends")), "app"),
        (without("region"), "region"),
        (with("country", json!("Germany")), "country"),
        (without("ip"), "ip"),
        (with("ip", json!("10.0.0.300")), "ip"),
        (with("ip", json!("backend.example")), "ip"),
        // Not one host's address: broadcast, unspecified, multicast.
        (with("ip", json!("255.255.255.255")), "ip"),
        (with("ip", json!("0.0.0.0")), "ip"),
        (with("ip", json!("ff02::1")), "ip"),
        (without("port"), "port"),
        (with("port", json!(0)), "port"),
        (with("port", json!(65536)), "port"),
        (with("port", json!("80")), "port"),
        (with("weight", json!(0)), "weight"),
        (with("soft_limit", json!(-5)), "soft_limit"),
        (with("hard_limit", json!(50)), "hard_limit"),
        // A field that misspells a known one (the original ignored it: a
        // typo registered the default weight).
        (with("wieght", json!(5)), "wieght"),
        (
            format!(
                r#"{{"id":"new","app":"{}","region":"sa","ip":"10.0.0.1","port":80}}"#,
                "x".repeat(2000)
            ),
            "body",
        ),
    ];
    // A field given twice: JSON keeps the last, so `other` was registered
    // with a 201; the original refused it (duplicate field).
    let twice = with("weight", json!(5)).replacen('{', r#"{"weight":7,"#, 1);
    let cases = [
        cases,
        vec![
            (
                valid.to_string().replacen('{', r#"{"id":"other","#, 1),
                "id",
            ),
            (twice, "weight"),
        ],
    ]
    .concat();
    for (body, field) in &cases {
        let (status, reply) = api.call("POST", "/api/v1/register", Some(body));
        assert_eq!(status, 400, "{body:.80}: {reply}");
        assert_eq!(reply["field"], *field, "{body:.80}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().starts_with(field),
            "the message names the field: {reply}"
        );
    }

    let (_, reply) = api.call(
        "POST",
        "/api/v1/register",
        Some(with("wieght", json!(5)).as_str()),
    );
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .starts_with("wieght: unknown field; did you mean `weight`?"),
        "{reply}"
    );
    let (_, reply) = api.call(
        "POST",
        "/api/v1/register",
        Some(with("ip", json!("255.255.255.255")).as_str()),
    );
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("is the broadcast address"),
        "{reply}"
    );

    // A chunked body that is not chunked encoding: said as such (it was
    // "larger than 1024 bytes").
    let mut s = TcpStream::connect(api.addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(
        format!(
            "POST /api/v1/register HTTP/1.1\r\nHost: localhost\r\n\
             Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n\
             zz\r\n{{}}\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains(r#""error":"body: cannot be read"#),
        "{answer}"
    );
    assert!(!answer.contains("larger than"), "{answer}");

    // Unknown ids: 404, the original's messages.
    assert_eq!(
        api.call("POST", "/api/v1/heartbeat/nope", None),
        (
            404,
            json!({"id": "nope", "error": "backend not registered"})
        )
    );
    for (method, path) in [
        ("GET", "/api/v1/backends/nope"),
        ("DELETE", "/api/v1/backends/nope"),
        ("POST", "/api/v1/backends/nope/drain"),
    ] {
        let (status, reply) = api.call(method, path, None);
        assert_eq!(
            (status, &reply["error"]),
            (404, &json!("backend not found")),
            "{method} {path}"
        );
    }
    assert_eq!(api.call("GET", "/api/v1/nothing-here", None).0, 404);

    // An id that is not UTF-8 once percent-decoded: the same JSON error
    // naming the field, on every path that takes an id (before, axum's
    // text/plain "Invalid URL: ...", which the JSON parse above rejects).
    for (method, path) in [
        ("POST", "/api/v1/heartbeat/%C3"),
        ("GET", "/api/v1/backends/%C3"),
        ("DELETE", "/api/v1/backends/%FF%FE"),
        ("POST", "/api/v1/backends/%C3/drain"),
    ] {
        let (status, reply) = api.call(method, path, None);
        assert_eq!(status, 400, "{method} {path}: {reply}");
        assert_eq!(reply["field"], "id", "{method} {path}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().starts_with("id: "),
            "{method} {path}: {reply}"
        );
    }

    // A known path with the wrong method: 405 with a JSON body like every
    // other error, and the methods it takes in `Allow`.
    for (method, path, allow) in [
        ("GET", "/api/v1/register", "POST"),
        ("DELETE", "/api/v1/register", "POST"),
        ("POST", "/api/v1/backends", "GET"),
        ("GET", "/api/v1/heartbeat/keep", "POST"),
    ] {
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(api.url(path))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .body(())
            .unwrap();
        let mut resp = api.agent.run(req).unwrap();
        assert_eq!(resp.status().as_u16(), 405, "{method} {path}");
        let allowed = resp
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_string());
        assert!(
            allowed.as_deref().is_some_and(|a| a.contains(allow)),
            "{method} {path}: Allow {allowed:?}"
        );
        let content_type = resp
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let body: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap())
            .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON: {e}"));
        assert_eq!(
            body,
            json!({"error": "method not allowed"}),
            "{method} {path}"
        );
    }

    assert_eq!(dump(&api.db), before, "routing.db unchanged");
    assert_eq!(api.state("keep")["state"], "serving");

    // A field of another name is ignored, as the original ignores it (its
    // agents got a 201), and the reply lists it.
    let (status, reply) = api.call(
        "POST",
        "/api/v1/register",
        Some(with("metadata", json!({"team": "a"})).as_str()),
    );
    assert_eq!(status, 201, "{reply}");
    assert_eq!(reply["ignored_fields"], json!(["metadata"]), "{reply}");
    assert_eq!(api.state("new")["weight"], 2);
}

#[test]
fn requests_beyond_the_rate_limit_get_429() {
    let dir = TempDir::new("api-rate");
    let api = Api::start(
        &dir,
        &format!("token = {TOKEN:?}\nrate_limit_per_sec = 1\nrate_limit_burst = 5\n"),
        &[],
    );
    let statuses: Vec<u16> = (0..8)
        .map(|_| api.send("GET", "/health", None, None).0)
        .collect();
    assert_eq!(&statuses[..5], [200; 5]);
    assert!(statuses[5..].iter().all(|&s| s == 429), "{statuses:?}");
    let (_, body, _) = api.send("GET", "/api/v1/backends", Some(TOKEN), None);
    assert_eq!(body["error"], "rate limit exceeded");
}

#[test]
fn with_a_token_every_endpoint_but_health_needs_it() {
    let dir = TempDir::new("api-token");
    // The token from the environment, as the original's deployments set
    // their API settings.
    let api = Api::start(&dir, "", &[("EDGEPROXY_API_TOKEN", TOKEN)]);
    assert_eq!(api.register("b1", 9).0, 201);
    let before = dump(&api.db);

    let register =
        json!({"id": "b2", "app": "web", "region": "sa", "ip": "10.0.0.1", "port": 80}).to_string();
    let endpoints: [(&str, &str, Option<&str>); 6] = [
        ("POST", "/api/v1/register", Some(&register)),
        ("POST", "/api/v1/heartbeat/b1", None),
        ("GET", "/api/v1/backends", None),
        ("GET", "/api/v1/backends/b1", None),
        ("POST", "/api/v1/backends/b1/drain", None),
        ("DELETE", "/api/v1/backends/b1", None),
    ];
    for (method, path, body) in endpoints {
        for token in [
            None,
            Some("wrong-token-0123456789abcdef"),
            Some(&TOKEN[..TOKEN.len() - 1]),
        ] {
            let (status, reply, challenge) = api.send(method, path, token, body);
            assert_eq!(status, 401, "{method} {path} with {token:?}: {reply}");
            assert_eq!(challenge.as_deref(), Some("Bearer realm=\"edgeproxy\""));
        }
    }
    assert_eq!(dump(&api.db), before, "refused requests wrote nothing");

    let (status, health, _) = api.send("GET", "/health", None, None);
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(health["registered_backends"], 1);
    assert!(health["uptime_secs"].is_u64());

    // With the token, all of them work.
    let statuses: Vec<u16> = endpoints
        .iter()
        .map(|(m, p, b)| api.call(m, p, *b).0)
        .collect();
    assert_eq!(statuses, [201, 200, 200, 200, 200, 200]);
}

/// Rotating the API token without refusing a client (README, "Rotating
/// the API token"): with `accept_token` beside `token` both work, on every
/// endpoint; any other token is still refused.
#[test]
fn a_second_accepted_token_works_beside_the_token_while_clients_move() {
    const NEXT: &str = "the-next-token-0123456789";
    let dir = TempDir::new("api-accept-token");
    // A file next to the config, named by a relative path.
    std::fs::write(dir.join("next.token"), format!("{NEXT}\n")).unwrap();
    let api = Api::start(
        &dir,
        &format!("token = {TOKEN:?}\naccept_token_file = \"next.token\"\n"),
        &[],
    );
    let body = |id: &str| {
        json!({"id": id, "app": "web", "region": "sa", "ip": "10.0.0.1", "port": 80}).to_string()
    };
    for (token, id) in [(TOKEN, "by-token"), (NEXT, "by-accepted")] {
        let (status, reply, _) = api.send("POST", "/api/v1/register", Some(token), Some(&body(id)));
        assert_eq!(status, 201, "registering with {token}: {reply}");
        let (status, _, _) = api.send("GET", &format!("/api/v1/backends/{id}"), Some(token), None);
        assert_eq!(status, 200);
        let (status, _, _) = api.send(
            "POST",
            &format!("/api/v1/heartbeat/{id}"),
            Some(token),
            None,
        );
        assert_eq!(status, 200);
    }
    let before = dump(&api.db);
    for token in ["wrong-token-0123456789abcdef", &NEXT[..NEXT.len() - 1]] {
        let (status, reply, _) =
            api.send("POST", "/api/v1/register", Some(token), Some(&body("x")));
        assert_eq!(status, 401, "{token}: {reply}");
    }
    assert_eq!(dump(&api.db), before, "refused requests wrote nothing");
}

/// Sends a raw HTTP/1.1 request and returns the status code.
fn raw_status(addr: SocketAddr, request: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

/// README: the API's and the metrics listener's request head is at most
/// 64 KiB. QA: it was approximate, a 100,000-byte header got 200 (hyper's
/// buffer limit is checked only while a head is incomplete).
#[test]
fn a_request_head_over_64_kib_is_431_and_one_of_64_kib_is_served() {
    let dir = TempDir::new("api-head");
    let metrics = "[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n";
    let api = Api::start(&dir, metrics, &[]);
    // A GET of `path` whose head (request line, headers, blank line) is
    // exactly `len` bytes.
    let head = |path: &str, len: usize| {
        let start = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Pad: ");
        let end = "\r\n\r\n";
        let pad = "a".repeat(len - start.len() - end.len());
        let request = format!("{start}{pad}{end}");
        assert_eq!(request.len(), len);
        request
    };
    const LIMIT: usize = 64 * 1024;
    for (addr, path) in [(api.addr, "/health"), (api.proxy.metrics_addr(), "/live")] {
        for (len, want) in [
            (LIMIT - 1, 200),
            (LIMIT, 200),
            (LIMIT + 1, 431),
            (100_000, 431),
        ] {
            assert_eq!(
                raw_status(addr, &head(path, len)),
                want,
                "{path} with a head of {len} bytes"
            );
        }
    }
}

#[test]
fn without_a_token_the_api_listens_on_loopback_only() {
    let dir = TempDir::new("api-open");
    let db = dir.join("routing.db");
    let path = dir.join("edgeproxy.toml");
    // Asked for every address, no token: narrowed to loopback, and said so.
    let text = config(&db, "[api]\nenabled = true\nlisten_addr = \"0.0.0.0:0\"\n");
    std::fs::write(&path, text).unwrap();
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], &[]);
    let line = proxy.wait_for_log("api listening", PATIENCE).unwrap();
    let addr: SocketAddr = field(&line, "addr").unwrap().parse().unwrap();
    assert!(addr.ip().is_loopback(), "{line}");
    assert!(
        line.contains("auth=\"none\"") || line.contains("auth=none"),
        "{line}"
    );
    let warning = proxy.wait_for_log("loopback only", PATIENCE).unwrap();
    assert_eq!(
        field(&warning, "asked").as_deref(),
        Some("0.0.0.0:0"),
        "{warning}"
    );
    // Loopback asked for: nothing was narrowed, and no `asked=-` says so.
    {
        let dir = TempDir::new("api-loopback");
        let path = dir.join("edgeproxy.toml");
        let text = config(
            &dir.join("routing.db"),
            "[api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n",
        );
        std::fs::write(&path, text).unwrap();
        let loopback = Proxy::start(&["--config", path.to_str().unwrap()], &[]);
        let warning = loopback.wait_for_log("loopback only", PATIENCE).unwrap();
        assert_eq!(field(&warning, "asked"), None, "{warning}");
        assert!(field(&warning, "addr").is_some(), "{warning}");
    }

    // Local clients need no token...
    let get = |host: &str, extra: &str| {
        raw_status(
            addr,
            &format!(
                "GET /api/v1/backends HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
            ),
        )
    };
    assert_eq!(get(&addr.to_string(), ""), 200);
    assert_eq!(get(&format!("localhost:{}", addr.port()), ""), 200);
    // ...but web pages (Origin) and DNS-rebound names are refused.
    assert_eq!(
        get(&addr.to_string(), "Origin: http://evil.example\r\n"),
        403
    );
    assert_eq!(get(&format!("evil.example:{}", addr.port()), ""), 403);
    // An absolute-form target names the host, whatever Host says.
    assert_eq!(
        raw_status(
            addr,
            "GET http://evil.example/api/v1/backends HTTP/1.1\r\nHost: localhost\r\n\
             Connection: close\r\n\r\n"
        ),
        403
    );
    // No Host at all (HTTP/1.0 health checkers such as HAProxy's httpchk)
    // names nothing a browser could have been rebound to: served. Before,
    // refused as a non-local name.
    for path in ["/health", "/api/v1/backends"] {
        assert_eq!(
            raw_status(addr, &format!("GET {path} HTTP/1.0\r\n\r\n")),
            200,
            "{path} without Host"
        );
    }
    drop(proxy);

    // The explicit opt-in binds as asked, with a warning.
    std::fs::write(
        &path,
        config(
            &db,
            "[api]\nenabled = true\nlisten_addr = \"0.0.0.0:0\"\nallow_open = true\n",
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], &[]);
    let line = proxy.wait_for_log("api listening", PATIENCE).unwrap();
    assert!(line.contains("addr=0.0.0.0:"), "{line}");
    assert!(
        proxy.log_text().contains("discovery API is OPEN"),
        "{}",
        proxy.log_text()
    );
}

#[test]
fn the_cli_lists_adds_drains_and_removes_backends() {
    let dir = TempDir::new("api-cli");
    let b1 = TagBackend::start("b1");
    let api = Api::start(&dir, &format!("token = {TOKEN:?}\n"), &[]);
    let url = format!("http://{}", api.addr);
    let cli = |args: &[&str]| {
        let mut all = vec!["backends", "--api", url.as_str()];
        all.extend_from_slice(args);
        run_to_end(&all, &[("EDGEPROXY_API_TOKEN", TOKEN)])
    };

    let port = b1.port().to_string();
    let (status, out, err) = cli(&[
        "add",
        "b1",
        "--app",
        "web",
        "--region",
        "sa",
        "--ip",
        "127.0.0.1",
        "--port",
        &port,
        "--country",
        "BR",
    ]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(out.trim(), "registered b1");
    assert_eq!(which_backend(api.proxy.addr()), "b1");

    let (status, out, err) = cli(&["list"]);
    assert!(status.success(), "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID"), "{out}");
    assert!(
        lines[1].starts_with("b1 ") && lines[1].contains("serving") && lines[1].contains("BR"),
        "{out}"
    );

    let (status, out, _) = cli(&["list", "--json"]);
    assert!(status.success());
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["total"], 1);

    let (status, out, err) = cli(&["drain", "b1"]);
    assert!(status.success(), "{out}{err}");
    assert!(out.starts_with("draining b1"), "{out}");
    assert_eq!(api.state("b1")["state"], "draining");

    let (status, out, err) = cli(&["rm", "b1"]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(out.trim(), "deregistered b1");

    // Errors: the status and the API's reason, and a failing exit code.
    let (status, _, err) = cli(&["rm", "b1"]);
    assert!(!status.success());
    assert!(
        err.contains("HTTP 404") && err.contains("backend not found"),
        "{err}"
    );
    let (status, _, err) = run_to_end(&["backends", "--api", &url, "list"], &[]);
    assert!(!status.success());
    assert!(err.contains("HTTP 401"), "{err}");
    let (status, _, err) = cli(&[
        "add",
        "b9",
        "--app",
        "web",
        "--region",
        "sa",
        "--ip",
        "999.0.0.1",
        "--port",
        "80",
    ]);
    assert!(!status.success());
    assert!(err.contains("HTTP 400") && err.contains("ip"), "{err}");
}

/// `edgeproxy backends --config FILE` talks to the API that file describes:
/// its address (a wildcard read as loopback) and its token file, with no
/// --api or --token. Before, it went to the default address with no token.
#[test]
fn the_cli_finds_the_api_and_its_token_in_the_config_file() {
    let dir = TempDir::new("api-cli-config");
    let b1 = TagBackend::start("b1");
    // A fixed port is needed here: the client reads the address from the
    // file, not from the log. Take a free one and hand it over.
    let port = dead_port();
    let token_file = dir.join("api.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let db = dir.join("routing.db");
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db,
            &format!(
                "[api]\nenabled = true\nlisten_addr = \"0.0.0.0:{port}\"\ntoken_file = {:?}\n",
                token_file.to_str().unwrap()
            ),
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], &[]);
    let path = path.to_str().unwrap();
    let b1_port = b1.port().to_string();
    let add = [
        "--config",
        path,
        "backends",
        "add",
        "b1",
        "--app",
        "web",
        "--region",
        "sa",
        "--ip",
        "127.0.0.1",
        "--port",
        &b1_port,
    ];
    let (status, out, err) = run_to_end(&add, &[]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(out.trim(), "registered b1");
    assert_eq!(which_backend(proxy.addr()), "b1");
    // The same through EDGEPROXY_CONFIG.
    let (status, out, err) = run_to_end(&["backends", "list"], &[("EDGEPROXY_CONFIG", path)]);
    assert!(status.success(), "{out}{err}");
    assert!(
        out.lines().nth(1).is_some_and(|l| l.starts_with("b1 ")),
        "{out}"
    );
    // The command line still wins over the file: a wrong token is refused.
    a_wrong_token_on_the_command_line_is_refused(path, "backends", "list");
}

/// `edgeproxy --config path <command> --token WRONG <rest>`: the command
/// line wins over the file's token, and the API refuses it (HTTP 401).
fn a_wrong_token_on_the_command_line_is_refused(path: &str, command: &str, rest: &str) {
    let (status, _, err) = run_to_end(
        &[
            "--config",
            path,
            command,
            "--token",
            "wrong-token-0123456789",
            rest,
        ],
        &[],
    );
    assert!(!status.success());
    assert!(err.contains("HTTP 401"), "{err}");
}

/// Every command that talks to a POP through its API finds the address and
/// the token in `--config`'s `[api]`, as `backends` does. Before, `drain`,
/// `undrain`, `pop`, `bgp`, `cluster` and `mesh` went to the default
/// address with no token: refused here, and on a host where another proxy
/// listens on the default address, `drain` drained that one.
#[test]
fn every_api_command_finds_the_api_in_the_config_file() {
    let dir = TempDir::new("api-cli-config-all");
    // A fixed, non-default port: the client reads the address from the
    // file, not from the log. Take a free one and hand it over.
    let port = dead_port();
    assert_ne!(port, 8081);
    let db = dir.join("routing.db");
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db,
            &format!(
                "[api]\nenabled = true\nlisten_addr = \"127.0.0.1:{port}\"\ntoken = {TOKEN:?}\n"
            ),
        ),
    )
    .unwrap();
    let _proxy = Proxy::start(&["--config", path.to_str().unwrap()], &[]);
    let path = path.to_str().unwrap();
    let cli = |args: &[&str]| {
        let (status, out, err) = run_to_end(&[&["--config", path], args].concat(), &[]);
        assert!(status.success(), "{args:?}: {out}{err}");
        out
    };
    // What the POP itself says, asked directly with the token.
    let draining = || {
        let text = ureq::get(&format!("http://127.0.0.1:{port}/api/v1/pop"))
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .expect("GET /api/v1/pop")
            .into_body()
            .read_to_string()
            .unwrap();
        let body: Value = serde_json::from_str(&text).unwrap();
        body["draining"] == json!(true)
    };

    assert!(
        cli(&["pop", "status"]).contains("drained:   no"),
        "pop status"
    );
    cli(&["drain"]);
    assert!(draining(), "`drain` did not drain the POP of --config");
    let json: Value = serde_json::from_str(&cli(&["pop", "status", "--json"])).unwrap();
    assert_eq!(json["draining"], json!(true), "{json}");
    cli(&["undrain"]);
    assert!(!draining(), "`undrain` did not undrain the POP of --config");
    for args in [
        &["bgp", "status"][..],
        &["cluster", "status"][..],
        &["mesh", "status"][..],
    ] {
        cli(args);
    }
    // The same through EDGEPROXY_CONFIG, and the command line still wins
    // over the file: a wrong token is refused.
    let (status, out, err) = run_to_end(&["pop", "status"], &[("EDGEPROXY_CONFIG", path)]);
    assert!(status.success(), "{out}{err}");
    a_wrong_token_on_the_command_line_is_refused(path, "pop", "status");
}

/// An edit of this POP's row in the `pops` table by another writer (an
/// operator's sqlite3 here, or another POP's, replicated) was never read
/// back: the POP went on serving, and the next start drained it by
/// surprise. It is followed within about a second now, as a start would.
#[test]
fn an_edit_of_this_pops_drain_in_the_pops_table_is_followed() {
    let dir = TempDir::new("api-pop-row-edit");
    let api = Api::start(&dir, &format!("token = {TOKEN:?}\n"), &[]);
    let draining = |api: &Api| {
        let (status, body) = api.call("GET", "/api/v1/pop", None);
        assert_eq!(status, 200, "{body}");
        body["draining"] == json!(true)
    };
    assert!(!draining(&api));
    let conn = rusqlite::Connection::open(&api.db).unwrap();
    let set = |on: bool| {
        let n = conn.execute("UPDATE pops SET draining = ?1", [on]).unwrap();
        assert_eq!(n, 1, "this POP's row");
    };
    set(true);
    assert!(
        eventually(PATIENCE, || draining(&api)),
        "the edit was not followed"
    );
    set(false);
    assert!(
        eventually(PATIENCE, || !draining(&api)),
        "the undrain was not followed"
    );
}

/// QA: a drain replicated from another POP (here an operator's sqlite3,
/// the same write), then `undrain` here within the second before the POP
/// read its row back: the undrain matched the POP's stale copy of its row,
/// so nothing was written, and the POP then followed the older drain; the
/// API had answered "not draining". The operator's later word wins now,
/// in both directions.
#[test]
fn a_drain_command_right_after_another_writers_edit_of_the_row_wins() {
    let dir = TempDir::new("api-pop-row-race");
    let api = Api::start(&dir, &format!("token = {TOKEN:?}\n"), &[]);
    let conn = rusqlite::Connection::open(&api.db).unwrap();
    let row = || -> bool {
        conn.query_row("SELECT draining FROM pops", [], |r| r.get(0))
            .unwrap()
    };
    let draining = |api: &Api| {
        let (status, body) = api.call("GET", "/api/v1/pop", None);
        assert_eq!(status, 200, "{body}");
        body["draining"] == json!(true)
    };
    for on in [true, false] {
        // The POP starts as the command leaves it; the edit flips the row,
        // and the same command, right after it, must flip it back.
        let path = if on {
            "/api/v1/pop/undrain"
        } else {
            "/api/v1/pop/drain"
        };
        let command = || {
            let (status, body) = api.call("POST", path, None);
            assert_eq!(status, 200, "{body}");
        };
        command();
        assert!(eventually(PATIENCE, || row() != on && draining(&api) != on));
        let n = conn.execute("UPDATE pops SET draining = ?1", [on]).unwrap();
        assert_eq!(n, 1, "this POP's row");
        command();
        assert!(
            eventually(PATIENCE, || row() != on && draining(&api) != on),
            "{path} right after an edit of the row was lost: row draining = {}, POP draining = {}",
            row(),
            draining(&api)
        );
    }
}

/// QA: with this POP's row unwritable (a full disk, a read-only file
/// system; here a trigger refusing the write), every evaluation logged an
/// ERROR, 4 a second (50 with BGP), for as long as it lasted. It is said
/// once per 10 s now, the recovery at INFO, and the row is written then.
#[test]
fn a_pop_row_that_cannot_be_written_is_said_once_and_written_when_it_can() {
    const FAILED: &str = "cannot record this POP's state";
    let dir = TempDir::new("api-pop-row-unwritable");
    let api = Api::start(&dir, &format!("token = {TOKEN:?}\n"), &[]);
    let conn = rusqlite::Connection::open(&api.db).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER qa_refuse BEFORE UPDATE ON pops \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .unwrap();
    let mark = api.proxy.log_mark();
    let (status, body) = api.call("POST", "/api/v1/pop/drain", None);
    assert_eq!(status, 200, "{body}");
    let line = api
        .proxy
        .wait_for_log_after(mark, FAILED, PATIENCE)
        .unwrap_or_else(|| panic!("the failed write was not said:\n{}", api.proxy.log_text()));
    assert!(line.contains("refused by the test"), "{line}");
    // An observation window, not a wait for readiness: the write is tried
    // again (once a second) meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    let said = api.proxy.log_lines()[mark..]
        .iter()
        .filter(|l| l.contains(FAILED))
        .count();
    assert_eq!(said, 1, "{}", api.proxy.log_text());

    conn.execute_batch("DROP TRIGGER qa_refuse;").unwrap();
    let draining = || -> bool {
        conn.query_row("SELECT draining FROM pops", [], |r| r.get(0))
            .unwrap()
    };
    assert!(
        eventually(PATIENCE, draining),
        "the drain was not written once it could be"
    );
    let line = api
        .proxy
        .wait_for_log_after(mark, "state recorded again", PATIENCE)
        .unwrap_or_else(|| panic!("the recovery was not said:\n{}", api.proxy.log_text()));
    assert!(line.contains("INFO"), "{line}");
}

/// QA: an operator's `sqlite3` holding a write transaction open on
/// `routing.db` while this POP had a state to record (here a drain): each
/// attempt to write its row waited five seconds for the lock on the
/// control runtime's one thread, again and again, so the API (and
/// replication, BGP keepalives) answered only every five seconds: a drain
/// took 5 s, a GET 10 s. Now a write waits 100 ms at most and is tried
/// again a second later; the drain is written once the lock goes.
#[test]
fn a_lock_held_on_routing_db_does_not_stall_the_control_thread() {
    let dir = TempDir::new("api-pop-row-locked");
    let api = Api::start(&dir, &format!("token = {TOKEN:?}\n"), &[]);
    let conn = rusqlite::Connection::open(&api.db).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let mark = api.proxy.log_mark();
    let slowest = |calls: &mut dyn FnMut() -> u16| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                assert_eq!(calls(), 200);
                t.elapsed()
            })
            .max()
            .unwrap()
    };
    let drain = slowest(&mut || api.call("POST", "/api/v1/pop/drain", None).0);
    let get = slowest(&mut || api.call("GET", "/api/v1/backends", None).0);
    assert!(
        drain < Duration::from_secs(2) && get < Duration::from_secs(2),
        "the API stalled while routing.db was locked: drain {drain:?}, GET {get:?}"
    );
    assert!(
        api.proxy
            .wait_for_log_after(mark, "database is locked", PATIENCE)
            .is_some(),
        "the failed write was not said:\n{}",
        api.proxy.log_text()
    );
    conn.execute_batch("COMMIT;").unwrap();
    assert!(
        eventually(PATIENCE, || conn
            .query_row("SELECT draining FROM pops", [], |r| r.get::<_, bool>(0))
            .unwrap()),
        "the drain was not written once the lock went"
    );
}

/// `edgeproxy backends --json list | head` must not panic when the reader
/// goes away: the rest of the output is dropped and the exit is quiet.
#[test]
fn the_cli_stops_quietly_when_its_reader_goes_away() {
    let dir = TempDir::new("api-cli-pipe");
    let api = Api::start(&dir, &format!("token = {TOKEN:?}\n"), &[]);
    for i in 0..20 {
        assert_eq!(api.register(&format!("b{i}"), 9000 + i).0, 201);
    }
    let url = format!("http://{}", api.addr);
    for args in [
        vec!["backends", "--api", &url, "--json", "list"],
        vec!["backends", "--api", &url, "list"],
        vec!["completions", "bash"],
        vec!["check-config"],
    ] {
        let mut child = std::process::Command::new(BIN)
            .args(&args)
            .env_clear()
            .env("EDGEPROXY_API_TOKEN", TOKEN)
            // For check-config: nothing that could be in use or missing.
            .env("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0")
            .env("EDGEPROXY_DB_PATH", &api.db)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the child writes a byte: every write
        // it makes fails with EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked") && !stderr.contains("error"),
            "{args:?}: exit {} with:\n{stderr}",
            out.status
        );
    }
}

/// QA: when many registrations lapsed together, every POP logged one WARN
/// per backend (1,457 lines in a burst). More than ten in one reload are
/// now one line with the count and the first ids; so are their returns.
#[test]
fn many_heartbeats_lapsing_together_are_said_in_one_line() {
    let dir = TempDir::new("api-lapse-burst");
    let api = Api::start(
        &dir,
        &format!("token = {TOKEN:?}\nheartbeat_ttl_secs = 2\n"),
        &[],
    );
    let ids: Vec<String> = (0..12).map(|i| format!("burst-{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(api.register(id, 9100 + i as u16).0, 201);
    }
    // One heartbeat instant for all, as a burst of registrations has
    // within a reload: they lapse in the same reload.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let conn = rusqlite::Connection::open(&api.db).unwrap();
    conn.busy_timeout(PATIENCE).unwrap();
    conn.execute(
        "UPDATE backends SET last_heartbeat_ms = ?1 WHERE id LIKE 'burst-%'",
        [now_ms],
    )
    .unwrap();
    drop(conn);
    let line = api
        .proxy
        .wait_for_log("backend heartbeats expired", PATIENCE)
        .unwrap_or_else(|| panic!("no summary; log:\n{}", api.proxy.log_text()));
    assert_eq!(field(&line, "count").as_deref(), Some("12"), "{line}");
    assert!(
        line.contains("burst-00") && line.contains("burst-09"),
        "{line}"
    );
    assert!(!line.contains("burst-11"), "ten ids at most: {line}");
    let one_by_one = api
        .proxy
        .log_lines()
        .iter()
        .filter(|l| l.contains("backend heartbeat expired"))
        .count();
    assert_eq!(one_by_one, 0, "{}", api.proxy.log_text());
}

/// QA (README walk): with BGP off, a drain answered `"withdraw_in_ms":
/// 5000` next to `"announcement": null`, a countdown to a withdrawal of
/// routes that are never announced. Without BGP there is none.
#[test]
fn a_drain_without_bgp_counts_down_to_no_withdrawal() {
    let dir = TempDir::new("api-drain-no-bgp");
    let api = Api::start(&dir, &format!("token = {TOKEN:?}\n"), &[]);
    // A backend, so that the POP can serve and a drain is a soft one.
    let (status, body) = api.call(
        "POST",
        "/api/v1/register",
        Some(r#"{"id":"b1","app":"web","region":"eu","ip":"10.0.0.1","port":80}"#),
    );
    assert_eq!(status, 201, "{body}");
    assert!(
        eventually(PATIENCE, || api.call("GET", "/api/v1/pop", None).1
            ["serving"]
            == true),
        "the POP never said it can serve"
    );
    let (status, s) = api.call("POST", "/api/v1/pop/drain", None);
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["draining"], true, "{s}");
    assert_eq!(s["announcement"], Value::Null, "{s}");
    assert_eq!(s["withdraw_in_ms"], Value::Null, "{s}");
    let (_, s) = api.call("GET", "/api/v1/pop", None);
    assert_eq!(s["withdraw_in_ms"], Value::Null, "{s}");
}

/// A request refused before its body was read (here: a wrong token) leaves
/// its keep-alive connection usable, or says it is closing it. The server
/// used to answer such a request and close the connection without a word
/// (the body unread), so a client that pools connections, as ureq does,
/// sent its next request into a closed connection: "Peer disconnected"
/// instead of an answer (`with_a_token_every_endpoint_but_health_needs_it`
/// failed so once under load).
#[test]
fn a_refused_request_with_a_body_keeps_its_connection_usable() {
    let dir = TempDir::new("api-refused-body");
    let api = Api::start(&dir, "", &[("EDGEPROXY_API_TOKEN", TOKEN)]);
    let body =
        json!({"id": "b9", "app": "web", "region": "sa", "ip": "10.0.0.9", "port": 80}).to_string();
    // The body with the head, and (as a client under load may send it)
    // after it: the delay is the condition under test, not a wait.
    for body_later in [false, true] {
        let mut s = std::net::TcpStream::connect(api.addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let head = format!(
            "POST /api/v1/register HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong-token-0123456789abcdef\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        if body_later {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = s.write_all(body.as_bytes());
        let reply = read_response(&mut s).expect("an answer to the refused request");
        assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
        if reply.to_ascii_lowercase().contains("connection: close") {
            continue; // said: a client does not reuse it
        }
        // Not said closing: the next request on it is answered.
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let next = read_response(&mut s);
        assert!(
            next.as_deref().is_some_and(|h| h.starts_with("HTTP/1.1 200")),
            "body later: {body_later}: the connection was closed without a word: {next:?} after {reply}"
        );
    }
}

/// One HTTP/1.1 response from `s` (head and its Content-Length body); its
/// head, or `None` when the connection ends first.
fn read_response(s: &mut std::net::TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some(head)
}
