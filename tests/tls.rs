//! TLS termination through the real binary, with real TLS clients: a rustls
//! client (TLS 1.3 and 1.2, multi-MB echo, half-close, ALPN), `openssl
//! s_client` and `curl` (SNI, wildcard, default certificate, old protocol
//! versions), self-signed mode and the original's `EDGEPROXY_TLS_*`
//! variables, certificate rotation with connections open (file change and
//! SIGHUP), broken certificate files at start and at rotation, the handshake
//! timeout, `check-config` output for TLS listeners, and the two directions
//! staying independent under backpressure.
//!
//! Certificates are made here with rcgen: a test CA issues the leaf
//! certificates, so clients verify them for real (chain and host name). Which
//! certificate the proxy served is checked by comparing its DER with the file's.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, ProtocolVersion, RootCertStore,
    SignatureScheme, SupportedProtocolVersion,
};

const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
const ANY_VERSION: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key.
struct Leaf {
    der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "edgeproxy test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// A certificate for `names` (subject alternative names), with `cn` as
    /// its subject's common name.
    fn issue(&self, cn: &str, names: &[&str]) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A certificate for `names` whose validity ended in 2020.
    fn issue_expired(&self, names: &[&str]) -> Leaf {
        self.issue_valid(names, (2019, 1, 1), (2020, 1, 1))
    }

    /// A certificate for `names` valid from `not_before` to `not_after`
    /// (year, month, day).
    fn issue_valid(
        &self,
        names: &[&str],
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    fn write(&self, dir: &TempDir) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.issuer.pem()).unwrap();
        path
    }
}

impl Leaf {
    /// Writes `<stem>.pem` and `<stem>.key` into `dir`.
    fn write(&self, dir: &TempDir, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(&format!("{stem}.pem"));
        let key = dir.join(&format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    /// Replaces `cert` and `key` the way a certificate manager does: each
    /// written to a temporary file, then renamed over the old one.
    fn install(&self, cert: &Path, key: &Path) {
        replace_file(cert, self.cert_pem.as_bytes());
        replace_file(key, self.key_pem.as_bytes());
    }
}

fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A path as a TOML string.
fn toml_path(p: &Path) -> String {
    format!("{:?}", p.to_str().unwrap())
}

/// The DNS names in a certificate's subject alternative names.
fn san_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("served certificate parses");
    let san = cert
        .subject_alternative_name()
        .expect("valid SAN extension")
        .expect("a SAN extension");
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// (common name, organization) of a certificate's subject.
fn subject_names(der: &[u8]) -> (Vec<String>, Vec<String>) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let text = |attrs: Vec<&x509_parser::x509::AttributeTypeAndValue>| {
        attrs
            .into_iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    (
        text(cert.subject().iter_common_name().collect()),
        text(cert.subject().iter_organization().collect()),
    )
}

fn is_self_issued(der: &[u8]) -> bool {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject() == cert.issuer()
}

// ---------------------------------------------------------------------------
// The world: a backend, routing.db, a TLS listener
// ---------------------------------------------------------------------------

struct World {
    dir: TempDir,
    db: Db,
    ca: Ca,
    /// The only backend: greets with `echo-1\n`, then echoes.
    backend: TagBackend,
}

impl World {
    fn new(tag: &str) -> World {
        let dir = TempDir::new(tag);
        let backend = TagBackend::start("echo-1");
        let db = Db::create(dir.join("routing.db"));
        db.upsert(&Row::new("echo-1", "web", "sa", backend.port()));
        World {
            dir,
            db,
            ca: Ca::new(),
            backend,
        }
    }

    /// A config with one listener, `tls`, whose `[listener.tls]` table is
    /// `tls` (keys first, then any `[[listener.tls.sni]]` tables).
    fn config(&self, reload_ms: u64, tls: &str) -> String {
        format!(
            "[routing]\ndb_path = {db}\nreload_interval_ms = {reload_ms}\n\n\
             [runtime]\nshards = 2\n\n\
             [[listener]]\nname = \"tls\"\naddr = \"127.0.0.1:0\"\n\n\
             [listener.tls]\n{tls}\n",
            db = toml_path(&self.db.path),
        )
    }

    /// Starts the proxy; certificate files are checked every 100 ms.
    fn start(&self, tls: &str) -> Proxy {
        Proxy::with_config(&self.dir, &self.config(100, tls))
    }

    /// Writes `leaf` as `<stem>.pem`/`<stem>.key` and returns the TOML keys
    /// naming them.
    fn files(&self, leaf: &Leaf, stem: &str) -> String {
        let (cert, key) = leaf.write(&self.dir, stem);
        format!("cert = {}\nkey = {}\n", toml_path(&cert), toml_path(&key))
    }
}

// ---------------------------------------------------------------------------
// A rustls client over a blocking socket (non-blocking for full duplex)
// ---------------------------------------------------------------------------

fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any certificate but still checks the handshake signatures (so the
/// server proves it holds the key of what it served). For self-signed
/// certificates nobody can know in advance.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies the server's certificate against `ca` (chain and host name).
fn trusting(
    ca: &Ca,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&str],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let mut config = ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// Accepts whatever certificate the server shows (see [`AnyCertificate`]).
fn trusting_anything(versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let provider = ring();
    Arc::new(
        ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    )
}

/// The rustls error inside an I/O error from `complete_io`, if any.
fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

struct Client {
    tls: ClientConnection,
    sock: TcpStream,
}

impl Client {
    /// Connects to `addr` and completes the handshake, sending `sni` as the
    /// server name (an IP address sends no SNI).
    fn connect(addr: SocketAddr, config: Arc<ClientConfig>, sni: &str) -> io::Result<Client> {
        let name = ServerName::try_from(sni.to_string()).expect("valid server name");
        let tls = ClientConnection::new(config, name).expect("client connection");
        let sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(PATIENCE))?;
        sock.set_write_timeout(Some(PATIENCE))?;
        let mut client = Client { tls, sock };
        while client.tls.is_handshaking() {
            client.tls.complete_io(&mut client.sock)?;
        }
        Ok(client)
    }

    /// Like [`Client::connect`], panicking if the handshake fails.
    fn open(addr: SocketAddr, config: Arc<ClientConfig>, sni: &str) -> Client {
        Client::connect(addr, config, sni)
            .unwrap_or_else(|e| panic!("TLS handshake with {addr} (SNI {sni}) failed: {e}"))
    }

    /// DER of the certificate the server presented.
    fn served(&self) -> Vec<u8> {
        self.tls
            .peer_certificates()
            .and_then(|chain| chain.first())
            .expect("server sent a certificate")
            .to_vec()
    }

    fn version(&self) -> ProtocolVersion {
        self.tls.protocol_version().unwrap()
    }

    fn alpn(&self) -> Option<String> {
        self.tls
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }

    /// Encrypts and sends `data` (blocking).
    fn send(&mut self, data: &[u8]) {
        self.tls.writer().write_all(data).unwrap();
        self.flush();
    }

    fn flush(&mut self) {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.sock).expect("write to proxy");
        }
    }

    /// One blocking read of TLS records from the socket.
    fn fill(&mut self) {
        self.tls.read_tls(&mut self.sock).expect("read from proxy");
        self.tls
            .process_new_packets()
            .unwrap_or_else(|e| panic!("TLS error from proxy: {e}"));
    }

    fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut filled = 0;
        while filled < n {
            match self.tls.reader().read(&mut out[filled..]) {
                Ok(0) => panic!(
                    "proxy closed (close_notify) after {filled} of {n} bytes: {:?}",
                    String::from_utf8_lossy(&out[..filled])
                ),
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.fill(),
                Err(e) => panic!("after {filled} of {n} bytes: {e}"),
            }
        }
        out
    }

    /// The backend's greeting line.
    fn greeting(&mut self) -> String {
        let mut line = Vec::new();
        loop {
            let byte = self.read_exact(1)[0];
            if byte == b'\n' {
                return String::from_utf8(line).unwrap();
            }
            line.push(byte);
        }
    }

    /// Sends `msg` and checks the backend echoes it.
    fn assert_echo(&mut self, msg: &str) {
        self.send(msg.as_bytes());
        let back = self.read_exact(msg.len());
        assert_eq!(String::from_utf8_lossy(&back), msg);
    }

    /// Reads until the proxy's close_notify; returns what arrived before and
    /// whether the TCP connection then ended too. Panics on a close without
    /// close_notify (a truncation attack would look like that).
    fn read_to_close_notify(&mut self) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.tls.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.fill(),
                Err(e) => panic!("no close_notify ({e}) after {} bytes", got.len()),
            }
        }
        let mut rest = [0u8; 64];
        let fin = matches!(self.sock.read(&mut rest), Ok(0));
        (got, fin)
    }

    /// Full duplex: sends `data` while reading what comes back, then (if
    /// `close`) sends close_notify — a TLS half-close, the TCP connection
    /// stays open — and reads until the proxy's close_notify. Without
    /// `close`, returns once `want` bytes arrived. Returns what arrived.
    fn transfer(&mut self, data: &[u8], close: bool, want: usize, patience: Duration) -> Vec<u8> {
        const STEP: usize = 64 * 1024;
        self.sock.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + patience;
        let mut sent = 0;
        let mut close_sent = false;
        let mut got = Vec::with_capacity(want);
        let mut buf = vec![0u8; 64 * 1024];
        let mut peer_closed = false;
        loop {
            let mut progress = false;
            if sent < data.len() {
                let end = (sent + STEP).min(data.len());
                let n = self.tls.writer().write(&data[sent..end]).unwrap();
                sent += n;
                progress |= n > 0;
            } else if close && !close_sent {
                self.tls.send_close_notify();
                close_sent = true;
                progress = true;
            }
            while self.tls.wants_write() {
                match self.tls.write_tls(&mut self.sock) {
                    Ok(n) => progress |= n > 0,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write to proxy after {sent} bytes sent: {e}"),
                }
            }
            loop {
                match self.tls.read_tls(&mut self.sock) {
                    Ok(n) => {
                        progress = true;
                        self.tls
                            .process_new_packets()
                            .unwrap_or_else(|e| panic!("TLS error from proxy: {e}"));
                        loop {
                            match self.tls.reader().read(&mut buf) {
                                Ok(0) => {
                                    peer_closed = true;
                                    break;
                                }
                                Ok(k) => got.extend_from_slice(&buf[..k]),
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                                Err(e) => panic!(
                                    "proxy closed without close_notify ({e}); sent {sent} of {}, got {}",
                                    data.len(),
                                    got.len()
                                ),
                            }
                        }
                        if n == 0 || peer_closed {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read from proxy: {e}; sent {sent}, got {}", got.len()),
                }
            }
            if peer_closed || (!close && got.len() >= want) {
                break;
            }
            if !progress {
                let now = Instant::now();
                assert!(
                    now < deadline,
                    "transfer stalled: sent {sent} of {} bytes (close_notify sent: {close_sent}), got {} of {want}",
                    data.len(),
                    got.len()
                );
                let wait = (deadline - now).min(Duration::from_secs(1));
                wait_socket(&self.sock, self.tls.wants_write(), wait);
            }
        }
        self.sock.set_nonblocking(false).unwrap();
        got
    }
}

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

extern "C" {
    fn poll(fds: *mut PollFd, nfds: std::ffi::c_ulong, timeout: i32) -> i32;
}

/// Waits until `sock` is readable (or writable, if `write`), or `wait` passes.
fn wait_socket(sock: &TcpStream, write: bool, wait: Duration) {
    use std::os::fd::AsRawFd;
    const POLLIN: i16 = 0x1;
    const POLLOUT: i16 = 0x4;
    let mut fd = PollFd {
        fd: sock.as_raw_fd(),
        events: POLLIN | if write { POLLOUT } else { 0 },
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { poll(&mut fd, 1, wait.as_millis().max(1) as i32) };
}

/// Deterministic, incompressible-looking test bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Index of the first difference, for readable failures on large buffers.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: got {} bytes, want {}; first difference at byte {first}",
            got.len(),
            want.len()
        );
    }
}

// ---------------------------------------------------------------------------
// External clients: openssl s_client, curl
// ---------------------------------------------------------------------------

/// Runs a tool (installed by .ci/run) with stdin closed.
fn tool(program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} (.ci/run installs it): {e}"));
    // A hung tool must not hang the suite.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{program} {args:?} did not finish within {PATIENCE:?}");
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `openssl s_client` to `addr` with `args`; returns the output and the DER
/// of the certificate the server presented (if the handshake got that far).
fn s_client(addr: SocketAddr, args: &[&str]) -> (Output, Option<Vec<u8>>) {
    let connect = addr.to_string();
    let mut all = vec!["s_client", "-connect", connect.as_str()];
    all.extend_from_slice(args);
    let out = tool("openssl", &all);
    let served = CertificateDer::from_pem_slice(&out.stdout)
        .ok()
        .map(|c| c.to_vec());
    (out, served)
}

/// A backend speaking just enough HTTP/1.1 for curl: answers every request
/// with `body` and closes.
fn http_backend(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes());
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------
// (a) rustls client: TLS 1.3 and 1.2, echo both ways, multi-MB, half-close
// ---------------------------------------------------------------------------

