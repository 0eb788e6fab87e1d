//! Bytes through the real binary: both ways, in bulk (checksummed), with
//! half-closes in either direction; idle timeout, connection limit and
//! per-app listeners.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{
    config, connect_tagged, connect_waiting, custom_backend, read_line, Db, Proxy, Row, TagBackend,
    TempDir, PATIENCE,
};

/// Bytes moved each way by the bulk tests.
const BULK: u64 = 100 * 1024 * 1024;
const BLOCK: usize = 256 * 1024;

/// A running 64-bit checksum over a byte stream, independent of how the
/// stream is cut into reads (word-wise multiply/rotate; order-sensitive).
struct Sum {
    h: u64,
    tail: [u8; 8],
    tail_len: usize,
    total: u64,
}

impl Sum {
    fn new() -> Sum {
        Sum {
            h: 0xcbf2_9ce4_8422_2325,
            tail: [0; 8],
            tail_len: 0,
            total: 0,
        }
    }

    fn mix(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(27);
    }

    fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.tail));
            self.tail_len = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.mix(u64::from_le_bytes(w.try_into().unwrap()));
        }
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    /// (checksum, byte count)
    fn finish(mut self) -> (u64, u64) {
        let mut last = [0u8; 8];
        last[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        self.mix(u64::from_le_bytes(last));
        self.mix(self.total);
        (self.h, self.total)
    }
}

/// Fills `buf` with pseudo-random bytes (xorshift), continuing `state`.
fn fill(buf: &mut [u8], state: &mut u64) {
    for w in buf.chunks_exact_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        w.copy_from_slice(&state.to_le_bytes());
    }
}

/// Writes `len` pseudo-random bytes from `seed`; returns their checksum.
fn send_stream(mut out: &TcpStream, len: u64, seed: u64) -> (u64, u64) {
    let mut sum = Sum::new();
    let mut state = seed | 1;
    let mut buf = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(BLOCK);
        fill(&mut buf, &mut state);
        out.write_all(&buf[..n]).expect("bulk write");
        sum.update(&buf[..n]);
        left -= n as u64;
    }
    sum.finish()
}

/// Reads to end of stream; returns the checksum of what arrived.
fn receive_stream(mut input: &TcpStream) -> (u64, u64) {
    let mut sum = Sum::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        match input.read(&mut buf) {
            Ok(0) => return sum.finish(),
            Ok(n) => sum.update(&buf[..n]),
            Err(e) => panic!("bulk read after {} bytes: {e}", sum.total),
        }
    }
}

/// A proxy with one listener in front of backends for app "app".
fn proxy_for(dir: &TempDir, ports: &[u16], extra: &str) -> Proxy {
    let db = Db::create(dir.join("routing.db"));
    for (i, port) in ports.iter().enumerate() {
        db.upsert(&Row::new(&format!("b{i}"), "app", "sa", *port));
    }
    Proxy::with_config(dir, &config(&db.path, extra))
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to proxy");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

/// Connections `backend` has accepted so far.
fn accepted_by(backend: &TagBackend) -> usize {
    backend
        .connections
        .load(std::sync::atomic::Ordering::SeqCst)
}

fn echo(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).expect("echo");
    assert_eq!(got, msg);
}

