//! Fuzzing what replication takes from other POPs: transport frames and
//! messages, sealed gossip datagrams, a node fed whatever an authenticated
//! but buggy peer might send, and the rows it hands to the database; then
//! randomised deterministic simulations of whole clusters under faults.
//!
//! `bolero` property tests: under `cargo test` each target runs random
//! inputs for `EDGEPROXY_FUZZ_SECS` seconds (default 5 here, there are
//! seven) on stable Rust; `cargo bolero test --engine libfuzzer` runs them
//! coverage-guided. The simulation sweep runs `EDGEPROXY_SIM_SEEDS` seeds
//! (default 8, about a second) from `EDGEPROXY_SIM_FIRST_SEED` (default 0).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bolero::{check, TypeGenerator};
use control::replication::frame;
use control::replication::hlc::{Hlc, MAX_DRIFT_MS};
use control::replication::node::{Event, Node, Now, Output};
use control::replication::replica::{Replica, BUCKETS};
use control::replication::seal::{Kind, Refused, Sealer, MAX_AGE_MS};
use control::replication::sim::{Sim, SimConfig};
use control::replication::version::{RowKey, RowVersion, Stamp, Table, Version};
use control::replication::wire::{self, Envelope, Msg, MAX_MESSAGE_BYTES, PROTOCOL};

/// Seconds each bolero target runs under `cargo test`.
#[path = "../../tests/common/fuzz_budget.rs"]
mod fuzz_budget;

fn budget() -> Duration {
    fuzz_budget::budget(5)
}

// ---------------------------------------------------------------------------
// The largest single allocation, per thread: decoding must not allocate what
// a length prefix in the input claims before it checks it.
// ---------------------------------------------------------------------------

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The largest single allocation `f` made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// What decoding `n` bytes may allocate at once: a small multiple of the
/// input, or serde's cautious preallocation (at most 1 MiB for a sequence
/// whose length prefix is not yet backed by bytes).
fn allocation_bound(n: usize) -> usize {
    (64 * n).max(1 << 20) + 4096
}

// ---------------------------------------------------------------------------
// Transport frames and messages
// ---------------------------------------------------------------------------

/// A frame decodes within its limit, and without allocating in proportion
/// to anything but what it holds; an accepted message encodes back to one
/// that decodes the same.
fn frame_contract(bytes: &[u8], limit: usize) {
    let (decoded, largest) = largest_allocation(|| frame::decode(bytes.to_vec(), limit));
    if let Ok(message) = &decoded {
        assert!(
            message.len() <= limit.max(bytes.len()),
            "{} > {limit}",
            message.len()
        );
        message_contract(message);
    }
    // zstd sizes its output buffer by what the frame says it holds (or
    // by the limit, when it says nothing), checked against the limit
    // first: a small frame may make it allocate up to the limit, never
    // beyond.
    let produced = decoded.as_ref().map_or(0, Vec::len);
    assert!(
        largest <= allocation_bound(bytes.len() + produced).max(limit + 4096),
        "a {}-byte frame made a {largest}-byte allocation (limit {limit})",
        bytes.len()
    );
}

fn message_contract(bytes: &[u8]) {
    let (decoded, largest) = largest_allocation(|| wire::decode(bytes));
    assert!(
        largest <= allocation_bound(bytes.len()),
        "a {}-byte message made a {largest}-byte allocation",
        bytes.len()
    );
    if let Ok(env) = decoded {
        let again = wire::encode(&env);
        assert_eq!(wire::decode(&again).unwrap(), env);
        // And framed, compressed or not.
        let framed = frame::encode(&again);
        assert_eq!(frame::decode(framed, MAX_MESSAGE_BYTES).unwrap(), again);
    }
}

#[test]
fn any_bytes_as_a_transport_frame() {
    check!()
        .with_test_time(budget())
        .with_max_len(8192)
        .for_each(|bytes: &[u8]| frame_contract(bytes, MAX_MESSAGE_BYTES));
}

/// Damages well-formed `bytes` (never empty): overwrites the bytes at
/// `edits` (positions wrap around), cuts them short at `cut`, appends `tail`.
fn damage(bytes: &mut Vec<u8>, edits: &[(u16, u8)], cut: Option<u16>, tail: &[u8]) {
    let len = bytes.len();
    for (at, byte) in edits {
        bytes[*at as usize % len] = *byte;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut as usize);
    }
    bytes.extend_from_slice(tail);
}

/// Frames that start right: a zstd frame header, or an encoded envelope,
/// then damaged (bytes overwritten, cut short, trailing bytes).
#[derive(Debug, TypeGenerator)]
struct DamagedFrame {
    envelope: GEnvelope,
    /// Repeat the rows this many times (large frames get compressed).
    repeat: u8,
    edits: Vec<(u16, u8)>,
    cut: Option<u16>,
    tail: Vec<u8>,
    limit: u32,
}

