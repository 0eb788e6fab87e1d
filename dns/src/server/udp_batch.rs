//! Batched UDP I/O (Linux `recvmmsg`/`sendmmsg`): one system call moves up to
//! [`BATCH`] datagrams each way, which is most of what a DNS server spends per
//! query.
//!
//! A worker waits for queries inside `recvmmsg` itself (a blocking socket,
//! `MSG_WAITFORONE`), not in an event loop: one system call per wake-up
//! instead of three (`epoll_wait`, the receive, and the receive that finds
//! the socket empty), and, with nothing registered on the socket while the
//! worker runs, the kernel skips the wake-up callback it otherwise runs for
//! every query that arrives (in the client's send) and every reply it frees
//! (in ours). The socket's file status is shared with whoever else holds
//! it (the other process during a binary upgrade), so a socket found
//! non-blocking is waited for with `poll` instead: either way the call
//! returns at least every [`WAIT`], for the worker to look at its stop
//! signal.
//!
//! On a socket bound to a wildcard address (`0.0.0.0`, `::`) each reply
//! leaves from the address its query was sent to: the kernel reports that
//! address with every datagram ([`want_destinations`]: `IP_PKTINFO`,
//! `IPV6_RECVPKTINFO`) and the reply names it as its source (RFC 1122
//! §4.1.3.5, RFC 2181 §4). Left to itself the kernel picks the source by
//! the route back to the client, and a client that asked another address
//! of the host (a second address on an interface, a loopback alias, a
//! mesh address) drops the reply as coming from a stranger: dig, kdig and
//! Unbound all did, and timed out.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Longest a receive (or a send waiting for room) blocks: how soon a worker
/// sees its stop signal when no query comes.
pub const WAIT: Duration = Duration::from_millis(100);
/// Bytes read per datagram. A longer query is cut (MSG_TRUNC) and, being
/// malformed then, answered with FORMERR; real queries are far smaller.
pub const SLOT: usize = 4096;

/// Control (ancillary data) buffer of one datagram, as `u64`s for the
/// alignment `cmsghdr` needs: room for one `in6_pktinfo` (40 bytes) and
/// then some.
type Control = [u64; 16];

/// The address a datagram was sent to, from its `IP_PKTINFO` or
/// `IPV6_PKTINFO` control message: the source its reply must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    V4(Ipv4Addr),
    /// The address, and the interface it came in on (which the reply keeps
    /// only for a link-local address: it means nothing elsewhere).
    V6(Ipv6Addr, u32),
}