#[test]
fn bytes_flow_both_ways_through_the_proxy() {
    let dir = TempDir::new("bytes");
    let backend = TagBackend::start("echo-1");
    let proxy = proxy_for(&dir, &[backend.port()], "");
    let (name, mut stream) = connect_tagged(proxy.addr());
    assert_eq!(name, "echo-1");
    for msg in [&b"hello"[..], b"\x00\x01\x02\xff binary", &[b'x'; 70_000]] {
        echo(&mut stream, msg);
    }
    // The client half-closes; the backend (echoing to EOF) closes after it.
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn hundred_megabytes_each_way_arrive_intact() {
    let dir = TempDir::new("bulk");
    // Upload: the backend reads to EOF, then answers with what it got.
    let sink = custom_backend(|mut s| {
        let (sum, len) = receive_stream(&s);
        let _ = s.write_all(&[sum.to_le_bytes(), len.to_le_bytes()].concat());
    });
    // Download: the backend streams BULK bytes, reports their checksum, closes.
    let (sent_tx, sent_rx) = mpsc::channel();
    let sent_tx = std::sync::Mutex::new(sent_tx);
    let source = custom_backend(move |s| {
        let sent = send_stream(&s, BULK, 0x5eed_0002);
        let _ = s.shutdown(Shutdown::Write);
        let _ = sent_tx.lock().unwrap().send(sent);
    });

    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("sink", "up", "sa", sink.port()));
    db.upsert(&Row::new("source", "down", "sa", source.port()));
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            "[[listener]]\nname = \"up\"\naddr = \"127.0.0.1:0\"\napp = \"up\"\n\
             [[listener]]\nname = \"down\"\naddr = \"127.0.0.1:0\"\napp = \"down\"\n",
        ),
    );

    // Both directions at once, on two connections.
    let up_addr = proxy.listener("up");
    let upload = std::thread::spawn(move || {
        let stream = connect(up_addr);
        let reader = stream.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let sent = send_stream(&stream, BULK, 0x5eed_0001);
            stream.shutdown(Shutdown::Write).unwrap();
            sent
        });
        let mut reply = [0u8; 16];
        (&reader).read_exact(&mut reply).expect("sink's reply");
        let got = (
            u64::from_le_bytes(reply[..8].try_into().unwrap()),
            u64::from_le_bytes(reply[8..].try_into().unwrap()),
        );
        (writer.join().unwrap(), got)
    });
    let down = connect(proxy.listener("down"));
    let received = receive_stream(&down);
    let sent = sent_rx.recv_timeout(PATIENCE).expect("source done");
    assert_eq!(received.1, BULK, "download length");
    assert_eq!(received, sent, "download checksum");

    let (sent, got) = upload.join().unwrap();
    assert_eq!(got.1, BULK, "upload length");
    assert_eq!(got, sent, "upload checksum");
}

#[test]
fn hundred_megabytes_echoed_while_writing() {
    // One connection, both directions busy at once: a writer thread sends
    // while a reader thread takes the echo.
    let dir = TempDir::new("echo-bulk");
    let backend = TagBackend::start("echo");
    let proxy = proxy_for(&dir, &[backend.port()], "");
    let (_, stream) = connect_tagged(proxy.addr());
    let writer_end = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let sent = send_stream(&writer_end, BULK, 0x5eed_0003);
        writer_end.shutdown(Shutdown::Write).unwrap();
        sent
    });
    let echoed = receive_stream(&stream);
    let sent = writer.join().unwrap();
    assert_eq!(echoed.1, BULK);
    assert_eq!(echoed, sent);
}

