//! The command line and configuration loading, through the real binary:
//! `--help`, `--version`, `check-config`, environment overrides, and the one
//! clear message (and non-zero exit) for each kind of bad configuration.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::{run_to_end, Proxy, TempDir, PATIENCE};

/// The shipped configuration file.
const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/edgeproxy.toml");
/// A valid country database (the one the engine embeds), as a file.
const GEO_DB: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/engine/geoip/dbip-country.mmdb"
);

fn parse(stdout: &str) -> toml::Table {
    stdout
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("check-config output is not TOML ({e}):\n{stdout}"))
}

/// `table.a.b`, for a path of plain keys.
fn get<'a>(table: &'a toml::Table, path: &str) -> &'a toml::Value {
    let mut parts = path.split('.');
    let mut value = table
        .get(parts.next().unwrap())
        .unwrap_or_else(|| panic!("no `{path}` in:\n{table}"));
    for part in parts {
        value = value
            .get(part)
            .unwrap_or_else(|| panic!("no `{path}` in:\n{table}"));
    }
    value
}

fn first_listener(table: &toml::Table) -> &toml::Table {
    get(table, "listener").as_array().expect("listener array")[0]
        .as_table()
        .expect("listener table")
}

/// Writes `text` as a config file in `dir` and returns its path.
fn write_config(dir: &TempDir, text: &str) -> String {
    let path = dir.join("edgeproxy.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Asserts a failed run: non-zero exit, nothing on stdout, and exactly one
/// line on stderr, the error, which contains every one of `needles`. Returns
/// that line.
fn assert_one_error(
    what: &str,
    (status, stdout, stderr): (ExitStatus, String, String),
    needles: &[&str],
) -> String {
    assert!(!status.success(), "{what}: exit {status}, expected failure");
    assert_eq!(stdout.trim(), "", "{what}: unexpected stdout");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one error line, got:\n{stderr}"
    );
    let line = lines[0];
    assert!(line.starts_with("edgeproxy: error:"), "{what}: {line}");
    for needle in needles {
        assert!(
            line.contains(needle),
            "{what}: {needle:?} missing from: {line}"
        );
    }
    line.to_string()
}

/// `run` expected to fail at start: waits (bounded) for the process to exit,
/// so a configuration wrongly accepted fails the test instead of hanging it.
/// Listens on loopback port 0 with a scratch routing.db, should it start.
fn run_expecting_failure(
    what: &str,
    args: &[&str],
    env: &[(&str, &str)],
    needles: &[&str],
) -> String {
    let dir = TempDir::new("run-fail");
    let db = dir.join("routing.db");
    let mut full_env = vec![
        ("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0"),
        ("EDGEPROXY_DB_PATH", db.to_str().unwrap()),
    ];
    full_env.extend_from_slice(env);
    let mut proxy = Proxy::spawn(args, &full_env);
    let status = proxy
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("{what}: proxy started:\n{}", proxy.log_text()));
    // The exit closes the pipes; wait for the reader threads to see the end.
    proxy.wait_for_log("edgeproxy: error", Duration::from_secs(5));
    let log = proxy.log_text();
    assert_one_error(what, (status, String::new(), log), needles)
}

/// `check-config` on `file`, without binding its sockets: these tests are
/// about what is printed, and the shipped file's ports (8080, 9090) may be
/// in use on a shared machine. Binding has tests of its own.
fn check_config(file: &str, env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    run_to_end(&["check-config", "--no-bind", "--config", file], env)
}

