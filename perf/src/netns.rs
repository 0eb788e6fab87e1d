//! The suite's own network namespace, where the kernel's TIME_WAIT table
//! and the congestion control are the same for every target.
//!
//! Why: a connection per request (scenarios c, o's flood, f's handshakes)
//! leaves a TIME_WAIT socket per closed connection, up to the namespace's
//! `tcp_max_tw_buckets` (131,072 on the project's VMs); past it the kernel
//! creates none. A run that starts with room in that table pays for
//! creating them, and its connects' SYNs meet them (each one found is
//! killed on the spot); a run that starts with it full pays for neither.
//! Which run starts with room depended on the runs before it: the first
//! target of a connection scenario after the keep-alive ones, and (inferred) whichever
//! run came 60 s after a fill, when its sockets all expired at once. One
//! target's run then cost 1–3 % more per connection than the same target's
//! next run (measured 2026-12-06: README, "The TIME_WAIT table"), as much as
//! the goals' margins. A busy proxy host that accepts more than 131,072
//! connections a minute runs with the table full, so the suite takes that
//! state for every run: in a namespace of its own, with
//! `tcp_max_tw_buckets` 0, where no socket enters TIME_WAIT. The host's
//! settings are untouched (but for a moment, see [`congestion_control`]), and
//! the namespace goes with the process. The
//! namespace also fixes the congestion control ([`CONGESTION_CONTROL`]).

use std::io;
use std::os::fd::AsRawFd;

/// The congestion control of every connection in the suite's namespace,
/// whatever the host's default. Why: the VMs here default to BBR, whose
/// pacing on loopback held every proxy's bulk flows to 1.5–2 GB/s and,
/// now and then, reordered a flow's segments across the two CPUs' backlogs
/// until spurious retransmissions cut one run of one target to 100 MB/s
/// (README, "Congestion control on loopback"). CUBIC, the kernel's
/// default, paces nothing: the proxies' own costs decide the figures.
pub const CONGESTION_CONTROL: &str = "cubic";

/// Where the suite's sockets are.
pub enum Network {
    /// A namespace of its own: loopback up, no TIME_WAIT, CUBIC.
    Own,
    /// The host's, for the reason given.
    Host(String),
}

impl Network {
    /// One line for the report.
    pub fn describe(&self) -> String {
        match self {
            Network::Own => format!(
                "network: the suite's own network namespace (loopback), \
                 tcp_max_tw_buckets 0: no run meets TIME_WAIT sockets the runs \
                 before it left (README, \"The TIME_WAIT table\"); congestion \
                 control {CONGESTION_CONTROL} (README, \"Congestion control on loopback\")"
            ),
            Network::Host(why) => format!(
                "network: the host's namespace ({why}): a run's cost per connection \
                 depends on how full the runs before it left the TIME_WAIT table, \
                 and connections use the host's congestion control"
            ),
        }
    }
}

/// Moves this process into a new network namespace with its loopback up,
/// no TIME_WAIT and [`CONGESTION_CONTROL`]; when that cannot be done, stays in (or goes back to)
/// the host's. An error only when it can do neither. Call before any
/// thread starts: a namespace is per thread, and threads started later
/// inherit their creator's.
pub fn isolate() -> anyhow::Result<Network> {
    let host = match std::fs::File::open("/proc/thread-self/ns/net") {
        Ok(f) => f,
        Err(e) => {
            return Ok(Network::Host(format!(
                "cannot open /proc/thread-self/ns/net: {e}"
            )))
        }
    };
    // SAFETY: unshare with a flag only; the process is still one thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Ok(Network::Host(match e.raw_os_error() {
            Some(libc::EPERM) => "a namespace of its own needs root".into(),
            _ => format!("cannot make a network namespace: {e}"),
        }));
    }
    let set_up = loopback_up()
        .map_err(|e| format!("cannot bring loopback up: {e}"))
        .and_then(|()| sysctl("tcp_max_tw_buckets", "0"))
        .and_then(|()| congestion_control(&host));
    let Err(why) = set_up else {
        return Ok(Network::Own);
    };
    // SAFETY: setns to the namespace this thread was in, still open.
    if unsafe { libc::setns(host.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // Nothing would reach anything here: better not to run at all.
        anyhow::bail!(
            "{why}; and cannot go back to the host's network namespace: {}",
            io::Error::last_os_error()
        );
    }
    Ok(Network::Host(why))
}

