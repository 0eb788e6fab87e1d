//! The successor's side of a binary upgrade: receive the sockets at start,
//! report ready (or failure) once.
//!
//! Call order: [`from_env`] first thing at start (before anything binds);
//! the components then claim their sockets (`super::sockets::take_*`);
//! once the process serves, [`report_ready`], after which the predecessor
//! stops accepting and drains. If start fails, [`report_failure`] tells the
//! predecessor why (it keeps serving and logs the reason).
//!
//! After `Ready` the predecessor hands over what only one process may run
//! at a time: its BGP sessions ([`await_bgp`]) and its replication member
//! ([`await_replication`]), and its mesh device ([`await_mesh`]). A thread listens on the channel for them and
//! files each as it arrives; components that said they expect one
//! ([`expect_bgp_hand_off`], [`expect_replication_hand_off`], before
//! `Ready`) wait for theirs.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bgp::handoff::Handed;

use super::channel::Channel;
use super::successor::UPGRADE_FD_VAR;
use super::wire::{FromSuccessor, ToSuccessor, WireError};

/// How long the predecessor may take to send all sockets.
const RECEIVE_PATIENCE: Duration = Duration::from_secs(10);

/// The channel back to the predecessor, until ready or failure is reported.
static PREDECESSOR: Mutex<Option<Channel>> = Mutex::new(None);
/// Set when this successor took over replication's sockets: the channel is
/// then kept after `Ready` for [`await_replication`].
static EXPECT_REPLICATION: AtomicBool = AtomicBool::new(false);
/// Set when this successor runs a BGP speaker: the channel is kept after
/// `Ready` for [`await_bgp`].
static EXPECT_BGP: AtomicBool = AtomicBool::new(false);
/// Set when this successor took over the mesh's TUN device: the channel is
/// kept after `Ready` for [`await_mesh`].
static EXPECT_MESH: AtomicBool = AtomicBool::new(false);
/// A successor that has not reported yet (set when the channel is adopted,
/// cleared by the report): waits after `Ready` wait for it.
static AWAITING_REPORT: AtomicBool = AtomicBool::new(false);
/// What arrived after `Ready`, filed by the listening thread.
static AFTER_READY: Mutex<AfterReady> = Mutex::new(AfterReady::new());
static AFTER_READY_CHANGED: Condvar = Condvar::new();
/// How long the listening thread waits for the predecessor's word.
const AFTER_READY_PATIENCE: Duration = Duration::from_secs(60);

/// The predecessor's hand-offs after `Ready`, as they arrive.
struct AfterReady {
    /// A thread listens (this process is a successor that reported ready).
    listening: bool,
    replication: Option<ReplicationHandOff>,
    bgp_sessions: Vec<Handed>,
    bgp_done: bool,
    /// The predecessor stopped its mesh device.
    mesh: bool,
    /// The predecessor closed the channel (or it broke): nothing more comes.
    closed: bool,
    /// A message that made no sense, or no word in time.
    error: Option<String>,
}

impl AfterReady {
    const fn new() -> AfterReady {
        AfterReady {
            listening: false,
            replication: None,
            bgp_sessions: Vec::new(),
            bgp_done: false,
            mesh: false,
            closed: false,
            error: None,
        }
    }

    fn expected_all(&self) -> bool {
        (!EXPECT_REPLICATION.load(Ordering::Relaxed) || self.replication.is_some())
            && (!EXPECT_BGP.load(Ordering::Relaxed) || self.bgp_done)
            && (!EXPECT_MESH.load(Ordering::Relaxed) || self.mesh)
    }
}

fn after_ready() -> MutexGuard<'static, AfterReady> {
    AFTER_READY.lock().unwrap_or_else(|p| p.into_inner())
}

/// What was taken over, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inherited {
    pub entries: usize,
    pub sockets: usize,
}

/// Why the hand-off could not be received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InheritError {
    #[error("{UPGRADE_FD_VAR}={0:?} is not a descriptor number")]
    BadVar(String),
    #[error("descriptor {fd} from {UPGRADE_FD_VAR} is not a hand-off channel: {cause}")]
    NotAChannel { fd: i32, cause: std::io::Error },
    #[error("receiving sockets from the previous process: {0}")]
    Channel(std::io::Error),
    #[error("the previous process closed the channel before sending every socket")]
    Closed,
    #[error("bad hand-off message from the previous process: {0}")]
    Protocol(#[from] WireError),
}

