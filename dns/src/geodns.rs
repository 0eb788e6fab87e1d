//! GeoDNS: an optional public zone (`edge.example.com`) whose apex answers
//! A / AAAA with the POPs nearest to the client that take traffic, from the
//! cluster's own view: the replicated POP table in the routing snapshot
//! (`RoutingSnapshot::pops`), where a POP that is dead (membership), drained
//! (`pops.draining`) or unable to serve (`pops.serving`, its own verdict) is
//! left out.
//!
//! Choosing is a pure function, [`choose`]: POPs with an address of the
//! asked family, nearest first — same country as the client, then same
//! region, then the rest — and within a tier by rendezvous hashing of the
//! client's address and the POP's id, so that clients spread over equally
//! near POPs and each keeps its POP while the set does not change (a POP
//! that leaves moves only its own clients). The client is located by its
//! EDNS Client Subnet when present, else by the resolver's address; the
//! reply's ECS scope is the source prefix for the apex's A and AAAA, 0 for
//! the rest (see `crate::ecs`).
//!
//! When no POP takes traffic the answer falls back to the live, undrained
//! POPs, judged unable to serve: answering nothing would turn a wrong
//! verdict everywhere (a shared dependency down) into a certain outage.
//! With no live POP at all the answer is empty (NODATA). [`Pool::of`] is
//! that rule; [`standing`] applies it to one POP for `edgeproxy pop status`
//! and `edgeproxy_pop_geodns_answered`, so they say what the answers do.
//!
//! Names: the apex has SOA, NS (`ns.<name>`), A and AAAA; `ns.<name>` has
//! this POP's public addresses; anything else is NXDOMAIN.

use std::net::IpAddr;

use engine::geo::GeoResolver;
use engine::snapshot::{Country, PopView, RoutingSnapshot};
use hickory_proto::op::Message;
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::ecs::Scope;
use crate::zone::{parse_domain, Apex, ZoneError, NS_LABEL};

/// POPs per answer, at most.
pub const MAX_ANSWERS: usize = 16;

/// The zone's settings, validated.
#[derive(Debug, Clone)]
pub struct GeoZone {
    /// The zone's name, name server, TTL.
    apex: Apex,
    answers: usize,
    /// This POP's public addresses: `ns.<name>`.
    ns_addrs: Vec<IpAddr>,
}

impl GeoZone {
    /// `answers`: POPs per answer (1..=[`MAX_ANSWERS`]).
    pub fn new(
        name: &str,
        ttl: u32,
        answers: usize,
        ns_addrs: Vec<IpAddr>,
    ) -> Result<GeoZone, ZoneError> {
        Ok(GeoZone {
            apex: Apex::new(parse_domain(name)?, ttl)?,
            answers: answers.clamp(1, MAX_ANSWERS),
            ns_addrs,
        })
    }

    pub fn name(&self) -> &Name {
        self.apex.name()
    }

    pub fn ttl(&self) -> u32 {
        self.apex.ttl()
    }

    pub fn soa(&self, serial: u32) -> Record {
        self.apex.soa(serial)
    }
}

/// Where the client is, as far as choosing goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientPlace<'a> {
    pub country: Option<Country>,
    pub region: Option<&'a str>,
    /// Spreads clients over equally near POPs: a hash of the client's
    /// address (0 when it opted out of being located).
    pub key: u64,
}

