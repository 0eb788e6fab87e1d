//! `/metrics` parses with a real Prometheus text parser, passes `promtool`'s
//! lint, is scraped and stored by a real Prometheus server, and its counters
//! move with traffic.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// `GET /metrics`, the text as served.
fn scrape_text(addr: SocketAddr) -> String {
    ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .expect("scrape")
        .into_body()
        .read_to_string()
        .expect("body")
}

fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let body = scrape_text(addr);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("not valid Prometheus text format")
}

/// The value of `name` with all of `labels`, summed over other labels.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn metrics_addr(proxy: &Proxy) -> SocketAddr {
    let line = proxy
        .wait_for_log("metrics listening", PATIENCE)
        .expect("no metrics listener");
    field(&line, "addr").unwrap().parse().unwrap()
}

/// A proxy with metrics on a free loopback port (and `extra` TOML), over
/// `rows` in a new routing.db under `dir`.
fn proxy_with_metrics(dir: &TempDir, rows: &[Row], extra: &str) -> (Db, Proxy) {
    let db = Db::create(dir.join("routing.db"));
    for row in rows {
        db.upsert(row);
    }
    let proxy = Proxy::with_config(
        dir,
        &config(
            &db.path,
            &format!("{extra}[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n"),
        ),
    );
    (db, proxy)
}

#[test]
fn counters_move_with_traffic() {
    let dir = TempDir::new("metrics");
    let live = TagBackend::start("live");
    // The dead backend scores best (weight), so the first connection tries
    // it, fails, and retries onto the live one; later ones go straight to
    // the live one while the dead one cools, except one that probes it each
    // time its backoff passes (engine/src/backoff.rs). Every failure counts.
    let refusing = RefusingPort::new();
    let mut dead = Row::new("dead", "web", "sa", refusing.port());
    dead.weight = 100;
    let (_db, proxy) = proxy_with_metrics(
        &dir,
        &[dead, Row::new("live", "web", "sa", live.port())],
        "[affinity]\nttl_secs = 0\n",
    );
    let metrics = metrics_addr(&proxy);

    let before = scrape(metrics);
    assert_eq!(
        value(
            &before,
            "edgeproxy_listener_connections_accepted_total",
            &[("listener", "main")]
        ),
        0.0
    );
    assert_eq!(value(&before, "edgeproxy_routing_backends", &[]), 2.0);

    const N: usize = 5;
    for _ in 0..N {
        let (name, mut stream) = connect_tagged(proxy.addr());
        assert_eq!(name, "live");
        stream.write_all(b"ping").unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).unwrap();
    }
    // Open one more and keep it: the active gauges must show it.
    let (_, held) = connect_tagged(proxy.addr());

    // The proxy sees the first N close on its own time: scrape until their
    // connections are gone from the gauges (or give up and let the asserts
    // below say what is left).
    let mut after = scrape(metrics);
    common::eventually(Duration::from_secs(10), || {
        after = scrape(metrics);
        value(
            &after,
            "edgeproxy_backend_connections_active",
            &[("backend", "live")],
        ) == 1.0
            && value(
                &after,
                "edgeproxy_listener_connections_active",
                &[("listener", "main")],
            ) == 1.0
    });
    let n = N as f64 + 1.0;
    assert_eq!(
        value(
            &after,
            "edgeproxy_listener_connections_accepted_total",
            &[("listener", "main")]
        ),
        n
    );
    assert_eq!(
        value(&after, "edgeproxy_shard_connections_accepted_total", &[]),
        n
    );
    assert_eq!(
        value(
            &after,
            "edgeproxy_listener_connections_active",
            &[("listener", "main")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "edgeproxy_backend_connections_active",
            &[("backend", "live")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "edgeproxy_backend_connections_total",
            &[("backend", "live")]
        ),
        n
    );
    // One family, labelled per backend: the total is the sum.
    let failures = value(&after, "edgeproxy_backend_connect_failures_total", &[]);
    assert!((1.0..=n).contains(&failures), "{failures} failures");
    assert_eq!(
        value(
            &after,
            "edgeproxy_backend_connect_failures_total",
            &[("backend", "dead"), ("app", "web")]
        ),
        failures
    );
    assert_eq!(
        value(
            &after,
            "edgeproxy_backend_connect_failures_total",
            &[("backend", "live")]
        ),
        0.0
    );
    assert!(
        !after
            .samples
            .iter()
            .any(|x| x.metric.contains("failures_by_backend")),
        "a second family for the same thing"
    );
    // A retry per failure.
    assert_eq!(
        value(&after, "edgeproxy_backend_connect_retries_total", &[]),
        failures
    );
    // Both the failed and the successful picks count as selections (local POP tier).
    assert_eq!(
        value(&after, "edgeproxy_selections_total", &[("tier", "local")]),
        n + failures
    );
    // Greeting "live\n" (5 bytes) + echoed "ping" per finished connection.
    assert!(
        value(
            &after,
            "edgeproxy_bytes_total",
            &[("direction", "client_to_backend")]
        ) >= 4.0 * N as f64
    );
    assert!(
        value(
            &after,
            "edgeproxy_bytes_total",
            &[("direction", "backend_to_client")]
        ) >= 9.0 * N as f64
    );

    // The connect-latency histogram counted every successful connect.
    let histogram = after
        .samples
        .iter()
        .find(|s| s.metric == "edgeproxy_backend_connect_seconds")
        .expect("histogram missing");
    match &histogram.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
            assert_eq!(inf.count, n);
        }
        other => panic!("not a histogram: {other:?}"),
    }
    drop(held);
}

