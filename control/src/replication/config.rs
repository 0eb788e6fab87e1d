//! `[replication]`: settings of replication between POPs.
//!
//! The original edgeProxy's variables work unchanged
//! (`EDGEPROXY_REPLICATION_ENABLED`, `_NODE_ID`, `_GOSSIP_ADDR`,
//! `_TRANSPORT_ADDR`, `_BOOTSTRAP_PEERS`, `_GOSSIP_INTERVAL_MS`,
//! `_SYNC_INTERVAL_MS`, `_CLUSTER_NAME`), plus `_SECRET` / `_SECRET_FILE`,
//! `_ACCEPT_SECRET` / `_ACCEPT_SECRET_FILE`, `_ADVERTISE_ADDR` and
//! `_INSECURE`. The secrets are read here, at load, so `check-config` catches
//! a missing or short one; they are never printed.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_env::{
    credential, env_bool, env_parse, invalid, ser_display, ser_ms, ser_secs, ConfigError,
    CredentialSources, Env,
};

use super::keys::ClusterSecret;

pub mod defaults {
    pub const GOSSIP_ADDR: &str = "0.0.0.0:4001";
    pub const TRANSPORT_ADDR: &str = "0.0.0.0:4002";
    pub const CLUSTER_NAME: &str = "edgeproxy";
    /// SWIM probe period. With the suspicion time (2 periods) a dead member
    /// is reported in about 4 s.
    pub const GOSSIP_INTERVAL_MS: u64 = 1000;
    /// Anti-entropy: one exchange with a random member this often. A lost
    /// broadcast is repaired within about one interval.
    pub const SYNC_INTERVAL_MS: u64 = 2000;
    /// How long local changes are gathered before one broadcast.
    pub const BROADCAST_DELAY_MS: u64 = 5;
    /// Deleted rows (tombstones) are kept this long, so a late write from a
    /// POP that was away cannot bring a deleted row back.
    pub const TOMBSTONE_TTL_SECS: u64 = 7 * 24 * 3600;
    pub const MIN_SECRET_LEN: usize = 16;
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplication {
    pub enabled: Option<bool>,
    pub node_id: Option<String>,
    pub gossip_addr: Option<String>,
    pub transport_addr: Option<String>,
    pub advertise_addr: Option<String>,
    pub bootstrap_peers: Option<Vec<String>>,
    pub gossip_interval_ms: Option<u64>,
    pub sync_interval_ms: Option<u64>,
    pub broadcast_delay_ms: Option<u64>,
    pub tombstone_ttl_secs: Option<u64>,
    pub cluster_name: Option<String>,
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub accept_secret: Option<String>,
    pub accept_secret_file: Option<PathBuf>,
    pub insecure: Option<bool>,
}

/// The effective `[replication]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replication {
    pub enabled: bool,
    /// This POP's id in the cluster (unique). Default: the host name.
    pub node_id: String,
    /// Where gossip (SWIM, UDP) listens.
    #[serde(serialize_with = "ser_display")]
    pub gossip_addr: SocketAddr,
    /// Where the QUIC transport (UDP) listens.
    #[serde(serialize_with = "ser_display")]
    pub transport_addr: SocketAddr,
    /// The address other POPs reach this one at (NAT, or a wildcard bind);
    /// the ports are those of `gossip_addr` and `transport_addr`. `None`:
    /// the bind address, or when that is a wildcard the local address that
    /// routes to the first bootstrap peer.
    pub advertise_addr: Option<IpAddr>,
    /// Gossip addresses of members to join through (`host:port`).
    pub bootstrap_peers: Vec<String>,
    #[serde(rename = "gossip_interval_ms", serialize_with = "ser_ms")]
    pub gossip_interval: Duration,
    #[serde(rename = "sync_interval_ms", serialize_with = "ser_ms")]
    pub sync_interval: Duration,
    #[serde(rename = "broadcast_delay_ms", serialize_with = "ser_ms")]
    pub broadcast_delay: Duration,
    #[serde(rename = "tombstone_ttl_secs", serialize_with = "ser_secs")]
    pub tombstone_ttl: Duration,
    pub cluster_name: String,
    /// Never serialized: `check-config` must not print secrets.
    #[serde(skip)]
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
    /// A second secret whose holders are accepted too (gossip opened with
    /// its key, QUIC certificates of its CA trusted); this POP still seals
    /// and signs with `secret` only. For rotating the secret without a
    /// partition (README "Rotating the cluster secret"). Never serialized.
    #[serde(skip)]
    pub accept_secret: Option<Secret>,
    pub accept_secret_file: Option<PathBuf>,
    /// Run without a secret: no authentication, no encryption.
    pub insecure: bool,
}

