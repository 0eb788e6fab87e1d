//! Health checks, the circuit breaker and per-client rate limits through the
//! real binary: real backends on loopback, real checks, real clients.
//!
//! Timing is read from the proxy's own log lines (each transition is logged
//! once); the figures printed here (`--nocapture`) are what README's goals
//! quote. No test asserts speed beyond "faster than the mechanism it must
//! beat" (e.g. a confirming check must come well before the next interval).

mod common;
mod health_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use health_support::*;

const METRICS: &str = "[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n";

fn metrics_addr(proxy: &Proxy) -> SocketAddr {
    let line = proxy
        .wait_for_log("metrics listening", PATIENCE)
        .expect("metrics listener");
    field(&line, "addr").unwrap().parse().unwrap()
}

/// Waits for the transition log line `needle` about `backend` after `mark`.
fn wait_event(proxy: &Proxy, mark: usize, needle: &str, backend: &str) -> Option<String> {
    proxy.wait_for_log_where(
        mark,
        |l| l.contains(needle) && field(l, "backend").as_deref() == Some(backend),
        PATIENCE,
    )
}

/// A proxy over `rows` with `extra` TOML. Affinity is off: every test
/// client comes from 127.0.0.1, and a binding would hide where scoring and
/// health send a new connection.
fn proxy_over(tag: &str, rows: &[Row], extra: &str) -> (TempDir, Proxy) {
    proxy_with_shards(tag, rows, extra, 2)
}

fn proxy_with_shards(tag: &str, rows: &[Row], extra: &str, shards: u32) -> (TempDir, Proxy) {
    let dir = TempDir::new(tag);
    let db = Db::create(dir.join("routing.db"));
    for r in rows {
        db.upsert(r);
    }
    let text = config(&db.path, &format!("[affinity]\nttl_secs = 0\n{extra}"))
        .replace("shards = 2", &format!("shards = {shards}"));
    let proxy = Proxy::with_config(&dir, &text);
    (dir, proxy)
}

/// `a` preferred (weight) over `b`, both in app web.
fn preferred(a: u16, b: u16) -> Vec<Row> {
    let mut first = Row::new("a", "web", "sa", a);
    first.weight = 100;
    vec![first, Row::new("b", "web", "sa", b)]
}

#[test]
fn http_500_is_excluded_within_fall_checks_and_back_after_rise() {
    let a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    let (_dir, proxy) = proxy_over(
        "health-http",
        &preferred(a.port(), b.port()),
        "[health]\nenabled = true\ntype = \"http\"\npath = \"/health\"\ninterval_ms = 200\n\
         timeout_ms = 150\nhealthy_threshold = 2\nunhealthy_threshold = 3\n",
    );
    let addr = proxy.addr();
    assert_eq!(http_via(addr).as_deref(), Some("a"));

    let mark = proxy.log_mark();
    let checks_before = a.health_requests.load(std::sync::atomic::Ordering::SeqCst);
    let t0 = Instant::now();
    a.health_status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let line = wait_event(&proxy, mark, "health checks failed", "a")
        .unwrap_or_else(|| panic!("a taken out; proxy log:\n{}", proxy.log_text()));
    let took = t0.elapsed();
    let checks = a.health_requests.load(std::sync::atomic::Ordering::SeqCst) - checks_before;
    println!("http 500 → out of rotation after {took:?} and {checks} checks (fall 3 × 200 ms)");
    assert!(
        checks >= 3,
        "out after {checks} failed checks, threshold is 3"
    );
    assert!(line.contains("500"), "the reason names the status: {line}");

    // No client reaches "a" while it is out.
    let clients_before = a.client_requests.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(http_via(addr).as_deref(), Some("b"));
    }
    assert_eq!(
        a.client_requests.load(std::sync::atomic::Ordering::SeqCst),
        clients_before
    );

    let mark = proxy.log_mark();
    a.health_status
        .store(200, std::sync::atomic::Ordering::SeqCst);
    wait_event(&proxy, mark, "health checks pass again", "a")
        .unwrap_or_else(|| panic!("a back; proxy log:\n{}", proxy.log_text()));
    assert!(eventually(PATIENCE, || http_via(addr).as_deref() == Some("a")));
}

/// QA: a backend whose health URL answers with a redirect (301/302, e.g.
/// `/health` → `/health/`) was taken out: only 2xx passed by default.
/// HAProxy's `option httpchk` takes 2xx and 3xx; so does the default now,
/// and an `expected_status` set to 2xx still refuses a redirect.
#[test]
fn a_redirecting_health_url_passes_the_default_check_and_a_strict_range_refuses_it() {
    let a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    a.health_status
        .store(301, std::sync::atomic::Ordering::SeqCst);
    b.health_status
        .store(302, std::sync::atomic::Ordering::SeqCst);
    let (_dir, proxy) = proxy_over(
        "health-redirect",
        &[
            Row::new("a", "web", "sa", a.port()),
            Row::new("b", "strict", "sa", b.port()),
        ],
        "[health]\nenabled = true\ntype = \"http\"\ninterval_ms = 200\ntimeout_ms = 150\n\
         unhealthy_threshold = 2\n[health.apps.strict]\nexpected_status = \"200-299\"\n",
    );
    let line = wait_event(&proxy, 0, "health checks failed", "b")
        .unwrap_or_else(|| panic!("b out under 200-299; proxy log:\n{}", proxy.log_text()));
    assert!(line.contains("302"), "the reason names the status: {line}");
    // Well past the fall threshold: "a" answered every check with a 301.
    let checks = |n| a.health_requests.load(std::sync::atomic::Ordering::SeqCst) >= n;
    assert!(eventually(PATIENCE, || checks(6)), "a is not checked");
    assert!(
        proxy
            .wait_for_log_where(
                0,
                |l| l.contains("health checks failed")
                    && field(l, "backend").as_deref() == Some("a"),
                Duration::ZERO,
            )
            .is_none(),
        "a redirect took a out; proxy log:\n{}",
        proxy.log_text()
    );
    assert_eq!(http_via(proxy.addr()).as_deref(), Some("a"));
}

#[test]
fn a_flapping_backend_does_not_churn_the_snapshot() {
    let a = HttpBackend::start("a");
    a.flap.store(true, std::sync::atomic::Ordering::SeqCst);
    let (_dir, proxy) = proxy_over(
        "health-flap",
        &[Row::new("a", "web", "sa", a.port())],
        &format!(
            "[health]\nenabled = true\ntype = \"http\"\ninterval_ms = 250\ntimeout_ms = 250\n\
             healthy_threshold = 2\nunhealthy_threshold = 4\n{METRICS}"
        ),
    );
    let m = metrics_addr(&proxy);
    let version = metric(m, "edgeproxy_routing_snapshot_version", &[]).unwrap();
    let checks = |n: f64| metric(m, "edgeproxy_health_checks_total", &[]).unwrap() >= n;
    // Alternating answers never make 4 failures in a row (a check timing out
    // on a loaded machine would need three more to matter).
    assert!(eventually(PATIENCE, || checks(16.0)), "checks do not run");
    let failures = metric(m, "edgeproxy_health_check_failures_total", &[]).unwrap();
    assert!(
        failures >= 6.0,
        "the backend does flap ({failures} failures)"
    );
    assert_eq!(
        metric(m, "edgeproxy_routing_snapshot_version", &[]).unwrap(),
        version,
        "no snapshot published while the backend flaps"
    );
    assert!(proxy
        .wait_for_log("health checks failed", Duration::ZERO)
        .is_none());
}