#[test]
fn client_half_close_then_backend_replies() {
    let dir = TempDir::new("half-client");
    // Reads to EOF, then replies with what it read.
    let backend = custom_backend(|mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        let reply = format!("got {} bytes: {}", got.len(), String::from_utf8_lossy(&got));
        // Send it in pieces, after EOF, to be sure the direction stays open.
        for piece in reply.as_bytes().chunks(5) {
            s.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let proxy = proxy_for(&dir, &[backend.port()], "");
    let mut stream = connect(proxy.addr());
    stream.write_all(b"question one, ").unwrap();
    stream.write_all(b"question two").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .expect("full reply, then EOF");
    assert_eq!(reply, "got 26 bytes: question one, question two");
}

#[test]
fn backend_half_close_then_client_still_sends() {
    let dir = TempDir::new("half-backend");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(tx);
    // Says hello, half-closes, then reads whatever the client sends.
    let backend = custom_backend(move |mut s| {
        s.write_all(b"hello, then FIN").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = tx.lock().unwrap().send(got);
    });
    let proxy = proxy_for(&dir, &[backend.port()], "");
    let mut stream = connect(proxy.addr());
    let mut hello = Vec::new();
    stream
        .read_to_end(&mut hello)
        .expect("backend's bytes, then EOF");
    assert_eq!(hello, b"hello, then FIN");
    // The other direction is still open.
    for part in [&b"still "[..], b"here ", b"after your FIN"] {
        stream.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let got = rx.recv_timeout(PATIENCE).expect("backend saw EOF");
    assert_eq!(got, b"still here after your FIN");
}

#[test]
fn idle_connections_close_and_trickling_ones_stay() {
    let dir = TempDir::new("idle");
    let backend = TagBackend::start("idle-echo");
    let proxy = proxy_for(&dir, &[backend.port()], "[limits]\nidle_timeout_secs = 1\n");

    // Both at once: one silent, one trickling a byte every 300 ms.
    let addr = proxy.addr();
    let trickler = std::thread::spawn(move || {
        let (_, mut stream) = connect_tagged(addr);
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(2500) {
            std::thread::sleep(Duration::from_millis(300));
            echo(&mut stream, b".");
        }
        echo(&mut stream, b"still open");
    });

    let (_, mut idle) = connect_tagged(addr);
    let since = Instant::now();
    let mut buf = [0u8; 16];
    let outcome = idle.read(&mut buf);
    let waited = since.elapsed();
    assert!(
        matches!(outcome, Ok(0))
            || outcome
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "idle connection not closed: {outcome:?} after {waited:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}, idle timeout is 1 s"
    );
    trickler.join().expect("trickling connection was cut");
}

/// At the connection limit the proxy stops accepting: further clients wait
/// in the kernel's accept queue (not accepted and closed, as before) and are
/// served, in order, as slots free.
#[test]
fn connection_limit_leaves_extra_clients_waiting_in_the_accept_queue() {
    let dir = TempDir::new("limit");
    let backend = TagBackend::start("limited");
    let proxy = proxy_for(&dir, &[backend.port()], "[limits]\nmax_connections = 2\n");
    let (_, mut first) = connect_tagged(proxy.addr());
    let (_, mut second) = connect_tagged(proxy.addr());
    assert_eq!(accepted_by(&backend), 2);

    // A third waits, unserved and open.
    let third = connect_waiting(proxy.addr());
    // The two keep working.
    echo(&mut first, b"one");
    echo(&mut second, b"two");
    assert_eq!(accepted_by(&backend), 2);

    // Once one closes, the waiting client is served.
    first.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).unwrap();
    drop(first);
    assert_eq!(read_line(&third).as_deref(), Some("limited"));
    let mut third = third;
    echo(&mut third, b"three");
    echo(&mut second, b"two still");
    // Nothing was refused: the limit only paused accepting.
    let log = proxy.log_text();
    assert!(!log.contains("closing"), "{log}");
}

/// A burst of clients past the limit: the shard's multishot accept has
/// taken some of them from the kernel before it learns that the limit is
/// reached, and pausing it must hold those (not close them, not serve them
/// yet). Every client is served in turn once the first two leave, and none
/// is reset.
#[test]
fn a_burst_past_the_connection_limit_is_held_and_served_in_turn() {
    const BURST: usize = 12;
    let dir = TempDir::new("limit-burst");
    let backend = TagBackend::start("limited");
    let proxy = proxy_for(&dir, &[backend.port()], "[limits]\nmax_connections = 2\n");
    let (_, mut first) = connect_tagged(proxy.addr());
    let (_, mut second) = connect_tagged(proxy.addr());

    let addr = proxy.addr();
    let (connected_tx, connected_rx) = mpsc::channel();
    let clients: Vec<_> = (0..BURST)
        .map(|i| {
            let connected = connected_tx.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).expect("connect");
                stream.set_read_timeout(Some(PATIENCE)).unwrap();
                // Sent while waiting: it must reach the backend once served.
                let hello = format!("hello {i}\n");
                stream.write_all(hello.as_bytes()).unwrap();
                connected.send(()).unwrap();
                assert_eq!(read_line(&stream).as_deref(), Some("limited"), "client {i}");
                assert_eq!(read_line(&stream), Some(format!("hello {i}")), "client {i}");
            })
        })
        .collect();
    for _ in 0..BURST {
        connected_rx.recv().unwrap();
    }
    // The whole burst is connected (accepted by the kernel) and the two
    // first clients still work: none of the burst was served meanwhile.
    echo(&mut first, b"one");
    echo(&mut second, b"two");
    assert_eq!(accepted_by(&backend), 2);

    drop(first);
    drop(second);
    for client in clients {
        client.join().expect("a client of the burst was not served");
    }
    assert_eq!(accepted_by(&backend), 2 + BURST);
    let log = proxy.log_text();
    assert!(!log.contains("closing"), "{log}");
}

/// `max_connections_per_shard` caps one shard even when the process-wide
/// limit is far away: every connection from 127.0.0.1 is steered to the same
/// shard, so a second one from there waits until the first closes.
#[test]
fn per_shard_limit_makes_extra_clients_of_that_shard_wait() {
    let dir = TempDir::new("shard-limit");
    let backend = TagBackend::start("limited");
    let proxy = proxy_for(
        &dir,
        &[backend.port()],
        "[limits]\nmax_connections = 100000\nmax_connections_per_shard = 1\n",
    );
    let (_, mut first) = connect_tagged(proxy.addr());
    let second = connect_waiting(proxy.addr());
    assert_eq!(accepted_by(&backend), 1);
    echo(&mut first, b"still served");
    drop(first);
    assert_eq!(read_line(&second).as_deref(), Some("limited"));
}

