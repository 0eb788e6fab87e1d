//! Cluster membership: SWIM (failure detection and dissemination) by foca,
//! whose state machine does no I/O. This module is its runtime: it turns
//! foca's three callbacks (send a packet, schedule a timer, notify) into
//! data — packets and events to drain, timers kept in a queue — so that the
//! node core stays sans-IO and a simulation can drive it with fake time.
//!
//! A member's identity is its gossip address (what SWIM probes) plus its node
//! id, transport address and a generation (its start time): a node that
//! restarts on the same address comes back as a newer generation and
//! replaces its old self, and one that was wrongly declared down rejoins by
//! renewing its generation on its own.
//!
//! One rule is added to foca's: a suspicion ends. foca declares a suspect
//! down only from the timer of the member whose probe failed, and drops
//! that timer when the member renews its own identity or finds itself
//! alone; every other member just keeps the suspect flag it heard. If the
//! suspect never heard it was suspected (the few transmissions of the
//! suspicion went elsewhere or were lost), it never refutes, answers every
//! probe, and stays "suspect" everywhere for good. So, as in the SWIM
//! paper, every member times a suspicion it holds: one still unrefuted a
//! probe period after foca's own timeout is declared down here, and the
//! member rejoins at once as a renewed identity (see [`Peer::renews`]).
//!
//! And one of foca's messages is held back: "you are down" (`TurnUndead`)
//! to a member this node holds alive or suspect. foca sends it from a
//! suspicion's timer whether or not the member refuted in the meantime (the
//! verdict is not applied, the message goes anyway), and the member, told
//! it is down, renews its identity: the whole cluster saw it go down and
//! come back although it had answered in time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use foca::{
    Codec, Foca, Identity, Incarnation, Member, Message, NoCustomBroadcast, Notification,
    PostcardCodec, Runtime, State, Timer,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::version::NodeId;

/// A member of the cluster as SWIM knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    pub id: NodeId,
    /// Where it gossips (advertised): SWIM's address of the member.
    pub gossip: SocketAddr,
    /// Where its QUIC transport listens (advertised).
    pub transport: SocketAddr,
    /// Start time (Unix ms), bumped when it rejoins after being declared down.
    pub generation: u64,
}

impl Peer {
    /// True when this identity is `old` renewed (it refuted being declared
    /// down: the same process, generation bumped by one per refutation), not
    /// a restart (a new process: its generation is its start time in Unix
    /// ms, far above). Told apart so that a healed partition does not log
    /// "member restarted" for members that never did.
    pub fn renews(&self, old: &Peer) -> bool {
        /// Refutations one process may plausibly make; a restart's
        /// generation is at least a start time later.
        const MAX_RENEWALS: u64 = 1000;
        self.id == old.id
            && self.gossip == old.gossip
            && self.generation > old.generation
            && self.generation - old.generation <= MAX_RENEWALS
    }
}

impl Identity for Peer {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Peer {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    /// Between identities of one id, the newer generation (a restart or a
    /// renewal). Between two ids claiming one gossip address (a POP whose
    /// `advertise_addr` names another POP's address), the one already
    /// known keeps it. Were the later start to win, the POP that really
    /// lives there would be replaced in every view and, told it was down,
    /// renew itself by one generation per round trip until it outnumbered
    /// the other's start time in ms (a minute's start gap: a minute locked
    /// out, about a thousand rejoins and log lines a second). A down
    /// identity still gives the address up to the one that talks from it
    /// ([`Membership::handle_packet`]).
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.id != adversary.id || self.generation > adversary.generation
    }
}

/// What changed in the membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    Up(Peer),
    Down(Peer),
    /// A member came back as a new generation (a restart).
    Replaced {
        old: Peer,
        new: Peer,
    },
    /// This node is known to the cluster (joined, or rejoined).
    Joined,
    /// Every other member is gone or down.
    Alone,
    /// This node was declared down and rejoined as a new generation.
    Rejoined,
    /// `claimant`, another id, says it is at the gossip address of
    /// `holder`, a live member: it is ignored while `holder` lives.
    AddressTaken {
        holder: Peer,
        claimant: Peer,
    },
}

/// A member's state now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Alive,
    Suspect,
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
        }
    }
}

type Swim = Foca<Peer, PostcardCodec, StdRng, NoCustomBroadcast>;

