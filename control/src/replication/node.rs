//! One node of the replication cluster, without I/O.
//!
//! The node ties together membership (SWIM, `membership`), the replicated
//! rows (`replica`), the clock (`hlc`) and the two paths by which a change
//! reaches every node, kept apart as Corrosion does:
//!
//! - **Broadcast**: a local change is pushed at once (after a batching delay
//!   of a few milliseconds, never a multi-second timer) to every member in a
//!   small cluster, or to a few random members in a large one, each of which
//!   forwards what was new to it to a few more (an epidemic: per-node cost
//!   grows with log N).
//! - **Anti-entropy**: every sync interval the node compares digests with one
//!   random member and exchanges only the rows that differ, bounded per
//!   exchange. It repairs whatever a broadcast missed (loss, a partition, a
//!   node that was down) without any node keeping a log of who got what.
//!
//! Call order (the driver, or a simulation): feed inputs with
//! `handle_datagram` (gossip), `handle_message` (transport), `local_write`
//! (rows changed in this node's database) and `handle_timeout` when
//! `poll_timeout` says so; after each, drain `poll_output` until `None`:
//! datagrams and messages to send, rows to persist, events to log. Time
//! (monotonic and wall) is always passed in.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::hlc::{Hlc, HlcClock};
use super::membership::{swim_config, MemberEvent, MemberState, Membership, Peer};
use super::replica::{Merge, Replica};
use super::seal::{Kind, Refused, Sealer};
use super::sync_budget::SyncBudget;
use super::version::{only_verdicts_differ, NodeId, RowKey, RowVersion, Stamp, Table, Version};
use super::wire::{self, Envelope, Msg, PROTOCOL};

pub use super::sync_budget::limits;

/// In clusters up to this size a change goes straight to every member (one
/// link delay); above it, to [`fanout`] random members who forward it.
pub const DIRECT_LIMIT: usize = 16;
/// How many times a change may be forwarded on the epidemic path.
pub const MAX_HOPS: u8 = 6;
/// A sync exchange whose next step has not arrived by then is forgotten
/// (what still arrives of it counts; see `Msg::SyncRows`).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a node with members announces itself to the bootstrap peers
/// that are not among them: see [`Node::knock_on_strangers`].
pub const STRANGER_KNOCK_INTERVAL: Duration = Duration::from_secs(10);
/// Members (besides the bootstrap peers) a node with no member answering
/// announces itself to, every gossip interval: see [`Node::announce`].
const KNOCK_ON_KNOWN: usize = 3;
/// How often old tombstones are collected.
const GC_INTERVAL: Duration = Duration::from_secs(60);

/// How often the driver persists the last contact (at most): the value a
/// restart reads may be this much older than the previous run's last one.
pub const CONTACT_PERSIST_EVERY: Duration = Duration::from_secs(60);

/// Tombstones are kept for a member that is down (see `Absences::owed`) for at
/// most this many TTLs: a POP down for that long and never forgotten
/// (`cluster forget`) no longer holds deletions back.
pub const MAX_HOLD_TTLS: u64 = 4;

/// Tombstones written this long before a member was declared down are kept
/// for it too: it may have been cut off for a while before the verdict.
const OWED_MARGIN: Duration = Duration::from_secs(60);
/// A peer that keeps talking to us although refused hears why at most this
/// often.
const REFUSAL_REPLY_INTERVAL: Duration = Duration::from_secs(5);
/// Refusal label (logs, `refused_total`) of a peer claiming a node id that
/// another live member holds.
pub const DUPLICATE_ID: &str = "duplicate_id";
/// Gossip intervals an id must stay claimed twice before it is reported:
/// longer than SWIM takes to declare a dead member down (about one
/// interval to probe it plus two of suspicion), so that a POP restarted at
/// a new address with its id is not reported while its old identity dies.
const COLLISION_GRACE: u32 = 6;

/// Members each node forwards a change to on the epidemic path: about ln N
/// plus a margin, so that the chance a node is missed (≈ e^-fanout) stays
/// below one in a few hundred; anti-entropy catches those.
pub fn fanout(members: usize) -> usize {
    ((members.max(1) as f64).ln().ceil() as usize + 2).min(members)
}

/// Time, passed in: monotonic for timers, wall (Unix ms) for the clock.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall_ms: u64,
}

impl Now {
    pub fn system() -> Now {
        Now {
            mono: Instant::now(),
            wall_ms: crate::routing::unix_ms(std::time::SystemTime::now()).max(0) as u64,
        }
    }
}

/// A node's fixed settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub id: NodeId,
    pub cluster: String,
    /// The schema version every peer must share.
    pub schema: u32,
    /// Advertised addresses.
    pub gossip_addr: SocketAddr,
    pub transport_addr: SocketAddr,
    /// Start time (Unix ms): tells this run from the previous one.
    pub generation: u64,
    /// SWIM probe period.
    pub gossip_interval: Duration,
    /// Anti-entropy period.
    pub sync_interval: Duration,
    /// How long local changes are gathered before they are broadcast.
    pub broadcast_delay: Duration,
    /// Cluster size the SWIM settings are tuned for.
    pub expected_size: usize,
    /// Tombstones older than this are collected.
    pub tombstone_ttl: Duration,
    /// `None`: insecure (gossip neither encrypted nor authenticated).
    pub gossip_key: Option<[u8; 32]>,
    /// A second key gossip is opened with, never sealed with (a secret
    /// being rotated: `replication.accept_secret`).
    pub accepted_gossip_key: Option<[u8; 32]>,
    /// Seeds every random choice (fixed in simulations).
    pub seed: u64,
}

/// Something to act on or to report.
#[derive(Debug)]
pub enum Output {
    /// Send a gossip datagram.
    Datagram {
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Send a transport message.
    Message {
        to: SocketAddr,
        kind: &'static str,
        bytes: Vec<u8>,
    },
    /// Write these rows (remote writes that won) to the database, in one
    /// transaction; if that fails, hand the batch back to
    /// [`Node::persist_failed`].
    Persist(Persist),
    /// Delete these collected tombstones from the database.
    Forget(Vec<RowKey>),
    /// Write this node's own `pops` row now, held back until the cluster's
    /// copy could arrive (see [`Node::hold_own_row`]): its identity as this
    /// start has it, its operator columns (`draining`) from the copy that
    /// the database holds by now, if one arrived.
    WriteOwnRow(OwnRowDue),
    Event(Event),
}

/// Why a held own row is due (see [`Node::hold_own_row`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnRowDue {
    /// The cluster's copy arrived (and is queued to be persisted before).
    CopyArrived,
    /// An exchange with a member completed without one: the cluster has
    /// none (a new POP).
    NoCopyInCluster,
    /// No member answered within the patience: alone, or the first POP
    /// of a new cluster.
    NoAnswer,
    /// Members answered, but no exchange completed within the longest
    /// wait (the transport blocked, or refused).
    NoExchange,
}

/// This node's own row, held back (see [`Node::hold_own_row`]).
#[derive(Debug, Clone, Copy)]
struct HeldOwnRow {
    /// When the wait runs out (or is extended, see `at_most`).
    due: Instant,
    /// The longest wait, used once when `due` comes while members answer.
    at_most: Option<Instant>,
}

/// Remote rows already merged into the replica, to be written to the
/// database.
#[derive(Debug)]
pub struct Persist {
    pub rows: Vec<RowVersion>,
    /// What the replica held for each row before it won (`None`: nothing),
    /// to go back to if the write fails.
    previous: Vec<Option<RowVersion>>,
    /// The rows are counted in `Stats::rows_applied` (remote rows, not this
    /// node's own row written again).
    counted: bool,
}

