//! Geo routing through the real binary: PROXY protocol v1/v2 clients from
//! different countries reach the backend of their country, then their region,
//! then the POP's region, then anything; overrides; bad headers; split
//! headers; PROXY v2 towards backends; client affinity.
//!
//! Addresses and what the embedded DB-IP database says about them (checked
//! against `GeoDb::embedded()`): 200.160.2.3, 2001:12ff::1 → BR (NIC.br);
//! 8.8.8.8 → US; 193.99.144.80 → DE (heise.de); 202.12.27.33 → JP (WIDE, the
//! M root server); 2001:200::1 → JP (WIDE); 200.45.0.1, 181.30.0.1 → AR;
//! 41.0.0.1 → ZA; 192.0.2.0/24 and 203.0.113.0/24 (documentation ranges) and
//! 10.0.0.0/8 → no country.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;

const BR: &str = "200.160.2.3";
const BR6: &str = "2001:12ff::1";
const US: &str = "8.8.8.8";
const DE: &str = "193.99.144.80";
const JP: &str = "202.12.27.33";
const JP6: &str = "2001:200::1";
const AR: &str = "200.45.0.1";
const AR2: &str = "181.30.0.1";
const ZA: &str = "41.0.0.1";
const NOWHERE: &str = "192.0.2.1";

const PP_LISTENER: &str =
    "[[listener]]\nname = \"pp\"\naddr = \"127.0.0.1:0\"\naccept_proxy_protocol = true\n";

/// jp-1 (region ap, no country), us-1 (US, us), br-1 (BR, sa), de-1 (DE, eu),
/// in that table order: jp-1 comes first so that a tie, or a pick that
/// ignores geography, lands on it.
struct World {
    dir: TempDir,
    backends: Vec<TagBackend>,
    db: Db,
}

impl World {
    fn new(tag: &str) -> World {
        let dir = TempDir::new(tag);
        let backends: Vec<TagBackend> = ["jp-1", "us-1", "br-1", "de-1"]
            .iter()
            .map(|n| TagBackend::start(n))
            .collect();
        let db = Db::create(dir.join("routing.db"));
        let port = |i: usize| backends[i].port();
        db.upsert(&Row::new("jp-1", "web", "ap", port(0)));
        db.upsert(&Row::new("us-1", "web", "us", port(1)).country("US"));
        db.upsert(&Row::new("br-1", "web", "sa", port(2)).country("BR"));
        db.upsert(&Row::new("de-1", "web", "eu", port(3)).country("DE"));
        World { dir, backends, db }
    }

    fn start(&self, extra: &str) -> Proxy {
        Proxy::with_config(&self.dir, &config(&self.db.path, extra))
    }

    fn accepted(&self) -> usize {
        self.backends.iter().map(TagBackend::accepted).sum()
    }
}

/// Applies `sql` and waits for the reload that follows.
fn change(proxy: &Proxy, db: &Db, sql: &str) {
    let mark = proxy.log_mark();
    db.exec(sql);
    proxy
        .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
        .unwrap_or_else(|| panic!("no reload after {sql:?}; log:\n{}", proxy.log_text()));
}

#[test]
fn clients_reach_their_country_then_region_then_pop_then_anything() {
    let world = World::new("geo-tiers");
    let proxy = world.start(&format!("[pop]\nregion = \"eu\"\n\n{PP_LISTENER}"));
    let addr = proxy.listener("pp");

    for v2 in [false, true] {
        let via = |ip: &str| which_backend_via(addr, ip, v2);
        // Country tier.
        assert_eq!(via(BR), "br-1", "BR (v2={v2})");
        assert_eq!(via(BR6), "br-1", "BR over IPv6 (v2={v2})");
        assert_eq!(via(US), "us-1", "US (v2={v2})");
        assert_eq!(via(DE), "de-1", "DE (v2={v2})");
        // Region tier: no JP/AR/ZA backend.
        assert_eq!(via(JP), "jp-1", "JP → region ap (v2={v2})");
        assert_eq!(via(JP6), "jp-1", "JP over IPv6 → region ap (v2={v2})");
        assert_eq!(via(AR), "br-1", "AR → region sa (v2={v2})");
        assert_eq!(via(ZA), "us-1", "ZA → default region us (v2={v2})");
        // Unknown country: the POP's region (eu).
        assert_eq!(via(NOWHERE), "de-1", "unknown → POP region (v2={v2})");
    }

    // The same AR client as its closer backends go away: region, then the
    // POP's region, then whatever is left.
    assert_eq!(which_backend_via(addr, AR2, false), "br-1");
    change(
        &proxy,
        &world.db,
        "UPDATE backends SET healthy = 0 WHERE id = 'br-1'",
    );
    assert_eq!(
        which_backend_via(addr, AR2, false),
        "de-1",
        "AR without sa → POP region eu"
    );
    assert_eq!(
        which_backend_via(addr, BR, true),
        "de-1",
        "BR without br-1 → POP region eu"
    );
    change(
        &proxy,
        &world.db,
        "UPDATE backends SET healthy = 0 WHERE id = 'de-1'",
    );
    let fallback = which_backend_via(addr, AR2, true);
    assert!(
        ["jp-1", "us-1"].contains(&fallback.as_str()),
        "AR with neither sa nor eu: any backend, got {fallback}"
    );
    let fallback = which_backend_via(addr, NOWHERE, false);
    assert!(["jp-1", "us-1"].contains(&fallback.as_str()), "{fallback}");
    // Country still wins for those who have one.
    assert_eq!(which_backend_via(addr, US, true), "us-1");
    // And everything comes back.
    change(&proxy, &world.db, "UPDATE backends SET healthy = 1");
    assert_eq!(which_backend_via(addr, BR6, false), "br-1");
    assert_eq!(which_backend_via(addr, DE, true), "de-1");
}

