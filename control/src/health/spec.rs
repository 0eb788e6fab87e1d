//! What one backend's active check is: kind, target, timing, thresholds.
//!
//! Settings come in three layers, each overriding the one before: the global
//! `[health]` section (with the original's `EDGEPROXY_HEALTH_*` variables),
//! `[health.apps.NAME]` for one app, and the `health_check` object a backend
//! sends when it registers through the discovery API. Each layer is a
//! [`CheckOverride`] (every field optional); [`CheckSettings::layered`]
//! resolves them and [`CheckSettings::validate`] checks the bounds.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bounds of the check settings.
pub mod bounds {
    use std::time::Duration;
    pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
    pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
    pub const MIN_TIMEOUT: Duration = Duration::from_millis(10);
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
    pub const MAX_THRESHOLD: u32 = 100;
    pub const MAX_PATH_LEN: usize = 2048;
}

/// How a backend is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect that completes.
    Tcp,
    /// `GET path` over HTTP/1.1; a status in the expected range (2xx and
    /// 3xx by default) and, if set, a body containing `body_contains`.
    Http,
    /// The same over TLS (the certificate is not verified: the check asks
    /// whether the service answers, not who it is, and sends no secret).
    Https,
    /// `grpc.health.v1.Health/Check` for `grpc_service`; SERVING expected.
    Grpc,
    /// `command` run by `/bin/sh -c` with `EDGEPROXY_BACKEND_ADDR`,
    /// `_IP`, `_PORT`, `_ID` and `_APP` in its environment; exit 0 is
    /// healthy; killed at the timeout.
    Script,
}

impl CheckKind {
    pub fn parse(text: &str) -> Option<CheckKind> {
        match text.trim().to_ascii_lowercase().as_str() {
            "tcp" => Some(CheckKind::Tcp),
            "http" => Some(CheckKind::Http),
            "https" => Some(CheckKind::Https),
            "grpc" => Some(CheckKind::Grpc),
            "script" | "exec" => Some(CheckKind::Script),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Https => "https",
            CheckKind::Grpc => "grpc",
            CheckKind::Script => "script",
        }
    }
}

/// One layer of check settings; `None` keeps the layer below.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<CheckKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// `"200-299"`, `"200"` or `"200-399"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Host header / TLS server name; default: the backend's IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// An inclusive range of HTTP status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub low: u16,
    pub high: u16,
}

impl StatusRange {
    /// 2xx and 3xx, as HAProxy's `option httpchk`: a redirect (`/health` →
    /// `/health/`, or to a login page) is an answer from a running server,
    /// and hyper does not follow it. Until 2026-12-06 only 2xx passed, and
    /// a backend that redirected its health URL was taken out.
    pub const DEFAULT: StatusRange = StatusRange {
        low: 200,
        high: 399,
    };

    pub fn parse(text: &str) -> Result<StatusRange, String> {
        let code = |t: &str| -> Result<u16, String> {
            let n: u16 = t
                .trim()
                .parse()
                .map_err(|_| format!("{t:?} is not a status code"))?;
            if (100..=599).contains(&n) {
                Ok(n)
            } else {
                Err(format!("{n} is not between 100 and 599"))
            }
        };
        let (low, high) = match text.split_once('-') {
            Some((a, b)) => (code(a)?, code(b)?),
            None => {
                let n = code(text)?;
                (n, n)
            }
        };
        if low > high {
            return Err(format!("{text:?}: range ends before it starts"));
        }
        Ok(StatusRange { low, high })
    }

    pub fn contains(&self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

impl std::fmt::Display for StatusRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// Resolved settings of one backend's check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckSettings {
    pub enabled: bool,
    pub kind: CheckKind,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend back (rise).
    pub healthy_threshold: u32,
    /// Consecutive failures that take a backend out (fall).
    pub unhealthy_threshold: u32,
    pub expected_status: StatusRange,
    pub body_contains: Option<String>,
    pub grpc_service: String,
    pub command: Option<String>,
    pub host: Option<String>,
}

impl Default for CheckSettings {
    /// The original's defaults.
    fn default() -> Self {
        CheckSettings {
            enabled: false,
            kind: CheckKind::Tcp,
            path: "/health".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expected_status: StatusRange::DEFAULT,
            body_contains: None,
            grpc_service: String::new(),
            command: None,
            host: None,
        }
    }
}

impl CheckSettings {
    /// `self` with `layer` on top. `what` names the layer in errors
    /// (`"health.apps.web"`, `"backend b1's health_check"`).
    pub fn layered(&self, layer: &CheckOverride, what: &str) -> Result<CheckSettings, String> {
        let mut s = self.clone();
        if let Some(v) = layer.enabled {
            s.enabled = v;
        }
        if let Some(v) = layer.kind {
            s.kind = v;
        }
        if let Some(v) = &layer.path {
            s.path = v.clone();
        }
        if let Some(v) = layer.interval_ms {
            s.interval = Duration::from_millis(v);
        }
        if let Some(v) = layer.timeout_ms {
            s.timeout = Duration::from_millis(v);
        }
        if let Some(v) = layer.healthy_threshold {
            s.healthy_threshold = v;
        }
        if let Some(v) = layer.unhealthy_threshold {
            s.unhealthy_threshold = v;
        }
        if let Some(v) = &layer.expected_status {
            s.expected_status =
                StatusRange::parse(v).map_err(|e| format!("{what}.expected_status: {e}"))?;
        }
        if let Some(v) = &layer.body_contains {
            s.body_contains = (!v.is_empty()).then(|| v.clone());
        }
        if let Some(v) = &layer.grpc_service {
            s.grpc_service = v.clone();
        }
        if let Some(v) = &layer.command {
            s.command = (!v.trim().is_empty()).then(|| v.clone());
        }
        if let Some(v) = &layer.host {
            s.host = (!v.is_empty()).then(|| v.clone());
        }
        s.validate().map_err(|e| format!("{what}.{e}"))?;
        Ok(s)
    }

