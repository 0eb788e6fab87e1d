//! The mesh interface's link state, addresses and routes, over rtnetlink.
//!
//! What the mesh keeps in the kernel:
//! - the interface up, at `mesh.mtu`;
//! - one `/128` per local 6PN address (this POP's `::1`, and backends'
//!   addresses allocated here, so a backend on this host can bind them),
//!   added without duplicate address detection;
//! - one route per remote POP's `/64` through the interface, with this POP's
//!   address as preferred source (so a connection from this host to a
//!   remote backend leaves from `::1`, not a backend's address);
//! - `unreachable <cluster /48>` underneath: a 6PN address no live POP
//!   serves fails at once (`EHOSTUNREACH`), so the proxy moves on to the
//!   next backend instead of waiting for a connect timeout, and 6PN traffic
//!   never leaks to a default route.
//!
//! Every route the mesh adds carries edgeproxy's own route protocol,
//! [`ROUTE_PROTOCOL`] (`ip -6 route` shows `proto 237`): that is how a
//! start tells a route a previous run left (`leftover`) from an
//! operator's, which it never touches.
//!
//! Reads and changes are separate calls; deciding what to change is
//! `plan`'s job.

use std::net::{IpAddr, Ipv6Addr};

use futures_util::TryStreamExt;
use ipnet::Ipv6Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// The route protocol (`rtm_protocol`) of every route the mesh adds: 237
/// (0xED, for EDgeproxy). The kernel interprets only 0–4 (`RTPROT_STATIC`
/// and below) and leaves the rest to routing daemons, asking them not to
/// collide (`include/uapi/linux/rtnetlink.h`). 237 is in none of the lists
/// a host names protocols from: the kernel's own (up to 192, EIGRP),
/// iproute2's `/etc/iproute2/rt_protos`, FRR's `rt_protos.d/frr.conf`
/// (186–198); nor is it one that other software we know of uses (Calico's
/// 80, OVN's 84). `ip route add` without `proto` says `boot` (3), and
/// before 2026-12-06 the mesh's routes were `static` (4), like any
/// operator's `proto static`: a start could not tell a route a previous run
/// left from one the operator added.
pub const ROUTE_PROTOCOL: u8 = 237;

/// [`ROUTE_PROTOCOL`] as the netlink crates spell it.
fn edgeproxy_protocol() -> RouteProtocol {
    RouteProtocol::Other(ROUTE_PROTOCOL)
}

/// An IPv6 `unreachable` route in the main table, as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnreachableRoute {
    pub net: Ipv6Net,
    /// Its `rtm_protocol` ([`ROUTE_PROTOCOL`] when the mesh added it).
    pub protocol: u8,
}

/// A netlink call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetlinkError {
    #[error("mesh: netlink: cannot open a socket: {0}")]
    Connect(std::io::Error),
    #[error("mesh: interface {0} does not exist")]
    NoInterface(String),
    #[error("mesh: netlink: {what}: {cause}")]
    Call {
        what: String,
        cause: rtnetlink::Error,
    },
}

/// A connection to the kernel's routing netlink, its task on the current
/// runtime.
pub struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
    /// Route dumps ask the kernel to filter (`NETLINK_GET_STRICT_CHK`, Linux
    /// 4.20+): a host holding a full IPv6 table then sends only the mesh's
    /// few routes, not every route, at every pass. Measured with `ip -6
    /// route` on 100,000 routes: 0.24 s for the whole table, 0.03 s
    /// filtered by protocol. Cleared if the kernel refuses a filtered dump.
    filtered_dumps: std::sync::atomic::AtomicBool,
    /// Routes the kernel has sent in dumps, kept or not.
    routes_read: std::sync::atomic::AtomicU64,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn call(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |cause| NetlinkError::Call { what, cause }
}

/// True when the kernel said "already there" / "not there".
fn errno_is(e: &rtnetlink::Error, errno: i32) -> bool {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.raw_code() == -errno,
        _ => false,
    }
}