#[test]
fn a_failing_script_takes_the_backend_out_and_a_hanging_one_is_killed() {
    let a = TagBackend::start("a");
    let b = TagBackend::start("b");
    let dir = TempDir::new("health-script-flags");
    let flag = dir.join("a-ok");
    std::fs::write(&flag, "").unwrap();
    let pids = dir.join("pids");
    // Healthy while the flag file exists; the backend's port must be in the
    // script's environment. For "b" it hangs (and records its pid).
    let command = format!(
        "echo $$ >> {pids}; if [ \"$EDGEPROXY_BACKEND_ID\" = b ]; then exec sleep 30; fi; \
         [ \"$EDGEPROXY_BACKEND_PORT\" = {port} ] && test -f {flag}",
        pids = pids.display(),
        port = a.port(),
        flag = flag.display()
    );
    let (_d, proxy) = proxy_over(
        "health-script",
        &preferred(a.port(), b.port()),
        &format!(
            "[health]\nenabled = true\ntype = \"script\"\ncommand = {command:?}\n\
             interval_ms = 300\ntimeout_ms = 250\nunhealthy_threshold = 2\n"
        ),
    );
    // "b" hangs: killed at the timeout, down after two of them.
    let line = wait_event(&proxy, 0, "health checks failed", "b")
        .unwrap_or_else(|| panic!("hanging b out; proxy log:\n{}", proxy.log_text()));
    assert!(line.contains("timed out"), "{line}");
    assert_eq!(which_backend(proxy.addr()), "a");
    let mark = proxy.log_mark();
    std::fs::remove_file(&flag).unwrap();
    let line = wait_event(&proxy, mark, "health checks failed", "a")
        .unwrap_or_else(|| panic!("a out; proxy log:\n{}", proxy.log_text()));
    assert!(line.contains("exited with 1"), "{line}");
    // Every hanging script was killed: none of the recorded shells is left.
    let recorded = std::fs::read_to_string(&pids).unwrap();
    let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(
        eventually(PATIENCE, || {
            let n = recorded.lines().filter(|p| alive(p.trim())).count();
            // The check running right now may still be alive; never more.
            n <= 1
        }),
        "hanging scripts survive their timeout"
    );
}

#[test]
fn a_black_holed_backend_is_detected_by_the_check_timeout() {
    let hole = Blackhole::start();
    let live = TagBackend::start("live");
    let (_dir, proxy) = proxy_over(
        "health-blackhole",
        &preferred(hole.addr.port(), live.port()),
        "[health]\nenabled = true\ninterval_ms = 300\ntimeout_ms = 200\nunhealthy_threshold = 2\n",
    );
    let line = wait_event(&proxy, 0, "health checks failed", "a")
        .unwrap_or_else(|| panic!("hole out; proxy log:\n{}", proxy.log_text()));
    assert!(line.contains("timed out after 200 ms"), "{line}");
    // Out: clients go straight to the live one, no connect timeout paid.
    let t = Instant::now();
    assert_eq!(which_backend(proxy.addr()), "live");
    println!(
        "client after black-hole detection served in {:?}",
        t.elapsed()
    );
}

/// A check in flight when the proxy is stopped (SIGSTOP: a debugger, like a
/// VM paused to be migrated), answered meanwhile, with its timeout due while
/// nothing ran: not the backend's failure. On resume the timer and the
/// answer are both there, and the check failed "timed out" when its timer
/// was served first; with `unhealthy_threshold = 1` that took the backend
/// out.
#[test]
fn a_check_whose_timeout_came_due_while_the_proxy_was_stopped_is_not_a_failure() {
    use std::io::Write;
    use std::sync::mpsc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Each check read is told to the test; the first one's answer waits
    // for the test's word, the others go at once.
    let (read_tx, checks_read) = mpsc::channel::<()>();
    let (answer, answer_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let _ = read_head(&mut conn);
            let _ = read_tx.send(());
            if n == 0 {
                let _ = answer_rx.recv();
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let (_dir, proxy) = proxy_over(
        "health-stopped",
        &[Row::new("held", "web", "sa", port)],
        "[health]\nenabled = true\ntype = \"http\"\ninterval_ms = 300\ntimeout_ms = 200\n\
         unhealthy_threshold = 1\n",
    );
    checks_read
        .recv_timeout(PATIENCE)
        .expect("the first check never came");
    let mark = proxy.log_mark();
    proxy.signal(libc::SIGSTOP);
    answer.send(()).unwrap();
    // The fault itself: stopped for three times the check's timeout.
    std::thread::sleep(Duration::from_millis(600));
    proxy.signal(libc::SIGCONT);
    // Two more checks read: the held one's outcome is in by then.
    for _ in 0..2 {
        checks_read
            .recv_timeout(PATIENCE)
            .expect("checks stopped after the resume");
    }
    let failed = proxy.log_lines_after(mark, "health checks failed");
    assert!(failed.is_empty(), "{failed:#?}");
}

/// QA: a check that timed out said only "timed out after 200 ms", alike
/// for a backend whose connects go unanswered (a full accept queue here; a
/// firewall dropping SYNs, a host gone) and one that accepts and never
/// answers the request (a hung service): the operator could not tell a
/// network fault from an application one. The reason says which step the
/// check was at.
#[test]
fn a_timed_out_check_says_whether_it_had_connected() {
    let hole = Blackhole::start();
    // Bound and listening, never accepted: the kernel completes connects,
    // nothing reads the request.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (_dir, proxy) = proxy_over(
        "health-timeout-step",
        &[
            Row::new("hole", "web", "sa", hole.addr.port()),
            Row::new("hung", "web", "sa", hung.local_addr().unwrap().port()),
        ],
        "[health]\nenabled = true\ntype = \"http\"\ninterval_ms = 300\ntimeout_ms = 200\n\
         unhealthy_threshold = 2\n",
    );
    let hole_line = wait_event(&proxy, 0, "health checks failed", "hole")
        .unwrap_or_else(|| panic!("hole out; proxy log:\n{}", proxy.log_text()));
    let hung_line = wait_event(&proxy, 0, "health checks failed", "hung")
        .unwrap_or_else(|| panic!("hung out; proxy log:\n{}", proxy.log_text()));
    assert!(
        hole_line.contains("timed out after 200 ms connecting"),
        "{hole_line}"
    );
    assert!(
        hung_line.contains("timed out after 200 ms waiting for the HTTP answer (connected)"),
        "{hung_line}"
    );
}

/// QA: a failed check's reason dropped the cause under the library's
/// words: an HTTP backend resetting the connection after the request read
/// "http: connection error", a gRPC backend refusing connects "grpc
/// connect: transport error". The reason carries the cause now.
#[test]
fn a_failed_checks_reason_carries_its_cause() {
    use std::io::Read;
    // Reads the request, then resets the connection (SO_LINGER 0).
    let resetting = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let rst_port = resetting.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in resetting.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
        }
    });
    let refusing = RefusingPort::new();
    let (_dir, proxy) = proxy_over(
        "health-reason-cause",
        &[
            Row::new("rst", "web", "sa", rst_port),
            Row::new("g", "api", "sa", refusing.port()),
        ],
        "[health.apps.web]\nenabled = true\ntype = \"http\"\ninterval_ms = 300\n\
         timeout_ms = 1000\nunhealthy_threshold = 2\n\
         [health.apps.api]\nenabled = true\ntype = \"grpc\"\ninterval_ms = 300\n\
         timeout_ms = 1000\nunhealthy_threshold = 2\n",
    );
    let rst_line = wait_event(&proxy, 0, "health checks failed", "rst")
        .unwrap_or_else(|| panic!("rst out; proxy log:\n{}", proxy.log_text()));
    let g_line = wait_event(&proxy, 0, "health checks failed", "g")
        .unwrap_or_else(|| panic!("g out; proxy log:\n{}", proxy.log_text()));
    assert!(rst_line.contains("reset by peer"), "{rst_line}");
    assert!(g_line.contains("refused"), "{g_line}");
}

