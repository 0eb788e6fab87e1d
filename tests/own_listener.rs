//! A backend at the proxy's own listening address, through the real binary:
//! the discovery API refuses it, a `routing.db` row like that is skipped with
//! a warning naming it, and clients are served by the other backends.
//!
//! QA registered a backend at `127.0.0.1:<listener port>`: every connection
//! routed to it came back in as a new client (affinity sent the hop, from
//! 127.0.0.1 too, the same way), one client filled the connection limit with
//! a chain of hops, and nothing was served until the idle timeout.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "own-listener-token-0123456789";

/// `POST /api/v1/register` of `ip:port` as `id`: (status, JSON body).
fn register(api: SocketAddr, id: &str, ip: &str, port: u16) -> (u16, Value) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(PATIENCE))
        .build()
        .new_agent();
    let body = json!({"id": id, "app": "web", "region": "sa", "ip": ip, "port": port});
    let mut resp = agent
        .post(&format!("http://{api}/api/v1/register"))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .expect("register");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

/// `GET /api/v1/backends/{id}`: (status, JSON body).
fn backend(api: SocketAddr, id: &str) -> (u16, Value) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(PATIENCE))
        .build()
        .new_agent();
    let mut resp = agent
        .get(&format!("http://{api}/api/v1/backends/{id}"))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .expect("get backend");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

#[test]
fn a_backend_at_an_own_listener_is_refused_and_skipped_and_clients_do_not_loop() {
    let dir = TempDir::new("own-listener");
    let db = Db::create(dir.join("routing.db"));
    let x = TagBackend::start("x");
    // One listener on loopback, one on every IPv4 address (reached at
    // 127.0.0.1 too). Affinity stays on, as QA ran it: without the fix a
    // looping client is bound to the loop and hangs at the connection limit.
    let extra = format!(
        "[limits]\nmax_connections = 16\n\n\
         [api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\ntoken = {TOKEN:?}\n\n\
         [[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"any\"\naddr = \"0.0.0.0:0\"\n"
    );
    let proxy = Proxy::with_config(&dir, &config(&db.path, &extra));
    let api: SocketAddr = proxy.logged_addr("api listening", "addr");
    let main = proxy.listener("main");
    let any = proxy.listener("any");

    // The API refuses both, naming the listener, and writes nothing.
    for (id, listener) in [("loop", main), ("loop-any", any)] {
        let (status, body) = register(api, id, "127.0.0.1", listener.port());
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["field"], "port", "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("own listener {listener}")),
            "{error}"
        );
        assert_eq!(backend(api, id).0, 404);
    }

    // The same by hand, ahead of x in table order: a pick between equals
    // takes the first, so without the fix the first client would loop.
    let mark = proxy.log_mark();
    // (`Row::new` puts a backend at 127.0.0.1.)
    let at_main = Row::new("loop", "web", "sa", main.port());
    let at_any = Row::new("loop-any", "web", "sa", any.port());
    db.exec("BEGIN");
    db.upsert(&at_main);
    db.upsert(&at_any);
    db.upsert(&Row::new("x", "web", "sa", x.port()));
    db.exec("COMMIT");
    for (id, listener) in [("loop", main), ("loop-any", any)] {
        let warned = proxy
            .wait_for_log_where(
                mark,
                |l| {
                    l.contains("skipping invalid routing row")
                        && field(l, "backend").as_deref() == Some(id)
                },
                PATIENCE,
            )
            .unwrap_or_else(|| panic!("no warning for {id}; log:\n{}", proxy.log_text()));
        assert!(
            warned.contains(&format!("own listener {listener}")),
            "{warned}"
        );
    }
    proxy
        .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
        .unwrap();

    // Clients on both listeners, held open together, are all served by x
    // directly: one connection each reaches it, none comes back in.
    let any_at_loopback = SocketAddr::from(([127, 0, 0, 1], any.port()));
    let mut held = Vec::new();
    for i in 0..8 {
        let (name, stream) = connect_tagged(if i % 2 == 0 { main } else { any_at_loopback });
        assert_eq!(name, "x", "client {i}");
        held.push(stream);
    }
    assert_eq!(x.accepted(), 8);
    assert_eq!(backend(api, "loop").1["state"], "invalid");
    assert_eq!(backend(api, "x").1["state"], "serving");
}

