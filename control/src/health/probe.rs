//! The checks themselves: one async function per kind, each bounded by the
//! check's timeout, run as tasks on the control thread's Tokio runtime (no
//! thread per check). Each returns a [`CheckOutcome`]: success with the time
//! to the answer, or failure with a reason an operator can act on. A check
//! that cannot run on this host (out of local ports, descriptors or memory)
//! says so, and nothing of the backend (QA: such failures took healthy
//! backends down while the proxy ran short of descriptors).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::core::CheckOrder;
use super::spec::{CheckKind, CheckSettings};
use super::state::CheckOutcome;

/// Most of an HTTP body read while looking for `body_contains`.
pub const MAX_BODY: usize = 64 * 1024;

/// How late a check's timeout may fire before the wait counts as time this
/// process did not run (see [`run`]).
const LATE_TIMEOUT: Duration = Duration::from_millis(100);

/// Runs `order`'s check to completion or to its timeout.
///
/// A timeout that fires more than [`LATE_TIMEOUT`] after it was due came
/// while this process did not run: it was stopped (SIGSTOP, a debugger),
/// its VM paused (a live migration) or the control thread starved. The
/// backend's answer may be waiting in the socket, read by nobody (an HTTP
/// answer goes through hyper's connection task, which may run after the
/// check's timer): so the check gets its timeout again, counted from now,
/// instead of a failure for time it never had. (Seen: a check in flight
/// across a SIGSTOP failed on resume with "timed out", and with
/// `unhealthy_threshold = 1` took its backend out.)
pub async fn run(order: &CheckOrder) -> CheckOutcome {
    let s = &order.settings;
    let started = Instant::now();
    let step = Step::default();
    let mut checking = std::pin::pin!(check(order, &step));
    let mut result = tokio::time::timeout(s.timeout, checking.as_mut()).await;
    let waited = started.elapsed();
    let late = waited.saturating_sub(s.timeout);
    // The time to the answer, unless the wait took in time nobody ran (an
    // answer read after its timeout was due was read late too).
    let mut rtt = (late <= LATE_TIMEOUT).then_some(waited);
    if result.is_err() && late > LATE_TIMEOUT {
        tracing::debug!(backend = %order.addr, late_ms = late.as_millis() as u64,
            "health check's timeout fired late (this process did not run): given its timeout again");
        result = tokio::time::timeout(s.timeout, checking).await;
        rtt = None;
    }
    let (ok, error, local) = match result {
        Ok(Ok(())) => (true, None, false),
        Ok(Err(Failed::Backend(reason))) => (false, Some(reason), false),
        Ok(Err(Failed::Here(reason))) => (false, Some(reason), true),
        Err(_) => (
            false,
            Some(format!(
                "timed out after {} ms {}",
                s.timeout.as_millis(),
                step.at().what()
            )),
            false,
        ),
    };
    CheckOutcome {
        ok,
        rtt,
        error,
        local,
    }
}

/// Why a check did not pass.
#[derive(Debug)]
enum Failed {
    /// The backend's answer, or its silence.
    Backend(String),
    /// This host's resources: the check could not run.
    Here(String),
}

impl From<String> for Failed {
    fn from(reason: String) -> Self {
        Failed::Backend(reason)
    }
}

/// How far a check got, for the reason of one that times out: a connect
/// nobody answers (a host or a network gone, SYNs dropped, a full accept
/// queue) is not a service that accepts and never answers (QA: both said
/// only "timed out after N ms").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum At {
    Connecting,
    TlsHandshake,
    HttpAnswer,
    HttpBody,
    GrpcAnswer,
    Script,
}

impl At {
    const ALL: [At; 6] = [
        At::Connecting,
        At::TlsHandshake,
        At::HttpAnswer,
        At::HttpBody,
        At::GrpcAnswer,
        At::Script,
    ];

    fn what(self) -> &'static str {
        match self {
            At::Connecting => "connecting (the connect was not answered)",
            At::TlsHandshake => "in the TLS handshake (connected)",
            At::HttpAnswer => "waiting for the HTTP answer (connected)",
            At::HttpBody => "reading the HTTP body (answered)",
            At::GrpcAnswer => "waiting for the gRPC answer (connected)",
            At::Script => "(the script still ran: killed)",
        }
    }
}

/// The step a check is at; read once the timeout has dropped it.
#[derive(Debug, Default)]
struct Step(std::sync::atomic::AtomicU8);

