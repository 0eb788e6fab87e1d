//! The speaker's I/O: one task per neighbor on the control thread's Tokio
//! runtime, each owning its TCP connection and driving a sans-IO
//! [`Session`]. [`Speaker`] is the handle: [`Speaker::advertise`] hands
//! every session the POP's announcement, [`Speaker::wait_synced`] waits
//! until every established session has written it (a withdrawal is on the
//! wire), [`Speaker::stop`] ends the sessions with a Cease NOTIFICATION.
//!
//! After each input the task writes what the session queued (a write that
//! stalls for the hold time counts as a broken connection, RFC 9687's
//! idea), then carries out connect / close, then logs the session's events:
//! a `bgp: routes withdrawn` line is written after the UPDATE is.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::{community_text, Bgp, Neighbor};
use super::policy::Phase;
use super::routes::Advertisement;
use super::session::{Io, Session, SessionEvent, SessionSettings};
use super::status::{BgpStatus, NeighborStatus, StatusHandle};

/// How long an outbound connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Status refresh (uptime) while nothing happens.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// A write that makes no progress this long (with hold time 0) breaks the
/// connection.
const WRITE_STALL_FLOOR: Duration = Duration::from_secs(10);

/// The running speaker.
pub struct Speaker {
    ads: watch::Sender<Advertisement>,
    stop: watch::Sender<Option<String>>,
    /// Per session: the advertisement generation its peer holds
    /// (`u64::MAX` while not established: it holds nothing from us).
    synced: Vec<watch::Receiver<u64>>,
    tasks: Vec<JoinHandle<()>>,
    status: StatusHandle,
    prefixes: Vec<IpNet>,
    prepend: u8,
}

impl Speaker {
    /// Starts one session per neighbor, announcing nothing yet. Must run
    /// inside the control runtime.
    pub fn start(config: &Bgp) -> Speaker {
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
                    ..NeighborStatus::default()
                })
                .collect(),
        });
        let (ads, _) = watch::channel(Advertisement::default());
        let (stop, _) = watch::channel(None);
        let mut synced = Vec::new();
        let mut tasks = Vec::new();
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
            let task = Task {
                index,
                session: Session::new(settings, Instant::now()),
                source: n.local_address.or(config.local_address),
                neighbor: n.clone(),
                status: status.clone(),
                synced: synced_tx,
                stream: None,
                connecting: None,
                connect_failures: 0,
            };
            tasks.push(tokio::spawn(task.run(ads.subscribe(), stop.subscribe())));
        }
        tracing::info!(local_asn = config.local_asn, router_id = %config.router_id,
            neighbors = config.neighbors.len(),
            prefixes = %config.announce.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
            communities = %config.communities.iter().map(|c| community_text(*c)).collect::<Vec<_>>().join(","),
            "bgp: speaker started; nothing announced until this POP can serve");
        Speaker {
            ads,
            stop,
            synced,
            tasks,
            status,
            prefixes: config.announce.clone(),
            prepend: config.drain_prepend,
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
        self.stop.send_replace(Some(reason.to_string()));
        let deadline = tokio::time::Instant::now() + patience;
        for task in self.tasks.drain(..) {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send>>;

struct Task {
    index: usize,
    session: Session,
    source: Option<IpAddr>,
    neighbor: Neighbor,
    status: StatusHandle,
    synced: watch::Sender<u64>,
    stream: Option<TcpStream>,
    connecting: Option<Connecting>,
    /// Consecutive failed attempts: only the first is logged as a warning.
    connect_failures: u32,
}

fn connect(peer: SocketAddr, source: Option<IpAddr>) -> Connecting {
    Box::pin(async move {
        let socket = match peer {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(peer))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

async fn read_some(stream: &mut Option<TcpStream>, buf: &mut [u8]) -> std::io::Result<usize> {
    match stream {
        Some(s) => s.read(buf).await,
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
        mut stop: watch::Receiver<Option<String>>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.session
            .set_advertisement(ads.borrow_and_update().clone());
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
                            self.session.handle_connected(now, local);
                        }
                        Err(e) => {
                            self.connect_failures += 1;
                            if self.connect_failures == 1 {
                                tracing::warn!(neighbor = %self.neighbor.label(), error = %e,
                                    "bgp: cannot connect to the neighbor; retrying");
                            } else {
                                tracing::debug!(neighbor = %self.neighbor.label(), error = %e, "bgp: connect failed");
                            }
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
                    let reason = match r {
                        Ok(()) => stop.borrow().clone().unwrap_or_default(),
                        Err(_) => String::from("edgeproxy stopping"),
                    };
                    self.session.stop(Instant::now(), &reason);
                    self.carry_out().await;
                    self.stream = None;
                    self.publish();
                    return;
                }
                _ = status_tick.tick() => self.publish(),
            }
        }
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
        while let Some(io) = self.session.poll_io() {
            match io {
                Io::Connect => {
                    self.stream = None;
                    self.connecting = Some(connect(self.neighbor.socket_addr(), self.source));
                }
                Io::Close => {
                    if let Some(mut s) = self.stream.take() {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(200), s.shutdown()).await;
                    }
                    self.connecting = None;
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
            SessionEvent::Down { reason } => {
                tracing::warn!(%neighbor, %reason, "bgp: session down")
            }
            SessionEvent::NotificationSent(text) => {
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
            }
        });
    }
}
