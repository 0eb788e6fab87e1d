//! Listening sockets: one SO_REUSEPORT socket per shard for each listener,
//! all bound before any shard starts so that a bad address or a port in use
//! fails the start cleanly.
//!
//! **Steering.** The kernel spreads connections over a reuseport group by a
//! hash of the 4-tuple, so two connections from one client usually land on
//! different shards. To keep affinity bindings shard-local (no locks), a
//! classic BPF program (`SO_ATTACH_REUSEPORT_CBPF`) picks the socket from the
//! client's source address alone: every connection from one IP reaches the
//! same shard. The program's result indexes the group in the order the sockets
//! started listening, which is shard order here. If the kernel refuses the
//! program the group still works, unsteered, and the caller falls back to a
//! shared affinity table.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::cbpf::{
    self, insn, BPF_ALU_MOD_K, BPF_ALU_MUL_K, BPF_ALU_RSH_K, BPF_JMP_JA, BPF_JMP_JEQ_K,
    BPF_LD_B_ABS, BPF_LD_W_ABS, BPF_RET_A, SKF_NET_OFF,
};

/// Listen backlog per socket.
const BACKLOG: i32 = 4096;

/// A listener's sockets, one per shard, in shard order.
#[derive(Debug)]
pub struct BoundGroup {
    pub sockets: Vec<std::net::TcpListener>,
    /// The bound address (the real port when 0 was asked for).
    pub local_addr: SocketAddr,
    /// Whether connections are steered to shards by client address.
    pub steered: bool,
}

/// Fails with `AddrInUse` if anything listens on `addr` already — including
/// another process's `SO_REUSEPORT` sockets, which [`bind_group`] would
/// otherwise join silently and split traffic with. Port 0 is always free.
pub fn ensure_unused(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    // No SO_REUSEPORT: the bind conflicts with every listening socket on the
    // address. SO_REUSEADDR only lets it ignore TIME_WAIT leftovers.
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())
}

/// [`ensure_unused`], waiting up to `patience` for the address to be
/// released. A process killed a moment ago may still hold its listening
/// sockets: io_uring tears a dead process's ring down in a kernel worker,
/// after the process is gone, and the accepts it had pending keep their
/// sockets open until then. A start right after a crash (`kill -9`, then
/// systemd's `Restart=`) would otherwise be refused.
pub fn wait_until_unused(addr: SocketAddr, patience: Duration) -> io::Result<()> {
    let deadline = Instant::now() + patience;
    let mut logged = false;
    loop {
        match ensure_unused(addr) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                if !logged {
                    tracing::info!(%addr, patience_ms = patience.as_millis() as u64,
                        "address in use; waiting in case a process that just ended (or is handing over to this one) still holds it");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Binds `count` reuseport sockets on `addr` and tries to attach the steering
/// program.
pub fn bind_group(addr: SocketAddr, count: usize) -> io::Result<BoundGroup> {
    let mut sockets = Vec::with_capacity(count);
    let mut bind_addr = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        // Accepted sockets inherit TCP_NODELAY on Linux.
        socket.set_tcp_nodelay(true)?;
        socket.bind(&bind_addr.into())?;
        socket.listen(BACKLOG)?;
        if bind_addr.port() == 0 {
            // Every later socket joins the group on the port the kernel chose.
            bind_addr = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound address is not an IP socket"))?;
        }
        socket.set_nonblocking(true)?;
        sockets.push(std::net::TcpListener::from(socket));
    }
    // One socket needs no steering: every connection reaches the one shard.
    let steered = count <= 1 || attach_steering(&sockets[0], count as u32).is_ok();
    Ok(BoundGroup {
        local_addr: bind_addr,
        sockets,
        steered,
    })
}

/// Takes over sockets that already listen (handed over by the process this
/// one upgrades from) as a group for `shards` shards, binding nothing that
/// already exists. `sockets` must be in their `SO_REUSEPORT` group's order
/// (the order they started listening in), all on one address.
///
/// With as many sockets as shards, each shard gets one, as if bound here.
/// With more, shards serve several each (the caller deals them out by index).
/// With fewer, the missing ones are bound on the same address and join the
/// group after the inherited ones. Either way the steering program is
/// attached again for the group's new size, so a client's connections keep
/// reaching one socket.
pub fn adopt_group(sockets: Vec<std::net::TcpListener>, shards: usize) -> io::Result<BoundGroup> {
    let first = sockets
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no socket to adopt"))?;
    let local_addr = first.local_addr()?;
    for s in &sockets {
        let addr = s.local_addr()?;
        if addr != local_addr {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inherited sockets disagree on their address: {local_addr} and {addr}"),
            ));
        }
        let socket = socket2::SockRef::from(s);
        if !socket.is_listener()? || socket.r#type()? != Type::STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inherited socket on {addr} is not a listening TCP socket"),
            ));
        }
        s.set_nonblocking(true)?;
    }
    let mut sockets = sockets;
    while sockets.len() < shards {
        let socket = Socket::new(
            Domain::for_address(local_addr),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&local_addr.into())?;
        socket.listen(BACKLOG)?;
        socket.set_nonblocking(true)?;
        sockets.push(socket.into());
    }
    let count = sockets.len();
    let steered = count <= 1 || attach_steering(&sockets[0], count as u32).is_ok();
    Ok(BoundGroup {
        sockets,
        local_addr,
        steered,
    })
}

