//! The peers in `wireguard-go`'s answer to a UAPI `get=1`: `key=value`
//! lines (the device's, then each peer's from its `public_key=` line on),
//! then `errno=`.
//!
//! Ours rather than defguard_wireguard_rs's `Host::parse_uapi`: fuzzing
//! (tests/fuzz_mesh.rs) found that one panics on a handshake time past
//! what `SystemTime` holds (`last_handshake_time_sec=18446744073709551615`,
//! or times that add up past it: "overflow when adding duration to
//! instant"), in the blocking task that reads the peers. Here such a time
//! is no handshake. Otherwise it reads what defguard read: unknown keys
//! and values that do not parse are skipped (a value that does not parse
//! reads as none, or 0 for the byte counts).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use super::PeerStatus;
use crate::mesh::keys::PublicKey;

/// One peer's lines so far.
struct Section {
    status: PeerStatus,
    /// Handshake seconds and nanoseconds since the epoch, summed as
    /// `wireguard-go` would never send them twice; `None` once past u64.
    sec: Option<u64>,
    nsec: Option<u64>,
}

impl Section {
    fn new(public_key: PublicKey) -> Section {
        Section {
            status: PeerStatus {
                public_key,
                endpoint: None,
                allowed_ips: Vec::new(),
                keepalive: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            },
            sec: Some(0),
            nsec: Some(0),
        }
    }

    fn line(&mut self, key: &str, value: &str) {
        let s = &mut self.status;
        match key {
            "endpoint" => s.endpoint = value.parse::<SocketAddr>().ok(),
            "allowed_ip" => s.allowed_ips.extend(allowed_ip(value)),
            "persistent_keepalive_interval" => {
                s.keepalive = value.parse::<u16>().ok().filter(|k| *k > 0)
            }
            "rx_bytes" => s.rx_bytes = value.parse().unwrap_or_default(),
            "tx_bytes" => s.tx_bytes = value.parse().unwrap_or_default(),
            "last_handshake_time_sec" => {
                let add = value.parse::<u64>().unwrap_or_default();
                self.sec = self.sec.and_then(|t| t.checked_add(add));
            }
            "last_handshake_time_nsec" => {
                let add = value.parse::<u64>().unwrap_or_default();
                self.nsec = self.nsec.and_then(|t| t.checked_add(add));
            }
            _ => {}
        }
    }

    /// The peer, its handshake as the time since (none for 0, a time
    /// `SystemTime` cannot hold, or one in the future).
    fn end(mut self) -> PeerStatus {
        let at = self.sec.zip(self.nsec).and_then(|(sec, nsec)| {
            UNIX_EPOCH
                .checked_add(Duration::from_secs(sec))?
                .checked_add(Duration::from_nanos(nsec))
        });
        self.status.last_handshake = at
            .filter(|t| *t > UNIX_EPOCH)
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        self.status
    }
}

/// `a.b.c.d/n` or `x::y/n`; an address alone is a host route.
fn allowed_ip(value: &str) -> Option<IpNet> {
    match value.split_once('/') {
        Some((addr, len)) => IpNet::new(addr.parse().ok()?, len.parse().ok()?).ok(),
        None => Some(IpNet::from(value.parse::<IpAddr>().ok()?)),
    }
}

/// A key as UAPI writes it: 64 hex digits.
fn hex_key(value: &str) -> Option<PublicKey> {
    let digits = value.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(digits.chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(PublicKey(key))
}

/// What went wrong talking to `wireguard-go` on its UAPI socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UapiError {
    #[error("UAPI socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("wireguard-go did not answer on its UAPI socket within {0:?} (stopped or hung?)")]
    Silent(Duration),
    #[error("wireguard-go refused the request (errno={0})")]
    Refused(String),
    #[error("wireguard-go closed its UAPI socket before answering")]
    Closed,
    #[error("wireguard-go's answer passed {0} bytes without its errno line")]
    TooLong(usize),
}

