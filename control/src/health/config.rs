//! `[health]` (active checks, globally and per app) and `[circuit_breaker]`
//! (passive ejection), with the original's `EDGEPROXY_HEALTH_*` and
//! `EDGEPROXY_CIRCUIT_*` variables over the file. Parsed like every other
//! section: `Raw*` mirrors the file, `*_from_raw` applies the environment,
//! defaults and bounds.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::spec::{CheckKind, CheckOverride, CheckSettings};
use crate::config_env::{env_bool, env_parse, invalid, ser_ms, ConfigError, Env};

/// Defaults and bounds not shared with the check settings.
pub mod defaults {
    /// Checks in flight at once, whatever the number of backends.
    pub const MAX_CONCURRENT: u32 = 256;
    /// Each interval is stretched or shrunk by up to this share, so checks
    /// started together drift apart instead of bursting every interval.
    pub const JITTER_PERCENT: u32 = 10;
    pub const CIRCUIT_FAILURES: u32 = 5;
    pub const CIRCUIT_SUCCESSES: u32 = 3;
    pub const CIRCUIT_TIMEOUT_SECS: u64 = 30;
    pub const CIRCUIT_MAX_TIMEOUT_SECS: u64 = 300;
    pub const MAX_EJECTION_PERCENT: u32 = 50;
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    #[serde(flatten)]
    pub check: CheckOverride,
    pub max_concurrent: Option<u32>,
    pub jitter_percent: Option<u32>,
    pub rtt_weight: Option<f64>,
    pub webhook_url: Option<String>,
    pub allow_backend_commands: Option<bool>,
    #[serde(default)]
    pub apps: BTreeMap<String, CheckOverride>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuit {
    pub enabled: Option<bool>,
    pub failure_threshold: Option<u32>,
    pub success_threshold: Option<u32>,
    pub timeout_ms: Option<u64>,
    pub max_timeout_ms: Option<u64>,
    pub max_ejection_percent: Option<u32>,
}

/// The effective `[health]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    /// The global check settings (`enabled`, `type`, `path`, ...).
    #[serde(flatten, serialize_with = "ser_settings")]
    pub global: CheckSettings,
    pub max_concurrent: u32,
    pub jitter_percent: u32,
    /// Score per millisecond of check RTT (see `engine::select`); 0 = off.
    pub rtt_weight: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// A backend's own `health_check` (registration API, `routing.db`,
    /// replication) may name a `command` to run. Off by default: whoever
    /// may register a backend (or write a row at any POP) would run
    /// commands on every POP as the proxy's user.
    pub allow_backend_commands: bool,
    /// Per-app layers, already validated against the global settings.
    pub apps: BTreeMap<String, CheckOverride>,
}

/// The effective `[circuit_breaker]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Circuit {
    pub enabled: bool,
    /// Consecutive passive failures that open the circuit (eject).
    pub failure_threshold: u32,
    /// Successful probe connections that close it again.
    pub success_threshold: u32,
    /// How long the first ejection lasts; the n-th lasts n times this.
    #[serde(rename = "timeout_ms", serialize_with = "ser_ms")]
    pub timeout: Duration,
    /// Longest ejection, whatever the count.
    #[serde(rename = "max_timeout_ms", serialize_with = "ser_ms")]
    pub max_timeout: Duration,
    /// Share of an app's backends that may be ejected at once (at least
    /// one is always allowed).
    pub max_ejection_percent: u32,
}

impl Health {
    /// Health checking runs at all: globally or for some app.
    pub fn any_enabled(&self) -> bool {
        self.global.enabled || self.apps.values().any(|a| a.enabled == Some(true))
    }

    /// The settings of `app`'s backends (before a backend's own layer).
    pub fn for_app(&self, app: &str) -> CheckSettings {
        match self.apps.get(app) {
            // Validated at load, so layering cannot fail here.
            Some(layer) => self
                .global
                .layered(layer, app)
                .unwrap_or_else(|_| self.global.clone()),
            None => self.global.clone(),
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            global: CheckSettings::default(),
            max_concurrent: defaults::MAX_CONCURRENT,
            jitter_percent: defaults::JITTER_PERCENT,
            rtt_weight: 0.0,
            webhook_url: None,
            allow_backend_commands: false,
            apps: BTreeMap::new(),
        }
    }
}