impl<'a> ClientPlace<'a> {
    /// Locates `ip` (`None`: the client opted out, ECS /0).
    pub fn locate(geo: &'a GeoResolver, ip: Option<IpAddr>) -> ClientPlace<'a> {
        let Some(ip) = ip else {
            return ClientPlace::default();
        };
        let (country, region) = geo.locate(ip);
        let bytes = match ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        ClientPlace {
            country,
            region,
            key: fnv1a(&bytes),
        }
    }
}

/// 0 same country, 1 same region, 2 anywhere else.
pub fn tier(pop: &PopView, client: &ClientPlace) -> u8 {
    if client.country.is_some() && pop.country == client.country {
        0
    } else if client
        .region
        .is_some_and(|r| r.eq_ignore_ascii_case(&pop.region))
    {
        1
    } else {
        2
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64's finalizer: a well-mixed score from two hashes.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether a POP has an address of `family` (`None`: any).
fn has_family(pop: &PopView, family: Option<RecordType>) -> bool {
    pop.addrs.iter().any(|a| {
        matches!(
            (family, a),
            (None, _)
                | (Some(RecordType::A), IpAddr::V4(_))
                | (Some(RecordType::AAAA), IpAddr::V6(_))
        )
    })
}

/// What [`choose`] picked from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// POPs that take traffic.
    TakingTraffic,
    /// None did: live, undrained POPs judged unable to serve.
    FallbackUnableToServe,
    /// No live POP at all.
    Empty,
}

impl Pool {
    /// Which POPs GeoDNS answers from for `family` (`None`: any): those that
    /// take traffic; when none does, the live undrained ones (the fallback).
    /// The one rule behind [`choose`] and [`standing`].
    pub fn of(pops: &[PopView], family: Option<RecordType>) -> Pool {
        let any = |pool: Pool| pops.iter().any(|p| pool.admits(p) && has_family(p, family));
        [Pool::TakingTraffic, Pool::FallbackUnableToServe]
            .into_iter()
            .find(|&pool| any(pool))
            .unwrap_or(Pool::Empty)
    }

    /// Whether `pop` is one this pool answers from.
    pub fn admits(self, pop: &PopView) -> bool {
        match self {
            Pool::TakingTraffic => pop.takes_traffic(),
            Pool::FallbackUnableToServe => pop.serving(),
            Pool::Empty => false,
        }
    }
}

/// Up to `n` POPs for `client`, nearest first, among those with an address
/// of `family` (`None`: any). Pure.
pub fn choose<'p>(
    pops: &'p [PopView],
    client: &ClientPlace,
    family: Option<RecordType>,
    n: usize,
) -> (Vec<&'p PopView>, Pool) {
    let pool = Pool::of(pops, family);
    let mut found: Vec<(u8, std::cmp::Reverse<u64>, &'p PopView)> = pops
        .iter()
        .filter(|p| pool.admits(p) && has_family(p, family))
        .map(|p| {
            let score = mix(client.key ^ fnv1a(p.node_id.as_bytes()));
            (tier(p, client), std::cmp::Reverse(score), p)
        })
        .collect();
    found.sort_by_key(|a| (a.0, a.1));
    found.truncate(n);
    (found.into_iter().map(|(_, _, p)| p).collect(), pool)
}

/// Whether GeoDNS answers a POP, as [`choose`] decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It takes traffic: answered to the clients it is nearest to.
    Answered,
    /// It cannot serve by its own verdict, but no POP can: answered anyway,
    /// as a live undrained POP (the fallback).
    Fallback,
    /// Left out: dead, drained, unable to serve while another POP can, or
    /// without a public address.
    LeftOut,
}

/// How GeoDNS stands towards `pop` (one of `pops`, or a view of it about to
/// be written): answered for some address family, the fallback for some,
/// or left out of both. For status and metrics; the answers themselves come
/// from [`choose`], by the same [`Pool`] rule.
pub fn standing(pops: &[PopView], pop: &PopView) -> Standing {
    let mut standing = Standing::LeftOut;
    for family in [RecordType::A, RecordType::AAAA] {
        if !has_family(pop, Some(family)) {
            continue;
        }
        match Pool::of(pops, Some(family)) {
            pool if !pool.admits(pop) => {}
            Pool::TakingTraffic => return Standing::Answered,
            _ => standing = Standing::Fallback,
        }
    }
    standing
}

fn address_record(name: &Name, ttl: u32, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), ttl, rdata)
}

