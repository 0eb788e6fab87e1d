//! Giving a pooled socket to the client that took it, so that a socket the
//! backend closed a moment ago never costs the client its connection.
//!
//! The check at take time ([`check::health`]) sees a close only once the
//! backend's FIN or RST has arrived; one that is still on the wire (a backend
//! that closes idle connections after N seconds, 50 ms away) passes it. So
//! the first exchange is guarded, without reading a byte that is not ours to
//! read (only readiness is awaited, and the socket is looked at with
//! `poll(2)` and `TCP_INFO`):
//!
//! 1. Wait for the client's first bytes, or for the backend to move first.
//!    A backend that closes now has received nothing of the client's: the
//!    caller connects fresh, as on a miss. A backend that sends bytes now
//!    speaks first (see [`super::SpeaksFirst`]): its greeting stays in the
//!    socket for the client.
//! 2. Write the PROXY header (only now, never at pre-connect: it names the
//!    client) and the client's first bytes, keeping a copy of them.
//! 3. Wait until the backend's TCP acknowledged those bytes
//!    (`tcpi_bytes_acked`), or until the backend moves. A backend that
//!    closed the socket before our bytes reached it answers them with a
//!    reset and never acknowledges them: then they were not delivered, and
//!    the caller sends them again on a fresh connection. Acknowledged bytes
//!    are never sent twice (the backend may have acted on them).
//!
//! The client's "first bytes" are what the backend is to receive first: on a
//! plain listener the bytes of the client's first read, on a TLS listener
//! the plaintext of the client's first records after the handshake (the
//! handshake itself is between the client and this proxy, so it never
//! reaches the backend). [`ClientSide`] says where they come from.
//!
//! Bytes of which none is acknowledged after the patience (the connect
//! timeout) went to a host that fell silent: the socket is reset, so that they are
//! never delivered later, and they are sent on a fresh connection, whose
//! connect times out as any other to that host and moves on to the next
//! backend.
//!
//! Step 3 runs while the backend works on the request, so a request/response
//! client waits no longer than it would anyway: the acknowledgement arrives
//! with (or before) the answer. A client that streams a long upload waits
//! one backend round trip before its second chunk moves.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::time::{Duration, Instant};

use futures_util::future::{select, Either};

use super::check::{self, Health};
use crate::proxy_protocol::V2_MAX_ENCODED;
use crate::rt::{self, Chunk, TcpStream};

/// An encoded PROXY v2 header and its length.
pub(crate) type Header = ([u8; V2_MAX_ENCODED], usize);

/// How a hand-over ended.
pub(crate) enum HandOver {
    /// The pooled socket carries the connection: the header and `sent`
    /// bytes of the client's (maybe none) are written; splice from here.
    Live { sent: usize },
    /// The backend had closed the socket and received nothing of the
    /// client's: connect fresh and send `first` (after the header), as on a
    /// miss. `replayed` says whether `first` had been sent on the stale
    /// socket.
    Stale {
        first: Option<Chunk>,
        replayed: bool,
    },
    /// The client closed before sending anything.
    ClientClosed,
}

/// What one read from a readable client socket gave.
pub(crate) enum FirstRead {
    /// Bytes for the backend.
    Bytes(Chunk),
    /// Nothing for the backend yet (a partial TLS record, a key update):
    /// wait for the client again.
    Nothing,
    /// The client closed without sending anything for the backend.
    Closed,
}

/// The client side of a hand-over: its socket (readiness is awaited on it)
/// and how a read from it turns into bytes for the backend.
pub(crate) trait ClientSide {
    /// What reading may fail with (the caller's error type).
    type Error: From<io::Error>;

    fn socket(&self) -> &TcpStream;

    /// Reads once from [`ClientSide::socket`], which is readable. Never
    /// called again after it returned `Bytes` or `Closed`.
    async fn read_first(&self, buffer_len: usize) -> Result<FirstRead, Self::Error>;
}

/// A plain-TCP client: its first read is its first bytes.
pub(crate) struct Plain<'a>(pub &'a TcpStream);

impl ClientSide for Plain<'_> {
    type Error = io::Error;

    fn socket(&self) -> &TcpStream {
        self.0
    }

    async fn read_first(&self, buffer_len: usize) -> io::Result<FirstRead> {
        Ok(match rt::read_chunk(self.0, buffer_len).await? {
            Some(first) => FirstRead::Bytes(first),
            None => FirstRead::Closed,
        })
    }
}

