//! The accept loop of the control plane's HTTP listeners: the discovery API
//! and the metrics/probe listener.
//!
//! Ours rather than `axum::serve`, so that connections are bounded (count,
//! request-head read time, lifetime): both listeners share the control
//! thread with the routing reload, and their descriptors come out of the
//! reserve the connection limit sets aside (`crate::fd_limit`). A client
//! that opens sockets and sends nothing, or half a request, must neither
//! pile up tasks there nor take the descriptors the data plane needs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

/// A request's head must arrive within this (also the longest a kept-alive
/// connection may sit idle between requests: hyper starts the clock when it
/// starts reading a head).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed (after its request in flight) at this age.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// How long a connection past its lifetime may take to finish the request
/// in flight.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head read.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The client's address, attached to each request as an extension.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Accepts connections and serves each in its own task, at most
/// `max_connections` at once: further clients wait in the kernel's accept
/// queue (they hold no descriptor of ours there). `what` names the listener
/// in logs.
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    max_connections: usize,
    what: &'static str,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone().layer(axum::Extension(Peer(peer))));
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(FINISH_TIMEOUT, conn).await;
        });
    }
}