/// Handshake with `versions`, greeting, a small echo, 8 MiB each way in full
/// duplex, then a TLS half-close: the client's close_notify reaches the
/// backend as a FIN and the rest of the echo still arrives, then the
/// proxy's close_notify and FIN.
fn echo_roundtrip(versions: &[&'static SupportedProtocolVersion], want: ProtocolVersion) {
    let world = World::new(&format!("echo-{want:?}"));
    let leaf = world.ca.issue("edge", &["edge.test"]);
    let proxy = world.start(&world.files(&leaf, "edge"));
    let addr = proxy.listener("tls");

    let mut c = Client::open(addr, trusting(&world.ca, versions, &[]), "edge.test");
    assert_eq!(c.version(), want);
    assert_eq!(c.served(), leaf.der);
    assert_eq!(c.greeting(), "echo-1");
    c.assert_echo("hello through tls\n");

    let big = pattern(8 << 20, u16::from(want) as u64);
    let back = c.transfer(&big, false, big.len(), Duration::from_secs(120));
    assert_same(&back, &big, "8 MiB echo");

    // Half-close: the last bytes, then close_notify; the TCP connection
    // stays open. The proxy must pass it on as a FIN (the backend closes only
    // then), keep delivering the echo still in flight, then send its own
    // close_notify and FIN.
    let tail = pattern(300_000, 7);
    let back = c.transfer(&tail, true, tail.len(), PATIENCE);
    assert_same(&back, &tail, "echo after the client's close_notify");
    let mut rest = [0u8; 16];
    assert!(
        matches!(c.sock.read(&mut rest), Ok(0)),
        "no FIN after the proxy's close_notify"
    );
    assert_eq!(world.backend.accepted(), 1);
}

#[test]
fn tls13_echo_multi_megabyte_and_half_close() {
    echo_roundtrip(TLS13, ProtocolVersion::TLSv1_3);
}

#[test]
fn tls12_echo_multi_megabyte_and_half_close() {
    echo_roundtrip(TLS12, ProtocolVersion::TLSv1_2);
}

/// A TLS 1.3 client may send its Finished, its request and its close_notify
/// in one flight. The close_notify must still reach the backend as a FIN.
#[test]
fn close_notify_in_the_clients_first_flight_reaches_the_backend() {
    let world = World::new("first-flight");
    let leaf = world.ca.issue("edge", &["edge.test"]);
    let proxy = world.start(&world.files(&leaf, "edge"));
    let addr = proxy.listener("tls");

    let name = ServerName::try_from("edge.test").unwrap();
    let mut tls = ClientConnection::new(trusting(&world.ca, TLS13, &[]), name).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    // Queued before the handshake ends: rustls sends it right after Finished.
    tls.writer().write_all(b"request\n").unwrap();
    let mut flight = Vec::new();
    loop {
        tls.write_tls(&mut flight).unwrap();
        if !tls.is_handshaking() {
            break;
        }
        sock.write_all(&flight).unwrap();
        flight.clear();
        tls.read_tls(&mut sock).unwrap();
        tls.process_new_packets().unwrap();
    }
    // Finished + request + close_notify: one write. The TCP connection stays
    // open both ways.
    tls.send_close_notify();
    while tls.wants_write() {
        tls.write_tls(&mut flight).unwrap();
    }
    sock.write_all(&flight).unwrap();

    let mut c = Client { tls, sock };
    let (got, fin) = c.read_to_close_notify();
    assert_eq!(String::from_utf8_lossy(&got), "echo-1\nrequest\n");
    assert!(fin, "no FIN after the proxy's close_notify");
}

extern "C" {
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const u8, len: u32) -> i32;
}

/// Caps a socket's send (`SO_SNDBUF`) or receive (`SO_RCVBUF`) buffer, which
/// also stops the kernel from growing it.
fn cap_buffer(sock: &TcpStream, receive: bool, bytes: i32) {
    use std::os::fd::AsRawFd;
    const SOL_SOCKET: i32 = 1;
    const SO_SNDBUF: i32 = 7;
    const SO_RCVBUF: i32 = 8;
    let name = if receive { SO_RCVBUF } else { SO_SNDBUF };
    // SAFETY: a valid fd and a 4-byte int option value.
    let rc = unsafe {
        setsockopt(
            sock.as_raw_fd(),
            SOL_SOCKET,
            name,
            (&bytes as *const i32).cast(),
            4,
        )
    };
    assert_eq!(rc, 0, "setsockopt");
}

/// The two directions are independent, as on a plain listener: while the
/// download is stalled (the client is not reading it), the upload goes on.
#[test]
fn upload_proceeds_while_the_download_is_backpressured() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const DOWN: usize = 48 << 20;
    const UP: usize = 16 << 20;
    let world = World::new("both-ways");
    // A backend that streams DOWN bytes at once and counts what it receives.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let down = Arc::new(pattern(DOWN, 11));
    let written = Arc::new(AtomicUsize::new(0));
    let (received_tx, received_rx) = std::sync::mpsc::channel();
    {
        let down = Arc::clone(&down);
        let written = Arc::clone(&written);
        std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            cap_buffer(&sock, false, 64 * 1024);
            let mut writer = sock.try_clone().unwrap();
            std::thread::spawn(move || {
                for piece in down.chunks(64 * 1024) {
                    if writer.write_all(piece).is_err() {
                        return;
                    }
                    written.fetch_add(piece.len(), Ordering::SeqCst);
                }
                let _ = writer.shutdown(Shutdown::Write);
            });
            let mut total = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = sock.read(&mut buf) {
                total += n;
            }
            let _ = received_tx.send(total);
        });
    }
    world.db.exec("DELETE FROM backends");
    world.db.upsert(&Row::new("streamer", "web", "sa", port));
    let leaf = world.ca.issue("edge", &["edge.test"]);
    let proxy = world.start(&world.files(&leaf, "edge"));

    let mut c = Client::open(
        proxy.listener("tls"),
        trusting(&world.ca, TLS13, &[]),
        "edge.test",
    );
    cap_buffer(&c.sock, true, 64 * 1024);
    // The download is flowing, and soon stalls: the client reads nothing.
    assert!(
        eventually(PATIENCE, || written.load(Ordering::SeqCst) >= 1 << 20),
        "the download did not start"
    );
    // Upload without reading: blocking writes, PATIENCE each at most.
    let up = pattern(UP, 12);
    for (i, piece) in up.chunks(64 * 1024).enumerate() {
        c.tls.writer().write_all(piece).unwrap();
        while c.tls.wants_write() {
            if let Err(e) = c.tls.write_tls(&mut c.sock) {
                panic!(
                    "upload stalled after {} KiB (download: {} of {DOWN} bytes written by the backend): {e}",
                    i * 64,
                    written.load(Ordering::SeqCst)
                );
            }
        }
    }
    c.tls.send_close_notify();
    c.flush();
    let received = received_rx
        .recv_timeout(PATIENCE)
        .expect("the backend did not see the end of the upload");
    assert_eq!(received, UP);
    // Now the download, complete.
    let (got, _) = c.read_to_close_notify();
    assert_same(&got, &down, "download");
}

// ---------------------------------------------------------------------------
// Protocol versions below 1.2 are refused
// ---------------------------------------------------------------------------

/// A minimal ClientHello offering only `version` (no supported_versions
/// extension, as TLS 1.0/1.1 clients send it), with a signature_algorithms
/// extension (TLS 1.0/1.1 clients do not send one, and rustls refuses a
/// hello without it before looking at the version: with it, the version is
/// what gets refused).
fn legacy_client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version);
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // ECDHE-RSA-AES128-SHA, AES128-SHA
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
                                           // Extensions: signature_algorithms = ecdsa_secp256r1_sha256, rsa_pkcs1_sha256.
    body.extend_from_slice(&[
        0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01,
    ]);
    let mut hello = vec![0x01, 0, (body.len() >> 8) as u8, body.len() as u8];
    hello.extend_from_slice(&body);
    let mut record = vec![
        0x16,
        0x03,
        0x01,
        (hello.len() >> 8) as u8,
        hello.len() as u8,
    ];
    record.extend_from_slice(&hello);
    record
}

#[test]
fn tls10_and_tls11_client_hellos_get_a_protocol_version_alert() {
    let world = World::new("old-versions");
    let leaf = world.ca.issue("edge", &["edge.test"]);
    let proxy = world.start(&world.files(&leaf, "edge"));
    let addr = proxy.listener("tls");
    for (name, version) in [("TLS 1.0", [3, 1]), ("TLS 1.1", [3, 2])] {
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.write_all(&legacy_client_hello(version)).unwrap();
        let answer = read_until_closed(&sock);
        // One alert record: fatal (2), protocol_version (70); then close.
        assert!(
            answer.len() == 7 && answer[0] == 0x15 && answer[5..] == [2, 70],
            "{name}: expected a protocol_version alert, got {answer:02x?}"
        );
    }
    assert_eq!(
        world.backend.accepted(),
        0,
        "a refused handshake cost a backend connection"
    );
}

