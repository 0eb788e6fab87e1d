//! The one module that knows the async runtime (compio on io_uring).
//!
//! Everything else in the engine talks to sockets, timers and tasks through
//! these few functions, so a runtime change touches only this file (and
//! its submodules).
//!
//! Reads use compio's *provided buffers* (an io_uring buffer ring owned by the
//! shard): the kernel picks a buffer only when data arrives, so an idle
//! connection holds no user-space buffer at all. When the ring is momentarily
//! empty the read falls back to a heap buffer for that one read.

pub mod readiness;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use compio::buf::{BufResult, IoBuf};
use compio::driver::{BufferRef, ProactorBuilder};
use compio::io::{AsyncRead, AsyncReadManaged, AsyncWrite, AsyncWriteExt};

pub use compio::net::{TcpListener, TcpStream};
pub use compio::runtime::JoinHandle;

/// Builds a shard's runtime: io_uring with a single issuer and deferred task
/// running (completion work runs only when the shard asks for completions, in
/// batches, on its own core: no interrupt of other cores, no task-work
/// interrupt of the shard while it runs), and a provided buffer ring of
/// `buffer_count` × `buffer_size` bytes. Measured against the
/// `coop_taskrun` + `taskrun_flag` pair: 7–12% less proxy CPU per keep-alive
/// request.
pub fn build_runtime(buffer_count: u16, buffer_size: u32) -> io::Result<compio::runtime::Runtime> {
    let mut proactor = ProactorBuilder::new();
    proactor
        .single_issuer(true)
        .defer_taskrun(true)
        .buffer_pool_size(NonZeroU16::new(buffer_count.max(1)).expect("max(1)"))
        .buffer_pool_buffer_len(buffer_size as usize);
    compio::runtime::RuntimeBuilder::new()
        .with_proactor(proactor)
        .build()
}

/// Runs `future` on `runtime` until it completes, as a task of its own.
///
/// Not `runtime.block_on(future)` directly: compio polls the future it
/// blocks on at every turn of its event loop, woken or not, and a shard's
/// main future waits on its command channel — an `async_channel` receive,
/// ~70 ns per poll (measured: perf scenario (c), where a turn comes about
/// once per connection). As a task it is polled only when a command wakes
/// it, and the future blocked on is a `Cell` read. A panic in `future` is
/// raised again here, as `block_on` would.
pub fn block_on_task<F: Future<Output = ()> + 'static>(
    runtime: &compio::runtime::Runtime,
    future: F,
) {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::Waker;

    #[derive(Default)]
    struct Finish {
        /// Set when the task ended, normally or by a panic.
        ended: Cell<bool>,
        completed: Cell<bool>,
        /// The blocked-on future's waker, woken when the task ends.
        waker: Cell<Option<Waker>>,
    }
    /// Marks the end when dropped: after the future completes, or while a
    /// panic unwinds the task.
    struct EndGuard(Rc<Finish>);
    impl Drop for EndGuard {
        fn drop(&mut self) {
            self.0.ended.set(true);
            if let Some(waker) = self.0.waker.take() {
                waker.wake();
            }
        }
    }

    let finish = Rc::new(Finish::default());
    let guard = EndGuard(Rc::clone(&finish));
    runtime.block_on(async move {
        spawn(async move {
            let guard = guard;
            future.await;
            guard.0.completed.set(true);
        })
        .detach();
        std::future::poll_fn(|cx| {
            if finish.ended.get() {
                return Poll::Ready(());
            }
            // The waker of a future blocked on never changes: clone it once.
            let waker = finish.waker.take();
            finish
                .waker
                .set(Some(waker.unwrap_or_else(|| cx.waker().clone())));
            Poll::Pending
        })
        .await;
        assert!(finish.completed.get(), "the shard's main task panicked");
    });
}

/// Spawns a task on the current shard.
pub fn spawn<F: Future + 'static>(future: F) -> JoinHandle<F::Output> {
    compio::runtime::spawn(future)
}

/// Waits `duration`, as an io_uring `TIMEOUT` request.
///
/// Not compio's timer: while any compio timer is pending, compio's event
/// loop reads the clock and splits its timer `BTreeMap` (an allocation) at
/// every turn, and a shard's periodic tasks (the idle sweeper, the affinity
/// and pool upkeep) would keep one pending for good — a cost on every turn,
/// that is about every keep-alive request. An io_uring timeout costs one
/// submission and one completion per sleep, and nothing per turn. Short
/// timers that race other work ([`timeout`]) stay compio's: they are pending
/// only for their work's duration, and cancelling an io_uring timeout would
/// cost another submission each time the work wins.
pub async fn sleep(duration: Duration) {
    let ts = io_uring::types::Timespec::new()
        .sec(duration.as_secs())
        .nsec(duration.subsec_nanos());
    let BufResult(slept, _) = compio::runtime::submit(RingTimeout { ts }).await;
    match slept {
        // ETIME: the time passed (the way a timeout completes).
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
        Ok(_) => {}
        // Never return early: a ring that refuses the request (it should
        // not) falls back to compio's timer.
        Err(e) => {
            tracing::debug!(error = %e, "io_uring timeout refused; using compio's timer");
            compio::runtime::time::sleep(duration).await
        }
    }
}

pub async fn sleep_until(deadline: Instant) {
    sleep(deadline.saturating_duration_since(Instant::now())).await
}

/// io_uring `TIMEOUT` after `ts` (relative, `CLOCK_MONOTONIC`).
struct RingTimeout {
    ts: io_uring::types::Timespec,
}