/// If this process was started by an upgrade (`EDGEPROXY_UPGRADE_FD` set),
/// receives every socket the predecessor hands over and keeps them for the
/// components to claim; `Ok(None)` for an ordinary start. Removes the
/// variable, so nothing this process starts mistakes itself for a
/// successor. Must run before any other thread starts (it edits the
/// environment).
pub fn from_env() -> Result<Option<Inherited>, InheritError> {
    let Some(value) = std::env::var_os(UPGRADE_FD_VAR) else {
        return Ok(None);
    };
    std::env::remove_var(UPGRADE_FD_VAR);
    let text = value.to_string_lossy().into_owned();
    let fd: i32 = match text.trim().parse() {
        Ok(fd) if fd > 2 => fd,
        _ => return Err(InheritError::BadVar(text)),
    };
    // The descriptor is only an open file if the predecessor left it so;
    // fcntl tells without taking ownership of a number someone else holds.
    // SAFETY: F_GETFD on any number is harmless.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(InheritError::NotAChannel {
            fd,
            cause: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the predecessor passed this descriptor to this process for
    // this purpose alone; nothing else here refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let channel = Channel::adopt(owned).map_err(|cause| InheritError::NotAChannel { fd, cause })?;
    let table = receive(&channel)?;
    let summary = Inherited {
        entries: table.len(),
        sockets: table.values().map(Vec::len).sum(),
    };
    super::sockets::set_inherited(table);
    *PREDECESSOR.lock().unwrap_or_else(|p| p.into_inner()) = Some(channel);
    AWAITING_REPORT.store(true, Ordering::Relaxed);
    Ok(Some(summary))
}

/// Reads `Sockets` messages until `Done`.
fn receive(channel: &Channel) -> Result<BTreeMap<String, Vec<OwnedFd>>, InheritError> {
    let mut table: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
    loop {
        let (bytes, fds) = channel
            .recv(RECEIVE_PATIENCE)
            .map_err(InheritError::Channel)?
            .ok_or(InheritError::Closed)?;
        match ToSuccessor::decode(&bytes, fds.len())? {
            ToSuccessor::Done => return Ok(table),
            ToSuccessor::Replication { .. }
            | ToSuccessor::BgpSession { .. }
            | ToSuccessor::BgpDone
            | ToSuccessor::Mesh => {
                return Err(InheritError::Protocol(WireError::Decode(
                    "a hand-off meant for after ready came before the sockets".into(),
                )))
            }
            ToSuccessor::Sockets { entries, .. } => {
                let mut fds = fds.into_iter();
                for (name, count) in entries {
                    // decode checked that the counts add up to what came.
                    table
                        .entry(name)
                        .or_default()
                        .extend(fds.by_ref().take(count as usize));
                }
            }
        }
    }
}

/// Whether this process is a successor that has not reported yet.
pub fn is_successor() -> bool {
    PREDECESSOR
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some()
}

/// Tells the predecessor this process serves: it stops accepting and
/// drains. No-op for an ordinary start.
pub fn report_ready() {
    report(FromSuccessor::Ready {
        pid: std::process::id(),
    });
}

/// Tells the predecessor this process gives up (it keeps serving). No-op
/// for an ordinary start.
pub fn report_failure(reason: &str) {
    report(FromSuccessor::Failed {
        reason: shortened(reason, 4000),
    });
}

/// `reason` in at most about `max` characters, well under the protocol's
/// size limit: a longer one keeps its start and its end (where a TOML
/// error says what is wrong, after the quoted line) and says what was cut
/// in between. QA: cut at 4000 with no mark, a 5000-character line hid
/// the error itself.
fn shortened(reason: &str, max: usize) -> String {
    let chars: Vec<char> = reason.chars().collect();
    if chars.len() <= max {
        return reason.to_string();
    }
    let (head, tail) = (max * 2 / 5, max * 3 / 5);
    let cut = chars.len() - head - tail;
    format!(
        "{} … ({cut} characters cut; `edgeproxy check-config` prints the whole error) … {}",
        chars[..head].iter().collect::<String>(),
        chars[chars.len() - tail..].iter().collect::<String>()
    )
}

