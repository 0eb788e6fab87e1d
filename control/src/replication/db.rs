//! Replication's side of `routing.db`: change capture, the versions of every
//! replicated row, and applying rows that arrive from other POPs.
//!
//! **Change capture in SQLite itself.** Triggers on `backends` and `pops`
//! note the key of every inserted, updated or deleted row in `repl_changes`,
//! whoever made the change: the discovery API, a drain, a heartbeat expiry,
//! or an operator's `sqlite3` session. The driver drains that log
//! ([`ReplDb::poll_changes`]), reads each row's replicated columns as a JSON
//! object, and gives the ones whose data changed a new version. Nothing can
//! bypass replication short of dropping the triggers, and even then
//! [`ReplDb::reconcile`] at the next start compares every row with its last
//! version and catches up.
//!
//! **Local-only columns.** `last_heartbeat_ms` never replicates: heartbeats
//! stay at the POP that receives them, and only their consequence (the
//! `expired` verdict, `heartbeat_pop`) travels. Updates that touch only
//! local columns do not even fire the trigger.
//!
//! **Applying remote rows** ([`ReplDb::persist_remote`]) writes the
//! replicated columns (local ones keep their values), records the version,
//! and removes from the change log the entries its own writes caused, all in
//! one transaction: a remote write is never mistaken for a local one.
//!
//! Tables: `repl_versions(tbl, pk, hlc, origin, data, intent_hlc,
//! intent_origin)` — the replica, loaded into memory at start (the intent
//! is NULL for a deliberate write, see `version`); `repl_changes(seq, tbl, pk)` — the change log, at
//! most one entry per row; `repl_meta(key, value)` — this POP's own notes,
//! never replicated: `last_contact_ms`, when it last heard another POP;
//! `down_since:<id>` and `owed:<id>`, the members' absences
//! (`node::Absences`); `writes`, how many transactions replication has
//! committed to this file (see `ReplDb::with_tx`: another writer's or a
//! restored backup's count tells replication the file is not its own).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::hlc::Hlc;
use super::node::{Absences, Node, Now, WriteKind};
use super::replica::Replica;
use super::version::{RowKey, RowVersion, Table, Version};

/// Columns of replicated tables that stay on this POP.
const LOCAL_ONLY: &[(Table, &str)] = &[(Table::Backends, "last_heartbeat_ms")];

/// Change-log entries handled per transaction.
const CHANGES_PER_POLL: usize = 1000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS repl_versions (
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    hlc INTEGER NOT NULL,
    origin TEXT NOT NULL,
    data TEXT,
    intent_hlc INTEGER,
    intent_origin TEXT,
    PRIMARY KEY (tbl, pk)
);
CREATE TABLE IF NOT EXISTS repl_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    pk TEXT NOT NULL,
    UNIQUE (tbl, pk)
);
CREATE TABLE IF NOT EXISTS repl_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    #[error("replication: routing store {}: {cause}", .path.display())]
    Sql {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    #[error("replication: routing store {} has no table {table}", .path.display())]
    NoTable { path: PathBuf, table: &'static str },
    /// The file at the path is no longer the one replication opened (renamed
    /// over, as `mv backup.db routing.db` does, or removed). See
    /// [`ReplDb::still_at_its_path`].
    #[error(
        "replication: routing store {} was replaced or removed while replication ran; \
         replication no longer reads or writes it (restart edgeproxy to replicate from the \
         file now there)",
        .path.display()
    )]
    Replaced { path: PathBuf },
    /// The file is the one replication opened, but its content is not what
    /// replication last wrote: a backup restored into it in place
    /// (`sqlite3 routing.db ".restore backup.db"`). See
    /// [`ReplDb::with_tx`].
    #[error(
        "replication: routing store {} was overwritten while replication ran (a backup \
         restored into it, or another edgeproxy replicating from the same file?): its versions \
         are no longer the ones this POP holds; replication no longer reads or writes it \
         (restart edgeproxy to replicate from the file now there)",
        .path.display()
    )]
    Restored { path: PathBuf },
}

impl DbError {
    /// The store refuses writes for want of room or of permission: a full
    /// disk, a file system turned read-only or failing. Replication goes on
    /// without writing (the POP routes from the table as it is) and writes
    /// once it can.
    pub fn is_unwritable(&self) -> bool {
        use rusqlite::ErrorCode::{CannotOpen, DiskFull, ReadOnly, SystemIoFailure};
        matches!(self, DbError::Sql { cause: rusqlite::Error::SqliteFailure(e, _), .. }
            if matches!(e.code, DiskFull | ReadOnly | SystemIoFailure | CannotOpen))
    }
}

