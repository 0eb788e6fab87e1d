//! A TLS-terminated client connection, driven by hand with rustls's
//! unbuffered API: rustls is sans-IO, and in its unbuffered form it also
//! keeps no buffers of its own. Records are decrypted in place in the
//! buffer the shard read them into, and encrypted records go into one
//! outbox the session owns, so the shard keeps its own io_uring reads and
//! sends with no TLS adapter layer and no copy into rustls.
//!
//! The buffered `ServerConnection` this replaces copied every byte read
//! into its own deframing buffer in pieces of at most 4 KiB, zeroing and
//! reallocating that buffer as it grew and shrank around each 16 KiB record
//! (README, "TLS bulk: rustls's unbuffered API").
//!
//! Both directions share one connection in a `RefCell`; a borrow is never
//! held across an await. Writes to the client socket go through one async
//! lock, and every record (handshake, alert, key update, data) goes through
//! the outbox in the order it was made, so records never interleave or
//! overtake each other.

use std::cell::{Cell, RefCell};
use std::io;
use std::sync::Arc;

use futures_util::lock::Mutex;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;

use crate::passive::BackendSeen;
use crate::pool::handover::{ClientSide, FirstRead};
use crate::rt::{self, Chunk, TcpStream};
use crate::warm_buffers;

/// Why a TLS session failed. Each message includes its cause, and no
/// variant also names it as `source`, so `{:#}` error chains print it once.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: {0}")]
    Protocol(rustls::Error),
    #[error("client closed the connection during the handshake")]
    ClosedInHandshake,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Protocol(e)
    }
}

pub(crate) struct TlsSession {
    conn: RefCell<UnbufferedServerConnection>,
    /// Records made and not yet sent to the client.
    outbox: RefCell<Outbox>,
    /// The outbox's other buffer, filled while this one is being sent.
    spare_out: Cell<Vec<u8>>,
    /// Received bytes that did not yet make a whole record when the
    /// handshake (or a pooled backend's first read) ended: the front of
    /// `pump_up`'s first read.
    carried: Cell<Vec<u8>>,
    /// The client's close_notify arrived before the pumps started: with its
    /// last handshake flight (TLS 1.3 lets Finished, data and close_notify
    /// share one write), or with its first data to a pooled backend.
    closed_in_handshake: Cell<bool>,
    /// Serialises writes of TLS records to the client socket.
    client_write: Mutex<()>,
    sni: Option<String>,
}

/// Encoded records waiting to be sent. The buffer keeps the length it was
/// once initialised to (`used` marks the records in it), so encrypting into
/// it never zeroes it first.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
    used: usize,
}

impl Outbox {
    /// At least `need` bytes to write records into, after those waiting.
    fn room(&mut self, need: usize) -> &mut [u8] {
        if self.buf.len() < self.used + need {
            self.buf.resize(self.used + need, 0);
        }
        &mut self.buf[self.used..]
    }
}

/// What rustls made of received bytes.
struct Absorbed {
    /// Bytes used from the front of those passed (the rest do not make a
    /// whole record yet).
    consumed: usize,
    /// The client sent close_notify.
    closed: bool,
}

/// A buffer that carried at least this much is kept for the next read or
/// flush of the same connection: a bulk transfer reuses one warm buffer
/// (a fresh one per read cost a malloc, page faults and a cold copy; see
/// README, TLS bulk). A smaller one is freed, so an idle connection holds none.
const KEEP_BUFFER_FROM: usize = 16 * 1024;

/// Gives `buf` back for reuse, or drops it when it `carried` little.
fn keep_if_bulk(buf: Vec<u8>, carried: usize) -> Vec<u8> {
    if carried >= KEEP_BUFFER_FROM {
        buf
    } else {
        Vec::new()
    }
}

/// Where one direction of a TLS connection reads from: the shard's ring
/// until a read fills a whole ring buffer, then (bulk) `recv(2)` from the
/// task into a buffer of the direction's own while the socket has bytes
/// waiting.
///
/// Measured with perf (f) on an Intel Xeon VM (README, "TLS bulk: reads
/// from the task"): TLS upload CPU per GB −20 % in some runs and level in
/// others, download a few per cent at most. `recv(2)` cannot take a buffer
/// from the ring (the kernel picks those), so the flow keeps one of its own
/// while it reads.
///
/// When a bulk direction finds nothing waiting it gives its buffer to the
/// shard's [`warm_buffers`] and waits for readiness (one io_uring POLL,
/// no buffer held, so a paused connection holds none); the next read lands
/// in the shard's most recently used buffer instead of the ring's coldest
/// (README, "TLS bulk at a fixed rate"). A read after such a wait that
/// brings less than a quarter of a buffer ends bulk mode: the flow went
/// back to small messages, which the ring serves with one operation per
/// read.
///
/// Bytes the caller could not use yet (a TLS record cut by the read) are
/// carried: the next chunk begins with them, and a direction carrying bytes
/// keeps its buffer while it waits.
///
/// A flow whose bytes keep waiting never has to wait for them, so every
/// [`rt::YIELD_AFTER`] bytes read it lets the shard's other tasks run.
struct Reads {
    /// The direction's own buffer; it holds the carried bytes, if any.
    own: Vec<u8>,
    bulk: bool,
    /// Bytes read from the task since this direction last let others run.
    since_yield: usize,
}

