//! The cost of active checks at scale: 10,000 backends (real loopback
//! listeners) checked every 5 s by the real binary. Ignored by default (it
//! holds 10,000 sockets and runs for half a minute); run it with
//!
//! ```text
//! cargo test --release --test health_scale -- --ignored --nocapture
//! ```
//!
//! It prints the proxy's CPU (user + system, from /proc/PID/stat) as a share
//! of one core over a measured window after the first interval, and its
//! thread count; it asserts only that every backend was checked and that no
//! thread was started per check.

mod common;

use std::time::{Duration, Instant};

use common::*;

const BACKENDS: usize = 10_000;

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

#[test]
#[ignore = "10,000 sockets and 30 s: a measurement, run by hand"]
fn ten_thousand_backends_checked_every_five_seconds() {
    // Listeners that accept and drop, on a runtime of this test process.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ports: Vec<u16> = rt.block_on(async {
        let mut ports = Vec::with_capacity(BACKENDS);
        for _ in 0..BACKENDS {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ports.push(l.local_addr().unwrap().port());
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    drop(s);
                }
            });
        }
        ports
    });
    let dir = TempDir::new("health-scale");
    let db = Db::create(dir.join("routing.db"));
    db.exec("BEGIN");
    for (i, port) in ports.iter().enumerate() {
        db.upsert(&Row::new(&format!("b{i}"), "web", "sa", *port));
    }
    db.exec("COMMIT");
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            "[health]\nenabled = true\ntype = \"tcp\"\ninterval_ms = 5000\ntimeout_ms = 2000\n\
             [metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n",
        ),
    );
    let line = proxy.wait_for_log("metrics listening", PATIENCE).unwrap();
    let metrics: std::net::SocketAddr = field(&line, "addr").unwrap().parse().unwrap();
    let checks = || scrape(metrics, "edgeproxy_health_checks_total");
    // The first interval spreads the first checks; measure after it.
    std::thread::sleep(Duration::from_secs(6));
    let pid = proxy.pid();
    let (t0, c0, n0) = (Instant::now(), cpu_ticks(pid), checks());
    std::thread::sleep(Duration::from_secs(20));
    let (secs, c1, n1) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid), checks());
    let hz = clock_ticks_per_second();
    let pct = |ticks: u64| ticks as f64 / hz / secs * 100.0;
    let (user, system) = (pct(c1.0 - c0.0), pct(c1.1 - c0.1));
    let share = user + system;
    let rate = (n1 - n0) / secs;
    let failures = scrape(metrics, "edgeproxy_health_check_failures_total");
    // The baseline, in the same run: the kernel's own cost of as many
    // loopback connects (handshake + reset) at the same rate, from one bare
    // thread of this process. On loopback both ends of each handshake are
    // billed to the connecting process; on a real network the backend's
    // half runs on the backend's host.
    let baseline = bare_connects(&ports, rate, Duration::from_secs(10));
    println!(
        "baseline: {rate:.0} bare connect+reset/s on loopback cost {baseline:.2} % of one core; \
         the checker's own cost above it: {:.2} %",
        share - baseline
    );
    println!(
        "{BACKENDS} backends, every 5 s: {rate:.0} checks/s, proxy CPU {share:.2} % of one core \
         ({user:.2} % user, {system:.2} % system) over {secs:.1} s, {} threads, {failures} failed checks",
        threads(pid)
    );
    assert!(
        rate > BACKENDS as f64 / 5.0 * 0.8,
        "not every backend is checked: {rate}/s"
    );
    assert!(threads(pid) < 16, "a thread per check?");
    drop(rt);
}

/// CPU (% of one core) of one thread that connects to `ports` in turn at
/// `rate` per second for `span`, closing each with a reset.
fn bare_connects(ports: &[u16], rate: f64, span: Duration) -> f64 {
    let ports = ports.to_vec();
    std::thread::spawn(move || {
        let thread_cpu = || {
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: getrusage fills the struct we own.
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
            let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            t(ru.ru_utime) + t(ru.ru_stime)
        };
        let gap = Duration::from_secs_f64(1.0 / rate);
        let (start, cpu0) = (Instant::now(), thread_cpu());
        let mut next = start;
        let mut i = 0;
        while start.elapsed() < span {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], ports[i % ports.len()]));
            if let Ok(s) = std::net::TcpStream::connect(addr) {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
            i += 1;
            next += gap;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        (thread_cpu() - cpu0) / start.elapsed().as_secs_f64() * 100.0
    })
    .join()
    .unwrap()
}

/// The value of an unlabelled metric from the proxy's `/metrics` (0 when
/// absent).
fn scrape(metrics: std::net::SocketAddr, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    all.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap())
        .unwrap_or(0.0)
}
