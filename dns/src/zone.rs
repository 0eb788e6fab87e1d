//! The static part of the `.internal` zone: its domain, TTL, the POP list and
//! the records at the apex (SOA, NS). Everything dynamic comes from the
//! routing snapshot (see [`crate::index`]).
//!
//! A [`ZoneConfig`] is built once from configuration and validated there;
//! answering never fails because of it.

use std::net::IpAddr;

use hickory_proto::rr::rdata::{NS, SOA};
use hickory_proto::rr::{Name, RData, Record};

/// The label of the zone's name server host, `ns.<domain>`. An app called
/// `ns` cannot be looked up by name (the name server takes precedence).
pub const NS_LABEL: &str = "ns";

/// SOA timers (seconds). The zone is never transferred (no AXFR/IXFR), so
/// refresh/retry/expire only matter to tools that print them; the values are
/// the RFC 1912 recommendations.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86400;

/// Why a zone configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ZoneError {
    #[error("invalid domain {domain:?}: {reason}")]
    BadDomain { domain: String, reason: String },
    #[error("invalid POP {name:?}: {reason}")]
    BadPop { name: String, reason: String },
}

/// One POP as `<region>.pops.<domain>` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopEntry {
    pub name: String,
    /// Lower case.
    pub region: String,
    pub addr: IpAddr,
}

/// The zone's fixed settings, validated.
#[derive(Debug, Clone)]
pub struct ZoneConfig {
    /// The domain (lower case, fully qualified: `internal.`), its name
    /// server and TTL.
    apex: Apex,
    /// Region of this POP (the proxy's "local POP" tier).
    local_region: String,
    pops: Vec<PopEntry>,
    /// Addresses of `ns.<domain>`.
    ns_addrs: Vec<IpAddr>,
}

impl ZoneConfig {
    /// `domain` is one or more labels (`internal`, `svc.internal`), any case,
    /// with or without the trailing dot. `ns_addrs` are the addresses answered
    /// for `ns.<domain>` (usually this POP's own address); may be empty.
    pub fn new(
        domain: &str,
        ttl: u32,
        local_region: &str,
        pops: Vec<PopEntry>,
        ns_addrs: Vec<IpAddr>,
    ) -> Result<Self, ZoneError> {
        let domain = parse_domain(domain)?;
        let mut checked = Vec::with_capacity(pops.len());
        for mut p in pops {
            let region = p.region.trim().to_ascii_lowercase();
            let label_ok = (1..=63).contains(&region.len())
                && region.bytes().all(|b| b.is_ascii_graphic() && b != b'.');
            if !label_ok {
                return Err(ZoneError::BadPop {
                    name: p.name,
                    reason: format!("region {:?} is not a single DNS label", p.region),
                });
            }
            p.region = region;
            checked.push(p);
        }
        Ok(ZoneConfig {
            apex: Apex::new(domain, ttl)?,
            local_region: local_region.trim().to_ascii_lowercase(),
            pops: checked,
            ns_addrs,
        })
    }

    pub fn domain(&self) -> &Name {
        self.apex.name()
    }

    pub fn ns_name(&self) -> &Name {
        self.apex.ns_name()
    }

    pub fn ttl(&self) -> u32 {
        self.apex.ttl()
    }

    pub fn local_region(&self) -> &str {
        &self.local_region
    }

    pub fn pops(&self) -> &[PopEntry] {
        &self.pops
    }

    /// The POPs of `region` (lower case).
    pub fn pops_in<'a>(&'a self, region: &'a str) -> impl Iterator<Item = &'a PopEntry> + 'a {
        self.pops.iter().filter(move |p| p.region == region)
    }

    pub fn ns_addrs(&self) -> &[IpAddr] {
        &self.ns_addrs
    }

    /// The SOA record; `serial` is the routing snapshot's version, so a
    /// routing change shows as a new serial.
    pub fn soa(&self, serial: u32) -> Record {
        self.apex.soa(serial)
    }

    /// The apex NS record (one name server: `ns.<domain>`).
    pub fn ns(&self) -> Record {
        self.apex.ns()
    }
}

