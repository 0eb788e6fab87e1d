//! Unreachable routes a previous run of the mesh left, removed at start.
//!
//! The `unreachable <cluster /48>` route (see `netlink`) belongs to no
//! interface, so it outlives the mesh interface. A clean stop removes it
//! (`Driver::stop`); a process killed (SIGKILL, a crash) does not, nor one
//! that handed over to a binary upgrade's successor (`Handle::release`
//! leaves it to the successor, which normally adds the same route). Started
//! next with the mesh off, or on another cluster /48, edgeproxy used to
//! leave it there for good: every address in it failed with "No route to
//! host" on that host, and nothing said why.
//!
//! [`sweep_at_start`] removes, once per start, every IPv6 `unreachable`
//! route in the main table that carries edgeproxy's route protocol
//! ([`ROUTE_PROTOCOL`]) other than the one this run's mesh uses ([`stale`]
//! decides, a pure function). A route with any other protocol is an
//! operator's and is never touched; the removal names the protocol too, so
//! the kernel could not take an operator's route for ours either.
//!
//! One edgeproxy with a mesh per network namespace: a second one in the
//! same namespace, on another /48, would see the first one's route as
//! stale.

use std::time::Duration;

use ipnet::Ipv6Net;

use super::netlink::{Netlink, NetlinkError, UnreachableRoute, ROUTE_PROTOCOL};
use crate::upgrade::inherit::{self, MeshHandOff};

/// How long a binary upgrade's successor waits for its predecessor to say
/// it no longer runs a mesh: longer than the hand-off listener's own limit
/// (60 s), so that the listener's verdict (a word, the channel closed, or
/// none) comes first.
const PREDECESSOR_PATIENCE: Duration = Duration::from_secs(90);