#[test]
fn openssl_tls11_and_tls10_are_refused_tls12_and_tls13_accepted() {
    let world = World::new("openssl-versions");
    let leaf = world.ca.issue("edge", &["edge.test"]);
    let proxy = world.start(&world.files(&leaf, "edge"));
    let addr = proxy.listener("tls");
    let ca = world.ca.write(&world.dir);
    let ca = ca.to_str().unwrap();
    for flag in ["-tls1", "-tls1_1"] {
        // SECLEVEL=0 lets OpenSSL 3 offer these versions at all, so the
        // refusal has to come from the proxy: a fatal alert in answer to the
        // ClientHello. rustls answers handshake_failure (40) to these hellos
        // (they carry no signature_algorithms extension, which it checks
        // first), protocol_version (70) otherwise.
        let (out, served) = s_client(
            addr,
            &[
                flag,
                "-cipher",
                "DEFAULT@SECLEVEL=0",
                "-servername",
                "edge.test",
            ],
        );
        let all = text(&out);
        assert!(!out.status.success(), "{flag} accepted:\n{all}");
        assert!(served.is_none(), "{flag}: a certificate was served:\n{all}");
        assert!(
            all.contains("SSL alert number 40") || all.contains("SSL alert number 70"),
            "{flag}: no alert from the proxy:\n{all}"
        );
    }
    for (flag, protocol) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (out, served) = s_client(
            addr,
            &[
                flag,
                "-servername",
                "edge.test",
                "-CAfile",
                ca,
                "-verify_return_error",
            ],
        );
        let all = text(&out);
        assert!(out.status.success(), "{flag} refused:\n{all}");
        assert_eq!(served.as_deref(), Some(&leaf.der[..]), "{flag}:\n{all}");
        assert!(
            all.contains(&format!("Protocol  : {protocol}"))
                || all.contains(&format!("New, {protocol}")),
            "{flag}:\n{all}"
        );
    }
}

// ---------------------------------------------------------------------------
// (b) SNI: exact names, wildcard, unknown name and no name → default
// ---------------------------------------------------------------------------

struct SniSetup {
    world: World,
    proxy: Proxy,
    default: Leaf,
    api: Leaf,
    wild: Leaf,
}

/// default.test (the default certificate); api.test (names from its SAN);
/// `*.wild.test` + alias.test (names given in the config).
fn sni_setup(world: World) -> SniSetup {
    let default = world.ca.issue("default", &["default.test"]);
    let api = world.ca.issue("api", &["api.test"]);
    let wild = world.ca.issue("wild", &["*.wild.test", "alias.test"]);
    let (api_cert, api_key) = api.write(&world.dir, "api");
    let (wild_cert, wild_key) = wild.write(&world.dir, "wild");
    let tls = format!(
        "{default}\n[[listener.tls.sni]]\ncert = {}\nkey = {}\n\n\
         [[listener.tls.sni]]\ncert = {}\nkey = {}\nnames = [\"*.wild.test\", \"alias.test\"]\n",
        toml_path(&api_cert),
        toml_path(&api_key),
        toml_path(&wild_cert),
        toml_path(&wild_key),
        default = world.files(&default, "default"),
    );
    let proxy = world.start(&tls);
    SniSetup {
        world,
        proxy,
        default,
        api,
        wild,
    }
}

#[test]
fn sni_picks_the_certificate_with_openssl() {
    let s = sni_setup(World::new("sni-openssl"));
    let addr = s.proxy.listener("tls");
    let ca = s.world.ca.write(&s.world.dir);
    let ca = ca.to_str().unwrap();
    let cases: [(&str, &Leaf, bool); 7] = [
        ("api.test", &s.api, true),
        ("API.Test", &s.api, true),
        ("www.wild.test", &s.wild, true),
        ("alias.test", &s.wild, true),
        ("default.test", &s.default, true),
        // Unknown names get the default certificate (which does not cover
        // them: verification by name would fail, so only the DER is checked).
        ("unknown.test", &s.default, false),
        // A wildcard covers one label.
        ("a.b.wild.test", &s.default, false),
    ];
    for (name, want, verifiable) in cases {
        let mut args = vec!["-servername", name, "-CAfile", ca];
        let host = name.to_ascii_lowercase();
        if verifiable {
            args.extend(["-verify_hostname", host.as_str(), "-verify_return_error"]);
        }
        let (out, served) = s_client(addr, &args);
        let all = text(&out);
        assert!(out.status.success(), "SNI {name}:\n{all}");
        assert_eq!(served.as_deref(), Some(&want.der[..]), "SNI {name}:\n{all}");
        if verifiable {
            assert!(
                all.contains("Verify return code: 0 (ok)"),
                "SNI {name}:\n{all}"
            );
        }
    }
    // No SNI at all: the default.
    let (out, served) = s_client(addr, &["-noservername"]);
    assert_eq!(
        served.as_deref(),
        Some(&s.default.der[..]),
        "{}",
        text(&out)
    );
}

/// QA: a client that sends an IP address as SNI (wrk does, as does `openssl
/// s_client -servername 127.0.0.1`) made rustls log a WARN per connection
/// (`Illegal SNI extension: ignoring IP address presented as hostname`):
/// 25,634 lines in 30 s of `wrk https://127.0.0.1:...`, and any client could
/// flood the log so. rustls ignores such a name: the default certificate is
/// served, and nothing is logged for it.
#[test]
fn an_ip_address_as_sni_gets_the_default_certificate_and_no_warning() {
    let world = World::new("sni-ip");
    let leaf = world.ca.issue("default.test", &["default.test"]);
    let proxy = world.start(&world.files(&leaf, "default"));
    for _ in 0..3 {
        let (out, served) = s_client(proxy.addr(), &["-servername", "127.0.0.1"]);
        assert_eq!(served.as_deref(), Some(&leaf.der[..]), "{}", text(&out));
    }
    // A line logged after the handshakes: what they logged is in by then.
    let mark = proxy.log_mark();
    proxy.signal(SIGHUP);
    assert!(proxy
        .wait_for_log_after(mark, "SIGHUP: re-reading", PATIENCE)
        .is_some());
    let warned: Vec<String> = proxy
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("SNI"))
        .collect();
    assert!(warned.is_empty(), "logged per connection: {warned:?}");
}

#[test]
fn sni_picks_the_certificate_with_rustls() {
    let s = sni_setup(World::new("sni-rustls"));
    let addr = s.proxy.listener("tls");
    let verified = trusting(&s.world.ca, ANY_VERSION, &[]);
    for (name, want) in [
        ("api.test", &s.api),
        ("x.wild.test", &s.wild),
        ("alias.test", &s.wild),
        ("default.test", &s.default),
    ] {
        let mut c = Client::open(addr, Arc::clone(&verified), name);
        assert_eq!(c.served(), want.der, "SNI {name}");
        assert_eq!(c.greeting(), "echo-1");
        c.assert_echo(&format!("via {name}\n"));
    }
    let anything = trusting_anything(ANY_VERSION);
    for (name, want) in [("nobody.test", &s.default), ("127.0.0.1", &s.default)] {
        let c = Client::open(addr, Arc::clone(&anything), name);
        assert_eq!(c.served(), want.der, "SNI {name}");
    }
    // The default certificate does not cover an unknown name: a verifying
    // client refuses it.
    let err = Client::connect(addr, verified, "unknown.test")
        .err()
        .expect("verified");
    assert!(
        matches!(tls_error(&err), Some(rustls::Error::InvalidCertificate(_))),
        "{err}"
    );
}

