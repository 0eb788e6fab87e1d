//! `[bgp]` and `[[bgp.neighbor]]`: the anycast BGP speaker's settings.
//!
//! Environment for the basics, over the file: `EDGEPROXY_BGP_ENABLED`,
//! `_LOCAL_ASN`, `_ROUTER_ID`, `_ANNOUNCE` (comma list of prefixes) and
//! `_NEIGHBORS` (comma list of `address[:port]@asn`, which replaces the
//! file's neighbors). Everything is validated here, at load, so
//! `check-config` catches it: an enabled speaker has an ASN, a router id,
//! at least one prefix and one neighbor, and prefixes without host bits.
//!
//! A neighbor's TCP MD5 password (`password` or `password_file`) is read
//! here too, so a missing file fails `check-config`; like every `[bgp]` key
//! it is applied at start (a SIGHUP that changes it says a restart is
//! needed). It has no environment variable: `EDGEPROXY_BGP_NEIGHBORS` is a
//! one-line list, and a neighbor that needs a password is written in the
//! file (with `password_file` pointing at a secret mounted there).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::md5::{read_key_file, Md5Key};
use crate::config_env::{env_bool, invalid, ConfigError, Env};

pub mod defaults {
    pub const PORT: u16 = 179;
    /// Proposed hold time. RFC 4271 suggests 90 s; anycast wants a crashed
    /// POP's route gone fast, and 9 s (keepalives every 3 s) is what
    /// operators of anycast services commonly run. The peer may lower it.
    pub const HOLD_TIME_SECS: u16 = 9;
    /// How long a soft drain keeps the routes, tagged GRACEFUL_SHUTDOWN,
    /// before withdrawing them.
    pub const DRAIN_DELAY_SECS: u64 = 5;
    /// After the withdrawal at shutdown, listeners stay open this long for
    /// connections already on their way.
    pub const WITHDRAW_GRACE_MS: u64 = 500;
    /// Base of the connect-retry back-off (the FSM doubles it, up to 300 s;
    /// the first two misses retry after 1 s).
    pub const CONNECT_RETRY_SECS: u32 = 5;
    /// BFD: the interval this POP sends at and asks the router for. With
    /// the multiplier, a router notices a silent POP in 300 ms; 100 ms is
    /// also what BIRD and FRR send at by default (FRR: 300 ms).
    pub const BFD_INTERVAL_MS: u32 = 100;
    /// BFD: packets missed in a row before a session is declared down.
    pub const BFD_MULTIPLIER: u8 = 3;
}

/// A neighbor's BFD timers (RFC 5880): this POP sends every
/// `interval_ms` (less jitter) and asks the router to send no faster; the
/// router declares the POP down after `multiplier` intervals of silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BfdSettings {
    pub interval_ms: u32,
    pub multiplier: u8,
}

/// As the keys it is read from (`bfd = true`, `bfd_interval_ms`,
/// `bfd_multiplier`), flattened into the neighbor: `check-config`'s output
/// loads back.
impl Serialize for BfdSettings {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("BfdSettings", 3)?;
        st.serialize_field("bfd", &true)?;
        st.serialize_field("bfd_interval_ms", &self.interval_ms)?;
        st.serialize_field("bfd_multiplier", &self.multiplier)?;
        st.end()
    }
}

impl BfdSettings {
    pub fn timers(&self) -> crate::bfd::Timers {
        let interval = Duration::from_millis(u64::from(self.interval_ms));
        crate::bfd::Timers {
            desired_min_tx: interval,
            required_min_rx: interval,
            detect_mult: self.multiplier,
        }
    }
}

/// RFC 8326's GRACEFUL_SHUTDOWN well-known community, 65535:0.
pub const GRACEFUL_SHUTDOWN: u32 = 0xFFFF_0000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBgp {
    pub enabled: Option<bool>,
    pub local_asn: Option<u32>,
    pub router_id: Option<String>,
    pub local_address: Option<String>,
    pub announce: Option<Vec<String>>,
    pub next_hop: Option<RawNextHop>,
    pub drain_delay_secs: Option<u64>,
    pub drain_prepend: Option<u8>,
    pub withdraw_grace_ms: Option<u64>,
    pub communities: Option<Vec<String>>,
    pub med: Option<u32>,
    pub connect_retry_secs: Option<u32>,
    #[serde(default, rename = "neighbor")]
    pub neighbors: Vec<RawNeighbor>,
}

