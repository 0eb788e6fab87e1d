//! Micro-benchmarks of the data plane's hot functions:
//!
//! * backend selection (`select::pick`, and `select::route` with an affinity
//!   hit) over 10 / 1,000 / 10,000 backends;
//! * building a routing snapshot from store records and publishing it (what a
//!   reload costs the control thread), and loading it (what an accept costs a
//!   shard);
//! * affinity lookup in a table of 10,000 clients;
//! * PROXY protocol v1 and v2 parsing;
//! * per-client admission (`rate_limit::ClientTable`): admit and release of
//!   one connection, with the token bucket and the cap on, among 10,000
//!   clients (the whole per-connection cost of `[rate_limit]`);
//! * selection with the RTT tie-break on (`select::pick_scored`).
//!
//! Run: `cargo bench --bench hot_paths` (add `-- pick` to filter).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use engine::affinity::AffinityTable;
use engine::proxy_protocol;
use engine::select::{self, ClientGeo};
use engine::snapshot::{BackendRecord, Country, RoutingSnapshot, SnapshotBuilder, SnapshotHandle};

const COUNTRIES: [&str; 8] = ["BR", "AR", "US", "DE", "FR", "JP", "CL", "MX"];
const REGIONS: [&str; 8] = ["sa", "sa", "us", "eu", "eu", "ap", "sa", "us"];

/// `n` backends of app "web" spread over countries and regions.
fn records(n: usize) -> Vec<BackendRecord> {
    (0..n)
        .map(|i| BackendRecord {
            id: format!("backend-{i}"),
            app: "web".into(),
            region: REGIONS[i % REGIONS.len()].into(),
            country: Some(COUNTRIES[i % COUNTRIES.len()].into()),
            ip: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
            port: 8080,
            healthy: i % 10 != 9,
            weight: 1 + (i % 3) as i64,
            soft_limit: 100,
            hard_limit: 1000,
            deleted: false,
        })
        .collect()
}

fn snapshot(n: usize) -> RoutingSnapshot {
    SnapshotBuilder::new().build(&records(n)).snapshot
}

fn bench_select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for n in [10usize, 1_000, 10_000] {
        let snap = snapshot(n);
        let cands = snap.candidates(Some("web")).to_vec();
        let geo = ClientGeo {
            country: Country::parse("BR"),
            region: snap.region_id("sa"),
        };
        let local = snap.region_id("us");
        g.bench_with_input(BenchmarkId::new("pick", n), &n, |b, _| {
            b.iter(|| {
                select::pick(black_box(&snap), black_box(&cands), &geo, local, &[], |b| {
                    b.active()
                })
            })
        });
        // route() with an affinity hit: the common case for a returning client.
        let client = IpAddr::V4(Ipv4Addr::new(200, 160, 2, 3));
        let mut table = AffinityTable::new(Duration::from_secs(600));
        let now = Instant::now();
        select::route(
            &snap,
            &cands,
            client,
            &geo,
            local,
            &[],
            &mut table,
            now,
            |b| b.active(),
        );
        g.bench_with_input(BenchmarkId::new("route_affinity_hit", n), &n, |b, _| {
            b.iter(|| {
                select::route(
                    black_box(&snap),
                    black_box(&cands),
                    client,
                    &geo,
                    local,
                    &[],
                    &mut table,
                    now,
                    |b| b.active(),
                )
            })
        });
    }
    g.finish();
}

fn bench_snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    for n in [10usize, 1_000, 10_000] {
        let recs = records(n);
        let mut builder = SnapshotBuilder::new();
        let handle = SnapshotHandle::new(builder.build(&recs).snapshot);
        g.bench_with_input(BenchmarkId::new("build_and_swap", n), &n, |b, _| {
            b.iter(|| handle.publish(builder.build(black_box(&recs)).snapshot))
        });
    }
    let handle = SnapshotHandle::new(snapshot(1_000));
    g.bench_function("load", |b| b.iter(|| black_box(handle.load()).version));
    g.finish();
}

