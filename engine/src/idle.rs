//! Idle timeouts of a shard's connections, kept by one sweeper per shard.
//!
//! Why not a runtime timer per connection (as before 2026-12-03): a
//! connection's task polls its idle timer together with its two pumps on
//! every wake-up — every read and write completion — and a compio timer's
//! poll is a `RefCell` borrow and two `BTreeMap` lookups, plus an insert and a
//! remove per connection. In a profile of perf scenario (o) that poll was the
//! largest cost edgeproxy added per keep-alive request over the bare compio
//! proxy. Here polling a connection's watch is two `Cell` reads, and a pump
//! that moves bytes sets a flag instead of reading the clock; one task per
//! shard wakes every [`period`] (a sixteenth of the shortest idle timeout,
//! between 50 ms and 1 s), notes which connections moved bytes since the last
//! sweep, and closes those that have not for their whole timeout. The price
//! is precision: activity is known to the period, so a connection is closed
//! up to two periods after its timeout (300 s: up to 2 s late; 1 s: up to
//! 125 ms late), never before. The sweeper runs only while the shard has
//! connections to watch.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use slab::Slab;

use crate::alarm::Alarm;

/// Shortest and longest time between two sweeps.
const FINEST: Duration = Duration::from_millis(50);
const COARSEST: Duration = Duration::from_secs(1);
/// Sweeps per idle timeout: a connection is closed at most 1/16 of its
/// timeout late (within [`FINEST`, `COARSEST`]).
const SWEEPS_PER_TIMEOUT: u32 = 16;

/// The time between sweeps for connections idle after `idle`.
pub fn period(idle: Duration) -> Duration {
    (idle / SWEEPS_PER_TIMEOUT).clamp(FINEST, COARSEST)
}

/// One shard's idle watches and its sweeper.
#[derive(Default)]
pub(crate) struct IdleSweeper {
    inner: Rc<RefCell<Sweep>>,
}

#[derive(Default)]
struct Sweep {
    watches: Slab<Rc<Watch>>,
    /// The sweep period while a sweeper task runs; `None`: none runs.
    period: Option<Duration>,
}

/// A connection's idle state, shared by it and the sweeper.
struct Watch {
    /// Set by the pumps when a byte moves either way; cleared by each sweep.
    moved: Cell<bool>,
    /// The last sweep that found `moved` set (or when watching began).
    last_seen: Cell<Instant>,
    idle: Duration,
    expired: Alarm,
}

impl Watch {
    fn sweep(&self, now: Instant) {
        if self.expired.is_rung() {
            return;
        }
        if self.moved.replace(false) {
            self.last_seen.set(now);
        } else if self
            .last_seen
            .get()
            .checked_add(self.idle)
            // Past what an `Instant` can hold: never (the configuration
            // bounds `idle`; an embedder may not, and a panic here would
            // end the shard's sweeper).
            .is_some_and(|at| now >= at)
        {
            self.expired.ring();
        }
    }
}

impl IdleSweeper {
    /// Watches a new connection that is closed after `idle` without a byte
    /// moving, counted from `since` (a clock reading the caller took when
    /// the connection became ready, so that watching costs none). Must run on
    /// the shard's runtime: the sweeper task starts here when it is not
    /// running.
    pub fn watch(&self, since: Instant, idle: Duration) -> IdleGuard {
        let watch = Rc::new(Watch {
            moved: Cell::new(false),
            last_seen: Cell::new(since),
            idle,
            expired: Alarm::default(),
        });
        let period = period(idle);
        let mut sweep = self.inner.borrow_mut();
        let key = sweep.watches.insert(Rc::clone(&watch));
        match sweep.period {
            None => {
                sweep.period = Some(period);
                compio::runtime::spawn(sweeper(Rc::downgrade(&self.inner))).detach();
            }
            Some(running) if period < running => sweep.period = Some(period),
            Some(_) => {}
        }
        IdleGuard {
            sweep: Rc::clone(&self.inner),
            key,
            watch,
        }
    }

    /// Connections watched now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.borrow().watches.len()
    }
}

/// Sweeps every period until no connection is left to watch (or the shard's
/// context is gone).
async fn sweeper(sweep: Weak<RefCell<Sweep>>) {
    loop {
        let Some(period) = sweep.upgrade().and_then(|s| s.borrow().period) else {
            return;
        };
        crate::rt::sleep(period).await;
        let Some(sweep) = sweep.upgrade() else {
            return;
        };
        let mut sweep = sweep.borrow_mut();
        if sweep.watches.is_empty() {
            sweep.period = None;
            return;
        }
        let now = Instant::now();
        for (_, watch) in sweep.watches.iter() {
            watch.sweep(now);
        }
    }
}

