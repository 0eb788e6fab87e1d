use std::sync::Arc;

use engine::snapshot::{PopMesh, PopView};

use super::*;
use crate::mesh::keys::PrivateKey;

fn key(n: u8) -> PublicKey {
    PrivateKey::from_bytes([n; 32]).public_key()
}

fn cluster() -> ClusterPrefix {
    "fd12:3456:789a::/48".parse().unwrap()
}

fn own() -> Own {
    Own {
        node_id: "node-0".into(),
        public_key: key(100),
        cluster: cluster(),
        pop: cluster().pop(0),
        keepalive: Some(25),
    }
}

/// POP `n`: key(n), endpoint 10.77.0.n:51820, prefix subnet n.
fn pop(n: u8) -> PopView {
    PopView {
        node_id: Arc::from(format!("node-{n}").as_str()),
        name: Arc::from(format!("pop-{n}").as_str()),
        region: Arc::from("eu"),
        country: None,
        addrs: vec![],
        alive: true,
        draining: false,
        can_serve: true,
        local: false,
        mesh: PopMesh {
            public_key: Arc::from(key(n).to_string().as_str()),
            endpoint: Some(format!("10.77.0.{n}:51820").parse().unwrap()),
            prefix6: Some(cluster().pop(n as u16).net()),
        },
    }
}

fn desired_of(pops: &[PopView]) -> Desired {
    desired(&own(), pops, [], []).0
}

