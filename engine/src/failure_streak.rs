//! The log lines of a write that fails until it does not (a full disk, a
//! lock held by an operator's `sqlite3`): the failure said at once, then at
//! most once per interval while it lasts, and its end said once, only when
//! its start was. Sans-IO: the caller passes the time in.
//!
//! Why the interval outlives a streak: on a disk that is nearly full the
//! writes come and go (SQLite finds room in its WAL for one batch, not the
//! next), and a limit begun anew at every success said the ERROR and the
//! recovery at every flap, every two seconds (QA: two ERROR lines 1.6 s
//! apart "said at most every 10 s").

use std::time::{Duration, Instant};

use crate::log_limit::LogLimit;

/// One kind of write's failures, between two successes.
#[derive(Debug)]
pub struct FailureStreak {
    limit: LogLimit,
    /// Failures since the last success.
    failures: u64,
    /// Whether this streak's failure was said (its end is said only then).
    said: bool,
}

impl FailureStreak {
    pub const fn new(interval: Duration) -> Self {
        FailureStreak {
            limit: LogLimit::new(interval),
            failures: 0,
            said: false,
        }
    }

    /// One failure at `now`. `Some(n)`: say it, with the `n` failures left
    /// unsaid since the last line (of this streak or of one before);
    /// `None`: stay quiet.
    #[must_use]
    pub fn failed(&mut self, now: Instant) -> Option<u64> {
        self.failures += 1;
        let say = self.limit.hit(now);
        self.said |= say.is_some();
        say
    }

    /// One success. `Some(n)`: a streak of `n` failures whose start was
    /// said is over, to be said too; `None`: nothing was failing, or
    /// nothing of it was said (it came and went within the interval of
    /// the last line; the next line counts its failures).
    #[must_use]
    pub fn succeeded(&mut self) -> Option<u64> {
        let failures = std::mem::take(&mut self.failures);
        let said = std::mem::take(&mut self.said);
        (failures > 0 && said).then_some(failures)
    }

    /// Whether the last attempt failed.
    pub fn failing(&self) -> bool {
        self.failures > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: Duration = Duration::from_secs(10);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_lasting_failure_is_said_once_per_interval_and_its_end_once() {
        let t0 = Instant::now();
        let mut streak = FailureStreak::new(EVERY);
        assert!(!streak.failing());
        assert_eq!(streak.failed(t0), Some(0));
        for i in 1..20 {
            assert_eq!(streak.failed(at(t0, 500 * i)), None);
        }
        assert!(streak.failing());
        assert_eq!(streak.failed(at(t0, 10_000)), Some(19));
        assert_eq!(streak.succeeded(), Some(21));
        assert!(!streak.failing());
        assert_eq!(streak.succeeded(), None);
    }

    #[test]
    fn a_failure_that_comes_and_goes_is_said_once_per_interval_not_per_flap() {
        let t0 = Instant::now();
        let mut streak = FailureStreak::new(EVERY);
        assert_eq!(streak.failed(t0), Some(0));
        assert_eq!(streak.succeeded(), Some(1));
        // Flaps every second: neither the failure nor its end said again.
        for s in 1..10 {
            assert_eq!(streak.failed(at(t0, 1000 * s)), None);
            assert_eq!(streak.succeeded(), None);
        }
        // A failure past the interval is said, with the flaps left out.
        assert_eq!(streak.failed(at(t0, 10_500)), Some(9));
        assert_eq!(streak.succeeded(), Some(1));
    }

    #[test]
    fn an_unsaid_streak_that_lasts_is_said_once_the_interval_is_over() {
        let t0 = Instant::now();
        let mut streak = FailureStreak::new(EVERY);
        assert_eq!(streak.failed(t0), Some(0));
        assert_eq!(streak.succeeded(), Some(1));
        assert_eq!(streak.failed(at(t0, 2_000)), None);
        assert_eq!(streak.failed(at(t0, 12_000)), Some(1));
        assert_eq!(streak.succeeded(), Some(2));
    }
}
