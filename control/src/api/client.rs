//! `edgeproxy backends list|add|rm|drain`: the discovery API's command-line
//! client (the original shipped shell tasks wrapping curl for this).
//!
//! Talks HTTP/1.1 to a running proxy's API with a bearer token. Where it
//! goes: `--api` (or `EDGEPROXY_API_URL`), else the `[api]` section of the
//! proxy's config file when `--config` (or `EDGEPROXY_CONFIG`) names one
//! (its address, with 0.0.0.0 / :: read as loopback, and its token or token
//! file), else `http://127.0.0.1:8081`. The token: `--token` (or
//! `EDGEPROXY_API_TOKEN`), else `--token-file`, else the config's. Prints a
//! table, or the API's JSON with `--json`, and stops quietly when the reader
//! of its output goes away (`... | head`). Any answer other than 2xx is an
//! error naming the status and the API's reason.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

#[derive(Debug, Args)]
pub struct BackendsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// List every backend in the routing table with its state.
    List,
    /// Register a backend, or update it in place if the id exists (which
    /// also ends a drain).
    Add(AddArgs),
    /// Deregister a backend (its row is marked deleted).
    Rm {
        /// Backend id.
        id: String,
    },
    /// Drain a backend: no new connections; open ones go on.
    Drain {
        /// Backend id.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Backend id: one DNS label (lower-case letters, digits, hyphens; served
    /// as <id>.<app>.internal).
    pub id: String,
    /// App name: one DNS label, like the id.
    #[arg(long)]
    pub app: String,
    /// Region code, e.g. sa, us, eu, ap.
    #[arg(long)]
    pub region: String,
    /// Backend address (IPv4 or IPv6, no port).
    #[arg(long)]
    pub ip: String,
    /// Backend port, 1-65535.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Two-letter country code.
    #[arg(long)]
    pub country: Option<String>,
    /// Load-balancing weight (API default 2).
    #[arg(long)]
    pub weight: Option<u32>,
    /// Soft connection limit (API default 100).
    #[arg(long)]
    pub soft_limit: Option<u32>,
    /// Hard connection limit (API default 150).
    #[arg(long)]
    pub hard_limit: Option<u32>,
}

/// Where the API the client talks to is, when no `--api` is given.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8081";

/// The URL a local client reaches the API at, from the proxy's `[api]`
/// settings: the address the proxy binds (see `Api::bind_plan`), with a
/// wildcard address read as the loopback address of its family.
pub fn url_from_config(api: &super::ApiConfig) -> Result<String, String> {
    if !api.enabled {
        return Err(
            "the discovery API is off in that configuration ([api] enabled = false)".into(),
        );
    }
    let (addr, _) = api.bind_plan();
    if addr.port() == 0 {
        return Err(format!(
            "[api] listen_addr {addr} asks for any free port: pass --api with the address \
             from the proxy's `api listening` log line"
        ));
    }
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(format!("http://{}", SocketAddr::new(ip, addr.port())))
}

/// Runs one `backends` subcommand. `config` is the proxy's config file
/// (`--config`), where the API's address and token come from when the
/// command line does not give them.
pub fn run(args: BackendsArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let api = args.api.client(config)?;
    let as_json = args.api.json;
    match &args.action {
        Action::List => {
            let body = api.call("GET", "/api/v1/backends", None)?;
            if as_json {
                return print_json(&body);
            }
            crate::stdout::print(&table(&body))?;
        }
        Action::Add(a) => {
            let mut req = Map::new();
            req.insert("id".into(), json!(a.id));
            req.insert("app".into(), json!(a.app));
            req.insert("region".into(), json!(a.region));
            req.insert("ip".into(), json!(a.ip));
            req.insert("port".into(), json!(a.port));
            // Unset options are left out: the API's defaults apply.
            for (key, value) in [
                ("country", a.country.as_ref().map(|c| json!(c))),
                ("weight", a.weight.map(|v| json!(v))),
                ("soft_limit", a.soft_limit.map(|v| json!(v))),
                ("hard_limit", a.hard_limit.map(|v| json!(v))),
            ] {
                if let Some(v) = value {
                    req.insert(key.into(), v);
                }
            }
            let body = api.call("POST", "/api/v1/register", Some(Value::Object(req)))?;
            if as_json {
                return print_json(&body);
            }
            let verb = if body["updated"] == json!(true) {
                "updated"
            } else {
                "registered"
            };
            crate::stdout::print(&format!("{verb} {}\n", a.id))?;
        }
        Action::Rm { id } => {
            let body = api.call("DELETE", &format!("/api/v1/backends/{}", escape(id)), None)?;
            if as_json {
                return print_json(&body);
            }
            crate::stdout::print(&format!("deregistered {id}\n"))?;
        }
        Action::Drain { id } => {
            let body = api.call(
                "POST",
                &format!("/api/v1/backends/{}/drain", escape(id)),
                None,
            )?;
            if as_json {
                return print_json(&body);
            }
            crate::stdout::print(&format!(
                "draining {id}: no new connections; {} open connection(s) go on\n",
                body["active_connections"].as_u64().unwrap_or(0)
            ))?;
        }
    }
    Ok(())
}

