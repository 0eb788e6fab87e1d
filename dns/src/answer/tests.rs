//! Answers for every kind of name and error, decoded back with hickory.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use engine::geo::{GeoResolver, RegionMap};
use engine::snapshot::{ActiveGuard, BackendRecord, Country, RoutingSnapshot, SnapshotBuilder};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use super::*;
use crate::zone::PopEntry;

fn rec(id: &str, app: &str, region: &str, country: &str, ip: &str) -> BackendRecord {
    BackendRecord {
        id: id.into(),
        app: app.into(),
        region: region.into(),
        country: Some(country.into()),
        ip: ip.into(),
        port: 8080,
        healthy: true,
        weight: 1,
        soft_limit: 10,
        hard_limit: 0,
        deleted: false,
    }
}

/// Clients: 200.160.2.0/24 is in BR (sa), 10.9.0.0/16 in DE (eu),
/// 10.8.0.0/16 in US; anything else is unknown.
fn geo() -> Arc<GeoResolver> {
    let c = |s| Country::parse(s).unwrap();
    Arc::new(GeoResolver::new(
        vec![
            ("200.160.2.0/24".parse().unwrap(), c("BR")),
            ("10.9.0.0/16".parse().unwrap(), c("DE")),
            ("10.8.0.0/16".parse().unwrap(), c("US")),
        ],
        None,
        RegionMap::default(),
    ))
}

fn zone(ttl: u32) -> Arc<ZoneConfig> {
    let pop = |name: &str, region: &str, addr: &str| PopEntry {
        name: name.into(),
        region: region.into(),
        addr: addr.parse().unwrap(),
    };
    Arc::new(
        ZoneConfig::new(
            "internal",
            ttl,
            "sa",
            vec![
                pop("gru-1", "sa", "10.50.0.1"),
                pop("gru-2", "sa", "fdaa::2"),
                pop("fra-1", "eu", "10.60.0.1"),
            ],
            vec!["10.50.0.1".parse().unwrap()],
        )
        .unwrap(),
    )
}

fn table() -> RoutingSnapshot {
    SnapshotBuilder::new()
        .build(&[
            rec("sa-1", "web", "sa", "BR", "10.1.0.1"),
            rec("eu-1", "web", "eu", "DE", "10.2.0.1"),
            rec("us-1", "web", "us", "US", "10.3.0.1"),
            rec("eu-6", "web", "eu", "DE", "fd00::2:1"),
            rec("v6-1", "api", "eu", "DE", "fd00::9"),
        ])
        .snapshot
}

struct Fixture {
    answerer: Answerer,
    snapshot: RoutingSnapshot,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(table())
    }

    fn with(snapshot: RoutingSnapshot) -> Fixture {
        Fixture {
            answerer: Answerer::new(zone(5), geo()),
            snapshot,
        }
    }

    fn raw(&mut self, bytes: &[u8], client: &str, transport: Transport) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let client: IpAddr = client.parse().unwrap();
        self.answerer
            .answer(bytes, client, transport, &self.snapshot, &mut out)
            .map(|_| out)
    }

    fn send(&mut self, msg: &Message, client: &str, transport: Transport) -> Message {
        let reply = self
            .raw(&msg.to_vec().unwrap(), client, transport)
            .expect("a reply");
        let reply = Message::from_vec(&reply).expect("reply decodes");
        assert_eq!(reply.metadata.id, msg.metadata.id);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        reply
    }

    fn ask(&mut self, name: &str, qtype: RecordType) -> Message {
        self.send(&query(name, qtype), "127.0.0.1", Transport::Udp)
    }
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut msg = Message::new(0x1234, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    msg
}

fn with_edns(mut msg: Message, size: u16, subnet: Option<&str>) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(size);
    if let Some(s) = subnet {
        let net: ClientSubnet = s.parse().unwrap();
        edns.options_mut().insert(EdnsOption::Subnet(net));
    }
    msg.set_edns(edns);
    msg
}

/// The addresses in the answer section, in order.
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

fn authority_is_soa(m: &Message) -> bool {
    m.authorities.len() == 1 && m.authorities[0].record_type() == RecordType::SOA
}

#[test]
fn app_answer_is_the_backend_the_proxy_would_pick_for_the_client() {
    let mut f = Fixture::new();
    let q = query("web.internal.", RecordType::A);
    let for_client = |f: &mut Fixture, ip: &str| addrs(&f.send(&q, ip, Transport::Udp));
    assert_eq!(for_client(&mut f, "200.160.2.9"), ["10.1.0.1"]);
    assert_eq!(for_client(&mut f, "10.9.1.1"), ["10.2.0.1"]);
    assert_eq!(for_client(&mut f, "10.8.1.1"), ["10.3.0.1"]);
    // Unknown client: the local POP's region (sa) wins.
    assert_eq!(for_client(&mut f, "192.0.2.1"), ["10.1.0.1"]);
    let reply = f.send(&q, "10.9.1.1", Transport::Udp);
    assert!(reply.metadata.authoritative);
    assert!(!reply.metadata.recursion_available);
    assert!(reply.metadata.recursion_desired, "RD is copied");
    assert_eq!(reply.answers[0].ttl, 5);
    assert_eq!(reply.answers[0].name.to_ascii(), "web.internal.");
}

