//! EDNS Client Subnet (RFC 7871): which address the answer is tailored to.
//!
//! A resolver that sends ECS tells us the network its client is in; the
//! geo lookup then uses that network's address instead of the resolver's.
//! Every reply to a query with a valid option echoes it (RFC 7871 §7.2.1:
//! "regardless of whether the client information was needed"), and its
//! SCOPE PREFIX-LENGTH says for which clients the answer holds:
//!
//! - an answer chosen by the client's location (see [`Scope`]) has the
//!   source prefix as its scope: it was computed from that network address
//!   alone, so it holds for the whole network and no wider;
//! - any other answer (NXDOMAIN, NODATA, lists, SOA, NS, REFUSED) has scope
//!   0: it is the same for every client, and a resolver caching by subnet
//!   (Unbound's subnetcache) keeps one copy for all of them instead of one
//!   per client subnet, each costing a query to this server.
//!
//! Errors found before the option is read and checked (NOTIMP, BADVERS,
//! FORMERR) echo none.
//!
//! A SOURCE PREFIX-LENGTH of 0 is the client opting out of tailoring
//! (RFC 7871 §7.1.2): no client location is used at all, not even the
//! resolver's, and the scope is 0.
//!
//! The ADDRESS field must hold exactly the bytes the source prefix needs
//! (RFC 7871 §6). hickory reads only those and drops the rest of the
//! option, so an address with bytes to spare decodes; the count is checked
//! on the raw option instead ([`client_location`] takes the query's bytes).

use std::net::IpAddr;

use hickory_proto::op::Edns;
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};

use crate::salvage::find_opt;

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
    #[error("address has {bytes} bytes; source prefix /{prefix} needs {needed}")]
    AddressLength {
        prefix: u8,
        bytes: usize,
        needed: usize,
    },
}

