//! Fuzzing the PROXY protocol parser (v1 and v2), the first thing that reads
//! a client's bytes on a PROXY-protocol listener.
//!
//! `bolero` property tests: under `cargo test` each target runs random
//! inputs for `EDGEPROXY_FUZZ_SECS` seconds (default 10) on stable Rust;
//! the same targets run coverage-guided with `cargo bolero test --engine
//! libfuzzer` (nightly) for longer hunts. Inputs are raw bytes, and headers
//! built from random addresses then damaged (bytes overwritten, cut short,
//! trailing bytes), which reach much deeper than raw bytes alone.
//!
//! The properties are the parser's contract (see `proxy_protocol`'s docs):
//! it never panics; it decides every buffer by `MAX_HEADER_LEN` bytes; once
//! it has decided (a header or an error), more bytes never change the
//! answer; a header consumes at most what it was given; and what the
//! encoders write parses back to the same addresses.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bolero::{check, TypeGenerator};
use engine::proxy_protocol::{
    encode_v1, encode_v2, parse, Parsed, ProxyHeader, MAX_HEADER_LEN, V1_MAX_ENCODED,
    V2_MAX_ENCODED, V2_SIGNATURE,
};

/// Seconds each target runs under `cargo test` (`EDGEPROXY_FUZZ_SECS`).
#[path = "../../tests/common/fuzz_budget.rs"]
mod fuzz_budget;

fn budget() -> Duration {
    fuzz_budget::budget(10)
}

/// The parser's contract on one buffer, and on every prefix of it.
fn contract(bytes: &[u8]) {
    let whole = parse(bytes);
    if bytes.len() >= MAX_HEADER_LEN {
        assert_ne!(
            whole,
            Ok(Parsed::Incomplete),
            "undecided after {} bytes",
            bytes.len()
        );
    }
    if let Ok(Parsed::Complete { consumed, .. }) = whole {
        assert!(
            consumed > 0 && consumed <= bytes.len(),
            "consumed {consumed} of {}",
            bytes.len()
        );
    }
    // Fed as it would arrive: the first decision is the last.
    let mut decided = None;
    for n in 0..=bytes.len() {
        let now = parse(&bytes[..n]);
        match decided {
            None if now != Ok(Parsed::Incomplete) => decided = Some((n, now)),
            None => {}
            Some((at, first)) => {
                assert_eq!(now, first, "decided at {at} bytes, changed its mind at {n}")
            }
        }
    }
}

#[test]
fn any_bytes_keep_the_parsers_contract() {
    check!()
        .with_test_time(budget())
        .with_max_len(2 * MAX_HEADER_LEN)
        .for_each(|bytes: &[u8]| contract(bytes));
}

/// How a damaged header starts.
#[derive(Debug, TypeGenerator)]
enum Start {
    V1(SocketAddr, SocketAddr),
    V2(SocketAddr, SocketAddr),
    V1Text(Vec<u8>),
    V2Raw {
        version_command: u8,
        family: u8,
        len: u16,
        rest: Vec<u8>,
    },
}

#[derive(Debug, TypeGenerator)]
struct Damaged {
    start: Start,
    /// (position, byte): overwrite, position taken modulo the length.
    edits: Vec<(u16, u8)>,
    cut: Option<u16>,
    tail: Vec<u8>,
}

impl Damaged {
    fn bytes(&self) -> Vec<u8> {
        let mut out = match &self.start {
            Start::V1(s, d) => {
                let mut buf = [0u8; V1_MAX_ENCODED];
                let n = encode_v1(*s, *d, &mut buf);
                buf[..n].to_vec()
            }
            Start::V2(s, d) => {
                let mut buf = [0u8; V2_MAX_ENCODED];
                let n = encode_v2(*s, *d, &mut buf);
                buf[..n].to_vec()
            }
            Start::V1Text(text) => {
                let mut line = b"PROXY ".to_vec();
                line.extend_from_slice(text);
                line
            }
            Start::V2Raw {
                version_command,
                family,
                len,
                rest,
            } => {
                let mut h = V2_SIGNATURE.to_vec();
                h.extend_from_slice(&[*version_command, *family]);
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(rest);
                h
            }
        };
        if !out.is_empty() {
            for (at, byte) in &self.edits {
                let i = *at as usize % out.len();
                out[i] = *byte;
            }
        }
        if let Some(cut) = self.cut {
            out.truncate(cut as usize);
        }
        out.extend_from_slice(&self.tail);
        out
    }
}

#[test]
fn damaged_headers_keep_the_parsers_contract() {
    check!()
        .with_test_time(budget())
        .with_type::<Damaged>()
        .for_each(|case| contract(&case.bytes()));
}

/// What a receiver sees for (source, destination) the encoders were given:
/// both as sent, or both as IPv6 (IPv4 v4-mapped) when the families differ.
fn as_sent(s: SocketAddr, d: SocketAddr) -> ProxyHeader {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    let (s, d) = match s.is_ipv4() == d.is_ipv4() {
        true => (s, d),
        false => (v6(s), v6(d)),
    };
    ProxyHeader {
        source: Some(s),
        destination: Some(d),
    }
}

#[test]
fn encoded_headers_parse_back_with_their_payload() {
    check!()
        .with_test_time(budget())
        .with_type::<(SocketAddr, SocketAddr, bool, Vec<u8>)>()
        .for_each(|(s, d, v2, payload)| {
            let mut buf = vec![0u8; V2_MAX_ENCODED.max(V1_MAX_ENCODED)];
            let n = match v2 {
                true => encode_v2(*s, *d, (&mut buf[..V2_MAX_ENCODED]).try_into().unwrap()),
                false => encode_v1(*s, *d, (&mut buf[..V1_MAX_ENCODED]).try_into().unwrap()),
            };
            buf.truncate(n);
            buf.extend_from_slice(payload);
            assert_eq!(
                parse(&buf),
                Ok(Parsed::Complete {
                    header: as_sent(*s, *d),
                    consumed: n
                }),
                "{s} -> {d} (v2: {v2})"
            );
        });
}