/// One query for a name in the zone: fills `reply`'s sections. `None`: the
/// name does not exist; else for which clients the answer holds (the apex's
/// A and AAAA are chosen by the client's location, the rest is the same for
/// everyone). `rel` is the name relative to the zone, lower case (empty for
/// the apex).
pub fn lookup(
    zone: &GeoZone,
    rel: &str,
    qname: &Name,
    qtype: RecordType,
    client: &ClientPlace,
    snapshot: &RoutingSnapshot,
    reply: &mut Message,
) -> Option<Scope> {
    let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
    let mut scope = Scope::Everyone;
    match rel {
        "" => {
            if wants(RecordType::SOA) {
                reply.answers.push(zone.soa(snapshot.version as u32));
            }
            if wants(RecordType::NS) {
                reply.answers.push(zone.apex.ns());
                for &ip in &zone.ns_addrs {
                    reply
                        .additionals
                        .push(address_record(zone.apex.ns_name(), zone.ttl(), ip));
                }
            }
            for family in [RecordType::A, RecordType::AAAA] {
                if !wants(family) {
                    continue;
                }
                let (chosen, _) = choose(&snapshot.pops, client, Some(family), zone.answers);
                if !chosen.is_empty() {
                    scope = Scope::Located;
                }
                for pop in chosen {
                    for &ip in &pop.addrs {
                        if has_family_ip(ip, family) {
                            reply.answers.push(address_record(qname, zone.ttl(), ip));
                        }
                    }
                }
            }
            Some(scope)
        }
        NS_LABEL => {
            for &ip in &zone.ns_addrs {
                let family = if ip.is_ipv4() {
                    RecordType::A
                } else {
                    RecordType::AAAA
                };
                if wants(family) {
                    reply.answers.push(address_record(qname, zone.ttl(), ip));
                }
            }
            Some(Scope::Everyone)
        }
        _ => None,
    }
}