/// The peers of a `get=1` answer; `Refused` on a non-zero `errno`. A key
/// that comes twice is one peer, as the second section says it.
pub fn peers(answer: &str) -> Result<Vec<PeerStatus>, UapiError> {
    let mut done: Vec<PeerStatus> = Vec::new();
    let mut current: Option<Section> = None;
    for line in answer.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "public_key" => {
                done.extend(current.take().map(Section::end));
                current = hex_key(value).map(Section::new);
            }
            "errno" if value == "0" => break,
            "errno" => return Err(UapiError::Refused(value.to_string())),
            _ => {
                if let Some(section) = current.as_mut() {
                    section.line(key, value);
                }
            }
        }
    }
    done.extend(current.map(Section::end));
    // The last section of a key wins.
    let mut peers: Vec<PeerStatus> = Vec::with_capacity(done.len());
    for p in done.into_iter().rev() {
        if !peers.iter().any(|q| q.public_key == p.public_key) {
            peers.push(p);
        }
    }
    peers.reverse();
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing (tests/fuzz_mesh.rs): a handshake time past what
    /// `SystemTime` holds, or several that add up past it, panicked
    /// ("overflow when adding duration to instant") in defguard's parser,
    /// in the blocking task reading the peers. A time that is not one is
    /// no handshake; the peer and its other values are read.
    #[test]
    fn a_handshake_time_out_of_range_is_no_handshake() {
        let key = "ab".repeat(32);
        for times in [
            "last_handshake_time_sec=18446744073709551615\n".to_string(),
            "last_handshake_time_sec=9223372036854775807\n".repeat(2),
            "last_handshake_time_nsec=18446744073709551615\n".repeat(600),
        ] {
            let answer = format!("public_key={key}\nrx_bytes=5\n{times}errno=0\n\n");
            let peers = peers(&answer).unwrap();
            assert_eq!(peers.len(), 1, "{times}");
            assert_eq!(peers[0].last_handshake, None, "{times}");
            assert_eq!(peers[0].rx_bytes, 5, "{times}");
        }
    }

    /// What `wireguard-go` 0.0.2023 answers (a device with one peer).
    #[test]
    fn an_answer_of_wireguard_go_reads_as_its_peer() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let key = format!("{}ff", "01".repeat(31));
        let answer = format!(
            "private_key={}\nlisten_port=51820\npublic_key={key}\n\
             endpoint=[fd00::2]:51820\nlast_handshake_time_sec={}\n\
             last_handshake_time_nsec=5\ntx_bytes=10\nrx_bytes=20\n\
             persistent_keepalive_interval=25\nprotocol_version=1\n\
             allowed_ip=fdaa:0:1:2::/64\nallowed_ip=10.1.2.3\nerrno=0\n\n",
            "02".repeat(32),
            now - 30
        );
        let peers = peers(&answer).unwrap();
        assert_eq!(peers.len(), 1);
        let p = &peers[0];
        assert_eq!(p.public_key.0[0], 1);
        assert_eq!(p.public_key.0[31], 0xff);
        assert_eq!(p.endpoint, Some("[fd00::2]:51820".parse().unwrap()));
        assert_eq!(
            p.allowed_ips,
            [
                "fdaa:0:1:2::/64".parse::<IpNet>().unwrap(),
                "10.1.2.3/32".parse().unwrap()
            ]
        );
        assert_eq!(p.keepalive, Some(25));
        assert_eq!((p.rx_bytes, p.tx_bytes), (20, 10));
        let ago = p.last_handshake.unwrap();
        assert!(
            ago >= Duration::from_secs(29) && ago < Duration::from_secs(90),
            "{ago:?}"
        );
    }

    #[test]
    fn a_refusal_is_an_error() {
        let refused = peers("errno=-22\n\n").unwrap_err();
        assert!(
            matches!(&refused, UapiError::Refused(e) if e == "-22"),
            "{refused:?}"
        );
    }
}
