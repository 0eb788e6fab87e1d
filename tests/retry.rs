//! Connect retries through the real binary: a dead backend that scores best
//! is skipped for the next one, a client is closed only when nothing is left
//! to try, and `connect_attempts = 1` turns the retry off. A backend whose
//! connect failed goes behind the working ones for a backoff, so the next
//! clients do not try it first (`engine/src/backoff.rs`).
//!
//! The dead backend is made the best by geography: it is the only BR backend
//! and the clients send PROXY headers from a BR address (200.160.2.3), while
//! the live ones are in the US.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

const BR: &str = "200.160.2.3";
const US: &str = "8.8.8.8";

fn setup(
    tag: &str,
    live: &[&str],
    dead: &[&str],
    extra: &str,
) -> (TempDir, Vec<TagBackend>, Proxy, Vec<RefusingPort>) {
    let dir = TempDir::new(tag);
    let db = Db::create(dir.join("routing.db"));
    let refusing: Vec<RefusingPort> = dead.iter().map(|_| RefusingPort::new()).collect();
    for (id, port) in dead.iter().zip(&refusing) {
        db.upsert(&Row::new(id, "web", "sa", port.port()).country("BR"));
    }
    let backends: Vec<TagBackend> = live.iter().map(|n| TagBackend::start(n)).collect();
    for b in &backends {
        db.upsert(&Row::new(&b.name, "web", "us", b.port()).country("US"));
    }
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db.path,
            &format!(
                "{extra}\n[[listener]]\nname = \"pp\"\naddr = \"127.0.0.1:0\"\naccept_proxy_protocol = true\n"
            ),
        ),
    )
    .unwrap();
    // Every failed attempt is a line at debug level (at warn, only the first
    // of a backend's failures is: see tests/no_backend.rs); these tests
    // count attempts.
    let proxy = Proxy::start_with_rust_log(
        &["--config", path.to_str().unwrap()],
        &[],
        Some("info,engine::conn=debug"),
    );
    (dir, backends, proxy, refusing)
}

/// A BR client's connection: its greeting (or `None` if closed), and an
/// echo round trip when it got one.
fn br_client(addr: SocketAddr, n: usize) -> Option<String> {
    let header = if n.is_multiple_of(2) {
        proxy_v1(client_at(BR), addr)
    } else {
        proxy_v2(client_at(BR), addr)
    };
    let (name, mut s) = connect_with(addr, &header);
    let name = name?;
    let msg = format!("message {n}\n");
    s.write_all(msg.as_bytes()).unwrap();
    assert_eq!(
        read_line(&s),
        Some(msg.trim_end().to_string()),
        "echo through {name}"
    );
    s.shutdown(Shutdown::Write).unwrap();
    assert!(read_until_closed(&s).is_empty());
    Some(name)
}

/// Returns once every line the proxy logged before this call has been read:
/// the SIGHUP line comes after them on the same stderr.
fn log_barrier(proxy: &Proxy) {
    let mark = proxy.log_mark();
    proxy.signal(SIGHUP);
    proxy
        .wait_for_log_after(mark, "SIGHUP:", PATIENCE)
        .expect("SIGHUP acknowledged");
}

#[test]
fn a_dead_best_backend_is_skipped_for_a_live_one() {
    // No affinity: every connection scores the dead backend first.
    let (_dir, backends, proxy, _refusing) = setup(
        "retry-dead-best",
        &["live-1", "live-2"],
        &["dead-br"],
        "[affinity]\nttl_secs = 0\n",
    );
    let addr = proxy.listener("pp");
    let mark = proxy.log_mark();

    const CLIENTS: usize = 24;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|n| std::thread::spawn(move || br_client(addr, n)))
        .collect();
    for (n, t) in threads.into_iter().enumerate() {
        let name = t.join().unwrap();
        assert!(
            matches!(name.as_deref(), Some("live-1" | "live-2")),
            "client {n} got {name:?}"
        );
    }
    assert_eq!(
        backends.iter().map(TagBackend::accepted).sum::<usize>(),
        CLIENTS
    );
    // The first of them tried the dead one first: the retry saved it (and
    // any that picked it before its failure was known; the rest went
    // straight to a live one while it cooled).
    assert!(
        proxy.wait_for_log_count_after(mark, "backend=dead-br", 1, PATIENCE),
        "expected a failed attempt on dead-br; log:\n{}",
        proxy.log_text()
    );
    log_barrier(&proxy);
    let failures = proxy.log_lines_after(mark, "backend connect failed");
    assert!(
        failures.iter().all(|l| l.contains("backend=dead-br")),
        "{failures:#?}"
    );
}

