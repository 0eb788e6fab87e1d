//! The transport: QUIC (quinn) on the control thread's Tokio runtime, one
//! UDP socket for both directions, mutual TLS from the cluster CA (`pki`).
//!
//! Each message travels on a unidirectional stream of its own (no head-of-
//! line blocking between a large sync exchange and a small broadcast). To
//! each peer this node keeps one outgoing connection, opened on first use
//! and kept alive, fed by a bounded queue: when a peer cannot keep up (or is
//! unreachable) the newest messages beyond the queue are dropped and
//! counted — anti-entropy repairs whatever they carried. Incoming
//! connections are accepted from any peer whose certificate the cluster CA
//! signed; a handshake that fails verification is reported and closed.
//!
//! On a connection that negotiated [`ALPN_FRAMED`] (both ends of this
//! version or later) each message is framed and large ones compressed
//! (`frame`); on one that negotiated the first ALPN, sent as it is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::frame;
use super::pki::{ClusterPki, PkiError, ALPNS, ALPN_FRAMED, SERVER_NAME};
use super::wire::MAX_MESSAGE_BYTES;

/// Messages queued per peer before new ones are dropped.
const QUEUE: usize = 1024;
/// A connection attempt not finished by then fails (quinn's own limit is
/// the idle timeout, 30 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// After a failed connection attempt, messages to that peer are dropped for
/// this long instead of each waiting for its own attempt.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// What the transport reports to the driver.
#[derive(Debug)]
pub enum TransportEvent {
    /// A message (one stream's bytes) from the peer at `from`.
    Message { from: SocketAddr, bytes: Vec<u8> },
    /// An incoming connection failed its handshake. `label`: "secret" when
    /// TLS refused it (a certificate not signed by this cluster's CA),
    /// "handshake" when it was cut short (aborted, timed out, reset: the
    /// network or a half-open firewall, not the secret).
    Refused {
        from: SocketAddr,
        label: &'static str,
        reason: String,
    },
    /// We could not reach a peer.
    Unreachable { to: SocketAddr, reason: String },
    /// A framed message from the peer at `from` did not decode (a broken
    /// or hostile peer: the cluster CA signed its certificate).
    Undecodable { from: SocketAddr, reason: String },
}

/// Counters, shared with the link tasks.
#[derive(Debug, Default)]
pub struct TransportStats {
    pub dropped: AtomicU64,
    /// Bytes written on streams: messages as framed and compressed.
    pub wire_bytes_sent: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
}

struct Link {
    tx: mpsc::Sender<Vec<u8>>,
    /// Smoothed round trip of the connection, µs (0: none yet).
    rtt_us: Arc<AtomicU64>,
}

pub struct Transport {
    endpoint: quinn::Endpoint,
    links: HashMap<SocketAddr, Link>,
    events: mpsc::UnboundedSender<TransportEvent>,
    pub stats: Arc<TransportStats>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot start QUIC on the transport socket: {0}")]
    Endpoint(std::io::Error),
}

impl Transport {
    /// Starts QUIC on `socket` (bound, non-blocking). Must run inside the
    /// Tokio runtime. Returns the transport and the stream of its events.
    pub fn start(
        socket: std::net::UdpSocket,
        pki: &ClusterPki,
    ) -> Result<(Transport, mpsc::UnboundedReceiver<TransportEvent>), TransportError> {
        Transport::start_speaking(socket, pki, ALPNS)
    }

    /// [`Transport::start`] offering and accepting only `alpns` (tests: a
    /// POP of an earlier version).
    pub(crate) fn start_speaking(
        socket: std::net::UdpSocket,
        pki: &ClusterPki,
        alpns: &[&[u8]],
    ) -> Result<(Transport, mpsc::UnboundedReceiver<TransportEvent>), TransportError> {
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(pki.quinn_server_speaking(alpns)?),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(TransportError::Endpoint)?;
        endpoint.set_default_client_config(pki.quinn_client_speaking(alpns)?);
        let (events, rx) = mpsc::unbounded_channel();
        tokio::spawn(accept_loop(endpoint.clone(), events.clone()));
        Ok((
            Transport {
                endpoint,
                links: HashMap::new(),
                events,
                stats: Arc::default(),
            },
            rx,
        ))
    }

