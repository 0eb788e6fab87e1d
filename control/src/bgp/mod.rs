//! Anycast: a built-in BGP speaker that announces this POP's anycast
//! prefixes to its upstream routers while the POP can serve, and withdraws
//! them when it cannot (see `crate::steering` for who decides).
//!
//! Layout, sans-IO first (each tested without sockets, with simulated
//! time):
//! - [`policy`]: should this POP announce? (announced, soft drain with
//!   GRACEFUL_SHUTDOWN, withdrawn) as a pure state machine over time.
//! - [`routes`]: the routes one session carries and the UPDATEs that get
//!   the peer there (`rustbgpd-wire` encodes them).
//! - [`session`]: one BGP session: `rustbgpd-fsm`'s state machine plus
//!   framing, timers as deadlines, the Adj-RIB-Out and restarts.
//! - [`handoff`]: an established session as a binary upgrade hands it to
//!   the successor process, beside its connection.
//! - [`link_address`]: which of the interface's IPv6 addresses is the next
//!   hop of IPv6 routes on an IPv4 session (a preferred one).
//!
//! Then the thin I/O around them: [`driver`] (a task per neighbor on the
//! control runtime), [`status`] (for the API, `edgeproxy bgp status` and
//! the metrics), [`cli`], [`config`], [`md5`] (TCP MD5 signatures, RFC
//! 2385, set on the socket before it connects).

pub mod cli;
pub mod config;
pub mod driver;
pub mod handoff;
pub mod link_address;
pub mod md5;
pub mod metrics;
pub mod policy;
pub mod routes;
pub mod session;
pub mod status;

pub use driver::Speaker;