/// Asks the kernel to report each datagram's destination address on
/// `socket` (bound to `addr`), so replies can leave from it. Only a
/// wildcard address needs it: a socket bound to one address replies from
/// that address anyway.
pub fn want_destinations(socket: &impl AsRawFd, addr: SocketAddr) -> io::Result<()> {
    if !addr.ip().is_unspecified() {
        return Ok(());
    }
    let (level, name) = match addr {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
    };
    let on: libc::c_int = 1;
    // SAFETY: an int option, passed by pointer with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receive and send buffers for one batch, reused for every batch.
pub struct Batch {
    bufs: Vec<[u8; SLOT]>,
    /// Bytes received per slot.
    lens: [usize; BATCH],
    peers: [libc::sockaddr_storage; BATCH],
    peer_lens: [libc::socklen_t; BATCH],
    /// Where each datagram was sent to, when the kernel said (see
    /// [`want_destinations`]).
    dests: [Option<Destination>; BATCH],
    /// Control buffers: received ones, then those of the replies.
    controls: [Control; BATCH],
    iovs: [libc::iovec; BATCH],
    msgs: [libc::mmsghdr; BATCH],
    /// Replies to send: (slot the query came in, reply bytes).
    pub replies: Vec<(usize, Vec<u8>)>,
}

// SAFETY: the raw pointers in `iovs`/`msgs` only ever point into this
// struct's own buffers and are rebuilt before every call.
unsafe impl Send for Batch {}

impl Batch {
    pub fn new() -> Box<Batch> {
        Box::new(Batch {
            bufs: vec![[0u8; SLOT]; BATCH],
            lens: [0; BATCH],
            // SAFETY: all-zero is a valid value for these C structs.
            peers: unsafe { zeroed() },
            peer_lens: [0; BATCH],
            dests: [None; BATCH],
            controls: [[0; 16]; BATCH],
            iovs: unsafe { zeroed() },
            msgs: unsafe { zeroed() },
            replies: (0..BATCH).map(|_| (0, Vec::with_capacity(512))).collect(),
        })
    }

    /// Datagram `i` of the last receive and its sender (`None` when the
    /// address family is not IP, which cannot happen on an IP socket).
    pub fn datagram(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        (
            &self.bufs[i][..self.lens[i].min(SLOT)],
            to_socket_addr(&self.peers[i], self.peer_lens[i]),
        )
    }

    /// Makes `socket` wait in [`Batch::recv`]: blocking, for at most
    /// [`WAIT`].
    pub fn prepare(socket: &UdpSocket) -> io::Result<()> {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(WAIT))
    }

    /// Waits (at most about [`WAIT`]) for datagrams and receives up to
    /// [`BATCH`] of them; `Ok(0)` when none came.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let fd = socket.as_raw_fd();
        match self.recv_now(fd, libc::MSG_WAITFORONE) {
            // Nothing within the receive timeout, or at once because the
            // other holder made the socket non-blocking: then wait the
            // other way.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !is_nonblocking(fd)? || !wait_for(fd, libc::POLLIN)? {
                    return Ok(0);
                }
                match self.recv_now(fd, libc::MSG_DONTWAIT) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    other => other,
                }
            }
            other => other,
        }
    }

    fn recv_now(&mut self, fd: i32, flags: libc::c_int) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: SLOT,
            };
            // SAFETY: a zeroed msghdr is valid; the fields that matter are
            // set below.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = (&mut self.peers[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.controls[i].as_mut_ptr().cast();
            hdr.msg_controllen = size_of::<Control>();
            self.msgs[i] = libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            };
        }
        // SAFETY: every pointer in `msgs` points into `self`, alive and
        // exclusively borrowed for the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = self.msgs[i].msg_len as usize;
            self.peer_lens[i] = self.msgs[i].msg_hdr.msg_namelen;
            // SAFETY: the header is the one the kernel just filled in, its
            // control buffer `self.controls[i]`.
            self.dests[i] = unsafe { destination_of(&self.msgs[i].msg_hdr) };
        }
        Ok(n)
    }

    /// Sends `self.replies[..count]` to the peers of their slots. A reply the
    /// kernel refuses (for one peer) is skipped, never retried forever; so
    /// are the replies still unsent when the socket has had no room for
    /// [`WAIT`].
    pub fn send(&mut self, socket: &UdpSocket, count: usize) {
        let fd = socket.as_raw_fd();
        let mut done = 0;
        while done < count {
            match self.send_now(fd, done, count) {
                Ok(n) => done += n.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match wait_for(fd, libc::POLLOUT) {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::debug!(
                                dropped = count - done,
                                "dns: udp send buffer full; replies dropped"
                            );
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "dns: udp send failed");
                            return;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "dns: udp send failed");
                    done += 1;
                }
            }
        }
    }

    fn send_now(&mut self, fd: i32, from: usize, to: usize) -> io::Result<usize> {
        let count = to - from;
        for k in 0..count {
            let (slot, ref reply) = self.replies[from + k];
            self.iovs[k] = libc::iovec {
                iov_base: reply.as_ptr() as *mut libc::c_void,
                iov_len: reply.len(),
            };
            // SAFETY: as in `recv_now`.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = (&mut self.peers[slot] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = self.peer_lens[slot];
            hdr.msg_iov = &mut self.iovs[k];
            hdr.msg_iovlen = 1;
            if let Some(dest) = self.dests[slot] {
                // The query's slot: its received control data is no
                // longer needed.
                // SAFETY: the buffer is `Control`, aligned and large
                // enough for one pktinfo message.
                unsafe { set_source(&mut hdr, &mut self.controls[slot], dest) };
            }
            self.msgs[k] = libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            };
        }
        // SAFETY: as in `recv_now`; the reply buffers are only read.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Whether `fd`'s open file is non-blocking (`O_NONBLOCK`).
fn is_nonblocking(fd: i32) -> io::Result<bool> {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & libc::O_NONBLOCK != 0)
}

/// Waits up to [`WAIT`] for `events` on `fd`: whether they came.
fn wait_for(fd: i32, events: libc::c_short) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one pollfd, alive for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, WAIT.as_millis() as libc::c_int) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(n > 0)
}

