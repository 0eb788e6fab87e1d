//! `wireguard-go` as the WireGuard device: a child process in the
//! foreground (`wireguard-go -f <interface>`), configured over its UAPI
//! socket (the requests are defguard_wireguard_rs's; the socket I/O is
//! ours, see [`exchange`], and so is the reading of answers, see
//! [`super::uapi`]).
//!
//! The child gets `PR_SET_PDEATHSIG`: if edgeproxy dies, even by SIGKILL,
//! the kernel sends it SIGTERM and the interface goes with it. On a
//! graceful stop the child is sent SIGTERM and waited for. A child that
//! exits on its own (killed), or stops answering on its UAPI socket
//! (stopped, hung), is seen by [`WireguardGo::gone`]; the driver then
//! replaces it. Calls to the UAPI socket block (a few ms), so they run on
//! the blocking pool, each within [`UAPI_PATIENCE`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use defguard_wireguard_rs::{host::Host, key::Key};

use super::uapi::UapiError;
use super::{
    configure, defguard_peer, off_runtime, DeviceError, DeviceSettings, PeerSpec, PeerStatus,
};
use crate::mesh::keys::PublicKey;

const IMPLEMENTATION: &str = "wireguard-go";
/// How long `wireguard-go` gets to create its socket.
const START_PATIENCE: Duration = Duration::from_secs(10);
/// How long one exchange on the UAPI socket may take. `wireguard-go`
/// answers in milliseconds; one silent this long is stopped (SIGSTOP, a
/// frozen cgroup) or hung, and is replaced like one that exited.
pub const UAPI_PATIENCE: Duration = Duration::from_secs(5);

pub struct WireguardGo {
    child: Arc<Mutex<Child>>,
    socket: PathBuf,
    /// An exchange on the UAPI socket went unanswered.
    silent: Arc<AtomicBool>,
}

/// Most an answer may hold. A peer takes about 300 bytes of a `get=1`
/// answer: this is tens of thousands of peers.
const MAX_ANSWER: usize = 16 << 20;

/// Where an answer ends: its `errno=` line (after a `get`, the device's
/// lines come first). Returns the errno's value once that line is whole.
fn answer_end(answer: &str) -> Option<&str> {
    answer
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .find_map(|l| l.strip_prefix("errno="))
        .map(str::trim_end)
}

/// One request on `wireguard-go`'s UAPI socket (it ends with a blank line)
/// and its answer, up to and including the `errno=` line, all within
/// `patience` ([`UAPI_PATIENCE`]) and [`MAX_ANSWER`] bytes. defguard_wireguard_rs's own client
/// retried a read that timed out without end, so a stopped `wireguard-go`
/// froze the mesh thread (no pass, no log, status and metrics stuck at
/// their last values) until someone resumed it.
fn exchange(socket: &Path, request: &[u8], patience: Duration) -> Result<String, UapiError> {
    let io = |source| UapiError::Io {
        path: socket.display().to_string(),
        source,
    };
    let deadline = Instant::now() + patience;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(UapiError::Silent(patience))
    };
    let silent = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            UapiError::Silent(patience)
        }
        _ => io(e),
    };
    let mut stream = UnixStream::connect(socket).map_err(io)?;
    stream.set_write_timeout(Some(left()?)).map_err(io)?;
    stream.write_all(request).map_err(silent)?;
    let mut answer = Vec::new();
    // The answer's whole lines end at `whole`; those before `looked` were
    // looked at: each byte is looked at once.
    let (mut whole, mut looked) = (0, 0);
    let mut chunk = [0u8; 4096];
    loop {
        if whole > looked {
            let lines = String::from_utf8_lossy(&answer[looked..whole]);
            if let Some(errno) = answer_end(&lines) {
                return match errno {
                    "0" => Ok(String::from_utf8_lossy(&answer).into_owned()),
                    other => Err(UapiError::Refused(other.to_string())),
                };
            }
            looked = whole;
        }
        if answer.len() >= MAX_ANSWER {
            return Err(UapiError::TooLong(MAX_ANSWER));
        }
        stream.set_read_timeout(Some(left()?)).map_err(io)?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(UapiError::Closed),
            Ok(n) => {
                if let Some(last) = chunk[..n].iter().rposition(|b| *b == b'\n') {
                    whole = answer.len() + last + 1;
                }
                answer.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(silent(e)),
        }
    }
}

