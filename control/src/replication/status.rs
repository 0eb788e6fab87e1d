//! What `GET /api/v1/cluster`, `edgeproxy cluster status` and the metrics
//! show of replication: this node, every member and its state, and the
//! counters. The driver publishes a fresh [`ClusterStatus`] whenever
//! membership changes and once a second; readers load it without waiting
//! for the driver.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// A member as seen from this node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub node_id: String,
    /// From the replicated `pops` table, once its row arrived.
    pub name: Option<String>,
    pub region: Option<String>,
    pub gossip_addr: String,
    pub transport_addr: String,
    /// `alive`, `suspect` or `down`.
    pub state: String,
    /// QUIC's smoothed round trip, once connected.
    pub rtt_ms: Option<f64>,
    /// Seconds since the last anti-entropy exchange this node started with it.
    pub last_sync_secs: Option<u64>,
    /// At that exchange the two held exactly the same rows; `None` while
    /// no exchange with it has ended since this POP started (just after a
    /// restart: not known yet, rather than "no").
    pub in_sync: Option<bool>,
    /// Delay of the last row applied from it: its write there to here.
    pub lag_ms: Option<u64>,
}

/// Monotonic counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub gossip_bytes_sent: u64,
    pub gossip_bytes_received: u64,
    pub broadcast_bytes_sent: u64,
    pub sync_bytes_sent: u64,
    pub transport_bytes_received: u64,
    pub rows_applied: u64,
    pub conflicts_resolved: u64,
    pub refused: u64,
    pub syncs: u64,
    pub syncs_in_sync: u64,
    pub messages_dropped: u64,
    /// Broadcast and sync bytes as written on QUIC streams (framed, large
    /// messages compressed); `#[serde(default)]`: absent from a status an
    /// earlier version wrote.
    #[serde(default)]
    pub transport_wire_bytes_sent: u64,
    pub local_changes: u64,
    /// Replication's writes to `routing.db` that failed (the change log's
    /// versions, rows from other POPs, this POP's own row): a full disk, a
    /// read-only file system, a lock held too long.
    #[serde(default)]
    pub store_write_failures: u64,
    /// Gossip datagrams that opened under `replication.accept_secret`, not
    /// this POP's own secret: peers still sealing with that one.
    #[serde(default)]
    pub gossip_accepted_secret: u64,
}

/// Refused peers by reason label (`secret`, `cluster`, `schema`, …).
pub type RefusedByReason = std::collections::BTreeMap<String, u64>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub enabled: bool,
    pub node_id: String,
    pub cluster: String,
    pub schema_version: u32,
    pub gossip_addr: String,
    pub transport_addr: String,
    /// Rows (and tombstones) this node holds, and their digest: two nodes
    /// with the same digest hold the same rows.
    pub rows: u64,
    pub digest: String,
    pub members: Vec<MemberView>,
    pub counters: Counters,
    pub refused: RefusedByReason,
    /// Largest delay of a row applied in the last second (origin write to
    /// here), ms.
    pub recent_lag_ms: Option<u64>,
    /// Why replication cannot write `routing.db` (its last error), while it
    /// cannot: rows from other POPs wait for it (anti-entropy brings them
    /// again), local changes are versioned once it can. `None` when its
    /// writes go through.
    #[serde(default)]
    pub store_error: Option<String>,
    /// `replication.accept_secret` is set: the secret is being rotated
    /// (README, "Rotating the cluster secret").
    #[serde(default)]
    pub accepting_second_secret: bool,
}

impl ClusterStatus {
    /// Members by state: (alive, suspect, down).
    pub fn by_state(&self) -> (usize, usize, usize) {
        let count = |s: &str| self.members.iter().filter(|m| m.state == s).count();
        (count("alive"), count("suspect"), count("down"))
    }
}

/// Where the driver publishes and readers load the status.
#[derive(Clone, Default)]
pub struct StatusHandle(Arc<ArcSwap<ClusterStatus>>);

impl StatusHandle {
    pub fn load(&self) -> Arc<ClusterStatus> {
        self.0.load_full()
    }

    pub fn publish(&self, status: ClusterStatus) {
        self.0.store(Arc::new(status));
    }
}