#[test]
fn with_affinity_a_client_is_rebound_away_from_the_dead_backend() {
    let (_dir, _backends, proxy, _refusing) = setup("retry-rebind", &["live-1"], &["dead-br"], "");
    let addr = proxy.listener("pp");
    let mark = proxy.log_mark();
    for n in 0..5 {
        assert_eq!(
            br_client(addr, n).as_deref(),
            Some("live-1"),
            "connection {n}"
        );
    }
    log_barrier(&proxy);
    // Only the first attempt hit the dead backend: the binding moved to the
    // live one.
    let failed = proxy.log_lines_after(mark, "backend connect failed");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    // Another BR client (no binding yet) is served by the live one too
    // (straight away while the dead one cools, after a probe if not).
    assert_eq!(which_backend_via(addr, "200.160.2.4", true), "live-1");
}

#[test]
fn with_every_backend_dead_the_client_is_closed() {
    let (_dir, _backends, proxy, _refusing) = setup(
        "retry-all-dead",
        &[],
        &["dead-1", "dead-2"],
        "[limits]\nconnect_timeout_ms = 1000\n",
    );
    let addr = proxy.listener("pp");
    let mark = proxy.log_mark();
    for v2 in [false, true] {
        let header = if v2 {
            proxy_v2(client_at(BR), addr)
        } else {
            proxy_v1(client_at(US), addr)
        };
        let (name, s) = connect_with(addr, &header);
        assert_eq!(name, None, "v2={v2}");
        assert!(read_until_closed(&s).is_empty());
    }
    // Both were tried for each client before giving up.
    assert!(proxy.wait_for_log_count_after(mark, "backend=dead-1", 2, PATIENCE));
    assert!(proxy.wait_for_log_count_after(mark, "backend=dead-2", 2, PATIENCE));
}

#[test]
fn one_connect_attempt_means_no_retry() {
    let (_dir, backends, proxy, _refusing) = setup(
        "retry-one-attempt",
        &["live-1"],
        &["dead-br"],
        "[affinity]\nttl_secs = 0\n\n[limits]\nconnect_attempts = 1\n",
    );
    let addr = proxy.listener("pp");
    let mark = proxy.log_mark();
    assert_eq!(br_client(addr, 0), None, "the first connection should fail");
    assert_eq!(backends[0].accepted(), 0, "the live backend was tried");
    // The dead one now cools: the next BR client goes to the live one on
    // its only attempt.
    assert_eq!(br_client(addr, 1).as_deref(), Some("live-1"));
    // The live backend is fine for a client it is best for.
    assert_eq!(which_backend_via(addr, US, false), "live-1");
    log_barrier(&proxy);
    // One attempt for the failed client, none since.
    let failed = proxy.log_lines_after(mark, "backend connect failed");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(
        failed.iter().all(|l| l.contains("backend=dead-br")),
        "{failed:#?}"
    );
}

/// A client from `source` (a loopback address of its own, so no affinity
/// binding carries over from another client): the greeting of the backend
/// that served it, or `None` when the proxy closed it.
fn greeting_from(proxy: SocketAddr, source: Ipv4Addr) -> Option<String> {
    read_line(&connect_from(proxy, source))
}

