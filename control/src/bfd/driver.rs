//! The BFD sessions' I/O: one thread of its own for every session, blocking
//! in `poll(2)` on the receive sockets and a wake-up socket, with the next
//! deadline as its timeout.
//!
//! Why a thread and not a task on the control runtime: BFD's promise is a
//! liveness answer within tens of milliseconds, and the control runtime is
//! one thread shared by the API, replication (anti-entropy batches, zstd),
//! health checks and the BGP sessions: any of them running long would
//! delay a packet the router counts on (QA once found the whole runtime
//! stalled behind a starved reload, `tests/starved_control.rs`).
//!
//! Sockets, RFC 5881: packets are received on UDP port 3784 (one socket
//! per address family in use) and only with a TTL / hop limit of 255
//! (§5: they cannot have come from further than the link); each session
//! sends from its own socket, bound to a source port in 49152–65535 (§4)
//! and the BGP session's local address, connected to the neighbor's port
//! 3784, TTL 255.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use super::packet::{diag, Control, ParseError, State};
use super::session::{HandedBfd, Session, Timers, Transition};

/// RFC 5881 §4.
pub const CONTROL_PORT: u16 = 3784;
const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// Datagrams read per socket per turn of the loop.
const RECV_BATCH: usize = 64;
/// How long a session may go without a packet from its neighbor before one
/// WARN says so (the router may not run BFD for this session at all).
const SILENT_NEIGHBOR_WARN: Duration = Duration::from_secs(10);

/// What the BGP session of a neighbor sees of its BFD session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BfdView {
    /// `None`: BFD is not running for this neighbor.
    pub state: Option<State>,
    /// Times the session went from Up to Down: the BGP session is reset at
    /// each.
    pub downs: u64,
}

/// One neighbor's BFD session to start.
#[derive(Debug)]
pub struct Neighbor {
    pub label: String,
    pub peer: IpAddr,
    /// The BGP session's source address; `None`: the kernel's choice.
    pub local: Option<IpAddr>,
    pub timers: Timers,
    pub view: watch::Sender<BfdView>,
    /// A binary upgrade's predecessor's session with this neighbor.
    pub inherited: Option<HandedBfd>,
}

/// The running sessions.
pub struct Bfd {
    wake: UnixDatagram,
    thread: JoinHandle<Vec<(IpAddr, HandedBfd)>>,
}

const STOP: u8 = b's';
const HAND_OFF: u8 = b'h';

impl Bfd {
    /// Opens the sockets and starts the thread. Fails when port 3784
    /// cannot be bound (another BFD daemon on this host) or a session's
    /// socket cannot be made.
    pub fn start(neighbors: Vec<Neighbor>) -> io::Result<Bfd> {
        let rx4 = neighbors
            .iter()
            .any(|n| n.peer.is_ipv4())
            .then(|| receive_socket(false))
            .transpose()?;
        let rx6 = neighbors
            .iter()
            .any(|n| n.peer.is_ipv6())
            .then(|| receive_socket(true))
            .transpose()?;
        let mut used = Vec::new();
        let now = Instant::now();
        let mut sessions = Vec::with_capacity(neighbors.len());
        for n in neighbors {
            let wanted_port = n.inherited.as_ref().map(|h| h.source_port);
            let (socket, source_port) = send_socket(n.peer, n.local, wanted_port)?;
            let session = match &n.inherited {
                Some(h) if h.state == State::Up => {
                    tracing::info!(neighbor = %n.label, "bfd: going on with the previous process's session (Up)");
                    Session::resume(n.timers, h, now)
                }
                _ => Session::new(n.timers, new_discriminator(&used), now),
            };
            used.push(session.my_discr());
            sessions.push(Live {
                label: n.label,
                peer: n.peer,
                socket,
                source_port,
                session,
                view: n.view,
                downs: 0,
                heard: false,
                warned_silent: false,
                warned_discard: false,
                started: now,
            });
        }
        let (wake, wake_rx) = UnixDatagram::pair()?;
        wake_rx.set_nonblocking(true)?;
        let thread = std::thread::Builder::new()
            .name("bfd".into())
            .spawn(move || {
                let mut l = Loop {
                    sessions,
                    rx4,
                    rx6,
                    wake: wake_rx,
                };
                l.publish_all();
                l.run()
            })?;
        Ok(Bfd { wake, thread })
    }

