//! DNS benchmark: edgeproxy's internal DNS against Knot DNS (Debian `knot`)
//! serving an equivalent zone, measured by `dnsperf` in the same run,
//! alternately (edgeproxy, knot, edgeproxy, knot, ...).
//!
//! ```text
//! cargo build --release --bin edgeproxy
//! cargo run --release -p perf --bin dns-bench -- [--backends 1000] [--runs 3] [--duration 10]
//! ```
//!
//! Both servers listen on loopback and answer the same query mix from the
//! same data: a routing.db of `--backends` backends in `--apps` apps over
//! four regions, and for Knot a zone file with the records edgeproxy answers
//! for a loopback client (the `<app>` record is the backend edgeproxy's
//! scoring picks for it: the first one in the local region). Each run
//! measures, in this order: edgeproxy (defaults: one UDP worker thread per
//! core, under `SCHED_BATCH`), Knot with its defaults (one UDP worker
//! thread per core), edgeproxy with `udp_batch_scheduling = false`, Knot
//! started under `SCHED_BATCH` (what the policy alone gives any server) and
//! Knot with one UDP worker.
//!
//! `--busy-cores` measures what `udp_batch_scheduling` costs in latency
//! instead (no Knot, no dnsperf): one query every 2 ms from one client, to
//! edgeproxy with and without the policy, cores idle and every core busy.
//!
//! `--geodns` measures GeoDNS instead (no Knot): edgeproxy without a
//! `[geodns]` zone answering the internal mix, against edgeproxy with one
//! answering the internal mix and the GeoDNS mix (the zone's apex A/AAAA,
//! SOA, unknown names), every query with the same EDNS Client Subnet
//! (`-E`), alternately, in the same run.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;

#[derive(Parser, Debug)]
#[command(about = "edgeproxy internal DNS vs Knot DNS, measured with dnsperf")]
struct Args {
    /// Backends in routing.db.
    #[arg(long, default_value_t = 1000)]
    backends: usize,
    /// Apps the backends are spread over.
    #[arg(long, default_value_t = 100)]
    apps: usize,
    /// Measurements per server (alternating).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// dnsperf clients (-c): sockets, each with its own source port.
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// dnsperf outstanding queries (-q).
    #[arg(long, default_value_t = 200)]
    outstanding: u32,
    /// The edgeproxy binary (default: next to this one, or EDGEPROXY_BIN).
    #[arg(long)]
    edgeproxy_bin: Option<PathBuf>,
    #[arg(long, default_value = "knotd")]
    knotd: String,
    #[arg(long, default_value = "dnsperf")]
    dnsperf: String,
    /// Measure GeoDNS on against off instead of edgeproxy against Knot.
    #[arg(long)]
    geodns: bool,
    /// Measure what `udp_batch_scheduling` costs in latency instead: one
    /// query every 2 ms from one client, to edgeproxy with and without it,
    /// with the cores idle and with every core running a CPU-bound thread.
    #[arg(long)]
    busy_cores: bool,
}

/// The GeoDNS zone of `--geodns`, and the client subnet every query
/// carries there (200.160.2.0/24, Brazil) as dnsperf's `-E` option:
/// family 1, source /24, scope 0, three address bytes.
const GEO_ZONE: &str = "edge.example.com";
const ECS_OPTION: &str = "8:00011800c8a002";

const REGIONS: [(&str, &str); 4] = [("sa", "BR"), ("us", "US"), ("eu", "DE"), ("ap", "JP")];
const LOCAL_REGION: &str = "sa";
const TTL: u32 = 5;

struct Backend {
    id: String,
    app: String,
    region: &'static str,
    country: &'static str,
    ip: String,
    port: u16,
}

/// Deterministic table: backend i is in app i % apps, region i % 4; every
/// tenth backend is IPv6.
fn table(n: usize, apps: usize) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            let (region, country) = REGIONS[i % REGIONS.len()];
            let ip = if i % 10 == 9 {
                format!("fd00::{:x}", i + 1)
            } else {
                format!("10.{}.{}.{}", 1 + i / 62500, (i / 250) % 250, i % 250 + 1)
            };
            Backend {
                id: format!("b{i}"),
                app: format!("app{}", i % apps.max(1)),
                region,
                country,
                ip,
                port: 8000 + (i % 1000) as u16,
            }
        })
        .collect()
}