/// A connection to `proxy` from `source`, with the tests' read timeout.
fn connect_from(proxy: SocketAddr, source: Ipv4Addr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("TCP socket");
    socket
        .bind(&SocketAddr::from((source, 0)).into())
        .expect("bind the client's source address");
    socket
        .connect_timeout(&proxy.into(), PATIENCE)
        .expect("connect to the proxy");
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// The first client of `served` was lost (`why`), every later one served by
/// `good`.
fn first_lost_rest_good(served: &[Option<String>], proxy: &Proxy, why: &str) {
    assert_eq!(served[0], None, "{why}: {served:?}");
    assert!(
        served[1..].iter().all(|s| s.as_deref() == Some("good")),
        "{served:?}\n{}",
        proxy.log_text()
    );
}

/// QA's report: no health checks, three backends that refuse connections
/// registered before one that works, all in one app and region,
/// `connect_attempts = 3`, clients from distinct addresses. Every client
/// used to try the three dead ones (table order breaks the tie) and be
/// reset, though `good` worked: the "failing" mark changed nothing in
/// selection. Now only the first client, which finds out, is lost; and
/// when the backoffs end, the probes of the dead ones cost no client.
#[test]
fn dead_backends_registered_first_do_not_starve_the_one_that_works() {
    let dir = TempDir::new("retry-dead-first");
    let db = Db::create(dir.join("routing.db"));
    let refusing: Vec<RefusingPort> = (0..3).map(|_| RefusingPort::new()).collect();
    for (n, port) in refusing.iter().enumerate() {
        db.upsert(&Row::new(
            &format!("dead{}", n + 1),
            "web",
            "sa",
            port.port(),
        ));
    }
    let good = TagBackend::start("good");
    db.upsert(&Row::new("good", "web", "sa", good.port()));
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            "[limits]
connect_attempts = 3
",
        ),
    );
    let addr = proxy.addr();
    let client = |n: u8| greeting_from(addr, Ipv4Addr::new(127, 0, 1, n));

    const CLIENTS: u8 = 10;
    let served: Vec<Option<String>> = (1..=CLIENTS).map(client).collect();
    // The first client spends its three attempts on the three dead ones
    // (nothing told the proxy they were dead); everyone after is served.
    first_lost_rest_good(&served, &proxy, "the first client finds out");

    // The backoffs (1 s) end together: each dead backend is probed again by
    // a client's first attempt, and that client's retry goes to `good`.
    std::thread::sleep(Duration::from_millis(1100));
    let served: Vec<Option<String>> = (CLIENTS + 1..=CLIENTS + 5).map(client).collect();
    assert!(
        served.iter().all(|s| s.as_deref() == Some("good")),
        "{served:?}\n{}",
        proxy.log_text()
    );
    assert_eq!(good.accepted(), usize::from(CLIENTS - 1) + 5);
}

/// The first line a client from `source` is sent after it said hello, or
/// `None` when the connection is closed first.
fn answer_to_hello(proxy: SocketAddr, source: Ipv4Addr) -> Option<String> {
    let mut stream = connect_from(proxy, source);
    stream.write_all(b"hello\n").ok()?;
    read_line(&stream)
}

