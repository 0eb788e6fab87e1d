//! PROXY protocol v1 (text) and v2 (binary), sans-IO.
//!
//! Spec: HAProxy's `proxy-protocol.txt`. Two uses:
//!
//! * A listener that accepts PROXY headers feeds [`parse`] everything read so
//!   far from the client. The header may arrive split over several reads
//!   ([`Parsed::Incomplete`]: read more) and may be followed by payload bytes,
//!   which start at `buf[consumed..]` and must be forwarded. Any error rejects
//!   the connection. `parse` never answers `Incomplete` once the buffer holds
//!   [`MAX_HEADER_LEN`] bytes, so a buffer of that size is enough; and once it
//!   has answered `Complete` or an error for some bytes, more bytes never
//!   change the answer.
//! * [`encode_v2`] (or [`encode_v1`]) builds the header sent to a backend so
//!   that it sees the client's address.
//!
//! Header fields are decoded by the `ppp` crate (borrowing, no allocation).
//! This module adds what a listener needs on top of it: rejecting a non-PROXY
//! connection on its first bytes, a cap on the v2 length, handing `ppp` a v1
//! line only once its CRLF is in (on a partial line `ppp` judges the last,
//! unfinished field, e.g. calls `... 54321 ` a bad port), a guarantee that
//! every buffer is decided by [`MAX_HEADER_LEN`] bytes, the spec's LOCAL and
//! `UNKNOWN` rules (addresses ignored whatever they hold), and one address type
//! for both versions. The encoders are written here because `ppp`'s builder
//! allocates a `Vec` per header; they are tested against it.

use std::io::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ppp::{v1, v2, PartialResult as _};

/// The v2 signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 signature.
const V1_SIGNATURE: &[u8] = b"PROXY";
/// Fixed part of a v2 header: signature, version/command, family/protocol,
/// length.
const V2_FIXED_LEN: usize = 16;
/// Longest v1 line the spec allows, CRLF included
/// (`PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n`).
pub const V1_MAX_LEN: usize = 107;
/// Most bytes of addresses and TLVs accepted after the fixed 16 bytes of a v2
/// header. The spec allows up to 65535, but headers are meant to fit in one
/// small TCP segment (536 bytes); the addresses take at most 216 bytes (UNIX)
/// and common TLVs (ALPN, authority, unique id, SSL, cloud ids) leave plenty of
/// room under 512.
pub const V2_MAX_PAYLOAD: usize = 512;
/// The most bytes a header can take before [`parse`] gives up: 16 + 512 for
/// v2, which also covers v1's 107.
pub const MAX_HEADER_LEN: usize = V2_FIXED_LEN + V2_MAX_PAYLOAD;
/// Size of the buffer [`encode_v2`] writes into: a TCP-over-IPv6 header.
pub const V2_MAX_ENCODED: usize = V2_FIXED_LEN + 36;
/// Size of the buffer [`encode_v1`] writes into: a `TCP6` line.
pub const V1_MAX_ENCODED: usize = 104;

/// The addresses a PROXY header carries. Both `None` when the header says to
/// use the connection's own addresses: v1 `UNKNOWN`, v2 `LOCAL`, or a v2
/// family/protocol other than TCP over IPv4/IPv6 (`AF_UNSPEC`, `AF_UNIX`,
/// UDP), which the spec lets a receiver treat as unspecified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

impl ProxyHeader {
    const UNKNOWN: ProxyHeader = ProxyHeader {
        source: None,
        destination: None,
    };

    fn tcp(source: SocketAddr, destination: SocketAddr) -> Self {
        ProxyHeader {
            source: Some(source),
            destination: Some(destination),
        }
    }
}

/// Outcome of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header: it took the first `consumed` bytes, and anything after
    /// them is payload.
    Complete {
        header: ProxyHeader,
        consumed: usize,
    },
    /// A valid start of a header: read more bytes and call again with all of
    /// them.
    Incomplete,
}

