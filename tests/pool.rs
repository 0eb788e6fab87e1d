//! Warm backend connections (`[pool]`), through the real binary and real
//! sockets: a client takes a connection the backend accepted before the
//! client came; a pooled connection the backend closed never reaches a
//! client; the per-backend limit and the idle shrink hold; unhealthy,
//! drained and deleted backends lose their warm connections; SIGHUP turns
//! the pool on and off; PROXY v2 headers name the client that took the
//! socket; backends that speak first are excluded (or kept on request).
//! The last tests put the backend 50 ms away (network namespaces, NFQUEUE
//! delay; need root) and measure the round trip saved, for plain and TLS
//! clients; `warm = "rtt"` warms the backend health checks measure far and
//! not the near one.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const METRICS: &str = "[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n";

/// One proxy at a time: each keeps warm sockets and the machine is small.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A backend that never speaks first: it waits for the client's first
/// bytes, answers `<name> <age_ms> <source>\n` (how long the connection had
/// been open when they arrived: a pooled connection is old, a fresh one is
/// not; `source` is the client a PROXY v2 header named, or `-`), then
/// echoes. With `close_idle_after`, a connection that received nothing for
/// that long is closed, as many servers do.
struct WarmBackend {
    name: String,
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Accepted, still open, and never sent a byte: pooled and waiting.
    idle_open: Arc<AtomicIsize>,
}

impl WarmBackend {
    fn start(name: &str, close_idle_after: Option<Duration>, proxy_header: bool) -> WarmBackend {
        WarmBackend::serve(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            name,
            close_idle_after,
            proxy_header,
        )
    }

