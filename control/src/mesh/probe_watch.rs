//! Whether each mesh peer's path carries packets now, from pings through
//! the tunnel (sans-IO: the driver asks what to send, hands over each
//! answer with the instant it arrived, and logs what comes out; the socket
//! is `pinger`'s, the task around it `prober`'s).
//!
//! Call order: [`ProbeWatch::set_peers`] whenever the device was read;
//! [`ProbeWatch::handle_answer`] as answers arrive; at
//! [`ProbeWatch::poll_timeout`], the answers that came in, then
//! [`ProbeWatch::judge`], then [`ProbeWatch::poll_probes`] and send what it
//! returns.
//!
//! Why pings: the handshake age (`path_watch`) can only tell a path blocked
//! after a handshake once the session has expired, up to ~3.3 minutes. An
//! ICMPv6 echo request from this POP's 6PN address to the peer's (`::1` of
//! its /64) crosses the tunnel both ways and the peer's kernel answers it by
//! itself: it works with a peer running an older edgeproxy and with every
//! WireGuard implementation, and needs no persistent keepalive (the probes
//! themselves keep the session, and NAT mappings, warm).
//!
//! The rule: a path is down once [`LOST_IN_A_ROW`] probes in a row went
//! unanswered, each given a whole interval, and the first of them at least
//! [`HANDSHAKE_GRACE`] ago. The grace is for a session that must be made
//! first (a peer just added, a device built again, a path idle without
//! keepalives): WireGuard queues the probes while it handshakes and sends
//! them once it has; a first handshake takes one round trip, and one whose
//! initiation was lost is retried after `REKEY_TIMEOUT` (5 s, plus up to
//! 1/3 s of jitter), so its queued probes are answered within 5.33 s and two
//! round trips. With the default 2 s interval a path blocked between two
//! probes is said down 7 to 9 s later.
//!
//! Only a peer that has answered once is judged here: one that never did
//! may drop ICMPv6 echo on its mesh interface (a host firewall), and its
//! path is left to the handshake age, as before probes existed.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use super::path_watch::REKEY_TIMEOUT;

/// Probes unanswered in a row that make a path down.
pub const LOST_IN_A_ROW: usize = 3;
/// The least silence (from the first unanswered probe) that makes a path
/// down: one lost handshake initiation, retried, and two round trips.
pub const HANDSHAKE_GRACE: Duration = REKEY_TIMEOUT.saturating_add(Duration::from_secs(2));

/// How long a probe waits for its answer before it counts as lost (a later
/// answer is ignored: its sequence number may be reused).
pub fn answer_deadline(interval: Duration) -> Duration {
    HANDSHAKE_GRACE.max(interval.saturating_mul(LOST_IN_A_ROW as u32))
}

/// An echo request to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub to: Ipv6Addr,
    pub seq: u16,
}

/// What changed for one peer's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEvent {
    /// `unanswered` probes in a row got no answer; the last answer came
    /// `silent_for` ago.
    Down {
        public_key: String,
        unanswered: usize,
        silent_for: Duration,
    },
    /// An answer again, `after` the last one before the path went down.
    Up {
        public_key: String,
        after: Duration,
        rtt: Duration,
    },
}

#[derive(Debug)]
struct Peer {
    /// Its 6PN address (`::1` of its /64).
    to: Ipv6Addr,
    /// When the last answer came; `None`: never (not judged here).
    last_answer: Option<Instant>,
    /// When the probes sent since the last answer left (the first
    /// [`LOST_IN_A_ROW`] of them: enough to judge).
    unanswered: Vec<Instant>,
    unanswered_count: usize,
    down: bool,
    rtt: Option<Duration>,
    lost: u64,
}

impl Peer {
    fn new(to: Ipv6Addr) -> Peer {
        Peer {
            to,
            last_answer: None,
            unanswered: Vec::with_capacity(LOST_IN_A_ROW),
            unanswered_count: 0,
            down: false,
            rtt: None,
            lost: 0,
        }
    }
}