/// `next_hop = "self"`, `"192.0.2.10"`, or one address per family.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawNextHop {
    One(String),
    List(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNeighbor {
    pub address: String,
    pub port: Option<u16>,
    pub asn: u32,
    pub hold_time_secs: Option<u16>,
    pub local_address: Option<String>,
    pub med: Option<u32>,
    pub communities: Option<Vec<String>>,
    pub description: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub bfd: Option<bool>,
    pub bfd_interval_ms: Option<u32>,
    pub bfd_multiplier: Option<u8>,
}

/// The effective `[bgp]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bgp {
    pub enabled: bool,
    /// 0: not set (only when disabled).
    #[serde(skip_serializing_if = "is_zero")]
    pub local_asn: u32,
    /// BGP identifier (an IPv4 address by convention); unspecified: not set
    /// (only when disabled).
    #[serde(
        serialize_with = "ser_display",
        skip_serializing_if = "Ipv4Addr::is_unspecified"
    )]
    pub router_id: Ipv4Addr,
    /// Source address of the sessions; `None`: the kernel's choice.
    pub local_address: Option<IpAddr>,
    /// Prefixes announced while this POP can serve.
    #[serde(serialize_with = "ser_display_list")]
    pub announce: Vec<IpNet>,
    pub next_hop: NextHop,
    #[serde(rename = "drain_delay_secs", serialize_with = "ser_secs")]
    pub drain_delay: Duration,
    /// Extra copies of `local_asn` prepended to the AS path during a soft
    /// drain (eBGP only).
    pub drain_prepend: u8,
    #[serde(rename = "withdraw_grace_ms", serialize_with = "ser_ms")]
    pub withdraw_grace: Duration,
    /// Standard communities (`asn:value`) on every announcement.
    #[serde(serialize_with = "ser_communities")]
    pub communities: Vec<u32>,
    pub med: Option<u32>,
    pub connect_retry_secs: u32,
    #[serde(rename = "neighbor")]
    pub neighbors: Vec<Neighbor>,
}

impl Default for Bgp {
    fn default() -> Self {
        Bgp {
            enabled: false,
            local_asn: 0,
            router_id: Ipv4Addr::UNSPECIFIED,
            local_address: None,
            announce: Vec::new(),
            next_hop: NextHop::default(),
            drain_delay: Duration::from_secs(defaults::DRAIN_DELAY_SECS),
            drain_prepend: 0,
            withdraw_grace: Duration::from_millis(defaults::WITHDRAW_GRACE_MS),
            communities: Vec::new(),
            med: None,
            connect_retry_secs: defaults::CONNECT_RETRY_SECS,
            neighbors: Vec::new(),
        }
    }
}

/// The next hop announced, per address family: an address, or "self" (the
/// session's local address; for IPv6 prefixes on an IPv4 session, that
/// address IPv4-mapped, `::ffff:a.b.c.d`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NextHop {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<std::net::Ipv6Addr>,
}

impl Serialize for NextHop {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let list: Vec<String> = self
            .v4
            .map(|a| a.to_string())
            .into_iter()
            .chain(self.v6.map(|a| a.to_string()))
            .collect();
        if list.is_empty() {
            s.serialize_str("self")
        } else {
            s.collect_seq(list)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Neighbor {
    #[serde(serialize_with = "ser_display")]
    pub address: IpAddr,
    pub port: u16,
    pub asn: u32,
    /// Proposed hold time, seconds: 0 (no keepalives) or 3..=65535.
    pub hold_time_secs: u16,
    pub local_address: Option<IpAddr>,
    /// Overrides `[bgp] med` for this neighbor.
    pub med: Option<u32>,
    /// Added to `[bgp] communities` for this neighbor.
    #[serde(serialize_with = "ser_communities")]
    pub communities: Vec<u32>,
    pub description: Option<String>,
    /// TCP MD5 signature key (RFC 2385), from `password` or the file
    /// `password_file`. Never serialized: `check-config` must not print
    /// secrets.
    #[serde(skip)]
    pub password: Option<Md5Key>,
    /// Where the password came from, when it was a file.
    pub password_file: Option<PathBuf>,
    /// BFD with this neighbor (`bfd = true`), and its timers.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdSettings>,
}

impl Neighbor {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The name used in logs, status and metrics: `address` or
    /// `[v6]:port` when the port is not 179.
    pub fn label(&self) -> String {
        if self.port == defaults::PORT {
            self.address.to_string()
        } else {
            self.socket_addr().to_string()
        }
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}
fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}
fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}
fn ser_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}
fn ser_display_list<T: std::fmt::Display, S: serde::Serializer>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}
fn ser_communities<S: serde::Serializer>(v: &[u32], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|c| community_text(*c)))
}

