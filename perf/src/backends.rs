//! The suite's own backends on loopback, started in-process:
//!
//! * **HTTP**: an HTTP/1.1 responder. Every request (anything ending in an
//!   empty line) gets the same small response; keep-alive unless the request
//!   says `Connection: close`, in which case the backend closes first (so
//!   TIME_WAIT stays on the server side, as with a real web server).
//! * **echo**: writes back what it reads (the idle-connection scenario).
//! * **bulk**: after a 9-byte command, `D` + u64 streams that many bytes to the
//!   client, `U` + u64 reads that many bytes and counts them, `R` + u64
//!   streams to the client at that many bytes per second until it closes.
//!
//! HTTP and echo share one event loop (mio, edge-triggered), so thousands of
//! connections cost one thread. Bulk uses a thread per connection: there are
//! only a few and each moves gigabytes.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::byte_pace::{BytePacer, PACED_CHUNK};

/// The keep-alive response (a 13-byte body).
pub const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nhello, world\n";
/// The response to a `Connection: close` request.
pub const RESPONSE_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nhello, world\n";
pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: perf\r\n\r\n";
pub const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: perf\r\nConnection: close\r\n\r\n";

/// Size of a bulk command: one byte (`D`, `U` or `R`) and a big-endian u64.
pub const BULK_CMD_LEN: usize = 9;

/// A bulk command: `op` (`D`, `U` or `R`) and its argument.
pub fn bulk_command(op: u8, arg: u64) -> [u8; BULK_CMD_LEN] {
    let mut cmd = [0u8; BULK_CMD_LEN];
    cmd[0] = op;
    cmd[1..].copy_from_slice(&arg.to_be_bytes());
    cmd
}

const BULK_CHUNK: usize = 256 * 1024;

/// Running backends; stopped on drop.
pub struct Backends {
    pub http: SocketAddr,
    pub echo: SocketAddr,
    pub bulk: SocketAddr,
    /// Bytes the bulk backend received from `U` commands.
    pub bulk_received: Arc<AtomicU64>,
    /// Bytes the bulk backend sent for `D` commands.
    pub bulk_sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    threads: Vec<JoinHandle<()>>,
}

/// Listen backlog of the HTTP and echo backends: the system's maximum
/// (`somaxconn`, 4096 here), as nginx (511), Go's `net/http` (somaxconn)
/// and HAProxy itself use a deep one. mio and std listen with 128: in the
/// overload scenario's connection flood that queue overflowed while the
/// backend's thread waited for the generator's core, every dropped SYN
/// cost its client a 1 s retransmit, and a target was judged by how its
/// connects happened to bunch at the backend (611 overflows in one
/// edgeproxy run, 36 in one HAProxy run, 2026-12-06), not by how it
/// degrades.
const BACKEND_BACKLOG: i32 = 4096;

/// A non-blocking listener on an ephemeral loopback port with
/// [`BACKEND_BACKLOG`].
fn listen_deep() -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(BACKEND_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}