/// A watched connection; stops being watched when dropped.
pub(crate) struct IdleGuard {
    sweep: Rc<RefCell<Sweep>>,
    key: usize,
    watch: Rc<Watch>,
}

impl IdleGuard {
    /// The idle timeout this connection is closed after.
    pub fn timeout(&self) -> Duration {
        self.watch.idle
    }

    /// Where the pumps record that a byte moved (set it to `true`).
    pub fn activity(&self) -> &Cell<bool> {
        &self.watch.moved
    }

    /// Resolves once a sweep found no byte moved for the idle timeout.
    /// Cheap to poll on every wake-up of the connection's task.
    pub fn expired(&self) -> impl Future<Output = ()> + '_ {
        self.watch.expired.wait()
    }
}

impl Drop for IdleGuard {
    fn drop(&mut self) {
        // The sweeper borrows only between its awaits, never while a
        // connection runs: this borrow cannot collide with it.
        self.sweep.borrow_mut().watches.try_remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;

    fn runtime() -> compio::runtime::Runtime {
        compio::runtime::Runtime::new().expect("runtime")
    }

    #[test]
    fn a_timeout_past_what_an_instant_holds_never_expires() {
        let start = Instant::now();
        let watch = Watch {
            moved: Cell::new(false),
            last_seen: Cell::new(start),
            idle: Duration::MAX,
            expired: Alarm::default(),
        };
        // `last_seen + idle` overflows: it used to panic here.
        watch.sweep(start + Duration::from_secs(3600));
        assert!(!watch.expired.is_rung());
    }

    #[test]
    fn the_period_is_a_sixteenth_of_the_timeout_within_bounds() {
        assert_eq!(period(Duration::from_secs(300)), COARSEST);
        assert_eq!(
            period(Duration::from_secs(1)),
            Duration::from_micros(62_500)
        );
        assert_eq!(period(Duration::from_millis(100)), FINEST);
    }

    #[test]
    fn an_idle_connection_expires_after_its_timeout_and_not_before() {
        runtime().block_on(async {
            let sweeper = IdleSweeper::default();
            let idle = Duration::from_millis(200);
            let guard = sweeper.watch(Instant::now(), idle);
            let start = Instant::now();
            guard.expired().await;
            let took = start.elapsed();
            assert!(took >= idle, "expired after {took:?}, before {idle:?}");
            assert!(
                took < idle + period(idle) * 4,
                "expired only after {took:?}"
            );
        });
    }

    #[test]
    fn activity_postpones_expiry() {
        runtime().block_on(async {
            let sweeper = IdleSweeper::default();
            let idle = Duration::from_millis(300);
            let guard = sweeper.watch(Instant::now(), idle);
            let start = Instant::now();
            let mut expired = pin!(guard.expired());
            // Bytes move every 100 ms for 600 ms: twice the timeout.
            for _ in 0..6 {
                let tick = pin!(crate::rt::sleep(Duration::from_millis(100)));
                match futures_util::future::select(expired.as_mut(), tick).await {
                    futures_util::future::Either::Left(_) => {
                        panic!("expired at {:?} while active", start.elapsed())
                    }
                    futures_util::future::Either::Right(_) => guard.activity().set(true),
                }
            }
            let quiet = Instant::now();
            expired.await;
            assert!(
                quiet.elapsed() >= idle,
                "expired {:?} after the last byte",
                quiet.elapsed()
            );
        });
    }

    #[test]
    fn the_sweeper_stops_with_the_last_connection_and_starts_again() {
        runtime().block_on(async {
            let sweeper = IdleSweeper::default();
            let guard = sweeper.watch(Instant::now(), Duration::from_secs(1));
            assert_eq!(sweeper.len(), 1);
            drop(guard);
            assert_eq!(sweeper.len(), 0);
            // Its next sweep finds nothing to watch and ends.
            let ended = crate::rt::timeout(Duration::from_secs(3), async {
                while sweeper.inner.borrow().period.is_some() {
                    crate::rt::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            assert!(
                ended.is_some(),
                "the sweeper kept running with nothing to watch"
            );
            // A new connection starts it again, and is swept.
            let guard = sweeper.watch(Instant::now(), Duration::from_millis(100));
            assert!(sweeper.inner.borrow().period.is_some());
            let expired = crate::rt::timeout(Duration::from_secs(3), guard.expired()).await;
            assert!(expired.is_some(), "not swept after a restart");
        });
    }
}
