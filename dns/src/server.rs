//! The DNS server: UDP worker threads and a Tokio driver for TCP around
//! [`Answerer`].
//!
//! [`DnsServer::bind`] binds both sockets synchronously (TCP first, then UDP
//! on the port TCP got, so port 0 works), so a bind failure is a startup
//! error. [`DnsServer::run`] must be called on a Tokio runtime (the control
//! thread's current-thread runtime); it serves until that runtime stops.
//!
//! - UDP: `udp_workers` sockets in one `SO_REUSEPORT` group (each datagram
//!   goes to one of them at random, [`udp_steering`]), each served by a
//!   thread of its own (`dns-udp-N`), so answers use more than one core and
//!   a DNS flood never delays the control thread's other work. Each worker
//!   waits in `recvmmsg` itself (no event loop: one system call per wake-up),
//!   reads up to 32 datagrams with it, answers them, and sends the replies
//!   with one `sendmmsg` before reading again ([`udp_batch`]);
//!   so a flood queues in the socket's receive buffer and is dropped by the
//!   kernel there, not in our memory. The workers run under `SCHED_BATCH`
//!   unless told otherwise ([`thread_policy`]): a query arriving while its
//!   core is busy waits for the running task's turn to end instead of
//!   preempting it, so the proxy's shards keep their core and the worker
//!   finds a batch, not one query, when it runs.
//! - TCP (RFC 7766): two-byte length-prefixed messages, answered in order on
//!   each connection (pipelining works); a connection silent for
//!   `tcp_idle_timeout` is closed, as is one that sends something that is not
//!   a query (a response, or a frame too short for a header): after the
//!   replies written so far, with a FIN, reading and dropping what the
//!   client still sends until it closes (at most `tcp_idle_timeout`), so
//!   that no reset can cost it those replies. At most `tcp_max_connections`
//!   connections are served at once;
//!   further ones wait in the listen backlog until one closes.
//! - Every answer runs under `catch_unwind`: a bug triggered by one packet
//!   costs that packet, not the server.
//! - A binary upgrade hands the sockets to the next process
//!   ([`DnsServer::from_sockets`] takes them over there); the old one stops
//!   reading through [`DnsServer::run_until`]'s stop signal, between
//!   batches (a worker looks at it at least every [`udp_batch::WAIT`]), so
//!   no datagram it has read goes unanswered, and what it has not read
//!   stays queued for the successor.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::snapshot::SnapshotHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};

use crate::answer::{Answerer, Transport};

mod thread_policy;
mod udp_batch;
mod udp_steering;

/// Receive buffer asked for each UDP socket: absorbs bursts while its worker
/// waits for its core (under `SCHED_BATCH` it waits for the running task's
/// turn to end) or answers a batch (the kernel may cap it lower).
const UDP_RECV_BUFFER: usize = 4 << 20;
/// Pause after accept fails for lack of file descriptors, instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Server settings, validated by the caller's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// UDP and TCP address; port 0 picks a free port (the same for both).
    pub listen: SocketAddr,
    /// A TCP connection with no complete query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// TCP connections served at once; ≥ 1.
    pub tcp_max_connections: usize,
    /// UDP sockets (and threads answering them); ≥ 1.
    pub udp_workers: usize,
    /// Run the UDP worker threads under `SCHED_BATCH` (see
    /// [`thread_policy`]); `false` leaves them at the default policy.
    pub udp_batch_scheduling: bool,
}

/// Why the server could not start.
///
/// The io::Error is in the message, so it is a plain field (`cause`), not a
/// `source`: `{:#}` error chains would print it twice.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    #[error("cannot bind DNS UDP socket on {addr}: {cause}")]
    Udp { addr: SocketAddr, cause: io::Error },
    #[error("cannot bind DNS TCP listener on {addr}: {cause}")]
    Tcp { addr: SocketAddr, cause: io::Error },
}

/// Both sockets, bound, not yet served.
#[derive(Debug)]
pub struct DnsServer {
    /// One per UDP worker, all on one address.
    udp: Vec<std::net::UdpSocket>,
    tcp: std::net::TcpListener,
    settings: ServerSettings,
}