/// Why a connection's PROXY header was rejected.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyError {
    #[error("connection does not start with a PROXY protocol header")]
    NotProxyProtocol,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("PROXY protocol header too long (v1: over {V1_MAX_LEN} bytes, v2: over {MAX_HEADER_LEN} bytes)")]
    TooLong,
    #[error("unsupported PROXY protocol version (v2 signature with a version other than 2)")]
    UnsupportedVersion,
}

/// Parses a PROXY v1 or v2 header at the start of `buf`, everything received
/// so far on the connection.
///
/// Decides as early as it can: the first byte that matches neither signature
/// gives [`ProxyError::NotProxyProtocol`]; a v2 version other than 2 is
/// rejected on the 13th byte, a v2 length over [`V2_MAX_PAYLOAD`] on the 16th.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if starts_like(buf, &V2_SIGNATURE) {
        parse_v2(buf)
    } else if starts_like(buf, V1_SIGNATURE) {
        parse_v1(buf)
    } else {
        Err(ProxyError::NotProxyProtocol)
    }
}

/// True when `buf` and `signature` agree on their common length.
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    const VERSION_COMMAND: usize = 12;
    if buf.len() > VERSION_COMMAND && buf[VERSION_COMMAND] >> 4 != 2 {
        return Err(ProxyError::UnsupportedVersion);
    }
    if buf.len() < V2_FIXED_LEN {
        return Ok(Parsed::Incomplete);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_PAYLOAD {
        return Err(ProxyError::TooLong);
    }
    let total = V2_FIXED_LEN + len;
    match v2::Header::try_from(buf) {
        Ok(h) => Ok(Parsed::Complete {
            header: from_v2(&h),
            consumed: h.len(),
        }),
        Err(e) if e.is_incomplete() => Ok(Parsed::Incomplete),
        // LOCAL: "the receiver must accept this connection as valid and must
        // use the real connection endpoints and discard the protocol block
        // including the family which is ignored", so a length too short for
        // the advertised family is fine there.
        Err(v2::ParseError::InvalidAddresses(..)) if buf[VERSION_COMMAND] & 0x0F == 0 => {
            if buf.len() < total {
                Ok(Parsed::Incomplete)
            } else {
                Ok(Parsed::Complete {
                    header: ProxyHeader::UNKNOWN,
                    consumed: total,
                })
            }
        }
        Err(e) => Err(match e {
            v2::ParseError::Prefix => ProxyError::NotProxyProtocol,
            v2::ParseError::Version(_) => ProxyError::UnsupportedVersion,
            v2::ParseError::Command(_) => ProxyError::Malformed("unknown v2 command"),
            v2::ParseError::AddressFamily(_) => ProxyError::Malformed("unknown v2 address family"),
            v2::ParseError::Protocol(_) => ProxyError::Malformed("unknown v2 transport protocol"),
            v2::ParseError::InvalidAddresses(..) => {
                ProxyError::Malformed("v2 length shorter than its address block")
            }
            _ => ProxyError::Malformed("invalid v2 header"),
        }),
    }
}

