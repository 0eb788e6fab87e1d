//! Hitless binary upgrade: SIGUSR2 (nginx's signal for it) or `edgeproxy
//! upgrade` starts the binary now at this process's executable path and
//! hands it every listening socket; once it serves, this process stops
//! accepting and drains its open connections for `limits.shutdown_grace_secs`,
//! then exits.
//!
//! Sequence (old process P, successor S):
//! 1. P starts S with its own arguments, environment and working directory,
//!    plus `EDGEPROXY_UPGRADE_FD`: one end of a `SOCK_SEQPACKET` socket pair.
//! 2. P sends every socket over it (`SCM_RIGHTS`): the data plane's
//!    listeners and everything in the registry ([`sockets`]: discovery API,
//!    metrics, DNS, this control socket, and whatever else registers).
//! 3. S loads its configuration, takes over each socket it would otherwise
//!    bind (same name, same address) and binds only what is new; it serves
//!    on the shared sockets next to P, then reports `Ready`.
//! 4. P stops accepting without losing a queued connection (the sockets and
//!    their queues live on in S; see `engine::rt::AcceptGate`), stops its
//!    API, metrics, DNS and control socket, and drains.
//!
//! 5. With `[bgp]`: S's speaker waits. P stops its sessions after `Ready`
//!    without a word to the routers and sends each established one, its
//!    TCP connection and state ([`crate::bgp::handoff`]), then
//!    [`wire::ToSuccessor::BgpDone`]; S goes on with each where P stopped
//!    (the routers see one session throughout: no NOTIFICATION, no route
//!    withdrawn, no reliance on their Graceful Restart) and starts afresh
//!    only a session it has none for or whose configuration changed what
//!    the session negotiated.
//! 6. With `[replication]`: S took the gossip and QUIC sockets but has not
//!    started replication. P stops its replication member after `Ready`
//!    (no leave: the node stays a member, only its process changes) and
//!    sends [`wire::ToSuccessor::Replication`] with the member's
//!    generation; S then starts the same member on the same sockets.
//!    Datagrams that arrive meanwhile wait in the sockets' queues.
//!
//! If S fails at any point before `Ready` (cannot start, bad configuration,
//! a socket it cannot use, a crash, no answer within
//! `upgrade.ready_timeout_secs`), P kills it, logs why and keeps serving as
//! if nothing happened: it never stopped accepting.
//!
//! What does not move: each shard's affinity bindings (clients are bound
//! afresh by S, by the same scoring), the counters behind the metrics (they
//! restart at zero, a counter reset to Prometheus), the discovery API's
//! per-client rate limits, the DNS reply cache, and TLS session state
//! (clients resuming a session do a full handshake). The routing table is
//! `routing.db`, which S reads at start.
//!
//! Modules: [`wire`] (messages, sans-IO), [`channel`] (the socket pair and
//! descriptor passing), [`sockets`] (the registry and what was inherited),
//! [`successor`] (P's side), [`descendants`] (killing a failed S with
//! everything it started), [`inherit`] (S's side), [`control_socket`]
//! (`edgeproxy upgrade`), [`target`] (`edgeproxy upgrade --pid`),
//! [`config`] (`[upgrade]`). [`Upgrades`] is what the
//! control loop drives.

pub mod channel;
pub mod client;
pub mod config;
pub mod control_socket;
pub mod descendants;
pub mod inherit;
pub mod sockets;
pub mod successor;
pub mod target;
pub mod wire;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use successor::{Successor, UpgradeError};

/// The data plane's listeners as registry entries (`listener:<name>`, one
/// descriptor per socket in group order).
pub fn listener_entries(
    listeners: &[engine::RunningListener],
) -> std::io::Result<Vec<(String, Vec<OwnedFd>)>> {
    listeners
        .iter()
        .map(|l| {
            let fds = l
                .sockets
                .iter()
                .map(|fd| fd.try_clone())
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok((format!("listener:{}", l.spec.name), fds))
        })
        .collect()
}

