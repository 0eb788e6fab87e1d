//! Config watching through the real binary: with `[config_watch]` (or the
//! original's `EDGEPROXY_CONFIG_WATCH_*` variables) a saved config file is
//! applied as SIGHUP applies it, an invalid one is refused and the running
//! configuration kept, and with watching off nothing happens until SIGHUP.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;

/// The config file: watching per `watch`, the given listeners.
fn text(db: &Path, watch: &str, listeners: &[&str]) -> String {
    let listeners: String = listeners
        .iter()
        .map(|n| format!("[[listener]]\nname = \"{n}\"\naddr = \"127.0.0.1:0\"\n"))
        .collect();
    config(db, &format!("{watch}\n{listeners}"))
}

const WATCH: &str = "[config_watch]\nenabled = true\ninterval_secs = 1\n";

struct Setup {
    dir: TempDir,
    db: Db,
    _backend: TagBackend,
    proxy: Proxy,
}

impl Setup {
    fn start(tag: &str, watch: &str, env: &[(&str, &str)]) -> Setup {
        let dir = TempDir::new(tag);
        let backend = TagBackend::start("x");
        let db = Db::create(dir.join("routing.db"));
        db.upsert(&Row::new("x", "web", "sa", backend.port()));
        let path = dir.join("edgeproxy.toml");
        std::fs::write(&path, text(&db.path, watch, &["a"])).unwrap();
        let proxy = Proxy::start(&["--config", path.to_str().unwrap()], env);
        Setup {
            dir,
            db,
            _backend: backend,
            proxy,
        }
    }

    /// Saves the file as editors that write a new file and rename it do.
    fn save(&self, contents: &str) {
        let tmp = self.dir.join("edgeproxy.toml.tmp");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, self.dir.join("edgeproxy.toml")).unwrap();
    }

    /// Waits for listener `name` to start after `mark`; its address.
    fn listening(&self, mark: usize, name: &str) -> SocketAddr {
        let needle = format!("listener={name}");
        let line = self
            .proxy
            .wait_for_log_where(
                mark,
                |l| l.contains(" listening ") && l.contains(&needle),
                PATIENCE,
            )
            .unwrap_or_else(|| {
                panic!(
                    "listener {name} did not start; log:\n{}",
                    self.proxy.log_text()
                )
            });
        field(&line, "addr").unwrap().parse().unwrap()
    }
}

#[test]
fn a_saved_config_file_is_applied_like_sighup() {
    let s = Setup::start("watch-apply", WATCH, &[]);
    let a = s.proxy.listener("a");
    assert!(s
        .proxy
        .wait_for_log("watching the config file", PATIENCE)
        .is_some());

    // Written in place.
    let mark = s.proxy.log_mark();
    std::fs::write(
        s.dir.join("edgeproxy.toml"),
        text(&s.db.path, WATCH, &["a", "b"]),
    )
    .unwrap();
    s.proxy
        .wait_for_log_after(
            mark,
            "config file changed: re-reading configuration",
            PATIENCE,
        )
        .unwrap_or_else(|| panic!("change not noticed; log:\n{}", s.proxy.log_text()));
    let b = s.listening(mark, "b");
    assert_eq!(which_backend(b), "x");
    assert_eq!(which_backend(a), "x");
    // The routing table is re-read as on SIGHUP.
    assert!(s
        .proxy
        .wait_for_log_after(mark, "routing table reloaded", PATIENCE)
        .is_some());

    // A new file renamed over the old one (most editors, config managers).
    let mark = s.proxy.log_mark();
    s.save(&text(&s.db.path, WATCH, &["b", "c"]));
    let c = s.listening(mark, "c");
    assert!(s
        .proxy
        .wait_for_log_after(mark, "listener stopped", PATIENCE)
        .is_some_and(|l| l.contains("listener=a")));
    assert_eq!(which_backend(c), "x");
    // The shards close the socket just after that line (a command each);
    // a client that connects in between is reset, not served.
    assert!(
        eventually(PATIENCE, || probe(a, Duration::from_millis(200))
            == Probe::Refused),
        "listener a still accepts"
    );
    // Applied once: no second reload for the same version of the file.
    let settled = s.proxy.log_mark();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        s.proxy
            .log_lines_after(settled, "config file changed")
            .is_empty(),
        "the same file was applied again"
    );
}

#[test]
fn an_invalid_file_is_refused_and_the_running_config_kept() {
    let s = Setup::start("watch-invalid", WATCH, &[]);
    let a = s.proxy.listener("a");
    for bad in [
        // Not TOML.
        "[[listener\nname = ".to_string(),
        // TOML, but a bad value.
        text(&s.db.path, WATCH, &["a", "b"])
            .replace("reload_interval_ms = 100", "reload_interval_ms = 0"),
    ] {
        let mark = s.proxy.log_mark();
        s.save(&bad);
        let line = s
            .proxy
            .wait_for_log_after(
                mark,
                "new configuration rejected; keeping the running one",
                PATIENCE,
            )
            .unwrap_or_else(|| panic!("bad file not refused; log:\n{}", s.proxy.log_text()));
        assert!(
            line.contains("edgeproxy.toml") || line.contains("reload_interval_ms"),
            "{line}"
        );
        assert_eq!(which_backend(a), "x", "the running listener stopped");
        assert!(s.proxy.log_lines_after(mark, "listener=b").is_empty());
    }
    // Fixed: applied.
    let mark = s.proxy.log_mark();
    s.save(&text(&s.db.path, WATCH, &["a", "b"]));
    let b = s.listening(mark, "b");
    assert_eq!(which_backend(b), "x");
}

#[test]
fn the_originals_variables_turn_watching_on_and_off() {
    // The file says off, the environment says on, every second.
    let s = Setup::start(
        "watch-env-on",
        "[config_watch]\nenabled = false\n",
        &[
            ("EDGEPROXY_CONFIG_WATCH_ENABLED", "true"),
            ("EDGEPROXY_CONFIG_WATCH_INTERVAL_SECS", "1"),
        ],
    );
    let mark = s.proxy.log_mark();
    s.save(&text(
        &s.db.path,
        "[config_watch]\nenabled = false\n",
        &["a", "b"],
    ));
    s.listening(mark, "b");

    // The file says on, the environment says off: nothing is applied in
    // three intervals; SIGHUP still applies the same file.
    let s = Setup::start(
        "watch-env-off",
        WATCH,
        &[("EDGEPROXY_CONFIG_WATCH_ENABLED", "false")],
    );
    assert!(s
        .proxy
        .log_lines_after(0, "watching the config file")
        .is_empty());
    let mark = s.proxy.log_mark();
    s.save(&text(&s.db.path, WATCH, &["a", "b"]));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        s.proxy.log_lines_after(mark, "listener=b").is_empty(),
        "applied without watching"
    );
    s.proxy.signal(SIGHUP);
    s.listening(mark, "b");
}