#[test]
fn help_explains_commands_and_config_option() {
    let (status, stdout, stderr) = run_to_end(&["--help"], &[]);
    assert!(status.success(), "--help failed: {stderr}");
    for needle in ["run", "check-config", "--config"] {
        assert!(
            stdout.contains(needle),
            "--help lacks {needle:?}:\n{stdout}"
        );
    }
    // Each subcommand comes with an explanation, not just its name.
    let line = |cmd: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(cmd))
            .unwrap_or_else(|| panic!("no line for {cmd} in:\n{stdout}"))
            .to_string()
    };
    assert!(line("run").len() > "run".len() + 10, "{}", line("run"));
    assert!(
        line("check-config").to_lowercase().contains("valid"),
        "{}",
        line("check-config")
    );

    // The subcommand's own help mentions --config as well.
    let (status, stdout, _) = run_to_end(&["check-config", "--help"], &[]);
    assert!(status.success());
    assert!(stdout.contains("--config"), "{stdout}");
}

/// `undrain` takes no `--wait`: it only makes sense for `drain` (waiting
/// for the withdrawal). QA: `undrain --help` offered it, "Wait until the
/// anycast routes are withdrawn", and `undrain --wait` took it and did not
/// wait for anything.
#[test]
fn undrain_offers_no_wait_and_refuses_one() {
    let (status, stdout, _) = run_to_end(&["drain", "--help"], &[]);
    assert!(status.success());
    assert!(stdout.contains("--wait"), "{stdout}");
    let (status, stdout, _) = run_to_end(&["undrain", "--help"], &[]);
    assert!(status.success());
    assert!(!stdout.contains("--wait"), "{stdout}");
    let (status, _, stderr) =
        run_to_end(&["undrain", "--wait", "--api", "http://127.0.0.1:1"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--wait"), "{stderr}");
}

#[test]
fn version_prints_the_package_version() {
    // -V: the one-line version, for scripts.
    let (status, stdout, _) = run_to_end(&["-V"], &[]);
    assert!(status.success());
    assert_eq!(
        stdout.trim(),
        format!("edgeproxy {}", env!("CARGO_PKG_VERSION"))
    );
}

/// `--version` says which commit the binary is built from and what it can
/// do, like `haproxy -vv`: what a bug report or a POP inventory needs.
#[test]
fn long_version_names_the_commit_and_the_features() {
    let (status, stdout, stderr) = run_to_end(&["--version"], &[]);
    assert!(status.success(), "{stderr}");
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some(format!("edgeproxy {}", env!("CARGO_PKG_VERSION")).as_str()),
        "{stdout}"
    );
    // The commit of this source tree (cargo rebuilds when HEAD moves), or
    // `unknown` when it is not a git checkout.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let commit = stdout
        .lines()
        .find_map(|l| l.strip_prefix("commit: "))
        .unwrap_or_else(|| panic!("no commit line:\n{stdout}"));
    assert!(commit.starts_with(&head), "{commit} is not {head}");
    assert!(stdout.contains("\nbuilt: "), "{stdout}");
    for feature in [
        "io_uring",
        "tls",
        "splice",
        "proxy-protocol",
        "sqlite 3.",
        "json",
    ] {
        assert!(stdout.contains(feature), "{feature} missing:\n{stdout}");
    }
}

#[test]
fn shipped_config_checks_and_prints_effective_toml() {
    let (status, stdout, stderr) = check_config(SHIPPED, &[]);
    assert!(status.success(), "check-config failed: {stderr}");
    let t = parse(&stdout);
    assert_eq!(get(&t, "pop.region").as_str(), Some("sa"));
    // Relative to the config file's directory, printed absolute.
    assert_eq!(
        get(&t, "routing.db_path").as_str(),
        Some(concat!(env!("CARGO_MANIFEST_DIR"), "/config/routing.db"))
    );
    assert_eq!(get(&t, "demo.backends").as_integer(), Some(2));
    assert_eq!(get(&t, "log.level").as_str(), Some("info"));
    // `shards = 0` is resolved to a real count.
    assert!(get(&t, "runtime.shards").as_integer().unwrap() >= 1);
    let l = first_listener(&t);
    assert_eq!(l["name"].as_str(), Some("default"));
    assert_eq!(l["addr"].as_str(), Some("127.0.0.1:8080"));
}

#[test]
fn effective_config_uses_the_files_keys_and_reads_back() {
    // What check-config prints is a configuration file: fed back, it is
    // accepted and means the same.
    let (status, first, stderr) = check_config(SHIPPED, &[]);
    assert!(status.success(), "{stderr}");
    let t = parse(&first);
    assert_eq!(
        get(&t, "routing.reload_interval_ms").as_integer(),
        Some(1000)
    );
    assert_eq!(get(&t, "affinity.ttl_secs").as_integer(), Some(600));
    assert_eq!(get(&t, "limits.idle_timeout_secs").as_integer(), Some(300));
    assert_eq!(get(&t, "limits.shutdown_grace_secs").as_integer(), Some(30));

    let dir = TempDir::new("roundtrip");
    let path = write_config(&dir, &first);
    let (status, second, stderr) = check_config(&path, &[]);
    assert!(
        status.success(),
        "printed config rejected: {stderr}\n{first}"
    );
    assert_eq!(first, second);
}

#[test]
fn environment_overrides_show_in_check_config() {
    let env = [
        ("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:7777"),
        ("EDGEPROXY_DB_PATH", "/var/tmp/other-routing.db"),
        ("EDGEPROXY_REGION", "EU"),
        ("EDGEPROXY_DB_RELOAD_SECS", "3"),
        ("EDGEPROXY_BINDING_TTL_SECS", "5"),
        ("EDGEPROXY_BINDING_GC_INTERVAL_SECS", "7"),
        ("EDGEPROXY_GEOIP_PATH", GEO_DB),
        ("DEBUG", "1"),
    ];
    let (status, stdout, stderr) = check_config(SHIPPED, &env);
    assert!(status.success(), "{stderr}");
    let t = parse(&stdout);
    assert_eq!(first_listener(&t)["addr"].as_str(), Some("127.0.0.1:7777"));
    assert_eq!(
        get(&t, "routing.db_path").as_str(),
        Some("/var/tmp/other-routing.db")
    );
    assert_eq!(get(&t, "pop.region").as_str(), Some("eu"));
    assert_eq!(
        get(&t, "routing.reload_interval_ms").as_integer(),
        Some(3000)
    );
    assert_eq!(get(&t, "affinity.ttl_secs").as_integer(), Some(5));
    assert_eq!(get(&t, "affinity.gc_interval_secs").as_integer(), Some(7));
    assert_eq!(get(&t, "geo.db_path").as_str(), Some(GEO_DB));
    assert_eq!(get(&t, "log.level").as_str(), Some("debug"));

    // Without a file, the environment alone is the configuration.
    let (status, stdout, stderr) = run_to_end(&["check-config", "--no-bind"], &env);
    assert!(status.success(), "{stderr}");
    let t = parse(&stdout);
    assert_eq!(first_listener(&t)["addr"].as_str(), Some("127.0.0.1:7777"));
    assert_eq!(get(&t, "pop.region").as_str(), Some("eu"));
    assert_eq!(get(&t, "demo.backends").as_integer(), Some(0));
}

/// A TOML error as the parser lays it out: the error line naming the file,
/// then the offending source line with a caret under the column, on lines of
/// their own. Returns stderr.
fn assert_parse_error(
    what: &str,
    (status, stdout, stderr): (ExitStatus, String, String),
    source_line: &str,
    needles: &[&str],
) -> String {
    assert!(!status.success(), "{what}: exit {status}, expected failure");
    assert_eq!(stdout.trim(), "", "{what}: unexpected stdout");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines[0].starts_with("edgeproxy: error: invalid config file"),
        "{what}:\n{stderr}"
    );
    // The source line is quoted on a line of its own (`N | text`), and the
    // next line points at the column with carets.
    let at = lines
        .iter()
        .position(|l| l.contains(" | ") && l.ends_with(source_line))
        .unwrap_or_else(|| panic!("{what}: source line not quoted:\n{stderr}"));
    let caret = lines.get(at + 1).copied().unwrap_or_default();
    assert!(
        caret.trim_end().ends_with('^'),
        "{what}: no caret:\n{stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{what}: {needle:?} missing:\n{stderr}"
        );
    }
    stderr
}