#[test]
fn damaged_frames_and_messages() {
    let now = 1_800_000_000_000;
    check!()
        .with_test_time(budget())
        .with_type::<DamagedFrame>()
        .for_each(|case| {
            let mut env = case.envelope.envelope(now, &Ids::default());
            if let Msg::Changes { rows, .. } = &mut env.msg {
                let one = rows.clone();
                for _ in 0..case.repeat {
                    rows.extend(one.iter().cloned());
                }
            }
            let message = wire::encode(&env);
            message_contract(&message);
            let mut bytes = frame::encode(&message);
            assert_eq!(
                frame::decode(bytes.clone(), MAX_MESSAGE_BYTES).unwrap(),
                message
            );
            damage(&mut bytes, &case.edits, case.cut, &case.tail);
            frame_contract(&bytes, (case.limit as usize) % (MAX_MESSAGE_BYTES + 1));
            // The damaged bytes as an unframed message (older peers).
            message_contract(&bytes);
        });
}

// ---------------------------------------------------------------------------
// Sealed gossip datagrams
// ---------------------------------------------------------------------------

const NOW: u64 = 1_800_000_000_000;

#[test]
fn any_bytes_as_a_gossip_datagram() {
    let mut secure = Sealer::new("edge", 3, Some([7; 32]), 1);
    let mut insecure = Sealer::new("edge", 3, None, 2);
    check!()
        .with_test_time(budget())
        .with_max_len(2048)
        .for_each(|bytes: &[u8]| {
            // Without the key nothing opens (2^-128 aside).
            assert!(secure.open(bytes, NOW).is_err());
            let _ = insecure.open(bytes, NOW);
        });
}

/// A datagram as a sender of this cluster (or another) would seal it, at
/// any time, then damaged or not, opened at any time.
#[derive(Debug, TypeGenerator)]
struct Datagram {
    secure: bool,
    sender_key: u8,
    cluster: Option<String>,
    schema: u32,
    kind: bool,
    payload: Vec<u8>,
    sent_at: SentAt,
    edits: Vec<(u16, u8)>,
    cut: Option<u16>,
    tail: Vec<u8>,
}

#[derive(Debug, TypeGenerator)]
enum SentAt {
    /// Milliseconds from the receiver's now.
    Near(i32),
    Any(u64),
}

#[test]
fn sealed_datagrams_open_once_and_only_whole() {
    check!()
        .with_test_time(budget())
        .with_type::<Datagram>()
        .for_each(|d| {
            let key = |k: u8| d.secure.then_some([k; 32]);
            // Configurations name clusters of 1 to 64 bytes.
            let cluster = match d.cluster.as_deref() {
                Some(c) if !c.is_empty() && c.len() <= 64 => c,
                _ => "edge",
            };
            let schema = if d.schema % 4 == 0 { d.schema } else { 3 };
            let mut sender = Sealer::new(cluster, schema, key(d.sender_key % 2), 1);
            let mut receiver = Sealer::new("edge", 3, key(0), 2);
            let sent_ms = match d.sent_at {
                SentAt::Near(ms) => NOW.saturating_add_signed(ms as i64),
                SentAt::Any(ms) => ms,
            };
            let kind = if d.kind { Kind::Swim } else { Kind::Refusal };
            let whole = sender.seal(kind, &d.payload, sent_ms);
            let mut bytes = whole.clone();
            damage(&mut bytes, &d.edits, d.cut, &d.tail);
            let first = receiver.open(&bytes, NOW);
            let second = receiver.open(&bytes, NOW);
            let same_key = !d.secure || d.sender_key % 2 == 0;
            let same_sender = cluster == "edge" && schema == 3 && same_key;
            let fresh = sent_ms.abs_diff(NOW) <= MAX_AGE_MS;
            match &first {
                Ok(opened) => {
                    // Without a secret, damage may make anything look right.
                    if d.secure || bytes == whole {
                        assert!(same_sender && fresh, "{first:?}");
                    }
                    if d.secure {
                        // Authenticated: exactly what was sealed, once.
                        assert_eq!(bytes, whole);
                        assert_eq!(opened.payload, d.payload);
                        assert_eq!(opened.kind, kind);
                        assert_eq!(second, Err(Refused::Replay));
                    }
                }
                Err(_) if bytes == whole && same_sender && fresh => {
                    panic!("an intact datagram was refused: {first:?}")
                }
                Err(_) => {}
            }
        });
}

/// Any order, any duplicates, of datagrams within the 64-counter window:
/// each opens exactly once.
#[test]
fn reordered_and_replayed_datagrams_open_exactly_once() {
    check!()
        .with_test_time(budget())
        .with_type::<(u8, Vec<u8>)>()
        .for_each(|(n, order)| {
            let n = (*n as usize % 64) + 1;
            let mut sender = Sealer::new("edge", 3, Some([7; 32]), 1);
            let mut receiver = Sealer::new("edge", 3, Some([7; 32]), 2);
            let sealed: Vec<Vec<u8>> = (0..n)
                .map(|i| sender.seal(Kind::Swim, &[i as u8], NOW))
                .collect();
            let mut opened = HashSet::new();
            for i in order.iter().map(|i| *i as usize % n).chain(0..n) {
                match receiver.open(&sealed[i], NOW) {
                    Ok(o) => assert!(opened.insert(o.payload[0]), "{i} opened twice"),
                    Err(Refused::Replay) => assert!(opened.contains(&(i as u8))),
                    Err(e) => panic!("{i}: {e}"),
                }
            }
            assert_eq!(opened.len(), n);
        });
}

