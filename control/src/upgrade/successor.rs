//! The old process's side of a binary upgrade: start the binary now at this
//! process's executable path, hand it every socket, wait until it says it
//! serves.
//!
//! Blocking, with one deadline for the whole exchange: run it on a thread of
//! its own (the control loop keeps serving meanwhile). Whatever goes wrong,
//! the old process is untouched: it never stopped accepting. A successor
//! that did not get as far as `Ready` is killed and reaped, so a binary that
//! hangs at start does not linger. It is killed with every process it
//! started, in its process group or out of it ([`descendants`]): a child it
//! started (a wrapper script that runs something without `exec`, perhaps
//! under `setsid`) inherits the hand-off channel, and the sockets queued in
//! that channel stay open, listening with nobody to accept, for as long as
//! any process holds it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::channel::Channel;
use super::descendants;
use super::wire::{self, FromSuccessor, ToSuccessor, WireError};

/// The environment variable that tells a process it is a successor, and on
/// which descriptor its predecessor's channel is.
pub const UPGRADE_FD_VAR: &str = "EDGEPROXY_UPGRADE_FD";

/// How often a wait for the successor checks whether it was abandoned.
const CANCEL_CHECK: Duration = Duration::from_millis(100);

/// How often a pending attempt reaps the orphans it adopted that exited.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// A successor that reported ready: it serves on the same sockets.
#[derive(Debug)]
pub struct Successor {
    pub pid: u32,
    pub exe: PathBuf,
    /// Kept open after `Ready` for [`Successor::release_replication`].
    channel: Channel,
}

/// Reaps the successor `child` on a thread of its own whenever it exits.
/// It normally outlives us, but not always: upgraded in turn while we still
/// drain (A → B → C: B exits once C serves, while A drains long-lived
/// connections), or crashed. Unreaped, it would stay a zombie for as long
/// as we drain (up to `shutdown_grace_secs`). The thread blocks in
/// `waitpid` on this one pid, so it takes no other child's status; it ends
/// with the process if the successor outlives us.
fn reap_when_it_exits(mut child: Child) {
    let pid = child.id();
    let spawned = std::thread::Builder::new()
        .name("upgrade-reap".into())
        .spawn(move || match child.wait() {
            Ok(status) if status.success() => {
                tracing::info!(pid, "upgrade: the new process has exited (exit code 0)")
            }
            Ok(status) => tracing::warn!(
                pid,
                status = %describe(status),
                "upgrade: the new process has exited while this one still runs"
            ),
            Err(e) => tracing::debug!(pid, error = %e, "upgrade: cannot wait for the new process"),
        });
    if let Err(e) = spawned {
        tracing::warn!(pid, error = %e, "upgrade: cannot start a thread to reap the new process; should it exit before this one, it stays a zombie until then");
    }
}

impl Successor {
    /// Passes on a SIGHUP this process applied while the attempt was in
    /// flight: the successor may have read the file before it changed, and
    /// would serve the old version once it takes over. It reported ready, so
    /// its handlers are in place; a reload with nothing new changes nothing.
    pub fn pass_on_reload(&self) {
        tracing::info!(
            pid = self.pid,
            "upgrade: a SIGHUP came during the upgrade; passing it on to the new process"
        );
        // SAFETY: kill(2) on our own child, which is not reaped (and its pid
        // not reused) while it runs.
        if unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGHUP) } == -1 {
            tracing::error!(pid = self.pid, error = %io::Error::last_os_error(),
                "upgrade: cannot pass the SIGHUP on to the new process; send it one");
        }
    }

    /// Hands the successor this process's BGP sessions (stopped, without a
    /// word to their peers), each with its connection, then says the
    /// speaker is done. A session that cannot be sent is closed here (its
    /// router sees the session end; the successor starts it afresh).
    pub fn release_bgp(&self, sessions: Vec<crate::bgp::handoff::Handed>) {
        use std::os::fd::AsFd;
        for handed in sessions {
            let peer = handed.state.peer;
            let msg = ToSuccessor::BgpSession {
                session: handed.state,
            };
            let bytes = msg.encode();
            let sent = match bytes.len() > wire::MAX_MESSAGE_BYTES {
                true => Err(io::Error::other(format!(
                    "{} bytes of session state, more than {}",
                    bytes.len(),
                    wire::MAX_MESSAGE_BYTES
                ))),
                false => self.channel.send(&bytes, &[handed.socket.as_fd()]),
            };
            if let Err(e) = sent {
                tracing::warn!(pid = self.pid, neighbor = %peer, error = %e,
                    "upgrade: cannot hand a BGP session over; it ends here and the new process starts it afresh");
            }
        }
        // A successor that runs no speaker and no replication stopped
        // listening after `Ready`: nothing to tell it then.
        if let Err(e) = self.channel.send(&ToSuccessor::BgpDone.encode(), &[]) {
            tracing::debug!(pid = self.pid, error = %e, "upgrade: the new process does not listen for BGP sessions");
        }
    }

    /// Tells the successor this process has stopped its replication member
    /// (`generation`: the member's SWIM generation; `None`: it was not
    /// running): the successor starts it now, as the same member.
    pub fn release_replication(&self, generation: Option<u64>) {
        let msg = ToSuccessor::Replication { generation };
        if let Err(e) = self.channel.send(&msg.encode(), &[]) {
            tracing::warn!(pid = self.pid, error = %e, "upgrade: cannot tell the new process that replication is released");
        }
    }

    /// Tells the successor this process has stopped its mesh device: the
    /// successor starts its own on the TUN device it took over.
    pub fn release_mesh(&self) {
        if let Err(e) = self.channel.send(&ToSuccessor::Mesh.encode(), &[]) {
            // A successor without the embedded mesh stopped listening.
            tracing::debug!(pid = self.pid, error = %e, "upgrade: the new process does not listen for the mesh");
        }
    }
}