impl Reads {
    fn new() -> Reads {
        Reads {
            own: Vec::new(),
            bulk: false,
            since_yield: 0,
        }
    }

    /// Starts with `carried` bytes, which the first chunk will begin with.
    fn carrying(carried: Vec<u8>) -> Reads {
        Reads {
            own: carried,
            ..Reads::new()
        }
    }

    /// The next bytes from `stream`, after any carried ones; `Ok(None)` at
    /// end of stream (carried bytes are then dropped: they never made a
    /// whole record).
    async fn next(&mut self, stream: &TcpStream, buffer_len: usize) -> io::Result<Option<Chunk>> {
        let mut waited = false;
        while self.bulk {
            if self.since_yield >= rt::YIELD_AFTER {
                self.since_yield = 0;
                rt::yield_now().await;
            }
            // The direction's own buffer while it reads back to back (or
            // carries bytes), else the shard's warmest.
            let mut buf = std::mem::take(&mut self.own);
            if buf.capacity() - buf.len() < buffer_len / 2 {
                if buf.is_empty() {
                    buf = warm_buffers::take(buffer_len);
                } else {
                    buf.reserve(buffer_len);
                }
            }
            let carried = buf.len();
            match rt::recv_now(stream, &mut buf)? {
                Some(0) => {
                    warm_buffers::give(buf);
                    return Ok(None);
                }
                Some(n) => {
                    self.since_yield += n;
                    self.bulk = !waited || n >= buffer_len / 4;
                    return Ok(Some(Chunk::Owned(buf)));
                }
                None => {
                    if carried == 0 {
                        warm_buffers::give(buf);
                    } else {
                        self.own = buf;
                    }
                    rt::readable(stream).await?;
                    waited = true;
                }
            }
        }
        let chunk = rt::read_chunk(stream, buffer_len).await?;
        self.bulk = chunk.as_ref().is_some_and(|c| c.len() >= buffer_len);
        if self.own.is_empty() {
            return Ok(chunk);
        }
        let mut buf = std::mem::take(&mut self.own);
        match chunk {
            Some(chunk) => {
                buf.extend_from_slice(chunk.as_slice());
                Ok(Some(Chunk::Owned(buf)))
            }
            None => {
                warm_buffers::give(buf);
                Ok(None)
            }
        }
    }

    /// Takes back a chunk `next` returned once its first `used` bytes are
    /// dealt with; the rest are carried to the front of the next chunk. A
    /// ring buffer goes back to the ring, a buffer of a direction no longer
    /// in bulk mode (and carrying nothing) to the shard's warm buffers.
    fn recycle(&mut self, chunk: Chunk, used: usize) {
        match chunk {
            Chunk::Owned(mut buf) => {
                // At most one record moves: the tail a read cut.
                buf.drain(..used.min(buf.len()));
                if self.bulk || !buf.is_empty() {
                    self.own = buf;
                } else {
                    warm_buffers::give(buf);
                }
            }
            Chunk::Pooled(ring) => {
                if let Some(rest) = ring.get(used..).filter(|rest| !rest.is_empty()) {
                    let mut buf = warm_buffers::take(rest.len());
                    buf.extend_from_slice(rest);
                    self.own = buf;
                }
            }
        }
    }
}

impl Drop for Reads {
    fn drop(&mut self) {
        warm_buffers::give(std::mem::take(&mut self.own));
    }
}

