//! The routing snapshot: an immutable, versioned view of the routing table that
//! every shard reads on each accept.
//!
//! The control thread builds a new [`RoutingSnapshot`] whenever `routing.db`
//! changes and publishes it with [`SnapshotHandle::publish`]. Shards call
//! [`SnapshotHandle::load`] once per accepted connection. A snapshot never
//! changes after it is built, so a connection that picked a backend from an old
//! snapshot keeps that backend; only new connections see the new table.
//!
//! Live per-backend state (open connection count, connect failures and their
//! backoff) lives in [`BackendLive`], shared by `Arc` between the snapshots
//! that contain the same backend id: counts survive snapshot swaps. [`LiveRegistry`] hands out those
//! `Arc`s when snapshots are built.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::backoff::ConnectBackoff;
use crate::own_listeners::{LocalIpsOnce, OwnListeners};

/// An ISO 3166-1 alpha-2 country code, upper case ASCII (`*b"BR"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Country(pub [u8; 2]);

impl Country {
    /// Parses a two-letter code, case-insensitively. `None` for anything else.
    pub fn parse(code: &str) -> Option<Self> {
        let b = code.trim().as_bytes();
        if b.len() == 2 && b.iter().all(u8::is_ascii_alphabetic) {
            Some(Country([
                b[0].to_ascii_uppercase(),
                b[1].to_ascii_uppercase(),
            ]))
        } else {
            None
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII letters.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl std::fmt::Display for Country {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Index of a region name in [`RoutingSnapshot::regions`]. Regions are interned
/// when a snapshot is built so scoring compares integers, not strings.
pub type RegionId = u16;

/// Index of a backend in [`RoutingSnapshot::backends`].
pub type BackendIdx = u32;

/// Live state of one backend, shared across shards and across snapshots.
#[derive(Debug, Default)]
pub struct BackendLive {
    /// The backend's id, so a connection holding only this can name it.
    pub id: Arc<str>,
    /// Connections currently open to this backend, across all shards.
    pub active: AtomicU32,
    /// Connect attempts that failed (refused, timed out, unreachable).
    pub connect_failures: AtomicU64,
    /// Connections it accepted and reset before sending a byte (see
    /// [`BackendLive::mark_reset_unserved`]).
    pub resets_before_reply: AtomicU64,
    /// Connections ever proxied to this backend.
    pub total: AtomicU64,
    /// Round-trip time measured by active health checks (EWMA), in
    /// microseconds; 0 = not measured. Written by the control side after each
    /// check, read by scoring when an RTT weight is set: it changes without
    /// a new snapshot.
    pub rtt_us: AtomicU32,
    /// Set by the control side while it needs to hear about connections to
    /// this backend that ended well (after a failure, while its circuit is
    /// half-open); shards report successes only then, so a healthy backend
    /// costs the passive channel nothing.
    pub watch_successes: AtomicBool,
    /// Whether its connects fail, and until when selection puts it behind
    /// the backends whose connects work (see [`crate::backoff`]).
    pub backoff: ConnectBackoff,
}

impl BackendLive {
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// The health-check RTT (EWMA) in microseconds; 0 when not measured.
    pub fn rtt_us(&self) -> u32 {
        self.rtt_us.load(Ordering::Relaxed)
    }

    pub fn set_rtt_us(&self, rtt_us: u32) {
        self.rtt_us.store(rtt_us, Ordering::Relaxed);
    }

    /// Whether shards should report connections that ended well (see
    /// [`BackendLive::watch_successes`]).
    pub fn successes_watched(&self) -> bool {
        self.watch_successes.load(Ordering::Relaxed)
    }

    pub fn set_watch_successes(&self, on: bool) {
        self.watch_successes.store(on, Ordering::Relaxed);
    }

    /// Records a failed connect attempt, started at `attempted` and failed
    /// at `failed` (see [`ConnectBackoff::failed`]); true when this changed
    /// the state (the backend was not failing), which exactly one caller
    /// sees.
    pub fn mark_failing(&self, attempted: Instant, failed: Instant) -> bool {
        self.backoff.failed(attempted, failed)
    }

    /// Records a successful connect; true when this cleared the failing
    /// state (see [`ConnectBackoff::connected`]). A plain load first: on the
    /// usual path (not failing) no shared cache line is written.
    pub fn mark_connecting(&self) -> bool {
        self.backoff.connected()
    }

    /// Records a connection it accepted and reset before sending a byte
    /// (see [`ConnectBackoff::reset_unserved`]); true when this marked it
    /// failing.
    pub fn mark_reset_unserved(&self, attempted: Instant, failed: Instant) -> bool {
        self.backoff.reset_unserved(attempted, failed)
    }

    /// Records a connection, attempted at `attempted`, that it served; true
    /// when this cleared the failing state (see [`ConnectBackoff::served`]).
    pub fn mark_served(&self, attempted: Instant) -> bool {
        self.backoff.served(attempted)
    }

    /// The last connect attempt to it failed (or the last connection was
    /// reset before a reply) and nothing cleared that since.
    pub fn is_failing(&self) -> bool {
        self.backoff.is_failing()
    }

    /// Failing and inside its backoff at `now`: selection tries it only when
    /// nothing else is left.
    pub fn cooling(&self, now: Instant) -> bool {
        self.backoff.cooling(now)
    }
}

/// Holds one connection's place in [`BackendLive::active`]; dropping it gives
/// the place back, however the connection ends.
#[derive(Debug)]
pub struct ActiveGuard(Arc<BackendLive>);

impl ActiveGuard {
    pub fn new(live: Arc<BackendLive>) -> Self {
        live.active.fetch_add(1, Ordering::Relaxed);
        live.total.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(live)
    }
}

impl ActiveGuard {
    /// The backend this guard counts a connection against.
    pub fn live(&self) -> &Arc<BackendLive> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One routable backend, validated and parsed when the snapshot was built.
#[derive(Debug, Clone)]
pub struct Backend {
    pub id: Arc<str>,
    pub app: Arc<str>,
    pub region: RegionId,
    pub country: Option<Country>,
    pub addr: SocketAddr,
    pub healthy: bool,
    /// Always ≥ 1 (a stored 0 is read as 1, as the original does; see
    /// [`RecordNote`]).
    pub weight: u32,
    /// Always ≥ 1 (likewise).
    pub soft_limit: u32,
    /// 0 means "no hard limit".
    pub hard_limit: u32,
    pub live: Arc<BackendLive>,
}

impl Backend {
    /// Open connections to this backend right now, across all shards.
    pub fn active(&self) -> u32 {
        self.live.active()
    }

    /// True when the backend may take one more connection by its hard limit.
    pub fn under_hard_limit(&self, active: u32) -> bool {
        self.hard_limit == 0 || active < self.hard_limit
    }
}

/// A row as read from the store, before validation. Produced by the control
/// plane's store, consumed by [`SnapshotBuilder`].
#[derive(Debug, Clone, PartialEq)]
pub struct BackendRecord {
    pub id: String,
    pub app: String,
    pub region: String,
    pub country: Option<String>,
    /// The original schema calls this `wg_ip`: the backend's address on the
    /// private network (IPv4 or IPv6, no port).
    pub ip: String,
    pub port: i64,
    pub healthy: bool,
    pub weight: i64,
    pub soft_limit: i64,
    pub hard_limit: i64,
    pub deleted: bool,
}

/// Why a record was left out of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("empty id")]
    EmptyId,
    #[error("invalid ip address {0:?}")]
    BadIp(String),
    /// An address no single backend has (see [`not_unicast`]).
    #[error("ip address {ip} is {why}: a backend needs a unicast address, one host's")]
    NotUnicast { ip: String, why: &'static str },
    #[error("port {0} out of range 1..=65535")]
    BadPort(i64),
    #[error("negative {field} ({value})")]
    NegativeLimit { field: &'static str, value: i64 },
    #[error("invalid country code {0:?}")]
    BadCountry(String),
    #[error("duplicate id")]
    DuplicateId,
    /// Connections to it would come back into this proxy (see
    /// `crate::own_listeners`).
    #[error(
        "address {addr} is this proxy's own listener {listener}: every connection routed \
         to it would loop back into the proxy"
    )]
    OwnListener {
        addr: SocketAddr,
        listener: SocketAddr,
    },
}

/// A value a record holds that the snapshot reads as something else: the
/// record is routed, and the operator is told what it means (the loader
/// warns when a load first finds it, `check-config` lists it).
///
/// 0 is the only such value. The original edgeProxy reads a weight or soft
/// limit of 0 as 1 (its scoring divides by both), and an existing
/// `routing.db` must route as it did, so the snapshot does the same. But a
/// weight of 0 means "no traffic" in other load balancers (HAProxy, Gateway
/// API) and a soft limit of 0 reads like `hard_limit`'s "0 = none": both
/// mean something else here, hence the warning. The discovery API refuses
/// both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordNote {
    /// `weight` 0, routed as weight 1.
    ZeroWeight,
    /// `soft_limit` 0, routed as soft limit 1.
    ZeroSoftLimit,
}

impl RecordNote {
    /// The column the note is about.
    pub fn field(self) -> &'static str {
        match self {
            RecordNote::ZeroWeight => "weight",
            RecordNote::ZeroSoftLimit => "soft_limit",
        }
    }
}

impl std::fmt::Display for RecordNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecordNote::ZeroWeight => {
                "weight 0 is read as 1, as the original edgeProxy does: the backend takes new \
                 connections like any weight-1 backend, not none (to stop sending it \
                 connections, set healthy = 0 or drain it)"
            }
            RecordNote::ZeroSoftLimit => {
                "soft_limit 0 is read as 1, as the original edgeProxy does: the backend counts \
                 as fully loaded from its first connection (it is not \"no limit\": only \
                 hard_limit 0 means that)"
            }
        })
    }
}

