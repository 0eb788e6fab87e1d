//! Rate-limited logging for events that can repeat thousands of times a
//! second (accept failures while out of descriptors): the first occurrence is
//! logged at once, later ones at most once per interval, with how many were
//! left out in between. Sans-IO: the caller passes the time in.

use std::time::{Duration, Instant};

/// Decides which occurrences of one repeating event get a log line.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    pub const fn new(interval: Duration) -> Self {
        LogLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// One occurrence at `now`. `Some(n)`: log it, saying `n` occurrences
    /// since the last line were not logged; `None`: stay quiet.
    #[must_use]
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_hit_logs_then_one_line_per_interval_with_the_count_left_out() {
        let t0 = Instant::now();
        let mut limit = LogLimit::new(Duration::from_secs(10));
        assert_eq!(limit.hit(t0), Some(0));
        // 20 a second for 10 s: quiet.
        for i in 1..200u64 {
            assert_eq!(limit.hit(t0 + Duration::from_millis(50 * i)), None);
        }
        assert_eq!(limit.hit(t0 + Duration::from_secs(10)), Some(199));
        assert_eq!(limit.hit(t0 + Duration::from_secs(11)), None);
        assert_eq!(limit.hit(t0 + Duration::from_secs(60)), Some(1));
    }
}
