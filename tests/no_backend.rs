//! Traffic never disappears silently (through the real binary): a listener
//! whose app has no eligible backend is named at WARN, with the reason, at
//! start, after SIGHUP and after every reload; connections it refuses are
//! summed up in a rate-limited WARN; a dead backend is logged once when it
//! starts failing, not once per connection; `check-config` warns too; and
//! `routing.db_path` mistakes are errors, not a silently created empty table.

mod common;

use std::time::Duration;

use common::*;

const NO_BACKEND: &str = "listener has no eligible backend";

fn line_for<'a>(lines: &'a [String], listener: &str) -> Option<&'a String> {
    lines
        .iter()
        .find(|l| field(l, "listener").as_deref() == Some(listener))
}

#[test]
fn a_listener_without_backends_is_named_at_start_sighup_and_reload() {
    let dir = TempDir::new("nb-warn");
    let backend = TagBackend::start("w1");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("w1", "web", "sa", backend.port()));
    let path = dir.join("edgeproxy.toml");
    let listeners = |extra: &str| {
        format!(
            "[[listener]]\nname = \"good\"\naddr = \"127.0.0.1:0\"\napp = \"web\"\n\
             [[listener]]\nname = \"typo\"\naddr = \"127.0.0.1:0\"\napp = \"wbe\"\n{extra}"
        )
    };
    std::fs::write(&path, config(&db.path, &listeners(""))).unwrap();
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], &[]);

    // At start: the typo, with its app and why; the good listener is quiet.
    let warned = proxy.log_lines_after(0, NO_BACKEND);
    let typo = line_for(&warned, "typo").unwrap_or_else(|| panic!("{}", proxy.log_text()));
    assert!(typo.contains("WARN"), "{typo}");
    assert_eq!(field(typo, "app").as_deref(), Some("wbe"));
    assert!(typo.contains("no backend registered"), "{typo}");
    assert!(line_for(&warned, "good").is_none(), "{warned:?}");
    assert_eq!(which_backend(proxy.listener("good")), "w1");

    // Every reload: the only web backend goes unhealthy.
    let mark = proxy.log_mark();
    db.exec("UPDATE backends SET healthy = 0 WHERE id = 'w1'");
    let line = proxy
        .wait_for_log_where(
            mark,
            |l| l.contains(NO_BACKEND) && field(l, "listener").as_deref() == Some("good"),
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("no warning after the reload:\n{}", proxy.log_text()));
    assert!(line.contains("its only backend is unhealthy"), "{line}");
    assert_eq!(field(&line, "checked_at").as_deref(), Some("reload"));

    // A reload that changes nothing for "good" does not say it again (QA:
    // in a cluster every replicated change reloads); the typo listener
    // gets a backend, which is said once.
    let mark = proxy.log_mark();
    db.upsert(&Row::new("t1", "wbe", "sa", backend.port()));
    proxy
        .wait_for_log_where(
            mark,
            |l| {
                l.contains("listener has an eligible backend again")
                    && field(l, "listener").as_deref() == Some("typo")
            },
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("the closed gap was not said:\n{}", proxy.log_text()));
    assert!(
        proxy.log_lines_after(mark, NO_BACKEND).is_empty(),
        "{:#?}",
        proxy.log_lines_after(mark, NO_BACKEND)
    );

    // Draining is named as such.
    let mark = proxy.log_mark();
    db.exec("UPDATE backends SET healthy = 1, draining = 1 WHERE id = 'w1'");
    let line = proxy
        .wait_for_log_where(
            mark,
            |l| l.contains(NO_BACKEND) && field(l, "listener").as_deref() == Some("good"),
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("no warning for draining:\n{}", proxy.log_text()));
    assert!(line.contains("its only backend is draining"), "{line}");

    // SIGHUP: a new listener for an app nobody serves is named.
    let mark = proxy.log_mark();
    std::fs::write(
        &path,
        config(
            &db.path,
            &listeners("[[listener]]\nname = \"added\"\naddr = \"127.0.0.1:0\"\napp = \"ghost\"\n"),
        ),
    )
    .unwrap();
    proxy.signal(SIGHUP);
    let line = proxy
        .wait_for_log_where(
            mark,
            |l| l.contains(NO_BACKEND) && field(l, "listener").as_deref() == Some("added"),
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("no warning after SIGHUP:\n{}", proxy.log_text()));
    assert_eq!(field(&line, "app").as_deref(), Some("ghost"));
}