/// QA's report: a backend that accepts connections and resets them before
/// sending a byte connected every time, so each connect cleared its
/// backoff: with health checks off (the default) it kept getting clients,
/// every one of them reset, and nothing was logged at the default level.
/// Now the first reset before a reply marks it failing (one WARN) and the
/// next clients go to the backend that works while it cools; the probe
/// after the backoff connects but does not clear it (no second WARN, no
/// "no longer failing"); a connection it serves does.
#[test]
fn a_backend_that_accepts_and_resets_goes_behind_the_one_that_works() {
    let dir = TempDir::new("retry-reset-unserved");
    let db = Db::create(dir.join("routing.db"));
    // Registered first: table order breaks the tie between idle backends,
    // so without the mark every client would be sent to it.
    let resets = ResettingBackend::start("resets");
    db.upsert(&Row::new("resets", "web", "sa", resets.port()));
    // Greets before it reads: its answer to hello is its name too.
    let good = TagBackend::start("good");
    db.upsert(&Row::new("good", "web", "sa", good.port()));
    let metrics = "[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n";
    let proxy = Proxy::with_config(&dir, &config(&db.path, metrics));
    let addr = proxy.addr();
    let mark = proxy.log_mark();
    let client = |n: u8| answer_to_hello(addr, Ipv4Addr::new(127, 0, 2, n));

    const CLIENTS: u8 = 8;
    let served: Vec<Option<String>> = (1..=CLIENTS).map(client).collect();
    first_lost_rest_good(&served, &proxy, "the first client finds out");
    assert_eq!(resets.accepted(), 1);
    let warned = "backend reset a connection before replying: marked failing";
    assert!(proxy.wait_for_log_count_after(mark, warned, 1, PATIENCE));

    // Past its backoff (1 s) the next client probes it: connected, reset
    // again. The connect must not have cleared the mark: the clients after
    // it go to `good`, and the WARN is not repeated.
    std::thread::sleep(Duration::from_millis(1100));
    let served: Vec<Option<String>> = (CLIENTS + 1..=CLIENTS + 4).map(client).collect();
    first_lost_rest_good(&served, &proxy, "the probe is reset");
    assert_eq!(resets.accepted(), 2);
    // Counted for the operator, per backend.
    let (status, body) = http_get(proxy.metrics_addr(), "/metrics");
    assert_eq!(status, 200);
    let counted = |id: &str| {
        let prefix = format!("edgeproxy_backend_resets_before_reply_total{{backend=\"{id}\"");
        body.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    assert_eq!(counted("resets").as_deref(), Some("2"), "{body}");
    assert_eq!(counted("good").as_deref(), Some("0"));
    log_barrier(&proxy);
    assert_eq!(proxy.log_lines_after(mark, warned).len(), 1);
    assert!(proxy.log_lines_after(mark, "no longer failing").is_empty());

    // It serves again; past its doubled backoff (2 s) the probe is served
    // and clears the mark.
    resets.serve();
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(client(CLIENTS + 5).as_deref(), Some("resets"));
    assert!(proxy.wait_for_log_count_after(
        mark,
        "backend served a connection: no longer failing",
        1,
        PATIENCE
    ));
}

/// QA: a connect that failed on the proxy's own side (no local port left,
/// no descriptor) was blamed on the backend: counted as its connect
/// failure, marked failing and reported to the circuit breaker, which
/// ejected a backend that was fine. Reproduced with one ephemeral port on
/// the proxy's host: the second client's connect fails with
/// EADDRNOTAVAIL.
#[test]
fn a_connect_that_fails_for_want_of_a_local_port_is_not_the_backends_fault() {
    use common::netns::Net;
    let net = Net::new(2);
    // Fixed ports for the proxy's listeners (the namespace is its own): a
    // port 0 would take the one ephemeral port.
    net.one_ephemeral_port(0);
    let backend_ip = net.ip(1);
    let backend = net.tag_backend(1, "a");
    let dir = TempDir::new("retry-local-port");
    let db = Db::create(dir.join("routing.db"));
    let mut row = Row::new("a", "web", "sa", backend.port());
    row.ip = backend_ip.to_string();
    db.upsert(&row);
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db.path,
            &format!(
                "[circuit_breaker]\nenabled = true\nfailure_threshold = 1\ntimeout_ms = 60000\n\n\
                 [metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:9090\"\n\n\
                 [[listener]]\nname = \"main\"\naddr = \"{}:8080\"\n",
                net.ip(0)
            ),
        ),
    )
    .unwrap();
    let proxy =
        Proxy::spawn_in_netns(&net.hosts[0].ns, &["--config", path.to_str().unwrap()], &[]).ready();
    let metrics = proxy.logged_addr("metrics listening", "addr");
    let addr = proxy.addr();
    let client = move || {
        let s = TcpStream::connect_timeout(&addr, PATIENCE).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s
    };
    // The first client's backend connection takes the only local port.
    let first = net.run_in(1, client);
    assert_eq!(
        read_line(&first).as_deref(),
        Some("a"),
        "log:\n{}",
        proxy.log_text()
    );
    // The second one's connect to the same backend finds none.
    let second = net.run_in(1, client);
    assert_eq!(read_line(&second), None, "served without a local port?");
    let text = net.run_in(0, move || http_get(metrics, "/metrics").1);
    assert_eq!(
        sample(&text, "edgeproxy_passive_events_sent_total"),
        Some(0.0),
        "the backend was reported to the circuit breaker"
    );
    assert_eq!(
        sample(
            &text,
            "edgeproxy_backend_connect_failures_total{backend=\"a\",app=\"web\"}"
        ),
        Some(0.0)
    );
    // The client sees the close before the line reaches the log file: wait
    // for it.
    assert!(
        proxy
            .wait_for_log("Cannot assign requested address", PATIENCE)
            .is_some(),
        "the local failure is logged: {}",
        proxy.log_text()
    );
    let log = proxy.log_text();
    assert!(!log.contains("marked failing"), "{log}");
    drop(first);
}
