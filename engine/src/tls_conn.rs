//! A TLS-terminated client connection, driven by hand: rustls is sans-IO (the
//! caller moves bytes in and out of a `ServerConnection`), so the shard keeps
//! its own io_uring reads with provided buffers and no TLS adapter layer.
//!
//! Both directions share one `ServerConnection` in a `RefCell`; a borrow is
//! never held across an await. Writes to the client socket go through one
//! async lock so TLS records from the two directions never interleave.

use std::cell::{Cell, RefCell};
use std::io::{self, BufRead, Write};
use std::sync::Arc;

use futures_util::lock::Mutex;
use rustls::{ServerConfig, ServerConnection};

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
    conn: RefCell<ServerConnection>,
    /// The client's close_notify arrived before the pumps started: with its
    /// last handshake flight (TLS 1.3 lets Finished, data and close_notify
    /// share one write), or with its first data to a pooled backend.
    closed_in_handshake: Cell<bool>,
    /// Serialises writes of TLS records to the client socket.
    client_write: Mutex<()>,
    /// The buffer the last bulk flush sent from, kept for the next one.
    spare_out: Cell<Vec<u8>>,
}

/// A buffer that carried at least this much is kept for the next read or
/// flush of the same connection: a bulk transfer reuses one warm buffer
/// (a fresh one per read cost a malloc, page faults and a cold copy; see
/// README, TLS bulk). A smaller one is freed, so an idle connection holds none.
const KEEP_BUFFER_FROM: usize = 16 * 1024;

