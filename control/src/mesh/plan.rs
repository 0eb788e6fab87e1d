//! Mesh reconciliation as a pure function: what the mesh should be (from
//! membership and the routing table) against what the device and the
//! kernel have, out comes a list of changes. No I/O, no clock.
//!
//! Call order, each pass: [`desired`] from the snapshot's POPs and
//! backends, then [`plan`] against the [`Current`] state read from the
//! device and netlink, then the driver applies each [`Change`] in order and
//! records the endpoints it set ([`Advertised`]).
//!
//! Rules:
//! - **Peers**: every other POP that membership calls alive and whose
//!   replicated row carries a WireGuard key, an endpoint and a 6PN /64
//!   inside this cluster's /48. A POP that is down (or left) is no peer; a
//!   draining POP still is (its open connections go on).
//! - **Conflicts** are settled the same way on every POP: POPs are taken in
//!   node-id order and the first to claim a key or a /64 keeps it; a later
//!   claimant is skipped and named ([`Skip`]), so an operator can fix it.
//! - **Per-peer changes only**: a changed endpoint, allowed IP or keepalive
//!   updates that peer in place; nothing here ever replaces the whole peer
//!   set or recreates the interface, so one POP's change never disturbs the
//!   others' tunnels.
//! - **Roaming is respected**: WireGuard moves a peer's endpoint to where
//!   its authenticated packets come from (NAT). The endpoint is set again
//!   only when the *advertised* endpoint changes, not whenever the device's
//!   differs from it.
//! - **Routes**: one `/64` per peer through the interface.
//! - **Local addresses** (inside this POP's /64 only; anything else on the
//!   interface is left alone): this POP's `::1`, every backend of the
//!   routing table whose address is in this POP's /64, and addresses pinned
//!   by a registration that has not reached the table yet.
//!
//! Changes come out in an order that never leaves traffic without a way:
//! addresses, then peers before their routes; routes removed before their
//! peers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use engine::snapshot::PopView;
use ipnet::{IpNet, Ipv6Net};

use super::addressing::{ClusterPrefix, PopPrefix};
use super::device::{PeerSpec, PeerStatus};
use super::keys::PublicKey;

/// This POP, as the plan needs it.
#[derive(Debug, Clone)]
pub struct Own {
    pub node_id: String,
    pub public_key: PublicKey,
    pub cluster: ClusterPrefix,
    pub pop: PopPrefix,
    /// Persistent keepalive for every peer (`None`: off).
    pub keepalive: Option<u16>,
}

/// A peer the mesh wants, and which POP it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub node_id: String,
    pub spec: PeerSpec,
}

/// What the mesh should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub peers: BTreeMap<PublicKey, Wanted>,
    pub addresses: BTreeSet<Ipv6Addr>,
}

/// Why a POP listed in the `pops` table is not a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Skip {
    #[error("membership says it is down")]
    Down,
    #[error("it runs no mesh (no WireGuard key in its row)")]
    NoMesh,
    #[error("its WireGuard public key {0:?} is not base64 of 32 bytes")]
    BadKey(String),
    #[error("it has this POP's own WireGuard public key (a copied key file?)")]
    OwnKey,
    #[error("it advertises no WireGuard endpoint")]
    NoEndpoint,
    #[error("it advertises no 6PN prefix")]
    NoPrefix,
    #[error("its 6PN prefix {prefix} is not a /64 inside this cluster's {cluster}: check mesh.prefix on both POPs")]
    OutsideCluster {
        prefix: Ipv6Net,
        cluster: ClusterPrefix,
    },
    #[error("its 6PN prefix {0} is this POP's own: set mesh.pop_subnet on one of them")]
    OwnPrefix(Ipv6Net),
    #[error("POP {0} claims the same WireGuard key first")]
    SameKeyAs(String),
    #[error(
        "POP {other} claims the same 6PN prefix {prefix} first: set mesh.pop_subnet on one of them"
    )]
    SamePrefixAs { other: String, prefix: Ipv6Net },
}

