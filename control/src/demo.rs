//! Demo backends: tiny HTTP/1.1 responders started in-process when the config
//! asks for them (`[demo] backends = N`), so the shipped configuration answers
//! `curl` on a fresh machine with no other setup. Each answers every request
//! with `hello from demo-N` and keeps the connection alive.
//!
//! They run on plain threads (one per connection): they are for trying the
//! proxy out, not for measuring it.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use engine::snapshot::BackendRecord;

/// Starts `count` responders on loopback and returns the routing records that
/// point at them.
pub fn start(count: u32, app: &str, region: &str) -> io::Result<Vec<BackendRecord>> {
    let mut records = Vec::new();
    for n in 1..=count {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let name = format!("demo-{n}");
        let thread_name = name.clone();
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || serve(listener, thread_name, addr))?;
        tracing::info!(backend = %name, %addr, "demo backend started");
        records.push(BackendRecord {
            id: name,
            app: app.to_string(),
            region: region.to_string(),
            country: None,
            ip: addr.ip().to_string(),
            port: i64::from(addr.port()),
            healthy: true,
            weight: 1,
            soft_limit: 100,
            hard_limit: 150,
            deleted: false,
        });
    }
    Ok(records)
}

fn serve(listener: TcpListener, name: String, addr: SocketAddr) {
    for stream in listener.incoming().flatten() {
        let body = format!("hello from {name} ({addr})\n");
        let _ = std::thread::Builder::new()
            .name(format!("{name}-conn"))
            .spawn(move || {
                let _ = answer(stream, &body);
            });
    }
}

fn answer(stream: TcpStream, body: &str) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        // Request line, then headers up to the blank line. Bodies are ignored:
        // the demo answers GETs.
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut close = false;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line.to_ascii_lowercase().starts_with("connection: close") {
                close = true;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        if close {
            return Ok(());
        }
    }
}