/// One replicated table as this database has it.
#[derive(Debug, Clone)]
struct TableInfo {
    table: Table,
    /// Replicated columns, in table order.
    columns: Vec<String>,
    /// `SELECT json_object(...), <first BLOB column> ... WHERE key = ?1`.
    select_one: String,
    /// `SELECT key, json_object(...), <first BLOB column>` over every row.
    select_all: String,
    /// `UPDATE ... SET col = json_extract(?1, ...) WHERE key = ?2`.
    update: String,
    /// `INSERT ... VALUES (json_extract(?1, ...), ...)`.
    insert: String,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl TableInfo {
    fn new(table: Table, all_columns: Vec<String>) -> TableInfo {
        let columns: Vec<String> = all_columns
            .into_iter()
            .filter(|c| !LOCAL_ONLY.iter().any(|(t, l)| *t == table && l == c))
            .collect();
        let name = quote(table.name());
        let key = quote(table.key_column());
        // A BLOB cannot go into JSON (json_object fails on it): such a value,
        // which no edgeproxy column holds, is NULL in the object, and the
        // name of the first column holding one comes with it, so that the
        // row is not versioned at all ([`holds_no_blob`]).
        let blob = format!(
            "CASE {} ELSE NULL END",
            columns
                .iter()
                .map(|c| format!(
                    "WHEN typeof({}) = 'blob' THEN '{}'",
                    quote(c),
                    c.replace('\'', "''")
                ))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let object = format!(
            "json_object({})",
            columns
                .iter()
                .map(|c| format!(
                    "'{}', CASE WHEN typeof({q}) = 'blob' THEN NULL ELSE {q} END",
                    c.replace('\'', "''"),
                    q = quote(c)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let extract = |c: &String| {
            format!(
                "json_extract(?1, '$.\"{}\"')",
                c.replace('\'', "''").replace('"', "\\\"")
            )
        };
        TableInfo {
            select_one: format!(
                "SELECT {object}, {blob} FROM {name} WHERE {key} = ?1 ORDER BY rowid DESC LIMIT 1"
            ),
            select_all: format!(
                "SELECT {key}, {object}, {blob} FROM {name} WHERE {key} IS NOT NULL ORDER BY rowid"
            ),
            update: format!(
                "UPDATE {name} SET {} WHERE {key} = ?2",
                columns
                    .iter()
                    .map(|c| format!("{} = {}", quote(c), extract(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            insert: format!(
                "INSERT INTO {name} ({}) VALUES ({})",
                columns
                    .iter()
                    .map(|c| quote(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                columns.iter().map(extract).collect::<Vec<_>>().join(", ")
            ),
            table,
            columns,
        }
    }

    /// The change-capture triggers, recreated at every start so that they
    /// follow the table's columns.
    fn triggers(&self) -> String {
        let t = self.table.name();
        let name = quote(t);
        let key = self.table.key_column();
        let log = |row: &str| {
            format!(
                "INSERT OR REPLACE INTO repl_changes (tbl, pk) SELECT '{t}', {row}.{k} WHERE {row}.{k} IS NOT NULL;",
                k = quote(key)
            )
        };
        let watched = self
            .columns
            .iter()
            .map(|c| quote(c))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "DROP TRIGGER IF EXISTS repl_{t}_insert;
             DROP TRIGGER IF EXISTS repl_{t}_update;
             DROP TRIGGER IF EXISTS repl_{t}_delete;
             CREATE TRIGGER repl_{t}_insert AFTER INSERT ON {name} BEGIN {new} END;
             CREATE TRIGGER repl_{t}_update AFTER UPDATE OF {watched} ON {name} BEGIN {new} {old} END;
             CREATE TRIGGER repl_{t}_delete AFTER DELETE ON {name} BEGIN {old} END;",
            new = log("NEW"),
            old = log("OLD"),
        )
    }
}

/// The largest row (its replicated columns as JSON) that replicates. A
/// backend's row is about 250 bytes; this leaves room for any health check
/// an operator writes, and keeps a row far inside one message
/// (`wire::MAX_MESSAGE_BYTES`): a row over that was re-sent at every
/// anti-entropy exchange, dropped by every receiver, and never logged.
pub const MAX_ROW_BYTES: usize = 1 << 20;

/// False (with an error logged) for a row too large to replicate: it stays
/// in this POP's table, unversioned, until an edit makes it fit.
fn fits_a_message(key: &RowKey, data: &Option<String>) -> bool {
    let len = data.as_ref().map_or(0, String::len);
    if len <= MAX_ROW_BYTES {
        return true;
    }
    tracing::error!(table = key.table.name(), key = %key.pk, bytes = len, limit = MAX_ROW_BYTES,
        "replication: row too large to replicate; it stays on this POP only until it is made smaller");
    false
}

/// False (with an error logged) for a row with a BLOB in column `blob`
/// (written with `sqlite3`, say `x'4445'` for a country): JSON, the
/// replicated form, has no BLOB, and the value went out as NULL (QA: a
/// backend whose `country` was a BLOB was skipped as unreadable by the POP
/// that held it and routed, country NULL, by every other, each saying it
/// was in sync). The row stays on this POP only, unversioned, until it is
/// rewritten without one, as a row too large to replicate does.
fn holds_no_blob(key: &RowKey, blob: &Option<String>) -> bool {
    let Some(column) = blob else {
        return true;
    };
    tracing::error!(table = key.table.name(), key = %key.pk, column = %column,
        "replication: row holds a BLOB, which does not replicate; it stays on this POP only until the column is rewritten as text or a number");
    false
}

/// (device, inode) of the file at `path`; `None` if there is none.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// How long a write waits for another connection's lock (the API's, an
/// operator's `sqlite3`) once replication runs. The replication
/// loop waits with it, gossip included: five seconds made the other POPs
/// declare this one down while an operator held a lock. A write that gives
/// up costs nothing lasting: refused remote rows are brought again by
/// anti-entropy (`Node::persist_failed`), and the change log is read again
/// at the next poll.
const BUSY_WAIT: Duration = Duration::from_millis(200);

/// A read-write connection to `path` in WAL mode, waiting up to five
/// seconds for locks (the start's wait, see [`ReplDb::wait_briefly_for_locks`]).
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    Ok(conn)
}

/// Replication's connection to `routing.db`.
pub struct ReplDb {
    conn: Connection,
    /// `conn` reads the file as it is (`crate::store::open_as_is`): the
    /// disk kept it from being opened for writing at start. Every write
    /// ([`ReplDb::with_tx`]) first tries the read-write open again.
    as_is: bool,
    path: PathBuf,
    /// (device, inode) of the file `conn` opened.
    file: (u64, u64),
    /// Set once the file at `path` is another: `conn` is then left alone
    /// for good (see [`ReplDb::still_at_its_path`]).
    replaced: bool,
    /// Set with `replaced` when the file is the same but its content is not
    /// replication's (see [`ReplDb::with_tx`]).
    overwritten: bool,
    /// `repl_meta.writes` as replication's last transaction left it; `None`
    /// before the first (the open's).
    writes: Option<i64>,
    tables: Vec<TableInfo>,
    /// `PRAGMA data_version` at the last poll: it moves when another
    /// connection commits, which is when the change log may have grown.
    seen_version: Option<i64>,
}

impl ReplDb {
    /// Opens `path` (already created and migrated by the routing store) and
    /// installs the replication tables and triggers.
    pub fn open(path: &Path) -> Result<ReplDb, DbError> {
        let err = |cause| DbError::Sql {
            path: path.to_path_buf(),
            cause,
        };
        let (conn, as_is) = match connect(path) {
            Ok(conn) => (conn, false),
            // A clean stop removed the `-shm`, and a full disk keeps SQLite
            // from creating it, even to read: the file is read as it is
            // (the routing store does the same and says so), and written
            // once it can be (see `with_tx`).
            Err(e) if crate::store::disk_refuses_writes(path, &e) => {
                match crate::store::open_as_is(path) {
                    Some(conn) => (conn, true),
                    None => return Err(err(e)),
                }
            }
            Err(e) => return Err(err(e)),
        };
        let mut tables = Vec::new();
        for table in Table::ALL {
            let mut stmt = conn
                .prepare(&format!("PRAGMA table_info({})", quote(table.name())))
                .map_err(err)?;
            let columns: Vec<String> = stmt
                .query_map([], |r| r.get::<_, String>(1))
                .and_then(|rows| rows.collect())
                .map_err(err)?;
            if columns.is_empty() {
                return Err(DbError::NoTable {
                    path: path.to_path_buf(),
                    table: table.name(),
                });
            }
            tables.push(TableInfo::new(table, columns));
        }
        let file = file_id(path).ok_or_else(|| {
            err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some("routing store vanished as it was opened".into()),
            ))
        })?;
        let mut db = ReplDb {
            conn,
            as_is,
            path: path.to_path_buf(),
            file,
            replaced: false,
            overwritten: false,
            writes: None,
            tables,
            seen_version: None,
        };
        let ddl = format!(
            "{SCHEMA}{}",
            db.tables
                .iter()
                .map(TableInfo::triggers)
                .collect::<String>()
        );
        let installed = db.with_tx(|tx| {
            tx.execute_batch(&ddl)?;
            add_intent_columns(tx)
        });
        match installed {
            Ok(()) => {}
            // QA: a POP restarted while its disk was full (or read-only)
            // exited here, though its table was there to route from, and
            // under systemd's Restart= it exited again at every restart.
            // What the last start installed is used: the routing store,
            // which opened, has the same columns (a migration that changes
            // them would have failed to write first).
            Err(e) if e.is_unwritable() && db.installed_before().map_err(|e| db.err(e))? => {
                tracing::error!(error = %e,
                    "replication: cannot write routing.db at start; using the tables and triggers the last start installed, \
                     and writing nothing until it can (rows from other POPs wait, local changes are versioned then)");
                db.writes = Some(db.conn.query_row(
                    "SELECT COALESCE((SELECT value FROM repl_meta WHERE key = 'writes'), 0)",
                    [],
                    |r| r.get(0),
                ).map_err(|e| db.err(e))?);
            }
            Err(e) => return Err(e),
        }
        Ok(db)
    }

    /// Replication's tables (intents included) and change-capture triggers
    /// are all in the file, as a start installs them.
    fn installed_before(&self) -> rusqlite::Result<bool> {
        let mut names: Vec<String> = ["repl_versions", "repl_changes", "repl_meta"]
            .map(String::from)
            .to_vec();
        for info in &self.tables {
            for op in ["insert", "update", "delete"] {
                names.push(format!("repl_{}_{op}", info.table.name()));
            }
        }
        let mut found = self.conn.prepare(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = ?1 AND type IN ('table', 'trigger')",
        )?;
        for name in &names {
            if found.query_row([name], |r| r.get::<_, i64>(0))? == 0 {
                return Ok(false);
            }
        }
        self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM pragma_table_info('repl_versions') WHERE name = 'intent_hlc')",
            [],
            |r| r.get(0),
        )
    }

    /// From now on a write waits at most [`BUSY_WAIT`] for another
    /// connection's lock (at start, five seconds: the start fails if the
    /// table cannot be read).
    pub fn wait_briefly_for_locks(&self) -> Result<(), DbError> {
        self.conn.busy_timeout(BUSY_WAIT).map_err(|e| self.err(e))
    }

    fn err(&self, cause: rusqlite::Error) -> DbError {
        DbError::Sql {
            path: self.path.clone(),
            cause,
        }
    }

    /// Refuses to go on once the file at the path is not the one `conn`
    /// opened. An operator restoring a backup (`mv backup.db routing.db`)
    /// left this connection on the old, unlinked file, but the `-wal` and
    /// `-shm` files are found by name, so they are the new file's: its
    /// writes (versions, remote rows) went into the new file's WAL as pages
    /// of the old one, and the new file read as corrupt (QA: `PRAGMA
    /// integrity_check`: "btreeInitPage() returns error code 11"), while
    /// local changes to it were never replicated and every POP said it was
    /// in sync. The connection is then never used again, nor closed: a
    /// close checkpoints the shared WAL into the old file and deletes it by
    /// name, taking the new file's last commits with it.
    fn still_at_its_path(&mut self) -> Result<(), DbError> {
        if !self.replaced && file_id(&self.path) != Some(self.file) {
            self.replaced = true;
            let stand_in = Connection::open_in_memory().map_err(|e| self.err(e))?;
            std::mem::forget(std::mem::replace(&mut self.conn, stand_in));
        }
        if self.replaced {
            let path = self.path.clone();
            return Err(if self.overwritten {
                DbError::Restored { path }
            } else {
                DbError::Replaced { path }
            });
        }
        Ok(())
    }

    /// Runs `f` in one transaction, counted in `repl_meta.writes`, once the
    /// file is still replication's own: at its path ([`Self::still_at_its_path`])
    /// and with the count replication's last transaction left there. A
    /// backup restored into the file in place (the sqlite3 shell's
    /// `.restore`: same inode) brings the count of the moment it was taken.
    /// QA: after such a restore the node went on holding versions of rows
    /// the file no longer had (a registration made since the backup): the
    /// POP did not route them, its digest still matched its peers', so
    /// nothing brought them back, `cluster status` said "in sync", and
    /// nothing was logged. The transaction is then rolled back and the file
    /// left alone, as a renamed-over one.
    fn with_tx<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, DbError> {
        self.still_at_its_path()?;
        self.writable_again();
        let expected = self.writes;
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            // `f` never writes this key: read after it, it is what the
            // transaction found (and the open's creates the table).
            let found = writes_recorded(&tx)?;
            if expected.is_some_and(|e| e != found) {
                return Ok(Err(found));
            }
            tx.execute(
                "INSERT INTO repl_meta (key, value) VALUES ('writes', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [found.wrapping_add(1)],
            )?;
            tx.commit()?;
            Ok(Ok((out, found.wrapping_add(1))))
        })();
        match result.map_err(|e| self.err(e))? {
            Ok((out, writes)) => {
                self.writes = Some(writes);
                Ok(out)
            }
            Err(found) => {
                tracing::debug!(
                    expected,
                    found,
                    "replication: the store's write count moved behind replication's back"
                );
                self.replaced = true;
                self.overwritten = true;
                Err(DbError::Restored {
                    path: self.path.clone(),
                })
            }
        }
    }

    /// A connection reading the file as it is is replaced by a read-write
    /// one once the disk lets it be opened (a write on it would fail as
    /// unwritable: the callers' retries bring it back here).
    fn writable_again(&mut self) {
        if !self.as_is || file_id(&self.path) != Some(self.file) {
            return;
        }
        if let Ok(conn) = connect(&self.path) {
            if conn.busy_timeout(BUSY_WAIT).is_ok() {
                self.conn = conn;
                self.as_is = false;
                self.seen_version = None;
                tracing::info!("replication: routing.db can be written again");
            }
        }
    }

    fn info(&self, table: Table) -> &TableInfo {
        self.tables
            .iter()
            .find(|t| t.table == table)
            .expect("every table is loaded at open")
    }

    /// Every version recorded: the node's replica.
    pub fn load_replica(&self) -> Result<Replica, DbError> {
        let mut replica = Replica::new();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT tbl, pk, hlc, origin, data, intent_hlc, intent_origin FROM repl_versions",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (tbl, pk, hlc, origin, data, intent_hlc, intent_origin) =
                row.map_err(|e| self.err(e))?;
            let Some(table) = Table::from_name(&tbl) else {
                continue;
            };
            let intent = match (intent_hlc, intent_origin) {
                (Some(hlc), Some(origin)) => Some(Version {
                    hlc: Hlc(hlc as u64),
                    origin: origin.as_str().into(),
                }),
                _ => None,
            };
            replica.put(RowVersion {
                key: RowKey::new(table, pk),
                version: Version {
                    hlc: Hlc(hlc as u64),
                    origin: origin.as_str().into(),
                },
                intent,
                data,
            });
        }
        Ok(replica)
    }

    /// Compares every row with its recorded version and versions what
    /// differs: rows changed while this node did not run (or behind its
    /// triggers' back), and rows of a table that never replicated before.
    /// Rows recorded but gone get a tombstone. Empties the change log.
    pub fn reconcile(&mut self, node: &mut Node, now: Now) -> Result<usize, DbError> {
        let tables = self.tables.clone();
        // Undone if the transaction fails, as in `poll_changes`.
        let mut versioned: (Vec<RowVersion>, Vec<Option<RowVersion>>) = Default::default();
        self.with_tx(|tx| {
            let mut current: Vec<(RowKey, Option<String>)> = Vec::new();
            let mut present: HashSet<RowKey> = HashSet::new();
            for info in &tables {
                let mut stmt = tx.prepare(&info.select_all)?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                })?;
                for row in rows {
                    let (pk, data, blob) = row?;
                    let key = RowKey::new(info.table, pk);
                    present.insert(key.clone());
                    if holds_no_blob(&key, &blob) {
                        current.push((key, Some(data)));
                    }
                }
            }
            let gone: Vec<RowKey> = node
                .replica()
                .iter()
                .filter(|r| !r.is_tombstone() && !present.contains(&r.key))
                .map(|r| r.key)
                .collect();
            current.extend(gone.into_iter().map(|k| (k, None)));
            current.retain(|(key, data)| fits_a_message(key, data));
            let before = held_now(node, current.iter().map(|(key, _)| key));
            let written = node.local_writes(now, current);
            versioned = with_previous(&written, before);
            record(tx, &written)?;
            tx.execute("DELETE FROM repl_changes", [])?;
            // Edits made while replication did not run count as decisions.
            tx.execute("DELETE FROM repl_write_kinds", [])?;
            Ok(written.len())
        })
        .inspect_err(|_| node.local_writes_failed(versioned.0, versioned.1))
    }

