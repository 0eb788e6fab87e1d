//! Fuzzing the health checks with what a backend may answer: an HTTP(S)
//! check's status line, headers and body (well-formed, damaged, or any
//! bytes), and a gRPC check's answer (any bytes where an HTTP/2 server
//! should be), from a real socket on loopback, delivered in random pieces,
//! then closed or left open.
//!
//! `bolero` property tests: under `cargo test` each target runs random
//! inputs for `EDGEPROXY_FUZZ_SECS` seconds (default 10) on stable Rust;
//! `cargo bolero test --engine libfuzzer` runs them coverage-guided.
//!
//! Properties: a check never panics and always ends within its timeout
//! (a backend that never stops talking, or never finishes its answer,
//! included); a garbled answer is a failed check with a reason; a check
//! passes only on an HTTP/1.x answer whose status is in the expected range
//! (and whose body, when asked, contains the text).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bolero::{check, TypeGenerator};
use control::health::core::CheckOrder;
use control::health::probe::{run, MAX_BODY};
use control::health::spec::{CheckKind, CheckSettings, StatusRange};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[path = "../../tests/common/fuzz_budget.rs"]
mod fuzz_budget;

fn budget() -> Duration {
    fuzz_budget::budget(10)
}

/// Checks that passed / failed / timed out (printed after each target, to
/// see that both ends are reached; the two targets run at once, so the
/// counts are of both so far).
static PASSED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);
static TIMED_OUT: AtomicU64 = AtomicU64::new(0);

fn report(target: &str) {
    println!(
        "{target}: {} passed, {} failed ({} timed out)",
        PASSED.load(Relaxed),
        FAILED.load(Relaxed),
        TIMED_OUT.load(Relaxed)
    );
}

/// A check's timeout here: short, for many inputs per second.
const TIMEOUT: Duration = Duration::from_millis(150);
/// How late past its timeout a check may end (a loaded CI machine): far
/// less than "never".
const SLACK: Duration = Duration::from_secs(3);

/// What the backend does once it has written its answer.
#[derive(Debug, Clone, Copy, TypeGenerator)]
enum Then {
    Close,
    /// Leaves the connection open, silent.
    Hang,
    /// Goes on writing this byte forever.
    Babble(u8),
}

/// An HTTP answer, built from parts, then perhaps damaged.
#[derive(Debug, Clone, TypeGenerator)]
struct Answer {
    version: u8,
    status: u16,
    reason: Option<Text>,
    headers: Vec<(u8, Text)>,
    length: Option<Length>,
    body: Vec<u8>,
    /// The body in chunked encoding, chunks of this size (1..).
    chunked: Option<u8>,
    /// A 1xx answer first.
    interim: Option<u16>,
    damage: Option<(u16, u8)>,
    cut: Option<u16>,
}

/// Text a server may well send (three times in four), or anything.
#[derive(Debug, Clone, TypeGenerator)]
enum Text {
    Known(u8),
    Usual(u8),
    Common(u8),
    Any(String),
}

const TEXTS: &[&str] = &[
    "OK",
    "text/plain",
    "close",
    "keep-alive",
    "0",
    "5",
    "chunked",
    "gzip",
    "",
    " spaced ",
    "nginx/1.25",
];

impl Text {
    fn str(&self) -> &str {
        match self {
            Text::Known(i) | Text::Usual(i) | Text::Common(i) => {
                TEXTS[usize::from(*i) % TEXTS.len()]
            }
            Text::Any(s) => s,
        }
    }
}

#[derive(Debug, Clone, Copy, TypeGenerator)]
enum Length {
    Right,
    Off(i8),
    Huge,
    Garbage,
}

const HEADER_NAMES: &[&str] = &[
    "content-type",
    "server",
    "connection",
    "x-anything",
    "date",
    "cache-control",
    "x-request-id",
    "content-length",
    "transfer-encoding",
    "",
    " folded",
    "bad name",
];