/// `geo.default_region` is the region of countries outside the map, with
/// the built-in map as with one of `[geo.regions]`. QA: without
/// `[geo.regions]` it was ignored and "us" kept, silently.
#[test]
fn default_region_applies_with_the_built_in_map() {
    let world = World::new("geo-default-region");
    let proxy = world.start(&format!(
        "[pop]\nregion = \"eu\"\n\n[geo]\ndefault_region = \"ap\"\n\n{PP_LISTENER}"
    ));
    let addr = proxy.listener("pp");
    for v2 in [false, true] {
        let via = |ip: &str| which_backend_via(addr, ip, v2);
        assert_eq!(via(ZA), "jp-1", "ZA → default region ap (v2={v2})");
        // The built-in map still places the others.
        assert_eq!(via(AR), "br-1", "AR → region sa (v2={v2})");
        assert_eq!(via(NOWHERE), "de-1", "unknown → POP region (v2={v2})");
    }
}

#[test]
fn cidr_overrides_beat_the_database_and_map_private_ranges() {
    let world = World::new("geo-override");
    let proxy = world.start(&format!(
        "[pop]\nregion = \"sa\"\n\n\
         [[geo.override]]\ncidr = \"10.1.0.0/16\"\ncountry = \"DE\"\n\n\
         [[geo.override]]\ncidr = \"8.8.8.0/24\"\ncountry = \"JP\"\n\n\
         [[geo.override]]\ncidr = \"fd00::/8\"\ncountry = \"US\"\n\n\
         {PP_LISTENER}"
    ));
    let addr = proxy.listener("pp");
    for v2 in [false, true] {
        let via = |ip: &str| which_backend_via(addr, ip, v2);
        assert_eq!(via("10.1.2.3"), "de-1", "10.1.0.0/16 → DE (v2={v2})");
        assert_eq!(via("10.1.255.254"), "de-1", "(v2={v2})");
        // Outside the override: no country, so the POP's region (sa).
        assert_eq!(via("10.2.0.1"), "br-1", "(v2={v2})");
        // An override beats the database: 8.8.8.8 is US there.
        assert_eq!(
            via("8.8.8.8"),
            "jp-1",
            "8.8.8.0/24 → JP → region ap (v2={v2})"
        );
        assert_eq!(via("8.8.4.4"), "us-1", "(v2={v2})");
        assert_eq!(via("fd12::1"), "us-1", "fd00::/8 → US (v2={v2})");
    }
}

