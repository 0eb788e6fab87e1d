//! Batched UDP I/O (Linux `recvmmsg`/`sendmmsg`): one system call moves up to
//! [`BATCH`] datagrams each way, which is most of what a DNS server spends per
//! query. Readiness still comes from Tokio; the calls themselves never block
//! (the socket is non-blocking).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Bytes read per datagram. A longer query is cut (MSG_TRUNC) and, being
/// malformed then, answered with FORMERR; real queries are far smaller.
pub const SLOT: usize = 4096;

/// Receive and send buffers for one batch, reused for every batch.
pub struct Batch {
    bufs: Vec<[u8; SLOT]>,
    /// Bytes received per slot.
    lens: [usize; BATCH],
    peers: [libc::sockaddr_storage; BATCH],
    peer_lens: [libc::socklen_t; BATCH],
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

    /// Waits for datagrams and receives up to [`BATCH`] of them.
    pub async fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        socket
            .async_io(Interest::READABLE, || self.recv_now(socket.as_raw_fd()))
            .await
    }

    fn recv_now(&mut self, fd: i32) -> io::Result<usize> {
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
                libc::MSG_DONTWAIT,
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
        }
        Ok(n)
    }

    /// Sends `self.replies[..count]` to the peers of their slots. A reply the
    /// kernel refuses (for one peer) is skipped, never retried forever.
    pub async fn send(&mut self, socket: &UdpSocket, count: usize) {
        let mut done = 0;
        while done < count {
            let sent = socket
                .async_io(Interest::WRITABLE, || {
                    self.send_now(socket.as_raw_fd(), done, count)
                })
                .await;
            match sent {
                Ok(n) => done += n.max(1),
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