    /// Queues `bytes` for the peer at `to`; false if dropped (queue full).
    pub fn send(&mut self, to: SocketAddr, bytes: Vec<u8>) -> bool {
        let link = self.links.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let rtt_us = Arc::new(AtomicU64::new(0));
            tokio::spawn(link_task(
                self.endpoint.clone(),
                to,
                rx,
                self.events.clone(),
                Arc::clone(&rtt_us),
                Arc::clone(&self.stats),
            ));
            Link { tx, rtt_us }
        });
        if link.tx.try_send(bytes).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The round trip to `peer` as QUIC measures it, once connected.
    pub fn rtt(&self, peer: SocketAddr) -> Option<Duration> {
        let us = self.links.get(&peer)?.rtt_us.load(Ordering::Relaxed);
        (us > 0).then(|| Duration::from_micros(us))
    }

    /// Forgets the link to a peer that left (its task ends, its connection
    /// closes).
    pub fn forget(&mut self, peer: SocketAddr) {
        self.links.remove(&peer);
    }

    /// Closes every connection, telling peers why.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }

    /// Closes every connection and waits (at most `patience`) until they
    /// are gone; then nothing in this process reads the socket any more
    /// (the endpoint's driver ends with its last handle). For a binary
    /// upgrade: the successor reads the same socket next.
    pub async fn close_and_wait(self, patience: Duration) {
        self.endpoint.close(0u32.into(), b"process upgraded");
        let endpoint = self.endpoint.clone();
        drop(self);
        let _ = tokio::time::timeout(patience, endpoint.wait_idle()).await;
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, events: mpsc::UnboundedSender<TransportEvent>) {
    while let Some(incoming) = endpoint.accept().await {
        let events = events.clone();
        tokio::spawn(async move {
            let from = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    let _ = events.send(TransportEvent::Refused {
                        from,
                        label: refusal_label(&e),
                        reason: e.to_string(),
                    });
                    return;
                }
            };
            let framed = framed(&conn);
            while let Ok(mut stream) = conn.accept_uni().await {
                let events = events.clone();
                tokio::spawn(async move {
                    match stream.read_to_end(MAX_MESSAGE_BYTES).await {
                        Ok(bytes) if !framed => {
                            let _ = events.send(TransportEvent::Message { from, bytes });
                        }
                        Ok(bytes) => match frame::decode(bytes, MAX_MESSAGE_BYTES) {
                            Ok(bytes) => {
                                let _ = events.send(TransportEvent::Message { from, bytes });
                            }
                            Err(e) => {
                                let _ = events.send(TransportEvent::Undecodable {
                                    from,
                                    reason: e.to_string(),
                                });
                            }
                        },
                        // Dropped in silence, a peer's oversized message was
                        // sent again at every exchange with nothing to say why.
                        Err(quinn::ReadToEndError::TooLong) => tracing::warn!(
                            peer = %from,
                            limit = MAX_MESSAGE_BYTES,
                            "replication: dropped a message larger than the limit"
                        ),
                        Err(_) => {}
                    }
                });
            }
        });
    }
}

/// Whether `conn` negotiated framed (maybe compressed) messages.
fn framed(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN_FRAMED)
}

/// TLS alerts travel as QUIC's crypto error codes 0x100–0x1ff (RFC 9001
/// §4.8): only those mean the peer's credentials were refused. Everything
/// else (the peer aborting a handshake its side gave up on, a timeout, a
/// reset) says the network failed; labelled "secret", it sent operators
/// comparing secrets when a firewall blocked the transport port one way.
fn refusal_label(e: &quinn::ConnectionError) -> &'static str {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => t.code,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        _ => return "handshake",
    };
    match u64::from(code) {
        0x100..=0x1ff => "secret",
        _ => "handshake",
    }
}

