//! GeoDNS from the cluster's own view: real POPs replicating their `pops`
//! rows, each answering the public zone `edge.example.com` with the
//! nearest POP that takes traffic; `kdig +subnet=` as the client's
//! resolver, from inside the namespaces.
//!
//! Three POPs in network namespaces (10.77.0.1 sa/BR, .2 eu/DE, .3 us/US,
//! their public addresses the same), each with a listener for an app of
//! its own (`app-<i>`) and that app's backend: so one POP can lose its
//! healthy backends while the others keep theirs. Client networks are
//! placed by `[[geo.override]]` (198.18.1.0/24 Brazil, .2 Germany, .3 the
//! United States, Argentina for .4), so answers do not depend on which
//! GeoIP database ships.
//!
//! Needs root (network namespaces) and kdig (knot-dnsutils).

mod common;

use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::netns::Net;
use common::routers::when;
use common::{Db, Proxy, Row, TagBackend, TempDir};

static SERIAL: Mutex<()> = Mutex::new(());

const SECRET: &str = "test-cluster-secret-0123456789";
const ZONE: &str = "edge.example.com";
const PATIENCE: Duration = Duration::from_secs(40);
const BR: &str = "198.18.1.0/24";
const DE: &str = "198.18.2.0/24";
const US: &str = "198.18.3.0/24";
/// Argentina: no POP in the country, one in its region (sa).
const AR: &str = "198.18.4.0/24";

struct Cluster {
    net: Net,
    dir: TempDir,
    pops: Vec<Option<Proxy>>,
    _backends: Vec<TagBackend>,
}

impl Cluster {
    fn start() -> Cluster {
        let net = Net::new(3);
        let dir = TempDir::new("geodns");
        let mut backends = Vec::new();
        for i in 0..3 {
            let listener = net.run_in(i, || TcpListener::bind("127.0.0.1:0").unwrap());
            let b = TagBackend::serve(listener, &format!("pop-{i}"));
            let db = Db::create(dir.join(&format!("routing-{i}.db")));
            db.upsert(&Row::new(
                &format!("b-{i}"),
                &format!("app-{i}"),
                "sa",
                b.port(),
            ));
            backends.push(b);
        }
        let mut c = Cluster {
            net,
            dir,
            pops: vec![None, None, None],
            _backends: backends,
        };
        for i in 0..3 {
            c.launch(i);
        }
        c
    }

    fn config(&self, i: usize) -> String {
        let (region, country) = [("sa", "BR"), ("eu", "DE"), ("us", "US")][i];
        format!(
            r#"
[pop]
name = "pop-{i}"
region = "{region}"
country = "{country}"
public_addrs = ["{ip}"]
[routing]
db_path = "{db}"
reload_interval_ms = 200
[runtime]
shards = 1
[[listener]]
addr = "0.0.0.0:8080"
app = "app-{i}"
[api]
enabled = true
listen_addr = "127.0.0.1:8081"
[dns]
enabled = true
listen_addr = "0.0.0.0:5353"
[geodns]
name = "{ZONE}"
ttl_secs = 30
[[geo.override]]
cidr = "{BR}"
country = "BR"
[[geo.override]]
cidr = "{DE}"
country = "DE"
[[geo.override]]
cidr = "{US}"
country = "US"
[[geo.override]]
cidr = "{AR}"
country = "AR"
[replication]
enabled = true
node_id = "node-{i}"
gossip_addr = "{ip}:4001"
transport_addr = "{ip}:4002"
bootstrap_peers = ["{p0}:4001", "{p1}:4001"]
secret = "{SECRET}"
"#,
            ip = self.net.ip(i),
            db = self.dir.join(&format!("routing-{i}.db")).display(),
            p0 = self.net.ip(0),
            p1 = self.net.ip(1),
        )
    }

    fn launch(&mut self, i: usize) {
        let path = self.dir.join(&format!("pop-{i}.toml"));
        std::fs::write(&path, self.config(i)).unwrap();
        let proxy = Proxy::spawn_in_netns(
            &self.net.hosts[i].ns,
            &["--config", path.to_str().unwrap()],
            &[],
        )
        .ready();
        self.pops[i] = Some(proxy);
    }