/// Membership of one node: foca plus its runtime.
pub struct Membership {
    foca: Swim,
    timers: BTreeMap<(Instant, u64), Timer<Peer>>,
    next_timer: u64,
    sends: Vec<(SocketAddr, Vec<u8>)>,
    events: Vec<MemberEvent>,
    /// "You are down" messages foca asked to send during the current call,
    /// sent only if the member is not active once the call returns.
    turn_undead: Vec<(Peer, Vec<u8>)>,
    /// Suspects as this node holds them, by gossip address: who, at which
    /// incarnation, and when the suspicion expires here.
    suspicions: BTreeMap<SocketAddr, Suspicion>,
    /// How long a suspicion may last here: foca's `suspect_to_down_after`
    /// plus a probe period, so that the verdict of the member that raised
    /// it (its timer, then its "down" gossip) comes first when it can.
    suspicion_timeout: Duration,
    /// foca errors seen (decode failures, late timers): counted, not fatal.
    pub errors: u64,
}

#[derive(Debug, Clone)]
struct Suspicion {
    peer: Peer,
    incarnation: Incarnation,
    expires: Instant,
}

/// Collects what foca asks for during one call.
struct Collect<'a> {
    now: Instant,
    timers: &'a mut BTreeMap<(Instant, u64), Timer<Peer>>,
    next_timer: &'a mut u64,
    sends: &'a mut Vec<(SocketAddr, Vec<u8>)>,
    events: &'a mut Vec<MemberEvent>,
    turn_undead: &'a mut Vec<(Peer, Vec<u8>)>,
}

impl Runtime<Peer> for Collect<'_> {
    fn notify(&mut self, notification: Notification<'_, Peer>) {
        let event = match notification {
            Notification::MemberUp(p) => MemberEvent::Up(p.clone()),
            Notification::MemberDown(p) => MemberEvent::Down(p.clone()),
            Notification::Rename(old, new) => MemberEvent::Replaced {
                old: old.clone(),
                new: new.clone(),
            },
            Notification::Active => MemberEvent::Joined,
            Notification::Idle => MemberEvent::Alone,
            Notification::Rejoin(_) => MemberEvent::Rejoined,
            // Identities renew themselves, so foca rejoins instead of
            // going defunct.
            _ => return,
        };
        self.events.push(event);
    }

    fn send_to(&mut self, to: Peer, data: &[u8]) {
        let turn_undead = Codec::<Peer>::decode_header(&mut PostcardCodec, data)
            .is_ok_and(|h| h.message == Message::TurnUndead);
        if turn_undead {
            self.turn_undead.push((to, data.to_vec()));
        } else {
            self.sends.push((to.gossip, data.to_vec()));
        }
    }

    fn submit_after(&mut self, event: Timer<Peer>, after: Duration) {
        *self.next_timer += 1;
        self.timers
            .insert((self.now + after, *self.next_timer), event);
    }
}

impl Membership {
    /// `seed` seeds foca's choice of members to probe (random in
    /// production, fixed in simulations).
    pub fn new(me: Peer, config: foca::Config, seed: u64) -> Membership {
        Membership {
            suspicions: BTreeMap::new(),
            suspicion_timeout: config.suspect_to_down_after + config.probe_period,
            foca: Foca::new(me, config, StdRng::seed_from_u64(seed), PostcardCodec),
            timers: BTreeMap::new(),
            next_timer: 0,
            sends: Vec::new(),
            events: Vec::new(),
            turn_undead: Vec::new(),
            errors: 0,
        }
    }

