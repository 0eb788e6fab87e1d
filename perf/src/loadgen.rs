//! The load generator: request/response sessions over many connections, on
//! one thread with one event loop (mio, edge-triggered), closed-loop or
//! open-loop.
//!
//! * **Closed loop**: every connection sends its next request as soon as the
//!   previous response is complete: the maximum throughput figure. Latency is
//!   measured from the moment the request is sent.
//! * **Open loop** (the wrk2 idea): requests are *scheduled* at a constant
//!   rate, spread round-robin over the connections, whether or not earlier
//!   ones were answered. A request whose connection is still busy waits, and
//!   its latency is measured from its *scheduled* time, so a stall shows up
//!   in the percentiles instead of silently slowing the load (no coordinated
//!   omission). The schedule is kept with a `timerfd` (microsecond precision,
//!   not the millisecond of an epoll timeout).
//! * **Connection per request**: each session connects, sends a
//!   `Connection: close` request, reads the whole response and waits for the
//!   server's close; only then is the slot free again.
//!
//! The measurement window is driven from outside ([`Window`]): the caller
//! flips `recording` on after a warm-up and `stop` at the end, and snapshots
//! its other counters (proxy CPU) at the same moments.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};

/// A latency histogram in nanoseconds (1 ns .. 100 s, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

/// Shared flags between the caller and a running load.
#[derive(Default)]
pub struct Window {
    pub recording: AtomicBool,
    pub stop: AtomicBool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    Closed,
    /// Requests per second, over all connections.
    Open(f64),
}

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// Concurrent connections (sessions in flight at most).
    pub connections: usize,
    pub pace: Pace,
    /// False: a new connection per request (`Connection: close`).
    pub keepalive: bool,
    /// Client source addresses, used round-robin (spreads connections over a
    /// proxy's shards when those are steered by client address). Empty: the
    /// kernel's choice.
    pub sources: Vec<IpAddr>,
}