impl Step {
    fn set(&self, at: At) {
        self.0.store(at as u8, std::sync::atomic::Ordering::Relaxed);
    }

    fn at(&self) -> At {
        let n = self.0.load(std::sync::atomic::Ordering::Relaxed);
        At::ALL.get(n as usize).copied().unwrap_or(At::Connecting)
    }
}

async fn check(order: &CheckOrder, step: &Step) -> Result<(), Failed> {
    let s = &order.settings;
    match s.kind {
        CheckKind::Tcp => tcp(order.addr).await,
        CheckKind::Http => {
            let stream = connect(order.addr).await?;
            Ok(http(stream, order.addr, s, step).await?)
        }
        CheckKind::Https => {
            let stream = connect(order.addr).await?;
            step.set(At::TlsHandshake);
            let tls = tls_connect(stream, order.addr, s).await?;
            Ok(http(tls, order.addr, s, step).await?)
        }
        CheckKind::Grpc => Ok(grpc(order.addr, s, step).await?),
        CheckKind::Script => {
            step.set(At::Script);
            script(order, s).await
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, Failed> {
    TcpStream::connect(addr).await.map_err(|e| {
        let reason = format!("connect: {e}");
        match engine::passive::is_local_failure(&e) {
            true => Failed::Here(reason),
            false => Failed::Backend(reason),
        }
    })
}

/// A connect that completes. Closed with a reset (SO_LINGER 0), as HAProxy
/// does: no TIME_WAIT left behind on either side for each check, and one
/// segment instead of a FIN exchange.
async fn tcp(addr: SocketAddr) -> Result<(), Failed> {
    let stream = connect(addr).await?;
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
    Ok(())
}

async fn http<S>(stream: S, addr: SocketAddr, s: &CheckSettings, step: &Step) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    step.set(At::HttpAnswer);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake: {}", chain(&e)))?;
    // The connection task ends with the check (dropped with this future).
    let conn = tokio::spawn(conn);
    let host = s.host.clone().unwrap_or_else(|| addr.ip().to_string());
    let req = hyper::Request::get(s.path.as_str())
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "edgeproxy-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let outcome = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("http: {}", chain(&e)))?;
        let status = resp.status().as_u16();
        if !s.expected_status.contains(status) {
            return Err(format!(
                "http status {status}, expected {}",
                s.expected_status
            ));
        }
        if let Some(needle) = &s.body_contains {
            step.set(At::HttpBody);
            let mut body = resp.into_body();
            let mut seen: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("http body: {}", chain(&e)))?;
                if let Some(data) = frame.data_ref() {
                    seen.extend_from_slice(data);
                    if contains(&seen, needle.as_bytes()) {
                        return Ok(());
                    }
                    if seen.len() >= MAX_BODY {
                        break;
                    }
                }
            }
            return Err(format!("body does not contain {needle:?}"));
        }
        Ok(())
    }
    .await;
    conn.abort();
    outcome
}

/// An error and its causes: a library's own words ("connection error",
/// "transport error") say nothing an operator can act on, the cause
/// ("Connection reset by peer") does (QA: reasons stopped at the former).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let words = cause.to_string();
        if !text.contains(&words) {
            text.push_str(": ");
            text.push_str(&words);
        }
        source = cause.source();
    }
    text
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

async fn tls_connect(
    stream: TcpStream,
    addr: SocketAddr,
    s: &CheckSettings,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let name = match &s.host {
        Some(host) => rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("tls server name {host:?}: {e}"))?,
        None => rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
    };
    tokio_rustls::TlsConnector::from(tls_config())
        .connect(name, stream)
        .await
        .map_err(|e| format!("tls: {}", chain(&e)))
}

/// One client config for every HTTPS check: built once.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Arc::new(config)
    }))
}

