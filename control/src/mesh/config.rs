//! `[mesh]`: the WireGuard mesh between POPs and its 6PN addressing.
//!
//! Variables (override the file): `EDGEPROXY_MESH_ENABLED`,
//! `EDGEPROXY_MESH_LISTEN_PORT`, `EDGEPROXY_MESH_PRIVATE_KEY_FILE`,
//! `EDGEPROXY_6PN_PREFIX`, and `EDGEPROXY_MESH_INTERFACE`,
//! `EDGEPROXY_MESH_ENDPOINT`, `EDGEPROXY_MESH_IMPLEMENTATION`,
//! `EDGEPROXY_6PN_POP_SUBNET`. The mesh follows cluster membership, so it
//! needs `[replication]`; the cluster prefix, when not configured, is
//! derived from the cluster secret (see `addressing`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::addressing::{subnet_for_node, ClusterPrefix, PopPrefix};
use crate::config_env::{env_bool, env_parse, invalid, ConfigError, Env};
use crate::replication::config::Replication;

pub mod defaults {
    /// The WireGuard interface's name.
    pub const INTERFACE: &str = "ep6pn";
    /// WireGuard's customary port.
    pub const LISTEN_PORT: u16 = 51820;
    /// File name of the private key, next to `routing.db`.
    pub const KEY_FILE_NAME: &str = "mesh.key";
    /// 1500 minus WireGuard's overhead over IPv6 (40 + 8 + 32): fits any
    /// 1500-byte path whether the underlay is IPv4 or IPv6 (wg-quick's
    /// default).
    pub const MTU: u16 = 1420;
    /// Keeps NAT mappings and sessions warm; what WireGuard's docs advise.
    pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;
    /// How often each peer's path is pinged through the tunnel: a blocked
    /// path is said 7 to 9 s after it was blocked (see `probe_watch`).
    pub const PROBE_INTERVAL_SECS: u16 = 2;
    pub const WIREGUARD_GO: &str = "wireguard-go";
}

/// Which WireGuard runs the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Implementation {
    /// The kernel module when it is loaded (or loadable), else embedded.
    Auto,
    /// The kernel module, through netlink.
    Kernel,
    /// In-process userspace WireGuard (gotatun) on a TUN device.
    Embedded,
    /// A `wireguard-go` child process, configured over its UAPI socket.
    WireguardGo,
}

impl Implementation {
    pub fn as_str(&self) -> &'static str {
        match self {
            Implementation::Auto => "auto",
            Implementation::Kernel => "kernel",
            Implementation::Embedded => "embedded",
            Implementation::WireguardGo => "wireguard-go",
        }
    }
}

impl FromStr for Implementation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Implementation::Auto),
            "kernel" => Ok(Implementation::Kernel),
            "embedded" | "userspace" | "gotatun" => Ok(Implementation::Embedded),
            "wireguard-go" => Ok(Implementation::WireguardGo),
            other => Err(format!(
                "{other:?} is not one of auto, kernel, embedded, wireguard-go"
            )),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMesh {
    pub enabled: Option<bool>,
    pub implementation: Option<String>,
    pub interface: Option<String>,
    pub listen_port: Option<u16>,
    pub private_key_file: Option<PathBuf>,
    pub prefix: Option<String>,
    pub pop_subnet: Option<u16>,
    pub endpoint: Option<String>,
    pub mtu: Option<u16>,
    pub persistent_keepalive_secs: Option<u16>,
    pub probe_interval_secs: Option<u16>,
    pub wireguard_go: Option<PathBuf>,
}

/// The effective `[mesh]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mesh {
    pub enabled: bool,
    pub implementation: Implementation,
    /// Interface name (≤ 15 bytes).
    pub interface: String,
    /// UDP port WireGuard listens on (all addresses).
    pub listen_port: u16,
    /// The private key (created with mode 0600 on first start).
    pub private_key_file: PathBuf,
    /// The cluster's ULA /48; `None`: derived from the cluster secret.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt")]
    pub prefix: Option<ClusterPrefix>,
    /// This POP's 16-bit subnet ID; `None`: from the node id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pop_subnet: Option<u16>,
    /// Where other POPs send this POP's WireGuard traffic; `None`: the
    /// replication advertise address and `listen_port`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt")]
    pub endpoint: Option<SocketAddr>,
    pub mtu: u16,
    /// 0 = off.
    pub persistent_keepalive_secs: u16,
    /// Seconds between two pings of every peer's 6PN address through the
    /// tunnel (0 = off: a blocked path is then judged from the handshake
    /// age alone, which takes minutes). 1..=60; each round costs a 56-byte
    /// packet each way per peer (124 bytes on the wire over IPv4).
    pub probe_interval_secs: u16,
    /// The binary for `implementation = "wireguard-go"`.
    pub wireguard_go: PathBuf,
}

