//! The pool on a shard: the [`Book`] behind a `RefCell` (one thread, never
//! borrowed across an await), the background connects that refill it, and
//! the maintenance task that follows the routing snapshot.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::book::{Book, Order};
use super::check;
use super::stats::PoolStats;
use super::Policy;
use crate::rt::{self, TcpStream};
use crate::snapshot::SnapshotHandle;

/// How often the maintenance task looks at the snapshot and checks idle
/// sockets: the delay before a deleted, unhealthy or drained backend's
/// pooled sockets close, and before a socket the backend closed is replaced.
pub const TICK: Duration = Duration::from_millis(250);

/// One shard's pool.
pub(crate) struct ShardPool {
    book: RefCell<Book<TcpStream>>,
    pub stats: Arc<PoolStats>,
    shard: usize,
}

impl ShardPool {
    pub fn new(shard: usize, policy: Arc<Policy>, stats: Arc<PoolStats>) -> Rc<ShardPool> {
        Rc::new(ShardPool {
            book: RefCell::new(Book::new(policy, Arc::clone(&stats))),
            stats,
            shard,
        })
    }

    pub fn policy(&self) -> Policy {
        self.book.borrow().policy().clone()
    }

    /// A checked pooled socket to backend `id` at `addr`, or `None` (connect
    /// fresh). Starts the refills this take calls for.
    pub fn take(self: &Rc<Self>, id: &str, addr: SocketAddr) -> Option<TcpStream> {
        let now = Instant::now();
        let taken = self
            .book
            .borrow_mut()
            .take(now, id, addr, |s| check::health(s.as_raw_fd()));
        self.refill(now);
        taken
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
                "pool: background connect failed");
            pool.book.borrow_mut().connect_failed(now, &order);
        }
    }
    pool.refill(now);
}

/// Keeps the shard's pool in step with the routing table and the clock:
/// every [`TICK`] (sooner when a socket expires or a retry falls due),
/// refresh from the snapshot, sweep, refill.
pub(crate) async fn maintain(pool: Rc<ShardPool>, snapshot: SnapshotHandle, local_region: Arc<str>) {
    loop {
        let now = Instant::now();
        {
            let snap = snapshot.load();
            let local = snap.region_id(&local_region);
            let mut book = pool.book.borrow_mut();
            book.refresh(&snap, local);
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
