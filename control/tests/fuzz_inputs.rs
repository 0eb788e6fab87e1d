//! Fuzzing what the control plane parses from outside: discovery API
//! registration bodies (JSON from the network), the TOML configuration, and
//! the binary upgrade's hand-off messages.
//!
//! `bolero` property tests: under `cargo test` each target runs random
//! inputs for `EDGEPROXY_FUZZ_SECS` seconds (default 10) on stable Rust;
//! `cargo bolero test --engine libfuzzer` runs them coverage-guided.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bolero::{check, TypeGenerator};
use control::api::validate::{registration, FIELDS, MAX_LABEL_LEN, MAX_REGION_LEN};
use control::config::{parse_toml, Config};
use control::upgrade::wire::{FromSuccessor, ToSuccessor};
use engine::snapshot::SnapshotBuilder;
use serde_json::{json, Map, Value};

#[path = "../../tests/common/fuzz_budget.rs"]
mod fuzz_budget;

fn budget() -> Duration {
    fuzz_budget::budget(10)
}

const NO_ENV: [(&str, &str); 0] = [];

// ---------------------------------------------------------------------------
// Registration bodies
// ---------------------------------------------------------------------------

/// What the API accepts, the proxy can route: every accepted registration
/// satisfies the documented bounds and goes into a routing snapshot as a
/// healthy backend (not skipped as invalid). A refusal names a field.
fn registration_contract(body: &[u8]) {
    match registration(body) {
        Ok(rec) => {
            // Ids and apps are DNS labels (`<id>.<app>.internal`).
            let label = |s: &str| {
                (1..=MAX_LABEL_LEN).contains(&s.len())
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !s.starts_with('-')
                    && !s.ends_with('-')
            };
            assert!(label(&rec.id), "{rec:?}");
            assert!(label(&rec.app), "{rec:?}");
            assert!(!rec.region.is_empty() && rec.region.len() <= MAX_REGION_LEN);
            assert_eq!(rec.region, rec.region.to_ascii_lowercase());
            if let Some(c) = &rec.country {
                assert!(
                    c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase()),
                    "{c:?}"
                );
            }
            assert!((1..=65_535).contains(&rec.port));
            assert!((1..=255).contains(&rec.weight));
            assert!(rec.soft_limit >= 1 && rec.hard_limit >= rec.soft_limit);
            assert!(rec.healthy && !rec.deleted);
            let built = SnapshotBuilder::new().build(std::slice::from_ref(&rec));
            assert!(
                built.skipped.is_empty(),
                "accepted but not routable: {rec:?}: {:?}",
                built.skipped
            );
            assert_eq!(built.snapshot.backends.len(), 1);
        }
        Err(e) => {
            // The document, a known field, or a key of the body that
            // misspells one (named as sent).
            assert!(
                e.field == "body"
                    || FIELDS.contains(&e.field.as_ref())
                    || e.reason.starts_with("unknown field; did you mean"),
                "unknown field {:?}: {}",
                e.field,
                e.reason
            );
            assert!(!e.reason.is_empty());
        }
    }
}

#[test]
fn any_bytes_as_a_registration_body() {
    check!()
        .with_test_time(budget())
        .with_max_len(4096)
        .for_each(|bytes: &[u8]| registration_contract(bytes));
}

/// A JSON value of every kind, with strings drawn from values that matter
/// to the fields (near-valid addresses, names, country codes) as well as
/// arbitrary ones.
#[derive(Debug, TypeGenerator)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Big(u64),
    Float(f64),
    Str(Text),
    Array(Vec<i8>),
    Object(Vec<(u8, i8)>),
}

#[derive(Debug, TypeGenerator)]
enum Text {
    Known(u8),
    Any(String),
}

const TEXTS: &[&str] = &[
    "web",
    "sa",
    "eu",
    "BR",
    "br",
    "b",
    "BRA",
    " BR",
    "10.0.0.1",
    "::1",
    "fd00::1",
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "255.255.255.255",
    "127.0.0.1",
    "::ffff:10.0.0.1",
    "fe80::1%eth0",
    "1.2.3",
    "backend-1",
    "a b",
    "a/b",
    "é",
    "\u{0}",
    " web",
    "",
    "169.254.0.1",
    "100.64.0.1",
    "2001:db8::1",
    "ff02::1",
];

impl Text {
    fn str(&self) -> &str {
        match self {
            Text::Known(i) => TEXTS[*i as usize % TEXTS.len()],
            Text::Any(s) => s,
        }
    }

    /// As a TOML string literal.
    fn toml(&self) -> String {
        toml::Value::String(self.str().to_string()).to_string()
    }
}

impl Json {
    fn value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => json!(b),
            Json::Int(i) => json!(i),
            Json::Big(u) => json!(u),
            Json::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Json::Str(t) => json!(t.str()),
            Json::Array(a) => json!(a),
            Json::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (FIELDS[*k as usize % FIELDS.len()].to_string(), json!(v)))
                    .collect(),
            ),
        }
    }
}

