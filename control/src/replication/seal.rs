//! Gossip datagrams on the wire: a clear header that says which cluster and
//! schema the sender belongs to, then the payload sealed with
//! ChaCha20-Poly1305 under the key derived from the cluster secret.
//!
//! ```text
//! magic "EPG" | mode (1 = sealed, 0 = insecure) | schema u32 | cluster len u8 | cluster
//! | nonce: sender session u64, counter u32
//! | sealed: kind u8, sent-at Unix ms u64, payload … | tag (16 bytes, sealed mode only)
//! ```
//!
//! The header is authenticated (it is the AEAD's associated data) but not
//! secret: a receiver reads it first, so a peer of another cluster or schema
//! is refused with a log line that says so instead of a bare "bad tag".
//!
//! Replay protection: each process seals under a random 64-bit session id
//! with a counter, and a receiver keeps, per session, the highest counter
//! and a 64-entry window below it (as IPsec and WireGuard do). Sessions are
//! created only for datagrams that authenticated, and a bounded number are
//! kept; a datagram sent more than [`MAX_AGE_MS`] ago (or that far in the
//! future) is refused, so a replay cannot outlive the window even after the
//! receiver forgot a session or restarted. That needs clocks within
//! [`MAX_AGE_MS`] of each other (NTP).
//!
//! Sans-IO: bytes in, bytes out, time passed in.

use std::collections::HashMap;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

const MAGIC: &[u8; 3] = b"EPG";
const TAG_LEN: usize = 16;
/// Bytes before the payload that sealing adds, at most (cluster name ≤ 64).
pub const OVERHEAD: usize = 3 + 1 + 4 + 1 + 64 + 12 + 1 + 8 + TAG_LEN;
/// A datagram sent longer ago than this (by the sender's clock) is refused.
pub const MAX_AGE_MS: u64 = 120_000;
/// Replay-window sessions remembered.
const MAX_SESSIONS: usize = 4096;

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A SWIM packet for foca.
    Swim = 0,
    /// "I refuse you": the payload is the reason, UTF-8.
    Refusal = 1,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    #[error("not an edgeproxy gossip datagram")]
    Garbage,
    #[error("peer belongs to cluster {theirs:?}, this node to {ours:?}")]
    Cluster { theirs: String, ours: String },
    #[error("peer has replication schema version {theirs}, this node {ours}")]
    Schema { theirs: u32, ours: u32 },
    #[error("peer runs without a cluster secret (insecure), this node with one")]
    PeerInsecure,
    #[error("peer uses a cluster secret, this node runs without one (insecure)")]
    PeerSecure,
    #[error("authentication failed: the peer does not hold this cluster's secret")]
    BadTag,
    #[error("replayed datagram")]
    Replay,
    /// This node's clock minus the datagram's stamp, ms: positive, the
    /// sender's clock is behind (or the datagram took that long); negative,
    /// it is ahead. QA read "sent -599940 ms away" as nonsense.
    #[error(
        "datagram stamped {} ms {} this node's clock (clocks out of sync? check NTP on both POPs)",
        .0.unsigned_abs(),
        if *.0 >= 0 { "behind" } else { "ahead of" }
    )]
    Stale(i64),
}

impl Refused {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::Garbage => "garbage",
            Refused::Cluster { .. } => "cluster",
            Refused::Schema { .. } => "schema",
            Refused::PeerInsecure | Refused::PeerSecure => "secret_mode",
            Refused::BadTag => "secret",
            Refused::Replay => "replay",
            Refused::Stale(_) => "clock",
        }
    }
}

/// An opened datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    highest: u32,
    /// Bit i set: counter `highest - i` seen.
    seen: u64,
    /// Receiver's wall time when this session last authenticated.
    last_ms: u64,
}

impl Window {
    /// Marks `counter` seen; false if it was already (or is too old).
    fn accept(&mut self, counter: u32) -> bool {
        if counter > self.highest {
            let shift = counter - self.highest;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = counter;
            return true;
        }
        let back = self.highest - counter;
        if back >= 64 {
            return false;
        }
        let bit = 1u64 << back;
        if self.seen & bit != 0 {
            return false;
        }
        self.seen |= bit;
        true
    }
}

