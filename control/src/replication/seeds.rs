//! Bootstrap peers as configured (`host:port`), and what to do while no
//! member answers: resolve the names again and say so in the log.
//!
//! A name that does not resolve at start (edgeproxy started before the
//! resolver or the network was up) must not leave the POP isolated for
//! good, and a POP that never joins must not stay silent: while the node
//! has no member, the driver resolves every name again on each tick and
//! hands the node the addresses when they change, and a warning naming the
//! peers tried is due a few gossip intervals after the node found itself
//! alone, then once a minute.
//!
//! Sans-IO: the driver resolves (off its event loop) and logs; this decides
//! when, and keeps the results.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Gossip intervals without any member before the first warning.
const WARN_AFTER_INTERVALS: u32 = 5;
/// Then at most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(60);

/// The configured bootstrap peers and their last resolution.
#[derive(Debug)]
pub struct Seeds {
    names: Vec<String>,
    /// Per name (same order): its address, or why it has none.
    resolved: Vec<Result<SocketAddr, String>>,
    warn_after: Duration,
    /// Since when the node has had no member (`None`: it has some).
    alone_since: Option<Instant>,
    last_warning: Option<Instant>,
    ever_joined: bool,
    /// A resolution is under way (its results not in yet).
    resolving: bool,
    /// This POP's own gossip address: fleets often give every POP the same
    /// list, this one included; it is no peer to wait for.
    own: Option<SocketAddr>,
    /// Bootstrap peers that answered but were refused, or refused this
    /// POP (a wrong secret or cluster name), with the last reason: they
    /// did answer, and the warning says why they are no member.
    refused: HashMap<SocketAddr, String>,
}

impl Seeds {
    /// `names` with their resolution at start (`resolved[i]` for
    /// `names[i]`); `now` is the start.
    pub fn new(
        names: Vec<String>,
        resolved: Vec<Result<SocketAddr, String>>,
        now: Instant,
        gossip_interval: Duration,
    ) -> Seeds {
        debug_assert_eq!(names.len(), resolved.len());
        Seeds {
            names,
            resolved,
            warn_after: gossip_interval * WARN_AFTER_INTERVALS,
            alone_since: Some(now),
            last_warning: None,
            ever_joined: false,
            resolving: false,
            own: None,
            refused: HashMap::new(),
        }
    }

    /// This POP's own (advertised) gossip address: a name resolving to it is
    /// left out of the warnings.
    pub fn with_own_addr(mut self, own: SocketAddr) -> Seeds {
        self.own = Some(own);
        self
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The addresses of the names that resolved.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.resolved
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect()
    }

    /// A datagram from `from` was refused, or `from` refused ours, for
    /// `why`. Kept for the bootstrap peers only, until the node joins.
    pub fn refused(&mut self, from: SocketAddr, why: &str) {
        if self.alone_since.is_some() && self.addrs().contains(&from) {
            self.refused.insert(from, why.to_string());
        }
    }

    /// Called on every tick with the node's count of live members. True
    /// when the names should be resolved again now (the caller then hands
    /// the results to [`Seeds::resolved`]).
    pub fn tick(&mut self, now: Instant, members: usize) -> bool {
        if members > 0 {
            self.alone_since = None;
            self.last_warning = None;
            self.refused.clear();
            self.ever_joined = true;
            return false;
        }
        self.alone_since.get_or_insert(now);
        if self.resolving || self.names.is_empty() {
            return false;
        }
        self.resolving = true;
        true
    }

    /// A resolution's results, per name in order. Returns the addresses
    /// when they differ from the previous ones (the node should knock on
    /// them).
    pub fn resolved(
        &mut self,
        results: Vec<Result<SocketAddr, String>>,
    ) -> Option<Vec<SocketAddr>> {
        self.resolving = false;
        if results.len() != self.names.len() {
            return None;
        }
        let before = self.addrs();
        self.resolved = results;
        let after = self.addrs();
        (after != before).then_some(after)
    }

