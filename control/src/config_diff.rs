//! What a SIGHUP changes, key by key.
//!
//! Some settings apply at once (listeners, `[limits]`, `[affinity]`,
//! `routing.reload_interval_ms`, `log.access`, `health.rtt_weight`, `[pool]`, the
//! per-client `[rate_limit]` except `tracked_clients`); the rest need a
//! restart.
//! [`split`] takes the *running* configuration and the new file and returns
//! the configuration to run from now on — the new one, with every
//! restart-only setting kept as it runs — plus each restart-only key that
//! differs, old → new. Comparing with what runs (not with the previous
//! file) means a change that is reverted before a restart warns no more, and
//! one left in place warns at every SIGHUP until the restart.
//!
//! Keys are compared as their TOML values (the `check-config` rendering), so
//! a change reads as the operator wrote it: `pop.region: "sa" → "eu"`.

use std::fmt;

use serde::Serialize;

use crate::config::Config;

/// One key whose value differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Dotted path, `dns.ttl_secs`.
    pub key: String,
    /// TOML text of the value, or `(unset)`, or `(hidden)` for secrets.
    pub old: String,
    pub new: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} → {}", self.key, self.old, self.new)
    }
}

/// Changes joined for one log field: `a: 1 → 2, b: x → y`.
pub fn joined(changes: &[Change]) -> String {
    changes
        .iter()
        .map(Change::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The keys of `old` and `new` (serialized alike) that differ, under
/// `prefix`. Tables are compared key by key; anything else whole.
pub fn diff<T: Serialize + ?Sized>(prefix: &str, old: &T, new: &T) -> Vec<Change> {
    let (Ok(old), Ok(new)) = (toml::Value::try_from(old), toml::Value::try_from(new)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk(prefix, Some(&old), Some(&new), &mut out);
    out
}

fn walk(key: &str, old: Option<&toml::Value>, new: Option<&toml::Value>, out: &mut Vec<Change>) {
    match (old, new) {
        (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                walk(&path, a.get(k), b.get(k), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(Change {
            key: key.to_string(),
            old: a.map_or_else(|| "(unset)".to_string(), render),
            new: b.map_or_else(|| "(unset)".to_string(), render),
        }),
    }
}

fn render(v: &toml::Value) -> String {
    v.to_string()
}

/// A secret's change, its values hidden: `(hidden)` or `(unset)`.
fn hidden_change<T: PartialEq>(key: String, old: &Option<T>, new: &Option<T>) -> Option<Change> {
    let shown = |v: &Option<T>| if v.is_some() { "(hidden)" } else { "(unset)" }.to_string();
    (old != new).then(|| Change {
        key,
        old: shown(old),
        new: shown(new),
    })
}

/// The configuration to run after a SIGHUP and the restart-only keys the
/// new file changes (see the module docs). `running` is what runs now.
pub fn split(running: &Config, new: &Config) -> (Config, Vec<Change>) {
    let mut next = new.clone();
    let mut changes = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:ident).+) => {
            changes.extend(diff($key, &running.$($field).+, &new.$($field).+));
            next.$($field).+ = running.$($field).+.clone();
        };
    }
    keep!("runtime", runtime);
    keep!("routing.db_path", routing.db_path);
    keep!("geo", geo);
    keep!("pop", pop);
    keep!("demo", demo);
    keep!("log.level", log.level);
    keep!("log.format", log.format);
    keep!("log.summary_interval_secs", log.summary_interval);
    keep!("metrics", metrics);
    keep!("dns", dns);
    keep!("replication", replication);
    keep!("mesh", mesh);
    keep!("bgp", bgp);
    // Neighbors' TCP MD5 passwords are never serialized either (a new
    // password in the same file is a difference the walk cannot see).
    for (i, (old, new)) in running
        .bgp
        .neighbors
        .iter()
        .zip(&new.bgp.neighbors)
        .enumerate()
    {
        changes.extend(hidden_change(
            format!("bgp.neighbor[{i}].password"),
            &old.password,
            &new.password,
        ));
    }
    // So are the replication secrets: a new secret in the same file, or in
    // the same secret file, is a difference the walk cannot see either.
    let (was, now) = (&running.replication, &new.replication);
    changes.extend(hidden_change(
        "replication.secret".into(),
        &was.secret,
        &now.secret,
    ));
    changes.extend(hidden_change(
        "replication.accept_secret".into(),
        &was.accept_secret,
        &now.accept_secret,
    ));
    keep!("geodns", geodns);
    keep!("upgrade", upgrade);
    keep!("postgres", postgres);
    keep!("circuit_breaker", circuit_breaker);
    keep!("rate_limit.tracked_clients", rate_limit.tracked_clients);
    // Health checks are set up at start; only scoring's RTT weight (a data
    // plane knob) applies at once.
    let mut health = new.health.clone();
    health.rtt_weight = running.health.rtt_weight;
    changes.extend(diff("health", &running.health, &health));
    next.health = running.health.clone();
    next.health.rtt_weight = new.health.rtt_weight;
    // The API's tokens are never serialized: a change there is a
    // difference the key-by-key walk cannot see.
    changes.extend(diff("api", &running.api, &new.api));
    changes.extend(hidden_change(
        "api.token".into(),
        &running.api.token,
        &new.api.token,
    ));
    changes.extend(hidden_change(
        "api.accept_token".into(),
        &running.api.accept_token,
        &new.api.accept_token,
    ));
    next.api = running.api.clone();
    (next, changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::Config::from_raw(toml::from_str(text).unwrap(), &[("X", "")]).unwrap()
    }

    #[test]
    fn restart_only_keys_are_named_with_old_and_new_values() {
        let running =
            config("[pop]\nregion = \"sa\"\n[dns]\nttl_secs = 5\n[limits]\nmax_connections = 2\n");
        let new =
            config("[pop]\nregion = \"eu\"\n[dns]\nttl_secs = 30\n[limits]\nmax_connections = 4\n");
        let (next, changes) = split(&running, &new);
        let text: Vec<String> = changes.iter().map(Change::to_string).collect();
        assert_eq!(
            text,
            [
                "pop.name: \"pop-sa\" → \"pop-eu\"",
                "pop.region: \"sa\" → \"eu\"",
                "dns.ttl_secs: 5 → 30"
            ]
        );
        // What runs next: the restart-only values as they run, the rest new.
        assert_eq!(next.pop.region, "sa");
        assert_eq!(next.dns.ttl_secs, 5);
        assert_eq!(next.limits.max_connections, new.limits.max_connections);
    }

    #[test]
    fn a_new_bgp_password_needs_a_restart_and_is_not_shown() {
        let bgp = |pw: &str| {
            config(&format!(
                "[bgp]\nlocal_asn = 65010\nrouter_id = \"10.0.0.2\"\nannounce = [\"10.9.0.0/16\"]\n\
                 [[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 65000\n{pw}"
            ))
        };
        let running = bgp("password = \"old-secret\"");
        let (next, changes) = split(&running, &bgp("password = \"new-secret\""));
        let text = joined(&changes);
        assert_eq!(text, "bgp.neighbor[0].password: (hidden) → (hidden)");
        assert_eq!(next.bgp, running.bgp, "runs on with the old password");
        let (_, changes) = split(&bgp(""), &bgp("password = \"new-secret\""));
        assert_eq!(
            joined(&changes),
            "bgp.neighbor[0].password: (unset) → (hidden)"
        );
        assert!(split(&running, &running.clone()).1.is_empty());
    }

    /// QA, 2026-12-07: a new replication secret written over the old one
    /// and a SIGHUP said nothing, though it applies only at a restart.
    #[test]
    fn a_new_replication_secret_needs_a_restart_and_is_not_shown() {
        let replication = |more: &str| {
            config(&format!(
                "[replication]\nenabled = true\nnode_id = \"a\"\n\
                 secret = \"the-old-secret-0123456789\"\n{more}"
            ))
        };
        let running = replication("");
        let rotated = config(
            "[replication]\nenabled = true\nnode_id = \"a\"\n\
             secret = \"the-new-secret-0123456789\"\n\
             accept_secret = \"the-old-secret-0123456789\"\n",
        );
        let (next, changes) = split(&running, &rotated);
        assert_eq!(
            joined(&changes),
            "replication.secret: (hidden) → (hidden), \
             replication.accept_secret: (unset) → (hidden)"
        );
        assert_eq!(next.replication, running.replication, "runs on as it was");
        let (_, changes) = split(&running, &replication(""));
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn health_needs_a_restart_except_the_rtt_weight() {
        let running =
            config("[health]\ninterval_ms = 5000\nrtt_weight = 0.0\n[rate_limit]\nburst = 5\n");
        let new =
            config("[health]\ninterval_ms = 2000\nrtt_weight = 0.5\n[rate_limit]\nburst = 9\n");
        let (next, changes) = split(&running, &new);
        assert_eq!(joined(&changes), "health.interval_ms: 5000 → 2000");
        assert_eq!(next.health.global, running.health.global);
        assert_eq!(next.health.rtt_weight, 0.5);
        assert_eq!(next.rate_limit.burst, 9);
    }

    #[test]
    fn a_reverted_change_warns_no_more() {
        let running = config("[log]\nlevel = \"info\"\n");
        let changed = config("[log]\nlevel = \"debug\"\n");
        let (next, changes) = split(&running, &changed);
        assert_eq!(joined(&changes), "log.level: \"info\" → \"debug\"");
        // Still running at info; the file goes back to info: nothing to say.
        let (_, changes) = split(&next, &running);
        assert!(changes.is_empty(), "{changes:?}");
        // Left in place, it is said again at the next SIGHUP.
        let (_, changes) = split(&next, &changed);
        assert_eq!(changes.len(), 1);
    }

    #[test]
    fn settings_applied_at_once_are_not_restart_only() {
        let running = config("[log]\naccess = false\n[affinity]\nttl_secs = 1\n");
        let new = config("[log]\naccess = true\n[affinity]\nttl_secs = 2\n[[listener]]\naddr = \"127.0.0.1:1\"\n");
        let (next, changes) = split(&running, &new);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(next, new);
    }

    #[test]
    fn a_token_change_is_named_without_the_token() {
        let running = config("[api]\ntoken = \"aaaaaaaaaaaaaaaaaaaa\"\n");
        let new = config("[api]\ntoken = \"bbbbbbbbbbbbbbbbbbbb\"\n");
        let (_, changes) = split(&running, &new);
        assert_eq!(joined(&changes), "api.token: (hidden) → (hidden)");
        let rotating = config(
            "[api]\ntoken = \"aaaaaaaaaaaaaaaaaaaa\"\naccept_token = \"cccccccccccccccccccc\"\n",
        );
        let (_, changes) = split(&running, &rotating);
        assert_eq!(joined(&changes), "api.accept_token: (unset) → (hidden)");
    }

    #[test]
    fn added_and_removed_keys_read_as_unset() {
        let changes = diff("geo", &toml::toml! { a = 1 }, &toml::toml! { b = "x" });
        assert_eq!(
            joined(&changes),
            "geo.a: 1 → (unset), geo.b: (unset) → \"x\""
        );
    }
}
