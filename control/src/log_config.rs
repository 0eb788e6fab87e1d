//! `[log]`: how edgeproxy logs. Parsed like every other section:
//! [`RawLog`] mirrors the file, [`from_raw`] applies the environment,
//! defaults and checks.
//!
//! | key | env | default |
//! |---|---|---|
//! | `level` | `DEBUG=1` means `debug`; `RUST_LOG` wins over both | `info` |
//! | `format` | `EDGEPROXY_LOG_FORMAT` | `text` |
//! | `access` | `EDGEPROXY_LOG_ACCESS` | `false` |
//! | `summary_interval_secs` | `EDGEPROXY_LOG_SUMMARY_INTERVAL_SECS` | `10` (1..=3600) |
//!
//! `access` applies on SIGHUP, the others at start.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_env::{env_bool, env_parse, invalid, ConfigError, Env};

/// The `tracing` target of access-log lines (`engine::access`).
pub use engine::access::TARGET as ACCESS_TARGET;

pub const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
    pub access: Option<bool>,
    pub summary_interval_secs: Option<u64>,
}

/// Default of `summary_interval_secs`.
pub const SUMMARY_INTERVAL_SECS: u64 = 10;

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event: `time LEVEL target: message
    /// key=value ...` (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log shippers: `timestamp`, `level`,
    /// `target`, `message` and every field at the top level.
    Json,
}

impl LogFormat {
    fn parse(text: &str) -> Option<LogFormat> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// The effective `[log]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Log {
    /// One of [`LEVELS`].
    pub level: String,
    pub format: LogFormat,
    /// One info line per connection when it ends (client, listener, app,
    /// backend, bytes each way, duration, how it ended), written even when
    /// `level` is above info.
    pub access: bool,
    /// How often refused connections and backend connect failures are
    /// summed up in one WARN each (`crate::traffic_watch`), when there were
    /// any.
    #[serde(rename = "summary_interval_secs", serialize_with = "ser_secs")]
    pub summary_interval: Duration,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

pub fn from_raw(raw: RawLog, env: &dyn Env) -> Result<Log, ConfigError> {
    // DEBUG=1 (the original's switch) raises the level.
    // Case as `log.format` takes it (QA: "INFO" was refused, "JSON" not).
    let mut level = raw
        .level
        .map_or_else(|| "info".into(), |l| l.trim().to_ascii_lowercase());
    if env_bool(env, "DEBUG")?.unwrap_or(false) {
        level = "debug".into();
    }
    if !LEVELS.contains(&level.as_str()) {
        return Err(invalid(
            "log.level",
            format!("{level:?} is not one of error, warn, info, debug, trace"),
        ));
    }
    let format = match env.var("EDGEPROXY_LOG_FORMAT") {
        Some(value) => LogFormat::parse(&value).ok_or_else(|| ConfigError::Env {
            var: "EDGEPROXY_LOG_FORMAT",
            value: value.clone(),
            reason: "expected text or json".into(),
        })?,
        None => match raw.format {
            None => LogFormat::default(),
            Some(text) => LogFormat::parse(&text).ok_or_else(|| {
                invalid("log.format", format!("{text:?} is not one of text, json"))
            })?,
        },
    };
    let access = env_bool(env, "EDGEPROXY_LOG_ACCESS")?
        .or(raw.access)
        .unwrap_or(false);
    let summary = env_parse::<u64>(env, "EDGEPROXY_LOG_SUMMARY_INTERVAL_SECS")?
        .or(raw.summary_interval_secs)
        .unwrap_or(SUMMARY_INTERVAL_SECS);
    if !(1..=3600).contains(&summary) {
        return Err(invalid(
            "log.summary_interval_secs",
            "must be between 1 s and 1 hour",
        ));
    }
    Ok(Log {
        level,
        format,
        access,
        summary_interval: Duration::from_secs(summary),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &dyn Env) -> Result<Log, ConfigError> {
        from_raw(toml::from_str(text).unwrap(), env)
    }

    const NO_ENV: [(&str, &str); 0] = [];

    #[test]
    fn defaults_are_info_and_text() {
        assert_eq!(
            parse("", &NO_ENV).unwrap(),
            Log {
                level: "info".into(),
                format: LogFormat::Text,
                access: false,
                summary_interval: Duration::from_secs(10),
            }
        );
    }

    #[test]
    fn format_from_file_and_environment() {
        assert_eq!(
            parse("format = \"JSON\"", &NO_ENV).unwrap().format,
            LogFormat::Json
        );
        let env = [("EDGEPROXY_LOG_FORMAT", "json")];
        assert_eq!(
            parse("format = \"text\"", &env).unwrap().format,
            LogFormat::Json
        );
        let err = parse("format = \"xml\"", &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");
        let err = parse("", &[("EDGEPROXY_LOG_FORMAT", "yaml")]).unwrap_err();
        assert!(err.to_string().contains("EDGEPROXY_LOG_FORMAT"), "{err}");
    }

    #[test]
    fn access_log_from_file_and_environment() {
        assert!(parse("access = true", &NO_ENV).unwrap().access);
        assert!(
            !parse("access = true", &[("EDGEPROXY_LOG_ACCESS", "0")])
                .unwrap()
                .access
        );
        assert!(
            parse("", &[("EDGEPROXY_LOG_ACCESS", "yes")])
                .unwrap()
                .access
        );
    }

    #[test]
    fn summary_interval_is_bounded() {
        let l = parse("summary_interval_secs = 1", &NO_ENV).unwrap();
        assert_eq!(l.summary_interval, Duration::from_secs(1));
        for bad in ["summary_interval_secs = 0", "summary_interval_secs = 3601"] {
            let err = parse(bad, &NO_ENV).unwrap_err();
            assert!(
                err.to_string().contains("log.summary_interval_secs"),
                "{err}"
            );
        }
        let env = [("EDGEPROXY_LOG_SUMMARY_INTERVAL_SECS", "30")];
        assert_eq!(parse("", &env).unwrap().summary_interval.as_secs(), 30);
    }

    #[test]
    fn debug_env_raises_the_level_and_bad_levels_are_named() {
        assert_eq!(parse("", &[("DEBUG", "1")]).unwrap().level, "debug");
        let err = parse("level = \"loud\"", &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("log.level"), "{err}");
    }

    /// QA: `level = "INFO"` was refused where `format = "JSON"` was taken.
    #[test]
    fn the_level_is_taken_in_any_case() {
        assert_eq!(parse("level = \"INFO\"", &NO_ENV).unwrap().level, "info");
        assert_eq!(parse("level = \" Warn \"", &NO_ENV).unwrap().level, "warn");
    }
}
