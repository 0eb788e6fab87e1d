//! (p) Warm backend connections (`[pool]`, issue 15): how long a new client
//! of a far backend waits for its first answer through edgeproxy with and
//! without the pool, in the same run, what the pool costs the backend in
//! idle connections, and whether any client saw an error.
//!
//! Two network namespaces joined by a veth pair; every packet either side
//! sends waits [`ONE_WAY`] (50 ms, so a 100 ms round trip) in an NFQUEUE
//! (this kernel has no `tc netem`). edgeproxy (one shard, started for this
//! scenario) and the clients live in the first, the backend in the second.
//! The backend never speaks first: it answers a client's first line with one
//! line, then echoes. Two apps point at two ports of that backend; only
//! `warm` is in `pool.apps`, so both modes share the proxy, the link and the
//! moment. Clients arrive open-loop (new connections per second, alternating
//! modes); each measures connect → answer.
//!
//! Needs root (namespaces, iptables, NFQUEUE); without it the variant says
//! so and measures nothing.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::report::{col, Column, Sample, Variant};
use crate::targets::{Kind, Setup};
use crate::Options;

/// Each way between the proxy and the backend.
pub const ONE_WAY: Duration = Duration::from_millis(50);
const PROXY_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);

/// New clients per second (each mode) and measured seconds per run.
fn load(opts: &Options) -> (f64, Duration) {
    match opts.quick {
        true => (10.0, Duration::from_secs(3)),
        false => (20.0, Duration::from_secs(10)),
    }
}

const COLUMNS: &[Column] = &[
    col("pool_p50_ms", "pool p50 ms", true),
    col("pool_p99_ms", "pool p99 ms", true),
    col("fresh_p50_ms", "fresh p50 ms", true),
    col("fresh_p99_ms", "fresh p99 ms", true),
    col("p50_ratio", "p50 pool÷fresh", true),
    col("p99_ratio", "p99 pool÷fresh", true),
    col("client_errors", "pool client errors", true),
    col("fresh_client_errors", "fresh client errors", true),
    col("backend_idle_mean", "extra idle (mean)", true),
    col("backend_idle_max", "extra idle (max)", true),
    col("hits", "hits", false),
    col("misses", "misses", true),
    col("stale", "stale", true),
];

