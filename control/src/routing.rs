//! Keeps the published routing snapshot in step with `routing.db`.
//!
//! [`RoutingReloader::tick`] runs every reload interval on the control thread:
//! it asks the store whether anything may have changed (cheap), and only then
//! reads every row, builds a new snapshot and publishes it. A database that
//! cannot be read leaves the last good snapshot in place.
//!
//! The discovery API's per-backend state weighs on routing here (see
//! [`apply_lifecycle`]): a drained backend, and one whose last heartbeat is
//! older than the heartbeat TTL, is published as unhealthy, so it takes no
//! new connections (and loses its affinity bindings) while open connections
//! go on. Expiry changes nothing in the file, so the reloader also reloads
//! when the earliest heartbeat deadline it saw has passed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use engine::own_listeners::OwnListeners;
use engine::snapshot::{BackendRecord, Country, PopView, SnapshotBuilder, SnapshotHandle};

use crate::no_backend_warn::Coverage;
use crate::store::{Lifecycle, Loaded, PopRow, RoutingStore, StoreError};

/// Node ids of the cluster members currently alive (this node included),
/// kept by replication; read when the snapshot's POP list is built.
pub type Liveness = Arc<ArcSwap<HashSet<String>>>;

/// Node ids of the cluster members declared down, with when (Unix ms), kept
/// by replication: their backends' heartbeats reach nobody (see
/// [`StandIn`]).
pub type DownSince = Arc<ArcSwap<HashMap<String, i64>>>;

/// What the snapshot's POP list is built from besides the `pops` table.
#[derive(Clone)]
pub struct PopsInput {
    pub local_id: String,
    pub alive: Liveness,
    pub down: DownSince,
}

/// Owners of heartbeats this POP judges in their place. Only a row's
/// `heartbeat_pop` judges its expiry, and a POP that is down judges
/// nothing: a backend that heartbeated there (and went down with its site)
/// stayed "serving" at every other POP for as long as that POP was down, or
/// for good if it was decommissioned. Once its owner has been declared down
/// for the heartbeat TTL, one POP (the first alive member by id) records
/// the row expired, and the verdict replicates. A backend that heartbeats
/// at another POP makes that POP its owner, whose verdict follows; an owner
/// that comes back judges by its own clock again.
#[derive(Debug, Default, Clone)]
pub struct StandIn {
    /// Owners declared down, with when (Unix ms).
    pub down_since_ms: HashMap<String, i64>,
}

impl StandIn {
    /// What `input` makes this POP stand in for: its down members if this
    /// POP is the first alive member by id, else nothing.
    pub fn from_input(input: &PopsInput) -> StandIn {
        let down = input.down.load();
        if down.is_empty() {
            return StandIn::default();
        }
        let alive = input.alive.load();
        let first = alive
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(input.local_id.as_str()))
            .min();
        if first != Some(input.local_id.as_str()) {
            return StandIn::default();
        }
        StandIn {
            down_since_ms: (**down).clone(),
        }
    }
}

pub struct RoutingReloader {
    store: RoutingStore,
    builder: SnapshotBuilder,
    handle: SnapshotHandle,
    /// The last tick failed; the next success is logged as a recovery.
    failing: bool,
    /// Heartbeat TTL; `None`: nothing expires.
    ttl: Option<Duration>,
    /// The earliest heartbeat deadline still ahead at the last reload (Unix
    /// ms): a reload is due when it passes.
    next_expiry_ms: Option<i64>,
    /// Backends expired at the last reload, to log each change once.
    expired: BTreeSet<String>,
    /// Listeners without an eligible backend, warned about after reloads.
    coverage: Coverage,
    /// Set when replication runs: the snapshot then lists the cluster's POPs.
    pops: Option<PopsInput>,
    /// This POP's health view, applied over every snapshot (see `health`).
    health: Option<crate::health::HealthLink>,
    /// The last records read, lifecycle applied, health not: what
    /// [`RoutingReloader::republish`] rebuilds from without reading the file.
    last_records: Vec<BackendRecord>,
    /// What the last load said of rows (skipped, or a 0 read as 1), so
    /// that each is said once while it lasts: the table is read again at
    /// every change (a registration, a replicated row), many times a
    /// minute in a busy cluster.
    row_warnings: RowWarnings,
    /// This host's addresses at the last look, and when to look next (see
    /// [`RoutingReloader::host_addresses_moved`]).
    host_addresses: (Option<engine::own_listeners::LocalIps>, Instant),
    /// What the last reload read from the file (rows as read, and the
    /// `pops` table when it is used), to tell a commit that changed none of
    /// it from a change (see [`RoutingReloader::tick_at`]).
    last_read: Option<(Loaded, Vec<PopRow>)>,
}