#[test]
fn curl_verifies_the_sni_certificates_and_gets_the_backend() {
    let world = World::new("curl");
    let http = http_backend("hello from http-1\n");
    world.db.exec("DELETE FROM backends");
    world
        .db
        .upsert(&Row::new("http-1", "web", "sa", http.port()));
    let s = sni_setup(world);
    let addr = s.proxy.listener("tls");
    let ca = s.world.ca.write(&s.world.dir);
    let ca = ca.to_str().unwrap();
    let port = addr.port();
    for (host, extra) in [
        ("api.test", &[][..]),
        ("www.wild.test", &[][..]),
        ("default.test", &["--tlsv1.2", "--tls-max", "1.2"][..]),
        ("api.test", &["--tlsv1.3"][..]),
    ] {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/");
        let mut args = vec!["-sS", "--cacert", ca, "--resolve", &resolve];
        args.extend_from_slice(extra);
        args.push(&url);
        let out = tool("curl", &args);
        assert!(
            out.status.success(),
            "curl {url} {extra:?}:\n{}",
            text(&out)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from http-1\n");
    }
    // An unknown name gets the default certificate, which curl refuses.
    let resolve = format!("unknown.test:{port}:127.0.0.1");
    let url = format!("https://unknown.test:{port}/");
    let out = tool(
        "curl",
        &["-sS", "--cacert", ca, "--resolve", &resolve, &url],
    );
    assert_eq!(out.status.code(), Some(60), "{}", text(&out));
}

// ---------------------------------------------------------------------------
// (c) self-signed mode; EDGEPROXY_TLS_* variables
// ---------------------------------------------------------------------------

#[test]
fn self_signed_listener_serves_a_generated_certificate_for_its_names() {
    let world = World::new("self-signed");
    let proxy =
        world.start("self_signed = true\nself_signed_names = [\"edge.test\", \"*.edge.test\"]\n");
    let addr = proxy.listener("tls");
    let mut first = Client::open(addr, trusting_anything(TLS13), "edge.test");
    let cert = first.served();
    assert!(is_self_issued(&cert));
    assert_eq!(san_names(&cert), ["edge.test", "*.edge.test"]);
    // The subject names the POP by its first name, not rcgen's placeholder
    // ("rcgen self signed cert").
    assert_eq!(
        subject_names(&cert),
        (vec!["edge.test".to_string()], vec!["edgeproxy".to_string()])
    );
    assert_eq!(first.greeting(), "echo-1");
    first.assert_echo("self-signed works\n");

    // Generated once at start: every connection (either version) gets it.
    let second = Client::open(addr, trusting_anything(TLS12), "a.edge.test");
    assert_eq!(second.served(), cert);

    // A client that pins it verifies it for real, names included.
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(cert.clone())).unwrap();
    let pinned = Arc::new(
        ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut c = Client::open(addr, Arc::clone(&pinned), "www.edge.test");
    assert_eq!(c.greeting(), "echo-1");
    assert!(Client::connect(addr, pinned, "other.test").is_err());
}

#[test]
fn self_signed_default_name_is_localhost() {
    let world = World::new("self-signed-default");
    let proxy = world.start("self_signed = true\n");
    let c = Client::open(
        proxy.listener("tls"),
        trusting_anything(ANY_VERSION),
        "localhost",
    );
    assert_eq!(san_names(&c.served()), ["localhost"]);
    assert_eq!(subject_names(&c.served()).0, ["localhost"]);
}

/// The original edgeProxy's variables alone (no config file): TLS on with no
/// certificate → a second listener, "tls", with a self-signed certificate.
#[test]
fn tls_enabled_env_without_files_adds_a_self_signed_listener() {
    let world = World::new("env-self-signed");
    let db = world.db.path.to_str().unwrap();
    let proxy = Proxy::start(
        &[],
        &[
            ("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0"),
            ("EDGEPROXY_DB_PATH", db),
            ("EDGEPROXY_TLS_ENABLED", "true"),
            ("EDGEPROXY_TLS_LISTEN_ADDR", "127.0.0.1:0"),
        ],
    );
    assert_eq!(proxy.listeners.len(), 2, "{:?}", proxy.listeners);
    let line = proxy.wait_for_log("listener=tls", PATIENCE).unwrap();
    assert!(line.contains("tls=true"), "{line}");

    let mut c = Client::open(proxy.listener("tls"), trusting_anything(TLS13), "localhost");
    assert!(is_self_issued(&c.served()));
    assert_eq!(san_names(&c.served()), ["localhost"]);
    assert_eq!(c.greeting(), "echo-1");
    c.assert_echo("env tls\n");
    // The plain listener still speaks plain TCP.
    assert_eq!(which_backend(proxy.listener("default")), "echo-1");
}

#[test]
fn tls_env_defaults_to_port_8443_and_takes_cert_and_key_files() {
    let (status, stdout, stderr) = run_to_end(
        &["check-config", "--no-bind"],
        &[("EDGEPROXY_TLS_ENABLED", "1")],
    );
    assert!(status.success(), "{stderr}");
    let t: toml::Table = toml::from_str(&stdout).unwrap();
    let tls = t["listener"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"].as_str() == Some("tls"))
        .unwrap_or_else(|| panic!("no tls listener:\n{stdout}"));
    assert_eq!(tls["addr"].as_str(), Some("0.0.0.0:8443"));

    let world = World::new("env-files");
    let leaf = world.ca.issue("env", &["env.test"]);
    let (cert, key) = leaf.write(&world.dir, "env");
    let proxy = Proxy::start(
        &[],
        &[
            ("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0"),
            ("EDGEPROXY_DB_PATH", world.db.path.to_str().unwrap()),
            ("EDGEPROXY_TLS_ENABLED", "true"),
            ("EDGEPROXY_TLS_LISTEN_ADDR", "127.0.0.1:0"),
            ("EDGEPROXY_TLS_CERT", cert.to_str().unwrap()),
            ("EDGEPROXY_TLS_KEY", key.to_str().unwrap()),
        ],
    );
    let mut c = Client::open(
        proxy.listener("tls"),
        trusting(&world.ca, ANY_VERSION, &[]),
        "env.test",
    );
    assert_eq!(c.served(), leaf.der);
    assert_eq!(c.greeting(), "echo-1");
}

/// What `check-config` prints for a TLS listener is a configuration file:
/// fed back, it is accepted and means the same.
#[test]
fn check_config_prints_tls_keys_that_read_back() {
    let world = World::new("tls-check-config");
    let default = world.ca.issue("default", &["default.test"]);
    let api = world.ca.issue("api", &["api.test"]);
    let (api_cert, api_key) = api.write(&world.dir, "api");
    let file_tls = format!(
        "{}alpn = [\"h2\", \"http/1.1\"]\nhandshake_timeout_ms = 2500\n\n\
         [[listener.tls.sni]]\ncert = {}\nkey = {}\nnames = [\"api.test\"]\n",
        world.files(&default, "default"),
        toml_path(&api_cert),
        toml_path(&api_key),
    );
    for (tag, tls) in [
        ("files", file_tls.as_str()),
        (
            "self-signed",
            "self_signed = true\nself_signed_names = [\"a.test\"]\n",
        ),
    ] {
        let path = world.dir.join(&format!("{tag}.toml"));
        std::fs::write(&path, world.config(100, tls)).unwrap();
        let path = path.to_str().unwrap();
        let (status, first, stderr) = run_to_end(&["check-config", "--config", path], &[]);
        assert!(status.success(), "{tag}: {stderr}");
        let printed = world.dir.join(&format!("{tag}-printed.toml"));
        std::fs::write(&printed, &first).unwrap();
        let (status, second, stderr) = run_to_end(
            &["check-config", "--config", printed.to_str().unwrap()],
            &[],
        );
        assert!(
            status.success(),
            "{tag}: printed config rejected: {stderr}\n{first}"
        );
        assert_eq!(first, second, "{tag}");
        let t: toml::Table = toml::from_str(&first).unwrap();
        let tls = t["listener"][0]["tls"].as_table().unwrap();
        if tag == "files" {
            assert_eq!(
                tls["handshake_timeout_ms"].as_integer(),
                Some(2500),
                "{first}"
            );
            assert_eq!(tls["alpn"].as_array().unwrap().len(), 2, "{first}");
            assert_eq!(
                tls["sni"][0]["names"][0].as_str(),
                Some("api.test"),
                "{first}"
            );
        } else {
            assert_eq!(tls["self_signed"].as_bool(), Some(true), "{first}");
        }
    }
}

// ---------------------------------------------------------------------------
// (d) rotation with connections open; (e) broken files
// ---------------------------------------------------------------------------

#[test]
fn certificate_files_replaced_rotate_without_dropping_connections() {
    let world = World::new("rotate-files");
    let old = world.ca.issue("old", &["rot.test"]);
    let api = world.ca.issue("api", &["api.test"]);
    let (cert, key) = old.write(&world.dir, "rot");
    let (api_cert, api_key) = api.write(&world.dir, "api");
    let proxy = world.start(&format!(
        "cert = {}\nkey = {}\n\n[[listener.tls.sni]]\ncert = {}\nkey = {}\n",
        toml_path(&cert),
        toml_path(&key),
        toml_path(&api_cert),
        toml_path(&api_key)
    ));
    let addr = proxy.listener("tls");
    let config = trusting(&world.ca, ANY_VERSION, &[]);

    let mut open13 = Client::open(addr, trusting(&world.ca, TLS13, &[]), "rot.test");
    let mut open12 = Client::open(addr, trusting(&world.ca, TLS12, &[]), "rot.test");
    for c in [&mut open13, &mut open12] {
        assert_eq!(c.served(), old.der);
        assert_eq!(c.greeting(), "echo-1");
        c.assert_echo("before\n");
    }

    let new = world.ca.issue("new", &["rot.test"]);
    let mark = proxy.log_mark();
    new.install(&cert, &key);
    proxy
        .wait_for_log_after(mark, "tls certificates reloaded", PATIENCE)
        .unwrap_or_else(|| panic!("no reload; log:\n{}", proxy.log_text()));

    // Open connections go on, both ways.
    for c in [&mut open13, &mut open12] {
        c.assert_echo("after the rotation\n");
    }
    // New connections get the new certificate; the SNI one is unchanged.
    let fresh = Client::open(addr, Arc::clone(&config), "rot.test");
    assert_eq!(fresh.served(), new.der);
    assert_eq!(Client::open(addr, config, "api.test").served(), api.der);

    for c in [&mut open13, &mut open12] {
        let back = c.transfer(b"bye\n", true, 4, PATIENCE);
        assert_eq!(back, b"bye\n");
    }
}

#[test]
fn sighup_rotates_certificates_without_dropping_connections() {
    let world = World::new("rotate-hup");
    let old = world.ca.issue("old", &["hup.test"]);
    let (cert, key) = old.write(&world.dir, "hup");
    // Files are checked once an hour: only SIGHUP can rotate here.
    let tls = format!("cert = {}\nkey = {}\n", toml_path(&cert), toml_path(&key));
    let proxy = Proxy::with_config(&world.dir, &world.config(3_600_000, &tls));
    let addr = proxy.listener("tls");
    let config = trusting(&world.ca, ANY_VERSION, &[]);

    let mut open = Client::open(addr, Arc::clone(&config), "hup.test");
    assert_eq!(open.served(), old.der);
    assert_eq!(open.greeting(), "echo-1");

    let new = world.ca.issue("new", &["hup.test"]);
    new.install(&cert, &key);
    // Not yet: nothing looked at the files.
    assert_eq!(
        Client::open(addr, Arc::clone(&config), "hup.test").served(),
        old.der
    );

    let mark = proxy.log_mark();
    proxy.signal(SIGHUP);
    proxy
        .wait_for_log_after(mark, "tls certificates reloaded", PATIENCE)
        .unwrap_or_else(|| panic!("no reload on SIGHUP; log:\n{}", proxy.log_text()));
    open.assert_echo("still here after SIGHUP\n");
    assert_eq!(Client::open(addr, config, "hup.test").served(), new.der);
    assert_eq!(open.transfer(b"bye\n", true, 4, PATIENCE), b"bye\n");
}

#[test]
fn broken_certificate_files_at_start_are_named_and_exit_non_zero() {
    let world = World::new("broken-start");
    let good = world.ca.issue("good", &["good.test"]);
    let other = world.ca.issue("other", &["other.test"]);
    let (cert, key) = good.write(&world.dir, "good");
    let garbage = world.dir.join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    let missing = world.dir.join("missing.key");
    let (_, other_key) = other.write(&world.dir, "other");
    let cases = [
        ("garbage cert", &garbage, &key, vec![&garbage]),
        ("missing key", &cert, &missing, vec![&missing]),
        (
            "key of another certificate",
            &cert,
            &other_key,
            vec![&cert, &other_key],
        ),
    ];
    for (what, c, k, named) in cases {
        let tls = format!("cert = {}\nkey = {}\n", toml_path(c), toml_path(k));
        let mut proxy = Proxy::spawn_with_config(&world.dir, &world.config(100, &tls));
        let status = proxy
            .wait_exit(PATIENCE)
            .unwrap_or_else(|| panic!("{what}: still running; log:\n{}", proxy.log_text()));
        let log = proxy.log_text();
        assert!(!status.success(), "{what}: exit {status}; log:\n{log}");
        for path in named {
            assert!(
                log.contains(path.to_str().unwrap()),
                "{what}: {} not named; log:\n{log}",
                path.display()
            );
        }
        assert!(!log.contains("edgeproxy ready"), "{what}:\n{log}");
    }
}

#[test]
fn broken_file_at_rotation_keeps_the_previous_certificate() {
    let world = World::new("broken-rotation");
    let old = world.ca.issue("old", &["keep.test"]);
    let (cert, key) = old.write(&world.dir, "keep");
    let proxy = world.start(&format!(
        "cert = {}\nkey = {}\n",
        toml_path(&cert),
        toml_path(&key)
    ));
    let addr = proxy.listener("tls");
    let config = trusting(&world.ca, ANY_VERSION, &[]);
    let mut open = Client::open(addr, Arc::clone(&config), "keep.test");
    assert_eq!(open.greeting(), "echo-1");

    let mark = proxy.log_mark();
    replace_file(
        &cert,
        b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    );
    let line = proxy
        .wait_for_log_after(
            mark,
            "cannot reload tls certificates; keeping the previous ones",
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("no error logged; log:\n{}", proxy.log_text()));
    assert!(
        line.contains(cert.to_str().unwrap()),
        "file not named: {line}"
    );
    assert!(proxy
        .log_lines_after(mark, "tls certificates reloaded")
        .is_empty());
    assert_eq!(
        Client::open(addr, Arc::clone(&config), "keep.test").served(),
        old.der
    );
    open.assert_echo("unaffected\n");

    // Fixed files are picked up.
    let new = world.ca.issue("new", &["keep.test"]);
    let mark = proxy.log_mark();
    new.install(&cert, &key);
    proxy
        .wait_for_log_after(mark, "tls certificates reloaded", PATIENCE)
        .unwrap_or_else(|| panic!("no reload; log:\n{}", proxy.log_text()));
    assert_eq!(Client::open(addr, config, "keep.test").served(), new.der);
}

/// An expired certificate renamed over a valid one (a wrong file, a stale
/// copy) is refused like a broken file: the valid one keeps serving. QA:
/// it was swapped in with "tls certificates reloaded", and every client
/// that checks dates was refused from then on.
#[test]
fn an_expired_certificate_at_rotation_keeps_the_previous_one() {
    let world = World::new("expired-rotation");
    let old = world.ca.issue("old", &["exp.test"]);
    let (cert, key) = old.write(&world.dir, "exp");
    let proxy = world.start(&format!(
        "cert = {}\nkey = {}\n",
        toml_path(&cert),
        toml_path(&key)
    ));
    let addr = proxy.listener("tls");
    let config = trusting(&world.ca, ANY_VERSION, &[]);

    let mark = proxy.log_mark();
    world.ca.issue_expired(&["exp.test"]).install(&cert, &key);
    let line = proxy
        .wait_for_log_after(
            mark,
            "cannot reload tls certificates; keeping the previous ones",
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("no error logged; log:\n{}", proxy.log_text()));
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(&format!("certificate {} expired on", cert.display())),
        "{line}"
    );
    assert!(proxy
        .log_lines_after(mark, "tls certificates reloaded")
        .is_empty());
    // A client that checks dates still gets the valid certificate.
    let client = Client::open(addr, Arc::clone(&config), "exp.test");
    assert_eq!(client.served(), old.der);

    // So does SIGHUP, which re-reads every file.
    let mark = proxy.log_mark();
    proxy.signal(SIGHUP);
    proxy
        .wait_for_log_after(
            mark,
            "cannot reload tls certificates; keeping the previous ones",
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("no error logged; log:\n{}", proxy.log_text()));
    assert_eq!(Client::open(addr, config, "exp.test").served(), old.der);
}

/// A binary upgrade is not a start with nothing to keep: the old process
/// serves a valid certificate, so the new one refuses an expired one found
/// on disk, the upgrade fails naming it, and the old process keeps serving.
#[test]
fn an_upgrade_does_not_swap_a_valid_certificate_for_an_expired_one() {
    let world = World::new("expired-upgrade");
    let old = world.ca.issue("old", &["up.test"]);
    let (cert, key) = old.write(&world.dir, "up");
    // Files are checked once an hour: the upgrade is the first to read them.
    let tls = format!("cert = {}\nkey = {}\n", toml_path(&cert), toml_path(&key));
    let proxy = Proxy::with_config(&world.dir, &world.config(3_600_000, &tls));
    let addr = proxy.listener("tls");
    world.ca.issue_expired(&["up.test"]).install(&cert, &key);

    let control = world.dir.join("edgeproxy.sock");
    let (status, out, err) = run_to_end(&["upgrade", "--socket", control.to_str().unwrap()], &[]);
    assert!(!status.success(), "upgraded: {out}{err}");
    assert!(
        err.contains("upgrade failed, the running proxy keeps serving"),
        "{err}"
    );
    assert!(
        err.contains(&format!("certificate {} expired on", cert.display())),
        "{err}"
    );
    let config = trusting(&world.ca, ANY_VERSION, &[]);
    assert_eq!(Client::open(addr, config, "up.test").served(), old.der);
}

/// The pid in `edgeproxy upgrade`'s "upgraded: the new process (pid N)".
fn upgraded_pid(out: &str) -> u32 {
    out.split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"))
}

/// A process serving an expired certificate (it had no other at its start)
/// has no valid one to lose: an upgrade goes through with the same expired
/// file on disk (a binary upgrade is not held hostage by the certificate),
/// and then with a valid one, which the new process serves. QA: both were
/// refused, the expired certificate the running process served itself
/// blocking every way out by upgrade.
#[test]
fn an_upgrade_from_an_expired_certificate_is_not_refused() {
    let world = World::new("expired-upgrade-out");
    let expired = world.ca.issue_expired(&["out.test"]);
    let (cert, key) = expired.write(&world.dir, "out");
    // Files are checked once an hour: only the upgrades read them.
    let tls = format!("cert = {}\nkey = {}\n", toml_path(&cert), toml_path(&key));
    let proxy = Proxy::with_config(&world.dir, &world.config(3_600_000, &tls));
    let addr = proxy.listener("tls");
    let control = world.dir.join("edgeproxy.sock");
    let upgrade = || {
        let mark = proxy.log_mark();
        let (status, out, err) =
            run_to_end(&["upgrade", "--socket", control.to_str().unwrap()], &[]);
        assert!(
            status.success(),
            "refused: {out}{err}\nlog:\n{}",
            proxy.log_text()
        );
        let new = KillOnDrop(upgraded_pid(&out));
        proxy
            .wait_for_log_after(mark, "upgrade: stopped accepting", PATIENCE)
            .unwrap_or_else(|| panic!("old process did not stop; log:\n{}", proxy.log_text()));
        (new, mark)
    };

    let (_first, mark) = upgrade();
    let line = proxy
        .wait_for_log_after(mark, "serving an expired certificate", PATIENCE)
        .unwrap_or_else(|| panic!("no warning; log:\n{}", proxy.log_text()));
    assert!(line.contains(cert.to_str().unwrap()), "{line}");
    let served = Client::open(addr, trusting_anything(ANY_VERSION), "out.test").served();
    assert_eq!(served, expired.der);

    let valid = world.ca.issue("valid", &["out.test"]);
    valid.install(&cert, &key);
    let (_second, _) = upgrade();
    let config = trusting(&world.ca, ANY_VERSION, &[]);
    assert_eq!(Client::open(addr, config, "out.test").served(), valid.der);
}

/// At start there is no other certificate to keep: an expired one is
/// served, with a warning naming it, and `check-config` warns too.
#[test]
fn an_expired_certificate_at_start_is_served_with_a_warning() {
    let world = World::new("expired-start");
    let expired = world.ca.issue_expired(&["exp.test"]);
    let (cert, _) = expired.write(&world.dir, "exp");
    let tls = world.files(&expired, "exp");
    let path = world.dir.join("edgeproxy.toml");
    std::fs::write(&path, world.config(100, &tls)).unwrap();

    let (status, _, stderr) = run_to_end(
        &[
            "check-config",
            "--no-bind",
            "--config",
            path.to_str().unwrap(),
        ],
        &[],
    );
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "edgeproxy: warning: listener \"tls\": certificate {} expired on",
            cert.display()
        )),
        "{stderr}"
    );

    let proxy = Proxy::with_config(&world.dir, &world.config(100, &tls));
    let line = proxy
        .wait_for_log("serving an expired certificate", PATIENCE)
        .unwrap_or_else(|| panic!("no warning; log:\n{}", proxy.log_text()));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(cert.to_str().unwrap()), "{line}");
    // Served: a client that does not check dates gets it.
    let client = Client::open(
        proxy.listener("tls"),
        trusting_anything(ANY_VERSION),
        "exp.test",
    );
    assert_eq!(client.served(), expired.der);
}