#[test]
fn missing_or_malformed_proxy_header_never_reaches_a_backend() {
    let world = World::new("geo-badheader");
    let proxy = world.start(PP_LISTENER);
    let addr = proxy.listener("pp");

    // Silent client: closed when the header deadline (5 s) passes. Runs
    // alongside the others.
    let silent = std::thread::spawn(move || {
        let s = TcpStream::connect(addr).unwrap();
        read_until_closed(&s)
    });

    let mut bad_v2 = proxy_v2(client_at(BR), addr);
    bad_v2[12] = 0x31; // version 3
    let mut bad_v2_family = proxy_v2(client_at(BR), addr);
    bad_v2_family[13] = 0x41;
    let v1 = proxy_v1(client_at(BR), addr);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("no header, plain text", b"hello\n".to_vec(), false),
        (
            "no header, HTTP",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        (
            "no header, TLS",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
            false,
        ),
        (
            "v1 bad address",
            b"PROXY TCP4 300.1.1.1 127.0.0.1 1 2\r\n".to_vec(),
            false,
        ),
        (
            "v1 bad port",
            b"PROXY TCP4 1.1.1.1 127.0.0.1 65536 2\r\n".to_vec(),
            false,
        ),
        (
            "v1 LF only",
            b"PROXY TCP4 1.1.1.1 127.0.0.1 1 2\nhello\n".to_vec(),
            false,
        ),
        (
            "v1 lower case",
            b"proxy TCP4 1.1.1.1 127.0.0.1 1 2\r\n".to_vec(),
            false,
        ),
        (
            "v1 no CRLF in 107 bytes",
            [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 120]].concat(),
            false,
        ),
        ("v2 bad version", bad_v2, false),
        ("v2 bad family", bad_v2_family, false),
        // Half a header, then the client half-closes.
        ("v1 cut short", v1[..v1.len() - 3].to_vec(), true),
    ];
    for (what, bytes, half_close) in &cases {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(bytes).unwrap();
        if *half_close {
            s.shutdown(Shutdown::Write).unwrap();
        }
        let got = read_until_closed(&s);
        assert!(got.is_empty(), "{what}: the client got {got:?}");
    }
    let got = silent.join().unwrap();
    assert!(got.is_empty(), "silent client got {got:?}");
    assert_eq!(world.accepted(), 0, "a backend saw a rejected connection");

    // The listener itself works: the same client with a valid header.
    assert_eq!(which_backend_via(addr, BR, false), "br-1");
    assert_eq!(world.accepted(), 1);
}

#[test]
fn split_header_and_payload_after_the_header_reach_the_backend() {
    let world = World::new("geo-split");
    let proxy = world.start(PP_LISTENER);
    let addr = proxy.listener("pp");

    let v1 = proxy_v1(client_at(BR), addr);
    let v2 = proxy_v2(client_at(DE), addr);
    let v2_6 = proxy_v2(client_at(JP6), addr);
    let cases: Vec<(&str, &[u8], usize, &str)> = vec![
        ("v1 cut after PROXY", &v1, 5, "br-1"),
        ("v1 cut mid-address", &v1, 14, "br-1"),
        ("v1 cut before LF", &v1, v1.len() - 1, "br-1"),
        ("v2 cut in the signature", &v2, 7, "de-1"),
        ("v2 cut after the fixed part", &v2, 16, "de-1"),
        ("v2 cut mid-address", &v2, 21, "de-1"),
        ("v2 IPv6 cut mid-address", &v2_6, 40, "jp-1"),
    ];
    for (what, header, cut, expect) in cases {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(&header[..cut]).unwrap();
        // Not synchronisation: gives the proxy a chance to read the first
        // part on its own, so that the two parts arrive as two reads.
        std::thread::sleep(Duration::from_millis(30));
        let payload = format!("after {what}\n");
        s.write_all(&[&header[cut..], payload.as_bytes()].concat())
            .unwrap();
        assert_eq!(read_line(&s).as_deref(), Some(expect), "{what}");
        assert_eq!(
            read_line(&s),
            Some(payload.trim_end().to_string()),
            "{what}"
        );
        s.shutdown(Shutdown::Write).unwrap();
        assert!(read_until_closed(&s).is_empty(), "{what}");
    }

    // Header and a large payload in one write: every byte arrives, in order.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut first = proxy_v1(client_at(US), addr);
    first.extend_from_slice(&payload[..1000]);
    s.write_all(&first).unwrap();
    assert_eq!(read_line(&s).as_deref(), Some("us-1"));
    let reader = {
        let s = s.try_clone().unwrap();
        std::thread::spawn(move || read_until_closed(&s))
    };
    s.write_all(&payload[1000..]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let echoed = reader.join().unwrap();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echo differs from what was sent");
}

/// A backend that expects a PROXY v2 header, parses it with the engine's own
/// parser and answers `src=<addr> dst=<addr>\n`, then echoes the rest.
fn header_echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (header, consumed) = loop {
                    match engine::proxy_protocol::parse(&buf) {
                        Ok(engine::proxy_protocol::Parsed::Complete { header, consumed }) => {
                            break (header, consumed)
                        }
                        Ok(engine::proxy_protocol::Parsed::Incomplete) => {}
                        Err(e) => {
                            let _ = s.write_all(format!("bad header: {e}\n").as_bytes());
                            return;
                        }
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let version = if buf.starts_with(&engine::proxy_protocol::V2_SIGNATURE) {
                    "v2"
                } else {
                    "v1"
                };
                let show = |a: Option<SocketAddr>| a.map_or("none".to_string(), |a| a.to_string());
                let reply = format!(
                    "{version} src={} dst={}\n",
                    show(header.source),
                    show(header.destination)
                );
                if s.write_all(reply.as_bytes()).is_err() || s.write_all(&buf[consumed..]).is_err()
                {
                    return;
                }
                loop {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&chunk[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn backends_get_the_client_address_in_a_proxy_v2_header() {
    let dir = TempDir::new("geo-sendpp");
    let backend = header_echo_backend();
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("pp-aware", "web", "sa", backend.port()));
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            "[[listener]]\nname = \"plain\"\naddr = \"127.0.0.1:0\"\nsend_proxy_protocol = true\n\n\
             [[listener]]\nname = \"pp\"\naddr = \"127.0.0.1:0\"\naccept_proxy_protocol = true\nsend_proxy_protocol = true\n",
        ),
    );

    // Direct client: the backend sees the TCP peer, and the listener as the
    // destination.
    let plain = proxy.listener("plain");
    let mut s = TcpStream::connect(plain).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&s), Some(format!("v2 src={me} dst={plain}")));
    assert_eq!(
        read_line(&s).as_deref(),
        Some("ping"),
        "payload after the header"
    );
    s.shutdown(Shutdown::Write).unwrap();
    assert!(read_until_closed(&s).is_empty());

    // Behind a load balancer: the address from the client's PROXY header is
    // passed on (v1 in, v2 out; IPv4 and IPv6).
    let pp = proxy.listener("pp");
    for (src, header_v2) in [
        ("200.160.2.3:5555", false),
        ("200.160.2.3:5556", true),
        ("[2001:db8::7]:6000", true),
        ("[2001:db8::8]:6001", false),
    ] {
        let src: SocketAddr = src.parse().unwrap();
        let header = if header_v2 {
            proxy_v2(src, pp)
        } else {
            proxy_v1(src, pp)
        };
        let (line, s) = connect_with(pp, &[header.as_slice(), b"pong\n"].concat());
        let line = line.expect("greeting");
        assert!(
            line.starts_with(&format!("v2 src={src} dst=")),
            "{src}: {line}"
        );
        assert_eq!(read_line(&s).as_deref(), Some("pong"), "{src}");
    }
}

