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
//! the queue holds about the connects in flight. Entries are held by value
//! and numbered in order, the guard keeps its number: registering costs no
//! allocation (with an `Rc` per entry it took ~250 instructions, now ~60,
//! counted with callgrind) and no clock read (the caller passes the time it
//! read for routing).
//!
//! After the timeout is lowered (SIGHUP) a new, shorter deadline may sit
//! behind older, longer ones: it expires when the sweeper reaches it, up to
//! the difference late, for the connects started before the change only.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::rc::{Rc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::alarm::Alarm;

/// One shard's pending deadlines and whether its sweeper runs.
#[derive(Default)]
pub(crate) struct Deadlines {
    inner: Rc<RefCell<Queue>>,
}

#[derive(Default)]
struct Queue {
    /// Deadlines in the order they were set: `entries[i]` is number
    /// `first + i`.
    entries: VecDeque<Entry>,
    /// The number of the front entry: every number below it has left the
    /// queue (done, or expired).
    first: u64,
    sweeping: bool,
}

struct Entry {
    deadline: Instant,
    /// The guard was dropped: nobody waits for this deadline any more.
    done: bool,
    expired: Alarm,
}

impl Queue {
    /// Where the entry numbered `number` is, while it is queued.
    fn index(&self, number: u64) -> Option<usize> {
        usize::try_from(number.checked_sub(self.first)?).ok()
    }

    fn get(&self, number: u64) -> Option<&Entry> {
        self.entries.get(self.index(number)?)
    }

    fn get_mut(&mut self, number: u64) -> Option<&mut Entry> {
        let at = self.index(number)?;
        self.entries.get_mut(at)
    }

    fn pop_front(&mut self) {
        if self.entries.pop_front().is_some() {
            self.first += 1;
        }
    }

    /// Drops done entries from the front.
    fn trim(&mut self) {
        while self.entries.front().is_some_and(|e| e.done) {
            self.pop_front();
        }
    }
}

impl Deadlines {
    /// A deadline `timeout` after `now` (the caller's own clock reading).
    /// Must run on the shard's runtime: the sweeper task starts here when it
    /// is not running.
    pub fn start(&self, now: Instant, timeout: Duration) -> DeadlineGuard {
        let mut queue = self.inner.borrow_mut();
        queue.trim();
        let number = queue.first + queue.entries.len() as u64;
        queue.entries.push_back(Entry {
            deadline: now + timeout,
            done: false,
            expired: Alarm::default(),
        });
        if !queue.sweeping {
            queue.sweeping = true;
            compio::runtime::spawn(sweeper(Rc::downgrade(&self.inner))).detach();
        }
        DeadlineGuard {
            queue: Rc::clone(&self.inner),
            number,
        }
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
                if front.done {
                    queue.pop_front();
                } else if front.deadline <= now {
                    // Its waiter is scheduled, not run here: the queue's
                    // borrow ends before it looks (it finds its number
                    // gone, which means expired).
                    front.expired.ring();
                    queue.pop_front();
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
    queue: Rc<RefCell<Queue>>,
    number: u64,
}

impl DeadlineGuard {
    /// Resolves once the deadline passed. Cheap to poll on every wake-up.
    pub fn expired(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            let Ok(queue) = self.queue.try_borrow() else {
                // Only the sweeper borrows it between polls, and never
                // across one; should that change, look again soon rather
                // than panic.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            };
            match queue.get(self.number) {
                // Not done (this guard lives), so it left the queue by
                // expiring.
                None => Poll::Ready(()),
                Some(entry) => entry.expired.poll_wait(cx),
            }
        })
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        // Taken only when free: a guard dropped while the sweeper holds the
        // queue (a task freed by the wake-up it is given) leaves its entry
        // to expire unheeded at its deadline.
        let Ok(mut queue) = self.queue.try_borrow_mut() else {
            return;
        };
        if let Some(entry) = queue.get_mut(self.number) {
            entry.done = true;
            entry.expired.forget_waker();
        }
        queue.trim();
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

    /// Entries are found by number: that must hold while others leave the
    /// queue out of order (one dropped in the middle, the front expiring).
    #[test]
    fn guards_find_their_own_entries_as_others_leave_in_any_order() {
        runtime().block_on(async {
            let deadlines = Deadlines::default();
            let timeout = Duration::from_millis(20);
            let start = Instant::now();
            let first = deadlines.start(start, timeout);
            let middle = deadlines.start(start, timeout);
            let last = deadlines.start(start + Duration::from_millis(40), timeout);
            drop(middle);
            // Done, but behind a pending front: it stays until that leaves.
            assert_eq!(deadlines.queued(), 3);
            assert_eq!(within(first, std::future::pending::<()>()).await, None);
            assert!(start.elapsed() >= timeout);
            // The front expired and the done one left behind it; the last
            // still waits for its own deadline, not the front's.
            assert_eq!(deadlines.queued(), 1);
            assert_eq!(within(last, std::future::pending::<()>()).await, None);
            assert!(start.elapsed() >= Duration::from_millis(60));
            assert_eq!(deadlines.queued(), 0);
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
