//! Passive health events: what shards see of a backend while serving
//! clients (a connect that failed or timed out, a reset in the middle of a
//! connection, a connection that ended cleanly while the control side is
//! watching), reported to the control side's health checker.
//!
//! # Contract
//!
//! [`PassiveReporter::report`] never blocks and never allocates: it is a
//! `try_send` on a bounded channel. When the channel is full (the checker
//! is behind) or closed (health checking is off) the event is dropped and
//! counted in [`PassiveReporter::dropped`], so a shard never waits on the
//! control thread. Events carry the backend's id (`Arc<str>`, a reference
//! count increment) because indices change from one snapshot to the next.
//!
//! The channel is `async-channel`, the one the engine already uses for shard
//! commands: senders are plain non-blocking calls from any thread, and the
//! receiver can be awaited on the control thread's Tokio runtime without a
//! thread of its own polling a blocking receiver.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A connect error that comes from this host's resources, not from the
/// backend: out of local ports (`EADDRNOTAVAIL`), descriptors or memory.
/// Neither a client's connect (`conn`) nor a health check
/// (`control::health::probe`) that fails so counts against the backend.
pub fn is_local_failure(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Events the channel holds before new ones are dropped: far more than a
/// checker that runs every few milliseconds needs, small enough (≈ 64 KiB)
/// to cost nothing.
pub const CAPACITY: usize = 4096;

/// What a shard saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassiveKind {
    /// The connect was refused or failed (unreachable, reset during the
    /// handshake).
    ConnectFailed,
    /// The connect did not finish within the connect timeout.
    ConnectTimeout,
    /// The backend reset an established connection before it sent a byte
    /// or closed, while its client was still there (see
    /// [`BackendSeen::reset_before_reply`]).
    Reset,
    /// A connection ended without a reset from the backend, which sent a
    /// byte or closed cleanly (reported only while the backend is watched).
    Success,
}

impl PassiveKind {
    /// True for every kind but [`PassiveKind::Success`].
    pub fn is_failure(self) -> bool {
        !matches!(self, PassiveKind::Success)
    }

    /// A short, stable name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            PassiveKind::ConnectFailed => "connect_failed",
            PassiveKind::ConnectTimeout => "connect_timeout",
            PassiveKind::Reset => "reset",
            PassiveKind::Success => "success",
        }
    }
}

/// What a connection's pumps saw of its backend: whether it sent a byte,
/// closed its side cleanly (FIN), or reset the connection (met reading from
/// it or sending to it), and whether its client had left by then. Plain
/// cells: the connection's task owns it.
#[derive(Debug, Default)]
pub struct BackendSeen {
    replied: Cell<bool>,
    closed: Cell<bool>,
    reset: Cell<bool>,
    client_left: Cell<bool>,
    /// A reset met before any reply or close, while the client was there.
    unserved_reset: Cell<bool>,
}

impl BackendSeen {
    /// A read from the backend brought bytes.
    pub fn replied(&self) {
        self.replied.set(true);
    }

    /// A read from the backend met its end: it closed its side.
    pub fn closed(&self) {
        self.closed.set(true);
    }

    /// The backend did its part: sent a byte, or closed cleanly (a backend
    /// that only receives). One that did neither (hung, the connection
    /// ended by the idle timeout or the client) proved nothing: QA found
    /// such connections closing a half-open circuit on a hung backend.
    pub fn served(&self) -> bool {
        !self.reset.get() && (self.replied.get() || self.closed.get())
    }

    /// The client's side ended (its end of stream, a reset or error from
    /// it, a send to it that failed): a reset from the backend after this
    /// is not the backend's failure (see [`BackendSeen::reset_before_reply`]).
    pub fn client_left(&self) {
        self.client_left.set(true);
    }

    fn note_reset(&self) {
        self.reset.set(true);
        if !self.replied.get() && !self.closed.get() && !self.client_left.get() {
            self.unserved_reset.set(true);
        }
    }

    /// A read from the backend failed with `e`: a reset is noted.
    pub fn read_failed(&self, e: &std::io::Error) {
        if e.kind() == std::io::ErrorKind::ConnectionReset {
            self.note_reset();
        }
    }

    /// A send to the backend failed with `e`: a reset (`ECONNRESET`, or
    /// `EPIPE` once the reset was reported) is noted. A backend that resets
    /// while the client is still sending fails the send first, and the
    /// read that would have seen the reset is then never made.
    pub fn send_failed(&self, e: &std::io::Error) {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        if matches!(e.kind(), ConnectionReset | BrokenPipe) {
            self.note_reset();
        }
    }

    /// The backend reset the connection, whatever the cause.
    pub fn was_reset(&self) -> bool {
        self.reset.get()
    }

