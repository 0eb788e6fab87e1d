//! SIGHUP re-reads the config file, through the real binary: listeners come
//! and go (open connections of a removed one go on), limits change for new
//! connections, and a bad file changes nothing.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use common::*;

const LISTENER: &str = "[[listener]]\naddr = \"127.0.0.1:0\"\nname = ";

/// A proxy with one backend, `x`, and the config file `extra` (which lists
/// the listeners).
struct Setup {
    dir: TempDir,
    db: Db,
    _backend: TagBackend,
    proxy: Proxy,
}

impl Setup {
    fn new(tag: &str, extra: &str) -> Setup {
        let dir = TempDir::new(tag);
        let backend = TagBackend::start("x");
        let db = Db::create(dir.join("routing.db"));
        db.upsert(&Row::new("x", "web", "sa", backend.port()));
        let proxy = Proxy::with_config(&dir, &config(&db.path, extra));
        Setup {
            dir,
            db,
            _backend: backend,
            proxy,
        }
    }

    /// Rewrites the config file with `extra`, sends SIGHUP and waits until
    /// the proxy has handled it (the routing re-read comes last). Returns the
    /// log mark from before the signal.
    fn reload(&self, extra: &str) -> usize {
        std::fs::write(
            self.dir.join("edgeproxy.toml"),
            config(&self.db.path, extra),
        )
        .unwrap();
        let mark = self.proxy.log_mark();
        self.proxy.signal(SIGHUP);
        self.proxy
            .wait_for_log_after(mark, "SIGHUP: ", PATIENCE)
            .unwrap_or_else(|| panic!("SIGHUP not acknowledged; log:\n{}", self.proxy.log_text()));
        self.proxy
            .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
            .unwrap_or_else(|| panic!("SIGHUP not finished; log:\n{}", self.proxy.log_text()));
        mark
    }
}

fn listeners(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{LISTENER}\"{n}\"\n"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An echo round trip on a connection the backend already greeted.
fn echo(mut s: &TcpStream, msg: &str) {
    s.write_all(format!("{msg}\n").as_bytes()).unwrap();
    assert_eq!(read_line(s).as_deref(), Some(msg));
}

fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect(addr),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[test]
fn listeners_are_added_and_removed_and_open_connections_go_on() {
    let s = Setup::new("sighup-listeners", &listeners(&["a", "b"]));
    let a = s.proxy.listener("a");
    let b = s.proxy.listener("b");
    let (name, through_b) = connect_tagged(b);
    assert_eq!(name, "x");
    echo(&through_b, "before");

    let mark = s.reload(&listeners(&["a", "c"]));
    let stopped = s.proxy.log_lines_after(mark, "listener stopped");
    assert_eq!(stopped.len(), 1, "{stopped:#?}");
    assert_eq!(field(&stopped[0], "listener").as_deref(), Some("b"));
    let started = s.proxy.log_lines_after(mark, "listening");
    assert_eq!(
        started.len(),
        1,
        "only the new listener starts: {started:#?}"
    );
    assert_eq!(field(&started[0], "listener").as_deref(), Some("c"));
    let c: SocketAddr = field(&started[0], "addr").unwrap().parse().unwrap();

    // The new listener serves.
    assert_eq!(which_backend(c), "x");
    // The removed one stops accepting (the shards close their sockets on
    // their own schedule after the log line).
    assert!(
        eventually(PATIENCE, || refused(b)),
        "listener b still accepts after SIGHUP removed it"
    );
    // ... while its open connection goes on, both ways.
    echo(&through_b, "after");
    echo(&through_b, "and again");
    // The unchanged one was not restarted: same address, still serving.
    assert_eq!(which_backend(a), "x");

    // A removed listener can come back, on a new port.
    let mark = s.reload(&listeners(&["a", "b", "c"]));
    let started = s.proxy.log_lines_after(mark, "listening");
    assert_eq!(started.len(), 1, "{started:#?}");
    assert_eq!(field(&started[0], "listener").as_deref(), Some("b"));
    let b2: SocketAddr = field(&started[0], "addr").unwrap().parse().unwrap();
    assert_eq!(which_backend(b2), "x");
    assert_eq!(which_backend(c), "x");
    echo(&through_b, "still");
}

#[test]
fn a_lowered_connection_limit_applies_to_new_connections() {
    let limits = |n: u32| {
        format!(
            "[limits]\nmax_connections = {n}\n\n{}",
            listeners(&["main"])
        )
    };
    let s = Setup::new("sighup-limits", &limits(100));
    let addr = s.proxy.listener("main");
    let held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let (name, stream) = connect_tagged(addr);
            assert_eq!(name, "x");
            stream
        })
        .collect();

    let mark = s.reload(&limits(4));
    let updated = s.proxy.log_lines_after(mark, "limits and timeouts updated");
    assert_eq!(updated.len(), 1, "{updated:#?}");
    assert!(
        updated[0].contains("limits.max_connections: 100 → 4"),
        "{}",
        updated[0]
    );
    // Four are open: a fifth waits in the accept queue, unserved.
    let waiting = connect_waiting(addr);
    // The open ones are not touched.
    for (i, h) in held.iter().enumerate() {
        echo(h, &format!("held {i}"));
    }

    // A higher limit: the waiting client is served, and more with it.
    s.reload(&limits(10));
    assert_eq!(read_line(&waiting).as_deref(), Some("x"));
    echo(&waiting, "served at last");
    let (name, extra) = connect_tagged(addr);
    assert_eq!(name, "x");
    echo(&extra, "room again");
}