#[test]
fn load_steers_within_a_tier_like_the_proxy() {
    let snap = SnapshotBuilder::new()
        .build(&[
            rec("a", "web", "sa", "BR", "10.1.0.1"),
            rec("b", "web", "sa", "BR", "10.1.0.2"),
        ])
        .snapshot;
    let busy = ActiveGuard::new(Arc::clone(&snap.backends[0].live));
    let mut f = Fixture::with(snap);
    let q = query("web.internal.", RecordType::A);
    assert_eq!(
        addrs(&f.send(&q, "200.160.2.1", Transport::Udp)),
        ["10.1.0.2"]
    );
    drop(busy);
    assert_eq!(
        addrs(&f.send(&q, "200.160.2.1", Transport::Udp)),
        ["10.1.0.1"]
    );
}

#[test]
fn client_subnet_overrides_the_source_and_is_echoed_with_scope() {
    let mut f = Fixture::new();
    let q = with_edns(
        query("web.internal.", RecordType::A),
        1232,
        Some("10.9.0.0/16"),
    );
    let reply = f.send(&q, "200.160.2.9", Transport::Udp);
    assert_eq!(addrs(&reply), ["10.2.0.1"]);
    let edns = reply.edns.expect("OPT in reply");
    let Some(EdnsOption::Subnet(s)) = edns.option(hickory_proto::rr::rdata::opt::EdnsCode::Subnet)
    else {
        panic!("no ECS in reply")
    };
    assert_eq!((s.source_prefix(), s.scope_prefix()), (16, 16));
    assert_eq!(edns.max_payload(), MAX_UDP_PAYLOAD);
    // /0: the client opts out; not even the source address is used.
    let q = with_edns(
        query("web.internal.", RecordType::A),
        1232,
        Some("0.0.0.0/0"),
    );
    assert_eq!(addrs(&f.send(&q, "10.9.1.1", Transport::Udp)), ["10.1.0.1"]);
}

/// The reply's ECS option as (source prefix, scope prefix), address checked
/// to be the one asked for.
fn ecs_echo(reply: &Message, asked: &str) -> Option<(u8, u8)> {
    let edns = reply.edns.as_ref()?;
    let EdnsOption::Subnet(s) = edns.option(hickory_proto::rr::rdata::opt::EdnsCode::Subnet)?
    else {
        return None;
    };
    let asked: ClientSubnet = asked.parse().unwrap();
    assert_eq!(s.addr(), asked.addr(), "echoed address");
    Some((s.source_prefix(), s.scope_prefix()))
}

/// RFC 7871 §7.2.1: the scope says for which clients an answer holds. Only
/// records chosen by the client's location (an app's backend, SRV
/// priorities by tier) hold for its subnet alone; everything else is the
/// same for every client and gets scope 0, so that a resolver caching by
/// subnet (Unbound's subnetcache) keeps one copy, not one per subnet. Until
/// 2026-12-06 every reply echoed the source prefix.
#[test]
fn only_answers_chosen_by_location_are_scoped_to_the_clients_subnet() {
    let mut f = Fixture::new();
    let subnet = "10.9.0.0/16";
    let mut scope = |name: &str, qtype: RecordType| {
        let q = with_edns(query(name, qtype), 1232, Some(subnet));
        let reply = f.send(&q, "127.0.0.1", Transport::Udp);
        (reply.metadata.response_code, ecs_echo(&reply, subnet))
    };
    let (noerror, nx) = (ResponseCode::NoError, ResponseCode::NXDomain);
    for (name, qtype) in [
        ("web.internal.", RecordType::A),
        ("web.internal.", RecordType::AAAA),
        ("web.internal.", RecordType::ANY),
        ("_web._tcp.internal.", RecordType::SRV),
    ] {
        assert_eq!(
            scope(name, qtype),
            (noerror, Some((16, 16))),
            "{name} {qtype}"
        );
    }
    for (name, qtype, rcode) in [
        ("nope.internal.", RecordType::A, nx),
        ("web.internal.", RecordType::MX, noerror),
        ("web.internal.", RecordType::TXT, noerror),
        // api has no IPv4 backend: nothing was chosen for anyone.
        ("api.internal.", RecordType::A, noerror),
        ("_web._tcp.internal.", RecordType::A, noerror),
        ("_nope._tcp.internal.", RecordType::SRV, nx),
        ("eu-1.web.internal.", RecordType::A, noerror),
        ("eu.backends.internal.", RecordType::A, noerror),
        ("eu.backends.internal.", RecordType::AAAA, noerror),
        ("sa.pops.internal.", RecordType::A, noerror),
        ("backends.internal.", RecordType::A, noerror),
        ("ns.internal.", RecordType::A, noerror),
        ("internal.", RecordType::SOA, noerror),
        ("internal.", RecordType::NS, noerror),
        ("internal.", RecordType::ANY, noerror),
    ] {
        assert_eq!(scope(name, qtype), (rcode, Some((16, 0))), "{name} {qtype}");
    }
}

/// RFC 7871 §7.2.1: a server that implements ECS and receives the option
/// MUST include it in its response, "regardless of whether the client
/// information was needed to formulate an answer". A refusal (a name
/// outside the zone, a transfer, another class) is the same for every
/// client: scope 0. Until 2026-12-06 a REFUSED reply dropped the option.
/// Errors found before the option was read and checked echo none.
#[test]
fn refusals_echo_the_client_subnet_with_scope_0() {
    let mut f = Fixture::new();
    let subnet = "10.9.0.0/16";
    let ask = |f: &mut Fixture, msg: Message| {
        let reply = f.send(
            &with_edns(msg, 1232, Some(subnet)),
            "127.0.0.1",
            Transport::Udp,
        );
        (reply.metadata.response_code, ecs_echo(&reply, subnet))
    };
    let refused = (ResponseCode::Refused, Some((16, 0)));
    assert_eq!(ask(&mut f, query("example.com.", RecordType::A)), refused);
    assert_eq!(ask(&mut f, query("internal.", RecordType::AXFR)), refused);
    let mut chaos = query("web.internal.", RecordType::TXT);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(ask(&mut f, chaos), refused);
    let mut notify = query("web.internal.", RecordType::A);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(ask(&mut f, notify), (ResponseCode::NotImp, None));
}