impl TlsSession {
    /// Runs the handshake. Returns the session and any application data that
    /// arrived with the client's last handshake flight.
    /// `initial` holds TLS bytes already read (those that followed a PROXY
    /// protocol header).
    pub(crate) async fn accept(
        client: &TcpStream,
        config: Arc<ServerConfig>,
        initial: Option<Chunk>,
        buffer_len: usize,
    ) -> Result<(TlsSession, Option<Chunk>), TlsError> {
        let mut session = TlsSession {
            conn: RefCell::new(UnbufferedServerConnection::new(config)?),
            outbox: RefCell::new(Outbox::default()),
            spare_out: Cell::new(Vec::new()),
            carried: Cell::new(Vec::new()),
            closed_in_handshake: Cell::new(false),
            client_write: Mutex::new(()),
            sni: None,
        };
        // Handshake flights are small: gathered by copy, not in place.
        let mut received = initial.map_or_else(Vec::new, |c| c.as_slice().to_vec());
        let mut early = Vec::new();
        loop {
            let absorbed = session.absorb(&mut received, &mut early);
            if session.sni.is_none() {
                session.sni = crate::tls::take_resolved_sni();
            }
            match absorbed {
                Ok(absorbed) => {
                    received.drain(..absorbed.consumed);
                    if absorbed.closed {
                        session.closed_in_handshake.set(true);
                    }
                }
                Err(e) => {
                    // Tell the client why (the alert is in the outbox).
                    let _ = session.flush(client).await;
                    return Err(e);
                }
            }
            // The server's flight, or (the handshake done) its session
            // tickets.
            session.flush(client).await?;
            if !session.conn.borrow().is_handshaking() {
                break;
            }
            let Some(chunk) = rt::read_chunk(client, buffer_len).await? else {
                return Err(TlsError::ClosedInHandshake);
            };
            received.extend_from_slice(chunk.as_slice());
        }
        session.carried.set(received);
        Ok((session, (!early.is_empty()).then_some(Chunk::Owned(early))))
    }

    pub(crate) fn alpn(&self) -> Option<Vec<u8>> {
        self.conn.borrow().alpn_protocol().map(<[u8]>::to_vec)
    }

    /// The server name the client asked for, if it sent one.
    pub(crate) fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// Processes the TLS records in `tls` (decrypting them in place) and
    /// appends the plaintext they carry to `plain`; records to send in
    /// answer go to the outbox. On an error the alert that tells the client
    /// why is in the outbox too.
    fn absorb(&self, tls: &mut [u8], plain: &mut Vec<u8>) -> Result<Absorbed, TlsError> {
        let mut conn = self.conn.borrow_mut();
        let mut outbox = self.outbox.borrow_mut();
        let mut absorbed = Absorbed {
            consumed: 0,
            closed: false,
        };
        loop {
            let UnbufferedStatus { discard, state } =
                conn.process_tls_records(&mut tls[absorbed.consumed..]);
            let mut also_discard = 0;
            let more = match state {
                Ok(ConnectionState::ReadTraffic(mut data)) => {
                    while let Some(record) = data.next_record() {
                        let record = record?;
                        plain.extend_from_slice(record.payload);
                        also_discard += record.discard;
                    }
                    true
                }
                Ok(ConnectionState::EncodeTlsData(mut record)) => {
                    encode(&mut record, &mut outbox);
                    true
                }
                // Sent by the next flush, before anything made after it.
                Ok(ConnectionState::TransmitTlsData(sent)) => {
                    sent.done();
                    true
                }
                Ok(ConnectionState::PeerClosed) => {
                    absorbed.closed = true;
                    true
                }
                Ok(ConnectionState::Closed) => {
                    absorbed.closed = true;
                    false
                }
                // BlockedHandshake or WriteTraffic: waiting for more bytes,
                // the rest of `tls` (if any) is not a whole record yet.
                // (ReadEarlyData never comes: `tls::server_config` leaves
                // 0-RTT off.)
                Ok(_) => false,
                Err(e) => {
                    queue_alerts(&mut conn, &mut outbox);
                    return Err(e.into());
                }
            };
            absorbed.consumed += discard + also_discard;
            if !more {
                return Ok(absorbed);
            }
        }
    }

