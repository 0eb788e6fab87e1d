//! The routing store: `routing.db`, owned by the control thread.
//!
//! The file format is the original edgeProxy's: one `backends` table with
//! columns `id, app, region, wg_ip, port, healthy, weight, soft_limit,
//! hard_limit, deleted`, plus `country`, which old files lack and which
//! [`RoutingStore::open`] adds. A `routing.db` written by the original loads
//! unchanged; original columns are never dropped or renamed.
//!
//! The store keeps one long-lived connection in WAL mode. The reloader asks
//! [`RoutingStore::changed`] on every reload tick (cheap: a
//! `PRAGMA data_version` and two `stat`s) and calls [`RoutingStore::load`] only
//! when it says yes. Neither a load nor a write checkpoints the WAL (that
//! `fsync`s); `changed` folds it back once the table has been quiet for a
//! second, and a load once it passes 1 MiB, both without holding other
//! writers back (`checkpoint`). Operators may edit the file with
//! the `sqlite3` CLI, or replace it wholesale (`mv new.db routing.db`); both are noticed. Any
//! failure (the file is gone, corrupt, not a database) is returned as an
//! error, the caller keeps its last good snapshot, and the next call starts
//! over with a fresh connection, so the store recovers as soon as the file is
//! valid again.
//!
//! Reading is lenient per row: a row with a value of the wrong type lands in
//! [`Loaded::bad_rows`] with its id and the reason, and the other rows still
//! load. Semantic checks (address syntax, port range, negative limits) are the
//! snapshot builder's job, not the store's.
//!
//! Migration 2 adds the discovery API's per-backend state ([`Lifecycle`]):
//! `draining`, `last_heartbeat_ms` and `registered_at_ms`. Rows written by the
//! original or by hand have `draining = 0` and NULL timestamps, which means
//! "not managed by heartbeats": they never expire. What the state means for
//! routing (drained and expired backends take no new connections) is decided
//! by `crate::routing`, not here.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use engine::snapshot::BackendRecord;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, Row, TransactionBehavior};
use tracing::{debug, info, warn};

mod checkpoint;
mod read_only;
use checkpoint::checkpoint;
use read_only::{connect_immutable, why_unwritable, Access, Retry};
pub use read_only::{disk_refuses_writes, open_as_is};

/// The original edgeProxy's table, verbatim (`sql/create_routing_db.sql` in
/// andrebassi/edgeproxy). A new database gets exactly this and then goes
/// through the same migrations as an old file, so every `routing.db`, old or
/// new, ends up with the same layout: the original columns, then `country`.
const CREATE_BACKENDS: &str = "CREATE TABLE backends (
    id TEXT PRIMARY KEY,
    app TEXT,
    region TEXT,
    wg_ip TEXT,
    port INTEGER,
    healthy INTEGER,
    weight INTEGER,
    soft_limit INTEGER,
    hard_limit INTEGER,
    deleted INTEGER DEFAULT 0
)";

/// Migration 1: the geo-routing column the original added after its first
/// schema. Nullable: old rows have no country.
const ADD_COUNTRY: &str = "ALTER TABLE backends ADD COLUMN country TEXT";

/// Migration 2: the discovery API's per-backend state, appended after
/// `country`. `draining` defaults to 0 so the original's inserts (which do
/// not name it) create serving rows; NULL timestamps mean "never registered
/// through the API", and such rows never expire.
///
/// Migration 3 appends what heartbeat expiry needs once POPs share the
/// table: `heartbeat_pop`, the node id of the POP that receives the
/// backend's heartbeats (only that POP judges expiry: heartbeats stay local),
/// and `expired`, the verdict it writes when it changes, which is what
/// replicates. NULL / 0 for old rows: a row with a heartbeat and no owner is
/// judged by whichever POP holds that heartbeat, as before.
const LIFECYCLE_COLUMNS: [(&str, &str); 5] = [
    (
        "draining",
        "ALTER TABLE backends ADD COLUMN draining INTEGER NOT NULL DEFAULT 0",
    ),
    (
        "last_heartbeat_ms",
        "ALTER TABLE backends ADD COLUMN last_heartbeat_ms INTEGER",
    ),
    (
        "registered_at_ms",
        "ALTER TABLE backends ADD COLUMN registered_at_ms INTEGER",
    ),
    (
        "expired",
        "ALTER TABLE backends ADD COLUMN expired INTEGER NOT NULL DEFAULT 0",
    ),
    (
        "heartbeat_pop",
        "ALTER TABLE backends ADD COLUMN heartbeat_pop TEXT",
    ),
];

/// Migration 3: the POPs of the cluster, one row per node, written by each
/// node about itself and replicated (see `crate::replication`). Addresses
/// are text: `public_addrs` a comma-separated list of IPs, the others
/// `ip:port` (or empty).
const CREATE_POPS: &str = "CREATE TABLE IF NOT EXISTS pops (
    node_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    region TEXT NOT NULL,
    country TEXT,
    public_addrs TEXT NOT NULL DEFAULT '',
    private_addr TEXT NOT NULL DEFAULT '',
    gossip_addr TEXT NOT NULL DEFAULT '',
    transport_addr TEXT NOT NULL DEFAULT '',
    wg_public_key TEXT NOT NULL DEFAULT '',
    wg_endpoint TEXT NOT NULL DEFAULT '',
    prefix6 TEXT NOT NULL DEFAULT '',
    draining INTEGER NOT NULL DEFAULT 0,
    serving INTEGER NOT NULL DEFAULT 1
)";

/// Which kind of write last changed a backend since replication last read
/// the change log (`crate::replication::db`): `deliberate = 0` for this
/// POP's verdicts (an expiry, a heartbeat taken over), 1 for a
/// registration. A verdict changes only `expired` and `heartbeat_pop`, but
/// so does a registration that repeats the row: only the writer knows which
/// it was. At most one row per backend; never replicated.
const CREATE_WRITE_KINDS: &str = "CREATE TABLE IF NOT EXISTS repl_write_kinds (
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    deliberate INTEGER NOT NULL,
    PRIMARY KEY (tbl, pk)
)";

/// Notes that `id`'s row was just written by a verdict, unless a
/// registration wrote it too since replication last looked.
const NOTE_VERDICT: &str = "INSERT INTO repl_write_kinds (tbl, pk, deliberate) \
     VALUES ('backends', ?1, 0) ON CONFLICT (tbl, pk) DO NOTHING";

/// Notes that `id`'s row was just written by a registration.
const NOTE_REGISTRATION: &str = "INSERT INTO repl_write_kinds (tbl, pk, deliberate) \
     VALUES ('backends', ?1, 1) ON CONFLICT (tbl, pk) DO UPDATE SET deliberate = 1";

/// Migration 4: a backend's own health-check settings, as the registration
/// API received them (JSON text, see `health::spec::CheckOverride`).
/// Nullable: NULL means the app's settings. This POP's check results are
/// never stored: they are local, and this table replicates.
const HEALTH_CHECK_COLUMN: (&str, &str) = (
    "health_check",
    "ALTER TABLE backends ADD COLUMN health_check TEXT",
);

/// Migration 5: each POP's own verdict on whether it can serve (its
/// listeners are up and some app they carry has a healthy backend), written
/// by the POP about itself (`crate::steering`) so the others' GeoDNS can
/// leave it out. A row from before says nothing: it counts as serving.
const ADD_POPS_SERVING: &str = "ALTER TABLE pops ADD COLUMN serving INTEGER NOT NULL DEFAULT 1";

/// Schema version recorded in `PRAGMA user_version` (the original leaves it
/// at 0). 1 = `backends` has a `country` column; 2 = it also has the
/// [`Lifecycle`] columns; 3 = `expired` and `heartbeat_pop` too, and the
/// `pops` table; 4 = `backends.health_check` too; 5 = `pops.serving`.
/// Replicating POPs must all be at the same version (they refuse each other
/// otherwise): bump it with every change to a replicated table.
pub const SCHEMA_VERSION: i64 = 5;

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Columns `load` needs. `country` is optional (read as NULL when absent, e.g.
/// in a read-only file the migration could not touch).
const REQUIRED_COLUMNS: [&str; 10] = [
    "id",
    "app",
    "region",
    "wg_ip",
    "port",
    "healthy",
    "weight",
    "soft_limit",
    "hard_limit",
    "deleted",
];

/// What went wrong with the routing store. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite could not open the file (missing directory, permissions, ...).
    #[error("cannot open routing store {}: {cause}", .path.display())]
    Open {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// The file exists but SQLite cannot open it because its directory is
    /// not writable (a read-only mount, permissions): a WAL database needs
    /// its `-wal` and `-shm` files next to it. SQLite says only "unable to
    /// open database file", which reads as a wrong path.
    #[error(
        "cannot open routing store {}: its directory {} is not writable ({why}), and SQLite \
         keeps the store's -wal and -shm files there: {cause}",
        .path.display(), .dir.display()
    )]
    DirNotWritable {
        path: PathBuf,
        dir: PathBuf,
        why: io::Error,
        cause: rusqlite::Error,
    },
    /// The file exists but is not an SQLite database, or is corrupt.
    #[error("routing store {} is not a database or is corrupt: {cause}", .path.display())]
    NotADatabase {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// Creating or upgrading the `backends` table failed.
    #[error("cannot migrate routing store {}: {cause}", .path.display())]
    Migrate {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// Reading the table failed.
    #[error("cannot read routing store {}: {cause}", .path.display())]
    Read {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// Writing a backend failed.
    #[error("cannot write routing store {}: {cause}", .path.display())]
    Write {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// The file could not be stat'ed (typically: it was removed).
    #[error("cannot stat routing store {}: {cause}", .path.display())]
    Stat { path: PathBuf, cause: io::Error },
    /// The database has no `backends` table (e.g. replaced by another file).
    #[error("routing store {} has no backends table", .path.display())]
    NoBackendsTable { path: PathBuf },
    /// The `backends` table lacks columns the proxy needs.
    #[error("routing store {}: table backends lacks column(s) {}", .path.display(), .missing.join(", "))]
    MissingColumns { path: PathBuf, missing: Vec<String> },
    /// The store is read as it is in the file, without being opened for
    /// writing (see [`RoutingStore::open`]): nothing was written.
    #[error(
        "routing store {} cannot be written: {why}; routing goes on from the table as it is \
         in the file until it can ({cause})",
        .path.display()
    )]
    NotWritable {
        path: PathBuf,
        /// What keeps it from being written ("the disk is full (0 bytes
        /// free)").
        why: String,
        /// `why` is a full disk.
        full: bool,
        /// The error of the last attempt to open it for writing.
        cause: String,
    },
}

impl StoreError {
    /// The underlying SQLite error, if there is one.
    pub fn sqlite_error(&self) -> Option<&rusqlite::Error> {
        match self {
            StoreError::Open { cause, .. }
            | StoreError::DirNotWritable { cause, .. }
            | StoreError::NotADatabase { cause, .. }
            | StoreError::Migrate { cause, .. }
            | StoreError::Read { cause, .. }
            | StoreError::Write { cause, .. } => Some(cause),
            _ => None,
        }
    }

    /// A write failed, or was refused, for want of room on the disk.
    pub fn disk_full(&self) -> bool {
        match self {
            StoreError::NotWritable { full, .. } => *full,
            e => e
                .sqlite_error()
                .and_then(rusqlite::Error::sqlite_error_code)
                .is_some_and(|c| c == ErrorCode::DiskFull),
        }
    }
}

/// The directory of `path` and why it cannot be written, if it cannot
/// (`access(2)`, so a read-only mount counts even for root).
fn unwritable_dir(path: &Path) -> Option<(PathBuf, io::Error)> {
    use std::os::unix::ffi::OsStrExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        return None;
    }
    Some((dir, io::Error::last_os_error()))
}