    fn run<T>(&mut self, now: Instant, f: impl FnOnce(&mut Swim, Collect<'_>) -> T) -> T {
        let rt = Collect {
            now,
            timers: &mut self.timers,
            next_timer: &mut self.next_timer,
            sends: &mut self.sends,
            events: &mut self.events,
            turn_undead: &mut self.turn_undead,
        };
        let result = f(&mut self.foca, rt);
        for (to, data) in std::mem::take(&mut self.turn_undead) {
            // Nor to one that lost its address to a live member of
            // another id: it was not declared down, and renewing itself
            // cannot win the address back.
            let active = self
                .foca
                .iter_members()
                .any(|m| m.id() == &to || (m.id().gossip == to.gossip && m.id().id != to.id));
            if !active {
                self.sends.push((to.gossip, data));
            }
        }
        self.track_suspicions(now);
        result
    }

    /// Notes new suspicions (a new suspect, or a suspect at a new
    /// incarnation) and forgets those that ended.
    fn track_suspicions(&mut self, now: Instant) {
        let mut held = BTreeMap::new();
        for m in self.foca.iter_membership_state() {
            if m.state() != State::Suspect {
                continue;
            }
            let peer = m.id();
            let suspicion = match self.suspicions.remove(&peer.gossip) {
                Some(s) if s.peer == *peer && s.incarnation == m.incarnation() => s,
                _ => Suspicion {
                    peer: peer.clone(),
                    incarnation: m.incarnation(),
                    expires: now + self.suspicion_timeout,
                },
            };
            held.insert(peer.gossip, suspicion);
        }
        self.suspicions = held;
    }

    /// Declares down the suspects whose suspicion expired here unrefuted.
    fn expire_suspicions(&mut self, now: Instant) {
        let expired: Vec<Member<Peer>> = self
            .suspicions
            .values()
            .filter(|s| s.expires <= now)
            .map(|s| Member::new(s.peer.clone(), s.incarnation, State::Down))
            .collect();
        if expired.is_empty() {
            return;
        }
        if self
            .run(now, |f, rt| f.apply_many(expired.into_iter(), true, rt))
            .is_err()
        {
            self.errors += 1;
        }
        // Should foca have refused a verdict, try again a timeout later
        // rather than wake up for it at once, forever.
        let later = now + self.suspicion_timeout;
        for s in self.suspicions.values_mut().filter(|s| s.expires <= now) {
            s.expires = later;
        }
    }

    pub fn me(&self) -> &Peer {
        self.foca.identity()
    }

    /// Asks the member at `gossip` (known only by address: a bootstrap
    /// peer) to let us in.
    pub fn announce(&mut self, now: Instant, gossip: SocketAddr) {
        let placeholder = Peer {
            id: NodeId::from(""),
            gossip,
            transport: gossip,
            generation: 0,
        };
        if self.run(now, |f, rt| f.announce(placeholder, rt)).is_err() {
            self.errors += 1;
        }
    }

    /// A SWIM packet from the network (already authenticated).
    pub fn handle_packet(&mut self, now: Instant, packet: &[u8]) -> Result<(), foca::Error> {
        if let Ok(header) = Codec::<Peer>::decode_header(&mut PostcardCodec, packet) {
            let src = header.src;
            let holder = self
                .foca
                .iter_membership_state()
                .find(|m| m.id().gossip == src.gossip && m.id().id != src.id)
                .map(|m| (m.id().clone(), m.state()));
            match holder {
                // A down identity of another id (a POP that claimed this
                // address by mistake, or the one that lived here before)
                // gives way to the one talking from it now.
                Some((down, State::Down)) => self.remove_down(now, &down),
                Some((holder, _)) => self.events.push(MemberEvent::AddressTaken {
                    holder,
                    claimant: src,
                }),
                None => {}
            }
        }
        let result = self.run(now, |f, rt| f.handle_data(packet, rt));
        if result.is_err() {
            self.errors += 1;
        }
        result
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            if self.run(now, |f, rt| f.handle_timer(timer, rt)).is_err() {
                self.errors += 1;
            }
        }
        self.expire_suspicions(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.keys().next().map(|(at, _)| *at);
        let suspicion = self.suspicions.values().map(|s| s.expires).min();
        timer.into_iter().chain(suspicion).min()
    }

    /// Packets to send: (gossip address, SWIM packet).
    pub fn take_sends(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.sends)
    }

    pub fn take_events(&mut self) -> Vec<MemberEvent> {
        std::mem::take(&mut self.events)
    }

    /// Members alive or suspected (not down), not including this node.
    pub fn active(&self) -> impl Iterator<Item = &Peer> + '_ {
        self.foca.iter_members().map(|m| m.id())
    }

    pub fn active_count(&self) -> usize {
        self.foca.num_members()
    }

    /// Every member foca remembers, down ones included, with its state.
    pub fn states(&self) -> Vec<(Peer, MemberState)> {
        self.foca
            .iter_membership_state()
            .map(|m| {
                let state = match m.state() {
                    State::Alive => MemberState::Alive,
                    State::Suspect => MemberState::Suspect,
                    State::Down => MemberState::Down,
                };
                (m.id().clone(), state)
            })
            .collect()
    }

    /// Drops a member declared down from the view (a POP forgotten for
    /// good): foca stops knocking on it and no longer lists it. A member
    /// that is alive or suspect is left alone, and one that comes back
    /// later joins as any new member does.
    pub fn remove_down(&mut self, now: Instant, peer: &Peer) {
        let timer = Timer::RemoveDown(peer.clone());
        if self.run(now, |f, rt| f.handle_timer(timer, rt)).is_err() {
            self.errors += 1;
        }
    }

    /// Tells a few members we are leaving (a clean shutdown), so they mark
    /// us down at once instead of after the suspicion timeout.
    pub fn leave(&mut self, now: Instant) {
        if self.run(now, |f, rt| f.leave_cluster(rt)).is_err() {
            self.errors += 1;
        }
    }
}