// ---------------------------------------------------------------------------
// (f) handshake timeout
// ---------------------------------------------------------------------------

#[test]
fn silent_and_stalled_handshakes_are_closed_after_the_timeout() {
    let world = World::new("hs-timeout");
    let leaf = world.ca.issue("edge", &["edge.test"]);
    let proxy = world.start(&format!(
        "{}handshake_timeout_ms = 500\n",
        world.files(&leaf, "edge")
    ));
    let addr = proxy.listener("tls");

    // Connects and sends nothing.
    let start = Instant::now();
    let silent = TcpStream::connect(addr).unwrap();
    let got = read_until_closed(&silent);
    let waited = start.elapsed();
    assert!(got.is_empty(), "{got:?}");
    assert!(
        waited >= Duration::from_millis(450),
        "closed after {waited:?}"
    );

    // Sends the start of a ClientHello, then stalls.
    let start = Instant::now();
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled
        .write_all(&legacy_client_hello([3, 3])[..20])
        .unwrap();
    let got = read_until_closed(&stalled);
    let waited = start.elapsed();
    assert!(got.is_empty(), "{got:?}");
    assert!(
        waited >= Duration::from_millis(450),
        "closed after {waited:?}"
    );
    assert_eq!(world.backend.accepted(), 0);

    // The timeout covers the handshake only: an established connection may
    // stay quiet longer.
    let mut c = Client::open(addr, trusting(&world.ca, ANY_VERSION, &[]), "edge.test");
    assert_eq!(c.greeting(), "echo-1");
    std::thread::sleep(Duration::from_millis(1200));
    c.assert_echo("still open\n");
}