/// The destination address in a received message's `IP_PKTINFO` or
/// `IPV6_PKTINFO` control message, if it has one.
///
/// # Safety
/// `hdr` is a header `recvmsg` filled in, its control buffer still alive.
unsafe fn destination_of(hdr: &libc::msghdr) -> Option<Destination> {
    let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
    while !cmsg.is_null() {
        let c = &*cmsg;
        let data = libc::CMSG_DATA(cmsg);
        let len = c.cmsg_len as usize;
        match (c.cmsg_level, c.cmsg_type) {
            (libc::IPPROTO_IP, libc::IP_PKTINFO)
                if len >= libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize =>
            {
                let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                // The local address the datagram was for (for a unicast
                // query, its destination).
                let ip = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
                return Some(Destination::V4(ip));
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                if len >= libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as usize =>
            {
                let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                return Some(Destination::V6(ip, info.ipi6_ifindex));
            }
            _ => {}
        }
        cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
    }
    None
}

/// Makes `hdr` send from `dest`: one `IP_PKTINFO` or `IPV6_PKTINFO` control
/// message in `control`. The interface is left to routing (index 0) except
/// for an IPv6 link-local address, which only exists on its own.
///
/// # Safety
/// `control` stays alive (and unmoved) until the message is sent.
unsafe fn set_source(hdr: &mut libc::msghdr, control: &mut Control, dest: Destination) {
    *control = [0; 16];
    hdr.msg_control = control.as_mut_ptr().cast();
    let (level, kind, len) = match dest {
        Destination::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            size_of::<libc::in_pktinfo>(),
        ),
        Destination::V6(..) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            size_of::<libc::in6_pktinfo>(),
        ),
    };
    hdr.msg_controllen = libc::CMSG_SPACE(len as u32) as usize;
    let cmsg = libc::CMSG_FIRSTHDR(hdr);
    (*cmsg).cmsg_level = level;
    (*cmsg).cmsg_type = kind;
    (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
    let data = libc::CMSG_DATA(cmsg);
    match dest {
        Destination::V4(ip) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(ip).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            std::ptr::write_unaligned(data.cast::<libc::in_pktinfo>(), info);
        }
        Destination::V6(ip, ifindex) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                ipi6_ifindex: if ip.is_unicast_link_local() {
                    ifindex
                } else {
                    0
                },
            };
            std::ptr::write_unaligned(data.cast::<libc::in6_pktinfo>(), info);
        }
    }
}

fn to_socket_addr(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length say this is a sockaddr_in.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: family and length say this is a sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn prepared() -> (UdpSocket, UdpSocket) {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        Batch::prepare(&server).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        (server, client)
    }

    /// Waiting in the receive: queued datagrams come back in one call, and
    /// with none the call waits (no spinning) but returns, so the worker
    /// sees its stop signal.
    #[test]
    fn a_receive_takes_what_is_queued_and_waits_a_bounded_time_for_more() {
        let (server, client) = prepared();
        for q in [b"one", b"two"] {
            client.send(q).unwrap();
        }
        let mut batch = Batch::new();
        assert_eq!(batch.recv(&server).unwrap(), 2);
        assert_eq!(batch.datagram(1).0, b"two");

        let started = Instant::now();
        assert_eq!(batch.recv(&server).unwrap(), 0);
        let waited = started.elapsed();
        assert!(
            waited >= WAIT / 2,
            "returned after {waited:?}: it did not wait"
        );
        assert!(waited < 20 * WAIT, "waited {waited:?}");
    }

    /// The other process of a binary upgrade holds the same socket (one
    /// open file description) and may make it non-blocking under us: the
    /// receive then waits with `poll`, still for a bounded time, and still
    /// gets what comes.
    #[test]
    fn a_socket_its_other_holder_made_non_blocking_is_still_waited_for() {
        let (server, client) = prepared();
        server.try_clone().unwrap().set_nonblocking(true).unwrap();
        let mut batch = Batch::new();

        let started = Instant::now();
        assert_eq!(batch.recv(&server).unwrap(), 0);
        let waited = started.elapsed();
        assert!(waited >= WAIT / 2, "returned after {waited:?}: it spins");

        client.send(b"query").unwrap();
        assert_eq!(batch.recv(&server).unwrap(), 1);
        assert_eq!(batch.datagram(0).0, b"query");
    }

    /// Replies go out to the peers their queries came from.
    #[test]
    fn replies_reach_the_peers_of_their_queries() {
        let (server, first) = prepared();
        let second = UdpSocket::bind("127.0.0.1:0").unwrap();
        second.connect(server.local_addr().unwrap()).unwrap();
        first.send(b"q1").unwrap();
        second.send(b"q2").unwrap();
        let mut batch = Batch::new();
        // Loopback queues a datagram within its sender's call.
        assert_eq!(batch.recv(&server).unwrap(), 2);
        for slot in 0..2 {
            let reply = [batch.datagram(slot).0, b"!"].concat();
            batch.replies[slot] = (slot, reply);
        }
        batch.send(&server, 2);
        let mut buf = [0u8; 16];
        for (socket, want) in [(&first, &b"q1!"[..]), (&second, &b"q2!"[..])] {
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let n = socket.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], want);
        }
    }
}