    fn serve(
        listener: TcpListener,
        name: &str,
        close_idle_after: Option<Duration>,
        proxy_header: bool,
    ) -> WarmBackend {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let idle_open = Arc::new(AtomicIsize::new(0));
        let (acc, idle, tag) = (
            Arc::clone(&accepted),
            Arc::clone(&idle_open),
            name.to_string(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let since = Instant::now();
                acc.fetch_add(1, SeqCst);
                idle.fetch_add(1, SeqCst);
                let (idle, tag) = (Arc::clone(&idle), tag.clone());
                std::thread::spawn(move || {
                    stream.set_read_timeout(close_idle_after).unwrap();
                    let mut buf = vec![0u8; 64 * 1024];
                    let n = match stream.read(&mut buf) {
                        Ok(n) if n > 0 => n,
                        // Closed by the proxy, or idle too long: close.
                        _ => {
                            idle.fetch_sub(1, SeqCst);
                            return;
                        }
                    };
                    idle.fetch_sub(1, SeqCst);
                    let age = since.elapsed().as_millis();
                    let source = match proxy_header {
                        false => "-".to_string(),
                        true => match engine::proxy_protocol::parse(&buf[..n]) {
                            Ok(engine::proxy_protocol::Parsed::Complete { header, .. }) => {
                                header.source.map_or("none".into(), |s| s.ip().to_string())
                            }
                            _ => "bad-header".into(),
                        },
                    };
                    let _ = stream.set_read_timeout(None);
                    if stream
                        .write_all(format!("{tag} {age} {source}\n").as_bytes())
                        .is_err()
                    {
                        return;
                    }
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        WarmBackend {
            name: name.to_string(),
            addr,
            accepted,
            idle_open,
        }
    }

    fn idle(&self) -> isize {
        self.idle_open.load(SeqCst)
    }

    fn row(&self, region: &str, app: &str) -> Row {
        let mut r = Row::new(&self.name, app, region, self.addr.port());
        r.ip = self.addr.ip().to_string();
        r
    }
}

/// What a client saw: the backend's name, how old the backend connection
/// was when its bytes arrived, and the source a PROXY header named.
#[derive(Debug)]
struct Answer {
    backend: String,
    age_ms: u64,
    source: String,
}

/// Connects, sends `prefix` + "hello\n" in one write, reads the answer.
fn ask_with(proxy: SocketAddr, prefix: &[u8]) -> Result<Answer, String> {
    ask_timed(proxy, prefix).map(|(_, a)| a)
}

/// [`ask_with`], and the time from the connect to the answer.
fn ask_timed(proxy: SocketAddr, prefix: &[u8]) -> Result<(Duration, Answer), String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut msg = prefix.to_vec();
    msg.extend_from_slice(b"hello\n");
    s.write_all(&msg).map_err(|e| format!("write: {e}"))?;
    let line = read_line(&s).ok_or("closed before an answer")?;
    let took = start.elapsed();
    let mut parts = line.split(' ');
    let backend = parts.next().unwrap_or_default().to_string();
    let age_ms = parts
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or(format!("bad answer {line:?}"))?;
    let source = parts.next().unwrap_or_default().to_string();
    // The rest is echoed (behind a PROXY header, the backend may read the
    // header alone first, and echo "hello" too).
    s.write_all(b"ping\n").map_err(|e| format!("write: {e}"))?;
    loop {
        match read_line(&s).ok_or("closed before the echo")?.as_str() {
            "ping" => break,
            "hello" => continue,
            other => return Err(format!("echo {other:?}")),
        }
    }
    Ok((
        took,
        Answer {
            backend,
            age_ms,
            source,
        },
    ))
}

fn ask(proxy: SocketAddr) -> Result<Answer, String> {
    ask_with(proxy, b"")
}

fn metrics_addr(proxy: &Proxy) -> SocketAddr {
    let line = proxy
        .wait_for_log("metrics listening", PATIENCE)
        .expect("metrics listener");
    field(&line, "addr").unwrap().parse().unwrap()
}

/// An unlabelled metric's value (0 when absent).
fn scrape(metrics: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    all.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap())
        .unwrap_or(0.0)
}

/// `[pool]` on, with `extra` lines.
fn pool(extra: &str) -> String {
    format!("[pool]\nenabled = true\n{extra}\n")
}

/// A proxy (2 shards, POP region "sa", affinity off) over `rows`.
fn proxy_over(tag: &str, rows: &[Row], extra: &str) -> (TempDir, Proxy) {
    let dir = TempDir::new(tag);
    let db = Db::create(dir.join("routing.db"));
    for r in rows {
        db.upsert(r);
    }
    let text = config(
        &db.path,
        &format!("[affinity]\nttl_secs = 0\n\n{METRICS}\n{extra}"),
    );
    let proxy = Proxy::with_config(&dir, &text);
    (dir, proxy)
}

/// Two shards, one warm socket each to start with.
const SHARDS: isize = 2;

#[test]
fn the_first_client_takes_a_connection_the_backend_accepted_before_it_came() {
    let _serial = serial();
    let far = WarmBackend::start("far", None, false);
    let near = WarmBackend::start("near", None, false);
    let listeners = "[[listener]]\nname = \"far\"\naddr = \"127.0.0.1:0\"\napp = \"far\"\n\n\
                     [[listener]]\nname = \"near\"\naddr = \"127.0.0.1:0\"\napp = \"near\"\n";
    let (_dir, proxy) = proxy_over(
        "pool-warm",
        &[far.row("eu", "far"), near.row("sa", "near")],
        &format!("{}\n{listeners}", pool("")),
    );
    let m = metrics_addr(&proxy);
    // Each shard warms the far backend (outside this POP's region), not the
    // near one.
    assert!(
        eventually(PATIENCE, || far.idle() == SHARDS),
        "far backend warm connections: {}",
        far.idle()
    );
    assert_eq!(scrape(m, "edgeproxy_pool_idle_connections"), SHARDS as f64);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        near.accepted.load(SeqCst),
        0,
        "the near backend is not warmed"
    );

    let warm = ask(proxy.listener("far")).unwrap();
    assert_eq!(warm.backend, "far");
    assert!(
        warm.age_ms >= 300,
        "the client's bytes arrived on a connection {} ms old: not a warm one",
        warm.age_ms
    );
    assert_eq!(scrape(m, "edgeproxy_pool_hits_total"), 1.0);
    // The taken socket is replaced in the background.
    assert!(eventually(PATIENCE, || far.idle() == SHARDS));
    assert_eq!(far.accepted.load(SeqCst), SHARDS as usize + 1);

    // The near backend: a fresh connection, neither hit nor miss.
    let cold = ask(proxy.listener("near")).unwrap();
    assert!(cold.age_ms < 200, "fresh connection {} ms old", cold.age_ms);
    assert_eq!(scrape(m, "edgeproxy_pool_hits_total"), 1.0);
    assert_eq!(scrape(m, "edgeproxy_pool_misses_total"), 0.0);
}

#[test]
fn a_backend_that_closes_idle_connections_never_costs_a_client_its_connection() {
    let _serial = serial();
    // The backend drops connections idle for 1 s; the pool would keep them
    // 60 s. Clients keep arriving, so some take sockets around the moment
    // the backend closes them.
    let b = WarmBackend::start("b", Some(Duration::from_secs(1)), false);
    let (_dir, proxy) = proxy_over("pool-stale", &[b.row("eu", "web")], &pool(""));
    let m = metrics_addr(&proxy);
    assert!(eventually(PATIENCE, || b.idle() == SHARDS));
    let mut errors = Vec::new();
    let mut warm = 0;
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(5) {
        match ask(proxy.addr()) {
            Ok(a) if a.age_ms >= 5 => warm += 1,
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
        i += 1;
        // Irregular gaps, up to ~1.3 s: some sockets reach the backend's
        // idle limit while pooled.
        std::thread::sleep(Duration::from_millis(50 + (i * 337) % 1250));
    }
    assert!(errors.is_empty(), "client errors: {errors:?}");
    let stale = scrape(m, "edgeproxy_pool_stale_total");
    assert!(
        stale >= 2.0,
        "the backend closed pooled sockets {stale} times: the test did not exercise it"
    );
    assert!(warm >= 1, "no client was served by a warm connection");
}

#[test]
fn unhealthy_drained_and_deleted_backends_lose_their_warm_connections() {
    let _serial = serial();
    let (a, b, c) = (
        WarmBackend::start("a", None, false),
        WarmBackend::start("b", None, false),
        WarmBackend::start("c", None, false),
    );
    let (dir, proxy) = proxy_over(
        "pool-leave",
        &[a.row("eu", "web"), b.row("eu", "web"), c.row("eu", "web")],
        &pool(""),
    );
    let m = metrics_addr(&proxy);
    let all_warm = || [&a, &b, &c].iter().all(|x| x.idle() == SHARDS);
    assert!(eventually(PATIENCE, all_warm));
    let db = Db::open(dir.join("routing.db"));
    db.exec("UPDATE backends SET healthy = 0 WHERE id = 'a'");
    assert!(
        eventually(PATIENCE, || a.idle() == 0),
        "unhealthy: {} left",
        a.idle()
    );
    db.exec("UPDATE backends SET draining = 1 WHERE id = 'b'");
    assert!(
        eventually(PATIENCE, || b.idle() == 0),
        "drained: {} left",
        b.idle()
    );
    db.exec("UPDATE backends SET deleted = 1 WHERE id = 'c'");
    assert!(
        eventually(PATIENCE, || c.idle() == 0),
        "deleted: {} left",
        c.idle()
    );
    assert!(eventually(PATIENCE, || scrape(
        m,
        "edgeproxy_pool_idle_connections"
    ) == 0.0));
    // And nobody reconnects them.
    let accepted = [&a, &b, &c].map(|x| x.accepted.load(SeqCst));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!([&a, &b, &c].map(|x| x.accepted.load(SeqCst)), accepted);
    // Healthy again: warm again.
    db.exec("UPDATE backends SET healthy = 1 WHERE id = 'a'");
    assert!(eventually(PATIENCE, || a.idle() == SHARDS));
}

#[test]
fn sighup_turns_the_pool_on_and_off_and_new_backends_are_warmed() {
    let _serial = serial();
    let a = WarmBackend::start("a", None, false);
    let dir = TempDir::new("pool-hup");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&a.row("eu", "web"));
    let path = dir.join("edgeproxy.toml");
    let write = |pool_on: bool| {
        let extra = format!("{METRICS}\n[pool]\nenabled = {pool_on}\n");
        std::fs::write(&path, config(&db.path, &extra)).unwrap();
    };
    write(false);
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], &[]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(a.accepted.load(SeqCst), 0, "pool off: no warm connections");

