//! Memory stays bounded under hostile input, through the real binary: ten
//! rounds of 500 malformed discovery API requests (wrong methods, 10 MB
//! bodies, bad JSON, bad tokens, oversized headers), 5,000 garbage DNS
//! datagrams and 1,000 bad PROXY protocol headers, from 500 client
//! addresses. The proxy's resident memory after each round must stay flat
//! from the second round on: what the first rounds allocate (buffers,
//! tables filling to their bounds, the allocator's arenas) is reused, not
//! added to.
//!
//! The limits that make this hold are in README ("Limits that protect
//! memory"); this test is their proof in one place.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::streams::Rng;
use common::*;

const ROUNDS: usize = 10;
const API_REQUESTS: usize = 500;
const DNS_PACKETS: usize = 5_000;
const PROXY_HEADERS: usize = 1_000;
/// Distinct client addresses (127.0.x.y), the same every round.
const CLIENTS: u32 = 500;
const TOKEN: &str = "bounded-memory-token-0123456789";
/// RSS may wobble by this much from round to round (the allocator hands
/// pages back and takes them again); growth beyond it after round 2 fails.
const SLACK_KB: u64 = 1024;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn client_ip(i: u32) -> Ipv4Addr {
    let n = i % CLIENTS;
    Ipv4Addr::new(127, 0, (n / 250 + 1) as u8, (n % 250 + 1) as u8)
}

/// A TCP connection from `from` to `to`.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> Option<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    socket
        .bind(&SocketAddr::new(IpAddr::V4(from), 0).into())
        .ok()?;
    socket.connect_timeout(&to.into(), PATIENCE).ok()?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    stream.set_write_timeout(Some(PATIENCE)).ok()?;
    Some(stream)
}