/// Upgrade requests and the attempt in flight, for the control loop.
///
/// The control loop calls [`Upgrades::begin`] on SIGUSR2 and polls
/// [`Upgrades::next_event`], which yields control-socket requests (also
/// passed to `begin`) and the outcome of an attempt: an attempt runs on a
/// blocking thread while the loop keeps serving. Requests arriving during
/// an attempt share its outcome.
pub struct Upgrades {
    ready_timeout: Duration,
    control: Option<control_socket::Server>,
    attempt: Option<Attempt>,
    waiting: Vec<tokio::sync::oneshot::Sender<String>>,
}

/// What [`Upgrades::next_event`] saw.
#[derive(Debug)]
pub enum UpgradeEvent {
    /// `edgeproxy upgrade` asked; pass the reply channel to
    /// [`Upgrades::begin`].
    Requested(tokio::sync::oneshot::Sender<String>),
    /// The attempt ended; `Ok`: the successor serves, this process must
    /// stop accepting and drain.
    Finished(Result<Successor, UpgradeError>),
}

/// How long a stop waits for an abandoned attempt to end: the attempt sees
/// the cancel within its check interval, then gives its new process up to 5
/// s to exit before killing it.
const ABANDON_WAIT: Duration = Duration::from_secs(15);

struct Attempt {
    task: tokio::task::JoinHandle<Result<Successor, UpgradeError>>,
    cancel: Arc<AtomicBool>,
}

impl Upgrades {
    /// Binds (or takes over) the control socket and serves it. Must run in
    /// the control runtime's context.
    pub fn start(config: &config::Upgrade) -> anyhow::Result<Upgrades> {
        use anyhow::Context;
        let control = match &config.control_socket {
            None => None,
            Some(path) => match control_socket::bind(path).with_context(|| {
                format!(
                    "upgrade control socket: cannot listen on {}",
                    path.display()
                )
            })? {
                None => None,
                Some(bound) => {
                    tracing::info!(path = %path.display(), "upgrade control socket bound");
                    Some(control_socket::Server::serve(bound, path.clone())?)
                }
            },
        };
        Ok(Upgrades {
            ready_timeout: config.ready_timeout,
            control,
            attempt: None,
            waiting: Vec::new(),
        })
    }