    /// Encrypts `plain` into the outbox, after any records waiting there.
    fn seal(&self, plain: &[u8]) -> Result<(), TlsError> {
        let mut conn = self.conn.borrow_mut();
        let mut outbox = self.outbox.borrow_mut();
        loop {
            match conn.process_tls_records(&mut []).state? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    let need = plain.len() + RECORD_OVERHEAD * (plain.len() / RECORD_PAYLOAD + 1);
                    let sealed = fill(&mut outbox, need, |room| traffic.encrypt(plain, room));
                    if sealed.is_err() {
                        // rustls refuses: its keys are exhausted.
                        queue_alerts(&mut conn, &mut outbox);
                        return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                    }
                    return Ok(());
                }
                // A key update (or its answer) leaves before the data.
                ConnectionState::EncodeTlsData(mut record) => encode(&mut record, &mut outbox),
                ConnectionState::TransmitTlsData(sent) => sent.done(),
                ConnectionState::PeerClosed => {}
                state => {
                    return Err(
                        io::Error::other(format!("tls: cannot send in state {state:?}")).into(),
                    )
                }
            }
        }
    }

    /// Queues close_notify in the outbox, unless the session already failed
    /// (its alert said why) or is closed.
    fn close(&self) {
        let mut conn = self.conn.borrow_mut();
        let mut outbox = self.outbox.borrow_mut();
        loop {
            match conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let _ = fill(&mut outbox, RECORD_OVERHEAD + 2, |room| {
                        traffic.queue_close_notify(room)
                    });
                    return;
                }
                Ok(ConnectionState::EncodeTlsData(mut record)) => encode(&mut record, &mut outbox),
                Ok(ConnectionState::TransmitTlsData(sent)) => sent.done(),
                Ok(ConnectionState::PeerClosed) => {}
                _ => return,
            }
        }
    }

    /// Writes every record in the outbox to the client.
    async fn flush(&self, client: &TcpStream) -> io::Result<()> {
        self.flush_then(client, rt::Ending::Open).await
    }

    /// [`flush`](Self::flush), the records corked when `ending` says the
    /// half-close follows (close_notify and the FIN in one segment).
    async fn flush_then(&self, client: &TcpStream, ending: rt::Ending) -> io::Result<()> {
        // Nothing to send: do not queue for the turn. `pump_down` holds it
        // while the client's window is full, and `pump_up` (which flushes
        // after every read, usually with nothing to send) must not stall on
        // that: the upload goes on while the download is backpressured.
        if self.outbox.borrow().used == 0 {
            return Ok(());
        }
        let _turn = self.client_write.lock().await;
        loop {
            let (buf, used) = {
                let mut outbox = self.outbox.borrow_mut();
                if outbox.used == 0 {
                    return Ok(());
                }
                let buf = std::mem::replace(&mut outbox.buf, self.spare_out.take());
                (buf, std::mem::take(&mut outbox.used))
            };
            let mut sent = keep_if_bulk(
                rt::write_prefix_then(client, buf, used, ending).await?,
                used,
            );
            // The buffer just sent from is the warmer one: fill it next.
            let mut outbox = self.outbox.borrow_mut();
            if outbox.used == 0 {
                std::mem::swap(&mut outbox.buf, &mut sent);
            }
            self.spare_out.set(sent);
        }
    }

    /// Client → backend: decrypts until the client closes (close_notify or
    /// FIN), then half-closes the backend. A send to the backend that fails
    /// with a reset is noted in `seen`.
    pub(crate) async fn pump_up(
        &self,
        client: &TcpStream,
        backend: &TcpStream,
        activity: &Cell<bool>,
        buffer_len: usize,
        bytes: crate::stats::ByteCount<'_>,
        seen: &BackendSeen,
    ) -> Result<(), TlsError> {
        let mut plain = Vec::new();
        let mut reads = Reads::carrying(self.carried.take());
        // Already closed: its early data went to the backend before this.
        while !self.closed_in_handshake.get() {
            let Some(mut chunk) = reads.next(client, buffer_len).await? else {
                break;
            };
            activity.set(true);
            plain.clear();
            let result = self.absorb(chunk.as_mut_slice(), &mut plain);
            let used = result.as_ref().map_or(0, |a| a.consumed);
            reads.recycle(chunk, used);
            // Key updates and alerts may need an answer.
            self.flush(client).await?;
            let closed = result?.closed;
            if !plain.is_empty() {
                let carried = plain.len();
                bytes.add(carried as u64);
                let written = rt::write_vec(backend, plain).await;
                plain = keep_if_bulk(written.inspect_err(|e| seen.send_failed(e))?, carried);
            }
            if closed {
                break;
            }
        }
        let _ = rt::shutdown_write(backend).await;
        Ok(())
    }

    /// Backend → client: encrypts until the backend closes, then sends
    /// close_notify and half-closes the client. What the backend did
    /// (replied, reset) goes to `seen`.
    pub(crate) async fn pump_down(
        &self,
        backend: &TcpStream,
        client: &TcpStream,
        activity: &Cell<bool>,
        buffer_len: usize,
        bytes: crate::stats::ByteCount<'_>,
        seen: &BackendSeen,
    ) -> Result<(), TlsError> {
        let mut reads = Reads::new();
        loop {
            let read = reads
                .next(backend, buffer_len)
                .await
                .inspect_err(|e| seen.read_failed(e));
            let Some(chunk) = read? else {
                seen.closed();
                break;
            };
            seen.replied();
            activity.set(true);
            bytes.add(chunk.len() as u64);
            // The whole read becomes records in one write: one send per
            // record cost a syscall's worth of kernel work per 16 KiB.
            self.seal(chunk.as_slice())?;
            // Back in the ring (or to `reads`) before the send waits.
            let used = chunk.len();
            reads.recycle(chunk, used);
            self.flush(client).await?;
        }
        self.close();
        // The half-close follows at once: close_notify leaves with the FIN
        // in one segment, not two (README, "The last response and its FIN
        // in one segment").
        self.flush_then(client, rt::Ending::Follows).await?;
        let _ = rt::shutdown_write(client).await;
        Ok(())
    }
}

