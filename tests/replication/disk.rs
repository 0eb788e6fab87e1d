//! A POP whose disk fills up, or turns read-only, under a running cluster.

use std::time::Duration;

use super::{Cluster, PATIENCE, SERIAL};
use crate::common;

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