/// [`exchange`], noting in `silent` a `wireguard-go` that did not answer.
fn exchange_noting(
    socket: &Path,
    request: &[u8],
    silent: &AtomicBool,
) -> Result<String, UapiError> {
    let answer = exchange(socket, request, UAPI_PATIENCE);
    if let Err(UapiError::Silent(_)) = answer {
        silent.store(true, Ordering::Relaxed);
    }
    answer
}

impl WireguardGo {
    pub async fn create(s: &DeviceSettings<'_>) -> Result<WireguardGo, DeviceError> {
        let fail = |cause: String| DeviceError::Create {
            interface: s.interface.to_string(),
            implementation: IMPLEMENTATION,
            cause,
        };
        let socket = super::embedded::uapi_socket(s.interface);
        // A socket left by a killed run would make us talk to nobody.
        let _ = std::fs::remove_file(&socket);
        let child = spawn(s.wireguard_go, s.interface).map_err(|e| {
            fail(format!(
                "cannot run {}: {e} (apt-get install wireguard-go, or set mesh.wireguard_go)",
                s.wireguard_go.display()
            ))
        })?;
        let child = Arc::new(Mutex::new(child));
        let deadline = Instant::now() + START_PATIENCE;
        while !socket.exists() {
            if let Ok(Some(status)) = child.lock().expect("not poisoned").try_wait() {
                return Err(fail(format!("wireguard-go exited at start: {status}")));
            }
            if Instant::now() > deadline {
                kill(&child);
                return Err(fail(format!(
                    "wireguard-go did not create {} within {START_PATIENCE:?}",
                    socket.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let host = Host::new(s.listen_port, Key::new(*s.private_key.expose()));
        let request = format!("set=1\n{}\n", host.as_uapi());
        let path = socket.clone();
        let written =
            tokio::task::spawn_blocking(move || exchange(&path, request.as_bytes(), UAPI_PATIENCE))
                .await
                .map_err(|e| fail(e.to_string()))?;
        if let Err(e) = written {
            kill(&child);
            return Err(fail(format!(
                "cannot set the key and port {}: {e}",
                s.listen_port
            )));
        }
        Ok(WireguardGo {
            child,
            socket,
            silent: Arc::new(AtomicBool::new(false)),
        })
    }

    pub async fn peers(&self) -> Result<Vec<PeerStatus>, DeviceError> {
        let (socket, silent) = (self.socket.clone(), Arc::clone(&self.silent));
        off_runtime(move || {
            let answer = exchange_noting(&socket, b"get=1\n\n", &silent)?;
            super::uapi::peers(&answer)
        })
        .await
        .map_err(|cause| DeviceError::Read {
            implementation: IMPLEMENTATION,
            cause,
        })
    }

    pub async fn upsert_peer(&mut self, spec: &PeerSpec) -> Result<(), DeviceError> {
        let request = format!("set=1\n{}\n", defguard_peer(spec).as_uapi_update());
        self.set(spec.public_key, request).await
    }

    pub async fn remove_peer(&mut self, key: &PublicKey) -> Result<(), DeviceError> {
        let peer = defguard_wireguard_rs::peer::Peer::new(Key::new(key.0));
        let request = format!("set=1\n{}\n", peer.as_uapi_remove());
        self.set(*key, request).await
    }

    async fn set(&self, peer: PublicKey, request: String) -> Result<(), DeviceError> {
        let (socket, silent) = (self.socket.clone(), Arc::clone(&self.silent));
        configure(IMPLEMENTATION, peer, move || {
            exchange_noting(&socket, request.as_bytes(), &silent).map(|_| ())
        })
        .await
    }

    /// Whether the child is gone, and how: it exited (reaped here; asking
    /// again gives the same answer), or it did not answer on its UAPI
    /// socket.
    pub fn gone(&self) -> Option<String> {
        let exited = self
            .child
            .lock()
            .expect("not poisoned")
            .try_wait()
            .ok()
            .flatten();
        match exited {
            Some(status) => Some(format!("wireguard-go exited ({status})")),
            None if self.silent.load(Ordering::Relaxed) => Some(format!(
                "wireguard-go did not answer on its UAPI socket within {UAPI_PATIENCE:?} \
                 (stopped or hung?)"
            )),
            None => None,
        }
    }

    pub async fn stop(self) {
        let child = Arc::clone(&self.child);
        let _ = tokio::task::spawn_blocking(move || kill(&child)).await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn spawn(program: &Path, interface: &str) -> std::io::Result<Child> {
    let mut cmd = Command::new(program);
    cmd.arg("-f")
        .arg(interface)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        // Its own logging is at error level unless asked for.
        .env("LOG_LEVEL", "error");
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// SIGTERM (and SIGCONT, for a stopped one to act on it), then SIGKILL
/// after 2 s; reaps the child.
fn kill(child: &Mutex<Child>) {
    let mut child = child.lock().expect("not poisoned");
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: signalling our own child by pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        libc::kill(child.id() as libc::pid_t, libc::SIGCONT);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn an_answer_ends_at_its_whole_errno_line() {
        assert_eq!(answer_end(""), None);
        assert_eq!(answer_end("public_key=ab\nrx_bytes=1\n"), None);
        assert_eq!(answer_end("public_key=ab\nerrno=0"), None, "not whole yet");
        assert_eq!(answer_end("public_key=ab\nerrno=0\n"), Some("0"));
        assert_eq!(answer_end("errno=-22\n\n"), Some("-22"));
    }

    /// A socket whose server takes each connection and answers `answer`
    /// (`None`: never answers, like a stopped `wireguard-go`).
    fn server(answer: Option<&'static str>) -> (PathBuf, std::thread::JoinHandle<()>) {
        serving(move |mut conn| match answer {
            Some(a) => {
                for piece in a.as_bytes().chunks(7) {
                    conn.write_all(piece).unwrap();
                }
            }
            None => std::thread::sleep(Duration::from_millis(600)),
        })
    }

    /// A socket whose server takes one connection, reads the request, then
    /// does `respond` with it.
    fn serving(
        respond: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (PathBuf, std::thread::JoinHandle<()>) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "edgeproxy-uapi-test-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 64];
            let _ = conn.read(&mut request);
            respond(conn);
        });
        (path, thread)
    }

    #[test]
    fn a_uapi_socket_that_never_answers_fails_within_the_patience() {
        let (path, thread) = server(None);
        let started = Instant::now();
        let answer = exchange(&path, b"get=1\n\n", Duration::from_millis(200));
        assert!(matches!(answer, Err(UapiError::Silent(_))), "{answer:?}");
        assert!(started.elapsed() < Duration::from_millis(500));
        let text = answer.unwrap_err().to_string();
        assert!(
            text.contains("did not answer") && text.contains("stopped or hung"),
            "{text}"
        );
        thread.join().unwrap();
        let _ = std::fs::remove_file(path);
    }

    /// Found reading this client for "bounded reads" (not by a fuzz
    /// target): an answer that never reaches its `errno=` line was read
    /// (all of it scanned again after every 4 KiB read) until the patience
    /// ran out. It ends at MAX_ANSWER bytes, with an error that says so,
    /// long before.
    #[test]
    fn an_answer_that_never_ends_is_cut_at_max_answer() {
        let (path, thread) = serving(|mut conn| {
            let lines = "rx_bytes=1\n".repeat(400);
            while conn.write_all(lines.as_bytes()).is_ok() {}
        });
        let started = Instant::now();
        let answer = exchange(&path, b"get=1\n\n", Duration::from_secs(20));
        let took = started.elapsed();
        assert!(
            matches!(answer, Err(UapiError::TooLong(MAX_ANSWER))),
            "{answer:?} after {took:?}"
        );
        assert!(took < Duration::from_secs(10), "{took:?}");
        let text = answer.unwrap_err().to_string();
        assert!(text.contains("errno"), "{text}");
        thread.join().unwrap();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn an_answer_in_pieces_is_read_whole_and_errno_is_checked() {
        let (path, thread) = server(Some("listen_port=51820\npublic_key=00\nerrno=0\n\n"));
        let answer = exchange(&path, b"get=1\n\n", Duration::from_secs(5)).unwrap();
        assert!(answer.starts_with("listen_port=51820\n") && answer.contains("errno=0\n"));
        thread.join().unwrap();
        let (path2, thread) = server(Some("errno=-22\n\n"));
        let refused = exchange(&path2, b"set=1\n\n", Duration::from_secs(5));
        assert!(
            matches!(&refused, Err(UapiError::Refused(e)) if e == "-22"),
            "{refused:?}"
        );
        thread.join().unwrap();
        let (path3, thread) = server(Some("listen_port=1\n"));
        let closed = exchange(&path3, b"get=1\n\n", Duration::from_secs(5));
        assert!(matches!(closed, Err(UapiError::Closed)), "{closed:?}");
        thread.join().unwrap();
        for p in [path, path2, path3] {
            let _ = std::fs::remove_file(p);
        }
    }
}
