//! The pool on a shard: the [`Book`] behind a `RefCell` (one thread, never
//! borrowed across an await), the background connects that refill it, and
//! the maintenance task that follows the policy and the routing snapshot.
//!
//! Nothing here is shared with another shard: the policy is read from the
//! engine's `ArcSwapOption` once per tick (never per connection), and the
//! counters are this shard's own.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use super::book::{Book, Order};
use super::check;
use super::stats::PoolStats;
use super::Policy;
use crate::rt::{self, TcpStream};
use crate::snapshot::SnapshotHandle;

/// How often the maintenance task looks at the policy and the snapshot and
/// checks idle sockets: the longest delay before a deleted, unhealthy or
/// drained backend's pooled sockets close, before a socket the backend
/// closed is replaced, and before a policy change (SIGHUP) applies.
pub const TICK: Duration = Duration::from_millis(250);

/// One shard's pool.
pub(crate) struct ShardPool {
    book: RefCell<Book<TcpStream>>,
    /// A policy is set (the pool is on); read by every connection.
    enabled: Cell<bool>,
    pub stats: Arc<PoolStats>,
    shard: usize,
}

impl ShardPool {
    pub fn new(shard: usize, stats: Arc<PoolStats>) -> Rc<ShardPool> {
        Rc::new(ShardPool {
            book: RefCell::new(Book::new(Arc::new(Policy::default()), Arc::clone(&stats))),
            enabled: Cell::new(false),
            stats,
            shard,
        })
    }

    /// How long a hand-over waits for the backend's acknowledgement (the
    /// policy's connect timeout: a backend slower than that is not there).
    pub fn ack_patience(&self) -> Duration {
        self.book.borrow().policy().connect_timeout
    }

    /// A checked pooled socket to backend `id` at `addr`, or `None` (connect
    /// fresh). Starts the refill this take calls for.
    pub fn take(self: &Rc<Self>, id: &str, addr: SocketAddr) -> Option<TcpStream> {
        if !self.enabled.get() {
            return None;
        }
        let now = Instant::now();
        let taken = {
            let mut book = self.book.borrow_mut();
            if book.is_empty() {
                return None;
            }
            book.take(now, id, addr, |s| check::health(s.as_raw_fd()))
        };
        self.refill_of(now, id);
        taken
    }

    /// Closes every pooled socket and takes no more (shutdown).
    pub fn close_all(&self) {
        self.enabled.set(false);
        self.book.borrow_mut().clear();
    }

    /// Backend `id` greeted a client's pooled socket before the client
    /// spoke (see `handover`).
    pub fn spoke_first(&self, id: &str) {
        self.book.borrow_mut().spoke_first(id);
    }

    /// Starts a connect task for every order the book has.
    fn refill(self: &Rc<Self>, now: Instant) {
        loop {
            let Some(order) = self.book.borrow_mut().poll_connect(now) else {
                return;
            };
            rt::spawn(connect(Rc::clone(self), order)).detach();
        }
    }

    /// [`ShardPool::refill`] for one backend.
    fn refill_of(self: &Rc<Self>, now: Instant, id: &str) {
        loop {
            let Some(order) = self.book.borrow_mut().poll_connect_of(now, id) else {
                return;
            };
            rt::spawn(connect(Rc::clone(self), order)).detach();
        }
    }
}

/// One background connect.
async fn connect(pool: Rc<ShardPool>, order: Order) {
    let timeout = pool.book.borrow().policy().connect_timeout;
    let outcome = rt::timeout(timeout, rt::connect(order.addr)).await;
    let now = Instant::now();
    match outcome {
        Some(Ok(stream)) => pool.book.borrow_mut().connected(now, &order, stream),
        failed => {
            let error = match failed {
                Some(Err(e)) => e.to_string(),
                _ => format!("timed out after {timeout:?}"),
            };
            tracing::debug!(shard = pool.shard, backend = %order.id, addr = %order.addr, %error,
                "pool: background connect failed; retrying with backoff");
            pool.book.borrow_mut().connect_failed(now, &order);
        }
    }
    pool.refill_of(now, &order.id);
}

/// Keeps the shard's pool in step with the policy, the routing table and
/// the clock: every [`TICK`] (sooner when a socket expires or a retry falls
/// due) apply a new policy, refresh from a new snapshot, sweep, refill.
pub(crate) async fn maintain(
    pool: Rc<ShardPool>,
    policy: Arc<ArcSwapOption<Policy>>,
    snapshot: SnapshotHandle,
    local_region: Arc<str>,
) {
    let mut current: Option<Arc<Policy>> = None;
    let mut seen_version = None;
    loop {
        let now = Instant::now();
        let latest = policy.load_full();
        let changed = match (&current, &latest) {
            (None, None) => false,
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            _ => true,
        };
        if changed {
            match &latest {
                None => {
                    pool.enabled.set(false);
                    pool.book.borrow_mut().clear();
                    tracing::debug!(shard = pool.shard, "pool: off; pooled sockets closed");
                }
                Some(p) => {
                    pool.book.borrow_mut().set_policy(Arc::clone(p));
                    pool.enabled.set(true);
                    tracing::debug!(shard = pool.shard, policy = ?**p, "pool: policy applied");
                }
            }
            current = latest;
            seen_version = None;
        }
        let Some(active) = &current else {
            rt::sleep(TICK).await;
            continue;
        };
        {
            let snap = snapshot.load();
            // RTT-based warming follows measurements, which change without
            // a new snapshot; otherwise only a new table changes the scope.
            let rtt_based = matches!(active.warm, super::Warm::RttAtLeast(_));
            let mut book = pool.book.borrow_mut();
            if rtt_based || seen_version != Some(snap.version) {
                book.refresh(&snap, snap.region_id(&local_region));
                seen_version = Some(snap.version);
            }
            book.sweep(now, |s| check::health(s.as_raw_fd()));
        }
        pool.refill(now);
        let next = pool
            .book
            .borrow()
            .next_deadline()
            .map_or(now + TICK, |d| d.min(now + TICK));
        rt::sleep_until(next.max(now + Duration::from_millis(1))).await;
    }
}