/// `65000:100` for a standard community.
pub fn community_text(c: u32) -> String {
    format!("{}:{}", c >> 16, c & 0xffff)
}

/// Parses `asn:value` (both 0..=65535).
pub fn parse_community(text: &str) -> Result<u32, String> {
    let (a, v) = text
        .trim()
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not asn:value"))?;
    let a: u16 = a
        .parse()
        .map_err(|_| format!("{text:?}: {a:?} is not 0..=65535"))?;
    let v: u16 = v
        .parse()
        .map_err(|_| format!("{text:?}: {v:?} is not 0..=65535"))?;
    Ok(u32::from(a) << 16 | u32::from(v))
}

/// Parses a prefix, refusing host bits (a typo more often than not).
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?}: {e} (expected a prefix such as 198.51.100.0/24)"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Parses one `address[:port]@asn` of `EDGEPROXY_BGP_NEIGHBORS`.
fn parse_neighbor_spec(spec: &str) -> Result<Neighbor, String> {
    let (addr, asn) = spec
        .trim()
        .rsplit_once('@')
        .ok_or_else(|| format!("{spec:?} is not address[:port]@asn"))?;
    let asn = parse_asn(asn).map_err(|e| format!("{spec:?}: {e}"))?;
    let (address, port) = match addr.parse::<IpAddr>() {
        Ok(ip) => (ip, defaults::PORT),
        Err(_) => match addr.parse::<SocketAddr>() {
            Ok(sa) => (sa.ip(), sa.port()),
            Err(_) => {
                return Err(format!(
                    "{spec:?}: {addr:?} is not an address or address:port (IPv6 with a port: [2001:db8::1]:179)"
                ))
            }
        },
    };
    Ok(Neighbor {
        address,
        port,
        asn,
        hold_time_secs: defaults::HOLD_TIME_SECS,
        local_address: None,
        med: None,
        communities: Vec::new(),
        description: None,
        password: None,
        password_file: None,
        bfd: None,
    })
}

/// A neighbor's TCP MD5 password: as itself or as a file holding it, not
/// both (one would be ignored without a word).
fn password(
    key: &str,
    literal: Option<&str>,
    file: Option<PathBuf>,
) -> Result<(Option<Md5Key>, Option<PathBuf>), ConfigError> {
    match (literal, file) {
        (Some(_), Some(_)) => Err(invalid(
            format!("{key}.password"),
            format!("set either {key}.password or {key}.password_file, not both"),
        )),
        (Some(text), None) => Md5Key::new(text.as_bytes())
            .map(|k| (Some(k), None))
            .map_err(|reason| invalid(format!("{key}.password"), reason)),
        (None, Some(path)) => read_key_file(&path)
            .map(|k| (Some(k), Some(path)))
            .map_err(|reason| invalid(format!("{key}.password_file"), reason)),
        (None, None) => Ok((None, None)),
    }
}

fn parse_asn(text: &str) -> Result<u32, String> {
    let asn: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an AS number"))?;
    check_asn(asn)?;
    Ok(asn)
}

fn check_asn(asn: u32) -> Result<(), String> {
    // 0 and 4294967295 are reserved (RFC 7607, RFC 7300); 23456 is AS_TRANS.
    if asn == 0 || asn == u32::MAX || asn == 23_456 {
        return Err(format!("{asn} is a reserved AS number"));
    }
    Ok(())
}

/// `bfd`, `bfd_interval_ms` and `bfd_multiplier` of neighbor `key`: timers
/// without `bfd = true` would be ignored without a word, so they are an
/// error.
fn bfd_settings(
    key: &str,
    on: Option<bool>,
    interval_ms: Option<u32>,
    multiplier: Option<u8>,
) -> Result<Option<BfdSettings>, ConfigError> {
    if on != Some(true) {
        if interval_ms.is_some() || multiplier.is_some() {
            return Err(invalid(
                format!("{key}.bfd"),
                "bfd_interval_ms / bfd_multiplier are set but bfd is not: add bfd = true",
            ));
        }
        return Ok(None);
    }
    let interval_ms = interval_ms.unwrap_or(defaults::BFD_INTERVAL_MS);
    if !(10..=60_000).contains(&interval_ms) {
        return Err(invalid(
            format!("{key}.bfd_interval_ms"),
            format!("{interval_ms}: must be 10–60000 (milliseconds)"),
        ));
    }
    let multiplier = multiplier.unwrap_or(defaults::BFD_MULTIPLIER);
    if multiplier == 0 {
        return Err(invalid(
            format!("{key}.bfd_multiplier"),
            "must be 1–255 (packets missed before the session is down)",
        ));
    }
    Ok(Some(BfdSettings {
        interval_ms,
        multiplier,
    }))
}

