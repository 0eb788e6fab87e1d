//! The replication driver: the I/O around the sans-IO [`Node`], as one task
//! on the control thread's Tokio runtime.
//!
//! Call order: [`bind`] while the process starts (both UDP sockets bound,
//! so a taken port stops the start like any listener), then
//! [`Bound::start`] inside the runtime: it loads the replica from
//! `routing.db`, versions whatever changed while the node was down, holds
//! this POP's row of `pops` back until the cluster's word on it is in
//! (`Node::hold_own_row`, `crate::own_row_gate`), joins through
//! the bootstrap peers and spawns the loop. The loop feeds the node gossip
//! datagrams, transport messages, timer ticks and the change log (polled
//! every [`CHANGE_POLL`], or at once when [`Handle::poke`] says a local
//! write happened), and carries out what the node asks: datagrams and
//! messages out, remote rows into the database, then a routing reload so
//! that every shard routes by them.
//!
//! Binary upgrade: [`bind`] takes the gossip and QUIC sockets a predecessor
//! handed over (and registers its own for a successor). A successor starts
//! with [`Bound::start_after_hand_off`], which runs the member only once the
//! predecessor has released it ([`Handle::release`]: stop without leaving),
//! as the same member (its generation), so peers see no restart.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket as StdUdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::failure_streak::FailureStreak;
use engine::log_limit::LogLimit;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use super::config::Replication;
use super::db::ReplDb;
use super::hlc::{Hlc, MAX_DRIFT_MS};
use super::keys::ClusterSecret;
use super::membership::{MemberEvent, MemberState};
use super::metrics::BackAfterTtl;
use super::node::{
    Absences, Event, ForgetRefused, Forgotten, Node, Now, Output, OwnRowDue, Path, Settings,
};
use super::pki::ClusterPki;
use super::seeds::Seeds;
use super::status::{ClusterStatus, Counters, MemberView, StatusHandle};
use super::transport::{Transport, TransportEvent};
use super::version::{RowKey, Table};
use crate::config::{Config, Pop};
use crate::own_row_gate::OwnRowGate;
use crate::reload_thread::SharedReloader;
use crate::routing::{DownSince, Liveness, PopsInput};
use crate::store::PopRow;

/// How often the change log is checked for local writes made outside the
/// API (an operator's `sqlite3`, another process). API writes poke the
/// driver and go out at once.
pub const CHANGE_POLL: Duration = Duration::from_millis(50);
/// At most one ERROR per this while the change log cannot be read, or
/// remote rows cannot be written.
const CHANGE_LOG_ERROR_EVERY: Duration = Duration::from_secs(10);
/// How often a start's comparison of rows and versions is tried again while
/// the store cannot be written.
const RECONCILE_RETRY: Duration = Duration::from_secs(2);
/// How often the published status is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// The same refusal (peer, reason) is logged at WARN at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// Refusal lines per [`REFUSAL_LOG_EVERY`], whatever the addresses: QA sent
/// garbage to the gossip port from a new source port per datagram (as a
/// scanner, or anyone spoofing addresses, does) and each datagram made a
/// WARN line (8,232 lines in one second). The rest are counted, and said in
/// one line when the minute ends.
const REFUSAL_LINES_PER_WINDOW: u32 = 20;
/// Anti-entropy exchanges with a member that time out in a row before its
/// transport is reported silent (one can be lost to a restart or a blip).
const TIMEOUTS_BEFORE_WARNING: u32 = 3;

/// The sockets, bound; nothing running yet.
pub struct Bound {
    gossip: StdUdpSocket,
    transport: StdUdpSocket,
    gossip_advertised: SocketAddr,
    transport_advertised: SocketAddr,
    /// The bootstrap peers as configured, resolved once at start.
    bootstrap: Vec<String>,
    bootstrap_resolved: Vec<Result<SocketAddr, String>>,
    config: Replication,
    pop: Pop,
    db_path: PathBuf,
    /// The mesh's columns of this POP's row (`crate::mesh`), when it runs.
    mesh: Option<crate::mesh::driver::RowColumns>,
    /// Both sockets were handed over by a binary upgrade's predecessor,
    /// which still runs this member: start with [`Bound::start_after_hand_off`].
    inherited: bool,
}

/// Registry names of the sockets a binary upgrade hands over.
const GOSSIP_SOCKET: &str = "replication-gossip";
const TRANSPORT_SOCKET: &str = "replication-transport";
/// How long a successor waits for its predecessor to stop its member.
const HAND_OFF_PATIENCE: Duration = Duration::from_secs(15);
/// How long the predecessor waits for its QUIC connections to close.
const RELEASE_PATIENCE: Duration = Duration::from_secs(1);

/// The socket a predecessor handed over as `name` on `addr`, else a new one.
fn inherit_or_bind(
    name: &str,
    addr: SocketAddr,
    what: &str,
) -> anyhow::Result<(StdUdpSocket, bool)> {
    let (socket, inherited) = match crate::upgrade::sockets::take_udp_sockets(name, addr)
        .and_then(|v| v.into_iter().next())
    {
        Some(s) => {
            s.set_nonblocking(true)
                .with_context(|| format!("replication: {what} socket"))?;
            (s, true)
        }
        None => (bind_udp(addr, what)?, false),
    };
    use std::os::fd::AsFd;
    crate::upgrade::sockets::register(name, &[socket.as_fd()])
        .with_context(|| format!("replication: {what} socket"))?;
    Ok((socket, inherited))
}

fn bind_udp(addr: SocketAddr, what: &str) -> anyhow::Result<StdUdpSocket> {
    let s = StdUdpSocket::bind(addr)
        .with_context(|| format!("replication: cannot listen for {what} on {addr}"))?;
    s.set_nonblocking(true)
        .with_context(|| format!("replication: {what} socket"))?;
    Ok(s)
}

/// Resolves `host:port` peers, each to its first address or why not
/// (blocking: getaddrinfo).
fn resolve(peers: &[String]) -> Vec<Result<SocketAddr, String>> {
    peers
        .iter()
        .map(|p| match p.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .ok_or_else(|| "the name has no address".to_string()),
            Err(e) => Err(e.to_string()),
        })
        .collect()
}

/// The address other POPs reach this one at: configured, else the bind
/// address, else the local address that routes to a bootstrap peer (or to
/// the default route).
fn advertise_ip(config: &Replication, bootstrap: &[SocketAddr]) -> anyhow::Result<IpAddr> {
    if let Some(ip) = config.advertise_addr {
        return Ok(ip);
    }
    let bind = config.gossip_addr.ip();
    if !bind.is_unspecified() {
        return Ok(bind);
    }
    let probes = bootstrap.iter().copied().chain([
        "192.0.2.1:9".parse().expect("literal"),
        "[2001:db8::1]:9".parse().expect("literal"),
    ]);
    for target in probes {
        let local: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        // connect() on UDP sends nothing: it asks the kernel for a route.
        let found = StdUdpSocket::bind(local)
            .and_then(|s| s.connect(target).map(|_| s))
            .and_then(|s| s.local_addr());
        if let Ok(a) = found {
            if !a.ip().is_unspecified() {
                return Ok(a.ip());
            }
        }
    }
    anyhow::bail!(
        "replication: cannot tell which address other POPs reach this one at \
         (gossip_addr {} is a wildcard and no route was found): set replication.advertise_addr",
        config.gossip_addr
    )
}

