//! The mesh driver: the I/O around [`plan`], on a thread of its own.
//!
//! Call order, while the process starts:
//! 1. [`prepare`] (before the routing store is handed to the reloader): loads
//!    or creates the private key, works out this POP's 6PN prefix, and
//!    refuses to start if the cluster prefix moved under existing addresses.
//! 2. [`Prepared::columns`]: this POP's `wg_public_key`, `wg_endpoint` and
//!    `prefix6`, which replication writes into its `pops` row.
//! 3. [`Prepared::start`]: starts the `mesh` thread and waits until the
//!    interface exists, is up, has this POP's address and the cluster's
//!    `unreachable` route (or the error: a start that cannot build the mesh
//!    fails like a listener that cannot bind).
//!
//! The thread runs its own Tokio runtime (two workers): the embedded
//! WireGuard's packet tasks live there, so tunnel traffic never competes
//! with the control thread's work (gossip, the API) or waits on it. Every
//! [`POLL`] it checks the routing snapshot's version (an atomic load): when
//! replication publishes a membership change or a `pops` row, it
//! reconciles at once; every [`FULL_PASS`] it reconciles anyway, which puts
//! back whatever someone changed by hand (`wg set`, `ip route del`, `ip link
//! set down`). Every `mesh.probe_interval_secs` it pings each peer's 6PN
//! address through the tunnel (`prober`, judged by `probe_watch`); once a
//! second it reads the device for the status and the handshake ages
//! (`path_watch`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::snapshot::SnapshotHandle;
use tokio::sync::{mpsc, oneshot};

use super::addressing::PopPrefix;
use super::config::{Implementation, Mesh, SixPn};
use super::device::{Device, DeviceSettings};
use super::keys::{self, PrivateKey, PublicKey};
use super::netlink::Netlink;
use super::path_watch::{PathEvent, PathWatch, Reading};
use super::plan::{self, Advertised, Change, Current, Own, Skip, Update};
use super::probe_watch::{ProbeEvent, ProbeWatch};
use super::prober::{Answer, Prober};
use super::status::{Counters, MeshStatus, PeerView, SkippedView, StatusHandle};
use super::verdict::Verdict;
use crate::config::Config;
use crate::store::RoutingStore;

/// How often the snapshot's version is checked.
pub const POLL: Duration = Duration::from_millis(100);
/// A reconciliation runs at least this often, changed snapshot or not.
pub const FULL_PASS: Duration = Duration::from_secs(5);
/// How often the published status (handshakes, bytes) is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How long an address allocated by a registration stays configured while
/// the registration makes its way into the routing table.
const PIN_FOR: Duration = Duration::from_secs(60);
/// How long an interface found deleted waits for its `wireguard-go` to be
/// reaped, to say whether it exited too (see [`Device::gone_within`]).
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// How long a start may take (`wireguard-go` must come up).
const START_PATIENCE: Duration = Duration::from_secs(30);
/// Worker threads of the mesh runtime: encryption and decryption in
/// parallel on a 2-core POP.
const WORKERS: usize = 2;

/// The columns of this POP's `pops` row that belong to the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowColumns {
    pub wg_public_key: String,
    pub wg_endpoint: String,
    pub prefix6: String,
}

/// Key loaded, prefix known; nothing running yet.
pub struct Prepared {
    mesh: Mesh,
    key: PrivateKey,
    public_key: PublicKey,
    six_pn: SixPn,
    node_id: String,
    endpoint: Option<SocketAddr>,
}