/// Seals outgoing and opens incoming datagrams for one node.
pub struct Sealer {
    cluster: String,
    schema: u32,
    /// `None`: insecure mode (no encryption, no authentication).
    key: Option<LessSafeKey>,
    /// A second key peers' datagrams may be sealed under (a secret being
    /// rotated, `replication.accept_secret`); this node never seals with it.
    accepted: Option<LessSafeKey>,
    /// Datagrams that opened under `accepted`.
    opened_under_accepted: u64,
    session: u64,
    counter: u32,
    windows: HashMap<u64, Window>,
}

impl Sealer {
    /// `key`: from `ClusterSecret::gossip_key`, or `None` for
    /// `insecure = true`. `session`: random, new at every start.
    pub fn new(cluster: &str, schema: u32, key: Option<[u8; 32]>, session: u64) -> Sealer {
        let mut cluster = cluster.to_string();
        cluster.truncate(64);
        Sealer {
            cluster,
            schema,
            key: key.map(aead_key),
            accepted: None,
            opened_under_accepted: 0,
            session,
            counter: 0,
            windows: HashMap::new(),
        }
    }

    /// Also opens datagrams sealed under `key` (a secure sealer only: an
    /// insecure one authenticates nothing).
    pub fn accepting(mut self, key: Option<[u8; 32]>) -> Sealer {
        if self.key.is_some() {
            self.accepted = key.map(aead_key);
        }
        self
    }

