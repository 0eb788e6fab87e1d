//! `[pool]`: warm backend connections (see `engine::pool`), with the
//! original edgeProxy's `EDGEPROXY_POOL_*` variables over the file.
//!
//! Off by default. Turned on without further settings it keeps, on each
//! shard, up to 10 pre-connected sockets to every backend outside this
//! POP's region (one at first, more while clients find none), closes them
//! after 60 s unused or 5 minutes of age, and connects with a 5 s timeout:
//! the original's documented defaults.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_env::{env_bool, env_parse, invalid, ser_ms, ser_secs, ConfigError, Env};

pub mod defaults {
    pub const MAX_PER_BACKEND: u32 = 10;
    pub const IDLE_TIMEOUT_SECS: u64 = 60;
    pub const MAX_LIFETIME_SECS: u64 = 300;
    pub const CONNECT_TIMEOUT_MS: u64 = 5000;
    /// With `warm = "rtt"` and no `min_rtt_ms`: a backend farther than a
    /// metro area.
    pub const MIN_RTT_MS: u32 = 20;
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub enabled: Option<bool>,
    pub max_per_backend: Option<u32>,
    pub idle_timeout_secs: Option<u64>,
    pub max_lifetime_secs: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub warm: Option<String>,
    pub min_rtt_ms: Option<u32>,
    pub apps: Option<Vec<String>>,
    pub speaks_first: Option<String>,
}

/// Which backends get warm connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Warm {
    /// Backends outside this POP's region (the default).
    Remote,
    /// Every backend.
    All,
    /// Backends whose health-check RTT is at least `min_rtt_ms` (needs
    /// active health checks: an unmeasured backend is not warmed).
    Rtt,
}

/// What to do with a backend that sends bytes on a pooled socket before any
/// client did (SMTP, SSH, MySQL, FTP greet first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpeaksFirst {
    /// Stop pooling it (the default): its greeting would start its login
    /// timer before any client exists.
    Exclude,
    /// Keep pooling it: the greeting waits in the socket and is the first
    /// thing the client that takes it reads.
    Keep,
}

/// The effective `[pool]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pool {
    pub enabled: bool,
    /// Idle pooled sockets per backend, per shard, at most (1..=1000).
    pub max_per_backend: u32,
    /// A pooled socket unused this long is closed and its backend's pool
    /// shrinks by one (never below one).
    #[serde(rename = "idle_timeout_secs", serialize_with = "ser_secs")]
    pub idle_timeout: Duration,
    /// A pooled socket is replaced at this age.
    #[serde(rename = "max_lifetime_secs", serialize_with = "ser_secs")]
    pub max_lifetime: Duration,
    /// How long a background connect may take.
    #[serde(rename = "connect_timeout_ms", serialize_with = "ser_ms")]
    pub connect_timeout: Duration,
    pub warm: Warm,
    /// With `warm = "rtt"`: the threshold, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_rtt_ms: Option<u32>,
    /// Only these apps' backends; empty = every app.
    pub apps: Vec<String>,
    pub speaks_first: SpeaksFirst,
}

impl Pool {
    /// The data plane's policy, `None` when the pool is off.
    pub fn policy(&self) -> Option<engine::pool::Policy> {
        use engine::pool;
        self.enabled.then(|| pool::Policy {
            max_per_backend: self.max_per_backend,
            idle_timeout: self.idle_timeout,
            max_lifetime: self.max_lifetime,
            connect_timeout: self.connect_timeout,
            warm: match self.warm {
                Warm::Remote => pool::Warm::Remote,
                Warm::All => pool::Warm::All,
                Warm::Rtt => pool::Warm::RttAtLeast(
                    self.min_rtt_ms
                        .unwrap_or(defaults::MIN_RTT_MS)
                        .saturating_mul(1000),
                ),
            },
            apps: self.apps.iter().map(|a| Arc::from(a.as_str())).collect(),
            speaks_first: match self.speaks_first {
                SpeaksFirst::Exclude => pool::SpeaksFirst::Exclude,
                SpeaksFirst::Keep => pool::SpeaksFirst::Keep,
            },
            // Bounded by the descriptors set aside for it: see
            // `crate::fd_limit::pool_policy`, which every caller goes through.
            max_sockets: u32::MAX,
        })
    }
}

/// A duration in seconds from `var` (the original's unit) or the file's
/// `key`, within `1..=max` seconds.
fn secs(
    env: &dyn Env,
    var: &'static str,
    file: Option<u64>,
    key: &str,
    default: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
    let value = env_parse::<u64>(env, var)?.or(file).unwrap_or(default);
    if !(1..=max).contains(&value) {
        return Err(invalid(
            key,
            format!("{value} is out of range: must be between 1 and {max} seconds"),
        ));
    }
    Ok(Duration::from_secs(value))
}

