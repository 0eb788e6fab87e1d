//! The upgrade control socket: a Unix socket on which `edgeproxy upgrade`
//! asks a running proxy to upgrade itself and hears how it went.
//!
//! Protocol, one exchange per connection: the client sends `upgrade\n`; the
//! server answers when the attempt is over, `ok pid=<new pid>\n` or
//! `error <reason>\n`, and closes. A reason may span several lines (a
//! successor's TOML error points at the bad spot on lines of its own): the
//! client reads up to the close, not one line. Anything else gets `error unknown
//! command`. A connection must send its line within [`REQUEST_TIMEOUT`];
//! at most [`MAX_CLIENTS`] are served at once.
//!
//! The socket file is created with the process's umask; who may connect is
//! who may write to it (the same as who may send the process SIGUSR2).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// The registry name of the control socket.
pub const SOCKET_NAME: &str = "control";
/// A client must send its command within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// Longest command line read.
const MAX_LINE: usize = 64;
/// Longest answer the client reads (a successor's reason is cut at 4,000
/// characters).
const MAX_ANSWER: u64 = 64 * 1024;

/// A request to upgrade, and where its outcome goes (one line).
#[derive(Debug)]
pub struct Request {
    pub reply: oneshot::Sender<String>,
}

/// A bound control socket and whether this process created its file.
pub struct Bound {
    pub listener: StdUnixListener,
    /// False when taken over from a predecessor (which still serves it
    /// until this process reports ready).
    pub created_here: bool,
}

/// Binds (or, in a successor, takes over) the control socket at `path`.
/// Returns `Ok(None)` when another live process holds it (logged: that
/// process, not this one, is what `edgeproxy upgrade` reaches there), or
/// when its file system is read-only or full (logged). A
/// leftover file from a process that is gone is replaced.
pub fn bind(path: &Path) -> std::io::Result<Option<Bound>> {
    let inherited = super::sockets::take_unix_listener(SOCKET_NAME, path);
    let created_here = inherited.is_none();
    let listener = match inherited {
        Some(inherited) => inherited,
        None => match bind_new(path) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(None),
            // The default path is next to routing.db: a disk turned
            // read-only (or full) made the start fail here (creating the
            // file, or removing a killed process's leftover), though the
            // POP could route from its table (see `replication::db`).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EROFS | libc::ENOSPC | libc::EDQUOT)
                ) =>
            {
                tracing::error!(path = %path.display(), error = %e,
                    "upgrade control socket cannot be created; running without it \
                     (`edgeproxy upgrade` cannot reach this process; SIGUSR2 still works)");
                return Ok(None);
            }
            Err(e) => return Err(e),
        },
    };
    listener.set_nonblocking(true)?;
    super::sockets::register(SOCKET_NAME, &[listener.as_fd()])?;
    Ok(Some(Bound {
        listener,
        created_here,
    }))
}

/// A new socket file at `path`; `None` when another live process holds it
/// (logged). A leftover file from a process that is gone is replaced.
fn bind_new(path: &Path) -> std::io::Result<Option<StdUnixListener>> {
    match StdUnixListener::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if StdUnixStream::connect(path).is_ok() {
                tracing::warn!(path = %path.display(),
                    "upgrade control socket is in use by another process; \
                     `edgeproxy upgrade` cannot reach this one there (SIGUSR2 still works)");
                return Ok(None);
            }
            // Nobody answers: a leftover of a process that is gone.
            std::fs::remove_file(path)?;
            StdUnixListener::bind(path).map(Some)
        }
        Err(e) => Err(e),
    }
}

/// The served control socket.
pub struct Server {
    pub requests: mpsc::Receiver<Request>,
    task: tokio::task::JoinHandle<()>,
    /// One permit per client being served: all free means every answer has
    /// been written.
    slots: Arc<Semaphore>,
    path: PathBuf,
    /// The socket file's inode, so only our own file is removed at exit.
    inode: Option<u64>,
    /// Whether the file is this process's to remove when it stops: it
    /// created it, or took it over and then served. Never after handing it
    /// to a successor, and never while a predecessor still serves it.
    removable: bool,
}

impl Server {
    /// Serves `bound` on the current Tokio runtime.
    pub fn serve(bound: Bound, path: PathBuf) -> std::io::Result<Server> {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(&path).ok().map(|m| m.ino());
        let removable = bound.created_here;
        let listener = UnixListener::from_std(bound.listener)?;
        let (tx, rx) = mpsc::channel(MAX_CLIENTS);
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        let task = tokio::spawn(accept_loop(listener, tx, Arc::clone(&slots)));
        Ok(Server {
            requests: rx,
            task,
            slots,
            path,
            inode,
            removable,
        })
    }

    /// This process serves now (a successor that reported ready): the
    /// file is its own.
    pub fn own(&mut self) {
        self.removable = true;
    }

    /// Whether a client is still being served (its answer not yet written).
    pub fn busy(&self) -> bool {
        self.slots.available_permits() < MAX_CLIENTS
    }

    /// Stops accepting; the socket file stays (a successor serves it).
    pub fn stop(&mut self) {
        self.task.abort();
        self.removable = false;
        super::sockets::unregister(SOCKET_NAME);
    }

    /// Stops accepting and removes the socket file if it is ours.
    pub fn remove(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let removable = self.removable;
        self.stop();
        let same_file = std::fs::metadata(&self.path)
            .ok()
            .is_some_and(|m| Some(m.ino()) == self.inode);
        if removable && same_file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Server {
    /// A start that fails after binding leaves no socket file behind.
    fn drop(&mut self) {
        if self.removable {
            self.remove();
        }
    }
}

async fn accept_loop(
    listener: UnixListener,
    requests: mpsc::Sender<Request>,
    slots: Arc<Semaphore>,
) {
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = serve_client(stream, requests).await {
                tracing::debug!(error = %e, "upgrade control socket: client ended");
            }
        });
    }
}

async fn serve_client(stream: UnixStream, requests: mpsc::Sender<Request>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader =
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE as u64));
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            write.write_all(b"error no command within 5 s\n").await?;
            return Ok(());
        }
    }
    let answer = match line.trim() {
        "upgrade" => {
            let (tx, rx) = oneshot::channel();
            match requests.send(Request { reply: tx }).await {
                Err(_) => "error the process is stopping\n".to_string(),
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| "error the process is stopping\n".into()),
            }
        }
        other => format!("error unknown command {other:?}\n"),
    };
    write.write_all(answer.as_bytes()).await?;
    write.shutdown().await
}

/// The client side, for `edgeproxy upgrade`: asks the process listening on
/// `path` to upgrade and returns its whole answer (`ok pid=N` or `error
/// ...`, every line of it), waiting up to `timeout` for each read.
pub fn request_upgrade(path: &Path, timeout: Duration) -> std::io::Result<String> {
    let mut stream = StdUnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"upgrade\n")?;
    let mut raw = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut raw)
        .map_err(|e| match e.kind() {
            // The read timeout: the proxy took the request and has not
            // answered yet, which is not "cannot reach".
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {}s; the upgrade may still be under way (the proxy logs \
                     the outcome; --timeout waits longer)",
                    timeout.as_secs()
                ),
            ),
            _ => e,
        })?;
    let answer = String::from_utf8_lossy(&raw);
    if answer.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the proxy closed the connection without an answer",
        ));
    }
    Ok(answer.trim_end().to_string())
}