/// Loads the key and checks the 6PN plan when `[mesh] enabled`.
pub fn prepare(config: &Config, store: &mut RoutingStore) -> anyhow::Result<Option<Prepared>> {
    let mesh = &config.mesh;
    if !mesh.enabled {
        return Ok(None);
    }
    let (key, origin) = keys::load_or_create(&mesh.private_key_file)?;
    let public_key = key.public_key();
    let six_pn = mesh.six_pn(&config.replication);
    let node_id = config.replication.node_id.clone();
    tracing::info!(file = %mesh.private_key_file.display(), %public_key,
    "mesh: WireGuard key {}", match origin {
        keys::Origin::Created => "created (mode 0600)",
        keys::Origin::Loaded => "loaded",
    });
    // The prefix this POP advertised before, from its own replicated row.
    let previous = store
        .load_pops()
        .context("mesh: cannot read the pops table")?
        .into_iter()
        .find(|r| r.node_id == node_id)
        .and_then(|r| PopPrefix::parse(&r.prefix6));
    if let Some(prev) = previous {
        if !six_pn.cluster.contains_net(&prev.net()) {
            anyhow::bail!(
                "mesh: the cluster's 6PN prefix is now {} but this POP used {} until now \
                 (the cluster secret or mesh.prefix changed?): backends' 6PN addresses would \
                 move. Keep the old plan with mesh.prefix = \"{}\" (EDGEPROXY_6PN_PREFIX), or \
                 delete this POP's row from the pops table to renumber on purpose",
                six_pn.cluster,
                prev,
                ipnet::Ipv6Net::new(prev.net().network(), 48)
                    .map(|n| n.trunc())
                    .unwrap_or(prev.net())
            );
        }
        if prev != six_pn.pop {
            tracing::warn!(previous = %prev, now = %six_pn.pop,
                "mesh: this POP's 6PN /64 changed (mesh.pop_subnet?); backends allocated under the old one are no longer routed to it");
        }
    }
    tracing::info!(cluster = %six_pn.cluster, derived = six_pn.derived, pop = %six_pn.pop,
        address = %six_pn.pop_address(), "mesh: 6PN prefix");
    // Rotating the secret moves a derived /48 at the step that changes the
    // secret, and the POP then refuses to start (above): said at the step
    // before, while the prefix to pin is still the one in use.
    if six_pn.derived && config.replication.accept_secret.is_some() {
        tracing::warn!(cluster = %six_pn.cluster,
            "mesh: the cluster secret is being rotated (replication.accept_secret) and the 6PN /48 \
             is derived from it: pin mesh.prefix = \"{}\" (EDGEPROXY_6PN_PREFIX) on every POP before \
             it runs with the new secret, or that POP refuses to start (its backends' 6PN \
             addresses would move)", six_pn.cluster);
    }
    Ok(Some(Prepared {
        mesh: mesh.clone(),
        key,
        public_key,
        six_pn,
        node_id,
        endpoint: None,
    }))
}

impl Prepared {
    /// This POP's mesh columns, its endpoint at `advertise_ip` unless
    /// `mesh.endpoint` says otherwise.
    pub fn columns(&mut self, advertise_ip: IpAddr) -> RowColumns {
        let endpoint = self
            .mesh
            .endpoint
            .unwrap_or(SocketAddr::new(advertise_ip, self.mesh.listen_port));
        self.endpoint = Some(endpoint);
        RowColumns {
            wg_public_key: self.public_key.to_string(),
            wg_endpoint: endpoint.to_string(),
            prefix6: self.six_pn.pop.to_string(),
        }
    }

    pub fn six_pn(&self) -> SixPn {
        self.six_pn
    }

    /// Builds the interface on the mesh thread and starts reconciling.
    pub fn start(self, snapshot: SnapshotHandle) -> anyhow::Result<Handle> {
        let status = StatusHandle::default();
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (started_tx, started_rx) = std_mpsc::channel();
        let pop = self.six_pn.pop;
        let published = status.clone();
        let thread = std::thread::Builder::new()
            .name("mesh".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(WORKERS)
                    .thread_name("mesh-wg")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(anyhow::anyhow!("mesh: runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match Driver::start(self, snapshot, published).await {
                        Ok(driver) => {
                            let _ = started_tx.send(Ok(()));
                            driver.run(command_rx).await;
                        }
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                        }
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .context("mesh: cannot start its thread")?;
        match started_rx.recv_timeout(START_PATIENCE) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => anyhow::bail!("mesh: the interface was not up within {START_PATIENCE:?}"),
        }
        Ok(Handle {
            status,
            hooks: ApiHooks {
                pop,
                commands: commands.clone(),
            },
            commands,
            thread: Some(thread),
        })
    }
}

enum Command {
    /// Configure this allocated address now (a registration's).
    Pin(Ipv6Addr, oneshot::Sender<()>),
    /// Remove what the mesh added and stop; answer when done.
    Stop(std_mpsc::Sender<()>),
    /// Stop the device for a binary upgrade's successor, leaving the
    /// interface, its addresses and routes and the unreachable route to
    /// it; answer when done.
    Release(std_mpsc::Sender<()>),
}

/// The running mesh.
pub struct Handle {
    status: StatusHandle,
    hooks: ApiHooks,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }

    /// What the discovery API needs: allocation for registrations without
    /// an address.
    pub fn api_hooks(&self) -> ApiHooks {
        self.hooks.clone()
    }

    /// Takes the interface down (blocking, at most `patience`).
    pub fn stop(mut self, patience: Duration) {
        let (tx, rx) = std_mpsc::channel();
        if self.commands.send(Command::Stop(tx)).is_ok() && rx.recv_timeout(patience).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            tracing::info!("mesh: stopped");
        } else {
            tracing::warn!("mesh: did not stop within {patience:?}");
        }
    }
}

impl Handle {
    /// Hands the mesh to a binary upgrade's successor (blocking, at most
    /// `patience`): stops this process's WireGuard device, and nothing
    /// else — the successor took over the TUN device with the sockets and
    /// starts its own device on it once told (`Successor::release_mesh`).
    pub fn release(mut self, patience: Duration) {
        let (tx, rx) = std_mpsc::channel();
        if self.commands.send(Command::Release(tx)).is_ok() && rx.recv_timeout(patience).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            // The successor may run the mesh on the interface or, with its
            // mesh off, let it go: this process cannot tell which.
            tracing::info!(
                "mesh: WireGuard stopped here; the interface is left to the new process"
            );
        } else {
            tracing::warn!("mesh: did not stop its WireGuard within {patience:?}");
        }
    }
}

