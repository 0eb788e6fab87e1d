//! (f) TLS: full handshakes per second (a new connection, a TLS 1.3 handshake
//! without resumption, one HTTP request, close) and TLS bulk download and
//! upload, closed loop and then paced at one rate for every target
//! (`byte_pace` says why both).
//!
//! TLS is measured only when the edgeproxy binary accepts a TLS listener
//! (`check-config` on a config with one); otherwise the scenario reports
//! "TLS: not available in this build". Every proxy terminates TLS with the
//! same self-signed ECDSA P-256 certificate (generated per suite run) and
//! forwards plaintext to the same backends; direct has no TLS.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::pki_types::ServerName;

use crate::backends::{bulk_command, Backends, REQUEST_CLOSE, RESPONSE_CLOSE};
use crate::byte_pace::{BytePacer, PACED_CHUNK};
use crate::loadgen;
use crate::procfs;
use crate::report::{col, Sample, Variant};
use crate::targets::{Running, Setup};
use crate::tls_material::TlsMaterial;
use crate::Options;

/// Whether `edgeproxy check-config` accepts a TLS listener.
pub fn edgeproxy_has_tls(setup: &Setup) -> Result<(), String> {
    let dir = setup.work_dir.join("tls-probe");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join("edgeproxy.toml");
    let toml = format!(
        "[routing]\ndb_path = \"{}\"\n[demo]\nbackends = 0\n\n[[listener]]\nname = \"tls\"\naddr = \"127.0.0.1:0\"\ntls = {{ self_signed = true }}\n",
        dir.join("routing.db").display()
    );
    std::fs::write(&path, toml).map_err(|e| e.to_string())?;
    let out = Command::new(&setup.edgeproxy_bin)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env_clear()
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
            .to_string())
    }
}

/// Runs (f) on the targets that have TLS fronts.
pub fn scenarios(
    opts: &Options,
    setup: &Setup,
    targets: &mut [Running],
    backends: &Backends,
    unavailable: Option<String>,
) -> Vec<Variant> {
    let mut hs = Variant::new(
        "f_tls_handshakes",
        format!(
            "(f) TLS handshakes: new connection + full TLS 1.3 handshake (ECDSA P-256, no resumption) + one request, {} client threads",
            opts.tls_threads
        ),
        &[
            col("hps", "handshakes/s", false),
            col("p50_us", "p50 µs", true),
            col("p99_us", "p99 µs", true),
            col("cpu_us_per_handshake", "CPU µs/handshake", true),
        ],
    );
    let mut bulk = Direction::Download.variant(opts, None);
    let mut upload = Direction::Upload.variant(opts, None);
    let material = match (&unavailable, &setup.tls) {
        (Some(why), _) => {
            hs.notes
                .push(format!("TLS: not available in this build ({why})"));
            return vec![hs];
        }
        (None, None) => {
            hs.notes.push("TLS: no certificate material".into());
            return vec![hs];
        }
        (None, Some(m)) => Arc::clone(m),
    };
    hs.notes
        .push("direct has no TLS: not applicable; CPU is the proxy's".into());
    if targets
        .iter()
        .any(|t| t.kind == crate::targets::Kind::Minimal)
    {
        hs.notes.push("minimal has no TLS: not run".into());
    }
    for run in 0..opts.runs {
        for t in targets.iter_mut() {
            let (Some(front), Some(bulk_front)) = (t.fronts.tls_http, t.fronts.tls_bulk) else {
                continue;
            };
            match handshake_sample(opts, t, run, front, &material) {
                Ok(s) => hs.samples.push(s),
                Err(e) => {
                    hs.notes
                        .push(format!("{} run {}: failed: {e:#}", t.kind.name(), run + 1))
                }
            }
            for (variant, direction) in [
                (&mut bulk, Direction::Download),
                (&mut upload, Direction::Upload),
            ] {
                let flow = Flow {
                    direction,
                    bytes_per_sec: None,
                };
                match bulk_sample(opts, t, run, bulk_front, &material, backends, flow) {
                    Ok(s) => variant.samples.push(s),
                    Err(e) => variant.notes.push(format!(
                        "{} run {}: failed: {e:#}",
                        t.kind.name(),
                        run + 1
                    )),
                }
            }
        }
    }
    hs.finish();
    bulk.finish();
    upload.finish();
    let paced = [
        paced_runs(
            opts,
            targets,
            &material,
            backends,
            Direction::Download,
            &bulk,
        ),
        paced_runs(
            opts,
            targets,
            &material,
            backends,
            Direction::Upload,
            &upload,
        ),
    ];
    let mut out = vec![hs, bulk, upload];
    out.extend(paced.into_iter().flatten());
    out
}

