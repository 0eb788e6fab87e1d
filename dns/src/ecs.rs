//! EDNS Client Subnet (RFC 7871): which address the answer is tailored to.
//!
//! A resolver that sends ECS tells us the network its client is in; the
//! geo lookup then uses that network's address instead of the resolver's.
//! The reply echoes the option with SCOPE PREFIX-LENGTH equal to the source
//! prefix: the answer was computed from that network address alone, so it
//! holds for the whole network and no wider.
//!
//! A SOURCE PREFIX-LENGTH of 0 is the client opting out of tailoring
//! (RFC 7871 §7.1.2): no client location is used at all, not even the
//! resolver's, and the scope is 0.

use std::net::IpAddr;

use hickory_proto::op::Edns;
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};

/// What the query's ECS option says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientLocation {
    /// No ECS option: locate the packet's source address.
    Source,
    /// ECS with a non-zero prefix: locate this network address.
    Subnet(ClientSubnet),
    /// ECS with prefix 0: do not locate anyone.
    OptedOut(ClientSubnet),
}

/// Why an ECS option is malformed (the query gets FORMERR, RFC 7871 §7.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EcsError {
    #[error("more than one client-subnet option")]
    Duplicate,
    #[error("source prefix /{prefix} is too long for the address family")]
    PrefixTooLong { prefix: u8 },
    #[error("address has bits set beyond the source prefix")]
    BitsBeyondPrefix,
}

/// Reads and validates the ECS option of a query's OPT record. (Unknown
/// address families and truncated options already fail message decoding.)
pub fn client_location(edns: Option<&Edns>) -> Result<ClientLocation, EcsError> {
    let Some(edns) = edns else {
        return Ok(ClientLocation::Source);
    };
    let mut found = None;
    for (code, option) in edns.options().as_ref() {
        if let (EdnsCode::Subnet, EdnsOption::Subnet(subnet)) = (code, option) {
            if found.replace(*subnet).is_some() {
                return Err(EcsError::Duplicate);
            }
        }
    }
    let Some(subnet) = found else {
        return Ok(ClientLocation::Source);
    };
    let prefix = subnet.source_prefix();
    let (bits, width) = match subnet.addr() {
        IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    if prefix > width {
        return Err(EcsError::PrefixTooLong { prefix });
    }
    let host_mask = u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
    if bits & host_mask != 0 {
        return Err(EcsError::BitsBeyondPrefix);
    }
    Ok(if prefix == 0 {
        ClientLocation::OptedOut(subnet)
    } else {
        ClientLocation::Subnet(subnet)
    })
}

impl ClientLocation {
    /// The address to locate, given the packet's source address.
    pub fn geo_address(&self, source: IpAddr) -> Option<IpAddr> {
        match self {
            ClientLocation::Source => Some(source),
            ClientLocation::Subnet(s) => Some(s.addr()),
            ClientLocation::OptedOut(_) => None,
        }
    }

    /// The option to put in the reply, if the query had one.
    pub fn reply_option(&self) -> Option<EdnsOption> {
        match self {
            ClientLocation::Source => None,
            ClientLocation::Subnet(s) | ClientLocation::OptedOut(s) => Some(EdnsOption::Subnet(
                ClientSubnet::new(s.addr(), s.source_prefix(), s.source_prefix()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edns_with(subnets: &[ClientSubnet]) -> Edns {
        let mut edns = Edns::new();
        for s in subnets {
            edns.options_mut().insert(EdnsOption::Subnet(*s));
        }
        edns
    }

    fn subnet(addr: &str, prefix: u8) -> ClientSubnet {
        ClientSubnet::new(addr.parse().unwrap(), prefix, 0)
    }

    #[test]
    fn no_option_means_the_source_address() {
        assert_eq!(client_location(None), Ok(ClientLocation::Source));
        let edns = Edns::new();
        let loc = client_location(Some(&edns)).unwrap();
        assert_eq!(loc, ClientLocation::Source);
        let src = "192.0.2.1".parse().unwrap();
        assert_eq!(loc.geo_address(src), Some(src));
        assert_eq!(loc.reply_option(), None);
    }

    #[test]
    fn subnet_is_located_and_echoed_with_its_scope() {
        let edns = edns_with(&[subnet("200.160.2.0", 24)]);
        let loc = client_location(Some(&edns)).unwrap();
        assert_eq!(
            loc.geo_address("127.0.0.1".parse().unwrap()),
            Some("200.160.2.0".parse().unwrap())
        );
        let Some(EdnsOption::Subnet(reply)) = loc.reply_option() else {
            panic!("no reply option")
        };
        assert_eq!((reply.source_prefix(), reply.scope_prefix()), (24, 24));
        let edns = edns_with(&[subnet("2001:12ff::", 32)]);
        assert!(matches!(
            client_location(Some(&edns)),
            Ok(ClientLocation::Subnet(_))
        ));
    }

    #[test]
    fn prefix_zero_opts_out_of_location() {
        let edns = edns_with(&[subnet("0.0.0.0", 0)]);
        let loc = client_location(Some(&edns)).unwrap();
        assert_eq!(loc.geo_address("127.0.0.1".parse().unwrap()), None);
        assert!(loc.reply_option().is_some());
    }

    #[test]
    fn malformed_options_are_errors() {
        let two = edns_with(&[subnet("10.0.0.0", 8), subnet("10.0.0.0", 8)]);
        assert_eq!(client_location(Some(&two)), Err(EcsError::Duplicate));
        let bits = edns_with(&[subnet("10.1.2.3", 16)]);
        assert_eq!(
            client_location(Some(&bits)),
            Err(EcsError::BitsBeyondPrefix)
        );
        let long = edns_with(&[ClientSubnet::new("10.0.0.0".parse().unwrap(), 33, 0)]);
        assert_eq!(
            client_location(Some(&long)),
            Err(EcsError::PrefixTooLong { prefix: 33 })
        );
    }
}