/// Accepts any certificate: a health check asks whether the service
/// answers, sends nothing secret, and backends on the private network often
/// have certificates no public root signs. Signatures are still checked, so
/// the handshake itself is a real one.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `grpc.health.v1.Health/Check` for the configured service, with the
/// `tonic-health` client; SERVING is healthy, anything else is not.
async fn grpc(addr: SocketAddr, s: &CheckSettings, step: &Step) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    // No timeouts of tonic's own: `run`'s bounds the whole check, says the
    // step it stopped at, and is given again when it fired while this
    // process did not run; one of the same length inside raced with it and
    // failed such a check as "timeout expired".
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("grpc endpoint: {e}"))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("grpc connect: {}", chain(&e)))?;
    step.set(At::GrpcAnswer);
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: s.grpc_service.clone(),
        })
        .await
        // The status's own words ("Unknown error", "transport error") and
        // then its causes: what was wrong with the answer.
        .map_err(|e| {
            let mut reason = format!("grpc: {} {}", e.code(), e.message());
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                let words = cause.to_string();
                if !reason.contains(&words) {
                    reason.push_str(": ");
                    reason.push_str(&words);
                }
                source = cause.source();
            }
            reason
        })?;
    let status = reply.into_inner().status;
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("grpc status {}", other.as_str_name())),
        Err(_) => Err(format!("grpc status {status}")),
    }
}

/// The operator's command, with the backend in its environment. Killed (the
/// whole process group) when the check times out: `kill_on_drop` fires when
/// the timeout drops this future.
async fn script(order: &CheckOrder, s: &CheckSettings) -> Result<(), Failed> {
    let command = s.command.as_deref().unwrap_or("false");
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("EDGEPROXY_BACKEND_ADDR", order.addr.to_string())
        .env("EDGEPROXY_BACKEND_IP", order.addr.ip().to_string())
        .env("EDGEPROXY_BACKEND_PORT", order.addr.port().to_string())
        .env("EDGEPROXY_BACKEND_ID", &*order.id)
        .env("EDGEPROXY_BACKEND_APP", &*order.app)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            let reason = format!("cannot run {command:?}: {e}");
            // No descriptor, memory or process slot for it here.
            let here =
                engine::passive::is_local_failure(&e) || e.raw_os_error() == Some(libc::EAGAIN);
            match here {
                true => Failed::Here(reason),
                false => Failed::Backend(reason),
            }
        })?;
    let pgid = child.id();
    let guard = GroupKill(pgid);
    let status = child.wait().await.map_err(|e| format!("wait: {e}"))?;
    std::mem::forget(guard);
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(format!("script exited with {code}").into()),
        None => Err(Failed::Backend("script killed by a signal".into())),
    }
}

/// Kills a script's process group when the check is dropped (timed out), so
/// children the shell started die with it.
struct GroupKill(Option<u32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: a plain syscall; the group is the one this check made.
            unsafe {
                libc::kill(-(pgid as i32), libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_reads_back_as_itself() {
        let step = Step::default();
        assert_eq!(step.at(), At::Connecting);
        for at in At::ALL {
            step.set(at);
            assert_eq!(step.at(), at);
        }
    }

    #[test]
    fn a_reason_names_the_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connection error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let reset = || std::io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(
            chain(&Outer(reset())),
            format!("connection error: {}", reset())
        );
        // A cause already in the words is not repeated.
        assert_eq!(chain(&reset()), reset().to_string());
    }

    /// A gRPC check against what is no HTTP/2 server: `bytes` answered
    /// to the first connection, left open until the check is done.
    async fn grpc_against(bytes: &'static [u8]) -> CheckOutcome {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request).await;
            let _ = conn.write_all(bytes).await;
            // Open until the check is done with it.
            let _ = conn.read(&mut request).await;
        });
        let order = CheckOrder {
            id: "b-1".into(),
            app: "web".into(),
            addr,
            settings: Arc::new(CheckSettings {
                kind: CheckKind::Grpc,
                timeout: Duration::from_secs(5),
                ..CheckSettings::default()
            }),
        };
        let outcome = run(&order).await;
        server.abort();
        outcome
    }

    /// Fuzzing (tests/fuzz_health.rs): a gRPC check answered with bytes
    /// that are no HTTP/2 (an HTTP/1.1 server, garbage) failed with "grpc:
    /// Unknown error transport error": tonic's words, the cause dropped.
    #[tokio::test]
    async fn a_grpc_answer_that_is_no_http2_says_what_it_was() {
        for (bytes, cause) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
                "http2 error",
            ),
            (b"\x00\x00\x00garbage", "connection error"),
        ] {
            let outcome = grpc_against(bytes).await;
            assert!(!outcome.ok);
            let reason = outcome.error.unwrap();
            assert!(
                reason.starts_with("grpc: ") && reason.contains(cause),
                "{reason}"
            );
        }
    }

    #[test]
    fn body_search() {
        assert!(contains(b"status: ok", b"ok"));
        assert!(!contains(b"status: ko", b"ok"));
        assert!(contains(b"", b""));
    }
}