#[derive(Clone, Copy)]
enum Op {
    Open,
    Migrate,
    Read,
    Write,
}

fn sql_err(path: &Path, op: Op, cause: rusqlite::Error) -> StoreError {
    let path = path.to_path_buf();
    if matches!(
        cause.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    ) {
        return StoreError::NotADatabase { path, cause };
    }
    match op {
        Op::Open if cause.sqlite_error_code() == Some(ErrorCode::CannotOpen) && path.is_file() => {
            match unwritable_dir(&path) {
                Some((dir, why)) => StoreError::DirNotWritable {
                    path,
                    dir,
                    why,
                    cause,
                },
                None => StoreError::Open { path, cause },
            }
        }
        Op::Open => StoreError::Open { path, cause },
        Op::Migrate => StoreError::Migrate { path, cause },
        Op::Read => StoreError::Read { path, cause },
        Op::Write => StoreError::Write { path, cause },
    }
}

/// A row's discovery-API state (migration 2 and 3 columns). All times are
/// Unix milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lifecycle {
    /// Drained: takes no new connections; open ones go on.
    pub draining: bool,
    /// Last registration or heartbeat received by this POP (never
    /// replicated). `None`: this POP has no heartbeat for the row.
    pub last_heartbeat_ms: Option<i64>,
    /// First registration (reset when a deleted id registers again).
    pub registered_at_ms: Option<i64>,
    /// The POP that receives the backend's heartbeats and judges its expiry.
    pub heartbeat_pop: Option<String>,
    /// That POP's verdict: the heartbeat is too old.
    pub expired: bool,
}

/// A row of the `pops` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PopRow {
    pub node_id: String,
    pub name: String,
    pub region: String,
    pub country: Option<String>,
    /// Comma-separated IPs.
    pub public_addrs: String,
    pub private_addr: String,
    pub gossip_addr: String,
    pub transport_addr: String,
    /// The POP's operator drained it (`edgeproxy drain`).
    pub draining: bool,
    /// The POP's WireGuard public key (base64), its WireGuard endpoint
    /// (`ip:port`) and its 6PN /64; empty without the mesh (`crate::mesh`).
    pub wg_public_key: String,
    pub wg_endpoint: String,
    pub prefix6: String,
    /// The POP's own verdict: it can serve (see `crate::steering`).
    pub serving: bool,
}

/// What [`RoutingStore::register`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// No live row had this id: one was inserted (or a deleted one revived).
    Created,
    /// A live row with this id was updated in place.
    Updated,
}

/// Every row of `backends`, as read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// Rows that could be read, deleted ones included, in table order.
    pub records: Vec<BackendRecord>,
    /// The discovery-API state of each row of `records`, at the same index.
    pub lifecycle: Vec<Lifecycle>,
    /// Each row's own health-check settings (JSON text), at the same index.
    pub health_checks: Vec<Option<String>>,
    /// Rows that could not: (id, or `"rowid N"` when the id itself is
    /// unreadable; reason).
    pub bad_rows: Vec<(String, String)>,
}

/// Identity and version of a file: which file (dev, inode) and whether its
/// contents may have changed (size, mtime, ctime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: Option<SystemTime>,
    ctime: (i64, i64),
}