#[test]
fn a_dead_backend_is_out_one_confirming_check_after_the_first_failed_connect() {
    let mut a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    let (_dir, proxy) = proxy_over(
        "health-passive",
        &preferred(a.port(), b.port()),
        // A long interval: only the confirming check can be this fast.
        &format!(
            "[health]\nenabled = true\ninterval_ms = 60000\ntimeout_ms = 1000\n\
             unhealthy_threshold = 3\n{METRICS}"
        ),
    );
    let m = metrics_addr(&proxy);
    assert_eq!(http_via(proxy.addr()).as_deref(), Some("a"));
    a.stop();
    let mark = proxy.log_mark();
    let t0 = Instant::now();
    // The first client fails over to "b" (retry) and reports "a".
    assert_eq!(http_via(proxy.addr()).as_deref(), Some("b"));
    wait_event(&proxy, mark, "health checks failed", "a")
        .unwrap_or_else(|| panic!("a out; proxy log:\n{}", proxy.log_text()));
    let took = t0.elapsed();
    println!("dead backend out of rotation {took:?} after the first failed client connect");
    assert!(
        took < Duration::from_secs(30),
        "not the confirming check: {took:?}"
    );
    let failures = |m| {
        metric(
            m,
            "edgeproxy_backend_connect_failures_total",
            &[("backend", "a")],
        )
        .unwrap()
    };
    let before = failures(m);
    for _ in 0..30 {
        assert_eq!(http_via(proxy.addr()).as_deref(), Some("b"));
    }
    assert_eq!(
        failures(m),
        before,
        "a client connection was attempted on a"
    );
}