fn report(msg: FromSuccessor) {
    let ready = matches!(msg, FromSuccessor::Ready { .. });
    let channel = PREDECESSOR.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(channel) = channel {
        if let Err(e) = channel.send(&msg.encode(), &[]) {
            tracing::warn!(error = %e, "upgrade: cannot report to the previous process");
        }
        let expected = EXPECT_REPLICATION.load(Ordering::Relaxed)
            || EXPECT_BGP.load(Ordering::Relaxed)
            || EXPECT_MESH.load(Ordering::Relaxed);
        {
            // Under the lock the waiters read it with: none of them sees
            // "not reported, not listening" in between.
            let mut after = after_ready();
            after.listening = ready && expected;
            AWAITING_REPORT.store(false, Ordering::Relaxed);
            AFTER_READY_CHANGED.notify_all();
        }
        if ready && expected {
            let spawned = std::thread::Builder::new()
                .name("upgrade-hand-off".into())
                .spawn(move || listen_after_ready(channel));
            if let Err(e) = spawned {
                let mut after = after_ready();
                after.closed = true;
                after.error = Some(format!("cannot start a thread: {e}"));
                AFTER_READY_CHANGED.notify_all();
            }
        }
    }
}

/// Files what the predecessor hands over after `Ready` until everything
/// expected came, it closed the channel, or [`AFTER_READY_PATIENCE`].
fn listen_after_ready(channel: Channel) {
    let deadline = Instant::now() + AFTER_READY_PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let received = match left.is_zero() {
            true => Err(std::io::ErrorKind::TimedOut.into()),
            false => channel.recv(left),
        };
        let mut after = after_ready();
        match received {
            Ok(Some((bytes, fds))) => match ToSuccessor::decode(&bytes, fds.len()) {
                Ok(ToSuccessor::Replication { generation }) => {
                    after.replication = Some(ReplicationHandOff::Released { generation });
                }
                Ok(ToSuccessor::BgpSession { session }) if !EXPECT_BGP.load(Ordering::Relaxed) => {
                    // `[bgp]` is off here: the session ends (its router
                    // sees the connection close and drops the routes).
                    tracing::info!(neighbor = %session.peer,
                        "upgrade: BGP is off in this configuration; the previous process's session is closed");
                    drop(fds);
                }
                Ok(ToSuccessor::BgpSession { session }) => {
                    if let Some(socket) = fds.into_iter().next() {
                        after.bgp_sessions.push(Handed {
                            state: session,
                            socket,
                        });
                    }
                }
                Ok(ToSuccessor::BgpDone) => after.bgp_done = true,
                Ok(ToSuccessor::Mesh) => after.mesh = true,
                Ok(other) => {
                    tracing::warn!(?other, "upgrade: unexpected message after ready; ignored")
                }
                Err(e) => {
                    after.error = Some(e.to_string());
                    after.closed = true;
                }
            },
            // Closed, or ECONNRESET and the like: the predecessor is gone.
            Ok(None) => after.closed = true,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                after.error = Some(format!("no word within {AFTER_READY_PATIENCE:?}"));
                after.closed = true;
            }
            Err(_) => after.closed = true,
        }
        let finished = after.closed || after.expected_all();
        AFTER_READY_CHANGED.notify_all();
        if finished {
            return;
        }
    }
}

