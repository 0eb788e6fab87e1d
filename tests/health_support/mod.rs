//! Backends and probes for the health tests (`tests/health*.rs`): an HTTP
//! backend whose health answer can be changed and which can be stopped and
//! started again on its port, a SYN-dropping backend, and small readers of
//! the proxy's metrics.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

/// An HTTP/1.1 backend on loopback. `GET /health` answers the status in
/// `health_status` (or alternates 500/200 with `flap`); any other request
/// is a client through the proxy and gets `200 <name>`. Requests are counted
/// apart, so a test can tell checks from clients.
pub struct HttpBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub health_status: Arc<AtomicU16>,
    pub flap: Arc<AtomicBool>,
    pub health_requests: Arc<AtomicUsize>,
    pub client_requests: Arc<AtomicUsize>,
    listener: Option<Arc<TcpListener>>,
}

impl HttpBackend {
    pub fn start(name: &str) -> HttpBackend {
        let mut b = HttpBackend {
            name: name.into(),
            addr: "127.0.0.1:0".parse().unwrap(),
            health_status: Arc::new(AtomicU16::new(200)),
            flap: Arc::new(AtomicBool::new(false)),
            health_requests: Arc::default(),
            client_requests: Arc::default(),
            listener: None,
        };
        b.listen(TcpListener::bind("127.0.0.1:0").unwrap());
        b
    }

    fn listen(&mut self, listener: TcpListener) {
        self.addr = listener.local_addr().unwrap();
        let listener = Arc::new(listener);
        self.listener = Some(Arc::clone(&listener));
        let (name, status, flap, hc, cc) = (
            self.name.clone(),
            Arc::clone(&self.health_status),
            Arc::clone(&self.flap),
            Arc::clone(&self.health_requests),
            Arc::clone(&self.client_requests),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (name, status, flap, hc, cc) = (
                    name.clone(),
                    Arc::clone(&status),
                    Arc::clone(&flap),
                    Arc::clone(&hc),
                    Arc::clone(&cc),
                );
                std::thread::spawn(move || serve(stream, &name, &status, &flap, &hc, &cc));
            }
        });
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops listening: connects to its port are refused from now on.
    pub fn stop(&mut self) {
        if let Some(l) = self.listener.take() {
            let _ = SockRef::from(&*l).shutdown(std::net::Shutdown::Both);
        }
    }

    /// Listens on the same port again.
    pub fn restart(&mut self) {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&self.addr.into()).unwrap();
        socket.listen(128).unwrap();
        self.listen(socket.into());
    }
}

/// An HTTP request's head, read byte by byte up to its blank line (so
/// nothing after it is taken); none if the peer ends or fails first.
pub fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

fn serve(
    mut stream: TcpStream,
    name: &str,
    status: &AtomicU16,
    flap: &AtomicBool,
    health: &AtomicUsize,
    clients: &AtomicUsize,
) {
    // Long enough for a client that holds its request open across an
    // ejection (tests/health.rs).
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let Some(head) = read_head(&mut stream) else {
        return;
    };
    let line = String::from_utf8_lossy(&head);
    let code = if line.starts_with("GET /health ") {
        let n = health.fetch_add(1, SeqCst);
        if flap.load(SeqCst) {
            if n.is_multiple_of(2) {
                500
            } else {
                200
            }
        } else {
            status.load(SeqCst)
        }
    } else {
        clients.fetch_add(1, SeqCst);
        200
    };
    let body = format!("{name}\n");
    let _ = write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// One client request through the proxy: the name of the backend that
/// answered, or `None` when the proxy closed the connection first.
pub fn http_via(proxy: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(proxy).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all);
    let body = text.split("\r\n\r\n").nth(1)?;
    let name = body.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// The value of the first sample of `metric` whose labels include all of
/// `labels`, from the proxy's `/metrics`.
pub fn metric(metrics: SocketAddr, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut s = TcpStream::connect(metrics).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut all = String::new();
    let _ = s.read_to_string(&mut all);
    all.lines().find_map(|line| {
        let (name_labels, value) = line.rsplit_once(' ')?;
        let (name, rest) = match name_labels.split_once('{') {
            Some((n, r)) => (n, r),
            None => (name_labels, ""),
        };
        if name != metric {
            return None;
        }
        let all_match = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        all_match.then(|| value.parse().ok()).flatten()
    })
}