/// 6PN allocation for the discovery API.
#[derive(Clone)]
pub struct ApiHooks {
    pop: PopPrefix,
    commands: mpsc::UnboundedSender<Command>,
}

impl ApiHooks {
    /// The stable address of `backend_id` in this POP's /64.
    pub fn allocate(&self, backend_id: &str) -> Ipv6Addr {
        self.pop.backend_address(backend_id)
    }

    /// Has the mesh configure `ip` on its interface now, so that the
    /// backend can bind it as soon as its registration is answered. Waits
    /// at most 2 s (the registration goes on either way: the next
    /// reconciliation adds the address).
    pub async fn ensure_local(&self, ip: Ipv6Addr) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Pin(ip, tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }
}

struct Driver {
    /// `None` only after the device went away and starting another failed
    /// (tried again at each full pass).
    device: Option<Device>,
    /// What the device runs on, to start it again the same way.
    implementation: Implementation,
    /// Kept to start the device again.
    key: PrivateKey,
    /// The device went away (see [`Driver::keep_device`]) and starting
    /// another has not worked yet: logged once, tried again at each full
    /// pass, not at every poll.
    device_gone: bool,
    netlink: Netlink,
    index: u32,
    own: Own,
    mesh: Mesh,
    endpoint: SocketAddr,
    six_pn: SixPn,
    snapshot: SnapshotHandle,
    seen_version: Option<u64>,
    last_pass: Instant,
    advertised: Advertised,
    /// Which POP each key belongs to, for logs and status.
    names: HashMap<PublicKey, String>,
    /// POPs left out, and why (logged when that changes).
    skipped: BTreeMap<String, Skip>,
    /// Whether each peer's path works, from its handshake age (see
    /// `path_watch`): for peers the probes do not judge.
    paths: PathWatch,
    /// Pings through the tunnel; `None`: off, or no socket to send them.
    prober: Option<Prober>,
    /// Whether each peer's path works, from the pings (see `probe_watch`):
    /// for every peer that has answered one.
    probes: ProbeWatch,
    /// Which of the two speaks for each peer (see `verdict`).
    verdict: Verdict,
    pinned: HashMap<Ipv6Addr, Instant>,
    counters: Counters,
    last_error: Option<String>,
    status: StatusHandle,
    /// Built suspended on the TUN device a previous process handed over:
    /// the moment that process released it (`None`: not yet), and whether
    /// this device is started.
    take_over: Option<TakeOver>,
}

/// A device built on a TUN device handed over by a binary upgrade, until it
/// runs (see [`Driver::take_over`]).
struct TakeOver {
    /// Since when this process waits for the previous one to release it.
    since: Instant,
    /// What the previous process said, once it did.
    said: Option<Result<crate::upgrade::inherit::MeshHandOff, String>>,
}

/// How long a successor waits for its predecessor to stop the mesh device
/// before starting its own anyway (the predecessor hung, or was killed).
const HAND_OFF_PATIENCE: Duration = Duration::from_secs(30);