/// Sends `request` (and `body_len` more bytes of body, if any), then reads
/// whatever comes back until the server closes or answers. The server may
/// close mid-request (that is the point of some of these).
fn send(from: Ipv4Addr, to: SocketAddr, request: &[u8], body_len: usize) {
    let Some(mut s) = connect_from(from, to) else {
        return;
    };
    if s.write_all(request).is_err() {
        return;
    }
    let chunk = [b'x'; 64 * 1024];
    let mut left = body_len;
    while left > 0 {
        let n = left.min(chunk.len());
        if s.write_all(&chunk[..n]).is_err() {
            break;
        }
        left -= n;
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

fn api_round(api: SocketAddr, rng: &mut Rng) {
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    for i in 0..API_REQUESTS {
        let from = client_ip(i as u32);
        let host = format!("Host: {api}\r\n");
        match i % 10 {
            // Wrong methods.
            0 => send(from, api, format!("PUT /api/v1/register HTTP/1.1\r\n{host}{auth}Content-Length: 0\r\n\r\n").as_bytes(), 0),
            1 => send(from, api, format!("BREW /health HTTP/1.1\r\n{host}\r\n").as_bytes(), 0),
            // A 10 MB body, announced, then one sent chunked without a length.
            2 => send(from, api, format!("POST /api/v1/register HTTP/1.1\r\n{host}{auth}Content-Type: application/json\r\nContent-Length: 10485760\r\n\r\n").as_bytes(), 10 << 20),
            3 if i % 20 == 3 => send(from, api, format!("POST /api/v1/register HTTP/1.1\r\n{host}{auth}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n", 10 << 20).as_bytes(), 10 << 20),
            // Bad JSON of every kind.
            3 | 4 => {
                let mut body = vec![0u8; (rng.next() % 2048) as usize];
                rng.fill(&mut body);
                if i % 2 == 0 {
                    body = br#"{"id": "x", "app": "web", "region": "sa", "ip": "10.0.0.1", "port": 99999}"#.to_vec();
                }
                let head = format!("POST /api/v1/register HTTP/1.1\r\n{host}{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
                let mut req = head.into_bytes();
                req.extend_from_slice(&body);
                send(from, api, &req, 0)
            }
            // Bad tokens.
            5 => send(from, api, format!("GET /api/v1/backends HTTP/1.1\r\n{host}Authorization: Bearer wrong-token-{i}\r\n\r\n").as_bytes(), 0),
            6 => send(from, api, format!("DELETE /api/v1/backends/x HTTP/1.1\r\n{host}\r\n").as_bytes(), 0),
            // A 100 KB header.
            7 => send(from, api, format!("GET /health HTTP/1.1\r\n{host}X-Big: {}\r\n\r\n", "a".repeat(100 * 1024)).as_bytes(), 0),
            // Not HTTP at all.
            8 => {
                let mut junk = vec![0u8; 1 + (rng.next() % 4096) as usize];
                rng.fill(&mut junk);
                send(from, api, &junk, 0)
            }
            // Unknown paths and ids, with a good token.
            _ => send(from, api, format!("POST /api/v1/heartbeat/{}{i} HTTP/1.1\r\n{host}{auth}Content-Length: 0\r\n\r\n", "n".repeat(200)).as_bytes(), 0),
        }
    }
}

fn dns_round(dns: SocketAddr, rng: &mut Rng) {
    let sockets: Vec<UdpSocket> = (0..50)
        .map(|i| UdpSocket::bind((client_ip(i * 10), 0)).unwrap())
        .collect();
    let mut buf = vec![0u8; 4096];
    for i in 0..DNS_PACKETS {
        let len = 1 + (rng.next() % 1500) as usize;
        rng.fill(&mut buf[..len]);
        // Half of them look like queries up front (QR clear, one question).
        if i % 2 == 0 && len > 12 {
            buf[2] &= 0x7f;
            buf[4..6].copy_from_slice(&[0, 1]);
        }
        let _ = sockets[i % sockets.len()].send_to(&buf[..len], dns);
        // Pacing: the point is garbage, not a flood the kernel drops.
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // A few garbage TCP streams too.
    for i in 0..50 {
        let mut junk = vec![0u8; 1 + (rng.next() % 3000) as usize];
        rng.fill(&mut junk);
        send(client_ip(i), dns, &junk, 0);
    }
}

fn proxy_round(listener: SocketAddr, rng: &mut Rng) {
    for i in 0..PROXY_HEADERS {
        let from = client_ip(i as u32);
        let mut header = match i % 5 {
            // A v2 signature, then garbage (and a length that lies).
            0 => {
                let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
                let mut junk = vec![0u8; (rng.next() % 600) as usize];
                rng.fill(&mut junk);
                h.extend_from_slice(&junk);
                h
            }
            // A v1 line that never ends.
            1 => format!("PROXY TCP4 {}", "9".repeat(200)).into_bytes(),
            // A v1 line with nonsense fields.
            2 => b"PROXY TCP4 999.1.1.1 1.1.1.1 70000 80\r\n".to_vec(),
            // Not PROXY at all.
            3 => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            _ => {
                let mut junk = vec![0u8; 1 + (rng.next() % 1024) as usize];
                rng.fill(&mut junk);
                junk
            }
        };
        header.truncate(4096);
        send(from, listener, &header, 0);
    }
}

#[test]
fn hostile_input_leaves_memory_flat_after_the_second_round() {
    let dir = TempDir::new("bounded-memory");
    let backend = TagBackend::start("x");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("x", "web", "sa", backend.port()));
    let text = config(
        &db.path,
        &format!(
            "[api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
             [dns]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n\n\
             [[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n\n\
             [[listener]]\nname = \"pp\"\naddr = \"127.0.0.1:0\"\naccept_proxy_protocol = true\n"
        ),
    );
    // Warnings only: the refusals are logged, and a test reading a million
    // log lines would measure itself.
    std::fs::write(dir.join("edgeproxy.toml"), &text).unwrap();
    let proxy = Proxy::start_with_rust_log(
        &["--config", dir.join("edgeproxy.toml").to_str().unwrap()],
        &[],
        Some("info,control::api::http=error"),
    );
    let api: SocketAddr = proxy.logged_addr("api listening", "addr");
    let dns: SocketAddr = proxy.logged_addr("dns listening", "udp");
    let pp = proxy.listener("pp");
    let pid = proxy.pid();
    let at_start = rss_kb(pid);

    let mut rng = Rng::new(14);
    let mut after = Vec::new();
    for _ in 0..ROUNDS {
        std::thread::scope(|s| {
            let mut a = Rng::new(rng.next());
            let mut d = Rng::new(rng.next());
            let mut p = Rng::new(rng.next());
            s.spawn(move || api_round(api, &mut a));
            s.spawn(move || dns_round(dns, &mut d));
            s.spawn(move || proxy_round(pp, &mut p));
        });
        // The proxy still serves, and every hostile connection is gone:
        // nothing of the round is still being processed.
        assert_eq!(which_backend(proxy.listener("main")), "x");
        assert!(
            http_status(api, "/health").is_some_and(|s| s == 200),
            "API down after a round"
        );
        std::thread::sleep(Duration::from_millis(300));
        after.push(rss_kb(pid));
    }
    let report: Vec<String> = after
        .iter()
        .map(|kb| format!("{:.1}", *kb as f64 / 1024.0))
        .collect();
    eprintln!(
        "RSS MB: start {:.1}, after each round {}",
        at_start as f64 / 1024.0,
        report.join(", ")
    );
    let baseline = after[1];
    for (round, kb) in after.iter().enumerate().skip(2) {
        assert!(
            *kb <= baseline + SLACK_KB,
            "RSS grew after round 2: {} MB after round {} (start {:.1} MB, rounds: {})",
            *kb as f64 / 1024.0,
            round + 1,
            at_start as f64 / 1024.0,
            report.join(", ")
        );
    }
}

/// The status of a GET on a fresh connection.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE).ok()?;
    s.set_read_timeout(Some(PATIENCE)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Tracked clients are bounded: with `affinity.max_clients` bindings held,
/// further clients are served without one, and the proxy says so.
#[test]
fn affinity_tracks_at_most_max_clients_and_serves_the_rest() {
    let dir = TempDir::new("affinity-cap");
    let backend = TagBackend::start("x");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("x", "web", "sa", backend.port()));
    let text = config(
        &db.path,
        "[affinity]\nmax_clients = 4\ngc_interval_secs = 1\n\n[runtime]\nshards = 1\n",
    )
    .replace("[runtime]\nshards = 2\n", "");
    let proxy = Proxy::with_config(&dir, &text);
    let addr = proxy.addr();
    for i in 0..20 {
        let from = client_ip(i);
        let stream = connect_from(from, addr).expect("connect");
        assert_eq!(read_line(&stream).as_deref(), Some("x"), "client {from}");
    }
    let line = proxy
        .wait_for_log("affinity table full", PATIENCE)
        .unwrap_or_else(|| panic!("no warning; log:\n{}", proxy.log_text()));
    assert_eq!(field(&line, "clients").as_deref(), Some("16"), "{line}");
    assert_eq!(field(&line, "max_clients").as_deref(), Some("4"), "{line}");
}