#[test]
fn circuit_opens_half_opens_and_closes_with_real_failures() {
    let mut a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    let (_dir, proxy) = proxy_over(
        "health-circuit",
        &preferred(a.port(), b.port()),
        &format!(
            "[circuit_breaker]\nenabled = true\nfailure_threshold = 2\nsuccess_threshold = 2\n\
             timeout_ms = 1000\n{METRICS}"
        ),
    );
    let m = metrics_addr(&proxy);
    let addr = proxy.addr();
    stop_until_its_circuit_opens(&proxy, &mut a);
    let failures = |m| {
        metric(
            m,
            "edgeproxy_backend_connect_failures_total",
            &[("backend", "a")],
        )
        .unwrap()
    };
    let while_open = failures(m);
    a.restart();
    // Ejected: clients are not sent to "a" even though it is back, until the
    // ejection ends.
    let half = proxy.log_mark();
    let mut served_by_b_while_open = 0;
    while !wait_event_now(&proxy, half, "circuit half-open", "a") {
        match http_via(addr).as_deref() {
            Some("b") => served_by_b_while_open += 1,
            // The half-open snapshot is published before it is logged: a
            // client may reach "a" just before the line. Then the line must
            // follow.
            Some("a") => {
                assert!(
                    wait_event(&proxy, half, "circuit half-open", "a").is_some(),
                    "a served while ejected; proxy log:\n{}",
                    proxy.log_text()
                );
                break;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(failures(m), while_open);
    // "a" is preferred and up again: only the ejection sends clients to "b".
    assert!(served_by_b_while_open > 0, "a was never ejected");
    println!("{served_by_b_while_open} clients served by b while a was ejected");
    let close = proxy.log_mark();
    // Half-open: probes reach "a" and succeed; two close the circuit.
    assert!(eventually(PATIENCE, || {
        let _ = http_via(addr);
        wait_event_now(&proxy, close, "circuit closed", "a")
    }));
    assert_eq!(
        metric(m, "edgeproxy_backend_circuit_state", &[("backend", "a")]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            m,
            "edgeproxy_health_transitions_total",
            &[("event", "circuit_open")]
        ),
        Some(1.0)
    );
}

/// QA: a half-open circuit closed on a hung backend (it accepts and never
/// answers): the probe connections, ended by the idle timeout without a
/// byte or a reset from it, counted as successes. They now prove nothing,
/// and the circuit stays half-open.
#[test]
fn a_hung_backend_does_not_close_its_half_open_circuit() {
    let mut a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    let (_dir, proxy) = proxy_over(
        "health-circuit-hung",
        &preferred(a.port(), b.port()),
        &format!(
            "[circuit_breaker]\nenabled = true\nfailure_threshold = 2\nsuccess_threshold = 2\n\
             timeout_ms = 500\n[limits]\nidle_timeout_secs = 1\n{METRICS}"
        ),
    );
    let m = metrics_addr(&proxy);
    let addr = proxy.addr();
    let mark = proxy.log_mark();
    stop_until_its_circuit_opens(&proxy, &mut a);
    // Back, hung: the kernel accepts for it, nothing ever answers.
    let _hung = std::net::TcpListener::bind(("127.0.0.1", a.port())).unwrap();
    assert!(
        wait_event(&proxy, mark, "circuit half-open", "a").is_some(),
        "{}",
        proxy.log_text()
    );
    let half = proxy.log_mark();
    let mut hung_clients = 0;
    let deadline = Instant::now() + PATIENCE;
    while hung_clients < 4 && Instant::now() < deadline {
        // A probe sent to "a" ends by the idle timeout, unanswered.
        if http_via(addr).is_none() {
            hung_clients += 1;
        }
    }
    assert_eq!(hung_clients, 4, "{}", proxy.log_text());
    assert!(
        !wait_event_now(&proxy, half, "circuit closed", "a"),
        "a hung backend closed its circuit; log:\n{}",
        proxy.log_text()
    );
    assert_ne!(
        metric(m, "edgeproxy_backend_circuit_state", &[("backend", "a")]),
        Some(0.0),
        "closed"
    );
}

/// QA: a connection opened before its backend was ejected, that ended
/// while the circuit was half-open, counted as a probe's success: one long
/// request closed the circuit of a backend nobody had probed. Only
/// connections opened once the circuit is half-open decide it now.
#[test]
fn a_connection_older_than_the_ejection_does_not_decide_the_half_open_circuit() {
    use std::io::{Read, Write};
    let mut a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    let (_dir, proxy) = proxy_over(
        "health-circuit-old-conn",
        &preferred(a.port(), b.port()),
        &format!(
            "[circuit_breaker]\nenabled = true\nfailure_threshold = 2\nsuccess_threshold = 1\n\
             timeout_ms = 500\n{METRICS}"
        ),
    );
    let m = metrics_addr(&proxy);
    // Opened to "a" while it serves; its request is not finished yet.
    let mut old = std::net::TcpStream::connect(proxy.addr()).unwrap();
    old.set_read_timeout(Some(PATIENCE)).unwrap();
    old.write_all(b"GET /old HTTP/1.1\r\n").unwrap();
    assert!(eventually(PATIENCE, || metric(
        m,
        "edgeproxy_connections_active",
        &[]
    ) == Some(1.0)));
    // One held on "b" too, so that "a" stays the first choice of new
    // clients (scoring counts open connections).
    let mut on_b = std::net::TcpStream::connect(proxy.addr()).unwrap();
    on_b.write_all(b"GET /held HTTP/1.1\r\n").unwrap();
    assert!(eventually(PATIENCE, || metric(
        m,
        "edgeproxy_connections_active",
        &[]
    ) == Some(2.0)));
    let mark = proxy.log_mark();
    stop_until_its_circuit_opens(&proxy, &mut a);
    assert!(
        wait_event(&proxy, mark, "circuit half-open", "a").is_some(),
        "{}",
        proxy.log_text()
    );
    let half = proxy.log_mark();
    // The old connection ends now, served by "a", while no new one has
    // probed it.
    old.write_all(b"Host: x\r\n\r\n").unwrap();
    let mut all = String::new();
    let _ = old.read_to_string(&mut all);
    assert!(all.ends_with("a\n"), "served by a: {all:?}");
    drop(old);
    assert!(eventually(PATIENCE, || metric(
        m,
        "edgeproxy_connections_active",
        &[]
    ) == Some(1.0)));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !wait_event_now(&proxy, half, "circuit closed", "a"),
        "a connection from before the ejection closed the circuit; log:\n{}",
        proxy.log_text()
    );
    assert_eq!(
        metric(m, "edgeproxy_backend_circuit_state", &[("backend", "a")]),
        Some(1.0),
        "half-open"
    );
}

/// Backend "a" (preferred over "b") serves, is stopped, and is driven by
/// clients until its circuit opens.
fn stop_until_its_circuit_opens(proxy: &Proxy, a: &mut HttpBackend) {
    let addr = proxy.addr();
    assert_eq!(http_via(addr).as_deref(), Some("a"));
    a.stop();
    let mark = proxy.log_mark();
    // The first client finds "a" dead and is served by "b"; then "a" cools
    // (engine/src/backoff.rs) and only the client that probes it after the
    // backoff makes the second failure in a row.
    assert!(
        eventually(PATIENCE, || {
            assert_eq!(http_via(addr).as_deref(), Some("b"));
            wait_event_now(proxy, mark, "circuit open", "a")
        }),
        "circuit opens; proxy log:\n{}",
        proxy.log_text()
    );
}

fn wait_event_now(proxy: &Proxy, mark: usize, needle: &str, backend: &str) -> bool {
    proxy
        .wait_for_log_where(
            mark,
            |l| l.contains(needle) && field(l, "backend").as_deref() == Some(backend),
            Duration::from_millis(50),
        )
        .is_some()
}

#[test]
fn the_ejection_cap_keeps_part_of_the_pool_in_rotation() {
    // Four backends that refuse connections and one that works, in one app:
    // at 50 % at most two may be ejected.
    let refusing: Vec<RefusingPort> = (0..4).map(|_| RefusingPort::new()).collect();
    let dead: Vec<u16> = refusing.iter().map(RefusingPort::port).collect();
    let live = HttpBackend::start("live");
    let mut rows: Vec<Row> = dead
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let mut r = Row::new(&format!("d{i}"), "web", "sa", p);
            r.weight = 100;
            r
        })
        .collect();
    rows.push(Row::new("live", "web", "sa", live.port()));
    let (_dir, proxy) = proxy_over(
        "health-cap",
        &rows,
        &format!(
            "[limits]\nconnect_attempts = 5\n[circuit_breaker]\nenabled = true\n\
             failure_threshold = 1\ntimeout_ms = 60000\nmax_ejection_percent = 50\n{METRICS}"
        ),
    );
    let m = metrics_addr(&proxy);
    for _ in 0..10 {
        assert_eq!(http_via(proxy.addr()).as_deref(), Some("live"));
    }
    let capped = |n: f64| {
        metric(
            m,
            "edgeproxy_health_transitions_total",
            &[("event", "ejection_capped")],
        )
        .is_some_and(|v| v >= n)
    };
    assert!(
        eventually(PATIENCE, || capped(2.0)),
        "the cap never held anyone back"
    );
    assert_eq!(
        metric(
            m,
            "edgeproxy_health_transitions_total",
            &[("event", "circuit_open")]
        ),
        Some(2.0)
    );
    let ejected = (0..4)
        .filter(|i| {
            metric(
                m,
                "edgeproxy_backend_circuit_state",
                &[("backend", &format!("d{i}"))],
            ) == Some(2.0)
        })
        .count();
    assert_eq!(ejected, 2);
}

