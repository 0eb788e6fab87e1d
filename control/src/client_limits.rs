//! `[rate_limit]`: per-client limits on new connections, applied by each
//! shard (see `engine::rate_limit`), with the original's
//! `EDGEPROXY_RATE_LIMIT_*` variables over the file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_env::{env_bool, env_parse, invalid, ser_ms, ConfigError, Env};

pub mod defaults {
    pub const MAX_REQUESTS: u32 = 100;
    pub const WINDOW_SECS: u64 = 1;
    pub const BURST: u32 = 10;
    pub const TRACKED_CLIENTS: usize = 16_384;
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub enabled: Option<bool>,
    pub max_requests: Option<u32>,
    pub window_ms: Option<u64>,
    pub burst: Option<u32>,
    pub max_connections_per_client: Option<u32>,
    pub tracked_clients: Option<usize>,
}

/// The effective `[rate_limit]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimit {
    /// Token bucket of new connections per client IP.
    pub enabled: bool,
    /// New connections per `window` a client may open, sustained.
    pub max_requests: u32,
    #[serde(rename = "window_ms", serialize_with = "ser_ms")]
    pub window: Duration,
    /// New connections a client may open at once (bucket size).
    pub burst: u32,
    /// Connections one client IP may hold open (per shard); 0 = no cap.
    pub max_connections_per_client: u32,
    /// Client IPs each shard tracks at once (bounded memory).
    pub tracked_clients: usize,
}

impl RateLimit {
    /// The data plane's form of these limits.
    pub fn client_limits(&self) -> engine::rate_limit::ClientLimits {
        engine::rate_limit::ClientLimits {
            rate_enabled: self.enabled,
            per_sec: f64::from(self.max_requests) / self.window.as_secs_f64(),
            burst: self.burst,
            max_concurrent: self.max_connections_per_client,
        }
    }
}

pub(crate) fn from_raw(raw: RawRateLimit, env: &dyn Env) -> Result<RateLimit, ConfigError> {
    let enabled = env_bool(env, "EDGEPROXY_RATE_LIMIT_ENABLED")?
        .or(raw.enabled)
        .unwrap_or(false);
    let max_requests = env_parse::<u32>(env, "EDGEPROXY_RATE_LIMIT_MAX_REQUESTS")?
        .or(raw.max_requests)
        .unwrap_or(defaults::MAX_REQUESTS);
    if max_requests == 0 {
        return Err(invalid(
            "rate_limit.max_requests",
            "must be at least 1 (set enabled = false to turn the limit off)",
        ));
    }
    let window = match env_parse::<u64>(env, "EDGEPROXY_RATE_LIMIT_WINDOW_SECS")? {
        Some(secs) => Duration::from_secs(secs),
        None => raw.window_ms.map_or(
            Duration::from_secs(defaults::WINDOW_SECS),
            Duration::from_millis,
        ),
    };
    if !(Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&window) {
        return Err(invalid(
            "rate_limit.window_ms",
            "must be between 1 ms and one hour",
        ));
    }
    let burst = env_parse::<u32>(env, "EDGEPROXY_RATE_LIMIT_BURST")?
        .or(raw.burst)
        .unwrap_or(defaults::BURST);
    if burst == 0 {
        return Err(invalid("rate_limit.burst", "must be at least 1"));
    }
    let max_connections_per_client =
        env_parse::<u32>(env, "EDGEPROXY_RATE_LIMIT_MAX_CONNECTIONS_PER_CLIENT")?
            .or(raw.max_connections_per_client)
            .unwrap_or(0);
    let tracked_clients = raw.tracked_clients.unwrap_or(defaults::TRACKED_CLIENTS);
    if !(2..=1 << 24).contains(&tracked_clients) {
        return Err(invalid(
            "rate_limit.tracked_clients",
            "must be between 2 and 16777216",
        ));
    }
    Ok(RateLimit {
        enabled,
        max_requests,
        window,
        burst,
        max_connections_per_client,
        tracked_clients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_env_and_bounds() {
        let r = from_raw(RawRateLimit::default(), &[("X", "")]).unwrap();
        assert!(!r.enabled);
        assert_eq!(
            (r.max_requests, r.window, r.burst),
            (100, Duration::from_secs(1), 10)
        );
        let l = r.client_limits();
        assert_eq!(l.per_sec, 100.0);
        let r = from_raw(
            RawRateLimit {
                window_ms: Some(500),
                ..Default::default()
            },
            &[
                ("EDGEPROXY_RATE_LIMIT_ENABLED", "true"),
                ("EDGEPROXY_RATE_LIMIT_MAX_REQUESTS", "20"),
                ("EDGEPROXY_RATE_LIMIT_BURST", "3"),
            ],
        )
        .unwrap();
        assert!(r.enabled);
        assert_eq!(r.client_limits().per_sec, 40.0);
        assert_eq!(r.burst, 3);
        assert!(from_raw(
            RawRateLimit {
                burst: Some(0),
                ..Default::default()
            },
            &[("X", "")]
        )
        .is_err());
        assert!(from_raw(
            RawRateLimit::default(),
            &[("EDGEPROXY_RATE_LIMIT_WINDOW_SECS", "0")]
        )
        .is_err());
    }
}
