//! Whether each mesh peer's path works, judged from its WireGuard handshake
//! age (sans-IO: the driver feeds it what the device reports once a second
//! and logs what it returns). The pings through the tunnel (`probe_watch`)
//! tell in seconds and take over for every peer that answers them; this
//! watch speaks for the others (probes off or impossible, a peer that drops
//! ICMPv6 echo, a path blocked before its first answer).
//!
//! A path blackholed between two POPs (a firewall dropping the tunnel's UDP,
//! a broken route) leaves everything else as it was: the peer stays
//! configured and replication may still reach the POP over its own ports.
//!
//! Why the handshake age and not the bytes received: with persistent
//! keepalives only one side of an idle path sends them (WireGuard resets the
//! keepalive timer on any authenticated packet, sent or received, so the
//! side whose timer fires first keeps sending and the other keeps
//! receiving), and the embedded implementation counts a keepalive as 0
//! bytes received; measured on both, received bytes stay flat on a working
//! path. Handshakes do not: a session is good for [`REJECT_AFTER_TIME`], and
//! a POP that sends keepalives on it handshakes again before or at that
//! age (the initiator rekeys from 120 s, the responder at the latest when
//! the session expires and its next keepalive needs a new one), each
//! attempt retried every [`REKEY_TIMEOUT`]. So on a working path the age
//! never passes `REJECT_AFTER_TIME` + one keepalive + two retries, whatever
//! the peer's own keepalive setting; past that the session is unusable and
//! the path is down. A peer never handshaken with has no session to wait
//! for: three lost attempts say it. Without a keepalive of this POP's an
//! idle path rightly stops handshaking, and nothing is judged.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// WireGuard's session lifetime (`REJECT_AFTER_TIME`, whitepaper §6.1).
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// WireGuard's handshake retry interval (`REKEY_TIMEOUT`).
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);

/// How old a handshake may get on a working path when this POP sends a
/// keepalive every `keepalive`.
pub fn handshake_allowance(keepalive: Duration) -> Duration {
    REJECT_AFTER_TIME + keepalive + REKEY_TIMEOUT * 2
}

/// How long a peer may go without its first handshake: three attempts.
pub fn first_handshake_allowance(keepalive: Duration) -> Duration {
    REKEY_TIMEOUT * 3 + keepalive
}

/// One peer as the device reports it.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    pub public_key: &'a str,
    /// Age of the last completed handshake; `None`: never.
    pub last_handshake: Option<Duration>,
    /// This POP's persistent keepalive to the peer; `None` or zero: off,
    /// so an old handshake proves nothing.
    pub keepalive: Option<Duration>,
}

/// What changed for one peer since the last readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEvent {
    /// No handshake for `for_how_long` (since the last one, or since the
    /// peer was added when there never was one).
    Down {
        public_key: String,
        for_how_long: Duration,
        ever_handshaken: bool,
        keepalive: Duration,
    },
    /// A handshake again, `after` the last one before the path went down.
    Up { public_key: String, after: Duration },
}

#[derive(Debug)]
struct Peer {
    /// When the last handshake was (or when watching began, if none).
    last_heard: Instant,
    ever_handshaken: bool,
    down: bool,
}

/// Every peer's last handshake and verdict.
#[derive(Debug, Default)]
pub struct PathWatch {
    peers: HashMap<String, Peer>,
}