#[test]
fn unknown_key_is_named() {
    let dir = TempDir::new("unknown");
    let path = write_config(&dir, "[limits]\nmax_conections = 5\n");
    assert_parse_error(
        "unknown key",
        check_config(&path, &[]),
        "max_conections = 5",
        &["max_conections", "unknown field", "line 2"],
    );
}

#[test]
fn wrong_type_is_named() {
    let dir = TempDir::new("type");
    let path = write_config(&dir, "[limits]\nconnect_timeout_ms = \"fast\"\n");
    assert_parse_error(
        "wrong type",
        check_config(&path, &[]),
        "connect_timeout_ms = \"fast\"",
        &["connect_timeout_ms", "invalid type"],
    );
}

/// A syntax error keeps the parser's multi-line diagram (it used to be
/// squashed onto one line with ` | ` separators), for `check-config` and
/// for `run` alike.
#[test]
fn toml_syntax_errors_keep_the_parsers_layout() {
    let dir = TempDir::new("syntax");
    let path = write_config(
        &dir,
        "[pop]\nregion = \"sa\"\n[limits\nmax_connections = 5\n",
    );
    let stderr = assert_parse_error(
        "syntax error",
        check_config(&path, &[]),
        "[limits",
        &["line 3", &path],
    );
    assert!(stderr.lines().count() >= 4, "{stderr}");
    let mut proxy = Proxy::spawn(&["--config", &path], &[]);
    let status = proxy
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("proxy started:\n{}", proxy.log_text()));
    proxy.wait_for_log("edgeproxy: error", Duration::from_secs(5));
    assert_parse_error(
        "run with a syntax error",
        (status, String::new(), proxy.log_text()),
        "[limits",
        &["line 3"],
    );
}