#[test]
fn malformed_client_subnet_is_formerr() {
    let mut f = Fixture::new();
    let mut q = query("web.internal.", RecordType::A);
    let mut edns = Edns::new();
    // Bits beyond the /12 prefix (0x09 in the second byte).
    let bad = ClientSubnet::new("10.9.0.0".parse().unwrap(), 12, 0);
    edns.options_mut().insert(EdnsOption::Subnet(bad));
    q.set_edns(edns);
    let reply = f.send(&q, "127.0.0.1", Transport::Udp);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    assert!(reply.answers.is_empty());
}

/// RFC 7871 §6: ADDRESS holds exactly the bytes the source prefix needs.
/// hickory reads those and drops the rest, so `/8` with `10.9` and `/16`
/// with `10.9.1` were answered NOERROR.
#[test]
fn client_subnet_with_address_bytes_beyond_its_prefix_is_formerr() {
    let mut f = Fixture::new();
    let ecs_query = |prefix: u8, address: &[u8]| {
        let mut bytes = query("web.internal.", RecordType::A).to_vec().unwrap();
        bytes[11] = 1; // ARCOUNT: the OPT below
        let option_len = 4 + address.len() as u8;
        // Root owner, type OPT, payload 1232, TTL 0, RDLENGTH.
        bytes.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 4 + option_len]);
        // ECS: code 8, length, family 1, source prefix, scope 0, address.
        bytes.extend_from_slice(&[0, 8, 0, option_len, 0, 1, prefix, 0]);
        bytes.extend_from_slice(address);
        assert!(Message::from_vec(&bytes).is_ok(), "hickory decodes it");
        bytes
    };
    for (prefix, address) in [(8u8, &[10u8, 9][..]), (16, &[10, 9, 1][..])] {
        let raw = f
            .raw(&ecs_query(prefix, address), "127.0.0.1", Transport::Udp)
            .unwrap();
        let r = Message::from_vec(&raw).unwrap();
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::FormErr,
            "/{prefix} with {address:?}"
        );
        assert!(r.answers.is_empty());
        assert!(r.edns.is_some(), "FORMERR keeps the OPT record");
        // Cut to what the prefix needs, the same query is answered.
        let cut = &address[..address.len() - 1];
        let raw = f
            .raw(&ecs_query(prefix, cut), "127.0.0.1", Transport::Udp)
            .unwrap();
        let r = Message::from_vec(&raw).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    }
}

#[test]
fn aaaa_answers_from_ipv6_backends_and_a_from_ipv4() {
    let mut f = Fixture::new();
    assert_eq!(
        addrs(&f.ask("web.internal.", RecordType::AAAA)),
        ["fd00::2:1"]
    );
    assert_eq!(
        addrs(&f.ask("api.internal.", RecordType::AAAA)),
        ["fd00::9"]
    );
    // api has no IPv4 backend: NODATA, not NXDOMAIN.
    let reply = f.ask("api.internal.", RecordType::A);
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.answers.is_empty());
    assert!(authority_is_soa(&reply));
    let both = f.ask("web.internal.", RecordType::ANY);
    assert_eq!(addrs(&both), ["10.1.0.1", "fd00::2:1"]);
}