/// A TLS record's overhead beyond its payload, at most: header (5), the
/// inner content type (1) and the AEAD tag (16) of TLS 1.3, or the
/// explicit nonce (8) and tag (16) of TLS 1.2's AES-GCM.
const RECORD_OVERHEAD: usize = 5 + 8 + 16 + 1;
/// The largest payload of one record.
const RECORD_PAYLOAD: usize = 16 * 1024;

/// Runs `write` (an encryption into the outbox) with room for `need`
/// bytes, or as many as rustls says it needs when that is short.
fn fill(
    outbox: &mut Outbox,
    mut need: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), EncryptError> {
    loop {
        match write(outbox.room(need)) {
            Ok(n) => {
                outbox.used += n;
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(size)) => need = size.required_size,
            Err(e) => return Err(e),
        }
    }
}

/// Copies a record rustls made (handshake, alert, key update) into the
/// outbox. Cannot fail: rustls's only other answer is that the record is
/// already there.
fn encode(
    record: &mut rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    outbox: &mut Outbox,
) {
    let mut need = 0;
    loop {
        match record.encode(outbox.room(need)) {
            Ok(n) => {
                outbox.used += n;
                return;
            }
            Err(EncodeError::InsufficientSize(size)) => need = size.required_size,
            Err(EncodeError::AlreadyEncoded) => return,
        }
    }
}

/// After an error: moves the alerts rustls queued for the client (why the
/// session ends) into the outbox.
fn queue_alerts(conn: &mut UnbufferedServerConnection, outbox: &mut Outbox) {
    // Each round takes one record; rustls queues a handful at most.
    for _ in 0..16 {
        match conn.process_tls_records(&mut []).state {
            Ok(ConnectionState::EncodeTlsData(mut record)) => encode(&mut record, outbox),
            Ok(ConnectionState::TransmitTlsData(sent)) => sent.done(),
            _ => return,
        }
    }
}

/// A TLS client handed a pooled backend socket: its first bytes for the
/// backend are the plaintext of its first records after the handshake.
pub(crate) struct TlsClient<'a> {
    pub socket: &'a TcpStream,
    pub session: &'a TlsSession,
}

