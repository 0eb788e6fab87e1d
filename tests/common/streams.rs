//! Long-lived streaming connections through the proxy, every echoed byte
//! checked: the load under which hot reloads and binary upgrades must lose
//! nothing.
//!
//! A stream's writer sends a deterministic pseudo-random byte stream in
//! chunks of 1..=1024 bytes every 5 ms until told to stop, then half-closes;
//! its reader checks every byte the echo backend sends back until the proxy
//! closes.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{connect_tagged, eventually, PATIENCE};

/// xorshift64*: the byte stream of one connection, and its chunk sizes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = (self.next() >> 32) as u8;
        }
    }
}

pub struct Stream {
    pub backend: String,
    /// Bytes echoed back and verified so far.
    pub verified: Arc<AtomicU64>,
    pub writer: JoinHandle<Result<u64, String>>,
    pub reader: JoinHandle<Result<u64, String>>,
}

/// Opens a streaming connection through `proxy` (see the module docs); it
/// writes until `stop`. Panics if the proxy closes it before a backend
/// greets.
pub fn start_stream(proxy: SocketAddr, seed: u64, stop: &Arc<AtomicBool>) -> Stream {
    let (backend, stream) = connect_tagged(proxy);
    stream_on(backend, stream, seed, stop)
}

/// Like [`start_stream`], but a connection closed before the greeting is an
/// error, not a panic.
pub fn try_start_stream(
    proxy: SocketAddr,
    seed: u64,
    stop: &Arc<AtomicBool>,
) -> Result<Stream, String> {
    let stream = std::net::TcpStream::connect_timeout(&proxy, PATIENCE)
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let backend = super::read_line(&stream).ok_or("no greeting from backend")?;
    Ok(stream_on(backend, stream, seed, stop))
}

fn stream_on(
    backend: String,
    stream: std::net::TcpStream,
    seed: u64,
    stop: &Arc<AtomicBool>,
) -> Stream {
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    let verified = Arc::new(AtomicU64::new(0));

    let mut out = stream.try_clone().unwrap();
    let stop = Arc::clone(stop);
    let writer = std::thread::spawn(move || {
        let mut bytes = Rng::new(seed);
        let mut sizes = Rng::new(seed ^ 0x5555);
        let mut buf = vec![0u8; 4096];
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let n = 1 + (sizes.next() % 1024) as usize;
            bytes.fill(&mut buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| format!("write after {sent} bytes: {e}"))?;
            sent += n as u64;
            // Pacing, so that a hundred streams do not starve the rest of
            // the machine (the proxy's control thread included).
            std::thread::sleep(Duration::from_millis(5));
        }
        out.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        Ok(sent)
    });

    let mut inp = stream;
    let progress = Arc::clone(&verified);
    let reader = std::thread::spawn(move || {
        let mut expected = Rng::new(seed);
        let mut buf = vec![0u8; 16384];
        let mut want = vec![0u8; 16384];
        let mut got = 0u64;
        loop {
            let n = match inp.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => n,
                Err(e) => return Err(format!("read after {got} bytes: {e}")),
            };
            expected.fill(&mut want[..n]);
            if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
                return Err(format!("byte {} differs", got + i as u64));
            }
            got += n as u64;
            progress.store(got, Ordering::Relaxed);
        }
    });
    Stream {
        backend,
        verified,
        writer,
        reader,
    }
}

/// Waits until every stream has had bytes echoed since `seen` (the
/// `verified` counts taken earlier; zeros for "any at all"); returns how
/// many did not move within `PATIENCE`.
pub fn stalled_since(streams: &[Stream], seen: &[u64]) -> usize {
    let mut stalled = 0;
    eventually(PATIENCE, || {
        stalled = streams
            .iter()
            .zip(seen)
            .filter(|(s, &before)| s.verified.load(Ordering::Relaxed) <= before)
            .count();
        stalled == 0
    });
    stalled
}

/// The `verified` count of every stream now.
pub fn progress(streams: &[Stream]) -> Vec<u64> {
    streams
        .iter()
        .map(|s| s.verified.load(Ordering::Relaxed))
        .collect()
}

/// Joins every stream (their writers must have been told to stop): the
/// bytes echoed and verified in all, or one line per stream that failed
/// (an error either way, or fewer bytes back than sent).
pub fn finish(streams: Vec<Stream>) -> Result<u64, Vec<String>> {
    let mut failures = Vec::new();
    let mut total = 0u64;
    for (i, s) in streams.into_iter().enumerate() {
        let sent = s.writer.join().unwrap();
        let got = s.reader.join().unwrap();
        match (sent, got) {
            (Ok(sent), Ok(got)) if sent == got => total += got,
            (sent, got) => failures.push(format!(
                "stream {i} via {}: sent {sent:?}, echoed {got:?}",
                s.backend
            )),
        }
    }
    match failures.is_empty() {
        true => Ok(total),
        false => Err(failures),
    }
}
