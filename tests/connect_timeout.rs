//! The backend connect timeout through the real binary: a backend that never
//! answers the SYN is given up after `connect_timeout_ms`, recorded as a
//! timed-out attempt, and the client goes on to the next backend.

mod common;

use common::*;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn start(tag: &str, attempts: u32) -> (TempDir, Blackhole, TagBackend, Proxy) {
    let dir = TempDir::new(tag);
    let hole = Blackhole::start();
    let live = TagBackend::start("live");
    let db = Db::create(dir.join("routing.db"));
    // The blackhole scores best (weight), so it is always tried first.
    let mut best = Row::new("hole", "web", "sa", hole.addr.port());
    best.weight = 100;
    db.upsert(&best);
    db.upsert(&Row::new("live", "web", "sa", live.port()));
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            &format!(
                "[limits]\nconnect_timeout_ms = 300\nconnect_attempts = {attempts}\n[affinity]\nttl_secs = 0\n"
            ),
        ),
    );
    (dir, hole, live, proxy)
}

#[test]
fn a_backend_that_never_answers_times_out_and_the_next_one_serves() {
    let (_dir, _hole, _live, proxy) = start("connect-timeout", 3);
    let mark = proxy.log_mark();
    assert_eq!(which_backend(proxy.addr()), "live");
    let line = proxy
        .wait_for_log_after(mark, "backend connect failed", PATIENCE)
        .expect("the timed-out attempt was not logged");
    assert!(line.contains("backend=hole"), "{line}");
    // The configured timeout, not the 2 s default, ended the attempt.
    assert!(line.contains("timed out after 300ms"), "{line}");
}

#[test]
fn with_one_attempt_a_timed_out_connect_closes_the_client() {
    let (_dir, _hole, live, proxy) = start("connect-timeout-once", 1);
    assert_eq!(probe(proxy.addr(), PATIENCE), Probe::ClosedWithoutData);
    assert_eq!(
        live.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// A backend connect in flight when the proxy is stopped (SIGSTOP; a VM
/// paused for live migration), completed by the kernel meanwhile, must
/// serve the client on resume: by then its deadline has passed too, and a
/// timer looked at before the connect's completion would give up a
/// connection that is there.
#[test]
fn a_connect_that_completed_while_the_proxy_was_stopped_serves_the_client() {
    let dir = TempDir::new("connect-across-stop");
    let held = HeldBackend::start();
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("held", "web", "sa", held.addr.port()));
    let timeout = Duration::from_millis(1500);
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            &format!(
                "[limits]\nconnect_timeout_ms = {}\nconnect_attempts = 1\n",
                timeout.as_millis()
            ),
        ),
    );
    let mark = proxy.log_mark();
    let client = TcpStream::connect(proxy.addr()).expect("connect to proxy");
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = Instant::now();
    // The proxy's SYN is out (and dropped: the backend's queue is full).
    held.wait_for_syn_sent(held.syn_sent_before + 1);
    proxy.signal(libc::SIGSTOP);
    // The kernel completes the connect on the SYN's retransmission (~1 s)
    // while the proxy is stopped; the stop lasts past the connect's deadline.
    let accepted = held.release();
    accepted
        .recv_timeout(PATIENCE)
        .expect("the proxy's connect never reached the backend");
    let past_deadline = started + timeout + Duration::from_millis(300);
    std::thread::sleep(past_deadline.saturating_duration_since(Instant::now()));
    proxy.signal(libc::SIGCONT);
    assert_eq!(
        read_line(&client).as_deref(),
        Some("held"),
        "the client was not served; proxy log:\n{}",
        proxy.log_text()
    );
    let failed = proxy.log_lines_after(mark, "backend connect failed");
    assert!(failed.is_empty(), "{failed:#?}");
}

/// A backend whose accept queue is full (its SYNs dropped, so connects hang)
/// until released, then greeting every connection with "held".
struct HeldBackend {
    addr: SocketAddr,
    listener: std::net::TcpListener,
    queued: Vec<socket2::Socket>,
    /// Connects to it in SYN-SENT once it was full (its own queued ones).
    syn_sent_before: usize,
}

impl HeldBackend {
    fn start() -> HeldBackend {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        socket.listen(0).unwrap();
        let listener: std::net::TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let queued: Vec<Socket> = (0..2)
            .map(|_| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                s.set_nonblocking(true).unwrap();
                let _ = s.connect(&addr.into());
                s
            })
            .collect();
        let mut held = HeldBackend {
            addr,
            listener,
            queued,
            syn_sent_before: 0,
        };
        // Full only once the second of its own connects hangs in SYN-SENT.
        held.wait_for_syn_sent(1);
        held.syn_sent_before = held.syn_sent();
        held
    }

    /// Sockets of this host in SYN-SENT towards the backend.
    fn syn_sent(&self) -> usize {
        let port = format!(":{:04X}", self.addr.port());
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 3 && fields[2].ends_with(&port) && fields[3] == "02"
            })
            .count()
    }

    fn wait_for_syn_sent(&self, at_least: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.syn_sent() < at_least {
            assert!(Instant::now() < deadline, "no connect to the backend hung");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Accepts from now on; the receiver hears of each connection that is
    /// not one of the backend's own queued ones.
    fn release(&self) -> std::sync::mpsc::Receiver<()> {
        use std::io::Write;
        let own: Vec<SocketAddr> = self
            .queued
            .iter()
            .filter_map(|s| s.local_addr().ok()?.as_socket())
            .collect();
        let listener = self.listener.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if conn.peer_addr().is_ok_and(|peer| own.contains(&peer)) {
                    continue;
                }
                let _ = conn.write_all(b"held\n");
                let _ = tx.send(());
                // The connection stays open until the test ends.
                std::mem::forget(conn);
            }
        });
        rx
    }
}