    /// Sends AdminDown on every session (the neighbor's BFD goes down
    /// without blaming the path) and ends the thread.
    pub fn stop(self) {
        let _ = self.wake.send(&[STOP]);
        let _ = self.thread.join();
    }

    /// A binary upgrade: ends the thread without a word to the neighbors
    /// and returns each session's state, by neighbor address, for the
    /// successor. Its sockets close here, so the successor can bind port
    /// 3784 and the sessions' source ports.
    pub fn hand_off(self) -> Vec<(IpAddr, HandedBfd)> {
        let _ = self.wake.send(&[HAND_OFF]);
        self.thread.join().unwrap_or_default()
    }
}

struct Live {
    label: String,
    peer: IpAddr,
    socket: Socket,
    source_port: u16,
    session: Session,
    view: watch::Sender<BfdView>,
    downs: u64,
    heard: bool,
    warned_silent: bool,
    /// A packet from the neighbor was discarded and said so once.
    warned_discard: bool,
    started: Instant,
}

struct Loop {
    sessions: Vec<Live>,
    rx4: Option<Socket>,
    rx6: Option<Socket>,
    wake: UnixDatagram,
}

impl Loop {
    fn run(&mut self) -> Vec<(IpAddr, HandedBfd)> {
        let mut buf = [0u8; 512];
        loop {
            let now = Instant::now();
            self.tick(now);
            let next = self
                .sessions
                .iter()
                .map(|s| s.session.poll_timeout())
                .min()
                .unwrap_or(now + Duration::from_secs(1));
            let wait = next.saturating_duration_since(Instant::now());
            // Round up: waking a millisecond early would only spin.
            let timeout_ms = wait.as_micros().div_ceil(1000).min(1000) as libc::c_int;
            let mut fds = vec![pollfd(self.wake.as_raw_fd())];
            for rx in [&self.rx4, &self.rx6].into_iter().flatten() {
                fds.push(pollfd(rx.as_raw_fd()));
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "bfd: poll failed; the sessions stop");
                    return Vec::new();
                }
                continue;
            }
            let mut cmd = [0u8; 1];
            if let Ok(1) = self.wake.recv(&mut cmd) {
                return self.end(cmd[0]);
            }
            for rx in [self.rx4.as_ref(), self.rx6.as_ref()].into_iter().flatten() {
                let fd = rx.as_raw_fd();
                // A bounded batch: a flood on port 3784 must not hold the
                // transmissions back (the rest waits for the next turn).
                for _ in 0..RECV_BATCH {
                    let Some((from, ttl, len)) = recv_with_ttl(fd, &mut buf) else {
                        break;
                    };
                    let now = Instant::now();
                    Self::receive(&mut self.sessions, from, ttl, &buf[..len], now);
                }
            }
        }
    }

    /// Timers, transmissions, and what changed.
    fn tick(&mut self, now: Instant) {
        for s in &mut self.sessions {
            s.session.handle_timeout(now);
            while let Some(p) = s.session.poll_transmit(now) {
                if let Err(e) = s.socket.send(&p.encode()) {
                    // A connected UDP socket reports the ICMP unreachable
                    // of an earlier packet here: the neighbor's BFD is not
                    // listening (yet). Its absence shows in the state.
                    tracing::debug!(neighbor = %s.label, error = %e, "bfd: send failed");
                }
            }
            if !s.heard
                && !s.warned_silent
                && !s.warned_discard
                && now.duration_since(s.started) >= SILENT_NEIGHBOR_WARN
            {
                s.warned_silent = true;
                tracing::warn!(neighbor = %s.label, after_secs = SILENT_NEIGHBOR_WARN.as_secs(),
                    "bfd: no BFD packet from the neighbor yet; is BFD on for this session on the router (BIRD: `bfd on` in its `protocol bgp` and a `protocol bfd {{}}`; FRR: `neighbor X bfd`)?");
            }
        }
        let changed: Vec<usize> = (0..self.sessions.len())
            .filter(|&i| self.sessions[i].note_transitions())
            .collect();
        for i in changed {
            self.publish(i);
        }
    }

    fn receive(
        sessions: &mut [Live],
        from: SocketAddr,
        ttl: Option<u8>,
        bytes: &[u8],
        now: Instant,
    ) {
        let from_ip = canonical(from.ip());
        // Discarded packets from a neighbor's own address are worth one
        // WARN: without it the session just never comes up, and the only
        // word would be "no BFD packet from the neighbor yet".
        let mut discard = |why: String| match sessions.iter_mut().find(|s| s.peer == from_ip) {
            Some(s) if !s.warned_discard => {
                s.warned_discard = true;
                tracing::warn!(neighbor = %s.label, %why,
                        "bfd: the neighbor's BFD packets are discarded; the session cannot come up");
            }
            _ => tracing::debug!(%from, %why, "bfd: packet discarded"),
        };
        if ttl != Some(255) {
            // RFC 5881 §5 (GTSM): not from this link.
            let ttl = ttl.map_or("unknown".into(), |t| t.to_string());
            return discard(format!(
                "TTL {ttl}, not 255: the neighbor is not on a shared link (multihop BFD is not supported)"
            ));
        }
        let p = match Control::parse(bytes) {
            Ok(p) => p,
            Err(e @ ParseError::Authenticated) => {
                return discard(format!("{e} (BFD authentication is not supported: turn it off for this session on the router)"));
            }
            Err(e) => return discard(e.to_string()),
        };
        let found = if p.your_discr != 0 {
            sessions
                .iter_mut()
                .find(|s| s.session.my_discr() == p.your_discr)
        } else {
            sessions.iter_mut().find(|s| s.peer == from_ip)
        };
        match found {
            // RFC 5881 §5 lets a session check the source: a packet for it
            // from elsewhere is not its neighbor's.
            Some(s) if s.peer == from_ip => {
                s.heard = true;
                s.session.handle_packet(now, &p);
                if let Some(q) = s.session.poll_transmit(now) {
                    let _ = s.socket.send(&q.encode());
                }
            }
            Some(s) => {
                tracing::debug!(%from, neighbor = %s.label, "bfd: packet discarded: from another address than the session's neighbor");
            }
            None => {
                tracing::debug!(%from, your_discr = p.your_discr, "bfd: packet discarded: no such session")
            }
        }
    }

    fn end(&mut self, cmd: u8) -> Vec<(IpAddr, HandedBfd)> {
        if cmd == HAND_OFF {
            return self
                .sessions
                .iter()
                .map(|s| (s.peer, s.session.hand_off(s.source_port)))
                .collect();
        }
        for s in &self.sessions {
            let p = Control {
                diag: diag::ADMIN_DOWN,
                state: State::AdminDown,
                poll: false,
                final_: false,
                cpi: false,
                demand: false,
                detect_mult: 3,
                my_discr: s.session.my_discr(),
                your_discr: s.session.your_discr(),
                desired_min_tx_us: 1_000_000,
                required_min_rx_us: 0,
                required_min_echo_rx_us: 0,
            };
            let _ = s.socket.send(&p.encode());
        }
        for s in &self.sessions {
            s.view.send_replace(BfdView::default());
        }
        Vec::new()
    }

    fn publish_all(&mut self) {
        for i in 0..self.sessions.len() {
            self.publish(i);
        }
    }

    fn publish(&mut self, i: usize) {
        let s = &self.sessions[i];
        let view = BfdView {
            state: Some(s.session.state()),
            downs: s.downs,
        };
        s.view
            .send_if_modified(|v| std::mem::replace(v, view) != view);
    }
}