    write(true);
    proxy.signal(SIGHUP);
    assert!(
        eventually(PATIENCE, || a.idle() == SHARDS),
        "after SIGHUP on"
    );
    // The client takes a pooled socket: counted as a hit. (Its age at the
    // backend says little here: it may be taken a millisecond after it was
    // made.)
    let m = metrics_addr(&proxy);
    let hits = scrape(m, "edgeproxy_pool_hits_total");
    let warm = ask(proxy.addr()).unwrap();
    assert_eq!(
        scrape(m, "edgeproxy_pool_hits_total"),
        hits + 1.0,
        "not a warm connection: {warm:?}"
    );

    // A backend added to the routing table is warmed by the next reload.
    let d = WarmBackend::start("d", None, false);
    db.upsert(&d.row("eu", "web"));
    assert!(eventually(PATIENCE, || d.idle() == SHARDS), "new backend");

    write(false);
    proxy.signal(SIGHUP);
    assert!(
        eventually(PATIENCE, || a.idle() == 0 && d.idle() == 0),
        "after SIGHUP off: {} and {} left",
        a.idle(),
        d.idle()
    );
    let cold = ask(proxy.addr()).unwrap();
    assert!(cold.age_ms < 200, "pool off, yet {cold:?}");
}

#[test]
fn proxy_v2_headers_name_the_client_that_took_the_warm_socket() {
    let _serial = serial();
    let b = WarmBackend::start("b", None, true);
    let listener = "[[listener]]\nname = \"lb\"\naddr = \"127.0.0.1:0\"\n\
                    accept_proxy_protocol = true\nsend_proxy_protocol = true\n";
    let (_dir, proxy) = proxy_over(
        "pool-pp",
        &[b.row("eu", "web")],
        &format!("{}\n{listener}", pool("")),
    );
    assert!(eventually(PATIENCE, || b.idle() == SHARDS));
    std::thread::sleep(Duration::from_millis(300));
    let lb = proxy.listener("lb");
    for client in ["203.0.113.7", "198.51.100.9", "192.0.2.44"] {
        // The header and the first bytes in one segment: the proxy reads
        // them together and hands both to the warm socket.
        let header = proxy_v1(client_at(client), lb);
        let got = ask_with(lb, &header).unwrap();
        assert_eq!(got.source, client, "{got:?}");
        assert!(got.age_ms >= 5, "not a warm connection: {got:?}");
        // Let the pool refill.
        assert!(eventually(PATIENCE, || b.idle() == SHARDS));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_backend_that_speaks_first_is_excluded_by_default_and_kept_on_request() {
    let _serial = serial();
    for (keep, tag) in [(false, "pool-greet-x"), (true, "pool-greet-k")] {
        let greeter = TagBackend::start("greeter");
        let mut row = Row::new("greeter", "mail", "eu", greeter.port());
        row.ip = "127.0.0.1".into();
        let policy = if keep { "speaks_first = \"keep\"" } else { "" };
        let (_dir, proxy) = proxy_over(tag, &[row], &pool(policy));
        let m = metrics_addr(&proxy);
        assert!(eventually(PATIENCE, || greeter.accepted() >= SHARDS as usize));
        std::thread::sleep(Duration::from_millis(600));
        for _ in 0..3 {
            // Every client gets the greeting, first.
            assert_eq!(which_backend(proxy.addr()), "greeter");
            std::thread::sleep(Duration::from_millis(300));
        }
        let excluded = scrape(m, "edgeproxy_pool_speaks_first_excluded_total");
        let hits = scrape(m, "edgeproxy_pool_hits_total");
        if keep {
            assert_eq!(excluded, 0.0);
            assert!(hits >= 1.0, "kept, yet no hit");
        } else {
            assert_eq!(excluded, SHARDS as f64, "each shard excludes it once");
            assert_eq!(hits, 0.0);
            assert_eq!(scrape(m, "edgeproxy_pool_idle_connections"), 0.0);
        }
    }
}

#[test]
fn a_silent_client_on_a_warm_connection_is_closed_by_the_idle_timeout() {
    let _serial = serial();
    let b = WarmBackend::start("b", None, false);
    let (_dir, proxy) = proxy_over(
        "pool-silent",
        &[b.row("eu", "web")],
        &format!("{}\n[limits]\nidle_timeout_secs = 1\n", pool("")),
    );
    let m = metrics_addr(&proxy);
    assert!(eventually(PATIENCE, || b.idle() == SHARDS));
    // It takes a warm socket and never says a word; neither does the
    // backend.
    let s = TcpStream::connect(proxy.addr()).unwrap();
    let start = Instant::now();
    assert!(read_until_closed(&s).is_empty());
    let took = start.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&took),
        "closed after {took:?}"
    );
    assert_eq!(scrape(m, "edgeproxy_pool_hits_total"), 1.0);
}

