//! The per-connection access log (`[log] access = true`): one line at info
//! level when a connection ends, with what HAProxy's `tcplog` gives: client,
//! listener, app, backend, bytes each way, duration and how it ended.
//!
//! With the log on, a connection keeps a [`Tally`] (plain `Cell`s, no
//! sharing; boxed, so a connection without it carries one pointer, not the
//! tally), filled as it goes: one non-atomic add per chunk. The setting is
//! read when the connection starts. Lines go to the `edgeproxy::access`
//! target, so they can be routed or filtered apart from the rest of the log.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// The `tracing` target of access-log lines.
pub const TARGET: &str = "edgeproxy::access";

/// What one connection did, for its access-log line.
pub(crate) struct Tally {
    pub started: Instant,
    /// The client: the TCP peer, or the address a PROXY header carried.
    pub client: Cell<SocketAddr>,
    /// Bytes client → backend and backend → client.
    pub up: Cell<u64>,
    pub down: Cell<u64>,
    /// The backend the connection was proxied to, once connected.
    pub backend: Cell<Option<SocketAddr>>,
    /// Its id.
    pub backend_id: RefCell<Option<Arc<str>>>,
}

impl Tally {
    pub fn new(peer: SocketAddr) -> Self {
        Tally {
            started: Instant::now(),
            client: Cell::new(peer),
            up: Cell::new(0),
            down: Cell::new(0),
            backend: Cell::new(None),
            backend_id: RefCell::new(None),
        }
    }
}

/// Writes the access-log line of a connection that ended with `end`
/// (`closed`, or the reason it was cut, see `ConnError::reason`) and
/// `error` (its message, empty when it closed normally).
pub(crate) fn log(listener: &str, app: Option<&str>, tally: &Tally, end: &str, error: &str) {
    let backend = tally
        .backend
        .get()
        .map_or_else(|| "-".to_string(), |a| a.to_string());
    let id = tally.backend_id.borrow();
    tracing::info!(
        target: TARGET,
        client = %tally.client.get(),
        listener,
        app = app.unwrap_or("*"),
        backend = %backend,
        backend_id = id.as_deref().unwrap_or("-"),
        bytes_up = tally.up.get(),
        bytes_down = tally.down.get(),
        duration_ms = tally.started.elapsed().as_millis() as u64,
        end,
        error = if error.is_empty() { "-" } else { error },
        "access"
    );
}
