//! What `GET /api/v1/mesh`, `edgeproxy mesh status` and the metrics show of
//! the mesh. The driver publishes a fresh [`MeshStatus`] after every
//! reconciliation and once a second; readers load it without waiting.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// One WireGuard peer as this POP sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    /// The POP it belongs to (from the `pops` table), if known.
    pub node_id: Option<String>,
    pub public_key: String,
    /// Where its packets go (and last came from).
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the last completed handshake; `None`: never.
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive_secs: Option<u16>,
    /// Whether the path to the peer works: `false` when it is blocked. From
    /// the pings through the tunnel once the peer has answered one (see
    /// `probe_watch`), else from its handshake age (`path_watch`); `None`
    /// when it cannot be told (neither an answer nor a persistent
    /// keepalive of this POP's).
    #[serde(default)]
    pub path_up: Option<bool>,
    /// Round trip of the last answered ping through the tunnel, seconds;
    /// `None`: never answered (or probes off).
    #[serde(default)]
    pub probe_rtt_secs: Option<f64>,
    /// Pings to the peer that got no answer in time, since it was added;
    /// `None`: probes off.
    #[serde(default)]
    pub probes_lost: Option<u64>,
}

/// A POP of the table that is not a peer, and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SkippedView {
    pub node_id: String,
    pub reason: String,
}

/// Monotonic counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub reconciliations: u64,
    pub peers_added: u64,
    pub peers_updated: u64,
    pub peers_removed: u64,
    pub routes_changed: u64,
    pub addresses_changed: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshStatus {
    pub enabled: bool,
    /// `embedded`, `wireguard-go` or `kernel`.
    pub implementation: String,
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    /// What other POPs are told to send to.
    pub endpoint: String,
    /// The cluster's /48 and whether it was derived from the secret.
    pub cluster_prefix: String,
    pub cluster_prefix_derived: bool,
    /// This POP's /64 and address.
    pub prefix: String,
    pub address: String,
    pub mtu: Option<u32>,
    /// The socket the path probes go through (`ping socket`, `raw
    /// socket`); `None`: probes off or no socket (see `prober`).
    #[serde(default)]
    pub path_probe: Option<String>,
    pub peers: Vec<PeerView>,
    pub skipped: Vec<SkippedView>,
    pub counters: Counters,
    /// The last failure to apply a change, if the last pass had one.
    pub last_error: Option<String>,
}

/// Where the driver publishes and readers load the status.
#[derive(Clone, Default)]
pub struct StatusHandle(Arc<ArcSwap<MeshStatus>>);

impl StatusHandle {
    pub fn load(&self) -> Arc<MeshStatus> {
        self.0.load_full()
    }

    pub fn publish(&self, status: MeshStatus) {
        self.0.store(Arc::new(status));
    }
}