async fn link_task(
    endpoint: quinn::Endpoint,
    to: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    events: mpsc::UnboundedSender<TransportEvent>,
    rtt_us: Arc<AtomicU64>,
    stats: Arc<TransportStats>,
) {
    let mut conn: Option<quinn::Connection> = None;
    // What the connection negotiated: framed (maybe compressed) messages.
    let mut framed_conn = false;
    let mut failed_at: Option<tokio::time::Instant> = None;
    while let Some(bytes) = rx.recv().await {
        if conn.as_ref().is_some_and(|c| c.close_reason().is_some()) {
            conn = None;
        }
        if conn.is_none() {
            if failed_at.is_some_and(|at| at.elapsed() < RETRY_AFTER) {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            stats.connects.fetch_add(1, Ordering::Relaxed);
            match connect(&endpoint, to).await {
                Ok(c) => {
                    failed_at = None;
                    framed_conn = framed(&c);
                    conn = Some(c);
                }
                Err(reason) => {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    failed_at = Some(tokio::time::Instant::now());
                    let _ = events.send(TransportEvent::Unreachable { to, reason });
                    continue;
                }
            }
        }
        let c = conn.clone().expect("connected above");
        rtt_us.store(c.rtt().as_micros() as u64, Ordering::Relaxed);
        let stats = Arc::clone(&stats);
        let framed = framed_conn;
        tokio::spawn(async move {
            let bytes = match framed {
                // About a millisecond for a 512 KB batch of rows, on the
                // control runtime like every other step of replication.
                true => frame::encode(&bytes),
                false => bytes,
            };
            stats
                .wire_bytes_sent
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let sent = async {
                let mut s = c.open_uni().await.ok()?;
                s.write_all(&bytes).await.ok()?;
                s.finish().ok()
            };
            if sent.await.is_none() {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

async fn connect(endpoint: &quinn::Endpoint, to: SocketAddr) -> Result<quinn::Connection, String> {
    let connecting = endpoint
        .connect(to, SERVER_NAME)
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::keys::ClusterSecret;
    use crate::replication::pki::ALPN;
    use quinn::{ConnectionClose, ConnectionError, TransportErrorCode};

    struct Node {
        addr: SocketAddr,
        transport: Transport,
        events: mpsc::UnboundedReceiver<TransportEvent>,
    }

    fn node(id: &str, alpns: &[&[u8]]) -> Node {
        let secret = ClusterSecret::new("a shared secret of some length");
        let pki = ClusterPki::new(&secret, id).unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let (transport, events) = Transport::start_speaking(socket, &pki, alpns).unwrap();
        Node {
            addr,
            transport,
            events,
        }
    }

    /// ~400 KB of rows as an anti-entropy batch carries them.
    fn batch() -> Vec<u8> {
        (0..3000)
            .map(|k| format!(r#"{{"id":"b-{k}","app":"web","wg_ip":"10.78.{}.{}","port":80,"weight":1,"soft_limit":100}}"#, k / 250, k % 250))
            .collect::<String>()
            .into_bytes()
    }

    async fn message_from(n: &mut Node, from: SocketAddr) -> Vec<u8> {
        let wait = tokio::time::timeout(Duration::from_secs(10), n.events.recv());
        match wait.await.expect("no message within 10 s") {
            Some(TransportEvent::Message { from: f, bytes }) if f == from => bytes,
            other => panic!("expected a message from {from}, got {other:?}"),
        }
    }

    fn wire_bytes(n: &Node) -> u64 {
        n.transport.stats.wire_bytes_sent.load(Ordering::Relaxed)
    }

    /// Over real QUIC on loopback: between two nodes of this version a
    /// large message travels compressed and arrives whole; with a node that
    /// offers only the first ALPN (a POP not yet upgraded) it travels as it
    /// is, both ways, and arrives whole too.
    #[tokio::test]
    async fn large_messages_travel_compressed_where_both_ends_negotiated_it_and_plain_otherwise() {
        let mut new_a = node("a", ALPNS);
        let mut new_b = node("b", ALPNS);
        let mut old = node("old", &[ALPN]);
        let message = batch();

        assert!(new_a.transport.send(new_b.addr, message.clone()));
        assert_eq!(message_from(&mut new_b, new_a.addr).await, message);
        let compressed = wire_bytes(&new_a);
        assert!(
            compressed * 4 < message.len() as u64,
            "{compressed} bytes on the wire for {}",
            message.len()
        );

        assert!(new_a.transport.send(old.addr, message.clone()));
        assert_eq!(message_from(&mut old, new_a.addr).await, message);
        assert_eq!(wire_bytes(&new_a) - compressed, message.len() as u64);

        assert!(old.transport.send(new_a.addr, message.clone()));
        assert_eq!(message_from(&mut new_a, old.addr).await, message);
        assert_eq!(wire_bytes(&old), message.len() as u64);
    }

    fn closed(error_code: TransportErrorCode) -> ConnectionError {
        ConnectionError::ConnectionClosed(ConnectionClose {
            error_code,
            frame_type: None,
            reason: bytes::Bytes::new(),
        })
    }

    /// A handshake the peer gave up on (its side timed out behind a
    /// firewall that dropped one direction) was counted as a wrong secret.
    #[test]
    fn only_tls_alerts_are_refusals_of_the_secret() {
        // bad_certificate (42), decrypt_error (51): what a foreign CA gets.
        assert_eq!(
            refusal_label(&closed(TransportErrorCode::crypto(42))),
            "secret"
        );
        assert_eq!(
            refusal_label(&closed(TransportErrorCode::crypto(51))),
            "secret"
        );
        assert_eq!(
            refusal_label(&closed(TransportErrorCode::APPLICATION_ERROR)),
            "handshake"
        );
        assert_eq!(refusal_label(&ConnectionError::TimedOut), "handshake");
        assert_eq!(refusal_label(&ConnectionError::Reset), "handshake");
    }
}
