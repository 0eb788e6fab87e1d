//! The accept loop of the control plane's HTTP listeners: the discovery API
//! and the metrics/probe listener.
//!
//! Ours rather than `axum::serve`, so that connections are bounded (count,
//! request-head read time, lifetime): both listeners share the control
//! thread with the routing reload, and their descriptors come out of the
//! reserve the connection limit sets aside (`crate::fd_limit`). A client
//! that opens sockets and sends nothing, or half a request, must neither
//! pile up tasks there nor take the descriptors the data plane needs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Notify, Semaphore};

/// The accept queue of the control plane's HTTP listeners. `std`'s
/// `TcpListener::bind` listens with a backlog of 128: a fleet of more
/// backends than that registering at once overflowed it, and the
/// connections it dropped waited for the client's SYN retransmission (1 s,
/// then 3 s) before they were even read. The kernel caps this at
/// `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: i32 = 4096;

/// A TCP listener on `addr` (`SO_REUSEADDR`, as `std` binds) with an accept
/// queue of [`LISTEN_BACKLOG`].
pub fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Widens the accept queue of a listener inherited at a binary upgrade to
/// [`LISTEN_BACKLOG`]: a predecessor from before it was set listened with
/// 128 (`listen(2)` again on a listening socket only resizes its queue).
pub fn widen_backlog(listener: &std::net::TcpListener) {
    if let Err(e) = socket2::SockRef::from(listener).listen(LISTEN_BACKLOG) {
        tracing::debug!(error = %e, "cannot widen an inherited listener's accept queue");
    }
}

/// A request's head must arrive within this (also the longest a kept-alive
/// connection may sit idle between requests: hyper starts the clock when it
/// starts reading a head).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed (after its request in flight) at this age.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// How long a connection past its lifetime may take to finish the request
/// in flight.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted, in bytes: the request line, the header
/// lines and the blank line that ends them. One byte more is a 431.
/// `max_buf_size` alone did not make it exact: hyper checks that only while
/// a head is incomplete, after reads that grow up to that size each, so a
/// head that arrived whole could be up to about twice as long (QA: a
/// 100,000-byte header got 200).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The client's address, attached to each request as an extension.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// One open connection, as the accept loop sees it.
#[derive(Default)]
struct Conn {
    /// A request is being served (its head has arrived).
    busy: AtomicBool,
    /// Asks the connection's task to close it.
    close: Notify,
}

/// Open connections by accept order.
type Open = Arc<Mutex<BTreeMap<u64, Arc<Conn>>>>;

/// Asks the oldest connection that is not serving a request (one still
/// sending its head, or kept alive between requests) to close. False when
/// every connection is serving one.
fn evict_oldest_idle(open: &Open) -> bool {
    let open = open.lock().unwrap_or_else(|p| p.into_inner());
    match open.values().find(|c| !c.busy.load(Ordering::Relaxed)) {
        Some(conn) => {
            conn.close.notify_one();
            true
        }
        None => false,
    }
}

/// Accepts connections and serves each in its own task, at most
/// `max_connections` at once. A client arriving when all are taken makes
/// the oldest connection that is not serving a request close (a client
/// sending half a request, or an idle kept-alive one): waiting for a free
/// slot instead let 16 half-sent requests hold every probe back for their
/// 10 s head timeout, again and again. When every connection is serving a
/// request, the new client waits for one to end. `what` names the listener
/// in logs.
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    max_connections: usize,
    what: &'static str,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let open: Open = Arc::default();
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if evict_oldest_idle(&open) {
                    tracing::debug!(listener = what, %peer,
                        "connection limit reached: closing the oldest connection not serving a request");
                }
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                slot
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn::default());
        let id = next_id;
        next_id += 1;
        open.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::clone(&conn));
        let marked = Arc::clone(&conn);
        let router =
            router
                .clone()
                .layer(axum::Extension(Peer(peer)))
                .layer(axum::middleware::from_fn(
                    move |request: axum::extract::Request, next: axum::middleware::Next| {
                        let conn = Arc::clone(&marked);
                        async move {
                            conn.busy.store(true, Ordering::Relaxed);
                            let response = next.run(request).await;
                            conn.busy.store(false, Ordering::Relaxed);
                            response
                        }
                    },
                ));
        let service = TowerToHyperService::new(router);
        let open = Arc::clone(&open);
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_header_size(MAX_HEAD_BYTES)
                .max_buf_size(MAX_HEAD_BYTES);
            let served = builder.serve_connection(TokioIo::new(stream), service);
            let mut served = std::pin::pin!(served);
            let closing = tokio::select! {
                _ = served.as_mut() => false,
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => true,
                // Evicted: closed at once unless a request is being served
                // (a half-sent head would otherwise be awaited).
                _ = conn.close.notified() => conn.busy.load(Ordering::Relaxed),
            };
            if closing {
                served.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(FINISH_TIMEOUT, served).await;
            }
            open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }
}
