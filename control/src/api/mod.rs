//! The discovery API: backends register themselves, send heartbeats, and are
//! drained or removed over HTTP, compatible with the original edgeProxy's
//! auto-discovery API (same paths, JSON fields and defaults), plus drain,
//! update in place, and authentication.
//!
//! Call order: [`bind`] the socket while the process starts (before it
//! reports ready, so a taken port is a startup error), then, on the control
//! thread's Tokio runtime, [`Bound::serve`] spawns the HTTP server, and the
//! control loop feeds the [`Command`]s from [`next_commands`] to
//! [`execute_all`]. Handlers never touch `routing.db`: the control loop, which
//! owns the store and the reloader, does each write and publishes the new
//! snapshot before the client gets its answer (commands that queued up
//! together share one reload of the table).
//!
//! Registrations live in `routing.db` (they survive a restart). A registered
//! backend whose last heartbeat is older than `[api] heartbeat_ttl_secs` is
//! **kept, as expired**: routed as unhealthy (no new connections; open ones go
//! on), listed with `"state": "expired"`, and back in service with its next
//! heartbeat. Only `DELETE` removes it (the original dropped expired backends
//! from memory instead; here a restart of the proxy, or a network blip
//! longer than the TTL, does not force every backend to register again).
//! Rows not registered through the API (written by hand or by the original)
//! have no heartbeat and never expire.
//!
//! Security: with a token, every endpoint but `GET /health` needs
//! `Authorization: Bearer <token>`. Without one the API binds loopback only,
//! unless `allow_open` is set. Requests carrying an `Origin` header (web
//! pages) are refused; without a token, so are requests whose `Host` is a
//! name other than `localhost` (DNS rebinding; a request without `Host`
//! names nothing and is served).

pub mod auth;
pub mod client;
pub mod config;
mod http;
pub mod limit;
pub mod ops;
pub mod validate;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use engine::snapshot::SnapshotHandle;
use tokio::sync::mpsc;

pub use config::{Api as ApiConfig, Exposure};
pub use ops::{execute, execute_all, Command};

/// Commands queued for the control loop before handlers wait.
const QUEUE: usize = 64;

/// Connections served at once; more wait in the kernel's backlog. Set
/// aside in the descriptor reserve (`crate::fd_limit`).
pub const MAX_CONNECTIONS: usize = 256;

/// The API's socket, bound, not yet served.
pub struct Bound {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    config: ApiConfig,
    exposure: Exposure,
    mesh: Option<(
        crate::mesh::driver::ApiHooks,
        crate::mesh::status::StatusHandle,
    )>,
}