impl FileStamp {
    #[cfg(unix)]
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: meta.modified().ok(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    #[cfg(not(unix))]
    fn of(meta: &std::fs::Metadata) -> Self {
        FileStamp {
            dev: 0,
            ino: 0,
            size: meta.len(),
            mtime: meta.modified().ok(),
            ctime: (0, 0),
        }
    }

    fn same_file(&self, other: &FileStamp) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// Everything [`RoutingStore::changed`] compares against the last load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    /// `PRAGMA data_version` on our connection: moves when another connection
    /// commits.
    data_version: i64,
    main: FileStamp,
    // Not the `-wal` file: it grows while a commit is being written, before
    // the commit is visible (and when a big transaction spills, before it
    // commits at all). Reloading then re-reads the old table and announces
    // it as a reload. `data_version` moves once a commit is visible.
}

/// The open connection and the main file as that connection last knew it.
/// When the file on disk no longer matches `stamp`, it was replaced or
/// rewritten behind SQLite's back and the connection (and its page cache) is
/// thrown away.
#[derive(Debug)]
struct Live {
    conn: Connection,
    stamp: FileStamp,
    /// An immutable connection (see [`connect_immutable`]): reads only.
    read_only: bool,
}

/// The routing table on disk. See the module docs.
#[derive(Debug)]
pub struct RoutingStore {
    path: PathBuf,
    /// `None` after an error or before the first successful reopen; the next
    /// call opens a fresh connection.
    live: Option<Live>,
    /// Whether `live` can write, and why not.
    access: Access,
    /// State at the last successful `load`.
    seen: Option<Fingerprint>,
    /// This store wrote since the last `load`. (`data_version` does not move
    /// for a connection's own commits.)
    dirty: bool,
    /// When the table last changed as far as this store knows (a load, a
    /// write, a WAL fold): the WAL is folded back once this is
    /// [`QUIET_BEFORE_CHECKPOINT`] old.
    last_activity: Instant,
    /// [`QUIET_BEFORE_CHECKPOINT`], or zero in tests.
    quiet_before_checkpoint: Duration,
    /// This POP's node id: registrations and heartbeats received here make
    /// it the backend's `heartbeat_pop`.
    node_id: Option<String>,
    /// When this process took the node id (Unix ms), and the ids of the
    /// backends already said to have no heartbeat recorded here (see
    /// [`RoutingStore::assume_heard_at_start`]).
    judging_since: (i64, HashSet<String>),
}

/// How long the table must stay unchanged before [`RoutingStore::changed`]
/// folds the WAL back into the main file. A checkpoint writes and `fsync`s
/// the main file: done on every reload it was a third of the control thread's
/// CPU per reload, taken from the shards' cores while routes change every
/// 100 ms. An empty WAL matters only for an operator's `mv new.db routing.db`
/// (see [`retire`]), which happens when the table is quiet.
const QUIET_BEFORE_CHECKPOINT: Duration = Duration::from_secs(1);

/// A WAL this big is folded on the next load even while changes keep coming,
/// so a table that never goes quiet does not grow its WAL without bound
/// (SQLite's own auto-checkpoint runs only in the writing connection).
const CHECKPOINT_WAL_BYTES: u64 = 1 << 20;

impl RoutingStore {
    /// Opens `path`, creating the file if it is missing, in WAL mode with a
    /// busy timeout, and brings the schema up to date: creates `backends` if
    /// absent (the original's exact table), adds `country` if absent, records
    /// [`SCHEMA_VERSION`] in `PRAGMA user_version`.
    ///
    /// An existing file that the disk keeps from being opened for writing
    /// (full, read-only) is read as it is instead: SQLite cannot even read a
    /// WAL database without creating its 32 KiB `-shm`, and a clean stop
    /// removes it, so a POP stopped cleanly could not start again on a full
    /// disk (a reboot with `/var` full of logs). Writes are then refused
    /// ([`StoreError::NotWritable`]), said once at ERROR, and the read-write
    /// open is tried again every few seconds (see [`fresh`]), then said at
    /// INFO. A WAL left with rows in it (a crash) is not read that way: an
    /// immutable read would miss them. A file that does not exist yet still
    /// has to be created: that fails on a full disk.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let exists = path.try_exists().map_err(|cause| StoreError::Stat {
            path: path.to_path_buf(),
            cause,
        })?;
        if !exists {
            info!(path = %path.display(), "routing store does not exist, creating it");
        }
        let mut access = Access::new();
        let opened = connect(path, true).and_then(|mut conn| {
            migrate(&mut conn, path, true)?;
            Ok(conn)
        });
        let live = match opened {
            Ok(conn) => Live {
                conn,
                stamp: stat_main(path)?,
                read_only: false,
            },
            Err(e) if exists => read_only_instead(path, e, &mut access)?,
            Err(e) => return Err(e),
        };
        Ok(RoutingStore {
            path: path.to_path_buf(),
            live: Some(live),
            access,
            seen: None,
            dirty: false,
            last_activity: Instant::now(),
            quiet_before_checkpoint: QUIET_BEFORE_CHECKPOINT,
            node_id: None,
            judging_since: (0, HashSet::new()),
        })
    }

    /// Sets this POP's node id (see [`Lifecycle::heartbeat_pop`]).
    pub fn set_node_id(&mut self, id: &str) {
        self.node_id = Some(id.to_string());
        self.judging_since.0 = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64);
    }

    /// A backend whose heartbeats this POP judges (`heartbeat_pop` is this
    /// node) but with no heartbeat recorded here: the database was copied
    /// from another POP, or rebuilt by replication after a loss
    /// (`last_heartbeat_ms` never replicates). Its expiry counted from
    /// nothing, so its verdict stayed "not expired" for good, though no
    /// heartbeat may ever come (QA, 2026-12-05). One not expired now counts
    /// as heard when this process took the node id, and that instant is
    /// written into the row: it has one heartbeat TTL to heartbeat again,
    /// once (a later start finds the instant, not nothing, and does not
    /// grant the TTL again). One already expired keeps its verdict
    /// (`routing::row_expired`). Said once per backend.
    fn assume_heard_at_start(&mut self, loaded: &mut Loaded) {
        let Some(me) = self.node_id.as_deref() else {
            return;
        };
        let since = self.judging_since.0;
        let mut new = Vec::new();
        for (rec, life) in loaded.records.iter().zip(loaded.lifecycle.iter_mut()) {
            if life.last_heartbeat_ms.is_none()
                && !life.expired
                && !rec.deleted
                && life.heartbeat_pop.as_deref() == Some(me)
            {
                life.last_heartbeat_ms = Some(since);
                if self.judging_since.1.insert(rec.id.clone()) {
                    new.push(rec.id.clone());
                }
            }
        }
        if new.is_empty() {
            return;
        }
        warn!(
            path = %self.path.display(),
            backends = %new.join(", "),
            "backends this POP judges have no heartbeat recorded here (database copied or rebuilt?): \
             they count as heard at start and expire unless they heartbeat within the TTL"
        );
        // Not a replicated column (no change-log entry) and no route moves.
        let written = self.write_quiet(|conn| {
            let mut stmt = conn.prepare_cached(
                "UPDATE backends SET last_heartbeat_ms = ?1 \
                 WHERE id = ?2 AND last_heartbeat_ms IS NULL",
            )?;
            for id in &new {
                stmt.execute(params![since, id])?;
            }
            Ok(())
        });
        if let Err(e) = written {
            // Granted again at the next start, no worse than before.
            warn!(error = %e, "cannot record when the backends without a heartbeat count as heard");
        }
    }

    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// False while the store is read as it is in the file because it cannot
    /// be opened for writing (see [`RoutingStore::open`]); shared, for the
    /// metrics.
    pub fn writable_flag(&self) -> Arc<AtomicBool> {
        self.access.writable.clone()
    }

    /// Reads every row, deleted ones included (the snapshot builder filters
    /// them). Rows with unreadable values go to [`Loaded::bad_rows`].
    pub fn load(&mut self) -> Result<Loaded, StoreError> {
        let result = self.load_inner();
        if result.is_err() {
            self.live = None;
        }
        result
    }

    fn load_inner(&mut self) -> Result<Loaded, StoreError> {
        let path = &self.path;
        let (live, _) = fresh(path, &mut self.live, &mut self.access, Retry::IfDue)?;
        // A busy table's WAL is folded here once it is big; a quiet table's
        // by `changed` (see `QUIET_BEFORE_CHECKPOINT`).
        if wal_len(path)? > CHECKPOINT_WAL_BYTES && checkpoint(&live.conn, path, BUSY_TIMEOUT).ran()
        {
            live.stamp = stat_main(path)?;
        }
        // Before reading: a commit that lands in between shows up as a change
        // on the next tick instead of being missed.
        let fp = fingerprint(&live.conn, path)?;
        let mut loaded = read_rows(&live.conn, path, None)?;
        self.seen = Some(fp);
        self.dirty = false;
        self.last_activity = Instant::now();
        self.assume_heard_at_start(&mut loaded);
        Ok(loaded)
    }

    /// True if anything may have changed since the last [`load`]: another
    /// connection committed, this store wrote, or the file (or its WAL) was
    /// rewritten or replaced. Does not read rows. A replaced file gets a new
    /// connection.
    ///
    /// [`load`]: RoutingStore::load
    pub fn changed(&mut self) -> Result<bool, StoreError> {
        let result = self.changed_inner();
        if result.is_err() {
            self.live = None;
        }
        result
    }

    fn changed_inner(&mut self) -> Result<bool, StoreError> {
        let (live, reopened) = fresh(&self.path, &mut self.live, &mut self.access, Retry::IfDue)?;
        if reopened {
            return Ok(true);
        }
        let fp = fingerprint(&live.conn, &self.path)?;
        if self.dirty || self.seen != Some(fp) {
            return Ok(true);
        }
        if self.last_activity.elapsed() >= self.quiet_before_checkpoint {
            return self.fold_quiet_wal(fp);
        }
        Ok(false)
    }

    /// Folds the WAL into the main file when the table has been quiet, so a
    /// later `mv new.db routing.db` finds it empty. `seen` is the fingerprint
    /// that still matches the last load. Returns whether the table changed
    /// meanwhile (another connection committed between the two looks).
    fn fold_quiet_wal(&mut self, seen: Fingerprint) -> Result<bool, StoreError> {
        self.last_activity = Instant::now();
        let path = &self.path;
        let Some(live) = self.live.as_mut() else {
            return Ok(true);
        };
        if wal_len(path)? == 0 {
            return Ok(false);
        }
        // Folded or not, the checkpoint may have rewritten the main file (in
        // part when it fails: a full disk lets it overwrite pages but not
        // add any, and it is tried again every quiet second). That is our
        // doing, not a change of the table, nor a reason to reopen, unless
        // the path now names another file. Taken for a change, a full disk
        // reloaded the table every second, each time with an INFO line.
        checkpoint(&live.conn, path, BUSY_TIMEOUT);
        let stamp = stat_main(path)?;
        if !stamp.same_file(&live.stamp) {
            return Ok(true);
        }
        live.stamp = stamp;
        let after = fingerprint(&live.conn, path)?;
        if after.data_version != seen.data_version {
            return Ok(true);
        }
        self.seen = Some(after);
        Ok(false)
    }

    /// Inserts the backend, or updates the row with its id in place, in one
    /// transaction.
    pub fn upsert(&mut self, rec: &BackendRecord) -> Result<(), StoreError> {
        self.write(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let values = params![
                rec.app,
                rec.region,
                rec.country,
                rec.ip,
                rec.port,
                rec.healthy,
                rec.weight,
                rec.soft_limit,
                rec.hard_limit,
                rec.deleted,
                rec.id,
            ];
            // UPDATE-then-INSERT rather than ON CONFLICT: works on hand-made
            // tables without a primary key, and keeps the rowid (table order).
            let updated = tx.execute(
                "UPDATE backends SET app = ?1, region = ?2, country = ?3, wg_ip = ?4, \
                 port = ?5, healthy = ?6, weight = ?7, soft_limit = ?8, hard_limit = ?9, \
                 deleted = ?10 WHERE id = ?11",
                values,
            )?;
            if updated == 0 {
                tx.execute(
                    "INSERT INTO backends (app, region, country, wg_ip, port, healthy, weight, \
                     soft_limit, hard_limit, deleted, id) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    values,
                )?;
            }
            tx.commit()
        })
    }

    /// Marks the backend deleted (`deleted = 1`; the row stays, as in the
    /// original). Returns whether a row with that id existed.
    pub fn mark_deleted(&mut self, id: &str) -> Result<bool, StoreError> {
        self.write(|conn| {
            conn.execute("UPDATE backends SET deleted = 1 WHERE id = ?1", [id])
                .map(|n| n > 0)
        })
    }

    /// Registers a backend (the discovery API's register), in one
    /// transaction: a live row with `rec.id` is updated in place, keeping its
    /// rowid and `registered_at_ms`; otherwise the row is inserted, or a
    /// deleted row with that id is revived as a new registration. Either way
    /// the backend ends up healthy, not deleted, not draining, with its
    /// heartbeat at `now_ms`, and this POP as its `heartbeat_pop`.
    /// `rec.healthy` and `rec.deleted` are ignored.
    pub fn register(&mut self, rec: &BackendRecord, now_ms: i64) -> Result<Registered, StoreError> {
        let owner = self.node_id.clone();
        self.write(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let live: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM backends WHERE id = ?1 AND (deleted IS NULL OR deleted = 0))",
                [&rec.id],
                |r| r.get(0),
            )?;
            let values = params![
                rec.app,
                rec.region,
                rec.country,
                rec.ip,
                rec.port,
                rec.weight,
                rec.soft_limit,
                rec.hard_limit,
                now_ms,
                rec.id,
                owner,
            ];
            // SET expressions see the row as it was: `deleted` in the CASE is
            // the old value.
            let updated = tx.execute(
                "UPDATE backends SET app = ?1, region = ?2, country = ?3, wg_ip = ?4, \
                 port = ?5, healthy = 1, weight = ?6, soft_limit = ?7, hard_limit = ?8, \
                 draining = 0, last_heartbeat_ms = ?9, expired = 0, heartbeat_pop = ?11, \
                 registered_at_ms = CASE WHEN deleted IS NULL OR deleted = 0 \
                   THEN COALESCE(registered_at_ms, ?9) ELSE ?9 END, \
                 deleted = 0 WHERE id = ?10",
                values,
            )?;
            if updated == 0 {
                tx.execute(
                    "INSERT INTO backends (app, region, country, wg_ip, port, healthy, weight, \
                     soft_limit, hard_limit, deleted, draining, last_heartbeat_ms, \
                     registered_at_ms, expired, heartbeat_pop, id) \
                     VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?8, 0, 0, ?9, ?9, 0, ?11, ?10)",
                    values,
                )?;
            }
            // A registration that repeats the row changes only what a
            // verdict changes; it is a decision all the same.
            tx.execute(NOTE_REGISTRATION, [&rec.id])?;
            tx.commit()?;
            Ok(if live {
                Registered::Updated
            } else {
                Registered::Created
            })
        })
    }

    /// Records a heartbeat at `now_ms` for a live (not deleted) backend;
    /// returns whether there was one.
    ///
    /// A heartbeat by itself changes no route, so unlike other writes it does
    /// not make [`changed`] say yes (when nothing else changed since the last
    /// load): a fleet of heartbeating backends does not rebuild the snapshot
    /// every tick, and nothing replicates. Only when this POP was not the
    /// backend's `heartbeat_pop`, or the backend was expired, does the
    /// heartbeat change the row (this POP takes it over, the verdict is
    /// cleared) — a write that replicates once. A caller whose heartbeat
    /// revives an expired backend reloads on its own.
    ///
    /// [`changed`]: RoutingStore::changed
    pub fn heartbeat(&mut self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let owner = self.node_id.clone();
        let found = self.write_quiet(|conn| {
            let row: Option<(Option<String>, bool)> = conn
                .query_row(
                    "SELECT heartbeat_pop, expired FROM backends \
                     WHERE id = ?1 AND (deleted IS NULL OR deleted = 0)",
                    [id],
                    |r| Ok((r.get(0)?, r.get::<_, Option<bool>>(1)?.unwrap_or(false))),
                )
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            let Some((pop, expired)) = row else {
                return Ok(None);
            };
            // Already ours and serving: only the (local) time moves.
            let quiet = !expired && (owner.is_none() || pop == owner);
            if quiet {
                conn.execute(
                    "UPDATE backends SET last_heartbeat_ms = ?1 \
                     WHERE id = ?2 AND (deleted IS NULL OR deleted = 0)",
                    params![now_ms, id],
                )?;
            }
            Ok(Some(quiet))
        })?;
        match found {
            None => Ok(false),
            Some(true) => Ok(true),
            // The row changes hands or comes back from expiry: a real write.
            Some(false) => self.write(|conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let changed = tx.execute(
                    "UPDATE backends SET last_heartbeat_ms = ?1, heartbeat_pop = ?2, expired = 0 \
                     WHERE id = ?3 AND (deleted IS NULL OR deleted = 0)",
                    params![now_ms, owner, id],
                )? > 0;
                if changed {
                    tx.execute(NOTE_VERDICT, [id])?;
                }
                tx.commit()?;
                Ok(changed)
            }),
        }
    }

    /// Records expiry verdicts (`expired` column) for backends whose
    /// heartbeats this POP judges. Rows already at the verdict are left
    /// alone, so nothing replicates for them. Quiet like a heartbeat: the
    /// caller has already routed by these verdicts; the write is for the
    /// other POPs (the change log's triggers see it).
    pub fn set_expired(&mut self, verdicts: &[(String, bool)]) -> Result<(), StoreError> {
        if verdicts.is_empty() {
            return Ok(());
        }
        self.write_quiet(|conn| {
            let mut stmt = conn.prepare_cached(
                "UPDATE backends SET expired = ?1 WHERE id = ?2 AND expired IS NOT ?1",
            )?;
            let mut note = conn.prepare_cached(NOTE_VERDICT)?;
            for (id, expired) in verdicts {
                if stmt.execute(params![expired, id])? > 0 {
                    note.execute([id])?;
                }
            }
            Ok(())
        })
    }

    /// Sets or clears a live backend's own health-check settings (JSON
    /// text); returns whether there was one.
    pub fn set_health_check(&mut self, id: &str, check: Option<&str>) -> Result<bool, StoreError> {
        self.write(|conn| {
            conn.execute(
                "UPDATE backends SET health_check = ?1 WHERE id = ?2 AND (deleted IS NULL OR deleted = 0)",
                params![check, id],
            )
            .map(|n| n > 0)
        })
    }

    /// Sets or clears `draining` on a live backend; returns whether there was
    /// one.
    pub fn set_draining(&mut self, id: &str, draining: bool) -> Result<bool, StoreError> {
        self.write(|conn| {
            conn.execute(
                "UPDATE backends SET draining = ?1 WHERE id = ?2 AND (deleted IS NULL OR deleted = 0)",
                params![draining, id],
            )
            .map(|n| n > 0)
        })
    }

    /// Like [`mark_deleted`], but only for a live row: returns false for an
    /// id that is unknown or already deleted (the API's 404).
    ///
    /// [`mark_deleted`]: RoutingStore::mark_deleted
    pub fn deregister(&mut self, id: &str) -> Result<bool, StoreError> {
        self.write(|conn| {
            conn.execute(
                "UPDATE backends SET deleted = 1 WHERE id = ?1 AND (deleted IS NULL OR deleted = 0)",
                [id],
            )
            .map(|n| n > 0)
        })
    }

    /// Every row of `pops` (empty if the table does not exist yet). Rows
    /// with unreadable values are skipped.
    pub fn load_pops(&mut self) -> Result<Vec<PopRow>, StoreError> {
        let path = &self.path;
        let opened = fresh(path, &mut self.live, &mut self.access, Retry::IfDue);
        let result = opened.and_then(|(live, _)| {
            let err = |e| sql_err(path, Op::Read, e);
            if !has_table(&live.conn, "pops").map_err(err)? {
                return Ok(Vec::new());
            }
            // A file this version could not migrate (read-only) may lack
            // `serving`: such a POP counts as serving.
            let serving = match pops_columns(&live.conn)
                .map_err(err)?
                .iter()
                .any(|c| c == "serving")
            {
                true => "serving",
                false => "1",
            };
            let mut stmt = live
                .conn
                .prepare_cached(&format!(
                    "SELECT node_id, name, region, country, public_addrs, private_addr, \
                     gossip_addr, transport_addr, draining, {serving}, wg_public_key, \
                     wg_endpoint, prefix6 FROM pops ORDER BY node_id",
                ))
                .map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(PopRow {
                        node_id: r.get(0)?,
                        name: r.get(1)?,
                        region: r.get(2)?,
                        country: r.get(3)?,
                        public_addrs: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                        private_addr: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                        gossip_addr: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
                        transport_addr: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
                        draining: r.get::<_, Option<bool>>(8)?.unwrap_or(false),
                        serving: r.get::<_, Option<bool>>(9)?.unwrap_or(true),
                        wg_public_key: r.get::<_, Option<String>>(10)?.unwrap_or_default(),
                        wg_endpoint: r.get::<_, Option<String>>(11)?.unwrap_or_default(),
                        prefix6: r.get::<_, Option<String>>(12)?.unwrap_or_default(),
                    })
                })
                .map_err(err)?;
            Ok(rows.filter_map(Result::ok).collect())
        });
        if result.is_err() {
            self.live = None;
        }
        result
    }

    /// Reads every row like [`load`], but leaves change detection alone: the
    /// next [`changed`] answers as if this read had not happened. For readers
    /// other than the reloader (the discovery API's GETs).
    ///
    /// [`load`]: RoutingStore::load
    /// [`changed`]: RoutingStore::changed
    pub fn peek(&mut self) -> Result<Loaded, StoreError> {
        self.peek_rows(None)
    }

    /// [`peek`] of the rows with id `id` only (one, or none): what one
    /// backend's `GET` reads, by the index instead of the whole table.
    ///
    /// [`peek`]: RoutingStore::peek
    pub fn peek_one(&mut self, id: &str) -> Result<Loaded, StoreError> {
        self.peek_rows(Some(id))
    }

    fn peek_rows(&mut self, only: Option<&str>) -> Result<Loaded, StoreError> {
        let result = fresh(&self.path, &mut self.live, &mut self.access, Retry::IfDue)
            .and_then(|(live, _)| read_rows(&live.conn, &self.path, only));
        match result {
            Ok(mut loaded) => {
                self.assume_heard_at_start(&mut loaded);
                Ok(loaded)
            }
            Err(e) => {
                self.live = None;
                Err(e)
            }
        }
    }

    /// [`write`] for a change that moves no route: when nothing else changed
    /// since the last load, the store stays "unchanged" afterwards.
    ///
    /// [`write`]: RoutingStore::write
    fn write_quiet<T>(
        &mut self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let path = &self.path;
        let (seen, dirty) = (self.seen, self.dirty);
        let access = &mut self.access;
        let opened = fresh(path, &mut self.live, access, Retry::Now);
        let result = opened.and_then(|(live, reopened)| {
            if live.read_only {
                return Err(access.refusal(path));
            }
            let err = |e| sql_err(path, Op::Write, e);
            let (out, before) = {
                let tx = live
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(err)?;
                // Under the write lock no one else can commit: if the file is
                // still as the last load saw it, our commit is the only change.
                let before = match (reopened || dirty, seen) {
                    (false, Some(seen)) => {
                        let now = fingerprint(&tx, path)?;
                        (now == seen).then_some(now)
                    }
                    _ => None,
                };
                let out = f(&tx).map_err(err)?;
                tx.commit().map_err(err)?;
                (out, before)
            };
            live.stamp = stat_main(path)?;
            let after = fingerprint(&live.conn, path)?;
            // `data_version` moves only for other connections' commits: if it
            // did not, the file differs from `before` by our write alone.
            let quiet = before.filter(|b| b.data_version == after.data_version);
            Ok((out, quiet.map(|_| after)))
        });
        if result.is_ok() {
            self.last_activity = Instant::now();
        }
        match result {
            Ok((out, Some(after))) => {
                self.seen = Some(after);
                Ok(out)
            }
            Ok((out, None)) => {
                self.dirty = true;
                Ok(out)
            }
            Err(e) => {
                forget_unless_refused(&mut self.live, &e);
                Err(e)
            }
        }
    }

    fn write<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let path = &self.path;
        let access = &mut self.access;
        let result = fresh(path, &mut self.live, access, Retry::Now).and_then(|(live, _)| {
            if live.read_only {
                return Err(access.refusal(path));
            }
            let out = f(&mut live.conn).map_err(|e| sql_err(path, Op::Write, e))?;
            // Our own write may have moved the main file (SQLite checkpoints
            // a big WAL itself); that is not a reason to distrust the
            // connection.
            live.stamp = stat_main(path)?;
            Ok(out)
        });
        match result {
            Ok(out) => {
                self.dirty = true;
                self.last_activity = Instant::now();
                Ok(out)
            }
            Err(e) => {
                forget_unless_refused(&mut self.live, &e);
                Err(e)
            }
        }
    }
}