/// Waits up to `patience` until `pick` finds what it waits for in what
/// arrived after `Ready`; `Err` on timeout.
fn wait_after_ready<T>(
    patience: Duration,
    mut pick: impl FnMut(&mut AfterReady) -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + patience;
    let mut after = after_ready();
    loop {
        if let Some(found) = pick(&mut after) {
            return Ok(found);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no word within {patience:?}"));
        }
        after = AFTER_READY_CHANGED
            .wait_timeout(after, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// Replication took over the predecessor's sockets: keep the channel after
/// `Ready` to hear when the predecessor has stopped its member.
pub fn expect_replication_hand_off() {
    EXPECT_REPLICATION.store(true, Ordering::Relaxed);
}

/// What the predecessor said about its replication member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationHandOff {
    /// It stopped its member; run the same one (`generation`, when it ran).
    Released { generation: Option<u64> },
    /// It exited or closed the channel without saying (an older binary, or
    /// it died): its member is gone with it.
    Gone,
}

/// After [`report_ready`]: waits up to `patience` for the predecessor to
/// stop its replication member. Blocking (run it on a blocking thread).
/// `Err`: no word within `patience` (the predecessor may still run it).
pub fn await_replication(patience: Duration) -> Result<ReplicationHandOff, String> {
    wait_after_ready(patience, |after| {
        if let Some(said) = after.replication {
            return Some(Ok(said));
        }
        if !after.listening {
            // Not reported yet: wait for it; reported without listening (a
            // failure, an ordinary start): nothing comes.
            return (!AWAITING_REPORT.load(Ordering::Relaxed))
                .then_some(Ok(ReplicationHandOff::Gone));
        }
        match (after.closed, &after.error) {
            (true, None) => Some(Ok(ReplicationHandOff::Gone)),
            (true, Some(e)) => Some(Err(e.clone())),
            _ => None,
        }
    })?
}

/// This successor runs a BGP speaker: keep the channel after `Ready` to
/// receive the predecessor's sessions (see [`await_bgp`]).
pub fn expect_bgp_hand_off() {
    EXPECT_BGP.store(true, Ordering::Relaxed);
}

/// Waits up to `patience` for the predecessor's BGP sessions (established
/// ones, each with its connection): empty when it had none, or left
/// without handing any over. Blocking (run it on a blocking thread). May
/// be called before [`report_ready`] (a successor's speaker waits from its
/// start). `Err`: no word within `patience`, or a bad message.
pub fn await_bgp(patience: Duration) -> Result<Vec<Handed>, String> {
    wait_after_ready(patience, |after| {
        if after.bgp_done {
            return Some(Ok(std::mem::take(&mut after.bgp_sessions)));
        }
        if !after.listening {
            return (!AWAITING_REPORT.load(Ordering::Relaxed)).then_some(Ok(Vec::new()));
        }
        if after.closed {
            // What came before the predecessor left is still good.
            let sessions = std::mem::take(&mut after.bgp_sessions);
            return Some(match (&after.error, sessions.is_empty()) {
                (Some(e), true) => Err(e.clone()),
                _ => Ok(sessions),
            });
        }
        None
    })?
}

/// The mesh took over the predecessor's TUN device: keep the channel after
/// `Ready` to hear when the predecessor has stopped its WireGuard on it.
pub fn expect_mesh_hand_off() {
    EXPECT_MESH.store(true, Ordering::Relaxed);
}

/// What the predecessor said about its mesh device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshHandOff {
    /// It stopped its WireGuard: the TUN device and the UDP port are free.
    Released,
    /// It exited or closed the channel without saying (an older binary, or
    /// it died): its device is gone with it.
    Gone,
}

/// After [`report_ready`] (or before: it waits for it): waits up to
/// `patience` for the predecessor to stop its mesh device. Blocking (run
/// it on a blocking thread). `Err`: no word within `patience`.
pub fn await_mesh(patience: Duration) -> Result<MeshHandOff, String> {
    wait_after_ready(patience, |after| {
        if after.mesh {
            return Some(Ok(MeshHandOff::Released));
        }
        mesh_gone(after)
    })?
}

/// For a successor that needs nothing from its predecessor's mesh but its
/// absence (`crate::mesh::leftover`: removing a route the predecessor may
/// still use): waits up to `patience` until the predecessor runs no mesh.
/// `Released`: it stopped it. `Gone`: it exited or closed the channel, or
/// it said `BgpDone` without a word about a mesh first — it always says
/// `Mesh` before `BgpDone` when it runs one (`app::run`), so it ran none.
/// Needs [`expect_mesh_hand_off`] before [`report_ready`]. Blocking (run
/// it on a blocking thread). `Err`: no word within `patience`.
pub fn await_no_mesh(patience: Duration) -> Result<MeshHandOff, String> {
    wait_after_ready(patience, |after| {
        if after.mesh {
            return Some(Ok(MeshHandOff::Released));
        }
        if after.bgp_done {
            return Some(Ok(MeshHandOff::Gone));
        }
        mesh_gone(after)
    })?
}

/// The predecessor will not say `Mesh` any more: it was never asked to
/// listen for it, or the channel closed (with the error, if it broke).
fn mesh_gone(after: &AfterReady) -> Option<Result<MeshHandOff, String>> {
    if !after.listening {
        return (!AWAITING_REPORT.load(Ordering::Relaxed)).then_some(Ok(MeshHandOff::Gone));
    }
    match (after.closed, &after.error) {
        (true, None) => Some(Ok(MeshHandOff::Gone)),
        (true, Some(e)) => Some(Err(e.clone())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reason_keeps_its_start_and_end_and_says_what_was_cut() {
        assert_eq!(shortened("short", 40), "short");
        let long = format!("start {} the reason", "x".repeat(5000));
        let out = shortened(&long, 4000);
        assert!(out.starts_with("start xx"), "{out}");
        assert!(out.ends_with("xx the reason"), "{out}");
        assert!(
            out.contains("characters cut; `edgeproxy check-config`"),
            "{out}"
        );
        assert!(out.chars().count() < 4200, "{}", out.chars().count());
        let cut: usize = out
            .split(" … (")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(cut, long.chars().count() - 4000);
    }
}
