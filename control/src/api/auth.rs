//! Bearer-token checks and the request guards that run before any handler:
//! token, browser origin, loopback host.

/// Compares two byte strings in time that depends on their lengths only,
/// never on where they differ.
pub fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    // Walk the expected token in full whatever was presented, so the time
    // says nothing about the prefix that matched.
    let mut diff = (expected.len() ^ presented.len()) as u64;
    for (i, &e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(!e);
        diff |= u64::from(e ^ p);
    }
    std::hint::black_box(diff) == 0
}

/// The token of an `Authorization: Bearer <token>` header value (scheme
/// case-insensitive, as RFC 6750 allows).
pub fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// True when a `Host` header names this machine by address or as
/// `localhost`: what a local client sends to a loopback-only API. A DNS name
/// that resolves to loopback (DNS rebinding, a browser attack on local
/// services) is refused.
pub fn is_local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Whether a request named this machine, for a tokenless API: by the
/// authority of an absolute-form target (`GET http://host/...`, which wins
/// over `Host`, RFC 9112 §3.2.2), else by its `Host` header (an unreadable
/// one names no local host). A request naming no host at all is local:
/// HTTP/1.0 health checkers (HAProxy's `option httpchk`) send none, and it
/// is no DNS-rebinding vector, since browsers always send `Host`.
pub fn names_local_host(authority_host: Option<&str>, host_header: Option<&[u8]>) -> bool {
    match (authority_host, host_header) {
        (Some(host), _) => is_local_host(host),
        (None, Some(header)) => std::str::from_utf8(header).is_ok_and(is_local_host),
        (None, None) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_plain_equality() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abcdef", b"abcde"));
        assert!(!constant_time_eq(b"abcdef", b"abcdefg"));
        assert!(!constant_time_eq(b"abcdef", b""));
        assert!(constant_time_eq(b"", b""));
        // A presented prefix padded with what the filler would be.
        assert!(!constant_time_eq(b"\x00", b""));
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b""), None);
    }

    #[test]
    fn only_addresses_and_localhost_are_local_hosts() {
        for ok in [
            "127.0.0.1:8081",
            "localhost:8081",
            "LOCALHOST",
            "[::1]:8081",
            "[::1]",
            "10.0.0.1",
        ] {
            assert!(is_local_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:8081",
            "evil.example",
            "localhost.evil.example:1",
            "",
        ] {
            assert!(!is_local_host(bad), "{bad}");
        }
    }

    #[test]
    fn no_host_is_local_and_an_absolute_target_wins_over_host() {
        assert!(names_local_host(None, None));
        assert!(names_local_host(None, Some(b"127.0.0.1:8081")));
        assert!(!names_local_host(None, Some(b"evil.example")));
        assert!(!names_local_host(None, Some(b"")));
        assert!(!names_local_host(None, Some(b"\xfflocalhost")));
        assert!(!names_local_host(Some("evil.example"), Some(b"localhost")));
        assert!(!names_local_host(Some("evil.example"), None));
        assert!(names_local_host(Some("[::1]"), Some(b"evil.example")));
    }
}