impl DnsServer {
    /// Binds TCP on `settings.listen`, then UDP on the same address and the
    /// port TCP got. With port 0, a UDP port clash is retried on a new port.
    ///
    /// TCP first because with port 0 its ports are the scarce ones: every
    /// outgoing connection of the host holds a TCP port (for a minute after
    /// it closes, in TIME_WAIT) that a listener cannot take, while few UDP
    /// ports are in use. Picked the other way round, a busy host (a test
    /// suite churning connections) refused the TCP half of a port UDP had
    /// found free eight times in a row.
    pub fn bind(settings: ServerSettings) -> Result<DnsServer, BindError> {
        let want = settings.listen;
        let mut attempts = if want.port() == 0 { 8 } else { 1 };
        // Nothing else may listen there: with SO_REUSEPORT another process's
        // sockets would be joined silently and share the queries.
        ensure_udp_unused(want).map_err(|cause| BindError::Udp { addr: want, cause })?;
        loop {
            let tcp = bind_tcp(want).map_err(|cause| BindError::Tcp { addr: want, cause })?;
            let got = tcp
                .local_addr()
                .map_err(|cause| BindError::Tcp { addr: want, cause })?;
            // The port is TCP's pick: nobody else's UDP socket may hold it
            // either (SO_REUSEPORT would join it silently).
            let udp = ensure_udp_unused(got)
                .and_then(|()| bind_udp_group(got, settings.udp_workers.max(1)));
            match udp {
                Ok(udp) => {
                    spread_queries(&udp);
                    return Ok(DnsServer { udp, tcp, settings });
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempts > 1 => {
                    attempts -= 1;
                }
                Err(cause) => return Err(BindError::Udp { addr: got, cause }),
            }
        }
    }

    /// Takes over sockets that already serve (handed over by the process
    /// this one upgrades from): `udp` in their `SO_REUSEPORT` group, `tcp`
    /// listening. Every inherited UDP socket is served, even beyond
    /// `udp_workers` (a socket of the group nobody reads would swallow its
    /// share of the queries); with fewer than `udp_workers`, more join the
    /// group.
    pub fn from_sockets(
        udp: Vec<std::net::UdpSocket>,
        tcp: std::net::TcpListener,
        settings: ServerSettings,
    ) -> Result<DnsServer, BindError> {
        let tcp_addr = tcp.local_addr().map_err(|cause| BindError::Tcp {
            addr: settings.listen,
            cause,
        })?;
        tcp.set_nonblocking(true).map_err(|cause| BindError::Tcp {
            addr: tcp_addr,
            cause,
        })?;
        let mut udp = udp;
        let first = udp.first().ok_or_else(|| BindError::Udp {
            addr: settings.listen,
            cause: io::Error::new(io::ErrorKind::InvalidInput, "no UDP socket to take over"),
        })?;
        let got = first.local_addr().map_err(|cause| BindError::Udp {
            addr: settings.listen,
            cause,
        })?;
        // Each worker sets its socket's mode itself ([`udp_batch::Batch::prepare`]).
        for socket in &udp {
            // A process from before replies left from their query's
            // address handed over sockets that do not report it.
            udp_batch::want_destinations(socket, got)
                .map_err(|cause| BindError::Udp { addr: got, cause })?;
        }
        while udp.len() < settings.udp_workers.max(1) {
            udp.push(bind_udp(got).map_err(|cause| BindError::Udp { addr: got, cause })?);
        }
        spread_queries(&udp);
        Ok(DnsServer { udp, tcp, settings })
    }

    /// Every socket, for a binary upgrade's hand-over: the UDP ones in group
    /// order, then the TCP listener.
    pub fn sockets(
        &self,
    ) -> (
        Vec<std::os::fd::BorrowedFd<'_>>,
        std::os::fd::BorrowedFd<'_>,
    ) {
        use std::os::fd::AsFd;
        (
            self.udp.iter().map(|s| s.as_fd()).collect(),
            self.tcp.as_fd(),
        )
    }

    pub fn udp_addr(&self) -> io::Result<SocketAddr> {
        self.udp[0].local_addr()
    }

    pub fn tcp_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves both sockets until the runtime stops. Returns early only if
    /// serving cannot start: the TCP listener cannot be registered with the
    /// runtime, or a UDP worker's socket cannot be set up or its thread
    /// started.
    pub async fn run(self, answerer: Answerer, snapshot: SnapshotHandle) -> io::Result<()> {
        let (_never, stop) = watch::channel(false);
        self.run_until(answerer, snapshot, stop).await
    }

    /// Serves until `stop` turns true: then every worker stops reading and
    /// the TCP listener stops accepting (the sockets close here; TCP
    /// connections already open are served to their end).
    pub async fn run_until(
        self,
        answerer: Answerer,
        snapshot: SnapshotHandle,
        stop: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let tcp = TcpListener::from_std(self.tcp)?;
        let mut workers = Vec::with_capacity(self.udp.len());
        for (id, socket) in self.udp.into_iter().enumerate() {
            workers.push(spawn_udp_worker(
                id,
                socket,
                self.settings.udp_batch_scheduling,
                answerer.clone(),
                snapshot.clone(),
                stop.clone(),
            )?);
        }
        serve_tcp(tcp, answerer, snapshot, self.settings, stop).await;
        // Every worker answers the batch it has read before it stops.
        for finished in workers {
            let _ = finished.await;
        }
        Ok(())
    }
}

/// Resolves once `stop` says true; never if its sender is gone without
/// saying so.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A UDP worker: a thread of its own serving `socket` until `stop` (it
/// waits in the receive itself, see [`udp_batch`]). The returned receiver
/// resolves (with an error: its sender is dropped) when the thread has
/// finished.
fn spawn_udp_worker(
    id: usize,
    socket: std::net::UdpSocket,
    batch_scheduling: bool,
    answerer: Answerer,
    snapshot: SnapshotHandle,
    stop: watch::Receiver<bool>,
) -> io::Result<oneshot::Receiver<()>> {
    udp_batch::Batch::prepare(&socket)?;
    let (finished, on_finished) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("dns-udp-{id}"))
        .spawn(move || {
            let _finished = finished;
            if batch_scheduling {
                if let Err(e) = thread_policy::set_batch() {
                    tracing::warn!(worker = id, error = %e,
                        "dns: cannot run the udp worker under SCHED_BATCH; it keeps the default policy");
                }
            }
            serve_udp(socket, answerer, snapshot, stop);
        })?;
    Ok(on_finished)
}