pub(crate) fn from_raw(raw: RawPool, env: &dyn Env) -> Result<Pool, ConfigError> {
    let enabled = env_bool(env, "EDGEPROXY_POOL_ENABLED")?
        .or(raw.enabled)
        .unwrap_or(false);
    let max_per_backend = env_parse::<u32>(env, "EDGEPROXY_POOL_MAX_PER_BACKEND")?
        .or(raw.max_per_backend)
        .unwrap_or(defaults::MAX_PER_BACKEND);
    if !(1..=1000).contains(&max_per_backend) {
        return Err(invalid(
            "pool.max_per_backend",
            format!(
                "{max_per_backend} is out of range: must be in 1..=1000 (set enabled = false to turn the pool off)"
            ),
        ));
    }
    let idle_timeout = secs(
        env,
        "EDGEPROXY_POOL_IDLE_TIMEOUT_SECS",
        raw.idle_timeout_secs,
        "pool.idle_timeout_secs",
        defaults::IDLE_TIMEOUT_SECS,
        86_400,
    )?;
    let max_lifetime = secs(
        env,
        "EDGEPROXY_POOL_MAX_LIFETIME_SECS",
        raw.max_lifetime_secs,
        "pool.max_lifetime_secs",
        defaults::MAX_LIFETIME_SECS,
        86_400,
    )?;
    let connect_timeout = match env_parse::<u64>(env, "EDGEPROXY_POOL_CONNECT_TIMEOUT_SECS")? {
        Some(secs) => Duration::from_secs(secs),
        None => Duration::from_millis(
            raw.connect_timeout_ms
                .unwrap_or(defaults::CONNECT_TIMEOUT_MS),
        ),
    };
    if !(Duration::from_millis(1)..=Duration::from_secs(600)).contains(&connect_timeout) {
        return Err(invalid(
            "pool.connect_timeout_ms",
            "must be between 1 ms and 10 minutes",
        ));
    }
    let warm_text = env.var("EDGEPROXY_POOL_WARM").or(raw.warm);
    let warm = match warm_text.as_deref().map(|w| w.trim().to_ascii_lowercase()) {
        None => Warm::Remote,
        Some(w) => match w.as_str() {
            "remote" => Warm::Remote,
            "all" => Warm::All,
            "rtt" => Warm::Rtt,
            _ => {
                return Err(invalid(
                    "pool.warm",
                    format!("{w:?} is not one of \"remote\", \"all\", \"rtt\""),
                ))
            }
        },
    };
    let min_rtt_ms = env_parse::<u32>(env, "EDGEPROXY_POOL_MIN_RTT_MS")?.or(raw.min_rtt_ms);
    match (warm, min_rtt_ms) {
        (Warm::Rtt, None) => {}
        (Warm::Rtt, Some(ms)) if (1..=60_000).contains(&ms) => {}
        (Warm::Rtt, Some(ms)) => {
            return Err(invalid(
                "pool.min_rtt_ms",
                format!("{ms} is out of range: must be in 1..=60000"),
            ))
        }
        (_, Some(_)) => {
            return Err(invalid(
                "pool.min_rtt_ms",
                "applies only with warm = \"rtt\"",
            ))
        }
        (_, None) => {}
    }
    let apps: Vec<String> = match env.var("EDGEPROXY_POOL_APPS") {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect(),
        None => raw.apps.unwrap_or_default(),
    };
    for (i, a) in apps.iter().enumerate() {
        if a.trim().is_empty() {
            return Err(invalid(
                format!("pool.apps[{i}]"),
                "must not be empty (omit `apps` to warm every app's backends)",
            ));
        }
    }
    let speaks_first = match raw
        .speaks_first
        .as_deref()
        .map(|s| s.trim().to_ascii_lowercase())
    {
        None => SpeaksFirst::Exclude,
        Some(s) => match s.as_str() {
            "exclude" => SpeaksFirst::Exclude,
            "keep" => SpeaksFirst::Keep,
            _ => {
                return Err(invalid(
                    "pool.speaks_first",
                    format!("{s:?} is not one of \"exclude\", \"keep\""),
                ))
            }
        },
    };
    Ok(Pool {
        enabled,
        max_per_backend,
        idle_timeout,
        max_lifetime,
        connect_timeout,
        warm,
        min_rtt_ms: min_rtt_ms.or((warm == Warm::Rtt).then_some(defaults::MIN_RTT_MS)),
        apps: apps.into_iter().map(|a| a.trim().to_string()).collect(),
        speaks_first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(f: impl FnOnce(&mut RawPool)) -> RawPool {
        let mut r = RawPool::default();
        f(&mut r);
        r
    }

    #[test]
    fn off_by_default_and_enabled_alone_warms_remote_backends_with_the_originals_values() {
        let p = from_raw(RawPool::default(), &[("X", "")]).unwrap();
        assert!(!p.enabled);
        assert_eq!(p.policy(), None);
        let p = from_raw(RawPool::default(), &[("EDGEPROXY_POOL_ENABLED", "true")]).unwrap();
        let policy = p.policy().unwrap();
        assert_eq!(policy, engine::pool::Policy::default());
        assert_eq!(policy.warm, engine::pool::Warm::Remote);
        assert_eq!(policy.max_per_backend, 10);
        assert_eq!(policy.idle_timeout, Duration::from_secs(60));
        assert_eq!(policy.max_lifetime, Duration::from_secs(300));
        assert_eq!(policy.connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn the_originals_variables_override_the_file() {
        let p = from_raw(
            raw(|r| {
                r.enabled = Some(false);
                r.max_per_backend = Some(3);
                r.idle_timeout_secs = Some(5);
            }),
            &[
                ("EDGEPROXY_POOL_ENABLED", "1"),
                ("EDGEPROXY_POOL_MAX_PER_BACKEND", "4"),
                ("EDGEPROXY_POOL_IDLE_TIMEOUT_SECS", "7"),
                ("EDGEPROXY_POOL_MAX_LIFETIME_SECS", "30"),
                ("EDGEPROXY_POOL_CONNECT_TIMEOUT_SECS", "2"),
                ("EDGEPROXY_POOL_APPS", "web, api"),
                ("EDGEPROXY_POOL_WARM", "all"),
            ],
        )
        .unwrap();
        assert!(p.enabled);
        assert_eq!(p.max_per_backend, 4);
        assert_eq!(p.idle_timeout, Duration::from_secs(7));
        assert_eq!(p.max_lifetime, Duration::from_secs(30));
        assert_eq!(p.connect_timeout, Duration::from_secs(2));
        assert_eq!(p.apps, ["web", "api"]);
        assert_eq!(p.warm, Warm::All);
    }

    #[test]
    fn rtt_warming_takes_a_threshold_in_milliseconds() {
        let p = from_raw(
            raw(|r| {
                r.enabled = Some(true);
                r.warm = Some("rtt".into());
                r.min_rtt_ms = Some(40);
            }),
            &[("X", "")],
        )
        .unwrap();
        assert_eq!(
            p.policy().unwrap().warm,
            engine::pool::Warm::RttAtLeast(40_000)
        );
        let p = from_raw(raw(|r| r.warm = Some("RTT".into())), &[("X", "")]).unwrap();
        assert_eq!(p.min_rtt_ms, Some(defaults::MIN_RTT_MS));
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let cases: Vec<(RawPool, &str)> = vec![
            (raw(|r| r.max_per_backend = Some(0)), "pool.max_per_backend"),
            (
                raw(|r| r.max_per_backend = Some(1001)),
                "pool.max_per_backend",
            ),
            (
                raw(|r| r.idle_timeout_secs = Some(0)),
                "pool.idle_timeout_secs",
            ),
            (
                raw(|r| r.max_lifetime_secs = Some(0)),
                "pool.max_lifetime_secs",
            ),
            (
                raw(|r| r.connect_timeout_ms = Some(0)),
                "pool.connect_timeout_ms",
            ),
            (raw(|r| r.warm = Some("far".into())), "pool.warm"),
            (raw(|r| r.min_rtt_ms = Some(10)), "pool.min_rtt_ms"),
            (
                raw(|r| {
                    r.warm = Some("rtt".into());
                    r.min_rtt_ms = Some(0);
                }),
                "pool.min_rtt_ms",
            ),
            (raw(|r| r.apps = Some(vec![" ".into()])), "pool.apps[0]"),
            (
                raw(|r| r.speaks_first = Some("drop".into())),
                "pool.speaks_first",
            ),
        ];
        for (r, key) in cases {
            let err = from_raw(r, &[("X", "")]).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        }
        let err = from_raw(
            RawPool::default(),
            &[("EDGEPROXY_POOL_MAX_PER_BACKEND", "ten")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("EDGEPROXY_POOL_MAX_PER_BACKEND"), "{err}");
    }
}
