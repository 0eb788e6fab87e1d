//! Looking at a pooled socket without touching its bytes: one non-blocking
//! `poll(2)` says whether the backend closed it, left it quiet, or sent
//! something nobody asked for; `TCP_INFO` says how many of our bytes the
//! backend's TCP acknowledged (how a hand-over knows whether the backend
//! ever received the client's first bytes).

use std::os::fd::RawFd;

/// What a pooled socket looks like right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Open, nothing to read: usable.
    Quiet,
    /// The backend closed or reset it (or the socket is in error).
    Closed,
    /// Bytes are waiting that no client asked for: the backend speaks first.
    Spoke,
}

/// Checks `fd` (never blocks, reads nothing: a greeting stays in the socket).
pub fn health(fd: RawFd) -> Health {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, timeout 0 (no wait).
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    if rc < 0 {
        return Health::Closed;
    }
    if rc == 0 {
        return Health::Quiet;
    }
    // A close (FIN or RST) wins over bytes waiting before it: the socket
    // cannot carry a client's request any more.
    if p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        Health::Closed
    } else if p.revents & libc::POLLIN != 0 {
        Health::Spoke
    } else {
        Health::Quiet
    }
}

/// Bytes of ours the peer's TCP acknowledged so far (`tcpi_bytes_acked`),
/// or `None` when the kernel does not say.
pub fn bytes_acked(fd: RawFd) -> Option<u64> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        let end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
        (rc == 0 && len as usize >= end).then_some(info.tcpi_bytes_acked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn quiet_then_spoke_then_closed_and_the_greeting_stays_unread() {
        let (ours, mut theirs) = pair();
        assert_eq!(health(ours.as_raw_fd()), Health::Quiet);
        theirs.write_all(b"220 hello\r\n").unwrap();
        assert!(eventually(|| health(ours.as_raw_fd()) == Health::Spoke));
        // Looking did not consume: the greeting is still there for a client.
        let mut buf = [0u8; 16];
        let n = ours.peek(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"220 hello\r\n");
        drop(theirs);
        assert!(eventually(|| health(ours.as_raw_fd()) == Health::Closed));
    }

    #[test]
    fn bytes_acked_grows_only_once_the_peer_received_ours() {
        let (mut ours, theirs) = pair();
        let before = bytes_acked(ours.as_raw_fd()).expect("kernel reports tcpi_bytes_acked");
        ours.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(eventually(
            || bytes_acked(ours.as_raw_fd()).unwrap() >= before + 18
        ));
        drop(theirs);
    }

    #[test]
    fn bytes_sent_to_a_closed_peer_are_never_acknowledged() {
        let (mut ours, theirs) = pair();
        drop(theirs);
        assert!(eventually(|| health(ours.as_raw_fd()) == Health::Closed));
        let before = bytes_acked(ours.as_raw_fd()).unwrap();
        let _ = ours.write_all(b"GET / HTTP/1.1\r\n\r\n");
        // The peer's answer is a reset (the socket's error is set then), and
        // nothing of ours was acknowledged.
        assert!(eventually(|| ours.take_error().ok().flatten().is_some()));
        assert_eq!(bytes_acked(ours.as_raw_fd()).unwrap(), before);
    }
}
