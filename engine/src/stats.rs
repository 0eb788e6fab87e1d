//! Per-shard counters. Each shard writes only its own [`ShardStats`] (relaxed
//! atomics on a cache line of its own, so no cross-core traffic); readers sum
//! them at scrape time.
//!
//! One writer means no read-modify-write is needed: a counter is bumped
//! with a relaxed load and store ([`add_owned`]), not `fetch_add`, whose
//! locked instruction (`lock xadd` on x86) costs ~20 cycles and waits for
//! the store buffer to drain, about a dozen times per new connection and
//! twice per keep-alive request. A reader on another thread sees some
//! recent value, as it did with `fetch_add`. Counters shared by shards
//! (a backend's live connections, the process-wide total) keep `fetch_add`.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::select::Tier;

#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardStats {
    /// Connections accepted by this shard's listeners.
    pub accepted: AtomicU64,
    /// Times an accept loop of this shard paused because a connection limit
    /// was reached (clients then wait in the kernel's accept queue).
    pub limit_waits: AtomicU64,
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
    /// Directions of connections switched to splice(2) (bulk flows).
    pub spliced_flows: AtomicU64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: AtomicU64,
    /// TLS handshakes completed.
    pub tls_handshakes: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
    /// New connections refused by the per-client rate limit.
    pub rate_limited: AtomicU64,
    /// New connections refused by the per-client concurrent-connection cap.
    pub client_conn_limited: AtomicU64,
    /// Clients that took another's slot in this shard's rate-limit table
    /// (a gauge of its total so far, written by the shard).
    pub client_evictions: AtomicU64,
    /// Time to connect to a backend (successful connects only).
    pub connect_latency: LatencyHistogram,
}

/// Upper bounds (seconds) of the connect-latency buckets; a last `+Inf`
/// bucket is implied.
pub const CONNECT_LATENCY_BOUNDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A fixed-bucket histogram that records without locks or allocation.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Non-cumulative counts; index `CONNECT_LATENCY_BOUNDS.len()` is +Inf.
    pub buckets: [AtomicU64; CONNECT_LATENCY_BOUNDS.len() + 1],
    pub sum_nanos: AtomicU64,
}

/// Adds `n` to a counter that only the calling thread writes (see the
/// module documentation): a load and a store, no locked instruction. A
/// second writer would lose counts, never corrupt memory.
#[inline]
pub fn add_owned(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// [`add_owned`] for a gauge going up (`+1`) or down (`-1`).
#[inline]
pub fn step_owned(gauge: &AtomicU32, up: bool) {
    let now = gauge.load(Ordering::Relaxed);
    let next = match up {
        true => now.wrapping_add(1),
        false => now.wrapping_sub(1),
    };
    gauge.store(next, Ordering::Relaxed);
}

impl LatencyHistogram {
    /// Records one latency; only the owning shard calls it.
    pub fn record(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        let idx = CONNECT_LATENCY_BOUNDS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(CONNECT_LATENCY_BOUNDS.len());
        add_owned(&self.buckets[idx], 1);
        add_owned(&self.sum_nanos, elapsed.as_nanos() as u64);
    }
}

/// Counters of one listener on one shard.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ListenerStats {
    pub accepted: AtomicU64,
    /// Times this listener's accept loop paused at a connection limit.
    pub limit_waits: AtomicU64,
    /// Closed early for a bad or late PROXY header.
    pub rejected_proxy_header: AtomicU64,
    /// Closed early for a failed or timed-out TLS handshake.
    pub rejected_tls_handshake: AtomicU64,
    /// Closed because no backend was eligible or every one tried failed to
    /// connect.
    pub no_backend: AtomicU64,
    /// Of `no_backend`, those closed after at least one backend was tried
    /// and failed to connect (the rest had none to try): the two call for
    /// different fixes.
    pub no_backend_after_failures: AtomicU64,
    /// Refused by a per-client limit (rate or open connections).
    pub rejected_client_limit: AtomicU64,
    pub active: AtomicU32,
    /// Which clients the per-client limits refused, this interval (written
    /// on refusals only; last, away from the counters bumped per
    /// connection).
    pub refused_clients: crate::refused_clients::RefusedClients,
}

impl ShardStats {
    /// Counts one on a counter of this shard's (its `ShardStats`, or one of
    /// its `ListenerStats`).
    #[inline]
    pub fn bump(counter: &AtomicU64) {
        add_owned(counter, 1);
    }

