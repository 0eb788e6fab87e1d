//! README.md says what the binary does: these tests hold it to that. The
//! routing table's columns and its INSERT example, `/health`'s fields, the
//! `backends` transcript against the shipped config, the command-line
//! summary, and the Debian packages `.ci/run` installs are checked against
//! the real binary, the real schema and the real script.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const TOKEN: &str = "readme-token-0123456789abcdef";

fn readme() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap()
}

/// The text of the README section starting at heading `heading`, up to the
/// next heading (`## ` or `### `; a `#` comment in a code block is not one).
fn section(heading: &str) -> String {
    let text = readme();
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no section {heading:?}"));
    let body = &text[start + heading.len() + 2..];
    let end = [body.find("\n## "), body.find("\n### ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(body.len());
    body[..end].to_string()
}

/// Fenced blocks (```lang ... ```) of `text` as (lang, body).
fn blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            out.push((lang.trim().to_string(), body.join("\n")));
        }
    }
    out
}

/// A proxy with the API on, on a routing table in `dir`, with `extra`.
fn api_proxy(dir: &TempDir, extra: &str) -> (Proxy, String) {
    let db = dir.join("routing.db");
    let path = dir.join("edgeproxy.toml");
    std::fs::write(
        &path,
        config(
            &db,
            &format!(
                "[api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\ntoken = {TOKEN:?}\n{extra}"
            ),
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], &[]);
    let line = proxy.wait_for_log("api listening", PATIENCE).unwrap();
    let url = format!("http://{}", field(&line, "addr").unwrap());
    (proxy, url)
}