#[test]
fn app_listener_reaches_only_its_apps_backends() {
    let dir = TempDir::new("apps");
    let x = TagBackend::start("x-backend");
    let y = TagBackend::start("y-backend");
    let db = Db::create(dir.join("routing.db"));
    // y comes first in the table: a listener ignoring its app would pick it.
    db.upsert(&Row::new("y1", "y", "sa", y.port()));
    db.upsert(&Row::new("x1", "x", "sa", x.port()));
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            "[[listener]]\nname = \"any\"\naddr = \"127.0.0.1:0\"\n\
             [[listener]]\nname = \"x\"\naddr = \"127.0.0.1:0\"\napp = \"x\"\n\
             [[listener]]\nname = \"ghost\"\naddr = \"127.0.0.1:0\"\napp = \"ghost\"\n",
        ),
    );
    // A client first reaches some backend through the all-apps listener (and
    // may be bound to it), then goes through the app-x listener.
    let (via_any, _keep) = connect_tagged(proxy.listener("any"));
    assert!(
        via_any == "x-backend" || via_any == "y-backend",
        "{via_any}"
    );
    for _ in 0..10 {
        let (name, mut s) = connect_tagged(proxy.listener("x"));
        assert_eq!(name, "x-backend");
        echo(&mut s, b"x only");
    }

    // An app without backends: the client is closed, nothing is reached.
    let before = (accepted_by(&x), accepted_by(&y));
    let mut ghost = connect(proxy.listener("ghost"));
    let _ = ghost.write_all(b"anyone?");
    let mut buf = [0u8; 64];
    let outcome = ghost.read(&mut buf);
    assert!(
        matches!(outcome, Ok(0))
            || outcome
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "ghost app's client not closed: {outcome:?}"
    );
    let after = (accepted_by(&x), accepted_by(&y));
    assert_eq!(before, after, "a backend was reached for an app with none");
}

#[test]
fn a_spliced_flow_keeps_every_byte_for_a_slow_reader_while_others_are_served() {
    // One shard, so the bulk flow and the small exchanges share it.
    let dir = TempDir::new("splice-fair");
    // The source streams until its client goes away.
    let source = custom_backend(|s| {
        let mut state = 0x5eed_0004u64 | 1;
        let mut buf = vec![0u8; BLOCK];
        loop {
            fill(&mut buf, &mut state);
            if (&s).write_all(&buf).is_err() {
                return;
            }
        }
    });
    let echo_backend = TagBackend::start("echo");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("source", "down", "sa", source.port()));
    db.upsert(&Row::new("echo", "echo", "sa", echo_backend.port()));
    let toml = format!(
        "[routing]\ndb_path = {db:?}\n[runtime]\nshards = 1\n\
         [[listener]]\nname = \"down\"\naddr = \"127.0.0.1:0\"\napp = \"down\"\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\napp = \"echo\"\n",
        db = db.path.display().to_string()
    );
    let proxy = Proxy::with_config(&dir, &toml);
    let (_, mut small) = connect_tagged(proxy.listener("echo"));

    // A slow reader: nothing read yet, so the proxy's writes to it block and
    // the flow waits for the client's socket to drain.
    let bulk = connect(proxy.listener("down"));
    for i in 0..10 {
        echo(
            &mut small,
            format!("while the reader is stalled {i}\n").as_bytes(),
        );
    }

    // Now it reads as fast as it can, checking the first 256 MiB against
    // what the source sent, and goes on reading until told to stop.
    const CHECKED: u64 = 256 * 1024 * 1024;
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut got = Sum::new();
        let mut buf = vec![0u8; BLOCK];
        let mut r = &bulk;
        loop {
            let n = r.read(&mut buf).expect("bulk read");
            assert!(n > 0, "the flow ended early");
            let checked = (CHECKED - got.total).min(n as u64) as usize;
            got.update(&buf[..checked]);
            if got.total == CHECKED && stop_rx.try_recv().is_ok() {
                return got.finish();
            }
        }
    });
    // While the flow runs flat out on the same shard, small exchanges still
    // get their turn. (Whether they would without the spliced flow's
    // yielding depends on how often the reader here makes the proxy wait;
    // `rt`'s unit test checks the yielding itself.)
    for i in 0..10 {
        echo(&mut small, format!("while the flow runs {i}\n").as_bytes());
    }
    stop_tx.send(()).unwrap();
    let got = reader.join().unwrap();

    let mut expected = Sum::new();
    let mut state = 0x5eed_0004u64 | 1;
    let mut buf = vec![0u8; BLOCK];
    while expected.total < CHECKED {
        fill(&mut buf, &mut state);
        expected.update(&buf);
    }
    assert_eq!(
        got,
        expected.finish(),
        "spliced bytes differ from the source's"
    );
}