/// Binds the replication sockets when `[replication] enabled`.
pub fn bind(config: &Config) -> anyhow::Result<Option<Bound>> {
    let c = &config.replication;
    if !c.enabled {
        return Ok(None);
    }
    let (gossip, gossip_inherited) = inherit_or_bind(GOSSIP_SOCKET, c.gossip_addr, "gossip")?;
    let (transport, transport_inherited) =
        inherit_or_bind(TRANSPORT_SOCKET, c.transport_addr, "the transport")?;
    // Only both together: a predecessor that handed over one socket still
    // runs its member on it (it is waited for either way).
    let inherited = gossip_inherited || transport_inherited;
    if inherited {
        crate::upgrade::inherit::expect_replication_hand_off();
    }
    // Names that do not resolve now are resolved again while no member
    // answers (see `seeds`); the others may be enough to join.
    let bootstrap_resolved = resolve(&c.bootstrap_peers);
    for (p, r) in c.bootstrap_peers.iter().zip(&bootstrap_resolved) {
        if let Err(e) = r {
            tracing::warn!(peer = %p, error = %e, "replication: cannot resolve bootstrap peer; trying again while no member answers");
        }
    }
    let bootstrap: Vec<SocketAddr> = bootstrap_resolved
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let ip = advertise_ip(c, &bootstrap)?;
    let gossip_advertised = SocketAddr::new(ip, gossip.local_addr()?.port());
    let transport_advertised = SocketAddr::new(ip, transport.local_addr()?.port());
    tracing::info!(node = %c.node_id, cluster = %c.cluster_name, gossip = %gossip_advertised,
        transport = %transport_advertised, bootstrap = c.bootstrap_peers.len(),
        auth = if c.insecure { "none (insecure)" } else { "cluster secret" }, "replication listening");
    if c.insecure {
        tracing::warn!("replication runs WITHOUT a cluster secret: anyone who reaches its ports can join the cluster and change the routing table");
    }
    Ok(Some(Bound {
        gossip,
        transport,
        gossip_advertised,
        transport_advertised,
        bootstrap: c.bootstrap_peers.clone(),
        bootstrap_resolved,
        config: c.clone(),
        pop: config.pop.clone(),
        db_path: config.routing.db_path.clone(),
        mesh: None,
        inherited,
    }))
}

enum Command {
    /// A local write happened: read the change log now.
    Poke,
    /// Leave the cluster, then answer.
    Shutdown(oneshot::Sender<()>),
    /// Stop without leaving (a binary upgrade's successor runs this member
    /// next), then answer with the member's generation.
    Release(oneshot::Sender<u64>),
    /// `edgeproxy cluster forget`: forget a POP decommissioned for good.
    Forget(String, oneshot::Sender<Result<Forgotten, ForgetRefused>>),
}

/// Why a forget did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForgetError {
    #[error(transparent)]
    Refused(#[from] ForgetRefused),
    #[error("replication is not running on this POP yet (or any more)")]
    NotRunning,
}

/// What the API needs of replication: the status it publishes, and
/// commands.
#[derive(Clone)]
pub struct ApiHooks {
    pub status: StatusHandle,
    commands: mpsc::UnboundedSender<Command>,
}

impl ApiHooks {
    /// Forgets the POP `id` (see [`Node::forget`]).
    pub async fn forget(&self, id: String) -> Result<Forgotten, ForgetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Forget(id, tx))
            .map_err(|_| ForgetError::NotRunning)?;
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(result)) => Ok(result?),
            _ => Err(ForgetError::NotRunning),
        }
    }
}

/// The running replication.
pub struct Handle {
    status: StatusHandle,
    commands: mpsc::UnboundedSender<Command>,
}

impl Handle {
    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }

    /// For the API: the status and the `forget` command.
    pub fn api_hooks(&self) -> ApiHooks {
        ApiHooks {
            status: self.status.clone(),
            commands: self.commands.clone(),
        }
    }

    /// Tells the driver a local write was just committed: it is broadcast
    /// without waiting for the next change-log poll.
    pub fn poke(&self) {
        let _ = self.commands.send(Command::Poke);
    }

    /// Leaves the cluster (members mark this node down at once instead of
    /// after the suspicion timeout) and stops. Waits at most `patience`.
    pub async fn shutdown(&self, patience: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).is_ok() {
            let _ = tokio::time::timeout(patience, rx).await;
        }
    }
}

impl Handle {
    /// For a binary upgrade: stops this member without leaving the cluster
    /// (peers keep it alive; the successor answers for it from now on),
    /// closes its QUIC connections and its sockets in this process, and
    /// returns its generation for the successor. Waits at most `patience`
    /// (`None`: it did not answer in time, or was not running).
    pub async fn release(&self, patience: Duration) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Release(tx)).ok()?;
        tokio::time::timeout(patience, rx).await.ok()?.ok()
    }
}

impl Bound {
    /// Whether the sockets came from a binary upgrade's predecessor (start
    /// with [`Bound::start_after_hand_off`]).
    pub fn inherited(&self) -> bool {
        self.inherited
    }

    /// The IP other POPs reach this one at.
    pub fn advertised_ip(&self) -> IpAddr {
        self.gossip_advertised.ip()
    }

    /// The mesh's columns for this POP's row, written at start.
    pub fn set_mesh(&mut self, columns: crate::mesh::driver::RowColumns) {
        self.mesh = Some(columns);
    }

    /// Starts replication. Must run inside the control runtime. `gate`
    /// opens once this POP's own row is written with the cluster's word on
    /// it (see `crate::own_row_gate`).
    pub fn start(self, reloader: SharedReloader, gate: OwnRowGate) -> anyhow::Result<Handle> {
        let status = StatusHandle::default();
        let (commands, command_rx) = mpsc::unbounded_channel();
        self.spawn(reloader, None, None, status.clone(), command_rx, gate)?;
        Ok(Handle { status, commands })
    }

