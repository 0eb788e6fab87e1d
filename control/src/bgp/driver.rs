//! The speaker's I/O: one task per neighbor on the control thread's Tokio
//! runtime, each owning its TCP connection and driving a sans-IO
//! [`Session`]. [`Speaker`] is the handle: [`Speaker::advertise`] hands
//! every session the POP's announcement, [`Speaker::wait_synced`] waits
//! until every established session has written it (a withdrawal is on the
//! wire), [`Speaker::stop`] ends the sessions with a Cease NOTIFICATION,
//! [`Speaker::hand_off`] hands the established ones, connection and state,
//! to a binary upgrade's successor, whose speaker was started with the
//! predecessor's sessions to come ([`Speaker::start`]'s `inherited`).
//!
//! After each input the task writes what the session queued (a write that
//! stalls for the hold time counts as a broken connection, RFC 9687's
//! idea), then carries out connect / close, then logs the session's events:
//! a `bgp: routes withdrawn` line is written after the UPDATE is.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::config::{community_text, Bgp, Neighbor};
use super::handoff::Handed;
use super::link_address::{link_ipv6, link_ipv6_choice, warn_if_deprecated};
use super::md5::{self, Md5Key};
use super::policy::Phase;
use super::routes::Advertisement;
use super::session::{cease, Io, Session, SessionEvent, SessionSettings};
use super::status::{BgpStatus, NeighborStatus, StatusHandle};
use crate::bfd::{self, Bfd, BfdView};
use rustbgpd_fsm::SessionState;
use rustbgpd_wire::notification::cease_subcode;

/// How long an outbound connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Status refresh (uptime) while nothing happens.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How often an established IPv4 session checks that its IPv6 next hop is
/// still the address it would choose now (one removed or deprecated from
/// the interface under a running session would be a next hop the router
/// cannot reach).
const NEXT_HOP_CHECK_EVERY: Duration = Duration::from_secs(5);
/// A write that makes no progress this long (with hold time 0) breaks the
/// connection.
const WRITE_STALL_FLOOR: Duration = Duration::from_secs(10);
/// How long a successor asked to hand on its sessions before it took them
/// over waits for them.
const INHERIT_PATIENCE: Duration = Duration::from_secs(5);

/// How the sessions end.
#[derive(Debug, Clone)]
enum Ending {
    /// A Cease NOTIFICATION with this reason (RFC 9003).
    Stop(String),
    /// A binary upgrade: established sessions go to the successor, with
    /// their connections, without a word to the peer.
    HandOff,
}

/// What a binary upgrade's successor gets from its predecessor's speaker:
/// its established sessions (none when it had no speaker or gave nothing).
pub type Inherited = oneshot::Receiver<Vec<Handed>>;

/// The running speaker.
pub struct Speaker {
    ads: watch::Sender<Advertisement>,
    stop: watch::Sender<Option<Ending>>,
    /// Sessions the tasks handed off, for [`Speaker::hand_off`].
    handed: mpsc::UnboundedReceiver<Handed>,
    /// Per session: the advertisement generation its peer holds
    /// (`u64::MAX` while not established: it holds nothing from us).
    synced: Vec<watch::Receiver<u64>>,
    tasks: Vec<JoinHandle<()>>,
    status: StatusHandle,
    prefixes: Vec<IpNet>,
    prepend: u8,
    /// The BFD sessions, once started (a successor starts them when its
    /// predecessor's have been handed over).
    bfd: BfdSlot,
}

type BfdSlot = std::sync::Arc<std::sync::Mutex<Option<Bfd>>>;

