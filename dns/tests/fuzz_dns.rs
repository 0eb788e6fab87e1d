//! Fuzzing the DNS answerer with what a client can send: raw datagrams, and
//! queries built from random names, types, classes and EDNS options (ECS
//! included), then damaged. (TCP framing is fuzzed next to the server, in
//! `dns/src/server.rs`.)
//!
//! `bolero` property tests: under `cargo test` each target runs random
//! inputs for `EDGEPROXY_FUZZ_SECS` seconds (default 10) on stable Rust;
//! `cargo bolero test --engine libfuzzer` runs them coverage-guided.
//!
//! Properties: answering never panics (the server's `catch_unwind` would
//! hide it and drop the query); every reply decodes, is a response to the
//! query's ID, and fits the transport (512 bytes over UDP without EDNS, the
//! client's size clamped to 512..=1232 with it); a response is never
//! answered; the reply cache gives the bytes a fresh answer would.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bolero::{check, TypeGenerator};
use dns::{Answerer, PopEntry, Transport, ZoneConfig, MAX_UDP_PAYLOAD};
use engine::geo::{GeoResolver, RegionMap};
use engine::snapshot::{BackendRecord, Country, RoutingSnapshot, SnapshotBuilder};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{DNSClass, Name, RecordType};

#[path = "../../tests/common/fuzz_budget.rs"]
mod fuzz_budget;

fn budget() -> Duration {
    fuzz_budget::budget(10)
}

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

struct World {
    answerer: Answerer,
    snapshot: RoutingSnapshot,
}

fn world() -> World {
    let c = |s| Country::parse(s).unwrap();
    let geo = Arc::new(GeoResolver::new(
        vec![
            ("200.160.2.0/24".parse().unwrap(), c("BR")),
            ("10.9.0.0/16".parse().unwrap(), c("DE")),
        ],
        None,
        RegionMap::default(),
    ));
    let pop = |name: &str, region: &str, addr: &str| PopEntry {
        name: name.into(),
        region: region.into(),
        addr: addr.parse().unwrap(),
    };
    let zone = ZoneConfig::new(
        "internal",
        5,
        "sa",
        vec![
            pop("gru-1", "sa", "10.50.0.1"),
            pop("fra-1", "eu", "fdaa::1"),
        ],
        vec!["10.50.0.1".parse().unwrap()],
    )
    .unwrap();
    // Enough records that a region list overflows a UDP reply.
    let mut records = vec![
        rec("sa-1", "web", "sa", "BR", "10.1.0.1"),
        rec("eu-1", "web", "eu", "DE", "10.2.0.1"),
        rec("v6-1", "api", "eu", "DE", "fd00::9"),
    ];
    for i in 0..120 {
        records.push(rec(
            &format!("bulk-{i}"),
            "bulk",
            "us",
            "US",
            &format!("10.7.{}.{}", i / 200, i % 200 + 1),
        ));
    }
    World {
        answerer: Answerer::new(Arc::new(zone), geo),
        snapshot: SnapshotBuilder::new().build(&records).snapshot,
    }
}

/// The largest reply allowed for `query` over `transport`.
fn limit(query: &[u8], transport: Transport) -> usize {
    match transport {
        Transport::Tcp => u16::MAX as usize,
        Transport::Udp => match Message::from_vec(query).ok().and_then(|m| m.edns) {
            None => 512,
            Some(e) => e.max_payload().clamp(512, MAX_UDP_PAYLOAD) as usize,
        },
    }
}

fn check_answer(world: &mut World, query: &[u8], client: IpAddr, tcp: bool) {
    let transport = if tcp { Transport::Tcp } else { Transport::Udp };
    let mut out = Vec::new();
    let answered = world
        .answerer
        .answer(query, client, transport, &world.snapshot, &mut out);
    let is_response = query.len() >= 3 && query[2] & 0x80 != 0;
    match answered {
        None => {
            assert!(out.is_empty());
            assert!(query.len() < 12 || is_response, "a query went unanswered");
        }
        Some(_) => {
            assert!(!is_response, "a response was answered");
            let reply = Message::from_vec(&out)
                .unwrap_or_else(|e| panic!("undecodable reply to {query:?}: {e}"));
            assert_eq!(reply.metadata.id, u16::from_be_bytes([query[0], query[1]]));
            assert_eq!(reply.metadata.message_type, MessageType::Response);
            let max = limit(query, transport);
            assert!(
                out.len() <= max,
                "{} bytes over {:?} (limit {max})",
                out.len(),
                transport
            );
            // The cached path gives the same bytes.
            let now = Instant::now();
            let mut first = Vec::new();
            let mut again = Vec::new();
            world
                .answerer
                .answer_at(query, client, transport, &world.snapshot, now, &mut first);
            world
                .answerer
                .answer_at(query, client, transport, &world.snapshot, now, &mut again);
            assert_eq!(first, again, "the reply cache changed the answer");
        }
    }
}

#[test]
fn any_datagram_gets_a_well_formed_answer_or_none() {
    let mut w = world();
    check!()
        .with_test_time(budget())
        .with_type::<(Vec<u8>, u32, bool)>()
        .for_each(|(bytes, client, tcp)| {
            check_answer(&mut w, bytes, IpAddr::from(client.to_be_bytes()), *tcp)
        });
}

