//! Many [`Node`]s over a simulated network: deterministic (one seed decides
//! every loss, delay and random choice), with simulated time, per-link delay
//! and jitter, datagram loss, partitions, links cut between two nodes, and
//! crashes.
//!
//! Gossip datagrams (UDP) are lost with the loss probability. Transport
//! messages ride QUIC, which retransmits: a message is never lost on a live
//! link, but each packet it needs that is lost costs a retransmission
//! timeout (modelled as one more round trip). Messages across a partition
//! or to a crashed node are lost (the QUIC connection would time out).
//!
//! Used by the replication tests (convergence, partitions, failure
//! detection) and by `perf --bin repl-sim` for the cost figures in README.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::node::{Event, Node, Now, Output, OwnRowDue, Settings};
use super::replica::Replica;
use super::version::{RowKey, RowVersion, Table};

/// The network and the nodes' settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: usize,
    /// One-way delay of every link.
    pub one_way: Duration,
    /// Up to this much extra delay per packet, uniformly.
    pub jitter: Duration,
    /// Probability that one packet is lost.
    pub loss: f64,
    /// What each direction of a link carries of transport messages, bytes
    /// per second (`None`: unlimited). Messages on one direction queue
    /// behind each other, as a QUIC connection's streams share its
    /// congestion window; gossip datagrams do not wait behind them.
    pub bandwidth: Option<u64>,
    pub seed: u64,
    pub gossip_interval: Duration,
    pub sync_interval: Duration,
    pub broadcast_delay: Duration,
    /// Tombstones are collected after this.
    pub tombstone_ttl: Duration,
}

impl SimConfig {
    /// The issue's WAN setting: 50 ms one way, 1 % loss, the shipped
    /// defaults for intervals.
    pub fn wan(nodes: usize, seed: u64) -> SimConfig {
        SimConfig {
            nodes,
            one_way: Duration::from_millis(50),
            jitter: Duration::from_millis(5),
            loss: 0.01,
            bandwidth: None,
            seed,
            gossip_interval: Duration::from_millis(1000),
            sync_interval: Duration::from_millis(2000),
            broadcast_delay: Duration::from_millis(5),
            tombstone_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug)]
struct Delivery {
    to: usize,
    from: SocketAddr,
    datagram: bool,
    bytes: Vec<u8>,
}

/// A simulated cluster.
pub struct Sim {
    pub cfg: SimConfig,
    start: Instant,
    now: Instant,
    wall0: u64,
    pub nodes: Vec<Node>,
    gossip_of: HashMap<SocketAddr, usize>,
    transport_of: HashMap<SocketAddr, usize>,
    queue: BTreeMap<(Instant, u64), Delivery>,
    /// When each direction of a link (from, to) has sent what it was
    /// given (with [`SimConfig::bandwidth`]).
    link_busy_until: HashMap<(usize, usize), Instant>,
    /// Transport bytes sent, by message kind, all nodes together.
    pub message_bytes: BTreeMap<&'static str, u64>,
    seq: u64,
    rng: StdRng,
    crashed: HashSet<usize>,
    /// Partition: nodes in different groups cannot talk. Empty: none.
    group: Vec<u8>,
    /// Links cut between two nodes (lower index first): what crosses them
    /// is dropped, whatever their groups; the nodes still reach the others.
    cut: HashSet<(usize, usize)>,
    /// Drop every transport message to these nodes (a lost broadcast).
    pub drop_messages_to: HashSet<usize>,
    /// Each node's database: the rows it persisted, by primary key (`None`:
    /// a tombstone).
    persisted: Vec<HashMap<String, Option<String>>>,
    /// These nodes' databases refuse writes of remote rows (locked, full).
    pub refuse_persist: HashSet<usize>,
    /// Events every node reported, in order: (time since start, node, event).
    pub events: Vec<(Duration, usize, Event)>,
    /// Node ids, by index: `n<i>` unless [`Sim::spawn`] said otherwise.
    ids: Vec<String>,
    /// Own `pops` rows held back (see [`Sim::restart_wiped`]): the
    /// identity each node writes when its row is due.
    held_identity: HashMap<usize, serde_json::Value>,
    /// When each held own row was written, and why then.
    pub own_rows_written: Vec<(Duration, usize, OwnRowDue)>,
}

/// The operator's columns of a `pops` row, which a POP restarted with its
/// database wiped takes from the cluster's copy (as `ReplDb::upsert_pop`
/// keeps them); the others are its identity, as this start has it.
const OPERATOR_COLUMNS: &[&str] = &["draining"];

fn addr(i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, (i / 250) as u8, (i % 250) as u8 + 1, 1)),
        port,
    )
}