impl Driver {
    async fn start(
        mut p: Prepared,
        snapshot: SnapshotHandle,
        status: StatusHandle,
    ) -> anyhow::Result<Driver> {
        let endpoint = p
            .endpoint
            .context("mesh: no endpoint (replication must be bound first)")?;
        let settings = DeviceSettings {
            interface: &p.mesh.interface,
            private_key: &p.key,
            listen_port: p.mesh.listen_port,
            wireguard_go: &p.mesh.wireguard_go,
        };
        // A binary upgrade's successor on wireguard-go: the previous
        // process's wireguard-go holds the interface (a second one cannot
        // create it, and it cannot be adopted: it dies with the process that
        // started it) until that process stops it; then this one starts
        // its own (see `Driver::take_over`).
        let deferred = p.mesh.implementation == Implementation::WireguardGo
            && crate::upgrade::inherit::is_successor();
        let device = match deferred {
            true => None,
            false => Some(Device::create(p.mesh.implementation, &settings).await?),
        };
        let (mtu, capped) = device
            .as_ref()
            .map_or((p.mesh.mtu, false), |d| d.interface_mtu(p.mesh.mtu));
        if capped {
            tracing::warn!(configured = p.mesh.mtu, mtu,
                implementation = device.as_ref().map_or(p.mesh.implementation, Device::implementation).as_str(),
                "mesh: mesh.mtu {} is more than this WireGuard implementation carries (packets up to {mtu} bytes); \
                 the interface uses {mtu}, or longer packets would be lost", p.mesh.mtu);
            p.mesh.mtu = mtu;
        }
        let netlink = Netlink::connect()?;
        let setup = async {
            netlink.add_unreachable(p.six_pn.cluster.net()).await?;
            if deferred {
                // Found again once this process's own device runs.
                return Ok(0);
            }
            let index = netlink.index(&p.mesh.interface).await?;
            netlink.up(index, p.mesh.mtu).await?;
            Ok::<u32, super::netlink::NetlinkError>(index)
        };
        let index = match setup.await {
            Ok(i) => i,
            Err(e) => {
                if let Some(device) = device {
                    device.stop().await;
                }
                return Err(e.into());
            }
        };
        let probe_interval = Duration::from_secs(u64::from(p.mesh.probe_interval_secs));
        let prober = match p.mesh.probe_interval_secs {
            0 => {
                tracing::info!(
                    "mesh: path probes off (mesh.probe_interval_secs = 0): a blocked \
                    path is judged from WireGuard handshakes only, which takes minutes"
                );
                None
            }
            _ => match Prober::start(p.six_pn.pop_address(), probe_interval) {
                Ok(prober) => Some(prober),
                Err(e) => {
                    tracing::warn!(error = %e,
                        "mesh: cannot probe paths through the tunnel; a blocked path is judged \
                         from WireGuard handshakes only, which takes minutes");
                    None
                }
            },
        };
        // What `auto` resolved to (a deferred device is wireguard-go, named
        // as such in the config).
        let implementation = device
            .as_ref()
            .map_or(p.mesh.implementation, Device::implementation);
        let interface = p.mesh.interface.clone();
        let (listen_port, mtu) = (p.mesh.listen_port, p.mesh.mtu);
        let mut driver = Driver {
            device,
            implementation,
            key: p.key,
            device_gone: false,
            netlink,
            index,
            own: Own {
                node_id: p.node_id,
                public_key: p.public_key,
                cluster: p.six_pn.cluster,
                pop: p.six_pn.pop,
                keepalive: (p.mesh.persistent_keepalive_secs > 0)
                    .then_some(p.mesh.persistent_keepalive_secs),
            },
            endpoint,
            six_pn: p.six_pn,
            mesh: p.mesh,
            snapshot,
            seen_version: None,
            last_pass: Instant::now(),
            advertised: Advertised::new(),
            names: HashMap::new(),
            skipped: BTreeMap::new(),
            paths: PathWatch::default(),
            prober,
            probes: ProbeWatch::new(probe_interval),
            verdict: Verdict::default(),
            pinned: HashMap::new(),
            counters: Counters::default(),
            last_error: None,
            status,
            take_over: None,
        };
        if deferred || driver.device.as_ref().is_some_and(Device::adopted) {
            crate::upgrade::inherit::expect_mesh_hand_off();
            driver.take_over = Some(TakeOver {
                since: Instant::now(),
                said: None,
            });
            tracing::info!(%interface, implementation = implementation.as_str(),
                "mesh: the previous process runs this POP's WireGuard until it hands it over");
        }
        // This POP's address is there before anyone is told the POP is up.
        driver.reconcile().await;
        driver.publish_status().await;
        tracing::info!(%interface, implementation = implementation.as_str(), listen_port, %endpoint,
            public_key = %driver.own.public_key, address = %driver.six_pn.pop_address(), mtu,
            "mesh: interface up");
        Ok(driver)
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answers = self.prober.as_mut().and_then(Prober::take_answers);
        let mut hand_off = self.take_over.as_ref().map(|_| {
            tokio::task::spawn_blocking(|| crate::upgrade::inherit::await_mesh(HAND_OFF_PATIENCE))
        });
        loop {
            let probe_at = tokio::time::Instant::from_std(self.probes.poll_timeout(Instant::now()));
            tokio::select! {
                _ = poll.tick() => {
                    let version = self.snapshot.load().version;
                    if Some(version) != self.seen_version
                        || self.last_pass.elapsed() >= FULL_PASS
                        || (!self.device_gone
                            && self.device.as_ref().and_then(Device::gone).is_some())
                    {
                        self.reconcile().await;
                    }
                }
                _ = status_tick.tick() => self.publish_status().await,
                _ = tokio::time::sleep_until(probe_at), if self.prober.is_some() => {
                    self.probe_round(&mut answers).await
                }
                Some(answer) = next_answer(&mut answers) => self.on_answer(answer).await,
                said = next_hand_off(&mut hand_off) => {
                    hand_off = None;
                    if let Some(t) = &mut self.take_over {
                        t.said = Some(said);
                    }
                    // Starts the device, then a pass configures it.
                    self.reconcile().await;
                }
                cmd = commands.recv() => match cmd {
                    Some(Command::Pin(ip, done)) => {
                        if self.own.pop.contains(&ip) {
                            self.pinned.insert(ip, Instant::now());
                            self.reconcile().await;
                        }
                        let _ = done.send(());
                    }
                    Some(Command::Stop(done)) => {
                        self.stop().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Release(done)) => {
                        if let Some(device) = self.device.take() {
                            device.release().await;
                        }
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.stop().await;
                        return;
                    }
                },
            }
        }
    }

