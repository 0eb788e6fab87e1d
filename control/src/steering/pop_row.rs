//! This POP's own state in its row of the replicated `pops` table:
//! `draining` (the operator's drain, which outlives a restart) and
//! `serving` (its own verdict, false while it shuts down). Written here and
//! nowhere else; replication's change capture sends every write to the
//! other POPs, whose GeoDNS reads it.
//!
//! A connection of its own to `routing.db`: these writes are rare (a drain,
//! a verdict that changes) and never wait on the routing store's reloads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::store::PopRow;

#[derive(Debug, thiserror::Error)]
#[error("cannot write this POP's row of the pops table in {}: {cause}", .path.display())]
pub struct PopRowError {
    path: PathBuf,
    cause: rusqlite::Error,
}

pub struct PopRowWriter {
    conn: Connection,
    path: PathBuf,
    node_id: String,
}

/// The state columns as last read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PopState {
    pub draining: bool,
    pub serving: bool,
}

/// How long a write waits for another connection's lock once started.
pub const BUSY_WAIT: Duration = Duration::from_millis(100);

impl PopRowWriter {
    /// Opens `routing.db` (created and migrated already by the routing
    /// store) and makes sure this POP has a row (see
    /// [`PopRowWriter::ensure`]). Returns the state found.
    ///
    /// `await_cluster` (replication runs, see `crate::own_row_gate`):
    /// nothing is written, and the state found, if any, is returned as it
    /// is. The file may be older than the cluster's copy of this row (a
    /// new POP, `routing.db` wiped or restored from a backup), and
    /// replication writes the row once the cluster's copy could arrive,
    /// with the operator's drain in it; until then the caller must neither
    /// write it nor announce (QA: a drained POP restarted with its database
    /// wiped, or from a copy older than the drain, wrote its row,
    /// `draining = 0`, newer than the cluster's drained copy, and came back
    /// undrained everywhere).
    pub fn open(
        path: &Path,
        identity: &PopRow,
        await_cluster: bool,
    ) -> Result<(PopRowWriter, Option<PopState>), PopRowError> {
        let err = |cause| PopRowError {
            path: path.to_path_buf(),
            cause,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let writer = PopRowWriter {
            conn,
            path: path.to_path_buf(),
            node_id: identity.node_id.clone(),
        };
        let found = match await_cluster {
            true => writer.read(),
            false => writer.ensure(identity).map(Some),
        };
        match found {
            Ok(found) => Ok((writer, found)),
            // The disk refuses writes (full at start: SQLite cannot even
            // read without creating the `-shm`): the row as it is in the
            // file, the operator's drain with it. The routing store says
            // so and reads it the same way; writes are tried again by the
            // controller, and go through once there is room.
            Err(e) if crate::store::disk_refuses_writes(path, &e.cause) => {
                let Some(as_is) = crate::store::open_as_is(path) else {
                    return Err(e);
                };
                let found = read_state(&as_is, &writer.node_id).map_err(err)?;
                tracing::warn!(error = %e,
                    "pop: cannot write this POP's row at start, the disk refuses writes to routing.db; its state read as it is in the file");
                Ok((writer, found))
            }
            Err(e) => Err(e),
        }
    }

    /// From now on a write waits at most [`BUSY_WAIT`] for another
    /// connection's lock (at start, five seconds). The writer runs on the
    /// control runtime's one thread: QA, while an operator's `sqlite3` held
    /// a write transaction open, every attempt blocked that thread for
    /// five seconds, API, replication and BGP sessions included.
    pub fn wait_briefly_for_locks(&self) -> Result<(), PopRowError> {
        self.conn.busy_timeout(BUSY_WAIT).map_err(|e| self.err(e))
    }

    /// Makes sure this POP has a row: `identity` is inserted when there is
    /// none, and its identity columns (name, region, country, public
    /// addresses) are brought up to the configuration's when they differ;
    /// the state columns are kept. Returns the state found.
    ///
    /// QA: the row was only ever inserted, so without replication (which
    /// rewrites these columns itself) a POP restarted with new `[pop]
    /// public_addrs` kept answering GeoDNS with the addresses of its first
    /// start (none, when they were added later: NODATA for good).
    ///
    /// An UPDATE, then an INSERT if there was no row, not one UPSERT: the
    /// UPSERT's conflict policy overrides replication's change-capture
    /// trigger's, which then fails on its log's UNIQUE key (QA: with
    /// replication's triggers in the file, a POP restarted with a new
    /// `[pop] country` could not start: "UNIQUE constraint failed:
    /// repl_changes.tbl, repl_changes.pk"; see `ReplDb::upsert_pop`).
    pub fn ensure(&self, identity: &PopRow) -> Result<PopState, PopRowError> {
        let values = params![
            identity.node_id,
            identity.name,
            identity.region,
            identity.country,
            identity.public_addrs,
            identity.serving
        ];
        let (identity_values, _) = values.split_at(5);
        self.conn
            .execute(
                "UPDATE pops SET name = ?2, region = ?3, country = ?4, public_addrs = ?5 \
                 WHERE node_id = ?1 AND (name IS NOT ?2 OR region IS NOT ?3 \
                 OR country IS NOT ?4 OR public_addrs IS NOT ?5)",
                identity_values,
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "INSERT INTO pops (node_id, name, region, country, public_addrs, draining, serving) \
                 SELECT ?1, ?2, ?3, ?4, ?5, 0, ?6 \
                 WHERE NOT EXISTS (SELECT 1 FROM pops WHERE node_id = ?1)",
                values,
            )
            .map_err(|e| self.err(e))?;
        Ok(self.read()?.unwrap_or(PopState {
            draining: false,
            serving: identity.serving,
        }))
    }

    fn err(&self, cause: rusqlite::Error) -> PopRowError {
        PopRowError {
            path: self.path.clone(),
            cause,
        }
    }

    pub fn read(&self) -> Result<Option<PopState>, PopRowError> {
        read_state(&self.conn, &self.node_id).map_err(|e| self.err(e))
    }

    /// Writes the state when it differs from the row's (a write that
    /// changes nothing would still replicate). True when it wrote.
    pub fn write(&self, state: PopState) -> Result<bool, PopRowError> {
        let n = self
            .conn
            .execute(
                "UPDATE pops SET draining = ?2, serving = ?3 WHERE node_id = ?1 \
                 AND (draining IS NOT ?2 OR serving IS NOT ?3)",
                params![self.node_id, state.draining, state.serving],
            )
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }
}

/// The state columns of `node_id`'s row, if it has one.
fn read_state(conn: &Connection, node_id: &str) -> rusqlite::Result<Option<PopState>> {
    conn.query_row(
        "SELECT draining, serving FROM pops WHERE node_id = ?1",
        [node_id],
        |r| {
            Ok(PopState {
                draining: r.get::<_, Option<bool>>(0)?.unwrap_or(false),
                serving: r.get::<_, Option<bool>>(1)?.unwrap_or(true),
            })
        },
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RoutingStore;

    fn identity() -> PopRow {
        PopRow {
            node_id: "gru-1".into(),
            name: "pop-gru".into(),
            region: "sa".into(),
            country: Some("BR".into()),
            public_addrs: "203.0.113.10".into(),
            serving: false,
            ..PopRow::default()
        }
    }

    #[test]
    fn the_row_is_created_once_and_its_state_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        let (w, state) = PopRowWriter::open(&path, &identity(), false).unwrap();
        assert_eq!(
            state,
            Some(PopState {
                draining: false,
                serving: false
            })
        );
        let drained = PopState {
            draining: true,
            serving: true,
        };
        assert!(w.write(drained).unwrap());
        assert!(!w.write(drained).unwrap(), "no change, no write");
        let rows = store.load_pops().unwrap();
        assert_eq!(
            (rows[0].name.as_str(), rows[0].draining, rows[0].serving),
            ("pop-gru", true, true)
        );
        drop(w);
        // A restart finds the drain.
        let (_, state) = PopRowWriter::open(&path, &identity(), false).unwrap();
        assert_eq!(state, Some(drained));
    }

    #[test]
    fn a_restart_with_a_new_identity_rewrites_it_and_keeps_the_drain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        let first = PopRow {
            country: None,
            public_addrs: String::new(),
            ..identity()
        };
        let (w, _) = PopRowWriter::open(&path, &first, false).unwrap();
        let drained = PopState {
            draining: true,
            serving: true,
        };
        w.write(drained).unwrap();
        drop(w);
        // The operator adds public addresses and a country, moves the POP
        // to another region, and restarts.
        let moved = PopRow {
            region: "eu".into(),
            ..identity()
        };
        let (_, state) = PopRowWriter::open(&path, &moved, false).unwrap();
        assert_eq!(state, Some(drained), "the drain outlives the restart");
        let rows = store.load_pops().unwrap();
        assert_eq!(
            (
                rows[0].region.as_str(),
                rows[0].country.as_deref(),
                rows[0].public_addrs.as_str(),
                rows[0].draining
            ),
            ("eu", Some("BR"), "203.0.113.10", true)
        );
    }