/// What the mesh should be, from the snapshot's POPs and backends.
/// `pinned`: addresses allocated by registrations still on their way into
/// the routing table. Returns the POPs left out, with why (`Down` and
/// `NoMesh` included: the caller decides what is worth logging).
pub fn desired<'a>(
    own: &Own,
    pops: &[PopView],
    backend_ips: impl IntoIterator<Item = IpAddr>,
    pinned: impl IntoIterator<Item = &'a Ipv6Addr>,
) -> (Desired, Vec<(String, Skip)>) {
    let mut d = Desired::default();
    let mut skipped = Vec::new();
    let mut prefixes: BTreeMap<Ipv6Net, String> = BTreeMap::new();
    let mut sorted: Vec<&PopView> = pops
        .iter()
        .filter(|p| !p.local && *p.node_id != *own.node_id)
        .collect();
    sorted.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    for pop in sorted {
        match wanted(own, pop, &d.peers, &prefixes) {
            Ok(w) => {
                prefixes.insert(w.spec.allowed, w.node_id.clone());
                d.peers.insert(w.spec.public_key, w);
            }
            Err(skip) => skipped.push((pop.node_id.to_string(), skip)),
        }
    }
    d.addresses.insert(own.pop.pop_address());
    for ip in backend_ips {
        if let IpAddr::V6(v6) = ip {
            if own.pop.contains(&v6) {
                d.addresses.insert(v6);
            }
        }
    }
    d.addresses
        .extend(pinned.into_iter().filter(|ip| own.pop.contains(ip)));
    (d, skipped)
}

fn wanted(
    own: &Own,
    pop: &PopView,
    peers: &BTreeMap<PublicKey, Wanted>,
    prefixes: &BTreeMap<Ipv6Net, String>,
) -> Result<Wanted, Skip> {
    if !pop.alive {
        return Err(Skip::Down);
    }
    let m = &pop.mesh;
    if m.public_key.trim().is_empty() {
        return Err(Skip::NoMesh);
    }
    let key =
        PublicKey::parse(&m.public_key).ok_or_else(|| Skip::BadKey(m.public_key.to_string()))?;
    if key == own.public_key {
        return Err(Skip::OwnKey);
    }
    let endpoint = m.endpoint.ok_or(Skip::NoEndpoint)?;
    let prefix = m.prefix6.ok_or(Skip::NoPrefix)?;
    if prefix.prefix_len() != 64
        || prefix.network() != prefix.addr()
        || !own.cluster.contains_net(&prefix)
    {
        return Err(Skip::OutsideCluster {
            prefix,
            cluster: own.cluster,
        });
    }
    if prefix == own.pop.net() {
        return Err(Skip::OwnPrefix(prefix));
    }
    if let Some(first) = peers.get(&key) {
        return Err(Skip::SameKeyAs(first.node_id.clone()));
    }
    if let Some(first) = prefixes.get(&prefix) {
        return Err(Skip::SamePrefixAs {
            other: first.clone(),
            prefix,
        });
    }
    Ok(Wanted {
        node_id: pop.node_id.to_string(),
        spec: PeerSpec {
            public_key: key,
            endpoint: normalize(endpoint),
            allowed: prefix,
            keepalive: own.keepalive,
        },
    })
}

/// WireGuard reports an IPv4 endpoint reached over a dual-stack socket as
/// itself; an IPv4-mapped IPv6 endpoint is written as IPv4 to compare alike.
fn normalize(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// What the device and the kernel have now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Current {
    pub peers: Vec<PeerStatus>,
    /// Global IPv6 addresses on the interface.
    pub addresses: Vec<Ipv6Addr>,
    /// Routes to POP /64s through the interface.
    pub routes: Vec<Ipv6Net>,
}

/// The endpoint the driver last set for each peer (from the peer's
/// replicated row): see "roaming" in the module docs.
pub type Advertised = BTreeMap<PublicKey, SocketAddr>;