/// QA: with `max_connections = 0` (unlimited) connections were not counted
/// process-wide, so a limit set later by SIGHUP (what an operator reaches
/// for when a flood arrives) ignored every connection already open: with
/// four held and the limit set to four, four more were served.
#[test]
fn a_limit_set_on_an_unlimited_proxy_counts_the_connections_already_open() {
    let limits = |n: u32| {
        format!(
            "[limits]\nmax_connections = {n}\n\n{}",
            listeners(&["main"])
        )
    };
    let s = Setup::new("sighup-limit-from-unlimited", &limits(0));
    let addr = s.proxy.listener("main");
    let held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let (name, stream) = connect_tagged(addr);
            assert_eq!(name, "x");
            stream
        })
        .collect();

    let mark = s.reload(&limits(4));
    let updated = s.proxy.log_lines_after(mark, "limits and timeouts updated");
    assert_eq!(updated.len(), 1, "{updated:#?}");
    // Four are open: a fifth waits in the accept queue, unserved.
    let waiting = connect_waiting(addr);
    for (i, h) in held.iter().enumerate() {
        echo(h, &format!("held {i}"));
    }
    // They leave: the waiting client is served.
    drop(held);
    assert_eq!(read_line(&waiting).as_deref(), Some("x"));
    echo(&waiting, "served");
}

/// `[affinity]` changed by SIGHUP applies to the next connection, not at
/// the affinity GC's next sweep (a minute by default; an hour here, so a
/// late application cannot pass): with `ttl_secs = 0` a client already
/// bound is routed afresh at once.
#[test]
fn an_affinity_change_applies_to_the_next_connection() {
    let affinity = |ttl: u32| {
        format!(
            "[affinity]\nttl_secs = {ttl}\ngc_interval_secs = 3600\n\n{}",
            listeners(&["main"])
        )
    };
    let s = Setup::new("sighup-affinity", &affinity(600));
    let addr = s.proxy.listener("main");
    // 127.0.0.1 is bound to x, the only backend; held open, so x has load.
    let (name, _first) = connect_tagged(addr);
    assert_eq!(name, "x");

    // A second backend, idle: a fresh pick would choose it.
    let y = TagBackend::start("y");
    let mark = s.proxy.log_mark();
    s.db.upsert(&Row::new("y", "web", "sa", y.port()));
    s.proxy
        .wait_for_log_where(
            mark,
            |l| {
                l.contains("routing table reloaded") && field(l, "backends").as_deref() == Some("2")
            },
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("y never in the table; log:\n{}", s.proxy.log_text()));
    // The binding holds the client on x all the same.
    let (name, _second) = connect_tagged(addr);
    assert_eq!(name, "x", "the bound client left its backend");

    let mark = s.reload(&affinity(0));
    let updated = s.proxy.log_lines_after(mark, "limits and timeouts updated");
    assert_eq!(updated.len(), 1, "{updated:#?}");
    assert!(
        updated[0].contains("affinity.ttl_secs: 600 → 0"),
        "{}",
        updated[0]
    );
    // Affinity is off: the next connection goes where load sends it.
    let (name, _third) = connect_tagged(addr);
    assert_eq!(
        name, "y",
        "the next connection after SIGHUP still followed the binding"
    );
}