/// Spreads datagrams over every socket of the group at random (see
/// [`udp_steering`]); if the kernel refuses, the group keeps its default
/// spread by client address and port.
fn spread_queries(udp: &[std::net::UdpSocket]) {
    if let Err(e) = udp_steering::spread_at_random(&udp[0], udp.len()) {
        tracing::warn!(error = %e, sockets = udp.len(),
            "dns: cannot steer queries to udp workers at random; the kernel spreads them by client address and port");
    }
}

/// Fails if anything is bound to `addr` already (a probe without
/// SO_REUSEPORT conflicts with every socket there). Port 0 is always free.
fn ensure_udp_unused(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    std::net::UdpSocket::bind(addr).map(drop)
}

/// `count` UDP sockets in one reuseport group on `addr` (whether another
/// process holds the port is [`ensure_udp_unused`]'s to find out).
fn bind_udp_group(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let first = bind_udp(addr)?;
    let addr = first.local_addr()?;
    let mut udp = vec![first];
    while udp.len() < count {
        udp.push(bind_udp(addr)?);
    }
    Ok(udp)
}

fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    // Best effort: a smaller buffer only drops more of a burst.
    let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
    never_fragment(&socket, addr)?;
    udp_batch::want_destinations(&socket, addr)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Replies leave with the don't-fragment bit and are never fragmented here