impl Netlink {
    pub fn connect() -> Result<Netlink, NetlinkError> {
        use rtnetlink::sys::AsyncSocket;
        let (mut conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        let filtered_dumps = conn
            .socket_mut()
            .socket_ref()
            .set_netlink_get_strict_chk(true)
            .is_ok();
        let task = tokio::spawn(conn);
        Ok(Netlink {
            handle,
            task,
            filtered_dumps: filtered_dumps.into(),
            routes_read: 0.into(),
        })
    }

    /// The interface's index.
    pub async fn index(&self, name: &str) -> Result<u32, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(NetlinkError::NoInterface(name.to_string())),
            Err(e) if errno_is(&e, libc::ENODEV) => {
                Err(NetlinkError::NoInterface(name.to_string()))
            }
            Err(e) => Err(call(format!("find interface {name}"))(e)),
        }
    }

    /// Sets the MTU and brings the link up.
    pub async fn up(&self, index: u32, mtu: u16) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(mtu as u32)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(call("set link up"))
    }

    /// Whether the interface is administratively up (`ip link set down`
    /// clears it, and the kernel flushes its IPv6 addresses and routes);
    /// `None` when no interface has this index any more (deleted).
    pub async fn is_up(&self, index: u32) -> Result<Option<bool>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.flags.contains(LinkFlags::Up))),
            Err(e) if errno_is(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(call("read link")(e)),
        }
    }

    /// The interface's MTU, for status.
    pub async fn mtu(&self, index: u32) -> Result<Option<u32>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links.try_next().await.map_err(call("read link"))?;
        Ok(link.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
        }))
    }

    /// The interface's global IPv6 addresses (link-local ones are the
    /// kernel's).
    pub async fn addresses(&self, index: u32) -> Result<Vec<Ipv6Addr>, NetlinkError> {
        let mut out = Vec::new();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = addrs.try_next().await.map_err(call("list addresses"))? {
            if msg.header.index != index || msg.header.scope == AddressScope::Link {
                continue;
            }
            for a in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V6(ip)) = a {
                    out.push(*ip);
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Adds `ip/128`, usable at once (no duplicate address detection: the
    /// mesh alone hands out 6PN addresses).
    pub async fn add_address(&self, index: u32, ip: Ipv6Addr) -> Result<(), NetlinkError> {
        let mut req = self.handle.address().add(index, IpAddr::V6(ip), 128);
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        match req.execute().await {
            Err(e) if errno_is(&e, libc::EEXIST) => Ok(()),
            r => r.map_err(call(format!("add address {ip}/128"))),
        }
    }

    pub async fn del_address(&self, index: u32, ip: Ipv6Addr) -> Result<(), NetlinkError> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V6(ip))
            .execute();
        while let Some(msg) = addrs.try_next().await.map_err(call("list addresses"))? {
            if msg.header.index != index {
                continue;
            }
            match self.handle.address().del(msg).execute().await {
                Err(e) if errno_is(&e, libc::EADDRNOTAVAIL) => {}
                r => r.map_err(call(format!("remove address {ip}")))?,
            }
        }
        Ok(())
    }

    /// Routes in the main table through the interface whose destination is
    /// a /64 inside `cluster`: the mesh's routes to remote POPs.
    pub async fn pop_routes(
        &self,
        index: u32,
        cluster: Ipv6Net,
    ) -> Result<Vec<Ipv6Net>, NetlinkError> {
        let mut out = self
            .main_table_routes(RouteType::Unicast, Some(index), |r| {
                let net = destination(r)?;
                (net.prefix_len() == 64 && cluster.contains(&net)).then_some(net)
            })
            .await?;
        out.sort();
        Ok(out)
    }

    /// Every IPv6 `unreachable` route in the main table, with its protocol.
    pub async fn unreachable_routes(&self) -> Result<Vec<UnreachableRoute>, NetlinkError> {
        self.main_table_routes(RouteType::Unreachable, None, |r| {
            Some(UnreachableRoute {
                net: destination(r)?,
                protocol: u8::from(r.header.protocol),
            })
        })
        .await
    }

    /// What `keep` takes from each IPv6 route of type `kind` in the main
    /// table (through interface `oif` only, if given), read as the dump
    /// streams in (a host may hold a full table: nothing else is kept). The
    /// kernel filters the dump where it can; the same checks run here
    /// either way.
    async fn main_table_routes<T>(
        &self,
        kind: RouteType,
        oif: Option<u32>,
        mut keep: impl FnMut(&RouteMessage) -> Option<T>,
    ) -> Result<Vec<T>, NetlinkError> {
        use std::sync::atomic::Ordering::Relaxed;
        let filtered = self.filtered_dumps.load(Relaxed);
        // Any protocol: the builder's defaults (`static`, `unicast`) would
        // be filters too, under strict checking.
        let mut request = RouteMessageBuilder::<Ipv6Addr>::new()
            .protocol(RouteProtocol::Unspec)
            .kind(RouteType::Unspec);
        if filtered {
            request = request.kind(kind);
            if let Some(oif) = oif {
                request = request.output_interface(oif);
            }
        }
        let mut out = Vec::new();
        let mut routes = self.handle.route().get(request.build()).execute();
        loop {
            let r = match routes.try_next().await {
                Ok(Some(r)) => r,
                Ok(None) => break,
                // A kernel that accepts the socket option but not this
                // request's filter: dump everything from now on.
                Err(e) if filtered && out.is_empty() && errno_is(&e, libc::EINVAL) => {
                    tracing::debug!(error = %e, "mesh: the kernel refused a filtered route dump");
                    self.filtered_dumps.store(false, Relaxed);
                    return Box::pin(self.main_table_routes(kind, oif, keep)).await;
                }
                Err(e) => return Err(call("list routes")(e)),
            };
            self.routes_read.fetch_add(1, Relaxed);
            let through = |index| {
                r.attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
            };
            if r.header.table == RouteHeader::RT_TABLE_MAIN
                && r.header.kind == kind
                && oif.is_none_or(through)
            {
                out.extend(keep(&r));
            }
        }
        Ok(out)
    }

    /// `dest` through the interface, preferred source `src`.
    pub async fn add_route(
        &self,
        index: u32,
        dest: Ipv6Net,
        src: Ipv6Addr,
    ) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dest.network(), dest.prefix_len())
            .output_interface(index)
            .pref_source(src)
            .protocol(edgeproxy_protocol())
            .build();
        match self.handle.route().add(msg).replace().execute().await {
            Err(e) if errno_is(&e, libc::EEXIST) => Ok(()),
            r => r.map_err(call(format!("add route {dest}"))),
        }
    }

    /// Removes the route to `dest` through the interface, whatever its
    /// protocol (an older edgeproxy added them as `static`).
    pub async fn del_route(&self, index: u32, dest: Ipv6Net) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dest.network(), dest.prefix_len())
            .output_interface(index)
            // Unspecified matches any (the builder says `static`, which the
            // kernel would match against the route's protocol).
            .protocol(RouteProtocol::Unspec)
            .build();
        match self.handle.route().del(msg).execute().await {
            Err(e) if errno_is(&e, libc::ESRCH) => Ok(()),
            r => r.map_err(call(format!("remove route {dest}"))),
        }
    }

    /// `unreachable <net>` (replaces one left by an earlier run).
    pub async fn add_unreachable(&self, net: Ipv6Net) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .kind(RouteType::Unreachable)
            .protocol(edgeproxy_protocol())
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(call(format!("add unreachable {net}")))
    }

    /// Removes edgeproxy's `unreachable <net>`; never one with another
    /// protocol (an operator's), which the kernel does not match.
    pub async fn del_unreachable(&self, net: Ipv6Net) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .kind(RouteType::Unreachable)
            .protocol(edgeproxy_protocol())
            .build();
        match self.handle.route().del(msg).execute().await {
            Err(e) if errno_is(&e, libc::ESRCH) => Ok(()),
            r => r.map_err(call(format!("remove unreachable {net}"))),
        }
    }
}

