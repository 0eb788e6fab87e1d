//! 6PN addressing: the cluster's private IPv6 plan. Pure functions, no I/O.
//!
//! The plan (RFC 4193 unique local addresses):
//!
//! ```text
//!  8 bits   40 bits            16 bits     64 bits
//! +------+------------------+-----------+---------------------------+
//! | fd   | global ID        | POP       | interface ID              |
//! +------+------------------+-----------+---------------------------+
//! |<---- cluster /48 ------>|           |                           |
//! |<---------- POP /64 ---------------->|                           |
//! ```
//!
//! - **Cluster /48** ([`ClusterPrefix`]): `fd` followed by a 40-bit global
//!   ID. Configured (`mesh.prefix`), or derived from the cluster secret with
//!   HKDF-SHA256 (RFC 4193 asks for a pseudo-random global ID; a derivation
//!   gives every POP the same one without coordination).
//! - **POP /64** ([`PopPrefix`]): the 16-bit subnet ID is configured
//!   (`mesh.pop_subnet`) or the first 16 bits of SHA-256 of the POP's node
//!   id, so it is stable across restarts.
//! - **POP address**: interface ID `::1` of the POP's /64.
//! - **Backend address**: the first 64 bits of SHA-256 of the backend id as
//!   interface ID inside the /64 of the POP that allocated it (the POP that
//!   received its registration): the same id at the same POP always gets the
//!   same address. Interface IDs below 2^16 are left to the POP itself (a
//!   hash landing there gets its top bit set).
//!
//! The original edgeProxy documented `fd00:edgeproxy::/48`, which is not an
//! IPv6 address at all (`edgeproxy` is not hexadecimal): this is the real
//! rule.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use ipnet::Ipv6Net;
use ring::digest;

/// Why a prefix or address is not part of a 6PN plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressingError {
    #[error("{0:?} is not an IPv6 prefix (e.g. fd12:3456:789a::/48)")]
    NotAPrefix(String),
    #[error("{0} is not a /48: the cluster prefix is fd + a 40-bit global ID (RFC 4193)")]
    NotA48(Ipv6Net),
    #[error("{0} is not a unique local prefix: it must start with fd (RFC 4193, fd00::/8)")]
    NotUla(Ipv6Net),
    #[error("{0} has bits set after its /48")]
    HostBits(Ipv6Net),
}

/// The cluster's ULA /48.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterPrefix(Ipv6Net);

/// HKDF info label for the global ID: part of the plan, never change it.
const GLOBAL_ID_INFO: &[u8] = b"6pn: rfc 4193 global id";

impl ClusterPrefix {
    /// The /48 whose global ID is `global_id` (its low 40 bits).
    pub fn from_global_id(global_id: u64) -> ClusterPrefix {
        let g = global_id & 0xff_ffff_ffff;
        let mut octets = [0u8; 16];
        octets[0] = 0xfd;
        octets[1..6].copy_from_slice(&g.to_be_bytes()[3..8]);
        ClusterPrefix(Ipv6Net::new(Ipv6Addr::from(octets), 48).expect("48 is a valid length"))
    }

    /// The /48 derived from 32 bytes of key material (the cluster secret
    /// expanded with HKDF under [`ClusterPrefix::DERIVATION_INFO`]).
    pub fn from_key_material(material: &[u8; 32]) -> ClusterPrefix {
        let mut g = [0u8; 8];
        g[3..8].copy_from_slice(&material[..5]);
        ClusterPrefix::from_global_id(u64::from_be_bytes(g))
    }

    /// The HKDF `info` label the global ID is expanded under.
    pub const DERIVATION_INFO: &'static [u8] = GLOBAL_ID_INFO;

    pub fn net(&self) -> Ipv6Net {
        self.0
    }

    /// The 40-bit global ID.
    pub fn global_id(&self) -> u64 {
        let o = self.0.addr().octets();
        let mut g = [0u8; 8];
        g[3..8].copy_from_slice(&o[1..6]);
        u64::from_be_bytes(g)
    }

    /// The /64 of the POP with subnet ID `subnet`.
    pub fn pop(&self, subnet: u16) -> PopPrefix {
        let mut o = self.0.addr().octets();
        o[6..8].copy_from_slice(&subnet.to_be_bytes());
        PopPrefix(Ipv6Net::new(Ipv6Addr::from(o), 64).expect("64 is a valid length"))
    }

    pub fn contains_net(&self, net: &Ipv6Net) -> bool {
        self.0.contains(net)
    }

    pub fn contains(&self, ip: &Ipv6Addr) -> bool {
        self.0.contains(ip)
    }
}

impl FromStr for ClusterPrefix {
    type Err = AddressingError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let net: Ipv6Net = text
            .trim()
            .parse()
            .map_err(|_| AddressingError::NotAPrefix(text.to_string()))?;
        if net.prefix_len() != 48 {
            return Err(AddressingError::NotA48(net));
        }
        if net.addr().octets()[0] != 0xfd {
            return Err(AddressingError::NotUla(net));
        }
        if net.addr() != net.network() {
            return Err(AddressingError::HostBits(net));
        }
        Ok(ClusterPrefix(net))
    }
}

impl fmt::Display for ClusterPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for ClusterPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterPrefix({})", self.0)
    }
}

/// One POP's /64.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PopPrefix(Ipv6Net);

impl PopPrefix {
    /// A /64 as written in the `pops` table (`prefix6`), if it is one.
    pub fn parse(text: &str) -> Option<PopPrefix> {
        PopPrefix::from_net(text.trim().parse().ok()?)
    }

    /// `net` if it is a /64 (no bits set after it).
    pub fn from_net(net: Ipv6Net) -> Option<PopPrefix> {
        (net.prefix_len() == 64 && net.addr() == net.network()).then_some(PopPrefix(net))
    }