/// Hands `backend` (just taken from the pool) to `client`; see the module
/// documentation. `pending` holds bytes for the backend the caller has
/// already (those after a PROXY header from a load balancer, or data that
/// came with the client's last TLS handshake flight); `ack_patience` bounds
/// step 3; `spoke` is called when the backend moved first with bytes.
pub(crate) async fn hand_over<C: ClientSide>(
    backend: &TcpStream,
    client: &C,
    header: Option<Header>,
    pending: Option<Chunk>,
    buffer_len: usize,
    ack_patience: Duration,
    spoke: impl FnOnce(),
) -> Result<HandOver, C::Error> {
    let fd = backend.as_raw_fd();
    // Step 1.
    let first = match pending {
        Some(first) => first,
        None => loop {
            // Which side moved first; the other's wait is dropped (a poll,
            // so nothing is lost).
            let moved = match select(
                pin!(rt::readable(client.socket())),
                pin!(rt::readable(backend)),
            )
            .await
            {
                Either::Left((ready, _)) => Either::Left(ready),
                Either::Right((ready, _)) => Either::Right(ready),
            };
            match moved {
                Either::Left(ready) => {
                    ready?;
                    match client.read_first(buffer_len).await? {
                        FirstRead::Bytes(first) => break first,
                        FirstRead::Nothing => continue,
                        FirstRead::Closed => return Ok(HandOver::ClientClosed),
                    }
                }
                Either::Right(ready) => {
                    ready?;
                    match check::health(fd) {
                        Health::Closed => {
                            return Ok(HandOver::Stale {
                                first: None,
                                replayed: false,
                            })
                        }
                        Health::Spoke => {
                            spoke();
                            write_header(backend, header).await?;
                            return Ok(HandOver::Live { sent: 0 });
                        }
                        // Readiness without bytes or a close: look again.
                        Health::Quiet => continue,
                    }
                }
            }
        },
    };
    if check::health(fd) == Health::Closed {
        return Ok(HandOver::Stale {
            first: Some(first),
            replayed: false,
        });
    }
    // Step 2.
    let Some(acked_before) = check::bytes_acked(fd) else {
        // The kernel does not say what it delivered: no guard possible.
        let sent = first.len();
        write_header(backend, header).await?;
        rt::write_chunk(backend, first).await?;
        return Ok(HandOver::Live { sent });
    };
    let copy = first.as_slice().to_vec();
    let sent = (header.map_or(0, |(_, len)| len) + copy.len()) as u64;
    let written = async {
        write_header(backend, header).await?;
        rt::write_chunk(backend, first).await
    };
    if let Err(e) = written.await {
        // Refused outright (a reset already in): nothing was delivered.
        if check::bytes_acked(fd).unwrap_or(u64::MAX) < acked_before + sent {
            return Ok(HandOver::Stale {
                first: Some(Chunk::Owned(copy)),
                replayed: true,
            });
        }
        return Err(e.into());
    }
    // Step 3.
    let target = acked_before + sent;
    let acked = ack_watch(fd, target, ack_patience);
    let moved = match select(pin!(acked), pin!(rt::readable(backend))).await {
        Either::Left(((), _)) => None,
        Either::Right((ready, _)) => Some(ready),
    };
    match moved {
        // Not one byte acknowledged within the patience (a connect
        // timeout): the backend's host fell silent (power lost, a link
        // cut: no FIN, no reset ever comes): going on with it would hang
        // the client until the idle timeout, where a fresh connect times
        // out and tries the next backend. Reset the socket so that what it holds is never delivered later, and
        // connect fresh. (Some bytes acknowledged: the host lives and they
        // may not be sent twice.)
        None if check::bytes_acked(fd).is_some_and(|n| n <= acked_before) => {
            // SAFETY: `fd` is `backend`'s, open for as long as it is.
            let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
            Ok(HandOver::Stale {
                first: Some(Chunk::Owned(copy)),
                replayed: true,
            })
        }
        None => Ok(HandOver::Live { sent: copy.len() }),
        Some(ready) => {
            ready?;
            let delivered = check::bytes_acked(fd).is_some_and(|n| n >= target);
            if check::health(fd) == Health::Closed && !delivered {
                Ok(HandOver::Stale {
                    first: Some(Chunk::Owned(copy)),
                    replayed: true,
                })
            } else {
                Ok(HandOver::Live { sent: copy.len() })
            }
        }
    }
}

async fn write_header(backend: &TcpStream, header: Option<Header>) -> io::Result<()> {
    match header {
        Some((bytes, len)) => rt::write_bytes(backend, bytes, len).await,
        None => Ok(()),
    }
}

/// Resolves once `fd`'s peer acknowledged `target` bytes, or after
/// `patience` (then the caller goes on unguarded). Polls `TCP_INFO` with a
/// growing step (0.25 ms to 4 ms): the kernel has no wake-up for an
/// acknowledgement, and the watch lasts about one backend round trip.
async fn ack_watch(fd: std::os::fd::RawFd, target: u64, patience: Duration) {
    let deadline = Instant::now() + patience;
    let mut step = Duration::from_micros(250);
    loop {
        if check::bytes_acked(fd).is_none_or(|n| n >= target) || Instant::now() >= deadline {
            return;
        }
        rt::sleep(step).await;
        step = (step * 2).min(Duration::from_millis(4));
    }
}