fn write_db(path: &Path, rows: &[Backend]) -> anyhow::Result<()> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(perf::targets::BACKENDS_TABLE)?;
    let tx = conn.unchecked_transaction()?;
    for b in rows {
        tx.execute(
            "INSERT INTO backends (id, app, region, country, wg_ip, port) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![b.id, b.app, b.region, b.country, b.ip, b.port],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The zone edgeproxy serves to a loopback client, as a Knot zone file.
fn zone_file(rows: &[Backend], pops: &[(&str, &str, &str)]) -> String {
    let mut z = String::new();
    let _ = writeln!(z, "$ORIGIN internal.\n$TTL {TTL}");
    let _ = writeln!(
        z,
        "@ SOA ns.internal. hostmaster.internal. 1 3600 600 86400 {TTL}\n@ NS ns.internal.\nns A 10.50.0.1"
    );
    let is_v6 = |b: &Backend| b.ip.contains(':');
    let mut apps: Vec<&str> = rows.iter().map(|b| b.app.as_str()).collect();
    apps.sort();
    apps.dedup();
    for app in apps {
        let of_app: Vec<&Backend> = rows.iter().filter(|b| b.app == app).collect();
        // edgeproxy's pick for a client with no location, no load: the
        // first backend (table order) in the local POP's region, per family.
        for v6 in [false, true] {
            let family: Vec<&&Backend> = of_app.iter().filter(|b| is_v6(b) == v6).collect();
            let best = family
                .iter()
                .find(|b| b.region == LOCAL_REGION)
                .or(family.first());
            if let Some(b) = best {
                let _ = writeln!(z, "{app} {} {}", if v6 { "AAAA" } else { "A" }, b.ip);
            }
        }
        for b in &of_app {
            let t = if is_v6(b) { "AAAA" } else { "A" };
            let _ = writeln!(z, "{}.{app} {t} {}", b.id, b.ip);
            let prio = match b.region {
                LOCAL_REGION => 2,
                _ => 3,
            };
            let _ = writeln!(z, "_{app}._tcp SRV {prio} 1 {} {}.{app}", b.port, b.id);
        }
    }
    for (region, _) in REGIONS {
        let mut ips: Vec<&Backend> = rows.iter().filter(|b| b.region == region).collect();
        ips.dedup_by(|a, b| a.ip == b.ip);
        for b in ips {
            let t = if is_v6(b) { "AAAA" } else { "A" };
            let _ = writeln!(z, "{region}.backends {t} {}", b.ip);
        }
    }
    for (_, region, addr) in pops {
        let _ = writeln!(z, "{region}.pops A {addr}");
    }
    z
}

const POPS: [(&str, &str, &str); 2] = [("gru-1", "sa", "10.50.0.1"), ("fra-1", "eu", "10.60.0.1")];

/// The query mix, the same for both servers: mostly `<app>` A, then AAAA,
/// SRV, backend names, a few region lists (large: truncated over UDP) and
/// unknown names.
fn queries(rows: &[Backend], apps: usize, n: usize) -> String {
    let mut q = String::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let app = format!("app{}", x as usize % apps.max(1));
        let line = match i % 20 {
            0..=11 => format!("{app}.internal A"),
            12 | 13 => format!("{app}.internal AAAA"),
            14 | 15 => format!("_{app}._tcp.internal SRV"),
            16 => format!(
                "{}.{}.internal A",
                rows[x as usize % rows.len()].id,
                rows[x as usize % rows.len()].app
            ),
            17 => format!("{}.pops.internal A", ["sa", "eu"][i % 2]),
            18 => format!("{}.backends.internal A", REGIONS[i % 4].0),
            _ => format!("nope{i}.internal A"),
        };
        q.push_str(&line);
        q.push('\n');
    }
    q
}

fn free_port() -> anyhow::Result<u16> {
    // A port free on both UDP and TCP right now.
    for _ in 0..20 {
        let u = UdpSocket::bind("127.0.0.1:0")?;
        let port = u.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port")
}

/// Waits until `addr` answers a DNS query.
fn wait_answering(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    // SOA query for internal., id 0x4242.
    let mut q = vec![0x42, 0x42, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x08internal\x00\x00\x06\x00\x01");
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        sock.send_to(&q, addr)?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n >= 12 && buf[0] == 0x42 && buf[3] & 0x0f == 0 {
                return Ok(());
            }
        }
    }
    bail!("{what} does not answer on {addr}")
}

struct Server {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a server's answering threads are scheduled.
#[derive(Clone, Copy, PartialEq)]
enum Policy {
    /// The default (`SCHED_OTHER`).
    Normal,
    /// `SCHED_BATCH` (edgeproxy's default for its UDP workers).
    Batch,
}

fn start_edgeproxy(
    bin: &Path,
    dir: &Path,
    name: &'static str,
    geodns: bool,
    policy: Policy,
) -> anyhow::Result<Server> {
    let cfg = dir.join(format!("{name}.toml"));
    let db = dir.join(format!("{name}.db"));
    std::fs::copy(dir.join("routing.db"), &db)?;
    let mut text = format!(
        "[routing]\ndb_path = {:?}\n[runtime]\nshards = 1\n[[listener]]\naddr = \"127.0.0.1:0\"\n[demo]\nbackends = 0\n[pop]\nregion = \"{LOCAL_REGION}\"\nname = \"gru-1\"\ncountry = \"BR\"\npublic_addrs = [\"203.0.113.10\", \"2001:db8::10\"]\n[dns]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\nttl_secs = {TTL}\nudp_batch_scheduling = {}\n",
        db.display().to_string(),
        policy == Policy::Batch
    );
    if geodns {
        let _ = write!(text, "[geodns]\nname = \"{GEO_ZONE}\"\n");
    }
    for (name, region, addr) in POPS {
        let _ = write!(
            text,
            "[[dns.pop]]\nname = \"{name}\"\nregion = \"{region}\"\naddr = \"{addr}\"\n"
        );
    }
    std::fs::write(&cfg, text)?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (cargo build --release --bin edgeproxy)",
                bin.display()
            )
        })?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.find(" udp=") {
                let addr = line[at + 5..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(20))
        .context("edgeproxy did not log `dns listening`")?
        .parse()?;
    let server = Server { name, addr, child };
    wait_answering(addr, "edgeproxy")?;
    Ok(server)
}

