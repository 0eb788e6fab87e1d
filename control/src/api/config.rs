//! `[api]`: settings of the discovery API (and of heartbeat expiry, which
//! applies whether or not this process serves the API).
//!
//! Parsed like every other section of `crate::config`: [`RawApi`] mirrors the
//! file, [`from_raw`] applies the `EDGEPROXY_*` environment, defaults and
//! bounds. The token (and the second one accepted while clients move to a
//! new one, `accept_token`) is read here, at load, so `check-config` catches
//! a missing or bad token file; neither is ever printed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_env::{
    credential, env_bool, env_parse, invalid, ConfigError, CredentialSources, Env,
};

/// Defaults. Address, TTL and the enable switch are the original's.
pub mod defaults {
    pub const LISTEN_ADDR: &str = "0.0.0.0:8081";
    pub const HEARTBEAT_TTL_SECS: u64 = 60;
    pub const MAX_BODY_BYTES: u64 = 16 * 1024;
    pub const RATE_LIMIT_PER_SEC: u32 = 100;
    pub const RATE_LIMIT_BURST: u32 = 200;
    /// Shortest accepted token, in characters.
    pub const MIN_TOKEN_LEN: usize = 16;
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub enabled: Option<bool>,
    pub listen_addr: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub accept_token: Option<String>,
    pub accept_token_file: Option<PathBuf>,
    pub allow_open: Option<bool>,
    pub heartbeat_ttl_secs: Option<u64>,
    pub max_body_bytes: Option<u64>,
    pub rate_limit_per_sec: Option<u32>,
    pub rate_limit_burst: Option<u32>,
}

/// The effective `[api]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Api {
    /// Serve the API. Env: `EDGEPROXY_API_ENABLED`.
    pub enabled: bool,
    /// Address asked for. Without a token (and without `allow_open`) the API
    /// binds the loopback address of the same family instead, see
    /// [`Api::bind_plan`]. Env: `EDGEPROXY_API_LISTEN_ADDR`.
    pub listen_addr: SocketAddr,
    /// Bearer token every endpoint but `GET /health` requires. Never
    /// serialized: `check-config` must not print secrets.
    #[serde(skip)]
    pub token: Option<ApiToken>,
    /// Where the token came from, when it was a file.
    pub token_file: Option<PathBuf>,
    /// A second token accepted as well, while clients move to a new one
    /// (README, "Rotating the API token"). Never serialized.
    #[serde(skip)]
    pub accept_token: Option<ApiToken>,
    pub accept_token_file: Option<PathBuf>,
    /// Serve without a token on a non-loopback address (explicit opt-in).
    pub allow_open: bool,
    /// A registered backend whose last heartbeat is this old takes no new
    /// connections. Env: `EDGEPROXY_HEARTBEAT_TTL_SECS`.
    #[serde(rename = "heartbeat_ttl_secs", serialize_with = "ser_secs")]
    pub heartbeat_ttl: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Requests per second per client IP (token bucket refill); 0 = no limit.
    pub rate_limit_per_sec: u32,
    /// Requests a client IP may send at once before the rate applies.
    pub rate_limit_burst: u32,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// The API token. Its `Debug` does not show it; comparison with a presented