fn bench_affinity(c: &mut Criterion) {
    let mut g = c.benchmark_group("affinity");
    let mut table = AffinityTable::new(Duration::from_secs(600));
    let now = Instant::now();
    let backend: Arc<str> = Arc::from("backend-1");
    let ip = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
    for i in 0..10_000 {
        table.bind(ip(i), Arc::clone(&backend), now);
    }
    let mut i = 0u32;
    g.bench_function("lookup_hit_10k", |b| {
        b.iter(|| {
            i = (i + 7919) % 10_000;
            table.lookup(black_box(ip(i)), now).map(str::len)
        })
    });
    g.bench_function("lookup_miss_10k", |b| {
        b.iter(|| table.lookup(black_box(ip(20_000)), now).map(str::len))
    });
    g.finish();
}

fn bench_proxy_protocol(c: &mut Criterion) {
    let mut g = c.benchmark_group("proxy_protocol");
    let src: SocketAddr = "203.0.113.7:51234".parse().unwrap();
    let dst: SocketAddr = "192.0.2.1:443".parse().unwrap();
    let mut v2 = [0u8; proxy_protocol::V2_MAX_ENCODED];
    let n2 = proxy_protocol::encode_v2(src, dst, &mut v2);
    let mut v1 = [0u8; proxy_protocol::V1_MAX_ENCODED];
    let n1 = proxy_protocol::encode_v1(src, dst, &mut v1);
    // Header followed by payload, as a first read usually looks.
    let with_payload = |h: &[u8]| [h, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"].concat();
    let (p1, p2) = (with_payload(&v1[..n1]), with_payload(&v2[..n2]));
    g.bench_function("parse_v1", |b| {
        b.iter(|| proxy_protocol::parse(black_box(&p1)))
    });
    g.bench_function("parse_v2", |b| {
        b.iter(|| proxy_protocol::parse(black_box(&p2)))
    });
    g.bench_function("encode_v2", |b| {
        b.iter(|| {
            let mut out = [0u8; proxy_protocol::V2_MAX_ENCODED];
            proxy_protocol::encode_v2(black_box(src), black_box(dst), &mut out)
        })
    });
    g.finish();
}

fn bench_rate_limit(c: &mut Criterion) {
    use engine::rate_limit::{ClientLimits, ClientTable};
    let mut g = c.benchmark_group("rate_limit");
    let limits = ClientLimits {
        rate_enabled: true,
        per_sec: 1e9,
        burst: u32::MAX,
        max_concurrent: 1_000_000,
    };
    let t0 = Instant::now();
    let mut table = ClientTable::new(16_384, t0);
    let clients: Vec<IpAddr> = (0..10_000u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0xc633_6400 + i)))
        .collect();
    let mut i = 0usize;
    g.bench_function("admit_release_10k_clients", |b| {
        b.iter(|| {
            i = (i + 1) % clients.len();
            let now = t0 + Duration::from_micros(i as u64);
            let a = table.admit(black_box(clients[i]), now, &limits).unwrap();
            table.release(a);
        })
    });
    g.finish();
}

fn bench_pick_scored(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    let snap = snapshot(1000);
    for (k, b) in snap.backends.iter().enumerate() {
        b.live.set_rtt_us(1000 + (k as u32 % 97) * 100);
    }
    let cands = snap.candidates(Some("web")).to_vec();
    let geo = ClientGeo {
        country: Country::parse("BR"),
        region: snap.region_id("sa"),
    };
    let local = snap.region_id("sa");
    let scoring = select::Scoring { rtt_weight: 0.01 };
    g.bench_function("pick_scored_rtt/1000", |b| {
        b.iter(|| {
            select::pick_scored(
                black_box(&snap),
                black_box(&cands),
                &geo,
                local,
                &[],
                scoring,
                &select::Atomics::at(Instant::now()),
            )
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_select,
    bench_snapshot,
    bench_affinity,
    bench_proxy_protocol,
    bench_rate_limit,
    bench_pick_scored
);
criterion_main!(benches);
