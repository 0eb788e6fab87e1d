//! Configuration: one TOML file plus `EDGEPROXY_*` environment overrides.
//!
//! Loading is two steps: [`RawConfig`] mirrors the file (every field optional,
//! unknown keys rejected), then [`Config::from_raw`] applies the environment,
//! fills defaults and validates into typed values (`SocketAddr`, `Duration`,
//! `NonZero*`). Every error names the key it is about. With no file at all the
//! environment alone (the original edgeProxy's variables) gives a working
//! configuration, so an existing deployment can swap binaries.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) use crate::config_env::{env_bool, env_parse, invalid};
use crate::config_env::{ser_display, ser_display_list, ser_ms, ser_secs};

/// Longest `affinity.ttl_secs`: 365 days.
const MAX_BINDING_TTL_SECS: u64 = 365 * 86_400;
/// Longest `affinity.gc_interval_secs`: one day.
const MAX_BINDING_GC_INTERVAL_SECS: u64 = 86_400;
/// Longest `[pop] name` (shown in status, logs and the pops table).
const MAX_POP_NAME: usize = 64;
pub use crate::config_env::{ConfigError, Env, ProcessEnv};

// ---------------------------------------------------------------------------
// The file as written. All fields optional; defaults are applied in `from_raw`.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub pop: RawPop,
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub routing: RawRouting,
    #[serde(default)]
    pub affinity: RawAffinity,
    #[serde(default)]
    pub geo: RawGeo,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default, rename = "listener")]
    pub listeners: Option<Vec<RawListener>>,
    #[serde(default)]
    pub demo: RawDemo,
    /// `[log]`: see `crate::log_config`.
    #[serde(default)]
    pub log: crate::log_config::RawLog,
    #[serde(default)]
    pub metrics: RawMetrics,
    /// `[api]`: the discovery API, see `crate::api::config`.
    #[serde(default)]
    pub api: crate::api::config::RawApi,
    #[serde(default)]
    pub dns: RawDns,
    /// `[replication]`: between POPs, see `crate::replication::config`.
    #[serde(default)]
    pub replication: crate::replication::config::RawReplication,
    /// `[mesh]`: the WireGuard mesh and 6PN, see `crate::mesh::config`.
    #[serde(default)]
    pub mesh: crate::mesh::config::RawMesh,
    /// `[bgp]`: the anycast speaker, see `crate::bgp::config`.
    #[serde(default)]
    pub bgp: crate::bgp::config::RawBgp,
    /// `[geodns]`: the public GeoDNS zone, see `crate::geodns`.
    #[serde(default)]
    pub geodns: crate::geodns::RawGeoDns,
    /// `[health]`, `[circuit_breaker]`: see `crate::health::config`.
    #[serde(default)]
    pub health: crate::health::config::RawHealth,
    #[serde(default)]
    pub circuit_breaker: crate::health::config::RawCircuit,
    /// `[rate_limit]`: see `crate::client_limits`.
    #[serde(default)]
    pub rate_limit: crate::client_limits::RawRateLimit,
    /// `[pool]`: warm backend connections, see `crate::pool_config`.
    #[serde(default)]
    pub pool: crate::pool_config::RawPool,
    /// `[upgrade]`: hitless binary upgrade, see `crate::upgrade::config`.
    #[serde(default)]
    pub upgrade: crate::upgrade::config::RawUpgrade,
    /// `[config_watch]`: see `crate::config_watch`.
    #[serde(default)]
    pub config_watch: crate::config_watch::RawConfigWatch,
    /// `[postgres]`: PostgreSQL as the routing source, see `crate::pg_source`.
    #[serde(default)]
    pub postgres: crate::pg_source::config::RawPostgres,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub enabled: Option<bool>,
    pub listen_addr: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPop {
    pub region: Option<String>,
    pub name: Option<String>,
    pub country: Option<String>,
    pub public_addrs: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub shards: Option<u32>,
    pub pin_cores: Option<bool>,
    pub buffer_count: Option<u32>,
    pub buffer_size: Option<u32>,
    pub splice_bulk: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub db_path: Option<PathBuf>,
    pub reload_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAffinity {
    pub ttl_secs: Option<u64>,
    pub gc_interval_secs: Option<u64>,
    pub max_clients: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGeo {
    pub db_path: Option<PathBuf>,
    pub default_region: Option<String>,
    pub regions: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default, rename = "override")]
    pub overrides: Vec<RawGeoOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGeoOverride {
    pub cidr: String,
    pub country: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<u32>,
    pub max_connections_per_shard: Option<u32>,
    pub connect_timeout_ms: Option<u64>,
    pub connect_attempts: Option<u32>,
    pub idle_timeout_secs: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<String>,
    pub addr: String,
    pub app: Option<String>,
    pub accept_proxy_protocol: Option<bool>,
    pub send_proxy_protocol: Option<bool>,
    /// Terminate TLS on this listener.
    pub tls: Option<crate::tls::RawTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDemo {
    pub backends: Option<u32>,
    pub app: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub enabled: Option<bool>,
    pub listen_addr: Option<String>,
    pub domain: Option<String>,
    pub ttl_secs: Option<u32>,
    pub tcp_idle_timeout_secs: Option<u64>,
    pub tcp_max_connections: Option<u32>,
    pub udp_workers: Option<u32>,
    pub udp_batch_scheduling: Option<bool>,
    #[serde(default, rename = "pop")]
    pub pops: Vec<RawDnsPop>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDnsPop {
    pub name: String,
    pub region: String,
    pub addr: String,
}

// ---------------------------------------------------------------------------
// The effective, validated configuration.
// ---------------------------------------------------------------------------

/// The effective configuration. Serializes back to TOML for `check-config`,
/// under the file's key names, so the output is itself a valid config file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub pop: Pop,
    pub runtime: Runtime,
    pub routing: Routing,
    pub affinity: Affinity,
    pub geo: Geo,
    pub limits: Limits,
    #[serde(rename = "listener")]
    pub listeners: Vec<Listener>,
    pub demo: Demo,
    pub log: crate::log_config::Log,
    pub metrics: Metrics,
    pub api: crate::api::config::Api,
    pub dns: Dns,
    pub replication: crate::replication::config::Replication,
    pub mesh: crate::mesh::config::Mesh,
    pub bgp: crate::bgp::config::Bgp,
    pub geodns: crate::geodns::GeoDns,
    pub health: crate::health::config::Health,
    pub circuit_breaker: crate::health::config::Circuit,
    pub rate_limit: crate::client_limits::RateLimit,
    pub pool: crate::pool_config::Pool,
    pub upgrade: crate::upgrade::config::Upgrade,
    pub config_watch: crate::config_watch::ConfigWatchSettings,
    pub postgres: crate::pg_source::config::Postgres,
}

/// The Prometheus admin listener.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    pub enabled: bool,
    pub listen_addr: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pop {
    /// Region of this POP; backends in it get geo tier 2 ("local POP").
    pub region: String,
    /// Free-form name used in logs.
    pub name: String,
    /// Country of this POP (two letters), as other POPs and DNS see it.
    pub country: Option<String>,
    /// Addresses clients reach this POP at (what DNS answers for it);
    /// replicated in the `pops` table.
    #[serde(serialize_with = "ser_display_list")]
    pub public_addrs: Vec<std::net::IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Runtime {
    /// Data-plane shards (one io_uring runtime per core). 0 in the file means
    /// one per available core; here it is already resolved.
    pub shards: u32,
    pub pin_cores: bool,
    /// Provided receive buffers per shard (rounded up to a power of two).
    pub buffer_count: u32,
    /// Bytes per provided buffer.
    pub buffer_size: u32,
    /// Move bulk flows with splice(2) instead of copying them.
    pub splice_bulk: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Routing {
    pub db_path: PathBuf,
    #[serde(rename = "reload_interval_ms", serialize_with = "ser_ms")]
    pub reload_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Affinity {
    #[serde(rename = "ttl_secs", serialize_with = "ser_secs")]
    pub ttl: Duration,
    #[serde(rename = "gc_interval_secs", serialize_with = "ser_secs")]
    pub gc_interval: Duration,
    /// Client bindings each affinity table holds at most (one table per
    /// shard); new clients beyond it are served unbound.
    pub max_clients: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Geo {
    /// `None`: the embedded DB-IP Lite country database.
    pub db_path: Option<PathBuf>,
    pub default_region: String,
    /// `None`: the built-in region map.
    pub regions: Option<BTreeMap<String, Vec<String>>>,
    #[serde(rename = "override")]
    pub overrides: Vec<GeoOverride>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GeoOverride {
    #[serde(serialize_with = "ser_display")]
    pub cidr: ipnet::IpNet,
    pub country: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// 0 = unlimited; `None`: derived from the open-files limit at start
    /// (`crate::fd_limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// 0 = unlimited.
    pub max_connections_per_shard: u32,
    #[serde(rename = "connect_timeout_ms", serialize_with = "ser_ms")]
    pub connect_timeout: Duration,
    pub connect_attempts: NonZeroU32,
    /// 0 = never time out idle connections.
    #[serde(rename = "idle_timeout_secs", serialize_with = "ser_secs")]
    pub idle_timeout: Duration,
    #[serde(rename = "shutdown_grace_secs", serialize_with = "ser_secs")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listener {
    pub name: String,
    pub addr: SocketAddr,
    /// `None`: the listener serves every app.
    pub app: Option<String>,
    pub accept_proxy_protocol: bool,
    pub send_proxy_protocol: bool,
    /// `None`: plain TCP.
    pub tls: Option<crate::tls::TlsSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Demo {
    /// Demo HTTP backends started in-process and registered in the routing
    /// table at start (0 = none).
    pub backends: u32,
    pub app: String,
}

/// The internal DNS server (`dns` crate): `.internal` names answered from the
/// routing table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dns {
    pub enabled: bool,
    /// UDP and TCP (same port; port 0 picks a free one).
    #[serde(serialize_with = "ser_display")]
    pub listen_addr: SocketAddr,
    /// Zone served, lower case, no trailing dot (`internal`).
    pub domain: String,
    /// TTL of every answer and of negative answers, seconds (0..=86400).
    pub ttl_secs: u32,
    /// A TCP client silent this long is disconnected.
    #[serde(rename = "tcp_idle_timeout_secs", serialize_with = "ser_secs")]
    pub tcp_idle_timeout: Duration,
    /// TCP connections served at once; more wait in the listen backlog.
    pub tcp_max_connections: NonZeroU32,
    /// UDP sockets answering in parallel, each on a thread of its own. 0 in
    /// the file: one per core.
    pub udp_workers: u32,
    /// UDP worker threads run under `SCHED_BATCH`: a query waits for a busy
    /// core's running task instead of preempting it (default true).
    pub udp_batch_scheduling: bool,
    /// POPs listed under `<region>.pops.<domain>`.
    #[serde(rename = "pop")]
    pub pops: Vec<DnsPop>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DnsPop {
    pub name: String,
    /// Lower case.
    pub region: String,
    #[serde(serialize_with = "ser_display")]
    pub addr: std::net::IpAddr,
}

/// Defaults. Those shared with the original edgeProxy keep its values
/// (listen 0.0.0.0:8080, routing.db, region "sa", binding TTL 600 s, GC 60 s);
/// the reload interval is 1 s instead of its 5 s.
pub mod defaults {
    pub const LISTEN_ADDR: &str = "0.0.0.0:8080";
    pub const DB_PATH: &str = "routing.db";
    pub const REGION: &str = "sa";
    pub const RELOAD_INTERVAL_MS: u64 = 1000;
    pub const BINDING_TTL_SECS: u64 = 600;
    pub const BINDING_GC_INTERVAL_SECS: u64 = 60;
    pub const DEFAULT_GEO_REGION: &str = "us";
    /// 256 × 64 KiB = 16 MiB per shard. 64 KiB (the loopback MTU, a GSO
    /// segment) rather than 16 KiB: a quarter of the receive and send calls
    /// per byte; measured in the perf suite's bulk scenario, proxy CPU per GB
    /// fell from 1.2–1.3× HAProxy's (16 KiB buffers both) to 0.74–0.84×.
    pub const BUFFER_COUNT: u32 = 256;
    pub const BUFFER_SIZE: u32 = 64 * 1024;
    pub const CONNECT_TIMEOUT_MS: u64 = 2000;
    pub const CONNECT_ATTEMPTS: u32 = 3;
    pub const IDLE_TIMEOUT_SECS: u64 = 300;
    pub const SHUTDOWN_GRACE_SECS: u64 = 30;
    /// Upper bounds: 7 days without a byte, a day of draining.
    pub const MAX_IDLE_TIMEOUT_SECS: u64 = 7 * 86_400;
    pub const MAX_SHUTDOWN_GRACE_SECS: u64 = 86_400;
    pub const DEMO_APP: &str = "demo";
    pub const METRICS_LISTEN_ADDR: &str = "127.0.0.1:9090";
    /// The original edgeProxy's DNS port and domain.
    pub const DNS_LISTEN_ADDR: &str = "0.0.0.0:5353";
    pub const DNS_DOMAIN: &str = "internal";
    /// 5 s, not the original's 30 s: an `<app>` answer is one backend chosen
    /// by health and live load, so it goes stale as fast as load shifts, and a
    /// backend that fails stays in resolvers' caches for up to a TTL. 5 s is
    /// what cluster DNS commonly uses (CoreDNS's Kubernetes default); at
    /// 100k+ answers/s per core the extra queries cost little.
    pub const DNS_TTL_SECS: u32 = 5;
    /// RFC 7766 asks servers to close idle TCP connections after seconds,
    /// not minutes.
    pub const DNS_TCP_IDLE_TIMEOUT_SECS: u64 = 10;
    pub const DNS_TCP_MAX_CONNECTIONS: u32 = 256;
}

/// The original's TLS variables: `EDGEPROXY_TLS_ENABLED=true` adds a TLS
/// listener named "tls" (unless one is configured) on
/// `EDGEPROXY_TLS_LISTEN_ADDR` (default 0.0.0.0:8443) with
/// `EDGEPROXY_TLS_CERT` / `EDGEPROXY_TLS_KEY`, or a self-signed certificate
/// when those are unset. The address and files also override the first
/// configured TLS listener.
fn apply_tls_env(env: &dyn Env, listeners: &mut Vec<RawListener>) -> Result<(), ConfigError> {
    let enabled = env_bool(env, "EDGEPROXY_TLS_ENABLED")?.unwrap_or(false);
    let addr = env.var("EDGEPROXY_TLS_LISTEN_ADDR");
    let cert = env.var("EDGEPROXY_TLS_CERT").map(PathBuf::from);
    let key = env.var("EDGEPROXY_TLS_KEY").map(PathBuf::from);
    if let Some(a) = &addr {
        a.trim()
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError::Env {
                var: "EDGEPROXY_TLS_LISTEN_ADDR",
                value: a.clone(),
                reason: e.to_string(),
            })?;
    }
    let existing = listeners.iter_mut().find(|l| l.tls.is_some());
    let target = match existing {
        Some(l) => l,
        None if enabled => {
            listeners.push(RawListener {
                name: Some("tls".into()),
                addr: crate::tls::DEFAULT_TLS_LISTEN_ADDR.into(),
                app: None,
                accept_proxy_protocol: None,
                send_proxy_protocol: None,
                tls: Some(crate::tls::RawTls {
                    self_signed: Some(cert.is_none() && key.is_none()),
                    ..Default::default()
                }),
            });
            listeners.last_mut().expect("just pushed")
        }
        None => return Ok(()),
    };
    if let Some(a) = addr {
        target.addr = a;
    }
    let tls = target.tls.get_or_insert_with(Default::default);
    if cert.is_some() || key.is_some() {
        // One variable without the other, and nothing in the file to pair
        // it with: name the variables, not a table the file may not have.
        // (QA: "invalid value for `listener[1].tls.key`" for a listener
        // that only the environment had asked for.)
        let (set, missing) = if cert.is_some() {
            ("EDGEPROXY_TLS_CERT", "EDGEPROXY_TLS_KEY")
        } else {
            ("EDGEPROXY_TLS_KEY", "EDGEPROXY_TLS_CERT")
        };
        tls.self_signed = Some(false);
        tls.self_signed_names = None;
        tls.cert = cert.or(tls.cert.take());
        tls.key = key.or(tls.key.take());
        if tls.cert.is_none() || tls.key.is_none() {
            return Err(ConfigError::Env {
                var: set,
                value: env.var(set).unwrap_or_default(),
                reason: format!(
                    "{missing} is not set, and the TLS listener {} has no file for it",
                    target
                        .name
                        .as_deref()
                        .map_or_else(|| format!("on {}", target.addr), |name| format!("{name:?}"))
                ),
            });
        }
    }
    Ok(())
}

/// `[metrics]`: off unless enabled in the file, by `EDGEPROXY_METRICS_ENABLED`,
/// or by setting `EDGEPROXY_METRICS_LISTEN_ADDR`. Default address
/// 127.0.0.1:9090 (loopback: metrics reveal the routing table).
fn metrics_from(raw: RawMetrics, env: &dyn Env) -> Result<Metrics, ConfigError> {
    let env_addr = env.var("EDGEPROXY_METRICS_LISTEN_ADDR");
    let enabled = env_bool(env, "EDGEPROXY_METRICS_ENABLED")?
        .or(env_addr.as_ref().map(|_| true))
        .or(raw.enabled)
        .unwrap_or(false);
    let listen_addr = match env_addr {
        Some(a) => a
            .trim()
            .parse()
            .map_err(|e: std::net::AddrParseError| ConfigError::Env {
                var: "EDGEPROXY_METRICS_LISTEN_ADDR",
                value: a.clone(),
                reason: e.to_string(),
            })?,
        None => {
            let a = raw
                .listen_addr
                .unwrap_or_else(|| defaults::METRICS_LISTEN_ADDR.into());
            a.trim()
                .parse()
                .map_err(|e| invalid("metrics.listen_addr", format!("{a:?}: {e}")))?
        }
    };
    Ok(Metrics {
        enabled,
        listen_addr,
    })
}

/// Reads and parses a TOML file.
pub fn read_file(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: path.to_owned(),
        cause,
    })?;
    parse_toml(path, &text)
}

pub fn parse_toml(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    // The parser's own layout (line, source excerpt, caret under the
    // column) only reads on several lines: keep its newlines.
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Makes every path written in `raw` (read from `config_file`) relative to
/// the file's directory, and puts the default routing table there too (see
/// `crate::config_paths`).
pub fn resolve_paths(raw: &mut RawConfig, config_file: &Path) {
    raw.routing
        .db_path
        .get_or_insert_with(|| PathBuf::from(defaults::DB_PATH));
    let mut paths: Vec<&mut PathBuf> = Vec::new();
    paths.extend(raw.routing.db_path.as_mut());
    paths.extend(raw.geo.db_path.as_mut());
    paths.extend(raw.api.token_file.as_mut());
    paths.extend(raw.api.accept_token_file.as_mut());
    paths.extend(raw.replication.secret_file.as_mut());
    paths.extend(raw.replication.accept_secret_file.as_mut());
    paths.extend(raw.upgrade.control_socket.as_mut());
    paths.extend(raw.mesh.private_key_file.as_mut());
    paths.extend(raw.postgres.ca_file.as_mut());
    for n in &mut raw.bgp.neighbors {
        paths.extend(n.password_file.as_mut());
    }
    for l in raw.listeners.iter_mut().flatten() {
        if let Some(tls) = l.tls.as_mut() {
            paths.extend(tls.cert.as_mut());
            paths.extend(tls.key.as_mut());
            for sni in &mut tls.sni {
                paths.push(&mut sni.cert);
                paths.push(&mut sni.key);
            }
        }
    }
    crate::config_paths::resolve(paths, config_file);
}

/// Loads the effective configuration: the file (if given) then the
/// environment on top.
///
/// Relative paths in the file are resolved against the file's directory
/// (see `crate::config_paths`).
pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    let raw = match path {
        Some(p) => {
            let mut raw = read_file(p)?;
            resolve_paths(&mut raw, p);
            raw
        }
        None => RawConfig::default(),
    };
    Config::from_raw(raw, env)
}

fn available_cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// The environment variables that set a key whose value is checked after it
/// is read (a range, a relation to another key), as `(variable, key)`. An
/// error on such a key names the variables of it that are set, with their
/// values: the key alone sent the operator to a file that may not have it
/// (`EDGEPROXY_API_MAX_BODY_BYTES=100` was `invalid value for
/// `api.max_body_bytes``, `EDGEPROXY_DB_RELOAD_SECS=0` an error on
/// `routing.reload_interval_ms`). Credentials (the API token, the cluster
/// secret, the PostgreSQL URL, the webhook URL) are left out: their values
/// are never shown.
const ENV_KEYS: &[(&str, &str)] = &[
    ("EDGEPROXY_REGION", "pop.region"),
    ("EDGEPROXY_DB_RELOAD_SECS", "routing.reload_interval_ms"),
    ("EDGEPROXY_DB_PATH", "routing.db_path"),
    ("EDGEPROXY_BINDING_TTL_SECS", "affinity.ttl_secs"),
    (
        "EDGEPROXY_BINDING_GC_INTERVAL_SECS",
        "affinity.gc_interval_secs",
    ),
    ("EDGEPROXY_METRICS_LISTEN_ADDR", "metrics.listen_addr"),
    ("EDGEPROXY_API_LISTEN_ADDR", "api.listen_addr"),
    ("EDGEPROXY_HEARTBEAT_TTL_SECS", "api.heartbeat_ttl_secs"),
    ("EDGEPROXY_API_MAX_BODY_BYTES", "api.max_body_bytes"),
    ("EDGEPROXY_API_RATE_LIMIT_PER_SEC", "api.rate_limit_burst"),
    ("EDGEPROXY_API_RATE_LIMIT_BURST", "api.rate_limit_burst"),
    ("EDGEPROXY_DNS_LISTEN_ADDR", "dns.listen_addr"),
    (
        "EDGEPROXY_LOG_SUMMARY_INTERVAL_SECS",
        "log.summary_interval_secs",
    ),
    (
        "EDGEPROXY_CONFIG_WATCH_INTERVAL_SECS",
        "config_watch.interval_secs",
    ),
    (
        "EDGEPROXY_UPGRADE_READY_TIMEOUT_SECS",
        "upgrade.ready_timeout_secs",
    ),
    ("EDGEPROXY_POOL_MAX_PER_BACKEND", "pool.max_per_backend"),
    ("EDGEPROXY_POOL_IDLE_TIMEOUT_SECS", "pool.idle_timeout_secs"),
    ("EDGEPROXY_POOL_MAX_LIFETIME_SECS", "pool.max_lifetime_secs"),
    (
        "EDGEPROXY_POOL_CONNECT_TIMEOUT_SECS",
        "pool.connect_timeout_ms",
    ),
    ("EDGEPROXY_POOL_WARM", "pool.warm"),
    ("EDGEPROXY_POOL_WARM", "pool.min_rtt_ms"),
    ("EDGEPROXY_POOL_MIN_RTT_MS", "pool.min_rtt_ms"),
    ("EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS", "health.interval_ms"),
    ("EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS", "health.timeout_ms"),
    ("EDGEPROXY_HEALTH_CHECK_TIMEOUT_SECS", "health.timeout_ms"),
    (
        "EDGEPROXY_HEALTH_HEALTHY_THRESHOLD",
        "health.healthy_threshold",
    ),
    (
        "EDGEPROXY_HEALTH_UNHEALTHY_THRESHOLD",
        "health.unhealthy_threshold",
    ),
    ("EDGEPROXY_HEALTH_MAX_CONCURRENT", "health.max_concurrent"),
    ("EDGEPROXY_HEALTH_RTT_WEIGHT", "health.rtt_weight"),
    (
        "EDGEPROXY_CIRCUIT_FAILURE_THRESHOLD",
        "circuit_breaker.failure_threshold",
    ),
    (
        "EDGEPROXY_CIRCUIT_SUCCESS_THRESHOLD",
        "circuit_breaker.success_threshold",
    ),
    (
        "EDGEPROXY_CIRCUIT_TIMEOUT_SECS",
        "circuit_breaker.timeout_ms",
    ),
    (
        "EDGEPROXY_CIRCUIT_TIMEOUT_SECS",
        "circuit_breaker.max_timeout_ms",
    ),
    (
        "EDGEPROXY_CIRCUIT_MAX_EJECTION_PERCENT",
        "circuit_breaker.max_ejection_percent",
    ),
    (
        "EDGEPROXY_RATE_LIMIT_MAX_REQUESTS",
        "rate_limit.max_requests",
    ),
    ("EDGEPROXY_RATE_LIMIT_WINDOW_SECS", "rate_limit.window_ms"),
    ("EDGEPROXY_RATE_LIMIT_BURST", "rate_limit.burst"),
    ("EDGEPROXY_GEODNS_TTL_SECS", "geodns.ttl_secs"),
    ("EDGEPROXY_GEODNS_ANSWERS", "geodns.answers"),
    ("EDGEPROXY_MESH_LISTEN_PORT", "mesh.listen_port"),
    ("EDGEPROXY_MESH_PRIVATE_KEY_FILE", "mesh.private_key_file"),
    ("EDGEPROXY_REPLICATION_NODE_ID", "replication.node_id"),
    (
        "EDGEPROXY_REPLICATION_CLUSTER_NAME",
        "replication.cluster_name",
    ),
    (
        "EDGEPROXY_REPLICATION_ADVERTISE_ADDR",
        "replication.advertise_addr",
    ),
    (
        "EDGEPROXY_REPLICATION_TRANSPORT_ADDR",
        "replication.transport_addr",
    ),
    ("EDGEPROXY_POSTGRES_CA_FILE", "postgres.ca_file"),
];

/// `err`, with the variables of `ENV_KEYS` that set its key named.
fn name_the_variables(err: ConfigError, env: &dyn Env) -> ConfigError {
    let ConfigError::Invalid { key, reason } = err else {
        return err;
    };
    let set: Vec<String> = ENV_KEYS
        .iter()
        .filter(|(_, k)| *k == key)
        .filter_map(|(var, _)| env.var(var).map(|value| format!("{var}={value:?}")))
        .collect();
    if set.is_empty() {
        return ConfigError::Invalid { key, reason };
    }
    ConfigError::Invalid {
        reason: format!("{reason} (set by {})", set.join(", ")),
        key,
    }
}

impl Config {
    pub fn from_raw(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
        Self::from_raw_unnamed(raw, env).map_err(|e| name_the_variables(e, env))
    }

    fn from_raw_unnamed(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
        // --- pop
        let region = env
            .var("EDGEPROXY_REGION")
            .or(raw.pop.region)
            .unwrap_or_else(|| defaults::REGION.into())
            .trim()
            .to_ascii_lowercase();
        if region.is_empty() {
            return Err(invalid("pop.region", "must not be empty"));
        }
        // QA: "e u" or "eu.west" were taken, though no backend can be
        // registered in such a region (the API refuses it) and no DNS name
        // can carry it.
        if !crate::api::validate::is_region(&region) {
            return Err(invalid(
                "pop.region",
                format!(
                    "{region:?} must be up to {} letters, digits, - or _, as a backend's region \
                     (e.g. \"sa\")",
                    crate::api::validate::MAX_REGION_LEN
                ),
            ));
        }
        let country = match raw.pop.country {
            None => None,
            Some(c) => Some(
                engine::snapshot::Country::parse(&c)
                    .ok_or_else(|| {
                        invalid(
                            "pop.country",
                            format!("{c:?} is not a two-letter country code"),
                        )
                    })?
                    .to_string(),
            ),
        };
        let public_addrs = match env.var("EDGEPROXY_POP_PUBLIC_ADDRS") {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(|a| {
                    a.parse()
                        .map_err(|e: std::net::AddrParseError| ConfigError::Env {
                            var: "EDGEPROXY_POP_PUBLIC_ADDRS",
                            value: list.clone(),
                            reason: format!("{a:?}: {e}"),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => raw
                .pop
                .public_addrs
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    a.trim().parse().map_err(|e| {
                        invalid(format!("pop.public_addrs[{i}]"), format!("{a:?}: {e}"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let name = match raw.pop.name {
            None => format!("pop-{region}"),
            // QA: an empty name, or one with a newline, was taken: status,
            // logs and the pops table then showed nothing, or broke lines.
            Some(name) => {
                let name = name.trim().to_string();
                if name.is_empty()
                    || name.len() > MAX_POP_NAME
                    || name.chars().any(char::is_control)
                {
                    return Err(invalid(
                        "pop.name",
                        format!("{name:?} must be 1 to {MAX_POP_NAME} bytes of printable text"),
                    ));
                }
                name
            }
        };
        let pop = Pop {
            name,
            region,
            country,
            public_addrs,
        };

        // --- runtime
        let cores = available_cores();
        let shards = match raw.runtime.shards.unwrap_or(0) {
            0 => cores,
            n if n > 1024 => return Err(invalid("runtime.shards", "at most 1024")),
            n => n,
        };
        let buffer_count = raw.runtime.buffer_count.unwrap_or(defaults::BUFFER_COUNT);
        if !(1..=32768).contains(&buffer_count) {
            return Err(invalid("runtime.buffer_count", "must be in 1..=32768"));
        }
        let buffer_size = raw.runtime.buffer_size.unwrap_or(defaults::BUFFER_SIZE);
        if !(512..=1 << 20).contains(&buffer_size) {
            return Err(invalid(
                "runtime.buffer_size",
                "must be in 512..=1048576 bytes",
            ));
        }
        let runtime = Runtime {
            shards,
            pin_cores: raw.runtime.pin_cores.unwrap_or(true),
            buffer_count: buffer_count.next_power_of_two(),
            buffer_size,
            splice_bulk: raw.runtime.splice_bulk.unwrap_or(true),
        };

        // --- routing
        let db_path = env
            .var("EDGEPROXY_DB_PATH")
            .map(PathBuf::from)
            .or(raw.routing.db_path)
            .unwrap_or_else(|| PathBuf::from(defaults::DB_PATH));
        if db_path.as_os_str().is_empty() {
            return Err(invalid("routing.db_path", "must not be empty"));
        }
        let reload_ms = match env_parse::<u64>(env, "EDGEPROXY_DB_RELOAD_SECS")? {
            Some(secs) => secs.saturating_mul(1000),
            None => raw
                .routing
                .reload_interval_ms
                .unwrap_or(defaults::RELOAD_INTERVAL_MS),
        };
        if !(10..=3_600_000).contains(&reload_ms) {
            return Err(invalid(
                "routing.reload_interval_ms",
                "must be between 10 ms and 1 hour",
            ));
        }
        let routing = Routing {
            db_path,
            reload_interval: Duration::from_millis(reload_ms),
        };

        // --- affinity
        let ttl = env_parse::<u64>(env, "EDGEPROXY_BINDING_TTL_SECS")?
            .or(raw.affinity.ttl_secs)
            .unwrap_or(defaults::BINDING_TTL_SECS);
        let gc = env_parse::<u64>(env, "EDGEPROXY_BINDING_GC_INTERVAL_SECS")?
            .or(raw.affinity.gc_interval_secs)
            .unwrap_or(defaults::BINDING_GC_INTERVAL_SECS);
        // Bounded: both end up added to an `Instant` (a binding's expiry,
        // the sweep's next wake-up), and 2^64-1 s made every shard's sweep
        // task panic at start ("overflow when adding duration to instant")
        // and stop sweeping for the life of the process (QA).
        if ttl > MAX_BINDING_TTL_SECS {
            return Err(invalid(
                "affinity.ttl_secs",
                format!("must be at most {MAX_BINDING_TTL_SECS} (365 days); 0 disables affinity"),
            ));
        }
        if !(1..=MAX_BINDING_GC_INTERVAL_SECS).contains(&gc) {
            return Err(invalid(
                "affinity.gc_interval_secs",
                format!("must be between 1 and {MAX_BINDING_GC_INTERVAL_SECS} (1 day)"),
            ));
        }
        let max_clients = raw
            .affinity
            .max_clients
            .unwrap_or(engine::affinity::DEFAULT_MAX_CLIENTS as u64);
        if !(1..=100_000_000).contains(&max_clients) {
            return Err(invalid("affinity.max_clients", "must be in 1..=100000000"));
        }
        let affinity = Affinity {
            ttl: Duration::from_secs(ttl),
            gc_interval: Duration::from_secs(gc),
            max_clients,
        };

        // --- geo
        let geo_path = env
            .var("EDGEPROXY_GEOIP_PATH")
            .filter(|p| !p.trim().is_empty())
            .map(PathBuf::from)
            .or(raw.geo.db_path.filter(|p| !p.as_os_str().is_empty()));
        let default_region = raw
            .geo
            .default_region
            .unwrap_or_else(|| defaults::DEFAULT_GEO_REGION.into())
            .to_ascii_lowercase();
        // QA: "" or "e u" were taken, a region no backend can be registered
        // in (the API refuses it): clients outside the map matched nothing.
        let region_name = |r: &str| {
            format!(
                "{r:?} must be up to {} letters, digits, - or _, as a backend's region",
                crate::api::validate::MAX_REGION_LEN
            )
        };
        if !crate::api::validate::is_region(&default_region) {
            return Err(invalid("geo.default_region", region_name(&default_region)));
        }
        if let Some(regions) = &raw.geo.regions {
            // QA: a country listed under two regions went, silently, to the
            // one whose name sorts last.
            let mut region_of = BTreeMap::new();
            for (region, countries) in regions {
                if !crate::api::validate::is_region(&region.to_ascii_lowercase()) {
                    return Err(invalid(
                        format!("geo.regions.{region}"),
                        region_name(region),
                    ));
                }
                for c in countries {
                    let Some(country) = engine::snapshot::Country::parse(c) else {
                        return Err(invalid(
                            format!("geo.regions.{region}"),
                            format!("{c:?} is not a two-letter country code"),
                        ));
                    };
                    if let Some(other) = region_of.insert(country.to_string(), region) {
                        return Err(invalid(
                            format!("geo.regions.{region}"),
                            format!(
                                "{country} is also listed under {other}: a country is in one region"
                            ),
                        ));
                    }
                }
            }
        }
        let mut overrides = Vec::with_capacity(raw.geo.overrides.len());
        for (i, o) in raw.geo.overrides.into_iter().enumerate() {
            let cidr: ipnet::IpNet = o.cidr.trim().parse().map_err(|e| {
                invalid(
                    format!("geo.override[{i}].cidr"),
                    format!("{:?}: {e}", o.cidr),
                )
            })?;
            let country = engine::snapshot::Country::parse(&o.country).ok_or_else(|| {
                invalid(
                    format!("geo.override[{i}].country"),
                    format!("{:?} is not a two-letter country code", o.country),
                )
            })?;
            overrides.push(GeoOverride {
                cidr: cidr.trunc(),
                country: country.to_string(),
            });
        }
        let geo = Geo {
            db_path: geo_path,
            default_region,
            regions: raw.geo.regions.map(|m| {
                m.into_iter()
                    .map(|(r, cs)| {
                        (
                            r.to_ascii_lowercase(),
                            cs.iter().map(|c| c.trim().to_ascii_uppercase()).collect(),
                        )
                    })
                    .collect()
            }),
            overrides,
        };

        // --- limits
        let l = raw.limits;
        let attempts = l.connect_attempts.unwrap_or(defaults::CONNECT_ATTEMPTS);
        let connect_attempts = NonZeroU32::new(attempts)
            .filter(|n| n.get() <= 16)
            .ok_or_else(|| invalid("limits.connect_attempts", "must be in 1..=16"))?;
        let connect_ms = l.connect_timeout_ms.unwrap_or(defaults::CONNECT_TIMEOUT_MS);
        if !(1..=600_000).contains(&connect_ms) {
            return Err(invalid(
                "limits.connect_timeout_ms",
                "must be between 1 ms and 10 minutes",
            ));
        }
        // Bounded so that a deadline (`Instant` + the value) can always be
        // computed: u64::MAX written for "forever" made the shards panic.
        let idle_secs = l.idle_timeout_secs.unwrap_or(defaults::IDLE_TIMEOUT_SECS);
        if idle_secs > defaults::MAX_IDLE_TIMEOUT_SECS {
            return Err(invalid(
                "limits.idle_timeout_secs",
                "must be at most 604800 (7 days); 0 = never",
            ));
        }
        let grace_secs = l
            .shutdown_grace_secs
            .unwrap_or(defaults::SHUTDOWN_GRACE_SECS);
        if grace_secs > defaults::MAX_SHUTDOWN_GRACE_SECS {
            return Err(invalid(
                "limits.shutdown_grace_secs",
                "must be at most 86400 (1 day)",
            ));
        }
        let limits = Limits {
            max_connections: l.max_connections,
            max_connections_per_shard: l.max_connections_per_shard.unwrap_or(0),
            connect_timeout: Duration::from_millis(connect_ms),
            connect_attempts,
            idle_timeout: Duration::from_secs(idle_secs),
            shutdown_grace: Duration::from_secs(grace_secs),
        };

        // --- listeners
        // No key: the default listener. An empty list written out is not
        // "no listener" (a proxy that serves nothing; nothing documents such
        // a node) nor "the default" (it says the opposite): it is refused.
        if raw.listeners.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid(
                "listener",
                "is an empty list, and edgeproxy needs at least one listener: add a \
                 [[listener]] table, or remove `listener = []` for the default one on \
                 0.0.0.0:8080",
            ));
        }
        let mut raw_listeners = raw.listeners.unwrap_or_default();
        if raw_listeners.is_empty() {
            raw_listeners.push(RawListener {
                name: None,
                addr: defaults::LISTEN_ADDR.into(),
                app: None,
                accept_proxy_protocol: None,
                send_proxy_protocol: None,
                tls: None,
            });
        }
        apply_tls_env(env, &mut raw_listeners)?;
        // EDGEPROXY_LISTEN_ADDR replaces the first listener's address, which
        // with no file is the only one: the original's single listener.
        if let Some(addr) = env.var("EDGEPROXY_LISTEN_ADDR") {
            addr.trim()
                .parse::<SocketAddr>()
                .map_err(|e| ConfigError::Env {
                    var: "EDGEPROXY_LISTEN_ADDR",
                    value: addr.clone(),
                    reason: e.to_string(),
                })?;
            raw_listeners[0].addr = addr;
        }
        let mut listeners = Vec::with_capacity(raw_listeners.len());
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, rl) in raw_listeners.into_iter().enumerate() {
            let key = format!("listener[{i}]");
            let name = rl.name.unwrap_or_else(|| {
                if i == 0 {
                    "default".into()
                } else {
                    format!("listener-{i}")
                }
            });
            if name.is_empty() || !names.insert(name.clone()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("{name:?} is empty or used twice"),
                ));
            }
            let addr: SocketAddr = rl
                .addr
                .trim()
                .parse()
                .map_err(|e| invalid(format!("{key}.addr"), format!("{:?}: {e}", rl.addr)))?;
            if addr.port() != 0 && !addrs.insert(addr) {
                return Err(invalid(
                    format!("{key}.addr"),
                    format!("{addr} is used by another listener"),
                ));
            }
            let app = rl.app.map(|a| a.trim().to_string());
            if app.as_deref() == Some("") {
                return Err(invalid(
                    format!("{key}.app"),
                    "must not be empty (omit it to serve every app)",
                ));
            }
            listeners.push(Listener {
                name,
                addr,
                app,
                accept_proxy_protocol: rl.accept_proxy_protocol.unwrap_or(false),
                send_proxy_protocol: rl.send_proxy_protocol.unwrap_or(false),
                tls: rl
                    .tls
                    .map(|t| t.validate(&format!("{key}.tls")))
                    .transpose()?,
            });
        }

        // --- demo
        let demo_backends = raw.demo.backends.unwrap_or(0);
        if demo_backends > 16 {
            return Err(invalid("demo.backends", "at most 16"));
        }
        let demo = Demo {
            backends: demo_backends,
            app: raw.demo.app.unwrap_or_else(|| defaults::DEMO_APP.into()),
        };

        let dns = dns_section(raw.dns, env)?;
        let upgrade = crate::upgrade::config::from_raw(raw.upgrade, env, &routing.db_path)?;
        let replication = crate::replication::config::from_raw(raw.replication, env)?;
        let mesh = crate::mesh::config::from_raw(raw.mesh, env, &replication, &routing.db_path)?;

        let config = Config {
            pop,
            runtime,
            routing,
            affinity,
            geo,
            limits,
            listeners,
            demo,
            log: crate::log_config::from_raw(raw.log, env)?,
            metrics: metrics_from(raw.metrics, env)?,
            api: crate::api::config::from_raw(raw.api, env)?,
            geodns: crate::geodns::from_raw(raw.geodns, env, dns.enabled, &dns.domain)?,
            dns,
            replication,
            mesh,
            bgp: crate::bgp::config::from_raw(raw.bgp, env)?,
            health: crate::health::config::health_from_raw(raw.health, env)?,
            circuit_breaker: crate::health::config::circuit_from_raw(raw.circuit_breaker, env)?,
            rate_limit: crate::client_limits::from_raw(raw.rate_limit, env)?,
            pool: crate::pool_config::from_raw(raw.pool, env)?,
            upgrade,
            config_watch: crate::config_watch::from_raw(raw.config_watch, env)?,
            postgres: crate::pg_source::config::from_raw(raw.postgres, env)?,
        };
        crate::pg_source::config::check_combination(
            &config.postgres,
            crate::pg_source::config::RoutingDbWriters {
                api: config.api.enabled,
                replication: config.replication.enabled,
                demo_backends: config.demo.backends,
            },
        )?;
        Ok(config)
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// `[dns]` with `EDGEPROXY_DNS_ENABLED`, `EDGEPROXY_DNS_LISTEN_ADDR` and
/// `EDGEPROXY_DNS_DOMAIN` (the original's variables) over the file.
fn dns_section(raw: RawDns, env: &dyn Env) -> Result<Dns, ConfigError> {
    let enabled = env_bool(env, "EDGEPROXY_DNS_ENABLED")?
        .or(raw.enabled)
        .unwrap_or(false);
    let listen_addr = match env.var("EDGEPROXY_DNS_LISTEN_ADDR") {
        Some(value) => value
            .trim()
            .parse()
            .map_err(|e: std::net::AddrParseError| ConfigError::Env {
                var: "EDGEPROXY_DNS_LISTEN_ADDR",
                value: value.clone(),
                reason: e.to_string(),
            })?,
        None => {
            let text = raw
                .listen_addr
                .unwrap_or_else(|| defaults::DNS_LISTEN_ADDR.into());
            text.trim()
                .parse()
                .map_err(|e| invalid("dns.listen_addr", format!("{text:?}: {e}")))?
        }
    };
    let domain = match env.var("EDGEPROXY_DNS_DOMAIN") {
        Some(value) => dns::zone::parse_domain(&value).map_err(|e| ConfigError::Env {
            var: "EDGEPROXY_DNS_DOMAIN",
            value: value.clone(),
            reason: e.to_string(),
        })?,
        None => {
            let text = raw.domain.unwrap_or_else(|| defaults::DNS_DOMAIN.into());
            dns::zone::parse_domain(&text).map_err(|e| invalid("dns.domain", e.to_string()))?
        }
    };
    let ttl_secs = raw.ttl_secs.unwrap_or(defaults::DNS_TTL_SECS);
    if ttl_secs > 86_400 {
        return Err(invalid("dns.ttl_secs", "must be at most 86400 (one day)"));
    }
    let idle = raw
        .tcp_idle_timeout_secs
        .unwrap_or(defaults::DNS_TCP_IDLE_TIMEOUT_SECS);
    if !(1..=3600).contains(&idle) {
        return Err(invalid(
            "dns.tcp_idle_timeout_secs",
            "must be between 1 s and 1 hour",
        ));
    }
    let tcp_max_connections = NonZeroU32::new(
        raw.tcp_max_connections
            .unwrap_or(defaults::DNS_TCP_MAX_CONNECTIONS),
    )
    .filter(|n| n.get() <= 65_535)
    .ok_or_else(|| invalid("dns.tcp_max_connections", "must be in 1..=65535"))?;
    let udp_workers = match raw.udp_workers.unwrap_or(0) {
        0 => available_cores(),
        n if n > 64 => return Err(invalid("dns.udp_workers", "at most 64")),
        n => n,
    };
    let mut pops: Vec<DnsPop> = Vec::with_capacity(raw.pops.len());
    for (i, p) in raw.pops.into_iter().enumerate() {
        let key = format!("dns.pop[{i}]");
        let name = p.name.trim().to_string();
        if name.is_empty() || pops.iter().any(|q| q.name == name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{name:?} is empty or used twice"),
            ));
        }
        let region = p.region.trim().to_ascii_lowercase();
        let label_ok = (1..=63).contains(&region.len())
            && region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !label_ok {
            return Err(invalid(
                format!("{key}.region"),
                format!("{:?} is not one DNS label", p.region),
            ));
        }
        let addr = p
            .addr
            .trim()
            .parse()
            .map_err(|e| invalid(format!("{key}.addr"), format!("{:?}: {e}", p.addr)))?;
        pops.push(DnsPop { name, region, addr });
    }
    Ok(Dns {
        enabled,
        listen_addr,
        domain: domain.to_ascii().trim_end_matches('.').to_string(),
        ttl_secs,
        tcp_idle_timeout: Duration::from_secs(idle),
        tcp_max_connections,
        udp_workers,
        udp_batch_scheduling: raw.udp_batch_scheduling.unwrap_or(true),
        pops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        Config::from_raw(parse_toml(Path::new("t.toml"), text)?, env)
    }

    const NO_ENV: [(&str, &str); 0] = [];

    #[test]
    fn empty_file_gives_the_originals_defaults() {
        let c = from("", &NO_ENV).unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.routing.db_path, PathBuf::from("routing.db"));
        assert_eq!(c.pop.region, "sa");
        assert_eq!(c.affinity.ttl, Duration::from_secs(600));
        assert_eq!(c.affinity.gc_interval, Duration::from_secs(60));
        assert_eq!(c.routing.reload_interval, Duration::from_secs(1));
        assert!(c.runtime.shards >= 1);
    }

    #[test]
    fn original_env_vars_override_the_file() {
        let env = [
            ("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:9999"),
            ("EDGEPROXY_DB_PATH", "/tmp/x.db"),
            ("EDGEPROXY_REGION", "EU"),
            ("EDGEPROXY_DB_RELOAD_SECS", "3"),
            ("EDGEPROXY_BINDING_TTL_SECS", "5"),
            ("EDGEPROXY_BINDING_GC_INTERVAL_SECS", "7"),
            ("EDGEPROXY_GEOIP_PATH", "/tmp/geo.mmdb"),
            ("DEBUG", "1"),
        ];
        let c = from(
            "[pop]\nregion = \"ap\"\n[[listener]]\naddr = \"127.0.0.1:1\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(c.listeners[0].addr, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.routing.db_path, PathBuf::from("/tmp/x.db"));
        assert_eq!(c.pop.region, "eu");
        assert_eq!(c.routing.reload_interval, Duration::from_secs(3));
        assert_eq!(c.affinity.ttl, Duration::from_secs(5));
        assert_eq!(c.affinity.gc_interval, Duration::from_secs(7));
        assert_eq!(c.geo.db_path, Some(PathBuf::from("/tmp/geo.mmdb")));
        assert_eq!(c.log.level, "debug");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = from("[limits]\nmax_conections = 5\n", &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = from("[limits]\nconnect_timeout_ms = \"fast\"\n", &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("connect_timeout_ms"), "{err}");
    }

    #[test]
    fn bad_listener_address_is_named() {
        let err = from("[[listener]]\naddr = \"localhost:http\"\n", &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("listener[0].addr"), "{err}");
    }

    #[test]
    fn bad_env_value_is_named() {
        let err = from("", &[("EDGEPROXY_DB_RELOAD_SECS", "soon")]).unwrap_err();
        assert!(
            err.to_string().contains("EDGEPROXY_DB_RELOAD_SECS"),
            "{err}"
        );
        let err = from("", &[("EDGEPROXY_LISTEN_ADDR", "nope")]).unwrap_err();
        assert!(err.to_string().contains("EDGEPROXY_LISTEN_ADDR"), "{err}");
    }

    /// A value from the environment that parses but is out of range was
    /// refused naming only the key (`api.max_body_bytes`), which the file
    /// may not have at all: the variable that set it is named too. A key
    /// the file sets, with no variable, is named alone, and a credential's
    /// value is never shown.
    #[test]
    fn an_out_of_range_value_from_the_environment_names_the_variable() {
        for (var, value, key) in [
            ("EDGEPROXY_API_MAX_BODY_BYTES", "100", "api.max_body_bytes"),
            (
                "EDGEPROXY_HEARTBEAT_TTL_SECS",
                "0",
                "api.heartbeat_ttl_secs",
            ),
            (
                "EDGEPROXY_DB_RELOAD_SECS",
                "0",
                "routing.reload_interval_ms",
            ),
            (
                "EDGEPROXY_BINDING_TTL_SECS",
                "999999999",
                "affinity.ttl_secs",
            ),
            ("EDGEPROXY_REGION", "x.y", "pop.region"),
            (
                "EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS",
                "0",
                "health.interval_ms",
            ),
            (
                "EDGEPROXY_CIRCUIT_TIMEOUT_SECS",
                "0",
                "circuit_breaker.timeout_ms",
            ),
            (
                "EDGEPROXY_POOL_IDLE_TIMEOUT_SECS",
                "0",
                "pool.idle_timeout_secs",
            ),
        ] {
            let err = from("", &[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(key), "{var}: {err}");
            assert!(err.contains(&format!("{var}={value:?}")), "{var}: {err}");
        }
        // From the file: the key alone.
        let err = from("[api]\nmax_body_bytes = 100\n", &NO_ENV)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("EDGEPROXY_"), "{err}");
        // Every key of the table is one `check-config` prints.
        let c = from("", &NO_ENV).unwrap();
        let printed: toml::Table = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        for (var, key) in ENV_KEYS {
            let mut at = &printed;
            let (path, leaf) = key.rsplit_once('.').unwrap();
            for part in path.split('.') {
                at = at[part]
                    .as_table()
                    .unwrap_or_else(|| panic!("{var}: {key}"));
            }
            assert!(
                at.contains_key(leaf)
                    || ["webhook_url", "advertise_addr", "min_rtt_ms", "ca_file"].contains(&leaf),
                "{var}: {key} is not a key"
            );
        }
    }

    /// `listener = []` silently became the default listener on
    /// 0.0.0.0:8080.
    #[test]
    fn an_empty_listener_list_is_refused() {
        let err = from("listener = []\n", &NO_ENV).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("invalid value for `listener`: is an empty list"),
            "{text}"
        );
        assert!(text.contains("at least one listener"), "{text}");
        // No key at all is still the default listener.
        let c = from("", &NO_ENV).unwrap();
        assert_eq!(c.listeners.len(), 1);
    }

    #[test]
    fn duplicate_listener_names_and_addrs_rejected() {
        let two = "[[listener]]\nname=\"a\"\naddr=\"127.0.0.1:1000\"\n[[listener]]\nname=\"a\"\naddr=\"127.0.0.1:1001\"\n";
        assert!(from(two, &NO_ENV)
            .unwrap_err()
            .to_string()
            .contains("listener[1].name"));
        let two = "[[listener]]\naddr=\"127.0.0.1:1000\"\n[[listener]]\naddr=\"127.0.0.1:1000\"\n";
        assert!(from(two, &NO_ENV)
            .unwrap_err()
            .to_string()
            .contains("listener[1].addr"));
    }

    #[test]
    fn geo_overrides_and_regions_validated() {
        let ok = from(
            "[geo]\nregions = { sa = [\"br\"], eu = [\"DE\"] }\n[[geo.override]]\ncidr = \"10.1.2.0/24\"\ncountry = \"de\"\n",
            &NO_ENV,
        )
        .unwrap();
        assert_eq!(ok.geo.overrides[0].country, "DE");
        assert_eq!(ok.geo.regions.unwrap()["sa"], vec!["BR".to_string()]);
        let err = from(
            "[[geo.override]]\ncidr = \"10.1.2.0/33\"\ncountry = \"DE\"\n",
            &NO_ENV,
        )
        .unwrap_err();
        assert!(err.to_string().contains("geo.override[0].cidr"), "{err}");
        let err = from(
            "[[geo.override]]\ncidr = \"10.0.0.0/8\"\ncountry = \"Germany\"\n",
            &NO_ENV,
        )
        .unwrap_err();
        assert!(err.to_string().contains("geo.override[0].country"), "{err}");
    }

    #[test]
    fn tls_cert_or_key_from_the_environment_alone_names_the_variables() {
        let env = [
            ("EDGEPROXY_TLS_ENABLED", "true"),
            ("EDGEPROXY_TLS_CERT", "/etc/tls/a.pem"),
        ];
        let err = from("", &env).unwrap_err().to_string();
        assert!(err.contains("EDGEPROXY_TLS_CERT"), "{err}");
        assert!(err.contains("EDGEPROXY_TLS_KEY is not set"), "{err}");
        assert!(!err.contains("listener[1]"), "{err}");
        let env = [("EDGEPROXY_TLS_KEY", "/etc/tls/a.key")];
        let file = "[[listener]]\nname = \"t\"\naddr = \"127.0.0.1:8443\"\n[listener.tls]\nself_signed = true\n";
        let err = from(file, &env).unwrap_err().to_string();
        assert!(err.contains("EDGEPROXY_TLS_CERT is not set"), "{err}");
        assert!(err.contains("TLS listener \"t\""), "{err}");
        // Files from the environment replace a self-signed certificate.
        let env = [
            ("EDGEPROXY_TLS_CERT", "/etc/tls/a.pem"),
            ("EDGEPROXY_TLS_KEY", "/etc/tls/a.key"),
        ];
        let file = "[[listener]]\naddr = \"127.0.0.1:8443\"\n[listener.tls]\nself_signed = true\nself_signed_names = [\"x.test\"]\n";
        let ok = from(file, &env).unwrap();
        assert!(matches!(
            ok.listeners[0].tls.as_ref().unwrap().default,
            crate::tls::CertSource::Files { .. }
        ));
        let env = [("EDGEPROXY_TLS_KEY", "/etc/tls/a.key")];
        // The file's cert pairs with a key from the environment.
        let file = "[[listener]]\naddr = \"127.0.0.1:8443\"\n[listener.tls]\ncert = \"/f.pem\"\nkey = \"/f.key\"\n";
        let ok = from(file, &env).unwrap();
        let tls = ok.listeners[0].tls.as_ref().unwrap();
        assert_eq!(
            tls.default,
            crate::tls::CertSource::Files {
                cert: "/f.pem".into(),
                key: "/etc/tls/a.key".into()
            }
        );
    }

    #[test]
    fn geo_region_names_are_region_names_and_a_country_has_one() {
        for (text, key) in [
            ("[geo]\ndefault_region = \"\"\n", "geo.default_region"),
            ("[geo]\ndefault_region = \"e u\"\n", "geo.default_region"),
            ("[geo.regions]\n\"e u\" = [\"BR\"]\n", "geo.regions.e u"),
            (
                "[geo.regions]\nsa = [\"BR\"]\neu = [\"br\", \"PT\"]\n",
                "geo.regions.sa",
            ),
        ] {
            let err = from(text, &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let err = from(
            "[geo.regions]\nsa = [\"BR\"]\neu = [\"br\", \"PT\"]\n",
            &NO_ENV,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("BR is also listed under eu"),
            "{err}"
        );
        let ok = from(
            "[geo]\ndefault_region = \"Eu-West_1\"\n[geo.regions]\nap-1 = [\"JP\"]\n",
            &NO_ENV,
        )
        .unwrap();
        assert_eq!(ok.geo.default_region, "eu-west_1");
    }

    #[test]
    fn limits_bounds_enforced() {
        for (text, key) in [
            (
                "[limits]\nconnect_attempts = 0\n",
                "limits.connect_attempts",
            ),
            (
                "[limits]\nconnect_timeout_ms = 0\n",
                "limits.connect_timeout_ms",
            ),
            ("[runtime]\nbuffer_size = 10\n", "runtime.buffer_size"),
            (
                "[routing]\nreload_interval_ms = 0\n",
                "routing.reload_interval_ms",
            ),
            (
                "[affinity]\ngc_interval_secs = 0\n",
                "affinity.gc_interval_secs",
            ),
            (
                "[affinity]\ngc_interval_secs = 18446744073709551615\n",
                "affinity.gc_interval_secs",
            ),
            (
                "[affinity]\nttl_secs = 18446744073709551615\n",
                "affinity.ttl_secs",
            ),
            ("[affinity]\nttl_secs = 31536001\n", "affinity.ttl_secs"),
            ("[affinity]\nmax_clients = 0\n", "affinity.max_clients"),
            ("[pop]\nname = \"\"\n", "pop.name"),
            ("[pop]\nname = \"a\\nb\"\n", "pop.name"),
            ("[pop]\nregion = \"e u\"\n", "pop.region"),
            ("[pop]\nregion = \"eu.west\"\n", "pop.region"),
            (
                "[pop]\nregion = \"a-very-long-region-name-of-33-chars\"\n",
                "pop.region",
            ),
            ("[log]\nlevel = \"loud\"\n", "log.level"),
            (
                "[limits]\nidle_timeout_secs = 604801\n",
                "limits.idle_timeout_secs",
            ),
            (
                "[limits]\nidle_timeout_secs = 18446744073709551615\n",
                "limits.idle_timeout_secs",
            ),
            (
                "[limits]\nshutdown_grace_secs = 86401\n",
                "limits.shutdown_grace_secs",
            ),
            (
                "[limits]\nshutdown_grace_secs = 18446744073709551615\n",
                "limits.shutdown_grace_secs",
            ),
        ] {
            let err = from(text, &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn idle_timeout_and_shutdown_grace_accept_their_whole_range() {
        let c = from(
            "[limits]\nidle_timeout_secs = 604800\nshutdown_grace_secs = 86400\n",
            &NO_ENV,
        )
        .unwrap();
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(604_800));
        assert_eq!(c.limits.shutdown_grace, Duration::from_secs(86_400));
        let c = from(
            "[limits]\nidle_timeout_secs = 0\nshutdown_grace_secs = 0\n",
            &NO_ENV,
        )
        .unwrap();
        assert_eq!(c.limits.idle_timeout, Duration::ZERO);
        assert_eq!(c.limits.shutdown_grace, Duration::ZERO);
    }

    #[test]
    fn effective_config_renders_as_toml_and_reparses() {
        let c = from("[[listener]]\naddr=\"127.0.0.1:0\"\napp=\"web\"\n", &NO_ENV).unwrap();
        let text = c.to_toml();
        assert!(text.contains("app = \"web\""), "{text}");
        // The rendering is for humans, but it must at least be valid TOML.
        text.parse::<toml::Table>().unwrap();
    }

    #[test]
    fn metrics_off_by_default_and_enabled_by_env_address() {
        let c = from("", &NO_ENV).unwrap();
        assert!(!c.metrics.enabled);
        assert_eq!(c.metrics.listen_addr, "127.0.0.1:9090".parse().unwrap());
        let c = from("", &[("EDGEPROXY_METRICS_LISTEN_ADDR", "127.0.0.1:9191")]).unwrap();
        assert!(c.metrics.enabled);
        assert_eq!(c.metrics.listen_addr, "127.0.0.1:9191".parse().unwrap());
        let c = from(
            "[metrics]\nenabled = true\nlisten_addr = \"[::1]:0\"\n",
            &NO_ENV,
        )
        .unwrap();
        assert!(c.metrics.enabled);
        let err = from("[metrics]\nlisten_addr = \"nowhere\"\n", &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("metrics.listen_addr"), "{err}");
    }

    #[test]
    fn dns_is_off_by_default_with_the_originals_port_and_domain() {
        let c = from("", &NO_ENV).unwrap();
        assert!(!c.dns.enabled);
        assert_eq!(c.dns.listen_addr, "0.0.0.0:5353".parse().unwrap());
        assert_eq!(c.dns.domain, "internal");
        assert_eq!(c.dns.ttl_secs, 5);
        assert_eq!(c.dns.tcp_idle_timeout, Duration::from_secs(10));
        assert_eq!(c.dns.tcp_max_connections.get(), 256);
        assert!(c.dns.pops.is_empty());
    }

    #[test]
    fn dns_section_is_read_and_env_overrides_it() {
        let text = "[dns]\nenabled = false\nlisten_addr = \"127.0.0.1:53\"\ndomain = \"Svc.Internal.\"\nttl_secs = 30\ntcp_idle_timeout_secs = 4\ntcp_max_connections = 8\n[[dns.pop]]\nname = \"gru-1\"\nregion = \"SA\"\naddr = \"fdaa::1\"\n";
        let c = from(text, &NO_ENV).unwrap();
        assert_eq!(c.dns.listen_addr, "127.0.0.1:53".parse().unwrap());
        assert_eq!(c.dns.domain, "svc.internal");
        assert_eq!(c.dns.ttl_secs, 30);
        assert_eq!(c.dns.tcp_idle_timeout, Duration::from_secs(4));
        assert_eq!(c.dns.tcp_max_connections.get(), 8);
        assert_eq!(c.dns.pops[0].region, "sa");
        assert_eq!(
            c.dns.pops[0].addr,
            "fdaa::1".parse::<std::net::IpAddr>().unwrap()
        );
        let env = [
            ("EDGEPROXY_DNS_ENABLED", "true"),
            ("EDGEPROXY_DNS_LISTEN_ADDR", "127.0.0.1:5300"),
            ("EDGEPROXY_DNS_DOMAIN", "corp"),
        ];
        let c = from(text, &env).unwrap();
        assert!(c.dns.enabled);
        assert_eq!(c.dns.listen_addr, "127.0.0.1:5300".parse().unwrap());
        assert_eq!(c.dns.domain, "corp");
    }

    #[test]
    fn dns_values_are_validated_and_named() {
        for (text, key) in [
            ("[dns]\nlisten_addr = \"nowhere\"\n", "dns.listen_addr"),
            ("[dns]\ndomain = \"bad domain\"\n", "dns.domain"),
            ("[dns]\ndomain = \".\"\n", "dns.domain"),
            ("[dns]\nttl_secs = 86401\n", "dns.ttl_secs"),
            (
                "[dns]\ntcp_idle_timeout_secs = 0\n",
                "dns.tcp_idle_timeout_secs",
            ),
            (
                "[dns]\ntcp_max_connections = 0\n",
                "dns.tcp_max_connections",
            ),
            (
                "[[dns.pop]]\nname = \"\"\nregion = \"sa\"\naddr = \"10.0.0.1\"\n",
                "dns.pop[0].name",
            ),
            (
                "[[dns.pop]]\nname = \"a\"\nregion = \"s.a\"\naddr = \"10.0.0.1\"\n",
                "dns.pop[0].region",
            ),
            (
                "[[dns.pop]]\nname = \"a\"\nregion = \"sa\"\naddr = \"10.0.0.1:53\"\n",
                "dns.pop[0].addr",
            ),
            ("[dns]\nport = 53\n", "port"),
        ] {
            let err = from(text, &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        for (var, value) in [
            ("EDGEPROXY_DNS_ENABLED", "maybe"),
            ("EDGEPROXY_DNS_LISTEN_ADDR", "5353"),
            ("EDGEPROXY_DNS_DOMAIN", "a..b"),
        ] {
            let err = from("", &[(var, value)]).unwrap_err();
            assert!(err.to_string().contains(var), "{var}: {err}");
        }
    }

    #[test]
    fn dns_section_renders_back_to_an_equal_config() {
        let text = "[dns]\nenabled = true\nlisten_addr = \"[::1]:5353\"\nttl_secs = 0\n[[dns.pop]]\nname = \"fra-1\"\nregion = \"eu\"\naddr = \"10.9.0.1\"\n";
        let c = from(text, &NO_ENV).unwrap();
        let again = from(&c.to_toml(), &NO_ENV).unwrap();
        assert_eq!(again.dns, c.dns);
    }
}
