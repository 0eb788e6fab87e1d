//! Connect backoff: how long a backend whose connects fail stays behind the
//! ones that work.
//!
//! # Contract
//!
//! [`ConnectBackoff`] is the per-backend state, shared by every shard (it
//! lives in `BackendLive`). Shards call [`ConnectBackoff::failed`] after a
//! connect to the backend failed and [`ConnectBackoff::connected`] after one
//! succeeded; selection asks [`ConnectBackoff::cooling`]. No method reads a
//! clock: the caller passes the instant it already read for the attempt.
//!
//! - The first failure marks the backend failing and *cooling* for
//!   [`BACKOFF_FIRST`] after the failure.
//! - While it cools, selection puts it behind every other eligible backend
//!   (it is still picked when nothing else is left, so that a pool that is
//!   all dead is still tried and its recovery noticed).
//! - Once the backoff has passed, the next client tries it like any other
//!   backend: a *probe*. A probe that fails doubles the backoff, up to
//!   [`BACKOFF_MAX`]: 1 s, 2 s, 4 s, 8 s, 16 s, 30 s, 30 s, …
//! - Failures of attempts that started while it was cooling (clients that
//!   picked it just before the first failure was recorded, or picked it as a
//!   last resort) do not double the backoff: one blip seen by a hundred
//!   concurrent clients is one failure, not a hundred.
//! - Any successful connect clears it all, unless the failure was a
//!   connection the backend accepted and reset before sending a byte
//!   ([`ConnectBackoff::reset_unserved`]): such a backend connects every
//!   time, so only a connection it served ([`ConnectBackoff::served`]:
//!   one it did not reset before replying), attempted after the last
//!   failure, clears that; a long connection from before the failure that
//!   ends well says nothing of the backend now. Until then a backend that
//!   answers again but only holds long connections stays marked; past its
//!   backoff it is picked like any other, so that costs it no client.
//!
//! # Cost
//!
//! Two atomics. A successful connect to a backend that is not failing
//! writes nothing (one relaxed load), as before this existed; a failed one
//! writes the retry time and at most one compare-and-swap. Selection reads
//! one atomic per candidate, and the retry time only for a failing one.
//! Concurrent updates from several shards can lose one another's retry time;
//! whichever lands is a sensible one, which is all selection needs.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a backend cools after its first failed connect.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// The longest it cools, however many probes failed in a row: long enough
/// that a dead backend costs the clients little (one probe per 30 s), short
/// enough that a backend back from a restart gets traffic again soon without
/// health checks.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The backoff after `streak` failed probes in a row (the first failure
/// included): [`BACKOFF_FIRST`] doubled `streak - 1` times, capped at
/// [`BACKOFF_MAX`].
pub fn backoff(streak: u32) -> Duration {
    let doublings = streak.saturating_sub(1).min(16);
    BACKOFF_FIRST
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX)
}

/// See the module documentation.
#[derive(Debug)]
pub struct ConnectBackoff {
    /// Times are kept as milliseconds since this, so that they fit an atomic.
    born: Instant,
    /// Failed probes in a row (0 = not failing).
    streak: AtomicU32,
    /// Milliseconds since `born` before which the backend cools; meaningful
    /// only while `streak > 0`.
    retry_at: AtomicU64,
    /// A connection it accepted was reset before it sent a byte: a
    /// successful connect no longer clears the failing state, a served
    /// connection does.
    unserved: AtomicBool,
    /// Milliseconds since `born` of the last failure recorded: a served
    /// connection attempted before it clears nothing.
    failed_at: AtomicU64,
}

impl Default for ConnectBackoff {
    fn default() -> Self {
        ConnectBackoff {
            born: Instant::now(),
            streak: AtomicU32::new(0),
            retry_at: AtomicU64::new(0),
            unserved: AtomicBool::new(false),
            failed_at: AtomicU64::new(0),
        }
    }
}