    /// Checks bounds; the error names the key (`"interval_ms: ..."`).
    pub fn validate(&self) -> Result<(), String> {
        if !(bounds::MIN_INTERVAL..=bounds::MAX_INTERVAL).contains(&self.interval) {
            return Err(format!(
                "interval_ms: {} is outside {}..={}",
                self.interval.as_millis(),
                bounds::MIN_INTERVAL.as_millis(),
                bounds::MAX_INTERVAL.as_millis()
            ));
        }
        if !(bounds::MIN_TIMEOUT..=bounds::MAX_TIMEOUT).contains(&self.timeout) {
            return Err(format!(
                "timeout_ms: {} is outside {}..={}",
                self.timeout.as_millis(),
                bounds::MIN_TIMEOUT.as_millis(),
                bounds::MAX_TIMEOUT.as_millis()
            ));
        }
        for (key, v) in [
            ("healthy_threshold", self.healthy_threshold),
            ("unhealthy_threshold", self.unhealthy_threshold),
        ] {
            if !(1..=bounds::MAX_THRESHOLD).contains(&v) {
                return Err(format!(
                    "{key}: {v} is outside 1..={}",
                    bounds::MAX_THRESHOLD
                ));
            }
        }
        if matches!(self.kind, CheckKind::Http | CheckKind::Https) {
            if !self.path.starts_with('/') || self.path.len() > bounds::MAX_PATH_LEN {
                return Err(format!(
                    "path: {:?} must start with '/' and be at most {} bytes",
                    self.path,
                    bounds::MAX_PATH_LEN
                ));
            }
            if self.path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return Err(format!(
                    "path: {:?} contains spaces or control characters",
                    self.path
                ));
            }
        }
        if let Some(host) = &self.host {
            if host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return Err(format!(
                    "host: {host:?} contains spaces or control characters"
                ));
            }
        }
        if self.kind == CheckKind::Script && self.command.is_none() {
            return Err("command: a script check needs a command".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order_and_validate() {
        let global = CheckSettings::default();
        let app = CheckOverride {
            enabled: Some(true),
            kind: Some(CheckKind::Http),
            interval_ms: Some(1000),
            ..Default::default()
        };
        let s = global.layered(&app, "health.apps.web").unwrap();
        assert!(s.enabled);
        assert_eq!(s.kind, CheckKind::Http);
        assert_eq!(s.interval, Duration::from_secs(1));
        assert_eq!(s.timeout, Duration::from_secs(2));
        let backend: CheckOverride =
            serde_json::from_str(r#"{"path": "/ready", "expected_status": "200-204"}"#).unwrap();
        let b = s.layered(&backend, "health_check").unwrap();
        assert_eq!(b.path, "/ready");
        assert!(b.expected_status.contains(204) && !b.expected_status.contains(205));
        assert_eq!(b.kind, CheckKind::Http);
    }

    #[test]
    fn bad_layers_name_the_key() {
        let bad = |o: CheckOverride| CheckSettings::default().layered(&o, "x").unwrap_err();
        assert!(bad(CheckOverride {
            interval_ms: Some(5),
            ..Default::default()
        })
        .starts_with("x.interval_ms"));
        assert!(bad(CheckOverride {
            unhealthy_threshold: Some(0),
            ..Default::default()
        })
        .starts_with("x.unhealthy_threshold"));
        assert!(bad(CheckOverride {
            kind: Some(CheckKind::Script),
            ..Default::default()
        })
        .contains("command"));
        assert!(bad(CheckOverride {
            kind: Some(CheckKind::Http),
            path: Some("health".into()),
            ..Default::default()
        })
        .contains("path"));
        assert!(bad(CheckOverride {
            expected_status: Some("300-200".into()),
            ..Default::default()
        })
        .contains("expected_status"));
        assert!(serde_json::from_str::<CheckOverride>(r#"{"typo": 1}"#).is_err());
        assert!(serde_json::from_str::<CheckOverride>(r#"{"type": "icmp"}"#).is_err());
    }

    #[test]
    fn the_default_range_takes_2xx_and_redirects() {
        let d = CheckSettings::default().expected_status;
        assert!([200, 204, 301, 302, 308, 399]
            .iter()
            .all(|s| d.contains(*s)));
        assert!([199, 400, 404, 500].iter().all(|s| !d.contains(*s)));
        assert_eq!(d.to_string(), "200-399");
    }

    #[test]
    fn status_ranges() {
        assert_eq!(StatusRange::parse("200").unwrap().to_string(), "200");
        assert_eq!(
            StatusRange::parse("200-399").unwrap().to_string(),
            "200-399"
        );
        assert!(StatusRange::parse("99").is_err());
        assert!(StatusRange::parse("abc").is_err());
    }
}
