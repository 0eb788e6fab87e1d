//! What the proxy writes to its log, through the real binary: JSON lines for
//! log shippers (`[log] format = "json"`, `EDGEPROXY_LOG_FORMAT`), and values
//! written as an operator reads them (`backend=127.0.0.1:19101`, never
//! `Some(…)`).

mod common;

use common::*;
use serde_json::Value;

/// The listener address from the `listening` line of a JSON log.
fn json_listener_addr(proxy: &Proxy) -> std::net::SocketAddr {
    let line = proxy
        .wait_for_log("\"listening\"", PATIENCE)
        .unwrap_or_else(|| panic!("no listening line:\n{}", proxy.log_text()));
    let v: Value = serde_json::from_str(&line).unwrap();
    v["addr"].as_str().unwrap().parse().unwrap()
}

fn assert_all_json(proxy: &Proxy) -> Vec<Value> {
    proxy
        .log_lines()
        .iter()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(v.get(key).is_some(), "{key} missing: {line}");
            }
            v
        })
        .collect()
}

#[test]
fn json_format_writes_one_object_per_line_with_fields_at_the_top() {
    let dir = TempDir::new("log-json");
    let backend = TagBackend::start("j1");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("j1", "web", "sa", backend.port()));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(&path, config(&db.path, "[log]\nformat = \"json\"\n")).unwrap();
    let proxy = Proxy::spawn(&["--config", path.to_str().unwrap()], &[]);
    let ready = proxy
        .wait_for_log("edgeproxy ready", PATIENCE)
        .unwrap_or_else(|| panic!("not ready:\n{}", proxy.log_text()));
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["message"], "edgeproxy ready");
    assert_eq!(ready["level"], "INFO");
    // Fields beside the message, typed: numbers stay numbers.
    assert_eq!(ready["region"], "sa");
    assert_eq!(ready["shards"], 2);

    let addr = json_listener_addr(&proxy);
    assert_eq!(which_backend(addr), "j1");
    // A warning with a value from a field: a failed backend connect.
    let refusing = RefusingPort::new();
    db.upsert(&Row::new("j1", "web", "sa", refusing.port()));
    let mark = proxy.log_mark();
    assert!(eventually(PATIENCE, || {
        let _ = probe(addr, std::time::Duration::from_secs(2));
        !proxy.log_lines_after(mark, "connect").is_empty()
    }));
    let lines = assert_all_json(&proxy);
    assert!(
        lines.iter().any(|v| v["level"] == "WARN"),
        "{}",
        proxy.log_text()
    );
}

#[test]
fn the_environment_switches_the_format() {
    let dir = TempDir::new("log-json-env");
    let db = Db::create(dir.join("routing.db"));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(&path, config(&db.path, "[log]\nformat = \"text\"\n")).unwrap();
    let proxy = Proxy::spawn(
        &["--config", path.to_str().unwrap()],
        &[("EDGEPROXY_LOG_FORMAT", "json")],
    );
    proxy
        .wait_for_log("edgeproxy ready", PATIENCE)
        .unwrap_or_else(|| panic!("not ready:\n{}", proxy.log_text()));
    assert_all_json(&proxy);
}

/// Every value is written with Display: the address a backend has, not
/// `Some(127.0.0.1:19101)`; nothing anywhere says `Some(` or `None`.
#[test]
fn values_are_written_as_displayed_not_debugged() {
    let dir = TempDir::new("log-display");
    let backend = TagBackend::start("d1");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("d1", "web", "sa", backend.port()));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db.path,
            "[api]\nenabled = true\nlisten_addr = \"0.0.0.0:0\"\n\
             [[listener]]\nname = \"web\"\naddr = \"127.0.0.1:0\"\napp = \"web\"\n\
             [[listener]]\nname = \"none\"\naddr = \"127.0.0.1:0\"\napp = \"ghost\"\n",
        ),
    )
    .unwrap();
    let proxy =
        Proxy::start_with_rust_log(&["--config", path.to_str().unwrap()], &[], Some("debug"));
    let mark = proxy.log_mark();
    assert_eq!(which_backend(proxy.listener("web")), "d1");
    let proxying = proxy
        .wait_for_log_after(mark, "proxying", PATIENCE)
        .unwrap_or_else(|| panic!("no proxying line:\n{}", proxy.log_text()));
    assert_eq!(
        field(&proxying, "backend").as_deref(),
        Some(backend.addr.to_string().as_str()),
        "{proxying}"
    );
    assert_eq!(field(&proxying, "backend_id").as_deref(), Some("d1"));
    // A refused connection's debug line names the app it had no backend for.
    let _ = probe(proxy.listener("none"), PATIENCE);
    let ended = proxy
        .wait_for_log_after(mark, "connection ended", PATIENCE)
        .unwrap_or_else(|| panic!("no connection ended line:\n{}", proxy.log_text()));
    assert_eq!(field(&ended, "app").as_deref(), Some("ghost"), "{ended}");

    let log = proxy.log_text();
    for debugged in ["Some(", "None", "[\""] {
        assert!(!log.contains(debugged), "{debugged:?} in the log:\n{log}");
    }
}

