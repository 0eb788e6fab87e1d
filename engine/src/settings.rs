//! Data-plane settings, already validated by the control plane.
//!
//! [`EngineSettings`] are fixed for the life of the process (changing them
//! needs a restart); [`Knobs`] may change on SIGHUP and are read by every new
//! connection; [`ListenerSpec`]s may be added and removed at run time.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// One configured listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub name: Arc<str>,
    /// Port 0 asks the kernel for a free port (shared by every shard's socket).
    pub addr: SocketAddr,
    /// Serve only this app's backends; `None` serves every app.
    pub app: Option<Arc<str>>,
    /// Expect a PROXY protocol v1/v2 header from the peer (a load balancer in
    /// front); connections without a valid one are closed.
    pub accept_proxy_protocol: bool,
    /// Send a PROXY protocol v2 header to the backend with the client address.
    pub send_proxy_protocol: bool,
    /// Terminate TLS and proxy the plaintext; `None` proxies bytes as they are.
    pub tls: Option<crate::tls::TlsTermination>,
}

/// Fixed at start.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Number of shards (threads, one io_uring runtime each). ≥ 1.
    pub shards: usize,
    /// Pin shard `i` to core `i` (mod the number of cores).
    pub pin_cores: bool,
    /// Provided receive buffers per shard (power of two ≤ 32768).
    pub buffer_count: u16,
    /// Bytes per provided buffer; also the largest single read.
    pub buffer_size: u32,
    /// Move a direction's bytes with splice(2) once a read fills a whole
    /// buffer (a bulk flow): no copy through user space.
    pub splice_bulk: bool,
    /// Region of this POP, for the "local POP" selection tier.
    pub local_region: Arc<str>,
    /// Client IPs each shard's rate-limit table tracks at once (see
    /// `rate_limit`); allocated on first use.
    pub client_table_capacity: usize,
}

/// Settings that a SIGHUP can change without a restart. `Copy`, so a
/// connection takes its own copy without touching a shared refcount.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knobs {
    /// Whole-process connection limit; 0 = unlimited.
    pub max_connections: u32,
    /// Per-shard connection limit; 0 = unlimited.
    pub max_connections_per_shard: u32,
    pub connect_timeout: Duration,
    /// Backends tried per client connection before giving up.
    pub connect_attempts: NonZeroU32,
    /// Close a connection after this long with no bytes either way; zero
    /// disables.
    pub idle_timeout: Duration,
    /// How long a client stays bound to its backend; zero disables affinity.
    pub affinity_ttl: Duration,
    /// How often expired bindings are swept.
    pub affinity_gc_interval: Duration,
    /// Bindings each affinity table holds at most (each shard has one, and
    /// unsteered listeners share one more).
    pub affinity_max_clients: usize,
    /// How long a PROXY-protocol header may take to arrive.
    pub proxy_header_timeout: Duration,
    /// Weight of the health-check RTT in selection scoring, per millisecond
    /// (see `select::Scoring`); 0 = today's scoring.
    pub rtt_weight: f64,
    /// Per-client rate limit and concurrent-connection cap.
    pub client_limits: crate::rate_limit::ClientLimits,
    /// Log one line per connection when it ends (`[log] access`).
    pub access_log: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            max_connections: 100_000,
            max_connections_per_shard: 0,
            connect_timeout: Duration::from_secs(2),
            connect_attempts: NonZeroU32::new(3).unwrap(),
            idle_timeout: Duration::from_secs(300),
            affinity_ttl: Duration::from_secs(600),
            affinity_gc_interval: Duration::from_secs(60),
            affinity_max_clients: crate::affinity::DEFAULT_MAX_CLIENTS,
            proxy_header_timeout: Duration::from_secs(5),
            rtt_weight: 0.0,
            client_limits: crate::rate_limit::ClientLimits::default(),
            access_log: false,
        }
    }
}
