//! Classic BPF programs that pick a socket of an `SO_REUSEPORT` group
//! (`SO_ATTACH_REUSEPORT_CBPF`): the opcodes they use and the attach call.
//! The program's result indexes the group in the order its sockets joined;
//! an index past the group's end falls back to the kernel's own hash.
//! Used by the proxy's listeners (steering by client address) and the DNS
//! server's UDP workers (spreading datagrams at random).

use std::io;
use std::os::fd::AsRawFd;

// Opcodes (linux/filter.h: class | size | mode), spelled out to keep the
// programs readable. BPF_LD is class 0 and BPF_W size 0.
pub const BPF_LD_B_ABS: u16 = 0x10 | 0x20;
pub const BPF_LD_W_ABS: u16 = 0x20;
pub const BPF_ALU_RSH_K: u16 = 0x04 | 0x70;
pub const BPF_ALU_MUL_K: u16 = 0x04 | 0x20;
pub const BPF_ALU_MOD_K: u16 = 0x04 | 0x90;
pub const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
pub const BPF_JMP_JA: u16 = 0x05;
pub const BPF_RET_A: u16 = 0x06 | 0x10;
/// Offsets from here address the network (IP) header.
pub const SKF_NET_OFF: i32 = -0x100000;
/// Loads at `SKF_AD_OFF + n` read a kernel value, not packet bytes.
pub const SKF_AD_OFF: i32 = -0x1000;
/// A pseudo-random `u32` (the kernel's per-CPU generator).
pub const SKF_AD_RANDOM: i32 = 56;

pub fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Makes `program` the socket picker of `socket`'s reuseport group,
/// replacing any program the group had.
pub fn attach_reuseport(socket: &impl AsRawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?;
    let fprog = libc::sock_fprog {
        len,
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