/// Reads every row of an existing routing store without writing anything:
/// no file is created, no schema migrated (for `check-config`).
pub fn peek_read_only(path: &Path) -> Result<Loaded, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| sql_err(path, Op::Open, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sql_err(path, Op::Open, e))?;
    read_rows(&conn, path, None)
}

/// After a failed write: the connection is dropped (the next call opens a
/// fresh one), unless the write was refused before it was tried because the
/// store is read-only: that connection is still good for reading, and a
/// new one would count as a change of the table.
fn forget_unless_refused(slot: &mut Option<Live>, e: &StoreError) {
    if !matches!(e, StoreError::NotWritable { .. }) {
        *slot = None;
    }
}

/// Returns a connection that matches the file now on disk, opening a new one
/// if there is none or if the file was replaced or rewritten since the
/// connection last saw it. The bool says whether it was (re)opened.
///
/// A read-only connection (see [`RoutingStore::open`]) is replaced by a
/// read-write one as soon as the file can be opened for writing, tried when
/// `retry` says so; until then it is kept (a failed try is no change).
fn fresh<'a>(
    path: &Path,
    slot: &'a mut Option<Live>,
    access: &mut Access,
    retry: Retry,
) -> Result<(&'a mut Live, bool), StoreError> {
    if slot.as_ref().is_some_and(|l| l.read_only) && access.retry_due(retry) {
        match open_writable(path) {
            Ok(live) => {
                access.writable(path);
                return Ok((slot.insert(live), true));
            }
            Err(e) => match why_unwritable(path, &e) {
                Some(why) => access.unwritable(path, why, &e),
                // Something else is wrong now: said by the caller, and the
                // next call starts over.
                None => {
                    *slot = None;
                    return Err(e);
                }
            },
        }
    }
    let kept = match slot.take() {
        None => None,
        Some(live) => match stat_main(path) {
            Ok(now) if now == live.stamp => Some(live),
            Ok(now) if now.same_file(&live.stamp) => {
                debug!(path = %path.display(), "routing store rewritten in place, reopening");
                drop(live);
                None
            }
            Ok(_) => {
                debug!(path = %path.display(), "routing store replaced, reopening");
                retire(live, path);
                None
            }
            Err(e) => {
                retire(live, path);
                return Err(e);
            }
        },
    };
    let (live, reopened) = match kept {
        Some(live) => (live, false),
        None => (reopen(path, access)?, true),
    };
    Ok((slot.insert(live), reopened))
}

/// Opens a connection to an existing file (a missing file is an error here:
/// only `open` creates). Migrates `country` in if possible, but does not
/// create `backends`: a replacement file without the table is an error for
/// `load` to report, not an empty routing table.
fn reopen(path: &Path, access: &mut Access) -> Result<Live, StoreError> {
    match open_writable(path) {
        Ok(live) => {
            access.writable(path);
            Ok(live)
        }
        Err(e) => read_only_instead(path, e, access),
    }
}

fn open_writable(path: &Path) -> Result<Live, StoreError> {
    // Stat before opening: if the file changes between the two, the next
    // check sees a mismatch and reopens again, rather than trusting a
    // connection to a file it has not seen.
    let stamp = stat_main(path)?;
    let mut conn = connect(path, false)?;
    migrate(&mut conn, path, false)?;
    Ok(Live {
        conn,
        stamp,
        read_only: false,
    })
}

/// Opening `path` for writing failed with `e`: if the disk is what keeps
/// it from being written (see [`why_unwritable`]), an immutable connection
/// that reads the file as it is; otherwise `e`.
fn read_only_instead(path: &Path, e: StoreError, access: &mut Access) -> Result<Live, StoreError> {
    let Some(why) = why_unwritable(path, &e) else {
        return Err(e);
    };
    // An immutable connection does not read the WAL: committed rows still
    // in it would be missing. A clean stop folds and removes it; anything
    // left is refused, as before.
    if wal_len(path)? > 0 {
        return Err(e);
    }
    let stamp = stat_main(path)?;
    let conn = connect_immutable(path)?;
    // A file this version would migrate first (an upstream edgeProxy's,
    // one from an older release) lacks tables the POP writes at start
    // (`pops`): refused with the open's own error, which names the
    // directory, rather than failing later over a missing table.
    if needs_migration(&conn, false).unwrap_or(true) {
        return Err(e);
    }
    access.unwritable(path, why, &e);
    Ok(Live {
        conn,
        stamp,
        read_only: true,
    })
}

/// Closes a connection whose file was replaced or removed. Its `-wal` file is
/// named after the path, which now belongs to another file (or none), and
/// SQLite does not delete the WAL of a moved database on close: left with
/// frames in it, the next connection would replay the old database's pages
/// into the new file. Checkpoint and truncate it first. Best effort: if
/// another connection blocks the checkpoint, there is nothing more to do.
fn retire(live: Live, path: &Path) {
    checkpoint(&live.conn, path, BUSY_TIMEOUT);
    drop(live);
}

fn connect(path: &Path, create: bool) -> Result<Connection, StoreError> {
    // No SQLITE_OPEN_URI: the path is a file name, never a `file:` URI.
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let err = |e| sql_err(path, Op::Open, e);
    let conn = Connection::open_with_flags(path, flags).map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    // The first statement that reads the header: a non-database fails here.
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        warn!(path = %path.display(), journal_mode = %mode, "routing store could not switch to WAL mode");
    }
    Ok(conn)
}

struct SchemaState {
    has_table: bool,
    has_country: bool,
    /// Migration 2 columns not there yet (`ALTER TABLE` statements).
    missing_lifecycle: Vec<&'static str>,
    has_health_check: bool,
    version: i64,
}

