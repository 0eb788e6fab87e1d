//! The pool's counters on one shard (relaxed atomics written only by that
//! shard) and their sum over shards, for metrics.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct PoolStats {
    /// Client connections that took a pooled socket.
    pub hits: AtomicU64,
    /// Client connections to a warmed backend that found no usable pooled
    /// socket and connected fresh.
    pub misses: AtomicU64,
    /// Pooled sockets found closed by the backend (at a check, at the
    /// periodic sweep, or during a hand-over, where the client's bytes then
    /// went to a fresh connection instead).
    pub stale: AtomicU64,
    /// Of `stale`: found during a hand-over, after the client's first bytes
    /// were sent, and replayed on a fresh connection.
    pub replayed: AtomicU64,
    /// Pooled sockets closed by the idle timeout or the maximum lifetime.
    pub expired: AtomicU64,
    /// Background connects that succeeded / failed or timed out.
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Backends excluded from pooling because they spoke first.
    pub speaks_first_excluded: AtomicU64,
    /// Gauges: idle pooled sockets now, background connects in flight now.
    pub idle: AtomicU64,
    pub connecting: AtomicU64,
}

impl PoolStats {
    /// One writer (the shard): no locked instruction, see
    /// [`crate::stats::add_owned`].
    #[inline]
    pub(crate) fn bump(counter: &AtomicU64) {
        crate::stats::add_owned(counter, 1);
    }
}

/// [`PoolStats`] summed over shards.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolSummary {
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub replayed: u64,
    pub expired: u64,
    pub connects: u64,
    pub connect_failures: u64,
    pub speaks_first_excluded: u64,
    pub idle: u64,
    pub connecting: u64,
}

impl PoolSummary {
    pub fn add(&mut self, s: &PoolStats) {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.hits += r(&s.hits);
        self.misses += r(&s.misses);
        self.stale += r(&s.stale);
        self.replayed += r(&s.replayed);
        self.expired += r(&s.expired);
        self.connects += r(&s.connects);
        self.connect_failures += r(&s.connect_failures);
        self.speaks_first_excluded += r(&s.speaks_first_excluded);
        self.idle += r(&s.idle);
        self.connecting += r(&s.connecting);
    }
}