/// `[log] access = true`: one line per connection when it ends, with what
/// HAProxy's tcplog gives, even with the log level at warn. Off by default;
/// SIGHUP switches it.
#[test]
fn access_log_has_one_line_per_connection() {
    use std::io::Write;
    let dir = TempDir::new("log-access");
    let backend = TagBackend::start("a1");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("a1", "web", "sa", backend.port()));
    let path = dir.join("edgeproxy.toml");
    let listeners = "[[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n\
                     [[listener]]\nname = \"ghost\"\naddr = \"127.0.0.1:0\"\napp = \"ghost\"\n";
    let write = |access: bool| {
        let extra = format!("[log]\nlevel = \"warn\"\naccess = {access}\n{listeners}");
        std::fs::write(&path, config(&db.path, &extra)).unwrap();
    };
    write(false);
    // RUST_LOG unset: the file's level (warn) applies. The readiness lines
    // are info, so wait for the process by its listeners instead.
    let proxy = Proxy::start_with_rust_log(
        &["--config", path.to_str().unwrap()],
        &[("RUST_LOG", "warn,control::app=info")],
        None,
    );
    let main = proxy.listener("main");
    let exchange = || {
        let (name, mut s) = connect_tagged(main);
        assert_eq!(name, "a1");
        s.write_all(b"hello").unwrap();
        let mut echo = [0u8; 5];
        std::io::Read::read_exact(&mut s, &mut echo).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(read_until_closed(&s).is_empty());
        s.local_addr().unwrap()
    };
    // Off: a whole connection, no line.
    exchange();

    let mark = proxy.log_mark();
    write(true);
    proxy.signal(SIGHUP);
    // The SIGHUP is applied once the knobs line says so.
    proxy
        .wait_for_log_after(mark, "limits and timeouts updated", PATIENCE)
        .unwrap_or_else(|| panic!("SIGHUP not applied:\n{}", proxy.log_text()));
    let client = exchange();
    let line = proxy
        .wait_for_log_after(mark, "edgeproxy::access", PATIENCE)
        .unwrap_or_else(|| panic!("no access line:\n{}", proxy.log_text()));
    let get = |key: &str| field(&line, key).unwrap_or_else(|| panic!("no {key}: {line}"));
    assert_eq!(get("client"), client.to_string(), "{line}");
    assert_eq!(get("listener"), "main");
    assert_eq!(get("app"), "*");
    assert_eq!(get("backend"), backend.addr.to_string());
    assert_eq!(get("backend_id"), "a1");
    assert_eq!(get("bytes_up"), "5", "{line}");
    assert_eq!(
        get("bytes_down"),
        "8",
        "greeting a1\\n and the echo: {line}"
    );
    assert_eq!(get("end"), "closed");
    get("duration_ms").parse::<u64>().expect("a number of ms");
    assert!(line.contains("INFO"), "{line}");
    assert_eq!(
        proxy.log_lines_after(0, "edgeproxy::access").len(),
        1,
        "the connection before the SIGHUP wrote a line:\n{}",
        proxy.log_text()
    );

    // A refused connection: no backend, and why.
    let mark = proxy.log_mark();
    let _ = probe(proxy.listener("ghost"), PATIENCE);
    let line = proxy
        .wait_for_log_after(mark, "edgeproxy::access", PATIENCE)
        .unwrap_or_else(|| panic!("no access line:\n{}", proxy.log_text()));
    assert_eq!(field(&line, "end").as_deref(), Some("no_backend"), "{line}");
    assert_eq!(field(&line, "backend").as_deref(), Some("-"), "{line}");
    assert_eq!(field(&line, "app").as_deref(), Some("ghost"), "{line}");
    assert_eq!(field(&line, "bytes_up").as_deref(), Some("0"), "{line}");
}

/// A `RUST_LOG` that does not parse (a typo in a level) falls back to
/// `log.level`, and says so: before, the fallback was silent, and an
/// operator asking for `control=tarce` saw the info lines and no reason.
#[test]
fn an_invalid_rust_log_is_reported_not_silently_ignored() {
    let dir = TempDir::new("log-bad-rust-log");
    let db = Db::create(dir.join("routing.db"));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(&path, config(&db.path, "")).unwrap();
    let proxy = Proxy::start_with_rust_log(
        &["--config", path.to_str().unwrap()],
        &[],
        Some("info,control=tarce"),
    );
    let line = proxy
        .wait_for_log("RUST_LOG is not a valid filter", PATIENCE)
        .unwrap_or_else(|| panic!("no warning; log:\n{}", proxy.log_text()));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("control=tarce"), "{line}");
    assert!(line.contains("log.level"), "{line}");
}

/// `RUST_LOG=verbose` parses (tracing reads a bare word that is not a level
/// as a target: "everything under `verbose` at trace"), so it silenced all
/// but errors without a word. A bare word that is not a level is said to be
/// none, and everything else logs at `log.level` (QA).
#[test]
fn a_rust_log_word_that_is_not_a_level_warns_and_keeps_log_level() {
    let dir = TempDir::new("log-verbose-rust-log");
    let db = Db::create(dir.join("routing.db"));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(&path, config(&db.path, "")).unwrap();
    let proxy =
        Proxy::spawn_with_rust_log(&["--config", path.to_str().unwrap()], &[], Some("verbose"));
    let line = proxy
        .wait_for_log("is not a level", PATIENCE)
        .unwrap_or_else(|| panic!("no warning; log:\n{}", proxy.log_text()));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("verbose"), "{line}");
    assert!(line.contains("log.level"), "{line}");
    // The default level (info) still applies to everything else.
    proxy.ready();
}