// ---------------------------------------------------------------------------
// Generators of rows and messages
// ---------------------------------------------------------------------------

/// Ids the generated rows and messages use: the target's, its peer's.
struct Ids {
    target: String,
    peer: String,
}

impl Default for Ids {
    fn default() -> Ids {
        Ids {
            target: "n0".into(),
            peer: "n1".into(),
        }
    }
}

#[derive(Debug, TypeGenerator)]
enum GId {
    Target,
    Peer,
    Third,
    Any(String),
}

impl GId {
    fn id(&self, ids: &Ids) -> String {
        match self {
            GId::Target => ids.target.clone(),
            GId::Peer => ids.peer.clone(),
            GId::Third => "n2".into(),
            GId::Any(s) => s.clone(),
        }
    }
}

#[derive(Debug, TypeGenerator)]
enum GHlc {
    /// Milliseconds from now, and a counter.
    Near(i32, u16),
    /// Beyond the drift the clock accepts.
    Ahead(u32),
    Raw(u64),
    Zero,
}

impl GHlc {
    fn hlc(&self, now_ms: u64) -> Hlc {
        match self {
            GHlc::Near(ms, c) => Hlc::new(now_ms.saturating_add_signed(*ms as i64 % 120_000), *c),
            GHlc::Ahead(ms) => Hlc::new(now_ms + MAX_DRIFT_MS + 1 + *ms as u64, 0),
            GHlc::Raw(raw) => Hlc(*raw),
            GHlc::Zero => Hlc(0),
        }
    }
}

#[derive(Debug, TypeGenerator)]
enum GPk {
    Known(u8),
    Target,
    Peer,
    Empty,
    Any(String),
}

const PKS: &[&str] = &["b1", "b2", "b3", "b4", "b-5", "x"];

impl GPk {
    fn pk(&self, ids: &Ids) -> String {
        match self {
            GPk::Known(i) => PKS[*i as usize % PKS.len()].into(),
            GPk::Target => ids.target.clone(),
            GPk::Peer => ids.peer.clone(),
            GPk::Empty => String::new(),
            GPk::Any(s) => s.clone(),
        }
    }
}

#[derive(Debug, TypeGenerator)]
enum GData {
    /// The row as its table holds it: a JSON object keyed by the pk.
    Valid(u8),
    /// A JSON object keyed by another pk.
    OtherKey(String),
    /// A JSON object without its key column.
    NoKey,
    /// JSON, not an object.
    Scalar(i64),
    Any(String),
}

impl GData {
    fn data(&self, table: Table, pk: &str) -> String {
        let key = table.key_column();
        match self {
            GData::Valid(n) => match table {
                Table::Backends => serde_json::json!({
                    "id": pk, "app": "web", "region": "eu", "wg_ip": "10.0.0.1",
                    "port": 8000 + *n as u16, "healthy": 1, "weight": 1, "soft_limit": 10,
                    "hard_limit": 20, "deleted": 0, "country": null, "draining": 0,
                    "registered_at_ms": null, "expired": *n % 2, "heartbeat_pop": null,
                })
                .to_string(),
                Table::Pops => serde_json::json!({
                    "node_id": pk, "name": "pop", "region": "eu", "country": null,
                    "public_addrs": "", "private_addr": "", "gossip_addr": "",
                    "transport_addr": "", "wg_public_key": "", "wg_endpoint": "",
                    "prefix6": "", "draining": *n % 2, "serving": 1,
                })
                .to_string(),
            },
            GData::OtherKey(other) => serde_json::json!({ key: other }).to_string(),
            GData::NoKey => r#"{"app":"web"}"#.into(),
            GData::Scalar(n) => n.to_string(),
            GData::Any(s) => s.clone(),
        }
    }
}

#[derive(Debug, TypeGenerator)]
struct GRow {
    pops: bool,
    pk: GPk,
    hlc: GHlc,
    origin: GId,
    intent: Option<(GHlc, GId)>,
    data: Option<GData>,
}

impl GRow {
    fn row(&self, now_ms: u64, ids: &Ids) -> RowVersion {
        let table = if self.pops {
            Table::Pops
        } else {
            Table::Backends
        };
        let pk = self.pk.pk(ids);
        RowVersion {
            data: self.data.as_ref().map(|d| d.data(table, &pk)),
            key: RowKey::new(table, pk),
            version: Version {
                hlc: self.hlc.hlc(now_ms),
                origin: Arc::from(self.origin.id(ids)),
            },
            intent: self.intent.as_ref().map(|(h, o)| Version {
                hlc: h.hlc(now_ms),
                origin: Arc::from(o.id(ids)),
            }),
        }
    }
}

#[derive(Debug, TypeGenerator)]
enum GSession {
    /// One the target started (by index among those it started).
    Started(u8),
    Any(u64),
}