    async fn stop(self) {
        // The interface's addresses and routes go with it; the unreachable
        // route is not the interface's.
        if let Err(e) = self
            .netlink
            .del_unreachable(self.six_pn.cluster.net())
            .await
        {
            tracing::warn!(error = %e, "mesh: cannot remove the unreachable route");
        }
        if let Some(device) = self.device {
            device.stop().await;
        }
    }

    /// Starts the device built on the TUN device a previous process handed
    /// over, once that process has released it (or is gone, or did not say
    /// within [`HAND_OFF_PATIENCE`]). Retried at each pass if it fails.
    async fn take_over(&mut self) {
        let Some(t) = &self.take_over else { return };
        let Some(said) = &t.said else { return };
        let waited = t.since.elapsed();
        let said = match said {
            Ok(crate::upgrade::inherit::MeshHandOff::Released) => "released it".to_string(),
            Ok(crate::upgrade::inherit::MeshHandOff::Gone) => "exited without a word".to_string(),
            Err(e) => format!("did not say ({e})"),
        };
        let how = match self.device {
            Some(_) => "on the TUN device it handed over",
            None => "with a new wireguard-go (the interface is built again)",
        };
        let started = match self.device.as_mut() {
            Some(device) => device.resume().await.map_err(anyhow::Error::from),
            None => self.start_device().await,
        };
        match started {
            Ok(()) => {
                self.take_over = None;
                tracing::info!(interface = %self.mesh.interface, previous = %said, how,
                    waited_ms = waited.as_millis() as u64,
                    "mesh: took over the interface from the previous process; WireGuard runs here now");
                self.publish_status().await;
            }
            Err(e) => self.fail(e),
        }
    }

    /// One pass: desired vs current, then every change.
    async fn reconcile(&mut self) {
        self.last_pass = Instant::now();
        if let Some(t) = &self.take_over {
            if t.said.is_some() {
                self.take_over().await;
            }
            if self.device.is_none() {
                // wireguard-go waiting for the previous process: it runs
                // the mesh meanwhile, and a pass would start a second one.
                return;
            }
        }
        if let Err(e) = self.keep_device().await {
            self.fail(e);
            return;
        }
        let snap = self.snapshot.load_full();
        self.seen_version = Some(snap.version);
        let now = Instant::now();
        self.pinned.retain(|ip, at| {
            now.duration_since(*at) < PIN_FOR
                && !snap.backends.iter().any(|b| b.addr.ip() == IpAddr::V6(*ip))
        });
        let (desired, skipped) = plan::desired(
            &self.own,
            &snap.pops,
            snap.backends.iter().map(|b| b.addr.ip()),
            self.pinned.keys(),
        );
        self.note_skipped(skipped);
        for (key, w) in &desired.peers {
            self.names.insert(*key, w.node_id.clone());
        }
        let current = match self.read_current().await {
            Ok(c) => c,
            Err(e) => {
                self.fail(e);
                return;
            }
        };
        let changes = plan::plan(&desired, &current, &self.advertised, &self.own);
        self.counters.reconciliations += 1;
        let mut failed = None;
        let applied = changes.len();
        for change in changes {
            if let Err(e) = self.apply(&change).await {
                failed = Some(e);
            }
        }
        match failed {
            Some(e) => self.fail(e),
            None => self.last_error = None,
        }
        if applied > 0 {
            // Status and metrics show a change at once, not a second later.
            self.publish_status().await;
        }
    }

    /// Makes sure the device and its interface are there and up, before a
    /// pass. Set down by hand, the interface has lost its addresses and
    /// routes, and no route can be added to it while it is down: it is
    /// brought up. Gone — `wireguard-go` exited (killed, crashed) or stopped
    /// answering on its UAPI socket (stopped, hung), or the
    /// interface was deleted (`ip link del`), taking its addresses and
    /// routes — another device is started on the same interface name, key
    /// and port, and the pass that follows puts back every address, peer
    /// and route. Starting it may fail (the port taken meanwhile): the next
    /// pass tries again.
    async fn keep_device(&mut self) -> anyhow::Result<()> {
        let gone = match &self.device {
            // A restart failed; already logged.
            None => "it could not be started again".to_string(),
            Some(device) => match device.gone() {
                Some(how) => how,
                None => match self.netlink.is_up(self.index).await? {
                    Some(true) => return Ok(()),
                    Some(false) => {
                        tracing::warn!(interface = %self.mesh.interface,
                            "mesh: the interface was down (set down by hand?); bringing it up");
                        self.netlink.up(self.index, self.mesh.mtu).await?;
                        return Ok(());
                    }
                    // Deleted, and with it (or because of it) a
                    // wireguard-go may be ending: both are said.
                    None => match device.gone_within(EXIT_GRACE).await {
                        Some(how) => format!("its interface was deleted and {how}"),
                        None => "its interface was deleted".to_string(),
                    },
                },
            },
        };
        if !self.device_gone {
            tracing::error!(reason = %gone, interface = %self.mesh.interface,
                implementation = self.implementation.as_str(),
                "mesh: the WireGuard device is gone; starting it again");
            self.counters.errors += 1;
            self.device_gone = true;
        }
        // Its UDP port and UAPI socket are taken over by the new one.
        if let Some(old) = self.device.take() {
            old.stop().await;
        }
        self.start_device().await?;
        self.device_gone = false;
        tracing::info!(interface = %self.mesh.interface, "mesh: interface up again");
        Ok(())
    }

