//! ICMPv6 echo through the mesh: one socket for every peer, bound to this
//! POP's 6PN address so that the requests leave from it (and the answers,
//! routed back to this POP's /64 by the peer, come back through the
//! tunnel).
//!
//! The socket is an unprivileged ICMPv6 ping socket (`SOCK_DGRAM` +
//! `IPPROTO_ICMPV6`: allowed when the process's group is in
//! `net.ipv4.ping_group_range`; the kernel picks the echo identifier and
//! hands this socket only the answers carrying it) or, failing that, a raw
//! ICMPv6 socket (`CAP_NET_RAW`; it sees every ICMPv6 packet to the bound
//! address, so answers are told apart by identifier and an 8-byte token in
//! the payload). Either way the kernel fills in the checksum.

use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;
/// Type, code, checksum, identifier, sequence, then the token.
const PACKET_LEN: usize = 8 + 8;

/// Which socket the probes go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// `SOCK_DGRAM` ICMPv6 (no privilege; `net.ipv4.ping_group_range`).
    Ping,
    /// `SOCK_RAW` ICMPv6 (`CAP_NET_RAW`).
    Raw,
}

impl SocketKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SocketKind::Ping => "ping socket",
            SocketKind::Raw => "raw socket",
        }
    }
}

/// Why there is no socket to probe with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error(
        "no ICMPv6 ping socket ({ping}: this process's group is not in \
         net.ipv4.ping_group_range?) and no raw ICMPv6 socket ({raw}: no CAP_NET_RAW?)"
    )]
    NoSocket { ping: io::Error, raw: io::Error },
    #[error("cannot register the ICMPv6 socket with the runtime: {0}")]
    Register(io::Error),
}

/// The answer to a probe: who answered, to which sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    pub from: Ipv6Addr,
    pub seq: u16,
}

/// An echo request with `ident`, `seq` and `token` (checksum left to the
/// kernel).
pub fn echo_request(ident: u16, seq: u16, token: [u8; 8]) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0] = ECHO_REQUEST;
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(&token);
    p
}

/// The sequence number of `packet` (an ICMPv6 message, no IPv6 header) if
/// it is an echo reply to one of this socket's requests.
pub fn echo_reply_seq(packet: &[u8], ident: u16, token: [u8; 8]) -> Option<u16> {
    if packet.len() < PACKET_LEN || packet[0] != ECHO_REPLY || packet[1] != 0 {
        return None;
    }
    if packet[4..6] != ident.to_be_bytes() || packet[8..16] != token {
        return None;
    }
    Some(u16::from_be_bytes([packet[6], packet[7]]))
}

/// The probes' socket, on the current Tokio runtime.
pub struct Pinger {
    socket: AsyncFd<Socket>,
    kind: SocketKind,
    /// The echo identifier: the kernel's for a ping socket (known once
    /// bound), ours for a raw one.
    ident: u16,
    token: [u8; 8],
    bound: bool,
}