#[derive(Debug, TypeGenerator)]
enum GMsg {
    Changes {
        hops: u8,
        rows: Vec<GRow>,
    },
    SyncTop {
        session: GSession,
        top: u64,
        rows: u64,
    },
    SyncEqual {
        session: GSession,
    },
    SyncBuckets {
        session: GSession,
        /// `None`: the right number of buckets, all zero but these.
        buckets: Option<Vec<u64>>,
        set: Vec<(u8, u64)>,
    },
    SyncVersions {
        session: GSession,
        buckets: Vec<u16>,
        versions: Vec<GRow>,
    },
    SyncRows {
        session: GSession,
        rows: Vec<GRow>,
        want: Vec<(bool, GPk)>,
        more: bool,
    },
    SyncWanted {
        session: GSession,
        rows: Vec<GRow>,
    },
}

impl GMsg {
    fn msg(&self, now_ms: u64, ids: &Ids, sessions: &[u64]) -> Msg {
        let session = |s: &GSession| match s {
            GSession::Started(i) if !sessions.is_empty() => sessions[*i as usize % sessions.len()],
            GSession::Started(i) => *i as u64,
            GSession::Any(s) => *s,
        };
        let rows = |rows: &[GRow]| rows.iter().map(|r| r.row(now_ms, ids)).collect();
        match self {
            GMsg::Changes { hops, rows: r } => Msg::Changes {
                hops: *hops,
                rows: rows(r),
            },
            GMsg::SyncTop {
                session: s,
                top,
                rows,
            } => Msg::SyncTop {
                session: session(s),
                top: *top,
                rows: *rows,
            },
            GMsg::SyncEqual { session: s } => Msg::SyncEqual {
                session: session(s),
            },
            GMsg::SyncBuckets {
                session: s,
                buckets,
                set,
            } => {
                let mut b = buckets.clone().unwrap_or_else(|| vec![0; BUCKETS]);
                if !b.is_empty() {
                    for (i, v) in set {
                        let at = *i as usize % b.len();
                        b[at] = *v;
                    }
                }
                Msg::SyncBuckets {
                    session: session(s),
                    buckets: b,
                }
            }
            GMsg::SyncVersions {
                session: s,
                buckets,
                versions,
            } => Msg::SyncVersions {
                session: session(s),
                buckets: buckets.clone(),
                versions: versions
                    .iter()
                    .map(|r| {
                        let r = r.row(now_ms, ids);
                        let stamp: Stamp = r.stamp();
                        (r.key, stamp)
                    })
                    .collect(),
            },
            GMsg::SyncRows {
                session: s,
                rows: r,
                want,
                more,
            } => Msg::SyncRows {
                session: session(s),
                rows: rows(r),
                want: want
                    .iter()
                    .map(|(pops, pk)| {
                        let table = if *pops { Table::Pops } else { Table::Backends };
                        RowKey::new(table, pk.pk(ids))
                    })
                    .collect(),
                more: *more,
            },
            GMsg::SyncWanted {
                session: s,
                rows: r,
            } => Msg::SyncWanted {
                session: session(s),
                rows: rows(r),
            },
        }
    }
}

/// Who a message says it is from.
#[derive(Debug, TypeGenerator)]
enum GSender {
    /// The peer, as it is (the most of the time).
    Peer,
    /// The target's own id, echoed back, from the target's own address or
    /// from the peer's.
    Target { own_address: bool },
    /// An id no member holds.
    Stranger(String),
    /// Another cluster, schema or protocol.
    Mismatch(u8),
}

#[derive(Debug, TypeGenerator)]
struct GEnvelope {
    sender: GSender,
    msg: GMsg,
}

impl GEnvelope {
    fn envelope(&self, now_ms: u64, ids: &Ids) -> Envelope {
        self.envelope_in(now_ms, ids, &[], peer_transport(), target_transport())
    }

    fn envelope_in(
        &self,
        now_ms: u64,
        ids: &Ids,
        sessions: &[u64],
        peer_at: SocketAddr,
        target_at: SocketAddr,
    ) -> Envelope {
        let (from, reply_to) = match &self.sender {
            GSender::Peer | GSender::Mismatch(_) => (ids.peer.clone(), peer_at),
            GSender::Target { own_address: true } => (ids.target.clone(), target_at),
            GSender::Target { own_address: false } => (ids.target.clone(), peer_at),
            GSender::Stranger(id) => (id.clone(), peer_at),
        };
        let mut env = Envelope {
            cluster: "sim".into(),
            schema: 1,
            protocol: PROTOCOL,
            from: Arc::from(from.as_str()),
            reply_to,
            msg: self.msg.msg(now_ms, ids, sessions),
        };
        if let GSender::Mismatch(m) = self.sender {
            match m % 3 {
                0 => env.cluster = "other".into(),
                1 => env.schema = 2,
                _ => env.protocol = PROTOCOL.wrapping_add(1),
            }
        }
        env
    }
}

fn peer_transport() -> SocketAddr {
    "10.0.2.1:4002".parse().unwrap()
}

fn target_transport() -> SocketAddr {
    "10.0.1.1:4002".parse().unwrap()
}

// ---------------------------------------------------------------------------
// A node fed an authenticated but buggy peer's messages
// ---------------------------------------------------------------------------

#[derive(Debug, TypeGenerator)]
enum Step {
    Message(GEnvelope),
    /// The last message again (a duplicate).
    Again,
    /// Time passes (ms), timers run.
    Wait(u16),
    /// A local write at the target.
    Write {
        pk: GPk,
        data: Option<u8>,
    },
}

