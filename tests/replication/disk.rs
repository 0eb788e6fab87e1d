//! A POP whose disk fills up, or turns read-only, under a running cluster.

use std::time::Duration;

use super::{Cluster, PATIENCE, SERIAL};
use crate::common;

fn ids_at(c: &Cluster, i: usize) -> Vec<String> {
    let (status, list) = c.api(i, "GET", "/api/v1/backends", None);
    assert_eq!(status, 200, "{list}");
    list["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

fn versioned_hlc(c: &Cluster, i: usize, id: &str) -> Option<i64> {
    let conn = rusqlite::Connection::open(c.db_path(i)).ok()?;
    conn.query_row(
        "SELECT hlc FROM repl_versions WHERE tbl = 'backends' AND pk = ?1",
        [id],
        |r| r.get(0),
    )
    .ok()
}

/// POP 0's `routing.db` on a 4 MiB disk, in a cluster of `n`, all joined.
fn cluster_with_pop_0_on_a_small_disk(n: usize) -> Cluster {
    let mut c = Cluster::hosts(n, None, |_| String::new());
    c.put_on_small_disk(0, "4m");
    for i in 0..n {
        c.launch(i);
    }
    c.wait_joined();
    // Every POP's own row written and replicated (held back a few seconds
    // at start): nothing else moves while a test counts.
    let named = |o: usize, m: usize| c.member(o, m).is_some_and(|v| v["name"].is_string());
    assert!(
        common::eventually(PATIENCE, || (0..n)
            .all(|o| (0..n).filter(|&m| m != o).all(|m| named(o, m)))),
        "the pops rows did not replicate: {}",
        c.cluster_status(0)
    );
    c
}

/// A registration committed at a POP whose disk filled up before
/// replication recorded its version: every failed attempt to record it
/// (20 a second) gave it a new version, a registration being versioned
/// even when it repeats its row, and broadcast it; every other POP wrote
/// each one and reloaded its routing table 20 times a second for as long
/// as the disk stayed full. (The registration is made with the store's own
/// statements through a second connection, which then holds the write
/// lock until the disk is full: the API's own write and replication's
/// would race for the last free bytes.)
#[test]
fn a_registration_a_full_pop_cannot_version_is_not_broadcast_again_and_again() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster_with_pop_0_on_a_small_disk(2);
    assert_eq!(c.register(0, "b1", "10.77.0.1:9500".parse().unwrap()), 201);
    assert!(common::eventually(PATIENCE, || c
        .row(1, "b1", "deleted")
        .as_deref()
        == Some("0")));
    let conn = rusqlite::Connection::open(c.db_path(0)).unwrap();
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         UPDATE backends SET weight = 3 WHERE id = 'b1';
         INSERT INTO repl_write_kinds (tbl, pk, deliberate) VALUES ('backends', 'b1', 1)
             ON CONFLICT (tbl, pk) DO UPDATE SET deliberate = 1;
         COMMIT;
         BEGIN IMMEDIATE;",
    )
    .unwrap();
    let unread: i64 = conn
        .query_row("SELECT COUNT(*) FROM repl_changes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(unread, 1, "replication read the change before the lock");
    let (mark0, mark1) = (c.pop(0).log_mark(), c.pop(1).log_mark());
    let applied = || c.metric(1, "edgeproxy_replication_rows_applied_total");
    let applied_before = applied();
    let filler = c.disk(0).fill();
    conn.execute_batch("ROLLBACK").unwrap();
    drop(conn);
    c.pop(0)
        .wait_for_log_after(mark0, "cannot read the change log", PATIENCE)
        .expect("replication never failed to record the change: the disk is not full");
    // Polled every 50 ms: some 40 attempts.
    std::thread::sleep(Duration::from_secs(2));
    let versions = applied() - applied_before;
    let reloads = c.pop(1).log_lines_after(mark1, "routing table reloaded");
    assert!(
        versions <= 1.0,
        "POP 1 applied {versions} versions of one registration and reloaded {} times",
        reloads.len()
    );
    filler.free();
    assert!(
        common::eventually(PATIENCE, || c.row(1, "b1", "weight").as_deref()
            == Some("3")),
        "the registration never reached POP 1"
    );
}

/// A full disk made the routing table reload about every second, with an
/// INFO line each time (more log on a full disk), though nothing changed:
/// the store folds the WAL into the main file once the table is quiet, the
/// checkpoint wrote part of the main file before it failed for want of
/// room, and the store took its own write for a change.
#[test]
fn a_full_disk_does_not_reload_an_unchanged_table_every_second() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster_with_pop_0_on_a_small_disk(2);
    // Rows in POP 0's WAL, not yet folded into the main file (that waits
    // for a quiet second), which has to grow to take them.
    for n in 0..40 {
        let id = format!("b{n}-{}", "x".repeat(50));
        assert_eq!(c.register(1, &id, "10.77.0.1:9500".parse().unwrap()), 201);
    }
    assert!(common::eventually(PATIENCE, || ids_at(&c, 0).len() == 40));
    let _filler = c.disk(0).fill();
    std::thread::sleep(Duration::from_secs(2));
    let mark = c.pop(0).log_mark();
    std::thread::sleep(Duration::from_secs(5));
    let reloads = c.pop(0).log_lines_after(mark, "routing table reloaded");
    assert!(reloads.len() <= 1, "{reloads:#?}");
    // Still routing every row.
    assert_eq!(ids_at(&c, 0).len(), 40);
}