/// The token: `--token` if given and not empty, else the content of
/// `--token-file`, else none.
pub(crate) fn token_from(
    token: Option<&str>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    Ok(match (token, file) {
        (Some(t), _) if !t.is_empty() => Some(t.to_string()),
        (_, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read token file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        _ => None,
    })
}

fn print_json(body: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(body)?;
    text.push('\n');
    Ok(crate::stdout::print(&text)?)
}

pub(crate) struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub(crate) fn new(base: &str, token: Option<String>) -> anyhow::Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!("--api {base:?}: only http:// URLs are supported");
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(15)))
            .build()
            .new_agent();
        Ok(Client { base, token, agent })
    }

    /// One request; the JSON body of a 2xx answer, or an error with the
    /// status and the API's `error` text.
    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match method {
            "GET" => with_auth(self.agent.get(&url), auth.as_deref()).call(),
            "DELETE" => with_auth(self.agent.delete(&url), auth.as_deref()).call(),
            _ => {
                let req = with_auth(self.agent.post(&url), auth.as_deref());
                match body {
                    Some(b) => req
                        .header("Content-Type", "application/json")
                        .send(b.to_string()),
                    None => req.send_empty(),
                }
            }
        };
        let mut resp =
            result.with_context(|| format!("cannot reach the discovery API at {}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("{method} {url}: cannot read the answer"))?;
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !(200..300).contains(&status) {
            let reason = json["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| json.to_string());
            if status == 401 {
                bail!(
                    "{method} {path}: HTTP 401: {reason} (pass --token or set EDGEPROXY_API_TOKEN)"
                );
            }
            bail!("{method} {path}: HTTP {status}: {reason}");
        }
        Ok(json)
    }
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, auth: Option<&str>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(value) => req.header("Authorization", value),
        None => req,
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for an id
/// in a path (ids written by hand may hold anything).
fn escape(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The list answer as an aligned table.
fn table(body: &Value) -> String {
    let header = [
        "ID",
        "APP",
        "REGION",
        "COUNTRY",
        "ADDRESS",
        "WEIGHT",
        "SOFT",
        "HARD",
        "STATE",
        "CONNS",
        "HEARTBEAT",
        "HEALTH",
        "CIRCUIT",
        "RTT",
        "FAILS",
        "CHECKED",
    ];
    let text = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for b in body["backends"].as_array().into_iter().flatten() {
        let addr = match b["ip"].as_str() {
            Some(ip) if ip.contains(':') => format!("[{ip}]:{}", text(&b["port"])),
            _ => format!("{}:{}", text(&b["ip"]), text(&b["port"])),
        };
        let heartbeat = match b["last_heartbeat_secs"].as_u64() {
            Some(s) => format!("{s}s ago"),
            None => "-".into(),
        };
        rows.push(vec![
            text(&b["id"]),
            text(&b["app"]),
            text(&b["region"]),
            text(&b["country"]),
            addr,
            text(&b["weight"]),
            text(&b["soft_limit"]),
            text(&b["hard_limit"]),
            text(&b["state"]),
            text(&b["active_connections"]),
            heartbeat,
            text(&b["health"]["state"]),
            text(&b["health"]["circuit"]),
            match b["health"]["rtt_ms"].as_f64() {
                Some(ms) => format!("{ms:.1}ms"),
                None => "-".into(),
            },
            text(&b["health"]["consecutive_failures"]),
            match b["health"]["last_check"]["ago_ms"].as_u64() {
                Some(ms) => format!("{}s ago", ms / 1000),
                None => "-".into(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// How to reach a running POP's discovery API: shared by every command
/// that reads or changes a POP through it (`backends`, `cluster`, `mesh`,
/// `pop`, `drain`, `undrain`, `bgp`), so that all of them find the API the
/// same way (see [`ApiArgs::client`]).
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Base URL of the POP's discovery API. Default: from the [api]
    /// section of --config's file if one is given, else
    /// http://127.0.0.1:8081.
    #[arg(long, global = true, env = "EDGEPROXY_API_URL", value_name = "URL")]
    pub api: Option<String>,
    /// Bearer token for the API. Default: --token-file, else the token of
    /// --config's [api] section.
    #[arg(
        long,
        global = true,
        env = "EDGEPROXY_API_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Read the bearer token from this file (when --token is not given).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON answer instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ApiArgs {
    /// A client for the API. `config` is the proxy's config file
    /// (`--config`): the URL is `--api`, else that file's `[api]` address
    /// ([`url_from_config`]), else [`DEFAULT_API_URL`]; the token is
    /// `--token`, else `--token-file`, else that file's token.
    pub(crate) fn client(&self, config: Option<&Path>) -> anyhow::Result<Client> {
        let settings = match (&self.api, &self.token, config) {
            // Everything given on the command line: the file is not needed.
            (Some(_), Some(t), _) if !t.is_empty() => None,
            (_, _, Some(path)) => Some(
                crate::config::load(Some(path), &crate::config::ProcessEnv)
                    .with_context(|| format!("--config {}", path.display()))?
                    .api,
            ),
            (_, _, None) => None,
        };
        let url = match (&self.api, &settings) {
            (Some(url), _) => url.clone(),
            (None, Some(api)) => url_from_config(api).map_err(|e| {
                anyhow::anyhow!(
                    "--config {}: {e}",
                    config.unwrap_or(Path::new("")).display()
                )
            })?,
            (None, None) => DEFAULT_API_URL.to_string(),
        };
        let token = match token_from(self.token.as_deref(), self.token_file.as_deref())? {
            Some(t) => Some(t),
            None => settings
                .as_ref()
                .and_then(|api| api.token.as_ref())
                .map(|t| t.expose().to_string()),
        };
        Client::new(&url, token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(text: &str) -> crate::api::ApiConfig {
        let raw: crate::config::RawConfig = toml::from_str(text).unwrap();
        crate::config::Config::from_raw(raw, &[("X", "")])
            .unwrap()
            .api
    }

    #[test]
    fn the_api_url_comes_from_the_configs_bind_address() {
        let token = "token = \"0123456789abcdef0123\"\n";
        // A token: the address as asked, a wildcard read as loopback.
        let a = api(&format!(
            "[api]\nenabled = true\nlisten_addr = \"0.0.0.0:8181\"\n{token}"
        ));
        assert_eq!(url_from_config(&a).unwrap(), "http://127.0.0.1:8181");
        let a = api(&format!(
            "[api]\nenabled = true\nlisten_addr = \"[::]:8181\"\n{token}"
        ));
        assert_eq!(url_from_config(&a).unwrap(), "http://[::1]:8181");
        let a = api(&format!(
            "[api]\nenabled = true\nlisten_addr = \"10.1.2.3:81\"\n{token}"
        ));
        assert_eq!(url_from_config(&a).unwrap(), "http://10.1.2.3:81");
        // No token: the proxy binds loopback only, whatever was asked.
        let a = api("[api]\nenabled = true\nlisten_addr = \"10.1.2.3:81\"\n");
        assert_eq!(url_from_config(&a).unwrap(), "http://127.0.0.1:81");
        // Nothing to talk to, or no way to know where.
        let off = url_from_config(&api("[api]\nenabled = false\n")).unwrap_err();
        assert!(off.contains("enabled = false"), "{off}");
        let any = api("[api]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n");
        assert!(url_from_config(&any).unwrap_err().contains("--api"));
    }

    #[test]
    fn ids_are_escaped_for_paths() {
        assert_eq!(escape("b-1_x.y~"), "b-1_x.y~");
        assert_eq!(escape("a/b c:d"), "a%2Fb%20c%3Ad");
    }

    #[test]
    fn table_aligns_and_shows_missing_values_as_dashes() {
        let body = json!({"backends": [
            {"id": "b1", "app": "web", "region": "eu", "country": null, "ip": "10.0.0.1",
             "port": 80, "weight": 2, "soft_limit": 100, "hard_limit": 150, "state": "serving",
             "active_connections": 3, "last_heartbeat_secs": 4},
            {"id": "long-backend", "app": "web", "region": "eu", "country": "DE", "ip": "fd00::1",
             "port": 81, "weight": 1, "soft_limit": 1, "hard_limit": 1, "state": "draining",
             "active_connections": 0, "last_heartbeat_secs": null},
        ], "total": 2});
        let t = table(&body);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("ID            APP"), "{t}");
        assert!(
            lines[1].contains("10.0.0.1:80") && lines[1].contains("4s ago"),
            "{t}"
        );
        assert!(
            lines[2].contains("[fd00::1]:81") && lines[2].contains("draining"),
            "{t}"
        );
        assert!(lines[1].contains(" -  "), "country shown as '-': {t}");
    }
}
