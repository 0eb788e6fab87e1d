//! What a shard's tasks share: the state every shard reads ([`Shared`],
//! written only by the control thread), the shard's own context
//! ([`ShardCtx`]), a listener as one shard sees it ([`ListenerCtx`]) and the
//! guard that keeps a connection counted ([`ConnSlot`]).
//!
//! A leaf of the data plane's import graph: `engine` creates these, `shard`
//! runs them, `conn` uses them, and this module imports none of the three.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::affinity::{AffinityTable, SharedAffinity};
use crate::geo::GeoResolver;
use crate::passive::PassiveReporter;
use crate::rate_limit::ClientTable;
use crate::settings::{EngineSettings, Knobs, ListenerSpec};
use crate::snapshot::SnapshotHandle;
use crate::stats::{step_owned, ListenerStats, ShardStats};

/// State every shard reads; written only by the control thread.
pub(crate) struct Shared {
    pub settings: EngineSettings,
    pub snapshot: SnapshotHandle,
    pub geo: Arc<GeoResolver>,
    pub knobs: Arc<ArcSwap<Knobs>>,
    /// Open client connections across shards (counted with or without a
    /// process-wide limit, which SIGHUP may set at any time).
    pub active_total: AtomicU32,
    /// Affinity for connections that cannot be steered to one shard.
    pub shared_affinity: SharedAffinity,
    /// Where connect failures and resets go (the control side's health
    /// checker); never blocks.
    pub passive: Arc<PassiveReporter>,
    /// The warm-connection pool's policy; `None` = off. Each shard's pool
    /// task reads it once per tick (see `pool::driver`), connections never.
    pub pool_policy: Arc<arc_swap::ArcSwapOption<crate::pool::Policy>>,
    /// Set by [`crate::FastStop`]: a drain in progress ends now.
    pub stop_now: Arc<AtomicBool>,
}

/// What every connection task of a shard shares.
pub(crate) struct ShardCtx {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub stats: Arc<ShardStats>,
    /// Bindings of clients steered to this shard; private, so no lock.
    pub affinity: RefCell<AffinityTable>,
    /// Per-client rate limit and connection cap of this shard; private, so
    /// no lock (see `rate_limit` for why per shard).
    pub clients: RefCell<ClientTable>,
    /// This shard's warm backend connections; private, so no lock.
    pub pool: Rc<crate::pool::ShardPool>,
    /// Idle timeouts of this shard's connections (one sweeper, see `idle`).
    pub idle: crate::idle::IdleSweeper,
    /// Backend connect timeouts of this shard's connections (one queue, see
    /// `deadlines`).
    pub connects: crate::deadlines::Deadlines,
    /// Recent clients' countries (see `geo_cache`); private, so no lock.
    pub geo_cache: RefCell<crate::geo_cache::GeoCache>,
    /// Backend connects that failed on this host's side (no local port or
    /// descriptor): logged at most every 10 s.
    pub local_connect_failures: RefCell<crate::log_limit::LogLimit>,
    /// This shard's view of the knobs: re-read only after a change, so
    /// connections don't bump a shared refcount.
    knobs: RefCell<arc_swap::Cache<Arc<arc_swap::ArcSwap<Knobs>>, Arc<Knobs>>>,
}

impl ShardCtx {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        stats: Arc<ShardStats>,
        affinity: AffinityTable,
        pool_stats: Arc<crate::pool::stats::PoolStats>,
    ) -> Self {
        ShardCtx {
            id,
            pool: crate::pool::ShardPool::new(id, pool_stats),
            idle: crate::idle::IdleSweeper::default(),
            connects: crate::deadlines::Deadlines::default(),
            geo_cache: RefCell::default(),
            local_connect_failures: RefCell::new(crate::log_limit::LogLimit::new(
                std::time::Duration::from_secs(10),
            )),
            knobs: RefCell::new(arc_swap::Cache::new(Arc::clone(&shared.knobs))),
            clients: RefCell::new(ClientTable::new(
                shared.settings.client_table_capacity,
                std::time::Instant::now(),
            )),
            shared,
            stats,
            affinity: RefCell::new(affinity),
        }
    }

    /// The current knobs, copied.
    pub fn knobs(&self) -> Knobs {
        self.with_knobs(|knobs| *knobs)
    }

    /// `read` applied to the current knobs, borrowed: what the connection
    /// path uses, which needs a few fields and not a copy of all of them
    /// (`Knobs` is 136 bytes). `read` must not ask for the knobs again.
    pub fn with_knobs<R>(&self, read: impl FnOnce(&Knobs) -> R) -> R {
        read(self.knobs.borrow_mut().load())
    }

    /// Puts the current knobs' affinity TTL and size limit in force in
    /// `table` (this shard's or the shared one). Called before each
    /// routing decision, so that a SIGHUP's change applies from the next
    /// connection: waiting for the GC sweep left clients bound for up to
    /// two GC intervals. Cheap on the hot path: the cache re-reads the
    /// knobs only after a change, and the table is written only when a
    /// value differs.
    pub fn sync_affinity(&self, table: &mut AffinityTable) {
        self.with_knobs(|k| table.configure(k.affinity_ttl, k.affinity_max_clients));
    }
}