fn destination(r: &RouteMessage) -> Option<Ipv6Net> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
            Ipv6Net::new(*ip, r.header.destination_prefix_length).ok()
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::test_netns::{in_own_network_namespace, ip, ip_batch};
    use std::sync::atomic::Ordering::Relaxed;

    /// The mesh reads its routes at every pass. On a host that holds many
    /// routes of its own the kernel sends only the mesh interface's (the
    /// filter this test can fail on is `routes_read`), and what is read is
    /// the same as without the filter.
    #[test]
    fn route_dumps_read_the_mesh_interface_s_routes_not_the_whole_table() {
        in_own_network_namespace(|| async {
            ip(&["tuntap", "add", "mode", "tun", "name", "mesh0"]);
            ip(&["link", "set", "mesh0", "up"]);
            let mut batch = String::new();
            for i in 0..2_000 {
                batch += &format!("route add 2001:db8:{i:x}::/48 dev lo\n");
            }
            for i in 0..500 {
                batch += &format!("route add unreachable 2001:db9:{i:x}::/48\n");
            }
            for pop in 1..=3 {
                batch += &format!("route add fd00:1:0:{pop}::/64 dev mesh0 proto 237\n");
            }
            batch += "route add fd00:2:0:1::/64 dev mesh0 proto 237\n";
            batch += "route add unreachable fd00:1::/48 proto 237\n";
            ip_batch(&batch);
            let cluster: Ipv6Net = "fd00:1::/48".parse().unwrap();
            let expected: Vec<Ipv6Net> = (1..=3)
                .map(|pop| format!("fd00:1:0:{pop}::/64").parse().unwrap())
                .collect();
            let netlink = Netlink::connect().expect("netlink");
            let mesh0 = netlink.index("mesh0").await.expect("mesh0");
            assert!(
                netlink.filtered_dumps.load(Relaxed),
                "strict checking refused"
            );
            let before = netlink.routes_read.load(Relaxed);
            assert_eq!(netlink.pop_routes(mesh0, cluster).await.unwrap(), expected);
            let read = netlink.routes_read.load(Relaxed) - before;
            // The four /64s and the interface's own fe80::/64.
            assert!(read <= 5, "{read} routes read for the mesh's 3");
            let unreachable = netlink.unreachable_routes().await.unwrap();
            assert_eq!(unreachable.len(), 501);
            assert!(unreachable
                .iter()
                .any(|r| r.net == cluster && r.protocol == 237));

            // The same answers from a whole-table dump (a kernel without
            // the filter).
            netlink.filtered_dumps.store(false, Relaxed);
            let before = netlink.routes_read.load(Relaxed);
            assert_eq!(netlink.pop_routes(mesh0, cluster).await.unwrap(), expected);
            assert!(netlink.routes_read.load(Relaxed) - before > 2_000);
            assert_eq!(netlink.unreachable_routes().await.unwrap().len(), 501);
        });
    }
}