    /// A binary upgrade's successor: returns the handle at once (commands
    /// queue), and starts the member once the predecessor has stopped it
    /// (see `crate::upgrade`), as the same member (its generation): peers
    /// see no restart. Until then this POP's liveness view is the `pops`
    /// table's (all alive), corrected at the member's first status update.
    /// Must run inside the control runtime.
    pub fn start_after_hand_off(self, reloader: SharedReloader) -> Handle {
        let status = StatusHandle::default();
        let (commands, command_rx) = mpsc::unbounded_channel();
        let waiting = status.clone();
        // The predecessor's view, approximately: every POP in the table
        // alive (it was serving; a POP that is down is seen so again within
        // the suspicion timeout).
        let liveness: Liveness = Liveness::default();
        let mut alive = HashSet::from([self.config.node_id.clone()]);
        match reloader.lock().store_mut().load_pops() {
            Ok(rows) => alive.extend(rows.into_iter().map(|r| r.node_id)),
            Err(e) => tracing::warn!(error = %e, "replication: cannot read the pops table"),
        }
        liveness.store(Arc::new(alive));
        let input = PopsInput {
            local_id: self.config.node_id.clone(),
            alive: liveness,
            down: DownSince::default(),
        };
        reloader.lock().set_pops_input(input.clone());
        tokio::spawn(async move {
            let mut command_rx = command_rx;
            let waited = Instant::now();
            let said = tokio::task::spawn_blocking(|| {
                crate::upgrade::inherit::await_replication(HAND_OFF_PATIENCE)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            use crate::upgrade::inherit::ReplicationHandOff;
            let generation = match said {
                Ok(ReplicationHandOff::Released { generation }) => {
                    tracing::info!(
                        generation,
                        waited_ms = waited.elapsed().as_millis() as u64,
                        "replication: the previous process stopped its member; running it here"
                    );
                    generation
                }
                Ok(ReplicationHandOff::Gone) => {
                    tracing::warn!("replication: the previous process left without handing over its member; starting as a new generation");
                    None
                }
                Err(why) => {
                    tracing::error!(%why, "replication: the previous process did not hand over its member; starting as a new generation anyway");
                    None
                }
            };
            // Upgraded again while waiting: this process hands the member
            // on without ever running it (never two at once).
            while let Ok(cmd) = command_rx.try_recv() {
                match cmd {
                    Command::Release(done) => {
                        tracing::info!(
                            "replication: upgraded again before the member ran here; handed on"
                        );
                        let _ = done.send(generation.unwrap_or_else(|| Now::system().wall_ms));
                        return;
                    }
                    Command::Shutdown(done) => {
                        let _ = done.send(());
                        return;
                    }
                    // The start reads the change log anyway.
                    Command::Poke => {}
                    // Not a member yet: nothing to forget with.
                    Command::Forget(..) => {}
                }
            }
            // The predecessor ran with the cluster's copy of this POP's
            // row, in this same file: nothing to wait for.
            let gate = OwnRowGate::open();
            if let Err(e) = self.spawn(reloader, generation, Some(input), waiting, command_rx, gate)
            {
                tracing::error!(error = format!("{e:#}"), "replication: cannot start after the upgrade; this POP serves without replicating (restart it)");
            }
        });
        Handle { status, commands }
    }

    /// Loads the replica, joins and spawns the loop. `generation`: the
    /// member's, when it continues a predecessor's.
    fn spawn(
        self,
        reloader: SharedReloader,
        generation: Option<u64>,
        pops_input: Option<PopsInput>,
        status: StatusHandle,
        command_rx: mpsc::UnboundedReceiver<Command>,
        gate: OwnRowGate,
    ) -> anyhow::Result<()> {
        let c = &self.config;
        let mut db = ReplDb::open(&self.db_path)?;
        let replica = db.load_replica()?;
        let now = Now::system();
        let mut rng_seed = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rng_seed)
            .map_err(|_| anyhow::anyhow!("replication: no randomness from the system"))?;
        let secret = c.cluster_secret();
        let accepted = c.accepted_secret();
        if accepted.is_some() {
            if c.accept_secret == c.secret {
                tracing::warn!(
                    "replication: accept_secret is the same as secret, so it accepts no other \
                     POP: rotating the secret, it must hold the secret the POPs not yet \
                     changed use (README, \"Rotating the cluster secret\")"
                );
            } else {
                tracing::info!(
                    "replication: also accepting POPs that hold the second secret \
                     (accept_secret); this POP seals and signs with its own secret"
                );
            }
        }
        let settings = Settings {
            id: Arc::from(c.node_id.as_str()),
            cluster: c.cluster_name.clone(),
            schema: crate::store::SCHEMA_VERSION as u32,
            gossip_addr: self.gossip_advertised,
            transport_addr: self.transport_advertised,
            generation: generation.unwrap_or(now.wall_ms),
            gossip_interval: c.gossip_interval,
            sync_interval: c.sync_interval,
            broadcast_delay: c.broadcast_delay,
            expected_size: (self.bootstrap.len() + 1).max(3),
            tombstone_ttl: c.tombstone_ttl,
            gossip_key: (!c.insecure).then(|| secret.gossip_key()),
            accepted_gossip_key: accepted.as_ref().map(ClusterSecret::gossip_key),
            seed: u64::from_le_bytes(rng_seed),
        };
        let mut stamped_ahead = None;
        say_if_stamped_ahead(
            &mut stamped_ahead,
            replica.max_hlc(),
            now.wall_ms,
            Instant::now(),
        );
        let mut node = Node::new(settings, replica, now);
        let last_contact = db.last_contact()?;
        node.set_last_contact(last_contact);
        // As recorded: what the node drops of it (holds past their cap) is
        // written over at the first turn of the loop.
        let absences_saved = (db.absences()?, None);
        node.restore_absences(now, absences_saved.0.clone());
        // A store that cannot be written (a full disk, a read-only file
        // system) does not stop the start: the POP routes from the table as
        // it is, and replication writes once it can (see `ReplDb::open`).
        let (reconciled, reconcile_due) = match db.reconcile(&mut node, now) {
            Ok(n) => (n, None),
            Err(e) if e.is_unwritable() => {
                tracing::error!(error = %e,
                    "replication: cannot version the rows changed while edgeproxy did not run (routing.db not writable); \
                     tried again every few seconds");
                (0, Some(Instant::now()))
            }
            Err(e) => return Err(e.into()),
        };
        let mut own_row = self.own_pop_row();
        let own_row_found = db.has_pop(&c.node_id)?;
        if !own_row_found {
            // A POP renamed during maintenance (a new `node_id`, the same
            // host and routing.db) would otherwise come back undrained,
            // announced and taking traffic: its drain was a column of the
            // row of its old id.
            if let Some(previous) = db.drained_pop_at(&own_row.gossip_addr, &c.node_id)? {
                own_row.draining = true;
                tracing::warn!(node = %c.node_id, %previous, gossip = %own_row.gossip_addr,
                    "replication: this POP starts under a new node id, and routing.db holds a drained POP \
                     at its gossip address under another id (its previous one): the drain carries over \
                     (`edgeproxy undrain` lifts it; `edgeproxy cluster forget` removes the old id)");
            }
        }
        if gate.is_open() && own_row_found {
            if let Err(e) = db.upsert_pop(&own_row) {
                if !e.is_unwritable() {
                    return Err(e.into());
                }
                // The predecessor's row stays, its identity most likely
                // this one's.
                tracing::error!(error = %e, "replication: cannot write this POP's own row (routing.db not writable)");
            }
        } else {
            // A row written now would beat the cluster's copy of it, and
            // with it the operator's drain of this POP: QA found a drained
            // POP restarted with routing.db wiped, or restored from a copy
            // older than the drain, back undrained everywhere. Steering
            // waits for the gate too (`crate::own_row_gate`).
            let patience = c.own_row_patience();
            let patience_ms = patience.as_millis() as u64;
            if own_row_found {
                tracing::info!(patience_ms,
                    "replication: waiting for the cluster's copy of this POP's row (a drain recorded while it was down, \
                     or since the routing.db it starts from) before writing this start's identity and announcing");
            } else {
                tracing::info!(patience_ms,
                    "replication: this POP has no row of its own in the pops table (a new POP, or routing.db was wiped): \
                     waiting for the cluster's copy of it (its drain) before writing it and announcing");
            }
            node.hold_own_row(now, patience, c.own_row_longest_wait());
        }
        if !node.holds_own_row() {
            gate.set_open();
        }
        let own = match db.poll_changes(&mut node, now, true) {
            Ok(n) => n,
            // The loop polls again, and says so while it fails.
            Err(e) if e.is_unwritable() => 0,
            Err(e) => return Err(e.into()),
        };
        db.wait_briefly_for_locks()?;
        tracing::info!(
            rows = node.replica().len(),
            versioned_at_start = reconciled + own,
            "replication: routing table loaded"
        );

        let mut pki = ClusterPki::new(&secret, &c.node_id)?;
        if let Some(accepted) = &accepted {
            pki = pki.accepting(accepted)?;
        }
        let (transport, transport_events) = Transport::start(self.transport, &pki)?;
        let gossip = UdpSocket::from_std(self.gossip).context("replication: gossip socket")?;

        let pops_input = match pops_input {
            Some(input) => input,
            None => {
                let alive: Liveness = Liveness::default();
                alive.store(Arc::new(HashSet::from([c.node_id.clone()])));
                let input = PopsInput {
                    local_id: c.node_id.clone(),
                    alive,
                    down: DownSince::default(),
                };
                reloader.lock().set_pops_input(input.clone());
                input
            }
        };

        let seeds = Seeds::new(
            self.bootstrap.clone(),
            self.bootstrap_resolved.clone(),
            now.mono,
            c.gossip_interval,
        )
        .with_own_addr(self.gossip_advertised);
        node.join(now, &seeds.addrs());
        let (resolved_tx, resolved_rx) = mpsc::unbounded_channel();
        let driver = Driver {
            node,
            db,
            gossip,
            transport,
            reloader,
            liveness: pops_input.alive,
            down: pops_input.down,
            status: status.clone(),
            refusals_logged: HashMap::new(),
            refusal_lines: (Instant::now(), 0, 0),
            drift_logged: HashMap::new(),
            malformed_logged: HashMap::new(),
            transport_silence_logged: HashMap::new(),
            lag_window: (Instant::now(), 0),
            recent_lag_ms: None,
            local_changes: 0,
            pops: HashMap::new(),
            alone_logged: false,
            // Members held down at the previous run's end are down for the
            // stand-in and in the status from the first turn of the loop.
            membership_dirty: true,
            contact_saved: last_contact,
            absences_saved,
            seeds,
            change_log_failing: FailureStreak::new(CHANGE_LOG_ERROR_EVERY),
            remote_write_failing: FailureStreak::new(CHANGE_LOG_ERROR_EVERY),
            store_failures: (0, None),
            reconcile_due,
            resolved_tx,
            own_row,
            own_row_found,
            own_row_failing: false,
            own_row_gate: gate,
            started: Instant::now(),
            stamped_ahead,
        };
        tokio::spawn(driver.run(transport_events, command_rx, resolved_rx));
        Ok(())
    }

    fn own_pop_row(&self) -> PopRow {
        let mesh = self.mesh.clone().unwrap_or_default();
        PopRow {
            node_id: self.config.node_id.clone(),
            name: self.pop.name.clone(),
            region: self.pop.region.clone(),
            country: self.pop.country.clone(),
            public_addrs: self
                .pop
                .public_addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
            private_addr: String::new(),
            gossip_addr: self.gossip_advertised.to_string(),
            transport_addr: self.transport_advertised.to_string(),
            draining: false,
            wg_public_key: mesh.wg_public_key,
            wg_endpoint: mesh.wg_endpoint,
            prefix6: mesh.prefix6,
            serving: true,
        }
    }
}

struct Driver {
    node: Node,
    db: ReplDb,
    gossip: UdpSocket,
    transport: Transport,
    reloader: SharedReloader,
    liveness: Liveness,
    /// Members declared down (and not alive under a newer identity), with
    /// when this POP first saw them so (see `routing::StandIn`).
    down: DownSince,
    status: StatusHandle,
    refusals_logged: HashMap<(SocketAddr, &'static str), Instant>,
    /// Refusal lines logged in the current window, whatever the address:
    /// (window start, lines, refusals left out).
    refusal_lines: (Instant, u32, u64),
    /// Per peer: when a row stamped in the future was last logged, and how
    /// many were dropped since without a line.
    drift_logged: HashMap<String, (Instant, u64)>,
    /// The same for malformed rows (`Event::MalformedRow`).
    malformed_logged: HashMap<String, (Instant, u64)>,
    /// Per peer: when its transport's silence was last logged.
    transport_silence_logged: HashMap<String, Instant>,
    /// (window start, largest lag in it).
    lag_window: (Instant, u64),
    recent_lag_ms: Option<u64>,
    local_changes: u64,
    /// Names and regions of POPs, from the `pops` table, for status.
    pops: HashMap<String, PopRow>,
    alone_logged: bool,
    /// Membership changed outside an event (a forget): refresh liveness
    /// and status at the next `carry_out`.
    membership_dirty: bool,
    /// The last contact with another POP as last written to the database.
    contact_saved: Option<u64>,
    /// The members' absences as last written to the database, and when to
    /// try again after a failed write.
    absences_saved: (Absences, Option<Instant>),
    /// Bootstrap peers, resolved again while no member answers.
    seeds: Seeds,
    /// Failed change-log polls in a row, and their log lines.
    change_log_failing: FailureStreak,
    /// The same for writes of remote rows.
    remote_write_failing: FailureStreak,
    /// Replication's failed writes to the store, all of them, and the last
    /// one's error (for status and metrics).
    store_failures: (u64, Option<String>),
    /// The start could not compare the rows with their versions
    /// (`ReplDb::reconcile`: the store was not writable): when to try again.
    /// Until it succeeds it stands in for the change-log poll, which it
    /// includes.
    reconcile_due: Option<Instant>,
    /// Where a resolution run off the loop sends its results.
    resolved_tx: mpsc::UnboundedSender<Vec<Result<SocketAddr, String>>>,
    /// This POP's row as this start has it (written at start, or when
    /// the node says it is due: [`Output::WriteOwnRow`]).
    own_row: PopRow,
    /// This start found a row of its own in `routing.db` (for the logs).
    own_row_found: bool,
    /// A write of this POP's row failed (said once) and is held again.
    own_row_failing: bool,
    /// Opened once `own_row` is written (see `crate::own_row_gate`).
    own_row_gate: OwnRowGate,
    started: Instant,
    /// While this POP's newest stamp is ahead of its clock by more than
    /// peers accept: the limit on saying so (see `say_if_stamped_ahead`).
    stamped_ahead: Option<LogLimit>,
}

impl Driver {
    async fn run(
        mut self,
        mut transport_events: mpsc::UnboundedReceiver<TransportEvent>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut resolved: mpsc::UnboundedReceiver<Vec<Result<SocketAddr, String>>>,
    ) {
        let mut buf = vec![0u8; 65_536];
        let mut poll = tokio::time::interval(CHANGE_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The node announces to the bootstrap peers every gossip interval
        // while alone; the names are resolved again at the same pace.
        let mut seeds_tick = tokio::time::interval(self.node.settings().gossip_interval);
        seeds_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self
                .node
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1));
            tokio::select! {
                r = self.gossip.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.node.handle_datagram(Now::system(), from, &buf[..n]),
                    Err(e) => tracing::debug!(error = %e, "replication: gossip receive failed"),
                },
                Some(ev) = transport_events.recv() => self.on_transport(ev),
                _ = tokio::time::sleep_until(wake) => self.node.handle_timeout(Now::system()),
                _ = poll.tick() => self.poll_changes(false),
                cmd = commands.recv() => match cmd {
                    Some(Command::Poke) => self.poll_changes(true),
                    Some(Command::Shutdown(done)) => {
                        self.save_contact(true);
                        self.poll_changes(true);
                        self.node.leave(Now::system());
                        self.carry_out().await;
                        self.transport.close();
                        tracing::info!("replication: left the cluster");
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Release(done)) => {
                        let stopped_reading = Instant::now();
                        self.save_contact(true);
                        // What is still queued goes out; what a peer sends
                        // from here on waits in the sockets for the
                        // successor (anti-entropy repairs the rest).
                        self.poll_changes(true);
                        self.carry_out().await;
                        let generation = self.node.settings().generation;
                        self.transport.close_and_wait(RELEASE_PATIENCE).await;
                        tracing::info!(generation, stopped_reading_ms_ago = stopped_reading.elapsed().as_millis() as u64,
                            "replication: member handed to the new process (no leave)");
                        let _ = done.send(generation);
                        // The gossip socket closes with `self`.
                        return;
                    }
                    Some(Command::Forget(id, done)) => {
                        let result = self.node.forget(Now::system(), &id);
                        match &result {
                            Ok(f) => tracing::info!(peer = %id, identities = f.identities, replicated = f.replicated,
                                "replication: member forgotten for good (cluster forget); the other POPs forget it as its pops row's deletion reaches them"),
                            Err(e) => tracing::info!(peer = %id, "replication: cluster forget refused: {e}"),
                        }
                        self.membership_dirty = true;
                        let _ = done.send(result);
                    }
                    None => return,
                },
                _ = status_tick.tick() => {
                    self.save_contact(false);
                    self.say_refusals_left_out(Instant::now());
                    say_if_stamped_ahead(
                        &mut self.stamped_ahead,
                        self.node.clock(),
                        Now::system().wall_ms,
                        Instant::now(),
                    );
                    self.publish_status(true);
                }
                _ = seeds_tick.tick() => self.seeds_tick(),
                Some(results) = resolved.recv() => {
                    if let Some(addrs) = self.seeds.resolved(results) {
                        tracing::info!(peers = ?addrs, "replication: bootstrap peers resolved again; announcing to them");
                        self.node.set_bootstrap(Now::system(), &addrs);
                    }
                }
            }
            self.carry_out().await;
            self.save_absences();
        }
    }

    /// Records the members' absences when they changed (rarely: a member
    /// down, back, or in sync again), so that a restart keeps the
    /// deletions owed to a member that is down.
    fn save_absences(&mut self) {
        let current = self.node.absences();
        if current == &self.absences_saved.0
            || self
                .absences_saved
                .1
                .is_some_and(|retry| Instant::now() < retry)
        {
            return;
        }
        let absences = current.clone();
        match self.db.set_absences(&absences) {
            Ok(()) => self.absences_saved = (absences, None),
            Err(e) => {
                self.store_failed(&e);
                tracing::warn!(error = %e, "replication: cannot record which members are down; a restart now would not keep their deletions for them");
                // Again in a second, not at every turn of the loop.
                self.absences_saved.1 = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }

    /// Records when this POP last heard another POP, at most once a minute
    /// (`force`: now, at a stop or hand-over), so that after a stop longer
    /// than the tombstone TTL the next run says so at its first contact
    /// (`Event::ContactAfterTombstoneTtl`). A minute stale at worst.
    fn save_contact(&mut self, force: bool) {
        let Some(at) = self.node.last_contact() else {
            return;
        };
        let due = self.contact_saved.is_none_or(|saved| {
            at != saved
                && (force
                    || at.abs_diff(saved) >= super::node::CONTACT_PERSIST_EVERY.as_millis() as u64)
        });
        if !due {
            return;
        }
        if let Err(e) = self.db.set_last_contact(at) {
            self.store_failed(&e);
            tracing::warn!(error = %e, "replication: cannot record the last contact with another POP");
        }
        // Failed or not: tried again in a minute, not every second.
        self.contact_saved = Some(at);
    }

    /// While no member answers: resolves the bootstrap names again (off
    /// the loop: getaddrinfo blocks for as long as the resolver takes) and
    /// warns now and then.
    fn seeds_tick(&mut self) {
        let now = Instant::now();
        if self.seeds.tick(now, self.node.active_members()) {
            let names = self.seeds.names().to_vec();
            let tx = self.resolved_tx.clone();
            tokio::task::spawn_blocking(move || {
                let _ = tx.send(resolve(&names));
            });
        }
        if let Some(warning) = self.seeds.warning(now) {
            tracing::warn!("{warning}");
        }
    }

    fn poll_changes(&mut self, force: bool) {
        let result = match self.reconcile_due {
            // Reads every row: not at every 50 ms poll while it fails.
            Some(due) if Instant::now() < due => return,
            Some(_) => {
                let result = self.db.reconcile(&mut self.node, Now::system());
                self.reconcile_due = match &result {
                    Ok(n) => {
                        tracing::info!(rows = n,
                            "replication: routing.db writable; the rows changed while edgeproxy did not run are versioned");
                        None
                    }
                    Err(_) => Some(Instant::now() + RECONCILE_RETRY),
                };
                result
            }
            None => self.db.poll_changes(&mut self.node, Now::system(), force),
        };
        match result {
            Ok(0) => {}
            Ok(n) => {
                self.local_changes += n as u64;
                tracing::debug!(rows = n, "replication: local changes versioned");
            }
            Err(e) => {
                self.store_failed(&e);
                // Polled every 50 ms: a lock held for a minute (an
                // operator's sqlite3 session) made 1200 ERROR lines.
                if let Some(left_out) = self.change_log_failing.failed(Instant::now()) {
                    tracing::error!(error = %e, left_out,
                        "replication: cannot read the change log; local changes are versioned once it reads again \
                         (said at most every 10 s while it lasts)");
                }
                return;
            }
        }
        if let Some(failures) = self.change_log_failing.succeeded() {
            tracing::info!(failures, "replication: change log readable again");
        }
    }

    fn on_transport(&mut self, ev: TransportEvent) {
        match ev {
            TransportEvent::Message { from, bytes } => {
                self.node.handle_message(Now::system(), from, &bytes)
            }
            TransportEvent::Refused {
                from,
                label,
                reason,
            } => {
                self.node.stats.refused += 1;
                // Only "secret" is a refusal; a handshake cut short is the
                // peer giving up on this POP (which did not answer in time:
                // stopped, overloaded) or a firewall dropping one direction
                // of the transport port, and said so.
                let message = if label == "secret" {
                    format!("QUIC handshake failed: {reason}")
                } else {
                    format!(
                        "QUIC handshake cut short: {reason} (the peer gave up waiting: this POP \
                         did not answer in time, e.g. it was stopped, or a firewall drops one \
                         direction of the transport port)"
                    )
                };
                self.log_refusal(from, label, None, &message);
            }
            TransportEvent::Unreachable { to, reason } => {
                tracing::debug!(peer = %to, %reason, "replication: peer unreachable");
            }
            TransportEvent::Undecodable { from, reason } => {
                self.node.stats.refused += 1;
                self.log_refusal(
                    from,
                    "garbage",
                    None,
                    &format!("undecodable message: {reason}"),
                );
            }
        }
    }

    /// Whether a line keyed `key` is due (none logged for it within
    /// `REFUSAL_LOG_EVERY`, and fewer than [`REFUSAL_LINES_PER_WINDOW`]
    /// refusal lines in the current window); if so, notes that it is logged
    /// now. The map is bounded: a flood of distinct addresses cannot grow it
    /// without limit, nor the log.
    fn refusal_log_due(&mut self, key: (SocketAddr, &'static str)) -> bool {
        let now = Instant::now();
        let due = self
            .refusals_logged
            .get(&key)
            .is_none_or(|at| now.duration_since(*at) >= REFUSAL_LOG_EVERY);
        if due {
            self.say_refusals_left_out(now);
            let (_, lines, left_out) = &mut self.refusal_lines;
            if *lines >= REFUSAL_LINES_PER_WINDOW {
                // Not noted as logged: this address gets its line in a
                // later window.
                *left_out += 1;
                return false;
            }
            *lines += 1;
            if self.refusals_logged.len() > 10_000 {
                self.refusals_logged.clear();
            }
            self.refusals_logged.insert(key, now);
        }
        due
    }

    /// Once the window of refusal lines has ended: how many refusals it
    /// left out, if any, in one line; then a new window.
    fn say_refusals_left_out(&mut self, now: Instant) {
        let (start, _, left_out) = self.refusal_lines;
        if now.duration_since(start) < REFUSAL_LOG_EVERY {
            return;
        }
        if left_out > 0 {
            tracing::warn!(
                left_out,
                lines = REFUSAL_LINES_PER_WINDOW,
                "replication: more refusals in the last minute than are logged (garbage or \
                 strangers from many addresses?); edgeproxy_replication_refused_total counts \
                 them all, by reason"
            );
        }
        self.refusal_lines = (now, 0, 0);
    }

    fn log_refusal(
        &mut self,
        addr: SocketAddr,
        label: &'static str,
        peer: Option<&str>,
        reason: &str,
    ) {
        // A handshake cut short is no refusal (see `on_transport`).
        let headline = if label == "handshake" {
            "incoming connection failed"
        } else {
            "peer refused"
        };
        if self.refusal_log_due((addr, label)) {
            tracing::warn!(%addr, peer = peer.unwrap_or("?"), reason = label, "replication: {headline}: {reason}");
        } else {
            tracing::debug!(%addr, reason = label, "replication: {headline}: {reason}");
        }
        crate::replication::metrics::count_refused(label);
    }

    /// Carries out everything the node asked for.
    async fn carry_out(&mut self) {
        let mut reload = false;
        // The cluster's copy of this POP's row came in a batch the store
        // refused: this POP's row must not be written over the file's.
        let mut own_copy_unwritten = false;
        let own_key = RowKey::new(Table::Pops, self.node.id().to_string());
        let mut membership_changed = std::mem::take(&mut self.membership_dirty);
        // Remote rows written (or refused): the status and metrics count
        // them as soon as the table has them, not up to a status tick later
        // (a client that saw a row through the API read a counter without
        // it). Published below, once every batch's fate is known: the node
        // counts rows as it merges them and takes a refused batch's back, so
        // a status published between two batches could show a counter that
        // then goes down. Names come from the pops table: read again only
        // if one of its rows came.
        let mut persisted: Option<bool> = None;
        while let Some(out) = self.node.poll_output() {
            match out {
                Output::Datagram { to, bytes } => {
                    if let Err(e) = self.gossip.send_to(&bytes, to).await {
                        tracing::debug!(%to, error = %e, "replication: gossip send failed");
                    }
                }
                Output::Message { to, bytes, .. } => {
                    self.transport.send(to, bytes);
                }
                Output::Persist(batch) => {
                    let pops_row = batch.rows.iter().any(|r| r.key.table == Table::Pops);
                    *persisted.get_or_insert(false) |= pops_row;
                    match self.db.persist_remote(&batch.rows) {
                        Ok(refused) => {
                            reload = true;
                            for row in refused {
                                // Every exchange brings such a row again after a
                                // restart (its version is not recorded): once a
                                // minute per row is plenty.
                                if log_due(&mut self.malformed_logged, &row.key.to_string())
                                    .is_some()
                                {
                                    tracing::error!(row = %row.key, reason = %row.reason,
                                        "replication: a remote row does not fit its table and is left out \
                                         (the POP it came from runs a broken edgeproxy, or its table differs)");
                                }
                            }
                            if let Some(failures) = self.remote_write_failing.succeeded() {
                                tracing::info!(failures, "replication: remote rows written again");
                            }
                        }
                        Err(e) => {
                            self.store_failed(&e);
                            // One per batch of rows, several a second while
                            // an operator's sqlite3 holds the lock (QA).
                            if let Some(left_out) = self.remote_write_failing.failed(Instant::now())
                            {
                                tracing::error!(error = %e, rows = batch.rows.len(), left_out,
                                    "replication: cannot write remote rows; anti-entropy will bring them again \
                                     (said at most every 10 s while it lasts)");
                            }
                            own_copy_unwritten |= batch.rows.iter().any(|r| r.key == own_key);
                            self.node.persist_failed(batch);
                        }
                    }
                }
                Output::Forget(keys) => {
                    if let Err(e) = self.db.forget(&keys) {
                        tracing::warn!(error = %e, "replication: cannot forget collected tombstones");
                    }
                }
                Output::WriteOwnRow(OwnRowDue::CopyArrived) if own_copy_unwritten => {
                    self.hold_own_row_again();
                }
                Output::WriteOwnRow(due) => reload |= self.write_own_row(due),
                Output::Event(e) => membership_changed |= self.on_event(e),
            }
        }
        if membership_changed {
            let alive: HashSet<String> = self
                .node
                .members()
                .into_iter()
                .filter(|m| m.state != MemberState::Down)
                .map(|m| m.peer.id.to_string())
                .chain(std::iter::once(self.node.id().to_string()))
                .collect();
            let now_ms = crate::routing::unix_ms(std::time::SystemTime::now());
            let known = self.down.load();
            // Members held down, those of the previous run included (see
            // `Node::down_members`). A forgotten POP is no longer listed,
            // but its backends' heartbeats still reach nobody: it stays down
            // for the stand-in (`routing::StandIn`), which expires them.
            let down: HashMap<String, i64> = self
                .node
                .down_members()
                .into_iter()
                .map(|m| (m.id.to_string(), m.unheard_since_ms as i64))
                .chain(self.node.forgotten_ids().iter().map(|id| {
                    let id = id.to_string();
                    let since = known.get(&id).copied().unwrap_or(now_ms);
                    (id, since)
                }))
                .filter(|(id, _)| !alive.contains(id))
                .collect();
            if **known != down {
                self.down.store(Arc::new(down));
                reload = true;
            }
            if **self.liveness.load() != alive {
                self.liveness.store(Arc::new(alive));
                reload = true;
            }
            self.publish_status(true);
        } else if let Some(pops_row) = persisted {
            self.publish_status(pops_row);
        }
        if reload {
            // Remote rows and liveness reach the shards now, not at the
            // next reload tick.
            self.reloader.reload_soon();
        }
    }

    /// Holds this POP's row back again, as at start (`Node::hold_own_row`):
    /// its write failed, or the cluster's copy it is written over could not
    /// be persisted (a full disk). The next exchange brings the copy again,
    /// or ends without a newer one, and the row is due again. Before, a
    /// failed write was never tried again by replication: the gate stayed
    /// closed until steering's own wait ran out (15 s), which then wrote
    /// the row saying the cluster's copy never came. Written over a copy
    /// not in the file, the row would carry the file's drain state, newer
    /// than the cluster's.
    fn hold_own_row_again(&mut self) {
        use super::config::{OWN_ROW_LONGEST_WAIT_INTERVALS, OWN_ROW_PATIENCE_INTERVALS};
        self.own_row_failing = true;
        let gossip = self.node.settings().gossip_interval;
        self.node.hold_own_row(
            Now::system(),
            gossip * OWN_ROW_PATIENCE_INTERVALS,
            gossip * OWN_ROW_LONGEST_WAIT_INTERVALS,
        );
    }

    /// Counts a failed write to the store, for status and metrics.
    fn store_failed(&mut self, e: &super::db::DbError) {
        self.store_failures.0 += 1;
        self.store_failures.1 = Some(e.to_string());
    }

    /// The last failed write's error while replication's writes fail: the
    /// change log cannot be versioned, or rows from other POPs written
    /// (both tried again until they go through; this POP's own row and
    /// its notes are written again by their own turns).
    fn store_error(&self) -> Option<String> {
        let failing = self.change_log_failing.failing() || self.remote_write_failing.failing();
        self.store_failures.1.clone().filter(|_| failing)
    }

    /// Writes this POP's row, held back at start: its identity over the
    /// cluster's copy (which the loop persisted before), whose operator
    /// columns it keeps (`ReplDb::upsert_pop`). True when written.
    fn write_own_row(&mut self, due: OwnRowDue) -> bool {
        let waited_ms = self.started.elapsed().as_millis() as u64;
        if let Err(e) = self.db.upsert_pop(&self.own_row) {
            self.store_failed(&e);
            if !self.own_row_failing {
                tracing::error!(error = %e,
                    "replication: cannot write this POP's own row; tried again once the cluster's copy is in \
                     routing.db or an exchange ends without one (steering writes it itself after a wait of its own)");
            }
            self.hold_own_row_again();
            return false;
        }
        self.poll_changes(true);
        self.own_row_gate.set_open();
        match (due, self.own_row_found) {
            (OwnRowDue::CopyArrived, _) => tracing::info!(waited_ms,
                "replication: the cluster's copy of this POP's row arrived; written with this start's identity and the copy's drain state"),
            (OwnRowDue::NoCopyInCluster, false) => tracing::info!(waited_ms,
                "replication: the cluster holds no row of this POP (a new POP); written"),
            (OwnRowDue::NoCopyInCluster, true) => tracing::info!(waited_ms,
                "replication: the cluster holds no newer copy of this POP's row than routing.db's; written with this start's identity"),
            (OwnRowDue::NoAnswer, _) => tracing::warn!(waited_ms,
                "replication: no member answered in time; this POP's row is written without the cluster's copy \
                 (a drain of this POP recorded only elsewhere is lost: drain it again if it was drained)"),
            (OwnRowDue::NoExchange, _) => tracing::warn!(waited_ms,
                "replication: members answer but no exchange with one completed in time (see the refusals above); \
                 this POP's row is written without the cluster's copy \
                 (a drain of this POP recorded only elsewhere is lost: drain it again if it was drained)"),
        }
        true
    }

    /// Logs and counts; true when membership changed.
    fn on_event(&mut self, e: Event) -> bool {
        match e {
            Event::Member(m) => {
                match &m {
                    MemberEvent::Up(p) => {
                        self.alone_logged = false;
                        tracing::info!(peer = %p.id, gossip = %p.gossip, "replication: member up")
                    }
                    MemberEvent::Down(p) if p.id == *self.node.id() => {
                        // This POP's identity at an address it left: it
                        // moved (QA: logged as a member down, itself).
                        self.transport.forget(p.transport);
                        tracing::info!(gossip = %p.gossip,
                            "replication: this POP's previous address is declared down (it moved)")
                    }
                    MemberEvent::Down(p) => {
                        self.transport.forget(p.transport);
                        tracing::warn!(peer = %p.id, gossip = %p.gossip, "replication: member down")
                    }
                    MemberEvent::Replaced { old, new } => {
                        self.transport.forget(old.transport);
                        if new.renews(old) {
                            tracing::info!(peer = %new.id, gossip = %new.gossip,
                                "replication: member refuted being declared down (by a member cut off from it, e.g. across a partition)")
                        } else {
                            tracing::info!(peer = %new.id, gossip = %new.gossip, "replication: member restarted")
                        }
                    }
                    MemberEvent::Joined => tracing::info!("replication: joined the cluster"),
                    MemberEvent::Rejoined => tracing::warn!(
                        "replication: a member had declared this node down (one cut off from it, e.g. across a partition); refuted and rejoined"
                    ),
                    MemberEvent::AddressTaken { holder, claimant } => {
                        if self.refusal_log_due((holder.gossip, "address_taken")) {
                            tracing::warn!(node = %claimant.id, gossip = %claimant.gossip, holder = %holder.id,
                                "replication: a POP claims the gossip address of a live member with another node id; it is ignored while that member lives. Check that POP's replication.advertise_addr and gossip_addr (a POP restarted here under a new node id is taken once its old id is declared down)");
                        }
                        return false;
                    }
                    MemberEvent::Alone => {
                        if !self.alone_logged {
                            self.alone_logged = true;
                            tracing::warn!("replication: no other member is reachable");
                        }
                    }
                }
                true
            }
            Event::Refused {
                addr,
                peer,
                reason,
                label,
            } => {
                self.seeds.refused(addr, &reason);
                self.log_refusal(addr, label, peer.as_deref(), &reason);
                false
            }
            Event::RefusedBy { addr, reason } => {
                self.seeds.refused(addr, &reason);
                tracing::debug!(%addr, %reason, "replication: a peer refused this node");
                false
            }
            Event::Applied {
                from,
                rows,
                lag_ms,
                via,
            } => {
                // The lag figures are the broadcasts' (see `Event::Applied`).
                if via == Path::Broadcast {
                    let now = Instant::now();
                    if now.duration_since(self.lag_window.0) >= Duration::from_secs(1) {
                        self.recent_lag_ms = (self.lag_window.1 > 0).then_some(self.lag_window.1);
                        self.lag_window = (now, 0);
                    }
                    self.lag_window.1 = self.lag_window.1.max(lag_ms);
                    crate::replication::metrics::observe_lag(lag_ms);
                }
                tracing::debug!(%from, rows, lag_ms, via = match via { Path::Broadcast => "broadcast", Path::Sync => "sync" },
                    "replication: remote rows applied");
                false
            }
            Event::SyncTimedOut { peer, in_a_row } => {
                // Gossip still says the member is alive (else no exchange
                // would be started with it), yet its transport does not
                // answer: the rows it writes reach this POP only through
                // other members (not at all in a pair), and before this line
                // only a debug message said anything.
                let now = Instant::now();
                let due = self
                    .transport_silence_logged
                    .get(&*peer)
                    .is_none_or(|at| now.duration_since(*at) >= REFUSAL_LOG_EVERY);
                if in_a_row >= TIMEOUTS_BEFORE_WARNING && due {
                    self.transport_silence_logged.insert(peer.to_string(), now);
                    let transport = self
                        .node
                        .members()
                        .into_iter()
                        .find(|m| m.peer.id == peer)
                        .map(|m| m.peer.transport.to_string())
                        .unwrap_or_else(|| "?".into());
                    tracing::warn!(%peer, %transport, exchanges = in_a_row,
                        "replication: member answers gossip but not on its transport (anti-entropy exchanges time out): this POP gets its rows only through other members, if any reach it; check that its transport port (UDP) is open both ways");
                } else {
                    tracing::debug!(%peer, in_a_row, "replication: anti-entropy exchange timed out");
                }
                false
            }
            Event::Synced {
                peer,
                equal,
                sent,
                received,
                more,
            } => {
                tracing::debug!(%peer, equal, sent, received, more, "replication: anti-entropy exchange done");
                false
            }
            Event::DuplicateId {
                id,
                holder,
                impostor,
                ours,
            } => {
                if self.refusal_log_due((impostor, crate::replication::node::DUPLICATE_ID)) {
                    // An ERROR, not a refusal's WARN: two POPs sharing an id
                    // write conflicting rows until an operator renames one.
                    let me = self.node.settings().gossip_addr;
                    let whom = if ours && impostor == me {
                        format!("this POP ({impostor}) is ignored by the others while the one at {holder}, which started first, lives")
                    } else if ours {
                        format!("the one at {impostor} is ignored while this POP ({holder}) lives")
                    } else {
                        format!("the one at {impostor} is ignored while the one at {holder} lives")
                    };
                    tracing::error!(node = %id, %holder, %impostor, ours,
                        "replication: two POPs use the same node id; {whom}. Give every POP its own replication.node_id");
                }
                crate::replication::metrics::count_refused(crate::replication::node::DUPLICATE_ID);
                false
            }
            Event::Forgotten { id, identities } => {
                tracing::info!(peer = %id, identities,
                    "replication: member forgotten for good (its pops row is deleted); it is no longer listed, and may rejoin later");
                true
            }
            Event::OwnRowRestored { by } => {
                tracing::warn!(%by,
                    "replication: a POP had forgotten this one (cluster forget) while it was down; its pops row is written again and it rejoins");
                false
            }
            Event::ForgottenMemberBack { peer } => {
                tracing::warn!(%peer,
                    "replication: a member forgotten with `cluster forget` is back: it was stopped or cut off, not \
                     decommissioned. The forget released the tombstones kept for it, so rows deleted since it went \
                     away may come back from its copy of the routing table; if deleted backends reappear, delete \
                     them again. It rejoins as a new member");
                false
            }
            Event::PeerBackAfterTombstoneTtl {
                peer,
                down_ms,
                ttl_ms,
                kept_for_it: true,
            } => {
                crate::replication::metrics::count_back_after_ttl(BackAfterTtl::Member);
                tracing::info!(%peer, down_secs = down_ms / 1000, tombstone_ttl_secs = ttl_ms / 1000,
                    "replication: member is back after being down here for longer than replication.tombstone_ttl_secs; \
                     the tombstones of rows deleted meanwhile were kept for it, and reach it now");
                false
            }
            Event::PeerBackAfterTombstoneTtl {
                peer,
                down_ms,
                ttl_ms,
                kept_for_it: false,
            } => {
                crate::replication::metrics::count_back_after_ttl(BackAfterTtl::Member);
                tracing::warn!(%peer, down_secs = down_ms / 1000, tombstone_ttl_secs = ttl_ms / 1000,
                    hold_cap_secs = ttl_ms * crate::replication::node::MAX_HOLD_TTLS / 1000,
                    "replication: member is back after being down here for longer than replication.tombstone_ttl_secs, \
                     and this POP did not keep the tombstones of rows deleted meanwhile for it (it was down longer than \
                     the hold's cap, or this POP restarted meanwhile), so such rows may come back from its copy of \
                     the routing table. If deleted backends or POPs reappear, delete them again, or stop that POP and \
                     restart it from a copy of a current POP's routing.db");
                false
            }
            Event::ContactAfterTombstoneTtl { silent_ms, ttl_ms } => {
                crate::replication::metrics::count_back_after_ttl(BackAfterTtl::ThisPop);
                tracing::warn!(silent_secs = silent_ms / 1000, tombstone_ttl_secs = ttl_ms / 1000,
                    "replication: heard another POP again after no contact with any POP for longer than \
                     replication.tombstone_ttl_secs. If this POP was the one cut off (stopped or isolated), the others \
                     kept the tombstones of rows deleted meanwhile for it while they ran (up to 4 TTLs), and the \
                     deletions reach it now; a POP that restarted meanwhile did not, so rows deleted there may come \
                     back from this one: check for deleted backends or POPs that reappear and delete them again. If \
                     the other POPs were the ones away, this POP's table is current");
                false
            }
            Event::ClockDrift { peer, ahead_ms } => {
                // One line per row and exchange was thousands of lines every
                // sync interval for a POP whose clock had been ahead.
                if let Some(also) = log_due(&mut self.drift_logged, &peer) {
                    tracing::warn!(%peer, ahead_ms, dropped_since_last_line = also,
                        "replication: dropped a row stamped in the future; check the clocks (NTP) of both POPs");
                }
                false
            }
            Event::MalformedRow { peer, key, reason } => {
                if let Some(also) = log_due(&mut self.malformed_logged, &peer) {
                    tracing::error!(%peer, row = %key, dropped_since_last_line = also,
                        "replication: dropped a row no POP could have written ({reason}); \
                         that POP, or one it replicates from, runs a broken edgeproxy");
                }
                false
            }
        }
    }

    /// Publishes the status (and so the metrics); `refresh_pops`: reads
    /// the members' names and regions from the pops table again first.
    fn publish_status(&mut self, refresh_pops: bool) {
        if Instant::now().duration_since(self.lag_window.0) >= Duration::from_secs(2) {
            self.recent_lag_ms = None;
        }
        // Names and regions come from the replicated pops table; while a
        // reload holds the table (a starved tick can, for seconds), the
        // last ones read do: this runs on the control runtime, which must
        // not wait for it (see `reload_thread`).
        let rows = refresh_pops
            .then(|| self.reloader.try_lock())
            .flatten()
            .map(|mut reloader| reloader.store_mut().load_pops());
        if let Some(Ok(rows)) = rows {
            self.pops = rows.into_iter().map(|r| (r.node_id.clone(), r)).collect();
        }
        let s = self.node.settings();
        let stats = &self.node.stats;
        let members = self.node.members();
        // Members held down since the previous run, which this run's
        // membership has not heard of: listed from their `pops` rows.
        let restored: Vec<MemberView> = self
            .node
            .down_members()
            .into_iter()
            .filter(|d| d.restored && !members.iter().any(|m| m.peer.id == d.id))
            .map(|d| {
                let pop = self.pops.get(&*d.id);
                MemberView {
                    node_id: d.id.to_string(),
                    name: pop.map(|p| p.name.clone()),
                    region: pop.map(|p| p.region.clone()),
                    gossip_addr: pop.map(|p| p.gossip_addr.clone()).unwrap_or_default(),
                    transport_addr: pop.map(|p| p.transport_addr.clone()).unwrap_or_default(),
                    state: MemberState::Down.as_str().to_string(),
                    rtt_ms: None,
                    last_sync_secs: None,
                    in_sync: Some(false),
                    lag_ms: None,
                }
            })
            .collect();
        let members = members
            .into_iter()
            .map(|m| {
                let pop = self.pops.get(&*m.peer.id);
                MemberView {
                    node_id: m.peer.id.to_string(),
                    name: pop.map(|p| p.name.clone()),
                    region: pop.map(|p| p.region.clone()),
                    gossip_addr: m.peer.gossip.to_string(),
                    transport_addr: m.peer.transport.to_string(),
                    state: m.state.as_str().to_string(),
                    rtt_ms: self
                        .transport
                        .rtt(m.peer.transport)
                        .map(|d| d.as_secs_f64() * 1000.0),
                    last_sync_secs: m.sync.last_sync.map(|t| t.elapsed().as_secs()),
                    in_sync: m.sync.in_sync_now(m.state),
                    lag_ms: m.sync.last_lag_ms,
                }
            })
            .chain(restored)
            .collect();
        self.status.publish(ClusterStatus {
            enabled: true,
            node_id: s.id.to_string(),
            cluster: s.cluster.clone(),
            schema_version: s.schema,
            gossip_addr: s.gossip_addr.to_string(),
            transport_addr: s.transport_addr.to_string(),
            rows: self.node.replica().len() as u64,
            digest: format!("{:016x}", self.node.replica().top_digest()),
            members,
            counters: Counters {
                gossip_bytes_sent: stats.gossip_bytes_sent,
                gossip_bytes_received: stats.gossip_bytes_received,
                broadcast_bytes_sent: stats.broadcast_bytes_sent,
                sync_bytes_sent: stats.sync_bytes_sent,
                transport_bytes_received: stats.bytes_received,
                rows_applied: stats.rows_applied,
                conflicts_resolved: stats.conflicts,
                refused: stats.refused,
                syncs: stats.syncs,
                syncs_in_sync: stats.syncs_equal,
                messages_dropped: self
                    .transport
                    .stats
                    .dropped
                    .load(std::sync::atomic::Ordering::Relaxed),
                transport_wire_bytes_sent: self
                    .transport
                    .stats
                    .wire_bytes_sent
                    .load(std::sync::atomic::Ordering::Relaxed),
                local_changes: self.local_changes,
                store_write_failures: self.store_failures.0,
                gossip_accepted_secret: stats.gossip_accepted_secret,
            },
            refused: crate::replication::metrics::refused_by_reason(),
            recent_lag_ms: self.recent_lag_ms,
            store_error: self.store_error(),
            accepting_second_secret: s.accepted_gossip_key.is_some(),
        });
    }
}

/// Whether a line about `peer` is due in `logged` (at most one per
/// [`REFUSAL_LOG_EVERY`] per peer): `Some(rows dropped since the last line)`,
/// or `None` after counting this one for the next line.
fn log_due(logged: &mut HashMap<String, (Instant, u64)>, peer: &str) -> Option<u64> {
    let now = Instant::now();
    let entry = logged
        .entry(peer.to_string())
        .or_insert((now - REFUSAL_LOG_EVERY, 0));
    if now.duration_since(entry.0) >= REFUSAL_LOG_EVERY {
        entry.0 = now;
        Some(std::mem::take(&mut entry.1))
    } else {
        entry.1 += 1;
        None
    }
}

/// A POP whose clock was ahead stamped its rows in the future, and its
/// clock goes on from the newest stamp: until real time catches up, every
/// peer drops what it writes, a registration made after the clock was
/// fixed included. Said at start, and while the process runs (a clock set
/// back under it by NTP: QA, `faketime` 10 minutes ahead then back, saw
/// every write of the next 9 minutes dropped by the peers with nothing said
/// at this POP), once a minute while it lasts, and when it ends. `said`:
/// the limit on the lines, `Some` while it lasts.
fn say_if_stamped_ahead(said: &mut Option<LogLimit>, newest: Hlc, wall_ms: u64, now: Instant) {
    let ahead_ms = newest.physical_ms().saturating_sub(wall_ms);
    if ahead_ms <= MAX_DRIFT_MS {
        if said.take().is_some() {
            tracing::info!(
                "replication: this POP's clock has caught up with its newest stamp; \
                 peers take what it writes again"
            );
        }
        return;
    }
    let limit = said.get_or_insert_with(|| LogLimit::new(REFUSAL_LOG_EVERY));
    if limit.hit(now).is_none() {
        return;
    }
    tracing::error!(
        ahead_secs = ahead_ms / 1000,
        refused_for_secs = (ahead_ms - MAX_DRIFT_MS).div_ceil(1000),
        newest = %newest,
        "replication: this POP's newest row is stamped in the future (its clock was ahead, \
         or has been set back since); peers drop what it writes until its clock passes that \
         stamp, less the drift they accept (if this POP's clock is the one now wrong, fix it: NTP)"
    );
}