/// Reportable happenings: for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Member(MemberEvent),
    /// We refused a peer (its datagram or message).
    Refused {
        addr: SocketAddr,
        peer: Option<NodeId>,
        reason: String,
        label: &'static str,
    },
    /// A peer refused us and said why.
    RefusedBy {
        addr: SocketAddr,
        reason: String,
    },
    /// Rows from `from` that won and are now ours. `lag_ms`: the largest
    /// delay between a row's write at its origin and now (replication's
    /// lag for a broadcast; for an exchange, how long the two were apart).
    Applied {
        from: NodeId,
        rows: usize,
        lag_ms: u64,
        via: Path,
    },
    /// An anti-entropy exchange we started ended.
    Synced {
        peer: NodeId,
        equal: bool,
        sent: usize,
        received: usize,
        more: bool,
    },
    /// An exchange we started with `peer` got no answer in time, the
    /// `in_a_row`th since one completed.
    SyncTimedOut {
        peer: NodeId,
        in_a_row: u32,
    },
    /// A row with a timestamp too far in the future was dropped.
    ClockDrift {
        peer: NodeId,
        ahead_ms: u64,
    },
    /// A row no POP could have written was dropped: `peer` (or whoever it
    /// had the row from) is broken.
    MalformedRow {
        peer: NodeId,
        key: RowKey,
        reason: &'static str,
    },
    /// Two live members claim one node id (or a member claims ours): the
    /// one at `impostor` is ignored (no rows to or from it) while the one
    /// at `holder` (the older start) lives. With `ours`, one of the two is
    /// this node (which keeps ignoring the other either way). Each would
    /// mint the same versions for different data, so the configuration
    /// must be fixed.
    DuplicateId {
        id: NodeId,
        holder: SocketAddr,
        impostor: SocketAddr,
        /// The id is this node's own.
        ours: bool,
    },
    /// A member declared down left the view for good: forgotten here
    /// ([`Node::forget`]) or at another POP (its `pops` row deleted).
    Forgotten {
        id: NodeId,
        identities: usize,
    },
    /// Another POP deleted this POP's own `pops` row (it forgot this POP
    /// while it was down): the row is written again, newer, so that this
    /// POP is listed again everywhere.
    OwnRowRestored {
        by: NodeId,
    },
    /// `peer`, declared down here `down_ms` ago (longer than the
    /// tombstone TTL, `ttl_ms`), is up again under the same id. With
    /// `kept_for_it`, this node kept every tombstone written since it went
    /// down (see `Absences::owed`) and the deletions reach it as usual;
    /// without (down longer than [`MAX_HOLD_TTLS`] TTLs, or this node's
    /// record of its absence was lost with its database), rows deleted meanwhile may have no tombstone
    /// left here, and if it still holds them, anti-entropy brings them back.
    PeerBackAfterTombstoneTtl {
        peer: NodeId,
        down_ms: u64,
        ttl_ms: u64,
        kept_for_it: bool,
    },
    /// `peer`, forgotten for good (`cluster forget`, here or elsewhere), is
    /// up again: it was not decommissioned after all, only stopped or cut
    /// off. The forget released the tombstones kept for it, so rows deleted
    /// since it went away may come back from its copy. It rejoins as a new
    /// member (see `OwnRowRestored`).
    ForgottenMemberBack {
        peer: NodeId,
    },
    /// The first message from any member after none for `silent_ms`,
    /// longer than the tombstone TTL (`ttl_ms`). Either this node was cut
    /// off (stopped, isolated), and rows deleted elsewhere meanwhile may
    /// come back from it, or the others were down and nothing is wrong;
    /// this node cannot tell which. Only said; nothing is held back or
    /// deleted.
    ContactAfterTombstoneTtl {
        silent_ms: u64,
        ttl_ms: u64,
    },
}

/// Why [`Node::forget`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForgetRefused {
    #[error("{id} is this POP's own node id")]
    Ourselves { id: String },
    #[error(
        "{id} is {state} (gossip {gossip}): only a member declared down can be forgotten; \
         stop that POP first and wait until `cluster status` shows it down"
    )]
    Live {
        id: String,
        state: &'static str,
        gossip: SocketAddr,
    },
    #[error("no member and no POP {id:?} is known here")]
    Unknown { id: String },
}

/// What [`Node::forget`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forgotten {
    /// Identities (addresses, generations) of the id dropped from the view.
    pub identities: usize,
    /// False when the id was already forgotten (nothing new to replicate).
    pub replicated: bool,
}

/// How a row arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Broadcast,
    Sync,
}

/// Counters (monotonic), for metrics and the simulation.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub gossip_bytes_sent: u64,
    pub gossip_bytes_received: u64,
    pub broadcast_bytes_sent: u64,
    pub sync_bytes_sent: u64,
    pub bytes_received: u64,
    pub rows_applied: u64,
    /// Incoming versions that lost to a newer one we had (last-writer-wins
    /// resolved a conflict).
    pub conflicts: u64,
    pub refused: u64,
    /// Gossip datagrams opened under the accepted second secret
    /// (`replication.accept_secret`): peers still sealing with it.
    pub gossip_accepted_secret: u64,
    pub syncs: u64,
    pub syncs_equal: u64,
    /// Exchanges whose rows arrived after they had timed out here (merged
    /// all the same).
    pub syncs_late: u64,
}

/// What we know of one peer's replication.
#[derive(Debug, Clone, Default)]
pub struct PeerSync {
    pub last_sync: Option<Instant>,
    /// At the last exchange we started with it, the digests matched (false
    /// when that exchange timed out).
    pub in_sync: bool,
    /// Exchanges with it that timed out since the last one that completed.
    pub timeouts_in_a_row: u32,
    /// Delay of the last row applied from it, origin write to here.
    pub last_lag_ms: Option<u64>,
}

impl PeerSync {
    /// Whether this node and a member in `state` held the same rows, as
    /// `cluster status` says it: `None` while no exchange with it has ended
    /// (completed or timed out) since this node started, which right after
    /// a restart is every member for a few seconds (QA: shown as "no", it
    /// read as a cluster out of sync); `false` for a member not alive,
    /// whose last exchange says nothing of now (QA: "yes" for a down one).
    pub fn in_sync_now(&self, state: MemberState) -> Option<bool> {
        if state != MemberState::Alive {
            return Some(false);
        }
        if self.last_sync.is_none() && self.timeouts_in_a_row == 0 {
            return None;
        }
        Some(self.in_sync)
    }
}

/// One member as `cluster status` shows it.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub peer: Peer,
    pub state: MemberState,
    pub sync: PeerSync,
}

#[derive(Debug)]
struct Session {
    peer: NodeId,
    started: Instant,
    /// When its last step arrived: it times out [`SYNC_TIMEOUT`] after.
    progress: Instant,
    /// This node listed only some of the differing buckets (too many
    /// versions): the exchange does not cover everything.
    partial: bool,
}

pub struct Node {
    s: Settings,
    clock: HlcClock,
    replica: Replica,
    members: Membership,
    sealer: Sealer,
    rng: StdRng,
    out: VecDeque<Output>,
    /// Local changes waiting for the broadcast delay.
    pending: Vec<RowVersion>,
    /// Rows new to us that we forward on the epidemic path: (hops left,
    /// the peer we got them from, rows).
    forward: Vec<(u8, NodeId, RowVersion)>,
    broadcast_at: Option<Instant>,
    next_sync: Instant,
    next_gc: Instant,
    /// Peers to sync with before picking random ones (new members, or an
    /// exchange that did not fit).
    sync_queue: VecDeque<NodeId>,
    sessions: HashMap<u64, Session>,
    peers: HashMap<NodeId, PeerSync>,
    /// What an exchange with each peer carries, fitted to its link.
    budgets: HashMap<NodeId, SyncBudget>,
    last_refusal_reply: HashMap<SocketAddr, Instant>,
    /// Gossip addresses to knock on while no member answers (at start, or
    /// after every member went down).
    bootstrap: Vec<SocketAddr>,
    next_announce: Option<Instant>,
    /// This node renewed its identity (told it was down) and no member has
    /// answered the new one yet: it announces itself until one does (see
    /// [`Node::announce`]).
    rejoining: bool,
    /// When the bootstrap peers not in the view are next announced to.
    next_stranger_knock: Instant,
    /// Ids seen claimed by two live identities, since when (reported when
    /// still claimed twice after the grace, and again every grace while
    /// it lasts).
    collisions: HashMap<NodeId, Instant>,
    /// When (Unix ms) a member's message last arrived: this node last
    /// heard the cluster. The driver persists it (`repl_meta`) and gives
    /// it back at start, so that a restart after a long stop notices too.
    last_contact_ms: Option<u64>,
    /// `last_contact_ms` is the persisted one (up to a minute stale), not
    /// yet replaced by a contact of this run.
    contact_persisted: bool,
    absences: Absences,
    /// Members down at the previous run's end (restored from
    /// [`Absences::down_since`]) that this run has not seen since, and when
    /// this run restored them (Unix ms): see [`Node::down_members`].
    restored_down: (HashSet<NodeId>, u64),
    /// This node's own row is held back (see [`Node::hold_own_row`]).
    own_row_held: Option<HeldOwnRow>,
    pub stats: Stats,
}

/// What kind of write changed a row, as its writer knows (the row's data
/// alone cannot tell a verdict from a registration that repeats the row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// An edit, a drain, a delete: anyone's decision. A write that leaves the
    /// row as it was (a trigger fired on an unchanged value) is none.
    Deliberate,
    /// A registration: a decision even when it repeats the row exactly, so
    /// it is versioned anew; registered after a delete made elsewhere (in a
    /// partition), the backend is back.
    Registration,
    /// This POP's own judgement: an expiry verdict, heartbeats taken over.
    Verdict,
}

/// A member held down, see [`Node::down_members`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownMember {
    pub id: NodeId,
    /// Declared down here (Unix ms), in this run or the previous one.
    pub since_ms: u64,
    /// Since when a stand-in may count its backends' heartbeats unheard.
    pub unheard_since_ms: u64,
    /// Known from the previous run only: this run's membership has not
    /// heard of it.
    pub restored: bool,
}

/// What a node remembers of members that went down, kept in its database
/// (`repl_meta`) so that a restart does not forget it: a POP restarted
/// while another is down still keeps the deletions owed to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Absences {
    /// Members declared down here (no other live identity holding their
    /// id), since when (Unix ms).
    pub down_since: HashMap<NodeId, u64>,
    /// Members that went down (since when, Unix ms) and have not completed
    /// an exchange with this node since. The tombstones written after they
    /// went down are kept past the TTL for them (at most
    /// [`MAX_HOLD_TTLS`] TTLs): collected while such a member was away,
    /// its old copies of the deleted rows would be rows nobody else holds,
    /// and anti-entropy would bring them back everywhere. Released by a
    /// completed exchange with it, or by forgetting it.
    pub owed: HashMap<NodeId, u64>,
}

