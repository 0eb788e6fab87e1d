//! The hand-off channel: a `SOCK_SEQPACKET` Unix socket pair between an old
//! process and its successor. One datagram is one message, and the
//! descriptors sent with it (`SCM_RIGHTS`) arrive with exactly that message,
//! so nothing has to be reassembled. Blocking calls with a deadline: the
//! hand-off runs on a thread of its own, never on the control loop.
//!
//! Descriptor passing uses `rustix` (already in the tree through compio):
//! its `sendmsg`/`recvmsg` wrap the control-message buffer arithmetic
//! (`CMSG_SPACE`, alignment, truncation) that is easy to get wrong by hand
//! with `libc`, and std's own ancillary-data API is still unstable.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use super::wire::{MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES};

/// One end of the hand-off channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// A message as it arrived: its bytes and the descriptors sent with it (or
/// `None` at end of stream: the other side closed its end).
pub type Received = Option<(Vec<u8>, Vec<OwnedFd>)>;

impl Channel {
    /// A connected pair, both ends close-on-exec (the caller clears the flag
    /// on the end a successor inherits, in the successor only).
    pub fn pair() -> std::io::Result<(Channel, Channel)> {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Adopts an inherited descriptor, checking that it is a seqpacket Unix
    /// socket (a wrong number in the environment must not be mistaken for
    /// one), and marks it close-on-exec so this process's own successor
    /// does not inherit it.
    pub fn adopt(fd: OwnedFd) -> std::io::Result<Channel> {
        let kind = rustix::net::sockopt::socket_type(&fd)
            .map_err(|e| std::io::Error::other(format!("not a socket: {e}")))?;
        if kind != SocketType::SEQPACKET {
            return Err(std::io::Error::other("not a seqpacket socket"));
        }
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
        Ok(Channel { fd })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends one message with `fds` (at most [`MAX_FDS_PER_MESSAGE`]).
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        assert!(fds.len() <= MAX_FDS_PER_MESSAGE, "too many descriptors");
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(std::io::Error::other("control buffer too small"));
        }
        let sent = rustix::net::sendmsg(
            &self.fd,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        if sent != bytes.len() {
            return Err(std::io::Error::other("message cut short"));
        }
        Ok(())
    }

    /// Waits up to `timeout` for one message. A message longer than
    /// [`MAX_MESSAGE_BYTES`], or whose descriptors did not all fit, is an
    /// error (its descriptors are closed).
    pub fn recv(&self, timeout: Duration) -> std::io::Result<Received> {
        rustix::net::sockopt::set_socket_timeout(
            &self.fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(timeout.max(Duration::from_millis(1))),
        )?;
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
        let mut space =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = match rustix::net::recvmsg(
            &self.fd,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(got) => got,
            Err(e) if e == rustix::io::Errno::AGAIN => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nothing received within {timeout:?}"),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = msg {
                fds.extend(received);
            }
        }
        if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(std::io::Error::other("descriptors were cut off"));
        }
        if got.flags.contains(rustix::net::ReturnFlags::TRUNC) || got.bytes > MAX_MESSAGE_BYTES {
            return Err(std::io::Error::other("message too large"));
        }
        if got.bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        buf.truncate(got.bytes);
        Ok(Some((buf, fds)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn descriptors_arrive_with_their_message_and_refer_to_the_same_socket() {
        let (a, b) = Channel::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        a.send(b"one", &[listener.as_fd()]).unwrap();
        a.send(b"two", &[]).unwrap();
        let (bytes, fds) = b.recv(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(bytes, b"one");
        assert_eq!(fds.len(), 1);
        assert_ne!(fds[0].as_raw_fd(), listener.as_raw_fd());
        let received = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
        // The same socket: a connection queued on it is accepted through
        // the received descriptor.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        received.accept().unwrap();
        let (bytes, fds) = b.recv(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!((bytes.as_slice(), fds.len()), (&b"two"[..], 0));
    }

    #[test]
    fn a_closed_peer_is_end_of_stream_and_silence_times_out() {
        let (a, b) = Channel::pair().unwrap();
        let err = b.recv(Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        drop(a);
        assert!(b.recv(Duration::from_secs(5)).unwrap().is_none());
    }

    #[test]
    fn adopt_refuses_what_is_not_a_seqpacket_socket() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(Channel::adopt(file.into()).is_err());
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(Channel::adopt(udp.into()).is_err());
        let (a, _b) = Channel::pair().unwrap();
        Channel::adopt(a.into_fd()).unwrap();
    }

    #[test]
    fn the_most_descriptors_one_message_may_carry_pass() {
        let (a, b) = Channel::pair().unwrap();
        let sockets: Vec<std::net::UdpSocket> = (0..MAX_FDS_PER_MESSAGE)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.as_fd()).collect();
        a.send(b"many", &fds).unwrap();
        let (_, got) = b.recv(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(got.len(), MAX_FDS_PER_MESSAGE);
    }
}