#[test]
fn structured_registration_bodies() {
    check!()
        .with_test_time(budget())
        .with_type::<Vec<(u8, Json)>>()
        .for_each(|fields| {
            let mut obj = Map::new();
            // Start from a valid registration, so that single bad fields are
            // reached and not only "id: is required".
            for (k, v) in [
                ("id", json!("b-1")),
                ("app", json!("web")),
                ("region", json!("sa")),
                ("ip", json!("10.0.0.1")),
                ("port", json!(8080)),
            ] {
                obj.insert(k.to_string(), v);
            }
            for (k, v) in fields {
                obj.insert(FIELDS[*k as usize % FIELDS.len()].to_string(), v.value());
            }
            registration_contract(&serde_json::to_vec(&Value::Object(obj)).unwrap());
        });
}

// ---------------------------------------------------------------------------
// TOML configuration
// ---------------------------------------------------------------------------

/// Loading any text either fails with an error naming what is wrong, or
/// gives a configuration that renders (`check-config`) to TOML which loads
/// back to the same configuration.
fn config_contract(text: &str) {
    let Ok(raw) = parse_toml(Path::new("fuzz.toml"), text) else {
        return;
    };
    let Ok(config) = Config::from_raw(raw, &NO_ENV) else {
        return;
    };
    let rendered = config.to_toml();
    let again = parse_toml(Path::new("rendered.toml"), &rendered)
        .unwrap_or_else(|e| panic!("check-config output does not parse: {e}\n{rendered}"));
    let again = Config::from_raw(again, &NO_ENV)
        .unwrap_or_else(|e| panic!("check-config output does not load: {e}\n{rendered}"));
    // Secrets are not rendered: compare without them.
    let mut expected = config.clone();
    expected.api.token = None;
    if let Some(url) = &expected.postgres.url {
        if url.redacted()
            != again
                .postgres
                .url
                .as_ref()
                .map(|u| u.redacted())
                .unwrap_or_default()
        {
            panic!("postgres url rendered differently\n{rendered}");
        }
        expected.postgres.url = again.postgres.url.clone();
    }
    assert_eq!(
        again, expected,
        "rendered config loads differently:\n{rendered}"
    );
}

#[test]
fn any_text_as_a_config_file() {
    check!()
        .with_test_time(budget())
        .with_max_len(2048)
        .for_each(|bytes: &[u8]| config_contract(&String::from_utf8_lossy(bytes)));
}

/// What a key holds, to build values of the right type most of the time.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Bool,
    Str,
    Addr,
}

/// Keys every section takes, to build files that get past the key check.
const KEYS: &[(&str, &[(&str, Kind)])] = &[
    ("pop", &[("region", Kind::Str), ("name", Kind::Str)]),
    (
        "runtime",
        &[
            ("shards", Kind::Int),
            ("pin_cores", Kind::Bool),
            ("buffer_count", Kind::Int),
            ("buffer_size", Kind::Int),
            ("splice_bulk", Kind::Bool),
        ],
    ),
    (
        "routing",
        &[("db_path", Kind::Str), ("reload_interval_ms", Kind::Int)],
    ),
    (
        "affinity",
        &[("ttl_secs", Kind::Int), ("gc_interval_secs", Kind::Int)],
    ),
    ("geo", &[("default_region", Kind::Str)]),
    (
        "limits",
        &[
            ("max_connections", Kind::Int),
            ("max_connections_per_shard", Kind::Int),
            ("connect_timeout_ms", Kind::Int),
            ("connect_attempts", Kind::Int),
            ("idle_timeout_secs", Kind::Int),
            ("shutdown_grace_secs", Kind::Int),
        ],
    ),
    ("demo", &[("backends", Kind::Int), ("app", Kind::Str)]),
    ("log", &[("level", Kind::Str)]),
    (
        "metrics",
        &[("enabled", Kind::Bool), ("listen_addr", Kind::Addr)],
    ),
    (
        "api",
        &[
            ("enabled", Kind::Bool),
            ("listen_addr", Kind::Addr),
            ("allow_open", Kind::Bool),
            ("heartbeat_ttl_secs", Kind::Int),
            ("max_body_bytes", Kind::Int),
            ("rate_limit_per_sec", Kind::Int),
            ("rate_limit_burst", Kind::Int),
        ],
    ),
    (
        "dns",
        &[
            ("enabled", Kind::Bool),
            ("listen_addr", Kind::Addr),
            ("domain", Kind::Str),
            ("ttl_secs", Kind::Int),
            ("tcp_idle_timeout_secs", Kind::Int),
            ("tcp_max_connections", Kind::Int),
            ("udp_workers", Kind::Int),
            ("udp_batch_scheduling", Kind::Bool),
        ],
    ),
    (
        "upgrade",
        &[
            ("control_socket", Kind::Str),
            ("ready_timeout_secs", Kind::Int),
        ],
    ),
    (
        "config_watch",
        &[("enabled", Kind::Bool), ("interval_secs", Kind::Int)],
    ),
    (
        "postgres",
        &[
            ("enabled", Kind::Bool),
            ("url", Kind::Str),
            ("reload_secs", Kind::Int),
            ("connect_timeout_secs", Kind::Int),
            ("query_timeout_secs", Kind::Int),
            ("channel", Kind::Str),
            ("install_trigger", Kind::Bool),
        ],
    ),
];