fn schema_state(conn: &Connection) -> rusqlite::Result<SchemaState> {
    let columns = table_columns(conn)?;
    let version = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    Ok(SchemaState {
        has_table: !columns.is_empty(),
        has_country: columns.iter().any(|c| c == "country"),
        missing_lifecycle: LIFECYCLE_COLUMNS
            .iter()
            .filter(|(name, _)| !columns.iter().any(|c| c == name))
            .map(|(_, sql)| *sql)
            .collect(),
        has_health_check: columns.iter().any(|c| c == HEALTH_CHECK_COLUMN.0),
        version,
    })
}

fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |r| r.get(0),
    )
}

/// Column names of `pops`, lower case; empty if there is no such table.
fn pops_columns(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("PRAGMA table_info(pops)")?;
    let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
    names.map(|n| n.map(|n| n.to_ascii_lowercase())).collect()
}

/// Column names of `backends`, lower case; empty if there is no such table.
fn table_columns(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("PRAGMA table_info(backends)")?;
    let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
    names.map(|n| n.map(|n| n.to_ascii_lowercase())).collect()
}

/// Brings the schema to [`SCHEMA_VERSION`]. Writes nothing when there is
/// nothing to do (so reopening a current file leaves it untouched).
/// Whether `conn`'s file lacks something this version's schema has (a
/// table, a column, the version): what [`migrate`] would do.
fn needs_migration(conn: &Connection, create: bool) -> rusqlite::Result<bool> {
    let state = schema_state(conn)?;
    Ok(if state.has_table {
        !state.has_country
            || !state.missing_lifecycle.is_empty()
            || !has_table(conn, "pops")?
            || !has_table(conn, "repl_write_kinds")?
            || !state.has_health_check
            || state.version < SCHEMA_VERSION
    } else {
        create
    })
}

fn migrate(conn: &mut Connection, path: &Path, create: bool) -> Result<(), StoreError> {
    let err = |e| sql_err(path, Op::Migrate, e);
    let state = schema_state(conn).map_err(err)?;
    if state.version > SCHEMA_VERSION {
        warn!(
            path = %path.display(),
            version = state.version,
            supported = SCHEMA_VERSION,
            "routing store schema is newer than this edgeproxy; reading it anyway"
        );
    }
    if !needs_migration(conn, create).map_err(err)? {
        return Ok(());
    }

    let apply = |conn: &mut Connection| -> rusqlite::Result<(bool, bool, bool)> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Again under the write lock: another process may have migrated.
        let state = schema_state(&tx)?;
        let mut created = false;
        if !state.has_table {
            if !create {
                return Ok((false, false, false));
            }
            tx.execute_batch(CREATE_BACKENDS)?;
            created = true;
        }
        let added_country = !state.has_country;
        if added_country {
            tx.execute_batch(ADD_COUNTRY)?;
        }
        // (A table created just now lacks all of them.)
        for sql in &state.missing_lifecycle {
            tx.execute_batch(sql)?;
        }
        tx.execute_batch(CREATE_POPS)?;
        tx.execute_batch(CREATE_WRITE_KINDS)?;
        if !state.has_health_check {
            tx.execute_batch(HEALTH_CHECK_COLUMN.1)?;
        }
        if !pops_columns(&tx)?.iter().any(|c| c == "serving") {
            tx.execute_batch(ADD_POPS_SERVING)?;
        }
        if state.version < SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;
        Ok((created, added_country, !state.missing_lifecycle.is_empty()))
    };
    match apply(conn) {
        Ok((created, added_country, added_lifecycle)) => {
            if created {
                info!(path = %path.display(), "created table backends");
            }
            if added_country && !created {
                info!(path = %path.display(), "added column country to table backends");
            }
            if added_lifecycle && !created {
                info!(path = %path.display(),
                    "added columns draining, last_heartbeat_ms, registered_at_ms to table backends");
            }
            if state.has_table && !state.has_health_check {
                info!(path = %path.display(), "added column health_check to table backends");
            }
            Ok(())
        }
        // A read-only file that has the table is still usable: `load` reads
        // a missing country as NULL.
        Err(e) if state.has_table && e.sqlite_error_code() == Some(ErrorCode::ReadOnly) => {
            warn!(path = %path.display(), error = %e, "routing store is read-only; not migrating its schema");
            Ok(())
        }
        Err(e) => Err(err(e)),
    }
}

fn stat_main(path: &Path) -> Result<FileStamp, StoreError> {
    std::fs::metadata(path)
        .map(|m| FileStamp::of(&m))
        .map_err(|cause| StoreError::Stat {
            path: path.to_path_buf(),
            cause,
        })
}

fn wal_path(path: &Path) -> PathBuf {
    let mut p = OsString::from(path.as_os_str());
    p.push("-wal");
    PathBuf::from(p)
}