impl Speaker {
    /// Starts one session per neighbor, announcing nothing yet. Must run
    /// inside the control runtime. `inherited`: this process is a binary
    /// upgrade's successor; the sessions wait for the predecessor's, take
    /// over those established with the same neighbor, and start afresh
    /// where there is none.
    pub fn start(config: &Bgp, inherited: Option<Inherited>) -> Speaker {
        let ipv4 = config.announce.iter().any(|p| matches!(p, IpNet::V4(_)));
        let ipv6 = config.announce.iter().any(|p| matches!(p, IpNet::V6(_)));
        let status = StatusHandle::new(BgpStatus {
            enabled: true,
            local_asn: config.local_asn,
            router_id: config.router_id.to_string(),
            prefixes: config.announce.iter().map(|p| p.to_string()).collect(),
            phase: "withdrawn".into(),
            reason: Some("starting".into()),
            withdraw_in_ms: None,
            neighbors: config
                .neighbors
                .iter()
                .map(|n| NeighborStatus {
                    neighbor: n.label(),
                    description: n.description.clone(),
                    asn: n.asn,
                    state: "idle".into(),
                    tcp_md5: n.password.is_some(),
                    ..NeighborStatus::default()
                })
                .collect(),
        });
        let (ads, _) = watch::channel(Advertisement::default());
        let (stop, _) = watch::channel(None);
        let (handed_tx, handed) = mpsc::unbounded_channel();
        let mut synced = Vec::new();
        let mut tasks = Vec::new();
        let mut inherit_tx = Vec::new();
        let mut bfd_neighbors = Vec::new();
        for (index, n) in config.neighbors.iter().enumerate() {
            let mut communities = config.communities.clone();
            communities.extend(&n.communities);
            let settings = SessionSettings {
                label: n.label(),
                peer: n.socket_addr(),
                peer_asn: n.asn,
                local_asn: config.local_asn,
                router_id: config.router_id,
                hold_time_secs: n.hold_time_secs,
                connect_retry_secs: config.connect_retry_secs,
                ipv4,
                ipv6,
                next_hop: config.next_hop.clone(),
                med: n.med.or(config.med),
                communities,
            };
            let (synced_tx, synced_rx) = watch::channel(u64::MAX);
            synced.push(synced_rx);
            let inherit = inherited.is_some().then(|| {
                let (tx, rx) = oneshot::channel();
                inherit_tx.push((n.socket_addr(), tx));
                rx
            });
            let bfd = n.bfd.map(|b| {
                let (view, rx) = watch::channel(BfdView::default());
                bfd_neighbors.push(bfd::driver::Neighbor {
                    label: n.label(),
                    peer: n.address,
                    local: n.local_address.or(config.local_address),
                    timers: b.timers(),
                    view,
                    inherited: None,
                });
                rx
            });
            let task = Task {
                index,
                bfd,
                bfd_view: BfdView::default(),
                settings: settings.clone(),
                session: Session::held(settings),
                inherit,
                handed: handed_tx.clone(),
                source: n.local_address.or(config.local_address),
                neighbor: n.clone(),
                status: status.clone(),
                synced: synced_tx,
                stream: None,
                connecting: None,
                connect_failures: 0,
                announced: config.announce.clone(),
            };
            tasks.push(tokio::spawn(task.run(ads.subscribe(), stop.subscribe())));
        }
        let bfd_slot = BfdSlot::default();
        match inherited {
            Some(inherited) => {
                tracing::info!("bgp: waiting for the previous process to hand over its sessions");
                tokio::spawn(distribute(
                    inherited,
                    inherit_tx,
                    bfd_neighbors,
                    bfd_slot.clone(),
                ));
            }
            None => start_bfd(bfd_neighbors, &bfd_slot),
        }
        tracing::info!(local_asn = config.local_asn, router_id = %config.router_id,
            neighbors = config.neighbors.len(),
            prefixes = %config.announce.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
            communities = %config.communities.iter().map(|c| community_text(*c)).collect::<Vec<_>>().join(","),
            "bgp: speaker started; nothing announced until this POP can serve");
        Speaker {
            ads,
            stop,
            handed,
            synced,
            tasks,
            status,
            prefixes: config.announce.clone(),
            prepend: config.drain_prepend,
            bfd: bfd_slot,
        }
    }

    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }

    /// Announces (or withdraws) as `phase` says. Returns the generation to
    /// pass to [`wait_synced`](Speaker::wait_synced); nothing changes (and
    /// the current generation is returned) when the routes are the same.
    pub fn advertise(&self, phase: &Phase) -> u64 {
        let (prefixes, graceful) = match phase.graceful_shutdown() {
            None => (Vec::new(), false),
            Some(g) => (self.prefixes.clone(), g),
        };
        let prepend = if graceful { self.prepend } else { 0 };
        let mut generation = 0;
        self.ads.send_if_modified(|ad| {
            let same = ad.prefixes == prefixes
                && ad.graceful_shutdown == graceful
                && ad.prepend == prepend;
            if !same {
                *ad = Advertisement {
                    prefixes,
                    graceful_shutdown: graceful,
                    prepend,
                    generation: ad.generation + 1,
                };
            }
            generation = ad.generation;
            !same
        });
        generation
    }

    /// Waits until every established session has written `generation` (or
    /// newer) to its peer, at most `patience`. False when one did not.
    pub async fn wait_synced(&self, generation: u64, patience: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        for rx in &self.synced {
            let mut rx = rx.clone();
            let done = tokio::time::timeout_at(deadline, rx.wait_for(|g| *g >= generation)).await;
            if !matches!(done, Ok(Ok(_))) {
                return false;
            }
        }
        true
    }

    /// Ends every session with a Cease NOTIFICATION carrying `reason`
    /// (routers log it) and waits for the tasks, at most `patience`.
    pub async fn stop(&mut self, reason: &str, patience: Duration) {
        self.end(Ending::Stop(reason.to_string()), patience).await;
        // After the BGP sessions: their Cease comes first, then BFD's
        // AdminDown.
        if let Some(bfd) = self.take_bfd() {
            let _ = tokio::task::spawn_blocking(move || bfd.stop()).await;
        }
    }

    fn take_bfd(&self) -> Option<Bfd> {
        self.bfd.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// A binary upgrade: stops every session without a word to its peer
    /// and returns the established ones, each with its connection, for the
    /// successor (waits for the tasks at most `patience`; a session not
    /// handed over in time is closed, and the successor starts afresh).
    pub async fn hand_off(&mut self, patience: Duration) -> Vec<Handed> {
        self.end(Ending::HandOff, patience).await;
        let mut handed = Vec::new();
        while let Ok(h) = self.handed.try_recv() {
            handed.push(h);
        }
        // BFD last, right before the successor gets it all: the router's
        // BFD hears nothing from the moment this stops until the successor
        // sends, and that must stay well under its detection time.
        if let Some(bfd) = self.take_bfd() {
            let sessions = tokio::task::spawn_blocking(move || bfd.hand_off())
                .await
                .unwrap_or_default();
            for (peer, state) in sessions {
                if let Some(h) = handed.iter_mut().find(|h| h.state.peer.ip() == peer) {
                    h.state.bfd = Some(state);
                }
            }
        }
        handed
    }

    async fn end(&mut self, ending: Ending, patience: Duration) {
        self.stop.send_replace(Some(ending));
        let deadline = tokio::time::Instant::now() + patience;
        for task in self.tasks.drain(..) {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// A binary upgrade's successor: the predecessor's BGP sessions, to come
/// once it has stopped its speaker (after this process reported ready).
/// Must run inside the control runtime, before the report.
pub fn inherit_from_predecessor() -> Inherited {
    crate::upgrade::inherit::expect_bgp_hand_off();
    let (tx, rx) = oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let sessions = match crate::upgrade::inherit::await_bgp(INHERIT_PATIENCE) {
            Ok(sessions) => {
                tracing::info!(
                    sessions = sessions.len(),
                    "bgp: the previous process handed over its sessions"
                );
                sessions
            }
            Err(why) => {
                tracing::warn!(%why,
                    "bgp: the previous process did not hand over its sessions; starting them afresh");
                Vec::new()
            }
        };
        let _ = tx.send(sessions);
    });
    rx
}

/// Starts the BFD sessions (if any neighbor has `bfd = true`); one that
/// cannot start is an error in the log, and the BGP sessions go on without.
fn start_bfd(neighbors: Vec<bfd::driver::Neighbor>, slot: &BfdSlot) {
    if neighbors.is_empty() {
        return;
    }
    let n = neighbors.len();
    match Bfd::start(neighbors) {
        Ok(b) => {
            tracing::info!(sessions = n, "bfd: started");
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(b);
        }
        Err(e) => tracing::error!(error = %e,
            "bfd: cannot start; the BGP sessions go on without BFD (routers that require it will not see this POP up)"),
    }
}

/// Gives each neighbor's task the predecessor's session with the same
/// neighbor (or nothing); ends with a Cease the sessions with neighbors
/// this configuration no longer has. Then starts BFD, going on with the
/// predecessor's BFD sessions (its sockets are closed by now).
async fn distribute(
    inherited: Inherited,
    mut tasks: Vec<(SocketAddr, oneshot::Sender<Option<Handed>>)>,
    mut bfd_neighbors: Vec<bfd::driver::Neighbor>,
    bfd_slot: BfdSlot,
) {
    let mut handed = inherited.await.unwrap_or_default();
    for h in &mut handed {
        if let Some(state) = h.state.bfd.take() {
            match bfd_neighbors
                .iter_mut()
                .find(|n| n.peer == h.state.peer.ip())
            {
                Some(n) => n.inherited = Some(state),
                None => tracing::info!(neighbor = %h.state.peer,
                    "bfd: the previous process ran BFD with a neighbor this configuration runs none with; the router's BFD session times out"),
            }
        }
    }
    start_bfd(bfd_neighbors, &bfd_slot);
    for h in handed {
        match tasks.iter().position(|(peer, _)| *peer == h.state.peer) {
            Some(i) => {
                let (_, tx) = tasks.swap_remove(i);
                let _ = tx.send(Some(h));
            }
            None => {
                tracing::info!(neighbor = %h.state.peer,
                    "bgp: the previous process's session with a neighbor this configuration no longer has: ended (Cease, peer de-configured)");
                close_with_cease(
                    h.socket,
                    cease_subcode::PEER_DECONFIGURED,
                    "neighbor removed",
                )
                .await;
            }
        }
    }
    for (_, tx) in tasks {
        let _ = tx.send(None);
    }
}

/// Ends a connection no session owns with a Cease NOTIFICATION.
async fn close_with_cease(socket: OwnedFd, subcode: u8, reason: &str) {
    let Ok(mut stream) = adopt(socket) else {
        return;
    };
    if let Some(bytes) = cease(subcode, reason) {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&bytes)).await;
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.shutdown()).await;
}