impl Node {
    /// A node holding `replica` (loaded from its database). Call
    /// [`Node::join`] to contact the cluster.
    pub fn new(s: Settings, replica: Replica, now: Now) -> Node {
        let me = Peer {
            id: s.id.clone(),
            gossip: s.gossip_addr,
            transport: s.transport_addr,
            generation: s.generation,
        };
        let members = Membership::new(me, swim_config(s.expected_size, s.gossip_interval), s.seed);
        let mut rng = StdRng::seed_from_u64(s.seed ^ 0x5EED);
        let sealer = Sealer::new(&s.cluster, s.schema, s.gossip_key, rng.random())
            .accepting(s.accepted_gossip_key);
        let clock = HlcClock::starting_after(replica.max_hlc());
        // Spread first syncs over the interval: a fleet restarted at once
        // must not sync in lockstep.
        let first_sync = s.sync_interval.mul_f64(rng.random_range(0.1..1.0));
        Node {
            clock,
            replica,
            members,
            sealer,
            rng,
            out: VecDeque::new(),
            pending: Vec::new(),
            forward: Vec::new(),
            broadcast_at: None,
            next_sync: now.mono + first_sync,
            next_gc: now.mono + GC_INTERVAL,
            sync_queue: VecDeque::new(),
            sessions: HashMap::new(),
            peers: HashMap::new(),
            budgets: HashMap::new(),
            last_refusal_reply: HashMap::new(),
            bootstrap: Vec::new(),
            next_announce: None,
            rejoining: false,
            next_stranger_knock: now.mono + STRANGER_KNOCK_INTERVAL,
            collisions: HashMap::new(),
            last_contact_ms: None,
            contact_persisted: false,
            absences: Absences::default(),
            restored_down: (HashSet::new(), 0),
            own_row_held: None,
            stats: Stats::default(),
            s,
        }
    }

    /// This node starts (its `routing.db` may be older than the cluster's
    /// copy of its own `pops` row: wiped, or restored from a backup): its
    /// writer holds its row back until [`Output::WriteOwnRow`], which comes
    /// when the cluster's copy arrives, when an exchange with a member
    /// completes without a newer one, `patience` from now if no member
    /// answered, or `longest` from now if members did but no exchange
    /// completed. A row written at once would be versioned now and beat the
    /// cluster's copy, undoing the operator's drain of this POP everywhere
    /// (QA). Call before [`Node::join`].
    ///
    /// Why two waits: the first POP of a new cluster, alone, should not
    /// wait long; a POP that the members answer but exchange nothing with
    /// is most likely refused for a while (QA: a drained POP moved to a new
    /// address with a fresh disk was refused as a duplicate id until its
    /// old identity was declared down, about 4 s, wrote its row after the
    /// 3 s patience, undrained, and announced).
    pub fn hold_own_row(&mut self, now: Now, patience: Duration, longest: Duration) {
        self.own_row_held = Some(HeldOwnRow {
            due: now.mono + patience,
            at_most: Some(now.mono + longest.max(patience)),
        });
    }

    /// This node's own row is held back (see [`Node::hold_own_row`]).
    pub fn holds_own_row(&self) -> bool {
        self.own_row_held.is_some()
    }

    /// The held row's wait ran out: written now, unless members answer, in
    /// which case it waits for an exchange up to the longest wait.
    fn own_row_wait_over(&mut self) {
        let members_answer = self.members.active_count() > 0;
        let Some(held) = self.own_row_held.as_mut() else {
            return;
        };
        match held.at_most.take() {
            Some(at_most) if members_answer => held.due = at_most,
            Some(_) => self.release_own_row(OwnRowDue::NoAnswer),
            None => self.release_own_row(OwnRowDue::NoExchange),
        }
    }

    fn release_own_row(&mut self, due: OwnRowDue) {
        if self.own_row_held.take().is_some() {
            self.out.push_back(Output::WriteOwnRow(due));
        }
    }

    pub fn id(&self) -> &NodeId {
        &self.s.id
    }

    pub fn settings(&self) -> &Settings {
        &self.s
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// For tests: rows stored as if loaded from the database.
    #[cfg(test)]
    pub(crate) fn replica_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }

    /// For tests: every identity foca remembers, down ones included
    /// (what gossip may bring back), unfiltered.
    #[cfg(test)]
    pub(crate) fn raw_membership(&self) -> Vec<(Peer, MemberState)> {
        self.members.states()
    }

    /// When this node last heard a member (Unix ms), for the driver to
    /// persist; `None` before the first contact ever.
    pub fn last_contact(&self) -> Option<u64> {
        self.last_contact_ms
    }

    /// At start, before [`Node::join`]: when this node last heard a member,
    /// as persisted by its previous run.
    pub fn set_last_contact(&mut self, ms: Option<u64>) {
        self.last_contact_ms = ms;
        self.contact_persisted = ms.is_some();
    }

    /// A member's message arrived. After a silence longer than the
    /// tombstone TTL, says so (see [`Event::ContactAfterTombstoneTtl`]).
    fn contact(&mut self, now: Now) {
        let Some(before) = self.last_contact_ms.replace(now.wall_ms) else {
            return;
        };
        let ttl_ms = self.s.tombstone_ttl.as_millis() as u64;
        let silent_ms = now.wall_ms.saturating_sub(before);
        // The time the previous run persisted may be up to
        // `CONTACT_PERSIST_EVERY` older than its last contact: only a
        // silence longer than that for sure is said.
        let stale_ms = if std::mem::take(&mut self.contact_persisted) {
            CONTACT_PERSIST_EVERY.as_millis() as u64
        } else {
            0
        };
        if silent_ms > ttl_ms + stale_ms {
            self.event(Event::ContactAfterTombstoneTtl { silent_ms, ttl_ms });
        }
    }

    /// The members' absences, for the driver to persist when they change.
    pub fn absences(&self) -> &Absences {
        &self.absences
    }

    /// At start, before [`Node::join`]: the absences the previous run
    /// persisted. Those of this node's own id are dropped (another node
    /// saw it down; that is over), and holds older than
    /// [`MAX_HOLD_TTLS`] TTLs, which no longer keep anything.
    pub fn restore_absences(&mut self, now: Now, mut absences: Absences) {
        let ttl_ms = self.s.tombstone_ttl.as_millis() as u64;
        let cap = now
            .wall_ms
            .saturating_sub(ttl_ms.saturating_mul(MAX_HOLD_TTLS));
        absences.down_since.remove(&self.s.id);
        absences.owed.remove(&self.s.id);
        absences.owed.retain(|_, since| *since >= cap);
        self.restored_down = (absences.down_since.keys().cloned().collect(), now.wall_ms);
        self.absences = absences;
    }

    /// The members this node holds down (no live identity holds their id),
    /// each with since when (Unix ms) its backends' heartbeats have reached
    /// no POP, as far as a stand-in judging their expiry may count
    /// (`routing::StandIn`). A member held down at the previous run's end
    /// counts from then, though this run's membership has not heard of it
    /// (until 2026-12-05 a restart forgot it: its backends were expired by
    /// nobody and `cluster status` no longer listed it); but the stand-in
    /// counts from this run's start, no earlier: the member may have come
    /// back while this node was stopped, and gossip says so well within a
    /// heartbeat TTL.
    pub fn down_members(&self) -> Vec<DownMember> {
        let (restored, restored_at) = &self.restored_down;
        self.absences
            .down_since
            .iter()
            .map(|(id, &since_ms)| {
                let restored = restored.contains(id);
                DownMember {
                    id: id.clone(),
                    since_ms,
                    unheard_since_ms: match restored {
                        true => since_ms.max(*restored_at),
                        false => since_ms,
                    },
                    restored,
                }
            })
            .collect()
    }

    /// The latest timestamp this node issued or saw (persist it so a restart
    /// never issues a smaller one).
    pub fn clock(&self) -> Hlc {
        self.clock.last()
    }

    /// Contacts the members at these gossip addresses (bootstrap peers).
    /// Until some member answers, the announcement is repeated every
    /// gossip interval: the first one (or its answer) may be lost, or the
    /// bootstrap peers may not be up yet.
    pub fn join(&mut self, now: Now, bootstrap: &[SocketAddr]) {
        self.bootstrap = bootstrap
            .iter()
            .copied()
            .filter(|a| *a != self.s.gossip_addr)
            .collect();
        self.announce(now);
    }

    /// New addresses for the bootstrap peers (their names resolved again
    /// while no member answers): knocked on at once, then with the others
    /// every gossip interval until some member answers.
    pub fn set_bootstrap(&mut self, now: Now, bootstrap: &[SocketAddr]) {
        self.bootstrap = bootstrap
            .iter()
            .copied()
            .filter(|a| *a != self.s.gossip_addr)
            .collect();
        if self.members.active_count() == 0 {
            self.announce(now);
        }
    }