/// The refusals are in the log too, summed per listener once per summary
/// interval (QA: `wrk` from one client had 265,000 connections refused in
/// 10 s and the log said nothing; only a counter moved).
#[test]
fn rate_limit_refuses_the_excess_of_one_client_while_another_is_unaffected() {
    let a = TagBackend::start("a");
    // One shard: PROXY-protocol listeners are not steered by client, so
    // with more shards each would apply the limit on its own.
    let (_dir, proxy) = proxy_with_shards(
        "health-rate",
        &[Row::new("a", "web", "sa", a.port())],
        &format!(
            "[log]\nsummary_interval_secs = 1\n\
             [rate_limit]\nenabled = true\nmax_requests = 1\n\
             window_ms = 3600000\nburst = 3\n{METRICS}\n[[listener]]\nname = \"lb\"\n\
             addr = \"127.0.0.1:0\"\naccept_proxy_protocol = true\n"
        ),
        1,
    );
    let m = metrics_addr(&proxy);
    let addr = proxy.listener("lb");
    let via = |ip: &str| connect_with(addr, &proxy_v1(client_at(ip), addr)).0;
    let served: Vec<bool> = (0..6).map(|_| via("198.51.100.7").is_some()).collect();
    assert_eq!(served, [true, true, true, false, false, false]);
    for _ in 0..3 {
        assert_eq!(
            via("198.51.100.8").as_deref(),
            Some("a"),
            "another client is limited"
        );
    }
    assert_eq!(
        metric(m, "edgeproxy_client_rate_limited_total", &[]),
        Some(3.0)
    );
    let line = proxy
        .wait_for_log_where(
            0,
            |l| {
                l.contains("connections refused by the per-client limits")
                    && field(l, "listener").as_deref() == Some("lb")
            },
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("refusals logged; proxy log:\n{}", proxy.log_text()));
    assert_eq!(field(&line, "refused").as_deref(), Some("3"), "{line}");
}