fn get_json(url: &str) -> Value {
    let text = ureq::get(url)
        .header("Authorization", format!("Bearer {TOKEN}"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_backends_columns_are_the_real_schema_and_the_insert_example_routes() {
    let doc = section("## The routing table (`routing.db`)");
    // Every column the README names exists in the table the proxy creates,
    // and every column of that table is named.
    let dir = TempDir::new("readme-table");
    let (proxy, url) = api_proxy(&dir, "");
    let conn = rusqlite::Connection::open(dir.join("routing.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info('backends')")
        .unwrap();
    let real: BTreeSet<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let documented: BTreeSet<String> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| {
            let cell = l.split('|').nth(1).unwrap();
            cell.split('`')
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, name)| name.to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(documented, real, "README columns vs the real table");

    // The INSERT example, through the sqlite3 shell as the README shows it,
    // is routed: the proxy lists it as serving.
    let (_, sql) = blocks(&doc)
        .into_iter()
        .find(|(lang, body)| lang == "sql" && body.contains("INSERT INTO backends"))
        .expect("an INSERT example");
    let mut shell = Command::new("sqlite3")
        .arg(dir.join("routing.db"))
        .stdin(Stdio::piped())
        .spawn()
        .expect("the sqlite3 shell is installed");
    use std::io::Write;
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    assert!(shell.wait().unwrap().success());
    let id = sql.split('\'').nth(1).unwrap().to_string();
    assert!(
        eventually(PATIENCE, || {
            get_json(&format!("{url}/api/v1/backends/{id}"))["state"] == "serving"
        }),
        "{}",
        proxy.log_text()
    );
    let b = get_json(&format!("{url}/api/v1/backends/{id}"));
    assert_eq!(
        (b["app"].as_str(), b["country"].as_str()),
        (Some("web"), Some("BR"))
    );
}

#[test]
fn health_has_the_documented_fields() {
    let doc = section("## Auto-discovery API");
    let row = doc
        .lines()
        .find(|l| l.starts_with("| `GET /health`"))
        .expect("the /health row");
    let json = row.split('`').nth(3).expect("the answer in backticks");
    let documented: BTreeSet<String> = json
        .trim_start_matches("200 ")
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .map(|f| f.split(':').next().unwrap().trim_matches('"').to_string())
        .collect();
    let dir = TempDir::new("readme-health");
    let (_proxy, url) = api_proxy(&dir, "");
    let health = get_json(&format!("{url}/health"));
    let real: BTreeSet<String> = health.as_object().unwrap().keys().cloned().collect();
    assert_eq!(documented, real);
    // Each field is explained below the table.
    for f in &real {
        assert!(doc.contains(&format!("`{f}` (")), "{f} is not explained");
    }
}

/// The `backends` transcript is what the shipped config gives: its demo
/// backends and the one added, in the same states.
#[test]
fn the_backends_transcript_matches_the_shipped_config() {
    let doc = section("### `edgeproxy backends`");
    let (_, transcript) = blocks(&doc)
        .into_iter()
        .find(|(_, b)| b.contains("backends list"))
        .expect("a transcript");
    let dir = TempDir::new("readme-transcript");
    let shipped = format!("{ROOT}/config/edgeproxy.toml");
    let db = dir.join("routing.db");
    let env = [
        ("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0"),
        ("EDGEPROXY_METRICS_LISTEN_ADDR", "127.0.0.1:0"),
        ("EDGEPROXY_API_ENABLED", "true"),
        ("EDGEPROXY_API_LISTEN_ADDR", "127.0.0.1:0"),
        ("EDGEPROXY_API_TOKEN", TOKEN),
        ("EDGEPROXY_DB_PATH", db.to_str().unwrap()),
    ];
    let proxy = Proxy::start(&["--config", &shipped], &env);
    let line = proxy.wait_for_log("api listening", PATIENCE).unwrap();
    let url = format!("http://{}", field(&line, "addr").unwrap());
    // Each `$ edgeproxy ... backends ...` line, run against this proxy.
    let mut commands = transcript
        .lines()
        .filter_map(|l| l.strip_prefix("$ edgeproxy "));
    let mut outputs = Vec::new();
    for cmd in commands.by_ref() {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let at = words
            .iter()
            .position(|w| *w == "backends")
            .expect("a backends command");
        let mut args = vec!["backends", "--api", url.as_str()];
        args.extend_from_slice(&words[at + 1..]);
        let (status, out, err) = run_to_end(&args, &[("EDGEPROXY_API_TOKEN", TOKEN)]);
        assert!(status.success(), "{cmd}: {err}");
        outputs.push((cmd.to_string(), out));
    }
    let (_, list) = outputs
        .iter()
        .find(|(c, _)| c.ends_with("backends list"))
        .unwrap();
    // The documented table, and the real one: same rows, same columns but
    // the ports the demo backends picked and the heartbeat age.
    let doc_rows: Vec<&str> = transcript
        .lines()
        .skip_while(|l| !l.ends_with("backends list"))
        .skip(1)
        .take_while(|l| !l.starts_with('$'))
        .collect();
    let key = |row: &str| -> Vec<String> {
        let cells: Vec<&str> = row.split_whitespace().collect();
        [0usize, 1, 2, 3, 5, 6, 7, 8, 9]
            .iter()
            .map(|i| cells[*i].to_string())
            .collect()
    };
    // The header as printed, every column (the five health columns were
    // printed and missing from README).
    assert_eq!(
        list.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        doc_rows[0].split_whitespace().collect::<Vec<_>>(),
        "README's header vs the real one:\n{list}"
    );
    let real_rows: Vec<Vec<String>> = list.lines().map(key).collect();
    let doc_rows: Vec<Vec<String>> = doc_rows.into_iter().map(key).collect();
    assert_eq!(
        real_rows, doc_rows,
        "README's table vs the real one:\n{list}"
    );
    // The other commands' first lines, as documented.
    for (cmd, out) in &outputs {
        let documented = transcript
            .lines()
            .skip_while(|l| !l.ends_with(cmd.as_str()))
            .nth(1)
            .unwrap();
        if !cmd.ends_with("backends list") {
            assert_eq!(out.lines().next().unwrap(), documented, "{cmd}");
        }
    }
}

#[test]
fn the_command_line_summary_lists_every_subcommand() {
    let doc = section("## Command line");
    let (status, help, _) = run_to_end(&["--help"], &[]);
    assert!(status.success());
    let subcommands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(subcommands.len() >= 4, "{help}");
    for sub in subcommands {
        assert!(
            doc.contains(&format!("edgeproxy {sub}"))
                || (sub == "run" && doc.contains("`edgeproxy run`")),
            "README's command line lacks {sub}"
        );
    }
    assert!(doc.contains("--version") && doc.contains("--no-bind"));
}

/// Every Debian package `.ci/run` installs is in the README's table of what
/// the tests need.
#[test]
fn every_package_ci_installs_is_listed() {
    let script = std::fs::read_to_string(Path::new(ROOT).join(".ci/run")).unwrap();
    let mut packages = BTreeSet::new();
    for line in script.lines() {
        // A package added to a list: `need="$need bird2"`,
        // `daemons="$daemons unbound"`.
        if let Some((left, right)) = line.split_once("=\"$") {
            let var = left.rsplit(|c: char| c.is_whitespace() || c == '|').next();
            if let Some(rest) = var.and_then(|v| right.strip_prefix(&format!("{v} "))) {
                packages.insert(rest.trim_end_matches('"').to_string());
            }
        }
        if let Some(rest) = line.split("install -y -qq ").nth(1) {
            for word in rest.split_whitespace() {
                if word.starts_with('$') || word.starts_with('>') || word.starts_with('|') {
                    break;
                }
                if !word.starts_with('-') {
                    packages.insert(word.to_string());
                }
            }
        }
    }
    assert!(packages.len() >= 8, "{packages:?}");
    // Both kinds of list were read.
    assert!(
        packages.contains("bird2") && packages.contains("unbound"),
        "{packages:?}"
    );
    let doc = section("## Two commands");
    for p in &packages {
        assert!(doc.contains(&format!("`{p}`")), "README does not list {p}");
    }
}

/// The Rust version README asks for is the workspace's `rust-version` (it
/// said 1.88+ after the BGP speaker had raised it to 1.95).
#[test]
fn the_rust_version_is_the_workspace_one() {
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version in Cargo.toml")
        .trim_matches('"');
    let doc = section("## Two commands");
    assert!(
        doc.contains(&format!("Rust {version}+")),
        "README does not say Rust {version}+"
    );
}

/// The metric families `/metrics` declares (`# TYPE name kind`).
fn exposed_families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Whether README names `metric`: in full, or as a `_suffix` beside a full
/// name sharing the rest, in one paragraph or table row
/// (`edgeproxy_pool_hits_total`, `_misses_total`).
fn documented(readme: &str, metric: &str) -> bool {
    if readme.contains(&format!("`{metric}`")) || readme.contains(&format!("`{metric}{{")) {
        return true;
    }
    readme
        .split("\n\n")
        .flat_map(|p| p.split("\n|"))
        .any(|para| {
            let names: Vec<&str> = para
                .split('`')
                .skip(1)
                .step_by(2)
                .map(|n| n.split('{').next().unwrap())
                .collect();
            names.iter().filter(|n| n.starts_with('_')).any(|suffix| {
                metric.strip_suffix(suffix).is_some_and(|stem| {
                    names
                        .iter()
                        .any(|n| n.starts_with(&format!("{stem}_")) && !n.starts_with('_'))
                })
            })
        })
}

/// Every metric in README's table is on `/metrics`, and every family
/// `/metrics` serves (a TLS listener, the health checker idle) is named in
/// README. The checker's own counters (`edgeproxy_health_checks_total`
/// and four more) were served and named nowhere.
#[test]
fn the_metrics_table_is_what_metrics_serves() {
    let doc = readme();
    let table = section("## Metrics");
    let dir = TempDir::new("readme-metrics");
    // A certificate file, for its expiry gauge.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let proxy = Proxy::with_config(
        &dir,
        &config(
            &dir.join("routing.db"),
            &format!(
                "[metrics]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n\n\
                 [[listener]]\nname = \"tls\"\naddr = \"127.0.0.1:0\"\n\
                 [listener.tls]\ncert = {:?}\nkey = {:?}\n",
                dir.join("cert.pem"),
                dir.join("key.pem")
            ),
        ),
    );
    let addr = proxy.metrics_addr();
    let (status, text) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    let exposed = exposed_families(&text);
    assert!(exposed.len() > 30, "{text}");

    let listed: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| l.split('|').nth(1).unwrap().split('`').skip(1).step_by(2))
        .filter(|n| !n.starts_with('_'))
        .collect();
    assert!(listed.len() > 30, "{listed:?}");
    let missing: Vec<&&str> = listed.iter().filter(|n| !exposed.contains(**n)).collect();
    assert!(
        missing.is_empty(),
        "in README, not on /metrics: {missing:?}"
    );

    let unnamed: Vec<&String> = exposed.iter().filter(|m| !documented(&doc, m)).collect();
    assert!(
        unnamed.is_empty(),
        "on /metrics, not in README: {unnamed:?}"
    );
}

/// A registration's reply has the fields README's table lists (it listed
/// no `ip`, which the reply carries since 6PN may choose it).
#[test]
fn register_replies_with_the_documented_fields() {
    let doc = section("## Auto-discovery API");
    let row = doc
        .lines()
        .find(|l| l.starts_with("| `POST /api/v1/register`"))
        .expect("the register row");
    let json = row.split('`').nth(3).expect("the answer in backticks");
    let documented: BTreeSet<String> = json
        .trim_start_matches("201 ")
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .map(|f| f.split(':').next().unwrap().trim_matches('"').to_string())
        .collect();
    let dir = TempDir::new("readme-register");
    let (_proxy, url) = api_proxy(&dir, "");
    let mut reply = ureq::post(&format!("{url}/api/v1/register"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .send(r#"{"id":"b1","app":"web","region":"eu","ip":"10.0.0.1","port":80}"#)
        .unwrap();
    assert_eq!(reply.status(), 201);
    let body: Value = serde_json::from_str(&reply.body_mut().read_to_string().unwrap()).unwrap();
    let real: BTreeSet<String> = body.as_object().unwrap().keys().cloned().collect();
    assert_eq!(documented, real, "{body}");
}

/// Every TOML example in README is a configuration `check-config` takes:
/// it passes, or fails only on a file the example names under
/// `/etc/edgeproxy/` (a certificate, a CA) that this host lacks, never on a
/// key, a type or a value.
#[test]
fn every_toml_example_is_accepted() {
    let examples: Vec<String> = blocks(&readme())
        .into_iter()
        .filter(|(lang, _)| lang == "toml")
        .map(|(_, body)| body)
        .collect();
    assert!(examples.len() >= 4, "{examples:?}");
    let dir = TempDir::new("readme-toml");
    for (i, body) in examples.iter().enumerate() {
        let path = dir.join(&format!("example-{i}.toml"));
        std::fs::write(&path, body).unwrap();
        let (status, _, err) = run_to_end(
            &[
                "check-config",
                "--no-bind",
                "--config",
                path.to_str().unwrap(),
            ],
            &[],
        );
        let error = err.lines().find(|l| l.contains("error")).unwrap_or("");
        assert!(
            status.success()
                || (error.contains("/etc/edgeproxy/") && !error.contains("invalid type")),
            "example {i}:\n{body}\n{err}"
        );
    }
}

/// The Rust sources under `dir`, concatenated.
fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// Every `EDGEPROXY_*` variable README names is one the code reads (the
/// binary, its build script, or the tests for the soak's length).
#[test]
fn every_environment_variable_in_readme_is_read() {
    let mut code = String::new();
    for dir in ["control", "engine", "dns", "tests"] {
        sources(&Path::new(ROOT).join(dir), &mut code);
    }
    let doc = readme();
    let names: BTreeSet<&str> = doc
        .match_indices("EDGEPROXY_")
        .map(|(at, _)| {
            let rest = &doc[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        // `EDGEPROXY_REPLICATION_…`: a prefix, in a table's header.
        .filter(|n| !n.ends_with('_'))
        .collect();
    assert!(names.len() > 40, "{names:?}");
    let unread: Vec<&&str> = names
        .iter()
        .filter(|n| !code.contains(&format!("\"{n}\"")))
        .collect();
    assert!(unread.is_empty(), "README names, nothing reads: {unread:?}");
}
