//! The IPv6 next hop for IPv6 routes on an IPv4 session: a global IPv6
//! address on the interface holding the session's local IPv4 address (FRR
//! does the same), never one of the announced prefixes (the anycast
//! addresses on the loopback are every POP's).
//!
//! Which one, when the interface has several: a *preferred* address (RFC
//! 4862 §5.5.4: not deprecated, not tentative, DAD not failed). A
//! deprecated address still works but is on its way out (its prefix is
//! being renumbered away); a tentative or DAD-failed one cannot be used at
//! all, so a router told to forward to it blackholes the anycast prefix.
//! A deprecated address is taken only when the interface has nothing
//! better, with a WARN. QA: the first global address the kernel listed was
//! taken, and the kernel lists the newest first, so adding
//! `2001:db8::5/64 preferred_lft 0` (deprecating it at once) made it the
//! next hop.
//!
//! The address flags come from `/proc/net/if_inet6` (the network
//! namespace's own), which `getifaddrs(3)` does not report; the interface
//! of the IPv4 address from `getifaddrs`. [`choose`] is the pure part.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// `IFA_F_*` bits (linux/if_addr.h) as `/proc/net/if_inet6` prints them
/// (the low eight).
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_DEPRECATED: u32 = 0x20;
const IFA_F_TENTATIVE: u32 = 0x40;

/// One IPv6 address of an interface, with its kernel flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddress {
    pub addr: Ipv6Addr,
    /// `IFA_F_*` bits.
    pub flags: u32,
}

impl LinkAddress {
    /// Unusable as a source or a next hop: still in DAD, or DAD found it
    /// taken.
    fn unusable(&self) -> bool {
        self.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED) != 0
    }

    fn deprecated(&self) -> bool {
        self.flags & IFA_F_DEPRECATED != 0
    }
}

/// The next hop chosen, and whether it is a deprecated address taken for
/// want of a preferred one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub addr: Ipv6Addr,
    pub deprecated: bool,
}

/// The next hop among an interface's IPv6 addresses: the first preferred global one that is not `announced`, else
/// the first deprecated one, else `None`.
pub fn choose(addrs: &[LinkAddress], announced: &[IpNet]) -> Option<Choice> {
    choose_keeping(addrs, announced, None)
}

/// [`choose`], but `current` (the next hop in use) while it is still a
/// preferred candidate: an address added to the interface (listed first,
/// being the newest) does not move the routes; one removed or deprecated
/// does.
pub fn choose_keeping(
    addrs: &[LinkAddress],
    announced: &[IpNet],
    current: Option<Ipv6Addr>,
) -> Option<Choice> {
    let candidates = || {
        addrs.iter().filter(|l| {
            let a = l.addr;
            !l.unusable()
                && !a.is_loopback()
                && !a.is_unspecified()
                && !a.is_multicast()
                && !a.is_unicast_link_local()
                && a.to_ipv4_mapped().is_none()
                && !announced.iter().any(|p| p.contains(&IpAddr::V6(a)))
        })
    };
    candidates()
        .find(|l| !l.deprecated() && Some(l.addr) == current)
        .or_else(|| candidates().find(|l| !l.deprecated()))
        .or_else(|| candidates().next())
        .map(|l| Choice {
            addr: l.addr,
            deprecated: l.deprecated(),
        })
}

/// The IPv6 next hop for IPv6 routes on an IPv4 session whose local
/// address is `local` (see the module docs). `None` on an IPv6 session,
/// or when the interface has no usable global IPv6 address (the routes
/// then carry the IPv4-mapped address).
pub fn link_ipv6(local: IpAddr, announced: &[IpNet]) -> Option<Ipv6Addr> {
    let choice = link_ipv6_choice(local, announced, None)?;
    warn_if_deprecated(&choice, local);
    Some(choice.addr)
}

/// What [`link_ipv6`] would choose (keeping `current` while it is still
/// preferred), and whether it is deprecated, without a word in the log
/// (the driver checks again every few seconds, and says only what
/// changed).
pub fn link_ipv6_choice(
    local: IpAddr,
    announced: &[IpNet],
    current: Option<Ipv6Addr>,
) -> Option<Choice> {
    let IpAddr::V4(local) = local else {
        return None;
    };
    let interface = interface_of(local)?;
    let text = match std::fs::read_to_string("/proc/net/if_inet6") {
        Ok(text) => text,
        // No IPv6 in this kernel or namespace: nothing to choose from.
        Err(e) => {
            tracing::debug!(error = %e, "bgp: cannot read /proc/net/if_inet6");
            return None;
        }
    };
    choose_keeping(&parse_if_inet6(&text, &interface), announced, current)
}

/// The WARN for a next hop that is deprecated (the only usable one left).
pub fn warn_if_deprecated(choice: &Choice, local: IpAddr) {
    if choice.deprecated {
        tracing::warn!(next_hop = %choice.addr, %local,
            "bgp: the only global IPv6 address on the session's interface is deprecated; \
             announcing IPv6 routes with it as next hop");
    }
}