/// foca settings for a cluster of about `size` POPs, from the probe period
/// (`gossip_interval`).
///
/// Tuned for the goal "a dead member is reported within 5 s, with no false
/// positive at 1 % loss on 50 ms links": a probe each period, a direct reply
/// expected within `probe_rtt` (the link's round trip with margin), three
/// indirect probes after that (a false suspicion needs the direct probe and
/// all three indirect paths to lose a packet), and a suspect declared down
/// 2 periods later unless it refutes. Detection then takes about one period
/// until some member probes the dead one plus the suspicion time.
pub fn swim_config(size: usize, period: Duration) -> foca::Config {
    let size = std::num::NonZeroU32::new(size.max(1) as u32).expect("at least 1");
    let mut c = foca::Config::new_lan(size);
    c.probe_period = period;
    c.probe_rtt = (period * 2 / 5).max(Duration::from_millis(1));
    c.suspect_to_down_after = period * 2;
    // A suspect refutes only once the suspicion reaches it, on the updates
    // piggybacked on a few messages. foca's preset sends each update
    // log10(n+1)*4 times: twice in 3 POPs, often both to the member that
    // raised it or across the very link that failed. With one link of a
    // 3-POP cluster down (the others reaching both ends), a member was
    // declared down about every 30 s; six times, never in the simulation.
    // Bytes only while something changes.
    c.max_transmissions = c
        .max_transmissions
        .max(std::num::NonZeroU8::new(6).expect("non-zero"));
    // Down members are remembered for a day: a member that reappears with
    // the same generation (a partition healing) is not taken back before
    // it renews itself, which it does on its own.
    c.remove_down_after = Some(Duration::from_secs(24 * 3600));
    // Room for the seal's header and tag within one 1280-byte IPv6 packet.
    c.max_packet_size = std::num::NonZeroUsize::new(1100).expect("non-zero");
    c.periodic_gossip = Some(foca::PeriodicParams {
        frequency: period / 2,
        num_members: std::num::NonZeroUsize::new(3).expect("non-zero"),
    });
    // A member that joined through one peer learns the rest from its
    // announcements' answers (a packet of members each): every 10 s keeps
    // the full roster of a 100-node cluster within a minute of a mass start
    // and costs a 3-5 POP cluster a few hundred bytes.
    c.periodic_announce = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(10),
        num_members: std::num::NonZeroUsize::new(1).expect("non-zero"),
    });
    // How a healed partition finds its way back: each side keeps knocking
    // on the members it declared down, and they rejoin as soon as a knock
    // gets through. Only costs packets while some member is down.
    c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(1),
        num_members: std::num::NonZeroUsize::new(2).expect("non-zero"),
    });
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(generation: u64) -> Peer {
        Peer {
            id: NodeId::from("node-1"),
            gossip: "10.0.0.1:4001".parse().unwrap(),
            transport: "10.0.0.1:4002".parse().unwrap(),
            generation,
        }
    }

    /// After a healed partition the majority logged "member restarted" for
    /// members that had only refuted a suspicion.
    #[test]
    fn a_refutation_is_a_renewal_and_a_new_process_is_a_restart() {
        let started = peer(1_800_000_000_000);
        let renewed = started.renew().unwrap();
        assert!(renewed.renews(&started));
        assert!(renewed.renew().unwrap().renews(&started));
        let restarted = peer(1_800_000_060_000);
        assert!(!restarted.renews(&started));
        assert!(
            !started.renews(&renewed),
            "an older identity renews nothing"
        );
        let moved = Peer {
            gossip: "10.0.0.2:4001".parse().unwrap(),
            ..renewed
        };
        assert!(!moved.renews(&started));
    }
}