impl ConnectBackoff {
    /// `t` in milliseconds since `born`; an instant before it (read before
    /// this state existed) counts as `born`.
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.born).as_millis() as u64
    }

    /// Records a failed connect: the attempt started at `attempted`, and
    /// failed at `failed` (for a refused connect about the same instant; for
    /// a timeout, `attempted` plus the timeout). True when this marked the
    /// backend failing (it was not), which exactly one caller sees.
    pub fn failed(&self, attempted: Instant, failed: Instant) -> bool {
        let streak = self.streak.load(Ordering::Relaxed);
        if streak > 0 && self.ms(attempted) < self.retry_at.load(Ordering::Relaxed) {
            // Started while it cooled: already accounted for.
            return false;
        }
        // A first failure, or a failed probe: cool for longer, from now.
        let next = streak.saturating_add(1);
        let failed_at = self.ms(failed);
        self.failed_at.store(failed_at, Ordering::Relaxed);
        self.retry_at.store(
            failed_at + backoff(next).as_millis() as u64,
            Ordering::Relaxed,
        );
        // Only one of concurrent failures moves the streak on.
        let _ = self
            .streak
            .compare_exchange(streak, next, Ordering::Relaxed, Ordering::Relaxed);
        streak == 0
    }

    /// Records a successful connect; true when this cleared the failing
    /// state (it does not when a reset before reply set it). A plain load
    /// first: on the usual path (not failing) no shared cache line is
    /// written.
    pub fn connected(&self) -> bool {
        self.streak.load(Ordering::Relaxed) > 0
            && !self.unserved.load(Ordering::Relaxed)
            && self.streak.swap(0, Ordering::Relaxed) > 0
    }

    /// Records a connection, attempted at `attempted`, that the backend
    /// accepted and reset at `failed` before sending a byte: a failure like
    /// a refused connect (same backoff), which later connects do not clear.
    /// True when this marked the backend failing.
    pub fn reset_unserved(&self, attempted: Instant, failed: Instant) -> bool {
        self.unserved.store(true, Ordering::Relaxed);
        self.failed(attempted, failed)
    }

    /// Records a connection, attempted at `attempted`, that the backend
    /// served (it was not reset before a reply); true when this cleared a
    /// failing state set by [`reset_unserved`](Self::reset_unserved). A
    /// connect failure is cleared by a connect, not here; a connection
    /// attempted before the last failure clears nothing. One relaxed load
    /// when the backend is not failing.
    pub fn served(&self, attempted: Instant) -> bool {
        if self.streak.load(Ordering::Relaxed) == 0
            || !self.unserved.load(Ordering::Relaxed)
            || self.ms(attempted) < self.failed_at.load(Ordering::Relaxed)
        {
            return false;
        }
        self.unserved.store(false, Ordering::Relaxed);
        self.streak.swap(0, Ordering::Relaxed) > 0
    }

    /// Forgets every failure: the backend moved to another address.
    pub fn clear(&self) {
        self.unserved.store(false, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
    }

    /// The last connect attempt (or probe) failed and none succeeded since.
    pub fn is_failing(&self) -> bool {
        self.streak.load(Ordering::Relaxed) > 0
    }

    /// Failing and still inside its backoff at `now`: selection puts it
    /// behind every backend that is not.
    pub fn cooling(&self, now: Instant) -> bool {
        self.is_failing() && self.ms(now) < self.retry_at.load(Ordering::Relaxed)
    }

    /// Failed probes in a row (0 = not failing).
    pub fn streak(&self) -> u32 {
        self.streak.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_from_one_second_to_a_thirty_second_cap() {
        let secs: Vec<u64> = (0..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn a_failure_cools_the_backend_for_a_second_then_it_may_be_probed() {
        let b = ConnectBackoff::default();
        let t0 = Instant::now();
        assert!(!b.cooling(t0));
        assert!(b.failed(t0, t0));
        assert!(b.is_failing());
        assert!(b.cooling(t0));
        assert!(b.cooling(t0 + BACKOFF_FIRST - MS));
        assert!(!b.cooling(t0 + BACKOFF_FIRST));
        assert!(b.is_failing(), "probed, not forgiven");
    }

    #[test]
    fn failed_probes_double_the_backoff_up_to_the_cap() {
        let b = ConnectBackoff::default();
        let mut t = Instant::now();
        for n in 1..=8 {
            assert_eq!(b.failed(t, t), n == 1);
            assert_eq!(b.streak(), n);
            let wait = backoff(n);
            assert!(b.cooling(t + wait - MS), "probe {n}");
            assert!(!b.cooling(t + wait), "probe {n}");
            t += wait;
        }
        assert_eq!(backoff(8), BACKOFF_MAX);
    }

    #[test]
    fn failures_of_attempts_started_while_cooling_do_not_lengthen_it() {
        let b = ConnectBackoff::default();
        let t0 = Instant::now();
        b.failed(t0, t0);
        // A hundred clients that picked it before the mark, or as a last
        // resort, fail within the second.
        for k in 0..100 {
            assert!(!b.failed(t0 + k * MS, t0 + k * MS));
        }
        assert_eq!(b.streak(), 1);
        assert!(!b.cooling(t0 + BACKOFF_FIRST));
    }

    #[test]
    fn a_timeout_cools_from_when_it_timed_out() {
        let b = ConnectBackoff::default();
        let t0 = Instant::now();
        let timeout = Duration::from_secs(2);
        b.failed(t0, t0 + timeout);
        assert!(b.cooling(t0 + timeout + BACKOFF_FIRST - MS));
        assert!(!b.cooling(t0 + timeout + BACKOFF_FIRST));
    }

    #[test]
    fn a_success_clears_the_mark_and_the_next_failure_starts_over() {
        let b = ConnectBackoff::default();
        let mut t = Instant::now();
        for _ in 0..4 {
            b.failed(t, t);
            t += BACKOFF_MAX;
        }
        assert!(b.connected());
        assert!(!b.is_failing());
        assert!(!b.cooling(t));
        assert!(!b.connected(), "reported once");
        assert!(b.failed(t, t), "failing again: a new state change");
        assert_eq!(b.streak(), 1);
        assert!(!b.cooling(t + BACKOFF_FIRST));
    }

    #[test]
    fn an_instant_before_the_state_existed_counts_as_its_start() {
        let early = Instant::now();
        let b = ConnectBackoff::default();
        assert!(b.failed(early, early));
        assert!(b.cooling(b.born));
        assert!(!b.cooling(b.born + BACKOFF_FIRST));
    }

    #[test]
    fn a_reset_before_reply_is_cleared_by_a_served_connection_not_a_connect() {
        let b = ConnectBackoff::default();
        let t0 = Instant::now();
        assert!(b.reset_unserved(t0, t0), "marks it failing");
        assert!(b.cooling(t0));
        // The next probe connects (it always does) and is reset again: the
        // connect cleared nothing, so the backoff doubles.
        let probe = t0 + BACKOFF_FIRST;
        assert!(!b.connected(), "a connect does not clear it");
        assert!(!b.reset_unserved(probe, probe), "already failing");
        assert_eq!(b.streak(), 2);
        assert!(b.cooling(probe + backoff(2) - MS));
        // A connection from before the last failure that ends well says
        // nothing of the backend now.
        assert!(!b.served(t0));
        assert!(b.is_failing());
        // One attempted since, served, clears it, once.
        assert!(b.served(probe));
        assert!(!b.is_failing());
        assert!(!b.served(probe));
        // And a plain connect failure afterwards is cleared by a connect.
        assert!(b.failed(probe, probe));
        assert!(b.connected());
    }

    #[test]
    fn a_connect_failure_is_cleared_by_a_connect_not_by_an_old_connection_ending() {
        let b = ConnectBackoff::default();
        let t0 = Instant::now();
        assert!(!b.served(t0), "not failing: nothing to clear");
        b.failed(t0, t0);
        assert!(!b.served(t0 + BACKOFF_MAX), "refusing new connects still");
        assert!(b.is_failing());
        assert!(b.connected());
    }
}