/// (`IP_PMTUDISC_PROBE`), as RFC 9715 asks of DNS responders: a reply is
/// at most 1,232 bytes (the answerer's cap), which fits any IPv6 link and
/// every IPv4 link in use, so only a forged "fragmentation needed" could
/// make it bigger than the path, and PROBE ignores the path MTU such a
/// message would lower. A reply too big for the interface fails to send
/// (the client retries over TCP). It also spares the kernel an IP ID per
/// reply: a packet with DF set carries ID 0 instead of one drawn from the
/// shared, hashed ID generator (2–3 % of the server's CPU in a profile).
fn never_fragment(socket: &socket2::Socket, addr: SocketAddr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: an int option, passed by pointer with its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    if addr.is_ipv6() {
        set(
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )?;
    }
    // On an IPv6 socket this covers its IPv4-mapped clients; a v6-only
    // socket has none and may refuse it.
    match set(
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_PROBE,
    ) {
        Err(e) if !addr.is_ipv6() => Err(e),
        _ => Ok(()),
    }
}

fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Runs one answer, containing any panic.
fn answer_guarded(
    answerer: &mut Answerer,
    query: &[u8],
    client: IpAddr,
    transport: Transport,
    snapshot: &SnapshotHandle,
    now: Instant,
    out: &mut Vec<u8>,
) -> bool {
    let snap = snapshot.load();
    match catch_unwind(AssertUnwindSafe(|| {
        answerer.answer_at(query, client, transport, &snap, now, out)
    })) {
        Ok(answered) => answered.is_some(),
        Err(_) => {
            tracing::error!(%client, len = query.len(), ?transport,
                "dns: answering panicked; query dropped (this is a bug)");
            out.clear();
            false
        }
    }
}