/// What the device would hold after applying `changes` to `current`
/// (endpoints as set; nothing roams here).
fn apply(current: &Current, changes: &[Change], advertised: &mut Advertised) -> Current {
    let mut c = current.clone();
    for ch in changes {
        match ch {
            Change::AddAddress(ip) => c.addresses.push(*ip),
            Change::RemoveAddress(ip) => c.addresses.retain(|a| a != ip),
            Change::AddRoute(n) => c.routes.push(*n),
            Change::RemoveRoute(n) => c.routes.retain(|r| r != n),
            Change::AddPeer(w) | Change::UpdatePeer { wanted: w, .. } => {
                c.peers.retain(|p| p.public_key != w.spec.public_key);
                c.peers.push(PeerStatus {
                    public_key: w.spec.public_key,
                    endpoint: Some(w.spec.endpoint),
                    allowed_ips: vec![IpNet::V6(w.spec.allowed)],
                    keepalive: w.spec.keepalive,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
                advertised.insert(w.spec.public_key, w.spec.endpoint);
            }
            Change::RemovePeer(k) => {
                c.peers.retain(|p| p.public_key != *k);
                advertised.remove(k);
            }
        }
    }
    c
}

fn converge(pops: &[PopView]) -> (Current, Advertised) {
    let mut adv = Advertised::new();
    let d = desired_of(pops);
    let c = apply(
        &Current::default(),
        &plan(&d, &Current::default(), &adv, &own()),
        &mut adv,
    );
    (c, adv)
}

#[test]
fn live_pops_become_peers_with_routes_and_this_pop_gets_its_address() {
    let d = desired_of(&[pop(1), pop(2)]);
    let changes = plan(&d, &Current::default(), &Advertised::new(), &own());
    let kinds: Vec<&str> = changes
        .iter()
        .map(|c| match c {
            Change::AddAddress(_) => "addr+",
            Change::AddPeer(_) => "peer+",
            Change::AddRoute(_) => "route+",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["addr+", "peer+", "peer+", "route+", "route+"]);
    assert_eq!(
        changes[0],
        Change::AddAddress("fd12:3456:789a::1".parse().unwrap())
    );
    let Change::AddPeer(w) = &changes[1] else {
        unreachable!()
    };
    assert_eq!(w.node_id, "node-1");
    assert_eq!(w.spec.public_key, key(1));
    assert_eq!(w.spec.endpoint, "10.77.0.1:51820".parse().unwrap());
    assert_eq!(w.spec.allowed.to_string(), "fd12:3456:789a:1::/64");
    assert_eq!(w.spec.keepalive, Some(25));
}

#[test]
fn a_converged_mesh_plans_nothing() {
    let pops = [pop(1), pop(2), pop(3)];
    let (c, adv) = converge(&pops);
    assert_eq!(c.peers.len(), 3);
    assert!(plan(&desired_of(&pops), &c, &adv, &own()).is_empty());
}

#[test]
fn a_dead_pop_loses_its_route_then_its_peer_and_nobody_else_is_touched() {
    let mut pops = vec![pop(1), pop(2), pop(3)];
    let (c, adv) = converge(&pops);
    pops[1].alive = false;
    let (d, skipped) = desired(&own(), &pops, [], []);
    assert_eq!(skipped, [("node-2".to_string(), Skip::Down)]);
    let changes = plan(&d, &c, &adv, &own());
    assert_eq!(
        changes,
        [
            Change::RemoveRoute(cluster().pop(2).net()),
            Change::RemovePeer(key(2)),
        ]
    );
}

#[test]
fn a_pop_that_left_the_table_is_removed_too() {
    let (c, adv) = converge(&[pop(1), pop(2)]);
    let changes = plan(&desired_of(&[pop(1)]), &c, &adv, &own());
    assert_eq!(
        changes,
        [
            Change::RemoveRoute(cluster().pop(2).net()),
            Change::RemovePeer(key(2)),
        ]
    );
}

#[test]
fn a_new_endpoint_updates_that_peer_in_place_only() {
    let mut pops = vec![pop(1), pop(2)];
    let (c, adv) = converge(&pops);
    pops[0].mesh.endpoint = Some("10.77.0.99:51820".parse().unwrap());
    let changes = plan(&desired_of(&pops), &c, &adv, &own());
    assert_eq!(changes.len(), 1, "{changes:?}");
    match &changes[0] {
        Change::UpdatePeer { wanted, why } => {
            assert_eq!(wanted.spec.public_key, key(1));
            assert_eq!(wanted.spec.endpoint, "10.77.0.99:51820".parse().unwrap());
            assert_eq!(
                *why,
                Update::Endpoint {
                    from: Some("10.77.0.1:51820".parse().unwrap())
                }
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_endpoint_wireguard_roamed_to_is_not_fought() {
    let pops = [pop(1)];
    let (mut c, adv) = converge(&pops);
    // The peer's packets now come from behind a NAT.
    c.peers[0].endpoint = Some("198.51.100.7:40000".parse().unwrap());
    assert!(plan(&desired_of(&pops), &c, &adv, &own()).is_empty());
    // ... until the POP advertises a new endpoint itself.
    let mut moved = pops.clone();
    moved[0].mesh.endpoint = Some("10.77.0.50:51820".parse().unwrap());
    let changes = plan(&desired_of(&moved), &c, &adv, &own());
    assert!(matches!(
        changes[..],
        [Change::UpdatePeer {
            why: Update::Endpoint { .. },
            ..
        }]
    ));
}

#[test]
fn drifted_allowed_ips_and_keepalive_are_put_back() {
    let pops = [pop(1)];
    let (mut c, adv) = converge(&pops);
    c.peers[0].allowed_ips = vec!["fd12:3456:789a::/48".parse().unwrap()];
    let changes = plan(&desired_of(&pops), &c, &adv, &own());
    assert!(matches!(
        changes[..],
        [Change::UpdatePeer {
            why: Update::AllowedIps,
            ..
        }]
    ));
    let (mut c, adv) = converge(&pops);
    c.peers[0].keepalive = None;
    let changes = plan(&desired_of(&pops), &c, &adv, &own());
    assert!(matches!(
        changes[..],
        [Change::UpdatePeer {
            why: Update::Keepalive,
            ..
        }]
    ));
}

#[test]
fn a_peer_and_route_someone_removed_by_hand_come_back() {
    let pops = [pop(1), pop(2)];
    let (mut c, adv) = converge(&pops);
    c.peers.retain(|p| p.public_key != key(1));
    c.routes.retain(|r| *r != cluster().pop(1).net());
    let changes = plan(&desired_of(&pops), &c, &adv, &own());
    assert!(
        matches!(&changes[..], [Change::AddPeer(w), Change::AddRoute(_)] if w.spec.public_key == key(1))
    );
}

#[test]
fn an_unknown_peer_on_the_interface_is_removed() {
    let (mut c, adv) = converge(&[pop(1)]);
    c.peers.push(PeerStatus {
        public_key: key(77),
        endpoint: None,
        allowed_ips: vec![],
        keepalive: None,
        last_handshake: None,
        rx_bytes: 0,
        tx_bytes: 0,
    });
    assert_eq!(
        plan(&desired_of(&[pop(1)]), &c, &adv, &own()),
        [Change::RemovePeer(key(77))]
    );
}

#[test]
fn conflicting_pops_are_skipped_the_same_way_everywhere() {
    let mut same_prefix = pop(5);
    same_prefix.mesh.prefix6 = Some(cluster().pop(1).net());
    let mut same_key = pop(6);
    same_key.mesh.public_key = Arc::from(key(1).to_string().as_str());
    let mut own_prefix = pop(7);
    own_prefix.mesh.prefix6 = Some(cluster().pop(0).net());
    let mut outside = pop(8);
    outside.mesh.prefix6 = Some("fd99::/64".parse().unwrap());
    let mut not_64 = pop(9);
    not_64.mesh.prefix6 = Some("fd12:3456:789a::/56".parse().unwrap());
    let mut bad_key = pop(10);
    bad_key.mesh.public_key = Arc::from("not-a-key");
    let mut own_key = pop(11);
    own_key.mesh.public_key = Arc::from(key(100).to_string().as_str());
    let mut no_mesh = pop(12);
    no_mesh.mesh = PopMesh::default();
    let mut no_endpoint = pop(13);
    no_endpoint.mesh.endpoint = None;
    let pops = vec![
        same_prefix,
        same_key,
        own_prefix,
        outside,
        not_64,
        bad_key,
        own_key,
        no_mesh,
        no_endpoint,
        pop(1),
    ];
    let (d, skipped) = desired(&own(), &pops, [], []);
    assert_eq!(d.peers.len(), 1, "only node-1 is a peer");
    let reason = |n: &str| {
        skipped
            .iter()
            .find(|(id, _)| id == n)
            .map(|(_, s)| s.clone())
            .unwrap()
    };
    assert!(matches!(reason("node-5"), Skip::SamePrefixAs { other, .. } if other == "node-1"));
    assert_eq!(reason("node-6"), Skip::SameKeyAs("node-1".into()));
    assert!(matches!(reason("node-7"), Skip::OwnPrefix(_)));
    assert!(matches!(reason("node-8"), Skip::OutsideCluster { .. }));
    assert!(matches!(reason("node-9"), Skip::OutsideCluster { .. }));
    assert!(matches!(reason("node-10"), Skip::BadKey(_)));
    assert_eq!(reason("node-11"), Skip::OwnKey);
    assert_eq!(reason("node-12"), Skip::NoMesh);
    assert_eq!(reason("node-13"), Skip::NoEndpoint);
    // Input order does not matter: node-1 (first by node id) always wins.
    let mut reversed = pops.clone();
    reversed.reverse();
    assert_eq!(desired(&own(), &reversed, [], []).0, d);
    // Every reason reads as a sentence an operator can act on.
    for (_, s) in &skipped {
        assert!(!s.to_string().is_empty());
    }
}

#[test]
fn draining_pops_stay_peers_and_this_pop_is_never_its_own_peer() {
    let mut draining = pop(1);
    draining.draining = true;
    let mut me = pop(0);
    me.local = true;
    let d = desired_of(&[draining, me]);
    assert_eq!(d.peers.len(), 1);
    assert!(d.peers.contains_key(&key(1)));
}

#[test]
fn backends_and_pinned_addresses_in_this_pops_64_are_local() {
    let mine = own().pop.backend_address("web-1");
    let pinned = own().pop.backend_address("web-2");
    let elsewhere = cluster().pop(1).backend_address("web-3");
    let (d, _) = desired(
        &own(),
        &[pop(1)],
        [
            IpAddr::V6(mine),
            IpAddr::V6(elsewhere),
            "10.0.0.1".parse().unwrap(),
        ],
        [&pinned, &elsewhere],
    );
    let want: BTreeSet<Ipv6Addr> = [own().pop.pop_address(), mine, pinned].into();
    assert_eq!(d.addresses, want);
}

#[test]
fn addresses_outside_this_pops_64_are_left_alone_and_stale_ones_go() {
    let (mut c, adv) = converge(&[pop(1)]);
    let operators: Ipv6Addr = "2001:db8::5".parse().unwrap();
    let stale = own().pop.backend_address("gone");
    c.addresses.push(operators);
    c.addresses.push(stale);
    assert_eq!(
        plan(&desired_of(&[pop(1)]), &c, &adv, &own()),
        [Change::RemoveAddress(stale)]
    );
}

#[test]
fn ipv4_mapped_endpoints_compare_as_ipv4() {
    let pops = [pop(1)];
    let (mut c, adv) = converge(&pops);
    c.peers[0].endpoint = Some("[::ffff:10.77.0.1]:51820".parse().unwrap());
    assert!(plan(&desired_of(&pops), &c, &adv, &own()).is_empty());
}

/// From any state, one pass of planning and applying reaches the desired
/// mesh: the next plan is empty. Random memberships and device states.
#[test]
fn one_pass_always_converges() {
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for round in 0..500 {
        let mut pops: Vec<PopView> = Vec::new();
        for n in 1..=8u8 {
            if next(3) == 0 {
                continue;
            }
            let mut p = pop(n);
            p.alive = next(4) != 0;
            if next(5) == 0 {
                p.mesh.endpoint = Some(format!("10.78.0.{n}:51820").parse().unwrap());
            }
            if next(10) == 0 {
                p.mesh.prefix6 = Some(cluster().pop(1).net());
            }
            pops.push(p);
        }
        // A device state from an earlier membership, then tampered with.
        let earlier: Vec<PopView> = (1..=8u8).filter(|_| next(2) == 0).map(pop).collect();
        let (mut c, mut adv) = converge(&earlier);
        if next(3) == 0 && !c.peers.is_empty() {
            c.peers[0].allowed_ips.clear();
        }
        if next(3) == 0 {
            c.routes.push(cluster().pop(200).net());
        }
        let d = desired_of(&pops);
        let changes = plan(&d, &c, &adv, &own());
        let after = apply(&c, &changes, &mut adv);
        let again = plan(&d, &after, &adv, &own());
        assert!(again.is_empty(), "round {round}: {again:?}");
        assert_eq!(after.peers.len(), d.peers.len(), "round {round}");
    }
}
