//! The minimal compio L4 proxy the perf suite measures as `minimal`: the bar
//! edgeproxy's data plane must keep while doing real work (DESIGN.md: "Minimal
//! compio proxies measured on this machine set the bar").
//!
//! Same runtime settings as an edgeproxy shard (io_uring, single issuer,
//! deferred task running, a ring of 256 provided 64 KiB buffers), one thread
//! per worker pinned like edgeproxy's shards, one `SO_REUSEPORT` listener per
//! front per thread, TCP_NODELAY both sides. And nothing else: a fixed
//! backend per front, no routing table, no GeoIP, no affinity, no limits, no
//! counters, no timeouts, no PROXY protocol, no TLS, no splice. The gap
//! between this and edgeproxy in the same suite run is what that work costs.
//!
//! `--multishot` (or `MINIMAL_PROXY_MULTISHOT=1`) reads with one multishot
//! receive per socket instead of one receive per read: the experiment
//! README's "Keep-alive requests and multishot receive" reports.
//! `--multishot-accept` (or `MINIMAL_PROXY_MULTISHOT_ACCEPT=1`) accepts with
//! one multishot accept per listener instead of one accept per connection
//! (and asks each connection its peer address, as a real proxy must): the
//! experiment README's "New connections and multishot accept" reports.
//!
//! Accepts are edgeproxy's too: one io_uring ACCEPT at a time, and when its
//! completion says more clients are queued behind it, up to 4 of them taken
//! at once with `accept(2)` (README, "New connections: taking what is
//! queued"); `MINIMAL_PROXY_ONE_ACCEPT=1` takes one per ACCEPT, as both
//! proxies did before.
//!
//! Backend connections are made as edgeproxy's are (`socket(2)` and a
//! non-blocking `connect(2)` from the task, one io_uring POLL for the
//! handshake's end), and writes go out as edgeproxy's do: a non-blocking `send(2)` first, an
//! io_uring SEND only for what the socket did not take (README, "Keep-alive
//! requests: sends from the task"). `--uring-send` (or
//! `MINIMAL_PROXY_URING_SEND=1`) sends everything through io_uring SENDs,
//! as both proxies did before.
//!
//! Reads, too, are edgeproxy's: io_uring only reports that a socket is
//! readable (a POLL) and the task reads with `recv(2)` and sends at once,
//! so reads and sends alternate within a turn as in an epoll proxy (README,
//! "Keep-alive requests: reads from the task"). `--uring-recv` (or
//! `MINIMAL_PROXY_URING_RECV=1`) reads through io_uring RECVs into the
//! provided-buffer ring instead, as both proxies did before. Readiness
//! comes from one multishot POLL per socket, armed once (edgeproxy's own
//! `engine::rt::Readiness`; README, "Keep-alive requests: one POLL per
//! connection"); `--poll-once` (or `MINIMAL_PROXY_POLL_ONCE=1`) arms a
//! one-shot POLL for every read instead, as both proxies did before.
//! Bytes read behind which the source already ended are sent corked
//! (`MSG_MORE`), so the half-close after them leaves in their segment, as
//! edgeproxy's `rt::Ending` does (README, "The last response and its FIN in
//! one segment"); `--no-cork` (or `MINIMAL_PROXY_NO_CORK=1`) sends them at
//! once, as both proxies did before.
//!
//! Usage: `minimal-proxy [--multishot] [--multishot-accept] [--uring-send]
//! [--uring-recv] [--poll-once] [--no-cork] --workers N FRONT=BACKEND...`; prints
//! `minimal-proxy listening` on stderr once every listener is bound.

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::rc::Rc;

use compio::buf::{BufResult, IoBuf};
use compio::io::{AsyncReadManaged, AsyncWrite};
use compio::net::{TcpListener, TcpStream};

