//! Hot reload under load, through the real binary.
//!
//! A hundred client connections stream a deterministic pseudo-random byte
//! stream each through the proxy to echo backends, and check every echoed
//! byte, while another SQLite connection changes the routing table sixty
//! times (adds, soft and hard deletes, health flips, weight changes), some of
//! them on the very backends the streams are using. No stream may fail or
//! lose a byte. After every change the test waits for the proxy's
//! `routing table reloaded` line and checks that new connections go where the
//! new table says.
//!
//! Layout (clients come from 127.0.0.1: no country, no region, so the
//! selection tiers are "local POP" for region `sa`, "fallback" otherwise;
//! affinity is off so that every connection is a fresh pick):
//! - `s1`, `s2`: region `far` (fallback tier). The streams are spread over
//!   them. With 50 streams each, the one with weight 4 scores 50/100/4 and
//!   wins over the one with weight 1 (50/100/1): the test moves new
//!   connections between them by swapping weights.
//! - `p0`..`p5`: region `sa` (local POP tier), added one at a time: while one
//!   is in the table and healthy it gets every new connection.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::streams::{finish, progress, stalled_since, start_stream, Stream};
use common::*;

const STREAMS: usize = 100;
const ITERATIONS: usize = 6;
/// How long a reload may take after a change is committed. The interval is
/// 100 ms; the bound is generous because a debug build on a loaded 2-core
/// machine is slow, and this is not a benchmark.
const RELOAD_BOUND: Duration = Duration::from_secs(2);

/// The routing table as the test last wrote it, to predict `backends=N`.
struct Table {
    db: Db,
    live_rows: usize,
}

struct Run<'a> {
    proxy: &'a Proxy,
    table: Table,
    changes: usize,
    slowest: Duration,
}

impl Run<'_> {
    /// Applies `sql` (which leaves `live_rows` non-deleted rows), waits for
    /// the reload, then checks that new connections reach `expect`.
    fn change(&mut self, what: &str, sql: &str, live_rows: usize, expect: &str) {
        let mark = self.proxy.log_mark();
        // One transaction, so one commit for the proxy to notice.
        self.table
            .db
            .exec(&format!("BEGIN IMMEDIATE; {sql}; COMMIT;"));
        // From the commit's return: its own fsync is this writer's disk, not
        // the proxy (one took 3.3 s beside busy loops, `strace -T` on this
        // thread), and the proxy no longer holds writers back
        // (`a_write_is_not_held_behind_the_proxy_s_wal_checkpoint`).
        let t0 = Instant::now();
        let line = self
            .proxy
            .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
            .unwrap_or_else(|| panic!("{what}: no reload; log:\n{}", self.proxy.log_text()));
        let took = t0.elapsed();
        assert!(
            took <= RELOAD_BOUND,
            "{what}: reload came {took:?} after the change (interval 100 ms)"
        );
        self.slowest = self.slowest.max(took);
        self.changes += 1;
        self.table.live_rows = live_rows;
        assert_eq!(
            field(&line, "backends").as_deref(),
            Some(live_rows.to_string().as_str()),
            "{what}: {line}"
        );
        // Two connections held together: the second sees the first's load,
        // and still goes to the same place.
        let addr = self.proxy.addr();
        let (first, _a) = connect_tagged(addr);
        let (second, _b) = connect_tagged(addr);
        assert_eq!(
            (first.as_str(), second.as_str()),
            (expect, expect),
            "{what}: new connections went to the wrong backend"
        );
    }
}

fn row(id: &str, region: &str, port: u16, weight: i64) -> String {
    format!(
        "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
         VALUES ('{id}', 'web', '{region}', '127.0.0.1', {port}, 1, {weight}, 100, 0, 0)"
    )
}

