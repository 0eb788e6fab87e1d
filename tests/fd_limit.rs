//! The connection limit follows the open-files limit (RLIMIT_NOFILE),
//! through the real binary started with a low `ulimit -n` (prlimit): the
//! soft limit is raised to the hard one and logged, and clients beyond what
//! the descriptors can serve wait in the kernel's accept queue and are
//! served later — none is accepted and then closed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The proxy under `prlimit --nofile=SOFT:HARD`, one listener, two shards.
fn start_limited(dir: &TempDir, backend: &TagBackend, soft: u64, hard: u64) -> Proxy {
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("b1", "web", "sa", backend.port()));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(&path, config(&db.path, "")).unwrap();
    spawn_limited(&path, soft, hard)
}

/// The proxy on the configuration at `path`, under `prlimit
/// --nofile=SOFT:HARD`, once ready.
fn spawn_limited(path: &std::path::Path, soft: u64, hard: u64) -> Proxy {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={soft}:{hard}")).arg(BIN);
    Proxy::spawn_command(
        cmd,
        &["--config", path.to_str().unwrap()],
        &[],
        Some("info"),
    )
    .ready()
}

#[test]
fn the_soft_limit_is_raised_to_the_hard_limit_and_logged() {
    let dir = TempDir::new("fd-raise");
    let backend = TagBackend::start("b1");
    let proxy = start_limited(&dir, &backend, 200, 900);
    let raised = proxy
        .wait_for_log("open files limit raised to the hard limit", PATIENCE)
        .unwrap_or_else(|| panic!("{}", proxy.log_text()));
    assert_eq!(field(&raised, "from").as_deref(), Some("200"), "{raised}");
    assert_eq!(field(&raised, "to").as_deref(), Some("900"), "{raised}");
    let limit = proxy
        .wait_for_log(
            "connection limit derived from the open files limit",
            PATIENCE,
        )
        .unwrap();
    assert_eq!(field(&limit, "open_files").as_deref(), Some("900"));
    let reserved: u64 = field(&limit, "reserved").unwrap().parse().unwrap();
    let max: u64 = field(&limit, "max_connections").unwrap().parse().unwrap();
    assert_eq!(max, (900 - reserved) / 2, "{limit}");
    // What the process really has now.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["900", "900"],
        "{open_files}"
    );
}

/// Reads what is there without blocking: `Some(bytes)` once data came,
/// panics if the proxy closed the connection, `None` while it waits.
fn poll_greeting(stream: &TcpStream) -> Option<Vec<u8>> {
    let mut buf = [0u8; 64];
    match (&*stream).read(&mut buf) {
        Ok(0) => panic!("a client was accepted and then closed"),
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("a client was accepted and then closed: {e}"),
    }
}