fn main() {
    if let Err(e) = run() {
        eprintln!("minimal-proxy: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut workers = 1usize;
    // The environment variable lets the perf suite, which starts this
    // binary itself, measure the multishot variants.
    let mut multishot = std::env::var_os("MINIMAL_PROXY_MULTISHOT").is_some();
    let mut multishot_accept = std::env::var_os("MINIMAL_PROXY_MULTISHOT_ACCEPT").is_some();
    let mut uring_send = std::env::var_os("MINIMAL_PROXY_URING_SEND").is_some();
    let mut uring_recv = std::env::var_os("MINIMAL_PROXY_URING_RECV").is_some();
    let mut poll_once = std::env::var_os("MINIMAL_PROXY_POLL_ONCE").is_some();
    let mut no_cork = std::env::var_os("MINIMAL_PROXY_NO_CORK").is_some();
    let mut routes: Vec<(SocketAddr, SocketAddr)> = Vec::new();
    while let Some(arg) = args.next() {
        let flag = match arg.as_str() {
            "--uring-send" => Some(&mut uring_send),
            "--uring-recv" => Some(&mut uring_recv),
            "--poll-once" => Some(&mut poll_once),
            "--no-cork" => Some(&mut no_cork),
            "--multishot" => Some(&mut multishot),
            "--multishot-accept" => Some(&mut multishot_accept),
            _ => None,
        };
        if let Some(flag) = flag {
            *flag = true;
            continue;
        }
        if arg == "--workers" {
            workers = args
                .next()
                .and_then(|n| n.parse().ok())
                .filter(|n| *n > 0)
                .ok_or("--workers needs a positive number")?;
            continue;
        }
        let (front, back) = arg
            .split_once('=')
            .ok_or_else(|| format!("expected FRONT=BACKEND, got {arg:?}"))?;
        let parse = |s: &str| {
            s.parse::<SocketAddr>()
                .map_err(|e| format!("bad address {s:?}: {e}"))
        };
        routes.push((parse(front)?, parse(back)?));
    }
    if routes.is_empty() {
        return Err(
            "usage: minimal-proxy [--multishot] [--multishot-accept] [--uring-send] \
             [--uring-recv] [--poll-once] [--no-cork] [--workers N] FRONT=BACKEND..."
                .into(),
        );
    }
    URING_SEND.store(uring_send, std::sync::atomic::Ordering::Relaxed);
    URING_RECV.store(uring_recv, std::sync::atomic::Ordering::Relaxed);
    POLL_ONCE.store(poll_once, std::sync::atomic::Ordering::Relaxed);
    NO_CORK.store(no_cork, std::sync::atomic::Ordering::Relaxed);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut threads = Vec::new();
    for i in 0..workers {
        let routes = routes.clone();
        let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
        let ready = ready_tx.clone();
        threads.push(std::thread::spawn(move || {
            if let Some(core) = core {
                core_affinity::set_for_current(core);
            }
            if let Err(e) = worker(&routes, multishot, multishot_accept, &ready) {
                let _ = ready.send(Err(e.to_string()));
            }
        }));
    }
    for _ in 0..workers {
        ready_rx
            .recv()
            .map_err(|_| "a worker died during start".to_string())??;
    }
    eprintln!("minimal-proxy listening");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn worker(
    routes: &[(SocketAddr, SocketAddr)],
    multishot: bool,
    multishot_accept: bool,
    ready: &std::sync::mpsc::Sender<Result<(), String>>,
) -> io::Result<()> {
    let mut proactor = compio::driver::ProactorBuilder::new();
    proactor
        .single_issuer(true)
        .defer_taskrun(true)
        .buffer_pool_size(NonZeroU16::new(256).expect("nonzero"))
        .buffer_pool_buffer_len(64 * 1024);
    let runtime = compio::runtime::RuntimeBuilder::new()
        .with_proactor(proactor)
        .build()?;
    runtime.block_on(async {
        let mut listeners = Vec::new();
        for &(front, back) in routes {
            listeners.push((reuseport_listener(front)?, back));
        }
        let _ = ready.send(Ok(()));
        let mut tasks = Vec::new();
        for (listener, back) in listeners {
            let listener = Rc::new(listener);
            tasks.push(if multishot_accept {
                compio::runtime::spawn(accept_multishot_loop(listener, back, multishot))
            } else {
                compio::runtime::spawn(accept_loop(listener, back, multishot))
            });
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    engine::rt::listener_from_std(socket.into())
}

/// One accept submitted per connection, as edgeproxy's shards do, and, as
/// they do, the connections the kernel says are queued behind it taken at
/// once with `accept(2)` (up to 4, `MINIMAL_PROXY_TAKE_QUEUED=N` for N).
/// `MINIMAL_PROXY_ONE_ACCEPT=1`: one connection per io_uring accept, as
/// both proxies did before.
async fn accept_loop(listener: Rc<TcpListener>, back: SocketAddr, multishot: bool) {
    let take_queued = std::env::var_os("MINIMAL_PROXY_ONE_ACCEPT").is_none();
    // edgeproxy's `TAKE_QUEUED_AT_MOST`.
    let at_most: usize = std::env::var("MINIMAL_PROXY_TAKE_QUEUED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let gate = engine::rt::AcceptGate::new();
    let spawn = |client| {
        compio::runtime::spawn(async move {
            let _ = serve(client, back, multishot).await;
        })
        .detach();
    };
    loop {
        let Some(Ok((client, _))) = gate.accept(&listener).await else {
            continue;
        };
        spawn(client);
        if take_queued && gate.more_queued() {
            let mut empty = false;
            for _ in 0..at_most {
                match engine::rt::accept_now(&listener) {
                    Ok(Some((client, _))) => spawn(client),
                    Ok(None) => {
                        empty = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            gate.drained(empty);
        }
    }
}

/// One multishot accept armed on the listener (`--multishot-accept`): the
/// kernel accepts each connection as it arrives and posts one completion for
/// it, with no submission per connection. The completion carries no peer
/// address, so each connection asks for it (`getpeername(2)`), which a real
/// proxy needs for routing and logs.
async fn accept_multishot_loop(listener: Rc<TcpListener>, back: SocketAddr, multishot: bool) {
    use futures_util::StreamExt;
    let mut incoming = listener.incoming();
    while let Some(accepted) = incoming.next().await {
        let Ok(client) = accepted else {
            continue;
        };
        if client.peer_addr().is_err() {
            continue;
        }
        compio::runtime::spawn(async move {
            let _ = serve(client, back, multishot).await;
        })
        .detach();
    }
}

/// Both directions until both end, or until either fails: then the other is
/// dropped and both sockets close, as edgeproxy's `conn` does (`try_join`).
/// Waiting for the other direction after a failure left a connection whose
/// client had reset while no request was in flight waiting on its idle
/// backend for good (seen in run 29: 13 backend connections still open
/// after (a) and (b)).
async fn serve(client: TcpStream, back: SocketAddr, multishot: bool) -> io::Result<()> {
    let backend = connect(back).await?;
    if multishot {
        let up = pump_multishot(&client, &backend);
        let down = pump_multishot(&backend, &client);
        let _ = futures_util::future::try_join(up, down).await;
    } else if URING_RECV.load(std::sync::atomic::Ordering::Relaxed) {
        let up = pump_uring_recv(&client, &backend);
        let down = pump_uring_recv(&backend, &client);
        let _ = futures_util::future::try_join(up, down).await;
    } else {
        let up = pump(&client, &backend);
        let down = pump(&backend, &client);
        let _ = futures_util::future::try_join(up, down).await;
    }
    Ok(())
}

/// Connects as edgeproxy does (`engine::rt::connect`): socket(2) and a
/// non-blocking connect(2) from the task, then one io_uring POLL for the
/// handshake's end, instead of compio's SOCKET then CONNECT submissions.
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
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
        if let Some(e) = socket2::SockRef::from(&stream).take_error()? {
            return Err(e);
        }
    }
    Ok(stream)
}

/// `--uring-send`: every write through an io_uring SEND. Set once at start.
static URING_SEND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// As much of `bytes` as `dst` takes now, without waiting (0: nothing, or
/// `--uring-send`).
fn send_now(dst: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    send_flags(dst, bytes, 0)
}

/// [`send_now`] with `flags` added to the call's own.
fn send_flags(dst: &TcpStream, bytes: &[u8], flags: libc::c_int) -> io::Result<usize> {
    if URING_SEND.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(0);
    }
    // SAFETY: `bytes` is valid for reads of its length; the descriptor is
    // `dst`'s, open for the call.
    let n = unsafe {
        libc::send(
            std::os::fd::AsRawFd::as_raw_fd(dst),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | flags,
        )
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
        _ => Err(e),
    }
}

/// `pump` reading through io_uring RECVs into provided buffers
/// (`--uring-recv`), then half-closes `dst`.
async fn pump_uring_recv(src: &TcpStream, dst: &TcpStream) -> io::Result<()> {
    let mut reader = src;
    let mut writer = dst;
    loop {
        let buf = match reader.read_managed(0).await? {
            Some(buf) if !buf.as_init().is_empty() => buf,
            _ => {
                // SAFETY: shutdown(2) on a descriptor `dst` keeps open.
                unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(dst), libc::SHUT_WR) };
                return Ok(());
            }
        };
        let sent = send_now(dst, buf.as_init())?;
        if sent == buf.as_init().len() {
            continue;
        }
        let mut chunk = buf.slice(sent..);
        loop {
            let BufResult(n, back) = writer.write(chunk).await;
            let n = n?;
            if n >= back.as_init().len() {
                break;
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let mut back = back;
            back.set_begin(back.begin() + n);
            chunk = back;
        }
    }
}

/// `--uring-recv`: every read through an io_uring RECV. Set once at start.
static URING_RECV: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    /// `pump`'s read buffer: a read is sent on before the task waits
    /// again, so one buffer per thread serves every connection.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 * 1024]);
}

/// What one read of `pump` left to do.
enum Step {
    /// The peer half-closed.
    End,
    /// Everything read (or nothing) is sent.
    Sent,
    /// Bytes the destination did not take at once.
    Rest(Vec<u8>),
}

/// Copies `src` to `dst`, then half-closes `dst`, reading the way an epoll
/// proxy does: io_uring only says when `src` is readable (edgeproxy's
/// `engine::rt::Readiness`: one multishot POLL armed for the socket's
/// life), and the task then reads with `recv(2)` and sends at once, so a
/// turn's reads and sends alternate as HAProxy's do, where io_uring RECVs
/// run all of a turn's reads before any send.
async fn pump(src: &TcpStream, dst: &TcpStream) -> io::Result<()> {
    use compio::io::AsyncWriteExt;
    let ready = src.to_poll_fd()?;
    let mut multi =
        (!POLL_ONCE.load(std::sync::atomic::Ordering::Relaxed)).then(engine::rt::Readiness::new);
    let fd = std::os::fd::AsRawFd::as_raw_fd(src);
    let mut writer = dst;
    loop {
        match &mut multi {
            Some(readable) => readable.wait(src).await?,
            None => ready.read_ready().await?,
        }
        let step = READ_BUF.with_borrow_mut(|buf| -> io::Result<Step> {
            let got = loop {
                // SAFETY: `buf` is valid for writes of its length; the
                // descriptor is `src`'s, open for the call.
                let n = unsafe {
                    libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
                };
                if n >= 0 {
                    break Some(n as usize);
                }
                // A signal: read again (an empty read must mean an empty
                // socket, the multishot POLL wakes once per arrival).
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => break None,
                    _ => return Err(e),
                }
            };
            if let Some(readable) = &mut multi {
                readable.note_read(got, buf.len());
            }
            let n = match got {
                None => return Ok(Step::Sent),
                Some(0) => return Ok(Step::End),
                Some(n) => n,
            };
            // The source ended behind these bytes: cork them, the
            // shutdown(2) below sends them with its FIN.
            let ended = multi.as_ref().is_some_and(|r| r.peer_done())
                && !NO_CORK.load(std::sync::atomic::Ordering::Relaxed);
            let sent = send_flags(dst, &buf[..n], if ended { libc::MSG_MORE } else { 0 })?;
            Ok(if sent == n {
                Step::Sent
            } else {
                Step::Rest(buf[sent..n].to_vec())
            })
        })?;
        match step {
            Step::End => break,
            Step::Sent => {}
            Step::Rest(rest) => writer.write_all(rest).await.0?,
        }
    }
    // SAFETY: shutdown(2) on a descriptor `dst` keeps open.
    unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(dst), libc::SHUT_WR) };
    Ok(())
}

/// `--poll-once`: pumps wait with one one-shot POLL per read instead of
/// edgeproxy's multishot POLL per socket. Set once at start.
static POLL_ONCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--no-cork`: the last bytes of a flow are sent at once, and the FIN after
/// them in a segment of its own. Set once at start.
static NO_CORK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `pump` with one multishot receive armed for the connection's life (the
/// kernel fills a provided buffer whenever data arrives, with no new
/// submission nor poll arming per read): `--multishot`, the experiment
/// README's "Keep-alive requests and multishot receive" reports. When the
/// ring is empty the multishot ends with ENOBUFS: one plain read into a heap
/// buffer, then the stream arms a new multishot.
async fn pump_multishot(src: &TcpStream, dst: &TcpStream) -> io::Result<()> {
    use compio::io::{AsyncRead, AsyncReadMulti, AsyncWriteExt};
    use futures_util::StreamExt;
    let mut reader = src;
    let mut writer = dst;
    let mut reads = std::pin::pin!(reader.read_multi(0));
    loop {
        match reads.next().await {
            Some(Ok(buf)) => writer.write_all(buf).await.0?,
            Some(Err(e)) if e.kind() == io::ErrorKind::ResourceBusy => {
                let mut fallback = src;
                let BufResult(n, buf) = fallback.read(Vec::with_capacity(64 * 1024)).await;
                if n? == 0 {
                    break;
                }
                writer.write_all(buf).await.0?;
            }
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    // SAFETY: shutdown(2) on a descriptor `dst` keeps open.
    unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(dst), libc::SHUT_WR) };
    Ok(())
}