/// token takes the same time wherever they differ.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    /// Checks the token's shape: at least [`defaults::MIN_TOKEN_LEN`]
    /// printable ASCII characters, no spaces (it travels in a header).
    pub fn new(token: &str) -> Result<ApiToken, String> {
        let token = token.trim();
        if token.len() < defaults::MIN_TOKEN_LEN {
            return Err(format!(
                "must be at least {} characters",
                defaults::MIN_TOKEN_LEN
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be printable ASCII without spaces".into());
        }
        Ok(ApiToken(token.to_string()))
    }

    /// Constant-time comparison with what a client presented.
    pub fn matches(&self, presented: &[u8]) -> bool {
        super::auth::constant_time_eq(self.0.as_bytes(), presented)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// Who can reach the API, as [`Api::bind_plan`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// A token is set: the API binds `listen_addr` as asked.
    Token,
    /// No token and no opt-in: loopback only. `narrowed_from` is the
    /// non-loopback address asked for, if one was.
    LoopbackOnly { narrowed_from: Option<SocketAddr> },
    /// No token, and the operator opted into an open API with `allow_open`.
    Open,
}

impl Api {
    /// The address to bind and why. Without a token the API never listens
    /// beyond loopback unless `allow_open` says so: an unauthenticated API
    /// can rewrite the routing table.
    pub fn bind_plan(&self) -> (SocketAddr, Exposure) {
        let asked = self.listen_addr;
        if self.token.is_some() {
            return (asked, Exposure::Token);
        }
        if self.allow_open {
            return (asked, Exposure::Open);
        }
        if asked.ip().is_loopback() {
            return (
                asked,
                Exposure::LoopbackOnly {
                    narrowed_from: None,
                },
            );
        }
        let loopback = match asked.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        (
            SocketAddr::new(loopback, asked.port()),
            Exposure::LoopbackOnly {
                narrowed_from: Some(asked),
            },
        )
    }
}

/// Applies the environment, defaults and bounds to the file's `[api]`.
pub(crate) fn from_raw(raw: RawApi, env: &dyn Env) -> Result<Api, ConfigError> {
    let enabled = env_bool(env, "EDGEPROXY_API_ENABLED")?
        .or(raw.enabled)
        .unwrap_or(false);

    let listen_addr = match env.var("EDGEPROXY_API_LISTEN_ADDR") {
        Some(value) => value
            .trim()
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError::Env {
                var: "EDGEPROXY_API_LISTEN_ADDR",
                value: value.clone(),
                reason: e.to_string(),
            })?,
        None => {
            let text = raw
                .listen_addr
                .clone()
                .unwrap_or_else(|| defaults::LISTEN_ADDR.into());
            text.trim()
                .parse()
                .map_err(|e| invalid("api.listen_addr", format!("{text:?}: {e}")))?
        }
    };

    let (token, token_file) =
        token_from(&TOKEN, raw.token.as_deref(), raw.token_file.as_deref(), env)?;
    let (accept_token, accept_token_file) = token_from(
        &ACCEPT_TOKEN,
        raw.accept_token.as_deref(),
        raw.accept_token_file.as_deref(),
        env,
    )?;
    if accept_token.is_some() && token.is_none() {
        return Err(invalid(
            "api.accept_token",
            "is a second token accepted beside api.token while clients move to a new token: \
             set api.token (or api.token_file) too",
        ));
    }

    let allow_open = env_bool(env, "EDGEPROXY_API_ALLOW_OPEN")?
        .or(raw.allow_open)
        .unwrap_or(false);

    let ttl = env_parse::<u64>(env, "EDGEPROXY_HEARTBEAT_TTL_SECS")?
        .or(raw.heartbeat_ttl_secs)
        .unwrap_or(defaults::HEARTBEAT_TTL_SECS);
    if !(1..=7 * 86_400).contains(&ttl) {
        return Err(invalid(
            "api.heartbeat_ttl_secs",
            "must be between 1 second and 7 days",
        ));
    }

    let max_body = env_parse::<u64>(env, "EDGEPROXY_API_MAX_BODY_BYTES")?
        .or(raw.max_body_bytes)
        .unwrap_or(defaults::MAX_BODY_BYTES);
    if !(256..=1 << 20).contains(&max_body) {
        return Err(invalid(
            "api.max_body_bytes",
            "must be in 256..=1048576 bytes",
        ));
    }

    let rate = env_parse::<u32>(env, "EDGEPROXY_API_RATE_LIMIT_PER_SEC")?
        .or(raw.rate_limit_per_sec)
        .unwrap_or(defaults::RATE_LIMIT_PER_SEC);
    let burst = env_parse::<u32>(env, "EDGEPROXY_API_RATE_LIMIT_BURST")?
        .or(raw.rate_limit_burst)
        .unwrap_or(defaults::RATE_LIMIT_BURST.max(rate));
    if rate > 0 && burst == 0 {
        return Err(invalid(
            "api.rate_limit_burst",
            "must be at least 1 when rate_limit_per_sec is set",
        ));
    }

    Ok(Api {
        enabled,
        listen_addr,
        token,
        token_file,
        accept_token,
        accept_token_file,
        allow_open,
        heartbeat_ttl: Duration::from_secs(ttl),
        max_body_bytes: max_body as usize,
        rate_limit_per_sec: rate,
        rate_limit_burst: burst,
    })
}

/// Where the token is given. The environment wins over the file; within
/// one source, a literal token and a token file are exclusive.
const TOKEN: CredentialSources = CredentialSources {
    key: "api.token",
    file_key: "api.token_file",
    var: "EDGEPROXY_API_TOKEN",
    file_var: "EDGEPROXY_API_TOKEN_FILE",
    hidden: "(hidden)",
};

/// Where the second token accepted while clients move to a new one is
/// given (the same rules, its own keys and variables).
const ACCEPT_TOKEN: CredentialSources = CredentialSources {
    key: "api.accept_token",
    file_key: "api.accept_token_file",
    var: "EDGEPROXY_API_ACCEPT_TOKEN",
    file_var: "EDGEPROXY_API_ACCEPT_TOKEN_FILE",
    hidden: "(hidden)",
};

/// A token from `sources`: an empty variable counts as unset.
fn token_from(
    sources: &CredentialSources,
    literal: Option<&str>,
    file: Option<&std::path::Path>,
    env: &dyn Env,
) -> Result<(Option<ApiToken>, Option<PathBuf>), ConfigError> {
    let env_token = env.var(sources.var).filter(|t| !t.is_empty());
    let env_file = env.var(sources.file_var).filter(|p| !p.trim().is_empty());
    credential(
        sources,
        env_token,
        env_file.map(|p| PathBuf::from(p.trim())),
        literal,
        file,
        ApiToken::new,
        read_token_file,
    )
}

/// Reads a token file (surrounding whitespace, such as the final newline,
/// is ignored).
fn read_token_file(path: &std::path::Path) -> Result<ApiToken, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    ApiToken::new(&text).map_err(|reason| format!("token in {shown} {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const NO_ENV: [(&str, &str); 0] = [];
    const TOKEN: &str = "s3cret-token-0123456789";

    fn api(text: &str, env: &dyn Env) -> Result<Api, ConfigError> {
        let raw = crate::config::parse_toml(std::path::Path::new("t.toml"), text)?;
        Config::from_raw(raw, env).map(|c| c.api)
    }

    #[test]
    fn defaults_are_the_originals_and_closed() {
        let a = api("", &NO_ENV).unwrap();
        assert!(!a.enabled);
        assert_eq!(a.listen_addr, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(a.heartbeat_ttl, Duration::from_secs(60));
        assert_eq!(a.token, None);
        assert!(!a.allow_open);
        assert_eq!(a.max_body_bytes, 16 * 1024);
        assert_eq!((a.rate_limit_per_sec, a.rate_limit_burst), (100, 200));
    }

    #[test]
    fn original_env_vars_override_the_file() {
        let env = [
            ("EDGEPROXY_API_ENABLED", "true"),
            ("EDGEPROXY_API_LISTEN_ADDR", "127.0.0.1:9000"),
            ("EDGEPROXY_HEARTBEAT_TTL_SECS", "5"),
            ("EDGEPROXY_API_TOKEN", TOKEN),
            ("EDGEPROXY_API_ALLOW_OPEN", "1"),
            ("EDGEPROXY_API_MAX_BODY_BYTES", "1024"),
            ("EDGEPROXY_API_RATE_LIMIT_PER_SEC", "7"),
            ("EDGEPROXY_API_RATE_LIMIT_BURST", "9"),
        ];
        let a = api(
            "[api]\nenabled = false\nlisten_addr = \"0.0.0.0:1\"\nheartbeat_ttl_secs = 99\ntoken = \"file-token-abcdefghij\"\n",
            &env,
        )
        .unwrap();
        assert!(a.enabled);
        assert_eq!(a.listen_addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(a.heartbeat_ttl, Duration::from_secs(5));
        assert_eq!(a.token.as_ref().map(ApiToken::expose), Some(TOKEN));
        assert!(a.allow_open);
        assert_eq!(a.max_body_bytes, 1024);
        assert_eq!((a.rate_limit_per_sec, a.rate_limit_burst), (7, 9));
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        let text = format!("[api]\ntoken_file = {:?}\n", path.display().to_string());
        let a = api(&text, &NO_ENV).unwrap();
        assert_eq!(a.token.as_ref().map(ApiToken::expose), Some(TOKEN));
        assert_eq!(a.token_file.as_deref(), Some(path.as_path()));

        let env = [("EDGEPROXY_API_TOKEN_FILE", path.to_str().unwrap())];
        let a = api("", &env).unwrap();
        assert_eq!(a.token.as_ref().map(ApiToken::expose), Some(TOKEN));
    }

    #[test]
    fn bad_tokens_are_named_and_never_echoed() {
        let err = api("[api]\ntoken = \"short\"\n", &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("api.token"), "{err}");
        let err = api("", &[("EDGEPROXY_API_TOKEN", "has space in it 0123456")]).unwrap_err();
        assert!(err.to_string().contains("EDGEPROXY_API_TOKEN"), "{err}");
        assert!(
            !err.to_string().contains("has space"),
            "token leaked: {err}"
        );
        let both = format!("[api]\ntoken = {TOKEN:?}\ntoken_file = \"/x\"\n");
        let err = api(&both, &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = api("[api]\ntoken_file = \"/nonexistent/token\"\n", &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("api.token_file"), "{err}");
        assert!(err.to_string().contains("/nonexistent/token"), "{err}");
    }

    #[test]
    fn bounds_are_enforced_and_named() {
        for (text, key) in [
            ("[api]\nheartbeat_ttl_secs = 0\n", "api.heartbeat_ttl_secs"),
            ("[api]\nmax_body_bytes = 10\n", "api.max_body_bytes"),
            ("[api]\nrate_limit_burst = 0\n", "api.rate_limit_burst"),
            ("[api]\nlisten_addr = \"localhost\"\n", "api.listen_addr"),
            ("[api]\nenabeld = true\n", "enabeld"),
        ] {
            let err = api(text, &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let err = api("", &[("EDGEPROXY_HEARTBEAT_TTL_SECS", "soon")]).unwrap_err();
        assert!(
            err.to_string().contains("EDGEPROXY_HEARTBEAT_TTL_SECS"),
            "{err}"
        );
        // No rate limit at all is allowed.
        let a = api(
            "[api]\nrate_limit_per_sec = 0\nrate_limit_burst = 0\n",
            &NO_ENV,
        )
        .unwrap();
        assert_eq!(a.rate_limit_per_sec, 0);
    }

    #[test]
    fn without_a_token_the_api_binds_loopback_unless_opened() {
        let a = api("", &NO_ENV).unwrap();
        assert_eq!(
            a.bind_plan(),
            (
                "127.0.0.1:8081".parse().unwrap(),
                Exposure::LoopbackOnly {
                    narrowed_from: Some("0.0.0.0:8081".parse().unwrap())
                }
            )
        );
        let a = api("[api]\nlisten_addr = \"[::]:0\"\n", &NO_ENV).unwrap();
        assert_eq!(a.bind_plan().0, "[::1]:0".parse().unwrap());
        let a = api("[api]\nlisten_addr = \"127.0.0.2:7\"\n", &NO_ENV).unwrap();
        assert_eq!(
            a.bind_plan(),
            (
                "127.0.0.2:7".parse().unwrap(),
                Exposure::LoopbackOnly {
                    narrowed_from: None
                }
            )
        );
        let a = api("[api]\nallow_open = true\n", &NO_ENV).unwrap();
        assert_eq!(
            a.bind_plan(),
            ("0.0.0.0:8081".parse().unwrap(), Exposure::Open)
        );
        let a = api("", &[("EDGEPROXY_API_TOKEN", TOKEN)]).unwrap();
        assert_eq!(
            a.bind_plan(),
            ("0.0.0.0:8081".parse().unwrap(), Exposure::Token)
        );
    }

    #[test]
    fn a_second_token_is_accepted_only_beside_a_token_and_never_rendered() {
        let a = api(
            &format!(
                "[api]\nenabled = true\ntoken = \"{TOKEN}\"\naccept_token = \"next-token-0123456789\"\n"
            ),
            &NO_ENV,
        )
        .unwrap();
        let accepted = a.accept_token.as_ref().expect("read");
        assert!(accepted.matches(b"next-token-0123456789"));
        assert!(!format!("{a:?}").contains("next-token"));
        assert!(!toml::to_string(&a).unwrap().contains("next-token"));
        let a = api(
            &format!("[api]\nenabled = true\ntoken = \"{TOKEN}\"\n"),
            &[("EDGEPROXY_API_ACCEPT_TOKEN", "from-the-environment-0123")],
        )
        .unwrap();
        assert!(a
            .accept_token
            .is_some_and(|t| t.matches(b"from-the-environment-0123")));
        let err = api(
            "[api]\nenabled = true\naccept_token = \"next-token-0123456789\"\n",
            &NO_ENV,
        )
        .unwrap_err();
        assert!(err.to_string().contains("set api.token"), "{err}");
        let err = api(
            &format!("[api]\nenabled = true\ntoken = \"{TOKEN}\"\naccept_token = \"short\"\n"),
            &NO_ENV,
        )
        .unwrap_err();
        assert!(err.to_string().contains("api.accept_token"), "{err}");
    }

    #[test]
    fn the_token_is_never_rendered() {
        let raw = crate::config::parse_toml(
            std::path::Path::new("t.toml"),
            &format!("[api]\nenabled = true\ntoken = {TOKEN:?}\n"),
        )
        .unwrap();
        let c = Config::from_raw(raw, &NO_ENV).unwrap();
        let text = c.to_toml();
        assert!(text.contains("[api]"), "{text}");
        assert!(!text.contains(TOKEN), "{text}");
        assert!(!format!("{:?}", c.api).contains(TOKEN));
    }
}