#[derive(Debug)]
struct InFlight {
    public_key: String,
    to: Ipv6Addr,
    sent: Instant,
}

/// Every peer's probes and verdict.
#[derive(Debug)]
pub struct ProbeWatch {
    interval: Duration,
    peers: HashMap<String, Peer>,
    in_flight: HashMap<u16, InFlight>,
    next_seq: u16,
    next_round: Option<Instant>,
}

impl ProbeWatch {
    /// Probes every peer every `interval` (at least 100 ms).
    pub fn new(interval: Duration) -> ProbeWatch {
        ProbeWatch {
            interval: interval.max(Duration::from_millis(100)),
            peers: HashMap::new(),
            in_flight: HashMap::new(),
            next_seq: 0,
            next_round: None,
        }
    }

    /// The peers and their 6PN addresses, as the device has them now. A
    /// peer no longer listed is forgotten (it left the mesh); a new one, or
    /// one whose address changed, starts afresh.
    pub fn set_peers(&mut self, peers: &[(&str, Ipv6Addr)]) {
        self.peers
            .retain(|key, p| peers.iter().any(|(k, to)| k == key && *to == p.to));
        for (key, to) in peers {
            self.peers
                .entry(key.to_string())
                .or_insert_with(|| Peer::new(*to));
        }
        let peers = &self.peers;
        self.in_flight
            .retain(|_, f| peers.get(&f.public_key).is_some_and(|p| p.to == f.to));
    }

