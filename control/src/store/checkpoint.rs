//! Folding the WAL back into `routing.db` without holding other writers back.
//!
//! `PRAGMA wal_checkpoint(TRUNCATE)` takes SQLite's writer lock first and
//! keeps it while it copies the WAL's pages into the main file and `fsync`s
//! both files (`walCheckpoint` in sqlite3.c): every other connection's write
//! waits for those two syncs, and gives up after its busy timeout. Seen in
//! `tests/hot_reload.rs` beside three busy loops on the two-core test host:
//! one `fsync` of the main file inside the proxy's checkpoint took 3.7 s
//! (`strace -T`), and the test's own write, begun meanwhile, took 4.4 s.
//! Whoever edits the table by hand, or a provisioning tool with a short busy
//! timeout, met the same wait, or "database is locked".
//!
//! So the copy runs as `PASSIVE`, which takes no writer lock: writers append
//! to the WAL meanwhile. Only when it copied every frame and nothing was
//! committed in between does `TRUNCATE` follow; it then has nothing to copy
//! and takes the writer lock only to reset the WAL's header and truncate the
//! file, with no sync. A commit landing between the two looks (a window of
//! microseconds) makes that `TRUNCATE` copy and sync its few frames under
//! the lock, as before; a commit during the copy leaves the WAL to the next
//! fold, a second of quiet later.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use tracing::debug;

use super::data_version;

/// What [`checkpoint`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Checkpoint {
    /// Every frame copied into the main file and the WAL truncated to zero.
    Folded,
    /// Not folded (some frames copied, or none): a reader still uses the
    /// WAL, another connection was checkpointing, or a commit came in.
    Partial,
    /// SQLite refused (an I/O error, a full disk).
    Failed,
}

impl Checkpoint {
    /// Whether the main file may have been written.
    pub(super) fn ran(self) -> bool {
        self != Checkpoint::Failed
    }
}

/// Copies the WAL into the main file and truncates it when it can, never
/// waiting on another connection (its busy timeout is zero meanwhile and
/// `busy_timeout` again afterwards).
pub(super) fn checkpoint(conn: &Connection, path: &Path, busy_timeout: Duration) -> Checkpoint {
    let _ = conn.busy_timeout(Duration::ZERO);
    let outcome = copy_then_truncate(conn);
    let _ = conn.busy_timeout(busy_timeout);
    match outcome {
        Ok(done) => {
            if done == Checkpoint::Partial {
                debug!(path = %path.display(), "wal checkpoint incomplete: database in use");
            }
            done
        }
        Err(e) => {
            debug!(path = %path.display(), error = %e, "wal checkpoint failed");
            Checkpoint::Failed
        }
    }
}

fn copy_then_truncate(conn: &Connection) -> rusqlite::Result<Checkpoint> {
    let before = data_version(conn)?;
    let (busy, frames, copied) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    // `frames` is the WAL as it was when the copy began: a commit since
    // shows in `data_version`, not there.
    if busy != 0 || copied < frames || data_version(conn)? != before {
        return Ok(Checkpoint::Partial);
    }
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    Ok(if busy == 0 {
        Checkpoint::Folded
    } else {
        Checkpoint::Partial
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal_len(db: &Path) -> u64 {
        std::fs::metadata(db.with_extension("db-wal")).map_or(0, |m| m.len())
    }

    fn table(db: &Path) -> Connection {
        let conn = Connection::open(db).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (1);",
        )
        .unwrap();
        conn
    }

    #[test]
    fn a_quiet_wal_is_copied_and_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("routing.db");
        let writer = table(&db);
        let ours = Connection::open(&db).unwrap();
        assert!(wal_len(&db) > 0);
        assert_eq!(
            checkpoint(&ours, &db, Duration::from_secs(2)),
            Checkpoint::Folded
        );
        assert_eq!(wal_len(&db), 0);
        // Nothing lost: the row is in the main file, and writing goes on.
        writer.execute("INSERT INTO t VALUES (2)", []).unwrap();
        let n: i64 = ours
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }

    /// A reader inside a transaction still reads the WAL: the frames it
    /// may need are not truncated away; once it ends, they are.
    #[test]
    fn a_wal_a_reader_still_uses_is_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("routing.db");
        let writer = table(&db);
        let reader = Connection::open(&db).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        writer.execute("INSERT INTO t VALUES (2)", []).unwrap();
        let ours = Connection::open(&db).unwrap();
        assert_eq!(
            checkpoint(&ours, &db, Duration::from_secs(2)),
            Checkpoint::Partial
        );
        assert!(wal_len(&db) > 0);
        reader.execute_batch("COMMIT").unwrap();
        assert_eq!(
            checkpoint(&ours, &db, Duration::from_secs(2)),
            Checkpoint::Folded
        );
        assert_eq!(wal_len(&db), 0);
    }
}
