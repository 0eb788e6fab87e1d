//! What a reload does with a bad routing database, through the real binary:
//! a corrupt or missing file keeps the last good table (one error per
//! outage) until a good file is back; bad rows are skipped by id while the
//! rest route; the `sqlite3` CLI's edits are picked up.
//!
//! Clients come from 127.0.0.1 (no country): backends in region `sa`, the
//! POP's region, beat those in region `far`. Affinity is off.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const ERROR: &str = "cannot read routing database; keeping the last good routing table";
const STILL: &str = "routing database still unreadable";
const RECOVERED: &str = "routing database readable again";
const RELOADED: &str = "routing table reloaded";

fn start(dir: &TempDir, db: &Path) -> Proxy {
    let path = dir.join("edgeproxy.toml");
    // No affinity: each connection shows where the current table sends it.
    let extra = "[pop]\nregion = \"sa\"\n\n[affinity]\nttl_secs = 0\n";
    std::fs::write(&path, config(db, extra)).unwrap();
    // Debug for the reloader: its "still unreadable" lines show the ticks
    // that did not log an error.
    Proxy::start(
        &["--config", path.to_str().unwrap()],
        &[("RUST_LOG", "info,control::routing=debug")],
    )
}

/// A complete routing.db written elsewhere and moved into place, as an
/// operator would (`mv new.db routing.db`).
fn replace_db(dir: &TempDir, db: &Path, rows: &[Row]) {
    let tmp = dir.join("replacement.db");
    let _ = std::fs::remove_file(&tmp);
    {
        let new = Db::create(tmp.clone());
        for r in rows {
            new.upsert(r);
        }
    }
    std::fs::rename(&tmp, db).unwrap();
}

/// Waits for `count` more ticks' worth of "still unreadable" lines, then
/// checks that the outage logged exactly one error.
fn one_error_per_outage(proxy: &Proxy, mark: usize) {
    assert!(
        proxy.wait_for_log_count_after(mark, STILL, 5, PATIENCE),
        "the reloader stopped ticking; log:\n{}",
        proxy.log_text()
    );
    let errors = proxy.log_lines_after(mark, ERROR);
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

#[test]
fn corrupt_or_missing_database_keeps_the_last_good_table_until_it_is_back() {
    let dir = TempDir::new("reload-corrupt");
    let a = TagBackend::start("a");
    let b = TagBackend::start("b");
    let c = TagBackend::start("c");
    let db_path = dir.join("routing.db");
    {
        let db = Db::create(db_path.clone());
        db.upsert(&Row::new("a", "web", "far", a.port()));
    }
    let proxy = start(&dir, &db_path);
    assert_eq!(which_backend(proxy.addr()), "a");

    // Garbage over the file, in place.
    let mark = proxy.log_mark();
    let garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 131 % 251) as u8).collect();
    std::fs::write(&db_path, &garbage).unwrap();
    let error = proxy
        .wait_for_log_after(mark, ERROR, PATIENCE)
        .unwrap_or_else(|| {
            panic!(
                "no error for a corrupt database; log:\n{}",
                proxy.log_text()
            )
        });
    assert!(
        error.contains("routing.db"),
        "the error names the file: {error}"
    );
    one_error_per_outage(&proxy, mark);
    assert!(
        proxy.log_lines_after(mark, RELOADED).is_empty(),
        "published from garbage"
    );
    for _ in 0..5 {
        assert_eq!(
            which_backend(proxy.addr()),
            "a",
            "routing with the last good table"
        );
    }

    // A good database moved into place: recovered, and its table is used.
    let mark = proxy.log_mark();
    replace_db(
        &dir,
        &db_path,
        &[
            Row::new("a", "web", "far", a.port()),
            Row::new("b", "web", "sa", b.port()),
        ],
    );
    proxy
        .wait_for_log_after(mark, RECOVERED, PATIENCE)
        .unwrap_or_else(|| panic!("no recovery; log:\n{}", proxy.log_text()));
    let line = proxy.wait_for_log_after(mark, RELOADED, PATIENCE).unwrap();
    assert_eq!(field(&line, "backends").as_deref(), Some("2"), "{line}");
    assert_eq!(which_backend(proxy.addr()), "b");
    assert!(proxy.log_lines_after(mark, ERROR).is_empty());

    // The file disappears: same story, and it is not recreated empty.
    let mark = proxy.log_mark();
    std::fs::remove_file(&db_path).unwrap();
    proxy
        .wait_for_log_after(mark, ERROR, PATIENCE)
        .unwrap_or_else(|| {
            panic!(
                "no error for a missing database; log:\n{}",
                proxy.log_text()
            )
        });
    one_error_per_outage(&proxy, mark);
    assert!(
        !db_path.exists(),
        "the proxy recreated the routing database"
    );
    assert_eq!(which_backend(proxy.addr()), "b");

    let mark = proxy.log_mark();
    replace_db(&dir, &db_path, &[Row::new("c", "web", "sa", c.port())]);
    proxy.wait_for_log_after(mark, RECOVERED, PATIENCE).unwrap();
    let line = proxy.wait_for_log_after(mark, RELOADED, PATIENCE).unwrap();
    assert_eq!(field(&line, "backends").as_deref(), Some("1"), "{line}");
    assert_eq!(which_backend(proxy.addr()), "c");

    // And the recovered file is followed as usual.
    let mark = proxy.log_mark();
    Db::open(db_path.clone()).exec(&format!(
        "BEGIN;
         INSERT INTO backends (id, app, region, wg_ip, port) VALUES ('b', 'web', 'sa', '127.0.0.1', {});
         UPDATE backends SET healthy = 0 WHERE id = 'c';
         COMMIT;",
        b.port()
    ));
    let line = proxy.wait_for_log_after(mark, RELOADED, PATIENCE).unwrap();
    assert_eq!(field(&line, "backends").as_deref(), Some("2"), "{line}");
    assert_eq!(which_backend(proxy.addr()), "b");
    assert!(proxy.log_lines_after(mark, ERROR).is_empty());
}