/// The addresses of `interface` in `/proc/net/if_inet6`'s text, whose lines
/// read `<32 hex digits> <ifindex> <prefix len> <scope> <flags> <name>`
/// (all hex). Lines it cannot read are skipped.
pub fn parse_if_inet6(text: &str, interface: &str) -> Vec<LinkAddress> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [hex, _index, _plen, _scope, flags, name] = fields[..] else {
                return None;
            };
            if name != interface || hex.len() != 32 {
                return None;
            }
            Some(LinkAddress {
                addr: Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?),
                flags: u32::from_str_radix(flags, 16).ok()?,
            })
        })
        .collect()
}

/// The name of the interface holding `local`.
fn interface_of(local: Ipv4Addr) -> Option<String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list it allocates, freed below
    // with freeifaddrs; entries are read only in between.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned; its name
        // is a C string, its `ifa_addr`, when set, a sockaddr of the family
        // it names.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null()
            && !ifa.ifa_name.is_null()
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == local {
                let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
                found = Some(name.to_string_lossy().into_owned());
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/net/if_inet6` as the kernel wrote it for a veth with a
    /// deprecated address (flags a2: permanent, deprecated, nodad) listed
    /// before a preferred one, a tentative one (c0) and a link-local one.
    const PROC: &str = "\
20010db8000000000000000000000007 03 40 00 c0       eth0
fe80000000000000703676fffe7e367f 03 40 20 80       eth0
20010db8000000000000000000000005 03 40 00 a2       eth0
fd770000000000000000000000000002 03 40 00 82       eth0
fd770000000000000000000000000009 02 40 00 80       eth1
";

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn addr(s: &str, flags: u32) -> LinkAddress {
        LinkAddress { addr: v6(s), flags }
    }

    #[test]
    fn parses_one_interfaces_addresses_with_their_flags() {
        assert_eq!(
            parse_if_inet6(PROC, "eth0"),
            [
                addr("2001:db8::7", 0xc0),
                addr("fe80::7036:76ff:fe7e:367f", 0x80),
                addr("2001:db8::5", 0xa2),
                addr("fd77::2", 0x82),
            ]
        );
        assert_eq!(parse_if_inet6("garbage\n\n1 2 3", "eth0"), []);
    }

    #[test]
    fn a_preferred_address_wins_over_deprecated_tentative_and_dadfailed_ones_listed_first() {
        let chosen = choose(&parse_if_inet6(PROC, "eth0"), &[]).unwrap();
        assert_eq!(
            chosen,
            Choice {
                addr: v6("fd77::2"),
                deprecated: false
            }
        );
        let dad_failed = [addr("fd77::9", 0x08), addr("fd77::2", 0x80)];
        assert_eq!(choose(&dad_failed, &[]).unwrap().addr, v6("fd77::2"));
    }

    #[test]
    fn a_deprecated_address_only_when_nothing_else_is_usable() {
        let addrs = [
            addr("2001:db8::7", IFA_F_TENTATIVE),
            addr("2001:db8::5", IFA_F_DEPRECATED),
        ];
        assert_eq!(
            choose(&addrs, &[]),
            Some(Choice {
                addr: v6("2001:db8::5"),
                deprecated: true
            })
        );
        assert_eq!(choose(&addrs[..1], &[]), None, "tentative: never");
    }

    #[test]
    fn never_an_announced_address() {
        let announced = ["2001:db8:100::/48".parse().unwrap()];
        let addrs = [addr("2001:db8:100::1", 0x80), addr("fd77::2", 0x80)];
        assert_eq!(choose(&addrs, &announced).unwrap().addr, v6("fd77::2"));
        assert_eq!(choose(&addrs[..1], &announced), None);
    }

    /// Checked again under a running session: the next hop in use stays
    /// while it is preferred, even behind a newer address; deprecated or
    /// gone, the first preferred one takes over.
    #[test]
    fn the_next_hop_in_use_stays_while_it_is_preferred() {
        let added = [addr("fd77::7", 0x80), addr("fd77::2", 0x80)];
        let keep = Some(v6("fd77::2"));
        assert_eq!(
            choose_keeping(&added, &[], keep).unwrap().addr,
            v6("fd77::2")
        );
        assert_eq!(choose(&added, &[]).unwrap().addr, v6("fd77::7"));
        let deprecated = [addr("fd77::7", 0x80), addr("fd77::2", IFA_F_DEPRECATED)];
        assert_eq!(
            choose_keeping(&deprecated, &[], keep).unwrap().addr,
            v6("fd77::7")
        );
        let removed = [addr("fd77::7", 0x80)];
        assert_eq!(
            choose_keeping(&removed, &[], keep).unwrap().addr,
            v6("fd77::7")
        );
    }
}