impl Answer {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let version = match self.version % 8 {
            0 => "HTTP/1.0",
            1 => "HTTP/2.0",
            2 => "HTTX/1.1",
            _ => "HTTP/1.1",
        };
        if let Some(code) = self.interim {
            out.extend_from_slice(
                format!("HTTP/1.1 {} Continue\r\n\r\n", 100 + code % 100).as_bytes(),
            );
        }
        // Mostly 100..=599, sometimes any three digits.
        let status = match self.status % 7 {
            0 => self.status % 1000,
            _ => 100 + self.status % 500,
        };
        let reason = self.reason.as_ref().map_or("OK", Text::str);
        out.extend_from_slice(format!("{version} {status:03} {reason}\r\n").as_bytes());
        for (name, value) in self.headers.iter().take(6) {
            let name = HEADER_NAMES[usize::from(*name) % HEADER_NAMES.len()];
            out.extend_from_slice(format!("{name}: {}\r\n", value.str()).as_bytes());
        }
        let mut body = self.body.clone();
        body.truncate(2 * MAX_BODY);
        match self.chunked {
            Some(size) => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                for chunk in body.chunks(usize::from(size.max(1))) {
                    out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
            None => {
                if let Some(length) = self.length {
                    let value = match length {
                        Length::Right => body.len().to_string(),
                        Length::Off(d) => (body.len() as i64 + i64::from(d)).to_string(),
                        Length::Huge => u64::MAX.to_string(),
                        Length::Garbage => "12abc".into(),
                    };
                    out.extend_from_slice(format!("content-length: {value}\r\n").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&body);
            }
        }
        if let Some((at, to)) = self.damage {
            if !out.is_empty() {
                let i = usize::from(at) % out.len();
                out[i] = to;
            }
        }
        if let Some(cut) = self.cut {
            out.truncate(usize::from(cut));
        }
        out
    }
}

/// A backend on loopback that answers the next connection with `answer`
/// in pieces of `piece` bytes, then does `then`.
async fn backend(
    answer: Vec<u8>,
    piece: usize,
    then: Then,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        // The request first (as much as comes at once): a server answers.
        let mut request = [0u8; 1024];
        let _ = conn.read(&mut request).await;
        for chunk in answer.chunks(piece.max(1)) {
            if conn.write_all(chunk).await.is_err() {
                return;
            }
        }
        match then {
            Then::Close => {}
            Then::Hang => tokio::time::sleep(Duration::from_secs(30)).await,
            Then::Babble(b) => {
                let block = [b; 4096];
                while conn.write_all(&block).await.is_ok() {}
            }
        }
    });
    (addr, task)
}