    /// Drains the change log: gives every changed row a new version (in the
    /// node, which queues its broadcast) and records it. Cheap when nothing
    /// changed: one `PRAGMA data_version`. `force`: look even if no other
    /// connection committed. Returns how many rows got a new version.
    pub fn poll_changes(
        &mut self,
        node: &mut Node,
        now: Now,
        force: bool,
    ) -> Result<usize, DbError> {
        self.still_at_its_path()?;
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if !force && self.seen_version == Some(version) {
            return Ok(0);
        }
        self.seen_version = Some(version);
        // Nothing logged: no transaction. Every transaction of replication's
        // commits its write count, which other connections see as a change:
        // the routing store reloaded for it, its WAL fold a second later
        // brought this poll back, and an idle POP reloaded every 2 s (QA).
        // A change logged after this look moves the data version again.
        // The write count is looked at too: a file overwritten under us
        // (`.restore`) is caught by the transaction's check, log or not.
        let logged: bool = self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM repl_changes)", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))?;
        let found = writes_recorded(&self.conn).map_err(|e| self.err(e))?;
        if !logged && self.writes.is_none_or(|w| w == found) {
            return Ok(0);
        }
        let tables = self.tables.clone();
        let mut total = 0;
        loop {
            // What this transaction versioned, and what the replica held
            // before: undone if the transaction fails.
            let mut versioned: (Vec<RowVersion>, Vec<Option<RowVersion>>) = Default::default();
            let n = self.with_tx(|tx| {
                let entries: Vec<(i64, String, String)> = {
                    let mut stmt = tx.prepare_cached(
                        "SELECT seq, tbl, pk FROM repl_changes ORDER BY seq LIMIT ?1",
                    )?;
                    let rows = stmt.query_map([CHANGES_PER_POLL as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?;
                    rows.collect::<rusqlite::Result<_>>()?
                };
                let Some(last) = entries.last().map(|e| e.0) else {
                    return Ok((0, 0));
                };
                let mut changed = Vec::with_capacity(entries.len());
                for (_, tbl, pk) in &entries {
                    let Some(info) = tables.iter().find(|t| t.table.name() == tbl) else {
                        continue;
                    };
                    let (data, blob) = tx
                        .prepare_cached(&info.select_one)?
                        .query_row([pk], |r| {
                            Ok((Some(r.get::<_, String>(0)?), r.get::<_, Option<String>>(1)?))
                        })
                        .optional()?
                        .unwrap_or((None, None));
                    // What the store noted about the writes since the last
                    // poll: only verdicts, or a registration among them.
                    let noted = tx
                        .prepare_cached(
                            "DELETE FROM repl_write_kinds WHERE tbl = ?1 AND pk = ?2 \
                             RETURNING deliberate",
                        )?
                        .query_row([tbl, pk], |r| r.get::<_, bool>(0))
                        .optional()?;
                    let kind = match noted {
                        Some(false) => WriteKind::Verdict,
                        Some(true) => WriteKind::Registration,
                        None => WriteKind::Deliberate,
                    };
                    let key = RowKey::new(info.table, pk.clone());
                    if fits_a_message(&key, &data) && holds_no_blob(&key, &blob) {
                        changed.push((key, data, kind));
                    }
                }
                let before = held_now(node, changed.iter().map(|(key, _, _)| key));
                let written = node.local_writes_by_kind(now, changed);
                versioned = with_previous(&written, before);
                record(tx, &written)?;
                tx.execute("DELETE FROM repl_changes WHERE seq <= ?1", [last])?;
                Ok((entries.len(), written.len()))
            });
            let n = n.inspect_err(|_| {
                // The change log is still there (the transaction rolled
                // back): look again at the next tick, even if no other
                // connection commits meanwhile, and version it then.
                self.seen_version = None;
                node.local_writes_failed(versioned.0, versioned.1);
            })?;
            total += n.1;
            if n.0 < CHANGES_PER_POLL {
                return Ok(total);
            }
        }
    }

    /// Writes rows that arrived from other POPs (and won) into their
    /// tables, with their versions, in one transaction. A row its table
    /// cannot hold (see [`RemoteRowRefused`]) is left out, with its
    /// version, and the rest written: returned, for the driver to say.
    pub fn persist_remote(
        &mut self,
        rows: &[RowVersion],
    ) -> Result<Vec<RemoteRowRefused>, DbError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let tables = self.tables.clone();
        self.with_tx(|tx| {
            let before: i64 =
                tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM repl_changes", [], |r| {
                    r.get(0)
                })?;
            let mut written = Vec::with_capacity(rows.len());
            let mut refused = Vec::new();
            for row in rows {
                let info = tables
                    .iter()
                    .find(|t| t.table == row.key.table)
                    .expect("every table is loaded at open");
                if let Err(reason) = keyed_object(row) {
                    refused.push(RemoteRowRefused {
                        key: row.key.clone(),
                        reason,
                    });
                    continue;
                }
                // Each row on its own: one the table refuses (a constraint)
                // is undone alone.
                tx.execute_batch("SAVEPOINT remote_row")?;
                match apply_remote(tx, info, row) {
                    Ok(()) => {
                        tx.execute_batch("RELEASE remote_row")?;
                        written.push(row);
                    }
                    Err(e) if refused_for_its_content(&e) => {
                        tx.execute_batch("ROLLBACK TO remote_row; RELEASE remote_row")?;
                        refused.push(RemoteRowRefused {
                            key: row.key.clone(),
                            reason: e.to_string(),
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
            record(tx, written)?;
            // What our own writes just put in the change log is not a local
            // change.
            tx.execute("DELETE FROM repl_changes WHERE seq > ?1", [before])?;
            Ok(refused)
        })
        // Our commit does not move our own data_version; nothing to poll.
    }

    /// When this POP last heard another POP (Unix ms), as last recorded;
    /// `None` if never (a new POP).
    pub fn last_contact(&self) -> Result<Option<u64>, DbError> {
        self.conn
            .query_row(
                "SELECT value FROM repl_meta WHERE key = 'last_contact_ms'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.map(|ms| ms.max(0) as u64))
            .map_err(|e| self.err(e))
    }

    /// Records when this POP last heard another POP (see
    /// `Node::last_contact`).
    pub fn set_last_contact(&mut self, ms: u64) -> Result<(), DbError> {
        self.still_at_its_path()?;
        self.conn
            .execute(
                "INSERT INTO repl_meta (key, value) VALUES ('last_contact_ms', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [ms as i64],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The members' absences as last recorded (see [`Absences`]): rows
    /// `down_since:<node id>` and `owed:<node id>` of `repl_meta`.
    pub fn absences(&self) -> Result<Absences, DbError> {
        let mut absences = Absences::default();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT key, value FROM repl_meta \
                 WHERE key GLOB 'down_since:*' OR key GLOB 'owed:*'",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (key, ms) = row.map_err(|e| self.err(e))?;
            let ms = ms.max(0) as u64;
            match key.split_once(':') {
                Some(("down_since", id)) => absences.down_since.insert(id.into(), ms),
                Some(("owed", id)) => absences.owed.insert(id.into(), ms),
                _ => None,
            };
        }
        Ok(absences)
    }

    /// Records the members' absences, replacing what was recorded.
    pub fn set_absences(&mut self, absences: &Absences) -> Result<(), DbError> {
        self.with_tx(|tx| {
            tx.execute(
                "DELETE FROM repl_meta \
                 WHERE key GLOB 'down_since:*' OR key GLOB 'owed:*'",
                [],
            )?;
            let mut insert =
                tx.prepare_cached("INSERT INTO repl_meta (key, value) VALUES (?1, ?2)")?;
            for (kind, map) in [
                ("down_since", &absences.down_since),
                ("owed", &absences.owed),
            ] {
                for (id, ms) in map {
                    insert.execute(params![format!("{kind}:{id}"), *ms as i64])?;
                }
            }
            Ok(())
        })
    }

    /// Deletes collected tombstones' versions.
    pub fn forget(&mut self, keys: &[RowKey]) -> Result<(), DbError> {
        self.with_tx(|tx| {
            let mut stmt =
                tx.prepare_cached("DELETE FROM repl_versions WHERE tbl = ?1 AND pk = ?2")?;
            for k in keys {
                stmt.execute(params![k.table.name(), k.pk])?;
            }
            Ok(())
        })
    }

    /// Whether `pops` holds a row of `node_id`.
    pub fn has_pop(&self, node_id: &str) -> Result<bool, DbError> {
        self.conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM pops WHERE node_id = ?1)",
                [node_id],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// The node id of a drained POP that `routing.db` holds at
    /// `gossip_addr` under another id than `node_id`: this POP's previous
    /// identity, when it starts under a new node id on the same host and
    /// disk (see `Driver`'s start). The one most recently versioned when
    /// there are several.
    pub fn drained_pop_at(
        &self,
        gossip_addr: &str,
        node_id: &str,
    ) -> Result<Option<String>, DbError> {
        self.conn
            .query_row(
                "SELECT p.node_id FROM pops p \
                 LEFT JOIN repl_versions v ON v.tbl = 'pops' AND v.pk = p.node_id \
                 WHERE p.gossip_addr = ?1 AND p.node_id IS NOT ?2 AND p.draining != 0 \
                 ORDER BY v.hlc DESC LIMIT 1",
                [gossip_addr, node_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Writes this POP's own row of `pops` when it differs from what is
    /// there (a restart with the same settings writes nothing, so nothing
    /// replicates). `draining` and `serving` are written only when the row
    /// is new: afterwards they belong to `crate::steering` (an operator's
    /// drain outlives a restart).
    ///
    /// An UPDATE, then an INSERT if there was no row, not one UPSERT: an
    /// UPSERT's conflict policy overrides the change-capture trigger's
    /// `INSERT OR REPLACE`, and its update then fails on `repl_changes`'
    /// UNIQUE key (the trigger logs NEW and OLD, the same key), so a POP whose own row
    /// changed (a new name, address or mesh endpoint) could not start.
    pub fn upsert_pop(&mut self, row: &crate::store::PopRow) -> Result<(), DbError> {
        self.with_tx(|tx| {
            let values = params![
                row.node_id,
                row.name,
                row.region,
                row.country,
                row.public_addrs,
                row.private_addr,
                row.gossip_addr,
                row.transport_addr,
                row.draining,
                row.serving,
                row.wg_public_key,
                row.wg_endpoint,
                row.prefix6
            ];
            tx.execute(
                "UPDATE pops SET name = ?2, region = ?3, country = ?4, public_addrs = ?5, \
                 private_addr = ?6, gossip_addr = ?7, transport_addr = ?8, \
                 wg_public_key = ?11, wg_endpoint = ?12, prefix6 = ?13 WHERE node_id = ?1 \
                 AND (name IS NOT ?2 OR region IS NOT ?3 OR country IS NOT ?4 \
                 OR public_addrs IS NOT ?5 OR private_addr IS NOT ?6 OR gossip_addr IS NOT ?7 \
                 OR transport_addr IS NOT ?8 OR wg_public_key IS NOT ?11 \
                 OR wg_endpoint IS NOT ?12 OR prefix6 IS NOT ?13)",
                values,
            )?;
            tx.execute(
                "INSERT INTO pops (node_id, name, region, country, public_addrs, private_addr, \
                 gossip_addr, transport_addr, draining, serving, wg_public_key, wg_endpoint, \
                 prefix6) \
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13 \
                 WHERE NOT EXISTS (SELECT 1 FROM pops WHERE node_id = ?1)",
                values,
            )
            .map(|_| ())
        })
    }

    /// Columns that replicate, per table (for README and tests).
    pub fn replicated_columns(&self, table: Table) -> &[String] {
        &self.info(table).columns
    }
}

/// A remote row left out of its table (see [`ReplDb::persist_remote`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRowRefused {
    pub key: RowKey,
    pub reason: String,
}

/// Every row a POP writes is its table's replicated columns as a JSON
/// object holding its key (`json_object`, see [`TableInfo`]); anything
/// else (a broken POP's) would fail the SQL, or, keyed by another id,
/// overwrite or rename another row.
fn keyed_object(row: &RowVersion) -> Result<(), String> {
    let Some(data) = &row.data else {
        return Ok(());
    };
    let column = row.key.table.key_column();
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(data) {
        Err(e) => Err(format!("its data is not a JSON object: {e}")),
        Ok(object) => match object.get(column) {
            Some(serde_json::Value::String(k)) if *k == row.key.pk => Ok(()),
            other => Err(format!(
                "its data's {column} is {}, not its key",
                other.map_or("missing".to_string(), |v| v.to_string())
            )),
        },
    }
}

/// Writes one remote row (or deletes it, for a tombstone).
fn apply_remote(
    tx: &rusqlite::Transaction<'_>,
    info: &TableInfo,
    row: &RowVersion,
) -> rusqlite::Result<()> {
    match &row.data {
        Some(data) => {
            let updated = tx
                .prepare_cached(&info.update)?
                .execute(params![data, row.key.pk])?;
            if updated == 0 {
                tx.prepare_cached(&info.insert)?.execute(params![data])?;
            }
        }
        None => {
            tx.prepare_cached(&format!(
                "DELETE FROM {} WHERE {} = ?1",
                quote(info.table.name()),
                quote(info.table.key_column())
            ))?
            .execute([&row.key.pk])?;
        }
    }
    Ok(())
}

/// The table refused the row itself (a NOT NULL or CHECK constraint, a
/// type), not the file: the other rows can still be written.
fn refused_for_its_content(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::{ConstraintViolation, TooBig, TypeMismatch};
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, ConstraintViolation | TypeMismatch | TooBig))
}

fn record<'a>(
    tx: &rusqlite::Transaction<'_>,
    rows: impl IntoIterator<Item = &'a RowVersion>,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO repl_versions (tbl, pk, hlc, origin, data, intent_hlc, intent_origin) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
         ON CONFLICT (tbl, pk) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, \
         data = excluded.data, intent_hlc = excluded.intent_hlc, \
         intent_origin = excluded.intent_origin",
    )?;
    for r in rows {
        stmt.execute(params![
            r.key.table.name(),
            r.key.pk,
            r.version.hlc.0 as i64,
            &*r.version.origin,
            r.data,
            r.intent.as_ref().map(|v| v.hlc.0 as i64),
            r.intent.as_ref().map(|v| &*v.origin),
        ])?;
    }
    Ok(())
}

/// `repl_meta.writes`: how many transactions replication has committed to
/// this file (0 before the first).
fn writes_recorded(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT value FROM repl_meta WHERE key = 'writes'",
        [],
        |r| r.get(0),
    )
    .optional()
    .map(|v| v.unwrap_or(0))
}

/// `repl_versions` of a database written before versions had intents
/// (2026-12-05): every version recorded then counts as deliberate.
fn add_intent_columns(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let has_intent: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM pragma_table_info('repl_versions') WHERE name = 'intent_hlc')",
        [],
        |r| r.get(0),
    )?;
    if !has_intent {
        tx.execute_batch(
            "ALTER TABLE repl_versions ADD COLUMN intent_hlc INTEGER; \
             ALTER TABLE repl_versions ADD COLUMN intent_origin TEXT;",
        )?;
    }
    Ok(())
}