/// A POP of the cluster (from the replicated `pops` table), for DNS and
/// traffic steering. The data plane does not read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopView {
    pub node_id: Arc<str>,
    pub name: Arc<str>,
    /// Lower case.
    pub region: Arc<str>,
    pub country: Option<Country>,
    /// Where clients reach it.
    pub addrs: Vec<std::net::IpAddr>,
    /// Membership says it is alive (or suspected, not yet down).
    pub alive: bool,
    pub draining: bool,
    /// The POP's own verdict (replicated `pops.serving`): its listeners are
    /// up and an app they carry has a healthy backend.
    pub can_serve: bool,
    /// This POP itself.
    pub local: bool,
    /// Its place in the WireGuard mesh (empty when it runs none).
    pub mesh: PopMesh,
}

/// A POP's WireGuard mesh data, from its replicated `pops` row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PopMesh {
    /// WireGuard public key, base64 as written (empty: no mesh).
    pub public_key: Arc<str>,
    /// Where its WireGuard listens.
    pub endpoint: Option<std::net::SocketAddr>,
    /// Its 6PN /64.
    pub prefix6: Option<ipnet::Ipv6Net>,
}

impl PopView {
    /// Alive and not draining: answerable.
    pub fn serving(&self) -> bool {
        self.alive && !self.draining
    }