impl Backends {
    /// Starts every backend on 127.0.0.1 (ephemeral ports); their threads run
    /// on `cpus` (empty: anywhere).
    pub fn start(cpus: &[usize]) -> io::Result<Backends> {
        let http = listen_deep()?;
        let echo = listen_deep()?;
        let bulk = std::net::TcpListener::bind("127.0.0.1:0")?;
        let (http_addr, echo_addr, bulk_addr) =
            (http.local_addr()?, echo.local_addr()?, bulk.local_addr()?);
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let stop = Arc::new(AtomicBool::new(false));
        let bulk_received = Arc::new(AtomicU64::new(0));
        let bulk_sent = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        {
            let stop = Arc::clone(&stop);
            let cpus = cpus.to_vec();
            threads.push(
                std::thread::Builder::new()
                    .name("perf-backend".into())
                    .spawn(move || {
                        let _ = crate::procfs::pin_current_thread(&cpus);
                        if let Err(e) = event_loop(poll, http, echo, &stop) {
                            eprintln!("perf: backend loop failed: {e}");
                        }
                    })?,
            );
        }
        {
            let stop = Arc::clone(&stop);
            let cpus = cpus.to_vec();
            let (rx, tx) = (Arc::clone(&bulk_received), Arc::clone(&bulk_sent));
            bulk.set_nonblocking(true)?;
            threads.push(std::thread::Builder::new().name("perf-bulk".into()).spawn(
                move || {
                    let _ = crate::procfs::pin_current_thread(&cpus);
                    while !stop.load(Ordering::Relaxed) {
                        match bulk.accept() {
                            Ok((s, _)) => {
                                let (rx, tx) = (Arc::clone(&rx), Arc::clone(&tx));
                                let cpus = cpus.clone();
                                let _ = std::thread::Builder::new()
                                    .name("perf-bulk-conn".into())
                                    .spawn(move || {
                                        let _ = crate::procfs::pin_current_thread(&cpus);
                                        let _ = bulk_conn(s, &rx, &tx);
                                    });
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(5))
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                },
            )?);
        }
        Ok(Backends {
            http: http_addr,
            echo: echo_addr,
            bulk: bulk_addr,
            bulk_received,
            bulk_sent,
            stop,
            waker,
            threads,
        })
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn bulk_conn(mut s: std::net::TcpStream, received: &AtomicU64, sent: &AtomicU64) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; BULK_CHUNK];
    loop {
        let mut cmd = [0u8; BULK_CMD_LEN];
        s.read_exact(&mut cmd)?;
        let mut left = u64::from_be_bytes(cmd[1..].try_into().unwrap());
        match cmd[0] {
            b'D' => {
                while left > 0 {
                    let n = (left as usize).min(buf.len());
                    let w = s.write(&buf[..n])?;
                    sent.fetch_add(w as u64, Ordering::Relaxed);
                    left -= w as u64;
                }
            }
            b'R' => {
                let mut pacer = BytePacer::new(left as f64);
                let chunk = &buf[..PACED_CHUNK];
                loop {
                    pacer.wait();
                    let w = s.write(chunk)?;
                    if w == 0 {
                        return Ok(());
                    }
                    sent.fetch_add(w as u64, Ordering::Relaxed);
                    pacer.moved(w);
                }
            }
            b'U' => {
                while left > 0 {
                    let n = (left as usize).min(buf.len());
                    let r = s.read(&mut buf[..n])?;
                    if r == 0 {
                        return Ok(());
                    }
                    received.fetch_add(r as u64, Ordering::Relaxed);
                    left -= r as u64;
                }
                s.write_all(b"K")?;
            }
            _ => return Ok(()),
        }
    }
}

const HTTP_LISTENER: Token = Token(0);
const ECHO_LISTENER: Token = Token(1);
const WAKE: Token = Token(2);
const FIRST_CONN: usize = 3;

#[derive(PartialEq)]
enum Kind {
    Http,
    Echo,
}

struct Conn {
    stream: TcpStream,
    kind: Kind,
    /// Bytes of an HTTP request not yet ended by an empty line.
    partial: Vec<u8>,
    /// Bytes waiting for the socket to accept them.
    out: Vec<u8>,
    close_after_write: bool,
}

fn event_loop(
    mut poll: Poll,
    mut http: TcpListener,
    mut echo: TcpListener,
    stop: &AtomicBool,
) -> io::Result<()> {
    poll.registry()
        .register(&mut http, HTTP_LISTENER, Interest::READABLE)?;
    poll.registry()
        .register(&mut echo, ECHO_LISTENER, Interest::READABLE)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match poll.poll(&mut events, Some(Duration::from_millis(200))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let (listener, kind) = match ev.token() {
                WAKE => continue,
                HTTP_LISTENER => (&http, Kind::Http),
                ECHO_LISTENER => (&echo, Kind::Echo),
                Token(t) => {
                    let idx = t - FIRST_CONN;
                    let done = match conns.get_mut(idx).and_then(Option::as_mut) {
                        Some(c) => !serve(c, &mut buf),
                        None => false,
                    };
                    if done {
                        if let Some(mut c) = conns[idx].take() {
                            let _ = poll.registry().deregister(&mut c.stream);
                        }
                        free.push(idx);
                    }
                    continue;
                }
            };
            loop {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let idx = free.pop().unwrap_or_else(|| {
                            conns.push(None);
                            conns.len() - 1
                        });
                        poll.registry().register(
                            &mut stream,
                            Token(idx + FIRST_CONN),
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                        let mut c = Conn {
                            stream,
                            kind: if kind == Kind::Http {
                                Kind::Http
                            } else {
                                Kind::Echo
                            },
                            partial: Vec::new(),
                            out: Vec::new(),
                            close_after_write: false,
                        };
                        // Data may have arrived with the handshake.
                        if serve(&mut c, &mut buf) {
                            conns[idx] = Some(c);
                        } else {
                            let _ = poll.registry().deregister(&mut c.stream);
                            free.push(idx);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
    }
    Ok(())
}

/// Reads what is there and answers. False when the connection is done.
fn serve(c: &mut Conn, buf: &mut [u8]) -> bool {
    if !flush(c) {
        return false;
    }
    loop {
        match c.stream.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                match c.kind {
                    Kind::Echo => c.out.extend_from_slice(&buf[..n]),
                    Kind::Http => answer_http(c, &buf[..n]),
                }
                if !flush(c) {
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

/// Appends one response per complete request in `data`.
fn answer_http(c: &mut Conn, data: &[u8]) {
    // The common case: no partial request pending, data is whole requests.
    let mut scan: &[u8] = data;
    let joined;
    if !c.partial.is_empty() {
        c.partial.extend_from_slice(data);
        joined = std::mem::take(&mut c.partial);
        scan = &joined;
    }
    let mut start = 0;
    while let Some(end) = find_end(&scan[start..]) {
        let request = &scan[start..start + end];
        if contains(request, b"Connection: close") {
            c.out.extend_from_slice(RESPONSE_CLOSE);
            c.close_after_write = true;
        } else {
            c.out.extend_from_slice(RESPONSE);
        }
        start += end;
    }
    if start < scan.len() {
        c.partial.extend_from_slice(&scan[start..]);
    }
}

/// Length up to and including the first `\r\n\r\n`.
fn find_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Writes pending output. False when the connection is done (error, or
/// everything written and a close was asked).
fn flush(c: &mut Conn) -> bool {
    while !c.out.is_empty() {
        match c.stream.write(&c.out) {
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    !c.close_after_write
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_backend_answers_pipelined_and_split_requests() {
        let b = Backends::start(&[]).unwrap();
        let mut s = std::net::TcpStream::connect(b.http).unwrap();
        s.write_all(REQUEST).unwrap();
        s.write_all(&REQUEST[..7]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.write_all(&REQUEST[7..]).unwrap();
        let mut got = vec![0u8; RESPONSE.len() * 2];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got[..RESPONSE.len()], RESPONSE);
        assert_eq!(&got[RESPONSE.len()..], RESPONSE);
        s.write_all(REQUEST_CLOSE).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, RESPONSE_CLOSE);
    }

    #[test]
    fn bulk_backend_streams_and_counts() {
        let b = Backends::start(&[]).unwrap();
        let mut s = std::net::TcpStream::connect(b.bulk).unwrap();
        s.write_all(&bulk_command(b'D', 100_000)).unwrap();
        let mut got = vec![0u8; 100_000];
        s.read_exact(&mut got).unwrap();
        s.write_all(&bulk_command(b'U', 5000)).unwrap();
        s.write_all(&[7u8; 5000]).unwrap();
        let mut k = [0u8; 1];
        s.read_exact(&mut k).unwrap();
        assert_eq!(&k, b"K");
        assert_eq!(b.bulk_received.load(Ordering::Relaxed), 5000);
    }

    #[test]
    fn a_paced_stream_is_never_ahead_of_its_rate() {
        let b = Backends::start(&[]).unwrap();
        let mut s = std::net::TcpStream::connect(b.bulk).unwrap();
        let started = std::time::Instant::now();
        s.write_all(&bulk_command(b'R', 1_000_000)).unwrap();
        // The third chunk is due two chunks' time (131 ms at 1 MB/s) after
        // the first; an unpaced stream would deliver all three at once.
        let mut got = vec![0u8; 3 * PACED_CHUNK];
        s.read_exact(&mut got).unwrap();
        assert!(started.elapsed() >= Duration::from_secs_f64(2.0 * PACED_CHUNK as f64 / 1e6));
        // The backend counts a chunk after its write returned, which may be
        // after the client read it: wait for the count (it failed once in CI
        // by reading it at once).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while b.bulk_sent.load(Ordering::Relaxed) < got.len() as u64
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(b.bulk_sent.load(Ordering::Relaxed) >= got.len() as u64);
    }
}
