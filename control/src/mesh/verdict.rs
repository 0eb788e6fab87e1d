//! Which rule speaks for each peer's path (sans-IO): the pings through the
//! tunnel (`probe_watch`) once the peer has answered one, the handshake age
//! (`path_watch`) before that, or when there are no probes. Each watch
//! keeps its own verdict; this says which one is shown and which of their
//! events are told, so that a path is said down once and up once.

use std::collections::HashSet;
use std::time::Duration;

use super::path_watch::{PathEvent, PathWatch};
use super::probe_watch::ProbeWatch;

/// The handshake age's "down"s that were told (so that only their own
/// "works again" is told after them).
#[derive(Debug, Default)]
pub struct Verdict {
    told_down_by_handshake: HashSet<String>,
}

impl Verdict {
    /// Whether `public_key`'s path works, as shown (status, metrics).
    pub fn path_up(
        probes: &ProbeWatch,
        paths: &PathWatch,
        public_key: &str,
        keepalive: Option<Duration>,
    ) -> Option<bool> {
        probes
            .path_up(public_key)
            .or_else(|| paths.path_up(public_key, keepalive))
    }

    /// Which of the handshake age's `events` to tell: a "down" for a peer
    /// the pings do not judge, and the "works again" after a "down" told.
    /// (A path the pings judge is told from them: `probe_watch`'s events
    /// are always told.)
    pub fn handshake_events(
        &mut self,
        probes: &ProbeWatch,
        events: Vec<PathEvent>,
    ) -> Vec<PathEvent> {
        events
            .into_iter()
            .filter(|event| match event {
                PathEvent::Down { public_key, .. } => {
                    probes.path_up(public_key).is_none()
                        && self.told_down_by_handshake.insert(public_key.clone())
                }
                PathEvent::Up { public_key, .. } => self.told_down_by_handshake.remove(public_key),
            })
            .collect()
    }

    /// Forgets the peers not in `keys` (they left the mesh).
    pub fn retain(&mut self, keys: &[String]) {
        self.told_down_by_handshake
            .retain(|k| keys.iter().any(|key| key == k));
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;
    use std::time::Instant;

    use super::*;
    use crate::mesh::path_watch::Reading;

    const K: Option<Duration> = Some(Duration::from_secs(25));
    const S: fn(u64) -> Duration = Duration::from_secs;
    const A: &str = "peer-a";
    const TO: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1);

    fn reading(last_handshake: Option<Duration>) -> [Reading<'static>; 1] {
        [Reading {
            public_key: A,
            last_handshake,
            keepalive: K,
        }]
    }

    /// A probe watch over A at `t0`, A answered at once if `answers`.
    fn probes(t0: Instant, answers: bool) -> ProbeWatch {
        let mut probes = ProbeWatch::new(S(2));
        probes.set_peers(&[(A, TO)]);
        let seq = probes.poll_probes(t0)[0].seq;
        if answers {
            probes.handle_answer(t0, TO, seq);
        }
        probes
    }

    #[test]
    fn a_peer_that_never_answered_is_told_from_its_handshakes_down_then_up() {
        let t0 = Instant::now();
        let (mut v, mut paths) = (Verdict::default(), PathWatch::default());
        let mut probes = probes(t0, false);
        paths.observe(t0, &reading(None));
        let late = t0 + S(60);
        let down = paths.observe(late, &reading(None));
        assert_eq!(v.handshake_events(&probes, down).len(), 1);
        assert_eq!(Verdict::path_up(&probes, &paths, A, K), Some(false));
        // The path opens: a handshake, and the pings answered at last. The
        // handshake's "works again" follows its "down".
        let seq = probes.poll_probes(late)[0].seq;
        probes.handle_answer(late, TO, seq);
        let up = paths.observe(late + S(1), &reading(Some(S(1))));
        assert!(matches!(
            v.handshake_events(&probes, up).as_slice(),
            [PathEvent::Up { .. }]
        ));
        assert_eq!(Verdict::path_up(&probes, &paths, A, K), Some(true));
    }

    #[test]
    fn a_peer_that_answers_is_told_from_its_pings_only() {
        let t0 = Instant::now();
        let (mut v, mut paths) = (Verdict::default(), PathWatch::default());
        let mut probes = probes(t0, true);
        paths.observe(t0, &reading(Some(S(0))));
        // Blocked: the pings say it in seconds (their event, told by the
        // driver); minutes later the handshake age agrees, unsaid.
        let mut down = Vec::new();
        for s in 1..=20 {
            let now = t0 + S(s);
            down.extend(probes.judge(now));
            let _ = probes.poll_probes(now);
        }
        assert_eq!(down.len(), 1);
        assert_eq!(Verdict::path_up(&probes, &paths, A, K), Some(false));
        let late = t0 + S(600);
        let events = paths.observe(late, &reading(Some(S(600))));
        assert_eq!(events.len(), 1, "the handshake age says it too");
        assert!(v.handshake_events(&probes, events).is_empty());
        // Open again: the handshake's "works again" is not told either (the
        // pings' is).
        let up = paths.observe(late + S(1), &reading(Some(S(0))));
        assert_eq!(up.len(), 1);
        assert!(v.handshake_events(&probes, up).is_empty());
    }

    #[test]
    fn without_probes_the_handshake_age_is_shown_and_told() {
        let t0 = Instant::now();
        let (mut v, mut paths) = (Verdict::default(), PathWatch::default());
        let probes = ProbeWatch::new(S(2));
        paths.observe(t0, &reading(Some(S(0))));
        assert_eq!(Verdict::path_up(&probes, &paths, A, K), Some(true));
        let down = paths.observe(t0 + S(300), &reading(Some(S(300))));
        assert_eq!(v.handshake_events(&probes, down).len(), 1);
        assert_eq!(Verdict::path_up(&probes, &paths, A, K), Some(false));
        assert_eq!(Verdict::path_up(&probes, &paths, A, None), None);
        // Gone from the mesh, back later: its old "down" is forgotten.
        v.retain(&[]);
        let up = paths.observe(t0 + S(301), &reading(Some(S(0))));
        assert!(v.handshake_events(&probes, up).is_empty());
    }
}