/// Which clients were refused: one from 127.0.0.2 over the limit, one from
/// 127.0.0.3 under it, each from its own source address (no PROXY header;
/// two shards, steered by client). Every summary line names 127.0.0.2 with
/// the count it refused and never 127.0.0.3. QA: the line said how many
/// were refused, not whose, so one abusive client and a wide flood read
/// the same.
#[test]
fn the_rate_limit_summary_names_the_client_over_the_limit_and_not_the_other() {
    let a = TagBackend::start("a");
    let (_dir, proxy) = proxy_with_shards(
        "health-rate-who",
        &[Row::new("a", "web", "sa", a.port())],
        "[log]\nsummary_interval_secs = 1\n\
         [rate_limit]\nenabled = true\nmax_requests = 1\n\
         window_ms = 3600000\nburst = 2\n",
        2,
    );
    let addr = proxy.addr();
    let served_from = |source: [u8; 4], tries: usize| {
        (0..tries)
            .filter(|_| read_line(&connect_from(addr, source.into())).is_some())
            .count()
    };
    let abuser_served = served_from([127, 0, 0, 2], 12);
    assert_eq!(
        served_from([127, 0, 0, 3], 2),
        2,
        "the other client is limited"
    );
    let refused = 12 - abuser_served as u64;
    assert!(refused >= 8, "served {abuser_served} of 12 at burst 2");
    let lines = || proxy.log_lines_after(0, "connections refused by the per-client limits");
    let logged = |lines: &[String]| -> u64 {
        lines
            .iter()
            .filter_map(|l| field(l, "refused")?.parse::<u64>().ok())
            .sum()
    };
    assert!(
        eventually(PATIENCE, || logged(&lines()) == refused),
        "{refused} refusals not summed up; proxy log:\n{}",
        proxy.log_text()
    );
    for line in lines() {
        eprintln!("summary: {line}");
        let count = field(&line, "refused").unwrap();
        let top = line
            .split_once("top_clients=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(top, _)| top.to_string())
            .unwrap_or_else(|| panic!("no top_clients in {line}"));
        assert_eq!(top, format!("127.0.0.2: {count}"), "{line}");
        assert_eq!(field(&line, "clients").as_deref(), Some("1"), "{line}");
        assert!(!line.contains("127.0.0.3"), "{line}");
    }
}

/// A connection to `proxy` from `source` (a loopback address of its own),
/// with the tests' read timeout.
fn connect_from(proxy: SocketAddr, source: std::net::Ipv4Addr) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("TCP socket");
    socket
        .bind(&SocketAddr::from((source, 0)).into())
        .expect("bind the client's source address");
    socket
        .connect_timeout(&proxy.into(), PATIENCE)
        .expect("connect to the proxy");
    let stream = std::net::TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

#[test]
fn concurrent_cap_per_client_holds_while_connections_are_open() {
    let a = TagBackend::start("a");
    let (_dir, proxy) = proxy_with_shards(
        "health-conncap",
        &[Row::new("a", "web", "sa", a.port())],
        &format!(
            "[rate_limit]\nmax_connections_per_client = 2\n{METRICS}\n[[listener]]\n\
             name = \"lb\"\naddr = \"127.0.0.1:0\"\naccept_proxy_protocol = true\n"
        ),
        1,
    );
    let m = metrics_addr(&proxy);
    let addr = proxy.listener("lb");
    let via = |ip: &str| connect_with(addr, &proxy_v1(client_at(ip), addr));
    let (first, _held1) = via("198.51.100.7");
    let (second, _held2) = via("198.51.100.7");
    assert_eq!(
        (first.as_deref(), second.as_deref()),
        (Some("a"), Some("a"))
    );
    assert_eq!(via("198.51.100.7").0, None, "a third open connection");
    assert_eq!(via("198.51.100.9").0.as_deref(), Some("a"));
    assert_eq!(
        metric(m, "edgeproxy_client_connection_limited_total", &[]),
        Some(1.0)
    );
    drop(_held1);
    assert!(eventually(PATIENCE, || via("198.51.100.7").0.is_some()));
}

/// POSTs `body` to the discovery API at `api` (no token: loopback only).
fn post_json(api: SocketAddr, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .build(),
    );
    let mut resp = agent
        .post(format!("http://{api}{path}"))
        .content_type("application/json")
        .send(body.to_string())
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

fn get_json(api: SocketAddr, path: &str) -> serde_json::Value {
    let mut resp = ureq::get(format!("http://{api}{path}")).call().unwrap();
    serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap()
}

#[test]
fn a_backend_registers_with_its_own_check_and_the_api_shows_its_health() {
    let a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    // Checks are off globally; only the backend's own settings turn them on.
    let (_dir, proxy) = proxy_over(
        "health-api",
        &[],
        "[api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n",
    );
    let line = proxy.wait_for_log("api listening", PATIENCE).unwrap();
    let api: SocketAddr = field(&line, "addr").unwrap().parse().unwrap();
    let register = |id: &str, port: u16, weight: i64, check: serde_json::Value| {
        let body = serde_json::json!({"id": id, "app": "web", "region": "sa", "ip": "127.0.0.1",
            "port": port, "weight": weight, "health_check": check});
        post_json(api, "/api/v1/register", &body)
    };
    // Bad settings are refused, naming the field.
    let (status, reply) = register("a", a.port(), 100, serde_json::json!({"type": "icmp"}));
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().starts_with("health_check"),
        "{reply}"
    );
    let check = serde_json::json!({"type": "http", "path": "/health", "interval_ms": 200,
        "timeout_ms": 150, "unhealthy_threshold": 2, "healthy_threshold": 1});
    assert_eq!(register("a", a.port(), 100, check).0, 201);
    assert_eq!(register("b", b.port(), 1, serde_json::Value::Null).0, 201);
    assert!(eventually(PATIENCE, || http_via(proxy.addr()).as_deref() == Some("a")));
    // A check passed: its RTT is shown.
    assert!(eventually(PATIENCE, || get_json(api, "/api/v1/backends/a")
        ["health"]["rtt_ms"]
        .as_f64()
        .is_some_and(|ms| ms > 0.0)));

    let mark = proxy.log_mark();
    a.health_status
        .store(503, std::sync::atomic::Ordering::SeqCst);
    wait_event(&proxy, mark, "health checks failed", "a")
        .unwrap_or_else(|| panic!("a out; proxy log:\n{}", proxy.log_text()));
    assert_eq!(http_via(proxy.addr()).as_deref(), Some("b"));
    let a_now = get_json(api, "/api/v1/backends/a");
    assert_eq!(a_now["state"], "unhealthy", "out of rotation here: {a_now}");
    let h = &a_now["health"];
    assert_eq!(h["state"], "down", "{h}");
    assert_eq!(h["checks"], "http");
    assert_eq!(h["circuit"], "closed");
    assert!(h["consecutive_failures"].as_u64().unwrap() >= 2, "{h}");
    assert_eq!(h["last_check"]["ok"], false);
    assert!(
        h["last_check"]["error"].as_str().unwrap().contains("503"),
        "{h}"
    );
    assert!(
        h["rtt_ms"].as_f64().unwrap() > 0.0,
        "the last RTT average stays: {h}"
    );
    // The operator's flag in routing.db is untouched: health is local.
    let conn = rusqlite::Connection::open(_dir.join("routing.db")).unwrap();
    let healthy: i64 = conn
        .query_row("SELECT healthy FROM backends WHERE id = 'a'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(healthy, 1);
    // "b" has no check of its own and none from its app.
    let hb = &get_json(api, "/api/v1/backends/b")["health"];
    assert_eq!(hb["checks"], serde_json::Value::Null, "{hb}");
    assert_eq!(hb["state"], "up");

    // The CLI shows the same.
    let (status, out, err) = run_to_end(
        &["backends", "list", "--api", &format!("http://{api}")],
        &[],
    );
    assert!(status.success(), "{err}");
    let row = out.lines().find(|l| l.starts_with("a ")).unwrap();
    assert!(row.contains("down") && row.contains("closed"), "{out}");
    assert!(
        row.contains("unhealthy") && !row.contains("serving"),
        "{out}"
    );
    assert!(out.lines().next().unwrap().contains("HEALTH"), "{out}");
}

const API: &str = "[api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n";

fn api_addr(proxy: &Proxy) -> SocketAddr {
    let line = proxy.wait_for_log("api listening", PATIENCE).unwrap();
    field(&line, "addr").unwrap().parse().unwrap()
}

/// QA: a backend's own check could name a command, which every POP ran as
/// the proxy's user: whoever could register a backend ran commands on the
/// host. Only with `[health] allow_backend_commands`: otherwise the API
/// refuses it, and a row that carries one anyway (written by hand, or
/// replicated from a POP that allows it) is checked with its app's check.
#[test]
fn a_backends_own_check_runs_a_command_only_if_the_operator_allows_it() {
    let a = TagBackend::start("a");
    let dir = TempDir::new("health-command-marker");
    let marker = dir.join("ran");
    let check = serde_json::json!({"type": "script", "interval_ms": 100, "timeout_ms": 100,
        "command": format!("touch {}", marker.display())});
    let body = |id: &str, check: &serde_json::Value| {
        serde_json::json!({"id": id, "app": "web", "region": "sa", "ip": "127.0.0.1",
            "port": a.port(), "health_check": check})
    };
    let (db_dir, proxy) = proxy_over(
        "health-command-off",
        &[],
        &format!("[health]\nenabled = true\ninterval_ms = 100\ntimeout_ms = 100\n{API}{METRICS}"),
    );
    let api = api_addr(&proxy);
    let m = metrics_addr(&proxy);
    let (status, reply) = post_json(api, "/api/v1/register", &body("a", &check));
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["field"], "health_check.command", "{reply}");
    // Written into routing.db another way: said once, and the app's check
    // (tcp) runs instead of the command.
    assert_eq!(
        post_json(
            api,
            "/api/v1/register",
            &body("a", &serde_json::Value::Null)
        )
        .0,
        201
    );
    let mark = proxy.log_mark();
    rusqlite::Connection::open(db_dir.join("routing.db"))
        .unwrap()
        .execute(
            "UPDATE backends SET health_check = ?1 WHERE id = 'a'",
            [check.to_string()],
        )
        .unwrap();
    proxy
        .wait_for_log_where(mark, |l| l.contains("it names a command"), PATIENCE)
        .unwrap_or_else(|| panic!("no warning; proxy log:\n{}", proxy.log_text()));
    let checks = metric(m, "edgeproxy_health_checks_total", &[]).unwrap();
    assert!(eventually(PATIENCE, || metric(
        m,
        "edgeproxy_health_checks_total",
        &[]
    )
    .unwrap()
        >= checks + 5.0));
    assert!(!marker.exists(), "the backend's command ran");
    assert_eq!(
        get_json(api, "/api/v1/backends/a")["health"]["checks"],
        "tcp"
    );
    drop(proxy);

    // Allowed by the operator: taken and run.
    let (_d, proxy) = proxy_over(
        "health-command-on",
        &[],
        &format!("[health]\nallow_backend_commands = true\n{API}"),
    );
    let api = api_addr(&proxy);
    let (status, reply) = post_json(api, "/api/v1/register", &body("a", &check));
    assert_eq!(status, 201, "{reply}");
    assert!(
        eventually(PATIENCE, || marker.exists()),
        "the allowed command did not run"
    );
}

#[test]
fn a_backend_that_resets_its_connections_is_ejected() {
    // Accepts, waits for the client's first bytes, then resets.
    let resetting = custom_backend(|mut s| {
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut s, &mut buf);
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    });
    let b = HttpBackend::start("b");
    let (_dir, proxy) = proxy_over(
        "health-reset",
        &preferred(resetting.port(), b.port()),
        "[circuit_breaker]\nenabled = true\nfailure_threshold = 1\ntimeout_ms = 60000\n",
    );
    let mark = proxy.log_mark();
    // Served by nobody: the backend reset the connection. One is enough:
    // the reset also puts `a` behind `b` for its backoff (see
    // tests/retry.rs), so a second client would not reach it now.
    assert_eq!(http_via(proxy.addr()), None);
    wait_event(&proxy, mark, "circuit open", "a")
        .unwrap_or_else(|| panic!("resets eject a; proxy log:\n{}", proxy.log_text()));
    assert_eq!(http_via(proxy.addr()).as_deref(), Some("b"));
}