/// What the replica holds now for each of `keys`: what a local write that
/// fails to be recorded goes back to (`Node::local_writes_failed`).
fn held_now<'a>(
    node: &Node,
    keys: impl Iterator<Item = &'a RowKey>,
) -> HashMap<RowKey, RowVersion> {
    keys.filter_map(|key| Some((key.clone(), node.replica().get(key)?)))
        .collect()
}

/// `written`, and beside it, in the same order, what each row replaced.
fn with_previous(
    written: &[RowVersion],
    before: HashMap<RowKey, RowVersion>,
) -> (Vec<RowVersion>, Vec<Option<RowVersion>>) {
    let previous = written
        .iter()
        .map(|r| before.get(&r.key).cloned())
        .collect();
    (written.to_vec(), previous)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::node::Settings;
    use crate::store::RoutingStore;
    use std::sync::Arc;

    fn node(id: &str) -> Node {
        let s = Settings {
            id: Arc::from(id),
            cluster: "t".into(),
            schema: crate::store::SCHEMA_VERSION as u32,
            gossip_addr: "127.0.0.1:1".parse().unwrap(),
            transport_addr: "127.0.0.1:2".parse().unwrap(),
            generation: 1,
            gossip_interval: Duration::from_secs(1),
            sync_interval: Duration::from_secs(2),
            broadcast_delay: Duration::from_millis(5),
            expected_size: 3,
            tombstone_ttl: Duration::from_secs(3600),
            gossip_key: None,
            accepted_gossip_key: None,
            seed: 1,
        };
        Node::new(s, Replica::new(), Now::system())
    }

    fn setup() -> (tempfile::TempDir, PathBuf, ReplDb, Node) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        RoutingStore::open(&path).unwrap();
        let db = ReplDb::open(&path).unwrap();
        (dir, path, db, node("a"))
    }

    fn other(path: &Path) -> Connection {
        Connection::open(path).unwrap()
    }

    /// The one value `sql` selects.
    fn value<T: rusqlite::types::FromSql>(conn: &Connection, sql: &str) -> T {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    const INSERT: &str = "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
        VALUES ('b1', 'web', 'eu', '10.0.0.1', 80, 1, 2, 100, 150)";

    /// The fixture of the bug: a POP restarted with another endpoint (or
    /// name, or address) failed with "UNIQUE constraint failed:
    /// repl_changes.tbl, repl_changes.pk".
    #[test]
    fn a_pops_own_row_that_changed_at_restart_is_rewritten_and_replicated() {
        let (_d, _path, mut db, mut node) = setup();
        let mut row = crate::store::PopRow {
            node_id: "a".into(),
            name: "pop-a".into(),
            region: "eu".into(),
            wg_endpoint: "10.0.0.1:51820".into(),
            ..Default::default()
        };
        db.upsert_pop(&row).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), true).unwrap(), 1);
        // Unchanged: nothing written, nothing to replicate.
        db.upsert_pop(&row).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), true).unwrap(), 0);
        // Changed, with the previous change still in the log too.
        row.wg_endpoint = "10.0.0.1:51900".into();
        db.upsert_pop(&row).unwrap();
        row.name = "pop-a2".into();
        db.upsert_pop(&row).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), true).unwrap(), 1);
        let data: serde_json::Value =
            serde_json::from_str(node.replica().data(&RowKey::new(Table::Pops, "a")).unwrap())
                .unwrap();
        assert_eq!(data["wg_endpoint"], "10.0.0.1:51900");
        assert_eq!(data["name"], "pop-a2");
    }

    /// The previous identity of a POP starting under a new node id: a
    /// drained row at its gossip address under another id; none when that
    /// row is not drained, is at another address, or is its own id's.
    #[test]
    fn a_drained_row_at_the_same_gossip_address_under_another_id_is_found() {
        let (_d, _path, mut db, _node) = setup();
        let pop = |id: &str, gossip: &str, draining: bool| crate::store::PopRow {
            node_id: id.into(),
            name: format!("pop-{id}"),
            region: "eu".into(),
            gossip_addr: gossip.into(),
            draining,
            ..Default::default()
        };
        db.upsert_pop(&pop("old", "10.0.0.1:4001", true)).unwrap();
        db.upsert_pop(&pop("elsewhere", "10.0.0.2:4001", true))
            .unwrap();
        db.upsert_pop(&pop("serving", "10.0.0.3:4001", false))
            .unwrap();
        let found = |gossip: &str, id: &str| db.drained_pop_at(gossip, id).unwrap();
        assert_eq!(found("10.0.0.1:4001", "new").as_deref(), Some("old"));
        assert_eq!(found("10.0.0.1:4001", "old"), None, "its own id");
        assert_eq!(found("10.0.0.3:4001", "new"), None, "not drained");
        assert_eq!(found("10.0.0.9:4001", "new"), None, "another address");
    }

    #[test]
    fn own_pop_row_changed_since_the_last_start_is_updated_not_refused_by_the_trigger() {
        let (_d, path, mut db, mut node) = setup();
        let mut row = crate::store::PopRow {
            node_id: "a".into(),
            name: "pop-a".into(),
            region: "sa".into(),
            gossip_addr: "10.0.0.1:4001".into(),
            draining: false,
            serving: true,
            ..Default::default()
        };
        db.upsert_pop(&row).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), true).unwrap(), 1);
        other(&path)
            .execute("UPDATE pops SET draining = 1 WHERE node_id = 'a'", [])
            .unwrap();
        db.poll_changes(&mut node, Now::system(), true).unwrap();
        // Restarted at another address (an UPSERT failed here: UNIQUE
        // constraint failed: repl_changes.tbl, repl_changes.pk).
        row.gossip_addr = "10.0.0.9:4001".into();
        db.upsert_pop(&row).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), true).unwrap(), 1);
        let (gossip, draining): (String, bool) = other(&path)
            .query_row(
                "SELECT gossip_addr, draining FROM pops WHERE node_id = 'a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(gossip, "10.0.0.9:4001");
        assert!(draining, "the drain is steering's, kept across the restart");
        // The same settings again: nothing written, nothing to replicate.
        db.upsert_pop(&row).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), true).unwrap(), 0);
    }

    /// QA, 2026-12-06: every idle replicating POP reloaded its routing table
    /// every 2 s, forever, each time with an INFO line. A poll with an empty
    /// change log still committed (its write count), which moved the routing
    /// store's `data_version` (a reload), whose WAL fold a second later
    /// moved replication's (a poll), and so on.
    #[test]
    fn a_poll_with_nothing_to_version_commits_nothing() {
        let (_d, path, mut db, mut node) = setup();
        let reader = other(&path);
        let before: i64 = value(&reader, "PRAGMA data_version");
        for _ in 0..3 {
            assert_eq!(db.poll_changes(&mut node, Now::system(), true).unwrap(), 0);
        }
        let after: i64 = value(&reader, "PRAGMA data_version");
        assert_eq!(before, after, "an empty poll committed a write");
        // Something to version still commits (and is seen).
        reader.execute(INSERT, []).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
    }

    /// The poll that skips its transaction when nothing is logged still
    /// finds a file another replication wrote (a `.restore` whose backup
    /// logged nothing).
    #[test]
    fn a_store_written_by_another_replication_is_caught_with_nothing_logged() {
        let (_d, _path, mut db, mut node) = setup();
        assert_eq!(db.poll_changes(&mut node, Now::system(), true).unwrap(), 0);
        let _another = ReplDb::open(&_path).unwrap();
        let err = db
            .poll_changes(&mut node, Now::system(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("was overwritten"), "{err}");
    }

    /// A poll whose transaction failed (an operator's `sqlite3` holding the
    /// write lock) had already noted the data version: the change log was
    /// not looked at again until some other connection committed.
    #[test]
    fn a_poll_that_could_not_write_looks_again_at_the_next_tick() {
        let (_d, path, mut db, mut node) = setup();
        db.conn.busy_timeout(Duration::from_millis(20)).unwrap();
        let operator = other(&path);
        operator.execute(INSERT, []).unwrap();
        operator.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!(db.poll_changes(&mut node, Now::system(), false).is_err());
        operator.execute_batch("ROLLBACK").unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
        assert!(node
            .replica()
            .data(&RowKey::new(Table::Backends, "b1"))
            .is_some());
    }

    /// A poll whose transaction fails after the node versioned the rows
    /// (a full disk refuses the commit) leaves the node as it was: a
    /// registration, versioned even when it repeats its row, got a new
    /// version, and a broadcast, at every failed poll.
    #[test]
    fn versions_a_poll_could_not_record_are_undone() {
        let (_d, path, mut db, mut node) = setup();
        let operator = other(&path);
        operator.execute(INSERT, []).unwrap();
        operator
            .execute(
                "INSERT INTO repl_write_kinds (tbl, pk, deliberate) VALUES ('backends', 'b1', 1)",
                [],
            )
            .unwrap();
        // Recording a version fails, as a commit on a full disk does.
        operator
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON repl_versions \
                 BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
            )
            .unwrap();
        let key = RowKey::new(Table::Backends, "b1");
        for _ in 0..3 {
            assert!(db.poll_changes(&mut node, Now::system(), false).is_err());
            assert_eq!(node.replica().get(&key), None);
        }
        operator.execute_batch("DROP TRIGGER refuse").unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
        let recorded: i64 = value(&operator, "SELECT hlc FROM repl_versions WHERE pk = 'b1'");
        assert_eq!(
            node.replica().get(&key).map(|r| r.version.hlc.0 as i64),
            Some(recorded)
        );
    }

    /// A 17 MB value written with sqlite3 was versioned, then re-sent at
    /// every exchange and dropped by every receiver (over the message
    /// limit), with nothing logged anywhere.
    #[test]
    fn a_row_too_large_to_replicate_gets_no_version() {
        let (_d, path, mut db, mut node) = setup();
        let operator = other(&path);
        operator.execute(INSERT, []).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
        let key = RowKey::new(Table::Backends, "b1");
        let before = node.replica().version_of(&key).cloned();
        let huge = "x".repeat(MAX_ROW_BYTES + 1);
        operator
            .execute("UPDATE backends SET app = ?1 WHERE id = 'b1'", [&huge])
            .unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 0);
        assert_eq!(node.replica().version_of(&key).cloned(), before);
        // Made smaller, it replicates again.
        operator
            .execute("UPDATE backends SET app = 'web2' WHERE id = 'b1'", [])
            .unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
    }

    /// The file written by another replication than this one: another
    /// process replicating from it, or a backup restored into it in place
    /// (`sqlite3 routing.db ".restore backup.db"`, same inode: see
    /// `tests/replication.rs`), which brings an older count of its writes.
    #[test]
    fn a_store_written_by_another_replication_is_left_alone() {
        let (_d, path, mut db, mut node) = setup();
        let operator = other(&path);
        operator.execute(INSERT, []).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
        let _another = ReplDb::open(&path).unwrap();
        operator
            .execute("UPDATE backends SET weight = 9", [])
            .unwrap();
        let err = db
            .poll_changes(&mut node, Now::system(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("was overwritten") && err.contains("restart"),
            "{err}"
        );
        // Rolled back: the change is still in the log for a restart.
        let logged: i64 = value(&operator, "SELECT COUNT(*) FROM repl_changes");
        assert_eq!(logged, 1);
        let row = node
            .replica()
            .get(&RowKey::new(Table::Backends, "b1"))
            .unwrap();
        assert!(matches!(
            db.persist_remote(&[row]),
            Err(DbError::Restored { .. })
        ));
    }

    #[test]
    fn a_routing_db_renamed_over_is_left_alone_not_written_through_its_wal() {
        let (d, path, mut db, mut node) = setup();
        let operator = other(&path);
        operator.execute(INSERT, []).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
        drop(operator);
        // An operator restores a backup taken now: `mv backup.db routing.db`.
        let backup = d.path().join("backup.db");
        other(&path)
            .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
            .unwrap();
        std::fs::rename(&backup, &path).unwrap();
        let operator = other(&path);
        operator
            .execute_batch("PRAGMA journal_mode = WAL; UPDATE backends SET weight = 9")
            .unwrap();
        // Remote rows, versions, polls: all refused, naming the file.
        let err = db
            .poll_changes(&mut node, Now::system(), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("was replaced") && err.contains("restart"),
            "{err}"
        );
        let row = node
            .replica()
            .get(&RowKey::new(Table::Backends, "b1"))
            .unwrap();
        assert!(matches!(
            db.persist_remote(&[row]),
            Err(DbError::Replaced { .. })
        ));
        assert!(matches!(
            db.set_last_contact(1),
            Err(DbError::Replaced { .. })
        ));
        drop(db);
        // The new file is whole, with the operator's write in it.
        assert_eq!(value::<String>(&operator, "PRAGMA integrity_check"), "ok");
        let weight: i64 = value(&operator, "SELECT weight FROM backends WHERE id = 'b1'");
        assert_eq!(weight, 9);
    }

    #[test]
    fn a_row_holding_a_blob_gets_no_version() {
        let (_d, path, mut db, mut node) = setup();
        let operator = other(&path);
        operator.execute(INSERT, []).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
        let key = RowKey::new(Table::Backends, "b1");
        let before = node.replica().version_of(&key).cloned();
        // The other POPs got country NULL and routed the backend that this
        // POP skipped as unreadable.
        operator
            .execute("UPDATE backends SET country = x'4445' WHERE id = 'b1'", [])
            .unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 0);
        assert_eq!(node.replica().version_of(&key).cloned(), before);
        // Nor at a start's reconcile, and the row is not taken as deleted.
        assert_eq!(db.reconcile(&mut node, Now::system()).unwrap(), 0);
        assert_eq!(node.replica().version_of(&key).cloned(), before);
        // Rewritten as text, it replicates again.
        operator
            .execute("UPDATE backends SET country = 'DE' WHERE id = 'b1'", [])
            .unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
        let data: serde_json::Value =
            serde_json::from_str(node.replica().data(&key).unwrap()).unwrap();
        assert_eq!(data["country"], "DE");
    }

    #[test]
    fn an_operators_edit_gets_a_version_and_local_columns_do_not() {
        let (_d, path, mut db, mut node) = setup();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 0);
        other(&path).execute(INSERT, []).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
        let key = RowKey::new(Table::Backends, "b1");
        let data: serde_json::Value =
            serde_json::from_str(node.replica().data(&key).unwrap()).unwrap();
        assert_eq!(data["wg_ip"], "10.0.0.1");
        assert_eq!(data["port"], 80);
        assert!(
            data.get("last_heartbeat_ms").is_none(),
            "local only: {data}"
        );
        assert!(!db
            .replicated_columns(Table::Backends)
            .contains(&"last_heartbeat_ms".to_string()));

        // A heartbeat-only update fires no trigger; a real one does.
        let before = node.replica().get(&key).unwrap().version;
        other(&path)
            .execute(
                "UPDATE backends SET last_heartbeat_ms = 5 WHERE id = 'b1'",
                [],
            )
            .unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 0);
        other(&path)
            .execute("UPDATE backends SET port = 81 WHERE id = 'b1'", [])
            .unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
        assert!(node.replica().get(&key).unwrap().version.beats(&before));

        // A hard delete is a tombstone.
        other(&path).execute("DELETE FROM backends", []).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
        assert!(node.replica().get(&key).unwrap().is_tombstone());

        // And it all survives a restart: the versions are in the file.
        let reopened = ReplDb::open(&path).unwrap().load_replica().unwrap();
        assert_eq!(reopened.top_digest(), node.replica().top_digest());
    }

    /// The store's own verdict writes (expiry, a heartbeat taken over)
    /// keep the intent of the registration; a deregistration is deliberate.
    #[test]
    fn the_stores_verdicts_keep_the_registrations_intent() {
        let (_d, path, mut db, mut node) = setup();
        let mut store = RoutingStore::open(&path).unwrap();
        store.set_node_id("a");
        let rec = engine::snapshot::BackendRecord {
            id: "b1".into(),
            app: "web".into(),
            region: "eu".into(),
            country: None,
            ip: "10.0.0.1".into(),
            port: 80,
            healthy: true,
            weight: 2,
            soft_limit: 10,
            hard_limit: 20,
            deleted: false,
        };
        store.register(&rec, 1_000).unwrap();
        let key = RowKey::new(Table::Backends, "b1");
        let poll = |db: &mut ReplDb, node: &mut Node| {
            assert_eq!(db.poll_changes(node, Now::system(), true).unwrap(), 1);
            node.replica().get(&key).unwrap()
        };
        let registered = poll(&mut db, &mut node);
        assert_eq!(registered.intent, None, "a registration is deliberate");

        store.set_expired(&[("b1".into(), true)]).unwrap();
        let expired = poll(&mut db, &mut node);
        assert!(expired.version.beats(&registered.version));
        assert_eq!(expired.intent.as_ref(), Some(&registered.version));

        store.set_node_id("c");
        assert!(store.heartbeat("b1", 2_000).unwrap());
        let taken_over = poll(&mut db, &mut node);
        assert_eq!(taken_over.intent.as_ref(), Some(&registered.version));

        // Registered again, the row unchanged but for `expired`: a decision,
        // even with a verdict in the same poll.
        store.set_expired(&[("b1".into(), true)]).unwrap();
        let _ = poll(&mut db, &mut node);
        store.register(&rec, 3_000).unwrap();
        store.set_node_id("d");
        assert!(store.heartbeat("b1", 3_100).unwrap());
        let again = poll(&mut db, &mut node);
        assert_eq!(again.intent, None, "a registration is a decision");
        // ... and an operator's own edit of `expired` too.
        other(&path)
            .execute("UPDATE backends SET expired = 1 WHERE id = 'b1'", [])
            .unwrap();
        assert_eq!(poll(&mut db, &mut node).intent, None);
        store.set_expired(&[("b1".into(), false)]).unwrap();
        let taken_over = poll(&mut db, &mut node);
        assert!(taken_over.intent.is_some());

        assert!(store.deregister("b1").unwrap());
        let deleted = poll(&mut db, &mut node);
        assert_eq!(deleted.intent, None, "a delete is deliberate");
        assert!(deleted.stamp().beats(&taken_over.stamp()));

        // Intents survive a restart.
        store.set_expired(&[("b1".into(), true)]).unwrap();
        let verdict = poll(&mut db, &mut node);
        assert_eq!(verdict.intent.as_ref(), Some(&deleted.version));
        let reopened = ReplDb::open(&path).unwrap().load_replica().unwrap();
        assert_eq!(reopened.get(&key), Some(verdict));
        assert_eq!(reopened.top_digest(), node.replica().top_digest());
    }

    /// A `routing.db` whose versions were recorded before intents existed
    /// opens, and its versions count as deliberate.
    #[test]
    fn versions_recorded_before_intents_load_as_deliberate() {
        let (_d, path, db, _node) = setup();
        drop(db);
        let old = other(&path);
        old.execute_batch(
            "DROP TABLE repl_versions;
             CREATE TABLE repl_versions (tbl TEXT NOT NULL, pk TEXT NOT NULL,
                 hlc INTEGER NOT NULL, origin TEXT NOT NULL, data TEXT,
                 PRIMARY KEY (tbl, pk));
             INSERT INTO repl_versions VALUES ('backends', 'b1', 7, 'z', '{\"port\":80}');",
        )
        .unwrap();
        drop(old);
        let db = ReplDb::open(&path).unwrap();
        let row = db
            .load_replica()
            .unwrap()
            .get(&RowKey::new(Table::Backends, "b1"))
            .unwrap();
        assert_eq!(row.version.hlc, Hlc(7));
        assert_eq!(row.intent, None);
        assert_eq!(row.data.as_deref(), Some(r#"{"port":80}"#));
    }

    #[test]
    fn remote_rows_are_applied_without_echo_and_keep_local_columns() {
        let (_d, path, mut db, mut a) = setup();
        other(&path).execute(INSERT, []).unwrap();
        other(&path)
            .execute(
                "UPDATE backends SET last_heartbeat_ms = 1234 WHERE id = 'b1'",
                [],
            )
            .unwrap();
        db.poll_changes(&mut a, Now::system(), false).unwrap();
        let key = RowKey::new(Table::Backends, "b1");
        let mine = a.replica().get(&key).unwrap();

        // Another POP changed the port and added a row.
        let mut theirs = mine.clone();
        theirs.version = Version {
            hlc: Hlc(mine.version.hlc.0 + 10),
            origin: Arc::from("b"),
        };
        theirs.data = Some(mine.data.unwrap().replace("\"port\":80", "\"port\":8080"));
        let mut added = theirs.clone();
        added.key = RowKey::new(Table::Backends, "b2");
        added.data = Some(theirs.data.clone().unwrap().replace("\"b1\"", "\"b2\""));
        db.persist_remote(&[theirs.clone(), added]).unwrap();

        let conn = other(&path);
        let (port, hb): (i64, Option<i64>) = conn
            .query_row(
                "SELECT port, last_heartbeat_ms FROM backends WHERE id = 'b1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((port, hb), (8080, Some(1234)));
        let n: i64 = value(&conn, "SELECT COUNT(*) FROM backends WHERE id = 'b2'");
        assert_eq!(n, 1);
        // Not mistaken for a local change.
        let logged: i64 = value(&conn, "SELECT COUNT(*) FROM repl_changes");
        assert_eq!(logged, 0);
        assert_eq!(db.poll_changes(&mut a, Now::system(), true).unwrap(), 0);

        // A remote tombstone deletes the row.
        let mut gone = theirs;
        gone.version.hlc = Hlc(gone.version.hlc.0 + 1);
        gone.data = None;
        db.persist_remote(&[gone]).unwrap();
        let n: i64 = value(&conn, "SELECT COUNT(*) FROM backends WHERE id = 'b1'");
        assert_eq!(n, 0);
    }

    /// Found by `fuzz_replication` (a node takes whatever data a buggy
    /// peer's rows carry): one remote row the table cannot hold (not a
    /// JSON object, keyed by another id, missing a NOT NULL column) failed
    /// the whole batch, so the good rows that came with it were never
    /// written, at every exchange, for as long as the peer held the row;
    /// and a row keyed by another id renamed the row it was applied to.
    #[test]
    fn a_remote_row_the_table_cannot_hold_is_left_out_and_the_rest_written() {
        let (_d, path, mut db, mut a) = setup();
        other(&path).execute(INSERT, []).unwrap();
        db.poll_changes(&mut a, Now::system(), false).unwrap();
        let b1 = a
            .replica()
            .get(&RowKey::new(Table::Backends, "b1"))
            .unwrap();
        let remote = |table, pk: &str, data: &str| RowVersion {
            key: RowKey::new(table, pk),
            version: Version {
                hlc: Hlc(b1.version.hlc.0 + 10),
                origin: Arc::from("b"),
            },
            intent: None,
            data: Some(data.to_string()),
        };
        let good = b1.data.clone().unwrap().replace("\"b1\"", "\"b2\"");
        let renames_b1 = b1
            .data
            .clone()
            .unwrap()
            .replace("\"port\":80", "\"port\":9");
        let batch = [
            remote(Table::Backends, "b3", "0"),
            remote(
                Table::Backends,
                "b1",
                &renames_b1.replace("\"b1\"", "\"b4\""),
            ),
            remote(Table::Pops, "p1", r#"{"node_id":"p1"}"#),
            remote(Table::Backends, "b2", &good),
            remote(Table::Backends, "b5", &renames_b1),
        ];
        let refused = db.persist_remote(&batch).unwrap();
        let refused: Vec<String> = refused.iter().map(|r| r.key.to_string()).collect();
        assert_eq!(
            refused,
            ["backends/b3", "backends/b1", "pops/p1", "backends/b5"],
            "each bad row named"
        );
        let conn = other(&path);
        let ids: Vec<String> = conn
            .prepare("SELECT id || ':' || port FROM backends ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ids, ["b1:80", "b2:80"], "b1 untouched, b2 written");
        let pops: i64 = value(&conn, "SELECT COUNT(*) FROM pops");
        assert_eq!(pops, 0);
        // Only the written row's version is recorded.
        let versions: i64 = value(
            &conn,
            "SELECT COUNT(*) FROM repl_versions WHERE origin = 'b'",
        );
        assert_eq!(versions, 1);
    }

    /// A POP stopped for longer than the tombstone TTL must know, once
    /// restarted, how long ago it last heard another POP.
    #[test]
    fn the_absences_survive_a_reopen_and_are_replaced_whole() {
        let (_d, path, mut db, _node) = setup();
        assert_eq!(db.absences().unwrap(), Absences::default());
        let mut absences = Absences::default();
        absences.down_since.insert("fra".into(), 1_800_000_000_000);
        absences.down_since.insert("gru".into(), 1_800_000_100_000);
        absences.owed.insert("fra".into(), 1_800_000_000_000);
        db.set_absences(&absences).unwrap();
        db.set_last_contact(5).unwrap();
        drop(db);
        // The next run's (one replication writes a file at a time: see
        // `a_store_written_by_another_replication_is_left_alone`).
        let mut db = ReplDb::open(&path).unwrap();
        assert_eq!(db.absences().unwrap(), absences);
        // gru is back and fra completed an exchange.
        absences.down_since.remove("gru");
        absences.owed.clear();
        db.set_absences(&absences).unwrap();
        drop(db);
        let reopened = ReplDb::open(&path).unwrap();
        assert_eq!(reopened.absences().unwrap(), absences);
        assert_eq!(
            reopened.last_contact().unwrap(),
            Some(5),
            "other notes stay"
        );
    }

    #[test]
    fn the_last_contact_survives_a_reopen() {
        let (_d, path, mut db, _node) = setup();
        assert_eq!(db.last_contact().unwrap(), None);
        db.set_last_contact(1_800_000_000_000).unwrap();
        db.set_last_contact(1_800_000_060_000).unwrap();
        drop(db);
        let reopened = ReplDb::open(&path).unwrap();
        assert_eq!(reopened.last_contact().unwrap(), Some(1_800_000_060_000));
    }

    #[test]
    fn reconcile_catches_edits_made_behind_the_triggers_back() {
        let (_d, path, mut db, mut node) = setup();
        other(&path).execute(INSERT, []).unwrap();
        db.poll_changes(&mut node, Now::system(), false).unwrap();
        drop(db);
        // Edited while replication was not running, triggers dropped.
        let conn = other(&path);
        conn.execute_batch(
            "DROP TRIGGER repl_backends_update; DROP TRIGGER repl_backends_insert;
             UPDATE backends SET weight = 9 WHERE id = 'b1';
             INSERT INTO pops (node_id, name, region) VALUES ('x', 'pop-x', 'eu');",
        )
        .unwrap();
        let mut db = ReplDb::open(&path).unwrap();
        let settings = node.settings().clone();
        let replica = db.load_replica().unwrap();
        let mut node = Node::new(settings, replica, Now::system());
        assert_eq!(db.reconcile(&mut node, Now::system()).unwrap(), 2);
        let b1 = node
            .replica()
            .data(&RowKey::new(Table::Backends, "b1"))
            .unwrap();
        assert!(b1.contains("\"weight\":9"), "{b1}");
        assert!(node
            .replica()
            .data(&RowKey::new(Table::Pops, "x"))
            .is_some());
        assert_eq!(
            db.reconcile(&mut node, Now::system()).unwrap(),
            0,
            "idempotent"
        );
        // The triggers are back.
        conn.execute("UPDATE backends SET weight = 3", []).unwrap();
        assert_eq!(db.poll_changes(&mut node, Now::system(), false).unwrap(), 1);
    }
}
