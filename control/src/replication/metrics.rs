//! Process-wide replication counters that are not part of the node's own
//! state: refused peers by reason, returns after longer than the tombstone
//! TTL, and the histogram of replication lag (a row's write at its origin
//! to its arrival here). Rendered with the rest of the metrics
//! (`crate::metrics`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds of the lag histogram's buckets, milliseconds.
pub const LAG_BUCKETS_MS: [u64; 12] = [10, 25, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000];

static LAG_COUNTS: [AtomicU64; 13] = [const { AtomicU64::new(0) }; 13];
static LAG_SUM_MS: AtomicU64 = AtomicU64::new(0);
static REFUSED: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
static MEMBERS_BACK_AFTER_TTL: AtomicU64 = AtomicU64::new(0);
static CONTACTS_AFTER_TTL: AtomicU64 = AtomicU64::new(0);

/// Who was out of reach for longer than the tombstone TTL.
#[derive(Debug, Clone, Copy)]
pub enum BackAfterTtl {
    /// A member, declared down here that long, is up again.
    Member,
    /// This POP heard no other POP that long, then did again.
    ThisPop,
}

pub fn count_back_after_ttl(who: BackAfterTtl) {
    match who {
        BackAfterTtl::Member => &MEMBERS_BACK_AFTER_TTL,
        BackAfterTtl::ThisPop => &CONTACTS_AFTER_TTL,
    }
    .fetch_add(1, Ordering::Relaxed);
}

/// (`member`, `this_pop`) counts of [`count_back_after_ttl`].
pub fn back_after_ttl() -> (u64, u64) {
    (
        MEMBERS_BACK_AFTER_TTL.load(Ordering::Relaxed),
        CONTACTS_AFTER_TTL.load(Ordering::Relaxed),
    )
}

pub fn observe_lag(ms: u64) {
    let i = LAG_BUCKETS_MS
        .iter()
        .position(|&b| ms <= b)
        .unwrap_or(LAG_BUCKETS_MS.len());
    LAG_COUNTS[i].fetch_add(1, Ordering::Relaxed);
    LAG_SUM_MS.fetch_add(ms, Ordering::Relaxed);
}

/// Cumulative counts per bucket (Prometheus `le` semantics; the last one is
/// `+Inf`), and the sum in ms.
pub fn lag_histogram() -> (Vec<u64>, u64) {
    let mut cumulative = Vec::with_capacity(LAG_COUNTS.len());
    let mut total = 0;
    for c in &LAG_COUNTS {
        total += c.load(Ordering::Relaxed);
        cumulative.push(total);
    }
    (cumulative, LAG_SUM_MS.load(Ordering::Relaxed))
}

pub fn count_refused(reason: &str) {
    if let Ok(mut m) = REFUSED.lock() {
        *m.entry(reason.to_string()).or_default() += 1;
    }
}

pub fn refused_by_reason() -> BTreeMap<String, u64> {
    REFUSED.lock().map(|m| m.clone()).unwrap_or_default()
}