// SAFETY: the entry points at `ts`, which lives in the operation; compio
// keeps the operation at one heap address until the kernel completed it
// (or, dropped early, until its cancellation completed).
unsafe impl compio::driver::OpCode for RingTimeout {
    type Control = ();

    fn create_entry(&mut self, _: &mut ()) -> compio::driver::OpEntry {
        compio::driver::OpEntry::Submission(io_uring::opcode::Timeout::new(&self.ts).build())
    }
}

/// `None` when `duration` passed first.
///
/// A plain combinator rather than compio's `timeout` (a `select!` in an async
/// fn, which stores the future three times over): it adds only the timer to
/// the future's size, and the caller's task keeps that size for its life.
pub fn timeout<F: Future>(
    duration: Duration,
    future: F,
) -> impl Future<Output = Option<F::Output>> {
    Timeout {
        future,
        sleep: compio::runtime::time::sleep(duration),
    }
}

struct Timeout<F, S> {
    future: F,
    sleep: S,
}

impl<F: Future, S: Future<Output = ()>> Future for Timeout<F, S> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning: neither field is moved out of `self`,
        // and `Timeout` has no Drop impl nor Unpin impl of its own.
        let this = unsafe { self.get_unchecked_mut() };
        let future = unsafe { Pin::new_unchecked(&mut this.future) };
        if let Poll::Ready(out) = future.poll(cx) {
            return Poll::Ready(Some(out));
        }
        let sleep = unsafe { Pin::new_unchecked(&mut this.sleep) };
        match sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Lets an accept loop be stopped without losing a connection.
///
/// Dropping an accept future is not safe for that: if the kernel completed
/// the accept just before the drop, the new connection is closed with it
/// (the client sees a reset). Instead, [`AcceptGate::stop`] asks io_uring to
/// cancel every request on the listening descriptor (`ASYNC_CANCEL` matched
/// by descriptor, [`CancelAllOn`]) and lets the accept in flight come back:
/// either cancelled (nothing was dequeued) or with a connection, which the
/// loop then serves. After that, [`AcceptGate::accept`] returns `None`.
///
/// Not compio's `CancelToken`: it reaches the operation only through a
/// waker extension that compio recognises by comparing vtable addresses, and
/// in the release build (several codegen units, thin LTO) the addresses
/// differ, the accept is never registered, and a stop waited forever — every
/// graceful shutdown and binary upgrade of the shipped binary hung while the
/// debug build the tests run worked.
///
/// Accepts in io_uring wait with an *exclusive* poll on the socket: one
/// arriving connection wakes one waiter. A cancelled accept may have taken
/// that wake-up with it while its connection stays queued, which another
/// process sharing the socket (a successor after a binary upgrade) would not
/// hear about until the next connection arrives. So a stopped loop takes
/// what is queued at that moment with [`accept_now`] before it lets the
/// socket go.
pub struct AcceptGate {
    stopped: std::cell::Cell<bool>,
    /// The listening descriptor of the accept in flight, if one is.
    in_flight: std::cell::Cell<Option<std::os::fd::RawFd>>,
    /// Whether the kernel said, with the last accept, that more connections
    /// were queued behind it (`IORING_CQE_F_SOCK_NONEMPTY`); cleared when
    /// the caller reports the queue drained ([`AcceptGate::drained`]).
    more_queued: std::cell::Cell<bool>,
    /// Whether the queue was last seen empty: the next ACCEPT then waits
    /// for readiness first (`IORING_RECVSEND_POLL_FIRST`) instead of
    /// trying, failing and arming a poll, as compio's own accept does.
    seen_empty: std::cell::Cell<bool>,
}

impl AcceptGate {
    pub fn new() -> AcceptGate {
        AcceptGate {
            stopped: std::cell::Cell::new(false),
            in_flight: std::cell::Cell::new(None),
            more_queued: std::cell::Cell::new(false),
            seen_empty: std::cell::Cell::new(false),
        }
    }