impl Live {
    /// Logs the session's changes of state; true when there were some.
    fn note_transitions(&mut self) -> bool {
        let ts = self.session.take_transitions();
        for Transition {
            from,
            to,
            diag: why,
        } in &ts
        {
            match (from, to) {
                (_, State::Up) => {
                    tracing::info!(neighbor = %self.label, "bfd: session up")
                }
                (State::Up, State::Down) => {
                    self.downs += 1;
                    tracing::warn!(neighbor = %self.label, why = diag::describe(*why),
                        "bfd: session down; the BGP session with the neighbor is reset")
                }
                _ => tracing::debug!(neighbor = %self.label, from = from.name(), to = to.name(),
                    why = diag::describe(*why), "bfd: session state"),
            }
        }
        !ts.is_empty()
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn new_discriminator(used: &[u32]) -> u32 {
    loop {
        let d = fastrand::u32(1..);
        if !used.contains(&d) {
            return d;
        }
    }
}

/// The socket on port 3784 for one address family, reporting each
/// packet's TTL / hop limit.
fn receive_socket(v6: bool) -> io::Result<Socket> {
    let (domain, any) = if v6 {
        (Domain::IPV6, IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    } else {
        (Domain::IPV4, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    };
    let s = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(true)?;
        setsockopt_int(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVHOPLIMIT,
            1,
        )?;
    } else {
        setsockopt_int(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVTTL, 1)?;
    }
    s.bind(&SocketAddr::new(any, CONTROL_PORT).into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on UDP port {CONTROL_PORT} ({e}); is another BFD daemon running on this host?")))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A session's sending socket: TTL 255, a source port in 49152–65535
/// (`wanted` first: a predecessor's session keeps its port), connected to
/// the neighbor's port 3784.
fn send_socket(
    peer: IpAddr,
    local: Option<IpAddr>,
    wanted: Option<u16>,
) -> io::Result<(Socket, u16)> {
    let domain = if peer.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    if peer.is_ipv6() {
        s.set_unicast_hops_v6(255)?;
    } else {
        s.set_ttl_v4(255)?;
    }
    let ip = local.unwrap_or(match peer {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    let mut last = None;
    let tries = wanted
        .into_iter()
        .chain((0..64).map(|_| fastrand::u16(SOURCE_PORTS)));
    let mut bound = None;
    for port in tries {
        match s.bind(&SocketAddr::new(ip, port).into()) {
            Ok(()) => {
                bound = Some(port);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let port = bound.ok_or_else(|| {
        last.unwrap_or_else(|| io::Error::other("no free source port in 49152–65535"))
    })?;
    s.connect(&SocketAddr::new(peer, CONTROL_PORT).into())?;
    s.set_nonblocking(true)?;
    Ok((s, port))
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid descriptor and a c_int option of its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One datagram from a non-blocking socket: its source, its TTL / hop limit
/// (from `IP_TTL` / `IPV6_HOPLIMIT` control messages) and its length;
/// `None` when nothing is queued (or on an error, which the next poll
/// shows again).
fn recv_with_ttl(fd: RawFd, buf: &mut [u8]) -> Option<(SocketAddr, Option<u8>, usize)> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in `msg` is valid for its length for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return None;
    }
    let mut ttl = None;
    // SAFETY: the kernel filled `msg_control` with well-formed cmsgs up to
    // `msg_controllen`; CMSG_* walk them within it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
            if (level == libc::IPPROTO_IP && kind == libc::IP_TTL)
                || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_HOPLIMIT)
            {
                let v: libc::c_int = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                ttl = u8::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = sockaddr_to_std(&name)?;
    Some((from, ttl, n as usize))
}

fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => None,
    }
}