// ---------------------------------------------------------------------------
// (g) ALPN
// ---------------------------------------------------------------------------

#[test]
fn alpn_is_negotiated() {
    let world = World::new("alpn");
    let leaf = world.ca.issue("edge", &["edge.test"]);
    let proxy = world.start(&format!(
        "{}alpn = [\"h2\", \"http/1.1\"]\n",
        world.files(&leaf, "edge")
    ));
    let addr = proxy.listener("tls");
    for versions in [TLS13, TLS12] {
        let mut c = Client::open(
            addr,
            trusting(&world.ca, versions, &["http/1.1"]),
            "edge.test",
        );
        assert_eq!(c.alpn().as_deref(), Some("http/1.1"));
        assert_eq!(c.greeting(), "echo-1");
        c.assert_echo("GET / HTTP/1.1\r\n\r\n");
        // The server's order wins.
        let c = Client::open(
            addr,
            trusting(&world.ca, versions, &["http/1.1", "h2"]),
            "edge.test",
        );
        assert_eq!(c.alpn().as_deref(), Some("h2"));
        // A client without ALPN still connects.
        let c = Client::open(addr, trusting(&world.ca, versions, &[]), "edge.test");
        assert_eq!(c.alpn(), None);
    }
    // No protocol in common: refused.
    let err = Client::connect(addr, trusting(&world.ca, TLS13, &["spdy/3"]), "edge.test")
        .err()
        .expect("handshake without a common protocol");
    assert!(
        matches!(
            tls_error(&err),
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol
            ))
        ),
        "{err}"
    );
}