/// A handed-over connection as a Tokio stream.
fn adopt(socket: OwnedFd) -> std::io::Result<TcpStream> {
    let std = std::net::TcpStream::from(socket);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send>>;

struct Task {
    index: usize,
    /// The neighbor's BFD session, with `bfd = true`.
    bfd: Option<watch::Receiver<BfdView>>,
    bfd_view: BfdView,
    settings: SessionSettings,
    session: Session,
    /// A successor's: the predecessor's session with this neighbor, to come.
    inherit: Option<oneshot::Receiver<Option<Handed>>>,
    handed: mpsc::UnboundedSender<Handed>,
    source: Option<IpAddr>,
    neighbor: Neighbor,
    status: StatusHandle,
    synced: watch::Sender<u64>,
    stream: Option<TcpStream>,
    connecting: Option<Connecting>,
    /// Consecutive failed attempts: only the first is logged as a warning.
    connect_failures: u32,
    /// `[bgp] announce`: never a next hop.
    announced: Vec<IpNet>,
}

/// Connects to `peer`, signing with `md5` (RFC 2385) when set: the key
/// goes on the socket before `connect()`, so the SYN is signed.
fn connect(peer: SocketAddr, source: Option<IpAddr>, md5: Option<Md5Key>) -> Connecting {
    Box::pin(async move {
        let socket = match peer {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(key) = &md5 {
            md5::set_key(&socket, peer.ip(), key)?;
        }
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(peer))
            .await
            .map_err(|_| {
                // A peer that requires TCP MD5 drops a SYN without the
                // right signature silently: a timeout is all there is.
                let why = format!("connect timed out{}", md5_hint(md5.is_some()));
                std::io::Error::new(std::io::ErrorKind::TimedOut, why)
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// What a connect that gets no answer may mean: a peer requiring TCP MD5
/// drops a SYN without the right signature, silently.
fn md5_hint(signed: bool) -> &'static str {
    if signed {
        " (or the neighbor's TCP MD5 password differs)"
    } else {
        " (or the neighbor requires a TCP MD5 password)"
    }
}

async fn read_some(stream: &mut Option<TcpStream>, buf: &mut [u8]) -> std::io::Result<usize> {
    match stream {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

/// The BFD session's next change; `None` once it stopped for good.
async fn bfd_changed(rx: &mut Option<watch::Receiver<BfdView>>) -> Option<BfdView> {
    match rx {
        Some(rx) => {
            rx.changed().await.ok()?;
            Some(*rx.borrow_and_update())
        }
        None => std::future::pending().await,
    }
}

async fn connected(c: &mut Option<Connecting>) -> std::io::Result<TcpStream> {
    match c {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl Task {
    async fn run(
        mut self,
        mut ads: watch::Receiver<Advertisement>,
        mut stop: watch::Receiver<Option<Ending>>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_hop_tick = tokio::time::interval(NEXT_HOP_CHECK_EVERY);
        next_hop_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(inherit) = self.inherit.take() {
            let mut inherit = inherit;
            let handed = tokio::select! {
                h = &mut inherit => h.ok().flatten(),
                _ = stop.changed() => {
                    // Ended before the predecessor's session arrived: hand
                    // it on as it came (upgraded again) or end it.
                    let ending = stop.borrow().clone();
                    let handed = tokio::time::timeout(INHERIT_PATIENCE, inherit)
                        .await
                        .ok()
                        .and_then(|h| h.ok().flatten());
                    match (ending, handed) {
                        (Some(Ending::HandOff), Some(h)) => {
                            let _ = self.handed.send(h);
                        }
                        (_, Some(h)) => {
                            close_with_cease(h.socket, cease_subcode::ADMINISTRATIVE_SHUTDOWN,
                                "edgeproxy stopping").await;
                        }
                        (_, None) => {}
                    }
                    return;
                }
            };
            let ad = ads.borrow_and_update().clone();
            match handed {
                Some(h) => self.take_over(h, ad).await,
                None => self.start_fresh(ad, Instant::now()),
            }
        } else {
            let ad = ads.borrow_and_update().clone();
            self.start_fresh(ad, Instant::now());
        }
        loop {
            self.carry_out().await;
            let wake = self
                .session
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = read_some(&mut self.stream, &mut buf) => {
                    let now = Instant::now();
                    match r {
                        Ok(0) => { self.stream = None; self.session.handle_closed(now, "the peer closed it"); }
                        Ok(n) => self.session.handle_bytes(now, &buf[..n]),
                        Err(e) => { self.stream = None; self.session.handle_closed(now, &e.to_string()); }
                    }
                }
                r = connected(&mut self.connecting) => {
                    self.connecting = None;
                    let now = Instant::now();
                    match r.and_then(|s| s.local_addr().map(|a| (s, a))) {
                        Ok((s, local)) => {
                            self.stream = Some(s);
                            self.connect_failures = 0;
                            self.session
                                .set_link_ipv6(link_ipv6(local.ip(), &self.announced));
                            self.session.handle_connected(now, local);
                        }
                        Err(e) => {
                            self.connect_failed(&e.to_string());
                            self.session.handle_connect_failed(now, &e.to_string());
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => self.session.handle_timeout(Instant::now()),
                r = ads.changed() => {
                    if r.is_err() { return; }
                    let ad = ads.borrow_and_update().clone();
                    self.session.set_advertisement(ad);
                }
                r = stop.changed() => {
                    let ending = match r {
                        Ok(()) => stop.borrow().clone(),
                        Err(_) => None,
                    };
                    match ending {
                        Some(Ending::HandOff) => self.hand_off().await,
                        Some(Ending::Stop(reason)) => self.stop(&reason).await,
                        None => self.stop("edgeproxy stopping").await,
                    }
                    return;
                }
                view = bfd_changed(&mut self.bfd) => match view {
                    Some(view) => self.on_bfd(view),
                    None => {
                        self.bfd = None;
                        self.bfd_view = BfdView::default();
                        self.publish();
                    }
                },
                _ = status_tick.tick() => self.publish(),
                _ = next_hop_tick.tick() => self.check_next_hop(),
            }
        }
    }

    /// The BFD session changed: one that went down since the last look
    /// resets an established BGP session (RFC 5882 §4.3).
    fn on_bfd(&mut self, view: BfdView) {
        let went_down = view.downs > self.bfd_view.downs;
        self.bfd_view = view;
        if went_down && self.session.state() == SessionState::Established {
            self.session.handle_bfd_down(Instant::now());
        }
        self.publish();
    }

    /// On an established IPv4 session, chooses the IPv6 next hop again and
    /// re-announces the IPv6 routes if it changed (QA: an operator moving
    /// the POP to a new address and removing the old left every IPv6 route
    /// pointing at an address no longer there until the session restarted).
    fn check_next_hop(&mut self) {
        if self.session.state() != SessionState::Established {
            return;
        }
        let Some(local) = self.stream.as_ref().and_then(|s| s.local_addr().ok()) else {
            return;
        };
        let before = self.session.link_ipv6();
        let choice = link_ipv6_choice(local.ip(), &self.announced, before);
        let now = choice.as_ref().map(|c| c.addr);
        if now == before {
            return;
        }
        tracing::info!(neighbor = %self.neighbor.label(), before = ?before, now = ?now,
            "bgp: the IPv6 next hop changed on the session's interface; announcing IPv6 routes again");
        if let Some(c) = &choice {
            warn_if_deprecated(c, local.ip());
        }
        self.session.set_link_ipv6(now);
    }

    /// Logs a failed connect attempt: the first of a run as a warning.
    fn connect_failed(&mut self, error: &str) {
        self.connect_failures += 1;
        if self.connect_failures == 1 {
            tracing::warn!(neighbor = %self.neighbor.label(), %error,
                "bgp: cannot connect to the neighbor; retrying");
        } else {
            tracing::debug!(neighbor = %self.neighbor.label(), %error, "bgp: connect failed");
        }
    }

    async fn stop(&mut self, reason: &str) {
        self.session.stop(Instant::now(), reason);
        self.carry_out().await;
        self.stream = None;
        self.publish();
    }

    /// Writes what is queued, then gives the session and its connection to
    /// the speaker for the successor; a session that is not established is
    /// just closed (the successor starts it afresh).
    async fn hand_off(&mut self) {
        self.carry_out().await;
        let state = self.session.hand_off(Instant::now());
        let stream = self.stream.take();
        self.connecting = None;
        match (state, stream.map(|s| s.into_std())) {
            (Some(state), Some(Ok(std))) => {
                tracing::info!(neighbor = %self.neighbor.label(),
                    "bgp: session handed over to the new process");
                let _ = self.handed.send(Handed {
                    state,
                    socket: OwnedFd::from(std),
                });
            }
            (_, Some(Err(e))) => {
                tracing::warn!(neighbor = %self.neighbor.label(), error = %e,
                    "bgp: cannot hand the session over; the new process starts it afresh")
            }
            _ => {}
        }
    }

    /// A successor's: goes on with the predecessor's session, or ends it
    /// and starts afresh when this configuration cannot.
    async fn take_over(&mut self, handed: Handed, ad: Advertisement) {
        let now = Instant::now();
        let stream = match adopt(handed.socket) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(neighbor = %self.neighbor.label(), error = %e,
                    "bgp: cannot use the handed-over connection; starting afresh");
                return self.start_fresh(ad, now);
            }
        };
        let resumed = stream
            .local_addr()
            .map_err(|e| e.to_string())
            .and_then(|local| {
                let link = link_ipv6(local.ip(), &self.announced);
                Session::resume(
                    self.settings.clone(),
                    &handed.state,
                    local,
                    link,
                    ad.clone(),
                    now,
                )
            });
        match resumed {
            Ok(session) => {
                self.session = session;
                self.stream = Some(stream);
            }
            Err(why) => {
                tracing::warn!(neighbor = %self.neighbor.label(), %why,
                    "bgp: cannot go on with the previous process's session: ending it (Cease) and starting afresh");
                let socket = match stream.into_std() {
                    Ok(s) => OwnedFd::from(s),
                    Err(_) => return self.start_fresh(ad, now),
                };
                close_with_cease(
                    socket,
                    cease_subcode::OTHER_CONFIGURATION_CHANGE,
                    "configuration changed across an upgrade",
                )
                .await;
                self.start_fresh(ad, now);
            }
        }
    }

    fn start_fresh(&mut self, ad: Advertisement, now: Instant) {
        self.session.set_advertisement(ad);
        self.session.start(now);
    }

    /// Writes what the session queued, then connects or closes, then logs.
    async fn carry_out(&mut self) {
        let stall =
            Duration::from_secs(u64::from(self.neighbor.hold_time_secs)).max(WRITE_STALL_FLOOR);
        while let Some(bytes) = self.session.poll_transmit() {
            let Some(stream) = self.stream.as_mut() else {
                continue; // closed meanwhile: the FSM learns it from the close
            };
            let written = tokio::time::timeout(stall, stream.write_all(&bytes)).await;
            let failure = match written {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "a write made no progress for {} s",
                    stall.as_secs()
                )),
            };
            if let Some(why) = failure {
                self.stream = None;
                self.session.handle_closed(Instant::now(), &why);
            }
        }
        // A connect still pending when the FSM starts another got no answer
        // within the connect-retry time: a failure too, said as one.
        let mut unanswered = false;
        while let Some(io) = self.session.poll_io() {
            match io {
                Io::Connect => {
                    self.stream = None;
                    if std::mem::take(&mut unanswered) || self.connecting.is_some() {
                        let why = format!(
                            "no answer within the connect-retry time{}",
                            md5_hint(self.neighbor.password.is_some())
                        );
                        self.connect_failed(&why);
                        self.session.note_connect_unanswered(&why);
                    }
                    self.connecting = Some(connect(
                        self.neighbor.socket_addr(),
                        self.source,
                        self.neighbor.password.clone(),
                    ));
                }
                Io::Close => {
                    if let Some(mut s) = self.stream.take() {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(200), s.shutdown()).await;
                    }
                    unanswered |= self.connecting.take().is_some();
                }
            }
        }
        self.synced
            .send_replace(self.session.queued_generation().unwrap_or(u64::MAX));
        let mut changed = false;
        while let Some(event) = self.session.poll_event() {
            changed = true;
            self.log(event);
        }
        if changed {
            self.publish();
        }
    }

    fn log(&self, event: SessionEvent) {
        let neighbor = self.neighbor.label();
        match event {
            SessionEvent::State { from, to } => {
                tracing::debug!(%neighbor, %from, %to, "bgp: session state")
            }
            SessionEvent::Established {
                hold_time,
                peer_router_id,
                ipv4,
                ipv6,
            } => {
                tracing::info!(%neighbor, asn = self.neighbor.asn, %peer_router_id, hold_time_secs = hold_time,
                ipv4, ipv6, "bgp: session established")
            }
            SessionEvent::Resumed {
                established_for,
                hold_time,
            } => {
                tracing::info!(%neighbor, asn = self.neighbor.asn, hold_time_secs = hold_time,
                    established_secs = established_for.as_secs(),
                    "bgp: session taken over from the previous process: still established, nothing withdrawn")
            }
            SessionEvent::Down { reason } => {
                tracing::warn!(%neighbor, %reason, "bgp: session down")
            }
            // A refused OPEN is a session that never comes up: WARN, as a
            // NOTIFICATION received is.
            SessionEvent::NotificationSent { text, error: true } => {
                tracing::warn!(%neighbor, notification = %text, "bgp: NOTIFICATION sent")
            }
            SessionEvent::NotificationSent { text, error: false } => {
                tracing::info!(%neighbor, notification = %text, "bgp: NOTIFICATION sent")
            }
            SessionEvent::NotificationReceived(text) => {
                tracing::warn!(%neighbor, notification = %text, "bgp: NOTIFICATION received")
            }
            SessionEvent::RoutesSent {
                announced,
                withdrawn,
                graceful_shutdown,
                generation,
            } => {
                if withdrawn > 0 {
                    tracing::info!(%neighbor, prefixes = withdrawn, generation, "bgp: routes withdrawn");
                }
                if announced > 0 {
                    tracing::info!(%neighbor, prefixes = announced, graceful_shutdown, generation,
                        "bgp: routes announced");
                }
            }
        }
    }

    fn publish(&self) {
        let s = self.session.snapshot(Instant::now());
        let index = self.index;
        let bfd = self.bfd_view;
        self.status.update(|status| {
            if let Some(n) = status.neighbors.get_mut(index) {
                n.state = s.state.as_str().to_string();
                n.uptime_secs = s.established_for.map(|d| d.as_secs());
                n.hold_time_secs = s.hold_time;
                n.local_address = s.local_addr.map(|a| a.to_string());
                n.prefixes_announced = s.prefixes_announced;
                n.graceful_shutdown = s.graceful_shutdown;
                n.updates_sent = s.updates_sent;
                n.flaps = s.flaps;
                n.last_error = s.last_error;
                n.bfd = bfd.state.map(|s| s.name().to_string());
                n.bfd_downs = bfd.downs;
            }
        });
    }
}