#[test]
fn routing_version_and_reloads_follow_the_table() {
    let dir = TempDir::new("metrics-reload");
    let backend = TagBackend::start("a");
    let (db, proxy) = proxy_with_metrics(&dir, &[Row::new("a", "web", "sa", backend.port())], "");
    let metrics = metrics_addr(&proxy);
    let first = value(&scrape(metrics), "edgeproxy_routing_snapshot_version", &[]);
    let mark = proxy.log_mark();
    db.upsert(&Row::new("b", "web", "sa", backend.port()));
    proxy
        .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
        .expect("no reload");
    let s = scrape(metrics);
    assert_eq!(
        value(&s, "edgeproxy_routing_snapshot_version", &[]),
        first + 1.0
    );
    assert_eq!(value(&s, "edgeproxy_routing_reloads_total", &[]), first);
    assert_eq!(value(&s, "edgeproxy_routing_backends", &[]), 2.0);
}

/// Writes a GET for `path` on a fresh connection to `addr`.
fn send_get(addr: SocketAddr, path: &str) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect_timeout(&addr, PATIENCE).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s
}

/// The status line's code of the answer on `s`, read to its end.
fn status_of(mut s: std::net::TcpStream, wait: Duration) -> u16 {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("no answer within {wait:?}: {e}"));
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"))
}