#[test]
fn unhealthy_and_deleted_backends_never_appear() {
    let mut sick = rec("sa-1", "web", "sa", "BR", "10.1.0.1");
    sick.healthy = false;
    let mut gone = rec("sa-2", "web", "sa", "BR", "10.1.0.2");
    gone.deleted = true;
    let mut alone = rec("x-1", "lonely", "sa", "BR", "10.1.0.9");
    alone.healthy = false;
    let snap = SnapshotBuilder::new()
        .build(&[
            sick,
            gone,
            rec("eu-1", "web", "eu", "DE", "10.2.0.1"),
            alone,
        ])
        .snapshot;
    let mut f = Fixture::with(snap);
    let reply = f.send(
        &query("web.internal.", RecordType::A),
        "200.160.2.1",
        Transport::Udp,
    );
    assert_eq!(addrs(&reply), ["10.2.0.1"]);
    assert_eq!(
        addrs(&f.ask("sa.backends.internal.", RecordType::A)),
        Vec::<String>::new()
    );
    assert!(f.ask("_web._tcp.internal.", RecordType::SRV).answers.len() == 1);
    assert_eq!(
        f.ask("sa-1.web.internal.", RecordType::A)
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    // An app whose only backend is unhealthy has no records at all.
    let reply = f.ask("lonely.internal.", RecordType::A);
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn region_backends_pops_and_name_server() {
    let mut f = Fixture::new();
    let eu = f.ask("eu.backends.internal.", RecordType::A);
    assert_eq!(addrs(&eu), ["10.2.0.1"]);
    let eu6 = f.ask("EU.Backends.internal.", RecordType::AAAA);
    assert_eq!(addrs(&eu6), ["fd00::2:1", "fd00::9"]);
    assert_eq!(
        addrs(&f.ask("sa.pops.internal.", RecordType::A)),
        ["10.50.0.1"]
    );
    assert_eq!(
        addrs(&f.ask("sa.pops.internal.", RecordType::AAAA)),
        ["fdaa::2"]
    );
    assert_eq!(
        addrs(&f.ask("eu.pops.internal.", RecordType::A)),
        ["10.60.0.1"]
    );
    let none = f.ask("ap.pops.internal.", RecordType::A);
    assert_eq!(none.metadata.response_code, ResponseCode::NXDomain);
    let none = f.ask("ap.backends.internal.", RecordType::A);
    assert_eq!(none.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(addrs(&f.ask("ns.internal.", RecordType::A)), ["10.50.0.1"]);
    // Parents of those names exist (empty non-terminals): NODATA.
    for ent in ["backends.internal.", "pops.internal.", "_tcp.internal."] {
        let r = f.ask(ent, RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{ent}");
        assert!(r.answers.is_empty() && authority_is_soa(&r), "{ent}");
    }
}

#[test]
fn cluster_pops_are_answered_while_alive_and_not_draining() {
    use engine::snapshot::PopView;
    let pop = |id: &str, region: &str, addrs: &[&str], alive: bool, draining: bool| PopView {
        node_id: Arc::from(id),
        name: Arc::from(id),
        region: Arc::from(region),
        country: None,
        addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        alive,
        draining,
        can_serve: true,
        local: false,
        mesh: Default::default(),
    };
    let mut snap = table();
    snap.pops = vec![
        pop("ap-1", "ap", &["10.70.0.1", "fd70::1"], true, false),
        pop("ap-2", "ap", &["10.70.0.2"], false, false),
        pop("ap-3", "ap", &["10.70.0.3"], true, true),
        // The same address as a configured POP: one record.
        pop("gru-9", "sa", &["10.50.0.1"], true, false),
    ];
    let mut f = Fixture::with(snap);
    assert_eq!(
        addrs(&f.ask("ap.pops.internal.", RecordType::A)),
        ["10.70.0.1"]
    );
    assert_eq!(
        addrs(&f.ask("ap.pops.internal.", RecordType::AAAA)),
        ["fd70::1"]
    );
    assert_eq!(
        addrs(&f.ask("sa.pops.internal.", RecordType::A)),
        ["10.50.0.1"]
    );

    // A region whose POPs are all down is NODATA, not NXDOMAIN: the name
    // exists, it has no address to give now.
    let mut snap = table();
    snap.pops = vec![pop("me-1", "me", &["10.80.0.1"], false, false)];
    let mut f = Fixture::with(snap);
    let r = f.ask("me.pops.internal.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty() && authority_is_soa(&r));
}

#[test]
fn backends_sharing_an_address_give_one_record() {
    let snap = SnapshotBuilder::new()
        .build(&[
            rec("a", "web", "sa", "BR", "10.1.0.1"),
            rec("b", "api", "sa", "BR", "10.1.0.1"),
        ])
        .snapshot;
    let mut f = Fixture::with(snap);
    assert_eq!(
        addrs(&f.ask("sa.backends.internal.", RecordType::A)),
        ["10.1.0.1"]
    );
}

#[test]
fn srv_lists_backends_closest_first_with_weights_ports_and_glue() {
    let mut t = rec("eu-1", "web", "eu", "DE", "10.2.0.1");
    t.weight = 7;
    t.port = 9000;
    let snap = SnapshotBuilder::new()
        .build(&[t, rec("sa-1", "web", "sa", "BR", "10.1.0.1")])
        .snapshot;
    let mut f = Fixture::with(snap);
    let reply = f.send(
        &query("_web._tcp.internal.", RecordType::SRV),
        "10.9.0.1",
        Transport::Udp,
    );
    let srv: Vec<(u16, u16, u16, String)> = reply
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => (s.priority, s.weight, s.port, s.target.to_ascii()),
            other => panic!("not SRV: {other:?}"),
        })
        .collect();
    assert_eq!(
        srv,
        [
            (0, 7, 9000, "eu-1.web.internal.".to_string()),
            (2, 1, 8080, "sa-1.web.internal.".to_string())
        ]
    );
    let glue: Vec<String> = reply
        .additionals
        .iter()
        .map(|r| format!("{} {}", r.name, r.data))
        .collect();
    assert_eq!(
        glue,
        ["eu-1.web.internal. 10.2.0.1", "sa-1.web.internal. 10.1.0.1"]
    );
    // The targets resolve.
    assert_eq!(
        addrs(&f.ask("EU-1.web.internal.", RecordType::A)),
        ["10.2.0.1"]
    );
    // Known name, other type.
    let r = f.ask("_web._tcp.internal.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    let r = f.ask("_nope._tcp.internal.", RecordType::SRV);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn apex_has_soa_and_ns_with_glue() {
    let mut f = Fixture::new();
    let soa = f.ask("internal.", RecordType::SOA);
    assert_eq!(soa.answers.len(), 1);
    let RData::SOA(s) = &soa.answers[0].data else {
        panic!("not SOA")
    };
    assert_eq!(s.mname.to_ascii(), "ns.internal.");
    assert_eq!(s.serial, f.snapshot.version as u32);
    let ns = f.ask("Internal.", RecordType::NS);
    assert_eq!(ns.answers.len(), 1);
    assert_eq!(ns.additionals.len(), 1);
    let a = f.ask("internal.", RecordType::A);
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.answers.is_empty() && authority_is_soa(&a));
}

#[test]
fn unknown_names_are_nxdomain_with_soa() {
    let mut f = Fixture::new();
    for name in [
        "nope.internal.",
        "x.web.internal.",
        "a.sa.backends.internal.",
    ] {
        let r = f.ask(name, RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(r.metadata.authoritative);
        assert!(authority_is_soa(&r), "{name}");
        assert_eq!(r.authorities[0].ttl, 5);
    }
}

#[test]
fn known_name_other_type_is_nodata() {
    let mut f = Fixture::new();
    for t in [
        RecordType::MX,
        RecordType::TXT,
        RecordType::SRV,
        RecordType::CNAME,
    ] {
        let r = f.ask("web.internal.", t);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{t}");
        assert!(r.answers.is_empty() && authority_is_soa(&r), "{t}");
    }
}

#[test]
fn names_outside_the_zone_are_refused() {
    let mut f = Fixture::new();
    for name in ["example.com.", "internal.example.", "."] {
        let r = f.ask(name, RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(!r.metadata.authoritative);
        assert!(r.answers.is_empty() && r.authorities.is_empty());
    }
}

#[test]
fn names_are_case_insensitive_and_keep_the_askers_case() {
    let mut f = Fixture::new();
    let r = f.ask("WeB.InTeRnAl.", RecordType::A);
    assert_eq!(addrs(&r), ["10.1.0.1"]);
    assert_eq!(r.queries[0].name.to_ascii(), "WeB.InTeRnAl.");
}

#[test]
fn undecodable_queries_get_formerr_and_non_queries_nothing() {
    let mut f = Fixture::new();
    let good = query("web.internal.", RecordType::A).to_vec().unwrap();
    // Header promises a question that is cut off.
    let cut = &good[..good.len() - 3];
    let r = Message::from_vec(&f.raw(cut, "127.0.0.1", Transport::Udp).unwrap()).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(r.metadata.id, 0x1234);
    // Shorter than a header: no ID to answer.
    assert_eq!(f.raw(&good[..11], "127.0.0.1", Transport::Udp), None);
    // A response is never answered.
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert_eq!(f.raw(&resp, "127.0.0.1", Transport::Udp), None);
    // Two questions.
    let mut two = query("web.internal.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("api.internal.").unwrap(),
        RecordType::A,
    ));
    let r = f.send(&two, "127.0.0.1", Transport::Udp);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // No question.
    let none = Message::new(7, MessageType::Query, OpCode::Query);
    let r = f.send(&none, "127.0.0.1", Transport::Udp);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
}

#[test]
fn other_opcodes_classes_transfers_and_edns_versions() {
    let mut f = Fixture::new();
    let mut notify = query("internal.", RecordType::SOA);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(
        f.send(&notify, "127.0.0.1", Transport::Udp)
            .metadata
            .response_code,
        ResponseCode::NotImp
    );
    let mut chaos = query("version.bind.", RecordType::TXT);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(
        f.send(&chaos, "127.0.0.1", Transport::Udp)
            .metadata
            .response_code,
        ResponseCode::Refused
    );
    let axfr = query("internal.", RecordType::AXFR);
    assert_eq!(
        f.send(&axfr, "127.0.0.1", Transport::Tcp)
            .metadata
            .response_code,
        ResponseCode::Refused
    );
    let mut v1 = with_edns(query("web.internal.", RecordType::A), 1232, None);
    v1.edns.as_mut().unwrap().set_version(1);
    let r = f.send(&v1, "127.0.0.1", Transport::Udp);
    // BADVERS and BADSIG share the value 16; hickory decodes it as BADSIG.
    assert_eq!(u16::from(r.metadata.response_code), 16);
    assert_eq!(r.edns.unwrap().version(), 0);
    assert!(r.answers.is_empty());
}

#[test]
fn edns_is_echoed_with_our_payload_size_and_the_do_bit() {
    let mut f = Fixture::new();
    let plain = f.ask("web.internal.", RecordType::A);
    assert!(plain.edns.is_none(), "no OPT unless asked");
    let mut q = with_edns(query("web.internal.", RecordType::A), 4096, None);
    q.edns.as_mut().unwrap().set_dnssec_ok(true);
    let r = f.send(&q, "127.0.0.1", Transport::Udp);
    let edns = r.edns.unwrap();
    assert_eq!(edns.max_payload(), MAX_UDP_PAYLOAD);
    assert!(edns.flags().dnssec_ok);
}

fn big_region(n: usize) -> RoutingSnapshot {
    let records: Vec<BackendRecord> = (0..n)
        .map(|i| {
            rec(
                &format!("b{i}"),
                "big",
                "sa",
                "BR",
                &format!("10.7.{}.{}", i / 250, i % 250 + 1),
            )
        })
        .collect();
    SnapshotBuilder::new().build(&records).snapshot
}

#[test]
fn oversized_udp_replies_are_truncated_and_complete_over_tcp() {
    let mut f = Fixture::with(big_region(100));
    let q = query("sa.backends.internal.", RecordType::A);
    let udp = f.send(&q, "127.0.0.1", Transport::Udp);
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
    assert_eq!(udp.queries.len(), 1);
    let raw = f
        .raw(&q.to_vec().unwrap(), "127.0.0.1", Transport::Udp)
        .unwrap();
    assert!(raw.len() <= 512);
    let tcp = f.send(&q, "127.0.0.1", Transport::Tcp);
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 100);
    // With EDNS the limit is the client's size, capped at 1232: 60 A
    // records (16 bytes each after compression) fit, 100 do not.
    let mut f = Fixture::with(big_region(60));
    let q = with_edns(query("sa.backends.internal.", RecordType::A), 4096, None);
    let r = f.send(&q, "127.0.0.1", Transport::Udp);
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 60);
    assert!(r.edns.is_some());
}

/// Over TCP a TC bit leaves the client nowhere to go (unbound answered
/// SERVFAIL): a region of thousands of backends is answered without TC,
/// cut to the RRset limit (which is far below 64 KiB).
#[test]
fn a_list_too_long_for_tcp_is_cut_without_tc() {
    let mut f = Fixture::with(big_region(5000));
    let q = query("sa.backends.internal.", RecordType::A);
    let tcp = f.send(&q, "127.0.0.1", Transport::Tcp);
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), MAX_RRSET_RECORDS);
    // Over UDP the client is told to retry over TCP, as before.
    let udp = f.send(&q, "127.0.0.1", Transport::Udp);
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
}