/// Binds the API's socket as [`ApiConfig::bind_plan`] decides and logs
/// `api listening addr=ADDR` with who can reach it. `None` when the API is
/// disabled.
pub fn bind(config: &ApiConfig) -> anyhow::Result<Option<Bound>> {
    if !config.enabled {
        return Ok(None);
    }
    let (addr, exposure) = config.bind_plan();
    // After a binary upgrade the socket is the previous process's.
    let listener = match crate::upgrade::sockets::take_tcp_listener("api", addr) {
        Some(inherited) => {
            crate::bounded_http::widen_backlog(&inherited);
            inherited
        }
        None => crate::bounded_http::listen(addr)
            .with_context(|| format!("discovery API: cannot listen on {addr}"))?,
    };
    crate::upgrade::sockets::register("api", &[std::os::fd::AsFd::as_fd(&listener)])
        .context("discovery API: cannot register the socket for upgrades")?;
    listener
        .set_nonblocking(true)
        .context("discovery API: cannot make the socket non-blocking")?;
    let addr = listener.local_addr().unwrap_or(addr);
    match exposure {
        Exposure::Token => {}
        // `asked` only when the address asked for was narrowed (it was
        // `asked=-` when loopback was asked for).
        Exposure::LoopbackOnly {
            narrowed_from: Some(asked),
        } => tracing::warn!(
            %asked,
            %addr,
            "discovery API has no token: it listens on loopback only, not on the address \
             asked for (set api.token or EDGEPROXY_API_TOKEN to serve other hosts, \
             or api.allow_open = true to serve them without a token)"
        ),
        Exposure::LoopbackOnly {
            narrowed_from: None,
        } => tracing::warn!(
            %addr,
            "discovery API has no token: it listens on loopback only \
             (set api.token or EDGEPROXY_API_TOKEN to serve other hosts, \
             or api.allow_open = true to serve them without a token)"
        ),
        Exposure::Open => tracing::warn!(
            "discovery API is OPEN: no token, and allow_open is set; anyone who \
             reaches it can change the routing table"
        ),
    }
    tracing::info!(%addr, auth = if config.token.is_some() { "token" } else { "none" },
        heartbeat_ttl_secs = config.heartbeat_ttl.as_secs(), "api listening");
    Ok(Some(Bound {
        listener,
        addr,
        config: config.clone(),
        exposure,
        mesh: None,
    }))
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The mesh, when it runs: `GET /api/v1/mesh`, and 6PN addresses for
    /// registrations that omit `ip`.
    pub fn with_mesh(
        mut self,
        mesh: Option<(
            crate::mesh::driver::ApiHooks,
            crate::mesh::status::StatusHandle,
        )>,
    ) -> Bound {
        self.mesh = mesh;
        self
    }

    /// Spawns the HTTP server on the current Tokio runtime; `snapshot` is what
    /// `/health` reports on and where live connection counts come from.
    /// `cluster`: replication's status and commands, for `GET
    /// /api/v1/cluster` and `DELETE /api/v1/cluster/members/{id}`;
    /// `readiness`: `/health` says 503 `draining` during a drain.
    /// `steering`: this POP's drain and BGP (`/api/v1/pop`, `/api/v1/bgp`).
    pub fn serve(
        self,
        snapshot: SnapshotHandle,
        cluster: Option<crate::replication::driver::ApiHooks>,
        readiness: crate::readiness::Readiness,
        steering: Option<crate::steering::Handle>,
    ) -> anyhow::Result<Server> {
        let listener = tokio::net::TcpListener::from_std(self.listener)
            .context("discovery API: cannot register the socket")?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(http::Shared {
            commands: tx,
            token: self.config.token.clone(),
            accept_token: self.config.accept_token.clone(),
            loopback_only: matches!(self.exposure, Exposure::LoopbackOnly { .. }),
            limiter: Mutex::new(limit::RateLimiter::new(
                self.config.rate_limit_per_sec,
                self.config.rate_limit_burst,
            )),
            max_body: self.config.max_body_bytes,
            snapshot,
            started: Instant::now(),
            cluster,
            readiness,
            mesh: self.mesh,
            steering,
        });
        let task = tokio::spawn(crate::bounded_http::accept_loop(
            listener,
            http::router(shared),
            MAX_CONNECTIONS,
            "api",
        ));
        Ok(Server { commands: rx, task })
    }
}

/// The running HTTP server. Dropping it stops it.
pub struct Server {
    commands: mpsc::Receiver<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Stops accepting connections (after a binary upgrade handed the
    /// socket on); requests on connections already open are still served
    /// as long as the control loop executes their commands.
    pub fn stop_accepting(&self) {
        self.task.abort();
        crate::upgrade::sockets::unregister("api");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The next commands for the control loop: the first to arrive and whatever
/// else is queued behind it by then (up to the queue's size), to run as one
/// batch ([`execute_all`]). Never resolves when there is no
/// server (the API is disabled), so it can sit in a `select!` either way.
pub async fn next_commands(server: &mut Option<Server>) -> Vec<Command> {
    let first = next_command(server).await;
    let mut all = vec![first];
    if let Some(s) = server {
        while all.len() < QUEUE {
            match s.commands.try_recv() {
                Ok(cmd) => all.push(cmd),
                Err(_) => break,
            }
        }
    }
    all
}

/// The next command for the control loop. Never resolves when there is no
/// server (the API is disabled), so it can sit in a `select!` either way.
pub async fn next_command(server: &mut Option<Server>) -> Command {
    match server {
        Some(s) => match s.commands.recv().await {
            Some(cmd) => cmd,
            // The server task ended (it never does on its own).
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
