//! A socket's readability from one io_uring POLL armed for the socket's
//! life (`IORING_POLL_ADD_MULTI`), for pumps that read from the task
//! (`rt::recv_ready`).
//!
//! Why multishot: a one-shot POLL is armed again for every read, and arming
//! is kernel work per keep-alive request (a submission, a `tcp_poll`, adding
//! and removing the wait-queue entry, compio's bookkeeping of one more
//! operation in flight), two per request through a proxy. Armed once, the
//! POLL stays on the socket's wait queue as an epoll registration does, and
//! each wake-up only posts a completion (README, "Keep-alive requests: one
//! POLL per connection").
//!
//! What it changes for the reader: a completion comes when the socket is
//! *woken*, not whenever it is readable, so the reader must not wait while
//! something is still there to read that no wake-up will announce:
//! - bytes left by a read that filled its buffer;
//! - the end of the stream (or an error) behind the bytes read: the peer's
//!   data and FIN often come with one wake-up, and the read takes only the
//!   data. A completion that reports `POLLRDHUP`, `POLLHUP` or `POLLERR`
//!   means reading on until the read returns 0 or the error.
//!
//! So the reader tells [`Readiness`] what each read got
//! ([`Readiness::note_read`]): after a full buffer or a hang-up the next
//! [`wait`](Readiness::wait) returns at once, until a read finds the socket
//! empty (`EAGAIN`).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use compio::buf::BufResult;
use compio::driver::{Extra, OpCode, OpEntry, SharedFd, ToSharedFd};
use compio::net::TcpStream;
use compio::runtime::SubmitMulti;
use futures_util::stream::FusedStream;
use futures_util::StreamExt;

/// Waits for one socket's readability; one per reading direction.
///
/// Dropping it cancels the POLL (compio's `SubmitMulti` does on drop).
#[derive(Default)]
pub struct Readiness {
    /// The armed POLL; `None` before the first wait and after the kernel
    /// ended it (a final completion without `IORING_CQE_F_MORE`).
    poll: Option<SubmitMulti<PollMulti>>,
    /// Something may be left to read that no wake-up will announce (a
    /// full buffer, a hang-up): waits return at once until a read finds
    /// the socket empty.
    again: bool,
    /// The peer has shut its side (a completion reported `POLLRDHUP` or
    /// `POLLHUP`): what the socket still holds is the last of the stream.
    ended: bool,
}

/// A completion's events that mean reading on to the end or the error.
const HANG_UP: u32 = (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32;

/// A completion's events that mean the peer will send nothing more.
const PEER_DONE: u32 = (libc::POLLRDHUP | libc::POLLHUP) as u32;

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// What a read after [`wait`](Self::wait) got: `None` when the socket
    /// was empty (`EAGAIN`), else the bytes read into a buffer with `room`
    /// bytes free.
    pub fn note_read(&mut self, got: Option<usize>, room: usize) {
        match got {
            None => self.again = false,
            Some(n) if n >= room => self.again = true,
            Some(_) => {}
        }
    }

    /// Whether the peer has shut its side of the stream: the bytes the next
    /// reads get are its last, and an end of stream follows them. A pump
    /// uses it to send those bytes corked (`MSG_MORE`), so that the
    /// half-close it makes next leaves with them in one segment.
    pub fn peer_done(&self) -> bool {
        self.ended
    }

    /// Waits until `socket` was woken readable since the last wait, or
    /// returns at once while something may be left to read (see
    /// [`note_read`](Self::note_read)). The socket may turn out to hold
    /// nothing (an earlier read took the bytes): the reader copes with
    /// `EAGAIN`. An error is the POLL's, not the socket's: the socket's own
    /// errors come from the read that follows.
    pub async fn wait(&mut self, socket: &TcpStream) -> io::Result<()> {
        if self.again {
            return Ok(());
        }
        loop {
            let poll = match &mut self.poll {
                Some(poll) => poll,
                none => none.insert(compio::runtime::submit_multi(PollMulti {
                    fd: socket.to_poll_fd()?.to_shared_fd(),
                    fired: None,
                })),
            };
            match poll.next().await {
                Some(BufResult(result, _)) => {
                    // Ended by the kernel (its last completion, e.g. when
                    // the completion queue overflowed): armed again on the
                    // next wait. Its result still tells of readiness.
                    if poll.is_terminated() {
                        self.poll = None;
                    }
                    let events = result? as u32;
                    self.again = events & HANG_UP != 0;
                    self.ended |= events & PEER_DONE != 0;
                    return Ok(());
                }
                None => self.poll = None,
            }
        }
    }
}

/// io_uring POLL_ADD for `POLLIN | POLLRDHUP` with
/// `IORING_POLL_ADD_MULTI`, an operation compio has no type for (its
/// `PollOnce` is one-shot).
struct PollMulti {
    /// Keeps the descriptor open while the POLL is in flight.
    fd: SharedFd<socket2::Socket>,
    /// The completions not yet taken, merged into one: their events OR-ed
    /// (a reader needs to know which events came, not how often), or the
    /// first error.
    fired: Option<BufResult<usize, Extra>>,
}

// SAFETY: the entry refers to no memory, only to the descriptor, which
// `fd` keeps open for as long as the operation is in flight.
unsafe impl OpCode for PollMulti {
    type Control = ();