/// Operations QA: nothing said when a served certificate was about to
/// expire. `edgeproxy_tls_certificate_expiry_timestamp_seconds` gives each
/// certificate file's end of validity, per listener, and follows a
/// rotation (Prometheus alerts on it minus `time()`).
#[test]
fn certificate_expiry_is_a_metric_that_follows_rotation() {
    let world = World::new("expiry-metric");
    let issue_until = |year: i32, month: u8, day: u8| {
        world
            .ca
            .issue_valid(&["exp.test"], (2025, 1, 1), (year, month, day))
    };
    let (cert, key) = issue_until(2031, 1, 1).write(&world.dir, "exp");
    let text = format!(
        "{}\n[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n",
        world.config(
            100,
            &format!("cert = {}\nkey = {}\n", toml_path(&cert), toml_path(&key))
        )
    );
    let proxy = Proxy::with_config(&world.dir, &text);
    let metrics = proxy.metrics_addr();
    let series = format!(
        "edgeproxy_tls_certificate_expiry_timestamp_seconds{{listener=\"tls\",cert=\"{}\"}}",
        cert.display()
    );
    let expiry = || sample(&http_get(metrics, "/metrics").1, &series);
    // Days since the Unix epoch of a civil date (Howard Hinnant's algorithm).
    let unix = |y: i64, m: i64, d: i64| {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        ((era * 146_097 + doe - 719_468) * 86_400) as f64
    };
    assert_eq!(
        expiry(),
        Some(unix(2031, 1, 1)),
        "{}",
        http_get(metrics, "/metrics").1
    );

    let mark = proxy.log_mark();
    issue_until(2032, 6, 1).install(&cert, &key);
    proxy
        .wait_for_log_after(mark, "tls certificates reloaded", PATIENCE)
        .unwrap_or_else(|| panic!("not rotated; log:\n{}", proxy.log_text()));
    assert_eq!(expiry(), Some(unix(2032, 6, 1)));
}

/// Operations QA: a listener's failed TLS handshakes were counted as
/// `reason="other"` with bad PROXY headers and missing backends, and its
/// idle timeouts too, though those connections were served. Each reason is
/// its own series now, and an idle timeout is none of them.
#[test]
fn a_listeners_rejections_are_counted_by_reason_and_idle_timeouts_are_not() {
    let world = World::new("rejected-by-reason");
    let text = format!(
        "{}\n[limits]\nidle_timeout_secs = 1\n[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n",
        world.config(100, "self_signed = true\nself_signed_names = [\"r.test\"]\n")
    );
    let proxy = Proxy::with_config(&world.dir, &text);
    let metrics = proxy.metrics_addr();
    let addr = proxy.listener("tls");
    let rejected = |reason: &str| {
        sample(
            &http_get(metrics, "/metrics").1,
            &format!(
                "edgeproxy_listener_connections_rejected_total{{listener=\"tls\",reason=\"{reason}\"}}"
            ),
        )
    };
    // Not TLS at all: the handshake fails.
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    garbage.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = garbage.read_to_end(&mut Vec::new());
    assert!(
        eventually(PATIENCE, || rejected("tls_handshake") == Some(1.0)),
        "{}",
        http_get(metrics, "/metrics").1
    );
    // A served connection left idle until the proxy closes it.
    let mut idle = Client::open(addr, trusting_anything(ANY_VERSION), "r.test");
    idle.greeting();
    assert!(
        eventually(PATIENCE, || sample(
            &http_get(metrics, "/metrics").1,
            "edgeproxy_idle_timeouts_total"
        ) == Some(1.0)),
        "not closed for idleness"
    );
    drop(idle);
    for reason in ["proxy_header", "no_backend", "client_limit"] {
        assert_eq!(rejected(reason), Some(0.0), "{reason}");
    }
    assert_eq!(rejected("tls_handshake"), Some(1.0));
}