fn check_hold(hold: u16) -> Result<(), String> {
    if hold == 1 || hold == 2 {
        return Err("must be 0 (no keepalives) or at least 3 seconds (RFC 4271)".into());
    }
    Ok(())
}

fn parse_ip(key: &str, text: &str) -> Result<IpAddr, ConfigError> {
    text.trim()
        .parse()
        .map_err(|e| invalid(key, format!("{text:?}: {e}")))
}

fn parse_communities(key: &str, list: Vec<String>) -> Result<Vec<u32>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, c)| parse_community(c).map_err(|r| invalid(format!("{key}[{i}]"), r)))
        .collect()
}

fn next_hop_from(raw: Option<RawNextHop>) -> Result<NextHop, ConfigError> {
    let key = "bgp.next_hop";
    let list = match raw {
        None => return Ok(NextHop::default()),
        Some(RawNextHop::One(one)) if one.trim().eq_ignore_ascii_case("self") => {
            return Ok(NextHop::default())
        }
        Some(RawNextHop::One(one)) => vec![one],
        Some(RawNextHop::List(list)) => list,
    };
    let mut hop = NextHop::default();
    for text in list {
        match parse_ip(key, &text)? {
            IpAddr::V4(a) if hop.v4.is_none() => hop.v4 = Some(a),
            IpAddr::V6(a) if hop.v6.is_none() => hop.v6 = Some(a),
            _ => {
                return Err(invalid(
                    key,
                    "at most one IPv4 and one IPv6 address (\"self\" for the session's own)",
                ))
            }
        }
    }
    Ok(hop)
}