impl Sim {
    /// `nodes` nodes, each started and told to join through node 0.
    pub fn new(cfg: SimConfig) -> Sim {
        let start = Instant::now();
        let wall0 = 1_800_000_000_000;
        let mut sim = Sim {
            start,
            now: start,
            wall0,
            nodes: Vec::new(),
            gossip_of: HashMap::new(),
            transport_of: HashMap::new(),
            queue: BTreeMap::new(),
            link_busy_until: HashMap::new(),
            message_bytes: BTreeMap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(cfg.seed),
            crashed: HashSet::new(),
            group: vec![0; cfg.nodes],
            cut: HashSet::new(),
            drop_messages_to: HashSet::new(),
            persisted: vec![HashMap::new(); cfg.nodes],
            refuse_persist: HashSet::new(),
            events: Vec::new(),
            ids: (0..cfg.nodes).map(|i| format!("n{i}")).collect(),
            held_identity: HashMap::new(),
            own_rows_written: Vec::new(),
            cfg,
        };
        for i in 0..sim.cfg.nodes {
            let node = sim.make_node(i, 1, Replica::new());
            sim.gossip_of.insert(addr(i, 4001), i);
            sim.transport_of.insert(addr(i, 4002), i);
            sim.nodes.push(node);
        }
        let seed = addr(0, 4001);
        for i in 1..sim.cfg.nodes {
            let now = sim.now();
            sim.nodes[i].join(now, &[seed]);
            sim.drain(i);
        }
        sim
    }

    fn make_node(&self, i: usize, generation: u64, replica: Replica) -> Node {
        self.make_node_advertising(i, generation, replica, i)
    }

    /// Node `i`, advertising the addresses of node `at`.
    fn make_node_advertising(
        &self,
        i: usize,
        generation: u64,
        replica: Replica,
        at: usize,
    ) -> Node {
        let s = Settings {
            id: Arc::from(self.ids[i].as_str()),
            cluster: "sim".into(),
            schema: 1,
            gossip_addr: addr(at, 4001),
            transport_addr: addr(at, 4002),
            generation,
            gossip_interval: self.cfg.gossip_interval,
            sync_interval: self.cfg.sync_interval,
            broadcast_delay: self.cfg.broadcast_delay,
            expected_size: self.cfg.nodes,
            tombstone_ttl: self.cfg.tombstone_ttl,
            gossip_key: Some([42; 32]),
            accepted_gossip_key: None,
            seed: self
                .cfg
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(i as u64 * 7919 + generation),
        };
        Node::new(s, replica, self.now())
    }