fn ser_opt<T: std::fmt::Display, S: serde::Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// This POP's place in the 6PN plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SixPn {
    pub cluster: ClusterPrefix,
    pub pop: PopPrefix,
    /// Whether the cluster prefix was derived (not configured).
    pub derived: bool,
}

impl SixPn {
    pub fn pop_address(&self) -> std::net::Ipv6Addr {
        self.pop.pop_address()
    }
}

impl Mesh {
    /// The cluster prefix and this POP's /64, as configured or derived.
    pub fn six_pn(&self, replication: &Replication) -> SixPn {
        let (cluster, derived) = match self.prefix {
            Some(p) => (p, false),
            None => {
                let material = replication
                    .cluster_secret()
                    .expand(ClusterPrefix::DERIVATION_INFO);
                (ClusterPrefix::from_key_material(&material), true)
            }
        };
        let subnet = self
            .pop_subnet
            .unwrap_or_else(|| subnet_for_node(&replication.node_id));
        SixPn {
            cluster,
            pop: cluster.pop(subnet),
            derived,
        }
    }
}

fn check_interface(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} must be 1 to 15 bytes (IFNAMSIZ)"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || name == "."
        || name == ".."
    {
        return Err(format!(
            "{name:?}: only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    Ok(())
}

/// `[mesh]` with the environment on top. `replication` and `db_path` are
/// the sections it depends on (already loaded).
pub fn from_raw(
    raw: RawMesh,
    env: &dyn Env,
    replication: &Replication,
    db_path: &Path,
) -> Result<Mesh, ConfigError> {
    let enabled = env_bool(env, "EDGEPROXY_MESH_ENABLED")?
        .or(raw.enabled)
        .unwrap_or(false);
    let implementation = match env.var("EDGEPROXY_MESH_IMPLEMENTATION") {
        Some(v) => v.parse().map_err(|reason| ConfigError::Env {
            var: "EDGEPROXY_MESH_IMPLEMENTATION",
            value: v.clone(),
            reason,
        })?,
        None => match raw.implementation {
            Some(v) => v
                .parse()
                .map_err(|r: String| invalid("mesh.implementation", r))?,
            None => Implementation::Auto,
        },
    };
    let interface = match env.var("EDGEPROXY_MESH_INTERFACE") {
        Some(v) => {
            let v = v.trim().to_string();
            check_interface(&v).map_err(|reason| ConfigError::Env {
                var: "EDGEPROXY_MESH_INTERFACE",
                value: v.clone(),
                reason,
            })?;
            v
        }
        None => {
            let v = raw
                .interface
                .unwrap_or_else(|| defaults::INTERFACE.into())
                .trim()
                .to_string();
            check_interface(&v).map_err(|r| invalid("mesh.interface", r))?;
            v
        }
    };
    let listen_port = env_parse::<u16>(env, "EDGEPROXY_MESH_LISTEN_PORT")?
        .or(raw.listen_port)
        .unwrap_or(defaults::LISTEN_PORT);
    if listen_port == 0 {
        return Err(invalid(
            "mesh.listen_port",
            "must be 1..=65535: other POPs are told this port",
        ));
    }
    let private_key_file = env
        .var("EDGEPROXY_MESH_PRIVATE_KEY_FILE")
        .map(PathBuf::from)
        .or(raw.private_key_file)
        .unwrap_or_else(|| {
            db_path
                .parent()
                .unwrap_or(Path::new(""))
                .join(defaults::KEY_FILE_NAME)
        });
    if private_key_file.as_os_str().is_empty() || private_key_file.ends_with("/") {
        return Err(invalid("mesh.private_key_file", "must name a file"));
    }
    let prefix = match env.var("EDGEPROXY_6PN_PREFIX") {
        Some(v) if !v.trim().is_empty() => Some(v.parse().map_err(
            |e: super::addressing::AddressingError| ConfigError::Env {
                var: "EDGEPROXY_6PN_PREFIX",
                value: v.clone(),
                reason: e.to_string(),
            },
        )?),
        _ => match raw.prefix.filter(|p| !p.trim().is_empty()) {
            Some(p) => Some(p.parse().map_err(|e: super::addressing::AddressingError| {
                invalid("mesh.prefix", e.to_string())
            })?),
            None => None,
        },
    };
    let pop_subnet = env_parse::<u16>(env, "EDGEPROXY_6PN_POP_SUBNET")?.or(raw.pop_subnet);
    let endpoint = match env.var("EDGEPROXY_MESH_ENDPOINT") {
        Some(v) if !v.trim().is_empty() => {
            Some(parse_endpoint(&v).map_err(|reason| ConfigError::Env {
                var: "EDGEPROXY_MESH_ENDPOINT",
                value: v.clone(),
                reason,
            })?)
        }
        _ => match raw.endpoint.filter(|e| !e.trim().is_empty()) {
            Some(e) => Some(parse_endpoint(&e).map_err(|r| invalid("mesh.endpoint", r))?),
            None => None,
        },
    };
    let mtu = raw.mtu.unwrap_or(defaults::MTU);
    if !(1280..=9000).contains(&mtu) {
        return Err(invalid(
            "mesh.mtu",
            format!("{mtu} is out of range 1280..=9000 (IPv6 needs at least 1280)"),
        ));
    }
    let persistent_keepalive_secs = raw
        .persistent_keepalive_secs
        .unwrap_or(defaults::PERSISTENT_KEEPALIVE_SECS);
    if persistent_keepalive_secs > 3600 {
        return Err(invalid(
            "mesh.persistent_keepalive_secs",
            "must be 0 (off) to 3600",
        ));
    }
    let probe_interval_secs = raw
        .probe_interval_secs
        .unwrap_or(defaults::PROBE_INTERVAL_SECS);
    if probe_interval_secs > 60 {
        return Err(invalid(
            "mesh.probe_interval_secs",
            "must be 0 (off) to 60: a blocked path is said after three lost probes",
        ));
    }
    let wireguard_go = raw
        .wireguard_go
        .unwrap_or_else(|| PathBuf::from(defaults::WIREGUARD_GO));
    if enabled && !replication.enabled {
        return Err(invalid(
            "mesh.enabled",
            "the mesh is built from cluster membership: enable [replication] too \
             (replication.enabled = true or EDGEPROXY_REPLICATION_ENABLED=true)",
        ));
    }
    Ok(Mesh {
        enabled,
        implementation,
        interface,
        listen_port,
        private_key_file,
        prefix,
        pop_subnet,
        endpoint,
        mtu,
        persistent_keepalive_secs,
        probe_interval_secs,
        wireguard_go,
    })
}

/// `ip:port` (IPv6 in brackets), an address other POPs can reach.
fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?}: {e} (an ip:port, IPv6 in brackets)"))?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!(
            "{addr} is not an address other POPs can reach (no wildcard, no port 0)"
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_ENV: [(&str, &str); 0] = [];

    fn replication(enabled: bool) -> Replication {
        let text = if enabled {
            "[replication]\nenabled = true\nnode_id = \"gru-1\"\nsecret = \"0123456789abcdef0123\"\n"
        } else {
            "[replication]\nnode_id = \"gru-1\"\n"
        };
        crate::config::Config::from_raw(
            crate::config::parse_toml(Path::new("t.toml"), text).unwrap(),
            &NO_ENV,
        )
        .unwrap()
        .replication
    }

    fn parse(text: &str, env: &dyn Env, repl: bool) -> Result<Mesh, ConfigError> {
        #[derive(Deserialize)]
        struct Wrap {
            #[serde(default)]
            mesh: RawMesh,
        }
        let w: Wrap = toml::from_str(text).unwrap();
        from_raw(
            w.mesh,
            env,
            &replication(repl),
            Path::new("/var/lib/edgeproxy/routing.db"),
        )
    }

    #[test]
    fn off_by_default_with_documented_defaults() {
        let m = parse("", &NO_ENV, false).unwrap();
        assert!(!m.enabled);
        assert_eq!(m.interface, "ep6pn");
        assert_eq!(m.listen_port, 51820);
        assert_eq!(
            m.private_key_file,
            PathBuf::from("/var/lib/edgeproxy/mesh.key")
        );
        assert_eq!(m.prefix, None);
        assert_eq!(m.endpoint, None);
        assert_eq!(m.mtu, 1420);
        assert_eq!(m.implementation, Implementation::Auto);
        assert_eq!(m.probe_interval_secs, 2);
        let off = parse("[mesh]\nprobe_interval_secs = 0\n", &NO_ENV, false).unwrap();
        assert_eq!(off.probe_interval_secs, 0);
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let env = [
            ("EDGEPROXY_MESH_ENABLED", "true"),
            ("EDGEPROXY_MESH_LISTEN_PORT", "51000"),
            ("EDGEPROXY_MESH_PRIVATE_KEY_FILE", "/etc/ep/wg.key"),
            ("EDGEPROXY_6PN_PREFIX", "fd12:3456:789a::/48"),
            ("EDGEPROXY_MESH_INTERFACE", "wg6pn"),
            ("EDGEPROXY_MESH_ENDPOINT", "[2001:db8::1]:51000"),
            ("EDGEPROXY_MESH_IMPLEMENTATION", "wireguard-go"),
            ("EDGEPROXY_6PN_POP_SUBNET", "7"),
        ];
        let m = parse(
            "[mesh]\nlisten_port = 1\ninterface = \"x\"\nprefix = \"fd00:1:2::/48\"\n",
            &env,
            true,
        )
        .unwrap();
        assert!(m.enabled);
        assert_eq!(m.listen_port, 51000);
        assert_eq!(m.private_key_file, PathBuf::from("/etc/ep/wg.key"));
        assert_eq!(m.prefix.unwrap().to_string(), "fd12:3456:789a::/48");
        assert_eq!(m.interface, "wg6pn");
        assert_eq!(m.endpoint, Some("[2001:db8::1]:51000".parse().unwrap()));
        assert_eq!(m.implementation, Implementation::WireguardGo);
        let six = m.six_pn(&replication(true));
        assert_eq!(six.pop.to_string(), "fd12:3456:789a:7::/64");
        assert!(!six.derived);
    }

    #[test]
    fn a_derived_prefix_follows_the_secret_and_the_pop_its_node_id() {
        let m = parse("[mesh]\nenabled = true\n", &NO_ENV, true).unwrap();
        let r = replication(true);
        let six = m.six_pn(&r);
        assert!(six.derived);
        assert_eq!(six, m.six_pn(&r), "the same on every call and every POP");
        assert_eq!(six.pop.subnet(), subnet_for_node("gru-1"));
        assert!(six.cluster.contains_net(&six.pop.net()));
        let mut other = r.clone();
        other.secret = None;
        other.insecure = true;
        assert_ne!(m.six_pn(&other).cluster, six.cluster);
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("enabled = true", "mesh.enabled"),
            ("interface = \"a-very-long-name0\"", "mesh.interface"),
            ("interface = \"a b\"", "mesh.interface"),
            ("listen_port = 0", "mesh.listen_port"),
            ("prefix = \"fd00:edgeproxy::/48\"", "mesh.prefix"),
            ("prefix = \"2001:db8::/48\"", "mesh.prefix"),
            ("endpoint = \"0.0.0.0:51820\"", "mesh.endpoint"),
            ("endpoint = \"10.0.0.1\"", "mesh.endpoint"),
            ("mtu = 1000", "mesh.mtu"),
            ("implementation = \"boringtun\"", "mesh.implementation"),
            (
                "persistent_keepalive_secs = 4000",
                "mesh.persistent_keepalive_secs",
            ),
            ("probe_interval_secs = 61", "mesh.probe_interval_secs"),
        ] {
            // `enabled` without replication is the error under test there.
            let err = parse(&format!("[mesh]\n{text}\n"), &NO_ENV, false).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        for (var, value) in [
            ("EDGEPROXY_MESH_ENABLED", "maybe"),
            ("EDGEPROXY_MESH_LISTEN_PORT", "70000"),
            ("EDGEPROXY_6PN_PREFIX", "fd00::/8"),
            ("EDGEPROXY_MESH_ENDPOINT", "nowhere"),
            ("EDGEPROXY_6PN_POP_SUBNET", "-1"),
        ] {
            let err = parse("", &[(var, value)], true).unwrap_err();
            assert!(err.to_string().contains(var), "{var}: {err}");
        }
    }
}