    /// `kdig` run in host `from`, asking POP `server`'s DNS.
    fn kdig(&self, from: usize, server: usize, args: &[&str]) -> String {
        let out = self
            .net
            .command(from, "kdig")
            .arg(format!("@{}", self.net.ip(server)))
            .args(["-p", "5353", "+timeout=2", "+retry=1"])
            .args(args)
            .output()
            .expect("kdig (Debian knot-dnsutils; .ci/run installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The A answer for a client in `subnet`, asked at POP `server`.
    fn answer(&self, server: usize, subnet: &str) -> Vec<String> {
        let out = self.kdig(
            server,
            server,
            &["+short", &format!("+subnet={subnet}"), ZONE, "A"],
        );
        let mut v: Vec<String> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with(';'))
            .map(String::from)
            .collect();
        v.sort();
        v
    }

    fn ip(&self, i: usize) -> String {
        self.net.ip(i).to_string()
    }

    fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = self
            .net
            .command(i, common::BIN)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every running POP answers `subnet` with `want`.
    fn converge(&self, subnet: &str, want: &[String], what: &str) -> Instant {
        when(PATIENCE, || {
            (0..3)
                .filter(|&i| self.pops[i].is_some())
                .all(|i| self.answer(i, subnet) == want)
        })
        .unwrap_or_else(|| {
            let seen: Vec<Vec<String>> = (0..3)
                .filter(|&i| self.pops[i].is_some())
                .map(|i| self.answer(i, subnet))
                .collect();
            panic!("{what}: {subnet} should get {want:?}, got {seen:?}")
        })
    }
}

#[test]
fn each_region_gets_its_own_pop_and_a_drained_unhealthy_or_dead_pop_leaves_the_answers() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Cluster::start();
    // Each client gets the POP of its country, from every POP's server.
    c.converge(BR, &[c.ip(0)], "start");
    c.converge(DE, &[c.ip(1)], "start");
    c.converge(US, &[c.ip(2)], "start");
    // No POP in Argentina: the one in its region.
    c.converge(AR, &[c.ip(0)], "start");