    /// Starts a device on the interface name, key and port, and brings the
    /// interface up; the next pass puts back every address, peer and route.
    async fn start_device(&mut self) -> anyhow::Result<()> {
        let settings = DeviceSettings {
            interface: &self.mesh.interface,
            private_key: &self.key,
            listen_port: self.mesh.listen_port,
            wireguard_go: &self.mesh.wireguard_go,
        };
        self.device = Some(Device::create(self.implementation, &settings).await?);
        self.advertised.clear();
        self.index = self.netlink.index(&self.mesh.interface).await?;
        self.netlink.up(self.index, self.mesh.mtu).await?;
        Ok(())
    }

    /// The device, unless it went away and could not be started again.
    fn device(&mut self) -> anyhow::Result<&mut Device> {
        self.device
            .as_mut()
            .context("mesh: no WireGuard device (starting it again failed)")
    }

    async fn read_current(&self) -> anyhow::Result<Current> {
        Ok(Current {
            peers: match &self.device {
                Some(device) => device.peers().await?,
                None => anyhow::bail!("mesh: no WireGuard device (starting it again failed)"),
            },
            addresses: self.netlink.addresses(self.index).await?,
            routes: self
                .netlink
                .pop_routes(self.index, self.own.cluster.net())
                .await?,
        })
    }

    /// A peer's 6PN address: `::1` of the /64 of this cluster it is
    /// allowed (what its POP configures on its interface).
    fn peer_address(&self, allowed: &[ipnet::IpNet]) -> Option<Ipv6Addr> {
        allowed.iter().find_map(|net| match net {
            ipnet::IpNet::V6(v6) if self.own.cluster.contains_net(v6) => {
                PopPrefix::from_net(*v6).map(|p| p.pop_address())
            }
            _ => None,
        })
    }

    fn name(&self, key: &PublicKey) -> String {
        self.names
            .get(key)
            .cloned()
            .unwrap_or_else(|| "?".to_string())
    }

    async fn apply(&mut self, change: &Change) -> anyhow::Result<()> {
        match change {
            Change::AddAddress(ip) => {
                self.netlink.add_address(self.index, *ip).await?;
                self.counters.addresses_changed += 1;
                tracing::info!(address = %ip, "mesh: address added");
            }
            Change::RemoveAddress(ip) => {
                self.netlink.del_address(self.index, *ip).await?;
                self.counters.addresses_changed += 1;
                tracing::info!(address = %ip, "mesh: address removed");
            }
            Change::AddPeer(w) => {
                self.device()?.upsert_peer(&w.spec).await?;
                self.advertised.insert(w.spec.public_key, w.spec.endpoint);
                self.counters.peers_added += 1;
                tracing::info!(peer = %w.node_id, endpoint = %w.spec.endpoint, allowed = %w.spec.allowed,
                    public_key = %w.spec.public_key, "mesh: peer added");
            }
            Change::UpdatePeer { wanted: w, why } => {
                self.device()?.upsert_peer(&w.spec).await?;
                self.advertised.insert(w.spec.public_key, w.spec.endpoint);
                self.counters.peers_updated += 1;
                match why {
                    Update::Endpoint { from } => tracing::info!(peer = %w.node_id,
                        from = from.map(|f| f.to_string()).unwrap_or_else(|| "none".into()),
                        to = %w.spec.endpoint, "mesh: peer endpoint updated"),
                    Update::AllowedIps => {
                        tracing::info!(peer = %w.node_id, allowed = %w.spec.allowed,
                        "mesh: peer allowed IPs restored")
                    }
                    Update::Keepalive => tracing::info!(peer = %w.node_id,
                        keepalive = ?w.spec.keepalive, "mesh: peer keepalive restored"),
                }
            }
            Change::AddRoute(net) => {
                self.netlink
                    .add_route(self.index, *net, self.six_pn.pop_address())
                    .await?;
                self.counters.routes_changed += 1;
                tracing::debug!(route = %net, "mesh: route added");
            }
            Change::RemoveRoute(net) => {
                self.netlink.del_route(self.index, *net).await?;
                self.counters.routes_changed += 1;
                tracing::debug!(route = %net, "mesh: route removed");
            }
            Change::RemovePeer(key) => {
                self.device()?.remove_peer(key).await?;
                self.advertised.remove(key);
                self.counters.peers_removed += 1;
                tracing::info!(peer = %self.name(key), public_key = %key, "mesh: peer removed");
            }
        }
        Ok(())
    }

