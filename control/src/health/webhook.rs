//! The optional transition webhook: each transition is POSTed as JSON to
//! `health.webhook_url`, one at a time, from a bounded queue. A slow or dead
//! receiver costs queued events (dropped and counted once the queue is
//! full, each failure logged), never the checker's progress.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;

/// Events waiting to be sent before new ones are dropped.
pub const QUEUE: usize = 1024;
/// Time allowed for one POST, connect included.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Where to POST: `http://host:port/path` (host an IP address or a name
/// resolved at each send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .trim()
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?;
                (h, port)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(Target {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// The sending side: queue an event, never wait.
#[derive(Clone)]
pub struct Webhook {
    tx: tokio::sync::mpsc::Sender<serde_json::Value>,
    pub dropped: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub sent: Arc<AtomicU64>,
}

impl Webhook {
    /// Starts the sender task on the current Tokio runtime.
    pub fn start(target: Target) -> Webhook {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<serde_json::Value>(QUEUE);
        let hook = Webhook {
            tx,
            dropped: Arc::default(),
            failed: Arc::default(),
            sent: Arc::default(),
        };
        let (failed, sent) = (Arc::clone(&hook.failed), Arc::clone(&hook.sent));
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                match tokio::time::timeout(TIMEOUT, post(&target, &event)).await {
                    Ok(Ok(())) => {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(host = %target.host, error = %e, "health webhook failed");
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(host = %target.host, "health webhook timed out");
                    }
                }
            }
        });
        hook
    }

    pub fn send(&self, event: serde_json::Value) {
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn post(target: &Target, event: &serde_json::Value) -> Result<(), String> {
    let addr: SocketAddr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("resolve: {e}"))?
        .next()
        .ok_or("resolve: no address")?;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http: {e}"))?;
    let conn = tokio::spawn(conn);
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let req = hyper::Request::post(target.path.as_str())
        .header(hyper::header::HOST, &target.host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "edgeproxy-health")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let outcome = sender.send_request(req).await;
    conn.abort();
    let resp = outcome.map_err(|e| format!("http: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("status {}", resp.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("http://127.0.0.1:9000/hooks/health").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 9000, "/hooks/health")
        );
        let t = Target::parse("http://alerts.internal").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
        let t = Target::parse("http://[::1]:81/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 81));
        assert!(Target::parse("https://x").is_err());
        assert!(Target::parse("http://:80/").is_err());
        assert!(Target::parse("http://h:notaport/").is_err());
    }
}