    /// Announces this node to its bootstrap peers and to a few members it
    /// knows (down ones too: an announcement is taken by address, whatever
    /// identity the receiver holds for it now); again every gossip
    /// interval while no member answers (see `handle_timeout`).
    ///
    /// The members, because the bootstrap peers alone may not do: a POP
    /// left alone (foca idle, its own knocking on down members stopped)
    /// whose members restarted meanwhile without hearing of it, and which
    /// has no bootstrap peer (the cluster's first POP), was never contacted
    /// again. And a node that renewed its identity (told it was down) waits
    /// for a message addressed to the new one, while the members it holds
    /// alive may have renewed theirs in the same round trip (a healed split:
    /// each half told the other it was down) and drop what comes addressed
    /// to their old one: nobody spoke again.
    fn announce(&mut self, now: Now) {
        let mut known: Vec<SocketAddr> = self
            .members
            .states()
            .into_iter()
            .map(|(p, _)| p.gossip)
            .filter(|a| *a != self.s.gossip_addr && !self.bootstrap.contains(a))
            .collect();
        known.sort_unstable();
        known.dedup();
        known.shuffle(&mut self.rng);
        known.truncate(KNOCK_ON_KNOWN);
        for addr in self
            .bootstrap
            .clone()
            .into_iter()
            .chain(known.iter().copied())
        {
            self.members.announce(now.mono, addr);
        }
        let anyone = !self.bootstrap.is_empty() || !known.is_empty();
        self.next_announce = anyone.then(|| now.mono + self.s.gossip_interval);
        self.after_membership(now);
    }

    /// With members: announces this node to the bootstrap peers that no
    /// active member is at, every [`STRANGER_KNOCK_INTERVAL`]. SWIM only
    /// ever talks to members it knows: two groups that formed apart (every
    /// POP restarted during a split, each joining whichever peer answered
    /// first) would never merge, had each node stopped announcing itself to
    /// its bootstrap peers once it had a member. One small datagram per
    /// such peer; none once every bootstrap peer is a member.
    fn knock_on_strangers(&mut self, now: Now) {
        self.next_stranger_knock = now.mono + STRANGER_KNOCK_INTERVAL;
        let members: Vec<SocketAddr> = self.members.active().map(|p| p.gossip).collect();
        let strangers: Vec<SocketAddr> = self
            .bootstrap
            .iter()
            .copied()
            .filter(|a| !members.contains(a))
            .collect();
        if strangers.is_empty() {
            return;
        }
        for addr in strangers {
            self.members.announce(now.mono, addr);
        }
        self.after_membership(now);
    }

    /// Tells the cluster we are leaving (clean shutdown).
    pub fn leave(&mut self, now: Now) {
        self.members.leave(now.mono);
        self.after_membership(now);
    }

    /// Members other than this node, with their state and sync status.
    /// Never this node's own id (an impostor, or ourselves at an address we
    /// left), and a down identity of an id that lives on elsewhere (a POP
    /// moved to a new address) is superseded: listed once, as it is now.
    pub fn members(&self) -> Vec<MemberStatus> {
        let states = self.members.states();
        let lives_on = |peer: &Peer| {
            states.iter().any(|(p, st)| {
                *st != MemberState::Down && p.id == peer.id && p.gossip != peer.gossip
            })
        };
        let mut list: Vec<MemberStatus> = states
            .iter()
            .filter(|(peer, state)| {
                peer.id != self.s.id
                    && !(*state == MemberState::Down
                        && (lives_on(peer) || self.is_forgotten(&peer.id)))
            })
            .cloned()
            .map(|(peer, state)| MemberStatus {
                // Sync state is kept per id: it belongs to the identity
                // holding the id, not to an impostor claiming it.
                sync: if self
                    .holder_of(&peer.id)
                    .is_none_or(|h| h.gossip == peer.gossip)
                {
                    self.peers.get(&peer.id).cloned().unwrap_or_default()
                } else {
                    PeerSync::default()
                },
                peer,
                state,
            })
            .collect();
        list.sort_by(|a, b| a.peer.id.cmp(&b.peer.id));
        list
    }

    pub fn active_members(&self) -> usize {
        self.members.active_count()
    }

    /// Forgets a POP decommissioned for good: drops its identities (all
    /// declared down) from the membership view, and deletes its `pops`
    /// row. The deletion replicates like any other, and every POP that
    /// holds it forgets the member too, whatever gossip still says of it
    /// (see [`Node::is_forgotten`]). Refused for this POP's own id and for
    /// a member alive or suspect anywhere in this POP's view. The POP, if it
    /// ever comes back, joins as a new member and writes its row again
    /// (see `OwnRowRestored`).
    pub fn forget(&mut self, now: Now, id: &str) -> Result<Forgotten, ForgetRefused> {
        if *id == *self.s.id {
            return Err(ForgetRefused::Ourselves { id: id.into() });
        }
        let states = self.members.states();
        let mine: Vec<&(Peer, MemberState)> = states.iter().filter(|(p, _)| &*p.id == id).collect();
        if let Some((peer, state)) = mine.iter().find(|(_, st)| *st != MemberState::Down) {
            return Err(ForgetRefused::Live {
                id: id.into(),
                state: state.as_str(),
                gossip: peer.gossip,
            });
        }
        let key = RowKey::new(Table::Pops, id);
        let held = self.replica.get(&key);
        if mine.is_empty() && held.is_none() {
            return Err(ForgetRefused::Unknown { id: id.into() });
        }
        let replicated = !held.as_ref().is_some_and(RowVersion::is_tombstone);
        if replicated {
            // A tombstone even for a row this POP never received: it is
            // what tells the others to forget the member.
            let row = RowVersion {
                key,
                version: Version {
                    hlc: self.clock.now(now.wall_ms),
                    origin: self.s.id.clone(),
                },
                intent: None,
                data: None,
            };
            self.replica.put(row.clone());
            self.pending.push(row.clone());
            self.broadcast_at
                .get_or_insert(now.mono + self.s.broadcast_delay);
            self.out.push_back(Output::Persist(Persist {
                rows: vec![row],
                previous: vec![held],
                counted: false,
            }));
        }
        let identities = self.prune_forgotten();
        self.absences.owed.remove(id);
        self.absences.down_since.remove(id);
        self.peers.remove(id);
        self.budgets.remove(id);
        self.sync_queue.retain(|p| &**p != id);
        Ok(Forgotten {
            identities,
            replicated,
        })
    }

    /// Whether tombstones are kept for `id` (see `Absences::owed`).
    #[cfg(test)]
    pub(crate) fn owes(&self, id: &str) -> bool {
        self.absences.owed.keys().any(|k| &**k == id)
    }

    /// True for a member forgotten for good: its `pops` row is deleted (a
    /// tombstone, replicated from whichever POP forgot it). Its identities
    /// declared down are dropped from the view and never listed, though a
    /// POP that has not heard of the deletion yet may gossip them again.
    pub fn is_forgotten(&self, id: &NodeId) -> bool {
        *id != self.s.id
            && self
                .replica
                .get(&RowKey::new(Table::Pops, &**id))
                .is_some_and(|r| r.is_tombstone())
    }

    /// Ids forgotten for good (see [`Node::is_forgotten`]) that no live
    /// identity holds.
    pub fn forgotten_ids(&self) -> Vec<NodeId> {
        let live: Vec<NodeId> = self.members.active().map(|p| p.id.clone()).collect();
        self.replica
            .iter()
            .filter(|r| r.key.table == Table::Pops && r.is_tombstone())
            .map(|r| NodeId::from(r.key.pk.as_str()))
            .filter(|id| *id != self.s.id && !live.contains(id))
            .collect()
    }

    /// Drops the down identities of forgotten members from foca (which
    /// would otherwise knock on them every second for a day); returns how
    /// many it dropped.
    fn prune_forgotten(&mut self) -> usize {
        let gone: Vec<Peer> = self
            .members
            .states()
            .into_iter()
            .filter(|(p, st)| *st == MemberState::Down && self.is_forgotten(&p.id))
            .map(|(p, _)| p)
            .collect();
        let forgotten: Vec<NodeId> = self
            .absences
            .owed
            .keys()
            .chain(self.absences.down_since.keys())
            .filter(|id| self.is_forgotten(id))
            .cloned()
            .collect();
        for id in forgotten {
            self.absences.owed.remove(&id);
            self.absences.down_since.remove(&id);
        }
        let mut by_id: BTreeMap<NodeId, usize> = BTreeMap::new();
        for peer in &gone {
            // `now` only stamps timers foca sets; removing sets none.
            self.members.remove_down(Instant::now(), peer);
            *by_id.entry(peer.id.clone()).or_default() += 1;
        }
        for (id, identities) in by_id {
            self.event(Event::Forgotten { id, identities });
        }
        gone.len()
    }

    /// Who rightfully holds `id` among the live identities claiming it:
    /// this node for its own id; else the oldest start (generation), then
    /// the lowest gossip address, so that every node picks the same one.
    fn holder_of(&self, id: &NodeId) -> Option<Peer> {
        if *id == self.s.id {
            return Some(self.members.me().clone());
        }
        self.members
            .active()
            .filter(|p| p.id == *id)
            .min_by_key(|p| (p.generation, p.gossip))
            .cloned()
    }