    fn fail(&mut self, e: anyhow::Error) {
        self.counters.errors += 1;
        let text = format!("{e:#}");
        if self.last_error.as_deref() != Some(text.as_str()) {
            tracing::error!(error = %text, "mesh: reconciliation failed; retrying");
        } else {
            tracing::debug!(error = %text, "mesh: reconciliation still failing");
        }
        self.last_error = Some(text);
    }

    /// Logs POPs that start or stop being left out. Being down or running
    /// no mesh is normal (debug); a conflict is the operator's to fix.
    fn note_skipped(&mut self, now: Vec<(String, Skip)>) {
        let now: BTreeMap<String, Skip> = now.into_iter().collect();
        for (node, why) in &now {
            if self.skipped.get(node) != Some(why) {
                match why {
                    Skip::Down | Skip::NoMesh => {
                        tracing::debug!(peer = %node, reason = %why, "mesh: not a peer")
                    }
                    _ => {
                        tracing::warn!(peer = %node, reason = %why, "mesh: POP left out of the mesh")
                    }
                }
            }
        }
        self.skipped = now;
    }

    /// The answers that came in first (so that none waiting to be read
    /// counts as lost), then the verdicts due, then the probes due.
    async fn probe_round(&mut self, answers: &mut Option<mpsc::UnboundedReceiver<Answer>>) {
        let mut changed = false;
        if let Some(rx) = answers {
            while let Ok(answer) = rx.try_recv() {
                changed |= self.take_answer(answer);
            }
        }
        let now = Instant::now();
        for event in self.probes.judge(now) {
            self.tell_probe(event);
            changed = true;
        }
        let due = self.probes.poll_probes(now);
        if let Some(prober) = &self.prober {
            prober.send(due);
        }
        if changed {
            // Status and metrics show a verdict when it is said.
            self.publish_status().await;
        }
    }

    async fn on_answer(&mut self, answer: Answer) {
        if self.take_answer(answer) {
            self.publish_status().await;
        }
    }

    /// Hands one answer to the watch; `true` if a path works again.
    fn take_answer(&mut self, answer: Answer) -> bool {
        match self
            .probes
            .handle_answer(answer.at, answer.from, answer.seq)
        {
            Some(event) => {
                self.tell_probe(event);
                true
            }
            None => false,
        }
    }

    /// Logs a peer's path going down or working again, from the pings.
    fn tell_probe(&self, event: ProbeEvent) {
        let status = self.status.load();
        let name = |key: &str| peer_name(&status.peers, key);
        match event {
            ProbeEvent::Down {
                public_key,
                unanswered,
                silent_for,
            } => {
                let (pop, endpoint) = name(&public_key);
                tracing::warn!(peer = %pop, %endpoint, unanswered,
                    silent_secs = silent_for.as_secs_f64(),
                    "mesh: path to the peer is down: no answer to {unanswered} pings in a row through \
                     the tunnel (from this POP's 6PN address to the peer's); the path between the \
                     two POPs is blocked or a WireGuard is stuck, and 6PN traffic to it is lost");
            }
            ProbeEvent::Up {
                public_key,
                after,
                rtt,
            } => {
                let (pop, endpoint) = name(&public_key);
                tracing::info!(peer = %pop, %endpoint, after_secs = after.as_secs(),
                    rtt_ms = rtt.as_secs_f64() * 1000.0,
                    "mesh: path to the peer works again: it answers pings through the tunnel");
            }
        }
    }

    /// Logs a peer's path going down or working again, from handshakes.
    fn tell_path(&self, peers: &[PeerView], event: PathEvent) {
        let name = |key: &str| peer_name(peers, key);
        match event {
            PathEvent::Down {
                public_key,
                for_how_long,
                ever_handshaken,
                keepalive,
            } => {
                let (pop, endpoint) = name(&public_key);
                let what = match ever_handshaken {
                    true => "mesh: path to the peer is down: no WireGuard handshake for longer than \
                             a session lasts, although this POP keeps the path alive with keepalives; \
                             the path between the two POPs is blocked or the peer's WireGuard is stuck, \
                             and 6PN traffic to it is lost",
                    false => "mesh: path to the peer is down: no WireGuard handshake since it was \
                              added, after three attempts; the path between the two POPs is blocked \
                              or the peer's WireGuard is stuck, and 6PN traffic to it is lost",
                };
                tracing::warn!(peer = %pop, %endpoint, for_secs = for_how_long.as_secs(),
                    keepalive_secs = keepalive.as_secs(), "{what}");
            }
            PathEvent::Up { public_key, after } => {
                let (pop, endpoint) = name(&public_key);
                tracing::info!(peer = %pop, %endpoint, after_secs = after.as_secs(),
                    "mesh: path to the peer works again: handshake completed");
            }
        }
    }