    /// The next connection, or `None` once the gate is stopped and the
    /// accept that was in flight came back without one.
    pub async fn accept(
        &self,
        listener: &TcpListener,
    ) -> Option<io::Result<(TcpStream, SocketAddr)>> {
        use compio::driver::{op::Accept, PollFirst, ToSharedFd};
        use std::os::fd::AsRawFd;
        if self.stopped.get() {
            return None;
        }
        self.in_flight.set(Some(listener.as_raw_fd()));
        let mut op = Accept::new(listener.to_shared_fd());
        if self.seen_empty.get() {
            op.poll_first();
        }
        let (BufResult(accepted, op), extra) = compio::runtime::submit(op).with_extra().await;
        self.in_flight.set(None);
        let more = extra.sock_nonempty().unwrap_or(false);
        self.more_queued.set(accepted.is_ok() && more);
        self.seen_empty.set(!more);
        let accepted = accepted.and_then(|_| {
            use compio::buf::IntoInner;
            let (socket, peer) = op.into_inner();
            let peer = peer
                .as_socket()
                .ok_or_else(|| io::Error::other("accepted a connection that is not IP"))?;
            Ok((
                TcpStream::from_std(std::net::TcpStream::from(socket))?,
                peer,
            ))
        });
        match accepted {
            // Accepted, stopped or not: the connection is ours to serve.
            Ok(conn) => Some(Ok(conn)),
            Err(_) if self.stopped.get() => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Whether the kernel said, when it completed the last accept, that
    /// more connections were queued behind it: the loop may take them at
    /// once with [`accept_now`] instead of one per turn of the ring.
    pub fn more_queued(&self) -> bool {
        self.more_queued.get()
    }

    /// The caller took what was queued ([`accept_now`] found nothing more,
    /// `empty`) or stopped taking (a cap or the connection limit, not
    /// `empty`): the next accept waits for readiness first only when empty.
    pub fn drained(&self, empty: bool) {
        self.more_queued.set(false);
        self.seen_empty.set(empty);
    }

    /// Stops the loop: the accept in flight is cancelled (or completes).
    /// Must be called on the shard that runs the loop (the cancellation goes
    /// through its ring).
    pub fn stop(&self) {
        self.stopped.set(true);
        if let Some(fd) = self.in_flight.get() {
            spawn(async move {
                let BufResult(cancelled, _) = compio::runtime::submit(CancelAllOn { fd }).await;
                // ENOENT: the accept had completed already; anything else
                // (a kernel before 5.19 without cancel-by-descriptor) leaves
                // the accept waiting for one more client, which it serves.
                if let Err(e) = cancelled {
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        tracing::warn!(error = %e, fd,
                            "could not cancel the accept in flight; the accept loop \
                             stops after its next connection");
                    }
                }
            })
            .detach();
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.get()
    }
}

/// io_uring `ASYNC_CANCEL` of every request in flight on descriptor `fd`
/// (`IORING_ASYNC_CANCEL_FD | IORING_ASYNC_CANCEL_ALL`, Linux 5.19). compio
/// cancels only by operation key, which it hands out through a mechanism the
/// release build breaks (see [`AcceptGate`]).
struct CancelAllOn {
    fd: std::os::fd::RawFd,
}

// SAFETY: the entry refers to no memory: only a descriptor number, which
// the kernel matches against requests in flight (a closed or reused number
// matches nothing of ours or cancels an accept we are stopping anyway).
unsafe impl compio::driver::OpCode for CancelAllOn {
    type Control = ();

    fn create_entry(&mut self, _: &mut ()) -> compio::driver::OpEntry {
        use io_uring::{opcode::AsyncCancel2, types};
        let matching = types::CancelBuilder::fd(types::Fd(self.fd)).all();
        compio::driver::OpEntry::Submission(AsyncCancel2::new(matching).build())
    }
}

impl Default for AcceptGate {
    fn default() -> Self {
        AcceptGate::new()
    }
}

/// A connection already queued on `listener`, without waiting: `Ok(None)`
/// when there is none. A plain non-blocking `accept4(2)` (the listening
/// sockets are `O_NONBLOCK`), used after an [`AcceptGate`] stopped, and to
/// take the connections its last accept said were queued behind it.
pub fn accept_now(listener: &TcpListener) -> io::Result<Option<(TcpStream, SocketAddr)>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: a borrowed view of a descriptor `listener` owns and keeps open
    // for this call; ManuallyDrop keeps the view from closing it.
    let view = std::mem::ManuallyDrop::new(unsafe {
        std::net::TcpListener::from_raw_fd(listener.as_raw_fd())
    });
    match view.accept() {
        Ok((stream, peer)) => Ok(Some((TcpStream::from_std(stream)?, peer))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// A listener for a shard. Made non-blocking here, whoever bound it:
/// io_uring's ACCEPT does not care, but [`accept_now`] must never wait.
pub fn listener_from_std(listener: std::net::TcpListener) -> io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// A TCP connection to `addr`, TCP_NODELAY set.
///
/// The socket is made and the SYN sent by plain non-blocking calls from the
/// task (`socket(2)`, `connect(2)`), and io_uring only waits for the
/// handshake to finish (one POLL): compio's own connect submits a SOCKET,
/// then a CONNECT after that completes, so the SYN left a turn of the loop
/// later, with the turn's other submissions.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    let in_progress = match socket.connect(&addr.into()) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
        Err(e) => return Err(e),
    };
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    if in_progress {
        stream.to_poll_fd()?.write_ready().await?;
        // Writable means the handshake ended, well or not.
        let socket = socket2::SockRef::from(&stream);
        if let Some(e) = socket.take_error()? {
            return Err(e);
        }
    }
    Ok(stream)
}

/// Resolves when `stream` has bytes to read, or an end of stream or error
/// to report, without reading anything (one io_uring POLL). Dropping it
/// loses nothing.
pub async fn readable(stream: &TcpStream) -> io::Result<()> {
    stream.to_poll_fd()?.read_ready().await
}

/// Bytes read from a socket, waiting to be written to the other.
pub enum Chunk {
    /// A buffer from the shard's ring (returned to the ring when dropped), or a
    /// tail of one.
    Pooled(compio::buf::Slice<BufferRef>),
    /// A heap buffer: the ring was empty, or bytes were gathered by hand.
    Owned(Vec<u8>),
}

impl Chunk {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Pooled(b) => b.as_init(),
            Chunk::Owned(v) => v,
        }
    }

    /// The bytes, to change in place (TLS records are decrypted where they
    /// were read).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Chunk::Pooled(b) => &mut b[..],
            Chunk::Owned(v) => &mut v[..],
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes from `start` on.
    pub fn advance(self, start: usize) -> Chunk {
        match self {
            Chunk::Pooled(mut b) => {
                b.set_begin(b.begin() + start);
                Chunk::Pooled(b)
            }
            Chunk::Owned(mut v) => {
                v.drain(..start);
                Chunk::Owned(v)
            }
        }
    }
}