/// The scenario: `opts.runs` runs, each a fresh pair of namespaces and a
/// fresh edgeproxy.
pub fn far_backend(opts: &Options, setup: &Setup) -> Variant {
    let (rate, seconds) = load(opts);
    let mut v = Variant::new(
        "p_pool_far_backend",
        format!(
            "(p) warm backend connections: new clients of a backend {} ms RTT away, \
             {rate}/s per mode for {seconds:?}, connect → first answer, edgeproxy 1 shard, \
             pool on vs off in the same run, {} runs",
            2 * ONE_WAY.as_millis(),
            opts.runs
        ),
        COLUMNS,
    );
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        v.notes
            .push("not available: needs root (network namespaces, NFQUEUE)".into());
        return v;
    }
    for run in 0..opts.runs {
        let bin = setup.edgeproxy_bin.clone();
        let tag = format!("{}{run}", std::process::id() % 100_000);
        // The run's thread moves into the proxy's namespace for good; the
        // caller's thread stays where it is.
        let result = std::thread::spawn(move || one_run(&bin, &tag, rate, seconds))
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the run panicked")));
        match result {
            Ok(metrics) => v.samples.push(Sample {
                target: Kind::Edgeproxy,
                run,
                metrics,
                latency: None,
            }),
            Err(e) => v.notes.push(format!("run {}: failed: {e:#}", run + 1)),
        }
    }
    v.finish();
    v
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {args:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Two namespaces, `<tag>-a` (proxy) and `<tag>-b` (backend), every packet
/// leaving either held `delay`; removed on drop.
pub struct Net {
    pub proxy_ns: String,
    pub backend_ns: String,
    stop: Arc<AtomicBool>,
    delayers: Vec<std::thread::JoinHandle<()>>,
}

impl Net {
    pub fn new(tag: &str, delay: Duration) -> anyhow::Result<Net> {
        let mut net = Net {
            proxy_ns: format!("eppool{tag}-a"),
            backend_ns: format!("eppool{tag}-b"),
            stop: Arc::new(AtomicBool::new(false)),
            delayers: Vec::new(),
        };
        for ns in [&net.proxy_ns, &net.backend_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            sh(&["ip", "netns", "add", ns])?;
        }
        sh(&[
            "ip",
            "-n",
            &net.proxy_ns,
            "link",
            "add",
            "veth-a",
            "type",
            "veth",
            "peer",
            "name",
            "veth-b",
            "netns",
            &net.backend_ns,
        ])?;
        for (ns, dev, ip) in [
            (net.proxy_ns.clone(), "veth-a", PROXY_IP),
            (net.backend_ns.clone(), "veth-b", BACKEND_IP),
        ] {
            let cidr = format!("{ip}/24");
            sh(&["ip", "-n", &ns, "addr", "add", &cidr, "dev", dev])?;
            sh(&["ip", "-n", &ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "iptables",
                "-A",
                "OUTPUT",
                "-o",
                dev,
                "-j",
                "NFQUEUE",
                "--queue-num",
                "0",
                "--queue-bypass",
            ])?;
            net.delayers
                .push(delayer(&ns, delay, Arc::clone(&net.stop))?);
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for d in self.delayers.drain(..) {
            let _ = d.join();
        }
        for ns in [&self.proxy_ns, &self.backend_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Moves the calling thread (and threads it starts later) into `ns`.
pub fn enter(ns: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).context("namespace")?;
    // SAFETY: setns on a valid namespace fd, for this thread only.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    anyhow::ensure!(rc == 0, "setns {ns}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Holds every packet of `ns`'s queue 0 for `delay`, in order.
fn delayer(
    ns: &str,
    delay: Duration,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let ns = ns.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let opened = enter(&ns).and_then(|()| {
            let mut q = nfq::Queue::open().context("nfqueue")?;
            q.bind(0).context("bind nfqueue 0")?;
            q.set_nonblocking(true);
            Ok(q)
        });
        let mut q = match opened {
            Ok(q) => {
                let _ = ready_tx.send(Ok(()));
                q
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let mut held: std::collections::VecDeque<(Instant, nfq::Message)> = Default::default();
        while !stop.load(Relaxed) {
            let mut got = false;
            while let Ok(msg) = q.recv() {
                got = true;
                held.push_back((Instant::now() + delay, msg));
            }
            let now = Instant::now();
            while held.front().is_some_and(|(at, _)| *at <= now) {
                let (_, mut msg) = held.pop_front().unwrap();
                msg.set_verdict(nfq::Verdict::Accept);
                let _ = q.verdict(msg);
            }
            if !got {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        for (_, mut msg) in held {
            msg.set_verdict(nfq::Verdict::Accept);
            let _ = q.verdict(msg);
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("delayer did not start")??;
    Ok(t)
}

/// The far backend: answers the first line, then echoes. Counts the
/// connections it holds that never received a byte (pooled and waiting).
pub struct Backend {
    pub addr: SocketAddr,
    pub idle_open: Arc<AtomicIsize>,
    pub accepted: Arc<AtomicU64>,
}

pub fn backend(listener: TcpListener) -> Backend {
    let addr = listener.local_addr().unwrap();
    let idle_open = Arc::new(AtomicIsize::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let (idle, acc) = (Arc::clone(&idle_open), Arc::clone(&accepted));
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            acc.fetch_add(1, Relaxed);
            idle.fetch_add(1, Relaxed);
            let idle = Arc::clone(&idle);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let first = s.read(&mut buf);
                idle.fetch_sub(1, Relaxed);
                if !matches!(first, Ok(n) if n > 0) || s.write_all(b"ok\n").is_err() {
                    return;
                }
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Backend {
        addr,
        idle_open,
        accepted,
    }
}

/// One client: connect, send a line, wait for the answer. Microseconds.
pub fn client(to: SocketAddr) -> Result<u64, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /\n").map_err(|e| e.to_string())?;
    let mut got = [0u8; 3];
    s.read_exact(&mut got).map_err(|e| e.to_string())?;
    if &got != b"ok\n" {
        return Err(format!("answer {got:?}"));
    }
    Ok(start.elapsed().as_micros() as u64)
}

fn scrape(metrics: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(metrics).context("metrics")?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut all = String::new();
    s.read_to_string(&mut all)?;
    Ok(all)
}

/// An unlabelled metric's value (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

struct Mode {
    listener: SocketAddr,
    hist: Mutex<Histogram<u64>>,
    errors: AtomicU64,
}

/// Kills the proxy on every way out of a run.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One run, on a thread of its own (it enters the proxy's namespace).
fn one_run(
    bin: &std::path::Path,
    tag: &str,
    rate: f64,
    seconds: Duration,
) -> anyhow::Result<std::collections::BTreeMap<&'static str, f64>> {
    anyhow::ensure!(bin.exists(), "no edgeproxy binary at {}", bin.display());
    let net = Net::new(tag, ONE_WAY)?;
    let backend_ns = net.backend_ns.clone();
    let (warm_b, cold_b) = std::thread::spawn(move || -> anyhow::Result<_> {
        enter(&backend_ns)?;
        let bind = || TcpListener::bind((BACKEND_IP, 0));
        Ok((backend(bind()?), backend(bind()?)))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("backend thread panicked"))??;
    enter(&net.proxy_ns)?;
    let dir = std::env::temp_dir().join(format!("edgeproxy-perf-pool-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let result = measure(bin, &dir, &warm_b, &cold_b, rate, seconds);
    let _ = std::fs::remove_dir_all(&dir);
    drop(net);
    result
}

fn measure(
    bin: &std::path::Path,
    dir: &std::path::Path,
    warm_b: &Backend,
    cold_b: &Backend,
    rate: f64,
    seconds: Duration,
) -> anyhow::Result<std::collections::BTreeMap<&'static str, f64>> {
    let db = dir.join("routing.db");
    let conn = rusqlite::Connection::open(&db)?;
    conn.execute_batch(crate::targets::BACKENDS_TABLE)?;
    // Outside the POP's region ("sa"): warmed by the default `warm`.
    for (id, b) in [("warm", warm_b), ("cold", cold_b)] {
        conn.execute(
            "INSERT INTO backends (id, app, region, wg_ip, port) VALUES (?1, ?1, 'eu', ?2, ?3)",
            rusqlite::params![id, b.addr.ip().to_string(), b.addr.port()],
        )?;
    }
    drop(conn);
    // Inside a namespace of its own: fixed ports are free.
    let (warm_at, cold_at, metrics_at): (SocketAddr, SocketAddr, SocketAddr) = (
        "127.0.0.1:18001".parse()?,
        "127.0.0.1:18002".parse()?,
        "127.0.0.1:19090".parse()?,
    );
    let config = dir.join("edgeproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[pop]\nregion = \"sa\"\n[runtime]\nshards = 1\n[routing]\ndb_path = {db:?}\n\
             [affinity]\nttl_secs = 0\n[metrics]\nenabled = true\nlisten_addr = \"{metrics_at}\"\n\
             [pool]\nenabled = true\napps = [\"warm\"]\n\
             [[listener]]\nname = \"warm\"\naddr = \"{warm_at}\"\napp = \"warm\"\n\
             [[listener]]\nname = \"cold\"\naddr = \"{cold_at}\"\napp = \"cold\"\n",
            db = db.display().to_string()
        ),
    )?;
    let _proxy = Proxy(
        Command::new(bin)
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start edgeproxy")?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(cold_at).is_err() || TcpStream::connect(metrics_at).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "edgeproxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The first pooled socket: one round trip after the start.
    let deadline = Instant::now() + Duration::from_secs(10);
    while warm_b.idle_open.load(Relaxed) < 1 {
        anyhow::ensure!(Instant::now() < deadline, "the pool never warmed");
        std::thread::sleep(Duration::from_millis(20));
    }

    let before = scrape(metrics_at)?;
    let new_mode = |listener| {
        Arc::new(Mode {
            listener,
            hist: Mutex::new(crate::loadgen::new_histogram()),
            errors: AtomicU64::new(0),
        })
    };
    let modes = [new_mode(warm_at), new_mode(cold_at)];
    let gap = Duration::from_secs_f64(1.0 / rate / 2.0);
    let start = Instant::now();
    let mut next = start;
    let mut clients = Vec::new();
    let (mut idle_sum, mut idle_max, mut idle_n) = (0i64, 0isize, 0i64);
    let mut i = 0usize;
    while start.elapsed() < seconds {
        let mode = Arc::clone(&modes[i % 2]);
        i += 1;
        clients.push(std::thread::spawn(move || match client(mode.listener) {
            Ok(us) => {
                let _ = mode.hist.lock().unwrap().record(us);
            }
            Err(_) => {
                mode.errors.fetch_add(1, Relaxed);
            }
        }));
        // What the pool costs the backend: the connections it holds that
        // no client has used yet (the fresh app's backend holds none but
        // for a client's in-flight first line).
        let idle = warm_b.idle_open.load(Relaxed);
        idle_sum += idle as i64;
        idle_max = idle_max.max(idle);
        idle_n += 1;
        next += gap;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    for c in clients {
        let _ = c.join();
    }
    let after = scrape(metrics_at)?;
    let ms = |m: &Mode, q: f64| m.hist.lock().unwrap().value_at_quantile(q) as f64 / 1000.0;
    let (pool, fresh) = (&modes[0], &modes[1]);
    anyhow::ensure!(
        !pool.hist.lock().unwrap().is_empty() && !fresh.hist.lock().unwrap().is_empty(),
        "no client completed (errors: pool {}, fresh {})",
        pool.errors.load(Relaxed),
        fresh.errors.load(Relaxed)
    );
    let d = |name| metric(&after, name) - metric(&before, name);
    let mut m = std::collections::BTreeMap::new();
    m.insert("pool_p50_ms", ms(pool, 0.5));
    m.insert("pool_p99_ms", ms(pool, 0.99));
    m.insert("fresh_p50_ms", ms(fresh, 0.5));
    m.insert("fresh_p99_ms", ms(fresh, 0.99));
    m.insert("p50_ratio", ms(pool, 0.5) / ms(fresh, 0.5));
    m.insert("p99_ratio", ms(pool, 0.99) / ms(fresh, 0.99));
    m.insert("client_errors", pool.errors.load(Relaxed) as f64);
    m.insert("fresh_client_errors", fresh.errors.load(Relaxed) as f64);
    m.insert("clients_per_mode", pool.hist.lock().unwrap().len() as f64);
    m.insert("backend_idle_mean", idle_sum as f64 / idle_n.max(1) as f64);
    m.insert("backend_idle_max", idle_max as f64);
    m.insert("hits", d("edgeproxy_pool_hits_total"));
    m.insert("misses", d("edgeproxy_pool_misses_total"));
    m.insert("stale", d("edgeproxy_pool_stale_total"));
    m.insert("replayed", d("edgeproxy_pool_replayed_total"));
    m.insert("backend_accepts_pool", warm_b.accepted.load(Relaxed) as f64);
    m.insert(
        "backend_accepts_fresh",
        cold_b.accepted.load(Relaxed) as f64,
    );
    Ok(m)
}
