//! The data plane as the control thread sees it: start it, add and remove
//! listeners, change knobs, read stats, shut it down.
//!
//! Call order: [`Engine::start`] binds every listener first (a bad address or
//! a port in use fails here, before any thread starts), then starts one shard
//! per configured core and hands each its sockets. Later calls are cheap
//! messages to the shards; [`Engine::shutdown`] blocks until every shard has
//! drained or its grace period ran out.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::affinity::AffinityTable;
use crate::ctx::Shared;
use crate::geo::GeoResolver;
use crate::listener;
use crate::passive::{self, PassiveEvents, PassiveReporter};
use crate::pool::stats::{PoolStats, PoolSummary};
use crate::pool::Policy;
use crate::settings::{EngineSettings, Knobs, ListenerSpec};
use crate::shard::{self, Command};
use crate::snapshot::SnapshotHandle;
use crate::stats::{ListenerStats, ShardStats, StatsSummary};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    // The io::Error is in the message, so it is a plain field (`cause`), not
    // a `source`: `{:#}` error chains would print it twice.
    #[error("listener {listener:?}: cannot listen on {addr}: {cause}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        cause: io::Error,
    },
    #[error("listener {0:?} exists already")]
    DuplicateListener(String),
    #[error("listener {0:?} is not running")]
    NoSuchListener(String),
    #[error("listener {listener:?} runs on {running}, not on {asked}: only settings other than the address change in place")]
    AddressChanged {
        listener: String,
        running: SocketAddr,
        asked: SocketAddr,
    },
    #[error("shard {shard}: cannot start io_uring runtime: {cause}")]
    Runtime { shard: usize, cause: io::Error },
    #[error("cannot start shard thread: {0}")]
    Thread(io::Error),
}

struct ShardHandle {
    commands: async_channel::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<ShardStats>,
    pool: Arc<PoolStats>,
}

/// Ends a drain in progress at once. See [`Engine::fast_stop`].
#[derive(Clone)]
pub struct FastStop(Arc<AtomicBool>);

impl FastStop {
    pub fn trigger(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A listener that is running on every shard.
#[derive(Debug, Clone)]
pub struct RunningListener {
    pub spec: Arc<ListenerSpec>,
    pub local_addr: SocketAddr,
    /// Connections steered to shards by client address (see `listener`).
    pub steered: bool,
    /// The listener's counters, one per shard.
    pub stats: Vec<Arc<ListenerStats>>,
    /// Duplicates of the listener's sockets, in the order of their
    /// `SO_REUSEPORT` group (the order the steering program indexes): what a
    /// successor process takes over on a binary upgrade. The shards own the
    /// originals; both refer to the same sockets.
    pub sockets: Arc<[std::os::fd::OwnedFd]>,
}

/// A read-only view of every counter of the data plane, for metrics. Cheap to
/// clone; reading sums the per-shard counters.
#[derive(Clone)]
pub struct StatsView {
    shards: Arc<Vec<Arc<ShardStats>>>,
    pools: Arc<Vec<Arc<PoolStats>>>,
    listeners: Arc<Mutex<Vec<RunningListener>>>,
    passive: Arc<PassiveReporter>,
    knobs: Arc<ArcSwap<Knobs>>,
}

/// One listener's counters summed over shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerSummary {
    pub name: String,
    /// The app it serves; `None`: every app.
    pub app: Option<String>,
    pub accepted: u64,
    /// Times its accept loops paused at a connection limit.
    pub limit_waits: u64,
    /// Closed early for a bad or late PROXY header.
    pub rejected_proxy_header: u64,
    /// Closed early for a failed or timed-out TLS handshake.
    pub rejected_tls_handshake: u64,
    /// Closed for want of a backend.
    pub no_backend: u64,
    /// Of `no_backend`, those closed after every backend tried failed to
    /// connect.
    pub no_backend_after_failures: u64,
    /// Refused by a per-client limit.
    pub rejected_client_limit: u64,
    pub active: u64,
}

impl StatsView {
    /// Passive health events queued for the control side, and dropped.
    pub fn passive_events(&self) -> (u64, u64) {
        (self.passive.sent(), self.passive.dropped())
    }

