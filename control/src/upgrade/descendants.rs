//! Finding and killing every process a failed successor started, including
//! those that left its process group (`setsid`, a daemon's double fork).
//!
//! Killing the successor's process group misses a descendant that called
//! `setsid` or `setpgid`: it keeps the hand-off channel (and the sockets
//! queued in it) or inherited listening sockets open with nobody accepting.
//! The process tree is what a descendant cannot leave, except by being
//! orphaned: its parent exits and it is reparented to the nearest *child
//! subreaper* or to init, and its ancestry is lost. So:
//!
//! 1. For the whole attempt the old process is a child subreaper
//!    ([`Subreaper`]): an orphan of the successor's tree is reparented to
//!    us, not to init, and stays findable (`/proc/<pid>/stat` PPid).
//! 2. On failure, [`kill_tree`] walks `/proc` and SIGSTOPs every
//!    descendant, again and again until a walk finds none it has not
//!    stopped (a stopped process cannot fork, and its children stay its
//!    children); then SIGKILLs them all, waits for them to exit and reaps
//!    those reparented to us.
//!
//! Who counts as the successor's ([`tree`]): the successor and everything
//! whose parent chain leads to it, plus orphans reparented to us that
//! started no earlier than the successor and still carry its mark: its
//! process group (`pgid` = the successor's pid, which it leads) or a session
//! other than ours (they called `setsid`). Our own children (health-check
//! commands, each in a group of its own in our session; `wireguard-go`) are
//! never taken. The limits: an orphan that moved to another group of *our*
//! session with `setpgid` and whose parent exited before the freeze is
//! missed; and a daemon that an operator's health-check command started
//! under `setsid` and orphaned during an attempt that then fails would be
//! taken for the successor's.
//!
//! Being a subreaper has a cost: an orphan of any of our children (a job a
//! health-check command left running in the background) is reparented to
//! us during the attempt and stays our child after it. Nothing of ours
//! waits for it (waiting for *any* child would steal the exit status of
//! the children Tokio or `std` wait for), so when the attempt ends
//! [`Subreaper`]'s drop finds those adopted children ([`adopted`]: ours,
//! but in a process group neither ours nor led by themselves, which
//! nothing we spawn is) and a small thread reaps each one, by pid, when its
//! pidfd says it exited: no zombie is left behind. An adopted orphan that
//! leads its own group (it called `setsid`) looks like one of our own
//! children and is left alone: it stays a zombie once it exits, until this
//! process exits.
//!
//! Every signal goes through a pidfd opened after re-reading the process's
//! start time, so a pid reused by an unrelated process between the walk and
//! the signal is never hit.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How many `/proc` walks [`kill_tree`] makes at most before it kills what
/// it has (a tree that keeps forking faster than it is stopped).
const MAX_WALKS: usize = 100;

/// How long [`kill_tree`] waits for the killed processes to exit.
const EXIT_PATIENCE: Duration = Duration::from_secs(5);

/// One line of `/proc/<pid>/stat`, the fields that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub state: u8,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    /// Start time, in clock ticks after boot: with the pid, names one
    /// process for good.
    pub start: u64,
}

impl ProcStat {
    /// Parses a `/proc/<pid>/stat` line. The command name (field 2) may hold
    /// spaces and parentheses: fields are counted after its last `)`.
    pub fn parse(line: &str) -> Option<ProcStat> {
        let (head, rest) = line.rsplit_once(')')?;
        let pid = head.split_once(" (")?.0.trim().parse().ok()?;
        // rest: " S ppid pgrp session tty_nr tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime priority nice
        // num_threads itrealvalue starttime ..." (fields 3..).
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(ProcStat {
            pid,
            state: *f.first()?.as_bytes().first()?,
            ppid: f.get(1)?.parse().ok()?,
            pgid: f.get(2)?.parse().ok()?,
            sid: f.get(3)?.parse().ok()?,
            start: f.get(19)?.parse().ok()?,
        })
    }

    /// Reads `/proc/<pid>/stat`; `None` once the process is gone.
    pub fn read(pid: u32) -> Option<ProcStat> {
        let line = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        ProcStat::parse(&line)
    }

    fn zombie(&self) -> bool {
        matches!(self.state, b'Z' | b'X')
    }
}

/// Every process in `/proc` now (those that vanish while it is read are
/// left out).
fn all_processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(ProcStat::read)
        .collect()
}