#[test]
fn bad_listener_address_is_named() {
    let dir = TempDir::new("addr");
    let path = write_config(
        &dir,
        "[[listener]]\nname = \"ok\"\naddr = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"bad\"\naddr = \"localhost:http\"\n",
    );
    assert_one_error(
        "bad listener address",
        check_config(&path, &[]),
        &["listener[1].addr", "localhost:http"],
    );
}

/// `listener = []` was taken for "no key" and ran the default listener on
/// 0.0.0.0:8080: the operator who emptied the list got a proxy listening
/// where nothing asked for one.
#[test]
fn an_empty_listener_list_is_an_error_not_the_default() {
    let dir = TempDir::new("no-listeners");
    let path = write_config(&dir, "listener = []\n");
    let needles = ["`listener`", "empty list", "at least one listener"];
    assert_one_error(
        "listener = [] (check-config)",
        check_config(&path, &[]),
        &needles,
    );
    run_expecting_failure("listener = [] (run)", &["--config", &path], &[], &needles);
}

#[test]
fn bad_environment_values_are_named() {
    for (var, value) in [
        ("EDGEPROXY_DB_RELOAD_SECS", "soon"),
        ("EDGEPROXY_LISTEN_ADDR", "nope"),
        ("EDGEPROXY_BINDING_TTL_SECS", "-1"),
        ("DEBUG", "maybe"),
    ] {
        let out = run_to_end(&["check-config"], &[(var, value)]);
        assert_one_error(&format!("{var}={value}"), out, &[var, value]);
        // `run` rejects it the same way, before starting anything.
        run_expecting_failure(
            &format!("run with {var}={value}"),
            &["run"],
            &[(var, value)],
            &[var, value],
        );
    }
}

