//! Drop-in compatibility with the original edgeProxy: no config file, only its
//! environment variables, and a `routing.db` made with its schema and plain
//! SQL.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use common::{connect_tagged, dead_port, Proxy, TagBackend, TempDir, PATIENCE, SIGTERM};

/// The original's own `create_routing_db.sql` table: every column nullable,
/// `deleted` defaulting to 0 (as in control/src/store.rs).
const ORIGINAL_DDL: &str = "CREATE TABLE backends (
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

const ORIGINAL_COLUMNS: [&str; 10] = [
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

/// Every row, original columns only, as text, in rowid order.
fn dump(path: &std::path::Path) -> Vec<Vec<String>> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let sql = format!(
        "SELECT {} FROM backends ORDER BY rowid",
        ORIGINAL_COLUMNS
            .iter()
            .map(|c| format!("quote({c})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut stmt = conn.prepare(&sql).unwrap();
    let rows = stmt
        .query_map([], |r| {
            (0..ORIGINAL_COLUMNS.len())
                .map(|i| r.get::<_, String>(i))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// (name, declared type) of every column of `backends`.
fn columns(path: &std::path::Path) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn.prepare("PRAGMA table_info(backends)").unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(1)?, r.get(2)?))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// The original's environment, for a listener on a free loopback port.
struct OriginalEnv {
    listen: String,
    db: String,
}

impl OriginalEnv {
    fn new(db: &std::path::Path) -> OriginalEnv {
        OriginalEnv {
            listen: format!("127.0.0.1:{}", dead_port()),
            db: db.to_str().unwrap().to_string(),
        }
    }

    fn vars(&self) -> Vec<(&str, &str)> {
        vec![
            ("EDGEPROXY_LISTEN_ADDR", self.listen.as_str()),
            ("EDGEPROXY_DB_PATH", self.db.as_str()),
            ("EDGEPROXY_REGION", "eu"),
            ("EDGEPROXY_DB_RELOAD_SECS", "1"),
            // No affinity: each connection is a fresh pick, so the test can
            // tell what the routing table says.
            ("EDGEPROXY_BINDING_TTL_SECS", "0"),
            ("EDGEPROXY_BINDING_GC_INTERVAL_SECS", "1"),
            ("DEBUG", "1"),
        ]
    }

    fn addr(&self) -> SocketAddr {
        self.listen.parse().unwrap()
    }
}

fn stop(mut proxy: Proxy) {
    proxy.signal(SIGTERM);
    let status = proxy.wait_exit(PATIENCE).expect("proxy did not stop");
    assert!(status.success(), "exit {status}:\n{}", proxy.log_text());
}

#[test]
fn env_only_start_on_an_original_database() {
    let dir = TempDir::new("compat");
    let a = TagBackend::start("a");
    let b = TagBackend::start("b");
    let deleted = TagBackend::start("deleted");
    let sick = TagBackend::start("sick");
    let late = TagBackend::start("late");
    let db = dir.join("routing.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(common::ORIGINAL_SCHEMA_NO_COUNTRY)
            .unwrap();
        // Table order matters on ties: the rows that must never be picked
        // come first, in the POP's region.
        conn.execute_batch(&format!(
            "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
               VALUES ('eu-deleted', 'web', 'eu', '127.0.0.1', {}, 1, 1, 100, 150, 1);
             INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
               VALUES ('eu-sick', 'web', 'eu', '127.0.0.1', {}, 0, 1, 100, 150, 0);
             INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
               VALUES ('sa-a', 'web', 'sa', '127.0.0.1', {}, 1, 2, 100, 150, 0);
             INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
               VALUES ('eu-b', 'web', 'eu', '127.0.0.1', {}, 1, 1, 10, 1, 0);",
            deleted.port(),
            sick.port(),
            a.port(),
            b.port()
        ))
        .unwrap();
    }
    let before = dump(&db);
    assert_eq!(before.len(), 4);

    let env = OriginalEnv::new(&db);
    let proxy = Proxy::start_with_rust_log(&[], &env.vars(), None);
    assert_eq!(proxy.addr(), env.addr(), "EDGEPROXY_LISTEN_ADDR not used");

    // EDGEPROXY_REGION=eu: the eu backend is the local POP's and wins.
    let mark = proxy.log_mark();
    let (first, mut held) = connect_tagged(env.addr());
    assert_eq!(first, "b");
    // eu-b has hard_limit 1 and is now full: the next client goes to sa-a.
    let (second, mut other) = connect_tagged(env.addr());
    assert_eq!(second, "a");
    for s in [&mut held, &mut other] {
        s.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }
    assert_eq!(
        deleted
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        sick.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    // DEBUG=1: debug-level lines are logged.
    let line = proxy
        .wait_for_log_after(mark, "proxying", PATIENCE)
        .unwrap_or_else(|| panic!("no debug line with DEBUG=1:\n{}", proxy.log_text()));
    assert!(line.contains("DEBUG"), "{line}");

    // A row added with plain SQL is picked up (EDGEPROXY_DB_RELOAD_SECS).
    let mark = proxy.log_mark();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
               VALUES ('eu-late', 'web', 'eu', '127.0.0.1', {}, 1, 1, 100, 150, 0);",
            late.port()
        ))
        .unwrap();
    }
    proxy
        .wait_for_log_where(
            mark,
            |l| {
                l.contains("routing table reloaded")
                    && common::field(l, "backends").as_deref() == Some("4")
            },
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("new row not loaded:\n{}", proxy.log_text()));
    // eu-b is still full (held), so the new eu backend beats sa-a.
    assert_eq!(connect_tagged(env.addr()).0, "late");

    held.shutdown(Shutdown::Both).unwrap();
    other.shutdown(Shutdown::Both).unwrap();
    stop(proxy);

    // The file keeps every original column and every row as written; the
    // only change is the added, nullable `country`.
    let cols = columns(&db);
    for c in ORIGINAL_COLUMNS {
        assert!(
            cols.iter().any(|(n, _)| n == c),
            "column {c} gone: {cols:?}"
        );
    }
    assert!(cols.iter().any(|(n, _)| n == "country"), "{cols:?}");
    let after = dump(&db);
    assert_eq!(after.len(), 5);
    assert_eq!(after[..4], before[..], "original rows changed");
}

#[test]
fn original_ddl_with_nullable_columns_and_default_deleted() {
    let dir = TempDir::new("compat-ddl");
    let web = TagBackend::start("web-1");
    let db = dir.join("routing.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(ORIGINAL_DDL).unwrap();
        // As the original's tooling writes rows: `deleted` left to its
        // default, one row with an explicit NULL `deleted`.
        conn.execute_batch(&format!(
            "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit)
               VALUES ('eu-1', 'web', 'eu', '127.0.0.1', {}, 1, 1, 100, 150);
             INSERT INTO backends VALUES ('eu-2', 'web', 'eu', '127.0.0.1', {}, 1, 1, 100, 150, NULL);",
            web.port(),
            web.port()
        ))
        .unwrap();
    }
    let before = dump(&db);
    let env = OriginalEnv::new(&db);
    let proxy = Proxy::start_with_rust_log(&[], &env.vars(), None);
    let line = proxy
        .wait_for_log("routing table loaded", PATIENCE)
        .expect("no routing table loaded line");
    assert_eq!(
        common::field(&line, "backends").as_deref(),
        Some("2"),
        "{line}"
    );
    for _ in 0..3 {
        let (name, mut s) = connect_tagged(env.addr());
        assert_eq!(name, "web-1");
        s.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        s.read_exact(&mut got).unwrap();
    }
    stop(proxy);
    let cols = columns(&db);
    for (i, c) in ORIGINAL_COLUMNS.iter().enumerate() {
        // Same columns, same order, same declared types.
        assert_eq!(&cols[i].0, c, "{cols:?}");
    }
    assert_eq!(cols[1].1, "TEXT");
    assert_eq!(cols[4].1, "INTEGER");
    assert_eq!(dump(&db), before);
}

#[test]
fn invalid_rows_are_skipped_with_a_warning_and_good_rows_route() {
    let dir = TempDir::new("compat-bad");
    let good = TagBackend::start("good");
    // A live backend behind a row with a negative limit: if that row were
    // not skipped it would win (it comes first, same tier, no load).
    let negative = TagBackend::start("negative");
    let db = dir.join("routing.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(common::ORIGINAL_SCHEMA_NO_COUNTRY)
            .unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
               VALUES ('neg-limit', 'web', 'eu', '127.0.0.1', {neg}, 1, 1, -5, 150, 0);
             INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
               VALUES ('bad-ip', 'web', 'eu', '300.1.2.3', {good}, 1, 1, 100, 150, 0);
             INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
               VALUES ('port-zero', 'web', 'eu', '127.0.0.1', 0, 1, 1, 100, 150, 0);
             INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
               VALUES ('port-text', 'web', 'eu', '127.0.0.1', 'eighty', 1, 1, 100, 150, 0);
             INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
               VALUES ('good-1', 'web', 'eu', '127.0.0.1', {good}, 1, 1, 100, 150, 0);",
            neg = negative.port(),
            good = good.port(),
        ))
        .unwrap();
    }
    let env = OriginalEnv::new(&db);
    let proxy = Proxy::start(&[], &env.vars());

    for id in ["neg-limit", "bad-ip", "port-zero", "port-text"] {
        let needle = format!("backend={id}");
        let line = proxy
            .log_lines()
            .into_iter()
            .find(|l| l.contains("skipping") && l.contains(&needle))
            .unwrap_or_else(|| panic!("no warning for {id}:\n{}", proxy.log_text()));
        assert!(line.contains("WARN"), "{line}");
    }
    let line = proxy
        .wait_for_log("routing table loaded", PATIENCE)
        .unwrap();
    assert_eq!(
        common::field(&line, "backends").as_deref(),
        Some("1"),
        "{line}"
    );

    for _ in 0..5 {
        assert_eq!(connect_tagged(env.addr()).0, "good");
    }
    assert_eq!(
        negative
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}