/// The successor `root`'s processes among `table` (see the module
/// documentation), `root` included; `me` is this process. Pure.
pub fn tree(root: &ProcStat, me: &ProcStat, table: &[ProcStat]) -> Vec<ProcStat> {
    let mut children: HashMap<u32, Vec<&ProcStat>> = HashMap::new();
    for p in table {
        children.entry(p.ppid).or_default().push(p);
    }
    let adopted = children
        .get(&me.pid)
        .into_iter()
        .flatten()
        .copied()
        .filter(|p| {
            p.pid != root.pid && p.start >= root.start && (p.pgid == root.pid || p.sid != me.sid)
        });
    let mut out = vec![*root];
    let mut seen: HashSet<u32> = HashSet::from([root.pid, me.pid]);
    let mut queue: Vec<&ProcStat> = adopted.collect();
    queue.extend(children.get(&root.pid).into_iter().flatten().copied());
    while let Some(p) = queue.pop() {
        if !seen.insert(p.pid) {
            continue;
        }
        out.push(*p);
        queue.extend(children.get(&p.pid).into_iter().flatten().copied());
    }
    out
}

/// This process as a child subreaper while the guard lives (unless it
/// already was one: then it stays one).
pub struct Subreaper {
    set_here: bool,
}

impl Subreaper {
    pub fn enter() -> Subreaper {
        let mut was: libc::c_int = 0;
        // SAFETY: prctl(2) GET writes one int through the pointer, SET takes
        // a plain flag; both concern only this process.
        let set_here = unsafe {
            libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut was as *mut libc::c_int) == 0
                && was == 0
                && libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) == 0
        };
        if !set_here && was == 0 {
            let e = io::Error::last_os_error();
            tracing::warn!(error = %e, "upgrade: cannot become a child subreaper; a failed new process's orphans may survive it");
        }
        Subreaper { set_here }
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        if self.set_here {
            // SAFETY: as in `enter`.
            unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0 as libc::c_ulong) };
            // No orphan comes to us any more: those that did are all there.
            reap_adopted_when_they_exit();
        }
    }
}

/// The orphans reparented to us (`me`) among `table`: our children that
/// neither lead their process group nor share ours. Everything we spawn
/// does one or the other (health-check commands and the successor lead a
/// group of their own, `wireguard-go` stays in ours). Pure.
pub fn adopted(me: &ProcStat, table: &[ProcStat]) -> Vec<ProcStat> {
    table
        .iter()
        .filter(|p| p.ppid == me.pid && p.pgid != p.pid && p.pgid != me.pgid)
        .copied()
        .collect()
}

/// Reaps the orphans adopted so far that have exited already, during the
/// attempt (which may last minutes: a health check every 100 ms that leaves
/// a job behind would otherwise pile up zombies until it ends). Harmless
/// to the cleanup of a failed attempt: a zombie has no children left to
/// find, and the successor itself leads its group, so it is not taken.
pub fn reap_adopted_zombies() {
    let Some(me) = ProcStat::read(std::process::id()) else {
        return;
    };
    for p in adopted(&me, &all_processes()) {
        if p.zombie() {
            // By pidfd, like the reaper thread: it may be one of an earlier
            // attempt's orphans that a reaper thread holds too.
            if let Some(h) = Held::open(p) {
                reap(&h);
            }
        }
    }
}

/// Reaps each orphan adopted during the attempt once it exits, on a thread
/// that ends when the last one has.
fn reap_adopted_when_they_exit() {
    let Some(me) = ProcStat::read(std::process::id()) else {
        return;
    };
    let held: Vec<Held> = adopted(&me, &all_processes())
        .into_iter()
        .filter_map(Held::open)
        // Still our child (not reaped and its pid reused meanwhile).
        .filter(|h| h.fd.is_some() && ProcStat::read(h.stat.pid).is_some_and(|s| s.ppid == me.pid))
        .collect();
    if held.is_empty() {
        return;
    }
    tracing::debug!(
        count = held.len(),
        "upgrade: reaping the orphans adopted during the attempt as they exit"
    );
    let spawned = std::thread::Builder::new()
        .name("orphan-reaper".into())
        .spawn(move || reap_as_they_exit(held));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "upgrade: cannot start the thread that reaps adopted orphans; they stay zombies once they exit");
    }
}