/// QA: BIND 9.18.28 and later refuse an RRset of more than 100 records
/// (`max-records-per-type`, CVE-2024-1737) and answer SERVFAIL: a region
/// of 120 backends and the SRV name of an app of 120 were unresolvable
/// through Debian 12's `named`. Every RRset now holds at most 100 records:
/// per family for a region, the nearest tiers for SRV (with their glue).
#[test]
fn no_rrset_holds_more_than_100_records() {
    assert_eq!(MAX_RRSET_RECORDS, 100);
    let q = |name: &str, t| query(name, t);
    // 150 IPv4 and 150 IPv6 backends in sa.
    let mut records: Vec<BackendRecord> = (0..150)
        .map(|i| {
            rec(
                &format!("v4-{i}"),
                "big",
                "sa",
                "BR",
                &format!("10.7.0.{}", i + 1),
            )
        })
        .collect();
    records.extend((0..150).map(|i| {
        rec(
            &format!("v6-{i}"),
            "big",
            "sa",
            "BR",
            &format!("fd00::7:{i:x}"),
        )
    }));
    let mut f = Fixture::with(SnapshotBuilder::new().build(&records).snapshot);
    let count =
        |m: &Message, t: RecordType| m.answers.iter().filter(|r| r.record_type() == t).count();
    let a = f.send(
        &q("sa.backends.internal.", RecordType::A),
        "127.0.0.1",
        Transport::Tcp,
    );
    assert_eq!(count(&a, RecordType::A), 100);
    assert_eq!(a.answers.len(), 100);
    // Table order: the first 100.
    assert_eq!(addrs(&a)[99], "10.7.0.100");
    let any = f.send(
        &q("sa.backends.internal.", RecordType::ANY),
        "127.0.0.1",
        Transport::Tcp,
    );
    assert_eq!(count(&any, RecordType::A), 100);
    assert_eq!(count(&any, RecordType::AAAA), 100);
    let srv = f.send(
        &q("_big._tcp.internal.", RecordType::SRV),
        "127.0.0.1",
        Transport::Tcp,
    );
    assert!(!srv.metadata.truncation);
    assert_eq!(srv.answers.len(), 100);
    assert_eq!(srv.additionals.len(), 100, "glue of the records kept only");

    // SRV keeps the nearest: 120 backends in eu, then 30 in BR, asked by
    // a client in Brazil. All 30 Brazilian ones (priority 0) are kept.
    let mut records: Vec<BackendRecord> = (0..120)
        .map(|i| {
            rec(
                &format!("eu-{i}"),
                "big",
                "eu",
                "DE",
                &format!("10.8.0.{}", i + 1),
            )
        })
        .collect();
    records.extend((0..30).map(|i| {
        rec(
            &format!("br-{i}"),
            "big",
            "sa",
            "BR",
            &format!("10.9.0.{}", i + 1),
        )
    }));
    let mut f = Fixture::with(SnapshotBuilder::new().build(&records).snapshot);
    let ecs = with_edns(
        q("_big._tcp.internal.", RecordType::SRV),
        1232,
        Some("200.160.2.0/24"),
    );
    let srv = f.send(&ecs, "127.0.0.1", Transport::Tcp);
    assert_eq!(srv.answers.len(), 100);
    let nearest = srv
        .answers
        .iter()
        .filter(|r| matches!(&r.data, RData::SRV(s) if s.priority == 0))
        .count();
    assert_eq!(nearest, 30);
}