/// The cluster secret as configured. `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn cluster_secret(&self) -> ClusterSecret {
        ClusterSecret::new(self.0.as_bytes())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Gossip intervals a starting POP waits for the cluster's copy of its
/// own `pops` row when no member answers (see
/// [`Replication::own_row_patience`]): long enough for a join and one
/// exchange over a lossy WAN link (one lost announcement included), short
/// enough that the first POP of a new cluster starts at once.
pub const OWN_ROW_PATIENCE_INTERVALS: u32 = 3;

/// Gossip intervals it waits when members answer but no exchange completes
/// (see [`Replication::own_row_longest_wait`]): long enough for a POP moved
/// to a new address to be accepted, which waits until its old identity is
/// declared down (a probe, a suspicion of 3 intervals, about 4 intervals in
/// all in a namespace test), then for one exchange.
pub const OWN_ROW_LONGEST_WAIT_INTERVALS: u32 = 10;

impl Replication {
    /// How long a starting POP waits for an exchange with a member, no
    /// member answering, before it writes its row without the cluster's
    /// copy: [`OWN_ROW_PATIENCE_INTERVALS`] gossip intervals (3 s by
    /// default).
    pub fn own_row_patience(&self) -> Duration {
        self.gossip_interval * OWN_ROW_PATIENCE_INTERVALS
    }

    /// The same wait while members answer gossip:
    /// [`OWN_ROW_LONGEST_WAIT_INTERVALS`] gossip intervals (10 s by
    /// default).
    pub fn own_row_longest_wait(&self) -> Duration {
        self.gossip_interval * OWN_ROW_LONGEST_WAIT_INTERVALS
    }

    /// The secret both channels are keyed from (a well-known stand-in in
    /// insecure mode).
    pub fn cluster_secret(&self) -> ClusterSecret {
        match &self.secret {
            Some(s) => s.cluster_secret(),
            None => ClusterSecret::insecure(&self.cluster_name),
        }
    }

    /// The second secret accepted from peers, if any.
    pub fn accepted_secret(&self) -> Option<ClusterSecret> {
        self.accept_secret.as_ref().map(Secret::cluster_secret)
    }
}

/// This machine's host name, the default node id (empty if the system
/// reports none).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    name.trim().to_string()
}

/// True for host names that many machines share: a container or a fresh
/// VM left as `localhost`, the kernel's `(none)`, none at all. Taken as
/// node ids, every POP so named would share one id.
fn generic_host_name(name: &str) -> bool {
    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
    let host = name.split('.').next().unwrap_or("");
    name.is_empty()
        || matches!(
            host,
            "localhost" | "localhost4" | "localhost6" | "ip6-localhost" | "ip6-loopback"
        )
        || name == "(none)"
}

fn socket_addr(
    env: &dyn Env,
    var: &'static str,
    raw: Option<String>,
    key: &str,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    match env.var(var) {
        Some(v) => v
            .trim()
            .parse()
            .map_err(|e: std::net::AddrParseError| ConfigError::Env {
                var,
                value: v.clone(),
                reason: e.to_string(),
            }),
        None => {
            let text = raw.unwrap_or_else(|| default.into());
            text.trim()
                .parse()
                .map_err(|e| invalid(key, format!("{text:?}: {e}")))
        }
    }
}

/// A node id: what other POPs, logs and the `pops` table call this POP.
fn check_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!(
            "{id:?}: only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    Ok(())
}