pub fn from_raw(raw: RawBgp, env: &dyn Env) -> Result<Bgp, ConfigError> {
    let enabled = env_bool(env, "EDGEPROXY_BGP_ENABLED")?
        .or(raw.enabled)
        .unwrap_or(false);
    let local_asn = match env.var("EDGEPROXY_BGP_LOCAL_ASN") {
        Some(v) => parse_asn(&v).map_err(|reason| ConfigError::Env {
            var: "EDGEPROXY_BGP_LOCAL_ASN",
            value: v.clone(),
            reason,
        })?,
        None => match raw.local_asn {
            Some(asn) => {
                check_asn(asn).map_err(|r| invalid("bgp.local_asn", r))?;
                asn
            }
            None => 0,
        },
    };
    let local_address = raw
        .local_address
        .filter(|a| !a.trim().is_empty())
        .map(|a| parse_ip("bgp.local_address", &a))
        .transpose()?;
    let router_id = match env.var("EDGEPROXY_BGP_ROUTER_ID") {
        Some(v) => Some(v.trim().parse::<Ipv4Addr>().map_err(|e| ConfigError::Env {
            var: "EDGEPROXY_BGP_ROUTER_ID",
            value: v.clone(),
            reason: e.to_string(),
        })?),
        None => raw
            .router_id
            .map(|r| {
                r.trim()
                    .parse::<Ipv4Addr>()
                    .map_err(|e| invalid("bgp.router_id", format!("{r:?}: {e} (an IPv4 address)")))
            })
            .transpose()?,
    };
    let announce = match env.var("EDGEPROXY_BGP_ANNOUNCE") {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                parse_prefix(p).map_err(|reason| ConfigError::Env {
                    var: "EDGEPROXY_BGP_ANNOUNCE",
                    value: list.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => raw
            .announce
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, p)| parse_prefix(p).map_err(|r| invalid(format!("bgp.announce[{i}]"), r)))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let mut unique = announce.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != announce.len() {
        return Err(invalid("bgp.announce", "a prefix is listed twice"));
    }
    let next_hop = next_hop_from(raw.next_hop)?;
    let drain_secs = raw.drain_delay_secs.unwrap_or(defaults::DRAIN_DELAY_SECS);
    if drain_secs > 600 {
        return Err(invalid("bgp.drain_delay_secs", "must be at most 600"));
    }
    let drain_prepend = raw.drain_prepend.unwrap_or(0);
    if drain_prepend > 8 {
        return Err(invalid("bgp.drain_prepend", "must be at most 8"));
    }
    let grace_ms = raw.withdraw_grace_ms.unwrap_or(defaults::WITHDRAW_GRACE_MS);
    if grace_ms > 60_000 {
        return Err(invalid("bgp.withdraw_grace_ms", "must be at most 60000"));
    }
    let connect_retry_secs = raw
        .connect_retry_secs
        .unwrap_or(defaults::CONNECT_RETRY_SECS);
    if !(1..=300).contains(&connect_retry_secs) {
        return Err(invalid("bgp.connect_retry_secs", "must be in 1..=300"));
    }
    let communities = parse_communities("bgp.communities", raw.communities.unwrap_or_default())?;

    let neighbors = match env.var("EDGEPROXY_BGP_NEIGHBORS") {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| {
                parse_neighbor_spec(n).map_err(|reason| ConfigError::Env {
                    var: "EDGEPROXY_BGP_NEIGHBORS",
                    value: list.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => {
            let mut out = Vec::with_capacity(raw.neighbors.len());
            for (i, n) in raw.neighbors.into_iter().enumerate() {
                let key = format!("bgp.neighbor[{i}]");
                check_asn(n.asn).map_err(|r| invalid(format!("{key}.asn"), r))?;
                let hold = n.hold_time_secs.unwrap_or(defaults::HOLD_TIME_SECS);
                check_hold(hold).map_err(|r| invalid(format!("{key}.hold_time_secs"), r))?;
                let port = n.port.unwrap_or(defaults::PORT);
                if port == 0 {
                    return Err(invalid(format!("{key}.port"), "must not be 0"));
                }
                let (password, password_file) =
                    password(&key, n.password.as_deref(), n.password_file)?;
                let bfd = bfd_settings(&key, n.bfd, n.bfd_interval_ms, n.bfd_multiplier)?;
                out.push(Neighbor {
                    address: parse_ip(&format!("{key}.address"), &n.address)?,
                    port,
                    asn: n.asn,
                    hold_time_secs: hold,
                    local_address: n
                        .local_address
                        .filter(|a| !a.trim().is_empty())
                        .map(|a| parse_ip(&format!("{key}.local_address"), &a))
                        .transpose()?,
                    med: n.med,
                    communities: parse_communities(
                        &format!("{key}.communities"),
                        n.communities.unwrap_or_default(),
                    )?,
                    description: n.description,
                    password,
                    password_file,
                    bfd,
                });
            }
            out
        }
    };
    for (i, n) in neighbors.iter().enumerate() {
        if n.address.is_unspecified() || n.address.is_multicast() {
            return Err(invalid(
                format!("bgp.neighbor[{i}].address"),
                format!("{} is not a router's address", n.address),
            ));
        }
        if neighbors[..i]
            .iter()
            .any(|m| m.socket_addr() == n.socket_addr())
        {
            return Err(invalid(
                format!("bgp.neighbor[{i}].address"),
                format!("{} is listed twice", n.socket_addr()),
            ));
        }
        // One BFD session per neighbor address (RFC 5881 finds a session
        // without a discriminator yet by the address alone).
        if n.bfd.is_some()
            && neighbors[..i]
                .iter()
                .any(|m| m.bfd.is_some() && m.address == n.address)
        {
            return Err(invalid(
                format!("bgp.neighbor[{i}].bfd"),
                format!(
                    "{} has BFD on another neighbor already (one BFD session per address)",
                    n.address
                ),
            ));
        }
        // An IPv4 prefix needs an IPv4 next hop: on an IPv6 session only an
        // explicit one can give it (no RFC 8950 extended next hop here).
        let source_v4 = n
            .local_address
            .or(local_address)
            .map_or(n.address.is_ipv4(), |a| a.is_ipv4());
        if announce.iter().any(|p| matches!(p, IpNet::V4(_))) && !source_v4 && next_hop.v4.is_none()
        {
            return Err(invalid(
                format!("bgp.neighbor[{i}]"),
                "IPv4 prefixes over an IPv6 session need an IPv4 bgp.next_hop",
            ));
        }
    }

    let router_id = match router_id {
        Some(id) => id,
        None => match local_address {
            Some(IpAddr::V4(a)) => a,
            _ if !enabled => Ipv4Addr::UNSPECIFIED,
            _ => {
                return Err(invalid(
                    "bgp.router_id",
                    "required (an IPv4 address unique among the routers; defaults to \
                     bgp.local_address when that is IPv4)",
                ))
            }
        },
    };
    if enabled {
        if local_asn == 0 {
            return Err(invalid(
                "bgp.local_asn",
                "required when bgp.enabled (or EDGEPROXY_BGP_LOCAL_ASN)",
            ));
        }
        if router_id.is_unspecified() {
            return Err(invalid("bgp.router_id", "must not be 0.0.0.0"));
        }
        if announce.is_empty() {
            return Err(invalid(
                "bgp.announce",
                "nothing to announce: list the anycast prefixes (or EDGEPROXY_BGP_ANNOUNCE)",
            ));
        }
        if neighbors.is_empty() {
            return Err(invalid(
                "bgp.neighbor",
                "no neighbor: add a [[bgp.neighbor]] (or EDGEPROXY_BGP_NEIGHBORS)",
            ));
        }
    }
    Ok(Bgp {
        enabled,
        local_asn,
        router_id,
        local_address,
        announce,
        next_hop,
        drain_delay: Duration::from_secs(drain_secs),
        drain_prepend,
        withdraw_grace: Duration::from_millis(grace_ms),
        communities,
        med: raw.med,
        connect_retry_secs,
        neighbors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &dyn Env) -> Result<Bgp, ConfigError> {
        #[derive(Deserialize)]
        struct Wrap {
            #[serde(default)]
            bgp: RawBgp,
        }
        let w: Wrap = toml::from_str(text).map_err(|e| invalid("toml", e.to_string()))?;
        from_raw(w.bgp, env)
    }

    const NO_ENV: [(&str, &str); 0] = [];

    const ISSUE_EXAMPLE: &str = r#"
[bgp]
enabled = true
local_asn = 65010
router_id = "192.0.2.10"
local_address = "192.0.2.10"
announce = ["198.51.100.0/24", "2001:db8:100::/48"]
next_hop = "self"
drain_delay_secs = 5
[[bgp.neighbor]]
address = "192.0.2.1"
port = 179
asn = 65000
hold_time_secs = 9
"#;

    #[test]
    fn off_by_default_and_renders_back_to_an_accepted_section() {
        let b = parse("", &NO_ENV).unwrap();
        #[derive(Serialize)]
        struct Out<'a> {
            bgp: &'a Bgp,
        }
        let text = toml::to_string(&Out { bgp: &b }).unwrap();
        assert_eq!(parse(&text, &NO_ENV).unwrap(), b, "{text}");
        assert!(!b.enabled);
        assert_eq!(b.drain_delay, Duration::from_secs(5));
        assert!(b.neighbors.is_empty());
    }

    #[test]
    fn the_issue_example_loads() {
        let b = parse(ISSUE_EXAMPLE, &NO_ENV).unwrap();
        assert!(b.enabled);
        assert_eq!(b.local_asn, 65010);
        assert_eq!(b.router_id, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(b.announce.len(), 2);
        assert_eq!(b.next_hop, NextHop::default());
        let n = &b.neighbors[0];
        assert_eq!((n.port, n.asn, n.hold_time_secs), (179, 65000, 9));
        assert_eq!(n.label(), "192.0.2.1");
    }

    #[test]
    fn env_overrides_the_basics() {
        let env = [
            ("EDGEPROXY_BGP_ENABLED", "1"),
            ("EDGEPROXY_BGP_LOCAL_ASN", "4200000001"),
            ("EDGEPROXY_BGP_ROUTER_ID", "10.0.0.9"),
            ("EDGEPROXY_BGP_ANNOUNCE", "203.0.113.0/24, 2001:db8:1::/48"),
            (
                "EDGEPROXY_BGP_NEIGHBORS",
                "10.0.0.1@65000, 10.0.0.2:1179@65001, [fd00::1]:179@65002, fd00::2@65003",
            ),
        ];
        let b = parse(ISSUE_EXAMPLE, &env).unwrap();
        assert_eq!(b.local_asn, 4_200_000_001);
        assert_eq!(b.router_id, Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!(b.announce[0].to_string(), "203.0.113.0/24");
        let n: Vec<(String, u16, u32)> = b
            .neighbors
            .iter()
            .map(|n| (n.address.to_string(), n.port, n.asn))
            .collect();
        assert_eq!(
            n,
            [
                ("10.0.0.1".into(), 179, 65000),
                ("10.0.0.2".into(), 1179, 65001),
                ("fd00::1".into(), 179, 65002),
                ("fd00::2".into(), 179, 65003)
            ]
        );
        assert_eq!(b.neighbors[1].label(), "10.0.0.2:1179");
    }

    #[test]
    fn enabled_without_the_essentials_is_refused_with_the_key() {
        for (text, key) in [
            ("[bgp]\nenabled = true\nrouter_id = \"1.1.1.1\"\nannounce = [\"10.0.0.0/8\"]\n[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\n", "bgp.local_asn"),
            ("[bgp]\nenabled = true\nlocal_asn = 1\nannounce = [\"10.0.0.0/8\"]\n[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\n", "bgp.router_id"),
            ("[bgp]\nenabled = true\nlocal_asn = 1\nrouter_id = \"1.1.1.1\"\n[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\n", "bgp.announce"),
            ("[bgp]\nenabled = true\nlocal_asn = 1\nrouter_id = \"1.1.1.1\"\nannounce = [\"10.0.0.0/8\"]\n", "bgp.neighbor"),
        ] {
            let err = parse(text, &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("announce = [\"198.51.100.1/24\"]", "did you mean 198.51.100.0/24"),
            ("announce = [\"10.0.0.0/8\", \"10.0.0.0/8\"]", "listed twice"),
            ("announce = [\"nope\"]", "bgp.announce[0]"),
            ("local_asn = 0", "bgp.local_asn"),
            ("local_asn = 23456", "reserved"),
            ("router_id = \"fd00::1\"", "bgp.router_id"),
            ("next_hop = [\"10.0.0.1\", \"10.0.0.2\"]", "bgp.next_hop"),
            ("next_hop = \"x\"", "bgp.next_hop"),
            ("drain_delay_secs = 601", "bgp.drain_delay_secs"),
            ("drain_prepend = 9", "bgp.drain_prepend"),
            ("communities = [\"65535\"]", "bgp.communities[0]"),
            ("communities = [\"70000:1\"]", "bgp.communities[0]"),
            ("connect_retry_secs = 0", "bgp.connect_retry_secs"),
            ("[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\nhold_time_secs = 2", "bgp.neighbor[0].hold_time_secs"),
            ("[[bgp.neighbor]]\naddress = \"0.0.0.0\"\nasn = 1", "bgp.neighbor[0].address"),
            ("[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\n[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 2", "listed twice"),
            ("[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\nfoo = 1", "foo"),
            ("[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\nbfd_interval_ms = 50", "add bfd = true"),
            ("[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\nbfd = true\nbfd_interval_ms = 5", "bgp.neighbor[0].bfd_interval_ms"),
            ("[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\nbfd = true\nbfd_multiplier = 0", "bgp.neighbor[0].bfd_multiplier"),
            ("[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\nbfd = true\n[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nport = 1179\nasn = 2\nbfd = true", "one BFD session per address"),
        ] {
            let err = parse(&format!("[bgp]\n{text}\n"), &NO_ENV).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        for (var, value) in [
            ("EDGEPROXY_BGP_ENABLED", "perhaps"),
            ("EDGEPROXY_BGP_LOCAL_ASN", "as65000"),
            ("EDGEPROXY_BGP_ANNOUNCE", "10.0.0.1/8"),
            ("EDGEPROXY_BGP_NEIGHBORS", "10.0.0.1"),
            ("EDGEPROXY_BGP_NEIGHBORS", "host:179@65000"),
        ] {
            let err = parse("", &[(var, value)]).unwrap_err();
            assert!(err.to_string().contains(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn bfd_is_off_unless_asked_and_its_timers_render_back() {
        let b = parse(ISSUE_EXAMPLE, &NO_ENV).unwrap();
        assert_eq!(b.neighbors[0].bfd, None);
        let on = format!("{ISSUE_EXAMPLE}bfd = true\n");
        let b = parse(&on, &NO_ENV).unwrap();
        let bfd = b.neighbors[0].bfd.unwrap();
        assert_eq!((bfd.interval_ms, bfd.multiplier), (100, 3));
        let t = bfd.timers();
        assert_eq!(t.desired_min_tx, Duration::from_millis(100));
        assert_eq!(t.required_min_rx, Duration::from_millis(100));
        let tuned =
            format!("{ISSUE_EXAMPLE}bfd = true\nbfd_interval_ms = 50\nbfd_multiplier = 5\n");
        let b = parse(&tuned, &NO_ENV).unwrap();
        #[derive(Serialize)]
        struct Out<'a> {
            bgp: &'a Bgp,
        }
        let text = toml::to_string(&Out { bgp: &b }).unwrap();
        assert!(text.contains("bfd_interval_ms = 50"), "{text}");
        assert_eq!(parse(&text, &NO_ENV).unwrap(), b, "{text}");
        // `bfd = false` with nothing else is just off.
        let off = format!("{ISSUE_EXAMPLE}bfd = false\n");
        assert_eq!(parse(&off, &NO_ENV).unwrap().neighbors[0].bfd, None);
    }

    #[test]
    fn ipv4_prefixes_over_an_ipv6_session_need_an_ipv4_next_hop() {
        let text = "[bgp]\nlocal_asn = 1\nrouter_id = \"1.1.1.1\"\nannounce = [\"10.0.0.0/8\"]\n[[bgp.neighbor]]\naddress = \"fd00::1\"\nasn = 2\n";
        let err = parse(text, &NO_ENV).unwrap_err();
        assert!(err.to_string().contains("IPv4 bgp.next_hop"), "{err}");
        let ok = format!("{text}\n").replace("announce", "next_hop = \"10.0.0.5\"\nannounce");
        assert_eq!(
            parse(&ok, &NO_ENV).unwrap().next_hop.v4,
            Some(Ipv4Addr::new(10, 0, 0, 5))
        );
    }

    #[test]
    fn communities_and_next_hops_parse_and_render_back() {
        let text = "[bgp]\nenabled = true\nlocal_asn = 65010\nlocal_address = \"10.0.0.2\"\nannounce = [\"10.9.0.0/16\"]\nnext_hop = [\"10.0.0.3\", \"fd00::3\"]\ncommunities = [\"65010:100\", \"0:1\"]\nmed = 50\n[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 65000\ncommunities = [\"65000:7\"]\nmed = 10\ndescription = \"upstream\"\n";
        let b = parse(text, &NO_ENV).unwrap();
        assert_eq!(
            b.router_id,
            Ipv4Addr::new(10, 0, 0, 2),
            "from local_address"
        );
        assert_eq!(b.communities, [65010 << 16 | 100, 1]);
        assert_eq!(b.next_hop.v6, Some("fd00::3".parse().unwrap()));
        assert_eq!(b.neighbors[0].communities, [65000 << 16 | 7]);
        #[derive(Serialize)]
        struct Out<'a> {
            bgp: &'a Bgp,
        }
        let rendered = toml::to_string(&Out { bgp: &b }).unwrap();
        assert!(rendered.contains("\"65010:100\""), "{rendered}");
        #[derive(Deserialize)]
        struct Wrap {
            bgp: RawBgp,
        }
        let again: Wrap = toml::from_str(&rendered).unwrap();
        assert_eq!(from_raw(again.bgp, &NO_ENV).unwrap(), b);
    }

    #[test]
    fn a_neighbor_password_loads_and_shows_nowhere() {
        let dir = std::env::temp_dir().join(format!("bgp-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let text = format!(
            "[bgp]\nlocal_asn = 65010\nrouter_id = \"10.0.0.2\"\nannounce = [\"10.9.0.0/16\"]\n\
             [[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 65000\npassword = \"lit s3cret\"\n\
             [[bgp.neighbor]]\naddress = \"10.0.0.4\"\nasn = 65001\npassword_file = {:?}\n\
             [[bgp.neighbor]]\naddress = \"10.0.0.3\"\nasn = 65002\n",
            file.display().to_string()
        );
        let b = parse(&text, &NO_ENV).unwrap();
        let keys: Vec<Option<&[u8]>> = b
            .neighbors
            .iter()
            .map(|n| n.password.as_ref().map(|k| k.expose()))
            .collect();
        assert_eq!(
            keys,
            [Some(&b"lit s3cret"[..]), Some(&b"from-a-file"[..]), None]
        );
        assert_eq!(
            b.neighbors[1].password_file.as_deref(),
            Some(file.as_path())
        );
        #[derive(Serialize)]
        struct Out<'a> {
            bgp: &'a Bgp,
        }
        let rendered = toml::to_string(&Out { bgp: &b }).unwrap();
        let debug = format!("{b:?} {b:#?}");
        for shown in [&rendered, &debug] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(!shown.contains("from-a-file"), "{shown}");
        }
        assert!(rendered.contains("password_file"), "{rendered}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_neighbor_passwords_are_named_and_not_shown() {
        let long = "x".repeat(81);
        for (line, key, reason) in [
            (
                "password = \"\"".to_string(),
                "bgp.neighbor[0].password",
                "empty",
            ),
            (
                format!("password = \"{long}\""),
                "bgp.neighbor[0].password",
                "at most 80",
            ),
            (
                "password = \"s3cret\"\npassword_file = \"/x\"".to_string(),
                "bgp.neighbor[0].password",
                "not both",
            ),
            (
                "password_file = \"/nonexistent/bgp.key\"".to_string(),
                "bgp.neighbor[0].password_file",
                "cannot read /nonexistent/bgp.key",
            ),
        ] {
            let text =
                format!("[bgp]\n[[bgp.neighbor]]\naddress = \"10.0.0.1\"\nasn = 1\n{line}\n");
            let err = parse(&text, &NO_ENV).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(reason), "{line}: {err}");
            assert!(!err.contains("s3cret") && !err.contains(&long), "{err}");
        }
    }
}
