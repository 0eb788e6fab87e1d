//! Warm backend connections (`[pool]`, issue 15): how long a new client of
//! a far backend waits for its first answer with and without the pool, in
//! the same run, and what the pool costs the backend in idle connections.
//!
//! Two network namespaces joined by a veth pair; every packet either side
//! sends waits `--delay-ms` (default 50 ms, so a 100 ms round trip) in an
//! NFQUEUE (this kernel has no `tc netem`). edgeproxy (one shard) and the
//! clients live in the first, the backend in the second. The backend never
//! speaks first: it answers a client's first line with one line, then
//! echoes. Two apps point at two ports of that backend; only `warm` is in
//! `pool.apps`, so both modes share the proxy, the link and the moment.
//! Clients arrive open-loop at each `--rates` value (new connections per
//! second, per mode, alternating modes); each measures connect → answer.
//!
//! Needs root (namespaces, iptables). Build both binaries first:
//!
//! ```sh
//! cargo build --release -p edgeproxy -p perf
//! sudo target/release/pool-latency [--rates 2,20] [--seconds 15] [--delay-ms 50]
//! ```

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

const NS_PROXY: &str = "eppool-a";
const NS_BACKEND: &str = "eppool-b";
const PROXY_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);

struct Args {
    rates: Vec<f64>,
    seconds: f64,
    delay: Duration,
    edgeproxy: std::path::PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        rates: vec![2.0, 20.0],
        seconds: 15.0,
        delay: Duration::from_millis(50),
        edgeproxy: perf::default_edgeproxy_bin(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--rates" => {
                a.rates = value()
                    .split(',')
                    .map(|r| r.parse().expect("--rates: numbers"))
                    .collect()
            }
            "--seconds" => a.seconds = value().parse().expect("--seconds: a number"),
            "--delay-ms" => a.delay = Duration::from_millis(value().parse().expect("--delay-ms")),
            "--edgeproxy" => a.edgeproxy = value().into(),
            "-h" | "--help" => {
                println!(
                    "usage: pool-latency [--rates 2,20] [--seconds 15] [--delay-ms 50] [--edgeproxy PATH]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?} (see --help)"),
        }
    }
    a
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The two namespaces, removed on drop.
struct Net {
    stop: Arc<AtomicBool>,
    delayers: Vec<std::thread::JoinHandle<()>>,
}

impl Net {
    fn new(delay: Duration) -> Net {
        for ns in [NS_PROXY, NS_BACKEND] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            sh(&["ip", "netns", "add", ns]);
        }
        sh(&[
            "ip", "-n", NS_PROXY, "link", "add", "veth-a", "type", "veth", "peer", "name",
            "veth-b", "netns", NS_BACKEND,
        ]);
        let stop = Arc::new(AtomicBool::new(false));
        let mut delayers = Vec::new();
        for (ns, dev, ip) in [
            (NS_PROXY, "veth-a", PROXY_IP),
            (NS_BACKEND, "veth-b", BACKEND_IP),
        ] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
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
            ]);
            delayers.push(delayer(ns, delay, Arc::clone(&stop)));
        }
        Net { stop, delayers }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for d in self.delayers.drain(..) {
            let _ = d.join();
        }
        for ns in [NS_PROXY, NS_BACKEND] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Moves the calling thread (and threads it starts later) into `ns`.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("namespace");
    // SAFETY: setns on a valid namespace fd, for this thread only.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// Holds every packet of `ns`'s queue 0 for `delay`, in order.
fn delayer(ns: &str, delay: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let ns = ns.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        enter(&ns);
        let mut q = nfq::Queue::open().expect("nfqueue");
        q.bind(0).expect("bind nfqueue 0");
        q.set_nonblocking(true);
        let _ = ready_tx.send(());
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
        .expect("delayer did not start");
    t
}

/// The far backend: answers the first line, then echoes. Counts the
/// connections it holds that never received a byte (pooled and waiting).
struct Backend {
    addr: SocketAddr,
    idle_open: Arc<AtomicIsize>,
    accepted: Arc<AtomicU64>,
}