/// Reads what is available (at most one buffer). `Ok(None)` at end of stream.
pub async fn read_chunk(stream: &TcpStream, fallback_len: usize) -> io::Result<Option<Chunk>> {
    let mut reader = stream;
    match reader.read_managed(0).await {
        Ok(Some(buf)) if buf.buf_len() > 0 => Ok(Some(Chunk::Pooled(buf.slice(..)))),
        Ok(_) => Ok(None),
        // The ring is empty: every buffer is in flight on this shard.
        Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
            let BufResult(n, buf) = reader.read(Vec::with_capacity(fallback_len)).await;
            match n? {
                0 => Ok(None),
                _ => Ok(Some(Chunk::Owned(buf))),
            }
        }
        Err(e) => Err(e),
    }
}

/// Reads what the socket holds now into `buf`'s spare capacity, from the
/// task and without waiting: `Ok(None)` when nothing is there yet,
/// `Ok(Some(0))` at end of stream.
///
/// For a bulk flow whose bytes are usually waiting already (see
/// `tls_conn::Reads`): read from the task, the flow goes on without a turn
/// of the shard's event loop per read.
pub fn recv_now(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    // SAFETY: `spare` is valid for writes of its length for the call (the
    // kernel writes at most that many bytes, which then are initialised);
    // the descriptor is `stream`'s, open for the call.
    let n = restarting(|| unsafe {
        libc::recv(
            stream.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    });
    let got = nonblocking(n)?;
    if let Some(n) = got {
        // SAFETY: the kernel initialised the first `n` spare bytes.
        unsafe { buf.set_len(buf.len() + n) };
    }
    Ok(got)
}

thread_local! {
    /// The shard's read buffer for [`recv_ready`]: every read is sent on
    /// before its task waits again, so one buffer serves the whole shard.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What a plain-TCP pump reads with: `stream`'s readability, from one
/// io_uring POLL armed for the connection's life (io_uring reports
/// readiness and moves no bytes).
pub use readiness::Readiness;

/// Waits until `stream` is readable, then reads what it holds (up to
/// `len` bytes, or the scratch buffer's size if an earlier `len` made it
/// larger) with [`recv_now`] from the task into the shard's scratch
/// buffer and hands the bytes to `forward` at once, with whether they are
/// the last of the stream ([`Readiness::peer_done`]; see [`Ending`]).
/// `Ok(None)`: nothing was there after all; `Ok(Some((0, _)))`: end of
/// stream; otherwise the bytes read and what `forward` returned. An error
/// is the read's.
///
/// Why not an io_uring RECV: RECVs complete as task work when the shard
/// enters the kernel, so a turn reads every ready connection first and
/// sends afterwards, and the peers' CPUs see a turn's bytes in one burst,
/// then nothing: they run dry, sleep, and are woken (an IPI each, in a VM)
/// by the next burst. Read here, each read is followed by its send, as in
/// an epoll proxy, and the peers are fed evenly: 2.3x fewer wake-ups of
/// the load generator's tasks, 10x fewer reschedule IPIs (README,
/// "Keep-alive requests: reads from the task").
pub async fn recv_ready<R>(
    stream: &TcpStream,
    ready: &mut Readiness,
    len: usize,
    forward: impl FnOnce(&[u8], Ending) -> R,
) -> io::Result<Option<(usize, R)>> {
    ready.wait(stream).await?;
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        buf.reserve(len);
        let room = buf.capacity();
        let got = recv_now(stream, buf)?;
        // Bytes or an end left behind get no wake-up (see `readiness`).
        ready.note_read(got, room);
        let Some(n) = got else {
            return Ok(None);
        };
        let ending = if ready.peer_done() {
            Ending::Follows
        } else {
            Ending::Open
        };
        Ok(Some((n, forward(&buf[..n], ending))))
    })
}

/// Whether the stream a pump copies from has ended behind the bytes it
/// forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// More may come.
    Open,
    /// The source's peer shut its side: an end of stream follows these
    /// bytes, and the pump's half-close of the destination after it. The
    /// bytes are sent corked (`MSG_MORE`) so that the FIN leaves with them
    /// in one segment instead of a second one of its own, as HAProxy does
    /// for a response its server closed behind: one segment fewer per
    /// connection-per-request exchange, and one fewer wake-up of the
    /// reader (README, "The last response and its FIN in one segment").
    /// Whatever follows is sent uncorked or shut down, which flushes them.
    Follows,
}

impl Ending {
    /// What a `send(2)` of these bytes adds to its flags.
    fn msg_flags(self) -> libc::c_int {
        match self {
            Ending::Open => 0,
            Ending::Follows => libc::MSG_MORE,
        }
    }
}

/// Sends `bytes` to `stream` as far as it takes them now; what it did not
/// take comes back as a chunk to write with [`write_rest`] (uncorked, so
/// it flushes bytes corked by [`Ending::Follows`]).
pub fn send_or_keep(stream: &TcpStream, bytes: &[u8], ending: Ending) -> io::Result<Option<Chunk>> {
    let sent = send_flags(stream, bytes, ending.msg_flags())?;
    Ok((sent < bytes.len()).then(|| Chunk::Owned(bytes[sent..].to_vec())))
}