#[test]
fn missing_config_file_is_named_once() {
    let dir = TempDir::new("missing");
    let path = dir.join("nope.toml");
    let path = path.to_str().unwrap();
    let needles = [path, "No such file or directory"];
    for line in [
        assert_one_error(
            "check-config with missing file",
            run_to_end(&["check-config", "--config", path], &[]),
            &needles,
        ),
        run_expecting_failure(
            "run with missing file",
            &["run", "--config", path],
            &[],
            &needles,
        ),
    ] {
        // The cause is given once, not repeated.
        assert_eq!(
            line.matches("No such file or directory").count(),
            1,
            "{line}"
        );
    }
}

#[test]
fn invalid_geo_db_path_is_named() {
    let dir = TempDir::new("geo");
    let missing = dir.join("missing.mmdb");
    let missing = missing.to_str().unwrap();
    let path = write_config(&dir, &format!("[geo]\ndb_path = {missing:?}\n"));
    let line = assert_one_error(
        "missing geo db",
        check_config(&path, &[]),
        &[missing, "No such file or directory"],
    );
    // Said once ("cannot load GeoIP database X: cannot read GeoIP database
    // X: ..." before).
    assert_eq!(line.matches(missing).count(), 1, "{line}");

    let garbage = dir.join("garbage.mmdb");
    std::fs::write(&garbage, b"this is not a MaxMind database").unwrap();
    let garbage = garbage.to_str().unwrap();
    let path = write_config(&dir, &format!("[geo]\ndb_path = {garbage:?}\n"));
    assert_one_error(
        "garbage geo db",
        check_config(&path, &[]),
        &[garbage, "MaxMind"],
    );

    // Via the environment, and for `run`: it fails before starting.
    let line = run_expecting_failure(
        "run with missing geo db",
        &["run"],
        &[("EDGEPROXY_GEOIP_PATH", missing)],
        &[missing],
    );
    assert_eq!(line.matches(missing).count(), 1, "{line}");
}

