//! The successor's side of a binary upgrade: receive the sockets at start,
//! report ready (or failure) once.
//!
//! Call order: [`from_env`] first thing at start (before anything binds);
//! the components then claim their sockets (`super::sockets::take_*`);
//! once the process serves, [`report_ready`], after which the predecessor
//! stops accepting and drains. If start fails, [`report_failure`] tells the
//! predecessor why (it keeps serving and logs the reason).

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

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
/// The channel after `Ready`, while replication waits for its hand-off.
static AFTER_READY: Mutex<Option<Channel>> = Mutex::new(None);

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
            ToSuccessor::Replication { .. } => {
                return Err(InheritError::Protocol(WireError::Decode(
                    "replication hand-off before the sockets".into(),
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
    // Keep the message well under the protocol's size limit.
    let reason: String = reason.chars().take(4000).collect();
    report(FromSuccessor::Failed { reason });
}

fn report(msg: FromSuccessor) {
    let ready = matches!(msg, FromSuccessor::Ready { .. });
    let channel = PREDECESSOR.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(channel) = channel {
        if let Err(e) = channel.send(&msg.encode(), &[]) {
            tracing::warn!(error = %e, "upgrade: cannot report to the previous process");
        }
        if ready && EXPECT_REPLICATION.load(Ordering::Relaxed) {
            *AFTER_READY.lock().unwrap_or_else(|p| p.into_inner()) = Some(channel);
        }
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
    let Some(channel) = AFTER_READY.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return Ok(ReplicationHandOff::Gone);
    };
    let deadline = std::time::Instant::now() + patience;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!("no word within {patience:?}"));
        }
        match channel.recv(left) {
            Ok(None) => return Ok(ReplicationHandOff::Gone),
            Ok(Some((bytes, fds))) => match ToSuccessor::decode(&bytes, fds.len()) {
                Ok(ToSuccessor::Replication { generation }) => {
                    return Ok(ReplicationHandOff::Released { generation })
                }
                Ok(other) => {
                    tracing::warn!(?other, "upgrade: unexpected message after ready; ignored")
                }
                Err(e) => return Err(e.to_string()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(format!("no word within {patience:?}"))
            }
            // ECONNRESET and the like: the predecessor is gone.
            Err(_) => return Ok(ReplicationHandOff::Gone),
        }
    }
}