    /// Active members we replicate with: all but impostors (see
    /// [`Event::DuplicateId`]).
    fn usable_members(&self) -> Vec<Peer> {
        self.members
            .active()
            .filter(|p| self.holder_of(&p.id).is_none_or(|h| h.gossip == p.gossip))
            .cloned()
            .collect()
    }

    /// When a message claims to be from `id` but comes from an identity that
    /// does not hold that id: the holder's gossip address.
    fn impostor_sender(&self, id: &NodeId, reply_to: SocketAddr) -> Option<SocketAddr> {
        let holder = self.holder_of(id)?;
        (holder.transport != reply_to).then_some(holder.gossip)
    }

    /// The cluster's view of an id claimed by more than one live identity
    /// (this node included, for its own id): (holder, impostor), the holder
    /// being the older start, the choice every POP makes.
    fn collision(&self, id: &NodeId) -> Option<(Peer, Peer)> {
        let mut claimants: Vec<Peer> = self
            .members
            .active()
            .filter(|p| p.id == *id)
            .cloned()
            .collect();
        if *id == self.s.id {
            claimants.push(self.members.me().clone());
        }
        if claimants.len() < 2 {
            return None;
        }
        claimants.sort_by_key(|p| (p.generation, p.gossip));
        let mut two = claimants.into_iter();
        Some((two.next()?, two.next()?))
    }

    /// Reports an id claimed by two live identities that is still claimed
    /// twice after [`COLLISION_GRACE`] gossip intervals, and tells the
    /// other POP why it is ignored. (It is ignored from the start; the
    /// grace only spares a POP moved to a new address an ERROR while its
    /// old identity is being declared down.)
    fn report_duplicate_ids(&mut self, now: Now) {
        let grace = self.s.gossip_interval * COLLISION_GRACE;
        let due: Vec<NodeId> = self
            .collisions
            .iter()
            .filter(|(_, since)| now.mono.duration_since(**since) >= grace)
            .map(|(id, _)| id.clone())
            .collect();
        let suspects: Vec<SocketAddr> = self
            .members
            .states()
            .into_iter()
            .filter(|(_, st)| *st == MemberState::Suspect)
            .map(|(p, _)| p.gossip)
            .collect();
        for id in due {
            self.collisions.remove(&id);
            let Some((holder, impostor)) = self.collision(&id) else {
                continue;
            };
            // A suspect is likely a POP's old identity on its way down
            // (this node may learn it later than the others did): look
            // again a grace later.
            if suspects.contains(&holder.gossip) || suspects.contains(&impostor.gossip) {
                self.collisions.insert(id, now.mono);
                continue;
            }
            let reason = format!(
                "node id {id:?} is held by the member at {}; the one at {} is ignored \
                 (every POP needs its own replication.node_id)",
                holder.gossip, impostor.gossip
            );
            let other = if impostor.gossip == self.s.gossip_addr {
                holder.gossip
            } else {
                impostor.gossip
            };
            self.reply_refusal(now, other, &reason);
            self.stats.refused += 1;
            // Said again while it lasts (the driver logs it once a minute).
            self.collisions.insert(id.clone(), now.mono);
            self.event(Event::DuplicateId {
                ours: id == self.s.id,
                id,
                holder: holder.gossip,
                impostor: impostor.gossip,
            });
        }
    }

    // ------------------------------------------------------------------
    // Inputs
    // ------------------------------------------------------------------

    /// A gossip datagram from `from`.
    pub fn handle_datagram(&mut self, now: Now, from: SocketAddr, bytes: &[u8]) {
        self.stats.gossip_bytes_received += bytes.len() as u64;
        let opened = self.sealer.open(bytes, now.wall_ms);
        self.stats.gossip_accepted_secret = self.sealer.opened_under_accepted();
        match opened {
            Ok(opened) => match opened.kind {
                Kind::Swim => {
                    // Decode errors and packets from down members are
                    // foca's to judge; they change nothing here.
                    let _ = self.members.handle_packet(now.mono, &opened.payload);
                    self.after_membership(now);
                }
                Kind::Refusal => self.event(Event::RefusedBy {
                    addr: from,
                    reason: String::from_utf8_lossy(&opened.payload).into_owned(),
                }),
            },
            Err(refused) => self.refuse_datagram(now, from, refused),
        }
    }

    fn refuse_datagram(&mut self, now: Now, from: SocketAddr, refused: Refused) {
        self.stats.refused += 1;
        let label = refused.label();
        let reason = refused.to_string();
        if !matches!(
            refused,
            Refused::Garbage | Refused::Replay | Refused::Stale(_)
        ) {
            self.reply_refusal(now, from, &reason);
        }
        self.event(Event::Refused {
            addr: from,
            peer: None,
            reason,
            label,
        });
    }

    /// Whatever it speaks, a datagram from us makes the peer log the same
    /// mismatch from its side; rate-limited per address.
    fn reply_refusal(&mut self, now: Now, to: SocketAddr, reason: &str) {
        let due = self
            .last_refusal_reply
            .get(&to)
            .is_none_or(|at| now.mono.duration_since(*at) >= REFUSAL_REPLY_INTERVAL);
        if due {
            if self.last_refusal_reply.len() > 4096 {
                self.last_refusal_reply.clear();
            }
            self.last_refusal_reply.insert(to, now.mono);
            let bytes = self
                .sealer
                .seal(Kind::Refusal, reason.as_bytes(), now.wall_ms);
            self.stats.gossip_bytes_sent += bytes.len() as u64;
            self.out.push_back(Output::Datagram { to, bytes });
        }
    }