/// A chunk is itself an I/O buffer, so that one write path serves both
/// kinds (one future type, not one per kind: a connection's task is as large
/// as its largest await).
impl IoBuf for Chunk {
    fn as_init(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Writes the whole chunk, then drops it (returning a pooled buffer).
///
/// First with a plain non-blocking `send(2)` from the task, and through an
/// io_uring SEND only for what the socket could not take at once. A SEND
/// that is submitted leaves with the rest of the turn's submissions, so the
/// replies of a whole turn reach the peers together, and on loopback each
/// wakes its reader's CPU from idle (a function-call IPI, a VM exit for
/// the sender); sent at once, they leave as each read is handled. Measured
/// in the `minimal` proxy (perf (a), Intel Xeon VM): CPU per keep-alive
/// request −4 to −6 %, the generator CPU's function-call IPIs a quarter.
pub async fn write_chunk(stream: &TcpStream, chunk: Chunk) -> io::Result<()> {
    let sent = send_now(stream, chunk.as_slice())?;
    if sent == chunk.len() {
        return Ok(());
    }
    write_rest(stream, chunk.advance(sent)).await
}

/// Writes `chunk` through io_uring, waiting for room: for what a send from
/// the task (`send_now`, [`send_or_keep`]) could not place, without trying
/// that send again at once.
pub async fn write_rest(stream: &TcpStream, mut chunk: Chunk) -> io::Result<()> {
    let mut writer = stream;
    loop {
        let BufResult(written, back) = writer.write(chunk).await;
        let n = written?;
        if n >= back.len() {
            return Ok(());
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // A short write (the socket buffer filled up): send the rest.
        chunk = back.advance(n);
    }
}

/// As much of `bytes` as the socket takes now, without waiting: 0 when it
/// takes nothing (a full send buffer).
fn send_now(stream: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    send_flags(stream, bytes, 0)
}

/// [`send_now`] with `flags` added to the call's own.
fn send_flags(stream: &TcpStream, bytes: &[u8], flags: libc::c_int) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // Nothing to send, no system call: a pump's read that finds the end of
    // stream hands on zero bytes, and that `send(2)` was two system calls
    // per connection-per-request exchange the minimal proxy did not make
    // (`strace -c` of perf (c): 4 `sendto` per connection against 2).
    if bytes.is_empty() {
        return Ok(0);
    }
    // SAFETY: `bytes` is valid for reads of its length for the call; the
    // descriptor is `stream`'s, open for the call.
    let n = restarting(|| unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | flags,
        )
    });
    Ok(nonblocking(n)?.unwrap_or(0))
}

/// Calls `syscall` again while a signal cuts it short (`EINTR`): a read's
/// "nothing there" must mean an empty socket, since a reader waiting on a
/// multishot POLL gets no second wake-up for bytes it left (see
/// `readiness`).
fn restarting(mut syscall: impl FnMut() -> isize) -> isize {
    loop {
        let n = syscall();
        if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return n;
        }
    }
}

/// A non-blocking `send(2)` / `recv(2)` result: `Ok(None)` when the call
/// could not go on without waiting, the error for anything else.
fn nonblocking(n: isize) -> io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock => Ok(None),
        _ => Err(e),
    }
}

/// Writes all of `buf` and hands it back, so that a caller moving bulk data
/// reuses one warm buffer instead of allocating (and page-faulting) a fresh
/// one per read.
///
/// Sent like [`write_chunk`]: from the task first, through io_uring only
/// for what the socket did not take.
pub async fn write_vec(stream: &TcpStream, buf: Vec<u8>) -> io::Result<Vec<u8>> {
    let len = buf.len();
    write_prefix(stream, buf, len).await
}

/// Writes the first `len` bytes of `buf` and hands the whole buffer back,
/// its length unchanged: a caller that encrypts into a buffer keeps it
/// initialised from one use to the next instead of zeroing it each time.
pub async fn write_prefix(stream: &TcpStream, buf: Vec<u8>, len: usize) -> io::Result<Vec<u8>> {
    write_prefix_then(stream, buf, len, Ending::Open).await
}

/// [`write_prefix`], corked when an end of stream follows (see
/// [`Ending::Follows`]): the half-close after it then leaves in the same
/// segment.
pub async fn write_prefix_then(
    stream: &TcpStream,
    buf: Vec<u8>,
    len: usize,
    ending: Ending,
) -> io::Result<Vec<u8>> {
    let len = len.min(buf.len());
    let sent = send_flags(stream, &buf[..len], ending.msg_flags())?;
    if sent == len {
        return Ok(buf);
    }
    let mut writer = stream;
    let BufResult(result, rest) = writer.write_all(buf.slice(sent..len)).await;
    result.map(|()| compio::buf::IntoInner::into_inner(rest))
}

/// Writes a small fixed buffer (a PROXY header).
pub async fn write_bytes<const N: usize>(
    stream: &TcpStream,
    bytes: [u8; N],
    len: usize,
) -> io::Result<()> {
    let mut writer = stream;
    writer.write_all(bytes.slice(..len.min(N))).await.0
}

/// Half-closes: sends FIN, keeps reading.
///
/// A direct `shutdown(2)`, not an io_uring op: io_uring has no non-blocking
/// path for SHUTDOWN and always hands it to a kernel worker thread (io-wq),
/// which cost 15% of the proxy's CPU per new connection (measured with
/// `perf record`: every io-wq sample was `io_shutdown`). The call itself
/// never blocks on a TCP socket.
pub async fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a descriptor `stream` owns and keeps open.
    let rc = unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Which socket of a [`splice_to_end`] an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Reading `src`.
    Src,
    /// Writing `dst`.
    Dst,
}