    /// Datagrams opened under the accepted key so far (authenticated; a
    /// replay refused after it still counts): peers sealing with the other
    /// secret. Flat on every POP once none does.
    pub fn opened_under_accepted(&self) -> u64 {
        self.opened_under_accepted
    }

    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(9 + self.cluster.len());
        h.extend_from_slice(MAGIC);
        h.push(self.key.is_some() as u8);
        h.extend_from_slice(&self.schema.to_be_bytes());
        h.push(self.cluster.len() as u8);
        h.extend_from_slice(self.cluster.as_bytes());
        h
    }

    /// Seals `payload` for sending at wall time `now_ms`.
    pub fn seal(&mut self, kind: Kind, payload: &[u8], now_ms: u64) -> Vec<u8> {
        self.counter = self.counter.wrapping_add(1);
        if self.counter == 0 {
            // 4 billion datagrams: start a new session rather than reuse a nonce.
            self.session = self.session.wrapping_add(0x9E37_79B9_7F4A_7C15);
            self.counter = 1;
        }
        let mut out = self.header();
        let aad_len = out.len();
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.session.to_be_bytes());
        nonce[8..].copy_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&nonce);
        let body_at = out.len();
        out.push(kind as u8);
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(payload);
        if let Some(key) = &self.key {
            let (head, body) = out.split_at_mut(body_at);
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&head[..aad_len]),
                    body,
                )
                .expect("ChaCha20-Poly1305 seals any length below 256 GiB");
            out.extend_from_slice(tag.as_ref());
        }
        out
    }

    /// Opens a datagram received at wall time `now_ms`.
    pub fn open(&mut self, datagram: &[u8], now_ms: u64) -> Result<Opened, Refused> {
        let (mode, schema, cluster, rest, aad_len) = parse_header(datagram)?;
        if cluster != self.cluster.as_bytes() {
            return Err(Refused::Cluster {
                theirs: String::from_utf8_lossy(cluster).into_owned(),
                ours: self.cluster.clone(),
            });
        }
        if schema != self.schema {
            return Err(Refused::Schema {
                theirs: schema,
                ours: self.schema,
            });
        }
        match (mode, &self.key) {
            (0, Some(_)) => return Err(Refused::PeerInsecure),
            (1, None) => return Err(Refused::PeerSecure),
            (0 | 1, _) => {}
            _ => return Err(Refused::Garbage),
        }
        if rest.len() < 12 + 9 {
            return Err(Refused::Garbage);
        }
        let nonce: [u8; 12] = rest[..12].try_into().expect("12 bytes");
        let session = u64::from_be_bytes(nonce[..8].try_into().expect("8 bytes"));
        let counter = u32::from_be_bytes(nonce[8..].try_into().expect("4 bytes"));
        let sealed = &rest[12..];
        let aad = &datagram[..aad_len];
        let mut body = sealed.to_vec();
        let plain_len = match &self.key {
            None => body.len(),
            Some(key) => match open_under(key, nonce, aad, &mut body) {
                Some(len) => len,
                // Sealed under the accepted key, maybe: from a fresh copy
                // (a failed open leaves the buffer undefined).
                None => {
                    let accepted = self.accepted.as_ref().ok_or(Refused::BadTag)?;
                    body.clear();
                    body.extend_from_slice(sealed);
                    let len = open_under(accepted, nonce, aad, &mut body).ok_or(Refused::BadTag)?;
                    self.opened_under_accepted += 1;
                    len
                }
            },
        };
        body.truncate(plain_len);
        if body.len() < 9 {
            return Err(Refused::Garbage);
        }
        let sent_ms = u64::from_be_bytes(body[1..9].try_into().expect("8 bytes"));
        // In i128: either stamp may be anything up to u64::MAX (a peer's
        // broken clock, or anyone at all in insecure mode).
        let skew =
            (now_ms as i128 - sent_ms as i128).clamp(i64::MIN.into(), i64::MAX.into()) as i64;
        if skew.unsigned_abs() > MAX_AGE_MS {
            return Err(Refused::Stale(skew));
        }
        let kind = match body[0] {
            0 => Kind::Swim,
            1 => Kind::Refusal,
            _ => return Err(Refused::Garbage),
        };
        // Insecure datagrams are not authenticated: a replay window would
        // only let a spoofer fill memory.
        if self.key.is_some() && !self.remember(session, counter, now_ms) {
            return Err(Refused::Replay);
        }
        body.drain(..9);
        Ok(Opened {
            kind,
            payload: body,
        })
    }

    fn remember(&mut self, session: u64, counter: u32, now_ms: u64) -> bool {
        if !self.windows.contains_key(&session) && self.windows.len() >= MAX_SESSIONS {
            // Forget the session heard from least recently.
            if let Some(oldest) = self
                .windows
                .iter()
                .min_by_key(|(_, w)| w.last_ms)
                .map(|(s, _)| *s)
            {
                self.windows.remove(&oldest);
            }
        }
        let w = self.windows.entry(session).or_default();
        if !w.accept(counter) {
            return false;
        }
        w.last_ms = now_ms;
        true
    }
}

fn aead_key(key: [u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).expect("32-byte ChaCha20 key"))
}

/// Opens `body` (ciphertext and tag) in place under `key`: the plaintext's
/// length, or `None` if it was not sealed under `key` or was altered.
fn open_under(key: &LessSafeKey, nonce: [u8; 12], aad: &[u8], body: &mut [u8]) -> Option<usize> {
    key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
        .ok()
        .map(|plain| plain.len())
}

type Header<'a> = (u8, u32, &'a [u8], &'a [u8], usize);