/// A zone's apex: its name, its one name server `ns.<name>`, the SOA's
/// RNAME `hostmaster.<name>`, and the TTL of every record (also the SOA
/// minimum, the negative-caching TTL). Shared by the internal zone and the
/// GeoDNS zone.
#[derive(Debug, Clone)]
pub struct Apex {
    name: Name,
    ns_name: Name,
    rname: Name,
    ttl: u32,
}

impl Apex {
    /// `name`: as [`parse_domain`] returns it.
    pub fn new(name: Name, ttl: u32) -> Result<Apex, ZoneError> {
        let child = |label: &str| {
            Name::from_ascii(label)
                .and_then(|l| l.append_domain(&name))
                .map_err(|e| ZoneError::BadDomain {
                    domain: name.to_ascii(),
                    reason: e.to_string(),
                })
        };
        Ok(Apex {
            ns_name: child(NS_LABEL)?,
            rname: child("hostmaster")?,
            name,
            ttl,
        })
    }

    pub fn name(&self) -> &Name {
        &self.name
    }

    /// `ns.<name>`.
    pub fn ns_name(&self) -> &Name {
        &self.ns_name
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    pub fn soa(&self, serial: u32) -> Record {
        Record::from_rdata(
            self.name.clone(),
            self.ttl,
            RData::SOA(SOA::new(
                self.ns_name.clone(),
                self.rname.clone(),
                serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                self.ttl,
            )),
        )
    }

    /// The apex NS record.
    pub fn ns(&self) -> Record {
        Record::from_rdata(
            self.name.clone(),
            self.ttl,
            RData::NS(NS(self.ns_name.clone())),
        )
    }
}

/// Parses and validates a zone domain: letters, digits, hyphens and
/// underscores, 1–63 bytes per label, at most 253 bytes, not the root.
pub fn parse_domain(text: &str) -> Result<Name, ZoneError> {
    let bad = |reason: &str| ZoneError::BadDomain {
        domain: text.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = text.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(bad("must not be empty or the root"));
    }
    if trimmed.len() > 253 {
        return Err(bad("longer than 253 bytes"));
    }
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("every label must be 1 to 63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("only letters, digits, '-' and '_' are allowed"));
        }
    }
    let mut name =
        Name::from_ascii(trimmed.to_ascii_lowercase()).map_err(|e| bad(&e.to_string()))?;
    name.set_fqdn(true);
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_is_lowercased_and_fully_qualified() {
        let z = ZoneConfig::new("Svc.Internal.", 5, "SA", Vec::new(), Vec::new()).unwrap();
        assert_eq!(z.domain().to_ascii(), "svc.internal.");
        assert_eq!(z.ns_name().to_ascii(), "ns.svc.internal.");
        assert_eq!(z.local_region(), "sa");
    }

    #[test]
    fn bad_domains_are_rejected_with_a_reason() {
        for d in ["", ".", "a..b", "has space", "é.internal", &"x".repeat(64)] {
            let err = parse_domain(d).unwrap_err();
            assert!(matches!(err, ZoneError::BadDomain { .. }), "{d}: {err}");
        }
        assert!(parse_domain("internal").is_ok());
        assert!(parse_domain("_svc.internal").is_ok());
    }

    #[test]
    fn pop_regions_must_be_single_labels() {
        let pop = |region: &str| PopEntry {
            name: "gru".into(),
            region: region.into(),
            addr: "10.0.0.1".parse().unwrap(),
        };
        let z = ZoneConfig::new("internal", 5, "sa", vec![pop("SA")], Vec::new()).unwrap();
        assert_eq!(z.pops_in("sa").count(), 1);
        for bad in ["", "a.b"] {
            assert!(ZoneConfig::new("internal", 5, "sa", vec![pop(bad)], Vec::new()).is_err());
        }
    }

    #[test]
    fn soa_carries_serial_and_negative_ttl() {
        let z = ZoneConfig::new("internal", 7, "sa", Vec::new(), Vec::new()).unwrap();
        let soa = z.soa(42);
        let RData::SOA(s) = soa.data else {
            panic!("not a SOA")
        };
        assert_eq!(s.serial, 42);
        assert_eq!(s.minimum, 7);
        assert_eq!(soa.ttl, 7);
    }
}