#[test]
fn out_of_descriptors_clients_wait_in_the_queue_and_are_served() {
    let dir = TempDir::new("fd-queue");
    let backend = TagBackend::start("b1");
    let proxy = start_limited(&dir, &backend, 256, 256);
    let line = proxy
        .wait_for_log(
            "connection limit derived from the open files limit",
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("{}", proxy.log_text()));
    let max: usize = field(&line, "max_connections").unwrap().parse().unwrap();
    assert!(max < 128, "256 descriptors cannot serve {max} connections");

    // More clients than that, all at once: connect(2) completes in the
    // kernel's accept queue whether or not the proxy accepts.
    let total = max + 40;
    let clients: Vec<TcpStream> = (0..total)
        .map(|_| {
            let s = TcpStream::connect(proxy.addr()).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut greeted = vec![false; total];
    let poll_all = |greeted: &mut Vec<bool>| {
        for (i, c) in clients.iter().enumerate() {
            if !greeted[i] && poll_greeting(c).is_some() {
                greeted[i] = true;
            }
        }
        greeted.iter().filter(|g| **g).count()
    };
    // The limit's worth are served...
    let deadline = Instant::now() + PATIENCE;
    while poll_all(&mut greeted) < max {
        assert!(
            Instant::now() < deadline,
            "only {} served",
            poll_all(&mut greeted)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // ...and the rest wait, open (a pending accept per shard may hold one
    // client each, unserved).
    let settle = Instant::now() + QUEUED;
    while Instant::now() < settle {
        let served = poll_all(&mut greeted);
        assert!(served <= max, "{served} served with a limit of {max}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = proxy.log_text();
    assert!(!log.contains("accept failed"), "{log}");

    // Served clients leave; every waiting one is served in turn.
    let mut clients = clients;
    let served_first: Vec<usize> = (0..total).filter(|i| greeted[*i]).collect();
    for i in served_first.iter().rev() {
        clients.remove(*i);
    }
    let mut greeted = vec![false; clients.len()];
    let deadline = Instant::now() + PATIENCE;
    loop {
        let served = clients
            .iter()
            .enumerate()
            .filter(|(i, c)| greeted[*i] || poll_greeting(c).is_some())
            .map(|(i, _)| i)
            .collect::<Vec<_>>();
        for i in served {
            greeted[i] = true;
        }
        if greeted.iter().all(|g| *g) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} waiting clients never served",
            greeted.iter().filter(|g| !**g).count(),
            clients.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(backend.accepted(), total);
}

/// With the limit lifted (`max_connections = 0`) the proxy can still run
/// out of descriptors: accept then fails with EMFILE and backs off 100 ms.
/// That is said at most once per 10 s per shard and listener (with a
/// count), not ten times a second (before: ~20 lines/s on two shards).
#[test]
fn accept_failures_out_of_descriptors_are_rate_limited() {
    let dir = TempDir::new("fd-emfile");
    let backend = TagBackend::start("b1");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("b1", "web", "sa", backend.port()));
    let path = dir.join("edgeproxy.toml");
    // The clients connect to a listener that waits for a PROXY header, so
    // each holds exactly one descriptor and none reaches a backend: accept(2)
    // is what runs out, never the backend's socket(2). (With a plain listener
    // the two race, and when the backend's socket fails first the client is
    // closed, its descriptor freed, and accept never fails.)
    std::fs::write(
        &path,
        config(
            &db.path,
            "[limits]\nmax_connections = 0\n\n[[listener]]\nname = \"main\"\n\
             addr = \"127.0.0.1:0\"\naccept_proxy_protocol = true\n",
        ),
    )
    .unwrap();
    let proxy = spawn_limited(&path, 128, 128);
    // Unlimited is a warning: the descriptors cannot serve that.
    assert!(
        proxy
            .log_text()
            .contains("above what the open files limit can serve"),
        "{}",
        proxy.log_text()
    );
    // Far more clients than 128 descriptors hold.
    let clients: Vec<TcpStream> = (0..150)
        .map(|_| TcpStream::connect(proxy.addr()).unwrap())
        .collect();
    let first = proxy
        .wait_for_log("accept failed", PATIENCE)
        .unwrap_or_else(|| panic!("never out of descriptors:\n{}", proxy.log_text()));
    assert!(first.contains("Too many open files"), "{first}");
    // Twenty-five backoffs per shard later: still one line each at most.
    std::thread::sleep(Duration::from_millis(2500));
    let lines = proxy.log_lines_after(0, "accept failed");
    assert!(lines.len() <= 2, "{} lines:\n{lines:#?}", lines.len());
    drop(clients);
}

/// QA: warm pool sockets were not counted in the descriptor reserve. Under
/// `ulimit -n 256` with 40 warmed backends the pool held 80 sockets at once
/// (one per backend per shard) out of the descriptors the derived
/// connection limit had promised to clients: clients within that limit
/// were accepted and closed (no descriptor for their backend), and health
/// checks could not run. The pool now holds at most what is set aside for
/// it.
#[test]
fn warm_pool_sockets_never_take_the_descriptors_clients_and_checks_need() {
    let dir = TempDir::new("fd-pool");
    let backends: Vec<TagBackend> = (0..40)
        .map(|i| TagBackend::start(&format!("b{i}")))
        .collect();
    let db = Db::create(dir.join("routing.db"));
    for b in &backends {
        db.upsert(&Row::new(&b.name, "web", "sa", b.port()));
    }
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db.path,
            "[pool]\nenabled = true\nwarm = \"all\"\nspeaks_first = \"keep\"\n\
             [health]\nenabled = true\ninterval_ms = 200\ntimeout_ms = 150\nmax_concurrent = 8\n\
             [affinity]\nttl_secs = 0\n\
             [metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n",
        ),
    )
    .unwrap();
    let proxy = spawn_limited(&path, 256, 256);
    let line = proxy
        .wait_for_log(
            "connection limit derived from the open files limit",
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("{}", proxy.log_text()));
    let max: usize = field(&line, "max_connections").unwrap().parse().unwrap();
    // Wait until the pool holds its whole share on both shards (the
    // bound it logs per shard), idle, as many as it will ever hold.
    let bound: f64 = proxy
        .wait_for_log("pool: warm backend connections on", PATIENCE)
        .and_then(|l| {
            let v = field(&l, "max_sockets")?;
            v.trim_start_matches("Some(")
                .trim_end_matches(')')
                .parse()
                .ok()
        })
        .expect("the pool's bound in its log line");
    let metrics: std::net::SocketAddr = field(
        &proxy.wait_for_log("metrics listening", PATIENCE).unwrap(),
        "addr",
    )
    .unwrap()
    .parse()
    .unwrap();
    let idle = || {
        let mut s = TcpStream::connect(metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        all.lines()
            .find_map(|l| {
                l.strip_prefix("edgeproxy_pool_idle_connections ")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    assert!(
        eventually(PATIENCE, || idle() >= 2.0 * bound),
        "the pool never filled its share ({bound} per shard): {} idle",
        idle()
    );
    // The limit's worth of clients at once, held open: every one is
    // served (each reads its backend's greeting), none accepted and closed.
    let clients: Vec<TcpStream> = (0..max)
        .map(|_| {
            let s = TcpStream::connect(proxy.addr()).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut greeted = vec![false; max];
    let deadline = Instant::now() + PATIENCE;
    loop {
        for (i, c) in clients.iter().enumerate() {
            if !greeted[i] && poll_greeting(c).is_some() {
                greeted[i] = true;
            }
        }
        let served = greeted.iter().filter(|g| **g).count();
        if served == max {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{served} of {max} clients served; proxy log:\n{}",
            proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Checks keep running with every client in: none lacks a descriptor.
    std::thread::sleep(Duration::from_millis(600));
    let log = proxy.log_text();
    assert!(!log.contains("health check could not run"), "{log}");
    assert!(!log.contains("accept failed"), "{log}");
    drop(clients);
}