    pub fn net(&self) -> Ipv6Net {
        self.0
    }

    /// The 16-bit subnet ID (bits 48..64).
    pub fn subnet(&self) -> u16 {
        let o = self.0.addr().octets();
        u16::from_be_bytes([o[6], o[7]])
    }

    /// The POP's own address: interface ID 1.
    pub fn pop_address(&self) -> Ipv6Addr {
        self.with_interface_id(1)
    }

    /// The stable address of backend `id` allocated by this POP.
    pub fn backend_address(&self, backend_id: &str) -> Ipv6Addr {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"edgeproxy 6pn backend\0");
        ctx.update(backend_id.as_bytes());
        let d = ctx.finish();
        let mut iid = [0u8; 8];
        iid.copy_from_slice(&d.as_ref()[..8]);
        let mut iid = u64::from_be_bytes(iid);
        if iid < RESERVED_INTERFACE_IDS {
            iid |= 1 << 63;
        }
        self.with_interface_id(iid)
    }

    pub fn contains(&self, ip: &Ipv6Addr) -> bool {
        self.0.contains(ip)
    }

    fn with_interface_id(&self, iid: u64) -> Ipv6Addr {
        let mut o = self.0.addr().octets();
        o[8..16].copy_from_slice(&iid.to_be_bytes());
        Ipv6Addr::from(o)
    }
}

/// Interface IDs the POP keeps for itself (`::1` is its address).
const RESERVED_INTERFACE_IDS: u64 = 1 << 16;

impl fmt::Display for PopPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for PopPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PopPrefix({})", self.0)
    }
}

/// The default subnet ID of a POP: the first 16 bits of SHA-256 of its
/// node id. Two POPs collide with probability about N²/131,072 for N POPs;
/// the mesh detects a collision and names it (set `mesh.pop_subnet`).
pub fn subnet_for_node(node_id: &str) -> u16 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"edgeproxy 6pn pop\0");
    ctx.update(node_id.as_bytes());
    let d = ctx.finish();
    u16::from_be_bytes([d.as_ref()[0], d.as_ref()[1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_prefix_is_fd_plus_forty_bits() {
        let p = ClusterPrefix::from_global_id(0x12_3456_789a);
        assert_eq!(p.to_string(), "fd12:3456:789a::/48");
        assert_eq!(p.global_id(), 0x12_3456_789a);
        // Bits above 40 are ignored, not smuggled into the prefix.
        assert_eq!(
            ClusterPrefix::from_global_id(0xffff_ff12_3456_789a),
            ClusterPrefix::from_global_id(0x12_3456_789a)
        );
    }

    #[test]
    fn derived_prefixes_follow_the_key_material() {
        let a = ClusterPrefix::from_key_material(&[7; 32]);
        let b = ClusterPrefix::from_key_material(&[8; 32]);
        assert_ne!(a, b);
        assert_eq!(a, ClusterPrefix::from_key_material(&[7; 32]));
        assert_eq!(a.to_string(), "fd07:707:707::/48");
    }

    #[test]
    fn only_a_ula_48_is_a_cluster_prefix() {
        assert!("fd12:3456:789a::/48".parse::<ClusterPrefix>().is_ok());
        for (text, want) in [
            ("fd00:edgeproxy::/48", "not an IPv6 prefix"),
            ("fd12:3456::/32", "not a /48"),
            ("fd12:3456:789a:1::/64", "not a /48"),
            ("2001:db8:1::/48", "must start with fd"),
            ("fc12:3456:789a::/48", "must start with fd"),
            ("fd12:3456:789a::1/48", "bits set after"),
        ] {
            let err = text.parse::<ClusterPrefix>().unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn a_pop_gets_a_64_and_its_address_is_interface_one() {
        let c: ClusterPrefix = "fd12:3456:789a::/48".parse().unwrap();
        let p = c.pop(0xbeef);
        assert_eq!(p.to_string(), "fd12:3456:789a:beef::/64");
        assert_eq!(p.subnet(), 0xbeef);
        assert_eq!(
            p.pop_address(),
            "fd12:3456:789a:beef::1".parse::<Ipv6Addr>().unwrap()
        );
        assert!(c.contains_net(&p.net()));
        assert_eq!(PopPrefix::parse("fd12:3456:789a:beef::/64"), Some(p));
        assert_eq!(PopPrefix::parse("fd12:3456:789a:beef::1/64"), None);
        assert_eq!(PopPrefix::parse("fd12:3456:789a::/48"), None);
    }

    #[test]
    fn backend_addresses_are_stable_distinct_and_inside_the_pop() {
        let p = ClusterPrefix::from_global_id(1).pop(2);
        let a = p.backend_address("web-1");
        assert_eq!(a, p.backend_address("web-1"), "same id, same address");
        assert_ne!(a, p.backend_address("web-2"));
        assert!(p.contains(&a));
        assert_ne!(a, p.pop_address());
        // Another POP allocates another address for the same id.
        let q = ClusterPrefix::from_global_id(1).pop(3);
        assert_ne!(q.backend_address("web-1"), a);
        // No allocation lands in the POP's reserved interface IDs.
        for i in 0..2000 {
            let ip = p.backend_address(&format!("b{i}"));
            let iid = u64::from_be_bytes(ip.octets()[8..].try_into().unwrap());
            assert!(iid >= RESERVED_INTERFACE_IDS, "{ip}");
        }
    }

    #[test]
    fn subnets_come_from_the_node_id() {
        assert_eq!(subnet_for_node("gru-1"), subnet_for_node("gru-1"));
        assert_ne!(subnet_for_node("gru-1"), subnet_for_node("fra-1"));
    }
}