    // The reply carries the ECS scope (the source prefix), is
    // authoritative, and the zone has SOA and NS; other names are
    // NXDOMAIN.
    let full = c.kdig(1, 1, &[&format!("+subnet={BR}"), ZONE, "A"]);
    assert!(full.contains(&format!("CLIENT-SUBNET: {BR}/24")), "{full}");
    assert!(full.contains("Flags: qr aa"), "{full}");
    let soa = c.kdig(1, 1, &["+short", ZONE, "SOA"]);
    assert!(
        soa.starts_with(&format!("ns.{ZONE}. hostmaster.{ZONE}.")),
        "{soa}"
    );
    let ns = c.kdig(1, 1, &["+short", ZONE, "NS"]);
    assert_eq!(ns.trim(), format!("ns.{ZONE}."));
    assert_eq!(
        c.kdig(1, 1, &["+short", &format!("ns.{ZONE}"), "A"]).trim(),
        c.ip(1)
    );
    let nx = c.kdig(1, 1, &[&format!("nope.{ZONE}"), "A"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    let nodata = c.kdig(1, 1, &[ZONE, "AAAA"]);
    assert!(
        nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"),
        "{nodata}"
    );

    // Drain eu: German clients go elsewhere, at every POP.
    let drained = Instant::now();
    c.cli(1, &["drain"]);
    let elsewhere = |c: &Cluster| {
        (0..3).all(|i| {
            let a = c.answer(i, DE);
            a.len() == 1 && a[0] != c.ip(1)
        })
    };
    let moved = when(PATIENCE, || elsewhere(&c)).expect("the drained POP is still answered");
    println!(
        "figure: GeoDNS stops answering a drained POP at every POP after {:.0} ms",
        moved.duration_since(drained).as_secs_f64() * 1000.0
    );
    c.cli(1, &["undrain"]);
    c.converge(DE, &[c.ip(1)], "undrain");

    // us loses its only healthy backend: American clients go elsewhere.
    Db::open(c.dir.join("routing-0.db")).exec("UPDATE backends SET healthy = 0 WHERE id = 'b-2'");
    when(PATIENCE, || {
        (0..3).all(|i| !c.answer(i, US).contains(&c.ip(2)))
    })
    .expect("a POP without a healthy backend is still answered");
    let status = c.cli(2, &["pop", "status"]);
    assert!(status.contains("no healthy backend for app-2"), "{status}");
    Db::open(c.dir.join("routing-0.db")).exec("UPDATE backends SET healthy = 1 WHERE id = 'b-2'");
    c.converge(US, &[c.ip(2)], "healthy again");

    // kill -9 eu: gone from the answers once membership calls it down.
    let killed = Instant::now();
    c.pops[1].as_ref().unwrap().signal(9);
    c.pops[1].take();
    let gone = when(PATIENCE, || {
        [0, 2].iter().all(|&i| {
            let a = c.answer(i, DE);
            a.len() == 1 && a[0] != c.ip(1)
        })
    })
    .expect("a dead POP is still answered");
    println!(
        "figure: GeoDNS stops answering a killed POP at every POP after {:.1} s (failure detection; resolvers add up to the TTL, 30 s)",
        gone.duration_since(killed).as_secs_f64()
    );
}

#[test]
fn a_single_pop_answers_itself_until_drained_and_fails_open_without_backends() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("geodns1");
    let backend = TagBackend::start("b");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("b", "web", "sa", backend.port()));
    let text = format!(
        r#"
[pop]
name = "solo"
region = "sa"
country = "BR"
public_addrs = ["203.0.113.10", "2001:db8::10"]
[routing]
db_path = "{db}"
reload_interval_ms = 100
[runtime]
shards = 1
# Reachable at the public addresses (a wildcard address): this POP can serve.
[[listener]]
addr = "0.0.0.0:0"
[api]
enabled = true
listen_addr = "127.0.0.1:0"
[dns]
enabled = true
listen_addr = "127.0.0.1:0"
[metrics]
enabled = true
listen_addr = "127.0.0.1:0"
[geodns]
name = "{ZONE}"
answers = 2
"#,
        db = dir.join("routing.db").display()
    );
    let proxy = Proxy::with_config(&dir, &text);
    let line = proxy.wait_for_log("dns listening", PATIENCE).unwrap();
    let addr: std::net::SocketAddr = common::field(&line, "udp").unwrap().parse().unwrap();
    let api_line = proxy.wait_for_log("api listening", PATIENCE).unwrap();
    let api = format!("http://{}", common::field(&api_line, "addr").unwrap());
    let ask = |qtype: &str| {
        let out = std::process::Command::new("kdig")
            .arg(format!("@{}", addr.ip()))
            .args([
                "-p",
                &addr.port().to_string(),
                "+timeout=2",
                "+short",
                ZONE,
                qtype,
            ])
            .output()
            .expect("kdig (knot-dnsutils)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(
        when(PATIENCE, || ask("A") == "203.0.113.10").is_some(),
        "{}",
        ask("A")
    );
    assert_eq!(ask("AAAA"), "2001:db8::10");

    // Without a healthy backend it is the only live POP: answered anyway
    // (a wrong verdict everywhere must not become an outage).
    db.exec("UPDATE backends SET healthy = 0");
    let cli = |args: &[&str]| {
        let (status, out, err) = common::run_to_end(&[args, &["--api", &api]].concat(), &[]);
        assert!(status.success(), "{err}");
        out
    };
    assert!(when(PATIENCE, || cli(&["pop", "status"])
        .contains("serving:   no"))
    .is_some());
    assert_eq!(ask("A"), "203.0.113.10");
    // Status and metric say so (QA: both said "left out" while the
    // fallback answered it).
    let out = cli(&["pop", "status"]);
    assert!(out.contains("geodns:    answered as the fallback"), "{out}");
    let answered = || {
        let (_, text) = common::http_get(proxy.metrics_addr(), "/metrics");
        common::sample(&text, "edgeproxy_pop_geodns_answered")
    };
    assert_eq!(answered(), Some(1.0));

    // Drained: nothing to answer.
    db.exec("UPDATE backends SET healthy = 1");
    let out = cli(&["drain"]);
    assert!(out.contains("geodns:    left out of answers"), "{out}");
    assert_eq!(answered(), Some(0.0));
    assert!(
        when(PATIENCE, || ask("A").is_empty()).is_some(),
        "{}",
        ask("A")
    );
    cli(&["undrain"]);
    assert!(when(PATIENCE, || ask("A") == "203.0.113.10").is_some());
}

/// An operator who starts a POP without `public_addrs` (GeoDNS then has
/// nothing to answer for it: NODATA) adds them, as the startup warning
/// says, and restarts: the new addresses are answered. QA: this POP's row
/// of `pops` was only ever inserted, so without replication the addresses
/// of its first start were answered for good.
#[test]
fn a_restart_with_new_public_addrs_answers_the_new_ones() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("geodns-restart");
    let backend = TagBackend::start("b");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("b", "web", "sa", backend.port()));
    let config = |public_addrs: &str| {
        format!(
            r#"
[pop]
name = "solo"
region = "sa"
public_addrs = [{public_addrs}]
[routing]
db_path = "{db}"
[runtime]
shards = 1
[limits]
shutdown_grace_secs = 0
[[listener]]
addr = "0.0.0.0:0"
[dns]
enabled = true
listen_addr = "127.0.0.1:0"
[geodns]
name = "{ZONE}"
"#,
            db = dir.join("routing.db").display()
        )
    };
    let ask = |proxy: &Proxy| {
        let line = proxy.wait_for_log("dns listening", PATIENCE).unwrap();
        let addr: std::net::SocketAddr = common::field(&line, "udp").unwrap().parse().unwrap();
        let out = std::process::Command::new("kdig")
            .arg(format!("@{}", addr.ip()))
            .args(["-p", &addr.port().to_string(), "+timeout=2", "+short"])
            .args([ZONE, "A"])
            .output()
            .expect("kdig (knot-dnsutils)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };

    let mut first = Proxy::with_config(&dir, &config(""));
    assert_eq!(ask(&first), "", "no public address yet: NODATA");
    first.signal(libc::SIGTERM);
    assert!(first.wait_exit(PATIENCE).is_some(), "{}", first.log_text());

    let second = Proxy::with_config(&dir, &config(r#""203.0.113.20""#));
    assert!(
        when(PATIENCE, || ask(&second) == "203.0.113.20").is_some(),
        "still answered: {:?}\n{}",
        ask(&second),
        second.log_text()
    );
}