fn sysctl(name: &str, value: &str) -> Result<(), String> {
    std::fs::write(format!("/proc/sys/net/ipv4/{name}"), value)
        .map_err(|e| format!("cannot set {name}: {e}"))
}

/// Sets this namespace's congestion control to [`CONGESTION_CONTROL`].
///
/// Outside the host's namespace the kernel takes only an algorithm in
/// `tcp_allowed_congestion_control`, a list only the host's namespace can
/// change, and some hosts leave CUBIC out of it (the project's AMD VMs:
/// `reno bbr`), so the suite fell back to the host's namespace, its
/// TIME_WAIT table and BBR. Then CUBIC is allowed in the host's namespace
/// (`host`) for the moment this namespace takes it and the host's list is
/// put back: the list only decides which algorithm a namespace or an
/// unprivileged socket may choose, and this namespace keeps its choice.
fn congestion_control(host: &std::fs::File) -> Result<(), String> {
    let Err(refused) = sysctl("tcp_congestion_control", CONGESTION_CONTROL) else {
        return Ok(());
    };
    let ours = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("{refused}; cannot open this namespace: {e}"))?;
    let allowed_path = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";
    in_namespace(host, || {
        let allowed = std::fs::read_to_string(allowed_path)
            .map_err(|e| format!("cannot read tcp_allowed_congestion_control: {e}"))?;
        let allowed = allowed.trim();
        let with_ours = format!("{allowed} {CONGESTION_CONTROL}");
        std::fs::write(allowed_path, &with_ours)
            .map_err(|e| format!("{refused}; cannot allow it in the host's namespace: {e}"))?;
        let set = in_namespace(&ours, || {
            sysctl("tcp_congestion_control", CONGESTION_CONTROL)
        });
        let restored = std::fs::write(allowed_path, allowed).map_err(|e| {
            format!("cannot put back the host's tcp_allowed_congestion_control ({allowed:?}): {e}")
        });
        set.and(restored)
    })
}

/// Runs `f` in the network namespace `ns`, then goes back to the one this
/// thread was in.
fn in_namespace<T>(ns: &std::fs::File, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let here = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("cannot open this namespace: {e}"))?;
    // SAFETY: setns with an open namespace descriptor; it moves this thread
    // only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "cannot enter a namespace: {}",
            io::Error::last_os_error()
        ));
    }
    let result = f();
    // SAFETY: as above, back to the namespace opened first.
    if unsafe { libc::setns(here.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "cannot go back to the suite's namespace: {}",
            io::Error::last_os_error()
        ));
    }
    result
}

/// `ip link set lo up`, with the two ioctls it makes.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket for the ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; zeroed is its empty value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS read and write `req`'s flags.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            match libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        }
    };
    // SAFETY: the socket opened above.
    unsafe { libc::close(fd) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

    fn read(path: &str) -> String {
        std::fs::read_to_string(path).unwrap().trim().to_string()
    }

    /// On a host whose allowed list leaves CUBIC out (the project's AMD
    /// VMs), the suite still gets a namespace of its own with CUBIC, and the
    /// host's list is as it was afterwards.
    #[test]
    fn the_suite_takes_cubic_where_the_host_does_not_allow_it() {
        // SAFETY: no arguments, no side effects.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(
            uid, 0,
            "this test changes a host sysctl and needs root (CI runs as root)"
        );
        let host_list = read(ALLOWED);
        let without: Vec<&str> = host_list
            .split_whitespace()
            .filter(|name| *name != CONGESTION_CONTROL)
            .collect();
        let without = match without.is_empty() {
            true => "reno".to_string(),
            false => without.join(" "),
        };
        std::fs::write(ALLOWED, &without).unwrap();
        // A thread of its own: a network namespace is per thread, and this
        // one's ends with it.
        let inside = std::thread::spawn(|| {
            let network = isolate().map_err(|e| e.to_string())?;
            Ok::<_, String>((
                matches!(network, Network::Own),
                network.describe(),
                read("/proc/sys/net/ipv4/tcp_congestion_control"),
                read("/proc/sys/net/ipv4/tcp_max_tw_buckets"),
            ))
        })
        .join()
        .unwrap();
        let after = read(ALLOWED);
        std::fs::write(ALLOWED, &host_list).unwrap();
        let (own, described, congestion, tw_buckets) = inside.unwrap();
        assert!(own, "{described}");
        assert_eq!(congestion, CONGESTION_CONTROL);
        assert_eq!(tw_buckets, "0");
        assert_eq!(after, without, "the host's allowed list was not put back");
    }
}
