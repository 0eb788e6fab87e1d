//! Graceful shutdown of the real binary: SIGTERM/SIGINT stop accepting, let
//! open connections finish, and the process exits 0 once they have, or once
//! the grace period is over.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{
    config, connect_tagged, probe, Db, Probe, Proxy, Row, TagBackend, TempDir, PATIENCE, SIGINT,
    SIGTERM,
};

fn start(dir: &TempDir, backend: &TagBackend, grace_secs: u64) -> Proxy {
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("b1", "app", "sa", backend.port()));
    Proxy::with_config(
        dir,
        &config(
            &db.path,
            &format!("[limits]\nshutdown_grace_secs = {grace_secs}\n"),
        ),
    )
}

fn echo(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).expect("write");
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).expect("echo");
    assert_eq!(got, msg);
}

/// Waits until new connections to `addr` are no longer served: refused, or
/// closed before a byte. Returns how long that took.
fn stops_accepting(addr: SocketAddr) -> Duration {
    let since = Instant::now();
    let stopped = common::eventually(Duration::from_secs(3), || {
        matches!(
            probe(addr, Duration::from_secs(1)),
            Probe::Refused | Probe::ClosedWithoutData
        )
    });
    assert!(stopped, "{addr} still serves new connections");
    since.elapsed()
}

/// SIGTERM or SIGINT with a connection open: accepting stops, the connection
/// goes on, and the process exits 0 as soon as it closes.
fn drains_then_exits(sig: i32) {
    let dir = TempDir::new("drain");
    let backend = TagBackend::start("drain");
    let mut proxy = start(&dir, &backend, 30);
    let addr = proxy.addr();
    let (_, mut open) = connect_tagged(addr);
    echo(&mut open, b"before");

    let mark = proxy.log_mark();
    proxy.signal(sig);
    proxy
        .wait_for_log_after(mark, "shutting down", PATIENCE)
        .unwrap_or_else(|| panic!("no shutdown:\n{}", proxy.log_text()));
    let took = stops_accepting(addr);
    assert!(
        took < Duration::from_secs(2),
        "took {took:?} to stop accepting"
    );

    // The open connection still works, both ways.
    echo(&mut open, b"after the signal");
    echo(&mut open, &[7u8; 100_000]);
    assert!(
        proxy.wait_exit(Duration::from_millis(300)).is_none(),
        "exited with a connection open:\n{}",
        proxy.log_text()
    );

    // Closing it ends the drain at once, far from the 30 s grace period.
    open.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).expect("orderly close");
    assert!(rest.is_empty());
    let closed = Instant::now();
    let status = proxy
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("did not exit:\n{}", proxy.log_text()));
    assert!(status.success(), "exit {status}:\n{}", proxy.log_text());
    let exit_after = closed.elapsed();
    assert!(
        exit_after < Duration::from_secs(3),
        "exited {exit_after:?} after the last connection closed"
    );
    assert!(
        proxy
            .wait_for_log_after(mark, "shutdown complete", PATIENCE)
            .is_some(),
        "{}",
        proxy.log_text()
    );
    assert!(!proxy.log_text().contains("grace period over"));
}

#[test]
fn sigterm_stops_accepting_and_drains_open_connections() {
    drains_then_exits(SIGTERM);
}

#[test]
fn sigint_behaves_like_sigterm() {
    drains_then_exits(SIGINT);
}

#[test]
fn grace_period_closes_connections_still_open() {
    let dir = TempDir::new("grace");
    let backend = TagBackend::start("grace");
    let mut proxy = start(&dir, &backend, 1);
    let addr = proxy.addr();
    let (_, mut open) = connect_tagged(addr);
    echo(&mut open, b"hello");

    let mark = proxy.log_mark();
    let signalled = Instant::now();
    proxy.signal(SIGTERM);
    proxy
        .wait_for_log_after(mark, "shutting down", PATIENCE)
        .unwrap_or_else(|| panic!("no shutdown:\n{}", proxy.log_text()));
    stops_accepting(addr);
    echo(&mut open, b"still served during the grace period");

    // The client never closes: the proxy does, after about a second.
    let mut buf = [0u8; 16];
    let outcome = open.read(&mut buf);
    let closed_after = signalled.elapsed();
    assert!(
        matches!(outcome, Ok(0))
            || outcome
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "connection not closed by the proxy: {outcome:?}"
    );
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(5),
        "closed {closed_after:?} after SIGTERM, grace is 1 s"
    );
    let status = proxy
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("did not exit:\n{}", proxy.log_text()));
    let exited_after = signalled.elapsed();
    assert!(status.success(), "exit {status}:\n{}", proxy.log_text());
    assert!(
        exited_after < Duration::from_secs(5),
        "exited {exited_after:?} after SIGTERM, grace is 1 s"
    );
    proxy
        .wait_for_log_after(mark, "grace period over", PATIENCE)
        .unwrap_or_else(|| panic!("no grace-period warning:\n{}", proxy.log_text()));
}

#[test]
fn stop_signal_right_after_ready_is_graceful() {
    // `edgeproxy ready` promises that the proxy handles stop signals: one
    // sent the moment the line appears drains and exits 0, it does not kill
    // the process (or go unnoticed). The window is small; try a few times.
    for sig in [SIGTERM, SIGINT, SIGTERM, SIGINT, SIGTERM, SIGTERM] {
        let dir = TempDir::new("early-signal");
        let db = Db::create(dir.join("routing.db"));
        let mut proxy = Proxy::with_config(&dir, &config(&db.path, ""));
        proxy.signal(sig);
        let status = proxy
            .wait_exit(PATIENCE)
            .unwrap_or_else(|| panic!("signal {sig} ignored:\n{}", proxy.log_text()));
        assert!(
            status.success(),
            "signal {sig} right after ready: exit {status}:\n{}",
            proxy.log_text()
        );
        proxy
            .wait_for_log("shutdown complete", PATIENCE)
            .unwrap_or_else(|| panic!("no orderly shutdown:\n{}", proxy.log_text()));
    }
}