    /// A transport message (one QUIC stream's bytes) from `from`.
    pub fn handle_message(&mut self, now: Now, from: SocketAddr, bytes: &[u8]) {
        self.stats.bytes_received += bytes.len() as u64;
        let env = match wire::decode(bytes) {
            Ok(env) => env,
            Err(e) => {
                self.stats.refused += 1;
                self.event(Event::Refused {
                    addr: from,
                    peer: None,
                    reason: e.to_string(),
                    label: "garbage",
                });
                return;
            }
        };
        let mismatch = if env.cluster != self.s.cluster {
            Some((
                "cluster",
                format!(
                    "peer belongs to cluster {:?}, this node to {:?}",
                    env.cluster, self.s.cluster
                ),
            ))
        } else if env.schema != self.s.schema {
            Some((
                "schema",
                format!(
                    "peer has replication schema version {}, this node {}",
                    env.schema, self.s.schema
                ),
            ))
        } else if env.protocol != PROTOCOL {
            Some((
                "protocol",
                format!(
                    "peer speaks replication protocol {}, this node {PROTOCOL}",
                    env.protocol
                ),
            ))
        } else {
            None
        };
        let mismatch = mismatch.or_else(|| {
            self.impostor_sender(&env.from, env.reply_to).map(|holder| {
                (
                    DUPLICATE_ID,
                    format!(
                        "peer at {} claims node id {:?}, held by the member at {holder}",
                        env.reply_to, env.from
                    ),
                )
            })
        });
        if let Some((label, reason)) = mismatch {
            self.stats.refused += 1;
            self.event(Event::Refused {
                addr: from,
                peer: Some(env.from),
                reason,
                label,
            });
            return;
        }
        let Envelope {
            from: peer,
            reply_to,
            msg,
            ..
        } = env;
        self.contact(now);
        match msg {
            Msg::Changes { hops, rows } => {
                let applied = self.merge_rows(now, &peer, rows, Path::Broadcast);
                if hops > 0 && !applied.is_empty() {
                    self.queue_forward(now, hops - 1, &peer, applied);
                }
            }
            Msg::SyncTop { session, top, rows } => {
                let reply = if top == self.replica.top_digest() && rows == self.replica.len() as u64
                {
                    Msg::SyncEqual { session }
                } else {
                    Msg::SyncBuckets {
                        session,
                        buckets: self.replica.bucket_digests().to_vec(),
                    }
                };
                self.send(now, reply_to, reply, false);
            }
            Msg::SyncEqual { session } => {
                if let Some(s) = self.sessions.remove(&session) {
                    self.stats.syncs += 1;
                    self.stats.syncs_equal += 1;
                    // It holds exactly what this node holds.
                    self.absences.owed.remove(&s.peer);
                    let p = self.peers.entry(s.peer.clone()).or_default();
                    p.last_sync = Some(now.mono);
                    p.in_sync = true;
                    p.timeouts_in_a_row = 0;
                    self.event(Event::Synced {
                        peer: s.peer,
                        equal: true,
                        sent: 0,
                        received: 0,
                        more: false,
                    });
                    // It holds no row of ours either.
                    self.release_own_row(OwnRowDue::NoCopyInCluster);
                }
            }
            Msg::SyncBuckets { session, buckets } => {
                let Some(s) = self.sessions.get_mut(&session) else {
                    return;
                };
                s.progress = now.mono;
                let mut differing = self.replica.differing_buckets(&buckets);
                // The peer may be running an exchange with this node at
                // the same time (both start one when a partition heals):
                // listing the same buckets, each side would send its rows
                // twice, once asked for and once unasked. The node with
                // the lower id lists from the first bucket up, the other
                // from the last down.
                if *self.s.id > *peer {
                    differing.reverse();
                }
                let budget = self.budget(&peer);
                let (buckets, versions) = self.versions_for(&differing, budget.versions());
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.partial = buckets.len() < differing.len();
                }
                self.send(
                    now,
                    reply_to,
                    Msg::SyncVersions {
                        session,
                        buckets,
                        versions,
                    },
                    true,
                );
            }
            Msg::SyncVersions {
                session,
                buckets,
                versions,
            } => {
                let (rows, want, more) = self.compare(&buckets, versions, self.budget(&peer));
                self.send(
                    now,
                    reply_to,
                    Msg::SyncRows {
                        session,
                        rows,
                        want,
                        more,
                    },
                    true,
                );
            }
            Msg::SyncRows {
                session,
                rows,
                want,
                more,
            } => {
                let budget = self.budget(&peer);
                let Some(s) = self.sessions.remove(&session) else {
                    // An exchange that timed out here, its rows late (a
                    // slow link): they are rows like any others, and the
                    // peer still lacks what it asked for. Thrown away, the
                    // next exchange carried them again over the same slow
                    // link and timed out in turn.
                    self.merge_rows(now, &peer, rows, Path::Sync);
                    let (rows, _) = self.rows_for(&want, budget.row_bytes());
                    self.send(now, reply_to, Msg::SyncWanted { session, rows }, true);
                    self.stats.syncs_late += 1;
                    // Its transport works, only slowly.
                    self.peers.entry(peer).or_default().timeouts_in_a_row = 0;
                    return;
                };
                let received = self.merge_rows(now, &peer, rows, Path::Sync).len();
                let (rows, truncated) = self.rows_for(&want, budget.row_bytes());
                let sent = rows.len();
                self.budgets
                    .entry(s.peer.clone())
                    .or_default()
                    .completed(now.mono.duration_since(s.started), SYNC_TIMEOUT);
                self.send(now, reply_to, Msg::SyncWanted { session, rows }, true);
                // Buckets left out of this exchange still differ: it is not
                // complete (nor, for a member owed tombstones, in sync).
                let more = more || truncated || s.partial;
                if !more {
                    // Every row it lacked or held older is on its way to it
                    // (`SyncWanted`, over the reliable transport).
                    self.absences.owed.remove(&s.peer);
                }
                self.stats.syncs += 1;
                let p = self.peers.entry(s.peer.clone()).or_default();
                p.last_sync = Some(now.mono);
                p.in_sync = false;
                p.timeouts_in_a_row = 0;
                if more && !self.sync_queue.contains(&s.peer) {
                    self.sync_queue.push_back(s.peer.clone());
                }
                self.event(Event::Synced {
                    peer: s.peer,
                    equal: false,
                    sent,
                    received,
                    more,
                });
                if more {
                    // At once, not at the next timer: a catch-up is a
                    // chain of these.
                    self.start_syncs(now, false);
                } else {
                    // Its copy of our row would have come with this one.
                    self.release_own_row(OwnRowDue::NoCopyInCluster);
                }
            }
            Msg::SyncWanted { rows, .. } => {
                self.merge_rows(now, &peer, rows, Path::Sync);
            }
        }
    }

    /// Rows changed in this node's database (found in its change log):
    /// `data` is the row's replicated columns as JSON, `None` if the row is
    /// gone. Returns the new versions, which the caller persists with the
    /// rows before it commits; rows whose data did not change get none.
    pub fn local_writes(
        &mut self,
        now: Now,
        rows: impl IntoIterator<Item = (RowKey, Option<String>)>,
    ) -> Vec<RowVersion> {
        self.local_writes_by_kind(
            now,
            rows.into_iter()
                .map(|(key, data)| (key, data, WriteKind::Deliberate)),
        )
    }

    /// [`Node::local_writes`], each row with the kind of write its writer
    /// said it was: a [`WriteKind::Verdict`] that changed only
    /// [`VERDICT_COLUMNS`] keeps the intent of the version it sits on.
    ///
    /// [`VERDICT_COLUMNS`]: super::version::VERDICT_COLUMNS
    pub fn local_writes_by_kind(
        &mut self,
        now: Now,
        rows: impl IntoIterator<Item = (RowKey, Option<String>, WriteKind)>,
    ) -> Vec<RowVersion> {
        let mut written = Vec::new();
        for (key, data, kind) in rows {
            let have = self.replica.get(&key);
            let unchanged = match &have {
                Some(have) => have.data == data,
                // A row that never existed anywhere we know of and is gone:
                // nothing to tell anyone.
                None => data.is_none(),
            };
            if unchanged && kind != WriteKind::Registration {
                continue;
            }
            // A verdict keeps the intent of the write it sits on.
            let intent = match (&have, &data) {
                (Some(have), Some(new)) if kind == WriteKind::Verdict => have
                    .data
                    .as_deref()
                    .filter(|old| only_verdicts_differ(key.table, old, new))
                    .map(|_| have.intent().clone()),
                _ => None,
            };
            let row = RowVersion {
                key,
                version: Version {
                    hlc: self.clock.now(now.wall_ms),
                    origin: self.s.id.clone(),
                },
                intent,
                data,
            };
            self.replica.put(row.clone());
            written.push(row);
        }
        if !written.is_empty() {
            self.pending.extend(written.iter().cloned());
            self.broadcast_at
                .get_or_insert(now.mono + self.s.broadcast_delay);
        }
        written
    }

    /// The caller could not record the versions [`Node::local_writes_by_kind`]
    /// just gave `written` (its transaction failed: the disk full or
    /// read-only, the file locked). Each row goes back to what the replica
    /// held before (`previous`, in the same order; `None`: nothing), unless
    /// it has won again since, and is not broadcast: the change log still
    /// holds it, and the next poll versions it again, once, when it can be
    /// recorded. Kept, a registration (versioned even when it repeats its
    /// row) got a new version at every failed poll, 20 a second, each one
    /// broadcast, written and reloaded by every other POP for as long as
    /// the disk stayed full.
    pub fn local_writes_failed(
        &mut self,
        written: Vec<RowVersion>,
        previous: Vec<Option<RowVersion>>,
    ) {
        let undone: HashMap<RowKey, Version> = written
            .iter()
            .map(|r| (r.key.clone(), r.version.clone()))
            .collect();
        self.pending
            .retain(|p| undone.get(&p.key) != Some(&p.version));
        self.take_back(written, previous);
    }

    /// Puts each of `rows`, whose write failed, back to what the replica
    /// held before it (`previous`, in the same order; `None`: nothing),
    /// unless it has won again since.
    fn take_back(&mut self, rows: Vec<RowVersion>, previous: Vec<Option<RowVersion>>) {
        for (row, previous) in rows.into_iter().zip(previous) {
            if self.replica.stamp_of(&row.key) != Some(row.stamp()) {
                continue;
            }
            match previous {
                Some(previous) => self.replica.put(previous),
                None => {
                    self.replica.remove(&row.key);
                }
            }
        }
    }

    /// Runs whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        if self
            .own_row_held
            .as_ref()
            .is_some_and(|held| held.due <= now.mono)
        {
            self.own_row_wait_over();
        }
        self.members.handle_timeout(now.mono);
        self.after_membership(now);
        self.prune_forgotten();
        self.report_duplicate_ids(now);
        if self.next_announce.is_some_and(|at| at <= now.mono) {
            if self.members.active_count() == 0 || self.rejoining {
                self.announce(now);
            } else {
                if self.next_stranger_knock <= now.mono {
                    self.knock_on_strangers(now);
                }
                self.next_announce = Some(now.mono + self.s.gossip_interval);
            }
        }
        if self.broadcast_at.is_some_and(|at| at <= now.mono) {
            self.broadcast_at = None;
            self.flush_broadcast(now);
        }
        let mut timed_out = Vec::new();
        self.sessions.retain(|_, s| {
            let live = now.mono.duration_since(s.progress) < SYNC_TIMEOUT;
            if !live {
                timed_out.push(s.peer.clone());
            }
            live
        });
        // An exchange that never finished says nothing of the digests:
        // "in sync" from an older one stayed on display for a peer whose
        // transport port was blocked, its rows no longer arriving.
        for peer in timed_out {
            self.budgets.entry(peer.clone()).or_default().timed_out();
            let p = self.peers.entry(peer.clone()).or_default();
            p.in_sync = false;
            p.timeouts_in_a_row += 1;
            let in_a_row = p.timeouts_in_a_row;
            self.event(Event::SyncTimedOut { peer, in_a_row });
        }
        if self.next_sync <= now.mono {
            self.next_sync = now.mono + self.jittered(self.s.sync_interval);
            self.start_syncs(now, true);
        } else if !self.sync_queue.is_empty() {
            self.start_syncs(now, false);
        }
        if self.next_gc <= now.mono {
            self.next_gc = now.mono + GC_INTERVAL;
            let before = Hlc::new(self.collect_before(now.wall_ms), 0);
            let collected = self.replica.collect_tombstones(before);
            if !collected.is_empty() {
                self.out.push_back(Output::Forget(collected));
            }
        }
    }

    /// Tombstones written before this (Unix ms) are collected: older than
    /// the TTL, and not owed to a member that went down before they were
    /// written (see `Absences::owed`), unless older than the hold's cap.
    fn collect_before(&self, now_ms: u64) -> u64 {
        let ttl_ms = self.s.tombstone_ttl.as_millis() as u64;
        let after_ttl = now_ms.saturating_sub(ttl_ms);
        let Some(oldest) = self.absences.owed.values().min() else {
            return after_ttl;
        };
        let owed_from = oldest.saturating_sub(OWED_MARGIN.as_millis() as u64);
        let cap = now_ms.saturating_sub(ttl_ms.saturating_mul(MAX_HOLD_TTLS));
        after_ttl.min(owed_from).max(cap)
    }

    /// When [`Node::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.next_sync.min(self.next_gc);
        if let Some(since) = self.collisions.values().min() {
            at = at.min(*since + self.s.gossip_interval * COLLISION_GRACE);
        }
        for t in [
            self.members.poll_timeout(),
            self.broadcast_at,
            self.next_announce,
            self.own_row_held.as_ref().map(|held| held.due),
        ]
        .into_iter()
        .flatten()
        {
            at = at.min(t);
        }
        if let Some(progress) = self.sessions.values().map(|s| s.progress).min() {
            at = at.min(progress + SYNC_TIMEOUT);
        }
        Some(at)
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    // ------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------

    fn event(&mut self, e: Event) {
        self.out.push_back(Output::Event(e));
    }

    fn jittered(&mut self, d: Duration) -> Duration {
        d.mul_f64(self.rng.random_range(0.8..1.2))
    }

    /// Seals foca's packets and reacts to membership changes.
    fn after_membership(&mut self, now: Now) {
        for (to, packet) in self.members.take_sends() {
            let bytes = self.sealer.seal(Kind::Swim, &packet, now.wall_ms);
            self.stats.gossip_bytes_sent += bytes.len() as u64;
            self.out.push_back(Output::Datagram { to, bytes });
        }
        for e in self.members.take_events() {
            // Said after the member's own event (up, then back late).
            let mut back = None;
            match &e {
                MemberEvent::Up(peer) | MemberEvent::Replaced { new: peer, .. } => {
                    self.restored_down.0.remove(&peer.id);
                    if let Some(since) = self.absences.down_since.remove(&peer.id) {
                        let down_ms = now.wall_ms.saturating_sub(since);
                        let ttl_ms = self.s.tombstone_ttl.as_millis() as u64;
                        if down_ms > ttl_ms {
                            let kept_for_it = self.absences.owed.get(&peer.id) == Some(&since)
                                && down_ms <= ttl_ms.saturating_mul(MAX_HOLD_TTLS);
                            back = Some(Event::PeerBackAfterTombstoneTtl {
                                peer: peer.id.clone(),
                                down_ms,
                                ttl_ms,
                                kept_for_it,
                            });
                        }
                    }
                    if back.is_none() && self.is_forgotten(&peer.id) {
                        back = Some(Event::ForgottenMemberBack {
                            peer: peer.id.clone(),
                        });
                    }
                    if self.collision(&peer.id).is_some() {
                        self.collisions.entry(peer.id.clone()).or_insert(now.mono);
                    }
                    // A member that (re)appears may have missed anything:
                    // compare with it now rather than at some random later
                    // sync.
                    if !self.sync_queue.contains(&peer.id) {
                        self.sync_queue.push_back(peer.id.clone());
                    }
                }
                MemberEvent::Down(peer) => {
                    self.restored_down.0.remove(&peer.id);
                    // The POP is down only if no other identity (the POP at
                    // a new address) holds the id; the first time counts.
                    if peer.id != self.s.id && self.holder_of(&peer.id).is_none() {
                        self.absences
                            .down_since
                            .entry(peer.id.clone())
                            .or_insert(now.wall_ms);
                        self.absences
                            .owed
                            .entry(peer.id.clone())
                            .or_insert(now.wall_ms);
                    }
                    self.sessions.retain(|_, s| s.peer != peer.id);
                    // Another identity of its id (an impostor until now, or
                    // the POP at its new address) may hold the id now.
                    if peer.id != self.s.id
                        && self.holder_of(&peer.id).is_some()
                        && !self.sync_queue.contains(&peer.id)
                    {
                        self.sync_queue.push_back(peer.id.clone());
                    }
                }
                MemberEvent::Rejoined => {
                    self.rejoining = true;
                    self.next_announce = Some(now.mono);
                }
                MemberEvent::Alone => {
                    self.next_announce
                        .get_or_insert(now.mono + self.s.gossip_interval);
                }
                MemberEvent::Joined => self.rejoining = false,
                _ => {}
            }
            self.event(Event::Member(e));
            if let Some(back) = back {
                self.event(back);
            }
        }
    }

    fn envelope(&self, msg: Msg) -> Vec<u8> {
        wire::encode(&Envelope {
            cluster: self.s.cluster.clone(),
            schema: self.s.schema,
            protocol: PROTOCOL,
            from: self.s.id.clone(),
            reply_to: self.s.transport_addr,
            msg,
        })
    }

    fn send(&mut self, _now: Now, to: SocketAddr, msg: Msg, sync: bool) {
        let kind = msg.kind();
        let bytes = self.envelope(msg);
        if sync || kind.starts_with("sync") {
            self.stats.sync_bytes_sent += bytes.len() as u64;
        } else {
            self.stats.broadcast_bytes_sent += bytes.len() as u64;
        }
        self.out.push_back(Output::Message { to, kind, bytes });
    }

    /// Merges rows from `peer`; returns those that won (now ours), after
    /// queueing them to be persisted.
    fn merge_rows(
        &mut self,
        now: Now,
        peer: &NodeId,
        rows: Vec<RowVersion>,
        via: Path,
    ) -> Vec<RowVersion> {
        let mut applied = Vec::new();
        let mut previous = Vec::new();
        let mut lag_ms = 0;
        let own_row = RowKey::new(Table::Pops, &*self.s.id);
        let (mut restored, mut restored_previous) = (Vec::new(), Vec::new());
        let collectable = Hlc::new(self.collect_before(now.wall_ms), 0);
        for row in rows {
            if let Err(drift) = self.clock.observe(row.version.hlc, now.wall_ms) {
                self.event(Event::ClockDrift {
                    peer: peer.clone(),
                    ahead_ms: drift.ahead_ms,
                });
                continue;
            }
            if row.intent.as_ref().is_some_and(|i| i.hlc > row.version.hlc) {
                // A verdict sits on an earlier deliberate write: a later
                // intent is no write any POP made. Intents decide first, so
                // taken, it would beat every write made until then (up to
                // any time ahead: the drift rule holds for versions).
                self.event(Event::MalformedRow {
                    peer: peer.clone(),
                    key: row.key,
                    reason: "its intent is later than its version",
                });
                continue;
            }
            let held = self.replica.get(&row.key);
            if held.is_none() && row.is_tombstone() && row.version.hlc < collectable {
                // A tombstone this node would collect now, of a row it does
                // not hold: from a peer whose collection has not run yet
                // (every node's runs at its own moments). Taken, it would be
                // handed back to the peers that have collected it, again
                // and again: collected nowhere, for good.
                continue;
            }
            if row.is_tombstone()
                && row.key == own_row
                && held
                    .as_ref()
                    .is_some_and(|h| !h.is_tombstone() && row.stamp().beats(&h.stamp()))
            {
                // Another POP forgot this one while it was down. It is
                // back: its row again, newer than the deletion (the clock
                // has just observed it), so every POP lists it again.
                let held = held.expect("checked");
                let again = RowVersion {
                    key: row.key.clone(),
                    version: Version {
                        hlc: self.clock.now(now.wall_ms),
                        origin: self.s.id.clone(),
                    },
                    intent: None,
                    data: held.data.clone(),
                };
                self.replica.put(again.clone());
                self.pending.push(again.clone());
                self.broadcast_at
                    .get_or_insert(now.mono + self.s.broadcast_delay);
                restored.push(again);
                restored_previous.push(Some(held));
                self.event(Event::OwnRowRestored {
                    by: row.version.origin.clone(),
                });
                continue;
            }
            match self.replica.merge(row.clone()) {
                Merge::Applied { .. } => {
                    lag_ms = lag_ms.max(now.wall_ms.saturating_sub(row.version.hlc.physical_ms()));
                    applied.push(row);
                    previous.push(held);
                }
                Merge::Stale => self.stats.conflicts += 1,
                Merge::Duplicate => {}
            }
        }
        if !applied.is_empty() {
            self.stats.rows_applied += applied.len() as u64;
            // Only a broadcast's delay is replication's: rows an exchange
            // brings are late by however long the two were apart (QA: a
            // partition's catch-up showed as minutes of lag).
            if via == Path::Broadcast {
                let p = self.peers.entry(peer.clone()).or_default();
                p.last_lag_ms = Some(lag_ms);
            }
            self.out.push_back(Output::Persist(Persist {
                rows: applied.clone(),
                previous,
                counted: true,
            }));
            self.event(Event::Applied {
                from: peer.clone(),
                rows: applied.len(),
                lag_ms,
                via,
            });
            if applied.iter().any(|r| r.key == own_row) {
                // Persisted (queued above) before the row is written.
                self.release_own_row(OwnRowDue::CopyArrived);
            }
        }
        if !restored.is_empty() {
            self.out.push_back(Output::Persist(Persist {
                rows: restored,
                previous: restored_previous,
                counted: false,
            }));
        }
        applied
    }

    /// The database refused `batch` (locked, full). The replica goes back
    /// to what it held before those rows won, which is what the database
    /// still holds: its digests then differ from the peers' again, and
    /// anti-entropy brings the rows once more. Left as they were, the
    /// replica matched the peers and nothing ever brought the rows again.
    /// A row that has won again since (a newer version, with a batch of its
    /// own) is left alone.
    pub fn persist_failed(&mut self, batch: Persist) {
        if batch.counted {
            // Not applied after all: the rows come again. Counted at every
            // exchange, a full disk made this counter climb by the whole
            // backlog every sync interval while nothing was written. The
            // driver publishes stats only after the batch's fate is known,
            // so the counter is never seen going down.
            self.stats.rows_applied = self
                .stats
                .rows_applied
                .saturating_sub(batch.rows.len() as u64);
        }
        self.take_back(batch.rows, batch.previous);
    }

    fn queue_forward(&mut self, now: Now, hops: u8, from: &NodeId, rows: Vec<RowVersion>) {
        for row in rows {
            self.forward.push((hops, from.clone(), row));
        }
        self.broadcast_at
            .get_or_insert(now.mono + self.s.broadcast_delay);
    }

    /// Sends pending local changes and rows to forward.
    fn flush_broadcast(&mut self, now: Now) {
        let active = self.usable_members();
        let local = std::mem::take(&mut self.pending);
        if !local.is_empty() && !active.is_empty() {
            if active.len() <= DIRECT_LIMIT {
                for p in &active {
                    self.send_changes(now, p.transport, 0, &local);
                }
            } else {
                let targets = self.pick(&active, fanout(active.len()), &[]);
                for to in targets {
                    self.send_changes(now, to, MAX_HOPS, &local);
                }
            }
        }
        let forward = std::mem::take(&mut self.forward);
        // Group by (hops, sender) so each group excludes its sender.
        let mut groups: BTreeMap<(u8, NodeId), Vec<RowVersion>> = BTreeMap::new();
        for (hops, from, row) in forward {
            groups.entry((hops, from)).or_default().push(row);
        }
        for ((hops, from), rows) in groups {
            let exclude: Vec<&NodeId> = rows
                .iter()
                .map(|r| &r.version.origin)
                .chain(std::iter::once(&from))
                .collect();
            let exclude: Vec<NodeId> = exclude.into_iter().cloned().collect();
            let targets = self.pick(&active, fanout(active.len()), &exclude);
            for to in targets {
                self.send_changes(now, to, hops, &rows);
            }
        }
    }

    fn pick(&mut self, active: &[Peer], n: usize, exclude: &[NodeId]) -> Vec<SocketAddr> {
        let mut candidates: Vec<&Peer> =
            active.iter().filter(|p| !exclude.contains(&p.id)).collect();
        candidates.shuffle(&mut self.rng);
        candidates
            .into_iter()
            .take(n)
            .map(|p| p.transport)
            .collect()
    }

    fn send_changes(&mut self, now: Now, to: SocketAddr, hops: u8, rows: &[RowVersion]) {
        for chunk in chunk_by_bytes(rows, limits::BROADCAST_BYTES) {
            self.send(
                now,
                to,
                Msg::Changes {
                    hops,
                    rows: chunk.to_vec(),
                },
                false,
            );
        }
    }

    /// Starts anti-entropy exchanges: queued peers first, then (when
    /// `random`) one random active member.
    fn start_syncs(&mut self, now: Now, random: bool) {
        let active = self.usable_members();
        let busy = |sessions: &HashMap<u64, Session>, id: &NodeId| {
            sessions.values().any(|s| &s.peer == id)
        };
        let mut started = 0;
        while self.sessions.len() < limits::SYNCS_IN_FLIGHT {
            let Some(id) = self.sync_queue.pop_front() else {
                break;
            };
            if busy(&self.sessions, &id) {
                continue;
            }
            if let Some(p) = active.iter().find(|p| p.id == id) {
                self.start_sync(now, p.clone());
                started += 1;
            }
        }
        if random && started == 0 && self.sessions.len() < limits::SYNCS_IN_FLIGHT {
            let idle: Vec<&Peer> = active
                .iter()
                .filter(|p| !busy(&self.sessions, &p.id))
                .collect();
            if !idle.is_empty() {
                let p = idle[self.rng.random_range(0..idle.len())].clone();
                self.start_sync(now, p);
            }
        }
    }

    fn start_sync(&mut self, now: Now, peer: Peer) {
        let session: u64 = self.rng.random();
        self.sessions.insert(
            session,
            Session {
                peer: peer.id.clone(),
                started: now.mono,
                progress: now.mono,
                partial: false,
            },
        );
        let msg = Msg::SyncTop {
            session,
            top: self.replica.top_digest(),
            rows: self.replica.len() as u64,
        };
        self.send(now, peer.transport, msg, true);
    }

    /// What an exchange with `peer` may carry.
    fn budget(&self, peer: &NodeId) -> SyncBudget {
        self.budgets.get(peer).copied().unwrap_or_default()
    }

    /// Versions of whole buckets among `differing`, up to `limit` (a
    /// bucket over it alone is listed whole).
    fn versions_for(&self, differing: &[u16], limit: usize) -> (Vec<u16>, Vec<(RowKey, Stamp)>) {
        let mut buckets = Vec::new();
        let mut versions = Vec::new();
        for &b in differing {
            let listed: Vec<(RowKey, Stamp)> = self
                .replica
                .versions_in(&[b])
                .map(|(k, v)| (k.clone(), v))
                .collect();
            if !buckets.is_empty() && versions.len() + listed.len() > limit {
                break;
            }
            buckets.push(b);
            versions.extend(listed);
        }
        (buckets, versions)
    }

    /// The responder's half: given the initiator's versions of whole
    /// `buckets`, the rows to send it and the keys to ask for.
    fn compare(
        &self,
        buckets: &[u16],
        theirs: Vec<(RowKey, Stamp)>,
        budget: SyncBudget,
    ) -> (Vec<RowVersion>, Vec<RowKey>, bool) {
        let mut rows = Vec::new();
        let mut want = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        let mut push = |row: RowVersion, rows: &mut Vec<RowVersion>, more: &mut bool| {
            if bytes + row.wire_size() > budget.row_bytes() && !rows.is_empty() {
                *more = true;
                return;
            }
            bytes += row.wire_size();
            rows.push(row);
        };
        let their_map: HashMap<&RowKey, &Stamp> = theirs.iter().map(|(k, v)| (k, v)).collect();
        // Each key and bucket once, however many times a (broken) peer
        // lists it: walked as listed, a message of a few MB kept the
        // control thread busy for tens of seconds.
        let mut seen: HashSet<&RowKey> = HashSet::new();
        for (key, v) in &theirs {
            if !seen.insert(key) {
                continue;
            }
            match self.replica.stamp_of(key) {
                Some(mine) if mine.beats(v) => {
                    if let Some(row) = self.replica.get(key) {
                        push(row, &mut rows, &mut more);
                    }
                }
                Some(mine) if mine == *v => {}
                _ => {
                    if want.len() < budget.wants() {
                        want.push(key.clone());
                    } else {
                        more = true;
                    }
                }
            }
        }
        // In the order listed: the initiator lists from its end (see
        // `Msg::SyncBuckets`), and what fits the budget comes first.
        let mut walked: HashSet<u16> = HashSet::new();
        for &b in buckets.iter().filter(|&&b| walked.insert(b)) {
            for key in self.replica.keys_in(b) {
                if !their_map.contains_key(key) {
                    if let Some(row) = self.replica.get(key) {
                        push(row, &mut rows, &mut more);
                    }
                }
            }
        }
        (rows, want, more)
    }

    /// The rows for `keys`, up to `max_bytes`; true if some did not fit.
    fn rows_for(&self, keys: &[RowKey], max_bytes: usize) -> (Vec<RowVersion>, bool) {
        let mut rows = Vec::new();
        let mut bytes = 0;
        for key in keys {
            if let Some(row) = self.replica.get(key) {
                if bytes + row.wire_size() > max_bytes && !rows.is_empty() {
                    return (rows, true);
                }
                bytes += row.wire_size();
                rows.push(row);
            }
        }
        (rows, false)
    }
}

/// Splits rows into runs of at most `max` bytes (at least one row each).
fn chunk_by_bytes(rows: &[RowVersion], max: usize) -> Vec<&[RowVersion]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, row) in rows.iter().enumerate() {
        if i > start && bytes + row.wire_size() > max {
            chunks.push(&rows[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += row.wire_size();
    }
    if start < rows.len() {
        chunks.push(&rows[start..]);
    }
    chunks
}