/// A two-node cluster, joined: node 0 is the target, node 1 the peer whose
/// identity the fuzzed messages use.
fn joined_pair(seed: u64) -> Sim {
    let mut sim = Sim::new(SimConfig::wan(2, seed));
    assert!(sim.run_until(Duration::from_secs(60), Sim::membership_complete));
    sim
}

/// The node's state is one it could have reached honestly.
struct Checker {
    /// The latest wall time the target was given.
    wall_ms: u64,
}

impl Checker {
    /// What the node hands to the database, and what it holds: no version
    /// further ahead of the clock than the drift allows, no intent (the
    /// deliberate write a verdict sits on) later than its own write; the
    /// digests are those of the rows held.
    fn output(&self, out: &Output) {
        if let Output::Persist(batch) = out {
            for row in &batch.rows {
                self.row(row, "persisted");
            }
        }
    }

    fn row(&self, row: &RowVersion, what: &str) {
        let limit = self.wall_ms + MAX_DRIFT_MS;
        assert!(
            row.version.hlc.physical_ms() <= limit,
            "{what} {}: version {} beyond the drift",
            row.key,
            row.version.hlc
        );
        if let Some(intent) = &row.intent {
            assert!(
                intent.hlc <= row.version.hlc,
                "{what} {}: intent {} after its version {}",
                row.key,
                intent.hlc,
                row.version.hlc
            );
        }
    }

    fn node(&self, node: &Node) {
        let mut rebuilt = Replica::new();
        for row in node.replica().iter() {
            // Rows this node wrote itself are valid by construction (the
            // generated local writes are); the rest came from the peer.
            self.row(&row, "held");
            rebuilt.put(row);
        }
        assert_eq!(rebuilt.len(), node.replica().len());
        assert_eq!(rebuilt.top_digest(), node.replica().top_digest());
        assert_eq!(rebuilt.bucket_digests(), node.replica().bucket_digests());
        assert!(
            node.clock().physical_ms() <= self.wall_ms + MAX_DRIFT_MS,
            "clock {} dragged beyond the drift",
            node.clock()
        );
    }
}

/// Drains the target's output: checks it, and notes the sessions it starts.
fn drain(node: &mut Node, check: &Checker, sessions: &mut Vec<u64>) {
    while let Some(out) = node.poll_output() {
        check.output(&out);
        if let Output::Message { bytes, .. } = &out {
            let env = wire::decode(bytes).expect("a node's own message decodes");
            if let Msg::SyncTop { session, .. } = env.msg {
                sessions.push(session);
            }
        }
    }
}

fn feed(sim: &mut Sim, steps: &[Step]) {
    let ids = Ids::default();
    let peer_at = sim.nodes[1].settings().transport_addr;
    let target_at = sim.nodes[0].settings().transport_addr;
    let mut now: Now = sim.now();
    let mut check = Checker {
        wall_ms: now.wall_ms,
    };
    let mut sessions = Vec::new();
    let mut last: Option<Vec<u8>> = None;
    let node = &mut sim.nodes[0];
    // Let the target start an exchange or two with the peer.
    for _ in 0..3 {
        now.mono += Duration::from_secs(3);
        now.wall_ms += 3000;
        check.wall_ms = now.wall_ms;
        node.handle_timeout(now);
        drain(node, &check, &mut sessions);
    }
    for step in steps {
        match step {
            Step::Message(g) => {
                let env = g.envelope_in(now.wall_ms, &ids, &sessions, peer_at, target_at);
                let bytes = wire::encode(&env);
                node.handle_message(now, peer_at, &bytes);
                last = Some(bytes);
            }
            Step::Again => {
                if let Some(bytes) = &last {
                    node.handle_message(now, peer_at, bytes);
                }
            }
            Step::Wait(ms) => {
                now.mono += Duration::from_millis(*ms as u64);
                now.wall_ms += *ms as u64;
                check.wall_ms = now.wall_ms;
                node.handle_timeout(now);
            }
            Step::Write { pk, data } => {
                let pk = pk.pk(&ids);
                let data = data.map(|n| GData::Valid(n).data(Table::Backends, &pk));
                node.local_writes(now, [(RowKey::new(Table::Backends, pk), data)]);
            }
        }
        drain(node, &check, &mut sessions);
        check.node(node);
    }
}

#[test]
fn a_node_fed_a_buggy_peers_messages_stays_consistent() {
    check!()
        .with_test_time(budget())
        .with_type::<(u8, Vec<Step>)>()
        .for_each(|(seed, steps)| {
            let mut sim = joined_pair(*seed as u64 % 4);
            feed(&mut sim, steps);
        });
}

// ---------------------------------------------------------------------------
// What reaches the database
// ---------------------------------------------------------------------------

/// The keys `table` holds.
fn keys_of(conn: &rusqlite::Connection, table: Table) -> HashSet<String> {
    let sql = format!(
        "SELECT {} FROM {} WHERE {0} IS NOT NULL",
        table.key_column(),
        table.name()
    );
    let mut stmt = conn.prepare(&sql).unwrap();
    let keys = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    keys
}

