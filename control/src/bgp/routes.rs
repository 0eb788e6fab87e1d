//! The routes one session should carry, and the UPDATE messages that take
//! the peer from what it holds to that. Pure; the encoding is
//! `rustbgpd-wire`'s.
//!
//! [`Advertisement`] is what the whole POP wants announced (prefixes, the
//! drain's GRACEFUL_SHUTDOWN tag and prepends). [`Session::routes`] adds
//! what depends on the session: next hop, AS path (eBGP: this AS, plus the
//! drain's prepends; iBGP: empty, with LOCAL_PREF), MED and communities,
//! and keeps only families the peer negotiated. [`updates`] compares with
//! what was last sent (the Adj-RIB-Out) and returns withdrawals and
//! announcements, prefixes with equal attributes sharing one UPDATE.
//!
//! [`Session::routes`]: SessionContext::routes

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rustbgpd_wire::attribute::{AsPath, AsPathSegment, MpReachNlri, MpUnreachNlri, Origin};
use rustbgpd_wire::nlri::{Ipv4NlriEntry, Ipv4Prefix, Ipv6Prefix, NlriEntry, Prefix};
use rustbgpd_wire::{Afi, Ipv4UnicastMode, PathAttribute, Safi, UpdateMessage};

use super::config::{NextHop, GRACEFUL_SHUTDOWN};

/// LOCAL_PREF on iBGP sessions; RFC 8326 asks for 0 during a graceful
/// shutdown.
pub const IBGP_LOCAL_PREF: u32 = 100;
/// Prefixes per UPDATE: far below the 4096-byte limit for either family.
const PREFIXES_PER_UPDATE: usize = 100;

/// What the POP wants announced to every neighbor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advertisement {
    /// Empty: withdraw everything.
    pub prefixes: Vec<IpNet>,
    /// Tag with GRACEFUL_SHUTDOWN (and LOCAL_PREF 0 on iBGP).
    pub graceful_shutdown: bool,
    /// Extra copies of the local AS (eBGP), during a drain.
    pub prepend: u8,
    /// Bumps with every change: sessions report which one they carry.
    pub generation: u64,
}

/// The attributes one route carries on one session.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct PathAttrs {
    pub as_path: Vec<u32>,
    pub next_hop: IpAddr,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    /// Sorted, without duplicates.
    pub communities: Vec<u32>,
}

/// A session's own part of the attributes.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub local_asn: u32,
    pub peer_asn: u32,
    /// The session's local address (next hop "self").
    pub local_addr: IpAddr,
    /// On an IPv4 session, this host's IPv6 address on its link: next hop
    /// "self" of IPv6 routes (else the IPv4-mapped local address).
    pub link_ipv6: Option<Ipv6Addr>,
    pub next_hop: NextHop,
    pub med: Option<u32>,
    /// `[bgp] communities` and the neighbor's own.
    pub communities: Vec<u32>,
    /// Negotiated families.
    pub ipv4: bool,
    pub ipv6: bool,
    pub four_octet_as: bool,
}

/// Routes by prefix: what a session holds or should hold.
pub type Rib = BTreeMap<IpNet, PathAttrs>;

impl SessionContext {
    fn ibgp(&self) -> bool {
        self.local_asn == self.peer_asn
    }

    /// The next hop for a prefix of this family; `None` when there is none
    /// (an IPv4 prefix on an IPv6 session without an IPv4 `next_hop`).
    fn next_hop_for(&self, prefix: &IpNet) -> Option<IpAddr> {
        match (prefix, self.local_addr) {
            (IpNet::V4(_), _) if self.next_hop.v4.is_some() => self.next_hop.v4.map(IpAddr::V4),
            (IpNet::V6(_), _) if self.next_hop.v6.is_some() => self.next_hop.v6.map(IpAddr::V6),
            (IpNet::V4(_), IpAddr::V4(a)) => Some(IpAddr::V4(a)),
            (IpNet::V4(_), IpAddr::V6(a)) => a.to_ipv4_mapped().map(IpAddr::V4),
            (IpNet::V6(_), IpAddr::V6(a)) => Some(IpAddr::V6(a)),
            // IPv6 routes over an IPv4 session: this host's IPv6 address on
            // the session's link, as FRR does; without one the IPv4-mapped
            // address, as GoBGP does (which a Linux router cannot install:
            // it has no IPv4 gateway for IPv6 routes).
            (IpNet::V6(_), IpAddr::V4(a)) => Some(IpAddr::V6(
                self.link_ipv6.unwrap_or_else(|| a.to_ipv6_mapped()),
            )),
        }
    }