#[test]
fn routing_changes_under_streaming_load_lose_nothing_and_apply_at_once() {
    let dir = TempDir::new("hot-reload");
    let s1 = TagBackend::start("s1");
    let s2 = TagBackend::start("s2");
    let probes: Vec<TagBackend> = (0..ITERATIONS)
        .map(|i| TagBackend::start(&format!("p{i}")))
        .collect();
    let db = Db::create(dir.join("routing.db"));
    db.exec(&row("s1", "far", s1.port(), 1));
    db.exec(&row("s2", "far", s2.port(), 1));
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &db.path,
            "[pop]\nregion = \"sa\"\n\n[affinity]\nttl_secs = 0\n",
        ),
    );
    let addr = proxy.addr();

    // The streams: equal weights, so they alternate between s1 and s2.
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<Stream> = (0..STREAMS)
        .map(|i| start_stream(addr, 1000 + i as u64, &stop))
        .collect();
    let on_s1 = streams.iter().filter(|s| s.backend == "s1").count();
    let on_s2 = streams.iter().filter(|s| s.backend == "s2").count();
    assert_eq!(on_s1 + on_s2, STREAMS);
    assert!(
        on_s1 >= 40 && on_s2 >= 40,
        "streams not spread: s1={on_s1} s2={on_s2}"
    );

    // Data is flowing on every stream before the first change.
    assert_eq!(
        stalled_since(&streams, &vec![0; streams.len()]),
        0,
        "some streams never got an echo"
    );

    let mut run = Run {
        proxy: &proxy,
        table: Table { db, live_rows: 2 },
        changes: 0,
        slowest: Duration::ZERO,
    };
    let (mut best, mut other) = ("s2", "s1");
    let sql_weights = |best: &str, other: &str| {
        format!(
            "UPDATE backends SET weight = 4 WHERE id = '{best}'; UPDATE backends SET weight = 1 WHERE id = '{other}';"
        )
    };
    run.change("s2 weight 4", &sql_weights(best, other), 2, best);

    for (i, p) in probes.iter().enumerate() {
        let id = p.name.as_str();
        let n = run.table.live_rows;
        run.change(&format!("add {id}"), &row(id, "sa", p.port(), 1), n + 1, id);
        run.change(
            &format!("{id} unhealthy"),
            &format!("UPDATE backends SET healthy = 0 WHERE id = '{id}'"),
            n + 1,
            best,
        );
        run.change(
            &format!("{id} healthy"),
            &format!("UPDATE backends SET healthy = 1 WHERE id = '{id}'"),
            n + 1,
            id,
        );
        run.change(
            &format!("{id} deleted=1"),
            &format!("UPDATE backends SET deleted = 1 WHERE id = '{id}'"),
            n,
            best,
        );
        std::mem::swap(&mut best, &mut other);
        run.change(
            &format!("weights: {best} 4, {other} 1"),
            &sql_weights(best, other),
            n,
            best,
        );
        // The backend half of the streams use goes unhealthy: they go on.
        run.change(
            &format!("{best} unhealthy"),
            &format!("UPDATE backends SET healthy = 0 WHERE id = '{best}'"),
            n,
            other,
        );
        run.change(
            &format!("{best} healthy"),
            &format!("UPDATE backends SET healthy = 1 WHERE id = '{best}'"),
            n,
            best,
        );
        run.change(
            &format!("{id} deleted=0"),
            &format!("UPDATE backends SET deleted = 0 WHERE id = '{id}'"),
            n + 1,
            id,
        );
        run.change(
            &format!("DELETE {id}"),
            &format!("DELETE FROM backends WHERE id = '{id}'"),
            n,
            best,
        );
        if i % 2 == 1 {
            // The row of a backend with open streams disappears, and comes
            // back.
            let port = if best == "s1" { s1.port() } else { s2.port() };
            run.change(
                &format!("DELETE {best}"),
                &format!("DELETE FROM backends WHERE id = '{best}'"),
                n - 1,
                other,
            );
            run.change(
                &format!("re-add {best}"),
                &row(best, "far", port, 4),
                n,
                best,
            );
        }
    }
    assert!(run.changes >= 50, "only {} changes", run.changes);
    eprintln!(
        "{} routing changes under {STREAMS} streams; slowest reload {:?}",
        run.changes, run.slowest
    );

    // Every stream is still moving after the last change.
    let stalled = stalled_since(&streams, &progress(&streams));
    assert_eq!(stalled, 0, "{stalled} streams stalled");

    // Stop writing; every stream must end cleanly with every byte echoed.
    stop.store(true, Ordering::Relaxed);
    match finish(streams) {
        Ok(total) => eprintln!("{total} bytes echoed and verified"),
        Err(failures) => panic!(
            "{} streams failed:\n{}",
            failures.len(),
            failures.join("\n")
        ),
    }
}

/// QA (beside busy loops): one `fsync` inside the proxy's WAL checkpoint
/// took 3.7 s, and a write begun meanwhile waited for it, because
/// `wal_checkpoint(TRUNCATE)` holds SQLite's writer lock while it copies and
/// syncs. Here that sync is held until the test lets it go: a write with no
/// busy timeout at all must go through meanwhile, and the checkpoint must
/// still fold the WAL away once the sync returns.
#[test]
fn a_write_is_not_held_behind_the_proxy_s_wal_checkpoint() {
    let dir = TempDir::new("hot-reload-fsync");
    let backend = TagBackend::start("a");
    let db = Db::create(dir.join("routing.db"));
    db.exec(&row("a", "sa", backend.port(), 1));
    let fault = common::hold_fsync::HoldFsync::build(dir.path());
    let config_path = dir.join("edgeproxy.toml");
    std::fs::write(&config_path, config(&db.path, "[pop]\nregion = \"sa\"\n")).unwrap();
    let proxy = Proxy::start(&["--config", config_path.to_str().unwrap()], &fault.env());

    // A commit the proxy reloads, which leaves frames in the WAL: a second
    // of quiet later the proxy folds them into the main file, and its sync
    // of `routing.db` is held.
    fault.arm();
    let mark = proxy.log_mark();
    db.exec("UPDATE backends SET weight = 2 WHERE id = 'a'");
    proxy
        .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
        .expect("the first change was not reloaded");
    assert!(
        fault.wait_holding(PATIENCE),
        "the proxy never synced routing.db (no WAL checkpoint); log:\n{}",
        proxy.log_text()
    );

    // Another writer, which gives up at once if the database is locked.
    let writer = rusqlite::Connection::open(&db.path).unwrap();
    writer.busy_timeout(Duration::ZERO).unwrap();
    let mark = proxy.log_mark();
    writer
        .execute_batch("BEGIN IMMEDIATE; UPDATE backends SET weight = 3 WHERE id = 'a'; COMMIT;")
        .expect("a write waited for the proxy's checkpoint");

    fault.release();
    proxy
        .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
        .expect("the write made during the checkpoint was not reloaded");
    let wal = dir.join("routing.db-wal");
    assert!(
        common::eventually(PATIENCE, || std::fs::metadata(&wal)
            .map_or(true, |m| m.len() == 0)),
        "the WAL was never folded into the main file"
    );
}