/// QA: passive health blamed the backend for resets its clients caused. A
/// backend that greets and closes met a client that had sent something
/// (its close then resets: data it never read), and one that resets a
/// request whose client went away (as HAProxy's `abortonclose` does) met
/// clients that half-closed and left; both were ejected though they served
/// every client that stayed. Clients of every kind abort here, hundreds of
/// times; a reset is the backend's failure only while its client is still
/// there and before the backend sent a byte or closed.
#[test]
fn clients_that_abort_never_get_their_backend_ejected() {
    // Greets, then closes without reading (a "busy" or banner service).
    let greeter = custom_backend(|mut s| {
        let _ = std::io::Write::write_all(&mut s, b"220 greetings\r\n");
    });
    // Reads a request; if its client has gone (end of stream) before the
    // answer is ready, resets; else answers.
    let aborter = custom_backend(|mut s| {
        let mut buf = [0u8; 256];
        let _ = std::io::Read::read(&mut s, &mut buf);
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
            _ => {
                let _ = std::io::Write::write_all(
                    &mut s,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nz\n",
                );
            }
        }
    });
    let http = HttpBackend::start("a");
    for (name, port) in [
        ("http", http.port()),
        ("aborter", aborter.port()),
        ("greeter", greeter.port()),
    ] {
        let (_dir, proxy) = proxy_over(
            &format!("health-aborts-{name}"),
            &[Row::new("a", "web", "sa", port)],
            &format!(
                "[circuit_breaker]\nenabled = true\nfailure_threshold = 3\ntimeout_ms = 60000\n{METRICS}"
            ),
        );
        let m = metrics_addr(&proxy);
        let addr = proxy.addr();
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let abort = |s: &std::net::TcpStream| {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        };
        for i in 0..40 {
            use std::io::Write;
            let Ok(mut s) = std::net::TcpStream::connect(addr) else {
                continue;
            };
            // Eight of a kind in a row: failures must come in a row to eject.
            match (i / 8) % 5 {
                // Connects and resets at once.
                0 => abort(&s),
                // Sends a request and resets.
                1 => {
                    let _ = s.write_all(request);
                    abort(&s);
                }
                // Sends a request, waits a little, leaves without reading.
                2 => {
                    let _ = s.write_all(request);
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Sends a request and half-closes, then leaves.
                3 => {
                    let _ = s.write_all(request);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    std::thread::sleep(Duration::from_millis(20));
                    abort(&s);
                }
                // Sends a request in two parts, then half-closes.
                _ => {
                    let _ = s.write_all(&request[..10]);
                    std::thread::sleep(Duration::from_millis(20));
                    let _ = s.write_all(&request[10..]);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            drop(s);
        }
        // Every connection the proxy made has ended (the aborter waits
        // 300 ms for its client).
        assert!(
            eventually(PATIENCE, || metric(m, "edgeproxy_connections_active", &[])
                == Some(0.0)),
            "connections left open"
        );
        std::thread::sleep(Duration::from_millis(300));
        // Nor put behind for a backoff (engine/src/backoff.rs).
        assert!(
            proxy
                .wait_for_log("reset a connection before replying", Duration::ZERO)
                .is_none(),
            "{name}: marked failing by its clients' aborts; proxy log:\n{}",
            proxy.log_text()
        );
        assert!(
            proxy.wait_for_log("circuit open", Duration::ZERO).is_none(),
            "{name}: ejected by its clients' aborts; proxy log:\n{}",
            proxy.log_text()
        );
        assert_eq!(
            metric(m, "edgeproxy_backend_circuit_state", &[("backend", "a")]),
            Some(0.0),
            "{name}"
        );
    }
}

/// A receiver for the transition webhook: every request's body, in order.
fn webhook_receiver() -> (SocketAddr, std::sync::mpsc::Receiver<serde_json::Value>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
            if request_line.starts_with("POST /hooks/health ") {
                if let Ok(v) = serde_json::from_slice(&body) {
                    let _ = tx.send(v);
                }
            }
        }
    });
    (addr, rx)
}

#[test]
fn each_transition_is_posted_to_the_webhook() {
    let (hook, events) = webhook_receiver();
    let live = HttpBackend::start("live");
    // A backend that refuses connections: its first checks fail.
    let refusing = RefusingPort::new();
    let dead = refusing.port();
    let (_dir, _proxy) = proxy_over(
        "health-webhook",
        &preferred(dead, live.port()),
        &format!(
            "[health]\nenabled = true\ntype = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 150\n\
             healthy_threshold = 2\nunhealthy_threshold = 2\nwebhook_url = \"http://{hook}/hooks/health\"\n"
        ),
    );
    let event = events
        .recv_timeout(PATIENCE)
        .expect("no webhook POST for the dead backend");
    assert_eq!(event["backend"], "a", "{event}");
    assert_eq!(event["event"], "down", "{event}");
    assert_eq!(event["app"], "web", "{event}");
    assert!(event["at_unix_ms"].as_u64().is_some(), "{event}");
    // The live backend never transitions: no event names it.
    while let Ok(more) = events.recv_timeout(Duration::from_secs(2)) {
        assert_ne!(more["backend"], "b", "{more}");
    }
}

/// Active HTTP checks against a real web server: nginx serves each
/// backend's `/health` from a file and its `/` with the backend's name.
/// Removing the file (404) takes the backend out; putting it back brings
/// it back.
#[test]
fn nginx_backends_are_checked_over_http_and_a_404_takes_one_out() {
    let dir = TempDir::new("health-nginx");
    let (a, b) = (dead_port(), dead_port());
    let servers: String = [("a", a), ("b", b)]
        .iter()
        .map(|(name, port)| {
            let root = dir.join(name);
            std::fs::create_dir_all(&root).unwrap();
            std::fs::write(root.join("health"), "ok\n").unwrap();
            format!(
                "  server {{\n    listen 127.0.0.1:{port};\n    root {root};\n    \
                 location = /health {{ }}\n    location / {{ return 200 \"{name}\\n\"; }}\n  }}\n",
                root = root.display()
            )
        })
        .collect();
    // keepalive_timeout 0: the test client reads each answer to the close.
    let _nginx = common::daemons::nginx(
        &dir.join("nginx"),
        &[],
        &format!("http {{\n  access_log off;\n  keepalive_timeout 0;\n{servers}}}\n"),
        &[a, b],
    );
    let (_proxy_dir, proxy) = proxy_over(
        "health-nginx-proxy",
        &preferred(a, b),
        "[health]\nenabled = true\ntype = \"http\"\npath = \"/health\"\ninterval_ms = 200\n\
         timeout_ms = 150\nhealthy_threshold = 2\nunhealthy_threshold = 3\n",
    );
    let addr = proxy.addr();
    assert_eq!(http_via(addr).as_deref(), Some("a"));

    let mark = proxy.log_mark();
    std::fs::remove_file(dir.join("a").join("health")).unwrap();
    let line = wait_event(&proxy, mark, "health checks failed", "a")
        .unwrap_or_else(|| panic!("a taken out; proxy log:\n{}", proxy.log_text()));
    assert!(line.contains("404"), "the reason names the status: {line}");
    for _ in 0..5 {
        assert_eq!(http_via(addr).as_deref(), Some("b"));
    }

    let mark = proxy.log_mark();
    std::fs::write(dir.join("a").join("health"), "ok\n").unwrap();
    wait_event(&proxy, mark, "health checks pass again", "a")
        .unwrap_or_else(|| panic!("a back; proxy log:\n{}", proxy.log_text()));
    assert!(eventually(PATIENCE, || http_via(addr).as_deref() == Some("a")));
}

