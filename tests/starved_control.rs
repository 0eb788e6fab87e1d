//! A POP whose cores are kept busy still runs its control plane: the routing
//! reload thread runs under `SCHED_IDLE` and, starved, can hold the shared
//! reloader for seconds; the control runtime (replication's gossip and
//! status, BGP keepalives, health, metrics, API) must not wait for it.
//!
//! QA (2026-12-06): two POPs, 3,000 backends, one POP pinned to a CPU with
//! a busy loop beside it: a reload took 9–12 s of wall time, and with it
//! every task of the control runtime stopped (replication's status turn
//! took the lock every second), so the other POP declared it down three
//! times a minute. Here one replicating POP is pinned with a busy loop, a
//! writer keeps the table changing, and `/metrics`, served by the same
//! runtime, is asked all along.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Db, Proxy, TempDir};

const BACKENDS: usize = 10_000;

/// A busy loop on CPU 0, killed (and reaped) when dropped.
struct BusyLoop(Child);

impl BusyLoop {
    fn start() -> BusyLoop {
        let child = Command::new("taskset")
            .args(["-c", "0", "sh", "-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot run taskset (util-linux)");
        BusyLoop(child)
    }
}

impl Drop for BusyLoop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How long one GET of `/metrics` took, or `None` when it failed.
fn get_metrics(addr: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    body.starts_with(b"HTTP/1.1 200").then(|| started.elapsed())
}

#[test]
fn a_starved_routing_reload_does_not_stall_the_control_runtime() {
    let dir = TempDir::new("starved-control");
    let db = Db::create(dir.join("routing.db"));
    db.exec(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {BACKENDS})
         INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
         SELECT 'b' || i, 'web', 'sa', '10.1.' || (i / 250) || '.' || (i % 250 + 1), 8080, 1, 1, 100, 150 FROM n"
    ));
    let config = dir.join("e.toml");
    std::fs::write(
        &config,
        format!(
            "[routing]\ndb_path = {db:?}\nreload_interval_ms = 100\n\
             [runtime]\nshards = 1\npin_cores = false\n\
             [metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n\
             [replication]\nenabled = true\nnode_id = \"starved\"\n\
             secret = \"test-cluster-secret-0123456789\"\n\
             gossip_addr = \"127.0.0.1:0\"\ntransport_addr = \"127.0.0.1:0\"\n\
             [[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n",
            db = db.path.display().to_string()
        ),
    )
    .unwrap();
    // The whole POP on CPU 0, and a busy loop there at the same priority as
    // its shards and control thread: the reload thread (SCHED_IDLE) gets
    // next to nothing of it, as on a POP whose shards keep every core busy.
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0", common::BIN]);
    let proxy = Proxy::spawn_command(
        cmd,
        &["--config", config.to_str().unwrap()],
        &[],
        Some("info"),
    )
    .ready();
    let metrics = proxy.metrics_addr();
    let _busy = BusyLoop::start();

    // An operator's edits, every 300 ms: each one a reload of 10,000 rows
    // for the starved thread, which holds the reloader meanwhile.
    let writer_db = Db::open(db.path.clone());
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    let mut next_write = started;
    let mut edits = 0;
    while started.elapsed() < Duration::from_secs(12) {
        if Instant::now() >= next_write {
            edits += 1;
            writer_db.exec(&format!(
                "UPDATE backends SET weight = {} WHERE id = 'b1'",
                edits % 5 + 1
            ));
            next_write += Duration::from_millis(300);
        }
        let took = get_metrics(metrics).expect("/metrics answered");
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{edits} edits, slowest /metrics {slowest:?}");
    // The reload thread was starved: some edit is not published yet, or
    // was published late (else this test did not starve it, and says so).
    let reloads = proxy
        .log_lines()
        .iter()
        .filter(|l| l.contains("routing table reloaded"))
        .count();
    assert!(
        reloads < edits + 1,
        "every one of {edits} edits was reloaded ({reloads} reloads): the reload thread was not starved"
    );
    // The control runtime shares CPU 0 with the busy loop (half of it): a
    // request takes what rendering 10,000 backends' metrics takes there
    // (under a second in a debug build), not the seconds a starved reload
    // holds the lock (before the fix: 10 s, the test's whole window).
    assert!(
        slowest < Duration::from_secs(4),
        "/metrics took {slowest:?} while the reload thread was starved"
    );
}