/// How often the host's addresses are read while a listener is bound to
/// `0.0.0.0` or `::` (one `getifaddrs(3)`).
const HOST_ADDRESSES_EVERY: Duration = Duration::from_secs(2);

/// Heartbeats that lapse (or resume) together in one reload are logged one
/// line per backend up to this many, else in one line with the count.
const SAID_ONE_BY_ONE: usize = 10;

/// The first [`SAID_ONE_BY_ONE`] of `ids` (sorted), comma-separated.
fn first_ids(ids: &[&String]) -> String {
    let mut ids: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
    ids.sort_unstable();
    ids.truncate(SAID_ONE_BY_ONE);
    ids.join(",")
}

/// This host's addresses, when `own` has a listener they matter to.
fn host_addresses(own: &OwnListeners) -> Option<engine::own_listeners::LocalIps> {
    own.any_unspecified()
        .then(engine::own_listeners::LocalIps::read)
        .and_then(Result::ok)
}

/// Unix milliseconds of `t` (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// True when a heartbeat at `last_ms` is too old at `now_ms` (the original's
/// rule: expired once `now - last >= ttl`).
pub fn is_expired(last_ms: i64, ttl: Duration, now_ms: i64) -> bool {
    now_ms.saturating_sub(last_ms) >= ttl.as_millis().min(i64::MAX as u128) as i64
}

/// Whether this POP (`node_id`) judges the heartbeat expiry of a row: it is
/// the row's `heartbeat_pop`, or the row has no such owner yet and this POP
/// holds a heartbeat for it (rows registered before POPs shared the table).
/// Other POPs follow the owner's verdict (`Lifecycle::expired`).
pub fn judges_expiry(life: &Lifecycle, node_id: Option<&str>) -> bool {
    match (life.heartbeat_pop.as_deref(), node_id) {
        (Some(owner), Some(me)) => owner == me,
        _ => life.last_heartbeat_ms.is_some(),
    }
}

/// Whether a row counts as expired at `now_ms` on this POP: by its own
/// heartbeat clock where it judges, else by the owner's replicated verdict.
pub fn row_expired(
    life: &Lifecycle,
    ttl: Option<Duration>,
    now_ms: i64,
    node_id: Option<&str>,
) -> bool {
    if judges_expiry(life, node_id) {
        match (ttl, life.last_heartbeat_ms) {
            (Some(ttl), Some(last)) => is_expired(last, ttl, now_ms),
            // No heartbeat recorded here (see `RoutingStore`'s
            // `assume_heard_at_start`): the verdict stands.
            (Some(_), None) => life.expired,
            (None, _) => false,
        }
    } else {
        life.expired
    }
}

/// What [`apply_lifecycle`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expiry {
    /// Ids of live backends routed as expired.
    pub expired: BTreeSet<String>,
    /// The earliest heartbeat deadline still ahead (Unix ms) among rows this
    /// POP judges: when the routing view changes next by itself.
    pub next_deadline_ms: Option<i64>,
    /// Verdicts to record (`expired` column) where this POP's judgement
    /// differs from what the row says: they replicate to the other POPs.
    pub verdicts: Vec<(String, bool)>,
}

/// Marks drained and expired backends unhealthy in `records` (`lifecycle[i]`
/// belongs to `records[i]`), so selection skips them for new connections.
/// Rows without a heartbeat (not registered through the API) never expire.
pub fn apply_lifecycle(
    records: &mut [BackendRecord],
    lifecycle: &[Lifecycle],
    ttl: Option<Duration>,
    now_ms: i64,
    node_id: Option<&str>,
    stand_in: &StandIn,
) -> Expiry {
    let mut out = Expiry::default();
    for (rec, life) in records.iter_mut().zip(lifecycle) {
        if rec.deleted {
            continue;
        }
        if life.draining {
            rec.healthy = false;
        }
        let mut expired = row_expired(life, ttl, now_ms, node_id);
        let down_owner = life
            .heartbeat_pop
            .as_deref()
            .and_then(|owner| stand_in.down_since_ms.get(owner));
        if let (false, Some(&since), Some(ttl), false) =
            (expired, down_owner, ttl, judges_expiry(life, node_id))
        {
            if is_expired(since, ttl, now_ms) {
                expired = true;
                out.verdicts.push((rec.id.clone(), true));
            } else {
                let deadline = since.saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64);
                out.next_deadline_ms =
                    Some(out.next_deadline_ms.map_or(deadline, |n| n.min(deadline)));
            }
        }
        if expired {
            rec.healthy = false;
            out.expired.insert(rec.id.clone());
        }
        if judges_expiry(life, node_id) {
            if expired != life.expired {
                out.verdicts.push((rec.id.clone(), expired));
            }
            if let (false, Some(ttl), Some(last)) = (expired, ttl, life.last_heartbeat_ms) {
                let deadline = last.saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64);
                out.next_deadline_ms =
                    Some(out.next_deadline_ms.map_or(deadline, |n| n.min(deadline)));
            }
        }
    }
    out
}