    async fn publish_status(&mut self) {
        let read = match &self.device {
            Some(device) => device.peers().await.map_err(|e| e.to_string()),
            None => Err("no device (starting it again failed)".to_string()),
        };
        // A read that failed says nothing about the peers (a wireguard-go
        // being replaced, killed or silent): the path watch keeps what it
        // knew, as it does across a device built again. Fed as "no peers",
        // it forgot them, and a blocked path was "up" again for a while.
        let (peers, read) = match read {
            Ok(p) => (p, true),
            Err(e) => {
                tracing::debug!(error = %e, "mesh: cannot read peers for status");
                (Vec::new(), false)
            }
        };
        let mtu = self.netlink.mtu(self.index).await.ok().flatten();
        let keys: Vec<String> = peers.iter().map(|p| p.public_key.to_string()).collect();
        let keepalive = |k: Option<u16>| k.map(|k| Duration::from_secs(u64::from(k)));
        let readings: Vec<Reading> = peers
            .iter()
            .zip(&keys)
            .map(|(p, key)| Reading {
                public_key: key,
                last_handshake: p.last_handshake,
                keepalive: keepalive(p.keepalive),
            })
            .collect();
        let events = match read {
            true => self.paths.observe(Instant::now(), &readings),
            false => Vec::new(),
        };
        if read {
            let targets: Vec<(&str, Ipv6Addr)> = peers
                .iter()
                .zip(&keys)
                .filter_map(|(p, key)| Some((key.as_str(), self.peer_address(&p.allowed_ips)?)))
                .collect();
            self.probes.set_peers(&targets);
            self.verdict.retain(&keys);
        }
        let mut peers: Vec<PeerView> = peers
            .into_iter()
            .zip(keys)
            .map(|(p, key)| PeerView {
                node_id: self.names.get(&p.public_key).cloned(),
                path_up: Verdict::path_up(&self.probes, &self.paths, &key, keepalive(p.keepalive)),
                probe_rtt_secs: self.probes.rtt(&key).map(|d| d.as_secs_f64()),
                probes_lost: self.probes.lost(&key),
                public_key: key,
                endpoint: p.endpoint.map(|e| e.to_string()),
                allowed_ips: p.allowed_ips.iter().map(|a| a.to_string()).collect(),
                last_handshake_secs: p.last_handshake.map(|d| d.as_secs()),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                persistent_keepalive_secs: p.keepalive,
            })
            .collect();
        for event in self.verdict.handshake_events(&self.probes, events) {
            self.tell_path(&peers, event);
        }
        peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        self.status.publish(MeshStatus {
            enabled: true,
            implementation: self.implementation.as_str().to_string(),
            interface: self.mesh.interface.clone(),
            public_key: self.own.public_key.to_string(),
            listen_port: self.mesh.listen_port,
            endpoint: self.endpoint.to_string(),
            cluster_prefix: self.six_pn.cluster.to_string(),
            cluster_prefix_derived: self.six_pn.derived,
            prefix: self.six_pn.pop.to_string(),
            address: self.six_pn.pop_address().to_string(),
            mtu,
            path_probe: self.prober.as_ref().map(|p| p.kind().as_str().to_string()),
            peers,
            skipped: self
                .skipped
                .iter()
                .map(|(node_id, why)| SkippedView {
                    node_id: node_id.clone(),
                    reason: why.to_string(),
                })
                .collect(),
            counters: self.counters.clone(),
            last_error: self.last_error.clone(),
        });
    }
}

/// How the logs name a peer: its POP (else its key) and its endpoint.
fn peer_name(peers: &[PeerView], key: &str) -> (String, String) {
    let view = peers.iter().find(|p| p.public_key == key);
    let pop = view
        .and_then(|p| p.node_id.clone())
        .unwrap_or_else(|| key.to_string());
    let endpoint = view
        .and_then(|p| p.endpoint.clone())
        .unwrap_or_else(|| "-".into());
    (pop, endpoint)
}

/// What the previous process said about the mesh device; never, when this
/// process waits for nothing.
async fn next_hand_off(
    waiter: &mut Option<
        tokio::task::JoinHandle<Result<crate::upgrade::inherit::MeshHandOff, String>>,
    >,
) -> Result<crate::upgrade::inherit::MeshHandOff, String> {
    match waiter {
        Some(task) => task.await.unwrap_or_else(|e| Err(e.to_string())),
        None => std::future::pending().await,
    }
}

/// The next probe answer; never, without a prober.
async fn next_answer(answers: &mut Option<mpsc::UnboundedReceiver<Answer>>) -> Option<Answer> {
    match answers {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