#[test]
fn an_invalid_file_is_rejected_and_the_running_config_stays() {
    let base = format!("[limits]\nmax_connections = 2\n\n{}", listeners(&["a"]));
    let s = Setup::new("sighup-invalid", &base);
    let a = s.proxy.listener("a");
    let (_, held) = connect_tagged(a);

    // Each of these would remove listener a, add z and lift the limit, were
    // it accepted.
    let invalid = [
        format!(
            "[limits]\nmax_connections = 100\nno_such_key = 1\n\n{}",
            listeners(&["z"])
        ),
        format!(
            "[limits]\nmax_connections = \"lots\"\n\n{}",
            listeners(&["z"])
        ),
        format!(
            "[limits]\nmax_connections = 100\nconnect_attempts = 0\n\n{}",
            listeners(&["z"])
        ),
        "[limits]\nmax_connections = 100\n\n[[listener]]\nname = \"z\"\naddr = \"no address\"\n"
            .to_string(),
        format!(
            "[limits]\nmax_connections = 100\n\n{} this is not TOML",
            listeners(&["z"])
        ),
    ];
    for text in &invalid {
        let mark = s.reload(text);
        let rejected = s
            .proxy
            .log_lines_after(mark, "new configuration rejected; keeping the running one");
        assert_eq!(rejected.len(), 1, "{text}\nlog:\n{}", s.proxy.log_text());
        assert!(rejected[0].contains("ERROR"), "{}", rejected[0]);
        assert!(
            field(&rejected[0], "error").is_some(),
            "says why: {}",
            rejected[0]
        );
        for other in [
            "listener stopped",
            "listening",
            "limits and timeouts updated",
        ] {
            assert!(
                s.proxy.log_lines_after(mark, other).is_empty(),
                "{other} after {text}"
            );
        }
        // Listener a still serves, and the limit of 2 still holds. (A
        // connection closed by the previous round counts until the proxy
        // has seen it close: there is no signal for that, so poll.)
        let mut second = None;
        assert!(
            eventually(PATIENCE, || {
                let (name, stream) = connect_with(a, b"");
                second = name.map(|_| stream);
                second.is_some()
            }),
            "listener a no longer serves after {text}"
        );
        // A third waits: the limit was not lifted by the rejected file.
        drop(connect_waiting(a));
    }
    echo(&held, "still fine");

    // SIGHUP still works after all that.
    let mark = s.reload(&format!(
        "[limits]\nmax_connections = 100\n\n{}",
        listeners(&["a", "z"])
    ));
    let started = s.proxy.log_lines_after(mark, "listening");
    assert_eq!(started.len(), 1, "{started:#?}");
    let z: SocketAddr = field(&started[0], "addr").unwrap().parse().unwrap();
    assert_eq!(which_backend(z), "x");
    assert_eq!(which_backend(a), "x");
}

/// A SIGHUP whose new TLS certificates cannot be loaded changes nothing: the
/// TLS listener keeps serving with its old settings, a listener added by the
/// same file does not start, and limits stay.
#[test]
fn sighup_with_unloadable_certificates_changes_nothing() {
    let tls_ok = "[[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n\
                  [[listener]]\nname = \"tls\"\naddr = \"127.0.0.1:0\"\n[listener.tls]\nself_signed = true\n";
    let s = Setup::new("sighup-tls", tls_ok);
    let tls_addr = s.proxy.listener("tls");
    let broken = "[limits]\nmax_connections = 1\n\
                  [[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n\
                  [[listener]]\nname = \"tls\"\naddr = \"127.0.0.1:0\"\n[listener.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n\
                  [[listener]]\nname = \"extra\"\naddr = \"127.0.0.1:0\"\n";
    let mark = s.reload(broken);
    let rejected = s
        .proxy
        .wait_for_log_after(mark, "new configuration rejected", PATIENCE)
        .expect("broken certificates were not reported");
    assert!(rejected.contains("/nonexistent/cert.pem"), "{rejected}");
    let after: Vec<String> = s.proxy.log_lines().into_iter().skip(mark).collect();
    assert!(
        !after
            .iter()
            .any(|l| l.contains("listener stopped") || l.contains("listener=extra")),
        "a listener changed: {after:?}"
    );
    // The TLS listener still accepts, and the old limit (100000) still holds:
    // two plain connections at once both reach the backend.
    let probe = TcpStream::connect(tls_addr).expect("tls listener went away");
    drop(probe);
    let (a, _ka) = connect_tagged(s.proxy.listener("main"));
    let (b, _kb) = connect_tagged(s.proxy.listener("main"));
    assert_eq!((a.as_str(), b.as_str()), ("x", "x"));
}

