//! Request rate limit: one token bucket per client IP, time passed in.
//!
//! Per client rather than global so that one noisy client cannot starve the
//! heartbeats of every other backend (and expire them). The table is
//! bounded: a full bucket is the same as no bucket, so idle clients are
//! forgotten for free; when even that leaves the table at its bound, new
//! clients are refused until buckets refill.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Clients tracked at once, at most.
const MAX_CLIENTS: usize = 16_384;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    clients: HashMap<IpAddr, Bucket>,
    max_clients: usize,
}

impl RateLimiter {
    /// `per_sec` = 0 disables the limit.
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            clients: HashMap::new(),
            max_clients: MAX_CLIENTS,
        }
    }

    /// Takes one request from `ip`'s bucket. `Err` holds how long until the
    /// next request would be allowed.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.per_sec == 0.0 {
            return Ok(());
        }
        if !self.clients.contains_key(&ip) && self.clients.len() >= self.max_clients {
            self.forget_full(now);
            if self.clients.len() >= self.max_clients {
                return Err(Duration::from_secs(1));
            }
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        let bucket = self.clients.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_sec))
        }
    }

    /// Drops the buckets that have refilled completely by `now`.
    fn forget_full(&mut self, now: Instant) {
        let (per_sec, burst) = (self.per_sec, self.burst);
        self.clients.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < burst
        });
    }

    pub fn tracked(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn burst_then_rate_per_client() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(10, 3);
        for _ in 0..3 {
            assert!(l.check(ip(1), t0).is_ok());
        }
        let wait = l.check(ip(1), t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another client is not affected.
        assert!(l.check(ip(2), t0).is_ok());
        // 100 ms later one more request is allowed, then not.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.check(ip(1), t1).is_ok());
        assert!(l.check(ip(1), t1).is_err());
        // Refill never exceeds the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.check(ip(1), t2).is_ok());
        }
        assert!(l.check(ip(1), t2).is_err());
    }

    #[test]
    fn zero_rate_means_unlimited() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(0, 0);
        for _ in 0..10_000 {
            assert!(l.check(ip(1), t0).is_ok());
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_idle_clients() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1, 2);
        l.max_clients = 2;
        assert!(l.check(ip(1), t0).is_ok());
        assert!(l.check(ip(2), t0).is_ok());
        // Both still refilling: a third client waits.
        assert!(l.check(ip(3), t0).is_err());
        assert_eq!(l.tracked(), 2);
        // Once they refilled, they are forgotten and the new client fits.
        let t1 = t0 + Duration::from_secs(2);
        assert!(l.check(ip(3), t1).is_ok());
        assert_eq!(l.tracked(), 1);
    }
}
