//! The task that sends the mesh's path probes and receives their answers
//! (the I/O around `probe_watch`), on the mesh runtime.
//!
//! It has a task of its own so that each answer is stamped when it arrives,
//! not when the driver gets round to it (a reconciliation may wait seconds
//! on a `wireguard-go` that does not answer): round trips stay true, and a
//! path is not called down for answers that were only waiting to be read.
//!
//! The socket is opened once ([`Prober::start`]); binding it to this POP's
//! 6PN address is retried before each round until it works (the address
//! may not be configured yet), said once at WARN if that lasts
//! [`BIND_PATIENCE`].

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::pinger::{OpenError, Pinger, SocketKind};
use super::probe_watch::Probe;

/// How long binding may fail before it is worth a WARN.
pub const BIND_PATIENCE: Duration = Duration::from_secs(30);

/// An answer and when it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub from: Ipv6Addr,
    pub seq: u16,
    pub at: Instant,
}

/// The driver's side of the prober task.
pub struct Prober {
    kind: SocketKind,
    probes: mpsc::UnboundedSender<Vec<Probe>>,
    /// Taken by the driver's loop ([`Prober::take_answers`]).
    answers: Option<mpsc::UnboundedReceiver<Answer>>,
}

impl Prober {
    /// Opens the socket and starts the task on the current runtime. It
    /// ends when the `Prober` is dropped.
    pub fn start(source: Ipv6Addr, interval: Duration) -> Result<Prober, OpenError> {
        let pinger = Pinger::open()?;
        let kind = pinger.kind();
        let (probes, probes_rx) = mpsc::unbounded_channel();
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let binding = Binding {
            source,
            interval,
            first_failure: None,
            warned: false,
        };
        tokio::spawn(run(pinger, binding, probes_rx, answers_tx));
        Ok(Prober {
            kind,
            probes,
            answers: Some(answers),
        })
    }

    pub fn kind(&self) -> SocketKind {
        self.kind
    }

    /// Hands `probes` to the task (dropped if the task is gone).
    pub fn send(&self, probes: Vec<Probe>) {
        if !probes.is_empty() {
            let _ = self.probes.send(probes);
        }
    }

    /// The answers, once: the driver's loop waits on them.
    pub fn take_answers(&mut self) -> Option<mpsc::UnboundedReceiver<Answer>> {
        self.answers.take()
    }
}

/// Binding state, to log it once.
struct Binding {
    source: Ipv6Addr,
    interval: Duration,
    first_failure: Option<Instant>,
    warned: bool,
}

impl Binding {
    /// Binds if not done yet; `true` once bound.
    fn ensure(&mut self, pinger: &mut Pinger) -> bool {
        if pinger.is_bound() {
            return true;
        }
        match pinger.bind(self.source) {
            Ok(()) => {
                tracing::info!(address = %self.source, socket = pinger.kind().as_str(),
                    interval_ms = self.interval.as_millis() as u64,
                    "mesh: probing every peer's path with ICMPv6 echo through the tunnel");
                true
            }
            Err(e) => {
                let since = *self.first_failure.get_or_insert_with(Instant::now);
                if !self.warned && since.elapsed() >= BIND_PATIENCE {
                    self.warned = true;
                    tracing::warn!(address = %self.source, error = %e,
                        "mesh: cannot bind the path probes to this POP's 6PN address; retrying, \
                         and judging paths from WireGuard handshakes only meanwhile (minutes to \
                         tell a blocked path)");
                } else {
                    tracing::debug!(address = %self.source, error = %e,
                        "mesh: cannot bind the path probes yet; retrying");
                }
                false
            }
        }
    }
}

async fn run(
    mut pinger: Pinger,
    mut binding: Binding,
    mut probes: mpsc::UnboundedReceiver<Vec<Probe>>,
    answers: mpsc::UnboundedSender<Answer>,
) {
    let mut failed_sends: u64 = 0;
    loop {
        tokio::select! {
            batch = probes.recv() => {
                let Some(batch) = batch else { return };
                if !binding.ensure(&mut pinger) {
                    continue;
                }
                for p in batch {
                    // Lost, and counted as such by the watch: no route to the
                    // peer yet, this POP's address gone with a device being
                    // built again, a full socket buffer.
                    if let Err(e) = pinger.send(p.to, p.seq) {
                        failed_sends += 1;
                        tracing::debug!(to = %p.to, error = %e, failed_sends,
                            "mesh: a path probe could not be sent");
                    }
                }
            }
            echo = pinger.recv(), if pinger.is_bound() => match echo {
                Ok(echo) => {
                    let answer = Answer { from: echo.from, seq: echo.seq, at: Instant::now() };
                    if answers.send(answer).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // Not expected (errors from the network are not reported
                    // on an unconnected socket); never spin on one.
                    tracing::debug!(error = %e, "mesh: reading path probe answers failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}
