//! Internal DNS against the real binary, with real resolver clients: `dig`
//! (bind9-dnsutils), `kdig` (knot-dnsutils) and a Rust client built on
//! hickory-proto, over UDP and TCP, and Unbound and BIND's `named` as
//! resolvers in front of the POP.
//!
//! `dig`, `kdig`, `unbound` and `named` are required: CI installs them
//! (`.ci/run`); a missing one fails the test, it never skips it.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// Geo: 10.9.0.0/16 is Germany (eu), 10.8.0.0/16 the US; loopback clients
/// have no country, so the local POP's region (sa) wins for them.
const DNS_CONFIG: &str = r#"
[pop]
region = "sa"
name = "gru-1"

[[geo.override]]
cidr = "10.9.0.0/16"
country = "DE"

[[geo.override]]
cidr = "10.8.0.0/16"
country = "US"

[dns]
enabled = true
listen_addr = "127.0.0.1:0"
ttl_secs = 42
tcp_idle_timeout_secs = 2

[[dns.pop]]
name = "gru-1"
region = "sa"
addr = "10.50.0.1"

[[dns.pop]]
name = "fra-1"
region = "eu"
addr = "fdaa::60:1"
"#;

struct Dns {
    proxy: Proxy,
    addr: SocketAddr,
    db: Db,
    _dir: TempDir,
}

/// The usual table: app `web` in three regions and over IPv6, app `api`
/// IPv6 only.
fn rows() -> Vec<Row> {
    let at = |id: &str, app: &str, region: &str, country: &str, ip: &str| {
        let mut r = Row::new(id, app, region, 8080).country(country);
        r.ip = ip.into();
        r
    };
    vec![
        at("sa-1", "web", "sa", "BR", "10.1.0.1"),
        at("eu-1", "web", "eu", "DE", "10.2.0.1"),
        at("us-1", "web", "us", "US", "10.3.0.1"),
        at("eu-6", "web", "eu", "DE", "fd00::2:1"),
        at("api-1", "api", "eu", "DE", "fd00::9"),
    ]
}

/// The usual table plus 80 backends of app `big` in region ap (Japan), too
/// many A records for a UDP answer.
fn rows_with_80_in_ap() -> Vec<Row> {
    rows_with_in_ap(80)
}

/// The usual table plus `n` backends of app `big` in region ap (Japan),
/// `b0`… on 10.7.0.1….
fn rows_with_in_ap(n: usize) -> Vec<Row> {
    let mut many: Vec<Row> = (0..n)
        .map(|i| {
            let mut r = Row::new(&format!("b{i}"), "big", "ap", 8080).country("JP");
            r.ip = format!("10.7.{}.{}", i / 250, i % 250 + 1);
            r
        })
        .collect();
    many.extend(rows());
    many
}

fn start_with(rows: &[Row], extra: &str) -> Dns {
    start_with_config(rows, &format!("{DNS_CONFIG}\n{extra}"))
}

/// `dns_config` in place of [`DNS_CONFIG`] (to change keys of its `[dns]`
/// table).
fn start_with_config(rows: &[Row], dns_config: &str) -> Dns {
    let dir = TempDir::new("dns");
    let db = Db::create(dir.join("routing.db"));
    for r in rows {
        db.upsert(r);
    }
    let proxy = Proxy::with_config(&dir, &config(&db.path, dns_config));
    let addr = dns_addr(&proxy);
    Dns {
        proxy,
        addr,
        db,
        _dir: dir,
    }
}

fn start() -> Dns {
    start_with(&rows(), "")
}