    /// The process-wide connection limit in force (0 = unlimited).
    pub fn max_connections(&self) -> u32 {
        self.knobs.load().max_connections
    }

    pub fn summary(&self) -> StatsSummary {
        StatsSummary::sum(self.shards.iter().map(|s| &**s))
    }

    /// The warm-connection pools' counters, summed over shards.
    pub fn pool(&self) -> PoolSummary {
        let mut sum = PoolSummary::default();
        for p in self.pools.iter() {
            sum.add(p);
        }
        sum
    }

    /// Connections accepted by each shard, in shard order.
    pub fn accepted_per_shard(&self) -> Vec<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        self.shards
            .iter()
            .map(|s| s.accepted.load(Relaxed))
            .collect()
    }

    /// Per listener, the clients its per-client limits refused since the
    /// last call, merged over shards; ends the interval (see
    /// [`crate::refused_clients`]). One caller only: the traffic watch.
    pub fn take_refused_clients(&self) -> Vec<(String, crate::refused_clients::Interval)> {
        let running = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        running
            .iter()
            .map(|l| {
                let mut merged = crate::refused_clients::Interval::default();
                for st in &l.stats {
                    merged.merge(st.refused_clients.take());
                }
                (l.spec.name.to_string(), merged)
            })
            .collect()
    }

    pub fn listeners(&self) -> Vec<ListenerSummary> {
        use std::sync::atomic::Ordering::Relaxed;
        let running = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        running
            .iter()
            .map(|l| {
                let mut s = ListenerSummary {
                    name: l.spec.name.to_string(),
                    app: l.spec.app.as_deref().map(str::to_string),
                    ..Default::default()
                };
                for st in &l.stats {
                    s.accepted += st.accepted.load(Relaxed);
                    s.limit_waits += st.limit_waits.load(Relaxed);
                    s.rejected_proxy_header += st.rejected_proxy_header.load(Relaxed);
                    s.rejected_tls_handshake += st.rejected_tls_handshake.load(Relaxed);
                    s.no_backend += st.no_backend.load(Relaxed);
                    s.no_backend_after_failures += st.no_backend_after_failures.load(Relaxed);
                    s.rejected_client_limit += st.rejected_client_limit.load(Relaxed);
                    s.active += u64::from(st.active.load(Relaxed));
                }
                s
            })
            .collect()
    }
}

pub struct Engine {
    shared: Arc<Shared>,
    shards: Vec<ShardHandle>,
    listeners: Vec<RunningListener>,
    /// The same listeners, for [`StatsView`] readers on other threads.
    published_listeners: Arc<Mutex<Vec<RunningListener>>>,
    /// Addresses of listeners removed at run time.
    retired_addrs: Vec<SocketAddr>,
    /// Until then, a listener added at run time waits for its address to be
    /// released (see [`Engine::predecessor_may_hold_addresses`]).
    predecessor_until: Option<std::time::Instant>,
    /// The control side's end of the passive-event channel, until taken.
    passive_events: Option<PassiveEvents>,
}

/// Every listener's sockets, bound for a number of shards, not yet served.
/// [`Engine::bind`] makes them, [`Engine::start_bound`] serves them; dropping
/// them closes the sockets.
#[derive(Debug)]
pub struct BoundListeners {
    shards: usize,
    groups: Vec<(Arc<ListenerSpec>, listener::BoundGroup)>,
}

impl BoundListeners {
    /// Listeners bound (or adopted) by the caller, for `shards` shards.
    pub fn from_groups(
        shards: usize,
        groups: Vec<(ListenerSpec, listener::BoundGroup)>,
    ) -> BoundListeners {
        BoundListeners {
            shards: shards.max(1),
            groups: groups
                .into_iter()
                .map(|(spec, group)| (Arc::new(spec), group))
                .collect(),
        }
    }

