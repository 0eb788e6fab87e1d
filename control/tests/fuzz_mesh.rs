//! Fuzzing what the mesh reads from other software: `wireguard-go`'s
//! answer to a UAPI `get=1` (`key=value` lines, `errno=` last), and the
//! ICMPv6 packets the 6PN prober's socket receives.
//!
//! `bolero` property tests: under `cargo test` each target runs random
//! inputs for `EDGEPROXY_FUZZ_SECS` seconds (default 5) on stable Rust;
//! `cargo bolero test --engine libfuzzer` runs them coverage-guided.
//!
//! Properties: reading never panics (the peers are read on the blocking
//! pool, where a panic is a failed read and a backtrace on stderr); what
//! `wireguard-go` writes for a set of peers reads back as those peers,
//! whatever other lines come between; a non-zero `errno` is an error; a
//! packet is an answer only if it is an echo reply carrying the socket's
//! identifier and token, and then its sequence number is the request's.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use bolero::{check, TypeGenerator};
use control::mesh::device::uapi::peers as peers_from_answer;
use control::mesh::pinger::{echo_reply_seq, echo_request};
use ipnet::IpNet;

/// Seconds each target runs under `cargo test` (`EDGEPROXY_FUZZ_SECS`;
/// 5 by default: these parsers are small and fast, 5 s is ~10⁴-10⁶
/// inputs).
#[path = "../../tests/common/fuzz_budget.rs"]
mod fuzz_budget;

fn budget() -> Duration {
    fuzz_budget::budget(5)
}

// ---------------------------------------------------------------------------
// UAPI `get=1` answers
// ---------------------------------------------------------------------------

#[test]
fn any_text_as_a_uapi_answer() {
    check!()
        .with_test_time(budget())
        .with_max_len(4096)
        .for_each(|bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            let _ = peers_from_answer(&text);
            // Behind a peer, where the peer's lines are read.
            let text = format!("public_key={}\n{text}", "ab".repeat(32));
            let _ = peers_from_answer(&text);
        });
}

/// A peer's section of known keys with any values (and other lines).
#[test]
fn uapi_lines_with_any_values() {
    check!()
        .with_test_time(budget())
        .with_type::<Vec<Line>>()
        .for_each(|lines| {
            let mut text = format!("public_key={}\n", "ab".repeat(32));
            for l in lines {
                text.push_str(&l.text());
                text.push('\n');
            }
            text.push_str("errno=0\n\n");
            let _ = peers_from_answer(&text);
        });
}

/// A line of a peer's section: a known key with any value, most of them.
#[derive(Debug, Clone, TypeGenerator)]
enum Line {
    Known { key: u8, value: Value },
    Any(String),
}

#[derive(Debug, Clone, TypeGenerator)]
enum Value {
    Number(u64),
    Small(u16),
    Text(String),
    Addr(u8),
}

const KEYS: &[&str] = &[
    "last_handshake_time_sec",
    "last_handshake_time_nsec",
    "rx_bytes",
    "tx_bytes",
    "persistent_keepalive_interval",
    "endpoint",
    "allowed_ip",
    "protocol_version",
    "preshared_key",
    "listen_port",
    "fwmark",
    "public_key",
    "errno",
];

const ADDRS: &[&str] = &[
    "[fd00::1]:51820",
    "10.0.0.1:51820",
    "fdaa:0:1:2::/64",
    "10.1.0.0/16",
    "::/0",
    "fdaa::1",
    "[fe80::1%eth0]:51820",
    "1.2.3.4:0",
    "fdaa::/129",
];

impl Line {
    fn text(&self) -> String {
        match self {
            Line::Known { key, value } => {
                let key = KEYS[usize::from(*key) % KEYS.len()];
                let value = match value {
                    Value::Number(n) => n.to_string(),
                    Value::Small(n) => n.to_string(),
                    Value::Text(t) => t.replace('\n', ""),
                    Value::Addr(i) => ADDRS[usize::from(*i) % ADDRS.len()].to_string(),
                };
                format!("{key}={value}")
            }
            Line::Any(t) => t.replace('\n', ""),
        }
    }
}

/// A peer as `wireguard-go` has it.
#[derive(Debug, Clone, TypeGenerator)]
struct Peer {
    key: [u8; 32],
    endpoint: Option<(bool, [u8; 16], u16)>,
    allowed: Vec<(bool, [u8; 16], u8)>,
    keepalive: u16,
    /// Seconds ago; `None`: never.
    handshake_ago: Option<u32>,
    nsec: u32,
    rx: u64,
    tx: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Peer {
    fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.map(|(v6, a, port)| {
            if v6 {
                SocketAddr::from((Ipv6Addr::from(a), port))
            } else {
                SocketAddr::from(([a[0], a[1], a[2], a[3]], port))
            }
        })
    }

    /// Up to ten years ago.
    fn ago(&self) -> Option<u32> {
        self.handshake_ago.map(|a| a % (10 * 365 * 86_400))
    }

    fn allowed(&self) -> Vec<IpNet> {
        self.allowed
            .iter()
            .take(8)
            .map(|(v6, a, len)| {
                if *v6 {
                    IpNet::new(Ipv6Addr::from(*a).into(), len % 129).unwrap()
                } else {
                    IpNet::new([a[0], a[1], a[2], a[3]].into(), len % 33).unwrap()
                }
                .trunc()
            })
            .collect()
    }