    /// The routes this session should carry for `ad`.
    pub fn routes(&self, ad: &Advertisement) -> Rib {
        let ibgp = self.ibgp();
        let as_path = if ibgp {
            Vec::new()
        } else {
            vec![self.local_asn; 1 + usize::from(ad.prepend)]
        };
        let mut communities = self.communities.clone();
        if ad.graceful_shutdown {
            communities.push(GRACEFUL_SHUTDOWN);
        }
        communities.sort_unstable();
        communities.dedup();
        let local_pref = ibgp.then_some(if ad.graceful_shutdown {
            0
        } else {
            IBGP_LOCAL_PREF
        });
        ad.prefixes
            .iter()
            .filter(|p| match p {
                IpNet::V4(_) => self.ipv4,
                IpNet::V6(_) => self.ipv6,
            })
            .filter_map(|p| {
                Some((
                    *p,
                    PathAttrs {
                        as_path: as_path.clone(),
                        next_hop: self.next_hop_for(p)?,
                        med: self.med,
                        local_pref,
                        communities: communities.clone(),
                    },
                ))
            })
            .collect()
    }
}

/// What [`updates`] found to send.
#[derive(Debug, Default)]
pub struct Delta {
    pub messages: Vec<UpdateMessage>,
    pub announced: usize,
    pub withdrawn: usize,
}

/// The UPDATEs that take a peer holding `sent` to `want`: withdrawals
/// first, then announcements grouped by attributes.
pub fn updates(sent: &Rib, want: &Rib, ctx: &SessionContext) -> Delta {
    let mut delta = Delta::default();
    let gone: Vec<IpNet> = sent
        .keys()
        .filter(|p| !want.contains_key(p))
        .copied()
        .collect();
    delta.withdrawn = gone.len();
    let (gone4, gone6): (Vec<IpNet>, Vec<IpNet>) =
        gone.into_iter().partition(|p| matches!(p, IpNet::V4(_)));
    for chunk in gone4.chunks(PREFIXES_PER_UPDATE) {
        let entries: Vec<Ipv4NlriEntry> = chunk.iter().filter_map(v4_entry).collect();
        delta.messages.push(UpdateMessage::build(
            &[],
            &entries,
            &[],
            ctx.four_octet_as,
            false,
            Ipv4UnicastMode::Body,
        ));
    }
    for chunk in gone6.chunks(PREFIXES_PER_UPDATE) {
        let unreach = MpUnreachNlri {
            afi: Afi::Ipv6,
            safi: Safi::Unicast,
            withdrawn: chunk.iter().filter_map(v6_entry).collect(),
            flowspec_withdrawn: Vec::new(),
            evpn_withdrawn: Vec::new(),
            bgpls_withdrawn: Vec::new(),
            vpn_withdrawn: Vec::new(),
            labeled_withdrawn: Vec::new(),
            rtc_withdrawn: Vec::new(),
        };
        delta.messages.push(UpdateMessage::build(
            &[],
            &[],
            &[PathAttribute::MpUnreachNlri(Box::new(unreach))],
            ctx.four_octet_as,
            false,
            Ipv4UnicastMode::Body,
        ));
    }

    // New or changed routes, grouped by (family, attributes).
    let mut groups: BTreeMap<(bool, &PathAttrs), Vec<IpNet>> = BTreeMap::new();
    for (prefix, attrs) in want {
        if sent.get(prefix) != Some(attrs) {
            groups
                .entry((matches!(prefix, IpNet::V6(_)), attrs))
                .or_default()
                .push(*prefix);
        }
    }
    for ((v6, attrs), prefixes) in groups {
        delta.announced += prefixes.len();
        for chunk in prefixes.chunks(PREFIXES_PER_UPDATE) {
            delta.messages.push(announce(v6, attrs, chunk, ctx));
        }
    }
    delta
}