/// `check-config` warns about such a row against the configured addresses
/// (not bound: `--no-bind`, so the fixed ports cannot clash).
#[test]
fn check_config_warns_about_a_row_at_an_own_listener() {
    let dir = TempDir::new("own-listener-check");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("loop", "web", "sa", 18380));
    db.upsert(&Row::new("loop-any", "web", "sa", 18381));
    db.upsert(&Row::new("x", "web", "sa", 18382));
    let path = dir.join("edgeproxy.toml");
    let listeners = "[[listener]]\nname = \"main\"\naddr = \"127.0.0.1:18380\"\n\n\
                     [[listener]]\nname = \"any\"\naddr = \"0.0.0.0:18381\"\n";
    std::fs::write(&path, config(&db.path, listeners)).unwrap();
    let (status, _, stderr) = run_to_end(
        &[
            "check-config",
            "--no-bind",
            "--config",
            path.to_str().unwrap(),
        ],
        &[],
    );
    assert!(status.success(), "{stderr}");
    for (id, addr, listener) in [
        ("loop", "127.0.0.1:18380", "127.0.0.1:18380"),
        ("loop-any", "127.0.0.1:18381", "0.0.0.0:18381"),
    ] {
        let said = format!(
            "routing row {id} is invalid and would be skipped: address {addr} is this \
             proxy's own listener {listener}"
        );
        assert!(stderr.contains(&said), "{said:?} not in:\n{stderr}");
    }
    assert!(!stderr.contains("routing row x "), "{stderr}");
}

/// An address this host has while the test runs (on `lo`), removed when
/// dropped.
struct HostAddress(&'static str);

impl HostAddress {
    fn add(cidr: &'static str) -> HostAddress {
        common::netns::require_root();
        let out = std::process::Command::new("ip")
            .args(["addr", "add", cidr, "dev", "lo"])
            .output()
            .expect("ip addr add");
        assert!(out.status.success(), "ip addr add {cidr}: {out:?}");
        HostAddress(cidr)
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", self.0, "dev", "lo"])
            .output();
    }
}

/// QA: a backend registered at an address the host did not have yet (DHCP
/// late, a VIP moved here by keepalived), on the port of a listener bound
/// to 0.0.0.0, was routed once the address came: a 151-hop loop until a
/// SIGHUP. The host's addresses are watched while such a listener runs.
#[test]
fn a_row_at_an_address_the_host_gains_later_is_skipped_then() {
    let dir = TempDir::new("own-listener-late");
    let db = Db::create(dir.join("routing.db"));
    let x = TagBackend::start("x");
    db.upsert(&Row::new("x", "web", "sa", x.port()));
    let extra = format!(
        "[api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\ntoken = {TOKEN:?}\n\n\
         [[listener]]\nname = \"any\"\naddr = \"0.0.0.0:0\"\n"
    );
    let proxy = Proxy::with_config(&dir, &config(&db.path, &extra));
    let api = proxy.logged_addr("api listening", "addr");
    let any = proxy.listener("any");
    let late_ip = "198.18.77.77";
    assert_eq!(
        register(api, "late", late_ip, any.port()).0,
        201,
        "not this host's yet"
    );
    let mark = proxy.log_mark();
    let _address = HostAddress::add("198.18.77.77/32");
    let warned = proxy
        .wait_for_log_where(
            mark,
            |l| {
                l.contains("skipping invalid routing row")
                    && field(l, "backend").as_deref() == Some("late")
            },
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("the row was not skipped; log:\n{}", proxy.log_text()));
    assert!(warned.contains("own listener 0.0.0.0:"), "{warned}");
    assert_eq!(backend(api, "late").1["state"], "invalid");
}