    /// The next thing to act on: a request from the control socket (its
    /// reply channel), or the end of the attempt in flight. Never resolves
    /// while there is neither.
    pub async fn next_event(&mut self) -> UpgradeEvent {
        let requests = async {
            match &mut self.control {
                Some(server) => match server.requests.recv().await {
                    Some(r) => r,
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let finished = async {
            match &mut self.attempt {
                Some(attempt) => match (&mut attempt.task).await {
                    Ok(outcome) => outcome,
                    Err(e) => Err(UpgradeError::Sockets(std::io::Error::other(format!(
                        "upgrade task failed: {e}"
                    )))),
                },
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            r = requests => UpgradeEvent::Requested(r.reply),
            o = finished => UpgradeEvent::Finished(o),
        };
        if let UpgradeEvent::Finished(outcome) = &event {
            self.attempt = None;
            match outcome {
                Ok(s) => tracing::info!(pid = s.pid, exe = %s.exe.display(),
                    "upgrade: new process is ready; this one stops accepting and drains"),
                // Not a failure to serve on: this process is on its way out.
                Err(UpgradeError::Stopping) => tracing::info!(
                    "upgrade abandoned: this process is stopping; the new process was stopped"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "upgrade failed; this process keeps serving")
                }
            }
            self.answer(outcome);
        }
        event
    }

    /// Starts an attempt handing over `listeners` plus every registered
    /// socket, and telling the successor which certificates `tls` this
    /// process serves expired, unless one is running (then `reply` waits
    /// for that one).
    pub fn begin(
        &mut self,
        reply: Option<tokio::sync::oneshot::Sender<String>>,
        listeners: std::io::Result<Vec<(String, Vec<OwnedFd>)>>,
        tls: crate::tls::Predecessor,
    ) {
        self.waiting.extend(reply);
        if self.attempt.is_some() {
            tracing::info!("upgrade already in progress; this request waits for its outcome");
            return;
        }
        let sockets = listeners.and_then(|mut all| {
            all.extend(sockets::registered()?);
            Ok(all)
        });
        let sockets = match sockets {
            Ok(s) => s,
            Err(e) => {
                let e = UpgradeError::Sockets(e);
                tracing::error!(error = %e, "upgrade failed; this process keeps serving");
                self.answer(&Err(e));
                return;
            }
        };
        tracing::info!("upgrade requested: starting the new binary");
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancel);
        let timeout = self.ready_timeout;
        let task =
            tokio::task::spawn_blocking(move || successor::start(sockets, &tls, timeout, &flag));
        self.attempt = Some(Attempt { task, cancel });
    }

    fn answer(&mut self, outcome: &Result<Successor, UpgradeError>) {
        // "error": the running process keeps serving; "stopping": it does
        // not (a stop signal arrived during the attempt).
        let line = match outcome {
            Ok(s) => format!("ok pid={}\n", s.pid),
            Err(e @ UpgradeError::Stopping) => format!("stopping {e}\n"),
            Err(e) => format!("error {e}\n"),
        };
        for reply in self.waiting.drain(..) {
            let _ = reply.send(line.clone());
        }
    }

    /// An attempt is in flight: a successor may have read the config file
    /// already.
    pub fn pending(&self) -> bool {
        self.attempt.is_some()
    }

    /// This process serves now; a successor owns the control socket's
    /// file from here on (its predecessor no longer removes it).
    pub fn serving(&mut self) {
        if let Some(c) = &mut self.control {
            c.own();
        }
    }

    /// After a hand-off: stop serving the control socket (the successor
    /// serves it now; its file stays).
    pub fn handed_over(&mut self) {
        if let Some(c) = &mut self.control {
            c.stop();
        }
    }

    /// Whether an `edgeproxy upgrade` client has yet to receive its answer
    /// (the old process keeps its runtime going until it has, or its drain
    /// ends).
    pub fn replying(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.busy())
    }

    /// On a plain stop: abandon an attempt in flight and wait (at most
    /// [`ABANDON_WAIT`]) until its new process and what that started are
    /// killed, so that this process's last lines tell how the attempt ended
    /// (QA: "killed the processes the new process started" came after
    /// "shutdown complete"); then remove the control socket's file.
    pub async fn shut_down(&mut self) {
        if let Some(attempt) = &self.attempt {
            attempt.cancel.store(true, Ordering::Relaxed);
        }
        for reply in self.waiting.drain(..) {
            let _ = reply.send(format!("stopping {}\n", UpgradeError::Stopping));
        }
        if let Some(attempt) = self.attempt.take() {
            match tokio::time::timeout(ABANDON_WAIT, attempt.task).await {
                Ok(Ok(Ok(successor))) => tracing::warn!(pid = successor.pid,
                    "upgrade: the new process got ready just as this one was told to stop; it serves, this one stops"),
                Ok(Ok(Err(UpgradeError::Stopping))) => tracing::info!(
                    "upgrade abandoned: this process is stopping; the new process was stopped"
                ),
                Ok(Ok(Err(e))) => tracing::info!(error = %e,
                    "upgrade abandoned: this process is stopping"),
                Ok(Err(e)) => tracing::error!(error = %e, "upgrade task failed"),
                Err(_) => tracing::warn!(wait_secs = ABANDON_WAIT.as_secs(),
                    "upgrade: the abandoned attempt did not end in time; stopping without it"),
            }
        }
        if let Some(c) = &mut self.control {
            c.remove();
        }
    }
}

/// Every data-plane listener's sockets for an engine of `shards` shards:
/// taken over from a predecessor when it handed over a socket for the same
/// listener on the same address, bound afresh otherwise.
pub fn listener_groups(
    specs: Vec<engine::ListenerSpec>,
    shards: usize,
) -> Result<Vec<(engine::ListenerSpec, engine::listener::BoundGroup)>, engine::EngineError> {
    specs
        .into_iter()
        .map(|spec| {
            let group = match sockets::take_listener_group(&spec.name, spec.addr) {
                Some(inherited) => {
                    let count = inherited.len();
                    let group = engine::listener::adopt_group(inherited, shards).map_err(
                        |cause| engine::EngineError::Bind {
                            listener: spec.name.to_string(),
                            addr: spec.addr,
                            cause,
                        },
                    )?;
                    tracing::info!(listener = %spec.name, addr = %group.local_addr, inherited = count,
                        sockets = group.sockets.len(), "upgrade: took over listener");
                    group
                }
                None => engine::Engine::bind_listener(&spec, shards)?,
            };
            Ok((spec, group))
        })
        .collect()
}