    /// Alive, not draining, and able to serve by its own verdict: where
    /// GeoDNS may send clients.
    pub fn takes_traffic(&self) -> bool {
        self.serving() && self.can_serve
    }
}

/// The whole routing table as the data plane sees it.
#[derive(Debug, Default)]
pub struct RoutingSnapshot {
    /// Monotonic; bumps on every publish.
    pub version: u64,
    pub backends: Vec<Backend>,
    /// The cluster's POPs (empty without replication).
    pub pops: Vec<PopView>,
    /// Interned region names; `Backend::region` indexes this.
    pub regions: Vec<Arc<str>>,
    /// Backend indices per app, in table order.
    by_app: LookupMap<Arc<str>, Vec<BackendIdx>>,
    /// All backend indices, in table order (for listeners serving every app).
    all: Vec<BackendIdx>,
    by_id: LookupMap<Arc<str>, BackendIdx>,
}

/// The snapshot's maps, read on every new connection (its listener's app,
/// a returning client's bound backend): foldhash, seeded per process, not
/// SipHash, which made each lookup of a short key ~250 instructions instead
/// of ~120. Their keys come from the routing table, not from clients (the
/// affinity table, keyed by client address, keeps SipHash).
type LookupMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

impl RoutingSnapshot {
    /// Candidate backends for a listener: those of `app`, or all when `None`.
    pub fn candidates(&self, app: Option<&str>) -> &[BackendIdx] {
        match app {
            None => &self.all,
            Some(app) => self.by_app.get(app).map(Vec::as_slice).unwrap_or(&[]),
        }
    }

    pub fn backend(&self, idx: BackendIdx) -> &Backend {
        &self.backends[idx as usize]
    }

    pub fn find(&self, id: &str) -> Option<BackendIdx> {
        self.by_id.get(id).copied()
    }