fn backend(listener: TcpListener) -> Backend {
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
fn client(to: SocketAddr) -> Result<u64, String> {
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

fn scrape(metrics: SocketAddr) -> String {
    let mut s = TcpStream::connect(metrics).expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    all
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

struct Mode {
    name: &'static str,
    listener: SocketAddr,
    hist: Mutex<Histogram<u64>>,
    errors: AtomicU64,
}

fn main() {
    let a = args();
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("pool-latency builds network namespaces: run it as root");
        std::process::exit(2);
    }
    assert!(
        a.edgeproxy.exists(),
        "no edgeproxy binary at {} (cargo build --release, or --edgeproxy)",
        a.edgeproxy.display()
    );
    let net = Net::new(a.delay);
    let (warm_b, cold_b) = std::thread::spawn(|| {
        enter(NS_BACKEND);
        let bind = || TcpListener::bind((BACKEND_IP, 0)).unwrap();
        (backend(bind()), backend(bind()))
    })
    .join()
    .unwrap();
    // From here on this thread (and every thread it starts) is in the
    // proxy's namespace.
    enter(NS_PROXY);
    let dir = std::env::temp_dir().join(format!("pool-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("routing.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE backends (id TEXT PRIMARY KEY, app TEXT NOT NULL, region TEXT NOT NULL,
         country TEXT, wg_ip TEXT NOT NULL, port INTEGER NOT NULL, healthy INTEGER NOT NULL DEFAULT 1,
         weight INTEGER NOT NULL DEFAULT 1, soft_limit INTEGER NOT NULL DEFAULT 100,
         hard_limit INTEGER NOT NULL DEFAULT 150, deleted INTEGER NOT NULL DEFAULT 0)",
    )
    .unwrap();
    for (id, b) in [("warm", &warm_b), ("cold", &cold_b)] {
        conn.execute(
            "INSERT INTO backends (id, app, region, wg_ip, port) VALUES (?1, ?1, 'eu', ?2, ?3)",
            rusqlite::params![id, b.addr.ip().to_string(), b.addr.port()],
        )
        .unwrap();
    }
    let (warm_at, cold_at, metrics_at): (SocketAddr, SocketAddr, SocketAddr) = (
        "127.0.0.1:18001".parse().unwrap(),
        "127.0.0.1:18002".parse().unwrap(),
        "127.0.0.1:19090".parse().unwrap(),
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
    )
    .unwrap();
    let mut proxy: Child = Command::new(&a.edgeproxy)
        .args(["--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start edgeproxy");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(cold_at).is_err() || TcpStream::connect(metrics_at).is_err() {
        assert!(Instant::now() < deadline, "edgeproxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Warm-up: the first pooled socket.
    std::thread::sleep(Duration::from_millis(1000));

    println!(
        "far backend: {} ms each way ({} ms RTT); edgeproxy 1 shard; {} s per rate; time from connect to the first answer",
        a.delay.as_millis(),
        2 * a.delay.as_millis(),
        a.seconds
    );
    println!(
        "{:>8} {:>6} {:>7} {:>9} {:>9} {:>9} {:>7} {:>9} {:>12}",
        "rate/s",
        "mode",
        "clients",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "p50 ratio",
        "backend idle"
    );
    for &rate in &a.rates {
        let before = scrape(metrics_at);
        let modes = [
            Arc::new(Mode {
                name: "pool",
                listener: warm_at,
                hist: Mutex::new(perf::loadgen::new_histogram()),
                errors: AtomicU64::new(0),
            }),
            Arc::new(Mode {
                name: "fresh",
                listener: cold_at,
                hist: Mutex::new(perf::loadgen::new_histogram()),
                errors: AtomicU64::new(0),
            }),
        ];
        let gap = Duration::from_secs_f64(1.0 / rate / 2.0);
        let start = Instant::now();
        let mut next = start;
        let mut clients = Vec::new();
        let (mut idle_sum, mut idle_max, mut idle_n) = (0i64, 0isize, 0i64);
        let mut i = 0usize;
        while start.elapsed().as_secs_f64() < a.seconds {
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
        let after = scrape(metrics_at);
        let p50 = |m: &Mode| m.hist.lock().unwrap().value_at_quantile(0.5) as f64 / 1000.0;
        let ratio = p50(&modes[0]) / p50(&modes[1]);
        for m in &modes {
            let h = m.hist.lock().unwrap();
            let idle = match m.name {
                "pool" => format!("{:.1} (max {idle_max})", idle_sum as f64 / idle_n as f64),
                _ => "0".into(),
            };
            println!(
                "{:>8} {:>6} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>9} {:>12}",
                rate,
                m.name,
                h.len(),
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.9) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                m.errors.load(Relaxed),
                if m.name == "pool" {
                    format!("{ratio:.2}x")
                } else {
                    "1".into()
                },
                idle
            );
        }
        let d = |name| metric(&after, name) - metric(&before, name);
        println!(
            "{:>8} pool hits {} misses {} stale {} (replayed {}); backend accepts: warm app {}, fresh app {}",
            "",
            d("edgeproxy_pool_hits_total"),
            d("edgeproxy_pool_misses_total"),
            d("edgeproxy_pool_stale_total"),
            d("edgeproxy_pool_replayed_total"),
            warm_b.accepted.load(Relaxed),
            cold_b.accepted.load(Relaxed),
        );
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}