/// The UDP address from `dns listening udp=… tcp=…`; checks TCP has the
/// same one.
fn dns_addr(proxy: &Proxy) -> SocketAddr {
    let line = proxy
        .wait_for_log("dns listening", PATIENCE)
        .unwrap_or_else(|| panic!("no `dns listening` line:\n{}", proxy.log_text()));
    let udp: SocketAddr = field(&line, "udp").unwrap().parse().unwrap();
    let tcp: SocketAddr = field(&line, "tcp").unwrap().parse().unwrap();
    assert_eq!(udp, tcp, "{line}");
    udp
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// Runs a resolver tool installed from Debian; fails loudly when missing.
/// The output comes back with runs of whitespace collapsed to one space.
fn tool(name: &str, package: &str, addr: SocketAddr, args: &[&str]) -> String {
    let patience: &[&str] = if name == "kdig" {
        &["+timeout=3", "+retry=0"]
    } else {
        &["+time=3", "+tries=1"]
    };
    let out = Command::new(name)
        .arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .args(patience)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{name}` ({e}): install the Debian package {package} (.ci/run does)")
        });
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn dig(addr: SocketAddr, args: &[&str]) -> String {
    tool("dig", "bind9-dnsutils", addr, args)
}

fn kdig(addr: SocketAddr, args: &[&str]) -> String {
    tool("kdig", "knot-dnsutils", addr, args)
}

/// `+short` output as sorted lines.
fn short(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(String::from)
        .collect();
    v.sort();
    v
}

fn status(out: &str) -> String {
    let at = out
        .find("status: ")
        .unwrap_or_else(|| panic!("no status in:\n{out}"));
    out[at + 8..]
        .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .next()
        .unwrap()
        .to_string()
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut msg = Message::new(0xbeef, MessageType::Query, OpCode::Query);
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    msg
}

fn udp_exchange(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(bytes, addr).unwrap();
    let mut buf = vec![0u8; 65535];
    match sock.recv_from(&mut buf) {
        Ok((n, _)) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

fn tcp_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    tcp_send(&mut s, bytes);
    tcp_recv(&mut s).expect("a reply over TCP")
}

fn tcp_send(s: &mut TcpStream, bytes: &[u8]) {
    let mut frame = (bytes.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(bytes);
    s.write_all(&frame).unwrap();
}

fn tcp_recv(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).ok()?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut msg).ok()?;
    Some(msg)
}

fn ask_udp(addr: SocketAddr, msg: &Message) -> Message {
    let reply = udp_exchange(addr, &msg.to_vec().unwrap()).expect("a reply over UDP");
    Message::from_vec(&reply).unwrap()
}

fn ask_tcp(addr: SocketAddr, msg: &Message) -> Message {
    Message::from_vec(&tcp_exchange(addr, &msg.to_vec().unwrap())).unwrap()
}

fn addrs(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------

#[test]
fn app_resolves_to_the_backend_the_proxy_would_pick_with_every_client() {
    let d = start();
    for transport in ["+notcp", "+tcp"] {
        // Loopback has no country: the local POP's region (sa) wins.
        assert_eq!(
            short(&dig(d.addr, &[transport, "+short", "web.internal", "A"])),
            ["10.1.0.1"]
        );
        assert_eq!(
            short(&kdig(d.addr, &[transport, "+short", "web.internal", "A"])),
            ["10.1.0.1"]
        );
        // EDNS Client Subnet: the client's network, not the resolver's.
        let eu = [
            "+subnet=10.9.0.0/16",
            transport,
            "+short",
            "web.internal",
            "A",
        ];
        assert_eq!(short(&dig(d.addr, &eu)), ["10.2.0.1"]);
        assert_eq!(short(&kdig(d.addr, &eu)), ["10.2.0.1"]);
        let us = [
            "+subnet=10.8.1.0/24",
            transport,
            "+short",
            "web.internal",
            "A",
        ];
        assert_eq!(short(&dig(d.addr, &us)), ["10.3.0.1"]);
        assert_eq!(
            short(&dig(d.addr, &[transport, "+short", "web.internal", "AAAA"])),
            ["fd00::2:1"]
        );
        assert_eq!(
            short(&kdig(
                d.addr,
                &[transport, "+short", "api.internal", "AAAA"]
            )),
            ["fd00::9"]
        );
    }
    let full = dig(d.addr, &["+subnet=10.9.0.0/16", "web.internal", "A"]);
    assert!(
        full.contains("CLIENT-SUBNET: 10.9.0.0/16/16"),
        "scope echoed:\n{full}"
    );
    assert!(full.contains("flags: qr aa"), "{full}");
    assert!(
        full.contains("web.internal. 42 IN A 10.2.0.1"),
        "ttl_secs applies:\n{full}"
    );
    // Rust client, both transports.
    let q = query("web.internal.", RecordType::A);
    assert_eq!(addrs(&ask_udp(d.addr, &q)), ["10.1.0.1"]);
    assert_eq!(addrs(&ask_tcp(d.addr, &q)), ["10.1.0.1"]);
}

#[test]
fn region_pop_srv_and_apex_records() {
    let d = start();
    for transport in ["+notcp", "+tcp"] {
        let eu = short(&dig(
            d.addr,
            &[transport, "+short", "eu.backends.internal", "A"],
        ));
        assert_eq!(eu, ["10.2.0.1"]);
        let eu6 = short(&kdig(
            d.addr,
            &[transport, "+short", "eu.backends.internal", "AAAA"],
        ));
        assert_eq!(eu6, ["fd00::2:1", "fd00::9"]);
        assert_eq!(
            short(&dig(
                d.addr,
                &[transport, "+short", "sa.pops.internal", "A"]
            )),
            ["10.50.0.1"]
        );
        assert_eq!(
            short(&kdig(
                d.addr,
                &[transport, "+short", "eu.pops.internal", "AAAA"]
            )),
            ["fdaa::60:1"]
        );
        let srv = short(&dig(
            d.addr,
            &[transport, "+short", "_web._tcp.internal", "SRV"],
        ));
        assert_eq!(
            srv,
            [
                "2 1 8080 sa-1.web.internal.",
                "3 1 8080 eu-1.web.internal.",
                "3 1 8080 eu-6.web.internal.",
                "3 1 8080 us-1.web.internal.",
            ]
        );
        assert_eq!(
            short(&dig(
                d.addr,
                &[transport, "+short", "eu-1.web.internal", "A"]
            )),
            ["10.2.0.1"]
        );
        let soa = short(&kdig(d.addr, &[transport, "+short", "internal", "SOA"]));
        assert_eq!(soa.len(), 1);
        assert!(
            soa[0].starts_with("ns.internal. hostmaster.internal. "),
            "{soa:?}"
        );
        assert_eq!(
            short(&dig(d.addr, &[transport, "+short", "internal", "NS"])),
            ["ns.internal."]
        );
        // This POP (gru-1) is the name server.
        assert_eq!(
            short(&dig(d.addr, &[transport, "+short", "ns.internal", "A"])),
            ["10.50.0.1"]
        );
    }
    // SRV glue comes in the additional section.
    let srv = ask_udp(d.addr, &query("_web._tcp.internal.", RecordType::SRV));
    assert_eq!(srv.additionals.len(), 4);
}

#[test]
fn dns_semantics_for_unknown_names_other_types_and_outside_names() {
    let d = start();
    for transport in ["+notcp", "+tcp"] {
        for run in [dig, kdig] {
            let nx = run(d.addr, &[transport, "nope.internal", "A"]);
            assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
            assert!(nx.contains("AUTHORITY SECTION"), "SOA in authority:\n{nx}");
            assert!(nx.contains("SOA ns.internal. hostmaster.internal."), "{nx}");
            let nodata = run(d.addr, &[transport, "web.internal", "MX"]);
            assert_eq!(status(&nodata), "NOERROR", "{nodata}");
            assert!(nodata.contains("ANSWER: 0"), "{nodata}");
            assert!(nodata.contains("SOA ns.internal."), "{nodata}");
            let outside = run(d.addr, &[transport, "example.com", "A"]);
            assert_eq!(status(&outside), "REFUSED", "{outside}");
            let mixed = run(d.addr, &[transport, "+short", "WeB.InTeRnAl", "A"]);
            assert_eq!(short(&mixed), ["10.1.0.1"]);
        }
    }
    // Rust client.
    let nx = ask_tcp(d.addr, &query("nope.internal.", RecordType::A));
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(nx.authorities[0].record_type(), RecordType::SOA);
    let refused = ask_udp(d.addr, &query("example.com.", RecordType::A));
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    // A refusal echoes the client's subnet with scope 0 (RFC 7871 §7.2.1).
    let refused = dig(d.addr, &["+subnet=10.9.0.0/16", "example.com", "A"]);
    assert_eq!(status(&refused), "REFUSED", "{refused}");
    assert!(
        refused.contains("CLIENT-SUBNET: 10.9.0.0/16/0"),
        "{refused}"
    );
}

#[test]
fn malformed_queries_get_formerr_over_udp_and_tcp() {
    let d = start();
    let good = query("web.internal.", RecordType::A).to_vec().unwrap();
    let cut = &good[..good.len() - 3];
    let r = Message::from_vec(&udp_exchange(d.addr, cut).unwrap()).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(r.metadata.id, 0xbeef);
    let r = Message::from_vec(&tcp_exchange(d.addr, cut)).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // EDNS version 1: BADVERS (dig prints it).
    let out = dig(d.addr, &["+edns=1", "+noednsneg", "web.internal", "A"]);
    assert_eq!(status(&out), "BADVERS", "{out}");
}

#[test]
fn edns0_is_answered_with_our_payload_size() {
    let d = start();
    let out = dig(d.addr, &["web.internal", "A"]);
    assert!(out.contains("EDNS: version: 0, flags:; udp: 1232"), "{out}");
    let out = dig(d.addr, &["+noedns", "web.internal", "A"]);
    assert!(!out.contains("OPT PSEUDOSECTION"), "{out}");
    let out = kdig(d.addr, &["+edns", "web.internal", "A"]);
    assert!(out.contains("EDNS PSEUDOSECTION"), "{out}");
}

#[test]
fn large_answers_set_tc_over_udp_and_clients_retry_over_tcp() {
    let d = start_with(&rows_with_80_in_ap(), "");
    // Without EDNS the limit is 512 bytes: TC, no answers.
    let udp = dig(d.addr, &["+ignore", "+noedns", "ap.backends.internal", "A"]);
    assert!(
        udp.contains("flags: qr tc aa") || udp.contains("flags: qr aa tc"),
        "{udp}"
    );
    assert!(udp.contains("ANSWER: 0"), "{udp}");
    // dig retries over TCP on its own and gets all 80.
    let retried = dig(d.addr, &["+noedns", "ap.backends.internal", "A"]);
    assert!(
        retried.contains("Truncated, retrying in TCP mode"),
        "{retried}"
    );
    assert!(retried.contains("ANSWER: 80"), "{retried}");
    // kdig too.
    let k = kdig(d.addr, &["+noedns", "ap.backends.internal", "A"]);
    assert!(k.contains("ANSWER: 80"), "{k}");
    // Rust client: TC over UDP, everything over TCP.
    let q = query("ap.backends.internal.", RecordType::A);
    let udp = ask_udp(d.addr, &q);
    assert!(udp.metadata.truncation);
    assert_eq!(ask_tcp(d.addr, &q).answers.len(), 80);
    // With EDNS (1232 bytes) 80 A records (16 bytes each) do not fit either.
    let mut q = q;
    q.set_edns(Edns::new())
        .edns
        .as_mut()
        .unwrap()
        .set_max_payload(4096);
    let udp = udp_exchange(d.addr, &q.to_vec().unwrap()).unwrap();
    assert!(udp.len() <= 1232);
    assert!(Message::from_vec(&udp).unwrap().metadata.truncation);
}

/// Unbound (Debian's `unbound`), a recursive resolver as a site would run
/// one, with `internal.` as a stub zone served by this POP. Killed when
/// dropped.
struct Unbound {
    _daemon: common::daemons::Daemon,
    addr: SocketAddr,
}

impl Unbound {
    fn forwarding_internal_to(dir: &TempDir, pop_dns: SocketAddr) -> Unbound {
        let addr = SocketAddr::from(([127, 0, 0, 1], dead_port()));
        let config = dir.join("unbound.conf");
        // No DNSSEC validator (`internal.` is not signed), loopback may be
        // queried (the stub is on it), and EDNS Client Subnet is sent to the
        // stub (the subnetcache module: answers cached per client subnet).
        std::fs::write(
            &config,
            format!(
                "server:\n  interface: {ip}\n  port: {port}\n  do-ip6: no\n  \
                 do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  \
                 directory: \"{dir}\"\n  pidfile: \"\"\n  use-syslog: no\n  \
                 logfile: \"\"\n  verbosity: 1\n  module-config: \"subnetcache iterator\"\n  \
                 send-client-subnet: {stub_ip}\n  do-not-query-localhost: no\n  access-control: 127.0.0.0/8 allow\n  \
                 local-zone: \"internal.\" nodefault\n\
                 stub-zone:\n  name: \"internal.\"\n  stub-addr: {stub_ip}@{stub_port}\n",
                ip = addr.ip(),
                port = addr.port(),
                dir = dir.path().display(),
                stub_ip = pop_dns.ip(),
                stub_port = pop_dns.port(),
            ),
        )
        .unwrap();
        // Ready once its TCP port accepts (it opens UDP and TCP together).
        let daemon = common::daemons::daemon(
            "unbound",
            "unbound",
            &["-d", "-c", config.to_str().unwrap()],
            &dir.join("unbound.log"),
            &[addr.port()],
        );
        Unbound {
            _daemon: daemon,
            addr,
        }
    }
}

/// Clients behind a real recursive resolver get this POP's answers: Unbound
/// with `internal.` as a stub zone accepts them (names, empty answers with
/// the SOA, NXDOMAIN, SRV), passes its clients' subnets on (EDNS Client
/// Subnet) and caches the geo answers per subnet, and for an answer too
/// large for UDP it takes the TC bit and asks again over TCP, as resolvers
/// do.
#[test]
fn unbound_resolves_internal_names_through_the_pop() {
    let d = start_with(&rows_with_80_in_ap(), "");
    let dir = TempDir::new("dns-unbound");
    let unbound = Unbound::forwarding_internal_to(&dir, d.addr);
    let via = unbound.addr;
    // Unbound's client is on loopback, which has no country: region sa.
    let plain = || short(&dig(via, &["+short", "web.internal", "A"]));
    assert_eq!(plain(), ["10.1.0.1"]);
    // A client's own subnet reaches the POP through Unbound: Germany, then
    // the US, each its own cache entry; loopback's answer is still sa.
    let from = |subnet: &str| {
        let subnet = format!("+subnet={subnet}");
        short(&dig(via, &[subnet.as_str(), "+short", "web.internal", "A"]))
    };
    assert_eq!(from("10.9.0.0/16"), ["10.2.0.1"]);
    assert_eq!(from("10.8.1.0/24"), ["10.3.0.1"]);
    assert_eq!(plain(), ["10.1.0.1"]);
    assert_eq!(
        short(&kdig(via, &["+short", "web.internal", "AAAA"])),
        ["fd00::2:1"]
    );
    let srv = short(&dig(via, &["+short", "_web._tcp.internal", "SRV"]));
    assert_eq!(srv.len(), 4, "{srv:?}");
    let nx = dig(via, &["nope.internal", "A"]);
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
    assert!(nx.contains("SOA ns.internal. hostmaster.internal."), "{nx}");
    let nodata = dig(via, &["web.internal", "MX"]);
    assert_eq!(status(&nodata), "NOERROR", "{nodata}");
    assert!(nodata.contains("ANSWER: 0"), "{nodata}");
    // 80 A records do not fit in Unbound's 1232-byte EDNS buffer: this POP
    // answers TC over UDP and Unbound retries over TCP. (The client asks
    // Unbound over TCP, so Unbound's own reply is not truncated.)
    let big = dig(via, &["+tcp", "ap.backends.internal", "A"]);
    assert_eq!(status(&big), "NOERROR", "{big}");
    assert!(big.contains("ANSWER: 80"), "{big}");
}

/// A UDP hop between a resolver and the POP that records the queries
/// reaching the POP (`name. TYPE`), one at a time. Stops when dropped.
struct CountingHop {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CountingHop {
    fn to(pop_dns: SocketAddr) -> CountingHop {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65535];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Ok(q) = Message::from_vec(&buf[..n]) {
                    if let Some(q) = q.queries.first() {
                        let line = format!("{} {}", q.name(), q.query_type());
                        seen2.lock().unwrap().push(line);
                    }
                }
                if let Some(reply) = udp_exchange(pop_dns, &buf[..n]) {
                    sock.send_to(&reply, from).unwrap();
                }
            }
        });
        CountingHop {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// How many queries for `query` (`name. TYPE`) reached the POP.
    fn count(&self, query: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|q| q.eq_ignore_ascii_case(query))
            .count()
    }
}

impl Drop for CountingHop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// RFC 7871 §7.2.1 through Unbound's subnetcache: an answer that is the
/// same for every client (a region's backends, NXDOMAIN, NODATA) comes back
/// with ECS scope 0, and Unbound answers clients of other subnets from the
/// one copy it cached; only the answer chosen by the client's location
/// (`web.internal`) is asked again per subnet. Until 2026-12-06 every reply
/// carried the source prefix as its scope, and each client subnet cost a
/// query to the POP for every name.
#[test]
fn unbound_asks_once_for_answers_that_hold_for_every_subnet() {
    let d = start();
    let hop = CountingHop::to(d.addr);
    let dir = TempDir::new("dns-unbound-scope");
    let unbound = Unbound::forwarding_internal_to(&dir, hop.addr);
    let via = unbound.addr;
    let subnets = ["10.9.0.0/16", "10.8.1.0/24", "192.0.2.0/24"];
    for subnet in subnets {
        let ask = |name: &str, qtype: &str| {
            let out = dig(via, &[&format!("+subnet={subnet}"), name, qtype]);
            (status(&out), out)
        };
        let (rcode, out) = ask("eu.backends.internal", "A");
        assert_eq!(rcode, "NOERROR", "{out}");
        assert!(out.contains("IN A 10.2.0.1"), "{out}");
        // Unbound tells its client the scope it cached the answer for.
        assert!(out.contains(&format!("CLIENT-SUBNET: {subnet}/0")), "{out}");
        let (rcode, out) = ask("nope.internal", "A");
        assert_eq!(rcode, "NXDOMAIN", "{out}");
        let (rcode, out) = ask("web.internal", "MX");
        assert_eq!(rcode, "NOERROR", "{out}");
        assert!(out.contains("ANSWER: 0"), "{out}");
        let (rcode, out) = ask("web.internal", "A");
        assert_eq!(rcode, "NOERROR", "{out}");
        let prefix = subnet.split_once('/').unwrap().1;
        assert!(
            out.contains(&format!("CLIENT-SUBNET: {subnet}/{prefix}")),
            "{out}"
        );
    }
    let seen = hop.seen.lock().unwrap().clone();
    assert_eq!(hop.count("eu.backends.internal. A"), 1, "{seen:?}");
    assert_eq!(hop.count("nope.internal. A"), 1, "{seen:?}");
    assert_eq!(hop.count("web.internal. MX"), 1, "{seen:?}");
    // The location-dependent answer: a query per client subnet at least
    // (Unbound's QNAME minimisation asks `web.internal. A` on its way to the
    // MX too).
    assert!(hop.count("web.internal. A") >= subnets.len(), "{seen:?}");
}

/// BIND's `named` (Debian's `bind9`), the other resolver sites run, with
/// `internal.` as a forward zone to this POP (`forward only`, no DNSSEC
/// validation: `internal.` is not signed). Killed when dropped.
struct Named {
    _daemon: common::daemons::Daemon,
    addr: SocketAddr,
}

impl Named {
    fn forwarding_internal_to(dir: &TempDir, pop_dns: SocketAddr) -> Named {
        let addr = SocketAddr::from(([127, 0, 0, 1], dead_port()));
        let config = dir.join("named.conf");
        // `controls {}`: no rndc channel (it would take port 953 on the
        // host); one worker thread (-n 1); logs to stderr (-g).
        std::fs::write(
            &config,
            format!(
                "options {{\n  directory \"{dir}\";\n  pid-file none;\n  \
                 session-keyfile \"{dir}/session.key\";\n  \
                 listen-on port {port} {{ {ip}; }};\n  listen-on-v6 {{ none; }};\n  \
                 recursion yes;\n  allow-query {{ any; }};\n  dnssec-validation no;\n}};\n\
                 controls {{ }};\n\
                 zone \"internal\" {{\n  type forward;\n  forward only;\n  \
                 forwarders {{ {stub_ip} port {stub_port}; }};\n}};\n",
                dir = dir.path().display(),
                ip = addr.ip(),
                port = addr.port(),
                stub_ip = pop_dns.ip(),
                stub_port = pop_dns.port(),
            ),
        )
        .unwrap();
        let daemon = common::daemons::daemon(
            "named",
            "bind9",
            &["-g", "-n", "1", "-c", config.to_str().unwrap()],
            &dir.join("named.log"),
            &[addr.port()],
        );
        Named {
            _daemon: daemon,
            addr,
        }
    }
}

/// QA: through BIND 9.18.28 or later (Debian 12's `named` as a forwarder)
/// a region of more than 100 backends was SERVFAIL, as was the SRV name of
/// an app with more than 100: `named` refuses to cache an RRset of more
/// than 100 records (`max-records-per-type`, the CVE-2024-1737 fix; its
/// log said "too many records (must not exceed 100)"). Now such a list is
/// cut to 100 records (SRV: the nearest first), which `named` takes, and
/// so are the zone's other answers (names, NODATA and NXDOMAIN with the
/// SOA).
#[test]
fn bind_resolves_internal_names_and_lists_of_more_than_100_backends() {
    let d = start_with(&rows_with_in_ap(120), "");
    let dir = TempDir::new("dns-named");
    let named = Named::forwarding_internal_to(&dir, d.addr);
    let via = named.addr;
    assert_eq!(
        short(&dig(via, &["+short", "web.internal", "A"])),
        ["10.1.0.1"]
    );
    let nx = dig(via, &["nope.internal", "A"]);
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
    assert!(nx.contains("SOA ns.internal. hostmaster.internal."), "{nx}");
    let nodata = dig(via, &["web.internal", "MX"]);
    assert_eq!(status(&nodata), "NOERROR", "{nodata}");
    assert!(nodata.contains("ANSWER: 0"), "{nodata}");
    // 120 backends in ap: 100 A records (TC over UDP, then TCP, between
    // named and the POP).
    let big = dig(via, &["+tcp", "ap.backends.internal", "A"]);
    assert_eq!(status(&big), "NOERROR", "{big}");
    assert!(big.contains("ANSWER: 100"), "{big}");
    let srv = dig(via, &["+tcp", "_big._tcp.internal", "SRV"]);
    assert_eq!(status(&srv), "NOERROR", "{srv}");
    assert!(srv.contains("ANSWER: 100"), "{srv}");
    // Straight from the POP, too: an RRset never holds more than 100.
    let q = query("ap.backends.internal.", RecordType::A);
    assert_eq!(ask_tcp(d.addr, &q).answers.len(), 100);
    let q = query("_big._tcp.internal.", RecordType::SRV);
    assert_eq!(ask_tcp(d.addr, &q).answers.len(), 100);
}

/// QA: on a wildcard address (`0.0.0.0`, the default's, or `::`) a UDP
/// reply left from whichever address the kernel picked for the route back,
/// not the one the query was sent to: a client that asked another address
/// of the host dropped it as a stranger's (`dig`: "communications error
/// ... timed out", `kdig`: "unexpected reply source 127.0.0.1"), and a
/// resolver pointed at that address answered SERVFAIL. Now each reply
/// leaves from its query's destination (`IP_PKTINFO`/`IPV6_PKTINFO`), on
/// an IPv4 socket and on a dual-stack IPv6 one (IPv4-mapped clients).
#[test]
fn udp_replies_on_a_wildcard_address_leave_from_the_address_asked() {
    for wildcard in ["0.0.0.0", "[::]"] {
        let listen = format!("listen_addr = \"{wildcard}:0\"");
        let config = DNS_CONFIG.replace("listen_addr = \"127.0.0.1:0\"", &listen);
        assert_ne!(config, DNS_CONFIG);
        let d = start_with_config(&rows(), &config);
        // Another address of this host than the kernel's choice of source
        // towards a loopback client (127.0.0.1): all of 127/8 is local.
        let asked = SocketAddr::from(([127, 0, 0, 2], d.addr.port()));
        for tool_out in [
            dig(asked, &["+short", "web.internal", "A"]),
            kdig(asked, &["+short", "web.internal", "A"]),
        ] {
            assert_eq!(short(&tool_out), ["10.1.0.1"], "{wildcard}: {tool_out}");
        }
        // A resolver's stub zone at that address.
        let dir = TempDir::new("dns-unbound-alias");
        let unbound = Unbound::forwarding_internal_to(&dir, asked);
        let via = unbound.addr;
        let out = dig(via, &["web.internal", "A"]);
        assert_eq!(status(&out), "NOERROR", "{wildcard}: {out}");
        assert_eq!(
            short(&dig(via, &["+short", "web.internal", "A"])),
            ["10.1.0.1"]
        );
        // The replies' source, as a connected socket sees it (one that
        // gets a stranger's datagram errs or times out instead).
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(asked).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        sock.send(&query("web.internal.", RecordType::A).to_vec().unwrap())
            .unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a reply from the address asked");
        assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 1);
    }
}

#[test]
fn answers_follow_routing_changes_and_drop_unhealthy_and_deleted_backends() {
    let d = start();
    let a = |d: &Dns| addrs(&ask_udp(d.addr, &query("web.internal.", RecordType::A)));
    assert_eq!(a(&d), ["10.1.0.1"]);
    d.db.exec("UPDATE backends SET healthy = 0 WHERE id = 'sa-1'");
    assert!(eventually(PATIENCE, || a(&d) == ["10.3.0.1"] || a(&d) == ["10.2.0.1"]));
    let sa = short(&dig(d.addr, &["+short", "sa.backends.internal", "A"]));
    assert!(sa.is_empty(), "unhealthy backend listed: {sa:?}");
    let srv = short(&dig(d.addr, &["+short", "_web._tcp.internal", "SRV"]));
    assert!(!srv.iter().any(|l| l.contains("sa-1")), "{srv:?}");
    d.db.exec("UPDATE backends SET deleted = 1 WHERE app = 'web'");
    let gone = || {
        ask_udp(d.addr, &query("web.internal.", RecordType::A))
            .metadata
            .response_code
            == ResponseCode::NXDomain
    };
    assert!(eventually(PATIENCE, gone));
    let mut fresh = Row::new("new-1", "web", "sa", 9000).country("BR");
    fresh.ip = "10.1.0.77".into();
    d.db.upsert(&fresh);
    assert!(eventually(PATIENCE, || a(&d) == ["10.1.0.77"]));
    assert_eq!(
        short(&dig(
            d.addr,
            &["+tcp", "+short", "_web._tcp.internal", "SRV"]
        )),
        ["2 1 9000 new-1.web.internal."]
    );
}

// ---------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------

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
fn random_and_truncated_packets_neither_crash_nor_stop_the_server() {
    let mut d = start();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut seed_q = query("_web._tcp.internal.", RecordType::SRV);
    seed_q.set_edns(Edns::new());
    let seeds = [
        query("web.internal.", RecordType::A).to_vec().unwrap(),
        seed_q.to_vec().unwrap(),
    ];
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let mut sent = 0;
    for i in 0..6000 {
        let packet: Vec<u8> = match i % 3 {
            0 => (0..rng.next() % 700).map(|_| rng.next() as u8).collect(),
            1 => {
                let s = &seeds[i % 2];
                s[..(rng.next() as usize) % s.len()].to_vec()
            }
            _ => {
                let mut p = seeds[i % 2].clone();
                for _ in 0..=(rng.next() % 3) {
                    let at = (rng.next() as usize) % p.len();
                    p[at] = rng.next() as u8;
                }
                p
            }
        };
        sock.send_to(&packet, d.addr).unwrap();
        sent += 1;
        // Drain replies now and then so our own socket does not fill up.
        while sock.recv_from(&mut buf).is_ok() {}
    }
    assert_eq!(sent, 6000);
    // Over TCP: garbage frames, short frames, frames cut mid-way.
    for i in 0..300u64 {
        let mut s = TcpStream::connect(d.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let body: Vec<u8> = (0..rng.next() % 300).map(|_| rng.next() as u8).collect();
        match i % 3 {
            0 => tcp_send(&mut s, &body),
            1 => {
                // Promise more than we send, then hang up.
                let _ = s.write_all(&[0x01, 0x00]);
                let _ = s.write_all(&body);
            }
            _ => {
                let _ = s.write_all(&seeds[0][..(i as usize) % seeds[0].len()]);
            }
        }
        drop(s);
    }
    // Still alive, still answering, over both transports.
    assert!(
        d.proxy.wait_exit(Duration::from_millis(100)).is_none(),
        "the process died"
    );
    let q = query("web.internal.", RecordType::A);
    assert_eq!(addrs(&ask_udp(d.addr, &q)), ["10.1.0.1"]);
    assert_eq!(addrs(&ask_tcp(d.addr, &q)), ["10.1.0.1"]);
    assert_eq!(
        short(&dig(d.addr, &["+short", "web.internal"])),
        ["10.1.0.1"]
    );
    assert!(
        !d.proxy.log_text().contains("panicked"),
        "{}",
        d.proxy.log_text()
    );
}

#[test]
fn idle_tcp_connections_are_closed_and_the_connection_limit_holds() {
    let d = start_with(&rows(), "");
    // tcp_idle_timeout_secs = 2 in DNS_CONFIG.
    let mut idle = TcpStream::connect(d.addr).unwrap();
    idle.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    assert_eq!(idle.read(&mut byte).unwrap_or(0), 0, "closed without data");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    // Pipelined queries on one connection are answered in order.
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut a = query("web.internal.", RecordType::A);
    let mut b = query("api.internal.", RecordType::AAAA);
    a.metadata.id = 1;
    b.metadata.id = 2;
    tcp_send(&mut s, &a.to_vec().unwrap());
    tcp_send(&mut s, &b.to_vec().unwrap());
    let first = Message::from_vec(&tcp_recv(&mut s).unwrap()).unwrap();
    let second = Message::from_vec(&tcp_recv(&mut s).unwrap()).unwrap();
    assert_eq!((first.metadata.id, second.metadata.id), (1, 2));
    assert_eq!(addrs(&second), ["fd00::9"]);
}

/// QA: a message that is not a query (a response, or a frame too short to
/// carry an ID) in the middle of a pipelined TCP connection closed it with
/// what the client had sent after it unread: a reset, which can cost the
/// client the replies already sent for its earlier queries. Now those
/// replies arrive and the connection ends with a FIN.
#[test]
fn a_non_query_mid_pipeline_keeps_the_earlier_replies_and_closes_without_reset() {
    let d = start_with(&rows(), "");
    let mut response = query("web.internal.", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    let response = response.to_vec().unwrap();
    for (what, bad) in [("a response", &response[..]), ("a runt", &[0u8, 7, 1][..])] {
        let mut s = TcpStream::connect(d.addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut stream = Vec::new();
        for (id, bytes) in [
            (1, query("web.internal.", RecordType::A).to_vec().unwrap()),
            (
                2,
                query("api.internal.", RecordType::AAAA).to_vec().unwrap(),
            ),
            (0, bad.to_vec()),
            // Sent after it, so still unread when the server gives up.
            (3, query("web.internal.", RecordType::A).to_vec().unwrap()),
        ] {
            let mut bytes = bytes;
            if id > 0 {
                bytes[..2].copy_from_slice(&u16::to_be_bytes(id));
            }
            stream.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            stream.extend_from_slice(&bytes);
        }
        s.write_all(&stream).unwrap();
        let first = Message::from_vec(&tcp_recv(&mut s).expect("reply 1")).unwrap();
        let second = Message::from_vec(&tcp_recv(&mut s).expect("reply 2")).unwrap();
        assert_eq!((first.metadata.id, second.metadata.id), (1, 2), "{what}");
        assert_eq!(addrs(&second), ["fd00::9"], "{what}");
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{what}: nothing after it: {rest:?}"),
            Err(e) => panic!("{what}: the connection did not end with a FIN: {e}"),
        }
    }
}

#[test]
fn tcp_connections_beyond_the_limit_wait_for_a_free_slot() {
    // Held to the end: it owns the proxy and its directory.
    let dns = start_with_config(
        &rows(),
        &DNS_CONFIG.replace(
            "tcp_idle_timeout_secs = 2",
            "tcp_idle_timeout_secs = 30\ntcp_max_connections = 1",
        ),
    );
    let addr = dns.addr;
    let holder = TcpStream::connect(addr).unwrap();
    // Make sure the holder is being served before the second one connects.
    let mut holder = holder;
    holder.set_read_timeout(Some(PATIENCE)).unwrap();
    tcp_send(
        &mut holder,
        &query("web.internal.", RecordType::A).to_vec().unwrap(),
    );
    assert!(tcp_recv(&mut holder).is_some());
    let mut waiting = TcpStream::connect(addr).unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    tcp_send(
        &mut waiting,
        &query("web.internal.", RecordType::A).to_vec().unwrap(),
    );
    assert!(
        tcp_recv(&mut waiting).is_none(),
        "served beyond tcp_max_connections"
    );
    drop(holder);
    waiting.set_read_timeout(Some(PATIENCE)).unwrap();
    let reply = tcp_recv(&mut waiting).expect("served once a slot frees");
    assert_eq!(addrs(&Message::from_vec(&reply).unwrap()), ["10.1.0.1"]);
    // UDP is unaffected by the TCP limit.
    assert_eq!(
        addrs(&ask_udp(addr, &query("web.internal.", RecordType::A))),
        ["10.1.0.1"]
    );
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[test]
fn the_originals_env_vars_enable_dns_with_its_address_and_domain() {
    let dir = TempDir::new("dns-env");
    let db = Db::create(dir.join("routing.db"));
    for r in rows() {
        db.upsert(&r);
    }
    let proxy = Proxy::start(
        &[],
        &[
            ("EDGEPROXY_DB_PATH", db.path.to_str().unwrap()),
            ("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0"),
            ("EDGEPROXY_DNS_ENABLED", "true"),
            ("EDGEPROXY_DNS_LISTEN_ADDR", "127.0.0.1:0"),
            ("EDGEPROXY_DNS_DOMAIN", "Corp"),
        ],
    );
    let addr = dns_addr(&proxy);
    assert_eq!(
        short(&dig(addr, &["+short", "web.corp", "A"])),
        ["10.1.0.1"]
    );
    assert_eq!(status(&dig(addr, &["web.internal", "A"])), "REFUSED");
}

#[test]
fn a_busy_dns_port_is_a_startup_error() {
    let dir = TempDir::new("dns-busy");
    let db = Db::create(dir.join("routing.db"));
    for (busy, message) in [
        ("udp", "cannot bind DNS UDP socket"),
        ("tcp", "cannot bind DNS TCP listener"),
    ] {
        // Hold the port on one transport only.
        let udp_holder;
        let tcp_holder;
        let port = if busy == "udp" {
            udp_holder = UdpSocket::bind("127.0.0.1:0").unwrap();
            udp_holder.local_addr().unwrap().port()
        } else {
            tcp_holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            tcp_holder.local_addr().unwrap().port()
        };
        let text = config(
            &db.path,
            &format!("[dns]\nenabled = true\nlisten_addr = \"127.0.0.1:{port}\"\n"),
        );
        let path = dir.join("edgeproxy.toml");
        std::fs::write(&path, text).unwrap();
        let mut proxy = Proxy::spawn(&["--config", path.to_str().unwrap()], &[]);
        let status = proxy.wait_exit(PATIENCE).expect("exits");
        assert!(!status.success(), "{busy}: exited 0");
        let line = proxy.wait_for_log(message, PATIENCE);
        let log = proxy.log_text();
        assert!(
            line.is_some_and(|l| l.contains(&port.to_string())),
            "{busy}:\n{log}"
        );
        assert!(!log.contains("edgeproxy ready"), "{log}");
    }
}

/// `(name, scheduling policy)` of each thread of `pid` whose name starts
/// with `prefix` (policy: field 41 of `/proc/PID/task/TID/stat`).
fn thread_policies(pid: u32, prefix: &str) -> Vec<(String, i32)> {
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let name = name.trim();
        if !name.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // After the name in parentheses, fields count from 3 (state).
        let policy = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(41 - 3))
            .and_then(|p| p.parse().ok());
        if let Some(policy) = policy {
            found.push((name.to_string(), policy));
        }
    }
    found.sort();
    found
}

#[test]
fn udp_workers_each_have_a_thread_under_sched_batch_unless_turned_off() {
    const SCHED_OTHER: i32 = 0;
    const SCHED_BATCH: i32 = 3;
    const SCHED_IDLE: i32 = 5;
    for (setting, policy) in [
        ("", SCHED_BATCH),
        ("udp_batch_scheduling = false\n", SCHED_OTHER),
    ] {
        let dns = start_with_config(
            &rows(),
            &DNS_CONFIG.replace(
                "tcp_idle_timeout_secs = 2",
                &format!("tcp_idle_timeout_secs = 2\nudp_workers = 3\n{setting}"),
            ),
        );
        let (proxy, addr) = (&dns.proxy, dns.addr);
        assert_eq!(
            short(&dig(addr, &["+short", "web.internal", "A"])),
            ["10.1.0.1"]
        );
        let want: Vec<(String, i32)> = (0..3).map(|i| (format!("dns-udp-{i}"), policy)).collect();
        let mut seen = Vec::new();
        let all_there = eventually(PATIENCE, || {
            seen = thread_policies(proxy.pid(), "dns-udp-");
            seen == want
        });
        assert!(
            all_there,
            "setting {setting:?}: threads {seen:?}, want {want:?}"
        );
        // Nothing else in the process changes policy, but for the routing
        // reload thread, which runs under SCHED_IDLE (see
        // control/src/reload_thread.rs).
        let expected = |name: &str| match name {
            "routing-reload" => SCHED_IDLE,
            _ => SCHED_OTHER,
        };
        let others = thread_policies(proxy.pid(), "");
        assert!(
            others
                .iter()
                .filter(|(name, _)| !name.starts_with("dns-udp-"))
                .all(|(name, p)| *p == expected(name)),
            "{others:?}"
        );
    }
}
