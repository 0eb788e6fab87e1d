//! `[postgres]`: PostgreSQL as the routing source, with the original
//! edgeProxy's `EDGEPROXY_POSTGRES_*` variables (documented there, never
//! used by its binary).
//!
//! [`RawPostgres`] mirrors the file; [`from_raw`] applies the environment,
//! defaults and bounds; [`check_combination`] refuses settings that cannot
//! work with it (the discovery API and demo backends write `routing.db`,
//! which the source overwrites).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_env::{env_bool, env_parse, invalid, ConfigError, Env};

pub mod defaults {
    /// The original's reload interval: how often the table is read when no
    /// notification came.
    pub const RELOAD_SECS: u64 = 5;
    pub const CONNECT_TIMEOUT_SECS: u64 = 5;
    pub const QUERY_TIMEOUT_SECS: u64 = 10;
    /// The `LISTEN` channel the trigger notifies.
    pub const CHANNEL: &str = "edgeproxy_backends";
    /// The original's pool size; accepted, see `Postgres::max_connections`.
    pub const MAX_CONNECTIONS: u32 = 10;
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    pub enabled: Option<bool>,
    pub url: Option<String>,
    pub reload_secs: Option<u64>,
    pub connect_timeout_secs: Option<u64>,
    pub query_timeout_secs: Option<u64>,
    pub ca_file: Option<PathBuf>,
    pub channel: Option<String>,
    pub install_trigger: Option<bool>,
}

/// The effective `[postgres]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Postgres {
    /// Env: `EDGEPROXY_POSTGRES_ENABLED`.
    pub enabled: bool,
    /// Connection URL or key=value string (libpq syntax). Env:
    /// `EDGEPROXY_POSTGRES_URL`. Rendered without its password.
    #[serde(serialize_with = "ser_url")]
    pub url: Option<DbUrl>,
    /// Full read of the table when no notification came. Env:
    /// `EDGEPROXY_POSTGRES_RELOAD_SECS`.
    #[serde(rename = "reload_secs", serialize_with = "ser_secs")]
    pub reload: Duration,
    /// Env: `EDGEPROXY_POSTGRES_CONNECT_TIMEOUT_SECS`.
    #[serde(rename = "connect_timeout_secs", serialize_with = "ser_secs")]
    pub connect_timeout: Duration,
    /// A read taking longer counts as the database being unreachable. Env:
    /// `EDGEPROXY_POSTGRES_QUERY_TIMEOUT_SECS`.
    #[serde(rename = "query_timeout_secs", serialize_with = "ser_secs")]
    pub query_timeout: Duration,
    /// PEM file of the CA(s) the server's certificate must chain to; `None`:
    /// the system's roots. Env: `EDGEPROXY_POSTGRES_CA_FILE`.
    pub ca_file: Option<PathBuf>,
    /// `LISTEN` channel.
    pub channel: String,
    /// Create the trigger that notifies `channel` on every change to the
    /// table, if it is missing (needs the table owner's rights; without
    /// them changes are seen by the periodic read).
    pub install_trigger: bool,
    /// The original's `EDGEPROXY_POSTGRES_MAX_CONNECTIONS`, accepted and
    /// checked (1..=1000), not used: one session both listens and reads.
    #[serde(skip)]
    pub max_connections: u32,
}

/// A connection string, parsed; its password is never shown.
#[derive(Clone, PartialEq)]
pub struct DbUrl {
    text: String,
}

impl DbUrl {
    /// Parses `text` as tokio-postgres does. `sslmode=verify-ca` and
    /// `verify-full` (libpq's) mean `require` here: the certificate is
    /// always verified.
    pub fn parse(text: &str) -> Result<DbUrl, String> {
        let text = text
            .trim()
            .replace("sslmode=verify-full", "sslmode=require")
            .replace("sslmode=verify-ca", "sslmode=require");
        text.parse::<tokio_postgres::Config>()
            .map_err(|e| e.to_string())?;
        Ok(DbUrl { text })
    }

