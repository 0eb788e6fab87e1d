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

// Classic BPF opcodes (linux/filter.h: class | size | mode), spelled out to
// keep the program readable. BPF_LD is class 0 and BPF_W size 0.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_ALU_MOD_K: u16 = 0x04 | 0x90;
const BPF_RET_A: u16 = 0x06 | 0x10;
/// Ancillary data: loads at `SKF_AD_OFF + n` read kernel values, not packet
/// bytes (linux/filter.h).
const SKF_AD_OFF: i32 = -0x1000;
const SKF_AD_RANDOM: i32 = 56;

fn insn(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// `socket index = random() % sockets`.
fn random_program(sockets: u32) -> [libc::sock_filter; 3] {
    [
        insn(BPF_LD_W_ABS, (SKF_AD_OFF + SKF_AD_RANDOM) as u32), // A = random u32
        insn(BPF_ALU_MOD_K, sockets),
        insn(BPF_RET_A, 0),
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
    let program = random_program(sockets);
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `program`, which outlives the call; the
    // kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