/// Clients holding connections open with half a request cannot take the
/// descriptors the data plane needs, nor keep the probes down: the
/// listener serves a bounded number of connections at once, and a client
/// arriving when all are taken closes the oldest one that is not serving a
/// request. Before, every such connection was accepted and held forever
/// (300 of them stopped the proxy under `ulimit -n 256`); then, with a cap
/// alone, 16 of them held every probe back for their 10 s head timeout.
#[test]
fn half_sent_requests_are_bounded_and_give_way_to_new_clients() {
    const CAP: usize = control::metrics::MAX_CONNECTIONS;
    const HEAD_TIMEOUT: Duration = control::bounded_http::HEADER_READ_TIMEOUT;
    const EXTRA: usize = 4;
    let dir = TempDir::new("metrics-half-sent");
    let backend = TagBackend::start("a");
    let (_db, proxy) = proxy_with_metrics(&dir, &[Row::new("a", "web", "sa", backend.port())], "");
    let metrics = metrics_addr(&proxy);
    assert_eq!(status_of(send_get(metrics, "/live"), PATIENCE), 200);

    let started = std::time::Instant::now();
    let held: Vec<std::net::TcpStream> = (0..CAP + EXTRA)
        .map(|_| {
            let mut s = std::net::TcpStream::connect_timeout(&metrics, PATIENCE).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    let closed = |s: &std::net::TcpStream, wait: Duration| -> bool {
        s.set_read_timeout(Some(wait)).unwrap();
        let mut rest = Vec::new();
        match (&*s).read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    // The cap holds: the oldest EXTRA made way for the newest, long before
    // any head timed out; the rest are still open.
    for (i, s) in held[..EXTRA].iter().enumerate() {
        assert!(closed(s, PATIENCE), "held connection {i} was not closed");
    }
    assert!(
        started.elapsed() < HEAD_TIMEOUT / 2,
        "closed only after {:?}",
        started.elapsed()
    );
    assert!(
        !closed(&held[EXTRA], Duration::from_millis(300)),
        "more connections closed than the cap asks"
    );

    // The probes answer at once, each in place of a half-sent connection.
    let probes = std::time::Instant::now();
    assert_eq!(
        status_of(send_get(metrics, "/live"), PATIENCE),
        200,
        "/live"
    );
    assert_eq!(
        status_of(send_get(metrics, "/metrics"), PATIENCE),
        200,
        "/metrics"
    );
    assert!(
        probes.elapsed() < HEAD_TIMEOUT / 2,
        "probes answered only after {:?}",
        probes.elapsed()
    );
    // The data plane was never short of anything.
    assert_eq!(which_backend(proxy.addr()), "a");
}

/// Echoes `len` bytes through `stream` (a writer thread sends, this thread
/// reads back) and returns how many came back.
fn echo_bulk(stream: std::net::TcpStream, len: usize) -> usize {
    let writer_end = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let block = vec![0x5au8; 256 * 1024];
        let mut left = len;
        let mut w = &writer_end;
        while left > 0 {
            let n = left.min(block.len());
            w.write_all(&block[..n]).unwrap();
            left -= n;
        }
        writer_end.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = 0;
    let mut buf = vec![0u8; 256 * 1024];
    let mut r = &stream;
    loop {
        match r.read(&mut buf).unwrap() {
            0 => break,
            n => {
                assert!(buf[..n].iter().all(|b| *b == 0x5a), "corrupted echo");
                got += n;
            }
        }
    }
    writer.join().unwrap();
    got
}

#[test]
fn bulk_flows_are_spliced_unless_disabled() {
    for splice in [true, false] {
        let dir = TempDir::new("splice");
        let backend = TagBackend::start("echo");
        let db = Db::create(dir.join("routing.db"));
        db.upsert(&Row::new("echo", "web", "sa", backend.port()));
        let toml = format!(
            "[routing]\ndb_path = {db:?}\nreload_interval_ms = 100\n\
             [runtime]\nshards = 1\nsplice_bulk = {splice}\n\
             [metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n\
             [[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n",
            db = db.path.display().to_string()
        );
        let proxy = Proxy::with_config(&dir, &toml);
        let metrics = metrics_addr(&proxy);
        let spliced = || value(&scrape(metrics), "edgeproxy_spliced_flows_total", &[]);

        // Small exchanges never fill a buffer: copied, not spliced.
        let (_, mut small) = connect_tagged(proxy.addr());
        small.write_all(b"hello\n").unwrap();
        assert_eq!(read_line(&small).as_deref(), Some("hello"));
        drop(small);
        assert_eq!(spliced(), 0.0, "splice_bulk = {splice}");

        // 32 MiB echoed: both directions fill whole buffers.
        let (_, bulk) = connect_tagged(proxy.addr());
        let len = 32 << 20;
        assert_eq!(echo_bulk(bulk, len), len, "splice_bulk = {splice}");
        let expected = if splice { 2.0 } else { 0.0 };
        assert_eq!(spliced(), expected, "splice_bulk = {splice}");
    }
}

/// `edgeproxy_build_info{version,commit}` says which build runs, and the
/// standard `process_*` families describe the process: its CPU, memory and
/// descriptors, as every Prometheus client library exports them.
#[test]
fn build_info_and_process_metrics() {
    let dir = TempDir::new("metrics-process");
    let (_db, proxy) = proxy_with_metrics(&dir, &[], "");
    let (user, system) = cpu_ticks(proxy.pid());
    let cpu_before_scrape = (user + system) as f64 / clock_ticks_per_second();
    let s = scrape(metrics_addr(&proxy));
    let info = s
        .samples
        .iter()
        .find(|x| x.metric == "edgeproxy_build_info")
        .expect("no edgeproxy_build_info");
    assert_eq!(info.labels.get("version"), Some(env!("CARGO_PKG_VERSION")));
    let (_, version, _) = run_to_end(&["--version"], &[]);
    let commit = version
        .lines()
        .find_map(|l| l.strip_prefix("commit: "))
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(info.labels.get("commit"), Some(commit));
    assert_eq!(value(&s, "edgeproxy_build_info", &[]), 1.0);

    // What /proc says about the process, independently of the proxy.
    let pid = proxy.pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    let open = value(&s, "process_open_fds", &[]);
    assert!(
        (open - fds).abs() <= 8.0,
        "process_open_fds {open}, /proc says {fds}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    let rss = value(&s, "process_resident_memory_bytes", &[]);
    assert!(
        rss > 0.5 * rss_kb * 1024.0 && rss < 2.0 * rss_kb * 1024.0,
        "process_resident_memory_bytes {rss}, /proc says {rss_kb} kB"
    );
    // Precise, unlike /proc's ticks: above zero even for a process that has
    // run less than a tick, and never below what /proc counted before.
    let cpu = value(&s, "process_cpu_seconds_total", &[]);
    assert!(
        cpu > 0.0 && cpu >= cpu_before_scrape,
        "process_cpu_seconds_total {cpu}, /proc said {cpu_before_scrape} before the scrape"
    );
    assert!(value(&s, "process_max_fds", &[]) >= open);
    assert!(value(&s, "process_threads", &[]) >= 3.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value(&s, "process_start_time_seconds", &[]);
    assert!(
        started > now - 600.0 && started <= now + 1.0,
        "{started} vs {now}"
    );
}

/// A Prometheus server process, killed (and its data dropped with the
/// caller's `TempDir`) when this is dropped.
struct Prometheus {
    _daemon: common::daemons::Daemon,
    web: SocketAddr,
}

impl Prometheus {
    /// Starts Debian's `prometheus` scraping `target` every second, its web
    /// API on a free loopback port, its storage under `dir`.
    fn scraping(dir: &TempDir, target: SocketAddr) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: edgeproxy\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        // A port below the ephemeral range (`dead_port`), which no other
        // socket takes meanwhile.
        let web = SocketAddr::from(([127, 0, 0, 1], dead_port()));
        let daemon = common::daemons::daemon(
            "prometheus",
            "prometheus",
            &[
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
                &format!("--web.listen-address={web}"),
            ],
            &log,
            &[web.port()],
        );
        // Ready once Prometheus itself answers on the port.
        let ready = eventually(Duration::from_secs(30), || {
            ureq::get(&format!("http://{web}/-/ready"))
                .call()
                .ok()
                .and_then(|r| r.into_body().read_to_string().ok())
                .is_some_and(|body| body.contains("Prometheus"))
        });
        assert!(
            ready,
            "Prometheus is not ready on {web}:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Prometheus {
            _daemon: daemon,
            web,
        }
    }

    /// `GET /api/v1/<path>` with query parameters, its `data` field; `None`
    /// while the server is not answering yet.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Option<serde_json::Value> {
        let mut request = ureq::get(&format!("http://{}/api/v1/{path}", self.web));
        for (k, v) in params {
            request = request.query(*k, *v);
        }
        let body = request.call().ok()?.into_body().read_to_string().ok()?;
        let reply: serde_json::Value = serde_json::from_str(&body).expect("API reply is JSON");
        assert_eq!(reply["status"], "success", "{path}: {reply}");
        Some(reply["data"].clone())
    }

    /// The metric names of every series Prometheus stored from the job.
    fn stored_names(&self) -> std::collections::BTreeSet<String> {
        let data = self
            .api(
                "query",
                &[("query", "count by (__name__) ({job=\"edgeproxy\"})")],
            )
            .expect("prometheus answers");
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["metric"]["__name__"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Real consumers of `/metrics`: `promtool check metrics` (Prometheus's own
/// linter) finds nothing to fix, and a Prometheus server scrapes the
/// endpoint without error and stores every metric the exposition has,
/// with the values it has.
#[test]
fn prometheus_scrapes_every_metric_and_promtool_finds_nothing_to_fix() {
    let dir = TempDir::new("metrics-prometheus");
    let live = TagBackend::start("live");
    let (_db, proxy) = proxy_with_metrics(&dir, &[Row::new("live", "web", "sa", live.port())], "");
    // Traffic, so that per-backend series and histogram buckets exist.
    for _ in 0..3 {
        let (name, _stream) = connect_tagged(proxy.addr());
        assert_eq!(name, "live");
    }
    let addr = metrics_addr(&proxy);
    let body = scrape_text(addr);

    let mut lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run promtool (Debian package `prometheus`; .ci/run installs it)");
    lint.stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let linted = lint.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );
    assert!(
        linted.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}",
        linted.status
    );

    // Every sample line's metric name (histograms add _bucket, _sum, _count).
    let exposed: std::collections::BTreeSet<String> = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    assert!(exposed.contains("edgeproxy_backend_connections_total"));

    let prometheus = Prometheus::scraping(&dir, addr);
    let scraped = eventually(Duration::from_secs(60), || {
        let Some(targets) = prometheus.api("targets", &[]) else {
            return false;
        };
        let target = &targets["activeTargets"][0];
        let error = target["lastError"].as_str().unwrap_or_default();
        assert!(
            error.is_empty(),
            "Prometheus failed to scrape /metrics: {error}"
        );
        target["health"] == "up"
    });
    assert!(
        scraped,
        "Prometheus never scraped the target; its log:\n{}",
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    );
    // Stored is what was scraped, once the first scrape's samples are
    // queryable.
    let mut stored = Default::default();
    eventually(Duration::from_secs(30), || {
        stored = prometheus.stored_names();
        stored.is_superset(&exposed)
    });
    let missing: Vec<_> = exposed.difference(&stored).collect();
    assert!(missing.is_empty(), "Prometheus did not store {missing:?}");

    // And a value survives the trip: three connections to the one backend.
    let data = prometheus
        .api(
            "query",
            &[(
                "query",
                "sum(edgeproxy_backend_connections_total{job=\"edgeproxy\"})",
            )],
        )
        .expect("prometheus answers");
    let total: f64 = data["result"][0]["value"][1]
        .as_str()
        .expect("a value")
        .parse()
        .unwrap();
    assert_eq!(total, 3.0);
}
