//! The backend connect timeout through the real binary: a backend that never
//! answers the SYN is given up after `connect_timeout_ms`, recorded as a
//! timed-out attempt, and the client goes on to the next backend.

mod common;

use common::*;

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