/// Gives `buf` back for reuse, or drops it when it carried little.
fn keep_if_bulk(buf: Vec<u8>) -> Vec<u8> {
    if buf.len() >= KEEP_BUFFER_FROM {
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
/// A flow whose bytes keep waiting never has to wait for them, so every
/// [`rt::YIELD_AFTER`] bytes read it lets the shard's other tasks run.
struct Reads {
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

    /// The next bytes from `stream`; `Ok(None)` at end of stream.
    async fn next(&mut self, stream: &TcpStream, buffer_len: usize) -> io::Result<Option<Chunk>> {
        let mut waited = false;
        while self.bulk {
            if self.since_yield >= rt::YIELD_AFTER {
                self.since_yield = 0;
                rt::yield_now().await;
            }
            // The direction's own buffer while it reads back to back, else
            // the shard's warmest.
            let mut buf = std::mem::take(&mut self.own);
            if buf.capacity() < buffer_len {
                buf = warm_buffers::take(buffer_len);
            }
            buf.clear();
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
                    warm_buffers::give(buf);
                    rt::readable(stream).await?;
                    waited = true;
                }
            }
        }
        let chunk = rt::read_chunk(stream, buffer_len).await?;
        self.bulk = chunk.as_ref().is_some_and(|c| c.len() >= buffer_len);
        Ok(chunk)
    }

    /// Takes back the buffer of a chunk `next` returned, once its bytes are
    /// used (a ring buffer goes back to the ring, a buffer of a direction
    /// no longer in bulk mode to the shard's warm buffers).
    fn recycle(&mut self, chunk: Chunk) {
        if let Chunk::Owned(buf) = chunk {
            if self.bulk {
                self.own = buf;
            } else {
                warm_buffers::give(buf);
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
        let session = TlsSession {
            conn: RefCell::new(ServerConnection::new(config)?),
            closed_in_handshake: Cell::new(false),
            client_write: Mutex::new(()),
            spare_out: Cell::new(Vec::new()),
        };
        let mut early = Vec::new();
        if let Some(bytes) = initial {
            match session.absorb(bytes.as_slice(), &mut early) {
                Ok(true) => session.closed_in_handshake.set(true),
                Ok(false) => {}
                Err(e) => {
                    let _ = session.flush(client).await;
                    return Err(e);
                }
            }
        }
        loop {
            session.flush(client).await?;
            if !session.conn.borrow().is_handshaking() {
                break;
            }
            let Some(chunk) = rt::read_chunk(client, buffer_len).await? else {
                return Err(TlsError::ClosedInHandshake);
            };
            match session.absorb(chunk.as_slice(), &mut early) {
                Ok(true) => session.closed_in_handshake.set(true),
                Ok(false) => {}
                Err(e) => {
                    // Tell the client why (the alert is queued by rustls).
                    let _ = session.flush(client).await;
                    return Err(e);
                }
            }
        }
        // TLS 1.3 session tickets go out after the handshake.
        session.flush(client).await?;
        Ok((session, (!early.is_empty()).then_some(Chunk::Owned(early))))
    }

    pub(crate) fn alpn(&self) -> Option<Vec<u8>> {
        self.conn.borrow().alpn_protocol().map(<[u8]>::to_vec)
    }

    pub(crate) fn sni(&self) -> Option<String> {
        self.conn.borrow().server_name().map(str::to_string)
    }

    /// Feeds TLS bytes from the client and appends the plaintext they carry to
    /// `plain`. Returns true once the client sent close_notify.
    fn absorb(&self, mut tls: &[u8], plain: &mut Vec<u8>) -> Result<bool, TlsError> {
        let mut conn = self.conn.borrow_mut();
        let mut closed = false;
        while !tls.is_empty() {
            conn.read_tls(&mut tls)?;
            let state = conn.process_new_packets()?;
            closed |= state.peer_has_closed();
            // Copied straight from rustls's plaintext chunks: reading into a
            // zero-filled buffer instead cost a memset of every byte.
            plain.reserve(state.plaintext_bytes_to_read());
            let mut reader = conn.reader();
            while let Ok(piece) = reader.fill_buf() {
                if piece.is_empty() {
                    break;
                }
                let n = piece.len();
                plain.extend_from_slice(piece);
                reader.consume(n);
            }
        }
        Ok(closed)
    }

    /// Writes every pending TLS record to the client.
    async fn flush(&self, client: &TcpStream) -> io::Result<()> {
        // Nothing to send: do not queue for the turn. `pump_down` holds it
        // while the client's window is full, and `pump_up` (which flushes
        // after every read, usually with nothing to send) must not stall on
        // that: the upload goes on while the download is backpressured.
        if !self.conn.borrow().wants_write() {
            return Ok(());
        }
        let _turn = self.client_write.lock().await;
        loop {
            let mut out = self.spare_out.take();
            out.clear();
            {
                let mut conn = self.conn.borrow_mut();
                if !conn.wants_write() {
                    self.spare_out.set(out);
                    return Ok(());
                }
                conn.write_tls(&mut out)?;
            }
            let out = rt::write_vec(client, out).await?;
            self.spare_out.set(keep_if_bulk(out));
        }
    }

    /// Client → backend: decrypts until the client closes (close_notify or
    /// FIN), then half-closes the backend.
    pub(crate) async fn pump_up(
        &self,
        client: &TcpStream,
        backend: &TcpStream,
        activity: &Cell<bool>,
        buffer_len: usize,
        bytes: crate::stats::ByteCount<'_>,
    ) -> Result<(), TlsError> {
        let mut plain = Vec::new();
        let mut reads = Reads::new();
        // Already closed: its early data went to the backend before this.
        while !self.closed_in_handshake.get() {
            let Some(chunk) = reads.next(client, buffer_len).await? else {
                break;
            };
            activity.set(true);
            plain.clear();
            let result = self.absorb(chunk.as_slice(), &mut plain);
            reads.recycle(chunk);
            // Key updates and alerts may need an answer.
            self.flush(client).await?;
            let closed = result?;
            if !plain.is_empty() {
                bytes.add(plain.len() as u64);
                plain = keep_if_bulk(rt::write_vec(backend, plain).await?);
            }
            if closed {
                break;
            }
        }
        let _ = rt::shutdown_write(backend).await;
        Ok(())
    }

    /// Backend → client: encrypts until the backend closes, then sends
    /// close_notify and half-closes the client. A reset read from the
    /// backend sets `backend_reset` (a passive health event).
    pub(crate) async fn pump_down(
        &self,
        backend: &TcpStream,
        client: &TcpStream,
        activity: &Cell<bool>,
        buffer_len: usize,
        bytes: crate::stats::ByteCount<'_>,
        backend_reset: &Cell<bool>,
    ) -> Result<(), TlsError> {
        let mut reads = Reads::new();
        loop {
            let read = reads.next(backend, buffer_len).await.inspect_err(|e| {
                if e.kind() == std::io::ErrorKind::ConnectionReset {
                    backend_reset.set(true);
                }
            });
            let Some(chunk) = read? else {
                break;
            };
            activity.set(true);
            bytes.add(chunk.len() as u64);
            // Encrypt the whole read, then send its records in one write:
            // one send per record cost a syscall's worth of kernel work per
            // 16 KiB. rustls takes what fits under its buffer limit (a whole
            // read when nothing is pending); the flush drains that. What it
            // did not take is found by offset, never moved.
            let mut taken = 0;
            let mut rest = Some(chunk);
            while let Some(chunk) = rest.take() {
                {
                    let mut conn = self.conn.borrow_mut();
                    let n = conn.writer().write(&chunk.as_slice()[taken..])?;
                    // Nothing taken and nothing to flush: rustls refuses
                    // (e.g. its keys are exhausted); looping would spin.
                    if n == 0 && !conn.wants_write() {
                        return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                    }
                    taken += n;
                }
                if taken < chunk.len() {
                    rest = Some(chunk);
                } else {
                    // Back in the ring (or to `reads`) before the send waits.
                    reads.recycle(chunk);
                }
                self.flush(client).await?;
            }
        }
        self.conn.borrow_mut().send_close_notify();
        self.flush(client).await?;
        let _ = rt::shutdown_write(client).await;
        Ok(())
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
        let Some(chunk) = rt::read_chunk(self.socket, buffer_len).await? else {
            return Ok(FirstRead::Closed);
        };
        let mut plain = Vec::new();
        let result = session.absorb(chunk.as_slice(), &mut plain);
        drop(chunk);
        // Key updates and alerts may need an answer.
        session.flush(self.socket).await?;
        if result? {
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
    use super::*;

    const BUFFER_LEN: usize = 4096;

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
                reads.recycle(chunk);
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
            reads.recycle(chunk);

            // A small read after a wait ends bulk mode: its buffer goes to
            // the shard and the next read is the ring's.
            let (chunk, ()) = futures_util::join!(reads.next(&ours, BUFFER_LEN), async {
                peer.write_all(b"later").unwrap();
            });
            let chunk = chunk.unwrap().unwrap();
            assert_eq!((kind(&chunk), chunk.as_slice()), ("own", &b"later"[..]));
            reads.recycle(chunk);
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
            reads.recycle(chunk);
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
            reads.recycle(first);
            let before = ticks.get();
            while let Some(chunk) = reads.next(&ours, BUFFER_LEN).await.unwrap() {
                got.extend_from_slice(chunk.as_slice());
                reads.recycle(chunk);
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
}