#[test]
fn sighup_changes_the_routing_reload_interval() {
    let dir = TempDir::new("interval");
    let a = TagBackend::start("a");
    let b = TagBackend::start("b");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("a", "web", "sa", a.port()));
    let toml = |ms: u64| {
        format!(
            "[routing]\ndb_path = {:?}\nreload_interval_ms = {ms}\n[runtime]\nshards = 1\n{LISTENER}\"main\"\n",
            db.path.display().to_string()
        )
    };
    // Started checking the table once an hour.
    let proxy = Proxy::with_config(&dir, &toml(3_600_000));
    assert_eq!(which_backend(proxy.addr()), "a");

    std::fs::write(dir.join("edgeproxy.toml"), toml(100)).unwrap();
    let mark = proxy.log_mark();
    proxy.signal(SIGHUP);
    proxy
        .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
        .unwrap_or_else(|| panic!("SIGHUP not finished; log:\n{}", proxy.log_text()));

    // A change after the SIGHUP: only the new 100 ms check can find it
    // within the test's patience.
    let mark = proxy.log_mark();
    db.upsert(&Row::new("b", "web", "sa", b.port()));
    db.exec("UPDATE backends SET deleted = 1 WHERE id = 'a'");
    proxy
        .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
        .unwrap_or_else(|| panic!("change not picked up; log:\n{}", proxy.log_text()));
    assert_eq!(which_backend(proxy.addr()), "b");
}

/// A restart-only setting changed by SIGHUP is named, old → new, compared
/// with what runs (not with the previous file): reverting it before a
/// restart silences the warning, leaving it in place repeats it.
#[test]
fn restart_only_changes_are_named_against_the_running_config() {
    let base = |region: &str, ttl: u32| {
        format!(
            "[pop]\nregion = \"{region}\"\n[dns]\nttl_secs = {ttl}\n\n{}",
            listeners(&["main"])
        )
    };
    let s = Setup::new("sighup-restart-only", &base("sa", 5));
    let restart = "takes effect only after a restart";
    let keys = |mark: usize| -> Vec<(String, String, String)> {
        s.proxy
            .log_lines_after(mark, restart)
            .iter()
            .map(|l| {
                (
                    field(l, "key").unwrap(),
                    field(l, "old").unwrap(),
                    field(l, "new").unwrap(),
                )
            })
            .collect()
    };

    let mark = s.reload(&base("eu", 30));
    let changed = keys(mark);
    // `field` strips the outer quotes of `old="sa"`: the TOML string's own.
    assert!(
        changed.contains(&("pop.region".into(), "sa".into(), "eu".into())),
        "{changed:?}"
    );
    assert!(
        changed
            .iter()
            .any(|(k, o, n)| k == "dns.ttl_secs" && o == "5" && n == "30"),
        "{changed:?}"
    );
    assert!(s
        .proxy
        .log_lines_after(mark, restart)
        .iter()
        .all(|l| l.contains("WARN")));

    // Unchanged file, still differs from what runs: said again.
    let mark = s.reload(&base("eu", 30));
    assert!(
        keys(mark).iter().any(|(k, _, _)| k == "pop.region"),
        "{:?}",
        keys(mark)
    );

    // Reverted: what runs is what the file says. Nothing to say.
    let mark = s.reload(&base("sa", 5));
    assert!(keys(mark).is_empty(), "{:?}", keys(mark));
    assert_eq!(which_backend(s.proxy.listener("main")), "x");
}