/// What one reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Published { version: u64, backends: usize },
}

impl RoutingReloader {
    /// Loads the table once and returns the reloader with its first snapshot
    /// published in `handle`.
    pub fn start(store: RoutingStore) -> Result<Self, StoreError> {
        Self::start_with_ttl(store, None)
    }

    /// [`start`], with backends whose heartbeat is older than `ttl` routed
    /// as unhealthy (`None`: nothing expires).
    ///
    /// [`start`]: RoutingReloader::start
    pub fn start_with_ttl(store: RoutingStore, ttl: Option<Duration>) -> Result<Self, StoreError> {
        Self::start_with(store, ttl, OwnListeners::default())
    }

    /// [`start_with_ttl`], with rows at one of the proxy's own listeners
    /// (`own`) left out of every snapshot, the first one included.
    ///
    /// [`start_with_ttl`]: RoutingReloader::start_with_ttl
    pub fn start_with(
        mut store: RoutingStore,
        ttl: Option<Duration>,
        own: OwnListeners,
    ) -> Result<Self, StoreError> {
        let mut builder = SnapshotBuilder::new();
        builder.set_own_listeners(own);
        let mut loaded = store.load()?;
        let read = loaded.clone();
        let Expiry {
            expired,
            next_deadline_ms: next_expiry_ms,
            verdicts,
        } = apply_lifecycle(
            &mut loaded.records,
            &loaded.lifecycle,
            ttl,
            unix_ms(SystemTime::now()),
            store.node_id(),
            &StandIn::default(),
        );
        record_verdicts(&mut store, &verdicts);
        if !expired.is_empty() {
            tracing::info!(backends = %expired.iter().map(String::as_str).collect::<Vec<_>>().join(","), "registered backends with an expired heartbeat take no new connections");
        }
        let host = host_addresses(builder.own_listeners());
        let built = builder.build(&loaded.records);
        let mut row_warnings = RowWarnings::default();
        row_warnings.say_new(&loaded.bad_rows, &built);
        let mut coverage = Coverage::default();
        coverage.observe(
            &loaded.records,
            &loaded.lifecycle,
            &expired,
            &built.snapshot,
        );
        let handle = SnapshotHandle::new(built.snapshot);
        Ok(RoutingReloader {
            store,
            builder,
            handle,
            failing: false,
            ttl,
            next_expiry_ms,
            expired,
            coverage,
            pops: None,
            health: None,
            last_records: loaded.records,
            row_warnings,
            host_addresses: (host, Instant::now() + HOST_ADDRESSES_EVERY),
            last_read: Some((read, Vec::new())),
        })
    }

    /// From now on, snapshots list the cluster's POPs (from the `pops`
    /// table, alive as `input` says). Publishes one at once.
    pub fn set_pops_input(&mut self, input: PopsInput) {
        self.pops = Some(input);
        self.reload();
    }

    /// Applies `health`'s overlay to this and every later snapshot.
    pub fn set_health(&mut self, health: crate::health::HealthLink) {
        self.health = Some(health);
        self.republish();
    }

    /// This POP's health view, when health checking is on.
    pub fn health(&self) -> Option<&crate::health::HealthLink> {
        self.health.as_ref()
    }

    /// Rebuilds the snapshot from the last records read, with the current
    /// health overlay, and publishes it; returns its version. For health
    /// transitions: the file has not changed, so it is not read again.
    pub fn republish(&mut self) -> u64 {
        let mut records = self.last_records.clone();
        if let Some(health) = &self.health {
            health.apply(&mut records);
        }
        let mut built = self.builder.build(&records);
        // The POP list comes from the pops table, read at the last reload.
        built.snapshot.pops = self.handle.load().pops.clone();
        let version = built.snapshot.version;
        self.handle.publish(built.snapshot);
        if let Some(health) = &self.health {
            health.published(version);
        }
        version
    }

