//! What every config section shares: the error type, the environment as a
//! lookup, and the helpers that read `EDGEPROXY_*` variables. A leaf module:
//! `config` and each section's own module (`api::config`, `tls`, ...) import
//! it, and it imports none of them, so sections can live in their own files
//! without import cycles.

use std::path::PathBuf;

/// Everything that can go wrong loading configuration. Each message names the
/// file, key or variable involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    // `cause`, not `source`: the message already includes it, and a
    // `source` would be printed a second time by `{:#}` error chains.
    #[error("cannot read config file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid environment variable {var}={value:?}: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Where a credential (the API token, the cluster secret) can be given: as
/// itself or as a file holding it, in the config file or the environment.
pub(crate) struct CredentialSources {
    /// The config keys: the credential itself, and its file.
    pub key: &'static str,
    pub file_key: &'static str,
    /// The environment variables, the same two.
    pub var: &'static str,
    pub file_var: &'static str,
    /// What an error shows in place of a credential from the environment.
    pub hidden: &'static str,
}

/// A credential and the file it came from. The environment wins over the
/// config file; within one source, the credential itself and a file holding
/// it are exclusive (set both in one place and one would be ignored without
/// a word). `env` and `env_file` are the environment's values, `literal` and
/// `file` the config file's; `parse` checks a credential given as itself,
/// `read` reads a file, each failing with the reason.
#[allow(clippy::too_many_arguments)]
pub(crate) fn credential<T>(
    sources: &CredentialSources,
    env: Option<String>,
    env_file: Option<PathBuf>,
    literal: Option<&str>,
    file: Option<&std::path::Path>,
    parse: impl Fn(&str) -> Result<T, String>,
    read: impl Fn(&std::path::Path) -> Result<T, String>,
) -> Result<(Option<T>, Option<PathBuf>), ConfigError> {
    let s = sources;
    match (env, env_file) {
        (Some(_), Some(_)) => Err(ConfigError::Env {
            var: s.file_var,
            value: "(set)".into(),
            reason: format!("set either {} or {}, not both", s.var, s.file_var),
        }),
        (Some(value), None) => {
            parse(&value)
                .map(|c| (Some(c), None))
                .map_err(|reason| ConfigError::Env {
                    var: s.var,
                    value: s.hidden.into(),
                    reason,
                })
        }
        (None, Some(path)) => match read(&path) {
            Ok(c) => Ok((Some(c), Some(path))),
            Err(reason) => Err(ConfigError::Env {
                var: s.file_var,
                value: path.display().to_string(),
                reason,
            }),
        },
        (None, None) => match (literal, file) {
            (Some(_), Some(_)) => Err(invalid(
                s.key,
                format!("set either {} or {}, not both", s.key, s.file_key),
            )),
            (Some(value), None) => parse(value)
                .map(|c| (Some(c), None))
                .map_err(|reason| invalid(s.key, reason)),
            (None, Some(path)) => read(path)
                .map(|c| (Some(c), Some(path.to_path_buf())))
                .map_err(|reason| invalid(s.file_key, reason)),
            (None, None) => Ok((None, None)),
        },
    }
}

/// The environment, as a lookup function so tests need not touch the process
/// environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

pub(crate) fn env_parse<T: std::str::FromStr>(
    env: &dyn Env,
    var: &'static str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env.var(var) {
        None => Ok(None),
        Some(value) => value
            .trim()
            .parse()
            .map(Some)
            .map_err(|e: T::Err| ConfigError::Env {
                var,
                value,
                reason: e.to_string(),
            }),
    }
}

pub(crate) fn env_bool(env: &dyn Env, var: &'static str) -> Result<Option<bool>, ConfigError> {
    match env.var(var) {
        None => Ok(None),
        Some(value) => match value.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Some(true)),
            "0" | "false" | "no" | "off" | "" => Ok(Some(false)),
            _ => Err(ConfigError::Env {
                var,
                value,
                reason: "expected true/false or 1/0".into(),
            }),
        },
    }
}

// Serializers for `check-config`'s output: durations in the unit their key
// names, addresses and other values as their text form.

pub(crate) fn ser_ms<S: serde::Serializer>(
    d: &std::time::Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

pub(crate) fn ser_secs<S: serde::Serializer>(
    d: &std::time::Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

pub(crate) fn ser_display<T: std::fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

pub(crate) fn ser_display_list<T: std::fmt::Display, S: serde::Serializer>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}