    pub fn region_id(&self, name: &str) -> Option<RegionId> {
        self.regions
            .iter()
            .position(|r| r.eq_ignore_ascii_case(name))
            .map(|i| i as RegionId)
    }

    pub fn region_name(&self, id: RegionId) -> &str {
        self.regions.get(id as usize).map(|r| &**r).unwrap_or("")
    }

    /// Number of apps with at least one backend.
    pub fn app_count(&self) -> usize {
        self.by_app.len()
    }
}

/// Hands out the shared [`BackendLive`] for each backend id so that live counts
/// carry over from one snapshot to the next. Owned by the control thread.
#[derive(Debug, Default)]
pub struct LiveRegistry {
    /// Each backend's live state and the address it was last built with.
    by_id: HashMap<Arc<str>, (SocketAddr, Arc<BackendLive>)>,
}

impl LiveRegistry {
    /// The live state of `id`, now at `addr`. A backend that moved keeps its
    /// counts but not its connect backoff: failures of the old address say
    /// nothing of the new one (a replacement instance).
    fn get(&mut self, id: &Arc<str>, addr: SocketAddr) -> Arc<BackendLive> {
        let (at, live) = self.by_id.entry(Arc::clone(id)).or_insert_with(|| {
            let live = Arc::new(BackendLive {
                id: Arc::clone(id),
                ..BackendLive::default()
            });
            (addr, live)
        });
        if *at != addr {
            *at = addr;
            live.backoff.clear();
        }
        Arc::clone(live)
    }

    /// Forgets backends that no snapshot references any more and that have no
    /// open connection, so the registry does not grow without bound.
    fn retain_ids(&mut self, keep: &LookupMap<Arc<str>, BackendIdx>) {
        self.by_id
            .retain(|id, (_, live)| keep.contains_key(id) || live.active() > 0);
    }
}

/// Builds snapshots from store records.
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    live: LiveRegistry,
    next_version: u64,
    /// Backends at these addresses are left out.
    own: OwnListeners,
}

/// Result of building a snapshot: the snapshot, the records left out, and
/// the records routed with a value read as something else.
#[derive(Debug)]
pub struct Built {
    pub snapshot: RoutingSnapshot,
    pub skipped: Vec<(String, RecordError)>,
    pub notes: Vec<(String, RecordNote)>,
}

impl SnapshotBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The proxy's own listeners: from the next build on, a record whose
    /// address reaches one is left out ([`RecordError::OwnListener`]).
    /// None by default.
    pub fn set_own_listeners(&mut self, own: OwnListeners) {
        self.own = own;
    }

    pub fn own_listeners(&self) -> &OwnListeners {
        &self.own
    }

    /// Builds the next snapshot. Deleted records are left out silently; invalid
    /// ones, and those at one of the proxy's own listeners, are left out and
    /// reported in [`Built::skipped`]; routed ones with
    /// a weight or soft limit of 0 are reported in [`Built::notes`].
    /// Unhealthy backends stay in (selection excludes them) so that their
    /// live counts persist.
    pub fn build(&mut self, records: &[BackendRecord]) -> Built {
        self.next_version += 1;
        let mut snap = RoutingSnapshot {
            version: self.next_version,
            ..Default::default()
        };
        let mut skipped = Vec::new();
        let mut notes = Vec::new();
        let mut local = LocalIpsOnce::default();
        for rec in records.iter().filter(|r| !r.deleted) {
            match validate(rec) {
                Err(e) => skipped.push((rec.id.clone(), e)),
                Ok(v) => {
                    let mut is_local = |ip| local.contains(ip);
                    if let Some(listener) = self.own.reached_by(v.addr, &mut is_local) {
                        let e = RecordError::OwnListener {
                            addr: v.addr,
                            listener,
                        };
                        skipped.push((rec.id.clone(), e));
                        continue;
                    }
                    let id: Arc<str> = Arc::from(rec.id.as_str());
                    if snap.by_id.contains_key(&id) {
                        skipped.push((rec.id.clone(), RecordError::DuplicateId));
                        continue;
                    }
                    let region = intern(&mut snap.regions, &rec.region);
                    let app: Arc<str> = match snap.by_app.get_key_value(rec.app.as_str()) {
                        Some((k, _)) => Arc::clone(k),
                        None => Arc::from(rec.app.as_str()),
                    };
                    for (value, note) in [
                        (rec.weight, RecordNote::ZeroWeight),
                        (rec.soft_limit, RecordNote::ZeroSoftLimit),
                    ] {
                        if value == 0 {
                            notes.push((rec.id.clone(), note));
                        }
                    }
                    let idx = snap.backends.len() as BackendIdx;
                    snap.by_id.insert(Arc::clone(&id), idx);
                    snap.by_app.entry(Arc::clone(&app)).or_default().push(idx);
                    snap.all.push(idx);
                    let live = self.live.get(&id, v.addr);
                    snap.backends.push(Backend {
                        id,
                        app,
                        region,
                        country: v.country,
                        addr: v.addr,
                        healthy: rec.healthy,
                        weight: v.weight,
                        soft_limit: v.soft_limit,
                        hard_limit: v.hard_limit,
                        live,
                    });
                }
            }
        }
        self.live.retain_ids(&snap.by_id);
        Built {
            snapshot: snap,
            skipped,
            notes,
        }
    }
}