/// Refused connections are summed up once per `summary_interval_secs` with
/// the reason, instead of one debug line each.
#[test]
fn refused_connections_are_reported_in_a_rate_limited_warning() {
    let dir = TempDir::new("nb-refused");
    let db = Db::create(dir.join("routing.db"));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db.path,
            "[log]\nsummary_interval_secs = 1\n\
             [[listener]]\nname = \"empty\"\naddr = \"127.0.0.1:0\"\napp = \"web\"\n",
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], &[]);
    let mark = proxy.log_mark();
    for _ in 0..5 {
        assert_eq!(
            probe(proxy.listener("empty"), PATIENCE),
            Probe::ClosedWithoutData
        );
    }
    let refused = "connections refused for want of a backend";
    let line = proxy
        .wait_for_log_after(mark, refused, PATIENCE)
        .unwrap_or_else(|| panic!("no refusal warning:\n{}", proxy.log_text()));
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(field(&line, "listener").as_deref(), Some("empty"));
    assert_eq!(field(&line, "app").as_deref(), Some("web"));
    assert!(line.contains("no backend registered"), "{line}");
    // Five refusals, counted in one or two lines (an interval may end
    // between them), never one line per connection.
    assert!(eventually(PATIENCE, || {
        let total: u64 = proxy
            .log_lines_after(mark, refused)
            .iter()
            .filter_map(|l| field(l, "refused")?.parse::<u64>().ok())
            .sum();
        total == 5
    }));
    assert!(proxy.log_lines_after(mark, refused).len() <= 2);
    // Nothing refused since: no more lines.
    let quiet = proxy.log_mark();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        proxy.log_lines_after(quiet, refused).is_empty(),
        "{}",
        proxy.log_text()
    );
}

/// With several listeners, each refusal line gives that listener's reason
/// as things stand: one whose only backend filled up after the last reload
/// says it is at its hard limit, one whose backend is dead says its connects
/// failed. (Both said "its backends were eligible, but every one tried
/// failed to connect": the reasons were the last reload's.)
#[test]
fn each_listeners_refusals_are_reported_with_its_own_reason() {
    let dir = TempDir::new("nb-reasons");
    let db = Db::create(dir.join("routing.db"));
    let busy = TagBackend::start("busy");
    let dead = RefusingPort::new();
    db.upsert(&Row {
        soft_limit: 1,
        hard_limit: 1,
        ..Row::new("busy", "web", "sa", busy.port())
    });
    db.upsert(&Row::new("dead", "api", "sa", dead.port()));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db.path,
            "[log]\nsummary_interval_secs = 1\n[limits]\nconnect_attempts = 1\n\
             [[listener]]\nname = \"full\"\naddr = \"127.0.0.1:0\"\napp = \"web\"\n\
             [[listener]]\nname = \"down\"\naddr = \"127.0.0.1:0\"\napp = \"api\"\n",
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], &[]);
    // The only web backend takes its one connection: no reload sees it.
    let (name, _held) = connect_tagged(proxy.listener("full"));
    assert_eq!(name, "busy");
    let mark = proxy.log_mark();
    for listener in ["full", "down"] {
        assert_eq!(
            probe(proxy.listener(listener), PATIENCE),
            Probe::ClosedWithoutData,
            "{listener}"
        );
    }
    let refused = "connections refused for want of a backend";
    // `reason` is the line's last field, spaces and all.
    let line_of = |listener: &str| {
        assert!(
            eventually(PATIENCE, || line_for(
                &proxy.log_lines_after(mark, refused),
                listener
            )
            .is_some()),
            "no refusal line for {listener}:\n{}",
            proxy.log_text()
        );
        let lines = proxy.log_lines_after(mark, refused);
        line_for(&lines, listener).unwrap().trim_end().to_string()
    };
    let full = line_of("full");
    assert!(
        full.ends_with(" reason=its only backend is at the hard limit"),
        "{full}"
    );
    let down = line_of("down");
    assert!(
        down.ends_with(" reason=every backend tried failed to connect"),
        "{down}"
    );
}

/// A dead backend is logged once when it starts failing and once when it
/// connects again, whatever the number of connections that tried it; the
/// running count comes in a rate-limited summary.
#[test]
fn a_dead_backend_is_logged_once_per_state_change() {
    let dir = TempDir::new("nb-dead");
    let mut refusing = RefusingPort::new();
    let db = Db::create(dir.join("routing.db"));
    // The only backend, so every client tries it (a failing backend goes
    // behind working ones, `engine/src/backoff.rs`, but is still tried when
    // it is all there is).
    db.upsert(&Row::new("dead", "web", "sa", refusing.port()));
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db.path,
            "[log]\nsummary_interval_secs = 1\n[affinity]\nttl_secs = 0\n",
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], &[]);
    for n in 0..30 {
        assert_eq!(
            probe(proxy.addr(), PATIENCE),
            Probe::ClosedWithoutData,
            "client {n}"
        );
    }
    let marked = "marked failing until a connect succeeds";
    assert_eq!(
        proxy.log_lines_after(0, marked).len(),
        1,
        "one line for 30 failures:\n{}",
        proxy.log_text()
    );
    assert_eq!(proxy.log_lines_after(0, "backend connect failed").len(), 1);
    let summary = proxy
        .wait_for_log("backend connect failures", PATIENCE)
        .unwrap_or_else(|| panic!("no summary:\n{}", proxy.log_text()));
    assert!(summary.contains("dead: "), "{summary}");
    assert!(summary.contains("(failing)"), "{summary}");
    assert!(eventually(PATIENCE, || {
        let total: u64 = proxy
            .log_lines_after(0, "backend connect failures")
            .iter()
            .filter_map(|l| field(l, "failures")?.parse::<u64>().ok())
            .sum();
        total == 30
    }));

    // It comes back: one line saying so.
    let _revived = refusing.revive();
    let mark = proxy.log_mark();
    // The revived port accepts but never greets; the connection is proxied.
    let _ = probe(proxy.addr(), Duration::from_millis(200));
    proxy
        .wait_for_log_after(mark, "backend connects again", PATIENCE)
        .unwrap_or_else(|| panic!("no recovery line:\n{}", proxy.log_text()));
}