#[test]
fn bad_rows_are_skipped_by_id_and_the_others_route() {
    let dir = TempDir::new("reload-badrows");
    let a = TagBackend::start("a");
    let b = TagBackend::start("b");
    let db_path = dir.join("routing.db");
    let db = Db::create(db_path.clone());
    db.upsert(&Row::new("good-far", "web", "far", a.port()));
    let proxy = start(&dir, &db_path);
    assert_eq!(which_backend(proxy.addr()), "a");

    let mark = proxy.log_mark();
    let cols = "id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted";
    db.exec(&format!(
        "BEGIN;
         INSERT INTO backends ({cols}) VALUES ('bad-ip', 'web', 'sa', 'not-an-ip', {p}, 1, 1, 100, 150, 0);
         INSERT INTO backends ({cols}) VALUES ('port-zero', 'web', 'sa', '127.0.0.1', 0, 1, 1, 100, 150, 0);
         INSERT INTO backends ({cols}) VALUES ('big-port', 'web', 'sa', '127.0.0.1', 70000, 1, 1, 100, 150, 0);
         INSERT INTO backends ({cols}) VALUES ('negative-limit', 'web', 'sa', '127.0.0.1', {p}, 1, 1, -5, 150, 0);
         INSERT INTO backends ({cols}) VALUES ('text-port', 'web', 'sa', '127.0.0.1', 'abc', 1, 1, 100, 150, 0);
         INSERT INTO backends ({cols}) VALUES ('good-sa', 'web', 'sa', '127.0.0.1', {q}, 1, 1, 100, 150, 0);
         COMMIT;",
        p = a.port(),
        q = b.port(),
    ));
    let line = proxy
        .wait_for_log_after(mark, RELOADED, PATIENCE)
        .unwrap_or_else(|| panic!("no reload; log:\n{}", proxy.log_text()));
    assert_eq!(field(&line, "backends").as_deref(), Some("2"), "{line}");

    // Each bad row is named, with its reason; the warnings come before the
    // reload line.
    let warned = |id: &str| -> String {
        proxy
            .log_lines_after(mark, "skipping")
            .into_iter()
            .find(|l| field(l, "backend").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no warning naming {id}; log:\n{}", proxy.log_text()))
    };
    for (id, reason) in [
        ("bad-ip", "not-an-ip"),
        ("port-zero", "port 0"),
        ("big-port", "port 70000"),
        ("negative-limit", "soft_limit"),
        ("text-port", "port"),
    ] {
        let line = warned(id);
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(reason), "{id}: {line}");
    }
    let skipped = proxy.log_lines_after(mark, "skipping");
    assert_eq!(skipped.len(), 5, "{skipped:#?}");
    assert!(!skipped.iter().any(|l| l.contains("good")), "{skipped:#?}");

    // The good rows route.
    assert_eq!(which_backend(proxy.addr()), "b");
    let mark = proxy.log_mark();
    db.exec("UPDATE backends SET healthy = 0 WHERE id = 'good-sa'");
    proxy.wait_for_log_after(mark, RELOADED, PATIENCE).unwrap();
    assert_eq!(which_backend(proxy.addr()), "a");

    // Fixing a row brings it in.
    let mark = proxy.log_mark();
    db.exec(&format!(
        "UPDATE backends SET wg_ip = '127.0.0.1', port = {} WHERE id = 'bad-ip'",
        b.port()
    ));
    let line = proxy.wait_for_log_after(mark, RELOADED, PATIENCE).unwrap();
    assert_eq!(field(&line, "backends").as_deref(), Some("3"), "{line}");
    assert_eq!(which_backend(proxy.addr()), "b", "bad-ip, fixed, routes");
}