#[test]
fn bad_pool_settings_are_refused_with_the_key_named() {
    for (text, key) in [
        ("[pool]\nmax_per_backend = 0\n", "pool.max_per_backend"),
        ("[pool]\nwarm = \"nearby\"\n", "pool.warm"),
        ("[pool]\nmin_rtt_ms = 30\n", "pool.min_rtt_ms"),
        ("[pool]\nidle_timeout_secs = 0\n", "pool.idle_timeout_secs"),
    ] {
        let dir = TempDir::new("pool-bad");
        let path = dir.join("edgeproxy.toml");
        std::fs::write(&path, text).unwrap();
        let (status, _out, err) =
            run_to_end(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert!(!status.success(), "{text} was accepted");
        assert!(err.contains(key), "{key} not named in: {err}");
    }
    let (status, _out, err) = run_to_end(
        &["check-config"],
        &[("EDGEPROXY_POOL_MAX_PER_BACKEND", "many")],
    );
    assert!(!status.success());
    assert!(err.contains("EDGEPROXY_POOL_MAX_PER_BACKEND"), "{err}");
}

// ---------------------------------------------------------------------------
// A far backend: 50 ms each way (network namespaces; needs root).
// ---------------------------------------------------------------------------

/// The proxy and its clients in host 0, backends in host 1, every packet
/// between the hosts held 50 ms: a TCP handshake to a backend costs 100 ms.
struct Far {
    net: common::netns::Net,
    _dir: TempDir,
    proxy: Proxy,
}

/// Backends `(name, close_idle_after)` in host 1, each the only backend of
/// the app of its name, and a proxy in host 0 with `extra` config.
fn far(
    tag: &str,
    shards: usize,
    backends: &[(&str, Option<Duration>)],
    extra: &str,
) -> (Far, Vec<WarmBackend>) {
    far_and_near(tag, shards, backends, &[], "eu", extra)
}

/// [`far`], plus backends `near` in host 0 with the proxy (on its loopback:
/// no delay), every backend in `region` and the only one of its app.
fn far_and_near(
    tag: &str,
    shards: usize,
    far: &[(&str, Option<Duration>)],
    near: &[&str],
    region: &str,
    extra: &str,
) -> (Far, Vec<WarmBackend>) {
    let mut net = common::netns::Net::new(2);
    net.impair(Duration::from_millis(50), 0.0);
    let ip = net.ip(1);
    let mut backends: Vec<WarmBackend> = far
        .iter()
        .map(|&(name, idle)| {
            let listener = net.run_in(1, move || TcpListener::bind((ip, 0)).unwrap());
            WarmBackend::serve(listener, name, idle, false)
        })
        .collect();
    for name in near {
        let listener = net.run_in(0, || TcpListener::bind("127.0.0.1:0").unwrap());
        backends.push(WarmBackend::serve(listener, name, None, false));
    }
    let dir = TempDir::new(tag);
    let db = Db::create(dir.join("routing.db"));
    for b in &backends {
        db.upsert(&b.row(region, &b.name));
    }
    let text = config(
        &db.path,
        &format!("[affinity]\nttl_secs = 0\n\n{METRICS}\n{extra}"),
    )
    .replace("shards = 2", &format!("shards = {shards}"));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(&path, text).unwrap();
    let proxy =
        Proxy::spawn_in_netns(&net.hosts[0].ns, &["--config", path.to_str().unwrap()], &[]).ready();
    (
        Far {
            net,
            _dir: dir,
            proxy,
        },
        backends,
    )
}

impl Far {
    /// One new client through `listener`: the time from its connect to the
    /// backend's answer, and the answer.
    fn ask(&self, listener: SocketAddr) -> Result<(Duration, Answer), String> {
        self.net.run_in(0, move || ask_timed(listener, b""))
    }

    fn scrape(&self, name: &'static str) -> f64 {
        let m = metrics_addr(&self.proxy);
        self.net.run_in(0, move || scrape(m, name))
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `rounds` times, one client of the warmed app (`ask(true)`) then one of
/// the cold app (`ask(false)`), 300 ms apart (the pool refills in one round
/// trip); the warm clients' median answer must come at least 70 ms (most of
/// the 100 ms round trip) sooner than the fresh ones'.
fn warm_saves_a_round_trip(
    what: &str,
    rounds: usize,
    mut ask: impl FnMut(bool) -> Result<(Duration, Answer), String>,
) {
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (t, a) = ask(true).unwrap();
        assert_eq!(a.backend, "warm");
        assert!(a.age_ms >= 5, "not a warm connection: {a:?}");
        warm.push(t);
        let (t, a) = ask(false).unwrap();
        assert_eq!(a.backend, "cold");
        cold.push(t);
        std::thread::sleep(Duration::from_millis(300));
    }
    let (w, c) = (median(warm), median(cold));
    eprintln!(
        "{what}, median of {rounds}: warm {:.1} ms, fresh {:.1} ms ({:.2}x)",
        ms(w),
        ms(c),
        ms(w) / ms(c)
    );
    assert!(
        w + Duration::from_millis(70) < c,
        "warm {w:?} vs fresh {c:?}: less than 70 ms saved"
    );
}

#[test]
fn a_client_of_a_far_backend_gets_its_answer_a_round_trip_sooner_from_a_warm_connection() {
    let _serial = serial();
    let listeners = "[[listener]]\nname = \"warm\"\naddr = \"127.0.0.1:0\"\napp = \"warm\"\n\n\
                     [[listener]]\nname = \"cold\"\naddr = \"127.0.0.1:0\"\napp = \"cold\"\n";
    // One pool setting for both apps but only "warm" opts in.
    let (f, b) = far(
        "pool-far",
        2,
        &[("warm", None), ("cold", None)],
        &format!("{}\n{listeners}", pool("apps = [\"warm\"]")),
    );
    assert!(eventually(PATIENCE, || b[0].idle() == SHARDS));
    let (warm_at, cold_at) = (f.proxy.listener("warm"), f.proxy.listener("cold"));
    // A fresh client waits for the handshake and the request; a warm one
    // for the request only: one round trip (100 ms) less.
    warm_saves_a_round_trip("far backend (100 ms RTT): time to the answer", 7, |at| {
        f.ask(if at { warm_at } else { cold_at })
    });
    // Every warm client took a pooled socket; the cold app is not warmed
    // (neither hit nor miss).
    assert_eq!(f.scrape("edgeproxy_pool_hits_total"), 7.0);
    assert_eq!(f.scrape("edgeproxy_pool_misses_total"), 0.0);
    assert_eq!(b[1].accepted.load(SeqCst), 7);
}

#[test]
fn a_far_backend_closing_pooled_connections_after_one_second_causes_no_client_error() {
    let _serial = serial();
    // The backend closes a connection 1 s after accepting it if nothing
    // came; its FIN takes 50 ms to reach the proxy. A client that takes the
    // socket in those 50 ms passes the check, sends its bytes into a closed
    // connection (answered with a reset), and must be served on a fresh
    // one without noticing. The pool's socket is made when the previous
    // client took the last one; the backend accepts it 150 ms later
    // (SYN, SYN-ACK, ACK), closes it at 1150 ms, the FIN arrives at 1200:
    // clients start ~1175 ms apart, with some spread.
    let (f, b) = far(
        "pool-far-stale",
        1,
        &[("web", Some(Duration::from_secs(1)))],
        &pool(""),
    );
    assert!(eventually(PATIENCE, || b[0].idle() == 1));
    clients_meet_closed_pooled_sockets(&f, "plain", || f.ask(f.proxy.addr()));
}

/// QA: a backend host that fell silent (power lost, a link cut: no FIN, no
/// reset) kept its warm sockets looking healthy; a client that took one
/// sent its bytes into it and hung, unlogged, until the idle timeout (5
/// minutes by default), where a fresh connect would have timed out after
/// `connect_timeout_ms` and moved on to the next backend. Now bytes
/// unacknowledged after the pool's connect timeout are sent on a fresh
/// connection, and the client is served by the other backend.
#[test]
fn a_client_whose_warm_backend_fell_silent_is_served_by_another_backend() {
    let _serial = serial();
    let net = common::netns::Net::new(2);
    let ip = net.ip(1);
    let listener = net.run_in(1, move || TcpListener::bind((ip, 0)).unwrap());
    let gone = WarmBackend::serve(listener, "gone", None, false);
    let listener = net.run_in(0, || TcpListener::bind("127.0.0.1:0").unwrap());
    let spare = WarmBackend::serve(listener, "spare", None, false);
    let dir = TempDir::new("pool-silent");
    let db = Db::create(dir.join("routing.db"));
    // "gone" is in this POP's region: every client goes to it first.
    db.upsert(&gone.row("sa", "web"));
    db.upsert(&spare.row("eu", "web"));
    let extra = format!(
        "[pop]\nregion = \"sa\"\n[limits]\nconnect_timeout_ms = 1000\n[affinity]\nttl_secs = 0\n\n{METRICS}\n{}",
        pool("warm = \"all\"\nconnect_timeout_ms = 1000")
    );
    let text = config(&db.path, &extra).replace("shards = 2", "shards = 1");
    let path = dir.join("edgeproxy.toml");
    std::fs::write(&path, text).unwrap();
    let proxy =
        Proxy::spawn_in_netns(&net.hosts[0].ns, &["--config", path.to_str().unwrap()], &[]).ready();
    assert!(eventually(PATIENCE, || gone.idle() == 1), "never warmed");
    let at = proxy.addr();
    let (_, first) = net.run_in(0, move || ask_timed(at, b"")).unwrap();
    assert_eq!(first.backend, "gone");
    assert!(
        eventually(PATIENCE, || gone.idle() == 1),
        "not warmed again"
    );
    // Its host falls silent: every packet to or from it is dropped.
    net.partition(&[0], &[1]);
    let (took, answer) = net
        .run_in(0, move || ask_timed(at, b""))
        .expect("the client was not served");
    assert_eq!(answer.backend, "spare");
    // The pool's patience (1 s), then the fresh connect's timeout (1 s).
    assert!(took < Duration::from_secs(10), "served after {took:?}");
    let m = metrics_addr(&proxy);
    let replayed = net.run_in(0, move || scrape(m, "edgeproxy_pool_replayed_total"));
    assert_eq!(replayed, 1.0);
}

/// Sends clients 1140–1220 ms apart (see the stale tests: each can take a
/// pooled socket while the backend's FIN is on its way) until two have met
/// a closed one or 30 were sent; none may see an error, and at least one
/// must have met a closed socket (else the test exercised nothing).
fn clients_meet_closed_pooled_sockets(
    f: &Far,
    what: &str,
    mut ask: impl FnMut() -> Result<(Duration, Answer), String>,
) {
    let mut errors = Vec::new();
    let mut served = 0;
    for i in 0..30u64 {
        let start = Instant::now();
        match ask() {
            Ok(_) => served += 1,
            Err(e) => errors.push(e),
        }
        if f.scrape("edgeproxy_pool_replayed_total") >= 2.0 {
            break;
        }
        let gap = Duration::from_millis(1140 + (i * 10) % 80);
        std::thread::sleep(gap.saturating_sub(start.elapsed()));
    }
    let stale = f.scrape("edgeproxy_pool_stale_total");
    let replayed = f.scrape("edgeproxy_pool_replayed_total");
    eprintln!("{what}: {served} clients served, stale {stale}, replayed {replayed}");
    assert!(errors.is_empty(), "client errors: {errors:?}");
    assert!(
        replayed >= 1.0,
        "no client's bytes met a closed pooled socket (stale {stale}): the test did not exercise it"
    );
}

#[test]
fn the_pool_grows_to_its_limit_under_load_and_shrinks_back_to_one_when_idle() {
    let _serial = serial();
    // A refill takes a round trip (100 ms), so clients arriving together
    // find the pool empty: each such miss raises the backend's target by
    // one, up to the limit.
    // One shard: the limit is per shard, and every test client (one
    // address) is steered to the same shard.
    let (f, b) = far(
        "pool-far-limits",
        1,
        &[("web", None)],
        &pool("max_per_backend = 3\nidle_timeout_secs = 2"),
    );
    let b = &b[0];
    assert!(eventually(PATIENCE, || b.idle() == 1));
    let at = f.proxy.addr();
    for _ in 0..4 {
        f.net.run_in(0, move || {
            let held: Vec<TcpStream> = (0..12)
                .map(|_| {
                    let mut s = TcpStream::connect(at).unwrap();
                    s.write_all(b"x").unwrap();
                    s
                })
                .collect();
            std::thread::sleep(Duration::from_millis(400));
            drop(held);
        });
    }
    let limit = 3;
    // The pool refills to its limit, and never past it.
    assert!(
        eventually(PATIENCE, || b.idle() == limit),
        "warm connections {} (limit {limit}); hits {} misses {} idle {} accepted {}\n{}",
        b.idle(),
        f.scrape("edgeproxy_pool_hits_total"),
        f.scrape("edgeproxy_pool_misses_total"),
        f.scrape("edgeproxy_pool_idle_connections"),
        b.accepted.load(SeqCst),
        f.proxy.log_text()
    );
    let deadline = Instant::now() + Duration::from_millis(800);
    while Instant::now() < deadline {
        assert!(b.idle() <= limit, "{} warm connections", b.idle());
        assert!(f.scrape("edgeproxy_pool_idle_connections") <= limit as f64);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(f.scrape("edgeproxy_pool_misses_total") >= 4.0);
    // Unused for the idle timeout: back to one, not zero.
    assert!(
        eventually(PATIENCE, || b.idle() == 1
            && f.scrape("edgeproxy_pool_idle_connections") == 1.0),
        "after the idle timeout: {} warm connections",
        b.idle()
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(b.idle(), 1, "the pool shrank below one");
    assert!(f.scrape("edgeproxy_pool_expired_total") >= 2.0);
}

/// Backends are picked for warm connections by the RTT their health checks
/// measure (`warm = "rtt"`), whatever their region: two backends in this
/// POP's own region, one on the proxy's loopback and one 100 ms away, and a
/// threshold of 50 ms between them.
#[test]
fn rtt_warming_warms_the_backend_health_checks_measure_far_and_not_the_near_one() {
    let _serial = serial();
    let listeners = "[[listener]]\nname = \"far\"\naddr = \"127.0.0.1:0\"\napp = \"far\"\n\n\
                     [[listener]]\nname = \"near\"\naddr = \"127.0.0.1:0\"\napp = \"near\"\n";
    let health = "[health]\nenabled = true\ntype = \"tcp\"\ninterval_ms = 300\ntimeout_ms = 300\n";
    let (f, b) = far_and_near(
        "pool-rtt",
        2,
        &[("far", None)],
        &["near"],
        // The POP's own region: `warm = "remote"` would warm neither.
        "sa",
        &format!(
            "{health}\n{}\n{listeners}",
            pool("warm = \"rtt\"\nmin_rtt_ms = 50")
        ),
    );
    let (far, near) = (&b[0], &b[1]);
    // Warmed once a check measured its RTT (about 100 ms): one socket per
    // shard, and the pool holds nothing else.
    assert!(
        eventually(PATIENCE, || far.idle() >= SHARDS
            && f.scrape("edgeproxy_pool_idle_connections") == SHARDS as f64),
        "far backend warm connections {}, pool size {}\n{}",
        far.idle(),
        f.scrape("edgeproxy_pool_idle_connections"),
        f.proxy.log_text()
    );
    // Several checks of both later (the near one measures well under 1 ms):
    // still nothing pooled for the near backend. Its only connections are
    // the checks, each reset at once, so none stays open.
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        assert_eq!(
            f.scrape("edgeproxy_pool_idle_connections"),
            SHARDS as f64,
            "pool size: the near backend was warmed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        near.accepted.load(SeqCst) >= 3,
        "the near backend was not checked"
    );
    assert!(
        eventually(Duration::from_secs(1), || near.idle() == 0),
        "{} connections to the near backend stay open",
        near.idle()
    );

    // A client of the far backend takes a warm socket; one of the near
    // backend connects fresh and is neither a hit nor a miss.
    let (_, warm) = f.ask(f.proxy.listener("far")).unwrap();
    assert_eq!(warm.backend, "far");
    assert!(warm.age_ms >= 5, "not a warm connection: {warm:?}");
    let (_, cold) = f.ask(f.proxy.listener("near")).unwrap();
    assert_eq!(cold.backend, "near");
    assert!(
        cold.age_ms < 5,
        "near backend: a connection {} ms old",
        cold.age_ms
    );
    assert_eq!(f.scrape("edgeproxy_pool_hits_total"), 1.0);
    assert_eq!(f.scrape("edgeproxy_pool_misses_total"), 0.0);
}

// ---------------------------------------------------------------------------
// TLS-terminating listeners take warm sockets too.
// ---------------------------------------------------------------------------

/// A certificate for "edge.test" issued by a throwaway CA, written into
/// `dir`: the `[listener.tls]` keys naming its files, and a client config
/// trusting the CA.
fn tls_setup(dir: &TempDir) -> (String, Arc<rustls::ClientConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["edge.test".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let (cert_path, key_path) = (dir.join("edge.pem"), dir.join("edge.key"));
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let keys = format!(
        "cert = {:?}\nkey = {:?}\n",
        cert_path.to_str().unwrap(),
        key_path.to_str().unwrap()
    );
    (keys, Arc::new(client))
}

/// One TLS client: connects and completes the handshake, then sends
/// "hello\n" and reads the backend's answer line. Returns the time from the
/// end of the handshake to the answer (what the backend connection costs
/// the client), and the answer.
fn ask_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<(Duration, Answer), String> {
    let name = rustls::pki_types::ServerName::try_from("edge.test").unwrap();
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    let start = Instant::now();
    tls.write_all(b"hello\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match tls.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            Ok(_) => return Err(format!("closed after {line:?}")),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let took = start.elapsed();
    let line = String::from_utf8_lossy(&line).trim_end().to_string();
    let mut parts = line.split(' ');
    let backend = parts.next().unwrap_or_default().to_string();
    let age_ms = parts
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or(format!("bad answer {line:?}"))?;
    // The rest is echoed, both ways through TLS.
    tls.write_all(b"ping\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut echo = [0u8; 5];
    tls.read_exact(&mut echo)
        .map_err(|e| format!("echo: {e}"))?;
    if &echo != b"ping\n" {
        return Err(format!("echo {:?}", String::from_utf8_lossy(&echo)));
    }
    Ok((
        took,
        Answer {
            backend,
            age_ms,
            source: "-".into(),
        },
    ))
}

#[test]
fn a_tls_client_of_a_far_backend_takes_a_warm_connection_after_its_handshake() {
    let _serial = serial();
    let certs = TempDir::new("pool-tls-certs");
    let (keys, client) = tls_setup(&certs);
    let listeners = format!(
        "[[listener]]\nname = \"warm\"\naddr = \"127.0.0.1:0\"\napp = \"warm\"\n\n\
         [listener.tls]\n{keys}\n\
         [[listener]]\nname = \"cold\"\naddr = \"127.0.0.1:0\"\napp = \"cold\"\n\n\
         [listener.tls]\n{keys}\n"
    );
    // Only "warm" opts in: "cold" is the same far backend setup, connected
    // fresh.
    let (f, b) = far(
        "pool-far-tls",
        2,
        &[("warm", None), ("cold", None)],
        &format!("{}\n{listeners}", pool("apps = [\"warm\"]")),
    );
    assert!(eventually(PATIENCE, || b[0].idle() == SHARDS));
    let (warm_at, cold_at) = (f.proxy.listener("warm"), f.proxy.listener("cold"));
    // The fresh client waits for the proxy's handshake to the backend after
    // its own TLS handshake; the warm one does not.
    warm_saves_a_round_trip(
        "TLS, far backend (100 ms RTT): handshake done to the answer",
        5,
        |warm| {
            let (at, c) = (if warm { warm_at } else { cold_at }, Arc::clone(&client));
            f.net.run_in(0, move || ask_tls(at, c))
        },
    );
    assert_eq!(f.scrape("edgeproxy_pool_hits_total"), 5.0);
    assert_eq!(f.scrape("edgeproxy_pool_misses_total"), 0.0);
    assert_eq!(f.scrape("edgeproxy_pool_stale_total"), 0.0);
}

#[test]
fn a_tls_client_never_sees_a_pooled_connection_its_far_backend_had_closed() {
    let _serial = serial();
    // As in the plain-TCP test above: the backend closes a connection 1 s
    // after accepting it if nothing came, and its FIN takes 50 ms to reach
    // the proxy. Here the client's first bytes are its first plaintext after
    // a TLS handshake with the proxy; those are what the guard keeps and
    // sends again on a fresh connection.
    let certs = TempDir::new("pool-tls-stale-certs");
    let (keys, client) = tls_setup(&certs);
    let listener = format!(
        "[[listener]]\nname = \"tls\"\naddr = \"127.0.0.1:0\"\napp = \"web\"\n\n\
         [listener.tls]\n{keys}\n"
    );
    let (f, b) = far(
        "pool-far-tls-stale",
        1,
        &[("web", Some(Duration::from_secs(1)))],
        &format!("{}\n{listener}", pool("")),
    );
    assert!(eventually(PATIENCE, || b[0].idle() == 1));
    let at = f.proxy.listener("tls");
    clients_meet_closed_pooled_sockets(&f, "TLS", || {
        let c = Arc::clone(&client);
        f.net.run_in(0, move || ask_tls(at, c))
    });
    assert!(f.scrape("edgeproxy_pool_hits_total") >= 1.0);
}

/// QA: a client that took a warm socket was logged (`log.access`) with no
/// backend (`backend=- backend_id="-"`) and without the first bytes it
/// sent, which went to the backend during the hand-over: the access log
/// said nothing of where pooled clients went.
#[test]
fn the_access_log_names_the_backend_of_a_pooled_client_and_counts_its_first_bytes() {
    let _serial = serial();
    let far = WarmBackend::start("far", None, false);
    let (_dir, proxy) = proxy_over(
        "pool-access-log",
        &[far.row("eu", "web")],
        &format!("{}\n[log]\naccess = true\n", pool("")),
    );
    let m = metrics_addr(&proxy);
    assert!(
        eventually(PATIENCE, || far.idle() == SHARDS),
        "far backend warm connections: {}",
        far.idle()
    );
    let mark = proxy.log_mark();
    // "hello\n" in the hand-over, then "ping\n" through the pumps.
    let warm = ask(proxy.addr()).unwrap();
    assert_eq!(warm.backend, "far");
    assert_eq!(scrape(m, "edgeproxy_pool_hits_total"), 1.0);
    let line = proxy
        .wait_for_log_where(mark, |l| l.contains("edgeproxy::access"), PATIENCE)
        .unwrap_or_else(|| panic!("no access line; log:\n{}", proxy.log_text()));
    assert_eq!(
        field(&line, "backend").as_deref(),
        Some(far.addr.to_string().as_str()),
        "{line}"
    );
    assert_eq!(field(&line, "backend_id").as_deref(), Some("far"), "{line}");
    assert_eq!(field(&line, "bytes_up").as_deref(), Some("11"), "{line}");
}