    /// The proxy's listeners as they are bound now: rows reaching one are
    /// left out from the next build on (the caller reloads; a SIGHUP does).
    pub fn set_own_listeners(&mut self, own: OwnListeners) {
        self.builder.set_own_listeners(own);
    }

    /// What [`set_own_listeners`] last set.
    ///
    /// [`set_own_listeners`]: RoutingReloader::set_own_listeners
    pub fn own_listeners(&self) -> &OwnListeners {
        self.builder.own_listeners()
    }

    /// The heartbeat TTL (`None`: nothing expires).
    pub fn heartbeat_ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// Whether `id` was routed as expired by the last reload.
    pub fn expired(&self, id: &str) -> bool {
        self.expired.contains(id)
    }

    pub fn handle(&self) -> &SnapshotHandle {
        &self.handle
    }

    pub fn store_mut(&mut self) -> &mut RoutingStore {
        &mut self.store
    }

    /// Which listeners have no eligible backend, as of the last reload
    /// (every reload warns about them; see `crate::no_backend_warn`).
    pub fn coverage_mut(&mut self) -> &mut Coverage {
        &mut self.coverage
    }

    /// Reloads if the store changed (or a heartbeat deadline passed). Errors
    /// are logged, never returned: the data plane keeps the last good
    /// snapshot.
    pub fn tick(&mut self) -> Reload {
        self.tick_at(SystemTime::now())
    }

    /// [`tick`] with the clock passed in (heartbeat expiry is judged at `now`).
    ///
    /// [`tick`]: RoutingReloader::tick
    pub fn tick_at(&mut self, now: SystemTime) -> Reload {
        let expiry_due = self.next_expiry_ms.is_some_and(|at| unix_ms(now) >= at);
        let host_moved = self.host_addresses_moved();
        let forced = self.failing || expiry_due || host_moved;
        let changed = match self.store.changed() {
            Ok(changed) => changed,
            Err(e) => {
                self.fail(&e);
                return Reload::Unchanged;
            }
        };
        if !changed && !forced {
            return Reload::Unchanged;
        }
        // Only the file may have moved: a commit that left every row the
        // snapshot is built from as it was (replication's notes in
        // `repl_meta`, the change log it empties, an operator's own table)
        // publishes nothing. Published, it was an INFO line a minute on
        // every replicating POP for nothing.
        self.reload_with(now, !forced)
    }

    /// True when this host's addresses changed since the last look (at
    /// most every [`HOST_ADDRESSES_EVERY`]), and a listener is bound to
    /// `0.0.0.0` or `::`: a row at an address the host has just gained (a
    /// VIP moved here, DHCP late) reaches that listener and would loop
    /// (QA: 151 hops until a SIGHUP). The rebuild leaves it out.
    fn host_addresses_moved(&mut self) -> bool {
        let (last, next) = &mut self.host_addresses;
        if !self.builder.own_listeners().any_unspecified() || Instant::now() < *next {
            return false;
        }
        *next = Instant::now() + HOST_ADDRESSES_EVERY;
        let Ok(now) = engine::own_listeners::LocalIps::read() else {
            return false;
        };
        // Against what the last build saw (read just before it).
        let moved = last.as_ref().is_some_and(|l| *l != now);
        if moved {
            tracing::info!(
                "this host's addresses changed: routing rows checked against the listeners again"
            );
        }
        *last = Some(now);
        moved
    }

    /// Reads the whole table and publishes it, whether or not it changed.
    pub fn reload(&mut self) -> Reload {
        self.reload_at(SystemTime::now())
    }

    /// [`reload`] with the clock passed in.
    ///
    /// [`reload`]: RoutingReloader::reload
    pub fn reload_at(&mut self, now: SystemTime) -> Reload {
        self.reload_with(now, false)
    }