impl Pinger {
    /// A ping socket, else a raw one (not bound yet: see [`Pinger::bind`]).
    pub fn open() -> Result<Pinger, OpenError> {
        let open = |ty: Type| -> io::Result<Socket> {
            let s = Socket::new(Domain::IPV6, ty, Some(Protocol::ICMPV6))?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        let (socket, kind) = match open(Type::DGRAM) {
            Ok(s) => (s, SocketKind::Ping),
            Err(ping) => match open(Type::RAW) {
                Ok(s) => (s, SocketKind::Raw),
                Err(raw) => return Err(OpenError::NoSocket { ping, raw }),
            },
        };
        // SAFETY: the `Socket` owns its descriptor, and the `AsyncFd` owns
        // the `Socket`: the descriptor is neither closed nor replaced while
        // registered.
        let socket = unsafe { AsyncFd::register(socket) }
            .map_err(|e| OpenError::Register(e.into_parts().1))?;
        Ok(Pinger {
            socket,
            kind,
            ident: rand::random(),
            token: rand::random(),
            bound: false,
        })
    }

    pub fn kind(&self) -> SocketKind {
        self.kind
    }

    pub fn is_bound(&self) -> bool {
        self.bound
    }

    /// Binds to `source` (this POP's 6PN address). Fails with
    /// `EADDRNOTAVAIL` while the address is not configured: call again.
    pub fn bind(&mut self, source: Ipv6Addr) -> io::Result<()> {
        let sock = self.socket.get_ref();
        sock.bind(&SockAddr::from(SocketAddrV6::new(source, 0, 0, 0)))?;
        if self.kind == SocketKind::Ping {
            // The kernel's identifier: it writes it into every request and
            // only hands this socket answers that carry it.
            self.ident = sock
                .local_addr()?
                .as_socket_ipv6()
                .map(|a| a.port())
                .ok_or_else(|| io::Error::other("the ping socket has no IPv6 address"))?;
        }
        self.bound = true;
        Ok(())
    }

    /// Sends one echo request to `to` (never waits: a full socket buffer
    /// is an error, and the probe is lost).
    pub fn send(&self, to: Ipv6Addr, seq: u16) -> io::Result<()> {
        let packet = echo_request(self.ident, seq, self.token);
        self.socket
            .get_ref()
            .send_to(&packet, &SockAddr::from(SocketAddrV6::new(to, 0, 0, 0)))
            .map(|_| ())
    }

    /// The next answer to one of this socket's requests (anything else
    /// that arrives is skipped).
    pub async fn recv(&self) -> io::Result<Echo> {
        let mut buf = [0u8; 256];
        loop {
            let mut guard = self.socket.readable().await?;
            let got = guard.try_io(|s| {
                rustix::net::recvfrom(s.get_ref(), &mut buf[..], rustix::net::RecvFlags::empty())
                    .map_err(io::Error::from)
            });
            let (len, _, from) = match got {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            let from = from.and_then(|a| SocketAddrV6::try_from(a).ok());
            let packet = &buf[..len.min(buf.len())];
            if let (Some(from), Some(seq)) = (from, echo_reply_seq(packet, self.ident, self.token))
            {
                return Ok(Echo {
                    from: *from.ip(),
                    seq,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: [u8; 8] = *b"6pnprobe";

    fn reply_to(request: &[u8]) -> Vec<u8> {
        let mut r = request.to_vec();
        r[0] = ECHO_REPLY;
        r[2] = 0xab; // a checksum, whatever it is
        r
    }

    #[test]
    fn an_echo_reply_to_our_request_gives_its_sequence() {
        let req = echo_request(0x1234, 0xbeef, TOKEN);
        assert_eq!(&req[..8], &[128, 0, 0, 0, 0x12, 0x34, 0xbe, 0xef]);
        assert_eq!(echo_reply_seq(&reply_to(&req), 0x1234, TOKEN), Some(0xbeef));
    }

    /// The real socket, on loopback: an address this host does not have
    /// cannot be bound yet (what the prober retries), and a ping to `::1`
    /// comes back as the answer to its sequence number (the request itself,
    /// which a raw socket sees too, is skipped).
    #[tokio::test]
    async fn a_ping_to_loopback_is_answered_and_a_missing_address_is_not_bound() {
        let mut pinger = match Pinger::open() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let not_here = Ipv6Addr::new(0xfd00, 0xdead, 0xbeef, 0, 0, 0, 0, 1);
        let err = pinger.bind(not_here).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{err}");
        assert!(!pinger.is_bound());
        pinger.bind(Ipv6Addr::LOCALHOST).unwrap();
        assert!(pinger.is_bound());
        pinger.send(Ipv6Addr::LOCALHOST, 4242).unwrap();
        let echo = tokio::time::timeout(std::time::Duration::from_secs(5), pinger.recv())
            .await
            .expect("no answer from ::1 within 5 s")
            .unwrap();
        assert_eq!(
            echo,
            Echo {
                from: Ipv6Addr::LOCALHOST,
                seq: 4242
            },
            "{}",
            pinger.kind().as_str()
        );
    }

    #[test]
    fn anything_else_is_no_answer() {
        let req = echo_request(7, 1, TOKEN);
        let mut other_token = reply_to(&req);
        other_token[15] ^= 1;
        let mut unreachable = reply_to(&req);
        unreachable[0] = 1;
        for (what, packet) in [
            ("the request itself", req.to_vec()),
            ("another identifier", reply_to(&echo_request(8, 1, TOKEN))),
            ("another token", other_token),
            ("not an echo reply", unreachable),
            ("truncated", reply_to(&req)[..12].to_vec()),
            ("empty", Vec::new()),
        ] {
            assert_eq!(echo_reply_seq(&packet, 7, TOKEN), None, "{what}");
        }
    }
}
