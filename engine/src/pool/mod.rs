//! Warm backend connections: a few pre-established sockets per far backend,
//! per shard, that a new client connection takes over instead of waiting for
//! a TCP handshake across the backhaul (one round trip, 50–150 ms between
//! continents).
//!
//! An L4 proxy cannot share a backend connection between clients, so a pooled
//! socket is used once: a client takes it, and the pool opens another in the
//! background. Nothing is shared between shards: each shard keeps its own
//! pool, fed by its own connects, and only its own connections take from it.
//!
//! # Contract
//!
//! - [`book`] decides everything (which backends to warm, how many sockets
//!   each, when to refill, expire, close or exclude) without sockets or
//!   clocks: time is passed in, the socket check is injected.
//! - [`driver`] is the shard's side: [`ShardPool::take`] on the connection
//!   path (synchronous: one `poll(2)` per pooled socket looked at), the
//!   connect tasks that refill, and the maintenance task that follows the
//!   routing snapshot (a backend that leaves the table, turns unhealthy or
//!   drains has its pooled sockets closed within one tick).
//! - [`handover`] gives a taken socket to its client: the PROXY header (if
//!   the listener sends one) is written then, never at pre-connect, and a
//!   socket the backend had already closed is replaced by a fresh connect
//!   without the client noticing (see there for how that is known safely).
//! - [`check`] is the socket check: closed by the peer, quiet, or holding
//!   bytes nobody asked for (a backend that speaks first).
//!
//! Call order on a shard: [`ShardPool::new`], spawn [`driver::maintain`]
//! (it follows the engine's policy: `None` is off); per client connection,
//! after selection: [`ShardPool::take`], and on a hit
//! [`handover::hand_over`] before proxying.
//!
//! Plain-TCP and TLS-terminating listeners both take pooled sockets: a TLS
//! client's handshake is with this proxy, so a pooled socket is taken once
//! it is done, and the first bytes guarded are the client's first plaintext
//! (see [`handover::ClientSide`]).

pub mod book;
pub mod check;
pub(crate) mod driver;
pub(crate) mod handover;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

pub(crate) use driver::ShardPool;

/// Which backends are worth warm sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warm {
    /// Backends outside this POP's region (the default): the ones a
    /// handshake to costs a backhaul round trip.
    Remote,
    /// Every backend.
    All,
    /// Backends whose health-check RTT (EWMA) is at least this many
    /// microseconds. A backend without a measurement (health checks off) is
    /// not warmed.
    RttAtLeast(u32),
}

/// What to do with a backend whose pooled socket holds bytes before any
/// client took it (SMTP, FTP, SSH, MySQL, ...: it speaks first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeaksFirst {
    /// Stop pooling it (on this shard, while it stays in the table at the
    /// same address) and close its pooled sockets. The default: a greeting
    /// starts server-side timers and counts the connection as an
    /// unauthenticated one (see README).
    Exclude,
    /// Keep pooling it: the greeting stays unread in the socket, so the
    /// client that takes it receives it as its first bytes.
    Keep,
}

/// The pool's settings, validated by the control side.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Upper bound of idle sockets per backend, per shard (≥ 1). The pool
    /// starts each warmed backend at one and grows towards this when clients
    /// find it empty.
    pub max_per_backend: u32,
    /// A pooled socket no client took for this long is closed, and its
    /// backend's pool shrinks by one (never below one).
    pub idle_timeout: Duration,
    /// A pooled socket is closed and replaced at this age.
    pub max_lifetime: Duration,
    /// How long a background connect may take.
    pub connect_timeout: Duration,
    pub warm: Warm,
    /// Only these apps' backends; empty = every app.
    pub apps: Vec<Arc<str>>,
    pub speaks_first: SpeaksFirst,
    /// Pooled sockets (idle and connecting) on the shard, at most, over all
    /// its backends: each holds a descriptor the connection limit does not
    /// count, so the control side bounds them by the descriptors it set
    /// aside for the pool (`control::fd_limit::pool_reserve`).
    pub max_sockets: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_per_backend: 10,
            idle_timeout: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            warm: Warm::Remote,
            apps: Vec::new(),
            speaks_first: SpeaksFirst::Exclude,
            max_sockets: u32::MAX,
        }
    }
}