/// QA: a backend taken out by its own check stayed out for good once it
/// registered again without one (or with `"enabled": false`): nothing
/// checked it any more, so nothing could bring it back, and the API showed
/// it down with a last check that only grew older.
#[test]
fn a_backend_down_by_its_own_check_is_back_once_it_registers_without_one() {
    let a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    let (_dir, proxy) = proxy_over("health-check-dropped", &[], API);
    let api = api_addr(&proxy);
    let register = |id: &str, port: u16, weight: i64, check: serde_json::Value| {
        let body = serde_json::json!({"id": id, "app": "web", "region": "sa", "ip": "127.0.0.1",
            "port": port, "weight": weight, "health_check": check});
        post_json(api, "/api/v1/register", &body)
    };
    let check = serde_json::json!({"type": "http", "path": "/health", "interval_ms": 100,
        "timeout_ms": 100, "unhealthy_threshold": 1, "healthy_threshold": 1});
    assert_eq!(register("a", a.port(), 100, check.clone()).0, 201);
    assert_eq!(register("b", b.port(), 1, serde_json::Value::Null).0, 201);
    assert!(eventually(PATIENCE, || http_via(proxy.addr()).as_deref() == Some("a")));

    let mark = proxy.log_mark();
    a.health_status
        .store(503, std::sync::atomic::Ordering::SeqCst);
    wait_event(&proxy, mark, "health checks failed", "a")
        .unwrap_or_else(|| panic!("a out; proxy log:\n{}", proxy.log_text()));
    assert_eq!(http_via(proxy.addr()).as_deref(), Some("b"));

    // The operator drops the check (its health endpoint is what is broken,
    // not the service): the backend is in rotation again.
    assert_eq!(register("a", a.port(), 100, serde_json::Value::Null).0, 200);
    assert!(
        eventually(PATIENCE, || http_via(proxy.addr()).as_deref() == Some("a")),
        "a back without a check; its health: {}",
        get_json(api, "/api/v1/backends/a")["health"]
    );
    let h = &get_json(api, "/api/v1/backends/a")["health"];
    assert_eq!(h["state"], "up", "{h}");
    assert_eq!(h["checks"], serde_json::Value::Null, "{h}");
    assert_eq!(
        h["last_check"],
        serde_json::Value::Null,
        "no stale check: {h}"
    );

    // The same with the check kept but turned off.
    let mark = proxy.log_mark();
    assert_eq!(register("a", a.port(), 100, check.clone()).0, 200);
    wait_event(&proxy, mark, "health checks failed", "a")
        .unwrap_or_else(|| panic!("a out again; proxy log:\n{}", proxy.log_text()));
    let mut off = check;
    off["enabled"] = serde_json::json!(false);
    assert_eq!(register("a", a.port(), 100, off).0, 200);
    assert!(
        eventually(PATIENCE, || http_via(proxy.addr()).as_deref() == Some("a")),
        "a back with its check off; its health: {}",
        get_json(api, "/api/v1/backends/a")["health"]
    );
}

/// QA: a health check that could not run for want of a local port (or a
/// descriptor) counted as the backend's failure: a proxy short of them
/// took healthy backends down. Reproduced with one ephemeral port on the
/// proxy's host, held by a connection to the backend: every check's
/// connect fails with EADDRNOTAVAIL. The backend stays in rotation, the
/// checks are counted as not run, and the log says why.
#[test]
fn a_check_that_cannot_get_a_local_port_does_not_take_the_backend_down() {
    use common::netns::Net;
    let net = Net::new(2);
    net.one_ephemeral_port(0);
    let backend_ip = net.ip(1);
    let backend = net.tag_backend(1, "a");
    let backend_addr = SocketAddr::new(backend_ip.into(), backend.port());
    let dir = TempDir::new("health-local-port");
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
                "[health]\nenabled = true\ntype = \"tcp\"\ninterval_ms = 100\ntimeout_ms = 80\n\
                 unhealthy_threshold = 1\n\n\
                 [metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:9090\"\n\n\
                 [[listener]]\nname = \"main\"\naddr = \"{}:8080\"\n",
                net.ip(0)
            ),
        ),
    )
    .unwrap();
    let proxy =
        Proxy::spawn_in_netns(&net.hosts[0].ns, &["--config", path.to_str().unwrap()], &[]).ready();
    let metrics: SocketAddr = "127.0.0.1:9090".parse().unwrap();
    let counter = |name: &'static str| {
        net.run_in(0, move || sample(&http_get(metrics, "/metrics").1, name))
            .unwrap_or(0.0)
    };
    // Checks run and pass.
    assert!(common::eventually(PATIENCE, || counter(
        "edgeproxy_health_checks_total"
    ) >= 2.0));
    // The only local port, held (a check may hold it for a moment).
    let held = net.run_in(0, move || {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match std::net::TcpStream::connect(backend_addr) {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("holding the port: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot take the local port: {e}"),
            }
        }
    });
    assert!(
        common::eventually(PATIENCE, || counter(
            "edgeproxy_health_checks_not_run_total"
        ) >= 5.0),
        "{}",
        proxy.log_text()
    );
    let log = proxy.log_text();
    assert!(!log.contains("health checks failed"), "{log}");
    assert!(
        log.contains("health check could not run on this host"),
        "{log}"
    );
    assert!(log.contains("Cannot assign requested address"), "{log}");
    assert_eq!(
        counter("edgeproxy_health_transitions_total{event=\"down\"}"),
        0.0
    );
    // Served once the port is free again.
    let client_addr: SocketAddr = format!("{}:8080", net.ip(0)).parse().unwrap();
    drop(held);
    let served = net.run_in(1, move || {
        let s = std::net::TcpStream::connect_timeout(&client_addr, PATIENCE).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        read_line(&s)
    });
    assert_eq!(served.as_deref(), Some("a"));
}