/// A FORMERR without OPT says "no EDNS here" (RFC 6891 §7): a query whose
/// ECS option hickory cannot decode (family 3) kept neither its question
/// nor its OPT in the reply.
#[test]
fn an_undecodable_option_gets_formerr_with_the_question_and_opt() {
    let mut f = Fixture::new();
    let mut bytes = query("web.internal.", RecordType::A).to_vec().unwrap();
    bytes[11] = 1; // ARCOUNT: the OPT below
                   // Root owner, type OPT, payload 4096, DO set, 8 bytes of options.
    bytes.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 8]);
    // ECS: family 3 (undefined), source /24, scope 0.
    bytes.extend_from_slice(&[0, 8, 0, 4, 0, 3, 24, 0]);
    assert!(Message::from_vec(&bytes).is_err());
    for transport in [Transport::Udp, Transport::Tcp] {
        let raw = f.raw(&bytes, "127.0.0.1", transport).unwrap();
        let r = Message::from_vec(&raw).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(r.queries.len(), 1);
        assert_eq!(r.queries[0].name().to_ascii(), "web.internal.");
        let edns = r.edns.expect("an OPT record");
        assert_eq!(edns.max_payload(), MAX_UDP_PAYLOAD);
        assert!(edns.flags().dnssec_ok);
    }
}

#[test]
fn glue_is_dropped_before_answers_are() {
    // 24 SRV records (43 bytes each: targets are never compressed, RFC
    // 2782) fit in 1232 bytes; with their 24 glue records (16 bytes each)
    // they do not.
    let records: Vec<BackendRecord> = (0..24)
        .map(|i| {
            rec(
                &format!("backend-{i:02}"),
                "web",
                "sa",
                "BR",
                &format!("10.7.0.{}", i + 1),
            )
        })
        .collect();
    let mut f = Fixture::with(SnapshotBuilder::new().build(&records).snapshot);
    let q = with_edns(query("_web._tcp.internal.", RecordType::SRV), 1232, None);
    let r = f.send(&q, "127.0.0.1", Transport::Udp);
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 24);
    assert!(r.additionals.is_empty());
    assert!(r.edns.is_some(), "the OPT record stays");
    let r = f.send(&q, "127.0.0.1", Transport::Tcp);
    assert_eq!(r.additionals.len(), 24);
}