    /// When to call [`ProbeWatch::judge`] and [`ProbeWatch::poll_probes`]
    /// next: the next round, or a verdict due before it.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let round = self.next_round.unwrap_or(now);
        self.peers
            .values()
            .filter_map(|p| self.down_at(p))
            .fold(round, Instant::min)
    }

    /// When `peer`'s path is down if no answer comes first.
    fn down_at(&self, peer: &Peer) -> Option<Instant> {
        if peer.last_answer.is_none() || peer.down || peer.unanswered.len() < LOST_IN_A_ROW {
            return None;
        }
        let last_had_its_interval = peer.unanswered[LOST_IN_A_ROW - 1] + self.interval;
        let grace_over = peer.unanswered[0] + HANDSHAKE_GRACE;
        Some(last_had_its_interval.max(grace_over))
    }

    /// The probes to send at `now`: one per peer when a round is due
    /// (every interval), none otherwise.
    #[must_use]
    pub fn poll_probes(&mut self, now: Instant) -> Vec<Probe> {
        if self.next_round.is_some_and(|at| now < at) {
            return Vec::new();
        }
        self.next_round = Some(now + self.interval);
        let mut probes = Vec::with_capacity(self.peers.len());
        for (key, peer) in &mut self.peers {
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            // A sequence number still waiting (65,536 probes ago) is given
            // up: its answer could no longer be told apart.
            self.in_flight.insert(
                seq,
                InFlight {
                    public_key: key.clone(),
                    to: peer.to,
                    sent: now,
                },
            );
            peer.unanswered_count += 1;
            if peer.unanswered.len() < LOST_IN_A_ROW {
                peer.unanswered.push(now);
            }
            probes.push(Probe { to: peer.to, seq });
        }
        probes
    }

    /// An echo reply from `from` with `seq`, received at `at`. Anything
    /// that is not the answer to a probe in flight is ignored.
    pub fn handle_answer(&mut self, at: Instant, from: Ipv6Addr, seq: u16) -> Option<ProbeEvent> {
        if self.in_flight.get(&seq)?.to != from {
            return None;
        }
        let flight = self.in_flight.remove(&seq)?;
        let peer = self.peers.get_mut(&flight.public_key)?;
        let rtt = at.saturating_duration_since(flight.sent);
        let before = peer.last_answer.replace(at);
        peer.rtt = Some(rtt);
        peer.unanswered.clear();
        peer.unanswered_count = 0;
        if !std::mem::replace(&mut peer.down, false) {
            return None;
        }
        Some(ProbeEvent::Up {
            public_key: flight.public_key,
            after: before.map_or(Duration::ZERO, |b| at.saturating_duration_since(b)),
            rtt,
        })
    }

    /// Counts the probes whose answer is overdue as lost, and returns the
    /// paths that went down at `now`.
    pub fn judge(&mut self, now: Instant) -> Vec<ProbeEvent> {
        let deadline = answer_deadline(self.interval);
        let peers = &mut self.peers;
        self.in_flight.retain(|_, f| {
            let overdue = now.saturating_duration_since(f.sent) >= deadline;
            if overdue {
                if let Some(p) = peers.get_mut(&f.public_key) {
                    p.lost += 1;
                }
            }
            !overdue
        });
        let down: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| self.down_at(p).is_some_and(|at| now >= at))
            .map(|(key, _)| key.clone())
            .collect();
        let mut events = Vec::with_capacity(down.len());
        for key in down {
            let Some(peer) = self.peers.get_mut(&key) else {
                continue;
            };
            peer.down = true;
            let last_answer = peer.last_answer.unwrap_or(now);
            events.push(ProbeEvent::Down {
                public_key: key,
                unanswered: peer.unanswered_count,
                silent_for: now.saturating_duration_since(last_answer),
            });
        }
        events
    }

    /// Whether `public_key`'s path works, from its probes: `None` while it
    /// has never answered one (or is not watched).
    pub fn path_up(&self, public_key: &str) -> Option<bool> {
        let p = self.peers.get(public_key)?;
        p.last_answer.map(|_| !p.down)
    }

    /// The round trip of the peer's last answered probe.
    pub fn rtt(&self, public_key: &str) -> Option<Duration> {
        self.peers.get(public_key)?.rtt
    }

    /// Probes to the peer that got no answer in time, since it was added.
    pub fn lost(&self, public_key: &str) -> Option<u64> {
        Some(self.peers.get(public_key)?.lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(2);
    const MS: fn(u64) -> Duration = Duration::from_millis;
    const A: &str = "peer-a";

    fn addr(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0, 0, n, 0, 0, 0, 1)
    }

    /// A watch over peer A at `addr(1)`, ticked every 100 ms from `t0` to
    /// `until` (ms). `answer(sent_ms)` says when (ms) a probe sent at
    /// `sent_ms` is answered, if ever. Returns the events with their time.
    struct Sim {
        watch: ProbeWatch,
        t0: Instant,
        /// (arrives at ms, seq) of answers not yet delivered.
        pending: Vec<(u64, u16)>,
        now_ms: u64,
    }

    impl Sim {
        fn new() -> Sim {
            let mut watch = ProbeWatch::new(I);
            watch.set_peers(&[(A, addr(1))]);
            Sim {
                watch,
                t0: Instant::now(),
                pending: Vec::new(),
                now_ms: 0,
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + MS(ms)
        }

        fn run(
            &mut self,
            until_ms: u64,
            answer: impl Fn(u64) -> Option<u64>,
        ) -> Vec<(u64, ProbeEvent)> {
            let mut events = Vec::new();
            while self.now_ms <= until_ms {
                let now = self.at(self.now_ms);
                let due: Vec<(u64, u16)> = self
                    .pending
                    .iter()
                    .copied()
                    .filter(|(at, _)| *at <= self.now_ms)
                    .collect();
                self.pending.retain(|(at, _)| *at > self.now_ms);
                for (at, seq) in due {
                    let t = self.at(at);
                    if let Some(e) = self.watch.handle_answer(t, addr(1), seq) {
                        events.push((at, e));
                    }
                }
                events.extend(self.watch.judge(now).into_iter().map(|e| (self.now_ms, e)));
                for p in self.watch.poll_probes(now) {
                    assert_eq!(p.to, addr(1));
                    if let Some(back) = answer(self.now_ms) {
                        self.pending.push((back, p.seq));
                    }
                }
                self.now_ms += 100;
            }
            events
        }
    }

    #[test]
    fn a_path_that_answers_is_never_called_down() {
        let mut sim = Sim::new();
        let events = sim.run(3_600_000, |sent| Some(sent + 80));
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(sim.watch.path_up(A), Some(true));
        assert_eq!(sim.watch.rtt(A), Some(MS(80)));
        assert_eq!(sim.watch.lost(A), Some(0));
    }

    #[test]
    fn a_path_blocked_after_answers_is_down_after_three_lost_probes_once_then_up() {
        let mut sim = Sim::new();
        // Probes leave at 0, 2, 4 … s; blocked at 10.5 s: the probes of 12,
        // 14 and 16 s are lost, and the one of 16 s has had its interval at
        // 18 s, but the first lost one was sent only 6 s before: down at
        // 19 s (12 + 7), 8.5 s after the block.
        let blocked = |sent: u64| (10_500..60_000).contains(&sent);
        let events = sim.run(30_000, |sent| (!blocked(sent)).then_some(sent + 80));
        assert_eq!(
            events,
            vec![(
                19_000,
                ProbeEvent::Down {
                    public_key: A.into(),
                    unanswered: 4,
                    silent_for: MS(19_000 - 10_080),
                }
            )],
            "said once"
        );
        assert_eq!(sim.watch.path_up(A), Some(false));
        assert!(sim.watch.lost(A).unwrap() >= 3);
        // Open again at 60 s: the probe of 60 s is answered 80 ms later.
        let events = sim.run(70_000, |sent| (!blocked(sent)).then_some(sent + 80));
        assert_eq!(
            events,
            vec![(
                60_080,
                ProbeEvent::Up {
                    public_key: A.into(),
                    after: MS(60_080 - 10_080),
                    rtt: MS(80),
                }
            )]
        );
        assert_eq!(sim.watch.path_up(A), Some(true));
    }

    #[test]
    fn the_next_call_is_due_at_the_next_round_or_an_earlier_verdict() {
        let mut watch = ProbeWatch::new(I);
        watch.set_peers(&[(A, addr(1))]);
        let t0 = Instant::now();
        assert_eq!(watch.poll_timeout(t0), t0, "the first round at once");
        let seq = watch.poll_probes(t0)[0].seq;
        assert_eq!(watch.poll_timeout(t0), t0 + I);
        watch.handle_answer(t0 + MS(10), addr(1), seq);
        // Lost from the round of 2 s on: rounds at 2, 4, 6 s, and the
        // verdict at 9 s (2 + 7), between the rounds of 8 and 10 s.
        for s in [2, 4, 6, 8] {
            let now = t0 + Duration::from_secs(s);
            assert!(watch.judge(now).is_empty());
            assert_eq!(watch.poll_probes(now).len(), 1);
        }
        assert_eq!(watch.poll_timeout(t0 + MS(8_000)), t0 + MS(9_000));
        assert_eq!(watch.judge(t0 + MS(9_000)).len(), 1);
        assert_eq!(watch.poll_timeout(t0 + MS(9_000)), t0 + MS(10_000));
    }

    #[test]
    fn a_handshake_whose_first_initiation_was_lost_is_not_called_down() {
        let mut sim = Sim::new();
        assert!(sim.run(9_900, |sent| Some(sent + 30)).is_empty());
        // The device is built again at 10 s (a wireguard-go replaced): the
        // probes of 10, 12 and 14 s wait for a handshake whose first
        // initiation is lost; it completes at 15.33 s plus a round trip,
        // and the queued probes are answered two 280 ms round trips later.
        let answered = |sent: u64| match sent {
            10_000..=15_300 => Some(15_330 + 560),
            _ => Some(sent + 280),
        };
        let events = sim.run(60_000, answered);
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(sim.watch.path_up(A), Some(true));
    }

    #[test]
    fn a_peer_that_never_answered_is_left_to_the_handshake_age() {
        let mut sim = Sim::new();
        let events = sim.run(600_000, |_| None);
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(sim.watch.path_up(A), None);
        assert_eq!(sim.watch.rtt(A), None);
        // Its probes are lost all the same (an ICMPv6 filter, or a path
        // blocked from the start): counted, for the metrics.
        assert!(sim.watch.lost(A).unwrap() > 250);
    }

    #[test]
    fn answers_that_are_no_probes_answer_are_ignored() {
        let mut watch = ProbeWatch::new(I);
        watch.set_peers(&[(A, addr(1)), ("peer-b", addr(2))]);
        let t0 = Instant::now();
        let probes = watch.poll_probes(t0);
        assert_eq!(probes.len(), 2);
        let to_a = probes.iter().find(|p| p.to == addr(1)).unwrap();
        // From the other peer, an unknown sequence, then the real one twice.
        assert_eq!(watch.handle_answer(t0, addr(2), to_a.seq), None);
        assert_eq!(watch.path_up(A), None);
        assert_eq!(
            watch.handle_answer(t0, addr(1), to_a.seq.wrapping_add(7)),
            None
        );
        assert_eq!(watch.path_up(A), None);
        assert_eq!(watch.handle_answer(t0 + MS(5), addr(1), to_a.seq), None);
        assert_eq!(watch.path_up(A), Some(true));
        assert_eq!(watch.rtt(A), Some(MS(5)));
        assert_eq!(watch.handle_answer(t0 + MS(9), addr(1), to_a.seq), None);
        assert_eq!(watch.rtt(A), Some(MS(5)));
        // No second round before the interval is over.
        assert!(watch.poll_probes(t0 + MS(1_999)).is_empty());
        assert_eq!(watch.poll_probes(t0 + I).len(), 2);
    }

    #[test]
    fn an_answer_after_its_deadline_is_lost_and_ignored() {
        let mut watch = ProbeWatch::new(I);
        watch.set_peers(&[(A, addr(1))]);
        let t0 = Instant::now();
        let seq = watch.poll_probes(t0)[0].seq;
        let late = t0 + answer_deadline(I);
        assert!(watch.judge(late).is_empty());
        assert_eq!(watch.lost(A), Some(1));
        assert_eq!(watch.handle_answer(late, addr(1), seq), None);
        assert_eq!(watch.path_up(A), None, "a late answer proves nothing");
    }

    #[test]
    fn a_peer_removed_or_moved_starts_afresh() {
        let mut sim = Sim::new();
        sim.run(20_000, |sent| (sent < 5_000).then_some(sent + 10));
        assert_eq!(sim.watch.path_up(A), Some(false));
        // Gone from the device: forgotten, with its probes in flight.
        sim.watch.set_peers(&[]);
        assert_eq!(sim.watch.path_up(A), None);
        assert!(sim.watch.in_flight.is_empty());
        // Back: not judged until it answers, and no "up" for a path it
        // was forgotten in.
        sim.watch.set_peers(&[(A, addr(1))]);
        assert_eq!(sim.watch.path_up(A), None);
        assert_eq!(sim.watch.lost(A), Some(0));
        let events = sim.run(30_000, |sent| Some(sent + 10));
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(sim.watch.path_up(A), Some(true));
        // At another address (its /64 changed): afresh as well.
        sim.watch.set_peers(&[(A, addr(3))]);
        assert_eq!(sim.watch.path_up(A), None);
    }

    #[test]
    fn many_peers_get_one_probe_each_with_sequences_of_their_own() {
        let mut watch = ProbeWatch::new(I);
        let keys: Vec<String> = (0..500).map(|i| format!("k{i}")).collect();
        let peers: Vec<(&str, Ipv6Addr)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), addr(i as u16)))
            .collect();
        watch.set_peers(&peers);
        let t0 = Instant::now();
        let mut seqs = std::collections::HashSet::new();
        for round in 0..3u32 {
            let probes = watch.poll_probes(t0 + I * round);
            assert_eq!(probes.len(), 500);
            for p in probes {
                assert!(seqs.insert(p.seq), "sequence {} twice", p.seq);
            }
        }
    }
}