struct Validated {
    addr: SocketAddr,
    country: Option<Country>,
    weight: u32,
    soft_limit: u32,
    hard_limit: u32,
}

/// Why `ip` cannot be a backend's address, or `None` when it can. A
/// connection goes to one host: the unspecified address (`0.0.0.0`, `::`)
/// is none (Linux connects it to the local host), a multicast group or the
/// broadcast address `255.255.255.255` is many (a TCP connect to either
/// fails). IPv4-mapped IPv6 addresses are judged as the IPv4 address.
pub fn not_unicast(ip: std::net::IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        Some("the unspecified address (no host's: a connect to it reaches the proxy's own host)")
    } else if ip.is_multicast() {
        Some("a multicast address (a group, not a host)")
    } else if matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address (every host of the link, not one)")
    } else if matches!(ip, std::net::IpAddr::V4(v4) if v4.octets()[0] == 0) {
        // RFC 1122 3.2.1.3: "this network", a source address only; Linux
        // refuses a connect to it (EINVAL), or takes 0.0.0.0 for itself.
        Some("in 0.0.0.0/8 (\"this network\": a source address, no host's)")
    } else {
        None
    }
}

fn validate(rec: &BackendRecord) -> Result<Validated, RecordError> {
    if rec.id.trim().is_empty() {
        return Err(RecordError::EmptyId);
    }
    let ip: std::net::IpAddr = rec
        .ip
        .trim()
        .parse()
        .map_err(|_| RecordError::BadIp(rec.ip.clone()))?;
    if let Some(why) = not_unicast(ip) {
        return Err(RecordError::NotUnicast {
            ip: rec.ip.trim().to_string(),
            why,
        });
    }
    if !(1..=65535).contains(&rec.port) {
        return Err(RecordError::BadPort(rec.port));
    }
    for (field, value) in [
        ("weight", rec.weight),
        ("soft_limit", rec.soft_limit),
        ("hard_limit", rec.hard_limit),
    ] {
        if value < 0 {
            return Err(RecordError::NegativeLimit { field, value });
        }
    }
    let country = match rec.country.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(c) => Some(Country::parse(c).ok_or_else(|| RecordError::BadCountry(c.to_string()))?),
    };
    let clamp = |v: i64| v.clamp(1, u32::MAX as i64) as u32;
    Ok(Validated {
        addr: SocketAddr::new(ip, rec.port as u16),
        country,
        weight: clamp(rec.weight),
        soft_limit: clamp(rec.soft_limit),
        hard_limit: rec.hard_limit.min(u32::MAX as i64) as u32,
    })
}

fn intern(regions: &mut Vec<Arc<str>>, name: &str) -> RegionId {
    let name = name.trim();
    if let Some(i) = regions.iter().position(|r| r.eq_ignore_ascii_case(name)) {
        return i as RegionId;
    }
    regions.push(Arc::from(name.to_ascii_lowercase().as_str()));
    (regions.len() - 1) as RegionId
}

/// The published snapshot, shared by the control thread (writer) and every
/// shard (readers). Loading is lock-free.
#[derive(Debug, Clone)]
pub struct SnapshotHandle(Arc<ArcSwap<RoutingSnapshot>>);

impl SnapshotHandle {
    pub fn new(initial: RoutingSnapshot) -> Self {
        SnapshotHandle(Arc::new(ArcSwap::from_pointee(initial)))
    }

