//! The replication protocol over the simulated network (`sim`): behaviour
//! with simulated time, seeded loss, partitions and crashes. The real
//! processes over real sockets are tested in `tests/replication*.rs`.

use std::time::Duration;

use super::sim::{Sim, SimConfig};
use super::version::{RowKey, Table};

fn joined(cfg: SimConfig) -> Sim {
    let mut sim = Sim::new(cfg);
    assert!(
        sim.run_until(Duration::from_secs(120), Sim::membership_complete),
        "membership did not complete"
    );
    sim
}

#[test]
fn a_change_reaches_every_node_within_a_few_link_delays() {
    let mut sim = joined(SimConfig::wan(5, 1));
    let t0 = sim.elapsed();
    sim.write(2, "b1", Some(r#"{"port":80}"#));
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| s
        .everyone_has("b1", Some(r#"{"port":80}"#))));
    let took = sim.elapsed() - t0;
    // One link delay (50 ms) plus jitter and the 5 ms batching; a lost
    // packet costs QUIC a retransmission.
    assert!(took < Duration::from_millis(500), "took {took:?}");
}

#[test]
fn concurrent_conflicting_updates_converge_to_the_same_row() {
    let mut sim = joined(SimConfig::wan(5, 2));
    // Same row, written at three nodes at the same instant.
    sim.write(0, "b1", Some("from-0"));
    sim.write(1, "b1", Some("from-1"));
    sim.write(4, "b1", Some("from-4"));
    let t0 = sim.elapsed();
    assert!(sim.run_until(t0 + Duration::from_secs(10), Sim::converged));
    let key = super::version::RowKey::new(super::version::Table::Backends, "b1");
    let winner = sim.nodes[0].replica().data(&key).map(String::from);
    assert!(
        (0..5).all(|i| sim.nodes[i].replica().data(&key) == winner.as_deref()),
        "one winner everywhere"
    );
    // Equal timestamps (same simulated millisecond): the origin breaks the tie.
    assert_eq!(winner.as_deref(), Some("from-4"));
    assert!(sim.nodes.iter().map(|n| n.stats.conflicts).sum::<u64>() > 0);
}

#[test]
fn a_healed_partition_converges_and_keeps_every_acknowledged_write() {
    let mut sim = joined(SimConfig::wan(5, 3));
    sim.partition(|i| (i >= 3) as u8);
    sim.run_for(Duration::from_secs(15));
    // Writes on both sides, while each side has declared the other down.
    sim.write(0, "left", Some("l"));
    sim.write(4, "right", Some("r"));
    sim.write(1, "both", Some("left-side"));
    sim.run_for(Duration::from_millis(100));
    sim.write(3, "both", Some("right-side-later"));
    sim.run_for(Duration::from_secs(5));
    assert!(!sim.everyone_has("left", Some("l")), "partitioned");
    sim.heal();
    let healed = sim.elapsed();
    assert!(
        sim.run_until(healed + Duration::from_secs(30), |s| s.converged()
            && s.everyone_has("left", Some("l")))
    );
    let took = sim.elapsed() - healed;
    assert!(sim.everyone_has("right", Some("r")));
    assert!(sim.everyone_has("both", Some("right-side-later")));
    assert!(took <= Duration::from_secs(5), "healed in {took:?}");
}

/// A backend's row as the discovery API writes it (the columns that matter
/// here).
fn backend(deleted: u8, weight: u8, expired: u8, judge: &str) -> String {
    format!(
        r#"{{"id":"x","weight":{weight},"deleted":{deleted},"expired":{expired},"heartbeat_pop":"{judge}"}}"#
    )
}

/// `nodes` nodes (seed `seed`) holding row `x` (weight 1, judged by n0,
/// not expired), then split in two: nodes 0 and 1 apart from the rest,
/// long enough for each side to declare the other down.
fn split_with_x(nodes: usize, seed: u64) -> Sim {
    let mut sim = joined(SimConfig::wan(nodes, seed));
    sim.write(0, "x", Some(&backend(0, 1, 0, "n0")));
    let t0 = sim.elapsed();
    assert!(sim.run_until(t0 + Duration::from_secs(10), Sim::converged));
    sim.partition(|i| (i >= 2) as u8);
    sim.run_for(Duration::from_secs(15));
    sim
}

/// Heals the partition and waits until every node holds the same rows.
fn heal_and_converge(sim: &mut Sim) {
    sim.heal();
    let healed = sim.elapsed();
    assert!(sim.run_until(healed + Duration::from_secs(30), Sim::converged));
}

#[test]
fn a_verdict_made_across_a_partition_does_not_undo_a_delete() {
    let mut sim = split_with_x(5, 12);
    // On one side an operator changes the weight, and then (later) the
    // backend is deleted on the other side; later still, on the first
    // side, the heartbeat's judge expires the backend and another POP takes
    // its heartbeats over: verdicts, both newer than the delete, on top of
    // the weight change, which is older.
    sim.write(1, "x", Some(&backend(0, 2, 0, "n0")));
    sim.run_for(Duration::from_millis(100));
    sim.write(3, "x", Some(&backend(1, 1, 0, "n0")));
    sim.run_for(Duration::from_millis(100));
    sim.write_verdict(0, "x", &backend(0, 2, 1, "n0"));
    sim.run_for(Duration::from_millis(100));
    sim.write_verdict(1, "x", &backend(0, 2, 0, "n1"));
    heal_and_converge(&mut sim);
    assert!(
        sim.everyone_has("x", Some(&backend(1, 1, 0, "n0"))),
        "the delete holds everywhere"
    );
    // The judge, if the verdict still holds, judges again on top of it.
    sim.write_verdict(1, "x", &backend(1, 1, 0, "n1"));
    let t1 = sim.elapsed();
    assert!(sim.run_until(t1 + Duration::from_secs(10), |s| s
        .everyone_has("x", Some(&backend(1, 1, 0, "n1")))));
}

#[test]
fn a_deliberate_write_after_a_delete_on_the_other_side_still_wins() {
    let mut sim = split_with_x(4, 13);
    sim.write(3, "x", Some(&backend(1, 1, 0, "n0")));
    sim.run_for(Duration::from_millis(100));
    // Registered again, with another weight, after the delete: a decision,
    // and the later one. Then expired on top of it.
    sim.write(0, "x", Some(&backend(0, 5, 0, "n0")));
    sim.run_for(Duration::from_millis(100));
    sim.write_verdict(0, "x", &backend(0, 5, 1, "n0"));
    heal_and_converge(&mut sim);
    assert!(sim.everyone_has("x", Some(&backend(0, 5, 1, "n0"))));
}

/// QA: a registration that repeats the row (the backend registers again
/// after its expiry) changes only what a verdict changes; judged by the
/// data it was taken for one and lost to a delete made before it.
#[test]
fn a_registration_that_repeats_the_row_is_a_decision_too() {
    // Registered again, same fields: only `expired` differs.
    registered_again_after_a_delete_across_a_partition(1, 14, |sim| {
        sim.write(0, "x", Some(&backend(0, 1, 0, "n0")));
    });
}

/// The same with the row not changed at all: the backend, live at POP 0,
/// registers there again with the same fields after POP 3 deleted it. The
/// store says it was a registration; that is a decision made after the
/// delete, though the row's data did not change.
#[test]
fn a_registration_identical_to_the_row_is_versioned_anew() {
    registered_again_after_a_delete_across_a_partition(0, 15, |sim| {
        // An edit that repeats the row is nothing...
        sim.write(0, "x", Some(&backend(0, 1, 0, "n0")));
        // ... a registration is.
        sim.write_registration(0, "x", &backend(0, 1, 0, "n0"));
    });
}

/// Four nodes; row `x` judged by n0 (`expired` as given), then split in
/// two; node 3 deletes it, then node 0 `registers` it again; after the
/// heal the registration, the later decision, holds everywhere.
fn registered_again_after_a_delete_across_a_partition(
    expired: u8,
    seed: u64,
    registers: impl FnOnce(&mut Sim),
) {
    let mut sim = joined(SimConfig::wan(4, seed));
    sim.write(0, "x", Some(&backend(0, 1, 0, "n0")));
    if expired == 1 {
        sim.write_verdict(0, "x", &backend(0, 1, 1, "n0"));
    }
    let t0 = sim.elapsed();
    assert!(sim.run_until(t0 + Duration::from_secs(10), Sim::converged));
    sim.partition(|i| (i >= 2) as u8);
    sim.run_for(Duration::from_secs(15));
    sim.write(3, "x", Some(&backend(1, 1, 1, "n0")));
    sim.run_for(Duration::from_millis(100));
    registers(&mut sim);
    heal_and_converge(&mut sim);
    assert!(
        sim.everyone_has("x", Some(&backend(0, 1, 0, "n0"))),
        "the later registration lost"
    );
}

#[test]
fn a_lost_broadcast_is_repaired_by_anti_entropy() {
    let mut sim = joined(SimConfig::wan(5, 4));
    sim.drop_messages_to.insert(3);
    sim.write(0, "b1", Some("x"));
    sim.run_for(Duration::from_millis(300));
    let key = super::version::RowKey::new(super::version::Table::Backends, "b1");
    assert_eq!(sim.nodes[3].replica().data(&key), None, "broadcast lost");
    sim.drop_messages_to.clear();
    let t0 = sim.elapsed();
    assert!(sim.run_until(t0 + Duration::from_secs(10), |s| s
        .everyone_has("b1", Some("x"))));
    let took = sim.elapsed() - t0;
    assert!(took <= Duration::from_secs(5), "repaired in {took:?}");
}

/// Found under a held `sqlite3` lock and on a full disk: the rows that
/// failed to persist had already been merged into the replica, whose
/// digests then matched the peers', so anti-entropy never brought them
/// again and the database stayed without them until a restart.
#[test]
fn rows_the_database_refused_are_brought_again_once_it_takes_writes() {
    let mut sim = joined(SimConfig::wan(3, 7));
    sim.refuse_persist.insert(2);
    sim.write(0, "b1", Some("v1"));
    let t0 = sim.elapsed();
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| s.persisted(
        1,
        "b1",
        Some("v1")
    )));
    // Several anti-entropy rounds (2 s apart) while node 2's writes fail.
    sim.run_for(Duration::from_secs(10));
    assert!(!sim.persisted(2, "b1", Some("v1")));
    sim.refuse_persist.clear();
    let t1 = sim.elapsed();
    assert!(
        sim.run_until(t1 + Duration::from_secs(30), |s| s.persisted(
            2,
            "b1",
            Some("v1")
        )),
        "the refused row never reached node 2's database"
    );
    assert!(sim.converged());
}

/// Two nodes that once ran with one id (a configuration error) wrote
/// different data under the same version: anti-entropy sees the difference
/// and every node keeps the same one.
#[test]
fn equal_versions_with_different_data_converge_to_one_row() {
    use super::hlc::Hlc;
    use super::version::{RowKey, RowVersion, Table, Version};

    let mut sim = joined(SimConfig::wan(3, 9));
    let key = RowKey::new(Table::Backends, "dup5");
    let at = |data: &str| RowVersion {
        key: key.clone(),
        version: Version {
            hlc: Hlc::new(1_700_000_000_000, 0),
            origin: std::sync::Arc::from("twin"),
        },
        intent: None,
        data: Some(data.into()),
    };
    sim.nodes[0].replica_mut().put(at(r#"{"port":20005}"#));
    sim.nodes[1].replica_mut().put(at(r#"{"port":10005}"#));
    sim.nodes[2].replica_mut().put(at(r#"{"port":10005}"#));
    assert!(!sim.converged(), "the digests show the difference");
    let t0 = sim.elapsed();
    assert!(sim.run_until(t0 + Duration::from_secs(30), Sim::converged));
    let winner = sim.nodes[0].replica().data(&key).map(String::from);
    assert!(
        (0..3).all(|i| sim.nodes[i].replica().data(&key) == winner.as_deref()),
        "one row everywhere"
    );
}

/// A node started with another live node's id is reported by everyone
/// (naming both addresses) and ignored: nothing it writes is taken, and it
/// takes nothing from the node whose id it copied.
#[test]
fn a_second_node_with_a_live_nodes_id_is_reported_and_ignored() {
    use super::membership::MemberState;
    use super::node::Event;
    use super::replica::Replica;

    let mut sim = joined(SimConfig::wan(3, 10));
    // Started later: node 1 holds the id n1 (the older start).
    let twin = sim.spawn("n1", 2, Replica::new(), 0);
    let (holder, impostor) = (sim.gossip_addr(1), sim.gossip_addr(twin));
    let t0 = sim.elapsed();
    let reported = |s: &Sim, observer: usize, h, imp| {
        s.events.iter().any(|(_, i, e)| {
            *i == observer
                && matches!(e, Event::DuplicateId { id, holder, impostor, .. }
                    if &**id == "n1" && *holder == h && *impostor == imp)
        })
    };
    assert!(
        sim.run_until(t0 + Duration::from_secs(30), |s| {
            // The twin too names itself the one ignored.
            (0..3).all(|i| reported(s, i, holder, impostor)) && reported(s, twin, holder, impostor)
        }),
        "not reported everywhere: {:?}",
        sim.events
            .iter()
            .filter(|(_, _, e)| matches!(e, Event::DuplicateId { .. }))
            .collect::<Vec<_>>()
    );
    sim.write(twin, "dup5", Some("from-the-twin"));
    sim.write(1, "only-n1", Some("x"));
    sim.run_for(Duration::from_secs(10));
    let key = |pk: &str| super::version::RowKey::new(super::version::Table::Backends, pk);
    for i in 0..3 {
        assert_eq!(sim.nodes[i].replica().data(&key("dup5")), None, "node {i}");
        assert_eq!(sim.nodes[i].replica().data(&key("only-n1")), Some("x"));
    }
    assert_eq!(sim.nodes[twin].replica().data(&key("only-n1")), None);
    // Said again while it lasts, not once at the start only.
    let times = sim
        .events
        .iter()
        .filter(|(_, i, e)| *i == 0 && matches!(e, Event::DuplicateId { .. }))
        .count();
    assert!(times >= 2, "reported {times} times");
    // A node never lists its own id as a member.
    for i in [1, twin] {
        let own = sim.nodes[i].id().clone();
        assert!(sim.nodes[i].members().iter().all(|m| m.peer.id != own));
    }
    assert!(sim.nodes[0]
        .members()
        .iter()
        .any(|m| &*m.peer.id == "n1" && m.state == MemberState::Alive));
    // Sync columns belong to the holder, never to the twin.
    let listed = sim.nodes[0].members();
    let twin_row = listed.iter().find(|m| m.peer.gossip == impostor).unwrap();
    assert!(twin_row.sync.last_sync.is_none() && !twin_row.sync.in_sync);
    let holder_row = listed.iter().find(|m| m.peer.gossip == holder).unwrap();
    assert!(holder_row.sync.last_sync.is_some());
}

/// QA: a POP started with `advertise_addr` set to another POP's address
/// (a copied config) replaced that POP in every view (its start was later,
/// so its generation won the address). The POP really living there, told
/// it was down, renewed itself one generation per round trip, about a
/// thousand times a second on a LAN, and stayed out of every view until
/// its generation passed the other's start time in ms, even after the
/// wrong POP was stopped. Now the live member keeps its address, the
/// wrong one is reported, and nobody is told it is down.
#[test]
fn a_pop_advertising_another_pops_address_does_not_displace_it() {
    use super::membership::{MemberEvent, MemberState};
    use super::node::Event;

    let mut sim = joined(SimConfig::wan(3, 23));
    // Started a minute after node 1: its generation (start time in ms)
    // is 60,000 above.
    let wrong = sim.spawn_advertising("n9", 60_001, 1, 0);
    let t0 = sim.elapsed();
    sim.run_for(Duration::from_secs(20));
    let n1_alive = |s: &Sim, i: usize| {
        s.nodes[i]
            .members()
            .iter()
            .any(|m| &*m.peer.id == "n1" && m.state == MemberState::Alive)
    };
    for i in [0, 2] {
        assert!(n1_alive(&sim, i), "node {i}: {:?}", sim.nodes[i].members());
    }
    let since = |s: &Sim, what: fn(&Event) -> bool| {
        s.events
            .iter()
            .filter(|(t, _, e)| *t >= t0 && what(e))
            .count()
    };
    let rejoins = since(&sim, |e| matches!(e, Event::Member(MemberEvent::Rejoined)));
    assert_eq!(rejoins, 0, "node 1 was told it was down");
    let reported = since(&sim, |e| {
        matches!(e, Event::Member(MemberEvent::AddressTaken { holder, claimant })
            if &*holder.id == "n1" && &*claimant.id == "n9")
    });
    assert!(reported > 0, "the wrong POP was not reported");
    // Stopped, it leaves nothing behind.
    sim.crash(wrong);
    sim.run_for(Duration::from_secs(20));
    for i in [0, 2] {
        assert!(n1_alive(&sim, i), "node {i}: {:?}", sim.nodes[i].members());
    }
    assert!(sim.nodes[1].active_members() == 2);
}

/// A node that comes back at another address with the same id (a replaced
/// host) supersedes its old, down identity: listed once, alive, and never
/// among its own members.
#[test]
fn a_node_back_at_a_new_address_supersedes_its_old_identity() {
    use super::membership::MemberState;
    use super::node::Event;

    let mut sim = joined(SimConfig::wan(3, 11));
    sim.write(2, "b1", Some("x"));
    sim.run_for(Duration::from_secs(1));
    sim.crash(2);
    let t0 = sim.elapsed();
    assert!(
        sim.run_until(t0 + Duration::from_secs(20), |s| s.saw_down(0, 2).is_some()
            && s.saw_down(1, 2).is_some())
    );
    let replica = sim.nodes[2].replica().clone();
    let moved = sim.spawn("n2", 2, replica, 0);
    assert!(sim.run_until(sim.elapsed() + Duration::from_secs(30), |s| {
        s.nodes[moved].active_members() == 2
            && (0..2).all(|i| {
                s.nodes[i]
                    .members()
                    .iter()
                    .any(|m| &*m.peer.id == "n2" && m.state == MemberState::Alive)
            })
    }));
    for i in [0, 1] {
        let n2: Vec<_> = sim.nodes[i]
            .members()
            .into_iter()
            .filter(|m| &*m.peer.id == "n2")
            .collect();
        assert_eq!(n2.len(), 1, "node {i} lists n2 once: {n2:?}");
        assert_eq!(n2[0].peer.gossip, sim.gossip_addr(moved));
    }
    assert!(
        sim.nodes[moved]
            .members()
            .iter()
            .all(|m| &*m.peer.id != "n2"),
        "{:?}",
        sim.nodes[moved].members()
    );
    assert!(!sim
        .events
        .iter()
        .any(|(_, _, e)| matches!(e, Event::DuplicateId { .. })));
}

/// A node restarted at a new address at once, while its old identity is
/// still alive to the others: its writes wait until the old identity is
/// declared down, then replicate, and no one reports a duplicate id (an
/// ERROR for a routine host replacement would teach operators to ignore
/// it).
#[test]
fn a_node_moved_at_once_is_not_reported_as_a_duplicate_id() {
    for seed in 12..22 {
        move_at_once(seed);
    }
}

fn move_at_once(seed: u64) {
    use super::node::Event;

    let mut sim = joined(SimConfig::wan(3, seed));
    let replica = sim.nodes[2].replica().clone();
    sim.crash(2);
    let moved = sim.spawn("n2", 2, replica, 0);
    sim.write(moved, "from-moved", Some("m"));
    let t0 = sim.elapsed();
    assert!(
        sim.run_until(t0 + Duration::from_secs(30), |s| (0..2).all(|i| {
            s.nodes[i]
                .replica()
                .data(&super::version::RowKey::new(
                    super::version::Table::Backends,
                    "from-moved",
                ))
                .is_some()
        }))
    );
    sim.run_for(Duration::from_secs(10));
    let reported: Vec<_> = sim
        .events
        .iter()
        .filter(|(_, _, e)| matches!(e, Event::DuplicateId { .. }))
        .collect();
    assert!(reported.is_empty(), "seed {seed}: {reported:?}");
}

/// With a peer's transport port blocked (gossip still working), its
/// exchanges time out: "in sync" from before must not stay on display.
#[test]
fn a_peer_whose_exchanges_time_out_is_not_shown_in_sync() {
    let mut sim = joined(SimConfig::wan(3, 11));
    let in_sync = |sim: &Sim| {
        sim.nodes[0]
            .members()
            .into_iter()
            .find(|m| &*m.peer.id == "n1")
            .is_some_and(|m| m.sync.in_sync)
    };
    let t0 = sim.elapsed();
    assert!(sim.run_until(t0 + Duration::from_secs(30), in_sync));
    sim.drop_messages_to.insert(1);
    let t1 = sim.elapsed();
    assert!(
        sim.run_until(t1 + Duration::from_secs(60), |s| !in_sync(s)),
        "still shown in sync"
    );
    // And the timeouts are reported in a row, for the driver's warning.
    let silent = |s: &Sim| {
        s.events.iter().any(|(_, i, e)| {
            *i == 0
                && matches!(e, super::node::Event::SyncTimedOut { peer, in_a_row }
                    if &**peer == "n1" && *in_a_row >= 3)
        })
    };
    assert!(
        sim.run_until(t1 + Duration::from_secs(180), silent),
        "no third timeout in a row reported"
    );
}

#[test]
fn a_crashed_node_is_detected_and_catches_up_after_a_restart() {
    for seed in 50..60 {
        crash_and_restart(seed);
    }
}

fn crash_and_restart(seed: u64) {
    let mut sim = joined(SimConfig::wan(5, seed));
    let t0 = sim.elapsed();
    sim.crash(2);
    assert!(sim.run_until(t0 + Duration::from_secs(20), |s| (0..5)
        .filter(|&i| i != 2)
        .all(|i| s.saw_down(i, 2).is_some())));
    let first = (0..5)
        .filter(|&i| i != 2)
        .filter_map(|i| sim.saw_down(i, 2))
        .min()
        .unwrap();
    assert!(
        first - t0 <= Duration::from_secs(5),
        "seed {seed}: detected after {:?}",
        first - t0
    );
    // Writes while it is down, then it restarts with what it had.
    sim.write(0, "while-down", Some("w"));
    sim.run_for(Duration::from_secs(2));
    sim.restart(2, 1);
    let t1 = sim.elapsed();
    assert!(
        sim.run_until(t1 + Duration::from_secs(15), |s| s.converged()
            && s.everyone_has("while-down", Some("w")))
    );
}

#[test]
fn no_member_is_falsely_declared_down_in_ten_minutes_at_one_percent_loss() {
    let mut sim = joined(SimConfig::wan(5, 6));
    let t0 = sim.elapsed();
    sim.run_for(Duration::from_secs(600));
    let downs: Vec<_> = sim
        .events
        .iter()
        .filter(|(t, _, e)| {
            *t >= t0
                && matches!(
                    e,
                    super::node::Event::Member(super::membership::MemberEvent::Down(_))
                )
        })
        .collect();
    assert!(downs.is_empty(), "false positives: {downs:?}");
}

#[test]
fn a_hundred_nodes_converge_within_three_seconds() {
    let mut sim = joined(SimConfig::wan(100, 7));
    for (n, writer) in [17, 3, 99, 50, 0].into_iter().enumerate() {
        sim.run_for(Duration::from_secs(5));
        let t0 = sim.elapsed();
        let pk = format!("b{n}");
        sim.write(writer, &pk, Some("x"));
        assert!(sim.run_until(t0 + Duration::from_secs(10), |s| s
            .everyone_has(&pk, Some("x"))));
        let took = sim.elapsed() - t0;
        assert!(took <= Duration::from_secs(3), "{pk} converged in {took:?}");
    }
}

/// Bytes from the network never panic a node, whatever they are: random,
/// truncated or bit-flipped copies of real datagrams and messages. A bounded
/// property test (seeded, 20,000 inputs) that runs with every `cargo test`.
#[test]
fn garbage_from_the_network_is_refused_without_panicking() {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::node::{Node, Now, Output};
    use super::replica::Replica;

    let mut sim = joined(SimConfig::wan(3, 8));
    // Real traffic to mutate: a change broadcast and gossip.
    sim.write(0, "b1", Some("x"));
    let mut samples: Vec<(bool, Vec<u8>)> = Vec::new();
    let settings = sim.nodes[1].settings().clone();
    let mut probe = Node::new(settings.clone(), Replica::new(), sim.now());
    probe.join(sim.now(), &[sim.nodes[0].settings().gossip_addr]);
    probe.local_writes(
        sim.now(),
        [(
            super::version::RowKey::new(super::version::Table::Backends, "p"),
            Some("{}".into()),
        )],
    );
    let later = Now {
        mono: sim.now().mono + std::time::Duration::from_secs(5),
        wall_ms: sim.now().wall_ms + 5000,
    };
    probe.handle_timeout(later);
    while let Some(out) = probe.poll_output() {
        match out {
            Output::Datagram { bytes, .. } => samples.push((true, bytes)),
            Output::Message { bytes, .. } => samples.push((false, bytes)),
            _ => {}
        }
    }
    assert!(!samples.is_empty());
    let mut rng = StdRng::seed_from_u64(99);
    let target = &mut sim.nodes[2];
    let from = "10.0.0.99:4001".parse().unwrap();
    for i in 0..20_000 {
        let (datagram, base) = &samples[i % samples.len()];
        let mut bytes = base.clone();
        match i % 4 {
            0 => {
                let n = rng.random_range(0..bytes.len().max(1));
                bytes.truncate(n);
            }
            1 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..bytes.len().max(1));
                    if let Some(b) = bytes.get_mut(at) {
                        *b ^= 1 << rng.random_range(0..8);
                    }
                }
            }
            2 => {
                bytes = (0..rng.random_range(0..2048))
                    .map(|_| rng.random())
                    .collect();
            }
            _ => bytes.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
        }
        if *datagram {
            target.handle_datagram(later, from, &bytes);
        } else {
            target.handle_message(later, from, &bytes);
        }
        while target.poll_output().is_some() {}
    }
}

/// QA: a POP decommissioned for good stayed listed as down forever. Forgot
/// at one POP, it leaves every POP's view and `pops` table, including a
/// POP that still remembered it as down across a partition (and gossips it
/// as such after the heal); and it can come back later and rejoin.
#[test]
fn a_forgotten_pop_leaves_every_view_and_can_rejoin_later() {
    use super::membership::MemberState;
    use super::node::{ForgetRefused, Forgotten};
    use super::version::{RowKey, Table};

    let mut sim = joined(SimConfig::wan(4, 31));
    for i in 0..4 {
        sim.write_own_pop(i);
    }
    let row = RowKey::new(Table::Pops, "n3");
    let t0 = sim.elapsed();
    assert!(sim.run_until(t0 + Duration::from_secs(10), Sim::converged));
    assert!(
        matches!(
            sim.forget(0, "n3"),
            Err(ForgetRefused::Live { state: "alive", .. })
        ),
        "a live member is not forgotten"
    );
    assert!(matches!(
        sim.forget(0, "n0"),
        Err(ForgetRefused::Ourselves { .. })
    ));
    assert!(matches!(
        sim.forget(0, "n9"),
        Err(ForgetRefused::Unknown { .. })
    ));

    sim.crash(3);
    let t1 = sim.elapsed();
    assert!(sim.run_until(t1 + Duration::from_secs(20), |s| (0..3)
        .all(|i| s.saw_down(i, 3).is_some())));
    // Node 2 is cut off while the forget happens: it still remembers n3
    // as down, and gossips so once the partition heals.
    sim.partition(|i| (i == 2) as u8);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(
        sim.forget(0, "n3"),
        Ok(Forgotten {
            identities: 1,
            replicated: true
        })
    );
    let listed = |s: &Sim, i: usize| s.nodes[i].members().iter().any(|m| &*m.peer.id == "n3");
    assert!(!listed(&sim, 0));
    assert!(sim.persisted(0, "n3", None), "its pops row is deleted");
    sim.run_for(Duration::from_secs(5));
    assert!(listed(&sim, 2), "not forgotten across the partition yet");
    sim.heal();
    let t2 = sim.elapsed();
    assert!(
        sim.run_until(t2 + Duration::from_secs(15), |s| (0..3)
            .all(|i| !listed(s, i) && s.persisted(i, "n3", None))),
        "not forgotten everywhere"
    );
    // Gossip from a POP that remembered it does not bring it back: not
    // listed, and dropped again from foca's view wherever it reappears.
    sim.run_for(Duration::from_secs(30));
    for i in 0..3 {
        assert!(!listed(&sim, i), "node {i} lists n3 again");
        assert!(
            sim.nodes[i]
                .raw_membership()
                .iter()
                .all(|(p, _)| &*p.id != "n3"),
            "node {i} still knocks on n3: {:?}",
            sim.nodes[i].raw_membership()
        );
        assert!(sim.nodes[i].replica().get(&row).unwrap().is_tombstone());
    }
    // Idempotent: nothing new to replicate.
    assert_eq!(
        sim.forget(1, "n3"),
        Ok(Forgotten {
            identities: 0,
            replicated: false
        })
    );

    // It comes back (its database kept its own row): it rejoins, and its
    // row, written again over the deletion, is everywhere once more.
    sim.restart(3, 0);
    let t3 = sim.elapsed();
    assert!(
        sim.run_until(t3 + Duration::from_secs(30), |s| {
            s.converged()
                && (0..4).all(|i| {
                    s.nodes[i].replica().data(&row).is_some()
                        && s.persisted(i, "n3", Some(r#"{"node_id":"n3"}"#))
                })
                && (0..3).all(|i| {
                    s.nodes[i]
                        .members()
                        .iter()
                        .any(|m| &*m.peer.id == "n3" && m.state == MemberState::Alive)
                })
        }),
        "n3 did not rejoin: {:?}",
        sim.nodes[0].members()
    );
    // Each POP said so: the deletions it kept for n3 were released by the
    // forget, so rows deleted meanwhile may come back from it.
    let warned: Vec<usize> = sim
        .events
        .iter()
        .filter_map(|(_, i, e)| match e {
            super::node::Event::ForgottenMemberBack { peer } if &**peer == "n3" => Some(*i),
            _ => None,
        })
        .collect();
    assert!((0..3).all(|i| warned.contains(&i)), "{warned:?}");
    let restored: Vec<usize> = sim
        .events
        .iter()
        .filter_map(|(_, i, e)| match e {
            super::node::Event::OwnRowRestored { .. } => Some(*i),
            _ => None,
        })
        .collect();
    assert_eq!(restored, vec![3], "n3 says it writes its row again");
}

/// Events that say a node or a member was out of reach for longer than
/// the tombstone TTL: (node that said it, who: `None` for itself).
fn said_back_after_ttl(sim: &Sim) -> Vec<(usize, Option<String>)> {
    use super::node::Event;
    sim.events
        .iter()
        .filter_map(|(_, i, e)| match e {
            Event::PeerBackAfterTombstoneTtl { peer, .. } => Some((*i, Some(peer.to_string()))),
            Event::ContactAfterTombstoneTtl { .. } => Some((*i, None)),
            _ => None,
        })
        .collect()
}

/// QA: a POP back after longer than the tombstone TTL could bring rows
/// deleted meanwhile back, and nothing said so. The POPs that saw it down
/// say it is back late, and it says it heard nobody for that long; after a
/// shorter stop nobody says anything.
#[test]
fn a_pop_back_after_the_tombstone_ttl_is_reported_on_both_sides() {
    use super::node::Event;

    let mut cfg = SimConfig::wan(3, 41);
    cfg.tombstone_ttl = Duration::from_secs(600);
    let mut sim = joined(cfg);
    sim.write(0, "b1", Some("x"));
    sim.run_for(Duration::from_secs(10));

    // Shorter than the TTL: nothing said.
    sim.crash(2);
    sim.run_for(Duration::from_secs(300));
    assert!(sim.saw_down(0, 2).is_some() && sim.saw_down(1, 2).is_some());
    sim.restart(2, 0);
    let t0 = sim.elapsed();
    assert!(
        sim.run_until(t0 + Duration::from_secs(30), |s| s.membership_complete()
            && s.converged())
    );
    sim.run_for(Duration::from_secs(10));
    assert_eq!(said_back_after_ttl(&sim), vec![]);

    // Longer than the TTL: both sides say so, once each.
    sim.crash(2);
    let down = sim.elapsed();
    sim.run_for(Duration::from_secs(800));
    sim.restart(2, 0);
    let t1 = sim.elapsed();
    assert!(
        sim.run_until(t1 + Duration::from_secs(30), |s| s.membership_complete()
            && s.converged())
    );
    sim.run_for(Duration::from_secs(10));
    let mut said = said_back_after_ttl(&sim);
    said.sort();
    assert_eq!(
        said,
        vec![(0, Some("n2".into())), (1, Some("n2".into())), (2, None)],
        "nodes 0 and 1 kept hearing each other: they say nothing of themselves"
    );
    for (_, i, e) in &sim.events {
        match e {
            Event::PeerBackAfterTombstoneTtl {
                down_ms, ttl_ms, ..
            } => {
                assert_eq!(*ttl_ms, 600_000);
                assert!(
                    *down_ms > 800_000 - 30_000 && *down_ms < 800_000 + 30_000,
                    "node {i}: down {down_ms} ms"
                );
            }
            Event::ContactAfterTombstoneTtl { silent_ms, ttl_ms } => {
                assert_eq!(*ttl_ms, 600_000);
                let away = (t1 - down).as_millis() as u64;
                assert!(
                    *silent_ms >= away && *silent_ms < away + 30_000,
                    "silent {silent_ms} ms"
                );
            }
            _ => {}
        }
    }
}

/// The rejected fix for the above deleted, at a POP that had heard nobody
/// for longer than the TTL, its rows older than the TTL that the returning
/// peer lacked. But that POP may be the one that stayed: in a cluster of
/// two, with the other down for longer than the TTL, it would delete the
/// rows registered meanwhile (static, no heartbeat) when the other came
/// back. Both sides only warn; every row stays everywhere.
#[test]
fn a_pop_alone_longer_than_the_tombstone_ttl_keeps_every_row_when_its_peer_comes_back() {
    let mut cfg = SimConfig::wan(2, 42);
    cfg.tombstone_ttl = Duration::from_secs(600);
    let mut sim = joined(cfg);
    sim.write(0, "before", Some("b"));
    sim.run_for(Duration::from_secs(10));
    sim.crash(1);
    sim.run_for(Duration::from_secs(100));
    sim.write(0, "meanwhile", Some("m"));
    sim.write(0, "before", Some("b2"));
    // 700 s later: both rows older than the TTL, neither held by node 1.
    sim.run_for(Duration::from_secs(700));
    sim.restart(1, 0);
    let t0 = sim.elapsed();
    assert!(
        sim.run_until(t0 + Duration::from_secs(30), |s| s.converged()
            && s.everyone_has("meanwhile", Some("m"))
            && s.everyone_has("before", Some("b2"))),
        "no convergence"
    );
    sim.run_for(Duration::from_secs(30));
    for i in 0..2 {
        assert!(sim.persisted(i, "meanwhile", Some("m")), "node {i}");
        assert!(sim.persisted(i, "before", Some("b2")), "node {i}");
    }
    assert!(sim.everyone_has("meanwhile", Some("m")));
    let mut said = said_back_after_ttl(&sim);
    said.sort();
    assert_eq!(said, vec![(0, None), (0, Some("n1".into())), (1, None)]);
}

/// Same for a POP alone for longer than the TTL that a new POP, with an
/// empty table, joins: it keeps its table (the new one gets it), and the
/// new POP, which never heard the cluster, says nothing.
#[test]
fn a_pop_alone_longer_than_the_tombstone_ttl_keeps_its_table_when_a_new_pop_joins() {
    let mut cfg = SimConfig::wan(2, 43);
    cfg.tombstone_ttl = Duration::from_secs(600);
    let mut sim = joined(cfg);
    sim.write(0, "b1", Some("x"));
    sim.run_for(Duration::from_secs(10));
    sim.crash(1);
    sim.run_for(Duration::from_secs(100));
    sim.write(0, "b2", Some("y"));
    sim.run_for(Duration::from_secs(700));
    let new = sim.spawn("n2", 1, super::replica::Replica::new(), 0);
    let t0 = sim.elapsed();
    assert!(
        sim.run_until(t0 + Duration::from_secs(30), |s| s.converged()
            && s.everyone_has("b1", Some("x"))
            && s.everyone_has("b2", Some("y"))),
        "no convergence"
    );
    sim.run_for(Duration::from_secs(30));
    for i in [0, new] {
        assert!(sim.persisted(i, "b1", Some("x")), "node {i}");
        assert!(sim.persisted(i, "b2", Some("y")), "node {i}");
    }
    assert_eq!(said_back_after_ttl(&sim), vec![(0, None)]);
}

/// QA: after a link between two POPs flapped for a minute, one POP stayed
/// "suspect" at the others for 10+ minutes although it answered every
/// probe. The member that suspected it renewed its own identity (it had
/// been declared down across the same link) and foca dropped its timer
/// with it; the others only held the suspicion they had heard, and the
/// suspect never heard of it (its few transmissions went elsewhere), so
/// nothing refuted it or declared it down (seeds 73, 199, 251 of these).
#[test]
fn a_member_is_alive_everywhere_soon_after_a_flapping_link_settles() {
    for seed in 0..300 {
        flap_then_settle(seed);
    }
}

/// Cuts and restores the link between nodes 0 and 1 (each still reaches
/// node 2) every 0.5-5 s for a minute, then leaves it up: within ten probe
/// periods every node must see every other alive.
fn flap_then_settle(seed: u64) {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    let mut sim = joined(SimConfig::wan(3, seed));
    let mut rng = StdRng::seed_from_u64(seed ^ 0xF1A9);
    let t0 = sim.elapsed();
    let mut up = true;
    while sim.elapsed() < t0 + Duration::from_secs(60) {
        up = !up;
        sim.set_link(0, 1, up);
        sim.run_for(Duration::from_millis(rng.random_range(500..5000)));
    }
    sim.set_link(0, 1, true);
    let settled = sim.elapsed();
    let periods = 10 * sim.cfg.gossip_interval;
    assert!(
        sim.run_until(settled + periods, Sim::everyone_alive),
        "seed {seed}: {periods:?} after the link settled, not alive: {:?}",
        sim.not_alive()
    );
}

/// A member that refuted a suspicion was still told it was down when the
/// suspicion's timer fired (foca sends "you are down" from that timer
/// whether or not the verdict applied): it renewed its identity, and every
/// POP logged it down and back although it had answered in time.
#[test]
fn a_member_that_refuted_a_suspicion_is_not_declared_down() {
    use super::membership::MemberEvent;
    use super::node::Event;

    for seed in 0..20 {
        let mut sim = joined(SimConfig::wan(2, seed));
        let before = sim.events.len();
        // Long enough for a probe to fail, short enough to refute in time.
        sim.set_link(0, 1, false);
        let mut suspected = false;
        let cut = sim.elapsed();
        sim.run_until(cut + Duration::from_millis(1500), |s| {
            suspected |= !s.not_alive().is_empty();
            false
        });
        sim.set_link(0, 1, true);
        let healed = sim.elapsed();
        sim.run_until(healed + Duration::from_secs(10), |s| {
            suspected |= !s.not_alive().is_empty();
            false
        });
        assert!(suspected, "seed {seed}: no suspicion to refute");
        let downs: Vec<_> = sim.events[before..]
            .iter()
            .filter(|(_, _, e)| {
                matches!(
                    e,
                    Event::Member(MemberEvent::Down(_) | MemberEvent::Rejoined)
                )
            })
            .collect();
        assert!(downs.is_empty(), "seed {seed}: {downs:?}");
    }
}

/// With the link between two of three POPs down for good (each still
/// reaching the third), a failed probe across it (a loss on the indirect
/// path) made a suspicion the suspect never heard: foca's preset sent it
/// twice, and a member was declared down and rejoined about every 30 s.
#[test]
fn a_link_cut_between_two_of_three_nodes_declares_nobody_down() {
    let mut sim = joined(SimConfig::wan(3, 12));
    let before = sim.events.len();
    sim.set_link(0, 1, false);
    sim.run_for(Duration::from_secs(300));
    let downs: Vec<_> = sim.events[before..]
        .iter()
        .filter(|(_, _, e)| {
            matches!(
                e,
                super::node::Event::Member(super::membership::MemberEvent::Down(_))
            )
        })
        .collect();
    assert!(downs.is_empty(), "{} downs: {downs:?}", downs.len());
    assert!(sim.everyone_alive(), "{:?}", sim.not_alive());
}

/// A row deleted while a POP was down for longer than the tombstone TTL
/// stays deleted when that POP comes back with its old copy: the deletion's
/// tombstone is kept past the TTL for as long as a member that went down
/// before it was written has not completed an exchange since. Once it has,
/// the tombstone is collected as usual.
#[test]
fn a_row_deleted_while_a_pop_was_down_longer_than_the_ttl_stays_deleted() {
    let mut cfg = SimConfig::wan(3, 43);
    cfg.tombstone_ttl = Duration::from_secs(600);
    let mut sim = joined(cfg);
    sim.write(0, "gone", Some("x"));
    sim.write(0, "kept", Some("y"));
    sim.run_for(Duration::from_secs(10));
    assert!(sim.everyone_has("gone", Some("x")));
    sim.crash(2);
    sim.run_for(Duration::from_secs(30));
    assert!(sim.saw_down(0, 2).is_some() && sim.saw_down(1, 2).is_some());
    sim.write(0, "gone", None);
    // Past the TTL and several collections.
    sim.run_for(Duration::from_secs(900));
    let key = RowKey::new(Table::Backends, "gone");
    assert!(
        sim.nodes[1].replica().get(&key).is_some(),
        "the tombstone was collected while the POP that lacks it was down"
    );
    sim.restart(2, 0);
    let back = sim.elapsed();
    assert!(
        sim.run_until(back + Duration::from_secs(60), |s| s.membership_complete()
            && s.converged())
    );
    assert!(sim.everyone_has("gone", None), "a deleted row came back");
    assert!(sim.everyone_has("kept", Some("y")));
    // Everyone has it now: collected after the TTL like any other.
    sim.run_for(Duration::from_secs(700));
    for i in 0..3 {
        assert!(
            sim.nodes[i].replica().get(&key).is_none(),
            "node {i} still holds the tombstone"
        );
    }
}

/// The same, with every POP that keeps the deletion restarted while the
/// member is down: what they owe it is in their databases.
#[test]
fn deletions_owed_to_a_down_pop_are_kept_across_restarts_of_the_others() {
    let mut cfg = SimConfig::wan(3, 45);
    cfg.tombstone_ttl = Duration::from_secs(600);
    let mut sim = joined(cfg);
    sim.write(0, "gone", Some("x"));
    sim.run_for(Duration::from_secs(10));
    assert!(sim.everyone_has("gone", Some("x")));
    sim.crash(2);
    sim.run_for(Duration::from_secs(30));
    assert!(sim.saw_down(0, 2).is_some() && sim.saw_down(1, 2).is_some());
    sim.write(0, "gone", None);
    sim.run_for(Duration::from_secs(60));
    // Both keepers restart, one after the other, within the TTL.
    for i in [0, 1] {
        sim.crash(i);
        sim.run_for(Duration::from_secs(5));
        sim.restart(i, 1 - i);
        sim.run_for(Duration::from_secs(30));
    }
    sim.run_for(Duration::from_secs(900));
    let key = RowKey::new(Table::Backends, "gone");
    for i in [0, 1] {
        assert!(
            sim.nodes[i].replica().get(&key).is_some(),
            "node {i} collected the tombstone owed to the down POP after a restart"
        );
    }
    sim.restart(2, 0);
    let back = sim.elapsed();
    assert!(
        sim.run_until(back + Duration::from_secs(60), |s| s.membership_complete()
            && s.converged())
    );
    assert!(sim.everyone_has("gone", None), "a deleted row came back");
    // Both said the member was back, with its deletions kept.
    let kept_by: Vec<usize> = sim
        .events
        .iter()
        .filter_map(|(_, i, e)| match e {
            super::node::Event::PeerBackAfterTombstoneTtl {
                kept_for_it: true, ..
            } => Some(*i),
            _ => None,
        })
        .collect();
    assert!(kept_by.contains(&0) && kept_by.contains(&1), "{kept_by:?}");
}

/// Forgetting a member releases the tombstones kept for it.
#[test]
fn forgetting_a_down_member_releases_the_tombstones_kept_for_it() {
    let mut cfg = SimConfig::wan(3, 44);
    cfg.tombstone_ttl = Duration::from_secs(600);
    let mut sim = joined(cfg);
    sim.write(0, "gone", Some("x"));
    sim.run_for(Duration::from_secs(10));
    sim.crash(2);
    sim.run_for(Duration::from_secs(30));
    sim.write(0, "gone", None);
    sim.run_for(Duration::from_secs(700));
    let key = RowKey::new(Table::Backends, "gone");
    assert!(sim.nodes[0].replica().get(&key).is_some());
    sim.forget(0, "n2").expect("n2 is down");
    sim.run_for(Duration::from_secs(200));
    for i in 0..2 {
        assert!(
            sim.nodes[i].replica().get(&key).is_none(),
            "node {i} still holds the tombstone of a forgotten member"
        );
    }
}

/// Tombstones are collected everywhere after the TTL, also when the nodes'
/// collections do not run at the same moments (one restarted): a node that
/// has not collected yet must not hand the tombstone back to one that has.
#[test]
fn tombstones_are_collected_everywhere_after_the_ttl() {
    let mut cfg = SimConfig::wan(3, 45);
    cfg.tombstone_ttl = Duration::from_secs(600);
    let mut sim = joined(cfg);
    sim.crash(2);
    sim.run_for(Duration::from_secs(20));
    sim.restart(2, 0);
    let t = sim.elapsed();
    assert!(sim.run_until(t + Duration::from_secs(60), |s| s.membership_complete()));
    sim.write(0, "gone", Some("x"));
    sim.run_for(Duration::from_secs(10));
    sim.write(0, "gone", None);
    sim.run_for(Duration::from_secs(10));
    let key = RowKey::new(Table::Backends, "gone");
    assert!(sim.nodes[2].replica().get(&key).is_some());
    sim.run_for(Duration::from_secs(900));
    for i in 0..3 {
        assert!(
            sim.nodes[i].replica().get(&key).is_none(),
            "node {i} still holds the tombstone"
        );
    }
}

/// A member back after the TTL is owed the tombstones kept for it until an
/// exchange has covered every differing bucket: one that listed only some
/// of them (too many versions for one exchange) must not release them, or
/// the deletions in the buckets left out could be collected before they
/// reach it, and its old rows come back.
#[test]
fn tombstones_stay_owed_until_an_exchange_covered_every_differing_bucket() {
    use super::node::limits;
    use super::replica::bucket_of;
    let mut cfg = SimConfig::wan(3, 46);
    cfg.tombstone_ttl = Duration::from_secs(600);
    let mut sim = joined(cfg);
    let rows: Vec<String> = (0..limits::SYNC_VERSIONS + 800)
        .map(|i| format!("r{i}"))
        .collect();
    let now = sim.now();
    sim.nodes[0].local_writes(
        now,
        rows.iter()
            .map(|pk| (RowKey::new(Table::Backends, pk), Some("x".to_string()))),
    );
    // In the last bucket: compared last.
    let gone = (0..)
        .map(|i| format!("gone{i}"))
        .find(|pk| bucket_of(&RowKey::new(Table::Backends, pk)) == 255)
        .unwrap();
    sim.write(0, &gone, Some("x"));
    let t = sim.elapsed();
    assert!(sim.run_until(t + Duration::from_secs(60), Sim::converged));
    sim.crash(2);
    sim.run_for(Duration::from_secs(30));
    sim.write(0, &gone, None);
    // One changed row in every bucket: every bucket differs at node 2.
    let mut touched = [false; 256];
    let now = sim.now();
    let changed: Vec<(RowKey, Option<String>)> = rows
        .iter()
        .map(|pk| RowKey::new(Table::Backends, pk))
        .filter(|k| !std::mem::replace(&mut touched[bucket_of(k)], true))
        .map(|k| (k, Some("y".to_string())))
        .collect();
    sim.nodes[0].local_writes(now, changed);
    sim.run_for(Duration::from_secs(700));
    sim.restart(2, 0);
    let back = sim.elapsed();
    assert!(sim.run_until(back + Duration::from_secs(60), |s| !s.nodes[0].owes("n2")));
    // What node 0 sent in that exchange arrives.
    sim.run_for(Duration::from_millis(300));
    let key = RowKey::new(Table::Backends, &gone);
    assert!(
        sim.nodes[2]
            .replica()
            .get(&key)
            .is_some_and(|r| r.is_tombstone()),
        "node 0 stopped keeping tombstones for node 2 before node 2 had them"
    );
}

/// The last contact a restart reads was persisted up to a minute before
/// the previous run's real last contact: a POP restarted after a silence
/// shorter than the TTL does not warn because its record was stale.
#[test]
fn a_stale_persisted_contact_does_not_warn_of_a_silence_shorter_than_the_ttl() {
    use super::node::{Event, CONTACT_PERSIST_EVERY};
    let mut cfg = SimConfig::wan(3, 47);
    cfg.tombstone_ttl = Duration::from_secs(600);
    let mut sim = joined(cfg);
    sim.run_for(Duration::from_secs(30));
    sim.crash(2);
    let last = sim.nodes[2].last_contact().expect("heard the others");
    sim.run_for(Duration::from_secs(580));
    sim.restart(2, 0);
    // What the driver had persisted: up to a minute before `last`.
    let stale = last - CONTACT_PERSIST_EVERY.as_millis() as u64 + 5_000;
    sim.nodes[2].set_last_contact(Some(stale));
    let t = sim.elapsed();
    assert!(
        sim.run_until(t + Duration::from_secs(30), |s| s.membership_complete()
            && s.converged())
    );
    sim.run_for(Duration::from_secs(10));
    assert!(sim.nodes[2].last_contact() > Some(last), "no contact yet");
    let said = sim
        .events
        .iter()
        .any(|(_, i, e)| *i == 2 && matches!(e, Event::ContactAfterTombstoneTtl { .. }));
    assert!(!said, "silent 580 s of a 600 s TTL, warned");
}

/// A restarted POP still holds down the members it held down before: the
/// stand-in expiring their backends and `cluster status` read them. Their
/// heartbeats count as unheard from the restart only (the member may have
/// come back meanwhile), and a member seen again is no longer held down.
#[test]
fn a_restarted_pop_still_holds_down_the_members_it_held_down() {
    let mut sim = joined(SimConfig::wan(3, 46));
    sim.crash(2);
    sim.run_for(Duration::from_secs(30));
    let down_at = sim.saw_down(0, 2).expect("node 0 saw node 2 down");
    let before: Vec<_> = sim.nodes[0].down_members();
    assert_eq!(before.len(), 1);
    assert!(!before[0].restored);
    assert_eq!(before[0].since_ms, before[0].unheard_since_ms);
    let since = before[0].since_ms;

    sim.crash(0);
    sim.run_for(Duration::from_secs(5));
    sim.restart(0, 1);
    let restarted_ms = sim.now().wall_ms;
    sim.run_for(Duration::from_secs(30));
    let after = sim.nodes[0].down_members();
    assert_eq!(after.len(), 1, "node 0 forgot the down member: {after:?}");
    let d = &after[0];
    assert_eq!(&*d.id, "n2");
    assert_eq!(d.since_ms, since, "declared down at {down_at:?}");
    assert!(d.restored, "this run has not heard of it");
    assert_eq!(d.unheard_since_ms, restarted_ms.max(since));

    // It comes back: no longer held down.
    sim.restart(2, 1);
    let back = sim.elapsed();
    assert!(sim.run_until(back + Duration::from_secs(60), |s| s.membership_complete()));
    assert!(sim.nodes[0].down_members().is_empty());
}

/// Rows an anti-entropy exchange brings after a partition are late by the
/// partition's length: that is not replication's lag, and the member's
/// `LAG` keeps the last broadcast's.
#[test]
fn a_catch_up_after_a_partition_is_not_counted_as_lag() {
    let mut sim = joined(SimConfig::wan(2, 47));
    sim.write(0, "before", Some("x"));
    let t0 = sim.elapsed();
    assert!(sim.run_until(t0 + Duration::from_secs(10), Sim::converged));
    let lag = |sim: &Sim| {
        sim.nodes[1]
            .members()
            .into_iter()
            .find(|m| &*m.peer.id == "n0")
            .and_then(|m| m.sync.last_lag_ms)
    };
    let broadcast_lag = lag(&sim).expect("a broadcast's lag");
    assert!(broadcast_lag < 1_000, "{broadcast_lag} ms");
    sim.partition(|i| i as u8);
    sim.run_for(Duration::from_secs(1));
    sim.write(0, "during", Some("y"));
    sim.run_for(Duration::from_secs(60));
    sim.heal();
    let healed = sim.elapsed();
    assert!(sim.run_until(healed + Duration::from_secs(60), Sim::converged));
    assert!(sim.everyone_has("during", Some("y")));
    assert_eq!(
        lag(&sim),
        Some(broadcast_lag),
        "the catch-up counted as lag"
    );
}

/// Right after a restart no exchange with any member has ended yet:
/// `cluster status` says "not known" (QA: "no" for every member read as a
/// cluster out of sync), then "yes" once an exchange finds the same rows.
/// A timed-out exchange and a member not alive still say "no".
#[test]
fn after_a_restart_in_sync_is_unknown_until_an_exchange_ends() {
    use super::membership::MemberState;
    use super::node::PeerSync;

    let mut sim = joined(SimConfig::wan(3, 41));
    let t0 = sim.elapsed();
    assert!(sim.run_until(t0 + Duration::from_secs(10), Sim::converged));
    sim.crash(0);
    sim.run_for(Duration::from_secs(1));
    sim.restart(0, 1);
    let shown = |s: &Sim| -> Vec<Option<bool>> {
        s.nodes[0]
            .members()
            .iter()
            .map(|m| m.sync.in_sync_now(m.state))
            .collect()
    };
    let t1 = sim.elapsed();
    assert!(
        sim.run_until(t1 + Duration::from_secs(10), |s| s.nodes[0]
            .members()
            .iter()
            .any(|m| m.state == MemberState::Alive)),
        "node 0 never rejoined"
    );
    assert!(
        shown(&sim).iter().all(|s| *s != Some(true)),
        "in sync before any exchange: {:?}",
        shown(&sim)
    );
    assert!(
        shown(&sim).contains(&None),
        "an alive member with no exchange yet is not shown as unknown: {:?}",
        shown(&sim)
    );
    assert!(
        sim.run_until(t1 + Duration::from_secs(60), |s| shown(s)
            == vec![Some(true), Some(true)]),
        "never shown in sync: {:?}",
        shown(&sim)
    );

    let timed_out = PeerSync {
        timeouts_in_a_row: 1,
        ..PeerSync::default()
    };
    assert_eq!(timed_out.in_sync_now(MemberState::Alive), Some(false));
    let synced = PeerSync {
        last_sync: Some(std::time::Instant::now()),
        in_sync: true,
        ..PeerSync::default()
    };
    assert_eq!(synced.in_sync_now(MemberState::Alive), Some(true));
    assert_eq!(synced.in_sync_now(MemberState::Suspect), Some(false));
    assert_eq!(
        PeerSync::default().in_sync_now(MemberState::Down),
        Some(false)
    );
}

/// Node `i`'s `pops` row as its POP writes it: the operator's `draining`,
/// and `wg_public_key` standing for every identity column generated or
/// configured at start.
fn pop_row(i: usize, key: &str, draining: u8) -> String {
    format!(r#"{{"node_id":"n{i}","wg_public_key":"{key}","draining":{draining}}}"#)
}

/// How long a starting node waits for the cluster's copy of its own row:
/// no member answering, and members answering but no exchange completing
/// (`Replication::own_row_patience` and `own_row_longest_wait` with the
/// shipped gossip interval).
const OWN_ROW_PATIENCE: Duration = Duration::from_secs(3);
const OWN_ROW_WAITS: (Duration, Duration) = (OWN_ROW_PATIENCE, Duration::from_secs(10));

/// QA: a drained POP restarted with its `routing.db` wiped wrote a fresh
/// row at start, newer than the cluster's drained copy, and came back
/// undrained on every POP. Its row is now held back until the cluster's
/// copy arrives; the drain comes from that copy, the identity from this
/// start.
#[test]
fn a_drained_pop_restarted_with_its_database_wiped_stays_drained_everywhere() {
    for seed in [1, 2, 3] {
        let mut sim = joined(SimConfig::wan(3, 700 + seed));
        for i in 0..3 {
            sim.write_pop(i, &pop_row(i, "old", 0));
        }
        // `edgeproxy drain` at n1, replicated.
        sim.write_pop(1, &pop_row(1, "old", 1));
        let t0 = sim.elapsed();
        assert!(sim.run_until(t0 + Duration::from_secs(10), |s| (0..3)
            .all(|at| s.pop_row(at, 1).is_some_and(|r| r["draining"] == 1))));
        // kill -9, rm routing.db*, restart: a new mesh key this time.
        sim.crash(1);
        sim.run_for(Duration::from_secs(10));
        sim.restart_wiped(1, 0, &pop_row(1, "new", 0), OWN_ROW_WAITS);
        let restarted = sim.elapsed();
        assert!(
            sim.run_until(restarted + Duration::from_secs(20), |s| {
                s.converged() && !s.own_rows_written.is_empty()
            }),
            "seed {seed}: did not converge"
        );
        let (at, _, due) = sim.own_rows_written[0];
        assert_eq!(due, super::node::OwnRowDue::CopyArrived, "seed {seed}");
        // Held for a join and one exchange, not for the whole patience.
        assert!(
            at - restarted < Duration::from_secs(2),
            "seed {seed}: row written {:?} after the restart",
            at - restarted
        );
        for observer in 0..3 {
            let row = sim.pop_row(observer, 1).expect("n1's row");
            assert_eq!(row["draining"], 1, "seed {seed}: drain lost at n{observer}");
            assert_eq!(
                row["wg_public_key"], "new",
                "seed {seed}: this start's identity lost at n{observer}"
            );
        }
    }
}

/// QA: a drained POP moved to a new address with a fresh disk (host
/// replacement) is refused by the members as a duplicate id until its old
/// identity is declared down (about 4 s). Its held row was written after
/// the 3 s patience, undrained, newer than the drain: it came back
/// undrained everywhere. Members answering, it now waits for an exchange.
#[test]
fn a_drained_pop_moved_to_a_new_address_with_a_new_disk_stays_drained_everywhere() {
    for seed in [1, 2, 3, 4, 5] {
        let mut sim = joined(SimConfig::wan(3, 720 + seed));
        for i in 0..3 {
            sim.write_pop(i, &pop_row(i, "old", 0));
        }
        sim.write_pop(2, &pop_row(2, "old", 1));
        let t0 = sim.elapsed();
        assert!(sim.run_until(t0 + Duration::from_secs(10), |s| (0..3)
            .all(|at| s.pop_row(at, 2).is_some_and(|r| r["draining"] == 1))));
        // Replaced at once: the old host gone, the new one at another
        // address, its database empty.
        sim.crash(2);
        let generation = sim.nodes[2].settings().generation + 1;
        let moved = sim.spawn_wiped("n2", generation, 0, &pop_row(2, "new", 0), OWN_ROW_WAITS);
        let started = sim.elapsed();
        assert!(
            sim.run_until(started + Duration::from_secs(30), |s| {
                !s.own_rows_written.is_empty()
                    && (0..2).all(|at| {
                        s.pop_row(at, 2)
                            .is_some_and(|r| r["wg_public_key"] == "new")
                    })
            }),
            "seed {seed}: the moved node's row never arrived"
        );
        let (at, _, due) = sim.own_rows_written[0];
        assert_eq!(
            due,
            super::node::OwnRowDue::CopyArrived,
            "seed {seed}: written after {:?}",
            at - started
        );
        for observer in [0, 1, moved] {
            let row = sim.pop_row(observer, moved).expect("n2's row");
            assert_eq!(row["draining"], 1, "seed {seed}: drain lost at {observer}");
        }
    }
}

/// Members answering but no exchange ever completing (the transport
/// blocked): the held row is written at the longest wait, not before.
#[test]
fn a_pop_whose_exchanges_never_complete_writes_its_own_row_at_the_longest_wait() {
    let mut sim = joined(SimConfig::wan(2, 730));
    sim.crash(1);
    sim.run_for(Duration::from_secs(1));
    sim.restart_wiped(1, 0, &pop_row(1, "k1", 0), OWN_ROW_WAITS);
    sim.drop_messages_to.insert(1);
    let restarted = sim.elapsed();
    sim.run_for(Duration::from_secs(15));
    assert_eq!(sim.own_rows_written.len(), 1);
    let (at, i, due) = sim.own_rows_written[0];
    assert_eq!((i, due), (1, super::node::OwnRowDue::NoExchange));
    assert_eq!(at - restarted, OWN_ROW_WAITS.1);
}

/// The first POP of a new cluster (nobody answers) holds its row for the
/// patience only, then writes it; one that joins a cluster that never
/// heard of it writes it after its first exchange.
#[test]
fn a_pop_with_no_row_anywhere_writes_its_own_after_one_exchange_or_the_patience() {
    let mut sim = joined(SimConfig::wan(2, 710));
    sim.crash(0);
    sim.crash(1);
    sim.run_for(Duration::from_secs(1));
    // Alone: node 0 restarted wiped, node 1 still down.
    sim.restart_wiped(0, 1, &pop_row(0, "k0", 0), OWN_ROW_WAITS);
    let alone = sim.elapsed();
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.own_rows_written.len(), 1);
    let (at, i, due) = sim.own_rows_written[0];
    assert_eq!((i, due), (0, super::node::OwnRowDue::NoAnswer));
    assert_eq!(at - alone, OWN_ROW_PATIENCE);
    assert_eq!(sim.pop_row(0, 0).unwrap()["wg_public_key"], "k0");
    // Node 1 joins it, wiped too: the cluster has no row of n1.
    sim.restart_wiped(1, 0, &pop_row(1, "k1", 0), OWN_ROW_WAITS);
    let joining = sim.elapsed();
    assert!(sim.run_until(joining + Duration::from_secs(10), |s| s
        .own_rows_written
        .len()
        == 2
        && s.converged()));
    let (at, i, due) = sim.own_rows_written[1];
    assert_eq!((i, due), (1, super::node::OwnRowDue::NoCopyInCluster));
    assert!(at - joining < Duration::from_secs(2), "{:?}", at - joining);
    assert_eq!(sim.pop_row(0, 1).unwrap()["wg_public_key"], "k1");
}

/// A backend row as an operator's bulk import writes it (~230 bytes).
fn imported_backend(side: &str, k: usize) -> (String, String) {
    let id = format!("{side}-{k}");
    let data = format!(
        r#"{{"id":"{id}","app":"web","region":"eu","country":null,"wg_ip":"10.78.{}.{}","port":80,"healthy":1,"weight":1,"soft_limit":100,"hard_limit":150,"deleted":0,"expired":0,"heartbeat_pop":null,"registered_at":1800000000000}}"#,
        k / 250,
        1 + k % 250
    );
    (id, data)
}

/// A big divergence healed over a slow, lossy link (QA: 20,000 rows a side
/// over 50 ms / 1 % loss took 144 s on real POPs): each anti-entropy
/// exchange carried 512 KB of rows each way plus the versions listed, more
/// than the link moved within the exchange's 10 s, so exchanges timed out,
/// their rows were thrown away on arrival and the next exchange sent them
/// again; and the two POPs' exchanges listed the same buckets, so each sent
/// its rows twice. Returns the time from the heal to identical replicas.
fn heal_a_big_divergence(rows: usize, bytes_per_sec: u64, seed: u64) -> Duration {
    let mut cfg = SimConfig::wan(2, seed);
    cfg.bandwidth = Some(bytes_per_sec);
    let mut sim = joined(cfg);
    sim.partition(|i| i as u8);
    sim.run_for(Duration::from_secs(15));
    sim.write_many(0, (0..rows).map(|k| imported_backend("left", k)));
    sim.write_many(1, (0..rows).map(|k| imported_backend("right", k)));
    sim.run_for(Duration::from_secs(1));
    sim.heal();
    let healed = sim.elapsed();
    let converged = sim.run_until(healed + Duration::from_secs(600), Sim::converged);
    let took = sim.elapsed() - healed;
    let timed_out = sim
        .events
        .iter()
        .filter(|(at, _, e)| *at >= healed && matches!(e, super::node::Event::SyncTimedOut { .. }))
        .count();
    eprintln!(
        "{rows} rows a side at {bytes_per_sec} B/s: converged {converged} after {took:?}; \
         {timed_out} exchanges timed out, {} late; bytes by message: {:?}",
        sim.nodes.iter().map(|n| n.stats.syncs_late).sum::<u64>(),
        sim.message_bytes
    );
    assert!(converged, "not converged in 600 s");
    took
}

#[test]
fn a_big_divergence_heals_over_a_slow_link_without_sending_rows_twice() {
    // 150 KB/s: what QUIC's congestion control (CUBIC) makes of a 100 ms
    // round trip with 1 % random loss. The rows alone are ~5.4 MB each
    // way, 36 s at that rate; before: 172 s, 17 exchanges timed out,
    // 35 MB sent.
    let took = heal_a_big_divergence(20_000, 150_000, 41);
    assert!(took <= Duration::from_secs(75), "healed in {took:?}");
}

#[test]
fn exchanges_shrink_to_fit_a_link_too_slow_for_the_largest() {
    // 40 KB/s: not even one full-size exchange fits the timeout. Rows
    // ~1.35 MB each way, 34 s; before, no convergence in 600 s (109
    // exchanges timed out, each starting over).
    let took = heal_a_big_divergence(5_000, 40_000, 41);
    assert!(took <= Duration::from_secs(120), "healed in {took:?}");
}

/// Found by `fuzz_replication` (a node fed a buggy peer's messages): a row
/// whose intent (the deliberate write a verdict sits on) is later than the
/// row's own version was taken as it was. Its intent, a day ahead here,
/// beat every deliberate write made since (the drift rule checked the
/// version only), and anti-entropy handed it back to the POPs that had the
/// newer write: an acknowledged write lost everywhere.
#[test]
fn a_row_whose_intent_is_later_than_its_version_is_refused() {
    use super::hlc::Hlc;
    use super::version::{RowVersion, Version};
    use super::wire::{self, Envelope, Msg, PROTOCOL};
    use std::sync::Arc;

    let mut sim = joined(SimConfig::wan(3, 41));
    let now = sim.now();
    let day_ms = 24 * 3600 * 1000;
    let bogus = RowVersion {
        key: RowKey::new(Table::Backends, "x"),
        version: Version {
            hlc: Hlc::new(now.wall_ms, 0),
            origin: Arc::from("n1"),
        },
        intent: Some(Version {
            hlc: Hlc::new(now.wall_ms + day_ms, 0),
            origin: Arc::from("n1"),
        }),
        data: Some(backend(0, 1, 1, "n1")),
    };
    let from_n1 = wire::encode(&Envelope {
        cluster: "sim".into(),
        schema: 1,
        protocol: PROTOCOL,
        from: Arc::from("n1"),
        reply_to: sim.nodes[1].settings().transport_addr,
        msg: Msg::Changes {
            hops: 0,
            rows: vec![bogus],
        },
    });
    let n1 = sim.nodes[1].settings().transport_addr;
    sim.nodes[0].handle_message(now, n1, &from_n1);
    while sim.nodes[0].poll_output().is_some() {}
    sim.run_for(Duration::from_secs(1));
    // A deliberate write at n2, after it: the last decision.
    sim.write(2, "x", Some(&backend(1, 1, 0, "n0")));
    let t0 = sim.elapsed();
    sim.run_until(t0 + Duration::from_secs(20), |s| {
        s.converged() && s.everyone_has("x", Some(&backend(1, 1, 0, "n0")))
    });
    for i in 0..3 {
        assert_eq!(
            sim.nodes[i]
                .replica()
                .data(&RowKey::new(Table::Backends, "x")),
            Some(backend(1, 1, 0, "n0").as_str()),
            "node {i}"
        );
    }
}

/// Found by `fuzz_replication` (huge counts from a buggy peer): the
/// responder of an exchange walked every bucket the initiator listed, as
/// many times as listed, cloning each row of it every time. A
/// `SyncVersions` of 6 MB listing the 256 buckets over and over took 41 s
/// (debug build) of the control thread at a node of 2,000 rows, and its
/// reply carried rows several times. Each bucket counts once.
#[test]
fn a_bucket_listed_many_times_is_walked_once() {
    use super::replica::bucket_of;
    use super::wire::{self, Envelope, Msg, PROTOCOL};
    use std::collections::HashSet;
    use std::sync::Arc;

    let mut sim = joined(SimConfig::wan(2, 43));
    sim.write_many(0, (0..200).map(|i| (format!("b{i}"), format!("row {i}"))));
    let bucket = bucket_of(&RowKey::new(Table::Backends, "b0")) as u16;
    let n1 = sim.nodes[1].settings().transport_addr;
    let listed = wire::encode(&Envelope {
        cluster: "sim".into(),
        schema: 1,
        protocol: PROTOCOL,
        from: Arc::from("n1"),
        reply_to: n1,
        msg: Msg::SyncVersions {
            session: 7,
            buckets: vec![bucket; 10_000],
            versions: Vec::new(),
        },
    });
    let now = sim.now();
    sim.nodes[0].handle_message(now, n1, &listed);
    let mut replies = 0;
    while let Some(out) = sim.nodes[0].poll_output() {
        let super::node::Output::Message { bytes, .. } = out else {
            continue;
        };
        let Msg::SyncRows { rows, .. } = wire::decode(&bytes).unwrap().msg else {
            continue;
        };
        replies += 1;
        let keys: HashSet<&RowKey> = rows.iter().map(|r| &r.key).collect();
        assert_eq!(keys.len(), rows.len(), "a row sent more than once");
        assert!(rows.iter().any(|r| r.key.pk == "b0"));
        assert!(rows.iter().all(|r| bucket_of(&r.key) == bucket as usize));
    }
    assert_eq!(replies, 1);
}

/// Heals the network and expects every node to see every other alive
/// within 30 s (`context` names the case when not).
fn heal_and_expect_everyone_alive(sim: &mut Sim, context: &str) {
    sim.heal();
    let healed = sim.elapsed();
    assert!(
        sim.run_until(healed + Duration::from_secs(30), Sim::everyone_alive),
        "{context}: {:?}",
        sim.not_alive()
    );
}

/// Found by `fuzz_replication`'s random-fault simulations (seeds 101062,
/// 102243, 102540 of 100000..105000): a cluster split in two halves for
/// about as long as it takes to declare the other half down (8 to 11 s
/// here) never came back together. At the heal every node told the other
/// half "you are down" and was told so in turn, so every node renewed its
/// identity within the same round trip. foca then waits, silent, for a
/// message addressed to the new identity; the one member each still held
/// alive had renewed too and dropped what came addressed to its old one.
/// Nobody was left to answer: two halves for good (120 s and more).
#[test]
fn a_split_healed_while_every_node_renews_itself_comes_back_together() {
    use super::membership::MemberEvent;
    use super::node::Event;

    for (one_way, split_ms) in [(12, 8000), (113, 9600), (113, 11_300)] {
        let mut cfg = SimConfig::wan(4, 102540);
        cfg.one_way = Duration::from_millis(one_way);
        cfg.jitter = Duration::from_millis(14);
        cfg.loss = 0.0;
        let mut sim = joined(cfg);
        sim.partition(|i| (i == 0 || i == 3) as u8);
        sim.run_for(Duration::from_millis(split_ms));
        heal_and_expect_everyone_alive(
            &mut sim,
            &format!("{one_way} ms links, split {split_ms} ms"),
        );
        // And each stops announcing itself once answered.
        for i in 0..4 {
            let last = sim.events.iter().rev().find_map(|(_, n, e)| match e {
                Event::Member(m @ (MemberEvent::Rejoined | MemberEvent::Joined)) if *n == i => {
                    Some(m.clone())
                }
                _ => None,
            });
            assert!(
                matches!(last, None | Some(MemberEvent::Joined)),
                "n{i} still rejoining"
            );
        }
    }
}

/// Found by `fuzz_replication`'s random-fault simulations (seed 104284): a
/// POP cut off alone (every member down: foca idle, its timers stopped)
/// waited for the others to knock, but they had restarted meanwhile, with
/// memberships that never heard of it (the first restarted through it,
/// blocked, the second through the first, which then had a member and
/// stopped knocking on its bootstrap peer). With no bootstrap peer of its
/// own (the first POP of the cluster), it never spoke again: alone for good
/// after the heal.
#[test]
fn a_pop_left_alone_knocks_on_the_members_it_knew() {
    let mut sim = joined(SimConfig::wan(3, 44));
    sim.partition(|i| (i != 0) as u8);
    sim.run_for(Duration::from_secs(15));
    assert_eq!(sim.nodes[0].active_members(), 0, "alone");
    sim.crash(1);
    sim.crash(2);
    sim.run_for(Duration::from_secs(1));
    sim.restart(1, 0);
    sim.run_for(Duration::from_secs(3));
    sim.restart(2, 1);
    assert!(
        sim.run_until(sim.elapsed() + Duration::from_secs(10), |s| s.nodes[1]
            .active_members()
            == 1)
    );
    heal_and_expect_everyone_alive(&mut sim, "after the heal");
}

/// Found by `fuzz_replication`'s random-fault simulations (seed 7671): two
/// groups formed apart (every POP restarted during a split, each joining
/// whichever peer answered first) never merged after the heal. A node
/// announced itself to its bootstrap peers only while it had no member at
/// all; with one it stopped, and SWIM only ever talks to members it knows.
/// Here each half's first node has its bootstrap peer in the other half.
#[test]
fn groups_formed_apart_merge_through_their_bootstrap_peers() {
    let mut sim = joined(SimConfig::wan(4, 45));
    sim.partition(|i| (i >= 2) as u8);
    for i in 0..4 {
        sim.crash(i);
    }
    sim.run_for(Duration::from_secs(1));
    sim.restart(0, 2);
    sim.restart(2, 0);
    sim.run_for(Duration::from_secs(3));
    sim.restart(1, 0);
    sim.restart(3, 2);
    assert!(sim.run_until(sim.elapsed() + Duration::from_secs(10), |s| {
        s.nodes[0].active_members() == 1 && s.nodes[2].active_members() == 1
    }));
    heal_and_expect_everyone_alive(&mut sim, "after the heal");
}
