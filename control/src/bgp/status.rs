//! What `GET /api/v1/bgp`, `edgeproxy bgp status` and the metrics show of
//! the speaker: the announcement phase and every session. The session tasks
//! and the steering controller write their parts; readers copy it.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// One session as seen from here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NeighborStatus {
    /// `address` (or `address:port` off 179).
    pub neighbor: String,
    pub description: Option<String>,
    pub asn: u32,
    /// RFC 4271 state: idle, connect, active, open_sent, open_confirm,
    /// established.
    pub state: String,
    /// Seconds since the session was established.
    pub uptime_secs: Option<u64>,
    /// Negotiated hold time.
    pub hold_time_secs: Option<u16>,
    pub local_address: Option<String>,
    /// Segments to and from the neighbor carry a TCP MD5 signature (RFC
    /// 2385): a `password` is configured. Never the password itself.
    #[serde(default)]
    pub tcp_md5: bool,
    /// Prefixes the neighbor holds from us.
    pub prefixes_announced: usize,
    /// They carry GRACEFUL_SHUTDOWN.
    pub graceful_shutdown: bool,
    pub updates_sent: u64,
    /// Times the session left Established.
    pub flaps: u64,
    pub last_error: Option<String>,
    /// The BFD session's state (`up`, `init`, `down`); `None` without BFD
    /// for this neighbor (or while it is not running).
    #[serde(default)]
    pub bfd: Option<String>,
    /// Times the BFD session went from up to down (each reset the BGP
    /// session).
    #[serde(default)]
    pub bfd_downs: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BgpStatus {
    pub enabled: bool,
    pub local_asn: u32,
    pub router_id: String,
    /// Configured prefixes.
    pub prefixes: Vec<String>,
    /// `announced`, `draining` or `withdrawn`.
    pub phase: String,
    /// Why not announced (or why draining).
    pub reason: Option<String>,
    /// During a drain: milliseconds until the withdrawal.
    pub withdraw_in_ms: Option<u64>,
    pub neighbors: Vec<NeighborStatus>,
}

impl BgpStatus {
    pub fn established(&self) -> usize {
        self.neighbors
            .iter()
            .filter(|n| n.state == "established")
            .count()
    }
}

/// Shared between the writers and the readers; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct StatusHandle(Arc<Mutex<BgpStatus>>);

impl StatusHandle {
    pub fn new(initial: BgpStatus) -> StatusHandle {
        StatusHandle(Arc::new(Mutex::new(initial)))
    }

    pub fn get(&self) -> BgpStatus {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut BgpStatus)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}