/// Polls until nothing accepts on `addr`.
fn refuses(addr: SocketAddr) -> bool {
    common::eventually(Duration::from_secs(2), || {
        matches!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
}

#[test]
fn port_in_use_fails_cleanly_and_nothing_half_starts() {
    let dir = TempDir::new("inuse");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    // The first listener would bind fine; the second cannot.
    let free_addr: SocketAddr = format!("127.0.0.1:{}", common::dead_port())
        .parse()
        .unwrap();
    let db = dir.join("routing.db");
    let text = format!(
        "[routing]\ndb_path = {db:?}\n[runtime]\nshards = 2\n\
         [[listener]]\nname = \"front\"\naddr = \"{free_addr}\"\n\
         [[listener]]\nname = \"busy\"\naddr = \"{taken_addr}\"\n",
        db = db.display().to_string()
    );
    let mut proxy = Proxy::spawn_with_config(&dir, &text);
    let started = Instant::now();
    let status = proxy
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("proxy kept running:\n{}", proxy.log_text()));
    assert!(!status.success(), "exit {status}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let line = proxy
        .wait_for_log("edgeproxy: error", PATIENCE)
        .unwrap_or_else(|| panic!("no error line:\n{}", proxy.log_text()));
    for needle in ["busy", &taken_addr.to_string(), "in use"] {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }
    assert_eq!(line.matches("in use").count(), 1, "cause repeated: {line}");
    let log = proxy.log_text();
    let errors = log
        .lines()
        .filter(|l| l.contains("error") || l.contains("ERROR"))
        .count();
    assert_eq!(errors, 1, "expected one error line:\n{log}");
    assert!(!log.contains("edgeproxy ready"), "{log}");
    assert!(!log.contains(" listening "), "{log}");
    // The listener that did bind was released with the process.
    assert!(refuses(free_addr), "{free_addr} still accepts connections");
    drop(taken);
}

/// A second edgeproxy on the address of a running one must not start: its
/// SO_REUSEPORT sockets would otherwise join the first one's and silently
/// split the traffic.
#[test]
fn a_second_instance_on_the_same_address_is_refused() {
    let dir = TempDir::new("second");
    let addr: SocketAddr = format!("127.0.0.1:{}", common::dead_port())
        .parse()
        .unwrap();
    let db = dir.join("routing.db");
    let text = format!(
        "[routing]\ndb_path = {db:?}\n[runtime]\nshards = 2\n[[listener]]\nname = \"front\"\naddr = \"{addr}\"\n",
        db = db.display().to_string()
    );
    let first = Proxy::with_config(&dir, &text);
    assert_eq!(first.addr(), addr);

    let second_dir = TempDir::new("second-b");
    let mut second = Proxy::spawn_with_config(&second_dir, &text);
    let status = second
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("second instance kept running:\n{}", second.log_text()));
    assert!(!status.success(), "exit {status}");
    let line = second
        .wait_for_log("edgeproxy: error", PATIENCE)
        .unwrap_or_else(|| panic!("no error line:\n{}", second.log_text()));
    assert!(line.contains("front") && line.contains("in use"), "{line}");
}

/// `edgeproxy completions SHELL` prints a completion script that knows the
/// subcommands; bash's is checked by bash itself.
/// `backends add --port 70000` said only that 70000 is not a valid value;
/// 0 passed the command line and came back as the API's 400.
#[test]
fn a_backend_port_out_of_range_names_the_range() {
    for port in ["70000", "0", "-1"] {
        let arg = format!("--port={port}");
        let (status, stdout, stderr) = run_to_end(
            &[
                "backends", "add", "b1", "--app", "web", "--region", "sa", "--ip", "10.0.0.1", &arg,
            ],
            &[],
        );
        assert!(!status.success(), "--port {port}: {stdout}{stderr}");
        assert!(stderr.contains("1..=65535"), "--port {port}: {stderr}");
    }
}

#[test]
fn completion_scripts_are_generated_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_edgeproxy()"),
        ("zsh", "#compdef edgeproxy"),
        ("fish", "complete -c edgeproxy"),
    ] {
        let (status, stdout, stderr) = run_to_end(&["completions", shell], &[]);
        assert!(status.success(), "{shell}: {stderr}");
        assert!(stdout.contains(marker), "{shell}:\n{stdout}");
        for sub in ["check-config", "backends", "completions", "drain"] {
            assert!(stdout.contains(sub), "{shell} script lacks {sub}");
        }
    }
    let dir = TempDir::new("completions");
    let script = dir.join("edgeproxy.bash");
    let (_, stdout, _) = run_to_end(&["completions", "bash"], &[]);
    std::fs::write(&script, stdout).unwrap();
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash is installed");
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let (status, _, stderr) = run_to_end(&["completions", "tcsh"], &[]);
    assert!(!status.success() && stderr.contains("tcsh"), "{stderr}");
}