/// A value of the key's type (the fields used as the type needs), unless
/// `wrong` is used instead.
#[derive(Debug, TypeGenerator)]
struct Toml {
    n: u16,
    big: Option<i64>,
    flag: bool,
    text: Text,
    ip: u8,
    wrong: Option<Wrong>,
}

/// Anything TOML can hold, whatever the key wants.
#[derive(Debug, TypeGenerator)]
enum Wrong {
    Int(i64),
    Bool(bool),
    Str(Text),
    Strs(Vec<u8>),
}

const IPS: &[&str] = &[
    "127.0.0.1",
    "0.0.0.0",
    "[::1]",
    "[::]",
    "10.1.2.3",
    "localhost",
];

impl Toml {
    /// Rendered for a key of `kind`; with `strict`, always of that type.
    fn render(&self, kind: Kind, strict: bool) -> String {
        match (&self.wrong, strict) {
            (Some(w), false) => match w {
                Wrong::Int(i) => i.to_string(),
                Wrong::Bool(b) => b.to_string(),
                Wrong::Str(t) => t.toml(),
                Wrong::Strs(v) => format!(
                    "[{}]",
                    v.iter()
                        .map(|i| Text::Known(*i).toml())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            _ => match kind {
                Kind::Int => self.big.map_or(self.n.to_string(), |b| b.to_string()),
                Kind::Bool => self.flag.to_string(),
                Kind::Str => self.text.toml(),
                Kind::Addr => format!("\"{}:{}\"", IPS[self.ip as usize % IPS.len()], self.n),
            },
        }
    }
}

#[derive(Debug, TypeGenerator)]
struct ConfigFile {
    /// Every value of its key's type (half the files).
    strict: bool,
    /// (section, key, value), indexes into `KEYS`.
    entries: Vec<(u8, u8, Toml)>,
    listeners: Vec<ListenerEntry>,
}

/// (name, addr, app, accept_proxy_protocol, send_proxy_protocol).
type ListenerEntry = (Option<Text>, Toml, Option<Text>, bool, bool);

impl ConfigFile {
    fn text(&self) -> String {
        let mut sections: BTreeMap<&str, BTreeMap<&str, String>> = BTreeMap::new();
        for (s, k, v) in &self.entries {
            let (section, keys) = KEYS[*s as usize % KEYS.len()];
            let (key, kind) = keys[*k as usize % keys.len()];
            sections
                .entry(section)
                .or_default()
                .insert(key, v.render(kind, self.strict));
        }
        let mut out = String::new();
        for (section, keys) in sections {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        for (name, addr, app, accept, send) in &self.listeners {
            out.push_str("[[listener]]\n");
            if let Some(n) = name {
                out.push_str(&format!("name = {}\n", n.toml()));
            }
            out.push_str(&format!(
                "addr = {}\n",
                addr.render(Kind::Addr, self.strict)
            ));
            if let Some(a) = app {
                out.push_str(&format!("app = {}\n", a.toml()));
            }
            out.push_str(&format!(
                "accept_proxy_protocol = {accept}\nsend_proxy_protocol = {send}\n"
            ));
        }
        out
    }
}

#[test]
fn structured_config_files() {
    check!()
        .with_test_time(budget())
        .with_max_len(512)
        .with_type::<ConfigFile>()
        .for_each(|file| config_contract(&file.text()));
}

// ---------------------------------------------------------------------------
// Upgrade hand-off messages
// ---------------------------------------------------------------------------

#[test]
fn any_bytes_as_a_hand_off_message() {
    check!()
        .with_test_time(budget())
        .with_type::<(Vec<u8>, u8)>()
        .for_each(|(bytes, fds)| {
            let fds = *fds as usize;
            if let Ok(msg) = ToSuccessor::decode(bytes, fds) {
                // Accepted: it describes exactly the descriptors that came,
                // and encodes back to something that decodes the same.
                assert_eq!(ToSuccessor::decode(&msg.encode(), fds).unwrap(), msg);
            }
            if let Ok(msg) = FromSuccessor::decode(bytes, fds) {
                assert_eq!(fds, 0);
                assert_eq!(FromSuccessor::decode(&msg.encode(), 0).unwrap(), msg);
            }
        });
}