/// Whatever rows a peer's node hands over, the database writes every row
/// its table can hold and leaves out the others, each named: a batch never
/// fails for a row's content, a written row is where its key says, a
/// tombstone removes its row, and no other row moves.
#[test]
fn remote_rows_reach_the_tables_or_are_left_out() {
    use control::replication::db::ReplDb;
    use control::store::RoutingStore;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routing.db");
    RoutingStore::open(&path).unwrap();
    let db = ReplDb::open(&path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    // A panic ends the test: nothing is reused after one.
    let mut state = std::panic::AssertUnwindSafe((db, conn, 1u64 << 40));
    let ids = Ids::default();
    check!()
        .with_test_time(budget())
        .with_type::<Vec<GRow>>()
        .for_each(move |rows| {
            let (db, conn, hlc) = &mut *state;
            let conn = &*conn;
            let mut batch: Vec<RowVersion> = rows.iter().map(|r| r.row(NOW, &ids)).collect();
            // One version per key, as a node hands them over.
            let mut seen = HashSet::new();
            batch.retain(|r| seen.insert(r.key.clone()));
            for r in &mut batch {
                *hlc += 1;
                r.version.hlc = Hlc(*hlc);
            }
            let before: Vec<HashSet<String>> =
                Table::ALL.iter().map(|t| keys_of(conn, *t)).collect();
            let refused = db
                .persist_remote(&batch)
                .unwrap_or_else(|e| panic!("the batch failed: {e}"));
            let refused: HashSet<&RowKey> = refused.iter().map(|r| &r.key).collect();
            for (t, table) in Table::ALL.iter().enumerate() {
                let after = keys_of(conn, *table);
                let mine = |r: &&RowVersion| r.key.table == *table && !refused.contains(&r.key);
                for r in batch.iter().filter(mine) {
                    assert_eq!(
                        after.contains(&r.key.pk),
                        !r.is_tombstone(),
                        "{} {:?}",
                        r.key,
                        r.data
                    );
                }
                let touched: HashSet<&String> = batch
                    .iter()
                    .filter(|r| r.key.table == *table)
                    .map(|r| &r.key.pk)
                    .collect();
                let moved: Vec<&String> = before[t]
                    .symmetric_difference(&after)
                    .filter(|k| !touched.contains(k))
                    .collect();
                assert!(moved.is_empty(), "rows not in the batch moved: {moved:?}");
            }
        });
}

// ---------------------------------------------------------------------------
// Randomised simulations: faults, then convergence to the last writes
// ---------------------------------------------------------------------------

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Which writes a simulation makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// Deliberate writes and deletes of `backends` rows (an operator's).
    Deliberate,
    /// Every kind a POP makes: deliberate writes and deletes, registrations
    /// (versioned even when they repeat the row), verdicts (only the
    /// verdict columns of a live row changed, so they keep its intent) and
    /// each POP's own `pops` row.
    EveryKind,
}

/// A `backends` row as JSON, as an edit or a registration writes it: not
/// expired, its heartbeats its own POP's. A later write that changes only
/// `expired` or `heartbeat_pop` is a verdict.
fn backend_row(key: &str, note: &str) -> String {
    serde_json::json!({
        "id": key,
        "app": "sim",
        "note": note,
        "expired": 0,
        "heartbeat_pop": null,
    })
    .to_string()
}

/// One write of [`Writes::EveryKind`] at live node `i`: the versions it got
/// (none when it changed nothing), and what it was, for the log.
fn write_any_kind(
    sim: &mut Sim,
    rng: &mut rand::rngs::StdRng,
    i: usize,
    keys: &[&str],
) -> (Vec<RowVersion>, String) {
    use rand::RngExt;
    let at = format!("by n{i} at {:?}", sim.elapsed());
    if rng.random_range(0..10) < 2 {
        // The POP's own row: a drain set or lifted, as its operator does.
        let id = sim.id(i).to_string();
        let draining = rng.random_bool(0.5);
        let data =
            serde_json::json!({ "node_id": id, "draining": draining, "note": at }).to_string();
        let written = sim.write_pop(i, &data);
        return (written, format!("pop n{i} draining={draining}"));
    }
    let key = keys[rng.random_range(0..keys.len())];
    let held: Option<serde_json::Value> = sim.nodes[i]
        .replica()
        .data(&RowKey::new(Table::Backends, key))
        .and_then(|d| serde_json::from_str(d).ok());
    let written = match (rng.random_range(0..5), held) {
        // A verdict on the row as this POP holds it: expired flipped, or
        // its heartbeats taken over or given back.
        (0 | 1, Some(mut row)) => {
            if rng.random_bool(0.5) {
                let expired = row["expired"].as_u64().unwrap_or(0);
                row["expired"] = (1 - expired.min(1)).into();
            } else {
                let taken = row["heartbeat_pop"].is_null();
                row["heartbeat_pop"] = if taken {
                    sim.id(i).into()
                } else {
                    serde_json::Value::Null
                };
            }
            let data = row.to_string();
            let written = sim.write_verdict(i, key, &data);
            return (written, format!("verdict {key}={data} at n{i}"));
        }
        (2, _) => {
            let data = backend_row(key, &format!("registered {at}"));
            (sim.write_registration(i, key, &data), Some(data))
        }
        (3, _) => (sim.write(i, key, None), None),
        _ => {
            let data = backend_row(key, &format!("edited {at}"));
            (sim.write(i, key, Some(&data)), Some(data))
        }
    };
    let (written, data) = written;
    (written, format!("write {key}={data:?} at n{i}"))
}