/// The `limits and timeouts updated` line names every knob that changed,
/// outside `[limits]` and `[affinity]` too, and is not logged with nothing
/// to name. Before, a SIGHUP that changed only `health.rtt_weight`, only a
/// restart-only key that the connection limit's reserve counts (`[dns]`,
/// `runtime.shards`), or only the listeners logged `changes=` and nothing;
/// one that changed only `limits.shutdown_grace_secs` logged nothing at all.
#[test]
fn the_update_line_names_every_change_and_is_never_empty() {
    let s = Setup::new("sighup-knob-names", &listeners(&["main"]));
    let updated = |mark: usize| s.proxy.log_lines_after(mark, "limits and timeouts updated");
    let file = |extra: &str, names: &[&str]| format!("{extra}\n{}", listeners(names));

    let rtt = "[health]\nrtt_weight = 0.5\n";
    let lines = updated(s.reload(&file(rtt, &["main"])));
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("changes=health.rtt_weight: 0.0 → 0.5"),
        "{}",
        lines[0]
    );

    let rate = format!("{rtt}[rate_limit]\nburst = 7\n");
    let lines = updated(s.reload(&file(&rate, &["main"])));
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("changes=rate_limit.burst: 10 → 7"),
        "{}",
        lines[0]
    );

    // Restart-only: warned about, and the connection limit stays derived
    // from what runs, so there is nothing to say about knobs.
    let dns = format!("{rate}[dns]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n");
    let mark = s.reload(&file(&dns, &["main"]));
    assert!(
        !s.proxy
            .log_lines_after(mark, "takes effect only after a restart")
            .is_empty(),
        "{}",
        s.proxy.log_text()
    );
    assert_eq!(updated(mark), Vec::<String>::new());

    // A listener more: its descriptors come out of the derived limit.
    let lines = updated(s.reload(&file(&dns, &["main", "second"])));
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("changes=max_connections (derived): "),
        "{}",
        lines[0]
    );

    // Only the drain time on stop: nothing the shards hold, named all the
    // same (it was applied without a word).
    let grace = format!("{dns}[limits]\nshutdown_grace_secs = 5\n");
    let lines = updated(s.reload(&file(&grace, &["main", "second"])));
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("changes=limits.shutdown_grace_secs: 30 → 5"),
        "{}",
        lines[0]
    );
}

/// QA: a listener added at SIGHUP whose port was in use was never started,
/// not even at a later SIGHUP once the port was free, and only one ERROR
/// line said it was missing.
#[test]
fn a_listener_whose_port_is_taken_is_reported_and_starts_at_a_later_sighup() {
    const METRICS: &str = "[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n\n";
    let s = Setup::new(
        "sighup-port-taken",
        &format!("{METRICS}{}", listeners(&["a"])),
    );
    let metrics = s.proxy.metrics_addr();
    let up = |name: &str| {
        let text = http_get(metrics, "/metrics").1;
        sample(
            &text,
            &format!("edgeproxy_listener_up{{listener=\"{name}\"}}"),
        )
    };
    assert_eq!(up("a"), Some(1.0));

    // Another socket holds the port listener b asks for.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b_addr = holder.local_addr().unwrap();
    let file = format!(
        "{METRICS}{}\n[[listener]]\nname = \"b\"\naddr = \"{b_addr}\"\n",
        listeners(&["a"])
    );
    let mark = s.reload(&file);
    let failed = s.proxy.log_lines_after(mark, "cannot start listener");
    assert_eq!(failed.len(), 1, "{}", s.proxy.log_text());
    assert_eq!(field(&failed[0], "listener").as_deref(), Some("b"));
    let missing = s
        .proxy
        .log_lines_after(mark, "configured listeners are not running");
    assert_eq!(missing.len(), 1, "{}", s.proxy.log_text());
    assert!(
        missing[0].contains(&format!("b {b_addr}")),
        "{}",
        missing[0]
    );
    assert_eq!(up("b"), Some(0.0));
    assert_eq!(up("a"), Some(1.0));
    // Still ready: listener a serves, and a 503 would take it out too.
    let (status, body) = http_get(metrics, "/ready");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("ready; not listening") && body.ends_with(": b\n"),
        "{body:?}"
    );
    assert_eq!(which_backend(s.proxy.listener("a")), "x");

    // The port is freed; the same file again, another SIGHUP.
    drop(holder);
    let mark = s.reload(&file);
    let started: Vec<String> = s
        .proxy
        .log_lines_after(mark, " listening ")
        .into_iter()
        .filter(|l| field(l, "listener").as_deref() == Some("b"))
        .collect();
    assert_eq!(started.len(), 1, "{}", s.proxy.log_text());
    assert_eq!(field(&started[0], "addr"), Some(b_addr.to_string()));
    assert_eq!(which_backend(b_addr), "x");
    assert_eq!(up("b"), Some(1.0));
    assert!(s
        .proxy
        .log_lines_after(mark, "configured listeners are not running")
        .is_empty());
    assert_eq!(http_get(metrics, "/ready"), (200, "ready\n".to_string()));
    // Listener a was left alone.
    assert_eq!(which_backend(s.proxy.listener("a")), "x");
}

