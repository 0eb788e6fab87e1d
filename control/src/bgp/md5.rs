//! TCP MD5 signatures (RFC 2385) for BGP sessions: the key type, kept out
//! of every output, and the one socket option that puts it to work.
//!
//! Call order: [`set_key`] on the socket *before* `connect()`: the SYN is
//! the first segment to carry a signature, and a peer that requires one
//! drops an unsigned SYN without a word (no RST, no ICMP), so a missing or
//! wrong password shows here only as a connect that times out. The key
//! lives on the socket, so a session handed to a binary upgrade's successor
//! keeps signing with the key it was opened with.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

/// The longest key Linux takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MAX_KEY_LEN: usize = 80;

/// A neighbor's TCP MD5 password. Its `Debug` does not show it, and it is
/// never serialized: logs, `check-config`, status and the API cannot print
/// it.
#[derive(Clone, PartialEq, Eq)]
pub struct Md5Key(Vec<u8>);

impl Md5Key {
    /// Checks the length: 1..=[`MAX_KEY_LEN`] bytes, taken as they are
    /// (spaces included: routers compare bytes).
    pub fn new(key: &[u8]) -> Result<Md5Key, String> {
        if key.is_empty() {
            return Err("must not be empty (leave it out for no TCP MD5)".into());
        }
        if key.len() > MAX_KEY_LEN {
            return Err(format!(
                "is {} bytes; Linux takes at most {MAX_KEY_LEN} (TCP_MD5SIG_MAXKEYLEN)",
                key.len()
            ));
        }
        Ok(Md5Key(key.to_vec()))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Md5Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Md5Key(<redacted>)")
    }
}

/// Reads a password file: its bytes, without one final line ending (what
/// `echo secret > file` adds); anything else, spaces too, is the password.
pub fn read_key_file(path: &std::path::Path) -> Result<Md5Key, String> {
    let shown = path.display();
    let mut bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    Md5Key::new(&bytes).map_err(|reason| format!("the password in {shown} {reason}"))
}

/// Linux's `struct tcp_md5sig` (include/uapi/linux/tcp.h). `libc` has the
/// option's number but not the struct. Flags 0: the key is for exactly
/// `addr`, on any interface.
#[repr(C)]
struct TcpMd5Sig {
    tcpm_addr: libc::sockaddr_storage,
    tcpm_flags: u8,
    tcpm_prefixlen: u8,
    tcpm_keylen: u16,
    tcpm_ifindex: libc::c_int,
    tcpm_key: [u8; MAX_KEY_LEN],
}

/// Signs every segment `socket` exchanges with `peer` with `key` (a
/// listening socket: every connection it accepts from `peer`). For an
/// outbound session, call before `connect()`.
pub fn set_key(socket: &impl AsRawFd, peer: IpAddr, key: &Md5Key) -> std::io::Result<()> {
    let addr = socket2::SockAddr::from(SocketAddr::new(peer, 0));
    // SAFETY: all-zero bytes are a valid `TcpMd5Sig` (integers and byte
    // arrays only).
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    // SAFETY: `addr` holds `addr.len()` initialized bytes of a sockaddr
    // (a `sockaddr_in` or `sockaddr_in6`), which is at most
    // `size_of::<sockaddr_storage>()`, the destination's size; the two do
    // not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.as_ptr().cast::<u8>(),
            std::ptr::addr_of_mut!(sig.tcpm_addr).cast::<u8>(),
            addr.len() as usize,
        );
    }
    let key = key.expose();
    sig.tcpm_keylen = key.len() as u16; // at most MAX_KEY_LEN, checked in `Md5Key::new`
    sig.tcpm_key[..key.len()].copy_from_slice(key);
    // SAFETY: `sig` is a live, initialized `struct tcp_md5sig` and the
    // length passed is its size; the kernel only reads it. An invalid
    // descriptor is an error return, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            std::ptr::addr_of!(sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        Err(std::io::Error::new(
            e.kind(),
            format!("cannot set the TCP MD5 key (RFC 2385) for {peer}: {e}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};
    use std::time::Duration;

    fn key(text: &str) -> Md5Key {
        Md5Key::new(text.as_bytes()).unwrap()
    }

    #[test]
    fn the_password_never_shows_in_debug() {
        let k = key("s3cret-md5");
        let shown = format!("{k:?} {k:#?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn empty_and_too_long_passwords_are_refused() {
        assert!(Md5Key::new(b"").unwrap_err().contains("empty"));
        assert!(Md5Key::new(&[b'x'; 81]).unwrap_err().contains("at most 80"));
        assert_eq!(Md5Key::new(&[b'x'; 80]).unwrap().expose().len(), 80);
    }

    #[test]
    fn a_password_file_loses_its_final_newline_only() {
        let dir = std::env::temp_dir().join(format!("md5-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pw");
        std::fs::write(&path, " two words \r\n").unwrap();
        assert_eq!(read_key_file(&path).unwrap().expose(), b" two words ");
        std::fs::write(&path, "\n").unwrap();
        let err = read_key_file(&path).unwrap_err();
        assert!(err.contains("empty") && err.contains("pw"), "{err}");
        let err = read_key_file(&dir.join("missing")).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A connection with the key set on both ends comes up; one without it
    /// never does: the listener's kernel drops the unsigned SYN.
    #[test]
    fn only_a_signed_connect_reaches_a_listener_that_requires_the_key() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        if let Err(e) = set_key(&listener, Ipv4Addr::LOCALHOST.into(), &key("pw")) {
            // A kernel without CONFIG_TCP_MD5SIG: nothing to test here.
            eprintln!("skipped: {e}");
            return;
        }
        let addr = listener.local_addr().unwrap();
        let connect = |with: Option<&str>| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            if let Some(k) = with {
                set_key(&s, Ipv4Addr::LOCALHOST.into(), &key(k)).unwrap();
            }
            s.connect_timeout(&addr.into(), Duration::from_millis(1500))
        };
        connect(Some("pw")).expect("signed connect");
        assert!(connect(None).is_err(), "unsigned connect got through");
        assert!(connect(Some("wrong")).is_err(), "wrong key got through");
    }

    #[test]
    fn the_key_goes_on_ipv6_sockets_too() {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None);
        let Ok(s) = s else { return };
        match set_key(&s, "fd00::1".parse().unwrap(), &key("pw")) {
            Ok(()) => {}
            Err(e) => assert!(
                e.raw_os_error() == Some(libc::ENOPROTOOPT),
                "unexpected: {e}"
            ),
        }
    }
}