    /// The current snapshot. Cheap; hold the guard only for the duration of a
    /// selection, never across an await that may last.
    pub fn load(&self) -> arc_swap::Guard<Arc<RoutingSnapshot>> {
        self.0.load()
    }

    /// The current snapshot as an owned `Arc`.
    pub fn load_full(&self) -> Arc<RoutingSnapshot> {
        self.0.load_full()
    }

    pub fn publish(&self, snapshot: RoutingSnapshot) {
        self.0.store(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(
        id: &str,
        app: &str,
        region: &str,
        country: Option<&str>,
        port: i64,
    ) -> BackendRecord {
        BackendRecord {
            id: id.into(),
            app: app.into(),
            region: region.into(),
            country: country.map(Into::into),
            ip: "127.0.0.1".into(),
            port,
            healthy: true,
            weight: 2,
            soft_limit: 100,
            hard_limit: 150,
            deleted: false,
        }
    }

    #[test]
    fn invalid_records_are_skipped_with_their_id() {
        let mut bad_ip = record("b1", "web", "sa", None, 80);
        bad_ip.ip = "10.0.0.300".into();
        let bad_port = record("b2", "web", "sa", None, 0);
        let mut neg = record("b3", "web", "sa", None, 80);
        neg.soft_limit = -1;
        let good = record("b4", "web", "sa", Some("br"), 80);
        let mut deleted = record("b5", "web", "sa", None, 80);
        deleted.deleted = true;
        let built = SnapshotBuilder::new().build(&[bad_ip, bad_port, neg, good, deleted]);
        assert_eq!(built.snapshot.backends.len(), 1);
        assert_eq!(&*built.snapshot.backends[0].id, "b4");
        assert_eq!(built.snapshot.backends[0].country, Some(Country(*b"BR")));
        let ids: Vec<_> = built.skipped.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["b1", "b2", "b3"]);
    }

    /// A backend registered at the proxy's own listener made every
    /// connection come back in as a new client until the connection limit
    /// was full of one client's hops.
    #[test]
    fn a_record_at_an_own_listener_is_skipped() {
        let mut builder = SnapshotBuilder::new();
        builder.set_own_listeners(OwnListeners::new(["127.0.0.1:18380".parse().unwrap()]));
        let built = builder.build(&[
            record("self", "web", "sa", None, 18380),
            record("other", "web", "sa", None, 18381),
        ]);
        let ids: Vec<&str> = built.snapshot.backends.iter().map(|b| &*b.id).collect();
        assert_eq!(ids, ["other"]);
        assert_eq!(built.skipped.len(), 1);
        let (id, e) = &built.skipped[0];
        assert_eq!(id, "self");
        assert!(matches!(e, RecordError::OwnListener { .. }), "{e:?}");
        assert!(e.to_string().contains("loop back"), "{e}");
        // Without the listener set (the default), it is routed.
        let built = SnapshotBuilder::new().build(&[record("self", "web", "sa", None, 18380)]);
        assert_eq!(built.snapshot.backends.len(), 1);
    }

    /// `255.255.255.255` (and `0.0.0.0`, multicast) written into
    /// routing.db was routed: every connect to it failed, or reached the
    /// proxy's own host.
    #[test]
    fn addresses_that_are_not_one_hosts_are_skipped() {
        let at = |id: &str, ip: &str| BackendRecord {
            ip: ip.into(),
            ..record(id, "web", "sa", None, 80)
        };
        let built = SnapshotBuilder::new().build(&[
            at("bcast", "255.255.255.255"),
            at("any4", "0.0.0.0"),
            at("any6", "::"),
            at("mcast4", "224.0.0.1"),
            at("mcast6", "ff02::1"),
            at("mapped", "::ffff:255.255.255.255"),
            at("thisnet", "0.0.0.1"),
            at("ok4", "10.0.0.255"),
            at("ok6", "fd00::1"),
        ]);
        let routed: Vec<_> = built.snapshot.backends.iter().map(|b| &*b.id).collect();
        assert_eq!(routed, ["ok4", "ok6"]);
        let skipped: Vec<_> = built.skipped.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            skipped,
            ["bcast", "any4", "any6", "mcast4", "mcast6", "mapped", "thisnet"]
        );
        assert_eq!(
            built.skipped[0].1.to_string(),
            "ip address 255.255.255.255 is the broadcast address (every host of the link, \
             not one): a backend needs a unicast address, one host's"
        );
        assert!(matches!(built.skipped[1].1, RecordError::NotUnicast { .. }));
    }