#[derive(Debug)]
pub struct LoadResult {
    /// Sessions completed while recording.
    pub completed: u64,
    /// Connection errors (reset, refused, early close) while recording.
    pub errors: u64,
    pub latency: Histogram<u64>,
    /// `epoll_wait` calls that returned connection events, and those events,
    /// while recording: how the target's replies reach the generator
    /// (many per wake-up, or one each).
    pub wakeups: u64,
    pub events: u64,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum State {
    /// No request in flight.
    Idle,
    Connecting,
    Writing,
    Reading,
    /// The whole response arrived; waiting for the server's close.
    Closing,
}

struct Slot {
    stream: Option<TcpStream>,
    state: State,
    sent: usize,
    received: usize,
    /// When the current request was due (open loop) or sent (closed loop).
    started: Instant,
    /// Open loop: scheduled times of requests waiting for this connection.
    queue: VecDeque<Instant>,
    /// A request waits for the connect in progress (false: connected ahead
    /// of time, during the warm-up).
    request_waiting: bool,
    source: Option<IpAddr>,
}

const TIMER: Token = Token(usize::MAX - 1);

/// Runs `spec` until `window.stop`; records while `window.recording`.
pub fn run(spec: &LoadSpec, window: &Window) -> io::Result<LoadResult> {
    let request: &[u8] = if spec.keepalive {
        crate::backends::REQUEST
    } else {
        crate::backends::REQUEST_CLOSE
    };
    let response_len = if spec.keepalive {
        crate::backends::RESPONSE.len()
    } else {
        crate::backends::RESPONSE_CLOSE.len()
    };
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4096);
    let timer = timerfd()?;
    poll.registry()
        .register(&mut SourceFd(&timer.as_raw_fd()), TIMER, Interest::READABLE)?;
    let now = Instant::now();
    let mut slots: Vec<Slot> = (0..spec.connections.max(1))
        .map(|i| Slot {
            stream: None,
            state: State::Idle,
            sent: 0,
            received: 0,
            started: now,
            queue: VecDeque::new(),
            request_waiting: false,
            source: (!spec.sources.is_empty()).then(|| spec.sources[i % spec.sources.len()]),
        })
        .collect();
    let mut result = LoadResult {
        completed: 0,
        errors: 0,
        latency: new_histogram(),
        wakeups: 0,
        events: 0,
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut ctx = Ctx {
        poll: &mut poll,
        spec,
        request,
        response_len,
        recording: false,
    };

    // Open loop: request k is due at t0 + k / rate, on connection k mod n.
    let interval = match spec.pace {
        Pace::Open(rate) => Some(Duration::from_secs_f64(1.0 / rate.max(1e-3))),
        Pace::Closed => None,
    };
    let t0 = Instant::now();
    let mut next_k: u64 = 0;
    // The deadline the timer is armed for, so that it is set only when it
    // changes (a `timerfd_settime` per wake-up was a syscall per request).
    let mut armed: Option<Instant> = None;
    if interval.is_none() {
        for (i, slot) in slots.iter_mut().enumerate() {
            ctx.begin(slot, i, Instant::now(), &mut result);
        }
    } else if spec.keepalive {
        // Connect every slot now, in the warm-up, so that no scheduled
        // request waits for a handshake.
        for (i, slot) in slots.iter_mut().enumerate() {
            ctx.connect_only(slot, i, &mut result);
        }
    }
    while !window.stop.load(Ordering::Relaxed) {
        ctx.recording = window.recording.load(Ordering::Relaxed);
        if let Some(interval) = interval {
            let now = Instant::now();
            loop {
                let due = t0 + interval.mul_f64(next_k as f64);
                if due > now {
                    break;
                }
                let i = (next_k % slots.len() as u64) as usize;
                next_k += 1;
                let slot = &mut slots[i];
                if slot.state == State::Idle {
                    ctx.begin(slot, i, due, &mut result);
                } else {
                    slot.queue.push_back(due);
                }
            }
            // Wake up for the next request that can start when due: the
            // first one whose connection is idle. One whose connection is
            // busy waits in its queue whatever the timer does, and is queued
            // (with its scheduled time, from which its latency counts) at
            // the next wake-up of any kind. Past a target's capacity every
            // connection is busy and the generator wakes only for replies:
            // a timer every 1/rate seconds cost it ~3 syscalls per request
            // and saturated its core (with the backends on it) before the
            // capped proxy, in (o).
            let next_startable = next_startable(next_k, slots.iter().map(|s| s.state))
                .map(|k| t0 + interval.mul_f64(k as f64));
            if next_startable != armed {
                arm(
                    &timer,
                    next_startable.map(|due| due.saturating_duration_since(now)),
                );
                armed = next_startable;
            }
        }
        match ctx.poll.poll(&mut events, Some(Duration::from_millis(10))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let connection_events = events.iter().filter(|ev| ev.token() != TIMER).count() as u64;
        if ctx.recording && connection_events > 0 {
            result.wakeups += 1;
            result.events += connection_events;
        }
        for ev in events.iter() {
            if ev.token() == TIMER {
                let mut b = [0u8; 8];
                // SAFETY: reading 8 bytes into a local buffer from our timerfd.
                unsafe { libc::read(timer.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
                armed = None;
                continue;
            }
            let i = ev.token().0;
            ctx.drive(&mut slots[i], i, &mut buf, &mut result, interval.is_none());
        }
    }
    Ok(result)
}

/// The first request from `next_k` on that can start when due (request `k`
/// goes to connection `k mod n`): the first whose connection is idle, or
/// `None` while every connection is busy.
fn next_startable(next_k: u64, states: impl ExactSizeIterator<Item = State>) -> Option<u64> {
    let n = states.len() as u64;
    states
        .enumerate()
        .filter(|(_, state)| *state == State::Idle)
        .map(|(i, _)| next_k + (i as u64 + n - next_k % n) % n)
        .min()
}

struct Ctx<'a> {
    poll: &'a mut Poll,
    spec: &'a LoadSpec,
    request: &'a [u8],
    response_len: usize,
    recording: bool,
}

impl Ctx<'_> {
    /// Opens `slot`'s connection without sending anything.
    fn connect_only(&mut self, slot: &mut Slot, i: usize, result: &mut LoadResult) {
        self.begin(slot, i, Instant::now(), result);
        slot.request_waiting = false;
    }

    /// Starts a request on `slot`, due at `due` (latency counts from there).
    fn begin(&mut self, slot: &mut Slot, i: usize, due: Instant, result: &mut LoadResult) {
        slot.started = due;
        slot.sent = 0;
        slot.received = 0;
        slot.request_waiting = true;
        if slot.stream.is_none() {
            match connect(self.spec.target, slot.source) {
                Ok(mut s) => {
                    if self
                        .poll
                        .registry()
                        .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        self.fail(slot, result);
                        return;
                    }
                    slot.stream = Some(s);
                    slot.state = State::Connecting;
                    return;
                }
                Err(_) => {
                    self.fail(slot, result);
                    return;
                }
            }
        }
        slot.state = State::Writing;
        self.write(slot, result);
    }

    fn fail(&mut self, slot: &mut Slot, result: &mut LoadResult) {
        if self.recording {
            result.errors += 1;
        }
        if let Some(mut s) = slot.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        slot.state = State::Idle;
        // The request is lost; a closed loop restarts on the next drive.
    }

    fn write(&mut self, slot: &mut Slot, result: &mut LoadResult) {
        let Some(s) = slot.stream.as_mut() else {
            return;
        };
        while slot.sent < self.request.len() {
            match s.write(&self.request[slot.sent..]) {
                Ok(n) => slot.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.fail(slot, result);
                    return;
                }
            }
        }
        slot.state = State::Reading;
    }