/// The routes in `found` that a previous run left: edgeproxy's (by
/// protocol), except `keep`, the cluster /48 this run's mesh uses (`None`:
/// the mesh is off, all of them are stale).
pub fn stale(found: &[UnreachableRoute], keep: Option<Ipv6Net>) -> Vec<Ipv6Net> {
    let mut out: Vec<Ipv6Net> = found
        .iter()
        .filter(|r| r.protocol == ROUTE_PROTOCOL && Some(r.net) != keep)
        .map(|r| r.net)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Why a route is stale, as the log says it.
fn why(keep: Option<Ipv6Net>) -> String {
    match keep {
        None => "mesh is off".to_string(),
        Some(net) => format!("the cluster's 6PN prefix is now {net}"),
    }
}

/// Removes the stale routes (see [`stale`]) once, at start. Call it after
/// the mesh (if on) has started and before this process reports ready to
/// a binary upgrade's predecessor; `keep` is the cluster /48 this run's
/// mesh uses (`None`: the mesh is off).
///
/// An ordinary start removes them now (blocking, on `runtime`), before the
/// process says it is ready: no earlier run is still running.
///
/// A binary upgrade's successor must not take its predecessor's route
/// while that one still runs its mesh (6PN addresses no live POP serves
/// would leak to the default route meanwhile). The predecessor stops its
/// mesh only after this process reported ready (`app::run`: it stops its
/// WireGuard, then says `Mesh`, then hands over BGP and replication), so
/// the removal waits, on a task of `runtime`, for that word, or for
/// `BgpDone` without it (the predecessor ran no mesh), or for the
/// predecessor to go. No word at all: the route stays, said at WARN, and
/// the next start removes it.
pub fn sweep_at_start(runtime: &tokio::runtime::Runtime, keep: Option<Ipv6Net>) {
    if !inherit::is_successor() {
        runtime.block_on(sweep(keep));
        return;
    }
    // Keeps the hand-off channel listening after `Ready` until the
    // predecessor's word on its mesh comes.
    inherit::expect_mesh_hand_off();
    runtime.spawn(async move {
        let said =
            tokio::task::spawn_blocking(|| inherit::await_no_mesh(PREDECESSOR_PATIENCE)).await;
        match said {
            Ok(Ok(how)) => {
                let previous = match how {
                    MeshHandOff::Released => "stopped its mesh",
                    MeshHandOff::Gone => "ran no mesh, or exited",
                };
                tracing::debug!(
                    previous,
                    "mesh: the previous process runs no mesh; looking for routes it left"
                );
                sweep(keep).await;
            }
            Ok(Err(e)) => warn_left(keep, &e).await,
            Err(e) => warn_left(keep, &e.to_string()).await,
        }
    });
}

/// The predecessor never said it stopped its mesh: what stays, at WARN
/// (nothing when no route is stale).
async fn warn_left(keep: Option<Ipv6Net>, e: &str) {
    let Some((_, found)) = look().await else {
        return;
    };
    for net in stale(&found, keep) {
        tracing::warn!(route = %net, error = %e,
            "mesh: the unreachable {net} route a previous run left stays ({}): the previous \
             process did not say it stopped its mesh; the next start removes it, or \
             `ip -6 route del unreachable {net} proto {ROUTE_PROTOCOL}`", why(keep));
    }
}

/// A netlink connection and every unreachable route the kernel has;
/// `None` when that cannot be read (no IPv6, no netlink), said at debug:
/// there is nothing to remove then. Listing needs no privilege.
async fn look() -> Option<(Netlink, Vec<UnreachableRoute>)> {
    let looked = async {
        let netlink = Netlink::connect()?;
        let found = netlink.unreachable_routes().await?;
        Ok::<_, NetlinkError>((netlink, found))
    };
    match looked.await {
        Ok(both) => Some(both),
        Err(e) => {
            tracing::debug!(error = %e,
                "mesh: cannot look for unreachable routes a previous run left");
            None
        }
    }
}

/// Removes the stale routes now. That needs `CAP_NET_ADMIN`: a stale route
/// that cannot be removed is said at WARN (it is what breaks 6PN addresses
/// on this host), never an error that stops the start.
async fn sweep(keep: Option<Ipv6Net>) {
    let Some((netlink, found)) = look().await else {
        return;
    };
    let why = why(keep);
    for net in stale(&found, keep) {
        match netlink.del_unreachable(net).await {
            Ok(()) => tracing::info!(route = %net,
                "mesh: removed the unreachable {net} route a previous run left ({why})"),
            Err(e) => tracing::warn!(route = %net, error = %e,
                "mesh: cannot remove the unreachable {net} route a previous run left ({why}): \
                 addresses in it fail with \"No route to host\" on this host until \
                 `ip -6 route del unreachable {net} proto {ROUTE_PROTOCOL}`"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(net: &str, protocol: u8) -> UnreachableRoute {
        UnreachableRoute {
            net: net.parse().unwrap(),
            protocol,
        }
    }

    fn nets(list: &[&str]) -> Vec<Ipv6Net> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    const BOOT: u8 = 3;
    const STATIC: u8 = 4;

    #[test]
    fn with_the_mesh_off_every_edgeproxy_route_is_stale_and_no_operators_route() {
        let found = [
            route("fd12:3456:789a::/48", ROUTE_PROTOCOL),
            route("fd00:dead:beef::/48", BOOT),
            route("fd00:dead:cafe::/48", STATIC),
            route("fd00:dead:f00d::/48", 0),
        ];
        assert_eq!(stale(&found, None), nets(&["fd12:3456:789a::/48"]));
    }

    #[test]
    fn with_the_mesh_on_only_edgeproxy_routes_for_another_prefix_are_stale() {
        let current: Ipv6Net = "fd12:3456:789a::/48".parse().unwrap();
        let found = [
            route("fd12:3456:789a::/48", ROUTE_PROTOCOL),
            route("fd00:0:1::/48", ROUTE_PROTOCOL),
            route("fd00:dead:beef::/48", BOOT),
        ];
        assert_eq!(stale(&found, Some(current)), nets(&["fd00:0:1::/48"]));
        // The operator's route for the current prefix is theirs, too.
        let operators = [route("fd12:3456:789a::/48", STATIC)];
        assert!(stale(&operators, Some(current)).is_empty());
        assert!(stale(&operators, None).is_empty());
    }

    #[test]
    fn a_route_listed_twice_is_removed_once_and_nothing_found_removes_nothing() {
        let found = [
            route("fd00:0:2::/48", ROUTE_PROTOCOL),
            route("fd00:0:1::/48", ROUTE_PROTOCOL),
            route("fd00:0:2::/48", ROUTE_PROTOCOL),
        ];
        assert_eq!(
            stale(&found, None),
            nets(&["fd00:0:1::/48", "fd00:0:2::/48"])
        );
        assert!(stale(&[], None).is_empty());
    }

    #[test]
    fn the_log_says_why_a_route_is_stale() {
        assert_eq!(why(None), "mesh is off");
        assert_eq!(
            why(Some("fd00:0:1::/48".parse().unwrap())),
            "the cluster's 6PN prefix is now fd00:0:1::/48"
        );
    }
}