/// `workers`: `None` for Knot's defaults, else UDP, TCP and background
/// workers each.
fn start_knot(
    knotd: &str,
    dir: &Path,
    zone: &str,
    name: &'static str,
    workers: Option<u32>,
    policy: Policy,
) -> anyhow::Result<Server> {
    let kdir = dir.join(name);
    std::fs::create_dir_all(&kdir)?;
    std::fs::write(kdir.join("internal.zone"), zone)?;
    let port = free_port()?;
    let conf = format!(
        "server:\n    rundir: \"{d}\"\n    listen: 127.0.0.1@{port}\n{w}\
         control:\n    listen: \"{d}/knot.sock\"\n\
         database:\n    storage: \"{d}\"\n\
         log:\n  - target: stderr\n    any: warning\n\
         template:\n  - id: default\n    storage: \"{d}\"\n    semantic-checks: off\n\
         zone:\n  - domain: internal\n    file: \"{d}/internal.zone\"\n",
        d = kdir.display(),
        w = workers.map_or(String::new(), |n| format!(
            "    udp-workers: {n}\n    tcp-workers: {n}\n    background-workers: {n}\n"
        )),
    );
    let conf_path = kdir.join("knot.conf");
    std::fs::write(&conf_path, conf)?;
    let mut command = Command::new(knotd);
    if policy == Policy::Batch {
        // SAFETY: only an async-signal-safe system call between fork and
        // exec; the policy is inherited by every thread knotd starts.
        unsafe {
            command.pre_exec(|| {
                let param = libc::sched_param { sched_priority: 0 };
                if libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let child = command
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {knotd} (apt-get install knot)"))?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let server = Server { name, addr, child };
    wait_answering(addr, "knotd")?;
    Ok(server)
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

#[derive(Debug, Default, Clone)]
struct Measure {
    qps: f64,
    avg_ms: f64,
    stddev_ms: f64,
    max_ms: f64,
    lost_pct: f64,
    completed: u64,
    /// Server CPU time per completed query, microseconds.
    cpu_us: f64,
    /// dnsperf's CPU time per completed query, microseconds: the load
    /// generator shares the cores, so a server that makes it cheaper (fewer
    /// wake-ups) leaves it more CPU.
    client_cpu_us: f64,
    /// Server context switches per 1,000 completed queries.
    server_switches_per_k: f64,
    /// dnsperf's voluntary context switches (it waited: for a reply, or
    /// for room in its window) per 1,000 completed queries.
    client_waits_per_k: f64,
    /// dnsperf's involuntary context switches (preempted) per 1,000
    /// completed queries.
    client_preempted_per_k: f64,
    /// dnsperf's average response size, bytes: a server whose answers are
    /// larger costs the client (and the loopback) more per query.
    response_bytes: f64,
}

fn number_after(text: &str, key: &str) -> Option<f64> {
    let at = text.find(key)? + key.len();
    text[at..]
        .split_whitespace()
        .next()?
        .trim_matches(|c: char| c == '(' || c == ')' || c == '%' || c == ',')
        .parse()
        .ok()
}

fn dnsperf(args: &Args, addr: SocketAddr, data: &Path) -> anyhow::Result<Measure> {
    let ecs: &[&str] = if args.geodns {
        &["-E", ECS_OPTION]
    } else {
        &[]
    };
    let before = children_usage();
    let out = Command::new(&args.dnsperf)
        .args(ecs)
        .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .arg("-d")
        .arg(data)
        .args(["-l", &args.duration.to_string()])
        .args(["-c", &args.clients.to_string()])
        .args(["-q", &args.outstanding.to_string()])
        .args(["-T", "1", "-t", "2"])
        .output()
        .with_context(|| format!("cannot run {} (apt-get install dnsperf)", args.dnsperf))?;
    let client = children_usage().since(&before);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let completed = number_after(&text, "Queries completed:").unwrap_or(0.0) as u64;
    // Per-query figures divide by it (never by zero: none answered is an
    // error the caller reports).
    let answered = completed.max(1) as f64;
    let qps = number_after(&text, "Queries per second:")
        .with_context(|| format!("unexpected dnsperf output:\n{text}"))?;
    let avg = number_after(&text, "Average Latency (s):").unwrap_or(f64::NAN);
    let max = text
        .find("Average Latency (s):")
        .and_then(|at| number_after(&text[at..], "max"))
        .unwrap_or(f64::NAN);
    Ok(Measure {
        qps,
        avg_ms: avg * 1e3,
        stddev_ms: number_after(&text, "Latency StdDev (s):").unwrap_or(f64::NAN) * 1e3,
        max_ms: max * 1e3,
        lost_pct: text
            .find("Queries lost:")
            .and_then(|at| text[at..].find('(').map(|p| at + p))
            .and_then(|p| number_after(&text[p - 1..], " "))
            .unwrap_or(0.0),
        completed,
        cpu_us: f64::NAN,
        client_cpu_us: client.cpu.as_secs_f64() * 1e6 / answered,
        server_switches_per_k: f64::NAN,
        client_waits_per_k: client.voluntary_switches as f64 * 1e3 / answered,
        client_preempted_per_k: client.involuntary_switches as f64 * 1e3 / answered,
        response_bytes: text
            .find("Average packet size:")
            .and_then(|at| number_after(&text[at..], "response"))
            .unwrap_or(f64::NAN),
    })
}

/// What the child processes waited for so far used (dnsperf is the only
/// child this program waits for while measuring).
#[derive(Debug, Default, Clone, Copy)]
struct ChildrenUsage {
    /// User + system time.
    cpu: Duration,
    voluntary_switches: u64,
    involuntary_switches: u64,
}

impl ChildrenUsage {
    fn since(&self, before: &ChildrenUsage) -> ChildrenUsage {
        ChildrenUsage {
            cpu: self.cpu.saturating_sub(before.cpu),
            voluntary_switches: self
                .voluntary_switches
                .saturating_sub(before.voluntary_switches),
            involuntary_switches: self
                .involuntary_switches
                .saturating_sub(before.involuntary_switches),
        }
    }
}

fn children_usage() -> ChildrenUsage {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return ChildrenUsage::default();
    }
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    ChildrenUsage {
        cpu: Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime)),
        voluntary_switches: usage.ru_nvcsw as u64,
        involuntary_switches: usage.ru_nivcsw as u64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = args
        .edgeproxy_bin
        .clone()
        .unwrap_or_else(perf::default_edgeproxy_bin);
    let dir = std::env::temp_dir().join(format!("edgeproxy-dns-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&args, &bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(args: &Args, bin: &Path, dir: &Path) -> anyhow::Result<()> {
    let rows = table(args.backends, args.apps);
    write_db(&dir.join("routing.db"), &rows)?;
    let data = dir.join("queries.txt");
    std::fs::write(&data, queries(&rows, args.apps, 10_000))?;
    if args.geodns {
        return run_geodns(args, bin, dir, &data);
    }
    if args.busy_cores {
        return run_busy_cores(args, bin, dir);
    }
    let edge = start_edgeproxy(bin, dir, "edgeproxy", false, Policy::Batch)?;
    let edge_normal = start_edgeproxy(bin, dir, "edgeproxy-normal", false, Policy::Normal)?;
    let zone = zone_file(&rows, &POPS);
    let knot = start_knot(&args.knotd, dir, &zone, "knot", None, Policy::Normal)?;
    let knot_batch = start_knot(&args.knotd, dir, &zone, "knot-batch", None, Policy::Batch)?;
    let knot1 = start_knot(
        &args.knotd,
        dir,
        &zone,
        "knot-1-worker",
        Some(1),
        Policy::Normal,
    )?;

    println!("# edgeproxy internal DNS vs Knot DNS (dnsperf, loopback)");
    println!(
        "# {} backends in {} apps; {} runs x {} s each, alternating; dnsperf -c {} -q {} -T 1",
        args.backends, args.apps, args.runs, args.duration, args.clients, args.outstanding
    );
    println!(
        "# knotd: {}; dnsperf: {}",
        version(&args.knotd, "--version"),
        version(&args.dnsperf, "-h").replace("Usage: ", "")
    );
    println!(
        "# cores: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| run | server | queries/s | avg latency ms | stddev ms | max ms | lost % | server CPU µs/query | dnsperf CPU µs/query | server switches /1k queries | dnsperf waits /1k | dnsperf preempted /1k | avg response bytes |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut results: Vec<(&'static str, Measure)> = Vec::new();
    for run in 1..=args.runs {
        for server in [&edge, &knot, &edge_normal, &knot_batch, &knot1] {
            let pid = server.child.id();
            let before = perf::procfs::cpu(pid);
            let mut m = dnsperf(args, server.addr, &data)?;
            let used = perf::procfs::cpu(pid).since(&before);
            let completed = m.completed.max(1) as f64;
            m.cpu_us = used.total().as_secs_f64() * 1e6 / completed;
            m.server_switches_per_k = used.ctx_switches as f64 * 1e3 / completed;
            println!(
                "| {run} | {} | {:.0} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} |",
                server.name,
                m.qps,
                m.avg_ms,
                m.stddev_ms,
                m.max_ms,
                m.lost_pct,
                m.cpu_us,
                m.client_cpu_us,
                m.server_switches_per_k,
                m.client_waits_per_k,
                m.client_preempted_per_k,
                m.response_bytes
            );
            if m.completed == 0 {
                bail!("{} answered nothing", server.name);
            }
            results.push((server.name, m));
        }
    }
    let series = |name: &str, f: fn(&Measure) -> f64| -> Vec<f64> {
        results
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, m)| f(m))
            .collect()
    };
    let pick = |name: &str, f: fn(&Measure) -> f64| median(series(name, f));
    println!();
    println!("| median | queries/s | avg latency ms | server CPU µs/query | dnsperf CPU µs/query | server switches /1k queries | dnsperf waits /1k | dnsperf preempted /1k | avg response bytes |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for name in [
        "edgeproxy",
        "knot",
        "edgeproxy-normal",
        "knot-batch",
        "knot-1-worker",
    ] {
        println!(
            "| {name} | {:.0} | {:.3} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} |",
            pick(name, |m| m.qps),
            pick(name, |m| m.avg_ms),
            pick(name, |m| m.cpu_us),
            pick(name, |m| m.client_cpu_us),
            pick(name, |m| m.server_switches_per_k),
            pick(name, |m| m.client_waits_per_k),
            pick(name, |m| m.client_preempted_per_k),
            pick(name, |m| m.response_bytes)
        );
    }
    println!();
    for (ours, peer) in [
        ("edgeproxy", "knot"),
        ("edgeproxy", "knot-batch"),
        ("edgeproxy", "knot-1-worker"),
        ("edgeproxy-normal", "knot"),
    ] {
        println!(
            "{ours}/{peer}: queries/s x{:.2}, avg latency x{:.2}, CPU per query x{:.2}, dnsperf CPU per query x{:.2}",
            pick(ours, |m| m.qps) / pick(peer, |m| m.qps),
            pick(ours, |m| m.avg_ms) / pick(peer, |m| m.avg_ms),
            pick(ours, |m| m.cpu_us) / pick(peer, |m| m.cpu_us),
            pick(ours, |m| m.client_cpu_us) / pick(peer, |m| m.client_cpu_us),
        );
    }
    // The goal is per series, not only the median.
    let per_run: Vec<String> = series("edgeproxy", |m| m.qps)
        .iter()
        .zip(series("knot", |m| m.qps))
        .map(|(ours, knot)| format!("x{:.2}", ours / knot))
        .collect();
    println!("edgeproxy/knot queries/s per run: {}", per_run.join(" "));
    Ok(())
}

/// The GeoDNS mix: mostly the apex A, some AAAA, SOA and unknown names.
fn geodns_queries(n: usize) -> String {
    let mut q = String::new();
    for i in 0..n {
        let line = match i % 20 {
            0..=14 => format!("{GEO_ZONE} A"),
            15 | 16 => format!("{GEO_ZONE} AAAA"),
            17 => format!("{GEO_ZONE} SOA"),
            _ => format!("nope{i}.{GEO_ZONE} A"),
        };
        q.push_str(&line);
        q.push('\n');
    }
    q
}

/// `--geodns`: the same server with and without a GeoDNS zone.
fn run_geodns(args: &Args, bin: &Path, dir: &Path, internal: &Path) -> anyhow::Result<()> {
    let geo_data = dir.join("geodns-queries.txt");
    std::fs::write(&geo_data, geodns_queries(10_000))?;
    let off = start_edgeproxy(bin, dir, "edgeproxy", false, Policy::Batch)?;
    let on = start_edgeproxy(bin, dir, "edgeproxy+geodns", true, Policy::Batch)?;
    println!("# edgeproxy DNS with GeoDNS off and on (dnsperf, loopback, ECS on every query)");
    println!(
        "# {} backends in {} apps; {} runs x {} s each, alternating; dnsperf -c {} -q {} -T 1 -E {ECS_OPTION}",
        args.backends, args.apps, args.runs, args.duration, args.clients, args.outstanding
    );
    println!(
        "# cores: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| run | server | mix | queries/s | avg latency ms | lost % | server CPU µs/query |");
    println!("|---|---|---|---|---|---|---|");
    let cases: [(&Server, &str, &Path); 3] = [
        (&off, "internal", internal),
        (&on, "internal", internal),
        (&on, "geodns", &geo_data),
    ];
    let mut results: Vec<(usize, Measure)> = Vec::new();
    for run in 1..=args.runs {
        for (i, (server, mix, data)) in cases.iter().enumerate() {
            let pid = server.child.id();
            let before = perf::procfs::cpu(pid);
            let mut m = dnsperf(args, server.addr, data)?;
            let cpu = perf::procfs::cpu(pid).since(&before).total();
            m.cpu_us = cpu.as_secs_f64() * 1e6 / (m.completed.max(1) as f64);
            println!(
                "| {run} | {} | {mix} | {:.0} | {:.3} | {:.2} | {:.2} |",
                server.name, m.qps, m.avg_ms, m.lost_pct, m.cpu_us
            );
            if m.completed == 0 {
                bail!("{} answered nothing", server.name);
            }
            results.push((i, m));
        }
    }
    let pick = |case: usize, f: fn(&Measure) -> f64| {
        median(
            results
                .iter()
                .filter(|(c, _)| *c == case)
                .map(|(_, m)| f(m))
                .collect(),
        )
    };
    println!();
    println!("| median | queries/s | avg latency ms | server CPU µs/query |");
    println!("|---|---|---|---|");
    for (i, label) in [
        "GeoDNS off, internal mix",
        "GeoDNS on, internal mix",
        "GeoDNS on, GeoDNS mix",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "| {label} | {:.0} | {:.3} | {:.2} |",
            pick(i, |m| m.qps),
            pick(i, |m| m.avg_ms),
            pick(i, |m| m.cpu_us)
        );
    }
    println!();
    for (i, label) in [(1, "internal mix"), (2, "GeoDNS mix")] {
        println!(
            "GeoDNS on ({label}) / off: queries/s x{:.2}, CPU per query x{:.2}",
            pick(i, |m| m.qps) / pick(0, |m| m.qps),
            pick(i, |m| m.cpu_us) / pick(0, |m| m.cpu_us),
        );
    }
    Ok(())
}

/// `--busy-cores`: the latency of single paced queries to edgeproxy with
/// its UDP workers under `SCHED_BATCH` and under the default policy, with
/// the cores idle and with one CPU-bound spinning thread per core (the
/// worst case for `SCHED_BATCH`: a woken worker waits for the spinner's
/// turn to end instead of preempting it).
fn run_busy_cores(args: &Args, bin: &Path, dir: &Path) -> anyhow::Result<()> {
    let batch = start_edgeproxy(bin, dir, "edgeproxy", false, Policy::Batch)?;
    let normal = start_edgeproxy(bin, dir, "edgeproxy-normal", false, Policy::Normal)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# edgeproxy DNS latency, SCHED_BATCH workers against the default policy");
    println!(
        "# one client, one `app0.internal A` query every 2 ms, {} s per measurement, {} runs; busy = {cores} spinning threads (one per core)",
        args.duration, args.runs
    );
    println!();
    println!("| run | cores | server | answered | lost | p50 µs | p90 µs | p99 µs | max µs |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut p99: Vec<(&'static str, bool, f64)> = Vec::new();
    for run in 1..=args.runs {
        for busy in [false, true] {
            for server in [&batch, &normal] {
                let spinners = busy.then(|| Spinners::start(cores));
                let lat = paced_latencies(server.addr, Duration::from_secs(args.duration))?;
                drop(spinners);
                let at = |q: f64| lat.answered_us.value_at_quantile(q);
                println!(
                    "| {run} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    if busy { "busy" } else { "idle" },
                    server.name,
                    lat.answered_us.len(),
                    lat.lost,
                    at(0.5),
                    at(0.9),
                    at(0.99),
                    lat.answered_us.max(),
                );
                p99.push((server.name, busy, at(0.99) as f64));
            }
        }
    }
    println!();
    for busy in [false, true] {
        let median_of = |name: &str| {
            median(
                p99.iter()
                    .filter(|(n, b, _)| *n == name && *b == busy)
                    .map(|(_, _, v)| *v)
                    .collect(),
            )
        };
        println!(
            "cores {}: p99 µs, median of runs: SCHED_BATCH {:.0}, default policy {:.0}",
            if busy { "busy" } else { "idle" },
            median_of("edgeproxy"),
            median_of("edgeproxy-normal"),
        );
    }
    Ok(())
}

/// One CPU-bound thread per core until dropped.
struct Spinners {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Spinners {
    fn start(n: usize) -> Spinners {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Spinners { stop, threads }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Latencies {
    /// Microseconds from send to answer.
    answered_us: Histogram<u64>,
    lost: usize,
}

/// Sends `app0.internal A` every 2 ms for `length`, one at a time, and
/// times each answer (1 s without one counts as lost).
fn paced_latencies(addr: SocketAddr, length: Duration) -> anyhow::Result<Latencies> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut query = Vec::with_capacity(64);
    let mut answered_us = Histogram::<u64>::new(3)?;
    let mut lost = 0;
    let mut reply = [0u8; 4096];
    let end = Instant::now() + length;
    let mut id: u16 = 0;
    while Instant::now() < end {
        id = id.wrapping_add(1);
        query.clear();
        query.extend_from_slice(&id.to_be_bytes());
        query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in ["app0", "internal"] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        let sent = Instant::now();
        socket.send(&query)?;
        loop {
            match socket.recv(&mut reply) {
                Ok(n) if n >= 2 && reply[..2] == id.to_be_bytes() => {
                    answered_us.saturating_record(sent.elapsed().as_micros() as u64);
                    break;
                }
                Ok(_) => continue, // a late answer to an earlier query
                Err(_) => {
                    lost += 1;
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Latencies { answered_us, lost })
}