    /// Handles readiness on slot `i`.
    fn drive(
        &mut self,
        slot: &mut Slot,
        i: usize,
        buf: &mut [u8],
        result: &mut LoadResult,
        closed_loop: bool,
    ) {
        if slot.state == State::Connecting {
            let Some(s) = slot.stream.as_ref() else {
                return;
            };
            match s.take_error() {
                Ok(None) if s.peer_addr().is_ok() => {
                    if !slot.request_waiting {
                        slot.state = State::Idle;
                        self.restart(slot, i, result, closed_loop);
                        return;
                    }
                    slot.state = State::Writing;
                }
                // Still in progress: a spurious wake-up.
                Ok(None) => return,
                Ok(Some(_)) | Err(_) => {
                    self.fail(slot, result);
                    self.restart(slot, i, result, closed_loop);
                    return;
                }
            }
        }
        if slot.state == State::Writing {
            self.write(slot, result);
        }
        loop {
            if !matches!(slot.state, State::Reading | State::Closing) {
                break;
            }
            let Some(s) = slot.stream.as_mut() else {
                break;
            };
            match s.read(buf) {
                Ok(0) => {
                    if slot.state == State::Closing {
                        if let Some(mut s) = slot.stream.take() {
                            let _ = self.poll.registry().deregister(&mut s);
                        }
                        slot.state = State::Idle;
                        self.restart(slot, i, result, closed_loop);
                    } else {
                        self.fail(slot, result);
                        self.restart(slot, i, result, closed_loop);
                    }
                    return;
                }
                Ok(n) => {
                    slot.received += n;
                    if slot.received >= self.response_len && slot.state == State::Reading {
                        if self.recording {
                            let ns = slot.started.elapsed().as_nanos() as u64;
                            let _ = result.latency.record(ns.max(1));
                            result.completed += 1;
                        }
                        if self.spec.keepalive {
                            slot.state = State::Idle;
                            self.restart(slot, i, result, closed_loop);
                            if slot.state != State::Reading {
                                return;
                            }
                        } else {
                            slot.state = State::Closing;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.fail(slot, result);
                    self.restart(slot, i, result, closed_loop);
                    return;
                }
            }
        }
    }

    /// The slot is free: start the next request, if one is due.
    fn restart(&mut self, slot: &mut Slot, i: usize, result: &mut LoadResult, closed_loop: bool) {
        if closed_loop {
            self.begin(slot, i, Instant::now(), result);
        } else if let Some(due) = slot.queue.pop_front() {
            self.begin(slot, i, due, result);
        }
    }
}

/// A non-blocking connect from `source` (port chosen at connect time, so the
/// kernel can reuse ports across destinations).
pub fn connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        set_bind_no_port(&socket);
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// A blocking connect from `source`.
pub fn connect_blocking(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<std::net::TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        set_bind_no_port(&socket);
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.connect_timeout(&target.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

fn set_bind_no_port(socket: &Socket) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and an int option value.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn timerfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Fires the timer once, `after` from now; `None` disarms it.
fn arm(timer: &OwnedFd, after: Option<Duration>) {
    // A zero `it_value` disarms a timerfd, so a due time already past fires
    // in a microsecond instead.
    let after = after.map_or(Duration::ZERO, |after| {
        after.max(Duration::from_nanos(1000))
    });
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: after.as_secs() as libc::time_t,
            tv_nsec: after.subsec_nanos() as libc::c_long,
        },
    };
    // SAFETY: valid fd and itimerspec.
    unsafe { libc::timerfd_settime(timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
}

/// Runs a load on its own thread (pinned to `cpus`) for `warmup` then
/// `duration`, calling `at_start` and `at_end` right when recording starts
/// and stops. Returns the result and the measured window.
pub fn run_window<S, E>(
    spec: LoadSpec,
    cpus: &[usize],
    warmup: Duration,
    duration: Duration,
    at_start: S,
    at_end: E,
) -> io::Result<(LoadResult, Duration)>
where
    S: FnOnce(),
    E: FnOnce(),
{
    let window = Arc::new(Window::default());
    let thread = {
        let window = Arc::clone(&window);
        let cpus = cpus.to_vec();
        std::thread::Builder::new()
            .name("perf-load".into())
            .spawn(move || {
                let _ = crate::procfs::pin_current_thread(&cpus);
                run(&spec, &window)
            })?
    };
    std::thread::sleep(warmup);
    at_start();
    let started = Instant::now();
    window.recording.store(true, Ordering::Relaxed);
    std::thread::sleep(duration);
    window.recording.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    at_end();
    window.stop.store(true, Ordering::Relaxed);
    let result = thread
        .join()
        .map_err(|_| io::Error::other("load thread panicked"))??;
    Ok((result, elapsed))
}

/// Loopback source addresses `127.0.0.1 ..= 127.0.0.n`.
pub fn loopback_sources(n: usize) -> Vec<IpAddr> {
    (1..=n.clamp(1, 254))
        .map(|i| IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i as u8)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::Backends;

    fn spec(target: SocketAddr, pace: Pace, keepalive: bool) -> LoadSpec {
        LoadSpec {
            target,
            connections: 4,
            pace,
            keepalive,
            sources: loopback_sources(2),
        }
    }

    #[test]
    fn closed_loop_keepalive_completes_requests() {
        let b = Backends::start(&[]).unwrap();
        let (r, _) = run_window(
            spec(b.http, Pace::Closed, true),
            &[],
            Duration::from_millis(50),
            Duration::from_millis(200),
            || {},
            || {},
        )
        .unwrap();
        assert!(r.completed > 100, "{r:?}");
        assert_eq!(r.errors, 0);
    }

    #[test]
    fn the_timer_waits_only_for_a_request_an_idle_connection_can_start() {
        use State::{Idle, Reading};
        // Requests 7, 8, 9, 10 go to connections 3, 0, 1, 2.
        assert_eq!(
            next_startable(7, [Reading, Reading, Idle, Reading].into_iter()),
            Some(10)
        );
        assert_eq!(
            next_startable(7, [Reading, Reading, Reading, Idle].into_iter()),
            Some(7)
        );
        assert_eq!(
            next_startable(7, [Idle, Reading, Idle, Reading].into_iter()),
            Some(8)
        );
        // Past capacity every connection is busy: no timer at all.
        assert_eq!(next_startable(7, [Reading; 4].into_iter()), None);
        assert_eq!(next_startable(0, std::iter::empty()), None);
    }

    #[test]
    fn open_loop_holds_the_rate() {
        let b = Backends::start(&[]).unwrap();
        let (r, elapsed) = run_window(
            spec(b.http, Pace::Open(2000.0), true),
            &[],
            Duration::from_millis(50),
            Duration::from_millis(500),
            || {},
            || {},
        )
        .unwrap();
        let rate = r.completed as f64 / elapsed.as_secs_f64();
        assert!((1600.0..2400.0).contains(&rate), "rate {rate}");
    }

    #[test]
    fn connection_per_request_completes_sessions() {
        let b = Backends::start(&[]).unwrap();
        let (r, _) = run_window(
            spec(b.http, Pace::Closed, false),
            &[],
            Duration::from_millis(50),
            Duration::from_millis(200),
            || {},
            || {},
        )
        .unwrap();
        assert!(r.completed > 20, "{r:?}");
        assert_eq!(r.errors, 0);
    }
}