/// The inodes of the sockets listening on `port` (IPv4), from
/// `/proc/net/tcp`: the same inodes mean the same sockets.
fn listening_sockets(port: u16) -> Vec<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    let mut inodes: Vec<u64> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f[1].ends_with(&local) && f[3] == "0A")
        .map(|f| f[9].parse().unwrap())
        .collect();
    inodes.sort();
    inodes
}

/// A listener changed on its own address (another app, then another name)
/// keeps its sockets: none closes, so no client queued on one is reset, and
/// new connections get the new settings at once. Clients that connect all
/// through the reloads are all served.
#[test]
fn a_listener_changed_on_its_own_address_keeps_its_sockets() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listener = |name: &str, app: &str| {
        format!("[[listener]]\nname = \"{name}\"\naddr = \"{addr}\"\napp = \"{app}\"\n")
    };
    let s = Setup::new("sighup-in-place", &listener("a", "web"));
    let other = TagBackend::start("y");
    s.db.upsert(&Row::new("y", "api", "sa", other.port()));
    // Routable before the listener moves to its app: a client meeting the
    // new app before the table holds its backend would find none.
    assert!(
        eventually(PATIENCE, || s.proxy.log_lines().iter().any(|l| l
            .contains("routing table reloaded")
            && l.contains("backends=2"))),
        "backend y never loaded: {}",
        s.proxy.log_text()
    );
    let sockets = listening_sockets(port);
    assert!(!sockets.is_empty(), "nothing listens on {port}");
    let (name, open) = connect_tagged(addr);
    assert_eq!(name, "x");

    // Clients connect without a pause while the listener changes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut served, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match TcpStream::connect(addr).map(|s| read_line(&s)) {
                    Ok(Some(_)) => served += 1,
                    Ok(None) => failed.push("connected, no greeting".to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (served, failed)
        })
    };

    let mark = s.reload(&listener("a", "api"));
    let updated = s.proxy.log_lines_after(mark, "listener updated in place");
    assert_eq!(updated.len(), 1, "{}", s.proxy.log_text());
    assert_eq!(field(&updated[0], "listener").as_deref(), Some("a"));
    assert!(s.proxy.log_lines_after(mark, "listener stopped").is_empty());
    assert!(s.proxy.log_lines_after(mark, " listening ").is_empty());
    assert_eq!(
        listening_sockets(port),
        sockets,
        "the sockets were replaced"
    );
    assert_eq!(which_backend(addr), "y", "the new app is not in force");

    // Another name, the same address: renamed, still the same sockets.
    let mark = s.reload(&listener("b", "web"));
    let renamed = s.proxy.log_lines_after(mark, "listener renamed");
    assert_eq!(renamed.len(), 1, "{}", s.proxy.log_text());
    assert_eq!(field(&renamed[0], "listener").as_deref(), Some("b"));
    assert_eq!(field(&renamed[0], "was").as_deref(), Some("a"));
    assert_eq!(
        listening_sockets(port),
        sockets,
        "the sockets were replaced"
    );
    assert_eq!(which_backend(addr), "x");
    assert!(s
        .proxy
        .log_lines_after(mark, "configured listeners are not running")
        .is_empty());

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failed) = clients.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} clients failed: {:?}",
        failed.len(),
        served + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(served > 0);
    // The connection opened before both reloads goes on.
    echo(&open, "after");
}