impl PathWatch {
    /// Takes the device's readings at `now` and returns what changed.
    /// Peers no longer listed are forgotten (left the mesh: nothing to
    /// say); a peer seen for the first time is judged from `now`.
    pub fn observe(&mut self, now: Instant, readings: &[Reading<'_>]) -> Vec<PathEvent> {
        self.peers
            .retain(|key, _| readings.iter().any(|r| r.public_key == key));
        let mut events = Vec::new();
        for r in readings {
            let peer = self.peers.entry(r.public_key.to_string()).or_insert(Peer {
                last_heard: now,
                ever_handshaken: false,
                down: false,
            });
            // A handshake newer than the last one known. (A device built
            // again reports none: the last known one still stands.)
            if let Some(at) = r.last_handshake.and_then(|age| now.checked_sub(age)) {
                if !peer.ever_handshaken || at > peer.last_heard {
                    if peer.down {
                        events.push(PathEvent::Up {
                            public_key: r.public_key.to_string(),
                            after: at.saturating_duration_since(peer.last_heard),
                        });
                    }
                    peer.down = false;
                    peer.last_heard = at;
                    peer.ever_handshaken = true;
                }
            }
            let Some(keepalive) = r.keepalive.filter(|k| !k.is_zero()) else {
                // Nothing to judge by: no verdict either way.
                peer.down = false;
                continue;
            };
            let allowance = match peer.ever_handshaken {
                true => handshake_allowance(keepalive),
                false => first_handshake_allowance(keepalive),
            };
            let for_how_long = now.saturating_duration_since(peer.last_heard);
            if !peer.down && for_how_long > allowance {
                peer.down = true;
                events.push(PathEvent::Down {
                    public_key: r.public_key.to_string(),
                    for_how_long,
                    ever_handshaken: peer.ever_handshaken,
                    keepalive,
                });
            }
        }
        events
    }

    /// Whether `public_key`'s path works: `None` when it cannot be told
    /// (no keepalive of this POP's, or not watched).
    pub fn path_up(&self, public_key: &str, keepalive: Option<Duration>) -> Option<bool> {
        keepalive.filter(|k| !k.is_zero())?;
        self.peers.get(public_key).map(|p| !p.down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Duration = Duration::from_secs(25);
    const S: fn(u64) -> Duration = Duration::from_secs;

    fn reading(last_handshake: Option<Duration>) -> Reading<'static> {
        Reading {
            public_key: "peer-a",
            last_handshake,
            keepalive: Some(K),
        }
    }

    #[test]
    fn a_path_that_rekeys_as_wireguard_does_is_never_called_down() {
        let (mut watch, t0) = (PathWatch::default(), Instant::now());
        // Handshakes at 0, then each as late as a responder's: when the
        // session expires plus one keepalive and one lost attempt.
        let period = REJECT_AFTER_TIME + K + REKEY_TIMEOUT;
        for s in 0..3600u64 {
            let age = S(s % period.as_secs());
            let events = watch.observe(t0 + S(s), &[reading(Some(age))]);
            assert!(events.is_empty(), "at {s} s: {events:?}");
        }
        assert_eq!(watch.path_up("peer-a", Some(K)), Some(true));
    }

    #[test]
    fn a_path_blocked_after_a_handshake_is_down_once_then_up_with_how_long() {
        let (mut watch, t0) = (PathWatch::default(), Instant::now());
        let at = |s: u64| t0 + S(s);
        let limit = handshake_allowance(K).as_secs();
        for s in 0..=limit {
            assert!(
                watch.observe(at(s), &[reading(Some(S(s)))]).is_empty(),
                "at {s} s"
            );
        }
        assert_eq!(
            watch.observe(at(limit + 1), &[reading(Some(S(limit + 1)))]),
            vec![PathEvent::Down {
                public_key: "peer-a".into(),
                for_how_long: S(limit + 1),
                ever_handshaken: true,
                keepalive: K,
            }]
        );
        assert_eq!(watch.path_up("peer-a", Some(K)), Some(false));
        // Said once, not at every reading.
        assert!(watch
            .observe(at(limit + 30), &[reading(Some(S(limit + 30)))])
            .is_empty());
        // A handshake 2 s before this reading: the path works again.
        assert_eq!(
            watch.observe(at(limit + 40), &[reading(Some(S(2)))]),
            vec![PathEvent::Up {
                public_key: "peer-a".into(),
                after: S(limit + 38),
            }]
        );
        assert_eq!(watch.path_up("peer-a", Some(K)), Some(true));
    }

    #[test]
    fn a_peer_never_handshaken_with_is_down_after_three_attempts() {
        let (mut watch, t0) = (PathWatch::default(), Instant::now());
        let limit = first_handshake_allowance(K);
        assert!(watch.observe(t0, &[reading(None)]).is_empty());
        assert!(watch.observe(t0 + limit, &[reading(None)]).is_empty());
        let events = watch.observe(t0 + limit + S(1), &[reading(None)]);
        assert!(
            matches!(
                events.as_slice(),
                [PathEvent::Down {
                    ever_handshaken: false,
                    ..
                }]
            ),
            "{events:?}"
        );
        let events = watch.observe(t0 + limit + S(2), &[reading(Some(S(0)))]);
        assert!(
            matches!(events.as_slice(), [PathEvent::Up { .. }]),
            "{events:?}"
        );
    }

    #[test]
    fn without_a_keepalive_an_old_handshake_proves_nothing() {
        let (mut watch, t0) = (PathWatch::default(), Instant::now());
        for keepalive in [None, Some(Duration::ZERO)] {
            let r = |age| Reading {
                public_key: "quiet",
                last_handshake: age,
                keepalive,
            };
            assert!(watch.observe(t0, &[r(None)]).is_empty());
            assert!(watch.observe(t0 + S(3600), &[r(None)]).is_empty());
            assert!(watch.observe(t0 + S(7200), &[r(Some(S(3000)))]).is_empty());
            assert_eq!(watch.path_up("quiet", keepalive), None);
        }
    }

    #[test]
    fn a_device_built_again_keeps_the_last_handshake_known() {
        let (mut watch, t0) = (PathWatch::default(), Instant::now());
        watch.observe(t0, &[reading(Some(S(0)))]);
        // The device was built again: it knows of no handshake. The peer
        // gets the established path's allowance, not the first one's.
        let first = first_handshake_allowance(K);
        assert!(watch
            .observe(t0 + first + S(1), &[reading(None)])
            .is_empty());
        let limit = handshake_allowance(K);
        assert_eq!(watch.observe(t0 + limit + S(1), &[reading(None)]).len(), 1);
    }

    #[test]
    fn a_peer_removed_and_added_again_starts_afresh() {
        let (mut watch, t0) = (PathWatch::default(), Instant::now());
        let limit = first_handshake_allowance(K);
        watch.observe(t0, &[reading(None)]);
        assert_eq!(watch.observe(t0 + limit + S(1), &[reading(None)]).len(), 1);
        assert!(watch.observe(t0 + limit + S(1), &[]).is_empty());
        assert_eq!(watch.path_up("peer-a", Some(K)), None);
        // Back in the mesh: a whole allowance from now, and no "up" for a
        // path it was forgotten in.
        let back = t0 + limit * 2;
        assert!(watch.observe(back, &[reading(None)]).is_empty());
        assert!(watch.observe(back + limit, &[reading(None)]).is_empty());
        assert_eq!(watch.path_up("peer-a", Some(K)), Some(true));
    }
}