fn order(
    addr: SocketAddr,
    kind: CheckKind,
    expected: (u16, u16),
    body: Option<String>,
) -> CheckOrder {
    let (low, high) = (expected.0 % 600, expected.1 % 600);
    CheckOrder {
        id: "b-1".into(),
        app: "web".into(),
        addr,
        settings: Arc::new(CheckSettings {
            enabled: true,
            kind,
            timeout: TIMEOUT,
            expected_status: StatusRange {
                low: low.min(high).max(100),
                high: low.max(high).max(100),
            },
            body_contains: body,
            ..CheckSettings::default()
        }),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `order` against `answer`; checks the bounds every check keeps.
fn contract(
    rt: &tokio::runtime::Runtime,
    answer: Vec<u8>,
    piece: u8,
    then: Then,
    kind: CheckKind,
    expected: (u16, u16),
    needle: Option<String>,
) -> (control::health::state::CheckOutcome, Vec<u8>) {
    rt.block_on(async {
        let (addr, server) = backend(answer.clone(), usize::from(piece).max(1) * 7, then).await;
        let o = order(addr, kind, expected, needle);
        let started = Instant::now();
        let outcome = run(&o).await;
        let took = started.elapsed();
        server.abort();
        assert!(
            took <= TIMEOUT + SLACK,
            "the check took {took:?} (timeout {TIMEOUT:?}): {outcome:?}"
        );
        if outcome.ok {
            PASSED.fetch_add(1, Relaxed);
            assert!(outcome.error.is_none(), "{outcome:?}");
        } else {
            FAILED.fetch_add(1, Relaxed);
            if outcome
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with("timed out"))
            {
                TIMED_OUT.fetch_add(1, Relaxed);
            }
            let reason = outcome.error.as_deref().unwrap_or("");
            assert!(!reason.trim().is_empty(), "a failure without a reason");
            assert!(
                !outcome.local,
                "the backend's answer blamed on this host: {reason}"
            );
        }
        (outcome, answer)
    })
}

/// The status of the final answer, if `answer` begins with HTTP/1.x
/// status lines as RFC 9112 §4 writes them (1xx answers skipped; the
/// reason phrase may hold any byte but CR and LF; a line may end in a bare
/// LF, and empty lines before a status line are skipped, RFC 9112 §2.2).
fn final_status(answer: &[u8]) -> Option<u16> {
    let mut lines = answer
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    loop {
        // Empty lines before a status line are skipped (as httparse does).
        let line = lines.find(|l| !l.is_empty())?;
        let version = line.get(..9)?;
        if version != b"HTTP/1.1 " && version != b"HTTP/1.0 " {
            return None;
        }
        let code = line.get(9..12)?;
        if !code.iter().all(u8::is_ascii_digit) || !matches!(line.get(12), None | Some(b' ')) {
            return None;
        }
        let code = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        if (100..200).contains(&code) && code != 101 {
            // Its header lines, to the empty line.
            while !lines.next()?.is_empty() {}
            continue;
        }
        return Some(code);
    }
}

#[test]
fn any_http_answer_from_a_backend() {
    let rt = runtime();
    check!()
        .with_test_time(budget())
        .with_type::<(Answer, u8, Then, Option<(u16, u16)>, Option<u8>)>()
        .for_each(|(answer, piece, then, expected, needle)| {
            // The default range (2xx, 3xx), or any.
            let expected = expected.unwrap_or((200, 399));
            // Needles the body may well contain.
            let needle = needle.map(|n| match n % 3 {
                0 => "ok".to_string(),
                1 => String::new(),
                _ => "\u{0}".to_string(),
            });
            let (outcome, bytes) = contract(
                &rt,
                answer.bytes(),
                *piece,
                *then,
                CheckKind::Http,
                expected,
                needle,
            );
            if outcome.ok {
                let status = final_status(&bytes).unwrap_or_else(|| {
                    panic!(
                        "passed on an answer with no status line: {:?}",
                        String::from_utf8_lossy(&bytes)
                    )
                });
                let (low, high) = (expected.0 % 600, expected.1 % 600);
                let (low, high) = (low.min(high).max(100), low.max(high).max(100));
                assert!(
                    (low..=high).contains(&status),
                    "status {status} passed, expected {low}..={high}"
                );
            }
        });
    report("health targets, after the HTTP answers one");
}

#[test]
fn any_bytes_where_an_http_or_grpc_answer_should_be() {
    let rt = runtime();
    check!()
        .with_test_time(budget())
        .with_max_len(4096)
        .with_type::<(Vec<u8>, u8, Then, bool)>()
        .for_each(|(bytes, piece, then, grpc)| {
            let kind = if *grpc {
                CheckKind::Grpc
            } else {
                CheckKind::Http
            };
            let (outcome, _) = contract(&rt, bytes.clone(), *piece, *then, kind, (200, 399), None);
            if outcome.ok && !*grpc {
                assert!(
                    final_status(bytes).is_some(),
                    "passed on {:?}",
                    String::from_utf8_lossy(bytes)
                );
            }
            // Any bytes are no gRPC answer: HTTP/2 needs a SETTINGS frame
            // and a HEADERS frame no random input makes.
            if *grpc {
                assert!(!outcome.ok, "a gRPC check passed on {bytes:02x?}");
                // Not tonic's words alone: what was wrong.
                let reason = outcome.error.unwrap_or_default();
                assert_ne!(reason, "grpc: Unknown error transport error");
            }
        });
    report("health targets, after the any-bytes one");
}

/// The fuzzer's oracle once disagreed with hyper on an answer whose 1xx
/// head ended in bare LFs, one more than the blank line ("…Continue\r\n
/// \n\nHTTP/1.1 200 OK…"): hyper (httparse) skips empty lines before a
/// status line, as RFC 9112 §2.2 lets a recipient do. Both read 200.
#[test]
fn an_empty_line_before_a_status_line_is_skipped() {
    let answer = b"HTTP/1.1 100 Continue\r\n\n\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    assert_eq!(final_status(answer), Some(200));
    let (outcome, _) = contract(
        &runtime(),
        answer.to_vec(),
        255,
        Then::Close,
        CheckKind::Http,
        (200, 399),
        None,
    );
    assert!(outcome.ok, "{outcome:?}");
}
