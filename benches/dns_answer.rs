//! Micro-benchmarks of DNS answer building (`dns::Answerer`), per kind of
//! name, over a table of 1,000 backends in 100 apps: the uncached path
//! (`answer`: decode, look up, pick, encode) and the server's path
//! (`answer_at`, which reuses encoded replies).
//!
//! Run: `cargo bench --bench dns_answer` (add `-- srv` to filter).

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use dns::{Answerer, Transport, ZoneConfig};
use engine::geo::{GeoDb, GeoResolver, RegionMap};
use engine::snapshot::{BackendRecord, RoutingSnapshot, SnapshotBuilder};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

fn table() -> RoutingSnapshot {
    let records: Vec<BackendRecord> = (0..1000)
        .map(|i| BackendRecord {
            id: format!("b{i}"),
            app: format!("app{}", i % 100),
            region: ["sa", "us", "eu", "ap"][i % 4].into(),
            country: Some(["BR", "US", "DE", "JP"][i % 4].into()),
            ip: if i % 10 == 9 {
                format!("fd00::{:x}", i + 1)
            } else {
                format!("10.1.{}.{}", i / 250, i % 250 + 1)
            },
            port: 8000,
            healthy: true,
            weight: 1,
            soft_limit: 100,
            hard_limit: 150,
            deleted: false,
        })
        .collect();
    SnapshotBuilder::new().build(&records).snapshot
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.set_edns(Edns::new());
    m.to_vec().unwrap()
}

fn bench_answer(c: &mut Criterion) {
    let snapshot = table();
    let geo = Arc::new(GeoResolver::new(
        Vec::new(),
        Some(GeoDb::embedded().unwrap()),
        RegionMap::default(),
    ));
    let zone = Arc::new(ZoneConfig::new("internal", 5, "sa", Vec::new(), Vec::new()).unwrap());
    let mut answerer = Answerer::new(zone, geo);
    let client: IpAddr = "200.160.2.3".parse().unwrap();
    let mut out = Vec::with_capacity(1232);
    let mut g = c.benchmark_group("dns");
    for (label, name, qtype) in [
        ("app_a", "app3.internal.", RecordType::A),
        ("srv_10", "_app3._tcp.internal.", RecordType::SRV),
        (
            "region_list_truncated",
            "sa.backends.internal.",
            RecordType::A,
        ),
        ("nxdomain", "nope.internal.", RecordType::A),
    ] {
        let q = query(name, qtype);
        g.bench_function(format!("{label}/uncached"), |b| {
            b.iter(|| answerer.answer(black_box(&q), client, Transport::Udp, &snapshot, &mut out))
        });
        g.bench_function(format!("{label}/server_path"), |b| {
            b.iter(|| {
                answerer.answer_at(
                    black_box(&q),
                    client,
                    Transport::Udp,
                    &snapshot,
                    Instant::now(),
                    &mut out,
                )
            })
        });
    }
    g.finish();
}

/// GeoDNS: the public zone's apex for a client given by ECS, over a
/// cluster of 20 POPs in four regions, next to the internal `<app>` A
/// answer of the same answerer (compare `dns/geodns_a` with
/// `dns/app_a_with_geodns`).
fn bench_geodns(c: &mut Criterion) {
    use engine::snapshot::{Country, PopView};
    use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
    let mut snapshot = table();
    snapshot.pops = (0..20)
        .map(|i| PopView {
            node_id: Arc::from(format!("pop-{i}").as_str()),
            name: Arc::from(format!("pop-{i}").as_str()),
            region: Arc::from(["sa", "us", "eu", "ap"][i % 4]),
            country: Country::parse(["BR", "US", "DE", "JP", "AR", "CA", "FR", "SG"][i % 8]),
            addrs: vec![format!("203.0.113.{}", i + 1).parse().unwrap()],
            alive: true,
            draining: false,
            can_serve: true,
            local: i == 0,
            mesh: Default::default(),
        })
        .collect();
    let geo = Arc::new(GeoResolver::new(
        Vec::new(),
        Some(GeoDb::embedded().unwrap()),
        RegionMap::default(),
    ));
    let zone = Arc::new(ZoneConfig::new("internal", 5, "sa", Vec::new(), Vec::new()).unwrap());
    let geodns = dns::GeoZone::new("edge.example.com", 30, 1, Vec::new()).unwrap();
    let mut answerer = Answerer::new(zone, geo).with_geodns(geodns);
    let client: IpAddr = "192.0.2.53".parse().unwrap();
    let mut out = Vec::with_capacity(1232);
    let with_ecs = |name: &str, qtype| {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        let mut edns = Edns::new();
        edns.options_mut()
            .insert(EdnsOption::Subnet(ClientSubnet::new(
                "200.160.2.0".parse().unwrap(),
                24,
                0,
            )));
        m.set_edns(edns);
        m.to_vec().unwrap()
    };
    let mut g = c.benchmark_group("dns");
    for (label, name) in [
        ("geodns_a", "edge.example.com."),
        ("app_a_with_geodns", "app3.internal."),
    ] {
        let q = with_ecs(name, RecordType::A);
        g.bench_function(format!("{label}/uncached"), |b| {
            b.iter(|| answerer.answer(black_box(&q), client, Transport::Udp, &snapshot, &mut out))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_answer, bench_geodns);
criterion_main!(benches);