#[test]
fn check_config_warns_about_listeners_without_backends_and_writes_nothing() {
    let dir = TempDir::new("nb-check");
    let db = Db::create(dir.join("routing.db"));
    db.upsert(&Row::new("w1", "web", "sa", 9));
    let mut down = Row::new("a1", "api", "sa", 9);
    down.healthy = false;
    db.upsert(&down);
    drop(db);
    let before = std::fs::read(dir.join("routing.db")).unwrap();
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &dir.join("routing.db"),
            "[[listener]]\nname = \"web\"\naddr = \"127.0.0.1:0\"\napp = \"web\"\n\
             [[listener]]\nname = \"typo\"\naddr = \"127.0.0.1:0\"\napp = \"wbe\"\n\
             [[listener]]\nname = \"api\"\naddr = \"127.0.0.1:0\"\napp = \"api\"\n",
        ),
    )
    .unwrap();
    let (status, stdout, stderr) =
        run_to_end(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("[pop]"),
        "the effective config is still printed"
    );
    let warnings: Vec<&str> = stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings
            .iter()
            .all(|w| w.starts_with("edgeproxy: warning: ")),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "listener \"typo\" (app \"wbe\") has no eligible backend: no backend registered"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "listener \"api\" (app \"api\") has no eligible backend: its only backend is unhealthy"
        ),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(dir.join("routing.db")).unwrap(),
        before,
        "routing.db untouched"
    );

    // A table that does not exist yet: said, and not created.
    let missing = dir.join("nothing-here.db");
    let (status, _, stderr) = run_to_end(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("EDGEPROXY_DB_PATH", missing.to_str().unwrap())],
    );
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "routing store {} does not exist",
            missing.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("\"web\" (app \"web\") has no eligible backend: no backend registered"));
    assert!(!missing.exists(), "check-config created the routing store");
}

#[test]
fn a_routing_db_path_in_a_missing_directory_is_an_error() {
    let dir = TempDir::new("nb-nodir");
    let db = dir.join("no-such-dir").join("routing.db");
    let env = [
        ("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0"),
        ("EDGEPROXY_DB_PATH", db.to_str().unwrap()),
    ];
    for args in [&["check-config"][..], &["run"][..]] {
        let mut proxy = Proxy::spawn(args, &env);
        let status = proxy
            .wait_exit(PATIENCE)
            .unwrap_or_else(|| panic!("{args:?} started:\n{}", proxy.log_text()));
        assert!(!status.success(), "{args:?}");
        let line = proxy
            .wait_for_log("edgeproxy: error", PATIENCE)
            .unwrap_or_else(|| panic!("{}", proxy.log_text()));
        assert!(
            line.contains(&format!(
                "directory {} does not exist",
                dir.join("no-such-dir").display()
            )),
            "{line}"
        );
    }
    assert!(!dir.join("no-such-dir").exists());
}

#[test]
fn a_routing_db_path_where_no_file_can_be_made_is_an_error_with_the_reason() {
    // sysfs refuses new files even to root.
    let env = [
        ("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0"),
        ("EDGEPROXY_DB_PATH", "/sys/edgeproxy-test-routing.db"),
    ];
    let mut proxy = Proxy::spawn(&[], &env);
    let status = proxy
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("started:\n{}", proxy.log_text()));
    assert!(!status.success());
    let line = proxy
        .wait_for_log("edgeproxy: error", PATIENCE)
        .unwrap_or_else(|| panic!("{}", proxy.log_text()));
    assert!(
        line.contains("cannot create routing store /sys/edgeproxy-test-routing.db")
            && line.contains("ermission denied"),
        "{line}"
    );
}

/// A new, empty routing table is never created silently: WARN, with the
/// absolute path (a relative path resolves against the working directory
/// here: no config file).
#[test]
fn creating_an_empty_routing_table_is_a_warning_with_its_absolute_path() {
    let dir = TempDir::new("nb-create");
    let mut cmd_env = vec![("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0")];
    cmd_env.push(("EDGEPROXY_DB_PATH", "fresh.db"));
    let proxy = Proxy::spawn_in(dir.path(), &[], &cmd_env).ready();
    let line = proxy
        .wait_for_log("routing store did not exist", PATIENCE)
        .unwrap_or_else(|| panic!("{}", proxy.log_text()));
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(
        field(&line, "path").as_deref(),
        Some(dir.join("fresh.db").to_str().unwrap()),
        "{line}"
    );
    assert!(dir.join("fresh.db").exists());
    // An empty table: the default listener (every app) is named too.
    assert!(
        proxy.log_text().contains(NO_BACKEND),
        "{}",
        proxy.log_text()
    );
}