impl Default for Circuit {
    fn default() -> Self {
        Circuit {
            enabled: false,
            failure_threshold: defaults::CIRCUIT_FAILURES,
            success_threshold: defaults::CIRCUIT_SUCCESSES,
            timeout: Duration::from_secs(defaults::CIRCUIT_TIMEOUT_SECS),
            max_timeout: Duration::from_secs(defaults::CIRCUIT_MAX_TIMEOUT_SECS),
            max_ejection_percent: defaults::MAX_EJECTION_PERCENT,
        }
    }
}

fn ser_settings<S: serde::Serializer>(c: &CheckSettings, s: S) -> Result<S::Ok, S::Error> {
    CheckOverride {
        enabled: Some(c.enabled),
        kind: Some(c.kind),
        path: Some(c.path.clone()),
        interval_ms: Some(c.interval.as_millis() as u64),
        timeout_ms: Some(c.timeout.as_millis() as u64),
        healthy_threshold: Some(c.healthy_threshold),
        unhealthy_threshold: Some(c.unhealthy_threshold),
        expected_status: Some(c.expected_status.to_string()),
        body_contains: c.body_contains.clone(),
        grpc_service: Some(c.grpc_service.clone()),
        command: c.command.clone(),
        host: c.host.clone(),
    }
    .serialize(s)
}

/// Applies the environment, defaults and bounds to `[health]`.
pub(crate) fn health_from_raw(raw: RawHealth, env: &dyn Env) -> Result<Health, ConfigError> {
    let mut layer = raw.check;
    // The original's variables (seconds) override the file's keys.
    if let Some(v) = env_bool(env, "EDGEPROXY_HEALTH_CHECK_ENABLED")? {
        layer.enabled = Some(v);
    }
    if let Some(text) = env.var("EDGEPROXY_HEALTH_CHECK_TYPE") {
        layer.kind = Some(CheckKind::parse(&text).ok_or_else(|| ConfigError::Env {
            var: "EDGEPROXY_HEALTH_CHECK_TYPE",
            value: text.clone(),
            reason: "expected tcp, http, https, grpc or script".into(),
        })?);
    }
    if let Some(path) = env.var("EDGEPROXY_HEALTH_CHECK_PATH") {
        layer.path = Some(path);
    }
    if let Some(secs) = env_parse::<u64>(env, "EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS")? {
        layer.interval_ms = Some(secs.saturating_mul(1000));
    }
    if let Some(secs) = env_parse::<u64>(env, "EDGEPROXY_HEALTH_CHECK_TIMEOUT_SECS")? {
        layer.timeout_ms = Some(secs.saturating_mul(1000));
    }
    if let Some(n) = env_parse::<u32>(env, "EDGEPROXY_HEALTH_HEALTHY_THRESHOLD")? {
        layer.healthy_threshold = Some(n);
    }
    if let Some(n) = env_parse::<u32>(env, "EDGEPROXY_HEALTH_UNHEALTHY_THRESHOLD")? {
        layer.unhealthy_threshold = Some(n);
    }
    let global = CheckSettings::default()
        .layered(&layer, "health")
        .map_err(|e| split_key(&e))?;
    if global.timeout > global.interval {
        // Both values, as either may be the default: `interval_ms = 1000`
        // alone was refused over a timeout_ms the file did not set.
        return Err(invalid(
            "health.timeout_ms",
            format!(
                "{} ms must not be longer than interval_ms ({} ms); set both",
                global.timeout.as_millis(),
                global.interval.as_millis()
            ),
        ));
    }
    for (app, layer) in &raw.apps {
        global
            .layered(layer, &format!("health.apps.{app}"))
            .map_err(|e| split_key(&e))?;
    }
    let max_concurrent = env_parse::<u32>(env, "EDGEPROXY_HEALTH_MAX_CONCURRENT")?
        .or(raw.max_concurrent)
        .unwrap_or(defaults::MAX_CONCURRENT);
    if !(1..=65_536).contains(&max_concurrent) {
        return Err(invalid(
            "health.max_concurrent",
            "must be between 1 and 65536",
        ));
    }
    let jitter_percent = raw.jitter_percent.unwrap_or(defaults::JITTER_PERCENT);
    if jitter_percent > 50 {
        return Err(invalid("health.jitter_percent", "must be between 0 and 50"));
    }
    let rtt_weight = env_parse::<f64>(env, "EDGEPROXY_HEALTH_RTT_WEIGHT")?
        .or(raw.rtt_weight)
        .unwrap_or(0.0);
    if !(0.0..=1000.0).contains(&rtt_weight) {
        return Err(invalid("health.rtt_weight", "must be between 0 and 1000"));
    }
    let webhook_url = env
        .var("EDGEPROXY_HEALTH_WEBHOOK_URL")
        .or(raw.webhook_url)
        .filter(|u| !u.trim().is_empty());
    if let Some(url) = &webhook_url {
        super::webhook::Target::parse(url).map_err(|e| invalid("health.webhook_url", e))?;
    }
    let allow_backend_commands = env_bool(env, "EDGEPROXY_HEALTH_ALLOW_BACKEND_COMMANDS")?
        .or(raw.allow_backend_commands)
        .unwrap_or(false);
    Ok(Health {
        global,
        max_concurrent,
        jitter_percent,
        rtt_weight,
        webhook_url,
        allow_backend_commands,
        apps: raw.apps,
    })
}