    /// [`reload_at`], publishing nothing when `unless_same` and the file
    /// holds what the last reload read.
    ///
    /// [`reload_at`]: RoutingReloader::reload_at
    fn reload_with(&mut self, now: SystemTime, unless_same: bool) -> Reload {
        let started = Instant::now();
        let loaded = match self.store.load() {
            Ok(r) => r,
            Err(e) => {
                self.fail(&e);
                return Reload::Unchanged;
            }
        };
        if self.failing {
            tracing::info!(path = %self.store.path().display(), "routing database readable again");
            self.failing = false;
        }
        let pop_rows = match &self.pops {
            Some(_) => self.store.load_pops().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the pops table; the POP list is empty until it is readable");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let read = (loaded, pop_rows);
        if unless_same && self.last_read.as_ref() == Some(&read) {
            tracing::debug!("routing store written, no routing row changed: nothing published");
            return Reload::Unchanged;
        }
        self.last_read = Some(read.clone());
        let (mut loaded, pop_rows) = read;
        let Expiry {
            expired,
            next_deadline_ms: next_expiry_ms,
            verdicts,
        } = apply_lifecycle(
            &mut loaded.records,
            &loaded.lifecycle,
            self.ttl,
            unix_ms(now),
            self.store.node_id(),
            &self
                .pops
                .as_ref()
                .map(StandIn::from_input)
                .unwrap_or_default(),
        );
        self.last_records.clone_from(&loaded.records);
        if let Some(health) = &self.health {
            health.set_backend_checks(&loaded.records, &loaded.health_checks);
            health.apply(&mut loaded.records);
        }
        // Before the build reads them: an address gained in between makes
        // one more rebuild, never one too few.
        self.host_addresses.0 = host_addresses(self.builder.own_listeners());
        let mut built = self.builder.build(&loaded.records);
        self.row_warnings.say_new(&loaded.bad_rows, &built);
        if let Some(input) = &self.pops {
            built.snapshot.pops = pop_views(&pop_rows, input);
        }
        let version = built.snapshot.version;
        let backends = built.snapshot.backends.len();
        self.handle.publish(built.snapshot);
        if let Some(health) = &self.health {
            health.published(version);
        }
        tracing::info!(
            version,
            backends,
            took_us = started.elapsed().as_micros() as u64,
            "routing table reloaded"
        );
        // After publishing: what these lines say is in effect.
        let ttl_secs = self.ttl.map(|t| t.as_secs());
        let lapsed: Vec<&String> = expired.difference(&self.expired).collect();
        if lapsed.len() > SAID_ONE_BY_ONE {
            // QA: 1,457 lines, one per backend, when a burst of
            // registrations lapsed together.
            tracing::warn!(count = lapsed.len(), first = %first_ids(&lapsed), ttl_secs,
                "backend heartbeats expired: no new connections to them until they heartbeat again");
        } else {
            for id in lapsed {
                tracing::warn!(backend = %id, ttl_secs,
                    "backend heartbeat expired: no new connections until it heartbeats again");
            }
        }
        let resumed: Vec<&String> = self
            .expired
            .difference(&expired)
            .filter(|id| loaded.records.iter().any(|r| r.id == **id && !r.deleted))
            .collect();
        if resumed.len() > SAID_ONE_BY_ONE {
            tracing::info!(count = resumed.len(), first = %first_ids(&resumed),
                "backend heartbeats resumed: back in service");
        } else {
            for id in resumed {
                tracing::info!(backend = %id, "backend heartbeat resumed: back in service");
            }
        }
        self.coverage.observe(
            &loaded.records,
            &loaded.lifecycle,
            &expired,
            &self.handle.load(),
        );
        self.coverage.warn(&self.handle.load(), "reload");
        self.expired = expired;
        self.next_expiry_ms = next_expiry_ms;
        // After publishing: the verdicts are for the other POPs (and make
        // the next tick reload once more, finding nothing to record).
        record_verdicts(&mut self.store, &verdicts);
        Reload::Published { version, backends }
    }

    fn fail(&mut self, e: &StoreError) {
        // Log every failing tick at error level only once per outage.
        if !self.failing {
            tracing::error!(error = %e, version = self.handle.load().version,
                "cannot read routing database; keeping the last good routing table");
        } else {
            tracing::debug!(error = %e, "routing database still unreadable");
        }
        self.failing = true;
    }
}

/// The snapshot's POP list: every row of `pops`, with its liveness. A POP
/// without public addresses is listed at its gossip address's IP.
pub fn pop_views(rows: &[PopRow], input: &PopsInput) -> Vec<PopView> {
    let alive = input.alive.load();
    rows.iter()
        .map(|r| {
            let mut addrs: Vec<std::net::IpAddr> = r
                .public_addrs
                .split(',')
                .filter_map(|a| a.trim().parse().ok())
                .collect();
            if addrs.is_empty() {
                addrs.extend(
                    r.gossip_addr
                        .parse::<std::net::SocketAddr>()
                        .ok()
                        .map(|a| a.ip())
                        .filter(|ip| !ip.is_unspecified()),
                );
            }
            let local = r.node_id == input.local_id;
            PopView {
                node_id: Arc::from(r.node_id.as_str()),
                name: Arc::from(r.name.as_str()),
                region: Arc::from(r.region.trim().to_ascii_lowercase().as_str()),
                country: r.country.as_deref().and_then(Country::parse),
                addrs,
                alive: local || alive.contains(&r.node_id),
                draining: r.draining,
                can_serve: r.serving,
                local,
                mesh: engine::snapshot::PopMesh {
                    public_key: Arc::from(r.wg_public_key.trim()),
                    endpoint: r.wg_endpoint.trim().parse().ok(),
                    prefix6: r.prefix6.trim().parse().ok(),
                },
            }
        })
        .collect()
}

fn record_verdicts(store: &mut RoutingStore, verdicts: &[(String, bool)]) {
    if let Err(e) = store.set_expired(verdicts) {
        tracing::error!(error = %e, "cannot record heartbeat expiry in the routing store; other POPs will not see it until the next reload");
    }
}

/// Rows left out of the snapshot (unreadable or invalid) or routed with a
/// weight or soft limit of 0 read as 1, as the last load found them.
#[derive(Default)]
struct RowWarnings {
    said: BTreeSet<String>,
}

impl RowWarnings {
    /// Warns about what the load (`unreadable`) and `built` report and the
    /// last load did not (a row that became unreadable or invalid, or whose
    /// reason changed); remembers the rest so that a row fixed and broken
    /// again is said again.
    fn say_new(&mut self, unreadable: &[(String, String)], built: &engine::snapshot::Built) {
        let mut now = BTreeSet::new();
        for (id, reason) in unreadable {
            let key = format!("{id}\0unreadable\0{reason}");
            if !self.said.contains(&key) {
                tracing::warn!(backend = %id, %reason, "skipping unreadable routing row");
            }
            now.insert(key);
        }
        for (id, reason) in &built.skipped {
            let key = format!("{id}\0skipped\0{reason}");
            if !self.said.contains(&key) {
                tracing::warn!(backend = %id, %reason, "skipping invalid routing row");
            }
            now.insert(key);
        }
        for (id, note) in &built.notes {
            let key = format!("{id}\0note\0{}", note.field());
            if !self.said.contains(&key) {
                tracing::warn!(backend = %id, field = note.field(), meaning = %note, "routing row has a 0 that is read as 1");
            }
            now.insert(key);
        }
        self.said = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> BackendRecord {
        BackendRecord {
            id: id.into(),
            app: "web".into(),
            region: "sa".into(),
            country: None,
            ip: "127.0.0.1".into(),
            port: 9,
            healthy: true,
            weight: 1,
            soft_limit: 100,
            hard_limit: 150,
            deleted: false,
        }
    }

    fn hb(ms: i64) -> Lifecycle {
        Lifecycle {
            last_heartbeat_ms: Some(ms),
            registered_at_ms: Some(ms),
            ..Lifecycle::default()
        }
    }

    const TTL: Duration = Duration::from_secs(10);

    /// A row this POP judges with no heartbeat recorded here keeps its
    /// verdict: an expired one stayed expired (QA: a restart un-expired a
    /// dead backend on every POP for a TTL).
    #[test]
    fn a_row_judged_here_without_a_heartbeat_keeps_its_verdict() {
        let ttl = Some(Duration::from_secs(10));
        let life = |expired| Lifecycle {
            heartbeat_pop: Some("n1".into()),
            expired,
            ..Lifecycle::default()
        };
        assert!(row_expired(&life(true), ttl, 50_000, Some("n1")));
        assert!(!row_expired(&life(false), ttl, 50_000, Some("n1")));
        assert!(
            !row_expired(&life(true), None, 50_000, Some("n1")),
            "no TTL: nothing expires"
        );
    }

    #[test]
    fn drained_and_expired_backends_are_routed_unhealthy() {
        let mut records = vec![
            rec("manual"),
            rec("fresh"),
            rec("old"),
            rec("drained"),
            rec("gone"),
        ];
        records[4].deleted = true;
        let drained = Lifecycle {
            draining: true,
            ..hb(95_000)
        };
        let lifecycle = [Lifecycle::default(), hb(95_000), hb(90_000), drained, hb(0)];
        let e = apply_lifecycle(
            &mut records,
            &lifecycle,
            Some(TTL),
            100_000,
            None,
            &StandIn::default(),
        );
        let healthy: Vec<bool> = records.iter().map(|r| r.healthy).collect();
        assert_eq!(healthy, [true, true, false, false, true]);
        assert_eq!(e.expired.into_iter().collect::<Vec<_>>(), ["old"]);
        // fresh and drained both expire at 105 000.
        assert_eq!(e.next_deadline_ms, Some(105_000));
        assert_eq!(e.verdicts, [("old".to_string(), true)]);
    }

    #[test]
    fn expiry_is_at_exactly_the_ttl_and_off_without_one() {
        assert!(!is_expired(0, TTL, 9_999));
        assert!(is_expired(0, TTL, 10_000));
        // A heartbeat from the future (clock stepped back) is not expired.
        assert!(!is_expired(20_000, TTL, 10_000));
        let mut records = vec![rec("old")];
        let e = apply_lifecycle(
            &mut records,
            &[hb(0)],
            None,
            i64::MAX,
            None,
            &StandIn::default(),
        );
        assert!(e.expired.is_empty() && e.next_deadline_ms.is_none() && records[0].healthy);
    }

    #[test]
    fn only_the_heartbeat_owner_judges_expiry_and_the_others_follow_its_verdict() {
        let owned_here = Lifecycle {
            heartbeat_pop: Some("gru".into()),
            ..hb(0)
        };
        let owned_elsewhere = Lifecycle {
            heartbeat_pop: Some("fra".into()),
            // A stale heartbeat this POP once received: not its call now.
            ..hb(0)
        };
        let expired_elsewhere = Lifecycle {
            heartbeat_pop: Some("fra".into()),
            expired: true,
            ..Lifecycle::default()
        };
        let mut records = vec![rec("here"), rec("there"), rec("gone-there")];
        let lifecycle = [owned_here, owned_elsewhere, expired_elsewhere];
        let e = apply_lifecycle(
            &mut records,
            &lifecycle,
            Some(TTL),
            100_000,
            Some("gru"),
            &StandIn::default(),
        );
        let healthy: Vec<bool> = records.iter().map(|r| r.healthy).collect();
        assert_eq!(healthy, [false, true, false]);
        assert_eq!(
            e.expired.into_iter().collect::<Vec<_>>(),
            ["gone-there", "here"]
        );
        // Only the row this POP judges gets a verdict to replicate.
        assert_eq!(e.verdicts, [("here".to_string(), true)]);
    }

    /// A backend that heartbeated at a POP that then went down with it
    /// stayed "serving" everywhere: only its owner judged its expiry.
    #[test]
    fn the_first_alive_pop_expires_the_rows_of_an_owner_down_for_the_ttl() {
        let owned_by = |pop: &str| Lifecycle {
            heartbeat_pop: Some(pop.into()),
            ..Lifecycle::default()
        };
        let lifecycle = [owned_by("fra"), owned_by("lhr")];
        let down_at = 100_000;
        let stand_in = StandIn {
            down_since_ms: [("fra".to_string(), down_at)].into(),
        };
        let ttl_ms = TTL.as_millis() as i64;
        // Down for less than the TTL: nothing yet, a reload due when it is.
        let mut records = vec![rec("b-fra"), rec("b-lhr")];
        let e = apply_lifecycle(
            &mut records,
            &lifecycle,
            Some(TTL),
            down_at + 1,
            Some("gru"),
            &stand_in,
        );
        assert!(e.verdicts.is_empty());
        assert!(records.iter().all(|r| r.healthy));
        assert_eq!(e.next_deadline_ms, Some(down_at + ttl_ms));
        // Down for the TTL: expired here at once, and recorded to replicate.
        let e = apply_lifecycle(
            &mut records,
            &lifecycle,
            Some(TTL),
            down_at + ttl_ms,
            Some("gru"),
            &stand_in,
        );
        assert_eq!(e.verdicts, [("b-fra".to_string(), true)]);
        let healthy: Vec<bool> = records.iter().map(|r| r.healthy).collect();
        assert_eq!(healthy, [false, true]);
        // Already recorded: no verdict again.
        let recorded = [
            Lifecycle {
                expired: true,
                ..owned_by("fra")
            },
            owned_by("lhr"),
        ];
        let mut records = vec![rec("b-fra"), rec("b-lhr")];
        let e = apply_lifecycle(
            &mut records,
            &recorded,
            Some(TTL),
            down_at + ttl_ms,
            Some("gru"),
            &stand_in,
        );
        assert!(e.verdicts.is_empty());
        assert!(!records[0].healthy);
    }

    #[test]
    fn only_the_first_alive_pop_by_id_stands_in() {
        let input = |me: &str| PopsInput {
            local_id: me.into(),
            alive: Arc::new(ArcSwap::from_pointee(
                ["ams", "gru"].map(String::from).into_iter().collect(),
            )),
            down: Arc::new(ArcSwap::from_pointee([("fra".to_string(), 1)].into())),
        };
        assert_eq!(StandIn::from_input(&input("ams")).down_since_ms.len(), 1);
        assert!(StandIn::from_input(&input("gru")).down_since_ms.is_empty());
        // The alive set may not list this POP itself: it counts anyway.
        assert_eq!(StandIn::from_input(&input("aaa")).down_since_ms.len(), 1);
    }

    /// A commit that changes no row the snapshot is built from (replication
    /// noting when it last heard a peer in `repl_meta`, once a minute; an
    /// operator's table of their own) published the same table again, with
    /// an INFO line: noise every minute on every replicating POP.
    #[test]
    fn a_commit_that_changes_no_routing_row_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        store
            .register(&rec("a"), unix_ms(SystemTime::now()))
            .unwrap();
        let mut reloader = RoutingReloader::start(store).unwrap();
        let before = reloader.handle().load().version;
        let other = rusqlite::Connection::open(&path).unwrap();
        other
            .execute_batch("CREATE TABLE notes (k TEXT); INSERT INTO notes VALUES ('x');")
            .unwrap();
        assert_eq!(reloader.tick(), Reload::Unchanged);
        assert_eq!(reloader.handle().load().version, before);
        // A row that changes is published.
        other
            .execute("UPDATE backends SET weight = 7 WHERE id = 'a'", [])
            .unwrap();
        assert!(matches!(reloader.tick(), Reload::Published { .. }));
        // An explicit reload publishes whatever the table holds.
        assert!(matches!(reloader.reload(), Reload::Published { .. }));
    }