/// A query as a client builds it. Most fields are `Option`s whose `None`
/// is the ordinary value, so that about half the inputs are well-formed
/// queries that reach the zone's names.
#[derive(Debug, TypeGenerator)]
struct Built {
    id: u16,
    /// The name: one or two labels (each from `LABELS` or raw), then the
    /// zone unless `outside`.
    first: Label,
    second: Option<Label>,
    outside: bool,
    qtype: QType,
    edns: Option<EdnsPart>,
    recursion: bool,
    /// Everything that makes a query unusual or malformed, together, so
    /// that half the inputs are ordinary queries.
    damage: Option<Damage>,
    client: u32,
    tcp: bool,
}

#[derive(Debug, TypeGenerator)]
struct Damage {
    op: u8,
    qclass: u16,
    /// More labels in front of the name.
    more_labels: Vec<Label>,
    two_questions: bool,
    edns_version: u8,
    /// ECS prefixes as sent, not brought into range.
    raw_prefixes: bool,
    raw_option: Option<(u16, Vec<u8>)>,
    edits: Vec<(u16, u8)>,
    cut: Option<u16>,
}

#[derive(Debug, TypeGenerator)]
enum QType {
    Known(u8),
    Raw(u16),
}

const QTYPES: &[RecordType] = &[
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::SOA,
    RecordType::NS,
    RecordType::ANY,
    RecordType::TXT,
    RecordType::AXFR,
];

#[derive(Debug, TypeGenerator)]
enum Label {
    Known(u8),
    Raw(Vec<u8>),
}

const LABELS: &[&str] = &[
    "internal",
    "web",
    "api",
    "bulk",
    "_web",
    "_tcp",
    "sa",
    "eu",
    "us",
    "backends",
    "pops",
    "sa-1",
    "eu-1",
    "v6-1",
    "ns",
    "*",
    "xn--bcher-kva",
];

#[derive(Debug, TypeGenerator)]
struct EdnsPart {
    payload: u16,
    dnssec: bool,
    subnet: Option<(IpAddr, u8, u8)>,
}

impl Built {
    fn bytes(&self) -> Vec<u8> {
        let label = |l: &Label| match l {
            Label::Known(i) => LABELS[*i as usize % LABELS.len()].as_bytes().to_vec(),
            Label::Raw(raw) => raw.iter().take(63).copied().collect(),
        };
        let mut labels: Vec<Vec<u8>> = Vec::new();
        if let Some(d) = &self.damage {
            labels.extend(d.more_labels.iter().map(label));
        }
        labels.push(label(&self.first));
        labels.extend(self.second.iter().map(label));
        labels.retain(|l| !l.is_empty());
        if !self.outside {
            labels.push(b"internal".to_vec());
        }
        let name = Name::from_labels(labels).unwrap_or_else(|_| Name::root());
        let op = self
            .damage
            .as_ref()
            .map_or(OpCode::Query, |d| OpCode::from_u8(d.op % 16));
        let mut msg = Message::new(self.id, MessageType::Query, op);
        msg.metadata.recursion_desired = self.recursion;
        let qtype = match self.qtype {
            QType::Known(i) => QTYPES[i as usize % QTYPES.len()],
            QType::Raw(t) => RecordType::from(t),
        };
        let query = Query::query(name.clone(), qtype)
            .set_query_class(
                self.damage
                    .as_ref()
                    .map_or(DNSClass::IN, |d| DNSClass::from(d.qclass)),
            )
            .clone();
        msg.add_query(query.clone());
        if self.damage.as_ref().is_some_and(|d| d.two_questions) {
            msg.add_query(query);
        }
        if let Some(e) = &self.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(e.payload);
            edns.set_version(self.damage.as_ref().map_or(0, |d| d.edns_version));
            edns.set_dnssec_ok(e.dnssec);
            if let Some((ip, source, scope)) = e.subnet {
                let raw = self.damage.as_ref().is_some_and(|d| d.raw_prefixes);
                let max = if ip.is_ipv4() { 33 } else { 129 };
                let (source, scope) = match raw {
                    true => (source, scope),
                    false => (source % max, 0),
                };
                let mut cs = ClientSubnet::new(ip, source, scope);
                cs.set_source_prefix(source);
                edns.options_mut().insert(EdnsOption::Subnet(cs));
            }
            if let Some((code, data)) = self.damage.as_ref().and_then(|d| d.raw_option.as_ref()) {
                edns.options_mut()
                    .insert(EdnsOption::Unknown(*code, data.clone()));
            }
            msg.set_edns(edns);
        }
        let mut bytes = msg.to_vec().unwrap_or_default();
        if let Some(d) = &self.damage {
            if !bytes.is_empty() {
                for (at, b) in &d.edits {
                    let i = *at as usize % bytes.len();
                    bytes[i] = *b;
                }
            }
            if let Some(cut) = d.cut {
                bytes.truncate(cut as usize);
            }
        }
        bytes
    }
}

#[test]
fn built_and_damaged_queries_get_well_formed_answers() {
    let mut w = world();
    check!()
        .with_test_time(budget())
        .with_type::<Built>()
        .for_each(|b| {
            check_answer(
                &mut w,
                &b.bytes(),
                IpAddr::from(b.client.to_be_bytes()),
                b.tcp,
            )
        });
}