    /// The warning to log now, if one is due: the node has had no member
    /// for a few gossip intervals (and the last warning is a minute old).
    pub fn warning(&mut self, now: Instant) -> Option<String> {
        let since = self.alone_since?;
        if now.duration_since(since) < self.warn_after {
            return None;
        }
        if self
            .last_warning
            .is_some_and(|at| now.duration_since(at) < WARN_EVERY)
        {
            return None;
        }
        self.last_warning = Some(now);
        let secs = now.duration_since(since).as_secs();
        let others: Vec<(&String, &Result<SocketAddr, String>)> = self
            .names
            .iter()
            .zip(&self.resolved)
            .filter(|(_, r)| !matches!(r, Ok(a) if Some(*a) == self.own))
            .collect();
        if others.is_empty() {
            // A first POP may rightly wait for the others to join through
            // it; it is still alone, which the operator should know.
            let why = match self.names.is_empty() {
                true => "no bootstrap_peers are configured",
                false => "its only bootstrap peer is this POP itself",
            };
            return Some(format!(
                "replication: no other member after {secs} s; {why}, \
                 so this POP waits for another one to join through it"
            ));
        }
        // A peer that refused (a wrong secret) is not "no answer": that
        // sends the operator looking for a firewall.
        let outcome = |a: &SocketAddr| match self.refused.get(a) {
            Some(why) => format!("refused: {why}"),
            None => "no answer".to_string(),
        };
        let any_refused = others
            .iter()
            .any(|(_, r)| matches!(r, Ok(a) if self.refused.contains_key(a)));
        let tried = {
            let list: Vec<String> = others
                .into_iter()
                .map(|(name, r)| match r {
                    Ok(a) if name == &a.to_string() => format!("{name} ({})", outcome(a)),
                    Ok(a) => format!("{name} = {a} ({})", outcome(a)),
                    Err(e) => format!("{name} (cannot resolve: {e})"),
                })
                .collect();
            format!("tried {}", list.join(", "))
        };
        let headline = match any_refused {
            true => "no bootstrap peer let this POP in",
            false => "no bootstrap peer answered",
        };
        Some(if self.ever_joined {
            format!("replication: no other member for {secs} s; {tried}")
        } else {
            format!("replication: not joined yet after {secs} s: {headline}; {tried}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_secs(1);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The driver's use: on each tick, resolve when asked (here by a
    /// resolver injected by the test) and collect the warnings.
    fn run(
        seeds: &mut Seeds,
        at: Instant,
        members: usize,
        resolve: impl Fn(&str) -> Result<SocketAddr, String>,
    ) -> (Option<Vec<SocketAddr>>, Option<String>) {
        let mut changed = None;
        if seeds.tick(at, members) {
            let results = seeds.names().iter().map(|n| resolve(n)).collect();
            changed = seeds.resolved(results);
        }
        (changed, seeds.warning(at))
    }

    /// QA: a POP with another cluster's secret said "no bootstrap peer
    /// answered … (no answer)" while the peers answered and refused it.
    #[test]
    fn a_bootstrap_peer_that_refused_this_pop_is_not_called_silent() {
        let t0 = Instant::now();
        let names = vec!["10.0.0.1:4001".to_string(), "10.0.0.2:4001".to_string()];
        let resolved = vec![Ok(addr("10.0.0.1:4001")), Ok(addr("10.0.0.2:4001"))];
        let mut seeds = Seeds::new(names, resolved, t0, TICK);
        let secret = "authentication failed: the peer does not hold this cluster's secret";
        seeds.refused(addr("10.0.0.1:4001"), secret);
        // Not a bootstrap peer: not listed.
        seeds.refused(addr("10.0.0.7:4001"), "peer belongs to cluster \"x\"");
        let w = seeds.warning(t0 + TICK * 6).expect("a warning");
        assert!(
            w.starts_with(
                "replication: not joined yet after 6 s: no bootstrap peer let this POP in;"
            ),
            "{w}"
        );
        assert!(
            w.contains(&format!("10.0.0.1:4001 (refused: {secret})")),
            "{w}"
        );
        assert!(w.contains("10.0.0.2:4001 (no answer)"), "{w}");
        assert!(!w.contains("10.0.0.7"), "{w}");
        // Forgotten once the POP has joined.
        seeds.tick(t0 + TICK * 7, 1);
        seeds.tick(t0 + TICK * 8, 0);
        let w = seeds.warning(t0 + TICK * 20).expect("a warning");
        assert!(w.contains("10.0.0.1:4001 (no answer)"), "{w}");
    }

    #[test]
    fn a_name_that_resolves_only_later_is_resolved_again_until_it_does() {
        let t0 = Instant::now();
        let names = vec!["seed.test:4001".to_string(), "10.0.0.9:4001".to_string()];
        let first = vec![
            Err("temporary failure".to_string()),
            Ok(addr("10.0.0.9:4001")),
        ];
        let mut seeds = Seeds::new(names, first, t0, TICK);
        assert_eq!(seeds.addrs(), vec![addr("10.0.0.9:4001")]);
        let dns_down = |n: &str| match n {
            "seed.test:4001" => Err("temporary failure".to_string()),
            other => Ok(other.parse().unwrap()),
        };
        let dns_up = |n: &str| match n {
            "seed.test:4001" => Ok(addr("10.0.0.1:4001")),
            other => Ok(other.parse().unwrap()),
        };
        for s in 1..4 {
            let (changed, _) = run(&mut seeds, t0 + TICK * s, 0, dns_down);
            assert_eq!(changed, None, "nothing new to knock on");
        }
        let (changed, _) = run(&mut seeds, t0 + TICK * 4, 0, dns_up);
        assert_eq!(
            changed,
            Some(vec![addr("10.0.0.1:4001"), addr("10.0.0.9:4001")]),
            "the node is handed the new address"
        );
        // Joined: no more resolving.
        assert!(!seeds.tick(t0 + TICK * 5, 1));
        // Alone again (every member went down): resolved again.
        assert!(seeds.tick(t0 + TICK * 6, 0));
    }

    #[test]
    fn one_resolution_at_a_time() {
        let t0 = Instant::now();
        let mut seeds = Seeds::new(vec!["a:1".into()], vec![Err("x".into())], t0, TICK);
        assert!(seeds.tick(t0 + TICK, 0));
        assert!(
            !seeds.tick(t0 + TICK * 2, 0),
            "the first is still under way"
        );
        seeds.resolved(vec![Err("x".into())]);
        assert!(seeds.tick(t0 + TICK * 3, 0));
    }

    #[test]
    fn a_node_alone_warns_after_a_few_intervals_then_once_a_minute() {
        let t0 = Instant::now();
        let names = vec!["seed.test:4001".to_string(), "10.0.0.99:4001".to_string()];
        let first = vec![
            Err("temporary failure".to_string()),
            Ok(addr("10.0.0.99:4001")),
        ];
        let mut seeds = Seeds::new(names, first.clone(), t0, TICK);
        let same = |n: &str| match n {
            "seed.test:4001" => Err("temporary failure".to_string()),
            other => Ok(other.parse().unwrap()),
        };
        let mut warnings = Vec::new();
        for s in 1..=130 {
            if let (_, Some(w)) = run(&mut seeds, t0 + TICK * s, 0, same) {
                warnings.push((s, w));
            }
        }
        let at: Vec<u32> = warnings.iter().map(|(s, _)| *s).collect();
        assert_eq!(at, vec![5, 65, 125]);
        let w = &warnings[0].1;
        assert!(w.starts_with("replication: not joined yet"), "{w}");
        assert!(
            w.contains("seed.test:4001 (cannot resolve: temporary failure)"),
            "{w}"
        );
        assert!(w.contains("10.0.0.99:4001 (no answer)"), "{w}");
        // A member appears: silent; gone again: a warning a few intervals
        // later, saying it had joined before.
        assert_eq!(run(&mut seeds, t0 + TICK * 131, 1, same).1, None);
        let mut later = Vec::new();
        for s in 132..=140 {
            if let (_, Some(w)) = run(&mut seeds, t0 + TICK * s, 0, same) {
                later.push((s, w));
            }
        }
        assert_eq!(later.len(), 1, "{later:?}");
        assert_eq!(later[0].0, 137);
        assert!(later[0]
            .1
            .starts_with("replication: no other member for 5 s"));
    }

    #[test]
    fn a_node_without_bootstrap_peers_says_it_waits() {
        let t0 = Instant::now();
        let mut seeds = Seeds::new(Vec::new(), Vec::new(), t0, TICK);
        assert!(!seeds.tick(t0 + TICK * 5, 0), "nothing to resolve");
        let w = seeds.warning(t0 + TICK * 5).expect("a warning");
        assert!(
            w.contains("waits for another one to join through it"),
            "{w}"
        );
        assert!(!w.contains("no bootstrap peer answered"), "{w}");
    }

    /// QA: every POP given the same list, this one included, named its own
    /// address among the peers that did not answer.
    #[test]
    fn this_pops_own_address_is_no_peer_in_the_warning() {
        let t0 = Instant::now();
        let names = vec!["10.0.0.1:4001".into(), "pop-b:4001".into()];
        let resolved = vec![Ok(addr("10.0.0.1:4001")), Ok(addr("10.0.0.2:4001"))];
        let mut seeds =
            Seeds::new(names.clone(), resolved, t0, TICK).with_own_addr(addr("10.0.0.1:4001"));
        let w = seeds.warning(t0 + TICK * 5).expect("a warning");
        assert!(w.contains("pop-b:4001 = 10.0.0.2:4001 (no answer)"), "{w}");
        assert!(!w.contains("10.0.0.1"), "{w}");
        // Its own address alone: it waits, and says why.
        let mut alone = Seeds::new(
            vec!["10.0.0.1:4001".into()],
            vec![Ok(addr("10.0.0.1:4001"))],
            t0,
            TICK,
        )
        .with_own_addr(addr("10.0.0.1:4001"));
        let w = alone.warning(t0 + TICK * 5).expect("a warning");
        assert!(
            w.contains("its only bootstrap peer is this POP itself"),
            "{w}"
        );
    }

    #[test]
    fn a_node_with_members_never_warns() {
        let t0 = Instant::now();
        let mut seeds = Seeds::new(vec!["a:1".into()], vec![Err("x".into())], t0, TICK);
        for s in 1..100 {
            assert_eq!(
                run(&mut seeds, t0 + TICK * s, 2, |_| Err("x".into())),
                (None, None)
            );
        }
    }
}
