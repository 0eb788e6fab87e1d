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

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

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
    let checks = || {
        let mut s = std::net::TcpStream::connect(metrics).unwrap();
        use std::io::{Read, Write};
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        all.lines()
            .find_map(|l| l.strip_prefix("edgeproxy_health_checks_total "))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or(0.0)
    };
    // The first interval spreads the first checks; measure after it.
    std::thread::sleep(Duration::from_secs(6));
    let pid = proxy.pid();
    let (t0, c0, n0) = (Instant::now(), cpu_ticks(pid), checks());
    std::thread::sleep(Duration::from_secs(20));
    let (secs, ticks, n1) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid) - c0, checks());
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = ticks as f64 / hz / secs * 100.0;
    let rate = (n1 - n0) / secs;
    let failures = {
        let mut s = std::net::TcpStream::connect(metrics).unwrap();
        use std::io::{Read, Write};
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        all.lines()
            .find_map(|l| l.strip_prefix("edgeproxy_health_check_failures_total "))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or(0.0)
    };
    println!(
        "{BACKENDS} backends, every 5 s: {rate:.0} checks/s, proxy CPU {share:.2} % of one core \
         over {secs:.1} s, {} threads, {failures} failed checks",
        threads(pid)
    );
    assert!(
        rate > BACKENDS as f64 / 5.0 * 0.8,
        "not every backend is checked: {rate}/s"
    );
    assert!(threads(pid) < 16, "a thread per check?");
    drop(rt);
}