/// Reads and validates the ECS option of a query's OPT record. `query` is
/// the message `edns` was decoded from: the address's byte count is checked
/// there. (Unknown address families and options shorter than their prefix
/// needs already fail message decoding.)
pub fn client_location(edns: Option<&Edns>, query: &[u8]) -> Result<ClientLocation, EcsError> {
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
    if let Some(rdata) = find_opt(query).and_then(|opt| opt.rdata) {
        address_lengths_exact(rdata)?;
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

/// ECS's option code (RFC 7871 §6).
const ECS: u16 = 8;

/// Checks that every ECS option in an OPT record's raw options carries
/// exactly `ceil(SOURCE PREFIX-LENGTH / 8)` address bytes. Options that do
/// not frame are left to the decoder, which refuses them.
fn address_lengths_exact(mut options: &[u8]) -> Result<(), EcsError> {
    while let [c0, c1, l0, l1, rest @ ..] = options {
        let len = usize::from(u16::from_be_bytes([*l0, *l1]));
        let Some(data) = rest.get(..len) else {
            return Ok(());
        };
        if u16::from_be_bytes([*c0, *c1]) == ECS {
            // FAMILY (2), SOURCE PREFIX-LENGTH, SCOPE PREFIX-LENGTH, ADDRESS.
            if let [_, _, prefix, _, address @ ..] = data {
                let needed = usize::from(prefix.div_ceil(8));
                if address.len() != needed {
                    return Err(EcsError::AddressLength {
                        prefix: *prefix,
                        bytes: address.len(),
                        needed,
                    });
                }
            }
        }
        options = &rest[len..];
    }
    Ok(())
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

    /// The option to put in the reply, if the query had one, for an answer
    /// whose dependence on the client's location is `scope`.
    pub fn reply_option(&self, scope: Scope) -> Option<EdnsOption> {
        match self {
            ClientLocation::Source => None,
            ClientLocation::Subnet(s) | ClientLocation::OptedOut(s) => {
                let scope_prefix = match scope {
                    Scope::Located => s.source_prefix(),
                    Scope::Everyone => 0,
                };
                Some(EdnsOption::Subnet(ClientSubnet::new(
                    s.addr(),
                    s.source_prefix(),
                    scope_prefix,
                )))
            }
        }
    }
}

/// For which clients an answer holds: what the reply's ECS scope says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// The same answer for every client: scope 0.
    #[default]
    Everyone,
    /// Records chosen or ordered by the client's location (an app's
    /// backend, its SRV priorities, the GeoDNS apex's POPs): the source
    /// prefix.
    Located,
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Message;

    fn edns_with(subnets: &[ClientSubnet]) -> Edns {
        let mut edns = Edns::new();
        for s in subnets {
            edns.options_mut().insert(EdnsOption::Subnet(*s));
        }
        edns
    }

    /// An option built here, not received: there are no raw bytes to check.
    fn locate(edns: &Edns) -> Result<ClientLocation, EcsError> {
        client_location(Some(edns), &[])
    }

    /// A query for `web.internal. A` whose OPT record holds one ECS option
    /// of family 1 with `prefix` and `address` as sent, and that message
    /// decoded.
    fn received(prefix: u8, address: &[u8]) -> (Vec<u8>, Message) {
        let mut option = vec![0, 8];
        option.extend_from_slice(&(4 + address.len() as u16).to_be_bytes());
        option.extend_from_slice(&[0, 1, prefix, 0]);
        option.extend_from_slice(address);
        let bytes = crate::salvage::tests::query_with_option(&option);
        let decoded = Message::from_vec(&bytes).expect("hickory decodes it");
        (bytes, decoded)
    }

    fn subnet(addr: &str, prefix: u8) -> ClientSubnet {
        ClientSubnet::new(addr.parse().unwrap(), prefix, 0)
    }

    #[test]
    fn no_option_means_the_source_address() {
        assert_eq!(client_location(None, &[]), Ok(ClientLocation::Source));
        let edns = Edns::new();
        let loc = locate(&edns).unwrap();
        assert_eq!(loc, ClientLocation::Source);
        let src = "192.0.2.1".parse().unwrap();
        assert_eq!(loc.geo_address(src), Some(src));
        assert_eq!(loc.reply_option(Scope::Located), None);
        assert_eq!(loc.reply_option(Scope::Everyone), None);
    }

    #[test]
    fn subnet_is_located_and_echoed_with_its_scope() {
        let edns = edns_with(&[subnet("200.160.2.0", 24)]);
        let loc = locate(&edns).unwrap();
        assert_eq!(
            loc.geo_address("127.0.0.1".parse().unwrap()),
            Some("200.160.2.0".parse().unwrap())
        );
        let Some(EdnsOption::Subnet(reply)) = loc.reply_option(Scope::Located) else {
            panic!("no reply option")
        };
        assert_eq!((reply.source_prefix(), reply.scope_prefix()), (24, 24));
        assert_eq!(reply.addr(), "200.160.2.0".parse::<IpAddr>().unwrap());
        // An answer that does not depend on where the client is holds for
        // every client: scope 0, the rest echoed as sent.
        let Some(EdnsOption::Subnet(reply)) = loc.reply_option(Scope::Everyone) else {
            panic!("no reply option")
        };
        assert_eq!((reply.source_prefix(), reply.scope_prefix()), (24, 0));
        assert_eq!(reply.addr(), "200.160.2.0".parse::<IpAddr>().unwrap());
        let edns = edns_with(&[subnet("2001:12ff::", 32)]);
        assert!(matches!(locate(&edns), Ok(ClientLocation::Subnet(_))));
    }

    #[test]
    fn prefix_zero_opts_out_of_location() {
        let edns = edns_with(&[subnet("0.0.0.0", 0)]);
        let loc = locate(&edns).unwrap();
        assert_eq!(loc.geo_address("127.0.0.1".parse().unwrap()), None);
        for scope in [Scope::Located, Scope::Everyone] {
            let Some(EdnsOption::Subnet(reply)) = loc.reply_option(scope) else {
                panic!("no reply option")
            };
            assert_eq!((reply.source_prefix(), reply.scope_prefix()), (0, 0));
        }
    }

    #[test]
    fn malformed_options_are_errors() {
        let two = edns_with(&[subnet("10.0.0.0", 8), subnet("10.0.0.0", 8)]);
        assert_eq!(locate(&two), Err(EcsError::Duplicate));
        let bits = edns_with(&[subnet("10.1.2.3", 16)]);
        assert_eq!(locate(&bits), Err(EcsError::BitsBeyondPrefix));
        let long = edns_with(&[ClientSubnet::new("10.0.0.0".parse().unwrap(), 33, 0)]);
        assert_eq!(locate(&long), Err(EcsError::PrefixTooLong { prefix: 33 }));
    }

    /// RFC 7871 §6: ADDRESS is cut to the bytes the prefix needs. hickory
    /// reads those and drops the rest, so `10.9` sent for a /8 decoded as
    /// 10.0.0.0/8 and was answered.
    #[test]
    fn address_bytes_beyond_the_prefix_are_malformed() {
        for (prefix, address, needed) in [
            (8, &[10, 9][..], 1),
            (16, &[10, 9, 1][..], 2),
            (1, &[0x80, 0][..], 1),
            (0, &[0][..], 0),
            (24, &[10, 9, 1, 0][..], 3),
        ] {
            let (bytes, msg) = received(prefix, address);
            assert_eq!(
                client_location(msg.edns.as_ref(), &bytes),
                Err(EcsError::AddressLength {
                    prefix,
                    bytes: address.len(),
                    needed
                }),
                "/{prefix} with {address:?}"
            );
        }
        for (prefix, address) in [(8, &[10][..]), (12, &[10, 0][..]), (0, &[][..])] {
            let (bytes, msg) = received(prefix, address);
            assert!(
                client_location(msg.edns.as_ref(), &bytes).is_ok(),
                "/{prefix} with {address:?}"
            );
        }
    }
}