/// Why a peer is updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The POP advertises a new endpoint (it moved, or restarted elsewhere).
    Endpoint {
        from: Option<SocketAddr>,
    },
    /// Its allowed IPs are not exactly its /64.
    AllowedIps,
    Keepalive,
}

/// One step toward the desired mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    AddAddress(Ipv6Addr),
    AddPeer(Wanted),
    UpdatePeer {
        wanted: Wanted,
        why: Update,
    },
    AddRoute(Ipv6Net),
    RemoveRoute(Ipv6Net),
    /// A peer no live POP claims (down, left, or never ours).
    RemovePeer(PublicKey),
    RemoveAddress(Ipv6Addr),
}

/// The changes that take `current` to `desired`, in a safe order.
pub fn plan(
    desired: &Desired,
    current: &Current,
    advertised: &Advertised,
    own: &Own,
) -> Vec<Change> {
    let mut adds_addr = Vec::new();
    let mut peer_ups = Vec::new();
    let mut route_adds = Vec::new();
    let mut route_dels = Vec::new();
    let mut peer_dels = Vec::new();
    let mut addr_dels = Vec::new();

    let have_addr: BTreeSet<Ipv6Addr> = current
        .addresses
        .iter()
        .copied()
        .filter(|ip| own.pop.contains(ip))
        .collect();
    adds_addr.extend(
        desired
            .addresses
            .difference(&have_addr)
            .map(|ip| Change::AddAddress(*ip)),
    );
    addr_dels.extend(
        have_addr
            .difference(&desired.addresses)
            .map(|ip| Change::RemoveAddress(*ip)),
    );

    let have_peers: BTreeMap<PublicKey, &PeerStatus> =
        current.peers.iter().map(|p| (p.public_key, p)).collect();
    for (key, w) in &desired.peers {
        match have_peers.get(key) {
            None => peer_ups.push(Change::AddPeer(w.clone())),
            Some(have) => {
                if let Some(why) = update_needed(w, have, advertised.get(key)) {
                    peer_ups.push(Change::UpdatePeer {
                        wanted: w.clone(),
                        why,
                    });
                }
            }
        }
    }
    for key in have_peers.keys() {
        if !desired.peers.contains_key(key) {
            peer_dels.push(Change::RemovePeer(*key));
        }
    }

    let want_routes: BTreeSet<Ipv6Net> = desired.peers.values().map(|w| w.spec.allowed).collect();
    let have_routes: BTreeSet<Ipv6Net> = current.routes.iter().copied().collect();
    route_adds.extend(
        want_routes
            .difference(&have_routes)
            .map(|n| Change::AddRoute(*n)),
    );
    route_dels.extend(
        have_routes
            .difference(&want_routes)
            .map(|n| Change::RemoveRoute(*n)),
    );

    let mut out = adds_addr;
    out.extend(peer_ups);
    out.extend(route_adds);
    out.extend(route_dels);
    out.extend(peer_dels);
    out.extend(addr_dels);
    out
}

fn update_needed(w: &Wanted, have: &PeerStatus, advertised: Option<&SocketAddr>) -> Option<Update> {
    let want = &w.spec;
    let have_endpoint = have.endpoint.map(normalize);
    let endpoint_moved = match (have_endpoint, advertised) {
        // Never set (or lost): set it.
        (None, _) => true,
        // The advertisement changed since we set it, and the device has not
        // already learnt the new one.
        (Some(h), Some(a)) => *a != want.endpoint && h != want.endpoint,
        // Not set by this process (a kernel interface from an earlier run):
        // set it unless it already matches.
        (Some(h), None) => h != want.endpoint,
    };
    if endpoint_moved {
        return Some(Update::Endpoint {
            from: have_endpoint,
        });
    }
    if have.allowed_ips != [IpNet::V6(want.allowed)] {
        return Some(Update::AllowedIps);
    }
    if have.keepalive != want.keepalive {
        return Some(Update::Keepalive);
    }
    None
}

#[cfg(test)]
mod tests;