#[test]
fn answers_follow_a_new_snapshot() {
    let mut builder = SnapshotBuilder::new();
    let first = builder
        .build(&[rec("a", "web", "sa", "BR", "10.1.0.1")])
        .snapshot;
    let mut f = Fixture::with(first);
    assert_eq!(addrs(&f.ask("web.internal.", RecordType::A)), ["10.1.0.1"]);
    f.snapshot = builder
        .build(&[rec("b", "web", "sa", "BR", "10.1.0.2")])
        .snapshot;
    assert_eq!(addrs(&f.ask("web.internal.", RecordType::A)), ["10.1.0.2"]);
    f.snapshot = builder.build(&[]).snapshot;
    let r = f.ask("web.internal.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn ttl_is_configurable() {
    let mut f = Fixture::new();
    f.answerer = Answerer::new(zone(60), geo());
    let r = f.ask("web.internal.", RecordType::A);
    assert_eq!(r.answers[0].ttl, 60);
    let r = f.ask("nope.internal.", RecordType::A);
    let RData::SOA(soa) = &r.authorities[0].data else {
        panic!("not SOA")
    };
    assert_eq!(soa.minimum, 60);
}

/// Deterministic xorshift, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_and_mutated_packets_never_panic() {
    let mut f = Fixture::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds: Vec<Vec<u8>> = [
        query("web.internal.", RecordType::A),
        with_edns(
            query("_web._tcp.internal.", RecordType::SRV),
            1232,
            Some("10.9.0.0/16"),
        ),
        with_edns(query("sa.backends.internal.", RecordType::AAAA), 512, None),
    ]
    .iter()
    .map(|m| m.to_vec().unwrap())
    .collect();
    for i in 0..20_000 {
        let packet: Vec<u8> = if i % 3 == 0 {
            let len = (rng.next() % 600) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let mut p = seeds[i % seeds.len()].clone();
            for _ in 0..=(rng.next() % 4) {
                let at = (rng.next() as usize) % p.len();
                p[at] = rng.next() as u8;
            }
            let keep = (rng.next() as usize) % (p.len() + 1);
            if i % 2 == 0 {
                p.truncate(keep);
            }
            p
        };
        let transport = if i % 5 == 0 {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        if let Some(reply) = f.raw(&packet, "10.9.0.1", transport) {
            if transport == Transport::Udp {
                assert!(reply.len() <= MAX_UDP_PAYLOAD as usize, "packet {i}");
            }
            Message::from_vec(&reply).unwrap_or_else(|e| panic!("reply {i} undecodable: {e}"));
        }
    }
    // Still answering normally.
    assert_eq!(addrs(&f.ask("web.internal.", RecordType::A)), ["10.1.0.1"]);
}

#[test]
fn reply_cache_serves_equal_bytes_with_the_askers_id() {
    let mut f = Fixture::new();
    let now = Instant::now();
    let client: IpAddr = "10.9.1.1".parse().unwrap();
    let mut q = query("web.internal.", RecordType::A);
    let mut first = Vec::new();
    let mut second = Vec::new();
    let snap = &f.snapshot;
    f.answerer
        .answer_at(
            &q.to_vec().unwrap(),
            client,
            Transport::Udp,
            snap,
            now,
            &mut first,
        )
        .unwrap();
    q.metadata.id = 0x4321;
    let a = f
        .answerer
        .answer_at(
            &q.to_vec().unwrap(),
            client,
            Transport::Udp,
            snap,
            now,
            &mut second,
        )
        .unwrap();
    assert_eq!(a.rcode, ResponseCode::NoError);
    assert_eq!(&second[..2], &[0x43, 0x21]);
    assert_eq!(first[2..], second[2..]);
    // Another country is another entry: the DE client got eu, BR gets sa.
    let br: IpAddr = "200.160.2.9".parse().unwrap();
    let mut third = Vec::new();
    f.answerer
        .answer_at(
            &q.to_vec().unwrap(),
            br,
            Transport::Udp,
            snap,
            now,
            &mut third,
        )
        .unwrap();
    assert_eq!(addrs(&Message::from_vec(&third).unwrap()), ["10.1.0.1"]);
    assert_eq!(addrs(&Message::from_vec(&second).unwrap()), ["10.2.0.1"]);
}

#[test]
fn reply_cache_follows_load_after_its_ttl_and_snapshots_at_once() {
    let mut builder = SnapshotBuilder::new();
    let records = [
        rec("a", "web", "sa", "BR", "10.1.0.1"),
        rec("b", "web", "sa", "BR", "10.1.0.2"),
    ];
    let snap = builder.build(&records).snapshot;
    let mut answerer = Answerer::new(zone(5), geo());
    let client: IpAddr = "200.160.2.1".parse().unwrap();
    let q = query("web.internal.", RecordType::A).to_vec().unwrap();
    let ask = |answerer: &mut Answerer, snap: &RoutingSnapshot, at: Instant| {
        let mut out = Vec::new();
        answerer
            .answer_at(&q, client, Transport::Udp, snap, at, &mut out)
            .unwrap();
        addrs(&Message::from_vec(&out).unwrap())
    };
    let t0 = Instant::now();
    assert_eq!(ask(&mut answerer, &snap, t0), ["10.1.0.1"]);
    let busy = ActiveGuard::new(Arc::clone(&snap.backends[0].live));
    assert_eq!(
        ask(&mut answerer, &snap, t0 + REPLY_CACHE_TTL / 2),
        ["10.1.0.1"]
    );
    assert_eq!(
        ask(&mut answerer, &snap, t0 + REPLY_CACHE_TTL),
        ["10.1.0.2"]
    );
    drop(busy);
    let moved = builder
        .build(&[rec("c", "web", "sa", "BR", "10.1.0.3")])
        .snapshot;
    assert_eq!(
        ask(&mut answerer, &moved, t0 + REPLY_CACHE_TTL),
        ["10.1.0.3"]
    );
}

/// Found by `tests/bounded_memory.rs`: 5,000 garbage datagrams a round
/// filled the reply cache with FORMERR replies keyed by up to 1.5 KB of
/// garbage each (8,192 entries, megabytes per UDP worker), and resident
/// memory grew round after round. Error replies are no longer cached, nor
/// queries over 512 bytes, and the cache has a byte budget.
#[test]
fn garbage_is_not_cached_and_the_cache_keeps_to_its_byte_budget() {
    let mut f = Fixture::new();
    let now = Instant::now();
    let client: IpAddr = "10.9.1.1".parse().unwrap();
    let mut out = Vec::new();
    for i in 0..500u32 {
        // A query-looking header, then garbage: FORMERR.
        let mut junk = vec![0u8; 1400];
        junk[..4].copy_from_slice(&i.to_be_bytes());
        junk[4..6].copy_from_slice(&[0, 1]);
        junk[12..].fill(0xc0);
        let a = f
            .answerer
            .answer_at(&junk, client, Transport::Udp, &f.snapshot, now, &mut out)
            .unwrap();
        assert_eq!(a.rcode, ResponseCode::FormErr);
    }
    assert_eq!(f.answerer.replies.entries.len(), 0, "error replies cached");

    // Large TCP answers (SRV over 200 backends, cut to the 100 an RRset
    // holds: ~5 KB each), one per distinct query (an EDNS option varies):
    // the byte budget empties the cache long before its entry limit.
    let many: Vec<BackendRecord> = (0..200)
        .map(|i| {
            rec(
                &format!("w{i}"),
                "web",
                "sa",
                "BR",
                &format!("10.4.{}.{}", i / 200, i % 200 + 1),
            )
        })
        .collect();
    let mut f = Fixture::with(SnapshotBuilder::new().build(&many).snapshot);
    let mut emptied = 0;
    let mut before = 0;
    for i in 0..1000u32 {
        let mut q = query("_web._tcp.internal.", RecordType::SRV);
        let mut edns = Edns::new();
        edns.options_mut()
            .insert(EdnsOption::Unknown(65001, i.to_be_bytes().to_vec()));
        q.set_edns(edns);
        f.answerer
            .answer_at(
                &q.to_vec().unwrap(),
                client,
                Transport::Tcp,
                &f.snapshot,
                now,
                &mut out,
            )
            .unwrap();
        assert!(out.len() > 4096, "SRV reply of {} bytes", out.len());
        let cache = &f.answerer.replies;
        let held: usize = cache.entries.iter().map(|(k, v)| k.len() + v.2.len()).sum();
        assert_eq!(held, cache.bytes, "byte count drifted");
        assert!(
            held <= REPLY_CACHE_BYTES + out.len() + 1024,
            "{held} bytes cached"
        );
        if cache.entries.len() < before {
            emptied += 1;
        }
        before = cache.entries.len();
    }
    assert!(emptied >= 2, "the byte budget never emptied the cache");
    // Names are still cached.
    assert!(!f.answerer.replies.entries.is_empty());
}

#[test]
fn cached_geodns_replies_keep_each_resolver_on_its_own_pop() {
    use engine::snapshot::PopView;
    // Two POPs in Brazil: resolvers there (no ECS) spread over both by
    // their address, through the reply cache too.
    let pop = |id: &str, addr: &str| PopView {
        node_id: Arc::from(id),
        name: Arc::from(id),
        region: Arc::from("sa"),
        country: Country::parse("BR"),
        addrs: vec![addr.parse().unwrap()],
        alive: true,
        draining: false,
        can_serve: true,
        local: false,
        mesh: Default::default(),
    };
    let mut snapshot = table();
    snapshot.pops = vec![pop("gru", "203.0.113.1"), pop("gig", "203.0.113.2")];
    let geodns = crate::GeoZone::new("edge.example.com", 30, 1, Vec::new()).unwrap();
    let mut answerer = Answerer::new(zone(5), geo()).with_geodns(geodns);
    let q = query("edge.example.com.", RecordType::A).to_vec().unwrap();
    let mut ask = |client: &str, cached: bool| {
        let mut out = Vec::new();
        let ip: IpAddr = client.parse().unwrap();
        match cached {
            true => answerer.answer_at(&q, ip, Transport::Udp, &snapshot, Instant::now(), &mut out),
            false => answerer.answer(&q, ip, Transport::Udp, &snapshot, &mut out),
        }
        .expect("a reply");
        addrs(&Message::from_vec(&out).unwrap())
    };
    let resolvers: Vec<String> = (1..=40).map(|i| format!("200.160.2.{i}")).collect();
    let uncached: Vec<Vec<String>> = resolvers.iter().map(|r| ask(r, false)).collect();
    assert!(
        uncached.iter().any(|a| a != &uncached[0]),
        "40 resolvers all hashed to one POP: {uncached:?}"
    );
    let cached: Vec<Vec<String>> = resolvers.iter().map(|r| ask(r, true)).collect();
    assert_eq!(cached, uncached);
}