/// TLS bulk at a fixed rate (see `byte_pace`): every target moves the same
/// MB/s, `--tls-paced-mbps` or a share of the slowest target's closed-loop
/// MB/s in `closed`, so none is the slowest stage. A target that cannot
/// keep the rate is flagged: its CPU per GB is not comparable.
fn paced_runs(
    opts: &Options,
    targets: &mut [Running],
    material: &Arc<TlsMaterial>,
    backends: &Backends,
    direction: Direction,
    closed: &Variant,
) -> Option<Variant> {
    let slowest = targets
        .iter()
        .filter_map(|t| closed.median(t.kind, "mbps"))
        .reduce(f64::min);
    let (mbps, basis) = match (opts.tls_paced_mbps, slowest) {
        (Some(r), _) => (r, "--tls-paced-mbps".to_string()),
        (None, Some(slowest)) if opts.tls_paced_share > 0.0 => (
            opts.tls_paced_share * slowest,
            format!(
                "{:.2}× the slowest target's closed-loop {slowest:.0} MB/s",
                opts.tls_paced_share
            ),
        ),
        _ => return None,
    };
    let mut v = direction.variant(opts, Some(mbps));
    v.notes.push(format!("rate: {mbps:.0} MB/s, {basis}"));
    for run in 0..opts.runs {
        for t in targets.iter_mut() {
            let Some(front) = t.fronts.tls_bulk else {
                continue;
            };
            let flow = Flow {
                direction,
                bytes_per_sec: Some(mbps * 1e6),
            };
            match bulk_sample(opts, t, run, front, material, backends, flow) {
                Ok(s) => {
                    let moved = s.metrics.get("mbps").copied().unwrap_or(0.0);
                    if moved < 0.95 * mbps {
                        v.notes.push(format!(
                            "{} run {}: moved {moved:.0} of {mbps:.0} MB/s: over its capacity, its CPU per GB is not comparable",
                            t.kind.name(),
                            run + 1
                        ));
                    }
                    v.samples.push(s);
                }
                Err(e) => v
                    .notes
                    .push(format!("{} run {}: failed: {e:#}", t.kind.name(), run + 1)),
            }
        }
    }
    v.finish();
    Some(v)
}

fn tls_connect(
    front: SocketAddr,
    source: Option<std::net::IpAddr>,
    m: &TlsMaterial,
) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let tcp = loadgen::connect_blocking(front, source)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let conn = rustls::ClientConnection::new(
        Arc::clone(&m.client),
        ServerName::try_from("localhost").expect("valid name"),
    )?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).context("TLS handshake")?;
    }
    Ok(s)
}