    /// QA: with replication's change-capture triggers in the file, a new
    /// identity failed to write ("UNIQUE constraint failed:
    /// repl_changes.tbl, repl_changes.pk") and the POP could not start.
    #[test]
    fn a_new_identity_is_written_under_replications_change_capture() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        let _replication = crate::replication::db::ReplDb::open(&path).unwrap();
        let (w, _) = PopRowWriter::open(&path, &identity(), false).unwrap();
        drop(w);
        let moved = PopRow {
            country: Some("PT".into()),
            ..identity()
        };
        let (_, state) = PopRowWriter::open(&path, &moved, false).unwrap();
        assert!(state.is_some());
        assert_eq!(store.load_pops().unwrap()[0].country.as_deref(), Some("PT"));
        let logged: i64 = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM repl_changes WHERE tbl = 'pops'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(logged > 0, "the change was not captured");
    }

    /// With replication, the file may be older than the cluster's copy of
    /// this POP's row: nothing is written, a row found is returned as is.
    #[test]
    fn awaiting_the_cluster_an_old_row_is_read_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        let (w, _) = PopRowWriter::open(&path, &identity(), false).unwrap();
        drop(w);
        let moved = PopRow {
            region: "eu".into(),
            ..identity()
        };
        let (_, state) = PopRowWriter::open(&path, &moved, true).unwrap();
        assert_eq!(
            state,
            Some(PopState {
                draining: false,
                serving: false
            })
        );
        assert_eq!(store.load_pops().unwrap()[0].region, "sa", "rewritten");
    }

    /// With replication, a missing row is the cluster's to bring back:
    /// nothing is written until it is there (or the POP gives up waiting).
    #[test]
    fn a_wiped_database_gets_no_row_of_this_pops_making_while_replication_brings_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut store = RoutingStore::open(&path).unwrap();
        let (w, state) = PopRowWriter::open(&path, &identity(), true).unwrap();
        assert_eq!(state, None);
        assert!(store.load_pops().unwrap().is_empty(), "nothing written");
        // The cluster's copy arrives (replication writes it), drained.
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO pops (node_id, name, region, draining) VALUES ('gru-1', 'old', 'sa', 1)",
                [],
            )
            .unwrap();
        assert_eq!(
            w.read().unwrap(),
            Some(PopState {
                draining: true,
                serving: true
            })
        );
        // Given up on it instead: the configuration's identity, kept drain.
        let state = w.ensure(&identity()).unwrap();
        assert!(state.draining);
        assert_eq!(store.load_pops().unwrap()[0].name, "pop-gru");
    }
}