/// A row whose values cannot be read (text where a number belongs, a NULL
/// id) is said once while it lasts, as an invalid row is, not again at
/// every reload that a change to another row causes (QA: each heartbeat or
/// edit elsewhere in the table repeated every such row's warning).
#[test]
fn unreadable_rows_are_said_once_not_at_every_reload() {
    const UNREADABLE: &str = "skipping unreadable routing row";
    let dir = TempDir::new("reload-unreadable");
    let a = TagBackend::start("a");
    let db_path = dir.join("routing.db");
    let db = Db::create(db_path.clone());
    db.upsert(&Row::new("good", "web", "sa", a.port()));
    let proxy = start(&dir, &db_path);

    let mark = proxy.log_mark();
    let cols = "id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted";
    db.exec(&format!(
        "INSERT INTO backends ({cols}) VALUES ('text-port', 'web', 'sa', '127.0.0.1', 'abc', 1, 1, 100, 150, 0)"
    ));
    proxy.wait_for_log_after(mark, RELOADED, PATIENCE).unwrap();
    let said = proxy.log_lines_after(mark, UNREADABLE);
    assert_eq!(said.len(), 1, "{said:#?}");
    assert_eq!(field(&said[0], "backend").as_deref(), Some("text-port"));

    // Changes to another row reload the table; the bad row is unchanged.
    let mark = proxy.log_mark();
    for weight in 2..=4 {
        let before = proxy.log_lines_after(mark, RELOADED).len();
        db.exec(&format!(
            "UPDATE backends SET weight = {weight} WHERE id = 'good'"
        ));
        assert!(
            proxy.wait_for_log_count_after(mark, RELOADED, before + 1, PATIENCE),
            "no reload; log:\n{}",
            proxy.log_text()
        );
    }
    assert_eq!(
        proxy.log_lines_after(mark, UNREADABLE),
        Vec::<String>::new(),
        "said again at unrelated reloads"
    );

    // Broken another way, it is said again; fixed, it routes.
    let mark = proxy.log_mark();
    db.exec("UPDATE backends SET port = 'xyz' WHERE id = 'text-port'");
    proxy.wait_for_log_after(mark, RELOADED, PATIENCE).unwrap();
    let said = proxy.log_lines_after(mark, UNREADABLE);
    assert_eq!(said.len(), 1, "{said:#?}");
    assert!(said[0].contains(r#""xyz""#), "{}", said[0]);
    let mark = proxy.log_mark();
    db.exec(&format!(
        "UPDATE backends SET port = {} WHERE id = 'text-port'",
        a.port()
    ));
    let line = proxy.wait_for_log_after(mark, RELOADED, PATIENCE).unwrap();
    assert_eq!(field(&line, "backends").as_deref(), Some("2"), "{line}");
}

/// A weight or soft limit of 0 (the API refuses both; a row written by hand
/// may hold them) routes as 1, as in the original edgeProxy, and a load
/// says so once per row and value, naming the row and what 0 does here,
/// when the last load did not; `check-config` lists them too.
#[test]
fn zero_weight_and_soft_limit_rows_route_as_one_with_a_warning() {
    const NOTE: &str = "routing row has a 0 that is read as 1";
    let dir = TempDir::new("reload-zero");
    let a = TagBackend::start("a");
    let b = TagBackend::start("b");
    let db_path = dir.join("routing.db");
    let db = Db::create(db_path.clone());
    let mut zero_weight = Row::new("zero-weight", "web", "sa", a.port());
    zero_weight.weight = 0;
    db.upsert(&zero_weight);
    db.upsert(&Row::new("far", "web", "far", b.port()));
    let proxy = start(&dir, &db_path);
    let line = proxy
        .wait_for_log(NOTE, PATIENCE)
        .unwrap_or_else(|| panic!("no warning; log:\n{}", proxy.log_text()));
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(
        field(&line, "backend").as_deref(),
        Some("zero-weight"),
        "{line}"
    );
    assert_eq!(field(&line, "field").as_deref(), Some("weight"), "{line}");
    assert!(line.contains("takes new connections"), "{line}");
    // Routed, as a weight-1 backend in the closer tier.
    assert_eq!(which_backend(proxy.addr()), "a");

    let mark = proxy.log_mark();
    db.exec("UPDATE backends SET weight = 1, soft_limit = 0 WHERE id = 'zero-weight'");
    proxy.wait_for_log_after(mark, RELOADED, PATIENCE).unwrap();
    let notes = proxy.log_lines_after(mark, NOTE);
    assert_eq!(notes.len(), 1, "one warning per row and load: {notes:#?}");
    assert_eq!(field(&notes[0], "field").as_deref(), Some("soft_limit"));
    assert!(notes[0].contains("first connection"), "{}", notes[0]);
    assert_eq!(which_backend(proxy.addr()), "a");

    // A change to another row reloads the table: the row's 0 was said
    // already and is not said again at every reload.
    let mark = proxy.log_mark();
    db.exec("UPDATE backends SET weight = 2 WHERE id = 'far'");
    proxy.wait_for_log_after(mark, RELOADED, PATIENCE).unwrap();
    assert_eq!(
        proxy.log_lines_after(mark, NOTE),
        Vec::<String>::new(),
        "said again at an unrelated reload"
    );

    let (status, _, stderr) = run_to_end(
        &[
            "check-config",
            "--no-bind",
            "--config",
            dir.join("edgeproxy.toml").to_str().unwrap(),
        ],
        &[],
    );
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("edgeproxy: warning: routing row zero-weight: soft_limit 0 is read as 1"),
        "{stderr}"
    );
}

/// Runs `sql` through the `sqlite3` command-line shell.
fn sqlite3(db: &Path, sql: &str) {
    let out = Command::new("sqlite3")
        .arg("-bail")
        .arg("-cmd")
        .arg(".timeout 5000")
        .arg(db)
        .arg(sql)
        .output()
        .expect(
            "the sqlite3 command-line shell is required by this test \
             (Debian/Ubuntu: apt-get install sqlite3; .ci/run installs it)",
        );
    assert!(
        out.status.success(),
        "sqlite3 {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn edits_made_with_the_sqlite3_cli_are_picked_up() {
    let dir = TempDir::new("reload-cli");
    let a = TagBackend::start("a");
    let b = TagBackend::start("b");
    let db_path = dir.join("routing.db");
    {
        let db = Db::create(db_path.clone());
        db.upsert(&Row::new("a", "web", "far", a.port()));
    }
    let proxy = start(&dir, &db_path);
    assert_eq!(which_backend(proxy.addr()), "a");

    let steps = [
        (
            format!(
                "INSERT INTO backends (id, app, region, wg_ip, port, healthy, weight, soft_limit, hard_limit) \
                 VALUES ('b', 'web', 'sa', '127.0.0.1', {}, 1, 1, 100, 150);",
                b.port()
            ),
            "2",
            "b",
        ),
        ("UPDATE backends SET healthy = 0 WHERE id = 'b';".to_string(), "2", "a"),
        ("UPDATE backends SET deleted = 1 WHERE id = 'a'; UPDATE backends SET healthy = 1;".to_string(), "1", "b"),
        ("DELETE FROM backends WHERE id = 'b'; UPDATE backends SET deleted = 0;".to_string(), "1", "a"),
    ];
    for (sql, count, expect) in steps {
        let mark = proxy.log_mark();
        // The shell's statements each commit on their own: wait for the
        // reload that shows the last one.
        sqlite3(&db_path, &format!("BEGIN; {sql} COMMIT;"));
        let line = proxy
            .wait_for_log_after(mark, RELOADED, PATIENCE)
            .unwrap_or_else(|| panic!("no reload after {sql}; log:\n{}", proxy.log_text()));
        assert_eq!(
            field(&line, "backends").as_deref(),
            Some(count),
            "{sql}: {line}"
        );
        assert_eq!(which_backend(proxy.addr()), expect, "after {sql}");
    }
}
