//! Replication between POPs: every POP holds the whole routing table, and a
//! change made at any POP (discovery API, drain, heartbeat expiry, or an
//! operator's `sqlite3` edit of `routing.db`) reaches all of them.
//!
//! Layout, sans-IO core first (each testable with simulated time):
//! - [`hlc`]: hybrid logical clock, the version of every write.
//! - [`version`]: rows, keys and versions; last-writer-wins on (HLC, origin).
//! - [`replica`]: the rows a node holds and their digests.
//! - [`seal`], [`keys`]: gossip datagrams sealed with a key derived from the
//!   cluster secret; replay protection.
//! - [`wire`]: transport messages.
//! - [`frame`]: how a message travels on a connection that negotiated
//!   framing (large ones compressed).
//! - [`membership`]: SWIM (foca) as data in, data out.
//! - [`node`]: the node: broadcast and anti-entropy over membership.
//! - [`sync_budget`]: what one anti-entropy exchange carries, fitted to the
//!   link.
//! - [`seeds`]: bootstrap peers resolved again while no member answers.
//! - [`sim`]: many nodes over a simulated lossy network, for tests and the
//!   cost figures in README.
//!
//! And the thin driver around it (I/O on the control thread's runtime):
//! `db` (change capture with SQLite triggers, applying remote rows), `pki`
//! (the cluster CA derived from the secret, mutual TLS for QUIC),
//! `transport` (quinn), `driver` (the event loop), `config`, `status`.

pub mod cli;
pub mod config;
pub mod db;
pub mod driver;
pub mod frame;
pub mod hlc;
pub mod keys;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod pki;
pub mod replica;
pub mod seal;
pub mod seeds;
pub mod sim;
pub mod status;
pub mod sync_budget;
pub mod transport;
pub mod version;
pub mod wire;

#[cfg(test)]
mod tests;