    /// The lines `wireguard-go` writes (device/uapi.go), `noise` lines
    /// between them (lines of keys it may add one day).
    fn lines(
        &self,
        now: std::time::SystemTime,
        noise: &mut impl Iterator<Item = String>,
    ) -> Vec<String> {
        let mut lines = vec![format!("public_key={}", hex(&self.key))];
        if let Some(e) = self.endpoint() {
            lines.push(format!("endpoint={e}"));
        }
        let (sec, nsec) = match &self.ago() {
            Some(ago) => {
                let t = now - Duration::from_secs(u64::from(*ago) + 1);
                let d = t.duration_since(std::time::UNIX_EPOCH).unwrap();
                (d.as_secs(), self.nsec % 1_000_000_000)
            }
            None => (0, 0),
        };
        lines.push(format!("last_handshake_time_sec={sec}"));
        lines.push(format!("last_handshake_time_nsec={nsec}"));
        lines.push(format!("tx_bytes={}", self.tx));
        lines.push(format!("rx_bytes={}", self.rx));
        lines.push(format!("persistent_keepalive_interval={}", self.keepalive));
        lines.push("protocol_version=1".into());
        for a in self.allowed() {
            lines.push(format!("allowed_ip={a}"));
        }
        let mut out = Vec::new();
        for l in lines {
            out.push(l);
            if let Some(n) = noise.next() {
                out.push(n);
            }
        }
        out
    }
}

/// Lines that are no key `wireguard-go` writes inside a peer's section.
fn harmless(line: &str) -> bool {
    let key = line.split_once('=').map_or(line, |(k, _)| k);
    !KEYS.contains(&key) || matches!(key, "protocol_version" | "preshared_key")
}

#[test]
fn what_wireguard_go_writes_reads_back() {
    check!()
        .with_test_time(budget())
        .with_type::<(Vec<Peer>, Vec<Line>, u16)>()
        .for_each(|(peers, noise, port)| {
            let now = std::time::SystemTime::now();
            let mut noise = noise
                .iter()
                .map(Line::text)
                .filter(|l| harmless(l))
                .collect::<Vec<_>>()
                .into_iter();
            let mut text = format!("private_key={}\nlisten_port={port}\n", hex(&[7; 32]));
            // Distinct keys: a key seen twice is one peer.
            let mut seen = std::collections::BTreeSet::new();
            let peers: Vec<&Peer> = peers
                .iter()
                .take(8)
                .filter(|p| seen.insert(p.key))
                .collect();
            for p in &peers {
                for l in p.lines(now, &mut noise) {
                    text.push_str(&l);
                    text.push('\n');
                }
            }
            text.push_str("errno=0\n\n");
            let mut got = peers_from_answer(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
            got.sort_by_key(|p| p.public_key);
            let mut want = peers.clone();
            want.sort_by_key(|p| p.key);
            assert_eq!(got.len(), want.len(), "{text}");
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g.public_key.0, w.key, "{text}");
                assert_eq!(g.endpoint, w.endpoint(), "{text}");
                assert_eq!(g.allowed_ips, w.allowed(), "{text}");
                assert_eq!(g.keepalive, Some(w.keepalive).filter(|k| *k > 0));
                assert_eq!((g.rx_bytes, g.tx_bytes), (w.rx, w.tx));
                match (w.ago(), g.last_handshake) {
                    (None, None) => {}
                    (Some(ago), Some(d)) => {
                        let ago = Duration::from_secs(u64::from(ago));
                        // Read a moment after `now`; sub-second nsec.
                        assert!(
                            d >= ago && d <= ago + Duration::from_secs(60),
                            "{d:?} for {ago:?}"
                        );
                    }
                    other => panic!("handshake {other:?}\n{text}"),
                }
            }
            // A refusal is an error, whatever came before it.
            let refused = text.replace("errno=0", "errno=22");
            assert!(peers_from_answer(&refused).is_err());
        });
}

// ---------------------------------------------------------------------------
// ICMPv6 echo replies
// ---------------------------------------------------------------------------

#[test]
fn any_packet_as_an_echo_reply() {
    check!()
        .with_test_time(budget())
        .with_type::<(Vec<u8>, u16, [u8; 8])>()
        .for_each(|(packet, ident, token)| {
            if let Some(seq) = echo_reply_seq(packet, *ident, *token) {
                assert!(packet.len() >= 16);
                assert_eq!((packet[0], packet[1]), (129, 0), "not an echo reply");
                assert_eq!(packet[4..6], ident.to_be_bytes());
                assert_eq!(packet[8..16], token[..]);
                assert_eq!(seq, u16::from_be_bytes([packet[6], packet[7]]));
            }
        });
}

#[test]
fn an_answer_to_a_request_gives_its_sequence() {
    check!()
        .with_test_time(budget())
        .with_type::<(u16, u16, [u8; 8], u16, Vec<u8>, Option<(u8, u8)>)>()
        .for_each(|(ident, seq, token, checksum, extra, damage)| {
            // What a peer answers: type 129, its checksum, the request's
            // identifier, sequence and payload (padded or not).
            let mut reply = echo_request(*ident, *seq, *token).to_vec();
            reply[0] = 129;
            reply[2..4].copy_from_slice(&checksum.to_be_bytes());
            reply.extend_from_slice(extra);
            let got = echo_reply_seq(&reply, *ident, *token);
            assert_eq!(got, Some(*seq));
            if let Some((at, to)) = damage {
                let at = usize::from(*at) % 16;
                let changed = reply[at] != *to;
                reply[at] = *to;
                // The checksum is the kernel's business; anything else
                // that changes makes it no answer of ours.
                if changed && !(2..4).contains(&at) {
                    let again = echo_reply_seq(&reply, *ident, *token);
                    let seq_only = (6..8).contains(&at);
                    assert!(
                        again.is_none() || seq_only,
                        "byte {at} changed and still an answer"
                    );
                }
            }
        });
}
