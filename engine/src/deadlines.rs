//! Backend connect timeouts of a shard's connections, kept in one queue.
//!
//! Why not a compio timer per connect (as before 2026-12-03): creating,
//! polling and cancelling one, with the clock read it takes, was the largest
//! piece of the user-space work edgeproxy adds per new connection over the
//! bare compio proxy (~170 ns of ~1.1 µs, README "Where edgeproxy's extra
//! CPU per new connection goes"). Every connect on a shard waits the same
//! timeout (the `connect_timeout_ms` knob), so deadlines arrive in order: a
//! FIFO queue holds them, its front is the next to expire, and one task per
//! shard sleeps until that front. A connect that finishes marks its entry
//! done; done entries leave the queue from its front as new ones arrive, so
//! the queue holds about the connects in flight. Registering costs one
//! small allocation and no clock read (the caller passes the time it read
//! for routing).
//!
//! After the timeout is lowered (SIGHUP) a new, shorter deadline may sit
//! behind older, longer ones: it expires when the sweeper reaches it, up to
//! the difference late, for the connects started before the change only.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use crate::alarm::Alarm;

/// One shard's pending deadlines and whether its sweeper runs.
#[derive(Default)]
pub(crate) struct Deadlines {
    inner: Rc<RefCell<Queue>>,
}

#[derive(Default)]
struct Queue {
    entries: VecDeque<Rc<Entry>>,
    sweeping: bool,
}

struct Entry {
    deadline: Instant,
    /// The guard was dropped: nobody waits for this deadline any more.
    done: Cell<bool>,
    expired: Alarm,
}

impl Queue {
    /// Drops done entries from the front.
    fn trim(&mut self) {
        while self.entries.front().is_some_and(|e| e.done.get()) {
            self.entries.pop_front();
        }
    }
}

impl Deadlines {
    /// A deadline `timeout` after `now` (the caller's own clock reading).
    /// Must run on the shard's runtime: the sweeper task starts here when it
    /// is not running.
    pub fn start(&self, now: Instant, timeout: Duration) -> DeadlineGuard {
        let entry = Rc::new(Entry {
            deadline: now + timeout,
            done: Cell::new(false),
            expired: Alarm::default(),
        });
        let mut queue = self.inner.borrow_mut();
        queue.trim();
        queue.entries.push_back(Rc::clone(&entry));
        if !queue.sweeping {
            queue.sweeping = true;
            compio::runtime::spawn(sweeper(Rc::downgrade(&self.inner))).detach();
        }
        DeadlineGuard { entry }
    }

    /// Entries queued now (done ones included until trimmed).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.inner.borrow().entries.len()
    }
}

/// Sleeps until the front deadline, expires what is due, until the queue
/// is empty (or the shard's context is gone).
async fn sweeper(queue: Weak<RefCell<Queue>>) {
    loop {
        let next = {
            let Some(queue) = queue.upgrade() else {
                return;
            };
            let mut queue = queue.borrow_mut();
            let now = Instant::now();
            while let Some(front) = queue.entries.front() {
                if front.done.get() {
                    queue.entries.pop_front();
                } else if front.deadline <= now {
                    front.expired.ring();
                    queue.entries.pop_front();
                } else {
                    break;
                }
            }
            match queue.entries.front() {
                Some(front) => front.deadline - now,
                None => {
                    queue.sweeping = false;
                    return;
                }
            }
        };
        crate::rt::sleep(next).await;
    }
}

/// A pending deadline; done when dropped.
pub(crate) struct DeadlineGuard {
    entry: Rc<Entry>,
}

impl DeadlineGuard {
    /// Resolves once the deadline passed. Cheap to poll on every wake-up.
    pub fn expired(&self) -> impl Future<Output = ()> + '_ {
        self.entry.expired.wait()
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        self.entry.done.set(true);
        self.entry.expired.forget_waker();
    }
}

/// `Some(output)` of `work`, or `None` when `guard`'s deadline passed first.
pub(crate) async fn within<F: Future>(guard: DeadlineGuard, work: F) -> Option<F::Output> {
    use futures_util::future::{select, Either};
    let work = std::pin::pin!(work);
    let expired = std::pin::pin!(guard.expired());
    match select(work, expired).await {
        Either::Left((output, _)) => Some(output),
        Either::Right(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> compio::runtime::Runtime {
        compio::runtime::Runtime::new().expect("runtime")
    }

    #[test]
    fn work_that_ends_in_time_returns_its_output() {
        runtime().block_on(async {
            let deadlines = Deadlines::default();
            let guard = deadlines.start(Instant::now(), Duration::from_secs(60));
            assert_eq!(within(guard, async { 7 }).await, Some(7));
        });
    }

    #[test]
    fn work_still_running_at_its_deadline_is_given_up_never_before() {
        runtime().block_on(async {
            let deadlines = Deadlines::default();
            let start = Instant::now();
            let guard = deadlines.start(start, Duration::from_millis(30));
            let outcome = within(guard, std::future::pending::<()>()).await;
            assert_eq!(outcome, None);
            assert!(start.elapsed() >= Duration::from_millis(30));
        });
    }

    /// Deadlines expire in order, each at its own time, and the queue
    /// empties (the sweeper stops) once nothing waits.
    #[test]
    fn each_deadline_expires_at_its_time_and_done_ones_leave_the_queue() {
        runtime().block_on(async {
            let deadlines = Deadlines::default();
            let timeout = Duration::from_millis(30);
            let start = Instant::now();
            // Many that finish at once, then two that do not, started 10 ms
            // apart.
            for _ in 0..100 {
                let guard = deadlines.start(start, timeout);
                assert_eq!(within(guard, async {}).await, Some(()));
            }
            let first = deadlines.start(start, timeout);
            let second = deadlines.start(start + Duration::from_millis(10), timeout);
            // Done entries were trimmed from the front as new ones came.
            assert!(deadlines.queued() <= 3, "{}", deadlines.queued());
            assert_eq!(within(first, std::future::pending::<()>()).await, None);
            assert!(start.elapsed() >= Duration::from_millis(30));
            assert_eq!(within(second, std::future::pending::<()>()).await, None);
            assert!(start.elapsed() >= Duration::from_millis(40));
            assert_eq!(deadlines.queued(), 0);
            assert!(!deadlines.inner.borrow().sweeping);
        });
    }
}