fn v4_entry(p: &IpNet) -> Option<Ipv4NlriEntry> {
    match p {
        IpNet::V4(n) => Some(Ipv4NlriEntry {
            path_id: 0,
            prefix: Ipv4Prefix::new(n.network(), n.prefix_len()),
        }),
        IpNet::V6(_) => None,
    }
}

fn v6_entry(p: &IpNet) -> Option<NlriEntry> {
    match p {
        IpNet::V6(n) => Some(NlriEntry {
            path_id: 0,
            prefix: Prefix::V6(Ipv6Prefix::new(n.network(), n.prefix_len())),
        }),
        IpNet::V4(_) => None,
    }
}

/// One UPDATE announcing `prefixes` (all of one family) with `attrs`.
/// Attributes go in type-code order, as RFC 4271 recommends.
fn announce(
    v6: bool,
    attrs: &PathAttrs,
    prefixes: &[IpNet],
    ctx: &SessionContext,
) -> UpdateMessage {
    let mut list = vec![
        PathAttribute::Origin(Origin::Igp),
        PathAttribute::AsPath(AsPath {
            segments: if attrs.as_path.is_empty() {
                Vec::new()
            } else {
                vec![AsPathSegment::AsSequence(attrs.as_path.clone())]
            },
        }),
    ];
    if let (false, IpAddr::V4(hop)) = (v6, attrs.next_hop) {
        list.push(PathAttribute::NextHop(hop));
    }
    if let Some(med) = attrs.med {
        list.push(PathAttribute::Med(med));
    }
    if let Some(pref) = attrs.local_pref {
        list.push(PathAttribute::LocalPref(pref));
    }
    if !attrs.communities.is_empty() {
        list.push(PathAttribute::Communities(attrs.communities.clone()));
    }
    if v6 {
        let next_hop = match attrs.next_hop {
            IpAddr::V6(a) => a,
            IpAddr::V4(a) => a.to_ipv6_mapped(),
        };
        list.push(PathAttribute::MpReachNlri(Box::new(mp_reach(
            next_hop, prefixes,
        ))));
    }
    let entries: Vec<Ipv4NlriEntry> = if v6 {
        Vec::new()
    } else {
        prefixes.iter().filter_map(v4_entry).collect()
    };
    UpdateMessage::build(
        &entries,
        &[],
        &list,
        ctx.four_octet_as,
        false,
        Ipv4UnicastMode::Body,
    )
}

fn mp_reach(next_hop: Ipv6Addr, prefixes: &[IpNet]) -> MpReachNlri {
    MpReachNlri {
        afi: Afi::Ipv6,
        safi: Safi::Unicast,
        next_hop: IpAddr::V6(next_hop),
        link_local_next_hop: None,
        announced: prefixes.iter().filter_map(v6_entry).collect(),
        flowspec_announced: Vec::new(),
        evpn_announced: Vec::new(),
        bgpls_announced: Vec::new(),
        vpn_announced: Vec::new(),
        labeled_announced: Vec::new(),
        rtc_announced: Vec::new(),
    }
}

/// The unspecified next hop, for contexts that have no session yet.
pub const NO_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

#[cfg(test)]
mod tests {
    use super::*;
    use rustbgpd_wire::nlri::Prefix as WirePrefix;

    fn ctx(local_asn: u32, peer_asn: u32) -> SessionContext {
        SessionContext {
            local_asn,
            peer_asn,
            local_addr: "10.0.0.2".parse().unwrap(),
            link_ipv6: None,
            next_hop: NextHop::default(),
            med: Some(20),
            communities: vec![65010 << 16 | 100],
            ipv4: true,
            ipv6: true,
            four_octet_as: true,
        }
    }

    fn ad(prefixes: &[&str], graceful: bool, prepend: u8) -> Advertisement {
        Advertisement {
            prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
            graceful_shutdown: graceful,
            prepend,
            generation: 1,
        }
    }