    /// The backend reset the connection before it sent a byte or closed
    /// its side, while its client was still there: it accepted the
    /// connection but did not serve it. To the client that is a backend
    /// that does not work, though the connect succeeded: the one reset that
    /// is a passive health failure. Not so a reset that follows a reply or
    /// a close (a server that greets, or answers, and closes with bytes
    /// from its client unread resets: that is how a close with unread data
    /// ends), nor one that follows its client's leaving (the proxy passed
    /// the client's end on, and servers that abort a request whose client
    /// went away reset it): QA found clients that abort, and such backends,
    /// getting healthy backends ejected (until 2026-12-06 every reset
    /// counted).
    pub fn reset_before_reply(&self) -> bool {
        self.unserved_reset.get()
    }
}

/// One event about one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveEvent {
    pub backend: Arc<str>,
    pub kind: PassiveKind,
    /// When the connection began (its connect was started, or its pooled
    /// socket handed over): a half-open circuit is decided only by
    /// connections opened since it went half-open, not by one that was
    /// open before the backend was ejected.
    pub opened: Instant,
}

/// The shards' end of the channel.
#[derive(Debug)]
pub struct PassiveReporter {
    tx: async_channel::Sender<PassiveEvent>,
    sent: AtomicU64,
    dropped: AtomicU64,
}

/// The control side's end of the channel.
pub type PassiveEvents = async_channel::Receiver<PassiveEvent>;

/// A reporter and its receiver, holding at most `capacity` events.
pub fn channel(capacity: usize) -> (Arc<PassiveReporter>, PassiveEvents) {
    let (tx, rx) = async_channel::bounded(capacity.max(1));
    let reporter = PassiveReporter {
        tx,
        sent: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    };
    (Arc::new(reporter), rx)
}

impl PassiveReporter {
    /// Queues an event about a connection opened at `opened`, or drops and
    /// counts it when the queue is full or nobody listens. Never blocks.
    pub fn report(&self, backend: &Arc<str>, kind: PassiveKind, opened: Instant) {
        let event = PassiveEvent {
            backend: Arc::clone(backend),
            kind,
            opened,
        };
        match self.tx.try_send(event) {
            Ok(()) => self.sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Events queued for the control side so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Events dropped so far (queue full, or health checking off).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (reporter, events) = channel(2);
        let id: Arc<str> = Arc::from("b1");
        for _ in 0..5 {
            reporter.report(&id, PassiveKind::ConnectFailed, Instant::now());
        }
        assert_eq!((reporter.sent(), reporter.dropped()), (2, 3));
        let first = events.try_recv().unwrap();
        assert_eq!(&*first.backend, "b1");
        assert_eq!(first.kind, PassiveKind::ConnectFailed);
        // Room again: the next one goes through.
        reporter.report(&id, PassiveKind::Success, Instant::now());
        assert_eq!(reporter.sent(), 3);
    }

    #[test]
    fn a_closed_channel_counts_drops() {
        let (reporter, events) = channel(8);
        drop(events);
        reporter.report(&Arc::from("b1"), PassiveKind::Reset, Instant::now());
        assert_eq!((reporter.sent(), reporter.dropped()), (0, 1));
    }

    #[test]
    fn a_reset_before_reply_is_one_with_no_byte_read_before_it() {
        use std::io::{Error, ErrorKind};
        let reset = Error::from(ErrorKind::ConnectionReset);
        let seen = BackendSeen::default();
        assert!(!seen.was_reset() && !seen.reset_before_reply());
        seen.read_failed(&Error::from(ErrorKind::TimedOut));
        assert!(!seen.was_reset(), "not a reset");
        seen.read_failed(&reset);
        assert!(seen.was_reset() && seen.reset_before_reply());
        let seen = BackendSeen::default();
        seen.replied();
        seen.read_failed(&reset);
        assert!(seen.was_reset() && !seen.reset_before_reply());
        let seen = BackendSeen::default();
        seen.send_failed(&Error::from(ErrorKind::BrokenPipe));
        assert!(seen.reset_before_reply(), "a send refused after a reset");
    }

    #[test]
    fn a_reset_after_a_close_or_after_the_client_left_is_not_the_backends_failure() {
        use std::io::{Error, ErrorKind};
        let seen = BackendSeen::default();
        seen.closed();
        seen.send_failed(&Error::from(ErrorKind::BrokenPipe));
        assert!(seen.was_reset() && !seen.reset_before_reply());
        let seen = BackendSeen::default();
        seen.client_left();
        seen.read_failed(&Error::from(ErrorKind::ConnectionReset));
        assert!(seen.was_reset() && !seen.reset_before_reply());
        assert!(!seen.served(), "nor a success");
        // The client leaving after the backend's reset changes nothing.
        let seen = BackendSeen::default();
        seen.read_failed(&Error::from(ErrorKind::ConnectionReset));
        seen.client_left();
        assert!(seen.reset_before_reply());
    }

    #[test]
    fn only_success_is_not_a_failure() {
        assert!(PassiveKind::ConnectFailed.is_failure());
        assert!(PassiveKind::ConnectTimeout.is_failure());
        assert!(PassiveKind::Reset.is_failure());
        assert!(!PassiveKind::Success.is_failure());
    }
}