    #[test]
    fn a_zero_weight_or_soft_limit_routes_as_one_and_is_noted() {
        let mut weight = record("w0", "web", "sa", None, 80);
        weight.weight = 0;
        let mut soft = record("s0", "web", "sa", None, 81);
        soft.soft_limit = 0;
        let mut both = record("both", "web", "sa", None, 82);
        (both.weight, both.soft_limit) = (0, 0);
        let mut gone = record("gone", "web", "sa", None, 83);
        (gone.weight, gone.deleted) = (0, true);
        let good = record("good", "web", "sa", None, 84);
        let built = SnapshotBuilder::new().build(&[weight, soft, both, gone, good]);
        assert!(built.skipped.is_empty(), "{:?}", built.skipped);
        let b = &built.snapshot.backends;
        assert_eq!(b.len(), 4);
        assert_eq!((b[0].weight, b[0].soft_limit), (1, 100));
        assert_eq!((b[1].weight, b[1].soft_limit), (2, 1));
        assert_eq!((b[2].weight, b[2].soft_limit), (1, 1));
        let noted: Vec<(&str, &str)> = built
            .notes
            .iter()
            .map(|(id, n)| (id.as_str(), n.field()))
            .collect();
        assert_eq!(
            noted,
            [
                ("w0", "weight"),
                ("s0", "soft_limit"),
                ("both", "weight"),
                ("both", "soft_limit")
            ]
        );
        assert!(RecordNote::ZeroWeight.to_string().contains("not none"));
        assert!(RecordNote::ZeroSoftLimit
            .to_string()
            .contains("first connection"));
    }

    #[test]
    fn live_counts_survive_rebuilds() {
        let mut builder = SnapshotBuilder::new();
        let first = builder
            .build(&[record("b1", "web", "sa", None, 80)])
            .snapshot;
        let guard = ActiveGuard::new(Arc::clone(&first.backends[0].live));
        let mut changed = record("b1", "web", "sa", None, 81);
        changed.weight = 5;
        let second = builder.build(&[changed]).snapshot;
        assert!(second.version > first.version);
        assert_eq!(second.backends[0].active(), 1);
        drop(guard);
        assert_eq!(second.backends[0].active(), 0);
    }

    /// QA: a backend re-registered at another address (a replacement
    /// instance) stayed behind the others for its predecessor's failures,
    /// up to the 30 s backoff, unserved-reset marks included.
    #[test]
    fn a_backend_that_moves_leaves_its_connect_backoff_behind() {
        let mut builder = SnapshotBuilder::new();
        let now = Instant::now();
        let first = builder
            .build(&[record("b1", "web", "sa", None, 80)])
            .snapshot;
        assert!(first.backends[0].live.mark_reset_unserved(now, now));
        let same = builder
            .build(&[record("b1", "web", "sa", None, 80)])
            .snapshot;
        assert!(same.backends[0].live.is_failing(), "same address: kept");
        let moved = builder
            .build(&[record("b1", "web", "sa", None, 81)])
            .snapshot;
        assert!(!moved.backends[0].live.is_failing());
        assert!(!moved.backends[0].live.cooling(now));
    }

    #[test]
    fn failing_state_changes_are_seen_once() {
        let live = BackendLive::default();
        let now = Instant::now();
        assert!(!live.mark_connecting(), "not failing: nothing to report");
        assert!(live.mark_failing(now, now));
        assert!(!live.mark_failing(now, now), "already failing");
        assert!(live.is_failing());
        assert!(live.mark_connecting());
        assert!(!live.mark_connecting());
        assert!(!live.is_failing());
    }

    #[test]
    fn candidates_by_app_and_regions_interned() {
        let built = SnapshotBuilder::new().build(&[
            record("a", "web", "sa", None, 80),
            record("b", "api", "SA", None, 81),
            record("c", "web", "eu", None, 82),
        ]);
        let s = built.snapshot;
        assert_eq!(s.candidates(Some("web")), &[0, 2]);
        assert_eq!(s.candidates(Some("api")), &[1]);
        assert_eq!(s.candidates(Some("none")), &[] as &[u32]);
        assert_eq!(s.candidates(None), &[0, 1, 2]);
        assert_eq!(s.backends[0].region, s.backends[1].region);
        assert_eq!(s.region_id("EU"), Some(s.backends[2].region));
    }
}
