//! The bookkeeping with fake sockets (their health set by the test, their
//! closing counted) and a fake clock.

use std::cell::Cell;
use std::rc::Rc;

use super::*;
use crate::snapshot::{BackendRecord, SnapshotBuilder};

/// A socket whose health the test sets; counts its own close (drop).
struct Fake {
    health: Rc<Cell<Health>>,
    closed: Rc<Cell<u32>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.closed.set(self.closed.get() + 1);
    }
}

struct Rig {
    book: Book<Fake>,
    stats: Arc<PoolStats>,
    closed: Rc<Cell<u32>>,
    t0: Instant,
}

impl Rig {
    fn new(policy: Policy) -> Rig {
        let stats = Arc::new(PoolStats::default());
        Rig {
            book: Book::new(Arc::new(policy), Arc::clone(&stats)),
            stats,
            closed: Rc::new(Cell::new(0)),
            t0: Instant::now(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn sock(&self) -> (Fake, Rc<Cell<Health>>) {
        let health = Rc::new(Cell::new(Health::Quiet));
        (
            Fake {
                health: Rc::clone(&health),
                closed: Rc::clone(&self.closed),
            },
            health,
        )
    }

    /// Makes every pending connect succeed at `ms`; the sockets' health
    /// handles, in order.
    fn connect_all(&mut self, ms: u64) -> Vec<(Arc<str>, Rc<Cell<Health>>)> {
        let mut out = Vec::new();
        while let Some(order) = self.book.poll_connect(self.at(ms)) {
            let (s, h) = self.sock();
            self.book.connected(self.at(ms), &order, s);
            out.push((order.id, h));
        }
        out
    }

    fn take(&mut self, ms: u64, id: &str, addr: SocketAddr) -> Option<Fake> {
        self.book.take(self.at(ms), id, addr, |s| s.health.get())
    }

    fn count(&self, c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

fn rec(id: &str, app: &str, region: &str, port: i64) -> BackendRecord {
    BackendRecord {
        id: id.into(),
        app: app.into(),
        region: region.into(),
        country: None,
        ip: "10.0.0.1".into(),
        port,
        healthy: true,
        weight: 1,
        soft_limit: 100,
        hard_limit: 0,
        deleted: false,
    }
}

fn snap(records: &[BackendRecord]) -> RoutingSnapshot {
    SnapshotBuilder::new().build(records).snapshot
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

/// The local POP is in "sa"; "eu" is far.
fn refresh(book: &mut Book<Fake>, s: &RoutingSnapshot) {
    book.refresh(s, s.region_id("sa"));
}

#[test]
fn by_default_only_backends_outside_this_pops_region_are_warmed() {
    let mut r = Rig::new(Policy::default());
    let s = snap(&[rec("near", "web", "sa", 80), rec("far", "web", "eu", 81)]);
    refresh(&mut r.book, &s);
    let made = r.connect_all(0);
    let ids: Vec<&str> = made.iter().map(|(id, _)| &**id).collect();
    assert_eq!(ids, ["far"]);
    // A client to the near backend neither hits nor counts a miss.
    assert!(r.take(1, "near", addr(80)).is_none());
    assert_eq!(r.count(&r.stats.misses), 0);
    assert!(r.take(1, "far", addr(81)).is_some());
    assert_eq!(r.count(&r.stats.hits), 1);
}

#[test]
fn scope_all_rtt_threshold_and_apps() {
    let s = snap(&[
        rec("near", "web", "sa", 80),
        rec("far", "web", "eu", 81),
        rec("api", "api", "eu", 82),
    ]);
    let warmed = |policy: Policy| {
        let mut r = Rig::new(policy);
        refresh(&mut r.book, &s);
        let mut ids: Vec<String> = r
            .connect_all(0)
            .into_iter()
            .map(|(id, _)| id.to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        warmed(Policy {
            warm: Warm::All,
            ..Policy::default()
        }),
        ["api", "far", "near"]
    );
    assert_eq!(
        warmed(Policy {
            apps: vec![Arc::from("api")],
            ..Policy::default()
        }),
        ["api"]
    );
    // RTT: only measured backends at or above the threshold.
    s.backends[0].live.set_rtt_us(80_000);
    s.backends[1].live.set_rtt_us(5_000);
    assert_eq!(
        warmed(Policy {
            warm: Warm::RttAtLeast(20_000),
            ..Policy::default()
        }),
        ["near"]
    );
}

#[test]
fn a_take_hands_out_the_newest_socket_and_asks_for_a_refill() {
    let mut r = Rig::new(Policy {
        max_per_backend: 3,
        ..Policy::default()
    });
    let s = snap(&[rec("far", "web", "eu", 81)]);
    refresh(&mut r.book, &s);
    assert_eq!(r.connect_all(0).len(), 1);
    assert!(r.book.poll_connect(r.at(1)).is_none(), "target is one");
    let got = r.take(10, "far", addr(81));
    assert!(got.is_some());
    assert_eq!(r.book.idle(), 0);
    let refill = r
        .book
        .poll_connect(r.at(10))
        .expect("a refill after a take");
    assert_eq!((&*refill.id, refill.addr), ("far", addr(81)));
    assert_eq!(r.count(&r.stats.connecting), 1);
}

#[test]
fn misses_grow_the_pool_up_to_the_maximum_and_idle_expiry_shrinks_it_to_one() {
    let mut r = Rig::new(Policy {
        max_per_backend: 3,
        idle_timeout: Duration::from_secs(60),
        ..Policy::default()
    });
    let s = snap(&[rec("far", "web", "eu", 81)]);
    refresh(&mut r.book, &s);
    // Clients arrive while the first connect is still in flight: misses.
    let first = r.book.poll_connect(r.at(0)).unwrap();
    for ms in 1..=5 {
        assert!(r.take(ms, "far", addr(81)).is_none());
    }
    assert_eq!(r.count(&r.stats.misses), 5);
    assert_eq!(r.book.target_of("far"), 3, "capped at max_per_backend");
    let (sock, _) = r.sock();
    r.book.connected(r.at(100), &first, sock);
    assert_eq!(r.connect_all(100).len(), 2);
    assert_eq!(r.book.idle_of("far"), 3);
    // Nobody comes for a minute: all three expire, the target drops to one
    // (not zero) and one socket is made again.
    r.book.sweep(r.at(60_100), |s| s.health.get());
    assert_eq!(r.book.idle_of("far"), 0);
    assert_eq!(r.count(&r.stats.expired), 3);
    assert_eq!(r.closed.get(), 3);
    assert_eq!(r.book.target_of("far"), 1);
    assert_eq!(r.connect_all(60_100).len(), 1);
}

#[test]
fn the_lifetime_replaces_a_socket_without_shrinking_the_pool() {
    let mut r = Rig::new(Policy {
        max_per_backend: 2,
        idle_timeout: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(10),
        ..Policy::default()
    });
    let s = snap(&[rec("far", "web", "eu", 81)]);
    refresh(&mut r.book, &s);
    r.connect_all(0);
    assert!(r.take(1, "far", addr(81)).is_some());
    assert!(r.take(2, "far", addr(81)).is_none()); // target 2 now
    assert_eq!(r.connect_all(3).len(), 2);
    r.book.sweep(r.at(10_003), |s| s.health.get());
    assert_eq!(r.count(&r.stats.expired), 2);
    assert_eq!(r.book.target_of("far"), 2);
    assert_eq!(r.connect_all(10_003).len(), 2);
    // An expired socket is never handed out, even between sweeps.
    assert!(r.take(20_004, "far", addr(81)).is_none());
    assert_eq!(r.count(&r.stats.expired), 4);
}

#[test]
fn a_socket_the_backend_closed_is_skipped_counted_and_closed() {
    let mut r = Rig::new(Policy {
        max_per_backend: 2,
        ..Policy::default()
    });
    let s = snap(&[rec("far", "web", "eu", 81)]);
    refresh(&mut r.book, &s);
    r.connect_all(0);
    assert!(r.take(1, "far", addr(81)).is_some());
    assert!(r.take(2, "far", addr(81)).is_none());
    let made = r.connect_all(3);
    assert_eq!(made.len(), 2);
    // The newer one was closed by the backend: the older one is handed out.
    made[1].1.set(Health::Closed);
    let closed_before = r.closed.get();
    let got = r.take(5_000, "far", addr(81)).expect("the other socket");
    assert!(Rc::ptr_eq(&got.health, &made[0].1));
    assert_eq!(r.count(&r.stats.stale), 1);
    assert_eq!(r.closed.get(), closed_before + 1);
    // The sweep finds closed ones too, without a client.
    let made = r.connect_all(5_001);
    made[0].1.set(Health::Closed);
    r.book.sweep(r.at(6_000), |s| s.health.get());
    assert_eq!(r.count(&r.stats.stale), 2);
    assert_eq!(r.book.idle_of("far"), 1);
}

#[test]
fn a_backend_that_speaks_first_is_excluded_by_default() {
    let mut r = Rig::new(Policy::default());
    let s = snap(&[rec("smtp", "mail", "eu", 25)]);
    refresh(&mut r.book, &s);
    let made = r.connect_all(0);
    made[0].1.set(Health::Spoke);
    r.book.sweep(r.at(100), |s| s.health.get());
    assert_eq!(r.count(&r.stats.speaks_first_excluded), 1);
    assert_eq!(r.closed.get(), 1);
    assert!(!r.book.warms("smtp"));
    assert!(r.book.poll_connect(r.at(200)).is_none());
    // It stays excluded across refreshes while it keeps its address...
    refresh(&mut r.book, &s);
    assert!(r.book.poll_connect(r.at(300)).is_none());
    assert!(r.take(300, "smtp", addr(25)).is_none());
    // ...and is looked at afresh once it moves.
    let moved = snap(&[rec("smtp", "mail", "eu", 2525)]);
    refresh(&mut r.book, &moved);
    assert!(r.book.poll_connect(r.at(400)).is_some());
}

#[test]
fn with_speaks_first_keep_the_greeted_socket_goes_to_the_client() {
    let mut r = Rig::new(Policy {
        speaks_first: SpeaksFirst::Keep,
        ..Policy::default()
    });
    let s = snap(&[rec("smtp", "mail", "eu", 25)]);
    refresh(&mut r.book, &s);
    let made = r.connect_all(0);
    made[0].1.set(Health::Spoke);
    r.book.sweep(r.at(100), |s| s.health.get());
    assert!(r.take(200, "smtp", addr(25)).is_some());
    assert_eq!(r.count(&r.stats.speaks_first_excluded), 0);
}

#[test]
fn sockets_close_when_the_backend_leaves_turns_unhealthy_or_moves() {
    let mut r = Rig::new(Policy::default());
    let both = snap(&[rec("a", "web", "eu", 81), rec("b", "web", "eu", 82)]);
    refresh(&mut r.book, &both);
    assert_eq!(r.connect_all(0).len(), 2);
    // b deleted.
    refresh(&mut r.book, &snap(&[rec("a", "web", "eu", 81)]));
    assert_eq!(r.closed.get(), 1);
    // a unhealthy (or draining: drained backends are routed unhealthy).
    let mut sick = rec("a", "web", "eu", 81);
    sick.healthy = false;
    refresh(&mut r.book, &snap(&[sick]));
    assert_eq!(r.closed.get(), 2);
    assert_eq!(r.book.idle(), 0);
    assert_eq!(r.count(&r.stats.idle), 0);
    // a healthy again, then moved to another port.
    let back = snap(&[rec("a", "web", "eu", 81)]);
    refresh(&mut r.book, &back);
    r.connect_all(10);
    refresh(&mut r.book, &snap(&[rec("a", "web", "eu", 91)]));
    assert_eq!(r.closed.get(), 3);
    assert!(r.take(20, "a", addr(81)).is_none());
    let order = r.book.poll_connect(r.at(20)).unwrap();
    assert_eq!(order.addr, addr(91));
}

#[test]
fn a_connect_that_finishes_after_its_backend_left_is_closed() {
    let mut r = Rig::new(Policy::default());
    let s = snap(&[rec("a", "web", "eu", 81)]);
    refresh(&mut r.book, &s);
    let order = r.book.poll_connect(r.at(0)).unwrap();
    refresh(&mut r.book, &snap(&[]));
    assert_eq!(r.count(&r.stats.connecting), 0);
    let (sock, _) = r.sock();
    r.book.connected(r.at(100), &order, sock);
    assert_eq!(r.closed.get(), 1);
    assert_eq!(r.book.idle(), 0);
    // Back again: a new entry; the old order's answer would not count.
    refresh(&mut r.book, &s);
    let fresh = r.book.poll_connect(r.at(200)).unwrap();
    assert_ne!(fresh.epoch, order.epoch);
    let (sock, _) = r.sock();
    r.book.connected(r.at(250), &order, sock);
    assert_eq!(r.closed.get(), 2);
    assert_eq!(r.count(&r.stats.connecting), 1);
}

#[test]
fn failed_connects_back_off_exponentially_and_a_success_resets() {
    let mut r = Rig::new(Policy::default());
    let s = snap(&[rec("a", "web", "eu", 81)]);
    refresh(&mut r.book, &s);
    let mut now = 0;
    let mut gaps = Vec::new();
    for _ in 0..8 {
        let order = loop {
            if let Some(o) = r.book.poll_connect(r.at(now)) {
                break o;
            }
            now += 10;
        };
        r.book.connect_failed(r.at(now), &order);
        gaps.push(now);
    }
    let deltas: Vec<u64> = gaps.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(deltas, [500, 1000, 2000, 4000, 8000, 16000, 30000]);
    assert_eq!(r.count(&r.stats.connect_failures), 8);
    // Next due at now + 30 s; it succeeds and the next failure waits 0.5 s.
    let order = loop {
        if let Some(o) = r.book.poll_connect(r.at(now)) {
            break o;
        }
        now += 10;
    };
    let (sock, _) = r.sock();
    r.book.connected(r.at(now), &order, sock);
    assert!(r.take(now + 1, "a", addr(81)).is_some());
    let order = r.book.poll_connect(r.at(now + 1)).unwrap();
    r.book.connect_failed(r.at(now + 1), &order);
    assert!(r.book.poll_connect(r.at(now + 500)).is_none());
    assert!(r.book.poll_connect(r.at(now + 501)).is_some());
}

#[test]
fn a_backend_that_closes_pooled_sockets_at_once_is_retried_with_backoff() {
    let mut r = Rig::new(Policy::default());
    let s = snap(&[rec("a", "web", "eu", 81)]);
    refresh(&mut r.book, &s);
    let made = r.connect_all(0);
    made[0].1.set(Health::Closed);
    r.book.sweep(r.at(100), |s| s.health.get());
    assert_eq!(r.count(&r.stats.stale), 1);
    assert!(r.book.poll_connect(r.at(100)).is_none());
    assert!(r.book.poll_connect(r.at(600)).is_some());
}

/// QA: the connect that followed a young close reset the failure count, so
/// a backend that closed every pooled socket at once was reconnected every
/// 0.5 s + one tick, per shard, forever (75 connects in 35 s on two shards
/// against a backend that resets every connection).
#[test]
fn a_backend_that_keeps_closing_pooled_sockets_at_once_backs_off_further_each_time() {
    let mut r = Rig::new(Policy::default());
    let s = snap(&[rec("a", "web", "eu", 81)]);
    refresh(&mut r.book, &s);
    let mut now = 0;
    let mut connects = Vec::new();
    for _ in 0..6 {
        let order = loop {
            if let Some(o) = r.book.poll_connect(r.at(now)) {
                break o;
            }
            now += 10;
        };
        connects.push(now);
        let (sock, health) = r.sock();
        r.book.connected(r.at(now), &order, sock);
        health.set(Health::Closed);
        now += 100;
        r.book.sweep(r.at(now), |s| s.health.get());
    }
    let gaps: Vec<u64> = connects.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps, [600, 1100, 2100, 4100, 8100]);
    // A socket that lives past the young age ends the backoff.
    let order = loop {
        if let Some(o) = r.book.poll_connect(r.at(now)) {
            break o;
        }
        now += 10;
    };
    let (sock, health) = r.sock();
    r.book.connected(r.at(now), &order, sock);
    r.book.sweep(r.at(now + 600), |s| s.health.get());
    health.set(Health::Closed);
    now += 700;
    r.book.sweep(r.at(now), |s| s.health.get());
    let order = r
        .book
        .poll_connect(r.at(now))
        .expect("an old socket's close is no failure");
    // The next young close waits the first delay again.
    let (sock, health) = r.sock();
    r.book.connected(r.at(now), &order, sock);
    health.set(Health::Closed);
    now += 100;
    r.book.sweep(r.at(now), |s| s.health.get());
    assert!(r.book.poll_connect(r.at(now + 499)).is_none());
    assert!(r.book.poll_connect(r.at(now + 500)).is_some());
}

#[test]
fn next_deadline_is_the_first_expiry_or_retry() {
    let mut r = Rig::new(Policy {
        idle_timeout: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(30),
        ..Policy::default()
    });
    assert_eq!(r.book.next_deadline(), None);
    refresh(&mut r.book, &snap(&[rec("a", "web", "eu", 81)]));
    r.connect_all(1_000);
    assert_eq!(r.book.next_deadline(), Some(r.at(31_000)));
}

#[test]
fn a_take_asks_for_its_own_backends_refill_only() {
    let mut r = Rig::new(Policy::default());
    let s = snap(&[rec("a", "web", "eu", 81), rec("b", "web", "eu", 82)]);
    refresh(&mut r.book, &s);
    // Only a's connect is made; b's stays wanted.
    let first = r.book.poll_connect_of(r.at(0), "a").unwrap();
    assert_eq!(&*first.id, "a");
    assert!(r.book.poll_connect_of(r.at(0), "a").is_none(), "target one");
    assert!(r.book.poll_connect_of(r.at(0), "nope").is_none());
    let rest = r.book.poll_connect(r.at(0)).unwrap();
    assert_eq!(&*rest.id, "b");
}

#[test]
fn a_retry_that_fell_due_never_makes_the_deadline_lie_in_the_past() {
    let mut r = Rig::new(Policy::default());
    refresh(&mut r.book, &snap(&[rec("a", "web", "eu", 81)]));
    let order = r.book.poll_connect(r.at(0)).unwrap();
    r.book.connect_failed(r.at(0), &order);
    assert_eq!(r.book.next_deadline(), Some(r.at(500)));
    // Due at 500 ms: issued then, and the wait is over while it runs (a
    // maintenance loop sleeping until `next_deadline` must not spin).
    let order = r.book.poll_connect(r.at(600)).unwrap();
    assert_eq!(r.book.next_deadline(), None);
    r.book.connect_failed(r.at(700), &order);
    assert_eq!(r.book.next_deadline(), Some(r.at(1_700)));
}

#[test]
fn a_lower_maximum_trims_targets_and_idle_sockets_at_once() {
    let mut r = Rig::new(Policy {
        max_per_backend: 4,
        ..Policy::default()
    });
    refresh(&mut r.book, &snap(&[rec("a", "web", "eu", 81)]));
    for ms in 0..4 {
        assert!(r.take(ms, "a", addr(81)).is_none());
    }
    assert_eq!(r.connect_all(10).len(), 4);
    assert_eq!(r.book.idle_of("a"), 4);
    r.book.set_policy(Arc::new(Policy {
        max_per_backend: 2,
        ..Policy::default()
    }));
    assert_eq!(r.book.idle_of("a"), 2);
    assert_eq!(r.book.target_of("a"), 2);
    assert_eq!(r.closed.get(), 2);
    assert_eq!(r.count(&r.stats.idle), 2);
    // Turned off: everything closes.
    r.book.clear();
    assert_eq!(r.closed.get(), 4);
    assert!(r.book.is_empty());
    assert_eq!(r.count(&r.stats.idle), 0);
}

#[test]
fn a_policy_that_stops_covering_a_backend_closes_its_sockets_at_the_next_refresh() {
    let mut r = Rig::new(Policy::default());
    let s = snap(&[rec("a", "web", "eu", 81)]);
    refresh(&mut r.book, &s);
    r.connect_all(0);
    r.book.set_policy(Arc::new(Policy {
        apps: vec![Arc::from("api")],
        ..Policy::default()
    }));
    refresh(&mut r.book, &s);
    assert_eq!(r.closed.get(), 1);
    assert!(!r.book.warms("a"));
}

/// QA: the pool took descriptors the connection limit had promised to
/// clients; it now stops at `max_sockets` (idle and connecting) per shard.
#[test]
fn the_pool_never_holds_more_than_its_share_of_descriptors() {
    let mut r = Rig::new(Policy {
        warm: Warm::All,
        max_sockets: 2,
        ..Policy::default()
    });
    let s = snap(&[
        rec("a", "web", "eu", 81),
        rec("b", "web", "eu", 82),
        rec("c", "web", "eu", 83),
    ]);
    refresh(&mut r.book, &s);
    let first = r.book.poll_connect(r.at(0)).unwrap();
    assert!(r.book.poll_connect(r.at(0)).is_some());
    assert!(
        r.book.poll_connect(r.at(0)).is_none(),
        "two in flight: full"
    );
    let (sock, _) = r.sock();
    r.book.connected(r.at(1), &first, sock);
    assert!(
        r.book.poll_connect(r.at(1)).is_none(),
        "one idle, one connecting"
    );
    // A take frees a place: the refill, or the backend still without one.
    assert!(r.take(2, &first.id, first.addr).is_some());
    assert!(r.book.poll_connect(r.at(2)).is_some());
    assert!(r.book.poll_connect(r.at(2)).is_none());
}