/// One simulation: random writes at random nodes amid loss, jitter,
/// partitions, cut links and crashes (a crashed node restarts through its
/// bootstrap peer); then the faults stop, every crashed node restarts, and
/// within a bound every node holds, for every key, the data of the write
/// that wins (the later intent, then the later version: nothing
/// acknowledged lost, nothing deleted back).
fn simulate(seed: u64, kinds: Writes) -> Result<Settled, String> {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    let mut rng = StdRng::seed_from_u64(seed ^ 0xF022_5EED);
    let nodes = rng.random_range(2..=6);
    let mut cfg = SimConfig::wan(nodes, seed);
    cfg.loss = [0.0, 0.01, 0.05, 0.2][rng.random_range(0..4)];
    cfg.jitter = Duration::from_millis(rng.random_range(0..60));
    cfg.one_way = Duration::from_millis(rng.random_range(1..120));
    let setting = format!(
        "{nodes} nodes, one way {:?}, jitter {:?}, loss {}",
        cfg.one_way, cfg.jitter, cfg.loss
    );
    let mut sim = Sim::new(cfg);
    let joined = sim.run_until(Duration::from_secs(30), Sim::membership_complete);
    let mut log = vec![format!(
        "{setting}; joined: {joined} at {:?}",
        sim.elapsed()
    )];
    // Each node's bootstrap peer, as its configuration names it: a lower
    // node, and for node 0 any other (every POP reaches every other
    // through them, as a cluster's seeds must allow). Sim::new joins all
    // through node 0.
    let seed_of: Vec<usize> = (0..nodes)
        .map(|i| match i {
            0 => rng.random_range(1..nodes),
            _ => rng.random_range(0..i),
        })
        .collect();
    // Every kind of write on fewer keys: more of them meet across a
    // partition, where a verdict made on one side must lose to a
    // deliberate write made before it on the other.
    let keys: &[&str] = match kinds {
        Writes::Deliberate => &["a", "b", "c", "d"],
        Writes::EveryKind => &["a", "b"],
    };
    // Every write that got a version.
    let mut writes: Vec<RowVersion> = Vec::new();
    let mut crashed: std::collections::BTreeSet<usize> = Default::default();
    let faults = rng.random_range(5..40);
    for _ in 0..faults {
        let live: Vec<usize> = (0..nodes).filter(|i| !crashed.contains(i)).collect();
        match rng.random_range(0..10) {
            0..=4 if !live.is_empty() && kinds == Writes::EveryKind => {
                let i = live[rng.random_range(0..live.len())];
                let (written, what) = write_any_kind(&mut sim, &mut rng, i, keys);
                writes.extend(written);
                log.push(what);
            }
            0..=4 if !live.is_empty() => {
                let i = live[rng.random_range(0..live.len())];
                let key = keys[rng.random_range(0..keys.len())];
                let data = (rng.random_range(0..4) != 0)
                    .then(|| format!("{key} by n{i} at {:?}", sim.elapsed()));
                writes.extend(sim.write(i, key, data.as_deref()));
                log.push(format!("write {key}={data:?} at n{i}"));
            }
            5 => {
                let groups = rng.random_range(1..=3u8);
                let sides: Vec<u8> = (0..nodes).map(|_| rng.random_range(0..groups)).collect();
                sim.partition(|i| sides[i]);
                log.push(format!("partition {sides:?}"));
            }
            6 => {
                let (a, b) = (rng.random_range(0..nodes), rng.random_range(0..nodes));
                if a != b {
                    let up = rng.random_bool(0.3);
                    sim.set_link(a, b, up);
                    log.push(format!("link n{a}-n{b} up={up}"));
                }
            }
            7 if live.len() > 1 => {
                let i = live[rng.random_range(0..live.len())];
                sim.crash(i);
                crashed.insert(i);
                log.push(format!("crash n{i}"));
            }
            8 if !crashed.is_empty() => {
                let down: Vec<usize> = crashed.iter().copied().collect();
                let i = down[rng.random_range(0..down.len())];
                let via = seed_of[i];
                sim.restart(i, via);
                crashed.remove(&i);
                log.push(format!("restart n{i} via n{via}"));
            }
            _ => {
                sim.heal();
                log.push("heal".into());
            }
        }
        let pause = Duration::from_millis(rng.random_range(0..8000));
        if let Some(last) = log.last_mut() {
            last.push_str(&format!(", then {pause:?}"));
        }
        sim.run_for(pause);
    }
    sim.heal();
    for i in std::mem::take(&mut crashed) {
        let via = seed_of[i];
        sim.restart(i, via);
        log.push(format!("restart n{i} via n{via}"));
    }
    // The winner of every key: the later intent, then the later version
    // (a deliberate write's intent is its own version).
    let mut winners: BTreeMap<RowKey, (Stamp, Option<String>)> = BTreeMap::new();
    let verdicts = writes.iter().filter(|w| w.intent.is_some()).count();
    let pops = writes.iter().filter(|w| w.key.table == Table::Pops).count();
    for row in writes {
        let stamp = row.stamp();
        match winners.get(&row.key) {
            Some((best, _)) if !stamp.beats(best) => {}
            _ => {
                winners.insert(row.key, (stamp, row.data));
            }
        }
    }
    let settled = |s: &Sim| {
        s.converged()
            && winners
                .iter()
                .all(|(key, (_, data))| s.everyone_holds(key, data.as_deref()))
    };
    let healed = sim.elapsed();
    let bound = Duration::from_secs(120);
    if !sim.run_until(healed + bound, settled) {
        let held: Vec<String> = (0..nodes)
            .map(|i| {
                let r = sim.nodes[i].replica();
                let rows: Vec<String> = winners
                    .keys()
                    .map(|k| format!("{}={:?}", k.pk, r.data(k)))
                    .collect();
                let members: Vec<String> = sim.nodes[i]
                    .members()
                    .iter()
                    .map(|m| {
                        let p = &m.peer;
                        format!("{}@{} {}", p.id, p.generation, m.state.as_str())
                    })
                    .collect();
                format!(
                    "n{i}@{}: {} (members: {})",
                    sim.nodes[i].settings().generation,
                    rows.join(" "),
                    members.join(", ")
                )
            })
            .collect();
        // Membership's events since this many seconds before the heal,
        // when asked for (EDGEPROXY_SIM_TRACE=<seconds>).
        let trace: Vec<String> = match std::env::var("EDGEPROXY_SIM_TRACE")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            Some(before) => {
                let from = healed.saturating_sub(Duration::from_secs(before));
                sim.events
                    .iter()
                    .filter(|(t, _, e)| *t >= from && matches!(e, Event::Member(_)))
                    .map(|(t, i, e)| format!("{t:?} n{i} {e:?}"))
                    .collect()
            }
            None => Vec::new(),
        };
        return Err(format!(
            "seed {seed}: not settled {bound:?} after the heal\nwinners: {winners:?}\n{}\nlog:\n{}\n{}",
            held.join("\n"),
            log.join("\n"),
            trace.join("\n")
        ));
    }
    // What each node's database holds is the winner too.
    for i in 0..nodes {
        for (key, (_, data)) in &winners {
            if !sim.persisted(i, &key.pk, data.as_deref()) {
                return Err(format!(
                    "seed {seed}: n{i}'s database lacks {}={data:?}",
                    key.pk
                ));
            }
        }
    }
    Ok(Settled {
        writes: log.iter().filter(|l| is_write(l)).count(),
        faults: log.iter().skip(1).filter(|l| !is_write(l)).count(),
        verdicts,
        pops,
        took: sim.elapsed() - healed,
    })
}