    fn create_entry(&mut self, _: &mut ()) -> OpEntry {
        let fd = io_uring::types::Fd(self.fd.as_fd().as_raw_fd());
        io_uring::opcode::PollAdd::new(fd, (libc::POLLIN | libc::POLLRDHUP) as u32)
            .multi(true)
            .build()
            .into()
    }

    unsafe fn push_multishot(&mut self, _: &mut (), result: io::Result<usize>, extra: Extra) {
        self.fired = Some(match self.fired.take() {
            Some(BufResult(Ok(before), _)) => BufResult(result.map(|now| now | before), extra),
            Some(error) => error,
            None => BufResult(result, extra),
        });
    }

    fn pop_multishot(&mut self, _: &mut ()) -> Option<BufResult<usize, Extra>> {
        self.fired.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two completions before the reader looks: a hang-up reported by the
    /// first must not be lost to a later plain `POLLIN` (the peer's FIN and
    /// the data ahead of it can wake the socket twice).
    #[test]
    fn completions_merge_their_events() {
        let proactor = compio::driver::Proactor::new().expect("io_uring");
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let mut op = PollMulti {
            fd: SharedFd::new(socket),
            fired: None,
        };
        let pollin = libc::POLLIN as usize;
        let rdhup = libc::POLLRDHUP as usize;
        // SAFETY: no operation is in flight; the results are made up.
        unsafe {
            op.push_multishot(&mut (), Ok(pollin | rdhup), proactor.default_extra());
            op.push_multishot(&mut (), Ok(pollin), proactor.default_extra());
        }
        let BufResult(events, _) = op.pop_multishot(&mut ()).expect("one merged completion");
        assert_eq!(events.expect("no error"), pollin | rdhup);
        assert!(op.pop_multishot(&mut ()).is_none());

        // An error is kept over anything that follows it.
        unsafe {
            op.push_multishot(
                &mut (),
                Err(io::Error::from_raw_os_error(libc::ENOMEM)),
                proactor.default_extra(),
            );
            op.push_multishot(&mut (), Ok(pollin), proactor.default_extra());
        }
        let BufResult(events, _) = op.pop_multishot(&mut ()).expect("one merged completion");
        assert_eq!(
            events.expect_err("the error").raw_os_error(),
            Some(libc::ENOMEM)
        );
    }

    /// After a full buffer the reader reads again without waiting, until a
    /// read finds the socket empty; a short read changes nothing.
    #[test]
    fn a_full_buffer_means_reading_until_empty() {
        let mut readable = Readiness::new();
        readable.note_read(Some(100), 4096);
        assert!(!readable.again);
        readable.note_read(Some(4096), 4096);
        assert!(readable.again);
        readable.note_read(Some(10), 4096);
        assert!(readable.again, "a full read's leftovers may span reads");
        readable.note_read(None, 4096);
        assert!(!readable.again);
    }
}

/// What the kernel's multishot POLL reports, on real loopback sockets: the
/// state the socket was in when the POLL was armed, and an end of stream
/// that came after the bytes were read.
#[cfg(test)]
mod kernel_tests {
    use super::*;
    use std::io::Write;

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let theirs = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        (ours, theirs)
    }

    /// Reads `ours` to its end, calling `after_read` after each read
    /// that got bytes.
    async fn read_all(
        ours: &TcpStream,
        ready: &mut Readiness,
        mut after_read: impl FnMut(),
    ) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            ready.wait(ours).await.unwrap();
            let mut buf = Vec::with_capacity(4);
            let n = crate::rt::recv_now(ours, &mut buf).unwrap();
            ready.note_read(n, buf.capacity());
            match n {
                Some(0) => return got,
                Some(_) => {
                    got.extend_from_slice(&buf);
                    after_read();
                }
                None => {}
            }
        }
    }

    /// Runs `read_all` on a shard's runtime; `None` if it hung.
    fn read_all_within(ours: std::net::TcpStream, after_read: impl FnMut()) -> Option<Vec<u8>> {
        let runtime = crate::rt::build_runtime(4, 4096).unwrap();
        runtime.block_on(async move {
            let ours = TcpStream::from_std(ours).unwrap();
            let mut ready = Readiness::new();
            let reading = read_all(&ours, &mut ready, after_read);
            compio::time::timeout(std::time::Duration::from_secs(5), reading)
                .await
                .ok()
        })
    }

    /// Loopback delivers a write before it returns: bytes and end are both
    /// queued when the POLL is armed, and no wake-up comes after.
    #[test]
    fn bytes_and_end_queued_before_the_first_wait_are_seen() {
        let (ours, mut theirs) = pair();
        theirs.write_all(b"hi").unwrap();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        let got = read_all_within(ours, || {});
        assert_eq!(got.expect("no hang"), b"hi");
    }

    #[test]
    fn end_arriving_after_the_bytes_were_read_is_seen() {
        let (ours, mut theirs) = pair();
        let (read, was_read) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            theirs.write_all(b"hi").unwrap();
            // The FIN only once the bytes were read.
            was_read.recv().unwrap();
            theirs.shutdown(std::net::Shutdown::Write).unwrap();
            theirs
        });
        let got = read_all_within(ours, || {
            let _ = read.send(());
        });
        let _theirs = writer.join().unwrap();
        assert_eq!(got.expect("no hang"), b"hi");
    }
}