/// `"health.interval_ms: reason"` → the `invalid` error for that key.
fn split_key(message: &str) -> ConfigError {
    match message.split_once(": ") {
        Some((key, reason)) => invalid(key, reason),
        None => invalid("health", message),
    }
}

/// Applies the environment, defaults and bounds to `[circuit_breaker]`.
pub(crate) fn circuit_from_raw(raw: RawCircuit, env: &dyn Env) -> Result<Circuit, ConfigError> {
    let d = Circuit::default();
    let enabled = env_bool(env, "EDGEPROXY_CIRCUIT_BREAKER_ENABLED")?
        .or(raw.enabled)
        .unwrap_or(d.enabled);
    let failure_threshold = env_parse::<u32>(env, "EDGEPROXY_CIRCUIT_FAILURE_THRESHOLD")?
        .or(raw.failure_threshold)
        .unwrap_or(d.failure_threshold);
    let success_threshold = env_parse::<u32>(env, "EDGEPROXY_CIRCUIT_SUCCESS_THRESHOLD")?
        .or(raw.success_threshold)
        .unwrap_or(d.success_threshold);
    for (key, v) in [
        ("circuit_breaker.failure_threshold", failure_threshold),
        ("circuit_breaker.success_threshold", success_threshold),
    ] {
        if !(1..=1000).contains(&v) {
            return Err(invalid(key, "must be between 1 and 1000"));
        }
    }
    let timeout = match env_parse::<u64>(env, "EDGEPROXY_CIRCUIT_TIMEOUT_SECS")? {
        Some(secs) => Duration::from_secs(secs),
        None => raw.timeout_ms.map_or(d.timeout, Duration::from_millis),
    };
    if !(Duration::from_millis(100)..=Duration::from_secs(86_400)).contains(&timeout) {
        return Err(invalid(
            "circuit_breaker.timeout_ms",
            "must be between 100 ms and one day",
        ));
    }
    let max_timeout = raw
        .max_timeout_ms
        .map_or(d.max_timeout.max(timeout), Duration::from_millis);
    if max_timeout < timeout || max_timeout > Duration::from_secs(7 * 86_400) {
        return Err(invalid(
            "circuit_breaker.max_timeout_ms",
            "must be at least timeout_ms and at most 7 days",
        ));
    }
    let max_ejection_percent = env_parse::<u32>(env, "EDGEPROXY_CIRCUIT_MAX_EJECTION_PERCENT")?
        .or(raw.max_ejection_percent)
        .unwrap_or(d.max_ejection_percent);
    if max_ejection_percent > 100 {
        return Err(invalid(
            "circuit_breaker.max_ejection_percent",
            "must be between 0 and 100",
        ));
    }
    Ok(Circuit {
        enabled,
        failure_threshold,
        success_threshold,
        timeout,
        max_timeout,
        max_ejection_percent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::StatusRange;

    fn health(toml_text: &str, env: &dyn Env) -> Result<Health, ConfigError> {
        health_from_raw(toml::from_str(toml_text).unwrap(), env)
    }

    /// `interval_ms = 1000` alone is refused over the default timeout
    /// (2000 ms): the error says both values, since the file set only one.
    #[test]
    fn a_timeout_over_the_interval_says_both_values() {
        let err = health("interval_ms = 1000\n", &[("X", "")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("health.timeout_ms"), "{err}");
        assert!(err.contains("2000 ms") && err.contains("1000 ms"), "{err}");
    }

    #[test]
    fn defaults_are_the_originals() {
        let h = health("", &[("X", "")]).unwrap();
        assert!(!h.global.enabled);
        assert_eq!(h.global.kind, CheckKind::Tcp);
        assert_eq!(h.global.path, "/health");
        assert_eq!(h.global.interval, Duration::from_secs(5));
        assert_eq!(h.global.timeout, Duration::from_secs(2));
        assert_eq!(
            (h.global.healthy_threshold, h.global.unhealthy_threshold),
            (2, 3)
        );
        let c = circuit_from_raw(RawCircuit::default(), &[("X", "")]).unwrap();
        assert_eq!(
            (c.enabled, c.failure_threshold, c.success_threshold),
            (false, 5, 3)
        );
        assert_eq!(c.timeout, Duration::from_secs(30));
    }

    #[test]
    fn env_overrides_the_file_in_seconds() {
        let env = [
            ("EDGEPROXY_HEALTH_CHECK_ENABLED", "true"),
            ("EDGEPROXY_HEALTH_CHECK_TYPE", "http"),
            ("EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS", "10"),
            ("EDGEPROXY_HEALTH_UNHEALTHY_THRESHOLD", "4"),
        ];
        let h = health("interval_ms = 300\ntype = \"tcp\"", &env).unwrap();
        assert!(h.global.enabled);
        assert_eq!(h.global.kind, CheckKind::Http);
        assert_eq!(h.global.interval, Duration::from_secs(10));
        assert_eq!(h.global.unhealthy_threshold, 4);
        let c = circuit_from_raw(
            RawCircuit::default(),
            &[
                ("EDGEPROXY_CIRCUIT_BREAKER_ENABLED", "1"),
                ("EDGEPROXY_CIRCUIT_TIMEOUT_SECS", "7"),
            ],
        )
        .unwrap();
        assert!(c.enabled);
        assert_eq!(c.timeout, Duration::from_secs(7));
    }

    #[test]
    fn per_app_layers_and_errors_name_the_key() {
        let h = health(
            "[apps.api]\nenabled = true\ntype = \"grpc\"\ninterval_ms = 500\ntimeout_ms = 200",
            &[("X", "")],
        )
        .unwrap();
        assert!(h.any_enabled());
        let api = h.for_app("api");
        assert_eq!(
            (api.kind, api.interval),
            (CheckKind::Grpc, Duration::from_millis(500))
        );
        assert_eq!(h.for_app("web").kind, CheckKind::Tcp);

        let err = health("[apps.api]\ninterval_ms = 1", &[("X", "")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("health.apps.api.interval_ms"), "{err}");
        let err = health("timeout_ms = 9000", &[("X", "")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("health.timeout_ms"), "{err}");
        let err = health("", &[("EDGEPROXY_HEALTH_CHECK_TYPE", "icmp")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("EDGEPROXY_HEALTH_CHECK_TYPE"), "{err}");
        assert!(circuit_from_raw(
            RawCircuit {
                max_ejection_percent: Some(101),
                ..Default::default()
            },
            &[("X", "")]
        )
        .is_err());
    }

    #[test]
    fn status_range_from_the_file() {
        let h = health("expected_status = \"200-399\"", &[("X", "")]).unwrap();
        assert_eq!(
            h.global.expected_status,
            StatusRange {
                low: 200,
                high: 399
            }
        );
    }
}