fn from_v2(h: &v2::Header<'_>) -> ProxyHeader {
    if h.command != v2::Command::Proxy || h.protocol != v2::Protocol::Stream {
        return ProxyHeader::UNKNOWN;
    }
    match h.addresses {
        v2::Addresses::IPv4(a) => ProxyHeader::tcp(
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        ),
        v2::Addresses::IPv6(a) => ProxyHeader::tcp(
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        ),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => ProxyHeader::UNKNOWN,
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    // Reject what cannot become a valid line as soon as it shows.
    if !starts_like(buf, b"PROXY ") {
        return Err(ProxyError::Malformed("v1 line must start with \"PROXY \""));
    }
    let protocol = &buf[buf.len().min(6)..];
    if ![&b"TCP4 "[..], b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r"]
        .iter()
        .any(|p| starts_like(protocol, p))
    {
        return Err(ProxyError::Malformed(
            "v1 protocol must be TCP4, TCP6 or UNKNOWN",
        ));
    }
    // "The receiver must wait for the CRLF sequence before starting to decode
    // the addresses": `ppp` would decode fields of a partial line (and call
    // "... 54321 " a bad port), so it only ever sees whole lines.
    let end = match scan_v1_line(&buf[..buf.len().min(V1_MAX_LEN)])? {
        Some(end) => end,
        None if buf.len() >= V1_MAX_LEN => return Err(ProxyError::TooLong),
        None => return Ok(Parsed::Incomplete),
    };
    if protocol.starts_with(b"UNKNOWN") {
        // The receiver "must ignore anything presented before the CRLF".
        return Ok(Parsed::Complete {
            header: ProxyHeader::UNKNOWN,
            consumed: end,
        });
    }
    match v1::Header::try_from(&buf[..end]) {
        Ok(h) => {
            let header = match h.addresses {
                v1::Addresses::Unknown => ProxyHeader::UNKNOWN,
                v1::Addresses::Tcp4(a) => ProxyHeader::tcp(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                v1::Addresses::Tcp6(a) => ProxyHeader::tcp(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
            };
            // Ports are decimal digits; `u16::from_str` would also take "+80".
            if h.header.contains('+') {
                return Err(ProxyError::Malformed("invalid v1 port"));
            }
            Ok(Parsed::Complete {
                header,
                consumed: end,
            })
        }
        // The line is whole, so "partial" means fields are missing.
        Err(e) if e.is_incomplete() => Err(ProxyError::Malformed("v1 line is missing fields")),
        Err(v1::BinaryParseError::InvalidUtf8(_)) => {
            Err(ProxyError::Malformed("v1 line is not ASCII"))
        }
        Err(v1::BinaryParseError::Parse(e)) => Err(match e {
            v1::ParseError::HeaderTooLong => ProxyError::TooLong,
            v1::ParseError::InvalidSourceAddress(_)
            | v1::ParseError::InvalidDestinationAddress(_) => {
                ProxyError::Malformed("invalid v1 address")
            }
            v1::ParseError::InvalidSourcePort(_) | v1::ParseError::InvalidDestinationPort(_) => {
                ProxyError::Malformed("invalid v1 port")
            }
            _ => ProxyError::Malformed("invalid v1 line"),
        }),
    }
}

/// Finds the end of a v1 line (the offset just past its CRLF) in `line`, the
/// first [`V1_MAX_LEN`] bytes received. `Ok(None)`: no CRLF yet. Rejects, as
/// soon as they arrive, bytes a line cannot hold: a CR not followed by LF, an
/// LF alone (the spec forbids ending the line with either), anything that is
/// not printable ASCII.
fn scan_v1_line(line: &[u8]) -> Result<Option<usize>, ProxyError> {
    for (i, &b) in line.iter().enumerate() {
        match b {
            b'\r' => {
                return match line.get(i + 1) {
                    Some(b'\n') => Ok(Some(i + 2)),
                    Some(_) => Err(ProxyError::Malformed("v1 line must end with CRLF")),
                    None => Ok(None),
                }
            }
            b'\n' => return Err(ProxyError::Malformed("v1 line must end with CRLF")),
            b' '..=b'~' => {}
            _ => return Err(ProxyError::Malformed("v1 line is not ASCII")),
        }
    }
    Ok(None)
}

/// Both addresses as IPv6 when their families differ (IPv4 as v4-mapped).
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| -> SocketAddr {
        match a.ip() {
            IpAddr::V4(ip) => (ip.to_ipv6_mapped(), a.port()).into(),
            IpAddr::V6(_) => a,
        }
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

/// Writes a v2 PROXY header (command PROXY, TCP over IPv4 or IPv6, no TLVs)
/// into `out` and returns its length (28 or 52). When the families differ
/// both addresses are sent as IPv6, IPv4 as v4-mapped.
pub fn encode_v2(
    source: SocketAddr,
    destination: SocketAddr,
    out: &mut [u8; V2_MAX_ENCODED],
) -> usize {
    out[..12].copy_from_slice(&V2_SIGNATURE);
    out[12] = 0x21; // version 2, PROXY
    let mut at = V2_FIXED_LEN;
    let mut put = |bytes: &[u8]| {
        out[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    match same_family(source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            put(&s.ip().octets());
            put(&d.ip().octets());
        }
        (s, d) => {
            put(&v6_octets(s.ip()));
            put(&v6_octets(d.ip()));
        }
    }
    put(&source.port().to_be_bytes());
    put(&destination.port().to_be_bytes());
    out[13] = if at == V2_FIXED_LEN + 12 { 0x11 } else { 0x21 }; // TCP over v4 / v6
    let len = (at - V2_FIXED_LEN) as u16;
    out[14..16].copy_from_slice(&len.to_be_bytes());
    at
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(ip) => ip.octets(),
        IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
    }
}

/// Writes a v1 PROXY line (`TCP4` or `TCP6`, CRLF included) into `out` and
/// returns its length. When the families differ both addresses are sent as
/// IPv6, IPv4 as v4-mapped. IPv6 addresses are written as eight hex groups,
/// the form the spec describes.
pub fn encode_v1(
    source: SocketAddr,
    destination: SocketAddr,
    out: &mut [u8; V1_MAX_ENCODED],
) -> usize {
    let (s, d) = same_family(source, destination);
    let mut w = &mut out[..];
    // The longest line is exactly V1_MAX_ENCODED bytes, so writes cannot fail.
    let _ = match (s.ip(), d.ip()) {
        (IpAddr::V4(si), IpAddr::V4(di)) => write!(w, "PROXY TCP4 {si} {di}"),
        (si, di) => write!(w, "PROXY TCP6 {} {}", Groups(to_v6(si)), Groups(to_v6(di))),
    };
    let _ = write!(w, " {} {}\r\n", s.port(), d.port());
    V1_MAX_ENCODED - w.len()
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
    }
}

/// An IPv6 address as eight colon-separated hex groups, without `::` or a
/// dotted IPv4 tail.
struct Groups(Ipv6Addr);

impl std::fmt::Display for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, g) in self.0.segments().iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{g:x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf) {
            Ok(Parsed::Complete { header, consumed }) => (header, consumed),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn tcp(src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader::tcp(sa(src), sa(dst))
    }

    fn malformed(buf: &[u8]) -> ProxyError {
        match parse(buf) {
            Err(e) => e,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    /// A v2 header from its parts.
    fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    const V4_BODY: [u8; 12] = [192, 0, 2, 1, 198, 51, 100, 2, 0xd4, 0x31, 0x01, 0xbb];

    fn v6_body() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&[0x30, 0x39, 0x00, 0x50]);
        b
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 54321 443\r\n";
        assert_eq!(
            complete(line),
            (tcp("192.0.2.1:54321", "198.51.100.2:443"), line.len())
        );
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 12345 80\r\n";
        assert_eq!(
            complete(line),
            (tcp("[2001:db8::1]:12345", "[2001:db8::2]:80"), line.len())
        );
        let max = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(complete(max).1, 104);
        assert_eq!(complete(b"PROXY UNKNOWN\r\n"), (ProxyHeader::UNKNOWN, 15));
        // Anything after UNKNOWN is ignored, however many fields.
        for line in [
            &b"PROXY UNKNOWN 192.0.2.1 198.51.100.2 1 2\r\n"[..],
            b"PROXY UNKNOWN a b c d e f g\r\n",
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        ] {
            assert_eq!(complete(line), (ProxyHeader::UNKNOWN, line.len()));
        }
    }

    #[test]
    fn v1_errors() {
        let bad_address = [
            &b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n"[..],
            b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
            b"PROXY TCP6 2001:db8::g 2001:db8::2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n",
        ];
        for line in bad_address {
            assert_eq!(malformed(line), ProxyError::Malformed("invalid v1 address"));
        }
        let bad_port = [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 080\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 x\r\n",
        ];
        for line in bad_port {
            assert_eq!(malformed(line), ProxyError::Malformed("invalid v1 port"));
        }
        let bad_end = [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\r\n",
            b"PROXY UNKNOWN x\n",
        ];
        for line in bad_end {
            assert_eq!(
                malformed(line),
                ProxyError::Malformed("v1 line must end with CRLF")
            );
        }
        for line in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n"[..],
            b"PROXY TCP4\r\n",
        ] {
            assert!(
                matches!(malformed(line), ProxyError::Malformed(_)),
                "{line:?}"
            );
        }
        assert!(matches!(
            malformed(b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n"),
            ProxyError::Malformed(_)
        ));
        assert!(matches!(
            malformed(b"PROXY TCP5 x\r\n"),
            ProxyError::Malformed(_)
        ));
        assert!(matches!(
            malformed(b"PROXY tcp4 x\r\n"),
            ProxyError::Malformed(_)
        ));
        assert!(matches!(
            malformed(b"PROXYTCP4 x\r\n"),
            ProxyError::Malformed(_)
        ));
        assert!(matches!(
            malformed(b"PROXY \xff\r\n"),
            ProxyError::Malformed(_)
        ));
        // No CRLF within 107 bytes.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN, b'a');
        assert_eq!(parse(&long[..V1_MAX_LEN - 1]), Ok(Parsed::Incomplete));
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
    }

    #[test]
    fn v2_proxy_and_local() {
        let h = v2(0x21, 0x11, &V4_BODY);
        assert_eq!(
            complete(&h),
            (tcp("192.0.2.1:54321", "198.51.100.2:443"), 28)
        );
        let h = v2(0x21, 0x21, &v6_body());
        assert_eq!(
            complete(&h),
            (tcp("[2001:db8::1]:12345", "[2001:db8::2]:80"), 52)
        );
        // LOCAL: addresses ignored, whatever the family and length say.
        for h in [
            v2(0x20, 0x00, &[]),
            v2(0x20, 0x11, &V4_BODY),
            v2(0x20, 0x21, &v6_body()),
            v2(0x20, 0x11, &[]),
            v2(0x20, 0x00, &[1, 2, 3]),
        ] {
            assert_eq!(complete(&h), (ProxyHeader::UNKNOWN, h.len()));
        }
        // PROXY with families/protocols other than TCP over IP: unspecified.
        for h in [
            v2(0x21, 0x00, &[]),
            v2(0x21, 0x12, &V4_BODY),
            v2(0x21, 0x10, &V4_BODY),
            v2(0x21, 0x31, &[0; 216]),
        ] {
            assert_eq!(complete(&h), (ProxyHeader::UNKNOWN, h.len()));
        }
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let mut body = V4_BODY.to_vec();
        body.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // ALPN
        body.extend_from_slice(&[0x02, 0x00, 0x0b]); // authority
        body.extend_from_slice(b"example.com");
        body.extend_from_slice(&[0x04, 0x00, 0x00]); // NOOP
        let h = v2(0x21, 0x11, &body);
        assert_eq!(
            complete(&h),
            (tcp("192.0.2.1:54321", "198.51.100.2:443"), 16 + body.len())
        );
        // Built by ppp, IPv6 with a unique-id TLV.
        let built = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2")),
        )
        .write_tlv(v2::Type::UniqueId, &[7; 128][..])
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(
            complete(&built),
            (tcp("[2001:db8::1]:1", "[2001:db8::2]:2"), 16 + 36 + 3 + 128)
        );
    }

    #[test]
    fn v2_errors() {
        assert_eq!(
            malformed(&v2(0x11, 0x11, &V4_BODY)),
            ProxyError::UnsupportedVersion
        );
        assert_eq!(
            malformed(&v2(0x31, 0x11, &V4_BODY)),
            ProxyError::UnsupportedVersion
        );
        // Decided on the 13th byte.
        assert_eq!(
            malformed(&v2(0x11, 0x11, &V4_BODY)[..13]),
            ProxyError::UnsupportedVersion
        );
        assert_eq!(
            malformed(&v2(0x22, 0x11, &V4_BODY)),
            ProxyError::Malformed("unknown v2 command")
        );
        assert_eq!(
            malformed(&v2(0x21, 0x41, &V4_BODY)),
            ProxyError::Malformed("unknown v2 address family")
        );
        assert_eq!(
            malformed(&v2(0x21, 0x13, &V4_BODY)),
            ProxyError::Malformed("unknown v2 transport protocol")
        );
        assert_eq!(
            malformed(&v2(0x21, 0x11, &V4_BODY[..8])),
            ProxyError::Malformed("v2 length shorter than its address block")
        );
        assert_eq!(
            malformed(&v2(0x21, 0x21, &V4_BODY)),
            ProxyError::Malformed("v2 length shorter than its address block")
        );
        // Length over the cap: rejected on the 16th byte, before the body.
        let long = v2(0x21, 0x11, &[0; V2_MAX_PAYLOAD + 1]);
        assert_eq!(malformed(&long[..16]), ProxyError::TooLong);
        let max = v2(0x21, 0x11, &[0; V2_MAX_PAYLOAD]);
        assert_eq!(complete(&max).1, MAX_HEADER_LEN);
    }

    #[test]
    fn not_proxy_protocol_is_decided_on_the_first_differing_byte() {
        for buf in [
            &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
            b"G",
            b"\x16\x03\x01\x02\x00\x01", // TLS ClientHello
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"PROX ",
            b"proxy TCP4",
            b"\r\n\r\n\0\r\nQUIX",
            b"\r\n\r\n\x01",
            b"\r\nGET",
        ] {
            assert_eq!(parse(buf), Err(ProxyError::NotProxyProtocol), "{buf:?}");
        }
        assert_eq!(parse(b""), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"\r\n\r\n\0"), Ok(Parsed::Incomplete));
    }

    fn samples() -> Vec<Vec<u8>> {
        let mut tlv = V4_BODY.to_vec();
        tlv.extend_from_slice(&[0x05, 0x00, 0x04, 1, 2, 3, 4]);
        vec![
            b"PROXY TCP4 192.0.2.1 198.51.100.2 54321 443\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 12345 80\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY UNKNOWN a b c d e f\r\n".to_vec(),
            v2(0x21, 0x11, &V4_BODY),
            v2(0x21, 0x21, &v6_body()),
            v2(0x20, 0x00, &[]),
            v2(0x21, 0x11, &tlv),
        ]
    }

    #[test]
    fn split_at_every_offset_is_incomplete_then_complete() {
        for h in samples() {
            assert_eq!(complete(&h).1, h.len());
            for k in 0..h.len() {
                assert_eq!(parse(&h[..k]), Ok(Parsed::Incomplete), "{h:?} cut at {k}");
            }
        }
        // The same through a receive loop fed one byte at a time.
        let h = v2(0x21, 0x11, &V4_BODY);
        let mut buf = Vec::new();
        let mut parsed = Parsed::Incomplete;
        for &b in &h {
            assert_eq!(parsed, Parsed::Incomplete);
            buf.push(b);
            parsed = parse(&buf).unwrap();
        }
        assert_eq!(
            parsed,
            Parsed::Complete {
                header: tcp("192.0.2.1:54321", "198.51.100.2:443"),
                consumed: 28
            }
        );
    }

    #[test]
    fn trailing_payload_is_not_consumed() {
        for h in samples() {
            for payload in [&b"G"[..], b"GET / HTTP/1.1\r\n\r\n", b"\r\n", b"\x00\xff"] {
                let mut buf = h.clone();
                buf.extend_from_slice(payload);
                let (_, consumed) = complete(&buf);
                assert_eq!(consumed, h.len(), "{buf:?}");
                assert_eq!(&buf[consumed..], payload);
            }
        }
    }

    #[test]
    fn encode_v2_round_trips_and_matches_ppp() {
        let pairs = [
            ("192.0.2.1:54321", "198.51.100.2:443"),
            ("[2001:db8::1]:1", "[2001:db8::2]:65535"),
            ("192.0.2.1:0", "[2001:db8::2]:443"),
            ("[2001:db8::1]:1", "10.0.0.1:80"),
        ];
        for (s, d) in pairs {
            let (s, d) = (sa(s), sa(d));
            let mut out = [0u8; V2_MAX_ENCODED];
            let n = encode_v2(s, d, &mut out);
            let (expect_s, expect_d) = same_family(s, d);
            let (header, consumed) = complete(&out[..n]);
            assert_eq!(consumed, n);
            assert_eq!(header, ProxyHeader::tcp(expect_s, expect_d));
            let built = v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                (expect_s, expect_d),
            )
            .build()
            .unwrap();
            assert_eq!(&out[..n], &built[..], "{s} {d}");
        }
        let mut out = [0u8; V2_MAX_ENCODED];
        assert_eq!(encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10"), &mut out), 28);
        assert_eq!(
            encode_v2(sa("[::1]:5"), sa("[::2]:10"), &mut out),
            V2_MAX_ENCODED
        );
        // Mixed families: the IPv4 side is sent v4-mapped.
        encode_v2(sa("192.0.2.1:7"), sa("[2001:db8::2]:443"), &mut out);
        assert_eq!(complete(&out).0.source, Some(sa("[::ffff:192.0.2.1]:7")));
    }

    #[test]
    fn encode_v1_round_trips() {
        let cases = [
            (
                "192.0.2.1:54321",
                "198.51.100.2:443",
                &b"PROXY TCP4 192.0.2.1 198.51.100.2 54321 443\r\n"[..],
            ),
            (
                "[2001:db8::1]:1",
                "[::2]:2",
                b"PROXY TCP6 2001:db8:0:0:0:0:0:1 0:0:0:0:0:0:0:2 1 2\r\n",
            ),
            (
                "192.0.2.1:1",
                "[::2]:2",
                b"PROXY TCP6 0:0:0:0:0:ffff:c000:201 0:0:0:0:0:0:0:2 1 2\r\n",
            ),
        ];
        for (s, d, line) in cases {
            let mut out = [0u8; V1_MAX_ENCODED];
            let n = encode_v1(sa(s), sa(d), &mut out);
            assert_eq!(&out[..n], line);
            let (s, d) = same_family(sa(s), sa(d));
            assert_eq!(complete(&out[..n]), (ProxyHeader::tcp(s, d), n));
        }
        let max: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            .parse()
            .unwrap();
        let mut out = [0u8; V1_MAX_ENCODED];
        assert_eq!(encode_v1(max, max, &mut out), V1_MAX_ENCODED);
        assert_eq!(complete(&out).0, ProxyHeader::tcp(max, max));
    }

    /// Random bytes after plausible starts: `parse` never panics, decides by
    /// MAX_HEADER_LEN bytes, never consumes more than it was given, and never
    /// changes its answer once it has decided.
    #[test]
    fn every_buffer_is_decided_and_answers_are_final() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let starts: [&[u8]; 7] = [
            b"PROXY ",
            b"PROXY TCP4 1.2.3.4 ",
            b"PROXY TCP6 ::1 ",
            b"PROXY UNKNOWN",
            &V2_SIGNATURE,
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11",
            b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00",
        ];
        let alphabet = b"0123456789abcdef.: \r\nPROXYTCUNKW\x00\x01\x02\x11\x21\xff";
        for round in 0..3000 {
            let mut buf = starts[round % starts.len()].to_vec();
            while buf.len() < MAX_HEADER_LEN + 8 {
                let r = next();
                buf.push(if r % 4 == 0 {
                    (r >> 8) as u8
                } else {
                    alphabet[(r >> 8) as usize % alphabet.len()]
                });
            }
            let mut decided: Option<Result<Parsed, ProxyError>> = None;
            for k in 0..=buf.len() {
                let got = parse(&buf[..k]);
                if let Ok(Parsed::Complete { consumed, .. }) = got {
                    assert!(consumed <= k);
                }
                match &decided {
                    Some(first) => assert_eq!(&got, first, "{buf:?} at {k}"),
                    None if got != Ok(Parsed::Incomplete) => decided = Some(got),
                    None => assert!(k < MAX_HEADER_LEN, "undecided at {k}: {buf:?}"),
                }
            }
        }
    }
}