/// Moves everything `src` still sends to `dst` with splice(2) through `pipe`,
/// never copying it into user space, then half-closes `dst`. `moved` hears of
/// every batch as it enters the pipe; `failed` hears which socket the error
/// that ends it came from (a reset reads the same from either).
///
/// Not io_uring's SPLICE: io_uring runs that op on io-wq kernel threads (four
/// hand-offs per request in DESIGN.md's measurements). Instead the shard
/// waits for readiness with one io_uring POLL and makes the two splice calls
/// itself, non-blocking, so bytes move on the shard's own core. Both
/// sockets are switched to `O_NONBLOCK` for that (io_uring's own RECV/SEND on
/// them, in the other direction, still wait for readiness inside the kernel).
pub async fn splice_to_end(
    pipe: Pipe,
    src: &TcpStream,
    dst: &TcpStream,
    moved: impl FnMut(usize),
    failed: impl FnOnce(SpliceEnd, &io::Error),
) -> io::Result<()> {
    let mut end = SpliceEnd::Src;
    let outcome = splice_loop(pipe, src, dst, moved, &mut end).await;
    if let Err(e) = &outcome {
        failed(end, e);
    }
    outcome
}

/// [`splice_to_end`]'s loop; `end` says which socket it last used.
async fn splice_loop(
    pipe: Pipe,
    src: &TcpStream,
    dst: &TcpStream,
    mut moved: impl FnMut(usize),
    end: &mut SpliceEnd,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    set_nonblocking(src.as_raw_fd())?;
    set_nonblocking(dst.as_raw_fd())?;
    let (src_ready, dst_ready) = (src.to_poll_fd()?, dst.to_poll_fd()?);
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut since_yield = 0;
    loop {
        // The pipe is empty here: fill it with what the socket has.
        *end = SpliceEnd::Src;
        let n = match splice(src_fd, pipe.write, PIPE_BATCH) {
            Ok(0) => {
                let _ = shutdown_write(dst).await;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                src_ready.read_ready().await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        moved(n);
        since_yield += n;
        let mut left = n;
        *end = SpliceEnd::Dst;
        while left > 0 {
            match splice(pipe.read, dst_fd, left) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst_ready.write_ready().await?,
                Err(e) => return Err(e),
            }
        }
        // While both sides keep up, neither splice ever waits: let the
        // shard's other connections run now and then.
        if since_yield >= YIELD_AFTER {
            since_yield = 0;
            yield_now().await;
        }
    }
}

/// Bytes a flow moves without waiting (spliced, or read from the task)
/// before it lets the shard's other tasks run.
pub(crate) const YIELD_AFTER: usize = 256 * 1024;

/// Lets every other ready task on the shard run once before resuming.
pub(crate) async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// At most this much per splice into the pipe: a default pipe's capacity
/// (16 pages).
const PIPE_BATCH: usize = 64 * 1024;

/// One non-blocking splice(2) between two descriptors, one of them a pipe.
fn splice(from: std::os::fd::RawFd, to: std::os::fd::RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors the caller keeps open; null
    // offsets (neither side is seekable).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller keeps open.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A non-blocking pipe for [`splice_to_end`], closed on drop.
pub struct Pipe {
    read: std::os::fd::RawFd,
    write: std::os::fd::RawFd,
}

impl Pipe {
    /// A pipe that holds a whole [`PIPE_BATCH`], or an error: out of
    /// descriptors, or the user's pipe-buffer allowance
    /// (`/proc/sys/fs/pipe-user-pages-soft`, 1,024 default pipes for a
    /// non-root user) is spent and the kernel hands out one-page pipes, which
    /// would splice 4 KiB per call. The caller then keeps copying.
    pub fn for_splice() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let pipe = Pipe {
            read: fds[0],
            write: fds[1],
        };
        // SAFETY: fcntl on a descriptor we own.
        let capacity = unsafe { libc::fcntl(pipe.write, libc::F_GETPIPE_SZ) };
        if capacity < 0 {
            return Err(io::Error::last_os_error());
        }
        if (capacity as usize) < PIPE_BATCH {
            return Err(io::Error::other(format!(
                "pipe holds only {capacity} bytes (pipe-user-pages-soft reached)"
            )));
        }
        Ok(pipe)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: both descriptors are ours and closed exactly once.
        unsafe {
            libc::close(self.read);
            libc::close(self.write);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;
    use std::io::{Read, Write};
    use std::rc::Rc;

    /// The shard's main task is woken from another thread (the engine's
    /// commands come that way), runs to its end, and `block_on_task` then
    /// returns.
    #[test]
    fn a_task_blocked_on_is_woken_from_another_thread_and_ends_the_wait() {
        let runtime = build_runtime(4, 4096).unwrap();
        let (tx, rx) = async_channel::unbounded::<u32>();
        let got = Rc::new(Cell::new(0));
        let seen = Rc::clone(&got);
        let sender = std::thread::spawn(move || {
            for n in 1..=3 {
                tx.send_blocking(n).unwrap();
            }
        });
        block_on_task(&runtime, async move {
            while let Ok(n) = rx.recv().await {
                seen.set(seen.get() + n);
            }
        });
        sender.join().unwrap();
        assert_eq!(got.get(), 6);
    }

    /// The gate reads the kernel's "more queued" flag from each accept: set
    /// when clients wait behind the one accepted, clear for the last one,
    /// and what it says is what `accept_now` then finds.
    #[test]
    fn an_accept_says_whether_more_clients_are_queued_behind_it() {
        let runtime = build_runtime(4, 4096).unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_listener.local_addr().unwrap();
        // The kernel completes handshakes by itself: three clients queued.
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let (first, queued, after_drain, last) = runtime.block_on(async {
            let listener = listener_from_std(std_listener).unwrap();
            let gate = AcceptGate::new();
            gate.accept(&listener).await.unwrap().unwrap();
            let first = gate.more_queued();
            let mut queued = 0;
            while let Some(conn) = accept_now(&listener).unwrap() {
                queued += 1;
                drop(conn);
            }
            gate.drained(true);
            let after_drain = gate.more_queued();
            // One more client, alone in the queue this time.
            let _late = std::net::TcpStream::connect(addr).unwrap();
            gate.accept(&listener).await.unwrap().unwrap();
            (first, queued, after_drain, gate.more_queued())
        });
        drop(runtime);
        drop(clients);
        assert!(first, "two clients waited behind the first accept");
        assert_eq!(queued, 2);
        assert!(!after_drain);
        assert!(!last, "nobody waited behind the last client");
    }

    /// The io_uring timeout never ends a sleep early, and a sleep dropped
    /// while pending (its request cancelled) leaves the shard working.
    #[test]
    fn sleeps_last_at_least_their_duration_and_can_be_dropped() {
        let runtime = build_runtime(4, 4096).unwrap();
        runtime.block_on(async {
            for ms in [0, 1, 30] {
                let start = Instant::now();
                sleep(Duration::from_millis(ms)).await;
                assert!(start.elapsed() >= Duration::from_millis(ms), "{ms} ms");
            }
            let start = Instant::now();
            sleep_until(start + Duration::from_millis(20)).await;
            assert!(start.elapsed() >= Duration::from_millis(20));
            // Dropped before its time: the shorter one wins the race.
            let long = std::pin::pin!(sleep(Duration::from_secs(3600)));
            let short = std::pin::pin!(sleep(Duration::from_millis(5)));
            match futures_util::future::select(long, short).await {
                futures_util::future::Either::Right(_) => {}
                futures_util::future::Either::Left(_) => panic!("the hour passed first"),
            }
            let start = Instant::now();
            sleep(Duration::from_millis(10)).await;
            assert!(start.elapsed() >= Duration::from_millis(10));
        });
    }

    #[test]
    fn a_panic_in_the_task_blocked_on_is_raised_again() {
        let runtime = build_runtime(4, 4096).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            block_on_task(&runtime, async { panic!("shard bug") });
        }));
        assert!(outcome.is_err());
    }

    /// A connected loopback pair with send and receive buffers of `buffer`
    /// bytes on both sides.
    pub(crate) fn loopback_pair(buffer: usize) -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_send_buffer_size(buffer).unwrap();
        socket.set_recv_buffer_size(buffer).unwrap();
        socket.connect(&addr.into()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let accepted = socket2::Socket::from(accepted);
        accepted.set_send_buffer_size(buffer).unwrap();
        accepted.set_recv_buffer_size(buffer).unwrap();
        (socket.into(), accepted.into())
    }

    /// 4 MiB buffers each way: a megabyte fits in flight without anyone
    /// reading.
    fn roomy_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        loopback_pair(4 << 20)
    }

    /// 16 KiB buffers: a large write cannot go out in one send and must
    /// wait for the reader.
    fn cramped_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        loopback_pair(16 << 10)
    }

    #[test]
    fn splice_moves_every_byte_and_lets_other_tasks_run() {
        const LEN: usize = 1 << 20;
        // writer -> src ... dst -> reader; src already holds the whole
        // megabyte and its end of stream, and dst has room for all of it:
        // no splice call ever has to wait.
        let (mut writer, src) = roomy_pair();
        let (dst, mut reader) = roomy_pair();
        let data: Vec<u8> = (0..LEN).map(|i| (i * 7 % 251) as u8).collect();
        writer.write_all(&data).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();

        let runtime = build_runtime(16, 4096).unwrap();
        let (moved, ticks_during) = runtime.block_on(async move {
            let src = TcpStream::from_std(src).unwrap();
            let dst = TcpStream::from_std(dst).unwrap();
            // Another task on the shard, counting its turns.
            let ticks = Rc::new(Cell::new(0u32));
            let counter = Rc::clone(&ticks);
            let _other = spawn(async move {
                loop {
                    counter.set(counter.get() + 1);
                    yield_now().await;
                }
            });
            yield_now().await;
            let before = ticks.get();
            let mut moved = 0;
            let pipe = Pipe::for_splice().unwrap();
            splice_to_end(
                pipe,
                &src,
                &dst,
                |n| moved += n,
                |end, e| panic!("{end:?}: {e}"),
            )
            .await
            .unwrap();
            (moved, ticks.get() - before)
        });
        assert_eq!(moved, LEN);
        // 1 MiB at a yield every 256 KiB.
        assert!(
            ticks_during >= 3,
            "the other task ran {ticks_during} times during the splice"
        );

        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert!(got == data, "spliced bytes differ");
    }

    /// The first send takes what fits and the rest follows through
    /// io_uring: every byte arrives once, in order.
    #[test]
    fn a_chunk_larger_than_the_socket_takes_at_once_arrives_whole_and_in_order() {
        const LEN: usize = 4 << 20;
        let (ours, mut theirs) = cramped_pair();
        let data: Vec<u8> = (0..LEN).map(|i| (i * 7 % 251) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).unwrap();
            got
        });
        let runtime = build_runtime(4, 4096).unwrap();
        let chunk = Chunk::Owned(data.clone());
        runtime.block_on(async move {
            let ours = TcpStream::from_std(ours).unwrap();
            write_chunk(&ours, chunk).await.unwrap();
            shutdown_write(&ours).await.unwrap();
        });
        let got = reader.join().unwrap();
        assert_eq!(got.len(), LEN);
        assert!(got == data, "bytes differ");
    }

    /// One end of a connected pair whose peer has reset the connection.
    pub(crate) fn reset_by_its_peer() -> std::net::TcpStream {
        let (ours, theirs) = cramped_pair();
        socket2::Socket::from(theirs)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        // Dropped with linger 0: the peer's close sent a reset, which
        // loopback delivered to `ours` before the close returned.
        ours
    }

    /// A peer that reset the connection makes the write fail, not hang or
    /// panic.
    #[test]
    fn a_write_to_a_reset_peer_fails() {
        let ours = reset_by_its_peer();
        let runtime = build_runtime(4, 4096).unwrap();
        let outcome = runtime.block_on(async move {
            let ours = TcpStream::from_std(ours).unwrap();
            write_chunk(&ours, Chunk::Owned(vec![1u8; 1024])).await
        });
        assert!(outcome.is_err(), "{outcome:?}");
    }

    /// A connection to a listener carries bytes with TCP_NODELAY set; one
    /// to a port nobody listens on fails with the refusal, not a hang.
    #[test]
    fn connect_reaches_a_listener_and_reports_a_refused_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let closed = {
            let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            gone.local_addr().unwrap()
        };
        let runtime = build_runtime(4, 4096).unwrap();
        let (nodelay, refused) = runtime.block_on(async move {
            let stream = connect(open).await.unwrap();
            write_chunk(&stream, Chunk::Owned(b"hello".to_vec()))
                .await
                .unwrap();
            let nodelay = socket2::SockRef::from(&stream).tcp_nodelay().unwrap();
            (nodelay, connect(closed).await.map(drop))
        });
        let (mut accepted, _) = listener.accept().unwrap();
        let mut got = [0u8; 5];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert!(nodelay);
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
    }

    /// Segments `socket` has received so far (`tcpi_segs_in`).
    pub(crate) fn segments_in(socket: &std::net::TcpStream) -> u32 {
        use std::os::fd::AsRawFd;
        // SAFETY: an all-zero tcp_info is valid; the kernel fills at most
        // `len` bytes of it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `info` and `len` are valid for writes; the descriptor is open.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        info.tcpi_segs_in
    }

    /// Copies `source` to its end into `sink` the way a plain-TCP pump
    /// does, then half-closes `sink`; returns how many segments `sink`'s
    /// peer received for it.
    fn segments_for_the_last_bytes(peer_writes_then_shuts: bool) -> u32 {
        let (mut writer, source) = roomy_pair();
        let (sink, mut reader) = roomy_pair();
        sink.set_nodelay(true).unwrap();
        writer.write_all(b"the last response").unwrap();
        if peer_writes_then_shuts {
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let before = segments_in(&reader);
        let runtime = build_runtime(4, 4096).unwrap();
        runtime.block_on(async move {
            let source = TcpStream::from_std(source).unwrap();
            let sink = TcpStream::from_std(sink).unwrap();
            let mut ready = Readiness::new();
            // Kept open to the end either way; shut later only if not yet.
            let mut shut_later = (!peer_writes_then_shuts).then_some(&writer);
            loop {
                let read = recv_ready(&source, &mut ready, 4096, |bytes, ending| {
                    send_or_keep(&sink, bytes, ending)
                })
                .await
                .unwrap();
                match read {
                    Some((0, _)) => break,
                    Some((_, rest)) => {
                        assert!(rest.unwrap().is_none(), "all sent at once");
                        // The FIN only once the bytes went on: no ending
                        // known when they were sent.
                        if let Some(writer) = shut_later.take() {
                            writer.shutdown(std::net::Shutdown::Write).unwrap();
                        }
                    }
                    None => {}
                }
            }
            shutdown_write(&sink).await.unwrap();
        });
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"the last response");
        segments_in(&reader) - before
    }

    /// Bytes read behind which the source already ended leave corked, and
    /// the half-close that follows carries its FIN in their segment (as
    /// HAProxy sends a closed server's last response); bytes read while the
    /// source was still open go at once, and the FIN needs a segment of its
    /// own.
    #[test]
    fn the_last_bytes_and_the_fin_leave_in_one_segment() {
        assert_eq!(
            segments_for_the_last_bytes(true),
            1,
            "data and FIN together"
        );
        assert_eq!(segments_for_the_last_bytes(false), 2, "data, then the FIN");
    }

    /// An empty send makes no system call: on a socket whose peer reset
    /// the connection, `send(2)` of zero bytes would fail with the reset.
    #[test]
    fn an_empty_send_makes_no_system_call() {
        let ours = reset_by_its_peer();
        let runtime = build_runtime(4, 4096).unwrap();
        let (empty, some) = runtime.block_on(async move {
            let ours = TcpStream::from_std(ours).unwrap();
            (
                send_or_keep(&ours, b"", Ending::Follows).map(|rest| rest.is_none()),
                send_or_keep(&ours, b"x", Ending::Open).map(drop),
            )
        });
        assert!(empty.unwrap(), "nothing to keep");
        // The socket did report the reset to a send that had bytes: the
        // empty one succeeded because it never reached the kernel.
        assert!(some.is_err(), "{some:?}");
    }
}