fn has_family_ip(ip: IpAddr, family: RecordType) -> bool {
    matches!(
        (ip, family),
        (IpAddr::V4(_), RecordType::A) | (IpAddr::V6(_), RecordType::AAAA)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pop(id: &str, region: &str, country: &str, addrs: &[&str]) -> PopView {
        PopView {
            node_id: Arc::from(id),
            name: Arc::from(id),
            region: Arc::from(region),
            country: Country::parse(country),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            alive: true,
            draining: false,
            can_serve: true,
            local: false,
            mesh: Default::default(),
        }
    }

    fn place(country: &str, region: &'static str, key: u64) -> ClientPlace<'static> {
        ClientPlace {
            country: Country::parse(country),
            region: Some(region),
            key,
        }
    }

    fn ids(chosen: &[&PopView]) -> Vec<String> {
        chosen.iter().map(|p| p.node_id.to_string()).collect()
    }

    fn cluster() -> Vec<PopView> {
        vec![
            pop("gru", "sa", "BR", &["203.0.113.1", "2001:db8::1"]),
            pop("scl", "sa", "CL", &["203.0.113.2"]),
            pop("fra", "eu", "DE", &["203.0.113.3", "2001:db8::3"]),
            pop("iad", "us", "US", &["203.0.113.4"]),
        ]
    }

    #[test]
    fn same_country_then_same_region_then_the_rest() {
        let pops = cluster();
        let br = place("BR", "sa", 1);
        let (chosen, pool) = choose(&pops, &br, None, 4);
        assert_eq!(pool, Pool::TakingTraffic);
        assert_eq!(ids(&chosen)[..2], ["gru", "scl"]);
        // Argentina: no POP in the country, one region away from two.
        let ar = place("AR", "sa", 1);
        let (chosen, _) = choose(&pops, &ar, None, 2);
        let mut first_two = ids(&chosen);
        first_two.sort();
        assert_eq!(first_two, ["gru", "scl"]);
        let de = place("DE", "eu", 1);
        assert_eq!(ids(&choose(&pops, &de, None, 1).0), ["fra"]);
    }

    #[test]
    fn dead_drained_and_unable_pops_are_left_out() {
        let mut pops = cluster();
        let br = place("BR", "sa", 7);
        pops[0].alive = false;
        assert_eq!(ids(&choose(&pops, &br, None, 1).0), ["scl"]);
        pops[0].alive = true;
        pops[0].draining = true;
        assert_eq!(ids(&choose(&pops, &br, None, 1).0), ["scl"]);
        pops[0].draining = false;
        pops[0].can_serve = false;
        pops[1].can_serve = false;
        // Nobody in the region can serve: the nearest that can, elsewhere.
        let (chosen, pool) = choose(&pops, &br, None, 1);
        assert_eq!(pool, Pool::TakingTraffic);
        assert!(["fra", "iad"].contains(&ids(&chosen)[0].as_str()));
    }

    #[test]
    fn when_no_pop_takes_traffic_the_live_undrained_ones_are_answered() {
        let mut pops = cluster();
        for p in &mut pops {
            p.can_serve = false;
        }
        pops[1].draining = true;
        let br = place("BR", "sa", 1);
        let (chosen, pool) = choose(&pops, &br, None, 2);
        assert_eq!(pool, Pool::FallbackUnableToServe);
        assert_eq!(ids(&chosen)[0], "gru");
        assert!(
            !ids(&chosen).contains(&"scl".to_string()),
            "drained stays out"
        );
        for p in &mut pops {
            p.alive = false;
        }
        assert_eq!(choose(&pops, &br, None, 2), (Vec::new(), Pool::Empty));
    }

    /// QA: `pop status` said "left out of answers" for a lone POP that
    /// could not serve while the fallback answered it. The standing must
    /// be what `choose` does: a POP stands answered (or as the fallback)
    /// exactly when `choose` can return it for some family.
    #[test]
    fn standing_is_what_choose_answers() {
        let br = place("BR", "sa", 1);
        let chosen_anywhere = |pops: &[PopView], id: &str| {
            [RecordType::A, RecordType::AAAA].into_iter().any(|f| {
                let (chosen, _) = choose(pops, &br, Some(f), pops.len());
                ids(&chosen).iter().any(|c| c == id)
            })
        };
        let check = |pops: &[PopView], id: &str, want: Standing| {
            let pop = pops.iter().find(|p| &*p.node_id == id).unwrap();
            assert_eq!(standing(pops, pop), want, "{id}");
            assert_eq!(chosen_anywhere(pops, id), want != Standing::LeftOut, "{id}");
        };
        // A lone POP: answered while it can serve, the fallback when it
        // cannot, left out when drained or dead.
        let mut solo = vec![pop("gru", "sa", "BR", &["203.0.113.1"])];
        check(&solo, "gru", Standing::Answered);
        solo[0].can_serve = false;
        check(&solo, "gru", Standing::Fallback);
        solo[0].draining = true;
        check(&solo, "gru", Standing::LeftOut);
        solo[0].draining = false;
        solo[0].alive = false;
        check(&solo, "gru", Standing::LeftOut);
        solo[0].alive = true;
        solo[0].addrs.clear();
        check(&solo, "gru", Standing::LeftOut);

        let mut pops = cluster();
        pops[0].can_serve = false;
        // Others take traffic: the one that cannot serve is left out.
        check(&pops, "gru", Standing::LeftOut);
        check(&pops, "scl", Standing::Answered);
        // Only IPv4-only POPs take traffic: gru is the AAAA fallback.
        pops[2].can_serve = false;
        check(&pops, "gru", Standing::Fallback);
        check(&pops, "fra", Standing::Fallback);
        check(&pops, "iad", Standing::Answered);
        for p in &mut pops {
            p.can_serve = false;
        }
        pops[1].draining = true;
        check(&pops, "gru", Standing::Fallback);
        check(&pops, "scl", Standing::LeftOut);
    }

    #[test]
    fn only_pops_with_an_address_of_the_asked_family() {
        let pops = cluster();
        let cl = place("CL", "sa", 1);
        // scl is nearest but has no IPv6 address: AAAA goes to gru.
        assert_eq!(ids(&choose(&pops, &cl, Some(RecordType::A), 1).0), ["scl"]);
        assert_eq!(
            ids(&choose(&pops, &cl, Some(RecordType::AAAA), 1).0),
            ["gru"]
        );
    }

    #[test]
    fn equally_near_pops_share_the_clients_and_each_client_keeps_its_pop() {
        let pops = vec![
            pop("us-1", "us", "US", &["198.51.100.1"]),
            pop("us-2", "us", "US", &["198.51.100.2"]),
            pop("us-3", "us", "US", &["198.51.100.3"]),
        ];
        let mut counts = std::collections::HashMap::new();
        let mut first = Vec::new();
        for key in 0..3000u64 {
            let c = place("US", "us", fnv1a(&key.to_be_bytes()));
            let (chosen, _) = choose(&pops, &c, None, 1);
            *counts.entry(chosen[0].node_id.to_string()).or_insert(0) += 1;
            first.push(chosen[0].node_id.to_string());
        }
        for (id, n) in &counts {
            assert!((700..1300).contains(n), "{id}: {n} of 3000");
        }
        // us-2 leaves: only its clients move.
        let without: Vec<PopView> = pops
            .iter()
            .filter(|p| &*p.node_id != "us-2")
            .cloned()
            .collect();
        for (key, before) in first.iter().enumerate() {
            let c = place("US", "us", fnv1a(&(key as u64).to_be_bytes()));
            let now = choose(&without, &c, None, 1).0[0].node_id.to_string();
            if before != "us-2" {
                assert_eq!(&now, before, "client {key} moved without cause");
            }
        }
    }

    /// Through the whole answerer, over the wire format: the zone next to
    /// the internal one.
    mod wire {
        use super::*;
        use crate::answer::{Answerer, Transport};
        use crate::zone::ZoneConfig;
        use engine::geo::RegionMap;
        use engine::snapshot::SnapshotBuilder;
        use hickory_proto::op::{Edns, MessageType, OpCode, Query, ResponseCode};
        use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};

        fn answerer() -> Answerer {
            let c = |s| Country::parse(s).unwrap();
            let geo = Arc::new(GeoResolver::new(
                vec![
                    ("198.18.1.0/24".parse().unwrap(), c("BR")),
                    ("198.18.2.0/24".parse().unwrap(), c("DE")),
                ],
                None,
                RegionMap::default(),
            ));
            let internal = ZoneConfig::new("internal", 5, "sa", Vec::new(), Vec::new()).unwrap();
            let zone = GeoZone::new(
                "Edge.Example.com",
                30,
                1,
                vec!["203.0.113.1".parse().unwrap()],
            )
            .unwrap();
            Answerer::new(Arc::new(internal), geo).with_geodns(zone)
        }

        fn ask(
            a: &mut Answerer,
            snap: &RoutingSnapshot,
            name: &str,
            t: RecordType,
            subnet: Option<&str>,
        ) -> Message {
            let mut q = Message::new(7, MessageType::Query, OpCode::Query);
            q.queries
                .push(Query::query(Name::from_ascii(name).unwrap(), t));
            if let Some(s) = subnet {
                let (addr, len) = s.split_once('/').unwrap();
                let mut edns = Edns::new();
                edns.options_mut()
                    .insert(EdnsOption::Subnet(ClientSubnet::new(
                        addr.parse().unwrap(),
                        len.parse().unwrap(),
                        0,
                    )));
                q.edns = Some(edns);
            }
            let mut out = Vec::new();
            a.answer(
                &q.to_vec().unwrap(),
                "192.0.2.53".parse().unwrap(),
                Transport::Udp,
                snap,
                &mut out,
            )
            .unwrap();
            Message::from_vec(&out).unwrap()
        }

        fn addrs(m: &Message) -> Vec<String> {
            m.answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0.to_string()),
                    RData::AAAA(a) => Some(a.0.to_string()),
                    _ => None,
                })
                .collect()
        }

        #[test]
        fn the_apex_answers_the_clients_pop_with_the_ecs_scope() {
            let mut snap = SnapshotBuilder::new().build(&[]).snapshot;
            snap.pops = cluster();
            let mut a = answerer();
            let r = ask(
                &mut a,
                &snap,
                "edge.example.com.",
                RecordType::A,
                Some("198.18.2.0/24"),
            );
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(r.metadata.authoritative);
            assert_eq!(addrs(&r), ["203.0.113.3"]);
            assert_eq!(r.answers[0].ttl, 30);
            let Some(EdnsOption::Subnet(ecs)) = r
                .edns
                .as_ref()
                .and_then(|e| e.options().as_ref().iter().map(|(_, o)| o).next().cloned())
            else {
                panic!("no ECS in the reply")
            };
            assert_eq!((ecs.source_prefix(), ecs.scope_prefix()), (24, 24));
            let r = ask(
                &mut a,
                &snap,
                "EDGE.example.com.",
                RecordType::AAAA,
                Some("198.18.1.0/24"),
            );
            assert_eq!(addrs(&r), ["2001:db8::1"]);
        }

        #[test]
        fn soa_ns_nxdomain_nodata_and_names_outside_both_zones() {
            let mut snap = SnapshotBuilder::new().build(&[]).snapshot;
            snap.pops = cluster();
            let mut a = answerer();
            let soa = ask(&mut a, &snap, "edge.example.com.", RecordType::SOA, None);
            assert!(matches!(soa.answers[0].data, RData::SOA(_)));
            let ns = ask(&mut a, &snap, "edge.example.com.", RecordType::NS, None);
            assert!(
                matches!(&ns.answers[0].data, RData::NS(n) if n.0.to_ascii() == "ns.edge.example.com.")
            );
            assert_eq!(
                addrs(&ask(
                    &mut a,
                    &snap,
                    "ns.edge.example.com.",
                    RecordType::A,
                    None
                )),
                ["203.0.113.1"]
            );
            let nx = ask(&mut a, &snap, "www.edge.example.com.", RecordType::A, None);
            assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
            assert!(
                matches!(&nx.authorities[0].data, RData::SOA(s) if s.mname.to_ascii() == "ns.edge.example.com.")
            );
            let nodata = ask(&mut a, &snap, "edge.example.com.", RecordType::TXT, None);
            assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
            assert!(nodata.answers.is_empty() && !nodata.authorities.is_empty());
            let refused = ask(&mut a, &snap, "example.com.", RecordType::A, None);
            assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
            // The internal zone still answers as before.
            let internal = ask(&mut a, &snap, "internal.", RecordType::SOA, None);
            assert!(
                matches!(&internal.answers[0].data, RData::SOA(s) if s.mname.to_ascii() == "ns.internal.")
            );
        }

        /// The reply's ECS (source, scope) prefixes.
        fn scope(m: &Message) -> Option<(u8, u8)> {
            m.edns
                .as_ref()?
                .options()
                .as_ref()
                .iter()
                .find_map(|(_, o)| match o {
                    EdnsOption::Subnet(s) => Some((s.source_prefix(), s.scope_prefix())),
                    _ => None,
                })
        }

        /// RFC 7871 §7.2.1: only the apex's POPs are chosen by where the
        /// client is; SOA, NS, `ns.<name>`, NXDOMAIN and NODATA are the same
        /// for every client: scope 0 (until 2026-12-06, the source prefix).
        #[test]
        fn only_the_apex_addresses_are_scoped_to_the_clients_subnet() {
            let mut snap = SnapshotBuilder::new().build(&[]).snapshot;
            snap.pops = cluster();
            let mut a = answerer();
            let subnet = Some("198.18.2.0/24");
            for t in [RecordType::A, RecordType::AAAA, RecordType::ANY] {
                let r = ask(&mut a, &snap, "edge.example.com.", t, subnet);
                assert_eq!(scope(&r), Some((24, 24)), "{t}");
            }
            for (name, t) in [
                ("edge.example.com.", RecordType::SOA),
                ("edge.example.com.", RecordType::NS),
                ("edge.example.com.", RecordType::TXT),
                ("ns.edge.example.com.", RecordType::A),
                ("www.edge.example.com.", RecordType::A),
            ] {
                let r = ask(&mut a, &snap, name, t, subnet);
                assert_eq!(scope(&r), Some((24, 0)), "{name} {t}");
            }
            // No POP alive: nothing was chosen for anyone.
            for p in &mut snap.pops {
                p.alive = false;
            }
            let r = ask(&mut a, &snap, "edge.example.com.", RecordType::A, subnet);
            assert!(r.answers.is_empty());
            assert_eq!(scope(&r), Some((24, 0)));
        }

        #[test]
        fn nothing_alive_is_nodata() {
            let mut snap = SnapshotBuilder::new().build(&[]).snapshot;
            snap.pops = cluster();
            for p in &mut snap.pops {
                p.alive = false;
            }
            let mut a = answerer();
            let r = ask(
                &mut a,
                &snap,
                "edge.example.com.",
                RecordType::A,
                Some("198.18.2.0/24"),
            );
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(r.answers.is_empty());
        }
    }
}