    #[test]
    fn reloader_republishes_when_a_heartbeat_deadline_passes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RoutingStore::open(&dir.path().join("routing.db")).unwrap();
        let t0 = SystemTime::now();
        store.register(&rec("a"), unix_ms(t0)).unwrap();
        let mut reloader = RoutingReloader::start_with_ttl(store, Some(TTL)).unwrap();
        let healthy = |r: &RoutingReloader| {
            let snap = r.handle().load();
            snap.backends
                .iter()
                .find(|b| &*b.id == "a")
                .map(|b| b.healthy)
        };
        assert_eq!(healthy(&reloader), Some(true));
        assert_eq!(
            reloader.tick_at(t0 + TTL - Duration::from_millis(1)),
            Reload::Unchanged
        );
        assert!(matches!(
            reloader.tick_at(t0 + TTL),
            Reload::Published { .. }
        ));
        assert_eq!(
            healthy(&reloader),
            Some(false),
            "expired: no new connections"
        );
        assert!(reloader.expired("a"));
        // Nothing more to do until something changes.
        assert_eq!(reloader.tick_at(t0 + TTL * 5), Reload::Unchanged);

        // The expiry verdict was recorded for the other POPs.
        let life = |r: &mut RoutingReloader| {
            let loaded = r.store_mut().peek().unwrap();
            loaded.lifecycle[0].clone()
        };
        assert!(life(&mut reloader).expired);

        // A heartbeat of an expired backend clears the verdict: a real
        // write, which the next tick publishes.
        let t1 = t0 + TTL * 6;
        assert!(reloader.store_mut().heartbeat("a", unix_ms(t1)).unwrap());
        assert!(!life(&mut reloader).expired);
        assert!(matches!(reloader.tick_at(t1), Reload::Published { .. }));
        assert_eq!(healthy(&reloader), Some(true));
        assert!(!reloader.expired("a"));

        // Further heartbeats stay quiet.
        let t2 = t1 + Duration::from_secs(1);
        assert!(reloader.store_mut().heartbeat("a", unix_ms(t2)).unwrap());
        assert_eq!(reloader.tick_at(t2), Reload::Unchanged);
    }
}
