//! A routing store the disk keeps from being written: why (full,
//! read-only), whether it can be written now (for the metrics), when to
//! try again, and the immutable connection that reads the file as it is
//! meanwhile (see `RoutingStore::open`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags};
use tracing::{debug, error, info};

use super::{sql_err, wal_len, Op, StoreError};

/// How often a store read through an immutable connection tries to open
/// the file for writing again.
pub(super) const RETRY_WRITABLE: Duration = Duration::from_secs(3);

/// Whether the store can be written, and why not.
#[derive(Debug)]
pub(super) struct Access {
    /// `None` while the connection is read-write.
    unwritable: Option<Unwritable>,
    /// `unwritable.is_none()`, for the metrics.
    pub(super) writable: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Unwritable {
    why: String,
    full: bool,
    /// The last attempt's error.
    cause: String,
    /// When to try the read-write open again.
    next_try: Instant,
}

impl Access {
    pub(super) fn new() -> Access {
        Access {
            unwritable: None,
            writable: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The connection is read-write (again).
    pub(super) fn writable(&mut self, path: &Path) {
        // Before the line: what it says is in effect once it is read (a
        // test read the gauge right after the line and found 0).
        self.writable.store(true, Ordering::Relaxed);
        if self.unwritable.take().is_some() {
            info!(path = %path.display(),
                "routing.db can be written again: back to the read-write store, the discovery API accepts writes");
        }
    }

    /// Opening `path` for writing failed with `cause`, because of `why`.
    /// Said at ERROR once per outage.
    pub(super) fn unwritable(&mut self, path: &Path, why: Why, cause: &StoreError) {
        self.writable.store(false, Ordering::Relaxed);
        if self.unwritable.is_none() {
            error!(path = %path.display(), why = %why.text, error = %cause,
                retry_secs = RETRY_WRITABLE.as_secs(),
                "routing.db cannot be written: routing from the table as it is in the file; the discovery API \
                 refuses writes until it can be written, which is tried again every few seconds");
        } else {
            debug!(path = %path.display(), error = %cause, "routing.db still cannot be written");
        }
        self.unwritable = Some(Unwritable {
            why: why.text,
            full: why.full,
            cause: cause.to_string(),
            next_try: Instant::now() + RETRY_WRITABLE,
        });
    }

    /// Whether a read-only connection should try the read-write open now.
    pub(super) fn retry_due(&self, retry: Retry) -> bool {
        match (&self.unwritable, retry) {
            (None, _) => true,
            (Some(_), Retry::Now) => true,
            (Some(u), Retry::IfDue) => Instant::now() >= u.next_try,
        }
    }

    pub(super) fn refusal(&self, path: &Path) -> StoreError {
        let (why, full, cause) = match &self.unwritable {
            Some(u) => (u.why.clone(), u.full, u.cause.clone()),
            None => ("it is open read-only".into(), false, String::new()),
        };
        StoreError::NotWritable {
            path: path.to_path_buf(),
            why,
            full,
            cause,
        }
    }
}

/// When [`fresh`](super::fresh) tries to turn a read-only store read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// Every [`RETRY_WRITABLE`] (reads).
    IfDue,
    /// At once (a write was asked for).
    Now,
}

/// Why the disk keeps `path` from being opened for writing, given the
/// error of the attempt.
pub(super) struct Why {
    text: String,
    full: bool,
}

/// Free bytes below which a disk counts as full: a WAL open needs the
/// 32 KiB `-shm`, and a write its WAL pages.
const FULL_BELOW_BYTES: u64 = 64 * 1024;

/// `Some` when `e` (of an open for writing) comes from the disk: it is full,
/// read-only, or the directory cannot be written. `None` for anything else
/// (a corrupt file, a missing table), which stays an error.
pub(super) fn why_unwritable(path: &Path, e: &StoreError) -> Option<Why> {
    if let StoreError::DirNotWritable { dir, why, .. } = e {
        return Some(Why {
            text: format!("its directory {} is not writable ({why})", dir.display()),
            full: false,
        });
    }
    why_disk_refuses(path, e.sqlite_error()?)
}

/// Whether `cause`, an error writing `path` (or opening it to write), comes
/// from the disk (full, read-only) rather than from the file: for the other
/// connections to routing.db (steering's), which then read it as it is
/// ([`open_as_is`]).
pub fn disk_refuses_writes(path: &Path, cause: &rusqlite::Error) -> bool {
    why_disk_refuses(path, cause).is_some()
}

/// A read-only connection to `path` as it is in the file, for a reader
/// that cannot open it otherwise because the disk refuses writes (see
/// [`connect_immutable`]). `None` when its WAL holds rows (they would be
/// missed) or it cannot be opened.
pub fn open_as_is(path: &Path) -> Option<Connection> {
    if wal_len(path).ok()? > 0 {
        return None;
    }
    connect_immutable(path).ok()
}

fn why_disk_refuses(path: &Path, cause: &rusqlite::Error) -> Option<Why> {
    let code = cause.sqlite_error_code()?;
    if !matches!(
        code,
        ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::ReadOnly
            | ErrorCode::CannotOpen
    ) {
        return None;
    }
    // SQLite says "disk I/O error" when the `-shm` cannot be sized: ask the
    // file system.
    match disk_room(path) {
        Some(Room::ReadOnly) => Some(Why {
            text: "its file system is read-only".into(),
            full: false,
        }),
        Some(Room::Free(free)) if free < FULL_BELOW_BYTES => Some(Why {
            text: format!("the disk is full ({free} bytes free)"),
            full: true,
        }),
        _ if code == ErrorCode::DiskFull => Some(Why {
            text: "the disk is full".into(),
            full: true,
        }),
        _ if code == ErrorCode::ReadOnly => Some(Why {
            text: "the file is read-only".into(),
            full: false,
        }),
        _ => None,
    }
}

enum Room {
    ReadOnly,
    /// Bytes an unprivileged writer may still use.
    Free(u64),
}

/// The file system under `path`, by `statvfs(3)`.
fn disk_room(path: &Path) -> Option<Room> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero is a valid `statvfs`, filled in by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    if st.f_flag & libc::ST_RDONLY != 0 {
        return Some(Room::ReadOnly);
    }
    Some(Room::Free(
        (st.f_bavail as u64).saturating_mul(st.f_frsize as u64),
    ))
}

/// A read-only connection that reads `path` as it is, without its `-wal`
/// and `-shm`. SQLite's `mode=ro` is not enough: a WAL database needs its
/// `-shm` (created, 32 KiB) even to be read, which is exactly what a full or
/// read-only disk refuses. `immutable=1` reads without one, taking no locks,
/// on the promise that no one changes the file meanwhile. That holds while
/// the disk refuses writes (no other writer can create the `-shm` either),
/// and the connection lives only until the read-write open works again
/// ([`fresh`](super::fresh) tries every [`RETRY_WRITABLE`]); a file replaced or rewritten
/// meanwhile changes its stamp, and [`fresh`](super::fresh) opens it again.
pub(super) fn connect_immutable(path: &Path) -> Result<Connection, StoreError> {
    let err = |e| sql_err(path, Op::Open, e);
    let uri = format!("file:{}?immutable=1", uri_path(path));
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(uri, flags).map_err(err)?;
    // The first read of the header: a non-database fails here.
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(err)?;
    Ok(conn)
}

/// `path` as the path of a `file:` URI: every byte but unreserved ones and
/// `/` percent-encoded (`?`, `#` and `%` would otherwise end or escape it).
fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RoutingStore;

    /// The immutable connection names the file by a `file:` URI, where `?`
    /// ends the path, `#` starts a fragment and `%` escapes: a routing.db
    /// whose path holds them is still the one read.
    #[test]
    fn a_path_with_uri_characters_is_read_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd ?#%41 name.db");
        let store = RoutingStore::open(&path).unwrap();
        let writer = Connection::open(&path).unwrap();
        writer
            .execute(
                "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit) \
                 VALUES ('a', 'web', 'sa', '10.0.0.1', 80, 1, 1, 1, 0)",
                [],
            )
            .unwrap();
        drop(writer);
        // The last connection closed folds and removes the WAL, as a
        // clean stop does.
        drop(store);
        let conn = open_as_is(&path).expect("read as it is");
        let id: String = conn
            .query_row("SELECT id FROM backends", [], |r| r.get(0))
            .unwrap();
        assert_eq!(id, "a");
        assert!(!dir.path().join("odd ?#A name.db").exists());
    }
}
