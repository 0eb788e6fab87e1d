//! 6PN: private IPv6 between POPs over a WireGuard mesh that edgeproxy
//! builds from cluster membership.
//!
//! Each POP has a WireGuard key pair (`keys`), a place in the cluster's
//! ULA plan (`addressing`: a /48 per cluster, a /64 per POP, a stable
//! address per backend), and advertises its public key, WireGuard endpoint
//! and /64 in its replicated `pops` row. Every POP keeps its interface
//! configured as a full mesh of the live members: a pure reconciliation
//! (`plan`) compares what membership and the routing table ask for with
//! what the device and the kernel have, and the driver (`driver`) applies
//! the difference one peer, route or address at a time, never restarting
//! the interface.
//!
//! Layout:
//! - sans-IO: [`addressing`], [`plan`] (with its tests), [`keys`] (file
//!   I/O only), [`config`], the path verdicts ([`probe_watch`] from pings
//!   through the tunnel, [`path_watch`] from handshake ages, [`verdict`]
//!   choosing between them);
//! - I/O: [`device`] (embedded gotatun, `wireguard-go`, the kernel module),
//!   [`netlink`] (link, addresses, routes), [`pinger`] and [`prober`] (the
//!   path probes' socket and task), [`driver`] (the `mesh` thread),
//!   [`leftover`] (at start, unreachable routes a previous run left);
//! - views: [`status`], [`metrics`], [`cli`].

pub mod addressing;
pub mod cli;
pub mod config;
pub mod device;
pub mod driver;
pub mod keys;
pub mod leftover;
pub mod metrics;
pub mod netlink;
pub mod path_watch;
pub mod pinger;
pub mod plan;
pub mod probe_watch;
pub mod prober;
pub mod status;
#[cfg(test)]
mod test_netns;
pub mod verdict;