fn reap_as_they_exit(mut held: Vec<Held>) {
    while !held.is_empty() {
        let mut fds: Vec<libc::pollfd> = held
            .iter()
            .map(|h| libc::pollfd {
                fd: h.fd.as_ref().expect("only pidfds are held").as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll(2) on pollfds we own, for as many as the Vec holds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(error = %e, "upgrade: cannot wait for adopted orphans; they stay zombies once they exit");
            return;
        }
        let exited: Vec<bool> = fds.iter().map(|p| p.revents != 0).collect();
        let mut i = 0;
        held.retain(|h| {
            let gone = exited[i];
            i += 1;
            if gone {
                reap(h);
            }
            !gone
        });
    }
}

/// A process held by a pidfd: signals reach it or nothing.
struct Held {
    stat: ProcStat,
    fd: Option<OwnedFd>,
}

impl Held {
    /// Opens a pidfd on `stat.pid` and checks it is still the process the
    /// walk saw (same start time). `None`: it is gone.
    fn open(stat: ProcStat) -> Option<Held> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
        // descriptor we own, or -1.
        let fd = match unsafe { libc::syscall(libc::SYS_pidfd_open, stat.pid as libc::pid_t, 0) } {
            // No pidfds (a kernel before 5.3): plain pids, checked below.
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) => None,
            -1 => return None,
            // SAFETY: a descriptor just returned to us and owned by nobody else.
            fd => Some(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }),
        };
        // Re-read after opening: the pidfd now pins this pid to whichever
        // process held it at `pidfd_open`; only if that is the one the walk
        // saw may it be signalled.
        match ProcStat::read(stat.pid) {
            Some(now) if now.start == stat.start => Some(Held { stat, fd }),
            _ => None,
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: pidfd_send_signal(2) on our own pidfd with no siginfo; the
        // fallback (no pidfds) is a plain kill(2) of a pid just verified.
        let r = unsafe {
            match &self.fd {
                Some(fd) => libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                ) as libc::c_int,
                None => libc::kill(self.stat.pid as libc::pid_t, sig),
            }
        };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(pid = self.stat.pid, signal = sig, error = %e, "upgrade: cannot signal a process the new process started");
            }
        }
    }

    /// Waits until it has exited (a zombie counts), up to `deadline`.
    fn wait_exit(&self, deadline: Instant) -> bool {
        loop {
            let exited = match &self.fd {
                Some(fd) => {
                    let mut p = libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    let left = deadline.saturating_duration_since(Instant::now());
                    // SAFETY: poll(2) on one pollfd we own.
                    unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as libc::c_int) > 0 }
                }
                None => ProcStat::read(self.stat.pid)
                    .is_none_or(|s| s.start != self.stat.start || s.zombie()),
            };
            if exited {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if self.fd.is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Stops, kills and reaps every process of the successor `root` (this
/// process's unreaped child: reap it after, with its `Child`). Returns how
/// many processes other than `root` it killed. Blocking, up to a few
/// seconds.
pub fn kill_tree(root: u32) -> usize {
    let (Some(me), Some(root_stat)) = (ProcStat::read(std::process::id()), ProcStat::read(root))
    else {
        tracing::warn!(
            pid = root,
            "upgrade: cannot read /proc; only the new process's group is killed"
        );
        kill_group(root);
        return 0;
    };
    // 1. Freeze the tree, walking until a walk finds nobody new.
    let mut held: HashMap<(u32, u64), Held> = HashMap::new();
    for walk in 0.. {
        let table = all_processes();
        let new: Vec<ProcStat> = tree(&root_stat, &me, &table)
            .into_iter()
            .filter(|p| !held.contains_key(&(p.pid, p.start)))
            .collect();
        if new.is_empty() {
            break;
        }
        if walk == MAX_WALKS {
            tracing::warn!(
                pid = root,
                "upgrade: the new process's tree keeps growing; killing what was found"
            );
            break;
        }
        for p in new {
            if let Some(h) = Held::open(p) {
                h.signal(libc::SIGSTOP);
                held.insert((p.pid, p.start), h);
            }
        }
    }
    // 2. Kill: the group (anything a failed /proc read missed) and each.
    kill_group(root);
    for h in held.values() {
        h.signal(libc::SIGKILL);
    }
    let deadline = Instant::now() + EXIT_PATIENCE;
    for h in held.values() {
        if !h.wait_exit(deadline) {
            tracing::warn!(
                pid = h.stat.pid,
                "upgrade: a process the new process started did not exit after SIGKILL"
            );
        }
    }
    // 3. Reap the orphans now ours (everything's parent is dead: each is
    //    our zombie). The successor is left to its `Child`.
    let mut killed = 0;
    for h in held.values().filter(|h| h.stat.pid != root) {
        killed += 1;
        let now = ProcStat::read(h.stat.pid);
        if now.is_some_and(|s| s.start == h.stat.start && s.ppid == me.pid) {
            // SAFETY: waitpid(2) on a zombie child of ours that the walk
            // found (pid pinned by being unreaped); nobody else waits for it.
            unsafe {
                libc::waitpid(
                    h.stat.pid as libc::pid_t,
                    std::ptr::null_mut(),
                    libc::WNOHANG,
                )
            };
        }
    }
    killed
}

/// Reaps `h`, an exited child of ours that nothing else waits for: through
/// its pidfd, which names this process and no other even if an earlier
/// attempt's reaper got to it first and its pid has been reused since.
fn reap(h: &Held) {
    let Some(fd) = &h.fd else { return };
    // SAFETY: waitid(2) writes one siginfo_t we own; P_PIDFD (Linux 5.4)
    // takes the descriptor as the id.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if r == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // A kernel with pidfds but without P_PIDFD (5.3): by pid, pinned
        // by being unreaped.
        // SAFETY: waitpid(2) on one zombie child of ours.
        unsafe {
            libc::waitpid(
                h.stat.pid as libc::pid_t,
                std::ptr::null_mut(),
                libc::WNOHANG,
            )
        };
    }
}

/// SIGKILLs the successor's process group. Call before reaping the
/// successor, the group's leader: until then its number cannot name
/// another group.
fn kill_group(pgid: u32) {
    // SAFETY: kill(2) with a negative pid signals the group the successor
    // leads (`process_group(0)` at spawn); nothing else has that number
    // while the successor is unreaped.
    if unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) } == -1 {
        let e = io::Error::last_os_error();
        tracing::debug!(pgid, error = %e, "upgrade: cannot kill the new process's group");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, ppid: u32, pgid: u32, sid: u32, start: u64) -> ProcStat {
        ProcStat {
            pid,
            state: b'S',
            ppid,
            pgid,
            sid,
            start,
        }
    }

    #[test]
    fn parses_a_stat_line_whose_name_has_spaces_and_parentheses() {
        let line = "4242 (a (weird) name) S 4200 4242 4100 0 -1 4194560 10 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            ProcStat::parse(line),
            Some(ProcStat {
                pid: 4242,
                state: b'S',
                ppid: 4200,
                pgid: 4242,
                sid: 4100,
                start: 987654
            })
        );
        assert_eq!(ProcStat::parse("garbage"), None);
        let me = ProcStat::read(std::process::id()).unwrap();
        assert_eq!(me.pid, std::process::id());
    }

    /// Us (pid 10, session 10), the successor 20 (its own group), a child in
    /// its group, a grandchild that called setsid, an orphan of each kind
    /// reparented to us, and what is not the successor's: our health-check
    /// command, its child, an older child of ours, and strangers.
    #[test]
    fn the_tree_is_every_descendant_and_the_orphans_that_carry_its_mark() {
        let me = p(10, 1, 10, 10, 100);
        let root = p(20, 10, 20, 10, 200);
        let table = vec![
            me,
            root,
            p(21, 20, 20, 10, 201), // a child in its group
            p(22, 21, 22, 22, 202), // a grandchild that called setsid
            p(23, 22, 22, 22, 203), // ...and its child
            p(24, 10, 24, 24, 204), // a daemon orphan (setsid), now ours
            p(25, 24, 24, 24, 205), // ...its child
            p(26, 10, 20, 10, 206), // an orphan that stayed in its group
            p(30, 10, 10, 10, 210), // our health-check command
            p(31, 30, 10, 10, 211), // ...its child
            p(32, 10, 32, 32, 150), // our child from before the upgrade
            p(40, 1, 40, 40, 300),  // a stranger
            p(41, 1, 20, 10, 50),   // a stranger in a group numbered 20
        ];
        let mut got: Vec<u32> = tree(&root, &me, &table).iter().map(|p| p.pid).collect();
        got.sort();
        assert_eq!(got, [20, 21, 22, 23, 24, 25, 26]);
    }

    /// Us (pid 10, group 10), the children we spawn (a health-check command
    /// leading its group, `wireguard-go` in ours), and orphans reparented to
    /// us: a health-check command's background job (in the command's
    /// group), a daemon's child (in the daemon's group), and a daemon that
    /// called setsid (leads its group: indistinguishable from our own).
    #[test]
    fn adopted_orphans_are_our_children_in_a_group_nobody_we_spawn_is_in() {
        let me = p(10, 1, 10, 10, 100);
        let table = vec![
            me,
            p(30, 10, 30, 10, 210), // our health-check command
            p(31, 30, 30, 10, 211), // ...its child, not an orphan
            p(33, 10, 10, 10, 212), // wireguard-go
            p(34, 10, 35, 10, 213), // a command's background job, orphaned
            p(36, 10, 37, 37, 214), // a daemon's child, orphaned
            p(38, 10, 38, 38, 215), // an orphaned daemon (setsid)
            p(40, 1, 41, 40, 300),  // a stranger
        ];
        let got: Vec<u32> = adopted(&me, &table).iter().map(|p| p.pid).collect();
        assert_eq!(got, [34, 36]);
    }
}