fn parse_header(d: &[u8]) -> Result<Header<'_>, Refused> {
    if d.len() < 9 || &d[..3] != MAGIC {
        return Err(Refused::Garbage);
    }
    let mode = d[3];
    let schema = u32::from_be_bytes(d[4..8].try_into().expect("4 bytes"));
    let n = d[8] as usize;
    if d.len() < 9 + n {
        return Err(Refused::Garbage);
    }
    Ok((mode, schema, &d[9..9 + n], &d[9 + n..], 9 + n))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn pair(key_a: Option<[u8; 32]>, key_b: Option<[u8; 32]>) -> (Sealer, Sealer) {
        (
            Sealer::new("edge", 3, key_a, 1),
            Sealer::new("edge", 3, key_b, 2),
        )
    }

    #[test]
    fn a_sealed_datagram_opens_once() {
        let (mut a, mut b) = pair(Some([7; 32]), Some([7; 32]));
        let d = a.seal(Kind::Swim, b"ping", NOW);
        assert_eq!(
            b.open(&d, NOW + 5),
            Ok(Opened {
                kind: Kind::Swim,
                payload: b"ping".to_vec()
            })
        );
        assert_eq!(b.open(&d, NOW + 6), Err(Refused::Replay));
        assert!(!d.windows(4).any(|w| w == b"ping"), "payload is encrypted");
    }

    #[test]
    fn a_wrong_secret_or_tampering_is_refused() {
        let (mut a, mut b) = pair(Some([7; 32]), Some([8; 32]));
        let d = a.seal(Kind::Swim, b"ping", NOW);
        assert_eq!(b.open(&d, NOW), Err(Refused::BadTag));
        let (mut a, mut b) = pair(Some([7; 32]), Some([7; 32]));
        let mut d = a.seal(Kind::Swim, b"ping", NOW);
        let last = d.len() - 20;
        d[last] ^= 1;
        assert_eq!(b.open(&d, NOW), Err(Refused::BadTag));
        // The header is authenticated too: claiming another schema breaks the tag.
        let mut d = a.seal(Kind::Swim, b"ping", NOW);
        let mut c = Sealer::new("edge", 4, Some([7; 32]), 3);
        d[7] = 4;
        assert_eq!(c.open(&d, NOW), Err(Refused::BadTag));
    }

    /// A secret rotated without a partition: a node accepting the other
    /// secret opens what either seals, and still seals under its own, which
    /// a node that accepts nothing else refuses.
    #[test]
    fn an_accepted_second_key_opens_datagrams_sealed_under_it() {
        let (old, new) = (Some([7; 32]), Some([8; 32]));
        let mut on_old = Sealer::new("edge", 3, old, 1);
        let mut rotating = Sealer::new("edge", 3, new, 2).accepting(old);
        let from_old = on_old.seal(Kind::Swim, b"old", NOW);
        assert_eq!(rotating.open(&from_old, NOW).unwrap().payload, b"old");
        assert_eq!(rotating.opened_under_accepted(), 1);
        assert_eq!(rotating.open(&from_old, NOW), Err(Refused::Replay));
        let from_rotating = rotating.seal(Kind::Swim, b"new", NOW);
        assert_eq!(on_old.open(&from_rotating, NOW), Err(Refused::BadTag));
        let mut on_new = Sealer::new("edge", 3, new, 3);
        assert_eq!(on_new.open(&from_rotating, NOW).unwrap().payload, b"new");
        let from_new = on_new.seal(Kind::Swim, b"own", NOW);
        assert!(rotating.open(&from_new, NOW).is_ok());
        assert_eq!(
            rotating.opened_under_accepted(),
            2,
            "its own key counts not"
        );
        // A third key is still refused, and so is tampering under either.
        let mut stranger = Sealer::new("edge", 3, Some([9; 32]), 4);
        let d = stranger.seal(Kind::Swim, b"x", NOW);
        assert_eq!(rotating.open(&d, NOW), Err(Refused::BadTag));
        let mut d = on_old.seal(Kind::Swim, b"old", NOW);
        let last = d.len() - 20;
        d[last] ^= 1;
        assert_eq!(rotating.open(&d, NOW), Err(Refused::BadTag));
        // An insecure sealer takes no second key: it authenticates nothing.
        let insecure = Sealer::new("edge", 3, None, 5).accepting(old);
        assert!(insecure.accepted.is_none());
    }

    #[test]
    fn other_clusters_schemas_and_modes_are_named() {
        let mut a = Sealer::new("edge", 3, Some([7; 32]), 1);
        let d = a.seal(Kind::Swim, b"x", NOW);
        let mut other = Sealer::new("other", 3, Some([7; 32]), 2);
        assert!(matches!(other.open(&d, NOW), Err(Refused::Cluster { .. })));
        let mut newer = Sealer::new("edge", 4, Some([7; 32]), 2);
        assert_eq!(
            newer.open(&d, NOW),
            Err(Refused::Schema { theirs: 3, ours: 4 })
        );
        let mut insecure = Sealer::new("edge", 3, None, 2);
        assert_eq!(insecure.open(&d, NOW), Err(Refused::PeerSecure));
        let d = insecure.seal(Kind::Swim, b"x", NOW);
        assert_eq!(a.open(&d, NOW), Err(Refused::PeerInsecure));
        assert_eq!(b_open_garbage(&mut a), Err(Refused::Garbage));
    }

    /// Found by `fuzz_replication` (sealed_datagrams_open_once_and_only_whole):
    /// a datagram stamped at or past 2^63 ms overflowed the skew's
    /// subtraction, a panic in debug builds; in insecure mode anyone who
    /// can send a datagram could send it.
    #[test]
    fn a_datagram_stamped_at_any_time_is_refused_as_stale_without_panicking() {
        for secret in [None, Some([7; 32])] {
            let (mut a, mut b) = pair(secret, secret);
            for sent in [1 << 63, u64::MAX, 0] {
                let d = a.seal(Kind::Swim, b"x", sent);
                match b.open(&d, NOW) {
                    Err(Refused::Stale(skew)) => {
                        assert_eq!(skew.signum(), if sent > NOW { -1 } else { 1 }, "{sent}")
                    }
                    other => panic!("stamped {sent}: {other:?}"),
                }
            }
        }
    }

    fn b_open_garbage(s: &mut Sealer) -> Result<Opened, Refused> {
        s.open(b"GET / HTTP/1.1\r\n", NOW)
    }

    #[test]
    fn stale_datagrams_are_refused_and_out_of_order_ones_accepted() {
        let (mut a, mut b) = pair(Some([7; 32]), Some([7; 32]));
        let old = a.seal(Kind::Swim, b"1", NOW - MAX_AGE_MS - 1);
        assert!(matches!(b.open(&old, NOW), Err(Refused::Stale(_))));
        assert_eq!(
            Refused::Stale(599_940).to_string(),
            "datagram stamped 599940 ms behind this node's clock (clocks out of sync? check NTP on both POPs)"
        );
        assert_eq!(
            Refused::Stale(-599_940).to_string(),
            "datagram stamped 599940 ms ahead of this node's clock (clocks out of sync? check NTP on both POPs)"
        );
        let d2 = a.seal(Kind::Swim, b"2", NOW);
        let d3 = a.seal(Kind::Swim, b"3", NOW);
        assert!(b.open(&d3, NOW).is_ok());
        assert!(b.open(&d2, NOW).is_ok(), "reordered, inside the window");
        assert_eq!(b.open(&d2, NOW), Err(Refused::Replay));
        for _ in 0..70 {
            a.seal(Kind::Swim, b"skip", NOW);
        }
        let late = a.seal(Kind::Swim, b"late", NOW);
        assert!(b.open(&late, NOW).is_ok());
        assert_eq!(b.open(&d3, NOW), Err(Refused::Replay), "below the window");
    }

    #[test]
    fn insecure_mode_checks_the_header_only() {
        let (mut a, mut b) = pair(None, None);
        let d = a.seal(Kind::Refusal, b"why", NOW);
        assert_eq!(b.open(&d, NOW).unwrap().payload, b"why");
        assert!(d.windows(3).any(|w| w == b"why"), "not encrypted");
    }

    #[test]
    fn the_session_table_is_bounded() {
        let mut b = Sealer::new("edge", 3, Some([7; 32]), 0);
        for s in 0..(MAX_SESSIONS as u64 + 100) {
            let mut a = Sealer::new("edge", 3, Some([7; 32]), s + 1);
            let d = a.seal(Kind::Swim, b"x", NOW);
            b.open(&d, NOW + s).unwrap();
        }
        assert_eq!(b.windows.len(), MAX_SESSIONS);
    }
}