fn stat_wal(path: &Path) -> Result<Option<(u64, Option<SystemTime>)>, StoreError> {
    let wal = wal_path(path);
    match std::fs::metadata(&wal) {
        Ok(m) => Ok(Some((m.len(), m.modified().ok()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(cause) => Err(StoreError::Stat { path: wal, cause }),
    }
}

fn wal_len(path: &Path) -> Result<u64, StoreError> {
    Ok(stat_wal(path)?.map_or(0, |(len, _)| len))
}

fn fingerprint(conn: &Connection, path: &Path) -> Result<Fingerprint, StoreError> {
    let data_version = data_version(conn).map_err(|e| sql_err(path, Op::Read, e))?;
    Ok(Fingerprint {
        data_version,
        main: stat_main(path)?,
    })
}

/// `PRAGMA data_version`: moves when another connection commits. Cached:
/// this runs on every reload tick.
fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")
        .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
}

/// Every row of `backends`, or (`only`) those with that id.
fn read_rows(conn: &Connection, path: &Path, only: Option<&str>) -> Result<Loaded, StoreError> {
    let err = |e| sql_err(path, Op::Read, e);
    // One read transaction: the column check and the rows see the same file.
    let tx = conn.unchecked_transaction().map_err(err)?;
    let columns = table_columns(&tx).map_err(err)?;
    if columns.is_empty() {
        return Err(StoreError::NoBackendsTable {
            path: path.to_path_buf(),
        });
    }
    let missing: Vec<String> = REQUIRED_COLUMNS
        .iter()
        .filter(|c| !columns.iter().any(|have| have == *c))
        .map(|c| c.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(StoreError::MissingColumns {
            path: path.to_path_buf(),
            missing,
        });
    }
    // Columns a migration adds may be missing from a file that could not be
    // migrated (read-only): read them as their defaults.
    let or = |name: &'static str, default: &'static str| {
        if columns.iter().any(|c| c == name) {
            name
        } else {
            default
        }
    };
    let country = or("country", "NULL");
    let draining = or("draining", "0");
    let heartbeat = or("last_heartbeat_ms", "NULL");
    let registered = or("registered_at_ms", "NULL");
    let expired = or("expired", "0");
    let owner = or("heartbeat_pop", "NULL");
    let health_check = or(HEALTH_CHECK_COLUMN.0, "NULL");
    let sql = format!(
        "SELECT rowid, id, app, region, {country}, wg_ip, port, healthy, weight, \
         soft_limit, hard_limit, deleted, {draining}, {heartbeat}, {registered}, \
         {expired}, {owner}, {health_check} FROM backends {filter} ORDER BY rowid",
        filter = if only.is_some() { "WHERE id = ?1" } else { "" },
    );
    let mut loaded = Loaded::default();
    {
        let mut stmt = tx.prepare_cached(&sql).map_err(err)?;
        let mut rows = match only {
            Some(id) => stmt.query([id]),
            None => stmt.query([]),
        }
        .map_err(err)?;
        while let Some(row) = rows.next().map_err(err)? {
            match parse_row(row) {
                Ok((rec, lifecycle)) => {
                    // Read apart: a bad value there costs the backend its own
                    // check settings, not its route.
                    let check = match row.get_ref(17) {
                        Ok(ValueRef::Text(t)) => Some(String::from_utf8_lossy(t).into_owned()),
                        _ => None,
                    };
                    loaded.records.push(rec);
                    loaded.lifecycle.push(lifecycle);
                    loaded.health_checks.push(check);
                }
                Err(bad) => loaded.bad_rows.push(bad),
            }
        }
    }
    tx.commit().map_err(err)?;
    Ok(loaded)
}

/// Converts one row (columns in `read_rows`' SELECT order), or says why not:
/// (id or `"rowid N"`, every problem found).
fn parse_row(row: &Row<'_>) -> Result<(BackendRecord, Lifecycle), (String, String)> {
    let rowid = match row.get_ref(0) {
        Ok(ValueRef::Integer(n)) => n.to_string(),
        _ => "?".to_string(),
    };
    let label = match row.get_ref(1) {
        Ok(v) => match text(v, "id") {
            Ok(id) if !id.trim().is_empty() => id,
            _ => format!("rowid {rowid}"),
        },
        Err(_) => format!("rowid {rowid}"),
    };
    let mut problems = Vec::new();
    let p = &mut problems;
    let id = field(row, 1, "id", text, p);
    let app = field(row, 2, "app", text, p);
    let region = field(row, 3, "region", text, p);
    let country = field(row, 4, "country", optional_text, p);
    let ip = field(row, 5, "wg_ip", text, p);
    let port = field(row, 6, "port", integer, p);
    let healthy = field(row, 7, "healthy", boolean, p);
    let weight = field(row, 8, "weight", integer, p);
    let soft_limit = field(row, 9, "soft_limit", integer, p);
    let hard_limit = field(row, 10, "hard_limit", integer, p);
    let deleted = field(row, 11, "deleted", deleted_flag, p);
    let draining = field(row, 12, "draining", deleted_flag, p);
    let last_heartbeat_ms = field(row, 13, "last_heartbeat_ms", optional_integer, p);
    let registered_at_ms = field(row, 14, "registered_at_ms", optional_integer, p);
    let expired = field(row, 15, "expired", deleted_flag, p);
    let heartbeat_pop = field(row, 16, "heartbeat_pop", optional_text, p);
    let (
        Some(id),
        Some(app),
        Some(region),
        Some(country),
        Some(ip),
        Some(port),
        Some(healthy),
        Some(weight),
        Some(soft_limit),
        Some(hard_limit),
        Some(deleted),
        Some(draining),
        Some(last_heartbeat_ms),
        Some(registered_at_ms),
        Some(expired),
        Some(heartbeat_pop),
    ) = (
        id,
        app,
        region,
        country,
        ip,
        port,
        healthy,
        weight,
        soft_limit,
        hard_limit,
        deleted,
        draining,
        last_heartbeat_ms,
        registered_at_ms,
        expired,
        heartbeat_pop,
    )
    else {
        return Err((label, problems.join("; ")));
    };
    let lifecycle = Lifecycle {
        draining,
        last_heartbeat_ms,
        registered_at_ms,
        heartbeat_pop,
        expired,
    };
    let record = BackendRecord {
        id,
        app,
        region,
        country,
        ip,
        port,
        healthy,
        weight,
        soft_limit,
        hard_limit,
        deleted,
    };
    Ok((record, lifecycle))
}

type Convert<T> = fn(ValueRef<'_>, &str) -> Result<T, String>;

fn field<T>(
    row: &Row<'_>,
    idx: usize,
    name: &str,
    convert: Convert<T>,
    problems: &mut Vec<String>,
) -> Option<T> {
    let value = row
        .get_ref(idx)
        .map_err(|e| format!("{name}: {e}"))
        .and_then(|v| convert(v, name));
    match value {
        Ok(v) => Some(v),
        Err(problem) => {
            problems.push(problem);
            None
        }
    }
}

/// A value for an error message: the type, and the value itself if short.
fn describe(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Null => "NULL".to_string(),
        ValueRef::Integer(n) => format!("integer {n}"),
        ValueRef::Real(f) => format!("real {f}"),
        ValueRef::Text(b) => {
            let s = String::from_utf8_lossy(b);
            if s.chars().count() > 40 {
                let cut: String = s.chars().take(40).collect();
                format!("text {cut:?}...")
            } else {
                format!("text {s:?}")
            }
        }
        ValueRef::Blob(b) => format!("a {}-byte blob", b.len()),
    }
}

fn text(v: ValueRef<'_>, col: &str) -> Result<String, String> {
    match v {
        ValueRef::Null => Err(format!("{col} is NULL")),
        ValueRef::Text(b) => std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| format!("{col} is not valid UTF-8")),
        // Only in tables without column affinity; harmless to accept.
        ValueRef::Integer(n) => Ok(n.to_string()),
        other => Err(format!("{col}: expected text, found {}", describe(other))),
    }
}

/// `country`: NULL or blank means "no country".
fn optional_text(v: ValueRef<'_>, col: &str) -> Result<Option<String>, String> {
    match v {
        ValueRef::Null => Ok(None),
        v => text(v, col).map(|s| (!s.trim().is_empty()).then_some(s)),
    }
}

fn integer(v: ValueRef<'_>, col: &str) -> Result<i64, String> {
    let bad = |v| Err(format!("{col}: expected an integer, found {}", describe(v)));
    match v {
        ValueRef::Integer(n) => Ok(n),
        ValueRef::Null => Err(format!("{col} is NULL")),
        // 8080.0, from a tool that writes reals.
        ValueRef::Real(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        ValueRef::Text(b) => match std::str::from_utf8(b).ok().map(|s| s.trim().parse()) {
            Some(Ok(n)) => Ok(n),
            _ => bad(v),
        },
        other => bad(other),
    }
}

/// NULL, or an integer as [`integer`] reads it.
fn optional_integer(v: ValueRef<'_>, col: &str) -> Result<Option<i64>, String> {
    match v {
        ValueRef::Null => Ok(None),
        v => integer(v, col).map(Some),
    }
}

/// 0/1 (any non-zero integer is true, as in the original), or
/// `true`/`false` text.
fn boolean(v: ValueRef<'_>, col: &str) -> Result<bool, String> {
    let bad = |v| {
        Err(format!(
            "{col}: expected 0/1 or true/false, found {}",
            describe(v)
        ))
    };
    match v {
        ValueRef::Integer(n) => Ok(n != 0),
        ValueRef::Null => Err(format!("{col} is NULL")),
        ValueRef::Real(f) if f == 0.0 || f == 1.0 => Ok(f == 1.0),
        ValueRef::Text(b) => {
            let s = String::from_utf8_lossy(b);
            match s.trim().to_ascii_lowercase().as_str() {
                "1" | "true" => Ok(true),
                "0" | "false" => Ok(false),
                _ => bad(v),
            }
        }
        other => bad(other),
    }
}

/// Like [`boolean`], but NULL means "not deleted": the original selects
/// `WHERE deleted IS NULL OR deleted = 0`.
fn deleted_flag(v: ValueRef<'_>, col: &str) -> Result<bool, String> {
    match v {
        ValueRef::Null => Ok(false),
        v => boolean(v, col),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The original edgeProxy's table, as its `sql/create_routing_db.sql`
    /// creates it (no `country`).
    const ORIGINAL_SCHEMA: &str = "CREATE TABLE backends (
        id TEXT PRIMARY KEY,
        app TEXT,
        region TEXT,
        wg_ip TEXT,
        port INTEGER,
        healthy INTEGER,
        weight INTEGER,
        soft_limit INTEGER,
        hard_limit INTEGER,
        deleted INTEGER DEFAULT 0
    );";

    /// A separate connection, as the sqlite3 CLI or another process would
    /// have.
    fn other(path: &Path) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn
    }

    /// Writes a database the way the original's tooling does: its schema, its
    /// inserts, default (rollback journal) mode.
    fn original_db(path: &Path, rows: &str) {
        let conn = other(path);
        conn.execute_batch(ORIGINAL_SCHEMA).unwrap();
        conn.execute_batch(rows).unwrap();
    }

    fn rec(id: &str, port: i64) -> BackendRecord {
        BackendRecord {
            id: id.into(),
            app: "myapp".into(),
            region: "sa".into(),
            country: None,
            ip: "10.0.0.1".into(),
            port,
            healthy: true,
            weight: 1,
            soft_limit: 100,
            hard_limit: 150,
            deleted: false,
        }
    }

    fn ids(loaded: &Loaded) -> Vec<&str> {
        loaded.records.iter().map(|r| r.id.as_str()).collect()
    }

    fn column_names(path: &Path) -> Vec<String> {
        table_columns(&other(path)).unwrap()
    }

    #[test]
    fn original_database_migrates_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        original_db(
            &path,
            "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
             VALUES ('sa-node-1', 'myapp', 'sa', '10.50.1.1', 8080, 1, 2, 50, 100),
                    ('us-node-1', 'myapp', 'us', '10.50.2.1', 8080, 0, 1, 50, 100);
             INSERT INTO backends VALUES ('eu-node-1', 'myapp', 'eu', '10.50.3.1', 8081, 1, 1, 100, 200, 1);",
        );

        let mut store = RoutingStore::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.bad_rows, []);
        assert_eq!(ids(&loaded), ["sa-node-1", "us-node-1", "eu-node-1"]);
        assert!(loaded.records.iter().all(|r| r.country.is_none()));
        assert_eq!(
            loaded.records[0],
            BackendRecord {
                id: "sa-node-1".into(),
                app: "myapp".into(),
                region: "sa".into(),
                country: None,
                ip: "10.50.1.1".into(),
                port: 8080,
                healthy: true,
                weight: 2,
                soft_limit: 50,
                hard_limit: 100,
                deleted: false,
            }
        );
        assert!(!loaded.records[1].healthy);
        assert!(loaded.records[2].deleted);

        // Original columns untouched, country and the lifecycle columns
        // appended, version recorded.
        assert_eq!(
            column_names(&path),
            [
                "id",
                "app",
                "region",
                "wg_ip",
                "port",
                "healthy",
                "weight",
                "soft_limit",
                "hard_limit",
                "deleted",
                "country",
                "draining",
                "last_heartbeat_ms",
                "registered_at_ms",
                "expired",
                "heartbeat_pop",
                "health_check"
            ]
        );
        assert!(loaded.lifecycle.iter().all(|l| *l == Lifecycle::default()));
        let conn = other(&path);
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");

        // Reopening a migrated file is a no-op.
        drop(store);
        let mut store = RoutingStore::open(&path).unwrap();
        assert_eq!(store.load().unwrap(), loaded);
    }

    #[test]
    fn version_3_file_gains_health_check_and_backend_settings_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        drop(RoutingStore::open(&path).unwrap());
        // Back to a version-3 layout: no health_check column.
        other(&path)
            .execute_batch(
                "ALTER TABLE backends DROP COLUMN health_check; PRAGMA user_version = 3;
                 INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
                 VALUES ('a', 'web', 'sa', '10.0.0.1', 80, 1, 1, 10, 20);",
            )
            .unwrap();
        let mut store = RoutingStore::open(&path).unwrap();
        assert_eq!(
            column_names(&path).last().map(String::as_str),
            Some("health_check")
        );
        assert_eq!(store.load().unwrap().health_checks, [None]);
        assert!(store
            .set_health_check("a", Some(r#"{"type":"http"}"#))
            .unwrap());
        assert!(!store.set_health_check("nope", None).unwrap());
        assert_eq!(
            store.load().unwrap().health_checks,
            [Some(r#"{"type":"http"}"#.to_string())]
        );
    }

    #[test]
    fn missing_file_is_created_with_the_original_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        assert!(path.exists());
        assert_eq!(store.path(), path);
        assert_eq!(store.load().unwrap(), Loaded::default());
        let cols = column_names(&path);
        assert_eq!(cols.len(), 17);
        assert_eq!(cols[10], "country");
        assert_eq!(cols.last().map(String::as_str), Some("health_check"));

        // The original's own inserts still work on a new file.
        other(&path)
            .execute_batch(
                "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
                 VALUES ('a', 'myapp', 'sa', '10.0.0.1', 80, 1, 1, 100, 200)",
            )
            .unwrap();
        assert_eq!(ids(&store.load().unwrap()), ["a"]);
    }

    #[test]
    fn open_in_missing_directory_fails_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("routing.db");
        let err = RoutingStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }

    #[test]
    fn bad_rows_are_reported_by_id_and_the_rest_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        other(&path)
            .execute_batch(
                "INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted) VALUES
                   ('good', 'myapp', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 100, 150, 0),
                   ('bad-port', 'myapp', 'sa', NULL, '10.0.0.2', 'abc', 1, 1, 100, 150, 0),
                   ('no-ip', 'myapp', 'sa', NULL, NULL, 80, 1, 1, 100, 150, 0),
                   ('text-flags', 'myapp', 'us', '', '10.0.0.3', '8080', 'true', 2, 10, 20, 'false'),
                   ('null-deleted', 'myapp', 'us', NULL, '10.0.0.4', 81, 0, 1, 10, 20, NULL),
                   ('bad-flag', 'myapp', 'us', NULL, '10.0.0.5', 81, 'maybe', 1.5, 10, 20, 0),
                   (NULL, 'myapp', 'eu', NULL, '10.0.0.6', 82, 1, 1, 10, 20, 0);",
            )
            .unwrap();

        let loaded = store.load().unwrap();
        assert_eq!(ids(&loaded), ["good", "text-flags", "null-deleted"]);
        assert_eq!(loaded.records[0].country.as_deref(), Some("BR"));
        let flags = &loaded.records[1];
        assert_eq!(
            (flags.port, flags.healthy, flags.deleted),
            (8080, true, false)
        );
        assert_eq!(flags.country, None);
        assert!(!loaded.records[2].deleted);

        let bad: Vec<&str> = loaded.bad_rows.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(bad, ["bad-port", "no-ip", "bad-flag", "rowid 7"]);
        let reason = |id: &str| &loaded.bad_rows.iter().find(|(i, _)| i == id).unwrap().1;
        assert!(
            reason("bad-port").contains("port"),
            "{}",
            reason("bad-port")
        );
        assert!(reason("bad-port").contains("abc"), "{}", reason("bad-port"));
        assert!(
            reason("no-ip").contains("wg_ip is NULL"),
            "{}",
            reason("no-ip")
        );
        assert!(
            reason("bad-flag").contains("healthy"),
            "{}",
            reason("bad-flag")
        );
        assert!(
            reason("bad-flag").contains("weight"),
            "{}",
            reason("bad-flag")
        );
        assert!(
            reason("rowid 7").contains("id is NULL"),
            "{}",
            reason("rowid 7")
        );
    }

    #[test]
    fn changed_tracks_other_connections_and_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        assert!(store.changed().unwrap(), "never loaded");
        store.load().unwrap();
        assert!(!store.changed().unwrap());
        assert!(!store.changed().unwrap());

        let settle = |store: &mut RoutingStore| {
            let loaded = store.load().unwrap();
            assert!(!store.changed().unwrap());
            assert!(!store.changed().unwrap());
            loaded
        };

        other(&path)
            .execute_batch(
                "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
                 VALUES ('a', 'myapp', 'sa', '10.0.0.1', 80, 1, 1, 100, 150),
                        ('b', 'myapp', 'sa', '10.0.0.2', 80, 1, 1, 100, 150)",
            )
            .unwrap();
        assert!(store.changed().unwrap());
        assert_eq!(ids(&settle(&mut store)), ["a", "b"]);

        other(&path)
            .execute("UPDATE backends SET weight = 5 WHERE id = 'a'", [])
            .unwrap();
        assert!(store.changed().unwrap());
        assert_eq!(settle(&mut store).records[0].weight, 5);

        other(&path)
            .execute("DELETE FROM backends WHERE id = 'b'", [])
            .unwrap();
        assert!(store.changed().unwrap());
        assert_eq!(ids(&settle(&mut store)), ["a"]);

        // Our own writes count too.
        store.upsert(&rec("c", 90)).unwrap();
        assert!(store.changed().unwrap());
        assert_eq!(ids(&settle(&mut store)), ["a", "c"]);

        // Replaced wholesale, right after another connection wrote (so the
        // old WAL still holds frames): the new file's content, not the old.
        other(&path)
            .execute("UPDATE backends SET port = 1234", [])
            .unwrap();
        let new = dir.path().join("new.db");
        original_db(
            &new,
            "INSERT INTO backends VALUES ('x', 'other', 'eu', '10.9.9.9', 443, 1, 1, 10, 20, 0)",
        );
        std::fs::rename(&new, &path).unwrap();
        assert!(store.changed().unwrap());
        let loaded = settle(&mut store);
        assert_eq!(ids(&loaded), ["x"]);
        assert_eq!(loaded.records[0].port, 443);
        // ... and it was migrated like any old file.
        assert!(column_names(&path).contains(&"country".to_string()));

        // The store keeps following the new file.
        other(&path)
            .execute("UPDATE backends SET healthy = 0 WHERE id = 'x'", [])
            .unwrap();
        assert!(store.changed().unwrap());
        assert!(!settle(&mut store).records[0].healthy);
    }

    #[test]
    fn garbage_file_is_an_error_and_the_store_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        store.quiet_before_checkpoint = Duration::ZERO;
        store.upsert(&rec("a", 80)).unwrap();
        assert_eq!(ids(&store.load().unwrap()), ["a"]);
        // Quiet: the WAL is folded, so the rows live in the main file only
        // (left in the WAL, they would mask the garbage below).
        assert!(!store.changed().unwrap());
        assert_eq!(wal_len(&path).unwrap(), 0);

        std::fs::write(&path, vec![0xA5u8; 8192]).unwrap();
        let err = store.changed().unwrap_err();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
        assert!(store.changed().is_err());

        let fresh = dir.path().join("fresh.db");
        original_db(
            &fresh,
            "INSERT INTO backends VALUES ('b', 'myapp', 'us', '10.0.0.2', 81, 1, 1, 10, 20, 0)",
        );
        std::fs::rename(&fresh, &path).unwrap();
        assert!(store.changed().unwrap());
        assert_eq!(ids(&store.load().unwrap()), ["b"]);
        assert!(!store.changed().unwrap());
    }

    #[test]
    fn reloads_leave_the_wal_alone_until_the_table_is_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        store.load().unwrap();
        let writer = other(&path);
        writer
            .execute_batch("PRAGMA wal_autocheckpoint = 0")
            .unwrap();
        writer
            .execute(
                "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
                 VALUES ('a', 'myapp', 'sa', '10.0.0.1', 80, 1, 1, 100, 150)",
                [],
            )
            .unwrap();
        assert!(store.changed().unwrap());
        assert_eq!(ids(&store.load().unwrap()), ["a"]);
        // No checkpoint (and no fsync) on the reload path.
        assert!(wal_len(&path).unwrap() > 0, "load checkpointed");
        // Within the quiet period nothing is folded either.
        assert!(!store.changed().unwrap());
        assert!(
            wal_len(&path).unwrap() > 0,
            "changed checkpointed too early"
        );

        // Once quiet, `changed` folds the WAL and does not call its own
        // checkpoint a change.
        store.quiet_before_checkpoint = Duration::ZERO;
        assert!(!store.changed().unwrap());
        assert_eq!(wal_len(&path).unwrap(), 0, "quiet table's WAL not folded");
        assert!(!store.changed().unwrap());

        // And changes after the fold are still seen.
        writer
            .execute("UPDATE backends SET port = 81 WHERE id = 'a'", [])
            .unwrap();
        assert!(store.changed().unwrap());
        assert_eq!(store.load().unwrap().records[0].port, 81);
    }

    #[test]
    fn a_big_wal_is_folded_by_the_next_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        let writer = other(&path);
        writer
            .execute_batch(
                "PRAGMA wal_autocheckpoint = 0; CREATE TABLE scratch (b BLOB);
                 INSERT INTO scratch VALUES (zeroblob(2000000));",
            )
            .unwrap();
        assert!(wal_len(&path).unwrap() > CHECKPOINT_WAL_BYTES);
        store.load().unwrap();
        assert_eq!(wal_len(&path).unwrap(), 0);
        assert!(!store.changed().unwrap());
    }

    #[test]
    fn an_uncommitted_transaction_is_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        store.upsert(&rec("a", 80)).unwrap();
        let writer = other(&path);
        writer
            .execute_batch("CREATE TABLE scratch (b BLOB)")
            .unwrap();
        store.load().unwrap();
        assert!(!store.changed().unwrap());

        // A transaction bigger than the writer's page cache spills pages into
        // the WAL before it commits (as every commit writes its frames before
        // publishing them): the WAL grows, yet nothing is visible.
        let wal_before = wal_len(&path).unwrap();
        writer
            .execute_batch("PRAGMA cache_size = 10; BEGIN IMMEDIATE;")
            .unwrap();
        for _ in 0..200 {
            writer
                .execute("INSERT INTO scratch VALUES (zeroblob(4000))", [])
                .unwrap();
        }
        assert!(
            wal_len(&path).unwrap() > wal_before,
            "the test needs a spill"
        );
        assert!(!store.changed().unwrap(), "nothing was committed");
        assert_eq!(ids(&store.load().unwrap()), ["a"]);
        assert!(!store.changed().unwrap());

        writer
            .execute_batch("UPDATE backends SET port = 81 WHERE id = 'a'; COMMIT;")
            .unwrap();
        assert!(store.changed().unwrap());
        assert_eq!(store.load().unwrap().records[0].port, 81);
        assert!(!store.changed().unwrap());
    }

    #[test]
    fn removed_file_is_an_error_not_a_new_empty_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        store.upsert(&rec("a", 80)).unwrap();
        store.load().unwrap();

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(store.changed(), Err(StoreError::Stat { .. })));
        assert!(store.load().is_err());
        assert!(!path.exists(), "reload must not create the file");

        original_db(
            &path,
            "INSERT INTO backends VALUES ('b', 'myapp', 'us', '10.0.0.2', 81, 1, 1, 10, 20, 0)",
        );
        assert!(store.changed().unwrap());
        assert_eq!(ids(&store.load().unwrap()), ["b"]);
    }

    #[test]
    fn replacement_without_backends_table_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        store.load().unwrap();
        let new = dir.path().join("new.db");
        other(&new).execute_batch("CREATE TABLE t (x)").unwrap();
        std::fs::rename(&new, &path).unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::NoBackendsTable { .. }), "{err:?}");
    }

    #[test]
    fn non_database_at_open_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        std::fs::write(&path, "id,app,region\nsa-node-1,myapp,sa\n".repeat(200)).unwrap();
        let err = RoutingStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
        assert!(msg.contains("file is not a database"), "{msg}");
    }

    #[test]
    fn upsert_inserts_then_updates_in_place_and_mark_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        store.upsert(&rec("a", 80)).unwrap();
        store.upsert(&rec("b", 81)).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.records, [rec("a", 80), rec("b", 81)]);

        let mut a = rec("a", 8080);
        a.country = Some("BR".into());
        a.healthy = false;
        a.weight = 3;
        store.upsert(&a).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(
            loaded.records,
            [a.clone(), rec("b", 81)],
            "updated in place"
        );
        let rowid: i64 = other(&path)
            .query_row("SELECT rowid FROM backends WHERE id = 'a'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(rowid, 1);

        assert!(store.mark_deleted("a").unwrap());
        assert!(!store.mark_deleted("nope").unwrap());
        let loaded = store.load().unwrap();
        assert!(loaded.records[0].deleted);
        assert!(!loaded.records[1].deleted);
        assert_eq!(loaded.records.len(), 2, "soft delete keeps the row");
    }

    fn lifecycle_of(store: &mut RoutingStore, id: &str) -> (BackendRecord, Lifecycle) {
        let loaded = store.peek().unwrap();
        let i = loaded.records.iter().position(|r| r.id == id).unwrap();
        (loaded.records[i].clone(), loaded.lifecycle[i].clone())
    }

    /// A database copied from another POP (or rebuilt by replication) has
    /// no `last_heartbeat_ms` for the backends this POP judges: they count
    /// as heard when the node id was taken, so they can expire.
    #[test]
    fn backends_judged_here_without_a_heartbeat_count_as_heard_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        store.set_node_id("n1");
        store.register(&rec("mine", 80), 1_000).unwrap();
        store.register(&rec("gone", 81), 1_000).unwrap();
        store.set_node_id("n2");
        store.register(&rec("theirs", 82), 1_000).unwrap();
        assert!(store.deregister("gone").unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE backends SET last_heartbeat_ms = NULL", [])
            .unwrap();
        let before = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let mut store = RoutingStore::open(&path).unwrap();
        store.set_node_id("n1");
        let (_, mine) = lifecycle_of(&mut store, "mine");
        let heard = mine.last_heartbeat_ms.expect("counts as heard");
        assert!(heard >= before, "{heard} < {before}");
        assert_eq!(lifecycle_of(&mut store, "theirs").1.last_heartbeat_ms, None);
        assert_eq!(lifecycle_of(&mut store, "gone").1.last_heartbeat_ms, None);
        // The same through load() and for one row; the instant does not move.
        let loaded = store.load().unwrap();
        let i = loaded.records.iter().position(|r| r.id == "mine").unwrap();
        assert_eq!(loaded.lifecycle[i].last_heartbeat_ms, Some(heard));
        assert_eq!(
            store.peek_one("mine").unwrap().lifecycle[0].last_heartbeat_ms,
            Some(heard)
        );
        // Written into the row: a later start finds that instant and does
        // not grant a new TTL.
        let mut later = RoutingStore::open(&path).unwrap();
        later.set_node_id("n1");
        assert_eq!(
            lifecycle_of(&mut later, "mine").1.last_heartbeat_ms,
            Some(heard)
        );
        // An expired one keeps its verdict: nothing assumed.
        store.register(&rec("old", 83), 1_000).unwrap();
        store.set_expired(&[("old".into(), true)]).unwrap();
        conn.execute(
            "UPDATE backends SET last_heartbeat_ms = NULL WHERE id = 'old'",
            [],
        )
        .unwrap();
        assert_eq!(lifecycle_of(&mut later, "old").1.last_heartbeat_ms, None);
    }

    #[test]
    fn version_1_file_gains_the_lifecycle_columns_with_serving_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        original_db(
            &path,
            "INSERT INTO backends VALUES ('a', 'myapp', 'sa', '10.0.0.1', 80, 1, 1, 10, 20, 0);
             ALTER TABLE backends ADD COLUMN country TEXT;
             PRAGMA user_version = 1;",
        );
        let mut store = RoutingStore::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(ids(&loaded), ["a"]);
        assert_eq!(loaded.lifecycle, [Lifecycle::default()]);
        assert!(column_names(&path).ends_with(&[
            "country".to_string(),
            "draining".to_string(),
            "last_heartbeat_ms".to_string(),
            "registered_at_ms".to_string(),
            "expired".to_string(),
            "heartbeat_pop".to_string(),
            "health_check".to_string()
        ]));
        // The original's inserts, which name none of them, still work.
        other(&path)
            .execute_batch(
                "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
                 VALUES ('b', 'myapp', 'sa', '10.0.0.2', 80, 1, 1, 10, 20)",
            )
            .unwrap();
        assert_eq!(lifecycle_of(&mut store, "b").1, Lifecycle::default());
    }

    /// `pops` as schemas 3 and 4 created it: no `serving`.
    const POPS_BEFORE_SERVING: &str = "DROP TABLE pops;
         CREATE TABLE pops (node_id TEXT PRIMARY KEY, name TEXT NOT NULL,
           region TEXT NOT NULL, country TEXT, public_addrs TEXT NOT NULL DEFAULT '',
           private_addr TEXT NOT NULL DEFAULT '', gossip_addr TEXT NOT NULL DEFAULT '',
           transport_addr TEXT NOT NULL DEFAULT '', wg_public_key TEXT NOT NULL DEFAULT '',
           wg_endpoint TEXT NOT NULL DEFAULT '', prefix6 TEXT NOT NULL DEFAULT '',
           draining INTEGER NOT NULL DEFAULT 0);
         INSERT INTO pops (node_id, name, region, draining) VALUES ('gru', 'pop-gru', 'sa', 1);";

    fn user_version(path: &Path) -> i64 {
        other(path)
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    fn pops_column_names(path: &Path) -> Vec<String> {
        pops_columns(&other(path)).unwrap()
    }

    /// Checks what any upgrade to 5 must leave: both later columns, old
    /// rows intact, old POP rows serving, `serving` writable.
    fn assert_upgraded_to_5(path: &Path, store: &mut RoutingStore) {
        assert_eq!(user_version(path), 5);
        assert_eq!(SCHEMA_VERSION, 5);
        assert_eq!(
            column_names(path).last().map(String::as_str),
            Some("health_check")
        );
        assert_eq!(
            pops_column_names(path).last().map(String::as_str),
            Some("serving")
        );
        let loaded = store.load().unwrap();
        assert_eq!(loaded.records.len(), 1);
        assert_eq!(loaded.records[0].id, "a");
        let pops = store.load_pops().unwrap();
        assert_eq!(pops.len(), 1);
        assert!(pops[0].draining, "existing values are kept");
        assert!(pops[0].serving, "a row from before says nothing: serving");
        other(path)
            .execute("UPDATE pops SET serving = 0 WHERE node_id = 'gru'", [])
            .unwrap();
        assert!(!store.load_pops().unwrap()[0].serving);
    }

    #[test]
    fn version_3_file_gains_health_check_and_pops_serving_and_becomes_version_5() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        drop(RoutingStore::open(&path).unwrap());
        // Back to what version 3 wrote: neither backends.health_check nor
        // pops.serving.
        other(&path)
            .execute_batch(&format!(
                "ALTER TABLE backends DROP COLUMN health_check;
                 {POPS_BEFORE_SERVING}
                 INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
                 VALUES ('a', 'web', 'sa', '10.0.0.1', 80, 1, 1, 10, 20);
                 PRAGMA user_version = 3;"
            ))
            .unwrap();
        assert!(!column_names(&path).iter().any(|c| c == "health_check"));
        let mut store = RoutingStore::open(&path).unwrap();
        assert_upgraded_to_5(&path, &mut store);
        assert_eq!(store.load().unwrap().health_checks, [None]);
    }

    #[test]
    fn version_4_file_keeps_its_health_checks_and_gains_pops_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        drop(RoutingStore::open(&path).unwrap());
        // Back to what version 4 (health checks) wrote: health_check there,
        // pops.serving not yet.
        other(&path)
            .execute_batch(&format!(
                "{POPS_BEFORE_SERVING}
                 INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, health_check)
                 VALUES ('a', 'web', 'sa', '10.0.0.1', 80, 1, 1, 10, 20, '{{\"type\":\"http\"}}');
                 PRAGMA user_version = 4;"
            ))
            .unwrap();
        let mut store = RoutingStore::open(&path).unwrap();
        assert_upgraded_to_5(&path, &mut store);
        assert_eq!(
            store.load().unwrap().health_checks,
            [Some(r#"{"type":"http"}"#.to_string())]
        );
    }

    #[test]
    fn register_creates_updates_in_place_and_revives_deleted_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        store.upsert(&rec("first", 79)).unwrap();

        assert_eq!(
            store.register(&rec("a", 80), 1_000).unwrap(),
            Registered::Created
        );
        let (r, l) = lifecycle_of(&mut store, "a");
        assert_eq!(r, rec("a", 80));
        assert_eq!(
            l,
            Lifecycle {
                draining: false,
                last_heartbeat_ms: Some(1_000),
                registered_at_ms: Some(1_000),
                ..Lifecycle::default()
            }
        );

        // Update in place: new fields, same row, same registration time; the
        // health flag and a drain are reset.
        store.set_draining("a", true).unwrap();
        other(&path)
            .execute("UPDATE backends SET healthy = 0 WHERE id = 'a'", [])
            .unwrap();
        let mut changed = rec("a", 8080);
        changed.weight = 5;
        changed.healthy = false; // ignored
        assert_eq!(
            store.register(&changed, 2_000).unwrap(),
            Registered::Updated
        );
        let (r, l) = lifecycle_of(&mut store, "a");
        assert_eq!((r.port, r.weight, r.healthy), (8080, 5, true));
        assert_eq!(
            l,
            Lifecycle {
                draining: false,
                last_heartbeat_ms: Some(2_000),
                registered_at_ms: Some(1_000),
                ..Lifecycle::default()
            }
        );
        assert_eq!(
            ids(&store.peek().unwrap()),
            ["first", "a"],
            "table order kept"
        );
        let one = store.peek_one("a").unwrap();
        assert_eq!(ids(&one), ["a"]);
        assert_eq!(one.lifecycle[0], l, "the same row as the whole table's");
        assert!(store.peek_one("nobody").unwrap().records.is_empty());

        // Deregistered, then registered again: a new registration.
        assert!(store.deregister("a").unwrap());
        assert!(!store.deregister("a").unwrap(), "already deleted");
        assert!(lifecycle_of(&mut store, "a").0.deleted);
        assert_eq!(
            store.register(&rec("a", 81), 3_000).unwrap(),
            Registered::Created
        );
        let (r, l) = lifecycle_of(&mut store, "a");
        assert!(!r.deleted);
        assert_eq!(l.registered_at_ms, Some(3_000));

        // A hand-written row becomes managed (it gets a heartbeat) when it
        // registers.
        assert_eq!(
            store.register(&rec("first", 79), 4_000).unwrap(),
            Registered::Updated
        );
        assert_eq!(
            lifecycle_of(&mut store, "first").1.registered_at_ms,
            Some(4_000)
        );
    }

    #[test]
    fn heartbeat_drain_and_deregister_need_a_live_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        assert!(!store.heartbeat("nope", 1).unwrap());
        assert!(!store.set_draining("nope", true).unwrap());
        assert!(!store.deregister("nope").unwrap());

        store.register(&rec("a", 80), 1_000).unwrap();
        assert!(store.heartbeat("a", 5_000).unwrap());
        assert_eq!(
            lifecycle_of(&mut store, "a").1.last_heartbeat_ms,
            Some(5_000)
        );
        assert!(store.set_draining("a", true).unwrap());
        assert!(lifecycle_of(&mut store, "a").1.draining);

        store.deregister("a").unwrap();
        assert!(!store.heartbeat("a", 6_000).unwrap());
        assert!(!store.set_draining("a", false).unwrap());
    }

    #[test]
    fn a_heartbeat_at_another_pop_takes_the_backend_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut gru = RoutingStore::open(&path).unwrap();
        gru.set_node_id("gru");
        gru.register(&rec("a", 80), 1_000).unwrap();
        let owner = |p: &Path| {
            other(p)
                .query_row(
                    "SELECT heartbeat_pop, expired FROM backends WHERE id = 'a'",
                    [],
                    |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, bool>(1)?)),
                )
                .unwrap()
        };
        assert_eq!(owner(&path), (Some("gru".into()), false));
        // The same file seen by another POP's store (as after replication).
        let mut fra = RoutingStore::open(&path).unwrap();
        fra.set_node_id("fra");
        fra.load().unwrap();
        assert!(fra.heartbeat("a", 2_000).unwrap());
        assert_eq!(owner(&path), (Some("fra".into()), false));
        assert!(fra.changed().unwrap(), "taking over is a real write");
        fra.load().unwrap();
        // From then on its heartbeats are quiet.
        assert!(fra.heartbeat("a", 3_000).unwrap());
        assert!(!fra.changed().unwrap());
        // An expiry verdict is recorded once, quietly, and a heartbeat
        // clears it with a real write.
        fra.set_expired(&[("a".into(), true)]).unwrap();
        assert_eq!(owner(&path), (Some("fra".into()), true));
        assert!(
            !fra.changed().unwrap(),
            "the verdict is not news to its own POP"
        );
        assert!(fra.heartbeat("a", 4_000).unwrap());
        assert_eq!(owner(&path), (Some("fra".into()), false));
        assert!(fra.changed().unwrap());
    }

    #[test]
    fn heartbeats_and_peeks_are_not_routing_changes_but_other_writes_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        store.register(&rec("a", 80), 1_000).unwrap();
        assert!(store.changed().unwrap());
        store.load().unwrap();
        assert!(!store.changed().unwrap());

        // A heartbeat alone: nothing to reload, and it is on disk.
        assert!(store.heartbeat("a", 2_000).unwrap());
        assert!(!store.changed().unwrap());
        store.peek().unwrap();
        assert!(!store.changed().unwrap());
        assert_eq!(
            other(&path)
                .query_row(
                    "SELECT last_heartbeat_ms FROM backends WHERE id = 'a'",
                    [],
                    |r| r.get::<_, i64>(0)
                )
                .unwrap(),
            2_000
        );

        // Another writer's change is not hidden by a later heartbeat.
        other(&path)
            .execute("UPDATE backends SET weight = 9 WHERE id = 'a'", [])
            .unwrap();
        assert!(store.heartbeat("a", 3_000).unwrap());
        assert!(store.changed().unwrap());
        assert_eq!(store.load().unwrap().records[0].weight, 9);
        assert!(!store.changed().unwrap());

        // Nor is our own unpublished write.
        store.set_draining("a", true).unwrap();
        assert!(store.heartbeat("a", 4_000).unwrap());
        assert!(store.changed().unwrap());
        store.load().unwrap();

        // A peek does not swallow a change the reloader has not seen.
        other(&path)
            .execute("UPDATE backends SET weight = 3 WHERE id = 'a'", [])
            .unwrap();
        store.peek().unwrap();
        assert!(store.changed().unwrap());
    }
}