impl ClientSide for TlsClient<'_> {
    type Error = TlsError;

    fn socket(&self) -> &TcpStream {
        self.socket
    }

    async fn read_first(&self, buffer_len: usize) -> Result<FirstRead, TlsError> {
        let session = self.session;
        let mut reads = Reads::carrying(session.carried.take());
        let Some(mut chunk) = reads.next(self.socket, buffer_len).await? else {
            return Ok(FirstRead::Closed);
        };
        let mut plain = Vec::new();
        let result = session.absorb(chunk.as_mut_slice(), &mut plain);
        reads.recycle(chunk, result.as_ref().map_or(0, |a| a.consumed));
        // What did not make a whole record is the front of `pump_up`'s
        // first read.
        session.carried.set(std::mem::take(&mut reads.own));
        // Key updates and alerts may need an answer.
        session.flush(self.socket).await?;
        if result?.closed {
            // `pump_up` must not read again: the client is done sending.
            session.closed_in_handshake.set(true);
        }
        Ok(
            match (plain.is_empty(), session.closed_in_handshake.get()) {
                (false, _) => FirstRead::Bytes(Chunk::Owned(plain)),
                (true, true) => FirstRead::Closed,
                (true, false) => FirstRead::Nothing,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const BUFFER_LEN: usize = 4096;

    fn recycle_all(reads: &mut Reads, chunk: Chunk) {
        let used = chunk.len();
        reads.recycle(chunk, used);
    }

    fn kind(chunk: &Chunk) -> &'static str {
        match chunk {
            Chunk::Pooled(_) => "ring",
            Chunk::Owned(_) => "own",
        }
    }

    /// Reads go through the ring until one fills a ring buffer; while bytes
    /// wait they are then read from the task into the direction's own
    /// buffer; when none wait that buffer goes to the shard's warm buffers
    /// and the next read, after a readiness wait, lands in it again; a small
    /// read after a wait ends bulk mode (the ring again); end of stream ends
    /// both ways.
    #[test]
    fn a_bulk_direction_reads_from_the_task_and_a_paused_one_holds_no_buffer() {
        let (mut peer, ours) = rt::tests::loopback_pair(64 << 10);
        let data: Vec<u8> = (0..3 * BUFFER_LEN).map(|i| (i % 251) as u8).collect();
        peer.write_all(&data).unwrap();
        let runtime = rt::build_runtime(4, BUFFER_LEN as u32).unwrap();
        runtime.block_on(async move {
            let ours = TcpStream::from_std(ours).unwrap();
            let mut reads = Reads::new();
            let mut got = Vec::new();
            let mut kinds = Vec::new();
            while got.len() < data.len() {
                let chunk = reads.next(&ours, BUFFER_LEN).await.unwrap().unwrap();
                got.extend_from_slice(chunk.as_slice());
                kinds.push(kind(&chunk));
                recycle_all(&mut reads, chunk);
            }
            assert!(got == data, "bytes differ");
            assert_eq!(kinds, ["ring", "own", "own"]);
            assert!(reads.own.capacity() >= BUFFER_LEN);
            let warm = reads.own.as_ptr();

            // Nothing waiting: while the read waits its buffer is the
            // shard's, not the direction's; the peer writes only then, and
            // the bytes land in that same buffer.
            let (chunk, ()) = futures_util::join!(reads.next(&ours, BUFFER_LEN), async {
                assert_eq!(
                    warm_buffers::kept(),
                    1,
                    "a paused direction kept its buffer"
                );
                peer.write_all(&data[..BUFFER_LEN]).unwrap();
            });
            let chunk = chunk.unwrap().unwrap();
            assert_eq!((kind(&chunk), chunk.len()), ("own", BUFFER_LEN));
            assert_eq!(chunk.as_slice().as_ptr(), warm, "not the warm buffer");
            recycle_all(&mut reads, chunk);

            // A small read after a wait ends bulk mode: its buffer goes to
            // the shard and the next read is the ring's.
            let (chunk, ()) = futures_util::join!(reads.next(&ours, BUFFER_LEN), async {
                peer.write_all(b"later").unwrap();
            });
            let chunk = chunk.unwrap().unwrap();
            assert_eq!((kind(&chunk), chunk.as_slice()), ("own", &b"later"[..]));
            recycle_all(&mut reads, chunk);
            assert_eq!(
                reads.own.capacity(),
                0,
                "a direction out of bulk kept its buffer"
            );
            assert_eq!(warm_buffers::kept(), 1);

            // Bulk again, then the end of stream read from the task.
            peer.write_all(&data[..BUFFER_LEN]).unwrap();
            peer.shutdown(std::net::Shutdown::Write).unwrap();
            let chunk = reads.next(&ours, BUFFER_LEN).await.unwrap().unwrap();
            assert_eq!((kind(&chunk), chunk.len()), ("ring", BUFFER_LEN));
            recycle_all(&mut reads, chunk);
            assert!(reads.next(&ours, BUFFER_LEN).await.unwrap().is_none());
        });
    }

    /// A megabyte already waiting is read without a single wait, yet the
    /// shard's other tasks get to run during it.
    #[test]
    fn a_bulk_direction_whose_bytes_keep_waiting_lets_other_tasks_run() {
        const LEN: usize = 1 << 20;
        let (mut peer, ours) = rt::tests::loopback_pair(4 * LEN);
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        peer.write_all(&data).unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let runtime = rt::build_runtime(4, BUFFER_LEN as u32).unwrap();
        let (got, ticks_during) = runtime.block_on(async move {
            let ours = TcpStream::from_std(ours).unwrap();
            let ticks = std::rc::Rc::new(Cell::new(0u32));
            let counter = std::rc::Rc::clone(&ticks);
            let _other = rt::spawn(async move {
                loop {
                    counter.set(counter.get() + 1);
                    rt::yield_now().await;
                }
            });
            rt::yield_now().await;
            let mut reads = Reads::new();
            let mut got = Vec::with_capacity(LEN);
            // The first read goes through the ring, and waits for it.
            let first = reads.next(&ours, BUFFER_LEN).await.unwrap().unwrap();
            got.extend_from_slice(first.as_slice());
            recycle_all(&mut reads, first);
            let before = ticks.get();
            while let Some(chunk) = reads.next(&ours, BUFFER_LEN).await.unwrap() {
                got.extend_from_slice(chunk.as_slice());
                recycle_all(&mut reads, chunk);
            }
            (got, ticks.get() - before)
        });
        assert!(got == data, "bytes differ");
        // 1 MiB less one ring buffer, at a yield every 256 KiB.
        assert!(
            ticks_during >= 3,
            "the other task ran {ticks_during} times during the read"
        );
    }

    /// Bytes the caller could not use (a record the read cut) come back at
    /// the front of the next chunk: after a ring read, after a read from
    /// the task, and after a wait, during which the direction keeps them.
    #[test]
    fn bytes_left_unused_are_the_front_of_the_next_chunk() {
        let (mut peer, ours) = rt::tests::loopback_pair(64 << 10);
        let data: Vec<u8> = (0..3 * BUFFER_LEN).map(|i| (i % 251) as u8).collect();
        peer.write_all(&data[..BUFFER_LEN + 100]).unwrap();
        let runtime = rt::build_runtime(4, BUFFER_LEN as u32).unwrap();
        runtime.block_on(async move {
            let ours = TcpStream::from_std(ours).unwrap();
            let mut reads = Reads::new();
            let chunk = reads.next(&ours, BUFFER_LEN).await.unwrap().unwrap();
            assert_eq!((kind(&chunk), chunk.len()), ("ring", BUFFER_LEN));
            reads.recycle(chunk, 1000);

            // Bulk now: read from the task, after the 3,096 carried bytes.
            let chunk = reads.next(&ours, BUFFER_LEN).await.unwrap().unwrap();
            assert!(
                chunk.as_slice() == &data[1000..BUFFER_LEN + 100],
                "not carried"
            );
            let len = chunk.len();
            reads.recycle(chunk, len - 10);

            // Nothing waiting: the direction waits holding its 10 bytes.
            let (chunk, ()) = futures_util::join!(reads.next(&ours, BUFFER_LEN), async {
                assert_eq!(warm_buffers::kept(), 0, "carried bytes went to the shard");
                peer.write_all(&data[BUFFER_LEN + 100..]).unwrap();
            });
            let chunk = chunk.unwrap().unwrap();
            let want = &data[BUFFER_LEN + 90..];
            assert!(
                chunk.as_slice() == &want[..chunk.len()],
                "not carried after a wait"
            );
            assert!(chunk.len() > 10);
        });
    }

    /// A server config with a self-signed certificate for "localhost", and
    /// a client config trusting it that speaks only `version`.
    fn tls_configs(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signing = provider
            .key_provider
            .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
                key.serialize_der().into(),
            ))
            .unwrap();
        let certified = Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert.der().clone()],
            signing,
        ));
        let server =
            crate::tls::server_config(crate::tls::SniResolver::new(certified, &[]), vec![])
                .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, Arc::new(client))
    }

    /// Terminates one TLS connection on `ours` (no early data, SNI
    /// "localhost") and runs both pumps to `backend` until they end, as a
    /// connection's task does.
    fn serve_one_session(
        ours: std::net::TcpStream,
        backend: std::net::TcpStream,
        server_config: Arc<ServerConfig>,
    ) {
        let runtime = rt::build_runtime(16, BUFFER_LEN as u32).unwrap();
        runtime.block_on(async move {
            let client = TcpStream::from_std(ours).unwrap();
            let backend = TcpStream::from_std(backend).unwrap();
            let (session, early) = TlsSession::accept(&client, server_config, None, BUFFER_LEN)
                .await
                .unwrap();
            assert!(early.is_none());
            assert_eq!(session.sni(), Some("localhost"));
            let shard = std::sync::atomic::AtomicU64::new(0);
            let (activity, seen) = (Cell::new(false), BackendSeen::default());
            let bytes = || crate::stats::ByteCount {
                shard: &shard,
                conn: None,
            };
            // The first error ends both (as the connection's task does), so
            // a broken stream fails the test instead of hanging it.
            futures_util::future::try_join(
                session.pump_up(&client, &backend, &activity, BUFFER_LEN, bytes(), &seen),
                session.pump_down(&backend, &client, &activity, BUFFER_LEN, bytes(), &seen),
            )
            .await
            .unwrap();
        });
    }

    /// A real rustls client sends 300 KB through the session to an echoing
    /// backend and reads it back, then closes. The shard's reads are 4 KiB
    /// and a record up to 16 KiB, so every record is cut by reads (and
    /// carried); both directions, close_notify and the half-close are
    /// checked end to end.
    /// With `key_update`, the client asks for new keys halfway through its
    /// upload (TLS 1.3): the session must answer with a key update of its
    /// own ahead of every record it encrypts with its new keys, or the
    /// client cannot read the rest of the echo.
    fn echo_through_a_session(
        version: &'static rustls::SupportedProtocolVersion,
        key_update: bool,
    ) {
        use std::io::Read;
        let (server_config, client_config) = tls_configs(version);
        let (client_std, ours) = rt::tests::loopback_pair(256 << 10);
        let (mut backend_peer, backend_ours) = rt::tests::loopback_pair(256 << 10);
        let data: Vec<u8> = (0..300_000).map(|i| (i * 7 % 253) as u8).collect();

        let sent = data.clone();
        let client = std::thread::spawn(move || {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let conn = rustls::ClientConnection::new(client_config, name).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, client_std);
            // The echo waits in socket buffers (over 1 MB on this path)
            // until the whole upload is written.
            let (first, second) = sent.split_at(sent.len() / 2);
            tls.write_all(first).unwrap();
            if key_update {
                tls.conn.refresh_traffic_keys().unwrap();
            }
            tls.write_all(second).unwrap();
            tls.conn.send_close_notify();
            tls.flush().unwrap();
            let mut got = Vec::new();
            if let Err(e) = tls.read_to_end(&mut got) {
                panic!("client read: {e} after {} bytes", got.len());
            }
            (got, tls.conn.protocol_version())
        });
        let backend = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let n = backend_peer.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                backend_peer.write_all(&buf[..n]).unwrap();
            }
            backend_peer.shutdown(std::net::Shutdown::Write).unwrap();
            got
        });

        serve_one_session(ours, backend_ours, server_config);
        let at_backend = backend.join().unwrap();
        assert!(
            at_backend == data,
            "the backend got {} bytes, not the upload",
            at_backend.len()
        );
        let (echoed, negotiated) = client.join().unwrap();
        assert!(echoed == data, "the client got {} bytes back", echoed.len());
        assert_eq!(negotiated, Some(version.version));
    }

    #[test]
    fn tls13_records_cut_by_reads_arrive_whole_both_ways() {
        echo_through_a_session(&rustls::version::TLS13, false);
    }

    #[test]
    fn tls12_records_cut_by_reads_arrive_whole_both_ways() {
        echo_through_a_session(&rustls::version::TLS12, false);
    }

    #[test]
    fn a_key_update_the_client_asks_for_is_answered_before_new_records() {
        echo_through_a_session(&rustls::version::TLS13, true);
    }

    /// The backend closes behind its response: the session's close_notify
    /// and the FIN reach the client in one segment (received segments,
    /// `tcpi_segs_in`, counted from the response to the end of stream).
    #[test]
    fn close_notify_and_the_fin_leave_in_one_segment() {
        use std::io::Read;
        let (server_config, client_config) = tls_configs(&rustls::version::TLS13);
        let (client_std, ours) = rt::tests::loopback_pair(256 << 10);
        // As a listener's sockets are: without it Nagle's algorithm holds
        // close_notify while the response is unacknowledged, and the FIN
        // joins it anyway.
        ours.set_nodelay(true).unwrap();
        let (mut backend_peer, backend_ours) = rt::tests::loopback_pair(256 << 10);
        let (responded, close_now) = std::sync::mpsc::channel();
        let client = std::thread::spawn(move || {
            let mut raw = client_std.try_clone().unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let conn = rustls::ClientConnection::new(client_config, name).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, client_std);
            tls.write_all(b"request").unwrap();
            tls.flush().unwrap();
            let mut response = [0u8; 8];
            tls.read_exact(&mut response).unwrap();
            let before = rt::tests::segments_in(&raw);
            responded.send(()).unwrap();
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest).unwrap();
            // The FIN too, however it came: nothing follows close_notify.
            assert_eq!(raw.read(&mut [0u8; 1]).unwrap(), 0);
            let segments = rt::tests::segments_in(&raw) - before;
            (response, rest, segments)
        });
        let backend = std::thread::spawn(move || {
            let mut request = [0u8; 7];
            backend_peer.read_exact(&mut request).unwrap();
            backend_peer.write_all(b"response").unwrap();
            close_now.recv().unwrap();
            backend_peer.shutdown(std::net::Shutdown::Write).unwrap();
            // Until the client's close comes through.
            let mut rest = Vec::new();
            backend_peer.read_to_end(&mut rest).unwrap();
            request
        });
        serve_one_session(ours, backend_ours, server_config);
        assert_eq!(&backend.join().unwrap(), b"request");
        let (response, rest, segments) = client.join().unwrap();
        assert_eq!(&response, b"response");
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(segments, 1, "close_notify and the FIN in one segment");
    }
}