/// `check-config` binds every socket the file configures and lets go, like
/// `nginx -t` would be expected to: a port in use is an error naming the
/// socket, for listeners, metrics, the API and DNS alike (each cause said
/// once). `--no-bind` skips that, for a file a running proxy is about to
/// reload.
#[test]
fn check_config_reports_every_kind_of_port_in_use() {
    let dir = TempDir::new("check-bind");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_udp = std::net::UdpSocket::bind(taken.local_addr().unwrap()).unwrap();
    let busy = taken.local_addr().unwrap();
    let db = dir.join("routing.db");
    let base = format!(
        "[routing]\ndb_path = {:?}\n[runtime]\nshards = 2\n",
        db.to_str().unwrap()
    );
    let free_listener = "[[listener]]\nname = \"front\"\naddr = \"127.0.0.1:0\"\n";
    let cases = [
        (
            "listener",
            format!("{base}[[listener]]\nname = \"front\"\naddr = \"{busy}\"\n"),
            format!("listener \"front\": cannot listen on {busy}"),
        ),
        (
            "metrics",
            format!("{base}{free_listener}[metrics]\nenabled = true\nlisten_addr = \"{busy}\"\n"),
            format!("metrics: cannot listen on {busy}"),
        ),
        (
            "api",
            format!("{base}{free_listener}[api]\nenabled = true\nlisten_addr = \"{busy}\"\n"),
            format!("discovery API: cannot listen on {busy}"),
        ),
        (
            "dns",
            format!("{base}{free_listener}[dns]\nenabled = true\nlisten_addr = \"{busy}\"\n"),
            format!("on {busy}"),
        ),
    ];
    for (what, text, needle) in cases {
        let path = write_config(&dir, &text);
        let line = assert_one_error(
            what,
            run_to_end(&["check-config", "--config", &path], &[]),
            &[&needle, "in use"],
        );
        assert_eq!(line.matches("in use").count(), 1, "cause repeated: {line}");
        // The way to check a file whose ports a running proxy holds.
        assert!(line.contains("`check-config --no-bind`"), "{line}");
        // --no-bind: the same file checks fine.
        let (status, _, stderr) =
            run_to_end(&["check-config", "--no-bind", "--config", &path], &[]);
        assert!(status.success(), "{what} --no-bind: {stderr}");
        assert!(!db.exists(), "check-config created routing.db");
    }
    drop((taken, taken_udp));
}

/// `run` binds every socket before it creates anything: a port in use stops
/// it without leaving a new routing.db behind.
#[test]
fn run_creates_nothing_when_a_port_is_in_use() {
    let dir = TempDir::new("run-nothing");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let db = dir.join("routing.db");
    for extra in [
        format!("[[listener]]\nname = \"front\"\naddr = \"{busy}\"\n"),
        format!(
            "[[listener]]\nname = \"front\"\naddr = \"127.0.0.1:0\"\n\
             [metrics]\nenabled = true\nlisten_addr = \"{busy}\"\n"
        ),
    ] {
        let text = format!(
            "[routing]\ndb_path = {:?}\n[demo]\nbackends = 1\n{extra}",
            db.to_str().unwrap()
        );
        let mut proxy = Proxy::spawn_with_config(&dir, &text);
        let status = proxy
            .wait_exit(PATIENCE)
            .unwrap_or_else(|| panic!("started:\n{}", proxy.log_text()));
        assert!(!status.success());
        proxy
            .wait_for_log("edgeproxy: error", PATIENCE)
            .unwrap_or_else(|| panic!("{}", proxy.log_text()));
        assert!(!db.exists(), "routing.db created:\n{}", proxy.log_text());
        assert!(!proxy.log_text().contains("demo backend started"));
    }
}