/// `host:port`, with a host name or an IP (IPv6 in brackets).
fn check_peer(peer: &str) -> Result<(), String> {
    if peer.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match peer.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(format!("{peer:?} is not host:port")),
    }
}

fn check_secret(secret: &str) -> Result<Secret, String> {
    let secret = secret.trim();
    if secret.len() < defaults::MIN_SECRET_LEN {
        return Err(format!(
            "must be at least {} characters (e.g. `head -c 32 /dev/urandom | base64`)",
            defaults::MIN_SECRET_LEN
        ));
    }
    Ok(Secret(secret.to_string()))
}

pub fn from_raw(raw: RawReplication, env: &dyn Env) -> Result<Replication, ConfigError> {
    from_raw_on(raw, env, hostname)
}

/// [`from_raw`] with the host name from `host_name` (tests pass their own).
fn from_raw_on(
    raw: RawReplication,
    env: &dyn Env,
    host_name: impl FnOnce() -> String,
) -> Result<Replication, ConfigError> {
    let enabled = env_bool(env, "EDGEPROXY_REPLICATION_ENABLED")?
        .or(raw.enabled)
        .unwrap_or(false);
    let node_id = match env.var("EDGEPROXY_REPLICATION_NODE_ID") {
        Some(v) => {
            let v = v.trim().to_string();
            check_node_id(&v).map_err(|reason| ConfigError::Env {
                var: "EDGEPROXY_REPLICATION_NODE_ID",
                value: v.clone(),
                reason,
            })?;
            v
        }
        None => match raw.node_id {
            Some(v) => {
                let v = v.trim().to_string();
                check_node_id(&v).map_err(|r| invalid("replication.node_id", r))?;
                v
            }
            None => {
                let host = host_name();
                // Two POPs with one id write conflicting rows under the same
                // versions, and are ignored by the cluster while the other
                // lives: refused here, where the cause is plain, rather than
                // found later in an ERROR at every POP. An id set on purpose
                // is the operator's choice, whatever it is.
                if enabled && generic_host_name(&host) {
                    return Err(invalid(
                        "replication.node_id",
                        format!(
                            "not set, and the host name {host:?} that would be the default is \
                             not unique to this POP (every POP so named would share one id): \
                             set replication.node_id or EDGEPROXY_REPLICATION_NODE_ID to an id \
                             of its own (e.g. gru-1)"
                        ),
                    ));
                }
                let host = if host.is_empty() {
                    "edgeproxy".to_string()
                } else {
                    host
                };
                // Host names may hold characters a node id may not.
                let h: String = host
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                            c
                        } else {
                            '-'
                        }
                    })
                    .take(63)
                    .collect();
                h
            }
        },
    };
    let gossip_addr = socket_addr(
        env,
        "EDGEPROXY_REPLICATION_GOSSIP_ADDR",
        raw.gossip_addr,
        "replication.gossip_addr",
        defaults::GOSSIP_ADDR,
    )?;
    let transport_addr = socket_addr(
        env,
        "EDGEPROXY_REPLICATION_TRANSPORT_ADDR",
        raw.transport_addr,
        "replication.transport_addr",
        defaults::TRANSPORT_ADDR,
    )?;
    if enabled && gossip_addr == transport_addr && gossip_addr.port() != 0 {
        return Err(invalid(
            "replication.transport_addr",
            "must differ from replication.gossip_addr",
        ));
    }
    let advertise_addr = match env.var("EDGEPROXY_REPLICATION_ADVERTISE_ADDR") {
        Some(v) if !v.trim().is_empty() => Some(v.trim().parse().map_err(
            |e: std::net::AddrParseError| ConfigError::Env {
                var: "EDGEPROXY_REPLICATION_ADVERTISE_ADDR",
                value: v.clone(),
                reason: e.to_string(),
            },
        )?),
        _ => match raw.advertise_addr.filter(|a| !a.trim().is_empty()) {
            Some(a) => Some(a.trim().parse().map_err(|e| {
                invalid(
                    "replication.advertise_addr",
                    format!("{a:?}: {e} (an IP address, no port)"),
                )
            })?),
            None => None,
        },
    };
    // Not only the wildcard: a multicast or broadcast address (QA:
    // 224.0.0.1 was taken) reaches no one POP either.
    if let Some(why) = advertise_addr.and_then(engine::snapshot::not_unicast) {
        return Err(invalid(
            "replication.advertise_addr",
            format!("must be an address other POPs can reach, one host's: it is {why}"),
        ));
    }
    let bootstrap_peers: Vec<String> = match env.var("EDGEPROXY_REPLICATION_BOOTSTRAP_PEERS") {
        Some(list) => {
            let peers: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect();
            for p in &peers {
                check_peer(p).map_err(|reason| ConfigError::Env {
                    var: "EDGEPROXY_REPLICATION_BOOTSTRAP_PEERS",
                    value: list.clone(),
                    reason,
                })?;
            }
            peers
        }
        None => {
            let peers: Vec<String> = raw
                .bootstrap_peers
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.trim().to_string())
                .collect();
            for (i, p) in peers.iter().enumerate() {
                check_peer(p)
                    .map_err(|r| invalid(format!("replication.bootstrap_peers[{i}]"), r))?;
            }
            peers
        }
    };
    let interval = |var: &'static str,
                    raw: Option<u64>,
                    key: &str,
                    default: u64,
                    range: std::ops::RangeInclusive<u64>|
     -> Result<Duration, ConfigError> {
        let ms = env_parse::<u64>(env, var)?.or(raw).unwrap_or(default);
        if !range.contains(&ms) {
            return Err(invalid(
                key,
                format!(
                    "{ms} ms is out of range {}..={} ms",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(Duration::from_millis(ms))
    };
    let gossip_interval = interval(
        "EDGEPROXY_REPLICATION_GOSSIP_INTERVAL_MS",
        raw.gossip_interval_ms,
        "replication.gossip_interval_ms",
        defaults::GOSSIP_INTERVAL_MS,
        50..=60_000,
    )?;
    let sync_interval = interval(
        "EDGEPROXY_REPLICATION_SYNC_INTERVAL_MS",
        raw.sync_interval_ms,
        "replication.sync_interval_ms",
        defaults::SYNC_INTERVAL_MS,
        100..=3_600_000,
    )?;
    let broadcast_delay = interval(
        "EDGEPROXY_REPLICATION_BROADCAST_DELAY_MS",
        raw.broadcast_delay_ms,
        "replication.broadcast_delay_ms",
        defaults::BROADCAST_DELAY_MS,
        0..=10_000,
    )?;
    let ttl_secs = raw
        .tombstone_ttl_secs
        .unwrap_or(defaults::TOMBSTONE_TTL_SECS);
    if !(60..=365 * 24 * 3600).contains(&ttl_secs) {
        return Err(invalid(
            "replication.tombstone_ttl_secs",
            "must be between 60 s and 365 days",
        ));
    }
    let cluster_name = env
        .var("EDGEPROXY_REPLICATION_CLUSTER_NAME")
        .or(raw.cluster_name)
        .unwrap_or_else(|| defaults::CLUSTER_NAME.into())
        .trim()
        .to_string();
    if cluster_name.is_empty() || cluster_name.len() > 64 {
        return Err(invalid(
            "replication.cluster_name",
            "must be 1 to 64 characters",
        ));
    }
    let insecure = env_bool(env, "EDGEPROXY_REPLICATION_INSECURE")?
        .or(raw.insecure)
        .unwrap_or(false);
    let (secret, secret_file) = secret_from(&SECRET, raw.secret, raw.secret_file, env)?;
    if enabled && secret.is_none() && !insecure {
        return Err(invalid(
            "replication.secret",
            "replication needs a cluster secret shared by every POP (replication.secret, \
             replication.secret_file, EDGEPROXY_REPLICATION_SECRET or _SECRET_FILE); \
             set replication.insecure = true to run without authentication",
        ));
    }
    if secret.is_some() && insecure {
        return Err(invalid(
            "replication.insecure",
            "a secret is set: remove it or remove insecure = true",
        ));
    }
    let (accept_secret, accept_secret_file) = secret_from(
        &ACCEPT_SECRET,
        raw.accept_secret,
        raw.accept_secret_file,
        env,
    )?;
    if accept_secret.is_some() && secret.is_none() {
        return Err(invalid(
            "replication.accept_secret",
            "is a second secret accepted beside replication.secret while the secret is \
             rotated: set replication.secret (or _SECRET_FILE) too",
        ));
    }
    Ok(Replication {
        enabled,
        node_id,
        gossip_addr,
        transport_addr,
        advertise_addr,
        bootstrap_peers,
        gossip_interval,
        sync_interval,
        broadcast_delay,
        tombstone_ttl: Duration::from_secs(ttl_secs),
        cluster_name,
        secret,
        secret_file,
        accept_secret,
        accept_secret_file,
        insecure,
    })
}

/// Where the cluster secret is given. The environment wins over the file;
/// within one source, a literal secret and a secret file are exclusive (QA:
/// with both in the file the literal was used and the file never read, so a
/// rotation done by adding `secret_file` kept the old secret without a word;
/// and a file's `secret` beat `EDGEPROXY_REPLICATION_SECRET_FILE`). One rule
/// with `api.token` / `token_file`: [`credential`].
const SECRET: CredentialSources = CredentialSources {
    key: "replication.secret",
    file_key: "replication.secret_file",
    var: "EDGEPROXY_REPLICATION_SECRET",
    file_var: "EDGEPROXY_REPLICATION_SECRET_FILE",
    hidden: "<redacted>",
};

/// Where the second secret accepted while the secret is rotated is given
/// (the same rules, its own keys and variables).
const ACCEPT_SECRET: CredentialSources = CredentialSources {
    key: "replication.accept_secret",
    file_key: "replication.accept_secret_file",
    var: "EDGEPROXY_REPLICATION_ACCEPT_SECRET",
    file_var: "EDGEPROXY_REPLICATION_ACCEPT_SECRET_FILE",
    hidden: "<redacted>",
};

/// A secret from `sources` (see [`credential`]).
fn secret_from(
    sources: &CredentialSources,
    file_secret: Option<String>,
    file_path: Option<PathBuf>,
    env: &dyn Env,
) -> Result<(Option<Secret>, Option<PathBuf>), ConfigError> {
    credential(
        sources,
        env.var(sources.var),
        env.var(sources.file_var).map(PathBuf::from),
        file_secret.as_deref(),
        file_path.as_deref(),
        check_secret,
        read_secret_file,
    )
}

/// A secret from its file, checked as one given in the config.
fn read_secret_file(path: &std::path::Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    check_secret(&text).map_err(|r| format!("{}: {r}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str, env: &dyn Env) -> Result<Replication, ConfigError> {
        #[derive(Deserialize)]
        struct Wrap {
            #[serde(default)]
            replication: RawReplication,
        }
        let w: Wrap = toml::from_str(toml_text).unwrap();
        from_raw(w.replication, env)
    }

    const NO_ENV: [(&str, &str); 0] = [];

    #[test]
    fn off_by_default_with_the_originals_addresses() {
        let r = parse("", &NO_ENV).unwrap();
        assert!(!r.enabled);
        assert_eq!(r.gossip_addr, "0.0.0.0:4001".parse().unwrap());
        assert_eq!(r.transport_addr, "0.0.0.0:4002".parse().unwrap());
        assert_eq!(r.cluster_name, "edgeproxy");
        assert!(!r.node_id.is_empty());
        assert_eq!(r.gossip_interval, Duration::from_secs(1));
    }

    #[test]
    fn the_originals_variables_override_the_file() {
        let env = [
            ("EDGEPROXY_REPLICATION_ENABLED", "true"),
            ("EDGEPROXY_REPLICATION_NODE_ID", "gru-1"),
            ("EDGEPROXY_REPLICATION_GOSSIP_ADDR", "10.0.0.1:5001"),
            ("EDGEPROXY_REPLICATION_TRANSPORT_ADDR", "10.0.0.1:5002"),
            (
                "EDGEPROXY_REPLICATION_BOOTSTRAP_PEERS",
                "10.0.0.2:5001, pop-b.example:5001",
            ),
            ("EDGEPROXY_REPLICATION_GOSSIP_INTERVAL_MS", "500"),
            ("EDGEPROXY_REPLICATION_SYNC_INTERVAL_MS", "3000"),
            ("EDGEPROXY_REPLICATION_CLUSTER_NAME", "prod"),
            ("EDGEPROXY_REPLICATION_SECRET", "0123456789abcdef0123"),
        ];
        let r = parse(
            "[replication]\nnode_id = \"file\"\ncluster_name = \"x\"\n",
            &env,
        )
        .unwrap();
        assert!(r.enabled);
        assert_eq!(r.node_id, "gru-1");
        assert_eq!(r.gossip_addr.port(), 5001);
        assert_eq!(r.bootstrap_peers, ["10.0.0.2:5001", "pop-b.example:5001"]);
        assert_eq!(r.gossip_interval, Duration::from_millis(500));
        assert_eq!(r.sync_interval, Duration::from_secs(3));
        assert_eq!(r.cluster_name, "prod");
        assert!(r.secret.is_some());
    }

    #[test]
    fn a_secret_and_a_secret_file_from_one_source_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.secret");
        std::fs::write(&path, "from-the-file-0123456789\n").unwrap();
        let file = format!("secret_file = {:?}", path.display().to_string());
        // Both in the file: the literal won and the file was never read.
        let both = format!("[replication]\nsecret = \"0123456789abcdef0123\"\n{file}\n");
        let err = parse(&both, &NO_ENV).unwrap_err().to_string();
        assert!(
            err.contains("replication.secret") && err.contains("not both"),
            "{err}"
        );
        // Both in the environment.
        let env = [
            ("EDGEPROXY_REPLICATION_SECRET", "0123456789abcdef0123"),
            ("EDGEPROXY_REPLICATION_SECRET_FILE", path.to_str().unwrap()),
        ];
        let err = parse("", &env).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
        // The environment's file wins over the file's literal secret.
        let env = [("EDGEPROXY_REPLICATION_SECRET_FILE", path.to_str().unwrap())];
        let r = parse("[replication]\nsecret = \"0123456789abcdef0123\"\n", &env).unwrap();
        assert_eq!(r.secret_file.as_deref(), Some(path.as_path()));
        let from_file = parse(&format!("[replication]\n{file}\n"), &NO_ENV).unwrap();
        assert!(r.secret.is_some() && r.secret == from_file.secret);
    }

    #[test]
    fn enabling_without_a_secret_is_refused_unless_insecure() {
        let err = parse("[replication]\nenabled = true\n", &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("needs a cluster secret"), "{err}");
        let r = parse("[replication]\nenabled = true\ninsecure = true\n", &NO_ENV).unwrap();
        assert!(r.insecure && r.secret.is_none());
        let err = parse("[replication]\nsecret = \"short\"\n", &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("node_id = \"a b\"", "replication.node_id"),
            ("gossip_addr = \"nope\"", "replication.gossip_addr"),
            (
                "bootstrap_peers = [\"10.0.0.1\"]",
                "replication.bootstrap_peers[0]",
            ),
            ("gossip_interval_ms = 0", "replication.gossip_interval_ms"),
            ("advertise_addr = \"0.0.0.0\"", "replication.advertise_addr"),
            (
                "advertise_addr = \"224.0.0.1\"",
                "replication.advertise_addr",
            ),
            (
                "advertise_addr = \"255.255.255.255\"",
                "replication.advertise_addr",
            ),
            ("advertise_addr = \"ff02::1\"", "replication.advertise_addr"),
            ("cluster_name = \"\"", "replication.cluster_name"),
        ] {
            let err = parse(&format!("[replication]\n{text}\n"), &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    /// QA: in a container whose host name is `localhost`, every POP
    /// started with the default id `localhost`.
    #[test]
    fn a_default_id_from_a_host_name_many_machines_share_is_refused() {
        let on = |host: &'static str, text: &str, env: &dyn Env| {
            #[derive(Deserialize)]
            struct Wrap {
                replication: RawReplication,
            }
            let w: Wrap = toml::from_str(text).unwrap();
            from_raw_on(w.replication, env, || host.to_string())
        };
        let enabled = "[replication]\nenabled = true\ninsecure = true\n";
        for host in [
            "localhost",
            "localhost.localdomain",
            "LOCALHOST.",
            "localhost6.localdomain6",
            "ip6-localhost",
            "(none)",
            "",
        ] {
            let err = on(host, enabled, &NO_ENV).unwrap_err().to_string();
            assert!(err.contains("replication.node_id"), "{host:?}: {err}");
            assert!(err.contains("EDGEPROXY_REPLICATION_NODE_ID"), "{err}");
            assert!(err.contains(&format!("{host:?}")), "names the host: {err}");
        }
        // A host name of its own is a fine default.
        let r = on("gru-edge-1.example.net", enabled, &NO_ENV).unwrap();
        assert_eq!(r.node_id, "gru-edge-1.example.net");
        assert_eq!(
            on("localhost-gru", enabled, &NO_ENV).unwrap().node_id,
            "localhost-gru"
        );
        // An id set on purpose is kept, even on such a host.
        let r = on(
            "localhost",
            &format!("{enabled}node_id = \"gru-1\"\n"),
            &NO_ENV,
        )
        .unwrap();
        assert_eq!(r.node_id, "gru-1");
        let env = [("EDGEPROXY_REPLICATION_NODE_ID", "fra-1")];
        assert_eq!(on("localhost", enabled, &env).unwrap().node_id, "fra-1");
        // Replication off: the id is unused, nothing to refuse.
        assert!(on("localhost", "[replication]\n", &NO_ENV).is_ok());
    }

    #[test]
    fn the_secret_is_never_printed() {
        let r = parse(
            "[replication]\nenabled = true\nsecret = \"supersecretsupersecret\"\n",
            &NO_ENV,
        )
        .unwrap();
        assert!(!format!("{r:?}").contains("supersecret"));
        assert!(!toml::to_string(&r).unwrap().contains("supersecret"));
    }

    #[test]
    fn a_second_secret_is_accepted_only_beside_a_secret_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("next");
        std::fs::write(&path, "the-next-secret-0123456789\n").unwrap();
        let r = parse(
            &format!(
                "[replication]\nenabled = true\nsecret = \"supersecretsupersecret\"\n\
                 accept_secret_file = {path:?}\n"
            ),
            &NO_ENV,
        )
        .unwrap();
        assert_eq!(
            r.accepted_secret().map(|s| s.gossip_key()),
            Some(ClusterSecret::new("the-next-secret-0123456789").gossip_key())
        );
        let r = parse(
            "[replication]\nenabled = true\nsecret = \"supersecretsupersecret\"\n",
            &[(
                "EDGEPROXY_REPLICATION_ACCEPT_SECRET",
                "acceptedacceptedaccepted",
            )],
        )
        .unwrap();
        assert!(r.accept_secret.is_some());
        assert!(!format!("{r:?}").contains("acceptedaccepted"));
        assert!(!toml::to_string(&r).unwrap().contains("acceptedaccepted"));
        let err = parse(
            "[replication]\nenabled = true\ninsecure = true\naccept_secret = \"acceptedacceptedaccepted\"\n",
            &NO_ENV,
        )
        .unwrap_err();
        assert!(err.to_string().contains("set replication.secret"), "{err}");
        let err = parse(
            "[replication]\nenabled = true\nsecret = \"supersecretsupersecret\"\naccept_secret = \"short\"\n",
            &NO_ENV,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("replication.accept_secret"),
            "{err}"
        );
    }

    #[test]
    fn a_secret_file_is_read_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "from-a-file-0123456789\n").unwrap();
        let r = parse(
            &format!("[replication]\nenabled = true\nsecret_file = {:?}\n", path),
            &NO_ENV,
        )
        .unwrap();
        assert!(r.secret.is_some());
        let err = parse(
            "[replication]\nenabled = true\nsecret_file = \"/nonexistent/secret\"\n",
            &NO_ENV,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("cannot read /nonexistent/secret"),
            "{err}"
        );
    }
}
