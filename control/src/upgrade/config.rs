//! `[upgrade]`: the hitless binary upgrade's settings.
//!
//! [`RawUpgrade`] mirrors the file; [`from_raw`] applies the environment,
//! defaults and bounds, like every other section (see `crate::config`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_env::{env_parse, invalid, ConfigError, Env};

pub mod defaults {
    /// File name of the control socket, next to `routing.db`.
    pub const CONTROL_SOCKET_NAME: &str = "edgeproxy.sock";
    /// A new binary that is not serving after this long is killed and the
    /// upgrade abandoned. Start-up reads the GeoIP database, the routing
    /// table and certificates: well under a second here, but a loaded host
    /// or a large table takes longer.
    pub const READY_TIMEOUT_SECS: u64 = 30;
}

/// The longest path a Unix socket address holds (`sun_path`, 108 bytes with
/// its terminating zero).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpgrade {
    pub control_socket: Option<PathBuf>,
    pub ready_timeout_secs: Option<u64>,
}

/// The effective `[upgrade]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Upgrade {
    /// Unix socket `edgeproxy upgrade` talks to; `None`: none (SIGUSR2
    /// still upgrades). Env: `EDGEPROXY_UPGRADE_CONTROL_SOCKET` (empty
    /// disables).
    #[serde(serialize_with = "ser_path")]
    pub control_socket: Option<PathBuf>,
    /// How long the new process may take to report ready. Env:
    /// `EDGEPROXY_UPGRADE_READY_TIMEOUT_SECS`.
    #[serde(rename = "ready_timeout_secs", serialize_with = "ser_secs")]
    pub ready_timeout: Duration,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// `None` renders as `""` (which reads back as "disabled").
fn ser_path<S: serde::Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.collect_str(&p.display()),
        None => s.serialize_str(""),
    }
}

/// The default control socket: `edgeproxy.sock` in `routing.db`'s
/// directory, which is per instance (two proxies sharing one routing table
/// share the directory too: the second one then runs without a control
/// socket and says so).
pub fn default_control_socket(db_path: &Path) -> PathBuf {
    let dir = db_path.parent().unwrap_or(Path::new(""));
    dir.join(defaults::CONTROL_SOCKET_NAME)
}

pub(crate) fn from_raw(
    raw: RawUpgrade,
    env: &dyn Env,
    db_path: &Path,
) -> Result<Upgrade, ConfigError> {
    let (path, key) = match env.var("EDGEPROXY_UPGRADE_CONTROL_SOCKET") {
        Some(v) => (PathBuf::from(v), "EDGEPROXY_UPGRADE_CONTROL_SOCKET"),
        None => (
            raw.control_socket
                .unwrap_or_else(|| default_control_socket(db_path)),
            "upgrade.control_socket",
        ),
    };
    let control_socket = match path.as_os_str().is_empty() {
        true => None,
        false => {
            if path.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(invalid(
                    key,
                    format!(
                        "{} is longer than a Unix socket path may be ({MAX_SOCKET_PATH} bytes)",
                        path.display()
                    ),
                ));
            }
            Some(path)
        }
    };
    let secs = env_parse::<u64>(env, "EDGEPROXY_UPGRADE_READY_TIMEOUT_SECS")?
        .or(raw.ready_timeout_secs)
        .unwrap_or(defaults::READY_TIMEOUT_SECS);
    if !(1..=600).contains(&secs) {
        return Err(invalid(
            "upgrade.ready_timeout_secs",
            "must be between 1 and 600 seconds",
        ));
    }
    Ok(Upgrade {
        control_socket,
        ready_timeout: Duration::from_secs(secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const NO_ENV: [(&str, &str); 0] = [];

    fn upgrade(text: &str, env: &dyn Env) -> Result<Upgrade, ConfigError> {
        let raw = crate::config::parse_toml(Path::new("t.toml"), text)?;
        Config::from_raw(raw, env).map(|c| c.upgrade)
    }

    #[test]
    fn defaults_put_the_control_socket_next_to_routing_db() {
        let u = upgrade("[routing]\ndb_path = \"/var/lib/ep/routing.db\"\n", &NO_ENV).unwrap();
        assert_eq!(
            u.control_socket,
            Some(PathBuf::from("/var/lib/ep/edgeproxy.sock"))
        );
        assert_eq!(u.ready_timeout, Duration::from_secs(30));
        let u = upgrade("", &NO_ENV).unwrap();
        assert_eq!(u.control_socket, Some(PathBuf::from("edgeproxy.sock")));
    }

    #[test]
    fn env_overrides_and_empty_disables() {
        let text = "[upgrade]\ncontrol_socket = \"/run/a.sock\"\nready_timeout_secs = 5\n";
        let u = upgrade(text, &NO_ENV).unwrap();
        assert_eq!(u.control_socket, Some(PathBuf::from("/run/a.sock")));
        assert_eq!(u.ready_timeout, Duration::from_secs(5));
        let env = [
            ("EDGEPROXY_UPGRADE_CONTROL_SOCKET", ""),
            ("EDGEPROXY_UPGRADE_READY_TIMEOUT_SECS", "9"),
        ];
        let u = upgrade(text, &env).unwrap();
        assert_eq!(u.control_socket, None);
        assert_eq!(u.ready_timeout, Duration::from_secs(9));
        let u = upgrade("[upgrade]\ncontrol_socket = \"\"\n", &NO_ENV).unwrap();
        assert_eq!(u.control_socket, None);
    }

    #[test]
    fn bounds_are_enforced_and_named() {
        for (text, key) in [
            (
                "[upgrade]\nready_timeout_secs = 0\n",
                "upgrade.ready_timeout_secs",
            ),
            (
                "[upgrade]\nready_timeout_secs = 601\n",
                "upgrade.ready_timeout_secs",
            ),
            ("[upgrade]\ntimeout = 1\n", "timeout"),
        ] {
            let err = upgrade(text, &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let long = format!("[upgrade]\ncontrol_socket = \"/{}\"\n", "x".repeat(120));
        let err = upgrade(&long, &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("upgrade.control_socket"), "{err}");
        let err = upgrade("", &[("EDGEPROXY_UPGRADE_READY_TIMEOUT_SECS", "soon")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("EDGEPROXY_UPGRADE_READY_TIMEOUT_SECS"),
            "{err}"
        );
    }

    #[test]
    fn the_section_renders_back_to_an_equal_config() {
        for text in [
            "[upgrade]\nready_timeout_secs = 7\n",
            "[upgrade]\ncontrol_socket = \"\"\n",
        ] {
            let raw = crate::config::parse_toml(Path::new("t.toml"), text).unwrap();
            let c = Config::from_raw(raw, &NO_ENV).unwrap();
            let again = crate::config::parse_toml(Path::new("t.toml"), &c.to_toml()).unwrap();
            let again = Config::from_raw(again, &NO_ENV).unwrap();
            assert_eq!(again.upgrade, c.upgrade);
        }
    }
}