fn handshake_sample(
    opts: &Options,
    t: &Running,
    run: usize,
    front: SocketAddr,
    m: &Arc<TlsMaterial>,
) -> anyhow::Result<Sample> {
    let stop = Arc::new(AtomicBool::new(false));
    let recording = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Mutex::new(loadgen::new_histogram()));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let sources = loadgen::loopback_sources(opts.sources);
    let mut threads = Vec::new();
    for i in 0..opts.tls_threads.max(1) {
        let (stop, recording, hist, done, errors) = (
            Arc::clone(&stop),
            Arc::clone(&recording),
            Arc::clone(&hist),
            Arc::clone(&done),
            Arc::clone(&errors),
        );
        let (m, cpus, source) = (
            Arc::clone(m),
            opts.loadgen_cpus.clone(),
            sources[i % sources.len()],
        );
        threads.push(std::thread::spawn(move || {
            let _ = procfs::pin_current_thread(&cpus);
            let mut local = loadgen::new_histogram();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = (|| -> anyhow::Result<()> {
                    let mut s = tls_connect(front, Some(source), &m)?;
                    s.write_all(REQUEST_CLOSE)?;
                    s.flush()?;
                    let mut got = 0;
                    let mut buf = [0u8; 512];
                    while got < RESPONSE_CLOSE.len() {
                        match s.read(&mut buf)? {
                            0 => anyhow::bail!("closed after {got} bytes"),
                            n => got += n,
                        }
                    }
                    Ok(())
                })();
                if recording.load(Ordering::Relaxed) {
                    match ok {
                        Ok(()) => {
                            let _ = local.record(started.elapsed().as_nanos().max(1) as u64);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            let _ = hist.lock().unwrap().add(&local);
        }));
    }
    let pid = t.pid();
    std::thread::sleep(opts.warmup);
    let (c0, t0) = (pid.map(procfs::cpu).unwrap_or_default(), Instant::now());
    recording.store(true, Ordering::Relaxed);
    std::thread::sleep(opts.duration);
    recording.store(false, Ordering::Relaxed);
    let (c1, elapsed) = (pid.map(procfs::cpu).unwrap_or_default(), t0.elapsed());
    let n = done.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        let _ = th.join();
    }
    if n == 0 {
        anyhow::bail!(
            "no handshake completed ({} errors)",
            errors.load(Ordering::Relaxed)
        );
    }
    let h = hist.lock().unwrap().clone();
    let mut metrics = std::collections::BTreeMap::new();
    metrics.insert("hps", n as f64 / elapsed.as_secs_f64());
    metrics.insert("p50_us", h.value_at_quantile(0.5) as f64 / 1000.0);
    metrics.insert("p99_us", h.value_at_quantile(0.99) as f64 / 1000.0);
    metrics.insert("errors", errors.load(Ordering::Relaxed) as f64);
    if pid.is_some() {
        metrics.insert(
            "cpu_us_per_handshake",
            c1.since(&c0).total().as_nanos() as f64 / 1000.0 / n as f64,
        );
    }
    Ok(Sample {
        target: t.kind,
        run,
        metrics,
        latency: Some(h),
    })
}

/// One bulk sample's bytes: which way, and closed loop (`None`) or paced
/// at this many bytes per second over all streams.
#[derive(Clone, Copy)]
struct Flow {
    direction: Direction,
    bytes_per_sec: Option<f64>,
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Download,
    Upload,
}

impl Direction {
    /// The report variant for TLS bulk in this direction, closed loop or
    /// paced at `mbps` over all streams.
    fn variant(self, opts: &Options, mbps: Option<f64>) -> Variant {
        let (id, what) = match (self, mbps.is_some()) {
            (Direction::Download, false) => ("f_tls_bulk", "download (backend → client"),
            (Direction::Upload, false) => ("f_tls_upload", "upload (client → backend"),
            (Direction::Download, true) => ("f_tls_bulk_paced", "download (backend → client"),
            (Direction::Upload, true) => ("f_tls_upload_paced", "upload (client → backend"),
        };
        let pace = match mbps {
            Some(r) => format!(", paced at {r:.0} MB/s by the sender"),
            None => String::new(),
        };
        Variant::new(
            id,
            format!(
                "(f) TLS bulk {what} through TLS): {} streams{pace}",
                opts.bulk_streams
            ),
            &[
                col("mbps", "MB/s", false),
                col("cpu_ms_per_gb", "CPU ms/GB", true),
            ],
        )
    }
}

fn bulk_sample(
    opts: &Options,
    t: &Running,
    run: usize,
    front: SocketAddr,
    m: &Arc<TlsMaterial>,
    backends: &Backends,
    flow: Flow,
) -> anyhow::Result<Sample> {
    let direction = flow.direction;
    let stop = Arc::new(AtomicBool::new(false));
    let streams = opts.bulk_streams.max(1);
    let per_stream = flow.bytes_per_sec.map(|r| r / streams as f64);
    let downloaded = Arc::new(AtomicU64::new(0));
    let sources = loadgen::loopback_sources(opts.sources);
    let mut threads = Vec::new();
    for i in 0..streams {
        let mut s = tls_connect(front, Some(sources[i % sources.len()]), m)?;
        s.sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        s.sock.set_write_timeout(Some(Duration::from_millis(100)))?;
        // A paced download is paced by the backend, its source.
        let (op, arg) = match (direction, per_stream) {
            (Direction::Download, Some(rate)) => (b'R', rate as u64),
            (Direction::Download, None) => (b'D', u64::MAX / 2),
            (Direction::Upload, _) => (b'U', u64::MAX / 2),
        };
        s.write_all(&bulk_command(op, arg))?;
        s.flush()?;
        let (stop, downloaded, cpus) = (
            Arc::clone(&stop),
            Arc::clone(&downloaded),
            opts.loadgen_cpus.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let _ = procfs::pin_current_thread(&cpus);
            // A paced upload is paced here, at its source.
            let mut pacer = match direction {
                Direction::Upload => per_stream.map(BytePacer::new),
                Direction::Download => None,
            };
            let len = if pacer.is_some() {
                PACED_CHUNK
            } else {
                256 * 1024
            };
            let mut buf = vec![0u8; len];
            while !stop.load(Ordering::Relaxed) {
                if let Some(p) = &mut pacer {
                    p.wait();
                }
                let r = match direction {
                    Direction::Download => s.read(&mut buf),
                    // rustls keeps what a timed-out write could not send and
                    // sends it first on the next call.
                    Direction::Upload => s.write(&buf),
                };
                match r {
                    Ok(0) => break,
                    Ok(n) => {
                        if let Some(p) = &mut pacer {
                            p.moved(n);
                        }
                        if direction == Direction::Download {
                            downloaded.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        }));
    }
    // Upload counts what the backend received: bytes still in flight
    // through the proxy are not counted as moved.
    let counter = || match direction {
        Direction::Download => downloaded.load(Ordering::Relaxed),
        Direction::Upload => backends.bulk_received.load(Ordering::Relaxed),
    };
    let pid = t.pid();
    std::thread::sleep(opts.warmup);
    let (b0, c0, t0) = (
        counter(),
        pid.map(procfs::cpu).unwrap_or_default(),
        Instant::now(),
    );
    std::thread::sleep(opts.duration);
    let (b1, c1, elapsed) = (
        counter(),
        pid.map(procfs::cpu).unwrap_or_default(),
        t0.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        let _ = th.join();
    }
    let moved = (b1 - b0) as f64;
    if moved == 0.0 {
        anyhow::bail!("no byte moved");
    }
    let mut metrics = std::collections::BTreeMap::new();
    metrics.insert("mbps", moved / 1e6 / elapsed.as_secs_f64());
    if pid.is_some() {
        metrics.insert(
            "cpu_ms_per_gb",
            c1.since(&c0).total().as_secs_f64() * 1000.0 / (moved / 1e9),
        );
    }
    Ok(Sample {
        target: t.kind,
        run,
        metrics,
        latency: None,
    })
}