/// Why an upgrade did not happen. The old process keeps serving in every
/// case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    #[error("cannot find this process's binary: {0}")]
    Exe(io::Error),
    #[error("the binary {0} no longer exists (deleted and not replaced)")]
    ExeGone(PathBuf),
    #[error("cannot start {exe}: {cause}")]
    Spawn { exe: PathBuf, cause: io::Error },
    #[error("cannot collect the sockets to hand over: {0}")]
    Sockets(io::Error),
    #[error("hand-off to the new process (pid {pid}) failed: {cause}")]
    Channel { pid: u32, cause: io::Error },
    #[error("the new process (pid {pid}) sent a bad message: {cause}")]
    Protocol { pid: u32, cause: WireError },
    #[error("the new process (pid {pid}) exited ({status}) before it was ready")]
    Exited { pid: u32, status: String },
    #[error("the new process (pid {pid}) gave up: {reason}")]
    Failed { pid: u32, reason: String },
    #[error("the new process (pid {pid}) was not ready within {timeout:?}; killed it")]
    Timeout { pid: u32, timeout: Duration },
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("this process is stopping")]
    Stopping,
}

/// The path this process was started from. `/proc/self/exe` names the
/// running file; after a package manager replaced the binary (a new file
/// renamed over the old path) it reads `PATH (deleted)`, and `PATH` is where
/// the new binary is: that is what gets started.
pub fn executable_path() -> Result<PathBuf, UpgradeError> {
    let link = std::fs::read_link("/proc/self/exe").map_err(UpgradeError::Exe)?;
    let text = link.into_os_string();
    let path = match text.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(stripped) => PathBuf::from(stripped),
        None => PathBuf::from(text),
    };
    if !path.exists() {
        return Err(UpgradeError::ExeGone(path));
    }
    Ok(path)
}

