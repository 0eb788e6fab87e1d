//! Which socket of the UDP `SO_REUSEPORT` group a datagram goes to.
//!
//! The kernel's default picks by a hash of the 4-tuple, so every datagram
//! of one client socket reaches the same worker. With many clients that
//! averages out; with few (a handful of recursive resolvers in front of the
//! POP, or a load generator's eight sockets) the split is lumpy and
//! changes with the clients' random source ports: measured with `dns-bench`
//! (8 client sockets, 2 workers), the workers' CPU split was 39/39, 54/22,
//! 52/32 and 53/14 in four runs, and the run with the 4:1 split served the
//! fewest queries, its busy worker saturated while the other idled.
//!
//! A DNS query over UDP carries no state a worker keeps, so any worker can
//! answer any datagram: a classic BPF program (`SO_ATTACH_REUSEPORT_CBPF`)
//! sends each datagram to a socket drawn at random (`SKF_AD_RANDOM`, the
//! kernel's per-CPU pseudo-random generator), which spreads any number of
//! clients evenly. The program is the group's, not one socket's: attaching
//! it again (after a binary upgrade added sockets) replaces it.

use std::io;
use std::os::fd::AsRawFd;

use engine::cbpf::{self, insn, BPF_ALU_MOD_K, BPF_LD_W_ABS, BPF_RET_A, SKF_AD_OFF, SKF_AD_RANDOM};

/// `socket index = random() % sockets`.
fn random_program(sockets: u32) -> [libc::sock_filter; 3] {
    [
        insn(BPF_LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_RANDOM) as u32), // A = random u32
        insn(BPF_ALU_MOD_K, 0, 0, sockets),
        insn(BPF_RET_A, 0, 0, 0),
    ]
}

/// Spreads the datagrams for `socket`'s reuseport group over its `sockets`
/// members at random. A group of one needs nothing.
pub fn spread_at_random(socket: &impl AsRawFd, sockets: usize) -> io::Result<()> {
    if sockets <= 1 {
        return Ok(());
    }
    let sockets = u32::try_from(sockets)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many UDP sockets"))?;
    cbpf::attach_reuseport(socket, &random_program(sockets))
}
