//! `[geodns]`: the public GeoDNS zone answered by the DNS server (see
//! `dns::geodns` for the answers). On when `name` is set (or
//! `EDGEPROXY_GEODNS_NAME`); `EDGEPROXY_GEODNS_TTL_SECS` and
//! `EDGEPROXY_GEODNS_ANSWERS` override the other keys. What it answers
//! for this POP is `[pop] public_addrs` (`EDGEPROXY_POP_PUBLIC_ADDRS`),
//! replicated in the `pops` table.

use serde::{Deserialize, Serialize};

use crate::config_env::{env_parse, invalid, ConfigError, Env};

pub mod defaults {
    /// Answers are cached by resolvers this long: a POP that stops taking
    /// traffic leaves clients' caches within it (plus failure detection).
    pub const TTL_SECS: u32 = 30;
    pub const ANSWERS: usize = 1;
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGeoDns {
    pub name: Option<String>,
    pub ttl_secs: Option<u32>,
    pub answers: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GeoDns {
    /// The zone, lower case, no trailing dot; `None`: GeoDNS is off.
    pub name: Option<String>,
    pub ttl_secs: u32,
    /// POPs per answer, nearest first (1..=16).
    pub answers: usize,
}

impl GeoDns {
    pub fn enabled(&self) -> bool {
        self.name.is_some()
    }
}

/// `dns_enabled` and `internal_domain` are the `[dns]` server's: GeoDNS is
/// answered by it, outside its internal zone.
pub fn from_raw(
    raw: RawGeoDns,
    env: &dyn Env,
    dns_enabled: bool,
    internal_domain: &str,
) -> Result<GeoDns, ConfigError> {
    let name = match env.var("EDGEPROXY_GEODNS_NAME") {
        Some(v) if v.trim().is_empty() => None,
        Some(v) => Some(dns::zone::parse_domain(&v).map_err(|e| ConfigError::Env {
            var: "EDGEPROXY_GEODNS_NAME",
            value: v.clone(),
            reason: e.to_string(),
        })?),
        None => raw
            .name
            .filter(|n| !n.trim().is_empty())
            .map(|n| dns::zone::parse_domain(&n).map_err(|e| invalid("geodns.name", e.to_string())))
            .transpose()?,
    };
    let ttl_secs = env_parse::<u32>(env, "EDGEPROXY_GEODNS_TTL_SECS")?
        .or(raw.ttl_secs)
        .unwrap_or(defaults::TTL_SECS);
    if ttl_secs > 86_400 {
        return Err(invalid(
            "geodns.ttl_secs",
            "must be at most 86400 (one day)",
        ));
    }
    let answers = env_parse::<usize>(env, "EDGEPROXY_GEODNS_ANSWERS")?
        .or(raw.answers)
        .unwrap_or(defaults::ANSWERS);
    if !(1..=dns::geodns::MAX_ANSWERS).contains(&answers) {
        return Err(invalid(
            "geodns.answers",
            format!("must be in 1..={}", dns::geodns::MAX_ANSWERS),
        ));
    }
    if let Some(name) = &name {
        if !dns_enabled {
            return Err(invalid(
                "geodns.name",
                "GeoDNS is answered by the DNS server, which is off: set [dns] enabled = true \
                 (or EDGEPROXY_DNS_ENABLED=true)",
            ));
        }
        let internal = dns::zone::parse_domain(internal_domain)
            .map_err(|e| invalid("dns.domain", e.to_string()))?;
        if internal.zone_of(name) || name.zone_of(&internal) {
            return Err(invalid(
                "geodns.name",
                format!(
                    "{} overlaps the internal zone {}: use a name outside it",
                    name.to_ascii(),
                    internal.to_ascii()
                ),
            ));
        }
    }
    Ok(GeoDns {
        name: name.map(|n| n.to_ascii().trim_end_matches('.').to_string()),
        ttl_secs,
        answers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_toml, Config};
    use std::path::Path;

    fn from(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        Config::from_raw(parse_toml(Path::new("t.toml"), text)?, env)
    }

    const NO_ENV: [(&str, &str); 0] = [];

    #[test]
    fn off_by_default_and_on_with_a_name() {
        let c = from("", &NO_ENV).unwrap();
        assert!(!c.geodns.enabled());
        assert_eq!((c.geodns.ttl_secs, c.geodns.answers), (30, 1));
        let c = from(
            "[dns]\nenabled = true\n[geodns]\nname = \"Edge.Example.COM.\"\nttl_secs = 20\nanswers = 2\n",
            &NO_ENV,
        )
        .unwrap();
        assert_eq!(c.geodns.name.as_deref(), Some("edge.example.com"));
        assert_eq!((c.geodns.ttl_secs, c.geodns.answers), (20, 2));
    }

    #[test]
    fn env_overrides_the_file() {
        let env = [
            ("EDGEPROXY_DNS_ENABLED", "true"),
            ("EDGEPROXY_GEODNS_NAME", "cdn.example.net"),
            ("EDGEPROXY_GEODNS_TTL_SECS", "10"),
            ("EDGEPROXY_GEODNS_ANSWERS", "3"),
            ("EDGEPROXY_POP_PUBLIC_ADDRS", "203.0.113.10, 2001:db8::10"),
        ];
        let c = from("[geodns]\nname = \"edge.example.com\"\n", &env).unwrap();
        assert_eq!(c.geodns.name.as_deref(), Some("cdn.example.net"));
        assert_eq!((c.geodns.ttl_secs, c.geodns.answers), (10, 3));
        assert_eq!(c.pop.public_addrs.len(), 2);
    }

    #[test]
    fn bad_settings_are_named() {
        for (text, key) in [
            ("[geodns]\nname = \"edge.example.com\"\n", "[dns] enabled = true"),
            ("[dns]\nenabled = true\n[geodns]\nname = \"a..b\"\n", "geodns.name"),
            ("[dns]\nenabled = true\n[geodns]\nname = \"edge.internal\"\n", "overlaps"),
            ("[dns]\nenabled = true\ndomain = \"svc.example.com\"\n[geodns]\nname = \"example.com\"\n", "overlaps"),
            ("[dns]\nenabled = true\n[geodns]\nname = \"e.example.com\"\nanswers = 0\n", "geodns.answers"),
            ("[dns]\nenabled = true\n[geodns]\nname = \"e.example.com\"\nttl_secs = 90000\n", "geodns.ttl_secs"),
            ("[geodns]\nzone = \"x\"\n", "zone"),
        ] {
            let err = from(text, &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let err = from("", &[("EDGEPROXY_GEODNS_ANSWERS", "many")]).unwrap_err();
        assert!(
            err.to_string().contains("EDGEPROXY_GEODNS_ANSWERS"),
            "{err}"
        );
    }
}