/// Starts the successor with this process's arguments, environment and
/// working directory, hands it `sockets` (name, descriptors in order) and
/// waits up to `timeout` for it to report ready. It is told in its
/// environment which certificates `tls` this process serves expired.
/// Setting `cancel` abandons the attempt within a tenth of a second (this
/// process is stopping).
pub fn start(
    sockets: Vec<(String, Vec<OwnedFd>)>,
    tls: &crate::tls::Predecessor,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<Successor, UpgradeError> {
    let deadline = Instant::now() + timeout;
    let exe = executable_path()?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (ours, theirs) = Channel::pair().map_err(|cause| UpgradeError::Spawn {
        exe: exe.clone(),
        cause,
    })?;
    let their_fd = theirs.as_fd().as_raw_fd();
    let mut command = Command::new(&exe);
    command
        .args(&args)
        .env(UPGRADE_FD_VAR, their_fd.to_string())
        .env(crate::tls::PREDECESSOR_EXPIRED_VAR, tls.encode())
        .stdin(Stdio::null())
        // Its own group (pgid = its pid), so that a failed start can kill
        // everything it started along with it (see `descendants`).
        .process_group(0);
    // SAFETY: runs in the forked child before exec; fcntl, sigemptyset,
    // sigaddset and sigprocmask are async-signal-safe and touch only the
    // child's descriptor table and signal mask.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(their_fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            // QA: a SIGHUP or SIGUSR2 sent to every edgeproxy (`pkill -HUP
            // edgeproxy`) during an upgrade reached the new process before
            // it had handlers: the default action killed it and the upgrade
            // failed. Blocked, the signal waits (across exec) until the new
            // process has its handlers and unblocks it (`Signals::install`).
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Orphans of its tree come to us rather than to init until this
    // attempt is over, so that a failed start can find them all.
    let _subreaper = descendants::Subreaper::enter();
    let mut child = command.spawn().map_err(|cause| UpgradeError::Spawn {
        exe: exe.clone(),
        cause,
    })?;
    drop(theirs);
    let pid = child.id();
    tracing::info!(pid, exe = %exe.display(), sockets = sockets.len(), "upgrade: new process started; handing over sockets");
    match handshake(&ours, &sockets, pid, (deadline, timeout), cancel) {
        Ok(()) => {
            reap_when_it_exits(child);
            Ok(Successor {
                pid,
                exe,
                channel: ours,
            })
        }
        Err(e) => {
            // It closed the channel: it exited, or is about to. Let it, so
            // that its own exit status is reported rather than our SIGKILL.
            let exited = matches!(
                e,
                UpgradeError::Channel { .. } | UpgradeError::Exited { .. }
            ) && wait_exited(pid, Duration::from_secs(5));
            // Whatever state it is in, neither it nor anything it started
            // (in its group or out of it) may serve alongside us or keep the
            // channel (and the sockets still queued in it) open.
            let killed = descendants::kill_tree(pid);
            if killed > 0 {
                tracing::info!(
                    pid,
                    killed,
                    "upgrade: killed the processes the new process started"
                );
            }
            // And the successor itself, should the walk have missed it.
            let _ = child.kill();
            let status = child.wait();
            Err(match (e, status) {
                (UpgradeError::Channel { .. } | UpgradeError::Exited { .. }, Ok(status))
                    if exited =>
                {
                    UpgradeError::Exited {
                        pid,
                        status: describe(status),
                    }
                }
                (e, _) => e,
            })
        }
    }
}

fn handshake(
    channel: &Channel,
    sockets: &[(String, Vec<OwnedFd>)],
    pid: u32,
    (deadline, timeout): (Instant, Duration),
    cancel: &AtomicBool,
) -> Result<(), UpgradeError> {
    let io_err = |cause| UpgradeError::Channel { pid, cause };
    let counts: Vec<(String, usize)> = sockets.iter().map(|(n, f)| (n.clone(), f.len())).collect();
    let all_fds: Vec<&OwnedFd> = sockets.iter().flat_map(|(_, f)| f).collect();
    let mut next = 0;
    for batch in wire::batches(&counts) {
        let n: usize = batch.iter().map(|(_, c)| *c as usize).sum();
        let chunk: Vec<_> = all_fds[next..next + n]
            .iter()
            .map(|fd| std::os::fd::AsFd::as_fd(*fd))
            .collect();
        next += n;
        let msg = ToSuccessor::Sockets {
            protocol: wire::PROTOCOL,
            entries: batch,
        };
        channel.send(&msg.encode(), &chunk).map_err(io_err)?;
    }
    channel
        .send(&ToSuccessor::Done.encode(), &[])
        .map_err(io_err)?;
    let mut reaped_at = Instant::now();
    let answer = loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(UpgradeError::Stopping);
        }
        // We are a subreaper for the attempt: orphans that exit meanwhile
        // are ours to reap (a walk of /proc, so once a second at most).
        if reaped_at.elapsed() >= REAP_EVERY {
            descendants::reap_adopted_zombies();
            reaped_at = Instant::now();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(UpgradeError::Timeout { pid, timeout });
        }
        match channel.recv(left.min(CANCEL_CHECK)) {
            Ok(Some((bytes, fds))) => {
                break FromSuccessor::decode(&bytes, fds.len())
                    .map_err(|cause| UpgradeError::Protocol { pid, cause })?
            }
            Ok(None) => {
                return Err(UpgradeError::Exited {
                    pid,
                    status: "closed the channel".into(),
                })
            }
            // It exited, but something it started still holds the channel
            // (a wrapper's background job, a logger): waiting on would only
            // end at the deadline, and say "not ready" for a crash.
            Err(e) if e.kind() == io::ErrorKind::TimedOut && exited(pid) => {
                return Err(UpgradeError::Exited {
                    pid,
                    status: "exited".into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => continue,
            Err(cause) => return Err(UpgradeError::Channel { pid, cause }),
        }
    };
    match answer {
        FromSuccessor::Ready { .. } => Ok(()),
        FromSuccessor::Failed { reason } => Err(UpgradeError::Failed { pid, reason }),
    }
}

/// Waits up to `patience` for the child `pid` to exit, without reaping it:
/// an unreaped child keeps its pid, and with it the number of its process
/// group, from being reused, so [`descendants::kill_tree`] cannot hit a
/// stranger.
fn wait_exited(pid: u32, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        if exited(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether our child `pid` has exited, without reaping it (see
/// [`wait_exited`]).
fn exited(pid: u32) -> bool {
    // SAFETY: waitid with WNOWAIT only reads the state of our own child and
    // leaves it to be reaped by `Child::wait`; `info` is plain data.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ) == 0
            && info.si_pid() != 0
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}