/// A listener as one shard sees it.
pub(crate) struct ListenerCtx {
    pub spec: Arc<ListenerSpec>,
    /// Every connection from one client IP reaches this shard, so the shard's
    /// own affinity table is enough. False for PROXY-protocol listeners (the
    /// TCP peer is the load balancer, not the client) and when the kernel
    /// refused the steering program.
    pub local_affinity: bool,
    /// This listener's counters on this shard.
    pub stats: Arc<ListenerStats>,
}

/// Keeps a connection counted (shard and process) until dropped.
///
/// Limits are enforced before serving, never by closing: an accept loop
/// asks [`ConnSlot::room`] and, when a limit is reached, stops accepting
/// until a slot frees, so further clients wait in the kernel's accept queue
/// (served later) instead of being accepted and closed (HAProxy's `maxconn`
/// works the same way). An accept that was already pending when the limit
/// was reached holds its client, unserved, until there is room: at most one
/// such descriptor per listener per shard, which the default limit (derived
/// from the open-files limit) keeps in reserve. Two shards that find the
/// last slot free at the same moment may both take it: the count can pass
/// the process-wide limit by one per shard in that race.
pub(crate) struct ConnSlot {
    ctx: Rc<ShardCtx>,
    lctx: Rc<ListenerCtx>,
}

impl ConnSlot {
    /// Whether this shard may accept another connection now: below the
    /// per-shard limit and the process-wide one (0 = unlimited).
    pub fn room(ctx: &ShardCtx) -> bool {
        let (shard_max, global_max) =
            ctx.with_knobs(|k| (k.max_connections_per_shard, k.max_connections));
        if shard_max != 0 && ctx.stats.active() >= shard_max {
            return false;
        }
        global_max == 0 || ctx.shared.active_total.load(Ordering::Relaxed) < global_max
    }

    /// Counts an accepted connection.
    ///
    /// Counted process-wide even while there is no process-wide limit
    /// (`max_connections = 0`): a limit set later by SIGHUP must see the
    /// connections already open.
    pub fn take(ctx: &Rc<ShardCtx>, lctx: &Rc<ListenerCtx>) -> ConnSlot {
        ctx.shared.active_total.fetch_add(1, Ordering::Relaxed);
        step_owned(&ctx.stats.active, true);
        step_owned(&lctx.stats.active, true);
        ConnSlot {
            ctx: Rc::clone(ctx),
            lctx: Rc::clone(lctx),
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        step_owned(&self.ctx.stats.active, false);
        step_owned(&self.lctx.stats.active, false);
        self.ctx.shared.active_total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps a connection counted against its client IP's cap until dropped.
pub(crate) struct ClientSlot {
    ctx: Rc<ShardCtx>,
    admitted: crate::rate_limit::Admitted,
}

impl ClientSlot {
    /// Admits a connection from `ip` under the current per-client limits, or
    /// counts the refusal and says why. `Ok(None)` when no limit is set.
    pub fn admit(
        ctx: &Rc<ShardCtx>,
        ip: std::net::IpAddr,
        limits: &crate::rate_limit::ClientLimits,
    ) -> Result<Option<ClientSlot>, crate::rate_limit::Refused> {
        if !limits.active() {
            return Ok(None);
        }
        let mut table = ctx.clients.borrow_mut();
        let outcome = table.admit(ip, std::time::Instant::now(), limits);
        ctx.stats
            .client_evictions
            .store(table.evictions, Ordering::Relaxed);
        drop(table);
        match outcome {
            Ok(admitted) => Ok(Some(ClientSlot {
                ctx: Rc::clone(ctx),
                admitted,
            })),
            Err(refused) => {
                let counter = match refused {
                    crate::rate_limit::Refused::Rate => &ctx.stats.rate_limited,
                    crate::rate_limit::Refused::Concurrent => &ctx.stats.client_conn_limited,
                };
                crate::stats::add_owned(counter, 1);
                Err(refused)
            }
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.ctx.clients.borrow_mut().release(self.admitted);
    }
}
