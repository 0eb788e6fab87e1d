//! The `minimal` baseline proxy over real sockets: it must end a connection
//! the way edgeproxy does, or the suite's later scenarios run beside
//! connections it left open.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the proxy from a free port to `backend` and waits for its
/// "listening" line.
fn start(backend: SocketAddr) -> (Proxy, SocketAddr) {
    let front = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_minimal-proxy"))
        .args(["--workers", "1", &format!("{front}={backend}")])
        .stderr(Stdio::piped())
        .spawn()
        .expect("minimal-proxy starts");
    let mut stderr = child.stderr.take().unwrap();
    let proxy = Proxy(child);
    let mut said = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&said).contains("minimal-proxy listening") {
        match stderr.read(&mut byte) {
            Ok(1) => said.push(byte[0]),
            _ => panic!(
                "minimal-proxy ended before listening: {}",
                String::from_utf8_lossy(&said)
            ),
        }
    }
    (proxy, front)
}

/// A client that resets its connection while no request is in flight: the
/// proxy must close the backend connection too. It waited for the backend
/// to end the other direction, which an idle keep-alive backend never does.
#[test]
fn a_client_reset_closes_the_idle_backend_connection() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let (_proxy, front) = start(backend.local_addr().unwrap());

    let mut client = TcpStream::connect(front).unwrap();
    let (mut upstream, _) = backend.accept().unwrap();
    // One exchange, so the connection is up end to end.
    client.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    upstream.read_exact(&mut got).unwrap();
    upstream.write_all(b"pong").unwrap();
    client.read_exact(&mut got).unwrap();

    // Closed with SO_LINGER 0: an RST, no FIN.
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);

    // The backend connection ends (EOF or reset). The timeout only bounds a
    // failure; the proxy closes it at once.
    upstream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    match upstream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("the backend got {n} unexpected bytes"),
        Err(e) => panic!("the backend connection is still open after the client's reset: {e}"),
    }
}