/// What one simulation did, for the sweep's summary.
struct Settled {
    writes: usize,
    faults: usize,
    /// Writes that kept the intent of the row they changed (verdicts).
    verdicts: usize,
    /// Writes of `pops` rows.
    pops: usize,
    /// From the heal until every node held the winners.
    took: Duration,
}

/// A line of a simulation's log that is a write, not a fault.
fn is_write(line: &str) -> bool {
    ["write", "verdict", "pop"]
        .iter()
        .any(|w| line.starts_with(w))
}

#[test]
fn clusters_under_random_faults_converge_to_the_last_writes() {
    sweep(Writes::Deliberate);
}

/// The same sweep with every kind of write a POP makes, in both tables.
#[test]
fn clusters_under_random_faults_converge_with_every_kind_of_write() {
    sweep(Writes::EveryKind);
}

/// Runs the seeds `EDGEPROXY_SIM_FIRST_SEED` and the next
/// `EDGEPROXY_SIM_SEEDS - 1` with `kinds` of writes; fails naming every
/// seed that did not settle.
fn sweep(kinds: Writes) {
    let first = env_u64("EDGEPROXY_SIM_FIRST_SEED", 0);
    let seeds = env_u64("EDGEPROXY_SIM_SEEDS", 8);
    let (mut writes, mut faults, mut slowest) = (0, 0, Duration::ZERO);
    let (mut verdicts, mut pops) = (0, 0);
    let mut failures = Vec::new();
    for seed in first..first + seeds {
        match simulate(seed, kinds) {
            Ok(s) => {
                writes += s.writes;
                faults += s.faults;
                verdicts += s.verdicts;
                pops += s.pops;
                slowest = slowest.max(s.took);
            }
            Err(e) => failures.push(e),
        }
    }
    println!(
        "{seeds} seeds from {first}: {writes} writes ({verdicts} verdicts, {pops} of pops rows), \
         {faults} faults, settled at most {slowest:?} after the heal, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // A sweep whose writes never took the paths it is there for would pass
    // while testing nothing new.
    if kinds == Writes::EveryKind && seeds >= 8 {
        assert!(
            verdicts > 0 && pops > 0,
            "{seeds} seeds wrote {verdicts} verdicts and {pops} pops rows"
        );
    }
}