    /// The bound address of each listener, in the order given.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.groups.iter().map(|(_, g)| g.local_addr).collect()
    }
}

impl Engine {
    /// Binds every listener (one socket per shard each) without starting
    /// anything: a bad address or a port in use fails here. `check-config`
    /// binds this way and lets go; `run` binds before it creates anything
    /// else.
    pub fn bind(listeners: &[ListenerSpec], shards: usize) -> Result<BoundListeners, EngineError> {
        let shards = shards.max(1);
        let mut groups = Vec::with_capacity(listeners.len());
        for spec in listeners {
            groups.push((
                Arc::new(spec.clone()),
                bind(spec, shards, Claim::Exclusive(RELEASE_PATIENCE))?,
            ));
        }
        Ok(BoundListeners { shards, groups })
    }

    /// [`Engine::bind`] then [`Engine::start_bound`].
    pub fn start(
        settings: EngineSettings,
        knobs: Knobs,
        listeners: &[ListenerSpec],
        snapshot: SnapshotHandle,
        geo: Arc<GeoResolver>,
    ) -> Result<Engine, EngineError> {
        let bound = Self::bind(listeners, settings.shards)?;
        Self::start_bound(settings, knobs, bound, snapshot, geo)
    }

    /// Binds a listener's sockets for an engine of `shards` shards, refusing
    /// an address something already listens on. With
    /// [`BoundListeners::from_groups`] the caller may mix such groups with
    /// sockets it already holds ([`listener::adopt_group`], a binary
    /// upgrade).
    pub fn bind_listener(
        spec: &ListenerSpec,
        shards: usize,
    ) -> Result<listener::BoundGroup, EngineError> {
        bind(spec, shards.max(1), Claim::Exclusive(RELEASE_PATIENCE))
    }

    /// Starts one shard per socket of `bound` (as many as it was bound for,
    /// whatever `settings.shards` says) and hands each its sockets.
    pub fn start_bound(
        settings: EngineSettings,
        knobs: Knobs,
        bound: BoundListeners,
        snapshot: SnapshotHandle,
        geo: Arc<GeoResolver>,
    ) -> Result<Engine, EngineError> {
        let BoundListeners {
            shards: shard_count,
            groups,
        } = bound;
        let (reporter, passive_events) = passive::channel(passive::CAPACITY);
        let shared = Arc::new(Shared {
            passive: reporter,
            shared_affinity: Arc::new(Mutex::new({
                let mut table = AffinityTable::new(knobs.affinity_ttl);
                table.set_max_clients(knobs.affinity_max_clients);
                table
            })),
            settings,
            snapshot,
            geo,
            knobs: Arc::new(ArcSwap::from_pointee(knobs)),
            active_total: AtomicU32::new(0),
            pool_policy: Arc::new(arc_swap::ArcSwapOption::empty()),
            stop_now: Arc::default(),
        });
        let mut engine = Engine {
            shared,
            shards: Vec::with_capacity(shard_count),
            listeners: Vec::new(),
            published_listeners: Arc::default(),
            retired_addrs: Vec::new(),
            predecessor_until: None,
            passive_events: Some(passive_events),
        };
        for id in 0..shard_count {
            if let Err(e) = engine.start_shard(id) {
                engine.stop(Duration::ZERO);
                return Err(e);
            }
        }
        for (spec, group) in groups {
            engine.hand_out(spec, group)?;
        }
        Ok(engine)
    }

