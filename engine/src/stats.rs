//! Per-shard counters. Each shard writes only its own [`ShardStats`] (relaxed
//! atomics on a cache line of its own, so no cross-core traffic); readers sum
//! them at scrape time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::select::Tier;

#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardStats {
    /// Connections accepted by this shard's listeners.
    pub accepted: AtomicU64,
    /// Connections closed at once because a connection limit was reached.
    pub rejected_limit: AtomicU64,
    /// Connections closed because the PROXY header was missing or malformed.
    pub rejected_proxy_header: AtomicU64,
    /// Connections closed because no backend was eligible or all attempts
    /// failed.
    pub no_backend: AtomicU64,
    /// Client connections open on this shard right now.
    pub active: AtomicU32,
    /// Backend connect attempts that failed.
    pub connect_failures: AtomicU64,
    /// Further attempts made after a failed connect.
    pub retries: AtomicU64,
    /// Backends chosen, by geo tier (country, region, local, fallback).
    pub tier: [AtomicU64; 4],
    /// Backends chosen from an affinity binding.
    pub affinity_hits: AtomicU64,
    pub bytes_client_to_backend: AtomicU64,
    pub bytes_backend_to_client: AtomicU64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: AtomicU64,
    /// TLS handshakes completed.
    pub tls_handshakes: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
}

impl ShardStats {
    #[inline]
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn count_tier(&self, tier: Tier) {
        Self::bump(&self.tier[tier as usize]);
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

/// A sum over shards, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StatsSummary {
    pub accepted: u64,
    pub rejected_limit: u64,
    pub rejected_proxy_header: u64,
    pub no_backend: u64,
    pub active: u64,
    pub connect_failures: u64,
    pub retries: u64,
    pub tier: [u64; 4],
    pub affinity_hits: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub idle_timeouts: u64,
    pub tls_handshakes: u64,
    pub tls_handshake_failures: u64,
}

impl StatsSummary {
    pub fn sum<'a>(shards: impl IntoIterator<Item = &'a ShardStats>) -> Self {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = StatsSummary::default();
        for sh in shards {
            s.accepted += r(&sh.accepted);
            s.rejected_limit += r(&sh.rejected_limit);
            s.rejected_proxy_header += r(&sh.rejected_proxy_header);
            s.no_backend += r(&sh.no_backend);
            s.active += u64::from(sh.active());
            s.connect_failures += r(&sh.connect_failures);
            s.retries += r(&sh.retries);
            for (t, c) in s.tier.iter_mut().zip(&sh.tier) {
                *t += r(c);
            }
            s.affinity_hits += r(&sh.affinity_hits);
            s.bytes_client_to_backend += r(&sh.bytes_client_to_backend);
            s.bytes_backend_to_client += r(&sh.bytes_backend_to_client);
            s.idle_timeouts += r(&sh.idle_timeouts);
            s.tls_handshakes += r(&sh.tls_handshakes);
            s.tls_handshake_failures += r(&sh.tls_handshake_failures);
        }
        s
    }
}