#[test]
fn a_client_keeps_its_backend_while_bound() {
    let dir = TempDir::new("geo-affinity");
    let a = TagBackend::start("a");
    let b = TagBackend::start("b");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("a", "web", "sa", a.port()));
    db.upsert(&Row::new("b", "web", "sa", b.port()));
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            &format!("[[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n\n{PP_LISTENER}"),
        ),
    );

    // Connections are held open, so without affinity the second one would
    // go to the idle backend.
    let held: Vec<(String, TcpStream)> = (0..12)
        .map(|_| connect_tagged(proxy.listener("main")))
        .collect();
    let first = &held[0].0;
    for (i, (name, _)) in held.iter().enumerate() {
        assert_eq!(name, first, "connection {i} from 127.0.0.1 moved");
    }

    // Behind a PROXY listener the client is the address in the header.
    let pp = proxy.listener("pp");
    let mut held_pp = Vec::new();
    let mut bound: Option<String> = None;
    for i in 0..12 {
        let (name, s) = connect_with(pp, &proxy_v2(client_at("203.0.113.9"), pp));
        held_pp.push(s);
        let name = name.expect("greeting");
        let first = bound.get_or_insert_with(|| name.clone());
        assert_eq!(&name, first, "connection {i} from 203.0.113.9 moved");
    }
    // Other clients are not bound to it: held connections from distinct
    // addresses spread by load.
    let mut names = Vec::new();
    for i in 1..=12 {
        let (name, s) = connect_with(
            pp,
            &proxy_v1(client_at(&format!("203.0.113.{}", 100 + i)), pp),
        );
        names.push(name.expect("greeting"));
        held_pp.push(s);
    }
    assert!(
        names.iter().any(|n| n == "a") && names.iter().any(|n| n == "b"),
        "distinct clients all went to one backend: {names:?}"
    );
}

#[test]
fn ttl_zero_disables_affinity() {
    let dir = TempDir::new("geo-noaffinity");
    let a = TagBackend::start("a");
    let b = TagBackend::start("b");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("a", "web", "sa", a.port()));
    db.upsert(&Row::new("b", "web", "sa", b.port()));
    let proxy = Proxy::with_config(&dir, &config(&db.path, "[affinity]\nttl_secs = 0\n"));

    // Held open, so each new connection sees the others' load.
    let held: Vec<(String, TcpStream)> = (0..20).map(|_| connect_tagged(proxy.addr())).collect();
    let on_a = held.iter().filter(|(n, _)| n == "a").count();
    let on_b = held.iter().filter(|(n, _)| n == "b").count();
    assert_eq!(on_a + on_b, 20);
    assert!(on_a >= 5 && on_b >= 5, "not spread: a={on_a} b={on_b}");
}