    fn start_shard(&mut self, id: usize) -> Result<(), EngineError> {
        let (tx, rx) = async_channel::unbounded();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stats = Arc::new(ShardStats::default());
        let pool = Arc::new(PoolStats::default());
        let shared = Arc::clone(&self.shared);
        let thread_stats = Arc::clone(&stats);
        let thread_pool = Arc::clone(&pool);
        let thread = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn(move || shard::run(id, shared, thread_stats, thread_pool, rx, ready_tx))
            .map_err(EngineError::Thread)?;
        let handle = ShardHandle {
            commands: tx,
            thread: Some(thread),
            stats,
            pool,
        };
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("shard thread exited during start")));
        self.shards.push(handle);
        ready.map_err(|cause| EngineError::Runtime { shard: id, cause })
    }

    /// Gives socket *i* of the group to shard *i* mod the shard count (one
    /// each when the group was bound for this engine; several per shard
    /// when it was adopted from a process that ran more shards).
    fn hand_out(
        &mut self,
        spec: Arc<ListenerSpec>,
        group: listener::BoundGroup,
    ) -> Result<(), EngineError> {
        if !group.steered {
            tracing::warn!(listener = %spec.name,
                "kernel refused the reuseport steering program; affinity uses a shared table");
        }
        let sockets = group
            .sockets
            .iter()
            .map(|s| std::os::fd::AsFd::as_fd(s).try_clone_to_owned())
            .collect::<io::Result<Arc<[_]>>>()
            .map_err(|cause| EngineError::Bind {
                listener: spec.name.to_string(),
                addr: group.local_addr,
                cause,
            })?;
        let stats: Vec<Arc<ListenerStats>> = self.shards.iter().map(|_| Arc::default()).collect();
        let shard_count = self.shards.len();
        for (i, socket) in group.sockets.into_iter().enumerate() {
            let shard = i % shard_count;
            let _ = self.shards[shard].commands.try_send(Command::AddListener {
                spec: Arc::clone(&spec),
                socket,
                // Steered to socket i, so to the shard that serves it: a
                // client's connections still meet one affinity table.
                steered: group.steered,
                stats: Arc::clone(&stats[shard]),
            });
        }
        self.listeners.push(RunningListener {
            spec,
            local_addr: group.local_addr,
            steered: group.steered,
            stats,
            sockets,
        });
        self.publish_listeners();
        Ok(())
    }

    /// Copies the listeners, without their sockets, for the stats views:
    /// a view must not keep a socket open after the engine let it go.
    fn publish_listeners(&self) {
        let counted = self
            .listeners
            .iter()
            .map(|l| RunningListener {
                sockets: Arc::new([]),
                ..l.clone()
            })
            .collect();
        *self
            .published_listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = counted;
    }

    /// A view of the counters for a metrics exporter on another thread.
    pub fn stats_view(&self) -> StatsView {
        StatsView {
            shards: Arc::new(self.shards.iter().map(|s| Arc::clone(&s.stats)).collect()),
            pools: Arc::new(self.shards.iter().map(|s| Arc::clone(&s.pool)).collect()),
            listeners: Arc::clone(&self.published_listeners),
            passive: Arc::clone(&self.shared.passive),
            knobs: Arc::clone(&self.shared.knobs),
        }
    }

    /// The receiving end of the shards' passive health events (once; `None`
    /// after). Dropping it closes the channel: shards then count their
    /// events as dropped without queueing them.
    pub fn take_passive_events(&mut self) -> Option<PassiveEvents> {
        self.passive_events.take()
    }

    pub fn listeners(&self) -> &[RunningListener] {
        &self.listeners
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Starts a new listener on every shard.
    pub fn add_listener(&mut self, spec: ListenerSpec) -> Result<SocketAddr, EngineError> {
        if self.listeners.iter().any(|l| l.spec.name == spec.name) {
            return Err(EngineError::DuplicateListener(spec.name.to_string()));
        }
        // A listener restarted on its own old address (a SIGHUP change) may
        // still have sockets closing on the shards; only there is joining the
        // existing group expected.
        // A running engine does not wait: the address is someone else's,
        // unless a binary upgrade's predecessor may still hold it.
        let claim = match self.retired_addrs.contains(&spec.addr) {
            true => Claim::Shared,
            false => Claim::Exclusive(self.predecessor_patience()),
        };
        let group = bind(&spec, self.shards.len(), claim)?;
        let addr = group.local_addr;
        self.hand_out(Arc::new(spec), group)?;
        Ok(addr)
    }

    /// A binary upgrade's successor, ready: for `window` from now a listener
    /// added at run time whose address is in use waits (up to 2 s) for it to
    /// be released instead of failing at once. The predecessor stops
    /// accepting and closes its listeners once this process is ready, and it
    /// may have started one from a config edit or SIGHUP made during the
    /// upgrade, which this process applies too as soon as it is ready (QA:
    /// "Address already in use", and the listener stayed down until the next
    /// reload).
    pub fn predecessor_may_hold_addresses(&mut self, window: Duration) {
        self.predecessor_until = Some(std::time::Instant::now() + window);
    }

    /// How long an address in use may be waited for now.
    fn predecessor_patience(&self) -> Duration {
        self.predecessor_until.map_or(Duration::ZERO, |until| {
            until
                .saturating_duration_since(std::time::Instant::now())
                .min(RELEASE_PATIENCE)
        })
    }

    /// Gives running listeners new settings on the sockets they already
    /// have: each `(name, spec)` names a running listener and what it becomes
    /// (another name, app, TLS or PROXY protocol setting; `spec.addr` must be
    /// the address it runs on). No socket closes, so no client queued on one
    /// is reset, as a remove and an add on the same address would (the old
    /// sockets close with their queues, and until then the steering program
    /// still sends clients to them). New connections use the new settings;
    /// open ones go on with the old. All or nothing: on an error nothing
    /// changes.
    pub fn update_listeners(
        &mut self,
        updates: Vec<(String, ListenerSpec)>,
    ) -> Result<(), EngineError> {
        let mut positions = Vec::with_capacity(updates.len());
        for (name, spec) in &updates {
            let pos = self
                .listeners
                .iter()
                .position(|l| &*l.spec.name == name)
                .ok_or_else(|| EngineError::NoSuchListener(name.clone()))?;
            let running = &self.listeners[pos];
            if spec.addr != running.local_addr && spec.addr != running.spec.addr {
                return Err(EngineError::AddressChanged {
                    listener: name.clone(),
                    running: running.local_addr,
                    asked: spec.addr,
                });
            }
            positions.push(pos);
        }
        // The names after the change, each once.
        let mut names: Vec<&str> = (0..self.listeners.len())
            .filter(|pos| !positions.contains(pos))
            .map(|pos| &*self.listeners[pos].spec.name)
            .collect();
        for (_, spec) in &updates {
            if names.contains(&&*spec.name) {
                return Err(EngineError::DuplicateListener(spec.name.to_string()));
            }
            names.push(&spec.name);
        }
        let mut moved = Vec::with_capacity(updates.len());
        for ((name, spec), pos) in updates.into_iter().zip(positions) {
            let spec = Arc::new(spec);
            self.listeners[pos].spec = Arc::clone(&spec);
            moved.push((Arc::<str>::from(name), spec));
        }
        self.publish_listeners();
        let moved: Arc<[_]> = moved.into();
        for shard in &self.shards {
            let _ = shard
                .commands
                .try_send(Command::UpdateListeners(Arc::clone(&moved)));
        }
        Ok(())
    }

    /// Stops accepting on a listener; its open connections go on.
    pub fn remove_listener(&mut self, name: &str) -> bool {
        let Some(pos) = self.listeners.iter().position(|l| &*l.spec.name == name) else {
            return false;
        };
        let removed = self.listeners.remove(pos);
        if !self.retired_addrs.contains(&removed.local_addr) {
            self.retired_addrs.push(removed.local_addr);
        }
        self.publish_listeners();
        for shard in &self.shards {
            let _ = shard
                .commands
                .try_send(Command::RemoveListener(Arc::clone(&removed.spec.name)));
        }
        true
    }

    /// Stops accepting on every listener, losing no connection already
    /// queued on a socket: each shard cancels its accepts gently, serves what
    /// they and a last non-blocking sweep return, and closes its sockets.
    /// Waits up to `timeout` for the shards to confirm; returns how many
    /// connections the final sweeps took, or `None` if a shard did not
    /// answer in time. Open connections go on. Used after a binary upgrade,
    /// once the successor accepts on the same sockets: nothing queued is
    /// reset, because the sockets stay open in the successor.
    pub fn stop_accepting(&mut self, timeout: Duration) -> Option<usize> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut asked = 0;
        for shard in &self.shards {
            if shard
                .commands
                .try_send(Command::StopAccepting { done: tx.clone() })
                .is_ok()
            {
                asked += 1;
            }
        }
        drop(tx);
        self.listeners.clear();
        self.publish_listeners();
        let deadline = std::time::Instant::now() + timeout;
        let mut swept = 0;
        for _ in 0..asked {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            swept += rx.recv_timeout(left).ok()?;
        }
        Some(swept)
    }

    /// New connections use `knobs` from now on.
    pub fn set_knobs(&self, knobs: Knobs) {
        self.shared.knobs.store(Arc::new(knobs));
    }

    pub fn knobs(&self) -> Arc<Knobs> {
        self.shared.knobs.load_full()
    }

    /// Turns the warm-connection pool on with `policy`, changes its policy,
    /// or (`None`) turns it off. Each shard applies it within
    /// `pool::driver::TICK`.
    pub fn set_pool(&self, policy: Option<Policy>) {
        self.shared.pool_policy.store(policy.map(Arc::new));
    }

    /// The pool's current policy (`None`: off).
    pub fn pool(&self) -> Option<Arc<Policy>> {
        self.shared.pool_policy.load_full()
    }

    pub fn stats(&self) -> StatsSummary {
        StatsSummary::sum(self.shards.iter().map(|s| &*s.stats))
    }

    pub fn active_connections(&self) -> u64 {
        self.stats().active
    }

    /// Stops accepting everywhere, lets open connections finish for up to
    /// `grace`, then closes what is left and joins every shard thread. Blocks
    /// until then; [`Engine::fast_stop`] cuts the wait short from another
    /// thread.
    pub fn shutdown(mut self, grace: Duration) {
        self.stop(grace);
    }

    /// A handle that ends a [`Engine::shutdown`] in progress at once (the
    /// operator's second stop signal): the shards close what is still open
    /// and exit.
    pub fn fast_stop(&self) -> FastStop {
        FastStop(Arc::clone(&self.shared.stop_now))
    }

    fn stop(&mut self, grace: Duration) {
        for shard in &self.shards {
            let _ = shard.commands.try_send(Command::Shutdown { grace });
        }
        // Our copies of the listening sockets (kept for a binary upgrade)
        // go now: once the shards' accept loops let theirs go, new clients
        // are refused rather than queued for nobody during the drain. The
        // published list keeps the counters (metrics during the drain) and
        // holds no socket.
        self.listeners.clear();
        for shard in &mut self.shards {
            shard.commands.close();
            if let Some(thread) = shard.thread.take() {
                if thread.join().is_err() {
                    tracing::error!("a shard thread panicked during shutdown");
                }
            }
        }
        self.listeners.clear();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// How long a start waits for a listening address held by a process that
/// just ended (see `listener::wait_until_unused`).
const RELEASE_PATIENCE: Duration = Duration::from_secs(2);

/// Whether a listener may take an address something already listens on.
enum Claim {
    /// Refused (see `listener::ensure_unused`), after waiting up to this
    /// long for it to be released.
    Exclusive(Duration),
    /// Joined: the engine's own sockets there are still closing.
    Shared,
}

/// Binds a listener's sockets, claiming the address as `claim` says.
fn bind(
    spec: &ListenerSpec,
    shards: usize,
    claim: Claim,
) -> Result<listener::BoundGroup, EngineError> {
    let exclusive_check = match claim {
        Claim::Exclusive(patience) => listener::wait_until_unused(spec.addr, patience),
        Claim::Shared => Ok(()),
    };
    exclusive_check
        .and_then(|()| listener::bind_group(spec.addr, shards))
        .map_err(|cause| EngineError::Bind {
            listener: spec.name.to_string(),
            addr: spec.addr,
            cause,
        })
}