/// `shard = hash(client IP) % shards`: IPv4 source word, or the low word of an
/// IPv6 source (which for a dual-stack socket may still carry IPv4 packets,
/// hence the version check).
fn steering_program(shards: u32) -> [libc::sock_filter; 10] {
    let net = |off: i32| (SKF_NET_OFF + off) as u32;
    [
        insn(BPF_LD_B_ABS, 0, 0, net(0)),       // 0: A = version/IHL byte
        insn(BPF_ALU_RSH_K, 0, 0, 4),           // 1: A = IP version
        insn(BPF_JMP_JEQ_K, 2, 0, 6),           // 2: IPv6 → 5
        insn(BPF_LD_W_ABS, 0, 0, net(12)),      // 3: A = IPv4 source
        insn(BPF_JMP_JA, 0, 0, 1),              // 4: → 6
        insn(BPF_LD_W_ABS, 0, 0, net(8 + 12)),  // 5: A = low word of IPv6 source
        insn(BPF_ALU_MUL_K, 0, 0, 0x9E37_79B1), // 6: Fibonacci hash
        insn(BPF_ALU_RSH_K, 0, 0, 16),          // 7
        insn(BPF_ALU_MOD_K, 0, 0, shards),      // 8
        insn(BPF_RET_A, 0, 0, 0),               // 9: socket index
    ]
}

fn attach_steering(socket: &std::net::TcpListener, shards: u32) -> io::Result<()> {
    cbpf::attach_reuseport(socket, &steering_program(shards))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, TcpStream};

    /// Index of the socket in the group that has a pending connection.
    fn accepted_on(group: &BoundGroup) -> usize {
        loop {
            for (i, s) in group.sockets.iter().enumerate() {
                if s.accept().is_ok() {
                    return i;
                }
            }
            std::thread::yield_now();
        }
    }

    fn connect_from(src: Ipv4Addr, to: SocketAddr) -> TcpStream {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::new(IpAddr::V4(src), 0).into())
            .unwrap();
        socket.connect(&to.into()).unwrap();
        socket.into()
    }

    #[test]
    fn port_zero_binds_every_socket_to_one_port() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_ne!(group.local_addr.port(), 0);
        for s in &group.sockets {
            assert_eq!(s.local_addr().unwrap(), group.local_addr);
        }
    }

    /// A start waits for an address released a moment later (a process
    /// that just died), and still refuses one that stays in use.
    #[test]
    fn a_start_waits_for_an_address_released_within_its_patience() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = group.local_addr;
        let err = wait_until_unused(addr, Duration::from_millis(60)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let holder = std::thread::spawn(move || {
            // The holder lets go while the start waits.
            std::thread::sleep(Duration::from_millis(100));
            drop(group);
        });
        wait_until_unused(addr, Duration::from_secs(30)).unwrap();
        holder.join().unwrap();
    }

    #[test]
    fn a_running_reuseport_group_is_seen_as_in_use() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let err = ensure_unused(group.local_addr).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let free = group.local_addr;
        drop(group);
        ensure_unused(free).unwrap();
    }

    #[test]
    fn port_in_use_is_an_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind_group(taken.local_addr().unwrap(), 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn connections_from_one_client_ip_reach_one_socket() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 4).unwrap();
        assert!(group.steered, "kernel refused the steering program");
        let mut shards_seen = std::collections::HashSet::new();
        for last in 1..=40u8 {
            let src = Ipv4Addr::new(127, 0, 0, last);
            let first = {
                let _c = connect_from(src, group.local_addr);
                accepted_on(&group)
            };
            for _ in 0..5 {
                let _c = connect_from(src, group.local_addr);
                assert_eq!(accepted_on(&group), first, "client {src} moved shard");
            }
            shards_seen.insert(first);
        }
        // Different clients spread over the shards.
        assert!(shards_seen.len() >= 3, "{shards_seen:?}");
    }
}