    /// Decodes what an UPDATE says: (announced, withdrawn, attributes).
    fn read(u: &UpdateMessage) -> (Vec<String>, Vec<String>, Vec<PathAttribute>) {
        let parsed = u.parse(true, false, &[]).unwrap();
        let mut announced: Vec<String> = parsed
            .announced
            .iter()
            .map(|e| e.prefix.to_string())
            .collect();
        let mut withdrawn: Vec<String> = parsed
            .withdrawn
            .iter()
            .map(|e| e.prefix.to_string())
            .collect();
        for a in &parsed.attributes {
            match a {
                PathAttribute::MpReachNlri(r) => {
                    announced.extend(r.announced.iter().map(|e| match e.prefix {
                        WirePrefix::V6(p) => p.to_string(),
                        WirePrefix::V4(p) => p.to_string(),
                    }))
                }
                PathAttribute::MpUnreachNlri(r) => {
                    withdrawn.extend(r.withdrawn.iter().map(|e| match e.prefix {
                        WirePrefix::V6(p) => p.to_string(),
                        WirePrefix::V4(p) => p.to_string(),
                    }))
                }
                _ => {}
            }
        }
        (announced, withdrawn, parsed.attributes)
    }

    #[test]
    fn ebgp_routes_carry_this_as_next_hop_self_med_and_communities() {
        let c = ctx(65010, 65000);
        let rib = c.routes(&ad(&["198.51.100.0/24", "2001:db8:100::/48"], false, 0));
        let v4 = &rib[&"198.51.100.0/24".parse().unwrap()];
        assert_eq!(v4.as_path, [65010]);
        assert_eq!(v4.next_hop, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(v4.local_pref, None);
        let v6 = &rib[&"2001:db8:100::/48".parse().unwrap()];
        assert_eq!(v6.next_hop, "::ffff:10.0.0.2".parse::<IpAddr>().unwrap());

        let delta = updates(&Rib::new(), &rib, &c);
        assert_eq!((delta.announced, delta.withdrawn), (2, 0));
        assert_eq!(delta.messages.len(), 2, "one per family");
        let (announced, withdrawn, attrs) = read(&delta.messages[0]);
        assert_eq!(announced, ["198.51.100.0/24"]);
        assert!(withdrawn.is_empty());
        assert!(attrs.contains(&PathAttribute::NextHop("10.0.0.2".parse().unwrap())));
        assert!(attrs.contains(&PathAttribute::Med(20)));
        assert!(attrs.contains(&PathAttribute::Communities(vec![65010 << 16 | 100])));
        let codes: Vec<u8> = attrs.iter().map(PathAttribute::type_code).collect();
        let mut sorted = codes.clone();
        sorted.sort_unstable();
        assert_eq!(codes, sorted, "attributes in type-code order");
        let (announced, _, attrs) = read(&delta.messages[1]);
        assert_eq!(announced, ["2001:db8:100::/48"]);
        assert!(!attrs.iter().any(|a| matches!(a, PathAttribute::NextHop(_))));
    }

    /// IPv6 routes on an IPv4 session: the host's IPv6 address on the
    /// session's link when it has one (a Linux router cannot install an
    /// IPv4-mapped next hop), in the MP_REACH_NLRI; an explicit IPv6
    /// next hop still wins.
    #[test]
    fn ipv6_routes_on_an_ipv4_session_take_the_link_ipv6_address() {
        let mut c = ctx(65010, 65000);
        c.link_ipv6 = Some("fd77::2".parse().unwrap());
        let rib = c.routes(&ad(&["198.51.100.0/24", "2001:db8:100::/48"], false, 0));
        let v6 = &rib[&"2001:db8:100::/48".parse().unwrap()];
        assert_eq!(v6.next_hop, "fd77::2".parse::<IpAddr>().unwrap());
        let v4 = &rib[&"198.51.100.0/24".parse().unwrap()];
        assert_eq!(v4.next_hop, "10.0.0.2".parse::<IpAddr>().unwrap());
        let delta = updates(&Rib::new(), &rib, &c);
        let raw = delta.messages[1].parse(true, false, &[]).unwrap();
        let hop = raw.attributes.iter().find_map(|a| match a {
            PathAttribute::MpReachNlri(r) => Some(r.next_hop),
            _ => None,
        });
        assert_eq!(hop, Some("fd77::2".parse::<IpAddr>().unwrap()));
        c.next_hop.v6 = Some("fd00::9".parse().unwrap());
        let rib = c.routes(&ad(&["2001:db8:100::/48"], false, 0));
        assert_eq!(
            rib.values().next().unwrap().next_hop,
            "fd00::9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_drain_re_announces_with_graceful_shutdown_and_prepends() {
        let c = ctx(65010, 65000);
        let normal = c.routes(&ad(&["198.51.100.0/24"], false, 0));
        let draining = c.routes(&ad(&["198.51.100.0/24"], true, 2));
        let delta = updates(&normal, &draining, &c);
        assert_eq!((delta.announced, delta.withdrawn), (1, 0));
        let (_, _, attrs) = read(&delta.messages[0]);
        assert!(attrs.contains(&PathAttribute::Communities(vec![
            65010 << 16 | 100,
            GRACEFUL_SHUTDOWN
        ])));
        assert!(attrs.contains(&PathAttribute::AsPath(AsPath {
            segments: vec![AsPathSegment::AsSequence(vec![65010, 65010, 65010])]
        })));
        // Nothing changed: nothing to send.
        assert!(updates(&draining, &draining, &c).messages.is_empty());
    }

    #[test]
    fn withdrawing_sends_each_family_its_way() {
        let c = ctx(65010, 65000);
        let sent = c.routes(&ad(&["198.51.100.0/24", "2001:db8:100::/48"], true, 0));
        let delta = updates(&sent, &Rib::new(), &c);
        assert_eq!((delta.announced, delta.withdrawn), (0, 2));
        let mut withdrawn: Vec<String> = delta.messages.iter().flat_map(|m| read(m).1).collect();
        withdrawn.sort();
        assert_eq!(withdrawn, ["198.51.100.0/24", "2001:db8:100::/48"]);
    }

    #[test]
    fn ibgp_has_an_empty_as_path_and_local_pref_zero_when_draining() {
        let c = ctx(65010, 65010);
        let rib = c.routes(&ad(&["198.51.100.0/24"], false, 3));
        let r = &rib[&"198.51.100.0/24".parse().unwrap()];
        assert!(r.as_path.is_empty(), "no prepends inside the AS");
        assert_eq!(r.local_pref, Some(IBGP_LOCAL_PREF));
        let rib = c.routes(&ad(&["198.51.100.0/24"], true, 0));
        assert_eq!(rib.values().next().unwrap().local_pref, Some(0));
    }

    #[test]
    fn families_the_peer_did_not_negotiate_are_left_out() {
        let mut c = ctx(65010, 65000);
        c.ipv6 = false;
        let rib = c.routes(&ad(&["198.51.100.0/24", "2001:db8:100::/48"], false, 0));
        assert_eq!(rib.len(), 1);
        // An explicit next hop per family wins over "self".
        c.next_hop.v4 = Some("10.9.9.9".parse().unwrap());
        let rib = c.routes(&ad(&["198.51.100.0/24"], false, 0));
        assert_eq!(
            rib.values().next().unwrap().next_hop,
            "10.9.9.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn many_prefixes_split_into_updates_that_fit() {
        let c = ctx(65010, 65000);
        let prefixes: Vec<String> = (0..250).map(|i| format!("10.{i}.0.0/16")).collect();
        let refs: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        let rib = c.routes(&ad(&refs, false, 0));
        let delta = updates(&Rib::new(), &rib, &c);
        assert_eq!(delta.messages.len(), 3);
        assert!(delta.messages.iter().all(|m| m.encoded_len() <= 4096));
        let total: usize = delta.messages.iter().map(|m| read(m).0.len()).sum();
        assert_eq!(total, 250);
    }
}
