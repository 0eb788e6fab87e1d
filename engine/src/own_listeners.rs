//! Backend addresses that are this proxy's own listeners.
//!
//! A backend at one of the proxy's own listening addresses makes every
//! connection routed to it come back in as a new client, which is routed
//! again: one client fills the connection limit with a chain of hops, whose
//! last connect waits in the accept queue for a slot the chain itself
//! holds (nothing is ever served again until the idle timeout closes the
//! chain). The snapshot builder leaves such rows out
//! (`RecordError::OwnListener`) and the discovery API refuses them.
//!
//! What counts as reaching a listener `L` from a backend address `B` (IPv4-
//! mapped IPv6 addresses read as IPv4):
//! - same port, and `B`'s IP is `L`'s IP;
//! - same port, `L` bound to `0.0.0.0` and `B` an IPv4 address of this
//!   host, or `L` bound to `::` (dual-stack: the engine does not set
//!   `IPV6_V6ONLY`) and `B` any address of this host.
//!
//! "An address of this host" is a loopback address or one an interface
//! holds (`getifaddrs(3)`, read once per check or snapshot build, and only
//! when some address needs it). Not caught: addresses that reach this host
//! through a local route without being on an interface (`ip route add
//! local …`, "AnyIP"), NAT or port forwarding to the listener, and loops
//! through another proxy (A routes to B, B to A).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The addresses the proxy's listeners are bound to (their real ports, not
/// a configured port 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnListeners {
    addrs: Vec<SocketAddr>,
}

impl OwnListeners {
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        let mut addrs: Vec<SocketAddr> = addrs.into_iter().map(canonical).collect();
        addrs.sort();
        addrs.dedup();
        OwnListeners { addrs }
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Whether a listener is bound to `0.0.0.0` or `::`: reached at every
    /// address of the host, which change (DHCP, a VIP moved here).
    pub fn any_unspecified(&self) -> bool {
        self.addrs.iter().any(|a| a.ip().is_unspecified())
    }

    /// The listener a connection to `backend` would reach, if any. `local`
    /// says whether an IP is this host's; it is asked only about a backend
    /// on the port of a listener bound to the unspecified address.
    pub fn reached_by(
        &self,
        backend: SocketAddr,
        local: &mut dyn FnMut(IpAddr) -> bool,
    ) -> Option<SocketAddr> {
        let backend = canonical(backend);
        let mut asked = None;
        for &l in self.addrs.iter().filter(|l| l.port() == backend.port()) {
            if l.ip() == backend.ip() {
                return Some(l);
            }
            let family_fits = match l.ip() {
                IpAddr::V4(ip) => ip.is_unspecified() && backend.is_ipv4(),
                IpAddr::V6(ip) => ip.is_unspecified(),
            };
            if family_fits && *asked.get_or_insert_with(|| local(backend.ip())) {
                return Some(l);
            }
        }
        None
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The IP addresses of this host's interfaces, as `getifaddrs(3)` lists
/// them (sorted, once each).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalIps(Vec<IpAddr>);

impl LocalIps {
    pub fn read() -> io::Result<LocalIps> {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `head` with a list it allocates, freed
        // below with freeifaddrs; entries are read only in between.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ips = Vec::new();
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: `cur` is a node of the list getifaddrs returned; its
            // `ifa_addr`, when set, points to a sockaddr of the family it
            // names.
            let ifa = unsafe { &*cur };
            if !ifa.ifa_addr.is_null() {
                match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                    libc::AF_INET => {
                        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                        ips.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                        ips.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
        // SAFETY: `head` came from getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(head) };
        ips.sort();
        ips.dedup();
        Ok(LocalIps(ips))
    }

    /// Whether `ip` is this host's: loopback, or on an interface.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || self.0.contains(&ip)
    }
}

/// Whether `ip` is this host's, with the interfaces read now and at most
/// once however often it is asked: for one check or one snapshot build.
/// When they cannot be read, only loopback counts (said once per read).
#[derive(Debug, Default)]
pub struct LocalIpsOnce(Option<LocalIps>);

impl LocalIpsOnce {
    pub fn contains(&mut self, ip: IpAddr) -> bool {
        let ips = self.0.get_or_insert_with(|| {
            LocalIps::read().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot list this host's addresses; only loopback backends are checked against the proxy's own listeners");
                LocalIps::default()
            })
        });
        ips.contains(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn own(addrs: &[&str]) -> OwnListeners {
        OwnListeners::new(addrs.iter().map(|s| a(s)))
    }

    #[test]
    fn the_same_address_is_reached_without_asking_about_the_host() {
        let own = own(&["127.0.0.1:18380", "[::1]:443"]);
        let mut never = |ip: IpAddr| panic!("asked about {ip}");
        assert_eq!(
            own.reached_by(a("127.0.0.1:18380"), &mut never),
            Some(a("127.0.0.1:18380"))
        );
        assert_eq!(
            own.reached_by(a("[::ffff:127.0.0.1]:18380"), &mut never),
            Some(a("127.0.0.1:18380"))
        );
        assert_eq!(
            own.reached_by(a("[::1]:443"), &mut never),
            Some(a("[::1]:443"))
        );
        // Another port, or another IP of a listener bound to one IP: not it.
        assert_eq!(own.reached_by(a("127.0.0.1:18381"), &mut never), None);
        assert_eq!(own.reached_by(a("127.0.0.2:18380"), &mut never), None);
        assert_eq!(own.reached_by(a("10.0.0.1:18380"), &mut never), None);
    }

    #[test]
    fn an_unspecified_listener_is_reached_at_any_local_ip_of_its_families() {
        let local = |ip: IpAddr| ip == "10.1.2.3".parse::<IpAddr>().unwrap() || ip.is_loopback();
        let v4 = own(&["0.0.0.0:8080"]);
        assert!(v4.reached_by(a("10.1.2.3:8080"), &mut { local }).is_some());
        assert!(v4.reached_by(a("127.0.0.9:8080"), &mut { local }).is_some());
        assert!(v4.reached_by(a("10.9.9.9:8080"), &mut { local }).is_none());
        assert!(v4.reached_by(a("10.1.2.3:8081"), &mut { local }).is_none());
        assert!(v4.reached_by(a("[::1]:8080"), &mut { local }).is_none());
        // `::` is dual-stack: IPv4 clients reach it too.
        let v6 = own(&["[::]:8080"]);
        assert!(v6.reached_by(a("[::1]:8080"), &mut { local }).is_some());
        assert!(v6.reached_by(a("10.1.2.3:8080"), &mut { local }).is_some());
        assert!(v6.reached_by(a("10.9.9.9:8080"), &mut { local }).is_none());
    }

    #[test]
    fn loopback_and_interface_addresses_are_local() {
        let ips = LocalIps::read().unwrap();
        assert!(ips.contains("127.0.0.1".parse().unwrap()));
        assert!(ips.contains("127.3.4.5".parse().unwrap()));
        assert!(ips.contains("::1".parse().unwrap()));
        assert!(ips.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!ips.contains("192.0.2.77".parse().unwrap()), "TEST-NET-1");
    }
}