/// Relative paths in a config file resolve against the file's directory, not
/// the working directory (under systemd that is `/`): the routing table and
/// a token file next to the config are found from anywhere.
#[test]
fn relative_paths_resolve_against_the_config_files_directory() {
    let dir = TempDir::new("relative");
    let conf = dir.join("etc");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(conf.join("data")).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(conf.join("api.token"), "relative-token-0123456789\n").unwrap();
    std::fs::write(
        conf.join("edgeproxy.toml"),
        "[routing]\ndb_path = \"data/routing.db\"\n\
         [api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\n\
         [[listener]]\nname = \"main\"\naddr = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    // Started from another directory, with the config named relatively.
    let proxy = Proxy::spawn_in(&elsewhere, &["--config", "../etc/edgeproxy.toml"], &[]).ready();
    let created = proxy
        .wait_for_log("routing store did not exist", PATIENCE)
        .unwrap_or_else(|| panic!("{}", proxy.log_text()));
    assert_eq!(
        common::field(&created, "path").as_deref(),
        Some(conf.join("data/routing.db").to_str().unwrap()),
        "{created}"
    );
    assert!(conf.join("data/routing.db").exists());
    assert!(!elsewhere.join("data").exists());
    // The token file was found (auth = token).
    let api = proxy.wait_for_log("api listening", PATIENCE).unwrap();
    assert!(
        api.contains("auth=\"token\"") || api.contains("auth=token"),
        "{api}"
    );
    drop(proxy);

    // check-config prints the resolved, absolute paths.
    let mut cmd = std::process::Command::new(common::BIN);
    let out = cmd
        .current_dir(&elsewhere)
        .args([
            "check-config",
            "--no-bind",
            "--config",
            "../etc/edgeproxy.toml",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = parse(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        get(&t, "routing.db_path").as_str(),
        Some(conf.join("data/routing.db").to_str().unwrap())
    );
    assert_eq!(
        get(&t, "api.token_file").as_str(),
        Some(conf.join("api.token").to_str().unwrap())
    );
}

/// A routing.db in a directory that cannot be written (a read-only mount;
/// for root, permissions do not stop SQLite) cannot be opened in WAL mode:
/// SQLite must create routing.db-wal and -shm next to it. Its own message,
/// "unable to open database file", read as a wrong path (QA); the error now
/// names the directory and why. Runs the proxy in a private mount namespace
/// (`unshare -m`) so the read-only bind mount never outlives it.
#[test]
fn a_routing_db_in_a_read_only_directory_is_named_as_such() {
    // SAFETY: plain getter.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test mounts a read-only directory and needs root (CI runs as root)"
    );
    let dir = TempDir::new("ro-dir");
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    let db = data.join("routing.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .unwrap();
        conn.execute_batch(
            "CREATE TABLE backends (id TEXT PRIMARY KEY, app TEXT, region TEXT, wg_ip TEXT, \
             port INTEGER, healthy INTEGER, weight INTEGER, soft_limit INTEGER, \
             hard_limit INTEGER, deleted INTEGER DEFAULT 0);",
        )
        .unwrap();
    }
    let config = write_config(
        &dir,
        &format!(
            "[routing]\ndb_path = {db:?}\n[[listener]]\naddr = \"127.0.0.1:0\"\n\
             [metrics]\nenabled = false\n[demo]\nbackends = 0\n"
        ),
    );
    let data = data.to_str().unwrap();
    let script = format!(
        "mount --bind {data} {data} && mount -o remount,bind,ro {data} {data} && \
         exec {BIN} --config {config}",
        BIN = common::BIN
    );
    let mut child = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("unshare runs");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the proxy started on a read-only directory");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("edgeproxy: error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{stderr}"));
    for needle in [
        db.to_str().unwrap(),
        &format!("its directory {data} is not writable"),
        "Read-only file system",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }
}

/// QA (README walk): with EDGEPROXY_UPGRADE_CONTROL_SOCKET exported,
/// `upgrade --pid PID` was refused as "'--pid' cannot be used with
/// '--socket'", a flag never given. The variable is a default for the
/// socket, not a flag; and `--timeout`, which `--pid` never waits for, is
/// refused beside it rather than ignored.
#[test]
fn upgrade_pid_is_not_refused_for_the_socket_variable() {
    let me = std::process::id().to_string();
    let (status, _, stderr) = run_to_end(
        &["upgrade", "--pid", &me],
        &[("EDGEPROXY_UPGRADE_CONTROL_SOCKET", "/tmp/nowhere.sock")],
    );
    assert!(!status.success());
    assert!(!stderr.contains("cannot be used with"), "{stderr}");
    assert!(stderr.contains("is not an edgeproxy"), "{stderr}");

    let (status, _, stderr) = run_to_end(&["upgrade", "--pid", &me, "--timeout", "5"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");

    // The variable still names the socket when --pid is not given.
    let (status, _, stderr) = run_to_end(
        &["upgrade"],
        &[("EDGEPROXY_UPGRADE_CONTROL_SOCKET", "/tmp/qa-nowhere.sock")],
    );
    assert!(!status.success());
    assert!(stderr.contains("/tmp/qa-nowhere.sock"), "{stderr}");
}