    pub fn config(&self) -> tokio_postgres::Config {
        self.text.parse().expect("checked in DbUrl::parse")
    }

    /// The string with any password replaced by `****`.
    pub fn redacted(&self) -> String {
        redact(&self.text)
    }
}

impl std::fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbUrl({})", self.redacted())
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:****@host/db`, and
/// `password=secret` → `password=****`.
fn redact(text: &str) -> String {
    let mut out = text.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let from = rest_start + colon + 1;
                out.replace_range(from..rest_start + at, "****");
            }
        }
    }
    let mut redacted = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("password=") {
        let value_start = i + "password=".len();
        redacted.push_str(&rest[..value_start]);
        redacted.push_str("****");
        let tail = &rest[value_start..];
        let end = tail.find([' ', '&']).unwrap_or(tail.len());
        rest = &tail[end..];
    }
    redacted.push_str(rest);
    redacted
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn ser_url<S: serde::Serializer>(u: &Option<DbUrl>, s: S) -> Result<S::Ok, S::Error> {
    match u {
        Some(u) => s.serialize_str(&u.redacted()),
        None => s.serialize_str(""),
    }
}

fn secs(
    env: &dyn Env,
    var: &'static str,
    file: Option<u64>,
    default: u64,
    key: &str,
    bounds: std::ops::RangeInclusive<u64>,
) -> Result<Duration, ConfigError> {
    let value = env_parse::<u64>(env, var)?.or(file).unwrap_or(default);
    if !bounds.contains(&value) {
        return Err(invalid(
            key,
            format!(
                "must be between {} and {} seconds",
                bounds.start(),
                bounds.end()
            ),
        ));
    }
    Ok(Duration::from_secs(value))
}

pub(crate) fn from_raw(raw: RawPostgres, env: &dyn Env) -> Result<Postgres, ConfigError> {
    let enabled = env_bool(env, "EDGEPROXY_POSTGRES_ENABLED")?
        .or(raw.enabled)
        .unwrap_or(false);
    let url = match env.var("EDGEPROXY_POSTGRES_URL") {
        Some(v) if !v.trim().is_empty() => {
            Some(DbUrl::parse(&v).map_err(|reason| ConfigError::Env {
                var: "EDGEPROXY_POSTGRES_URL",
                value: redact(&v),
                reason,
            })?)
        }
        _ => match raw.url.filter(|u| !u.trim().is_empty()) {
            Some(u) => Some(DbUrl::parse(&u).map_err(|reason| invalid("postgres.url", reason))?),
            None => None,
        },
    };
    if enabled && url.is_none() {
        return Err(invalid(
            "postgres.url",
            "required when postgres.enabled is true (or set EDGEPROXY_POSTGRES_URL)",
        ));
    }
    let reload = secs(
        env,
        "EDGEPROXY_POSTGRES_RELOAD_SECS",
        raw.reload_secs,
        defaults::RELOAD_SECS,
        "postgres.reload_secs",
        1..=3600,
    )?;
    let connect_timeout = secs(
        env,
        "EDGEPROXY_POSTGRES_CONNECT_TIMEOUT_SECS",
        raw.connect_timeout_secs,
        defaults::CONNECT_TIMEOUT_SECS,
        "postgres.connect_timeout_secs",
        1..=300,
    )?;
    let query_timeout = secs(
        env,
        "EDGEPROXY_POSTGRES_QUERY_TIMEOUT_SECS",
        raw.query_timeout_secs,
        defaults::QUERY_TIMEOUT_SECS,
        "postgres.query_timeout_secs",
        1..=300,
    )?;
    let ca_file = env
        .var("EDGEPROXY_POSTGRES_CA_FILE")
        .map(PathBuf::from)
        .or(raw.ca_file);
    if let (true, Some(path)) = (enabled, &ca_file) {
        if !path.is_file() {
            return Err(invalid(
                "postgres.ca_file",
                format!("{} is not a readable file", path.display()),
            ));
        }
    }
    let channel = raw.channel.unwrap_or_else(|| defaults::CHANNEL.into());
    // At most 40: the trigger's name is `edgeproxy_notify_<channel>`, and
    // PostgreSQL cuts identifiers at 63 bytes.
    let channel_ok = (1..=40).contains(&channel.len())
        && channel.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && channel
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !channel_ok {
        return Err(invalid(
            "postgres.channel",
            format!("{channel:?} is not a plain lower-case SQL identifier"),
        ));
    }
    let max_connections = env_parse::<u32>(env, "EDGEPROXY_POSTGRES_MAX_CONNECTIONS")?
        .unwrap_or(defaults::MAX_CONNECTIONS);
    if !(1..=1000).contains(&max_connections) {
        return Err(ConfigError::Env {
            var: "EDGEPROXY_POSTGRES_MAX_CONNECTIONS",
            value: max_connections.to_string(),
            reason: "must be in 1..=1000".into(),
        });
    }
    // The original's minimum pool size: accepted and checked, not used.
    env_parse::<u32>(env, "EDGEPROXY_POSTGRES_MIN_CONNECTIONS")?;
    Ok(Postgres {
        enabled,
        url,
        reload,
        connect_timeout,
        query_timeout,
        ca_file,
        channel,
        install_trigger: raw.install_trigger.unwrap_or(true),
        max_connections,
    })
}

/// The other writers of `routing.db`, as configured.
pub(crate) struct RoutingDbWriters {
    /// `[api] enabled`: the discovery API registers backends.
    pub api: bool,
    /// `[replication] enabled`: rows arrive from other POPs.
    pub replication: bool,
    /// `[demo] backends`: demo rows written at start.
    pub demo_backends: u32,
}

/// What cannot be combined with PostgreSQL as the source: writers of
/// `routing.db`, whose rows the source would overwrite or delete.
pub(crate) fn check_combination(
    postgres: &Postgres,
    writers: RoutingDbWriters,
) -> Result<(), ConfigError> {
    if !postgres.enabled {
        return Ok(());
    }
    if writers.api {
        return Err(invalid(
            "postgres.enabled",
            "cannot be combined with api.enabled: with PostgreSQL as the routing source, \
             backends are registered in the database, not through the discovery API",
        ));
    }
    if writers.replication {
        return Err(invalid(
            "postgres.enabled",
            "cannot be combined with replication.enabled: with PostgreSQL as the routing \
             source the database is the shared truth between POPs; turn replication off",
        ));
    }
    if writers.demo_backends > 0 {
        return Err(invalid(
            "postgres.enabled",
            "cannot be combined with demo.backends: demo backends are written to routing.db, \
             which mirrors the database",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    const NO_ENV: [(&str, &str); 0] = [];
    const URL: &str = "postgres://ep:s3cret@127.0.0.1:5432/routing";

    fn pg(text: &str, env: &dyn Env) -> Result<Postgres, ConfigError> {
        let raw = crate::config::parse_toml(Path::new("t.toml"), text)?;
        Config::from_raw(raw, env).map(|c| c.postgres)
    }

    #[test]
    fn off_by_default_with_the_originals_defaults() {
        let p = pg("", &NO_ENV).unwrap();
        assert!(!p.enabled);
        assert_eq!(p.url, None);
        assert_eq!(p.reload, Duration::from_secs(5));
        assert_eq!(p.connect_timeout, Duration::from_secs(5));
        assert_eq!(p.query_timeout, Duration::from_secs(10));
        assert_eq!(p.channel, "edgeproxy_backends");
        assert!(p.install_trigger);
        assert_eq!(p.max_connections, 10);
    }

    #[test]
    fn the_originals_variables_override_the_file() {
        let env = [
            ("EDGEPROXY_POSTGRES_ENABLED", "true"),
            ("EDGEPROXY_POSTGRES_URL", URL),
            ("EDGEPROXY_POSTGRES_MAX_CONNECTIONS", "4"),
            ("EDGEPROXY_POSTGRES_MIN_CONNECTIONS", "1"),
            ("EDGEPROXY_POSTGRES_RELOAD_SECS", "2"),
            ("EDGEPROXY_POSTGRES_CONNECT_TIMEOUT_SECS", "3"),
            ("EDGEPROXY_POSTGRES_QUERY_TIMEOUT_SECS", "4"),
        ];
        let p = pg(
            "[postgres]\nenabled = false\nurl = \"host=db\"\nreload_secs = 60\n",
            &env,
        )
        .unwrap();
        assert!(p.enabled);
        assert_eq!(
            p.url.unwrap().redacted(),
            "postgres://ep:****@127.0.0.1:5432/routing"
        );
        assert_eq!(p.reload, Duration::from_secs(2));
        assert_eq!(p.connect_timeout, Duration::from_secs(3));
        assert_eq!(p.query_timeout, Duration::from_secs(4));
        assert_eq!(p.max_connections, 4);
    }

    #[test]
    fn bad_values_are_named_and_passwords_never_shown() {
        for (text, key) in [
            ("[postgres]\nenabled = true\n", "postgres.url"),
            (
                "[postgres]\nurl = \"postgres://h:notaport/db\"\n",
                "postgres.url",
            ),
            ("[postgres]\nreload_secs = 0\n", "postgres.reload_secs"),
            (
                "[postgres]\nquery_timeout_secs = 301\n",
                "postgres.query_timeout_secs",
            ),
            ("[postgres]\nchannel = \"Bad-Name\"\n", "postgres.channel"),
            (
                "[postgres]\nenabled = true\nurl = \"host=db\"\nca_file = \"/nonexistent.pem\"\n",
                "postgres.ca_file",
            ),
            ("[postgres]\nhost = \"db\"\n", "host"),
        ] {
            let err = pg(text, &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let err = pg(
            "",
            &[("EDGEPROXY_POSTGRES_URL", "postgres://u:hunter2@h:99999/db")],
        )
        .unwrap_err();
        assert!(err.to_string().contains("EDGEPROXY_POSTGRES_URL"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = pg("", &[("EDGEPROXY_POSTGRES_MAX_CONNECTIONS", "0")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("EDGEPROXY_POSTGRES_MAX_CONNECTIONS"),
            "{err}"
        );
    }

    #[test]
    fn libpq_verify_modes_mean_require_here() {
        let u = DbUrl::parse("host=db sslmode=verify-full").unwrap();
        assert_eq!(
            u.config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let u = DbUrl::parse("postgres://db/x?sslmode=verify-ca").unwrap();
        assert_eq!(
            u.config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn redaction_covers_both_syntaxes() {
        assert_eq!(
            redact("postgres://u:p@ss@h/db?sslmode=require"),
            "postgres://u:****@h/db?sslmode=require"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("host=h password=secret user=u"),
            "host=h password=**** user=u"
        );
        assert_eq!(
            redact("postgres://h/db?password=secret&sslmode=require"),
            "postgres://h/db?password=****&sslmode=require"
        );
    }

    #[test]
    fn writers_of_routing_db_are_refused_next_to_postgres() {
        let base = format!("[postgres]\nenabled = true\nurl = \"{URL}\"\n");
        pg(&base, &NO_ENV).unwrap();
        let err = pg(&format!("{base}[api]\nenabled = true\n"), &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("api.enabled"), "{err}");
        let err = pg(&format!("{base}[demo]\nbackends = 1\n"), &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("demo.backends"), "{err}");
        let err = pg(
            &format!("{base}[replication]\nenabled = true\ninsecure = true\n"),
            &NO_ENV,
        )
        .unwrap_err();
        assert!(err.to_string().contains("replication.enabled"), "{err}");
    }

    #[test]
    fn check_config_renders_no_password() {
        let raw = crate::config::parse_toml(
            Path::new("t.toml"),
            &format!("[postgres]\nenabled = true\nurl = \"{URL}\"\n"),
        )
        .unwrap();
        let text = Config::from_raw(raw, &NO_ENV).unwrap().to_toml();
        assert!(text.contains("[postgres]"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