    pub fn now(&self) -> Now {
        Now {
            mono: self.now,
            wall_ms: self.wall0 + (self.now - self.start).as_millis() as u64,
        }
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn drain(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].poll_output() {
            match out {
                Output::Datagram { to, bytes } => {
                    if let Some(&j) = self.gossip_of.get(&to) {
                        self.send(i, j, true, bytes);
                    }
                }
                Output::Message { to, bytes, kind } => {
                    *self.message_bytes.entry(kind).or_default() += bytes.len() as u64;
                    if let Some(&j) = self.transport_of.get(&to) {
                        self.send(i, j, false, bytes);
                    }
                }
                Output::Persist(batch) if self.refuse_persist.contains(&i) => {
                    self.nodes[i].persist_failed(batch)
                }
                Output::Persist(batch) => {
                    for row in batch.rows {
                        self.persisted[i].insert(row.key.pk, row.data);
                    }
                }
                Output::Forget(_) => {}
                Output::WriteOwnRow(due) => {
                    self.own_rows_written.push((self.elapsed(), i, due));
                    let mut row = self.held_identity.remove(&i).unwrap_or_default();
                    let copy = self.persisted[i]
                        .get(&self.ids[i])
                        .cloned()
                        .flatten()
                        .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok());
                    if let (Some(copy), Some(row)) = (copy, row.as_object_mut()) {
                        for c in OPERATOR_COLUMNS {
                            if let Some(v) = copy.get(*c) {
                                row.insert(c.to_string(), v.clone());
                            }
                        }
                    }
                    self.write_pop(i, &row.to_string());
                }
                Output::Event(e) => self.events.push((self.elapsed(), i, e)),
            }
        }
    }

    fn link_up(&self, a: usize, b: usize) -> bool {
        !self.crashed.contains(&a)
            && !self.crashed.contains(&b)
            && self.group[a] == self.group[b]
            && !self.cut.contains(&(a.min(b), a.max(b)))
    }

    fn send(&mut self, from: usize, to: usize, datagram: bool, bytes: Vec<u8>) {
        if !self.link_up(from, to) || (!datagram && self.drop_messages_to.contains(&to)) {
            return;
        }
        let mut delay = self.cfg.one_way + self.jitter();
        if datagram {
            if self.rng.random_bool(self.cfg.loss) {
                return;
            }
        } else {
            if let Some(rate) = self.cfg.bandwidth {
                let busy = self.link_busy_until.entry((from, to)).or_insert(self.now);
                let sent = (*busy).max(self.now)
                    + Duration::from_secs_f64(bytes.len() as f64 / rate.max(1) as f64);
                *busy = sent;
                delay += sent - self.now;
            }
            // Each ~1200-byte packet of the message may be lost; each loss
            // costs QUIC a retransmission timeout, about one round trip more.
            let packets = bytes.len().div_ceil(1200).max(1);
            for _ in 0..packets {
                while self.rng.random_bool(self.cfg.loss) {
                    delay += self.cfg.one_way * 3;
                }
            }
        }
        self.seq += 1;
        let from_addr = if datagram {
            addr(from, 4001)
        } else {
            addr(from, 4002)
        };
        self.queue.insert(
            (self.now + delay, self.seq),
            Delivery {
                to,
                from: from_addr,
                datagram,
                bytes,
            },
        );
    }

    fn jitter(&mut self) -> Duration {
        let j = self.cfg.jitter.as_micros() as u64;
        if j == 0 {
            Duration::ZERO
        } else {
            Duration::from_micros(self.rng.random_range(0..j))
        }
    }

    /// Runs until `deadline` (simulated time since start), or until `done`
    /// holds (checked after every step). Returns whether `done` held.
    pub fn run_until(&mut self, deadline: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.start + deadline;
        loop {
            if done(self) {
                return true;
            }
            let next_delivery = self.queue.keys().next().map(|(t, _)| *t);
            let next_timer = (0..self.nodes.len())
                .filter(|i| !self.crashed.contains(i))
                .filter_map(|i| self.nodes[i].poll_timeout().map(|t| (t, i)))
                .min();
            let next = match (next_delivery, next_timer) {
                (None, None) => return false,
                (Some(d), None) => d,
                (None, Some((t, _))) => t,
                (Some(d), Some((t, _))) => d.min(t),
            };
            if next > end {
                self.now = end;
                return done(self);
            }
            self.now = self.now.max(next);
            if next_delivery == Some(next) {
                let (_, d) = self.queue.pop_first().expect("peeked");
                if self.crashed.contains(&d.to) {
                    continue;
                }
                // A link cut while a packet was on its way drops it (a
                // firewall rule drops what arrives after it).
                let sender = if d.datagram {
                    self.gossip_of.get(&d.from)
                } else {
                    self.transport_of.get(&d.from)
                };
                if sender.is_some_and(|&f| self.cut.contains(&(f.min(d.to), f.max(d.to)))) {
                    continue;
                }
                let now = self.now();
                if d.datagram {
                    self.nodes[d.to].handle_datagram(now, d.from, &d.bytes);
                } else {
                    self.nodes[d.to].handle_message(now, d.from, &d.bytes);
                }
                self.drain(d.to);
            } else if let Some((_, i)) = next_timer {
                let now = self.now();
                self.nodes[i].handle_timeout(now);
                self.drain(i);
            }
        }
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.elapsed() + d;
        self.run_until(until, |_| false);
    }

    /// Every live node sees every other live node as active.
    pub fn membership_complete(&self) -> bool {
        let live = self.nodes.len() - self.crashed.len();
        (0..self.nodes.len())
            .filter(|i| !self.crashed.contains(i))
            .all(|i| self.nodes[i].active_members() == live - 1)
    }

    /// Writes a row at node `i` (as its database's change log would report).
    /// Returns the version it got (none when the data did not change), for
    /// tests that check which write won.
    pub fn write(&mut self, i: usize, pk: &str, data: Option<&str>) -> Vec<RowVersion> {
        let now = self.now();
        let written = self.nodes[i].local_writes(
            now,
            [(RowKey::new(Table::Backends, pk), data.map(String::from))],
        );
        self.persisted[i].insert(pk.to_string(), data.map(String::from));
        self.drain(i);
        written
    }

    /// Writes many rows at node `i` in one transaction (a bulk import).
    pub fn write_many(&mut self, i: usize, rows: impl IntoIterator<Item = (String, String)>) {
        let now = self.now();
        let rows: Vec<(String, String)> = rows.into_iter().collect();
        self.nodes[i].local_writes(
            now,
            rows.iter()
                .map(|(pk, data)| (RowKey::new(Table::Backends, pk), Some(data.clone()))),
        );
        for (pk, data) in rows {
            self.persisted[i].insert(pk, Some(data));
        }
        self.drain(i);
    }

    /// Writes a row at node `i` as its own verdict (an expiry, heartbeats
    /// taken over) would. Returns the version it got, as [`Sim::write`].
    pub fn write_verdict(&mut self, i: usize, pk: &str, data: &str) -> Vec<RowVersion> {
        self.write_as(i, pk, data, super::node::WriteKind::Verdict)
    }

    /// Writes a row at node `i` as the registration API would. Returns the
    /// version it got, as [`Sim::write`].
    pub fn write_registration(&mut self, i: usize, pk: &str, data: &str) -> Vec<RowVersion> {
        self.write_as(i, pk, data, super::node::WriteKind::Registration)
    }

    fn write_as(
        &mut self,
        i: usize,
        pk: &str,
        data: &str,
        kind: super::node::WriteKind,
    ) -> Vec<RowVersion> {
        let now = self.now();
        let written = self.nodes[i].local_writes_by_kind(
            now,
            [(
                RowKey::new(Table::Backends, pk),
                Some(data.to_string()),
                kind,
            )],
        );
        self.persisted[i].insert(pk.to_string(), Some(data.to_string()));
        self.drain(i);
        written
    }

    /// Writes node `i`'s own row of `pops` as `data` (JSON), as its
    /// database's change log would report: a drain, an identity at start.
    /// Written now, not queued: the caller may be draining node `i`'s
    /// output.
    /// Returns the version it got, as [`Sim::write`].
    pub fn write_pop(&mut self, i: usize, data: &str) -> Vec<RowVersion> {
        let now = self.now();
        let id = self.ids[i].clone();
        let written = self.nodes[i].local_writes(
            now,
            [(RowKey::new(Table::Pops, &id), Some(data.to_string()))],
        );
        self.persisted[i].insert(id, Some(data.to_string()));
        written
    }

    /// Node `i`'s id.
    pub fn id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    /// Node `i`'s own `pops` row as node `at` holds it, parsed.
    pub fn pop_row(&self, at: usize, i: usize) -> Option<serde_json::Value> {
        let key = RowKey::new(Table::Pops, &self.ids[i]);
        let data = self.nodes[at].replica().data(&key)?;
        serde_json::from_str(data).ok()
    }

    /// Writes node `i`'s own row of `pops` (as its driver does at start).
    pub fn write_own_pop(&mut self, i: usize) {
        let now = self.now();
        let id = self.ids[i].clone();
        let data = format!(r#"{{"node_id":"{id}"}}"#);
        self.nodes[i].local_writes(now, [(RowKey::new(Table::Pops, &id), Some(data.clone()))]);
        self.persisted[i].insert(id, Some(data));
        self.drain(i);
    }

    /// `cluster forget id` at node `i`.
    pub fn forget(
        &mut self,
        i: usize,
        id: &str,
    ) -> Result<super::node::Forgotten, super::node::ForgetRefused> {
        let now = self.now();
        let result = self.nodes[i].forget(now, id);
        self.drain(i);
        result
    }

    /// Node `i`'s database holds `data` for `pk`.
    pub fn persisted(&self, i: usize, pk: &str, data: Option<&str>) -> bool {
        self.persisted[i].get(pk).map(Option::as_deref) == Some(data)
    }

    /// Every live node holds `data` for `pk` (of `backends`).
    pub fn everyone_has(&self, pk: &str, data: Option<&str>) -> bool {
        self.everyone_holds(&RowKey::new(Table::Backends, pk), data)
    }

    /// Every live node holds `data` for `key`.
    pub fn everyone_holds(&self, key: &RowKey, data: Option<&str>) -> bool {
        (0..self.nodes.len())
            .filter(|i| !self.crashed.contains(i))
            .all(|i| self.nodes[i].replica().data(key) == data)
    }

    /// Every live node holds exactly the same row versions.
    pub fn converged(&self) -> bool {
        let mut tops = (0..self.nodes.len())
            .filter(|i| !self.crashed.contains(i))
            .map(|i| {
                (
                    self.nodes[i].replica().top_digest(),
                    self.nodes[i].replica().len(),
                )
            });
        let first = tops.next();
        tops.all(|t| Some(t) == first)
    }

    /// Splits the cluster: `side[i]` is node i's side.
    pub fn partition(&mut self, side: impl Fn(usize) -> u8) {
        for i in 0..self.nodes.len() {
            self.group[i] = side(i);
        }
    }

    pub fn heal(&mut self) {
        self.group.iter_mut().for_each(|g| *g = 0);
        self.cut.clear();
    }

    /// Cuts the link between nodes `a` and `b` (both keep reaching the
    /// others), or restores it.
    pub fn set_link(&mut self, a: usize, b: usize, up: bool) {
        let pair = (a.min(b), a.max(b));
        if up {
            self.cut.remove(&pair);
        } else {
            self.cut.insert(pair);
        }
    }

    /// Every live node sees every other live node alive (none suspect or
    /// down): the members each node lists, by id.
    pub fn everyone_alive(&self) -> bool {
        self.not_alive().is_empty()
    }

    /// (observer, member id, state) of every live node's view of another
    /// live node that is not alive, or that it does not list at all.
    pub fn not_alive(&self) -> Vec<(usize, String, &'static str)> {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|i| !self.crashed.contains(i))
            .collect();
        let mut wrong = Vec::new();
        for &o in &live {
            let members = self.nodes[o].members();
            for &n in live.iter().filter(|&&n| n != o) {
                let id = self.ids[n].as_str();
                let state = members
                    .iter()
                    .filter(|m| &*m.peer.id == id)
                    .map(|m| m.state)
                    .max_by_key(|s| *s == super::membership::MemberState::Alive);
                match state {
                    Some(super::membership::MemberState::Alive) => {}
                    Some(s) => wrong.push((o, id.to_string(), s.as_str())),
                    None => wrong.push((o, id.to_string(), "missing")),
                }
            }
        }
        wrong
    }

    /// Stops node `i` at once (kill -9): it sends and receives nothing.
    pub fn crash(&mut self, i: usize) {
        self.crashed.insert(i);
    }

    /// Starts node `i` again with what it had persisted (its replica, when
    /// it last heard a member, the members' absences) and a new generation, joining through
    /// node `via`.
    pub fn restart(&mut self, i: usize, via: usize) {
        let replica = self.nodes[i].replica().clone();
        let last_contact = self.nodes[i].last_contact();
        let absences = self.nodes[i].absences().clone();
        let generation = self.nodes[i].settings().generation + 1;
        self.crashed.remove(&i);
        self.nodes[i] = self.make_node(i, generation, replica);
        self.nodes[i].set_last_contact(last_contact);
        let now = self.now();
        self.nodes[i].restore_absences(now, absences);
        self.nodes[i].join(now, &[addr(via, 4001)]);
        self.drain(i);
    }

    /// Starts node `i` again with its database wiped (nothing persisted, a
    /// new generation), joining through node `via`, as the driver does: its
    /// own `pops` row, `identity` (JSON), is held back until the node says
    /// it is due ([`Node::hold_own_row`], with `waits`: the patience and the
    /// longest wait), then written with the operator's columns of the copy
    /// that arrived meanwhile.
    pub fn restart_wiped(
        &mut self,
        i: usize,
        via: usize,
        identity: &str,
        waits: (Duration, Duration),
    ) {
        let generation = self.nodes[i].settings().generation + 1;
        self.crashed.remove(&i);
        self.persisted[i].clear();
        self.nodes[i] = self.make_node(i, generation, Replica::new());
        self.hold_own_row(i, identity, waits);
        let now = self.now();
        self.nodes[i].join(now, &[addr(via, 4001)]);
        self.drain(i);
    }

    /// Node `i` holds its own row, `identity`, back (see
    /// [`Sim::restart_wiped`]). Call before it joins.
    fn hold_own_row(
        &mut self,
        i: usize,
        identity: &str,
        (patience, longest): (Duration, Duration),
    ) {
        self.held_identity
            .insert(i, serde_json::from_str(identity).expect("identity is JSON"));
        let now = self.now();
        self.nodes[i].hold_own_row(now, patience, longest);
    }

    /// [`Sim::spawn`] with a wiped database: `id`'s node moved to a new
    /// address, on a new disk, holding its own row as
    /// [`Sim::restart_wiped`] does.
    pub fn spawn_wiped(
        &mut self,
        id: &str,
        generation: u64,
        via: usize,
        identity: &str,
        waits: (Duration, Duration),
    ) -> usize {
        let i = self.nodes.len();
        self.ids.push(id.to_string());
        self.group.push(0);
        self.persisted.push(HashMap::new());
        let node = self.make_node(i, generation, Replica::new());
        self.gossip_of.insert(addr(i, 4001), i);
        self.transport_of.insert(addr(i, 4002), i);
        self.nodes.push(node);
        self.hold_own_row(i, identity, waits);
        let now = self.now();
        self.nodes[i].join(now, &[addr(via, 4001)]);
        self.drain(i);
        i
    }

    /// Starts one more node, at an address of its own, with `id` (which
    /// another node may already use), `generation` and `replica`, joining
    /// through node `via`. Returns its index.
    pub fn spawn(&mut self, id: &str, generation: u64, replica: Replica, via: usize) -> usize {
        let i = self.nodes.len();
        self.ids.push(id.to_string());
        self.group.push(0);
        self.persisted.push(HashMap::new());
        let node = self.make_node(i, generation, replica);
        self.gossip_of.insert(addr(i, 4001), i);
        self.transport_of.insert(addr(i, 4002), i);
        self.nodes.push(node);
        let now = self.now();
        self.nodes[i].join(now, &[addr(via, 4001)]);
        self.drain(i);
        i
    }

    /// Starts one more node with a new `id` that advertises node `at`'s
    /// addresses (a wrong `advertise_addr`): what is sent there reaches
    /// node `at`, not it. Returns its index.
    pub fn spawn_advertising(&mut self, id: &str, generation: u64, at: usize, via: usize) -> usize {
        let i = self.nodes.len();
        self.ids.push(id.to_string());
        self.group.push(0);
        self.persisted.push(HashMap::new());
        let node = self.make_node_advertising(i, generation, Replica::new(), at);
        self.nodes.push(node);
        let now = self.now();
        self.nodes[i].join(now, &[addr(via, 4001)]);
        self.drain(i);
        i
    }

    /// The gossip address of node `i`.
    pub fn gossip_addr(&self, i: usize) -> SocketAddr {
        addr(i, 4001)
    }

    /// Total bytes node `i` has sent (gossip, broadcast, sync).
    pub fn bytes_sent(&self, i: usize) -> u64 {
        let s = &self.nodes[i].stats;
        s.gossip_bytes_sent + s.broadcast_bytes_sent + s.sync_bytes_sent
    }

    /// First time (since start) node `observer` reported `peer` down.
    pub fn saw_down(&self, observer: usize, peer: usize) -> Option<Duration> {
        let id = format!("n{peer}");
        self.events.iter().find_map(|(t, i, e)| match e {
            Event::Member(super::membership::MemberEvent::Down(p))
                if *i == observer && &*p.id == id.as_str() =>
            {
                Some(*t)
            }
            _ => None,
        })
    }
}