    /// Adds `n` to a counter of this shard's.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        add_owned(counter, n);
    }

    #[inline]
    pub fn count_tier(&self, tier: Tier) {
        Self::bump(&self.tier[tier as usize]);
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

/// Bytes moved in one direction of one connection: counted for the shard
/// (metrics) and, when it writes an access-log line, for the connection
/// itself. The connection's own count is a plain `Cell` it owns: no
/// atomics, no sharing.
#[derive(Clone, Copy)]
pub(crate) struct ByteCount<'a> {
    pub shard: &'a AtomicU64,
    pub conn: Option<&'a Cell<u64>>,
}

impl ByteCount<'_> {
    #[inline]
    pub fn add(&self, n: u64) {
        ShardStats::add(self.shard, n);
        if let Some(conn) = self.conn {
            conn.set(conn.get() + n);
        }
    }
}

/// A sum over shards, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StatsSummary {
    pub accepted: u64,
    pub limit_waits: u64,
    pub rejected_proxy_header: u64,
    pub no_backend: u64,
    pub active: u64,
    pub connect_failures: u64,
    pub retries: u64,
    pub tier: [u64; 4],
    pub affinity_hits: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub spliced_flows: u64,
    pub idle_timeouts: u64,
    pub tls_handshakes: u64,
    pub tls_handshake_failures: u64,
    pub rate_limited: u64,
    pub client_conn_limited: u64,
    pub client_evictions: u64,
    /// Cumulative counts per bucket of `CONNECT_LATENCY_BOUNDS` plus +Inf.
    pub connect_latency_cumulative: Vec<u64>,
    pub connect_latency_sum_secs: f64,
}

impl StatsSummary {
    pub fn sum<'a>(shards: impl IntoIterator<Item = &'a ShardStats>) -> Self {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = StatsSummary {
            connect_latency_cumulative: vec![0; CONNECT_LATENCY_BOUNDS.len() + 1],
            ..StatsSummary::default()
        };
        for sh in shards {
            s.accepted += r(&sh.accepted);
            s.limit_waits += r(&sh.limit_waits);
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
            s.spliced_flows += r(&sh.spliced_flows);
            s.idle_timeouts += r(&sh.idle_timeouts);
            s.tls_handshakes += r(&sh.tls_handshakes);
            s.tls_handshake_failures += r(&sh.tls_handshake_failures);
            s.rate_limited += r(&sh.rate_limited);
            s.client_conn_limited += r(&sh.client_conn_limited);
            s.client_evictions += r(&sh.client_evictions);
            for (total, bucket) in s
                .connect_latency_cumulative
                .iter_mut()
                .zip(&sh.connect_latency.buckets)
            {
                *total += r(bucket);
            }
            s.connect_latency_sum_secs += r(&sh.connect_latency.sum_nanos) as f64 / 1e9;
        }
        let mut running = 0;
        for c in &mut s.connect_latency_cumulative {
            running += *c;
            *c = running;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_cumulative_across_shards() {
        let a = ShardStats::default();
        let b = ShardStats::default();
        a.connect_latency.record(Duration::from_micros(50)); // ≤ 0.1 ms
        a.connect_latency.record(Duration::from_millis(3)); // ≤ 5 ms
        b.connect_latency.record(Duration::from_secs(10)); // +Inf
        let s = StatsSummary::sum([&a, &b]);
        assert_eq!(
            s.connect_latency_cumulative.len(),
            CONNECT_LATENCY_BOUNDS.len() + 1
        );
        assert_eq!(s.connect_latency_cumulative[0], 1);
        assert_eq!(s.connect_latency_cumulative[5], 2);
        assert_eq!(*s.connect_latency_cumulative.last().unwrap(), 3);
        assert!((s.connect_latency_sum_secs - 10.00305).abs() < 1e-6);
    }

    /// The shard's own writes, read from another thread (a scrape): every
    /// count is there once the writer's work is visible to the reader.
    #[test]
    fn owned_counters_count_what_their_one_writer_adds() {
        let stats = std::sync::Arc::new(ShardStats::default());
        let writer = {
            let stats = std::sync::Arc::clone(&stats);
            std::thread::spawn(move || {
                for n in 0..1000u64 {
                    ShardStats::bump(&stats.accepted);
                    ShardStats::add(&stats.bytes_client_to_backend, n);
                    step_owned(&stats.active, true);
                    if n % 2 == 0 {
                        step_owned(&stats.active, false);
                    }
                }
            })
        };
        writer.join().unwrap();
        let s = StatsSummary::sum([&*stats]);
        assert_eq!(s.accepted, 1000);
        assert_eq!(s.bytes_client_to_backend, 999 * 1000 / 2);
        assert_eq!(s.active, 500);
    }
}