/// Serves `socket` on this thread until `stop` says true.
fn serve_udp(
    socket: std::net::UdpSocket,
    mut answerer: Answerer,
    snapshot: SnapshotHandle,
    stop: watch::Receiver<bool>,
) {
    let mut batch = udp_batch::Batch::new();
    // Stopping only here, between batches: a receive that has not returned
    // has read nothing, and one that has is answered first.
    while !*stop.borrow() {
        let received = match batch.recv(&socket) {
            Ok(n) => n,
            Err(e) => {
                // ICMP errors from earlier sends surface here (ECONNREFUSED);
                // they concern one peer, never the socket.
                tracing::debug!(error = %e, "dns: udp receive failed");
                continue;
            }
        };
        let now = Instant::now();
        let mut replies = 0;
        for slot in 0..received {
            // Reply buffers live in the batch too: take one out while the
            // query is borrowed, then put it back with its slot.
            let mut out = std::mem::take(&mut batch.replies[replies].1);
            let (query, peer) = batch.datagram(slot);
            let answered = peer.is_some_and(|peer| {
                answer_guarded(
                    &mut answerer,
                    query,
                    peer.ip(),
                    Transport::Udp,
                    &snapshot,
                    now,
                    &mut out,
                )
            });
            batch.replies[replies] = (slot, out);
            if answered {
                replies += 1;
            }
        }
        if replies > 0 {
            batch.send(&socket, replies);
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    answerer: Answerer,
    snapshot: SnapshotHandle,
    settings: ServerSettings,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(settings.tcp_max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p,
            () = stopped(&mut stop) => return,
        };
        let Ok(permit) = permit else {
            return; // the semaphore is never closed
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stopped(&mut stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                tracing::warn!(error = %e, "dns: tcp accept failed");
                if out_of_fds {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        let answerer = answerer.clone();
        let snapshot = snapshot.clone();
        let idle = settings.tcp_idle_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            if let Err(e) = serve_connection(stream, peer, answerer, snapshot, idle).await {
                tracing::debug!(%peer, error = %e, "dns: tcp connection ended");
            }
        });
    }
}

/// Why a TCP connection ended, other than the client closing it.
#[derive(Debug, thiserror::Error)]
enum ConnEnd {
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("not a query")]
    NotAQuery,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One TCP connection (RFC 7766 framing). Generic over the stream so the
/// framing can be fuzzed over an in-memory pipe.
async fn serve_connection<S>(
    mut stream: S,
    peer: SocketAddr,
    mut answerer: Answerer,
    snapshot: SnapshotHandle,
    idle: Duration,
) -> Result<(), ConnEnd>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut query = Vec::new();
    let mut out = Vec::new();
    let mut frame = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Err(_) => return Err(ConnEnd::Idle(idle)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let len = u16::from_be_bytes(len) as usize;
        query.resize(len, 0);
        match tokio::time::timeout(idle, stream.read_exact(&mut query)).await {
            Err(_) => return Err(ConnEnd::Idle(idle)),
            Ok(r) => r?,
        };
        if !answer_guarded(
            &mut answerer,
            &query,
            peer.ip(),
            Transport::Tcp,
            &snapshot,
            Instant::now(),
            &mut out,
        ) {
            close_gracefully(&mut stream, idle).await;
            return Err(ConnEnd::NotAQuery);
        }
        // One write per reply: length and message in one segment.
        frame.clear();
        frame.extend_from_slice(&(out.len() as u16).to_be_bytes());
        frame.extend_from_slice(&out);
        match tokio::time::timeout(idle, stream.write_all(&frame)).await {
            Err(_) => return Err(ConnEnd::Idle(idle)),
            Ok(r) => r?,
        }
    }
}

/// Ends a connection the server gives up on while the client may still be
/// sending (pipelined queries after a message that is not one): our
/// side is shut down first, so the replies already written go out and are
/// followed by a FIN, then what the client sends is read and dropped until
/// it closes too, for at most `patience`. Dropping the socket with bytes
/// unread would send a reset instead, and a reset can cost the client the
/// replies still on their way (QA saw it mid-pipeline).
async fn close_gracefully<S>(stream: &mut S, patience: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let drain = async {
        if stream.shutdown().await.is_err() {
            return;
        }
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(patience, drain).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn bind_errors_name_their_cause_once() {
        use std::error::Error;
        let addr: std::net::SocketAddr = "127.0.0.1:53".parse().unwrap();
        for e in [
            super::BindError::Udp {
                addr,
                cause: std::io::ErrorKind::AddrInUse.into(),
            },
            super::BindError::Tcp {
                addr,
                cause: std::io::ErrorKind::AddrInUse.into(),
            },
        ] {
            // `{:#}` chains append each source: none may repeat the message.
            assert!(e.source().is_none(), "{e}");
            assert!(e.to_string().contains("address in use"), "{e}");
        }
    }

    use super::*;

    fn settings(listen: SocketAddr, udp_workers: usize) -> ServerSettings {
        ServerSettings {
            listen,
            tcp_idle_timeout: Duration::from_secs(1),
            tcp_max_connections: 1,
            udp_workers,
            udp_batch_scheduling: true,
        }
    }

    fn int_option(socket: &std::net::UdpSocket, level: libc::c_int, name: libc::c_int) -> i32 {
        use std::os::fd::AsRawFd;
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: an int option read into `value`, `len` its size.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        value
    }

    #[test]
    fn udp_replies_are_never_fragmented_over_ipv4_or_ipv6() {
        let v4 = DnsServer::bind(settings("127.0.0.1:0".parse().unwrap(), 2)).unwrap();
        for socket in &v4.udp {
            assert_eq!(
                int_option(socket, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
                libc::IP_PMTUDISC_PROBE
            );
        }
        let Ok(v6) = DnsServer::bind(settings("[::1]:0".parse().unwrap(), 1)) else {
            return; // no IPv6 on this host
        };
        for socket in &v6.udp {
            assert_eq!(
                int_option(socket, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER),
                libc::IPV6_PMTUDISC_PROBE
            );
        }
    }

    #[test]
    fn every_udp_worker_socket_shares_the_address() {
        let server = DnsServer::bind(settings("127.0.0.1:0".parse().unwrap(), 3)).unwrap();
        let addr = server.udp_addr().unwrap();
        assert_eq!(server.udp.len(), 3);
        for socket in &server.udp {
            assert_eq!(socket.local_addr().unwrap(), addr);
        }
        assert_eq!(server.tcp_addr().unwrap().port(), addr.port());
    }

    /// How many of `sent` datagrams each socket of `udp` received (read
    /// without blocking until every datagram is accounted for).
    fn received_per_socket(udp: &[std::net::UdpSocket], sent: usize) -> Vec<usize> {
        for socket in udp {
            socket.set_nonblocking(true).unwrap();
        }
        let mut counts = vec![0; udp.len()];
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        while counts.iter().sum::<usize>() < sent {
            assert!(Instant::now() < deadline, "received {counts:?} of {sent}");
            for (socket, count) in udp.iter().zip(&mut counts) {
                while socket.recv(&mut buf).is_ok() {
                    *count += 1;
                }
            }
            std::thread::yield_now();
        }
        counts
    }

    /// One client socket (one 4-tuple, which the kernel's default hash sends
    /// to one socket every time) reaches every worker's socket, also after a
    /// takeover that adds sockets to the group.
    #[test]
    fn datagrams_of_one_client_reach_every_udp_worker() {
        let server = DnsServer::bind(settings("127.0.0.1:0".parse().unwrap(), 2)).unwrap();
        let addr = server.udp_addr().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let send = |count: usize| {
            for _ in 0..count {
                client.send_to(b"query", addr).unwrap();
            }
        };
        send(200);
        let counts = received_per_socket(&server.udp, 200);
        assert!(counts.iter().all(|&n| n > 0), "{counts:?}");

        let DnsServer { udp, tcp, .. } = server;
        let taken = DnsServer::from_sockets(udp, tcp, settings(addr, 4)).unwrap();
        assert_eq!(taken.udp.len(), 4);
        send(400);
        let counts = received_per_socket(&taken.udp, 400);
        assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
    }

    /// Fuzzing the TCP framing (RFC 7766) with what a client can send over
    /// one connection: length-prefixed frames, some whole queries, some
    /// garbage, some lengths with nothing or too little after them, arriving
    /// in arbitrary pieces, then the client half-closes. Properties: no
    /// panic, no hang (the connection ends once the client is done), and
    /// what comes back is a sequence of whole frames, each a decodable
    /// response, no more of them than frames sent. Runs for
    /// `EDGEPROXY_FUZZ_SECS` (default 10) under `cargo test`; see
    /// `dns/tests/fuzz_dns.rs` for the datagram targets.
    #[test]
    fn tcp_framing_keeps_its_contract_whatever_the_client_sends() {
        use bolero::{check, TypeGenerator};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        #[derive(Debug, TypeGenerator)]
        enum Frame {
            /// A query for `<label>.internal`, framed correctly.
            Query {
                id: u16,
                label: u8,
            },
            /// Any bytes, framed correctly.
            Framed(Vec<u8>),
            /// A length, then whatever follows.
            Length(u16),
            Raw(Vec<u8>),
        }

        let budget = std::env::var("EDGEPROXY_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10u64);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let zone = crate::ZoneConfig::new("internal", 5, "sa", Vec::new(), Vec::new()).unwrap();
        let geo =
            engine::geo::GeoResolver::new(Vec::new(), None, engine::geo::RegionMap::default());
        let answerer = Answerer::new(Arc::new(zone), Arc::new(geo));
        let snapshot =
            SnapshotHandle::new(engine::snapshot::SnapshotBuilder::new().build(&[]).snapshot);
        check!()
            .with_test_time(Duration::from_secs(budget))
            .with_type::<(Vec<Frame>, Vec<u8>)>()
            .for_each(|(frames, pieces)| {
                let mut input = Vec::new();
                for f in frames {
                    match f {
                        Frame::Query { id, label } => {
                            let mut q = id.to_be_bytes().to_vec();
                            q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1]);
                            q.push(b'a' + label % 26);
                            q.extend_from_slice(b"\x08internal\x00\x00\x01\x00\x01");
                            input.extend_from_slice(&(q.len() as u16).to_be_bytes());
                            input.extend_from_slice(&q);
                        }
                        Frame::Framed(bytes) => {
                            input.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
                            input.extend_from_slice(bytes);
                        }
                        Frame::Length(n) => input.extend_from_slice(&n.to_be_bytes()),
                        Frame::Raw(bytes) => input.extend_from_slice(bytes),
                    }
                }
                let answerer = answerer.clone();
                let snapshot = snapshot.clone();
                runtime.block_on(async move {
                    let (mut client, server) = tokio::io::duplex(4096);
                    let peer: SocketAddr = "127.0.0.1:5300".parse().unwrap();
                    let served = tokio::spawn(serve_connection(
                        server,
                        peer,
                        answerer,
                        snapshot,
                        Duration::from_secs(30),
                    ));
                    let (mut rx, mut tx) = tokio::io::split(&mut client);
                    let write = async {
                        let mut at = 0;
                        let mut sizes = pieces.iter().map(|p| *p as usize + 1).cycle();
                        while at < input.len() {
                            let n = sizes.next().unwrap_or(input.len()).min(input.len() - at);
                            // The server may have closed: later writes fail.
                            if tx.write_all(&input[at..at + n]).await.is_err() {
                                break;
                            }
                            at += n;
                        }
                        let _ = tx.shutdown().await;
                    };
                    let read = async {
                        let mut out = Vec::new();
                        let _ = rx.read_to_end(&mut out).await;
                        out
                    };
                    let session = async { tokio::join!(write, read).1 };
                    let out = tokio::time::timeout(Duration::from_secs(20), session)
                        .await
                        .expect("the connection did not end after the client did");
                    let _ = served.await;
                    // Whole frames, each a response.
                    let mut rest = out.as_slice();
                    let mut replies = 0;
                    while !rest.is_empty() {
                        assert!(rest.len() >= 2, "a partial length in the output");
                        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                        assert!(rest.len() >= 2 + len, "a partial frame in the output");
                        let reply = hickory_proto::op::Message::from_vec(&rest[2..2 + len])
                            .expect("an undecodable reply");
                        assert_eq!(
                            reply.metadata.message_type,
                            hickory_proto::op::MessageType::Response
                        );
                        rest = &rest[2 + len..];
                        replies += 1;
                    }
                    // Not the frames built as such: a Length swallows what
                    // follows, and a Length followed by Raw bytes (or Raw
                    // bytes alone) can make a whole frame, which deserves its
                    // reply (FORMERR at least). The bound is every whole frame
                    // in the stream as the server reads it.
                    let whole = whole_frames(&input);
                    assert!(
                        replies <= whole,
                        "{replies} replies to {whole} whole frames in the input"
                    );
                });
            });
    }

    /// Whole length-prefixed frames at the start of `stream`, read the way
    /// the server reads them (up to the first incomplete one).
    fn whole_frames(mut stream: &[u8]) -> usize {
        let mut frames = 0;
        while stream.len() >= 2 {
            let len = u16::from_be_bytes([stream[0], stream[1]]) as usize;
            if stream.len() < 2 + len {
                break;
            }
            stream = &stream[2 + len..];
            frames += 1;
        }
        frames
    }

    #[test]
    fn whole_frames_counts_frames_made_of_any_pieces() {
        assert_eq!(whole_frames(&[]), 0);
        assert_eq!(whole_frames(&[0, 2, 7, 7, 0, 0, 0, 3, 1]), 2);
        // A length and raw bytes that happen to complete it are a frame.
        assert_eq!(whole_frames(&[0, 1, 9, 0]), 1);
    }

    #[test]
    fn taken_over_sockets_are_all_kept_and_more_join_when_asked() {
        let first = DnsServer::bind(settings("127.0.0.1:0".parse().unwrap(), 3)).unwrap();
        let addr = first.udp_addr().unwrap();
        let tcp_addr = first.tcp_addr().unwrap();
        // Fewer workers asked than sockets inherited: every socket is kept.
        let again = DnsServer::from_sockets(first.udp, first.tcp, settings(addr, 1)).unwrap();
        assert_eq!(again.udp.len(), 3);
        assert_eq!(again.tcp_addr().unwrap(), tcp_addr);
        // More asked: they join the same group.
        let more = DnsServer::from_sockets(again.udp, again.tcp, settings(addr, 5)).unwrap();
        assert_eq!(more.udp.len(), 5);
        for socket in &more.udp {
            assert_eq!(socket.local_addr().unwrap(), addr);
        }
        let (udp, _tcp) = more.sockets();
        assert_eq!(udp.len(), 5);
    }

    #[test]
    fn an_address_in_use_by_another_server_is_refused() {
        let first = DnsServer::bind(settings("127.0.0.1:0".parse().unwrap(), 2)).unwrap();
        let addr = first.udp_addr().unwrap();
        // Without the probe, SO_REUSEPORT would let this join `first`'s group.
        let err = DnsServer::bind(settings(addr, 2)).unwrap_err();
        assert!(matches!(err, BindError::Udp { .. }), "{err}");
    }
}
